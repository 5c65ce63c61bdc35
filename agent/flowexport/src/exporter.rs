//! Sending records to one collector, over UDP or TCP (RFC 7011 10).
//!
//! - UDP: messages of at most [`UDP_MESSAGE_MAX`] bytes; the templates go
//!   in the first message and again every [`TEMPLATE_REFRESH`], as a
//!   collector that started later learns them only so.
//! - TCP: messages of at most [`TCP_MESSAGE_MAX`] bytes on one connection;
//!   the templates go once per connection, which is made again, templates
//!   and all, after a failure. The sequence number starts at 0 with each.
//!
//! A record the collector could not get (the connection failed under it)
//! is counted, not kept: flow records describe the past, and an agent
//! that queued them without bound would fail the dataplane for a slow
//! collector.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpStream, UdpSocket};

use crate::ipfix::Message;
use crate::protocol::{Exportable, Templates};
#[cfg(test)]
use crate::record::FlowRecord;

/// Messages over UDP fit this many bytes: under a 1,500-byte path MTU with
/// IPv6 and UDP headers, and no fragments.
pub const UDP_MESSAGE_MAX: usize = 1400;
/// Messages over TCP fit this many bytes.
pub const TCP_MESSAGE_MAX: usize = 16 << 10;
/// Over UDP, the templates are sent again this often.
pub const TEMPLATE_REFRESH: Duration = Duration::from_secs(30);
/// How long a TCP connection may take to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one message may take to be written over TCP.
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);

/// The transport to a collector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
}

/// A collector: where records go, and how.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Collector {
    pub addr: SocketAddr,
    pub transport: Transport,
}

impl std::str::FromStr for Collector {
    type Err = String;

    /// `udp://HOST:PORT` or `tcp://HOST:PORT` (an address, not a name).
    fn from_str(s: &str) -> Result<Collector, String> {
        let (transport, rest) = match s.split_once("://") {
            Some(("udp", r)) => (Transport::Udp, r),
            Some(("tcp", r)) => (Transport::Tcp, r),
            _ => return Err(format!("{s:?}: not udp://ADDRESS:PORT or tcp://ADDRESS:PORT")),
        };
        let addr = rest
            .parse()
            .map_err(|e| format!("{s:?}: {rest:?} is not an address and port ({e})"))?;
        Ok(Collector { addr, transport })
    }
}

/// What an exporter has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages: u64,
    pub records: u64,
    /// Records lost to a failed connection, or that could not be encoded.
    pub dropped: u64,
    pub connections: u64,
}

enum Conn {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// Why records did not all reach the collector.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("connecting to the collector at {addr}: {e}")]
    Connect { addr: SocketAddr, e: std::io::Error },
    #[error("sending to the collector at {addr}: {e} ({dropped} records dropped)")]
    Send {
        addr: SocketAddr,
        e: std::io::Error,
        dropped: u64,
    },
}

/// Sends records to one collector.
pub struct Exporter {
    collector: Collector,
    domain: u32,
    templates: Templates,
    conn: Option<Conn>,
    /// Data records sent in this session (the next message's sequence).
    sequence: u32,
    templates_sent: Option<Instant>,
    stats: Stats,
}

fn unix_seconds() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as u32)
        .unwrap_or(0)
}

impl Exporter {
    /// An exporter for `collector`, as observation domain `domain`, with
    /// the enterprise elements under `pen`. It connects on first use.
    pub fn new(collector: Collector, domain: u32, pen: u32) -> Exporter {
        Exporter {
            collector,
            domain,
            templates: Templates::new(pen),
            conn: None,
            sequence: 0,
            templates_sent: None,
            stats: Stats::default(),
        }
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }

    pub fn collector(&self) -> Collector {
        self.collector
    }

    async fn connect(&mut self) -> Result<(), ExportError> {
        let addr = self.collector.addr;
        let err = |e| ExportError::Connect { addr, e };
        let conn = match self.collector.transport {
            Transport::Udp => {
                let local: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse().expect("an address")
                } else {
                    "[::]:0".parse().expect("an address")
                };
                let s = UdpSocket::bind(local).await.map_err(err)?;
                s.connect(addr).await.map_err(err)?;
                Conn::Udp(s)
            }
            Transport::Tcp => {
                let s = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
                    .await
                    .map_err(|_| err(std::io::ErrorKind::TimedOut.into()))?
                    .map_err(err)?;
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }
        };
        self.conn = Some(conn);
        self.sequence = 0;
        self.templates_sent = None;
        self.stats.connections += 1;
        Ok(())
    }

    fn templates_due(&self) -> bool {
        match (self.collector.transport, self.templates_sent) {
            (_, None) => true,
            (Transport::Udp, Some(at)) => at.elapsed() >= TEMPLATE_REFRESH,
            (Transport::Tcp, Some(_)) => false,
        }
    }

    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self.conn.as_mut().expect("connected") {
            Conn::Udp(s) => s.send(bytes).await.map(|_| ()),
            Conn::Tcp(s) => tokio::time::timeout(WRITE_TIMEOUT, s.write_all(bytes))
                .await
                .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?,
        }
    }

    /// Sends `records` in as many messages as they take. A record that
    /// cannot be encoded is skipped, logged and counted; when the
    /// connection fails, what was not sent is counted and the error
    /// returned, and the next call connects again.
    pub async fn export<R: Exportable>(&mut self, records: &[R]) -> Result<(), ExportError> {
        if self.conn.is_none() {
            if let Err(e) = self.connect().await {
                self.stats.dropped += records.len() as u64;
                return Err(e);
            }
        }
        let max = match self.collector.transport {
            Transport::Udp => UDP_MESSAGE_MAX,
            Transport::Tcp => TCP_MESSAGE_MAX,
        };
        let mut next = 0;
        while next < records.len() || self.templates_due() {
            let mut m = Message::new(max);
            let with_templates = self.templates_due();
            if with_templates {
                m.add_templates(&self.templates.list());
            }
            while next < records.len() {
                match records[next].add(&mut m, &self.templates) {
                    Ok(true) => next += 1,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!(collector = %self.collector.addr, "a flow record left out: {e}");
                        self.stats.dropped += 1;
                        next += 1;
                    }
                }
            }
            if m.is_empty() {
                break;
            }
            let n = m.records();
            let bytes = m.finish(unix_seconds(), self.sequence, self.domain);
            if let Err(e) = self.send(&bytes).await {
                let dropped = (records.len() - next) as u64 + u64::from(n);
                self.stats.dropped += dropped;
                self.conn = None;
                return Err(ExportError::Send {
                    addr: self.collector.addr,
                    e,
                    dropped,
                });
            }
            if with_templates {
                self.templates_sent = Some(Instant::now());
            }
            self.sequence = self.sequence.wrapping_add(n);
            self.stats.messages += 1;
            self.stats.records += u64::from(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collectors_parse_or_say_why_not() {
        let c: Collector = "udp://127.0.0.1:4739".parse().unwrap();
        assert_eq!((c.transport, c.addr.port()), (Transport::Udp, 4739));
        let c: Collector = "tcp://[::1]:4739".parse().unwrap();
        assert_eq!(c.transport, Transport::Tcp);
        for bad in [
            "127.0.0.1:4739",
            "sctp://127.0.0.1:1",
            "udp://collector:4739",
            "udp://127.0.0.1",
        ] {
            let e = bad.parse::<Collector>().unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
    }

    /// Over UDP: templates first, then records in messages that fit, the
    /// sequence counting the records before each.
    #[tokio::test]
    async fn udp_messages_carry_templates_then_records_in_sequence() {
        let rx = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let c = Collector {
            addr: rx.local_addr().unwrap(),
            transport: Transport::Udp,
        };
        let mut e = Exporter::new(c, 7, crate::record::PEN_DEFAULT);
        let records: Vec<FlowRecord> = (0..40).map(|i| crate::record::tests::sample(i % 2 == 1)).collect();
        e.export(&records).await.unwrap();
        let mut buf = [0u8; 2000];
        let mut seqs = Vec::new();
        for i in 0..e.stats().messages {
            let n = rx.recv(&mut buf).await.unwrap();
            assert!(n <= UDP_MESSAGE_MAX);
            assert_eq!(&buf[0..2], &[0, 10]);
            assert_eq!(u16::from_be_bytes([buf[2], buf[3]]) as usize, n);
            assert_eq!(u32::from_be_bytes(buf[12..16].try_into().unwrap()), 7);
            seqs.push(u32::from_be_bytes(buf[8..12].try_into().unwrap()));
            if i == 0 {
                assert_eq!(&buf[16..18], &[0, 2], "templates first");
            } else {
                assert_ne!(&buf[16..18], &[0, 2], "templates once");
            }
        }
        assert_eq!(e.stats().records, 40);
        assert!(
            seqs.len() > 1 && seqs[0] == 0 && seqs.windows(2).all(|w| w[0] < w[1]),
            "{seqs:?}"
        );
    }

    /// Over TCP, a collector gone makes an error with the records counted,
    /// and the next export connects again.
    #[tokio::test]
    async fn tcp_reconnects_after_a_failure() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let c = Collector {
            addr: l.local_addr().unwrap(),
            transport: Transport::Tcp,
        };
        drop(l);
        let mut e = Exporter::new(c, 1, crate::record::PEN_DEFAULT);
        let r = [crate::record::tests::sample(false)];
        assert!(matches!(e.export(&r).await, Err(ExportError::Connect { .. })));
        assert_eq!(e.stats().dropped, 1);
        let l = tokio::net::TcpListener::bind(c.addr).await.unwrap();
        let accept = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut v = Vec::new();
            tokio::io::AsyncReadExt::read_to_end(&mut s, &mut v).await.unwrap();
            v
        });
        e.export(&r).await.unwrap();
        e.export(&r).await.unwrap();
        drop(e);
        let got = accept.await.unwrap();
        // Two messages: templates and a record, then a record alone.
        let first = u16::from_be_bytes([got[2], got[3]]) as usize;
        assert_eq!(&got[16..18], &[0, 2]);
        assert_eq!(
            &got[first + 16..first + 18],
            &[1, 0],
            "no templates again on the same connection"
        );
        assert_eq!(u32::from_be_bytes(got[first + 8..first + 12].try_into().unwrap()), 1);
    }
}
