//! Prometheus metrics of the agent (`run --metrics-listen`, `/metrics` in
//! the OpenMetrics text format):
//!
//! - `sdn_agent_drops_total{reason}`: packets dropped, by reason (a flow
//!   refused for its port's budget is `reason="ct_budget"`);
//! - `sdn_agent_packets_total{stat}`: the dataplane's other counters;
//! - `sdn_agent_port_flows{device}`: each port's flows in the flow table;
//! - `sdn_agent_port_packets_total{device,direction}` and
//!   `sdn_agent_port_bytes_total{device,direction}`: the port's tracked
//!   traffic (`out`: the VM sends), as of the last collection of the flow
//!   table (every 5 s), since the agent started;
//! - `sdn_agent_enforced_revision`: the revision the agent last said it
//!   enforces;
//! - with flow export: `sdn_agent_flow_records_total` (made),
//!   `sdn_agent_flow_records_lost_total{cause}` (`queue_full`: a collector's
//!   queue had no room; `denied_rate`: denied flows over the rate),
//!   `sdn_agent_flow_denial_events_total` (read from the dataplane), and per
//!   collector `sdn_agent_flow_collector_records_total{collector}` (sent)
//!   and `sdn_agent_flow_collector_dropped_total{collector}` (lost to a
//!   failed connection);
//! - with syslog: `sdn_agent_syslog_events_total{outcome}` (`sent`,
//!   `dropped`: a receiver's queue was full or the receiver down,
//!   `suppressed`: denial events over the rate);
//! - `sdn_agent_denial_events_total{outcome}`: the dataplane's denial
//!   events (`sent`, `suppressed` over the per-CPU rate, `lost` to a full
//!   ring), and `sdn_agent_dns_copies_total{outcome}`: the DNS answers it
//!   copied up (`sent`, `suppressed`);
//! - with mirror sessions: `sdn_agent_mirror_packets_total{session,outcome}`
//!   (`matched`, `sampled_out`, `over_rate`, `copied`, `copy_failed`,
//!   `sent`, `send_failed`) and `sdn_agent_mirror_ring_lost_total`;
//! - with information systems: `sdn_agent_system_bytes_total{system,zone,direction}`
//!   (this host's ports' frames with the zone: `up` to it, `down` from
//!   it) and `sdn_agent_usage_samples_total{outcome}` (`sent`, `refused`
//!   by the controller, `dropped` from a full queue).
//!
//! Plain HTTP: bind it to an address only the monitoring system reaches.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::dataplane::{read_counters, Traffic};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatLabel {
    stat: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Cause {
    cause: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CollectorLabel {
    collector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SystemWay {
    system: String,
    zone: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionOutcome {
    session: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Device {
    device: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeviceDir {
    device: String,
    direction: &'static str,
}

/// What one scrape reads.
#[derive(Clone)]
pub struct Sources {
    pub pin_dir: PathBuf,
    pub traffic: Arc<Mutex<Traffic>>,
    pub enforced: Arc<AtomicU64>,
    /// The flow export's counters, when the agent exports flows or events.
    pub flows: Option<Arc<crate::flows::Stats>>,
    /// The security events, when the agent sends them.
    pub syslog: Option<crate::events::Events>,
    /// The mirror sessions by slot, and the agent's counts of their copies.
    pub mirror_sessions: Arc<std::sync::RwLock<std::collections::BTreeMap<u32, String>>>,
    pub mirror: Arc<crate::mirror::Stats>,
    pub usage: Arc<crate::usage::Stats>,
}

/// The device name of each ifindex on this host.
fn device_names() -> std::collections::BTreeMap<u32, String> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(dir) = std::fs::read_dir("/sys/class/net") {
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(i) = std::fs::read_to_string(e.path().join("ifindex"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
            {
                out.insert(i, name);
            }
        }
    }
    out
}

/// The text of one scrape.
pub fn render(src: &Sources) -> Result<String, String> {
    let mut reg = Registry::with_prefix("sdn_agent");
    let (drops, stats) = read_counters(&src.pin_dir).map_err(|e| format!("{e:#}"))?;
    let d = Family::<Reason, Counter>::default();
    for (reason, n) in drops {
        d.get_or_create(&Reason { reason }).inc_by(n);
    }
    reg.register("drops", "Packets dropped, by reason", d);
    let p = Family::<StatLabel, Counter>::default();
    for (stat, n) in stats {
        p.get_or_create(&StatLabel { stat }).inc_by(n);
    }
    reg.register("packets", "The dataplane's counters of packets passed and flows", p);

    let names = device_names();
    let name = |i: u32| names.get(&i).cloned().unwrap_or_else(|| format!("ifindex-{i}"));
    let flows = Family::<Device, Gauge>::default();
    let packets = Family::<DeviceDir, Counter>::default();
    let bytes = Family::<DeviceDir, Counter>::default();
    {
        let t = src.traffic.lock().unwrap_or_else(|p| p.into_inner());
        for (i, pt) in &t.ports {
            let device = name(*i);
            flows
                .get_or_create(&Device { device: device.clone() })
                .set(pt.flows as i64);
            for (direction, pk, by) in [
                ("out", pt.packets_out, pt.bytes_out),
                ("in", pt.packets_in, pt.bytes_in),
            ] {
                let l = DeviceDir {
                    device: device.clone(),
                    direction,
                };
                packets.get_or_create(&l).inc_by(pk);
                bytes.get_or_create(&l).inc_by(by);
            }
        }
    }
    reg.register("port_flows", "Flows of each port in the flow table", flows);
    reg.register("port_packets", "Tracked packets of each port, by direction", packets);
    reg.register("port_bytes", "Tracked bytes of each port, by direction", bytes);
    let rev = Gauge::<i64>::default();
    rev.set(src.enforced.load(Ordering::Relaxed) as i64);
    reg.register(
        "enforced_revision",
        "The revision this agent last said it enforces",
        rev,
    );
    for (slot, name, help) in [
        (
            dataplane_common::maps::LIMIT_DENIALS,
            "denial_events",
            "The dataplane's denial events, by outcome",
        ),
        (
            dataplane_common::maps::LIMIT_DNS,
            "dns_copies",
            "DNS answers the dataplane copied up, by outcome",
        ),
    ] {
        if let Ok(l) = crate::dataplane::read_event_limits(&src.pin_dir, slot) {
            let f = Family::<Outcome, Counter>::default();
            for (outcome, n) in [("sent", l.sent), ("suppressed", l.suppressed), ("lost", l.lost)] {
                f.get_or_create(&Outcome { outcome }).inc_by(n);
            }
            reg.register(name, help, f);
        }
    }
    let sessions = src.mirror_sessions.read().unwrap_or_else(|p| p.into_inner()).clone();
    if !sessions.is_empty() {
        let kernel = crate::dataplane::read_mirror_counters(&src.pin_dir).unwrap_or_default();
        let f = Family::<SessionOutcome, Counter>::default();
        for (slot, id) in &sessions {
            let k = kernel.get(*slot as usize).copied().unwrap_or_default();
            let i = *slot as usize;
            let sent = src.mirror.sent.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            let failed = src.mirror.failed.get(i).map_or(0, |c| c.load(Ordering::Relaxed));
            for (outcome, n) in [
                ("matched", k.matched),
                ("sampled_out", k.sampled_out),
                ("over_rate", k.over_rate),
                ("copied", k.copied),
                ("copy_failed", k.failed),
                ("sent", sent),
                ("send_failed", failed),
            ] {
                f.get_or_create(&SessionOutcome {
                    session: id.clone(),
                    outcome,
                })
                .inc_by(n);
            }
        }
        reg.register(
            "mirror_packets",
            "Mirror sessions' packets, by outcome: matched, left out by sampling, over the rate, copied (in the kernel), \
             not copied (a full ring, a tap gone), sent on by the agent, lost at its socket",
            f,
        );
        let lost = Counter::<u64>::default();
        lost.inc_by(src.mirror.lost.load(Ordering::Relaxed));
        reg.register("mirror_ring_lost", "Mirror copies the ring to the agent lost", lost);
    }
    {
        let bytes = src.usage.bytes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if !bytes.is_empty() {
            let f = Family::<SystemWay, Counter>::default();
            for ((system, zone, direction), n) in bytes {
                f.get_or_create(&SystemWay {
                    system,
                    zone,
                    direction,
                })
                .inc_by(n);
            }
            reg.register(
                "system_bytes",
                "Bytes of this host's ports of each information system with each zone (up: to it, down: from it)",
                f,
            );
            let f = Family::<Outcome, Counter>::default();
            for (outcome, n) in [
                ("sent", src.usage.sent.load(Ordering::Relaxed)),
                ("refused", src.usage.refused.load(Ordering::Relaxed)),
                ("dropped", src.usage.dropped.load(Ordering::Relaxed)),
            ] {
                f.get_or_create(&Outcome { outcome }).inc_by(n);
            }
            reg.register("usage_samples", "Usage samples for the controller, by outcome", f);
        }
    }
    if let Some(ev) = &src.syslog {
        let f = Family::<Outcome, Counter>::default();
        for (outcome, n) in [
            ("sent", ev.stats().sent.load(Ordering::Relaxed)),
            ("dropped", ev.stats().dropped.load(Ordering::Relaxed)),
            ("suppressed", ev.suppressed.load(Ordering::Relaxed)),
        ] {
            f.get_or_create(&Outcome { outcome }).inc_by(n);
        }
        reg.register("syslog_events", "Security events sent as syslog, by outcome", f);
    }
    if let Some(fl) = &src.flows {
        let made = Counter::<u64>::default();
        made.inc_by(fl.records.load(Ordering::Relaxed));
        reg.register("flow_records", "Flow records made", made);
        let lost = Family::<Cause, Counter>::default();
        for (cause, n) in [
            ("queue_full", fl.queue_full.load(Ordering::Relaxed)),
            ("denied_rate", fl.denied_suppressed.load(Ordering::Relaxed)),
        ] {
            lost.get_or_create(&Cause { cause }).inc_by(n);
        }
        reg.register("flow_records_lost", "Flow records not sent, by cause", lost);
        let ev = Counter::<u64>::default();
        ev.inc_by(fl.denial_events.load(Ordering::Relaxed));
        reg.register("flow_denial_events", "Denial events read from the dataplane", ev);
        let sent = Family::<CollectorLabel, Counter>::default();
        let dropped = Family::<CollectorLabel, Counter>::default();
        for (c, st) in fl.collectors.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let l = CollectorLabel { collector: c.clone() };
            sent.get_or_create(&l).inc_by(st.records);
            dropped.get_or_create(&l).inc_by(st.dropped);
        }
        reg.register("flow_collector_records", "Flow records sent, per collector", sent);
        reg.register(
            "flow_collector_dropped",
            "Flow records lost to a failed connection, per collector",
            dropped,
        );
    }
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &reg).map_err(|e| e.to_string())?;
    Ok(out)
}

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener, src: Sources) -> std::io::Result<()> {
    use axum::http::StatusCode;
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let src = src.clone();
            async move {
                match tokio::task::spawn_blocking(move || render(&src)).await {
                    Ok(Ok(text)) => (
                        StatusCode::OK,
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        )],
                        text,
                    ),
                    Ok(Err(e)) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("reading the dataplane's counters: {e}\n"),
                    ),
                    Err(e) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(axum::http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                        format!("{e}\n"),
                    ),
                }
            }
        }),
    );
    axum::serve(listener, app).await
}
