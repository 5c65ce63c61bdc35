//! The test topology: network namespaces as hosts and VMs, a routed underlay
//! between hosts, and real controller and agent processes. Every namespace,
//! process and mount is owned by a guard that removes it on drop, so a failing
//! test leaves nothing behind.
//!
//! The tree reads as the layers: `shell` (commands, binaries, waiting),
//! `netns`, `proc` and `bpffs` (the guards), `topology` (hosts, zones and
//! VMs as namespaces), `cluster` (a controller and its agents), `ops` (the
//! provisioning messages), `lab` (all of it declared in one place), and
//! apart: `replicas` (a controller cluster of processes), `etcd` and
//! `linearizability` for the cluster tests and benchmarks.

mod bpffs;
mod netns;
mod proc;
mod shell;
mod topology;

pub mod browser;
pub mod cluster;
pub mod etcd;
pub mod keepalived;
pub mod lab;
pub mod linearizability;
pub mod ops;
pub mod pki;
pub mod pyclient;
pub mod replicas;
pub mod scrape;
pub mod supervisor;

pub use bpffs::Bpffs;
pub use netns::{enter_netns, Netns};
pub use proc::Proc;
pub use shell::{bin, bin_dir, free_port, ns_sh, privileged, sh, wait_for};
pub use topology::{Topology, Vm};
