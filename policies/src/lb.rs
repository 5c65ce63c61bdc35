//! The load balancers' objects checked: a load balancer's addresses are
//! its VPC's and no one else's, its pools, listeners and members are its
//! own VPC's, and nothing another object still uses is taken away.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::*;
use crate::state::{BatchError, Ctx, State};

/// Hosts that translate one load balancer's flows from its zone, at most.
pub const LB_NAT_HOSTS_MAX: usize = 16;
/// Pools of one load balancer, at most.
pub const LB_POOLS_MAX: usize = 64;
/// Load balancers of one VPC, at most.
pub const LB_PER_VPC_MAX: usize = 256;

impl State {
    pub(crate) fn put_load_balancer(&mut self, c: &Ctx, lb: &LoadBalancer) -> Result<(), BatchError> {
        check_id(&lb.id).map_err(|m| c.err("id", m))?;
        if !self.tenants.contains_key(&lb.tenant_id) {
            return Err(c.err("tenant_id", format!("unknown tenant {:?}", lb.tenant_id)));
        }
        // Another tenant's VPC reads as one that does not exist: no word
        // of whose it is.
        let vpc = self
            .vpcs
            .get(&lb.vpc_id)
            .filter(|v| v.tenant_id == lb.tenant_id)
            .ok_or_else(|| c.err("vpc_id", format!("tenant {} has no vpc {:?}", lb.tenant_id, lb.vpc_id)))?;
        if let Some(old) = self.load_balancers.get(&lb.id) {
            if old.vpc_id != lb.vpc_id || old.tenant_id != lb.tenant_id {
                return Err(c.err(
                    "vpc_id",
                    format!(
                        "load balancer {} is in vpc {} of tenant {}; it cannot move",
                        lb.id, old.vpc_id, old.tenant_id
                    ),
                ));
            }
        }
        let in_vpc = 1 + self
            .load_balancers
            .values()
            .filter(|o| o.vpc_id == lb.vpc_id && o.id != lb.id)
            .count();
        if in_vpc > LB_PER_VPC_MAX {
            return Err(c.err(
                "vpc_id",
                format!(
                    "vpc {} would have {in_vpc} load balancers, at most {LB_PER_VPC_MAX}",
                    lb.vpc_id
                ),
            ));
        }
        if lb.vip_v4.is_none() && lb.vip_v6.is_none() {
            return Err(c.err("vip_v4", "a load balancer needs an IPv4 VIP, an IPv6 VIP or both"));
        }
        let mut taken = BTreeSet::new();
        for (field, ip) in [
            ("vip_v4", lb.vip_v4.map(IpAddr::V4)),
            ("vip_v6", lb.vip_v6.map(IpAddr::V6)),
        ] {
            let Some(ip) = ip else { continue };
            self.check_lb_address(c, field, lb, ip)?;
            taken.insert(ip);
        }
        match lb.exposure {
            Exposure::Vpc => {
                if !lb.nat_hosts.is_empty() {
                    return Err(c.err("nat_hosts", "only a load balancer exposed to its zone has NAT hosts"));
                }
            }
            Exposure::Zone => {
                if vpc.zone_id.is_empty() {
                    return Err(c.err(
                        "exposure",
                        format!("vpc {} has no zone to expose the load balancer to", vpc.id),
                    ));
                }
                if lb.nat_hosts.is_empty() {
                    return Err(c.err(
                        "nat_hosts",
                        "a load balancer exposed to its zone needs at least one host to translate its flows",
                    ));
                }
            }
        }
        if lb.nat_hosts.len() > LB_NAT_HOSTS_MAX {
            return Err(c.err("nat_hosts", format!("more than {LB_NAT_HOSTS_MAX} hosts")));
        }
        let mut hosts = BTreeSet::new();
        for (i, h) in lb.nat_hosts.iter().enumerate() {
            let at = |f: &str| format!("nat_hosts[{i}].{f}");
            if !self.hosts.contains_key(&h.host_id) {
                return Err(c.err(&at("host_id"), format!("unknown host {:?}", h.host_id)));
            }
            if !hosts.insert(&h.host_id) {
                return Err(c.err(&at("host_id"), format!("host {} is listed twice", h.host_id)));
            }
            for (f, has_vip, ip) in [
                ("ipv4", lb.vip_v4.is_some(), h.ipv4.map(IpAddr::V4)),
                ("ipv6", lb.vip_v6.is_some(), h.ipv6.map(IpAddr::V6)),
            ] {
                match (has_vip, ip) {
                    (true, None) => {
                        return Err(c.err(
                            &at(f),
                            format!("the load balancer has an {f} VIP: give this host an {f} source address"),
                        ))
                    }
                    (false, Some(_)) => {
                        return Err(c.err(&at(f), format!("the load balancer has no {f} VIP")));
                    }
                    (true, Some(ip)) => {
                        self.check_lb_address(c, &at(f), lb, ip)?;
                        if !taken.insert(ip) {
                            return Err(c.err(&at(f), format!("{ip} is given twice in load balancer {}", lb.id)));
                        }
                    }
                    (false, None) => {}
                }
            }
        }
        // Every member of its pools keeps an address of a VIP family.
        for m in self.members_of_lb(&lb.id) {
            if self.member_addresses(m, lb).is_empty() {
                let f = if lb.vip_v4.is_none() { "vip_v4" } else { "vip_v6" };
                return Err(c.err(
                    f,
                    format!(
                        "member {} of pool {} would have no address of a VIP family",
                        m.id, m.pool_id
                    ),
                ));
            }
        }
        if let Some(old) = self.load_balancers.get(&lb.id) {
            self.check_lb_keeps_vips(c, old, lb)?;
        }
        self.replace(Kind::LoadBalancer, &lb.id, Some(Object::LoadBalancer(lb.clone())));
        Ok(())
    }

    /// An address a load balancer takes in its VPC: in a subnet, not the
    /// subnet's own, and no port's or other load balancer's.
    fn check_lb_address(&self, c: &Ctx, field: &str, lb: &LoadBalancer, ip: IpAddr) -> Result<(), BatchError> {
        self.vpc_address(c, field, &lb.vpc_id, ip)?;
        if let Some(p) = self.index().addresses.get(&(lb.vpc_id.clone(), ip)) {
            return Err(c.err(field, format!("{ip} is already used by port {p} in vpc {}", lb.vpc_id)));
        }
        if let Some(m) = self.address_member(&lb.vpc_id, ip) {
            return Err(c.err(
                field,
                format!("{ip} is member {} of pool {} in vpc {}", m.id, m.pool_id, lb.vpc_id),
            ));
        }
        if let Some(o) = self.lb_of_address(&lb.vpc_id, ip).filter(|o| o.id != lb.id) {
            return Err(c.err(
                field,
                format!("{ip} is already used by load balancer {} in vpc {}", o.id, lb.vpc_id),
            ));
        }
        if let Some(v) = self.vip_of_address(&lb.vpc_id, ip).filter(|v| !v.host_held()) {
            return Err(c.err(
                field,
                format!("{ip} is already used by virtual ip {} in vpc {}", v.id, lb.vpc_id),
            ));
        }
        Ok(())
    }

    /// An address of one of `vpc`'s subnets that a VM could hold.
    pub(crate) fn vpc_address(&self, c: &Ctx, field: &str, vpc: &str, ip: IpAddr) -> Result<(), BatchError> {
        let subnet = crate::index::Index::of(&self.index().subnets_by_vpc, vpc)
            .filter_map(|s| self.subnets.get(s))
            .find(|s| subnet_contains(s, ip))
            .ok_or_else(|| c.err(field, format!("{ip} is in no subnet of vpc {vpc}")))?;
        let own = subnet_reserves(subnet, ip);
        if own {
            return Err(c.err(
                field,
                format!(
                    "{ip} is the network, broadcast or gateway address of subnet {}",
                    subnet.id
                ),
            ));
        }
        Ok(())
    }

    /// A member given by address `ip` in a pool of a load balancer of `vpc`.
    fn address_member(&self, vpc: &str, ip: IpAddr) -> Option<&Member> {
        self.members.values().find(|m| {
            m.target == MemberTarget::Address(ip) && self.lb_of(Kind::Member, &m.id).is_some_and(|l| l.vpc_id == vpc)
        })
    }

    /// Every address of `vpc` the load balancers hold: their own, and
    /// their members given by address, each with what holds it.
    fn lb_held_addresses<'a>(&'a self, vpc: &'a str) -> impl Iterator<Item = (IpAddr, String)> + 'a {
        let own = self
            .load_balancers
            .values()
            .filter(move |l| l.vpc_id == vpc)
            .flat_map(|l| l.addresses().map(move |a| (a, format!("load balancer {}", l.id))));
        let members = self.members.values().filter_map(move |m| match m.target {
            MemberTarget::Address(a) if self.lb_of(Kind::Member, &m.id).is_some_and(|l| l.vpc_id == vpc) => {
                Some((a, format!("member {} of pool {}", m.id, m.pool_id)))
            }
            _ => None,
        });
        own.chain(members)
    }

    /// The load balancer of `vpc` that takes `ip` (a VIP or a NAT address).
    pub fn lb_of_address(&self, vpc: &str, ip: IpAddr) -> Option<&LoadBalancer> {
        self.load_balancers
            .values()
            .find(|l| l.vpc_id == vpc && l.addresses().any(|a| a == ip))
    }

    pub(crate) fn put_pool(&mut self, c: &Ctx, p: &Pool) -> Result<(), BatchError> {
        check_id(&p.id).map_err(|m| c.err("id", m))?;
        if !self.load_balancers.contains_key(&p.load_balancer_id) {
            return Err(c.err(
                "load_balancer_id",
                format!("unknown load balancer {:?}", p.load_balancer_id),
            ));
        }
        if let Some(old) = self.pools.get(&p.id) {
            if old.load_balancer_id != p.load_balancer_id {
                return Err(c.err(
                    "load_balancer_id",
                    format!(
                        "pool {} is load balancer {}'s; a pool cannot move",
                        p.id, old.load_balancer_id
                    ),
                ));
            }
        }
        let pools = 1 + self
            .pools
            .values()
            .filter(|o| o.load_balancer_id == p.load_balancer_id && o.id != p.id)
            .count();
        if pools > LB_POOLS_MAX {
            return Err(c.err(
                "load_balancer_id",
                format!(
                    "load balancer {} would have {pools} pools, at most {LB_POOLS_MAX}",
                    p.load_balancer_id
                ),
            ));
        }
        if p.drain_secs > LB_DRAIN_MAX_SECS {
            return Err(c.err(
                "drain_secs",
                format!("{} s is more than {LB_DRAIN_MAX_SECS} s", p.drain_secs),
            ));
        }
        if let Some(h) = &p.health {
            check_health(c, h)?;
        }
        self.replace(Kind::Pool, &p.id, Some(Object::Pool(p.clone())));
        Ok(())
    }

    pub(crate) fn put_listener(&mut self, c: &Ctx, l: &Listener) -> Result<(), BatchError> {
        check_id(&l.id).map_err(|m| c.err("id", m))?;
        if !self.load_balancers.contains_key(&l.load_balancer_id) {
            return Err(c.err(
                "load_balancer_id",
                format!("unknown load balancer {:?}", l.load_balancer_id),
            ));
        }
        if let Some(old) = self.listeners.get(&l.id) {
            if old.load_balancer_id != l.load_balancer_id {
                return Err(c.err(
                    "load_balancer_id",
                    format!(
                        "listener {} is load balancer {}'s; a listener cannot move",
                        l.id, old.load_balancer_id
                    ),
                ));
            }
        }
        if l.port == 0 {
            return Err(c.err("port", "must be 1 to 65535"));
        }
        // A pool of another load balancer reads as one that does not
        // exist: it may be another tenant's.
        if !self
            .pools
            .get(&l.pool_id)
            .is_some_and(|p| p.load_balancer_id == l.load_balancer_id)
        {
            return Err(c.err(
                "pool_id",
                format!("load balancer {} has no pool {:?}", l.load_balancer_id, l.pool_id),
            ));
        }
        if l.persistence_secs > LB_PERSISTENCE_MAX_SECS {
            return Err(c.err(
                "persistence_secs",
                format!("{} s is more than {LB_PERSISTENCE_MAX_SECS} s", l.persistence_secs),
            ));
        }
        let siblings = self
            .listeners
            .values()
            .filter(|o| o.load_balancer_id == l.load_balancer_id && o.id != l.id);
        let mut count = 1;
        for o in siblings {
            count += 1;
            if o.protocol == l.protocol && o.port == l.port {
                return Err(c.err(
                    "port",
                    format!(
                        "load balancer {} already has listener {} on {}/{}",
                        l.load_balancer_id,
                        o.id,
                        l.protocol.name(),
                        l.port
                    ),
                ));
            }
        }
        for o in self
            .http_listeners
            .values()
            .filter(|o| o.load_balancer_id == l.load_balancer_id)
        {
            count += 1;
            if l.protocol == LbProtocol::Tcp && o.port == l.port {
                return Err(c.err(
                    "port",
                    format!(
                        "load balancer {} already has http listener {} on tcp/{}",
                        l.load_balancer_id, o.id, l.port
                    ),
                ));
            }
        }
        if count > LB_LISTENERS_MAX {
            return Err(c.err(
                "load_balancer_id",
                format!(
                    "load balancer {} would have {count} listeners, at most {LB_LISTENERS_MAX}",
                    l.load_balancer_id
                ),
            ));
        }
        self.replace(Kind::Listener, &l.id, Some(Object::Listener(l.clone())));
        Ok(())
    }

    pub(crate) fn put_member(&mut self, c: &Ctx, m: &Member) -> Result<(), BatchError> {
        check_id(&m.id).map_err(|e| c.err("id", e))?;
        // Health and the drain's start are merged here, at apply time, with
        // the member as it is now: a report never brings back a member
        // deleted or changed since its agent looked, and a put never loses
        // a report that committed before it.
        if m.health_report {
            let old = self
                .members
                .get(&m.id)
                .ok_or_else(|| c.err("member_id", format!("member {} is gone", m.id)))?;
            let checked = self.pools.get(&old.pool_id).is_some_and(|p| p.health.is_some())
                && matches!(old.target, MemberTarget::Port(_))
                && old.target == m.target;
            if !checked {
                return Err(c.err(
                    "member_id",
                    format!("member {} is no longer checked as the report's agent saw it", m.id),
                ));
            }
            let mut kept = old.clone();
            kept.health = m.health.clone();
            self.replace(Kind::Member, &m.id, Some(Object::Member(kept)));
            return Ok(());
        }
        let mut merged = m.clone();
        let old = self.members.get(&m.id);
        // Health stays while the member is checked where it was.
        merged.health = old.filter(|o| o.target == m.target).and_then(|o| o.health.clone());
        merged.draining_since_unix_ms = match (m.state, old) {
            (MemberState::Draining, Some(o))
                if o.state == MemberState::Draining && o.draining_since_unix_ms.is_some() =>
            {
                o.draining_since_unix_ms
            }
            (MemberState::Draining, _) => m.draining_since_unix_ms,
            _ => None,
        };
        let m = &merged;
        let pool = self
            .pools
            .get(&m.pool_id)
            .ok_or_else(|| c.err("pool_id", format!("unknown pool {:?}", m.pool_id)))?;
        if let Some(old) = self.members.get(&m.id) {
            if old.pool_id != m.pool_id {
                return Err(c.err(
                    "pool_id",
                    format!("member {} is pool {}'s; a member cannot move", m.id, old.pool_id),
                ));
            }
        }
        let lb = &self.load_balancers[&pool.load_balancer_id];
        match &m.target {
            MemberTarget::Port(id) => {
                // Another tenant's port reads as one that does not exist.
                let known = self.ports.get(id).is_some_and(|p| p.tenant_id == lb.tenant_id);
                if !known {
                    return Err(c.err("port_id", format!("tenant {} has no port {id:?}", lb.tenant_id)));
                }
                let vpc = self.index().port_vpc.get(id).map(String::as_str).unwrap_or("");
                if vpc != lb.vpc_id {
                    return Err(c.err(
                        "port_id",
                        format!(
                            "port {id} is in vpc {vpc}; load balancer {}'s members are in vpc {}",
                            lb.id, lb.vpc_id
                        ),
                    ));
                }
                if let Some(l) = self.http_listeners.values().find(|l| l.proxy_ports.contains(id)) {
                    return Err(c.err(
                        "port_id",
                        format!(
                            "port {id} runs the proxy of http listener {}: a proxy port is no member",
                            l.id
                        ),
                    ));
                }
            }
            MemberTarget::Address(ip) => {
                self.vpc_address(c, "address", &lb.vpc_id, *ip)?;
                self.check_member_not_proxy(c, lb, *ip)?;
                if let Some(o) = self.lb_of_address(&lb.vpc_id, *ip) {
                    return Err(c.err("address", format!("{ip} is load balancer {}'s own address", o.id)));
                }
            }
        }
        let field = match m.target {
            MemberTarget::Port(_) => "port_id",
            MemberTarget::Address(_) => "address",
        };
        let addresses = self.member_addresses(m, lb);
        if addresses.is_empty() {
            return Err(c.err(
                field,
                format!(
                    "the member has no address of a family load balancer {} has a VIP of",
                    lb.id
                ),
            ));
        }
        if m.weight == 0 || m.weight > LB_WEIGHT_MAX {
            return Err(c.err("weight", format!("{} is outside 1 to {LB_WEIGHT_MAX}", m.weight)));
        }
        let mut count = 1;
        for o in self.members.values().filter(|o| o.pool_id == m.pool_id && o.id != m.id) {
            count += 1;
            if o.port == m.port && self.member_addresses(o, lb).iter().any(|a| addresses.contains(a)) {
                return Err(c.err(
                    field,
                    format!(
                        "pool {} already has member {} at the same address and port",
                        m.pool_id, o.id
                    ),
                ));
            }
        }
        if count > LB_MEMBERS_MAX {
            return Err(c.err(
                "pool_id",
                format!(
                    "pool {} would have {count} members, at most {LB_MEMBERS_MAX}",
                    m.pool_id
                ),
            ));
        }
        self.replace(Kind::Member, &m.id, Some(Object::Member(m.clone())));
        Ok(())
    }

    /// A member's addresses of the families `lb` has VIPs of.
    pub fn member_addresses(&self, m: &Member, lb: &LoadBalancer) -> Vec<IpAddr> {
        let all: Vec<IpAddr> = match &m.target {
            MemberTarget::Port(id) => self.ports.get(id).map(|p| p.addresses().collect()).unwrap_or_default(),
            MemberTarget::Address(a) => vec![*a],
        };
        all.into_iter()
            .filter(|a| match a {
                IpAddr::V4(_) => lb.vip_v4.is_some(),
                IpAddr::V6(_) => lb.vip_v6.is_some(),
            })
            .collect()
    }

    /// The members of every pool of load balancer `lb`.
    pub fn members_of_lb<'a>(&'a self, lb: &'a str) -> impl Iterator<Item = &'a Member> + 'a {
        self.members
            .values()
            .filter(move |m| self.pools.get(&m.pool_id).is_some_and(|p| p.load_balancer_id == lb))
    }

    /// The load balancer an object of a load balancer's kinds belongs to.
    pub fn lb_of(&self, kind: Kind, id: &str) -> Option<&LoadBalancer> {
        let lb = match kind {
            Kind::LoadBalancer => id,
            Kind::Pool => &self.pools.get(id)?.load_balancer_id,
            Kind::Listener => &self.listeners.get(id)?.load_balancer_id,
            Kind::HttpListener => &self.http_listeners.get(id)?.load_balancer_id,
            Kind::Member => &self.pools.get(&self.members.get(id)?.pool_id)?.load_balancer_id,
            _ => return None,
        };
        self.load_balancers.get(lb)
    }

    /// What of the load balancers still uses `kind` `id`, if anything
    /// does: it cannot be deleted.
    pub(crate) fn lb_using(&self, kind: Kind, id: &str) -> Option<String> {
        match kind {
            Kind::Tenant => self
                .load_balancers
                .values()
                .find(|l| l.tenant_id == id)
                .map(|l| format!("load balancer {}", l.id)),
            Kind::Vpc => self
                .load_balancers
                .values()
                .find(|l| l.vpc_id == id)
                .map(|l| format!("load balancer {}", l.id)),
            Kind::Host => self
                .load_balancers
                .values()
                .find(|l| l.nat_hosts.iter().any(|h| h.host_id == id))
                .map(|l| format!("load balancer {} (a NAT host)", l.id)),
            Kind::Subnet => {
                let s = self.subnets.get(id)?;
                self.lb_held_addresses(&s.vpc_id)
                    .chain(self.vip_held_addresses(&s.vpc_id))
                    .find(|(a, _)| subnet_contains(s, *a))
                    .map(|(a, who)| format!("{who} (its address {a})"))
            }
            Kind::Port => self
                .members
                .values()
                .find(|m| m.target == MemberTarget::Port(id.to_string()))
                .map(|m| format!("member {} of pool {}", m.id, m.pool_id)),
            Kind::LoadBalancer => self
                .pools
                .values()
                .find(|p| p.load_balancer_id == id)
                .map(|p| format!("pool {}", p.id))
                .or_else(|| {
                    self.listeners
                        .values()
                        .find(|l| l.load_balancer_id == id)
                        .map(|l| format!("listener {}", l.id))
                }),
            Kind::Pool => self
                .listeners
                .values()
                .find(|l| l.pool_id == id)
                .map(|l| format!("listener {}", l.id))
                .or_else(|| {
                    self.members
                        .values()
                        .find(|m| m.pool_id == id)
                        .map(|m| format!("member {}", m.id))
                }),
            _ => None,
        }
    }

    /// A subnet changed: the addresses the load balancers hold in it stay
    /// in it, and usable by a VM (not its network, broadcast or gateway).
    pub(crate) fn check_subnet_keeps_lb_addresses(
        &self,
        c: &Ctx,
        old: &Subnet,
        new: &Subnet,
    ) -> Result<(), BatchError> {
        for (a, who) in self
            .lb_held_addresses(&old.vpc_id)
            .chain(self.vip_held_addresses(&old.vpc_id))
        {
            if !subnet_contains(old, a) {
                continue;
            }
            let f = if a.is_ipv4() { "cidr_v4" } else { "cidr_v6" };
            if !subnet_contains(new, a) {
                return Err(c.err(f, format!("{who} has address {a} outside the new prefix")));
            }
            if subnet_reserves(new, a) {
                return Err(c.err(
                    f,
                    format!("{who} has address {a}, the network, broadcast or gateway address of the new prefix"),
                ));
            }
        }
        Ok(())
    }

    /// A port changed: the members it is stay in their load balancer's
    /// VPC and tenant, with an address of a VIP family, once per pool and
    /// port. (Checked with the port in place; `Err` leaves undoing to the
    /// caller.)
    pub(crate) fn check_member_ports(&self, c: &Ctx, port: &Port) -> Result<(), BatchError> {
        let target = MemberTarget::Port(port.id.clone());
        let vpc = self.index().port_vpc.get(&port.id).map(String::as_str).unwrap_or("");
        for m in self.members.values().filter(|m| m.target == target) {
            let Some(lb) = self.lb_of(Kind::Member, &m.id) else {
                continue;
            };
            if lb.vpc_id != vpc || lb.tenant_id != port.tenant_id {
                return Err(c.err(
                    "subnet_id",
                    format!(
                        "port {} is member {} of load balancer {} in vpc {}: it stays in that vpc and tenant while it is",
                        port.id, m.id, lb.id, lb.vpc_id
                    ),
                ));
            }
            let addresses = self.member_addresses(m, lb);
            if addresses.is_empty() {
                return Err(c.err(
                    "ipv4",
                    format!(
                        "port {} is member {} of load balancer {}: it keeps an address of a family the load balancer has a VIP of",
                        port.id, m.id, lb.id
                    ),
                ));
            }
            if let Some(o) = self.members.values().find(|o| {
                o.id != m.id
                    && o.pool_id == m.pool_id
                    && o.port == m.port
                    && self.member_addresses(o, lb).iter().any(|a| addresses.contains(a))
            }) {
                return Err(c.err(
                    "ipv4",
                    format!(
                        "port {} would take the address and port of member {} of pool {}",
                        port.id, o.id, m.pool_id
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `a` is `s`'s network, broadcast or gateway address.
fn subnet_reserves(s: &Subnet, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => s
            .cidr_v4
            .is_some_and(|n| a == n.network() || a == n.broadcast() || Some(a) == s.gateway_v4()),
        IpAddr::V6(a) => s.cidr_v6.is_some_and(|n| a == n.network() || Some(a) == s.gateway_v6()),
    }
}

fn subnet_contains(s: &Subnet, a: IpAddr) -> bool {
    match a {
        IpAddr::V4(a) => s.cidr_v4.is_some_and(|n| n.contains(a)),
        IpAddr::V6(a) => s.cidr_v6.is_some_and(|n| n.contains(a)),
    }
}

fn check_health(c: &Ctx, h: &HealthCheck) -> Result<(), BatchError> {
    if !(HEALTH_INTERVAL_MIN_MS..=HEALTH_INTERVAL_MAX_MS).contains(&h.interval_ms) {
        return Err(c.err(
            "health.interval_ms",
            format!(
                "{} ms is outside {HEALTH_INTERVAL_MIN_MS} to {HEALTH_INTERVAL_MAX_MS} ms",
                h.interval_ms
            ),
        ));
    }
    if h.timeout_ms == 0 || h.timeout_ms > h.interval_ms {
        return Err(c.err(
            "health.timeout_ms",
            format!(
                "{} ms is outside 1 ms to the interval ({} ms)",
                h.timeout_ms, h.interval_ms
            ),
        ));
    }
    for (f, v) in [("rise", h.rise), ("fall", h.fall)] {
        if v == 0 || v > HEALTH_COUNT_MAX {
            return Err(c.err(
                &format!("health.{f}"),
                format!("{v} is outside 1 to {HEALTH_COUNT_MAX} checks"),
            ));
        }
    }
    if let HealthProbe::Http { path, status } = &h.probe {
        if !path.starts_with('/') || path.len() > HEALTH_PATH_MAX {
            return Err(c.err(
                "health.http_path",
                format!("{path:?} is not a path of 1 to {HEALTH_PATH_MAX} characters starting with '/'"),
            ));
        }
        if let Some(ch) = path.chars().find(|ch| !ch.is_ascii_graphic()) {
            return Err(c.err(
                "health.http_path",
                format!("{path:?} contains {ch:?}: only visible ASCII (percent-encode the rest)"),
            ));
        }
        if !(100..=599).contains(&status.0) || !(status.0..=599).contains(&status.1) {
            return Err(c.err(
                "health.status_min",
                format!(
                    "{}-{} is not a range of HTTP statuses (100 to 599, min first)",
                    status.0, status.1
                ),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use crate::manifest::{dependency_order, load_path, parse_str};
    use crate::model::*;
    use crate::State;

    /// The example cloud, with its load balancer, and a port of another
    /// tenant's VPC.
    pub(crate) fn cloud() -> State {
        let dir = std::path::PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/gov-cloud"));
        let ops: Vec<Op> = dependency_order(load_path(&dir).unwrap())
            .into_iter()
            .map(|l| l.op)
            .collect();
        let mut s = State::default();
        s.apply_batch(&ops).unwrap();
        apply(
            &mut s,
            "kind: Port\nmetadata: {name: police-1, tenant: public-security}\nspec: {subnet: public-security-apps, host: hv-01, device: tap-police-1, mac: '02:31:00:00:00:11', ipv4: 10.31.0.11}\n",
        )
        .unwrap();
        apply(
            &mut s,
            "kind: Port\nmetadata: {name: test-1, tenant: civil-affairs}\nspec: {subnet: civil-affairs-test-net, host: hv-01, device: tap-test-1, mac: '02:40:00:00:00:11', ipv4: 192.168.100.11}\n",
        )
        .unwrap();
        s
    }

    pub(crate) fn apply(s: &mut State, yaml: &str) -> Result<(), crate::BatchError> {
        let text: String = yaml
            .split("---\n")
            .map(|d| format!("apiVersion: sdn/v1\n{d}"))
            .collect::<Vec<_>>()
            .join("---\n");
        let ops: Vec<Op> = dependency_order(parse_str("t.yaml", &text).unwrap())
            .into_iter()
            .map(|l| l.op)
            .collect();
        s.apply_batch(&ops).map(|_| ())
    }

    /// Refused, naming the field, with the state as it was.
    #[track_caller]
    pub(crate) fn refused(s: &mut State, yaml: &str, field: &str, says: &str) {
        let before = s.clone();
        let e = apply(s, yaml).expect_err(yaml);
        assert!(e.field.ends_with(field), "field {} is not ...{field}: {e}", e.field);
        assert!(e.message.contains(says), "{e}");
        assert_eq!(*s, before, "a refused batch changed the state");
    }

    const LB: &str =
        "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vipV4: ";

    #[test]
    fn the_example_load_balancer_is_whole() {
        let s = cloud();
        let lb = &s.load_balancers["portal-lb"];
        assert_eq!(lb.vips().count(), 2);
        assert_eq!(s.listeners["portal-https"].scheduler, Scheduler::Maglev);
        assert_eq!(s.members_of_lb("portal-lb").count(), 2);
        let m = &s.members["portal-web-1"];
        assert_eq!(
            s.member_addresses(m, lb),
            [
                "10.30.0.11".parse::<std::net::IpAddr>().unwrap(),
                "fd30::11".parse().unwrap()
            ]
        );
        assert_eq!(s.pools["portal-web"].drain(), 60);
    }

    /// A load balancer's addresses are its VPC's, usable by a VM, and no
    /// one else's; a port cannot take one afterwards.
    #[test]
    fn addresses_are_the_vpcs_and_no_one_elses() {
        let mut s = cloud();
        refused(
            &mut s,
            &format!("{LB}10.31.0.5}}\n"),
            "vip_v4",
            "in no subnet of vpc civil-affairs-prod",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.11}}\n"),
            "vip_v4",
            "already used by port portal-1-eth0",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.100}}\n"),
            "vip_v4",
            "load balancer portal-lb",
        );
        refused(&mut s, &format!("{LB}10.30.0.1}}\n"), "vip_v4", "gateway");
        refused(&mut s, &format!("{LB}10.30.0.255}}\n"), "vip_v4", "broadcast");
        refused(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod}\n",
            "vip_v4",
            "needs an IPv4 VIP",
        );
        // Another tenant's VPC.
        refused(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: public-security-prod, vipV4: 10.31.0.100}\n",
            "vpc_id",
            "tenant civil-affairs has no vpc \"public-security-prod\"",
        );
        // A port taking a VIP.
        refused(
            &mut s,
            "kind: Port\nmetadata: {name: portal-3-eth0, tenant: civil-affairs}\nspec: {subnet: civil-affairs-portal, host: hv-01, device: tap-p3, mac: '02:30:00:00:00:13', ipv4: 10.30.0.100}\n",
            "ipv4",
            "load balancer portal-lb's",
        );
        // A subnet shrunk from under a VIP.
        refused(
            &mut s,
            "kind: Subnet\nmetadata: {name: civil-affairs-portal}\nspec: {vpc: civil-affairs-prod, cidrV4: 10.30.0.0/26, cidrV6: 'fd30::/64'}\n",
            "cidr_v4",
            "load balancer portal-lb has address 10.30.0.100",
        );
        // A load balancer cannot move.
        refused(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: portal-lb, tenant: civil-affairs}\nspec: {vpc: civil-affairs-test, vipV4: 10.40.0.100}\n",
            "vpc_id",
            "cannot move",
        );
    }

    #[test]
    fn zone_exposure_needs_a_zone_and_its_nat_hosts() {
        let mut s = cloud();
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone}}\n"),
            "nat_hosts",
            "at least one host",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-01}}]}}\n"),
            "nat_hosts[0].ipv4",
            "give this host an ipv4 source address",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-09, ipv4: 10.30.0.200}}]}}\n"),
            "nat_hosts[0].host_id",
            "unknown host",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-01, ipv4: 10.30.0.11}}]}}\n"),
            "nat_hosts[0].ipv4",
            "port portal-1-eth0",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-01, ipv4: 10.30.0.101}}]}}\n"),
            "nat_hosts[0].ipv4",
            "given twice",
        );
        refused(
            &mut s,
            &format!("{LB}10.30.0.101, natHosts: [{{host: hv-01, ipv4: 10.30.0.200}}]}}\n"),
            "nat_hosts",
            "only a load balancer exposed to its zone",
        );
        refused(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-test, vipV4: 192.168.100.100, exposure: zone, natHosts: [{host: hv-01, ipv4: 192.168.100.200}]}\n",
            "exposure",
            "has no zone",
        );
        apply(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-01, ipv4: 10.30.0.200}}, {{host: hv-02, ipv4: 10.30.0.201}}]}}\n"),
        )
        .unwrap();
        // Its NAT addresses are taken too, and its hosts stay.
        refused(
            &mut s,
            &format!("{LB}10.30.0.200}}\n").replace("lb2", "lb3"),
            "vip_v4",
            "load balancer lb2",
        );
        deleted_refused(&mut s, Kind::Host, "hv-02", "load balancer lb2 (a NAT host)");
    }

    #[track_caller]
    pub(crate) fn deleted_refused(s: &mut State, kind: Kind, id: &str, says: &str) {
        let before = s.clone();
        let e = s.apply_batch(&[Op::Delete { kind, id: id.into() }]).expect_err(id);
        assert!(e.message.contains(says), "{e}");
        assert_eq!(*s, before);
    }

    const MEMBER: &str = "kind: Member\nmetadata: {name: m3}\nspec: {pool: portal-web, ";

    /// A member is a port or an address of the load balancer's own VPC,
    /// of a VIP family, once per address and port.
    #[test]
    fn members_are_the_load_balancers_vpcs() {
        let mut s = cloud();
        refused(
            &mut s,
            &format!("{MEMBER}port: police-1}}\n"),
            "port_id",
            "tenant civil-affairs has no port \"police-1\"",
        );
        refused(
            &mut s,
            &format!("{MEMBER}address: 10.31.0.11}}\n"),
            "address",
            "in no subnet of vpc civil-affairs-prod",
        );
        refused(
            &mut s,
            &format!("{MEMBER}address: 10.30.0.100}}\n"),
            "address",
            "load balancer portal-lb's own address",
        );
        refused(
            &mut s,
            &format!("{MEMBER}port: nobody}}\n"),
            "port_id",
            "tenant civil-affairs has no port \"nobody\"",
        );
        refused(
            &mut s,
            &format!("{MEMBER}port: test-1}}\n"),
            "port_id",
            "port test-1 is in vpc civil-affairs-test",
        );
        refused(
            &mut s,
            &format!("{MEMBER}address: 10.30.0.11}}\n"),
            "address",
            "already has member portal-web-1",
        );
        refused(
            &mut s,
            &format!("{MEMBER}port: portal-1-eth0, weight: 300}}\n"),
            "weight",
            "outside 1 to 256",
        );
        refused(
            &mut s,
            &format!("{MEMBER}port: portal-1-eth0, weight: 0}}\n"),
            "weight",
            "outside 1 to 256",
        );
        refused(
            &mut s,
            "kind: Member\nmetadata: {name: m3}\nspec: {pool: nowhere, port: portal-1-eth0}\n",
            "pool_id",
            "unknown pool",
        );
        // The same address on another port is another member.
        apply(
            &mut s,
            &format!("{MEMBER}address: 10.30.0.11, protocolPort: 8443, state: draining}}\n"),
        )
        .unwrap();
        assert_eq!(s.members["m3"].state, MemberState::Draining);
        // A member moving to another pool.
        apply(
            &mut s,
            "kind: Pool\nmetadata: {name: other}\nspec: {loadBalancer: portal-lb}\n",
        )
        .unwrap();
        refused(
            &mut s,
            "kind: Member\nmetadata: {name: m3}\nspec: {pool: other, address: 10.30.0.11}\n",
            "pool_id",
            "cannot move",
        );
        // An IPv4-only load balancer takes no IPv6-only member, and a VIP
        // family its members need cannot go.
        let v4 = format!("{LB}10.30.0.101}}\n---\nkind: Pool\nmetadata: {{name: p4}}\nspec: {{loadBalancer: lb2}}\n");
        apply(&mut s, &v4).unwrap();
        refused(
            &mut s,
            "kind: Member\nmetadata: {name: m6}\nspec: {pool: p4, address: 'fd30::50'}\n",
            "address",
            "no address of a family",
        );
        apply(&mut s, "kind: Member\nmetadata: {name: m6}\nspec: {pool: p4, address: 'fd30::50'}\n---\nkind: LoadBalancer\nmetadata: {name: lb2, tenant: civil-affairs}\nspec: {vpc: civil-affairs-prod, vipV4: 10.30.0.101, vipV6: 'fd30::101'}\n").unwrap();
        refused(
            &mut s,
            &format!("{LB}10.30.0.101}}\n"),
            "vip_v6",
            "member m6 of pool p4 would have no address",
        );
    }

    #[test]
    fn listeners_and_pools_are_checked() {
        let mut s = cloud();
        let l = "kind: Listener\nmetadata: {name: l3}\nspec: {loadBalancer: portal-lb, protocol: tcp, pool: portal-web, scheduler: round_robin, ";
        refused(
            &mut s,
            &format!("{l}port: 443}}\n"),
            "port",
            "already has listener portal-https on tcp/443",
        );
        refused(&mut s, &format!("{l}port: 0}}\n"), "port", "1 to 65535");
        refused(
            &mut s,
            &format!("{l}port: 8080, persistenceSeconds: 90000}}\n"),
            "persistence_secs",
            "more than 86400",
        );
        apply(
            &mut s,
            &format!("{l}port: 443}}\n").replace("protocol: tcp", "protocol: udp"),
        )
        .unwrap();
        // A pool of another load balancer.
        apply(
            &mut s,
            &format!("{LB}10.30.0.101}}\n---\nkind: Pool\nmetadata: {{name: p4}}\nspec: {{loadBalancer: lb2}}\n"),
        )
        .unwrap();
        refused(
            &mut s,
            &format!("{l}port: 8080}}\n").replace("portal-web", "p4"),
            "pool_id",
            "load balancer portal-lb has no pool \"p4\"",
        );
        let p = "kind: Pool\nmetadata: {name: p5}\nspec: {loadBalancer: portal-lb, health: ";
        refused(
            &mut s,
            &format!("{p}{{probe: tcp, intervalMs: 50, rise: 1, fall: 1}}}}\n"),
            "health.interval_ms",
            "outside 100 to 60000",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: tcp, intervalMs: 500, timeoutMs: 600, rise: 1, fall: 1}}}}\n"),
            "health.timeout_ms",
            "outside 1 ms to the interval",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: tcp, intervalMs: 500, rise: 0, fall: 1}}}}\n"),
            "health.rise",
            "outside 1 to 10",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: tcp, intervalMs: 500, rise: 1, fall: 11}}}}\n"),
            "health.fall",
            "outside 1 to 10",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: http, path: healthz, intervalMs: 500, rise: 1, fall: 1}}}}\n"),
            "health.http_path",
            "starting with '/'",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: http, path: '/a b', intervalMs: 500, rise: 1, fall: 1}}}}\n"),
            "health.http_path",
            "contains ' '",
        );
        refused(
            &mut s,
            &format!("{p}{{probe: http, path: /h, status: 600, intervalMs: 500, rise: 1, fall: 1}}}}\n"),
            "health.status_min",
            "not a range of HTTP statuses",
        );
        refused(
            &mut s,
            "kind: Pool\nmetadata: {name: p5}\nspec: {loadBalancer: portal-lb, drainSeconds: 90000}\n",
            "drain_secs",
            "more than 86400",
        );
        refused(
            &mut s,
            "kind: Pool\nmetadata: {name: portal-web}\nspec: {loadBalancer: lb2}\n",
            "load_balancer_id",
            "cannot move",
        );
    }

    /// A member's port stays in its load balancer's VPC and tenant, with
    /// an address of a VIP family; an address member is held as a VIP is;
    /// a VPC keeps the zone a load balancer is exposed to.
    #[test]
    fn what_members_and_exposure_hold_stays_held() {
        let mut s = cloud();
        let p1 = "kind: Port\nmetadata: {name: portal-1-eth0, tenant: civil-affairs}\nspec: {host: hv-01, device: tap-portal-1, mac: '02:30:00:00:00:11', ";
        refused(
            &mut s,
            &format!("{p1}subnet: civil-affairs-test-net, ipv4: 192.168.100.50}}\n"),
            "subnet_id",
            "stays in that vpc and tenant",
        );
        // Renumbered onto the other member's address: refused, as a
        // member put would be.
        apply(
            &mut s,
            "kind: Member\nmetadata: {name: m3}\nspec: {pool: portal-web, address: 10.30.0.20}\n",
        )
        .unwrap();
        refused(
            &mut s,
            &format!("{p1}subnet: civil-affairs-portal, ipv4: 10.30.0.20}}\n"),
            "ipv4",
            "member m3 of pool portal-web",
        );
        apply(
            &mut s,
            &format!("{p1}subnet: civil-affairs-portal, ipv4: 10.30.0.21}}\n"),
        )
        .unwrap();
        // The address member is held: no VIP on it, no subnet shrunk or
        // deleted from under it.
        refused(
            &mut s,
            &format!("{LB}10.30.0.20}}\n"),
            "vip_v4",
            "member m3 of pool portal-web",
        );
        refused(
            &mut s,
            "kind: Subnet\nmetadata: {name: civil-affairs-portal}\nspec: {vpc: civil-affairs-prod, cidrV4: 10.30.0.0/28, cidrV6: 'fd30::/64'}\n",
            "cidr_v4",
            "outside the new prefix",
        );
        // A VIP that a narrower prefix would make its broadcast address.
        apply(&mut s, &format!("{LB}10.30.0.127}}\n")).unwrap();
        s.apply_batch(&[Op::Delete {
            kind: Kind::Member,
            id: "m3".into(),
        }])
        .unwrap();
        refused(
            &mut s,
            "kind: Subnet\nmetadata: {name: civil-affairs-portal}\nspec: {vpc: civil-affairs-prod, cidrV4: 10.30.0.0/25, cidrV6: 'fd30::/64'}\n",
            "cidr_v4",
            "load balancer lb2 has address 10.30.0.127, the network, broadcast or gateway",
        );
        // A VPC keeps the zone its load balancer is exposed to.
        apply(
            &mut s,
            &format!("{LB}10.30.0.101, exposure: zone, natHosts: [{{host: hv-01, ipv4: 10.30.0.200}}]}}\n")
                .replace("lb2", "lbz"),
        )
        .unwrap();
        refused(
            &mut s,
            "kind: Vpc\nmetadata: {name: civil-affairs-prod, tenant: civil-affairs}\nspec: {displayName: 民政厅生产网, zone: internet, borderFirewall: department-border}\n",
            "zone_id",
            "load balancer lbz is exposed to zone",
        );
    }

    /// What a load balancer uses cannot go while it does, and a batch that
    /// fails half-way leaves nothing.
    #[test]
    fn what_is_used_stays_and_batches_are_whole() {
        let mut s = cloud();
        deleted_refused(
            &mut s,
            Kind::Port,
            "portal-1-eth0",
            "member portal-web-1 of pool portal-web",
        );
        deleted_refused(&mut s, Kind::Pool, "portal-web", "listener portal-");
        deleted_refused(&mut s, Kind::LoadBalancer, "portal-lb", "pool portal-web");
        deleted_refused(&mut s, Kind::Subnet, "civil-affairs-portal", "still used by");
        let before = s.clone();
        // A whole load balancer in one batch, whose last member is wrong.
        let yaml = format!("{LB}10.30.0.101}}\n---\nkind: Pool\nmetadata: {{name: p4}}\nspec: {{loadBalancer: lb2}}\n---\nkind: Listener\nmetadata: {{name: l4}}\nspec: {{loadBalancer: lb2, protocol: tcp, port: 80, pool: p4, scheduler: maglev}}\n---\n{MEMBER}port: police-1}}\n").replace("portal-web,", "p4,");
        assert!(apply(&mut s, &yaml).is_err());
        assert_eq!(s, before);
        // Taken down in order, everything goes.
        let del = |kind: Kind, id: &str| Op::Delete { kind, id: id.into() };
        s.apply_batch(&[
            del(Kind::Member, "portal-web-1"),
            del(Kind::Member, "portal-web-2"),
            del(Kind::Listener, "portal-http"),
            del(Kind::Listener, "portal-https"),
            del(Kind::Pool, "portal-web"),
            del(Kind::LoadBalancer, "portal-lb"),
            del(Kind::VirtualIp, "portal-vip"),
            del(Kind::Port, "portal-1-eth0"),
        ])
        .unwrap();
        assert!(s.load_balancers.is_empty() && s.members.is_empty());
        // And the tenant, VPC and subnet of a load balancer are held.
        apply(&mut s, &format!("{LB}10.30.0.101}}\n")).unwrap();
        deleted_refused(&mut s, Kind::Vpc, "civil-affairs-prod", "still used by");
        deleted_refused(&mut s, Kind::Tenant, "civil-affairs", "load balancer lb2");
        s.apply_batch(&[del(Kind::Port, "portal-2-eth0")]).unwrap();
        deleted_refused(
            &mut s,
            Kind::Subnet,
            "civil-affairs-portal",
            "load balancer lb2 (its address 10.30.0.101)",
        );
    }

    /// Health reports change a member's health alone, and only of a member
    /// still there and checked as the report's agent saw it; puts keep the
    /// health and the drain's first start.
    #[test]
    fn health_and_the_drains_start_merge_with_the_member_as_it_is() {
        let mut s = cloud();
        assert!(s.pools["portal-web"].health.is_some());
        let was = s.members["portal-web-1"].clone();
        let mut report = was.clone();
        report.health_report = true;
        report.weight = 99;
        report.health = Some(MemberHealth {
            up: false,
            since_unix_ms: 7,
            host_id: "hv-01".into(),
            detail: "connection refused".into(),
        });
        s.apply_batch(&[Op::PutMember(report.clone())]).unwrap();
        let m = &s.members["portal-web-1"];
        assert_eq!(m.health, report.health);
        assert_eq!((m.weight, m.health_report), (was.weight, false));
        // The tenant's put keeps the health; a drain starts once.
        let mut put = was.clone();
        put.state = MemberState::Draining;
        put.draining_since_unix_ms = Some(1000);
        s.apply_batch(&[Op::PutMember(put.clone())]).unwrap();
        put.draining_since_unix_ms = Some(2000);
        put.weight = 3;
        s.apply_batch(&[Op::PutMember(put.clone())]).unwrap();
        let m = &s.members["portal-web-1"];
        assert_eq!((m.weight, m.draining_since_unix_ms), (3, Some(1000)));
        assert_eq!(m.health, report.health);
        // A late report of a member deleted meanwhile brings nothing back.
        let mut late = s.members["portal-web-2"].clone();
        s.apply_batch(&[Op::Delete {
            kind: Kind::Member,
            id: "portal-web-2".into(),
        }])
        .unwrap();
        late.health_report = true;
        late.health = report.health.clone();
        let before = s.clone();
        assert!(s.apply_batch(&[Op::PutMember(late.clone())]).is_err());
        assert_eq!(s, before);
        // Nor does one of a member whose target changed since.
        let mut moved = report.clone();
        moved.target = MemberTarget::Address("10.30.0.50".parse().unwrap());
        assert!(s.apply_batch(&[Op::PutMember(moved)]).is_err());
        assert_eq!(s, before);
    }
}
