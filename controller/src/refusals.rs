//! Refusals into the replicated audit log.
//!
//! Every refusal is a security event in the replica's own log at once
//! ([`crate::auth::refuse`], [`crate::serve`]). It also goes into the audit
//! log, which every replica keeps: the replica that refused hands its
//! refusals to the leader (its own store when it leads, the leader's
//! `Cluster.Refused` otherwise), grouped so that no caller can flood the
//! log and push older records out of it:
//!
//! - a caller with an identity: each second, one record per caller, with
//!   its first refusal's reason, a count, and how many other operations it
//!   was refused; at most [`PER_SECOND`] records, the rest counted;
//! - a connection refused at its handshake (no identity, anyone can make
//!   one): the first of each reason within a second, then one record per
//!   reason per [`HANDSHAKE_WINDOW`], with a count and some of the
//!   addresses;
//! - on the leader, for the whole cluster: at most [`CLUSTER_PER_SECOND`]
//!   records a second (bursts of [`CLUSTER_BURST`]); what is beyond is
//!   counted, and the count is a record of its own.
//!
//! Refusals go to the audit log only once the audit chain has started:
//! until then a member may be of a release that would not read them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sdn_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::store::audit::{Internal, Refusal};
use crate::store::{Store, WriteError};

/// Records of callers with an identity per second, at most.
pub const PER_SECOND: usize = 20;

/// Refusal records the leader writes a second, at most, for the cluster:
/// refusals are rare in a cloud at work, and a flood of them must not push
/// the records of changes out of the log (100,000 records last more than
/// five hours of it).
pub const CLUSTER_PER_SECOND: f64 = 5.0;

/// Refusal records the leader writes at once, at most.
pub const CLUSTER_BURST: f64 = 100.0;

/// Handshake refusals of one reason make one record per window.
pub const HANDSHAKE_WINDOW: Duration = Duration::from_secs(60);

/// Reasons of handshake refusals recorded per window, at most (the rest
/// counted).
const MAX_HANDSHAKE_REASONS: usize = 8;

/// Addresses a handshake record lists, at most.
const SOURCES_LISTED: usize = 8;

/// Refusals waiting, at most; beyond, they are counted.
const QUEUED_MAX: usize = 1024;

static SINK: OnceLock<mpsc::Sender<Noted>> = OnceLock::new();
static OVERFLOW: AtomicU64 = AtomicU64::new(0);

enum Noted {
    Caller(Refusal),
    Handshake {
        from: String,
        reason: String,
        time_unix_ms: u64,
    },
}

fn send(n: Noted) {
    let Some(sink) = SINK.get() else { return };
    if sink.try_send(n).is_err() {
        OVERFLOW.fetch_add(1, Ordering::Relaxed);
    }
}

/// Notes the refusal of a caller with an identity (nothing until [`run`]
/// started).
pub fn note(actor: &str, role: &str, reason: &str, tenant: Option<&str>) {
    send(Noted::Caller(Refusal {
        actor: clip(actor),
        role: role.to_string(),
        reason: clip(reason),
        time_unix_ms: now_ms(),
        tenant: tenant.unwrap_or_default().to_string(),
        count: 1,
    }));
}

/// Notes a connection refused at its handshake, from `from`.
pub fn note_handshake(from: &str, reason: &str) {
    send(Noted::Handshake {
        from: clip(from),
        reason: clip(reason),
        time_unix_ms: now_ms(),
    });
}

/// What a refusal record keeps of a text the caller may have chosen (an id,
/// a header): its first [`TEXT_MAX`] bytes, control characters escaped.
fn clip(s: &str) -> String {
    let mut out = String::with_capacity(s.len().min(TEXT_MAX + 32));
    for c in s.chars() {
        if out.len() >= TEXT_MAX {
            out.push_str(&format!("... ({} bytes)", s.len()));
            break;
        }
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

/// See [`clip`].
const TEXT_MAX: usize = 1024;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Handshake refusals of one reason in the current window.
struct Handshakes {
    /// Not yet in a record.
    count: u64,
    first_time: u64,
    sources: Vec<String>,
    more_sources: bool,
    /// The first of the window went out on its own.
    announced: bool,
}

/// Refusals gathered between two hand-overs.
#[derive(Default)]
struct Gathered {
    /// Callers' refusals of this second, by caller: the first, and the
    /// other reasons it was refused for.
    callers: BTreeMap<String, (Refusal, std::collections::BTreeSet<String>)>,
    /// Handshake refusals of this window, by reason.
    handshakes: BTreeMap<String, Handshakes>,
}

impl Gathered {
    fn add(&mut self, n: Noted) {
        match n {
            Noted::Caller(r) => match self.callers.get_mut(&r.actor) {
                None => {
                    self.callers.insert(r.actor.clone(), (r, Default::default()));
                }
                Some((first, others)) => {
                    first.count += 1;
                    if first.reason != r.reason && others.len() < 1000 {
                        others.insert(r.reason);
                    }
                }
            },
            Noted::Handshake {
                from,
                reason,
                time_unix_ms,
            } => {
                if !self.handshakes.contains_key(&reason) && self.handshakes.len() >= MAX_HANDSHAKE_REASONS {
                    OVERFLOW.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                let g = self.handshakes.entry(reason).or_insert(Handshakes {
                    count: 0,
                    first_time: time_unix_ms,
                    sources: Vec::new(),
                    more_sources: false,
                    announced: false,
                });
                if g.count == 0 {
                    g.first_time = time_unix_ms;
                }
                g.count += 1;
                if !g.sources.contains(&from) {
                    if g.sources.len() < SOURCES_LISTED {
                        g.sources.push(from);
                    } else {
                        g.more_sources = true;
                    }
                }
            }
        }
    }

    /// The records due: every caller's group; the handshake groups not yet
    /// announced, or all of them at the end of a window.
    fn take(&mut self, window_end: bool) -> (Vec<Refusal>, u64) {
        let mut callers: Vec<Refusal> = std::mem::take(&mut self.callers)
            .into_values()
            .map(|(mut r, others)| {
                if !others.is_empty() {
                    let n = others.len();
                    let s = if n == 1 { "" } else { "s" };
                    r.reason.push_str(&format!(" (and {n} other operation{s} refused)"));
                }
                r
            })
            .collect();
        callers.sort_by_key(|r| r.time_unix_ms);
        let mut suppressed = OVERFLOW.swap(0, Ordering::Relaxed);
        if callers.len() > PER_SECOND {
            suppressed += callers.drain(PER_SECOND..).map(|r| r.count).sum::<u64>();
        }
        let mut out = callers;
        for (reason, g) in self.handshakes.iter_mut() {
            if g.count == 0 || (g.announced && !window_end) {
                continue;
            }
            let more = if g.more_sources { " and others" } else { "" };
            out.push(Refusal {
                actor: "unauthenticated".into(),
                role: "none".into(),
                reason: format!("TLS handshake: {reason} (from {}{more})", g.sources.join(", ")),
                time_unix_ms: g.first_time,
                tenant: String::new(),
                count: g.count,
            });
            g.announced = true;
            g.count = 0;
            g.sources.clear();
            g.more_sources = false;
        }
        if window_end {
            self.handshakes.clear();
        }
        (out, suppressed)
    }
}

/// Hands the refusals this replica notes to the audit log, until the
/// process ends.
pub fn run(store: Store) {
    let (tx, mut rx) = mpsc::channel(QUEUED_MAX);
    if SINK.set(tx).is_err() {
        return;
    }
    tokio::spawn(async move {
        let mut gathered = Gathered::default();
        let mut second = tokio::time::interval(Duration::from_secs(1));
        let mut window = tokio::time::interval(HANDSHAKE_WINDOW);
        second.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        window.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        window.tick().await;
        loop {
            let window_end = tokio::select! {
                n = rx.recv() => match n {
                    Some(n) => {
                        gathered.add(n);
                        continue;
                    }
                    None => return,
                },
                _ = second.tick() => false,
                _ = window.tick() => true,
            };
            let (refusals, suppressed) = gathered.take(window_end);
            if !refusals.is_empty() || suppressed > 0 || (owed() > 0 && store.is_leader()) {
                hand_over(&store, refusals, suppressed).await;
            }
        }
    });
}

/// The leader's budget of refusal records, for the whole cluster.
struct Budget {
    tokens: f64,
    at: Option<std::time::Instant>,
    /// Refusals past the budget, not yet in a record.
    owed: u64,
}

static BUDGET: std::sync::Mutex<Budget> = std::sync::Mutex::new(Budget {
    tokens: CLUSTER_BURST,
    at: None,
    owed: 0,
});

/// What of `refusals` the leader records now, and the count of those it
/// does not (with those owed from before) for the last record or one of
/// its own. Nothing when the budget is spent: the count waits.
fn admit(mut refusals: Vec<Refusal>, suppressed: u64) -> Option<(Vec<Refusal>, u64)> {
    let mut b = BUDGET.lock().unwrap_or_else(|p| p.into_inner());
    let now = std::time::Instant::now();
    if let Some(at) = b.at {
        b.tokens = (b.tokens + now.duration_since(at).as_secs_f64() * CLUSTER_PER_SECOND).min(CLUSTER_BURST);
    }
    b.at = Some(now);
    let n = refusals.len().min(b.tokens as usize);
    let dropped: u64 = refusals.drain(n..).map(|r| r.count).sum();
    b.owed += suppressed + dropped;
    if refusals.is_empty() && (b.owed == 0 || b.tokens < 1.0) {
        return None;
    }
    b.tokens -= refusals.len().max(1) as f64;
    let owed = std::mem::take(&mut b.owed);
    if refusals.is_empty() {
        // The count alone, as a record of its own.
        refusals.push(Refusal {
            actor: "controller".into(),
            role: "none".into(),
            reason: "refusals past the audit log's rate limit, not recorded one by one".into(),
            time_unix_ms: now_ms(),
            tenant: String::new(),
            count: owed,
        });
        return Some((refusals, 0));
    }
    Some((refusals, owed))
}

/// Puts refusals back in the budget's count (a write that failed).
fn owe(refusals: &[Refusal], suppressed: u64) {
    let mut b = BUDGET.lock().unwrap_or_else(|p| p.into_inner());
    b.owed += suppressed + refusals.iter().map(|r| r.count).sum::<u64>();
}

/// Writes refusals into the audit log, on the leader, within the budget.
async fn write(store: &Store, refusals: Vec<Refusal>, suppressed: u64) -> Result<(), WriteError> {
    let Some((refusals, suppressed)) = admit(refusals, suppressed) else {
        return Ok(());
    };
    let internal = Internal::Refused { refusals, suppressed };
    let r = store.write_internal(&internal).await;
    if r.is_err() {
        let Internal::Refused { refusals, suppressed } = &internal else {
            unreachable!()
        };
        owe(refusals, *suppressed);
    }
    r.map(|_| ())
}

async fn hand_over(store: &Store, refusals: Vec<Refusal>, suppressed: u64) {
    if store.shared.read().await.chain.is_none() {
        tracing::debug!(
            refusals = refusals.len(),
            "the audit chain has not started: refusals stay in the security log only"
        );
        return;
    }
    let n = refusals.len();
    if store.is_leader() {
        if let Err(e) = write(store, refusals, suppressed).await {
            tracing::warn!(refusals = n, suppressed, "recording refusals in the audit log: {e}");
        }
        return;
    }
    let Some((_, leader)) = store.leader() else {
        tracing::warn!(
            refusals = n,
            suppressed,
            "no leader to record refusals in the audit log"
        );
        return;
    };
    let req = pb::RefusedRequest {
        refusals: refusals
            .into_iter()
            .map(|r| pb::Refusal {
                actor: r.actor,
                role: r.role,
                reason: r.reason,
                time_unix_ms: r.time_unix_ms,
                tenant: r.tenant,
                count: r.count,
            })
            .collect(),
        suppressed,
    };
    let sent = async {
        let ch = sdn_proto::connect(&leader).await.map_err(|e| e.to_string())?;
        pb::cluster_client::ClusterClient::new(ch)
            .refused(req)
            .await
            .map_err(|s| s.message().to_string())
    };
    match tokio::time::timeout(Duration::from_secs(5), sent).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(leader = %leader, refusals = n, "handing refusals to the leader: {e}"),
        Err(_) => tracing::warn!(leader = %leader, refusals = n, "handing refusals to the leader: timed out"),
    }
}

/// The leader's side of `Cluster.Refused`: what a replica sends is held to
/// what the replica itself would send (its texts clipped), and to the
/// leader's budget.
pub async fn record(store: &Store, req: pb::RefusedRequest) -> Result<(), tonic::Status> {
    let most = PER_SECOND + 2 * MAX_HANDSHAKE_REASONS;
    if req.refusals.len() > most {
        return Err(tonic::Status::invalid_argument(format!(
            "refusals: {} in one call; at most {most}",
            req.refusals.len()
        )));
    }
    let refusals = req
        .refusals
        .into_iter()
        .map(|r| Refusal {
            actor: clip(&r.actor),
            role: clip(&r.role),
            reason: clip(&r.reason),
            time_unix_ms: r.time_unix_ms,
            tenant: clip(&r.tenant),
            count: r.count.max(1),
        })
        .collect();
    match write(store, refusals, req.suppressed).await {
        Ok(()) => Ok(()),
        Err(WriteError::NotLeader(_)) => Err(tonic::Status::unavailable("not the leader")),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    }
}

/// Refusals owed a record, for the leader's tick.
fn owed() -> u64 {
    BUDGET.lock().unwrap_or_else(|p| p.into_inner()).owed
}

#[cfg(test)]
mod tests {
    use super::*;

    fn handshake(from: &str, reason: &str) -> Noted {
        Noted::Handshake {
            from: from.into(),
            reason: reason.into(),
            time_unix_ms: 1,
        }
    }

    /// A flood of handshakes makes a record per reason when it starts and
    /// one per window after, whatever its size; callers with an identity
    /// make at most PER_SECOND records a second, the rest counted.
    #[test]
    fn floods_make_few_records() {
        let mut g = Gathered::default();
        for i in 0..10_000 {
            g.add(handshake(
                &format!("tcp 192.0.2.{}", i % 200),
                "the client sent no certificate",
            ));
        }
        let (first, suppressed) = g.take(false);
        assert_eq!((first.len(), suppressed), (1, 0));
        assert_eq!(first[0].count, 10_000);
        assert!(
            first[0].reason.contains("192.0.2.0") && first[0].reason.ends_with("and others)"),
            "{}",
            first[0].reason
        );
        for _ in 0..5_000 {
            g.add(handshake("tcp 198.51.100.1", "the client sent no certificate"));
        }
        assert!(g.take(false).0.is_empty(), "announced already: wait for the window");
        let (end, _) = g.take(true);
        assert_eq!((end.len(), end[0].count), (1, 5_000));
        assert!(g.take(true).0.is_empty());

        for i in 0..100 {
            g.add(Noted::Caller(Refusal {
                actor: format!("sdn://tenant/t/u{i}"),
                role: "tenant".into(),
                reason: "Apply: no".into(),
                time_unix_ms: i,
                tenant: "t".into(),
                count: 1,
            }));
        }
        g.add(Noted::Caller(Refusal {
            actor: "sdn://tenant/t/u0".into(),
            role: "tenant".into(),
            reason: "Apply: no".into(),
            time_unix_ms: 500,
            tenant: "t".into(),
            count: 1,
        }));
        let (records, suppressed) = g.take(false);
        assert_eq!((records.len(), suppressed), (PER_SECOND, 80));
        assert_eq!(records[0].count, 2, "the same caller and reason: one record");

        // One caller refused many operations: one record.
        for i in 0..50 {
            g.add(Noted::Caller(Refusal {
                actor: "sdn://tenant/t/eve".into(),
                role: "tenant".into(),
                reason: format!("Apply: operations[0] group g{i}\nrev 1 by sdn://admin/x"),
                time_unix_ms: i,
                tenant: "t".into(),
                count: 1,
            }));
        }
        let (records, _) = g.take(false);
        assert_eq!(records.len(), 1);
        assert_eq!(records[0].count, 50);
        assert!(
            records[0].reason.ends_with("(and 49 other operations refused)"),
            "{}",
            records[0].reason
        );
        assert_eq!(clip("a\nb\u{1b}[2J"), "a\\nb\\u{1b}[2J", "control characters escaped");
        assert!(clip(&"x".repeat(5000)).ends_with("... (5000 bytes)"));
    }

    /// The leader records a burst, then what the rate allows; what is past
    /// it is counted, and the count becomes a record of its own.
    #[test]
    fn the_leader_holds_the_cluster_to_a_budget() {
        let refusal = |i: u64| Refusal {
            actor: format!("sdn://tenant/t/u{i}"),
            role: "tenant".into(),
            reason: "no".into(),
            time_unix_ms: i,
            tenant: "t".into(),
            count: 1,
        };
        let (first, owed) = admit((0..150).map(refusal).collect(), 7).unwrap();
        assert_eq!((first.len(), owed), (CLUSTER_BURST as usize, 57));
        assert!(admit(vec![refusal(1)], 0).is_none(), "the burst is spent");
        std::thread::sleep(Duration::from_millis(300));
        let (next, _) = admit(vec![], 0).expect("the count, once the budget allows");
        assert_eq!(next.len(), 1);
        assert_eq!(next[0].actor, "controller");
        assert_eq!(next[0].count, 1, "the refusal past the budget");
    }
}
