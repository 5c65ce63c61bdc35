//! Each host's share of the state: its ports, the security groups they use,
//! the members of every group those groups' rules refer to, the overlay of
//! every VPC with a port on the host and of its peers (each port of those
//! VPCs as a resource of its own), their firewalls,
//! the quarantines of its ports, and the zones, exchange paths and mirror
//! sessions every host holds.
//!
//! A share is a set of named resources. [`names`] gives the names a host
//! holds and [`build`] one resource; both look the objects up through the
//! state's relations, so they cost what the host holds, not what the state
//! holds.

use std::collections::{BTreeMap, BTreeSet};

use prost::Message;
use sdn_policies::{Index, QuarantineTarget, Remote, State};
use sdn_proto::v1 as pb;

use crate::convert::ApiResource;

/// FNV-1a, 64 bits: a digest that is the same on every replica and release.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in bytes {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    h
}

/// A resource with its version: the SHA-256 of its encoding, whole. Agents
/// and the shares take an equal version for equal content, so two contents
/// must not share one: a digest nobody can collide. A tenant chooses names
/// and rule ids; with a 64-bit hash, or SHA-256 cut to 128 bits (a
/// collision in about 2^64 tries), it could make a permissive group and a
/// harmless one of equal version, put the first and then the second, and
/// the agents would go on enforcing the first while the controller and the
/// audit show the second.
pub fn resource(name: &str, kind: pb::resource::Kind) -> pb::Resource {
    use sha2::Digest as _;
    let mut r = pb::Resource {
        name: name.to_string(),
        version: String::new(),
        kind: Some(kind),
    };
    let digest = sha2::Sha256::digest(r.encode_to_vec());
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut version = String::with_capacity(2 * digest.len());
    for b in digest {
        version.push(HEX[usize::from(b >> 4)] as char);
        version.push(HEX[usize::from(b & 15)] as char);
    }
    r.version = version;
    r
}

/// Whether a resource's content is the same for every host that holds it
/// (a quarantine lists only the host's own ports).
pub fn shared_content(name: &str) -> bool {
    !name.starts_with(QUARANTINE)
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
    // The load balancers this host translates north-south flows for, with
    // their VPCs (where the members are, and the border firewall).
    let nat_lbs: Vec<&sdn_policies::LoadBalancer> = state
        .load_balancers
        .values()
        .filter(|l| l.nat_hosts.iter().any(|h| h.host_id == host))
        .collect();
    vpcs.extend(nat_lbs.iter().map(|l| l.vpc_id.as_str()));
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
    // The virtual IPs the host holds, or whose VIP it translates (it
    // translates them within a lease only), and those of the VPCs whose
    // network it holds (where the address's owner is; held by hosts, the
    // owner's host is where the holders' NAT addresses are answered).
    let local_or_nat: BTreeSet<&str> = local
        .iter()
        .copied()
        .chain(nat_lbs.iter().map(|l| l.vpc_id.as_str()))
        .collect();
    for v in state.virtual_ips.values() {
        let held_here = v
            .holders
            .iter()
            .any(|h| h.target == sdn_policies::VipHolderTarget::Host(host.to_string()))
            || (v.host_held()
                && nat_lbs
                    .iter()
                    .any(|l| l.vpc_id == v.vpc_id && l.vips().any(|a| v.addresses().any(|b| a == b))));
        // (Held by hosts: only the VPC's own hosts, not its peers', learn
        // its holders and owner.)
        let of_vpc = if v.host_held() { &local_or_nat } else { &vpcs };
        if held_here || of_vpc.contains(v.vpc_id.as_str()) {
            out.insert(format!("vip/{}", v.id));
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
    out.extend(state.mirror_sessions.keys().map(|m| format!("mirror/{m}")));
    out.extend(state.information_systems.keys().map(|m| format!("system/{m}")));
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
    // The load balancers of the host's own VPCs: it translates its ports'
    // flows to them.
    out.extend(
        state
            .load_balancers
            .values()
            .filter(|l| local.contains(l.vpc_id.as_str()))
            .chain(nat_lbs.iter().copied())
            .map(|l| format!("lb/{}", l.id)),
    );
    // Its ports that run an HTTP proxy: with their certificates' keys,
    // held by this host alone.
    out.extend(state.proxy_ports_on(host).map(|p| format!("proxy/{}", p.id)));
    quarantines_into(state, host, &local, &mut out);
    out
}

/// The names of the quarantines that hold a port of `host`: of all its
/// names, the only ones a batch of quarantines alone can change.
pub fn quarantine_names(state: &State, host: &str) -> BTreeSet<String> {
    let local: BTreeSet<&str> = state.index().vpcs_on(host).collect();
    let mut out = BTreeSet::new();
    quarantines_into(state, host, &local, &mut out);
    out
}

fn quarantines_into(state: &State, host: &str, local: &BTreeSet<&str>, out: &mut BTreeSet<String>) {
    let ix = state.index();
    for q in state.quarantines.values() {
        let here = match q.target {
            QuarantineTarget::Port => state.ports.get(&q.target_id).is_some_and(|p| p.host_id == host),
            QuarantineTarget::Vpc => local.contains(q.target_id.as_str()),
            QuarantineTarget::Vm => Index::of(&ix.ports_by_vm, &q.target_id).any(|p| state.ports[p].host_id == host),
        };
        if here {
            out.insert(format!("{QUARANTINE}{}", q.id));
        }
    }
}

/// The prefix of a quarantine's name, and the first string past every such
/// name (`'0'` follows `'/'`).
pub const QUARANTINE: &str = "quarantine/";
pub const PAST_QUARANTINES: &str = "quarantine0";

/// One resource of `host`'s share, by name; `None` when its object is gone.
pub fn build(state: &State, host: &str, name: &str) -> Option<pb::Resource> {
    use pb::resource::Kind as R;
    let (kind, id) = name.split_once('/')?;
    let ix = state.index();
    let k = match kind {
        "port" => R::Port(state.ports.get(id)?.to_pb()),
        "peering" => R::VpcPeering(state.peerings.get(id)?.to_pb()),
        "firewall" => R::FirewallPolicy(state.firewall_policies.get(id)?.to_pb()),
        "vpc" => R::VpcNetwork(vpc_network(state, id)?),
        "endpoint" => R::Endpoint(endpoint(state, state.ports.get(id)?)),
        "zone" => {
            // With every VPC subnet of the zone, which no packet from
            // outside may claim as its source.
            let mut zp = state.zones.get(id)?.to_pb();
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
        "exchange" => R::ExchangePath(state.exchange_paths.get(id)?.to_pb()),
        "mirror" => {
            let m = state.mirror_sessions.get(id)?;
            let tap = match &m.destination {
                sdn_policies::MirrorDestination::Tap { port_id, .. } => state.ports.get(port_id),
                _ => None,
            };
            R::MirrorSession(pb::MirrorOnHost {
                session: Some(m.to_pb()),
                tap_host: tap.map(|p| p.host_id.clone()).unwrap_or_default(),
                tap_underlay: tap
                    .and_then(|p| state.hosts.get(&p.host_id))
                    .map(|h| h.underlay_ip.to_string())
                    .unwrap_or_default(),
                tap_device: tap.map(|p| p.device.clone()).unwrap_or_default(),
                senders: if tap.is_some() {
                    state.hosts.values().map(|h| h.underlay_ip.to_string()).collect()
                } else {
                    vec![]
                },
            })
        }
        "system" => R::InformationSystem(state.information_systems.get(id)?.to_pb()),
        "lb" => R::LoadBalancer(lb_on_host(state, id)?),
        "proxy" => R::HttpProxy(proxy_on_host(state, host, id)?),
        "vip" => {
            let v = state.virtual_ips.get(id)?;
            let vpc = state.vpcs.get(&v.vpc_id)?;
            R::VirtualIp(pb::VirtualIpOnHost {
                virtual_ip: Some(v.to_pb()),
                vni: vpc.vni,
                uplink_device: state
                    .zones
                    .get(&vpc.zone_id)
                    .filter(|_| v.host_held())
                    .map(|z| z.uplink_device.clone())
                    .unwrap_or_default(),
            })
        }
        "sg" => R::SecurityGroup(state.security_groups.get(id)?.to_pb()),
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
                quarantine: Some(q.to_pb()),
                port_ids,
            })
        }
        _ => return None,
    };
    Some(resource(name, k))
}

/// A share in the form agents of earlier releases read (a watch with
/// protocol 0): each VPC's ports listed inside its `vpc/<id>` resource, no
/// `endpoint/*` resources. Built whole at each change: only for the time
/// an upgrade takes.
pub fn legacy_share(
    resources: &BTreeMap<crate::shares::Name, std::sync::Arc<pb::Resource>>,
) -> BTreeMap<crate::shares::Name, std::sync::Arc<pb::Resource>> {
    use pb::resource::Kind as R;
    let mut by_vpc: BTreeMap<&str, Vec<pb::Endpoint>> = BTreeMap::new();
    for r in resources.values() {
        if let Some(R::Endpoint(e)) = &r.kind {
            by_vpc.entry(&e.vpc_id).or_default().push(e.clone());
        }
    }
    resources
        .iter()
        .filter_map(|(n, r)| match &r.kind {
            // Nor HTTP proxies, which such agents do not run: their keys
            // stay home.
            Some(R::Endpoint(_)) | Some(R::HttpProxy(_)) => None,
            Some(R::VpcNetwork(v)) => {
                let mut v = v.clone();
                v.endpoints = by_vpc.get(v.vpc_id.as_str()).cloned().unwrap_or_default();
                Some((n.clone(), std::sync::Arc::new(resource(n, R::VpcNetwork(v)))))
            }
            _ => Some((n.clone(), r.clone())),
        })
        .collect()
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
        // Each port is a resource of its own.
        endpoints: vec![],
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

/// A member as a backend of a listener on `listener_port`.
fn backend(
    state: &State,
    lb: &sdn_policies::LoadBalancer,
    m: &sdn_policies::Member,
    listener_port: u16,
) -> pb::BackendOnHost {
    pb::BackendOnHost {
        member_id: m.id.clone(),
        addresses: state.member_addresses(m, lb).iter().map(|a| a.to_string()).collect(),
        port: u32::from(if m.port == 0 { listener_port } else { m.port }),
        weight: m.weight,
        state: m.state.name().into(),
        drain_until_unix_ms: match (m.state, m.draining_since_unix_ms) {
            (sdn_policies::MemberState::Draining, Some(t)) => {
                let drain = state.pools.get(&m.pool_id).map_or(0, |p| p.drain());
                t + u64::from(drain) * 1000
            }
            _ => 0,
        },
        port_id: match &m.target {
            sdn_policies::MemberTarget::Port(p) => p.clone(),
            sdn_policies::MemberTarget::Address(_) => String::new(),
        },
        // Only while a check stands behind it: a pool's check
        // removed, or a member moved to an address, leaves no
        // health that nobody can clear.
        down: m.health.as_ref().is_some_and(|h| !h.up)
            && matches!(m.target, sdn_policies::MemberTarget::Port(_))
            && state.pools.get(&m.pool_id).is_some_and(|p| p.health.is_some()),
    }
}

/// A load balancer with its listeners and their members resolved.
fn lb_on_host(state: &State, id: &str) -> Option<pb::LoadBalancerOnHost> {
    let lb = state.load_balancers.get(id)?;
    let vni = state.vpcs.get(&lb.vpc_id)?.vni;
    let listeners = state
        .listeners
        .values()
        .filter(|l| l.load_balancer_id == lb.id)
        .map(|l| pb::ListenerOnHost {
            listener: Some(l.to_pb()),
            backends: state
                .members
                .values()
                .filter(|m| m.pool_id == l.pool_id)
                .map(|m| backend(state, lb, m, l.port))
                .collect(),
            health: state.pools.get(&l.pool_id).and_then(|p| p.to_pb().health),
        })
        .collect::<Vec<_>>();
    // An HTTP listener reaches its proxy ports as an L4 listener would
    // members: by a consistent hash of each flow, so a proxy keeps its
    // flows while others come and go.
    let http = state
        .http_listeners
        .values()
        .filter(|l| l.load_balancer_id == lb.id)
        .map(|l| pb::ListenerOnHost {
            listener: Some(pb::Listener {
                id: format!("http-listener/{}", l.id),
                load_balancer_id: lb.id.clone(),
                protocol: "tcp".into(),
                port: l.port.into(),
                pool_id: String::new(),
                scheduler: sdn_policies::Scheduler::Maglev.name().into(),
                persistence_secs: 0,
            }),
            backends: l
                .proxy_ports
                .iter()
                .filter_map(|p| state.ports.get(p))
                .map(|p| pb::BackendOnHost {
                    member_id: format!("proxy/{}", p.id),
                    addresses: p
                        .addresses()
                        .filter(|a| {
                            if a.is_ipv4() {
                                lb.vip_v4.is_some()
                            } else {
                                lb.vip_v6.is_some()
                            }
                        })
                        .map(|a| a.to_string())
                        .collect(),
                    port: l.port.into(),
                    weight: 1,
                    state: sdn_policies::MemberState::Enabled.name().into(),
                    drain_until_unix_ms: 0,
                    // So a quarantined proxy port takes no new flow.
                    port_id: p.id.clone(),
                    down: false,
                })
                .collect(),
            health: None,
        });
    let listeners = listeners.into_iter().chain(http).collect();
    let nat_underlays = lb
        .nat_hosts
        .iter()
        .filter_map(|h| {
            let host = state.hosts.get(&h.host_id)?;
            Some((h.host_id.clone(), host.underlay_ip.to_string()))
        })
        .collect();
    Some(pb::LoadBalancerOnHost {
        load_balancer: Some(lb.to_pb()),
        vni,
        listeners,
        nat_underlays,
    })
}

/// A port of `host` that runs an HTTP proxy, with the listeners it serves,
/// their certificates (keys included) and their pools' members.
fn proxy_on_host(state: &State, host: &str, port_id: &str) -> Option<pb::HttpProxyOnHost> {
    let port = state.ports.get(port_id).filter(|p| p.host_id == host)?;
    let subnet = state.subnets.get(&port.subnet_id)?;
    let listeners: Vec<pb::HttpListenerOnHost> = state
        .http_listeners
        .values()
        .filter(|l| l.proxy_ports.iter().any(|p| p == port_id))
        .filter_map(|l| {
            let lb = state.load_balancers.get(&l.load_balancer_id)?;
            Some(pb::HttpListenerOnHost {
                listener: Some(l.to_pb()),
                certificates: l
                    .certificate_ids
                    .iter()
                    .filter_map(|c| state.certificates.get(c))
                    .map(sdn_policies::convert::certificate_with_key)
                    .collect(),
                pools: l
                    .pools()
                    .into_iter()
                    .filter_map(|p| state.pools.get(p))
                    .map(|p| pb::HttpPoolOnHost {
                        pool: Some(p.to_pb()),
                        backends: state
                            .members
                            .values()
                            .filter(|m| m.pool_id == p.id)
                            .map(|m| backend(state, lb, m, l.port))
                            .collect(),
                    })
                    .collect(),
            })
        })
        .collect();
    if listeners.is_empty() {
        return None;
    }
    Some(pb::HttpProxyOnHost {
        port: Some(port.to_pb()),
        gateway_v4: sdn_policies::convert::text_of(subnet.gateway_v4()),
        gateway_v6: sdn_policies::convert::text_of(subnet.gateway_v6()),
        prefix_v4: subnet.cidr_v4.map_or(0, |n| n.prefix().into()),
        prefix_v6: subnet.cidr_v6.map_or(0, |n| n.prefix().into()),
        listeners,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use sdn_policies::*;

    /// The example cloud with its HTTPS front.
    fn front() -> State {
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/examples");
        let mut s = State::default();
        for f in ["gov-cloud", "http-listeners.yaml"] {
            let ops: Vec<Op> =
                manifest::dependency_order(manifest::load_path(&std::path::Path::new(root).join(f)).unwrap())
                    .into_iter()
                    .map(|l| l.op)
                    .collect();
            s.apply_batch(&ops).unwrap();
        }
        s
    }

    /// A proxy port's resource, keys and all, is its own host's alone;
    /// every host of the VPC reaches the proxies through the load
    /// balancer's VIP.
    #[test]
    fn a_proxy_is_its_hosts_alone_and_reached_through_the_vip() {
        let s = front();
        let on1 = names(&s, "hv-01");
        assert!(
            on1.contains("proxy/portal-proxy-1") && !on1.contains("proxy/portal-proxy-2"),
            "{on1:?}"
        );
        assert!(
            build(&s, "hv-02", "proxy/portal-proxy-1").is_none(),
            "another host's proxy is not built"
        );
        let Some(pb::resource::Kind::HttpProxy(p)) = build(&s, "hv-01", "proxy/portal-proxy-1").unwrap().kind else {
            panic!("not a proxy")
        };
        assert_eq!(p.gateway_v4, "10.30.0.1");
        assert_eq!(p.prefix_v4, 24);
        let https = p
            .listeners
            .iter()
            .find(|l| l.listener.as_ref().unwrap().id == "portal-web-https")
            .unwrap();
        assert!(https.certificates[0].key_pem.contains("PRIVATE KEY"));
        let members: Vec<&str> = https.pools[0]
            .backends
            .iter()
            .map(|b| b.addresses[0].as_str())
            .collect();
        assert_eq!(members, ["10.30.0.11", "10.30.0.12"]);
        assert_eq!(https.pools[0].backends[0].port, 8080);
        // A listing gives no key.
        let listed = convert::list_to_pb(&s, None, 1);
        assert!(listed.certificates[0].key_pem.is_empty() && !listed.certificates[0].cert_pem.is_empty());
        // The load balancer, on every host of the VPC: an L4 listener per
        // HTTP listener, to the proxy ports.
        let Some(pb::resource::Kind::LoadBalancer(lb)) = build(&s, "hv-02", "lb/portal-l7").unwrap().kind else {
            panic!("not a load balancer")
        };
        let l = lb
            .listeners
            .iter()
            .find(|l| l.listener.as_ref().unwrap().id == "http-listener/portal-web-https")
            .unwrap();
        assert_eq!(l.listener.as_ref().unwrap().port, 443);
        let backends: Vec<(&str, u32)> = l.backends.iter().map(|b| (b.addresses[0].as_str(), b.port)).collect();
        assert_eq!(backends, [("10.30.0.21", 443), ("10.30.0.22", 443)]);
    }

    /// Agents of earlier releases get each VPC's ports inside its resource,
    /// and no endpoint resources; a port's change changes the VPC's version.
    #[test]
    fn the_earlier_form_lists_ports_inside_their_vpc() {
        let port = |id: &str, host: &str, last: u8| {
            Op::PutPort(Port {
                id: id.into(),
                tenant_id: "t".into(),
                subnet_id: "s".into(),
                host_id: host.into(),
                device: format!("tap-{id}"),
                mac: Mac([2, 0, 0, 0, 0, last]),
                ipv4: Some(format!("10.1.0.{last}").parse().unwrap()),
                ipv6: None,
                security_group_ids: vec![],
                vm_id: String::new(),
            })
        };
        let mut state = State::default();
        state
            .apply(&[
                Op::PutTenant(Tenant {
                    id: "t".into(),
                    name: "t".into(),
                }),
                Op::PutHost(Host {
                    id: "h1".into(),
                    underlay_ip: "192.0.2.1".parse().unwrap(),
                }),
                Op::PutHost(Host {
                    id: "h2".into(),
                    underlay_ip: "192.0.2.2".parse().unwrap(),
                }),
                Op::PutVpc(Vpc {
                    id: "v".into(),
                    tenant_id: "t".into(),
                    name: "v".into(),
                    vni: 100,
                    zone_id: String::new(),
                    border_policy_id: String::new(),
                }),
                Op::PutSubnet(Subnet {
                    id: "s".into(),
                    vpc_id: "v".into(),
                    cidr_v4: Some("10.1.0.0/24".parse().unwrap()),
                    cidr_v6: None,
                }),
                port("a", "h1", 5),
                port("b", "h2", 6),
            ])
            .unwrap();
        let share = |state: &State| -> BTreeMap<crate::shares::Name, std::sync::Arc<pb::Resource>> {
            host_slice(state, "h2")
                .into_iter()
                .map(|(n, r)| (n.into(), std::sync::Arc::new(r)))
                .collect()
        };
        let new = share(&state);
        assert!(
            new.contains_key("endpoint/a") && new.contains_key("endpoint/b"),
            "{new:?}"
        );
        let old = legacy_share(&new);
        assert!(!old.keys().any(|n| n.starts_with("endpoint/")), "{old:?}");
        let Some(pb::resource::Kind::VpcNetwork(v)) = &old["vpc/v"].kind else {
            panic!()
        };
        let ports: Vec<(&str, &str)> = v
            .endpoints
            .iter()
            .map(|e| (e.port_id.as_str(), e.host_underlay_ip.as_str()))
            .collect();
        assert_eq!(ports, [("a", "192.0.2.1"), ("b", "192.0.2.2")]);
        let version = old["vpc/v"].version.clone();
        state.apply(&[port("a", "h1", 7)]).unwrap();
        assert_ne!(legacy_share(&share(&state))["vpc/v"].version, version);
    }
}
