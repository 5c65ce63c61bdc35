//! The kernel side: loads the embedded eBPF object with its maps pinned in
//! bpffs, attaches the TC programs to VM devices through pinned TCX links,
//! and adopts what an earlier agent left pinned, so a restart or upgrade
//! never detaches a program or empties a map.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, ProgramArray};
use aya::programs::links::{FdLink, LinkOrder, PinnedLink};
use aya::programs::tc::{SchedClassifierLink, TcAttachOptions};
use aya::programs::{SchedClassifier, TcAttachType, Xdp};
use aya::{Ebpf, EbpfLoader, Pod};
use dataplane_common::maps as m;
use dataplane_common::{stage, DropReason, Stat, DROP_REASON_SLOTS, STAT_SLOTS};

use crate::reconcile::{MapSet, Table, TableSource};

/// The compiled eBPF object.
pub static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/dataplane"));

const BPF_FS_MAGIC: i64 = 0xcafe4a11;

/// The two attach points of a VM port.
pub const PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("from_vm", TcAttachType::Ingress, "ingress"),
    ("to_vm", TcAttachType::Egress, "egress"),
];

/// The two attach points of a zone uplink.
pub const UPLINK_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("from_uplink", TcAttachType::Ingress, "ingress"),
    ("to_uplink", TcAttachType::Egress, "egress"),
];

/// Mirroring's observers on a port's device, before the pipeline's
/// entries (their link pins are `mirror-IFINDEX-DIR`).
pub const MIRROR_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("mirror_from_vm", TcAttachType::Ingress, "ingress"),
    ("mirror_to_vm", TcAttachType::Egress, "egress"),
];
/// Mirroring's observer on the VXLAN device (copies for a tap here).
pub const MIRROR_OVERLAY_PROGRAM: &str = "mirror_from_overlay";
const MIRROR_OVERLAY_PIN: &str = "mirror-overlay";

/// VRRP's observers on a holder port's device, before the pipeline's
/// entries (their link pins are `vrrp-IFINDEX-DIR`), and on the VXLAN
/// device.
pub const VRRP_PROGRAMS: [(&str, TcAttachType, &str); 2] = [
    ("vrrp_from_vm", TcAttachType::Ingress, "ingress"),
    ("vrrp_to_vm", TcAttachType::Egress, "egress"),
];
pub const VRRP_OVERLAY_PROGRAM: &str = "vrrp_from_overlay";
const VRRP_OVERLAY_PIN: &str = "vrrp-overlay";

/// The program on the VXLAN device's ingress, and its link pin's name.
pub const OVERLAY_PROGRAM: &str = "from_overlay";
const OVERLAY_PIN: &str = "overlay-ingress";

/// The parser and anti-spoofing behind an XDP entry (loaded, not attached).
pub const XDP_PROGRAM: &str = "xdp_from_vm";

/// The program array of the pipeline's stages, and the prefix of its pins.
const PIPE_MAP: &str = "SDN_PIPE";
const PIPE_PIN: &str = "pipe-";

/// Every TC program of the object: entries, then stages.
pub fn tc_programs() -> impl Iterator<Item = &'static str> {
    PROGRAMS
        .iter()
        .chain(UPLINK_PROGRAMS.iter())
        .map(|p| p.0)
        .chain([OVERLAY_PROGRAM])
        .chain(MIRROR_PROGRAMS.iter().map(|p| p.0))
        .chain([MIRROR_OVERLAY_PROGRAM])
        .chain(VRRP_PROGRAMS.iter().map(|p| p.0))
        .chain([VRRP_OVERLAY_PROGRAM])
        .chain(stage::PROGRAMS.iter().map(|s| s.1))
}

/// Checks that `dir` is on a bpffs mount.
pub fn check_bpffs(dir: &Path) -> anyhow::Result<()> {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())?;
    // SAFETY: statfs writes into the zeroed struct we own.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error()).with_context(|| format!("statfs {}", dir.display()));
    }
    if st.f_type as i64 != BPF_FS_MAGIC {
        anyhow::bail!(
            "{} is not on a bpffs mount; mount one with `mount -t bpf bpf {}` or pass --pin-dir on /sys/fs/bpf",
            dir.display(),
            dir.display()
        );
    }
    Ok(())
}

/// The addresses of an interface in this network namespace (IPv6
/// link-local ones included: neighbour discovery uses them).
pub fn addresses(name: &str) -> std::io::Result<Vec<std::net::IpAddr>> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list freed below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, alive until freed.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: a NUL-terminated name from the kernel.
        if unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) }.to_bytes() != name.as_bytes() {
            continue;
        }
        // SAFETY: the family says which sockaddr it is.
        match unsafe { (*ifa.ifa_addr).sa_family } as i32 {
            libc::AF_INET => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(std::net::IpAddr::from(u32::from_be(sa.sin_addr.s_addr).to_be_bytes()));
            }
            libc::AF_INET6 => {
                let sa = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(std::net::IpAddr::from(sa.sin6_addr.s6_addr));
            }
            _ => {}
        }
    }
    // SAFETY: the list getifaddrs returned, freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// Resolves an interface name in this network namespace.
/// The name of the device of `ifindex`.
pub fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf is IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    Some(
        unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Makes a pinned hash map hold exactly `want`.
fn sync_hash<K: Pod + Ord, V: Pod + PartialEq>(
    ebpf: &mut Ebpf,
    name: &str,
    want: &std::collections::BTreeMap<K, V>,
) -> anyhow::Result<()> {
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut h: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    let stale: Vec<K> = h
        .keys()
        .filter_map(Result::ok)
        .filter(|k| !want.contains_key(k))
        .collect();
    for k in stale {
        let _ = h.remove(&k);
    }
    for (k, v) in want {
        if h.get(k, 0).ok().as_ref() != Some(v) {
            h.insert(k, v, 0).with_context(|| format!("writing {name}"))?;
        }
    }
    Ok(())
}

/// Removes the keys of hash map `name` that `doomed` picks; returns how
/// many.
/// The devices number a north-south flow's record is made under: this bit
/// with the VPC's VNI (no device has it), whose context (tenant, VPC,
/// zone) the records take.
pub const NAT_FLOW_CONTEXT: u32 = 0x8000_0000;

/// A north-south flow's reply key.
pub fn nat_reverse(
    k: &dataplane_common::lb::NatKey,
    f: &dataplane_common::lb::NatFlow,
) -> dataplane_common::lb::NatReverseKey {
    dataplane_common::lb::NatReverseKey {
        vni: f.vni,
        family: k.family,
        proto: k.proto,
        backend_port: f.backend_port,
        nat_port: f.nat_port,
        _pad: 0,
        backend: f.backend,
        nat: f.nat,
    }
}

/// A north-south flow as the flow records see it: from the member's side
/// of the VPC, the client as the remote end, through the zone's door.
pub fn nat_flow_key(k: &dataplane_common::lb::NatKey, f: &dataplane_common::lb::NatFlow) -> (m::CtKey, m::CtValue) {
    (
        m::CtKey {
            ifindex: NAT_FLOW_CONTEXT | f.vni,
            family: k.family,
            proto: k.proto,
            icmp: 0,
            _pad: 0,
            local_port: f.backend_port,
            remote_port: k.client_port,
            local: f.backend,
            remote: k.client,
            door: m::DOOR_ZONE | k.zone,
        },
        m::CtValue {
            created_ns: f.created_ns,
            last_seen_ns: f.last_seen_ns,
            packets_out: f.packets_out,
            packets_in: f.packets_in,
            bytes_out: f.bytes_out,
            bytes_in: f.bytes_in,
            epoch: 0,
            origin: m::CT_ORIGIN_IN,
            flags: if f.flags & dataplane_common::lb::NAT_F_CLOSING != 0 {
                m::CT_F_CLOSING
            } else {
                0
            },
            svc: k.vport,
        },
    )
}

/// Counts the north-south flows for their backend slots (while the slot
/// holds their backend): confirmed ones still open, unconfirmed ones.
fn count_nat(
    ebpf: &Ebpf,
    now: u64,
    backends: &std::collections::BTreeMap<u32, dataplane_common::lb::LbBackend>,
    counts: &mut std::collections::BTreeMap<u32, dataplane_common::lb::LbConns>,
) -> anyhow::Result<()> {
    use dataplane_common::lb as l;
    for (flows, confirmed) in [(l::NAT_FLOWS, true), (l::NAT_FLOWS_NEW, false)] {
        let map = ebpf.map(flows).with_context(|| format!("map {flows} missing"))?;
        let h: BpfHashMap<&MapData, l::NatKey, l::NatFlow> = BpfHashMap::try_from(map)?;
        for (k, f) in h.iter().filter_map(Result::ok) {
            if now.saturating_sub(f.last_seen_ns) > l::nat_timeout(k.proto, f.flags, confirmed) {
                continue;
            }
            let slot = f.service * l::LB_BACKENDS + f.slot as u32;
            if !backends
                .get(&slot)
                .is_some_and(|b| b.addr == f.backend && b.port == f.backend_port)
            {
                continue;
            }
            let c = counts.entry(slot).or_default();
            if !confirmed {
                c.new += 1;
            } else if f.flags & (l::LB_FLOW_OPEN | l::LB_FLOW_CLOSED) == l::LB_FLOW_OPEN {
                c.open += 1;
            }
        }
    }
    Ok(())
}

fn remove_keys<K: Pod, V: Pod>(ebpf: &mut Ebpf, name: &str, doomed: impl Fn(&K) -> bool) -> anyhow::Result<usize> {
    let map = ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
    let mut h: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
    let keys: Vec<K> = h.keys().filter_map(|k| k.ok()).filter(|k| doomed(k)).collect();
    for k in &keys {
        let _ = h.remove(k);
    }
    Ok(keys.len())
}

pub fn ifindex(name: &str) -> Option<u32> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: plain libc call on a valid C string.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

impl TableSource for Dataplane {
    fn hash<K: Pod + Send + 'static, V: Pod + Send + 'static>(
        &mut self,
        name: &'static str,
    ) -> anyhow::Result<Box<dyn Table<K, V>>> {
        let map = self.take_map(name)?;
        Ok(Box::new(AyaTable(
            BpfHashMap::try_from(map).with_context(|| format!("map {name} type"))?,
        )))
    }
    fn array<V: Pod + Default + PartialEq + Send + 'static>(
        &mut self,
        name: &'static str,
    ) -> anyhow::Result<Box<dyn Table<u32, V>>> {
        let map = self.take_map(name)?;
        Ok(Box::new(ArrayTable(
            Array::try_from(map).with_context(|| format!("map {name} type"))?,
        )))
    }
    fn lpm<K: Pod + Send + 'static>(&mut self, name: &'static str) -> anyhow::Result<Box<dyn Table<(u32, K), u32>>> {
        let map = self.take_map(name)?;
        Ok(Box::new(LpmTable(
            aya::maps::lpm_trie::LpmTrie::try_from(map).with_context(|| format!("map {name} type"))?,
        )))
    }
}

/// The loaded dataplane of one agent.
pub struct Dataplane {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    config: m::HostConfig,
    /// The pin of this load's program array.
    pipe_pin: PathBuf,
    /// What the flow table counted per port, as of the last collection.
    traffic: std::sync::Arc<std::sync::Mutex<Traffic>>,
    /// The mirror sessions by slot, as last written, and each slot's
    /// generation.
    mirror_ids: std::collections::BTreeMap<u32, String>,
    /// Information systems by slot, as last written.
    system_ids: std::collections::BTreeMap<u32, String>,
    /// Load-balancer services' generations by id, and the backend slots
    /// written, as last written.
    lb_generations: std::collections::BTreeMap<u32, u32>,
    lb_backends: std::collections::BTreeMap<u32, dataplane_common::lb::LbBackend>,
    /// Whether the load balancers were written once by this process.
    lb_started: bool,
    /// The ports that translate, with their VNIs, as last written.
    lb_ports: std::collections::BTreeMap<u32, u32>,
    /// Each service's name and its members' ids by address and port, as
    /// last written (flow records name them).
    lb_names: std::collections::BTreeMap<
        dataplane_common::lb::LbServiceKey,
        (String, std::collections::BTreeMap<([u8; 16], u16), String>),
    >,
    /// The north-south flows of the last collection, by the key their
    /// records are made under ([`nat_flow_key`]): their service, VIP and
    /// member.
    nat_records: std::collections::HashMap<m::CtKey, sdn_flowexport::record::LbRecord>,
    mirror_gen: [u32; m::MIRROR_SLOTS as usize],
    /// Devices whose observers run this load's programs (attached, or
    /// adopted from an earlier agent and swapped), and whether the VXLAN
    /// device's does.
    mirror_links: BTreeSet<u32>,
    /// The VXLAN device VRRP's observer is on (attached by this process;
    /// 0: none).
    vrrp_overlay_link: u32,
    /// Holder ports with VRRP's observers attached by this process.
    vrrp_links: BTreeSet<u32>,
    mirror_overlay_link: bool,
}

/// What writing the mirror sessions did: each slot's generation, and the
/// slots that changed hands.
pub struct MirrorApplied {
    pub generations: std::collections::BTreeMap<u32, u32>,
    pub changed: Vec<u32>,
}

/// One port's flows now, and the packets and bytes of its flows since the
/// agent started (flows that timed out since included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortTraffic {
    pub flows: u64,
    pub packets_out: u64,
    pub packets_in: u64,
    pub bytes_out: u64,
    pub bytes_in: u64,
}

impl PortTraffic {
    fn add(&mut self, v: &m::CtValue) {
        self.packets_out += v.packets_out;
        self.packets_in += v.packets_in;
        self.bytes_out += v.bytes_out;
        self.bytes_in += v.bytes_in;
    }
}

/// Per port (by ifindex): the totals of flows gone, and the sums as of the
/// last collection.
#[derive(Debug, Default)]
pub struct Traffic {
    retired: std::collections::BTreeMap<u32, PortTraffic>,
    pub ports: std::collections::BTreeMap<u32, PortTraffic>,
}

/// An LPM trie as a table keyed by (prefix length, data).
struct LpmTable<K: Pod>(aya::maps::lpm_trie::LpmTrie<MapData, K, u32>);

impl<K: Pod + Send> Table<(u32, K), u32> for LpmTable<K> {
    fn entries(&self) -> anyhow::Result<Vec<((u32, K), u32)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            let (k, v) = item?;
            out.push(((k.prefix_len(), k.data()), v));
        }
        Ok(out)
    }
    fn put(&mut self, k: &(u32, K), v: &u32) -> anyhow::Result<()> {
        self.0.insert(&aya::maps::lpm_trie::Key::new(k.0, k.1), v, 0)?;
        Ok(())
    }
    fn del(&mut self, k: &(u32, K)) -> anyhow::Result<()> {
        match self.0.remove(&aya::maps::lpm_trie::Key::new(k.0, k.1)) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// An array as a table: present entries are the non-default ones; removing
/// writes the default value back.
struct ArrayTable<V: Pod + Default + PartialEq>(Array<MapData, V>);

impl<V: Pod + Default + PartialEq + Send> Table<u32, V> for ArrayTable<V> {
    fn entries(&self) -> anyhow::Result<Vec<(u32, V)>> {
        let mut out = Vec::new();
        for (i, v) in self.0.iter().enumerate() {
            let v = v?;
            if v != V::default() {
                out.push((i as u32, v));
            }
        }
        Ok(out)
    }
    fn put(&mut self, k: &u32, v: &V) -> anyhow::Result<()> {
        self.0.set(*k, v, 0)?;
        Ok(())
    }
    fn del(&mut self, k: &u32) -> anyhow::Result<()> {
        self.0.set(*k, V::default(), 0)?;
        Ok(())
    }
}

struct AyaTable<K: Pod, V: Pod>(BpfHashMap<MapData, K, V>);

impl<K: Pod + Send, V: Pod + Send> Table<K, V> for AyaTable<K, V> {
    fn entries(&self) -> anyhow::Result<Vec<(K, V)>> {
        let mut out = Vec::new();
        for item in self.0.iter() {
            out.push(item?);
        }
        Ok(out)
    }
    fn put(&mut self, k: &K, v: &V) -> anyhow::Result<()> {
        self.0.insert(k, v, 0)?;
        Ok(())
    }
    fn del(&mut self, k: &K) -> anyhow::Result<()> {
        match self.0.remove(k) {
            Ok(()) => Ok(()),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(aya::maps::MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The connection tables whose size is set at load time: the flow table,
/// and the load balancer's confirmed flows both ways (each of them holds
/// at most one entry per flow of the flow table).
pub const FLOW_TABLES: [&str; 5] = [
    m::CT,
    dataplane_common::lb::LB_FLOWS,
    dataplane_common::lb::LB_REVERSE,
    dataplane_common::lb::NAT_FLOWS,
    dataplane_common::lb::NAT_REVERSE,
];

/// Something done to one connection table, with its key and value types.
trait PerTable {
    type Out;
    fn run<K: Pod, V: Pod>(self) -> Self::Out;
}

/// Runs `p` with the key and value types of the connection table `name`
/// (one of [`FLOW_TABLES`]).
fn per_table<P: PerTable>(name: &str, p: P) -> P::Out {
    use dataplane_common::lb;
    match name {
        m::CT => p.run::<m::CtKey, m::CtValue>(),
        lb::LB_FLOWS => p.run::<lb::LbFlowKey, lb::LbFlow>(),
        lb::LB_REVERSE => p.run::<lb::LbReverseKey, lb::LbReverse>(),
        lb::NAT_FLOWS => p.run::<lb::NatKey, lb::NatFlow>(),
        _ => p.run::<lb::NatReverseKey, lb::NatKey>(),
    }
}

/// The entries a pinned table holds.
struct CountEntries(MapData);

impl PerTable for CountEntries {
    type Out = anyhow::Result<usize>;
    fn run<K: Pod, V: Pod>(self) -> Self::Out {
        let h: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(aya::maps::Map::HashMap(self.0))?;
        Ok(h.keys().count())
    }
}

/// Copies a table pinned aside into this load's table of the same name.
struct CarryEntries<'a> {
    dp: &'a mut Dataplane,
    name: &'a str,
    from: &'a Path,
}

impl PerTable for CarryEntries<'_> {
    type Out = anyhow::Result<(usize, usize)>;
    fn run<K: Pod, V: Pod>(self) -> Self::Out {
        self.dp.carry::<K, V>(self.name, self.from)
    }
}
/// Their size unless the host asks for another.
pub const FLOW_TABLE_DEFAULT: u32 = m::CT_MAX;
/// Bounds of a size asked for: below the lower one a host holds fewer
/// flows than one port's budget; the upper one is 16 GiB or so of tables.
pub const FLOW_TABLE_MIN: u32 = 1024;
pub const FLOW_TABLE_LIMIT: u32 = 50_000_000;
/// The suffix of a table's pin while its flows move to a table of
/// another size (bpffs takes no dot in a name).
const RESIZE_SUFFIX: &str = "_RESIZE";

/// What the kernel says a pinned map is and holds: its size, and the
/// memory charged for it (`memlock` in the map's fdinfo: every entry's
/// room, since hash tables allocate all of it when they are made).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TableMemory {
    pub max_entries: u32,
    pub memlock_bytes: u64,
}

/// The kernel's accounting for one map.
pub fn table_memory(map: &MapData) -> anyhow::Result<TableMemory> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    let max_entries = map.info()?.max_entries();
    let fd = map.fd().as_fd().as_raw_fd();
    let path = format!("/proc/self/fdinfo/{fd}");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let memlock_bytes = text
        .lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no memlock in {path}"))?;
    Ok(TableMemory {
        max_entries,
        memlock_bytes,
    })
}

/// The connection tables pinned under `pin_dir`, by name.
pub fn read_flow_tables(pin_dir: &Path) -> anyhow::Result<Vec<(&'static str, TableMemory)>> {
    let maps_dir = pin_dir.join("maps");
    FLOW_TABLES
        .iter()
        .map(|name| {
            let data = MapData::from_pin(maps_dir.join(name)).with_context(|| format!("opening pinned map {name}"))?;
            Ok((*name, table_memory(&data)?))
        })
        .collect()
}

/// Checks a flow-table size asked for.
pub fn check_flow_table_size(n: u32) -> anyhow::Result<()> {
    if !(FLOW_TABLE_MIN..=FLOW_TABLE_LIMIT).contains(&n) {
        anyhow::bail!("--flow-table-size {n}: must be from {FLOW_TABLE_MIN} to {FLOW_TABLE_LIMIT} entries");
    }
    Ok(())
}

impl Dataplane {
    /// Loads the programs, reusing maps pinned under `pin_dir/maps`, with
    /// connection tables of the default size.
    pub fn load(pin_dir: &Path) -> anyhow::Result<Dataplane> {
        Self::load_sized(pin_dir, FLOW_TABLE_DEFAULT)
    }

    /// Loads the programs, reusing maps pinned under `pin_dir/maps`, with
    /// connection tables of `flow_table` entries each. Pinned tables of
    /// another size are replaced by new ones, their flows carried over
    /// (those beyond a smaller table are counted and left out).
    pub fn load_sized(pin_dir: &Path, flow_table: u32) -> anyhow::Result<Dataplane> {
        check_flow_table_size(flow_table)?;
        std::fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
        check_bpffs(pin_dir)?;
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("links");
        let pipes_dir = pin_dir.join("pipes");
        for d in [&maps_dir, &links_dir, &pipes_dir] {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        // A smaller size must hold every flow held now: checked for every
        // table before any is touched.
        for name in FLOW_TABLES {
            let pin = maps_dir.join(name);
            if !pin.exists() {
                continue;
            }
            let map = MapData::from_pin(&pin).with_context(|| format!("opening pinned map {name}"))?;
            if map.info()?.max_entries() <= flow_table {
                continue;
            }
            let held = per_table(name, CountEntries(map))?;
            if held > flow_table as usize {
                anyhow::bail!(
                    "--flow-table-size {flow_table}: table {name} holds {held} flows now; give at least that many \
                     (or restart with the smaller size once flows have ended); nothing was changed"
                );
            }
        }
        for name in FLOW_TABLES {
            let pin = maps_dir.join(name);
            let aside = maps_dir.join(format!("{name}{RESIZE_SUFFIX}"));
            if !pin.exists() {
                continue;
            }
            let map = MapData::from_pin(&pin).with_context(|| format!("opening pinned map {name}"))?;
            let had = map.info()?.max_entries();
            if had == flow_table {
                continue;
            }
            // (bpffs renames nothing: the table is pinned again under the
            // other name.) If an earlier resize did not finish, its flows
            // are still there to carry, and the table made since is
            // dropped.
            if !aside.exists() {
                map.pin(&aside)
                    .with_context(|| format!("pinning {name} aside at {}", aside.display()))?;
            }
            std::fs::remove_file(&pin).with_context(|| format!("removing {}", pin.display()))?;
            tracing::info!(table = name, from = had, to = flow_table, "resizing a connection table");
        }
        let mut loader = EbpfLoader::new();
        loader.map_pin_path(&maps_dir);
        for name in FLOW_TABLES {
            loader.set_max_entries(name, flow_table);
        }
        let mut ebpf = loader.load(OBJECT).with_context(|| {
            format!(
                "loading the eBPF object (maps pinned under the pin directory; connection tables of {flow_table} entries: see --flow-table-size)"
            )
        })?;
        for name in tc_programs() {
            let p: &mut SchedClassifier = ebpf
                .program_mut(name)
                .with_context(|| format!("program {name} missing from the object"))?
                .try_into()?;
            p.load()
                .map_err(verifier_said)
                .with_context(|| format!("verifying and loading program {name}"))?;
        }
        let xdp: &mut Xdp = ebpf
            .program_mut(XDP_PROGRAM)
            .with_context(|| format!("program {XDP_PROGRAM} missing from the object"))?
            .try_into()?;
        xdp.load()
            .map_err(verifier_said)
            .with_context(|| format!("verifying and loading program {XDP_PROGRAM}"))?;
        // This load's stages, in this load's own program array, pinned
        // under a name of its own: the entry programs swapped in later use
        // it, the ones still attached keep theirs until they are swapped.
        let mut fds = Vec::new();
        for (slot, name) in stage::PROGRAMS {
            let p: &SchedClassifier = ebpf.program(name).expect("loaded").try_into()?;
            fds.push((slot, p.fd()?.try_clone()?));
        }
        let pipe_map = ebpf.map_mut(PIPE_MAP).context("map SDN_PIPE missing")?;
        let mut pipe: ProgramArray<&mut MapData> = ProgramArray::try_from(pipe_map)?;
        for (slot, fd) in &fds {
            pipe.set(*slot, fd, 0)
                .with_context(|| format!("setting stage {slot} of the pipeline"))?;
        }
        let pipe_map = ebpf.map(PIPE_MAP).context("map SDN_PIPE missing")?;
        let id = match pipe_map {
            aya::maps::Map::ProgramArray(d) => d.info()?.id(),
            _ => anyhow::bail!("map SDN_PIPE is not a program array"),
        };
        let pipe_pin = pipes_dir.join(format!("{PIPE_PIN}{id}"));
        if let aya::maps::Map::ProgramArray(d) = pipe_map {
            d.pin(&pipe_pin)
                .with_context(|| format!("pinning the pipeline at {}", pipe_pin.display()))?;
        }
        let mut dp = Dataplane {
            ebpf,
            pin_dir: pin_dir.to_path_buf(),
            config: m::HostConfig::default(),
            pipe_pin,
            traffic: Default::default(),
            mirror_ids: Default::default(),
            system_ids: Default::default(),
            lb_generations: Default::default(),
            lb_backends: Default::default(),
            lb_started: false,
            lb_ports: Default::default(),
            lb_names: Default::default(),
            nat_records: Default::default(),
            mirror_gen: [0; m::MIRROR_SLOTS as usize],
            mirror_links: BTreeSet::new(),
            vrrp_overlay_link: 0,
            vrrp_links: BTreeSet::new(),
            mirror_overlay_link: false,
        };
        // An upgrade: the earlier version's flows are in the new table
        // before any link runs the new programs (and again, for flows made
        // meanwhile, when the last link has switched).
        if let Some(n) = dp.migrate_v1_flows()? {
            tracing::info!(flows = n, "carried over flows of the earlier version's table");
        }
        dp.carry_resized(false)?;
        dp.seed_nat()?;
        Ok(dp)
    }

    /// Gives the host its secret for drawing NAT ports, once (kept pinned,
    /// so a restarted agent draws as the one before).
    fn seed_nat(&mut self) -> anyhow::Result<()> {
        use dataplane_common::lb as l;
        let map = self.ebpf.map_mut(l::NAT_SEED).context("map NAT_SEED missing")?;
        let mut a: Array<&mut MapData, u32> = Array::try_from(map)?;
        if a.get(&0, 0).unwrap_or(0) != 0 {
            return Ok(());
        }
        let mut b = [0u8; 4];
        while u32::from_ne_bytes(b) == 0 {
            use std::io::Read as _;
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut b))
                .context("reading /dev/urandom for the NAT ports' secret")?;
        }
        a.set(0, u32::from_ne_bytes(b), 0)
            .context("writing the NAT ports' secret")?;
        Ok(())
    }

    /// Copies the flows of connection tables moved aside for a resize into
    /// the new ones (entries already there are left as they are). With
    /// `last`, every link runs the new programs: the tables moved aside
    /// are removed after this copy.
    fn carry_resized(&mut self, last: bool) -> anyhow::Result<bool> {
        let mut carried = false;
        let maps_dir = self.pin_dir.join("maps");
        for name in FLOW_TABLES {
            let aside = maps_dir.join(format!("{name}{RESIZE_SUFFIX}"));
            if !aside.exists() {
                continue;
            }
            let (copied, left) = per_table(
                name,
                CarryEntries {
                    dp: self,
                    name,
                    from: &aside,
                },
            )?;
            if left > 0 {
                tracing::warn!(
                    table = name,
                    carried = copied,
                    left_out = left,
                    "the new table is too small for every flow of the old one"
                );
            } else {
                tracing::info!(table = name, carried = copied, "flows carried into the resized table");
            }
            if last {
                std::fs::remove_file(&aside).with_context(|| format!("removing {}", aside.display()))?;
            }
            carried = true;
        }
        Ok(carried)
    }

    /// Copies the entries of the table pinned at `from` into this load's
    /// table `name`: (copied, not copied for want of room).
    fn carry<K: Pod, V: Pod>(&mut self, name: &str, from: &Path) -> anyhow::Result<(usize, usize)> {
        let old = MapData::from_pin(from).with_context(|| format!("opening {}", from.display()))?;
        let old: BpfHashMap<MapData, K, V> = BpfHashMap::try_from(aya::maps::Map::HashMap(old))?;
        let map = self.ebpf.map_mut(name).with_context(|| format!("map {name} missing"))?;
        let mut new: BpfHashMap<&mut MapData, K, V> = BpfHashMap::try_from(map)?;
        let (mut copied, mut left) = (0, 0);
        for item in old.iter() {
            let Ok((k, v)) = item else { continue };
            if new.get(&k, 0).is_ok() {
                continue;
            }
            match new.insert(k, v, 0) {
                Ok(()) => copied += 1,
                Err(_) => left += 1,
            }
        }
        Ok((copied, left))
    }

    /// The kernel's accounting for this load's connection tables.
    pub fn flow_tables(&self) -> anyhow::Result<Vec<(&'static str, TableMemory)>> {
        FLOW_TABLES
            .iter()
            .map(|name| match self.ebpf.map(name) {
                Some(aya::maps::Map::HashMap(d)) | Some(aya::maps::Map::LruHashMap(d)) => Ok((*name, table_memory(d)?)),
                _ => anyhow::bail!("map {name} missing"),
            })
            .collect()
    }

    /// Copies the flows of version 1's flow table into this version's,
    /// each with the door it was admitted through, worked out from the
    /// pinned ports, endpoints and zones: the own VPC, a peering, or a zone
    /// uplink. Flows already in the new table are left as they are.
    /// Returns how many were copied; `None` when there is no older table.
    pub fn migrate_v1_flows(&mut self) -> anyhow::Result<Option<usize>> {
        use aya::maps::lpm_trie::{Key, LpmTrie};
        let maps_dir = self.pin_dir.join("maps");
        let old_pin = maps_dir.join(m::v1::CT);
        if !old_pin.exists() {
            return Ok(None);
        }
        let open =
            |name: &str| MapData::from_pin(maps_dir.join(name)).with_context(|| format!("opening pinned {name}"));
        let old: BpfHashMap<MapData, m::v1::CtKey, m::CtValue> =
            BpfHashMap::try_from(aya::maps::Map::LruHashMap(open(m::v1::CT)?)).context("version 1 flow table")?;
        let ports: BpfHashMap<MapData, u32, m::PortInfo> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(open(m::PORTS)?))?;
        let endpoints: BpfHashMap<MapData, m::EndpointKey, m::Endpoint> =
            BpfHashMap::try_from(aya::maps::Map::HashMap(open(m::ENDPOINTS)?))?;
        let zones: LpmTrie<MapData, [u8; 20], u32> = LpmTrie::try_from(aya::maps::Map::LpmTrie(open(m::ZONE_NETS)?))?;
        let map = self.ebpf.map_mut(m::CT).context("map CT missing")?;
        let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(map)?;
        let mut copied = 0;
        for item in old.iter() {
            let Ok((k, v)) = item else { continue };
            let Ok(port) = ports.get(&k.ifindex, 0) else { continue };
            let ek = m::EndpointKey {
                vni: port.vni,
                family: k.family,
                _pad: [0; 3],
                addr: k.remote,
            };
            let door = match endpoints.get(&ek, 0) {
                Ok(ep) if ep.flags & m::EP_F_PEER != 0 => m::DOOR_PEER | ep.vni,
                Ok(_) => m::DOOR_VPC | port.vni,
                Err(_) if port.flags & m::PORT_F_UPLINK != 0 => {
                    match zones.get(&Key::new(8 + 128, m::zone_net_data(k.family, &k.remote)), 0) {
                        Ok(z) => m::DOOR_ZONE | z,
                        Err(_) => continue,
                    }
                }
                Err(_) => continue,
            };
            let icmp = match k.proto {
                dataplane_common::PROTO_ICMP | dataplane_common::PROTO_ICMPV6 => {
                    // Version 1 kept only echo flows by identifier.
                    if k.local_port == 0 {
                        continue;
                    }
                    m::icmp_class(
                        k.proto,
                        if k.proto == dataplane_common::PROTO_ICMP {
                            8
                        } else {
                            128
                        },
                    )
                }
                _ => 0,
            };
            let nk = m::CtKey {
                ifindex: k.ifindex,
                family: k.family,
                proto: k.proto,
                icmp,
                _pad: 0,
                local_port: k.local_port,
                remote_port: k.remote_port,
                local: k.local,
                remote: k.remote,
                door,
            };
            if ct.get(&nk, 0).is_ok() {
                continue;
            }
            if ct.insert(nk, v, 0).is_ok() {
                copied += 1;
            }
        }
        Ok(Some(copied))
    }

    /// Removes the program arrays of earlier loads. Call once every link
    /// runs this load's programs: the entries of an earlier load would
    /// find their stages gone and drop (fail closed). Flows an earlier
    /// version's programs made until then are copied over first, and its
    /// tables removed.
    pub fn retire_old_pipelines(&mut self) {
        match self.carry_resized(true) {
            // Each port's count of flows, from what the new table holds.
            Ok(true) => {
                if let Err(e) = self.collect_conntrack() {
                    tracing::warn!(error = %format!("{e:#}"), "recounting flows after the resize");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "carrying flows into the resized connection tables"),
        }
        let migration = self.migrate_v1_flows();
        let migrated = migration.is_ok();
        match migration {
            Ok(Some(n)) => {
                tracing::info!(
                    flows = n,
                    "flows of the earlier version's table carried over; its tables removed"
                );
                if let Err(e) = self.collect_conntrack() {
                    tracing::warn!(error = %format!("{e:#}"), "recounting flows after the migration");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %format!("{e:#}"), "carrying over the earlier version's flows"),
        }
        // No program reads an earlier version's tables any more (its flows
        // stay for another try if they could not be carried over).
        for name in m::v1::OBSOLETE {
            if !migrated && name == m::v1::CT {
                continue;
            }
            let pin = self.pin_dir.join("maps").join(name);
            match std::fs::remove_file(&pin) {
                Ok(()) => tracing::info!(pin = %pin.display(), "removed an earlier version's table"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::warn!(pin = %pin.display(), error = %e, "removing an earlier version's table"),
            }
        }
        let Ok(rd) = std::fs::read_dir(self.pin_dir.join("pipes")) else {
            return;
        };
        for e in rd.flatten() {
            if e.path() != self.pipe_pin {
                match std::fs::remove_file(e.path()) {
                    Ok(()) => tracing::info!(pin = %e.path().display(), "retired an earlier pipeline"),
                    Err(err) => tracing::warn!(pin = %e.path().display(), error = %err, "removing an earlier pipeline"),
                }
            }
        }
    }

    fn link_pin(&self, ifindex: u32, dir: &str) -> PathBuf {
        self.pin_dir.join("links").join(format!("{ifindex}-{dir}"))
    }

    /// Attaches both programs to a device, or atomically swaps the program
    /// of a link an earlier agent pinned.
    pub fn attach(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        for (name, attach_type, dir) in PROGRAMS {
            let pin = self.link_pin(ifindex, dir);
            self.attach_pinned(name, attach_type, ifname, &pin)?;
        }
        Ok(())
    }

    /// Attaches the zone guard to an uplink device (or swaps the programs of
    /// the pinned links).
    pub fn attach_uplink(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        for (name, attach_type, dir) in UPLINK_PROGRAMS {
            let pin = self.pin_dir.join("links").join(format!("uplink-{ifindex}-{dir}"));
            self.attach_pinned(name, attach_type, ifname, &pin)?;
        }
        Ok(())
    }

    /// Uplink devices that have pinned links.
    pub fn attached_uplinks(&self) -> BTreeSet<u32> {
        self.linked("uplink-")
    }

    /// Detaches the zone guard from a device that is no longer an uplink.
    pub fn detach_uplink(&mut self, ifindex: u32) {
        for (_, _, dir) in UPLINK_PROGRAMS {
            let _ = std::fs::remove_file(self.pin_dir.join("links").join(format!("uplink-{ifindex}-{dir}")));
        }
    }

    /// Attaches the overlay program to the VXLAN device's ingress (or swaps
    /// the program of the pinned link) and tells the programs its ifindex.
    pub fn attach_overlay(&mut self, ifname: &str, ifindex: u32) -> anyhow::Result<()> {
        let pin = self.pin_dir.join("links").join(format!("{OVERLAY_PIN}-{ifindex}"));
        // A link pinned for an earlier device of that name is stale.
        if let Ok(rd) = std::fs::read_dir(self.pin_dir.join("links")) {
            for e in rd.flatten() {
                let n = e.file_name();
                if n.to_string_lossy().starts_with(OVERLAY_PIN) && e.path() != pin {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        self.attach_pinned(OVERLAY_PROGRAM, TcAttachType::Ingress, ifname, &pin)?;
        self.config.vxlan_ifindex = ifindex;
        self.write_config()
    }

    /// Sets the number of flows one port may hold (0: the default).
    pub fn set_ct_budget(&mut self, budget: u32) -> anyhow::Result<()> {
        self.config.ct_budget = budget;
        self.write_config()
    }

    /// Replaces the host-wide settings (tests give the VXLAN device an
    /// ifindex of their choosing).
    pub fn set_host_config(&mut self, c: m::HostConfig) -> anyhow::Result<()> {
        self.config = c;
        self.write_config()
    }

    /// Writes the host-wide settings the programs read.
    fn write_config(&mut self) -> anyhow::Result<()> {
        let c = self.config;
        let map = self.ebpf.map_mut(m::CONFIG).context("map CONFIG missing")?;
        let mut cfg: Array<&mut MapData, m::HostConfig> = Array::try_from(map)?;
        cfg.set(0, c, 0).context("writing the host configuration")?;
        Ok(())
    }

    fn attach_pinned(&mut self, name: &str, attach_type: TcAttachType, ifname: &str, pin: &Path) -> anyhow::Result<()> {
        self.attach_pinned_at(name, attach_type, ifname, pin, LinkOrder::last())
    }

    fn attach_pinned_at(
        &mut self,
        name: &str,
        attach_type: TcAttachType,
        ifname: &str,
        pin: &Path,
        order: LinkOrder,
    ) -> anyhow::Result<()> {
        let prog: &mut SchedClassifier = self.ebpf.program_mut(name).expect("loaded").try_into()?;
        if pin.exists() {
            let adopted = PinnedLink::from_pin(pin)
                .map_err(anyhow::Error::from)
                .and_then(|p| Ok(SchedClassifierLink::try_from(FdLink::from(p))?))
                .and_then(|l| Ok(prog.attach_to_link(l)?));
            match adopted {
                Ok(id) => {
                    // The pin keeps the link; our handle may go.
                    let link = prog.take_link(id)?;
                    drop(link);
                    return Ok(());
                }
                Err(e) => {
                    tracing::warn!(device = ifname, pin = %pin.display(), error = %format!("{e:#}"), "stale link pin; attaching afresh");
                    let _ = std::fs::remove_file(pin);
                }
            }
        }
        let id = prog
            // The pipeline's entries go last on each hook: observers
            // (mirroring, flow sampling) attach before them and pass every
            // packet on.
            .attach_with_options(ifname, attach_type, TcAttachOptions::TcxOrder(order))
            .with_context(|| format!("attaching {name} to {ifname} ({attach_type:?})"))?;
        let link = prog.take_link(id)?;
        let fd: FdLink = link.try_into().context("TCX link expected")?;
        fd.pin(pin).with_context(|| format!("pinning link {}", pin.display()))?;
        Ok(())
    }

    /// Detaches both programs from a device by removing the link pins.
    pub fn detach(&mut self, ifindex: u32) {
        for (_, _, dir) in PROGRAMS {
            let pin = self.link_pin(ifindex, dir);
            if let Err(e) = std::fs::remove_file(&pin) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(pin = %pin.display(), error = %e, "removing link pin");
                }
            }
        }
    }

    /// Devices that have pinned links.
    pub fn attached(&self) -> BTreeSet<u32> {
        self.linked("")
    }

    /// The devices of the link pins named `PREFIXIFINDEX-...` (a pin of
    /// another prefix does not parse as one).
    fn linked(&self, prefix: &str) -> BTreeSet<u32> {
        let mut out = BTreeSet::new();
        if let Ok(rd) = std::fs::read_dir(self.pin_dir.join("links")) {
            for e in rd.flatten() {
                if let Some(i) = e
                    .file_name()
                    .to_str()
                    .and_then(|n| n.strip_prefix(prefix))
                    .and_then(|n| n.split('-').next())
                    .and_then(|n| n.parse().ok())
                {
                    out.insert(i);
                }
            }
        }
        out
    }

    fn take_map(&mut self, name: &str) -> anyhow::Result<aya::maps::Map> {
        self.ebpf.take_map(name).with_context(|| format!("map {name} missing"))
    }

    /// Hands the reconcilable maps to a reconciler.
    pub fn map_set(&mut self) -> anyhow::Result<MapSet> {
        MapSet::open(self)
    }

    /// Removes the flows of ports that are gone, from both tables, and
    /// their counts.
    pub fn flush_conntrack(&mut self, ifindexes: &BTreeSet<u32>) -> anyhow::Result<usize> {
        if ifindexes.is_empty() {
            return Ok(0);
        }
        let mut n = 0;
        for name in [m::CT, m::CT_SYN] {
            n += remove_keys::<m::CtKey, m::CtValue>(&mut self.ebpf, name, |k| ifindexes.contains(&k.ifindex))?;
        }
        let map = self.ebpf.map_mut(m::CT_COUNT).context("map CT_COUNT missing")?;
        let mut counts: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(map)?;
        for i in ifindexes {
            let _ = counts.remove(i);
        }
        // And their load-balanced flows: a device number used again by
        // another port must find none of them.
        use dataplane_common::lb as l;
        for name in [l::LB_FLOWS, l::LB_FLOWS_NEW] {
            remove_keys::<l::LbFlowKey, l::LbFlow>(&mut self.ebpf, name, |k| ifindexes.contains(&k.ifindex))?;
        }
        for name in [l::LB_REVERSE, l::LB_REVERSE_NEW] {
            remove_keys::<l::LbReverseKey, l::LbReverse>(&mut self.ebpf, name, |k| ifindexes.contains(&k.ifindex))?;
        }
        let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
        for i in ifindexes {
            t.retired.remove(i);
            t.ports.remove(i);
        }
        Ok(n)
    }

    /// The conntrack collector: removes flow-table entries that timed out
    /// and recounts each port's entries (the programs count on insert;
    /// entries leave only here). Returns (removed, remaining).
    pub fn collect_conntrack(&mut self) -> anyhow::Result<(usize, usize)> {
        self.collect_conntrack_observed(&mut |_, _, _| {})
            .map(|(r, n, _)| (r, n))
    }

    /// The conntrack collector, showing `observe` every entry of the flow
    /// table it read, and whether it removes the entry (timed out).
    /// Returns (removed, remaining, entries that could not be read).
    pub fn collect_conntrack_observed(
        &mut self,
        observe: &mut dyn FnMut(&m::CtKey, &m::CtValue, bool),
    ) -> anyhow::Result<(usize, usize, usize)> {
        let now = monotonic_ns();
        let map = self.ebpf.map_mut(m::CT).context("map CT missing")?;
        let mut ct: BpfHashMap<&mut MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(map)?;
        let mut expired = Vec::new();
        let mut per_port: std::collections::BTreeMap<u32, u32> = std::collections::BTreeMap::new();
        let mut live: std::collections::BTreeMap<u32, PortTraffic> = std::collections::BTreeMap::new();
        let mut gone: Vec<(u32, m::CtValue)> = Vec::new();
        let mut unread = 0;
        for item in ct.iter() {
            let Ok((k, v)) = item else {
                unread += 1;
                continue;
            };
            if now.saturating_sub(v.last_seen_ns) > m::ct_timeout(k.proto, v.flags) {
                observe(&k, &v, true);
                expired.push(k);
                gone.push((k.ifindex, v));
            } else {
                observe(&k, &v, false);
                *per_port.entry(k.ifindex).or_default() += 1;
                live.entry(k.ifindex).or_default().add(&v);
            }
        }
        for k in &expired {
            let _ = ct.remove(k);
        }
        {
            let mut t = self.traffic.lock().unwrap_or_else(|p| p.into_inner());
            for (i, v) in &gone {
                t.retired.entry(*i).or_default().add(v);
            }
            let mut ports = t.retired.clone();
            for (i, l) in &live {
                let p = ports.entry(*i).or_default();
                p.packets_out += l.packets_out;
                p.packets_in += l.packets_in;
                p.bytes_out += l.bytes_out;
                p.bytes_in += l.bytes_in;
            }
            for (i, n) in &per_port {
                ports.entry(*i).or_default().flows = u64::from(*n);
            }
            t.ports = ports;
        }
        let remaining = per_port.values().map(|c| *c as usize).sum();
        let map = self.ebpf.map_mut(m::CT_COUNT).context("map CT_COUNT missing")?;
        let mut counts: BpfHashMap<&mut MapData, u32, u32> = BpfHashMap::try_from(map)?;
        let held: Vec<u32> = counts.keys().filter_map(|k| k.ok()).collect();
        for i in held {
            if !per_port.contains_key(&i) {
                let _ = counts.remove(&i);
            }
        }
        for (i, c) in per_port {
            counts.insert(i, c, 0)?;
        }
        Ok((expired.len(), remaining, unread))
    }

    /// The north-south collector: removes the flows that timed out, with
    /// their replies, and shows `observe` every confirmed flow (as
    /// [`nat_flow_key`] makes it; `true`: removed now). Returns how many
    /// were removed.
    pub fn collect_nat_observed(
        &mut self,
        observe: &mut dyn FnMut(&m::CtKey, &m::CtValue, bool),
    ) -> anyhow::Result<usize> {
        use dataplane_common::lb as l;
        let now = monotonic_ns();
        let mut gone = 0;
        self.nat_records.clear();
        // The flows that live on, with their NAT ports: the replies of no
        // such flow go last.
        let mut live: std::collections::HashSet<(l::NatKey, l::NatReverseKey)> = Default::default();
        for (flows, confirmed) in [(l::NAT_FLOWS, true), (l::NAT_FLOWS_NEW, false)] {
            let map = self.ebpf.map(flows).with_context(|| format!("map {flows} missing"))?;
            let h: BpfHashMap<&MapData, l::NatKey, l::NatFlow> = BpfHashMap::try_from(map)?;
            let mut doomed: Vec<(l::NatKey, u64)> = Vec::new();
            for (k, f) in h.iter().filter_map(Result::ok) {
                let expired = now.saturating_sub(f.last_seen_ns) > l::nat_timeout(k.proto, f.flags, confirmed);
                if expired {
                    doomed.push((k, f.created_ns));
                } else {
                    live.insert((k, nat_reverse(&k, &f)));
                }
                // A copy of another holder's flow that carried nothing here
                // is that holder's to report.
                if !confirmed || f.packets_in | f.packets_out == 0 {
                    continue;
                }
                let (ck, cv) = nat_flow_key(&k, &f);
                let service = l::LbServiceKey {
                    vni: f.vni,
                    family: k.family,
                    proto: k.proto,
                    port: k.vport,
                    addr: k.vip,
                };
                if let Some(r) = self.lb_record(&service, &f.backend, f.backend_port) {
                    self.nat_records.insert(ck, r);
                }
                observe(&ck, &cv, expired);
            }
            if doomed.is_empty() {
                continue;
            }
            let map = self
                .ebpf
                .map_mut(flows)
                .with_context(|| format!("map {flows} missing"))?;
            let mut h: BpfHashMap<&mut MapData, l::NatKey, l::NatFlow> = BpfHashMap::try_from(map)?;
            for (k, created) in &doomed {
                // Unless a new flow took the key since it was read.
                if h.get(k, 0).is_ok_and(|f| f.created_ns == *created) && h.remove(k).is_ok() {
                    gone += 1;
                }
            }
        }
        // Replies whose flow is gone (timed out, or let go by its LRU): their
        // NAT ports are free again. The programs write a flow before its
        // reply, so a reply whose flow is not there when looked up after
        // the reply was read has none.
        for reverse in [l::NAT_REVERSE, l::NAT_REVERSE_NEW] {
            let map = self
                .ebpf
                .map(reverse)
                .with_context(|| format!("map {reverse} missing"))?;
            let h: BpfHashMap<&MapData, l::NatReverseKey, l::NatKey> = BpfHashMap::try_from(map)?;
            let candidates: Vec<(l::NatReverseKey, l::NatKey)> = h
                .iter()
                .filter_map(Result::ok)
                .filter(|(r, k)| !live.contains(&(*k, *r)))
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let flow_of = |name: &str, k: &l::NatKey| -> Option<l::NatFlow> {
                let map = self.ebpf.map(name)?;
                let h: BpfHashMap<&MapData, l::NatKey, l::NatFlow> = BpfHashMap::try_from(map).ok()?;
                h.get(k, 0).ok()
            };
            let orphans: Vec<l::NatReverseKey> = candidates
                .into_iter()
                .filter(|(r, k)| {
                    ![l::NAT_FLOWS, l::NAT_FLOWS_NEW]
                        .iter()
                        .any(|name| flow_of(name, k).is_some_and(|f| nat_reverse(k, &f) == *r))
                })
                .map(|(r, _)| r)
                .collect();
            let map = self
                .ebpf
                .map_mut(reverse)
                .with_context(|| format!("map {reverse} missing"))?;
            let mut h: BpfHashMap<&mut MapData, l::NatReverseKey, l::NatKey> = BpfHashMap::try_from(map)?;
            for r in orphans {
                let _ = h.remove(&r);
            }
        }
        Ok(gone)
    }

    /// The firewall rule number of a flow's last verdict, if a firewall
    /// judged it and allowed it.
    pub fn allowed_by_firewall(&self, k: &m::CtKey) -> Option<u32> {
        let map = self.ebpf.map(m::FW_VERDICTS)?;
        let verdicts: BpfHashMap<&MapData, m::CtKey, m::FwVerdict> = BpfHashMap::try_from(map).ok()?;
        verdicts
            .get(k, 0)
            .ok()
            .filter(|v| v.action == m::FW_ALLOW)
            .map(|v| v.rule_id)
    }

    /// The DNS answers the programs copy, for one reader.
    pub fn take_dns_copies(&mut self) -> anyhow::Result<aya::maps::perf::AsyncPerfEventArray<MapData>> {
        let map = self.take_map(m::DNS_COPIES)?;
        Ok(aya::maps::perf::AsyncPerfEventArray::try_from(map)?)
    }

    /// The ring of mirror copies for the agent to send, for one reader.
    pub fn take_mirror_ring(&mut self) -> anyhow::Result<aya::maps::perf::AsyncPerfEventArray<MapData>> {
        let map = self.take_map(m::MIRROR_RING)?;
        Ok(aya::maps::perf::AsyncPerfEventArray::try_from(map)?)
    }

    /// Writes mirroring's maps, and puts its observers first on the
    /// devices of the ports that need them (and on the VXLAN device when a
    /// tap here takes copies from other hosts), off every other device.
    /// The maps are written before an observer is attached, and an
    /// observer detached before its port's entry goes.
    pub fn apply_mirror(&mut self, plan: &crate::compile::mirror::MirrorPlan) -> anyhow::Result<MirrorApplied> {
        let r = self.apply_mirror_maps(plan);
        if r.is_err() {
            // Half-written maps could copy to the wrong place: every
            // session off until a pass succeeds.
            if let Some(map) = self.ebpf.map_mut(m::MIRROR_SESSIONS) {
                if let Ok(mut a) = Array::<&mut MapData, m::MirrorCfg>::try_from(map) {
                    for slot in 0..m::MIRROR_SLOTS {
                        let _ = a.set(slot, m::MirrorCfg::default(), 0);
                    }
                }
            }
            self.mirror_ids.clear();
        }
        r
    }

    fn apply_mirror_maps(&mut self, plan: &crate::compile::mirror::MirrorPlan) -> anyhow::Result<MirrorApplied> {
        // Observers off the devices that no longer need them.
        let held = self.mirror_attached();
        for ifx in held.difference(&plan.ports.keys().copied().collect()) {
            for (_, _, dir) in MIRROR_PROGRAMS {
                let _ = std::fs::remove_file(self.pin_dir.join("links").join(format!("mirror-{ifx}-{dir}")));
            }
            self.mirror_links.remove(ifx);
            tracing::info!(ifindex = ifx, "mirroring's observers detached");
        }
        let overlay_pin = self.pin_dir.join("links").join(MIRROR_OVERLAY_PIN);
        if plan.vnis.is_empty() {
            let _ = std::fs::remove_file(&overlay_pin);
            self.mirror_overlay_link = false;
        }
        // Slots that change hands get a new generation, and start their
        // counts anew. Their bits leave the ports first, so no packet is
        // copied under a slot whose session is half written.
        let ids: std::collections::BTreeMap<u32, String> = plan.slots.iter().map(|(k, s)| (*k, s.id.clone())).collect();
        let changed: Vec<u32> = (0..m::MIRROR_SLOTS)
            .filter(|s| ids.get(s) != self.mirror_ids.get(s))
            .collect();
        let changed_bits: u32 = changed.iter().fold(0, |b, s| b | (1 << s));
        if changed_bits != 0 {
            let interim: std::collections::BTreeMap<u32, m::MirrorPort> = plan
                .ports
                .iter()
                .map(|(k, p)| {
                    (
                        *k,
                        m::MirrorPort {
                            in_mask: p.in_mask & !changed_bits,
                            out_mask: p.out_mask & !changed_bits,
                            ..*p
                        },
                    )
                })
                .collect();
            let old: std::collections::BTreeMap<u32, m::MirrorPort> = {
                let map = self.ebpf.map(m::MIRROR_PORTS).context("map MIRROR_PORTS missing")?;
                let h: BpfHashMap<&MapData, u32, m::MirrorPort> = BpfHashMap::try_from(map)?;
                h.iter().filter_map(Result::ok).collect()
            };
            // Ports that stay keep their other sessions meanwhile.
            let mut first = interim;
            for (k, p) in old {
                first.entry(k).or_insert(m::MirrorPort {
                    in_mask: p.in_mask & !changed_bits,
                    out_mask: p.out_mask & !changed_bits,
                    ..p
                });
            }
            sync_hash(&mut self.ebpf, m::MIRROR_PORTS, &first)?;
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
            let map = self.ebpf.map_mut(m::MIRROR_STATE).context("map MIRROR_STATE missing")?;
            let mut st: PerCpuArray<&mut MapData, m::MirrorState> = PerCpuArray::try_from(map)?;
            for slot in &changed {
                let zero = aya::maps::PerCpuValues::try_from(vec![m::MirrorState::default(); cpus])?;
                st.set(*slot, zero, 0).context("clearing a mirror slot's counts")?;
                self.mirror_gen[*slot as usize] = self.mirror_gen[*slot as usize].wrapping_add(1);
            }
        }
        {
            let map = self
                .ebpf
                .map_mut(m::MIRROR_SESSIONS)
                .context("map MIRROR_SESSIONS missing")?;
            let mut a: Array<&mut MapData, m::MirrorCfg> = Array::try_from(map)?;
            for slot in 0..m::MIRROR_SLOTS {
                let mut cfg = plan.slots.get(&slot).map(|s| s.cfg).unwrap_or_default();
                cfg.generation = self.mirror_gen[slot as usize];
                a.set(slot, cfg, 0).context("writing a mirror session")?;
            }
        }
        self.mirror_ids = ids;
        sync_hash(&mut self.ebpf, m::MIRROR_PORTS, &plan.ports)?;
        {
            let on = plan.ports.values().filter(|p| p.in_mask != 0).count() as u32;
            let map = self.ebpf.map_mut(m::MIRROR_ON).context("map MIRROR_ON missing")?;
            let mut a: Array<&mut MapData, u32> = Array::try_from(map)?;
            a.set(0, on, 0).context("writing MIRROR_ON")?;
        }
        sync_hash(&mut self.ebpf, m::MIRROR_VNIS, &plan.vnis)?;
        let senders: std::collections::BTreeMap<u32, u8> = plan.senders.iter().map(|s| (*s, 1u8)).collect();
        sync_hash(&mut self.ebpf, m::MIRROR_SENDERS, &senders)?;
        // Attached, or (left by an earlier agent) swapped to this load's
        // programs, once per device.
        for ifx in plan.ports.keys() {
            if self.mirror_links.contains(ifx) {
                continue;
            }
            let name = ifname(*ifx).with_context(|| format!("no device of ifindex {ifx} to mirror"))?;
            for (prog, attach_type, dir) in MIRROR_PROGRAMS {
                let pin = self.pin_dir.join("links").join(format!("mirror-{ifx}-{dir}"));
                self.attach_pinned_at(prog, attach_type, &name, &pin, LinkOrder::first())?;
            }
            self.mirror_links.insert(*ifx);
            tracing::info!(device = %name, ifindex = ifx, adopted = held.contains(ifx), "mirroring's observers attached");
        }
        if !plan.vnis.is_empty() && !self.mirror_overlay_link {
            let vx = self.config.vxlan_ifindex;
            let name = ifname(vx).context("a tap here takes copies from other hosts, and there is no VXLAN device")?;
            self.attach_pinned_at(
                MIRROR_OVERLAY_PROGRAM,
                TcAttachType::Ingress,
                &name,
                &overlay_pin,
                LinkOrder::first(),
            )?;
            self.mirror_overlay_link = true;
            tracing::info!(device = %name, "mirroring's observer attached to the VXLAN device");
        }
        Ok(MirrorApplied {
            generations: plan.slots.keys().map(|s| (*s, self.mirror_gen[*s as usize])).collect(),
            changed,
        })
    }

    /// Points each information system's port at its slot (the programs
    /// count its bytes with the zones there).
    /// A slot new to its holder (in this process) has its counts set to
    /// zero first; returns those slots.
    pub fn apply_systems(&mut self, plan: &crate::compile::systems::SystemPlan) -> anyhow::Result<Vec<u32>> {
        let ids: std::collections::BTreeMap<u32, String> = plan.slots.iter().map(|(k, s)| (*k, s.id.clone())).collect();
        let fresh: Vec<u32> = ids
            .iter()
            .filter(|(k, id)| self.system_ids.get(k) != Some(id))
            .map(|(k, _)| *k)
            .collect();
        if !fresh.is_empty() {
            let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow::anyhow!("{what}: {e}"))?;
            let map = self.ebpf.map_mut(m::SYSTEM_BYTES).context("map SYSTEM_BYTES missing")?;
            let mut a: PerCpuArray<&mut MapData, u64> = PerCpuArray::try_from(map)?;
            for slot in &fresh {
                for zone in 1..=m::ZONES_MAX {
                    for way in [m::SYSTEM_UP, m::SYSTEM_DOWN] {
                        let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])?;
                        a.set(m::system_index(*slot, zone, way), zero, 0)
                            .context("setting an information system's counts to zero")?;
                    }
                }
            }
        }
        sync_hash(&mut self.ebpf, m::SYSTEM_PORTS, &plan.ports)?;
        self.system_ids = ids;
        Ok(fresh)
    }

    /// Writes the load balancers' services. A service gone, or whose
    /// number changed hands, is removed first; then the backends and the
    /// tables of the services that changed are written; then the services,
    /// which point the programs at them. Backend slots no longer used are
    /// emptied last (a flow to one is scheduled again). After the agent
    /// starts, every slot of every service the pinned map held is emptied
    /// unless the plan uses it.
    pub fn apply_lb(&mut self, plan: &crate::compile::lb::LbPlan) -> anyhow::Result<()> {
        use dataplane_common::lb as l;
        let services: std::collections::BTreeMap<l::LbServiceKey, l::LbService> =
            plan.services.iter().map(|(k, s)| (*k, s.info)).collect();
        let mut backends = std::collections::BTreeMap::new();
        for s in plan.services.values() {
            for (slot, b) in &s.backends {
                backends.insert(s.info.id * l::LB_BACKENDS + slot, *b);
            }
        }
        let mut held_ids = BTreeSet::new();
        {
            let map = self.ebpf.map_mut(l::LB_SERVICES).context("map LB_SERVICES missing")?;
            let mut h: BpfHashMap<&mut MapData, l::LbServiceKey, l::LbService> = BpfHashMap::try_from(map)?;
            let held: Vec<(l::LbServiceKey, l::LbService)> = h.iter().filter_map(Result::ok).collect();
            for (k, v) in held {
                held_ids.insert(v.id);
                if services.get(&k).map(|s| s.id) != Some(v.id) {
                    let _ = h.remove(&k);
                }
            }
        }
        if !self.lb_started {
            // Whatever an earlier process left in those services' slots.
            for id in &held_ids {
                for slot in 0..l::LB_BACKENDS {
                    self.lb_backends.entry(id * l::LB_BACKENDS + slot).or_default();
                }
            }
            self.lb_started = true;
        }
        {
            let map = self
                .ebpf
                .map_mut(l::LB_BACKENDS_MAP)
                .context("map LB_BACKENDS missing")?;
            let mut a: Array<&mut MapData, l::LbBackend> = Array::try_from(map)?;
            for (i, b) in &backends {
                if self.lb_backends.get(i) != Some(b) {
                    a.set(*i, b, 0).context("writing a load-balancer backend")?;
                }
            }
        }
        {
            // A slot with another backend now starts its counts afresh.
            let map = self.ebpf.map_mut(l::LB_CONNS).context("map LB_CONNS missing")?;
            let mut a: Array<&mut MapData, l::LbConns> = Array::try_from(map)?;
            for (i, b) in &backends {
                let was = self.lb_backends.get(i);
                if was.is_none_or(|w| w.addr != b.addr || w.port != b.port) {
                    a.set(*i, l::LbConns::default(), 0)
                        .context("resetting a backend's flow counts")?;
                }
            }
        }
        {
            let map = self.ebpf.map_mut(l::LB_TABLE).context("map LB_TABLE missing")?;
            let mut a: Array<&mut MapData, u32> = Array::try_from(map)?;
            for s in plan.services.values() {
                if self.lb_generations.get(&s.info.id) == Some(&s.info.generation) {
                    continue;
                }
                for (i, slot) in s.table.iter().enumerate() {
                    a.set(s.info.id * l::LB_TABLE_SIZE + i as u32, slot, 0)
                        .context("writing a load-balancer table")?;
                }
            }
        }
        sync_hash(&mut self.ebpf, l::LB_SERVICES, &services)?;
        sync_hash(&mut self.ebpf, l::NAT_SERVICES, &plan.nat)?;
        {
            let map = self
                .ebpf
                .map_mut(l::LB_BACKENDS_MAP)
                .context("map LB_BACKENDS missing")?;
            let mut a: Array<&mut MapData, l::LbBackend> = Array::try_from(map)?;
            for i in self.lb_backends.keys().filter(|i| !backends.contains_key(i)) {
                a.set(*i, l::LbBackend::default(), 0)
                    .context("emptying a load-balancer backend")?;
            }
        }
        self.lb_backends = backends;
        self.lb_ports = plan.ports.clone();
        self.lb_names = plan
            .services
            .iter()
            .map(|(k, s)| (*k, (s.name.clone(), s.members.clone())))
            .collect();
        self.lb_generations = plan.services.values().map(|s| (s.info.id, s.info.generation)).collect();
        Ok(())
    }

    /// The load balancers' services and backend slots the pinned maps
    /// hold (from an earlier run of the agent).
    /// The load balancing of a flow as its client's port holds it (the
    /// flow table's entry of the client's side): the service, the address
    /// and port the client asked, and the member. `None` for any other
    /// flow.
    pub fn lb_of_flow(&self, k: &m::CtKey) -> Option<sdn_flowexport::record::LbRecord> {
        use dataplane_common::lb as l;
        if k.ifindex & NAT_FLOW_CONTEXT != 0 {
            return self.nat_records.get(k).cloned();
        }
        let vni = *self.lb_ports.get(&k.ifindex)?;
        let rk = l::LbReverseKey {
            ifindex: k.ifindex,
            family: k.family,
            proto: k.proto,
            client_port: k.local_port,
            backend_port: k.remote_port,
            _pad: 0,
            backend: k.remote,
        };
        let r = [l::LB_REVERSE, l::LB_REVERSE_NEW].iter().find_map(|name| {
            let map = self.ebpf.map(name)?;
            let h: BpfHashMap<&MapData, l::LbReverseKey, l::LbReverse> = BpfHashMap::try_from(map).ok()?;
            h.get(&rk, 0).ok()
        })?;
        let key = l::LbServiceKey {
            vni,
            family: k.family,
            proto: k.proto,
            port: r.vport,
            addr: r.vip,
        };
        self.lb_record(&key, &k.remote, k.remote_port)
    }

    /// What a flow record says of a flow through service `key` to the
    /// backend `backend`:`port`: the service, the VIP and port, the member.
    fn lb_record(
        &self,
        key: &dataplane_common::lb::LbServiceKey,
        backend: &[u8; 16],
        port: u16,
    ) -> Option<sdn_flowexport::record::LbRecord> {
        let (name, members) = self.lb_names.get(key)?;
        // "lb/listener/family": the service is the listener of its load
        // balancer.
        let service = name.rsplit_once('/').map_or(name.as_str(), |(s, _)| s).to_string();
        let member = members.get(&(*backend, port)).cloned().unwrap_or_default();
        let vip = crate::flows::addr(key.family, &key.addr);
        Some(sdn_flowexport::record::LbRecord {
            service,
            vip: match vip {
                std::net::IpAddr::V4(a) => format!("{a}:{}", key.port),
                std::net::IpAddr::V6(a) => format!("[{a}]:{}", key.port),
            },
            member,
        })
    }

    pub fn lb_held(&self) -> anyhow::Result<crate::compile::lb::LbHeld> {
        use dataplane_common::lb as l;
        let mut held = crate::compile::lb::LbHeld::default();
        let map = self.ebpf.map(l::LB_SERVICES).context("map LB_SERVICES missing")?;
        let h: BpfHashMap<&MapData, l::LbServiceKey, l::LbService> = BpfHashMap::try_from(map)?;
        held.services = h.iter().filter_map(Result::ok).map(|(k, v)| (k, v.id)).collect();
        let map = self.ebpf.map(l::LB_BACKENDS_MAP).context("map LB_BACKENDS missing")?;
        let a: Array<&MapData, l::LbBackend> = Array::try_from(map)?;
        for id in held.services.values() {
            let mut slots = std::collections::BTreeMap::new();
            for slot in 0..l::LB_BACKENDS {
                if let Ok(b) = a.get(&(id * l::LB_BACKENDS + slot), 0) {
                    if b.flags & l::LB_BACKEND_LIVE != 0 {
                        slots.insert((b.addr, b.port), slot);
                    }
                }
            }
            held.backends.insert(*id, slots);
        }
        Ok(held)
    }

    /// Counts each load-balancer backend's flows again from the flow
    /// tables, for least connections: confirmed flows still open whose
    /// client side conntrack still holds, and unconfirmed ones not timed
    /// out. Corrects what the programs cannot count: flows conntrack's
    /// timeouts took, and closes counted twice or never. Returns the
    /// flows counted.
    pub fn recount_lb(&mut self) -> anyhow::Result<usize> {
        use dataplane_common::lb as l;
        let now = monotonic_ns();
        let mut counts: std::collections::BTreeMap<u32, l::LbConns> = std::collections::BTreeMap::new();
        count_nat(&self.ebpf, now, &self.lb_backends, &mut counts)?;
        if self.lb_backends.is_empty() {
            return Ok(0);
        }
        let vni = &self.lb_ports;
        let read = |ebpf: &aya::Ebpf, name: &str| -> anyhow::Result<Vec<(l::LbFlowKey, l::LbFlow)>> {
            let map = ebpf.map(name).with_context(|| format!("map {name} missing"))?;
            let h: BpfHashMap<&MapData, l::LbFlowKey, l::LbFlow> = BpfHashMap::try_from(map)?;
            Ok(h.iter().filter_map(Result::ok).collect())
        };
        let confirmed = read(&self.ebpf, l::LB_FLOWS)?;
        let unconfirmed = read(&self.ebpf, l::LB_FLOWS_NEW)?;
        let map = self.ebpf.map(m::CT).context("map CT missing")?;
        let ct: BpfHashMap<&MapData, m::CtKey, m::CtValue> = BpfHashMap::try_from(map)?;
        // Whether the client side's flow-table entry is live.
        let live = |k: &l::LbFlowKey, f: &l::LbFlow| -> bool {
            let Some(v) = vni.get(&k.ifindex) else { return false };
            let key = m::CtKey {
                ifindex: k.ifindex,
                family: k.family,
                proto: k.proto,
                icmp: 0,
                _pad: 0,
                local_port: k.client_port,
                remote_port: f.backend_port,
                local: f.client,
                remote: f.backend,
                door: m::DOOR_VPC | v,
            };
            ct.get(&key, 0)
                .is_ok_and(|c| now.saturating_sub(c.last_seen_ns) <= m::ct_timeout(k.proto, c.flags))
        };
        // A flow counts for its slot only while the slot holds its backend.
        let holds = |f: &l::LbFlow| {
            self.lb_backends
                .get(&(f.service * l::LB_BACKENDS + f.slot as u32))
                .is_some_and(|b| b.addr == f.backend && b.port == f.backend_port)
        };
        let reverse_of = |k: &l::LbFlowKey, f: &l::LbFlow| l::LbReverseKey {
            ifindex: k.ifindex,
            family: k.family,
            proto: k.proto,
            client_port: k.client_port,
            backend_port: f.backend_port,
            _pad: 0,
            backend: f.backend,
        };
        // Flows conntrack no longer holds go, so that in these LRUs only
        // such flows ever give way.
        let mut gone: Vec<(l::LbFlowKey, l::LbReverseKey)> = Vec::new();
        let mut gone_new: Vec<(l::LbFlowKey, l::LbReverseKey)> = Vec::new();
        for (k, f) in &confirmed {
            if !live(k, f) {
                gone.push((*k, reverse_of(k, f)));
            } else if f.flags & (l::LB_FLOW_OPEN | l::LB_FLOW_CLOSED) == l::LB_FLOW_OPEN && holds(f) {
                counts
                    .entry(f.service * l::LB_BACKENDS + f.slot as u32)
                    .or_default()
                    .open += 1;
            }
        }
        for (k, f) in &unconfirmed {
            let timeout = if k.proto == dataplane_common::PROTO_TCP {
                m::CT_TIMEOUT_SYN_NS
            } else {
                m::ct_timeout(k.proto, 0)
            };
            // Confirmed by conntrack, not yet by the load balancer: open.
            if live(k, f) {
                if holds(f) {
                    counts
                        .entry(f.service * l::LB_BACKENDS + f.slot as u32)
                        .or_default()
                        .open += 1;
                }
            } else if now.saturating_sub(f.created_ns) <= timeout {
                if holds(f) {
                    counts
                        .entry(f.service * l::LB_BACKENDS + f.slot as u32)
                        .or_default()
                        .new += 1;
                }
            } else {
                gone_new.push((*k, reverse_of(k, f)));
            }
        }
        drop(ct);
        for (flows, reverse, doomed) in [
            (l::LB_FLOWS, l::LB_REVERSE, &gone),
            (l::LB_FLOWS_NEW, l::LB_REVERSE_NEW, &gone_new),
        ] {
            if doomed.is_empty() {
                continue;
            }
            let map = self
                .ebpf
                .map_mut(flows)
                .with_context(|| format!("map {flows} missing"))?;
            let mut h: BpfHashMap<&mut MapData, l::LbFlowKey, l::LbFlow> = BpfHashMap::try_from(map)?;
            for (k, _) in doomed.iter() {
                let _ = h.remove(k);
            }
            let map = self
                .ebpf
                .map_mut(reverse)
                .with_context(|| format!("map {reverse} missing"))?;
            let mut h: BpfHashMap<&mut MapData, l::LbReverseKey, l::LbReverse> = BpfHashMap::try_from(map)?;
            for (_, r) in doomed.iter() {
                let _ = h.remove(r);
            }
        }
        let total = counts.values().map(|c| (c.open + c.new) as usize).sum();
        let map = self.ebpf.map_mut(l::LB_CONNS).context("map LB_CONNS missing")?;
        let mut a: Array<&mut MapData, l::LbConns> = Array::try_from(map)?;
        for i in self.lb_backends.keys() {
            let c = counts.get(i).copied().unwrap_or_default();
            if a.get(i, 0).ok() != Some(c) {
                a.set(*i, c, 0).context("writing a backend's flow counts")?;
            }
        }
        Ok(total)
    }

    /// Puts VRRP's observers first on the devices of the holder ports
    /// here (`ports`), and on the VXLAN device while any is; takes them off
    /// every other device, and forgets the advertisements of ports that no
    /// longer hold. The routers' map is written before (see `reconcile`).
    pub fn apply_vrrp(&mut self, ports: &BTreeSet<u32>) -> anyhow::Result<()> {
        let held = self.linked("vrrp-");
        for ifx in held.difference(ports) {
            for (_, _, dir) in VRRP_PROGRAMS {
                let _ = std::fs::remove_file(self.pin_dir.join("links").join(format!("vrrp-{ifx}-{dir}")));
            }
            tracing::info!(ifindex = ifx, "VRRP observers detached");
        }
        {
            let map = self.ebpf.map_mut(m::VRRP_SEEN).context("map VRRP_SEEN missing")?;
            let mut seen: BpfHashMap<&mut MapData, m::VrrpSeenKey, m::VrrpSeen> = BpfHashMap::try_from(map)?;
            let stale: Vec<m::VrrpSeenKey> = seen
                .keys()
                .filter_map(Result::ok)
                .filter(|k| !ports.contains(&k.ifindex))
                .collect();
            for k in stale {
                let _ = seen.remove(&k);
            }
        }
        self.vrrp_links.retain(|i| ports.contains(i));
        // Attached, or (left by an earlier agent) swapped to this load's
        // programs, once per device; one that fails leaves the others be.
        let mut failed = Vec::new();
        for ifx in ports {
            if self.vrrp_links.contains(ifx) {
                continue;
            }
            let attach = |dp: &mut Self| -> anyhow::Result<String> {
                let name = ifname(*ifx).with_context(|| format!("no device of ifindex {ifx}"))?;
                for (prog, attach_type, dir) in VRRP_PROGRAMS {
                    let pin = dp.pin_dir.join("links").join(format!("vrrp-{ifx}-{dir}"));
                    dp.attach_pinned_at(prog, attach_type, &name, &pin, LinkOrder::first())?;
                }
                Ok(name)
            };
            match attach(self) {
                Ok(name) => {
                    self.vrrp_links.insert(*ifx);
                    tracing::info!(device = %name, ifindex = ifx, adopted = held.contains(ifx), "VRRP observers attached");
                }
                Err(e) => failed.push(format!("ifindex {ifx}: {e:#}")),
            }
        }
        // The VXLAN device's observer, pinned by the device's ifindex (a
        // device made anew gets it again).
        let vx = self.config.vxlan_ifindex;
        let want = (!ports.is_empty()).then_some(vx);
        if let Ok(rd) = std::fs::read_dir(self.pin_dir.join("links")) {
            for e in rd.flatten() {
                let n = e.file_name().to_string_lossy().to_string();
                if n.starts_with(VRRP_OVERLAY_PIN) && want.is_none_or(|x| n != format!("{VRRP_OVERLAY_PIN}-{x}")) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        match want {
            None => self.vrrp_overlay_link = 0,
            Some(x) if x != self.vrrp_overlay_link => {
                let pin = self.pin_dir.join("links").join(format!("{VRRP_OVERLAY_PIN}-{x}"));
                let r = ifname(x)
                    .context("VRRP of holder ports here needs the VXLAN device")
                    .and_then(|name| {
                        self.attach_pinned_at(
                            VRRP_OVERLAY_PROGRAM,
                            TcAttachType::Ingress,
                            &name,
                            &pin,
                            LinkOrder::first(),
                        )
                    });
                match r {
                    Ok(()) => self.vrrp_overlay_link = x,
                    Err(e) => failed.push(format!("the VXLAN device: {e:#}")),
                }
            }
            Some(_) => {}
        }
        if !failed.is_empty() {
            anyhow::bail!("VRRP observers not attached: {}", failed.join("; "));
        }
        Ok(())
    }

    /// Devices that have mirroring's observers attached.
    pub fn mirror_attached(&self) -> BTreeSet<u32> {
        self.linked("mirror-")
    }

    /// The ring of denial events, for one reader.
    pub fn take_events(&mut self) -> anyhow::Result<aya::maps::RingBuf<MapData>> {
        let map = self.take_map(m::EVENTS)?;
        Ok(aya::maps::RingBuf::try_from(map)?)
    }

    /// What the flow table counted per port, as of the last collection.
    pub fn traffic(&self) -> std::sync::Arc<std::sync::Mutex<Traffic>> {
        self.traffic.clone()
    }

    /// The pin directory.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The program file descriptor, for BPF_PROG_TEST_RUN.
    pub fn program_fd(&self, name: &str) -> anyhow::Result<std::os::fd::RawFd> {
        use std::os::fd::{AsFd, AsRawFd};
        let fd = match self.ebpf.program(name).context("no such program")? {
            aya::programs::Program::SchedClassifier(p) => p.fd()?,
            aya::programs::Program::Xdp(p) => p.fd()?,
            _ => anyhow::bail!("program {name} is neither TC nor XDP"),
        };
        Ok(fd.as_fd().as_raw_fd())
    }

    /// Direct access to a pinned map, for tests and benchmarks.
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }
}

/// The firewall verdicts recorded per flow, with rule names, from a pin
/// directory: one JSON object per flow.
pub fn read_verdicts(pin_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let names_data = MapData::from_pin(pin_dir.join("maps").join(m::FW_NAMES)).context("opening the rule names")?;
    let names_map: BpfHashMap<MapData, u32, m::RuleName> =
        BpfHashMap::try_from(aya::maps::Map::HashMap(names_data)).context("rule name map type")?;
    let mut names = std::collections::BTreeMap::new();
    for item in names_map.iter() {
        let (k, v) = item?;
        let end = v.iter().position(|b| *b == 0).unwrap_or(v.len());
        names.insert(k, String::from_utf8_lossy(&v[..end]).into_owned());
    }
    let data = MapData::from_pin(pin_dir.join("maps").join(m::FW_VERDICTS)).context("opening the verdict map")?;
    let map: BpfHashMap<MapData, m::CtKey, m::FwVerdict> =
        BpfHashMap::try_from(aya::maps::Map::LruHashMap(data)).context("verdict map type")?;
    let addr = |family: u8, a: [u8; 16]| -> String {
        if family == dataplane_common::FAMILY_V4 {
            std::net::Ipv4Addr::new(a[0], a[1], a[2], a[3]).to_string()
        } else {
            std::net::Ipv6Addr::from(a).to_string()
        }
    };
    let mut out = Vec::new();
    for item in map.iter() {
        let (k, v) = item?;
        out.push(serde_json::json!({
            "vm": addr(k.family, k.local),
            "vm_port": k.local_port,
            "remote": addr(k.family, k.remote),
            "remote_port": k.remote_port,
            "protocol": k.proto,
            "direction": if v.dir == dataplane_common::DIR_INGRESS { "ingress" } else { "egress" },
            "action": if v.action == m::FW_ALLOW { "allow" } else { "deny" },
            "rule": names.get(&v.rule_id).cloned().unwrap_or_else(|| format!("#{}", v.rule_id)),
            "packets": v.packets,
        }));
    }
    Ok(out)
}

/// CLOCK_MONOTONIC_COARSE in nanoseconds: the clock the programs stamp flows with (`bpf_ktime_get_coarse_ns`).
pub fn monotonic_ns() -> u64 {
    // SAFETY: clock_gettime writes into the struct we own.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The counters of an event limiter (`m::LIMIT_*`), summed over CPUs.
pub fn read_event_limits(pin_dir: &Path, slot: u32) -> anyhow::Result<m::EventLimiter> {
    let data = MapData::from_pin(pin_dir.join("maps").join(m::EVENT_LIMIT)).context("opening the event limiter")?;
    let map: PerCpuArray<MapData, m::EventLimiter> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).context("event limiter map type")?;
    let mut sum = m::EventLimiter::default();
    for l in map.get(&slot, 0)?.iter() {
        sum.sent += l.sent;
        sum.suppressed += l.suppressed;
        sum.lost += l.lost;
    }
    Ok(sum)
}

/// The bytes information systems exchanged with zones, from the pinned
/// per-CPU counts.
pub struct SystemBytes(PerCpuArray<MapData, u64>);

impl SystemBytes {
    pub fn open(pin_dir: &Path) -> anyhow::Result<SystemBytes> {
        let data = MapData::from_pin(pin_dir.join("maps").join(m::SYSTEM_BYTES))
            .with_context(|| format!("opening pinned map {}", m::SYSTEM_BYTES))?;
        Ok(SystemBytes(PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?))
    }

    /// Bytes of `slot` with zone number `zone` one way, summed over CPUs.
    pub fn read(&self, slot: u32, zone: u32, way: u32) -> anyhow::Result<u64> {
        if slot >= m::SYSTEM_SLOTS || zone == 0 || zone > m::ZONES_MAX {
            anyhow::bail!("no count of slot {slot} zone {zone}");
        }
        let v = self.0.get(&m::system_index(slot, zone, way), 0)?;
        Ok(v.iter().fold(0u64, |a, b| a.wrapping_add(*b)))
    }

    /// Every (slot, zone number, up, down) that counted anything.
    pub fn all(&self) -> Vec<(u32, u32, u64, u64)> {
        let mut out = Vec::new();
        for slot in 0..m::SYSTEM_SLOTS {
            for zone in 1..=m::ZONES_MAX {
                let up = self.read(slot, zone, m::SYSTEM_UP).unwrap_or(0);
                let down = self.read(slot, zone, m::SYSTEM_DOWN).unwrap_or(0);
                if up + down > 0 {
                    out.push((slot, zone, up, down));
                }
            }
        }
        out
    }
}

/// Named counters, in index order.
pub type Counters = Vec<(&'static str, u64)>;

/// Drop and stats counters, summed over CPUs, read from a pin directory.
/// Each mirror session's counters, summed over the CPUs, by slot (from
/// the pinned map).
pub fn read_mirror_counters(pin_dir: &Path) -> anyhow::Result<Vec<m::MirrorState>> {
    let data = MapData::from_pin(pin_dir.join("maps").join(m::MIRROR_STATE))
        .with_context(|| format!("opening pinned map {}", m::MIRROR_STATE))?;
    let a: PerCpuArray<MapData, m::MirrorState> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
    let mut out = Vec::new();
    for slot in 0..m::MIRROR_SLOTS {
        let mut sum = m::MirrorState::default();
        for s in a.get(&slot, 0)?.iter() {
            sum.matched += s.matched;
            sum.sampled_out += s.sampled_out;
            sum.over_rate += s.over_rate;
            sum.copied += s.copied;
            sum.failed += s.failed;
        }
        out.push(sum);
    }
    Ok(out)
}

/// The confirmed north-south flows in the dataplane under `pin_dir`, for
/// `sdn-agent nat-flows`: a copy another holder sent carried no packets
/// here (`carried: false`).
pub fn read_nat_flows(pin_dir: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    use dataplane_common::lb as l;
    let name = l::NAT_FLOWS;
    let data =
        MapData::from_pin(pin_dir.join("maps").join(name)).with_context(|| format!("opening pinned map {name}"))?;
    let h: BpfHashMap<MapData, l::NatKey, l::NatFlow> = BpfHashMap::try_from(aya::maps::Map::HashMap(data))?;
    let now = monotonic_ns();
    let ip = |family: u8, a: &[u8; 16]| crate::flows::addr(family, a).to_string();
    Ok(h.iter()
        .filter_map(Result::ok)
        .map(|(k, f)| {
            serde_json::json!({
                "proto": k.proto,
                "zone": k.zone,
                "client": ip(k.family, &k.client),
                "client_port": k.client_port,
                "vip": ip(k.family, &k.vip),
                "vip_port": k.vport,
                "vni": f.vni,
                "nat": ip(k.family, &f.nat),
                "nat_port": f.nat_port,
                "member": ip(k.family, &f.backend),
                "member_port": f.backend_port,
                "flags": f.flags,
                "idle_ms": now.saturating_sub(f.last_seen_ns) / 1_000_000,
                "carried": f.packets_in | f.packets_out != 0,
            })
        })
        .collect())
}

pub fn read_counters(pin_dir: &Path) -> anyhow::Result<(Counters, Counters)> {
    let maps_dir = pin_dir.join("maps");
    let sum = |name: &str, slots: u32| -> anyhow::Result<Vec<u64>> {
        let data = MapData::from_pin(maps_dir.join(name)).with_context(|| format!("opening pinned map {name}"))?;
        let arr: PerCpuArray<MapData, u64> = PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data))?;
        let mut out = Vec::new();
        for i in 0..slots {
            out.push(arr.get(&i, 0)?.iter().sum());
        }
        Ok(out)
    };
    let drops = sum(m::DROPS, DROP_REASON_SLOTS)?;
    let stats = sum(m::STATS, STAT_SLOTS)?;
    let d = DropReason::ALL.iter().map(|r| (r.name(), drops[*r as usize])).collect();
    let s = [
        ("ct_hit", Stat::CtHit),
        ("ct_new", Stat::CtNew),
        ("ct_revalidated", Stat::CtRevalidated),
        ("neighbour", Stat::Neighbour),
        ("passed", Stat::Passed),
        ("ct_related", Stat::CtRelated),
        ("forwarded_local", Stat::ForwardedLocal),
        ("encapsulated", Stat::Encapsulated),
        ("decapsulated", Stat::Decapsulated),
        ("neighbour_answered", Stat::NeighbourAnswered),
        ("to_uplink", Stat::ToUplink),
        ("from_uplink", Stat::FromUplink),
        ("exchanged", Stat::Exchanged),
        ("ct_promoted", Stat::CtPromoted),
        ("fast_path", Stat::FastPath),
        ("lb_new", Stat::LbNew),
    ]
    .iter()
    .map(|(n, s)| (*n, stats[*s as usize]))
    .collect();
    Ok((d, s))
}

/// What the verifier and the JIT made of one loaded program.
#[derive(Debug, Clone, Copy)]
pub struct Headroom {
    /// Instructions the verifier processed to accept the program.
    pub verified_insns: u32,
    /// Bytes of stack the program uses (its JIT prologue reserves them).
    pub stack_bytes: u32,
}

/// The kernel's limits those figures are held against.
pub const VERIFIER_INSN_LIMIT: u32 = 1_000_000;
pub const STACK_LIMIT: u32 = 512;

/// `struct bpf_prog_info` up to `verified_insns` (include/uapi/linux/bpf.h).
#[repr(C)]
#[derive(Default)]
struct ProgInfo {
    prog_type: u32,
    id: u32,
    tag: [u8; 8],
    jited_prog_len: u32,
    xlated_prog_len: u32,
    jited_prog_insns: u64,
    xlated_prog_insns: u64,
    load_time: u64,
    created_by_uid: u32,
    nr_map_ids: u32,
    map_ids: u64,
    name: [u8; 16],
    ifindex: u32,
    gpl_compatible: u32,
    netns_dev: u64,
    netns_ino: u64,
    nr_jited_ksyms: u32,
    nr_jited_func_lens: u32,
    jited_ksyms: u64,
    jited_func_lens: u64,
    btf_id: u32,
    func_info_rec_size: u32,
    func_info: u64,
    nr_func_info: u32,
    nr_line_info: u32,
    line_info: u64,
    jited_line_info: u64,
    nr_jited_line_info: u32,
    line_info_rec_size: u32,
    jited_line_info_rec_size: u32,
    nr_prog_tags: u32,
    prog_tags: u64,
    run_time_ns: u64,
    run_cnt: u64,
    recursion_misses: u64,
    verified_insns: u32,
    attach_btf_obj_id: u32,
    attach_btf_id: u32,
    _pad: u32,
}

const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;

/// `union bpf_attr` for BPF_OBJ_GET_INFO_BY_FD.
#[repr(C)]
struct InfoAttr {
    bpf_fd: u32,
    info_len: u32,
    info: u64,
}

impl Dataplane {
    /// The verifier's instruction count and the stack use of a loaded
    /// program. The stack is read from the x86-64 JIT's prologue
    /// (`sub rsp, imm32`), which reserves the verifier's stack depth.
    pub fn headroom(&self, name: &str) -> anyhow::Result<Headroom> {
        let fd = self.program_fd(name)?;
        let mut code = vec![0u8; 1 << 20];
        let mut info = ProgInfo {
            jited_prog_len: code.len() as u32,
            jited_prog_insns: code.as_mut_ptr() as u64,
            ..Default::default()
        };
        let mut attr = InfoAttr {
            bpf_fd: fd as u32,
            info_len: std::mem::size_of::<ProgInfo>() as u32,
            info: &mut info as *mut ProgInfo as u64,
        };
        // SAFETY: attr and info are live repr(C) values; the kernel writes
        // within info_len and jited_prog_len.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_OBJ_GET_INFO_BY_FD,
                &mut attr as *mut InfoAttr,
                std::mem::size_of::<InfoAttr>() as libc::c_uint,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("program info of {name}"));
        }
        code.truncate(info.jited_prog_len as usize);
        anyhow::ensure!(!code.is_empty(), "program {name} is not JIT-compiled");
        // The prologue is a few dozen bytes; the reservation is the first
        // `sub rsp, imm32` (48 81 ec), absent when the stack is unused.
        let head = &code[..code.len().min(64)];
        let stack_bytes = head
            .windows(7)
            .find(|w| w[..3] == [0x48, 0x81, 0xec])
            .map(|w| u32::from_le_bytes([w[3], w[4], w[5], w[6]]))
            .unwrap_or(0);
        Ok(Headroom {
            verified_insns: info.verified_insns,
            stack_bytes,
        })
    }
}

/// A program the kernel refused, with the end of what its verifier said
/// (the reason is on its last lines; the whole log can be megabytes).
fn verifier_said(e: aya::programs::ProgramError) -> anyhow::Error {
    match e {
        aya::programs::ProgramError::LoadError { io_error, verifier_log } => {
            let log = verifier_log.to_string();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            anyhow::anyhow!("{io_error}; the verifier's last words:\n{tail}")
        }
        other => other.into(),
    }
}
