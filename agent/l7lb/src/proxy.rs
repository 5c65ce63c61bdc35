//! The proxy: listeners (HTTP/1.1 and HTTP/2, cleartext or TLS with SNI),
//! each request matched against its listener's rules in order and sent to
//! a member of its pool over kept-alive connections, or answered with a
//! redirect or a fixed response.
//!
//! What a request must be before any rule sees it:
//! - its host (the authority, else `Host`) a valid authority without user
//!   information (400), and on TLS one the connection's certificate covers
//!   (421: a client cannot ask one name's certificate and another's pool);
//! - its path normalised as the members will read it (percent-encoded
//!   unreserved characters decoded, dot segments removed, slashes merged),
//!   and forwarded so; an encoded dot, slash or backslash is refused (400),
//!   so no spelling of a path slips past a rule that a member would take
//!   for the same;
//! - not CONNECT (405).

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::http::uri::Authority;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::{self, Action, Config, Scheduler};
use crate::sched::{Key, Pool};
use crate::tls;

pub type Body = BoxBody<Bytes, hyper::Error>;

/// A connection to a member not made within this fails the request (and
/// sets the member aside).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// A member's answer (its headers) not come within this: 504.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(60);
/// A client's request headers not read within this: the connection ends.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// TLS handshakes not done within this end.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// When the proxy stops accepting, a connection that has not begun a
/// request yet is given this long to (its request may be on the way).
pub const FIRST_REQUEST_GRACE: Duration = Duration::from_secs(2);
/// Idle kept-alive connections to members are closed after this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// HTTP/2 clients are pinged this often, and dropped when a ping is not
/// answered within the same.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// Client connections at once, per proxy, at most; past this new ones
/// wait. Fewer when the process may open fewer files (each client
/// connection may need one to a member): see [`connections_max`].
pub const CONNECTIONS_MAX: usize = 16_384;
/// A request's path, at most (longer: 414).
pub const PATH_MAX: usize = 8 * 1024;
/// A client's request headers, at most (HTTP/1.1; HTTP/2's are 16 KiB).
pub const HEADER_BUFFER_MAX: usize = 64 * 1024;
/// Streams at once on one HTTP/2 connection.
pub const H2_STREAMS_MAX: u32 = 100;
/// Idle kept-alive connections to one member, at most.
pub const IDLE_PER_MEMBER_MAX: usize = 64;

/// Client connections this process can hold: half of what it may open,
/// less a reserve, and no more than [`CONNECTIONS_MAX`].
pub fn connections_max() -> usize {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    let files = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0 {
        r.rlim_cur as usize
    } else {
        1024
    };
    (files.saturating_sub(128) / 2).clamp(64, CONNECTIONS_MAX)
}

/// A listener's certificates, rules and pools as served now (replaced
/// whole on reload: a new connection takes the new certificates, a new
/// request the new rules).
pub struct Served {
    pub listener: config::Listener,
    acceptor: Option<(Arc<boring::ssl::SslAcceptor>, Arc<tls::Names>)>,
    rules: Vec<(config::Rule, Option<regex::Regex>)>,
    pools: HashMap<String, Arc<Pool>>,
    /// The client connections' time limits.
    limits: crate::guard::Limits,
    /// Clients whose forwarding headers are appended to.
    trusted: Vec<ipnetwork::IpNetwork>,
}

/// A running listener: its socket's task, what it serves, and its stop
/// (its connections finish their requests and close).
struct Running {
    served: Arc<RwLock<Arc<Served>>>,
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    /// The listening socket (a copy of its descriptor), for an upgrade.
    fd: std::os::fd::OwnedFd,
}

/// A pool as configured: its definition, its state, and its health
/// checks (they stop when it is dropped).
struct Kept {
    def: config::Pool,
    pool: Arc<Pool>,
    _checks: Option<crate::health::Checks>,
}

/// The proxy: its listeners by address, and its pools by name.
pub struct Proxy {
    running: HashMap<SocketAddr, Running>,
    pools: HashMap<String, Kept>,
    client: Client<HttpConnector, Body>,
    slots: Arc<Semaphore>,
    slots_max: usize,
    /// Listening sockets handed over by the process this one upgrades,
    /// taken by the first configuration's listeners of the same address.
    spare: HashMap<SocketAddr, std::net::TcpListener>,
}

impl Default for Proxy {
    fn default() -> Self {
        Self::new()
    }
}

impl Proxy {
    pub fn new() -> Proxy {
        let client = member_client(member_connector());
        let slots_max = connections_max();
        Proxy {
            running: HashMap::new(),
            pools: HashMap::new(),
            client,
            slots: Arc::new(Semaphore::new(slots_max)),
            slots_max,
            spare: HashMap::new(),
        }
    }

    /// Listening sockets from the process this one replaces: the next
    /// [`apply`](Self::apply) serves on them instead of binding, so no
    /// connection waiting in their queues is lost. Those it does not use
    /// are closed.
    pub fn adopt(&mut self, sockets: Vec<std::net::TcpListener>) {
        for s in sockets {
            if let Ok(a) = s.local_addr() {
                self.spare.insert(a, s);
            }
        }
    }

    /// Copies of the listening sockets' descriptors, for the process that
    /// replaces this one.
    pub fn listening(&self) -> Vec<std::os::fd::BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        self.running.values().map(|r| r.fd.as_fd()).collect()
    }

    /// Stops accepting on every listener (the sockets stay open in the
    /// process that took them over); the connections finish what they
    /// carry and close.
    pub fn stop_accepting(&mut self) {
        for (_, r) in self.running.drain() {
            r.task.abort();
            let _ = r.stop.send(true);
        }
    }

    /// Client connections open now.
    pub fn connections(&self) -> usize {
        self.slots_max - self.slots.available_permits()
    }

    /// Serves `c`: everything is prepared first (certificates, rules,
    /// sockets); on any error nothing changes. A pool whose definition did
    /// not change is kept with its state (learned cookies, members set
    /// aside, requests in flight, what its health checks said; the checks
    /// start again if their definition changed). Listeners kept (same address) take the
    /// new certificates for their next connection and the new rules and
    /// pools for their next request; the others stop (their connections
    /// finish what they carry) or start.
    pub async fn apply(&mut self, c: &Config) -> Result<(), String> {
        let pools: HashMap<String, (config::Pool, Arc<Pool>)> = c
            .pools
            .iter()
            .map(|p| {
                let kept = self.pools.get(&p.name).filter(|k| same_pool(&k.def, p));
                let pool = kept.map_or_else(|| Arc::new(Pool::new(p)), |k| k.pool.clone());
                (p.name.clone(), (p.clone(), pool))
            })
            .collect();
        let by_name: HashMap<String, Arc<Pool>> = pools.iter().map(|(n, (_, p))| (n.clone(), p.clone())).collect();
        let mut prepared = Vec::new();
        for (i, l) in c.listeners.iter().enumerate() {
            let acceptor = match &l.tls {
                Some(t) => {
                    let (a, names) = tls::acceptor(&t.certificates, &format!("listeners[{i}].tls"))?;
                    Some((Arc::new(a), Arc::new(names)))
                }
                None => None,
            };
            let mut rules = Vec::new();
            for (j, r) in l.rules.iter().enumerate() {
                let re = match &r.path_regex {
                    Some(re) => {
                        Some(config::path_regex(re).map_err(|e| format!("listeners[{i}].rules[{j}].path_regex: {e}"))?)
                    }
                    None => None,
                };
                rules.push((r.clone(), re));
            }
            let served = Arc::new(Served {
                listener: l.clone(),
                acceptor,
                rules,
                pools: by_name.clone(),
                limits: c.timeouts.limits(),
                trusted: l.trusted(),
            });
            let kept = self.running.get(&l.listen).is_some_and(|r| !r.task.is_finished());
            let socket = if kept {
                None
            } else {
                let socket = match self.spare.get(&l.listen) {
                    Some(s) => s.try_clone().and_then(|s| {
                        s.set_nonblocking(true)?;
                        TcpListener::from_std(s)
                    }),
                    None => bind(l.listen).await,
                };
                Some(socket.map_err(|e| format!("listeners[{i}].listen: {}: {e}", l.listen))?)
            };
            prepared.push((l.listen, served, socket));
        }
        // Nothing can fail from here on.
        self.spare.clear();
        let mut old = std::mem::take(&mut self.pools);
        for (name, (def, pool)) in pools {
            let checks = match old.remove(&name) {
                Some(k) if Arc::ptr_eq(&k.pool, &pool) && k.def.health == def.health => k._checks,
                kept => {
                    if kept.is_some_and(|k| Arc::ptr_eq(&k.pool, &pool)) && def.health.is_none() {
                        // Checks removed: every member counts as up again.
                        for m in &pool.members {
                            m.healthy.store(true, Ordering::Relaxed);
                        }
                    }
                    def.health.as_ref().map(|h| crate::health::start(&pool, h))
                }
            };
            self.pools.insert(
                name,
                Kept {
                    def,
                    pool,
                    _checks: checks,
                },
            );
        }
        let wanted: Vec<SocketAddr> = prepared.iter().map(|p| p.0).collect();
        self.running.retain(|a, r| {
            let keep = wanted.contains(a);
            if !keep {
                r.task.abort();
                let _ = r.stop.send(true);
            }
            keep
        });
        for (addr, served, socket) in prepared {
            match socket {
                None => {
                    let r = &self.running[&addr];
                    *r.served.write().unwrap_or_else(|p| p.into_inner()) = served;
                }
                Some(socket) => {
                    if let Some(old) = self.running.remove(&addr) {
                        old.task.abort();
                        let _ = old.stop.send(true);
                    }
                    let shared = Arc::new(RwLock::new(served));
                    let (stop, stopped) = watch::channel(false);
                    let Ok(fd) = std::os::fd::AsFd::as_fd(&socket).try_clone_to_owned() else {
                        tracing::error!(listen = %addr, "cannot keep the listening socket's descriptor; not serving it");
                        continue;
                    };
                    let task = tokio::spawn(accept(
                        socket,
                        shared.clone(),
                        self.client.clone(),
                        self.slots.clone(),
                        stopped,
                    ));
                    self.running.insert(
                        addr,
                        Running {
                            served: shared,
                            task,
                            stop,
                            fd,
                        },
                    );
                }
            }
        }
        Ok(())
    }
}

/// Whether a pool's definition is unchanged but for its health checks
/// (its state can be kept; the checks start again if they changed).
fn same_pool(a: &config::Pool, b: &config::Pool) -> bool {
    let bare = |p: &config::Pool| config::Pool {
        health: None,
        ..p.clone()
    };
    bare(a) == bare(b)
}

/// A client towards members: kept-alive connections, `connector`'s
/// connections (TCP_NODELAY and the connect timeout set on the plain
/// connector it wraps, see [`member_connector`]).
pub(crate) fn member_client<C>(connector: C) -> Client<C, Body>
where
    C: hyper_util::client::legacy::connect::Connect + Clone,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(IDLE_TIMEOUT)
        .pool_max_idle_per_host(IDLE_PER_MEMBER_MAX)
        .pool_timer(TokioTimer::new())
        .build(connector)
}

/// A connector to members: no Nagle delay, [`CONNECT_TIMEOUT`].
pub(crate) fn member_connector() -> HttpConnector {
    let mut c = HttpConnector::new();
    c.set_nodelay(true);
    c.set_connect_timeout(Some(CONNECT_TIMEOUT));
    c
}

/// A listening socket (SO_REUSEADDR, so a restarted proxy binds at once).
/// An IPv6 one takes IPv6 alone, so `0.0.0.0:P` and `[::]:P` are two
/// listeners side by side.
async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let s = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        let s = tokio::net::TcpSocket::new_v6()?;
        nix::sys::socket::setsockopt(&s, nix::sys::socket::sockopt::Ipv6V6Only, &true)?;
        s
    };
    s.set_reuseaddr(true)?;
    s.bind(addr)?;
    s.listen(1024)
}

async fn accept(
    socket: TcpListener,
    served: Arc<RwLock<Arc<Served>>>,
    client: Client<HttpConnector, Body>,
    slots: Arc<Semaphore>,
    stopped: watch::Receiver<bool>,
) {
    let per_client = Arc::new(crate::guard::PerClient::default());
    let mut refused_logged = std::time::Instant::now() - Duration::from_secs(60);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (tcp, peer) = match socket.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(counted) = per_client.admit(peer.ip(), crate::guard::PER_CLIENT_MAX) else {
            if refused_logged.elapsed() > Duration::from_secs(1) {
                refused_logged = std::time::Instant::now();
                tracing::warn!(client = %peer.ip(), max = crate::guard::PER_CLIENT_MAX, "a client has too many connections open; its new ones are closed (said at most once a second)");
            }
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let Ok(local) = tcp.local_addr() else { continue };
        let (acceptor, limits) = {
            let s = served.read().unwrap_or_else(|p| p.into_inner());
            (s.acceptor.clone(), s.limits)
        };
        let (served, client, mut stopped) = (served.clone(), client.clone(), stopped.clone());
        tokio::spawn(async move {
            let _slot = slot;
            let _counted = counted;
            let activity = Arc::new(crate::guard::Activity::default());
            let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            builder
                .http1()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(HEADER_BUFFER_MAX)
                .http2()
                .timer(TokioTimer::new())
                .max_concurrent_streams(H2_STREAMS_MAX)
                .keep_alive_interval(H2_KEEPALIVE)
                .keep_alive_timeout(H2_KEEPALIVE);
            let mut conn = Conn {
                peer,
                tls: None,
                served,
                client,
                local,
                private: Arc::default(),
                activity: activity.clone(),
            };
            macro_rules! serve {
                ($io:expr) => {{
                    let svc = hyper::service::service_fn(move |req| conn.clone().handle(req));
                    let c = builder.serve_connection($io, svc);
                    tokio::pin!(c);
                    tokio::select! {
                        _ = c.as_mut() => {}
                        why = activity.watch(limits) => {
                            tracing::debug!(client = %peer, why, "connection closed");
                        }
                        _ = async { let _ = stopped.wait_for(|s| *s).await; } => {
                            // A connection taken just before the stop may
                            // have its first request on the way: it is read
                            // and answered before the connection is let go
                            // (HTTP/1.1 would close it at once, unanswered).
                            let done = tokio::select! {
                                _ = c.as_mut() => true,
                                _ = activity.first_request(FIRST_REQUEST_GRACE) => false,
                            };
                            if !done {
                                c.as_mut().graceful_shutdown();
                                tokio::select! {
                                    _ = c.as_mut() => {}
                                    _ = activity.watch(limits) => {}
                                }
                            }
                        }
                    }
                }};
            }
            match acceptor {
                None => serve!(TokioIo::new(crate::guard::Watched::new(tcp, activity.clone()))),
                Some((a, names)) => {
                    let tcp = crate::guard::Watched::new(tcp, activity.clone());
                    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, tokio_boring::accept(&a, tcp)).await {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(client = %peer, error = %e, "TLS handshake failed");
                            return;
                        }
                        Err(_) => return,
                    };
                    let chosen = names.chosen(stream.ssl().servername(boring::ssl::NameType::HOST_NAME));
                    conn.tls = Some((names, chosen));
                    serve!(TokioIo::new(stream))
                }
            }
        });
    }
}

/// One client connection.
#[derive(Clone)]
struct Conn {
    peer: SocketAddr,
    /// TLS: the listener's certificates' names, and which one this
    /// connection got.
    tls: Option<(Arc<tls::Names>, usize)>,
    served: Arc<RwLock<Arc<Served>>>,
    client: Client<HttpConnector, Body>,
    /// The address the client reached.
    local: SocketAddr,
    /// What the connection does (requests in flight, bytes moved).
    activity: Arc<crate::guard::Activity>,
    /// Its own connections to members with the PROXY protocol.
    private: Arc<crate::pp::Private>,
}

/// Headers of one hop only (RFC 9110 7.6.1), never forwarded.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "proxy-authorization",
];

fn strip_hop_by_hop(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in listed {
        h.remove(n);
    }
    // A length beside a transfer coding is not the message's (RFC 9112
    // 6.3): the coding goes, and so does the length.
    if h.contains_key(header::TRANSFER_ENCODING) {
        h.remove(header::CONTENT_LENGTH);
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// The request's cookie `name`, if any.
fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

/// HTTP/2 clients send cookies as several fields; an HTTP/1.1 member gets
/// one (RFC 9113 8.2.3).
fn join_cookies(h: &mut HeaderMap) {
    if h.get_all(header::COOKIE).iter().count() < 2 {
        return;
    }
    let all: Vec<&str> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    if let Ok(v) = HeaderValue::from_str(&all.join("; ")) {
        h.insert(header::COOKIE, v);
    }
}

fn full(status: StatusCode, body: impl Into<Bytes>, content_type: &str) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// The host a request names (its authority, else its `Host`), checked:
/// lower case, without port or final dot; and the authority as sent.
fn host_of(req: &Request<Incoming>) -> Result<(String, Option<Authority>), ()> {
    let a = match req.uri().authority() {
        Some(a) => Some(a.clone()),
        None => match req.headers().get(header::HOST) {
            Some(h) => Some(Authority::try_from(h.as_bytes()).map_err(|_| ())?),
            None => None,
        },
    };
    let Some(a) = a else {
        return Ok((String::new(), None));
    };
    if a.as_str().contains('@') {
        return Err(());
    }
    let raw = a.host();
    let host = match raw.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6.parse::<std::net::Ipv6Addr>().map_err(|_| ())?.to_string(),
        None => {
            // A name or an IPv4 address: nothing a header's syntax reads.
            if raw.is_empty() || !raw.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)) {
                return Err(());
            }
            raw.trim_end_matches('.').to_ascii_lowercase()
        }
    };
    Ok((host, Some(a)))
}

/// The path as members read it: percent-encoded unreserved characters
/// decoded, slashes merged, dot segments removed (RFC 3986 5.2.4). None:
/// a path no rule can judge (an encoded dot, slash or backslash, or a
/// byte that is no path's).
pub(crate) fn normal_path(path: &str) -> Option<String> {
    let b = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            if !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
                return None;
            }
            let v = u8::from_str_radix(hex, 16).ok()?;
            if v.is_ascii_alphanumeric() || b"-_~".contains(&v) {
                decoded.push(v);
            } else if b"./\\;".contains(&v) || v < 0x20 || v == 0x7f {
                return None;
            } else {
                decoded.push(b'%');
                decoded.extend_from_slice(hex.to_ascii_uppercase().as_bytes());
            }
            i += 3;
            continue;
        }
        if b[i] == b'\\' || b[i] < 0x20 || b[i] == 0x7f {
            return None;
        }
        decoded.push(b[i]);
        i += 1;
    }
    let decoded = String::from_utf8(decoded).ok()?;
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = decoded.split('/').collect();
    let last = segments.len() - 1;
    for (k, s) in segments.iter().enumerate() {
        // A dot segment with parameters (`..;x`) is one to some servers
        // (Tomcat, Jetty) and not to others: refused.
        if s.contains(';') && matches!(s.split(';').next(), Some("." | "..")) {
            return None;
        }
        match *s {
            "" | "." if k != last => {}
            "." | "" => out.push(""),
            ".." => {
                out.pop();
                if k == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    Some(format!("/{}", out.join("/")))
}

/// The path rules judge: each segment without its parameters (`;...`),
/// which servers that take them (Tomcat, Jetty) ignore when they route.
pub(crate) fn rule_view(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return path.into();
    }
    path.split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("/")
        .into()
}

fn matches(r: &config::Rule, re: Option<&regex::Regex>, req: &Request<Incoming>, host: &str, path: &str) -> bool {
    if let Some(h) = &r.host {
        let h = h.to_ascii_lowercase();
        let ok = match h.strip_prefix("*.") {
            Some(rest) => host
                .strip_suffix(rest)
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty()),
            None => host == h,
        };
        if !ok {
            return false;
        }
    }
    if r.path_prefix.as_ref().is_some_and(|p| !path.starts_with(p.as_str())) {
        return false;
    }
    if re.is_some_and(|re| !re.is_match(path)) {
        return false;
    }
    if let Some(hm) = &r.header {
        let mut values = req.headers().get_all(hm.name.as_str()).iter();
        let ok = match &hm.value {
            Some(v) => values.any(|x| x.as_bytes() == v.as_bytes()),
            None => values.next().is_some(),
        };
        if !ok {
            return false;
        }
    }
    if r.method.as_ref().is_some_and(|m| req.method().as_str() != m) {
        return false;
    }
    true
}

/// Counts a request in flight on its member until its response ends.
struct InFlight(Arc<crate::sched::Member>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Conn {
    async fn handle(self, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
        let flight = self.activity.begin();
        let resp = self.answer(req).await;
        // The request counts as in flight until its response's end.
        Ok(resp.map(|b| {
            b.map_frame(move |f| {
                let _ = &flight;
                f
            })
            .boxed()
        }))
    }

    async fn answer(self, req: Request<Incoming>) -> Response<Body> {
        // Methods are case-sensitive (RFC 9110 9.1), but some frameworks
        // upper-case them: `delete` would pass a rule on DELETE and be run
        // as one.
        if !req
            .method()
            .as_str()
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b == b'-' || b == b'_')
        {
            return full(StatusCode::BAD_REQUEST, "methods are upper case\n", "text/plain");
        }
        if req.method() == Method::CONNECT {
            return full(StatusCode::METHOD_NOT_ALLOWED, "CONNECT is not served\n", "text/plain");
        }
        let Ok((host, authority)) = host_of(&req) else {
            return full(StatusCode::BAD_REQUEST, "bad host\n", "text/plain");
        };
        if let Some((names, chosen)) = &self.tls {
            if !names.covers(*chosen, &host) {
                return full(
                    StatusCode::MISDIRECTED_REQUEST,
                    "this connection's certificate does not name that host\n",
                    "text/plain",
                );
            }
        }
        if req.uri().path().len() > PATH_MAX {
            return full(StatusCode::URI_TOO_LONG, "the path is too long\n", "text/plain");
        }
        let Some(path) = normal_path(req.uri().path()) else {
            return full(StatusCode::BAD_REQUEST, "bad path\n", "text/plain");
        };
        let judged = rule_view(&path).into_owned();
        let served = self.served.read().unwrap_or_else(|p| p.into_inner()).clone();
        let action = served
            .rules
            .iter()
            .find(|(r, re)| matches(r, re.as_ref(), &req, &host, &judged))
            .map(|(r, _)| r.action.clone())
            .or_else(|| served.listener.default_pool.clone().map(Action::Pool));
        let Some(action) = action else {
            return full(StatusCode::NOT_FOUND, "no rule matches\n", "text/plain");
        };
        let pool = match action {
            Action::Redirect { location, status } => {
                let mut r = full(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::FOUND),
                    "",
                    "text/plain",
                );
                if let Ok(v) = HeaderValue::from_str(&location) {
                    r.headers_mut().insert(header::LOCATION, v);
                }
                return r;
            }
            Action::Respond {
                status,
                body,
                content_type,
            } => {
                return full(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
                    body,
                    content_type.as_deref().unwrap_or("text/plain"),
                )
            }
            Action::Pool(p) => p,
        };
        let Some(pool) = served.pools.get(&pool).cloned() else {
            return full(StatusCode::SERVICE_UNAVAILABLE, "no such pool\n", "text/plain");
        };
        let target = match req.uri().query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        self.forward(req, &served, &pool, authority, target).await
    }

    async fn forward(
        &self,
        req: Request<Incoming>,
        served: &Served,
        pool: &Arc<Pool>,
        authority: Option<Authority>,
        target: String,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let persisted = pool
            .cookie
            .as_ref()
            .and_then(|c| cookie(&parts.headers, &c.name))
            .map(str::to_string);
        let hashed = match &pool.scheduler {
            Scheduler::HashHeader(h) => parts
                .headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            Scheduler::HashCookie(c) => cookie(&parts.headers, c).map(str::to_string),
            _ => None,
        };
        let key = Key {
            cookie: persisted.as_deref(),
            hash: hashed.as_deref(),
        };
        strip_hop_by_hop(&mut parts.headers);
        join_cookies(&mut parts.headers);
        if let Some(a) = &authority {
            if let Ok(v) = HeaderValue::from_str(a.as_str()) {
                parts.headers.insert(header::HOST, v);
            }
        }
        if served.listener.forwarded {
            let trusted = served.trusted.iter().any(|n| n.contains(self.peer.ip().to_canonical()));
            forwarded(&mut parts.headers, self.peer, self.tls.is_some(), trusted);
        }
        // A request without a body may be sent again: to another member
        // when the first refused the connection, or (idempotent ones) when
        // a kept-alive connection closed under it.
        let bodiless = hyper::body::Body::is_end_stream(&body);
        let idempotent = matches!(
            parts.method,
            Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
        );
        let mut body = Some(body.boxed());
        let mut skip = None;
        for attempt in 0..2 {
            let Some(i) = pool.pick(&key, skip) else {
                return full(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no member of the pool is up\n",
                    "text/plain",
                );
            };
            let member = pool.members[i].clone();
            let Ok(uri) = format!("http://{}{}", member.address, target).parse::<Uri>() else {
                return full(StatusCode::BAD_REQUEST, "bad request target\n", "text/plain");
            };
            let mut up = Request::new(match body.take() {
                Some(b) => b,
                None => Empty::new().map_err(|never| match never {}).boxed(),
            });
            *up.method_mut() = parts.method.clone();
            *up.uri_mut() = uri;
            *up.version_mut() = Version::HTTP_11;
            *up.headers_mut() = parts.headers.clone();
            member.active.fetch_add(1, Ordering::Relaxed);
            let flight = InFlight(member.clone());
            let sent = match pool.proxy_protocol {
                None => self.client.request(up),
                Some(v) => self.private.client(v, self.peer, self.local).request(up),
            };
            let answer = match tokio::time::timeout(ANSWER_TIMEOUT, sent).await {
                Ok(a) => a,
                Err(_) => {
                    tracing::warn!(pool = %pool.name, member = %member.name, "a member did not answer in time");
                    return full(
                        StatusCode::GATEWAY_TIMEOUT,
                        "the member did not answer in time\n",
                        "text/plain",
                    );
                }
            };
            match answer {
                Ok(resp) => {
                    let (mut rp, rb) = resp.into_parts();
                    strip_hop_by_hop(&mut rp.headers);
                    if let Some(c) = &pool.cookie {
                        match c.mode {
                            config::CookieMode::Insert if persisted.as_deref() != Some(member.name.as_str()) => {
                                let secure = if self.tls.is_some() { "; Secure" } else { "" };
                                let v = format!("{}={}; Path=/; HttpOnly{secure}", c.name, member.name);
                                if let Ok(v) = HeaderValue::from_str(&v) {
                                    rp.headers.append(header::SET_COOKIE, v);
                                }
                            }
                            config::CookieMode::Learn => {
                                for v in rp
                                    .headers
                                    .get_all(header::SET_COOKIE)
                                    .iter()
                                    .filter_map(|v| v.to_str().ok())
                                {
                                    if let Some((k, val)) = v.split(';').next().and_then(|kv| kv.trim().split_once('='))
                                    {
                                        if k == c.name && !val.is_empty() {
                                            pool.learn(val, i);
                                        }
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    // The count ends with the response's body.
                    let rb = rb
                        .map_frame(move |f| {
                            let _ = &flight;
                            f
                        })
                        .boxed();
                    return Response::from_parts(rp, rb);
                }
                Err(e) if e.is_connect() && local_failure(&e) => {
                    tracing::error!(error = %e, "the proxy is out of files or ports; the member is not blamed");
                    return full(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "the proxy is overloaded\n",
                        "text/plain",
                    );
                }
                Err(e) if e.is_connect() => {
                    pool.set_aside(i);
                    tracing::warn!(pool = %pool.name, member = %member.name, address = %member.address, error = %e, "a member refused the connection; set aside for a while");
                    if attempt == 0 && bodiless && pool.members.len() > 1 {
                        skip = Some(i);
                        continue;
                    }
                    return full(StatusCode::BAD_GATEWAY, "the member cannot be reached\n", "text/plain");
                }
                Err(e) => {
                    tracing::warn!(pool = %pool.name, member = %member.name, error = %e, "a member's answer failed");
                    if attempt == 0 && bodiless && idempotent {
                        continue;
                    }
                    return full(StatusCode::BAD_GATEWAY, "the member's answer failed\n", "text/plain");
                }
            }
        }
        full(StatusCode::BAD_GATEWAY, "no member answered\n", "text/plain")
    }
}

/// Whether a failed connection to a member failed here (no file, no
/// port, no memory), not at the member.
fn local_failure(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.raw_os_error(),
                Some(libc::EMFILE | libc::ENFILE | libc::EADDRNOTAVAIL | libc::ENOBUFS | libc::ENOMEM)
            );
        }
        cur = err.source();
    }
    false
}

/// Headers that name a client's address or how it came, dropped from a
/// client that is no trusted proxy.
const CLIENT_ADDRESS_HEADERS: [&str; 12] = [
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-server",
    "x-forwarded-ssl",
    "x-forwarded-scheme",
    "x-real-ip",
    "true-client-ip",
    "x-client-ip",
];

/// `X-Forwarded-For`, `X-Forwarded-Proto`, `X-Forwarded-Host` and
/// `Forwarded` (RFC 7239) for the client at `peer`: the chains appended
/// to when the client is a trusted proxy, else begun here. (`Host` was
/// checked: a name, an IPv4 or a bracketed IPv6 address, and a port.)
fn forwarded(h: &mut HeaderMap, peer: SocketAddr, tls: bool, trusted: bool) {
    if !trusted {
        // What a client says of earlier hops is not believed: the chain
        // begins here.
        for n in CLIENT_ADDRESS_HEADERS {
            h.remove(n);
        }
    }
    let ip = peer.ip().to_canonical();
    let proto = if tls { "https" } else { "http" };
    let xff = match h.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        h.insert("x-forwarded-for", v);
    }
    h.insert(
        "x-forwarded-proto",
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
    match h.get(header::HOST).cloned() {
        Some(host) => h.insert("x-forwarded-host", host),
        None => h.remove("x-forwarded-host"),
    };
    let node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let mut fwd = format!("for={node};proto={proto}");
    if let Some(host) = h.get(header::HOST).and_then(|v| v.to_str().ok()) {
        fwd.push_str(&format!(";host=\"{}\"", host.replace(['"', '\\'], "")));
    }
    let all = match h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {fwd}"),
        None => fwd,
    };
    if let Ok(v) = HeaderValue::from_str(&all) {
        h.insert(header::FORWARDED, v);
    }
}

#[cfg(test)]
mod tests {
    use super::{normal_path, rule_view};

    /// Every spelling of a path a member would read as another is read as
    /// that one, or refused.
    #[test]
    fn paths_are_read_as_members_read_them() {
        for (p, want) in [
            ("/admin", Some("/admin")),
            ("//admin", Some("/admin")),
            ("/./admin", Some("/admin")),
            ("/x/../admin", Some("/admin")),
            ("/%61dmin", Some("/admin")),
            ("/a/b/", Some("/a/b/")),
            ("/a/b/..", Some("/a/")),
            ("/../../etc", Some("/etc")),
            ("/", Some("/")),
            ("/a%20b", Some("/a%20b")),
            ("/%2e%2e/admin", None),
            ("/a%2fb", None),
            ("/a\\b", None),
            ("/a%5cb", None),
            ("/a%zz", None),
            ("/a%0a", None),
            ("/caf\u{e9}/", Some("/caf\u{e9}/")),
            ("/manager;x/html", Some("/manager;x/html")),
            ("/x/..;/manager/html", None),
            ("/x/.;y/a", None),
            ("/a%3bb", None),
            ("/a%+5", None),
        ] {
            assert_eq!(normal_path(p).as_deref(), want, "{p}");
        }
        // Rules judge the path without the segments' parameters.
        assert_eq!(rule_view("/manager;jsessionid=1/html;x"), "/manager/html");
        assert_eq!(rule_view("/a/b"), "/a/b");
    }
}
