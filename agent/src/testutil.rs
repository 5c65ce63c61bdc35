//! Helpers for tests and benchmarks that need the kernel: a private bpffs
//! mount removed on drop, and a loaded dataplane with a policy in place.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A bpffs mounted on a fresh directory; unmounted and removed on drop.
pub struct BpffsMount {
    path: PathBuf,
}

impl BpffsMount {
    pub fn new(tag: &str) -> anyhow::Result<BpffsMount> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sdn-bpffs-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .context("running mount")?;
        if !st.success() {
            let _ = std::fs::remove_dir(&path);
            anyhow::bail!("mount -t bpf failed on {} (root needed)", path.display());
        }
        Ok(BpffsMount { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether this process may load eBPF programs (root with CAP_BPF).
pub fn can_load_bpf() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

// ---------------------------------------------------------------------------
// The load balancer's share, for its kernel tests and benchmark.

use crate::compile::Resources;
use sdn_proto::v1 as pb;

fn lb_resource(name: &str, kind: pb::resource::Kind) -> (String, pb::Resource) {
    (
        name.to_string(),
        pb::Resource {
            name: name.into(),
            version: "1".into(),
            kind: Some(kind),
        },
    )
}

/// A share for load-balancer tests: the client's port on `lo` (the test run's device) and two members on
/// this host, one security group admitting TCP 8080, and a load balancer
/// whose listener `scheduler` spreads TCP 80 over the members' 8080.
pub fn lb_share(scheduler: &str) -> Resources {
    let mut r = Resources::new();
    let ports = [
        ("p", "lo", "10.0.0.1", 1),
        ("m1", "d2", "10.0.0.2", 2),
        ("m2", "d3", "10.0.0.3", 3),
    ];
    for (id, dev, ip, n) in ports {
        let mac = format!("02:00:00:00:00:{n:02x}");
        let (k, v) = lb_resource(
            &format!("port/{id}"),
            pb::resource::Kind::Port(pb::Port {
                id: id.into(),
                subnet_id: "s".into(),
                device: dev.into(),
                mac: mac.clone(),
                ipv4: ip.into(),
                security_group_ids: vec!["g".into()],
                host_id: "h".into(),
                ..Default::default()
            }),
        );
        r.insert(k, v);
        let (k, v) = lb_resource(
            &format!("endpoint/{id}"),
            pb::resource::Kind::Endpoint(pb::Endpoint {
                port_id: id.into(),
                mac,
                ipv4: ip.into(),
                host_id: "h".into(),
                host_underlay_ip: "192.0.2.1".into(),
                vpc_id: "v".into(),
                ..Default::default()
            }),
        );
        r.insert(k, v);
    }
    let (k, v) = lb_resource(
        "vpc/v",
        pb::resource::Kind::VpcNetwork(pb::VpcNetwork {
            vpc_id: "v".into(),
            vni: 7,
            gateways: vec![pb::SubnetGateway {
                subnet_id: "s".into(),
                gateway_v4: "10.0.0.254".into(),
                gateway_v6: String::new(),
            }],
            ..Default::default()
        }),
    );
    r.insert(k, v);
    let (k, v) = lb_resource(
        "sg/g",
        pb::resource::Kind::SecurityGroup(pb::SecurityGroup {
            id: "g".into(),
            rules: vec![pb::SecurityGroupRule {
                id: "web".into(),
                direction: pb::Direction::Ingress as i32,
                ether_type: pb::EtherType::Ipv4 as i32,
                protocol: pb::Protocol::Tcp as i32,
                port_min: 8080,
                port_max: 8080,
                remote_cidr: String::new(),
                remote_group_id: String::new(),
            }],
            ..Default::default()
        }),
    );
    r.insert(k, v);
    let backends = ["m1", "m2"]
        .iter()
        .enumerate()
        .map(|(i, id)| pb::BackendOnHost {
            member_id: id.to_string(),
            addresses: vec![format!("10.0.0.{}", i + 2)],
            port: 8080,
            weight: 1,
            state: "enabled".into(),
            ..Default::default()
        })
        .collect();
    let (k, v) = lb_resource(
        "lb/lb",
        pb::resource::Kind::LoadBalancer(pb::LoadBalancerOnHost {
            load_balancer: Some(pb::LoadBalancer {
                id: "lb".into(),
                vip_v4: "10.0.0.100".into(),
                ..Default::default()
            }),
            vni: 7,
            listeners: vec![pb::ListenerOnHost {
                listener: Some(pb::Listener {
                    id: "l".into(),
                    protocol: "tcp".into(),
                    port: 80,
                    scheduler: scheduler.into(),
                    ..Default::default()
                }),
                backends,
                health: None,
            }],
            ..Default::default()
        }),
    );
    r.insert(k, v);
    r
}

/// A TCP packet from the client port of [`lb_share`] to `dst`: a SYN, or
/// an ACK.
pub fn lb_tcp(dst: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let mut v = Vec::new();
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0xfe])
        .ipv4([10, 0, 0, 1], dst, 64)
        .tcp(sport, dport, 1, 1024);
    let b = if syn { b.syn() } else { b.ack(1) };
    b.write(&mut v, &[]).unwrap();
    v
}

/// A FIN (with its ACK) from the client port of [`lb_share`] to `dst`.
pub fn lb_tcp_fin(dst: [u8; 4], sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 0xfe])
        .ipv4([10, 0, 0, 1], dst, 64)
        .tcp(sport, dport, 1, 1024)
        .ack(1)
        .fin()
        .write(&mut v, &[])
        .unwrap();
    v
}
