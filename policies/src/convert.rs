//! Conversion between the API's messages and the model. Parsing happens here,
//! once; an error names the operation and the field.

use crate as m;
use sdn_proto::v1 as pb;

/// A conversion error: the field path and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for FieldError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Where a field is: the path of the object it belongs to.
pub struct At<'a>(pub &'a str);

impl At<'_> {
    pub fn err(&self, field: &str, message: impl Into<String>) -> FieldError {
        FieldError {
            field: format!("{}.{}", self.0, field),
            message: message.into(),
        }
    }
}

fn opt_text(s: &str) -> Option<&str> {
    let t = s.trim();
    (!t.is_empty()).then_some(t)
}

/// Converts the operations of an `ApplyRequest`.
pub fn ops_from_pb(ops: &[pb::Operation]) -> Result<Vec<m::Op>, FieldError> {
    ops.iter()
        .enumerate()
        .map(|(i, o)| {
            let Some(op) = &o.op else {
                return Err(FieldError {
                    field: format!("operations[{i}]"),
                    message: "no operation set".into(),
                });
            };
            op_from_pb(i, op)
        })
        .collect()
}

/// What a kind is in the API: its message, and the conversions both ways.
/// Reading parses every field once; an error names the field.
pub trait ApiResource: Sized {
    /// The API's message for an object of this kind.
    type Pb;
    fn from_pb(at: &At, pb: &Self::Pb) -> Result<Self, FieldError>;
    /// An object as a listing gives it back (a listing holds no secret).
    fn from_listing(at: &At, pb: &Self::Pb) -> Result<Self, FieldError> {
        Self::from_pb(at, pb)
    }
    /// The object as an answer gives it.
    fn to_pb(&self) -> Self::Pb;
    /// The object as a put sends it: whole, secrets included.
    fn to_pb_put(&self) -> Self::Pb {
        self.to_pb()
    }
}

macro_rules! api_kinds {
    ($(($kind:ident, $ty:ident, $name:literal, $map:ident, $put:ident,
        list: $list:ident, $($rest:tt)*)),* $(,)?) => {
        fn op_from_pb(i: usize, op: &pb::operation::Op) -> Result<m::Op, FieldError> {
            use pb::operation::Op as P;
            Ok(match op {
                $(P::$put(x) => m::Op::$put(<m::$ty as ApiResource>::from_pb(
                    &At(&format!(concat!("operations[{}].put_", $name), i)),
                    x,
                )?),)*
                P::Delete(r) => {
                    let kind = kind_from_pb(r.kind).ok_or_else(|| FieldError {
                        field: format!("operations[{i}].delete.kind"),
                        message: format!("unknown or unset kind {}", r.kind),
                    })?;
                    m::Op::Delete { kind, id: r.id.clone() }
                }
            })
        }

        /// Converts a model operation to the API's form (used by `sdnctl`).
        pub fn op_to_pb(op: &m::Op) -> pb::Operation {
            use pb::operation::Op as P;
            let o = match op {
                $(m::Op::$put(x) => P::$put(x.to_pb_put()),)*
                m::Op::Delete { kind, id } => P::Delete(pb::ObjectRef {
                    kind: kind_to_pb(*kind) as i32,
                    id: id.clone(),
                }),
            };
            pb::Operation { op: Some(o) }
        }

        /// The model's kind of an API kind; `None` for a kind that names no
        /// object (unset, or a quarantine's VM target).
        pub fn kind_from_pb(k: i32) -> Option<m::Kind> {
            match pb::Kind::try_from(k).ok()? {
                $(pb::Kind::$kind => Some(m::Kind::$kind),)*
                pb::Kind::Unspecified | pb::Kind::Vm => None,
            }
        }

        pub fn kind_to_pb(k: m::Kind) -> pb::Kind {
            match k {
                $(m::Kind::$kind => pb::Kind::$kind,)*
            }
        }

        /// The API's listing of the objects of `kind` (`None`: every kind).
        pub fn list_to_pb(s: &m::State, kind: Option<m::Kind>, revision: u64) -> pb::ListResponse {
            let mut out = pb::ListResponse {
                revision,
                ..Default::default()
            };
            $(if kind.is_none_or(|k| k == m::Kind::$kind) {
                out.$list = s.$map.values().map(ApiResource::to_pb).collect();
            })*
            out
        }

        /// The objects of a listing as put operations of the model, in the
        /// order of the kinds' table. An object that does not read names
        /// its kind and place.
        pub fn list_from_pb(r: &pb::ListResponse) -> Result<Vec<m::Op>, FieldError> {
            let mut out = Vec::new();
            $(for (i, x) in r.$list.iter().enumerate() {
                let at = format!(concat!(stringify!($list), "[{}]"), i);
                out.push(m::Op::$put(<m::$ty as ApiResource>::from_listing(&At(&at), x)?));
            })*
            Ok(out)
        }
    };
}

crate::for_each_kind!(api_kinds);

impl ApiResource for m::Tenant {
    type Pb = pb::Tenant;
    fn from_pb(_: &At, t: &pb::Tenant) -> Result<Self, FieldError> {
        Ok(m::Tenant {
            id: t.id.clone(),
            name: t.name.clone(),
        })
    }
    fn to_pb(&self) -> pb::Tenant {
        pb::Tenant {
            id: self.id.clone(),
            name: self.name.clone(),
        }
    }
}

impl ApiResource for m::Vpc {
    type Pb = pb::Vpc;
    fn from_pb(_: &At, v: &pb::Vpc) -> Result<Self, FieldError> {
        Ok(m::Vpc {
            id: v.id.clone(),
            tenant_id: v.tenant_id.clone(),
            name: v.name.clone(),
            vni: v.vni,
            zone_id: v.zone_id.clone(),
            border_policy_id: v.border_policy_id.clone(),
        })
    }
    fn to_pb(&self) -> pb::Vpc {
        pb::Vpc {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: self.name.clone(),
            vni: self.vni,
            zone_id: self.zone_id.clone(),
            border_policy_id: self.border_policy_id.clone(),
        }
    }
}

impl ApiResource for m::Subnet {
    type Pb = pb::Subnet;
    fn from_pb(at: &At, s: &pb::Subnet) -> Result<Self, FieldError> {
        let cidr_v4 = match opt_text(&s.cidr_v4) {
            None => None,
            Some(t) => match m::parse_cidr(t).map_err(|e| at.err("cidr_v4", e))? {
                ipnetwork::IpNetwork::V4(n) => Some(n),
                ipnetwork::IpNetwork::V6(_) => return Err(at.err("cidr_v4", format!("{t} is not an IPv4 prefix"))),
            },
        };
        let cidr_v6 = match opt_text(&s.cidr_v6) {
            None => None,
            Some(t) => match m::parse_cidr(t).map_err(|e| at.err("cidr_v6", e))? {
                ipnetwork::IpNetwork::V6(n) => Some(n),
                ipnetwork::IpNetwork::V4(_) => return Err(at.err("cidr_v6", format!("{t} is not an IPv6 prefix"))),
            },
        };
        Ok(m::Subnet {
            id: s.id.clone(),
            vpc_id: s.vpc_id.clone(),
            cidr_v4,
            cidr_v6,
        })
    }
    fn to_pb(&self) -> pb::Subnet {
        pb::Subnet {
            id: self.id.clone(),
            vpc_id: self.vpc_id.clone(),
            cidr_v4: self.cidr_v4.map(|n| n.to_string()).unwrap_or_default(),
            cidr_v6: self.cidr_v6.map(|n| n.to_string()).unwrap_or_default(),
        }
    }
}

impl ApiResource for m::Host {
    type Pb = pb::Host;
    fn from_pb(at: &At, h: &pb::Host) -> Result<Self, FieldError> {
        let underlay_ip = h
            .underlay_ip
            .trim()
            .parse()
            .map_err(|_| at.err("underlay_ip", format!("invalid IP address {:?}", h.underlay_ip)))?;
        Ok(m::Host {
            id: h.id.clone(),
            underlay_ip,
        })
    }
    fn to_pb(&self) -> pb::Host {
        pb::Host {
            id: self.id.clone(),
            underlay_ip: self.underlay_ip.to_string(),
        }
    }
}

impl ApiResource for m::Quarantine {
    type Pb = pb::Quarantine;
    fn from_pb(at: &At, q: &pb::Quarantine) -> Result<Self, FieldError> {
        let target = match pb::Kind::try_from(q.target_kind) {
            Ok(pb::Kind::Port) => m::QuarantineTarget::Port,
            Ok(pb::Kind::Vpc) => m::QuarantineTarget::Vpc,
            Ok(pb::Kind::Vm) => m::QuarantineTarget::Vm,
            _ => return Err(at.err("target_kind", format!("must be PORT, VPC or VM, got {}", q.target_kind))),
        };
        Ok(m::Quarantine {
            id: q.id.clone(),
            target,
            target_id: q.target_id.clone(),
            reason: q.reason.clone(),
            expires_unix_ms: (q.expires_unix_ms != 0).then_some(q.expires_unix_ms),
        })
    }
    fn to_pb(&self) -> pb::Quarantine {
        pb::Quarantine {
            id: self.id.clone(),
            target_kind: match self.target {
                m::QuarantineTarget::Port => pb::Kind::Port,
                m::QuarantineTarget::Vpc => pb::Kind::Vpc,
                m::QuarantineTarget::Vm => pb::Kind::Vm,
            } as i32,
            target_id: self.target_id.clone(),
            reason: self.reason.clone(),
            expires_unix_ms: self.expires_unix_ms.unwrap_or(0),
        }
    }
}

impl ApiResource for m::VpcPeering {
    type Pb = pb::VpcPeering;
    fn from_pb(_: &At, x: &pb::VpcPeering) -> Result<Self, FieldError> {
        Ok(m::VpcPeering {
            id: x.id.clone(),
            vpc_a: x.vpc_a.clone(),
            vpc_b: x.vpc_b.clone(),
            policy_id: x.policy_id.clone(),
        })
    }
    fn to_pb(&self) -> pb::VpcPeering {
        pb::VpcPeering {
            id: self.id.clone(),
            vpc_a: self.vpc_a.clone(),
            vpc_b: self.vpc_b.clone(),
            policy_id: self.policy_id.clone(),
        }
    }
}

impl ApiResource for m::MirrorSession {
    type Pb = pb::MirrorSession;
    fn from_pb(at: &At, x: &pb::MirrorSession) -> Result<Self, FieldError> {
        let direction = match x.direction.trim() {
            "in" => m::MirrorDirection::In,
            "out" => m::MirrorDirection::Out,
            "both" => m::MirrorDirection::Both,
            d => return Err(at.err("direction", format!("must be in, out or both, got {d:?}"))),
        };
        let rules = x
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let at = At(&format!("{}.rules[{i}]", at.0));
                let cidr = |field: &str, t: &str| -> Result<Option<ipnetwork::IpNetwork>, FieldError> {
                    opt_text(t)
                        .map(|t| m::parse_cidr(t).map_err(|e| at.err(field, e)))
                        .transpose()
                };
                for (f, v) in [("port_min", r.port_min), ("port_max", r.port_max)] {
                    if v > 65535 {
                        return Err(at.err(f, format!("{v} is above 65535")));
                    }
                }
                Ok(m::MirrorRule {
                    protocol: protocol_from_pb(&at, r.protocol)?,
                    source: cidr("source_cidr", &r.source_cidr)?,
                    destination: cidr("destination_cidr", &r.destination_cidr)?,
                    ports: (r.port_min != 0 || r.port_max != 0).then_some((r.port_min as u16, r.port_max as u16)),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let remote = |field: &str, t: &str| -> Result<std::net::IpAddr, FieldError> {
            t.trim()
                .parse()
                .map_err(|_| at.err(field, format!("invalid IP address {t:?}")))
        };
        let destination = match &x.destination {
            None => return Err(at.err("destination", "give one: tap, vxlan or erspan")),
            Some(pb::mirror_session::Destination::Tap(t)) => m::MirrorDestination::Tap {
                port_id: t.port_id.clone(),
                vni: t.vni,
            },
            Some(pb::mirror_session::Destination::Vxlan(v)) => {
                if v.port > 65535 {
                    return Err(at.err("vxlan.port", format!("{} is above 65535", v.port)));
                }
                m::MirrorDestination::Vxlan {
                    remote: remote("vxlan.remote", &v.remote)?,
                    vni: v.vni,
                    port: if v.port == 0 { 4789 } else { v.port as u16 },
                }
            }
            Some(pb::mirror_session::Destination::Erspan(e)) => {
                if e.version > 255 || e.session > 65535 {
                    return Err(at.err("erspan", "version or session out of range"));
                }
                m::MirrorDestination::Erspan {
                    remote: remote("erspan.remote", &e.remote)?,
                    version: e.version as u8,
                    session: e.session as u16,
                }
            }
        };
        Ok(m::MirrorSession {
            id: x.id.clone(),
            zone_id: x.zone_id.trim().to_string(),
            tenant_id: x.tenant_id.trim().to_string(),
            vpc_id: x.vpc_id.trim().to_string(),
            port_id: x.port_id.trim().to_string(),
            rules,
            direction,
            sample: x.sample,
            snap_len: x.snap_len,
            rate_pps: x.rate_pps,
            destination,
        })
    }
    fn to_pb(&self) -> pb::MirrorSession {
        pb::MirrorSession {
            id: self.id.clone(),
            zone_id: self.zone_id.clone(),
            tenant_id: self.tenant_id.clone(),
            vpc_id: self.vpc_id.clone(),
            port_id: self.port_id.clone(),
            rules: self
                .rules
                .iter()
                .map(|r| {
                    let (port_min, port_max) = r.ports.map(|(a, b)| (a as u32, b as u32)).unwrap_or((0, 0));
                    pb::MirrorRule {
                        protocol: protocol_to_pb(r.protocol) as i32,
                        source_cidr: r.source.map(|n| n.to_string()).unwrap_or_default(),
                        destination_cidr: r.destination.map(|n| n.to_string()).unwrap_or_default(),
                        port_min,
                        port_max,
                    }
                })
                .collect(),
            direction: match self.direction {
                m::MirrorDirection::In => "in",
                m::MirrorDirection::Out => "out",
                m::MirrorDirection::Both => "both",
            }
            .into(),
            sample: self.sample,
            snap_len: self.snap_len,
            rate_pps: self.rate_pps,
            destination: Some(match &self.destination {
                m::MirrorDestination::Tap { port_id, vni } => pb::mirror_session::Destination::Tap(pb::MirrorTap {
                    port_id: port_id.clone(),
                    vni: *vni,
                }),
                m::MirrorDestination::Vxlan { remote, vni, port } => {
                    pb::mirror_session::Destination::Vxlan(pb::MirrorVxlan {
                        remote: remote.to_string(),
                        vni: *vni,
                        port: *port as u32,
                    })
                }
                m::MirrorDestination::Erspan {
                    remote,
                    version,
                    session,
                } => pb::mirror_session::Destination::Erspan(pb::MirrorErspan {
                    remote: remote.to_string(),
                    version: *version as u32,
                    session: *session as u32,
                }),
            }),
        }
    }
}

impl ApiResource for m::InformationSystem {
    type Pb = pb::InformationSystem;
    fn from_pb(_at: &At, x: &pb::InformationSystem) -> Result<Self, FieldError> {
        let ids = |v: &[String]| v.iter().map(|s| s.trim().to_string()).collect();
        Ok(m::InformationSystem {
            id: x.id.clone(),
            name: x.name.clone(),
            vpc_ids: ids(&x.vpc_ids),
            port_ids: ids(&x.port_ids),
            bandwidth: x
                .bandwidth
                .iter()
                .map(|b| m::SystemBandwidth {
                    zone_id: b.zone_id.trim().to_string(),
                    up_bps: b.up_bps,
                    down_bps: b.down_bps,
                })
                .collect(),
            alert_percent: x.alert_percent,
            interval_secs: x.interval_secs,
        })
    }
    fn to_pb(&self) -> pb::InformationSystem {
        pb::InformationSystem {
            id: self.id.clone(),
            name: self.name.clone(),
            vpc_ids: self.vpc_ids.clone(),
            port_ids: self.port_ids.clone(),
            bandwidth: self
                .bandwidth
                .iter()
                .map(|b| pb::SystemBandwidth {
                    zone_id: b.zone_id.clone(),
                    up_bps: b.up_bps,
                    down_bps: b.down_bps,
                })
                .collect(),
            alert_percent: self.alert_percent,
            interval_secs: self.interval_secs,
        }
    }
}

fn opt_v4(at: &At, field: &str, t: &str) -> Result<Option<std::net::Ipv4Addr>, FieldError> {
    opt_text(t)
        .map(|t| {
            t.parse()
                .map_err(|_| at.err(field, format!("invalid IPv4 address {t:?}")))
        })
        .transpose()
}

fn opt_v6(at: &At, field: &str, t: &str) -> Result<Option<std::net::Ipv6Addr>, FieldError> {
    opt_text(t)
        .map(|t| {
            t.parse()
                .map_err(|_| at.err(field, format!("invalid IPv6 address {t:?}")))
        })
        .transpose()
}

/// An optional value as the API's text (empty: none).
pub fn text_of<T: ToString>(a: Option<T>) -> String {
    a.map(|a| a.to_string()).unwrap_or_default()
}

fn port_from_pb(at: &At, field: &str, p: u32) -> Result<u16, FieldError> {
    u16::try_from(p).map_err(|_| at.err(field, format!("{p} is above 65535")))
}

impl ApiResource for m::LoadBalancer {
    type Pb = pb::LoadBalancer;
    fn from_pb(at: &At, x: &pb::LoadBalancer) -> Result<Self, FieldError> {
        let exposure = match x.exposure.trim() {
            "" | "vpc" => m::Exposure::Vpc,
            "zone" => m::Exposure::Zone,
            e => return Err(at.err("exposure", format!("must be vpc or zone, got {e:?}"))),
        };
        let nat_hosts = x
            .nat_hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let at = At(&format!("{}.nat_hosts[{i}]", at.0));
                Ok(m::NatHost {
                    host_id: h.host_id.trim().to_string(),
                    ipv4: opt_v4(&at, "ipv4", &h.ipv4)?,
                    ipv6: opt_v6(&at, "ipv6", &h.ipv6)?,
                })
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(m::LoadBalancer {
            id: x.id.clone(),
            tenant_id: x.tenant_id.trim().to_string(),
            vpc_id: x.vpc_id.trim().to_string(),
            name: x.name.clone(),
            vip_v4: opt_v4(at, "vip_v4", &x.vip_v4)?,
            vip_v6: opt_v6(at, "vip_v6", &x.vip_v6)?,
            exposure,
            nat_hosts,
        })
    }
    fn to_pb(&self) -> pb::LoadBalancer {
        pb::LoadBalancer {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            vpc_id: self.vpc_id.clone(),
            name: self.name.clone(),
            vip_v4: text_of(self.vip_v4),
            vip_v6: text_of(self.vip_v6),
            exposure: self.exposure.name().into(),
            nat_hosts: self
                .nat_hosts
                .iter()
                .map(|h| pb::NatHost {
                    host_id: h.host_id.clone(),
                    ipv4: text_of(h.ipv4),
                    ipv6: text_of(h.ipv6),
                })
                .collect(),
        }
    }
}

impl ApiResource for m::VirtualIp {
    type Pb = pb::VirtualIp;
    fn from_pb(at: &At, x: &pb::VirtualIp) -> Result<Self, FieldError> {
        let vrid = u8::try_from(x.vrid).map_err(|_| at.err("vrid", format!("{} is above 255", x.vrid)))?;
        let advert_interval_cs = match x.advert_interval_cs {
            0 => m::VIP_ADVERT_INTERVAL_CS_DEFAULT,
            n => u16::try_from(n).map_err(|_| at.err("advert_interval_cs", format!("{n} is above 4095")))?,
        };
        let holders = x
            .holders
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let at = At(&format!("{}.holders[{i}]", at.0));
                let target = match (opt_text(&h.port_id), opt_text(&h.host_id)) {
                    (Some(p), None) => m::VipHolderTarget::Port(p.to_string()),
                    (None, Some(h)) => m::VipHolderTarget::Host(h.to_string()),
                    (Some(_), Some(_)) => return Err(at.err("host_id", "a holder is a port or a host, not both")),
                    (None, None) => return Err(at.err("port_id", "a holder needs a port_id or a host_id")),
                };
                let priority =
                    u8::try_from(h.priority).map_err(|_| at.err("priority", format!("{} is above 254", h.priority)))?;
                Ok(m::VipHolder { target, priority })
            })
            .collect::<Result<_, FieldError>>()?;
        Ok(m::VirtualIp {
            id: x.id.clone(),
            tenant_id: x.tenant_id.trim().to_string(),
            vpc_id: x.vpc_id.trim().to_string(),
            name: x.name.clone(),
            ipv4: opt_v4(at, "ipv4", &x.ipv4)?,
            ipv6: opt_v6(at, "ipv6", &x.ipv6)?,
            vrid,
            holders,
            preempt: !x.no_preempt,
            advert_interval_cs,
            // The controller's alone: never taken from a request.
            epoch: 0,
            owner: None,
            owner_since_unix_ms: 0,
            owner_lease_ms: 0,
            claim: false,
        })
    }
    fn to_pb(&self) -> pb::VirtualIp {
        pb::VirtualIp {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            vpc_id: self.vpc_id.clone(),
            name: self.name.clone(),
            ipv4: text_of(self.ipv4),
            ipv6: text_of(self.ipv6),
            vrid: self.vrid.into(),
            holders: self
                .holders
                .iter()
                .map(|h| {
                    let (port_id, host_id) = match &h.target {
                        m::VipHolderTarget::Port(p) => (p.clone(), String::new()),
                        m::VipHolderTarget::Host(h) => (String::new(), h.clone()),
                    };
                    pb::VipHolder {
                        port_id,
                        host_id,
                        priority: h.priority.into(),
                    }
                })
                .collect(),
            no_preempt: !self.preempt,
            advert_interval_cs: self.advert_interval_cs.into(),
            epoch: self.epoch,
            owner_port_id: match &self.owner {
                Some(m::VipHolderTarget::Port(p)) => p.clone(),
                _ => String::new(),
            },
            owner_host_id: match &self.owner {
                Some(m::VipHolderTarget::Host(h)) => h.clone(),
                _ => String::new(),
            },
            owner_since_unix_ms: self.owner_since_unix_ms,
        }
    }
}

impl ApiResource for m::Certificate {
    type Pb = pb::Certificate;
    fn from_pb(at: &At, x: &pb::Certificate) -> Result<Self, FieldError> {
        let read = read_certificate(&x.cert_pem, &x.key_pem, now_unix()).map_err(|(f, m)| at.err(f, m))?;
        Ok(m::Certificate {
            id: x.id.clone(),
            tenant_id: x.tenant_id.trim().to_string(),
            name: x.name.clone(),
            cert_pem: read.chain_pem,
            key_pem: x.key_pem.clone(),
            names: read.names,
            not_after_unix: read.not_after_unix,
        })
    }
    /// As listed: without its key, with the names and expiry the
    /// controller read from it.
    fn from_listing(_: &At, x: &pb::Certificate) -> Result<Self, FieldError> {
        Ok(m::Certificate {
            id: x.id.clone(),
            tenant_id: x.tenant_id.clone(),
            name: x.name.clone(),
            cert_pem: x.cert_pem.clone(),
            key_pem: String::new(),
            names: x.names.clone(),
            not_after_unix: x.not_after_unix,
        })
    }
    fn to_pb_put(&self) -> pb::Certificate {
        certificate_with_key(self)
    }
    /// Without the key: a certificate's key is never read back.
    fn to_pb(&self) -> pb::Certificate {
        pb::Certificate {
            id: self.id.clone(),
            tenant_id: self.tenant_id.clone(),
            name: self.name.clone(),
            cert_pem: self.cert_pem.clone(),
            key_pem: String::new(),
            names: self.names.clone(),
            not_after_unix: self.not_after_unix,
        }
    }
}

/// A certificate with its key, for the agent of a host that serves it.
pub fn certificate_with_key(c: &m::Certificate) -> pb::Certificate {
    pb::Certificate {
        key_pem: c.key_pem.clone(),
        ..c.to_pb()
    }
}

/// The clock, in Unix seconds.
pub(crate) fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// A certificate as read: its chain written out again (nothing but the
/// certificates), the names it is for and when it expires.
#[derive(Debug, PartialEq, Eq)]
pub struct ReadCertificate {
    pub chain_pem: String,
    pub names: Vec<String>,
    pub not_after_unix: i64,
}

/// Reads a certificate (with its chain) and its key; an error names the
/// field (`cert_pem`, `key_pem`). A certificate expired at `now`, a key
/// that is not the certificate's, or a `cert_pem` holding anything but
/// certificates (a key pasted with them would be shown to every reader)
/// is refused.
pub fn read_certificate(cert_pem: &str, key_pem: &str, now: i64) -> Result<ReadCertificate, (&'static str, String)> {
    use boring::asn1::Asn1Time;
    use boring::nid::Nid;
    use boring::pkey::PKey;
    use boring::x509::X509;
    if cert_pem.trim().is_empty() {
        return Err(("cert_pem", "give the certificate in PEM".into()));
    }
    if cert_pem.len() > m::CERTIFICATE_PEM_MAX {
        return Err(("cert_pem", format!("longer than {} bytes", m::CERTIFICATE_PEM_MAX)));
    }
    if key_pem.trim().is_empty() {
        return Err(("key_pem", "give the private key in PEM".into()));
    }
    if key_pem.len() > m::KEY_PEM_MAX {
        return Err(("key_pem", format!("longer than {} bytes", m::KEY_PEM_MAX)));
    }
    if let Some(label) = cert_pem
        .lines()
        .filter_map(|l| l.trim().strip_prefix("-----BEGIN "))
        .map(|l| l.trim_end_matches('-'))
        .find(|l| *l != "CERTIFICATE")
    {
        return Err((
            "cert_pem",
            format!("holds a {label} block: certificates only (the key goes in key_pem)"),
        ));
    }
    let chain = X509::stack_from_pem(cert_pem.as_bytes()).map_err(|_| ("cert_pem", "not PEM certificates".into()))?;
    let mut chain_pem = String::new();
    for c in &chain {
        let pem = c
            .to_pem()
            .map_err(|_| ("cert_pem", "a certificate cannot be written out".to_string()))?;
        chain_pem.push_str(&String::from_utf8_lossy(&pem));
    }
    let leaf = chain.first().ok_or(("cert_pem", "no certificate in it".to_string()))?;
    let key =
        PKey::private_key_from_pem(key_pem.as_bytes()).map_err(|_| ("key_pem", "not a PEM private key".to_string()))?;
    let public = leaf
        .public_key()
        .map_err(|_| ("cert_pem", "its public key cannot be read".to_string()))?;
    if !public.public_eq(&key) {
        return Err(("key_pem", "the key is not the certificate's".into()));
    }
    let epoch = Asn1Time::from_unix(0).map_err(|_| ("cert_pem", "no clock".to_string()))?;
    let until = epoch
        .diff(leaf.not_after())
        .map_err(|_| ("cert_pem", "its expiry cannot be read".to_string()))?;
    let not_after = i64::from(until.days) * 86_400 + i64::from(until.secs);
    if not_after <= now {
        return Err(("cert_pem", format!("expired at {} (Unix time)", not_after)));
    }
    let mut names: Vec<String> = leaf
        .subject_alt_names()
        .map(|s| s.iter().filter_map(|n| n.dnsname().map(str::to_string)).collect())
        .unwrap_or_default();
    if names.is_empty() {
        names.extend(
            leaf.subject_name()
                .entries_by_nid(Nid::COMMONNAME)
                .filter_map(|e| e.data().as_utf8().ok().map(|s| s.to_string())),
        );
    }
    Ok(ReadCertificate {
        chain_pem,
        names,
        not_after_unix: not_after,
    })
}

impl ApiResource for m::HttpListener {
    type Pb = pb::HttpListener;
    fn from_pb(at: &At, x: &pb::HttpListener) -> Result<Self, FieldError> {
        let protocol = match x.protocol.trim() {
            "http" => m::HttpProtocol::Http,
            "https" => m::HttpProtocol::Https,
            p => return Err(at.err("protocol", format!("must be http or https, got {p:?}"))),
        };
        let scheduler = m::HttpScheduler::parse(opt_text(&x.scheduler), opt_text(&x.hash_key).map(str::to_string))
            .map_err(|(f, e)| match f {
                m::HttpSchedulerField::Name => at.err("scheduler", e),
                m::HttpSchedulerField::Key => at.err("hash_key", e),
            })?;
        let cookie = match (opt_text(&x.cookie_name), x.cookie_mode.trim()) {
            (None, "") => None,
            (None, _) => return Err(at.err("cookie_name", "a cookie mode needs the cookie's name")),
            (Some(n), "" | "insert") => Some(m::HttpCookie {
                name: n.to_string(),
                mode: m::HttpCookieMode::Insert,
            }),
            (Some(n), "learn") => Some(m::HttpCookie {
                name: n.to_string(),
                mode: m::HttpCookieMode::Learn,
            }),
            (Some(_), o) => return Err(at.err("cookie_mode", format!("must be insert or learn, got {o:?}"))),
        };
        let proxy_protocol = match x.proxy_protocol.trim() {
            "" => None,
            "v1" => Some(m::ProxyProtocol::V1),
            "v2" => Some(m::ProxyProtocol::V2),
            o => return Err(at.err("proxy_protocol", format!("must be v1 or v2 (or empty), got {o:?}"))),
        };
        let rules = x
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| http_rule_from_pb(&At(&format!("{}.rules[{i}]", at.0)), r))
            .collect::<Result<_, _>>()?;
        let trusted_proxies = x
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, n)| {
                n.trim()
                    .parse()
                    .map_err(|e| at.err(&format!("trusted_proxies[{i}]"), format!("{n:?}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        Ok(m::HttpListener {
            id: x.id.clone(),
            load_balancer_id: x.load_balancer_id.trim().to_string(),
            protocol,
            port: port_from_pb(at, "port", x.port)?,
            certificate_ids: x.certificate_ids.iter().map(|c| c.trim().to_string()).collect(),
            rules,
            pool_id: opt_text(&x.pool_id).map(str::to_string),
            scheduler,
            cookie,
            proxy_protocol,
            proxy_ports: x.proxy_ports.iter().map(|p| p.trim().to_string()).collect(),
            trusted_proxies,
            waf_policy_id: opt_text(&x.waf_policy_id).map(str::to_string),
        })
    }
    fn to_pb(&self) -> pb::HttpListener {
        pb::HttpListener {
            id: self.id.clone(),
            load_balancer_id: self.load_balancer_id.clone(),
            protocol: self.protocol.name().into(),
            port: self.port.into(),
            certificate_ids: self.certificate_ids.clone(),
            rules: self.rules.iter().map(http_rule_to_pb).collect(),
            pool_id: self.pool_id.clone().unwrap_or_default(),
            scheduler: self.scheduler.name().into(),
            hash_key: self.scheduler.key().into(),
            cookie_name: self.cookie.as_ref().map(|c| c.name.clone()).unwrap_or_default(),
            cookie_mode: self.cookie.as_ref().map(|c| c.mode.name().into()).unwrap_or_default(),
            proxy_protocol: self.proxy_protocol.map(|p| p.name().into()).unwrap_or_default(),
            proxy_ports: self.proxy_ports.clone(),
            trusted_proxies: self.trusted_proxies.iter().map(|n| n.to_string()).collect(),
            waf_policy_id: self.waf_policy_id.clone().unwrap_or_default(),
        }
    }
}

fn http_rule_from_pb(at: &At, r: &pb::HttpRule) -> Result<m::HttpRule, FieldError> {
    let text = |t: &str| opt_text(t).map(str::to_string);
    let header = match (opt_text(&r.header_name), &r.header_value) {
        (None, v) if !v.is_empty() => return Err(at.err("header_name", "a header value needs the header's name")),
        (None, _) => None,
        (Some(n), v) => Some((n.to_string(), (!v.is_empty()).then(|| v.clone()))),
    };
    let to_pool = text(&r.pool_id);
    let redirect = !r.redirect_location.is_empty() || r.redirect_status != 0;
    let respond = r.respond_status != 0 || !r.respond_body.is_empty() || !r.respond_content_type.is_empty();
    let action = match (to_pool, redirect, respond) {
        (Some(p), false, false) => m::HttpAction::Pool(p),
        (None, true, false) => m::HttpAction::Redirect {
            location: r.redirect_location.clone(),
            status: u16::try_from(r.redirect_status)
                .map_err(|_| at.err("redirect_status", format!("{} is not a redirect", r.redirect_status)))?,
        },
        (None, false, true) => m::HttpAction::Respond {
            status: u16::try_from(r.respond_status)
                .map_err(|_| at.err("respond_status", format!("{} is no status", r.respond_status)))?,
            body: r.respond_body.clone(),
            content_type: text(&r.respond_content_type),
        },
        (None, false, false) => {
            return Err(at.err(
                "pool_id",
                "a rule needs an action: a pool_id, a redirect or a fixed response",
            ))
        }
        _ => {
            return Err(at.err(
                "pool_id",
                "a rule has one action: a pool_id, a redirect or a fixed response",
            ))
        }
    };
    Ok(m::HttpRule {
        name: r.name.clone(),
        host: text(&r.host),
        path_prefix: text(&r.path_prefix),
        path_regex: text(&r.path_regex),
        header,
        method: text(&r.method),
        action,
    })
}

fn http_rule_to_pb(r: &m::HttpRule) -> pb::HttpRule {
    let mut x = pb::HttpRule {
        name: r.name.clone(),
        host: r.host.clone().unwrap_or_default(),
        path_prefix: r.path_prefix.clone().unwrap_or_default(),
        path_regex: r.path_regex.clone().unwrap_or_default(),
        header_name: r.header.as_ref().map(|h| h.0.clone()).unwrap_or_default(),
        header_value: r.header.as_ref().and_then(|h| h.1.clone()).unwrap_or_default(),
        method: r.method.clone().unwrap_or_default(),
        ..Default::default()
    };
    match &r.action {
        m::HttpAction::Pool(p) => x.pool_id = p.clone(),
        m::HttpAction::Redirect { location, status } => {
            x.redirect_location = location.clone();
            x.redirect_status = (*status).into();
        }
        m::HttpAction::Respond {
            status,
            body,
            content_type,
        } => {
            x.respond_status = (*status).into();
            x.respond_body = body.clone();
            x.respond_content_type = content_type.clone().unwrap_or_default();
        }
    }
    x
}

impl ApiResource for m::Listener {
    type Pb = pb::Listener;
    fn from_pb(at: &At, x: &pb::Listener) -> Result<Self, FieldError> {
        let protocol = match x.protocol.trim() {
            "tcp" => m::LbProtocol::Tcp,
            "udp" => m::LbProtocol::Udp,
            p => return Err(at.err("protocol", format!("must be tcp or udp, got {p:?}"))),
        };
        let scheduler = m::Scheduler::from_name(x.scheduler.trim()).ok_or_else(|| {
            let names: Vec<&str> = m::Scheduler::ALL.iter().map(|s| s.name()).collect();
            at.err(
                "scheduler",
                format!("must be one of {}, got {:?}", names.join(", "), x.scheduler),
            )
        })?;
        Ok(m::Listener {
            id: x.id.clone(),
            load_balancer_id: x.load_balancer_id.trim().to_string(),
            protocol,
            port: port_from_pb(at, "port", x.port)?,
            pool_id: x.pool_id.trim().to_string(),
            scheduler,
            persistence_secs: x.persistence_secs,
        })
    }
    fn to_pb(&self) -> pb::Listener {
        pb::Listener {
            id: self.id.clone(),
            load_balancer_id: self.load_balancer_id.clone(),
            protocol: self.protocol.name().into(),
            port: self.port.into(),
            pool_id: self.pool_id.clone(),
            scheduler: self.scheduler.name().into(),
            persistence_secs: self.persistence_secs,
        }
    }
}

impl ApiResource for m::Pool {
    type Pb = pb::Pool;
    fn from_pb(at: &At, x: &pb::Pool) -> Result<Self, FieldError> {
        let health = match &x.health {
            None => None,
            Some(h) => {
                let at = At(&format!("{}.health", at.0));
                let probe = match h.probe.trim() {
                    "tcp" => {
                        if !h.http_path.is_empty() {
                            return Err(at.err("http_path", "a tcp probe has no path"));
                        }
                        m::HealthProbe::Tcp
                    }
                    "http" => {
                        let status = (
                            port_from_pb(&at, "status_min", h.status_min)?,
                            port_from_pb(&at, "status_max", h.status_max)?,
                        );
                        m::HealthProbe::Http {
                            path: h.http_path.clone(),
                            status,
                        }
                    }
                    p => return Err(at.err("probe", format!("must be tcp or http, got {p:?}"))),
                };
                Some(m::HealthCheck {
                    probe,
                    interval_ms: h.interval_ms,
                    timeout_ms: if h.timeout_ms == 0 { h.interval_ms } else { h.timeout_ms },
                    rise: h.rise,
                    fall: h.fall,
                })
            }
        };
        Ok(m::Pool {
            id: x.id.clone(),
            load_balancer_id: x.load_balancer_id.trim().to_string(),
            name: x.name.clone(),
            health,
            drain_secs: x.drain_secs,
        })
    }
    fn to_pb(&self) -> pb::Pool {
        pb::Pool {
            id: self.id.clone(),
            load_balancer_id: self.load_balancer_id.clone(),
            name: self.name.clone(),
            health: self.health.as_ref().map(|h| {
                let (probe, http_path, (status_min, status_max)) = match &h.probe {
                    m::HealthProbe::Tcp => ("tcp", String::new(), (0, 0)),
                    m::HealthProbe::Http { path, status } => ("http", path.clone(), *status),
                };
                pb::HealthCheck {
                    probe: probe.into(),
                    http_path,
                    status_min: status_min.into(),
                    status_max: status_max.into(),
                    interval_ms: h.interval_ms,
                    timeout_ms: h.timeout_ms,
                    rise: h.rise,
                    fall: h.fall,
                }
            }),
            drain_secs: self.drain_secs,
        }
    }
}

impl ApiResource for m::Member {
    type Pb = pb::PoolMember;
    fn from_pb(at: &At, x: &pb::PoolMember) -> Result<Self, FieldError> {
        let target = match (opt_text(&x.port_id), opt_text(&x.address)) {
            (Some(p), None) => m::MemberTarget::Port(p.to_string()),
            (None, Some(a)) => m::MemberTarget::Address(
                a.parse()
                    .map_err(|_| at.err("address", format!("invalid IP address {a:?}")))?,
            ),
            (Some(_), Some(_)) => return Err(at.err("port_id", "give port_id or address, not both")),
            (None, None) => return Err(at.err("port_id", "give the member's port_id or address")),
        };
        let state = match x.state.trim() {
            "" | "enabled" => m::MemberState::Enabled,
            "draining" => m::MemberState::Draining,
            "disabled" => m::MemberState::Disabled,
            s => return Err(at.err("state", format!("must be enabled, draining or disabled, got {s:?}"))),
        };
        Ok(m::Member {
            id: x.id.clone(),
            pool_id: x.pool_id.trim().to_string(),
            target,
            port: port_from_pb(at, "port", x.port)?,
            weight: if x.weight == 0 { 1 } else { x.weight },
            // Read for display; the controller keeps its own record of both
            // whatever a request says.
            draining_since_unix_ms: (x.draining_since_unix_ms != 0).then_some(x.draining_since_unix_ms),
            health: match x.health.as_str() {
                "up" | "down" => Some(m::MemberHealth {
                    up: x.health == "up",
                    since_unix_ms: x.health_since_unix_ms,
                    host_id: x.health_host_id.clone(),
                    detail: x.health_detail.clone(),
                }),
                _ => None,
            },
            health_report: false,
            state,
        })
    }
    fn to_pb(&self) -> pb::PoolMember {
        let (port_id, address) = match &self.target {
            m::MemberTarget::Port(p) => (p.clone(), String::new()),
            m::MemberTarget::Address(a) => (String::new(), a.to_string()),
        };
        pb::PoolMember {
            id: self.id.clone(),
            pool_id: self.pool_id.clone(),
            port_id,
            address,
            port: self.port.into(),
            weight: self.weight,
            state: self.state.name().into(),
            draining_since_unix_ms: self.draining_since_unix_ms.unwrap_or(0),
            health: match &self.health {
                Some(h) if h.up => "up".into(),
                Some(_) => "down".into(),
                None => String::new(),
            },
            health_since_unix_ms: self.health.as_ref().map_or(0, |h| h.since_unix_ms),
            health_detail: self.health.as_ref().map(|h| h.detail.clone()).unwrap_or_default(),
            health_host_id: self.health.as_ref().map(|h| h.host_id.clone()).unwrap_or_default(),
        }
    }
}

fn protocol_from_pb(at: &At, p: i32) -> Result<m::Protocol, FieldError> {
    Ok(match pb::Protocol::try_from(p) {
        Ok(pb::Protocol::Any) => m::Protocol::Any,
        Ok(pb::Protocol::Tcp) => m::Protocol::Tcp,
        Ok(pb::Protocol::Udp) => m::Protocol::Udp,
        Ok(pb::Protocol::Icmp) => m::Protocol::Icmp,
        Ok(pb::Protocol::Icmpv6) => m::Protocol::Icmpv6,
        _ => return Err(at.err("protocol", format!("must be ANY, TCP, UDP, ICMP or ICMPV6, got {p}"))),
    })
}

fn direction_to_pb(d: m::Direction) -> pb::Direction {
    match d {
        m::Direction::Ingress => pb::Direction::Ingress,
        m::Direction::Egress => pb::Direction::Egress,
    }
}

fn ether_type_to_pb(e: m::EtherType) -> pb::EtherType {
    match e {
        m::EtherType::IPv4 => pb::EtherType::Ipv4,
        m::EtherType::IPv6 => pb::EtherType::Ipv6,
    }
}

fn protocol_to_pb(p: m::Protocol) -> pb::Protocol {
    match p {
        m::Protocol::Any => pb::Protocol::Any,
        m::Protocol::Tcp => pb::Protocol::Tcp,
        m::Protocol::Udp => pb::Protocol::Udp,
        m::Protocol::Icmp => pb::Protocol::Icmp,
        m::Protocol::Icmpv6 => pb::Protocol::Icmpv6,
    }
}

fn rule_from_pb(at: &At, r: &pb::SecurityGroupRule) -> Result<m::Rule, FieldError> {
    let direction = match pb::Direction::try_from(r.direction) {
        Ok(pb::Direction::Ingress) => m::Direction::Ingress,
        Ok(pb::Direction::Egress) => m::Direction::Egress,
        _ => return Err(at.err("direction", format!("must be INGRESS or EGRESS, got {}", r.direction))),
    };
    let ether_type = match pb::EtherType::try_from(r.ether_type) {
        Ok(pb::EtherType::Ipv4) => m::EtherType::IPv4,
        Ok(pb::EtherType::Ipv6) => m::EtherType::IPv6,
        _ => return Err(at.err("ether_type", format!("must be IPV4 or IPV6, got {}", r.ether_type))),
    };
    let protocol = protocol_from_pb(at, r.protocol)?;
    if r.port_min > 65535 {
        return Err(at.err("port_min", format!("{} is above 65535", r.port_min)));
    }
    if r.port_max > 65535 {
        return Err(at.err("port_max", format!("{} is above 65535", r.port_max)));
    }
    let ports = if r.port_min == 0 && r.port_max == 0 {
        None
    } else {
        Some((r.port_min as u16, r.port_max as u16))
    };
    let remote = match (opt_text(&r.remote_cidr), opt_text(&r.remote_group_id)) {
        (Some(_), Some(_)) => return Err(at.err("remote_group_id", "set remote_cidr or remote_group_id, not both")),
        (Some(c), None) => m::Remote::Cidr(m::parse_cidr(c).map_err(|e| at.err("remote_cidr", e))?),
        (None, Some(g)) => m::Remote::Group(g.to_string()),
        (None, None) => m::Remote::Any,
    };
    Ok(m::Rule {
        id: r.id.clone(),
        direction,
        ether_type,
        protocol,
        ports,
        remote,
    })
}

fn rule_to_pb(r: &m::Rule) -> pb::SecurityGroupRule {
    let (port_min, port_max) = r.ports.map(|(a, b)| (a as u32, b as u32)).unwrap_or((0, 0));
    let (remote_cidr, remote_group_id) = match &r.remote {
        m::Remote::Any => (String::new(), String::new()),
        m::Remote::Cidr(n) => (n.to_string(), String::new()),
        m::Remote::Group(g) => (String::new(), g.clone()),
    };
    pb::SecurityGroupRule {
        id: r.id.clone(),
        direction: direction_to_pb(r.direction) as i32,
        ether_type: ether_type_to_pb(r.ether_type) as i32,
        protocol: protocol_to_pb(r.protocol) as i32,
        port_min,
        port_max,
        remote_cidr,
        remote_group_id,
    }
}

impl ApiResource for m::Port {
    type Pb = pb::Port;
    fn from_pb(at: &At, p: &pb::Port) -> Result<Self, FieldError> {
        let mac = p.mac.trim().parse().map_err(|e: String| at.err("mac", e))?;
        let ipv4 = match opt_text(&p.ipv4) {
            None => None,
            Some(t) => Some(
                t.parse()
                    .map_err(|_| at.err("ipv4", format!("invalid IPv4 address {t:?}")))?,
            ),
        };
        let ipv6 = match opt_text(&p.ipv6) {
            None => None,
            Some(t) => Some(
                t.parse()
                    .map_err(|_| at.err("ipv6", format!("invalid IPv6 address {t:?}")))?,
            ),
        };
        Ok(m::Port {
            id: p.id.clone(),
            tenant_id: p.tenant_id.clone(),
            subnet_id: p.subnet_id.clone(),
            host_id: p.host_id.clone(),
            device: p.device.clone(),
            mac,
            ipv4,
            ipv6,
            security_group_ids: p.security_group_ids.clone(),
            vm_id: p.vm_id.clone(),
        })
    }
    fn to_pb(&self) -> pb::Port {
        let p = self;
        pb::Port {
            id: p.id.clone(),
            tenant_id: p.tenant_id.clone(),
            subnet_id: p.subnet_id.clone(),
            host_id: p.host_id.clone(),
            device: p.device.clone(),
            mac: p.mac.to_string(),
            ipv4: p.ipv4.map(|a| a.to_string()).unwrap_or_default(),
            ipv6: p.ipv6.map(|a| a.to_string()).unwrap_or_default(),
            security_group_ids: p.security_group_ids.clone(),
            vm_id: p.vm_id.clone(),
        }
    }
}

impl ApiResource for m::SecurityGroup {
    type Pb = pb::SecurityGroup;
    fn from_pb(at: &At, g: &pb::SecurityGroup) -> Result<Self, FieldError> {
        let mut rules = Vec::with_capacity(g.rules.len());
        for (i, r) in g.rules.iter().enumerate() {
            let rat = format!("{}.rules[{i}]", at.0);
            rules.push(rule_from_pb(&At(&rat), r)?);
        }
        Ok(m::SecurityGroup {
            id: g.id.clone(),
            tenant_id: g.tenant_id.clone(),
            name: g.name.clone(),
            rules,
        })
    }
    fn to_pb(&self) -> pb::SecurityGroup {
        let g = self;
        pb::SecurityGroup {
            id: g.id.clone(),
            tenant_id: g.tenant_id.clone(),
            name: g.name.clone(),
            rules: g.rules.iter().map(rule_to_pb).collect(),
        }
    }
}

impl ApiResource for m::Zone {
    type Pb = pb::Zone;
    fn from_pb(at: &At, z: &pb::Zone) -> Result<Self, FieldError> {
        let prefixes = z
            .prefixes
            .iter()
            .enumerate()
            .map(|(i, p)| m::parse_cidr(p).map_err(|e| at.err(&format!("prefixes[{i}]"), e)))
            .collect::<Result<_, _>>()?;
        Ok(m::Zone {
            id: z.id.clone(),
            name: if z.name.is_empty() {
                z.id.clone()
            } else {
                z.name.clone()
            },
            prefixes,
            uplink_device: z.uplink_device.clone(),
        })
    }
    fn to_pb(&self) -> pb::Zone {
        let z = self;
        pb::Zone {
            id: z.id.clone(),
            name: z.name.clone(),
            prefixes: z.prefixes.iter().map(|n| n.to_string()).collect(),
            uplink_device: z.uplink_device.clone(),
            vpc_subnets: Vec::new(),
        }
    }
}

impl ApiResource for m::ExchangePath {
    type Pb = pb::ExchangePath;
    fn from_pb(at: &At, x: &pb::ExchangePath) -> Result<Self, FieldError> {
        let source = m::parse_cidr(&x.source_cidr).map_err(|e| at.err("source_cidr", e))?;
        let destination = m::parse_cidr(&x.destination_cidr).map_err(|e| at.err("destination_cidr", e))?;
        for (f, v) in [("port_min", x.port_min), ("port_max", x.port_max)] {
            if v > 65535 {
                return Err(at.err(f, format!("{v} is above 65535")));
            }
        }
        Ok(m::ExchangePath {
            id: x.id.clone(),
            from_zone: x.from_zone.clone(),
            to_zone: x.to_zone.clone(),
            source,
            destination,
            protocol: protocol_from_pb(at, x.protocol)?,
            ports: (x.port_min as u16, x.port_max as u16),
            broad: x.broad,
            broad_reason: x.broad_reason.clone(),
        })
    }
    fn to_pb(&self) -> pb::ExchangePath {
        let x = self;
        pb::ExchangePath {
            id: x.id.clone(),
            from_zone: x.from_zone.clone(),
            to_zone: x.to_zone.clone(),
            source_cidr: x.source.to_string(),
            destination_cidr: x.destination.to_string(),
            protocol: protocol_to_pb(x.protocol) as i32,
            port_min: x.ports.0 as u32,
            port_max: x.ports.1 as u32,
            broad: x.broad,
            broad_reason: x.broad_reason.clone(),
        }
    }
}

impl ApiResource for m::FirewallPolicy {
    type Pb = pb::FirewallPolicy;
    fn from_pb(at: &At, f: &pb::FirewallPolicy) -> Result<Self, FieldError> {
        let action = |field: &str, a: i32| match pb::Action::try_from(a) {
            Ok(pb::Action::Allow) => Ok(m::Action::Allow),
            Ok(pb::Action::Deny) => Ok(m::Action::Deny),
            _ => Err(at.err(field, format!("must be ALLOW or DENY, got {a}"))),
        };
        let mut rules = Vec::new();
        for (i, r) in f.rules.iter().enumerate() {
            let rat = format!("{}.rules[{i}]", at.0);
            let rat = At(&rat);
            // The fields a firewall rule shares with a security-group rule.
            let sg = rule_from_pb(
                &rat,
                &pb::SecurityGroupRule {
                    id: r.id.clone(),
                    direction: r.direction,
                    ether_type: r.ether_type,
                    protocol: r.protocol,
                    port_min: r.port_min,
                    port_max: r.port_max,
                    remote_cidr: r.remote_cidr.clone(),
                    remote_group_id: String::new(),
                },
            )?;
            rules.push(m::FirewallRule {
                id: sg.id,
                priority: r.priority,
                action: match pb::Action::try_from(r.action) {
                    Ok(pb::Action::Allow) => m::Action::Allow,
                    Ok(pb::Action::Deny) => m::Action::Deny,
                    _ => return Err(rat.err("action", format!("must be ALLOW or DENY, got {}", r.action))),
                },
                direction: sg.direction,
                ether_type: sg.ether_type,
                protocol: sg.protocol,
                ports: sg.ports,
                remote: match sg.remote {
                    m::Remote::Cidr(n) => Some(n),
                    _ => None,
                },
            });
        }
        Ok(m::FirewallPolicy {
            id: f.id.clone(),
            name: if f.name.is_empty() {
                f.id.clone()
            } else {
                f.name.clone()
            },
            default_action: action("default_action", f.default_action)?,
            rules,
        })
    }
    fn to_pb(&self) -> pb::FirewallPolicy {
        let f = self;
        let action = |a: m::Action| match a {
            m::Action::Allow => pb::Action::Allow as i32,
            m::Action::Deny => pb::Action::Deny as i32,
        };
        pb::FirewallPolicy {
            id: f.id.clone(),
            name: f.name.clone(),
            default_action: action(f.default_action),
            rules: f
                .rules
                .iter()
                .map(|r| pb::FirewallRule {
                    id: r.id.clone(),
                    priority: r.priority,
                    action: action(r.action),
                    direction: direction_to_pb(r.direction) as i32,
                    ether_type: ether_type_to_pb(r.ether_type) as i32,
                    protocol: protocol_to_pb(r.protocol) as i32,
                    port_min: r.ports.map(|p| p.0 as u32).unwrap_or(0),
                    port_max: r.ports.map(|p| p.1 as u32).unwrap_or(0),
                    remote_cidr: r.remote.map(|n| n.to_string()).unwrap_or_default(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_fields_are_named() {
        let ops = vec![pb::Operation {
            op: Some(pb::operation::Op::PutSecurityGroup(pb::SecurityGroup {
                id: "g".into(),
                tenant_id: "t".into(),
                name: "g".into(),
                rules: vec![pb::SecurityGroupRule {
                    id: "r".into(),
                    direction: pb::Direction::Ingress as i32,
                    ether_type: pb::EtherType::Ipv4 as i32,
                    protocol: pb::Protocol::Tcp as i32,
                    port_min: 1,
                    port_max: 70000,
                    ..Default::default()
                }],
            })),
        }];
        let e = ops_from_pb(&ops).unwrap_err();
        assert_eq!(e.field, "operations[0].put_security_group.rules[0].port_max");
        let ops = vec![pb::Operation { op: None }];
        assert_eq!(ops_from_pb(&ops).unwrap_err().field, "operations[0]");
        let ops = vec![pb::Operation {
            op: Some(pb::operation::Op::PutSubnet(pb::Subnet {
                id: "s".into(),
                vpc_id: "v".into(),
                cidr_v4: "10.0.0.1/8".into(),
                cidr_v6: String::new(),
            })),
        }];
        let e = ops_from_pb(&ops).unwrap_err();
        assert_eq!(e.field, "operations[0].put_subnet.cidr_v4");
        assert!(e.message.contains("host bits"));
    }

    /// Every kind goes through the API's listing and back unchanged.
    #[test]
    fn a_listing_reads_back_as_the_state_it_lists() {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gov-cloud"));
        let l7 = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/http-listeners.yaml"));
        let mut ops: Vec<m::Op> = crate::manifest::dependency_order(crate::manifest::load_path(&dir).unwrap())
            .into_iter()
            .chain(crate::manifest::dependency_order(
                crate::manifest::load_path(&l7).unwrap(),
            ))
            .map(|l| l.op)
            .collect();
        ops.push(m::Op::PutQuarantine(m::Quarantine {
            id: "q".into(),
            target: m::QuarantineTarget::Vm,
            target_id: "portal-2".into(),
            reason: "incident 7".into(),
            expires_unix_ms: Some(1),
        }));
        let mut state = m::State::default();
        state.apply_batch(&ops).unwrap();
        let listed = list_to_pb(&state, None, 7);
        assert_eq!(listed.revision, 7);
        let mut again = m::State::default();
        let mut back = list_from_pb(&listed).unwrap();
        back.sort_by_key(|o| o.order());
        again.apply_batch(&back).unwrap();
        for k in m::Kind::ALL {
            assert!(
                state.objects().any(|o| o.kind() == *k),
                "no {} in the listing's test",
                k.name()
            );
        }
        // A certificate is listed without its key, and is otherwise the same.
        let keyless = |s: &m::State| -> Vec<m::Object> {
            s.objects()
                .map(|o| match o {
                    m::Object::Certificate(mut c) => {
                        c.key_pem.clear();
                        m::Object::Certificate(c)
                    }
                    o => o,
                })
                .collect()
        };
        assert!(listed.certificates.iter().all(|c| c.key_pem.is_empty()) && !listed.certificates.is_empty());
        assert!(again.certificates.values().all(|c| c.key_pem.is_empty()));
        assert_eq!(keyless(&state), keyless(&again));
        // Through the operations too, every kind's put and a delete: a put
        // carries the key.
        let pb_ops: Vec<pb::Operation> = ops.iter().map(op_to_pb).collect();
        assert_eq!(ops_from_pb(&pb_ops).unwrap(), ops);
        let delete = m::Op::Delete {
            kind: m::Kind::SecurityGroup,
            id: "portal-web".into(),
        };
        assert_eq!(ops_from_pb(&[op_to_pb(&delete)]).unwrap(), vec![delete]);
        // One kind only.
        let groups = list_to_pb(&state, Some(m::Kind::SecurityGroup), 7);
        assert_eq!(groups.security_groups.len(), state.security_groups.len());
        assert!(groups.ports.is_empty() && groups.tenants.is_empty());
    }

    #[test]
    fn round_trip() {
        let g = m::SecurityGroup {
            id: "g".into(),
            tenant_id: "t".into(),
            name: "web".into(),
            rules: vec![m::Rule {
                id: "r".into(),
                direction: m::Direction::Egress,
                ether_type: m::EtherType::IPv6,
                protocol: m::Protocol::Udp,
                ports: Some((53, 53)),
                remote: m::Remote::Cidr("fd00::/8".parse().unwrap()),
            }],
        };
        let pb = op_to_pb(&m::Op::PutSecurityGroup(g.clone()));
        assert_eq!(ops_from_pb(&[pb]).unwrap(), vec![m::Op::PutSecurityGroup(g)]);
    }
}
