//! Enforcement latency: the time from an API call to the change taking
//! effect in real traffic, over 100 rule changes, p50 and p99.
//!
//! Each round opens TCP 80 on vm1's security group (apply without waiting)
//! and times until a connection from vm2 succeeds, then closes it again with
//! `wait` and times until the agent acknowledged enforcement.
//!
//! Run as root after `cargo build --workspace --bins`:
//! `cargo run -p sdn-integration --example enforcement_latency`

use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sdn_integration::enter_netns;
use sdn_integration::lab::{Lab, TENANT};
use sdn_integration::ops::*;
use sdn_proto::v1 as pb;

fn rules(http: bool) -> Vec<pb::SecurityGroupRule> {
    let mut r = vec![ingress("ping", false, "icmp", (0, 0), "", "")];
    if http {
        r.push(ingress("http", false, "tcp", (80, 80), "", ""));
    }
    r
}

fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::var("ROUNDS").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    // vm1 (10.10.0.11) with the group under change, vm2 in none.
    let Lab { topo, cluster, .. } = Lab::new("lat", &["h1"])
        .vpc("v", None)
        .subnet("s", "v", "10.10.0.0/24", "")
        .group("web", rules(false))
        .vm("vm1", "h1", "s", &["web"])
        .vm("vm2", "h1", "s", &[])
        .start()
        .await?;
    let _server = topo.serve(&["vm1"], &[], &["--tcp", "80"])?;

    // A thread inside vm2 that, on request, connects until one succeeds.
    let (req_tx, req_rx) = mpsc::channel::<Instant>();
    let (res_tx, res_rx) = mpsc::channel::<Duration>();
    let vm2 = topo.vm("vm2").ns.name.clone();
    std::thread::spawn(move || {
        enter_netns(&vm2).expect("enter vm2");
        let dst: SocketAddr = "10.10.0.11:80".parse().unwrap();
        for start in req_rx {
            loop {
                if TcpStream::connect_timeout(&dst, Duration::from_millis(1)).is_ok() {
                    break;
                }
                if start.elapsed() > Duration::from_secs(10) {
                    break;
                }
            }
            res_tx.send(start.elapsed()).unwrap();
        }
    });

    let mut client = cluster.client().await?;
    let apply = |http: bool, wait: bool| pb::ApplyRequest {
        operations: vec![pb::Operation {
            op: Some(group("web", TENANT, rules(http))),
        }],
        actor: "bench".into(),
        wait,
        wait_timeout_ms: 10_000,
    };
    let (mut open_ms, mut close_ack_ms) = (Vec::new(), Vec::new());
    for i in 0..rounds {
        let start = Instant::now();
        req_tx.send(start)?;
        client.apply(apply(true, false)).await?;
        let d = res_rx.recv()?;
        anyhow::ensure!(d < Duration::from_secs(10), "round {i}: traffic never passed");
        open_ms.push(d.as_secs_f64() * 1000.0);
        let t = Instant::now();
        client.apply(apply(false, true)).await?;
        close_ack_ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    println!("rounds: {rounds}");
    println!(
        "API call -> traffic passes (open):   p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(&mut open_ms, 0.5),
        pct(&mut open_ms, 0.99),
        pct(&mut open_ms, 1.0)
    );
    println!(
        "API call -> agent acked (apply --wait, close): p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms",
        pct(&mut close_ack_ms, 0.5),
        pct(&mut close_ack_ms, 0.99),
        pct(&mut close_ack_ms, 1.0)
    );
    Ok(())
}
