//! The host agent: watches its host's share of the state and enforces it in
//! the kernel with eBPF.

pub mod compile;
pub mod dataplane;
pub mod events;
pub mod flows;
pub mod health;
pub mod l7;
pub mod metrics;
pub mod mirror;
pub mod natsync;
pub mod overlay;
pub mod proxies;
pub mod reconcile;
pub mod records;
pub mod testrun;
pub mod testutil;
pub mod usage;
pub mod vips;
pub mod vrrp;
pub mod watch;
