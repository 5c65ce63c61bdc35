//! What each host's agent reports it enforces, and waiting for a revision to
//! be enforced on a set of hosts.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::watch;

/// One host's last report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HostStatus {
    /// Open watch streams of this host's agent.
    pub streams: u32,
    /// The last revision the agent acknowledged.
    pub enforced: u64,
    /// The revision and reason of a NACK newer than `enforced`.
    pub nack: Option<(u64, String)>,
}

/// Tracks agents' acknowledgements.
pub struct Enforcement {
    hosts: Mutex<BTreeMap<String, HostStatus>>,
    changed: watch::Sender<u64>,
}

/// Why waiting ended without success.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WaitError {
    #[error("host {host} refused revision {revision}: {reason}")]
    Nack {
        host: String,
        revision: u64,
        reason: String,
    },
    #[error("not enforced within the timeout on: {}", .pending.join(", "))]
    Timeout { pending: Vec<String> },
}

impl Default for Enforcement {
    fn default() -> Self {
        Enforcement {
            hosts: Mutex::new(BTreeMap::new()),
            changed: watch::channel(0).0,
        }
    }
}

impl Enforcement {
    fn update(&self, host: &str, f: impl FnOnce(&mut HostStatus)) {
        let mut hosts = self.hosts.lock().expect("enforcement lock");
        f(hosts.entry(host.to_string()).or_default());
        drop(hosts);
        self.changed.send_modify(|v| *v += 1);
    }

    pub fn stream_opened(&self, host: &str) {
        self.update(host, |s| s.streams += 1);
    }

    pub fn stream_closed(&self, host: &str) {
        self.update(host, |s| s.streams = s.streams.saturating_sub(1));
    }

    pub fn ack(&self, host: &str, revision: u64) {
        self.update(host, |s| {
            s.enforced = s.enforced.max(revision);
            if s.nack.as_ref().is_some_and(|(r, _)| *r <= revision) {
                s.nack = None;
            }
        });
    }

    pub fn nack(&self, host: &str, revision: u64, reason: String) {
        self.update(host, |s| s.nack = Some((revision, reason)));
    }

    pub fn status(&self) -> BTreeMap<String, HostStatus> {
        self.hosts.lock().expect("enforcement lock").clone()
    }

    /// Waits until every host in `hosts` enforces `revision` or later.
    pub async fn wait(&self, hosts: &[String], revision: u64, timeout: Duration) -> Result<(), WaitError> {
        let mut rx = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let pending: Vec<String> = {
                let map = self.hosts.lock().expect("enforcement lock");
                let mut pending = Vec::new();
                for h in hosts {
                    let s = map.get(h).cloned().unwrap_or_default();
                    if s.enforced >= revision {
                        continue;
                    }
                    if let Some((r, reason)) = s.nack {
                        if r >= revision {
                            return Err(WaitError::Nack {
                                host: h.clone(),
                                revision: r,
                                reason,
                            });
                        }
                    }
                    pending.push(h.clone());
                }
                pending
            };
            if pending.is_empty() {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, rx.changed()).await.is_err() {
                return Err(WaitError::Timeout { pending });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_for_every_host() {
        let e = std::sync::Arc::new(Enforcement::default());
        let hosts = vec!["a".to_string(), "b".to_string()];
        e.ack("a", 5);
        let e2 = e.clone();
        let t = tokio::spawn(async move { e2.wait(&["a".into(), "b".into()], 5, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!t.is_finished());
        e.ack("b", 6);
        assert_eq!(t.await.unwrap(), Ok(()));
        e.nack("a", 7, "map full".into());
        assert!(matches!(
            e.wait(&hosts, 7, Duration::from_secs(1)).await,
            Err(WaitError::Nack { .. })
        ));
        let r = e.wait(&hosts, 9, Duration::from_millis(30)).await;
        assert_eq!(r, Err(WaitError::Timeout { pending: hosts.clone() }));
    }
}
