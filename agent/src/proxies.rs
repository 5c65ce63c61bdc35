//! The HTTP proxies of this host's proxy ports, run by the agent.
//!
//! Each `proxy/<port>` resource gets a slot: a network namespace, named
//! nowhere, plumbed as the port (its MAC, addresses and default routes through the subnet's
//! gateways) behind a veth whose host end is the port's device, so the
//! dataplane enforces the port as any VM's; a directory (0700) holding the
//! proxy's configuration and its certificate files (0600); and one
//! `sdn-l7lb` process in the namespace, supervised:
//! - restarted when it exits, with backoff (1 s doubling to 30 s; back to
//!   1 s once a process served a minute);
//! - sent SIGHUP when its configuration changes (the proxy keeps the one it
//!   serves when it refuses the new one);
//! - upgraded when the binary on disk changes: a new process takes the
//!   listening sockets over through the control socket, and the old one
//!   drains. An agent restarted starts its proxies the same way, taking
//!   over from the ones the previous agent left running, so neither an
//!   upgrade of the proxy nor a restart of the agent drops a connection;
//! - stopped (SIGTERM: it drains) when the resource goes, after which the
//!   device, the namespace and the key files go too.
//!
//! The slots live under one directory (`--proxy-dir`), each named by a
//! hash of the host and the port (never by the raw id), with an `owner`
//! file saying whose it is. A slot no longer wanted, found when the agent
//! starts, is taken down; slots of other hosts' agents sharing the
//! directory are left alone. A device of the port's name that the agent
//! did not make (its alias says whose a device is) is never touched: the
//! proxy is refused, naming it.
//!
//! The namespace lives as long as the agent holds it or a proxy runs in
//! it: an agent restarted finds it through the proxy's process (the one
//! whose command line names the slot's configuration). Named namespaces
//! (`ip netns add`) would tie it to a mount namespace, which an agent run
//! in one of its own (a service's private /tmp makes one) does not share
//! with the next agent. With no proxy left in it, it is gone, and the
//! veth with it: the slot is made again. Links, addresses and routes are
//! set with iproute2 (`ip`), as a compute driver would set a VM's, run in
//! the namespace by setns(2); the proxy enters it the same way.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sdn_proto::v1 as pb;
use tokio::sync::mpsc;

/// The name of the proxy's side of the veth, in its namespace.
const INNER: &str = "eth0";
/// What a slot's device alias starts with.
const ALIAS: &str = "sdn-l7lb";
/// Restarts wait this long at first, doubling up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A process that served this long restarts after [`BACKOFF_MIN`] again.
const SERVED_LONG: Duration = Duration::from_secs(60);

/// How the proxies are run.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The `sdn-l7lb` binary.
    pub binary: PathBuf,
    /// Where the slots are.
    pub root: PathBuf,
    /// The MTU of the proxy's side of the veth (room for the overlay's
    /// header).
    pub mtu: u32,
    /// How long a proxy stopping may drain before it is killed.
    pub drain: Duration,
}

impl Settings {
    /// The `sdn-l7lb` beside this program's binary, else the one on PATH.
    pub fn default_binary() -> PathBuf {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("sdn-l7lb")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("sdn-l7lb"))
    }
}

/// A proxy port's place on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Slot {
    /// The directory's name (the namespace is named nowhere).
    name: String,
    dir: PathBuf,
    port: String,
}

impl Slot {
    fn of(root: &Path, host: &str, port: &str) -> Slot {
        let h = crate::l7::fnv1a64(format!("{host}\0{port}").as_bytes());
        let name = format!("sdnl7-{:012x}", h >> 16);
        Slot {
            dir: root.join(&name),
            name,
            port: port.to_string(),
        }
    }

    fn config(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    fn control(&self) -> PathBuf {
        self.dir.join("control.sock")
    }

    fn alias(&self) -> String {
        format!("{ALIAS} {}", self.name)
    }
}

/// Whose a slot is, written in it before anything else is made.
#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq, Eq)]
struct Owner {
    host: String,
    port: String,
    device: String,
}

/// How the port is plumbed: a change takes the slot down and up again.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plumbing {
    device: String,
    mac: String,
    /// Address, prefix length, gateway.
    v4: Option<(String, u32, String)>,
    v6: Option<(String, u32, String)>,
}

impl Plumbing {
    fn of(p: &pb::HttpProxyOnHost) -> Result<Plumbing, String> {
        let port = p.port.as_ref().ok_or("the resource names no port")?;
        let family = |a: &str, prefix: u32, gw: &str, max: u32| -> Result<Option<(String, u32, String)>, String> {
            if a.is_empty() {
                return Ok(None);
            }
            if prefix == 0 || prefix > max || gw.is_empty() {
                return Err(format!("address {a} came without its subnet's prefix and gateway"));
            }
            Ok(Some((a.to_string(), prefix, gw.to_string())))
        };
        if port.device.is_empty() || port.device.len() > 15 || port.mac.is_empty() {
            return Err("the port has no device or no MAC".into());
        }
        Ok(Plumbing {
            device: port.device.clone(),
            mac: port.mac.clone(),
            v4: family(&port.ipv4, p.prefix_v4, &p.gateway_v4, 32)?,
            v6: family(&port.ipv6, p.prefix_v6, &p.gateway_v6, 128)?,
        })
    }
}

enum Cmd {
    /// The configuration changed: SIGHUP.
    Reload,
    /// The binary changed: a new process takes over.
    Upgrade,
}

struct Running {
    slot: Slot,
    plumbing: Plumbing,
    /// A digest of the configuration and files last written.
    written: u64,
    /// The binary as last started (device, inode, modified).
    binary: Option<BinaryId>,
    tx: mpsc::UnboundedSender<Cmd>,
    task: tokio::task::JoinHandle<()>,
}

/// The proxies of this host.
pub struct Proxies {
    settings: Arc<Settings>,
    host: String,
    running: BTreeMap<String, Running>,
    /// Slots being taken down, by name.
    stopping: BTreeMap<String, tokio::task::JoinHandle<()>>,
    swept: bool,
}

/// What one pass made of the proxies.
#[derive(Default, Debug)]
pub struct Synced {
    /// Proxies that could not be set up, with why (they fail closed).
    pub problems: Vec<String>,
    /// Ports whose slot is still being taken down: retried.
    pub waiting: Vec<(String, String)>,
}

impl Proxies {
    pub fn new(host: &str, settings: Settings) -> anyhow::Result<Proxies> {
        use std::os::unix::fs::MetadataExt as _;
        // Absolute: the proxy runs in its slot's directory, and its
        // processes are known by the paths they were given.
        anyhow::ensure!(
            settings.root.is_absolute(),
            "--proxy-dir {} is not an absolute path",
            settings.root.display()
        );
        anyhow::ensure!(
            settings.binary.is_absolute() || settings.binary.components().count() == 1,
            "--l7lb-binary {} is neither an absolute path nor a name on PATH",
            settings.binary.display()
        );
        if let Ok(m) = std::fs::symlink_metadata(&settings.root) {
            anyhow::ensure!(
                m.is_dir() && m.uid() == 0,
                "the proxies' directory {} is not a directory of root's (a link, or another user's): keys are written there",
                settings.root.display()
            );
        }
        std::fs::create_dir_all(&settings.root)
            .and_then(|()| std::fs::set_permissions(&settings.root, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| anyhow::anyhow!("the proxies' directory {}: {e}", settings.root.display()))?;
        Ok(Proxies {
            settings: Arc::new(settings),
            host: host.to_string(),
            running: BTreeMap::new(),
            stopping: BTreeMap::new(),
            swept: false,
        })
    }

    /// Whether the proxy's binary on disk is not the one the running
    /// proxies were started from (the next pass upgrades them).
    pub fn binary_changed(&self) -> bool {
        let now = binary_id(&self.settings.binary);
        now.is_some() && self.running.values().any(|r| r.binary != now)
    }

    /// Makes the running proxies those of `resources`. Runs within the
    /// agent's runtime.
    pub fn sync(&mut self, resources: &crate::compile::Resources) -> Synced {
        let mut out = Synced::default();
        let wanted: BTreeMap<&str, &pb::HttpProxyOnHost> = resources
            .iter()
            .filter_map(|(name, r)| match (&r.kind, name.strip_prefix("proxy/")) {
                (Some(pb::resource::Kind::HttpProxy(p)), Some(port)) => Some((port, p)),
                _ => None,
            })
            .collect();
        if !self.swept {
            self.swept = true;
            self.sweep(&wanted.keys().copied().collect());
        }
        self.stopping.retain(|_, t| !t.is_finished());
        // Gone, or plumbed otherwise now: taken down first.
        let stale: Vec<String> = self
            .running
            .iter()
            .filter(|(port, r)| {
                wanted
                    .get(port.as_str())
                    .is_none_or(|p| Plumbing::of(p).ok().as_ref() != Some(&r.plumbing))
            })
            .map(|(p, _)| p.clone())
            .collect();
        for port in stale {
            if let Some(r) = self.running.remove(&port) {
                tracing::info!(port = %port, slot = %r.slot.name, "HTTP proxy stopping: its port is no proxy here any more, or is plumbed otherwise");
                // Dropping the sender stops the supervisor, which drains
                // the proxy and takes the slot down.
                drop(r.tx);
                self.stopping.insert(r.slot.name.clone(), r.task);
            }
        }
        let binary = binary_id(&self.settings.binary);
        for (port, p) in wanted {
            let slot = Slot::of(&self.settings.root, &self.host, port);
            if self.stopping.contains_key(&slot.name) {
                out.waiting
                    .push((port.to_string(), "its previous proxy is still stopping".into()));
                continue;
            }
            if let Err(e) = self.one(&slot, p, binary) {
                tracing::error!(port = %port, error = %e, "HTTP proxy not set up; the port fails closed");
                out.problems.push(format!("HTTP proxy on port {port}: {e}"));
            }
        }
        out
    }

    /// Sets up, reconfigures or upgrades one port's proxy.
    /// `binary` is the proxy's binary on disk as this pass found it.
    fn one(&mut self, slot: &Slot, p: &pb::HttpProxyOnHost, binary: Option<BinaryId>) -> Result<(), String> {
        let plumbing = Plumbing::of(p)?;
        let (config, files) = crate::l7::proxy_config(p, &slot.dir)?;
        let digest = digest(&config, &files);
        if let Some(r) = self.running.get_mut(&slot.port) {
            if r.written != digest {
                write_slot(slot, &config, &files)?;
                r.written = digest;
                let _ = r.tx.send(Cmd::Reload);
                tracing::info!(port = %slot.port, "HTTP proxy reconfigured");
            }
            if binary.is_some() && r.binary != binary {
                r.binary = binary;
                let _ = r.tx.send(Cmd::Upgrade);
                tracing::info!(port = %slot.port, binary = %self.settings.binary.display(), "HTTP proxy binary changed: upgrading without dropping connections");
            }
            return Ok(());
        }
        std::fs::create_dir_all(&slot.dir)
            .and_then(|()| std::fs::set_permissions(&slot.dir, std::fs::Permissions::from_mode(0o700)))
            .map_err(|e| format!("{}: {e}", slot.dir.display()))?;
        let owner = Owner {
            host: self.host.clone(),
            port: slot.port.clone(),
            device: plumbing.device.clone(),
        };
        if let Some(o) = read_owner(&slot.dir) {
            if (&o.host, &o.port) != (&owner.host, &owner.port) {
                return Err(format!(
                    "slot {} belongs to port {} of host {}; remove it",
                    slot.dir.display(),
                    o.port,
                    o.host
                ));
            }
        }
        // The namespace of a proxy serving already (left by an agent
        // before this one), else a new one.
        let (netns, adopted) = match slot_pids(slot).first() {
            Some(pid) => match std::fs::File::open(format!("/proc/{pid}/ns/net")) {
                Ok(f) => (f, true),
                Err(e) => return Err(format!("the namespace of the proxy serving (pid {pid}): {e}")),
            },
            None => (new_netns()?, false),
        };
        // A slot made here and not finished is taken away again; one
        // adopted (its proxy serves) is left for the next pass.
        let made = write_file(
            &slot.dir.join("owner"),
            &serde_json::to_string(&owner).map_err(|e| e.to_string())?,
        )
        .and_then(|()| plumb(slot, &netns, &plumbing, self.settings.mtu, adopted))
        .and_then(|()| write_slot(slot, &config, &files));
        if let Err(e) = made {
            if !adopted {
                discard(slot, &plumbing.device);
            }
            return Err(e);
        }
        let netns = Arc::new(netns);
        let (tx, rx) = mpsc::unbounded_channel();
        // The supervisor holds the namespace while the slot is up.
        let task = tokio::spawn(supervise(self.settings.clone(), slot.clone(), netns, rx));
        tracing::info!(port = %slot.port, slot = %slot.name, device = %plumbing.device, adopted, "HTTP proxy started");
        self.running.insert(
            slot.port.clone(),
            Running {
                slot: slot.clone(),
                plumbing,
                written: digest,
                binary,
                tx,
                task,
            },
        );
        Ok(())
    }

    /// Takes down this host's slots that no port wants (left by an agent
    /// that stopped before it could).
    fn sweep(&mut self, wanted: &BTreeSet<&str>) {
        let Ok(entries) = std::fs::read_dir(&self.settings.root) else {
            return;
        };
        for e in entries.flatten() {
            let Some(o) = read_owner(&e.path()) else { continue };
            if o.host != self.host || wanted.contains(o.port.as_str()) {
                continue;
            }
            let slot = Slot::of(&self.settings.root, &self.host, &o.port);
            if slot.dir != e.path() {
                continue;
            }
            tracing::info!(port = %o.port, slot = %slot.name, "taking down an HTTP proxy no port here wants any more");
            let s = self.settings.clone();
            let name = slot.name.clone();
            self.stopping.insert(
                name,
                tokio::spawn(async move {
                    stop_pids(&slot, s.drain).await;
                    take_down(slot, o.device).await;
                }),
            );
        }
    }
}

/// Runs the proxy of `slot` until the sender goes; then drains it and
/// takes the slot down.
async fn supervise(s: Arc<Settings>, slot: Slot, netns: Arc<std::fs::File>, mut rx: mpsc::UnboundedReceiver<Cmd>) {
    let mut backoff = BACKOFF_MIN;
    let device = read_owner(&slot.dir).map(|o| o.device).unwrap_or_default();
    loop {
        let (mut child, started) = match spawn(&s, &slot, &netns) {
            Ok(c) => (c, Instant::now()),
            Err(e) => {
                tracing::error!(port = %slot.port, binary = %s.binary.display(), error = %e, retry_in_ms = backoff.as_millis() as u64, "HTTP proxy not started");
                if !wait_or_stop(&mut rx, backoff).await {
                    break;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let stopped = loop {
            tokio::select! {
                status = child.wait() => {
                    if started.elapsed() >= SERVED_LONG {
                        backoff = BACKOFF_MIN;
                    }
                    let status = status.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string());
                    tracing::error!(port = %slot.port, status = %status, restart_in_ms = backoff.as_millis() as u64, "HTTP proxy exited; restarting it");
                    let go_on = wait_or_stop(&mut rx, backoff).await;
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    break !go_on;
                }
                cmd = rx.recv() => match cmd {
                    Some(Cmd::Reload) => signal(&child, libc::SIGHUP),
                    Some(Cmd::Upgrade) => match spawn(&s, &slot, &netns) {
                        Ok(new) => {
                            let mut old = std::mem::replace(&mut child, new);
                            let port = slot.port.clone();
                            // The old one hands its sockets over, drains
                            // and exits.
                            tokio::spawn(async move {
                                let st = old.wait().await;
                                tracing::info!(port = %port, status = ?st.ok(), "the HTTP proxy before the upgrade exited");
                            });
                        }
                        Err(e) => tracing::error!(port = %slot.port, error = %e, "HTTP proxy not upgraded; the running one serves on"),
                    },
                    None => {
                        signal(&child, libc::SIGTERM);
                        if tokio::time::timeout(s.drain + Duration::from_secs(5), child.wait()).await.is_err() {
                            tracing::warn!(port = %slot.port, "HTTP proxy still draining past its time: killed");
                            let _ = child.kill().await;
                        }
                        break true;
                    }
                }
            }
        };
        if stopped {
            break;
        }
    }
    // A process taken over from, or still handing over, goes too.
    stop_pids(&slot, Duration::from_secs(5)).await;
    drop(netns);
    take_down(slot, device).await;
}

/// Waits `d`; false when the proxy is to stop instead. Reloads and
/// upgrades asked meanwhile are met by the next start.
async fn wait_or_stop(rx: &mut mpsc::UnboundedReceiver<Cmd>, d: Duration) -> bool {
    let until = tokio::time::Instant::now() + d;
    loop {
        tokio::select! {
            _ = tokio::time::sleep_until(until) => return true,
            cmd = rx.recv() => if cmd.is_none() { return false },
        }
    }
}

fn signal(child: &tokio::process::Child, sig: libc::c_int) {
    if let Some(pid) = child.id() {
        // SAFETY: kill(2) on this agent's own child, not yet reaped.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Starts the proxy in the slot's namespace, taking over from whatever
/// proxy serves there (none: it starts afresh). Its log lines join the
/// agent's, with the port.
fn spawn(s: &Settings, slot: &Slot, netns: &std::fs::File) -> std::io::Result<tokio::process::Child> {
    use std::os::fd::AsRawFd as _;
    let fd = netns.as_raw_fd();
    let mut cmd = tokio::process::Command::new(&s.binary);
    cmd.arg("--config")
        .arg(slot.config())
        .arg("--control")
        .arg(slot.control())
        .arg("--upgrade")
        .arg("--drain-timeout-secs")
        .arg(s.drain.as_secs().to_string())
        .current_dir(&slot.dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        // Its own group: the agent's signals are the agent's; a proxy
        // outlives an agent's restart and is taken over by the next.
        .process_group(0)
        .kill_on_drop(false);
    // SAFETY: setns(2) alone, between fork and exec, on a descriptor
    // that stays open until spawn returns.
    unsafe {
        cmd.pre_exec(move || enter(fd));
    }
    let mut child = cmd.spawn()?;
    if let Some(err) = child.stderr.take() {
        let port = slot.port.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt as _;
            let mut lines = tokio::io::BufReader::new(err).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                if l.contains(" ERROR ") {
                    tracing::error!(proxy_port = %port, "{l}");
                } else if l.contains(" WARN ") {
                    tracing::warn!(proxy_port = %port, "{l}");
                } else {
                    tracing::info!(proxy_port = %port, "{l}");
                }
            }
        });
    }
    Ok(child)
}

/// Enters the network namespace open as `fd` (between fork and exec).
fn enter(fd: std::os::fd::RawFd) -> std::io::Result<()> {
    // SAFETY: setns(2) on a descriptor the caller holds open.
    if unsafe { libc::setns(fd, libc::CLONE_NEWNET) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// A new network namespace, held by the descriptor returned: made by a
/// thread of its own, the only one unshare(2) moves.
fn new_netns() -> Result<std::fs::File, String> {
    std::thread::spawn(|| {
        // SAFETY: unshare(2) of this short-lived thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            return Err(format!("a new network namespace: {}", std::io::Error::last_os_error()));
        }
        std::fs::File::open("/proc/thread-self/ns/net").map_err(|e| format!("a new network namespace: {e}"))
    })
    .join()
    .map_err(|_| "making a network namespace panicked".to_string())?
}

/// The processes running the slot's proxy: root's, running a binary
/// named `sdn-l7lb` (replaced on disk or not) with `--config` the slot's
/// configuration, in a network namespace that is neither this agent's nor
/// the host's first process's. Anything else naming the file (an editor,
/// a pager, another user's process) is never taken for the proxy, nor
/// signalled.
fn slot_pids(slot: &Slot) -> Vec<libc::pid_t> {
    use std::os::unix::fs::MetadataExt as _;
    let config = slot.config();
    let needle = config.as_os_str().as_encoded_bytes();
    let netns_of = |pid: &str| std::fs::metadata(format!("/proc/{pid}/ns/net")).ok().map(|m| m.ino());
    let not_theirs = [netns_of("self"), netns_of("1")];
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out: Vec<libc::pid_t> = procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<libc::pid_t>().ok())
        .filter(|pid| std::fs::metadata(format!("/proc/{pid}")).is_ok_and(|m| m.uid() == 0))
        .filter(|pid| {
            std::fs::read_link(format!("/proc/{pid}/exe")).is_ok_and(|exe| {
                exe.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n == "sdn-l7lb" || n.starts_with("sdn-l7lb "))
            })
        })
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.windows(2).any(|w| w[0] == b"--config" && w[1] == needle)
            })
        })
        .filter(|pid| {
            let ns = netns_of(&pid.to_string());
            ns.is_some() && !not_theirs.contains(&ns)
        })
        .collect();
    out.sort();
    out
}

/// SIGTERM to the slot's proxies, then SIGKILL to those left after
/// `grace`.
async fn stop_pids(slot: &Slot, grace: Duration) {
    let pids = || slot_pids(slot);
    let kill = |sig| {
        for pid in pids() {
            // SAFETY: kill(2) on processes in the slot's own namespace.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    };
    kill(libc::SIGTERM);
    let until = Instant::now() + grace;
    while !pids().is_empty() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    kill(libc::SIGKILL);
}

/// Removes the slot's device (when it is the slot's), namespace and
/// directory, key files with it.
async fn take_down(slot: Slot, device: String) {
    let port = slot.port.clone();
    let done = tokio::task::spawn_blocking(move || {
        // Keys first. The device may be gone already (with the namespace,
        // once its last process left): only one still marked as this
        // slot's is removed.
        let removed = std::fs::remove_dir_all(&slot.dir).map_err(|e| format!("{}: {e}", slot.dir.display()));
        if !device.is_empty() && device_alias(&device).ok().flatten().as_deref() == Some(slot.alias().as_str()) {
            if let Err(e) = ip(&["link", "del", "dev", &device]) {
                if device_alias(&device).ok().flatten().is_some() {
                    return Err(e);
                }
            }
        }
        removed
    })
    .await;
    match done {
        Ok(Ok(())) => {
            tracing::info!(port = %port, "HTTP proxy taken down: its device and key files are gone, its namespace with its last process")
        }
        Ok(Err(e)) => tracing::error!(port = %port, error = %e, "HTTP proxy's slot not wholly taken down"),
        Err(e) => tracing::error!(port = %port, error = %e, "HTTP proxy's slot not taken down"),
    }
}

/// Takes away, at once, a slot whose setting up failed.
fn discard(slot: &Slot, device: &str) {
    if device_alias(device).ok().flatten().as_deref() == Some(slot.alias().as_str()) {
        let _ = ip(&["link", "del", "dev", device]);
    }
    let _ = std::fs::remove_dir_all(&slot.dir);
}

/// Makes the slot's namespace and veth, and plumbs the port into it.
/// Idempotent: an agent restarted adopts what it made before.
fn plumb(slot: &Slot, netns: &std::fs::File, p: &Plumbing, mtu: u32, adopted: bool) -> Result<(), String> {
    use std::os::fd::AsRawFd as _;
    let alias = device_alias(&p.device)?;
    if alias.as_ref().is_some_and(|a| *a != slot.alias()) {
        return Err(format!(
            "device {} exists and is not this agent's proxy device (its alias is {:?}): \
             remove it, or give the port another device",
            p.device,
            alias.unwrap_or_default()
        ));
    }
    // Ours, but its other end is in no namespace of a proxy that serves:
    // made again.
    if alias.is_some() && !adopted {
        ip(&["link", "del", "dev", &p.device])?;
    }
    if alias.is_none() || !adopted {
        let ns = format!("/proc/{}/fd/{}", std::process::id(), netns.as_raw_fd());
        ip(&[
            "link", "add", "name", &p.device, "type", "veth", "peer", "name", INNER, "netns", &ns,
        ])?;
        ip(&["link", "set", "dev", &p.device, "alias", &slot.alias()])?;
    }
    let fd = netns.as_raw_fd();
    let inner = |args: &[&str]| run_ip(args, Some(fd));
    inner(&[
        "link",
        "set",
        "dev",
        INNER,
        "address",
        &p.mac,
        "mtu",
        &mtu.to_string(),
        "up",
    ])?;
    inner(&["link", "set", "dev", "lo", "up"])?;
    // Addresses of the port alone: any other (left by an earlier
    // plumbing) goes.
    let want: Vec<String> = [&p.v4, &p.v6]
        .into_iter()
        .flatten()
        .map(|(a, len, _)| format!("{a}/{len}"))
        .collect();
    let listed = inner(&["-j", "addr", "show", "dev", INNER, "scope", "global"])?;
    let held: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap_or_default();
    for a in held
        .iter()
        .flat_map(|l| l["addr_info"].as_array().cloned().unwrap_or_default())
    {
        if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
            let have = format!("{local}/{len}");
            if !want.contains(&have) {
                inner(&["addr", "del", &have, "dev", INNER])?;
            }
        }
    }
    if let Some((a, len, gw)) = &p.v4 {
        inner(&["addr", "replace", &format!("{a}/{len}"), "dev", INNER])?;
        inner(&["route", "replace", "default", "via", gw, "dev", INNER])?;
    }
    if let Some((a, len, gw)) = &p.v6 {
        inner(&["addr", "replace", &format!("{a}/{len}"), "dev", INNER, "nodad"])?;
        inner(&["-6", "route", "replace", "default", "via", gw, "dev", INNER])?;
    }
    ip(&["link", "set", "dev", &p.device, "up"])?;
    Ok(())
}

/// The alias of device `name`; None when there is no such device.
fn device_alias(name: &str) -> Result<Option<String>, String> {
    let out = std::process::Command::new("ip")
        .args(["-j", "link", "show", "dev", name])
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("does not exist") {
            return Ok(None);
        }
        return Err(format!("ip link show dev {name}: {}", err.trim()));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("ip link show dev {name}: {e}"))?;
    Ok(Some(v[0]["ifalias"].as_str().unwrap_or("").to_string()))
}

/// Runs `ip` with `args`; its output, or its error naming the command.
fn ip(args: &[&str]) -> Result<String, String> {
    run_ip(args, None)
}

/// Runs `ip` with `args`, in the namespace open as `netns` if given.
fn run_ip(args: &[&str], netns: Option<std::os::fd::RawFd>) -> Result<String, String> {
    use std::os::unix::process::CommandExt as _;
    let mut cmd = std::process::Command::new("ip");
    cmd.args(args);
    if let Some(fd) = netns {
        // SAFETY: setns(2) alone between fork and exec, on a descriptor
        // the caller holds open.
        unsafe {
            cmd.pre_exec(move || enter(fd));
        }
    }
    let out = cmd.output().map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn read_owner(dir: &Path) -> Option<Owner> {
    serde_json::from_str(&std::fs::read_to_string(dir.join("owner")).ok()?).ok()
}

/// Writes the proxy's files, then its configuration, each whole (a
/// temporary file renamed over), readable by root alone; certificate
/// files no longer named go.
fn write_slot(slot: &Slot, config: &str, files: &[crate::l7::ProxyFile]) -> Result<(), String> {
    for f in files {
        write_file(&f.path, &f.text)?;
    }
    write_file(&slot.config(), config)?;
    let keep: BTreeSet<&Path> = files.iter().map(|f| f.path.as_path()).collect();
    for e in std::fs::read_dir(&slot.dir)
        .map_err(|e| format!("{}: {e}", slot.dir.display()))?
        .flatten()
    {
        let path = e.path();
        let cert = matches!(path.extension().and_then(|x| x.to_str()), Some("crt" | "key"));
        if cert && !keep.contains(path.as_path()) {
            std::fs::remove_file(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(())
}

fn write_file(path: &Path, text: &str) -> Result<(), String> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| format!("{}: {e}", tmp.display()))?;
    std::fs::rename(&tmp, path).map_err(|e| format!("{}: {e}", path.display()))
}

fn digest(config: &str, files: &[crate::l7::ProxyFile]) -> u64 {
    use std::hash::{Hash as _, Hasher as _};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    config.hash(&mut h);
    for f in files {
        f.path.hash(&mut h);
        f.text.hash(&mut h);
    }
    h.finish()
}

/// What identifies the binary on disk: replaced, it differs.
/// A file's device, inode and modification time.
type BinaryId = (u64, u64, i64, i64);

fn binary_id(path: &Path) -> Option<BinaryId> {
    use std::os::unix::fs::MetadataExt as _;
    let found = if path.components().count() == 1 {
        std::env::var_os("PATH").and_then(|p| std::env::split_paths(&p).map(|d| d.join(path)).find(|c| c.exists()))?
    } else {
        path.to_path_buf()
    };
    let m = std::fs::metadata(found).ok()?;
    Some((m.dev(), m.ino(), m.mtime(), m.mtime_nsec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot's name is the host's and the port's, and holds neither raw.
    #[test]
    fn slots_are_named_by_host_and_port() {
        let root = Path::new("/run/p");
        let a = Slot::of(root, "hv-01", "web/../x");
        assert_eq!(a, Slot::of(root, "hv-01", "web/../x"));
        assert_ne!(a.name, Slot::of(root, "hv-02", "web/../x").name);
        assert_ne!(a.name, Slot::of(root, "hv-01", "web/../y").name);
        assert_eq!(a.name.len(), "sdnl7-".len() + 12);
        assert!(a.name[6..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(a.dir, root.join(&a.name));
    }

    /// An address without its subnet's prefix or gateway is refused: the
    /// proxy would answer nothing outside its link.
    #[test]
    fn plumbing_needs_prefix_and_gateway() {
        let mut p = pb::HttpProxyOnHost {
            port: Some(pb::Port {
                device: "px1".into(),
                mac: "02:00:00:00:00:21".into(),
                ipv4: "10.1.0.21".into(),
                ..Default::default()
            }),
            gateway_v4: "10.1.0.1".into(),
            prefix_v4: 24,
            ..Default::default()
        };
        let ok = Plumbing::of(&p).unwrap();
        assert_eq!(ok.v4, Some(("10.1.0.21".into(), 24, "10.1.0.1".into())));
        assert_eq!(ok.v6, None);
        p.prefix_v4 = 33;
        assert!(Plumbing::of(&p).unwrap_err().contains("10.1.0.21"));
        p.prefix_v4 = 24;
        p.port.as_mut().unwrap().device = "a-device-name-too-long".into();
        assert!(Plumbing::of(&p).unwrap_err().contains("device"));
    }
}
