//! Information systems: which of this host's ports each system's traffic
//! with the zones is counted for.
//!
//! A system with ports here takes a slot (kept from pass to pass, like a
//! mirror session's); a host counts at most [`SYSTEM_SLOTS`] systems. A
//! system beyond them is rejected by name (the host NACKs) and counted
//! nowhere here; the rest of the share is enforced.

use std::collections::BTreeMap;

use dataplane_common::maps::SYSTEM_SLOTS;
use sdn_proto::v1 as pb;

use super::mirror::LocalPort;

/// One system as this host counts it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemSlot {
    pub id: String,
    /// The zones its bandwidth is given for: zone number -> zone id.
    pub zones: BTreeMap<u32, String>,
}

/// Everything the count of systems' traffic needs on this host.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemPlan {
    /// Port device (ifindex) -> slot.
    pub ports: BTreeMap<u32, u32>,
    pub slots: BTreeMap<u32, SystemSlot>,
}

/// Plans the systems of the share for this host's ports: a port listed by
/// id, or of a VPC listed whole. `zone_no`: the zones' numbers.
pub fn compile_systems(
    systems: &[&pb::InformationSystem],
    ports: &[LocalPort],
    zone_no: &BTreeMap<&str, u32>,
    ifindex: &dyn Fn(&str) -> Option<u32>,
    slots: &mut BTreeMap<String, u32>,
    rejected: &mut Vec<String>,
) -> SystemPlan {
    let mut plan = SystemPlan::default();
    let mut members: BTreeMap<&str, Vec<u32>> = BTreeMap::new();
    for s in systems {
        let mine: Vec<u32> = ports
            .iter()
            .filter(|p| s.port_ids.contains(&p.port.id) || s.vpc_ids.iter().any(|v| v == p.vpc))
            .filter_map(|p| ifindex(&p.port.device))
            .collect();
        if !mine.is_empty() {
            members.insert(&s.id, mine);
        }
    }
    let ids: Vec<&str> = members.keys().copied().collect();
    super::keep_slots(&ids, SYSTEM_SLOTS, slots);
    for s in systems {
        let Some(ifxs) = members.get(s.id.as_str()) else {
            continue;
        };
        let Some(slot) = slots.get(&s.id).copied() else {
            rejected.push(format!(
                "information system {}: a host counts at most {SYSTEM_SLOTS} systems",
                s.id
            ));
            continue;
        };
        let zones = s
            .bandwidth
            .iter()
            .filter_map(|b| Some((*zone_no.get(b.zone_id.as_str())?, b.zone_id.clone())))
            .collect();
        for ifx in ifxs {
            plan.ports.insert(*ifx, slot);
        }
        plan.slots.insert(
            slot,
            SystemSlot {
                id: s.id.clone(),
                zones,
            },
        );
    }
    plan
}
