//! Zones and exchange paths: address spaces, uplinks, the crossings.

use super::*;

/// Zones: numbers (1.., in id order), address spaces, uplinks; exchange
/// paths in id order. Returns the zone numbers by id.
pub(super) fn compile_zones<'a>(
    zones: &BTreeMap<&'a str, &pb::Zone>,
    exchanges: &[&pb::ExchangePath],
    ifindex: &dyn Fn(&str) -> Option<u32>,
    d: &mut Desired,
) -> Result<BTreeMap<&'a str, u32>, CompileError> {
    let mut no = BTreeMap::new();
    for (i, (id, z)) in zones.iter().enumerate() {
        let n = i as u32 + 1;
        let mut nets = Vec::new();
        for p in &z.prefixes {
            match p.parse::<ipnetwork::IpNetwork>() {
                Ok(net) => nets.push(net),
                Err(_) => {
                    d.rejected.push(format!("zone {id}: invalid prefix {p:?}"));
                    break;
                }
            }
        }
        if nets.len() != z.prefixes.len() {
            continue;
        }
        no.insert(*id, n);
        for c in &z.vpc_subnets {
            match c.parse::<ipnetwork::IpNetwork>() {
                Ok(net) => {
                    let (family, a) = addr16(net.network());
                    d.vpc_nets
                        .insert((8 + net.prefix() as u32, zone_net_data(family, &a)), n);
                }
                Err(_) => d.rejected.push(format!("zone {id}: invalid VPC subnet {c:?}")),
            }
        }
        for net in nets {
            let (family, a) = addr16(net.network());
            d.zone_nets
                .insert((8 + net.prefix() as u32, zone_net_data(family, &a)), n);
        }
        match ifindex(&z.uplink_device) {
            Some(ifx) => {
                d.uplinks.insert(ifx, n);
                d.zone_uplink.insert(n, ifx);
                d.uplink_devices.insert(ifx, z.uplink_device.clone());
            }
            None => d.missing_uplinks.push((id.to_string(), z.uplink_device.clone())),
        }
    }
    let mut sorted: Vec<&&pb::ExchangePath> = exchanges.iter().collect();
    sorted.sort_by(|a, b| a.id.cmp(&b.id));
    let mut slot = 0u32;
    for x in sorted {
        match exchange_rule(x, &no) {
            Ok(r) => {
                d.exchange.insert(slot, r);
                slot += 1;
            }
            Err(e) => d.rejected.push(e.to_string()),
        }
    }
    Ok(no)
}

/// One exchange path, compiled.
fn exchange_rule(x: &pb::ExchangePath, no: &BTreeMap<&str, u32>) -> Result<ExchangeRule, CompileError> {
    let xerr = |message: String| CompileError::Zone {
        what: format!("exchange path {}", x.id),
        message,
    };
    let (Some(from), Some(to)) = (no.get(x.from_zone.as_str()), no.get(x.to_zone.as_str())) else {
        return Err(xerr("a zone it names is missing from the share".into()));
    };
    let src: ipnetwork::IpNetwork = x.source_cidr.parse().map_err(|_| xerr("invalid source".into()))?;
    let dst: ipnetwork::IpNetwork = x
        .destination_cidr
        .parse()
        .map_err(|_| xerr("invalid destination".into()))?;
    let (family, s) = addr16(src.network());
    let (_, t) = addr16(dst.network());
    let proto = match pb::Protocol::try_from(x.protocol) {
        Ok(pb::Protocol::Tcp) => 6,
        Ok(pb::Protocol::Udp) => 17,
        Ok(pb::Protocol::Icmp) => 1,
        Ok(pb::Protocol::Icmpv6) => 58,
        _ => return Err(xerr(format!("protocol {} cannot cross zones", x.protocol))),
    };
    Ok(ExchangeRule {
        from: *from,
        to: *to,
        family,
        proto,
        src_plen: src.prefix(),
        dst_plen: dst.prefix(),
        port_lo: x.port_min as u16,
        port_hi: x.port_max as u16,
        src: s,
        dst: t,
    })
}
