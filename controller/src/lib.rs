//! The controller: provisioning API, replicated store, per-host slices,
//! watch fan-out and audit.

pub mod auth;
pub mod cluster;
pub use sdn_policies::convert;
pub mod enforcement;
pub mod events;
pub mod metrics;
pub mod refusals;
pub mod serve;
pub mod service;
pub mod shares;
pub mod slice;
pub mod store;
pub mod topology;
pub mod usage;
pub mod vips;
pub mod web;
