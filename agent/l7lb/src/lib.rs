//! The L7 load balancer: an HTTP/1.1 and HTTP/2 reverse proxy on hyper,
//! with TLS by BoringSSL (`tokio-boring`) choosing certificates by SNI.
//! Requests are matched against each listener's forwarding rules (host,
//! path prefix or regular expression, header, method) in order, and go to
//! a pool's members (round robin, smooth weighted round robin, least
//! connections, or a consistent hash of a header or cookie; cookie
//! persistence inserted or learned), or are answered with a redirect or a
//! fixed response. The agent runs one per load balancer host and writes
//! its configuration ([`config::Config`]).

pub mod config;
pub mod guard;
pub mod health;
pub mod pp;
pub mod proxy;
pub mod sched;
pub mod tls;
pub mod upgrade;
