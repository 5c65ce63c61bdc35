//! The HTTP proxy (`sdn-l7lb`) against nginx and haproxy as reverse
//! proxies, in one run, with the same clients and the same members.
//!
//! Everything runs in a namespace of its own, on its loopback. Two nginx
//! members (one process, one worker, answering `ok` to every GET) and the
//! clients share core 0; the proxy under test has core 1 to itself
//! (`taskset`). Each proxy in its usual configuration for this job:
//! round robin over the two members with kept-alive connections to them,
//! `X-Forwarded-For` added, HTTP/1.1 in clear on one port and HTTP/2 and
//! HTTP/1.1 over TLS (ALPN) on another, one certificate (P-256):
//! - nginx: one worker, `upstream` with `keepalive 64`,
//!   `proxy_http_version 1.1`, `listen ... ssl http2`;
//! - haproxy: `nbthread 1`, `mode http`, `option forwardfor`, its default
//!   `http-reuse safe`, `bind ... ssl crt ... alpn h2,http/1.1`;
//! - ours: the configuration the agent writes for such a listener.
//!
//! Figures:
//! - HTTP/1.1 keep-alive: wrk, 1 thread, 32 connections: requests a
//!   second and the 99th percentile;
//! - HTTP/2 over TLS: h2load, 32 connections, 10 streams each: requests a
//!   second;
//! - TLS handshakes: h2load over HTTP/1.1, 200 connections of one request
//!   each (a full handshake each, no resumption): connections a second.
//!
//! Modes alternate over `ROUNDS` rounds (3) of `SECONDS` (5) each; medians.
//! Run as root after `cargo build --release --workspace --bins`:
//! `cargo run --release -p sdn-integration --example l7_compare`.

use std::path::Path;

use sdn_integration::supervisor::{have, which};
use sdn_integration::{bin, Netns, Proc};
use sdn_l7lb::config as px;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

const MEMBERS: [u16; 2] = [9001, 9002];
const CLEAR: u16 = 8080;
const TLS: u16 = 8443;
const NAME: &str = "bench.test";

fn pinned(ns: &Netns, name: &str, core: &str, program: &Path, args: &[&str], dir: &Path) -> anyhow::Result<Proc> {
    let mut a = vec!["-c", core, program.to_str().unwrap()];
    a.extend_from_slice(args);
    Proc::spawn(name, Some(&ns.name), &which("taskset"), &a, dir)
}

fn members(ns: &Netns, dir: &Path) -> anyhow::Result<Proc> {
    let d = dir.join("members");
    std::fs::create_dir_all(d.join("tmp"))?;
    let servers: String = MEMBERS
        .iter()
        .map(|p| format!("  server {{ listen 127.0.0.1:{p}; keepalive_requests 1000000; location / {{ return 200 \"ok\\n\"; }} }}\n"))
        .collect();
    std::fs::write(
        d.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr;\n\
             events {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  \
             proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n{servers}}}\n",
            d = d.display()
        ),
    )?;
    let conf = d.join("nginx.conf");
    pinned(
        ns,
        "members",
        "0",
        &which("nginx"),
        &["-c", conf.to_str().unwrap(), "-p", d.to_str().unwrap()],
        dir,
    )
}

fn nginx(ns: &Netns, dir: &Path, crt: &Path, key: &Path) -> anyhow::Result<Proc> {
    let d = dir.join("nginx-proxy");
    std::fs::create_dir_all(d.join("tmp"))?;
    let upstream: String = MEMBERS.iter().map(|p| format!("server 127.0.0.1:{p}; ")).collect();
    std::fs::write(
        d.join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\nmaster_process off;\npid {d}/nginx.pid;\nerror_log stderr;\n\
             events {{ worker_connections 8192; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp;\n  \
             proxy_temp_path {d}/tmp;\n  fastcgi_temp_path {d}/tmp;\n  uwsgi_temp_path {d}/tmp;\n  scgi_temp_path {d}/tmp;\n  \
             upstream members {{ {upstream}keepalive 64; keepalive_requests 1000000; }}\n  \
             server {{\n    listen 127.0.0.1:{CLEAR};\n    listen 127.0.0.1:{TLS} ssl http2;\n    server_name {NAME};\n    \
             ssl_certificate {crt};\n    ssl_certificate_key {key};\n    keepalive_requests 1000000;\n    \
             location / {{\n      proxy_pass http://members;\n      proxy_http_version 1.1;\n      \
             proxy_set_header Connection \"\";\n      proxy_set_header Host $host;\n      \
             proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n    }}\n  }}\n}}\n",
            d = d.display(),
            crt = crt.display(),
            key = key.display()
        ),
    )?;
    let conf = d.join("nginx.conf");
    pinned(
        ns,
        "nginx-proxy",
        "1",
        &which("nginx"),
        &["-c", conf.to_str().unwrap(), "-p", d.to_str().unwrap()],
        dir,
    )
}

fn haproxy(ns: &Netns, dir: &Path, pem: &Path) -> anyhow::Result<Proc> {
    let cfg = dir.join("haproxy.cfg");
    let servers: String = MEMBERS
        .iter()
        .enumerate()
        .map(|(i, p)| format!("  server m{i} 127.0.0.1:{p}\n"))
        .collect();
    std::fs::write(
        &cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 8000\n\ndefaults\n  mode http\n  option forwardfor\n  \
             timeout connect 3s\n  timeout client 60s\n  timeout server 60s\n\nfrontend web\n  \
             bind 127.0.0.1:{CLEAR}\n  bind 127.0.0.1:{TLS} ssl crt {pem} alpn h2,http/1.1\n  default_backend members\n\n\
             backend members\n  balance roundrobin\n{servers}",
            pem = pem.display()
        ),
    )?;
    pinned(
        ns,
        "haproxy",
        "1",
        &which("haproxy"),
        &["-db", "-f", cfg.to_str().unwrap()],
        dir,
    )
}

fn ours(ns: &Netns, dir: &Path, crt: &Path, key: &Path) -> anyhow::Result<Proc> {
    let pool = px::Pool {
        name: "members".into(),
        scheduler: px::Scheduler::RoundRobin,
        cookie: None,
        health: None,
        proxy_protocol: None,
        members: MEMBERS
            .iter()
            .enumerate()
            .map(|(i, p)| px::Member {
                name: format!("m{i}"),
                address: format!("127.0.0.1:{p}").parse().unwrap(),
                weight: 1,
            })
            .collect(),
    };
    let listener = |name: &str, port: u16, tls: Option<px::Tls>| px::Listener {
        name: name.into(),
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        tls,
        rules: vec![],
        default_pool: Some("members".into()),
        forwarded: true,
        trusted_proxies: vec![],
    };
    let config = px::Config {
        listeners: vec![
            listener("clear", CLEAR, None),
            listener(
                "tls",
                TLS,
                Some(px::Tls {
                    certificates: vec![px::Certificate {
                        cert: crt.to_path_buf(),
                        key: key.to_path_buf(),
                    }],
                }),
            ),
        ],
        pools: vec![pool],
        timeouts: px::Timeouts::default(),
    };
    let file = dir.join("l7lb.json");
    std::fs::write(&file, serde_json::to_string_pretty(&config)?)?;
    pinned(
        ns,
        "sdn-l7lb",
        "1",
        &bin("sdn-l7lb"),
        &["--config", file.to_str().unwrap()],
        dir,
    )
}

/// Runs a client in the namespace on core 0; its output.
fn client(ns: &Netns, args: &[&str]) -> anyhow::Result<String> {
    let out = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "taskset", "-c", "0"])
        .args(args)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "{args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(text)
}

/// wrk's requests a second and 99th percentile (ms).
fn wrk(ns: &Netns, secs: u64) -> anyhow::Result<(f64, f64)> {
    let out = client(
        ns,
        &[
            "wrk",
            "-t1",
            "-c32",
            &format!("-d{secs}s"),
            "--latency",
            &format!("http://127.0.0.1:{CLEAR}/"),
        ],
    )?;
    anyhow::ensure!(!out.contains("Non-2xx"), "answers other than 2xx: {out}");
    let rps = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rate in {out}"))?;
    let p99 = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("99%"))
        .map(|v| v.trim())
        .and_then(|v| {
            let (n, unit) = v.split_at(v.find(|c: char| c.is_alphabetic())?);
            let n: f64 = n.parse().ok()?;
            Some(match unit {
                "us" => n / 1000.0,
                "ms" => n,
                "s" => n * 1000.0,
                _ => return None,
            })
        })
        .ok_or_else(|| anyhow::anyhow!("no 99th percentile in {out}"))?;
    Ok((rps, p99))
}

/// h2load's requests a second; every request must have succeeded.
fn h2load(ns: &Netns, args: &[&str]) -> anyhow::Result<f64> {
    let mut a = vec!["h2load", "-t1", "--connect-to", "127.0.0.1:8443"];
    a.extend_from_slice(args);
    let url = format!("https://{NAME}/");
    a.push(&url);
    let out = client(ns, &a)?;
    let line = out
        .lines()
        .find(|l| l.starts_with("requests:"))
        .ok_or_else(|| anyhow::anyhow!("no summary in {out}"))?;
    anyhow::ensure!(line.contains(" 0 failed, 0 errored"), "{line}");
    out.lines()
        .find_map(|l| l.strip_prefix("finished in "))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.strip_suffix(" req/s"))
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rate in {out}"))
}

fn main() -> anyhow::Result<()> {
    anyhow::ensure!(sdn_integration::privileged(), "run as root");
    for tool in ["nginx", "haproxy", "wrk", "h2load", "taskset", "openssl"] {
        anyhow::ensure!(have(tool), "{tool} is missing: scripts/setup.sh installs it");
    }
    let rounds = env_or("ROUNDS", 3);
    let secs = env_or("SECONDS", 5);
    let dir = tempfile::tempdir()?;
    let ns = Netns::new("l7c")?;
    let (cert, key) = sdn_integration::ops::self_signed(&[NAME]);
    let (crt, keyf, pem) = (
        dir.path().join("c.pem"),
        dir.path().join("k.pem"),
        dir.path().join("ck.pem"),
    );
    std::fs::write(&crt, &cert)?;
    std::fs::write(&keyf, &key)?;
    std::fs::write(&pem, format!("{cert}{key}"))?;
    let _members = members(&ns, dir.path())?;
    let modes = ["ours", "nginx", "haproxy"];
    let mut figures: Vec<[Vec<f64>; 4]> = modes.iter().map(|_| Default::default()).collect();
    for round in 0..rounds {
        for (m, mode) in modes.iter().enumerate() {
            let mut p = match *mode {
                "ours" => ours(&ns, dir.path(), &crt, &keyf)?,
                "nginx" => nginx(&ns, dir.path(), &crt, &keyf)?,
                _ => haproxy(&ns, dir.path(), &pem)?,
            };
            // Serving: a request answered in clear.
            let t0 = std::time::Instant::now();
            while client(
                &ns,
                &["curl", "-sf", "--max-time", "1", &format!("http://127.0.0.1:{CLEAR}/")],
            )
            .is_err()
            {
                anyhow::ensure!(t0.elapsed().as_secs() < 10, "{mode} never answered: {}", p.log_text());
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            let (rps, p99) = wrk(&ns, secs)?;
            let h2 = h2load(&ns, &["-c32", "-m10", "-D", &secs.to_string()])?;
            // Full handshakes: one request per connection, runs of 200.
            let mut hs = Vec::new();
            for _ in 0..(secs * 2).max(1) {
                hs.push(h2load(&ns, &["--h1", "-c200", "-n200"])?);
            }
            let hs = median(&mut hs);
            eprintln!(
                "[l7] round {round} {mode}: HTTP/1.1 {rps:.0} req/s p99 {p99:.2} ms, HTTP/2+TLS {h2:.0} req/s, handshakes {hs:.0}/s"
            );
            for (k, v) in [rps, p99, h2, hs].into_iter().enumerate() {
                figures[m][k].push(v);
            }
            p.stop();
        }
    }
    let med: Vec<[f64; 4]> = figures
        .iter_mut()
        .map(|f| {
            [
                median(&mut f[0]),
                median(&mut f[1]),
                median(&mut f[2]),
                median(&mut f[3]),
            ]
        })
        .collect();
    println!("| proxy (one core) | HTTP/1.1 keep-alive req/s | p99 ms | HTTP/2 over TLS req/s | TLS handshakes/s |");
    println!("|---|---|---|---|---|");
    for (m, mode) in modes.iter().enumerate() {
        let f = med[m];
        println!("| {mode} | {:.0} | {:.2} | {:.0} | {:.0} |", f[0], f[1], f[2], f[3]);
    }
    for (m, mode) in modes.iter().enumerate().skip(1) {
        println!(
            "ours / {mode}: HTTP/1.1 {:.2}x, p99 {:.2}x, HTTP/2+TLS {:.2}x, handshakes {:.2}x",
            med[0][0] / med[m][0],
            med[0][1] / med[m][1],
            med[0][2] / med[m][2],
            med[0][3] / med[m][3]
        );
    }
    Ok(())
}
