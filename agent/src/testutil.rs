//! Helpers for tests and benchmarks that need the kernel: a private bpffs
//! mount removed on drop, and a loaded dataplane with a policy in place.

use std::path::{Path, PathBuf};

use anyhow::Context as _;

/// A bpffs mounted on a fresh directory; unmounted and removed on drop.
pub struct BpffsMount {
    path: PathBuf,
}

impl BpffsMount {
    pub fn new(tag: &str) -> anyhow::Result<BpffsMount> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("sdn-bpffs-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        let st = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&path)
            .status()
            .context("running mount")?;
        if !st.success() {
            let _ = std::fs::remove_dir(&path);
            anyhow::bail!("mount -t bpf failed on {} (root needed)", path.display());
        }
        Ok(BpffsMount { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for BpffsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg("-l").arg(&self.path).status();
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Whether this process may load eBPF programs (root with CAP_BPF).
pub fn can_load_bpf() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
