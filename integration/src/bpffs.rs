//! A bpffs mount for the agents' pins.

use std::path::{Path, PathBuf};

use crate::shell::sh;

/// A bpffs mount for the agents' pins, unmounted on drop.
pub struct Bpffs {
    pub path: PathBuf,
}

impl Bpffs {
    pub fn new(path: &Path) -> anyhow::Result<Bpffs> {
        std::fs::create_dir_all(path)?;
        sh(&["mount", "-t", "bpf", "bpf", path.to_str().unwrap()])?;
        Ok(Bpffs {
            path: path.to_path_buf(),
        })
    }
}

impl Drop for Bpffs {
    fn drop(&mut self) {
        // Removing the pins detaches every program and frees the maps.
        let _ = sh(&["umount", "-l", self.path.to_str().unwrap()]);
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
