//! Flow sync: the north-south flows through virtual IPs held by hosts,
//! carried from each holder's agent to the other holders', so that the
//! holder that owns the VIP next translates them on, from the NAT address
//! and port they began at (that address is answered where the VIP's owner
//! is: `compile::lb::compile_nat`).
//!
//! - The dataplane tells of each flow of such a VIP it confirms through a
//!   ring (`SDN_NAT_SYNC`); those go to the peers within [`SEND_EVERY`].
//! - Every [`SCAN_EVERY`] the flow table is read: flows whose state moved,
//!   or whose last packet is [`REFRESH_NS`] newer than the peers were last
//!   told, go again (so the peers' copies live as long as the flow), and
//!   flows gone (reset, timed out) are said gone.
//! - Only flows this host carried packets of are sent: a copy received and
//!   never used here goes back to no one.
//! - A connection begins with a full batch: every flow the sender carried
//!   of the VIPs the two hold together (a resync after any break, after any
//!   batch that could not be queued, and when the VIPs they share change).
//!   Its last frame says so: the receiver then drops the sender's copies
//!   it did not list (flows that ended while the two were apart).
//! - Connections are mutual TLS between agents of the cluster's CA, from
//!   and to the underlay addresses of hosts that hold a VIP with this one.
//! - A received flow is written only for a VIP the two hold together (its
//!   VPC and address), from a NAT address of one of its holders, to a live
//!   member of the VIP's service here; its service and member slot are this
//!   host's own. While this host holds the VIP's lease, flows it has are
//!   neither replaced nor removed by a peer; a flow it saw a packet of more
//!   recently is left as it is; a NAT port another flow holds here is
//!   refused; and the copies one host may hold of its peers' flows are
//!   capped ([`COPIES_MAX`]), so a peer cannot fill the table.
//! - Map work runs off the runtime's workers (the VRRP speakers share
//!   them).
//! - Flows not carried yet when the owner failed (confirmed in its last
//!   moments, or while the two were apart) are picked up: each full batch
//!   begins with the sender's secret for NAT ports, and when this host
//!   takes a VIP over from a peer, for [`PICKUP_WINDOW`] the dataplane
//!   takes a TCP segment of a flow it does not know, to a Maglev listener
//!   of that VIP, as the peer's flow (`SDN_NAT_PICKUP`): Maglev gives it
//!   the same member as there, and the peer's NAT address and secret the
//!   same NAT port, so the member sees the connection it knows.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use dataplane_common::lb::{
    nat_secret, LbBackend, NatFlow, NatKey, NatPickup, NatPickupKey, NatReverseKey, NatService, NatServiceKey,
    NatSyncEvent, LB_BACKENDS, LB_BACKENDS_MAP, LB_BACKEND_LIVE, LB_FLOWS_MAX, NAT_FLOWS, NAT_PICKUP, NAT_REVERSE,
    NAT_SEED, NAT_SERVICES, NAT_SYNC,
};
use dataplane_common::maps::{VipLease, ZoneAddrKey, VIP_LEASES};
use dataplane_common::{FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use prost::Message as _;
use sdn_proto::tls::{Acceptor, Connector, Files, Role};
use sdn_proto::v1 as pb;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};

use crate::compile::Resources;
use crate::dataplane::{monotonic_ns, nat_reverse as reverse_key};

/// The port agents listen on for their peers' flows (on the underlay
/// address).
pub const DEFAULT_PORT: u16 = 7946;
/// How long a confirmed flow waits to be sent (to go in one batch with
/// others).
const SEND_EVERY: Duration = Duration::from_millis(50);
/// How often the flow table is read for flows that moved or went.
const SCAN_EVERY: Duration = Duration::from_secs(1);
/// A flow whose last packet is this much newer than the peers were told is
/// sent again.
const REFRESH_NS: u64 = 2_000_000_000;
/// The most flows (and removals) in one frame, and the largest frame read
/// (4,096 flows take about 600 KiB).
const FRAME_FLOWS: usize = 4096;
const MAX_FRAME: usize = 1 << 20;
/// An idle sender sends an empty frame this often; a receiver that hears
/// nothing for [`IDLE_TIMEOUT`] closes the connection (its peer is gone).
const HEARTBEAT: Duration = Duration::from_secs(5);
const IDLE_TIMEOUT: Duration = Duration::from_secs(15);
/// Batches queued for a peer; past this the peer is resynchronised.
const QUEUE: usize = 256;
/// A peer not reachable is dialled again after this.
const REDIAL: Duration = Duration::from_millis(500);
/// How long after taking a VIP over this host picks up the previous
/// owner's flows it was not told of.
pub const PICKUP_WINDOW: Duration = Duration::from_secs(60);
/// A frame not written within this ends the connection (the peer stopped
/// reading); the next one begins with a full batch.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// The copies of peers' flows this host holds at most: half its flow
/// table, the rest for its own.
pub const COPIES_MAX: usize = LB_FLOWS_MAX as usize / 2;
/// Connections from peers at once, at most.
const CONNECTIONS_MAX: usize = 16;

/// The virtual IPs held by hosts that this host holds, each with what its
/// flows may be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// This host.
    pub me: String,
    pub groups: Vec<Group>,
    /// Each group's owner now (by virtual IP id), if it has one.
    pub owners: BTreeMap<String, String>,
}

/// One virtual IP held by hosts, this host among them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Group {
    pub vip_id: String,
    /// Its VPC's VNI: addresses of different VPCs may be alike.
    pub vni: u32,
    pub addresses: BTreeSet<IpAddr>,
    /// The NAT addresses of its holders: a flow from another is refused.
    pub nats: BTreeSet<IpAddr>,
    /// By holder, the NAT address each of the VIP's addresses is
    /// translated from there (the load balancer's with that VIP, its
    /// family).
    pub nat_of: BTreeMap<String, BTreeMap<IpAddr, IpAddr>>,
    /// The other holders, by host, at their underlay addresses.
    pub peers: BTreeMap<String, Ipv4Addr>,
}

impl Group {
    fn has(&self, vni: u32, family: u8, vip: &[u8; 16]) -> bool {
        self.vni == vni && self.addresses.contains(&ip_of(family, vip))
    }
}

impl Plan {
    fn has(&self, vni: u32, family: u8, vip: &[u8; 16]) -> bool {
        self.groups.iter().any(|g| g.has(vni, family, vip))
    }

    /// The peers, each with the groups it shares with this host.
    fn peers(&self) -> BTreeMap<String, (Ipv4Addr, Vec<Group>)> {
        let mut out: BTreeMap<String, (Ipv4Addr, Vec<Group>)> = BTreeMap::new();
        for g in &self.groups {
            for (h, a) in &g.peers {
                out.entry(h.clone()).or_insert((*a, Vec::new())).1.push(g.clone());
            }
        }
        out
    }
}

/// What this host shares with whom, from its share: the VIPs held by
/// hosts it holds, with the NAT addresses of their holders (from the load
/// balancer whose VIP it is) and the other holders' underlay addresses.
/// Also says what cannot be carried, and why.
pub fn plan(res: &Resources, host: &str) -> (Plan, Vec<String>) {
    let mut problems = Vec::new();
    let lbs: Vec<&pb::LoadBalancerOnHost> = res
        .values()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::LoadBalancer(l)) => Some(l),
            _ => None,
        })
        .collect();
    let mut groups = Vec::new();
    let mut owners = BTreeMap::new();
    for r in res.values() {
        let Some(pb::resource::Kind::VirtualIp(on)) = &r.kind else {
            continue;
        };
        let Some(v) = &on.virtual_ip else { continue };
        if on.uplink_device.is_empty() || !v.holders.iter().any(|h| h.host_id == host) {
            continue;
        }
        let addresses: BTreeSet<IpAddr> = [v.ipv4.parse().ok(), v.ipv6.parse().ok()]
            .into_iter()
            .flatten()
            .collect();
        let holders: BTreeSet<&str> = v.holders.iter().map(|h| h.host_id.as_str()).collect();
        let mut nats = BTreeSet::new();
        let mut nat_of: BTreeMap<String, BTreeMap<IpAddr, IpAddr>> = BTreeMap::new();
        let mut peers = BTreeMap::new();
        for l in lbs.iter().filter(|l| l.vni == on.vni) {
            let Some(lb) = &l.load_balancer else { continue };
            let vips: Vec<IpAddr> = [lb.vip_v4.parse().ok(), lb.vip_v6.parse().ok()]
                .into_iter()
                .flatten()
                .collect();
            if lb.vpc_id != v.vpc_id || !vips.iter().any(|a| addresses.contains(a)) {
                continue;
            }
            for h in lb.nat_hosts.iter().filter(|h| holders.contains(h.host_id.as_str())) {
                let own: Vec<IpAddr> = [h.ipv4.parse::<IpAddr>().ok(), h.ipv6.parse().ok()]
                    .into_iter()
                    .flatten()
                    .collect();
                for a in vips.iter().filter(|a| addresses.contains(a)) {
                    if let Some(n) = own.iter().find(|n| n.is_ipv4() == a.is_ipv4()) {
                        nat_of.entry(h.host_id.clone()).or_default().insert(*a, *n);
                    }
                }
                nats.extend(own);
                if h.host_id == host {
                    continue;
                }
                match l.nat_underlays.get(&h.host_id).and_then(|u| u.parse::<Ipv4Addr>().ok()) {
                    Some(u) => {
                        peers.insert(h.host_id.clone(), u);
                    }
                    None => problems.push(format!(
                        "virtual ip {}: holder {} has no IPv4 underlay address in the share; its flows are not carried to it",
                        v.id, h.host_id
                    )),
                }
            }
        }
        if !v.owner_host_id.is_empty() {
            owners.insert(v.id.clone(), v.owner_host_id.clone());
        }
        groups.push(Group {
            vip_id: v.id.clone(),
            vni: on.vni,
            addresses,
            nats,
            nat_of,
            peers,
        });
    }
    (
        Plan {
            me: host.to_string(),
            groups,
            owners,
        },
        problems,
    )
}

/// Counts for the metrics, the logs and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Flows sent to peers (each peer counted).
    pub sent: AtomicU64,
    /// Full batches sent (one per connection, and per resync).
    pub resyncs: AtomicU64,
    /// Flows received and written.
    pub applied: AtomicU64,
    /// Flows received and left alone: this host's copy is newer, or this
    /// host holds the VIP's lease.
    pub older: AtomicU64,
    /// Flows received and refused (not a shared VIP, no such member here,
    /// a NAT port another flow holds, too many copies, malformed).
    pub refused: AtomicU64,
    /// Copies removed because their peer said they ended, or no longer
    /// listed them.
    pub removed: AtomicU64,
    /// Connections from peers refused (not a holder, bad certificate, too
    /// many).
    pub refused_peers: AtomicU64,
}

/// What the peers were told and what they sent.
#[derive(Default)]
struct Book {
    /// The flows this host sent, by key: their last packet and state as
    /// sent (a flow is sent again only when it moved, and said gone when
    /// it is).
    told: HashMap<NatKey, (u64, u32, u32)>,
    /// The copies of peers' flows written here: the peer, and the last
    /// packet as written (a copy no packet moved here since may be
    /// removed by its peer).
    copies: HashMap<NatKey, (String, u64)>,
    /// How many copies each peer has here (each has a cap).
    per_peer: HashMap<String, usize>,
}

impl Book {
    fn add_copy(&mut self, key: NatKey, peer: &str, last_seen: u64) {
        if let Some((old, _)) = self.copies.insert(key, (peer.to_string(), last_seen)) {
            self.drop_count(&old);
        }
        *self.per_peer.entry(peer.to_string()).or_default() += 1;
    }

    fn forget_copy(&mut self, key: &NatKey) {
        if let Some((peer, _)) = self.copies.remove(key) {
            self.drop_count(&peer);
        }
    }

    fn drop_count(&mut self, peer: &str) {
        if let Some(n) = self.per_peer.get_mut(peer) {
            *n = n.saturating_sub(1);
        }
    }
}

type Shared = Arc<Mutex<Book>>;

/// The peers' secrets for their NAT addresses' ports, by host and address,
/// as their full batches said.
type Seeds = Arc<Mutex<HashMap<(String, IpAddr), u32>>>;

fn lock(b: &Shared) -> std::sync::MutexGuard<'_, Book> {
    b.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether a flow carried packets here (a copy never used has none).
fn carried(f: &NatFlow) -> bool {
    f.packets_in | f.packets_out != 0
}

/// The flow sync of one agent.
pub struct FlowSync {
    plan: watch::Sender<Plan>,
    pub stats: Arc<Stats>,
}

impl FlowSync {
    /// Starts it (within a runtime): listens on `listen` for the peers'
    /// flows and sends this host's to the peers' `port`.
    pub async fn start(pin_dir: &Path, files: Files, listen: SocketAddr, port: u16) -> anyhow::Result<FlowSync> {
        let acceptor = Arc::new(Acceptor::new(files.clone()).map_err(anyhow::Error::msg)?);
        let connector = Arc::new(Connector::to_agents(files).map_err(anyhow::Error::msg)?);
        let maps = pin_dir.join("maps");
        let ring = MapData::from_pin(maps.join(NAT_SYNC)).with_context(|| format!("opening pinned map {NAT_SYNC}"))?;
        let ring = aya::maps::RingBuf::try_from(aya::maps::Map::RingBuf(ring))?;
        // Checked now: a missing map is an error at start, not in a task.
        Tables::open(&maps)?;
        let pickup = BpfHashMap::try_from(aya::maps::Map::HashMap(
            MapData::from_pin(maps.join(NAT_PICKUP)).with_context(|| format!("opening pinned map {NAT_PICKUP}"))?,
        ))?;
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding the flow sync address {listen}"))?;
        let (tx, rx) = watch::channel(Plan::default());
        let stats = Arc::new(Stats::default());
        let book: Shared = Default::default();
        let seeds: Seeds = Default::default();
        tokio::spawn(serve(
            listener,
            acceptor,
            maps.clone(),
            rx.clone(),
            book.clone(),
            seeds.clone(),
            stats.clone(),
        ));
        tokio::spawn(pickups(pickup, rx.clone(), seeds));
        tokio::spawn(source(ring, maps, connector, port, rx, book, stats.clone()));
        tracing::info!(listen = %listen, "flows through virtual IPs held by hosts are carried to the other holders");
        Ok(FlowSync { plan: tx, stats })
    }

    pub fn set(&self, plan: Plan) {
        self.plan.send_if_modified(|p| {
            if *p == plan {
                return false;
            }
            *p = plan;
            true
        });
    }
}

/// The dataplane's tables a flow is read from and written to.
struct Tables {
    flows: BpfHashMap<MapData, NatKey, NatFlow>,
    reverse: BpfHashMap<MapData, NatReverseKey, NatKey>,
    services: BpfHashMap<MapData, NatServiceKey, NatService>,
    backends: Array<MapData, LbBackend>,
    leases: BpfHashMap<MapData, ZoneAddrKey, VipLease>,
}

impl Tables {
    fn open(maps: &Path) -> anyhow::Result<Tables> {
        let pin = |name: &str| MapData::from_pin(maps.join(name)).with_context(|| format!("opening pinned map {name}"));
        Ok(Tables {
            flows: BpfHashMap::try_from(aya::maps::Map::HashMap(pin(NAT_FLOWS)?))?,
            reverse: BpfHashMap::try_from(aya::maps::Map::HashMap(pin(NAT_REVERSE)?))?,
            services: BpfHashMap::try_from(aya::maps::Map::HashMap(pin(NAT_SERVICES)?))?,
            backends: Array::try_from(aya::maps::Map::Array(pin(LB_BACKENDS_MAP)?))?,
            leases: BpfHashMap::try_from(aya::maps::Map::HashMap(pin(VIP_LEASES)?))?,
        })
    }

    /// The slot of member `addr`:`port` in service `id`, if it is live.
    fn slot(&self, id: u32, addr: &[u8; 16], port: u16, cache: &mut HashMap<u32, Vec<LbBackend>>) -> Option<u16> {
        let slots = cache.entry(id).or_insert_with(|| {
            (0..LB_BACKENDS)
                .map(|s| self.backends.get(&(id * LB_BACKENDS + s), 0).unwrap_or_default())
                .collect()
        });
        slots
            .iter()
            .position(|b| b.flags & LB_BACKEND_LIVE != 0 && b.addr == *addr && b.port == port)
            .map(|s| s as u16)
    }

    /// Whether this host answers for `vip` now and saw a packet of flow
    /// `f` since it began to: such a flow is this host's to keep. (A flow
    /// from before, kept in the tables across the agent's or the host's
    /// death, is not: the peer that carried it meanwhile knows better.)
    fn owns(&self, family: u8, vip: &[u8; 16], f: &NatFlow, now: u64) -> bool {
        let k = ZoneAddrKey {
            family,
            _pad: [0; 3],
            addr: *vip,
        };
        self.leases
            .get(&k, 0)
            .is_ok_and(|l| l.until_ns > now && f.last_seen_ns >= l.since_ns)
    }
}

fn addr16(a: &IpAddr) -> (u8, [u8; 16]) {
    match a {
        IpAddr::V4(v) => {
            let mut o = [0u8; 16];
            o[..4].copy_from_slice(&v.octets());
            (FAMILY_V4, o)
        }
        IpAddr::V6(v) => (FAMILY_V6, v.octets()),
    }
}

fn ip_of(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

fn wire_addr(family: u8, a: &[u8; 16]) -> Vec<u8> {
    if family == FAMILY_V4 {
        a[..4].to_vec()
    } else {
        a.to_vec()
    }
}

fn key_pb(k: &NatKey) -> pb::SyncedFlowKey {
    pb::SyncedFlowKey {
        zone: k.zone,
        proto: k.proto as u32,
        client: wire_addr(k.family, &k.client),
        client_port: k.client_port as u32,
        vip: wire_addr(k.family, &k.vip),
        vip_port: k.vport as u32,
    }
}

fn flow_pb(k: &NatKey, f: &NatFlow, now: u64) -> pb::SyncedFlow {
    pb::SyncedFlow {
        key: Some(key_pb(k)),
        vni: f.vni,
        member: wire_addr(k.family, &f.backend),
        member_port: f.backend_port as u32,
        nat: wire_addr(k.family, &f.nat),
        nat_port: f.nat_port as u32,
        flags: f.flags,
        member_ack: f.member_ack,
        client_isn: f.client_isn,
        age_ms: now.saturating_sub(f.created_ns) / 1_000_000,
        idle_ms: now.saturating_sub(f.last_seen_ns) / 1_000_000,
    }
}

/// An address of the key's family, from the wire.
fn read_addr(field: &str, b: &[u8], family: Option<u8>) -> Result<(u8, [u8; 16]), String> {
    let (f, a) = match b.len() {
        4 => addr16(&IpAddr::from(<[u8; 4]>::try_from(b).expect("4 bytes"))),
        16 => addr16(&IpAddr::from(<[u8; 16]>::try_from(b).expect("16 bytes"))),
        n => return Err(format!("{field}: {n} bytes is no IPv4 or IPv6 address")),
    };
    if family.is_some_and(|x| x != f) {
        return Err(format!("{field}: not of the flow's family"));
    }
    Ok((f, a))
}

fn read_port(field: &str, p: u32) -> Result<u16, String> {
    match u16::try_from(p) {
        Ok(x) if x != 0 => Ok(x),
        _ => Err(format!("{field}: {p} is no port")),
    }
}

fn key_of(k: &pb::SyncedFlowKey) -> Result<NatKey, String> {
    let proto = match k.proto {
        p if p == PROTO_TCP as u32 || p == PROTO_UDP as u32 => p as u8,
        p => return Err(format!("key.proto: {p} is neither TCP nor UDP")),
    };
    let (family, vip) = read_addr("key.vip", &k.vip, None)?;
    let (_, client) = read_addr("key.client", &k.client, Some(family))?;
    Ok(NatKey {
        zone: k.zone,
        family,
        proto,
        client_port: read_port("key.client_port", k.client_port)?,
        vport: read_port("key.vip_port", k.vip_port)?,
        _pad: 0,
        client,
        vip,
    })
}

/// The flags a peer's flow may carry (its TCP state and whether it counts
/// as open).
const FLAGS_CARRIED: u32 = dataplane_common::lb::NAT_F_CLOSING
    | dataplane_common::lb::NAT_F_ACKED
    | dataplane_common::lb::NAT_F_FIN_IN
    | dataplane_common::lb::NAT_F_FIN_OUT
    | dataplane_common::lb::LB_FLOW_OPEN
    | dataplane_common::lb::LB_FLOW_CLOSED;

/// What one received frame did.
#[derive(Default)]
struct Applied {
    refused: Vec<String>,
}

/// Writes a peer's frame into the dataplane (blocking: map calls), each
/// flow checked against the VIPs `groups` shares with the peer and this
/// host's own services; `listed` gathers the keys of a full batch.
fn apply(
    batch: &pb::FlowSyncBatch,
    groups: &[Group],
    t: &mut Tables,
    book: &Shared,
    stats: &Stats,
    peer: &str,
    listed: &mut HashSet<NatKey>,
) -> Applied {
    let now = monotonic_ns();
    let mut slots = HashMap::new();
    let mut out = Applied::default();
    for f in &batch.flows {
        let r = apply_one(f, groups, t, &mut slots, book, peer, now);
        match r {
            Ok((key, written)) => {
                if batch.full {
                    listed.insert(key);
                }
                if written {
                    stats.applied.fetch_add(1, Ordering::Relaxed);
                } else {
                    stats.older.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                stats.refused.fetch_add(1, Ordering::Relaxed);
                if out.refused.len() < 3 {
                    out.refused.push(e);
                }
            }
        }
    }
    for k in &batch.removed {
        if let Ok(key) = key_of(k) {
            if remove_copy(t, book, peer, &key, now) {
                stats.removed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    out
}

/// Removes `peer`'s copy of flow `key`, unless this host holds the VIP's
/// lease or a packet moved the copy here since it was written.
fn remove_copy(t: &mut Tables, book: &Shared, peer: &str, key: &NatKey, now: u64) -> bool {
    let Some(written) = lock(book).copies.get(key).filter(|(p, _)| p == peer).map(|c| c.1) else {
        return false;
    };
    let Ok(f) = t.flows.get(key, 0) else {
        lock(book).forget_copy(key);
        return false;
    };
    if f.last_seen_ns != written || carried(&f) || t.owns(key.family, &key.vip, &f, now) {
        return false;
    }
    let rk = reverse_key(key, &f);
    if t.reverse.get(&rk, 0).is_ok_and(|k| k == *key) {
        let _ = t.reverse.remove(&rk);
    }
    let gone = t.flows.remove(key).is_ok();
    lock(book).forget_copy(key);
    gone
}

/// After a full batch: `peer`'s copies of the VIPs it `covers` that it did
/// not list end here.
fn prune(
    t: &mut Tables,
    book: &Shared,
    peer: &str,
    listed: &HashSet<NatKey>,
    covers: &[pb::CoveredVip],
    stats: &Stats,
) {
    let now = monotonic_ns();
    let covered: HashSet<(u32, IpAddr)> = covers
        .iter()
        .filter_map(|c| {
            read_addr("covers.address", &c.address, None)
                .ok()
                .map(|(f, a)| (c.vni, ip_of(f, &a)))
        })
        .collect();
    let stale: Vec<NatKey> = lock(book)
        .copies
        .iter()
        .filter(|(k, (p, _))| p == peer && !listed.contains(*k))
        .map(|(k, _)| *k)
        .collect();
    for k in stale {
        let of_covered = t
            .flows
            .get(&k, 0)
            .is_ok_and(|f| covered.contains(&(f.vni, ip_of(k.family, &k.vip))));
        if of_covered && remove_copy(t, book, peer, &k, now) {
            stats.removed.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One flow of a peer's: its key, and whether it was written (`false`:
/// this host's copy is newer, or this host holds the VIP's lease and has
/// the flow). Every check comes before any write.
fn apply_one(
    f: &pb::SyncedFlow,
    groups: &[Group],
    t: &mut Tables,
    slots: &mut HashMap<u32, Vec<LbBackend>>,
    book: &Shared,
    peer: &str,
    now: u64,
) -> Result<(NatKey, bool), String> {
    let key = key_of(f.key.as_ref().ok_or("key: missing")?)?;
    let vip = ip_of(key.family, &key.vip);
    let group = groups
        .iter()
        .find(|g| g.has(f.vni, key.family, &key.vip))
        .ok_or_else(|| format!("key.vip: {vip} (vni {}) is no virtual IP held with this peer", f.vni))?;
    let (_, nat) = read_addr("nat", &f.nat, Some(key.family))?;
    if !group.nats.contains(&ip_of(key.family, &nat)) {
        return Err(format!(
            "nat: {} is no NAT address of a holder of {}",
            ip_of(key.family, &nat),
            group.vip_id
        ));
    }
    let (_, backend) = read_addr("member", &f.member, Some(key.family))?;
    let backend_port = read_port("member_port", f.member_port)?;
    let svc_key = NatServiceKey {
        family: key.family,
        proto: key.proto,
        port: key.vport,
        addr: key.vip,
    };
    let ns = t
        .services
        .get(&svc_key, 0)
        .map_err(|_| format!("key: {vip} port {} is no service translated here", key.vport))?;
    if ns.vni != f.vni {
        return Err(format!("vni: {} is not the service's VPC ({})", f.vni, ns.vni));
    }
    let slot = t.slot(ns.lb.id, &backend, backend_port, slots).ok_or_else(|| {
        format!(
            "member: {}:{backend_port} is no live member of the service here",
            ip_of(key.family, &backend)
        )
    })?;
    let last_seen = now.saturating_sub(f.idle_ms.saturating_mul(1_000_000));
    let mut flow = NatFlow {
        backend,
        nat,
        backend_port,
        nat_port: read_port("nat_port", f.nat_port)?,
        service: ns.lb.id,
        slot,
        _pad: 0,
        flags: f.flags & FLAGS_CARRIED,
        vni: f.vni,
        reply_ack: 0,
        member_ack: f.member_ack,
        client_isn: f.client_isn,
        created_ns: now.saturating_sub(f.age_ms.saturating_mul(1_000_000)),
        last_seen_ns: last_seen,
        packets_in: 0,
        packets_out: 0,
        bytes_in: 0,
        bytes_out: 0,
    };
    let mine = t.flows.get(&key, 0).ok();
    if let Some(m) = &mine {
        if m.last_seen_ns >= last_seen || t.owns(key.family, &key.vip, m, now) {
            return Ok((key, false));
        }
    } else {
        let peers = groups
            .iter()
            .flat_map(|g| g.peers.keys())
            .collect::<BTreeSet<_>>()
            .len()
            .max(1);
        let cap = COPIES_MAX / peers;
        if lock(book).per_peer.get(peer).copied().unwrap_or(0) >= cap {
            return Err(format!("too many copies of this peer's flows here ({cap})"));
        }
    }
    let rk = reverse_key(&key, &flow);
    if t.reverse.get(&rk, 0).is_ok_and(|other| other != key) {
        return Err(format!(
            "nat_port: {} port {} is held here by another flow",
            ip_of(key.family, &nat),
            flow.nat_port
        ));
    }
    let same = mine
        .is_some_and(|m| (m.nat, m.nat_port, m.backend, m.backend_port) == (nat, flow.nat_port, backend, backend_port));
    if let (Some(m), true) = (&mine, same) {
        // The counters are this host's own.
        flow.packets_in = m.packets_in;
        flow.packets_out = m.packets_out;
        flow.bytes_in = m.bytes_in;
        flow.bytes_out = m.bytes_out;
    }
    // The flow first, then its reply (as the dataplane writes them). A new
    // copy never replaces a flow the dataplane made meanwhile.
    const BPF_NOEXIST: u64 = 1;
    t.flows
        .insert(key, flow, if mine.is_some() { 0 } else { BPF_NOEXIST })
        .map_err(|e| format!("the flow table refused the flow: {e}"))?;
    let reply_there = t.reverse.get(&rk, 0).is_ok_and(|k| k == key);
    if let Err(e) = if reply_there {
        Ok(())
    } else {
        t.reverse.insert(rk, key, BPF_NOEXIST)
    } {
        match &mine {
            Some(m) => {
                let _ = t.flows.insert(key, *m, 0);
            }
            None => {
                let _ = t.flows.remove(&key);
            }
        }
        return Err(format!("the reply table refused the flow: {e}"));
    }
    // Another flow on the tuple before (a new connection): its reply goes.
    if let (Some(m), false) = (&mine, same) {
        let old = reverse_key(&key, m);
        if t.reverse.get(&old, 0).is_ok_and(|k| k == key) {
            let _ = t.reverse.remove(&old);
        }
    }
    lock(book).add_copy(key, peer, last_seen);
    Ok((key, true))
}

/// Reads one length-delimited frame (`None`: the peer closed).
async fn read_batch<S: AsyncRead + Unpin>(s: &mut S) -> anyhow::Result<Option<pb::FlowSyncBatch>> {
    let mut len = [0u8; 4];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!(len <= MAX_FRAME, "a frame of {len} bytes (at most {MAX_FRAME})");
    let mut buf = Vec::with_capacity(len.min(64 << 10));
    (&mut *s).take(len as u64).read_to_end(&mut buf).await?;
    anyhow::ensure!(buf.len() == len, "the connection ended within a frame");
    // Counted before decoding: a frame of empty entries would decode into
    // far more memory than it takes on the wire.
    let n = entries(&buf).context("a malformed frame")?;
    anyhow::ensure!(
        n <= FRAME_FLOWS,
        "a frame of {n} flows and removals (at most {FRAME_FLOWS})"
    );
    Ok(Some(
        pb::FlowSyncBatch::decode(buf.as_slice()).context("a malformed frame")?,
    ))
}

/// The flows, removals and covered VIPs a frame holds, from its top-level
/// fields alone.
fn entries(mut buf: &[u8]) -> anyhow::Result<usize> {
    use prost::bytes::Buf as _;
    let mut n = 0;
    while buf.has_remaining() {
        let key = prost::encoding::decode_varint(&mut buf)?;
        let skip = match key & 7 {
            0 => {
                prost::encoding::decode_varint(&mut buf)?;
                0
            }
            1 => 8,
            2 => usize::try_from(prost::encoding::decode_varint(&mut buf)?)?,
            5 => 4,
            w => anyhow::bail!("wire type {w} of field {}", key >> 3),
        };
        anyhow::ensure!(skip <= buf.remaining(), "field {} runs past the frame", key >> 3);
        buf.advance(skip);
        if matches!(key >> 3, 2 | 3 | 5 | 6) {
            n += 1;
        }
    }
    Ok(n)
}

async fn write_batch<S: AsyncWrite + Unpin>(s: &mut S, b: &pb::FlowSyncBatch) -> anyhow::Result<()> {
    let buf = b.encode_to_vec();
    let write = async {
        s.write_all(&(buf.len() as u32).to_be_bytes()).await?;
        s.write_all(&buf).await?;
        s.flush().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .map_err(|_| anyhow::anyhow!("the peer took no frame for {WRITE_TIMEOUT:?}"))??;
    Ok(())
}

/// Takes the peers' connections: from the underlay address of a host that
/// holds a VIP with this one, with that host's agent certificate; its
/// frames are written. One connection per peer (a new one replaces the
/// old), [`CONNECTIONS_MAX`] in all.
async fn serve(
    listener: tokio::net::TcpListener,
    acceptor: Arc<Acceptor>,
    maps: PathBuf,
    plan: watch::Receiver<Plan>,
    book: Shared,
    seeds: Seeds,
    stats: Arc<Stats>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    let current: Arc<Mutex<HashMap<String, u64>>> = Default::default();
    loop {
        let (sock, remote) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "flow sync: accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let from_peer = plan
            .borrow()
            .groups
            .iter()
            .any(|g| g.peers.values().any(|a| IpAddr::V4(*a) == remote.ip()));
        let Ok(permit) = slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| ())
            .and_then(|p| from_peer.then_some(p).ok_or(()))
        else {
            stats.refused_peers.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(remote = %remote, "flow sync: a connection from no peer's address, or too many; closed");
            continue;
        };
        let (acceptor, maps, plan, book, seeds, stats, current2) = (
            acceptor.clone(),
            maps.clone(),
            plan.clone(),
            book.clone(),
            seeds.clone(),
            stats.clone(),
            current.clone(),
        );
        tokio::spawn(async move {
            let _permit = permit;
            let mut tls = match acceptor.accept(sock, Some(remote)).await {
                Ok(t) => t,
                Err(e) => {
                    stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(remote = %remote, error = %e, "flow sync: a connection refused");
                    return;
                }
            };
            let groups_of = |host: &str| -> Vec<Group> {
                plan.borrow()
                    .groups
                    .iter()
                    .filter(|g| g.peers.get(host).is_some_and(|a| IpAddr::V4(*a) == remote.ip()))
                    .cloned()
                    .collect()
            };
            let host = match tls.peer().identity.clone() {
                Some(i) if i.role == Role::Agent && !groups_of(&i.name).is_empty() => i.name,
                other => {
                    stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                    let who = other.map(|i| i.uri()).unwrap_or_else(|| "no identity".into());
                    tracing::warn!(remote = %remote, identity = %who, "flow sync: not the agent of a host holding a virtual IP with this one, from its address; refused");
                    return;
                }
            };
            // A peer's new connection replaces its old one (which ends at
            // its next frame).
            let generation = {
                let mut c = lock_map(&current2);
                let g = c.get(&host).map_or(0, |g| g + 1);
                c.insert(host.clone(), g);
                g
            };
            let replaced = || lock_map(&current2).get(&host) != Some(&generation);
            tracing::info!(peer = %host, remote = %remote, "flow sync: the peer's flows are taken");
            let mut tables = match tokio::task::spawn_blocking({
                let maps = maps.clone();
                move || Tables::open(&maps)
            })
            .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "flow sync: the dataplane's tables cannot be opened");
                    return;
                }
                Err(_) => return,
            };
            let mut listed: HashSet<NatKey> = HashSet::new();
            loop {
                let batch = match tokio::time::timeout(IDLE_TIMEOUT, read_batch(&mut tls)).await {
                    Ok(Ok(Some(b))) => b,
                    Ok(Ok(None)) => return,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %host, error = %format!("{e:#}"), "flow sync: the peer's connection broke");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %host, "flow sync: the peer sent nothing for {IDLE_TIMEOUT:?}; its connection closed");
                        return;
                    }
                };
                if replaced() {
                    tracing::info!(peer = %host, "flow sync: the peer connected again; its old connection closed");
                    return;
                }
                // The VIPs held with that host now (the plan may change
                // while the connection lasts).
                let groups = groups_of(&host);
                if groups.is_empty() {
                    stats.refused_peers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(peer = %host, "flow sync: the host no longer holds a virtual IP with this one; its connection closed");
                    return;
                }
                if !batch.nat_secrets.is_empty() {
                    // Only for the peer's own NAT addresses of the VIPs the
                    // two hold.
                    let own: HashSet<IpAddr> = groups
                        .iter()
                        .filter_map(|g| g.nat_of.get(&host))
                        .flat_map(|n| n.values().copied())
                        .collect();
                    let mut s = lock_map(&seeds);
                    for n in &batch.nat_secrets {
                        match read_addr("nat secret address", &n.nat, None) {
                            Ok((family, a)) if n.secret != 0 && own.contains(&ip_of(family, &a)) => {
                                s.insert((host.clone(), ip_of(family, &a)), n.secret);
                            }
                            _ => {
                                tracing::warn!(peer = %host, "flow sync: a secret for no NAT address of the peer's; ignored")
                            }
                        }
                    }
                }
                if batch.flows.is_empty() && batch.removed.is_empty() && !batch.full_done {
                    // A heartbeat.
                    continue;
                }
                let (b2, s2, h2) = (book.clone(), stats.clone(), host.clone());
                let before = stats.applied.load(Ordering::Relaxed);
                let done = tokio::task::spawn_blocking(move || {
                    let a = apply(&batch, &groups, &mut tables, &b2, &s2, &h2, &mut listed);
                    if batch.full_done {
                        prune(&mut tables, &b2, &h2, &listed, &batch.covers, &s2);
                    }
                    (tables, listed, a, batch.full_done, batch.flows.len())
                })
                .await;
                let Ok((t, l, a, full_done, n)) = done else { return };
                tables = t;
                listed = l;
                if !a.refused.is_empty() {
                    tracing::warn!(peer = %host, first = %a.refused.join("; "), "flows from a peer refused");
                }
                if full_done {
                    tracing::info!(
                        peer = %host,
                        listed = listed.len(),
                        written = stats.applied.load(Ordering::Relaxed) - before,
                        last_frame = n,
                        "flow sync: a full batch from the peer"
                    );
                    listed.clear();
                }
            }
        });
    }
}

fn lock_map<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A peer's sender: its queue and whether it must be resynchronised.
struct Link {
    tx: mpsc::Sender<Arc<pb::FlowSyncBatch>>,
    resync: Arc<AtomicBool>,
    groups: watch::Sender<Vec<Group>>,
    addr: Ipv4Addr,
    task: tokio::task::JoinHandle<()>,
}

/// Reads the dataplane's confirmed flows and the flow table, and sends
/// what moved to the peers (one sender task each).
async fn source(
    ring: aya::maps::RingBuf<MapData>,
    maps: PathBuf,
    connector: Arc<Connector>,
    port: u16,
    mut plan: watch::Receiver<Plan>,
    book: Shared,
    stats: Arc<Stats>,
) {
    // SAFETY: the ring owns its descriptor and keeps it open for as long
    // as the AsyncFd holds it.
    let mut fd = match unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) }
    {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "flow sync: the dataplane's ring cannot be read; flows are not carried");
            return;
        }
    };
    let mut links: BTreeMap<String, Link> = BTreeMap::new();
    let mut pending: HashMap<NatKey, pb::SyncedFlow> = HashMap::new();
    let mut send = tokio::time::interval(SEND_EVERY);
    let mut scan = tokio::time::interval(SCAN_EVERY);
    scan.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut current = Plan::default();
    loop {
        tokio::select! {
            changed = plan.changed() => {
                if changed.is_err() {
                    return;
                }
                current = plan.borrow_and_update().clone();
                relink(&mut links, &current, &maps, &connector, port, &stats);
            }
            guard = fd.readable_mut() => {
                let Ok(mut guard) = guard else { return };
                let now = monotonic_ns();
                let ring = guard.get_inner_mut();
                let mut book = lock(&book);
                for _ in 0..65536 {
                    let Some(item) = ring.next() else { break };
                    if item.len() < std::mem::size_of::<NatSyncEvent>() {
                        continue;
                    }
                    // SAFETY: the programs write whole events; read unaligned.
                    let e: NatSyncEvent = unsafe { std::ptr::read_unaligned(item.as_ptr() as *const NatSyncEvent) };
                    if !current.has(e.flow.vni, e.key.family, &e.key.vip) {
                        continue;
                    }
                    book.told.insert(e.key, (e.flow.last_seen_ns, e.flow.flags, e.flow.vni));
                    pending.insert(e.key, flow_pb(&e.key, &e.flow, now));
                }
                drop(book);
                guard.clear_ready();
            }
            _ = send.tick() => {
                if pending.is_empty() {
                    continue;
                }
                let batch = std::mem::take(&mut pending);
                fan_out(&links, &current, batch.into_iter().collect(), Vec::new(), &stats);
            }
            _ = scan.tick() => {
                if current.groups.is_empty() {
                    continue;
                }
                let (m, p, b) = (maps.clone(), current.clone(), book.clone());
                let Ok(Ok((moved, gone))) = tokio::task::spawn_blocking(move || changes(&m, &p, &b)).await else {
                    continue;
                };
                if !moved.is_empty() || !gone.is_empty() {
                    fan_out(&links, &current, moved, gone, &stats);
                }
            }
        }
    }
}

/// The flows of the plan's VIPs carried here that moved since the peers
/// were told, and those gone, with their VNIs (blocking: map calls).
#[allow(clippy::type_complexity)]
fn changes(
    maps: &Path,
    plan: &Plan,
    book: &Shared,
) -> anyhow::Result<(Vec<(NatKey, pb::SyncedFlow)>, Vec<(NatKey, u32)>)> {
    let table: BpfHashMap<MapData, NatKey, NatFlow> = BpfHashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(maps.join(NAT_FLOWS)).with_context(|| format!("opening pinned map {NAT_FLOWS}"))?,
    ))?;
    let now = monotonic_ns();
    let ours: Vec<(NatKey, NatFlow)> = table
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, f)| carried(f) && plan.has(f.vni, k.family, &k.vip))
        .collect();
    let seen: HashSet<NatKey> = ours.iter().map(|(k, _)| *k).collect();
    // Under the lock only the comparison; the frames are built after.
    let (moving, candidates): (Vec<(NatKey, NatFlow)>, Vec<(NatKey, u32)>) = {
        let mut book = lock(book);
        let moving: Vec<(NatKey, NatFlow)> = ours
            .into_iter()
            .filter(|(k, f)| match book.told.get(k) {
                None => true,
                Some((last, flags, _)) => *flags != f.flags || f.last_seen_ns >= last.saturating_add(REFRESH_NS),
            })
            .collect();
        for (k, f) in &moving {
            book.told.insert(*k, (f.last_seen_ns, f.flags, f.vni));
        }
        let candidates = book
            .told
            .iter()
            .filter(|(k, _)| !seen.contains(*k))
            .map(|(k, t)| (*k, t.2))
            .collect();
        (moving, candidates)
    };
    let moved = moving.iter().map(|(k, f)| (*k, flow_pb(k, f, now))).collect();
    // A walk of a table being written may miss a key: gone only if it is
    // not there when asked.
    let gone: Vec<(NatKey, u32)> = candidates
        .into_iter()
        .filter(|(k, _)| table.get(k, 0).is_err())
        .collect();
    let copies: Vec<NatKey> = {
        let mut b = lock(book);
        for (k, _) in &gone {
            b.told.remove(k);
        }
        b.copies.keys().copied().collect()
    };
    // Copies whose flow left the table (timed out here) are forgotten.
    let left: Vec<NatKey> = copies.into_iter().filter(|k| table.get(k, 0).is_err()).collect();
    let mut b = lock(book);
    for k in left {
        b.forget_copy(&k);
    }
    Ok((moved, gone))
}

/// Sends flows and removals to the peers of their VIPs, in frames of at
/// most [`FRAME_FLOWS`].
fn fan_out(
    links: &BTreeMap<String, Link>,
    plan: &Plan,
    flows: Vec<(NatKey, pb::SyncedFlow)>,
    gone: Vec<(NatKey, u32)>,
    stats: &Stats,
) {
    for g in &plan.groups {
        let mine: Vec<pb::SyncedFlow> = flows
            .iter()
            .filter(|(k, f)| g.has(f.vni, k.family, &k.vip))
            .map(|(_, f)| f.clone())
            .collect();
        let removed: Vec<pb::SyncedFlowKey> = gone
            .iter()
            .filter(|(k, vni)| g.has(*vni, k.family, &k.vip))
            .map(|(k, _)| key_pb(k))
            .collect();
        if mine.is_empty() && removed.is_empty() {
            continue;
        }
        let mut frames = Vec::new();
        for c in mine.chunks(FRAME_FLOWS) {
            frames.push(Arc::new(pb::FlowSyncBatch {
                flows: c.to_vec(),
                ..Default::default()
            }));
        }
        for c in removed.chunks(FRAME_FLOWS) {
            frames.push(Arc::new(pb::FlowSyncBatch {
                removed: c.to_vec(),
                ..Default::default()
            }));
        }
        for h in g.peers.keys() {
            let Some(l) = links.get(h) else { continue };
            for f in &frames {
                if l.tx.try_send(f.clone()).is_err() {
                    // Full or not connected: the next connection (or the
                    // next loop of this one) sends everything.
                    l.resync.store(true, Ordering::Relaxed);
                    break;
                }
                stats.sent.fetch_add(f.flows.len() as u64, Ordering::Relaxed);
            }
        }
    }
}

/// Starts a sender for each new peer, stops those no longer peers (or
/// whose underlay moved), and tells the others which VIPs they share
/// (resynchronising them when that changed).
fn relink(
    links: &mut BTreeMap<String, Link>,
    plan: &Plan,
    maps: &Path,
    connector: &Arc<Connector>,
    port: u16,
    stats: &Arc<Stats>,
) {
    let peers = plan.peers();
    links.retain(|h, l| {
        let keep = peers.get(h).is_some_and(|(a, _)| *a == l.addr);
        if !keep {
            l.task.abort();
        }
        keep
    });
    for (h, (addr, groups)) in peers {
        if let Some(l) = links.get(&h) {
            if *l.groups.borrow() != groups {
                let _ = l.groups.send(groups);
                l.resync.store(true, Ordering::Relaxed);
                // Wakes the sender if it waits on its queue.
                let _ = l.tx.try_send(Arc::new(pb::FlowSyncBatch::default()));
            }
            continue;
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let resync = Arc::new(AtomicBool::new(true));
        let (gtx, grx) = watch::channel(groups);
        let task = tokio::spawn(send_to(
            h.clone(),
            SocketAddr::new(IpAddr::V4(addr), port),
            connector.clone(),
            maps.to_path_buf(),
            rx,
            resync.clone(),
            grx,
            plan.me.clone(),
            stats.clone(),
        ));
        links.insert(
            h,
            Link {
                tx,
                resync,
                groups: gtx,
                addr,
                task,
            },
        );
    }
}

/// Keeps a connection to one peer: a full batch first (and after any batch
/// that could not be queued), then what the source sends.
#[allow(clippy::too_many_arguments)]
async fn send_to(
    host: String,
    addr: SocketAddr,
    connector: Arc<Connector>,
    maps: PathBuf,
    mut rx: mpsc::Receiver<Arc<pb::FlowSyncBatch>>,
    resync: Arc<AtomicBool>,
    groups: watch::Receiver<Vec<Group>>,
    me: String,
    stats: Arc<Stats>,
) {
    let mut logged = false;
    loop {
        let conn = async {
            let tcp = tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(addr))
                .await
                .map_err(|_| anyhow::anyhow!("connecting timed out"))??;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(tcp).await?;
            let id = sdn_proto::tls::peer_identity(&tls).map_err(anyhow::Error::msg)?;
            anyhow::ensure!(
                id.role == Role::Agent && id.name == host,
                "the peer at {addr} is {}, not the agent of {host}",
                id.uri()
            );
            Ok::<_, anyhow::Error>(tls)
        }
        .await;
        let mut tls = match conn {
            Ok(t) => t,
            Err(e) => {
                if !logged {
                    tracing::warn!(peer = %host, addr = %addr, error = %format!("{e:#}"), "flow sync: the peer cannot be reached; retrying");
                    logged = true;
                }
                resync.store(true, Ordering::Relaxed);
                tokio::time::sleep(REDIAL).await;
                continue;
            }
        };
        logged = false;
        tracing::info!(peer = %host, addr = %addr, "flow sync: connected to the peer");
        resync.store(true, Ordering::Relaxed);
        let result: anyhow::Result<()> = async {
            loop {
                if resync.swap(false, Ordering::Relaxed) {
                    // What is queued is in the full batch.
                    while rx.try_recv().is_ok() {}
                    let g = groups.borrow().clone();
                    let m = maps.clone();
                    let me = me.clone();
                    let frames = tokio::task::spawn_blocking(move || full(&m, &g, &me))
                        .await
                        .map_err(|e| anyhow::anyhow!("reading the flow table: {e}"))??;
                    let n: usize = frames.iter().map(|f| f.flows.len()).sum();
                    for f in &frames {
                        write_batch(&mut tls, f).await?;
                    }
                    stats.resyncs.fetch_add(1, Ordering::Relaxed);
                    stats.sent.fetch_add(n as u64, Ordering::Relaxed);
                    tracing::info!(peer = %host, flows = n, "flow sync: a full batch sent");
                }
                match tokio::time::timeout(HEARTBEAT, rx.recv()).await {
                    // Idle: a heartbeat, so the peer knows this end lives.
                    Err(_) => write_batch(&mut tls, &pb::FlowSyncBatch::default()).await?,
                    Ok(None) => return Ok(()),
                    Ok(Some(b)) if b.flows.is_empty() && b.removed.is_empty() => {}
                    Ok(Some(b)) => write_batch(&mut tls, &b).await?,
                }
            }
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(peer = %host, error = %format!("{e:#}"), "flow sync: the connection to the peer broke; reconnecting");
        }
        resync.store(true, Ordering::Relaxed);
        tokio::time::sleep(REDIAL).await;
    }
}

/// Every flow carried here of the VIPs shared with a peer, in frames of at
/// most [`FRAME_FLOWS`], the last one marked (blocking: map calls).
fn full(maps: &Path, groups: &[Group], me: &str) -> anyhow::Result<Vec<pb::FlowSyncBatch>> {
    let table: BpfHashMap<MapData, NatKey, NatFlow> = BpfHashMap::try_from(aya::maps::Map::HashMap(
        MapData::from_pin(maps.join(NAT_FLOWS)).with_context(|| format!("opening pinned map {NAT_FLOWS}"))?,
    ))?;
    let now = monotonic_ns();
    let flows: Vec<pb::SyncedFlow> = table
        .iter()
        .filter_map(Result::ok)
        .filter(|(k, f)| carried(f) && groups.iter().any(|g| g.has(f.vni, k.family, &k.vip)))
        .map(|(k, f)| flow_pb(&k, &f, now))
        .collect();
    let mut frames: Vec<pb::FlowSyncBatch> = flows
        .chunks(FRAME_FLOWS)
        .map(|c| pb::FlowSyncBatch {
            full: true,
            flows: c.to_vec(),
            ..Default::default()
        })
        .collect();
    if frames.is_empty() {
        frames.push(pb::FlowSyncBatch {
            full: true,
            ..Default::default()
        });
    }
    let seeds: Array<MapData, u32> = Array::try_from(aya::maps::Map::Array(
        MapData::from_pin(maps.join(NAT_SEED)).with_context(|| format!("opening pinned map {NAT_SEED}"))?,
    ))?;
    let seed = seeds.get(&0, 0).context("reading this host's secret for NAT ports")?;
    let nats: BTreeSet<IpAddr> = groups
        .iter()
        .filter_map(|g| g.nat_of.get(me))
        .flat_map(|n| n.values().copied())
        .collect();
    frames[0].nat_secrets = nats
        .iter()
        .map(|n| {
            let (family, a) = addr16(n);
            pb::NatSecret {
                nat: wire_addr(family, &a),
                secret: nat_secret(seed, &a),
            }
        })
        .collect();
    if let Some(last) = frames.last_mut() {
        last.full_done = true;
        // What the batch speaks for: the receiver prunes only those VIPs'
        // copies.
        last.covers = groups
            .iter()
            .flat_map(|g| {
                g.addresses.iter().map(|a| pb::CoveredVip {
                    vni: g.vni,
                    address: wire_addr(addr16(a).0, &addr16(a).1),
                })
            })
            .collect();
    }
    Ok(frames)
}

/// The takeovers in the dataplane (`sdn-agent counters`): each VIP address,
/// the previous owner's NAT address, the flows picked up, and whether the
/// window is open.
pub fn read_pickups(pin_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let map = MapData::from_pin(pin_dir.join("maps").join(NAT_PICKUP))
        .with_context(|| format!("opening pinned map {NAT_PICKUP}"))?;
    let table: BpfHashMap<MapData, NatPickupKey, NatPickup> = BpfHashMap::try_from(aya::maps::Map::HashMap(map))?;
    let now = monotonic_ns();
    let mut out = Vec::new();
    for e in table.iter() {
        let (k, p) = e?;
        out.push(serde_json::json!({
            "vni": k.vni,
            "address": ip_of(k.family, &k.addr).to_string(),
            "previous_nat": ip_of(k.family, &p.nat).to_string(),
            "picked": p.picked,
            "open": now < p.until_ns,
        }));
    }
    Ok(out)
}

/// A takeover whose previous owner's flows are being picked up.
struct Takeover {
    from: String,
    keys: Vec<NatPickupKey>,
    until_ns: u64,
}

/// Keeps the dataplane's takeovers (`SDN_NAT_PICKUP`): when the share
/// names this host the owner of a VIP another holder owned before, that
/// holder's NAT addresses and secret are written for [`PICKUP_WINDOW`];
/// when the VIP moves on, or the window ends, they are removed, and how
/// many flows were picked up is logged. (A handful of map calls, rarely:
/// they run on the runtime.)
async fn pickups(
    mut table: BpfHashMap<MapData, NatPickupKey, NatPickup>,
    mut plan: watch::Receiver<Plan>,
    seeds: Seeds,
) {
    // Stale entries of an agent before this one.
    let stale: Vec<NatPickupKey> = table.keys().filter_map(Result::ok).collect();
    for k in stale {
        let _ = table.remove(&k);
    }
    let mut owner_before: HashMap<String, String> = HashMap::new();
    let mut active: HashMap<String, Takeover> = HashMap::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let end = |table: &mut BpfHashMap<MapData, NatPickupKey, NatPickup>, vip: &str, t: Takeover, why: &str| {
        let picked: u64 = t
            .keys
            .iter()
            .filter_map(|k| table.get(k, 0).ok())
            .map(|p| p.picked)
            .sum();
        for k in &t.keys {
            let _ = table.remove(k);
        }
        tracing::info!(virtual_ip = %vip, previous = %t.from, picked, "flow pickup ended: {why}");
    };
    loop {
        tokio::select! {
            changed = plan.changed() => {
                if changed.is_err() {
                    return;
                }
                let p = plan.borrow_and_update().clone();
                for g in &p.groups {
                    let owner = p.owners.get(&g.vip_id);
                    let before = owner_before.get(&g.vip_id).cloned();
                    let mine = owner.is_some_and(|o| *o == p.me);
                    if !mine {
                        if let Some(t) = active.remove(&g.vip_id) {
                            end(&mut table, &g.vip_id, t, "the virtual IP moved on");
                        }
                    } else if let Some(from) = before.filter(|b| *b != p.me) {
                        if let Some(t) = active.remove(&g.vip_id) {
                            end(&mut table, &g.vip_id, t, "taken over again");
                        }
                        if let Some(t) = take_over(&mut table, g, &from, &seeds) {
                            active.insert(g.vip_id.clone(), t);
                        }
                    }
                    if let Some(o) = owner {
                        owner_before.insert(g.vip_id.clone(), o.clone());
                    }
                }
                let held: HashSet<&str> = p.groups.iter().map(|g| g.vip_id.as_str()).collect();
                owner_before.retain(|id, _| held.contains(id.as_str()));
                let gone: Vec<String> = active.keys().filter(|id| !held.contains(id.as_str())).cloned().collect();
                for id in gone {
                    if let Some(t) = active.remove(&id) {
                        end(&mut table, &id, t, "this host no longer holds the virtual IP");
                    }
                }
            }
            _ = tick.tick() => {
                let now = monotonic_ns();
                let done: Vec<String> = active.iter().filter(|(_, t)| t.until_ns <= now).map(|(id, _)| id.clone()).collect();
                for id in done {
                    if let Some(t) = active.remove(&id) {
                        end(&mut table, &id, t, "its window is over");
                    }
                }
            }
        }
    }
}

/// Writes the takeover of `g` from `from`: its NAT address of each of the
/// VIP's families, and its secret.
fn take_over(
    table: &mut BpfHashMap<MapData, NatPickupKey, NatPickup>,
    g: &Group,
    from: &str,
    seeds: &Seeds,
) -> Option<Takeover> {
    let until_ns = monotonic_ns() + PICKUP_WINDOW.as_nanos() as u64;
    let mut keys = Vec::new();
    for a in &g.addresses {
        let (family, addr) = addr16(a);
        let Some(nat) = g.nat_of.get(from).and_then(|n| n.get(a)) else {
            tracing::warn!(virtual_ip = %g.vip_id, previous = %from, address = %a, "the previous owner translates this address from no NAT address: its flows to it are not picked up");
            continue;
        };
        let Some(secret) = lock_map(seeds).get(&(from.to_string(), *nat)).copied() else {
            tracing::warn!(
                virtual_ip = %g.vip_id,
                previous = %from,
                address = %a,
                "taken over from a holder whose flow sync never told this host its secret: its flows not carried here are lost"
            );
            continue;
        };
        let key = NatPickupKey {
            vni: g.vni,
            family,
            _pad: [0; 3],
            addr,
        };
        let value = NatPickup {
            nat: addr16(nat).1,
            secret,
            _pad: 0,
            until_ns,
            picked: 0,
        };
        match table.insert(key, value, 0) {
            Ok(()) => keys.push(key),
            Err(e) => {
                tracing::warn!(virtual_ip = %g.vip_id, address = %a, error = %e, "the takeover cannot be written: the previous owner's flows not carried here are lost")
            }
        }
    }
    if keys.is_empty() {
        return None;
    }
    tracing::info!(
        virtual_ip = %g.vip_id,
        previous = %from,
        window_s = PICKUP_WINDOW.as_secs(),
        "taken over: the previous owner's flows not carried here are picked up"
    );
    Some(Takeover {
        from: from.to_string(),
        keys,
        until_ns,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> pb::SyncedFlow {
        pb::SyncedFlow {
            key: Some(pb::SyncedFlowKey {
                zone: 2,
                proto: 6,
                client: vec![198, 51, 100, 7],
                client_port: 40000,
                vip: vec![10, 0, 0, 100],
                vip_port: 80,
            }),
            vni: 7,
            member: vec![10, 0, 0, 5],
            member_port: 8080,
            nat: vec![10, 0, 0, 200],
            nat_port: 2000,
            ..Default::default()
        }
    }

    /// Keys from the wire are checked field by field, and read back as
    /// they were written.
    #[test]
    fn keys_are_checked_and_read_back() {
        let f = flow();
        let k = key_of(f.key.as_ref().unwrap()).unwrap();
        assert_eq!(
            (k.family, k.proto, k.client_port, k.vport, k.zone),
            (FAMILY_V4, 6, 40000, 80, 2)
        );
        assert_eq!(key_pb(&k), *f.key.as_ref().unwrap());
        let bad = |edit: fn(&mut pb::SyncedFlowKey), want: &str| {
            let mut k = f.key.clone().unwrap();
            edit(&mut k);
            let e = key_of(&k).unwrap_err();
            assert!(e.starts_with(want), "{e}");
        };
        bad(|k| k.proto = 1, "key.proto");
        bad(|k| k.vip = vec![1, 2, 3], "key.vip");
        bad(|k| k.client = vec![0; 16], "key.client");
        bad(|k| k.client_port = 0, "key.client_port");
        bad(|k| k.vip_port = 70000, "key.vip_port");
    }

    /// A frame's entries are counted from its top-level fields before it
    /// is decoded; a field that runs past the frame is malformed.
    #[test]
    fn frames_are_counted_before_they_are_decoded() {
        let b = pb::FlowSyncBatch {
            full: true,
            flows: vec![flow(), pb::SyncedFlow::default()],
            removed: vec![pb::SyncedFlowKey::default(); 3],
            full_done: true,
            covers: vec![pb::CoveredVip::default()],
            nat_secrets: vec![pb::NatSecret {
                nat: vec![10, 0, 0, 1],
                secret: 0x8765_4321,
            }],
        };
        let buf = b.encode_to_vec();
        assert_eq!(entries(&buf).unwrap(), 7);
        assert!(entries(&buf[..buf.len() - 1]).is_err());
        // 100,000 empty flows: 200 KB on the wire, counted, never decoded.
        let empty = vec![0x12u8, 0x00].repeat(100_000);
        assert_eq!(entries(&empty).unwrap(), 100_000);
        assert!(entries(&[0x0f]).is_err(), "wire type 7");
    }

    /// The plan shares each VIP held by hosts with its other holders, at
    /// their underlay addresses, with every holder's NAT addresses.
    #[test]
    fn the_plan_names_the_other_holders_and_their_nat_addresses() {
        let mut res = Resources::new();
        let vip = pb::VirtualIp {
            id: "va".into(),
            vpc_id: "v1".into(),
            ipv4: "10.0.0.100".into(),
            owner_host_id: "h2".into(),
            holders: ["h1", "h2"]
                .iter()
                .map(|h| pb::VipHolder {
                    host_id: h.to_string(),
                    priority: 100,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        res.insert(
            "vip/va".into(),
            pb::Resource {
                kind: Some(pb::resource::Kind::VirtualIp(pb::VirtualIpOnHost {
                    virtual_ip: Some(vip),
                    vni: 7,
                    uplink_device: "up0".into(),
                })),
                ..Default::default()
            },
        );
        let lb = pb::LoadBalancerOnHost {
            load_balancer: Some(pb::LoadBalancer {
                id: "lb".into(),
                vpc_id: "v1".into(),
                vip_v4: "10.0.0.100".into(),
                exposure: "zone".into(),
                nat_hosts: ["h1", "h2", "h3"]
                    .iter()
                    .enumerate()
                    .map(|(i, h)| pb::NatHost {
                        host_id: h.to_string(),
                        ipv4: format!("10.0.0.{}", 200 + i),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            vni: 7,
            nat_underlays: [("h1", "192.0.2.1"), ("h2", "192.0.2.2"), ("h3", "192.0.2.3")]
                .iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect(),
            ..Default::default()
        };
        res.insert(
            "lb/lb".into(),
            pb::Resource {
                kind: Some(pb::resource::Kind::LoadBalancer(lb)),
                ..Default::default()
            },
        );
        let (p, problems) = plan(&res, "h1");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(p.groups.len(), 1);
        let g = &p.groups[0];
        assert_eq!(g.peers, [("h2".to_string(), Ipv4Addr::new(192, 0, 2, 2))].into());
        let nats: Vec<String> = g.nats.iter().map(|a| a.to_string()).collect();
        assert_eq!(nats, ["10.0.0.200", "10.0.0.201"], "h3 is a NAT host, not a holder");
        // The previous owner's NAT address, should this host take over.
        assert_eq!(p.owners.get("va").map(String::as_str), Some("h2"));
        assert_eq!(p.me, "h1");
        let h2: Vec<(String, String)> = g.nat_of["h2"]
            .iter()
            .map(|(a, n)| (a.to_string(), n.to_string()))
            .collect();
        assert_eq!(h2, [("10.0.0.100".to_string(), "10.0.0.201".to_string())]);
        // h3 holds nothing: no plan.
        assert!(plan(&res, "h3").0.groups.is_empty());
    }
}
