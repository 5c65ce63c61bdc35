//! How long a virtual IP is silent when its owner dies: ours (two NAT
//! hosts holding a load balancer's VIP, VRRPv3 every `INTERVAL_CS`
//! centiseconds, 5 by default, and the controller's grant) against a
//! keepalived pair at its defaults (VRRPv2 every second) and at our
//! interval (VRRPv3), in one run.
//!
//! A 1 kHz UDP probe (`sdn-probe gap`) runs through the VIP from the
//! zone's side; after a second the owner "dies": its VRRP speaker is
//! killed (our agent, keepalived's VRRP process) and its link cut. The
//! figure is the probe's longest silence. Then the dead host comes back,
//! takes the VIP back (priority, preemption), and the next kill follows.
//! `KILLS` kills per mode (20 by default); median and maximum.
//!
//! keepalived's side: two namespaces on a bridge, each with keepalived
//! (priorities 200 and 100) and a UDP echo server; whichever holds the
//! VIP answers. Ours: the echo server is a VM behind the load balancer,
//! so the figure includes the grant, the translation and the tunnel.
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example vip_failover` (`KILLS`,
//! `INTERVAL_CS`).

use std::path::Path;
use std::time::{Duration, Instant};

use sdn_integration::keepalived::{instance, Keepalived};
use sdn_integration::ops::*;
use sdn_integration::{bin, ns_sh, sh, wait_for, Netns, Proc};
use sdn_proto::v1 as pb;

const VIP: &str = "10.40.1.100";
const KA_VIP: &str = "10.78.0.100";

fn kills() -> usize {
    std::env::var("KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(20)
}

/// The advertisement interval of ours and of the fast keepalived pair.
fn interval_cs() -> u32 {
    std::env::var("INTERVAL_CS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// Runs the 1 kHz probe from `ns` (source `bind`) to `addr`:`port` for
/// `seconds`; its longest silence in ms.
fn probe(
    ns: String,
    addr: &'static str,
    port: &'static str,
    bind: &'static str,
    seconds: u32,
) -> std::thread::JoinHandle<f64> {
    std::thread::spawn(move || {
        let out = ns_sh(
            &ns,
            &[
                bin("sdn-probe").to_str().unwrap(),
                "gap",
                addr,
                port,
                "--seconds",
                &seconds.to_string(),
                "--bind",
                bind,
            ],
        )
        .expect("the probe");
        let j: serde_json::Value = serde_json::from_str(out.trim()).expect("the probe's JSON");
        j["max_gap_ms"].as_f64().unwrap_or(f64::NAN)
    })
}

async fn ours(n: usize) -> anyhow::Result<Vec<f64>> {
    let mut lab = sdn_integration::lab::Lab::new("vfo", &["h1", "h2", "h3"])
        .zone(
            "ext",
            "up-ext",
            "10.253.0",
            "fdf2:0:0:1",
            &["10.0.0.0/8", "fd00::/8"],
            &["10.99.0.1"],
        )
        .tenant("dept-a")
        .vpc("va", Some("ext"))
        .subnet("a-web", "va", "10.40.1.0/24", "fd40:1::/64")
        .group("open-a", open_rules())
        .vm("m1", "h1", "a-web", &["open-a"])
        .start()
        .await?;
    let _echo = lab.topo.serve(&["m1"], &[], &["--udp", "9001"])?;
    let mut lb = exposed(load_balancer("lbh", "dept-a", "va", VIP, ""), "h2", "10.40.1.202");
    lb.nat_hosts.push(pb::NatHost {
        host_id: "h3".into(),
        ipv4: "10.40.1.203".into(),
        ipv6: String::new(),
    });
    let mut m = member("udp-m1", "udp", "m1", "", 1);
    if let pb::operation::Op::PutMember(x) = &mut m {
        x.port = 9001;
    }
    let mut v = virtual_ip("hvip", "dept-a", "va", VIP, 40, true, &[("h2", 200), ("h3", 100)]);
    if let pb::operation::Op::PutVirtualIp(x) = &mut v {
        x.advert_interval_cs = interval_cs();
    }
    let ops = vec![
        put_lb(lb),
        pool("udp", "lbh"),
        m,
        listener("dns", "lbh", "udp", 53, "udp", "maglev"),
        v,
    ];
    anyhow::ensure!(lab.cluster.apply(ops).await?.enforced, "not enforced");
    let zone = lab.topo.zone_ns("ext").name.clone();
    ns_sh(&zone, &["ip", "route", "replace", &format!("{VIP}/32"), "dev", "br0"])?;
    let holds = |lab: &sdn_integration::lab::Lab, h: &str| {
        lab.topo
            .host_ns(h)
            .sh(&["ip", "-br", "addr", "show", "dev", "up-ext"])
            .is_ok_and(|s| s.contains(VIP))
    };
    let mut client = lab.cluster.client().await?;
    let answers = |zone: &str| ns_sh(zone, &[bin("sdn-probe").to_str().unwrap(), "connect", "udp", VIP, "53"]).is_ok();
    let mut gaps = Vec::new();
    let mut epoch = 0;
    for i in 0..n {
        // h2 (back, or at the start) owns it in a new epoch, and h3 let go.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let l = client
                .list(pb::ListRequest {
                    kind: pb::Kind::VirtualIp as i32,
                    stale: false,
                })
                .await?
                .into_inner();
            let v = l.virtual_ips.first().cloned().unwrap_or_default();
            if v.owner_host_id == "h2" && v.epoch > epoch && holds(&lab, "h2") && !holds(&lab, "h3") {
                epoch = v.epoch;
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "h2 never took the VIP back: {v:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        wait_for("the VIP to answer", Duration::from_secs(10), || answers(&zone))?;
        std::thread::sleep(Duration::from_millis(500));
        let p = probe(zone.clone(), VIP, "53", "10.99.0.1", 3);
        std::thread::sleep(Duration::from_millis(1000));
        lab.cluster.agent("h2").kill();
        lab.topo.host_ns("h2").sh(&["ip", "link", "set", "up-ext", "down"])?;
        let g = p.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        eprintln!("ours, kill {}: {g:.0} ms", i + 1);
        gaps.push(g);
        lab.topo.host_ns("h2").sh(&["ip", "link", "set", "up-ext", "up"])?;
        lab.cluster.start_agent(&lab.topo, "h2")?;
    }
    Ok(gaps)
}

/// One of the keepalived pair: VRRPv2 every second at its defaults, or
/// VRRPv3 at our interval.
fn keepalived_at(ns: &str, dir: &Path, name: &str, priority: u8, fast: bool) -> anyhow::Result<Keepalived> {
    let conf = if fast {
        let interval = format!("{:.2}", f64::from(interval_cs()) / 100.0);
        instance(name, 52, priority, &interval, 3, KA_VIP)
    } else {
        instance(name, 52, priority, "1", 2, KA_VIP)
    };
    Keepalived::start(ns, dir, name, &conf)
}

fn keepalived(n: usize, fast: bool) -> anyhow::Result<Vec<f64>> {
    let dir = tempfile::tempdir()?;
    let br = Netns::new("kfo-br")?;
    br.sh(&["ip", "link", "add", "br0", "type", "bridge"])?;
    br.sh(&["ip", "link", "set", "br0", "up"])?;
    let mut ends = Vec::new();
    for (i, e) in ["a", "b", "c"].iter().enumerate() {
        let ns = Netns::new(&format!("kfo-{e}"))?;
        let peer = format!("kfo{e}");
        sh(&[
            "ip", "link", "add", "eth0", "netns", &ns.name, "type", "veth", "peer", "name", &peer, "netns", &br.name,
        ])?;
        br.sh(&["ip", "link", "set", &peer, "master", "br0", "up"])?;
        ns.sh(&["ip", "addr", "add", &format!("10.78.0.{}/24", i + 1), "dev", "eth0"])?;
        ns.sh(&["ip", "link", "set", "eth0", "up"])?;
        ends.push(ns);
    }
    let mut servers = Vec::new();
    for e in ["a", "b"] {
        servers.push(Proc::spawn(
            &format!("echo-{e}"),
            Some(&format!("kfo-{e}")),
            &bin("sdn-probe"),
            &["serve", "--udp", "9001"],
            dir.path(),
        )?);
    }
    let holds =
        |ns: &str| sh(&["ip", "-n", ns, "-br", "addr", "show", "dev", "eth0"]).is_ok_and(|s| s.contains(KA_VIP));
    let _b = keepalived_at("kfo-b", dir.path(), "kb", 100, fast)?;
    let mut gaps = Vec::new();
    for i in 0..n {
        let mut a = keepalived_at("kfo-a", dir.path(), &format!("ka{i}"), 200, fast)?;
        wait_for("a to hold the VIP", Duration::from_secs(20), || {
            holds("kfo-a") && !holds("kfo-b")
        })?;
        std::thread::sleep(Duration::from_millis(500));
        let p = probe("kfo-c".into(), KA_VIP, "9001", "10.78.0.3", if fast { 3 } else { 7 });
        std::thread::sleep(Duration::from_millis(1000));
        a.crash();
        sh(&["ip", "-n", "kfo-br", "link", "set", "kfoa", "down"])?;
        let g = p.join().map_err(|_| anyhow::anyhow!("the probe panicked"))?;
        eprintln!(
            "keepalived ({}), kill {}: {g:.0} ms",
            if fast { "fast" } else { "defaults" },
            i + 1
        );
        gaps.push(g);
        // Back: what the dead keepalived left on its link goes with it.
        let _ = sh(&[
            "ip",
            "-n",
            "kfo-a",
            "addr",
            "del",
            &format!("{KA_VIP}/24"),
            "dev",
            "eth0",
        ]);
        sh(&["ip", "-n", "kfo-br", "link", "set", "kfoa", "up"])?;
    }
    drop(servers);
    drop(ends);
    Ok(gaps)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let n = kills();
    let ms = 10 * interval_cs();
    let t0 = Instant::now();
    let mut rows = Vec::new();
    for (name, gaps) in [
        (
            format!("ours: VRRPv3 every {ms} ms, the controller's grant"),
            ours(n).await?,
        ),
        (
            "keepalived, defaults (VRRPv2 every 1 s)".to_string(),
            keepalived(n, false)?,
        ),
        (format!("keepalived, VRRPv3 every {ms} ms"), keepalived(n, true)?),
    ] {
        let mut g = gaps.clone();
        let med = median(&mut g);
        let max = g.iter().cloned().fold(0.0, f64::max);
        rows.push((name, med, max, gaps.len()));
    }
    println!("| | kills | median gap, ms | maximum, ms |");
    println!("|---|---:|---:|---:|");
    for (name, med, max, k) in &rows {
        println!("| {name} | {k} | {med:.0} | {max:.0} |");
    }
    let ours_med = rows[0].1;
    println!(
        "\nkeepalived at its defaults is silent {:.1}x as long as ours; at our interval, {:.2}x ({:.0} s in all)",
        rows[1].1 / ours_med,
        rows[2].1 / ours_med,
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
