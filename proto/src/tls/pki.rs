//! A CA of the cluster's own, and the certificates it issues: EC P-256
//! keys, SHA-256 signatures, each certificate naming one identity in a URI
//! subject alternative name (see the parent module).

use std::path::Path;

use boring::asn1::Asn1Time;
use boring::bn::{BigNum, MsbOption};
use boring::ec::{EcGroup, EcKey};
use boring::hash::MessageDigest;
use boring::nid::Nid;
use boring::pkey::{PKey, Private};
use boring::x509::extension::{
    AuthorityKeyIdentifier, BasicConstraints, ExtendedKeyUsage, KeyUsage, SubjectAlternativeName, SubjectKeyIdentifier,
};
use boring::x509::{X509Builder, X509NameBuilder, X509};

use super::Identity;

/// A certificate's validity, in Unix seconds.
#[derive(Clone, Copy, Debug)]
pub struct Validity {
    pub not_before: i64,
    pub not_after: i64,
}

impl Validity {
    /// From an hour ago (clocks differ a little) for `days` days.
    pub fn days(days: u32) -> Validity {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        Validity {
            not_before: now - 3600,
            not_after: now + i64::from(days) * 86_400,
        }
    }
}

fn e(what: &str) -> impl FnOnce(boring::error::ErrorStack) -> String + '_ {
    move |err| format!("{what}: {err}")
}

fn new_key() -> Result<PKey<Private>, String> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).map_err(e("EC group"))?;
    let key = EcKey::generate(&group).map_err(e("generating a key"))?;
    PKey::from_ec_key(key).map_err(e("generating a key"))
}

fn builder(common_name: &str, key: &PKey<Private>, v: Validity) -> Result<X509Builder, String> {
    let mut b = X509Builder::new().map_err(e("certificate"))?;
    b.set_version(2).map_err(e("certificate version"))?;
    let mut serial = BigNum::new().map_err(e("serial"))?;
    serial.rand(127, MsbOption::MAYBE_ZERO, false).map_err(e("serial"))?;
    let serial = serial.to_asn1_integer().map_err(e("serial"))?;
    b.set_serial_number(&serial).map_err(e("serial"))?;
    let mut name = X509NameBuilder::new().map_err(e("name"))?;
    name.append_entry_by_nid(Nid::COMMONNAME, common_name)
        .map_err(e("common name"))?;
    let name = name.build();
    b.set_subject_name(&name).map_err(e("subject"))?;
    b.set_pubkey(key).map_err(e("public key"))?;
    let nb = Asn1Time::from_unix(v.not_before as _).map_err(e("not before"))?;
    let na = Asn1Time::from_unix(v.not_after as _).map_err(e("not after"))?;
    b.set_not_before(&nb).map_err(e("not before"))?;
    b.set_not_after(&na).map_err(e("not after"))?;
    Ok(b)
}

/// A certificate authority: its certificate and key.
pub struct Ca {
    pub cert: X509,
    key: PKey<Private>,
}

impl Ca {
    /// A new self-signed CA.
    pub fn create(common_name: &str, v: Validity) -> Result<Ca, String> {
        let key = new_key()?;
        let mut b = builder(common_name, &key, v)?;
        let subject = {
            let mut n = X509NameBuilder::new().map_err(e("name"))?;
            n.append_entry_by_nid(Nid::COMMONNAME, common_name)
                .map_err(e("common name"))?;
            n.build()
        };
        b.set_issuer_name(&subject).map_err(e("issuer"))?;
        {
            let ext = BasicConstraints::new()
                .critical()
                .ca()
                .build()
                .map_err(e("CA constraints"))?;
            b.append_extension(&ext).map_err(e("CA constraints"))?;
        }
        {
            let ext = KeyUsage::new()
                .critical()
                .key_cert_sign()
                .crl_sign()
                .build()
                .map_err(e("key usage"))?;
            b.append_extension(&ext).map_err(e("key usage"))?;
        }
        let ski = SubjectKeyIdentifier::new()
            .build(&b.x509v3_context(None, None))
            .map_err(e("key identifier"))?;
        b.append_extension(&ski).map_err(e("key identifier"))?;
        b.sign(&key, MessageDigest::sha256()).map_err(e("signing the CA"))?;
        Ok(Ca { cert: b.build(), key })
    }

    /// A CA from its PEM files.
    pub fn load(cert: &Path, key: &Path) -> Result<Ca, String> {
        let c = std::fs::read(cert).map_err(|err| format!("reading {}: {err}", cert.display()))?;
        let k = std::fs::read(key).map_err(|err| format!("reading {}: {err}", key.display()))?;
        let cert_x = X509::from_pem(&c).map_err(|err| format!("{}: not a PEM certificate: {err}", cert.display()))?;
        let key_p = PKey::private_key_from_pem(&k).map_err(|err| format!("{}: not a PEM key: {err}", key.display()))?;
        if !cert_x.public_key().map(|p| p.public_eq(&key_p)).unwrap_or(false) {
            return Err(format!("{} is not the key of {}", key.display(), cert.display()));
        }
        Ok(Ca {
            cert: cert_x,
            key: key_p,
        })
    }

    pub fn cert_pem(&self) -> Result<Vec<u8>, String> {
        self.cert.to_pem().map_err(e("writing the CA"))
    }

    pub fn key_pem(&self) -> Result<Vec<u8>, String> {
        self.key.private_key_to_pem_pkcs8().map_err(e("writing the CA key"))
    }

    /// A certificate for `id`, usable as client and server, with DNS names
    /// and IP addresses in `addresses` as well (what tools that check the
    /// address, such as grpcurl, need). Returns the certificate and key in
    /// PEM.
    pub fn issue(&self, id: &Identity, addresses: &[String], v: Validity) -> Result<(Vec<u8>, Vec<u8>), String> {
        let key = new_key()?;
        let mut b = builder(&id.uri(), &key, v)?;
        b.set_issuer_name(self.cert.subject_name()).map_err(e("issuer"))?;
        {
            let ext = BasicConstraints::new().build().map_err(e("constraints"))?;
            b.append_extension(&ext).map_err(e("constraints"))?;
        }
        {
            let ext = KeyUsage::new()
                .critical()
                .digital_signature()
                .key_agreement()
                .build()
                .map_err(e("key usage"))?;
            b.append_extension(&ext).map_err(e("key usage"))?;
        }
        {
            let ext = ExtendedKeyUsage::new()
                .server_auth()
                .client_auth()
                .build()
                .map_err(e("extended key usage"))?;
            b.append_extension(&ext).map_err(e("extended key usage"))?;
        }
        let mut san = SubjectAlternativeName::new();
        san.uri(&id.uri());
        for a in addresses {
            if a.parse::<std::net::IpAddr>().is_ok() {
                san.ip(a);
            } else {
                san.dns(a);
            }
        }
        let san = san
            .build(&b.x509v3_context(Some(&self.cert), None))
            .map_err(e("alternative names"))?;
        b.append_extension(&san).map_err(e("alternative names"))?;
        let aki = AuthorityKeyIdentifier::new()
            .keyid(true)
            .build(&b.x509v3_context(Some(&self.cert), None))
            .map_err(e("authority key identifier"))?;
        b.append_extension(&aki).map_err(e("authority key identifier"))?;
        b.sign(&self.key, MessageDigest::sha256())
            .map_err(e("signing the certificate"))?;
        let cert = b.build().to_pem().map_err(e("writing the certificate"))?;
        let key = key.private_key_to_pem_pkcs8().map_err(e("writing the key"))?;
        Ok((cert, key))
    }
}

/// Writes `STEM.pem` and `STEM.key` (readable by the owner only) in `dir`,
/// replacing each file whole (a reader never sees half a file).
pub fn write_pair(dir: &Path, stem: &str, cert: &[u8], key: &[u8]) -> Result<(), String> {
    write_file(&dir.join(format!("{stem}.key")), key, 0o600)?;
    write_file(&dir.join(format!("{stem}.pem")), cert, 0o644)
}

pub fn write_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), String> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    // A temporary file of its own (never one left behind or planted: it
    // must not exist, and a link is not followed), with the mode set on
    // the open file before the bytes go in.
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("{}: not a file name", path.display()))?;
    let mut nonce = [0u8; 8];
    boring::rand::rand_bytes(&mut nonce).map_err(|e| format!("random: {e}"))?;
    let tmp = path.with_file_name(format!(
        ".{name}.{}.tmp",
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(mode)
        .open(&tmp)
        .map_err(|err| format!("writing {}: {err}", tmp.display()))?;
    let written = f
        .set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.write_all(bytes))
        .and_then(|_| f.sync_all());
    if let Err(err) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(format!("writing {}: {err}", tmp.display()));
    }
    std::fs::rename(&tmp, path).map_err(|err| {
        let _ = std::fs::remove_file(&tmp);
        format!("writing {}: {err}", path.display())
    })
}
