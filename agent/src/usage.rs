//! The bytes this host's ports of each information system exchange with
//! each zone, second by second, reported to the controller, whose leader
//! adds up every host's into the system's bandwidth peaks.
//!
//! The programs count, per CPU, every frame a system's port sends out of
//! a zone's uplink (up) or receives from one (down). Shortly after each
//! whole second of the clock, the meter reads the counts and turns what
//! they grew by into that second's sample. A sender hands the samples to
//! a controller once a second, on a connection of its own: a controller
//! that is slow or away never holds up the watch or the dataplane.
//! Samples wait in a bounded queue; when it is full the oldest go, and
//! are counted.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dataplane_common::maps::{SYSTEM_DOWN, SYSTEM_UP};
use sdn_proto::v1 as pb;

use crate::compile::systems::{SystemPlan, SystemSlot};

/// Samples waiting for the controller, at most (a minute of 64 systems
/// with two zones each).
pub const QUEUE_MAX: usize = 8192;
/// Samples in one report, at most (the controller's limit).
pub const REPORT_MAX: usize = 4096;

/// What the metrics endpoint shows of the usage reports.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes counted so far by (system, zone, direction).
    pub bytes: Mutex<BTreeMap<(String, String, &'static str), u64>>,
    pub sent: AtomicU64,
    pub refused: AtomicU64,
    pub dropped: AtomicU64,
}

#[derive(Default)]
struct Shared {
    /// The slots counted, and those set to zero for a new holder since the
    /// meter last read.
    slots: RwLock<(BTreeMap<u32, SystemSlot>, std::collections::BTreeSet<u32>)>,
    queue: Mutex<VecDeque<pb::UsageSample>>,
    /// Rung when the meter has queued a second's samples.
    queued: tokio::sync::Notify,
    stats: Arc<Stats>,
}

/// Seconds a late reading spreads what it counted over, at most; beyond,
/// the growth is left out (and counted): it cannot be placed.
const SPREAD_MAX: u64 = 10;

/// The meter and sender of one agent.
#[derive(Clone, Default)]
pub struct Usage(Arc<Shared>);

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl Usage {
    /// The systems and zones counted, as last enforced.
    /// The systems and zones counted, as last enforced; `fresh`: slots
    /// whose counts the dataplane just set to zero for a new holder.
    pub fn set_plan(&self, plan: &SystemPlan, fresh: &[u32]) {
        let mut held = self.0.slots.write().unwrap_or_else(|p| p.into_inner());
        if held.0 != plan.slots {
            held.0 = plan.slots.clone();
        }
        held.1.extend(fresh.iter().copied());
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.0.stats.clone()
    }

    fn push(&self, samples: Vec<pb::UsageSample>) {
        if samples.is_empty() {
            return;
        }
        let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
        q.extend(samples);
        let over = q.len().saturating_sub(QUEUE_MAX);
        if over > 0 {
            q.drain(..over);
            self.0.stats.dropped.fetch_add(over as u64, Relaxed);
            tracing::warn!(
                dropped = over,
                "usage samples dropped: the controller has not taken them for too long"
            );
        }
    }

    /// Starts the meter (reading the counts pinned under `pin_dir`) and the
    /// sender (to `controllers`, in turn).
    pub fn start(&self, pin_dir: PathBuf, host: String, controllers: Vec<String>) -> anyhow::Result<()> {
        let counts = crate::dataplane::SystemBytes::open(&pin_dir)?;
        let me = self.clone();
        tokio::spawn(async move { me.meter(counts).await });
        let me = self.clone();
        tokio::spawn(async move { me.send(host, controllers).await });
        Ok(())
    }

    async fn meter(self, counts: crate::dataplane::SystemBytes) {
        // (slot, zone number, way) -> (system, zone, count at the last
        // reading).
        let mut base: BTreeMap<(u32, u32, u32), (String, String, u64)> = BTreeMap::new();
        let mut last: Option<u64> = None;
        loop {
            // Just after the next whole second: what the counts grew by
            // since the last reading is that second's.
            let t = now();
            tokio::time::sleep(Duration::from_millis(1000 - t.subsec_millis() as u64 + 20)).await;
            let second = now().as_secs().saturating_sub(1);
            // A reading that came late (a busy host) spreads what it
            // counted over the seconds it missed, rather than showing them
            // as one second at twice the rate.
            let span = match last {
                Some(l) if second > l => second - l,
                Some(_) => continue,
                None => 1,
            };
            last = Some(second);
            let (slots, fresh) = {
                let mut held = self.0.slots.write().unwrap_or_else(|p| p.into_inner());
                (held.0.clone(), std::mem::take(&mut held.1))
            };
            let mut samples = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for (slot, s) in &slots {
                for (zone, zone_id) in &s.zones {
                    let mut delta = [0u64; 2];
                    for way in [SYSTEM_UP, SYSTEM_DOWN] {
                        let key = (*slot, *zone, way);
                        seen.insert(key);
                        let Ok(v) = counts.read(*slot, *zone, way) else {
                            continue;
                        };
                        // A slot set to zero for its holder counts from
                        // zero; any other count new to this system and
                        // zone (zones numbered anew) from here. A count
                        // that went down was set to zero meanwhile.
                        match base.get(&key) {
                            _ if fresh.contains(slot) => delta[way as usize] = v,
                            Some((id, z, b)) if *id == s.id && z == zone_id => {
                                delta[way as usize] = if v >= *b { v - *b } else { v };
                            }
                            _ => {}
                        }
                        base.insert(key, (s.id.clone(), zone_id.clone(), v));
                    }
                    if delta == [0, 0] {
                        continue;
                    }
                    {
                        let mut bytes = self.0.stats.bytes.lock().unwrap_or_else(|p| p.into_inner());
                        for (way, name) in [(SYSTEM_UP, "up"), (SYSTEM_DOWN, "down")] {
                            *bytes.entry((s.id.clone(), zone_id.clone(), name)).or_default() += delta[way as usize];
                        }
                    }
                    if span > SPREAD_MAX {
                        self.0.stats.dropped.fetch_add(1, Relaxed);
                        continue;
                    }
                    samples.extend(spread(&s.id, zone_id, second, span, delta));
                }
            }
            if span > SPREAD_MAX {
                tracing::warn!(
                    seconds = span,
                    "usage: the counts were not read for too long; what they grew by is left out"
                );
            }
            base.retain(|k, _| seen.contains(k));
            self.push(samples);
            self.0.queued.notify_one();
        }
    }

    async fn send(self, host: String, controllers: Vec<String>) {
        let mut client: Option<pb::agent_client::AgentClient<tonic::transport::Channel>> = None;
        let mut next = 0usize;
        let mut failing = false;
        let mut refused = false;
        loop {
            // As soon as a second's samples are queued; what failed is
            // tried again a second later at the latest.
            let _ = tokio::time::timeout(Duration::from_secs(1), self.0.queued.notified()).await;
            let batch: Vec<pb::UsageSample> = {
                let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
                let n = q.len().min(REPORT_MAX);
                q.drain(..n).collect()
            };
            if batch.is_empty() {
                continue;
            }
            if client.is_none() && !controllers.is_empty() {
                let addr = &controllers[next % controllers.len()];
                next += 1;
                match tokio::time::timeout(Duration::from_secs(2), sdn_proto::connect(addr)).await {
                    Ok(Ok(ch)) => client = Some(pb::agent_client::AgentClient::new(ch)),
                    Ok(Err(e)) => tracing::debug!(controller = %addr, error = %e, "usage: cannot connect"),
                    Err(_) => tracing::debug!(controller = %addr, "usage: connect timed out"),
                }
            }
            let req = pb::UsageReport {
                host_id: host.clone(),
                samples: batch.clone(),
            };
            let r = match client.as_mut() {
                Some(c) => tokio::time::timeout(Duration::from_secs(3), c.usage(req)).await.ok(),
                None => None,
            };
            match r {
                Some(Ok(a)) => {
                    let a = a.into_inner();
                    self.0.stats.sent.fetch_add(a.accepted as u64, Relaxed);
                    self.0.stats.refused.fetch_add(a.refused as u64, Relaxed);
                    if a.refused > 0 {
                        tracing::warn!(refused = a.refused, reason = %a.reason, "the controller left usage samples out");
                    }
                    if failing || refused {
                        tracing::info!("usage reports reach the controller again");
                        failing = false;
                        refused = false;
                    }
                }
                Some(Err(s))
                    if matches!(
                        s.code(),
                        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unimplemented
                    ) =>
                {
                    // Never taken (refused, or a controller of an earlier
                    // release): dropped, as kept they would block the queue.
                    self.0.stats.refused.fetch_add(batch.len() as u64, Relaxed);
                    // Once until a report is taken again, not every second.
                    if !refused {
                        tracing::warn!(code = ?s.code(), error = %s.message(), samples = batch.len(), "usage report refused; such reports are dropped and counted");
                        refused = true;
                    }
                }
                other => {
                    if !failing {
                        let why = match other {
                            Some(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
                            _ => "no answer".into(),
                        };
                        tracing::warn!(error = %why, "usage report not delivered; kept and retried");
                        failing = true;
                    }
                    client = None;
                    // Back at the head, before what came meanwhile.
                    let mut q = self.0.queue.lock().unwrap_or_else(|p| p.into_inner());
                    for s in batch.into_iter().rev() {
                        q.push_front(s);
                    }
                    let over = q.len().saturating_sub(QUEUE_MAX);
                    if over > 0 {
                        q.drain(..over);
                        self.0.stats.dropped.fetch_add(over as u64, Relaxed);
                    }
                }
            }
        }
    }
}

/// `delta` (bytes up, down) counted over the `span` seconds through
/// `second`, as one sample a second (what does not divide evenly goes to
/// the last).
fn spread(system: &str, zone: &str, second: u64, span: u64, delta: [u64; 2]) -> Vec<pb::UsageSample> {
    let each = [delta[0] / span, delta[1] / span];
    (0..span)
        .map(|i| {
            let last = i == span - 1;
            let part = |w: usize| if last { delta[w] - each[w] * (span - 1) } else { each[w] };
            pb::UsageSample {
                system_id: system.to_string(),
                zone_id: zone.to_string(),
                unix_second: second + 1 + i - span,
                up_bytes: part(SYSTEM_UP as usize),
                down_bytes: part(SYSTEM_DOWN as usize),
            }
        })
        .filter(|s| s.up_bytes + s.down_bytes > 0)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A late reading's bytes spread over the seconds it missed, all of
    /// them kept.
    #[test]
    fn a_late_reading_spreads_over_the_seconds_it_missed() {
        let one = spread("s", "z", 100, 1, [10, 3]);
        assert_eq!(one.len(), 1);
        assert_eq!((one[0].unix_second, one[0].up_bytes, one[0].down_bytes), (100, 10, 3));
        let three = spread("s", "z", 100, 3, [10, 3]);
        let seconds: Vec<u64> = three.iter().map(|s| s.unix_second).collect();
        assert_eq!(seconds, [98, 99, 100]);
        assert_eq!(three.iter().map(|s| s.up_bytes).sum::<u64>(), 10);
        assert_eq!(three.iter().map(|s| s.down_bytes).sum::<u64>(), 3);
        assert_eq!(three[2].up_bytes, 4);
    }
}
