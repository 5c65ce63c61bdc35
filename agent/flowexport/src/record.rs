//! The flow record an agent exports: IANA's elements for the flow, and the
//! cloud's context (tenant, VPC, zone, the rule that decided, the verdict)
//! as enterprise elements under the deployment's private enterprise number.

use std::net::IpAddr;

use crate::ipfix::{EncodeError, Field, Message, Template, Value, VARLEN};

/// The private enterprise number used when the deployment gives none:
/// 32473, which RFC 5612 sets aside for documentation. A deployment that
/// exports to a regulator sets its own (`--ipfix-pen`).
pub const PEN_DEFAULT: u32 = 32473;

/// The template of records of IPv4 flows.
pub const TEMPLATE_V4: u16 = 256;
/// The template of records of IPv6 flows.
pub const TEMPLATE_V6: u16 = 257;
/// The templates of records of load-balanced flows (the flow's elements,
/// then the service's).
pub const TEMPLATE_LB_V4: u16 = 262;
pub const TEMPLATE_LB_V6: u16 = 263;

/// The enterprise elements, by id under the deployment's PEN.
pub mod enterprise {
    /// The tenant the flow's port belongs to (string).
    pub const TENANT: u16 = 1;
    /// Its VPC (string).
    pub const VPC: u16 = 2;
    /// The zone the flow crosses into or comes from, if any (string).
    pub const ZONE: u16 = 3;
    /// The rule that decided: a security group's rule, a firewall's rule,
    /// an exchange path (string, `KIND/ID[/RULE]`).
    pub const RULE: u16 = 4;
    /// The verdict: 1 allowed, 2 denied (unsigned8).
    pub const VERDICT: u16 = 5;
    /// The port (string).
    pub const PORT: u16 = 6;
    /// A load-balanced flow's service: `LOAD_BALANCER/LISTENER` (string).
    pub const LB_SERVICE: u16 = 40;
    /// The address and port its client asked: the VIP's (string,
    /// `ADDR:PORT`, `[ADDR6]:PORT`).
    pub const LB_VIP: u16 = 41;
    /// The member the flow went to (string).
    pub const LB_MEMBER: u16 = 42;
}

/// A load-balanced flow's service and member. The flow's own addresses are
/// its client's and its member's, as the flow table holds them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LbRecord {
    pub service: String,
    pub vip: String,
    pub member: String,
}

/// Why a flow's record was sent (flowEndReason, IANA element 136).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndReason {
    IdleTimeout = 1,
    ActiveTimeout = 2,
    /// FIN or RST seen.
    EndOfFlow = 3,
    ForcedEnd = 4,
    LackOfResources = 5,
}

/// firewallEvent (IANA element 233).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FirewallEvent {
    Created = 1,
    Deleted = 2,
    Denied = 3,
    Alert = 4,
    Update = 5,
}

/// flowDirection (IANA element 61), seen from the port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    Ingress = 0,
    Egress = 1,
}

/// The verdict of the pipeline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allowed = 1,
    Denied = 2,
}

/// One flow, as an agent reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowRecord {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub src_port: u16,
    pub dst_port: u16,
    pub protocol: u8,
    /// Since the flow's last record (deltas).
    pub octets: u64,
    pub packets: u64,
    /// Unix milliseconds.
    pub start_ms: u64,
    pub end_ms: u64,
    pub end_reason: EndReason,
    pub firewall_event: FirewallEvent,
    pub direction: Direction,
    /// The VXLAN segment of the flow's VPC, if it has one.
    pub vni: Option<u32>,
    pub tenant: String,
    pub vpc: String,
    pub zone: String,
    pub rule: String,
    pub verdict: Verdict,
    pub port: String,
    /// A load-balanced flow's service and member.
    pub lb: Option<LbRecord>,
}

/// The templates under `pen`: IPv4 and IPv6, then the same for
/// load-balanced flows.
pub fn templates(pen: u32) -> [Template; 4] {
    let t = |id: u16, addr_ids: (u16, u16), addr_len: u16| Template {
        id,
        fields: vec![
            Field::iana(addr_ids.0, addr_len),
            Field::iana(addr_ids.1, addr_len),
            Field::iana(7, 2),   // sourceTransportPort
            Field::iana(11, 2),  // destinationTransportPort
            Field::iana(4, 1),   // protocolIdentifier
            Field::iana(1, 8),   // octetDeltaCount
            Field::iana(2, 8),   // packetDeltaCount
            Field::iana(152, 8), // flowStartMilliseconds
            Field::iana(153, 8), // flowEndMilliseconds
            Field::iana(136, 1), // flowEndReason
            Field::iana(233, 1), // firewallEvent
            Field::iana(61, 1),  // flowDirection
            Field::iana(351, 8), // layer2SegmentId
            Field::enterprise(pen, enterprise::TENANT, VARLEN),
            Field::enterprise(pen, enterprise::VPC, VARLEN),
            Field::enterprise(pen, enterprise::ZONE, VARLEN),
            Field::enterprise(pen, enterprise::RULE, VARLEN),
            Field::enterprise(pen, enterprise::VERDICT, 1),
            Field::enterprise(pen, enterprise::PORT, VARLEN),
        ],
    };
    let lb = |id: u16, addr_ids: (u16, u16), addr_len: u16| {
        let mut x = t(id, addr_ids, addr_len);
        x.fields.extend([
            Field::enterprise(pen, enterprise::LB_SERVICE, VARLEN),
            Field::enterprise(pen, enterprise::LB_VIP, VARLEN),
            Field::enterprise(pen, enterprise::LB_MEMBER, VARLEN),
        ]);
        x
    };
    [
        t(TEMPLATE_V4, (8, 12), 4),
        t(TEMPLATE_V6, (27, 28), 16),
        lb(TEMPLATE_LB_V4, (8, 12), 4),
        lb(TEMPLATE_LB_V6, (27, 28), 16),
    ]
}

/// layer2SegmentId of a VXLAN segment: the type (1, VXLAN) in the top
/// byte, the VNI in the low three (RFC 7133).
pub fn vxlan_segment(vni: u32) -> u64 {
    (1u64 << 56) | u64::from(vni & 0x00ff_ffff)
}

/// Why a flow cannot be a record.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("a flow from {0} to {1}: the addresses are of two families")]
    Families(IpAddr, IpAddr),
    #[error(transparent)]
    Encode(#[from] EncodeError),
}

impl FlowRecord {
    /// Puts the record into `m` with the template of its family
    /// (`templates` from [`templates`]): `Ok(false)` when `m` is full.
    pub fn add_to(&self, m: &mut Message, templates: &[Template; 4]) -> Result<bool, RecordError> {
        let lb = usize::from(self.lb.is_some()) * 2;
        let (src, dst, t) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => (Value::V4(s), Value::V4(d), &templates[lb]),
            (IpAddr::V6(s), IpAddr::V6(d)) => (Value::V6(s), Value::V6(d), &templates[lb + 1]),
            (s, d) => return Err(RecordError::Families(s, d)),
        };
        let mut values = vec![
            src,
            dst,
            Value::U16(self.src_port),
            Value::U16(self.dst_port),
            Value::U8(self.protocol),
            Value::U64(self.octets),
            Value::U64(self.packets),
            Value::U64(self.start_ms),
            Value::U64(self.end_ms),
            Value::U8(self.end_reason as u8),
            Value::U8(self.firewall_event as u8),
            Value::U8(self.direction as u8),
            Value::U64(self.vni.map(vxlan_segment).unwrap_or(0)),
            Value::Str(&self.tenant),
            Value::Str(&self.vpc),
            Value::Str(&self.zone),
            Value::Str(&self.rule),
            Value::U8(self.verdict as u8),
            Value::Str(&self.port),
        ];
        if let Some(l) = &self.lb {
            values.extend([Value::Str(&l.service), Value::Str(&l.vip), Value::Str(&l.member)]);
        }
        Ok(m.add_record(t, &values)?)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn sample(v6: bool) -> FlowRecord {
        let (src, dst): (IpAddr, IpAddr) = if v6 {
            ("fd10::5".parse().unwrap(), "fd30::10".parse().unwrap())
        } else {
            ("10.1.0.5".parse().unwrap(), "10.30.0.10".parse().unwrap())
        };
        FlowRecord {
            src,
            dst,
            src_port: 40_000,
            dst_port: 443,
            protocol: 6,
            octets: 123_456,
            packets: 321,
            start_ms: 1_764_979_200_000,
            end_ms: 1_764_979_260_500,
            end_reason: EndReason::EndOfFlow,
            firewall_event: FirewallEvent::Deleted,
            direction: Direction::Egress,
            vni: Some(4096),
            tenant: "dept-a".into(),
            vpc: "portal".into(),
            zone: "extranet".into(),
            rule: "exchange_path/portal-https-in".into(),
            verdict: Verdict::Allowed,
            port: "vm1".into(),
            lb: None,
        }
    }

    #[test]
    fn records_of_both_families_and_none_of_two() {
        let t = templates(PEN_DEFAULT);
        let mut m = Message::new(1400);
        assert!(sample(false).add_to(&mut m, &t).unwrap());
        assert!(sample(true).add_to(&mut m, &t).unwrap());
        let mut mixed = sample(false);
        mixed.dst = "fd30::10".parse().unwrap();
        assert!(matches!(mixed.add_to(&mut m, &t), Err(RecordError::Families(..))));
        assert_eq!(m.records(), 2);
        assert_eq!(vxlan_segment(4096), 0x0100_0000_0000_1000);
    }
}
