//! Network namespaces: a guard that deletes one on drop, and entering one.

use anyhow::Context as _;

use crate::shell::{ns_sh, sh};

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(name: &str) -> anyhow::Result<Netns> {
        let _ = sh(&["ip", "netns", "del", name]);
        sh(&["ip", "netns", "add", name])?;
        let ns = Netns { name: name.to_string() };
        ns.sh(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        ns_sh(&self.name, args)
    }

    pub fn sysctl(&self, kv: &str) -> anyhow::Result<()> {
        self.sh(&["sysctl", "-qw", kv]).map(|_| ())
    }

    /// A partition by nftables: an `inet` table `table` dropping what each
    /// of `matches` (nft match expressions) matches, in and out.
    pub fn nft_cut(&self, table: &str, matches: &[&str]) -> anyhow::Result<()> {
        self.sh(&["nft", "add", "table", "inet", table])?;
        for (chain, hook) in [("in", "input"), ("out", "output")] {
            self.sh(&[
                "nft",
                &format!("add chain inet {table} {chain} {{ type filter hook {hook} priority 0 ; }}"),
            ])?;
            for m in matches {
                self.sh(&["nft", &format!("add rule inet {table} {chain} {m} drop")])?;
            }
        }
        Ok(())
    }

    /// Ends a partition [`Netns::nft_cut`] made.
    pub fn nft_mend(&self, table: &str) -> anyhow::Result<()> {
        self.sh(&["nft", "delete", "table", "inet", table]).map(|_| ())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh(&["ip", "netns", "del", &self.name]);
    }
}

/// Moves the calling thread into a network namespace (by name).
pub fn enter_netns(name: &str) -> anyhow::Result<()> {
    let f = std::fs::File::open(format!("/var/run/netns/{name}")).with_context(|| format!("opening netns {name}"))?;
    use std::os::fd::AsRawFd;
    // SAFETY: setns on a valid namespace fd affects only this thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error()).context("setns");
    }
    Ok(())
}
