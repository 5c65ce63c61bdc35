//! The clustered controller as real processes: three replicas, each in its
//! own network namespace. Leader kills under load with a linearizability
//! check, a partition cut with nftables, a rolling upgrade under a live
//! connection, catch-up from a snapshot, and membership errors.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sdn_integration::linearizability::{self, Event, Op};
use sdn_integration::ops::*;
use sdn_integration::replicas::{cluster_client, prov_client, Replicas};
use sdn_integration::{bin, privileged, Proc, Topology};
use sdn_proto::v1 as pb;
use tonic::Code;

/// Shared record of a run: the history and the acknowledged unique writes.
#[derive(Default)]
struct Record {
    history: Vec<Event>,
    acked_unique: Vec<String>,
    ok_writes: u64,
    failed_writes: u64,
    ok_reads: u64,
}

async fn put_tenant(addr: &str, id: &str, name: &str, timeout: Duration) -> Result<u64, tonic::Status> {
    let fut = async {
        let mut c = prov_client(addr)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        c.apply(pb::ApplyRequest {
            operations: vec![pb::Operation {
                op: Some(pb::operation::Op::PutTenant(pb::Tenant {
                    id: id.into(),
                    name: name.into(),
                })),
            }],
            actor: "load".into(),
            wait: false,
            wait_timeout_ms: 0,
        })
        .await
        .map(|r| r.into_inner().revision)
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")))
}

async fn list_tenants(addr: &str, stale: bool, timeout: Duration) -> Result<pb::ListResponse, tonic::Status> {
    let fut = async {
        let mut c = prov_client(addr)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        c.list(pb::ListRequest {
            kind: pb::Kind::Tenant as i32,
            stale,
        })
        .await
        .map(|r| r.into_inner())
    };
    tokio::time::timeout(timeout, fut)
        .await
        .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("client timeout")))
}

const KEYS: usize = 3;

/// Starts writers and readers against every replica until `stop` is set.
fn start_load(
    addrs: Vec<String>,
    start: Instant,
    rec: Arc<Mutex<Record>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut tasks = Vec::new();
    let ns = move || start.elapsed().as_nanos() as u64;
    for w in 0..4usize {
        let (addrs, rec, stop) = (addrs.clone(), rec.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let addr = &addrs[(w + seq) % addrs.len()];
                let unique = seq.is_multiple_of(4);
                let (key, value) = if unique {
                    (format!("u{w}-{seq}"), "x".to_string())
                } else {
                    (format!("k{}", (w * 7 + seq) % KEYS), format!("w{w}-{seq}"))
                };
                let call = ns();
                let r = put_tenant(addr, &key, &value, Duration::from_secs(2)).await;
                let ret = ns();
                let failed = {
                    let mut g = rec.lock().unwrap();
                    match r {
                        Ok(_) => {
                            g.ok_writes += 1;
                            if unique {
                                g.acked_unique.push(key.clone());
                            }
                            g.history.push(Event {
                                key,
                                op: Op::Write(value),
                                call,
                                ret: Some(ret),
                            });
                            false
                        }
                        Err(e) => {
                            g.failed_writes += 1;
                            // Refused before any proposal: it did not happen. Otherwise unknown.
                            if e.code() != Code::InvalidArgument {
                                g.history.push(Event {
                                    key,
                                    op: Op::Write(value),
                                    call,
                                    ret: None,
                                });
                            }
                            true
                        }
                    }
                };
                if failed {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }));
    }
    for rd in 0..2usize {
        let (addrs, rec, stop) = (addrs.clone(), rec.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut seq = 0usize;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                seq += 1;
                let addr = &addrs[(rd + seq) % addrs.len()];
                let call = ns();
                let r = list_tenants(addr, false, Duration::from_secs(2)).await;
                let ret = ns();
                match r {
                    Ok(l) => {
                        let mut g = rec.lock().unwrap();
                        g.ok_reads += 1;
                        for k in 0..KEYS {
                            let key = format!("k{k}");
                            let v = l.tenants.iter().find(|t| t.id == key).map(|t| t.name.clone());
                            g.history.push(Event {
                                key,
                                op: Op::Read(v),
                                call,
                                ret: Some(ret),
                            });
                        }
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        }));
    }
    tasks
}

async fn finish_and_check(
    r: &Replicas,
    rec: &Arc<Mutex<Record>>,
    stop: &Arc<std::sync::atomic::AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
) {
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    // A linearizable read through any replica, retried while an election settles.
    let deadline = Instant::now() + Duration::from_secs(15);
    let all = loop {
        let mut got = None;
        for rep in &r.replicas {
            if let Ok(l) = list_tenants(&rep.local(), false, Duration::from_secs(3)).await {
                got = Some(l);
                break;
            }
        }
        if let Some(l) = got {
            break l;
        }
        assert!(Instant::now() < deadline, "no replica served a linearizable read");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let present: BTreeSet<String> = all.tenants.iter().map(|t| t.id.clone()).collect();
    let g = rec.lock().unwrap();
    let lost: Vec<&String> = g.acked_unique.iter().filter(|k| !present.contains(*k)).collect();
    eprintln!(
        "writes ok={} failed={} reads ok={}; acknowledged unique writes {}; history {} events",
        g.ok_writes,
        g.failed_writes,
        g.ok_reads,
        g.acked_unique.len(),
        g.history.len()
    );
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(g.ok_writes > 50 && g.ok_reads > 20, "the load made progress");
    let t = Instant::now();
    if let Err(e) = linearizability::check(&g.history) {
        let dump = std::env::temp_dir().join("sdn-nonlinearizable-history.txt");
        let text: Vec<String> = g
            .history
            .iter()
            .map(|e| format!("{}\t{:?}\t{}\t{:?}", e.key, e.op, e.call, e.ret))
            .collect();
        std::fs::write(&dump, text.join("\n")).unwrap();
        // And each replica's log, to see who led when.
        for i in 0..r.replicas.len() {
            let _ = std::fs::write(
                std::env::temp_dir().join(format!("sdn-nonlinearizable-c{}.log", i + 1)),
                r.log(i),
            );
        }
        panic!("{e}; history written to {}", dump.display());
    }
    eprintln!("history is linearizable (checked in {:?})", t.elapsed());
}

fn skip() -> bool {
    if !privileged() {
        eprintln!("skipping: needs root");
        return true;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_kills_under_load_lose_nothing_and_stay_linearizable() {
    if skip() {
        return;
    }
    let topo = Topology::new("clk", &["c1", "c2", "c3"]).unwrap();
    let mut r = Replicas::start(&topo, &["c1", "c2", "c3"]).await.unwrap();
    let status = r.status(2).await.unwrap();
    assert_eq!(status.members.iter().filter(|m| m.voter).count(), 3, "{status:?}");

    let addrs: Vec<String> = r.replicas.iter().map(|x| x.local()).collect();
    let rec = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = start_load(addrs, Instant::now(), rec.clone(), stop.clone());
    tokio::time::sleep(Duration::from_millis(800)).await;
    for round in 0..5 {
        let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
        eprintln!("round {round}: SIGKILL leader node {}", l + 1);
        r.kill(l);
        tokio::time::sleep(Duration::from_millis(900)).await;
        r.spawn(l, true).unwrap();
        r.wait_answering(l).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    finish_and_check(&r, &rec, &stop, tasks).await;
}

fn nft_cut(ns: &str, on: bool) {
    if on {
        let rules = "table inet sdncut {\n chain in { type filter hook input priority -10; policy accept; iifname \"ul0\" drop; }\n chain out { type filter hook output priority -10; policy accept; oifname \"ul0\" drop; }\n}\n";
        let f = std::env::temp_dir().join(format!("{ns}-cut.nft"));
        std::fs::write(&f, rules).unwrap();
        sdn_integration::ns_sh(ns, &["nft", "-f", f.to_str().unwrap()]).unwrap();
    } else {
        sdn_integration::ns_sh(ns, &["nft", "delete", "table", "inet", "sdncut"]).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_cut_off_minority_acknowledges_nothing_and_heals() {
    if skip() {
        return;
    }
    let topo = Topology::new("clp", &["c1", "c2", "c3"]).unwrap();
    let r = Replicas::start(&topo, &["c1", "c2", "c3"]).await.unwrap();
    put_tenant(&r.replicas[0].local(), "before", "x", Duration::from_secs(5))
        .await
        .unwrap();
    // Cut off the leader: the worst case, a minority that believed it led.
    let cut = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let others: Vec<usize> = (0..3).filter(|i| *i != cut).collect();
    eprintln!("cutting node {} off with nftables", cut + 1);
    nft_cut(&r.replicas[cut].ns, true);

    // The minority acknowledges nothing, for writes and linearizable reads.
    let mut minority_acks = 0;
    for i in 0..5 {
        if put_tenant(
            &r.replicas[cut].local(),
            &format!("minority{i}"),
            "x",
            Duration::from_secs(2),
        )
        .await
        .is_ok()
        {
            minority_acks += 1;
        }
    }
    assert_eq!(minority_acks, 0, "the cut-off node acknowledged writes");
    assert!(
        list_tenants(&r.replicas[cut].local(), false, Duration::from_secs(2))
            .await
            .is_err(),
        "no linearizable read on the minority"
    );
    let stale = list_tenants(&r.replicas[cut].local(), true, Duration::from_secs(2))
        .await
        .expect("stale reads still answer");
    assert!(stale.tenants.iter().any(|t| t.id == "before"));

    // The majority elects a leader and keeps acknowledging.
    let mut majority_acks = 0;
    for i in 0..10 {
        let addr = r.replicas[others[i % 2]].local();
        if put_tenant(&addr, &format!("majority{i}"), "x", Duration::from_secs(3))
            .await
            .is_ok()
        {
            majority_acks += 1;
        }
    }
    assert!(majority_acks >= 8, "the majority kept working: {majority_acks}/10");

    // Heal: the cut node catches up and serves again.
    nft_cut(&r.replicas[cut].ns, false);
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let a = r.status(others[0]).await.unwrap();
        let b = r.status(cut).await.unwrap();
        if b.revision == a.revision && a.revision > 0 && b.leader_id != 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the healed node did not catch up: {b:?} vs {a:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    put_tenant(&r.replicas[cut].local(), "after", "x", Duration::from_secs(5))
        .await
        .expect("the healed node accepts writes again");
    let l = list_tenants(&r.replicas[cut].local(), false, Duration::from_secs(5))
        .await
        .unwrap();
    let ids: BTreeSet<&str> = l.tenants.iter().map(|t| t.id.as_str()).collect();
    assert!(ids.contains("after") && ids.contains("majority0"));
    assert!(
        !ids.iter().any(|i| i.starts_with("minority")),
        "no minority write survived: {ids:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_replica_catches_up_from_a_snapshot_and_the_log_stays_bounded() {
    if skip() {
        return;
    }
    let topo = Topology::new("cls", &["c1", "c2", "c3"]).unwrap();
    let mut r = Replicas::new(&topo, &["c1", "c2", "c3"]);
    for rep in &mut r.replicas {
        rep.args = vec!["--snapshot-every".into(), "1000".into()];
    }
    r.form().await.unwrap();
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let away = (l + 1) % 3;
    r.stop(away);
    let addr = r.replicas[l].local();
    let mut c = prov_client(&addr).await.unwrap();
    // A state of some megabytes, so the snapshot takes several chunks and
    // each is as large as chunks get: two groups of 10,000 rules.
    let big = |g: &str| {
        let rules = (0..10_000u32)
            .map(|i| {
                let cidr = format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255);
                ingress(&format!("r{i}"), false, "tcp", (443, 443), &cidr, "")
            })
            .collect();
        pb::Operation {
            op: Some(group(g, "t0", rules)),
        }
    };
    c.apply(pb::ApplyRequest {
        operations: vec![pb::Operation { op: Some(tenant("t0")) }, big("big-a"), big("big-b")],
        actor: "load".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    // Enough writes for two snapshots and log purges.
    for i in 0..2300 {
        c.apply(pb::ApplyRequest {
            operations: vec![pb::Operation {
                op: Some(tenant(&format!("t{}", i % 50))),
            }],
            actor: "load".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }
    let s = r.status(l).await.unwrap();
    eprintln!(
        "leader: last log {} purged {} snapshot {}",
        s.last_log_index, s.purged_index, s.snapshot_index
    );
    assert!(
        s.snapshot_index >= 1000 && s.purged_index > 0,
        "snapshots and compaction ran: {s:?}"
    );
    assert!(
        s.last_log_index - s.purged_index <= 1000 + 100 + 50,
        "the log is bounded: {s:?}"
    );

    r.spawn(away, true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let b = r.status(away).await;
        if let Ok(b) = &b {
            if b.revision == s.revision {
                eprintln!(
                    "replica {} caught up: snapshot {} revision {}",
                    away + 1,
                    b.snapshot_index,
                    b.revision
                );
                assert!(b.snapshot_index > 0, "it caught up from a snapshot: {b:?}");
                break;
            }
        }
        assert!(Instant::now() < deadline, "the replica did not catch up: {b:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stale = list_tenants(&r.replicas[away].local(), true, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(stale.tenants.len(), 50);

    // Every replica holds the same audit chain, the one that caught up
    // from a snapshot included: each checks its own copy to the same head.
    let heads: Vec<String> = (0..3)
        .map(|i| {
            let out = sdnctl(&r.replicas[i].local(), &["audit", "verify", "--local"])
                .unwrap_or_else(|e| panic!("replica {}: {e}", i + 1));
            eprintln!("replica {}: {}", i + 1, out.trim());
            let head = out
                .split("head ")
                .nth(1)
                .expect("a head")
                .split_whitespace()
                .next()
                .unwrap();
            head.to_string()
        })
        .collect();
    assert!(heads.iter().all(|h| h == &heads[0] && h.len() == 64), "{heads:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn membership_errors_are_refused_clearly() {
    if skip() {
        return;
    }
    let topo = Topology::new("clm", &["c1", "c2", "c3", "c4"]).unwrap();
    let mut r = Replicas::start(&topo, &["c1", "c2", "c3"]).await.unwrap();
    let mut c = cluster_client(&r.replicas[0].local()).await.unwrap();

    let e = c.promote(pb::MemberRequest { node_id: 9 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains("node 9"), "{e:?}");
    let e = c.remove(pb::MemberRequest { node_id: 9 }).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = c
        .add_learner(pb::AddLearnerRequest {
            node_id: 2,
            addr: r.replicas[1].addr(),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // With one replica down, removing another would leave one of two: refused.
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let down = (l + 1) % 3;
    let other = (l + 2) % 3;
    r.kill(down);
    let mut lc = cluster_client(&r.replicas[l].local()).await.unwrap();
    let e = lc
        .remove(pb::MemberRequest {
            node_id: other as u64 + 1,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("lose quorum"), "{e:?}");
    r.spawn(down, true).unwrap();
    r.wait_answering(down).await.unwrap();

    // A replica whose data directory belongs to another cluster is refused.
    let foreign_dir = topo.dir.join("foreign-data");
    let ns4 = topo.host_ns("c4").name.clone();
    let ip4 = topo.underlay_ip("c4");
    let sock4 = topo.dir.join("c4.sock");
    let mut foreign = Proc::spawn(
        "foreign",
        Some(&ns4),
        &bin("sdn-controller"),
        &[
            "--node-id",
            "4",
            "--data-dir",
            foreign_dir.to_str().unwrap(),
            "--listen",
            &format!("{ip4}:7070"),
            "--listen-unix",
            sock4.to_str().unwrap(),
            "--insecure",
        ],
        &topo.dir,
    )
    .unwrap();
    let faddr = format!("unix://{}", sock4.display());
    for _ in 0..100 {
        if let Ok(mut fc) = cluster_client(&faddr).await {
            if fc.status(pb::ClusterStatusRequest {}).await.is_ok() {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let e = c
        .add_learner(pb::AddLearnerRequest {
            node_id: 4,
            addr: format!("http://{ip4}:7070"),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("holds data of cluster"), "{e:?}");
    foreign.stop();
    // And a data directory of another node id does not start at all.
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns4])
        .arg(bin("sdn-controller"))
        .args([
            "--node-id",
            "7",
            "--data-dir",
            foreign_dir.to_str().unwrap(),
            "--listen",
            &format!("{ip4}:7071"),
            "--insecure",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("holds the data of node 4"), "{err}");
    // The cluster still has its three voters.
    let s = r.status(0).await.unwrap();
    assert_eq!(s.members.iter().filter(|m| m.voter).count(), 3, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rolling_upgrade_and_leader_kill_keep_writes_and_flows() {
    if skip() {
        return;
    }
    let mut topo = Topology::new("clr", &["c1", "c2", "c3", "h1"]).unwrap();
    topo.add_vm("vm1", "h1", "02:00:00:00:00:11", "10.10.0.11/24", "fd10::11/64")
        .unwrap();
    topo.add_vm("vm2", "h1", "02:00:00:00:00:12", "10.10.0.12/24", "fd10::12/64")
        .unwrap();
    let mut r = Replicas::start(&topo, &["c1", "c2", "c3"]).await.unwrap();
    let bpffs = sdn_integration::Bpffs::new(&topo.dir.join("bpffs")).unwrap();
    let controllers: Vec<String> = r.replicas.iter().map(|x| x.addr()).collect();
    let h1 = topo.host_ns("h1").name.clone();
    let _agent = Proc::spawn(
        "agent-h1",
        Some(&h1),
        &bin("sdn-agent"),
        &[
            "run",
            "--host",
            "h1",
            "--controller",
            &controllers.join(","),
            "--pin-dir",
            bpffs.path.join("h1").to_str().unwrap(),
        ],
        &topo.dir,
    )
    .unwrap();
    let web = |alt: bool| {
        let mut rules = vec![
            ingress("ping", false, "icmp", (0, 0), "", ""),
            ingress("http", false, "tcp", (80, 80), "", ""),
        ];
        if alt {
            rules.push(ingress("alt", false, "tcp", (81, 81), "", ""));
        }
        group("web", "t", rules)
    };
    let apply = |addr: String, ops: Vec<pb::operation::Op>| async move {
        let mut c = prov_client(&addr).await.unwrap();
        c.apply(pb::ApplyRequest {
            operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
            actor: "platform".into(),
            wait: true,
            wait_timeout_ms: 15_000,
        })
        .await
    };
    // Provision through a follower: the write is forwarded, and the wait is
    // released by the agent's ack, itself passed on to the leader.
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let follower = r.replicas[(l + 1) % 3].local();
    apply(
        follower.clone(),
        vec![
            tenant("t"),
            vpc("v", "t"),
            subnet("s", "v", "10.10.0.0/24", ""),
            host("h1", "192.168.4.2"),
            web(false),
        ],
    )
    .await
    .unwrap();
    let resp = apply(
        follower.clone(),
        vec![
            port(
                "vm1",
                "t",
                "s",
                "h1",
                "vm1h",
                "02:00:00:00:00:11",
                "10.10.0.11",
                "",
                &["web"],
            ),
            port(
                "vm2",
                "t",
                "s",
                "h1",
                "vm2h",
                "02:00:00:00:00:12",
                "10.10.0.12",
                "",
                &[],
            ),
        ],
    )
    .await
    .expect("ports enforced");
    assert!(resp.into_inner().enforced);

    let vm1 = topo.vm("vm1").ns.name.clone();
    let vm2 = topo.vm("vm2").ns.name.clone();
    let _server = Proc::spawn(
        "server",
        Some(&vm1),
        &bin("sdn-probe"),
        &["serve", "--tcp", "80", "--tcp", "81"],
        &topo.dir,
    )
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let probe81 = || {
        sdn_integration::ns_sh(
            &vm2,
            &[
                bin("sdn-probe").to_str().unwrap(),
                "connect",
                "tcp",
                "10.10.0.11",
                "81",
                "--timeout-ms",
                "500",
            ],
        )
    };
    assert!(probe81().is_err(), "81 is closed before the change");
    let mut hold = Proc::spawn(
        "hold",
        Some(&vm2),
        &bin("sdn-probe"),
        &["hold", "10.10.0.11", "80", "--seconds", "16", "--interval-ms", "50"],
        &topo.dir,
    )
    .unwrap();

    // Steady writes to every replica, recording what was acknowledged.
    let addrs: Vec<String> = r.replicas.iter().map(|x| x.local()).collect();
    let rec = Arc::new(Mutex::new(Record::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tasks = start_load(addrs, Instant::now(), rec.clone(), stop.clone());

    // Rolling upgrade: stop each replica, replace its binary, start it, let it catch up.
    let upgraded = topo.dir.join("sdn-controller-next");
    std::fs::copy(bin("sdn-controller"), &upgraded).unwrap();
    for i in 0..3 {
        eprintln!("upgrading node {}", i + 1);
        r.stop(i);
        tokio::time::sleep(Duration::from_millis(500)).await;
        r.replicas[i].binary = upgraded.clone();
        r.spawn(i, true).unwrap();
        r.wait_answering(i).await.unwrap();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let lead = r.wait_leader(Duration::from_secs(10)).await.unwrap();
            let (a, b) = (r.status(lead).await.unwrap(), r.status(i).await.unwrap());
            if b.last_applied + 20 >= a.last_applied {
                break;
            }
            assert!(Instant::now() < deadline, "node {} did not catch up", i + 1);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // And a leader killed outright.
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    eprintln!("SIGKILL leader node {}", l + 1);
    r.kill(l);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    r.spawn(l, true).unwrap();
    r.wait_answering(l).await.unwrap();

    finish_and_check(&r, &rec, &stop, tasks).await;

    // A policy change after all that is enforced by the agent, which followed the cluster.
    let any = r.replicas[2].local();
    let resp = apply(any, vec![web(true)]).await.expect("enforced after the upgrade");
    assert!(resp.into_inner().enforced);
    assert!(probe81().is_ok(), "the change took effect in traffic");

    // The established connection lived through all of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while hold.alive() {
        assert!(Instant::now() < deadline, "hold probe did not finish");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = hold.log_text();
    eprintln!("hold: {log}");
    assert!(
        log.contains("failed=0"),
        "the established connection lost exchanges:\n{log}"
    );
    let agent_log = std::fs::read_to_string(topo.dir.join("agent-h1.log")).unwrap();
    let watches: Vec<&str> = agent_log.lines().filter(|l| l.contains("watching")).collect();
    eprintln!("agent watches:\n{}", watches.join("\n"));
    assert!(watches.len() >= 2, "the agent moved between replicas");
    assert!(
        watches[1..].iter().all(|l| !l.contains("from_revision=0")),
        "the agent resumed, without a full resync"
    );
    let resumed: usize = (0..3)
        .map(|i| {
            r.log(i)
                .lines()
                .filter(|l| l.contains("watch started") && l.contains("resume=true"))
                .count()
        })
        .sum();
    assert!(resumed >= 1, "a replica served the agent's resumed watch");
    drop(bpffs);
}

/// Runs sdnctl against a replica; returns stdout, or the error output.
fn sdnctl(addr: &str, args: &[&str]) -> Result<String, String> {
    let out = std::process::Command::new(bin("sdnctl"))
        .arg("--controller")
        .arg(addr)
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_replicas_managed_with_sdnctl_survive_two_losses() {
    if skip() {
        return;
    }
    let hosts = ["c1", "c2", "c3", "c4", "c5"];
    let topo = Topology::new("cl5", &hosts).unwrap();
    // Start the first replica, and the others waiting to join.
    let mut r = Replicas::new(&topo, &hosts);
    for i in 0..5 {
        r.spawn(i, i > 0).unwrap();
        r.wait_answering(i).await.unwrap();
    }
    // The administrator grows the cluster with sdnctl, through replica 1.
    let first = r.replicas[0].local();
    for rep in &r.replicas[1..] {
        sdnctl(&first, &["cluster", "add-learner", &rep.id.to_string(), &rep.addr()]).unwrap();
        sdnctl(&first, &["cluster", "promote", &rep.id.to_string()]).unwrap();
    }
    let status = sdnctl(&r.replicas[4].local(), &["cluster", "status"]).unwrap();
    eprintln!("{status}");
    assert_eq!(status.matches(" voter").count(), 5, "{status}");
    assert!(sdnctl(&first, &["cluster", "promote", "9"])
        .unwrap_err()
        .contains("node 9 is not a learner"));

    // Two replicas die, the leader among them: three of five still form a quorum.
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let other = (l + 1) % 5;
    r.kill(l);
    r.kill(other);
    let alive: Vec<usize> = (0..5).filter(|i| *i != l && *i != other).collect();
    let mut acked = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while acked < 5 {
        assert!(Instant::now() < deadline, "the surviving majority did not take writes");
        let addr = r.replicas[alive[acked % alive.len()]].local();
        if put_tenant(&addr, &format!("five{acked}"), "x", Duration::from_secs(2))
            .await
            .is_ok()
        {
            acked += 1;
        } else {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Removing a third replica would leave 2 of 4 reachable: refused.
    let victim = r.replicas[alive[0]].id.to_string();
    let err = sdnctl(&r.replicas[alive[1]].local(), &["cluster", "remove", &victim]).unwrap_err();
    assert!(err.contains("lose quorum"), "{err}");
    // Removing a dead one is fine: four voters remain, three of them alive.
    let dead = r.replicas[other].id.to_string();
    sdnctl(&r.replicas[alive[1]].local(), &["cluster", "remove", &dead]).unwrap();
    let status = sdnctl(&r.replicas[alive[2]].local(), &["cluster", "status"]).unwrap();
    assert_eq!(status.matches(" voter").count(), 4, "{status}");
    let l = list_tenants(&r.replicas[alive[2]].local(), false, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(l.tenants.iter().filter(|t| t.id.starts_with("five")).count(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lagging_follower_forwards_writes_it_cannot_validate_yet() {
    if skip() {
        return;
    }
    let topo = Topology::new("cll", &["c1", "c2", "c3"]).unwrap();
    let r = Replicas::start(&topo, &["c1", "c2", "c3"]).await.unwrap();
    let l = r.wait_leader(Duration::from_secs(10)).await.unwrap();
    let f = (l + 1) % 3;
    // Freeze a follower, create a tenant through the leader, thaw the follower
    // and at once write through it what needs that tenant.
    let pid = r.replicas[f].proc.as_ref().unwrap().pid().unwrap() as i32;
    // SAFETY: signalling a child process of this test.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    put_tenant(&r.replicas[l].local(), "fresh", "x", Duration::from_secs(5))
        .await
        .unwrap();
    unsafe { libc::kill(pid, libc::SIGCONT) };
    let mut c = prov_client(&r.replicas[f].local()).await.unwrap();
    let resp = c
        .apply(pb::ApplyRequest {
            operations: vec![pb::Operation {
                op: Some(vpc("fresh-vpc", "fresh")),
            }],
            actor: "t".into(),
            ..Default::default()
        })
        .await;
    assert!(
        resp.is_ok(),
        "a lagging follower must not refuse against its stale state: {resp:?}"
    );
}
