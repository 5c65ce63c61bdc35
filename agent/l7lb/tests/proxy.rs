//! The proxy against real peers on loopback: nginx members, curl as the
//! client (HTTP/1.1, HTTP/2 in clear and over TLS), openssl for the
//! certificates each SNI name gets.

use std::io::Write as _;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child killed on drop.
struct Kid(Child);

impl Drop for Kid {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn wait_port(port: u16) {
    let t0 = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t0.elapsed() < Duration::from_secs(10), "nothing listens on {port}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx as member `name` on `port` (`listen` options after the address,
/// then the `server` block's `locations`), in a directory of its own.
fn run_nginx(dir: &Path, name: &str, port: u16, listen: &str, locations: &str) -> Kid {
    let d = dir.join(format!("nginx-{name}"));
    std::fs::create_dir_all(&d).unwrap();
    let conf = format!(
        "master_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{}}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{\n    listen 127.0.0.1:{port}{listen};\n{locations}\n  }}\n}}\n",
        d = d.display()
    );
    std::fs::write(d.join("nginx.conf"), conf).unwrap();
    let child = Command::new("nginx")
        .args(["-p", d.to_str().unwrap(), "-c", d.join("nginx.conf").to_str().unwrap()])
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nginx");
    wait_port(port);
    Kid(child)
}

/// nginx on `port`, answering every request with its name, how many
/// requests its connection carried, and the forwarding headers it got;
/// it sets a session cookie of its own (`SESS`). `/health` is the file
/// [`set_health`] writes.
fn nginx(dir: &Path, name: &str, port: u16) -> Kid {
    let www = dir.join(format!("nginx-{name}")).join("www");
    if !www.exists() {
        set_health(dir, name, Some("ok"));
    }
    let locations = format!(
        "    location = /health {{\n      root {www};\n      default_type text/plain;\n    }}\n    location / {{\n\
         add_header Set-Cookie \"SESS={name}-$request_id; Path=/\";\n\
         return 200 \"{name} reqs=$connection_requests uri=$request_uri xff=[$http_x_forwarded_for] \
         fwd=[$http_forwarded] host=[$http_host] proto=[$http_x_forwarded_proto] real=[$http_x_real_ip]\\n\";\n    }}",
        www = www.display()
    );
    run_nginx(dir, name, port, "", &locations)
}

/// What member `name`'s `/health` answers: 200 with `body`, or 404.
fn set_health(dir: &Path, name: &str, body: Option<&str>) {
    let www = dir.join(format!("nginx-{name}")).join("www");
    std::fs::create_dir_all(&www).unwrap();
    match body {
        Some(b) => std::fs::write(www.join("health"), b).unwrap(),
        None => {
            let _ = std::fs::remove_file(www.join("health"));
        }
    }
}

/// A self-signed certificate for `names` (the first is its CN).
fn cert(dir: &Path, file: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let (c, k) = (dir.join(format!("{file}.pem")), dir.join(format!("{file}.key")));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let st = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .args(["-subj", &format!("/CN={}", names[0])])
        .args(["-addext", &format!("subjectAltName={}", san.join(","))])
        .args(["-keyout", k.to_str().unwrap(), "-out", c.to_str().unwrap()])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "openssl req");
    (c, k)
}

/// The subject of the certificate the proxy shows for `sni`.
fn subject(port: u16, sni: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "openssl s_client -connect 127.0.0.1:{port} -servername {sni} </dev/null 2>/dev/null | openssl x509 -noout -subject"
        ))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// curl with `args`; its output (body, then what `-w` asks).
fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-m", "5"])
        .args(args)
        .output()
        .unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn first_word(s: &str) -> String {
    s.split_whitespace().next().unwrap_or("").to_string()
}

struct Lb {
    child: Kid,
    config: PathBuf,
    log: PathBuf,
}

impl Lb {
    fn start(dir: &Path, config: &str, port: u16) -> Lb {
        let lb = Lb::spawn(dir, "l7lb", config, &[]);
        wait_port(port);
        lb
    }

    /// The proxy as process `name` (its files named so), with `extra`
    /// arguments; not waited for.
    fn spawn(dir: &Path, name: &str, config: &str, extra: &[&str]) -> Lb {
        let path = dir.join(format!("{name}.json"));
        std::fs::write(&path, config).unwrap();
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sdn-l7lb"))
            .args(["--config", path.to_str().unwrap()])
            .args(extra)
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Lb {
            child: Kid(child),
            config: path,
            log,
        }
    }

    fn said(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits for the process to exit by itself: whether it succeeded.
    fn exits_within(&mut self, limit: Duration) -> bool {
        let t0 = Instant::now();
        loop {
            if let Some(st) = self.child.0.try_wait().unwrap() {
                return st.success();
            }
            assert!(t0.elapsed() < limit, "still running after {limit:?}:\n{}", self.said());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Writes a new configuration and signals a reload; waits until the
    /// proxy said what it did.
    fn reload(&self, config: &str) -> String {
        let before = std::fs::read_to_string(&self.log).unwrap_or_default().len();
        let mut f = std::fs::File::create(&self.config).unwrap();
        f.write_all(config.as_bytes()).unwrap();
        drop(f);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.0.id() as i32, libc::SIGHUP) };
        let t0 = Instant::now();
        loop {
            let log = std::fs::read_to_string(&self.log).unwrap_or_default();
            let new = &log[before.min(log.len())..];
            if new.contains("reloaded") || new.contains("refused") {
                return new.to_string();
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "no reload: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn config(port: u16, tls_port: u16, m: &[u16], certs: &[(PathBuf, PathBuf)], extra_rules: &str) -> String {
    let certs: Vec<String> = certs
        .iter()
        .map(|(c, k)| format!(r#"{{"cert": "{}", "key": "{}"}}"#, c.display(), k.display()))
        .collect();
    format!(
        r#"{{
  "listeners": [
    {{"name": "web", "listen": "127.0.0.1:{port}", "default_pool": "web",
      "rules": [{extra_rules}
        {{"name": "api", "host": "api.example", "action": {{"pool": "api"}}}},
        {{"name": "static", "path_prefix": "/static/", "action": {{"respond": {{"status": 200, "body": "static\n"}}}}}},
        {{"name": "users", "path_regex": "/users/[0-9]+", "action": {{"pool": "sticky"}}}},
        {{"name": "canary", "header": {{"name": "x-canary", "value": "1"}}, "action": {{"pool": "canary"}}}},
        {{"name": "no-delete", "method": "DELETE", "action": {{"respond": {{"status": 405, "body": "no\n"}}}}}},
        {{"name": "old", "path_prefix": "/old", "action": {{"redirect": {{"location": "https://new.example/", "status": 301}}}}}},
        {{"name": "hashed", "path_prefix": "/h/", "action": {{"pool": "hashed"}}}},
        {{"name": "learned", "path_prefix": "/l/", "action": {{"pool": "learned"}}}}
      ]}},
    {{"name": "secure", "listen": "127.0.0.1:{tls_port}", "default_pool": "web", "trusted_proxies": ["127.0.0.0/8"],
      "tls": {{"certificates": [{certs}]}}}}
  ],
  "pools": [
    {{"name": "web", "scheduler": "round_robin", "members": [
      {{"name": "m1", "address": "127.0.0.1:{m1}"}}, {{"name": "m2", "address": "127.0.0.1:{m2}"}}]}},
    {{"name": "api", "scheduler": "round_robin", "members": [{{"name": "m3", "address": "127.0.0.1:{m3}"}}]}},
    {{"name": "canary", "scheduler": "round_robin", "members": [{{"name": "m4", "address": "127.0.0.1:{m4}"}}]}},
    {{"name": "sticky", "scheduler": "round_robin", "cookie": {{"name": "SRV", "mode": "insert"}}, "members": [
      {{"name": "m1", "address": "127.0.0.1:{m1}"}}, {{"name": "m2", "address": "127.0.0.1:{m2}"}},
      {{"name": "m3", "address": "127.0.0.1:{m3}"}}]}},
    {{"name": "hashed", "scheduler": {{"hash_header": "x-user"}}, "members": [
      {{"name": "m1", "address": "127.0.0.1:{m1}"}}, {{"name": "m2", "address": "127.0.0.1:{m2}"}},
      {{"name": "m3", "address": "127.0.0.1:{m3}"}}]}},
    {{"name": "learned", "scheduler": "round_robin", "cookie": {{"name": "SESS", "mode": "learn"}}, "members": [
      {{"name": "m1", "address": "127.0.0.1:{m1}"}}, {{"name": "m2", "address": "127.0.0.1:{m2}"}},
      {{"name": "m3", "address": "127.0.0.1:{m3}"}}]}}
  ]
}}"#,
        certs = certs.join(", "),
        m1 = m[0],
        m2 = m[1],
        m3 = m[2],
        m4 = m[3],
    )
}

#[test]
fn http_and_https_requests_are_routed_balanced_and_kept() {
    for tool in ["nginx", "curl", "openssl"] {
        assert!(have(tool), "{tool} is needed: scripts/setup.sh installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m: Vec<u16> = (0..4).map(|_| free_port()).collect();
    let mut members: Vec<Option<Kid>> = ["m1", "m2", "m3", "m4"]
        .iter()
        .zip(&m)
        .map(|(n, p)| Some(nginx(d, n, *p)))
        .collect();
    let certs = vec![
        cert(d, "default", &["default.example"]),
        cert(d, "a", &["a.example"]),
        cert(d, "b", &["*.b.example"]),
    ];
    let (port, tls_port) = (free_port(), free_port());
    let lb = Lb::start(d, &config(port, tls_port, &m, &certs, ""), port);
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");

    // Round robin over HTTP/1.1; the members see who asked, and how.
    let names: Vec<String> = (0..4).map(|_| first_word(&curl(&[&url("/")]))).collect();
    assert_eq!(names, ["m1", "m2", "m1", "m2"]);
    let seen = curl(&["-H", "Host: www.example:8080", &url("/x?y=1")]);
    for want in [
        "uri=/x?y=1",
        "xff=[127.0.0.1]",
        "proto=[http]",
        "host=[www.example:8080]",
        "fwd=[for=127.0.0.1;proto=http;host=\"www.example:8080\"]",
    ] {
        assert!(seen.contains(want), "{want} not in {seen}");
    }
    // A client's own forwarding headers are not believed: the chains
    // begin with it, and X-Real-IP is dropped...
    let spoof = [
        "-H",
        "X-Forwarded-For: 203.0.113.7",
        "-H",
        "Forwarded: for=203.0.113.7",
        "-H",
        "X-Real-IP: 203.0.113.7",
    ];
    let seen = curl(&[&spoof[..], &[url("/").as_str()]].concat());
    for want in ["xff=[127.0.0.1]", "fwd=[for=127.0.0.1;proto=http;host=", "real=[]"] {
        assert!(seen.contains(want), "{want} not in {seen}");
    }
    // Connections to the members are kept alive and used again.
    let reqs: Vec<u64> = (0..6)
        .map(|_| {
            let s = curl(&[&url("/")]);
            s.split("reqs=")
                .nth(1)
                .and_then(|r| r.split_whitespace().next())
                .unwrap()
                .parse()
                .unwrap()
        })
        .collect();
    assert!(
        reqs.iter().any(|r| *r > 1),
        "no connection to a member carried two requests: {reqs:?}"
    );

    // HTTP/2 in clear (prior knowledge), and over TLS with ALPN.
    let v = curl(&[
        "--http2-prior-knowledge",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version}",
        &url("/"),
    ]);
    assert_eq!(v, "2");
    let https = |sni: &str, extra: &[&str]| {
        let mut a = vec![
            "-k".to_string(),
            "--resolve".to_string(),
            format!("{sni}:{tls_port}:127.0.0.1"),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(format!("https://{sni}:{tls_port}/"));
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        curl(&a)
    };
    assert_eq!(https("a.example", &["-o", "/dev/null", "-w", "%{http_version}"]), "2");
    assert_eq!(
        https("a.example", &["--http1.1", "-o", "/dev/null", "-w", "%{http_version}"]),
        "1.1"
    );
    let body = https("a.example", &[]);
    assert!(body.contains("proto=[https]"), "{body}");
    // ... except from a trusted proxy (this listener trusts 127.0.0.0/8):
    // its chains are appended to.
    let body = https("a.example", &spoof);
    for want in [
        "xff=[203.0.113.7, 127.0.0.1]",
        "fwd=[for=203.0.113.7, for=127.0.0.1;proto=https",
        "real=[203.0.113.7]",
    ] {
        assert!(body.contains(want), "{want} not in {body}");
    }
    // Each name gets its certificate: exact, wildcard, else the first.
    assert!(subject(tls_port, "a.example").contains("CN = a.example"));
    assert!(subject(tls_port, "x.b.example").contains("CN = *.b.example"));
    assert!(subject(tls_port, "other.example").contains("CN = default.example"));

    // On TLS, a request must be for a name of the connection's
    // certificate: a.example's connection asking for api.example is
    // misdirected.
    let r = https(
        "a.example",
        &["-H", "Host: api.example", "-o", "/dev/null", "-w", "%{http_code}"],
    );
    assert_eq!(r, "421");
    // A host that is no authority, and paths that would slip past a rule.
    assert_eq!(
        curl(&[
            "-H",
            "Host: x\";for=6.6.6.6",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url("/")
        ]),
        "400"
    );
    assert_eq!(curl(&["--path-as-is", &url("//static/../static/./a.js")]), "static\n");
    assert_eq!(curl(&["--path-as-is", &url("/%73tatic/a.js")]), "static\n");
    assert_eq!(
        curl(&[
            "--path-as-is",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            &url("/static%2fa.js")
        ]),
        "400"
    );
    // Path parameters (Tomcat's `;jsessionid=`) do not hide a path from
    // its rule, nor a dot segment; nor a method in lower case; nor a host
    // that a header's syntax would split.
    assert_eq!(curl(&["--path-as-is", &url("/static;x/a.js")]), "static\n");
    for (args, want) in [
        (vec!["--path-as-is", "/x/..;/static/a.js"], "400"),
        (vec!["-X", "delete", "/"], "400"),
        (vec!["-H", "Host: x,for=6.6.6.6", "/"], "400"),
    ] {
        let (path, args) = args.split_last().unwrap();
        let u = url(path);
        let got = curl(&[args, &["-o", "/dev/null", "-w", "%{http_code}", u.as_str()]].concat());
        assert_eq!(got, want, "{args:?} {path}");
    }
    let long = format!("/{}", "a".repeat(9000));
    assert_eq!(curl(&["-o", "/dev/null", "-w", "%{http_code}", &url(&long)]), "414");
    let seen = curl(&["--path-as-is", &url("/x/../y/./z?q=1")]);
    assert!(seen.contains("uri=/y/z?q=1"), "{seen}");

    // Forwarding rules, in order.
    assert_eq!(first_word(&curl(&["-H", "Host: api.example", &url("/")])), "m3");
    assert_eq!(curl(&[&url("/static/app.js")]), "static\n");
    assert_eq!(first_word(&curl(&["-H", "x-canary: 1", &url("/")])), "m4");
    assert_ne!(first_word(&curl(&["-H", "x-canary: 2", &url("/")])), "m4");
    assert_eq!(
        curl(&["-X", "DELETE", "-o", "/dev/null", "-w", "%{http_code}", &url("/")]),
        "405"
    );
    let r = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{redirect_url}",
        &url("/old/page"),
    ]);
    assert_eq!(r, "301 https://new.example/");
    // (The regex must match the whole path: /users/12x is the default
    // pool's, which sets no persistence cookie.)
    let h = curl(&["-D", "-", "-o", "/dev/null", &url("/users/12")]);
    assert!(h.contains("SRV="), "{h}");
    let h = curl(&["-D", "-", "-o", "/dev/null", &url("/users/12x")]);
    assert!(!h.contains("SRV="), "{h}");

    // Cookie persistence, inserted: the first answer names the member,
    // and a client that sends it back stays there.
    let jar = d.join("jar");
    let first = first_word(&curl(&["-c", jar.to_str().unwrap(), &url("/users/1")]));
    let jar_text = std::fs::read_to_string(&jar).unwrap();
    assert!(jar_text.contains(&format!("SRV\t{first}")), "{jar_text}");
    for _ in 0..6 {
        assert_eq!(
            first_word(&curl(&["-b", jar.to_str().unwrap(), &url("/users/2")])),
            first
        );
    }
    // Learned: the member's own session cookie brings its client back.
    let jar2 = d.join("jar2");
    let first = first_word(&curl(&["-c", jar2.to_str().unwrap(), &url("/l/a")]));
    for _ in 0..6 {
        let s = curl(&["-b", jar2.to_str().unwrap(), &url("/l/b")]);
        assert_eq!(first_word(&s), first, "{s}");
    }
    // A consistent hash of a header: each user keeps its member.
    for u in ["alice", "bob", "carol", "dave"] {
        let h = format!("x-user: {u}");
        let a: Vec<String> = (0..4).map(|_| first_word(&curl(&["-H", &h, &url("/h/")]))).collect();
        assert!(a.iter().all(|x| *x == a[0]), "{u}: {a:?}");
    }

    // A member killed: requests go to the other, none fails; it comes
    // back into the rotation once restarted (after it was set aside).
    members[1] = None;
    let names: Vec<String> = (0..6).map(|_| first_word(&curl(&[&url("/")]))).collect();
    assert!(names.iter().all(|n| n == "m1"), "{names:?}");
    members[1] = Some(nginx(d, "m2", m[1]));
    std::thread::sleep(sdn_l7lb::sched::SET_ASIDE + Duration::from_millis(500));
    let names: Vec<String> = (0..4).map(|_| first_word(&curl(&[&url("/")]))).collect();
    assert!(names.iter().any(|n| n == "m2"), "m2 never came back: {names:?}");

    // Reloads: a new rule takes effect on the connections that stay; a
    // configuration with a mistake is refused, naming the field, and the
    // one served stays.
    let rule =
        r#"{"name": "maint", "path_prefix": "/maint", "action": {"respond": {"status": 503, "body": "later\n"}}},"#;
    let said = lb.reload(&config(port, tls_port, &m, &certs, rule));
    assert!(said.contains("reloaded"), "{said}");
    assert_eq!(curl(&[&url("/maint")]), "later\n");
    let bad = config(port, tls_port, &m, &certs, rule).replace("/users/[0-9]+", "/users/[0-9+");
    let said = lb.reload(&bad);
    assert!(
        said.contains("refused") && said.contains("listeners[0].rules[3].path_regex"),
        "{said}"
    );
    assert_eq!(curl(&[&url("/maint")]), "later\n");
    assert_eq!(first_word(&curl(&["-H", "Host: api.example", &url("/")])), "m3");
}

/// The names of the members that answered `n` requests; every request
/// must get an answer of `status`.
fn answers(url: &str, n: usize, status: &str) -> Vec<String> {
    (0..n)
        .map(|_| {
            let out = curl(&["-w", "\n%{http_code}", url]);
            let (body, code) = out.trim_end().rsplit_once('\n').unwrap_or(("", out.trim_end()));
            assert_eq!(code, status, "{out}");
            first_word(body)
        })
        .collect()
}

/// Waits until `n` requests in a row are answered 200 by members that
/// satisfy `ok`; how long that took.
fn until(url: &str, ok: impl Fn(&[String]) -> bool, what: &str) -> Duration {
    let t0 = Instant::now();
    loop {
        let a = (0..6).map(|_| first_word(&curl(&[url]))).collect::<Vec<_>>();
        if ok(&a) {
            return t0.elapsed();
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "{what}: still {a:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn health_checks_take_failing_members_out_and_bring_them_back() {
    for tool in ["nginx", "curl"] {
        assert!(have(tool), "{tool} is needed: scripts/setup.sh installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let mut members: Vec<Option<Kid>> = ["m1", "m2", "m3"]
        .iter()
        .zip(&m)
        .map(|(n, p)| Some(nginx(d, n, *p)))
        .collect();
    let port = free_port();
    let conf = |health: &str| {
        format!(
            r#"{{"listeners": [{{"name": "web", "listen": "127.0.0.1:{port}", "default_pool": "web"}}],
  "pools": [{{"name": "web", "scheduler": "round_robin", {health}
    "members": [{{"name": "m1", "address": "127.0.0.1:{}"}}, {{"name": "m2", "address": "127.0.0.1:{}"}},
                {{"name": "m3", "address": "127.0.0.1:{}"}}]}}]}}"#,
            m[0], m[1], m[2]
        )
    };
    let checked = conf(
        r#""health": {"path": "/health", "body": "ok", "interval_ms": 200, "timeout_ms": 150, "rise": 2, "fall": 2},"#,
    );
    let lb = Lb::start(d, &checked, port);
    let url = format!("http://127.0.0.1:{port}/");
    let all_three = |a: &[String]| ["m1", "m2", "m3"].iter().all(|n| a.iter().any(|x| x == n));
    until(&url, all_three, "every member in the rotation at first");
    let log = || std::fs::read_to_string(&lb.log).unwrap();

    // Each way of failing a check, one member at a time: while it fails,
    // every request is answered by the others; it comes back once its
    // check passes again.
    let without = |name: &'static str| move |a: &[String]| a.iter().all(|x| x != name && !x.is_empty());
    type Fail<'a> = (
        &'static str,
        &'a str,
        Box<dyn Fn(&mut Vec<Option<Kid>>) + 'a>,
        Box<dyn Fn(&mut Vec<Option<Kid>>) + 'a>,
    );
    let cases: Vec<Fail> = vec![
        (
            "m2",
            "the body does not contain",
            Box::new(|_| set_health(d, "m2", Some("sick"))),
            Box::new(|_| set_health(d, "m2", Some("ok"))),
        ),
        (
            "m3",
            "status 404",
            Box::new(|_| set_health(d, "m3", None)),
            Box::new(|_| set_health(d, "m3", Some("ok"))),
        ),
        (
            // Frozen: its socket still takes connections, nothing answers.
            "m1",
            "no answer within 150 ms",
            Box::new(|k| unsafe {
                libc::kill(k[0].as_ref().unwrap().0.id() as i32, libc::SIGSTOP);
            }),
            Box::new(|k| unsafe {
                libc::kill(k[0].as_ref().unwrap().0.id() as i32, libc::SIGCONT);
            }),
        ),
        (
            "m2",
            "connecting",
            Box::new(|k| k[1] = None),
            Box::new(|k| k[1] = Some(nginx(d, "m2", m[1]))),
        ),
    ];
    for (name, reason, fail, mend) in &cases {
        fail(&mut members);
        let took = until(&url, without(name), &format!("{name} taken out ({reason})"));
        eprintln!("{name} out after {took:?} ({reason})");
        let a = answers(&url, 12, "200");
        assert!(a.iter().all(|x| x != name), "{name} still answers: {a:?}");
        // (A refused connection sets the member aside before its check
        // says so.)
        let t0 = Instant::now();
        while !log()
            .lines()
            .any(|l| l.contains("member down") && l.contains(&format!("member={name}")) && l.contains(reason))
        {
            assert!(
                t0.elapsed() < Duration::from_secs(3),
                "no 'member down' for {name} with {reason:?}:\n{}",
                log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        mend(&mut members);
        let took = until(&url, all_three, &format!("{name} back"));
        eprintln!("{name} back after {took:?}");
    }
    assert!(log().contains("member up"), "{}", log());

    // None passes: 503, said so; one passing again is enough.
    for n in ["m1", "m2", "m3"] {
        set_health(d, n, Some("sick"));
    }
    let t0 = Instant::now();
    loop {
        let out = curl(&["-o", "/dev/null", "-w", "%{http_code}", &url]);
        if out == "503" {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "never 503: {out}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(curl(&[&url]), "no member of the pool is up\n");
    set_health(d, "m3", Some("ok"));
    until(&url, |a| a.iter().all(|x| x == "m3"), "m3 alone");

    // A reload that drops the checks: every member is taken again; one
    // that brings them back: the failing ones go out again.
    let said = lb.reload(&conf(""));
    assert!(said.contains("reloaded"), "{said}");
    until(&url, all_three, "every member once the checks are gone");
    let said = lb.reload(&checked);
    assert!(said.contains("reloaded"), "{said}");
    until(&url, |a| a.iter().all(|x| x == "m3"), "m3 alone once checked again");
}

/// nginx taking the PROXY protocol on `port`: it answers with its name,
/// the client and destination the header named, and how many requests
/// its connection carried.
fn nginx_pp(dir: &Path, name: &str, port: u16) -> Kid {
    let locations = format!(
        "    location / {{\n      return 200 \"{name} client=$proxy_protocol_addr:$proxy_protocol_port \
         dst=$proxy_protocol_server_addr:$proxy_protocol_server_port reqs=$connection_requests\\n\";\n    }}"
    );
    run_nginx(dir, name, port, " proxy_protocol", &locations)
}

/// A word `key=value` of `s`: the value.
fn field<'a>(s: &'a str, key: &str) -> &'a str {
    s.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|w| w.strip_prefix('=')))
        .unwrap_or("")
}

#[test]
fn the_proxy_protocol_names_each_client_to_its_member() {
    for tool in ["nginx", "curl"] {
        assert!(have(tool), "{tool} is needed: scripts/setup.sh installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (p1, p2) = (free_port(), free_port());
    let _m = (nginx_pp(d, "v1", p1), nginx_pp(d, "v2", p2));
    let port = free_port();
    let conf = format!(
        r#"{{"listeners": [{{"name": "web", "listen": "127.0.0.1:{port}", "default_pool": "one",
      "rules": [{{"name": "two", "path_prefix": "/two/", "action": {{"pool": "two"}}}}]}}],
  "pools": [
    {{"name": "one", "scheduler": "round_robin", "proxy_protocol": "v1",
      "members": [{{"name": "v1", "address": "127.0.0.1:{p1}"}}]}},
    {{"name": "two", "scheduler": "round_robin", "proxy_protocol": "v2",
      "members": [{{"name": "v2", "address": "127.0.0.1:{p2}"}}]}}]}}"#
    );
    let _lb = Lb::start(d, &conf, port);
    // Clients one after another, each on its own connection with two
    // requests: nginx reads each client's own port from the header (v1
    // and v2), and the address it reached; the two requests of a client
    // share its connection to the member, and no client's request rides
    // another's (it would be named as that client).
    for path in ["/", "/two/"] {
        let url = format!("http://127.0.0.1:{port}{path}");
        for _ in 0..3 {
            let out = curl(&["-w", "local_port=%{local_port}\n", &url, &url]);
            let lines: Vec<&str> = out.lines().collect();
            assert_eq!(lines.len(), 4, "{out}");
            let mine = field(lines[1], "local_port");
            for (k, answer) in [lines[0], lines[2]].iter().enumerate() {
                assert_eq!(field(answer, "client"), format!("127.0.0.1:{mine}"), "{out}");
                assert_eq!(field(answer, "dst"), format!("127.0.0.1:{port}"), "{out}");
                assert_eq!(field(answer, "reqs"), (k + 1).to_string(), "{out}");
            }
        }
    }
}

/// A member that answers after `delay` (Python's HTTP server).
fn slow_member(port: u16, delay: &str) -> Kid {
    let code = [
        "import http.server,time".to_string(),
        "class H(http.server.BaseHTTPRequestHandler):".into(),
        "  protocol_version='HTTP/1.1'".into(),
        "  def do_GET(s):".into(),
        format!("    time.sleep({delay}); b=b'slow\\n'; s.send_response(200)"),
        "    s.send_header('Content-Length',str(len(b))); s.end_headers(); s.wfile.write(b)".into(),
        "  def log_message(s,*a): pass".into(),
        format!("http.server.ThreadingHTTPServer(('127.0.0.1',{port}),H).serve_forever()"),
    ]
    .join("\n");
    let child = Command::new("python3")
        .args(["-c", &code])
        .stderr(Stdio::null())
        .spawn()
        .expect("python3");
    wait_port(port);
    Kid(child)
}

#[test]
fn an_upgrade_under_load_loses_no_request() {
    for tool in ["nginx", "curl", "python3"] {
        assert!(have(tool), "{tool} is needed: scripts/setup.sh installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m: Vec<u16> = (0..3).map(|_| free_port()).collect();
    let _members = (nginx(d, "m1", m[0]), nginx(d, "m2", m[1]), slow_member(m[2], "1.5"));
    let port = free_port();
    let conf = format!(
        r#"{{"listeners": [{{"name": "web", "listen": "127.0.0.1:{port}", "default_pool": "web",
      "rules": [{{"name": "slow", "path_prefix": "/slow", "action": {{"pool": "slow"}}}}]}}],
  "pools": [
    {{"name": "web", "scheduler": "round_robin", "members": [
      {{"name": "m1", "address": "127.0.0.1:{}"}}, {{"name": "m2", "address": "127.0.0.1:{}"}}]}},
    {{"name": "slow", "scheduler": "round_robin", "members": [{{"name": "s", "address": "127.0.0.1:{}"}}]}}]}}"#,
        m[0], m[1], m[2]
    );
    let ctl = d.join("control.sock");
    let ctl_s = ctl.to_str().unwrap();
    let mut first = Lb::spawn(d, "first", &conf, &["--control", ctl_s]);
    wait_port(port);

    // Load: two clients, each making connections of three requests one
    // after another, until told to stop; every answer's status kept.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let url = format!("http://127.0.0.1:{port}/");
    let load: Vec<_> = (0..2)
        .map(|_| {
            let (stop, url) = (stop.clone(), url.clone());
            std::thread::spawn(move || {
                let mut codes = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let out = curl(&[
                        "-o",
                        "/dev/null",
                        "-o",
                        "/dev/null",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}\n",
                        &url,
                        &url,
                        &url,
                    ]);
                    codes.extend(out.lines().map(str::to_string));
                }
                codes
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(700));
    // A request in flight across the upgrade: sent to the old process,
    // answered 1.5 s later.
    let slow_url = format!("http://127.0.0.1:{port}/slow");
    let slow = std::thread::spawn(move || curl(&[&slow_url]));
    std::thread::sleep(Duration::from_millis(200));

    let mut second = Lb::spawn(d, "second", &conf, &["--control", ctl_s, "--upgrade"]);
    assert!(
        first.exits_within(Duration::from_secs(10)),
        "the old proxy failed:\n{}",
        first.said()
    );
    let said = first.said();
    for want in ["handed the listening sockets to the new proxy", "draining", "drained"] {
        assert!(said.contains(want), "{want:?} not in the old proxy's log:\n{said}");
    }
    assert!(
        second.said().contains("took the running proxy's listening sockets"),
        "{}",
        second.said()
    );
    assert_eq!(
        slow.join().unwrap(),
        "slow\n",
        "the request in flight across the upgrade"
    );
    std::thread::sleep(Duration::from_millis(700));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let codes: Vec<String> = load.into_iter().flat_map(|t| t.join().unwrap()).collect();
    let bad: Vec<&String> = codes.iter().filter(|c| *c != "200").collect();
    eprintln!(
        "{} requests across the upgrade, {} not answered 200",
        codes.len(),
        bad.len()
    );
    assert!(codes.len() >= 30, "too little load to show anything: {}", codes.len());
    assert!(bad.is_empty(), "requests lost across the upgrade: {bad:?}");

    // An upgrade to a process whose configuration is refused: it exits,
    // and the running one goes on serving, its control socket too.
    let broken = conf.replace("\"round_robin\"", "\"no_such_scheduler\"");
    let mut third = Lb::spawn(d, "third", &broken, &["--control", ctl_s, "--upgrade"]);
    assert!(
        !third.exits_within(Duration::from_secs(10)),
        "a broken configuration was served"
    );
    let t0 = Instant::now();
    while !second.said().contains("abandoned") {
        assert!(t0.elapsed() < Duration::from_secs(10), "{}", second.said());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(first_word(&curl(&[&url])).len(), 2);
    let mut fourth = Lb::spawn(d, "fourth", &conf, &["--control", ctl_s, "--upgrade"]);
    assert!(second.exits_within(Duration::from_secs(10)), "{}", second.said());
    assert!(fourth.said().contains("took the running proxy's listening sockets"));
    assert_eq!(first_word(&curl(&[&url])).len(), 2);
    // SIGTERM drains as well, and ends.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(fourth.child.0.id() as i32, libc::SIGTERM) };
    assert!(fourth.exits_within(Duration::from_secs(10)), "{}", fourth.said());
}

/// How long until the proxy closes `s` (reading and dropping whatever it
/// sends); panics past `limit`.
fn closed_after(s: &mut std::net::TcpStream, limit: Duration) -> Duration {
    use std::io::Read as _;
    let t0 = Instant::now();
    s.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return t0.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return t0.elapsed(),
            Err(e) => panic!("still open after {:?}: {e}", t0.elapsed()),
        }
    }
}

#[test]
fn clients_cannot_hold_connections() {
    for tool in ["nginx", "curl"] {
        assert!(have(tool), "{tool} is needed: scripts/setup.sh installs it");
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let m = free_port();
    let _member = nginx(d, "m1", m);
    let port = free_port();
    let conf = |timeouts: &str| {
        format!(
            r#"{{{timeouts} "listeners": [{{"name": "web", "listen": "127.0.0.1:{port}", "default_pool": "web"}}],
  "pools": [{{"name": "web", "scheduler": "round_robin", "members": [{{"name": "m1", "address": "127.0.0.1:{m}"}}]}}]}}"#
        )
    };
    let lb = Lb::start(
        d,
        &conf(r#""timeouts": {"first_request_ms": 300, "idle_ms": 500, "stalled_ms": 500},"#),
        port,
    );
    let connect = || std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    use std::io::Write as _;

    // Nothing sent (not even the protocol's first bytes): closed.
    let took = closed_after(&mut connect(), Duration::from_secs(3));
    assert!(took >= Duration::from_millis(250), "closed too soon: {took:?}");
    // HTTP/2's preface and settings, then nothing (its pings answered by
    // the kernel's buffer): closed all the same.
    let mut s = connect();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    closed_after(&mut s, Duration::from_secs(3));
    // A request answered, then idle: closed.
    let mut s = connect();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let took = closed_after(&mut s, Duration::from_secs(3));
    assert!(took >= Duration::from_millis(450), "closed before idle: {took:?}");
    // A body promised and not sent: closed in the middle of the request.
    let mut s = connect();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nabc")
        .unwrap();
    closed_after(&mut s, Duration::from_secs(3));
    // Requests that keep moving are not cut: a client that sends one
    // every 200 ms (under the idle limit) over 2 s keeps its connection.
    let mut s = connect();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 4096];
    for _ in 0..10 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        use std::io::Read as _;
        let n = s.read(&mut buf).unwrap();
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "cut while active"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    drop(s);

    // One source address holds at most 512 connections; past that its new
    // ones are closed at once, while its open ones and other addresses
    // are served.
    let said = lb.reload(&conf(""));
    assert!(said.contains("reloaded"), "{said}");
    let held: Vec<std::net::TcpStream> = (0..512).map(|_| connect()).collect();
    std::thread::sleep(Duration::from_millis(300));
    let took = closed_after(&mut connect(), Duration::from_secs(2));
    assert!(took < Duration::from_millis(500), "the 513th waited {took:?}");
    let other = curl(&["--interface", "127.0.0.2", &format!("http://127.0.0.1:{port}/")]);
    assert_eq!(first_word(&other), "m1", "{other}");
    let mut first = held.into_iter().next().unwrap();
    first.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut buf = [0u8; 64];
    use std::io::Read as _;
    let n = first.read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    assert!(lb.said().contains("too many connections"), "{}", lb.said());
}
