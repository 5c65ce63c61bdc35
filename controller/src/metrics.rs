//! Prometheus metrics of the controller (`--metrics-listen`, `/metrics` in
//! the OpenMetrics text format):
//!
//! - `sdn_revision`: the revision this replica serves;
//! - `sdn_host_enforced_revision{host}`, `sdn_host_ack_lag{host}`
//!   (revisions the host is behind: 0 when it enforces its share's last
//!   change) and `sdn_host_connected{host}`, on the leader, where acks
//!   gather;
//! - `sdn_apply_duration_seconds` and `sdn_apply_total{outcome}`: each
//!   `Apply` this replica answered;
//! - `sdn_raft_term`, `sdn_raft_leader` (1 on the leader),
//!   `sdn_raft_state{state}` and `sdn_raft_last_applied_index`;
//! - information systems' bandwidth, on the leader
//!   ([`crate::usage`]): `sdn_system_bandwidth_bps`,
//!   `sdn_system_bandwidth_peak_bps` (the interval in progress),
//!   `sdn_system_bandwidth_interval_peak_bps` (the last complete one),
//!   `sdn_system_bandwidth_over_alert` and `sdn_system_bandwidth_alerts_total`,
//!   each `{system,zone,direction}`, and `sdn_usage_samples_total{outcome}`.
//!
//! The endpoint serves plain HTTP: bind it to an address only the
//! monitoring system reaches (it names hosts, not tenants' data).

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::enforcement::Enforcement;
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HostLabel {
    host: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

/// What is counted as it happens; the rest is read at each scrape.
pub struct Metrics {
    apply_seconds: Histogram,
    applies: Family<Outcome, Counter>,
    /// Information systems' bandwidth, measured on the leader.
    pub usage: Arc<crate::usage::Usage>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            // 100 µs to about 3 s.
            apply_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            applies: Family::default(),
            usage: Default::default(),
        }
    }
}

impl Metrics {
    /// One `Apply` answered: `outcome` is `applied`, `invalid`, `denied`,
    /// `unavailable`, `unenforced` (committed, but a host concerned did not
    /// enforce it in the time the writer waited) or `other`.
    pub fn applied(&self, took: Duration, code: Option<tonic::Code>) {
        self.apply_seconds.observe(took.as_secs_f64());
        let outcome = match code {
            None => "applied",
            Some(tonic::Code::InvalidArgument) => "invalid",
            Some(tonic::Code::PermissionDenied | tonic::Code::Unauthenticated) => "denied",
            Some(tonic::Code::Unavailable) => "unavailable",
            // Committed, but not (yet) enforced by every host concerned.
            Some(tonic::Code::DeadlineExceeded | tonic::Code::Aborted) => "unenforced",
            Some(_) => "other",
        };
        self.applies.get_or_create(&Outcome { outcome }).inc();
    }

    /// The text of one scrape.
    pub async fn render(&self, store: &Store, enforcement: &Enforcement) -> String {
        let mut reg = Registry::with_prefix("sdn");
        reg.register(
            "apply_duration_seconds",
            "Time to answer an Apply, on this replica",
            self.apply_seconds.clone(),
        );
        reg.register("apply", "Apply calls answered, by outcome", self.applies.clone());

        let revision = Gauge::<i64>::default();
        let enforced = Family::<HostLabel, Gauge>::default();
        let lag = Family::<HostLabel, Gauge>::default();
        let connected = Family::<HostLabel, Gauge>::default();
        {
            let shared = store.shared.read().await;
            revision.set(shared.revision as i64);
            if store.is_leader() {
                let status = enforcement.status();
                for h in shared.state.hosts.keys() {
                    let s = status.get(h).cloned().unwrap_or_default();
                    let last_change = shared.shares.host(h).map(|x| x.changed).unwrap_or(0);
                    let l = HostLabel { host: h.clone() };
                    enforced.get_or_create(&l).set(s.enforced as i64);
                    lag.get_or_create(&l).set(last_change.saturating_sub(s.enforced) as i64);
                    connected.get_or_create(&l).set(i64::from(s.streams > 0));
                }
            }
        }
        reg.register("revision", "The revision this replica serves", revision);
        reg.register(
            "host_enforced_revision",
            "The revision each host last said it enforces (on the leader)",
            enforced,
        );
        reg.register(
            "host_ack_lag",
            "Revisions of its share a host has not yet said it enforces (on the leader)",
            lag,
        );
        reg.register(
            "host_connected",
            "Whether the host's agent watches (on the leader)",
            connected,
        );

        self.usage.register(&mut reg);

        let m = store.raft.metrics().borrow().clone();
        let term = Gauge::<i64>::default();
        term.set(m.current_term as i64);
        let leader = Gauge::<i64>::default();
        leader.set(i64::from(m.current_leader == Some(m.id)));
        let applied = Gauge::<i64>::default();
        applied.set(m.last_applied.map(|l| l.index as i64).unwrap_or(0));
        let state = Family::<StateLabel, Gauge>::default();
        let now = match m.state {
            openraft::ServerState::Leader => "leader",
            openraft::ServerState::Follower => "follower",
            openraft::ServerState::Candidate => "candidate",
            openraft::ServerState::Learner => "learner",
            openraft::ServerState::Shutdown => "shutdown",
        };
        for s in ["leader", "follower", "candidate", "learner", "shutdown"] {
            state.get_or_create(&StateLabel { state: s }).set(i64::from(s == now));
        }
        reg.register("raft_term", "The Raft term this replica is in", term);
        reg.register("raft_leader", "1 on the leader", leader);
        reg.register("raft_state", "This replica's Raft state (1 for the current one)", state);
        reg.register(
            "raft_last_applied_index",
            "The last log index this replica applied",
            applied,
        );

        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &reg) {
            tracing::warn!(error = %e, "encoding the metrics");
        }
        out
    }
}

/// Serves `/metrics` on `listener` until the process ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    store: Store,
    enforcement: Arc<Enforcement>,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new().route(
        "/metrics",
        get(move || {
            let (metrics, store, enforcement) = (metrics.clone(), store.clone(), enforcement.clone());
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics.render(&store, &enforcement).await,
                )
            }
        }),
    );
    axum::serve(listener, app).await
}
