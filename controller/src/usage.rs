//! Bandwidth peaks per information system (the supervisors' table of each
//! system's bandwidth towards each zone).
//!
//! Every agent counts, second by second, the bytes its ports of each
//! system exchange with each zone, and reports them ([`Usage::report`]).
//! The leader adds up every host's report of a second once the second is
//! [`GRACE_SECS`] old, so late reports of busy hosts still count, and
//! turns it into a rate. Per system, zone and direction it keeps:
//! - the rate of the last second closed;
//! - the peak of the interval in progress, and of the last one complete
//!   (intervals start at multiples of the system's interval in Unix
//!   time, so every replica and every report agrees on them);
//! - whether the rate is over the system's alert share.
//!
//! Events (syslog, `--syslog`): `bandwidth_alert` when a second's rate
//! reaches the share, `bandwidth_normal` when it is back under the share
//! less [`HYSTERESIS_PERCENT`] (a rate that hovers at the share sends no
//! storm), and `bandwidth_peak` at the end of each interval that had
//! traffic, with both directions' peaks.
//!
//! A report repeated (an agent that did not hear the answer) replaces the
//! host's earlier figures for the same second instead of adding to them.
//! What a new leader measures starts at its election: the interval in
//! progress then has a partial peak.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use sdn_policies::InformationSystem;
use sdn_proto::syslog::{Event, Severity, Syslog, FACILITY_DAEMON};
use sdn_proto::v1 as pb;

use crate::store::Store;

/// A second is added up once it is this old (a host reads its counts
/// just after the second and sends at once; a report through a replica
/// that does not lead takes one more hop).
pub const GRACE_SECS: u64 = 5;
/// Reports of seconds older than this, or this far in the future, are
/// refused (a host whose clock is that far off measures nothing).
pub const WINDOW_SECS: u64 = 30;
/// Samples in one report, at most.
pub const SAMPLES_MAX: usize = 4096;
/// How far under the alert share a rate must fall to end an alert, in
/// percentage points (at most half the share).
pub const HYSTERESIS_PERCENT: u64 = 5;
/// Bytes one host reports for one second of one system and zone, at most
/// each way (400 Gbit/s): a figure beyond is no host's, and is refused.
pub const BYTES_PER_SEC_MAX: u64 = 50_000_000_000;
/// Seconds closed one by one at most after the clock jumped ahead; beyond,
/// the interval in progress ends and closing starts again from now.
pub const CATCH_UP_MAX: u64 = 3600;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Labels {
    system: String,
    zone: String,
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

/// One direction of one system's traffic with one zone.
#[derive(Clone, Debug, Default)]
struct Way {
    /// Bits a second in the last second closed.
    last_bps: u64,
    /// The interval in progress: its peak and the second it was reached.
    peak_bps: u64,
    peak_at: u64,
    /// The last interval complete, and its peak.
    done_bps: Option<u64>,
    over: bool,
    alerts: u64,
}

/// One system's traffic with one zone.
#[derive(Debug, Default)]
struct Series {
    /// Seconds not yet closed: each host's bytes (up, down).
    open: BTreeMap<u64, BTreeMap<String, (u64, u64)>>,
    /// The last second closed (0: none yet).
    closed: u64,
    /// The interval in progress (its start, Unix seconds, and length, as
    /// the system said when it started) and whether any traffic came in it.
    interval: u64,
    len: u64,
    busy: bool,
    up: Way,
    down: Way,
}

#[derive(Default)]
struct Inner {
    series: BTreeMap<(String, String), Series>,
}

/// The leader's measure of every information system's bandwidth.
#[derive(Default)]
pub struct Usage {
    inner: Mutex<Inner>,
    samples: Family<Outcome, Counter>,
}

/// An event's text for a rate.
fn mbps(bps: u64) -> String {
    format!("{:.1} Mbit/s", bps as f64 / 1e6)
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Usage {
    /// Takes one host's report (on the leader). Samples of unknown systems
    /// or zones, or of seconds outside the window or already closed, are
    /// left out and counted.
    pub fn report(&self, state: &sdn_policies::State, host: &str, samples: &[pb::UsageSample]) -> pb::UsageResponse {
        self.report_at(state, host, samples, now_secs())
    }

    fn report_at(
        &self,
        state: &sdn_policies::State,
        host: &str,
        samples: &[pb::UsageSample],
        now: u64,
    ) -> pb::UsageResponse {
        let mut out = pb::UsageResponse::default();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let refuse = |out: &mut pb::UsageResponse, outcome: &'static str, why: String| {
            self.samples.get_or_create(&Outcome { outcome }).inc();
            out.refused += 1;
            if out.reason.is_empty() {
                out.reason = why;
            }
        };
        let mut on_host: BTreeMap<&str, bool> = BTreeMap::new();
        for (i, s) in samples.iter().enumerate() {
            let Some(sys) = state.information_systems.get(&s.system_id) else {
                refuse(
                    &mut out,
                    "unknown",
                    format!("samples[{i}].system_id: unknown information system {:?}", s.system_id),
                );
                continue;
            };
            // A host speaks only for systems with ports on it: a host
            // taken over cannot raise another system's alerts.
            let here = *on_host.entry(sys.id.as_str()).or_insert_with(|| {
                let ix = state.index();
                sys.vpc_ids.iter().any(|v| ix.hosts_in(v).any(|h| h == host))
                    || sys
                        .port_ids
                        .iter()
                        .any(|p| state.ports.get(p).is_some_and(|p| p.host_id == host))
            });
            if !here {
                refuse(
                    &mut out,
                    "not_on_host",
                    format!(
                        "samples[{i}].system_id: information system {} has no port on host {host}",
                        sys.id
                    ),
                );
                continue;
            }
            if !sys.bandwidth.iter().any(|b| b.zone_id == s.zone_id) {
                refuse(
                    &mut out,
                    "unknown",
                    format!(
                        "samples[{i}].zone_id: information system {} measures no zone {:?}",
                        sys.id, s.zone_id
                    ),
                );
                continue;
            }
            if s.unix_second.saturating_add(WINDOW_SECS) < now || s.unix_second > now.saturating_add(WINDOW_SECS) {
                refuse(
                    &mut out,
                    "out_of_window",
                    format!(
                        "samples[{i}].unix_second: {} is more than {WINDOW_SECS} s from this replica's clock ({now})",
                        s.unix_second
                    ),
                );
                continue;
            }
            if s.up_bytes > BYTES_PER_SEC_MAX || s.down_bytes > BYTES_PER_SEC_MAX {
                refuse(
                    &mut out,
                    "implausible",
                    format!(
                        "samples[{i}]: {} bytes up and {} down in one second is more than a host carries ({BYTES_PER_SEC_MAX} each way)",
                        s.up_bytes, s.down_bytes
                    ),
                );
                continue;
            }
            let series = inner
                .series
                .entry((s.system_id.clone(), s.zone_id.clone()))
                .or_default();
            if s.unix_second <= series.closed {
                refuse(
                    &mut out,
                    "late",
                    format!("samples[{i}].unix_second: second {} is already added up", s.unix_second),
                );
                continue;
            }
            series
                .open
                .entry(s.unix_second)
                .or_default()
                .insert(host.to_string(), (s.up_bytes, s.down_bytes));
            self.samples.get_or_create(&Outcome { outcome: "accepted" }).inc();
            out.accepted += 1;
        }
        out
    }

    /// Closes every second at least [`GRACE_SECS`] old; returns the events.
    fn close(&self, state: &sdn_policies::State, now: u64) -> Vec<Event> {
        let mut events = Vec::new();
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        // A system or a zone of it gone: its measure goes too.
        inner.series.retain(|(sys, zone), _| {
            state
                .information_systems
                .get(sys)
                .is_some_and(|s| s.bandwidth.iter().any(|b| &b.zone_id == zone))
        });
        let through = now.saturating_sub(GRACE_SECS);
        for ((sys_id, zone), series) in inner.series.iter_mut() {
            let Some(sys) = state.information_systems.get(sys_id) else {
                continue;
            };
            let Some(bw) = sys.bandwidth.iter().find(|b| &b.zone_id == zone) else {
                continue;
            };
            let interval = sys.interval() as u64;
            // The first second to close: the next one; for a new series,
            // the first reported. (Idle seconds close as seconds of no
            // traffic: an alert ends and an interval ends on time.)
            let from = if series.closed == 0 {
                match series.open.keys().next() {
                    Some(f) => *f,
                    None => continue,
                }
            } else {
                series.closed + 1
            };
            let mut s = from;
            if through > from.saturating_add(CATCH_UP_MAX) {
                // The clock jumped ahead: what was in progress ends, and
                // the seconds between carried nothing anyone can tell.
                tracing::warn!(system = %sys.id, zone = %zone, from, through, "the clock jumped ahead; bandwidth measured from now");
                if series.interval != 0 {
                    events.extend(end_interval(sys, zone, series));
                }
                series.interval = 0;
                s = through;
                series.open.retain(|k, _| *k >= through);
            }
            while s <= through {
                let hosts = series.open.remove(&s).unwrap_or_default();
                let (up, down) = hosts
                    .values()
                    .fold((0u64, 0u64), |a, b| (a.0.saturating_add(b.0), a.1.saturating_add(b.1)));
                let start = s - s % interval;
                if series.interval != start {
                    if series.interval != 0 {
                        events.extend(end_interval(sys, zone, series));
                    }
                    series.interval = start;
                    series.len = interval;
                    series.busy = false;
                }
                series.busy |= up > 0 || down > 0;
                for (way, bytes, of, direction) in [
                    (&mut series.up, up, bw.up_bps, "up"),
                    (&mut series.down, down, bw.down_bps, "down"),
                ] {
                    let bps = bytes.saturating_mul(8);
                    way.last_bps = bps;
                    if bps > way.peak_bps {
                        way.peak_bps = bps;
                        way.peak_at = s;
                    }
                    let share = sys.alert() as u64;
                    let pct = u64::try_from(bps as u128 * 100 / of.max(1) as u128).unwrap_or(u64::MAX);
                    if !way.over && pct >= share {
                        way.over = true;
                        way.alerts += 1;
                        events.push(alert(sys, zone, direction, s, bps, of, true));
                    } else if way.over && pct.saturating_add(HYSTERESIS_PERCENT.min(share / 2)) < share {
                        way.over = false;
                        events.push(alert(sys, zone, direction, s, bps, of, false));
                    }
                }
                series.closed = s;
                s += 1;
            }
        }
        events
    }

    /// Adds the gauges to a scrape.
    pub fn register(&self, reg: &mut Registry) {
        let last = Family::<Labels, Gauge>::default();
        let peak = Family::<Labels, Gauge>::default();
        let done = Family::<Labels, Gauge>::default();
        let over = Family::<Labels, Gauge>::default();
        let alerts = Family::<Labels, Counter>::default();
        {
            let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            for ((sys, zone), series) in &inner.series {
                for (way, direction) in [(&series.up, "up"), (&series.down, "down")] {
                    let l = Labels {
                        system: sys.clone(),
                        zone: zone.clone(),
                        direction,
                    };
                    last.get_or_create(&l).set(way.last_bps.min(i64::MAX as u64) as i64);
                    peak.get_or_create(&l).set(way.peak_bps.min(i64::MAX as u64) as i64);
                    if let Some(d) = way.done_bps {
                        done.get_or_create(&l).set(d.min(i64::MAX as u64) as i64);
                    }
                    over.get_or_create(&l).set(i64::from(way.over));
                    alerts.get_or_create(&l).inc_by(way.alerts);
                }
            }
        }
        reg.register(
            "system_bandwidth_bps",
            "An information system's rate towards (up) or from (down) a zone in the last second added up, all hosts (on the leader)",
            last,
        );
        reg.register(
            "system_bandwidth_peak_bps",
            "The highest second's rate of the interval in progress (on the leader)",
            peak,
        );
        reg.register(
            "system_bandwidth_interval_peak_bps",
            "The highest second's rate of the last complete interval (on the leader)",
            done,
        );
        reg.register(
            "system_bandwidth_over_alert",
            "1 while the rate is over the system's alert share (on the leader)",
            over,
        );
        reg.register(
            "system_bandwidth_alerts",
            "Times the rate reached the alert share (on the leader)",
            alerts,
        );
        reg.register("usage_samples", "Hosts' usage samples by outcome", self.samples.clone());
    }

    /// Closes seconds once a second while this replica leads, and sends
    /// the events. A replica that does not lead keeps nothing.
    pub fn run(self: Arc<Self>, store: Store, syslog: Option<Syslog>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !store.is_leader() {
                    self.inner.lock().unwrap_or_else(|p| p.into_inner()).series.clear();
                    continue;
                }
                let events = {
                    let shared = store.shared.read().await;
                    self.close(&shared.state, now_secs())
                };
                for e in &events {
                    tracing::info!(kind = e.kind, "{}", e.text);
                    if let Some(s) = &syslog {
                        s.send(e);
                    }
                }
            }
        });
    }
}

/// Ends a series' interval: its peaks become the last complete ones; an
/// event if it had traffic.
fn end_interval(sys: &InformationSystem, zone: &str, series: &mut Series) -> Option<Event> {
    let (up, down) = (series.up.peak_bps, series.down.peak_bps);
    let (up_at, down_at) = (series.up.peak_at, series.down.peak_at);
    for w in [&mut series.up, &mut series.down] {
        w.done_bps = Some(w.peak_bps);
        w.peak_bps = 0;
        w.peak_at = 0;
    }
    if !series.busy {
        return None;
    }
    let interval = series.len;
    Some(Event {
        facility: FACILITY_DAEMON,
        severity: Severity::Informational,
        kind: "bandwidth_peak",
        time_ms: (series.interval + interval) * 1000,
        fields: vec![
            ("system", sys.id.clone()),
            ("zone", zone.to_string()),
            ("interval_start", series.interval.to_string()),
            ("interval_secs", interval.to_string()),
            ("up_peak_bps", up.to_string()),
            ("up_peak_at", up_at.to_string()),
            ("down_peak_bps", down.to_string()),
            ("down_peak_at", down_at.to_string()),
        ],
        text: format!(
            "information system {} with zone {zone}: peaks up {} down {} in the {interval} s from {}",
            sys.id,
            mbps(up),
            mbps(down),
            series.interval
        ),
    })
}

/// The event of a rate reaching the share (`over`), or back under it.
fn alert(
    sys: &InformationSystem,
    zone: &str,
    direction: &'static str,
    at: u64,
    bps: u64,
    of: u64,
    over: bool,
) -> Event {
    let pct = bps as f64 * 100.0 / of.max(1) as f64;
    Event {
        facility: FACILITY_DAEMON,
        severity: if over { Severity::Warning } else { Severity::Notice },
        kind: if over { "bandwidth_alert" } else { "bandwidth_normal" },
        time_ms: at * 1000,
        fields: vec![
            ("system", sys.id.clone()),
            ("zone", zone.to_string()),
            ("direction", direction.to_string()),
            ("rate_bps", bps.to_string()),
            ("bandwidth_bps", of.to_string()),
            ("percent", format!("{pct:.1}")),
            ("alert_percent", sys.alert().to_string()),
            ("second", at.to_string()),
        ],
        text: format!(
            "information system {} {direction} with zone {zone}: {} is {pct:.0}% of its {} ({} the alert share {}%)",
            sys.id,
            mbps(bps),
            mbps(of),
            if over { "at or over" } else { "back under" },
            sys.alert()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_policies::{State, SystemBandwidth};

    fn state() -> State {
        let mut st = State::default();
        let sys = InformationSystem {
            id: "tax".into(),
            name: "tax".into(),
            vpc_ids: vec![],
            port_ids: vec!["p1".into(), "p2".into()],
            bandwidth: vec![SystemBandwidth {
                zone_id: "net".into(),
                up_bps: 100_000_000,
                down_bps: 1_000_000_000,
            }],
            alert_percent: 80,
            interval_secs: 10,
        };
        for (p, h) in [("p1", "h1"), ("p2", "h2")] {
            let port = sdn_policies::Port {
                id: p.into(),
                tenant_id: "t".into(),
                subnet_id: "s".into(),
                host_id: h.into(),
                device: p.into(),
                mac: "02:00:00:00:00:01".parse().unwrap(),
                ipv4: None,
                ipv6: None,
                security_group_ids: vec![],
                vm_id: String::new(),
            };
            st.replace(sdn_policies::Kind::Port, p, Some(sdn_policies::Object::Port(port)));
        }
        st.replace(
            sdn_policies::Kind::InformationSystem,
            "tax",
            Some(sdn_policies::Object::InformationSystem(sys)),
        );
        st
    }

    fn sample(second: u64, up_mbit: u64) -> pb::UsageSample {
        pb::UsageSample {
            system_id: "tax".into(),
            zone_id: "net".into(),
            unix_second: second,
            up_bytes: up_mbit * 1_000_000 / 8,
            down_bytes: 1000,
        }
    }

    /// Hosts add up; a repeat replaces; the share and its hysteresis make
    /// one alert and one return; the interval's end gives its peak.
    #[test]
    fn hosts_add_up_into_peaks_and_alerts() {
        let st = state();
        let u = Usage::default();
        // A multiple of 10: an interval starts.
        let t0 = 1_000_000_000;
        // 50 + 35 = 85 Mbit/s in second t0: 85% of 100, over 80%.
        assert_eq!(u.report_at(&st, "h1", &[sample(t0, 50)], t0).accepted, 1);
        assert_eq!(u.report_at(&st, "h2", &[sample(t0, 30)], t0).accepted, 1);
        assert_eq!(u.report_at(&st, "h2", &[sample(t0, 35)], t0).accepted, 1, "a repeat");
        // 78%: under the share but within the hysteresis: still over.
        u.report_at(&st, "h1", &[sample(t0 + 1, 78)], t0 + 1);
        // 70%: back under.
        u.report_at(&st, "h1", &[sample(t0 + 2, 70)], t0 + 2);
        let e = u.close(&st, t0 + 2 + GRACE_SECS);
        let kinds: Vec<_> = e.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, ["bandwidth_alert", "bandwidth_normal"], "{e:?}");
        assert!(e[0].fields.contains(&("rate_bps", "85000000".into())), "{:?}", e[0]);
        // A report of a closed second is refused, named.
        let r = u.report_at(&st, "h1", &[sample(t0 + 1, 1)], t0 + 5);
        assert_eq!((r.accepted, r.refused), (0, 1));
        assert!(r.reason.starts_with("samples[0].unix_second"), "{}", r.reason);
        // A host without the system's ports speaks not for it.
        let r = u.report_at(&st, "h3", &[sample(t0 + 6, 99)], t0 + 6);
        assert_eq!((r.accepted, r.refused), (0, 1));
        assert!(r.reason.contains("has no port on host h3"), "{}", r.reason);
        // Unknown systems and seconds out of the window too.
        let mut bad = sample(t0 + 6, 1);
        bad.system_id = "other".into();
        let mut huge = sample(t0 + 6, 1);
        huge.up_bytes = u64::MAX;
        let mut forever = sample(u64::MAX, 1);
        forever.unix_second = u64::MAX;
        let r = u.report_at(&st, "h1", &[bad, sample(t0 - 100, 1), huge, forever], t0 + 5);
        assert_eq!(r.refused, 4);
        // The interval ends at t0 + 10: its peak is 85 Mbit/s up.
        let e = u.close(&st, t0 + 10 + GRACE_SECS);
        let peak = e.iter().find(|e| e.kind == "bandwidth_peak").expect("a peak event");
        assert!(peak.fields.contains(&("up_peak_bps", "85000000".into())), "{peak:?}");
        assert!(peak.fields.contains(&("up_peak_at", t0.to_string())), "{peak:?}");
        let mut reg = Registry::default();
        u.register(&mut reg);
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).unwrap();
        assert!(
            text.contains(r#"system_bandwidth_interval_peak_bps{system="tax",zone="net",direction="up"} 85000000"#),
            "{text}"
        );
        // A system gone: its measure goes too.
        u.close(&State::default(), t0 + 20);
        assert!(u.inner.lock().unwrap().series.is_empty());
    }
}
