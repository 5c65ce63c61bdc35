//! A running single-node controller, its agents, and a client.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use sdn_proto::v1 as pb;

use std::sync::Arc;

use sdn_proto::tls::Connector;

use crate::pki::Pki;
use crate::{bin, free_port, ns_sh, wait_for, Bpffs, Proc, Topology};

pub struct Cluster {
    pub controller: Proc,
    pub agents: Vec<(String, Proc)>,
    pub addr: String,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub bpffs: Bpffs,
    pub dir: PathBuf,
    pub listen: String,
    /// Recorded in the audit log for writes made through [`Cluster::apply`].
    pub actor: String,
    /// The run's CA, when the controller authenticates callers (mutual
    /// TLS); without it the controller runs `--insecure`.
    pub pki: Option<Pki>,
    /// The identity [`Cluster::client`] connects as.
    client_tls: Option<Arc<Connector>>,
    /// `apply` splits a batch by the roles its operations need.
    by_role: bool,
    /// More flags the controller runs with.
    extra: Vec<String>,
    /// More flags every agent [`Cluster::start_agent`] starts runs with
    /// (`{host}` in one stands for the agent's host).
    pub agent_extra: Vec<String>,
}

/// Agents stop first, then the HTTP proxies they ran (which outlive an
/// agent by design; their namespaces go with them).
impl Drop for Cluster {
    fn drop(&mut self) {
        self.agents.clear();
        for ns in self.proxy_slots() {
            for pid in self.proxy_pids(&ns) {
                // SAFETY: kill(2) of a proxy this run's agents started.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            }
        }
    }
}

/// The identity the harness provisions as on a secured controller.
pub const PLATFORM: &str = "sdn://platform/integration";
/// The identity of `sdnctl` in a secured run.
pub const ADMIN: &str = "sdn://admin/integration";

impl Cluster {
    /// A controller that serves without authentication (`--insecure`).
    pub fn start(dir: &Path) -> anyhow::Result<Cluster> {
        Self::start_with(dir, None, &[])
    }

    /// [`Cluster::start`] with more flags for the controller.
    pub fn start_with_flags(dir: &Path, extra: &[&str]) -> anyhow::Result<Cluster> {
        Self::start_with(dir, None, extra)
    }

    /// Runs `sdnctl` against the controller as `uri` (on a secured
    /// controller): its output, or its output and errors on a failure.
    pub fn sdnctl(&self, uri: &str, args: &[&str]) -> Result<String, String> {
        let out = std::process::Command::new(bin("sdnctl"))
            .args(self.tls_args(uri).map_err(|e| e.to_string())?)
            .arg("--controller")
            .arg(&self.addr)
            .args(args)
            .output()
            .map_err(|e| e.to_string())?;
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() {
            Ok(text)
        } else {
            Err(text + &String::from_utf8_lossy(&out.stderr))
        }
    }

    /// [`Cluster::start_secure`] with more flags for the controller.
    pub fn start_secure_with(dir: &Path, extra: &[&str]) -> anyhow::Result<Cluster> {
        let pki = Pki::new(&dir.join("pki"))?;
        Self::start_with(dir, Some(pki), extra)
    }

    /// A controller that authenticates every caller by its certificate,
    /// with a CA of this run: agents connect as their hosts, the harness's
    /// client as the platform ([`PLATFORM`]), `sdnctl` as [`ADMIN`].
    pub fn start_secure(dir: &Path) -> anyhow::Result<Cluster> {
        Self::start_secure_with(dir, &[])
    }

    fn start_with(dir: &Path, pki: Option<Pki>, extra: &[&str]) -> anyhow::Result<Cluster> {
        let data_dir = dir.join("controller-data");
        let socket = dir.join("controller.sock");
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let bpffs = Bpffs::new(&dir.join("bpffs"))?;
        let client_tls = pki.as_ref().map(|p| p.connector(PLATFORM)).transpose()?;
        let scheme = if pki.is_some() { "https" } else { "http" };
        let extra: Vec<String> = extra.iter().map(|a| a.to_string()).collect();
        let controller = Self::spawn_controller(dir, &data_dir, &socket, &listen, pki.as_ref(), &extra)?;
        let c = Cluster {
            controller,
            agents: Vec::new(),
            addr: format!("{scheme}://{listen}"),
            socket,
            data_dir,
            bpffs,
            dir: dir.to_path_buf(),
            listen,
            actor: "integration-test".into(),
            pki,
            client_tls,
            by_role: false,
            extra,
            agent_extra: Vec::new(),
        };
        c.wait_ready()?;
        Ok(c)
    }

    fn spawn_controller(
        dir: &Path,
        data_dir: &Path,
        socket: &Path,
        listen: &str,
        pki: Option<&Pki>,
        extra: &[String],
    ) -> anyhow::Result<Proc> {
        let mut args: Vec<String> = vec![
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--listen".into(),
            listen.to_string(),
            "--listen-unix".into(),
            socket.display().to_string(),
        ];
        match pki {
            Some(p) => args.extend(p.args("sdn://replica/1")?),
            None => args.push("--insecure".into()),
        }
        args.extend(extra.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        Proc::spawn("controller", None, &bin("sdn-controller"), &args, dir)
    }

    /// The flags that make `sdnctl` (or another of our binaries) connect
    /// as `uri`; none on an insecure controller.
    pub fn tls_args(&self, uri: &str) -> anyhow::Result<Vec<String>> {
        match &self.pki {
            Some(p) => p.args(uri),
            None => Ok(Vec::new()),
        }
    }

    fn wait_ready(&self) -> anyhow::Result<()> {
        let addr = self.addr.clone();
        let tls = self.client_tls.clone();
        // A thread of its own: callers may be inside a tokio runtime.
        let r = std::thread::spawn(move || -> anyhow::Result<()> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            wait_for("the controller to answer", Duration::from_secs(20), || {
                rt.block_on(async {
                    match sdn_proto::connect_with(&addr, tls.clone()).await {
                        Ok(ch) => pb::provisioning_client::ProvisioningClient::new(ch)
                            .list(pb::ListRequest { kind: 0, stale: false })
                            .await
                            .is_ok(),
                        Err(_) => false,
                    }
                })
            })
        })
        .join()
        .expect("readiness thread");
        r.with_context(|| format!("controller log:\n{}", self.controller.log_text()))
    }

    /// Kills the controller (SIGKILL) and starts it again on the same data.
    pub fn restart_controller(&mut self) -> anyhow::Result<()> {
        self.controller.kill();
        self.respawn_controller()
    }

    fn respawn_controller(&mut self) -> anyhow::Result<()> {
        self.controller = Self::spawn_controller(
            &self.dir,
            &self.data_dir,
            &self.socket,
            &self.listen,
            self.pki.as_ref(),
            &self.extra,
        )?;
        self.wait_ready()
    }

    /// Stops the controller (SIGTERM: it makes its state durable), runs `f`
    /// on its data directory, and starts it again on that data.
    pub fn with_controller_stopped(&mut self, f: impl FnOnce(&Path)) -> anyhow::Result<()> {
        self.controller.stop();
        f(&self.data_dir);
        self.respawn_controller()
    }

    /// Where the agents keep their HTTP proxies' slots.
    pub fn proxy_dir(&self) -> PathBuf {
        self.dir.join("proxies")
    }

    /// The processes running the HTTP proxy of `slot` (those whose
    /// command line names its directory).
    pub fn proxy_pids(&self, slot: &str) -> std::collections::BTreeSet<u32> {
        let needle = self.proxy_dir().join(slot).join("config.json").display().to_string();
        std::fs::read_dir("/proc")
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
                    .filter(|pid| {
                        std::fs::read(format!("/proc/{pid}/cmdline"))
                            .is_ok_and(|c| c.split(|b| *b == 0).any(|a| a == needle.as_bytes()))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The slots of the HTTP proxies the agents run, by name.
    pub fn proxy_slots(&self) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(self.proxy_dir())
            .map(|d| {
                d.flatten()
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| n.starts_with("sdnl7-"))
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    pub fn pin_dir(&self, host: &str) -> PathBuf {
        self.bpffs.path.join(host)
    }

    pub fn start_agent(&mut self, topo: &Topology, host: &str) -> anyhow::Result<()> {
        self.start_agent_with(topo, host, &[])
    }

    /// Starts a host's agent with `more` arguments after the lab's own.
    pub fn start_agent_with(&mut self, topo: &Topology, host: &str, more: &[&str]) -> anyhow::Result<()> {
        let underlay = topo.underlay_ip(host);
        let mut args = vec![
            "--underlay-ip".to_string(),
            underlay,
            "--proxy-dir".to_string(),
            self.proxy_dir().display().to_string(),
        ];
        args.extend(self.agent_extra.iter().map(|a| a.replace("{host}", host)));
        args.extend(more.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.start_agent_binary(topo, host, &bin("sdn-agent"), &args)
    }

    /// Starts an agent from another build (an earlier release, which
    /// may not know every flag of this one), with `extra` arguments.
    pub fn start_agent_binary(
        &mut self,
        topo: &Topology,
        host: &str,
        agent: &Path,
        extra: &[&str],
    ) -> anyhow::Result<()> {
        let ns = topo.host_ns(host).name.clone();
        let ctl = format!("unix://{}", self.socket.display());
        let pin = self.pin_dir(host);
        let tls = self.tls_args(&format!("sdn://agent/{host}"))?;
        let tls: Vec<&str> = tls.iter().map(String::as_str).collect();
        let p = Proc::spawn(
            &format!("agent-{host}"),
            Some(&ns),
            agent,
            &[
                &tls[..],
                &[
                    "run",
                    "--host",
                    host,
                    "--controller",
                    &ctl,
                    "--pin-dir",
                    pin.to_str().unwrap(),
                ],
                extra,
            ]
            .concat(),
            &self.dir,
        )?;
        self.agents.retain(|(h, _)| h != host);
        self.agents.push((host.to_string(), p));
        Ok(())
    }

    pub fn agent(&mut self, host: &str) -> &mut Proc {
        &mut self.agents.iter_mut().find(|(h, _)| h == host).expect("agent").1
    }

    /// What a host's agent has logged so far.
    pub fn agent_log(&self, host: &str) -> String {
        self.agents
            .iter()
            .find(|(h, _)| h == host)
            .map(|(_, p)| p.log_text())
            .unwrap_or_default()
    }

    pub async fn client(
        &self,
    ) -> anyhow::Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>> {
        Ok(pb::provisioning_client::ProvisioningClient::new(
            sdn_proto::connect_with(&self.addr, self.client_tls.clone()).await?,
        ))
    }

    /// Virtual IP `id` as the controller has it now (its owner and epoch).
    pub async fn virtual_ip(&self, id: &str) -> pb::VirtualIp {
        let mut c = self.client().await.expect("a connection");
        let l = c
            .list(pb::ListRequest {
                kind: pb::Kind::VirtualIp as i32,
                stale: false,
            })
            .await
            .expect("the virtual ips")
            .into_inner();
        l.virtual_ips
            .into_iter()
            .find(|v| v.id == id)
            .unwrap_or_else(|| panic!("no virtual ip {id}"))
    }

    /// A connection to the controller as `uri` (on a secured controller:
    /// the identity whose certificate the run's CA issues).
    pub async fn channel_as(&self, uri: &str) -> Result<tonic::transport::Channel, tonic::Status> {
        let unavailable = |e: anyhow::Error| tonic::Status::unavailable(e.to_string());
        let tls = self
            .pki
            .as_ref()
            .map(|p| p.connector(uri))
            .transpose()
            .map_err(unavailable)?;
        sdn_proto::connect_with(&self.addr, tls)
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))
    }

    /// Applies a batch as `uri` without waiting for enforcement: "OK" and
    /// an empty message, or the refusal's code and message.
    pub async fn try_as(&self, uri: &str, ops: Vec<pb::operation::Op>) -> (tonic::Code, String) {
        match self.apply_committed(uri, ops).await {
            Ok(_) => (tonic::Code::Ok, String::new()),
            Err(e) => (e.code(), e.message().to_string()),
        }
    }

    /// Everything `uri` may read.
    pub async fn list_as(&self, uri: &str) -> pb::ListResponse {
        pb::provisioning_client::ProvisioningClient::new(self.channel_as(uri).await.expect("a connection"))
            .list(pb::ListRequest { kind: 0, stale: false })
            .await
            .expect("the listing")
            .into_inner()
    }

    /// Applies a batch as `uri` and waits for enforcement.
    pub async fn apply_as(&self, uri: &str, ops: Vec<pb::operation::Op>) -> Result<pb::ApplyResponse, tonic::Status> {
        let ch = self.channel_as(uri).await?;
        self.apply_on(pb::provisioning_client::ProvisioningClient::new(ch), ops)
            .await
    }

    /// Applies a batch as `uri`, without waiting for enforcement (for a
    /// controller whose hosts run no agent).
    pub async fn apply_committed(
        &self,
        uri: &str,
        ops: Vec<pb::operation::Op>,
    ) -> Result<pb::ApplyResponse, tonic::Status> {
        let ch = self.channel_as(uri).await?;
        pb::provisioning_client::ProvisioningClient::new(ch)
            .apply(pb::ApplyRequest {
                operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
                actor: self.actor.clone(),
                wait: false,
                wait_timeout_ms: 0,
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Applies a batch and waits for enforcement.
    pub async fn apply(&self, ops: Vec<pb::operation::Op>) -> Result<pb::ApplyResponse, tonic::Status> {
        if self.by_role {
            return self.apply_by_role(ops).await;
        }
        let c = self
            .client()
            .await
            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
        self.apply_on(c, ops).await
    }

    /// On a secured controller, each run of operations as the role that
    /// may make them: the platform's kinds (tenants, VPCs, subnets, hosts,
    /// ports) as [`PLATFORM`], the rest as [`ADMIN`]. Enforced when every
    /// run was.
    async fn apply_by_role(&self, ops: Vec<pb::operation::Op>) -> Result<pb::ApplyResponse, tonic::Status> {
        use pb::operation::Op;
        let platform = |o: &Op| match o {
            Op::PutTenant(_) | Op::PutVpc(_) | Op::PutSubnet(_) | Op::PutHost(_) | Op::PutPort(_) => true,
            Op::Delete(r) => [
                pb::Kind::Tenant,
                pb::Kind::Vpc,
                pb::Kind::Subnet,
                pb::Kind::Host,
                pb::Kind::Port,
            ]
            .iter()
            .any(|k| *k as i32 == r.kind),
            _ => false,
        };
        let mut runs: Vec<(bool, Vec<Op>)> = Vec::new();
        for o in ops {
            let p = platform(&o);
            match runs.last_mut() {
                Some((q, run)) if *q == p => run.push(o),
                _ => runs.push((p, vec![o])),
            }
        }
        let mut out = pb::ApplyResponse {
            enforced: true,
            ..Default::default()
        };
        for (p, run) in runs {
            let ch = self.channel_as(if p { PLATFORM } else { ADMIN }).await?;
            let r = self
                .apply_on(pb::provisioning_client::ProvisioningClient::new(ch), run)
                .await?;
            out.enforced &= r.enforced;
            out.revision = r.revision;
            out.hosts.extend(r.hosts);
            out.warnings.extend(r.warnings);
        }
        Ok(out)
    }

    /// On a secured controller, the harness applies each operation as the
    /// role that may make it ([`Cluster::apply`]).
    pub fn apply_by_roles(&mut self) {
        self.by_role = self.pki.is_some();
    }

    async fn apply_on(
        &self,
        mut c: pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>,
        ops: Vec<pb::operation::Op>,
    ) -> Result<pb::ApplyResponse, tonic::Status> {
        c.apply(pb::ApplyRequest {
            operations: ops.into_iter().map(|o| pb::Operation { op: Some(o) }).collect(),
            actor: self.actor.clone(),
            wait: true,
            wait_timeout_ms: 20_000,
        })
        .await
        .map(|r| r.into_inner())
    }

    /// One counter of a host's dataplane: `group` is "drops" or "stats".
    pub fn counter(&self, topo: &Topology, host: &str, group: &str, name: &str) -> u64 {
        self.drops(topo, host).expect("counters")[group][name]
            .as_u64()
            .unwrap_or(0)
    }

    /// The firewall verdicts a host recorded (`sdn-agent verdicts`).
    pub fn verdicts(&self, topo: &Topology, host: &str) -> Vec<serde_json::Value> {
        let out = ns_sh(
            &topo.host_ns(host).name,
            &[
                bin("sdn-agent").to_str().unwrap(),
                "verdicts",
                "--pin-dir",
                self.pin_dir(host).to_str().unwrap(),
            ],
        )
        .expect("sdn-agent verdicts");
        out.lines()
            .map(|l| serde_json::from_str(l).expect("a JSON line"))
            .collect()
    }

    /// Every counter of a host's dataplane (`sdn-agent counters`): drops
    /// by reason and stats.
    pub fn drops(&self, topo: &Topology, host: &str) -> anyhow::Result<serde_json::Value> {
        let out = ns_sh(
            &topo.host_ns(host).name,
            &[
                bin("sdn-agent").to_str().unwrap(),
                "counters",
                "--pin-dir",
                self.pin_dir(host).to_str().unwrap(),
            ],
        )?;
        Ok(serde_json::from_str(&out)?)
    }
}
