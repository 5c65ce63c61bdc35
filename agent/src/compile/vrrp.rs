//! Virtual IPs held by ports: tenant VMs that run their own VRRP.
//!
//! - The VRRP router of each such virtual IP with a holder port here: its
//!   holders (address, MAC, host, declared priority) and the other hosts
//!   with one, for the relay programs (`SDN_VRRP_GROUPS`).
//! - The owner the controller granted (`owner_port_id`, the highest epoch
//!   in the share) is where the virtual IP lives: its addresses are that
//!   port's endpoints on every host of the VPC, and the port alone may
//!   send from them (its gratuitous ARP and unsolicited NA included).
//!   Before the first grant the addresses are nobody's (fail closed).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use dataplane_common::maps::{Endpoint, EndpointKey, PortAddrKey, VrrpGroup, VrrpKey, VrrpMember, VRRP_MEMBERS};
use dataplane_common::FAMILY_V4;
use sdn_proto::v1 as pb;

use super::parse_mac;

/// The addresses of a virtual IP, as endpoint keys of its VPC.
fn addresses(v: &pb::VirtualIp) -> Vec<IpAddr> {
    [v.ipv4.parse::<IpAddr>().ok(), v.ipv6.parse::<IpAddr>().ok()]
        .into_iter()
        .flatten()
        .collect()
}

fn key(vni: u32, a: IpAddr) -> EndpointKey {
    let (family, addr) = super::addr16(a);
    EndpointKey {
        vni,
        family,
        _pad: [0; 3],
        addr,
    }
}

/// The owner's endpoint under each address of the virtual IPs of VPC
/// `vni` that have an owner; `eps` holds the VPC's ports' endpoints and
/// `port_eps` each port's record. An address some endpoint already has is
/// left to it (the controller refuses such a virtual IP).
pub(super) fn owner_endpoints(
    vips: &[&pb::VirtualIpOnHost],
    vni: u32,
    eps: &BTreeMap<EndpointKey, Endpoint>,
    port_eps: &BTreeMap<&str, &pb::Endpoint>,
) -> Vec<(EndpointKey, Endpoint)> {
    let mut out = Vec::new();
    for on in vips.iter().filter(|on| on.vni == vni) {
        let Some(v) = &on.virtual_ip else { continue };
        let Some(owner) = port_eps.get(v.owner_port_id.as_str()) else {
            continue;
        };
        let found = [&owner.ipv4, &owner.ipv6]
            .into_iter()
            .filter_map(|a| a.parse::<IpAddr>().ok())
            .find_map(|a| eps.get(&key(vni, a)).copied());
        let Some(ep) = found else { continue };
        for a in addresses(v) {
            let k = key(vni, a);
            if !eps.contains_key(&k) {
                out.push((k, ep));
            }
        }
    }
    out
}

/// The addresses the owner port may send from, when it is here.
pub(super) fn owner_addresses(
    vips: &[&pb::VirtualIpOnHost],
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Vec<PortAddrKey> {
    let mut out = Vec::new();
    for on in vips {
        let Some(v) = &on.virtual_ip else { continue };
        if v.owner_port_id.is_empty() {
            continue;
        }
        let Some(ifx) = ifindex(&v.owner_port_id) else {
            continue;
        };
        for a in addresses(v) {
            let (family, addr) = super::addr16(a);
            out.push(PortAddrKey {
                ifindex: ifx,
                family,
                _pad: [0; 3],
                addr,
            });
        }
    }
    out
}

/// The VRRP routers with a holder port here, and those ports' devices.
/// `ifindex` gives a port's device here (`None`: the port is elsewhere, or
/// quarantined: it then neither speaks nor hears).
pub(super) fn groups(
    vips: &[&pb::VirtualIpOnHost],
    port_eps: &BTreeMap<&str, &pb::Endpoint>,
    ifindex: &dyn Fn(&str) -> Option<u32>,
    rejected: &mut Vec<String>,
) -> (BTreeMap<VrrpKey, VrrpGroup>, BTreeSet<u32>) {
    let mut out = BTreeMap::new();
    let mut ports = BTreeSet::new();
    for on in vips {
        let Some(v) = &on.virtual_ip else { continue };
        let mut g = VrrpGroup::default();
        let mut hosts: BTreeSet<[u8; 4]> = BTreeSet::new();
        let mut here = Vec::new();
        for h in v.holders.iter().take(VRRP_MEMBERS) {
            let local = ifindex(&h.port_id);
            let Some(e) = port_eps.get(h.port_id.as_str()) else {
                if local.is_some() {
                    rejected.push(format!(
                        "virtual ip {}: holder port {} has no endpoint in the share; its VRRP is not relayed",
                        v.id, h.port_id
                    ));
                }
                continue;
            };
            let (Ok(addr), Some(mac)) = (e.ipv4.parse::<std::net::Ipv4Addr>(), parse_mac(&e.mac)) else {
                if local.is_some() {
                    rejected.push(format!(
                        "virtual ip {}: holder port {} has no IPv4 address to speak VRRP from \
                         (VRRP over IPv6 is not relayed yet)",
                        v.id, h.port_id
                    ));
                }
                continue;
            };
            let host_v4 = match e.host_underlay_ip.parse::<IpAddr>() {
                Ok(IpAddr::V4(a)) => a.octets(),
                _ if local.is_some() => [0; 4],
                _ => continue,
            };
            if let Some(ifx) = local {
                here.push(ifx);
            } else {
                hosts.insert(host_v4);
            }
            g.members[g.n_members as usize] = VrrpMember {
                addr: addr.octets(),
                host_v4,
                ifindex: local.unwrap_or(0),
                mac,
                priority: h.priority.clamp(1, 254) as u8,
                _pad: 0,
            };
            g.n_members += 1;
        }
        if here.is_empty() {
            continue;
        }
        for (i, h) in hosts.iter().enumerate() {
            g.hosts[i] = *h;
        }
        g.n_hosts = hosts.len() as u32;
        let k = VrrpKey {
            vni: on.vni,
            vrid: v.vrid.min(255) as u8,
            family: FAMILY_V4,
            _pad: [0; 2],
        };
        if out.contains_key(&k) {
            rejected.push(format!(
                "virtual ip {}: VRRP router {} of its VPC is another virtual ip's; not relayed",
                v.id, v.vrid
            ));
            continue;
        }
        out.insert(k, g);
        ports.extend(here);
    }
    (out, ports)
}
