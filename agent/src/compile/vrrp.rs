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
/// `ifindex` gives the device of a port here that may speak (`None`: the
/// port is elsewhere, or quarantined); `here` says whether a port is on
/// this host at all (a quarantined one neither speaks nor hears).
pub(super) fn groups(
    vips: &[&pb::VirtualIpOnHost],
    port_eps: &BTreeMap<&str, &pb::Endpoint>,
    ifindex: &dyn Fn(&str) -> Option<u32>,
    here: &dyn Fn(&str) -> bool,
    rejected: &mut Vec<String>,
) -> (BTreeMap<VrrpKey, VrrpGroup>, BTreeSet<u32>) {
    let mut out = BTreeMap::new();
    let mut ports = BTreeSet::new();
    for on in vips {
        let Some(v) = &on.virtual_ip else { continue };
        let mut g = VrrpGroup::default();
        let mut hosts: BTreeSet<[u8; 4]> = BTreeSet::new();
        let mut speakers = Vec::new();
        for h in v.holders.iter().take(VRRP_MEMBERS) {
            let local = ifindex(&h.port_id);
            if local.is_none() && here(&h.port_id) {
                continue;
            }
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
                speakers.push(ifx);
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
        if speakers.is_empty() {
            continue;
        }
        for (i, h) in hosts.iter().enumerate() {
            g.hosts[i] = *h;
        }
        g.n_hosts = hosts.len() as u16;
        g.interval_cs = crate::vips::port_interval_cs(v);
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
        ports.extend(speakers);
    }
    (out, ports)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(port: &str, v4: &str, host: &str) -> pb::Endpoint {
        pb::Endpoint {
            port_id: port.into(),
            mac: "02:00:00:00:00:01".into(),
            ipv4: v4.into(),
            ipv6: String::new(),
            host_id: host.into(),
            host_underlay_ip: host.into(),
            vpc_id: "v".into(),
        }
    }

    fn vip(holders: &[(&str, u32)], owner: &str) -> pb::VirtualIpOnHost {
        pb::VirtualIpOnHost {
            virtual_ip: Some(pb::VirtualIp {
                id: "tv".into(),
                ipv4: "10.0.0.100".into(),
                ipv6: "fd00::100".into(),
                vrid: 51,
                holders: holders
                    .iter()
                    .map(|(p, prio)| pb::VipHolder {
                        port_id: p.to_string(),
                        host_id: String::new(),
                        priority: *prio,
                    })
                    .collect(),
                owner_port_id: owner.into(),
                ..Default::default()
            }),
            vni: 7,
            uplink_device: String::new(),
        }
    }

    #[test]
    fn routers_list_holders_once_per_host_and_leave_out_the_quarantined() {
        let eps = [
            ep("a", "10.0.0.1", "192.0.2.1"),
            ep("b", "10.0.0.2", "192.0.2.2"),
            ep("c", "10.0.0.3", "192.0.2.2"),
            ep("q", "10.0.0.4", "192.0.2.1"),
            ep("six", "", "192.0.2.1"),
        ];
        let port_eps: BTreeMap<&str, &pb::Endpoint> = eps.iter().map(|e| (e.port_id.as_str(), e)).collect();
        // `a` and `six` are here; `q` is here but quarantined.
        let here = |p: &str| match p {
            "a" => Some(11),
            "six" => Some(12),
            _ => None,
        };
        let v = vip(&[("a", 200), ("b", 100), ("c", 300), ("q", 50), ("six", 10)], "");
        let mut rejected = Vec::new();
        let (groups, ports) = super::groups(
            &[&v],
            &port_eps,
            &here,
            &|p| matches!(p, "a" | "six" | "q"),
            &mut rejected,
        );
        assert_eq!(ports, BTreeSet::from([11]));
        let g = groups
            .get(&VrrpKey {
                vni: 7,
                vrid: 51,
                family: FAMILY_V4,
                _pad: [0; 2],
            })
            .expect("the router");
        // `q` is left out, and so is `six`, which has no IPv4 address (with
        // why).
        assert_eq!(g.n_members, 3);
        assert_eq!(g.members[0].ifindex, 11);
        assert_eq!(g.members[0].priority, 200);
        assert_eq!(g.members[2].priority, 254, "priorities are capped at 254");
        assert_eq!(g.n_hosts, 1, "one copy per other host");
        assert_eq!(g.hosts[0], [192, 0, 2, 2]);
        assert_eq!(rejected.len(), 1, "{rejected:?}");
        assert!(rejected[0].contains("six"), "{rejected:?}");

        // No holder here: no router.
        let none = |_: &str| None;
        let (groups, ports) = super::groups(&[&v], &port_eps, &none, &|_| false, &mut Vec::new());
        assert!(groups.is_empty() && ports.is_empty());
    }

    #[test]
    fn the_owner_alone_gets_the_addresses() {
        let eps = [ep("a", "10.0.0.1", "192.0.2.1"), ep("b", "10.0.0.2", "192.0.2.2")];
        let port_eps: BTreeMap<&str, &pb::Endpoint> = eps.iter().map(|e| (e.port_id.as_str(), e)).collect();
        let b_ep = Endpoint {
            ifindex: 0,
            host_v4: [192, 0, 2, 2],
            mac: [2, 0, 0, 0, 0, 2],
            flags: 0,
            vni: 7,
            policy: 0,
        };
        let overlay: BTreeMap<EndpointKey, Endpoint> = BTreeMap::from([(key(7, "10.0.0.2".parse().unwrap()), b_ep)]);
        // Before any grant the addresses are nobody's.
        let v = vip(&[("a", 200), ("b", 100)], "");
        assert!(owner_endpoints(&[&v], 7, &overlay, &port_eps).is_empty());
        let v = vip(&[("a", 200), ("b", 100)], "b");
        let got = owner_endpoints(&[&v], 7, &overlay, &port_eps);
        assert_eq!(got.len(), 2, "IPv4 and IPv6");
        assert!(got.iter().all(|(_, e)| *e == b_ep));
        // Another VPC's share moves nothing.
        assert!(owner_endpoints(&[&v], 8, &overlay, &port_eps).is_empty());
        // The owner sends from them only where it is.
        let here = |p: &str| (p == "b").then_some(21);
        let addrs = owner_addresses(&[&v], &here);
        assert_eq!(addrs.len(), 2);
        assert!(addrs.iter().all(|k| k.ifindex == 21));
        assert!(owner_addresses(&[&v], &|_: &str| None).is_empty());
    }
}
