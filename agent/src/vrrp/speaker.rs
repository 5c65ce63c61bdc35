//! One virtual router on one link, on the wire: raw IPv4 sockets for the
//! advertisements (protocol 112 to 224.0.0.18, TTL 255, DSCP CS6 as
//! keepalived sends them), a packet socket for gratuitous ARP on takeover,
//! and the [`Machine`] between them. What the machine decides is reported
//! as [`Event`]s; what an owner does with the address (the dataplane, the
//! controller's epoch) is the caller's.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};
use std::time::{Duration, Instant};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::machine::{Action, Config, Machine, State};
use super::packet::{self, Advert, ChecksumForm, GROUP_V4, IP_PROTO_VRRP, TTL};

/// The link a virtual router runs on.
#[derive(Clone, Debug)]
pub struct Link {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
}

impl Link {
    /// The link named `name`, as the kernel has it now.
    pub fn of(name: &str) -> io::Result<Link> {
        let ifindex = crate::dataplane::ifindex(name)
            .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no interface {name:?}")))?;
        let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))?;
        let mac = crate::health::parse_mac(text.trim())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("{name}: no Ethernet address")))?;
        Ok(Link {
            name: name.to_string(),
            ifindex,
            mac,
        })
    }
}

/// The first IPv4 address of interface `name`.
pub fn first_ipv4(name: &str) -> Option<Ipv4Addr> {
    crate::dataplane::addresses(name)
        .ok()?
        .into_iter()
        .find_map(|a| match a {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
}

/// What the speaker reports.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The machine moved to this state.
    State(State),
    /// An advertisement was discarded, and why.
    Discarded { from: IpAddr, why: String },
    /// An advertisement from a peer of our virtual router whose address
    /// list is not ours (RFC 9568 7.1: logged, taken).
    Mismatch { from: IpAddr, addresses: Vec<IpAddr> },
    /// A unicast advertisement with keepalived's pre-1.3.6 checksum.
    OldChecksum { from: IpAddr },
}

/// The sockets of one IPv4 virtual router on `link`.
struct Wire {
    recv: AsyncFd<Socket>,
    send: Socket,
    source: Ipv4Addr,
}

impl Wire {
    fn open(link: &Link, source: Ipv4Addr) -> io::Result<Wire> {
        let recv = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(i32::from(IP_PROTO_VRRP))))?;
        recv.bind_device(Some(link.name.as_bytes()))?;
        recv.join_multicast_v4_n(&GROUP_V4, &InterfaceIndexOrAddress::Index(link.ifindex))?;
        recv.set_nonblocking(true)?;
        let send = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(i32::from(IP_PROTO_VRRP))))?;
        send.bind_device(Some(link.name.as_bytes()))?;
        send.set_header_included_v4(true)?;
        send.set_multicast_loop_v4(false)?;
        // Nothing is read from it.
        send.set_recv_buffer_size(0)?;
        // SAFETY: the socket owns its descriptor, and keeps it open and in
        // place for as long as the AsyncFd holds it.
        let recv =
            unsafe { AsyncFd::register_with_interest(recv, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Wire { recv, send, source })
    }

    /// Sends `a` to the group from our source, TTL 255, DSCP CS6.
    fn send(&self, a: &Advert) -> io::Result<()> {
        let msg = a.encode(IpAddr::V4(self.source), IpAddr::V4(GROUP_V4));
        let mut h = etherparse::Ipv4Header::new(
            msg.len() as u16,
            TTL,
            etherparse::IpNumber(IP_PROTO_VRRP),
            self.source.octets(),
            GROUP_V4.octets(),
        )
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
        h.dscp = etherparse::IpDscp::CS6;
        h.header_checksum = h.calc_header_checksum();
        let mut p = h.to_bytes().to_vec();
        p.extend_from_slice(&msg);
        let to = SockAddr::from(SocketAddrV4::new(GROUP_V4, 0));
        self.send.send_to(&p, &to)?;
        Ok(())
    }

    /// The next advertisement datagram: its source, destination, TTL and
    /// message, or why it is not one.
    async fn recv(&self, buf: &mut [MaybeUninit<u8>]) -> io::Result<Result<(IpAddr, IpAddr, u8, Vec<u8>), String>> {
        loop {
            let mut guard = self.recv.readable().await?;
            match guard.try_io(|s| s.get_ref().recv(buf)) {
                Ok(Ok(n)) => {
                    // SAFETY: recv initialised the first n bytes.
                    let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n) };
                    return Ok(packet::split_ipv4(bytes)
                        .map(|(s, d, ttl, m)| (s, d, ttl, m.to_vec()))
                        .map_err(|e| e.to_string()));
                }
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Gratuitous ARP for each IPv4 address: a broadcast request whose
/// sender and target are the address, from the link's own MAC.
pub fn announce(link: &Link, addresses: &[IpAddr]) -> io::Result<()> {
    let sock = Socket::new(Domain::PACKET, Type::RAW, None)?;
    for a in addresses {
        let IpAddr::V4(a) = a else { continue };
        let arp = etherparse::ArpEthIpv4Packet {
            operation: etherparse::ArpOperation::REQUEST,
            sender_mac: link.mac,
            sender_ipv4: a.octets(),
            target_mac: [0; 6],
            target_ipv4: a.octets(),
        };
        let eth = etherparse::Ethernet2Header {
            source: link.mac,
            destination: [0xff; 6],
            ether_type: etherparse::EtherType::ARP,
        };
        let mut f = eth.to_bytes().to_vec();
        f.extend_from_slice(&arp.to_bytes());
        // SAFETY: a zeroed sockaddr_ll, filled as packet(7) says.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = (libc::ETH_P_ARP as u16).to_be();
        ll.sll_ifindex = link.ifindex as i32;
        ll.sll_halen = 6;
        ll.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        // SAFETY: `ll` is a valid sockaddr_ll of its own size.
        let to = unsafe {
            SockAddr::try_init(|storage, len| {
                std::ptr::copy_nonoverlapping(
                    &ll as *const libc::sockaddr_ll as *const u8,
                    storage as *mut u8,
                    std::mem::size_of::<libc::sockaddr_ll>(),
                );
                *len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                Ok(())
            })
        }?
        .1;
        sock.send_to(&f, &to)?;
    }
    Ok(())
}

/// Runs one IPv4 virtual router on `link` from `source` until `stop` turns
/// true, reporting to `events`; then resigns if Master. With `announce`,
/// it announces the addresses itself on becoming Master (else its caller
/// does, once it may).
pub async fn run(
    cfg: Config,
    link: Link,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    announce_on_master: bool,
) -> io::Result<()> {
    let IpAddr::V4(source) = cfg.primary else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an IPv4 virtual router needs an IPv4 source",
        ));
    };
    let wire = Wire::open(&link, source)?;
    let mut m = Machine::new(cfg);
    let mut buf = vec![MaybeUninit::<u8>::uninit(); 2048];
    // An advertisement that cannot go out (a full queue, a link going
    // down) is lost as on the wire: the machine goes on, and a link down
    // long enough is its caller's to notice.
    let send_failed = std::sync::atomic::AtomicU64::new(0);
    let act = |m: &Machine, acts: Vec<Action>| -> io::Result<()> {
        for a in acts {
            match a {
                Action::Send(ad) => {
                    if let Err(e) = wire.send(&ad) {
                        let n = send_failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        if n.is_power_of_two() {
                            tracing::warn!(error = %e, failed = n, "VRRP advertisement not sent");
                        }
                    }
                }
                Action::Announce if announce_on_master => {
                    if let Err(e) = announce(&link, &m.config().addresses) {
                        tracing::warn!(error = %e, "gratuitous ARP not sent");
                    }
                }
                Action::Announce => {}
                Action::Became(s) => {
                    let _ = events.send(Event::State(s));
                }
            }
        }
        Ok(())
    };
    let acts = m.startup(Instant::now());
    act(&m, acts)?;
    // Discards are reported once a second at most: a flood of forged
    // advertisements costs the caller nothing.
    let mut last_report: Option<Instant> = None;
    let mut report = |e: Event| {
        if last_report.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
            last_report = Some(Instant::now());
            let _ = events.send(e);
        }
    };
    loop {
        let deadline = m
            .deadline()
            .map(tokio::time::Instant::from_std)
            .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() {
                    let acts = m.shutdown();
                    return act(&m, acts);
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let acts = m.on_timer(Instant::now());
                act(&m, acts)?;
            }
            got = wire.recv(&mut buf) => {
                let (src, dst, ttl, msg) = match got? {
                    Ok(x) => x,
                    Err(why) => {
                        report(Event::Discarded { from: IpAddr::V4(Ipv4Addr::UNSPECIFIED), why });
                        continue;
                    }
                };
                if src == IpAddr::V4(source) {
                    continue;
                }
                match Advert::decode(src, dst, ttl, &msg) {
                    Err(e) => {
                        report(Event::Discarded { from: src, why: e.to_string() });
                    }
                    Ok((a, form)) => {
                        if a.vrid != m.config().vrid {
                            continue;
                        }
                        if form == ChecksumForm::KeepalivedOldUnicast {
                            report(Event::OldChecksum { from: src });
                        }
                        if a.addresses != m.config().addresses {
                            report(Event::Mismatch { from: src, addresses: a.addresses.clone() });
                        }
                        let acts = m.on_advert(Instant::now(), src, &a);
                        act(&m, acts)?;
                    }
                }
            }
        }
    }
}
