//! Builders for provisioning messages.

use pb::operation::Op;
use sdn_proto::v1 as pb;

pub fn tenant(id: &str) -> Op {
    Op::PutTenant(pb::Tenant {
        id: id.into(),
        name: id.into(),
    })
}
pub fn vpc(id: &str, tenant: &str) -> Op {
    vpc_vni(id, tenant, 0)
}
pub fn vpc_vni(id: &str, tenant: &str, vni: u32) -> Op {
    Op::PutVpc(pb::Vpc {
        id: id.into(),
        tenant_id: tenant.into(),
        name: id.into(),
        vni,
        zone_id: String::new(),
        border_policy_id: String::new(),
    })
}
/// A VPC attached to a zone's uplink.
pub fn vpc_in_zone(id: &str, tenant: &str, zone: &str) -> Op {
    Op::PutVpc(pb::Vpc {
        id: id.into(),
        tenant_id: tenant.into(),
        name: id.into(),
        vni: 0,
        zone_id: zone.into(),
        border_policy_id: String::new(),
    })
}
pub fn zone(id: &str, prefixes: &[&str], uplink: &str) -> Op {
    Op::PutZone(pb::Zone {
        id: id.into(),
        name: id.into(),
        prefixes: prefixes.iter().map(|p| p.to_string()).collect(),
        uplink_device: uplink.into(),
        ..Default::default()
    })
}
/// An exchange path for TCP to `ports`.
pub fn exchange(id: &str, from: &str, to: &str, src: &str, dst: &str, ports: (u32, u32)) -> Op {
    Op::PutExchangePath(pb::ExchangePath {
        id: id.into(),
        from_zone: from.into(),
        to_zone: to.into(),
        source_cidr: src.into(),
        destination_cidr: dst.into(),
        protocol: pb::Protocol::Tcp as i32,
        port_min: ports.0,
        port_max: ports.1,
        ..Default::default()
    })
}
/// An exchange path marked broad (every source, say), with the reason
/// the audit records.
pub fn broad(op: Op, reason: &str) -> Op {
    match op {
        Op::PutExchangePath(x) => Op::PutExchangePath(pb::ExchangePath {
            broad: true,
            broad_reason: reason.into(),
            ..x
        }),
        other => other,
    }
}
pub fn subnet(id: &str, vpc: &str, v4: &str, v6: &str) -> Op {
    Op::PutSubnet(pb::Subnet {
        id: id.into(),
        vpc_id: vpc.into(),
        cidr_v4: v4.into(),
        cidr_v6: v6.into(),
    })
}
pub fn host(id: &str, ip: &str) -> Op {
    Op::PutHost(pb::Host {
        id: id.into(),
        underlay_ip: ip.into(),
    })
}
#[allow(clippy::too_many_arguments)]
pub fn port(
    id: &str,
    tenant: &str,
    subnet: &str,
    host: &str,
    device: &str,
    mac: &str,
    v4: &str,
    v6: &str,
    groups: &[&str],
) -> Op {
    Op::PutPort(pb::Port {
        id: id.into(),
        tenant_id: tenant.into(),
        subnet_id: subnet.into(),
        host_id: host.into(),
        device: device.into(),
        mac: mac.into(),
        ipv4: v4.into(),
        ipv6: v6.into(),
        security_group_ids: groups.iter().map(|g| g.to_string()).collect(),
        vm_id: String::new(),
    })
}
pub fn group(id: &str, tenant: &str, rules: Vec<pb::SecurityGroupRule>) -> Op {
    Op::PutSecurityGroup(pb::SecurityGroup {
        id: id.into(),
        tenant_id: tenant.into(),
        name: id.into(),
        rules,
    })
}
/// Security-group rules admitting everything, both families.
pub fn open_rules() -> Vec<pb::SecurityGroupRule> {
    vec![
        ingress("all4", false, "any", (0, 0), "", ""),
        ingress("all6", true, "any", (0, 0), "", ""),
    ]
}

/// A firewall rule; `what` is "<allow|deny> <in|out> <v4|v6>".
pub fn fw_rule(id: &str, priority: u32, what: &str, proto: &str, ports: (u32, u32), cidr: &str) -> pb::FirewallRule {
    let w: Vec<&str> = what.split(' ').collect();
    let r = ingress(id, w[2] == "v6", proto, ports, cidr, "");
    pb::FirewallRule {
        id: r.id,
        priority,
        action: if w[0] == "allow" {
            pb::Action::Allow
        } else {
            pb::Action::Deny
        } as i32,
        direction: if w[1] == "out" {
            pb::Direction::Egress
        } else {
            pb::Direction::Ingress
        } as i32,
        ether_type: r.ether_type,
        protocol: r.protocol,
        port_min: r.port_min,
        port_max: r.port_max,
        remote_cidr: r.remote_cidr,
    }
}

/// An ingress rule: "tcp", "udp", "icmp", "icmpv6" or "any"; v6 picks the family.
pub fn ingress(
    id: &str,
    v6: bool,
    proto: &str,
    ports: (u32, u32),
    cidr: &str,
    remote_group: &str,
) -> pb::SecurityGroupRule {
    let protocol = match proto {
        "tcp" => pb::Protocol::Tcp,
        "udp" => pb::Protocol::Udp,
        "icmp" => pb::Protocol::Icmp,
        "icmpv6" => pb::Protocol::Icmpv6,
        _ => pb::Protocol::Any,
    };
    pb::SecurityGroupRule {
        id: id.into(),
        direction: pb::Direction::Ingress as i32,
        ether_type: if v6 { pb::EtherType::Ipv6 } else { pb::EtherType::Ipv4 } as i32,
        protocol: protocol as i32,
        port_min: ports.0,
        port_max: ports.1,
        remote_cidr: cidr.into(),
        remote_group_id: remote_group.into(),
    }
}

/// A mirror session of `scope` ("port:vm1", "vpc:v", "tenant:t",
/// "zone:z" or "" for every port), both directions, every packet.
pub fn mirror(id: &str, scope: &str, destination: pb::mirror_session::Destination) -> pb::MirrorSession {
    let (what, target) = scope.split_once(':').unwrap_or(("", ""));
    let pick = |w: &str| if what == w { target.to_string() } else { String::new() };
    pb::MirrorSession {
        id: id.into(),
        zone_id: pick("zone"),
        tenant_id: pick("tenant"),
        vpc_id: pick("vpc"),
        port_id: pick("port"),
        rules: vec![],
        direction: "both".into(),
        sample: 0,
        snap_len: 0,
        rate_pps: 0,
        destination: Some(destination),
    }
}
/// To a tap port.
pub fn to_tap(port: &str, vni: u32) -> pb::mirror_session::Destination {
    pb::mirror_session::Destination::Tap(pb::MirrorTap {
        port_id: port.into(),
        vni,
    })
}
/// To an ERSPAN collector.
pub fn to_erspan(remote: &str, version: u32, session: u32) -> pb::mirror_session::Destination {
    pb::mirror_session::Destination::Erspan(pb::MirrorErspan {
        remote: remote.into(),
        version,
        session,
    })
}
/// To a VXLAN collector.
pub fn to_vxlan(remote: &str, vni: u32, port: u32) -> pb::mirror_session::Destination {
    pb::mirror_session::Destination::Vxlan(pb::MirrorVxlan {
        remote: remote.into(),
        vni,
        port,
    })
}
pub fn put_mirror(m: pb::MirrorSession) -> Op {
    Op::PutMirrorSession(m)
}

/// A load balancer in `vpc` with an IPv4 and/or IPv6 VIP ("" for none),
/// exposed to its VPC.
pub fn load_balancer(id: &str, tenant: &str, vpc: &str, v4: &str, v6: &str) -> pb::LoadBalancer {
    pb::LoadBalancer {
        id: id.into(),
        tenant_id: tenant.into(),
        vpc_id: vpc.into(),
        name: id.into(),
        vip_v4: v4.into(),
        vip_v6: v6.into(),
        exposure: "vpc".into(),
        nat_hosts: vec![],
    }
}
/// `lb` exposed to its VPC's zone, translated on `host` from `source`.
pub fn exposed(lb: pb::LoadBalancer, host: &str, source: &str) -> pb::LoadBalancer {
    pb::LoadBalancer {
        exposure: "zone".into(),
        nat_hosts: vec![pb::NatHost {
            host_id: host.into(),
            ipv4: source.into(),
            ipv6: String::new(),
        }],
        ..lb
    }
}
/// A virtual IP of `vpc` held by `holders` (a port's or a host's id, as
/// `by_host` says, and its priority).
pub fn virtual_ip(
    id: &str,
    tenant: &str,
    vpc: &str,
    v4: &str,
    vrid: u32,
    by_host: bool,
    holders: &[(&str, u32)],
) -> Op {
    Op::PutVirtualIp(pb::VirtualIp {
        id: id.into(),
        tenant_id: tenant.into(),
        vpc_id: vpc.into(),
        name: id.into(),
        ipv4: v4.into(),
        ipv6: String::new(),
        vrid,
        holders: holders
            .iter()
            .map(|(h, priority)| pb::VipHolder {
                port_id: if by_host { String::new() } else { h.to_string() },
                host_id: if by_host { h.to_string() } else { String::new() },
                priority: *priority,
            })
            .collect(),
        no_preempt: false,
        advert_interval_cs: 0,
        ..Default::default()
    })
}
pub fn put_lb(lb: pb::LoadBalancer) -> Op {
    Op::PutLoadBalancer(lb)
}
pub fn pool(id: &str, lb: &str) -> Op {
    Op::PutPool(pb::Pool {
        id: id.into(),
        load_balancer_id: lb.into(),
        name: id.into(),
        health: None,
        drain_secs: 0,
    })
}
pub fn listener(id: &str, lb: &str, protocol: &str, port: u32, pool: &str, scheduler: &str) -> Op {
    Op::PutListener(pb::Listener {
        id: id.into(),
        load_balancer_id: lb.into(),
        protocol: protocol.into(),
        port,
        pool_id: pool.into(),
        scheduler: scheduler.into(),
        persistence_secs: 0,
    })
}
/// A member of `pool`: the port `port_id`, or the address `address`.
pub fn member(id: &str, pool: &str, port_id: &str, address: &str, weight: u32) -> Op {
    Op::PutMember(pb::PoolMember {
        id: id.into(),
        pool_id: pool.into(),
        port_id: port_id.into(),
        address: address.into(),
        port: 0,
        weight,
        state: String::new(),
        ..Default::default()
    })
}
pub fn delete(kind: pb::Kind, id: &str) -> Op {
    Op::Delete(pb::ObjectRef {
        kind: kind as i32,
        id: id.into(),
    })
}
/// A certificate of `tenant` from PEM text.
pub fn certificate(id: &str, tenant: &str, cert_pem: &str, key_pem: &str) -> Op {
    Op::PutCertificate(pb::Certificate {
        id: id.into(),
        tenant_id: tenant.into(),
        name: id.into(),
        cert_pem: cert_pem.into(),
        key_pem: key_pem.into(),
        ..Default::default()
    })
}
/// An HTTP listener of `lb` on `port` with a default pool, run on
/// `proxy_ports`; HTTPS when it has certificates.
pub fn http_listener(
    id: &str,
    lb: &str,
    port: u32,
    pool: &str,
    certificates: &[&str],
    proxy_ports: &[&str],
) -> pb::HttpListener {
    pb::HttpListener {
        id: id.into(),
        load_balancer_id: lb.into(),
        protocol: if certificates.is_empty() { "http" } else { "https" }.into(),
        port,
        certificate_ids: certificates.iter().map(|c| c.to_string()).collect(),
        pool_id: pool.into(),
        proxy_ports: proxy_ports.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    }
}
/// A self-signed certificate for `names` (the first as its common name),
/// made by openssl: its PEM and its key's.
pub fn self_signed(names: &[&str]) -> (String, String) {
    static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sdn-self-signed-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (crt, key) = (dir.join("c.pem"), dir.join("k.pem"));
    let san: Vec<String> = names.iter().map(|n| format!("DNS:{n}")).collect();
    let out = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-days",
            "30",
            "-nodes",
        ])
        .arg("-subj")
        .arg(format!("/CN={}", names[0]))
        .arg("-addext")
        .arg(format!("subjectAltName={}", san.join(",")))
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt)
        .output()
        .expect("openssl runs");
    let made = (std::fs::read_to_string(&crt), std::fs::read_to_string(&key));
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (made.0.unwrap(), made.1.unwrap())
}
