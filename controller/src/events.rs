//! The controller's security events as syslog (`--syslog`): every policy
//! change and every refusal the audit log records, as the leader applies
//! them. Each event names the actor (the certificate's identity), the
//! revision, the tenants concerned and what changed or why it was refused.
//!
//! The leader sends; a replica that becomes leader starts from the log's
//! head as it last read it, so around a change of leader a record may be
//! sent by both or by neither (receivers tell repeats apart by
//! `revision`; the audit log keeps every record). At most `per_sec`
//! policy changes go out a second; the rest are counted, and a summary
//! event says how many and from which revision. Refusals are not limited
//! here: the controller groups and budgets them where it notes them.

use std::time::Duration;

use sdn_proto::syslog::{Event, Severity, Syslog, FACILITY_AUDIT, FACILITY_AUTH};

use crate::store::audit::{record_tenants, AuditRecord, INTERNAL_PREFIX};
use crate::store::{PageLimits, Store};

/// Changes listed in one event, at most; the rest are counted.
const CHANGES_LISTED: usize = 20;

/// The event of one audit record, if it is one (the store's own commands
/// are not).
pub fn event_of(r: &AuditRecord) -> Option<Event> {
    if r.actor.starts_with(INTERNAL_PREFIX) && r.refused.is_empty() {
        return None;
    }
    // Records made before the chain started keep no tenants: worked out
    // from their content.
    let tenants = if r.tenants.is_empty() {
        record_tenants(&r.actor, &r.content)
    } else {
        r.tenants.clone()
    };
    let mut fields = vec![
        ("actor", r.actor.clone()),
        ("revision", r.revision.to_string()),
        ("tenants", tenants.join(",")),
    ];
    if !r.refused.is_empty() {
        fields.push(("action", "refused".into()));
        fields.push(("reason", r.refused.clone()));
        return Some(Event {
            facility: FACILITY_AUTH,
            severity: Severity::Warning,
            kind: "auth_refused",
            time_ms: r.time_unix_ms,
            fields,
            text: format!("refused: {}", r.refused),
        });
    }
    let mut listed: Vec<&str> = r.changes.iter().take(CHANGES_LISTED).map(String::as_str).collect();
    let more = r.changes.len().saturating_sub(CHANGES_LISTED);
    let more_text = format!("and {more} more");
    if more > 0 {
        listed.push(&more_text);
    }
    fields.push(("action", "change".into()));
    fields.push(("count", r.changes.len().to_string()));
    fields.push(("changes", listed.join("; ")));
    // A member's health, as its host's agent reported it: an event of its
    // own kind, a warning when the member fails.
    if is_health_actor(&r.actor) {
        let down = r.changes.iter().any(|c| c.contains(" health=down"));
        return Some(Event {
            facility: FACILITY_AUDIT,
            severity: if down { Severity::Warning } else { Severity::Notice },
            kind: "lb_member_health",
            time_ms: r.time_unix_ms,
            fields,
            text: format!(
                "revision {}: {}",
                r.revision,
                r.changes.first().map(String::as_str).unwrap_or("no change")
            ),
        });
    }
    Some(Event {
        facility: FACILITY_AUDIT,
        severity: Severity::Notice,
        kind: "policy_change",
        time_ms: r.time_unix_ms,
        fields,
        text: format!(
            "revision {} by {}: {}{}",
            r.revision,
            r.actor,
            r.changes.first().map(String::as_str).unwrap_or("no change"),
            if r.changes.len() > 1 {
                format!(" (and {} more)", r.changes.len() - 1)
            } else {
                String::new()
            }
        ),
    })
}

/// Whether `actor` is a host's agent reporting health, as the controller
/// names it (what a caller says of itself comes after a certificate's
/// identity or after "unverified", never at the start).
fn is_health_actor(actor: &str) -> bool {
    actor
        .strip_prefix("sdn://agent/")
        .and_then(|a| a.strip_suffix(crate::service::HEALTH_ACTOR_SUFFIX))
        .is_some_and(|host| !host.is_empty() && !host.contains([' ', '(', ')']))
}

/// Sends the audit log's new records as events while this replica leads.
pub fn run(store: Store, syslog: Syslog, per_sec: u32, hostname: String) {
    tokio::spawn(async move {
        let limits = PageLimits {
            records: 1000,
            scanned: 1000,
            bytes: 4 << 20,
        };
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut after: Option<u64> = None;
        loop {
            tick.tick().await;
            let leader = store.is_leader();
            let page = match store.audit(after.unwrap_or(u64::MAX), limits, Some).await {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(error = %format!("{e:#}"), "reading the audit log for syslog; retried");
                    continue;
                }
            };
            let Some(from) = after.filter(|_| leader) else {
                // Not leading, or just started: from the head on.
                after = Some(page.head_revision);
                continue;
            };
            let (mut sent, mut over) = (0u32, 0u64);
            for r in &page.records {
                let Some(e) = event_of(r) else { continue };
                // Refusals are grouped and budgeted where they are noted:
                // none is left out here.
                if e.kind != "auth_refused" && sent >= per_sec {
                    over += 1;
                    continue;
                }
                sent += 1;
                syslog.send(&e);
            }
            if over > 0 {
                syslog.send(&Event {
                    facility: FACILITY_AUDIT,
                    severity: Severity::Notice,
                    kind: "events_suppressed",
                    time_ms: page.records.last().map(|r| r.time_unix_ms).unwrap_or(0),
                    fields: vec![
                        ("host", hostname.clone()),
                        ("count", over.to_string()),
                        ("after", from.to_string()),
                        ("through", page.next_after.to_string()),
                    ],
                    text: format!(
                        "{over} policy change(s) of revisions {}..={} left out (over {per_sec} a second); the audit log has them",
                        from + 1,
                        page.next_after
                    ),
                });
            }
            after = Some(page.next_after.max(from));
        }
    });
}
