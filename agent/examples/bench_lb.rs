//! The load balancer's per-packet cost, measured in the kernel with
//! BPF_PROG_TEST_RUN through `from_vm` and every stage it tail-calls: a
//! new flow to a VIP (a SYN from a source port never used: the service
//! lookup, the scheduler, the guard run again on the member's address,
//! the security groups, the unconfirmed flow entries, the rewrite) and a
//! packet of a confirmed flow through the VIP, each against the same
//! packet sent to the member's own address (no load balancer). Every
//! packet is one run (a run rewrites the packet it is given); new flows
//! are the mean of runs from unused source ports, established packets the
//! median of many runs. From the
//! costs, the new connections a core can open through a VIP: one new flow
//! and two packets of an established one (the answer and the
//! acknowledgement) per connection on the client's host.
//!
//! Run as root: `cargo run --release -p sdn-agent --example bench_lb`
//! (`-- --smoke` for a short run that only checks it still works).

use aya::maps::{HashMap as BpfHashMap, MapData};
use dataplane_common::lb as l;
use dataplane_common::maps as m;
use sdn_agent::compile;
use sdn_agent::dataplane::Dataplane;
use sdn_agent::reconcile::Reconciler;
use sdn_agent::testrun;
use sdn_agent::testutil::{lb_share, lb_tcp, BpffsMount};

const VIP: [u8; 4] = [10, 0, 0, 100];
const MEMBER: [u8; 4] = [10, 0, 0, 2];

/// Moves every unconfirmed flow (conntrack's and the load balancer's) to
/// the confirmed tables, as the answer and the acknowledgement would: the
/// harness sends one way only.
fn confirm(dp: &mut Dataplane) -> anyhow::Result<()> {
    let ebpf = dp.ebpf_mut();
    fn moved<K: aya::Pod + Clone, V: aya::Pod>(ebpf: &mut aya::Ebpf, from: &str, to: &str) -> anyhow::Result<()> {
        let mut a: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(
            ebpf.map_mut(from)
                .ok_or_else(|| anyhow::anyhow!("map {from} missing"))?,
        )?;
        let all: Vec<(K, V)> = a.iter().filter_map(|e| e.ok()).collect();
        for (k, _) in &all {
            a.remove(k)?;
        }
        let mut b: BpfHashMap<&mut MapData, K, V> =
            BpfHashMap::try_from(ebpf.map_mut(to).ok_or_else(|| anyhow::anyhow!("map {to} missing"))?)?;
        for (k, v) in &all {
            b.insert(k, v, 0)?;
        }
        Ok(())
    }
    moved::<m::CtKey, m::CtValue>(ebpf, m::CT_SYN, m::CT)?;
    moved::<l::LbFlowKey, l::LbFlow>(ebpf, l::LB_FLOWS_NEW, l::LB_FLOWS)?;
    moved::<l::LbReverseKey, l::LbReverse>(ebpf, l::LB_REVERSE_NEW, l::LB_REVERSE)?;
    Ok(())
}

const TC_ACT_REDIRECT: u32 = 7;

/// A table entry of zeroes (the tables' types are plain data).
fn zeroed<T: aya::Pod>() -> T {
    // SAFETY: Pod types are plain data, valid at every bit pattern.
    unsafe { std::mem::zeroed() }
}

fn main() -> anyhow::Result<()> {
    let smoke = std::env::args().any(|a| a == "--smoke");
    let mount = BpffsMount::new("bench-lb")?;
    let mut dp = Dataplane::load(&mount.path().join("a"))?;
    let mut rec = Reconciler::new(dp.map_set()?)?;
    let fd = dp.program_fd("from_vm")?;
    let new_flows: u16 = if smoke { 50 } else { 4_000 };
    let ifindex = |name: &str| match name {
        "lo" => Some(1),
        "d2" => Some(2),
        "d3" => Some(3),
        _ => None,
    };
    println!(
        "{:<22} {:>14} {:>14} {:>14} {:>14}",
        "scheduler", "new via VIP", "new direct", "est. via VIP", "est. direct"
    );
    for (round, scheduler) in ["maglev", "round_robin", "least_connections"].iter().enumerate() {
        let d = compile::compile(&lb_share(scheduler), &ifindex, 0)?;
        anyhow::ensure!(d.rejected.is_empty(), "{:?}", d.rejected);
        rec.reconcile(&d)?;
        dp.apply_lb(&d.lb)?;
        // New flows: one run each, from source ports never used; the mean.
        let new = |dst: [u8; 4], dport: u16, base: u16| -> anyhow::Result<u32> {
            let mut total = 0u64;
            for i in 0..new_flows {
                let r = testrun::run(fd, &lb_tcp(dst, base + i, dport, true), 1)?;
                anyhow::ensure!(r.retval == TC_ACT_REDIRECT, "a new flow must pass (got {})", r.retval);
                total += r.ns_per_run as u64;
            }
            Ok((total / new_flows as u64) as u32)
        };
        let base = 10_000 + round as u16 * 20_000;
        let new_vip = new(VIP, 80, base)?;
        let new_direct = new(MEMBER, 8080, base + 5_000)?;
        // Established: a flow through the VIP and one straight to the
        // member, confirmed, then an ACK of each, many times.
        for (dst, dport) in [(VIP, 80), (MEMBER, 8080)] {
            let r = testrun::run(fd, &lb_tcp(dst, 9_000 + round as u16, dport, true), 1)?;
            anyhow::ensure!(r.retval == TC_ACT_REDIRECT, "the flow must open");
        }
        confirm(&mut dp)?;
        // One run at a time (a run rewrites the packet it is given, so a
        // repeated run would see its own rewrite); the median of many.
        let runs = if smoke { 200 } else { 200_000 };
        let best = |pkt: &[u8]| -> anyhow::Result<u32> {
            let mut all = Vec::with_capacity(runs);
            for _ in 0..runs {
                let r = testrun::run(fd, pkt, 1)?;
                if r.retval != TC_ACT_REDIRECT {
                    let (drops, _) = sdn_agent::dataplane::read_counters(&mount.path().join("a"))?;
                    let seen: Vec<_> = drops.iter().filter(|(_, n)| *n > 0).collect();
                    anyhow::bail!("an established packet must pass (got {}; drops {seen:?})", r.retval);
                }
                all.push(r.ns_per_run);
            }
            all.sort_unstable();
            Ok(all[all.len() / 2])
        };
        let est_vip = best(&lb_tcp(VIP, 9_000 + round as u16, 80, false))?;
        let est_direct = best(&lb_tcp(MEMBER, 9_000 + round as u16, 8080, false))?;
        println!("{scheduler:<22} {new_vip:>11} ns {new_direct:>11} ns {est_vip:>11} ns {est_direct:>11} ns");
        let per_conn = new_vip as u64 + 2 * est_vip as u64;
        println!(
            "  the load balancer adds {} ns to a new flow and {} ns to an established packet; \
             one core opens about {} connections a second through a VIP ({} per connection)",
            new_vip as i64 - new_direct as i64,
            est_vip as i64 - est_direct as i64,
            1_000_000_000 / per_conn.max(1),
            per_conn
        );
    }
    drop(rec);
    drop(dp);
    filled(if smoke { 100_000 } else { 10_000_000 })
}

/// Connection tables of `n` entries, set at load: their memory by the
/// kernel's accounting, filled to the last entry (flows of other ports,
/// written as the agent writes them), and a flow through the VIP among
/// them: its packets pass, and the cost of one against the empty tables'.
/// A flow beyond the table is refused.
fn filled(n: u32) -> anyhow::Result<()> {
    let mount = BpffsMount::new("bench-lb-full")?;
    let t = std::time::Instant::now();
    let mut dp = Dataplane::load_sized(&mount.path().join("a"), n)?;
    println!(
        "\nconnection tables of {n} entries, loaded in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let mut total = 0;
    for (name, t) in dp.flow_tables()? {
        anyhow::ensure!(t.max_entries == n, "{name}: {} entries, not {n}", t.max_entries);
        total += t.memlock_bytes;
        println!(
            "  {name:<16} {:>7.1} MiB  {:>4} bytes an entry",
            t.memlock_bytes as f64 / (1 << 20) as f64,
            t.memlock_bytes / n as u64
        );
    }
    println!(
        "  together: {:.0} MiB a million connections",
        total as f64 / (1 << 20) as f64 * 1e6 / n as f64
    );
    let mut rec = Reconciler::new(dp.map_set()?)?;
    let ifindex = |name: &str| match name {
        "lo" => Some(1),
        "d2" => Some(2),
        "d3" => Some(3),
        _ => None,
    };
    let d = compile::compile(&lb_share("maglev"), &ifindex, 0)?;
    rec.reconcile(&d)?;
    dp.apply_lb(&d.lb)?;
    let fd = dp.program_fd("from_vm")?;
    let median = |pkt: &[u8]| -> anyhow::Result<u32> {
        let mut all = Vec::new();
        for _ in 0..20_001 {
            let r = testrun::run(fd, pkt, 1)?;
            anyhow::ensure!(
                r.retval == TC_ACT_REDIRECT,
                "an established packet must pass (got {})",
                r.retval
            );
            all.push(r.ns_per_run);
        }
        all.sort_unstable();
        Ok(all[all.len() / 2])
    };
    let open = |port: u16| -> anyhow::Result<()> {
        let r = testrun::run(fd, &lb_tcp(VIP, port, 80, true), 1)?;
        anyhow::ensure!(r.retval == TC_ACT_REDIRECT, "the flow must open (got {})", r.retval);
        Ok(())
    };
    open(7_000)?;
    confirm(&mut dp)?;
    let empty = median(&lb_tcp(VIP, 7_000, 80, false))?;
    // Every other entry: distinct keys of a port the host does not have.
    let t = std::time::Instant::now();
    let ebpf = dp.ebpf_mut();
    let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(ebpf.map_mut(m::CT).unwrap())?;
    let held = ct.keys().count() as u32;
    for i in 0..n - held {
        let mut k: m::CtKey = zeroed();
        k.ifindex = 100;
        k.family = dataplane_common::FAMILY_V4;
        k.proto = 6;
        k.local_port = i as u16;
        k.remote_port = (i >> 16) as u16;
        k.local[..4].copy_from_slice(&[10, 0, 0, 1]);
        k.remote[..4].copy_from_slice(&[10, 1, 0, 1]);
        ct.insert(k, zeroed::<m::CtValue>(), 0)
            .map_err(|e| anyhow::anyhow!("flow {i} of {n}: {e}"))?;
    }
    // The table is full: one more is refused.
    let mut k: m::CtKey = zeroed();
    k.ifindex = 101;
    anyhow::ensure!(
        ct.insert(k, zeroed::<m::CtValue>(), 0).is_err(),
        "a full table took one more"
    );
    let mut flows: BpfHashMap<&mut MapData, l::LbFlowKey, l::LbFlow> =
        BpfHashMap::try_from(ebpf.map_mut(l::LB_FLOWS).unwrap())?;
    let held = flows.keys().count() as u32;
    for i in 0..n - held {
        let mut k = l::LbFlowKey {
            ifindex: 100,
            family: dataplane_common::FAMILY_V4,
            proto: 6,
            client_port: i as u16,
            vport: (i >> 16) as u16,
            ..Default::default()
        };
        k.vip[..4].copy_from_slice(&VIP);
        flows.insert(k, l::LbFlow::default(), 0)?;
    }
    let mut rev: BpfHashMap<&mut MapData, l::LbReverseKey, l::LbReverse> =
        BpfHashMap::try_from(ebpf.map_mut(l::LB_REVERSE).unwrap())?;
    let held = rev.keys().count() as u32;
    for i in 0..n - held {
        let mut k = l::LbReverseKey {
            ifindex: 100,
            family: dataplane_common::FAMILY_V4,
            proto: 6,
            client_port: i as u16,
            backend_port: (i >> 16) as u16,
            ..Default::default()
        };
        k.backend[..4].copy_from_slice(&MEMBER);
        rev.insert(k, l::LbReverse::default(), 0)?;
    }
    println!("  filled in {:.1} s", t.elapsed().as_secs_f64());
    let full = median(&lb_tcp(VIP, 7_000, 80, false))?;
    println!("  a packet of a flow through the VIP: {full} ns with the tables full, {empty} ns with them empty");
    // A new flow opens (its handshake is in the unconfirmed table), but
    // its confirmation finds no room.
    open(7_001)?;
    anyhow::ensure!(confirm(&mut dp).is_err(), "a flow beyond the full table was confirmed");
    println!("  a flow beyond the table: refused");
    Ok(())
}
