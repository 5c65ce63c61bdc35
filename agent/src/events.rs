//! The agent's security events as syslog (`run --syslog`): quarantines
//! applied and lifted, and the dataplane's refusals that matter to a
//! supervisor: anti-spoofing drops, zone-isolation drops, flow-budget
//! refusals and firewall denials. Each event names the host, the port and
//! its tenant, the packet's addresses and ports, what refused it and how
//! many packets it refused in the second.
//!
//! At most `per_sec` denial events go out a second; the rest are counted,
//! and a summary event says how many were left out.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dataplane_common::DropReason;
use sdn_proto::syslog::{Event, Severity, Syslog, FACILITY_AUDIT};

use crate::flows::Denied;

/// Sends the agent's events.
#[derive(Clone)]
pub struct Events {
    syslog: Syslog,
    host: String,
    per_sec: u32,
    /// Denial events left out over the rate.
    pub suppressed: Arc<AtomicU64>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The event kind (MSGID) and severity of a denial, if it is one a
/// supervisor is told of.
pub fn denial_kind(r: DropReason) -> Option<(&'static str, Severity)> {
    use DropReason as R;
    Some(match r {
        R::SpoofMac
        | R::SpoofIp
        | R::SpoofArp
        | R::SpoofNd
        | R::RaGuard
        | R::DhcpServer
        | R::OverlaySpoof
        | R::SpoofUplink
        | R::CtBadAck => ("spoof", Severity::Warning),
        R::ZoneIsolation => ("zone_isolation", Severity::Warning),
        R::CtBudget => ("flow_budget", Severity::Notice),
        R::BorderFirewall | R::VpcFirewall => ("firewall_denied", Severity::Notice),
        R::Quarantined => ("quarantine_drop", Severity::Notice),
        _ => return None,
    })
}

impl Events {
    pub fn new(syslog: Syslog, host: &str, per_sec: u32) -> Events {
        Events {
            syslog,
            host: host.to_string(),
            per_sec,
            suppressed: Arc::default(),
        }
    }

    pub fn stats(&self) -> &sdn_proto::syslog::Stats {
        &self.syslog.stats
    }

    /// A port quarantined (`applied`) or released.
    pub fn quarantine(&self, applied: bool, port: &str, quarantine: &str, reason: &str) {
        let (kind, text) = if applied {
            (
                "quarantine_applied",
                format!("port {port} quarantined: all its traffic is dropped"),
            )
        } else {
            (
                "quarantine_lifted",
                format!("port {port} released from quarantine {quarantine}"),
            )
        };
        self.syslog.send(&Event {
            facility: FACILITY_AUDIT,
            severity: if applied { Severity::Warning } else { Severity::Notice },
            kind,
            time_ms: now_ms(),
            fields: vec![
                ("host", self.host.clone()),
                ("port", port.to_string()),
                ("quarantine", quarantine.to_string()),
                ("reason", reason.to_string()),
                ("action", if applied { "drop" } else { "allow" }.into()),
            ],
            text,
        });
    }

    /// The denied flows of a second that a supervisor is told of, at most
    /// the rate of them.
    pub fn denials(&self, denied: &[Denied]) {
        let mut sent = 0u32;
        let mut over = 0u64;
        let mut over_ports: std::collections::BTreeMap<&str, u64> = Default::default();
        for d in denied {
            let Some((kind, severity)) = d.reason.and_then(denial_kind) else {
                continue;
            };
            if sent >= self.per_sec {
                over += 1;
                let port = if d.record.port.is_empty() {
                    "-"
                } else {
                    d.record.port.as_str()
                };
                *over_ports.entry(port).or_default() += 1;
                continue;
            }
            sent += 1;
            let r = &d.record;
            let reason = d.reason.map(|r| r.name()).unwrap_or("unknown");
            let mut fields = vec![
                ("host", self.host.clone()),
                ("event", reason.to_string()),
                ("tenant", r.tenant.clone()),
                ("vpc", r.vpc.clone()),
                ("port", r.port.clone()),
                ("zone", r.zone.clone()),
                ("action", "drop".into()),
                ("rule", r.rule.clone()),
                ("count", r.packets.to_string()),
                ("bytes", r.octets.to_string()),
                ("first", sdn_proto::audit::rfc3339(r.start_ms)),
                ("last", sdn_proto::audit::rfc3339(r.end_ms)),
            ];
            if d.ip {
                fields.extend([
                    ("proto", r.protocol.to_string()),
                    ("src", r.src.to_string()),
                    ("sport", r.src_port.to_string()),
                    ("dst", r.dst.to_string()),
                    ("dport", r.dst_port.to_string()),
                ]);
            }
            let from = if d.ip {
                format!(" from {}:{} to {}:{}", r.src, r.src_port, r.dst, r.dst_port)
            } else {
                String::new()
            };
            let port = if r.port.is_empty() {
                "an uplink"
            } else {
                r.port.as_str()
            };
            self.syslog.send(&Event {
                facility: FACILITY_AUDIT,
                severity,
                kind,
                time_ms: r.end_ms,
                fields,
                text: format!("{} packet(s) dropped at {port} ({reason}){from}", r.packets),
            });
        }
        if over > 0 {
            self.suppressed.fetch_add(over, Ordering::Relaxed);
            let mut ports: Vec<(&str, u64)> = over_ports.into_iter().collect();
            ports.sort_by(|a, b| b.1.cmp(&a.1));
            let listed: Vec<String> = ports.iter().take(8).map(|(p, n)| format!("{p}:{n}")).collect();
            self.syslog.send(&Event {
                facility: FACILITY_AUDIT,
                severity: Severity::Notice,
                kind: "events_suppressed",
                time_ms: now_ms(),
                fields: vec![
                    ("host", self.host.clone()),
                    ("count", over.to_string()),
                    ("ports", listed.join(",")),
                ],
                text: format!(
                    "{over} denial event(s) of the last second left out (over {} a second)",
                    self.per_sec
                ),
            });
        }
    }
}
