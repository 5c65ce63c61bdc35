//! Flow records over IPFIX (RFC 7011): [`ipfix`] writes messages,
//! [`record`] is what an agent puts in them (IANA's elements and the
//! cloud's own, under the deployment's private enterprise number), and
//! [`protocol`] holds the protocol records (DNS answers, TCP connections),
//! and [`exporter`] sends them to a collector over UDP or TCP.

pub mod exporter;
pub mod ipfix;
pub mod protocol;
pub mod record;
