//! Firewall policies (border and VPC firewalls): numbered policies and
//! their ordered rules, packed in the rule table.

use super::*;

pub(super) fn rule_name(s: &str) -> dataplane_common::maps::RuleName {
    let mut n = [0u8; 136];
    let b = s.as_bytes();
    n[..b.len().min(136)].copy_from_slice(&b[..b.len().min(136)]);
    n
}

/// The stable number of a firewall rule (or a policy's default), as
/// recorded with each verdict.
pub fn fw_rule_id(policy: &str, rule: &str) -> u32 {
    fnv32(format!("{policy}/{rule}").as_bytes()).max(1)
}

/// Firewall policies: numbers (1.., in id order), each with its rules in
/// priority order in consecutive slots (each policy after the previous).
pub(super) fn compile_firewalls<'a>(
    firewalls: &BTreeMap<&'a str, &pb::FirewallPolicy>,
    d: &mut Desired,
) -> Result<BTreeMap<&'a str, u32>, CompileError> {
    let mut no = BTreeMap::new();
    // Rules are packed: each policy's from the slot after the previous
    // policy's last, so the rule table holds as many rules as the
    // controller allows a host.
    let mut next_slot = 0u32;
    let mut n = 0u32;
    for (id, f) in firewalls.iter() {
        let mut part = Desired::default();
        if let Err(e) = compile_firewall(id, f, n + 1, next_slot, &mut part) {
            // Its VPCs' borders and peerings fail closed.
            d.rejected.push(e.to_string());
            continue;
        }
        n += 1;
        no.insert(*id, n);
        next_slot += f.rules.len() as u32;
        d.fw_rules.extend(part.fw_rules);
        d.fw_policies.extend(part.fw_policies);
        d.fw_names.extend(part.fw_names);
    }
    Ok(no)
}

/// One firewall policy, as number `n`, its rules from slot `first`.
fn compile_firewall(id: &str, f: &pb::FirewallPolicy, n: u32, first: u32, d: &mut Desired) -> Result<(), CompileError> {
    {
        let ferr = |message: String| CompileError::Zone {
            what: format!("firewall policy {id}"),
            message,
        };
        let action = |a: i32| match pb::Action::try_from(a) {
            Ok(pb::Action::Allow) => Ok(FW_ALLOW),
            Ok(pb::Action::Deny) => Ok(FW_DENY),
            _ => Err(ferr(format!("unknown action {a}"))),
        };
        if f.rules.len() > FW_POLICY_RULES_MAX as usize {
            return Err(ferr(format!("{} rules; at most {FW_POLICY_RULES_MAX}", f.rules.len())));
        }
        let mut rules: Vec<&pb::FirewallRule> = f.rules.iter().collect();
        rules.sort_by_key(|r| (r.priority, r.id.clone()));
        let default_rule_id = fw_rule_id(id, "default");
        d.fw_names.insert(default_rule_id, rule_name(&format!("{id}/default")));
        for (j, r) in rules.iter().enumerate() {
            let family = match pb::EtherType::try_from(r.ether_type) {
                Ok(pb::EtherType::Ipv4) => FAMILY_V4,
                Ok(pb::EtherType::Ipv6) => FAMILY_V6,
                _ => return Err(ferr(format!("rule {}: unknown ether type", r.id))),
            };
            let proto =
                super::protocol_number(r.protocol).ok_or_else(|| ferr(format!("rule {}: unknown protocol", r.id)))?;
            let dir = match pb::Direction::try_from(r.direction) {
                Ok(pb::Direction::Ingress) => DIR_INGRESS,
                Ok(pb::Direction::Egress) => DIR_EGRESS,
                _ => return Err(ferr(format!("rule {}: unknown direction", r.id))),
            };
            let (plen, addr) = if r.remote_cidr.is_empty() {
                (0, [0u8; 16])
            } else {
                let net: ipnetwork::IpNetwork = r
                    .remote_cidr
                    .parse()
                    .map_err(|_| ferr(format!("rule {}: invalid remote_cidr", r.id)))?;
                (net.prefix(), addr16(net.network()).1)
            };
            let (port_lo, port_hi) = if r.port_min == 0 && r.port_max == 0 {
                (0, u16::MAX)
            } else {
                (r.port_min as u16, r.port_max as u16)
            };
            let rule_id = fw_rule_id(id, &r.id);
            d.fw_names.insert(rule_id, rule_name(&format!("{id}/{}", r.id)));
            d.fw_rules.insert(
                first + j as u32,
                FwRule {
                    rule_id,
                    action: action(r.action)?,
                    dir,
                    family,
                    proto,
                    port_lo,
                    port_hi,
                    plen,
                    _pad: [0; 3],
                    addr,
                },
            );
        }
        d.fw_policies.insert(
            n,
            FwPolicy {
                first,
                count: rules.len() as u32,
                default_rule_id,
                default_action: action(f.default_action)?,
                _pad: [0; 3],
            },
        );
    }
    Ok(())
}
