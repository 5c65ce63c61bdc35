//! Who is authoritative for each virtual IP. VRRP among the holders
//! decides fast; the leader decides who may act on it:
//!
//! - A holder that wins VRRP claims the virtual IP. The first grant to a
//!   new owner commits the next epoch in the log (the audit records it);
//!   agents act only for the highest epoch they have seen.
//! - The owner renews its claim every advertisement interval. The lease
//!   (three intervals) lives in the leader's memory alone: renewals write
//!   nothing.
//! - Another holder's claim is refused while the owner's lease runs. So a
//!   partition between the holders (each wins VRRP on its side) leaves
//!   one of them authoritative; and an owner cut from the controller stops
//!   answering when its lease ends, before any other is granted.
//! - A new leader knows no lease: it first applies the log it leads
//!   (so it knows the last grant), then for the longest lease granted in
//!   that epoch grants nothing but to the owner already recorded.
//! - A leader grants and renews only while a quorum acknowledged it
//!   within [`QUORUM_FRESH`], under the followers' own election timeout:
//!   one cut off from the others stops renewing before they can elect
//!   another, so its last leases end before the new leader's wait does.
//!
//! Grants are handled one batch at a time, so two claimants never both
//! pass the lease check before either is written.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sdn_policies::{Op, VipHolderTarget, VirtualIp};
use sdn_proto::v1 as pb;
use tonic::Status;

use crate::store::{Store, WriteError};

/// Claims in one request, at most.
pub const CLAIMS_MAX: usize = 1024;
/// The shortest lease, whatever the interval.
const LEASE_MIN: Duration = Duration::from_millis(150);
/// How lately a quorum must have acknowledged the leader for it to grant:
/// below the followers' election timeout (300 ms), with room for drift.
pub const QUORUM_FRESH: Duration = Duration::from_millis(250);

/// The lease of a virtual IP: three of its advertisement intervals.
pub fn lease(v: &VirtualIp) -> Duration {
    (Duration::from_millis(10 * u64::from(v.advert_interval_cs)) * 3).max(LEASE_MIN)
}

/// The leader's leases.
#[derive(Debug, Default)]
pub struct Leases {
    /// The Raft term the leases were granted in: a new term starts empty.
    term: u64,
    /// When this replica began granting in `term`.
    since: Option<Instant>,
    held: HashMap<String, (VipHolderTarget, Instant)>,
    /// When each virtual IP last changed owner on this replica (the
    /// damping's clock: a monotonic one, never another replica's).
    changed: HashMap<String, Instant>,
}

/// What the actor of a grant is called in the audit log.
pub fn claim_actor(host: &str) -> String {
    format!("sdn://agent/{host} (vrrp)")
}

/// A virtual IP's owner changes at most this often.
pub const OWNER_CHANGE_MIN_MS: u64 = 1000;

fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Handles one host's claims on the leader.
pub async fn claim(
    store: &Store,
    leases: &tokio::sync::Mutex<Leases>,
    host: &str,
    claims: &[pb::VipClaim],
) -> Result<Vec<pb::VipGrant>, Status> {
    let mut l = leases.lock().await;
    let term = store.term();
    if l.term != term || l.since.is_none() {
        // What the last leader granted is in the log: apply it first.
        store
            .linearizable()
            .await
            .map_err(|e| Status::unavailable(format!("not yet able to grant: {e:?}")))?;
        l.term = term;
        l.since = Some(Instant::now());
        l.held.clear();
        l.changed.clear();
    }
    if !store.quorum_fresh(QUORUM_FRESH) {
        return Err(Status::unavailable(
            "this replica has not heard from a quorum lately: it grants no lease; claim again",
        ));
    }
    let now = Instant::now();
    let since = l.since.unwrap_or(now);
    let mut seen = std::collections::BTreeSet::new();
    let mut grants = Vec::with_capacity(claims.len());
    // Claims that need the next epoch: their index in `grants`.
    let mut to_write: Vec<(usize, VirtualIp, VipHolderTarget)> = Vec::new();
    {
        let shared = store.shared.read().await;
        let state = &shared.state;
        // Leases of virtual IPs gone since.
        l.held.retain(|id, _| state.virtual_ips.contains_key(id));
        l.changed.retain(|id, _| state.virtual_ips.contains_key(id));
        for (i, c) in claims.iter().enumerate() {
            let mut g = pb::VipGrant {
                virtual_ip_id: c.virtual_ip_id.clone(),
                ..Default::default()
            };
            if !seen.insert(c.virtual_ip_id.as_str()) {
                g.reason = format!("claims[{i}].virtual_ip_id: {:?} is claimed twice", c.virtual_ip_id);
                grants.push(g);
                continue;
            }
            let Some(v) = state.virtual_ips.get(&c.virtual_ip_id) else {
                g.reason = format!("claims[{i}].virtual_ip_id: unknown virtual ip {:?}", c.virtual_ip_id);
                grants.push(g);
                continue;
            };
            g.lease_ms = lease(v).as_millis() as u32;
            let holder = if c.port_id.is_empty() {
                VipHolderTarget::Host(host.to_string())
            } else {
                // A port the virtual IP's VRRP ran from is on this host.
                if state.ports.get(&c.port_id).is_none_or(|p| p.host_id != host) {
                    g.reason = format!("claims[{i}].port_id: port {:?} is not on host {host}", c.port_id);
                    grants.push(g);
                    continue;
                }
                VipHolderTarget::Port(c.port_id.clone())
            };
            if !v.holders.iter().any(|h| h.target == holder) {
                g.reason = format!("claims[{i}]: {} does not hold virtual ip {}", holder.describe(), v.id);
                grants.push(g);
                continue;
            }
            if c.release {
                if l.held.get(&v.id).is_some_and(|(h, _)| *h == holder) {
                    l.held.remove(&v.id);
                    tracing::info!(virtual_ip = %v.id, holder = %holder.describe(), epoch = v.epoch, "lease released");
                }
                g.reason = "released".into();
                grants.push(g);
                continue;
            }
            if v.owner.as_ref() == Some(&holder) {
                // The owner renews (a new leader takes the recorded owner's
                // word at once).
                let other = l.held.get(&v.id).filter(|(h, until)| *h != holder && *until > now);
                if other.is_none() {
                    l.held.insert(v.id.clone(), (holder, now + lease(v)));
                    g.granted = true;
                    g.epoch = v.epoch;
                    grants.push(g);
                    continue;
                }
            }
            // Held by ports, a preempting virtual IP goes from a lease holder
            // to a claimant of higher declared priority at once: a holder
            // that took it in a gap (its VM advertising within its own
            // priority) keeps it only until a higher one claims again. (No
            // dataplane fences a port's lease: the share's owner routes.)
            let priority = |t: &VipHolderTarget| v.holders.iter().find(|h| h.target == *t).map_or(0, |h| h.priority);
            let preempts = |h: &VipHolderTarget| !v.host_held() && v.preempt && priority(&holder) > priority(h);
            if let Some((h, until)) = l
                .held
                .get(&v.id)
                .filter(|(h, until)| *h != holder && *until > now && !preempts(h))
            {
                g.reason = format!(
                    "virtual ip {} is held by {} (epoch {}) for {} ms more",
                    v.id,
                    h.describe(),
                    v.epoch,
                    until.duration_since(now).as_millis()
                );
                g.epoch = v.epoch;
                grants.push(g);
                continue;
            }
            // The longest lease the recorded owner may hold: the one its
            // epoch was granted with, or three of today's intervals.
            let unknown_until = since + lease(v).max(Duration::from_millis(u64::from(v.owner_lease_ms)));
            if v.owner.as_ref().is_some_and(|o| *o != holder) && !l.held.contains_key(&v.id) && now < unknown_until {
                g.reason = format!(
                    "leadership changed {} ms ago: {} (epoch {}) may hold a lease for {} ms more",
                    now.duration_since(since).as_millis(),
                    v.owner.as_ref().map(VipHolderTarget::describe).unwrap_or_default(),
                    v.epoch,
                    unknown_until.duration_since(now).as_millis()
                );
                g.epoch = v.epoch;
                grants.push(g);
                continue;
            }
            // Damping: a virtual IP changes owner at most once a second, so
            // holders that give it back and forth (a tenant's VMs resigning
            // in turn) cost the log one write a second at most. (Counted
            // from this replica's own grants: a new leader's first change
            // is not damped.)
            let since_ms = l
                .changed
                .get(&v.id)
                .map_or(u64::MAX, |t| now.duration_since(*t).as_millis() as u64);
            if v.owner.is_some() && since_ms < OWNER_CHANGE_MIN_MS {
                g.reason = format!(
                    "virtual ip {} changed owner {since_ms} ms ago; the next change waits {} ms",
                    v.id,
                    OWNER_CHANGE_MIN_MS - since_ms
                );
                g.epoch = v.epoch;
                grants.push(g);
                continue;
            }
            to_write.push((grants.len(), v.clone(), holder));
            grants.push(g);
        }
    }
    if to_write.is_empty() {
        return Ok(grants);
    }
    let now_ms = wall_ms();
    let ops: Vec<Op> = to_write
        .iter()
        .map(|(_, v, holder)| {
            let mut c = v.clone();
            c.claim = true;
            // What the audit shows; the store takes the next epoch of the
            // virtual IP as it is when the grant applies (grants are
            // serialised here, so the same).
            c.epoch = v.epoch + 1;
            c.owner = Some(holder.clone());
            c.owner_since_unix_ms = now_ms;
            c.owner_lease_ms = lease(v).as_millis() as u32;
            Op::PutVirtualIp(c)
        })
        .collect();
    match store.write(&claim_actor(host), ops).await {
        Ok(o) => {
            let shared = store.shared.read().await;
            for (i, v, holder) in to_write {
                let Some(now_v) = shared.state.virtual_ips.get(&v.id) else {
                    continue;
                };
                let g = &mut grants[i];
                g.granted = true;
                g.epoch = now_v.epoch;
                // The lease the agent was told (`g.lease_ms`, from `v`).
                l.held.insert(v.id.clone(), (holder.clone(), now + lease(&v)));
                l.changed.insert(v.id.clone(), now);
                tracing::info!(
                    virtual_ip = %v.id,
                    owner = %holder.describe(),
                    epoch = now_v.epoch,
                    revision = o.revision,
                    "virtual ip owner granted"
                );
            }
            Ok(grants)
        }
        // A holder removed, or the virtual IP deleted, since it was read.
        Err(WriteError::Invalid(b)) => Err(Status::failed_precondition(b.to_string())),
        Err(WriteError::Raft(m)) => Err(Status::unavailable(m)),
        Err(WriteError::NotLeader(_)) => Err(Status::unavailable("leadership moved; claim again")),
    }
}
