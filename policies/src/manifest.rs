//! Administrators' manifests: Kubernetes-style YAML documents
//! (`apiVersion`, `kind`, `metadata`, `spec`), several per file separated by
//! `---`. Every error carries the file and line.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};

use ipnetwork::IpNetwork;
use serde::{Deserialize, Serialize};

use crate::limits::input::{MANIFEST_BYTES_MAX, MANIFEST_DEPTH_MAX};
use crate::model::{self, Direction, EtherType, Mac, Op, Protocol, Remote};

/// The API version manifests must declare.
pub const API_VERSION: &str = "sdn/v1";

/// An error in a manifest, with where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    /// 1-based line, when known.
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, self.column) {
            (Some(l), Some(c)) => write!(f, "{}:{}:{}: {}", self.file, l, c, self.message),
            (Some(l), None) => write!(f, "{}:{}: {}", self.file, l, self.message),
            _ => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct Metadata {
    name: String,
    #[serde(default)]
    tenant: Option<String>,
}

/// One document of a known kind, parsed straight from the text so that every
/// error keeps its line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Typed<S> {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: Metadata,
    #[serde(default = "Option::default")]
    spec: Option<S>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VpcPeeringSpec {
    vpc_a: String,
    vpc_b: String,
    /// The VPC firewall between them, read from vpcA's side.
    #[serde(default)]
    firewall: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorSessionSpec {
    /// What is mirrored (none: every port).
    #[serde(default)]
    select: Option<MirrorSelect>,
    #[serde(default)]
    rules: Vec<MirrorRuleSpec>,
    direction: model::MirrorDirection,
    #[serde(default)]
    sample: u32,
    #[serde(default)]
    snap_len: u32,
    #[serde(default)]
    rate_pps: u32,
    destination: MirrorDestinationSpec,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InformationSystemSpec {
    #[serde(default)]
    display_name: Option<String>,
    /// Every port of these VPCs.
    #[serde(default)]
    vpcs: Vec<String>,
    /// And these ports.
    #[serde(default)]
    ports: Vec<String>,
    bandwidth: Vec<SystemBandwidthSpec>,
    #[serde(default)]
    alert_percent: u32,
    #[serde(default)]
    interval_seconds: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct SystemBandwidthSpec {
    zone: String,
    up: Bandwidth,
    down: Bandwidth,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct LoadBalancerSpec {
    #[serde(default)]
    display_name: Option<String>,
    vpc: String,
    #[serde(default)]
    vip_v4: Option<Ipv4Addr>,
    #[serde(default)]
    vip_v6: Option<Ipv6Addr>,
    /// vpc (the default) or zone.
    #[serde(default)]
    exposure: Option<model::Exposure>,
    #[serde(default)]
    nat_hosts: Vec<NatHostSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VirtualIpSpec {
    #[serde(default)]
    display_name: Option<String>,
    vpc: String,
    #[serde(default)]
    ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Ipv6Addr>,
    vrid: u8,
    holders: Vec<VipHolderSpec>,
    /// true unless given.
    #[serde(default)]
    preempt: Option<bool>,
    /// Centiseconds; 10 (100 ms) unless given.
    #[serde(default)]
    advert_interval_cs: Option<u16>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct VipHolderSpec {
    #[serde(default)]
    port: Option<String>,
    #[serde(default)]
    host: Option<String>,
    priority: u8,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct NatHostSpec {
    host: String,
    #[serde(default)]
    ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Ipv6Addr>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CertificateSpec {
    #[serde(default)]
    display_name: Option<String>,
    /// PEM: the certificate, then its chain.
    certificate: String,
    /// PEM: its private key. Never rendered back.
    #[serde(default)]
    private_key: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpListenerSpec {
    load_balancer: String,
    protocol: model::HttpProtocol,
    port: u16,
    #[serde(default)]
    certificates: Vec<String>,
    #[serde(default)]
    rules: Vec<HttpRuleSpec>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    scheduler: Option<String>,
    #[serde(default)]
    hash_key: Option<String>,
    #[serde(default)]
    cookie: Option<HttpCookieSpec>,
    #[serde(default)]
    proxy_protocol: Option<model::ProxyProtocol>,
    proxy_ports: Vec<String>,
    #[serde(default)]
    trusted_proxies: Vec<IpNetwork>,
    #[serde(default)]
    waf_policy: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpCookieSpec {
    name: String,
    #[serde(default)]
    mode: Option<model::HttpCookieMode>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRuleSpec {
    name: String,
    #[serde(default)]
    host: Option<String>,
    #[serde(default)]
    path_prefix: Option<String>,
    #[serde(default)]
    path_regex: Option<String>,
    #[serde(default)]
    header: Option<HttpHeaderSpec>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    pool: Option<String>,
    #[serde(default)]
    redirect: Option<HttpRedirectSpec>,
    #[serde(default)]
    respond: Option<HttpRespondSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpHeaderSpec {
    name: String,
    #[serde(default)]
    value: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct HttpRedirectSpec {
    location: String,
    #[serde(default = "found")]
    status: u16,
}

fn found() -> u16 {
    302
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HttpRespondSpec {
    status: u16,
    #[serde(default)]
    body: String,
    #[serde(default)]
    content_type: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ListenerSpec {
    load_balancer: String,
    protocol: model::LbProtocol,
    port: u16,
    pool: String,
    scheduler: model::Scheduler,
    #[serde(default)]
    persistence_seconds: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PoolSpec {
    #[serde(default)]
    display_name: Option<String>,
    load_balancer: String,
    #[serde(default)]
    health: Option<HealthSpec>,
    #[serde(default)]
    drain_seconds: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HealthSpec {
    /// tcp or http.
    probe: String,
    #[serde(default)]
    path: Option<String>,
    /// The statuses a good answer has (http): `200`, or `200-399`.
    #[serde(default)]
    status: Option<PortRange>,
    interval_ms: u32,
    /// 0 or left out: the interval.
    #[serde(default)]
    timeout_ms: u32,
    rise: u32,
    fall: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MemberSpec {
    pool: String,
    /// A port of the load balancer's VPC ...
    #[serde(default)]
    port: Option<String>,
    /// ... or one address of the VPC.
    #[serde(default)]
    address: Option<IpAddr>,
    /// The member's own port for the flows (left out: the listener's).
    #[serde(default)]
    protocol_port: u16,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    state: Option<model::MemberState>,
}

/// Bits a second: `100000000`, or `"100M"` (k, M, G and T by 1000;
/// `bps` or `bit/s` after them allowed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Bandwidth(u64);

impl<'de> Deserialize<'de> for Bandwidth {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(BandwidthVisitor)
    }
}

struct BandwidthVisitor;

impl serde::de::Visitor<'_> for BandwidthVisitor {
    type Value = Bandwidth;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("bits a second: 100000000 or \"100M\"")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Bandwidth, E> {
        Ok(Bandwidth(n))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Bandwidth, E> {
        u64::try_from(n)
            .map(Bandwidth)
            .map_err(|_| E::custom(format!("bandwidth {n} is negative")))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Bandwidth, E> {
        parse_bandwidth(s).map(Bandwidth).map_err(E::custom)
    }
}

impl Serialize for Bandwidth {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// `"100M"`, `"1.5G"`, `"800kbps"`: bits a second.
fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("bit/s")
        .or_else(|| t.strip_suffix("bps"))
        .unwrap_or(t)
        .trim_end();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1e3),
        Some((i, 'M')) => (&t[..i], 1e6),
        Some((i, 'G')) => (&t[..i], 1e9),
        Some((i, 'T')) => (&t[..i], 1e12),
        _ => (t, 1.0),
    };
    let bad = || format!("invalid bandwidth {s:?}: expected bits a second, such as 100000000 or \"100M\"");
    let n: f64 = num.trim().parse().map_err(|_| bad())?;
    if !n.is_finite() || n < 0.0 || n * mult > u64::MAX as f64 {
        return Err(bad());
    }
    Ok((n * mult).round() as u64)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorSelect {
    #[serde(default)]
    zone: Option<String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    vpc: Option<String>,
    #[serde(default)]
    port: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorRuleSpec {
    protocol: Protocol,
    #[serde(default)]
    source: Option<Cidr>,
    #[serde(default)]
    destination: Option<Cidr>,
    #[serde(default)]
    ports: Option<PortRange>,
}

/// Exactly one of the three.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct MirrorDestinationSpec {
    #[serde(default)]
    tap: Option<MirrorTapSpec>,
    #[serde(default)]
    vxlan: Option<MirrorVxlanSpec>,
    #[serde(default)]
    erspan: Option<MirrorErspanSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MirrorTapSpec {
    port: String,
    vni: u32,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MirrorVxlanSpec {
    remote: IpAddr,
    vni: u32,
    #[serde(default)]
    port: Option<u16>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct MirrorErspanSpec {
    remote: IpAddr,
    version: u8,
    session: u16,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ZoneSpec {
    #[serde(default)]
    display_name: Option<String>,
    prefixes: Vec<Cidr>,
    uplink_device: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FirewallPolicySpec {
    #[serde(default)]
    display_name: Option<String>,
    default_action: model::Action,
    #[serde(default)]
    rules: Vec<FirewallRuleSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct FirewallRuleSpec {
    id: String,
    priority: u32,
    action: model::Action,
    direction: Direction,
    ether_type: EtherType,
    protocol: Protocol,
    #[serde(default)]
    ports: Option<PortRange>,
    #[serde(default)]
    remote_cidr: Option<Cidr>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExchangePathSpec {
    from: String,
    to: String,
    source: Cidr,
    destination: Cidr,
    protocol: Protocol,
    ports: PortRange,
    /// Exempt from the share of a zone that paths may open together; needs
    /// `broadReason`.
    #[serde(default)]
    broad: bool,
    /// Why the path is broad (kept in the audit record).
    #[serde(default)]
    broad_reason: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TenantSpec {
    #[serde(default)]
    display_name: Option<String>,
}

#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VpcSpec {
    #[serde(default)]
    display_name: Option<String>,
    /// The zone whose uplink carries the VPC's outside traffic.
    #[serde(default)]
    zone: Option<String>,
    /// The firewall policy between the VPC and its zone's uplink.
    #[serde(default)]
    border_firewall: Option<String>,
    /// VXLAN network identifier; left out: the store picks one.
    #[serde(default)]
    vni: Option<u32>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SubnetSpec {
    vpc: String,
    #[serde(default)]
    cidr_v4: Option<Cidr>,
    #[serde(default)]
    cidr_v6: Option<Cidr>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct HostSpec {
    underlay_ip: IpAddr,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct PortSpec {
    subnet: String,
    host: String,
    device: String,
    mac: Mac,
    #[serde(default)]
    ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    security_groups: Vec<String>,
    /// The VM the interface belongs to (for quarantining a whole VM).
    #[serde(default)]
    vm: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct SecurityGroupSpec {
    #[serde(default)]
    display_name: Option<String>,
    #[serde(default)]
    rules: Vec<RuleSpec>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RuleSpec {
    id: String,
    direction: Direction,
    ether_type: EtherType,
    protocol: Protocol,
    #[serde(default)]
    ports: Option<PortRange>,
    #[serde(default)]
    remote_cidr: Option<Cidr>,
    #[serde(default)]
    remote_group: Option<String>,
}

/// A prefix written as text; host bits are refused while parsing, so the
/// error carries the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr(IpNetwork);

impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        model::parse_cidr(&s).map(Cidr).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Cidr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

/// `80`, or `"8000-8080"`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PortRange(u16, u16);

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(PortRangeVisitor)
    }
}

struct PortRangeVisitor;

impl PortRangeVisitor {
    fn one<E: serde::de::Error>(n: u64) -> Result<u16, E> {
        u16::try_from(n).map_err(|_| E::custom(format!("port {n} is above 65535")))
    }
}

impl serde::de::Visitor<'_> for PortRangeVisitor {
    type Value = PortRange;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a port number (80) or a range (\"8000-8080\")")
    }

    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<PortRange, E> {
        let p = Self::one(n)?;
        Ok(PortRange(p, p))
    }

    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<PortRange, E> {
        match u64::try_from(n) {
            Ok(n) => self.visit_u64(n),
            Err(_) => Err(E::custom(format!("port {n} is negative"))),
        }
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<PortRange, E> {
        let parse = |t: &str| -> Result<u16, E> {
            let n: u64 = t
                .trim()
                .parse()
                .map_err(|_| E::custom(format!("invalid port range {s:?}: expected N or N-M")))?;
            Self::one(n)
        };
        let (a, b) = match s.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => {
                let p = parse(s)?;
                (p, p)
            }
        };
        if a > b {
            return Err(E::custom(format!("invalid port range {s:?}: {a} is above {b}")));
        }
        Ok(PortRange(a, b))
    }
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.0 == self.1 {
            s.serialize_u16(self.0)
        } else {
            s.collect_str(&format_args!("{}-{}", self.0, self.1))
        }
    }
}

/// An operation and where its document starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub op: Op,
    pub file: String,
    pub line: usize,
    /// The document's text (from `line` on).
    pub text: std::sync::Arc<str>,
}

impl Located {
    /// The line of a field of the document ("spec.rules[2].ports"): the
    /// line of its key, or of its list item; the document's first line
    /// when the field is not written out (a default, or a flow style the
    /// search does not follow).
    pub fn line_of(&self, field: &str) -> usize {
        field_line(&self.text, field).map_or(self.line, |i| self.line + i)
    }
}

/// The line (from 0) of a field path in a YAML document in block style:
/// each name is looked for as a key below its parent's indentation, each
/// index as that item of the list below it.
fn field_line(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let blank = |l: &str| l.trim().is_empty() || l.trim_start().starts_with('#');
    // The line found so far and the indentation its children are below.
    let (mut at, mut parent): (usize, isize) = (0, -1);
    // Where the next key is looked for from: the top, the line after its
    // parent's key, or a list item's own line (its first key follows "- ").
    let mut from = 0;
    for seg in field.split('.').filter(|s| !s.is_empty()) {
        let (name, indexes) = seg.split_at(seg.find('[').unwrap_or(seg.len()));
        let mut found = None;
        for (i, l) in lines.iter().enumerate().skip(from) {
            if blank(l) {
                continue;
            }
            let (ind, body) = (indent(l), l.trim_start());
            if (ind as isize) <= parent && !(i == at && body.starts_with("- ")) {
                break;
            }
            let (ind, body) = match body.strip_prefix("- ") {
                Some(b) => (ind + 2 + (b.len() - b.trim_start().len()), b.trim_start()),
                None => (ind, body),
            };
            if body.strip_prefix(name).is_some_and(|r| r.starts_with(':')) {
                found = Some((i, ind));
                break;
            }
        }
        let (i, ind) = found?;
        at = i;
        parent = ind as isize;
        from = at + 1;
        // Each index: that item of the list below.
        for idx in indexes.split('[').filter_map(|t| t.strip_suffix(']')) {
            let n: usize = idx.parse().ok()?;
            let mut seen = 0;
            let mut item = None;
            for (j, l) in lines.iter().enumerate().skip(at + 1) {
                if blank(l) {
                    continue;
                }
                let ind = indent(l);
                // Lists may sit at their key's own indentation.
                if (ind as isize) < parent || ((ind as isize) == parent && !l.trim_start().starts_with("- ")) {
                    break;
                }
                if l.trim_start().starts_with("- ") || l.trim_start() == "-" {
                    if seen == n {
                        item = Some((j, ind));
                        break;
                    }
                    seen += 1;
                }
            }
            let (j, ind) = item?;
            at = j;
            parent = ind as isize;
            from = at;
        }
    }
    Some(at)
}

fn at(file: &str, line: Option<usize>, column: Option<usize>, message: impl Into<String>) -> ManifestError {
    ManifestError {
        file: file.to_string(),
        line,
        column,
        message: message.into(),
    }
}

/// The line and column (1-based) of byte `at` of `bytes`.
fn position(bytes: &[u8], at: usize) -> (usize, usize) {
    let before = &bytes[..at.min(bytes.len())];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let col = before.iter().rev().take_while(|&&b| b != b'\n').count() + 1;
    (line, col)
}

/// The deepest nesting of a manifest and the line where it is reached:
/// block indentation levels plus flow `[`/`{` levels, outside quotes and
/// comments. Linear in the text, so it runs before the YAML parser.
fn nesting(text: &str) -> (usize, usize) {
    let mut indents: Vec<usize> = Vec::new();
    let mut flow = 0usize;
    let (mut max, mut at) = (0, 1);
    for (n, line) in text.lines().enumerate() {
        let body = line.trim_start_matches([' ', '-']);
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let indent = line.len() - body.len();
        if flow == 0 {
            while indents.last().is_some_and(|&i| i >= indent) {
                indents.pop();
            }
            indents.push(indent);
        }
        let mut quote: Option<char> = None;
        for c in body.chars() {
            match (quote, c) {
                (Some(q), c) if c == q => quote = None,
                (Some(_), _) => {}
                (None, '"' | '\'') => quote = Some(c),
                (None, '#') => break,
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                _ => {}
            }
            if indents.len() + flow > max {
                (max, at) = (indents.len() + flow, n + 1);
            }
        }
    }
    (max, at)
}

/// Parses one file's bytes: checked for size, UTF-8, NUL bytes and
/// nesting before the YAML parser sees them.
pub fn parse_bytes(file: &str, bytes: &[u8]) -> Result<Vec<Located>, ManifestError> {
    if bytes.len() as u64 > MANIFEST_BYTES_MAX {
        return Err(at(
            file,
            None,
            None,
            format!(
                "{} bytes; a manifest file holds at most {MANIFEST_BYTES_MAX} bytes (split it into several files)",
                bytes.len()
            ),
        ));
    }
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let (line, col) = position(bytes, e.valid_up_to());
        at(file, Some(line), Some(col), "not UTF-8 text: a manifest is UTF-8 YAML")
    })?;
    parse_str(file, text)
}

/// Parses every document of one file's text.
pub fn parse_str(file: &str, text: &str) -> Result<Vec<Located>, ManifestError> {
    if let Some(i) = text.find('\0') {
        let (line, col) = position(text.as_bytes(), i);
        return Err(at(file, Some(line), Some(col), "a NUL byte: a manifest is text"));
    }
    let (depth, line) = nesting(text);
    if depth > MANIFEST_DEPTH_MAX {
        return Err(at(
            file,
            Some(line),
            None,
            format!("nested {depth} levels deep; a manifest nests at most {MANIFEST_DEPTH_MAX}"),
        ));
    }
    let mut out = Vec::new();
    // Split on document markers ourselves, to know each document's first line.
    let mut docs: Vec<(usize, String)> = vec![(1, String::new())];
    for (i, line) in text.lines().enumerate() {
        if line.trim_end() == "---" {
            docs.push((i + 2, String::new()));
        } else {
            let d = &mut docs.last_mut().expect("one document").1;
            d.push_str(line);
            d.push('\n');
        }
    }
    for (start, body) in docs {
        if body
            .lines()
            .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
        {
            continue;
        }
        let yerr = |e: serde_yaml::Error| {
            let loc = e.location();
            let msg = e.to_string();
            // serde_yaml appends " at line L column C"; we report it ourselves.
            let msg = msg.split(" at line ").next().unwrap_or(&msg).to_string();
            at(
                file,
                loc.as_ref().map(|l| l.line() + start - 1).or(Some(start)),
                loc.map(|l| l.column()),
                msg,
            )
        };
        let header: serde_yaml::Value = serde_yaml::from_str(&body).map_err(yerr)?;
        let kind = header.get("kind").and_then(|k| k.as_str()).ok_or_else(|| {
            at(
                file,
                Some(start),
                None,
                format!("kind: missing; one of {}", KINDS.join(", ")),
            )
        })?;
        let Some(parsed) = parse_doc(kind, &body) else {
            let line = body.lines().position(|l| l.starts_with("kind:")).map(|i| i + start);
            return Err(at(
                file,
                line.or(Some(start)),
                None,
                format!("kind: unknown kind {kind:?}; one of {}", KINDS.join(", ")),
            ));
        };
        let parsed = parsed.map_err(yerr)?;
        let text: std::sync::Arc<str> = body.into();
        let op = parsed.map_err(|m| {
            let field = m.split(": ").next().unwrap_or("");
            at(
                file,
                Some(field_line(&text, field).map_or(start, |i| start + i)),
                None,
                m,
            )
        })?;
        out.push(Located {
            op,
            file: file.to_string(),
            line: start,
            text,
        });
    }
    Ok(out)
}

fn check_version(v: &str) -> Result<(), String> {
    if v == API_VERSION {
        Ok(())
    } else {
        Err(format!("apiVersion: {v:?} is not supported; use {API_VERSION:?}"))
    }
}

fn need_tenant(m: &Metadata, kind: &str) -> Result<String, String> {
    m.tenant
        .clone()
        .ok_or_else(|| format!("metadata.tenant: a {kind} needs its tenant"))
}

fn spec<S>(spec: Option<S>) -> Result<S, String> {
    spec.ok_or_else(|| "spec: missing".to_string())
}

/// What a kind is in a manifest: the `spec` it reads, and the document it
/// renders back. Parsing a rendered document gives the object back.
trait ManifestResource: Sized {
    type Spec: serde::de::DeserializeOwned;
    /// The object of a document. An error starts with the field, in the
    /// manifest's spelling (`spec.cidrV4: ...`).
    fn from_manifest(metadata: Metadata, spec: Option<Self::Spec>) -> Result<Self, String>;
    /// The object's name, its `metadata.tenant`, and its `spec`; fields at
    /// their defaults are left out.
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value);
}

/// A document of kind `T`: the YAML's own error when its shape is wrong,
/// then the model's.
fn parse_typed<T: ManifestResource>(body: &str) -> Result<Result<T, String>, serde_yaml::Error> {
    let typed: Typed<T::Spec> = serde_yaml::from_str(body)?;
    Ok(check_version(&typed.api_version).and_then(|()| T::from_manifest(typed.metadata, typed.spec)))
}

/// The document of an object, from its parts.
fn document<T: ManifestResource>(kind: &str, x: &T) -> serde_json::Value {
    let (name, tenant, spec) = x.to_manifest();
    let mut meta = serde_json::json!({ "name": name });
    if let Some(t) = tenant {
        meta["tenant"] = serde_json::json!(t);
    }
    let mut d = serde_json::json!({ "apiVersion": API_VERSION, "kind": kind, "metadata": meta });
    if !spec.as_object().is_some_and(|o| o.is_empty()) {
        d["spec"] = spec;
    }
    d
}

macro_rules! manifest_kinds {
    ($(($kind:ident, $ty:ident, $name:literal, $map:ident, $put:ident,
        list: $list:ident, order: $order:literal, manifest: [$($manifest:literal)?], log: $log:literal)),* $(,)?) => {
        /// The kinds a manifest may declare.
        pub const KINDS: &[&str] = &[$($($manifest,)?)*];

        /// The operation of a document whose `kind:` is `kind`; `None` for a
        /// kind no manifest declares.
        fn parse_doc(kind: &str, body: &str) -> Option<Result<Result<Op, String>, serde_yaml::Error>> {
            $($(if kind == $manifest {
                return Some(parse_typed::<model::$ty>(body).map(|r| r.map(Op::$put)));
            })?)*
            None
        }

        /// Renders an object (a put operation) as a manifest document, the
        /// inverse of parsing: `parse_str` of the YAML of this value gives
        /// the operation back. `None` for what no manifest declares.
        pub fn render(op: &Op) -> Option<serde_json::Value> {
            match op {
                $($(Op::$put(x) => Some(document($manifest, x)),)?)*
                _ => None,
            }
        }

        /// Whether an operation of the API (`put_port`) is one manifests
        /// write.
        fn written_by_manifests(op: &str) -> bool {
            $($(if op == concat!("put_", $name) {
                let _ = $manifest;
                return true;
            })?)*
            false
        }
    };
}

crate::for_each_kind!(manifest_kinds);

/// A display name: the name itself when not given.
fn display_name(given: Option<String>, name: &str) -> String {
    given.unwrap_or_else(|| name.to_string())
}

/// `spec.displayName`, when it differs from the name.
fn put_display_name(spec: &mut serde_json::Value, display: &str, name: &str) {
    if display != name {
        spec["displayName"] = serde_json::json!(display);
    }
}

/// A text field of a spec, left out when empty.
fn put_text(spec: &mut serde_json::Value, field: &str, text: &str) {
    if !text.is_empty() {
        spec[field] = serde_json::json!(text);
    }
}

fn ports_json((a, b): (u16, u16)) -> serde_json::Value {
    if a == b {
        serde_json::json!(a)
    } else {
        serde_json::json!(format!("{a}-{b}"))
    }
}

impl ManifestResource for model::Tenant {
    type Spec = TenantSpec;
    fn from_manifest(metadata: Metadata, spec: Option<TenantSpec>) -> Result<Self, String> {
        let spec = spec.unwrap_or_default();
        Ok(model::Tenant {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({});
        put_display_name(&mut spec, &self.name, &self.id);
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::Vpc {
    type Spec = VpcSpec;
    fn from_manifest(metadata: Metadata, spec: Option<VpcSpec>) -> Result<Self, String> {
        let spec = spec.unwrap_or_default();
        Ok(model::Vpc {
            tenant_id: need_tenant(&metadata, "Vpc")?,
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            vni: spec.vni.unwrap_or(0),
            zone_id: spec.zone.unwrap_or_default(),
            border_policy_id: spec.border_firewall.unwrap_or_default(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({});
        put_display_name(&mut spec, &self.name, &self.id);
        if self.vni != 0 {
            spec["vni"] = serde_json::json!(self.vni);
        }
        put_text(&mut spec, "zone", &self.zone_id);
        put_text(&mut spec, "borderFirewall", &self.border_policy_id);
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::Subnet {
    type Spec = SubnetSpec;
    fn from_manifest(metadata: Metadata, spec: Option<SubnetSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let cidr_v4 = match spec.cidr_v4.map(|c| c.0) {
            None => None,
            Some(IpNetwork::V4(n)) => Some(n),
            Some(n) => return Err(format!("spec.cidrV4: {n} is not an IPv4 prefix")),
        };
        let cidr_v6 = match spec.cidr_v6.map(|c| c.0) {
            None => None,
            Some(IpNetwork::V6(n)) => Some(n),
            Some(n) => return Err(format!("spec.cidrV6: {n} is not an IPv6 prefix")),
        };
        Ok(model::Subnet {
            id: metadata.name,
            vpc_id: spec.vpc,
            cidr_v4,
            cidr_v6,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "vpc": self.vpc_id });
        if let Some(n) = self.cidr_v4 {
            spec["cidrV4"] = serde_json::json!(n.to_string());
        }
        if let Some(n) = self.cidr_v6 {
            spec["cidrV6"] = serde_json::json!(n.to_string());
        }
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::Host {
    type Spec = HostSpec;
    fn from_manifest(metadata: Metadata, spec: Option<HostSpec>) -> Result<Self, String> {
        Ok(model::Host {
            id: metadata.name,
            underlay_ip: self::spec(spec)?.underlay_ip,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        (
            &self.id,
            None,
            serde_json::json!({ "underlayIp": self.underlay_ip.to_string() }),
        )
    }
}

impl ManifestResource for model::Port {
    type Spec = PortSpec;
    fn from_manifest(metadata: Metadata, spec: Option<PortSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::Port {
            tenant_id: need_tenant(&metadata, "Port")?,
            id: metadata.name,
            subnet_id: spec.subnet,
            host_id: spec.host,
            device: spec.device,
            mac: spec.mac,
            ipv4: spec.ipv4,
            ipv6: spec.ipv6,
            security_group_ids: spec.security_groups,
            vm_id: spec.vm.unwrap_or_default(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "subnet": self.subnet_id,
            "host": self.host_id,
            "device": self.device,
            "mac": self.mac.to_string(),
        });
        if let Some(a) = self.ipv4 {
            spec["ipv4"] = serde_json::json!(a.to_string());
        }
        if let Some(a) = self.ipv6 {
            spec["ipv6"] = serde_json::json!(a.to_string());
        }
        if !self.security_group_ids.is_empty() {
            spec["securityGroups"] = serde_json::json!(self.security_group_ids);
        }
        put_text(&mut spec, "vm", &self.vm_id);
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::SecurityGroup {
    type Spec = SecurityGroupSpec;
    fn from_manifest(metadata: Metadata, spec: Option<SecurityGroupSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let mut rules = Vec::new();
        for (i, r) in spec.rules.into_iter().enumerate() {
            let remote = match (r.remote_cidr, r.remote_group) {
                (Some(_), Some(_)) => return Err(format!("spec.rules[{i}]: set remoteCidr or remoteGroup, not both")),
                (Some(c), None) => Remote::Cidr(c.0),
                (None, Some(g)) => Remote::Group(g),
                (None, None) => Remote::Any,
            };
            rules.push(model::Rule {
                id: r.id,
                direction: r.direction,
                ether_type: r.ether_type,
                protocol: r.protocol,
                ports: r.ports.map(|p| (p.0, p.1)),
                remote,
            });
        }
        Ok(model::SecurityGroup {
            tenant_id: need_tenant(&metadata, "SecurityGroup")?,
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            rules,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let rules: Vec<serde_json::Value> = self
            .rules
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({
                    "id": r.id,
                    "direction": r.direction,
                    "etherType": r.ether_type,
                    "protocol": r.protocol,
                });
                if let Some(p) = r.ports {
                    v["ports"] = ports_json(p);
                }
                match &r.remote {
                    Remote::Any => {}
                    Remote::Cidr(n) => v["remoteCidr"] = serde_json::json!(n.to_string()),
                    Remote::Group(id) => v["remoteGroup"] = serde_json::json!(id),
                }
                v
            })
            .collect();
        let mut spec = serde_json::json!({ "rules": rules });
        put_display_name(&mut spec, &self.name, &self.id);
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::Zone {
    type Spec = ZoneSpec;
    fn from_manifest(metadata: Metadata, spec: Option<ZoneSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::Zone {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            prefixes: spec.prefixes.into_iter().map(|c| c.0).collect(),
            uplink_device: spec.uplink_device,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "prefixes": self.prefixes.iter().map(|n| n.to_string()).collect::<Vec<_>>(),
            "uplinkDevice": self.uplink_device,
        });
        put_display_name(&mut spec, &self.name, &self.id);
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::ExchangePath {
    type Spec = ExchangePathSpec;
    fn from_manifest(metadata: Metadata, spec: Option<ExchangePathSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::ExchangePath {
            id: metadata.name,
            from_zone: spec.from,
            to_zone: spec.to,
            source: spec.source.0,
            destination: spec.destination.0,
            protocol: spec.protocol,
            ports: (spec.ports.0, spec.ports.1),
            broad: spec.broad,
            broad_reason: spec.broad_reason.unwrap_or_default(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "from": self.from_zone,
            "to": self.to_zone,
            "source": self.source.to_string(),
            "destination": self.destination.to_string(),
            "protocol": self.protocol,
            "ports": ports_json(self.ports),
        });
        if self.broad {
            spec["broad"] = serde_json::json!(true);
        }
        put_text(&mut spec, "broadReason", &self.broad_reason);
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::FirewallPolicy {
    type Spec = FirewallPolicySpec;
    fn from_manifest(metadata: Metadata, spec: Option<FirewallPolicySpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::FirewallPolicy {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            default_action: spec.default_action,
            rules: spec
                .rules
                .into_iter()
                .map(|r| model::FirewallRule {
                    id: r.id,
                    priority: r.priority,
                    action: r.action,
                    direction: r.direction,
                    ether_type: r.ether_type,
                    protocol: r.protocol,
                    ports: r.ports.map(|p| (p.0, p.1)),
                    remote: r.remote_cidr.map(|c| c.0),
                })
                .collect(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let rules: Vec<serde_json::Value> = self
            .rules
            .iter()
            .map(|r| {
                let mut v = serde_json::json!({
                    "id": r.id,
                    "priority": r.priority,
                    "action": r.action,
                    "direction": r.direction,
                    "etherType": r.ether_type,
                    "protocol": r.protocol,
                });
                if let Some(p) = r.ports {
                    v["ports"] = ports_json(p);
                }
                if let Some(n) = r.remote {
                    v["remoteCidr"] = serde_json::json!(n.to_string());
                }
                v
            })
            .collect();
        let mut spec = serde_json::json!({ "defaultAction": self.default_action, "rules": rules });
        put_display_name(&mut spec, &self.name, &self.id);
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::VpcPeering {
    type Spec = VpcPeeringSpec;
    fn from_manifest(metadata: Metadata, spec: Option<VpcPeeringSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::VpcPeering {
            id: metadata.name,
            vpc_a: spec.vpc_a,
            vpc_b: spec.vpc_b,
            policy_id: spec.firewall.unwrap_or_default(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "vpcA": self.vpc_a, "vpcB": self.vpc_b });
        put_text(&mut spec, "firewall", &self.policy_id);
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::MirrorSession {
    type Spec = MirrorSessionSpec;
    fn from_manifest(metadata: Metadata, spec: Option<MirrorSessionSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let select = spec.select.unwrap_or(MirrorSelect {
            zone: None,
            tenant: None,
            vpc: None,
            port: None,
        });
        Ok(model::MirrorSession {
            id: metadata.name,
            zone_id: select.zone.unwrap_or_default(),
            tenant_id: select.tenant.unwrap_or_default(),
            vpc_id: select.vpc.unwrap_or_default(),
            port_id: select.port.unwrap_or_default(),
            rules: spec
                .rules
                .into_iter()
                .map(|r| model::MirrorRule {
                    protocol: r.protocol,
                    source: r.source.map(|c| c.0),
                    destination: r.destination.map(|c| c.0),
                    ports: r.ports.map(|p| (p.0, p.1)),
                })
                .collect(),
            direction: spec.direction,
            sample: spec.sample,
            snap_len: spec.snap_len,
            rate_pps: spec.rate_pps,
            destination: match spec.destination {
                MirrorDestinationSpec {
                    tap: Some(t),
                    vxlan: None,
                    erspan: None,
                } => model::MirrorDestination::Tap {
                    port_id: t.port,
                    vni: t.vni,
                },
                MirrorDestinationSpec {
                    tap: None,
                    vxlan: Some(v),
                    erspan: None,
                } => model::MirrorDestination::Vxlan {
                    remote: v.remote,
                    vni: v.vni,
                    port: v.port.unwrap_or(4789),
                },
                MirrorDestinationSpec {
                    tap: None,
                    vxlan: None,
                    erspan: Some(e),
                } => model::MirrorDestination::Erspan {
                    remote: e.remote,
                    version: e.version,
                    session: e.session,
                },
                _ => return Err("spec.destination: give exactly one of tap, vxlan and erspan".into()),
            },
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut select = serde_json::json!({});
        put_text(&mut select, "zone", &self.zone_id);
        put_text(&mut select, "tenant", &self.tenant_id);
        put_text(&mut select, "vpc", &self.vpc_id);
        put_text(&mut select, "port", &self.port_id);
        let mut spec = serde_json::json!({ "direction": self.direction });
        if select.as_object().is_some_and(|o| !o.is_empty()) {
            spec["select"] = select;
        }
        if !self.rules.is_empty() {
            spec["rules"] = self
                .rules
                .iter()
                .map(|r| {
                    let mut j = serde_json::json!({ "protocol": r.protocol });
                    if let Some(n) = r.source {
                        j["source"] = serde_json::json!(n.to_string());
                    }
                    if let Some(n) = r.destination {
                        j["destination"] = serde_json::json!(n.to_string());
                    }
                    if let Some(p) = r.ports {
                        j["ports"] = ports_json(p);
                    }
                    j
                })
                .collect();
        }
        for (k, v) in [
            ("sample", self.sample),
            ("snapLen", self.snap_len),
            ("ratePps", self.rate_pps),
        ] {
            if v != 0 {
                spec[k] = serde_json::json!(v);
            }
        }
        spec["destination"] = match &self.destination {
            model::MirrorDestination::Tap { port_id, vni } => serde_json::json!({"tap": {"port": port_id, "vni": vni}}),
            model::MirrorDestination::Vxlan { remote, vni, port } => {
                serde_json::json!({"vxlan": {"remote": remote.to_string(), "vni": vni, "port": port}})
            }
            model::MirrorDestination::Erspan {
                remote,
                version,
                session,
            } => serde_json::json!({"erspan": {"remote": remote.to_string(), "version": version, "session": session}}),
        };
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::InformationSystem {
    type Spec = InformationSystemSpec;
    fn from_manifest(metadata: Metadata, spec: Option<InformationSystemSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::InformationSystem {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            vpc_ids: spec.vpcs,
            port_ids: spec.ports,
            bandwidth: spec
                .bandwidth
                .into_iter()
                .map(|b| model::SystemBandwidth {
                    zone_id: b.zone,
                    up_bps: b.up.0,
                    down_bps: b.down.0,
                })
                .collect(),
            alert_percent: spec.alert_percent,
            interval_secs: spec.interval_seconds,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "bandwidth": self.bandwidth.iter().map(|b| serde_json::json!({
                "zone": b.zone_id, "up": b.up_bps, "down": b.down_bps,
            })).collect::<Vec<_>>(),
        });
        put_display_name(&mut spec, &self.name, &self.id);
        if !self.vpc_ids.is_empty() {
            spec["vpcs"] = serde_json::json!(self.vpc_ids);
        }
        if !self.port_ids.is_empty() {
            spec["ports"] = serde_json::json!(self.port_ids);
        }
        if self.alert_percent != 0 {
            spec["alertPercent"] = serde_json::json!(self.alert_percent);
        }
        if self.interval_secs != 0 {
            spec["intervalSeconds"] = serde_json::json!(self.interval_secs);
        }
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::LoadBalancer {
    type Spec = LoadBalancerSpec;
    fn from_manifest(metadata: Metadata, spec: Option<LoadBalancerSpec>) -> Result<Self, String> {
        let tenant_id = need_tenant(&metadata, "LoadBalancer")?;
        let spec = self::spec(spec)?;
        Ok(model::LoadBalancer {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            tenant_id,
            vpc_id: spec.vpc,
            vip_v4: spec.vip_v4,
            vip_v6: spec.vip_v6,
            exposure: spec.exposure.unwrap_or(model::Exposure::Vpc),
            nat_hosts: spec
                .nat_hosts
                .into_iter()
                .map(|h| model::NatHost {
                    host_id: h.host,
                    ipv4: h.ipv4,
                    ipv6: h.ipv6,
                })
                .collect(),
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "vpc": self.vpc_id });
        put_display_name(&mut spec, &self.name, &self.id);
        if let Some(a) = self.vip_v4 {
            spec["vipV4"] = serde_json::json!(a.to_string());
        }
        if let Some(a) = self.vip_v6 {
            spec["vipV6"] = serde_json::json!(a.to_string());
        }
        if self.exposure != model::Exposure::Vpc {
            spec["exposure"] = serde_json::json!(self.exposure);
        }
        if !self.nat_hosts.is_empty() {
            spec["natHosts"] = self
                .nat_hosts
                .iter()
                .map(|h| {
                    let mut j = serde_json::json!({ "host": h.host_id });
                    if let Some(a) = h.ipv4 {
                        j["ipv4"] = serde_json::json!(a.to_string());
                    }
                    if let Some(a) = h.ipv6 {
                        j["ipv6"] = serde_json::json!(a.to_string());
                    }
                    j
                })
                .collect();
        }
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::VirtualIp {
    type Spec = VirtualIpSpec;
    fn from_manifest(metadata: Metadata, spec: Option<VirtualIpSpec>) -> Result<Self, String> {
        let tenant_id = need_tenant(&metadata, "VirtualIp")?;
        let spec = self::spec(spec)?;
        let holders = spec
            .holders
            .into_iter()
            .enumerate()
            .map(|(i, h)| {
                let target = match (h.port, h.host) {
                    (Some(p), None) => model::VipHolderTarget::Port(p),
                    (None, Some(h)) => model::VipHolderTarget::Host(h),
                    (Some(_), Some(_)) => return Err(format!("spec.holders[{i}]: a port or a host, not both")),
                    (None, None) => return Err(format!("spec.holders[{i}]: give its port or its host")),
                };
                Ok(model::VipHolder {
                    target,
                    priority: h.priority,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(model::VirtualIp {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            tenant_id,
            vpc_id: spec.vpc,
            ipv4: spec.ipv4,
            ipv6: spec.ipv6,
            vrid: spec.vrid,
            holders,
            preempt: spec.preempt.unwrap_or(true),
            advert_interval_cs: spec.advert_interval_cs.unwrap_or(model::VIP_ADVERT_INTERVAL_CS_DEFAULT),
            epoch: 0,
            owner: None,
            owner_since_unix_ms: 0,
            owner_lease_ms: 0,
            claim: false,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "vpc": self.vpc_id,
            "vrid": self.vrid,
            "holders": self.holders.iter().map(|h| match &h.target {
                model::VipHolderTarget::Port(p) => serde_json::json!({"port": p, "priority": h.priority}),
                model::VipHolderTarget::Host(x) => serde_json::json!({"host": x, "priority": h.priority}),
            }).collect::<Vec<_>>(),
        });
        put_display_name(&mut spec, &self.name, &self.id);
        if let Some(a) = self.ipv4 {
            spec["ipv4"] = serde_json::json!(a.to_string());
        }
        if let Some(a) = self.ipv6 {
            spec["ipv6"] = serde_json::json!(a.to_string());
        }
        if !self.preempt {
            spec["preempt"] = serde_json::json!(false);
        }
        if self.advert_interval_cs != model::VIP_ADVERT_INTERVAL_CS_DEFAULT {
            spec["advertIntervalCs"] = serde_json::json!(self.advert_interval_cs);
        }
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::Certificate {
    type Spec = CertificateSpec;
    fn from_manifest(metadata: Metadata, spec: Option<CertificateSpec>) -> Result<Self, String> {
        let tenant_id = need_tenant(&metadata, "Certificate")?;
        let spec = self::spec(spec)?;
        let key = spec
            .private_key
            .ok_or("spec.privateKey: a certificate needs its private key (it is never shown back)")?;
        let now = crate::convert::now_unix();
        let read = crate::convert::read_certificate(&spec.certificate, &key, now).map_err(|(f, m)| {
            let f = if f == "key_pem" { "privateKey" } else { "certificate" };
            format!("spec.{f}: {m}")
        })?;
        Ok(model::Certificate {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            tenant_id,
            cert_pem: read.chain_pem,
            key_pem: key,
            names: read.names,
            not_after_unix: read.not_after_unix,
        })
    }
    /// Without the private key, which is never shown.
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "certificate": self.cert_pem });
        put_display_name(&mut spec, &self.name, &self.id);
        (&self.id, Some(&self.tenant_id), spec)
    }
}

impl ManifestResource for model::HttpListener {
    type Spec = HttpListenerSpec;
    fn from_manifest(metadata: Metadata, spec: Option<HttpListenerSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let scheduler =
            model::HttpScheduler::parse(spec.scheduler.as_deref(), spec.hash_key).map_err(|(f, e)| match f {
                model::HttpSchedulerField::Name => format!("spec.scheduler: {e}"),
                model::HttpSchedulerField::Key => format!("spec.hashKey: {e}"),
            })?;
        let rules = spec
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                let action = match (r.pool, r.redirect, r.respond) {
                    (Some(p), None, None) => model::HttpAction::Pool(p),
                    (None, Some(x), None) => model::HttpAction::Redirect {
                        location: x.location,
                        status: x.status,
                    },
                    (None, None, Some(x)) => model::HttpAction::Respond {
                        status: x.status,
                        body: x.body,
                        content_type: x.content_type,
                    },
                    _ => return Err(format!("spec.rules[{i}]: give one of pool, redirect and respond")),
                };
                Ok(model::HttpRule {
                    name: r.name,
                    host: r.host,
                    path_prefix: r.path_prefix,
                    path_regex: r.path_regex,
                    header: r.header.map(|h| (h.name, h.value)),
                    method: r.method,
                    action,
                })
            })
            .collect::<Result<_, String>>()?;
        Ok(model::HttpListener {
            id: metadata.name,
            load_balancer_id: spec.load_balancer,
            protocol: spec.protocol,
            port: spec.port,
            certificate_ids: spec.certificates,
            rules,
            pool_id: spec.pool,
            scheduler,
            cookie: spec.cookie.map(|c| model::HttpCookie {
                name: c.name,
                mode: c.mode.unwrap_or(model::HttpCookieMode::Insert),
            }),
            proxy_protocol: spec.proxy_protocol,
            proxy_ports: spec.proxy_ports,
            trusted_proxies: spec.trusted_proxies,
            waf_policy_id: spec.waf_policy,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "loadBalancer": self.load_balancer_id,
            "protocol": self.protocol,
            "port": self.port,
            "proxyPorts": self.proxy_ports,
        });
        if !self.certificate_ids.is_empty() {
            spec["certificates"] = serde_json::json!(self.certificate_ids);
        }
        if let Some(p) = &self.pool_id {
            spec["pool"] = serde_json::json!(p);
        }
        if self.scheduler != model::HttpScheduler::RoundRobin {
            spec["scheduler"] = serde_json::json!(self.scheduler.name());
        }
        put_text(&mut spec, "hashKey", self.scheduler.key());
        if let Some(c) = &self.cookie {
            spec["cookie"] = serde_json::json!({"name": c.name, "mode": c.mode});
        }
        if let Some(p) = self.proxy_protocol {
            spec["proxyProtocol"] = serde_json::json!(p);
        }
        if !self.trusted_proxies.is_empty() {
            spec["trustedProxies"] =
                serde_json::json!(self.trusted_proxies.iter().map(|n| n.to_string()).collect::<Vec<_>>());
        }
        if let Some(w) = &self.waf_policy_id {
            spec["wafPolicy"] = serde_json::json!(w);
        }
        if !self.rules.is_empty() {
            spec["rules"] = self
                .rules
                .iter()
                .map(|r| {
                    let mut j = serde_json::json!({ "name": r.name });
                    for (f, v) in [
                        ("host", &r.host),
                        ("pathPrefix", &r.path_prefix),
                        ("pathRegex", &r.path_regex),
                        ("method", &r.method),
                    ] {
                        if let Some(v) = v {
                            j[f] = serde_json::json!(v);
                        }
                    }
                    if let Some((name, value)) = &r.header {
                        j["header"] = serde_json::json!({ "name": name });
                        if let Some(v) = value {
                            j["header"]["value"] = serde_json::json!(v);
                        }
                    }
                    match &r.action {
                        model::HttpAction::Pool(p) => j["pool"] = serde_json::json!(p),
                        model::HttpAction::Redirect { location, status } => {
                            j["redirect"] = serde_json::json!({"location": location, "status": status})
                        }
                        model::HttpAction::Respond {
                            status,
                            body,
                            content_type,
                        } => {
                            j["respond"] = serde_json::json!({"status": status, "body": body});
                            if let Some(t) = content_type {
                                j["respond"]["contentType"] = serde_json::json!(t);
                            }
                        }
                    }
                    j
                })
                .collect();
        }
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::Listener {
    type Spec = ListenerSpec;
    fn from_manifest(metadata: Metadata, spec: Option<ListenerSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        Ok(model::Listener {
            id: metadata.name,
            load_balancer_id: spec.load_balancer,
            protocol: spec.protocol,
            port: spec.port,
            pool_id: spec.pool,
            scheduler: spec.scheduler,
            persistence_secs: spec.persistence_seconds,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({
            "loadBalancer": self.load_balancer_id,
            "protocol": self.protocol,
            "port": self.port,
            "pool": self.pool_id,
            "scheduler": self.scheduler,
        });
        if self.persistence_secs != 0 {
            spec["persistenceSeconds"] = serde_json::json!(self.persistence_secs);
        }
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::Pool {
    type Spec = PoolSpec;
    fn from_manifest(metadata: Metadata, spec: Option<PoolSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let health = match spec.health {
            None => None,
            Some(h) => {
                let probe = match (h.probe.as_str(), h.path, h.status) {
                    ("tcp", None, None) => model::HealthProbe::Tcp,
                    ("tcp", _, _) => return Err("spec.health: a tcp probe has no path and no status".into()),
                    ("http", Some(path), status) => model::HealthProbe::Http {
                        path,
                        status: status.map(|s| (s.0, s.1)).unwrap_or((200, 399)),
                    },
                    ("http", None, _) => return Err("spec.health.path: an http probe needs its path".into()),
                    (p, _, _) => return Err(format!("spec.health.probe: must be tcp or http, got {p:?}")),
                };
                Some(model::HealthCheck {
                    probe,
                    interval_ms: h.interval_ms,
                    timeout_ms: if h.timeout_ms == 0 { h.interval_ms } else { h.timeout_ms },
                    rise: h.rise,
                    fall: h.fall,
                })
            }
        };
        Ok(model::Pool {
            name: display_name(spec.display_name, &metadata.name),
            id: metadata.name,
            load_balancer_id: spec.load_balancer,
            health,
            drain_secs: spec.drain_seconds,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "loadBalancer": self.load_balancer_id });
        put_display_name(&mut spec, &self.name, &self.id);
        if let Some(h) = &self.health {
            let mut j = serde_json::json!({
                "intervalMs": h.interval_ms,
                "timeoutMs": h.timeout_ms,
                "rise": h.rise,
                "fall": h.fall,
            });
            match &h.probe {
                model::HealthProbe::Tcp => j["probe"] = serde_json::json!("tcp"),
                model::HealthProbe::Http { path, status } => {
                    j["probe"] = serde_json::json!("http");
                    j["path"] = serde_json::json!(path);
                    j["status"] = ports_json(*status);
                }
            }
            spec["health"] = j;
        }
        if self.drain_secs != 0 {
            spec["drainSeconds"] = serde_json::json!(self.drain_secs);
        }
        (&self.id, None, spec)
    }
}

impl ManifestResource for model::Member {
    type Spec = MemberSpec;
    fn from_manifest(metadata: Metadata, spec: Option<MemberSpec>) -> Result<Self, String> {
        let spec = self::spec(spec)?;
        let target = match (spec.port, spec.address) {
            (Some(p), None) => model::MemberTarget::Port(p),
            (None, Some(a)) => model::MemberTarget::Address(a),
            _ => return Err("spec.port: give the member's port or its address (one of the two)".into()),
        };
        Ok(model::Member {
            id: metadata.name,
            pool_id: spec.pool,
            target,
            port: spec.protocol_port,
            weight: spec.weight.unwrap_or(1),
            state: spec.state.unwrap_or(model::MemberState::Enabled),
            draining_since_unix_ms: None,
            health: None,
            health_report: false,
        })
    }
    fn to_manifest(&self) -> (&str, Option<&str>, serde_json::Value) {
        let mut spec = serde_json::json!({ "pool": self.pool_id });
        match &self.target {
            model::MemberTarget::Port(p) => spec["port"] = serde_json::json!(p),
            model::MemberTarget::Address(a) => spec["address"] = serde_json::json!(a.to_string()),
        }
        if self.port != 0 {
            spec["protocolPort"] = serde_json::json!(self.port);
        }
        if self.weight != 1 {
            spec["weight"] = serde_json::json!(self.weight);
        }
        if self.state != model::MemberState::Enabled {
            spec["state"] = serde_json::json!(self.state);
        }
        (&self.id, None, spec)
    }
}

/// Reads a file, or every `.yaml`/`.yml` file under a directory (sorted).
pub fn load_path(path: &Path) -> Result<Vec<Located>, ManifestError> {
    let mut files: Vec<PathBuf> = Vec::new();
    if path.is_dir() {
        let mut stack = vec![path.to_path_buf()];
        while let Some(dir) = stack.pop() {
            let rd = std::fs::read_dir(&dir).map_err(|e| at(&dir.display().to_string(), None, None, e.to_string()))?;
            for entry in rd {
                let p = entry
                    .map_err(|e| at(&dir.display().to_string(), None, None, e.to_string()))?
                    .path();
                if p.is_dir() {
                    stack.push(p);
                } else if matches!(p.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
                    files.push(p);
                }
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
    let mut out = Vec::new();
    for f in files {
        let name = f.display().to_string();
        let size = std::fs::metadata(&f)
            .map_err(|e| at(&name, None, None, format!("cannot read: {e}")))?
            .len();
        if size > MANIFEST_BYTES_MAX {
            return Err(at(
                &name,
                None,
                None,
                format!("{size} bytes; a manifest file holds at most {MANIFEST_BYTES_MAX} bytes (split it into several files)"),
            ));
        }
        let bytes = std::fs::read(&f).map_err(|e| at(&name, None, None, format!("cannot read: {e}")))?;
        out.extend(parse_bytes(&name, &bytes)?);
    }
    Ok(out)
}

/// A field path of the store in the manifest's own spelling.
/// A field of the API's operations, as the controller names it in an
/// error ("operations[2].put_port.subnet_id"), in a manifest's own
/// spelling ("spec.subnet"), with the index of the operation. `None` for a
/// field of no operation, or of an operation no manifest writes.
pub fn manifest_field(api: &str) -> Option<(usize, String)> {
    let rest = api.strip_prefix("operations[")?;
    let (index, rest) = rest.split_once(']')?;
    let index: usize = index.parse().ok()?;
    let Some(rest) = rest.strip_prefix('.') else {
        return Some((index, String::new()));
    };
    let (op, field) = rest.split_once('.').unwrap_or((rest, ""));
    if !written_by_manifests(op) {
        return None;
    }
    if field.is_empty() {
        return Some((index, String::new()));
    }
    let (top, below) = field.split_at(field.find(['.', '[']).unwrap_or(field.len()));
    let spelled = match top {
        "id" => "metadata.name".to_string(),
        "tenant_id" => "metadata.tenant".to_string(),
        "name" => "spec.displayName".to_string(),
        "subnet_id" => "spec.subnet".to_string(),
        "host_id" => "spec.host".to_string(),
        "vpc_id" => "spec.vpc".to_string(),
        "zone_id" => "spec.zone".to_string(),
        "vm_id" => "spec.vm".to_string(),
        "from_zone" => "spec.from".to_string(),
        "to_zone" => "spec.to".to_string(),
        "load_balancer_id" => "spec.loadBalancer".to_string(),
        "pool_id" => "spec.pool".to_string(),
        "port_id" if op == "put_member" => "spec.port".to_string(),
        "port" if op == "put_member" => "spec.protocolPort".to_string(),
        _ => return Some((index, format!("spec.{}", manifest_spelling(field)))),
    };
    Some((index, format!("{spelled}{}", manifest_spelling(below))))
}

fn manifest_spelling(field: &str) -> String {
    field
        .split('.')
        .map(|part| {
            let (name, index) = part.split_at(part.find('[').unwrap_or(part.len()));
            let name = match name {
                "remote_group_id" => "remoteGroup".to_string(),
                "port_min" | "port_max" => "ports".to_string(),
                "border_policy_id" => "borderFirewall".to_string(),
                "policy_id" => "firewall".to_string(),
                "security_group_ids" => "securityGroups".to_string(),
                "host_id" => "host".to_string(),
                "port_id" => "port".to_string(),
                "http_path" => "path".to_string(),
                "status_min" | "status_max" => "status".to_string(),
                "persistence_secs" => "persistenceSeconds".to_string(),
                "drain_secs" => "drainSeconds".to_string(),
                "interval_secs" => "intervalSeconds".to_string(),
                "ipv4" | "ipv6" | "tenant_id" | "id" => name.to_string(),
                other => {
                    // snake_case to camelCase.
                    let mut out = String::new();
                    let mut up = false;
                    for c in other.chars() {
                        if c == '_' {
                            up = true;
                        } else if up {
                            out.extend(c.to_uppercase());
                            up = false;
                        } else {
                            out.push(c);
                        }
                    }
                    out
                }
            };
            format!("{name}{index}")
        })
        .collect::<Vec<_>>()
        .join(".")
}

/// Orders operations so that what others refer to comes first.
pub fn dependency_order(mut ops: Vec<Located>) -> Vec<Located> {
    ops.sort_by_key(|l| l.op.order());
    ops
}

/// Checks manifests offline: everything that does not need the server's
/// state. References to objects not in the manifests are left to the server.
pub fn validate_offline(ops: &[Located]) -> Result<(), ManifestError> {
    for l in ops {
        let single = match &l.op {
            Op::PutSecurityGroup(g) => {
                // Check the group alone, with stand-ins for its tenant and remote groups.
                let mut st = crate::State::default();
                let mut pre = vec![Op::PutTenant(model::Tenant {
                    id: g.tenant_id.clone(),
                    name: String::new(),
                })];
                for r in &g.rules {
                    if let Remote::Group(rg) = &r.remote {
                        if *rg != g.id && model::check_id(rg).is_ok() {
                            pre.push(Op::PutSecurityGroup(model::SecurityGroup {
                                id: rg.clone(),
                                tenant_id: g.tenant_id.clone(),
                                name: String::new(),
                                rules: vec![],
                            }));
                        }
                    }
                }
                if model::check_id(&g.tenant_id).is_ok() {
                    st.apply_batch(&pre).ok();
                }
                st.apply_batch(std::slice::from_ref(&l.op)).err()
            }
            // Self-contained objects: checked exactly as the server would.
            Op::PutFirewallPolicy(_) | Op::PutZone(_) => {
                crate::State::default().apply_batch(std::slice::from_ref(&l.op)).err()
            }
            Op::PutTenant(t) => model::check_id(&t.id).err().map(|m| crate::BatchError {
                index: 0,
                field: "metadata.name".into(),
                message: m,
            }),
            _ => None,
        };
        if let Some(e) = single {
            let field = manifest_field(&e.field).map_or_else(|| e.field.clone(), |(_, f)| f);
            return Err(at(
                &l.file,
                Some(l.line_of(&field)),
                None,
                format!("{field}: {}", e.message),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
apiVersion: sdn/v1
kind: SecurityGroup
metadata:
  name: web
  tenant: t1
spec:
  rules:
    - id: http
      direction: ingress
      etherType: IPv4
      protocol: tcp
      ports: 80
    - id: alt
      direction: ingress
      etherType: IPv6
      protocol: tcp
      ports: \"8000-8080\"
      remoteCidr: fd00::/8
---
apiVersion: sdn/v1
kind: Tenant
metadata:
  name: t1
";

    #[test]
    fn bandwidths_read_with_their_units() {
        for (t, n) in [
            ("100M", 100_000_000),
            ("1.5G", 1_500_000_000),
            ("800kbps", 800_000),
            ("64 bit/s", 64),
            ("7", 7),
        ] {
            assert_eq!(parse_bandwidth(t), Ok(n), "{t}");
        }
        for t in ["", "M", "-1M", "10X", "1e400", "NaN"] {
            assert!(parse_bandwidth(t).is_err(), "{t}");
        }
        let doc = "\
apiVersion: sdn/v1
kind: InformationSystem
metadata:
  name: tax
spec:
  vpcs: [v1]
  bandwidth:
    - zone: internet
      up: 100M
      down: 2G
";
        let ops = parse_str("s.yaml", doc).unwrap();
        let Op::PutInformationSystem(x) = &ops[0].op else {
            panic!()
        };
        assert_eq!(
            (x.bandwidth[0].up_bps, x.bandwidth[0].down_bps),
            (100_000_000, 2_000_000_000)
        );
        let bad = doc.replace("2G", "two");
        let e = parse_str("s.yaml", &bad).unwrap_err().to_string();
        assert!(e.starts_with("s.yaml:10:") && e.contains("bandwidth[0].down"), "{e}");
    }

    #[test]
    fn parses_documents() {
        let ops = parse_str("g.yaml", GOOD).unwrap();
        assert_eq!(ops.len(), 2);
        assert_eq!(ops[1].line, 20);
        let Op::PutSecurityGroup(g) = &ops[0].op else { panic!() };
        assert_eq!(g.rules[1].ports, Some((8000, 8080)));
        let ordered = dependency_order(ops);
        assert!(matches!(ordered[0].op, Op::PutTenant(_)));
        validate_offline(&ordered).unwrap();
    }

    #[test]
    fn a_field_is_found_at_its_own_line() {
        let doc = "\
apiVersion: sdn/v1
kind: SecurityGroup
metadata:
  name: web
  tenant: t1
spec:
  rules:
    - id: http
      direction: ingress
      etherType: IPv4
      protocol: tcp
      ports: 80

    # the second rule
    - id: alt
      direction: ingress
      ports: 8000-8080
      remoteGroup: db
  other:
  - a
  - b
";
        for (field, want) in [
            ("metadata.name", Some(3)),
            ("metadata.tenant", Some(4)),
            ("spec.rules", Some(6)),
            ("spec.rules[0].ports", Some(11)),
            ("spec.rules[1]", Some(14)),
            ("spec.rules[1].id", Some(14)),
            ("spec.rules[1].ports", Some(16)),
            ("spec.rules[1].remoteGroup", Some(17)),
            // Not written in that rule (the first one has it): not found.
            ("spec.rules[1].etherType", None),
            ("spec.rules[2]", None),
            ("spec.other[1]", Some(20)),
            ("spec.missing", None),
        ] {
            assert_eq!(field_line(doc, field), want, "{field}");
        }
        // A refusal found offline names the field's own line: the second
        // rule's bad port range is on line 8 of the file.
        let text = "\
apiVersion: sdn/v1
kind: SecurityGroup
metadata: {name: web, tenant: t1}
spec:
  rules:
    - {id: a, direction: ingress, etherType: IPv4, protocol: tcp, ports: 80}
    - id: b
      remoteCidr: 10.0.0.0/8
      direction: ingress
      etherType: IPv6
      protocol: tcp
";
        let ops = parse_str("g.yaml", text).unwrap();
        let e = validate_offline(&ops).unwrap_err().to_string();
        assert!(e.starts_with("g.yaml:8"), "{e}");
        assert!(e.contains("spec.rules[1].remoteCidr"), "{e}");
    }

    #[test]
    fn bad_input_is_named_at_its_line_and_against_its_limit() {
        // A wrong type for `ports`: named, with the expected forms.
        for (bad, what) in [
            ("ports: [80]", "sequence"),
            ("ports: true", "boolean"),
            ("ports: -5", "negative"),
        ] {
            let e = parse_str("g.yaml", &GOOD.replace("ports: 80", bad)).unwrap_err();
            assert!(e.message.contains("rules[0].ports"), "{bad}: {e}");
            assert!(e.message.contains(what), "{bad}: {e}");
            assert_eq!(e.line, Some(12), "{bad}: {e}");
        }
        // Not UTF-8, and a NUL byte: the line and column.
        let mut bytes = GOOD.as_bytes().to_vec();
        let at = GOOD.find("web").unwrap();
        bytes[at] = 0xff;
        let e = parse_bytes("g.yaml", &bytes).unwrap_err();
        assert_eq!((e.line, e.column), (Some(4), Some(9)), "{e}");
        assert!(e.message.contains("UTF-8"), "{e}");
        let e = parse_str("g.yaml", &GOOD.replace("name: web", "name: w\0b")).unwrap_err();
        assert_eq!((e.line, e.column), (Some(4), Some(10)), "{e}");
        // Deep nesting is refused before the parser, at once.
        let deep = format!(
            "apiVersion: sdn/v1\nkind: Tenant\nmetadata: {}{}\n",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        let t = std::time::Instant::now();
        let e = parse_str("d.yaml", &deep).unwrap_err();
        assert!(e.message.contains(&format!("at most {MANIFEST_DEPTH_MAX}")), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1), "{:?}", t.elapsed());
        let mut indented = String::from("apiVersion: sdn/v1\nkind: Tenant\nmetadata:\n");
        for i in 0..40 {
            indented.push_str(&format!("{}k{i}:\n", "  ".repeat(i + 1)));
        }
        assert!(parse_str("d.yaml", &indented).unwrap_err().message.contains("nested"));
        // The nesting of every valid example is well inside the limit.
        assert!(nesting(GOOD).0 <= 8, "{:?}", nesting(GOOD));
        // Too big: refused before it is read as text.
        let big = vec![b'#'; MANIFEST_BYTES_MAX as usize + 1];
        let e = parse_bytes("big.yaml", &big).unwrap_err();
        assert!(
            e.message.contains(&format!("at most {MANIFEST_BYTES_MAX} bytes")),
            "{e}"
        );
        // A family mismatch names the manifest's own fields.
        let bad = GOOD.replace("remoteCidr: fd00::/8", "remoteCidr: 10.0.0.0/8");
        let e = validate_offline(&parse_str("g.yaml", &bad).unwrap()).unwrap_err();
        assert!(
            e.message
                .starts_with("spec.rules[1].remoteCidr: 10.0.0.0/8 is not an IPv6 prefix"),
            "{e}"
        );
        assert_eq!(
            manifest_spelling("spec.rules[2].remote_group_id"),
            "spec.rules[2].remoteGroup"
        );
        assert_eq!(manifest_spelling("spec.uplink_device"), "spec.uplinkDevice");
        for (api, want) in [
            ("operations[3].put_port.subnet_id", Some((3, "spec.subnet"))),
            ("operations[0].put_port.id", Some((0, "metadata.name"))),
            ("operations[1].put_vpc.tenant_id", Some((1, "metadata.tenant"))),
            ("operations[2].put_port.ipv4", Some((2, "spec.ipv4"))),
            (
                "operations[2].put_port.security_group_ids[1]",
                Some((2, "spec.securityGroups[1]")),
            ),
            (
                "operations[4].put_vpc.border_policy_id",
                Some((4, "spec.borderFirewall")),
            ),
            ("operations[5].put_vpc_peering.policy_id", Some((5, "spec.firewall"))),
            ("operations[5].put_vpc_peering.vpc_b", Some((5, "spec.vpcB"))),
            ("operations[6].put_exchange_path.to_zone", Some((6, "spec.to"))),
            ("operations[7].put_subnet.cidr_v4", Some((7, "spec.cidrV4"))),
            (
                "operations[8].put_security_group.rules[2].remote_group_id",
                Some((8, "spec.rules[2].remoteGroup")),
            ),
            (
                "operations[8].put_security_group.rules[2].port_max",
                Some((8, "spec.rules[2].ports")),
            ),
            ("operations[9].put_zone.prefixes[1]", Some((9, "spec.prefixes[1]"))),
            ("operations[9]", Some((9, ""))),
            ("operations[9].put_quarantine.reason", None),
            ("limit", None),
        ] {
            assert_eq!(manifest_field(api), want.map(|(i, f)| (i, f.to_string())), "{api}");
        }
    }

    #[test]
    fn errors_carry_lines() {
        let bad = GOOD.replace("remoteCidr: fd00::/8", "remoteCidr: fd00::1/8");
        let e = parse_str("g.yaml", &bad).unwrap_err();
        assert_eq!(e.line, Some(13), "{e}"); // the rule that holds it
        assert!(e.message.contains("host bits"), "{e}");

        let bad = GOOD.replace("ports: 80", "portz: 80");
        let e = parse_str("g.yaml", &bad).unwrap_err();
        assert_eq!(e.line, Some(12), "{e}");
        assert!(e.message.contains("unknown field `portz`"), "{e}");

        let bad = GOOD.replace("ports: 80", "ports: \"90-80\"");
        assert!(parse_str("g.yaml", &bad)
            .unwrap_err()
            .message
            .contains("90 is above 80"));

        let bad = GOOD.replace("kind: Tenant", "kind: Tenent");
        let e = parse_str("g.yaml", &bad).unwrap_err();
        assert!(e.line.unwrap() >= 20, "{e}");

        let bad = GOOD.replace("protocol: tcp\n      ports: 80", "protocol: icmpv6\n      ports: 80");
        let ops = parse_str("g.yaml", &bad).unwrap();
        let e = validate_offline(&ops).unwrap_err();
        assert_eq!(e.line, Some(11), "{e}"); // the first rule's protocol
        assert!(e.message.contains("spec.rules[0].protocol"), "{e}");

        let e = parse_str("g.yaml", "apiVersion: sdn/v1\nkind: Tenant\nmetadata: [\n").unwrap_err();
        assert!(e.line.is_some(), "{e}");
    }
}

/// Renders documents as a YAML stream.
pub fn to_yaml(docs: &[serde_json::Value]) -> String {
    docs.iter()
        .map(|d| serde_yaml::to_string(d).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("---\n")
}

#[cfg(test)]
mod render_tests {
    use super::*;

    #[test]
    fn render_round_trips_through_the_parser() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/security-groups.yaml")).unwrap();
        let mut ops: Vec<Op> = parse_str("ex.yaml", &text).unwrap().into_iter().map(|l| l.op).collect();
        ops.push(Op::PutPort(crate::model::Port {
            id: "p".into(),
            tenant_id: "t".into(),
            subnet_id: "s".into(),
            host_id: "h".into(),
            device: "tap0".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ipv4: Some("10.0.0.5".parse().unwrap()),
            ipv6: None,
            security_group_ids: vec!["web".into()],
            vm_id: String::new(),
        }));
        let docs: Vec<serde_json::Value> = ops.iter().filter_map(render).collect();
        let yaml = to_yaml(&docs);
        let back: Vec<Op> = parse_str("rendered.yaml", &yaml)
            .unwrap()
            .into_iter()
            .map(|l| l.op)
            .collect();
        assert_eq!(back, ops, "{yaml}");
    }
}

/// The JSON schema of a manifest document, for editors.
pub const SCHEMA: &str = include_str!("../schema/sdn-v1.schema.json");

#[cfg(test)]
mod schema_tests {
    use super::*;

    fn validator() -> jsonschema::Validator {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).expect("the schema is JSON");
        jsonschema::validator_for(&schema).expect("the schema compiles")
    }

    #[test]
    fn examples_and_rendered_objects_satisfy_the_schema() {
        let v = validator();
        for f in [
            "security-groups.yaml",
            "security-groups-maintenance.yaml",
            "gov-cloud/00-zones.yaml",
            "gov-cloud/05-border-firewalls.yaml",
            "gov-cloud/10-departments.yaml",
            "gov-cloud/20-shared-service.yaml",
            "gov-cloud/30-peering.yaml",
            "gov-cloud/40-hosts-and-ports.yaml",
            "gov-cloud/70-load-balancers.yaml",
            "http-listeners.yaml",
        ] {
            let text = std::fs::read_to_string(format!("{}/examples/{f}", env!("CARGO_MANIFEST_DIR"))).unwrap();
            for doc in serde_yaml::Deserializer::from_str(&text) {
                let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                let errors: Vec<String> = v.iter_errors(&value).map(|e| e.to_string()).collect();
                assert!(errors.is_empty(), "{f}: {errors:?}");
                // And what the parser accepts, rendered back, too.
                let yaml = serde_yaml::to_string(&value).unwrap();
                for l in parse_str(f, &yaml).unwrap() {
                    let r = render(&l.op).unwrap();
                    assert!(v.is_valid(&r), "{r}");
                }
            }
        }
    }

    #[test]
    fn offline_validation_checks_firewall_policies_with_their_line() {
        let text = "apiVersion: sdn/v1\nkind: Tenant\nmetadata:\n  name: t\n---\napiVersion: sdn/v1\nkind: FirewallPolicy\nmetadata:\n  name: fw\nspec:\n  defaultAction: deny\n  rules:\n    - {id: a, priority: 10, action: allow, direction: ingress, etherType: IPv4, protocol: tcp, ports: 22}\n    - {id: b, priority: 10, action: deny, direction: ingress, etherType: IPv4, protocol: tcp, ports: 23}\n";
        let ops = parse_str("fw.yaml", text).unwrap();
        let e = validate_offline(&ops).unwrap_err();
        assert_eq!(e.line, Some(6), "{e:?}");
        assert!(e.message.starts_with("spec.rules[1].priority:"), "{e:?}");
    }

    #[test]
    fn the_example_cloud_is_consistent() {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gov-cloud"));
        let ops = dependency_order(load_path(&dir).expect("the example parses"));
        validate_offline(&ops).expect("offline checks");
        let mut s = crate::State::default();
        let ops: Vec<Op> = ops.into_iter().map(|l| l.op).collect();
        s.apply_batch(&ops).expect("the example applies as one batch");
        assert_eq!(s.zones.len(), 2);
        assert_eq!(s.exchange_paths.len(), 3);
        let portal = &s.exchange_paths["portal-https-in"];
        assert!(portal.broad && portal.broad_reason.contains("every citizen"));
        // Rendered back, the broad path parses to itself.
        let op = Op::PutExchangePath(portal.clone());
        let yaml = to_yaml(&[render(&op).unwrap()]);
        assert_eq!(parse_str("x.yaml", &yaml).unwrap()[0].op, op, "{yaml}");
        assert_eq!(s.tenants.len(), 4, "three departments and the shared service");
        assert_eq!(s.vpcs.values().filter(|v| v.zone_id == "extranet").count(), 4);
        assert_eq!(
            s.vpcs
                .values()
                .filter(|v| v.border_policy_id == "department-border")
                .count(),
            3
        );
    }

    /// The kinds' table, the schema and the examples agree: a kind added
    /// to the table without its schema and an example fails here.
    #[test]
    fn every_kind_of_the_table_is_in_the_schema_and_the_examples() {
        let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
        let mut in_schema: Vec<&str> = schema["properties"]["kind"]["enum"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k.as_str().unwrap())
            .collect();
        in_schema.sort();
        let mut kinds = KINDS.to_vec();
        kinds.sort();
        assert_eq!(in_schema, kinds, "the schema's kinds are the table's");
        let refs: Vec<&str> = schema["oneOf"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["$ref"].as_str().unwrap())
            .collect();
        for k in KINDS {
            assert!(schema["$defs"].get(*k).is_some(), "no $defs/{k} in the schema");
            assert!(
                refs.contains(&format!("#/$defs/{k}").as_str()),
                "{k} is not in the schema's oneOf"
            );
        }
        for k in model::Kind::ALL {
            match k.manifest_kind() {
                Some(m) => {
                    assert!(KINDS.contains(&m));
                    assert_eq!(model::Kind::from_manifest_kind(m), Some(*k));
                }
                None => assert!(!KINDS.iter().any(|m| model::Kind::from_manifest_kind(m) == Some(*k))),
            }
        }
        // Every kind a manifest declares has an example, which renders back
        // to itself.
        let mut seen = std::collections::BTreeSet::new();
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/examples");
        for l in load_path(std::path::Path::new(root)).unwrap() {
            let kind = l.op.key().0;
            seen.insert(kind.manifest_kind().unwrap());
            let yaml = to_yaml(&[render(&l.op).unwrap()]);
            if kind == model::Kind::Certificate {
                // Rendered without its key, which is never shown: it does
                // not apply again as it is.
                assert!(!yaml.contains("PRIVATE KEY") && !yaml.contains("privateKey"), "{yaml}");
                let e = parse_str("x.yaml", &yaml).unwrap_err();
                assert!(e.message.starts_with("spec.privateKey:"), "{e:?}");
                continue;
            }
            assert_eq!(parse_str("x.yaml", &yaml).unwrap()[0].op, l.op, "{yaml}");
        }
        assert_eq!(
            seen.into_iter().collect::<Vec<_>>().len(),
            KINDS.len(),
            "a kind has no example"
        );
    }

    #[test]
    fn the_schema_catches_what_the_parser_refuses() {
        let v = validator();
        let ok = serde_json::json!({"apiVersion": "sdn/v1", "kind": "SecurityGroup", "metadata": {"name": "web", "tenant": "t"},
            "spec": {"rules": [{"id": "a", "direction": "ingress", "etherType": "IPv4", "protocol": "tcp", "ports": "80-90"}]}});
        assert!(v.is_valid(&ok));
        let mut typo = ok.clone();
        typo["spec"]["rules"][0]["portz"] = serde_json::json!(80);
        assert!(!v.is_valid(&typo), "unknown rule field");
        let mut proto = ok.clone();
        proto["spec"]["rules"][0]["protocol"] = serde_json::json!("tcpp");
        assert!(!v.is_valid(&proto), "unknown protocol");
        let mut no_tenant = ok.clone();
        no_tenant["metadata"] = serde_json::json!({"name": "web"});
        assert!(!v.is_valid(&no_tenant), "a security group needs its tenant");
        let mut both = ok.clone();
        both["spec"]["rules"][0]["remoteCidr"] = serde_json::json!("10.0.0.0/8");
        both["spec"]["rules"][0]["remoteGroup"] = serde_json::json!("db");
        assert!(!v.is_valid(&both), "remoteCidr and remoteGroup are exclusive");
        let kind = serde_json::json!({"apiVersion": "sdn/v1", "kind": "Tenent", "metadata": {"name": "x"}});
        assert!(!v.is_valid(&kind));
        let path = serde_json::json!({"apiVersion": "sdn/v1", "kind": "ExchangePath", "metadata": {"name": "x"},
            "spec": {"from": "a", "to": "b", "source": "0.0.0.0/0", "destination": "10.0.0.1/32", "protocol": "tcp",
                     "ports": 443, "broad": true, "broadReason": "public portal"}});
        assert!(v.is_valid(&path));
        let mut no_reason = path.clone();
        no_reason["spec"].as_object_mut().unwrap().remove("broadReason");
        assert!(!v.is_valid(&no_reason), "broad needs a reason");
        let mut blank = path.clone();
        blank["spec"]["broadReason"] = serde_json::json!(" ");
        assert!(!v.is_valid(&blank), "a blank reason is none");
        let mut two_lines = path.clone();
        two_lines["spec"]["broadReason"] = serde_json::json!("portal\nrevision 7");
        assert!(!v.is_valid(&two_lines), "a reason is one line");
        let mut not_broad = path.clone();
        not_broad["spec"]["broad"] = serde_json::json!(false);
        assert!(!v.is_valid(&not_broad), "a reason is only for a broad path");
        let host = serde_json::json!({"apiVersion": "sdn/v1", "kind": "Host", "metadata": {"name": "h"},
            "spec": {"underlayIp": "192.0.2.1"}});
        assert!(v.is_valid(&host));
        let mut v6 = host.clone();
        v6["spec"]["underlayIp"] = serde_json::json!("fd99::2");
        assert!(!v.is_valid(&v6), "the underlay is IPv4");
    }
}
