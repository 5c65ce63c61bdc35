//! keepalived as a VRRP peer: one instance in a namespace, its VRRP
//! process alone (`-P`), never respawned, killed with its parent on drop
//! (removing the namespace would leave both running).

use std::path::{Path, PathBuf};

use crate::Proc;

pub struct Keepalived {
    pub proc: Proc,
    vrrp_pid: PathBuf,
}

impl Keepalived {
    /// Starts keepalived in `ns` with configuration `conf` (the text of a
    /// `keepalived.conf`), its files named after `name` in `dir`.
    pub fn start(ns: &str, dir: &Path, name: &str, conf: &str) -> anyhow::Result<Keepalived> {
        let file = dir.join(format!("{name}.conf"));
        std::fs::write(&file, conf)?;
        let pid = dir.join(format!("{name}.pid"));
        let vrrp_pid = dir.join(format!("{name}-vrrp.pid"));
        let _ = std::fs::remove_file(&vrrp_pid);
        let proc = Proc::spawn(
            name,
            Some(ns),
            Path::new("/usr/sbin/keepalived"),
            &[
                "-n",
                "-l",
                "-D",
                "-P",
                "--dont-respawn",
                "-f",
                file.to_str().unwrap_or_default(),
                "-p",
                pid.to_str().unwrap_or_default(),
                "-r",
                vrrp_pid.to_str().unwrap_or_default(),
            ],
            dir,
        )?;
        Ok(Keepalived { proc, vrrp_pid })
    }

    /// SIGKILL to its VRRP process, as a crash: no resignation is sent.
    pub fn crash(&mut self) {
        if let Some(pid) = std::fs::read_to_string(&self.vrrp_pid)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            // SAFETY: signalling a process this harness started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        self.proc.kill();
    }

    /// SIGTERM: keepalived resigns (priority 0) and leaves.
    pub fn resign(&mut self) {
        if let Some(p) = self.proc.pid() {
            // SAFETY: signalling a process this harness started.
            unsafe { libc::kill(p as i32, libc::SIGTERM) };
        }
    }
}

impl Drop for Keepalived {
    fn drop(&mut self) {
        self.crash();
    }
}

/// The configuration of one VRRP instance on `eth0`: virtual router
/// `vrid`, `priority`, advertisements every `interval` seconds ("0.1"),
/// VRRP `version` 2 or 3, protecting `vip`/24.
pub fn instance(name: &str, vrid: u8, priority: u8, interval: &str, version: u8, vip: &str) -> String {
    format!(
        "global_defs {{\n  router_id {name}\n  vrrp_version {version}\n}}\n\
         vrrp_instance VI {{\n  state BACKUP\n  interface eth0\n  virtual_router_id {vrid}\n  priority {priority}\n  advert_int {interval}\n  virtual_ipaddress {{\n    {vip}/24\n  }}\n}}\n"
    )
}
