//! A host of 500 ports: the real agent enforces them all, and then a change
//! to one port is compiled as that one port (the agent's log says how many
//! ports and endpoints a pass compiled anew), enforced, and shown by
//! traffic between two VMs among the 500.

use std::time::Instant;

use sdn_integration::lab::{Lab, TENANT};
use sdn_integration::ops::*;
use sdn_integration::{privileged, Proc};
use sdn_proto::v1 as pb;

/// Ports on the host besides the two VMs: devices without a VM behind
/// them, each a port of the cloud as the API knows it.
const BULK: usize = 498;
/// VPCs the bulk ports are spread over (50 ports each).
const VPCS: usize = 10;

struct Env {
    _servers: Vec<Proc>,
    lab: Lab,
}

/// The last "reconciled" line of the agent's log, as key=value fields.
fn last_pass(log: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let line = log.lines().rev().find(|l| l.contains("reconciled"))?;
    Some(
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect(),
    )
}

fn field(pass: &std::collections::BTreeMap<String, String>, k: &str) -> u64 {
    pass.get(k)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no {k} in the agent's pass: {pass:?}"))
}

fn bulk_port(i: usize, addr: u8) -> pb::operation::Op {
    let v = i % VPCS;
    port(
        &format!("bulk{i}"),
        TENANT,
        &format!("bs{v}"),
        "h1",
        &format!("bk{i}"),
        &format!("02:b0:00:00:{:02x}:{:02x}", i / 256, i % 256),
        &format!("10.{}.0.{addr}", 50 + v),
        "",
        &["bulk"],
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_one_port_change_on_a_host_of_500_ports_compiles_one_port() -> anyhow::Result<()> {
    if !privileged() {
        eprintln!("skipped: needs root");
        return Ok(());
    }
    let lab = Lab::new("hsc", &["h1"])
        .vpc("v", None)
        .subnet("s", "v", "10.49.0.0/24", "")
        .group("ping", vec![ingress("ping", false, "icmp", (0, 0), "", "")])
        .group("closed", vec![])
        .group("front", vec![])
        .vm("vm1", "h1", "s", &["ping", "front"])
        .vm("vm2", "h1", "s", &["closed"])
        .start()
        .await?;
    let env = Env { _servers: vec![], lab };
    let lab = &env.lab;
    // The bulk ports' devices, on the host.
    let batch = lab.topo.dir.join("bulk-devices");
    let mut lines = String::new();
    for i in 0..BULK {
        lines.push_str(&format!(
            "link add bk{i} type veth peer name bp{i}\nlink set bk{i} up\nlink set bp{i} up\n"
        ));
    }
    std::fs::write(&batch, lines)?;
    let ns = lab.topo.host_ns("h1");
    ns.sh(&["ip", "-batch", batch.to_str().unwrap()])?;
    // Ten VPCs, a group whose rules name prefixes and vm1's group `front`,
    // and the 498 ports.
    let mut ops = Vec::new();
    for v in 0..VPCS {
        ops.push(vpc(&format!("bv{v}"), TENANT));
        ops.push(subnet(
            &format!("bs{v}"),
            &format!("bv{v}"),
            &format!("10.{}.0.0/24", 50 + v),
            "",
        ));
    }
    ops.push(group(
        "bulk",
        TENANT,
        vec![
            ingress("ssh", false, "tcp", (22, 22), "10.0.0.0/8", ""),
            ingress("web", false, "tcp", (80, 443), "", ""),
            ingress("from-front", false, "tcp", (5432, 5432), "", "front"),
        ],
    ));
    lab.cluster.apply(ops).await?;
    let started = Instant::now();
    let r = lab
        .cluster
        .apply((0..BULK).map(|i| bulk_port(i, 10 + (i / VPCS) as u8)).collect())
        .await?;
    anyhow::ensure!(r.enforced, "the 498 ports were not enforced: {r:?}");
    let all = started.elapsed();
    let first = last_pass(&lab.cluster.agent_log("h1")).expect("a pass");
    eprintln!("500 ports enforced in {all:?}; the agent's pass: {first:?}");
    assert_eq!(field(&first, "ports"), 500, "every port is in the kernel");
    assert!(field(&first, "ports_compiled") >= BULK as u64);

    // One port changes group: vm2 opens to ping. No group's rules name
    // `ping` or `closed`, so one port is compiled anew, no endpoint; and
    // the traffic shows it.
    assert!(!lab.topo.reach("vm1", "vm2", "icmp", 0, false), "vm2 is closed");
    let vm2 = lab.ports.iter().find(|p| p.id == "vm2").expect("vm2").clone();
    let started = Instant::now();
    let r = lab
        .cluster
        .apply(vec![pb::operation::Op::PutPort(pb::Port {
            security_group_ids: vec!["ping".into()],
            ..vm2
        })])
        .await?;
    anyhow::ensure!(r.enforced, "{r:?}");
    let one = started.elapsed();
    let pass = last_pass(&lab.cluster.agent_log("h1")).expect("a pass");
    eprintln!("one port's group changed, enforced in {one:?}; the agent's pass: {pass:?}");
    assert_eq!(field(&pass, "ports_compiled"), 1, "{pass:?}");
    assert_eq!(field(&pass, "endpoints_compiled"), 0, "{pass:?}");
    assert_eq!(field(&pass, "ports"), 500);
    assert!(lab.topo.reach("vm1", "vm2", "icmp", 0, false), "vm2 opened to ping");

    // One bulk port's address, again and again: that port and its
    // endpoint, each time; the time from the call to the host's ack.
    let mut times = Vec::new();
    let mut compile_us = Vec::new();
    for k in 0..20u8 {
        let started = Instant::now();
        let r = lab.cluster.apply(vec![bulk_port(7, 200 + k)]).await?;
        anyhow::ensure!(r.enforced, "{r:?}");
        times.push(started.elapsed());
        let pass = last_pass(&lab.cluster.agent_log("h1")).expect("a pass");
        assert_eq!(
            (field(&pass, "ports_compiled"), field(&pass, "endpoints_compiled")),
            (1, 1),
            "{pass:?}"
        );
        compile_us.push(field(&pass, "compile_us"));
    }
    times.sort();
    compile_us.sort();
    eprintln!(
        "one port's address, 20 times: apply to ack p50 {:?}, max {:?}; the agent's compile p50 {} us (first pass: {} us)",
        times[times.len() / 2],
        times[times.len() - 1],
        compile_us[compile_us.len() / 2],
        field(&first, "compile_us"),
    );
    Ok(())
}
