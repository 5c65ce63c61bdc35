//! What mutual TLS costs a write: one controller served with certificates
//! (the production form) against the same controller `--insecure`, in
//! alternating rounds of the same run. Each round: `Apply` one at a time
//! (p50, p99), 64 clients at once (writes/s), and a new connection per call
//! (the handshake).
//!
//! `ROUNDS` (default 3), `SECONDS` per measurement (default 4).

use std::time::{Duration, Instant};

use sdn_integration::cluster::Cluster;
use sdn_integration::ops::tenant;
use sdn_proto::v1 as pb;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn write(id: &str) -> pb::ApplyRequest {
    pb::ApplyRequest {
        operations: vec![pb::Operation { op: Some(tenant(id)) }],
        actor: String::new(),
        wait: false,
        wait_timeout_ms: 0,
    }
}

struct Figures {
    p50: Duration,
    p99: Duration,
    per_s_64: f64,
    connect_call: Duration,
}

async fn measure(c: &Cluster, secs: u64) -> anyhow::Result<Figures> {
    let span = Duration::from_secs(secs);
    // One client, one call at a time.
    let mut client = c.client().await?;
    let mut lat = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < span {
        let t = Instant::now();
        client.apply(write("solo")).await?;
        lat.push(t.elapsed());
    }
    lat.sort();
    // 64 clients, each on its own connection.
    let mut tasks = Vec::new();
    for i in 0..64 {
        let mut cl = c.client().await?;
        tasks.push(tokio::spawn(async move {
            let id = format!("t{i}");
            let t0 = Instant::now();
            let mut n = 0u64;
            while t0.elapsed() < span {
                if cl.apply(write(&id)).await.is_ok() {
                    n += 1;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await?;
    }
    // A new connection for each call: the handshake's cost.
    let mut conn = Vec::new();
    let t0 = Instant::now();
    while t0.elapsed() < span / 2 {
        let t = Instant::now();
        let mut cl = c.client().await?;
        cl.list(pb::ListRequest { kind: 1, stale: true }).await?;
        conn.push(t.elapsed());
    }
    conn.sort();
    Ok(Figures {
        p50: pct(&lat, 0.5),
        p99: pct(&lat, 0.99),
        per_s_64: total as f64 / secs as f64,
        connect_call: pct(&conn, 0.5),
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    anyhow::ensure!(sdn_integration::privileged(), "needs root (the harness mounts bpffs)");
    let rounds = env("ROUNDS", 3);
    let secs = env("SECONDS", 4);
    let mut rows: Vec<(&str, Figures)> = Vec::new();
    for round in 0..rounds {
        for secure in [true, false] {
            let dir = std::env::temp_dir().join(format!("sdn-tls-compare-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir)?;
            let c = if secure {
                Cluster::start_secure(&dir)?
            } else {
                Cluster::start(&dir)?
            };
            let f = measure(&c, secs).await?;
            let name = if secure { "mutual TLS" } else { "plaintext" };
            eprintln!(
                "round {}: {name:<10} apply p50 {:>7.3} ms  p99 {:>7.3} ms  64 clients {:>8.0} writes/s  connect+call {:>7.3} ms",
                round + 1,
                f.p50.as_secs_f64() * 1e3,
                f.p99.as_secs_f64() * 1e3,
                f.per_s_64,
                f.connect_call.as_secs_f64() * 1e3
            );
            rows.push((name, f));
            drop(c);
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
    let median = |name: &str, f: &dyn Fn(&Figures) -> f64| {
        let mut v: Vec<f64> = rows.iter().filter(|(n, _)| *n == name).map(|(_, x)| f(x)).collect();
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        v[v.len() / 2]
    };
    println!("median of {rounds} round(s) of {secs} s, modes alternating:");
    println!(
        "  {:<12} {:>10} {:>10} {:>14} {:>14}",
        "", "p50 ms", "p99 ms", "64 clients/s", "connect+call ms"
    );
    for name in ["mutual TLS", "plaintext"] {
        println!(
            "  {:<12} {:>10.3} {:>10.3} {:>14.0} {:>14.3}",
            name,
            median(name, &|f| f.p50.as_secs_f64() * 1e3),
            median(name, &|f| f.p99.as_secs_f64() * 1e3),
            median(name, &|f| f.per_s_64),
            median(name, &|f| f.connect_call.as_secs_f64() * 1e3),
        );
    }
    let r = |f: &dyn Fn(&Figures) -> f64| median("mutual TLS", f) / median("plaintext", f);
    println!(
        "  TLS / plaintext: p50 {:.2}, p99 {:.2}, 64-client throughput {:.2}, connect+call {:.2}",
        r(&|f| f.p50.as_secs_f64()),
        r(&|f| f.p99.as_secs_f64()),
        r(&|f| f.per_s_64),
        r(&|f| f.connect_call.as_secs_f64()),
    );
    Ok(())
}
