//! Least connections in the kernel: each new flow through a VIP goes to the
//! member with the fewest flows, the programs count flows as they start
//! and close, and the agent's count from the flow tables corrects what
//! conntrack's timeouts took. Run through BPF_PROG_TEST_RUN on a loaded
//! dataplane (root).

use aya::maps::{Array, HashMap as BpfHashMap, MapData};
use dataplane_common::lb as l;
use dataplane_common::maps as m;
use sdn_agent::compile;
use sdn_agent::dataplane::Dataplane;
use sdn_agent::reconcile::Reconciler;
use sdn_agent::testrun;
use sdn_agent::testutil::{lb_share, lb_tcp, lb_tcp_fin, BpffsMount};

const VIP: [u8; 4] = [10, 0, 0, 100];
const TC_ACT_REDIRECT: u32 = 7;

fn conns(dp: &mut Dataplane, slot: u32) -> l::LbConns {
    let a: Array<&MapData, l::LbConns> = Array::try_from(dp.ebpf_mut().map(l::LB_CONNS).unwrap()).unwrap();
    // The share's one service is number 0.
    a.get(&slot, 0).unwrap()
}

/// The member (by its address's last byte) a flow from `sport` went to.
fn member_of(dp: &mut Dataplane, sport: u16) -> u8 {
    let ebpf = dp.ebpf_mut();
    for name in [l::LB_FLOWS_NEW, l::LB_FLOWS] {
        let h: BpfHashMap<&MapData, l::LbFlowKey, l::LbFlow> = BpfHashMap::try_from(ebpf.map(name).unwrap()).unwrap();
        if let Some((_, f)) = h.iter().filter_map(Result::ok).find(|(k, _)| k.client_port == sport) {
            return f.backend[3];
        }
    }
    panic!("no flow from {sport}")
}

fn send(fd: std::os::fd::RawFd, pkt: &[u8]) {
    let r = testrun::run(fd, pkt, 1).unwrap();
    assert_eq!(r.retval, TC_ACT_REDIRECT, "the packet must pass");
}

#[test]
fn least_connections_counts_flows_and_the_agent_corrects_them() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: needs root");
        return;
    }
    let mount = BpffsMount::new("lb-counts").unwrap();
    let mut dp = Dataplane::load(&mount.path().join("a")).unwrap();
    let mut rec = Reconciler::new(dp.map_set().unwrap()).unwrap();
    let ifindex = |name: &str| match name {
        "lo" => Some(1),
        "d2" => Some(2),
        "d3" => Some(3),
        _ => None,
    };
    let d = compile::compile(&lb_share("least_connections"), &ifindex, 0).unwrap();
    assert!(d.rejected.is_empty(), "{:?}", d.rejected);
    rec.reconcile(&d).unwrap();
    dp.apply_lb(&d.lb).unwrap();
    let fd = dp.program_fd("from_vm").unwrap();
    // m1 (10.0.0.2) holds slot 0, m2 (10.0.0.3) slot 1.
    send(fd, &lb_tcp(VIP, 20_000, 80, true));
    assert_eq!(member_of(&mut dp, 20_000), 2, "equals: the first");
    assert_eq!(conns(&mut dp, 0), l::LbConns { open: 0, new: 1 });
    send(fd, &lb_tcp(VIP, 20_001, 80, true));
    assert_eq!(member_of(&mut dp, 20_001), 3, "the one with fewer");
    assert_eq!(conns(&mut dp, 1), l::LbConns { open: 0, new: 1 });
    // The first flow is long past its handshake's timeout: the agent's
    // count takes it out, and the next flow goes to its member again.
    {
        let mut h: BpfHashMap<&mut MapData, l::LbFlowKey, l::LbFlow> =
            BpfHashMap::try_from(dp.ebpf_mut().map_mut(l::LB_FLOWS_NEW).unwrap()).unwrap();
        let (k, mut f) = h
            .iter()
            .filter_map(Result::ok)
            .find(|(k, _)| k.client_port == 20_000)
            .unwrap();
        f.created_ns = 1;
        h.insert(k, f, 0).unwrap();
        let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> =
            BpfHashMap::try_from(dp.ebpf_mut().map_mut(m::CT_SYN).unwrap()).unwrap();
        let gone: Vec<m::CtKey> = ct
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.local_port == 20_000 || k.remote_port == 20_000)
            .collect();
        for k in gone {
            ct.remove(&k).unwrap();
        }
    }
    assert_eq!(dp.recount_lb().unwrap(), 1);
    assert_eq!(conns(&mut dp, 0), l::LbConns::default());
    assert_eq!(conns(&mut dp, 1), l::LbConns { open: 0, new: 1 });
    send(fd, &lb_tcp(VIP, 20_002, 80, true));
    assert_eq!(member_of(&mut dp, 20_002), 2);
    // Confirmed (as the answers and acknowledgements would), the flows
    // count as open; the agent's count agrees.
    {
        let ebpf = dp.ebpf_mut();
        let mut syn: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> =
            BpfHashMap::try_from(ebpf.map_mut(m::CT_SYN).unwrap()).unwrap();
        let all: Vec<(m::CtKey, m::CtValue)> = syn.iter().filter_map(Result::ok).collect();
        for (k, _) in &all {
            syn.remove(k).unwrap();
        }
        let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> =
            BpfHashMap::try_from(ebpf.map_mut(m::CT).unwrap()).unwrap();
        for (k, v) in &all {
            ct.insert(k, v, 0).unwrap();
        }
    }
    // The next packet of each flow moves it to the confirmed flows.
    send(fd, &lb_tcp(VIP, 20_001, 80, false));
    send(fd, &lb_tcp(VIP, 20_002, 80, false));
    assert_eq!(conns(&mut dp, 0), l::LbConns { open: 1, new: 0 });
    assert_eq!(conns(&mut dp, 1), l::LbConns { open: 1, new: 0 });
    assert_eq!(dp.recount_lb().unwrap(), 2);
    assert_eq!(conns(&mut dp, 1), l::LbConns { open: 1, new: 0 });
    // The client closes one: it no longer counts, once only.
    send(fd, &lb_tcp_fin(VIP, 20_001, 80));
    send(fd, &lb_tcp_fin(VIP, 20_001, 80));
    assert_eq!(conns(&mut dp, 1), l::LbConns::default());
    assert_eq!(conns(&mut dp, 0), l::LbConns { open: 1, new: 0 });
    assert_eq!(dp.recount_lb().unwrap(), 1);
    assert_eq!(conns(&mut dp, 1), l::LbConns::default());
}
