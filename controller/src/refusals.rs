//! Refusals into the replicated audit log.
//!
//! Every refusal is a security event in the replica's own log at once
//! ([`crate::auth::refuse`], [`crate::serve`]). It also goes into the audit
//! log, which every replica keeps: the replica that refused gathers its
//! refusals for a moment and hands them to the leader (its own store when it
//! leads, the leader's `Cluster.Refused` otherwise), at most
//! [`PER_SECOND`] a second, the rest counted in the last record. Refusals go
//! to the audit log only once the audit chain has started: until then a
//! member may be of a release that would not read them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use sdn_proto::v1 as pb;
use tokio::sync::mpsc;

use crate::store::audit::{Internal, Refusal};
use crate::store::{Store, WriteError};

/// Refusals recorded one by one per second, at most.
pub const PER_SECOND: usize = 20;

/// Refusals waiting, at most; beyond, they are counted.
const QUEUED_MAX: usize = 1024;

static SINK: OnceLock<mpsc::Sender<Refusal>> = OnceLock::new();
static OVERFLOW: AtomicU64 = AtomicU64::new(0);

/// Notes a refusal for the audit log (nothing until [`run`] started).
pub fn note(actor: &str, role: &str, reason: &str, tenant: Option<&str>) {
    let Some(sink) = SINK.get() else { return };
    let r = Refusal {
        actor: clip(actor),
        role: role.to_string(),
        reason: clip(reason),
        time_unix_ms: now_ms(),
        tenant: tenant.unwrap_or_default().to_string(),
    };
    if sink.try_send(r).is_err() {
        OVERFLOW.fetch_add(1, Ordering::Relaxed);
    }
}

/// What a refusal record keeps of a text the caller may have chosen (an id,
/// a header): its first [`TEXT_MAX`] bytes.
fn clip(s: &str) -> String {
    if s.len() <= TEXT_MAX {
        return s.to_string();
    }
    let mut end = TEXT_MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &s[..end], s.len())
}

/// See [`clip`].
const TEXT_MAX: usize = 1024;

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Hands the refusals this replica notes to the audit log, until the
/// process ends.
pub fn run(store: Store) {
    let (tx, mut rx) = mpsc::channel(QUEUED_MAX);
    if SINK.set(tx).is_err() {
        return;
    }
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            // Gather what else comes within the second.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mut refusals = vec![first];
            let mut suppressed = OVERFLOW.swap(0, Ordering::Relaxed);
            while let Ok(r) = rx.try_recv() {
                if refusals.len() < PER_SECOND {
                    refusals.push(r);
                } else {
                    suppressed += 1;
                }
            }
            hand_over(&store, refusals, suppressed).await;
        }
    });
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
    let internal = Internal::Refused { refusals, suppressed };
    let leader = match store.write_internal(&internal).await {
        Ok(_) => return,
        Err(WriteError::NotLeader(Some(addr))) => addr,
        Err(e) => {
            tracing::warn!(refusals = n, suppressed, "recording refusals in the audit log: {e}");
            return;
        }
    };
    let Internal::Refused { refusals, suppressed } = internal else { unreachable!() };
    let req = pb::RefusedRequest {
        refusals: refusals
            .into_iter()
            .map(|r| pb::Refusal {
                actor: r.actor,
                role: r.role,
                reason: r.reason,
                time_unix_ms: r.time_unix_ms,
                tenant: r.tenant,
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

/// The leader's side of `Cluster.Refused`.
pub async fn record(store: &Store, req: pb::RefusedRequest) -> Result<(), tonic::Status> {
    if req.refusals.len() > PER_SECOND * 2 {
        return Err(tonic::Status::invalid_argument(format!(
            "refusals: {} in one call; at most {}",
            req.refusals.len(),
            PER_SECOND * 2
        )));
    }
    if req.refusals.is_empty() {
        return Ok(());
    }
    let internal = Internal::Refused {
        refusals: req
            .refusals
            .into_iter()
            .map(|r| Refusal {
                actor: r.actor,
                role: r.role,
                reason: r.reason,
                time_unix_ms: r.time_unix_ms,
                tenant: r.tenant,
            })
            .collect(),
        suppressed: req.suppressed,
    };
    match store.write_internal(&internal).await {
        Ok(_) => Ok(()),
        Err(WriteError::NotLeader(_)) => Err(tonic::Status::unavailable("not the leader")),
        Err(e) => Err(tonic::Status::unavailable(e.to_string())),
    }
}
