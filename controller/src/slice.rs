//! Each host's share of the state: its ports, the security groups they use,
//! the members of every group those groups' rules refer to, the overlay of
//! every VPC with a port on the host and of its peers (each port of those
//! VPCs as a resource of its own), their firewalls,
//! the quarantines of its ports, and the zones and exchange paths every
//! host holds.
//!
//! A share is a set of named resources. [`names`] gives the names a host
//! holds and [`build`] one resource; both look the objects up through the
//! state's relations, so they cost what the host holds, not what the state
//! holds.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use sdn_policies::{Index, QuarantineTarget, Remote, State};
use sdn_proto::v1 as pb;

use crate::convert::{group_to_pb, port_to_pb};

/// FNV-1a, 64 bits: a digest that is the same on every replica and release.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

fn resource(name: &str, kind: pb::resource::Kind) -> pb::Resource {
    let mut r = pb::Resource {
        name: name.to_string(),
        version: String::new(),
        kind: Some(kind),
    };
    r.version = format!("{:016x}", fnv1a(&r.encode_to_vec()));
    r
}

/// Whether a resource's content is the same for every host that holds it
/// (a quarantine lists only the host's own ports).
pub fn shared_content(name: &str) -> bool {
    !name.starts_with("quarantine/")
}

/// The names of the resources a host holds.
pub fn names(state: &State, host: &str) -> BTreeSet<String> {
    let ix = state.index();
    let mut out = BTreeSet::new();
    for p in Index::of(&ix.ports_by_host, host) {
        out.insert(format!("port/{p}"));
    }
    let local: BTreeSet<&str> = ix.vpcs_on(host).collect();
    // The peers of those VPCs: their networks, the peerings and the VPC
    // firewalls between them.
    let mut vpcs = local.clone();
    for pr in local
        .iter()
        .flat_map(|v| Index::of(&ix.peerings_by_vpc, v))
        .filter_map(|id| state.peerings.get(id))
    {
        vpcs.insert(&pr.vpc_a);
        vpcs.insert(&pr.vpc_b);
        out.insert(format!("peering/{}", pr.id));
        if state.firewall_policies.contains_key(&pr.policy_id) {
            out.insert(format!("firewall/{}", pr.policy_id));
        }
    }
    for v in vpcs {
        let Some(vpc) = state.vpcs.get(v) else { continue };
        if state.firewall_policies.contains_key(&vpc.border_policy_id) {
            out.insert(format!("firewall/{}", vpc.border_policy_id));
        }
        out.insert(format!("vpc/{v}"));
        out.extend(Index::of(&ix.ports_by_vpc, v).map(|p| format!("endpoint/{p}")));
    }
    // Zones and exchange paths are small and the same for every host.
    out.extend(state.zones.keys().map(|z| format!("zone/{z}")));
    out.extend(state.exchange_paths.keys().map(|x| format!("exchange/{x}")));
    for g in ix.host_groups.get(host).into_iter().flat_map(|m| m.keys()) {
        let Some(sg) = state.security_groups.get(g) else {
            continue;
        };
        out.insert(format!("sg/{g}"));
        for r in &sg.rules {
            if let Remote::Group(rg) = &r.remote {
                out.insert(format!("members/{rg}"));
            }
        }
    }
    for q in state.quarantines.values() {
        let here = match q.target {
            QuarantineTarget::Port => state.ports.get(&q.target_id).is_some_and(|p| p.host_id == host),
            QuarantineTarget::Vpc => local.contains(q.target_id.as_str()),
            QuarantineTarget::Vm => Index::of(&ix.ports_by_vm, &q.target_id).any(|p| state.ports[p].host_id == host),
        };
        if here {
            out.insert(format!("quarantine/{}", q.id));
        }
    }
    out
}

/// One resource of `host`'s share, by name; `None` when its object is gone.
pub fn build(state: &State, host: &str, name: &str) -> Option<pb::Resource> {
    use pb::resource::Kind as R;
    let (kind, id) = name.split_once('/')?;
    let ix = state.index();
    let k = match kind {
        "port" => R::Port(port_to_pb(state.ports.get(id)?)),
        "peering" => R::VpcPeering(crate::convert::peering_to_pb(state.peerings.get(id)?)),
        "firewall" => R::FirewallPolicy(crate::convert::firewall_to_pb(state.firewall_policies.get(id)?)),
        "vpc" => R::VpcNetwork(vpc_network(state, id)?),
        "endpoint" => R::Endpoint(endpoint(state, state.ports.get(id)?)),
        "zone" => {
            // With every VPC subnet of the zone, which no packet from
            // outside may claim as its source.
            let mut zp = crate::convert::zone_to_pb(state.zones.get(id)?);
            let subnets: BTreeMap<&str, &sdn_policies::Subnet> = Index::of(&ix.vpcs_by_zone, id)
                .flat_map(|v| Index::of(&ix.subnets_by_vpc, v))
                .filter_map(|s| state.subnets.get_key_value(s))
                .map(|(k, v)| (k.as_str(), v))
                .collect();
            for sn in subnets.values() {
                zp.vpc_subnets.extend(sn.cidr_v4.map(|c| c.to_string()));
                zp.vpc_subnets.extend(sn.cidr_v6.map(|c| c.to_string()));
            }
            R::Zone(zp)
        }
        "exchange" => R::ExchangePath(crate::convert::exchange_to_pb(state.exchange_paths.get(id)?)),
        "sg" => R::SecurityGroup(group_to_pb(state.security_groups.get(id)?)),
        "members" => R::GroupMembers(pb::GroupMembers {
            group_id: id.to_string(),
            addresses: state.group_members(id).iter().map(|a| a.to_string()).collect(),
        }),
        "quarantine" => {
            let q = state.quarantines.get(id)?;
            let port_ids: Vec<String> = state
                .quarantined_ports(q)
                .into_iter()
                .filter(|p| p.host_id == host)
                .map(|p| p.id.clone())
                .collect();
            if port_ids.is_empty() {
                return None;
            }
            R::Quarantine(pb::QuarantineOnHost {
                quarantine: Some(crate::convert::quarantine_to_pb(q)),
                port_ids,
            })
        }
        _ => return None,
    };
    Some(resource(name, k))
}

/// The resources of one host, by name, built from scratch.
pub fn host_slice(state: &State, host: &str) -> BTreeMap<String, pb::Resource> {
    names(state, host)
        .into_iter()
        .filter_map(|n| build(state, host, &n).map(|r| (n, r)))
        .collect()
}

/// The overlay of a VPC: VNI, zone, border and subnet gateways (its ports
/// are resources of their own).
fn vpc_network(state: &State, vpc_id: &str) -> Option<pb::VpcNetwork> {
    let vpc = state.vpcs.get(vpc_id)?;
    let ix = state.index();
    let opt = |a: Option<String>| a.unwrap_or_default();
    let gateways = Index::of(&ix.subnets_by_vpc, vpc_id)
        .filter_map(|id| state.subnets.get(id))
        .map(|s| pb::SubnetGateway {
            subnet_id: s.id.clone(),
            gateway_v4: opt(s.gateway_v4().map(|a| a.to_string())),
            gateway_v6: opt(s.gateway_v6().map(|a| a.to_string())),
        })
        .collect();
    Some(pb::VpcNetwork {
        vpc_id: vpc_id.to_string(),
        vni: vpc.vni,
        zone_id: vpc.zone_id.clone(),
        border_policy_id: vpc.border_policy_id.clone(),
        gateways,
    })
}

/// Where one port of a VPC lives: its addresses and its host's underlay
/// address.
fn endpoint(state: &State, p: &sdn_policies::Port) -> pb::Endpoint {
    let opt = |a: Option<String>| a.unwrap_or_default();
    pb::Endpoint {
        port_id: p.id.clone(),
        mac: p.mac.to_string(),
        ipv4: opt(p.ipv4.map(|a| a.to_string())),
        ipv6: opt(p.ipv6.map(|a| a.to_string())),
        host_id: p.host_id.clone(),
        host_underlay_ip: opt(state.hosts.get(&p.host_id).map(|h| h.underlay_ip.to_string())),
        vpc_id: state
            .subnets
            .get(&p.subnet_id)
            .map(|s| s.vpc_id.clone())
            .unwrap_or_default(),
    }
}
