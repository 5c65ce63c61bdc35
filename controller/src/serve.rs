//! The controller's listeners: every accepted connection becomes a
//! [`Peer`] that the handlers see.
//!
//! - TCP: mutual TLS (the client's certificate names it), or, only with
//!   `--insecure`, plain HTTP/2 with no identity.
//! - The local socket: TLS as on TCP when the client starts one (agents in
//!   other network namespaces reach the controller this way), otherwise
//!   the caller's user id (`SO_PEERCRED`) mapped to an identity by
//!   `--unix-role`. The requests of a caller of no configured user id are
//!   refused (`UNAUTHENTICATED`), unless the controller runs `--insecure`.
//!
//! A refused connection is closed before any request is read, and logged
//! as a security event with where it came from and why.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use futures::Stream;
use sdn_proto::tls::{Acceptor, Authenticated, Identity, Peer};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_boring::SslStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::either::Either;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Connections whose handshake is done, waiting for the server.
const READY_QUEUED: usize = 64;
/// Handshakes in progress at once, and from one address; a connection
/// beyond either is closed at once. Without a bound, connections that never
/// finish their handshake would hold file descriptors until none is left
/// for the replicas and agents.
const HANDSHAKES_MAX: usize = 256;
const HANDSHAKES_PER_ADDRESS_MAX: usize = 16;
/// How long a client has, from its connection, to finish its handshake
/// (on the local socket: to send its first byte and finish TLS).
const HANDSHAKE_BUDGET: std::time::Duration = std::time::Duration::from_secs(5);
/// Security events logged per second at most; the rest are counted and
/// the count is logged with the next one.
const EVENTS_PER_SECOND: u32 = 20;

/// How the controller authenticates callers.
#[derive(Clone)]
pub struct Listeners {
    /// `None` only with `--insecure`.
    pub tls: Option<Arc<Acceptor>>,
    /// Identities of local callers by user id.
    pub unix_roles: Arc<BTreeMap<u32, Identity>>,
    pub insecure: bool,
    pub handshakes: Handshakes,
}

/// An accepted connection: TLS, or plain (the local socket by user id, or
/// `--insecure`).
pub type Conn<S> = Authenticated<Either<SslStream<S>, S>>;

/// A budget of security events a second: `None` when this one is over it
/// (and counted), or how many were left out since the last one logged.
pub struct EventBudget(std::sync::Mutex<(Option<std::time::Instant>, u32, u64)>);

impl EventBudget {
    pub const fn new() -> Self {
        EventBudget(std::sync::Mutex::new((None, 0, 0)))
    }

    pub fn admit(&self) -> Option<u64> {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let now = std::time::Instant::now();
        if w.0
            .is_none_or(|t| now.duration_since(t) >= std::time::Duration::from_secs(1))
        {
            *w = (Some(now), 0, w.2);
        }
        if w.1 >= EVENTS_PER_SECOND {
            w.2 += 1;
            return None;
        }
        w.1 += 1;
        Some(std::mem::take(&mut w.2))
    }
}

fn refused(transport: &str, from: &str, why: &str) {
    static BUDGET: EventBudget = EventBudget::new();
    let Some(suppressed) = BUDGET.admit() else { return };
    tracing::warn!(target: "sdn::security", transport, from, reason = why, suppressed, "connection refused");
}

/// A handshake refused for the certificate (or its absence) goes into the
/// audit log too; one that failed otherwise (a port scan, a timeout) only
/// into the security log.
fn certificate_refused(from: &str, why: &str) {
    if why.contains("certificate") || why.contains("URI") {
        crate::refusals::note_handshake(from, why);
    }
}

/// Places per address, at most `limit` for each: what one address may
/// hold at once (handshakes in progress, connections open).
#[derive(Clone)]
pub struct PerAddress {
    limit: usize,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

/// A place of [`PerAddress`], given back on drop.
pub struct AddressPlace {
    addr: Option<std::net::IpAddr>,
    counts: Arc<std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>>,
}

impl PerAddress {
    pub fn new(limit: usize) -> PerAddress {
        PerAddress {
            limit,
            counts: Default::default(),
        }
    }

    /// A place for `addr` (always, for no address); `None` when it holds
    /// its limit.
    pub fn take(&self, addr: Option<std::net::IpAddr>) -> Option<AddressPlace> {
        if let Some(a) = addr {
            let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = m.entry(a).or_insert(0);
            if *n >= self.limit {
                return None;
            }
            *n += 1;
        }
        Some(AddressPlace {
            addr,
            counts: self.counts.clone(),
        })
    }
}

impl Drop for AddressPlace {
    fn drop(&mut self) {
        if let Some(a) = self.addr {
            let mut m = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(n) = m.get_mut(&a) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&a);
                }
            }
        }
    }
}

/// A handshake's place among those in progress, given back on drop.
struct Slot {
    _place: AddressPlace,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Bounds on handshakes in progress.
#[derive(Clone)]
pub struct Handshakes {
    all: Arc<tokio::sync::Semaphore>,
    per_address: PerAddress,
}

impl Default for Handshakes {
    fn default() -> Self {
        Handshakes {
            all: Arc::new(tokio::sync::Semaphore::new(HANDSHAKES_MAX)),
            per_address: PerAddress::new(HANDSHAKES_PER_ADDRESS_MAX),
        }
    }
}

impl Handshakes {
    fn take(&self, addr: Option<std::net::IpAddr>) -> Result<Slot, &'static str> {
        let permit = self
            .all
            .clone()
            .try_acquire_owned()
            .map_err(|_| "too many handshakes in progress")?;
        let place = self
            .per_address
            .take(addr)
            .ok_or("too many handshakes in progress from this address")?;
        Ok(Slot {
            _place: place,
            _permit: permit,
        })
    }
}

impl Listeners {
    /// The TCP listener's connections, authenticated. Each handshake runs
    /// on its own, so a slow client holds up no other.
    pub fn tcp(&self, listener: TcpListener) -> impl Stream<Item = std::io::Result<Conn<TcpStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(READY_QUEUED);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let (stream, remote) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let slot = match me.handshakes.take(Some(remote.ip())) {
                    Ok(s) => s,
                    Err(why) => {
                        refused("tcp", &remote.to_string(), why);
                        continue;
                    }
                };
                // Without it, small replies wait on delayed ACKs (40 ms).
                let _ = stream.set_nodelay(true);
                let (me, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    let c = tokio::time::timeout(HANDSHAKE_BUDGET, me.tcp_conn(stream, remote)).await;
                    drop(slot);
                    match c {
                        Ok(Some(c)) => {
                            let _ = tx.send(Ok(c)).await;
                        }
                        Ok(None) => {}
                        Err(_) => refused("tcp", &remote.to_string(), "the handshake took too long"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    async fn tcp_conn(&self, stream: TcpStream, remote: SocketAddr) -> Option<Conn<TcpStream>> {
        match &self.tls {
            Some(acceptor) => match acceptor.accept(stream, Some(remote)).await {
                Ok(s) => Some(s.map(Either::Left)),
                Err(why) => {
                    refused("tcp", &remote.to_string(), &why);
                    certificate_refused(&format!("tcp {}", remote.ip()), &why);
                    None
                }
            },
            None => Some(Authenticated::new(
                Either::Right(stream),
                Peer {
                    identity: None,
                    remote: Some(remote),
                    uid: None,
                    expires: None,
                },
            )),
        }
    }

    /// The local socket's connections, authenticated.
    pub fn unix(&self, listener: UnixListener) -> impl Stream<Item = std::io::Result<Conn<UnixStream>>> {
        let (tx, rx) = tokio::sync::mpsc::channel(READY_QUEUED);
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((s, _)) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accepting a local connection");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let slot = match me.handshakes.take(None) {
                    Ok(s) => s,
                    Err(why) => {
                        refused("unix", "local", why);
                        continue;
                    }
                };
                let (me, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    let c = tokio::time::timeout(HANDSHAKE_BUDGET, me.unix_conn(stream)).await;
                    drop(slot);
                    match c {
                        Ok(Some(c)) => {
                            let _ = tx.send(Ok(c)).await;
                        }
                        Ok(None) => {}
                        Err(_) => refused("unix", "local", "sent nothing, or took too long over its handshake"),
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    async fn unix_conn(&self, stream: UnixStream) -> Option<Conn<UnixStream>> {
        let cred = stream.peer_cred().ok();
        let uid = cred.map(|c| c.uid());
        let from = match cred {
            Some(c) => format!("uid={} pid={}", c.uid(), c.pid().unwrap_or(0)),
            None => "unknown".into(),
        };
        let first = match first_byte(&stream).await {
            Ok(Some(b)) => b,
            Ok(None) => return None,
            Err(e) => {
                refused("unix", &from, &e.to_string());
                return None;
            }
        };
        if first == TLS_HANDSHAKE {
            let Some(acceptor) = &self.tls else {
                refused("unix", &from, "a TLS handshake, and this controller has no certificate");
                return None;
            };
            return match acceptor.accept(stream, None).await {
                Ok(s) => Some(s.map(Either::Left)),
                Err(why) => {
                    refused("unix", &from, &why);
                    certificate_refused(&format!("unix {from}"), &why);
                    None
                }
            };
        }
        // A caller of no configured user id gets its requests refused with
        // a reason it can read (`UNAUTHENTICATED`), rather than a closed
        // connection.
        let identity = uid.and_then(|u| self.unix_roles.get(&u).cloned());
        Some(Authenticated::new(
            Either::Right(stream),
            Peer {
                identity,
                remote: None,
                uid,
                expires: None,
            },
        ))
    }
}

/// The first byte the client sent, left in the socket.
async fn first_byte(s: &UnixStream) -> std::io::Result<Option<u8>> {
    use std::os::fd::AsRawFd;
    loop {
        s.readable().await?;
        let mut b = [0u8; 1];
        let r = s.try_io(tokio::io::Interest::READABLE, || {
            // SAFETY: a valid fd and a one-byte buffer.
            let n = unsafe { libc::recv(s.as_raw_fd(), b.as_mut_ptr().cast(), 1, libc::MSG_PEEK) };
            if n < 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(n)
            }
        });
        match r {
            Ok(0) => return Ok(None),
            Ok(_) => return Ok(Some(b[0])),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Reads `--unix-role UID=ROLE/NAME` (a tenant's user: `UID=tenant/T/NAME`).
pub fn parse_unix_role(s: &str) -> Result<(u32, Identity), String> {
    let (uid, id) = s
        .split_once('=')
        .ok_or_else(|| format!("--unix-role {s:?}: expected UID=ROLE/NAME"))?;
    let uid: u32 = uid
        .trim()
        .parse()
        .map_err(|_| format!("--unix-role {s:?}: {uid:?} is not a user id"))?;
    let id = Identity::parse_uri(&format!("sdn://{}", id.trim())).map_err(|e| format!("--unix-role {s:?}: {e}"))?;
    if id.role == sdn_proto::tls::Role::Replica {
        // A replica speaks Raft and acts for others: only its certificate
        // says so, never a user id every process of that user shares.
        return Err(format!("--unix-role {s:?}: a replica is known by its certificate only"));
    }
    Ok((uid, id))
}
