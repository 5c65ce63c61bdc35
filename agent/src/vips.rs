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

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use aya::maps::{HashMap as BpfHashMap, MapData};
use dataplane_common::maps::{VipLease, ZoneAddrKey, VIP_LEASES};
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
    /// The VRRP router, its source the uplink's first IPv4 address.
    pub cfg: Config,
    /// Every address of the virtual IP (the VRRP router protects the
    /// IPv4 ones).
    pub addresses: Vec<IpAddr>,
    /// The highest epoch the share says was granted.
    pub epoch: u64,
}

/// The virtual IPs this host holds in `res`, and why any cannot be held.
pub fn held(
    res: &Resources,
    host: &str,
    first_v4: &dyn Fn(&str) -> Option<std::net::Ipv4Addr>,
) -> (Vec<Held>, Vec<String>) {
    let mut out = Vec::new();
    let mut problems = Vec::new();
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
        let Ok(v4) = v.ipv4.parse::<std::net::Ipv4Addr>() else {
            problems.push(format!(
                "virtual ip {}: only IPv4 addresses are held by hosts so far (VRRP for IPv6 is not spoken)",
                v.id
            ));
            continue;
        };
        let Some(source) = first_v4(&on.uplink_device) else {
            problems.push(format!(
                "virtual ip {}: uplink {} has no IPv4 address to speak VRRP from",
                v.id, on.uplink_device
            ));
            continue;
        };
        let mut addresses = vec![IpAddr::V4(v4)];
        addresses.extend(v.ipv6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6));
        out.push(Held {
            id: v.id.clone(),
            uplink: on.uplink_device.clone(),
            cfg: Config {
                vrid: v.vrid.min(255) as u8,
                priority: me.priority.clamp(1, 254) as u8,
                interval_cs: v.advert_interval_cs.clamp(1, 4095) as u16,
                preempt: !v.no_preempt,
                addresses: vec![IpAddr::V4(v4)],
                primary: IpAddr::V4(source),
            },
            addresses,
            epoch: v.epoch,
        });
    }
    (out, problems)
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
    pub stats: Arc<Stats>,
}

impl Vips {
    /// Starts the manager (within a runtime); `pin_dir` holds the maps.
    pub fn start(host: String, controllers: Vec<String>, pin_dir: &Path) -> anyhow::Result<Vips> {
        let map = MapData::from_pin(pin_dir.join("maps").join(VIP_LEASES))
            .with_context(|| format!("opening pinned map {VIP_LEASES}"))?;
        let leases: BpfHashMap<MapData, ZoneAddrKey, VipLease> = BpfHashMap::try_from(aya::maps::Map::HashMap(map))?;
        let (tx, rx) = watch::channel(Vec::new());
        let stats = Arc::new(Stats::default());
        tokio::spawn(manage(host, controllers, leases, rx, stats.clone()));
        Ok(Vips { want: tx, stats })
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
    stop: watch::Sender<bool>,
    master: bool,
    /// The epoch granted to us, and until when (from the claim's sending).
    granted: Option<(u64, Instant)>,
    /// Whether this host answers for the address now.
    answering: bool,
    /// The lease as last written: when answering began, and its end (or,
    /// once over, when it stopped).
    since_ns: u64,
    until_ns: u64,
    /// A release is owed to the controller.
    release: bool,
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

/// The dataplane's clock when `at` comes (a little early: the programs'
/// coarse clock lags the fine one by up to a tick).
fn mono_ns(at: Instant) -> u64 {
    let now = Instant::now();
    let ahead = at.saturating_duration_since(now);
    (crate::dataplane::monotonic_ns() + ahead.as_nanos() as u64).saturating_sub(10_000_000)
}

async fn manage(
    host: String,
    controllers: Vec<String>,
    mut leases: BpfHashMap<MapData, ZoneAddrKey, VipLease>,
    mut want: watch::Receiver<Vec<Held>>,
    stats: Arc<Stats>,
) {
    let (ev_tx, mut ev_rx) = mpsc::unbounded_channel::<(String, Event)>();
    let mut vips: BTreeMap<String, Vip> = BTreeMap::new();
    let mut client: Option<pb::agent_client::AgentClient<tonic::transport::Channel>> = None;
    let mut next = 0usize;
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_claim = Instant::now() - Duration::from_secs(60);
    // The leases an earlier process left run on in the dataplane until
    // their end: a restart does not cut the owner off before it must.
    loop {
        tokio::select! {
            changed = want.changed() => {
                if changed.is_err() {
                    // The agent is stopping: resign and release.
                    for (_, v) in vips.iter_mut() {
                        let _ = v.stop.send(true);
                    }
                    return;
                }
                let wanted: BTreeMap<String, Held> = want.borrow_and_update().iter().map(|h| (h.id.clone(), h.clone())).collect();
                reconcile(&mut vips, wanted, &ev_tx, &mut leases).await;
            }
            Some((id, e)) = ev_rx.recv() => {
                let Some(v) = vips.get_mut(&id) else { continue };
                match e {
                    Event::State(State::Master) => {
                        tracing::info!(virtual_ip = %id, "VRRP master: claiming the virtual ip");
                        v.master = true;
                        // Claim at once.
                        last_claim = Instant::now() - Duration::from_secs(60);
                    }
                    Event::State(s) => {
                        if v.master {
                            tracing::info!(virtual_ip = %id, state = s.name(), "VRRP: no longer master; releasing the virtual ip");
                            v.release = true;
                        }
                        v.master = false;
                        v.granted = None;
                    }
                    Event::Discarded { from, why } => {
                        tracing::debug!(virtual_ip = %id, %from, why, "VRRP advertisement discarded");
                    }
                    Event::Mismatch { from, addresses } => {
                        tracing::warn!(virtual_ip = %id, %from, ?addresses, "a VRRP peer of this router protects other addresses");
                    }
                    Event::OldChecksum { from } => {
                        tracing::info!(virtual_ip = %id, %from, "a VRRP peer uses keepalived's pre-1.3.6 unicast checksum");
                    }
                }
                enforce(&mut vips, &mut leases, &stats).await;
            }
            _ = tick.tick() => {
                let interval = vips
                    .values()
                    .map(|v| Duration::from_millis(10 * u64::from(v.held.cfg.interval_cs)))
                    .min()
                    .unwrap_or(Duration::from_secs(1));
                let owed = vips.values().any(|v| v.release);
                if owed || (vips.values().any(|v| v.master) && last_claim.elapsed() >= interval) {
                    last_claim = Instant::now();
                    claim(&host, &controllers, &mut client, &mut next, &mut vips, &stats, interval).await;
                }
                enforce(&mut vips, &mut leases, &stats).await;
            }
        }
    }
}

/// Starts, restarts and stops speakers to match `wanted`.
async fn reconcile(
    vips: &mut BTreeMap<String, Vip>,
    wanted: BTreeMap<String, Held>,
    ev_tx: &mpsc::UnboundedSender<(String, Event)>,
    leases: &mut BpfHashMap<MapData, ZoneAddrKey, VipLease>,
) {
    let gone: Vec<String> = vips
        .iter()
        .filter(|(id, v)| {
            wanted
                .get(*id)
                .is_none_or(|w| w.cfg != v.held.cfg || w.uplink != v.held.uplink)
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in gone {
        let Some(v) = vips.remove(&id) else { continue };
        let _ = v.stop.send(true);
        for a in &v.held.addresses {
            let _ = leases.remove(&key(*a));
        }
        if v.answering {
            remove_address(&v.held.uplink, &v.held.addresses).await;
        }
        tracing::info!(virtual_ip = %id, "no longer held here, or changed: speaker stopped");
    }
    // Leases of addresses no longer held here.
    let keep: std::collections::BTreeSet<ZoneAddrKey> = wanted
        .values()
        .flat_map(|h| h.addresses.iter().map(|a| key(*a)))
        .collect();
    let stale: Vec<ZoneAddrKey> = leases
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !keep.contains(k))
        .collect();
    for k in stale {
        let _ = leases.remove(&k);
    }
    for (id, h) in wanted {
        if let Some(v) = vips.get_mut(&id) {
            // The epoch seen may move on alone.
            v.held.epoch = h.epoch;
            continue;
        }
        let link = match Link::of(&h.uplink) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(virtual_ip = %id, uplink = %h.uplink, error = %e, "uplink not found; the virtual ip is not held here yet");
                continue;
            }
        };
        // Fenced until granted, unless a lease an earlier process was
        // granted still runs; the address leaves the uplink if none does.
        let running = h.addresses.iter().any(|a| {
            leases
                .get(&key(*a), 0)
                .is_ok_and(|l| l.until_ns > crate::dataplane::monotonic_ns())
        });
        if !running {
            for a in &h.addresses {
                let _ = leases.insert(key(*a), VipLease::default(), 0);
            }
            remove_address(&h.uplink, &h.addresses).await;
        }
        let (stop_tx, stop_rx) = watch::channel(false);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let fwd = ev_tx.clone();
        let name = id.clone();
        tokio::spawn(async move {
            while let Some(e) = rx.recv().await {
                if fwd.send((name.clone(), e)).is_err() {
                    return;
                }
            }
        });
        let cfg = h.cfg.clone();
        let name = id.clone();
        tokio::spawn(async move {
            if let Err(e) = speaker::run(cfg, link, tx, stop_rx, false).await {
                tracing::error!(virtual_ip = %name, error = %e, "VRRP speaker stopped");
            }
        });
        tracing::info!(virtual_ip = %id, uplink = %h.uplink, vrid = h.cfg.vrid, priority = h.cfg.priority, interval_cs = h.cfg.interval_cs, "VRRP speaker started");
        vips.insert(
            id,
            Vip {
                held: h,
                stop: stop_tx,
                master: false,
                granted: None,
                answering: false,
                release: false,
                since_ns: 0,
                until_ns: 0,
            },
        );
    }
}

/// One call with every claim and owed release.
async fn claim(
    host: &str,
    controllers: &[String],
    client: &mut Option<pb::agent_client::AgentClient<tonic::transport::Channel>>,
    next: &mut usize,
    vips: &mut BTreeMap<String, Vip>,
    stats: &Stats,
    within: Duration,
) {
    let claims: Vec<pb::VipClaim> = vips
        .iter()
        .filter(|(_, v)| v.master || v.release)
        .map(|(id, v)| pb::VipClaim {
            virtual_ip_id: id.clone(),
            port_id: String::new(),
            release: !v.master,
        })
        .collect();
    if claims.is_empty() {
        return;
    }
    if client.is_none() && !controllers.is_empty() {
        let addr = &controllers[*next % controllers.len()];
        *next += 1;
        if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(1), sdn_proto::connect(addr)).await {
            *client = Some(pb::agent_client::AgentClient::new(ch));
        }
    }
    let Some(cl) = client.as_mut() else {
        stats.claims_failed.fetch_add(1, Relaxed);
        return;
    };
    let sent = Instant::now();
    let req = pb::VipClaims {
        host_id: host.to_string(),
        claims,
    };
    // A late answer is no use: the lease counts from the sending.
    let wait = within.max(Duration::from_millis(100)) * 3;
    match tokio::time::timeout(wait, cl.claim_virtual_ips(req)).await {
        Ok(Ok(r)) => {
            for g in r.into_inner().grants {
                let Some(v) = vips.get_mut(&g.virtual_ip_id) else {
                    continue;
                };
                if v.release && !v.master {
                    v.release = false;
                    continue;
                }
                if g.granted {
                    stats.claims_granted.fetch_add(1, Relaxed);
                    v.granted = Some((g.epoch, sent + Duration::from_millis(u64::from(g.lease_ms))));
                } else {
                    stats.claims_refused.fetch_add(1, Relaxed);
                    if v.granted.is_some() || v.answering {
                        tracing::warn!(virtual_ip = %g.virtual_ip_id, reason = %g.reason, "claim refused: not answering for the virtual ip");
                    } else {
                        tracing::debug!(virtual_ip = %g.virtual_ip_id, reason = %g.reason, "claim refused");
                    }
                    v.granted = None;
                }
            }
        }
        Ok(Err(s)) => {
            stats.claims_failed.fetch_add(1, Relaxed);
            tracing::warn!(code = ?s.code(), error = %s.message(), "virtual ip claims failed; made again");
            *client = None;
        }
        Err(_) => {
            stats.claims_failed.fetch_add(1, Relaxed);
            tracing::warn!("virtual ip claims timed out; made again");
            *client = None;
        }
    }
}

/// Makes the dataplane and the uplink answer for exactly the virtual IPs
/// this host is authoritative for, until their leases end.
async fn enforce(
    vips: &mut BTreeMap<String, Vip>,
    leases: &mut BpfHashMap<MapData, ZoneAddrKey, VipLease>,
    stats: &Stats,
) {
    let now = Instant::now();
    for (id, v) in vips.iter_mut() {
        let auth = v.authoritative(now);
        let now_ns = crate::dataplane::monotonic_ns();
        let lease = match (auth, v.granted) {
            (true, Some((epoch, until))) => {
                if !v.answering {
                    v.since_ns = now_ns;
                }
                v.until_ns = mono_ns(until);
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
        for a in &v.held.addresses {
            if let Err(e) = leases.insert(key(*a), lease, 0) {
                tracing::error!(virtual_ip = %id, address = %a, error = %e, "lease not written");
            }
        }
        if auth && !v.answering {
            v.answering = true;
            stats.taken.fetch_add(1, Relaxed);
            add_address(&v.held.uplink, &v.held.addresses).await;
            tracing::info!(virtual_ip = %id, epoch = lease.epoch, uplink = %v.held.uplink, "answering for the virtual ip");
            announce(&v.held.uplink, &v.held.addresses);
        } else if !auth && v.answering {
            v.answering = false;
            stats.given_up.fetch_add(1, Relaxed);
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
/// repeats it.
fn announce(uplink: &str, addresses: &[IpAddr]) {
    let Ok(link) = Link::of(uplink) else { return };
    let addresses = addresses.to_vec();
    tokio::spawn(async move {
        for wait in [0u64, 200, 800] {
            tokio::time::sleep(Duration::from_millis(wait)).await;
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
