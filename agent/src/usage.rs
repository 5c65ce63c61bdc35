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
    slots: RwLock<BTreeMap<u32, SystemSlot>>,
    queue: Mutex<VecDeque<pb::UsageSample>>,
    stats: Arc<Stats>,
}

/// The meter and sender of one agent.
#[derive(Clone, Default)]
pub struct Usage(Arc<Shared>);

fn now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

impl Usage {
    /// The systems and zones counted, as last enforced.
    pub fn set_plan(&self, plan: &SystemPlan) {
        let mut held = self.0.slots.write().unwrap_or_else(|p| p.into_inner());
        if *held != plan.slots {
            *held = plan.slots.clone();
        }
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
        // (slot, zone, way) -> (system, count at the last reading).
        let mut base: BTreeMap<(u32, u32, u32), (String, u64)> = BTreeMap::new();
        loop {
            // Just after the next whole second: what the counts grew by
            // since the last reading is that second's.
            let t = now();
            tokio::time::sleep(Duration::from_millis(1000 - t.subsec_millis() as u64 + 20)).await;
            let second = now().as_secs().saturating_sub(1);
            let slots = self.0.slots.read().unwrap_or_else(|p| p.into_inner()).clone();
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
                        // A count new to this system (a slot that changed
                        // hands, a fresh agent) starts from here.
                        if let Some((id, b)) = base.get(&key) {
                            if *id == s.id {
                                delta[way as usize] = v.wrapping_sub(*b);
                            }
                        }
                        base.insert(key, (s.id.clone(), v));
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
                    samples.push(pb::UsageSample {
                        system_id: s.id.clone(),
                        zone_id: zone_id.clone(),
                        unix_second: second,
                        up_bytes: delta[SYSTEM_UP as usize],
                        down_bytes: delta[SYSTEM_DOWN as usize],
                    });
                }
            }
            base.retain(|k, _| seen.contains(k));
            self.push(samples);
        }
    }

    async fn send(self, host: String, controllers: Vec<String>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut client: Option<pb::agent_client::AgentClient<tonic::transport::Channel>> = None;
        let mut next = 0usize;
        let mut failing = false;
        loop {
            tick.tick().await;
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
                    if failing {
                        tracing::info!("usage reports reach the controller again");
                        failing = false;
                    }
                }
                Some(Err(s))
                    if s.code() == tonic::Code::InvalidArgument || s.code() == tonic::Code::PermissionDenied =>
                {
                    // Never taken: kept, they would block the queue.
                    self.0.stats.refused.fetch_add(batch.len() as u64, Relaxed);
                    tracing::warn!(code = ?s.code(), error = %s.message(), samples = batch.len(), "usage report refused");
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
