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

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
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
    };
    std::process::exit(code);
}
