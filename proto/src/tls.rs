//! Mutual TLS on every connection to and between controllers (BoringSSL),
//! and who is at the other end.
//!
//! Every party holds a certificate issued by the cluster's CA whose URI
//! subject alternative name says what it is:
//!
//! | identity | URI |
//! |---|---|
//! | a controller replica, node N | `sdn://replica/N` |
//! | the agent of host H | `sdn://agent/H` |
//! | the cloud platform | `sdn://platform/NAME` |
//! | an administrator | `sdn://admin/NAME` |
//! | a supervisor (read-only) | `sdn://supervisor/NAME` |
//! | a user of tenant T | `sdn://tenant/T/NAME` |
//!
//! A controller asks every client for a certificate and refuses the
//! handshake without one that chains to its CA and is valid now; what the
//! certificate says reaches every handler as a [`Peer`] in the request's
//! extensions. A client checks the controller's certificate the same way
//! and requires it to be a replica's (addresses are not checked: the CA
//! is the cluster's own). Certificate files are read again when they
//! change, for the connections made after.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use boring::ssl::{
    select_next_proto, AlpnError, SslAcceptor, SslConnector, SslFiletype, SslMethod, SslRef, SslVerifyMode,
};
use boring::x509::{X509StoreContextRef, X509};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_boring::SslStream;

pub mod pki;

/// A TLS handshake that takes longer than this is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a party is, from its certificate (or, on the local socket, from
/// the configuration of its user id).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    Platform,
    Admin,
    Tenant,
    Supervisor,
    Agent,
    Replica,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Platform => "platform",
            Role::Admin => "admin",
            Role::Tenant => "tenant",
            Role::Supervisor => "supervisor",
            Role::Agent => "agent",
            Role::Replica => "replica",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "platform" => Role::Platform,
            "admin" => Role::Admin,
            "tenant" => Role::Tenant,
            "supervisor" => Role::Supervisor,
            "agent" => Role::Agent,
            "replica" => Role::Replica,
            _ => return None,
        })
    }

    pub const ALL: [Role; 6] = [
        Role::Platform,
        Role::Admin,
        Role::Tenant,
        Role::Supervisor,
        Role::Agent,
        Role::Replica,
    ];
}

/// Who a party is.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: Role,
    /// The host of an agent, the node id of a replica, the person or
    /// system otherwise.
    pub name: String,
    /// The tenant of a tenant's user.
    pub tenant: Option<String>,
}

impl Identity {
    /// The identity's URI, as in its certificate.
    pub fn uri(&self) -> String {
        match &self.tenant {
            Some(t) => format!("sdn://tenant/{t}/{}", self.name),
            None => format!("sdn://{}/{}", self.role.name(), self.name),
        }
    }

    /// Reads an identity URI. Names are what object ids may be: letters,
    /// digits, `-`, `_`, `.`, at most 128 bytes each.
    pub fn parse_uri(uri: &str) -> Result<Identity, String> {
        let rest = uri
            .strip_prefix("sdn://")
            .ok_or_else(|| format!("identity {uri:?}: not an sdn:// URI"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let role = Role::parse(parts[0]).ok_or_else(|| format!("identity {uri:?}: unknown role {:?}", parts[0]))?;
        let ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 128
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        match (role, parts.as_slice()) {
            (Role::Tenant, [_, t, n]) if ok(t) && ok(n) => Ok(Identity {
                role,
                name: n.to_string(),
                tenant: Some(t.to_string()),
            }),
            (Role::Tenant, _) => Err(format!("identity {uri:?}: a tenant's is sdn://tenant/TENANT/NAME")),
            (_, [_, n]) if ok(n) => Ok(Identity {
                role,
                name: n.to_string(),
                tenant: None,
            }),
            _ => Err(format!("identity {uri:?}: expected sdn://{}/NAME", role.name())),
        }
    }

    /// The identity a certificate carries: exactly one `sdn://` URI name.
    pub fn of_certificate(cert: &X509) -> Result<Identity, String> {
        let uris: Vec<String> = cert
            .subject_alt_names()
            .map(|names| names.iter().filter_map(|n| n.uri().map(str::to_string)).collect())
            .unwrap_or_default();
        let ours: Vec<&String> = uris.iter().filter(|u| u.starts_with("sdn://")).collect();
        match ours.as_slice() {
            [one] => Identity::parse_uri(one),
            [] => Err("the certificate carries no sdn:// URI name".into()),
            _ => Err(format!("the certificate carries {} sdn:// URI names", ours.len())),
        }
    }
}

/// How a caller reached the controller, and who it is.
#[derive(Clone, Debug)]
pub struct Peer {
    /// `None` only on a connection the controller serves without
    /// authentication (`--insecure`).
    pub identity: Option<Identity>,
    pub remote: Option<SocketAddr>,
    /// The user id of a caller on the local socket (`SO_PEERCRED`).
    pub uid: Option<u32>,
    /// When the certificate the connection was opened with expires: a
    /// request after it is refused, however long the connection lives.
    pub expires: Option<std::time::Instant>,
}

impl Peer {
    /// Who the audit log names: the identity's URI, or where an
    /// unauthenticated caller came from.
    pub fn actor(&self) -> String {
        match (&self.identity, self.remote, self.uid) {
            (Some(id), _, _) => id.uri(),
            (None, Some(a), _) => format!("unauthenticated:{a}"),
            (None, None, Some(uid)) => format!("unauthenticated:uid={uid}"),
            (None, None, None) => "unauthenticated".into(),
        }
    }
}

/// A connection, and the peer its handshake authenticated (or what is
/// known of the peer of a connection without TLS).
pub struct Authenticated<IO> {
    inner: IO,
    peer: Peer,
}

/// A TLS connection with the peer it authenticated.
pub type TlsIo<S> = Authenticated<SslStream<S>>;

impl<IO> Authenticated<IO> {
    pub fn new(inner: IO, peer: Peer) -> Self {
        Authenticated { inner, peer }
    }

    pub fn peer(&self) -> &Peer {
        &self.peer
    }

    /// The same connection and peer, the connection in another form.
    pub fn map<T>(self, f: impl FnOnce(IO) -> T) -> Authenticated<T> {
        Authenticated {
            inner: f(self.inner),
            peer: self.peer,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Authenticated<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Authenticated<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<IO> tonic::transport::server::Connected for Authenticated<IO> {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        self.peer.clone()
    }
}

/// The command-line flags naming a party's TLS files.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// The CA that issued every party's certificate (PEM).
    #[arg(long = "tls-ca", env = "SDN_TLS_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// This party's certificate (PEM); its `sdn://` URI name says who it is.
    #[arg(long = "tls-cert", env = "SDN_TLS_CERT", global = true)]
    pub cert: Option<PathBuf>,
    /// This party's key (PEM).
    #[arg(long = "tls-key", env = "SDN_TLS_KEY", global = true)]
    pub key: Option<PathBuf>,
}

impl TlsArgs {
    /// The files, if given (all three or none).
    pub fn files(&self) -> Result<Option<Files>, String> {
        Files::from_parts(self.ca.clone(), self.cert.clone(), self.key.clone())
    }

    /// Sets this process's client certificate, if the files are given.
    pub fn install_client(&self) -> Result<(), String> {
        match self.files()? {
            Some(f) => install_client(f),
            None => Ok(()),
        }
    }
}

/// The CA, certificate and key files of one party.
#[derive(Clone, Debug)]
pub struct Files {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Files {
    /// From three optional paths: all or none.
    pub fn from_parts(
        ca: Option<PathBuf>,
        cert: Option<PathBuf>,
        key: Option<PathBuf>,
    ) -> Result<Option<Files>, String> {
        match (ca, cert, key) {
            (None, None, None) => Ok(None),
            (Some(ca), Some(cert), Some(key)) => Ok(Some(Files { ca, cert, key })),
            (ca, cert, key) => {
                let missing: Vec<&str> = [
                    ("--tls-ca", ca.is_none()),
                    ("--tls-cert", cert.is_none()),
                    ("--tls-key", key.is_none()),
                ]
                .into_iter()
                .filter(|(_, m)| *m)
                .map(|(f, _)| f)
                .collect();
                Err(format!(
                    "TLS needs --tls-ca, --tls-cert and --tls-key together; missing {}",
                    missing.join(", ")
                ))
            }
        }
    }

    /// What the three files hold now (a digest of their bytes): a file
    /// replaced with the same time stamp is still seen to change.
    fn stamps(&self) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for p in [&self.ca, &self.cert, &self.key] {
            std::fs::read(p).ok().hash(&mut h);
        }
        h.finish()
    }

    /// The identity of this party's own certificate.
    pub fn identity(&self) -> Result<Identity, String> {
        let pem = std::fs::read(&self.cert).map_err(|e| format!("reading {}: {e}", self.cert.display()))?;
        let cert = X509::from_pem(&pem).map_err(|e| format!("{}: not a PEM certificate: {e}", self.cert.display()))?;
        Identity::of_certificate(&cert).map_err(|e| format!("{}: {e}", self.cert.display()))
    }
}

/// A value built from certificate files, built again when they change.
struct Reloading<T> {
    files: Files,
    build: fn(&Files) -> Result<T, String>,
    current: Mutex<(Arc<T>, u64)>,
}

impl<T> Reloading<T> {
    fn new(files: Files, build: fn(&Files) -> Result<T, String>) -> Result<Self, String> {
        let stamps = files.stamps();
        let first = build(&files)?;
        Ok(Reloading {
            files,
            build,
            current: Mutex::new((Arc::new(first), stamps)),
        })
    }

    /// The current value; rebuilt first if a file changed since. A file
    /// that no longer builds leaves the last good value in use.
    fn get(&self) -> Arc<T> {
        let stamps = self.files.stamps();
        let mut cur = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if stamps != cur.1 {
            cur.1 = stamps;
            match (self.build)(&self.files) {
                Ok(v) => {
                    tracing::info!(cert = %self.files.cert.display(), "TLS certificate files changed: loaded again for new connections");
                    cur.0 = Arc::new(v);
                }
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificate files changed but do not load; the previous ones stay in use")
                }
            }
        }
        cur.0.clone()
    }
}

fn ssl_err<'a>(what: &'a str, path: &'a Path) -> impl FnOnce(boring::error::ErrorStack) -> String + 'a {
    let what = what.to_string();
    move |e| format!("{what} {}: {e}", path.display())
}

/// The server side: asks every client for a certificate of the CA.
pub struct Acceptor {
    inner: Reloading<SslAcceptor>,
    /// A client may come without a certificate (a browser): its
    /// connection has no identity, and what it may do is for the server to
    /// decide. A certificate it does send must still be one of the CA's.
    certificate_optional: bool,
}

impl Acceptor {
    pub fn new(files: Files) -> Result<Acceptor, String> {
        Ok(Acceptor {
            inner: Reloading::new(files, build_acceptor)?,
            certificate_optional: false,
        })
    }

    /// For web pages (HTTP/1.1): a client certificate of the CA is asked
    /// for, not required.
    pub fn web(files: Files) -> Result<Acceptor, String> {
        Ok(Acceptor {
            inner: Reloading::new(files, build_web_acceptor)?,
            certificate_optional: true,
        })
    }

    /// The TLS handshake on an accepted connection, within
    /// [`HANDSHAKE_TIMEOUT`]; the peer's identity comes from its
    /// certificate.
    pub async fn accept<S>(&self, stream: S, remote: Option<SocketAddr>) -> Result<TlsIo<S>, String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let acceptor = self.inner.get();
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_boring::accept(&acceptor, stream))
            .await
            .map_err(|_| "the TLS handshake timed out".to_string())?
            .map_err(|e| handshake_error(e.ssl(), &e.to_string()))?;
        let Some(cert) = tls.ssl().peer_certificate() else {
            if self.certificate_optional {
                return Ok(Authenticated::new(
                    tls,
                    Peer {
                        identity: None,
                        remote,
                        uid: None,
                        expires: None,
                    },
                ));
            }
            return Err("the client sent no certificate".to_string());
        };
        let identity = Identity::of_certificate(&cert)?;
        let expires = boring::asn1::Asn1Time::days_from_now(0)
            .and_then(|now| now.diff(cert.not_after()))
            .ok()
            .map(|d| {
                let secs = i64::from(d.days) * 86_400 + i64::from(d.secs);
                std::time::Instant::now() + Duration::from_secs(secs.max(0) as u64)
            });
        Ok(Authenticated::new(
            tls,
            Peer {
                identity: Some(identity),
                remote,
                uid: None,
                expires,
            },
        ))
    }
}

/// Why a handshake failed, with the certificate verdict when there is one.
fn handshake_error(ssl: Option<&SslRef>, fallback: &str) -> String {
    if let Some(ssl) = ssl {
        if ssl.peer_certificate().is_none() && ssl.is_server() {
            return "the client sent no certificate".into();
        }
        if let Err(v) = ssl.verify_result() {
            return format!("certificate refused: {v}");
        }
    }
    fallback.to_string()
}

fn build_acceptor(f: &Files) -> Result<SslAcceptor, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| format!("TLS setup: {e}"))?;
    load_own(&mut b, f)?;
    b.set_verify(SslVerifyMode::PEER | SslVerifyMode::FAIL_IF_NO_PEER_CERT);
    b.set_alpn_select_callback(|_, client| select_next_proto(b"\x02h2", client).ok_or(AlpnError::NOACK));
    Ok(b.build())
}

fn build_web_acceptor(f: &Files) -> Result<SslAcceptor, String> {
    let mut b = SslAcceptor::mozilla_intermediate_v5(SslMethod::tls()).map_err(|e| format!("TLS setup: {e}"))?;
    load_own(&mut b, f)?;
    b.set_verify(SslVerifyMode::PEER);
    b.set_alpn_select_callback(|_, client| select_next_proto(b"\x08http/1.1", client).ok_or(AlpnError::NOACK));
    Ok(b.build())
}

/// Loads the party's own chain and key, and the CA its peers must chain to.
fn load_own(b: &mut boring::ssl::SslContextBuilder, f: &Files) -> Result<(), String> {
    // Only the cluster's CA is trusted (not the system's roots), and only
    // for certificates it signed itself: no intermediate, so a certificate
    // that claims to be a CA cannot issue identities.
    let pem = std::fs::read(&f.ca).map_err(|e| format!("reading {}: {e}", f.ca.display()))?;
    let cas = X509::stack_from_pem(&pem).map_err(ssl_err("reading the CA", &f.ca))?;
    if cas.is_empty() {
        return Err(format!("{}: no certificate in it", f.ca.display()));
    }
    let mut store = boring::x509::store::X509StoreBuilder::new().map_err(|e| format!("TLS setup: {e}"))?;
    for c in &cas {
        store.add_cert(c).map_err(ssl_err("loading the CA", &f.ca))?;
    }
    b.set_cert_store(store.build());
    b.set_verify_depth(0);
    b.set_certificate_chain_file(&f.cert)
        .map_err(ssl_err("loading the certificate", &f.cert))?;
    b.set_private_key_file(&f.key, SslFiletype::PEM).map_err(|e| {
        if e.to_string().contains("KEY_VALUES_MISMATCH") {
            format!("{} does not belong to {}", f.key.display(), f.cert.display())
        } else {
            format!("loading the key {}: {e}", f.key.display())
        }
    })?;
    b.check_private_key()
        .map_err(|e| format!("{} does not belong to {}: {e}", f.key.display(), f.cert.display()))?;
    // The certificate must itself be one the CA issued, or peers refuse it.
    let own = std::fs::read(&f.cert).map_err(|e| format!("reading {}: {e}", f.cert.display()))?;
    let own = X509::from_pem(&own).map_err(ssl_err("reading the certificate", &f.cert))?;
    let issued = cas.iter().any(|ca| {
        ca.public_key()
            .map(|k| own.verify(&k).unwrap_or(false))
            .unwrap_or(false)
    });
    if !issued {
        return Err(format!(
            "{} was not issued by the CA in {}",
            f.cert.display(),
            f.ca.display()
        ));
    }
    Identity::of_certificate(&own).map_err(|e| format!("{}: {e}", f.cert.display()))?;
    Ok(())
}

/// The client side: presents this party's certificate, and requires the
/// controller's to be a replica's of the same CA.
pub struct Connector {
    inner: Reloading<SslConnector>,
}

impl Connector {
    pub fn new(files: Files) -> Result<Connector, String> {
        Ok(Connector {
            inner: Reloading::new(files, build_connector)?,
        })
    }

    pub async fn connect<S>(&self, stream: S) -> std::io::Result<SslStream<S>>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let c = self.inner.get();
        let mut config = c.configure().map_err(std::io::Error::other)?;
        // The controller's certificate is checked by the CA and its role
        // (the verify callback), not by the address dialled.
        config.set_verify_hostname(false);
        config.set_use_server_name_indication(false);
        tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_boring::connect(config, "controller", stream))
            .await
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "the TLS handshake timed out"))?
            .map_err(|e| std::io::Error::other(handshake_error(e.ssl(), &e.to_string())))
    }
}

impl Connector {
    /// For agents' connections to one another: the server's certificate
    /// must be an agent's of the same CA (the caller checks which host,
    /// with [`peer_identity`]).
    pub fn to_agents(files: Files) -> Result<Connector, String> {
        Ok(Connector {
            inner: Reloading::new(files, build_agent_connector)?,
        })
    }
}

/// The identity in the certificate the other end of `tls` presented.
pub fn peer_identity<S>(tls: &SslStream<S>) -> Result<Identity, String> {
    let cert = tls
        .ssl()
        .peer_certificate()
        .ok_or_else(|| "the peer sent no certificate".to_string())?;
    Identity::of_certificate(&cert)
}

fn build_agent_connector(f: &Files) -> Result<SslConnector, String> {
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| format!("TLS setup: {e}"))?;
    load_own(&mut b, f)?;
    b.set_verify_callback(SslVerifyMode::PEER, |preverified, ctx| {
        server_has_role(preverified, ctx, Role::Agent)
    });
    Ok(b.build())
}

fn build_connector(f: &Files) -> Result<SslConnector, String> {
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| format!("TLS setup: {e}"))?;
    load_own(&mut b, f)?;
    b.set_alpn_protos(b"\x02h2").map_err(|e| format!("TLS setup: {e}"))?;
    b.set_verify_callback(SslVerifyMode::PEER, server_is_replica);
    Ok(b.build())
}

/// The chain verified, the server's own certificate must name a replica.
fn server_is_replica(preverified: bool, ctx: &mut X509StoreContextRef) -> bool {
    server_has_role(preverified, ctx, Role::Replica)
}

/// The chain verified, the server's own certificate must name `role`.
fn server_has_role(preverified: bool, ctx: &mut X509StoreContextRef, role: Role) -> bool {
    if !preverified {
        return false;
    }
    if ctx.error_depth() != 0 {
        return true;
    }
    match ctx.current_cert().map(|c| Identity::of_certificate(&c.to_owned())) {
        Some(Ok(id)) if id.role == role => true,
        Some(Ok(id)) => {
            tracing::warn!(identity = %id.uri(), want = role.name(), "the server's certificate is not of the role dialled: refused");
            false
        }
        Some(Err(e)) => {
            tracing::warn!(error = %e, "the server's certificate names no identity: refused");
            false
        }
        None => false,
    }
}

static CLIENT: OnceLock<Arc<Connector>> = OnceLock::new();

/// Sets the certificate this process connects with (once, at start).
pub fn install_client(files: Files) -> Result<(), String> {
    let c = Connector::new(files)?;
    CLIENT
        .set(Arc::new(c))
        .map_err(|_| "the TLS client is already set".to_string())
}

/// The certificate this process connects with, if any.
pub fn client() -> Option<Arc<Connector>> {
    CLIENT.get().cloned()
}

#[cfg(test)]
mod tests {
    use super::pki::{Ca, Validity};
    use super::*;

    #[test]
    fn identity_uris_read_back_and_bad_ones_are_refused() {
        for uri in [
            "sdn://replica/3",
            "sdn://agent/h-1.dc2",
            "sdn://platform/cloud",
            "sdn://admin/root",
            "sdn://supervisor/audit_office",
            "sdn://tenant/dept-a/alice",
        ] {
            assert_eq!(Identity::parse_uri(uri).unwrap().uri(), uri);
        }
        let t = Identity::parse_uri("sdn://tenant/dept-a/alice").unwrap();
        assert_eq!(
            (t.role, t.tenant.as_deref(), t.name.as_str()),
            (Role::Tenant, Some("dept-a"), "alice")
        );
        for (uri, why) in [
            ("https://replica/1", "not an sdn:// URI"),
            ("sdn://root/x", "unknown role"),
            ("sdn://admin", "expected sdn://admin/NAME"),
            ("sdn://admin/", "expected sdn://admin/NAME"),
            ("sdn://admin/a/b", "expected sdn://admin/NAME"),
            ("sdn://agent/h1/../h2", "expected sdn://agent/NAME"),
            ("sdn://agent/h 1", "expected sdn://agent/NAME"),
            ("sdn://tenant/t1", "sdn://tenant/TENANT/NAME"),
            ("sdn://tenant//alice", "sdn://tenant/TENANT/NAME"),
        ] {
            let e = Identity::parse_uri(uri).unwrap_err();
            assert!(e.contains(why), "{uri}: {e}");
        }
        let long = format!("sdn://admin/{}", "a".repeat(129));
        assert!(Identity::parse_uri(&long).is_err());
    }

    /// The files of one party load only together and consistent: a key of
    /// another certificate, or a certificate of another CA, is named.
    #[test]
    fn a_party_files_must_belong_together() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = Ca::create("ca", Validity::days(1)).unwrap();
        let other = Ca::create("other", Validity::days(1)).unwrap();
        pki::write_file(&d.join("ca.pem"), &ca.cert_pem().unwrap(), 0o644).unwrap();
        let admin = Identity::parse_uri("sdn://admin/root").unwrap();
        let (c1, k1) = ca.issue(&admin, &[], Validity::days(1)).unwrap();
        let (_, k2) = ca.issue(&admin, &[], Validity::days(1)).unwrap();
        let (c3, k3) = other.issue(&admin, &[], Validity::days(1)).unwrap();
        pki::write_pair(d, "good", &c1, &k1).unwrap();
        pki::write_pair(d, "mixed", &c1, &k2).unwrap();
        pki::write_pair(d, "foreign", &c3, &k3).unwrap();
        let files = |stem: &str| Files {
            ca: d.join("ca.pem"),
            cert: d.join(format!("{stem}.pem")),
            key: d.join(format!("{stem}.key")),
        };
        assert!(Connector::new(files("good")).is_ok());
        assert_eq!(files("good").identity().unwrap(), admin);
        let e = Connector::new(files("mixed")).err().unwrap();
        assert!(e.contains("does not belong to"), "{e}");
        let e = Acceptor::new(files("foreign")).err().unwrap();
        assert!(e.contains("was not issued by the CA"), "{e}");
        let e = Files::from_parts(Some(d.join("ca.pem")), None, Some(d.join("k"))).unwrap_err();
        assert!(e.contains("missing --tls-cert"), "{e}");
    }
}
