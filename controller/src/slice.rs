//! Each host's share of the state: its ports, the security groups they use,
//! the members of every group those groups' rules refer to, and the overlay
//! of every VPC with a port on the host.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use sdn_policies::{Remote, State};
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

fn resource(name: String, kind: pb::resource::Kind) -> (String, pb::Resource) {
    let mut r = pb::Resource {
        name: name.clone(),
        version: String::new(),
        kind: Some(kind),
    };
    r.version = format!("{:016x}", fnv1a(&r.encode_to_vec()));
    (name, r)
}

/// The resources of one host, by name.
pub fn host_slice(state: &State, host: &str) -> BTreeMap<String, pb::Resource> {
    let mut out = BTreeMap::new();
    let mut groups: BTreeSet<&str> = BTreeSet::new();
    for p in state.ports.values().filter(|p| p.host_id == host) {
        out.extend([resource(
            format!("port/{}", p.id),
            pb::resource::Kind::Port(port_to_pb(p)),
        )]);
        groups.extend(p.security_group_ids.iter().map(String::as_str));
    }
    let local_vpcs: BTreeSet<&str> = state
        .ports
        .values()
        .filter(|p| p.host_id == host)
        .filter_map(|p| state.subnets.get(&p.subnet_id))
        .map(|s| s.vpc_id.as_str())
        .collect();
    // The peers of those VPCs: their networks, the peerings and the VPC
    // firewalls between them.
    let mut vpcs = local_vpcs.clone();
    for pr in state
        .peerings
        .values()
        .filter(|p| local_vpcs.contains(p.vpc_a.as_str()) || local_vpcs.contains(p.vpc_b.as_str()))
    {
        vpcs.insert(&pr.vpc_a);
        vpcs.insert(&pr.vpc_b);
        out.extend([resource(
            format!("peering/{}", pr.id),
            pb::resource::Kind::VpcPeering(crate::convert::peering_to_pb(pr)),
        )]);
        if let Some(f) = state.firewall_policies.get(&pr.policy_id) {
            out.extend([resource(
                format!("firewall/{}", f.id),
                pb::resource::Kind::FirewallPolicy(crate::convert::firewall_to_pb(f)),
            )]);
        }
    }
    for v in &vpcs {
        let policy = state.vpcs.get(*v).map(|x| x.border_policy_id.as_str()).unwrap_or("");
        if let Some(f) = state.firewall_policies.get(policy) {
            out.extend([resource(
                format!("firewall/{}", f.id),
                pb::resource::Kind::FirewallPolicy(crate::convert::firewall_to_pb(f)),
            )]);
        }
    }
    for v in vpcs {
        if let Some(net) = vpc_network(state, v) {
            out.extend([resource(format!("vpc/{v}"), pb::resource::Kind::VpcNetwork(net))]);
        }
    }
    // Zones and exchange paths are small and the same for every host.
    // With every VPC subnet of the zone, which no packet from outside may
    // claim as its source.
    for z in state.zones.values() {
        let mut zp = crate::convert::zone_to_pb(z);
        for sn in state.subnets.values() {
            if state.vpcs.get(&sn.vpc_id).is_some_and(|v| v.zone_id == z.id) {
                zp.vpc_subnets.extend(sn.cidr_v4.map(|c| c.to_string()));
                zp.vpc_subnets.extend(sn.cidr_v6.map(|c| c.to_string()));
            }
        }
        out.extend([resource(format!("zone/{}", z.id), pb::resource::Kind::Zone(zp))]);
    }
    for x in state.exchange_paths.values() {
        out.extend([resource(
            format!("exchange/{}", x.id),
            pb::resource::Kind::ExchangePath(crate::convert::exchange_to_pb(x)),
        )]);
    }
    let mut remote_groups: BTreeSet<&str> = BTreeSet::new();
    for g in &groups {
        if let Some(sg) = state.security_groups.get(*g) {
            out.extend([resource(
                format!("sg/{g}"),
                pb::resource::Kind::SecurityGroup(group_to_pb(sg)),
            )]);
            for r in &sg.rules {
                if let Remote::Group(rg) = &r.remote {
                    remote_groups.insert(rg);
                }
            }
        }
    }
    for q in state.quarantines.values() {
        let port_ids: Vec<String> = state
            .quarantined_ports(q)
            .into_iter()
            .filter(|p| p.host_id == host)
            .map(|p| p.id.clone())
            .collect();
        if !port_ids.is_empty() {
            let on_host = pb::QuarantineOnHost {
                quarantine: Some(crate::convert::quarantine_to_pb(q)),
                port_ids,
            };
            out.extend([resource(
                format!("quarantine/{}", q.id),
                pb::resource::Kind::Quarantine(on_host),
            )]);
        }
    }
    for g in remote_groups {
        let members = pb::GroupMembers {
            group_id: g.to_string(),
            addresses: state.group_members(g).iter().map(|a| a.to_string()).collect(),
        };
        out.extend([resource(
            format!("members/{g}"),
            pb::resource::Kind::GroupMembers(members),
        )]);
    }
    out
}

/// The overlay of a VPC: VNI, subnet gateways and every port with its host.
fn vpc_network(state: &State, vpc_id: &str) -> Option<pb::VpcNetwork> {
    let vpc = state.vpcs.get(vpc_id)?;
    let opt = |a: Option<String>| a.unwrap_or_default();
    let subnets: Vec<&sdn_policies::Subnet> = state.subnets.values().filter(|s| s.vpc_id == vpc_id).collect();
    let gateways = subnets
        .iter()
        .map(|s| pb::SubnetGateway {
            subnet_id: s.id.clone(),
            gateway_v4: opt(s.gateway_v4().map(|a| a.to_string())),
            gateway_v6: opt(s.gateway_v6().map(|a| a.to_string())),
        })
        .collect();
    let endpoints = state
        .ports
        .values()
        .filter(|p| subnets.iter().any(|s| s.id == p.subnet_id))
        .map(|p| pb::Endpoint {
            port_id: p.id.clone(),
            mac: p.mac.to_string(),
            ipv4: opt(p.ipv4.map(|a| a.to_string())),
            ipv6: opt(p.ipv6.map(|a| a.to_string())),
            host_id: p.host_id.clone(),
            host_underlay_ip: opt(state.hosts.get(&p.host_id).map(|h| h.underlay_ip.to_string())),
        })
        .collect();
    Some(pb::VpcNetwork {
        vpc_id: vpc_id.to_string(),
        vni: vpc.vni,
        zone_id: vpc.zone_id.clone(),
        border_policy_id: vpc.border_policy_id.clone(),
        gateways,
        endpoints,
    })
}

/// The digest of every host's share.
pub fn host_digests(state: &State) -> BTreeMap<String, u64> {
    state
        .hosts
        .keys()
        .map(|h| {
            let mut acc = Vec::new();
            for (name, r) in host_slice(state, h) {
                acc.extend_from_slice(name.as_bytes());
                acc.extend_from_slice(r.version.as_bytes());
            }
            (h.clone(), fnv1a(&acc))
        })
        .collect()
}

/// The digest of a host with nothing on it.
pub fn empty_digest() -> u64 {
    fnv1a(&[])
}
