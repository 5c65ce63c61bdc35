//! HTTP listeners and certificates checked: a listener's certificates are
//! its load balancer's tenant's, its pools its load balancer's, its proxy
//! ports the load balancer's VPC's and tenant's, each serving one load
//! balancer; its rules are checked by the proxy's own checks, so the
//! controller takes no rule the proxy would refuse.

use std::collections::BTreeSet;
use std::net::IpAddr;

use crate::model::*;
use crate::state::{BatchError, Ctx, State};

impl State {
    pub(crate) fn put_certificate(&mut self, c: &Ctx, x: &Certificate) -> Result<(), BatchError> {
        check_id(&x.id).map_err(|m| c.err("id", m))?;
        if !self.tenants.contains_key(&x.tenant_id) {
            return Err(c.err("tenant_id", format!("unknown tenant {:?}", x.tenant_id)));
        }
        if let Some(old) = self.certificates.get(&x.id) {
            if old.tenant_id != x.tenant_id {
                return Err(c.err(
                    "tenant_id",
                    format!("certificate {} is tenant {}'s; it cannot move", x.id, old.tenant_id),
                ));
            }
        }
        if x.names.is_empty() {
            return Err(c.err("cert_pem", "the certificate names no host"));
        }
        self.replace(Kind::Certificate, &x.id, Some(Object::Certificate(x.clone())));
        Ok(())
    }

    pub(crate) fn put_http_listener(&mut self, c: &Ctx, l: &HttpListener) -> Result<(), BatchError> {
        check_id(&l.id).map_err(|m| c.err("id", m))?;
        let lb = self.load_balancers.get(&l.load_balancer_id).ok_or_else(|| {
            c.err(
                "load_balancer_id",
                format!("unknown load balancer {:?}", l.load_balancer_id),
            )
        })?;
        if let Some(old) = self.http_listeners.get(&l.id) {
            if old.load_balancer_id != l.load_balancer_id {
                return Err(c.err(
                    "load_balancer_id",
                    format!(
                        "http listener {} is load balancer {}'s; a listener cannot move",
                        l.id, old.load_balancer_id
                    ),
                ));
            }
        }
        if l.port == 0 {
            return Err(c.err("port", "must be 1 to 65535"));
        }
        if let Some(o) = self
            .listeners
            .values()
            .find(|o| o.load_balancer_id == lb.id && o.protocol == LbProtocol::Tcp && o.port == l.port)
        {
            return Err(c.err(
                "port",
                format!(
                    "load balancer {} already has listener {} on tcp/{}",
                    lb.id, o.id, l.port
                ),
            ));
        }
        let mut count = 1 + self.listeners.values().filter(|o| o.load_balancer_id == lb.id).count();
        for o in self
            .http_listeners
            .values()
            .filter(|o| o.load_balancer_id == lb.id && o.id != l.id)
        {
            count += 1;
            if o.port == l.port {
                return Err(c.err(
                    "port",
                    format!(
                        "load balancer {} already has http listener {} on tcp/{}",
                        lb.id, o.id, l.port
                    ),
                ));
            }
        }
        if count > LB_LISTENERS_MAX {
            return Err(c.err(
                "load_balancer_id",
                format!(
                    "load balancer {} would have {count} listeners, at most {LB_LISTENERS_MAX}",
                    lb.id
                ),
            ));
        }
        // Certificates: the load balancer's tenant's; another tenant's
        // reads as one that does not exist.
        match l.protocol {
            HttpProtocol::Http if !l.certificate_ids.is_empty() => {
                return Err(c.err("certificate_ids", "an http listener has no certificates"));
            }
            HttpProtocol::Https if l.certificate_ids.is_empty() => {
                return Err(c.err("certificate_ids", "an https listener needs at least one certificate"));
            }
            _ => {}
        }
        if l.certificate_ids.len() > HTTP_CERTIFICATES_MAX {
            return Err(c.err("certificate_ids", format!("more than {HTTP_CERTIFICATES_MAX}")));
        }
        let mut seen = BTreeSet::new();
        for (i, id) in l.certificate_ids.iter().enumerate() {
            if self.certificates.get(id).is_none_or(|x| x.tenant_id != lb.tenant_id) {
                return Err(c.err(
                    &format!("certificate_ids[{i}]"),
                    format!("tenant {} has no certificate {id:?}", lb.tenant_id),
                ));
            }
            if !seen.insert(id) {
                return Err(c.err(&format!("certificate_ids[{i}]"), format!("{id} is named twice")));
            }
        }
        // Pools: the load balancer's own.
        let own_pool = |p: &str| self.pools.get(p).is_some_and(|x| x.load_balancer_id == lb.id);
        if let Some(p) = &l.pool_id {
            if !own_pool(p) {
                return Err(c.err("pool_id", format!("load balancer {} has no pool {p:?}", lb.id)));
            }
        }
        if l.rules.len() > HTTP_RULES_MAX {
            return Err(c.err("rules", format!("{} rules, at most {HTTP_RULES_MAX}", l.rules.len())));
        }
        let mut names = BTreeSet::new();
        for (i, r) in l.rules.iter().enumerate() {
            let at = format!("rules[{i}]");
            if !names.insert(&r.name) {
                return Err(c.err(&format!("{at}.name"), format!("rule {:?} is named twice", r.name)));
            }
            if let HttpAction::Respond { body, .. } = &r.action {
                if body.len() > HTTP_BODY_MAX {
                    return Err(c.err(
                        &format!("{at}.action.respond.body"),
                        format!("longer than {HTTP_BODY_MAX} bytes"),
                    ));
                }
            }
            proxy_rule(r)
                .check(&at, own_pool)
                .map_err(|e| proxy_error(c, &at, e, lb))?;
        }
        match &l.scheduler {
            HttpScheduler::HashHeader(h) => {
                sdn_l7lb::config::header_name("hash_key", h).map_err(|e| c.err("hash_key", after_field(&e)))?
            }
            HttpScheduler::HashCookie(k) => {
                sdn_l7lb::config::cookie_name("hash_key", k).map_err(|e| c.err("hash_key", after_field(&e)))?
            }
            _ => {}
        }
        if let Some(k) = &l.cookie {
            sdn_l7lb::config::cookie_name("cookie_name", &k.name).map_err(|e| c.err("cookie_name", after_field(&e)))?;
        }
        if l.trusted_proxies.len() > HTTP_TRUSTED_MAX {
            return Err(c.err("trusted_proxies", format!("more than {HTTP_TRUSTED_MAX}")));
        }
        if let Some(w) = &l.waf_policy_id {
            return Err(c.err(
                "waf_policy_id",
                format!("there is no waf policy {w:?}: WAF policies are not available in this release"),
            ));
        }
        // Proxy ports: the load balancer's VPC's and tenant's, each
        // serving this load balancer alone.
        if l.proxy_ports.is_empty() || l.proxy_ports.len() > HTTP_PROXY_PORTS_MAX {
            return Err(c.err(
                "proxy_ports",
                format!("1 to {HTTP_PROXY_PORTS_MAX} ports run the proxy"),
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, p) in l.proxy_ports.iter().enumerate() {
            let at = format!("proxy_ports[{i}]");
            let in_vpc = self.index().port_vpc.get(p).is_some_and(|v| *v == lb.vpc_id);
            if self.ports.get(p).is_none_or(|x| x.tenant_id != lb.tenant_id) || !in_vpc {
                return Err(c.err(
                    &at,
                    format!("vpc {} of tenant {} has no port {p:?}", lb.vpc_id, lb.tenant_id),
                ));
            }
            if !seen.insert(p) {
                return Err(c.err(&at, format!("{p} is named twice")));
            }
            if let Some(o) = self
                .http_listeners
                .values()
                .find(|o| o.load_balancer_id != lb.id && o.proxy_ports.contains(p))
            {
                return Err(c.err(
                    &at,
                    format!(
                        "port {p} runs the proxy of load balancer {} (http listener {}); one port serves one load balancer",
                        o.load_balancer_id, o.id
                    ),
                ));
            }
            if let Some(m) = self
                .members
                .values()
                .find(|m| m.target == MemberTarget::Port(p.clone()))
            {
                return Err(c.err(
                    &at,
                    format!(
                        "port {p} is member {} of pool {}: a proxy port is no member",
                        m.id, m.pool_id
                    ),
                ));
            }
            self.proxy_port_fits(&self.ports[p], lb).map_err(|m| c.err(&at, m))?;
        }
        self.replace(Kind::HttpListener, &l.id, Some(Object::HttpListener(l.clone())));
        Ok(())
    }

    /// What of the HTTP listeners still uses `kind` `id`, if anything does:
    /// it cannot be deleted.
    pub(crate) fn http_using(&self, kind: Kind, id: &str) -> Option<String> {
        let by = |f: &dyn Fn(&HttpListener) -> bool| {
            self.http_listeners
                .values()
                .find(|l| f(l))
                .map(|l| format!("http listener {}", l.id))
        };
        match kind {
            Kind::Tenant => self
                .certificates
                .values()
                .find(|x| x.tenant_id == id)
                .map(|x| format!("certificate {}", x.id)),
            Kind::LoadBalancer => by(&|l| l.load_balancer_id == id),
            Kind::Pool => by(&|l| l.pools().contains(id)),
            Kind::Certificate => by(&|l| l.certificate_ids.iter().any(|c| c == id)),
            Kind::Port => by(&|l| l.proxy_ports.iter().any(|p| p == id)),
            _ => None,
        }
    }

    /// Whether `port` may run `lb`'s proxy: a port made for it (no VM's
    /// network card, whose device the agent would take over, nor a
    /// virtual IP's holder), with an address of each of the load
    /// balancer's VIP families, which no member of it names.
    fn proxy_port_fits(&self, port: &Port, lb: &LoadBalancer) -> Result<(), String> {
        let p = &port.id;
        if !port.vm_id.is_empty() {
            return Err(format!(
                "port {p} is a network card of vm {}: a proxy port is made for the proxy alone (no vm_id)",
                port.vm_id
            ));
        }
        let holder = VipHolderTarget::Port(p.clone());
        if let Some(v) = self
            .virtual_ips
            .values()
            .find(|v| v.holders.iter().any(|h| h.target == holder))
        {
            return Err(format!(
                "port {p} holds virtual ip {}: a proxy port holds nothing else",
                v.id
            ));
        }
        for (family, wanted, has) in [
            ("IPv4", lb.vip_v4.is_some(), port.ipv4.is_some()),
            ("IPv6", lb.vip_v6.is_some(), port.ipv6.is_some()),
        ] {
            if wanted && !has {
                return Err(format!(
                    "port {p} has no {family} address, and load balancer {} has an {family} VIP",
                    lb.id
                ));
            }
        }
        for a in port.addresses() {
            if let Some(m) = self
                .members_of_lb(&lb.id)
                .find(|m| m.target == MemberTarget::Address(a))
            {
                return Err(format!(
                    "{a}, port {p}'s address, is member {} of pool {}: a proxy port is no member",
                    m.id, m.pool_id
                ));
            }
        }
        Ok(())
    }

    /// A member given by address: no proxy port of its load balancer has
    /// it (the proxy would send requests to itself).
    pub(crate) fn check_member_not_proxy(&self, c: &Ctx, lb: &LoadBalancer, ip: IpAddr) -> Result<(), BatchError> {
        for l in self.http_listeners.values().filter(|l| l.load_balancer_id == lb.id) {
            if let Some(p) = l
                .proxy_ports
                .iter()
                .filter_map(|p| self.ports.get(p))
                .find(|p| p.addresses().any(|a| a == ip))
            {
                return Err(c.err(
                    "address",
                    format!(
                        "{ip} is port {}'s, which runs the proxy of http listener {}",
                        p.id, l.id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A port changed: a proxy port stays in its load balancer's VPC and
    /// tenant, and fit to run the proxy.
    pub(crate) fn check_proxy_ports(&self, c: &Ctx, port: &Port) -> Result<(), BatchError> {
        let vpc = self.index().port_vpc.get(&port.id).map(String::as_str).unwrap_or("");
        for l in self
            .http_listeners
            .values()
            .filter(|l| l.proxy_ports.contains(&port.id))
        {
            let Some(lb) = self.load_balancers.get(&l.load_balancer_id) else {
                continue;
            };
            if lb.vpc_id != vpc || lb.tenant_id != port.tenant_id {
                return Err(c.err(
                    "subnet_id",
                    format!(
                        "port {} runs the proxy of http listener {} in vpc {}: it stays in that vpc and tenant while it does",
                        port.id, l.id, lb.vpc_id
                    ),
                ));
            }
            self.proxy_port_fits(port, lb).map_err(|m| c.err("vm_id", m))?;
        }
        Ok(())
    }

    /// The proxy ports of `host`: each with the HTTP listeners it serves.
    pub fn proxy_ports_on<'a>(&'a self, host: &'a str) -> impl Iterator<Item = &'a Port> + 'a {
        crate::Index::of(&self.index().ports_by_host, host)
            .filter_map(|p| self.ports.get(p))
            .filter(|p| self.http_listeners.values().any(|l| l.proxy_ports.contains(&p.id)))
    }
}

/// The text after a proxy error's field (`rules[0].host: "x" is ...`).
fn after_field(e: &str) -> String {
    e.split_once(": ").map_or(e, |(_, m)| m).to_string()
}

/// A proxy's error about a rule, as an error of the batch naming the
/// rule's field.
fn proxy_error(c: &Ctx, at: &str, e: String, lb: &LoadBalancer) -> BatchError {
    let (field, message) = e.split_once(": ").unwrap_or((at, &e));
    let message = if field.ends_with("action.pool") {
        format!("load balancer {} has no such pool ({message})", lb.id)
    } else {
        message.to_string()
    };
    c.err(field, message)
}

/// A rule as the proxy reads it.
pub fn proxy_rule(r: &HttpRule) -> sdn_l7lb::config::Rule {
    use sdn_l7lb::config as px;
    px::Rule {
        name: r.name.clone(),
        host: r.host.clone(),
        path_prefix: r.path_prefix.clone(),
        path_regex: r.path_regex.clone(),
        header: r.header.as_ref().map(|(name, value)| px::HeaderMatch {
            name: name.clone(),
            value: value.clone(),
        }),
        method: r.method.clone(),
        action: match &r.action {
            HttpAction::Pool(p) => px::Action::Pool(p.clone()),
            HttpAction::Redirect { location, status } => px::Action::Redirect {
                location: location.clone(),
                status: *status,
            },
            HttpAction::Respond {
                status,
                body,
                content_type,
            } => px::Action::Respond {
                status: *status,
                body: body.clone(),
                content_type: content_type.clone(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use crate::lb::tests::{apply, cloud, refused};
    use crate::model::*;
    use crate::State;

    /// The example cloud with the example HTTPS front.
    fn front() -> State {
        let mut s = cloud();
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/http-listeners.yaml")).unwrap();
        let ops: Vec<Op> = crate::manifest::dependency_order(crate::manifest::parse_str("l7.yaml", &text).unwrap())
            .into_iter()
            .map(|l| l.op)
            .collect();
        s.apply_batch(&ops).unwrap();
        s
    }

    /// An HTTPS listener on port 8443 of the example front, with `spec`'s
    /// fields given (YAML flow mappings, `k: v, ...`) over its own.
    fn listener(fields: &str) -> String {
        let mut spec: Vec<(String, String)> = [
            ("loadBalancer", "portal-l7"),
            ("protocol", "https"),
            ("port", "8443"),
            ("certificates", "[portal-cert]"),
            ("proxyPorts", "[portal-proxy-1]"),
            ("pool", "portal-app"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        for f in fields.split(";").filter(|f| !f.trim().is_empty()) {
            let (k, v) = f.split_once(':').unwrap();
            let (k, v) = (k.trim().to_string(), v.trim().to_string());
            spec.retain(|(x, _)| *x != k);
            if v != "~" {
                spec.push((k, v));
            }
        }
        let spec: Vec<String> = spec.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        format!(
            "kind: HttpListener\nmetadata: {{name: l2}}\nspec: {{{}}}\n",
            spec.join(", ")
        )
    }

    #[test]
    fn the_example_front_is_whole() {
        let s = front();
        let c = &s.certificates["portal-cert"];
        assert_eq!(c.names, ["portal.gov.example", "www.portal.gov.example"]);
        assert!(c.not_after_unix > 4_000_000_000, "{}", c.not_after_unix);
        let l = &s.http_listeners["portal-web-https"];
        assert_eq!(l.rules.len(), 3);
        assert_eq!(l.pools().into_iter().collect::<Vec<_>>(), ["portal-app"]);
        assert_eq!(
            l.cookie,
            Some(HttpCookie {
                name: "PORTAL_SRV".into(),
                mode: HttpCookieMode::Insert
            })
        );
        assert_eq!(
            s.proxy_ports_on("hv-01").map(|p| p.id.as_str()).collect::<Vec<_>>(),
            ["portal-proxy-1"]
        );
        apply(&mut s.clone(), &listener("")).unwrap();
    }

    /// Every mistake is refused naming its field, and the state stays.
    #[test]
    fn mistakes_are_refused_by_their_field() {
        let mut s = front();
        for (fields, field, says) in [
            (
                "protocol: http",
                "certificate_ids",
                "an http listener has no certificates",
            ),
            ("certificates: []", "certificate_ids", "needs at least one certificate"),
            (
                "certificates: [nope]",
                "certificate_ids[0]",
                "tenant civil-affairs has no certificate \"nope\"",
            ),
            (
                "certificates: [portal-cert, portal-cert]",
                "certificate_ids[1]",
                "named twice",
            ),
            (
                "port: 443",
                "port",
                "already has http listener portal-web-https on tcp/443",
            ),
            (
                "pool: portal-web",
                "pool_id",
                "load balancer portal-l7 has no pool \"portal-web\"",
            ),
            ("proxyPorts: []", "proxy_ports", "1 to 8 ports"),
            ("proxyPorts: [police-1]", "proxy_ports[0]", "has no port \"police-1\""),
            (
                "proxyPorts: [portal-1-eth0]",
                "proxy_ports[0]",
                "a proxy port is no member",
            ),
            (
                "scheduler: hash_header; hashKey: 'bad header'",
                "hash_key",
                "no header name",
            ),
            ("cookie: {name: 'a,b'}", "cookie_name", "no cookie name"),
            ("wafPolicy: strict", "waf_policy_id", "not available"),
            (
                "rules: [{name: r, pathRegex: '(', pool: portal-app}]",
                "rules[0].path_regex",
                "regex",
            ),
            (
                "rules: [{name: r, pathPrefix: '/a/../b', pool: portal-app}]",
                "rules[0].path_prefix",
                "is read as \"/b\"",
            ),
            (
                "rules: [{name: r, host: 'a b', pool: portal-app}]",
                "rules[0].host",
                "not a host name",
            ),
            (
                "rules: [{name: r, method: get, pool: portal-app}]",
                "rules[0].method",
                "no method",
            ),
            (
                "rules: [{name: r, pool: portal-web}]",
                "rules[0].action.pool",
                "load balancer portal-l7 has no such pool",
            ),
            (
                "rules: [{name: r, redirect: {location: /x, status: 200}}]",
                "rules[0].action.redirect.status",
                "not a redirect",
            ),
            (
                "rules: [{name: r, pool: portal-app}, {name: r, pool: portal-app}]",
                "rules[1].name",
                "named twice",
            ),
        ] {
            refused(&mut s, &listener(fields), field, says);
        }
        // The other way round: an L4 listener on an HTTP listener's port.
        refused(
            &mut s,
            "kind: Listener\nmetadata: {name: l4}\nspec: {loadBalancer: portal-l7, protocol: tcp, port: 80, pool: portal-app, scheduler: maglev}\n",
            "port",
            "already has http listener portal-web-http on tcp/80",
        );
        // UDP on the same number is another port.
        apply(
            &mut s,
            "kind: Listener\nmetadata: {name: l4}\nspec: {loadBalancer: portal-l7, protocol: udp, port: 80, pool: portal-app, scheduler: maglev}\n",
        )
        .unwrap();
        refused(
            &mut s,
            "kind: Member\nmetadata: {name: m9}\nspec: {pool: portal-app, port: portal-proxy-2}\n",
            "port_id",
            "a proxy port is no member",
        );
        // A VM's network card is no proxy port, nor a port without an
        // address of the VIP's family; a member's address is no proxy's.
        apply(
            &mut s,
            "kind: Port\nmetadata: {name: vmcard, tenant: civil-affairs}\nspec: {subnet: civil-affairs-portal, host: hv-01, device: tap-vmcard, mac: '02:30:00:00:00:31', ipv4: 10.30.0.31, vm: portal-9}\n---\nkind: Port\nmetadata: {name: v6only, tenant: civil-affairs}\nspec: {subnet: civil-affairs-portal, host: hv-01, device: l7-v6only, mac: '02:30:00:00:00:32', ipv6: 'fd30::32'}\n",
        )
        .unwrap();
        refused(
            &mut s,
            &listener("proxyPorts: [vmcard]"),
            "proxy_ports[0]",
            "a network card of vm portal-9",
        );
        refused(
            &mut s,
            &listener("proxyPorts: [v6only]"),
            "proxy_ports[0]",
            "has no IPv4 address",
        );
        refused(
            &mut s,
            "kind: Member\nmetadata: {name: m9}\nspec: {pool: portal-app, address: 10.30.0.22}\n",
            "address",
            "is port portal-proxy-2's, which runs the proxy",
        );
        refused(
            &mut s,
            "kind: Port\nmetadata: {name: portal-proxy-2, tenant: civil-affairs}\nspec: {subnet: civil-affairs-portal, host: hv-02, device: l7-portal-2, mac: '02:30:00:00:00:22', ipv4: 10.30.0.22, vm: taken}\n",
            "vm_id",
            "a network card of vm taken",
        );
        // A port serves the proxy of one load balancer.
        let other = "kind: Pool\nmetadata: {name: p-lb}\nspec: {loadBalancer: portal-lb}\n";
        refused(
            &mut s,
            &format!(
                "{other}---\n{}",
                listener("loadBalancer: portal-lb; certificates: [portal-cert]; pool: p-lb")
            ),
            "proxy_ports[0]",
            "runs the proxy of load balancer portal-l7",
        );
    }

    /// What an HTTP listener uses stays while it does.
    #[test]
    fn what_a_listener_uses_stays() {
        let mut s = front();
        for (kind, id, by) in [
            ("Certificate", "portal-cert", "http listener portal-web-https"),
            ("Port", "portal-proxy-2", "http listener portal-web-h"),
            ("LoadBalancer", "portal-l7", ""),
            ("Tenant", "civil-affairs", ""),
        ] {
            let before = s.clone();
            let k = Kind::from_manifest_kind(kind).unwrap();
            let e = s.apply_batch(&[Op::Delete { kind: k, id: id.into() }]).unwrap_err();
            assert!(e.message.contains("still used by") && e.message.contains(by), "{e}");
            assert_eq!(s, before);
        }
        // A pool, its members gone with it in the batch.
        let e = s
            .apply_batch(
                &["portal-app-1", "portal-app-2"]
                    .iter()
                    .map(|m| Op::Delete {
                        kind: Kind::Member,
                        id: m.to_string(),
                    })
                    .chain([Op::Delete {
                        kind: Kind::Pool,
                        id: "portal-app".into(),
                    }])
                    .collect::<Vec<_>>(),
            )
            .unwrap_err();
        assert!(
            e.message.contains("still used by http listener portal-web-https"),
            "{e}"
        );
        // A proxy port stays in its load balancer's VPC.
        refused(
            &mut s,
            "kind: Port\nmetadata: {name: portal-proxy-1, tenant: public-security}\nspec: {subnet: public-security-apps, host: hv-01, device: l7-portal-1, mac: '02:31:00:00:00:21', ipv4: 10.31.0.21}\n",
            "subnet_id",
            "runs the proxy of http listener",
        );
        // Another tenant cannot name the tenant's certificate.
        apply(
            &mut s,
            "kind: LoadBalancer\nmetadata: {name: police-lb, tenant: public-security}\nspec: {vpc: public-security-prod, vipV4: 10.31.0.100}\n---\nkind: Pool\nmetadata: {name: police-pool}\nspec: {loadBalancer: police-lb}\n",
        )
        .unwrap();
        refused(
            &mut s,
            &listener("loadBalancer: police-lb; pool: police-pool; proxyPorts: [police-1]"),
            "certificate_ids[0]",
            "tenant public-security has no certificate \"portal-cert\"",
        );
        // Deleted in the right order, everything goes.
        let ops: Vec<Op> = ["portal-web-https", "portal-web-http"]
            .iter()
            .map(|id| Op::Delete {
                kind: Kind::HttpListener,
                id: id.to_string(),
            })
            .chain([Op::Delete {
                kind: Kind::Certificate,
                id: "portal-cert".into(),
            }])
            .collect();
        s.apply_batch(&ops).unwrap();
        assert!(s.certificates.is_empty() && s.http_listeners.is_empty());
    }

    /// A certificate is taken with its own key only, before it expires;
    /// the error names the field.
    #[test]
    fn a_certificate_needs_its_own_key_and_time() {
        use crate::convert::read_certificate;
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/http-listeners.yaml")).unwrap();
        let block = |marker: &str| -> String {
            let begin = text.find(&format!("-----BEGIN {marker}")).unwrap();
            let end_marker = format!("-----END {marker}-----");
            let end = text[begin..].find(&end_marker).unwrap() + begin + end_marker.len();
            text[begin..end].lines().map(str::trim).collect::<Vec<_>>().join("\n") + "\n"
        };
        let (cert, key) = (block("CERTIFICATE"), block("PRIVATE KEY"));
        let read = read_certificate(&cert, &key, 0).unwrap();
        assert_eq!(read.names.len(), 2);
        assert_eq!(read.chain_pem, cert, "a chain in its own form is kept as it is");
        // Text around the blocks is dropped; a key among the certificates
        // is refused (it would be shown to every reader).
        assert_eq!(
            read_certificate(&format!("issued to the portal\n{cert}"), &key, 0)
                .unwrap()
                .chain_pem,
            cert
        );
        let e = read_certificate(&format!("{cert}{key}"), &key, 0).unwrap_err();
        assert_eq!(e.0, "cert_pem");
        assert!(e.1.contains("holds a PRIVATE KEY block"), "{e:?}");
        let e = read_certificate(&cert, &key, read.not_after_unix).unwrap_err();
        assert_eq!(e.0, "cert_pem");
        assert!(e.1.contains("expired"), "{e:?}");
        let other = boring::ec::EcKey::generate(
            &boring::ec::EcGroup::from_curve_name(boring::nid::Nid::X9_62_PRIME256V1).unwrap(),
        )
        .unwrap();
        let other = String::from_utf8(
            boring::pkey::PKey::from_ec_key(other)
                .unwrap()
                .private_key_to_pem_pkcs8()
                .unwrap(),
        )
        .unwrap();
        let e = read_certificate(&cert, &other, 0).unwrap_err();
        assert_eq!(e, ("key_pem", "the key is not the certificate's".to_string()));
        for (c, k, field) in [
            ("", key.as_str(), "cert_pem"),
            ("not pem", key.as_str(), "cert_pem"),
            (cert.as_str(), "", "key_pem"),
            (
                cert.as_str(),
                "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                "key_pem",
            ),
        ] {
            assert_eq!(read_certificate(c, k, 0).unwrap_err().0, field);
        }
        let huge = cert.repeat(CERTIFICATE_PEM_MAX / cert.len() + 1);
        assert!(read_certificate(&huge, &key, 0).unwrap_err().1.contains("longer than"));
    }
}
