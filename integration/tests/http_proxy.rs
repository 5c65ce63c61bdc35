//! The HTTP proxies the agents run, with real traffic: a client VM reaches
//! an HTTP and an HTTPS listener through the load balancer's VIP (IPv4 and
//! IPv6), served by two proxy ports on two hosts. curl and h2load speak
//! HTTP/1.1 and HTTP/2, plain and over TLS with two certificates chosen by
//! SNI; rules route by path and host; an inserted cookie keeps a client on
//! its member whichever proxy it reaches; members killed or cut off by
//! their security group are left out until they are back. The agents keep
//! their proxies running: a proxy killed is restarted, a changed listener
//! reloaded in place, a replaced binary and a restarted agent take the
//! listening sockets over without refusing a connection, and a listener
//! removed takes its proxies, namespaces, devices and key files away. A
//! device of the port's name that the agent did not make is not touched.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use sdn_integration::lab::Lab;
use sdn_integration::ops::*;
use sdn_integration::privileged;
use sdn_proto::v1 as pb;

const VIP4: &str = "10.82.0.100";
const VIP6: &str = "fd82::100";

fn https_listener(rules: Vec<pb::HttpRule>, proxies: &[&str]) -> pb::operation::Op {
    pb::operation::Op::PutHttpListener(pb::HttpListener {
        rules,
        cookie_name: "SRV".into(),
        cookie_mode: "insert".into(),
        ..http_listener("https", "lb", 443, "web", &["portal", "api"], proxies)
    })
}

fn rules() -> Vec<pb::HttpRule> {
    vec![
        pb::HttpRule {
            name: "api".into(),
            path_prefix: "/api/".into(),
            pool_id: "api".into(),
            ..Default::default()
        },
        pb::HttpRule {
            name: "moved".into(),
            host: "www.portal.gov.test".into(),
            redirect_location: "https://portal.gov.test/".into(),
            redirect_status: 301,
            ..Default::default()
        },
    ]
}

/// Requests `url` from the client VM every 50 ms on a new connection each
/// until told to stop; the answers that were not 200.
fn keep_asking(
    ns: String,
    url: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<(u32, Vec<String>)> {
    std::thread::spawn(move || {
        let (mut n, mut bad) = (0, Vec::new());
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let out = std::process::Command::new("ip")
                .args([
                    "netns",
                    "exec",
                    &ns,
                    "curl",
                    "-sS",
                    "--max-time",
                    "3",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ])
                .output()
                .expect("curl runs");
            n += 1;
            let code = String::from_utf8_lossy(&out.stdout).to_string();
            if code != "200" {
                bad.push(format!("{code} {}", String::from_utf8_lossy(&out.stderr).trim()));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        (n, bad)
    })
}

#[tokio::test]
async fn http_listeners_are_served_through_the_vip_by_proxies_the_agents_run() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    // The proxy's binary as the agents run it, in a place of the test's
    // own: replacing it upgrades the proxies.
    let bins = tempfile::tempdir().unwrap();
    let l7lb = bins.path().join("sdn-l7lb");
    std::fs::copy(sdn_integration::bin("sdn-l7lb"), &l7lb).unwrap();
    let mut lab = Lab::new("l7p", &["h1", "h2"])
        .tenant("t")
        .vpc("v", None)
        .subnet("net", "v", "10.82.0.0/24", "fd82::/64")
        .group("open", open_rules())
        .group("closed", vec![])
        .vm("c1", "h1", "net", &["open"])
        .vm("b1", "h1", "net", &["open"])
        .vm("b2", "h2", "net", &["open"])
        .vm("b3", "h2", "net", &["open"])
        .agent_args(&["--l7lb-binary", l7lb.to_str().unwrap(), "--proxy-drain-secs", "3"])
        .start()
        .await
        .expect("the lab");
    let mut servers: Vec<_> = ["b1", "b2", "b3"].iter().map(|b| lab.nginx(b)).collect();
    let client = lab.topo.vm("c1").ns.name.clone();
    let curl = |args: &[&str]| -> anyhow::Result<String> {
        lab.topo
            .vm("c1")
            .ns
            .sh(&[&["curl", "-sS", "--max-time", "5"][..], args].concat())
    };
    let dir = lab.topo.dir.clone();
    let (portal_pem, portal_key) = self_signed(&["portal.gov.test", "www.portal.gov.test"]);
    let (api_pem, api_key) = self_signed(&["api.gov.test"]);
    std::fs::write(dir.join("portal.pem"), &portal_pem).unwrap();
    std::fs::write(dir.join("api.pem"), &api_pem).unwrap();
    let (portal_ca, api_ca) = (dir.join("portal.pem"), dir.join("api.pem"));
    let (portal_ca, api_ca) = (portal_ca.to_str().unwrap(), api_ca.to_str().unwrap());

    // A device of x3's name on h2 that no agent made.
    lab.topo
        .host_ns("h2")
        .sh(&["ip", "link", "add", "l7px3", "type", "veth", "peer", "name", "l7px3p"])
        .unwrap();

    let proxy_port = |id: &str, host: &str, n: u8| {
        port(
            id,
            "t",
            "net",
            host,
            &format!("l7p{id}"),
            &format!("02:1c:00:00:00:{n:02x}"),
            &format!("10.82.0.{n}"),
            &format!("fd82::{n}"),
            &["open"],
        )
    };
    let health = pb::HealthCheck {
        probe: "http".into(),
        http_path: "/".into(),
        status_min: 200,
        status_max: 399,
        interval_ms: 300,
        timeout_ms: 250,
        rise: 2,
        fall: 2,
    };
    let mut ops = vec![
        proxy_port("x1", "h1", 21),
        proxy_port("x2", "h2", 22),
        proxy_port("x3", "h2", 23),
        certificate("portal", "t", &portal_pem, &portal_key),
        certificate("api", "t", &api_pem, &api_key),
        put_lb(load_balancer("lb", "t", "v", VIP4, VIP6)),
    ];
    for (p, members) in [("web", &["b1", "b2"][..]), ("api", &["b3"][..])] {
        let mut op = pool(p, "lb");
        if let pb::operation::Op::PutPool(x) = &mut op {
            x.health = Some(health.clone());
        }
        ops.push(op);
        for b in members {
            let mut m = member(&format!("{p}-{b}"), p, b, "", 1);
            if let pb::operation::Op::PutMember(x) = &mut m {
                x.port = 8080;
            }
            ops.push(m);
        }
    }
    ops.push(https_listener(rules(), &["x1", "x2"]));
    ops.push(pb::operation::Op::PutHttpListener(http_listener(
        "http",
        "lb",
        80,
        "web",
        &[],
        &["x1", "x2"],
    )));
    let r = lab.cluster.apply(ops).await.expect("the listeners");
    assert!(r.enforced, "{r:?}");

    // Each proxy port's host runs its proxy in a namespace of its own.
    let slots = lab.cluster.proxy_slots();
    assert_eq!(slots.len(), 2, "{slots:?}");
    let slot_of = |port: &str| -> String {
        slots
            .iter()
            .find(|s| {
                let owner = std::fs::read_to_string(lab.cluster.proxy_dir().join(s).join("owner")).unwrap();
                serde_json::from_str::<serde_json::Value>(&owner).unwrap()["port"] == port
            })
            .expect("a slot of the port")
            .clone()
    };
    let (s1, s2) = (slot_of("x1"), slot_of("x2"));
    // Keys are root's alone.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let d = lab.cluster.proxy_dir().join(&s1);
        assert_eq!(std::fs::metadata(&d).unwrap().permissions().mode() & 0o777, 0o700);
        let keys: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .flatten()
            .filter(|e| e.path().extension().is_some_and(|x| x == "key"))
            .collect();
        assert_eq!(keys.len(), 2, "one key per certificate");
        for k in keys {
            assert_eq!(k.metadata().unwrap().permissions().mode() & 0o777, 0o600);
        }
    }

    // The proxies answer once their members' health checks passed.
    let t0 = Instant::now();
    // Both proxies (new connections spread over them), each with members
    // up.
    let answered = || {
        (0..8).all(|_| {
            curl(&[
                &format!("http://{VIP4}/"),
                &format!("http://10.82.0.21/"),
                "http://10.82.0.22/",
            ])
            .is_ok_and(|b| b.lines().all(|l| l.starts_with('b')))
        })
    };
    while !answered() {
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "the proxies never answered: {}",
            lab.cluster.agent_log("h1")
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    eprintln!("proxies answered in {} ms", t0.elapsed().as_millis());

    // Plain HTTP over both families: the member sees a proxy's address.
    for url in [format!("http://{VIP4}/"), format!("http://[{VIP6}]/")] {
        let body = curl(&["-g", &url]).unwrap();
        let (who, from) = body.trim().split_once(' ').unwrap();
        assert!(["b1", "b2"].contains(&who), "{body}");
        assert!(["10.82.0.21", "10.82.0.22"].contains(&from), "from a proxy: {body}");
    }

    // HTTPS: each name gets its own certificate (verified against it
    // alone), over HTTP/2 and HTTP/1.1, both families.
    for (vip, v) in [(VIP4.to_string(), "4"), (format!("[{VIP6}]"), "6")] {
        for (name, ca, other) in [
            ("portal.gov.test", portal_ca, api_ca),
            ("api.gov.test", api_ca, portal_ca),
        ] {
            let resolve = format!("{name}:443:{vip}");
            let url = format!("https://{name}/");
            let h2 = curl(&["--cacert", ca, "--resolve", &resolve, "-w", "%{http_version}", &url]).unwrap();
            assert!(h2.ends_with("\n2"), "IPv{v} {name} over HTTP/2: {h2}");
            let h1 = curl(&[
                "--http1.1",
                "--cacert",
                ca,
                "--resolve",
                &resolve,
                "-w",
                "%{http_version}",
                &url,
            ])
            .unwrap();
            assert!(h1.ends_with("\n1.1"), "IPv{v} {name} over HTTP/1.1: {h1}");
            let wrong = curl(&["--cacert", other, "--resolve", &resolve, &url]);
            assert!(
                wrong.is_err(),
                "{name} must not verify against the other name's certificate"
            );
        }
    }

    // Rules: a path to its pool, a host redirected (a name of the
    // certificate: a host no certificate names is answered 421).
    let api = curl(&[
        "--cacert",
        api_ca,
        "--resolve",
        &format!("api.gov.test:443:{VIP4}"),
        "https://api.gov.test/api/v1",
    ])
    .unwrap();
    assert!(api.starts_with("b3 "), "/api/ goes to the api pool: {api}");
    let moved = curl(&[
        "--cacert",
        portal_ca,
        "--resolve",
        &format!("www.portal.gov.test:443:{VIP4}"),
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        "https://www.portal.gov.test/x",
    ])
    .unwrap();
    assert_eq!(moved, "301 https://portal.gov.test/");

    // Persistence: without the cookie, both members; with it, one, through
    // whichever proxy a connection reaches.
    let portal = |extra: &[&str]| -> String {
        let mut a = vec!["--cacert", portal_ca, "--resolve", "portal.gov.test:443:10.82.0.100"];
        a.extend_from_slice(extra);
        a.push("https://portal.gov.test/");
        curl(&a).unwrap()
    };
    let seen: BTreeSet<String> = (0..12).map(|_| portal(&[])[..2].to_string()).collect();
    assert_eq!(
        seen,
        BTreeSet::from(["b1".to_string(), "b2".to_string()]),
        "round robin without a cookie"
    );
    let jar = dir.join("jar");
    let jar = jar.to_str().unwrap();
    let first = portal(&["-c", jar, "-b", jar])[..2].to_string();
    let mut proxies_seen = BTreeSet::new();
    for _ in 0..12 {
        let b = portal(&["-b", jar]);
        assert_eq!(&b[..2], first, "the cookie keeps the member: {b}");
        proxies_seen.insert(b.trim().split(' ').nth(1).unwrap().to_string());
    }
    assert_eq!(
        proxies_seen.len(),
        2,
        "both proxies honour the cookie: {proxies_seen:?}"
    );

    // h2load: HTTP/2 over TLS, and HTTP/1.1, every request answered.
    for (args, what) in [
        (
            vec![
                "--connect-to",
                "10.82.0.100:443",
                "-n",
                "400",
                "-c",
                "4",
                "-m",
                "8",
                "https://portal.gov.test/",
            ],
            "HTTP/2 over TLS",
        ),
        (vec!["--h1", "-n", "400", "-c", "4", "http://10.82.0.100/"], "HTTP/1.1"),
    ] {
        let out = lab.topo.vm("c1").ns.sh(&[&["h2load"][..], &args].concat()).unwrap();
        assert!(out.contains("400 succeeded, 0 failed, 0 errored"), "{what}: {out}");
    }

    // A member killed is left out, and taken back when it answers again.
    let only = |who: &str, why: &str| {
        let t0 = Instant::now();
        loop {
            let got: Vec<String> = (0..8)
                .map(|_| curl(&[&format!("http://{VIP4}/")]).unwrap_or_default())
                .collect();
            if got.iter().all(|b| b.starts_with(who)) {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "{why}: {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let both = |why: &str| {
        let t0 = Instant::now();
        loop {
            let got: BTreeSet<String> = (0..8)
                .filter_map(|_| curl(&[&format!("http://{VIP4}/")]).ok())
                .map(|b| b[..2].to_string())
                .collect();
            if got.len() == 2 {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(15), "{why}: {got:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    servers[0].kill();
    only("b2", "b1 killed");
    servers[0] = lab.nginx("b1");
    both("b1 back");
    // Cut off by its security group, then let in again.
    let r = lab.cluster.apply(vec![lab.port("b2", &["closed"])]).await.unwrap();
    assert!(r.enforced);
    only("b1", "b2 cut off");
    let r = lab.cluster.apply(vec![lab.port("b2", &["open"])]).await.unwrap();
    assert!(r.enforced);
    both("b2 let in again");

    // A proxy killed is restarted by its agent.
    let x1 = "http://10.82.0.21/";
    let before = lab.cluster.proxy_pids(&s1);
    assert_eq!(before.len(), 1, "one proxy in x1's slot: {before:?}");
    for p in &before {
        unsafe { libc::kill(*p as i32, libc::SIGKILL) };
    }
    let t0 = Instant::now();
    while !curl(&[x1]).is_ok_and(|b| b.starts_with('b')) {
        assert!(t0.elapsed() < Duration::from_secs(10), "x1's proxy was not restarted");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(lab.cluster.agent_log("h1").contains("HTTP proxy exited; restarting it"));
    let running = lab.cluster.proxy_pids(&s1);
    assert!(running.len() == 1 && running != before, "{running:?}");

    // A listener changed: the proxies reload in place.
    let mut more = rules();
    more.push(pb::HttpRule {
        name: "status".into(),
        path_prefix: "/status".into(),
        respond_status: 200,
        respond_body: "served by the proxy\n".into(),
        respond_content_type: "text/plain".into(),
        ..Default::default()
    });
    let r = lab
        .cluster
        .apply(vec![https_listener(more, &["x1", "x2"])])
        .await
        .unwrap();
    assert!(r.enforced);
    let t0 = Instant::now();
    loop {
        let got = curl(&[
            "--cacert",
            portal_ca,
            "--resolve",
            "portal.gov.test:443:10.82.0.21",
            "https://portal.gov.test/status",
        ])
        .unwrap_or_default();
        if got == "served by the proxy\n" {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the new rule was not served: {got:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(lab.cluster.proxy_pids(&s1), running, "reloaded, not restarted");

    // The binary replaced: a new process takes the sockets over; no
    // request is refused meanwhile.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let asking = keep_asking(client.clone(), x1.to_string(), stop.clone());
    std::thread::sleep(Duration::from_millis(500));
    let fresh = bins.path().join("sdn-l7lb.new");
    std::fs::copy(&l7lb, &fresh).unwrap();
    std::fs::rename(&fresh, &l7lb).unwrap();
    let t0 = Instant::now();
    loop {
        let now = lab.cluster.proxy_pids(&s1);
        if now.len() == 1 && now.is_disjoint(&running) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "x1's proxy was not upgraded: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    // The agent restarted: the proxy serves while it is down, and the new
    // agent's proxy takes the sockets over.
    let upgraded = lab.cluster.proxy_pids(&s1);
    lab.cluster.agent("h1").kill();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(lab.cluster.proxy_pids(&s1), upgraded, "the proxy outlives its agent");
    lab.cluster.start_agent(&lab.topo, "h1").unwrap();
    let t0 = Instant::now();
    loop {
        let now = lab.cluster.proxy_pids(&s1);
        if now.len() == 1 && now.is_disjoint(&upgraded) {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the new agent did not take x1's proxy over: {now:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (n, bad) = asking.join().unwrap();
    eprintln!("{n} requests across an upgrade and an agent restart");
    assert!(n > 20 && bad.is_empty(), "{n} requests, refused or failed: {bad:?}");
    // Taken over twice: by the upgrade, then by the restarted agent's proxy.
    let took = lab
        .cluster
        .agent_log("h1")
        .matches("took the running proxy's listening sockets")
        .count();
    assert!(took >= 2, "sockets taken over {took} times");

    // A device of the port's name that the agent did not make: the proxy
    // is refused, the device untouched.
    let refused = lab
        .cluster
        .apply(vec![https_listener(rules(), &["x1", "x2", "x3"])])
        .await
        .expect_err("x3's device is not the agent's");
    assert!(
        refused
            .message()
            .contains("HTTP proxy on port x3: device l7px3 exists and is not this agent's proxy device"),
        "{refused:?}"
    );
    let dummy = lab
        .topo
        .host_ns("h2")
        .sh(&["ip", "-d", "link", "show", "l7px3"])
        .unwrap();
    assert!(dummy.contains("veth") && !dummy.contains("alias"), "{dummy}");
    assert_eq!(
        lab.cluster.proxy_slots().len(),
        2,
        "x3's slot, refused, is not left behind"
    );

    // Listeners removed: proxies, namespaces, devices and keys go.
    let r = lab
        .cluster
        .apply(vec![
            delete(pb::Kind::HttpListener, "https"),
            delete(pb::Kind::HttpListener, "http"),
        ])
        .await
        .unwrap();
    assert!(r.enforced, "{r:?}");
    let t0 = Instant::now();
    while !lab.cluster.proxy_slots().is_empty() {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "slots left: {:?}",
            lab.cluster.proxy_slots()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for s in [&s1, &s2] {
        assert!(lab.cluster.proxy_pids(s).is_empty(), "a proxy of {s} still runs");
    }
    for (h, dev) in [("h1", "l7px1"), ("h2", "l7px2")] {
        assert!(
            lab.topo.host_ns(h).sh(&["ip", "link", "show", dev]).is_err(),
            "{dev} left on {h}"
        );
    }
    assert!(
        lab.topo.host_ns("h2").sh(&["ip", "link", "show", "l7px3"]).is_ok(),
        "not the agent's, kept"
    );
    assert!(
        curl(&[&format!("http://{VIP4}/")]).is_err(),
        "nothing serves the VIP's port 80 any more"
    );
}
