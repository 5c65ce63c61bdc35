//! Sends on the mirror copies the programs hand up (a perf ring per CPU):
//! in VXLAN over UDP (to a tap on another host, or a collector), in GRE
//! with an ERSPAN type II or III header (a raw socket: this kernel has no
//! GRE device, so the headers are built here), or out of a tap port's
//! device on this host (a copy cut to its snap length, through a packet
//! socket whose mark takes it past the tap's pipeline).
//!
//! Every socket is non-blocking: a destination that cannot take a copy
//! costs that copy, counted per session, and nothing else. The dataplane
//! never waits for this reader: a full ring drops copies in the kernel,
//! counted there.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use dataplane_common::maps::{MirrorCopy, MIRROR_COPY_MAX, MIRROR_IN, MIRROR_MARK, MIRROR_SLOTS};

use crate::compile::mirror::{MirrorPlan, Send};

/// Where the reader sends a slot's copies.
#[derive(Clone, Debug)]
pub struct Route {
    pub session: String,
    pub send: Send,
    /// Copies of another generation were made for the slot's earlier
    /// session: dropped.
    pub generation: u16,
}

/// The routes by slot.
pub type Table = Arc<RwLock<BTreeMap<u32, Route>>>;

/// The table of a plan, with the generations the kernel has.
pub fn table_of(plan: &MirrorPlan, generations: &BTreeMap<u32, u32>) -> BTreeMap<u32, Route> {
    plan.slots
        .iter()
        .filter_map(|(slot, s)| {
            Some((
                *slot,
                Route {
                    session: s.id.clone(),
                    send: s.send.clone()?,
                    generation: *generations.get(slot)? as u16,
                },
            ))
        })
        .collect()
}

/// The agent's counts, by slot: copies sent on, and lost at a socket; and
/// each slot's GRE sequence.
pub struct Stats {
    pub sent: Vec<AtomicU64>,
    pub failed: Vec<AtomicU64>,
    seq: Vec<std::sync::atomic::AtomicU32>,
    /// Copies the perf ring lost (all sessions).
    pub lost: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            sent: (0..MIRROR_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            failed: (0..MIRROR_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            seq: (0..MIRROR_SLOTS)
                .map(|_| std::sync::atomic::AtomicU32::new(0))
                .collect(),
            lost: AtomicU64::new(0),
        }
    }
}

impl Stats {
    /// A slot that took another session starts anew.
    pub fn reset(&self, slot: u32) {
        let i = slot as usize;
        if i < self.sent.len() {
            self.sent[i].store(0, Ordering::Relaxed);
            self.failed[i].store(0, Ordering::Relaxed);
            self.seq[i].store(0, Ordering::Relaxed);
        }
    }
}

/// The VXLAN header (RFC 7348): the I flag and the VNI.
pub fn vxlan_header(vni: u32) -> [u8; 8] {
    let v = vni.to_be_bytes();
    [0x08, 0, 0, 0, v[1], v[2], v[3], 0]
}

/// GRE with a sequence number, then an ERSPAN header: type II (GRE
/// protocol 0x88be, 8 bytes) or type III (0x22eb, 12 bytes, with a
/// timestamp in 100 ns units and the direction).
pub fn erspan_header(
    version: u8,
    session: u16,
    seq: u32,
    port: u32,
    to_vm: bool,
    truncated: bool,
    now_ns: u64,
) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&0x1000u16.to_be_bytes());
    h.extend_from_slice(&(if version == 3 { 0x22ebu16 } else { 0x88beu16 }).to_be_bytes());
    h.extend_from_slice(&seq.to_be_bytes());
    let ver: u32 = if version == 3 { 2 } else { 1 };
    // ver(4) vlan(12) cos(3) en|bso(2) t(1) session(10)
    let w0 = (ver << 28) | (u32::from(truncated) << 10) | u32::from(session & 0x3ff);
    h.extend_from_slice(&w0.to_be_bytes());
    if version == 3 {
        h.extend_from_slice(&((now_ns / 100) as u32).to_be_bytes());
        // sgt(16) p(1) ft(5) hw_id(6) d(1) gra(2) o(1): an Ethernet frame,
        // D set for what leaves the port (reaches the VM), 100 ns steps.
        let w2 = (u32::from(to_vm) << 3) | (0b01 << 1);
        h.extend_from_slice(&w2.to_be_bytes());
    } else {
        // reserved(12) index(20): the port.
        h.extend_from_slice(&(port & 0xfffff).to_be_bytes());
    }
    h
}

/// A reader's sockets, made on first use.
#[derive(Default)]
struct Sockets {
    /// The host's underlay address: copies leave from it (a tap's host
    /// takes copies only from the hosts' registered addresses).
    local: Option<IpAddr>,
    udp4: Option<UdpSocket>,
    udp6: Option<UdpSocket>,
    gre4: Option<socket2::Socket>,
    gre6: Option<socket2::Socket>,
    packet: Option<OwnedFd>,
}

impl Sockets {
    fn udp(&mut self, v6: bool) -> std::io::Result<&UdpSocket> {
        let slot = if v6 { &mut self.udp6 } else { &mut self.udp4 };
        if slot.is_none() {
            let from = match self.local {
                Some(a) if a.is_ipv6() == v6 => SocketAddr::new(a, 0),
                _ if v6 => "[::]:0".parse().expect("an address"),
                _ => "0.0.0.0:0".parse().expect("an address"),
            };
            let s = UdpSocket::bind(from)?;
            s.set_nonblocking(true)?;
            *slot = Some(s);
        }
        Ok(slot.as_ref().expect("made above"))
    }

    fn gre(&mut self, v6: bool) -> std::io::Result<&socket2::Socket> {
        let slot = if v6 { &mut self.gre6 } else { &mut self.gre4 };
        if slot.is_none() {
            let d = if v6 {
                socket2::Domain::IPV6
            } else {
                socket2::Domain::IPV4
            };
            let s = socket2::Socket::new(d, socket2::Type::RAW, Some(socket2::Protocol::from(47)))?;
            s.set_nonblocking(true)?;
            if let Some(a) = self.local.filter(|a| a.is_ipv6() == v6) {
                s.bind(&socket2::SockAddr::from(SocketAddr::new(a, 0)))?;
            }
            *slot = Some(s);
        }
        Ok(slot.as_ref().expect("made above"))
    }

    /// A packet socket whose frames carry the mirror mark.
    fn packet(&mut self) -> std::io::Result<i32> {
        if self.packet.is_none() {
            // SAFETY: plain socket(2); the fd is owned from here.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    0,
                )
            };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: a fresh fd of ours.
            let owned = unsafe { OwnedFd::from_raw_fd(fd) };
            let mark: u32 = MIRROR_MARK;
            // SAFETY: setsockopt with a u32 of the size passed.
            let r = unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_MARK,
                    &mark as *const u32 as *const _,
                    std::mem::size_of::<u32>() as u32,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
            self.packet = Some(owned);
        }
        Ok(self.packet.as_ref().expect("made above").as_raw_fd())
    }

    fn send(&mut self, to: &Send, hdr: &MirrorCopy, frame: &[u8], seq: u32) -> std::io::Result<()> {
        match to {
            Send::Vxlan { to, vni } => {
                let mut b = Vec::with_capacity(8 + frame.len());
                b.extend_from_slice(&vxlan_header(*vni));
                b.extend_from_slice(frame);
                self.udp(to.is_ipv6())?.send_to(&b, to)?;
            }
            Send::Erspan { to, version, session } => {
                let now_ns = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(0);
                let mut b = erspan_header(
                    *version,
                    *session,
                    seq,
                    hdr.ifindex,
                    hdr.direction == MIRROR_IN,
                    hdr.len < hdr.orig_len,
                    now_ns,
                );
                b.extend_from_slice(frame);
                let addr = socket2::SockAddr::from(SocketAddr::new(*to, 0));
                self.gre(matches!(to, IpAddr::V6(_)))?.send_to(&b, &addr)?;
            }
            Send::Tap { ifindex } => {
                let fd = self.packet()?;
                // SAFETY: a zeroed sockaddr_ll, filled for an egress on
                // the device.
                let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                sa.sll_family = libc::AF_PACKET as u16;
                sa.sll_ifindex = *ifindex as i32;
                sa.sll_halen = 6;
                if frame.len() >= 6 {
                    sa.sll_addr[..6].copy_from_slice(&frame[..6]);
                }
                // SAFETY: the buffer and address are live for the call.
                let r = unsafe {
                    libc::sendto(
                        fd,
                        frame.as_ptr() as *const _,
                        frame.len(),
                        0,
                        &sa as *const libc::sockaddr_ll as *const libc::sockaddr,
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(())
    }
}

/// Reads the copies of every CPU's ring and sends them on, until the
/// process ends.
pub fn run(
    mut perf: aya::maps::perf::AsyncPerfEventArray<aya::maps::MapData>,
    table: Table,
    stats: Arc<Stats>,
    local: Option<IpAddr>,
) -> anyhow::Result<()> {
    let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for cpu in cpus {
        // 4 MiB a CPU: some milliseconds of copies at line rate.
        let mut buf = perf.open(cpu, Some(1024))?;
        let (table, stats) = (table.clone(), stats.clone());
        tokio::spawn(async move {
            let hdr_len = std::mem::size_of::<MirrorCopy>();
            let mut bufs: Vec<bytes::BytesMut> = (0..64)
                .map(|_| bytes::BytesMut::with_capacity(MIRROR_COPY_MAX as usize + hdr_len + 64))
                .collect();
            let mut sockets = Sockets {
                local,
                ..Default::default()
            };
            let mut warned = std::collections::BTreeSet::new();
            loop {
                let events = match buf.read_events(&mut bufs).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(cpu, error = %e, "reading mirror copies stopped on this CPU");
                        return;
                    }
                };
                if events.lost > 0 {
                    stats.lost.fetch_add(events.lost as u64, Ordering::Relaxed);
                }
                let t = table.read().unwrap_or_else(|p| p.into_inner()).clone();
                for b in bufs.iter().take(events.read) {
                    if b.len() < hdr_len {
                        continue;
                    }
                    // SAFETY: at least a header's bytes; read unaligned.
                    let hdr: MirrorCopy = unsafe { std::ptr::read_unaligned(b.as_ptr() as *const MirrorCopy) };
                    let end = (hdr_len + hdr.len as usize).min(b.len());
                    let frame = &b[hdr_len..end];
                    let slot = u32::from(hdr.slot);
                    // A copy made for the slot's earlier session goes nowhere.
                    let Some(route) = t.get(&slot).filter(|r| r.generation == hdr.generation) else {
                        continue;
                    };
                    let i = (slot as usize).min(stats.sent.len() - 1);
                    let seq = stats.seq[i].fetch_add(1, Ordering::Relaxed).wrapping_add(1);
                    match sockets.send(&route.send, &hdr, frame, seq) {
                        Ok(()) => {
                            stats.sent[i].fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => {
                            stats.failed[i].fetch_add(1, Ordering::Relaxed);
                            if e.kind() != std::io::ErrorKind::WouldBlock && warned.insert((slot, e.kind())) {
                                tracing::warn!(session = %route.session, error = %e, "sending mirror copies; the ones that fail are dropped and counted");
                            }
                        }
                    }
                }
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_carry_the_vni_the_version_and_the_session() {
        assert_eq!(vxlan_header(0x123456), [0x08, 0, 0, 0, 0x12, 0x34, 0x56, 0]);
        let h = erspan_header(2, 7, 9, 3, false, true, 0);
        assert_eq!(&h[..4], &[0x10, 0x00, 0x88, 0xbe]);
        assert_eq!(&h[4..8], &9u32.to_be_bytes());
        assert_eq!(h.len(), 16);
        assert_eq!(h[8] >> 4, 1, "type II is version 1");
        assert_eq!(u16::from_be_bytes([h[10], h[11]]) & 0x3ff, 7);
        assert_eq!(h[10] & 0x04, 0x04, "the truncated bit");
        let h = erspan_header(3, 1023, 1, 3, true, false, 1_000);
        assert_eq!(&h[2..4], &[0x22, 0xeb]);
        assert_eq!(h.len(), 20);
        assert_eq!(h[8] >> 4, 2, "type III is version 2");
        assert_eq!(&h[12..16], &10u32.to_be_bytes(), "100 ns steps");
        assert_eq!(h[19] & 0x08, 0x08, "the direction bit");
    }
}
