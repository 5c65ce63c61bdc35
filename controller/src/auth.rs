//! Who may do what: every request's caller comes from its connection (a
//! certificate, or the local socket's user id), never from what the
//! request says; every operation of a batch is checked against the
//! caller's role before any is written.
//!
//! | role | may |
//! |---|---|
//! | platform | tenants, VPCs, subnets, hosts, ports; load balancers exposed to their VPC only (with their HTTP listeners); certificates; virtual IPs held by ports; read everything |
//! | admin | every other kind (zones, exchange paths, firewalls, quarantines, security groups, peerings, load balancers, virtual IPs); read everything; cluster membership |
//! | tenant | its own tenant's security groups, load balancers exposed to their VPC only (with their HTTP listeners), certificates, and virtual IPs held by its ports; read its own tenant's objects and the audit records it made |
//! | supervisor | read everything, the audit log and enforcement; change nothing |
//! | agent | `Register`, `Watch`, `Ack` for the host its certificate names |
//! | replica | the Raft and cluster services, and requests it forwards for a caller |
//!
//! A load balancer exposed to its zone, and its listeners, are an
//! administrator's alone: exposing a VIP to a zone opens it as an exchange
//! path does. So is a virtual IP held by hosts: it says which hosts answer
//! for such a VIP on the zone.
//!
//! A replica that forwards a caller's request to the leader says whom it
//! acts for (`sdn-on-behalf-of`); only a replica's word is taken for it.
//! A refusal is `PERMISSION_DENIED`, naming the operation and the role,
//! and is logged as a security event.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};

use sdn_policies::{Exposure, Kind, LoadBalancer, Op, State, VirtualIp};
use sdn_proto::tls::{Identity, Peer, Role};
use tonic::{Request, Status};

/// Set on a request a replica forwards: the identity it acts for.
pub const ON_BEHALF_OF: &str = "sdn-on-behalf-of";
/// Set on a request a replica forwards, so it is never forwarded twice.
pub const FORWARDED: &str = "sdn-forwarded";

/// Whether `req` came forwarded by another replica.
pub fn forwarded<T>(req: &Request<T>) -> bool {
    req.metadata().get(FORWARDED).is_some()
}

static INSECURE: AtomicBool = AtomicBool::new(false);

/// Whether callers without an identity may do anything (`--insecure`).
pub fn set_insecure(v: bool) {
    INSECURE.store(v, Ordering::Relaxed);
}

fn insecure() -> bool {
    INSECURE.load(Ordering::Relaxed)
}

/// The caller of one request.
#[derive(Clone, Debug)]
pub struct Caller {
    /// `None`: unauthenticated, which only `--insecure` lets in.
    pub identity: Option<Identity>,
    /// The replica that forwarded the request, if one did.
    pub via: Option<Identity>,
    /// What the audit log records.
    pub actor: String,
}

impl Caller {
    /// The caller of `req`.
    pub fn of<T>(req: &Request<T>) -> Result<Caller, Status> {
        let peer = req.extensions().get::<Peer>().cloned();
        let mut identity = peer.as_ref().and_then(|p| p.identity.clone());
        let mut via = None;
        let mut actor = peer
            .as_ref()
            .map(Peer::actor)
            .unwrap_or_else(|| "unauthenticated".into());
        if let Some(v) = req.metadata().get(ON_BEHALF_OF) {
            let uri = v
                .to_str()
                .map_err(|_| Status::invalid_argument(format!("{ON_BEHALF_OF}: not text")))?;
            match &identity {
                Some(id) if id.role == Role::Replica => {
                    let on_behalf = Identity::parse_uri(uri)
                        .map_err(|e| Status::invalid_argument(format!("{ON_BEHALF_OF}: {e}")))?;
                    actor = on_behalf.uri();
                    via = identity.replace(on_behalf);
                }
                Some(id) => {
                    return Err(refuse(
                        &format!("acting on behalf of {uri}"),
                        id,
                        "only a replica forwards requests",
                    ));
                }
                None if insecure() => {
                    // Without authentication anyone may claim anything:
                    // keep what the forwarding replica says for the audit.
                    if let Ok(on_behalf) = Identity::parse_uri(uri) {
                        actor = on_behalf.uri();
                        identity = Some(on_behalf);
                    }
                }
                None => return Err(Status::unauthenticated("no identity")),
            }
        }
        if let Some(exp) = peer.as_ref().and_then(|p| p.expires) {
            if std::time::Instant::now() >= exp {
                tracing::warn!(target: "sdn::security", caller = %actor, "refused: the connection's certificate expired");
                let (role, tenant) = match &identity {
                    Some(id) => (id.role.name(), id.tenant.as_deref()),
                    None => ("none", None),
                };
                crate::refusals::note(&actor, role, "the connection's certificate expired", tenant);
                return Err(Status::unauthenticated(
                    "the certificate this connection was opened with has expired: reconnect with a valid one",
                ));
            }
        }
        if identity.is_none() && !insecure() {
            let local = match peer.as_ref().and_then(|p| p.uid) {
                Some(uid) => format!(" (a local caller of user id {uid}, for which no --unix-role is set)"),
                None => String::new(),
            };
            tracing::warn!(target: "sdn::security", caller = %actor, "refused: no identity");
            crate::refusals::note(&actor, "none", &format!("no identity{local}"), None);
            return Err(Status::unauthenticated(format!(
                "no identity{local}: connect with a certificate of the cluster's CA"
            )));
        }
        Ok(Caller { identity, via, actor })
    }

    /// The caller's role; `None` when unauthenticated under `--insecure`
    /// (allowed everything).
    pub fn role(&self) -> Option<Role> {
        self.identity.as_ref().map(|i| i.role)
    }

    /// Allows `op` to the roles given.
    pub fn require(&self, op: &str, roles: &[Role]) -> Result<(), Status> {
        match &self.identity {
            None => Ok(()),
            Some(id) if roles.contains(&id.role) => Ok(()),
            Some(id) => Err(refuse(op, id, "")),
        }
    }

    /// The metadata value a forwarded request carries.
    pub fn on_behalf(&self) -> Option<String> {
        self.identity.as_ref().map(Identity::uri)
    }

    /// The tenant whose objects alone this caller sees, if it is limited
    /// to one.
    pub fn tenant(&self) -> Option<&str> {
        match &self.identity {
            Some(Identity {
                role: Role::Tenant,
                tenant: Some(t),
                ..
            }) => Some(t),
            _ => None,
        }
    }

    /// Checks every operation of a batch before any is written.
    pub fn check_batch(&self, ops: &[Op], state: &State) -> Result<(), Status> {
        let Some(id) = &self.identity else { return Ok(()) };
        let batch = BatchLbs::of(ops);
        for (i, op) in ops.iter().enumerate() {
            let (kind, obj) = op.key();
            let what = format!("operations[{i}].{} {} {obj}", op.field(), kind.name());
            let tenant = id.tenant.as_deref().unwrap_or_default();
            let ok = match id.role {
                Role::Platform => {
                    platform_kind(kind)
                        || (lb_kind(kind) && !batch.zone_exposed(op, state))
                        || (kind == Kind::VirtualIp && !vip_host_held(op, state))
                        || kind == Kind::Certificate
                }
                Role::Admin => !platform_kind(kind),
                Role::Tenant => tenant_may_write(tenant, op, &batch, state),
                Role::Supervisor | Role::Agent | Role::Replica => false,
            };
            if !ok {
                // The exposure is named only to whom the load balancer is
                // its own (or the platform): another tenant learns nothing
                // of it.
                let own = || batch.touched(op, state).iter().all(|l| l.tenant_id == tenant);
                let exposed = lb_kind(kind)
                    && batch.zone_exposed(op, state)
                    && (id.role == Role::Platform || (id.role == Role::Tenant && own()));
                let hosts_vip = kind == Kind::VirtualIp
                    && vip_host_held(op, state)
                    && (id.role == Role::Platform || (id.role == Role::Tenant && vip_own(tenant, op, state)));
                let why = match id.role {
                    _ if hosts_vip => "a virtual ip held by hosts is an administrator's to change".into(),
                    _ if exposed => {
                        "a load balancer exposed to its zone, and its listeners, are an administrator's to change"
                            .into()
                    }
                    Role::Tenant => {
                        format!(
                            "a tenant changes only its own tenant's security groups, load balancers, certificates and virtual ips ({tenant})"
                        )
                    }
                    Role::Platform => {
                        "the platform provisions tenants, VPCs, subnets, hosts, ports, certificates and virtual ips held by ports"
                            .into()
                    }
                    Role::Admin => "the platform provisions tenants, VPCs, subnets, hosts and ports".into(),
                    _ => "this role changes nothing".into(),
                };
                return Err(refuse(&what, id, &why));
            }
        }
        Ok(())
    }
}

/// What the platform provisions.
fn platform_kind(kind: Kind) -> bool {
    matches!(kind, Kind::Tenant | Kind::Vpc | Kind::Subnet | Kind::Host | Kind::Port)
}

/// The load balancers' kinds.
fn lb_kind(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::LoadBalancer | Kind::Pool | Kind::Listener | Kind::Member | Kind::HttpListener
    )
}

/// The load balancers and pools a batch puts, as it leaves them (the last
/// put of an id wins), looked up once per batch.
struct BatchLbs<'a> {
    lbs: HashMap<&'a str, &'a LoadBalancer>,
    pools: HashMap<&'a str, &'a str>,
}

impl<'a> BatchLbs<'a> {
    fn of(ops: &'a [Op]) -> BatchLbs<'a> {
        let mut b = BatchLbs {
            lbs: HashMap::new(),
            pools: HashMap::new(),
        };
        for o in ops {
            match o {
                Op::PutLoadBalancer(l) => {
                    b.lbs.insert(&l.id, l);
                }
                Op::PutPool(p) => {
                    b.pools.insert(&p.id, &p.load_balancer_id);
                }
                _ => {}
            }
        }
        b
    }

    /// Load balancer `id` as the batch leaves it, else as it is now.
    fn lb(&self, id: &str, state: &'a State) -> Option<&'a LoadBalancer> {
        self.lbs.get(id).copied().or_else(|| state.load_balancers.get(id))
    }

    /// The load balancer of pool `id`, as the batch leaves it or as it is.
    fn pool_lb(&self, id: &str, state: &'a State) -> Option<&'a str> {
        self.pools
            .get(id)
            .copied()
            .or_else(|| state.pools.get(id).map(|p| p.load_balancer_id.as_str()))
    }

    /// Every load balancer an operation of the load balancers' kinds
    /// touches: the one it names, and the one its object belongs to now.
    fn touched(&self, op: &'a Op, state: &'a State) -> Vec<&'a LoadBalancer> {
        let named: Option<&str> = match op {
            Op::PutLoadBalancer(l) => {
                return [Some(l), state.load_balancers.get(&l.id)]
                    .into_iter()
                    .flatten()
                    .collect()
            }
            Op::PutPool(p) => Some(&p.load_balancer_id),
            Op::PutListener(l) => Some(&l.load_balancer_id),
            Op::PutHttpListener(l) => Some(&l.load_balancer_id),
            Op::PutMember(m) => self.pool_lb(&m.pool_id, state),
            _ => None,
        };
        let (kind, id) = op.key();
        let now = state.lb_of(kind, id);
        named.and_then(|n| self.lb(n, state)).into_iter().chain(now).collect()
    }

    /// Whether an operation changes what a zone reaches: a load balancer
    /// exposed to its zone (before or after), or one of its listeners.
    fn zone_exposed(&self, op: &'a Op, state: &'a State) -> bool {
        let (kind, _) = op.key();
        if !matches!(kind, Kind::LoadBalancer | Kind::Listener | Kind::HttpListener) {
            return false;
        }
        self.touched(op, state).iter().any(|l| l.exposure == Exposure::Zone)
    }
}

/// A tenant writes security groups and load balancers of its own: the
/// object it puts is its own, and so is the object the id names now, if
/// any (or it would take another tenant's by its id). A load balancer's
/// pool, listener or member is its load balancer's tenant's.
fn tenant_may_write<'a>(tenant: &str, op: &'a Op, batch: &BatchLbs<'a>, state: &'a State) -> bool {
    let owned_now = |id: &str| state.security_groups.get(id).map(|g| g.tenant_id == tenant);
    let (kind, _) = op.key();
    if lb_kind(kind) {
        return !batch.zone_exposed(op, state) && batch.touched(op, state).iter().all(|l| l.tenant_id == tenant);
    }
    if kind == Kind::VirtualIp {
        return !vip_host_held(op, state) && vip_own(tenant, op, state);
    }
    let certificate_now = |id: &str| state.certificates.get(id).map(|c| c.tenant_id == tenant);
    match op {
        Op::PutCertificate(c) => c.tenant_id == tenant && certificate_now(&c.id).unwrap_or(true),
        Op::Delete {
            kind: Kind::Certificate,
            id,
        } => certificate_now(id) == Some(true),
        Op::PutSecurityGroup(g) => g.tenant_id == tenant && owned_now(&g.id).unwrap_or(true),
        Op::Delete {
            kind: Kind::SecurityGroup,
            id,
        } => owned_now(id) == Some(true),
        _ => false,
    }
}

/// The virtual IP an operation puts, and the one its id names now.
fn vips_touched<'a>(op: &'a Op, state: &'a State) -> impl Iterator<Item = &'a VirtualIp> {
    let put = match op {
        Op::PutVirtualIp(v) => Some(v),
        _ => None,
    };
    let (_, id) = op.key();
    put.into_iter().chain(state.virtual_ips.get(id))
}

/// Whether a virtual IP's operation puts or changes one held by hosts.
fn vip_host_held(op: &Op, state: &State) -> bool {
    vips_touched(op, state).any(VirtualIp::host_held)
}

/// Whether every virtual IP an operation touches is `tenant`'s (and a
/// delete names one that exists).
fn vip_own(tenant: &str, op: &Op, state: &State) -> bool {
    let mut n = 0;
    vips_touched(op, state).all(|v| {
        n += 1;
        v.tenant_id == tenant
    }) && n > 0
}

/// A refusal, logged as a security event.
pub fn refuse(op: &str, id: &Identity, why: &str) -> Status {
    tracing::warn!(target: "sdn::security", caller = %id.uri(), role = id.role.name(), op, reason = why, "refused");
    let mut msg = format!("{op}: not allowed for role {} ({})", id.role.name(), id.uri());
    if !why.is_empty() {
        msg.push_str(": ");
        msg.push_str(why);
    }
    crate::refusals::note(&id.uri(), id.role.name(), &msg, id.tenant.as_deref());
    Status::permission_denied(msg)
}

/// The roles that read the whole state, the audit log and enforcement.
pub const READERS: &[Role] = &[Role::Platform, Role::Admin, Role::Supervisor];

/// A request forwarded to the leader for `caller`, saying whom the
/// forwarding replica acts for.
pub fn forward<T>(msg: T, caller: &Caller) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut().insert(FORWARDED, "1".parse().expect("ascii"));
    if let Some(v) = caller.on_behalf().and_then(|u| u.parse().ok()) {
        r.metadata_mut().insert(ON_BEHALF_OF, v);
    }
    r
}
