//! Load balancers' health checks of the members on this host's ports.
//!
//! A member is checked by the agent of the host its port is on, from
//! inside the VPC's network: the check speaks as the subnet's gateway (its
//! address and the gateway MAC), in frames written straight onto the
//! member's device, and reads the member's answers there before the
//! pipeline sees them (the pipeline then drops them: nothing in the VPC
//! answers the gateway's address, `no_route`). The host's own addresses
//! are never used, and nothing the host's stack routes is involved.
//!
//! - `tcp`: a SYN; a SYN-ACK passes, a RST or silence fails. The
//!   half-open connection is reset at once.
//! - `http`: the handshake, then `GET <path> HTTP/1.0`; the status line of
//!   the answer must hold a status within the pool's range. Then a reset.
//!
//! Each member's checks run every `interval` within `timeout`. When the
//! controller counts the member up and `fall` checks in a row fail, or
//! counts it down and `rise` checks in a row pass, the agent reports it
//! (`Agent.ReportHealth`); the controller records the change in the log,
//! so every host schedules by it. A report that does not get through is
//! made again after the next check.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dataplane_common::maps::GATEWAY_MAC;
use sdn_proto::v1 as pb;

use crate::compile::Resources;

/// One member's check on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub member_id: String,
    /// The member's device here, and its MAC.
    pub ifindex: u32,
    pub mac: [u8; 6],
    pub addr: IpAddr,
    pub port: u16,
    /// The member's subnet gateway of the same family: the checks' source.
    pub gateway: IpAddr,
    pub probe: Probe,
    pub interval: Duration,
    pub timeout: Duration,
    pub rise: u32,
    pub fall: u32,
    /// The controller counts the member down.
    pub down: bool,
}

/// What a check asks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Probe {
    Tcp,
    Http { path: String, status: (u16, u16) },
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let v: Vec<u8> = s.split(':').filter_map(|x| u8::from_str_radix(x, 16).ok()).collect();
    v.try_into().ok()
}

/// The checks this host runs: the members of pools with a health check
/// whose ports are here. A pool's listeners share its members' checks; a
/// member with no port of its own is checked at the listener's port of
/// the first listener (by id).
/// Quarantined ports are not checked (nothing reaches them). At most
/// [`CHECKS_MAX`] checks run on a host, the first by member id.
pub fn checks(
    res: &Resources,
    ifindex: &dyn Fn(&str) -> Option<u32>,
    quarantined: &dyn Fn(&str) -> bool,
) -> Vec<Check> {
    let mut ports: BTreeMap<&str, &pb::Port> = BTreeMap::new();
    let mut gateways: BTreeMap<&str, &pb::SubnetGateway> = BTreeMap::new();
    let mut lbs = Vec::new();
    for r in res.values() {
        match &r.kind {
            Some(pb::resource::Kind::Port(p)) => {
                ports.insert(&p.id, p);
            }
            Some(pb::resource::Kind::VpcNetwork(n)) => {
                for g in &n.gateways {
                    gateways.insert(&g.subnet_id, g);
                }
            }
            Some(pb::resource::Kind::LoadBalancer(l)) => lbs.push(l),
            _ => {}
        }
    }
    let mut out: BTreeMap<String, Check> = BTreeMap::new();
    for lb in lbs {
        let mut listeners: Vec<&pb::ListenerOnHost> = lb.listeners.iter().collect();
        listeners.sort_by(|a, b| {
            let id = |l: &pb::ListenerOnHost| l.listener.as_ref().map(|x| x.id.clone()).unwrap_or_default();
            id(a).cmp(&id(b))
        });
        for l in listeners {
            let Some(h) = &l.health else { continue };
            for b in &l.backends {
                if b.port_id.is_empty()
                    || b.state == "disabled"
                    || out.contains_key(&b.member_id)
                    || quarantined(&b.port_id)
                {
                    continue;
                }
                let Some(p) = ports.get(b.port_id.as_str()) else {
                    continue;
                };
                let (Some(ifx), Some(mac)) = (ifindex(&p.device), parse_mac(&p.mac)) else {
                    continue;
                };
                let Some(g) = gateways.get(p.subnet_id.as_str()) else {
                    continue;
                };
                // IPv4 where the member and its subnet have it.
                let usable: Vec<(IpAddr, IpAddr)> = b
                    .addresses
                    .iter()
                    .filter_map(|a| a.parse::<IpAddr>().ok())
                    .filter_map(|a| {
                        let gw = if a.is_ipv4() { &g.gateway_v4 } else { &g.gateway_v6 };
                        gw.parse::<IpAddr>().ok().map(|gw| (a, gw))
                    })
                    .collect();
                let Some((addr, gateway)) = usable.iter().find(|(a, _)| a.is_ipv4()).or(usable.first()).copied() else {
                    continue;
                };
                let Ok(port) = u16::try_from(b.port) else { continue };
                let interval = Duration::from_millis(u64::from(h.interval_ms.max(100)));
                let timeout = if h.timeout_ms == 0 {
                    interval
                } else {
                    Duration::from_millis(u64::from(h.timeout_ms)).min(interval)
                };
                let probe = if h.probe == "http" {
                    Probe::Http {
                        path: if h.http_path.is_empty() {
                            "/".into()
                        } else {
                            h.http_path.clone()
                        },
                        status: (
                            if h.status_min == 0 { 200 } else { h.status_min as u16 },
                            if h.status_max == 0 { 399 } else { h.status_max as u16 },
                        ),
                    }
                } else {
                    Probe::Tcp
                };
                out.insert(
                    b.member_id.clone(),
                    Check {
                        member_id: b.member_id.clone(),
                        ifindex: ifx,
                        mac,
                        addr,
                        port,
                        gateway,
                        probe,
                        interval,
                        timeout,
                        rise: h.rise.clamp(1, 10),
                        fall: h.fall.clamp(1, 10),
                        down: b.down,
                    },
                );
            }
        }
    }
    if out.len() > CHECKS_MAX {
        tracing::warn!(
            checks = out.len(),
            max = CHECKS_MAX,
            "more members to check on this host than it checks; the rest are taken as they were reported"
        );
    }
    out.into_values().take(CHECKS_MAX).collect()
}

/// Checks one host runs, at most.
pub const CHECKS_MAX: usize = 512;
/// Checks in flight at once on a host (each holds a blocking thread for
/// at most its timeout).
pub const CHECKS_AT_ONCE: usize = 32;

/// Counts of checks, for metrics.
#[derive(Debug, Default)]
pub struct Stats {
    pub passed: std::sync::atomic::AtomicU64,
    pub failed: std::sync::atomic::AtomicU64,
    pub reported: std::sync::atomic::AtomicU64,
    pub report_failed: std::sync::atomic::AtomicU64,
}

/// The running checks.
pub struct Health {
    host: String,
    controllers: Arc<Vec<String>>,
    running: Mutex<BTreeMap<String, (Check, tokio::task::AbortHandle)>>,
    stats: Arc<Stats>,
    at_once: Arc<tokio::sync::Semaphore>,
}

impl Health {
    pub fn new(host: String, controllers: Vec<String>) -> Health {
        Health {
            host,
            controllers: Arc::new(controllers),
            running: Mutex::new(BTreeMap::new()),
            stats: Arc::default(),
            at_once: Arc::new(tokio::sync::Semaphore::new(CHECKS_AT_ONCE)),
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        self.stats.clone()
    }

    /// Runs exactly `checks`: a check that changed (the controller's view
    /// of the member included) starts afresh, its counts from zero.
    pub fn set(&self, checks: Vec<Check>) {
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let wanted: BTreeMap<String, Check> = checks.into_iter().map(|c| (c.member_id.clone(), c)).collect();
        running.retain(|id, (c, task)| {
            let keep = wanted.get(id) == Some(c);
            if !keep {
                task.abort();
            }
            keep
        });
        for (id, c) in wanted {
            if running.contains_key(&id) {
                continue;
            }
            tracing::info!(member = %id, addr = %c.addr, port = c.port, probe = ?c.probe, down = c.down, "health check");
            let task = tokio::spawn(run(
                c.clone(),
                self.host.clone(),
                self.controllers.clone(),
                self.stats.clone(),
                self.at_once.clone(),
            ));
            running.insert(id, (c, task.abort_handle()));
        }
    }
}

impl Drop for Health {
    fn drop(&mut self) {
        for (_, (_, t)) in self.running.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            t.abort();
        }
    }
}

async fn run(
    c: Check,
    host: String,
    controllers: Arc<Vec<String>>,
    stats: Arc<Stats>,
    at_once: Arc<tokio::sync::Semaphore>,
) {
    use std::sync::atomic::Ordering::Relaxed;
    let (mut passed, mut failed) = (0u32, 0u32);
    let mut detail = String::new();
    let mut tick = tokio::time::interval(c.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut client: Option<pb::agent_client::AgentClient<tonic::transport::Channel>> = None;
    let mut next = 0usize;
    loop {
        tick.tick().await;
        let Ok(permit) = at_once.clone().acquire_owned().await else {
            return;
        };
        let probe = c.clone();
        let r = tokio::task::spawn_blocking(move || {
            let r = check_once(&probe);
            drop(permit);
            r
        })
        .await
        .unwrap_or_else(|e| Err(format!("check aborted: {e}")));
        match r {
            Ok(()) => {
                stats.passed.fetch_add(1, Relaxed);
                passed += 1;
                failed = 0;
            }
            Err(e) => {
                stats.failed.fetch_add(1, Relaxed);
                tracing::debug!(member = %c.member_id, error = %e, "health check failed");
                failed += 1;
                passed = 0;
                detail = e;
            }
        }
        let up = if !c.down && failed >= c.fall {
            false
        } else if c.down && passed >= c.rise {
            true
        } else {
            continue;
        };
        if client.is_none() && !controllers.is_empty() {
            let addr = &controllers[next % controllers.len()];
            next += 1;
            if let Ok(Ok(ch)) = tokio::time::timeout(Duration::from_secs(2), sdn_proto::connect(addr)).await {
                client = Some(pb::agent_client::AgentClient::new(ch));
            }
        }
        let Some(cl) = client.as_mut() else {
            stats.report_failed.fetch_add(1, Relaxed);
            continue;
        };
        let req = pb::HealthReport {
            host_id: host.clone(),
            member_id: c.member_id.clone(),
            up,
            detail: if up { String::new() } else { detail.clone() },
        };
        match tokio::time::timeout(Duration::from_secs(5), cl.report_health(req)).await {
            Ok(Ok(r)) => {
                stats.reported.fetch_add(1, Relaxed);
                let revision = r.into_inner().revision;
                if up {
                    tracing::info!(member = %c.member_id, passed, revision, "member passes its health checks again");
                } else {
                    tracing::warn!(member = %c.member_id, failed, error = %detail, revision, "member fails its health checks");
                }
                // The share brings the controller's view, which restarts
                // this check; should it not come, the counts start again.
                tokio::time::sleep(Duration::from_secs(30)).await;
                (passed, failed) = (0, 0);
            }
            Ok(Err(s)) => {
                stats.report_failed.fetch_add(1, Relaxed);
                tracing::warn!(member = %c.member_id, code = ?s.code(), error = %s.message(), "health report refused; made again after the next check");
                client = None;
            }
            Err(_) => {
                stats.report_failed.fetch_add(1, Relaxed);
                tracing::warn!(member = %c.member_id, "health report timed out; made again after the next check");
                client = None;
            }
        }
    }
}

/// A number for a source port and a sequence number: not guessable by
/// anyone who does not see the frames (and only the member does).
fn fresh() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

/// An AF_PACKET socket on one device: frames written go out of it as they
/// are (past the device's queueing and egress hooks); frames read are
/// those the device receives, before its ingress hooks.
struct Raw(std::os::fd::OwnedFd);

impl Raw {
    fn open(ifindex: u32) -> std::io::Result<Raw> {
        use std::os::fd::FromRawFd;
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain syscalls on a descriptor this function owns.
        unsafe {
            // No protocol until bound: the socket hears only the device.
            let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
            let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
            let mut sll: libc::sockaddr_ll = std::mem::zeroed();
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = ifindex as i32;
            if libc::bind(
                raw,
                &sll as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            // Room for a busy member's frames around its answer.
            let rcvbuf: libc::c_int = 1 << 20;
            libc::setsockopt(
                raw,
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                &rcvbuf as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            );
            let one: libc::c_int = 1;
            if libc::setsockopt(
                raw,
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &one as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as u32,
            ) < 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(Raw(fd))
        }
    }

    fn send(&self, frame: &[u8]) -> Result<(), String> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        // SAFETY: the buffer outlives the call.
        let n = unsafe { libc::send(raw, frame.as_ptr() as *const libc::c_void, frame.len(), 0) };
        if n < 0 {
            return Err(format!("sending: {}", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    /// The next frame the device received (not one it sent), until
    /// `deadline`.
    fn recv(&self, buf: &mut [u8], deadline: Instant) -> Option<usize> {
        let raw = std::os::fd::AsRawFd::as_raw_fd(&self.0);
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let mut pfd = libc::pollfd {
                fd: raw,
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().clamp(1, 1000) as i32;
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
                continue;
            }
            // SAFETY: `sll` and `buf` outlive the call.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
            let n = unsafe {
                libc::recvfrom(
                    raw,
                    buf.as_mut_ptr() as *mut libc::c_void,
                    buf.len(),
                    libc::MSG_DONTWAIT,
                    &mut sll as *mut libc::sockaddr_ll as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n <= 0 || sll.sll_pkttype == libc::PACKET_OUTGOING as u8 {
                continue;
            }
            return Some(n as usize);
        }
    }
}

/// A TCP segment from the gateway to the member.
fn segment(c: &Check, sport: u16, seq: u32, ack: Option<u32>, flags: (bool, bool, bool), payload: &[u8]) -> Vec<u8> {
    let (syn, rst, psh) = flags;
    let eth = etherparse::PacketBuilder::ethernet2(GATEWAY_MAC, c.mac);
    let ip = match (c.gateway, c.addr) {
        (IpAddr::V4(s), IpAddr::V4(d)) => eth.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => eth.ipv6(s.octets(), d.octets(), 64),
        _ => unreachable!("a check's addresses are of one family"),
    };
    let mut t = ip.tcp(sport, c.port, seq, 64240);
    if syn {
        t = t.syn();
    }
    if rst {
        t = t.rst();
    }
    if psh {
        t = t.psh();
    }
    if let Some(a) = ack {
        t = t.ack(a);
    }
    let mut v = Vec::with_capacity(80 + payload.len());
    t.write(&mut v, payload).expect("a frame in memory");
    v
}

/// The member's answer to `sport`, if `frame` is one: (seq, ack, syn, rst,
/// payload).
fn answer(c: &Check, sport: u16, frame: &[u8]) -> Option<(u32, u32, bool, bool, Vec<u8>)> {
    // Lax: a large segment (GSO on the veth) may be cut by the buffer.
    let p = etherparse::LaxSlicedPacket::from_ethernet(frame).ok()?;
    let (src, dst): (IpAddr, IpAddr) = match p.net? {
        etherparse::LaxNetSlice::Ipv4(v4) => (
            IpAddr::V4(v4.header().source_addr()),
            IpAddr::V4(v4.header().destination_addr()),
        ),
        etherparse::LaxNetSlice::Ipv6(v6) => (
            IpAddr::V6(v6.header().source_addr()),
            IpAddr::V6(v6.header().destination_addr()),
        ),
        _ => return None,
    };
    let Some(etherparse::TransportSlice::Tcp(t)) = p.transport else {
        return None;
    };
    if src != c.addr || dst != c.gateway || t.source_port() != c.port || t.destination_port() != sport {
        return None;
    }
    Some((
        t.sequence_number(),
        t.acknowledgment_number(),
        t.syn() && t.ack(),
        t.rst(),
        t.payload().to_vec(),
    ))
}

/// One check of one member: `Ok` when it passes, else what it saw.
pub fn check_once(c: &Check) -> Result<(), String> {
    let raw = Raw::open(c.ifindex).map_err(|e| format!("opening the member's device: {e}"))?;
    let r = fresh();
    let sport = 32768 + (r % 28000) as u16;
    let isn = (r >> 32) as u32;
    let deadline = Instant::now() + c.timeout;
    let mut buf = vec![0u8; 65_536];
    raw.send(&segment(c, sport, isn, None, (true, false, false), &[]))?;
    // The handshake.
    let theirs = loop {
        let Some(n) = raw.recv(&mut buf, deadline) else {
            return Err(format!("no answer in {} ms", c.timeout.as_millis()));
        };
        let Some((seq, ack, synack, rst, _)) = answer(c, sport, &buf[..n]) else {
            continue;
        };
        // A reset of this SYN acknowledges it.
        if rst && ack == isn.wrapping_add(1) {
            return Err("connection refused".into());
        }
        if synack && ack == isn.wrapping_add(1) {
            break seq;
        }
    };
    let mine = isn.wrapping_add(1);
    let Probe::Http { path, status } = &c.probe else {
        let _ = raw.send(&segment(c, sport, mine, None, (false, true, false), &[]));
        return Ok(());
    };
    let host = match c.addr {
        IpAddr::V4(a) => a.to_string(),
        IpAddr::V6(a) => format!("[{a}]"),
    };
    let req =
        format!("GET {path} HTTP/1.0\r\nHost: {host}\r\nUser-Agent: sdn-health-check\r\nConnection: close\r\n\r\n");
    raw.send(&segment(
        c,
        sport,
        mine,
        Some(theirs.wrapping_add(1)),
        (false, false, true),
        req.as_bytes(),
    ))?;
    let after = mine.wrapping_add(req.len() as u32);
    let mut got: Vec<u8> = Vec::new();
    let verdict = loop {
        let Some(n) = raw.recv(&mut buf, deadline) else {
            break Err(format!("no status line in {} ms", c.timeout.as_millis()));
        };
        let Some((seq, _, _, rst, payload)) = answer(c, sport, &buf[..n]) else {
            continue;
        };
        if rst && seq.wrapping_sub(theirs.wrapping_add(1)) <= 65_535 {
            break Err("connection reset before the status line".into());
        }
        // In order only: the first bytes of the answer.
        if payload.is_empty() || seq != theirs.wrapping_add(1).wrapping_add(got.len() as u32) {
            continue;
        }
        got.extend_from_slice(&payload);
        if let Some(end) = got.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&got[..end]).to_string();
            let code = line
                .strip_prefix("HTTP/1.")
                .and_then(|r| r.get(2..5))
                .and_then(|s| s.parse::<u16>().ok());
            break match code {
                Some(s) if (status.0..=status.1).contains(&s) => Ok(()),
                Some(s) => Err(format!("status {s}, expected {} to {}", status.0, status.1)),
                // (What the member said is not repeated: it would reach
                // the audit log.)
                None => Err("not an HTTP status line".to_string()),
            };
        }
        if got.len() > 4096 {
            break Err("no status line in the first 4096 bytes".into());
        }
    };
    // Whether or not the request was acknowledged.
    let _ = raw.send(&segment(c, sport, after, None, (false, true, false), &[]));
    let _ = raw.send(&segment(c, sport, mine, None, (false, true, false), &[]));
    verdict
}
