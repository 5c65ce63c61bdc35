//! One virtual router on one link, on the wire: raw sockets for the
//! advertisements (protocol 112 to 224.0.0.18 with TTL 255, or to
//! ff02::12 with hop limit 255 from the link-local address; DSCP CS6 as
//! keepalived sends them), a packet socket for gratuitous ARP and
//! unsolicited neighbour advertisements on takeover, and the [`Machine`]
//! between them. What the machine decides is reported
//! as [`Event`]s; what an owner does with the address (the dataplane, the
//! controller's epoch) is the caller's.

use std::io;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{Domain, InterfaceIndexOrAddress, Protocol, SockAddr, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::sync::{mpsc, watch};

use super::machine::{Action, Config, Machine, State};
use super::packet::{self, Advert, ChecksumForm, GROUP_V4, GROUP_V6, IP_PROTO_VRRP, TTL};

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

/// The first IPv6 link-local address of interface `name`: an IPv6
/// virtual router's source (RFC 9568 5.1.2.1).
pub fn link_local(name: &str) -> Option<Ipv6Addr> {
    crate::dataplane::addresses(name)
        .ok()?
        .into_iter()
        .find_map(|a| match a {
            IpAddr::V6(a) if a.is_unicast_link_local() => Some(a),
            _ => None,
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

/// The sockets of one virtual router on `link`, of its source's family.
struct Wire {
    recv: AsyncFd<Socket>,
    send: Socket,
    source: IpAddr,
    ifindex: u32,
}

/// Sets an integer IPv6 socket option.
fn set_ipv6_int(s: &Socket, name: libc::c_int, value: libc::c_int) -> io::Result<()> {
    // SAFETY: an int option of its own size on a live descriptor.
    let r = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::IPPROTO_IPV6,
            name,
            &value as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// One IPv6 datagram from a raw socket (the kernel strips the IPv6
/// header): its source, destination and hop limit from the ancillary
/// data, and its length in `buf`.
fn recv_v6(fd: libc::c_int, buf: &mut [MaybeUninit<u8>]) -> io::Result<(Ipv6Addr, Ipv6Addr, u8, usize)> {
    // SAFETY: plain C structures, zeroed then filled by recvmsg(2) within
    // the lengths given.
    unsafe {
        let mut name: libc::sockaddr_in6 = std::mem::zeroed();
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        let mut control = [0u64; 16];
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_name = &mut name as *mut libc::sockaddr_in6 as *mut libc::c_void;
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = std::mem::size_of_val(&control) as _;
        let n = libc::recvmsg(fd, &mut msg, 0);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let (mut hops, mut dst) = (None, None);
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IPV6 {
                if (*c).cmsg_type == libc::IPV6_HOPLIMIT {
                    hops = Some(std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::c_int) as u8);
                } else if (*c).cmsg_type == libc::IPV6_PKTINFO {
                    let pi = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::in6_pktinfo);
                    dst = Some(Ipv6Addr::from(pi.ipi6_addr.s6_addr));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
        match (hops, dst) {
            (Some(h), Some(d)) => Ok((Ipv6Addr::from(name.sin6_addr.s6_addr), d, h, n as usize)),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "no hop limit or destination with the datagram",
            )),
        }
    }
}

impl Wire {
    fn open(link: &Link, source: IpAddr) -> io::Result<Wire> {
        match source {
            IpAddr::V4(s) => Self::open_v4(link, s),
            IpAddr::V6(s) => Self::open_v6(link, s),
        }
    }

    fn open_v6(link: &Link, source: Ipv6Addr) -> io::Result<Wire> {
        let proto = Some(Protocol::from(i32::from(IP_PROTO_VRRP)));
        let recv = Socket::new(Domain::IPV6, Type::RAW, proto)?;
        recv.bind_device(Some(link.name.as_bytes()))?;
        recv.join_multicast_v6(&GROUP_V6, link.ifindex)?;
        set_ipv6_int(&recv, libc::IPV6_RECVHOPLIMIT, 1)?;
        set_ipv6_int(&recv, libc::IPV6_RECVPKTINFO, 1)?;
        recv.set_nonblocking(true)?;
        let send = Socket::new(Domain::IPV6, Type::RAW, proto)?;
        send.bind_device(Some(link.name.as_bytes()))?;
        send.bind(&SockAddr::from(SocketAddrV6::new(source, 0, 0, link.ifindex)))?;
        send.set_multicast_if_v6(link.ifindex)?;
        send.set_multicast_hops_v6(u32::from(TTL))?;
        send.set_multicast_loop_v6(false)?;
        // DSCP CS6 in the traffic class.
        set_ipv6_int(&send, libc::IPV6_TCLASS, 0xc0)?;
        send.set_recv_buffer_size(0)?;
        // SAFETY: as in `open_v4`.
        let recv =
            unsafe { AsyncFd::register_with_interest(recv, tokio::io::Interest::READABLE) }.map_err(io::Error::from)?;
        Ok(Wire {
            recv,
            send,
            source: IpAddr::V6(source),
            ifindex: link.ifindex,
        })
    }

    fn open_v4(link: &Link, source: Ipv4Addr) -> io::Result<Wire> {
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
        Ok(Wire {
            recv,
            send,
            source: IpAddr::V4(source),
            ifindex: link.ifindex,
        })
    }

    /// Sends `a` to the group from our source, TTL 255, DSCP CS6.
    fn send(&self, a: &Advert) -> io::Result<()> {
        let source = match self.source {
            IpAddr::V4(s) => s,
            IpAddr::V6(_) => {
                // The kernel writes the IPv6 header (hop limit and traffic
                // class set on the socket).
                let msg = a.encode(self.source, IpAddr::V6(GROUP_V6));
                let to = SockAddr::from(SocketAddrV6::new(GROUP_V6, 0, 0, self.ifindex));
                self.send.send_to(&msg, &to)?;
                return Ok(());
            }
        };
        let msg = a.encode(IpAddr::V4(source), IpAddr::V4(GROUP_V4));
        let mut h = etherparse::Ipv4Header::new(
            msg.len() as u16,
            TTL,
            etherparse::IpNumber(IP_PROTO_VRRP),
            source.octets(),
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
            if self.source.is_ipv6() {
                match guard.try_io(|s| recv_v6(s.get_ref().as_raw_fd(), buf)) {
                    Ok(Ok((src, dst, hops, n))) => {
                        // SAFETY: recvmsg initialised the first n bytes.
                        let bytes: &[u8] = unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, n) };
                        return Ok(Ok((IpAddr::V6(src), IpAddr::V6(dst), hops, bytes.to_vec())));
                    }
                    Ok(Err(e)) if e.kind() == io::ErrorKind::InvalidData => return Ok(Err(e.to_string())),
                    Ok(Err(e)) => return Err(e),
                    Err(_would_block) => continue,
                }
            }
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

/// Announces each address on `link`: a gratuitous ARP for an IPv4 one,
/// an unsolicited neighbour advertisement for an IPv6 one.
pub fn announce(link: &Link, addresses: &[IpAddr]) -> io::Result<()> {
    let sock = Socket::new(Domain::PACKET, Type::RAW, None)?;
    for a in addresses {
        let (frame, ethertype, to) = match a {
            IpAddr::V4(a) => (gratuitous_arp(link, *a), libc::ETH_P_ARP, [0xff; 6]),
            IpAddr::V6(a) => (unsolicited_na(link, *a)?, libc::ETH_P_IPV6, ALL_NODES_MAC),
        };
        // SAFETY: a zeroed sockaddr_ll, filled as packet(7) says.
        let mut ll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        ll.sll_family = libc::AF_PACKET as u16;
        ll.sll_protocol = (ethertype as u16).to_be();
        ll.sll_ifindex = link.ifindex as i32;
        ll.sll_halen = 6;
        ll.sll_addr[..6].copy_from_slice(&to);
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
        sock.send_to(&frame, &to)?;
    }
    Ok(())
}

/// The Ethernet address of all nodes (ff02::1).
const ALL_NODES_MAC: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// A gratuitous ARP: a broadcast request whose sender and target are the
/// address, from the link's own MAC.
fn gratuitous_arp(link: &Link, a: Ipv4Addr) -> Vec<u8> {
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
    f
}

/// An unsolicited neighbour advertisement (RFC 9568 6.4.2): from the
/// address to all nodes, hop limit 255, the Router and Override flags
/// set and Solicited not, the link's MAC as the target link-layer
/// address.
pub fn unsolicited_na(link: &Link, a: Ipv6Addr) -> io::Result<Vec<u8>> {
    let all_nodes = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);
    let mut body = a.octets().to_vec();
    body.extend_from_slice(&[2, 1]);
    body.extend_from_slice(&link.mac);
    let na = etherparse::Icmpv6Type::NeighborAdvertisement(etherparse::icmpv6::NeighborAdvertisementHeader {
        router: true,
        solicited: false,
        r#override: true,
    });
    let icmp = etherparse::Icmpv6Header::with_checksum(na, a.octets(), all_nodes.octets(), &body)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e.to_string()))?;
    let ip = etherparse::Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (icmp.header_len() + body.len()) as u16,
        next_header: etherparse::IpNumber::IPV6_ICMP,
        hop_limit: 255,
        source: a.octets(),
        destination: all_nodes.octets(),
    };
    let eth = etherparse::Ethernet2Header {
        source: link.mac,
        destination: ALL_NODES_MAC,
        ether_type: etherparse::EtherType::IPV6,
    };
    let mut f = eth.to_bytes().to_vec();
    f.extend_from_slice(&ip.to_bytes());
    f.extend_from_slice(&icmp.to_bytes());
    f.extend_from_slice(&body);
    Ok(f)
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
    let source = cfg.primary;
    if cfg.addresses.iter().any(|a| a.is_ipv4() != source.is_ipv4()) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a virtual router's addresses and source are of one family",
        ));
    }
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
                        let from = if source.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
                        report(Event::Discarded { from, why });
                        continue;
                    }
                };
                if src == source {
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
