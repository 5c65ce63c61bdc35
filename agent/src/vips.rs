//! The virtual IPs this host holds on its zone uplinks, as one of a load
//! balancer's NAT hosts: a VRRPv3 speaker for each on the uplink, and the
//! controller's word on who may act.
//!
//! - The speaker elects, with the other holders (and any VRRP peer on the
//!   link, keepalived included), which holder is Master.
//! - A Master claims the virtual IP from the controller every advertisement
//!   interval (`Agent.ClaimVirtualIps`, one call for all of them). A grant
//!   carries the epoch and a lease of three intervals counted from when the
//!   claim was sent.
//! - This host answers for the address only while it is Master, holds a
//!   grant of the highest epoch it has seen in its share, and the lease
//!   runs: then the address is on the uplink (the kernel answers ARP) and
//!   `SDN_VIP_LEASES` lets the dataplane answer and translate until the
//!   lease's end. The dataplane checks that end itself, so a host whose
//!   agent dies, or that loses the controller, stops answering when its
//!   lease ends, before the controller grants another holder.
//! - On taking the address it announces it (gratuitous ARP). Falling back
//!   to Backup, or leaving, it releases the lease at once, so the new
//!   Master is granted without waiting for it.
//!
//! Virtual IPs held by ports (tenant VMs running their own VRRP): the VM
//! speaks, and the relay programs record each holder port's last
//! advertisement (`SDN_VRRP_SEEN`). While a holder port here advertises
//! (a priority above 0, within two of its intervals), this host claims
//! the virtual IP for that port every interval of the virtual IP; when it
//! stops, or resigns, the claim is released. The grant moves the
//! virtual IP's owner in the share, and every host of the VPC then routes
//! its addresses to that port (`compile::vrrp`).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use dataplane_common::maps::{VipLease, VrrpSeen, VrrpSeenKey, ZoneAddrKey, VIP_LEASES, VRRP_SEEN};
use dataplane_common::{FAMILY_V4, FAMILY_V6};
use futures::TryStreamExt as _;
use sdn_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

use crate::compile::Resources;
use crate::vrrp::machine::{Config, State};
use crate::vrrp::speaker::{self, Event, Link};

/// One virtual IP this host holds, as its share says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub id: String,
    pub uplink: String,
    /// The VRRP router, its source the uplink's first IPv4 address (or,
    /// for an IPv6 VIP alone, its link-local address).
    pub cfg: Config,
    /// Every address of the virtual IP (the VRRP router protects the
    /// IPv4 one when there is one).
    pub addresses: Vec<IpAddr>,
    /// The highest epoch the share says was granted.
    pub epoch: u64,
}

/// The virtual IPs this host holds in `res`, and why any cannot be held.
/// `addrs` lists an interface's addresses: the VRRP source is the
/// uplink's first IPv4 address that is no virtual IP's.
pub fn held(res: &Resources, host: &str, addrs: &dyn Fn(&str) -> Vec<IpAddr>) -> (Vec<Held>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let vips: std::collections::BTreeSet<IpAddr> = res
        .values()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::VirtualIp(on)) => on.virtual_ip.as_ref(),
            _ => None,
        })
        .flat_map(|v| [v.ipv4.parse::<IpAddr>().ok(), v.ipv6.parse::<IpAddr>().ok()])
        .flatten()
        .collect();
    let first_v4 = |name: &str| {
        addrs(name).into_iter().find_map(|a| match a {
            IpAddr::V4(x) if !vips.contains(&a) => Some(x),
            _ => None,
        })
    };
    for r in res.values() {
        let Some(pb::resource::Kind::VirtualIp(on)) = &r.kind else {
            continue;
        };
        let Some(v) = &on.virtual_ip else { continue };
        let Some(me) = v.holders.iter().find(|h| h.host_id == host) else {
            continue;
        };
        if on.uplink_device.is_empty() {
            problems.push(format!("virtual ip {}: its VPC has no zone uplink", v.id));
            continue;
        }
        let v4 = v.ipv4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4);
        let v6 = v.ipv6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
        // VRRP over IPv4 when the VIP has an IPv4 address (its IPv6 one
        // goes along: announced and answered with it); over IPv6 from the
        // uplink's link-local address for an IPv6 VIP alone.
        let (protected, source) = match (v4, v6) {
            (Some(a), _) => match first_v4(&on.uplink_device) {
                Some(s) => (a, IpAddr::V4(s)),
                None => {
                    problems.push(format!(
                        "virtual ip {}: uplink {} has no IPv4 address to speak VRRP from",
                        v.id, on.uplink_device
                    ));
                    continue;
                }
            },
            (None, Some(a)) => {
                let ll = addrs(&on.uplink_device).into_iter().find_map(|x| match x {
                    IpAddr::V6(x) if x.is_unicast_link_local() => Some(x),
                    _ => None,
                });
                match ll {
                    Some(s) => (a, IpAddr::V6(s)),
                    None => {
                        problems.push(format!(
                            "virtual ip {}: uplink {} has no IPv6 link-local address to speak VRRP from",
                            v.id, on.uplink_device
                        ));
                        continue;
                    }
                }
            }
            (None, None) => {
                problems.push(format!("virtual ip {}: no address", v.id));
                continue;
            }
        };
        let addresses: Vec<IpAddr> = v4.into_iter().chain(v6).collect();
        out.push(Held {
            id: v.id.clone(),
            uplink: on.uplink_device.clone(),
            cfg: Config {
                vrid: v.vrid.min(255) as u8,
                priority: me.priority.clamp(1, 254) as u8,
                interval_cs: v.advert_interval_cs.clamp(1, 4095) as u16,
                preempt: !v.no_preempt,
                addresses: vec![protected],
                primary: source,
            },
            addresses,
            epoch: v.epoch,
        });
    }
    (out, problems)
}

/// A virtual IP a holder port here may speak for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortHeld {
    pub id: String,
    pub port_id: String,
    /// The port's device.
    pub ifindex: u32,
    pub vrid: u8,
    /// The virtual IP's advertisement interval (the claims' pace), in
    /// centiseconds.
    pub interval_cs: u16,
}

/// The virtual IPs held by ports that ports here hold; `ifindex` gives a
/// port's device.
pub fn port_held(res: &Resources, ifindex: &dyn Fn(&str) -> Option<u32>) -> Vec<PortHeld> {
    let local: BTreeMap<&str, &str> = res
        .values()
        .filter_map(|r| match &r.kind {
            Some(pb::resource::Kind::Port(p)) => Some((p.id.as_str(), p.device.as_str())),
            _ => None,
        })
        .collect();
    let mut out = Vec::new();
    for r in res.values() {
        let Some(pb::resource::Kind::VirtualIp(on)) = &r.kind else {
            continue;
        };
        let Some(v) = &on.virtual_ip else { continue };
        if !on.uplink_device.is_empty() {
            continue;
        }
        for h in &v.holders {
            let Some(ifx) = local.get(h.port_id.as_str()).and_then(|d| ifindex(d)) else {
                continue;
            };
            out.push(PortHeld {
                id: v.id.clone(),
                port_id: h.port_id.clone(),
                ifindex: ifx,
                vrid: v.vrid.min(255) as u8,
                interval_cs: port_interval_cs(v),
            });
        }
    }
    out
}

/// The advertisement interval of a virtual IP held by ports, in
/// centiseconds (0 in the API: 10), as the relay enforces it and the
/// agent paces its claims.
pub fn port_interval_cs(v: &pb::VirtualIp) -> u16 {
    if v.advert_interval_cs == 0 {
        10
    } else {
        v.advert_interval_cs.min(4095) as u16
    }
}

/// Whether an advertisement last seen `age_ns` ago still says its port
/// speaks: within two intervals (its own, no longer than the virtual IP's
/// `interval_cs`; the relay refuses longer ones), and 100 ms for the
/// scheduling of both ends.
fn speaks(seen: &VrrpSeen, interval_cs: u16, age_ns: u64) -> bool {
    let interval_ns = u64::from(seen.interval_cs.min(interval_cs).max(1)) * 10_000_000;
    seen.priority > 0 && age_ns <= 2 * interval_ns + 100_000_000
}

/// Counts for the metrics and the tests.
#[derive(Debug, Default)]
pub struct Stats {
    pub claims_granted: AtomicU64,
    pub claims_refused: AtomicU64,
    pub claims_failed: AtomicU64,
    pub taken: AtomicU64,
    pub given_up: AtomicU64,
}

/// The manager of the held virtual IPs.
pub struct Vips {
    want: watch::Sender<Vec<Held>>,
    want_ports: watch::Sender<Vec<PortHeld>>,
    pub stats: Arc<Stats>,
}

impl Vips {
    /// Starts the manager (within a runtime); `pin_dir` holds the maps.
    pub fn start(host: String, controllers: Vec<String>, pin_dir: &Path) -> anyhow::Result<Vips> {
        let map = MapData::from_pin(pin_dir.join("maps").join(VIP_LEASES))
            .with_context(|| format!("opening pinned map {VIP_LEASES}"))?;
        let leases: BpfHashMap<MapData, ZoneAddrKey, VipLease> = BpfHashMap::try_from(aya::maps::Map::HashMap(map))?;
        let map = MapData::from_pin(pin_dir.join("maps").join(VRRP_SEEN))
            .with_context(|| format!("opening pinned map {VRRP_SEEN}"))?;
        let seen: BpfHashMap<MapData, VrrpSeenKey, VrrpSeen> = BpfHashMap::try_from(aya::maps::Map::HashMap(map))?;
        let (tx, rx) = watch::channel(Vec::new());
        let (ports_tx, ports_rx) = watch::channel(Vec::new());
        let stats = Arc::new(Stats::default());
        tokio::spawn(manage(host, controllers, (leases, seen), (rx, ports_rx), stats.clone()));
        Ok(Vips {
            want: tx,
            want_ports: ports_tx,
            stats,
        })
    }

    /// The virtual IPs held by ports here.
    pub fn set_ports(&self, held: Vec<PortHeld>) {
        self.want_ports.send_if_modified(|w| {
            let changed = *w != held;
            if changed {
                *w = held;
            }
            changed
        });
    }

    pub fn set(&self, held: Vec<Held>) {
        self.want.send_if_modified(|w| {
            let changed = *w != held;
            if changed {
                *w = held;
            }
            changed
        });
    }
}

/// One held virtual IP's state.
struct Vip {
    held: Held,
    /// The speaker's generation: events of an earlier one are stale.
    gen: u64,
    stop: watch::Sender<bool>,
    master: bool,
    /// The epoch granted to us, and until when (from the claim's sending).
    granted: Option<(u64, Instant)>,
    /// That end on the dataplane's clock, reckoned once per grant.
    granted_ns: u64,
    /// The lease as last written to the dataplane (written again only
    /// when it changes).
    written: Option<VipLease>,
    /// Whether this host answers for the address now (shared with the
    /// gratuitous ARPs, which stop when it stops).
    answering: Arc<AtomicBool>,
    /// The lease as last written: when answering began, and its end (or,
    /// once over, when it stopped).
    since_ns: u64,
    until_ns: u64,
}

/// A virtual IP a holder port here may speak for, and what it does.
struct PortVip {
    held: PortHeld,
    /// The port advertises as Master.
    speaking: bool,
    /// The last claim for it was granted.
    granted: bool,
}

impl Vip {
    fn authoritative(&self, now: Instant) -> bool {
        self.master
            && self
                .granted
                .is_some_and(|(e, until)| e >= self.held.epoch && now < until)
    }
}

fn key(a: IpAddr) -> ZoneAddrKey {
    let (family, addr) = match a {
        IpAddr::V4(a) => {
            let mut x = [0u8; 16];
            x[..4].copy_from_slice(&a.octets());
            (FAMILY_V4, x)
        }
        IpAddr::V6(a) => (FAMILY_V6, a.octets()),
    };
    ZoneAddrKey {
        family,
        _pad: [0; 3],
        addr,
    }
}

/// The dataplane's clock when `at` comes, early by one tick of the
/// programs' coarse clock (10 ms at the slowest) and a thousandth of the
/// time left (the two clocks' rates may differ a little).
fn mono_ns(at: Instant) -> u64 {
    let ahead = at.saturating_duration_since(Instant::now());
    let margin = 10_000_000 + ahead.as_nanos() as u64 / 1000;
    (crate::dataplane::monotonic_ns() + ahead.as_nanos() as u64).saturating_sub(margin)
}

/// Whether `uplink` has its carrier (a link that is down speaks no VRRP,
/// so its holder must not go on claiming).
fn carrier(uplink: &str) -> bool {
    std::fs::read_to_string(format!("/sys/class/net/{uplink}/carrier")).is_ok_and(|s| s.trim() == "1")
}

/// What reaches the manager from a speaker.
enum Msg {
    Event(Event),
    /// The speaker ended (an error, or the link went away).
    Stopped(String),
}

type Client = pb::agent_client::AgentClient<tonic::transport::Channel>;

/// The answer to one call of claims: when it was sent, and the grants.
type Answer = (Instant, Vec<pb::VipClaim>, Result<Vec<pb::VipGrant>, String>);

struct Manager {
    host: String,
    controllers: Arc<Vec<String>>,
    leases: BpfHashMap<MapData, ZoneAddrKey, VipLease>,
    seen: BpfHashMap<MapData, VrrpSeenKey, VrrpSeen>,
    stats: Arc<Stats>,
    vips: BTreeMap<String, Vip>,
    wanted: BTreeMap<String, Held>,
    /// Virtual IPs held by ports here, by id and port.
    ports: BTreeMap<(String, String), PortVip>,
    /// Releases owed to the controller (held no more, or no longer Master),
    /// with the port they were claimed for (empty: this host).
    releases: std::collections::BTreeSet<(String, String)>,
    gen: u64,
    ev_tx: mpsc::UnboundedSender<(String, u64, Msg)>,
    /// Speakers to start again, not before this.
    retry_at: Option<Instant>,
    /// The connection claims go over, kept between calls.
    client: Arc<tokio::sync::Mutex<Option<Client>>>,
    next: usize,
    in_flight: bool,
    last_claim: Instant,
    /// When the uplinks' carriers were last read (every 100 ms).
    links_checked: Instant,
}

async fn manage(
    host: String,
    controllers: Vec<String>,
    (leases, seen): (
        BpfHashMap<MapData, ZoneAddrKey, VipLease>,
        BpfHashMap<MapData, VrrpSeenKey, VrrpSeen>,
    ),
    (mut want, mut want_ports): (watch::Receiver<Vec<Held>>, watch::Receiver<Vec<PortHeld>>),
    stats: Arc<Stats>,
) {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(String, u64, Msg)>();
    let (ans_tx, mut ans_rx) = mpsc::unbounded_channel::<Answer>();
    // The leases an earlier process left run on in the dataplane until
    // their end; the addresses of those that no longer run leave the
    // uplink (see `reconcile`).
    let mut m = Manager {
        host,
        controllers: Arc::new(controllers),
        leases,
        seen,
        stats,
        vips: BTreeMap::new(),
        wanted: BTreeMap::new(),
        ports: BTreeMap::new(),
        releases: Default::default(),
        gen: 0,
        ev_tx,
        retry_at: None,
        client: Default::default(),
        next: 0,
        in_flight: false,
        last_claim: Instant::now() - Duration::from_secs(60),
        links_checked: Instant::now(),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            changed = want.changed() => {
                if changed.is_err() {
                    m.shutdown().await;
                    return;
                }
                m.wanted = want.borrow_and_update().iter().map(|h| (h.id.clone(), h.clone())).collect();
                m.reconcile().await;
            }
            changed = want_ports.changed() => {
                if changed.is_err() {
                    continue;
                }
                let held = want_ports.borrow_and_update().clone();
                m.set_ports(held);
            }
            Some((id, gen, msg)) = ev_rx.recv() => {
                if m.vips.get(&id).is_none_or(|v| v.gen != gen) {
                    // An earlier speaker's.
                    continue;
                }
                match msg {
                    Msg::Event(e) => m.on_event(&id, e).await,
                    Msg::Stopped(why) => {
                        tracing::warn!(virtual_ip = %id, why, "VRRP speaker stopped: not holding the virtual ip; started again within a second");
                        m.drop_vip(&id).await;
                        m.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    }
                }
            }
            Some((sent, claims, answer)) = ans_rx.recv() => {
                m.in_flight = false;
                m.on_answer(sent, &claims, answer);
                m.enforce().await;
            }
            _ = tick.tick() => {
                m.check_links().await;
                m.check_ports();
                if m.retry_at.is_some_and(|t| Instant::now() >= t) {
                    m.retry_at = None;
                    m.reconcile().await;
                }
                m.maybe_claim(&ans_tx);
                m.enforce().await;
            }
        }
    }
}

impl Manager {
    async fn on_event(&mut self, id: &str, e: Event) {
        let Some(v) = self.vips.get_mut(id) else { return };
        match e {
            Event::State(State::Master) => {
                tracing::info!(virtual_ip = %id, "VRRP master: claiming the virtual ip");
                v.master = true;
                self.releases.remove(&(id.to_string(), String::new()));
                // Claim at once.
                self.last_claim = Instant::now() - Duration::from_secs(60);
            }
            Event::State(s) => {
                if v.master {
                    tracing::info!(virtual_ip = %id, state = s.name(), "VRRP: no longer master; releasing the virtual ip");
                    self.releases.insert((id.to_string(), String::new()));
                }
                v.master = false;
                v.granted = None;
            }
            Event::Discarded { from, why } => {
                tracing::debug!(virtual_ip = %id, %from, why, "VRRP advertisements discarded");
                return;
            }
            Event::Mismatch { from, addresses } => {
                tracing::warn!(virtual_ip = %id, %from, ?addresses, "a VRRP peer of this router protects other addresses");
                return;
            }
            Event::OldChecksum { from } => {
                tracing::info!(virtual_ip = %id, %from, "a VRRP peer uses keepalived's pre-1.3.6 unicast checksum");
                return;
            }
        }
        self.enforce().await;
    }

    /// Stops a speaker: its address leaves the uplink, its lease ends in
    /// the dataplane now, and a release is owed if it was Master.
    async fn drop_vip(&mut self, id: &str) {
        let Some(v) = self.vips.remove(id) else { return };
        let _ = v.stop.send(true);
        if v.master {
            self.releases.insert((id.to_string(), String::new()));
        }
        v.answering.store(false, Relaxed);
        let now_ns = crate::dataplane::monotonic_ns();
        for a in &v.held.addresses {
            let lease = VipLease {
                until_ns: v.until_ns.min(now_ns),
                epoch: v.granted.map_or(0, |(e, _)| e),
                since_ns: v.since_ns,
            };
            let _ = self.leases.insert(key(*a), lease, 0);
        }
        remove_address(&v.held.uplink, &v.held.addresses).await;
    }

    /// Takes the virtual IPs held by ports here; a port that no longer
    /// holds one (or whose holding changed) and spoke for it releases it.
    fn set_ports(&mut self, held: Vec<PortHeld>) {
        let mut next: BTreeMap<(String, String), PortVip> = BTreeMap::new();
        for h in held {
            let key = (h.id.clone(), h.port_id.clone());
            let old = match self.ports.remove(&key) {
                Some(p) if p.held == h => Some(p),
                Some(p) => {
                    self.ports.insert(key.clone(), p);
                    None
                }
                None => None,
            };
            next.insert(
                key,
                old.unwrap_or(PortVip {
                    held: h,
                    speaking: false,
                    granted: false,
                }),
            );
        }
        for (key, p) in std::mem::take(&mut self.ports) {
            if p.speaking {
                tracing::info!(virtual_ip = %key.0, port = %key.1, "port no longer holds the virtual ip as it did: releasing");
                self.releases.insert(key);
            }
        }
        self.ports = next;
    }

    /// Reads which holder ports here speak for their virtual IPs: one
    /// that begins is claimed for at once; one that stops (silence, or a
    /// priority of 0) is released.
    fn check_ports(&mut self) {
        if self.ports.is_empty() {
            return;
        }
        let now = crate::dataplane::monotonic_ns();
        for p in self.ports.values_mut() {
            let k = VrrpSeenKey {
                ifindex: p.held.ifindex,
                vrid: p.held.vrid,
                family: dataplane_common::FAMILY_V4,
                _pad: [0; 2],
            };
            let speaking = self
                .seen
                .get(&k, 0)
                .is_ok_and(|s| speaks(&s, p.held.interval_cs, now.saturating_sub(s.last_ns)));
            if speaking && !p.speaking {
                tracing::info!(virtual_ip = %p.held.id, port = %p.held.port_id, "port speaks VRRP for the virtual ip: claiming it");
                self.releases.remove(&(p.held.id.clone(), p.held.port_id.clone()));
                self.last_claim = Instant::now() - Duration::from_secs(60);
            } else if !speaking && p.speaking {
                tracing::info!(virtual_ip = %p.held.id, port = %p.held.port_id, "port stopped speaking VRRP for the virtual ip: releasing it");
                self.releases.insert((p.held.id.clone(), p.held.port_id.clone()));
                p.granted = false;
            }
            p.speaking = speaking;
        }
    }

    /// A holder whose uplink lost its carrier stands back until it is back.
    async fn check_links(&mut self) {
        if self.links_checked.elapsed() < Duration::from_millis(100) {
            return;
        }
        self.links_checked = Instant::now();
        let down: Vec<String> = self
            .vips
            .iter()
            .filter(|(_, v)| !carrier(&v.held.uplink))
            .map(|(id, _)| id.clone())
            .collect();
        for id in down {
            tracing::warn!(virtual_ip = %id, "uplink down: not holding the virtual ip until it is up");
            self.drop_vip(&id).await;
            self.retry_at = Some(Instant::now() + Duration::from_secs(1));
        }
    }

    /// Starts, restarts and stops speakers to match what is wanted.
    async fn reconcile(&mut self) {
        let gone: Vec<String> = self
            .vips
            .iter()
            .filter(|(id, v)| {
                self.wanted
                    .get(*id)
                    .is_none_or(|w| w.cfg != v.held.cfg || w.uplink != v.held.uplink || w.addresses != v.held.addresses)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            self.drop_vip(&id).await;
            tracing::info!(virtual_ip = %id, "no longer held here, or changed: speaker stopped");
        }
        // Leases of addresses no longer held here.
        let keep: std::collections::BTreeSet<ZoneAddrKey> = self
            .wanted
            .values()
            .flat_map(|h| h.addresses.iter().map(|a| key(*a)))
            .collect();
        let stale: Vec<ZoneAddrKey> = self
            .leases
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep.contains(k))
            .collect();
        for k in stale {
            let _ = self.leases.remove(&k);
        }
        let wanted: Vec<Held> = self.wanted.values().cloned().collect();
        for h in wanted {
            if let Some(v) = self.vips.get_mut(&h.id) {
                // The epoch seen may move on alone.
                v.held.epoch = h.epoch;
                continue;
            }
            let id = h.id.clone();
            if !carrier(&h.uplink) {
                self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                continue;
            }
            let link = match Link::of(&h.uplink) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(virtual_ip = %id, uplink = %h.uplink, error = %e, "uplink not found; the virtual ip is not held here yet");
                    self.retry_at = Some(Instant::now() + Duration::from_secs(1));
                    continue;
                }
            };
            // Fenced until granted, unless a lease an earlier process was
            // granted still runs (it ends by itself); with none, the
            // address leaves the uplink.
            let running = h.addresses.iter().any(|a| {
                self.leases
                    .get(&key(*a), 0)
                    .is_ok_and(|l| l.until_ns > crate::dataplane::monotonic_ns())
            });
            if !running {
                for a in &h.addresses {
                    let _ = self.leases.insert(key(*a), VipLease::default(), 0);
                }
                remove_address(&h.uplink, &h.addresses).await;
            }
            self.gen += 1;
            let gen = self.gen;
            let (stop_tx, stop_rx) = watch::channel(false);
            let (tx, mut rx) = mpsc::unbounded_channel();
            let fwd = self.ev_tx.clone();
            let name = id.clone();
            let cfg = h.cfg.clone();
            tokio::spawn(async move {
                let run = tokio::spawn(speaker::run(cfg, link, tx, stop_rx, false));
                while let Some(e) = rx.recv().await {
                    if fwd.send((name.clone(), gen, Msg::Event(e))).is_err() {
                        return;
                    }
                }
                // The speaker's channel closed: it ended.
                let why = match run.await {
                    Ok(Ok(())) => "stopped".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                };
                let _ = fwd.send((name, gen, Msg::Stopped(why)));
            });
            tracing::info!(virtual_ip = %id, uplink = %h.uplink, vrid = h.cfg.vrid, priority = h.cfg.priority, interval_cs = h.cfg.interval_cs, "VRRP speaker started");
            self.vips.insert(
                id,
                Vip {
                    held: h,
                    gen,
                    stop: stop_tx,
                    master: false,
                    granted: None,
                    granted_ns: 0,
                    written: None,
                    answering: Arc::new(AtomicBool::new(false)),
                    since_ns: 0,
                    until_ns: 0,
                },
            );
        }
    }

    /// Sends the claims and releases due, one call at a time, in a task of
    /// its own (the manager goes on fencing meanwhile).
    fn maybe_claim(&mut self, answers: &mpsc::UnboundedSender<Answer>) {
        if self.in_flight {
            return;
        }
        let interval = self
            .vips
            .values()
            .map(|v| v.held.cfg.interval_cs)
            .chain(self.ports.values().map(|p| p.held.interval_cs))
            .map(|cs| Duration::from_millis(10 * u64::from(cs)))
            .min()
            .unwrap_or(Duration::from_secs(1));
        let masters = self.vips.values().any(|v| v.master) || self.ports.values().any(|p| p.speaking);
        if self.releases.is_empty() && !(masters && self.last_claim.elapsed() >= interval) {
            return;
        }
        // One entry per virtual IP in a call (the controller refuses a
        // second). Releases go first: a port's claim of a virtual IP that
        // another port here still owes a release of waits for the next
        // call, 20 ms on, so the controller hears of the release first.
        let mut claims: Vec<pb::VipClaim> = Vec::new();
        let mut named: std::collections::BTreeSet<String> = std::collections::BTreeSet::new();
        for (id, port) in &self.releases {
            if named.insert(id.clone()) {
                claims.push(pb::VipClaim {
                    virtual_ip_id: id.clone(),
                    port_id: port.clone(),
                    release: true,
                });
            }
        }
        let wanted = self
            .vips
            .iter()
            .filter(|(_, v)| v.master)
            .map(|(id, _)| (id.clone(), String::new()))
            .chain(
                self.ports
                    .values()
                    .filter(|p| p.speaking)
                    .map(|p| (p.held.id.clone(), p.held.port_id.clone())),
            );
        for (id, port) in wanted {
            if named.insert(id.clone()) {
                claims.push(pb::VipClaim {
                    virtual_ip_id: id,
                    port_id: port,
                    release: false,
                });
            }
        }
        claims.truncate(crate::vips::CLAIMS_PER_CALL);
        self.last_claim = Instant::now();
        self.in_flight = true;
        let host = self.host.clone();
        let controllers = self.controllers.clone();
        let cached = self.client.clone();
        let next = self.next;
        self.next += 1;
        let answers = answers.clone();
        // A late answer is no use: the lease counts from the sending.
        let wait = interval.max(Duration::from_millis(100)) * 3;
        tokio::spawn(async move {
            let sent = Instant::now();
            let mut slot = cached.lock().await;
            if slot.is_none() && !controllers.is_empty() {
                let addr = &controllers[next % controllers.len()];
                if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(1), sdn_proto::connect(addr)).await {
                    *slot = Some(Client::new(ch));
                }
            }
            let answer = match slot.as_mut() {
                None => Err("no controller reachable".to_string()),
                Some(cl) => {
                    match tokio::time::timeout(
                        wait,
                        cl.claim_virtual_ips(pb::VipClaims {
                            host_id: host,
                            claims: claims.clone(),
                        }),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Ok(r.into_inner().grants),
                        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
                        Err(_) => Err("timed out".to_string()),
                    }
                }
            };
            if answer.is_err() {
                // Another controller, or a new connection, next time.
                *slot = None;
            }
            drop(slot);
            let _ = answers.send((sent, claims, answer));
        });
    }

    /// Takes the controller's answers, one per claim sent, in order.
    fn on_answer(&mut self, sent: Instant, claims: &[pb::VipClaim], answer: Result<Vec<pb::VipGrant>, String>) {
        let grants = match answer {
            Ok(g) if g.len() == claims.len() => g,
            Ok(g) => {
                self.stats.claims_failed.fetch_add(1, Relaxed);
                tracing::warn!(
                    claims = claims.len(),
                    answers = g.len(),
                    "the controller answered another number of claims than were sent; made again"
                );
                return;
            }
            Err(e) => {
                self.stats.claims_failed.fetch_add(1, Relaxed);
                tracing::warn!(error = %e, "virtual ip claims failed; made again");
                return;
            }
        };
        for (c, g) in claims.iter().zip(grants) {
            let key = (c.virtual_ip_id.clone(), c.port_id.clone());
            if c.release {
                // Answered: released, or refused for good (the virtual IP,
                // or this holder of it, is gone).
                if g.reason != "released" {
                    tracing::debug!(virtual_ip = %key.0, port = %key.1, reason = %g.reason, "release answered");
                }
                self.releases.remove(&key);
                continue;
            }
            if self.releases.contains(&key) {
                // Released since the claim was sent.
                continue;
            }
            if !c.port_id.is_empty() {
                let Some(p) = self.ports.get_mut(&key).filter(|p| p.speaking) else {
                    continue;
                };
                if g.granted {
                    self.stats.claims_granted.fetch_add(1, Relaxed);
                    if !p.granted {
                        self.stats.taken.fetch_add(1, Relaxed);
                        tracing::info!(virtual_ip = %key.0, port = %key.1, epoch = g.epoch, "virtual ip granted to the port that speaks for it");
                    }
                } else {
                    self.stats.claims_refused.fetch_add(1, Relaxed);
                    if p.granted {
                        tracing::warn!(virtual_ip = %key.0, port = %key.1, reason = %g.reason, "claim for the port refused");
                    } else {
                        tracing::debug!(virtual_ip = %key.0, port = %key.1, reason = %g.reason, "claim for the port refused");
                    }
                }
                p.granted = g.granted;
                continue;
            }
            let Some(v) = self.vips.get_mut(&g.virtual_ip_id) else {
                continue;
            };
            if !v.master {
                continue;
            }
            if g.granted {
                self.stats.claims_granted.fetch_add(1, Relaxed);
                let until = sent + Duration::from_millis(u64::from(g.lease_ms));
                v.granted = Some((g.epoch, until));
                v.granted_ns = mono_ns(until);
            } else {
                self.stats.claims_refused.fetch_add(1, Relaxed);
                if v.granted.is_some() || v.answering.load(Relaxed) {
                    tracing::warn!(virtual_ip = %g.virtual_ip_id, reason = %g.reason, "claim refused: not answering for the virtual ip");
                } else {
                    tracing::debug!(virtual_ip = %g.virtual_ip_id, reason = %g.reason, "claim refused");
                }
                v.granted = None;
            }
        }
    }

    /// Makes the dataplane and the uplink answer for exactly the virtual
    /// IPs this host is authoritative for, until their leases end.
    async fn enforce(&mut self) {
        let now = Instant::now();
        for (id, v) in self.vips.iter_mut() {
            let auth = v.authoritative(now);
            let now_ns = crate::dataplane::monotonic_ns();
            let answering = v.answering.load(Relaxed);
            let lease = match (auth, v.granted) {
                (true, Some((epoch, _))) => {
                    if !answering {
                        v.since_ns = now_ns;
                    }
                    v.until_ns = v.granted_ns;
                    VipLease {
                        until_ns: v.until_ns,
                        epoch,
                        since_ns: v.since_ns,
                    }
                }
                _ => {
                    // Over: the end stays, or becomes now if it was later.
                    v.until_ns = v.until_ns.min(now_ns);
                    VipLease {
                        until_ns: v.until_ns,
                        epoch: v.granted.map_or(0, |(e, _)| e),
                        since_ns: v.since_ns,
                    }
                }
            };
            let mut written = true;
            if v.written != Some(lease) {
                for a in &v.held.addresses {
                    if let Err(e) = self.leases.insert(key(*a), lease, 0) {
                        written = false;
                        tracing::error!(virtual_ip = %id, address = %a, error = %e, "lease not written");
                    }
                }
                v.written = written.then_some(lease);
            }
            if auth && !answering && written {
                v.answering.store(true, Relaxed);
                self.stats.taken.fetch_add(1, Relaxed);
                add_address(&v.held.uplink, &v.held.addresses).await;
                tracing::info!(virtual_ip = %id, epoch = lease.epoch, uplink = %v.held.uplink, "answering for the virtual ip");
                announce(&v.held.uplink, &v.held.addresses, v.answering.clone());
            } else if !auth && answering {
                v.answering.store(false, Relaxed);
                self.stats.given_up.fetch_add(1, Relaxed);
                remove_address(&v.held.uplink, &v.held.addresses).await;
                let why = if !v.master {
                    "no longer VRRP master"
                } else if v.granted.is_some_and(|(e, _)| e < v.held.epoch) {
                    "a higher epoch was granted to another holder"
                } else {
                    "lease ran out"
                };
                tracing::warn!(virtual_ip = %id, why, "no longer answering for the virtual ip");
            }
        }
    }

    /// The agent stops: every speaker resigns, every lease ends here now,
    /// and the controller hears of it (so another holder need not wait).
    async fn shutdown(&mut self) {
        let ids: Vec<String> = self.vips.keys().cloned().collect();
        for id in ids {
            self.drop_vip(&id).await;
        }
        if self.releases.is_empty() || self.controllers.is_empty() {
            return;
        }
        let claims = self
            .releases
            .iter()
            .map(|(id, port)| pb::VipClaim {
                virtual_ip_id: id.clone(),
                port_id: port.clone(),
                release: true,
            })
            .collect();
        let addr = &self.controllers[self.next % self.controllers.len()];
        let call = async {
            let ch = sdn_proto::connect(addr).await.ok()?;
            Client::new(ch)
                .claim_virtual_ips(pb::VipClaims {
                    host_id: self.host.clone(),
                    claims,
                })
                .await
                .ok()
        };
        let _ = tokio::time::timeout(Duration::from_millis(500), call).await;
    }
}

/// Claims in one call, at most (the controller's limit).
pub const CLAIMS_PER_CALL: usize = 1024;

/// The leases in the dataplane under `pin_dir`, for `sdn-agent counters`:
/// each address, its epoch, when answering began and ends (or ended),
/// and the clock now, in `CLOCK_MONOTONIC` nanoseconds.
pub fn read_leases(pin_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let map = MapData::from_pin(pin_dir.join("maps").join(VIP_LEASES))
        .with_context(|| format!("opening pinned map {VIP_LEASES}"))?;
    let leases: BpfHashMap<MapData, ZoneAddrKey, VipLease> = BpfHashMap::try_from(aya::maps::Map::HashMap(map))?;
    let now = crate::dataplane::monotonic_ns();
    let mut out = Vec::new();
    for e in leases.iter() {
        let (k, l) = e?;
        let addr: IpAddr = if k.family == FAMILY_V4 {
            IpAddr::from([k.addr[0], k.addr[1], k.addr[2], k.addr[3]])
        } else {
            IpAddr::from(k.addr)
        };
        out.push(serde_json::json!({
            "address": addr.to_string(),
            "epoch": l.epoch,
            "since_ns": l.since_ns,
            "until_ns": l.until_ns,
            "now_ns": now,
            "answering": now < l.until_ns,
        }));
    }
    Ok(out)
}

/// Gratuitous ARP now and twice more within a second, as keepalived
/// repeats it; none once this host stops answering.
fn announce(uplink: &str, addresses: &[IpAddr], answering: Arc<AtomicBool>) {
    let Ok(link) = Link::of(uplink) else { return };
    let addresses = addresses.to_vec();
    tokio::spawn(async move {
        for wait in [0u64, 200, 800] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if !answering.load(Relaxed) {
                return;
            }
            if let Err(e) = speaker::announce(&link, &addresses) {
                tracing::warn!(uplink = %link.name, error = %e, "gratuitous ARP not sent");
            }
        }
    });
}

async fn netlink() -> Option<rtnetlink::Handle> {
    let (conn, handle, _) = rtnetlink::new_connection().ok()?;
    tokio::spawn(conn);
    Some(handle)
}

/// Puts the addresses on the uplink (the kernel answers ARP and neighbour
/// solicitations for them; the dataplane lets those through only within
/// the lease).
async fn add_address(uplink: &str, addresses: &[IpAddr]) {
    let Some(ifx) = crate::dataplane::ifindex(uplink) else {
        return;
    };
    let Some(h) = netlink().await else { return };
    for a in addresses {
        let plen = if a.is_ipv4() { 32 } else { 128 };
        let mut req = h.address().add(ifx, *a, plen).replace();
        if a.is_ipv6() {
            // No duplicate detection: the lease says whose it is.
            use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
            req.message_mut()
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad));
        }
        if let Err(e) = req.execute().await {
            tracing::error!(uplink, address = %a, error = %e, "virtual ip address not added");
        }
    }
}

async fn remove_address(uplink: &str, addresses: &[IpAddr]) {
    let Some(ifx) = crate::dataplane::ifindex(uplink) else {
        return;
    };
    let Some(h) = netlink().await else { return };
    for a in addresses {
        let mut found = h
            .address()
            .get()
            .set_link_index_filter(ifx)
            .set_address_filter(*a)
            .execute();
        while let Ok(Some(msg)) = found.try_next().await {
            if let Err(e) = h.address().del(msg).execute().await {
                tracing::error!(uplink, address = %a, error = %e, "virtual ip address not removed");
            }
        }
    }
}
