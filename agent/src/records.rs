//! Protocol records for supervisors (`run --records-file`): one JSON object
//! per line.
//!
//! - `"record":"dns"`: each DNS answer a port of this host receives (or a
//!   VM that serves DNS sends): the query's name and type, the response
//!   code, the answers with their TTLs and data. The programs copy the
//!   answer's packet up (a perf ring, within a per-CPU rate); it is parsed
//!   here, never in the kernel.
//! - `"record":"tcp"`: each TCP connection of a port when it ends (FIN or
//!   RST seen, or its entry timed out): when its first packet passed, the
//!   collecting node, who opened it to whom, how it ended, how long it
//!   lasted, and how many connections the same client opened to the same
//!   service that ended in the same pass.
//!
//! Lines wait in a bounded queue for the writer; a full queue drops them
//! (counted). The file is opened for appending, so a rotation that moves
//! it and signals nothing loses nothing but the lines written in between.

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use dataplane_common::maps::DnsCopy;
use serde::Serialize;
use tokio::io::AsyncWriteExt;

use crate::flows::{Clock, Context, Outputs};
use sdn_flowexport::protocol::{DnsAnswerRecord, Record, TcpConnectionRecord};

/// Lines the writer's queue holds.
const QUEUE: usize = 4096;
/// Answers a DNS record lists at most (it counts them all).
const ANSWERS_LISTED: usize = 16;
/// Characters of a name or an answer's data kept at most.
const TEXT_MAX: usize = 256;

/// `s` cut to [`TEXT_MAX`] characters (marked when cut).
fn clip(s: String) -> String {
    if s.chars().count() <= TEXT_MAX {
        return s;
    }
    let mut c: String = s.chars().take(TEXT_MAX).collect();
    c.push_str("...");
    c
}

/// What the records have done.
#[derive(Debug, Default)]
pub struct Stats {
    pub written: AtomicU64,
    /// Lost to a full queue or a failed write.
    pub dropped: AtomicU64,
    /// DNS copies that did not parse.
    pub unparsed: AtomicU64,
}

/// Appends lines to a file.
#[derive(Clone)]
pub struct JsonLines {
    tx: tokio::sync::mpsc::Sender<String>,
    pub stats: Arc<Stats>,
}

impl JsonLines {
    /// Opens `path` for appending (created if missing) and starts the writer.
    pub async fn open(path: PathBuf) -> anyhow::Result<JsonLines> {
        use anyhow::Context as _;
        let mut f = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .await
            .with_context(|| format!("opening the records file {}", path.display()))?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(QUEUE);
        let stats = Arc::new(Stats::default());
        let st = stats.clone();
        tokio::spawn(async move {
            let mut failing = false;
            while let Some(line) = rx.recv().await {
                match f.write_all(line.as_bytes()).await {
                    Ok(()) => {
                        st.written.fetch_add(1, Ordering::Relaxed);
                        failing = false;
                    }
                    Err(e) => {
                        if !failing {
                            tracing::warn!(file = %path.display(), error = %e, "writing records failed; lines are dropped and counted");
                        }
                        failing = true;
                        st.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        });
        Ok(JsonLines { tx, stats })
    }

    /// Queues one record as a line.
    pub fn put<T: Serialize>(&self, record: &T) {
        let mut line = match serde_json::to_string(record) {
            Ok(l) => l,
            Err(_) => return,
        };
        line.push('\n');
        if self.tx.try_send(line).is_err() {
            self.stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// One answer of a DNS response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Answer {
    /// Its owner name.
    pub name: String,
    #[serde(rename = "type")]
    pub rtype: String,
    pub ttl: u32,
    pub data: String,
}

/// A DNS answer, as a supervisor reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DnsRecord {
    pub record: &'static str,
    /// RFC 3339, when the answer passed.
    pub time: String,
    /// The collecting node: this host, an agent.
    pub node: String,
    pub node_type: &'static str,
    pub port: String,
    pub tenant: String,
    pub vpc: String,
    /// The port's part: `asked` (the answer came to it) or `answered` (a
    /// VM serving DNS sent it).
    pub role: &'static str,
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    pub id: u16,
    pub query: String,
    pub query_type: String,
    pub rcode: String,
    /// Answers in the response (at most 16 are listed).
    pub answer_count: usize,
    pub answers: Vec<Answer>,
    /// The smallest TTL of the answers (what a cache keeps them for).
    pub min_ttl: Option<u32>,
    /// The query type and response code as DNS numbers them (IPFIX).
    #[serde(skip)]
    pub query_type_number: u16,
    #[serde(skip)]
    pub rcode_number: u8,
    #[serde(skip)]
    pub time_ms: u64,
}

impl DnsRecord {
    /// The record over IPFIX.
    pub fn ipfix(&self) -> Record {
        Record::Dns(DnsAnswerRecord {
            client: self.client,
            client_port: self.client_port,
            server: self.server,
            server_port: self.server_port,
            time_ms: self.time_ms,
            node: self.node.clone(),
            tenant: self.tenant.clone(),
            vpc: self.vpc.clone(),
            port: self.port.clone(),
            query: self.query.clone(),
            query_type: self.query_type_number,
            rcode: self.rcode_number,
            answer_count: self.answer_count.min(usize::from(u16::MAX)) as u16,
            answers: self
                .answers
                .iter()
                .map(|a| format!("{} {} {}", a.rtype, a.ttl, escape_answer(&a.data)))
                .collect::<Vec<_>>()
                .join("; "),
            min_ttl: self.min_ttl.unwrap_or(0),
        })
    }
}

/// Parses one copy (a [`DnsCopy`], then the packet) into a record.
pub fn parse_dns(bytes: &[u8], clock: Clock, ctx: &Context, node: &str) -> Result<DnsRecord, String> {
    use hickory_proto::op::Message;
    use hickory_proto::serialize::binary::BinDecodable;
    let hl = std::mem::size_of::<DnsCopy>();
    if bytes.len() < hl {
        return Err(format!("{} bytes: shorter than the copy's header", bytes.len()));
    }
    // SAFETY: DnsCopy is plain data and the slice holds one; unaligned read.
    let h: DnsCopy = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DnsCopy) };
    let pkt = &bytes[hl..];
    let pkt = &pkt[..pkt.len().min(h.len as usize)];
    let p = etherparse::LaxSlicedPacket::from_ethernet(pkt).map_err(|e| format!("the packet: {e}"))?;
    let (src, dst) = match &p.net {
        Some(etherparse::LaxNetSlice::Ipv4(ip)) => (
            IpAddr::V4(ip.header().source_addr()),
            IpAddr::V4(ip.header().destination_addr()),
        ),
        Some(etherparse::LaxNetSlice::Ipv6(ip)) => (
            IpAddr::V6(ip.header().source_addr()),
            IpAddr::V6(ip.header().destination_addr()),
        ),
        _ => return Err("not an IP packet".into()),
    };
    // The UDP header where the programs found it (they follow extension
    // headers this parser may not).
    let l4 = usize::from(h.l4_off);
    let Some(udp) = pkt.get(l4..l4 + 8) else {
        return Err(format!("the copy ends before its UDP header ({} bytes)", pkt.len()));
    };
    let (sport, dport) = (
        u16::from_be_bytes([udp[0], udp[1]]),
        u16::from_be_bytes([udp[2], udp[3]]),
    );
    let payload = &pkt[l4 + 8..];
    let msg = Message::from_bytes(payload).map_err(|e| format!("the DNS message: {e}"))?;
    // An answer to one question, or nothing: a query sent from port 53, or
    // another protocol on it, is no answer.
    if msg.message_type() != hickory_proto::op::MessageType::Response {
        return Err("not a response (QR is 0)".into());
    }
    if msg.queries().len() != 1 {
        return Err(format!("{} questions, not one", msg.queries().len()));
    }
    let q = msg.queries().first();
    let answers: Vec<Answer> = msg
        .answers()
        .iter()
        .take(ANSWERS_LISTED)
        .map(|r| Answer {
            name: clip(r.name().to_string()),
            rtype: r.record_type().to_string(),
            ttl: r.ttl(),
            data: clip(r.data().to_string()),
        })
        .collect();
    let pc = ctx.port(h.ifindex);
    let time_ms = clock.unix_ms(h.now_ns);
    Ok(DnsRecord {
        query_type_number: q.map(|q| u16::from(q.query_type())).unwrap_or(0),
        rcode_number: msg.response_code().low(),
        time_ms,
        record: "dns",
        time: sdn_proto::audit::rfc3339(time_ms),
        node: node.to_string(),
        node_type: "agent",
        port: pc.port.clone(),
        tenant: pc.tenant.clone(),
        vpc: pc.vpc.clone(),
        role: if h.role == dataplane_common::maps::DNS_ROLE_ANSWERED {
            "answered"
        } else {
            "asked"
        },
        client: dst,
        client_port: dport,
        server: src,
        server_port: sport,
        id: msg.id(),
        query: clip(q.map(|q| q.name().to_string()).unwrap_or_default()),
        query_type: q.map(|q| q.query_type().to_string()).unwrap_or_default(),
        rcode: msg.response_code().to_string(),
        answer_count: msg.answers().len(),
        min_ttl: msg.answers().iter().map(|a| a.ttl()).min(),
        answers,
    })
}

/// An answer's data in the IPFIX list: `;` and `\\` escaped, control
/// characters as `\\u{..}`, so no data can pass for another answer.
fn escape_answer(d: &str) -> String {
    let mut out = String::with_capacity(d.len());
    for c in d.chars() {
        match c {
            ';' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
    out
}

/// Reads the DNS answers the programs copy, on every CPU, until the agent
/// stops, and writes their records (and sends them over IPFIX, `ipfix`).
pub fn read_dns(
    mut perf: aya::maps::perf::AsyncPerfEventArray<aya::maps::MapData>,
    ctx: crate::flows::SharedContext,
    node: String,
    out: JsonLines,
    ipfix: Option<Outputs>,
) -> anyhow::Result<()> {
    let cpus = aya::util::online_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
    for cpu in cpus {
        let mut buf = perf.open(cpu, Some(64))?;
        let (ctx, node, out, ipfix) = (ctx.clone(), node.clone(), out.clone(), ipfix.clone());
        tokio::spawn(async move {
            let mut bufs: Vec<bytes::BytesMut> = (0..16)
                .map(|_| bytes::BytesMut::with_capacity(dataplane_common::maps::DNS_COPY_MAX as usize + 64))
                .collect();
            loop {
                let events = match buf.read_events(&mut bufs).await {
                    Ok(e) => e,
                    Err(e) => {
                        tracing::error!(cpu, error = %e, "reading DNS copies stopped on this CPU");
                        return;
                    }
                };
                if events.lost > 0 {
                    out.stats.dropped.fetch_add(events.lost as u64, Ordering::Relaxed);
                }
                let c = ctx.read().unwrap_or_else(|p| p.into_inner()).clone();
                let clock = Clock::now();
                let mut sent = Vec::new();
                for b in bufs.iter().take(events.read) {
                    match parse_dns(b, clock, &c, &node) {
                        Ok(r) => {
                            out.put(&r);
                            if ipfix.is_some() {
                                sent.push(r.ipfix());
                            }
                        }
                        Err(e) => {
                            out.stats.unparsed.fetch_add(1, Ordering::Relaxed);
                            tracing::debug!(error = %e, "a DNS copy did not parse");
                        }
                    }
                }
                if let Some(o) = &ipfix {
                    o.send_records(sent);
                }
            }
        });
    }
    Ok(())
}

/// A TCP connection that ended, as a supervisor reads it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TcpRecord {
    pub record: &'static str,
    /// RFC 3339: when its first packet passed.
    pub first_packet: String,
    pub node: String,
    pub node_type: &'static str,
    pub port: String,
    pub tenant: String,
    pub vpc: String,
    /// Who opened it, to whom.
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    /// `closed` (FIN or RST seen) or `timed_out`.
    pub state: &'static str,
    /// Connections from the same client to the same service that ended in
    /// the same pass, this one included.
    pub connections: usize,
    /// Milliseconds from its first packet to its last.
    pub session_ms: u64,
    pub packets: u64,
    pub octets: u64,
    /// Unix milliseconds of the first and last packet (IPFIX).
    #[serde(skip)]
    pub first_ms: u64,
    #[serde(skip)]
    pub last_ms: u64,
}

impl TcpRecord {
    /// The record over IPFIX.
    pub fn ipfix(&self) -> Record {
        Record::Tcp(TcpConnectionRecord {
            client: self.client,
            client_port: self.client_port,
            server: self.server,
            server_port: self.server_port,
            first_ms: self.first_ms,
            last_ms: self.last_ms,
            packets: self.packets,
            octets: self.octets,
            state: if self.state == "closed" { 1 } else { 2 },
            connections: self.connections.min(u32::MAX as usize) as u32,
            node: self.node.clone(),
            tenant: self.tenant.clone(),
            vpc: self.vpc.clone(),
            port: self.port.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{Message, MessageType, Query};
    use hickory_proto::rr::{rdata, Name, RData, Record as Rr, RecordType};
    use hickory_proto::serialize::binary::BinEncodable;

    /// A copy as the programs make it: the header, then an Ethernet frame
    /// with IPv4 and UDP from port 53.
    fn copy(msg: &Message) -> Vec<u8> {
        let payload = msg.to_bytes().unwrap();
        let mut frame = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 2], [2, 0, 0, 0, 0, 1])
            .ipv4([10, 0, 0, 12], [10, 0, 0, 11], 64)
            .udp(53, 40_000)
            .write(&mut frame, &payload)
            .unwrap();
        let h = DnsCopy {
            now_ns: 5_000_000_000,
            ifindex: 7,
            len: frame.len() as u32,
            l4_off: 14 + 20,
            family: dataplane_common::FAMILY_V4,
            entry: 4,
            role: dataplane_common::maps::DNS_ROLE_ASKED,
            _pad: [0; 3],
        };
        // SAFETY: DnsCopy is plain data.
        let mut out =
            unsafe { std::slice::from_raw_parts(&h as *const DnsCopy as *const u8, std::mem::size_of::<DnsCopy>()) }
                .to_vec();
        out.extend_from_slice(&frame);
        out
    }

    fn message(kind: MessageType, answers: usize, txt: &str) -> Message {
        let name = Name::from_ascii("portal.gov.test.").unwrap();
        let mut m = Message::new();
        m.set_id(77).set_message_type(kind);
        m.add_query(Query::query(name.clone(), RecordType::A));
        for i in 0..answers {
            m.add_answer(Rr::from_rdata(
                name.clone(),
                60 + i as u32,
                RData::A(rdata::A::new(10, 0, 0, i as u8)),
            ));
        }
        if !txt.is_empty() {
            // Character strings of at most 255 bytes each.
            let chunks: Vec<String> = txt
                .as_bytes()
                .chunks(200)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect();
            m.add_answer(Rr::from_rdata(name, 30, RData::TXT(rdata::TXT::new(chunks))));
        }
        m
    }

    fn clock() -> Clock {
        Clock {
            unix_ms: 1_000_000,
            mono_ns: 6_000_000_000,
        }
    }

    #[test]
    fn answers_are_read_and_bounded() {
        let r = parse_dns(
            &copy(&message(MessageType::Response, 40, "")),
            clock(),
            &Context::default(),
            "h1",
        )
        .unwrap();
        assert_eq!(
            (r.query.as_str(), r.query_type.as_str(), r.id),
            ("portal.gov.test.", "A", 77)
        );
        assert_eq!(
            (r.answer_count, r.answers.len(), r.min_ttl),
            (40, ANSWERS_LISTED, Some(60))
        );
        assert_eq!((r.server_port, r.client_port, r.role), (53, 40_000, "asked"));
        assert_eq!(r.time, sdn_proto::audit::rfc3339(999_000));
        assert_eq!(r.answers[3].data, "10.0.0.3");
        // Data that would pass for another answer in the IPFIX list, and
        // data too long, are escaped and cut.
        let hostile = format!("x; A 300 10.9.9.9\n{}", "y".repeat(1000));
        let r = parse_dns(
            &copy(&message(MessageType::Response, 0, &hostile)),
            clock(),
            &Context::default(),
            "h1",
        )
        .unwrap();
        assert!(r.answers[0].data.len() <= TEXT_MAX + 8, "{}", r.answers[0].data.len());
        let Record::Dns(d) = r.ipfix() else { panic!() };
        // One answer: its `;` escaped, so the list splits into one item.
        assert!(!d.answers.replace("\\;", "").contains(';'), "{}", d.answers);
        assert!(!d.answers.contains('\n'), "{}", d.answers);
    }

    #[test]
    fn what_is_no_answer_is_refused() {
        let e = parse_dns(
            &copy(&message(MessageType::Query, 0, "")),
            clock(),
            &Context::default(),
            "h1",
        )
        .unwrap_err();
        assert!(e.contains("not a response"), "{e}");
        let mut two = message(MessageType::Response, 1, "");
        two.add_query(Query::query(Name::from_ascii("mail.gov.test.").unwrap(), RecordType::A));
        assert!(parse_dns(&copy(&two), clock(), &Context::default(), "h1")
            .unwrap_err()
            .contains("2 questions"));
        let c = copy(&message(MessageType::Response, 1, ""));
        for cut in [0, 10, 30, 60, c.len() - 5] {
            assert!(
                parse_dns(&c[..cut], clock(), &Context::default(), "h1").is_err(),
                "cut at {cut}"
            );
        }
    }
}
