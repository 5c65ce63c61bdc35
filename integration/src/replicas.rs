//! A controller cluster of real processes, one network namespace per
//! replica on the topology's underlay, so links between replicas can be cut.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::bail;
use sdn_proto::v1 as pb;

use crate::{bin, Proc, Topology};

pub struct Replica {
    pub id: u64,
    pub ns: String,
    pub ip: String,
    pub socket: PathBuf,
    pub data_dir: PathBuf,
    pub proc: Option<Proc>,
    pub binary: PathBuf,
    /// More arguments for its command line.
    pub args: Vec<String>,
}

impl Replica {
    /// The address other replicas and agents use.
    pub fn addr(&self) -> String {
        format!("http://{}:7070", self.ip)
    }
    /// The address the tests use (a unix socket, reachable from any namespace).
    pub fn local(&self) -> String {
        format!("unix://{}", self.socket.display())
    }
}

pub struct Replicas {
    pub replicas: Vec<Replica>,
    pub dir: PathBuf,
}

impl Replicas {
    /// Starts replicas in the namespaces of `hosts` (their underlay
    /// addresses); the first bootstraps, the others join. Then adds and
    /// promotes them through the Cluster API.
    pub async fn start(topo: &Topology, hosts: &[&str]) -> anyhow::Result<Replicas> {
        let mut r = Replicas::new(topo, hosts);
        r.form().await?;
        Ok(r)
    }

    /// Starts every replica described (with its binary); the first
    /// bootstraps, the others join and are promoted.
    pub async fn form(&mut self) -> anyhow::Result<()> {
        for i in 0..self.replicas.len() {
            self.spawn(i, i > 0)?;
        }
        self.wait_answering(0).await?;
        let first = self.replicas[0].local();
        let mut c = cluster_client(&first).await?;
        for i in 1..self.replicas.len() {
            self.wait_answering(i).await?;
            let (id, addr) = (self.replicas[i].id, self.replicas[i].addr());
            c.add_learner(pb::AddLearnerRequest { node_id: id, addr })
                .await
                .map_err(|e| anyhow::anyhow!("adding replica {id} as a learner: {e}"))?;
            c.promote(pb::MemberRequest { node_id: id })
                .await
                .map_err(|e| anyhow::anyhow!("promoting replica {id}: {e}"))?;
        }
        Ok(())
    }

    /// Describes one replica per host (node ids from 1), none running.
    pub fn new(topo: &Topology, hosts: &[&str]) -> Replicas {
        let replicas = hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let id = i as u64 + 1;
                Replica {
                    id,
                    ns: topo.host_ns(h).name.clone(),
                    ip: topo.underlay_ip(h),
                    socket: topo.dir.join(format!("c{id}.sock")),
                    data_dir: topo.dir.join(format!("c{id}-data")),
                    proc: None,
                    binary: bin("sdn-controller"),
                    args: Vec::new(),
                }
            })
            .collect();
        Replicas {
            replicas,
            dir: topo.dir.clone(),
        }
    }

    pub fn spawn(&mut self, i: usize, join: bool) -> anyhow::Result<()> {
        let rep = &self.replicas[i];
        let _ = std::fs::remove_file(&rep.socket);
        let listen = format!("{}:7070", rep.ip);
        let mut args = vec![
            "--node-id".to_string(),
            rep.id.to_string(),
            "--data-dir".into(),
            rep.data_dir.display().to_string(),
            "--listen".into(),
            listen,
            "--listen-unix".into(),
            rep.socket.display().to_string(),
        ];
        if join {
            args.push("--join".into());
        }
        // Replicas here talk plain HTTP/2 (a release before mutual TLS
        // knows no such flag, and serves plain HTTP/2 anyway).
        if knows_flag(&rep.binary, "--insecure") {
            args.push("--insecure".into());
        }
        args.extend(rep.args.iter().cloned());
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = Proc::spawn(
            &format!("controller-{}", rep.id),
            Some(&rep.ns),
            &rep.binary,
            &args,
            &self.dir,
        )?;
        self.replicas[i].proc = Some(p);
        Ok(())
    }

    pub async fn wait_answering(&self, i: usize) -> anyhow::Result<()> {
        let addr = self.replicas[i].local();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(mut c) = cluster_client(&addr).await {
                if c.status(pb::ClusterStatusRequest {}).await.is_ok() {
                    return Ok(());
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("replica {} does not answer on {addr}", i + 1)
    }

    /// The leader's index, as the replicas that answer see it.
    pub async fn leader(&self) -> Option<usize> {
        for r in &self.replicas {
            if r.proc.is_none() {
                continue;
            }
            if let Ok(mut c) = cluster_client(&r.local()).await {
                if let Ok(Ok(s)) =
                    tokio::time::timeout(Duration::from_millis(500), c.status(pb::ClusterStatusRequest {})).await
                {
                    // Only a replica that itself says it leads counts.
                    let s = s.into_inner();
                    if s.leader_id != 0 && s.leader_id == s.node_id {
                        return Some(s.node_id as usize - 1);
                    }
                }
            }
        }
        None
    }

    pub async fn wait_leader(&self, timeout: Duration) -> anyhow::Result<usize> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(l) = self.leader().await {
                return Ok(l);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("no leader within {timeout:?}")
    }

    pub fn kill(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            p.kill();
        }
    }

    pub fn stop(&mut self, i: usize) {
        if let Some(mut p) = self.replicas[i].proc.take() {
            p.stop();
        }
    }

    pub async fn status(&self, i: usize) -> anyhow::Result<pb::ClusterStatus> {
        let mut c = cluster_client(&self.replicas[i].local()).await?;
        Ok(c.status(pb::ClusterStatusRequest {}).await?.into_inner())
    }

    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("controller-{}.log", i + 1))).unwrap_or_default()
    }
}

pub async fn cluster_client(
    addr: &str,
) -> anyhow::Result<pb::cluster_client::ClusterClient<tonic::transport::Channel>> {
    Ok(pb::cluster_client::ClusterClient::new(sdn_proto::connect(addr).await?))
}

pub async fn prov_client(
    addr: &str,
) -> anyhow::Result<pb::provisioning_client::ProvisioningClient<tonic::transport::Channel>> {
    Ok(pb::provisioning_client::ProvisioningClient::new(
        sdn_proto::connect(addr).await?,
    ))
}

/// Whether a controller binary takes `flag` (its `--help` names it).
pub fn knows_flag(binary: &std::path::Path, flag: &str) -> bool {
    static SEEN: std::sync::Mutex<Vec<(std::path::PathBuf, String, bool)>> = std::sync::Mutex::new(Vec::new());
    let mut seen = SEEN.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, _, k)) = seen.iter().find(|(b, f, _)| b == binary && f == flag) {
        return *k;
    }
    let knows = std::process::Command::new(binary)
        .arg("--help")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false);
    seen.push((binary.to_path_buf(), flag.to_string(), knows));
    knows
}
