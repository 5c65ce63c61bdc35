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

/// A VPC's gateways. An error leaves the whole VPC out.
pub(super) fn compile_gateways(
    n: &pb::VpcNetwork,
    out: &mut BTreeMap<EndpointKey, Endpoint>,
) -> Result<(), CompileError> {
    let verr = |message: String| CompileError::Vpc {
        vpc: n.vpc_id.clone(),
        message,
    };
    if n.vni == 0 {
        return Err(verr("no VNI".into()));
    }
    for g in &n.gateways {
        let gw = Endpoint {
            ifindex: 0,
            host_v4: [0; 4],
            mac: GATEWAY_MAC,
            flags: EP_F_GATEWAY,
            vni: n.vni,
            policy: 0,
        };
        for a in [&g.gateway_v4, &g.gateway_v6] {
            if let Some(k) = endpoint_key(n.vni, a).map_err(verr)? {
                out.insert(k, gw);
            }
        }
    }
    Ok(())
}

/// The key of an address of a VPC; `None` for no address.
fn endpoint_key(vni: u32, addr: &str) -> Result<Option<EndpointKey>, String> {
    if addr.is_empty() {
        return Ok(None);
    }
    let ip: IpAddr = addr.parse().map_err(|_| format!("invalid address {addr:?}"))?;
    let (family, addr) = addr16(ip);
    Ok(Some(EndpointKey {
        vni,
        family,
        _pad: [0; 3],
        addr,
    }))
}

/// What one port of a VPC compiles to: an entry per address, and what
/// could not be compiled. An endpoint that cannot be compiled is left out
/// (nothing routes to it: fail closed); the rest of the VPC stands.
/// `local` is `None` for a port elsewhere, else its device's ifindex here
/// (`Some(None)`: the device is missing, so the port gets no route yet).
#[derive(Clone, Debug, Default, PartialEq)]
pub(super) struct EndpointPart {
    pub entries: Vec<(EndpointKey, Endpoint)>,
    pub rejected: Vec<String>,
}

pub(super) fn compile_endpoint(n: &pb::VpcNetwork, e: &pb::Endpoint, local: Option<Option<u32>>) -> EndpointPart {
    let mut part = EndpointPart::default();
    let verr = |message: String| {
        CompileError::Vpc {
            vpc: n.vpc_id.clone(),
            message,
        }
        .to_string()
    };
    let ep = match endpoint_of(n, e, local) {
        Ok(Some(ep)) => ep,
        Ok(None) => return part,
        Err(err) => {
            part.rejected.push(err.to_string());
            return part;
        }
    };
    for a in [&e.ipv4, &e.ipv6] {
        match endpoint_key(n.vni, a) {
            Ok(Some(k)) => part.entries.push((k, ep)),
            Ok(None) => {}
            Err(m) => part.rejected.push(verr(m)),
        }
    }
    part
}

/// Where one endpoint of a VPC lives; `None` for a port of this host whose
/// device is not here yet.
fn endpoint_of(
    n: &pb::VpcNetwork,
    e: &pb::Endpoint,
    local: Option<Option<u32>>,
) -> Result<Option<Endpoint>, CompileError> {
    let verr = |message: String| CompileError::Vpc {
        vpc: n.vpc_id.clone(),
        message,
    };
    let mac = parse_mac(&e.mac).ok_or_else(|| verr(format!("port {}: invalid MAC {:?}", e.port_id, e.mac)))?;
    let ifx = match local {
        Some(Some(i)) => i,
        Some(None) => return Ok(None),
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
