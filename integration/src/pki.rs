//! A CA made for one test or demo run, and the certificates it issues
//! (the same code as `sdnctl pki`), in the run's directory.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sdn_proto::tls::pki::{self, Ca, Validity};
use sdn_proto::tls::{Connector, Files, Identity};

pub struct Pki {
    pub dir: PathBuf,
    ca: Ca,
}

impl Pki {
    /// A new CA in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Pki> {
        std::fs::create_dir_all(dir)?;
        let ca = Ca::create("sdn test CA", Validity::days(30)).map_err(anyhow::Error::msg)?;
        pki::write_file(&dir.join("ca.pem"), &ca.cert_pem().map_err(anyhow::Error::msg)?, 0o644)
            .map_err(anyhow::Error::msg)?;
        pki::write_file(&dir.join("ca.key"), &ca.key_pem().map_err(anyhow::Error::msg)?, 0o600)
            .map_err(anyhow::Error::msg)?;
        Ok(Pki {
            dir: dir.to_path_buf(),
            ca,
        })
    }

    /// The CA's certificate file.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The files of `uri` (issued on first use, valid for a month, naming
    /// localhost and 127.0.0.1 as well).
    pub fn files(&self, uri: &str) -> anyhow::Result<Files> {
        let f = self.paths(uri);
        if f.cert.exists() && f.key.exists() {
            return Ok(f);
        }
        self.files_valid(uri, Validity::days(30))
    }

    fn paths(&self, uri: &str) -> Files {
        let stem = stem(uri);
        Files {
            ca: self.ca(),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
        }
    }

    /// The files of `uri`, valid as given (an expired certificate, say),
    /// issued again each time.
    pub fn files_valid(&self, uri: &str, v: Validity) -> anyhow::Result<Files> {
        let id = Identity::parse_uri(uri).map_err(anyhow::Error::msg)?;
        let stem = stem(uri);
        let files = self.paths(uri);
        let (cert, key) = self
            .ca
            .issue(&id, &["localhost".into(), "127.0.0.1".into()], v)
            .map_err(anyhow::Error::msg)?;
        pki::write_pair(&self.dir, &stem, &cert, &key).map_err(anyhow::Error::msg)?;
        Ok(files)
    }

    /// The command-line flags that give a process `uri`'s certificate.
    pub fn args(&self, uri: &str) -> anyhow::Result<Vec<String>> {
        let f = self.files(uri)?;
        Ok(vec![
            "--tls-ca".into(),
            f.ca.display().to_string(),
            "--tls-cert".into(),
            f.cert.display().to_string(),
            "--tls-key".into(),
            f.key.display().to_string(),
        ])
    }

    /// A client connecting as `uri`.
    pub fn connector(&self, uri: &str) -> anyhow::Result<Arc<Connector>> {
        Ok(Arc::new(Connector::new(self.files(uri)?).map_err(anyhow::Error::msg)?))
    }
}

pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `ROLE-NAME`, or `tenant-T@NAME`, as `sdnctl pki` names the files.
fn stem(uri: &str) -> String {
    let rest = uri.trim_start_matches("sdn://");
    match rest.split_once('/') {
        Some(("tenant", tn)) => format!("tenant-{}", tn.replacen('/', "@", 1)),
        Some((role, name)) => format!("{role}-{name}"),
        None => rest.to_string(),
    }
}
