//! Virtual IPs checked: an address of its VPC that nothing else takes (or,
//! held by hosts, a VIP of a load balancer those hosts translate for), held
//! by the VPC's own ports or the load balancer's NAT hosts, each with a
//! priority of its own; and nothing a virtual IP uses is taken away.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::*;
use crate::state::{BatchError, Ctx, State};

/// Virtual IPs of one VPC, at most (one per VRRP router id).
pub const VIP_PER_VPC_MAX: usize = 255;
/// The longest VRRP advertisement interval (12 bits of centiseconds).
pub const VIP_ADVERT_INTERVAL_CS_MAX: u16 = 4095;

impl State {
    pub(crate) fn put_virtual_ip(&mut self, c: &Ctx, v: &VirtualIp) -> Result<(), BatchError> {
        check_id(&v.id).map_err(|m| c.err("id", m))?;
        // A grant is merged here, at apply time, with the virtual IP as it
        // is now: it never brings back one deleted since, nor goes to a
        // holder removed since; and a put never loses a grant committed
        // before it.
        if v.claim {
            let old = self
                .virtual_ips
                .get(&v.id)
                .ok_or_else(|| c.err("id", format!("virtual ip {} is gone", v.id)))?;
            let holder = v
                .owner
                .as_ref()
                .filter(|o| old.holders.iter().any(|h| &h.target == *o))
                .ok_or_else(|| c.err("owner", format!("the claimant no longer holds virtual ip {}", v.id)))?;
            let mut kept = old.clone();
            kept.epoch = old.epoch + 1;
            kept.owner = Some(holder.clone());
            kept.owner_since_unix_ms = v.owner_since_unix_ms;
            kept.owner_lease_ms = v.owner_lease_ms;
            self.replace(Kind::VirtualIp, &v.id, Some(Object::VirtualIp(kept)));
            return Ok(());
        }
        let mut merged = v.clone();
        let old = self.virtual_ips.get(&v.id);
        merged.epoch = old.map_or(0, |o| o.epoch);
        // The owner stays while it holds the virtual IP.
        merged.owner = old
            .and_then(|o| o.owner.clone())
            .filter(|o| v.holders.iter().any(|h| &h.target == o));
        (merged.owner_since_unix_ms, merged.owner_lease_ms) = match merged.owner {
            Some(_) => old.map_or((0, 0), |o| (o.owner_since_unix_ms, o.owner_lease_ms)),
            None => (0, 0),
        };
        let v = &merged;
        if !self.tenants.contains_key(&v.tenant_id) {
            return Err(c.err("tenant_id", format!("unknown tenant {:?}", v.tenant_id)));
        }
        // Another tenant's VPC reads as one that does not exist.
        let vpc = self
            .vpcs
            .get(&v.vpc_id)
            .filter(|x| x.tenant_id == v.tenant_id)
            .ok_or_else(|| c.err("vpc_id", format!("tenant {} has no vpc {:?}", v.tenant_id, v.vpc_id)))?;
        if let Some(old) = self.virtual_ips.get(&v.id) {
            if old.vpc_id != v.vpc_id || old.tenant_id != v.tenant_id {
                return Err(c.err(
                    "vpc_id",
                    format!(
                        "virtual ip {} is in vpc {} of tenant {}; it cannot move",
                        v.id, old.vpc_id, old.tenant_id
                    ),
                ));
            }
        }
        let in_vpc = 1 + self
            .virtual_ips
            .values()
            .filter(|o| o.vpc_id == v.vpc_id && o.id != v.id)
            .count();
        if in_vpc > VIP_PER_VPC_MAX {
            return Err(c.err(
                "vpc_id",
                format!(
                    "vpc {} would have {in_vpc} virtual ips, at most {VIP_PER_VPC_MAX}",
                    v.vpc_id
                ),
            ));
        }
        if v.ipv4.is_none() && v.ipv6.is_none() {
            return Err(c.err("ipv4", "a virtual ip needs an IPv4 address, an IPv6 address or both"));
        }
        if v.vrid == 0 {
            return Err(c.err("vrid", "0 is not a VRRP virtual router id (1 to 255)"));
        }
        if v.advert_interval_cs == 0 || v.advert_interval_cs > VIP_ADVERT_INTERVAL_CS_MAX {
            return Err(c.err(
                "advert_interval_cs",
                format!(
                    "{} centiseconds is outside 1 to {VIP_ADVERT_INTERVAL_CS_MAX}",
                    v.advert_interval_cs
                ),
            ));
        }
        if v.holders.is_empty() {
            return Err(c.err("holders", "a virtual ip needs at least one holder"));
        }
        if v.holders.len() > VIP_HOLDERS_MAX {
            return Err(c.err("holders", format!("more than {VIP_HOLDERS_MAX} holders")));
        }
        let by_host = v.host_held();
        let mut targets = BTreeSet::new();
        let mut priorities: Vec<(u8, usize)> = Vec::new();
        for (i, h) in v.holders.iter().enumerate() {
            let at = |f: &str| format!("holders[{i}].{f}");
            let field = match h.target {
                VipHolderTarget::Port(_) => "port_id",
                VipHolderTarget::Host(_) => "host_id",
            };
            if matches!(h.target, VipHolderTarget::Host(_)) != by_host {
                return Err(c.err(
                    &at(field),
                    "a virtual ip's holders are all ports or all hosts".to_string(),
                ));
            }
            if !(1..=254).contains(&h.priority) {
                return Err(c.err(
                    &at("priority"),
                    format!(
                        "{} is outside 1 to 254 (255 is VRRP's address owner, 0 its resignation)",
                        h.priority
                    ),
                ));
            }
            if let Some((_, j)) = priorities.iter().find(|(p, _)| *p == h.priority) {
                return Err(c.err(
                    &at("priority"),
                    format!(
                        "holders[{j}] has priority {} too: each holder needs its own, or the election depends on addresses",
                        h.priority
                    ),
                ));
            }
            priorities.push((h.priority, i));
            if !targets.insert(&h.target) {
                return Err(c.err(&at(field), format!("{} is listed twice", h.target.describe())));
            }
            match &h.target {
                VipHolderTarget::Port(id) => {
                    // Another tenant's port reads as one that does not exist.
                    if self.ports.get(id).is_none_or(|p| p.tenant_id != v.tenant_id) {
                        return Err(c.err(&at(field), format!("tenant {} has no port {id:?}", v.tenant_id)));
                    }
                    let in_vpc = self.index().port_vpc.get(id).map(String::as_str).unwrap_or("");
                    if in_vpc != v.vpc_id {
                        return Err(c.err(
                            &at(field),
                            format!(
                                "port {id} is in vpc {in_vpc}; virtual ip {} is in vpc {}",
                                v.id, v.vpc_id
                            ),
                        ));
                    }
                }
                VipHolderTarget::Host(id) => {
                    if !self.hosts.contains_key(id) {
                        return Err(c.err(&at(field), format!("unknown host {id:?}")));
                    }
                }
            }
        }
        for (field, ip) in [("ipv4", v.ipv4.map(IpAddr::V4)), ("ipv6", v.ipv6.map(IpAddr::V6))] {
            let Some(ip) = ip else { continue };
            if let Some(o) = self.vip_of_address(&v.vpc_id, ip).filter(|o| o.id != v.id) {
                return Err(c.err(
                    field,
                    format!("{ip} is already virtual ip {}'s in vpc {}", o.id, v.vpc_id),
                ));
            }
            if by_host {
                self.check_host_held_address(c, field, v, ip)?;
            } else {
                self.vpc_address(c, field, &v.vpc_id, ip)?;
                if let Some(p) = self.index().addresses.get(&(v.vpc_id.clone(), ip)) {
                    return Err(c.err(field, format!("{ip} is already used by port {p} in vpc {}", v.vpc_id)));
                }
                if let Some(l) = self.lb_of_address(&v.vpc_id, ip) {
                    return Err(c.err(
                        field,
                        format!(
                            "{ip} is load balancer {}'s in vpc {}: to make a VIP highly available, hold it by the load balancer's NAT hosts",
                            l.id, v.vpc_id
                        ),
                    ));
                }
            }
        }
        // One group per virtual router id where its advertisements meet:
        // the VPC for ports, the zone's network for hosts.
        if let Some(o) = self.virtual_ips.values().find(|o| {
            o.id != v.id
                && o.vrid == v.vrid
                && o.host_held() == by_host
                && if by_host {
                    self.vpcs.get(&o.vpc_id).is_some_and(|x| x.zone_id == vpc.zone_id)
                } else {
                    o.vpc_id == v.vpc_id
                }
        }) {
            let where_ = if by_host {
                format!("zone {}", vpc.zone_id)
            } else {
                format!("vpc {}", v.vpc_id)
            };
            return Err(c.err(
                "vrid",
                format!(
                    "virtual router id {} is already virtual ip {}'s in {where_}",
                    v.vrid, o.id
                ),
            ));
        }
        self.replace(Kind::VirtualIp, &v.id, Some(Object::VirtualIp(v.clone())));
        Ok(())
    }

    /// A host-held virtual IP's address: a VIP of a load balancer of the
    /// VPC exposed to its zone, whose NAT hosts are the holders.
    fn check_host_held_address(&self, c: &Ctx, field: &str, v: &VirtualIp, ip: IpAddr) -> Result<(), BatchError> {
        let lb = self
            .load_balancers
            .values()
            .find(|l| l.vpc_id == v.vpc_id && l.vips().any(|a| a == ip))
            .ok_or_else(|| {
                c.err(
                    field,
                    format!(
                        "{ip} is no load balancer's VIP in vpc {}: hosts hold only the VIPs of load balancers they translate for",
                        v.vpc_id
                    ),
                )
            })?;
        if lb.exposure != Exposure::Zone {
            return Err(c.err(
                field,
                format!(
                    "load balancer {} is not exposed to its zone: no host answers for its VIP",
                    lb.id
                ),
            ));
        }
        for (i, h) in v.holders.iter().enumerate() {
            if let VipHolderTarget::Host(id) = &h.target {
                if !lb.nat_hosts.iter().any(|n| &n.host_id == id) {
                    return Err(c.err(
                        &format!("holders[{i}].host_id"),
                        format!("host {id} is not a NAT host of load balancer {}", lb.id),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The virtual IP of `vpc` that takes `ip`.
    pub fn vip_of_address(&self, vpc: &str, ip: IpAddr) -> Option<&VirtualIp> {
        self.virtual_ips
            .values()
            .find(|v| v.vpc_id == vpc && v.addresses().any(|a| a == ip))
    }

    /// The addresses of `vpc` that virtual IPs held by ports take, each
    /// with what holds it.
    pub(crate) fn vip_held_addresses<'a>(&'a self, vpc: &'a str) -> impl Iterator<Item = (IpAddr, String)> + 'a {
        self.virtual_ips
            .values()
            .filter(move |v| v.vpc_id == vpc && !v.host_held())
            .flat_map(|v| v.addresses().map(move |a| (a, format!("virtual ip {}", v.id))))
    }

    /// What of the virtual IPs still uses `kind` `id`, if anything does:
    /// it cannot be deleted.
    pub(crate) fn vip_using(&self, kind: Kind, id: &str) -> Option<String> {
        let holder = match kind {
            Kind::Port => Some(VipHolderTarget::Port(id.to_string())),
            Kind::Host => Some(VipHolderTarget::Host(id.to_string())),
            _ => None,
        };
        let found = self.virtual_ips.values().find(|v| match kind {
            Kind::Tenant => v.tenant_id == id,
            Kind::Vpc => v.vpc_id == id,
            Kind::Port | Kind::Host => v.holders.iter().any(|h| Some(&h.target) == holder.as_ref()),
            Kind::LoadBalancer => {
                v.host_held()
                    && self
                        .load_balancers
                        .get(id)
                        .is_some_and(|l| l.vips().any(|a| v.addresses().any(|b| a == b)))
            }
            _ => false,
        })?;
        Some(format!("virtual ip {}", found.id))
    }

    /// A load balancer changed: every virtual IP its hosts hold stays one
    /// of its VIPs, exposed to the zone, with its holders among its NAT
    /// hosts.
    pub(crate) fn check_lb_keeps_vips(
        &self,
        c: &Ctx,
        old: &LoadBalancer,
        new: &LoadBalancer,
    ) -> Result<(), BatchError> {
        for v in self
            .virtual_ips
            .values()
            .filter(|v| v.host_held() && v.vpc_id == old.vpc_id)
        {
            for a in v.addresses().filter(|a| old.vips().any(|b| b == *a)) {
                let f = if a.is_ipv4() { "vip_v4" } else { "vip_v6" };
                if !new.vips().any(|b| b == a) {
                    return Err(c.err(
                        f,
                        format!("{a} is held by virtual ip {}: it stays this VIP while it is", v.id),
                    ));
                }
                if new.exposure != Exposure::Zone {
                    return Err(c.err(
                        "exposure",
                        format!(
                            "virtual ip {} holds VIP {a}: the load balancer stays exposed to its zone",
                            v.id
                        ),
                    ));
                }
                for h in &v.holders {
                    if let VipHolderTarget::Host(id) = &h.target {
                        if !new.nat_hosts.iter().any(|n| &n.host_id == id) {
                            return Err(c.err(
                                "nat_hosts",
                                format!("host {id} holds virtual ip {}: it stays a NAT host while it does", v.id),
                            ));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// A port changed: the virtual IPs it holds stay in its VPC and
    /// tenant.
    pub(crate) fn check_vip_ports(&self, c: &Ctx, port: &Port) -> Result<(), BatchError> {
        let target = VipHolderTarget::Port(port.id.clone());
        let vpc = self.index().port_vpc.get(&port.id).map(String::as_str).unwrap_or("");
        if let Some(v) = self.virtual_ips.values().find(|v| {
            v.holders.iter().any(|h| h.target == target) && (v.vpc_id != vpc || v.tenant_id != port.tenant_id)
        }) {
            return Err(c.err(
                "subnet_id",
                format!(
                    "port {} holds virtual ip {} in vpc {}: it stays in that vpc and tenant while it does",
                    port.id, v.id, v.vpc_id
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::lb::tests::{apply, cloud, deleted_refused, refused};
    use crate::model::*;
    use crate::State;

    const VIP: &str =
        "kind: VirtualIp\nmetadata: {name: v2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vrid: 31, ";
    const HOLDERS: &str = "holders: [{port: portal-1-eth0, priority: 200}, {port: portal-2-eth0, priority: 100}]";

    /// A virtual IP held by ports is an address of its VPC that no port,
    /// load balancer or other virtual IP takes, now or later.
    #[test]
    fn a_virtual_ip_is_an_address_of_its_vpc_no_one_else_takes() {
        let mut s = cloud();
        assert_eq!(s.virtual_ips["portal-vip"].advert_interval_cs, 10);
        assert!(s.virtual_ips["portal-vip"].preempt);
        for (addr, field, says) in [
            (
                "10.99.0.5",
                "ipv4",
                "10.99.0.5 is in no subnet of vpc civil-affairs-prod",
            ),
            ("10.30.0.1", "ipv4", "gateway address of subnet civil-affairs-portal"),
            ("10.30.0.11", "ipv4", "already used by port portal-1-eth0"),
            ("10.30.0.100", "ipv4", "load balancer portal-lb's"),
            ("10.30.0.50", "ipv4", "already virtual ip portal-vip's"),
        ] {
            refused(&mut s, &format!("{VIP}ipv4: {addr}, {HOLDERS}}}\n"), field, says);
        }
        refused(
            &mut s,
            &format!("{VIP}ipv6: 'fd30::50', {HOLDERS}}}\n"),
            "ipv6",
            "portal-vip",
        );
        refused(&mut s, &format!("{VIP}{HOLDERS}}}\n"), "ipv4", "needs an IPv4 address");
        // Taken later: by a port, a load balancer, a narrower subnet.
        refused(
            &mut s,
            "kind: Port\nmetadata: {name: p9, tenant: civil-affairs}\nspec: {subnet: civil-affairs-portal, host: hv-01, device: tap-p9, mac: '02:30:00:00:00:99', ipv4: 10.30.0.50}\n",
            "ipv4",
            "virtual ip portal-vip's",
        );
        refused(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vipV4: 10.30.0.50}\n",
            "vip_v4",
            "virtual ip portal-vip",
        );
        apply(
            &mut s,
            &format!("{VIP}ipv4: 10.30.1.50, {HOLDERS}}}\n")
                .replace("name: v2", "name: v-db")
                .replace("31", "32"),
        )
        .unwrap();
        refused(
            &mut s,
            "kind: Subnet\nmetadata: {name: civil-affairs-db}\nspec: {vpc: civil-affairs-prod, cidrV4: 10.30.1.0/27, cidrV6: 'fd30:0:0:1::/64'}\n",
            "cidr_v4",
            "virtual ip v-db has address 10.30.1.50 outside the new prefix",
        );
        deleted_refused(
            &mut s,
            Kind::Subnet,
            "civil-affairs-db",
            "virtual ip v-db (its address 10.30.1.50)",
        );
        // A second one of its own, then one of another family only.
        apply(
            &mut s,
            &format!("{VIP}ipv4: 10.30.0.51, advertIntervalCs: 5, preempt: false, {HOLDERS}}}\n"),
        )
        .unwrap();
        let v = &s.virtual_ips["v2"];
        assert_eq!((v.advert_interval_cs, v.preempt, v.vrid), (5, false, 31));
        assert!(
            v.summary()
                .contains("holders=port:portal-1-eth0@200,port:portal-2-eth0@100"),
            "{}",
            v.summary()
        );
    }

    /// Its holders are its tenant's ports in its VPC, or hosts (never
    /// both), each with a priority of its own; its virtual router id is its
    /// VPC's alone; what it uses stays.
    #[test]
    fn holders_are_the_vpcs_ports_each_with_its_own_priority() {
        let mut s = cloud();
        // portal-2-eth0 is the virtual IP's alone.
        s.apply_batch(&[Op::Delete {
            kind: Kind::Member,
            id: "portal-web-2".into(),
        }])
        .unwrap();
        let with = |holders: &str| format!("{VIP}ipv4: 10.30.0.51, holders: [{holders}]}}\n");
        for (holders, field, says) in [
            (
                "{port: portal-1-eth0, priority: 100}, {port: portal-2-eth0, priority: 100}",
                "holders[1].priority",
                "holders[0] has priority 100 too",
            ),
            (
                "{port: portal-1-eth0, priority: 255}",
                "holders[0].priority",
                "255 is outside 1 to 254",
            ),
            (
                "{port: portal-1-eth0, priority: 0}",
                "holders[0].priority",
                "0 is outside 1 to 254",
            ),
            (
                "{port: police-1, priority: 10}",
                "holders[0].port_id",
                "tenant civil-affairs has no port \"police-1\"",
            ),
            (
                "{port: nobody, priority: 10}",
                "holders[0].port_id",
                "tenant civil-affairs has no port \"nobody\"",
            ),
            (
                "{port: test-1, priority: 10}",
                "holders[0].port_id",
                "port test-1 is in vpc civil-affairs-test",
            ),
            (
                "{port: portal-1-eth0, priority: 10}, {port: portal-1-eth0, priority: 20}",
                "holders[1].port_id",
                "port portal-1-eth0 is listed twice",
            ),
            (
                "{port: portal-1-eth0, priority: 10}, {host: hv-01, priority: 20}",
                "holders[1].host_id",
                "all ports or all hosts",
            ),
            ("", "holders", "at least one holder"),
        ] {
            refused(&mut s, &with(holders), field, says);
        }
        refused(
            &mut s,
            &with("{port: portal-1-eth0, priority: 10}").replace("vrid: 31", "vrid: 30"),
            "vrid",
            "virtual router id 30 is already virtual ip portal-vip's in vpc civil-affairs-prod",
        );
        refused(
            &mut s,
            &with("{port: portal-1-eth0, priority: 10}").replace("vrid: 31", "vrid: 0"),
            "vrid",
            "0 is not",
        );
        refused(
            &mut s,
            &format!("{VIP}ipv4: 10.30.0.51, advertIntervalCs: 4096, {HOLDERS}}}\n"),
            "advert_interval_cs",
            "outside 1 to 4095",
        );
        refused(
            &mut s,
            "kind: Port\nmetadata: {name: portal-2-eth0, tenant: civil-affairs}\nspec: {subnet: civil-affairs-test-net, host: hv-02, device: tap-portal-2, mac: '02:30:00:00:00:12', ipv4: 192.168.100.12}\n",
            "subnet_id",
            "port portal-2-eth0 holds virtual ip portal-vip",
        );
        refused(
            &mut s,
            "kind: VirtualIp\nmetadata: {name: portal-vip, tenant: civil-affairs}\nspec: {vpc: civil-affairs-test, vrid: 30, ipv4: 192.168.100.50, holders: [{port: test-1, priority: 10}]}\n",
            "vpc_id",
            "cannot move",
        );
        deleted_refused(
            &mut s,
            Kind::Port,
            "portal-2-eth0",
            "still used by virtual ip portal-vip",
        );
        deleted_refused(&mut s, Kind::Tenant, "civil-affairs", "");
        s.apply_batch(&[Op::Delete {
            kind: Kind::VirtualIp,
            id: "portal-vip".into(),
        }])
        .unwrap();
        s.apply_batch(&[Op::Delete {
            kind: Kind::Port,
            id: "portal-2-eth0".into(),
        }])
        .unwrap();
        deleted_refused(&mut s, Kind::VirtualIp, "portal-vip", "unknown virtual ip");
    }

    /// A grant takes the next epoch, for a holder alone; puts keep it and
    /// the owner while the owner holds the virtual IP.
    #[test]
    fn grants_take_the_next_epoch_and_puts_keep_it() {
        let mut s = cloud();
        let grant = |s: &mut State, holder: &str| {
            let mut v = s.virtual_ips["portal-vip"].clone();
            v.claim = true;
            v.owner = Some(VipHolderTarget::Port(holder.into()));
            v.owner_since_unix_ms = 7;
            v.holders.clear();
            s.apply_batch(&[Op::PutVirtualIp(v)])
        };
        grant(&mut s, "portal-1-eth0").unwrap();
        grant(&mut s, "portal-2-eth0").unwrap();
        let v = &s.virtual_ips["portal-vip"];
        assert_eq!((v.epoch, v.owner_since_unix_ms, v.claim), (2, 7, false));
        assert_eq!(v.holders.len(), 2, "a grant changes nothing but the owner");
        assert!(
            v.summary().ends_with("owner=port:portal-2-eth0 epoch=2"),
            "{}",
            v.summary()
        );
        let e = grant(&mut s, "police-1").unwrap_err();
        assert!(e.message.contains("no longer holds"), "{e}");
        // A put says nothing of epochs: the stored one stays, and the owner
        // while it holds.
        apply(
            &mut s,
            &format!("{VIP}ipv4: 10.30.0.50, {HOLDERS}}}\n")
                .replace("name: v2", "name: portal-vip")
                .replace("31", "30"),
        )
        .unwrap();
        assert_eq!(s.virtual_ips["portal-vip"].epoch, 2);
        assert_eq!(
            s.virtual_ips["portal-vip"].owner,
            Some(VipHolderTarget::Port("portal-2-eth0".into()))
        );
        apply(
            &mut s,
            &format!("{VIP}ipv4: 10.30.0.50, holders: [{{port: portal-1-eth0, priority: 9}}]}}\n")
                .replace("name: v2", "name: portal-vip")
                .replace("31", "30"),
        )
        .unwrap();
        let v = &s.virtual_ips["portal-vip"];
        assert_eq!((v.epoch, v.owner.clone(), v.owner_since_unix_ms), (2, None, 0));
        // A grant for one deleted is refused.
        s.apply_batch(&[Op::Delete {
            kind: Kind::VirtualIp,
            id: "portal-vip".into(),
        }])
        .unwrap();
        let mut gone = cloud().virtual_ips["portal-vip"].clone();
        gone.claim = true;
        gone.owner = Some(VipHolderTarget::Port("portal-1-eth0".into()));
        let e = s.apply_batch(&[Op::PutVirtualIp(gone)]).unwrap_err();
        assert!(e.message.contains("is gone"), "{e}");
    }

    const LB_ZONE: &str = "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vipV4: 10.30.0.101, exposure: zone, natHosts: [{host: hv-01, ipv4: 10.30.0.200}, {host: hv-02, ipv4: 10.30.0.201}]}\n";
    const HOSTS_VIP: &str =
        "kind: VirtualIp\nmetadata: {name: hv, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vrid: 7, ";

    /// Hosts hold only a VIP of a load balancer exposed to its zone, for
    /// which they translate; the load balancer keeps that VIP, its exposure
    /// and those hosts while they do.
    #[test]
    fn hosts_hold_only_a_zone_exposed_vip_of_their_load_balancer() {
        let mut s = cloud();
        apply(&mut s, LB_ZONE).unwrap();
        let two = "holders: [{host: hv-01, priority: 200}, {host: hv-02, priority: 100}]";
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.100, {two}}}\n"),
            "ipv4",
            "load balancer portal-lb is not exposed to its zone",
        );
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv6: 'fd30::101', {two}}}\n"),
            "ipv6",
            "fd30::101 is no load balancer's VIP",
        );
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.77, {two}}}\n"),
            "ipv4",
            "10.30.0.77 is no load balancer's VIP",
        );
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.200, {two}}}\n"),
            "ipv4",
            "is no load balancer's VIP",
        );
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.101, holders: [{{host: hv-09, priority: 9}}]}}\n"),
            "holders[0].host_id",
            "unknown host \"hv-09\"",
        );
        apply(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: lb3, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vipV4: 10.30.0.102, exposure: zone, natHosts: [{host: hv-01, ipv4: 10.30.0.202}]}\n",
        )
        .unwrap();
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.102, {two}}}\n"),
            "holders[1].host_id",
            "host hv-02 is not a NAT host of load balancer lb3",
        );
        apply(&mut s, &format!("{HOSTS_VIP}ipv4: 10.30.0.101, {two}}}\n")).unwrap();
        assert!(s.virtual_ips["hv"].host_held());
        // Its router id is its zone's: another VPC of the extranet cannot
        // take it for hosts, while ports of this VPC may.
        refused(
            &mut s,
            &format!("{HOSTS_VIP}ipv4: 10.30.0.102, holders: [{{host: hv-01, priority: 9}}]}}\n")
                .replace("name: hv,", "name: hv2,"),
            "vrid",
            "virtual router id 7 is already virtual ip hv's in zone extranet",
        );
        apply(
            &mut s,
            &format!("{VIP}ipv4: 10.30.0.51, {HOLDERS}}}\n").replace("vrid: 31", "vrid: 7"),
        )
        .unwrap();
        // The load balancer keeps the VIP, its exposure and the holders.
        refused(
            &mut s,
            &LB_ZONE.replace("10.30.0.101", "10.30.0.103"),
            "vip_v4",
            "held by virtual ip hv",
        );
        refused(
            &mut s,
            &LB_ZONE.replace(", {host: hv-02, ipv4: 10.30.0.201}", ""),
            "nat_hosts",
            "host hv-02 holds virtual ip hv",
        );
        deleted_refused(&mut s, Kind::LoadBalancer, "lb2", "still used by virtual ip hv");
        deleted_refused(&mut s, Kind::Host, "hv-02", "");
    }
}
