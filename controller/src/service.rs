//! The gRPC services: `Provisioning` for the cloud platform and `Agent` for
//! the host agents.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use sdn_proto::v1 as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::auth::Caller;
use crate::convert;
use crate::enforcement::{Enforcement, WaitError};
use crate::shares::Name;
use crate::store::{Store, WriteError};
use sdn_proto::tls::Role;

/// Everything the services share.
/// The leader's address, and a kept connection to it for agents' acks.
pub type LeaderAcks = (String, pb::agent_client::AgentClient<tonic::transport::Channel>);

#[derive(Clone)]
pub struct Controller {
    pub store: Store,
    pub enforcement: Arc<Enforcement>,
    /// Set when the controller stops: open watch streams end at once (the
    /// agents move to another replica).
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// The connection acks travel to the leader on, and the leader's address.
    pub leader_acks: Arc<tokio::sync::Mutex<Option<LeaderAcks>>>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The topology page, if this replica serves one.
    pub web: Option<crate::web::Web>,
    /// Health reports written, by host, in the current second (the
    /// leader's budget of log writes for them).
    pub health_budget: Arc<std::sync::Mutex<HealthBudget>>,
    /// The leases of the virtual IPs' owners (the leader's).
    pub vip_leases: Arc<tokio::sync::Mutex<crate::vips::Leases>>,
}

/// A member's health changes at most once in this time: a member that
/// flaps costs the log one write per hold, not one per check.
pub const HEALTH_HOLD_MS: u64 = 5_000;
/// Health reports a host may have written in one second.
pub const HEALTH_REPORTS_PER_SEC: u32 = 20;

/// Health reports written by host in the current second.
#[derive(Debug, Default)]
pub struct HealthBudget {
    second: u64,
    written: std::collections::HashMap<String, u32>,
}

impl HealthBudget {
    /// Takes one report of `host` at `now_ms`: false when its second's
    /// budget is spent.
    pub fn take(&mut self, host: &str, now_ms: u64) -> bool {
        let second = now_ms / 1000;
        if second != self.second {
            self.second = second;
            self.written.clear();
        }
        let n = self.written.entry(host.to_string()).or_default();
        if *n >= HEALTH_REPORTS_PER_SEC {
            return false;
        }
        *n += 1;
        true
    }
}

const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_BATCH: usize = sdn_policies::limits::input::BATCH_OPS_MAX;
use crate::auth::{forward as mark, forwarded};

/// What a tenant sees of the state: its tenant, VPCs, their subnets, its
/// ports, security groups, load balancers and virtual IPs.
fn tenant_view(s: &sdn_policies::State, tenant: &str) -> sdn_policies::State {
    let mut v = sdn_policies::State::default();
    if let Some(t) = s.tenants.get(tenant) {
        v.tenants.insert(t.id.clone(), t.clone());
    }
    v.vpcs = s
        .vpcs
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.subnets = s
        .subnets
        .iter()
        .filter(|(_, x)| v.vpcs.contains_key(&x.vpc_id))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.ports = s
        .ports
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.security_groups = s
        .security_groups
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.load_balancers = s
        .load_balancers
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.pools = s
        .pools
        .iter()
        .filter(|(_, x)| v.load_balancers.contains_key(&x.load_balancer_id))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.listeners = s
        .listeners
        .iter()
        .filter(|(_, x)| v.load_balancers.contains_key(&x.load_balancer_id))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.members = s
        .members
        .iter()
        .filter(|(_, x)| v.pools.contains_key(&x.pool_id))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.virtual_ips = s
        .virtual_ips
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.certificates = s
        .certificates
        .iter()
        .filter(|(_, x)| x.tenant_id == tenant)
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v.http_listeners = s
        .http_listeners
        .iter()
        .filter(|(_, x)| v.load_balancers.contains_key(&x.load_balancer_id))
        .map(|(k, x)| (k.clone(), x.clone()))
        .collect();
    v
}

/// Records an `Audit` page looks at, at most, for a tenant's view.
const AUDIT_SCANNED_MAX: usize = 10_000;

/// The bytes of records in one `Audit` answer, at most (beyond one record):
/// under the 4 MiB that gRPC clients accept by default.
const AUDIT_PAGE_BYTES: usize = 3 << 20;

async fn leader_client(
    addr: &str,
) -> Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>, Status> {
    let ch = tokio::time::timeout(Duration::from_secs(2), sdn_proto::connect(addr))
        .await
        .map_err(|_| Status::unavailable(format!("forwarding to the leader at {addr}: connect timed out")))?
        .map_err(|e| Status::unavailable(format!("forwarding to the leader at {addr}: {e}")))?;
    Ok(pb::provisioning_client::ProvisioningClient::new(ch))
}

/// Where a request that this replica cannot serve should go.
fn not_leader(leader: Option<String>, already_forwarded: bool) -> Result<String, Status> {
    match leader {
        _ if already_forwarded => Err(Status::unavailable("leadership moved while forwarding; retry")),
        Some(addr) => Ok(addr),
        None => Err(Status::unavailable("no leader is elected yet; retry")),
    }
}

#[tonic::async_trait]
impl pb::provisioning_server::Provisioning for Controller {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let t0 = std::time::Instant::now();
        let r = self.apply_now(req).await;
        self.metrics.applied(t0.elapsed(), r.as_ref().err().map(Status::code));
        r
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Result<Response<pb::ListResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("List", &[Role::Platform, Role::Admin, Role::Supervisor, Role::Tenant])?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        let kind = if req.kind == 0 {
            None
        } else {
            Some(
                convert::kind_from_pb(req.kind)
                    .ok_or_else(|| Status::invalid_argument(format!("kind: unknown kind {}", req.kind)))?,
            )
        };
        if !req.stale {
            match self.store.linearizable().await {
                Ok(()) => {}
                Err(WriteError::NotLeader(leader)) => {
                    let addr = not_leader(leader, was_forwarded)?;
                    return leader_client(&addr).await?.list(mark(req, &caller)).await;
                }
                Err(e) => return Err(Status::unavailable(e.to_string())),
            }
        }
        let shared = self.store.shared.read().await;
        let out = match caller.tenant() {
            Some(t) => convert::list_to_pb(&tenant_view(&shared.state, t), kind, shared.revision),
            None => convert::list_to_pb(&shared.state, kind, shared.revision),
        };
        Ok(Response::new(out))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Audit", &[Role::Platform, Role::Admin, Role::Supervisor, Role::Tenant])?;
        if req.get_ref().local {
            caller.require("Audit of one replica's own copy", &[Role::Admin, Role::Supervisor])?;
        }
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        let limit = match req.limit {
            0 => 100,
            n if n > 10_000 => return Err(Status::invalid_argument(format!("limit: {n} is above 10000"))),
            n => n as usize,
        };
        if !req.local {
            match self.store.linearizable().await {
                Ok(()) => {}
                Err(WriteError::NotLeader(leader)) => {
                    let addr = not_leader(leader, was_forwarded)?;
                    return leader_client(&addr).await?.audit(mark(req, &caller)).await;
                }
                Err(e) => return Err(Status::unavailable(e.to_string())),
            }
        }
        // A tenant reads the records of its own tenant: what its users did,
        // and changes to its objects, of which only its own.
        let tenant = caller.tenant().map(str::to_string);
        let limits = crate::store::PageLimits {
            records: limit,
            // A tenant's records may be few among many: a page looks at so
            // many and says where to go on.
            scanned: if tenant.is_some() { AUDIT_SCANNED_MAX } else { limit },
            bytes: AUDIT_PAGE_BYTES,
        };
        let keep_for = tenant.clone();
        let page = self
            .store
            .audit(req.after_revision, limits, move |r| match &keep_for {
                Some(t) => r.for_tenant(t),
                None => Some(r),
            })
            .await
            .map_err(|e| Status::internal(format!("reading the audit log: {e:#}")))?;
        let chained = page.chain.is_some();
        let chain = page.chain.unwrap_or_default();
        let partial = tenant.is_some();
        Ok(Response::new(pb::AuditResponse {
            records: page
                .records
                .iter()
                .map(|r| {
                    let mut r = r.to_pb();
                    // A tenant's view cannot be checked, and the hashes of
                    // records around one it does not see would let it test
                    // guesses of that one.
                    if partial {
                        r.prev_hash.clear();
                        r.hash.clear();
                    }
                    r
                })
                .collect(),
            chained,
            chain_start: chain.start,
            anchor_revision: if partial { 0 } else { chain.anchor_revision },
            anchor_hash: if partial {
                vec![]
            } else {
                crate::store::audit::unhex(&chain.anchor_hash)
            },
            head_revision: page.head_revision,
            partial,
            next_after: page.next_after,
        }))
    }

    async fn enforcement(
        &self,
        req: Request<pb::EnforcementRequest>,
    ) -> Result<Response<pb::EnforcementResponse>, Status> {
        let caller = Caller::of(&req)?;
        // A tenant waits for its own changes (`sdnctl apply --wait`): it
        // sees the hosts of its own ports, those its changes concern.
        caller.require(
            "Enforcement",
            &[Role::Platform, Role::Admin, Role::Supervisor, Role::Tenant],
        )?;
        // Agents' acks gather on the leader: ask it.
        if !self.store.is_leader() {
            let addr = not_leader(self.store.leader().map(|l| l.1), forwarded(&req))?;
            return leader_client(&addr)
                .await?
                .enforcement(mark(req.into_inner(), &caller))
                .await;
        }
        let shared = self.store.shared.read().await;
        let status = self.enforcement.status();
        let tenant_hosts: Option<std::collections::BTreeSet<&str>> = caller.tenant().map(|t| {
            shared
                .state
                .ports
                .values()
                .filter(|p| p.tenant_id == t)
                .map(|p| p.host_id.as_str())
                .collect()
        });
        let hosts = shared
            .state
            .hosts
            .keys()
            .filter(|h| tenant_hosts.as_ref().is_none_or(|t| t.contains(h.as_str())))
            .map(|h| {
                let s = status.get(h).cloned().unwrap_or_default();
                // A host hears of a revision only when it changes its share:
                // one that enforces its share's last change enforces the
                // current revision.
                let last_change = shared.shares.host(h).map(|x| x.changed).unwrap_or(0);
                let enforced = if s.enforced > 0 && s.enforced >= last_change {
                    shared.revision
                } else {
                    s.enforced
                };
                pb::HostEnforcement {
                    host_id: h.clone(),
                    connected: s.streams > 0,
                    enforced_revision: enforced,
                    nack_reason: s.nack.map(|(_, r)| r).unwrap_or_default(),
                }
            })
            .collect();
        Ok(Response::new(pb::EnforcementResponse {
            current_revision: shared.revision,
            hosts,
        }))
    }

    async fn topology(&self, req: Request<pb::TopologyRequest>) -> Result<Response<pb::TopologyResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Topology", &crate::web::Web::READERS)?;
        let r = async {
            let t = crate::web::topology(&self.store).await?;
            tokio::task::spawn_blocking(move || -> anyhow::Result<pb::TopologyResponse> {
                Ok(pb::TopologyResponse {
                    revision: t.revision,
                    json: serde_json::to_string(&t)?,
                    text: t.text(),
                })
            })
            .await?
        };
        r.await
            .map(Response::new)
            .map_err(|e| Status::internal(format!("building the topology: {e}")))
    }

    async fn web_login(&self, req: Request<pb::WebLoginRequest>) -> Result<Response<pb::WebLoginResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("WebLogin", &crate::web::Web::READERS)?;
        let Some(web) = &self.web else {
            return Err(Status::failed_precondition(
                "this replica serves no topology page (start it with --web-listen)",
            ));
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let Some(identity) = caller.identity.clone() else {
            // --insecure: the page asks no one.
            return Ok(Response::new(pb::WebLoginResponse {
                url: format!("{}/", web.url),
                expires_unix_ms: 0,
            }));
        };
        if caller.via.is_some() {
            return Err(Status::failed_precondition(
                "a login link is made by the replica that serves the page: ask it directly",
            ));
        }
        let until = req.extensions().get::<sdn_proto::tls::Peer>().and_then(|p| p.expires);
        let (token, ttl) = web.sessions.mint(identity, until).map_err(Status::resource_exhausted)?;
        tracing::info!(target: "sdn::security", caller = %caller.actor, "made a topology page login link");
        Ok(Response::new(pb::WebLoginResponse {
            url: format!("{}/login#token={token}", web.url),
            expires_unix_ms: now_ms + ttl.as_millis() as u64,
        }))
    }
}

/// Only the agent of `host` speaks for it (or a replica passing its
/// answer on).
fn agent_of(caller: &Caller, op: &str, host: &str) -> Result<(), Status> {
    let Some(id) = &caller.identity else { return Ok(()) };
    if id.role == Role::Agent && id.name == host {
        return Ok(());
    }
    let why = if id.role == Role::Agent {
        format!("an agent speaks only for its own host ({})", id.name)
    } else {
        "only the host's agent".to_string()
    };
    Err(crate::auth::refuse(&format!("{op} for host {host}"), id, &why))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Who writes health into the log: the reporting host's agent.
fn health_actor(host: &str) -> String {
    format!("sdn://agent/{host}{HEALTH_ACTOR_SUFFIX}")
}

/// The end of a health report's actor in the audit log.
pub const HEALTH_ACTOR_SUFFIX: &str = " (health check)";

#[tonic::async_trait]
impl pb::agent_server::Agent for Controller {
    async fn register(&self, req: Request<pb::RegisterRequest>) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = Caller::of(&req)?;
        let req = req.into_inner();
        agent_of(&caller, "Register", &req.host_id)?;
        let shared = self.store.shared.read().await;
        if !shared.state.hosts.contains_key(&req.host_id) {
            return Err(Status::not_found(format!(
                "host_id: unknown host {:?}; provision it first",
                req.host_id
            )));
        }
        tracing::info!(host = %req.host_id, version = %req.agent_version, "agent registered");
        Ok(Response::new(pb::RegisterResponse {
            revision: shared.revision,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let caller = Caller::of(&req)?;
        let req = req.into_inner();
        agent_of(&caller, "Watch", &req.host_id)?;
        let host = req.host_id.clone();
        let current = {
            let shared = self.store.shared.read().await;
            if !shared.state.hosts.contains_key(&host) {
                return Err(Status::not_found(format!("host_id: unknown host {host:?}")));
            }
            shared.revision
        };
        // Resume from what the agent holds, unless it claims a revision this
        // store never reached (another cluster, or a reset): then start over.
        let resume = req.revision > 0 && req.revision <= current;
        let held: BTreeMap<Name, Option<Bits>> = if resume {
            req.resource_versions
                .into_iter()
                .map(|(n, v)| (Name::from(n), version_bits(&v)))
                .collect()
        } else {
            BTreeMap::new()
        };
        let (tx, rx) = mpsc::channel(16);
        let ctl = self.clone();
        tokio::spawn(async move {
            ctl.enforcement.stream_opened(&host);
            tracing::info!(host = %host, from = req.revision, resume, protocol = req.protocol, "watch started");
            ctl.stream(&host, held, !resume, req.protocol == 0, tx).await;
            ctl.enforcement.stream_closed(&host);
            tracing::info!(host = %host, "watch ended");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn ack(&self, req: Request<pb::AckRequest>) -> Result<Response<pb::AckResponse>, Status> {
        let caller = Caller::of(&req)?;
        let forwarded_ack = forwarded(&req);
        let req = req.into_inner();
        if req.host_id.is_empty() {
            return Err(Status::invalid_argument("host_id: must not be empty"));
        }
        agent_of(&caller, "Ack", &req.host_id)?;
        // An answer for a revision the store never reached says nothing of
        // what the host enforces (it would let a waiting writer report a
        // change enforced that no host holds).
        let current = self.store.shared.read().await.revision;
        if req.revision > current {
            return Err(Status::invalid_argument(format!(
                "revision: {} is beyond this controller's revision {current}",
                req.revision
            )));
        }
        if req.ok {
            self.enforcement.ack(&req.host_id, req.revision);
        } else {
            tracing::warn!(host = %req.host_id, revision = req.revision, reason = %req.reason, "agent refused a revision");
            self.enforcement.nack(&req.host_id, req.revision, req.reason.clone());
        }
        // Waiting writers wait on the leader: pass the answer on.
        if !self.store.is_leader() && !forwarded_ack {
            let ctl = self.clone();
            tokio::spawn(async move { ctl.pass_ack_to_leader(req, caller).await });
        }
        Ok(Response::new(pb::AckResponse {}))
    }

    async fn report_health(&self, req: Request<pb::HealthReport>) -> Result<Response<pb::HealthResponse>, Status> {
        let caller = Caller::of(&req)?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        if req.host_id.is_empty() {
            return Err(Status::invalid_argument("host_id: must not be empty"));
        }
        agent_of(&caller, "ReportHealth", &req.host_id)?;
        let member = {
            let shared = self.store.shared.read().await;
            let state = &shared.state;
            let Some(m) = state.members.get(&req.member_id) else {
                return Err(Status::not_found(format!(
                    "member_id: unknown member {:?}",
                    req.member_id
                )));
            };
            // Only the host of the member's port checks it.
            let host = match &m.target {
                sdn_policies::MemberTarget::Port(p) => state.ports.get(p).map(|p| p.host_id.as_str()),
                sdn_policies::MemberTarget::Address(_) => None,
            };
            if host != Some(req.host_id.as_str()) {
                return Err(Status::permission_denied(format!(
                    "member_id: member {} is not on host {}'s ports",
                    m.id, req.host_id
                )));
            }
            if state.pools.get(&m.pool_id).is_none_or(|p| p.health.is_none()) {
                return Err(Status::failed_precondition(format!(
                    "member_id: member {}'s pool {} has no health check",
                    m.id, m.pool_id
                )));
            }
            // A member never found failing counts as up.
            if m.health.as_ref().is_none_or(|h| h.up) == req.up {
                return Ok(Response::new(pb::HealthResponse { revision: 0 }));
            }
            m.clone()
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if !self.store.is_leader() {
            return self
                .to_leader(was_forwarded, Duration::from_secs(5), |mut c| async move {
                    c.report_health(mark(req, &caller)).await
                })
                .await;
        }
        if let Some(h) = &member.health {
            let age = now_ms.saturating_sub(h.since_unix_ms);
            if age < HEALTH_HOLD_MS {
                return Err(Status::resource_exhausted(format!(
                    "member_id: member {}'s health changed {age} ms ago; it changes at most once in {HEALTH_HOLD_MS} ms",
                    member.id
                )));
            }
        }
        if !self
            .health_budget
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(&req.host_id, now_ms)
        {
            return Err(Status::resource_exhausted(format!(
                "host_id: host {} reported {HEALTH_REPORTS_PER_SEC} health changes this second already",
                req.host_id
            )));
        }
        let mut detail: String = req
            .detail
            .chars()
            .filter(|c| c.is_ascii_graphic() || *c == ' ')
            .filter(|c| *c != ';')
            .take(sdn_policies::HEALTH_DETAIL_MAX)
            .collect();
        if req.up {
            detail.clear();
        }
        let mut m = member;
        m.health_report = true;
        m.health = Some(sdn_policies::MemberHealth {
            up: req.up,
            since_unix_ms: now_ms,
            host_id: req.host_id.clone(),
            detail,
        });
        let id = m.id.clone();
        match self
            .store
            .write(&health_actor(&req.host_id), vec![sdn_policies::Op::PutMember(m)])
            .await
        {
            Ok(o) => {
                tracing::info!(member = %id, host = %req.host_id, up = req.up, revision = o.revision, "member health changed");
                Ok(Response::new(pb::HealthResponse { revision: o.revision }))
            }
            Err(WriteError::Invalid(b)) => Err(Status::failed_precondition(b.to_string())),
            Err(WriteError::Raft(m)) => Err(Status::unavailable(m)),
            Err(WriteError::NotLeader(_)) => Err(Status::unavailable("leadership moved; report again")),
        }
    }

    async fn claim_virtual_ips(&self, req: Request<pb::VipClaims>) -> Result<Response<pb::VipGrants>, Status> {
        let caller = Caller::of(&req)?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        if req.host_id.is_empty() {
            return Err(Status::invalid_argument("host_id: must not be empty"));
        }
        agent_of(&caller, "ClaimVirtualIps", &req.host_id)?;
        if req.claims.len() > crate::vips::CLAIMS_MAX {
            return Err(Status::invalid_argument(format!(
                "claims: {} claims, at most {}",
                req.claims.len(),
                crate::vips::CLAIMS_MAX
            )));
        }
        if !self.store.is_leader() {
            return self
                .to_leader(was_forwarded, Duration::from_secs(2), |mut c| async move {
                    c.claim_virtual_ips(mark(req, &caller)).await
                })
                .await;
        }
        let grants = crate::vips::claim(&self.store, &self.vip_leases, &req.host_id, &req.claims).await?;
        Ok(Response::new(pb::VipGrants { grants }))
    }

    async fn usage(&self, req: Request<pb::UsageReport>) -> Result<Response<pb::UsageResponse>, Status> {
        let caller = Caller::of(&req)?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        if req.host_id.is_empty() {
            return Err(Status::invalid_argument("host_id: must not be empty"));
        }
        agent_of(&caller, "Usage", &req.host_id)?;
        if req.samples.len() > crate::usage::SAMPLES_MAX {
            return Err(Status::invalid_argument(format!(
                "samples: {} samples, at most {}",
                req.samples.len(),
                crate::usage::SAMPLES_MAX
            )));
        }
        // The leader adds up every host's figures.
        if !self.store.is_leader() {
            return self
                .to_leader(was_forwarded, Duration::from_secs(2), |mut c| async move {
                    c.usage(mark(req, &caller)).await
                })
                .await;
        }
        let shared = self.store.shared.read().await;
        if !shared.state.hosts.contains_key(&req.host_id) {
            return Err(Status::not_found(format!("host_id: unknown host {:?}", req.host_id)));
        }
        Ok(Response::new(self.metrics.usage.report(
            &shared.state,
            &req.host_id,
            &req.samples,
        )))
    }
}

impl Controller {
    /// `Apply`, timed and counted by [`Provisioning::apply`].
    async fn apply_now(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let caller = Caller::of(&req)?;
        caller.require("Apply", &[Role::Platform, Role::Admin, Role::Tenant])?;
        let was_forwarded = forwarded(&req);
        let req = req.into_inner();
        if req.operations.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "operations: {} operations in one batch; at most {MAX_BATCH}",
                req.operations.len()
            )));
        }
        let ops = convert::ops_from_pb(&req.operations).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for (i, op) in ops.iter().enumerate() {
            if let sdn_policies::Op::PutQuarantine(q) = op {
                if q.expires_unix_ms.is_some_and(|t| t <= now_ms) {
                    return Err(Status::invalid_argument(format!(
                        "operations[{i}].put_quarantine.expires_unix_ms: {} is in the past",
                        q.expires_unix_ms.unwrap_or(0)
                    )));
                }
            }
        }
        // Every operation is the caller's to make, before any is written
        // (a group's tenant never changes, so a check against the state of
        // now holds when the batch applies).
        caller.check_batch(&ops, &self.store.shared.read().await.state)?;
        // A member's draining counts from when it began: a member that
        // turns draining takes this time, one that stays so keeps its own
        // (the state keeps it when it applies the put). Health is the
        // checker's to report, never a caller's.
        let mut ops = ops;
        for op in ops.iter_mut() {
            if let sdn_policies::Op::PutMember(m) = op {
                m.health = None;
                m.health_report = false;
                m.draining_since_unix_ms = (m.state == sdn_policies::MemberState::Draining).then_some(now_ms);
            }
        }
        // The audit log names the caller as its certificate does; what the
        // request says of itself is kept beside it.
        let actor = match (caller.identity.is_some(), req.actor.trim()) {
            (true, "") => caller.actor.clone(),
            (true, said) => format!("{} ({said})", caller.actor),
            (false, "") => "unknown".to_string(),
            // Unauthenticated (`--insecure`): what the caller says, never
            // taken for an identity (a tenant's audit view selects by it).
            (false, said) if said.starts_with("sdn://") => format!("unverified {said}"),
            (false, said) => said.to_string(),
        };
        let mirrors: Vec<String> = ops
            .iter()
            .filter_map(|o| match o {
                sdn_policies::Op::PutMirrorSession(m) => Some(m.id.clone()),
                _ => None,
            })
            .collect();
        let outcome = match self.store.write(&actor, ops).await {
            Ok(o) => o,
            Err(WriteError::Invalid(b)) => return Err(Status::invalid_argument(b.to_string())),
            Err(WriteError::Raft(m)) => return Err(Status::unavailable(m)),
            Err(WriteError::NotLeader(leader)) => {
                let addr = not_leader(leader, was_forwarded)?;
                tracing::debug!(leader = %addr, "forwarding a write to the leader");
                return leader_client(&addr).await?.apply(mark(req, &caller)).await;
            }
        };
        tracing::info!(revision = outcome.revision, actor = %actor, hosts = ?outcome.hosts, "applied batch");
        let mut enforced = false;
        if req.wait {
            let timeout = if req.wait_timeout_ms == 0 {
                DEFAULT_WAIT
            } else {
                Duration::from_millis(req.wait_timeout_ms as u64)
            };
            match self.enforcement.wait(&outcome.hosts, outcome.revision, timeout).await {
                Ok(()) => enforced = true,
                Err(WaitError::Timeout { pending }) => {
                    return Err(Status::deadline_exceeded(format!(
                        "revision {} was committed but is not yet enforced on: {}",
                        outcome.revision,
                        pending.join(", ")
                    )))
                }
                Err(e @ WaitError::Nack { .. }) => {
                    return Err(Status::aborted(format!(
                        "revision {} was committed but {e}",
                        outcome.revision
                    )))
                }
            }
        }
        let mut warnings = Vec::new();
        if !mirrors.is_empty() {
            let shared = self.store.shared.read().await;
            for id in mirrors {
                let Some(m) = shared.state.mirror_sessions.get(&id) else {
                    continue;
                };
                if shared.state.mirrored_ports(m).next().is_none() {
                    warnings.push(format!(
                        "mirror session {id}: {} has no port yet; it copies nothing until one is added",
                        m.scope()
                    ));
                }
            }
        }
        Ok(Response::new(pb::ApplyResponse {
            revision: outcome.revision,
            hosts: outcome.hosts,
            enforced,
            warnings,
        }))
    }

    /// Passes an agent's answer to the leader, over one connection kept
    /// for it, retried while leadership settles: a lost answer would leave
    /// a writer waiting for a host that enforces the change.
    /// The connection to the leader at `addr` that agents' acks and usage
    /// reports travel on (made once, kept while the leader stays).
    /// Hands an agent's call to the leader, answering within `wait`. A
    /// connection that fails is dropped (a refusal says nothing of it).
    async fn to_leader<R, F, Fut>(&self, was_forwarded: bool, wait: Duration, call: F) -> Result<Response<R>, Status>
    where
        F: FnOnce(pb::agent_client::AgentClient<tonic::transport::Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<R>, Status>>,
    {
        let addr = not_leader(self.store.leader().map(|(_, a)| a), was_forwarded)?;
        let client = self
            .leader_agent(&addr)
            .await
            .ok_or_else(|| Status::unavailable(format!("forwarding to the leader at {addr}: cannot connect")))?;
        let r = tokio::time::timeout(wait, call(client)).await.unwrap_or_else(|_| {
            Err(Status::unavailable(format!(
                "forwarding to the leader at {addr}: timed out"
            )))
        });
        if matches!(&r, Err(s) if s.code() == tonic::Code::Unavailable) {
            *self.leader_acks.lock().await = None;
        }
        r
    }

    async fn leader_agent(&self, addr: &str) -> Option<pb::agent_client::AgentClient<tonic::transport::Channel>> {
        let mut cached = self.leader_acks.lock().await;
        match &*cached {
            Some((a, c)) if a == addr => Some(c.clone()),
            _ => match tokio::time::timeout(Duration::from_secs(2), sdn_proto::connect(addr)).await {
                Ok(Ok(ch)) => {
                    let c = pb::agent_client::AgentClient::new(ch);
                    *cached = Some((addr.to_string(), c.clone()));
                    Some(c)
                }
                _ => None,
            },
        }
    }

    async fn pass_ack_to_leader(&self, req: pb::AckRequest, caller: Caller) {
        for attempt in 0..5u32 {
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 << attempt.min(3))).await;
            }
            let Some((_, addr)) = self.store.leader() else { continue };
            if self.store.is_leader() {
                // Leadership came here meanwhile.
                if req.ok {
                    self.enforcement.ack(&req.host_id, req.revision);
                }
                return;
            }
            let Some(client) = self.leader_agent(&addr).await else {
                continue;
            };
            let r = tokio::time::timeout(Duration::from_secs(2), client.clone().ack(mark(req.clone(), &caller))).await;
            match r {
                Ok(Ok(_)) => return,
                Ok(Err(e)) => tracing::debug!(leader = %addr, error = %e, "passing an ack to the leader failed"),
                Err(_) => tracing::debug!(leader = %addr, "passing an ack to the leader timed out"),
            }
            *self.leader_acks.lock().await = None;
        }
        tracing::warn!(host = %req.host_id, revision = req.revision, "could not pass an agent's ack to the leader");
    }

    /// Sends the host's share, then the changed resources at every change
    /// of it, until the agent goes away. `legacy`: in the form agents of
    /// earlier releases read ([`crate::slice::legacy_share`]), compared
    /// whole at every change.
    async fn stream(
        &self,
        host: &str,
        mut held: BTreeMap<Name, Option<Bits>>,
        mut snapshot: bool,
        legacy: bool,
        tx: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    ) {
        let gone = || Status::not_found(format!("host {host} was deleted"));
        let Some(mut changes) = self.store.shared.read().await.shares.subscribe(host) else {
            let _ = tx.send(Err(gone())).await;
            return;
        };
        // The revision the agent's share is known to be current at; 0: a
        // whole comparison is due.
        let mut sent = 0u64;
        let mut stopping = self.stopping.clone();
        loop {
            let msg = {
                let shared = self.store.shared.read().await;
                let Some(share) = shared.shares.host(host) else {
                    drop(shared);
                    let _ = tx.send(Err(gone())).await;
                    return;
                };
                let names = if sent == 0 || legacy {
                    None
                } else {
                    share.changed_since(sent)
                };
                let earlier_form;
                let resources = if legacy {
                    earlier_form = crate::slice::legacy_share(&share.resources);
                    &earlier_form
                } else {
                    &share.resources
                };
                // What to send, with the share's own copy of each name.
                let (upserts, removals): (Vec<(Name, &pb::Resource)>, Vec<Name>) = match names {
                    // What changed since the last message.
                    Some(names) => {
                        let mut up = Vec::new();
                        let mut rm = Vec::new();
                        for n in names {
                            match resources.get_key_value(&n) {
                                Some((k, r)) if !same_version(held.get(&n), &r.version) => {
                                    up.push((k.clone(), r.as_ref()))
                                }
                                Some(_) => {}
                                None if held.contains_key(&n) => rm.push(n),
                                None => {}
                            }
                        }
                        (up, rm)
                    }
                    // The whole share against what the agent holds.
                    None => {
                        let up = resources
                            .iter()
                            .filter(|(n, r)| !same_version(held.get(*n), &r.version))
                            .map(|(n, r)| (n.clone(), r.as_ref()))
                            .collect();
                        let rm = held.keys().filter(|n| !resources.contains_key(*n)).cloned().collect();
                        (up, rm)
                    }
                };
                let revision = shared.revision;
                let due = snapshot || !upserts.is_empty() || !removals.is_empty() || sent == 0;
                sent = revision;
                for (n, r) in &upserts {
                    held.insert(n.clone(), version_bits(&r.version));
                }
                for n in &removals {
                    held.remove(n);
                }
                due.then(|| pb::WatchResponse {
                    revision,
                    snapshot,
                    upserts: upserts.into_iter().map(|(_, r)| r.clone()).collect(),
                    removals: removals.iter().map(|n| n.to_string()).collect(),
                })
            };
            if let Some(msg) = msg {
                if tx.send(Ok(msg)).await.is_err() {
                    return;
                }
                snapshot = false;
            }
            tokio::select! {
                r = changes.changed() => if r.is_err() {
                    // The host was deleted (or its share rebuilt without it).
                    let _ = tx.send(Err(gone())).await;
                    return;
                },
                _ = tx.closed() => return,
                _ = stopped(&mut stopping) => {
                    let _ = tx.send(Err(Status::unavailable("the controller is stopping"))).await;
                    return;
                }
            }
        }
    }
}

/// A resource version's 256 bits, as bytes: a stream keeps one per resource
/// its agent holds, so it is kept as bytes (33 with its `Option`), not as
/// its 64 characters of text.
type Bits = [u8; 32];

/// A resource version as its 256 bits; `None` for a version this release
/// does not write (an agent may hold one of an earlier release): only the
/// 64 lowercase hex digits it writes, so that equal bits mean equal text.
fn version_bits(v: &str) -> Option<Bits> {
    let digit = |b: u8| match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    };
    let v = v.as_bytes();
    if v.len() != 64 {
        return None;
    }
    let mut bits = [0u8; 32];
    for (i, pair) in v.chunks_exact(2).enumerate() {
        bits[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(bits)
}

/// Whether the agent holds this version of a resource.
fn same_version(held: Option<&Option<Bits>>, version: &str) -> bool {
    matches!(held, Some(Some(bits)) if version_bits(version) == Some(*bits))
}

/// Resolves once the controller is stopping.
async fn stopped(rx: &mut tokio::sync::watch::Receiver<bool>) {
    loop {
        let now = *rx.borrow_and_update();
        if now || rx.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A held version counts only when it is this release's 256 bits and
    /// equal; anything else (an earlier release's 64- or 128-bit version,
    /// text that is not lowercase hex, no version) makes the resource go
    /// again.
    #[test]
    fn only_an_equal_version_counts_as_held() {
        let v = "0123456789abcdef0123456789abcdef00112233445566778899aabbccddeeff";
        let mut want = [0u8; 32];
        want[..16].copy_from_slice(&0x0123456789abcdef0123456789abcdef_u128.to_be_bytes());
        want[16..].copy_from_slice(&0x00112233445566778899aabbccddeeff_u128.to_be_bytes());
        assert_eq!(version_bits(v), Some(want));
        // What the controller writes reads back as what it wrote.
        let r = crate::slice::resource(
            "members/g",
            pb::resource::Kind::GroupMembers(pb::GroupMembers::default()),
        );
        assert_eq!(r.version.len(), 64);
        assert!(same_version(Some(&version_bits(&r.version)), &r.version));
        assert!(same_version(Some(&version_bits(v)), v));
        assert!(!same_version(
            Some(&version_bits(v)),
            "0123456789abcdef0123456789abcdef00112233445566778899aabbccddeefe"
        ));
        assert!(!same_version(None, v));
        assert!(!same_version(Some(&None), v));
        assert_eq!(
            version_bits("0123456789abcdef"),
            None,
            "a version of an earlier release"
        );
        assert_eq!(
            version_bits("0123456789abcdef0123456789abcdef"),
            None,
            "a 128-bit version of an earlier release"
        );
        assert_eq!(
            version_bits("zz23456789abcdef0123456789abcdef00112233445566778899aabbccddeeff"),
            None
        );
        assert!(!same_version(Some(&version_bits("x")), "x"));
        // Text the controller never writes, though it reads as the same
        // number, is not the same version.
        assert_eq!(
            version_bits("0123456789ABCDEF0123456789abcdef00112233445566778899aabbccddeeff"),
            None
        );
        assert_eq!(
            version_bits("+123456789abcdef0123456789abcdef00112233445566778899aabbccddeeff"),
            None
        );
        // Multi-byte text of the right length is refused, not split.
        assert_eq!(version_bits(&"é".repeat(32)), None);
    }
}
