//! Security groups: each port's rules compiled to remote prefixes and
//! the service sets they name, and the identities numbering those sets.

use super::*;

/// A block of services: protocol (0: any) and an aligned port block.
pub type Block = (u8, u8, u16);

/// The services an identity admits. `any` admits everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceSet {
    pub any: bool,
    pub blocks: BTreeSet<Block>,
}

impl ServiceSet {
    fn add(&mut self, other: &ServiceSet) {
        if other.any {
            self.any = true;
        }
        self.blocks.extend(other.blocks.iter().copied());
    }
    fn normalised(mut self) -> ServiceSet {
        if self.any {
            self.blocks.clear();
        }
        self
    }
}

/// Splits an inclusive range into aligned power-of-two blocks.
pub fn port_blocks(lo: u16, hi: u16) -> Vec<(u8, u16)> {
    let mut out = Vec::new();
    let (mut lo, hi) = (lo as u32, hi as u32);
    while lo <= hi {
        // Largest block aligned at lo that fits in [lo, hi].
        let mut size = if lo == 0 {
            1u32 << 16
        } else {
            1u32 << lo.trailing_zeros().min(16)
        };
        while lo + size - 1 > hi {
            size >>= 1;
        }
        let plen = 16 - size.trailing_zeros() as u8;
        out.push((plen, lo as u16));
        lo += size;
    }
    out
}

/// (direction, family, prefix length, masked address)
pub(super) type PrefixKey = (u8, u8, u8, [u8; 16]);

/// What a set of security groups compiles to, for every port that uses
/// the same groups: per direction and family, the prefix lengths in use
/// and each remote prefix with the services it may use (closed over the
/// prefixes containing it, so the longest match alone decides).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct Policy {
    pub plens: Vec<((u8, u8), PrefixLens)>,
    pub addrs: Vec<(PrefixKey, ServiceSet)>,
    /// Whether any rule is an egress rule (else egress is open).
    pub has_egress: bool,
    /// The tables as bytes: a port's epoch digests them with its flags.
    pub digest: Vec<u8>,
}

/// Compiles the rules of `group_ids`, every one of which is in `groups`.
pub(super) fn compile_policy(
    group_ids: &[String],
    groups: &BTreeMap<&str, &pb::SecurityGroup>,
    members: &BTreeMap<&str, Vec<IpAddr>>,
) -> Result<Policy, CompileError> {
    // Direct rules: (dir, family) -> prefix -> services.
    let mut direct: BTreeMap<(u8, u8), PrefixTable> = BTreeMap::new();
    let mut out = Policy::default();
    for g in group_ids.iter().filter_map(|gid| groups.get(gid.as_str())) {
        for r in &g.rules {
            let rerr = |message: String| CompileError::Rule {
                group: g.id.clone(),
                rule: r.id.clone(),
                message,
            };
            let dir = match pb::Direction::try_from(r.direction) {
                Ok(pb::Direction::Ingress) => DIR_INGRESS,
                Ok(pb::Direction::Egress) => DIR_EGRESS,
                _ => return Err(rerr("unknown direction".into())),
            };
            if dir == DIR_EGRESS {
                out.has_egress = true;
            }
            let family = match pb::EtherType::try_from(r.ether_type) {
                Ok(pb::EtherType::Ipv4) => FAMILY_V4,
                Ok(pb::EtherType::Ipv6) => FAMILY_V6,
                _ => return Err(rerr("unknown ether type".into())),
            };
            let proto: u8 = match pb::Protocol::try_from(r.protocol) {
                Ok(pb::Protocol::Any) => 0,
                Ok(pb::Protocol::Tcp) => 6,
                Ok(pb::Protocol::Udp) => 17,
                Ok(pb::Protocol::Icmp) => 1,
                Ok(pb::Protocol::Icmpv6) => 58,
                _ => return Err(rerr("unknown protocol".into())),
            };
            let mut svc = ServiceSet::default();
            if proto == 0 {
                svc.any = true;
            } else if r.port_min == 0 && r.port_max == 0 {
                svc.blocks.insert((proto, 0, 0));
            } else {
                if r.port_min > r.port_max || r.port_max > 65535 {
                    return Err(rerr(format!("bad port range {}-{}", r.port_min, r.port_max)));
                }
                for (plen, port) in port_blocks(r.port_min as u16, r.port_max as u16) {
                    svc.blocks.insert((proto, plen, port));
                }
            }
            let prefixes: Vec<(u8, [u8; 16])> = if !r.remote_cidr.is_empty() {
                let n: ipnetwork::IpNetwork = r
                    .remote_cidr
                    .parse()
                    .map_err(|_| rerr(format!("invalid remote_cidr {:?}", r.remote_cidr)))?;
                let (f, a) = addr16(n.network());
                if f != family {
                    return Err(rerr("remote_cidr family differs from ether_type".into()));
                }
                vec![(n.prefix(), a)]
            } else if !r.remote_group_id.is_empty() {
                members
                    .get(r.remote_group_id.as_str())
                    .map(|v| v.as_slice())
                    .unwrap_or(&[])
                    .iter()
                    .map(|ip| addr16(*ip))
                    .filter(|(f, _)| *f == family)
                    .map(|(f, a)| (if f == FAMILY_V4 { 32 } else { 128 }, a))
                    .collect()
            } else {
                vec![(0, [0u8; 16])]
            };
            let table = direct.entry((dir, family)).or_default();
            for (plen, a) in prefixes {
                table.entry((plen, mask16(family, a, plen))).or_default().add(&svc);
            }
        }
    }
    // Close each prefix's set over the prefixes that contain it, so the
    // longest match alone decides.
    for ((dir, family), table) in &direct {
        let lens: BTreeSet<u8> = table.keys().map(|(l, _)| *l).collect();
        let mut pl = PrefixLens::default();
        for l in &lens {
            pl.set(*l);
        }
        out.plens.push(((*dir, *family), pl));
        for ((plen, a), svc) in table {
            let mut closed = svc.clone();
            for l in lens.iter().filter(|l| **l < *plen) {
                if let Some(parent) = table.get(&(*l, mask16(*family, *a, *l))) {
                    closed.add(parent);
                }
            }
            let closed = closed.normalised();
            out.digest.extend_from_slice(&[*dir, *family, *plen]);
            out.digest.extend_from_slice(a);
            out.digest.push(closed.any as u8);
            for (pr, bl, po) in &closed.blocks {
                out.digest.extend_from_slice(&[*pr, *bl]);
                out.digest.extend_from_slice(&po.to_be_bytes());
            }
            out.addrs.push(((*dir, *family, *plen, *a), closed));
        }
    }
    Ok(out)
}

/// What one port compiles to, its policy aside.
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct PortPart {
    /// Its device's ifindex and entry (`policy_id` is set when the parts
    /// are put together). A port that cannot be compiled has an entry that
    /// drops all its traffic (fail closed): its device keeps the programs
    /// instead of losing them and passing all.
    pub entry: Option<(u32, PortInfo)>,
    pub addrs: Vec<PortAddrKey>,
    /// Its device, when it is not on this host yet.
    pub missing_device: Option<(String, String)>,
    /// Why it cannot be compiled.
    pub rejected: Option<String>,
}

/// One port: its addresses, its flags, and its epoch from its `policy`
/// (compiled from its groups once every group is known to be here).
#[allow(clippy::too_many_arguments)]
pub(super) fn compile_port(
    p: &pb::Port,
    ifx: Option<u32>,
    groups: &BTreeMap<&str, &pb::SecurityGroup>,
    subnet_vni: &BTreeMap<&str, u32>,
    zoned_subnets: &BTreeSet<&str>,
    quarantined: bool,
    policy: &mut dyn FnMut() -> Result<std::sync::Arc<Policy>, CompileError>,
) -> PortPart {
    match port_entry(p, ifx, groups, subnet_vni, zoned_subnets, quarantined, policy) {
        Ok(part) => part,
        Err(e) => PortPart {
            entry: ifx.map(|i| {
                (
                    i,
                    PortInfo {
                        mac: [0; 6],
                        _pad0: [0; 2],
                        policy_id: 0,
                        epoch: 0,
                        flags: PORT_F_REJECTED,
                        vni: 0,
                    },
                )
            }),
            rejected: Some(e.to_string()),
            ..PortPart::default()
        },
    }
}

fn port_entry(
    p: &pb::Port,
    ifx: Option<u32>,
    groups: &BTreeMap<&str, &pb::SecurityGroup>,
    subnet_vni: &BTreeMap<&str, u32>,
    zoned_subnets: &BTreeSet<&str>,
    quarantined: bool,
    policy: &mut dyn FnMut() -> Result<std::sync::Arc<Policy>, CompileError>,
) -> Result<PortPart, CompileError> {
    let perr = |field: &'static str, message: String| CompileError::Port {
        port: p.id.clone(),
        field,
        message,
    };
    let mac = parse_mac(&p.mac).ok_or_else(|| perr("mac", format!("invalid MAC {:?}", p.mac)))?;
    let vni = *subnet_vni.get(p.subnet_id.as_str()).ok_or_else(|| {
        perr(
            "subnet_id",
            format!("the VPC of subnet {} is missing from the share", p.subnet_id),
        )
    })?;
    let Some(ifx) = ifx else {
        return Ok(PortPart {
            missing_device: Some((p.id.clone(), p.device.clone())),
            ..PortPart::default()
        });
    };
    let mut addrs: Vec<IpAddr> = Vec::new();
    if !p.ipv4.is_empty() {
        addrs.push(
            p.ipv4
                .parse()
                .map_err(|_| perr("ipv4", format!("invalid address {:?}", p.ipv4)))?,
        );
    }
    if !p.ipv6.is_empty() {
        addrs.push(
            p.ipv6
                .parse()
                .map_err(|_| perr("ipv6", format!("invalid address {:?}", p.ipv6)))?,
        );
    }
    addrs.push(IpAddr::V6(link_local(mac)));
    let mut part = PortPart::default();
    for a in &addrs {
        let (family, addr) = addr16(*a);
        part.addrs.push(PortAddrKey {
            ifindex: ifx,
            family,
            _pad: [0; 3],
            addr,
        });
    }
    if let Some(gid) = p.security_group_ids.iter().find(|g| !groups.contains_key(g.as_str())) {
        return Err(perr(
            "security_group_ids",
            format!("group {gid} missing from the share"),
        ));
    }
    let policy = policy()?;
    let mut flags = 0;
    if !policy.has_egress {
        flags |= PORT_F_EGRESS_OPEN;
    }
    if quarantined {
        flags |= PORT_F_QUARANTINED;
    }
    if zoned_subnets.contains(p.subnet_id.as_str()) {
        flags |= PORT_F_UPLINK;
    }
    let mut digest = policy.digest.clone();
    digest.extend_from_slice(&flags.to_be_bytes());
    part.entry = Some((
        ifx,
        PortInfo {
            mac,
            _pad0: [0; 2],
            policy_id: 0,
            epoch: fnv32(&digest).max(1),
            flags,
            vni,
        },
    ));
    Ok(part)
}

/// Assigns stable identity numbers to service sets. Identity 0 is never used.
#[derive(Debug, Default)]
pub struct Identities {
    by_set: BTreeMap<ServiceSet, u32>,
    by_id: BTreeMap<u32, ServiceSet>,
}

impl Identities {
    /// Rebuilds the allocator from the maps' contents (agent restart).
    pub fn adopt(rules: &BTreeMap<RuleKey, u8>, addrs: &BTreeMap<AddrKey, AddrIdentity>) -> Identities {
        let mut by_id: BTreeMap<u32, ServiceSet> = BTreeMap::new();
        for k in rules.keys() {
            by_id
                .entry(k.identity)
                .or_default()
                .blocks
                .insert((k.proto, k.port_plen, k.port));
        }
        for v in addrs.values() {
            if v.any_proto != 0 {
                by_id.entry(v.identity).or_default().any = true;
            }
        }
        let by_set = by_id.iter().map(|(i, s)| (s.clone(), *i)).collect();
        Identities { by_set, by_id }
    }

    pub fn get_or_alloc(&mut self, set: &ServiceSet) -> u32 {
        if let Some(i) = self.by_set.get(set) {
            return *i;
        }
        let mut id = 1;
        for k in self.by_id.keys() {
            if *k != id {
                break;
            }
            id += 1;
        }
        self.by_set.insert(set.clone(), id);
        self.by_id.insert(id, set.clone());
        id
    }

    /// Forgets identities not in `used`.
    pub fn retain(&mut self, used: &BTreeSet<u32>) {
        self.by_id.retain(|i, _| used.contains(i));
        self.by_set.retain(|_, i| used.contains(i));
    }

    pub fn set(&self, id: u32) -> Option<&ServiceSet> {
        self.by_id.get(&id)
    }
}
