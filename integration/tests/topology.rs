//! The live topology page, read in headless Chromium: a supervisor signs
//! in with a one-time link from `sdnctl topology --web`, the page draws
//! zones, VPCs, subnets, ports, security groups and exchange paths, and a
//! change applied with `sdnctl` appears on it within a second, without a
//! reload. `sdnctl topology` prints the same graph as text. Attacks: a
//! tenant's markup in a name stays text; a tenant or the platform reads
//! nothing; a used or forged link or cookie gets nowhere.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sdn_integration::browser::{self, Browser};
use sdn_integration::cluster::{Cluster, ADMIN, PLATFORM};
use sdn_integration::ops::*;
use sdn_integration::{free_port, privileged};
use sdn_proto::v1 as pb;

const SUPERVISOR: &str = "sdn://supervisor/regulator";
const TENANT: &str = "sdn://tenant/acme/alice";
/// What a tenant names its group: markup that would run if the page
/// parsed names as HTML.
const HOSTILE: &str = "<img src=x onerror=\"document.title='owned'\">";

fn sdnctl(c: &Cluster, uri: &str, args: &[&str]) -> Result<String, String> {
    c.sdnctl(uri, args)
}

/// `curl` against the page: the status code, headers and body.
fn curl(c: &Cluster, url: &str, as_uri: Option<&str>, cookie: Option<&str>) -> (u16, String, String) {
    curl_with(c, url, as_uri, cookie, &[])
}

fn curl_with(
    c: &Cluster,
    url: &str,
    as_uri: Option<&str>,
    cookie: Option<&str>,
    extra: &[&str],
) -> (u16, String, String) {
    let pki = c.pki.as_ref().unwrap();
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-D", "-", "--max-time", "10"])
        .args(extra)
        .arg("--cacert")
        .arg(pki.ca());
    if let Some(uri) = as_uri {
        let f = pki.files(uri).unwrap();
        cmd.arg("--cert").arg(&f.cert).arg("--key").arg(&f.key);
    }
    if let Some(k) = cookie {
        cmd.args(["-H", &format!("Cookie: {k}")]);
    }
    let out = cmd.arg(url).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("curl {url}: {text}{}", String::from_utf8_lossy(&out.stderr)));
    (code, head.to_string(), body.to_string())
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_topology_page_follows_changes_live_for_admins_and_supervisors_only() {
    if !privileged() {
        eprintln!("skipped: needs root");
        return;
    }
    assert!(
        browser::chromium().is_some(),
        "Chromium is missing: scripts/setup.sh installs chromium-headless-shell"
    );
    let dir = tempfile::tempdir().unwrap();
    let web = format!("127.0.0.1:{}", free_port());
    let c = Cluster::start_secure_with(dir.path(), &["--web-listen", &web]).unwrap();
    let base = format!("https://{web}");

    let mut hostile = group(
        "web",
        "acme",
        vec![ingress("http", false, "tcp", (80, 80), "0.0.0.0/0", "")],
    );
    if let pb::operation::Op::PutSecurityGroup(g) = &mut hostile {
        g.name = HOSTILE.into();
    }
    c.apply_committed(
        ADMIN,
        vec![
            zone("extranet", &["10.200.0.0/16"], "ext0"),
            zone("internet", &["198.51.100.0/24"], "inet0"),
        ],
    )
    .await
    .unwrap();
    c.apply_committed(
        PLATFORM,
        vec![
            tenant("acme"),
            vpc_in_zone("v1", "acme", "extranet"),
            subnet("s1", "v1", "10.200.1.0/24", ""),
            host("h1", "192.0.2.1"),
        ],
    )
    .await
    .unwrap();
    // The tenant names its own group.
    c.apply_committed(TENANT, vec![hostile]).await.unwrap();
    c.apply_committed(
        PLATFORM,
        vec![port(
            "p1",
            "acme",
            "s1",
            "h1",
            "tap-p1",
            "02:00:00:00:00:01",
            "10.200.1.5",
            "",
            &["web"],
        )],
    )
    .await
    .unwrap();
    c.apply_committed(
        ADMIN,
        vec![exchange(
            "x1",
            "extranet",
            "internet",
            "10.200.1.0/24",
            "198.51.100.16/28",
            (443, 443),
        )],
    )
    .await
    .unwrap();

    // The text: each object under its parent.
    let text = sdnctl(&c, SUPERVISOR, &["topology"]).unwrap();
    eprintln!("{text}");
    for line in [
        "zone extranet prefixes 10.200.0.0/16 uplink ext0",
        "  vpc v1 tenant acme vni ",
        "    subnet s1 10.200.1.0/24",
        "      port p1 10.200.1.5 on h1 groups web",
        "  x1 extranet -> internet tcp 443 from 10.200.1.0/24 to 198.51.100.16/28",
        "  h1 192.0.2.1 ports 1",
    ] {
        assert!(
            text.lines().any(|l| l.starts_with(line)),
            "no line {line:?} in:\n{text}"
        );
    }
    assert_eq!(
        sdnctl(&c, ADMIN, &["topology"]).unwrap(),
        text,
        "admins read what supervisors read"
    );
    for uri in [TENANT, PLATFORM] {
        for args in [&["topology"][..], &["topology", "--web"][..]] {
            let e = sdnctl(&c, uri, args).unwrap_err();
            assert!(
                e.contains("PermissionDenied") || e.contains("permission"),
                "{uri} {args:?}: {e}"
            );
        }
    }

    // The refusals above reach the audit log a moment later, each a
    // revision: the page is opened once they have, so that its revision
    // and `sdnctl topology`'s are of the same state.
    let revision = || -> u64 {
        let j: serde_json::Value =
            serde_json::from_str(&sdnctl(&c, SUPERVISOR, &["topology", "--json"]).unwrap()).unwrap();
        j["revision"].as_u64().unwrap()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = revision();
    loop {
        std::thread::sleep(Duration::from_millis(1500));
        let now = revision();
        if now == last {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the revision keeps moving: {now}");
        last = now;
    }

    // The page, signed in by a supervisor's link.
    let link = sdnctl(&c, SUPERVISOR, &["topology", "--web"])
        .unwrap()
        .trim()
        .to_string();
    assert!(link.starts_with(&format!("{base}/login#token=")), "{link}");
    let spki = browser::spki_hash(&c.pki.as_ref().unwrap().files("sdn://replica/1").unwrap().cert).unwrap();
    let profile = dir.path().join("chromium");
    let mut b = Browser::launch(&profile, Some(&spki)).unwrap();
    b.navigate(&link).unwrap();
    b.wait_for("(document.body.dataset.revision || '') !== ''", Duration::from_secs(10))
        .unwrap();
    let page_revision = |b: &mut Browser| -> u64 {
        b.eval("document.body.dataset.revision")
            .unwrap()
            .as_str()
            .unwrap_or("0")
            .parse()
            .unwrap_or(0)
    };
    // The revision the page was loaded at (its first update).
    let loaded = page_revision(&mut b);
    // The page and sdnctl compared at one revision: an audit record of
    // the refusals above may still arrive, moving both on.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let (first, rev) = loop {
        let j: serde_json::Value =
            serde_json::from_str(&sdnctl(&c, SUPERVISOR, &["topology", "--json"]).unwrap()).unwrap();
        let r = j["revision"].as_u64().unwrap();
        b.wait_for(
            &format!("Number(document.body.dataset.revision) >= {r}"),
            Duration::from_secs(10),
        )
        .unwrap();
        if page_revision(&mut b) == r {
            break (j, r);
        }
        assert!(std::time::Instant::now() < deadline, "the revision keeps moving: {r}");
    };
    for (kind, id) in [
        ("zone", "extranet"),
        ("zone", "internet"),
        ("vpc", "v1"),
        ("subnet", "s1"),
        ("port", "p1"),
    ] {
        let q = format!("document.querySelector('#graph [data-kind=\"{kind}\"][data-id=\"{id}\"]') !== null");
        assert_eq!(b.eval(&q).unwrap(), true, "{kind} {id} is not drawn");
    }
    let page = b.eval("document.body.innerText").unwrap().as_str().unwrap().to_string();
    for want in ["x1", "443", "192.0.2.1", "10.200.1.5 @h1 · web", HOSTILE] {
        assert!(page.contains(want), "the page lacks {want:?}:\n{page}");
    }
    // The tenant's markup is text: no image, no script ran.
    assert_eq!(b.eval("document.images.length").unwrap(), 0);
    assert_eq!(b.eval("document.title").unwrap(), "Network topology");
    // The page's data is `sdnctl topology --json`'s.
    let served: serde_json::Value = serde_json::from_str(
        &b.eval("fetch('/topology.json').then(r => r.text())")
            .unwrap()
            .as_str()
            .unwrap()
            .to_string(),
    )
    .unwrap();
    assert_eq!(served, first);

    // A change applied with sdnctl appears within a second, on the same
    // page (its list of updates goes on: no reload).
    let manifest = dir.path().join("change.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: sdn/v1\nkind: Vpc\nmetadata:\n  name: v9\n  tenant: acme\nspec:\n  zone: extranet\n---\n\
         apiVersion: sdn/v1\nkind: Subnet\nmetadata:\n  name: s9\nspec:\n  vpc: v9\n  cidrV4: 10.200.9.0/24\n",
    )
    .unwrap();
    let t0 = now_ms();
    sdnctl(&c, PLATFORM, &["apply", "--file", manifest.to_str().unwrap()]).unwrap();
    b.wait_for(
        "document.querySelector('#graph [data-kind=\"subnet\"][data-id=\"s9\"]') !== null",
        Duration::from_secs(5),
    )
    .unwrap();
    let received: u64 = b
        .eval("document.querySelector('#updates li').dataset.receivedMs")
        .unwrap()
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let updates = b
        .eval("document.querySelectorAll('#updates li').length")
        .unwrap()
        .as_u64()
        .unwrap();
    let oldest: u64 = b
        .eval("document.querySelector('#updates li:last-child').dataset.revision")
        .unwrap()
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    eprintln!(
        "the change was on the page {} ms after sdnctl apply started ({updates} updates on one page load)",
        received.saturating_sub(t0)
    );
    if let Ok(p) = std::env::var("TOPOLOGY_SCREENSHOT") {
        b.screenshot(std::path::Path::new(&p), 1400, 700).unwrap();
    }
    assert!(
        received.saturating_sub(t0) < 1000,
        "the change took {} ms",
        received - t0
    );
    assert!(
        updates >= 2 && oldest == loaded && rev >= loaded,
        "the page was loaded again: {updates} updates, the first at {oldest}"
    );

    // Attacks on the page's door.
    for path in ["/", "/topology.json", "/events"] {
        let (code, head, _) = curl(&c, &format!("{base}{path}"), None, None);
        assert_eq!(code, 401, "{path}: no certificate, no cookie");
        assert!(
            head.to_lowercase()
                .contains("content-security-policy: default-src 'none'"),
            "{head}"
        );
        let (code, _, _) = curl(
            &c,
            &format!("{base}{path}"),
            None,
            Some(&format!("__Host-sdn_session={}", "0".repeat(64))),
        );
        assert_eq!(code, 401, "{path}: a forged cookie");
        for uri in [TENANT, PLATFORM, "sdn://agent/h1"] {
            let (code, _, _) = curl(&c, &format!("{base}{path}"), Some(uri), None);
            assert_eq!(code, 403, "{path}: {uri}'s certificate");
        }
    }
    let login = format!("{base}/login");
    let token = |link: &str| link.split_once("#token=").unwrap().1.to_string();
    let post = |secret: &str, extra: &[&str]| {
        let mut args = vec!["-X", "POST", "--data-binary", secret];
        args.extend_from_slice(extra);
        curl_with(&c, &login, None, None, &args)
    };
    let (code, _, body) = post(&token(&link), &[]);
    assert_eq!(code, 401, "a used link: {body}");
    let (code, _, _) = curl(&c, &format!("{login}?token={}", token(&link)), None, None);
    assert_eq!(code, 400, "a secret in the query is not taken");
    let (code, _, body) = curl(&c, &format!("{base}/topology.json"), Some(SUPERVISOR), None);
    assert_eq!(code, 200, "a supervisor's certificate: {body}");
    assert!(body.contains("\"v9\""), "{body}");
    let fresh = token(&sdnctl(&c, ADMIN, &["topology", "--web"]).unwrap());
    let (code, _, _) = post(&fresh, &["-H", "Sec-Fetch-Site: cross-site"]);
    assert_eq!(code, 403, "a login posted by another site's page");
    let (code, head, _) = post(&fresh, &[]);
    assert_eq!(code, 204, "{head}");
    let set = head
        .lines()
        .find(|l| l.to_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("no cookie: {head}"));
    for flag in ["__Host-sdn_session=", "HttpOnly", "Secure", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = set
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    let (code, _, body) = curl(&c, &format!("{base}/topology.json"), None, Some(&cookie));
    assert_eq!(code, 200, "{body}");
    let log = c.controller.log_text();
    assert!(
        log.contains("topology page refused"),
        "refusals are security events:\n{log}"
    );
}
