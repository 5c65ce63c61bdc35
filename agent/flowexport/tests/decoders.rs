//! Flow records read back by decoders that are not ours: Wireshark's
//! (`tshark`, from a capture file of the messages), nfdump's collector
//! (`nfcapd`) and pmacct's (`nfacctd`, with the cloud's enterprise
//! elements mapped to named fields), the last two over real UDP and TCP
//! on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use sdn_flowexport::exporter::{Collector, Exporter, Transport};
use sdn_flowexport::ipfix::Message;
use sdn_flowexport::record::*;

fn sample(i: u16, v6: bool) -> FlowRecord {
    FlowRecord {
        src: if v6 {
            "fd10::5".parse().unwrap()
        } else {
            "10.1.0.5".parse().unwrap()
        },
        dst: if v6 {
            "fd30::10".parse().unwrap()
        } else {
            "10.30.0.10".parse().unwrap()
        },
        src_port: 40_000 + i,
        dst_port: 443,
        protocol: 6,
        octets: 123_456 + u64::from(i),
        packets: 321,
        start_ms: 1_764_979_200_000,
        end_ms: 1_764_979_260_500,
        end_reason: EndReason::EndOfFlow,
        firewall_event: FirewallEvent::Deleted,
        direction: Direction::Egress,
        vni: Some(4096),
        tenant: "dept-a".into(),
        vpc: "portal".into(),
        zone: "extranet".into(),
        rule: "exchange_path/portal-https-in".into(),
        verdict: Verdict::Allowed,
        port: "vm1".into(),
        lb: None,
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A capture file (raw IP link type) of one UDP datagram per message.
fn pcap(path: &Path, messages: &[Vec<u8>]) {
    let mut out = Vec::new();
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.extend_from_slice(&65_535u32.to_le_bytes());
    out.extend_from_slice(&101u32.to_le_bytes()); // LINKTYPE_RAW
    for (i, m) in messages.iter().enumerate() {
        let mut pkt = Vec::new();
        etherparse::PacketBuilder::ipv4([127, 0, 0, 1], [127, 0, 0, 1], 64)
            .udp(50_000, 4739)
            .write(&mut pkt, m)
            .unwrap();
        out.extend_from_slice(&(1_764_979_300u32 + i as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&(pkt.len() as u32).to_le_bytes());
        out.extend_from_slice(&pkt);
    }
    std::fs::write(path, out).unwrap();
}

/// Wireshark's dissector reads every field of both templates' records,
/// our enterprise elements as ours (PEN and id), and finds nothing
/// malformed.
#[test]
fn tshark_reads_every_field() {
    assert!(have("tshark"), "tshark is missing: scripts/setup.sh installs it");
    let dir = tempfile::tempdir().unwrap();
    let t = templates(PEN_DEFAULT);
    let mut first = Message::new(1400);
    assert!(first.add_templates(&t));
    assert!(sample(1, false).add_to(&mut first, &t).unwrap());
    let mut second = Message::new(1400);
    assert!(sample(2, true).add_to(&mut second, &t).unwrap());
    let file = dir.path().join("ipfix.pcap");
    pcap(
        &file,
        &[first.finish(1_764_979_300, 0, 9), second.finish(1_764_979_301, 1, 9)],
    );
    let fields = [
        "cflow.srcaddr",
        "cflow.dstaddr",
        "cflow.srcaddrv6",
        "cflow.dstaddrv6",
        "cflow.srcport",
        "cflow.dstport",
        "cflow.protocol",
        "cflow.octets",
        "cflow.packets",
        "cflow.flow_end_reason",
        "cflow.firewall_event",
        "cflow.layer2_segment_id",
        "cflow.direction",
        "cflow.sequence",
        "cflow.od_id",
        "cflow.template_ipfix_field_pen",
    ];
    let mut cmd = Command::new("tshark");
    cmd.args([
        "-r",
        file.to_str().unwrap(),
        "-T",
        "fields",
        "-E",
        "separator=|",
        "-E",
        "aggregator=,",
    ]);
    for f in fields {
        cmd.args(["-e", f]);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    let rows: Vec<Vec<&str>> = text.lines().map(|l| l.split('|').collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    let col = |row: usize, name: &str| rows[row][fields.iter().position(|f| *f == name).unwrap()];
    assert_eq!(col(0, "cflow.srcaddr"), "10.1.0.5");
    assert_eq!(col(0, "cflow.dstaddr"), "10.30.0.10");
    assert_eq!(col(0, "cflow.srcport"), "40001");
    assert_eq!(col(0, "cflow.dstport"), "443");
    assert_eq!(col(0, "cflow.protocol"), "6");
    assert_eq!(col(0, "cflow.octets"), "123457");
    assert_eq!(col(0, "cflow.packets"), "321");
    assert_eq!(col(0, "cflow.flow_end_reason"), "3");
    assert_eq!(col(0, "cflow.firewall_event"), "2");
    assert_eq!(col(0, "cflow.direction"), "1");
    assert_eq!(col(0, "cflow.od_id"), "9");
    assert!(col(0, "cflow.template_ipfix_field_pen").contains("32473"), "{text}");
    assert_eq!(col(1, "cflow.srcaddrv6"), "fd10::5");
    assert_eq!(col(1, "cflow.dstaddrv6"), "fd30::10");
    assert_eq!(col(1, "cflow.sequence"), "1");
    // The layer-2 segment: VXLAN (type 1), VNI 4096.
    let seg = col(0, "cflow.layer2_segment_id");
    assert!(seg == "72057594037932032" || seg.contains("1000"), "{seg}");
    // Nothing malformed, in the full dissection.
    let full = Command::new("tshark")
        .args(["-r", file.to_str().unwrap(), "-V"])
        .output()
        .unwrap();
    let full = String::from_utf8_lossy(&full.stdout);
    assert!(
        !full.contains("Malformed") && !full.contains("Expert Info (Error"),
        "{full}"
    );
    assert!(
        full.contains("dept-a") || full.contains("64 65 70 74 2d 61") || full.contains("646570742d61"),
        "{full}"
    );
}

/// The protocol records' templates too: tshark reads a DNS answer's and a
/// TCP connection's addresses, ports and times, our elements under our
/// PEN, and finds nothing malformed.
#[test]
fn tshark_reads_protocol_records() {
    use sdn_flowexport::protocol::{DnsAnswerRecord, Exportable, Record, TcpConnectionRecord, Templates};
    assert!(have("tshark"), "tshark is missing: scripts/setup.sh installs it");
    let dir = tempfile::tempdir().unwrap();
    let t = Templates::new(PEN_DEFAULT);
    let dns = Record::Dns(DnsAnswerRecord {
        client: "10.48.0.11".parse().unwrap(),
        client_port: 40_001,
        server: "10.48.0.12".parse().unwrap(),
        server_port: 53,
        time_ms: 1_764_979_200_000,
        node: "h1".into(),
        tenant: "dept-a".into(),
        vpc: "portal".into(),
        port: "vm1".into(),
        query: "portal.gov.test.".into(),
        query_type: 1,
        rcode: 0,
        answer_count: 1,
        answers: "A 123 10.48.0.80".into(),
        min_ttl: 123,
    });
    let tcp = Record::Tcp(TcpConnectionRecord {
        client: "fd48::11".parse().unwrap(),
        client_port: 40_002,
        server: "fd48::13".parse().unwrap(),
        server_port: 443,
        first_ms: 1_764_979_200_000,
        last_ms: 1_764_979_201_500,
        packets: 10,
        octets: 1234,
        state: 1,
        connections: 2,
        node: "h1".into(),
        tenant: "dept-a".into(),
        vpc: "portal".into(),
        port: "vm1".into(),
    });
    let mut m = Message::new(1400);
    assert!(m.add_templates(&t.list()));
    assert!(dns.add(&mut m, &t).unwrap());
    assert!(tcp.add(&mut m, &t).unwrap());
    let file = dir.path().join("protocol.pcap");
    pcap(&file, &[m.finish(1_764_979_300, 0, 9)]);
    let out = Command::new("tshark")
        .args([
            "-r",
            file.to_str().unwrap(),
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-E",
            "aggregator=,",
        ])
        .args([
            "-e",
            "cflow.srcaddr",
            "-e",
            "cflow.srcaddrv6",
            "-e",
            "cflow.dstport",
            "-e",
            "cflow.template_id",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(text.contains("10.48.0.12"), "{text}");
    assert!(text.contains("fd48::11"), "{text}");
    assert!(text.contains("40001") && text.contains("443"), "{text}");
    for id in ["258", "259", "260", "261"] {
        assert!(text.contains(id), "template {id}: {text}");
    }
    let full = Command::new("tshark")
        .args(["-r", file.to_str().unwrap(), "-V"])
        .output()
        .unwrap();
    let full = String::from_utf8_lossy(&full.stdout);
    assert!(
        !full.contains("Malformed") && !full.contains("Expert Info (Error"),
        "{full}"
    );
    assert!(full.contains("32473"), "{full}");
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// nfdump's collector stores what our exporter sends over UDP, and nfdump
/// prints it back: addresses, ports, protocol, counters, times.
#[tokio::test]
async fn nfcapd_stores_and_nfdump_prints_our_records() {
    assert!(
        have("nfcapd") && have("nfdump"),
        "nfdump is missing: scripts/setup.sh installs it"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_udp_port();
    let daemon = Daemon(
        Command::new("nfcapd")
            .args([
                "-b",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-w",
                dir.path().to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    let c = Collector {
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        transport: Transport::Udp,
    };
    let mut e = Exporter::new(c, 5, PEN_DEFAULT);
    let records: Vec<FlowRecord> = (0..30).map(|i| sample(i, i % 3 == 0)).collect();
    e.export(&records).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // SIGTERM: nfcapd closes its file.
    // SAFETY: signalling our own child by pid.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let mut d = daemon;
    let _ = d.0.wait();
    let out = Command::new("nfdump")
        .args([
            "-R",
            dir.path().to_str().unwrap(),
            "-q",
            "-o",
            "fmt:%sa|%da|%sp|%dp|%pr|%byt|%pkt|%ts",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{text}");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains('|')).collect();
    assert_eq!(lines.len(), 30, "{text}");
    let v4 = lines.iter().find(|l| l.contains("10.1.0.5")).expect("an IPv4 record");
    let f: Vec<&str> = v4.split('|').map(str::trim).collect();
    assert_eq!(f[1], "10.30.0.10");
    assert_eq!(f[3], "443");
    assert_eq!(f[4], "TCP");
    assert!(f[6] == "321", "{v4}");
    assert!(f[7].starts_with("2025-12-06"), "{v4}");
    assert!(
        lines.iter().any(|l| l.contains("fd10::5") && l.contains("fd30::10")),
        "{text}"
    );
}

/// pmacct's collector, told the cloud's enterprise elements by PEN and
/// id, prints the tenant, the rule and the verdict of our records (over
/// UDP: this nfacctd, 1.7.7, takes IPFIX over nothing else).
#[tokio::test]
async fn nfacctd_maps_the_enterprise_elements() {
    assert!(have("nfacctd"), "pmacct is missing: scripts/setup.sh installs it");
    for transport in [Transport::Udp] {
        let dir = tempfile::tempdir().unwrap();
        let port = if transport == Transport::Udp {
            free_udp_port()
        } else {
            free_tcp_port()
        };
        let primitives = dir.path().join("primitives.lst");
        std::fs::write(
            &primitives,
            format!(
                "name=tenant\tfield_type={pen}:1\tlen=vlen\tsemantics=str\n\
                 name=rule\tfield_type={pen}:4\tlen=vlen\tsemantics=str\n\
                 name=verdict\tfield_type={pen}:5\tlen=1\tsemantics=u_int\n\
                 name=end_reason\tfield_type=136\tlen=1\tsemantics=u_int\n\
                 name=lb_service\tfield_type={pen}:40\tlen=vlen\tsemantics=str\n\
                 name=lb_vip\tfield_type={pen}:41\tlen=vlen\tsemantics=str\n\
                 name=lb_member\tfield_type={pen}:42\tlen=vlen\tsemantics=str\n",
                pen = PEN_DEFAULT
            ),
        )
        .unwrap();
        let output = dir.path().join("out.json");
        let config = dir.path().join("nfacctd.conf");
        let tcp = "";
        std::fs::write(
            &config,
            format!(
                "daemonize: false\nnfacctd_ip: 127.0.0.1\nnfacctd_port: {port}\n{tcp}\
                 aggregate_primitives: {}\nplugins: print[p]\n\
                 aggregate[p]: src_host,dst_host,src_port,dst_port,proto,tenant,rule,verdict,end_reason,lb_service,lb_vip,lb_member\n\
                 print_output[p]: json\nprint_refresh_time[p]: 1\nprint_output_file[p]: {}\n",
                primitives.display(),
                output.display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("nfacctd.log")).unwrap();
        let _daemon = Daemon(
            Command::new("nfacctd")
                .args(["-f", config.to_str().unwrap()])
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let c = Collector {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            transport,
        };
        let mut e = Exporter::new(c, 6, PEN_DEFAULT);
        let mut records: Vec<FlowRecord> = (0..5).map(|i| sample(i, false)).collect();
        // A load-balanced flow: its own template, the service's elements
        // after the flow's.
        let mut lb = sample(5, false);
        lb.lb = Some(LbRecord {
            service: "portal-lb/https".into(),
            vip: "10.30.0.100:443".into(),
            member: "web-1".into(),
        });
        records.push(lb);
        let mut sent = false;
        for _ in 0..20 {
            if e.export(&records).await.is_ok() {
                sent = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        let log_text = || std::fs::read_to_string(dir.path().join("nfacctd.log")).unwrap_or_default();
        assert!(sent, "{transport:?}: nothing could be sent: {}", log_text());
        wait_until(
            &format!("nfacctd's output over {transport:?}"),
            Duration::from_secs(15),
            || {
                std::fs::read_to_string(&output)
                    .map(|t| t.contains("dept-a"))
                    .unwrap_or(false)
            },
        );
        drop(e);
        let text = std::fs::read_to_string(&output).unwrap();
        eprintln!("{transport:?}: {text}");
        let row: serde_json::Value = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["tenant"] == "dept-a")
            .expect("a row with the tenant");
        assert_eq!(row["rule"], "exchange_path/portal-https-in", "{row}");
        assert_eq!(row["verdict"], "1", "{row}");
        assert_eq!(row["end_reason"], "3", "{row}");
        assert_eq!(row["ip_src"], "10.1.0.5", "{row}");
        assert_eq!(row["port_dst"], 443, "{row}");
        let lb = text
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["lb_member"] == "web-1")
            .expect("the load-balanced flow's row");
        assert_eq!(lb["lb_service"], "portal-lb/https", "{lb}");
        assert_eq!(lb["lb_vip"], "10.30.0.100:443", "{lb}");
        assert_eq!(lb["port_src"], 40_005, "{lb}");
        assert_eq!(lb["tenant"], "dept-a", "{lb}");
    }
}

/// Over TCP, captured on loopback as it goes: Wireshark reads the records
/// out of the stream, templates once, the sequence counting records.
#[tokio::test]
async fn tshark_reads_records_out_of_a_tcp_stream() {
    assert!(have("tshark"), "tshark is missing: scripts/setup.sh installs it");
    let dir = tempfile::tempdir().unwrap();
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let reader = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut v = Vec::new();
        tokio::io::AsyncReadExt::read_to_end(&mut s, &mut v).await.unwrap();
        v.len()
    });
    let file = dir.path().join("tcp.pcapng");
    let mut capture = Daemon(
        Command::new("tshark")
            .args([
                "-i",
                "lo",
                "-f",
                &format!("tcp port {}", addr.port()),
                "-w",
                file.to_str().unwrap(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // It says so on standard error once it captures; what it says after
    // is read too (a closed pipe would end it).
    let mut err = capture.0.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        let mut told = false;
        while let Ok(n) = std::io::Read::read(&mut err, &mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if !told && String::from_utf8_lossy(&seen).contains("Capturing on") {
                told = true;
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(20))
        .expect("tshark did not start capturing");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let c = Collector {
        addr,
        transport: Transport::Tcp,
    };
    let mut e = Exporter::new(c, 3, PEN_DEFAULT);
    e.export(&[sample(1, false)]).await.unwrap();
    e.export(&[sample(2, false), sample(3, true)]).await.unwrap();
    drop(e);
    assert!(reader.await.unwrap() > 0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // SAFETY: signalling our own child by pid; SIGINT makes tshark close
    // its file.
    unsafe { libc::kill(capture.0.id() as i32, libc::SIGINT) };
    let _ = capture.0.wait();
    let out = Command::new("tshark")
        .args([
            "-r",
            file.to_str().unwrap(),
            "-d",
            &format!("tcp.port=={},cflow", addr.port()),
            "-T",
            "fields",
            "-E",
            "separator=|",
            "-e",
            "cflow.sequence",
            "-e",
            "cflow.srcaddr",
            "-e",
            "cflow.srcaddrv6",
            "-e",
            "cflow.srcport",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    eprintln!("{text}");
    let rows: Vec<&str> = text.lines().filter(|l| l.contains("40")).collect();
    let summary = Command::new("tshark")
        .args([
            "-r",
            file.to_str().unwrap(),
            "-d",
            &format!("tcp.port=={},cflow", addr.port()),
        ])
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&summary.stdout).to_string() + &String::from_utf8_lossy(&summary.stderr);
    assert_eq!(rows.len(), 2, "two messages with records: {text}\n{summary}");
    assert!(rows[0].starts_with("0|10.1.0.5||40001"), "{text}");
    assert!(
        rows[1].starts_with("1|10.1.0.5,") || rows[1].starts_with("1|10.1.0.5|"),
        "{text}"
    );
    assert!(rows[1].contains("fd10::5"), "{text}");
}
