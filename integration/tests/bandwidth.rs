//! Bandwidth peaks per information system, end to end: a system of one
//! VPC with VMs on two hosts sends to and receives from the internet zone
//! with iperf3 at known rates, while a VM of another VPC on the same
//! uplink sends too. The controller adds up both hosts' second-by-second
//! counts: its interval peaks match the rates iperf3 sent at, its counts
//! match the bytes iperf3 says it sent, the other VPC's traffic is in
//! none of it, and a real `rsyslogd` receives the peaks and, once the
//! rate crosses 80% of the system's bandwidth, the alert and its end.
//! A forged usage report (a host speaking for another host, or for a
//! system with no port on it) is refused.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::scrape::{curl, sample};
use sdn_integration::supervisor::{have, Rsyslogd};
use sdn_integration::{free_port, privileged, Proc};
use sdn_proto::v1 as pb;

const NET_HOST: &str = "203.0.113.10";
/// Bytes an iperf3 UDP datagram of payload `-l` takes as a frame beyond
/// the payload: UDP, IPv4 and Ethernet headers.
const FRAME_OVERHEAD: u64 = 8 + 20 + 14;
const PAYLOAD: u64 = 1400;

const SYSTEM: &str = "\
apiVersion: sdn/v1
kind: InformationSystem
metadata:
  name: portal
spec:
  displayName: Public portal
  vpcs: [va]
  bandwidth:
    - zone: net
      up: 100M
      down: 100M
  alertPercent: 80
  intervalSeconds: 5
";

/// An iperf3 UDP client in `netns` to the zone's server on `port` at
/// `mbit` for `secs` (`reverse`: the server sends). Its JSON report.
fn iperf(netns: &str, port: u16, mbit: u32, secs: u32, reverse: bool) -> std::thread::JoinHandle<serde_json::Value> {
    let mut args: Vec<String> = ["netns", "exec", netns, "iperf3", "-c", NET_HOST, "-u", "-J"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    args.extend([
        "-p".into(),
        port.to_string(),
        "-b".into(),
        format!("{mbit}M"),
        "-t".into(),
        secs.to_string(),
        "-l".into(),
        PAYLOAD.to_string(),
    ]);
    if reverse {
        args.push("-R".into());
    }
    std::thread::spawn(move || {
        let out = Command::new("ip").args(&args).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "iperf3 {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("iperf3's report: {e}: {text}"))
    })
}

/// Frame bytes an iperf3 UDP client sent, from its own report.
fn frames_sent(report: &serde_json::Value) -> u64 {
    let sum = &report["end"]["sum_sent"];
    let bytes = sum["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("no end.sum_sent.bytes in {report}"));
    let packets = sum["packets"]
        .as_u64()
        .unwrap_or_else(|| panic!("no end.sum_sent.packets in {report}"));
    bytes + packets * FRAME_OVERHEAD
}

/// A field of an event line's structured data.
fn field(line: &str, name: &str) -> Option<u64> {
    let at = line.find(&format!("{name}=\""))? + name.len() + 2;
    line[at..].split('"').next()?.parse().ok()
}

fn system_bytes(lab: &Lab, host: &str) -> f64 {
    let ns = lab.topo.host_ns(host).name.clone();
    let text = curl("http://127.0.0.1:9465/metrics", Some(&ns));
    sample(
        &text,
        "sdn_agent_system_bytes_total{system=\"portal\",zone=\"net\",direction=\"up\"}",
    )
    .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread")]
async fn peaks_add_up_over_hosts_and_alerts_reach_rsyslog() {
    if !privileged() {
        return;
    }
    assert!(
        have("/usr/sbin/rsyslogd"),
        "rsyslog is missing: scripts/setup.sh installs it"
    );
    assert!(
        have("/usr/bin/iperf3"),
        "iperf3 is missing: scripts/setup.sh installs it"
    );
    let logs = tempfile::tempdir().unwrap();
    let udp = free_port();
    let rsyslog = Rsyslogd::start(
        logs.path(),
        None,
        "module(load=\"imudp\")",
        &format!("input(type=\"imudp\" address=\"127.0.0.1\" port=\"{udp}\" ruleset=\"out\")"),
    )
    .unwrap();
    let metrics = format!("127.0.0.1:{}", free_port());
    let lab = Lab::new("bwp", &["h1", "h2"])
        .zone(
            "net",
            "up-net",
            "172.17.0",
            "fdf0:0:0:2",
            &["0.0.0.0/0", "::/0"],
            &[NET_HOST],
        )
        .vpc("va", Some("net"))
        .subnet("sa", "va", "198.51.100.0/24", "")
        .vpc("vb", Some("net"))
        .subnet("sb", "vb", "192.0.2.0/24", "")
        .group("open", open_rules())
        .vm("a1", "h1", "sa", &["open"])
        .vm("a2", "h2", "sa", &["open"])
        .vm("b1", "h1", "sb", &["open"])
        .controller_args(&[
            "--syslog",
            &format!("udp://127.0.0.1:{udp}"),
            "--metrics-listen",
            &metrics,
        ])
        .agent_args(&["--metrics-listen", "127.0.0.1:9465"])
        .start()
        .await
        .unwrap();
    let file = logs.path().join("system.yaml");
    std::fs::write(&file, SYSTEM).unwrap();
    let applied = lab
        .cluster
        .sdnctl(PLATFORM, &["apply", "-f", file.to_str().unwrap(), "--wait"]);
    assert!(applied.is_ok(), "{applied:?}");
    let got = lab.cluster.sdnctl(PLATFORM, &["get", "information_system"]).unwrap();
    assert!(got.contains("portal") && got.contains("net up=100000000"), "{got}");

    let zone = lab.topo.zone_ns("net").name.clone();
    let iperf_bin = Path::new("/usr/bin/iperf3");
    let servers: Vec<Proc> = (5201..=5206)
        .map(|p| {
            let p = p.to_string();
            // Bound to the address clients ask: a UDP answer from another
            // address is no answer of theirs (and is dropped).
            Proc::spawn(
                &format!("iperf3-{p}"),
                Some(&zone),
                iperf_bin,
                &["-s", "-p", &p, "-B", NET_HOST],
                logs.path(),
            )
            .unwrap()
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (a1, a2, b1) = (
        lab.topo.vm("a1").ns.name.clone(),
        lab.topo.vm("a2").ns.name.clone(),
        lab.topo.vm("b1").ns.name.clone(),
    );

    // 1. Under the share: 30 + 30 Mbit/s up from two hosts, 20 down, and
    // 40 up from the other VPC (which, if counted, would cross 80%).
    let before = (system_bytes(&lab, "h1"), system_bytes(&lab, "h2"));
    let runs = [
        iperf(&a1, 5201, 30, 8, false),
        iperf(&a2, 5202, 30, 8, false),
        iperf(&a1, 5203, 20, 8, true),
        iperf(&b1, 5204, 40, 8, false),
    ];
    let reports: Vec<serde_json::Value> = runs.into_iter().map(|r| r.join().unwrap()).collect();
    let last_second = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        - 1;
    // The agents' counts against what iperf3 says it sent (the meter
    // reads each second just after it ends).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let after = (system_bytes(&lab, "h1"), system_bytes(&lab, "h2"));
    for (host, counted, report) in [
        ("h1", after.0 - before.0, &reports[0]),
        ("h2", after.1 - before.1, &reports[1]),
    ] {
        let sent = frames_sent(report) as f64;
        let ratio = counted / sent;
        eprintln!("{host}: counted {counted} bytes up, iperf3 sent {sent} in frames: {ratio:.4}");
        // The TCP control connection's few kilobytes come on top.
        assert!(
            (0.995..1.02).contains(&ratio),
            "{host}: counted {counted} up, iperf3 sent {sent}"
        );
    }
    // Each interval's peaks, both hosts added up: up about 61.8 Mbit/s
    // (the frames of 60 Mbit/s of payload), down about 20.6.
    // Every interval the runs touched must be over and told: the one
    // holding their last second is the last of them. (The first interval
    // that crosses 50 Mbit/s may hold only part of both hosts' runs.)
    let peaks = rsyslog
        .wait_for_lines("the intervals' peaks", Duration::from_secs(30), |l| {
            l.iter().filter(|x| x.contains("|bandwidth_peak|")).any(|x| {
                let start = field(x, "interval_start").unwrap_or(0);
                let len = field(x, "interval_secs").unwrap_or(0);
                start + len > last_second
            })
        })
        .await;
    let peak_events: Vec<&String> = peaks.iter().filter(|x| x.contains("|bandwidth_peak|")).collect();
    let up = peak_events
        .iter()
        .filter_map(|x| field(x, "up_peak_bps"))
        .max()
        .unwrap();
    let down = peak_events
        .iter()
        .filter_map(|x| field(x, "down_peak_bps"))
        .max()
        .unwrap();
    eprintln!("peaks: up {up} down {down} bit/s");
    assert!(
        (55_000_000..72_000_000).contains(&up),
        "up peak {up}:\n{}",
        peaks.join("\n")
    );
    assert!(
        (18_000_000..25_000_000).contains(&down),
        "down peak {down}:\n{}",
        peaks.join("\n")
    );
    let e = peak_events[0];
    let f: Vec<&str> = e.splitn(6, '|').collect();
    assert_eq!(f[1], "sdn-controller", "{e}");
    // PRI: system daemons (3), informational (6).
    assert_eq!(f[3], "30", "{e}");
    assert!(
        f[4].contains("system=\"portal\"") && f[4].contains("zone=\"net\"") && f[4].contains("interval_secs=\"5\""),
        "{e}"
    );
    assert!(
        !peaks.iter().any(|x| x.contains("|bandwidth_alert|")),
        "an alert under the share (the other VPC's traffic counted?):\n{}",
        peaks.join("\n")
    );
    let text = curl(&format!("http://{metrics}/metrics"), None);
    let series = "sdn_system_bandwidth_interval_peak_bps{system=\"portal\",zone=\"net\",direction=\"up\"}";
    assert!(sample(&text, series).is_some(), "{text}");

    // 2. Over the share: 50 + 40 Mbit/s up is about 93% of 100.
    let runs = [iperf(&a1, 5205, 50, 5, false), iperf(&a2, 5206, 40, 5, false)];
    for r in runs {
        r.join().unwrap();
    }
    let got = rsyslog
        .wait_for_lines("the alert and its end", Duration::from_secs(20), |l| {
            l.iter().any(|x| x.contains("|bandwidth_alert|")) && l.iter().any(|x| x.contains("|bandwidth_normal|"))
        })
        .await;
    let alert = got.iter().find(|x| x.contains("|bandwidth_alert|")).unwrap();
    let f: Vec<&str> = alert.splitn(6, '|').collect();
    // PRI: system daemons (3), warning (4).
    assert_eq!(f[3], "28", "{alert}");
    for want in [
        "system=\"portal\"",
        "zone=\"net\"",
        "direction=\"up\"",
        "bandwidth_bps=\"100000000\"",
        "alert_percent=\"80\"",
    ] {
        assert!(f[4].contains(want), "{want} missing from {alert}");
    }
    let rate = field(alert, "rate_bps").unwrap();
    assert!((80_000_000..100_000_000).contains(&rate), "{alert}");
    assert_eq!(
        got.iter().filter(|x| x.contains("|bandwidth_alert|")).count(),
        1,
        "{}",
        got.join("\n")
    );
    let normal = got.iter().find(|x| x.contains("|bandwidth_normal|")).unwrap();
    assert!(normal.contains("direction=\"up\""), "{normal}");
    let text = curl(&format!("http://{metrics}/metrics"), None);
    let alerts = "sdn_system_bandwidth_alerts_total{system=\"portal\",zone=\"net\",direction=\"up\"}";
    assert_eq!(sample(&text, alerts), Some(1.0), "{text}");
    drop(servers);
}

/// Bad input and forged reports: refused, named, nothing applied.
#[tokio::test(flavor = "multi_thread")]
async fn systems_refuse_bad_input_and_forged_reports() {
    if !privileged() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let c = Cluster::start_secure(dir.path()).unwrap();
    c.apply_committed(ADMIN, vec![zone("net", &["0.0.0.0/0"], "up-net")])
        .await
        .unwrap();
    c.apply_committed(
        PLATFORM,
        vec![
            host("h1", "192.0.2.1"),
            host("h2", "192.0.2.2"),
            tenant("t"),
            vpc_in_zone("va", "t", "net"),
            vpc_in_zone("vb", "t", "net"),
            subnet("sa", "va", "10.1.0.0/24", ""),
            subnet("sb", "vb", "10.2.0.0/24", ""),
        ],
    )
    .await
    .unwrap();
    let port = |id: &str, h: &str, sn: &str, ip: &str, n: u8| {
        pb::operation::Op::PutPort(pb::Port {
            id: id.into(),
            tenant_id: "t".into(),
            subnet_id: sn.into(),
            host_id: h.into(),
            device: format!("tap{id}"),
            mac: format!("02:00:00:00:00:{n:02x}"),
            ipv4: ip.into(),
            ..Default::default()
        })
    };
    c.apply_committed(
        PLATFORM,
        vec![
            port("pa", "h1", "sa", "10.1.0.5", 1),
            port("pb", "h2", "sb", "10.2.0.5", 2),
        ],
    )
    .await
    .unwrap();
    let sys = |id: &str, vpcs: &[&str], ports: &[&str], zone: &str, up: u64| {
        pb::operation::Op::PutInformationSystem(pb::InformationSystem {
            id: id.into(),
            name: id.into(),
            vpc_ids: vpcs.iter().map(|s| s.to_string()).collect(),
            port_ids: ports.iter().map(|s| s.to_string()).collect(),
            bandwidth: vec![pb::SystemBandwidth {
                zone_id: zone.into(),
                up_bps: up,
                down_bps: 1_000_000,
            }],
            alert_percent: 0,
            interval_secs: 0,
        })
    };
    c.apply_committed(ADMIN, vec![sys("s1", &["va"], &[], "net", 1_000_000)])
        .await
        .unwrap();
    let list = || async {
        c.client()
            .await
            .unwrap()
            .list(pb::ListRequest::default())
            .await
            .unwrap()
            .into_inner()
    };
    let before = list().await;
    for (op, field, says) in [
        (
            sys("s2", &["nope"], &[], "net", 1),
            "put_information_system.vpc_ids[0]",
            "unknown vpc",
        ),
        (
            sys("s2", &["va"], &[], "net", 1),
            "put_information_system.vpc_ids[0]",
            "already information system s1's",
        ),
        (
            sys("s2", &[], &["pa"], "net", 1),
            "put_information_system.port_ids[0]",
            "already information system s1's",
        ),
        (
            sys("s2", &["vb"], &[], "ext", 1),
            "put_information_system.bandwidth[0].zone_id",
            "unknown zone",
        ),
        (
            sys("s2", &["vb"], &[], "net", 0),
            "put_information_system.bandwidth[0].up_bps",
            "more than 0",
        ),
        (
            sys("s2", &[], &[], "net", 1),
            "put_information_system.vpc_ids",
            "at least one",
        ),
    ] {
        let e = c.apply_committed(ADMIN, vec![op]).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().contains(field) && e.message().contains(says),
            "{field}: {}",
            e.message()
        );
    }
    // A VPC or zone a system measures cannot go.
    for (who, kind, id) in [(PLATFORM, pb::Kind::Vpc, "va"), (ADMIN, pb::Kind::Zone, "net")] {
        let e = c
            .apply_committed(
                who,
                vec![pb::operation::Op::Delete(pb::ObjectRef {
                    kind: kind as i32,
                    id: id.into(),
                })],
            )
            .await
            .unwrap_err();
        assert!(e.message().contains("information system s1"), "{}", e.message());
    }
    assert_eq!(list().await.information_systems, before.information_systems);
    // The platform provisions; systems are the administrators'.
    let e = c
        .apply_committed(PLATFORM, vec![sys("s3", &["vb"], &[], "net", 1)])
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");

    // Usage reports: only a host's own agent, only for systems with ports
    // on it.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let report = |host: &str| pb::UsageReport {
        host_id: host.into(),
        samples: vec![pb::UsageSample {
            system_id: "s1".into(),
            zone_id: "net".into(),
            unix_second: now,
            up_bytes: 1_000_000,
            down_bytes: 0,
        }],
    };
    async fn as_agent(c: &Cluster, uri: &str) -> pb::agent_client::AgentClient<tonic::transport::Channel> {
        pb::agent_client::AgentClient::new(c.channel_as(uri).await.unwrap())
    }
    // h2 has no port of s1: its report is left out, named.
    let r = as_agent(&c, "sdn://agent/h2")
        .await
        .usage(report("h2"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.refused), (0, 1), "{r:?}");
    assert!(r.reason.contains("no port on host h2"), "{}", r.reason);
    // h2 speaking for h1, and a tenant: refused.
    let e = as_agent(&c, "sdn://agent/h2")
        .await
        .usage(report("h1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    let e = as_agent(&c, "sdn://tenant/t/eve")
        .await
        .usage(report("h1"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    // Too many samples at once.
    let mut big = report("h1");
    big.samples = vec![big.samples[0].clone(); 5000];
    let e = as_agent(&c, "sdn://agent/h1").await.usage(big).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("samples:"), "{}", e.message());
    // More than any host carries in a second.
    let mut huge = report("h1");
    huge.samples[0].up_bytes = 1 << 40;
    let r = as_agent(&c, "sdn://agent/h1")
        .await
        .usage(huge)
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.refused), (0, 1), "{r:?}");
    assert!(r.reason.contains("more than a host carries"), "{}", r.reason);
    // h1's own report is taken.
    let r = as_agent(&c, "sdn://agent/h1")
        .await
        .usage(report("h1"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.accepted, r.refused), (1, 0), "{r:?}");
}
