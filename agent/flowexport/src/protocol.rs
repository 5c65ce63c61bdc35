//! Protocol records over IPFIX (beside the flow records): DNS answers and
//! TCP connections, each in a template of its own per address family, with
//! their own fields as enterprise elements under the deployment's PEN.

use std::net::IpAddr;

use crate::ipfix::{Field, Message, Template, Value, VARLEN};
use crate::record::{enterprise, RecordError};

/// Templates of DNS answers (IPv4, IPv6) and TCP connections (IPv4, IPv6).
pub const TEMPLATE_DNS_V4: u16 = 258;
pub const TEMPLATE_DNS_V6: u16 = 259;
pub const TEMPLATE_TCP_V4: u16 = 260;
pub const TEMPLATE_TCP_V6: u16 = 261;

/// The enterprise elements of protocol records, by id under the PEN.
pub mod elements {
    /// The collecting node (string).
    pub const NODE: u16 = 7;
    /// The query's name (string).
    pub const DNS_QUERY_NAME: u16 = 20;
    /// The query's type (unsigned16, as DNS numbers it).
    pub const DNS_QUERY_TYPE: u16 = 21;
    /// The response code (unsigned8, as DNS numbers it).
    pub const DNS_RESPONSE_CODE: u16 = 22;
    /// The number of answers (unsigned16).
    pub const DNS_ANSWER_COUNT: u16 = 23;
    /// The answers, `TYPE TTL DATA` separated by `; ` (string).
    pub const DNS_ANSWERS: u16 = 24;
    /// The smallest TTL of the answers (unsigned32; 0 without answers).
    pub const DNS_MIN_TTL: u16 = 25;
    /// How a TCP connection ended (unsigned8: 1 closed by FIN or RST, 2
    /// timed out).
    pub const TCP_STATE: u16 = 30;
    /// Connections from the same client to the same service that ended
    /// together (unsigned32).
    pub const TCP_CONNECTIONS: u16 = 31;
}

/// A DNS answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DnsAnswerRecord {
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    /// Unix milliseconds.
    pub time_ms: u64,
    pub node: String,
    pub tenant: String,
    pub vpc: String,
    pub port: String,
    pub query: String,
    pub query_type: u16,
    pub rcode: u8,
    pub answer_count: u16,
    pub answers: String,
    pub min_ttl: u32,
}

/// A TCP connection that ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TcpConnectionRecord {
    pub client: IpAddr,
    pub client_port: u16,
    pub server: IpAddr,
    pub server_port: u16,
    /// Unix milliseconds: its first packet, its last.
    pub first_ms: u64,
    pub last_ms: u64,
    pub packets: u64,
    pub octets: u64,
    /// 1 closed (FIN or RST), 2 timed out.
    pub state: u8,
    pub connections: u32,
    pub node: String,
    pub tenant: String,
    pub vpc: String,
    pub port: String,
}

/// The four templates of protocol records under `pen`.
pub fn templates(pen: u32) -> [Template; 4] {
    let e = |id: u16, len: u16| Field::enterprise(pen, id, len);
    let dns = |id: u16, addr: (u16, u16), len: u16| Template {
        id,
        fields: vec![
            Field::iana(addr.0, len),
            Field::iana(addr.1, len),
            Field::iana(7, 2),   // sourceTransportPort (the server's)
            Field::iana(11, 2),  // destinationTransportPort (the client's)
            Field::iana(4, 1),   // protocolIdentifier
            Field::iana(152, 8), // flowStartMilliseconds: when the answer passed
            e(elements::NODE, VARLEN),
            e(enterprise::TENANT, VARLEN),
            e(enterprise::VPC, VARLEN),
            e(enterprise::PORT, VARLEN),
            e(elements::DNS_QUERY_NAME, VARLEN),
            e(elements::DNS_QUERY_TYPE, 2),
            e(elements::DNS_RESPONSE_CODE, 1),
            e(elements::DNS_ANSWER_COUNT, 2),
            e(elements::DNS_ANSWERS, VARLEN),
            e(elements::DNS_MIN_TTL, 4),
        ],
    };
    let tcp = |id: u16, addr: (u16, u16), len: u16| Template {
        id,
        fields: vec![
            Field::iana(addr.0, len),
            Field::iana(addr.1, len),
            Field::iana(7, 2),   // sourceTransportPort (the client's)
            Field::iana(11, 2),  // destinationTransportPort (the service's)
            Field::iana(4, 1),   // protocolIdentifier
            Field::iana(152, 8), // flowStartMilliseconds: the first packet
            Field::iana(153, 8), // flowEndMilliseconds: the last
            Field::iana(2, 8),   // packetDeltaCount: both directions
            Field::iana(1, 8),   // octetDeltaCount: both directions
            e(elements::TCP_STATE, 1),
            e(elements::TCP_CONNECTIONS, 4),
            e(elements::NODE, VARLEN),
            e(enterprise::TENANT, VARLEN),
            e(enterprise::VPC, VARLEN),
            e(enterprise::PORT, VARLEN),
        ],
    };
    [
        dns(TEMPLATE_DNS_V4, (8, 12), 4),
        dns(TEMPLATE_DNS_V6, (27, 28), 16),
        tcp(TEMPLATE_TCP_V4, (8, 12), 4),
        tcp(TEMPLATE_TCP_V6, (27, 28), 16),
    ]
}

fn addresses<'a>(
    a: IpAddr,
    b: IpAddr,
    t: [&'a Template; 2],
) -> Result<(Value<'a>, Value<'a>, &'a Template), RecordError> {
    match (a, b) {
        (IpAddr::V4(a), IpAddr::V4(b)) => Ok((Value::V4(a), Value::V4(b), t[0])),
        (IpAddr::V6(a), IpAddr::V6(b)) => Ok((Value::V6(a), Value::V6(b), t[1])),
        (a, b) => Err(RecordError::Families(a, b)),
    }
}

impl DnsAnswerRecord {
    /// Puts the record into `m` (`templates` from [`templates`]):
    /// `Ok(false)` when `m` is full.
    pub fn add_to(&self, m: &mut Message, templates: &[Template; 4]) -> Result<bool, RecordError> {
        let (src, dst, t) = addresses(self.server, self.client, [&templates[0], &templates[1]])?;
        let values = [
            src,
            dst,
            Value::U16(self.server_port),
            Value::U16(self.client_port),
            Value::U8(17),
            Value::U64(self.time_ms),
            Value::Str(&self.node),
            Value::Str(&self.tenant),
            Value::Str(&self.vpc),
            Value::Str(&self.port),
            Value::Str(&self.query),
            Value::U16(self.query_type),
            Value::U8(self.rcode),
            Value::U16(self.answer_count),
            Value::Str(&self.answers),
            Value::U32(self.min_ttl),
        ];
        Ok(m.add_record(t, &values)?)
    }
}

impl TcpConnectionRecord {
    /// Puts the record into `m` (`templates` from [`templates`]):
    /// `Ok(false)` when `m` is full.
    pub fn add_to(&self, m: &mut Message, templates: &[Template; 4]) -> Result<bool, RecordError> {
        let (src, dst, t) = addresses(self.client, self.server, [&templates[2], &templates[3]])?;
        let values = [
            src,
            dst,
            Value::U16(self.client_port),
            Value::U16(self.server_port),
            Value::U8(6),
            Value::U64(self.first_ms),
            Value::U64(self.last_ms),
            Value::U64(self.packets),
            Value::U64(self.octets),
            Value::U8(self.state),
            Value::U32(self.connections),
            Value::Str(&self.node),
            Value::Str(&self.tenant),
            Value::Str(&self.vpc),
            Value::Str(&self.port),
        ];
        Ok(m.add_record(t, &values)?)
    }
}

/// Every template an exporter announces: the flow records' and the
/// protocol records'.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Templates {
    pub flow: [Template; 4],
    pub protocol: [Template; 4],
}

impl Templates {
    pub fn new(pen: u32) -> Templates {
        Templates {
            flow: crate::record::templates(pen),
            protocol: templates(pen),
        }
    }

    /// All of them, in order.
    pub fn list(&self) -> Vec<Template> {
        self.flow.iter().chain(self.protocol.iter()).cloned().collect()
    }
}

/// Any record an exporter sends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    Flow(crate::record::FlowRecord),
    Dns(DnsAnswerRecord),
    Tcp(TcpConnectionRecord),
}

/// What an exporter can put in a message.
pub trait Exportable {
    /// Puts the record into `m`: `Ok(false)` when `m` is full.
    fn add(&self, m: &mut Message, t: &Templates) -> Result<bool, RecordError>;
}

impl Exportable for crate::record::FlowRecord {
    fn add(&self, m: &mut Message, t: &Templates) -> Result<bool, RecordError> {
        self.add_to(m, &t.flow)
    }
}

impl Exportable for Record {
    fn add(&self, m: &mut Message, t: &Templates) -> Result<bool, RecordError> {
        match self {
            Record::Flow(r) => r.add_to(m, &t.flow),
            Record::Dns(r) => r.add_to(m, &t.protocol),
            Record::Tcp(r) => r.add_to(m, &t.protocol),
        }
    }
}
