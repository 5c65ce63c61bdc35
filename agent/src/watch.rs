//! The watch client: connects to any controller, registers, receives the
//! host's share (a snapshot, then deltas), enforces each revision and acks
//! it. On a broken stream it retries with backoff, moving through the given
//! controllers, and resumes from the revision and resource versions it holds.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::Context as _;
use sdn_proto::v1 as pb;
use tonic::transport::Channel;

use crate::compile::{self, Resources};
use crate::dataplane::{self, Dataplane};
use crate::flows;
use crate::reconcile::Reconciler;

/// How often timed-out flows leave the flow table and ports' flow counts
/// are recounted.
const CT_COLLECT_EVERY: Duration = Duration::from_secs(5);

/// One agent: its host, its controllers, and its dataplane.
pub struct Agent {
    pub host: String,
    pub controllers: Vec<String>,
    dp: Dataplane,
    rec: Reconciler,
    /// Keeps what each port and endpoint compiled to, across passes.
    compiler: compile::Compiler,
    resources: Resources,
    revision: u64,
    /// Devices whose links this process attached or adopted.
    attached: BTreeSet<u32>,
    /// Ports quarantined as of the last pass, for the event log.
    quarantined: std::collections::BTreeMap<String, (String, String)>,
    /// When the next quarantine expires (Unix ms).
    next_expiry: Option<u64>,
    /// Uplinks this process attached the zone guard to or adopted.
    uplinks: BTreeSet<u32>,
    /// Zones whose uplink device is missing, as last logged.
    missing_uplinks: Vec<(String, String)>,
    /// The uplink devices and their own addresses as last enforced: a
    /// change of address is enforced on the next collection tick.
    uplink_devices: std::collections::BTreeMap<u32, String>,
    uplink_addrs: BTreeSet<dataplane_common::maps::PortAddrKey>,
    /// The virtual IPs' addresses never taken for the uplinks' own.
    held_vips: BTreeSet<std::net::IpAddr>,
    /// The revision last acknowledged as enforced (for the metrics).
    enforced: std::sync::Arc<std::sync::atomic::AtomicU64>,
    /// Flow records, when the agent exports them.
    flows: Option<FlowExport>,
    /// What flow records and events say of each port, kept with the share.
    flow_ctx: flows::SharedContext,
    flow_stats: Option<std::sync::Arc<flows::Stats>>,
    /// Security events, when the agent sends them.
    events: Option<crate::events::Events>,
    /// Where the mirror copies that reach the agent go, and their counts.
    mirror_table: crate::mirror::Table,
    pub mirror_stats: std::sync::Arc<crate::mirror::Stats>,
    /// The mirror sessions by slot, as last enforced (for the metrics).
    pub mirror_sessions: std::sync::Arc<std::sync::RwLock<std::collections::BTreeMap<u32, String>>>,
    /// Information systems' traffic, metered and reported.
    usage: crate::usage::Usage,
    /// Load balancers' health checks of the members on this host's ports.
    health: crate::health::Health,
    /// The virtual IPs this host holds (started with the runtime).
    vips: Option<crate::vips::Vips>,
    /// Their flows, carried to the other holders.
    flow_sync: Option<crate::natsync::FlowSync>,
    /// The HTTP proxies of this host's proxy ports (started with the
    /// runtime).
    proxies: Option<crate::proxies::Proxies>,
    /// A proxy failed to be set up, or waits for its old slot: tried
    /// again on the next collection tick whatever the ack said.
    proxies_retry: bool,
}

/// What an agent makes of its flow table's passes.
struct FlowExport {
    meter: flows::Meter,
    /// IPFIX, when exported.
    outputs: Option<flows::Outputs>,
    /// TCP records, when written.
    records: Option<crate::records::JsonLines>,
}

/// The outcome of enforcing the held share.
#[derive(Debug, PartialEq, Eq)]
pub enum Enforced {
    /// Everything is in the kernel.
    Done,
    /// Some ports' devices are not on the host yet; retried on the next tick.
    Pending(Vec<(String, String)>),
    /// Everything but these objects is in the kernel; they fail closed.
    Partial(Vec<String>),
}

impl Agent {
    pub fn new(host: String, controllers: Vec<String>, mut dp: Dataplane) -> anyhow::Result<Agent> {
        let rec = Reconciler::new(dp.map_set()?).context("reading the pinned maps")?;
        tracing::info!(host = %host, ports = rec.port_count(), links = dp.attached().len(), "adopted pinned dataplane state");
        let mut compiler = compile::Compiler::default();
        compiler.host = host.clone();
        match dp.lb_held() {
            Ok(held) => {
                if !held.services.is_empty() {
                    tracing::info!(services = held.services.len(), "adopted the load balancers' numbering");
                }
                compiler.seed_lb(held);
            }
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "load balancers' numbering not read: flows through VIPs may be scheduled again")
            }
        }
        Ok(Agent {
            health: crate::health::Health::new(host.clone(), controllers.clone()),
            host,
            controllers,
            dp,
            rec,
            compiler,
            resources: Resources::new(),
            revision: 0,
            attached: BTreeSet::new(),
            quarantined: Default::default(),
            next_expiry: None,
            uplinks: BTreeSet::new(),
            missing_uplinks: Vec::new(),
            uplink_devices: Default::default(),
            uplink_addrs: BTreeSet::new(),
            held_vips: BTreeSet::new(),
            enforced: Default::default(),
            flows: None,
            flow_ctx: Default::default(),
            flow_stats: None,
            events: None,
            mirror_table: Default::default(),
            mirror_stats: Default::default(),
            mirror_sessions: Default::default(),
            usage: Default::default(),
            vips: None,
            flow_sync: None,
            proxies: None,
            proxies_retry: false,
        })
    }

    /// Carries the flows of the virtual IPs held by hosts that this host
    /// holds to the other holders, and takes theirs (within a runtime).
    pub async fn start_flow_sync(
        &mut self,
        pin_dir: &std::path::Path,
        files: sdn_proto::tls::Files,
        listen: std::net::SocketAddr,
        port: u16,
    ) -> anyhow::Result<()> {
        self.flow_sync = Some(crate::natsync::FlowSync::start(pin_dir, files, listen, port).await?);
        Ok(())
    }

    /// Runs the HTTP proxies of this host's proxy ports.
    pub fn start_proxies(&mut self, settings: crate::proxies::Settings) -> anyhow::Result<()> {
        self.proxies = Some(crate::proxies::Proxies::new(&self.host, settings)?);
        Ok(())
    }

    /// Starts the VRRP speakers' manager for the virtual IPs this host
    /// holds (within a runtime).
    pub fn start_vips(&mut self, pin_dir: &std::path::Path) -> anyhow::Result<()> {
        self.vips = Some(crate::vips::Vips::start(
            self.host.clone(),
            self.controllers.clone(),
            pin_dir,
        )?);
        Ok(())
    }

    /// Sends on the mirror copies the programs hand up (for taps on other
    /// hosts, collectors, and copies cut to a snap length).
    pub fn start_mirroring(&mut self, underlay: Option<std::net::IpAddr>) -> anyhow::Result<()> {
        let perf = self.dp.take_mirror_ring().context("opening the mirror copies")?;
        crate::mirror::run(perf, self.mirror_table.clone(), self.mirror_stats.clone(), underlay)
    }

    /// Meters information systems' traffic and reports it to the
    /// controllers.
    pub fn start_usage(&self) -> anyhow::Result<()> {
        self.usage.start(
            self.dp.pin_dir().to_path_buf(),
            self.host.clone(),
            self.controllers.clone(),
        )
    }

    /// Exports flow records (`flows`): the flow table's, from each
    /// collection pass, and denied flows', from the dataplane's denial
    /// events; sends security events (`events`): quarantines, and the
    /// denials a supervisor is told of; writes protocol records
    /// (`records`): TCP connections as they end, DNS answers.
    pub fn export(
        &mut self,
        flows: Option<&flows::Settings>,
        events: Option<crate::events::Events>,
        records: Option<crate::records::JsonLines>,
    ) -> anyhow::Result<()> {
        if flows.is_none() && events.is_none() && records.is_none() {
            return Ok(());
        }
        let stats = std::sync::Arc::new(flows::Stats::default());
        if flows.is_some() || events.is_some() {
            let ring = self.dp.take_events().context("opening the denial events")?;
            let outputs = flows.map(|s| flows::Outputs::start(s, stats.clone()));
            let sinks = flows::DenialSinks {
                flows: outputs.clone().zip(flows.map(|s| s.denied_per_sec)),
                events: events.clone(),
            };
            let (c, st) = (self.flow_ctx.clone(), stats.clone());
            tokio::spawn(async move {
                if let Err(e) = flows::read_denials(ring, c, st, sinks).await {
                    tracing::error!(error = %format!("{e:#}"), "reading the denial events stopped: denied flows are neither recorded nor reported");
                }
            });
            // The flow table is metered only for flow or protocol records.
            if let Some(s) = flows {
                self.flows = Some(FlowExport {
                    meter: flows::Meter::new(s),
                    outputs,
                    records: None,
                });
            }
        }
        if let Some(r) = &records {
            let perf = self.dp.take_dns_copies().context("opening the DNS copies")?;
            let ipfix = self.flows.as_ref().and_then(|f| f.outputs.clone());
            crate::records::read_dns(perf, self.flow_ctx.clone(), self.host.clone(), r.clone(), ipfix)?;
            let f = self.flows.get_or_insert_with(|| FlowExport {
                meter: flows::Meter::new(&flows::Settings::default()),
                outputs: None,
                records: None,
            });
            let meter = std::mem::replace(&mut f.meter, flows::Meter::new(&flows::Settings::default()));
            f.meter = meter.with_tcp_records(&self.host);
            f.records = Some(r.clone());
        }
        self.flow_stats = Some(stats);
        self.events = events;
        Ok(())
    }

    /// One pass of the conntrack collector, metering flows when exported.
    fn collect(&mut self) -> anyhow::Result<(usize, usize)> {
        let Some(f) = self.flows.as_mut() else {
            if let Err(e) = self.dp.collect_nat_observed(&mut |_, _, _| {}) {
                tracing::warn!(error = %format!("{e:#}"), "north-south flows not collected");
            }
            return self.dp.collect_conntrack();
        };
        let ctx = self.flow_ctx.read().unwrap_or_else(|p| p.into_inner()).clone();
        f.meter.begin(flows::Clock::now(), ctx);
        let r = self
            .dp
            .collect_conntrack_observed(&mut |k, v, removed| f.meter.observe(k, v, removed));
        if !matches!(r, Ok((_, _, 0))) {
            f.meter.incomplete();
        }
        if let Err(e) = self
            .dp
            .collect_nat_observed(&mut |k, v, removed| f.meter.observe(k, v, removed))
        {
            f.meter.incomplete();
            tracing::warn!(error = %format!("{e:#}"), "north-south flows not collected");
        }
        let dp = &self.dp;
        let records = if f.outputs.is_some() {
            f.meter.end(&|k| dp.allowed_by_firewall(k), &|k| dp.lb_of_flow(k))
        } else {
            f.meter.end(&|_| None, &|_| None)
        };
        if let Some(o) = &f.outputs {
            o.send(records);
        }
        let tcp = f.meter.take_tcp();
        if let Some(out) = &f.records {
            for t in &tcp {
                out.put(t);
            }
        }
        if let Some(o) = &f.outputs {
            o.send_records(tcp.iter().map(|t| t.ipfix()).collect());
        }
        r.map(|(removed, remaining, _)| (removed, remaining))
    }

    /// What the metrics endpoint reads.
    pub fn metric_sources(&self) -> crate::metrics::Sources {
        crate::metrics::Sources {
            pin_dir: self.dp.pin_dir().to_path_buf(),
            traffic: self.dp.traffic(),
            enforced: self.enforced.clone(),
            flows: self.flow_stats.clone(),
            syslog: self.events.as_ref().map(|e| e.clone()),
            mirror_sessions: self.mirror_sessions.clone(),
            mirror: self.mirror_stats.clone(),
            usage: self.usage.stats(),
        }
    }

    /// Makes the kernel match the held share.
    pub fn enforce(&mut self) -> anyhow::Result<Enforced> {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let started = std::time::Instant::now();
        // The proxies' devices first: their ports are enforced in this
        // same pass.
        let proxied = match &mut self.proxies {
            Some(p) if tokio::runtime::Handle::try_current().is_ok() => p.sync(&self.resources),
            _ => Default::default(),
        };
        let mut desired = self.compiler.compile(&self.resources, &dataplane::ifindex, now_ms)?;
        let compiled = started.elapsed();
        // A device whose addresses cannot be listed keeps the ones enforced.
        let held = self.uplink_addrs.clone();
        compile::add_uplink_addresses(&mut desired, &|name| match dataplane::addresses(name) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(device = %name, error = %e, "listing an uplink's addresses; keeping the enforced ones");
                let ifx = dataplane::ifindex(name).unwrap_or(0);
                held.iter()
                    .filter(|k| k.ifindex == ifx)
                    .map(compile::key_address)
                    .collect()
            }
        });
        self.proxies_retry = !proxied.problems.is_empty() || !proxied.waiting.is_empty();
        desired.rejected.extend(proxied.problems);
        desired.missing_devices.extend(proxied.waiting);
        let want: BTreeSet<u32> = desired.ports.keys().copied().collect();
        // Detach from devices that are no longer ports before their entries go.
        let gone: BTreeSet<u32> = self
            .dp
            .attached()
            .union(&self.rec.ports())
            .copied()
            .filter(|i| !want.contains(i))
            .collect();
        for i in &gone {
            self.dp.detach(*i);
            self.attached.remove(i);
        }
        let changes = match self.rec.reconcile(&desired) {
            Ok(c) => {
                self.uplink_addrs = desired.uplink_addrs.clone();
                self.held_vips = desired.held_vips.clone();
                self.uplink_devices = desired.uplink_devices.clone();
                c
            }
            Err(e) => {
                // Whatever else failed, quarantines hold.
                match self.rec.enforce_quarantines(&desired) {
                    Ok(n) if n > 0 => tracing::warn!(ports = n, "quarantines enforced although the rest failed"),
                    Ok(_) => {}
                    Err(q) => tracing::error!(error = %format!("{q:#}"), "enforcing quarantines failed"),
                }
                return Err(e);
            }
        };
        // Attach after the port's entries exist: the programs fail closed.
        let fresh: Vec<u32> = want.difference(&self.attached).copied().collect();
        for ifx in fresh {
            let name = dataplane::ifname(ifx).unwrap_or_default();
            self.dp.attach(&name, ifx)?;
            self.attached.insert(ifx);
            tracing::info!(device = %name, ifindex = ifx, "programs attached");
        }
        // Mirroring after the ports' entries and programs: its observers go
        // first on their devices and pass every packet on.
        match self.dp.apply_mirror(&desired.mirror) {
            Ok(applied) => {
                for slot in &applied.changed {
                    self.mirror_stats.reset(*slot);
                }
                *self.mirror_table.write().unwrap_or_else(|p| p.into_inner()) =
                    crate::mirror::table_of(&desired.mirror, &applied.generations);
                *self.mirror_sessions.write().unwrap_or_else(|p| p.into_inner()) =
                    desired.mirror.slots.iter().map(|(k, s)| (*k, s.id.clone())).collect();
            }
            Err(e) => {
                self.mirror_table.write().unwrap_or_else(|p| p.into_inner()).clear();
                let e = format!("mirroring: {e:#}");
                tracing::error!(error = %e, "mirror sessions not enforced; the rest is");
                desired.rejected.push(e);
            }
        }
        // VRRP of holder ports, after their entries and programs.
        if let Err(e) = self.dp.apply_vrrp(&desired.vrrp_ports) {
            let e = format!("VRRP of virtual ips held by ports: {e:#}");
            tracing::error!(error = %e, "VRRP not relayed; the rest is enforced");
            desired.rejected.push(e);
        }
        // Load balancers' services.
        if let Err(e) = self.dp.apply_lb(&desired.lb) {
            let e = format!("load balancers: {e:#}");
            tracing::error!(error = %e, "load balancers not enforced; the rest is");
            desired.rejected.push(e);
        }
        // Health checks of this host's members (they need a runtime:
        // passes run within the agent's).
        if tokio::runtime::Handle::try_current().is_ok() {
            self.health
                .set(crate::health::checks(&self.resources, &dataplane::ifindex, &|p| {
                    desired.quarantined.contains_key(p)
                }));
        }
        // The virtual IPs this host holds on its uplinks.
        if let Some(v) = &self.vips {
            let (held, problems) = crate::vips::held(&self.resources, &self.host, &|name| {
                dataplane::addresses(name).unwrap_or_default()
            });
            v.set(held);
            v.set_ports(crate::vips::port_held(&self.resources, &dataplane::ifindex));
            for p in problems {
                tracing::error!(error = %p, "virtual ip not held");
                desired.rejected.push(p);
            }
        }
        if let Some(s) = &self.flow_sync {
            let (plan, problems) = crate::natsync::plan(&self.resources, &self.host);
            s.set(plan);
            for p in problems {
                tracing::error!(error = %p, "flows not carried");
                desired.rejected.push(p);
            }
        }
        // Information systems' ports, for the bandwidth of each system.
        match self.dp.apply_systems(&desired.systems) {
            Ok(fresh) => self.usage.set_plan(&desired.systems, &fresh),
            Err(e) => {
                let e = format!("information systems: {e:#}");
                tracing::error!(error = %e, "systems' traffic not counted; the rest is enforced");
                desired.rejected.push(e);
            }
        }
        // The zone guard on every uplink; off devices that no longer are one.
        let held_uplinks = self.dp.attached_uplinks();
        for (ifx, name) in &desired.uplink_devices {
            if !self.uplinks.contains(ifx) {
                self.dp.attach_uplink(name, *ifx)?;
                self.uplinks.insert(*ifx);
                tracing::info!(device = %name, ifindex = ifx, "zone guard attached to uplink");
            }
        }
        for ifx in held_uplinks.union(&self.uplinks.clone()) {
            if !desired.uplink_devices.contains_key(ifx) {
                self.dp.detach_uplink(*ifx);
                self.uplinks.remove(ifx);
                tracing::info!(
                    ifindex = ifx,
                    "zone guard detached from a device that is no uplink any more"
                );
            }
        }
        // Every link (ports, uplinks, the tunnel's) now runs this load's
        // programs: earlier loads' stages go.
        self.dp.retire_old_pipelines();
        if desired.missing_uplinks != self.missing_uplinks {
            for (zone, dev) in &desired.missing_uplinks {
                tracing::warn!(zone = %zone, device = %dev, "uplink device missing on this host: the zone is unreachable from here");
            }
            self.missing_uplinks = desired.missing_uplinks.clone();
        }
        let flushed = self.dp.flush_conntrack(&gone)?;
        if self.flow_stats.is_some() {
            let ctx = flows::Context::of_share(&self.resources, &dataplane::ifindex, &desired.fw_names);
            let mut held = self.flow_ctx.write().unwrap_or_else(|p| p.into_inner());
            if **held != ctx {
                *held = std::sync::Arc::new(ctx);
            }
        }
        // Security events: quarantines applied and lifted on this host.
        for (port, (q, reason)) in &desired.quarantined {
            if !self.quarantined.contains_key(port) {
                tracing::warn!(event = "quarantine_applied", host = %self.host, port = %port, quarantine = %q, reason = %reason, "port quarantined: all its traffic is dropped");
                if let Some(e) = &self.events {
                    e.quarantine(true, port, q, reason);
                }
            }
        }
        for (port, (q, reason)) in &self.quarantined {
            if !desired.quarantined.contains_key(port) {
                tracing::warn!(event = "quarantine_lifted", host = %self.host, port = %port, quarantine = %q, "quarantine lifted");
                if let Some(e) = &self.events {
                    e.quarantine(false, port, q, reason);
                }
            }
        }
        self.quarantined = desired.quarantined.clone();
        self.next_expiry = desired.next_expiry;
        if changes.put + changes.deleted + gone.len() > 0 {
            let fresh = self.compiler.last;
            tracing::info!(
                revision = self.revision,
                put = changes.put,
                deleted = changes.deleted,
                detached = gone.len(),
                flushed,
                ports = desired.ports.len(),
                ports_compiled = fresh.ports,
                endpoints_compiled = fresh.endpoints,
                compile_us = compiled.as_micros() as u64,
                total_us = started.elapsed().as_micros() as u64,
                "reconciled"
            );
        }
        for r in &desired.rejected {
            tracing::error!(object = %r, "cannot enforce this object; it fails closed, the rest is enforced");
        }
        Ok(if !desired.rejected.is_empty() {
            Enforced::Partial(desired.rejected)
        } else if desired.missing_devices.is_empty() {
            Enforced::Done
        } else {
            Enforced::Pending(desired.missing_devices)
        })
    }

    fn apply_message(&mut self, msg: pb::WatchResponse) {
        if msg.snapshot {
            self.resources.clear();
        }
        for name in msg.removals {
            self.resources.remove(&name);
        }
        for r in msg.upserts {
            self.resources.insert(r.name.clone(), r);
        }
        self.revision = msg.revision;
    }

    /// Runs forever: watch, enforce, ack; reconnect with backoff.
    pub async fn run(&mut self) -> ! {
        let mut backoff = Duration::from_millis(100);
        let mut idx = 0usize;
        loop {
            let addr = self.controllers[idx % self.controllers.len()].clone();
            match self.session(&addr).await {
                Ok(progressed) => {
                    tracing::warn!(controller = %addr, "watch stream ended");
                    if progressed {
                        backoff = Duration::from_millis(100);
                    }
                }
                Err((progressed, e)) => {
                    if progressed {
                        backoff = Duration::from_millis(100);
                    }
                    tracing::warn!(controller = %addr, error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "controller unreachable or stream broken")
                }
            }
            idx += 1;
            // Jitter of up to a quarter of the delay, from the clock.
            let jitter = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0) as u64
                % (backoff.as_millis() as u64 / 4 + 1);
            tokio::time::sleep(backoff + Duration::from_millis(jitter)).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn ack(
        &self,
        client: &mut pb::agent_client::AgentClient<Channel>,
        ok: bool,
        reason: String,
    ) -> anyhow::Result<()> {
        client
            .ack(pb::AckRequest {
                host_id: self.host.clone(),
                revision: self.revision,
                ok,
                reason,
            })
            .await
            .context("sending the ack")?;
        if ok {
            self.enforced.store(self.revision, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(())
    }

    /// One connection. Returns whether any message arrived.
    async fn session(&mut self, addr: &str) -> Result<bool, (bool, anyhow::Error)> {
        let mut progressed = false;
        let ch = sdn_proto::connect(addr)
            .await
            .map_err(|e| (false, anyhow::Error::from(e).context("connecting")))?;
        let mut client = pb::agent_client::AgentClient::new(ch);
        client
            .register(pb::RegisterRequest {
                host_id: self.host.clone(),
                agent_version: env!("CARGO_PKG_VERSION").into(),
            })
            .await
            .map_err(|s| (false, anyhow::anyhow!("register: {:?}: {}", s.code(), s.message())))?;
        let req = pb::WatchRequest {
            host_id: self.host.clone(),
            revision: self.revision,
            resource_versions: self
                .resources
                .iter()
                .map(|(n, r)| (n.clone(), r.version.clone()))
                .collect(),
            protocol: sdn_proto::WATCH_PROTOCOL,
        };
        tracing::info!(controller = %addr, from_revision = self.revision, held = self.resources.len(), "watching");
        let mut stream = client
            .watch(req)
            .await
            .map_err(|s| (false, anyhow::anyhow!("watch: {:?}: {}", s.code(), s.message())))?
            .into_inner();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        let mut collect = tokio::time::interval(CT_COLLECT_EVERY);
        let mut pending = false;
        loop {
            tokio::select! {
                msg = stream.message() => {
                    let msg = match msg {
                        Ok(Some(m)) => m,
                        Ok(None) => return Ok(progressed),
                        Err(s) => return Err((progressed, anyhow::anyhow!("stream: {:?}: {}", s.code(), s.message()))),
                    };
                    progressed = true;
                    let (snap, up, rm) = (msg.snapshot, msg.upserts.len(), msg.removals.len());
                    self.apply_message(msg);
                    tracing::debug!(revision = self.revision, snapshot = snap, upserts = up, removals = rm, "update");
                    pending = self.enforce_and_ack(&mut client).await.map_err(|e| (progressed, e))?;
                }
                _ = tick.tick(), if pending || self.next_expiry.is_some() => {
                    // Something expires (a quarantine, a drain): enforced
                    // once its time has come, not every second until then.
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    if pending || self.next_expiry.is_some_and(|t| t <= now_ms) {
                        pending = self.enforce_and_ack(&mut client).await.map_err(|e| (progressed, e))?;
                    }
                }
                _ = collect.tick() => {
                    if self.proxies_retry {
                        pending = true;
                    }
                    if self.proxies.as_ref().is_some_and(|p| p.binary_changed()) {
                        tracing::info!("the HTTP proxy's binary changed: upgrading the proxies");
                        pending = true;
                    }
                    if self.uplink_addresses_moved() {
                        tracing::info!("an uplink's addresses changed: enforcing them");
                        pending = true;
                    }
                    match self.collect() {
                        Ok((removed, remaining)) if removed > 0 => {
                            tracing::debug!(removed, remaining, "conntrack: timed-out flows removed");
                        }
                        Ok(_) => {}
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "conntrack collection failed; retried"),
                    }
                    if let Err(e) = self.dp.recount_lb() {
                        tracing::warn!(error = %format!("{e:#}"), "load balancers' flow counts not refreshed; retried");
                    }
                }
            }
        }
    }

    /// Whether an uplink's own addresses differ from the enforced ones.
    fn uplink_addresses_moved(&self) -> bool {
        let mut d = compile::Desired {
            uplink_devices: self.uplink_devices.clone(),
            held_vips: self.held_vips.clone(),
            ..Default::default()
        };
        let failed = std::cell::Cell::new(false);
        compile::add_uplink_addresses(&mut d, &|name| {
            dataplane::addresses(name).unwrap_or_else(|_| {
                failed.set(true);
                Vec::new()
            })
        });
        !failed.get() && d.uplink_addrs != self.uplink_addrs
    }

    /// Enforces and acks; returns whether devices are still missing.
    async fn enforce_and_ack(&mut self, client: &mut pb::agent_client::AgentClient<Channel>) -> anyhow::Result<bool> {
        match self.enforce() {
            Ok(Enforced::Done) => {
                self.ack(client, true, String::new()).await?;
                Ok(false)
            }
            Ok(Enforced::Partial(rejected)) => {
                let reason = format!(
                    "enforced all but {} object(s), which fail closed: {}",
                    rejected.len(),
                    rejected.join("; ")
                );
                self.ack(client, false, reason).await?;
                Ok(false)
            }
            Ok(Enforced::Pending(missing)) => {
                let list: Vec<String> = missing.iter().map(|(p, d)| format!("{p} ({d})")).collect();
                tracing::info!(revision = self.revision, waiting_for = %list.join(", "), "ports whose devices are not on this host yet");
                Ok(true)
            }
            Err(e) => {
                let reason = format!("{e:#}");
                tracing::error!(revision = self.revision, reason = %reason, "cannot enforce; the dataplane keeps its previous state where it could");
                self.ack(client, false, reason).await?;
                Ok(false)
            }
        }
    }
}
