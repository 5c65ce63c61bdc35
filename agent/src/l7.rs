//! The HTTP proxies of this host's proxy ports: what each runs, made from
//! its `proxy/<port>` resource. [`proxy_config`] writes the proxy's
//! configuration (`sdn_l7lb::config::Config`) and the certificate files
//! it names; the proxy checks it again when it reads it.
//!
//! Names in the proxy's configuration are the controller's ids, led by
//! their place (`0-portal-app`): ids may hold dots, which the proxy's names
//! do not.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

use sdn_l7lb::config as px;
use sdn_policies::convert::{ApiResource, At};
use sdn_proto::v1 as pb;

/// A file the proxy reads: its path and its text (keys among them: the
/// caller writes them readable by root alone).
pub struct ProxyFile {
    pub path: PathBuf,
    pub text: String,
}

/// The proxy's configuration for one proxy port, as JSON, with the
/// certificate files it names under `dir`.
pub fn proxy_config(p: &pb::HttpProxyOnHost, dir: &Path) -> Result<(String, Vec<ProxyFile>), String> {
    let port = p.port.as_ref().ok_or("the resource names no port")?;
    let has_v6 = !port.ipv6.is_empty();
    let mut files = Vec::new();
    let mut listeners = Vec::new();
    let mut pools: Vec<px::Pool> = Vec::new();
    for (i, l) in p.listeners.iter().enumerate() {
        let pbl = l.listener.as_ref().ok_or(format!("listeners[{i}]: no listener"))?;
        let at = format!("listeners[{i}]");
        let model =
            sdn_policies::HttpListener::from_pb(&At(&at), pbl).map_err(|e| format!("http listener {}: {e}", pbl.id))?;
        let tls = if model.protocol == sdn_policies::HttpProtocol::Https {
            let mut certificates = Vec::new();
            // In the listener's order: the first is served when no name
            // matches.
            for (k, id) in model.certificate_ids.iter().enumerate() {
                let c = l
                    .certificates
                    .iter()
                    .find(|c| c.id == *id)
                    .ok_or(format!("http listener {}: certificate {id} was not sent", model.id))?;
                if c.key_pem.is_empty() {
                    return Err(format!(
                        "http listener {}: certificate {id} came without its key",
                        model.id
                    ));
                }
                // By place, never by id: two ids cannot share a file.
                let base = dir.join(format!("listener{i}-certificate{k}"));
                let (cert, key) = (base.with_extension("crt"), base.with_extension("key"));
                files.push(ProxyFile {
                    path: cert.clone(),
                    text: c.cert_pem.clone(),
                });
                files.push(ProxyFile {
                    path: key.clone(),
                    text: c.key_pem.clone(),
                });
                certificates.push(px::Certificate { cert, key });
            }
            Some(px::Tls { certificates })
        } else {
            None
        };
        // The listener's pools, under names of their own: scheduler,
        // persistence and the PROXY protocol are the listener's. A pool
        // with no member to send to answers 503.
        let mut named: BTreeMap<&str, Option<String>> = BTreeMap::new();
        for hp in &l.pools {
            let pool = hp.pool.as_ref().ok_or(format!("{at}: a pool without its pool"))?;
            let members: Vec<px::Member> = hp
                .backends
                .iter()
                .filter(|b| b.state == "enabled" || b.state.is_empty())
                .filter_map(|b| {
                    let address = b.addresses.iter().filter_map(|a| a.parse::<IpAddr>().ok()).next()?;
                    Some(px::Member {
                        name: name(&b.member_id),
                        address: SocketAddr::new(address, u16::try_from(b.port).ok()?),
                        weight: b.weight.clamp(1, px::WEIGHT_MAX),
                    })
                })
                .collect();
            if members.is_empty() {
                named.insert(&pool.id, None);
                continue;
            }
            let pool_name = format!("{}-{}", pools.len(), name(&pool.id));
            named.insert(&pool.id, Some(pool_name.clone()));
            pools.push(px::Pool {
                name: pool_name,
                scheduler: match &model.scheduler {
                    sdn_policies::HttpScheduler::RoundRobin => px::Scheduler::RoundRobin,
                    sdn_policies::HttpScheduler::WeightedRoundRobin => px::Scheduler::WeightedRoundRobin,
                    sdn_policies::HttpScheduler::LeastConnections => px::Scheduler::LeastConnections,
                    sdn_policies::HttpScheduler::HashHeader(h) => px::Scheduler::HashHeader(h.clone()),
                    sdn_policies::HttpScheduler::HashCookie(c) => px::Scheduler::HashCookie(c.clone()),
                },
                cookie: model.cookie.as_ref().map(|c| px::Cookie {
                    name: c.name.clone(),
                    mode: match c.mode {
                        sdn_policies::HttpCookieMode::Insert => px::CookieMode::Insert,
                        sdn_policies::HttpCookieMode::Learn => px::CookieMode::Learn,
                    },
                }),
                health: pool.health.as_ref().map(health),
                proxy_protocol: model.proxy_protocol.map(|v| match v {
                    sdn_policies::ProxyProtocol::V1 => px::ProxyProtocol::V1,
                    sdn_policies::ProxyProtocol::V2 => px::ProxyProtocol::V2,
                }),
                members,
            });
        }
        let no_members = |what: &str| px::Action::Respond {
            status: 503,
            body: format!("{what} has no member to send to\n"),
            content_type: Some("text/plain".into()),
        };
        let mut rules: Vec<px::Rule> = model
            .rules
            .iter()
            .map(|r| {
                let mut rule = sdn_policies::l7::proxy_rule(r);
                if let px::Action::Pool(p) = &rule.action {
                    rule.action = match named.get(p.as_str()) {
                        Some(Some(n)) => px::Action::Pool(n.clone()),
                        _ => no_members(&format!("pool {p}")),
                    };
                }
                rule
            })
            .collect();
        let default_pool = match model.pool_id.as_deref().map(|p| (p, named.get(p))) {
            None => None,
            Some((_, Some(Some(n)))) => Some(n.clone()),
            // A default pool with no member: every request it would take
            // is answered 503, by a last rule that takes them all.
            Some((p, _)) => {
                rules.push(px::Rule {
                    name: "default-pool-empty".into(),
                    host: None,
                    path_prefix: None,
                    path_regex: None,
                    header: None,
                    method: None,
                    action: no_members(&format!("pool {p}")),
                });
                None
            }
        };
        let trusted_proxies: Vec<String> = model.trusted_proxies.iter().map(|n| n.to_string()).collect();
        let mut addresses = vec![IpAddr::V4(Ipv4Addr::UNSPECIFIED)];
        if has_v6 {
            addresses.push(IpAddr::V6(Ipv6Addr::UNSPECIFIED));
        }
        for a in addresses {
            listeners.push(px::Listener {
                name: format!("{i}-{}{}", name(&model.id), if a.is_ipv6() { "-v6" } else { "" }),
                listen: SocketAddr::new(a, model.port),
                tls: tls.clone(),
                rules: rules.clone(),
                default_pool: default_pool.clone(),
                forwarded: true,
                trusted_proxies: trusted_proxies.clone(),
            });
        }
    }
    let config = px::Config {
        listeners,
        pools,
        timeouts: px::Timeouts::default(),
    };
    let text = serde_json::to_string_pretty(&config).map_err(|e| e.to_string())?;
    // What the proxy would refuse is refused here, before it is written.
    px::Config::parse(&text).map_err(|e| format!("the proxy refuses its configuration: {e}"))?;
    Ok((text, files))
}

/// A pool's health check as the proxy runs it: an HTTP probe as it is; a
/// TCP probe as a GET of `/` that passes on any answer at all.
fn health(h: &pb::HealthCheck) -> px::Health {
    let (path, status) = if h.probe == "http" {
        let (lo, hi) = (h.status_min.max(100) as u16, h.status_max.min(599) as u16);
        (h.http_path.clone(), (lo..=hi).collect())
    } else {
        ("/".to_string(), (100..=599).collect())
    };
    px::Health {
        path,
        host: None,
        status,
        body: None,
        interval_ms: u64::from(h.interval_ms).max(px::HEALTH_INTERVAL_MIN_MS),
        timeout_ms: u64::from(if h.timeout_ms == 0 { h.interval_ms } else { h.timeout_ms }).max(1),
        rise: h.rise.clamp(1, 100),
        fall: h.fall.clamp(1, 100),
    }
}

/// An id as a name of the proxy's (letters, digits, `-` and `_`, at most
/// 40 bytes: room for the place before it and `-v6` after, within the
/// proxy's 50). Names must not meet: an id that does not pass as it is
/// (`m.1` beside `m_1`, or too long) is cut and followed by a hash of it
/// whole. A name stays the same for the same id, so persistence cookies
/// (the member's name) hold across reloads and proxies.
fn name(id: &str) -> String {
    let kept = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if id.len() <= 40 && id.chars().all(kept) {
        return id.to_string();
    }
    let head: String = id.chars().map(|c| if kept(c) { c } else { '_' }).take(23).collect();
    format!("{head}-{:016x}", fnv1a64(id.as_bytes()))
}

/// FNV-1a, 64 bits: stable across restarts and releases, for names that
/// must stay the same (proxies' member names, slots).
pub(crate) fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(id: &str, address: &str, state: &str) -> pb::BackendOnHost {
        pb::BackendOnHost {
            member_id: id.into(),
            addresses: vec![address.into()],
            port: 8080,
            weight: 2,
            state: state.into(),
            ..Default::default()
        }
    }

    fn proxy() -> pb::HttpProxyOnHost {
        let listener = pb::HttpListener {
            id: "portal.https".into(),
            load_balancer_id: "lb".into(),
            protocol: "https".into(),
            port: 443,
            certificate_ids: vec!["second".into(), "first".into()],
            rules: vec![
                pb::HttpRule {
                    name: "api".into(),
                    path_prefix: "/api/".into(),
                    pool_id: "web.1".into(),
                    ..Default::default()
                },
                pb::HttpRule {
                    name: "old".into(),
                    path_prefix: "/old/".into(),
                    pool_id: "empty".into(),
                    ..Default::default()
                },
            ],
            pool_id: "empty".into(),
            scheduler: "hash_cookie".into(),
            hash_key: "SESSION".into(),
            cookie_name: "SRV".into(),
            proxy_ports: vec!["x1".into()],
            trusted_proxies: vec!["10.9.0.0/16".into()],
            ..Default::default()
        };
        let cert = |id: &str| pb::Certificate {
            id: id.into(),
            cert_pem: format!("CERT {id}"),
            key_pem: format!("KEY {id}"),
            ..Default::default()
        };
        pb::HttpProxyOnHost {
            port: Some(pb::Port {
                id: "x1".into(),
                ipv4: "10.1.0.21".into(),
                ipv6: "fd01::21".into(),
                ..Default::default()
            }),
            listeners: vec![pb::HttpListenerOnHost {
                listener: Some(listener),
                certificates: vec![cert("first"), cert("second")],
                pools: vec![
                    pb::HttpPoolOnHost {
                        pool: Some(pb::Pool {
                            id: "web.1".into(),
                            health: Some(pb::HealthCheck {
                                probe: "http".into(),
                                http_path: "/healthz".into(),
                                status_min: 200,
                                status_max: 204,
                                interval_ms: 500,
                                timeout_ms: 400,
                                rise: 2,
                                fall: 3,
                            }),
                            ..Default::default()
                        }),
                        backends: vec![
                            backend("m.1", "10.1.0.11", "enabled"),
                            backend("m2", "10.1.0.12", "disabled"),
                            backend("m3", "10.1.0.13", "draining"),
                        ],
                    },
                    pb::HttpPoolOnHost {
                        pool: Some(pb::Pool {
                            id: "empty".into(),
                            ..Default::default()
                        }),
                        backends: vec![backend("m4", "10.1.0.14", "disabled")],
                    },
                ],
            }],
            ..Default::default()
        }
    }

    /// A proxy port's resource becomes a configuration the proxy takes:
    /// its names the proxy's, its certificates in the listener's order,
    /// members that take nothing left out, and pools with none answering
    /// 503.
    #[test]
    fn a_proxy_port_becomes_the_proxys_configuration() {
        let (text, files) = proxy_config(&proxy(), Path::new("/run/p")).unwrap();
        let c = px::Config::parse(&text).unwrap();
        assert_eq!(c.listeners.len(), 2, "IPv4 and IPv6");
        let l = &c.listeners[0];
        assert!(l.name.starts_with("0-portal_https-"), "{}", l.name);
        assert_eq!(l.listen, "0.0.0.0:443".parse().unwrap());
        assert_eq!(c.listeners[1].listen, "[::]:443".parse().unwrap());
        let certs = &l.tls.as_ref().unwrap().certificates;
        assert_eq!(certs[0].cert, Path::new("/run/p/listener0-certificate0.crt"));
        assert_eq!(certs[1].key, Path::new("/run/p/listener0-certificate1.key"));
        assert_eq!(files.len(), 4);
        assert!(files
            .iter()
            .any(|f| f.path == Path::new("/run/p/listener0-certificate1.key") && f.text == "KEY first"));
        assert!(files
            .iter()
            .any(|f| f.path == Path::new("/run/p/listener0-certificate0.crt") && f.text == "CERT second"));
        assert_eq!(c.pools.len(), 1);
        let p = &c.pools[0];
        assert!(p.name.starts_with("0-web_1-"), "{}", p.name);
        assert_eq!(p.members.len(), 1, "disabled and draining members take no request");
        assert_eq!(p.members[0].address, "10.1.0.11:8080".parse().unwrap());
        assert_eq!(p.scheduler, px::Scheduler::HashCookie("SESSION".into()));
        assert_eq!(p.cookie.as_ref().unwrap().mode, px::CookieMode::Insert);
        let h = p.health.as_ref().unwrap();
        assert_eq!(
            (h.path.as_str(), h.status.clone()),
            ("/healthz", vec![200, 201, 202, 203, 204])
        );
        assert!(matches!(&l.rules[0].action, px::Action::Pool(n) if *n == p.name));
        // Ids that would meet once made names stay apart; one that passes
        // as it is stays itself.
        assert_ne!(name("m.1"), name("m_1"));
        assert_eq!(name("m_1"), "m_1");
        assert_ne!(name(&"a".repeat(60)), name(&"a".repeat(61)));
        assert!(name(&"a".repeat(60)).len() <= 40);
        assert!(matches!(&l.rules[1].action, px::Action::Respond { status: 503, .. }));
        // The empty default pool: a last rule answers 503.
        assert_eq!(l.default_pool, None);
        assert!(matches!(&l.rules[2].action, px::Action::Respond { status: 503, .. }));
        assert_eq!(l.trusted_proxies, ["10.9.0.0/16"]);
    }

    /// A certificate missing, or sent without its key, fails the whole
    /// configuration; nothing is half made.
    #[test]
    fn a_certificate_without_its_key_fails_the_whole() {
        let mut p = proxy();
        p.listeners[0].certificates[0].key_pem.clear();
        let e = proxy_config(&p, Path::new("/run/p")).err().unwrap();
        assert!(e.contains("certificate first came without its key"), "{e}");
        p.listeners[0].certificates.remove(0);
        let e = proxy_config(&p, Path::new("/run/p")).err().unwrap();
        assert!(e.contains("certificate first was not sent"), "{e}");
    }
}
