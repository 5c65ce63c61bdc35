//! `sdn-demo`: the main job, end to end on one machine. A single-node
//! controller on its embedded store, two hosts with agents, three VMs on the
//! overlay, the extranet and the internet as two zones, all network
//! namespaces; the cloud platform provisions over gRPC, the administrator
//! applies zones and security groups from `policies/examples/` with
//! `sdnctl`, and real traffic shows what passes and what is dropped.

use std::path::PathBuf;
use std::process::Command;

use anyhow::Context as _;
use sdn_integration::cluster::{Cluster, ADMIN};
use sdn_integration::ops::*;
use sdn_integration::supervisor::{Nfacctd, Rsyslogd};
use sdn_integration::{bin, privileged, Topology};

const T: &str = "dept-a";
/// A machine of the extranet and one of the internet.
const EXT_HOST: &str = "10.99.0.1";

/// The portal's load balancer, as its tenant writes it.
const LB_MANIFEST: &str = "apiVersion: sdn/v1
kind: LoadBalancer
metadata: {name: portal-lb, tenant: dept-a}
spec: {vpc: portal, vipV4: 10.10.0.100}
---
apiVersion: sdn/v1
kind: Pool
metadata: {name: portal-web}
spec:
  loadBalancer: portal-lb
  health: {probe: tcp, intervalMs: 500, timeoutMs: 300, rise: 2, fall: 2}
---
apiVersion: sdn/v1
kind: Listener
metadata: {name: http}
spec: {loadBalancer: portal-lb, protocol: tcp, port: 80, pool: portal-web, scheduler: round_robin}
---
apiVersion: sdn/v1
kind: Member
metadata: {name: web-vm1}
spec: {pool: portal-web, port: vm1}
---
apiVersion: sdn/v1
kind: Member
metadata: {name: web-vm3}
spec: {pool: portal-web, port: vm3}
";
const NET_HOST: &str = "203.0.113.10";

/// The administrator exposes the portal's VIP to the extranet, translated
/// on h2 from its address 10.10.0.200 of the portal's VPC.
const LB_EXPOSED: &str = "apiVersion: sdn/v1
kind: LoadBalancer
metadata: {name: portal-lb, tenant: dept-a}
spec: {vpc: portal, vipV4: 10.10.0.100, exposure: zone, natHosts: [{host: h2, ipv4: 10.10.0.200}]}
";

/// What nmap finds open from each zone; returns how many results differ.
fn zones_matrix(topo: &Topology) -> usize {
    let cases: [(&str, &str, &str, &[u16], &str); 4] = [
        (
            "net",
            "vm1",
            "10.10.0.11",
            &[80],
            "exchange path demo-web-in: http only",
        ),
        ("net", "vm3", "10.10.0.13", &[], "no exchange path to vm3"),
        (
            "ext",
            "vm1",
            "10.10.0.11",
            &[80],
            "same zone: the security group decides",
        ),
        (
            "ext",
            "vm3",
            "10.10.0.13",
            &[80],
            "same zone: the security group decides",
        ),
    ];
    let mut wrong = 0;
    println!("  {:<22} {:<12} policy", "nmap -p 22,80,81,5432", "open");
    for (zone, vm, addr, want, why) in cases {
        let out = topo
            .zone_ns(zone)
            .sh(&[
                "nmap",
                "-n",
                "-Pn",
                "-sT",
                "-p",
                "22,80,81,5432",
                "--max-retries",
                "1",
                "-oG",
                "-",
                addr,
            ])
            .unwrap_or_default();
        let open: Vec<u16> = out
            .lines()
            .filter_map(|l| l.split("Ports:").nth(1))
            .flat_map(|p| p.split(','))
            .filter_map(|e| {
                let f: Vec<&str> = e.trim().split('/').collect();
                (f.len() > 1 && f[1] == "open").then(|| f[0].parse().ok()).flatten()
            })
            .collect();
        let mark = if open == want { "" } else { "   <-- UNEXPECTED" };
        if open != want {
            wrong += 1;
        }
        let from = if zone == "net" { "internet" } else { "extranet" };
        println!(
            "  {:<22} {:<12} {why}{mark}",
            format!("{from} -> {vm}"),
            format!("{open:?}")
        );
    }
    wrong
}

fn step(s: &str) {
    println!("\n== {s}");
}

/// `sdnctl` as the administrator (its certificate from the run's CA).
fn sdnctl(cluster: &Cluster, args: &[&str]) -> anyhow::Result<()> {
    let st = sdnctl_as(cluster, ADMIN, args)?;
    anyhow::ensure!(st.success(), "sdnctl {} failed", args.join(" "));
    Ok(())
}

fn sdnctl_as(cluster: &Cluster, uri: &str, args: &[&str]) -> anyhow::Result<std::process::ExitStatus> {
    let tls = cluster.tls_args(uri)?;
    println!("$ sdnctl {}    # as {uri}", args.join(" "));
    Ok(Command::new(bin("sdnctl"))
        .args(["--controller", cluster.addr.as_str()])
        .args(&tls)
        .args(args)
        .status()?)
}

/// Prints the matrix; returns how many results differ from the policy.
fn matrix(topo: &Topology, http_open: bool) -> usize {
    let http_why = if http_open {
        "web: http from anywhere"
    } else {
        "web: http closed for maintenance"
    };
    let cases: [(&str, &str, &str, u16, bool, bool, &str); 10] = [
        ("vm2", "vm1", "tcp", 80, false, http_open, http_why),
        ("vm3", "vm1", "tcp", 80, false, http_open, "same, across hosts"),
        ("vm3", "vm1", "tcp", 80, true, http_open, "same, IPv6 from fd10::/64"),
        (
            "vm3",
            "vm1",
            "tcp",
            81,
            false,
            false,
            "no rule for 81: inbound denied by default",
        ),
        (
            "vm2",
            "vm1",
            "udp",
            5353,
            false,
            true,
            "web: udp 5353 from 10.10.0.0/16",
        ),
        ("vm3", "vm1", "icmp", 0, false, true, "web: ping"),
        ("vm1", "vm2", "icmp", 0, false, false, "db: no ping rule"),
        (
            "vm1",
            "vm2",
            "tcp",
            5432,
            false,
            true,
            "db: postgres from members of web",
        ),
        ("vm3", "vm2", "tcp", 5432, true, true, "same, IPv6, across hosts"),
        (
            "vm2",
            "vm3",
            "tcp",
            5432,
            false,
            false,
            "vm3 is in web, which has no 5432 rule",
        ),
    ];
    let mut wrong = 0;
    println!("  {:<22} {:<6} policy", "flow", "result");
    for (from, to, proto, port, v6, want, why) in cases {
        let ok = topo.reach(from, to, proto, port, v6);
        let flow = format!("{from}->{to} {proto}/{port}{}", if v6 { " v6" } else { "" });
        let mark = if ok == want { "" } else { "   <-- UNEXPECTED" };
        if ok != want {
            wrong += 1;
        }
        println!("  {:<22} {:<6} {why}{mark}", flow, if ok { "PASS" } else { "DROP" });
    }
    wrong
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anyhow::ensure!(
        privileged(),
        "the demo needs root: it creates network namespaces and loads eBPF"
    );
    let examples = std::env::var("SDN_EXAMPLES")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("policies/examples"));
    anyhow::ensure!(
        examples.join("security-groups.yaml").exists(),
        "run from the repository root (policies/examples not found)"
    );

    step("topology: hosts h1 and h2 on a routed underlay; vm1, vm2 on h1, vm3 on h2; the extranet and the internet as two networks every host has an uplink to");
    let mut topo = Topology::new("demo", &["h1", "h2"])?;
    topo.add_zone(
        "ext",
        "up-ext",
        "10.255.0",
        "fdf0:0:0:1",
        &["10.0.0.0/8", "fd00::/8"],
        &[EXT_HOST],
    )?;
    topo.add_zone(
        "net",
        "up-net",
        "172.17.0",
        "fdf0:0:0:2",
        &["0.0.0.0/0", "::/0"],
        &[NET_HOST],
    )?;
    topo.add_vm("vm1", "h1", "02:00:00:00:00:11", "10.10.0.11/24", "fd10::11/64")?;
    topo.add_vm("vm2", "h1", "02:00:00:00:00:12", "10.10.0.12/24", "fd10::12/64")?;
    topo.add_vm("vm3", "h2", "02:00:00:00:00:13", "10.10.0.13/24", "fd10::13/64")?;
    // The supervisor's tap: a VM that only takes mirrored copies.
    topo.add_vm("tap", "h2", "02:00:00:00:00:14", "10.10.0.14/24", "fd10::14/64")?;
    // The supervisor's receivers: an IPFIX collector and a syslog server in
    // h1 for its agent, a syslog server beside the controller.
    let sup = topo.dir.join("supervisor");
    let syslog_port = {
        let s = std::net::UdpSocket::bind("127.0.0.1:0")?;
        s.local_addr()?.port()
    };
    let controller_syslog = Rsyslogd::udp(&sup.join("controller-syslog"), None, syslog_port)?;
    let syslog_to = format!("udp://127.0.0.1:{syslog_port}");
    let mut cluster =
        Cluster::start_secure_with(&topo.dir, &["--syslog", &syslog_to]).context("starting the controller")?;
    cluster.actor = "cloud-platform".into();
    let h1 = topo.host_ns("h1").name.clone();
    // The load balancer's elements too (the deployment's PEN, 40 to 42).
    let collector = Nfacctd::start(
        &h1,
        &sup.join("ipfix"),
        4739,
        "name=lb_service\tfield_type=32473:40\tlen=vlen\tsemantics=str\n\
         name=lb_vip\tfield_type=32473:41\tlen=vlen\tsemantics=str\n\
         name=lb_member\tfield_type=32473:42\tlen=vlen\tsemantics=str\n",
        ",lb_service,lb_vip,lb_member",
    )?;
    let agent_syslog = Rsyslogd::udp(&sup.join("agent-syslog"), Some(&h1), 5514)?;
    cluster.agent_extra = [
        "--flow-collector",
        "udp://127.0.0.1:4739",
        "--flow-idle-timeout",
        "2",
        "--syslog",
        "udp://127.0.0.1:5514",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    println!(
        "controller on {} (single-node Raft, redb store in {}); mutual TLS with a CA of this run in {}: \
         the platform, the administrator, each host's agent and each tenant's user hold a certificate naming who they are",
        cluster.addr,
        cluster.data_dir.display(),
        cluster.pki.as_ref().map(|p| p.dir.display().to_string()).unwrap_or_default()
    );

    step("cloud platform: hosts over gRPC; agents start on h1 and h2");
    cluster
        .apply(vec![
            host("h1", &topo.underlay_ip("h1")),
            host("h2", &topo.underlay_ip("h2")),
        ])
        .await?;
    cluster.start_agent(&topo, "h1")?;
    cluster.start_agent(&topo, "h2")?;

    step("administrator: the zones and their exchange paths (policies/examples/gov-cloud/00-zones.yaml)");
    let zones = examples.join("gov-cloud/00-zones.yaml");
    sdnctl(&cluster, &["apply", "-f", zones.to_str().unwrap(), "--wait"])?;
    cluster
        .apply(vec![
            tenant(T),
            vpc_in_zone("portal", T, "extranet"),
            subnet("portal-a", "portal", "10.10.0.0/24", "fd10::/64"),
        ])
        .await?;
    cluster
        .apply_as(
            ADMIN,
            vec![broad(
                exchange(
                    "demo-web-in",
                    "internet",
                    "extranet",
                    "0.0.0.0/0",
                    "10.10.0.11/32",
                    (80, 80),
                ),
                "the portal's web page is public",
            )],
        )
        .await?;
    for (zone, vm) in [
        ("ext", "vm1"),
        ("ext", "vm2"),
        ("ext", "vm3"),
        ("net", "vm1"),
        ("net", "vm3"),
    ] {
        topo.announce(zone, vm)?;
    }

    step("administrator: sdnctl validate and apply the security groups (policies/examples/security-groups.yaml)");
    let sg = examples.join("security-groups.yaml");
    sdnctl(&cluster, &["validate", "-f", sg.to_str().unwrap()])?;
    sdnctl(&cluster, &["apply", "-f", sg.to_str().unwrap(), "--wait"])?;

    step("cloud platform: ports over gRPC");
    let r = cluster
        .apply(vec![
            topo.port("vm1", T, "portal-a", &["web"]),
            topo.port("vm2", T, "portal-a", &["db"]),
            topo.port("vm3", T, "portal-a", &["web"]),
            // No security group: it gets nothing but copies, sends nothing.
            topo.port("tap", T, "portal-a", &[]),
        ])
        .await
        .map_err(|s| anyhow::anyhow!("{}", s.message()))?;
    println!("revision {} enforced on {}", r.revision, r.hosts.join(", "));
    let args = ["--tcp", "80", "--tcp", "81", "--tcp", "5432", "--udp", "5353"];
    let mut servers = topo.serve(&["vm1", "vm2", "vm3"], &[], &args)?;

    step("traffic: vm1, vm3 in web; vm2 in db");
    let mut wrong = matrix(&topo, true);

    step("administrator: maintenance window closes http on web (policies/examples/security-groups-maintenance.yaml)");
    let maint = examples.join("security-groups-maintenance.yaml");
    sdnctl(&cluster, &["apply", "-f", maint.to_str().unwrap(), "--wait"])?;
    wrong += matrix(&topo, false);

    step("administrator: reopen (apply security-groups.yaml again)");
    sdnctl(&cluster, &["apply", "-f", sg.to_str().unwrap(), "--wait"])?;
    wrong += matrix(&topo, true);

    step("a forged source address from vm2 is dropped by anti-spoofing");
    let vm2 = &topo.vm("vm2").ns;
    vm2.sh(&["ip", "addr", "add", "10.10.0.99/32", "dev", "eth0"])?;
    let forged = vm2
        .sh(&["ping", "-c", "1", "-W", "1", "-I", "10.10.0.99", "10.10.0.11"])
        .is_ok();
    println!(
        "  ping from 10.10.0.99 (not vm2's): {}",
        if forged { "PASS   <-- UNEXPECTED" } else { "DROP" }
    );
    wrong += forged as usize;

    step("operator: emergency quarantine of vm1, then lift it");
    let ping = |from: &str, to: &str| topo.reach(from, to, "icmp", 0, false);
    sdnctl(
        &cluster,
        &[
            "quarantine",
            "port",
            "vm1",
            "--reason",
            "suspected compromise, ticket 4711",
        ],
    )?;
    let (a, b) = (ping("vm2", "vm1"), ping("vm1", "vm3"));
    println!(
        "  vm2->vm1 ping: {}   vm1->vm3 ping: {}",
        if a { "PASS   <-- UNEXPECTED" } else { "DROP" },
        if b { "PASS   <-- UNEXPECTED" } else { "DROP" }
    );
    wrong += a as usize + b as usize;
    sdnctl(&cluster, &["lift", "q-vm1"])?;
    let a = ping("vm2", "vm1");
    println!(
        "  vm2->vm1 ping after the lift: {}",
        if a { "PASS" } else { "DROP   <-- UNEXPECTED" }
    );
    wrong += (!a) as usize;

    step("zones: the portal VPC is in the extranet; one exchange path lets the internet reach vm1's http");
    wrong += zones_matrix(&topo);

    step("drop counters on h1, by reason");
    let drops = cluster.drops(&topo, "h1")?;
    for (k, v) in drops["drops"].as_object().unwrap() {
        if v.as_u64() != Some(0) {
            println!("  {k:<24} {v}");
        }
    }

    step("who may do what: each call below is refused, and the refusal logged as a security event");
    let other = examples.join("security-groups.yaml");
    for (who, args) in [
        ("sdn://tenant/dept-b/eve", vec!["apply", "-f", other.to_str().unwrap()]),
        (
            "sdn://supervisor/inspector",
            vec!["quarantine", "port", "vm3", "--reason", "not mine to do"],
        ),
        ("sdn://agent/h1", vec!["get", "port"]),
    ] {
        let st = sdnctl_as(&cluster, who, &args)?;
        if st.success() {
            println!("  ACCEPTED   <-- UNEXPECTED");
            wrong += 1;
        }
    }
    println!("$ sdnctl status    # with no certificate");
    let st = Command::new(bin("sdnctl"))
        .args(["--controller", cluster.addr.as_str(), "status"])
        .status()?;
    if st.success() {
        println!("  ACCEPTED   <-- UNEXPECTED");
        wrong += 1;
    }
    let refused = cluster
        .controller
        .log_text()
        .lines()
        .filter(|l| l.contains("sdn::security"))
        .count();
    println!("  the controller logged {refused} security event(s)");

    step("audit log: who (from the certificate), when, what; refusals too");
    // Refusals reach the log grouped, within a second or so.
    std::thread::sleep(std::time::Duration::from_millis(2500));
    sdnctl(&cluster, &["audit"])?;
    step("the audit log's hash chain, checked by the supervisor");
    if !sdnctl_as(&cluster, "sdn://supervisor/inspector", &["audit", "verify"])?.success() {
        println!("  BROKEN   <-- UNEXPECTED");
        wrong += 1;
    }
    step("administrator: a mirror session copies vm1's traffic to the supervisor's tap on h2 (in VXLAN between the hosts); tcpdump in the tap");
    let manifest = topo.dir.join("mirror.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: sdn/v1\nkind: MirrorSession\nmetadata:\n  name: regulator-vm1\nspec:\n  select:\n    port: vm1\n  \
         direction: both\n  destination:\n    tap:\n      port: tap\n      vni: 9000\n",
    )?;
    println!("{}", std::fs::read_to_string(&manifest)?.trim_end());
    sdnctl(&cluster, &["apply", "-f", manifest.to_str().unwrap(), "--wait"])?;
    let pcap = sup.join("tap.pcap");
    let mut capture = sdn_integration::Proc::spawn(
        "tcpdump",
        Some(&topo.vm("tap").ns.name),
        &sdn_integration::supervisor::which("tcpdump"),
        &["-i", "eth0", "-U", "-n", "-w", pcap.to_str().unwrap(), "tcp port 80"],
        &sup,
    )?;
    let t0 = std::time::Instant::now();
    while !capture.log_text().contains("listening on") && t0.elapsed() < std::time::Duration::from_secs(10) {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    println!("$ three HTTP connections vm3 -> vm1:80, while tcpdump listens in the tap");
    for _ in 0..3 {
        topo.reach("vm3", "vm1", "tcp", 80, false);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    capture.stop();
    let seen = Command::new("tcpdump")
        .args(["-r", pcap.to_str().unwrap(), "-n"])
        .output()?;
    let seen = String::from_utf8_lossy(&seen.stdout).to_string();
    println!(
        "  the tap got {} copies of vm1's packets, for example:",
        seen.lines().count()
    );
    for l in seen.lines().take(4) {
        println!("    {l}");
    }
    if seen.lines().count() < 3 * 5 {
        println!("  too few copies   <-- UNEXPECTED");
        wrong += 1;
    }

    step("administrator: the portal VPC is an information system with 10 Mbit/s each way to the extranet; vm1 (h1) and vm3 (h2) send 5 Mbit/s each with iperf3");
    let manifest = topo.dir.join("system.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: sdn/v1\nkind: InformationSystem\nmetadata:\n  name: portal-system\nspec:\n  vpcs: [portal]\n  \
         bandwidth:\n    - zone: extranet\n      up: 10M\n      down: 10M\n  alertPercent: 80\n  intervalSeconds: 5\n",
    )?;
    println!("{}", std::fs::read_to_string(&manifest)?.trim_end());
    sdnctl(&cluster, &["apply", "-f", manifest.to_str().unwrap(), "--wait"])?;
    let iperf = sdn_integration::supervisor::which("iperf3");
    // One iperf3 server per client, bound to the address they ask (a UDP
    // answer from another address would be no answer of theirs).
    let servers_bw = ["5201", "5202"]
        .iter()
        .map(|p| {
            sdn_integration::Proc::spawn(
                &format!("iperf3-{p}"),
                Some(&topo.zone_ns("ext").name),
                &iperf,
                &["-s", "-B", EXT_HOST, "-p", p],
                &sup,
            )
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    std::thread::sleep(std::time::Duration::from_millis(500));
    let senders: Vec<_> = [("vm1", "5201"), ("vm3", "5202")]
        .iter()
        .map(|(vm, port)| {
            let ns = topo.vm(vm).ns.name.clone();
            let port = port.to_string();
            std::thread::spawn(move || {
                Command::new("ip")
                    .args([
                        "netns", "exec", &ns, "iperf3", "-c", EXT_HOST, "-p", &port, "-u", "-b", "5M", "-t", "4", "-l",
                        "1400",
                    ])
                    .output()
                    .map(|o| o.status.success())
                    .unwrap_or(false)
            })
        })
        .collect();
    let sent: Vec<bool> = senders.into_iter().map(|t| t.join().unwrap_or(false)).collect();
    drop(servers_bw);
    println!(
        "  iperf3 from vm1 and vm3: {}",
        if sent.iter().all(|x| *x) { "done" } else { "failed" }
    );
    std::thread::sleep(std::time::Duration::from_secs(8));
    let events = controller_syslog.lines();
    let bw: Vec<&String> = events.iter().filter(|l| l.contains("|bandwidth_")).collect();
    println!("  the controller's bandwidth events (both hosts' traffic added up):");
    for l in &bw {
        println!("    {l}");
    }
    if !bw.iter().any(|l| l.contains("|bandwidth_alert|")) {
        println!("  no alert at 80%   <-- UNEXPECTED");
        wrong += 1;
    }

    step("tenant dept-a: an L4 load balancer for the portal: VIP 10.10.0.100, round robin on tcp/80 over vm1 and vm3, TCP health checks from inside the VPC; vm2 connects through the VIP, then vm3's server stops");
    let lbm = topo.dir.join("lb.yaml");
    std::fs::write(&lbm, LB_MANIFEST)?;
    println!("{}", LB_MANIFEST.trim_end());
    if !sdnctl_as(
        &cluster,
        "sdn://tenant/dept-a/alice",
        &["apply", "-f", lbm.to_str().unwrap(), "--wait"],
    )?
    .success()
    {
        println!("  not applied   <-- UNEXPECTED");
        wrong += 1;
    }
    let through = |n: usize| {
        (0..n)
            .filter(|_| topo.reach_addr("vm2", "10.10.0.100", "tcp", 80))
            .count()
    };
    let ok = through(6);
    println!("  vm2 -> 10.10.0.100:80: {ok} of 6 connections made (the flow records below name each one's member)");
    if ok != 6 {
        println!("  expected 6   <-- UNEXPECTED");
        wrong += 1;
    }
    servers[2].kill();
    let t = std::time::Instant::now();
    let members = loop {
        let out = cluster.sdnctl(ADMIN, &["get", "member"]).unwrap_or_else(|e| e);
        if out.contains("health=down") || t.elapsed() > std::time::Duration::from_secs(5) {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    println!(
        "  vm3's server stopped; {:.1} s later (interval 0.5 s x fall 2, and the report's way):",
        t.elapsed().as_secs_f64()
    );
    for l in members.lines().filter(|l| l.starts_with("member")) {
        println!("    {l}");
    }
    let ok = through(6);
    println!("  vm2 -> 10.10.0.100:80: {ok} of 6 connections made (were vm3 still scheduled, half would be refused)");
    if !members.contains("health=down") || ok != 6 {
        println!("  vm3 not taken out of the schedule   <-- UNEXPECTED");
        wrong += 1;
    }

    step("administrator: the portal's VIP exposed to the extranet, translated on h2 (its NAT host; the member left, vm1, is on h1); the extranet routes 10.10.0.100 to h2's uplink; an extranet host connects through it, the internet cannot (no exchange path to the VIP)");
    let exposed = topo.dir.join("lb-exposed.yaml");
    std::fs::write(&exposed, LB_EXPOSED)?;
    println!("{}", LB_EXPOSED.trim_end());
    sdnctl(&cluster, &["apply", "-f", exposed.to_str().unwrap(), "--wait"])?;
    for (zone, via) in [("ext", "10.255.0.12"), ("net", "172.17.0.12")] {
        topo.zone_ns(zone)
            .sh(&["ip", "route", "replace", "10.10.0.100/32", "via", via])?;
    }
    let probe = bin("sdn-probe");
    let from_zone = |zone: &str, src: &str, n: usize| {
        (0..n)
            .filter(|_| {
                topo.zone_ns(zone)
                    .sh(&[
                        probe.to_str().unwrap(),
                        "connect",
                        "tcp",
                        "10.10.0.100",
                        "80",
                        "--bind",
                        src,
                        "--timeout-ms",
                        "700",
                    ])
                    .is_ok()
            })
            .count()
    };
    let ext_ok = from_zone("ext", EXT_HOST, 6);
    println!("  extranet {EXT_HOST} -> 10.10.0.100:80: {ext_ok} of 6 connections made (h2 -> tunnel -> vm1, from 10.10.0.200)");
    let net_ok = from_zone("net", NET_HOST, 3);
    println!("  internet {NET_HOST} -> 10.10.0.100:80: {net_ok} of 3 (zone isolation on h2)");
    if ext_ok != 6 || net_ok != 0 {
        println!("  expected 6 and 0   <-- UNEXPECTED");
        wrong += 1;
    }

    step("supervisor: the network as a tree (sdnctl topology; the controller's --web-listen serves it as a live page)");
    if !sdnctl_as(&cluster, "sdn://supervisor/inspector", &["topology"])?.success() {
        println!("  no topology   <-- UNEXPECTED");
        wrong += 1;
    }
    step("supervisor: what the regulator's collector (pmacct nfacctd, IPFIX) and syslog servers (rsyslogd) received");
    // The last flows' records go out at the next pass of h1's flow table.
    std::thread::sleep(std::time::Duration::from_secs(6));
    let rows = collector.rows();
    let allowed = rows.iter().filter(|r| r["verdict"] == "1").count();
    let denied = rows.iter().filter(|r| r["verdict"] == "2").count();
    println!("  h1's flow records: {allowed} allowed, {denied} denied; for example:");
    for r in rows.iter().filter(|r| r["verdict"] == "2").take(2).chain(
        rows.iter()
            .filter(|r| r["verdict"] == "1" && r["port_dst"] == 80)
            .take(2),
    ) {
        println!(
            "    {} {}:{} -> {}:{} port {} tenant {} rule {} verdict {} packets {} bytes {}",
            r["ip_proto"].as_str().unwrap_or(""),
            r["ip_src"].as_str().unwrap_or(""),
            r["port_src"],
            r["ip_dst"].as_str().unwrap_or(""),
            r["port_dst"],
            r["vport"].as_str().unwrap_or(""),
            r["tenant"].as_str().unwrap_or(""),
            r["rule"].as_str().unwrap_or(""),
            if r["verdict"] == "1" { "allowed" } else { "denied" },
            r["packets"],
            r["bytes"]
        );
    }
    let lb: Vec<&serde_json::Value> = rows
        .iter()
        .filter(|r| r["lb_service"] == "portal-lb/http" && r["ip_src"] == "10.10.0.12")
        .collect();
    let mut per_member = std::collections::BTreeMap::new();
    for r in &lb {
        *per_member.entry(r["lb_member"].as_str().unwrap_or("")).or_insert(0) += 1;
    }
    println!(
        "  h1's records of flows through the VIP (one a direction): {} by member {per_member:?}; for example:",
        lb.len()
    );
    for r in lb.iter().filter(|r| r["port_dst"] == 80).take(3) {
        println!(
            "    {}:{} -> {} ({} {}:{}) tenant {} packets {} bytes {}",
            r["ip_src"].as_str().unwrap_or(""),
            r["port_src"],
            r["lb_vip"].as_str().unwrap_or(""),
            r["lb_member"].as_str().unwrap_or(""),
            r["ip_dst"].as_str().unwrap_or(""),
            r["port_dst"],
            r["tenant"].as_str().unwrap_or(""),
            r["packets"],
            r["bytes"]
        );
    }
    let events = agent_syslog.lines();
    let kinds = |lines: &[String], kind: &str| lines.iter().filter(|l| l.contains(&format!("|{kind}|"))).count();
    println!(
        "  h1's security events: {} spoofing, {} quarantine applied, {} lifted, {} quarantine drops",
        kinds(&events, "spoof"),
        kinds(&events, "quarantine_applied"),
        kinds(&events, "quarantine_lifted"),
        kinds(&events, "quarantine_drop")
    );
    if let Some(l) = events.iter().find(|l| l.contains("|spoof|")) {
        println!("    {l}");
    }
    let audit = controller_syslog.lines();
    println!(
        "  the controller's events: {} policy changes, {} refusals",
        kinds(&audit, "policy_change"),
        kinds(&audit, "auth_refused")
    );
    if let Some(l) = audit.iter().find(|l| l.contains("|auth_refused|")) {
        println!("    {l}");
    }
    for (what, ok) in [
        ("denied flow records", denied > 0),
        ("allowed flow records", allowed > 0),
        ("a spoofing event", kinds(&events, "spoof") > 0),
        ("a quarantine event", kinds(&events, "quarantine_applied") > 0),
        ("policy change events", kinds(&audit, "policy_change") > 0),
        ("refusal events", kinds(&audit, "auth_refused") > 0),
        ("records of flows through the VIP", !lb.is_empty()),
        ("a member health event", kinds(&audit, "lb_member_health") > 0),
    ] {
        if !ok {
            println!("  no {what}   <-- UNEXPECTED");
            wrong += 1;
        }
    }
    drop(servers);
    drop(cluster);
    drop((collector, agent_syslog, controller_syslog));
    drop(topo);
    println!("\ndemo finished; namespaces, processes and pins removed");
    anyhow::ensure!(wrong == 0, "{wrong} result(s) differ from the policy");
    println!("every result matched the policy");
    Ok(())
}
