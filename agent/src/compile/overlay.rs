//! The overlay: each VPC's endpoints (gateways, ports here and elsewhere)
//! and the peerings that join VPCs.

use super::*;

/// The ports of one VPC among the endpoints (not its gateways, not its
/// peers'): a range of the map, which is ordered by VNI first.
pub(super) fn ports_of_vni(
    eps: &BTreeMap<EndpointKey, Endpoint>,
    vni: u32,
) -> impl Iterator<Item = (&EndpointKey, &Endpoint)> {
    let at = |vni: u32| EndpointKey {
        vni,
        family: 0,
        _pad: [0; 3],
        addr: [0; 16],
    };
    let range = if vni == u32::MAX {
        eps.range(at(vni)..)
    } else {
        eps.range(at(vni)..at(vni + 1))
    };
    range.filter(|(_, e)| e.flags & (EP_F_GATEWAY | EP_F_PEER) == 0)
}

/// Peerings: each side's ports are also endpoints of the other side's VNI,
/// flagged as peers with their own VNI and the VPC firewall between them.
pub(super) fn compile_peerings(
    peerings: &[&pb::VpcPeering],
    networks: &[&pb::VpcNetwork],
    fw_no: &BTreeMap<&str, u32>,
    out: &mut BTreeMap<EndpointKey, Endpoint>,
    rejected: &mut Vec<String>,
) {
    let vni_of = |vpc: &str| networks.iter().find(|n| n.vpc_id == vpc).map(|n| n.vni);
    for p in peerings {
        // A peering that cannot be compiled is not joined (fail closed).
        let (Some(a), Some(b)) = (vni_of(&p.vpc_a), vni_of(&p.vpc_b)) else {
            rejected.push(format!(
                "vpc peering {}: a VPC it joins is missing from the share",
                p.id
            ));
            continue;
        };
        let policy = if p.policy_id.is_empty() {
            0
        } else {
            match fw_no.get(p.policy_id.as_str()) {
                Some(n) => *n,
                None => {
                    rejected.push(format!(
                        "vpc peering {}: firewall policy {} is missing from the share or cannot be compiled",
                        p.id, p.policy_id
                    ));
                    continue;
                }
            }
        };
        let own =
            |vni: u32| -> Vec<(EndpointKey, Endpoint)> { ports_of_vni(out, vni).map(|(k, e)| (*k, *e)).collect() };
        let (of_a, of_b) = (own(a), own(b));
        for (key_vni, entries, flags) in [(a, of_b, EP_F_PEER | EP_F_LOCAL_IS_A), (b, of_a, EP_F_PEER)] {
            for (k, e) in entries {
                // A peer's port on this host keeps its device: the pipeline
                // delivers to it directly, with the VPC firewall applied
                // on the way, as the receiving host does for one elsewhere.
                out.insert(EndpointKey { vni: key_vni, ..k }, Endpoint { flags, policy, ..e });
            }
        }
    }
}

/// The endpoints of one VPC: its gateways, its ports here (by device) and
/// its ports elsewhere (by host).
pub(super) fn compile_network(
    n: &pb::VpcNetwork,
    local: &BTreeMap<&str, &pb::Port>,
    ifindex: &dyn Fn(&str) -> Option<u32>,
    out: &mut BTreeMap<EndpointKey, Endpoint>,
    rejected: &mut Vec<String>,
) -> Result<(), CompileError> {
    let verr = |message: String| CompileError::Vpc {
        vpc: n.vpc_id.clone(),
        message,
    };
    if n.vni == 0 {
        return Err(verr("no VNI".into()));
    }
    let mut put = |addr: &str, ep: Endpoint| -> Result<(), CompileError> {
        if addr.is_empty() {
            return Ok(());
        }
        let ip: IpAddr = addr.parse().map_err(|_| verr(format!("invalid address {addr:?}")))?;
        let (family, addr) = addr16(ip);
        out.insert(
            EndpointKey {
                vni: n.vni,
                family,
                _pad: [0; 3],
                addr,
            },
            ep,
        );
        Ok(())
    };
    for g in &n.gateways {
        let gw = Endpoint {
            ifindex: 0,
            host_v4: [0; 4],
            mac: GATEWAY_MAC,
            flags: EP_F_GATEWAY,
            vni: n.vni,
            policy: 0,
        };
        put(&g.gateway_v4, gw)?;
        put(&g.gateway_v6, gw)?;
    }
    for e in &n.endpoints {
        // An endpoint that cannot be compiled is left out (nothing routes
        // to it: fail closed); the rest of the VPC stands.
        match endpoint_of(n, e, local, ifindex) {
            Ok(Some(ep)) => {
                for a in [&e.ipv4, &e.ipv6] {
                    if let Err(err) = put(a, ep) {
                        rejected.push(err.to_string());
                    }
                }
            }
            Ok(None) => {}
            Err(err) => rejected.push(err.to_string()),
        }
    }
    Ok(())
}

/// Where one endpoint of a VPC lives; `None` for a port of this host whose
/// device is not here yet.
fn endpoint_of(
    n: &pb::VpcNetwork,
    e: &pb::Endpoint,
    local: &BTreeMap<&str, &pb::Port>,
    ifindex: &dyn Fn(&str) -> Option<u32>,
) -> Result<Option<Endpoint>, CompileError> {
    let verr = |message: String| CompileError::Vpc {
        vpc: n.vpc_id.clone(),
        message,
    };
    let mac = parse_mac(&e.mac).ok_or_else(|| verr(format!("port {}: invalid MAC {:?}", e.port_id, e.mac)))?;
    let ifx = match local.get(e.port_id.as_str()) {
        // A port here whose device is missing gets no route yet.
        Some(p) => match ifindex(&p.device) {
            Some(i) => i,
            None => return Ok(None),
        },
        None => 0,
    };
    let host_v4 = match e.host_underlay_ip.parse::<IpAddr>() {
        Ok(IpAddr::V4(a)) => a.octets(),
        Ok(IpAddr::V6(a)) => {
            return Err(verr(format!(
                "port {}: host {} has an IPv6 underlay address {a}; the overlay runs over IPv4 underlays only",
                e.port_id, e.host_id
            )))
        }
        Err(_) if ifx != 0 => [0; 4],
        Err(_) => {
            return Err(verr(format!(
                "port {}: host {} has no usable underlay address {:?}",
                e.port_id, e.host_id, e.host_underlay_ip
            )))
        }
    };
    Ok(Some(Endpoint {
        ifindex: ifx,
        host_v4,
        mac,
        flags: 0,
        vni: n.vni,
        policy: 0,
    }))
}
