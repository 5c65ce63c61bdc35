//! Flow records of this host's ports, sent over IPFIX to the configured
//! collectors (`run --flow-collector`).
//!
//! - Allowed flows come from the flow table, on each pass of the
//!   conntrack collector ([`Meter`]): a record when the flow ends (TCP FIN
//!   or RST seen, or its entry times out), when it has been idle for the
//!   idle timeout (15 s unless configured), and every active timeout (60 s)
//!   while it carries traffic. Each record holds what the flow carried
//!   since its last one, one record per direction that carried anything,
//!   seen at the port (a flow between two ports of this host is seen at
//!   both, as a switch sees it at two ports).
//! - Denied flows come from the dataplane's denial events (a ring buffer
//!   the programs fill within a per-CPU rate), gathered per flow for a
//!   second ([`Denials`]), then sent at most `denied_per_sec` records a
//!   second; the rest are counted.
//!
//! Records go to each collector through its own bounded queue: a collector
//! that is slow or unreachable loses records (counted), never holds up the
//! agent or another collector.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use dataplane_common::maps::{self as m, CtKey, CtValue, DenyEvent};
use dataplane_common::{DropReason, FAMILY_V4};
use sdn_flowexport::exporter::{Collector, Exporter};
use sdn_flowexport::protocol::Record;
use sdn_flowexport::record::{Direction, EndReason, FirewallEvent, FlowRecord, Verdict};
use sdn_proto::v1 as pb;

/// How the agent exports flows.
#[derive(Clone, Debug)]
pub struct Settings {
    pub collectors: Vec<Collector>,
    /// A flow carrying traffic gets a record at least this often.
    pub active: Duration,
    /// A flow idle this long gets a record for what it carried.
    pub idle: Duration,
    /// The private enterprise number of the cloud's elements.
    pub pen: u32,
    /// The observation domain (this host, to the collector).
    pub domain: u32,
    /// Records each collector's queue holds.
    pub queue: usize,
    /// Records of denied flows sent per second, at most.
    pub denied_per_sec: u32,
}

impl Default for Settings {
    /// No collector; the usual timeouts (60 s active, 15 s idle).
    fn default() -> Settings {
        Settings {
            collectors: Vec::new(),
            active: Duration::from_secs(60),
            idle: Duration::from_secs(15),
            pen: sdn_flowexport::record::PEN_DEFAULT,
            domain: 0,
            queue: 65536,
            denied_per_sec: 100,
        }
    }
}

/// What a port is, for its flows' records.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PortContext {
    pub port: String,
    pub tenant: String,
    pub vpc: String,
    /// The VPC's zone, or empty.
    pub zone: String,
    pub vni: u32,
    /// The port's security groups, as a rule's name: `sg/ID[,ID...]`.
    pub groups: String,
}

/// The context of every port of this host, and the firewalls' rule names.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Context {
    pub ports: HashMap<u32, PortContext>,
    /// Firewall rule numbers -> "policy/rule".
    pub fw_names: BTreeMap<u32, String>,
}

impl Context {
    /// The context of the share's ports that have a device here
    /// (`ifindex` resolves device names), and the firewall rule names of
    /// the compiled share.
    pub fn of_share(
        resources: &crate::compile::Resources,
        ifindex: &dyn Fn(&str) -> Option<u32>,
        fw_names: &BTreeMap<u32, m::RuleName>,
    ) -> Context {
        let mut vpc_of_port = HashMap::new();
        let mut vpcs = HashMap::new();
        for r in resources.values() {
            match &r.kind {
                Some(pb::resource::Kind::Endpoint(e)) => {
                    vpc_of_port.insert(e.port_id.as_str(), e.vpc_id.as_str());
                }
                Some(pb::resource::Kind::VpcNetwork(v)) => {
                    vpcs.insert(v.vpc_id.as_str(), v);
                }
                _ => {}
            }
        }
        let mut ports = HashMap::new();
        for r in resources.values() {
            let Some(pb::resource::Kind::Port(p)) = &r.kind else {
                continue;
            };
            let Some(ifx) = ifindex(&p.device) else { continue };
            let vpc = vpc_of_port.get(p.id.as_str()).copied().unwrap_or_default();
            let net = vpcs.get(vpc);
            ports.insert(
                ifx,
                PortContext {
                    port: p.id.clone(),
                    tenant: p.tenant_id.clone(),
                    vpc: vpc.to_string(),
                    zone: net.map(|n| n.zone_id.clone()).unwrap_or_default(),
                    vni: net.map(|n| n.vni).unwrap_or(0),
                    groups: format!("sg/{}", p.security_group_ids.join(",")),
                },
            );
        }
        // North-south flows translated here: the context of their VPC
        // (see `dataplane::NAT_FLOW_CONTEXT`).
        for r in resources.values() {
            let Some(pb::resource::Kind::LoadBalancer(l)) = &r.kind else {
                continue;
            };
            let Some(lb) = &l.load_balancer else { continue };
            if lb.exposure != "zone" {
                continue;
            }
            let net = vpcs.get(lb.vpc_id.as_str());
            ports.insert(
                crate::dataplane::NAT_FLOW_CONTEXT | l.vni,
                PortContext {
                    port: String::new(),
                    tenant: lb.tenant_id.clone(),
                    vpc: lb.vpc_id.clone(),
                    zone: net.map(|n| n.zone_id.clone()).unwrap_or_default(),
                    vni: l.vni,
                    groups: String::new(),
                },
            );
        }
        let fw_names = fw_names
            .iter()
            .map(|(k, v)| {
                let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
                (*k, String::from_utf8_lossy(&v[..end]).into_owned())
            })
            .collect();
        Context { ports, fw_names }
    }
}

/// The context of a port this host does not know (every field empty).
static NO_PORT: PortContext = PortContext {
    port: String::new(),
    tenant: String::new(),
    vpc: String::new(),
    zone: String::new(),
    vni: 0,
    groups: String::new(),
};

impl Context {
    /// The context of the port with device `ifindex`; empty fields for a
    /// device that is no port of the share.
    pub fn port(&self, ifindex: u32) -> &PortContext {
        self.ports.get(&ifindex).unwrap_or(&NO_PORT)
    }
}

impl PortContext {
    /// The VPC's VNI, if it has one.
    pub fn vni(&self) -> Option<u32> {
        (self.vni != 0).then_some(self.vni)
    }
}

/// The context the meter and the denial reader read, replaced whole by
/// the agent when its share changes.
pub type SharedContext = Arc<RwLock<Arc<Context>>>;

/// What the export has done, over every collector.
#[derive(Debug, Default)]
pub struct Stats {
    /// Records made (each handed to every collector's queue).
    pub records: AtomicU64,
    /// Records a full queue turned away, summed over collectors.
    pub queue_full: AtomicU64,
    /// Records of denied flows over the rate, not made.
    pub denied_suppressed: AtomicU64,
    /// Denial events read from the dataplane.
    pub denial_events: AtomicU64,
    /// Per collector: what its exporter reports.
    pub collectors: Mutex<BTreeMap<String, sdn_flowexport::exporter::Stats>>,
}

/// The collectors' queues.
#[derive(Clone)]
pub struct Outputs {
    /// Per collector, two lanes: flow records (and denied flows), and
    /// protocol records, so a flood of DNS answers takes no flow record's
    /// room.
    lanes: Vec<[Lane; 2]>,
    pub stats: Arc<Stats>,
}

/// One queue to a collector's exporter.
#[derive(Clone)]
struct Lane {
    tx: tokio::sync::mpsc::Sender<Arc<Vec<Record>>>,
    /// Records it holds, as a budget the senders share with the exporter.
    held: Arc<AtomicU64>,
    limit: u64,
}

impl Lane {
    fn new(limit: u64) -> (Lane, tokio::sync::mpsc::Receiver<Arc<Vec<Record>>>) {
        // The channel bounds batches; `held` bounds records.
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        (
            Lane {
                tx,
                held: Arc::default(),
                limit,
            },
            rx,
        )
    }

    /// Queues as much of `batch` as there is room for; returns how many
    /// records were turned away.
    fn offer(&self, batch: &Arc<Vec<Record>>) -> u64 {
        let n = batch.len() as u64;
        let take = n.min(self.limit.saturating_sub(self.held.load(Ordering::Relaxed)));
        if take == 0 {
            return n;
        }
        let part = if take == n {
            batch.clone()
        } else {
            Arc::new(batch[..take as usize].to_vec())
        };
        self.held.fetch_add(take, Ordering::Relaxed);
        if self.tx.try_send(part).is_err() {
            self.held.fetch_sub(take, Ordering::Relaxed);
            return n;
        }
        n - take
    }
}

impl Outputs {
    /// Starts an exporter task per collector.
    pub fn start(s: &Settings, stats: Arc<Stats>) -> Outputs {
        let mut lanes = Vec::new();
        for c in &s.collectors {
            let (flows, mut flows_rx) = Lane::new(s.queue as u64);
            let (protocol, mut protocol_rx) = Lane::new((s.queue as u64 / 4).max(1));
            let mut e = Exporter::new(*c, s.domain, s.pen);
            let name = format!("{:?}://{}", c.transport, c.addr).to_lowercase();
            let (st, fl, pr) = (stats.clone(), flows.held.clone(), protocol.held.clone());
            tokio::spawn(async move {
                let mut failing = false;
                loop {
                    // Flow records first.
                    let (batch, held) = tokio::select! {
                        biased;
                        Some(b) = flows_rx.recv() => (b, &fl),
                        Some(b) = protocol_rx.recv() => (b, &pr),
                        else => return,
                    };
                    held.fetch_sub(batch.len() as u64, Ordering::Relaxed);
                    match e.export(&batch).await {
                        Ok(()) if failing => {
                            failing = false;
                            tracing::info!(collector = %name, "flow records reach the collector again");
                        }
                        Ok(()) => {}
                        Err(err) if !failing => {
                            failing = true;
                            tracing::warn!(collector = %name, error = %err, "flow records lost; retried with the next records");
                        }
                        Err(_) => {}
                    }
                    st.collectors
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert(name.clone(), e.stats());
                }
            });
            lanes.push([flows, protocol]);
        }
        Outputs { lanes, stats }
    }

    /// Hands flow records to every collector (see [`Outputs::send_records`]).
    pub fn send(&self, records: Vec<FlowRecord>) {
        self.send_records(records.into_iter().map(Record::Flow).collect());
    }

    /// Hands `records` to every collector, each as many as its lane has
    /// room for (flow records in one, protocol records in the other); the
    /// rest are counted.
    pub fn send_records(&self, records: Vec<Record>) {
        if records.is_empty() {
            return;
        }
        let lane = usize::from(!matches!(records[0], Record::Flow(_)));
        self.stats.records.fetch_add(records.len() as u64, Ordering::Relaxed);
        let batch = Arc::new(records);
        for l in &self.lanes {
            let lost = l[lane].offer(&batch);
            if lost > 0 {
                self.stats.queue_full.fetch_add(lost, Ordering::Relaxed);
            }
        }
    }
}

/// Unix milliseconds now, and the monotonic clock the programs stamp with:
/// turns a stamp into Unix milliseconds.
#[derive(Clone, Copy, Debug)]
pub struct Clock {
    pub unix_ms: u64,
    pub mono_ns: u64,
}

impl Clock {
    pub fn now() -> Clock {
        Clock {
            unix_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            mono_ns: crate::dataplane::monotonic_ns(),
        }
    }

    pub fn unix_ms(&self, mono_ns: u64) -> u64 {
        self.unix_ms
            .saturating_sub(self.mono_ns.saturating_sub(mono_ns) / 1_000_000)
    }
}

/// What a flow had carried at its last record.
#[derive(Clone, Copy, Debug)]
struct Seen {
    created_ns: u64,
    packets_out: u64,
    packets_in: u64,
    bytes_out: u64,
    bytes_in: u64,
    /// The end of its last record (its creation before the first).
    reported_ns: u64,
    /// When its last record was made (active timeout).
    record_ns: u64,
    records: u64,
    /// Its end (FIN or RST) was reported.
    ended: bool,
    /// The collection pass that last saw it.
    pass: u64,
}

impl Seen {
    /// A flow first seen in pass `pass`: from its start, or, `inherited`
    /// from an agent before this one, from where it is now (`now`).
    fn first(v: &CtValue, inherited: bool, now: u64, pass: u64) -> Seen {
        let at = |x: u64| if inherited { x } else { 0 };
        Seen {
            created_ns: v.created_ns,
            packets_out: at(v.packets_out),
            packets_in: at(v.packets_in),
            bytes_out: at(v.bytes_out),
            bytes_in: at(v.bytes_in),
            reported_ns: if inherited { v.last_seen_ns } else { v.created_ns },
            record_ns: if inherited { now } else { v.created_ns },
            records: u64::from(inherited),
            // Its end was its predecessor's to report.
            ended: inherited && v.flags & m::CT_F_CLOSING != 0,
            pass,
        }
    }
}

/// Turns passes over the flow table into records.
pub struct Meter {
    active_ns: u64,
    idle_ns: u64,
    flows: HashMap<CtKey, Seen>,
    pass: u64,
    clock: Clock,
    ctx: Arc<Context>,
    /// The records of this pass, with their flows.
    out: Vec<(CtKey, FlowRecord)>,
    /// When TCP records are made: the collecting node's name.
    tcp_node: Option<String>,
    /// The TCP records of this pass.
    tcp: Vec<crate::records::TcpRecord>,
    /// Whether this pass read the whole table.
    complete: bool,
    /// When the meter started (the monotonic clock).
    started_ns: u64,
}

/// The programs count frames (the Ethernet header and the IP packet);
/// IPFIX counts the IP packet (RFC 7012, octetDeltaCount).
fn ip_octets(frame_bytes: u64, packets: u64) -> u64 {
    frame_bytes.saturating_sub(packets * ETH_HLEN)
}

const ETH_HLEN: u64 = 14;

pub fn addr(family: u8, a: &[u8; 16]) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from([a[0], a[1], a[2], a[3]])
    } else {
        IpAddr::from(*a)
    }
}

impl Meter {
    pub fn new(s: &Settings) -> Meter {
        Meter {
            active_ns: s.active.as_nanos() as u64,
            idle_ns: s.idle.as_nanos() as u64,
            flows: HashMap::new(),
            pass: 0,
            clock: Clock::now(),
            ctx: Arc::default(),
            out: Vec::new(),
            tcp_node: None,
            tcp: Vec::new(),
            complete: true,
            started_ns: crate::dataplane::monotonic_ns(),
        }
    }

    /// Makes a TCP record of each connection as it ends, naming `node`.
    pub fn with_tcp_records(mut self, node: &str) -> Meter {
        self.tcp_node = Some(node.to_string());
        self
    }

    /// Starts a pass over the flow table.
    pub fn begin(&mut self, clock: Clock, ctx: Arc<Context>) {
        self.pass += 1;
        self.complete = true;
        self.clock = clock;
        self.ctx = ctx;
    }

    /// One entry of the flow table; `removed`: the collector removes it
    /// now (it timed out).
    pub fn observe(&mut self, k: &CtKey, v: &CtValue, removed: bool) {
        let now = self.clock.mono_ns;
        let pass = self.pass;
        // On the first pass, flows that were there before are taken from
        // where they are: an agent before this one reported what they
        // carried (a restarted agent counts nothing twice).
        let inherited = pass == 1 && v.created_ns < self.started_ns;
        let closing = v.flags & m::CT_F_CLOSING != 0;
        let s = self
            .flows
            .entry(*k)
            .or_insert_with(|| Seen::first(v, inherited, now, pass));
        if s.created_ns != v.created_ns || v.packets_out < s.packets_out || v.packets_in < s.packets_in {
            // The same key, a new flow.
            *s = Seen::first(v, false, now, pass);
        }
        s.pass = pass;
        let moved = v.packets_out > s.packets_out || v.packets_in > s.packets_in;
        let reason = if removed {
            Some(if closing {
                EndReason::EndOfFlow
            } else {
                EndReason::IdleTimeout
            })
        } else if closing && !s.ended {
            Some(EndReason::EndOfFlow)
        } else if !moved {
            None
        } else if now.saturating_sub(v.last_seen_ns) >= self.idle_ns {
            Some(EndReason::IdleTimeout)
        } else if now.saturating_sub(s.record_ns) >= self.active_ns {
            Some(EndReason::ActiveTimeout)
        } else {
            None
        };
        let Some(reason) = reason else { return };
        let (local, remote) = (addr(k.family, &k.local), addr(k.family, &k.remote));
        let pc = self.ctx.port(k.ifindex);
        let ends = k.proto == dataplane_common::PROTO_TCP && !s.ended && (reason == EndReason::EndOfFlow || removed);
        if let (true, Some(node)) = (ends, &self.tcp_node) {
            let opened_here = v.origin == m::CT_ORIGIN_OUT;
            let (client, client_port, server, server_port) = if opened_here {
                (local, k.local_port, remote, k.remote_port)
            } else {
                (remote, k.remote_port, local, k.local_port)
            };
            self.tcp.push(crate::records::TcpRecord {
                record: "tcp",
                first_packet: sdn_proto::audit::rfc3339(self.clock.unix_ms(v.created_ns)),
                node: node.clone(),
                node_type: "agent",
                port: pc.port.clone(),
                tenant: pc.tenant.clone(),
                vpc: pc.vpc.clone(),
                client,
                client_port,
                server,
                server_port,
                state: if closing { "closed" } else { "timed_out" },
                connections: 1,
                session_ms: v.last_seen_ns.saturating_sub(v.created_ns) / 1_000_000,
                packets: v.packets_out + v.packets_in,
                octets: ip_octets(v.bytes_out, v.packets_out) + ip_octets(v.bytes_in, v.packets_in),
                first_ms: self.clock.unix_ms(v.created_ns),
                last_ms: self.clock.unix_ms(v.last_seen_ns),
            });
        }
        if moved {
            let event = if reason == EndReason::EndOfFlow || removed {
                FirewallEvent::Deleted
            } else if s.records == 0 {
                FirewallEvent::Created
            } else {
                FirewallEvent::Update
            };
            let rule = pc.groups.clone();
            let zone = if k.door & 0xff00_0000 == m::DOOR_ZONE {
                pc.zone.clone()
            } else {
                String::new()
            };
            let base = FlowRecord {
                src: local,
                dst: remote,
                src_port: k.local_port,
                dst_port: k.remote_port,
                protocol: k.proto,
                octets: 0,
                packets: 0,
                start_ms: self.clock.unix_ms(s.reported_ns),
                end_ms: self.clock.unix_ms(v.last_seen_ns),
                end_reason: reason,
                firewall_event: event,
                direction: Direction::Egress,
                vni: pc.vni(),
                tenant: pc.tenant.clone(),
                vpc: pc.vpc.clone(),
                zone,
                rule,
                verdict: Verdict::Allowed,
                port: pc.port.clone(),
                lb: None,
            };
            if v.packets_out > s.packets_out {
                self.out.push((
                    *k,
                    FlowRecord {
                        octets: ip_octets(v.bytes_out.saturating_sub(s.bytes_out), v.packets_out - s.packets_out),
                        packets: v.packets_out - s.packets_out,
                        ..base.clone()
                    },
                ));
            }
            if v.packets_in > s.packets_in {
                self.out.push((
                    *k,
                    FlowRecord {
                        src: remote,
                        dst: local,
                        src_port: k.remote_port,
                        dst_port: k.local_port,
                        octets: ip_octets(v.bytes_in.saturating_sub(s.bytes_in), v.packets_in - s.packets_in),
                        packets: v.packets_in - s.packets_in,
                        direction: Direction::Ingress,
                        ..base
                    },
                ));
            }
            s.records += 1;
        }
        s.packets_out = v.packets_out;
        s.packets_in = v.packets_in;
        s.bytes_out = v.bytes_out;
        s.bytes_in = v.bytes_in;
        s.reported_ns = v.last_seen_ns;
        s.record_ns = now;
        if reason == EndReason::EndOfFlow {
            s.ended = true;
        }
        if removed {
            self.flows.remove(k);
        }
    }

    /// Ends the pass: forgets flows it did not see (their port went, or
    /// another table took them), and returns the records it made. A flow
    /// a firewall admitted (`firewall` names its rule's number) names that
    /// rule; the others, the port's security groups.
    /// `lb` names the service and member of a load-balanced flow.
    pub fn end(
        &mut self,
        firewall: &dyn Fn(&CtKey) -> Option<u32>,
        lb: &dyn Fn(&CtKey) -> Option<sdn_flowexport::record::LbRecord>,
    ) -> Vec<FlowRecord> {
        let pass = self.pass;
        // A pass that did not read the whole table forgets nothing.
        if self.complete {
            self.flows.retain(|_, s| s.pass == pass);
        }
        let ctx = self.ctx.clone();
        std::mem::take(&mut self.out)
            .into_iter()
            .map(|(k, mut r)| {
                if let Some(n) = firewall(&k) {
                    r.rule = format!(
                        "firewall/{}",
                        ctx.fw_names.get(&n).cloned().unwrap_or_else(|| format!("#{n}"))
                    );
                }
                r.lb = lb(&k);
                r
            })
            .collect()
    }

    /// The TCP records of the last pass, each counting the connections
    /// from its client to its service that ended in the pass.
    pub fn take_tcp(&mut self) -> Vec<crate::records::TcpRecord> {
        let mut n: HashMap<(String, IpAddr, IpAddr, u16), usize> = HashMap::new();
        for r in &self.tcp {
            *n.entry((r.port.clone(), r.client, r.server, r.server_port))
                .or_default() += 1;
        }
        let mut out = std::mem::take(&mut self.tcp);
        for r in &mut out {
            r.connections = n[&(r.port.clone(), r.client, r.server, r.server_port)];
        }
        out
    }

    /// Says the pass did not read the whole flow table: no flow is
    /// forgotten for not being seen in it.
    pub fn incomplete(&mut self) {
        self.complete = false;
    }

    /// Flows the meter follows.
    pub fn tracked(&self) -> usize {
        self.flows.len()
    }
}

/// A denied flow, as events name it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct DeniedKey {
    /// The refusing port, or the device the packet came in by when no
    /// port of this host refused it.
    ifindex: u32,
    /// `m::SIDE_*`; 0: no port here.
    side: u8,
    reason: u8,
    family: u8,
    proto: u8,
    entry: u8,
    sport: u16,
    dport: u16,
    src: [u8; 16],
    dst: [u8; 16],
}

#[derive(Clone, Copy, Debug)]
struct DeniedFlow {
    first_ns: u64,
    last_ns: u64,
    packets: u64,
    octets: u64,
    rule: u32,
}

/// Gathers denial events per flow.
pub struct Denials {
    /// Flows gathered since the last flush (at most `GATHER_MAX`, and
    /// `PORT_GATHER_MAX` per port).
    flows: HashMap<DeniedKey, DeniedFlow>,
    /// Distinct flows gathered per port since the last flush.
    per_port: HashMap<u32, usize>,
    /// Flushes so far: where the turns start (no port always first).
    flushes: usize,
    stats: Arc<Stats>,
}

/// Denied flows gathered between two flushes, at most.
const GATHER_MAX: usize = 16384;
/// Denied flows of one port gathered between two flushes, at most: past
/// them, a port's flows are gathered per pair of addresses (its ports
/// cleared), so a port that scans or floods fills only its own share.
const PORT_GATHER_MAX: usize = 256;

impl Denials {
    pub fn new(stats: Arc<Stats>) -> Denials {
        Denials {
            flows: HashMap::new(),
            per_port: HashMap::new(),
            flushes: 0,
            stats,
        }
    }

    /// One event, as the ring holds it.
    pub fn event(&mut self, bytes: &[u8]) {
        if bytes.len() < std::mem::size_of::<DenyEvent>() {
            tracing::warn!(len = bytes.len(), "a denial event shorter than its form; ignored");
            return;
        }
        // SAFETY: the slice holds at least a DenyEvent, which is Pod; the
        // read is unaligned.
        let e: DenyEvent = unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const DenyEvent) };
        self.stats.denial_events.fetch_add(1, Ordering::Relaxed);
        self.add(&e);
    }

    fn add(&mut self, e: &DenyEvent) {
        let (ifindex, side) = if e.port_ifx != 0 {
            (e.port_ifx, e.side)
        } else {
            (e.device, 0)
        };
        let mut k = DeniedKey {
            ifindex,
            side,
            reason: e.reason,
            family: e.family,
            proto: e.proto,
            entry: e.entry,
            sport: e.sport,
            dport: e.dport,
            src: e.src,
            dst: e.dst,
        };
        let held = self.per_port.get(&ifindex).copied().unwrap_or(0);
        if held >= PORT_GATHER_MAX && !self.flows.contains_key(&k) {
            k.sport = 0;
            k.dport = 0;
        }
        let octets = ip_octets(u64::from(e.len), 1);
        if let Some(f) = self.flows.get_mut(&k) {
            f.last_ns = e.now_ns;
            f.packets += 1;
            f.octets += octets;
            return;
        }
        if self.flows.len() >= GATHER_MAX || held >= 2 * PORT_GATHER_MAX {
            self.stats.denied_suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *self.per_port.entry(ifindex).or_default() += 1;
        self.flows.insert(
            k,
            DeniedFlow {
                first_ns: e.now_ns,
                last_ns: e.now_ns,
                packets: 1,
                octets,
                rule: e.rule,
            },
        );
    }

    /// The flows gathered since the last flush, each as a record (a flow
    /// dropped before its IP header was read has unspecified addresses).
    /// They come in turns of (port, reason): each port's first flow of
    /// each reason, then each one's second, and so on; a rate taken from
    /// the front shares itself among ports.
    pub fn flush(&mut self, clock: Clock, ctx: &Context) -> Vec<Denied> {
        self.per_port.clear();
        let mut groups: BTreeMap<(u32, u8), Vec<(DeniedKey, DeniedFlow)>> = BTreeMap::new();
        for (k, f) in self.flows.drain() {
            groups.entry((k.ifindex, k.reason)).or_default().push((k, f));
        }
        for g in groups.values_mut() {
            // The busiest flows of a group first.
            g.sort_by(|a, b| b.1.packets.cmp(&a.1.packets));
        }
        let mut turns: Vec<std::vec::IntoIter<(DeniedKey, DeniedFlow)>> =
            groups.into_values().map(Vec::into_iter).collect();
        if !turns.is_empty() {
            let start = self.flushes % turns.len();
            turns.rotate_left(start);
        }
        self.flushes += 1;
        let mut order = Vec::new();
        loop {
            let before = order.len();
            for t in &mut turns {
                if let Some(x) = t.next() {
                    order.push(x);
                }
            }
            if order.len() == before {
                break;
            }
        }
        let mut out = Vec::with_capacity(order.len());
        for (k, f) in order {
            let pc = ctx.port(k.ifindex);
            let reason = DropReason::ALL.get(usize::from(k.reason)).copied();
            let rule = match reason {
                Some(DropReason::BorderFirewall | DropReason::VpcFirewall) => format!(
                    "firewall/{}",
                    ctx.fw_names
                        .get(&f.rule)
                        .cloned()
                        .unwrap_or_else(|| format!("#{}", f.rule))
                ),
                Some(DropReason::PolicyIngress | DropReason::PolicyEgress | DropReason::PolicyRevoked) => {
                    pc.groups.clone()
                }
                Some(r) => format!("guard/{}", r.name()),
                None => format!("guard/#{}", k.reason),
            };
            let crosses_zone = k.entry == 3
                || matches!(
                    reason,
                    Some(DropReason::ZoneIsolation | DropReason::BorderFirewall | DropReason::SpoofUplink)
                );
            let (src, dst) = if k.family == 0 {
                let none = IpAddr::from([0u8; 4]);
                (none, none)
            } else {
                (addr(k.family, &k.src), addr(k.family, &k.dst))
            };
            out.push(Denied {
                reason,
                ip: k.family != 0,
                record: FlowRecord {
                    src,
                    dst,
                    src_port: k.sport,
                    dst_port: k.dport,
                    protocol: k.proto,
                    octets: f.octets,
                    packets: f.packets,
                    start_ms: clock.unix_ms(f.first_ns),
                    end_ms: clock.unix_ms(f.last_ns),
                    end_reason: EndReason::ForcedEnd,
                    firewall_event: FirewallEvent::Denied,
                    direction: if k.side == m::SIDE_SENT || (k.side == 0 && k.entry == 1) {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                    vni: pc.vni(),
                    tenant: pc.tenant.clone(),
                    vpc: pc.vpc.clone(),
                    zone: if crosses_zone { pc.zone.clone() } else { String::new() },
                    rule,
                    verdict: Verdict::Denied,
                    port: pc.port.clone(),
                    lb: None,
                },
            });
        }
        out
    }
}

/// A denied flow of the last second.
#[derive(Clone, Debug)]
pub struct Denied {
    /// Why the dataplane dropped it.
    pub reason: Option<DropReason>,
    /// Whether its IP header was read (else it has no addresses).
    pub ip: bool,
    pub record: FlowRecord,
}

/// The IPFIX records of denied flows, at most `per_sec` of them; the rest
/// are counted.
pub fn denied_records(denied: &[Denied], per_sec: u32, stats: &Stats) -> Vec<FlowRecord> {
    let ip: Vec<&Denied> = denied.iter().filter(|d| d.ip).collect();
    let over = ip.len().saturating_sub(per_sec as usize);
    if over > 0 {
        stats.denied_suppressed.fetch_add(over as u64, Ordering::Relaxed);
    }
    ip.into_iter()
        .take(per_sec as usize)
        .map(|d| d.record.clone())
        .collect()
}

/// Where denied flows go: IPFIX records (at most a rate of them), and
/// security events.
pub struct DenialSinks {
    pub flows: Option<(Outputs, u32)>,
    pub events: Option<crate::events::Events>,
}

/// Reads the dataplane's denial events until the agent stops: gathers
/// them per flow, and each second hands the denied flows to the sinks.
pub async fn read_denials(
    ring: aya::maps::RingBuf<aya::maps::MapData>,
    ctx: SharedContext,
    stats: Arc<Stats>,
    sinks: DenialSinks,
) -> anyhow::Result<()> {
    // SAFETY: the ring owns its descriptor, and keeps it open and in place
    // for as long as the AsyncFd holds it.
    let mut fd = unsafe { tokio::io::unix::AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE)? };
    let mut d = Denials::new(stats.clone());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            guard = fd.readable_mut() => {
                let mut guard = guard?;
                let ring = guard.get_inner_mut();
                // A bounded drain per wake, so the flush is never starved.
                for _ in 0..65536 {
                    let Some(item) = ring.next() else { break };
                    d.event(&item);
                }
                guard.clear_ready();
            }
            _ = tick.tick() => {
                let c = ctx.read().unwrap_or_else(|p| p.into_inner()).clone();
                let denied = d.flush(Clock::now(), &c);
                if denied.is_empty() {
                    continue;
                }
                if let Some((out, per_sec)) = &sinks.flows {
                    out.send(denied_records(&denied, *per_sec, &stats));
                }
                if let Some(ev) = &sinks.events {
                    ev.denials(&denied);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings {
            collectors: Vec::new(),
            active: Duration::from_secs(60),
            idle: Duration::from_secs(15),
            pen: sdn_flowexport::record::PEN_DEFAULT,
            domain: 1,
            queue: 100,
            denied_per_sec: 2,
        }
    }

    fn key() -> CtKey {
        let mut local = [0u8; 16];
        local[..4].copy_from_slice(&[10, 0, 0, 11]);
        let mut remote = [0u8; 16];
        remote[..4].copy_from_slice(&[10, 0, 0, 12]);
        CtKey {
            ifindex: 7,
            family: FAMILY_V4,
            proto: 6,
            icmp: 0,
            _pad: 0,
            local_port: 40000,
            remote_port: 80,
            local,
            remote,
            door: m::DOOR_VPC | 100,
        }
    }

    fn value(created: u64, last: u64, out: (u64, u64), inn: (u64, u64), flags: u8) -> CtValue {
        CtValue {
            created_ns: created,
            last_seen_ns: last,
            packets_out: out.0,
            bytes_out: out.1,
            packets_in: inn.0,
            bytes_in: inn.1,
            epoch: 0,
            origin: m::CT_ORIGIN_OUT,
            flags,
            svc: 80,
        }
    }

    fn ctx() -> Arc<Context> {
        let mut c = Context::default();
        c.ports.insert(
            7,
            PortContext {
                port: "vm1".into(),
                tenant: "dept-a".into(),
                vpc: "v1".into(),
                zone: "extranet".into(),
                vni: 100,
                groups: "sg/web".into(),
            },
        );
        c.fw_names.insert(9, "edge/https".into());
        Arc::new(c)
    }

    const S: u64 = 1_000_000_000;

    /// A meter started before any flow of the tests.
    fn meter() -> Meter {
        let mut mt = Meter::new(&settings());
        mt.started_ns = 0;
        mt
    }

    fn pass(mt: &mut Meter, at_s: u64, entries: &[(CtValue, bool)]) -> Vec<FlowRecord> {
        mt.begin(
            Clock {
                unix_ms: 1_000_000 + at_s * 1000,
                mono_ns: at_s * S,
            },
            ctx(),
        );
        for (v, removed) in entries {
            mt.observe(&key(), v, *removed);
        }
        mt.end(&|k| (k.remote_port == 443).then_some(9), &|_| None)
    }

    /// Deltas per direction; an active record, an idle one, the end on
    /// FIN, and what the last packets carried when the entry goes.
    #[test]
    fn records_carry_what_flowed_since_the_last_one() {
        let mut mt = meter();
        assert!(pass(&mut mt, 5, &[(value(S, 5 * S, (3, 300), (2, 2000), 0), false)]).is_empty());
        // 61 s after the creation, still busy: an active-timeout record.
        let r = pass(&mut mt, 62, &[(value(S, 61 * S, (10, 1000), (8, 8000), 0), false)]);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (r[0].packets, r[0].octets, r[0].direction),
            (10, 1000 - 140, Direction::Egress)
        );
        assert_eq!(
            (r[1].packets, r[1].octets, r[1].direction),
            (8, 8000 - 112, Direction::Ingress)
        );
        assert_eq!(r[1].src, "10.0.0.12".parse::<IpAddr>().unwrap());
        assert_eq!((r[1].src_port, r[1].dst_port), (80, 40000));
        assert_eq!(r[0].end_reason, EndReason::ActiveTimeout);
        assert_eq!(r[0].firewall_event, FirewallEvent::Created);
        assert_eq!(
            (r[0].tenant.as_str(), r[0].rule.as_str(), r[0].vni),
            ("dept-a", "sg/web", Some(100))
        );
        assert_eq!(r[0].zone, "", "the flow stays inside its VPC");
        assert_eq!((r[0].start_ms, r[0].end_ms), (1_000_000 + 1000, 1_000_000 + 61_000));
        // Two more packets out, then 20 s of silence: an idle record of them.
        let r = pass(&mut mt, 90, &[(value(S, 70 * S, (12, 1200), (8, 8000), 0), false)]);
        assert_eq!(r.len(), 1, "only the direction that carried something");
        assert_eq!(
            (r[0].packets, r[0].octets),
            (2, 200 - 28),
            "IP octets: the frames less their Ethernet headers"
        );
        assert_eq!(r[0].end_reason, EndReason::IdleTimeout);
        assert_eq!(r[0].firewall_event, FirewallEvent::Update);
        assert_eq!(r[0].start_ms, 1_000_000 + 61_000);
        // Nothing new: nothing.
        assert!(pass(&mut mt, 95, &[(value(S, 70 * S, (12, 1200), (8, 8000), 0), false)]).is_empty());
        // FIN: the end, at once.
        let r = pass(
            &mut mt,
            100,
            &[(value(S, 99 * S, (13, 1260), (9, 8060), m::CT_F_CLOSING), false)],
        );
        assert_eq!(r.len(), 2);
        assert!(r
            .iter()
            .all(|r| r.end_reason == EndReason::EndOfFlow && r.firewall_event == FirewallEvent::Deleted));
        // The last ACK, reported when the entry goes.
        let r = pass(
            &mut mt,
            111,
            &[(value(S, 101 * S, (14, 1312), (9, 8060), m::CT_F_CLOSING), true)],
        );
        assert_eq!((r.len(), r[0].packets, r[0].end_reason), (1, 1, EndReason::EndOfFlow));
        assert_eq!(mt.tracked(), 0);
    }

    /// A key seen again with a new creation is a new flow; a flow no pass
    /// sees any more is forgotten.
    #[test]
    fn a_reused_key_is_a_new_flow_and_gone_flows_are_forgotten() {
        let mut mt = meter();
        pass(&mut mt, 5, &[(value(S, 5 * S, (3, 300), (0, 0), 0), false)]);
        let r = pass(&mut mt, 70, &[(value(65 * S, 69 * S, (1, 60), (0, 0), 0), false)]);
        assert!(r.is_empty(), "a new flow's first minute is not over: {r:?}");
        let r = pass(&mut mt, 126, &[(value(65 * S, 125 * S, (2, 120), (0, 0), 0), false)]);
        assert_eq!((r[0].packets, r[0].firewall_event), (2, FirewallEvent::Created));
        assert_eq!(mt.tracked(), 1);
        pass(&mut mt, 130, &[]);
        assert_eq!(mt.tracked(), 0);
    }

    fn event(reason: DropReason, sport: u16, rule: u32) -> Vec<u8> {
        event_at(7, reason, sport, rule)
    }

    fn event_at(port: u32, reason: DropReason, sport: u16, rule: u32) -> Vec<u8> {
        let mut src = [0u8; 16];
        src[..4].copy_from_slice(&[192, 0, 2, 1]);
        let mut dst = [0u8; 16];
        dst[..4].copy_from_slice(&[10, 0, 0, 11]);
        let e = DenyEvent {
            now_ns: 3 * S,
            port_ifx: port,
            device: 2,
            rule,
            len: 60,
            reason: reason as u8,
            family: FAMILY_V4,
            proto: 6,
            entry: 3,
            sport,
            dport: 22,
            src,
            dst,
            side: m::SIDE_FOR,
            _pad: [0; 7],
        };
        // SAFETY: DenyEvent is Pod.
        unsafe { std::slice::from_raw_parts(&e as *const DenyEvent as *const u8, std::mem::size_of::<DenyEvent>()) }
            .to_vec()
    }

    /// Events gather per flow; past the rate, flows are counted, not sent;
    /// each record names what refused it.
    #[test]
    fn denials_gather_per_flow_within_a_rate() {
        let stats = Arc::new(Stats::default());
        let mut d = Denials::new(stats.clone());
        for _ in 0..3 {
            d.event(&event(DropReason::BorderFirewall, 5000, 9));
        }
        d.event(&event(DropReason::ZoneIsolation, 5001, 0));
        d.event(&event(DropReason::PolicyIngress, 5002, 0));
        d.event(&event(DropReason::PolicyIngress, 5003, 0)[..10]);
        let clock = Clock {
            unix_ms: 10_000,
            mono_ns: 4 * S,
        };
        let denied = d.flush(clock, &ctx());
        assert_eq!(denied.len(), 3);
        let mut r = denied_records(&denied, 2, &stats);
        r.sort_by_key(|r| r.src_port);
        assert_eq!(r.len(), 2);
        assert_eq!(stats.denied_suppressed.load(Ordering::Relaxed), 1);
        assert_eq!(
            stats.denial_events.load(Ordering::Relaxed),
            5,
            "the short one is not an event"
        );
        let rules: Vec<&str> = r.iter().map(|r| r.rule.as_str()).collect();
        for x in &r {
            assert_eq!((x.verdict, x.firewall_event), (Verdict::Denied, FirewallEvent::Denied));
            assert_eq!(
                (x.port.as_str(), x.zone.as_str(), x.start_ms),
                ("vm1", "extranet", 9_000)
            );
        }
        let all = ["firewall/edge/https", "guard/zone_isolation", "sg/web"];
        assert!(rules.iter().all(|r| all.contains(r)), "{rules:?}");
        if r[0].src_port == 5000 {
            assert_eq!((r[0].packets, r[0].octets), (3, 3 * 46));
        }
        assert!(d.flush(clock, &ctx()).is_empty());
    }

    /// A port that floods fills only its own share: past it, its flows are
    /// gathered per pair of addresses, and every port's first flow of each
    /// reason comes before any port's second.
    #[test]
    fn a_flooding_port_takes_only_its_own_share() {
        let stats = Arc::new(Stats::default());
        let mut d = Denials::new(stats.clone());
        for p in 0..(3 * PORT_GATHER_MAX as u16) {
            d.event(&event_at(8, DropReason::PolicyIngress, 10_000 + p, 0));
        }
        d.event(&event_at(7, DropReason::SpoofIp, 5000, 0));
        let denied = d.flush(
            Clock {
                unix_ms: 10_000,
                mono_ns: 4 * S,
            },
            &ctx(),
        );
        // Port 8: its share, and one more flow for all the rest (ports cleared).
        assert_eq!(denied.len(), PORT_GATHER_MAX + 1 + 1);
        let folded = denied
            .iter()
            .find(|x| x.record.port.is_empty() && x.record.src_port == 0)
            .unwrap();
        assert_eq!(folded.record.packets, 2 * PORT_GATHER_MAX as u64);
        // With room for two records, port 7's spoofing is one of them.
        let r = denied_records(&denied, 2, &stats);
        assert!(r.iter().any(|x| x.port == "vm1" && x.rule == "guard/spoof_ip"), "{r:?}");
        assert_eq!(
            r.iter().find(|x| x.port == "vm1").unwrap().direction,
            Direction::Ingress
        );
    }

    /// A restarted agent's meter takes flows already there from where they
    /// are: what its predecessor reported is not reported again.
    #[test]
    fn flows_older_than_the_meter_are_not_counted_twice() {
        let mut mt = Meter::new(&settings());
        mt.started_ns = 50 * S;
        let r = pass(&mut mt, 62, &[(value(S, 61 * S, (100, 10_000), (50, 5000), 0), false)]);
        assert!(r.is_empty(), "{r:?}");
        let r = pass(
            &mut mt,
            125,
            &[(value(S, 124 * S, (101, 10_100), (50, 5000), 0), false)],
        );
        assert_eq!(
            (r.len(), r[0].packets, r[0].firewall_event),
            (1, 1, FirewallEvent::Update)
        );
    }
}
