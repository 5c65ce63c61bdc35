//! What the proxy serves: its listeners (each with TLS certificates, its
//! rules in priority order and a default pool) and its pools (members, a
//! scheduler, cookie persistence). The agent writes it as JSON from the
//! host's share; the proxy reads it at start and again on SIGHUP. Every
//! field is checked before anything is served, and an error names the
//! field (`listeners[0].rules[2].path_regex: ...`); a configuration that
//! fails leaves the one being served as it is.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// Client connections' time limits.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// How long a client connection may go without its first request, idle
/// between requests (HTTP/2 pings do not count), or stalled in the middle
/// of one (no byte moved either way).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "ten_seconds")]
    pub first_request_ms: u64,
    #[serde(default = "a_minute")]
    pub idle_ms: u64,
    #[serde(default = "a_minute")]
    pub stalled_ms: u64,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            first_request_ms: ten_seconds(),
            idle_ms: a_minute(),
            stalled_ms: a_minute(),
        }
    }
}

fn ten_seconds() -> u64 {
    10_000
}
fn a_minute() -> u64 {
    60_000
}

impl Timeouts {
    pub fn limits(&self) -> crate::guard::Limits {
        let ms = std::time::Duration::from_millis;
        let shortest = self.first_request_ms.min(self.idle_ms).min(self.stalled_ms);
        crate::guard::Limits {
            first_request: ms(self.first_request_ms),
            idle: ms(self.idle_ms),
            stalled: ms(self.stalled_ms),
            tick: ms((shortest / 4).clamp(10, 500)),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub name: String,
    /// The address and port it listens on.
    pub listen: SocketAddr,
    /// HTTPS: the certificates, chosen by the name the client asks for
    /// (SNI); the first for a client that names none, or none of theirs.
    #[serde(default)]
    pub tls: Option<Tls>,
    /// Tried in order; the first that matches decides.
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Where a request no rule matches goes (none: 404).
    #[serde(default)]
    pub default_pool: Option<String>,
    /// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
    /// `Forwarded` towards the members (on unless said otherwise).
    #[serde(default = "yes")]
    pub forwarded: bool,
    /// Clients whose own forwarding headers are believed (proxies in
    /// front of this one): theirs are appended to. From any other client
    /// those headers (and `X-Real-IP` and the like) are dropped.
    #[serde(default)]
    pub trusted_proxies: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    pub certificates: Vec<Certificate>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificate {
    /// PEM: the certificate, then its chain.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
}

/// A forwarding rule: every condition given must hold.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    pub name: String,
    /// The request's host (without a port), exactly, or `*.example.org`
    /// for any name under it; case does not matter.
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// A regular expression the whole path must match.
    #[serde(default)]
    pub path_regex: Option<String>,
    /// A header that must be present, with this value if one is given.
    #[serde(default)]
    pub header: Option<HeaderMatch>,
    #[serde(default)]
    pub method: Option<String>,
    pub action: Action,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderMatch {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// To a pool's members.
    Pool(String),
    /// A redirect: 301, 302, 303, 307 or 308 to `location`.
    Redirect { location: String, status: u16 },
    /// A fixed response.
    Respond {
        status: u16,
        #[serde(default)]
        body: String,
        #[serde(default)]
        content_type: Option<String>,
    },
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    pub name: String,
    pub scheduler: Scheduler,
    /// Cookie persistence.
    #[serde(default)]
    pub cookie: Option<Cookie>,
    /// Health checks of each member (none: every member is taken as up).
    #[serde(default)]
    pub health: Option<Health>,
    /// The PROXY protocol (v1, text, or v2, binary) on each connection to
    /// a member, naming the client; such connections carry one client's
    /// requests only.
    #[serde(default)]
    pub proxy_protocol: Option<ProxyProtocol>,
    pub members: Vec<Member>,
}

/// An HTTP health check, as haproxy's `option httpchk` with `http-check
/// expect`: a GET of `path` on a new connection to each member every
/// `interval_ms`; it passes when the answer comes within `timeout_ms` with
/// one of `status` and, if `body` is given, a body (its first 64 KiB)
/// that contains it. A member goes down after `fall` failures in a row
/// and up after `rise` passes; the first check decides at once.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Health {
    #[serde(default = "slash")]
    pub path: String,
    /// The `Host` of the checks (none: the member's address).
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "ok")]
    pub status: Vec<u16>,
    #[serde(default)]
    pub body: Option<String>,
    #[serde(default = "two_seconds")]
    pub interval_ms: u64,
    #[serde(default = "one_second")]
    pub timeout_ms: u64,
    #[serde(default = "two")]
    pub rise: u32,
    #[serde(default = "three")]
    pub fall: u32,
}

fn slash() -> String {
    "/".into()
}
fn ok() -> Vec<u16> {
    vec![200]
}
fn two_seconds() -> u64 {
    2000
}
fn one_second() -> u64 {
    1000
}
fn two() -> u32 {
    2
}
fn three() -> u32 {
    3
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Scheduler {
    RoundRobin,
    WeightedRoundRobin,
    LeastConnections,
    /// Consistent hash of a request header's value (rendezvous hashing,
    /// weighted); a request without it is sent round robin.
    HashHeader(String),
    /// The same on a cookie's value.
    HashCookie(String),
}

/// Cookie persistence, as haproxy's `cookie NAME insert` (the proxy sets a
/// cookie naming the member; a request carrying it goes there while the
/// member is up) or `learn` (a cookie the members set, such as a session
/// id, is remembered with the member that set it).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Cookie {
    pub name: String,
    pub mode: CookieMode,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ProxyProtocol {
    V1,
    V2,
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum CookieMode {
    Insert,
    Learn,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Member {
    /// Unique in its pool; the value of an inserted cookie.
    pub name: String,
    pub address: SocketAddr,
    #[serde(default = "one")]
    pub weight: u32,
}

fn one() -> u32 {
    1
}

/// The largest weight a member may have.
pub const WEIGHT_MAX: u32 = 1000;

impl Listener {
    /// Its trusted proxies, parsed (checked before).
    pub fn trusted(&self) -> Vec<ipnetwork::IpNetwork> {
        self.trusted_proxies.iter().filter_map(|n| n.parse().ok()).collect()
    }
}

impl Config {
    /// Reads and checks a configuration: its JSON, then every field.
    pub fn parse(text: &str) -> Result<Config, String> {
        let c: Config =
            serde_json::from_str(text).map_err(|e| format!("line {}, column {}: {e}", e.line(), e.column()))?;
        c.check()?;
        Ok(c)
    }

    fn check(&self) -> Result<(), String> {
        for (field, v) in [
            ("first_request_ms", self.timeouts.first_request_ms),
            ("idle_ms", self.timeouts.idle_ms),
            ("stalled_ms", self.timeouts.stalled_ms),
        ] {
            if !(100..=3_600_000).contains(&v) {
                return Err(format!("timeouts.{field}: {v} is not within 100 to 3600000"));
            }
        }
        let mut pools = BTreeSet::new();
        for (i, p) in self.pools.iter().enumerate() {
            let at = format!("pools[{i}]");
            name(&format!("{at}.name"), &p.name)?;
            if !pools.insert(p.name.as_str()) {
                return Err(format!("{at}.name: pool {:?} is named twice", p.name));
            }
            if p.members.is_empty() {
                return Err(format!("{at}.members: a pool needs at least one member"));
            }
            let mut names = BTreeSet::new();
            for (j, m) in p.members.iter().enumerate() {
                name(&format!("{at}.members[{j}].name"), &m.name)?;
                if !names.insert(m.name.as_str()) {
                    return Err(format!("{at}.members[{j}].name: member {:?} is named twice", m.name));
                }
                if m.weight == 0 || m.weight > WEIGHT_MAX {
                    return Err(format!(
                        "{at}.members[{j}].weight: {} is not within 1 to {WEIGHT_MAX}",
                        m.weight
                    ));
                }
                if m.address.port() == 0 || m.address.ip().is_unspecified() {
                    return Err(format!(
                        "{at}.members[{j}].address: {} is no member's address",
                        m.address
                    ));
                }
            }
            match &p.scheduler {
                Scheduler::HashHeader(h) => header_name(&format!("{at}.scheduler.hash_header"), h)?,
                Scheduler::HashCookie(c) => cookie_name(&format!("{at}.scheduler.hash_cookie"), c)?,
                _ => {}
            }
            if let Some(c) = &p.cookie {
                cookie_name(&format!("{at}.cookie.name"), &c.name)?;
            }
            if let Some(h) = &p.health {
                h.check(&format!("{at}.health"))?;
            }
        }
        let mut listeners = BTreeSet::new();
        let mut addresses = BTreeSet::new();
        for (i, l) in self.listeners.iter().enumerate() {
            let at = format!("listeners[{i}]");
            name(&format!("{at}.name"), &l.name)?;
            if !listeners.insert(l.name.as_str()) {
                return Err(format!("{at}.name: listener {:?} is named twice", l.name));
            }
            if !addresses.insert(l.listen) {
                return Err(format!("{at}.listen: {} is another listener's", l.listen));
            }
            if let Some(t) = &l.tls {
                if t.certificates.is_empty() {
                    return Err(format!("{at}.tls.certificates: HTTPS needs at least one certificate"));
                }
            }
            for (k, n) in l.trusted_proxies.iter().enumerate() {
                n.parse::<ipnetwork::IpNetwork>()
                    .map_err(|e| format!("{at}.trusted_proxies[{k}]: {n:?}: {e}"))?;
            }
            if let Some(p) = &l.default_pool {
                if !pools.contains(p.as_str()) {
                    return Err(format!("{at}.default_pool: no pool is named {p:?}"));
                }
            }
            if l.rules.len() > RULES_MAX {
                return Err(format!("{at}.rules: {} rules, at most {RULES_MAX}", l.rules.len()));
            }
            for (j, r) in l.rules.iter().enumerate() {
                r.check(&format!("{at}.rules[{j}]"), |p| pools.contains(p))?;
            }
        }
        Ok(())
    }
}

impl Rule {
    /// Checks a rule, its errors named under `at` (`listeners[0].rules[2]`);
    /// `has_pool` says whether a pool of that name is there.
    pub fn check(&self, at: &str, has_pool: impl Fn(&str) -> bool) -> Result<(), String> {
        let r = self;
        name(&format!("{at}.name"), &r.name)?;
        if let Some(h) = &r.host {
            let bare = h.strip_prefix("*.").unwrap_or(h);
            if bare.is_empty()
                || bare.contains('*')
                || !bare.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(format!("{at}.host: {h:?} is not a host name (or *.name)"));
            }
        }
        if let Some(p) = &r.path_prefix {
            if !p.starts_with('/') {
                return Err(format!("{at}.path_prefix: {p:?} does not begin with /"));
            }
            // Paths are judged as members read them: a prefix in
            // another spelling would never match.
            match crate::proxy::normal_path(p) {
                Some(n) if n == *p && !p.contains(';') => {}
                Some(n) if !p.contains(';') => {
                    return Err(format!("{at}.path_prefix: {p:?} is read as {n:?}; write it so"))
                }
                _ => return Err(format!("{at}.path_prefix: {p:?} is no path a request can have")),
            }
        }
        if let Some(re) = &r.path_regex {
            if re.len() > REGEX_LEN_MAX {
                return Err(format!("{at}.path_regex: longer than {REGEX_LEN_MAX} bytes"));
            }
            path_regex(re).map_err(|e| format!("{at}.path_regex: {e}"))?;
        }
        if let Some(h) = &r.header {
            header_name(&format!("{at}.header.name"), &h.name)?;
            if let Some(v) = &h.value {
                hyper::header::HeaderValue::from_str(v)
                    .map_err(|_| format!("{at}.header.value: {v:?} cannot be a header's value"))?;
            }
        }
        if let Some(m) = &r.method {
            if m.is_empty() || !m.bytes().all(|b| b.is_ascii_uppercase()) {
                return Err(format!("{at}.method: {m:?} is no method (upper case, as GET)"));
            }
        }
        match &r.action {
            Action::Pool(p) if !has_pool(p) => return Err(format!("{at}.action.pool: no pool is named {p:?}")),
            Action::Redirect { location, status } => {
                if ![301, 302, 303, 307, 308].contains(status) {
                    return Err(format!("{at}.action.redirect.status: {status} is not a redirect"));
                }
                hyper::header::HeaderValue::from_str(location)
                    .map_err(|_| format!("{at}.action.redirect.location: {location:?} cannot be a location"))?;
            }
            Action::Respond {
                status, content_type, ..
            } => {
                if !(200..=599).contains(status) {
                    return Err(format!("{at}.action.respond.status: {status} is not within 200 to 599"));
                }
                if let Some(t) = content_type {
                    hyper::header::HeaderValue::from_str(t)
                        .map_err(|_| format!("{at}.action.respond.content_type: {t:?} cannot be a header's value"))?;
                }
            }
            _ => {}
        }
        Ok(())
    }
}

impl Health {
    fn check(&self, at: &str) -> Result<(), String> {
        if !self.path.starts_with('/') || self.path.parse::<hyper::Uri>().is_err() {
            return Err(format!("{at}.path: {:?} is not a request path", self.path));
        }
        if let Some(h) = &self.host {
            if hyper::http::uri::Authority::try_from(h.as_str()).is_err() || h.contains('@') {
                return Err(format!("{at}.host: {h:?} is not a host"));
            }
        }
        if self.status.is_empty() {
            return Err(format!("{at}.status: name at least one status"));
        }
        if let Some(s) = self.status.iter().find(|s| !(100..=599).contains(*s)) {
            return Err(format!("{at}.status: {s} is not an HTTP status"));
        }
        if self.body.as_ref().is_some_and(|b| b.is_empty() || b.len() > 1024) {
            return Err(format!("{at}.body: 1 to 1024 bytes to look for"));
        }
        if !(HEALTH_INTERVAL_MIN_MS..=HEALTH_INTERVAL_MAX_MS).contains(&self.interval_ms) {
            return Err(format!(
                "{at}.interval_ms: {} is not within {HEALTH_INTERVAL_MIN_MS} to {HEALTH_INTERVAL_MAX_MS}",
                self.interval_ms
            ));
        }
        if self.timeout_ms == 0 || self.timeout_ms > self.interval_ms {
            return Err(format!(
                "{at}.timeout_ms: {} is not within 1 to the interval ({})",
                self.timeout_ms, self.interval_ms
            ));
        }
        for (field, v) in [("rise", self.rise), ("fall", self.fall)] {
            if !(1..=100).contains(&v) {
                return Err(format!("{at}.{field}: {v} is not within 1 to 100"));
            }
        }
        Ok(())
    }
}

/// Rules per listener, at most.
pub const RULES_MAX: usize = 1000;
/// A path regular expression's length, at most.
pub const REGEX_LEN_MAX: usize = 1024;

/// A rule's path expression, anchored to the whole path, within limits
/// of size so no rule costs much per request.
pub fn path_regex(re: &str) -> Result<regex::Regex, regex::Error> {
    regex::RegexBuilder::new(&format!("^(?:{re})$"))
        .size_limit(256 * 1024)
        .dfa_size_limit(1024 * 1024)
        .build()
}

/// The shortest and longest interval between a member's health checks.
pub const HEALTH_INTERVAL_MIN_MS: u64 = 100;
pub const HEALTH_INTERVAL_MAX_MS: u64 = 3_600_000;

fn name(field: &str, n: &str) -> Result<(), String> {
    if n.is_empty() || n.len() > 63 || !n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!(
            "{field}: {n:?} is not a name (1 to 63 of letters, digits, - and _)"
        ));
    }
    Ok(())
}

pub fn header_name(field: &str, h: &str) -> Result<(), String> {
    hyper::header::HeaderName::from_bytes(h.as_bytes())
        .map(|_| ())
        .map_err(|_| format!("{field}: {h:?} is no header name"))
}

pub fn cookie_name(field: &str, c: &str) -> Result<(), String> {
    // RFC 6265: a token.
    if c.is_empty()
        || !c
            .bytes()
            .all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
    {
        return Err(format!("{field}: {c:?} is no cookie name"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "listeners": [{"name": "web", "listen": "127.0.0.1:8080", "default_pool": "p",
            "rules": [{"name": "r", "path_regex": "^/a/[0-9]+$", "action": {"pool": "p"}}]}],
        "pools": [{"name": "p", "scheduler": "round_robin",
            "members": [{"name": "m1", "address": "127.0.0.1:9001"}]}]
    }"#;

    #[test]
    fn a_good_configuration_is_taken() {
        let c = Config::parse(GOOD).unwrap();
        assert_eq!(c.pools[0].members[0].weight, 1);
        assert!(c.listeners[0].forwarded);
    }

    /// Each mistake is named by its field.
    #[test]
    fn mistakes_are_named_by_their_field() {
        for (from, to, said) in [
            ("^/a/[0-9]+$", "^/a/[0-9+$", "listeners[0].rules[0].path_regex"),
            (
                "\"pool\": \"p\"}}",
                "\"pool\": \"q\"}}",
                "listeners[0].rules[0].action.pool",
            ),
            ("127.0.0.1:9001", "0.0.0.0:9001", "pools[0].members[0].address"),
            (
                "\"round_robin\"",
                "{\"hash_header\": \"bad header\"}",
                "pools[0].scheduler.hash_header",
            ),
            (
                "\"default_pool\": \"p\"",
                "\"default_pool\": \"x\"",
                "listeners[0].default_pool",
            ),
            ("\"name\": \"m1\"", "\"name\": \"m 1\"", "pools[0].members[0].name"),
            (
                "\"name\": \"m1\",",
                "\"name\": \"m1\", \"weight\": 0,",
                "pools[0].members[0].weight",
            ),
            (
                "\"path_regex\"",
                "\"path_prefix\": \"x\", \"path_regex\"",
                "listeners[0].rules[0].path_prefix",
            ),
            (
                "\"scheduler\": \"round_robin\",",
                "\"scheduler\": \"round_robin\", \"health\": {\"path\": \"health\"},",
                "pools[0].health.path",
            ),
            (
                "\"scheduler\": \"round_robin\",",
                "\"scheduler\": \"round_robin\", \"health\": {\"status\": [200, 700]},",
                "pools[0].health.status",
            ),
            (
                "\"scheduler\": \"round_robin\",",
                "\"scheduler\": \"round_robin\", \"health\": {\"interval_ms\": 500, \"timeout_ms\": 900},",
                "pools[0].health.timeout_ms",
            ),
            (
                "\"scheduler\": \"round_robin\",",
                "\"scheduler\": \"round_robin\", \"health\": {\"fall\": 0},",
                "pools[0].health.fall",
            ),
            (
                "\"path_regex\": \"^/a/[0-9]+$\"",
                "\"path_prefix\": \"/a/%7e/\"",
                "listeners[0].rules[0].path_prefix: \"/a/%7e/\" is read as \"/a/~/\"",
            ),
            (
                "\"path_regex\": \"^/a/[0-9]+$\"",
                "\"path_prefix\": \"/a;x/\"",
                "listeners[0].rules[0].path_prefix",
            ),
            (
                "\"path_regex\": \"^/a/[0-9]+$\"",
                "\"path_regex\": \"(a{100}){100}(b{100}){100}\"",
                "listeners[0].rules[0].path_regex",
            ),
            (
                "\"default_pool\": \"p\",",
                "\"default_pool\": \"p\", \"trusted_proxies\": [\"10.0.0.0/33\"],",
                "listeners[0].trusted_proxies",
            ),
            (
                "\"listeners\": [",
                "\"timeouts\": {\"idle_ms\": 5}, \"listeners\": [",
                "timeouts.idle_ms",
            ),
        ] {
            assert_eq!(GOOD.matches(from).count(), 1, "{from}");
            let e = Config::parse(&GOOD.replace(from, to)).unwrap_err();
            assert!(e.starts_with(said), "{to}: {e}");
        }
        let e = Config::parse("{\"listeners\": [}").unwrap_err();
        assert!(e.starts_with("line 1, column"), "{e}");
        let e = Config::parse(&GOOD.replace("\"rules\"", "\"rulez\"")).unwrap_err();
        assert!(e.contains("rulez"), "{e}");
    }
}
