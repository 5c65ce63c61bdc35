//! `sdn-probe`: a traffic end point for tests and the demo. Runs inside a VM
//! namespace: serves TCP and UDP echo, or connects and reports the outcome.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Echo on every given TCP and UDP port, IPv4 and IPv6.
    Serve {
        #[arg(long = "tcp")]
        tcp: Vec<u16>,
        #[arg(long = "udp")]
        udp: Vec<u16>,
    },
    /// One exchange; prints "ok", "timeout", "refused" or "error: ..." and exits 0 only on ok.
    Connect {
        proto: String,
        addr: String,
        port: u16,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
        /// Source address for TCP (it must be an address of this machine).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Sends UDP datagrams as fast as it can for a duration, rotating over
    /// `flows` source ports; prints the number sent.
    Flood {
        addr: String,
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 16)]
        flows: usize,
        #[arg(long, default_value_t = 18)]
        payload: usize,
    },
    /// Sends `count` TCP SYNs to addr:port, each from a distinct (source
    /// address, source port): addresses from `sources` (an IPv4 prefix),
    /// ports from 1024 up; raw IPv4, as fast as it can. Prints the number
    /// sent and the seconds it took.
    SynFlood {
        addr: std::net::Ipv4Addr,
        port: u16,
        #[arg(long)]
        sources: ipnetwork::Ipv4Network,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
    },
    /// Sends UDP datagrams to addr:port as fast as it can for a duration,
    /// each from a distinct (source address, source port), so every one
    /// starts a new flow: addresses from `sources` (an IPv4 prefix), ports
    /// from 1024 up; raw IPv4. Prints the number sent.
    NewFlows {
        addr: std::net::Ipv4Addr,
        port: u16,
        #[arg(long)]
        sources: ipnetwork::Ipv4Network,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 18)]
        payload: usize,
    },
    /// Keeps one TCP connection and exchanges a message every interval for a
    /// duration; reports failed exchanges. Exits 0 only if none failed.
    Hold {
        addr: String,
        port: u16,
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        #[arg(long, default_value_t = 50)]
        interval_ms: u64,
    },
    /// Sends a numbered UDP datagram every `interval_us` (1 ms: a 1 kHz
    /// probe) to an echo server for a duration, from one socket (one
    /// flow), and reads the echoes; prints JSON: sent, answered, and the
    /// longest time with no echo (`max_gap_ms`), with every gap over
    /// 20 ms and when it began (ms from the start).
    Gap {
        addr: std::net::IpAddr,
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 1000)]
        interval_us: u64,
        /// Source address (one of this machine's).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Opens CONNS TCP connections to an echo server and exchanges 8 bytes
    /// on each every `interval_ms` for SECONDS (one thread each); prints
    /// JSON: how many connections survived (each echo, awaited up to
    /// `patience_secs`, came back), how many were reset or closed, and the
    /// longest wait for an echo (`max_stall_ms`). Established connections
    /// through a failover: they survive or they do not.
    Survive {
        addr: std::net::IpAddr,
        port: u16,
        #[arg(long, default_value_t = 10)]
        conns: usize,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// How long an echo is awaited before the connection counts as
        /// silent. TCP retransmits a lost segment after 0.2, 0.6, 1.4, 3.0
        /// and 6.2 s: a path back after 3 s is seen only by a wait beyond
        /// 6.2 s.
        #[arg(long, default_value_t = 5)]
        patience_secs: u64,
        /// Source address (one of this machine's).
        #[arg(long)]
        bind: Option<std::net::IpAddr>,
    },
    /// Answers each TCP connection on PORT (IPv4) with NAME, then closes
    /// it: which of several servers behind one address answered.
    Name { port: u16, name: String },
    /// Connects to ADDR:PORT and prints what the server says before it
    /// closes (see `name`); exits 0 only if it said something.
    Who {
        addr: std::net::IpAddr,
        port: u16,
        #[arg(long, default_value_t = 1000)]
        timeout_ms: u64,
    },
    /// Sends one unsolicited neighbour advertisement for TARGET out of
    /// DEV, from TARGET, to all nodes (with the override flag and DEV's
    /// MAC as the target link-layer address), as a VRRP Master does.
    Na { target: std::net::Ipv6Addr, dev: String },
    /// Sends COUNT VRRPv3 advertisements for router VRID at PRIORITY,
    /// protecting ADDRESS, to 224.0.0.18 out of DEV (TTL 255), as fast as
    /// it can; prints the number sent.
    VrrpFlood {
        dev: String,
        vrid: u8,
        priority: u8,
        address: std::net::Ipv4Addr,
        #[arg(long, default_value_t = 1000)]
        count: u64,
    },
    /// Answers each connection on PORT (IPv4) with the byte it sends, then
    /// closes it: a server for connections per second, one thread.
    Accept { port: u16 },
    /// Opens TCP connections to ADDR:PORT from THREADS threads for SECONDS,
    /// each sending a byte, reading it back and closing with a reset (no
    /// TIME_WAIT: the client's ports last the run); prints "OK FAILED".
    Conns {
        addr: std::net::Ipv4Addr,
        port: u16,
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 8)]
        threads: usize,
    },
}

fn gap(
    addr: std::net::IpAddr,
    port: u16,
    seconds: u64,
    interval: Duration,
    bind: Option<std::net::IpAddr>,
) -> std::io::Result<serde_json::Value> {
    let local = bind.unwrap_or(if addr.is_ipv4() {
        std::net::IpAddr::from([0u8; 4])
    } else {
        std::net::IpAddr::from([0u16; 8])
    });
    let s = UdpSocket::bind(SocketAddr::new(local, 0))?;
    let to = SocketAddr::new(addr, port);
    // Not connected: an echo server that answers from its host's own
    // address rather than the virtual one (a plain UDP server behind
    // keepalived) still counts.
    let r = s.try_clone()?;
    r.set_read_timeout(Some(Duration::from_millis(50)))?;
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let reader = std::thread::spawn(move || {
        // Times (since the start) of each echo.
        let mut got: Vec<Duration> = Vec::new();
        let mut buf = [0u8; 64];
        while Instant::now() < end + Duration::from_millis(300) {
            if let Ok((n, _)) = r.recv_from(&mut buf) {
                if n >= 8 {
                    got.push(start.elapsed());
                }
            }
        }
        got
    });
    let mut sent = 0u64;
    let mut next = start;
    while Instant::now() < end {
        let _ = s.send_to(&sent.to_be_bytes(), to);
        sent += 1;
        next += interval;
        if let Some(w) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(w);
        }
    }
    let got = reader.join().unwrap_or_default();
    let mut gaps = Vec::new();
    let mut max = Duration::ZERO;
    // Silence from the start counts too, as does silence at the end.
    let mut last = Duration::ZERO;
    for t in got.iter().copied().chain(std::iter::once(Duration::from_secs(seconds))) {
        let g = t.saturating_sub(last);
        max = max.max(g);
        if g > Duration::from_millis(20) {
            gaps.push(serde_json::json!({"at_ms": last.as_millis() as u64, "ms": g.as_millis() as u64}));
        }
        last = t;
    }
    Ok(serde_json::json!({
        "sent": sent,
        "answered": got.len(),
        "max_gap_ms": max.as_secs_f64() * 1000.0,
        "gaps": gaps,
    }))
}

fn accept(port: u16) -> std::io::Result<()> {
    let l = TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))?;
    println!("serving");
    for s in l.incoming() {
        let Ok(mut s) = s else { continue };
        let mut b = [0u8; 1];
        if let Ok(1) = s.read(&mut b) {
            let _ = s.write_all(&b);
        }
    }
    Ok(())
}

fn conns(addr: std::net::Ipv4Addr, port: u16, seconds: u64, threads: usize) -> (u64, u64) {
    let sa = SocketAddr::from((addr, port));
    let end = Instant::now() + Duration::from_secs(seconds);
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            std::thread::spawn(move || {
                let (mut ok, mut failed) = (0u64, 0u64);
                while Instant::now() < end {
                    let once = || -> std::io::Result<()> {
                        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                        s.set_linger(Some(Duration::ZERO))?;
                        s.connect_timeout(&sa.into(), Duration::from_secs(1))?;
                        let mut s: TcpStream = s.into();
                        s.set_read_timeout(Some(Duration::from_secs(1)))?;
                        s.write_all(b"x")?;
                        let mut b = [0u8; 1];
                        s.read_exact(&mut b)?;
                        Ok(())
                    };
                    match once() {
                        Ok(()) => ok += 1,
                        Err(_) => failed += 1,
                    }
                }
                (ok, failed)
            })
        })
        .collect();
    workers
        .into_iter()
        .filter_map(|w| w.join().ok())
        .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
}

fn bind_both<T>(port: u16, f: impl Fn(SocketAddr) -> std::io::Result<T>) -> std::io::Result<Vec<T>> {
    // [::] serves both families unless net.ipv6.bindv6only is set; then the
    // IPv4 bind succeeds too. Either way both families are served.
    let mut v = vec![f(SocketAddr::from(([0u16; 8], port)))?];
    if let Ok(s) = f(SocketAddr::from(([0, 0, 0, 0], port))) {
        v.push(s);
    }
    Ok(v)
}

fn serve(tcp: Vec<u16>, udp: Vec<u16>) -> std::io::Result<()> {
    let mut threads = Vec::new();
    for p in tcp {
        for l in bind_both(p, TcpListener::bind)? {
            threads.push(std::thread::spawn(move || {
                for s in l.incoming().flatten() {
                    std::thread::spawn(move || {
                        let mut s = s;
                        let mut buf = [0u8; 1500];
                        while let Ok(n) = s.read(&mut buf) {
                            if n == 0 || s.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            }));
        }
    }
    for p in udp {
        for s in bind_both(p, UdpSocket::bind)? {
            threads.push(std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, from)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], from);
                }
            }));
        }
    }
    println!("serving");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn tcp_connect(sa: SocketAddr, bind: Option<std::net::IpAddr>, timeout: Duration) -> std::io::Result<TcpStream> {
    let Some(b) = bind else {
        return TcpStream::connect_timeout(&sa, timeout);
    };
    let s = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.bind(&SocketAddr::new(b, 0).into())?;
    s.connect_timeout(&sa.into(), timeout)?;
    Ok(s.into())
}

fn connect(
    proto: &str,
    addr: &str,
    port: u16,
    timeout: Duration,
    bind: Option<std::net::IpAddr>,
) -> Result<(), String> {
    let ip: std::net::IpAddr = addr.parse().map_err(|_| format!("error: bad address {addr}"))?;
    let sa = SocketAddr::new(ip, port);
    match proto {
        "tcp" => {
            let mut s = tcp_connect(sa, bind, timeout).map_err(|e| match e.kind() {
                std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => "timeout".to_string(),
                std::io::ErrorKind::ConnectionRefused => "refused".to_string(),
                _ => format!("error: {e}"),
            })?;
            s.set_read_timeout(Some(timeout)).ok();
            s.write_all(b"probe").map_err(|e| format!("error: {e}"))?;
            let mut buf = [0u8; 5];
            s.read_exact(&mut buf).map_err(|_| "timeout".to_string())?;
            Ok(())
        }
        "udp" => {
            let local: SocketAddr = if ip.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = UdpSocket::bind(local).map_err(|e| format!("error: {e}"))?;
            s.set_read_timeout(Some(timeout)).ok();
            s.send_to(b"probe", sa).map_err(|e| format!("error: {e}"))?;
            let mut buf = [0u8; 16];
            match s.recv_from(&mut buf) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Err("refused".into()),
                Err(_) => Err("timeout".into()),
            }
        }
        p => Err(format!("error: unknown protocol {p}")),
    }
}

fn hold(addr: &str, port: u16, seconds: u64, interval: Duration) -> Result<u64, String> {
    let ip: std::net::IpAddr = addr.parse().map_err(|_| format!("bad address {addr}"))?;
    let mut s = TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(2))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok();
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut ok, mut failed) = (0u64, 0u64);
    while Instant::now() < end {
        let mut buf = [0u8; 8];
        let exchanged = s.write_all(b"12345678").is_ok() && s.read_exact(&mut buf).is_ok();
        if exchanged {
            ok += 1;
        } else {
            failed += 1;
            eprintln!("exchange {} failed", ok + failed);
        }
        std::thread::sleep(interval);
    }
    println!("exchanges ok={ok} failed={failed}");
    if failed == 0 {
        Ok(ok)
    } else {
        Err(format!("{failed} exchanges failed"))
    }
}

/// How one connection of [`survive`] ended.
enum Fate {
    Survived,
    /// Reset, closed, or an echo that differs.
    Broken(String),
    /// An echo never came back (within the patience given).
    Silent,
}

fn survive(
    to: SocketAddr,
    conns: usize,
    run: Duration,
    interval: Duration,
    patience: Duration,
    bind: Option<std::net::IpAddr>,
) -> std::io::Result<serde_json::Value> {
    let mut socks = Vec::new();
    for _ in 0..conns {
        let sock = socket2::Socket::new(
            socket2::Domain::for_address(to),
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )?;
        if let Some(b) = bind {
            sock.bind(&SocketAddr::new(b, 0).into())?;
        }
        sock.connect_timeout(&to.into(), Duration::from_secs(2))?;
        sock.set_tcp_nodelay(true)?;
        socks.push(TcpStream::from(sock));
    }
    let start = Instant::now();
    let end = start + run;
    let threads: Vec<_> = socks
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || -> (Fate, Duration) {
                let mut stall = Duration::ZERO;
                let mut n = 0u64;
                loop {
                    let last = Instant::now() >= end;
                    let msg = (((i as u64) << 40) | n).to_be_bytes();
                    n += 1;
                    let asked = Instant::now();
                    if let Err(e) = s.write_all(&msg) {
                        return (Fate::Broken(format!("write: {e}")), stall);
                    }
                    // An echo may take a failover to come back: waited for
                    // (TCP retransmits meanwhile).
                    s.set_read_timeout(Some(patience)).ok();
                    let mut buf = [0u8; 8];
                    match s.read_exact(&mut buf) {
                        Ok(()) if buf == msg => {}
                        Ok(()) => return (Fate::Broken("a different echo".into()), stall),
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                            return (Fate::Silent, asked.elapsed().max(stall));
                        }
                        Err(e) => return (Fate::Broken(format!("read: {e}")), stall),
                    }
                    stall = stall.max(asked.elapsed());
                    if last {
                        return (Fate::Survived, stall);
                    }
                    std::thread::sleep(interval);
                }
            })
        })
        .collect();
    let (mut survived, mut broken, mut silent, mut max_stall) = (0, Vec::new(), 0, Duration::ZERO);
    for t in threads {
        let (fate, stall) = t
            .join()
            .map_err(|_| std::io::Error::other("a connection's thread panicked"))?;
        max_stall = max_stall.max(stall);
        match fate {
            Fate::Survived => survived += 1,
            Fate::Broken(e) => broken.push(e),
            Fate::Silent => silent += 1,
        }
    }
    Ok(serde_json::json!({
        "conns": conns,
        "survived": survived,
        "broken": broken.len(),
        "silent": silent,
        "why_broken": broken.into_iter().take(3).collect::<Vec<_>>(),
        "max_stall_ms": max_stall.as_millis() as u64,
    }))
}

fn flood(addr: &str, port: u16, seconds: u64, flows: usize, payload: usize) -> std::io::Result<u64> {
    let ip: std::net::IpAddr = addr.parse().map_err(|_| std::io::Error::other("bad address"))?;
    let dst = SocketAddr::new(ip, port);
    let local: SocketAddr = if ip.is_ipv4() {
        "0.0.0.0:0".parse().unwrap()
    } else {
        "[::]:0".parse().unwrap()
    };
    let socks: Vec<UdpSocket> = (0..flows.max(1))
        .map(|_| UdpSocket::bind(local))
        .collect::<Result<_, _>>()?;
    for s in &socks {
        s.connect(dst)?;
    }
    let buf = vec![0x5au8; payload];
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    while Instant::now() < end {
        for s in &socks {
            // Errors (e.g. ENOBUFS) are counted as not sent.
            if s.send(&buf).is_ok() {
                sent += 1;
            }
        }
    }
    Ok(sent)
}

/// RFC 1071 sum of 16-bit words, folded.
fn csum(parts: &[&[u8]]) -> u16 {
    let mut sum: u32 = 0;
    for p in parts {
        for c in p.chunks(2) {
            sum += u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32;
        }
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Distinct (source address, source port) tuples from a prefix: 64,000
/// ports from 1024 up for each address (not the network address, not the
/// broadcast), then the next address.
struct Tuples {
    hosts: Vec<u32>,
}

impl Tuples {
    const PORTS_PER_HOST: u64 = 64_000;

    fn new(sources: ipnetwork::Ipv4Network) -> Tuples {
        let base = u32::from(sources.network());
        let n = 1u64 << (32 - sources.prefix() as u64);
        Tuples {
            hosts: (1..n.saturating_sub(1).max(2)).map(|i| base + i as u32).collect(),
        }
    }

    fn nth(&self, i: u64) -> (std::net::Ipv4Addr, u16) {
        let host = self.hosts[((i / Self::PORTS_PER_HOST) as usize) % self.hosts.len()];
        (host.into(), 1024 + (i % Self::PORTS_PER_HOST) as u16)
    }
}

/// An IPv4 header for a raw socket (the kernel fills the checksum and the
/// id when they are zero).
fn ipv4_header(h: &mut [u8], total: u16, proto: u8, src: std::net::Ipv4Addr, dst: std::net::Ipv4Addr) {
    h[..20].fill(0);
    h[0] = 0x45;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h[6] = 0x40;
    h[8] = 64;
    h[9] = proto;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
}

/// A raw IPv4 socket: the kernel adds nothing (IPPROTO_RAW implies the IP
/// header is ours).
fn raw_socket() -> std::io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(libc::IPPROTO_RAW)))
}

/// A SYN flood of distinct tuples through a raw socket.
fn syn_flood(
    dst: std::net::Ipv4Addr,
    port: u16,
    sources: ipnetwork::Ipv4Network,
    count: u64,
) -> std::io::Result<(u64, f64)> {
    let sock = raw_socket()?;
    let to = socket2::SockAddr::from(SocketAddr::from((dst, port)));
    let tuples = Tuples::new(sources);
    let start = Instant::now();
    let mut sent = 0u64;
    let mut pkt = [0u8; 40];
    for i in 0..count {
        let (src, sport) = tuples.nth(i);
        ipv4_header(&mut pkt, 40, 6, src, dst);
        // TCP SYN.
        let t = &mut pkt[20..40];
        t.fill(0);
        t[0..2].copy_from_slice(&sport.to_be_bytes());
        t[2..4].copy_from_slice(&port.to_be_bytes());
        t[4..8].copy_from_slice(&(i as u32).to_be_bytes());
        t[12] = 5 << 4;
        t[13] = 0x02;
        t[14..16].copy_from_slice(&64240u16.to_be_bytes());
        let mut pseudo = [0u8; 12];
        pseudo[0..4].copy_from_slice(&src.octets());
        pseudo[4..8].copy_from_slice(&dst.octets());
        pseudo[9] = 6;
        pseudo[10..12].copy_from_slice(&20u16.to_be_bytes());
        let c = csum(&[&pseudo, &pkt[20..40]]);
        pkt[36..38].copy_from_slice(&c.to_be_bytes());
        if sock.send_to(&pkt, &to).is_ok() {
            sent += 1;
        }
    }
    Ok((sent, start.elapsed().as_secs_f64()))
}

/// UDP datagrams of distinct tuples through a raw socket for a duration
/// (no UDP checksum: optional in IPv4), 64 to a system call (sendmmsg).
fn new_flows(
    dst: std::net::Ipv4Addr,
    port: u16,
    sources: ipnetwork::Ipv4Network,
    seconds: u64,
    payload: usize,
) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    const BATCH: usize = 64;
    let sock = raw_socket()?;
    let to = socket2::SockAddr::from(SocketAddr::from((dst, port)));
    let tuples = Tuples::new(sources);
    let total = 28 + payload;
    let total16 = u16::try_from(total).map_err(|_| std::io::Error::other("payload too large"))?;
    let mut pkts = vec![vec![0x5au8; total]; BATCH];
    let end = Instant::now() + Duration::from_secs(seconds);
    let mut sent = 0u64;
    let mut i = 0u64;
    while Instant::now() < end {
        for pkt in pkts.iter_mut() {
            let (src, sport) = tuples.nth(i);
            i += 1;
            ipv4_header(pkt, total16, 17, src, dst);
            pkt[20..22].copy_from_slice(&sport.to_be_bytes());
            pkt[22..24].copy_from_slice(&port.to_be_bytes());
            pkt[24..26].copy_from_slice(&((total - 20) as u16).to_be_bytes());
            pkt[26..28].fill(0);
        }
        let mut iov: Vec<libc::iovec> = pkts
            .iter_mut()
            .map(|p| libc::iovec {
                iov_base: p.as_mut_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        // SAFETY: zeroed plain-data headers, filled below.
        let mut msgs: Vec<libc::mmsghdr> = (0..BATCH).map(|_| unsafe { std::mem::zeroed() }).collect();
        for (m, v) in msgs.iter_mut().zip(iov.iter_mut()) {
            m.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
            m.msg_hdr.msg_namelen = to.len();
            m.msg_hdr.msg_iov = v;
            m.msg_hdr.msg_iovlen = 1;
        }
        // SAFETY: every header points at buffers alive for the call.
        let n = unsafe { libc::sendmmsg(sock.as_raw_fd(), msgs.as_mut_ptr(), BATCH as u32, 0) };
        // Errors (e.g. ENOBUFS) are counted as not sent.
        if n > 0 {
            sent += n as u64;
        }
    }
    Ok(sent)
}

fn unsolicited_na(target: std::net::Ipv6Addr, dev: &str) -> std::io::Result<()> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let c = std::ffi::CString::new(dev).map_err(std::io::Error::other)?;
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        return Err(std::io::Error::other(format!("no device {dev}")));
    }
    let mac: Vec<u8> = std::fs::read_to_string(format!("/sys/class/net/{dev}/address"))?
        .trim()
        .split(':')
        .filter_map(|h| u8::from_str_radix(h, 16).ok())
        .collect();
    let s = Socket::new(Domain::IPV6, Type::RAW, Some(Protocol::ICMPV6))?;
    s.set_multicast_hops_v6(255)?;
    s.set_multicast_if_v6(ifindex)?;
    // The source is the target (which a Backup does not have: the caller
    // allows binding to it with `net.ipv6.ip_nonlocal_bind`).
    s.bind(&SockAddr::from(std::net::SocketAddrV6::new(target, 0, 0, ifindex)))?;
    // Type 136, code 0, checksum (the kernel's), override flag, target,
    // then the target link-layer address option.
    let mut p = vec![136u8, 0, 0, 0, 0x20, 0, 0, 0];
    p.extend_from_slice(&target.octets());
    p.extend_from_slice(&[2, 1]);
    p.extend_from_slice(&mac);
    let all = std::net::SocketAddrV6::new(std::net::Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), 0, 0, ifindex);
    s.send_to(&p, &SockAddr::from(all))?;
    Ok(())
}

fn vrrp_flood(dev: &str, vrid: u8, priority: u8, address: std::net::Ipv4Addr, count: u64) -> std::io::Result<u64> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::from(112)))?;
    s.bind_device(Some(dev.as_bytes()))?;
    s.set_multicast_ttl_v4(255)?;
    // VRRPv3 advertisement, every 10 cs; the checksum is left 0 (the relay
    // does not read it).
    let mut m = vec![0x31, vrid, priority, 1, 0, 10, 0, 0];
    m.extend_from_slice(&address.octets());
    let to = SockAddr::from(std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(224, 0, 0, 18), 0));
    let mut sent = 0;
    for _ in 0..count {
        if s.send_to(&m, &to).is_ok() {
            sent += 1;
        }
    }
    Ok(sent)
}

fn name_server(port: u16, name: &str) -> std::io::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    for c in l.incoming() {
        let Ok(mut c) = c else { continue };
        let _ = c.write_all(name.as_bytes());
    }
    Ok(())
}

fn who(addr: std::net::IpAddr, port: u16, timeout: Duration) -> std::io::Result<String> {
    let mut c = TcpStream::connect_timeout(&SocketAddr::new(addr, port), timeout)?;
    c.set_read_timeout(Some(timeout))?;
    let mut out = String::new();
    c.read_to_string(&mut out)?;
    if out.is_empty() {
        return Err(std::io::Error::other("the server said nothing"));
    }
    Ok(out)
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::VrrpFlood {
            dev,
            vrid,
            priority,
            address,
            count,
        } => match vrrp_flood(&dev, vrid, priority, address, count) {
            Ok(n) => {
                println!("{n}");
                0
            }
            Err(e) => {
                eprintln!("vrrp-flood: {e}");
                1
            }
        },
        Cmd::Na { target, dev } => match unsolicited_na(target, &dev) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("na: {e}");
                1
            }
        },
        Cmd::Name { port, name } => match name_server(port, &name) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("name: {e}");
                1
            }
        },
        Cmd::Who { addr, port, timeout_ms } => match who(addr, port, Duration::from_millis(timeout_ms)) {
            Ok(s) => {
                println!("{s}");
                0
            }
            Err(e) => {
                println!("error: {e}");
                1
            }
        },
        Cmd::Serve { tcp, udp } => match serve(tcp, udp) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("serve: {e}");
                1
            }
        },
        Cmd::Connect {
            proto,
            addr,
            port,
            timeout_ms,
            bind,
        } => match connect(&proto, &addr, port, Duration::from_millis(timeout_ms), bind) {
            Ok(()) => {
                println!("ok");
                0
            }
            Err(e) => {
                println!("{e}");
                1
            }
        },
        Cmd::Flood {
            addr,
            port,
            seconds,
            flows,
            payload,
        } => match flood(&addr, port, seconds, flows, payload) {
            Ok(n) => {
                println!("{n}");
                0
            }
            Err(e) => {
                eprintln!("flood: {e}");
                1
            }
        },
        Cmd::SynFlood {
            addr,
            port,
            sources,
            count,
        } => match syn_flood(addr, port, sources, count) {
            Ok((sent, secs)) => {
                println!("{sent} {secs:.3}");
                0
            }
            Err(e) => {
                eprintln!("syn-flood: {e}");
                1
            }
        },
        Cmd::NewFlows {
            addr,
            port,
            sources,
            seconds,
            payload,
        } => match new_flows(addr, port, sources, seconds, payload) {
            Ok(n) => {
                println!("{n}");
                0
            }
            Err(e) => {
                eprintln!("new-flows: {e}");
                1
            }
        },
        Cmd::Hold {
            addr,
            port,
            seconds,
            interval_ms,
        } => match hold(&addr, port, seconds, Duration::from_millis(interval_ms)) {
            Ok(_) => 0,
            Err(e) => {
                eprintln!("hold: {e}");
                1
            }
        },
        Cmd::Gap {
            addr,
            port,
            seconds,
            interval_us,
            bind,
        } => match gap(addr, port, seconds, Duration::from_micros(interval_us), bind) {
            Ok(j) => {
                println!("{j}");
                0
            }
            Err(e) => {
                eprintln!("gap: {e}");
                1
            }
        },
        Cmd::Survive {
            addr,
            port,
            conns,
            seconds,
            interval_ms,
            patience_secs,
            bind,
        } => match survive(
            SocketAddr::new(addr, port),
            conns,
            Duration::from_secs(seconds),
            Duration::from_millis(interval_ms),
            Duration::from_secs(patience_secs),
            bind,
        ) {
            Ok(j) => {
                println!("{j}");
                0
            }
            Err(e) => {
                eprintln!("survive: {e}");
                1
            }
        },
        Cmd::Accept { port } => match accept(port) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("accept: {e}");
                1
            }
        },
        Cmd::Conns {
            addr,
            port,
            seconds,
            threads,
        } => {
            let (ok, failed) = conns(addr, port, seconds, threads);
            println!("{ok} {failed}");
            0
        }
    };
    std::process::exit(code);
}
