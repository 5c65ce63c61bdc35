//! Typed objects of the network model. Text from the API or from YAML is
//! parsed into these types once, at the edge; the parse error names the field.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnetwork::{IpNetwork, Ipv4Network, Ipv6Network};
use serde::{Deserialize, Serialize};

/// A tenant: one government department.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tenant {
    pub id: String,
    pub name: String,
}

/// A tenant's VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vpc {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// VXLAN network identifier; 0 in a request asks the store to pick one.
    #[serde(default)]
    pub vni: u32,
    /// The zone whose uplink carries the VPC's north-south traffic; empty:
    /// an isolated VPC with no uplink.
    #[serde(default)]
    pub zone_id: String,
    /// The border firewall between the VPC and its zone's uplink; empty: none
    /// (zone isolation and security groups still apply).
    #[serde(default)]
    pub border_policy_id: String,
}

/// Allow or deny.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

/// One rule of a firewall policy. The lowest priority number is checked
/// first; the first rule that matches decides.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallRule {
    pub id: String,
    pub priority: u32,
    pub action: Action,
    /// Seen from the VPC: ingress comes from outside, egress goes out.
    pub direction: Direction,
    pub ether_type: EtherType,
    pub protocol: Protocol,
    /// Destination ports (ICMP types), inclusive; `None`: all.
    pub ports: Option<(u16, u16)>,
    /// The outside address range; `None`: any of the family.
    pub remote: Option<IpNetwork>,
}

/// An administrators' firewall policy: ordered allow/deny rules and what
/// happens when none matches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FirewallPolicy {
    pub id: String,
    pub name: String,
    pub default_action: Action,
    pub rules: Vec<FirewallRule>,
}

/// Two VPCs joined: each reaches the other's addresses directly, through
/// the VPC firewall `policy_id` if given. Its rules read from `vpc_a`'s side:
/// ingress comes from `vpc_b`, egress goes to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VpcPeering {
    pub id: String,
    pub vpc_a: String,
    pub vpc_b: String,
    #[serde(default)]
    pub policy_id: String,
}

/// Which way of a port's traffic a mirror session copies, seen from the
/// port: `in` reaches the VM, `out` leaves it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorDirection {
    In,
    Out,
    Both,
}

/// A filter of a mirror session: a packet matches if each given part does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorRule {
    pub protocol: Protocol,
    /// `None`: any source.
    pub source: Option<IpNetwork>,
    /// `None`: any destination.
    pub destination: Option<IpNetwork>,
    /// Destination ports, inclusive (TCP and UDP only); `None`: all.
    pub ports: Option<(u16, u16)>,
}

/// Where a mirror session's copies go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MirrorDestination {
    /// A supervisor's port on this cloud: copies from its host go to it
    /// directly, from other hosts over the underlay in VXLAN with `vni`.
    Tap { port_id: String, vni: u32 },
    /// A collector over VXLAN (UDP to `port`, 4789 by default), the copies
    /// under `vni`.
    Vxlan { remote: IpAddr, vni: u32, port: u16 },
    /// A collector over GRE with ERSPAN type II or III (`version` 2 or 3),
    /// `session` its session id (10 bits).
    Erspan { remote: IpAddr, version: u8, session: u16 },
}

/// Copies of the traffic of some ports, for a supervisor. Mirroring never
/// changes or delays the traffic it copies: copies over the session's rate
/// or that its destination cannot take are dropped and counted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MirrorSession {
    pub id: String,
    /// What is mirrored: the ports of one zone's VPCs, of one tenant, of
    /// one VPC, or one port (at most one of the four; none: every port).
    pub zone_id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub port_id: String,
    /// Only packets that match one of these (none: every packet).
    pub rules: Vec<MirrorRule>,
    pub direction: MirrorDirection,
    /// One packet in this many (0 or 1: every packet).
    pub sample: u32,
    /// Bytes of each packet copied (0: the whole packet).
    pub snap_len: u32,
    /// Copies a second at most, on each host (0: the default, 100,000).
    pub rate_pps: u32,
    pub destination: MirrorDestination,
}

impl MirrorSession {
    /// The rate in force.
    pub fn rate(&self) -> u32 {
        if self.rate_pps == 0 {
            100_000
        } else {
            self.rate_pps
        }
    }

    /// The VNI its copies travel under, if any.
    pub fn vni(&self) -> Option<u32> {
        match &self.destination {
            MirrorDestination::Tap { vni, .. } | MirrorDestination::Vxlan { vni, .. } => Some(*vni),
            MirrorDestination::Erspan { .. } => None,
        }
    }

    /// What it selects, for messages.
    pub fn scope(&self) -> String {
        for (what, id) in [
            ("zone", &self.zone_id),
            ("tenant", &self.tenant_id),
            ("vpc", &self.vpc_id),
            ("port", &self.port_id),
        ] {
            if !id.is_empty() {
                return format!("{what} {id}");
            }
        }
        "every port".into()
    }
}

/// The bandwidth an information system has towards one zone, in bits a
/// second each way: `up` leaves the system for the zone, `down` comes in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemBandwidth {
    pub zone_id: String,
    pub up_bps: u64,
    pub down_bps: u64,
}

/// An information system: a set of ports, given one by one or as whole
/// VPCs, whose traffic with each zone (the extranet, the internet) the
/// supervisor sees as peaks per interval, with an event when it crosses a
/// share of the system's bandwidth.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InformationSystem {
    pub id: String,
    pub name: String,
    /// Every port of these VPCs is the system's.
    pub vpc_ids: Vec<String>,
    /// And these ports (of other VPCs).
    pub port_ids: Vec<String>,
    pub bandwidth: Vec<SystemBandwidth>,
    /// The share of a bandwidth, in percent, whose crossing sends an event
    /// (0: the default, 80).
    pub alert_percent: u32,
    /// The length of a peak's interval in seconds (0: the default, 60).
    pub interval_secs: u32,
}

impl InformationSystem {
    /// The share in force, in percent.
    pub fn alert(&self) -> u32 {
        if self.alert_percent == 0 {
            SYSTEM_ALERT_DEFAULT
        } else {
            self.alert_percent
        }
    }

    /// The interval in force, in seconds.
    pub fn interval(&self) -> u32 {
        if self.interval_secs == 0 {
            SYSTEM_INTERVAL_DEFAULT
        } else {
            self.interval_secs
        }
    }
}

/// An information system's alert share by default, in percent.
pub const SYSTEM_ALERT_DEFAULT: u32 = 80;
/// An information system's peak interval: by default, the least and the
/// most, in seconds.
pub const SYSTEM_INTERVAL_DEFAULT: u32 = 60;
pub const SYSTEM_INTERVAL_MIN: u32 = 5;
pub const SYSTEM_INTERVAL_MAX: u32 = 3600;
/// VPCs and ports one system lists, at most.
pub const SYSTEM_MEMBERS_MAX: usize = 4096;

/// Who reaches a load balancer's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Exposure {
    /// The VPC's own ports (east-west): translated on each client's host.
    Vpc,
    /// Also the VPC's zone, through its uplink (north-south): translated
    /// with full NAT on the load balancer's hosts. An administrator's
    /// decision, as an exchange path is.
    Zone,
}

impl Exposure {
    pub fn name(self) -> &'static str {
        match self {
            Exposure::Vpc => "vpc",
            Exposure::Zone => "zone",
        }
    }
}

/// A host that carries a load balancer's north-south flows, and the
/// addresses of the VPC those flows leave it from towards the members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NatHost {
    pub host_id: String,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
}

/// A tenant's L4 load balancer: virtual addresses in one VPC, whose
/// listeners spread flows over pools of members.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadBalancer {
    pub id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub name: String,
    /// The virtual addresses, in the VPC's subnets (at least one).
    pub vip_v4: Option<Ipv4Addr>,
    pub vip_v6: Option<Ipv6Addr>,
    pub exposure: Exposure,
    /// With zone exposure: the hosts that translate flows from the zone
    /// (at least one), each with a source address for every VIP family.
    pub nat_hosts: Vec<NatHost>,
}

impl LoadBalancer {
    /// The VIPs, IPv4 first.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vip_v4
            .map(IpAddr::V4)
            .into_iter()
            .chain(self.vip_v6.map(IpAddr::V6))
    }

    /// Every address of the VPC the load balancer takes: its VIPs and its
    /// hosts' NAT addresses.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vips().chain(
            self.nat_hosts
                .iter()
                .flat_map(|h| h.ipv4.map(IpAddr::V4).into_iter().chain(h.ipv6.map(IpAddr::V6))),
        )
    }
}

/// What holds a virtual IP: a tenant VM's port (the VM runs VRRP itself,
/// keepalived for instance) or a load balancer's NAT host (its agent runs
/// VRRP on the host's zone uplink).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VipHolderTarget {
    Port(String),
    Host(String),
}

/// One holder of a virtual IP and its VRRP priority: the highest live one
/// owns the address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VipHolder {
    pub target: VipHolderTarget,
    /// 1 to 254 (255 is VRRP's address owner, 0 its resignation); no two
    /// holders of one virtual IP share one.
    pub priority: u8,
}

/// A highly available address of a VPC: one holder at a time owns it, and
/// another takes it over within a second when the owner fails.
///
/// Held by ports, the address floats between tenant VMs that elect its
/// owner with VRRP among themselves; the dataplane carries their VRRP and
/// moves the address to the VM that speaks for it. Held by hosts, the
/// address is a VIP of a load balancer exposed to its zone, and the NAT
/// hosts elect among themselves which one answers for it on the zone.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtualIp {
    pub id: String,
    pub tenant_id: String,
    pub vpc_id: String,
    pub name: String,
    /// The addresses (at least one).
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    /// The VRRP virtual router id, 1 to 255: one per VPC (held by ports)
    /// or per zone (held by hosts).
    pub vrid: u8,
    /// One to [`VIP_HOLDERS_MAX`] holders, all ports or all hosts.
    pub holders: Vec<VipHolder>,
    /// Whether a holder of higher priority takes the address back from a
    /// live owner of lower priority.
    pub preempt: bool,
    /// The VRRP advertisement interval in centiseconds, 1 to 4095.
    pub advert_interval_cs: u16,
    /// The highest ownership epoch the controller granted (0: none yet).
    /// Each grant to a holder that wins VRRP takes the next one, committed
    /// in the log; agents act only for the highest they have seen.
    #[serde(default)]
    pub epoch: u64,
    /// The holder the last epoch went to (`None`: none yet, or it is no
    /// longer a holder).
    #[serde(default)]
    pub owner: Option<VipHolderTarget>,
    /// When the last epoch was granted (Unix ms, the controller's clock).
    #[serde(default)]
    pub owner_since_unix_ms: u64,
    /// The lease the last epoch was granted with (ms): a new leader waits
    /// at least this long, whatever the interval is now.
    #[serde(default)]
    pub owner_lease_ms: u32,
    /// This put is the controller's grant of the next epoch to `owner`:
    /// it changes the stored virtual IP's epoch and owner alone, and only
    /// while `owner` still holds it. Never stored as true.
    #[serde(default)]
    pub claim: bool,
}

/// Holders of one virtual IP, at most.
pub const VIP_HOLDERS_MAX: usize = 8;
/// The advertisement interval when none is given: 100 ms.
pub const VIP_ADVERT_INTERVAL_CS_DEFAULT: u16 = 10;

impl VirtualIp {
    /// The addresses, IPv4 first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4.map(IpAddr::V4).into_iter().chain(self.ipv6.map(IpAddr::V6))
    }

    /// Whether hosts hold it (else ports do).
    pub fn host_held(&self) -> bool {
        self.holders
            .first()
            .is_some_and(|h| matches!(h.target, VipHolderTarget::Host(_)))
    }
}

impl VipHolderTarget {
    pub fn describe(&self) -> String {
        match self {
            VipHolderTarget::Port(p) => format!("port {p}"),
            VipHolderTarget::Host(h) => format!("host {h}"),
        }
    }
}

/// The transport a listener balances.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbProtocol {
    Tcp,
    Udp,
}

impl LbProtocol {
    pub fn number(self) -> u8 {
        match self {
            LbProtocol::Tcp => 6,
            LbProtocol::Udp => 17,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LbProtocol::Tcp => "tcp",
            LbProtocol::Udp => "udp",
        }
    }
}

/// How a listener picks a member for a new flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scheduler {
    RoundRobin,
    /// Smooth weighted round robin (nginx's): each member in proportion
    /// to its weight, spread out rather than in runs.
    WeightedRoundRobin,
    LeastConnections,
    /// IPVS's: the fewest open flows for its weight.
    WeightedLeastConnections,
    /// Maglev consistent hashing of the flow's addresses and ports, with
    /// weights: every host picks the same member for a flow.
    Maglev,
}

impl Scheduler {
    pub const ALL: [Scheduler; 5] = [
        Scheduler::RoundRobin,
        Scheduler::WeightedRoundRobin,
        Scheduler::LeastConnections,
        Scheduler::WeightedLeastConnections,
        Scheduler::Maglev,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scheduler::RoundRobin => "round_robin",
            Scheduler::WeightedRoundRobin => "weighted_round_robin",
            Scheduler::LeastConnections => "least_connections",
            Scheduler::WeightedLeastConnections => "weighted_least_connections",
            Scheduler::Maglev => "maglev",
        }
    }

    pub fn from_name(s: &str) -> Option<Scheduler> {
        Scheduler::ALL.into_iter().find(|x| x.name() == s)
    }
}

/// A port of a load balancer's VIPs: new flows to it go to a member of its
/// pool, picked on the flow's first packet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listener {
    pub id: String,
    pub load_balancer_id: String,
    pub protocol: LbProtocol,
    pub port: u16,
    pub pool_id: String,
    pub scheduler: Scheduler,
    /// Source-address persistence: a client's new flows go to the member
    /// its last flow went to, until this many seconds after that flow was
    /// last seen (0: none).
    pub persistence_secs: u32,
}

/// A TLS certificate and its private key, for its tenant's HTTPS
/// listeners. `names` and `not_after_unix` are read from the certificate
/// when it is taken in; the key is never given back.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    /// PEM: the certificate, then its chain.
    pub cert_pem: String,
    /// PEM: its private key.
    pub key_pem: String,
    /// Its subject alternative names (DNS), else its common name.
    pub names: Vec<String>,
    /// When it expires (Unix seconds).
    pub not_after_unix: i64,
}

/// A certificate's PEM text (with its chain), at most.
pub const CERTIFICATE_PEM_MAX: usize = 64 * 1024;
/// A private key's PEM text, at most.
pub const KEY_PEM_MAX: usize = 16 * 1024;

/// HTTP or HTTPS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpProtocol {
    Http,
    Https,
}

impl HttpProtocol {
    pub fn name(self) -> &'static str {
        match self {
            HttpProtocol::Http => "http",
            HttpProtocol::Https => "https",
        }
    }
}

/// How an HTTP listener picks a member of a pool for a request.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpScheduler {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    /// A consistent hash of this request header's value (weighted).
    HashHeader(String),
    /// The same, of this cookie's value.
    HashCookie(String),
}

impl HttpScheduler {
    pub fn name(&self) -> &'static str {
        match self {
            HttpScheduler::RoundRobin => "round_robin",
            HttpScheduler::WeightedRoundRobin => "weighted_round_robin",
            HttpScheduler::LeastConnections => "least_connections",
            HttpScheduler::HashHeader(_) => "hash_header",
            HttpScheduler::HashCookie(_) => "hash_cookie",
        }
    }

    /// A scheduler from its name (none: round robin) and the key a hash
    /// scheduler hashes. An error says which of the two is wrong, and why.
    pub fn parse(name: Option<&str>, key: Option<String>) -> Result<HttpScheduler, (HttpSchedulerField, String)> {
        match (name.unwrap_or("round_robin"), key) {
            ("round_robin", None) => Ok(HttpScheduler::RoundRobin),
            ("weighted_round_robin", None) => Ok(HttpScheduler::WeightedRoundRobin),
            ("least_connections", None) => Ok(HttpScheduler::LeastConnections),
            ("hash_header", Some(k)) => Ok(HttpScheduler::HashHeader(k)),
            ("hash_cookie", Some(k)) => Ok(HttpScheduler::HashCookie(k)),
            ("hash_header" | "hash_cookie", None) => Err((
                HttpSchedulerField::Key,
                "a hash scheduler needs the header or cookie to hash".into(),
            )),
            ("round_robin" | "weighted_round_robin" | "least_connections", Some(_)) => Err((
                HttpSchedulerField::Key,
                "only hash_header and hash_cookie hash a key".into(),
            )),
            (o, _) => Err((
                HttpSchedulerField::Name,
                format!(
                    "must be one of round_robin, weighted_round_robin, least_connections, hash_header, hash_cookie, got {o:?}"
                ),
            )),
        }
    }

    /// The header or cookie hashed on (empty for the others).
    pub fn key(&self) -> &str {
        match self {
            HttpScheduler::HashHeader(k) | HttpScheduler::HashCookie(k) => k,
            _ => "",
        }
    }
}

/// Which part of an HTTP scheduler [`HttpScheduler::parse`] refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HttpSchedulerField {
    Name,
    Key,
}

/// Cookie persistence, as haproxy's `cookie NAME insert` or a learned
/// session cookie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpCookie {
    pub name: String,
    pub mode: HttpCookieMode,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HttpCookieMode {
    Insert,
    Learn,
}

impl HttpCookieMode {
    pub fn name(self) -> &'static str {
        match self {
            HttpCookieMode::Insert => "insert",
            HttpCookieMode::Learn => "learn",
        }
    }
}

/// The PROXY protocol's version towards members.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProxyProtocol {
    V1,
    V2,
}

impl ProxyProtocol {
    pub fn name(self) -> &'static str {
        match self {
            ProxyProtocol::V1 => "v1",
            ProxyProtocol::V2 => "v2",
        }
    }
}

/// What a matching HTTP rule does.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HttpAction {
    /// To a pool of the load balancer.
    Pool(String),
    Redirect {
        location: String,
        status: u16,
    },
    Respond {
        status: u16,
        body: String,
        content_type: Option<String>,
    },
}

/// A forwarding rule: every condition given must hold.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpRule {
    pub name: String,
    pub host: Option<String>,
    pub path_prefix: Option<String>,
    pub path_regex: Option<String>,
    /// A header's name, and the value it must have if one is given.
    pub header: Option<(String, Option<String>)>,
    pub method: Option<String>,
    pub action: HttpAction,
}

/// An HTTP or HTTPS listener of a load balancer: its VIPs' `port` reaches
/// the proxies on `proxy_ports`, which route each request by `rules`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpListener {
    pub id: String,
    pub load_balancer_id: String,
    pub protocol: HttpProtocol,
    pub port: u16,
    /// HTTPS: 1 to [`HTTP_CERTIFICATES_MAX`]; the first is served to a
    /// client that names none of theirs.
    pub certificate_ids: Vec<String>,
    pub rules: Vec<HttpRule>,
    /// Where a request no rule matches goes (`None`: a 404 answer).
    pub pool_id: Option<String>,
    pub scheduler: HttpScheduler,
    pub cookie: Option<HttpCookie>,
    pub proxy_protocol: Option<ProxyProtocol>,
    /// Ports of the load balancer's VPC that run the proxy.
    pub proxy_ports: Vec<String>,
    pub trusted_proxies: Vec<IpNetwork>,
    pub waf_policy_id: Option<String>,
}

/// Certificates of one HTTPS listener, at most.
pub const HTTP_CERTIFICATES_MAX: usize = 16;
/// Rules of one HTTP listener, at most.
pub const HTTP_RULES_MAX: usize = 256;
/// Proxy ports of one HTTP listener, at most.
pub const HTTP_PROXY_PORTS_MAX: usize = 8;
/// Trusted proxies of one HTTP listener, at most.
pub const HTTP_TRUSTED_MAX: usize = 64;
/// A fixed answer's body, at most.
pub const HTTP_BODY_MAX: usize = 4096;

impl HttpListener {
    /// The pools its rules and default send requests to, each once.
    pub fn pools(&self) -> std::collections::BTreeSet<&str> {
        self.rules
            .iter()
            .filter_map(|r| match &r.action {
                HttpAction::Pool(p) => Some(p.as_str()),
                _ => None,
            })
            .chain(self.pool_id.as_deref())
            .collect()
    }
}

/// How a pool's members are checked.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HealthProbe {
    /// A TCP connection is accepted.
    Tcp,
    /// An HTTP/1.1 GET of `path` answers with a status in `status`
    /// (inclusive).
    Http { path: String, status: (u16, u16) },
}

/// A pool's health check, run by the load balancer's hosts from inside the
/// VPC. A member fails after `fall` failed checks in a row, and is back
/// after `rise` good ones.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthCheck {
    pub probe: HealthProbe,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
}

/// The members a load balancer's listeners spread flows over.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pool {
    pub id: String,
    pub load_balancer_id: String,
    pub name: String,
    /// `None`: members are taken as healthy.
    pub health: Option<HealthCheck>,
    /// How long a draining member keeps its flows, in seconds (0: the
    /// default, 300).
    pub drain_secs: u32,
}

impl Pool {
    /// The draining time in force.
    pub fn drain(&self) -> u32 {
        if self.drain_secs == 0 {
            LB_DRAIN_DEFAULT_SECS
        } else {
            self.drain_secs
        }
    }
}

/// A member's administrative state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Enabled,
    /// Takes no new flow; keeps its flows until they end or the pool's
    /// drain time passes.
    Draining,
    /// Takes nothing.
    Disabled,
}

impl MemberState {
    pub fn name(self) -> &'static str {
        match self {
            MemberState::Enabled => "enabled",
            MemberState::Draining => "draining",
            MemberState::Disabled => "disabled",
        }
    }
}

/// Where a member is: a port of the load balancer's VPC (its addresses of
/// each VIP family) or one address of the VPC.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberTarget {
    Port(String),
    Address(IpAddr),
}

/// A backend of a pool.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub pool_id: String,
    pub target: MemberTarget,
    /// The member's port for the flows (0: the listener's own port).
    pub port: u16,
    /// 1 to [`LB_WEIGHT_MAX`].
    pub weight: u32,
    pub state: MemberState,
    /// While draining: when it began (Unix ms), stamped by the controller
    /// when the member turns draining and kept while it stays so; the
    /// pool's drain time counts from it on every host alike.
    pub draining_since_unix_ms: Option<u64>,
    /// What its pool's health check last found, as the checking host
    /// reported it (`None`: never found failing, or no check).
    pub health: Option<MemberHealth>,
    /// This put is a health report: it changes the stored member's
    /// `health` alone, whatever its other fields say, and only while the
    /// member is there and checked. Never stored as true.
    pub health_report: bool,
}

/// A member's health as its checker reported it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberHealth {
    pub up: bool,
    /// When it became so (Unix ms, the controller's clock).
    pub since_unix_ms: u64,
    /// The host whose agent checked it.
    pub host_id: String,
    /// What the last failed check saw (empty when up).
    pub detail: String,
}

/// A health report's detail, at most (longer ones are cut).
pub const HEALTH_DETAIL_MAX: usize = 200;

/// A member's weight, at most.
pub const LB_WEIGHT_MAX: u32 = 256;
/// Members of one pool, at most.
pub const LB_MEMBERS_MAX: usize = 256;
/// Listeners of one load balancer, at most.
pub const LB_LISTENERS_MAX: usize = 64;
/// Source persistence, at most (a day).
pub const LB_PERSISTENCE_MAX_SECS: u32 = 86_400;
/// A draining member's time by default and at most.
pub const LB_DRAIN_DEFAULT_SECS: u32 = 300;
pub const LB_DRAIN_MAX_SECS: u32 = 86_400;
/// Health checks' bounds.
pub const HEALTH_INTERVAL_MIN_MS: u32 = 100;
pub const HEALTH_INTERVAL_MAX_MS: u32 = 60_000;
pub const HEALTH_COUNT_MAX: u32 = 10;
pub const HEALTH_PATH_MAX: usize = 1024;

/// A network zone outside the VPCs (the e-government extranet, the
/// internet), reached through an uplink device on every host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Zone {
    pub id: String,
    pub name: String,
    /// The zone's address space; the longest matching prefix of all zones
    /// decides which zone an outside address is in.
    pub prefixes: Vec<IpNetwork>,
    /// Name of the host device facing the zone, the same on every host.
    pub uplink_device: String,
}

/// A declared path between two zones: the only traffic that may cross.
/// Replies of a flow it admits pass too.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExchangePath {
    pub id: String,
    pub from_zone: String,
    pub to_zone: String,
    /// Addresses the flows may come from.
    pub source: IpNetwork,
    /// Addresses the flows may go to.
    pub destination: IpNetwork,
    /// tcp, udp, icmp or icmpv6 (never any).
    pub protocol: Protocol,
    /// Destination ports (ICMP: message types), inclusive.
    pub ports: (u16, u16),
    /// Exempts the path from the share of a zone that paths may open
    /// together ([`crate::Settings`]) and allows a source of every address;
    /// needs `broad_reason`.
    #[serde(default)]
    pub broad: bool,
    /// Why the path is broad: required with `broad`, empty without; the
    /// audit record of the change carries it.
    #[serde(default)]
    pub broad_reason: String,
}

/// The highest VNI (24 bits).
pub const VNI_MAX: u32 = (1 << 24) - 1;
/// The first VNI the store picks when a request leaves it to the store.
pub const VNI_AUTO_FIRST: u32 = 4096;

/// A mirror session's filters, at most.
pub const MIRROR_RULES_MAX: usize = 16;
/// The sparsest sampling: one packet in this many.
pub const MIRROR_SAMPLE_MAX: u32 = 1_000_000;
/// A copy's snap length, when one is given.
pub const MIRROR_SNAP_MIN: u32 = 64;
pub const MIRROR_SNAP_MAX: u32 = 9216;
/// Copies a second on one host, at most.
pub const MIRROR_RATE_MAX: u32 = 10_000_000;

/// A subnet of a VPC, IPv4, IPv6 or both.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Subnet {
    pub id: String,
    pub vpc_id: String,
    pub cidr_v4: Option<Ipv4Network>,
    pub cidr_v6: Option<Ipv6Network>,
}

impl Subnet {
    /// The IPv4 gateway: the first address of the prefix.
    pub fn gateway_v4(&self) -> Option<Ipv4Addr> {
        self.cidr_v4.map(|n| Ipv4Addr::from(u32::from(n.network()) + 1))
    }

    /// The IPv6 gateway: the first address after the subnet-router anycast address.
    pub fn gateway_v6(&self) -> Option<Ipv6Addr> {
        self.cidr_v6.map(|n| Ipv6Addr::from(u128::from(n.network()) + 1))
    }
}

/// A hypervisor host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    pub id: String,
    /// The address the overlay reaches the host at: IPv4 (the store refuses
    /// IPv6, which the overlay does not run over).
    pub underlay_ip: IpAddr,
}

/// A VM network interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Port {
    pub id: String,
    pub tenant_id: String,
    pub subnet_id: String,
    pub host_id: String,
    pub device: String,
    pub mac: Mac,
    pub ipv4: Option<Ipv4Addr>,
    pub ipv6: Option<Ipv6Addr>,
    pub security_group_ids: Vec<String>,
    /// The VM this interface belongs to, as the compute platform names it;
    /// empty: not given. A quarantine of the VM covers all its ports.
    #[serde(default)]
    pub vm_id: String,
}

impl Port {
    /// The port's addresses, IPv4 first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.ipv4.map(IpAddr::V4).into_iter().chain(self.ipv6.map(IpAddr::V6))
    }
}

/// A tenant's security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecurityGroup {
    pub id: String,
    pub tenant_id: String,
    pub name: String,
    pub rules: Vec<Rule>,
}

/// What a quarantine isolates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum QuarantineTarget {
    Port,
    Vpc,
    /// Every port whose `vm_id` is the target.
    Vm,
}

/// An emergency quarantine: all traffic to and from the target is dropped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub id: String,
    pub target: QuarantineTarget,
    pub target_id: String,
    pub reason: String,
    /// Unix milliseconds when it lifts by itself; `None`: when deleted.
    pub expires_unix_ms: Option<u64>,
}

/// Direction of a rule, seen from the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    Ingress,
    Egress,
}

/// Address family of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum EtherType {
    IPv4,
    IPv6,
}

/// Protocol of a rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Any,
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
}

impl Protocol {
    /// The IP protocol number; `None` for any.
    pub fn number(self) -> Option<u8> {
        match self {
            Protocol::Any => None,
            Protocol::Tcp => Some(6),
            Protocol::Udp => Some(17),
            Protocol::Icmp => Some(1),
            Protocol::Icmpv6 => Some(58),
        }
    }
}

/// Whom a rule admits.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Remote {
    /// Any address of the rule's family.
    Any,
    /// A prefix of the rule's family.
    Cidr(IpNetwork),
    /// The addresses of the ports in a security group.
    Group(String),
}

/// One allow rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub id: String,
    pub direction: Direction,
    pub ether_type: EtherType,
    pub protocol: Protocol,
    /// Inclusive range of ports (TCP/UDP) or ICMP types; `None`: all.
    pub ports: Option<(u16, u16)>,
    pub remote: Remote,
}

/// A MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mac(pub [u8; 6]);

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl fmt::Debug for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("invalid MAC {s:?}: expected six hex octets separated by ':'"));
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(format!("invalid MAC {s:?}: octet {p:?} is not two hex digits"));
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| format!("invalid MAC {s:?}: octet {p:?} is not hex"))?;
        }
        if m[0] & 1 != 0 {
            return Err(format!("invalid MAC {s:?}: multicast/broadcast address"));
        }
        if m == [0; 6] {
            return Err(format!("invalid MAC {s:?}: all zero"));
        }
        Ok(Mac(m))
    }
}

impl Serialize for Mac {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Every kind of object, declared once. A row gives the kind's `Kind`,
/// `Object` and `Op` variant, its type, its name in keys and messages, the
/// `State` map that holds it, its put operation, its field in the API's
/// listing, its rank in a batch (what others refer to comes first), and its
/// `kind:` in manifests (none for a kind no manifest declares), and the
/// number of its put in the log's binary form (`log:`, see
/// [`DELETE_LOG_INDEX`]: a new kind takes the next unused number).
///
/// `for_each_kind!(m)` hands the table to macro `m`. The model, the state,
/// the API conversions, the listing, the manifests and `sdnctl` generate what
/// each kind needs from it. What a kind means is written once per kind, in
/// trait implementations the compiler asks for: [`Resource`] here,
/// `convert::ApiResource` for the API, `manifest::ManifestResource` for the
/// manifests; and in the state's checks and the shares.
#[macro_export]
macro_rules! for_each_kind {
    ($m:ident) => {
        $m! {
            (Tenant, Tenant, "tenant", tenants, PutTenant, list: tenants, order: 0, manifest: ["Tenant"], log: 0),
            (Vpc, Vpc, "vpc", vpcs, PutVpc, list: vpcs, order: 1, manifest: ["Vpc"], log: 1),
            (Subnet, Subnet, "subnet", subnets, PutSubnet, list: subnets, order: 2, manifest: ["Subnet"], log: 2),
            (Host, Host, "host", hosts, PutHost, list: hosts, order: 3, manifest: ["Host"], log: 3),
            (Port, Port, "port", ports, PutPort, list: ports, order: 5, manifest: ["Port"], log: 4),
            (SecurityGroup, SecurityGroup, "security_group", security_groups, PutSecurityGroup,
                list: security_groups, order: 4, manifest: ["SecurityGroup"], log: 5),
            (Quarantine, Quarantine, "quarantine", quarantines, PutQuarantine, list: quarantines, order: 6, manifest: [], log: 6),
            (Zone, Zone, "zone", zones, PutZone, list: zones, order: 0, manifest: ["Zone"], log: 7),
            (ExchangePath, ExchangePath, "exchange_path", exchange_paths, PutExchangePath,
                list: exchange_paths, order: 1, manifest: ["ExchangePath"], log: 8),
            (FirewallPolicy, FirewallPolicy, "firewall_policy", firewall_policies, PutFirewallPolicy,
                list: firewall_policies, order: 0, manifest: ["FirewallPolicy"], log: 9),
            (VpcPeering, VpcPeering, "vpc_peering", peerings, PutVpcPeering,
                list: vpc_peerings, order: 3, manifest: ["VpcPeering"], log: 10),
            (MirrorSession, MirrorSession, "mirror_session", mirror_sessions, PutMirrorSession,
                list: mirror_sessions, order: 7, manifest: ["MirrorSession"], log: 12),
            (InformationSystem, InformationSystem, "information_system", information_systems, PutInformationSystem,
                list: information_systems, order: 7, manifest: ["InformationSystem"], log: 13),
            (LoadBalancer, LoadBalancer, "load_balancer", load_balancers, PutLoadBalancer,
                list: load_balancers, order: 7, manifest: ["LoadBalancer"], log: 14),
            (Pool, Pool, "pool", pools, PutPool, list: pools, order: 8, manifest: ["Pool"], log: 15),
            (Listener, Listener, "listener", listeners, PutListener, list: listeners, order: 9, manifest: ["Listener"], log: 16),
            (Member, Member, "member", members, PutMember, list: members, order: 9, manifest: ["Member"], log: 17),
            (VirtualIp, VirtualIp, "virtual_ip", virtual_ips, PutVirtualIp,
                list: virtual_ips, order: 10, manifest: ["VirtualIp"], log: 18),
            (Certificate, Certificate, "certificate", certificates, PutCertificate,
                list: certificates, order: 7, manifest: ["Certificate"], log: 19),
            (HttpListener, HttpListener, "http_listener", http_listeners, PutHttpListener,
                list: http_listeners, order: 10, manifest: ["HttpListener"], log: 20),
        }
    };
}

/// The number of [`Op::Delete`] in the log's binary form (postcard). It was
/// the variant after the eleven kinds' puts, and stays so: a kind added
/// later takes the next free number in its row's `log:` (12, 13, ...), so
/// that an entry written by one release reads the same in another. A
/// kind's `log:` never changes, and is never reused.
pub const DELETE_LOG_INDEX: u32 = 11;

/// The highest operation number this release reads.
pub fn log_index_max() -> u32 {
    Kind::ALL
        .iter()
        .map(|k| k.log_index())
        .max()
        .unwrap_or(0)
        .max(DELETE_LOG_INDEX)
}

impl Op {
    /// The highest operation number a release must read to read this one
    /// from the log: a put's own; for a delete, its kind's (a release that
    /// does not know the kind cannot read the `Kind` either).
    pub fn log_index(&self) -> u32 {
        match self {
            Op::Delete { kind, .. } => DELETE_LOG_INDEX.max(kind.log_index()),
            _ => self.key().0.log_index(),
        }
    }
}

/// What every kind of object says of itself, beyond its row in
/// [`for_each_kind!`].
pub trait Resource {
    /// The audit record's line for a put of this object.
    fn describe(&self) -> String;
    /// The object's details in one line, for `sdnctl get`'s table.
    fn summary(&self) -> String;
}

macro_rules! declare_kinds {
    ($(($kind:ident, $ty:ident, $name:literal, $map:ident, $put:ident,
        list: $list:ident, order: $order:literal, manifest: [$($manifest:literal)?], log: $log:literal)),* $(,)?) => {
        /// Kinds of object.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        pub enum Kind {
            $($kind),*
        }

        impl Kind {
            /// Every kind, in the table's order.
            pub const ALL: &'static [Kind] = &[$(Kind::$kind),*];

            /// The number of the kind's put in the log's binary form.
            pub fn log_index(self) -> u32 {
                match self {
                    $(Kind::$kind => $log),*
                }
            }

            pub fn name(self) -> &'static str {
                match self {
                    $(Kind::$kind => $name),*
                }
            }

            /// The kind of a name (`"security_group"`).
            pub fn from_name(name: &str) -> Option<Kind> {
                match name {
                    $($name => Some(Kind::$kind),)*
                    _ => None,
                }
            }

            /// Where puts of this kind go in a batch: what others refer to
            /// comes first.
            pub fn order(self) -> u8 {
                match self {
                    $(Kind::$kind => $order),*
                }
            }

            /// The kind's `kind:` in manifests; `None` for a kind no
            /// manifest declares.
            pub fn manifest_kind(self) -> Option<&'static str> {
                match self {
                    $(Kind::$kind => {
                        let names: &[&'static str] = &[$($manifest)?];
                        names.first().copied()
                    })*
                }
            }

            /// The kind a manifest's `kind:` names.
            pub fn from_manifest_kind(name: &str) -> Option<Kind> {
                $($(if name == $manifest {
                    return Some(Kind::$kind);
                })?)*
                None
            }
        }

        /// One object of any kind: what a change puts, and what it replaced.
        #[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
        pub enum Object {
            $($kind($ty)),*
        }

        impl Object {
            pub fn kind(&self) -> Kind {
                match self {
                    $(Object::$kind(_) => Kind::$kind),*
                }
            }

            pub fn id(&self) -> &str {
                match self {
                    $(Object::$kind(x) => &x.id),*
                }
            }

            /// The object alone as JSON (without its kind), as the store
            /// keeps it.
            pub fn to_json(&self) -> Vec<u8> {
                match self {
                    $(Object::$kind(x) => serde_json::to_vec(x)),*
                }
                .expect("model objects serialise")
            }

            /// An object of `kind` from [`Object::to_json`]'s form.
            pub fn from_json(kind: Kind, bytes: &[u8]) -> Result<Object, serde_json::Error> {
                Ok(match kind {
                    $(Kind::$kind => Object::$kind(serde_json::from_slice(bytes)?)),*
                })
            }

            /// The put operation of this object.
            pub fn into_op(self) -> Op {
                match self {
                    $(Object::$kind(x) => Op::$put(x)),*
                }
            }

            /// The object's details in one line.
            pub fn summary(&self) -> String {
                match self {
                    $(Object::$kind(x) => x.summary()),*
                }
            }
        }

        /// One change of a batch: a put of one object, or a delete.
        ///
        /// In the log's binary form each operation is its variant's number:
        /// a put the `log:` of its kind's row, a delete [`DELETE_LOG_INDEX`],
        /// whatever the order of the table; see [`DELETE_LOG_INDEX`].
        #[derive(Clone, Debug, PartialEq, Eq)]
        pub enum Op {
            $($put($ty),)*
            Delete { kind: Kind, id: String },
        }

        const OP_VARIANTS: &[&str] = &[$(stringify!($put),)* "Delete"];

        impl Serialize for Op {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self {
                    $(Op::$put(x) => s.serialize_newtype_variant("Op", $log, stringify!($put), x),)*
                    Op::Delete { kind, id } => {
                        use serde::ser::SerializeStructVariant;
                        let mut v = s.serialize_struct_variant("Op", DELETE_LOG_INDEX, "Delete", 2)?;
                        v.serialize_field("kind", kind)?;
                        v.serialize_field("id", id)?;
                        v.end()
                    }
                }
            }
        }

        /// Which operation: by number in the binary form, by name in JSON.
        enum OpTag {
            $($put,)*
            Delete,
        }

        impl<'de> Deserialize<'de> for OpTag {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl serde::de::Visitor<'_> for V {
                    type Value = OpTag;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("an operation")
                    }
                    fn visit_u64<E: serde::de::Error>(self, i: u64) -> Result<OpTag, E> {
                        match i {
                            $($log => Ok(OpTag::$put),)*
                            i if i == u64::from(DELETE_LOG_INDEX) => Ok(OpTag::Delete),
                            _ => Err(E::invalid_value(
                                serde::de::Unexpected::Unsigned(i),
                                &"an operation this release knows (a later release's kind of object?)",
                            )),
                        }
                    }
                    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<OpTag, E> {
                        match s {
                            $(stringify!($put) => Ok(OpTag::$put),)*
                            "Delete" => Ok(OpTag::Delete),
                            _ => Err(E::unknown_variant(s, OP_VARIANTS)),
                        }
                    }
                }
                d.deserialize_identifier(V)
            }
        }

        impl<'de> Deserialize<'de> for Op {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                #[derive(Deserialize)]
                struct DeleteBody {
                    kind: Kind,
                    id: String,
                }
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Op;
                    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                        f.write_str("an operation")
                    }
                    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Op, A::Error> {
                        use serde::de::VariantAccess;
                        let (tag, v) = data.variant::<OpTag>()?;
                        match tag {
                            $(OpTag::$put => v.newtype_variant().map(Op::$put),)*
                            // A struct variant's fields, in order, are
                            // written as a struct's: read as one.
                            OpTag::Delete => v
                                .newtype_variant::<DeleteBody>()
                                .map(|b| Op::Delete { kind: b.kind, id: b.id }),
                        }
                    }
                }
                d.deserialize_enum("Op", OP_VARIANTS, V)
            }
        }

        impl Op {
            /// The object this operation changes: every operation changes
            /// exactly one, its own.
            pub fn key(&self) -> (Kind, &str) {
                match self {
                    $(Op::$put(x) => (Kind::$kind, &x.id),)*
                    Op::Delete { kind, id } => (*kind, id),
                }
            }

            /// The field name of this operation in the API (`put_port`,
            /// `delete`, ...).
            pub fn field(&self) -> &'static str {
                match self {
                    $(Op::$put(_) => concat!("put_", $name),)*
                    Op::Delete { .. } => "delete",
                }
            }

            /// The object a put puts; `None` for a delete.
            pub fn object(&self) -> Option<Object> {
                match self {
                    $(Op::$put(x) => Some(Object::$kind(x.clone())),)*
                    Op::Delete { .. } => None,
                }
            }

            /// One line for the audit record.
            pub fn describe(&self) -> String {
                match self {
                    $(Op::$put(x) => x.describe(),)*
                    Op::Delete {
                        kind: Kind::Quarantine,
                        id,
                    } => format!("lift quarantine {id}"),
                    Op::Delete { kind, id } => format!("delete {} {}", kind.name(), id),
                }
            }

            /// Where the operation goes in a batch: puts by their kind's
            /// [`Kind::order`], deletes last.
            pub fn order(&self) -> u8 {
                match self {
                    Op::Delete { .. } => u8::MAX,
                    _ => self.key().0.order(),
                }
            }
        }
    };
}

for_each_kind!(declare_kinds);

impl Resource for Tenant {
    fn describe(&self) -> String {
        format!("put tenant {}", self.id)
    }
    fn summary(&self) -> String {
        format!("name={:?}", self.name)
    }
}

impl Resource for Vpc {
    fn describe(&self) -> String {
        format!("put vpc {}", self.id)
    }
    fn summary(&self) -> String {
        format!(
            "tenant={} name={:?} vni={} zone={}",
            self.tenant_id, self.name, self.vni, self.zone_id
        )
    }
}

impl Resource for Subnet {
    fn describe(&self) -> String {
        format!("put subnet {}", self.id)
    }
    fn summary(&self) -> String {
        let text = |n: Option<String>| n.unwrap_or_default();
        format!(
            "vpc={} v4={} v6={}",
            self.vpc_id,
            text(self.cidr_v4.map(|n| n.to_string())),
            text(self.cidr_v6.map(|n| n.to_string()))
        )
    }
}

impl Resource for Host {
    fn describe(&self) -> String {
        format!("put host {}", self.id)
    }
    fn summary(&self) -> String {
        format!("underlay={}", self.underlay_ip)
    }
}

impl Resource for Port {
    fn describe(&self) -> String {
        format!("put port {}", self.id)
    }
    fn summary(&self) -> String {
        format!(
            "host={} device={} mac={} v4={} v6={} groups={}",
            self.host_id,
            self.device,
            self.mac,
            self.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            self.ipv6.map(|a| a.to_string()).unwrap_or_default(),
            self.security_group_ids.join(",")
        )
    }
}

impl Resource for SecurityGroup {
    fn describe(&self) -> String {
        format!("put security_group {} ({} rules)", self.id, self.rules.len())
    }
    fn summary(&self) -> String {
        format!("tenant={} rules={}", self.tenant_id, self.rules.len())
    }
}

impl QuarantineTarget {
    pub fn name(self) -> &'static str {
        match self {
            QuarantineTarget::Port => "port",
            QuarantineTarget::Vpc => "vpc",
            QuarantineTarget::Vm => "vm",
        }
    }
}

impl Resource for Quarantine {
    fn describe(&self) -> String {
        let until = self.expires_unix_ms.map(|t| format!(" until {t}")).unwrap_or_default();
        format!(
            "quarantine {} {} {}{until}: {}",
            self.id,
            self.target.name(),
            self.target_id,
            self.reason
        )
    }
    fn summary(&self) -> String {
        format!(
            "target={}/{} expires={} reason={:?}",
            self.target.name(),
            self.target_id,
            self.expires_unix_ms.unwrap_or(0),
            self.reason
        )
    }
}

impl Resource for Zone {
    fn describe(&self) -> String {
        format!(
            "put zone {} ({} prefixes, uplink {})",
            self.id,
            self.prefixes.len(),
            self.uplink_device
        )
    }
    fn summary(&self) -> String {
        let prefixes: Vec<String> = self.prefixes.iter().map(|n| n.to_string()).collect();
        format!("uplink={} prefixes={}", self.uplink_device, prefixes.join(","))
    }
}

impl Resource for ExchangePath {
    fn describe(&self) -> String {
        let broad = if self.broad {
            format!(" (broad: {})", self.broad_reason)
        } else {
            String::new()
        };
        format!("put exchange_path {}: {}{broad}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        format!(
            "{} {} -> {} {} {:?} {}-{}",
            self.from_zone, self.source, self.to_zone, self.destination, self.protocol, self.ports.0, self.ports.1
        )
    }
}

impl Resource for FirewallPolicy {
    fn describe(&self) -> String {
        format!(
            "put firewall_policy {} ({} rules, default {:?})",
            self.id,
            self.rules.len(),
            self.default_action
        )
    }
    fn summary(&self) -> String {
        format!(
            "rules={} default={}",
            self.rules.len(),
            format!("{:?}", self.default_action).to_lowercase()
        )
    }
}

impl Resource for MirrorSession {
    fn describe(&self) -> String {
        format!(
            "put mirror_session {}: {} {:?} to {}",
            self.id,
            self.scope(),
            self.direction,
            self.destination_text()
        )
    }
    fn summary(&self) -> String {
        format!(
            "{} {:?} rules={} sample=1/{} snap={} rate={}/s to {}",
            self.scope(),
            self.direction,
            self.rules.len(),
            self.sample.max(1),
            self.snap_len,
            self.rate(),
            self.destination_text()
        )
    }
}

impl Resource for InformationSystem {
    fn describe(&self) -> String {
        format!("put information_system {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let bw: Vec<String> = self
            .bandwidth
            .iter()
            .map(|b| format!("{} up={} down={}", b.zone_id, b.up_bps, b.down_bps))
            .collect();
        format!(
            "vpcs={} ports={} bandwidth=[{}] alert={}% interval={}s",
            self.vpc_ids.join(","),
            self.port_ids.join(","),
            bw.join("; "),
            self.alert(),
            self.interval()
        )
    }
}

impl Resource for LoadBalancer {
    fn describe(&self) -> String {
        format!("put load_balancer {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let vips: Vec<String> = self.vips().map(|a| a.to_string()).collect();
        let hosts: Vec<&str> = self.nat_hosts.iter().map(|h| h.host_id.as_str()).collect();
        format!(
            "tenant={} vpc={} vips={} exposure={} nat_hosts={}",
            self.tenant_id,
            self.vpc_id,
            vips.join(","),
            self.exposure.name(),
            hosts.join(",")
        )
    }
}

impl Resource for VirtualIp {
    fn describe(&self) -> String {
        format!("put virtual_ip {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let addresses: Vec<String> = self.addresses().map(|a| a.to_string()).collect();
        let holders: Vec<String> = self
            .holders
            .iter()
            .map(|h| format!("{}@{}", h.target.describe().replace(' ', ":"), h.priority))
            .collect();
        let owner = match &self.owner {
            Some(o) => format!(" owner={} epoch={}", o.describe().replace(' ', ":"), self.epoch),
            None if self.epoch > 0 => format!(" owner=none epoch={}", self.epoch),
            None => String::new(),
        };
        format!(
            "tenant={} vpc={} addresses={} vrid={} holders={} preempt={} advert={}cs{owner}",
            self.tenant_id,
            self.vpc_id,
            addresses.join(","),
            self.vrid,
            holders.join(","),
            self.preempt,
            self.advert_interval_cs
        )
    }
}

impl Resource for Listener {
    fn describe(&self) -> String {
        format!("put listener {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        format!(
            "lb={} {}/{} pool={} scheduler={} persistence={}s",
            self.load_balancer_id,
            self.protocol.name(),
            self.port,
            self.pool_id,
            self.scheduler.name(),
            self.persistence_secs
        )
    }
}

impl Resource for Certificate {
    fn describe(&self) -> String {
        format!("put certificate {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        format!(
            "tenant={} names={} not_after={}",
            self.tenant_id,
            self.names.join(","),
            self.not_after_unix
        )
    }
}

impl Resource for HttpListener {
    fn describe(&self) -> String {
        format!("put http listener {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let mut s = format!(
            "lb={} {}/{} rules={} pool={} scheduler={} proxies={}",
            self.load_balancer_id,
            self.protocol.name(),
            self.port,
            self.rules.len(),
            self.pool_id.as_deref().unwrap_or("-"),
            self.scheduler.name(),
            self.proxy_ports.join(",")
        );
        if !self.certificate_ids.is_empty() {
            s += &format!(" certificates={}", self.certificate_ids.join(","));
        }
        if let Some(c) = &self.cookie {
            s += &format!(" cookie={}:{}", c.name, c.mode.name());
        }
        if let Some(p) = self.proxy_protocol {
            s += &format!(" proxy_protocol={}", p.name());
        }
        s
    }
}

impl Resource for Pool {
    fn describe(&self) -> String {
        format!("put pool {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let health = match &self.health {
            None => "none".to_string(),
            Some(h) => {
                let probe = match &h.probe {
                    HealthProbe::Tcp => "tcp".to_string(),
                    HealthProbe::Http { path, status } => format!("http GET {path} {}-{}", status.0, status.1),
                };
                format!(
                    "{probe} every {}ms timeout {}ms rise {} fall {}",
                    h.interval_ms, h.timeout_ms, h.rise, h.fall
                )
            }
        };
        format!("lb={} health=[{health}] drain={}s", self.load_balancer_id, self.drain())
    }
}

impl Resource for Member {
    fn describe(&self) -> String {
        format!("put member {}: {}", self.id, self.summary())
    }
    fn summary(&self) -> String {
        let target = match &self.target {
            MemberTarget::Port(p) => format!("port {p}"),
            MemberTarget::Address(a) => a.to_string(),
        };
        let port = if self.port == 0 {
            "listener's".to_string()
        } else {
            self.port.to_string()
        };
        let health = match &self.health {
            Some(h) if h.up => format!(" health=up (checked by {})", h.host_id),
            Some(h) => format!(" health=down (checked by {}: {})", h.host_id, h.detail),
            None => String::new(),
        };
        format!(
            "pool={} target={target} port={port} weight={} state={}{health}",
            self.pool_id,
            self.weight,
            self.state.name()
        )
    }
}

impl MirrorSession {
    /// The destination in a few words.
    pub fn destination_text(&self) -> String {
        match &self.destination {
            MirrorDestination::Tap { port_id, vni } => format!("tap port {port_id} (vni {vni})"),
            MirrorDestination::Vxlan { remote, vni, port } => format!("vxlan {remote}:{port} vni {vni}"),
            MirrorDestination::Erspan {
                remote,
                version,
                session,
            } => {
                format!(
                    "erspan type {} {remote} session {session}",
                    if *version == 3 { "III" } else { "II" }
                )
            }
        }
    }
}

impl Resource for VpcPeering {
    fn describe(&self) -> String {
        format!(
            "put vpc_peering {}: {} <-> {} (firewall {:?})",
            self.id, self.vpc_a, self.vpc_b, self.policy_id
        )
    }
    fn summary(&self) -> String {
        format!("{} <-> {} firewall={}", self.vpc_a, self.vpc_b, self.policy_id)
    }
}

/// Checks an object id: 1-64 characters of `[A-Za-z0-9._-]`.
pub fn check_id(id: &str) -> Result<(), String> {
    if id.is_empty() {
        return Err("must not be empty".into());
    }
    if id.len() > 64 {
        return Err(format!("{id:?} is longer than 64 characters"));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; allowed: letters, digits, '.', '_', '-'"
        ));
    }
    Ok(())
}

/// Parses a prefix and refuses host bits past the prefix length.
pub fn parse_cidr(s: &str) -> Result<IpNetwork, String> {
    let n: IpNetwork = s.parse().map_err(|e| format!("invalid CIDR {s:?}: {e}"))?;
    if !s.contains('/') {
        return Err(format!("invalid CIDR {s:?}: missing prefix length"));
    }
    if n.network() != n.ip() {
        return Err(format!(
            "invalid CIDR {s:?}: host bits set (did you mean {}/{}?)",
            n.network(),
            n.prefix()
        ));
    }
    Ok(n)
}

#[cfg(test)]
mod log_form {
    use super::*;

    /// An entry's operations read the same in every release: a delete is
    /// number 11 in the binary form, and each put its kind's number, which
    /// no later kind changes.
    #[test]
    fn operations_keep_their_numbers_in_the_binary_form() {
        let delete = Op::Delete {
            kind: Kind::Port,
            id: "p".into(),
        };
        let bytes = postcard::to_stdvec(&delete).unwrap();
        assert_eq!(bytes, [11, 4, 1, b'p'], "Delete is 11, Port is 4");
        assert_eq!(postcard::from_bytes::<Op>(&bytes).unwrap(), delete);
        let tenant = Op::PutTenant(Tenant {
            id: "t".into(),
            name: "T".into(),
        });
        let bytes = postcard::to_stdvec(&tenant).unwrap();
        assert_eq!(bytes, [0, 1, b't', 1, b'T']);
        assert_eq!(postcard::from_bytes::<Op>(&bytes).unwrap(), tenant);
        // JSON names the variants, as before.
        let json = serde_json::to_string(&delete).unwrap();
        assert_eq!(json, r#"{"Delete":{"kind":"Port","id":"p"}}"#);
        assert_eq!(serde_json::from_str::<Op>(&json).unwrap(), delete);
        assert_eq!(
            serde_json::from_str::<Op>(r#"{"PutTenant":{"id":"t","name":"T"}}"#).unwrap(),
            tenant
        );
        // A number no kind has is refused, naming why.
        let e = postcard::from_bytes::<Op>(&[99, 0]).unwrap_err();
        assert!(matches!(e, postcard::Error::SerdeDeCustom), "{e:?}");
        let e = serde_json::from_str::<Op>(r#"{"PutNothing":{}}"#).unwrap_err();
        assert!(e.to_string().contains("unknown variant"), "{e}");
    }

    /// `Kind` is written by its place in the table: kinds are only ever
    /// added at its end, so every earlier kind keeps its number.
    #[test]
    fn kinds_keep_their_places_in_the_binary_form() {
        let names: Vec<&str> = Kind::ALL.iter().map(|k| k.name()).collect();
        assert_eq!(
            names,
            [
                "tenant",
                "vpc",
                "subnet",
                "host",
                "port",
                "security_group",
                "quarantine",
                "zone",
                "exchange_path",
                "firewall_policy",
                "vpc_peering",
                "mirror_session",
                "information_system",
                "load_balancer",
                "pool",
                "listener",
                "member",
                "virtual_ip",
                "certificate",
                "http_listener",
            ],
            "a kind was inserted or moved: add new kinds at the end of the table"
        );
        for (i, k) in Kind::ALL.iter().enumerate() {
            assert_eq!(postcard::to_stdvec(k).unwrap(), [i as u8], "{k:?}");
        }
        // A delete of a later kind needs that kind's number read.
        let d = Op::Delete {
            kind: Kind::MirrorSession,
            id: "m".into(),
        };
        assert_eq!(d.log_index(), Kind::MirrorSession.log_index());
    }

    /// Every kind's number is its own, and none is Delete's.
    #[test]
    fn every_kind_has_a_number_of_its_own() {
        let mut seen = std::collections::BTreeSet::new();
        for k in Kind::ALL {
            let n = k.log_index();
            assert_ne!(n, DELETE_LOG_INDEX, "{k:?}");
            assert!(seen.insert(n), "{k:?} shares {n}");
        }
    }
}
