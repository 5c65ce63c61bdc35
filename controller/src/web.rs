//! The topology page: HTML, script and the vendored layout library, the
//! graph as JSON, and its changes as server-sent events (each a whole
//! graph, sent when an applied batch changed the revision).
//!
//! Served over HTTPS with the controller's certificate (`--web-listen`).
//! Admins and supervisors get in two ways:
//! - a browser holding a client certificate of the cluster's CA;
//! - a one-time link from `sdnctl topology --web` (the `WebLogin` call,
//!   itself made with a certificate): the link's token, used once within
//!   [`LOGIN_TTL`], becomes a session cookie (`HttpOnly`, `Secure`,
//!   `SameSite=Strict`) that lasts [`SESSION_TTL`], or until the
//!   certificate that asked for it expires, whichever comes first.
//!   Sessions live in this replica's memory: a link works only on the
//!   replica that made it, and a restart ends them all.
//!
//! Names on the page come from tenants, so the page writes text only as
//! text (never as markup), and the content security policy allows no
//! script but the page's own files.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::{Stream, StreamExt};
use sdn_proto::tls::{Identity, Peer, Role};
use sha2::{Digest, Sha256};
use tokio_stream::wrappers::WatchStream;

use crate::store::Store;
use crate::topology::Topology;

/// How long a login link stays good, unused.
pub const LOGIN_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts at most.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Unused login links at once; more are refused until some expire.
const LOGINS_MAX: usize = 256;
/// Sessions at once; the one closest to expiring makes room for a new one.
const SESSIONS_MAX: usize = 1024;
/// Event streams open at once; more get 503.
const STREAMS_MAX: usize = 256;
const COOKIE: &str = "sdn_session";

const INDEX: &str = include_str!("../web/index.html");
const APP: &str = include_str!("../web/app.js");
const STYLE: &str = include_str!("../web/style.css");
const D3_HIERARCHY: &str = include_str!("../web/vendor/d3-hierarchy.min.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

struct Grant {
    identity: Identity,
    expires: Instant,
    /// When the certificate that asked for it expires, if known.
    until: Option<Instant>,
}

/// Login links and sessions, by the SHA-256 of their secret.
#[derive(Default)]
pub struct Sessions {
    logins: Mutex<HashMap<[u8; 32], Grant>>,
    sessions: Mutex<HashMap<[u8; 32], Grant>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn secret() -> String {
    let mut b = [0u8; 32];
    boring::rand::rand_bytes(&mut b).expect("the system's random source");
    sdn_proto::audit::hex(&b)
}

impl Sessions {
    /// A one-time login secret for `identity`, good until `until` at most
    /// (its certificate's end).
    pub fn mint(&self, identity: Identity, until: Option<Instant>) -> Result<(String, Duration), String> {
        let now = Instant::now();
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        logins.retain(|_, g| g.expires > now);
        if logins.len() >= LOGINS_MAX {
            return Err(format!(
                "{LOGINS_MAX} login links are waiting to be used; try again when some have expired ({} s)",
                LOGIN_TTL.as_secs()
            ));
        }
        let ttl = until.map_or(LOGIN_TTL, |u| LOGIN_TTL.min(u.saturating_duration_since(now)));
        if ttl.is_zero() {
            return Err("the certificate this call came with has expired".into());
        }
        let s = secret();
        logins.insert(
            digest(&s),
            Grant {
                identity,
                expires: now + ttl,
                until,
            },
        );
        Ok((s, ttl))
    }

    /// Turns a login secret into a session secret; `None` if the secret
    /// is unknown, used or expired.
    fn redeem(&self, login: &str) -> Option<(String, Identity)> {
        let now = Instant::now();
        let grant = self.logins.lock().unwrap_or_else(|p| p.into_inner()).remove(&digest(login))?;
        if grant.expires <= now {
            return None;
        }
        // A session lasts no longer than the certificate that asked for
        // the link.
        let expires = grant.until.map_or(now + SESSION_TTL, |u| u.min(now + SESSION_TTL));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.retain(|_, g| g.expires > now);
        if sessions.len() >= SESSIONS_MAX {
            if let Some(k) = sessions.iter().min_by_key(|(_, g)| g.expires).map(|(k, _)| *k) {
                sessions.remove(&k);
            }
        }
        let s = secret();
        sessions.insert(
            digest(&s),
            Grant {
                identity: grant.identity.clone(),
                expires,
                until: grant.until,
            },
        );
        Some((s, grant.identity))
    }

    fn session(&self, secret: &str) -> Option<Identity> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let g = sessions.get(&digest(secret))?;
        (g.expires > Instant::now()).then(|| g.identity.clone())
    }
}

/// The page's state.
#[derive(Clone)]
pub struct Web {
    pub store: Store,
    pub sessions: Arc<Sessions>,
    /// The address browsers reach the page at, as links give it.
    pub url: String,
    /// Plain HTTP, no authentication (`--insecure`).
    pub insecure: bool,
    streams: Arc<tokio::sync::Semaphore>,
}

impl Web {
    pub fn new(store: Store, url: String, insecure: bool) -> Web {
        Web {
            store,
            sessions: Default::default(),
            url,
            insecure,
            streams: Arc::new(tokio::sync::Semaphore::new(STREAMS_MAX)),
        }
    }

    /// The roles that may read the page.
    pub const READERS: [Role; 2] = [Role::Admin, Role::Supervisor];

    /// The current graph.
    pub async fn topology(&self) -> Topology {
        let shared = self.store.shared.read().await;
        Topology::of(&shared.state, shared.revision)
    }
}

/// A connection's peer, as the router sees it.
#[derive(Clone)]
pub struct WebPeer(pub Peer);

impl std::fmt::Debug for WebPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.0.identity, self.0.remote) {
            (Some(id), Some(r)) => write!(f, "{} ({r})", id.uri()),
            _ => write!(f, "{}", self.0.actor()),
        }
    }
}

/// The web listener's connections: TLS (with or without a client
/// certificate) or, under `--insecure`, plain; at most [`CONNECTIONS_MAX`]
/// at once, so that browsers (or anyone who reaches the page, signed in or
/// not) cannot take the file descriptors the replicas and agents need.
pub struct WebListener<S> {
    pub conns: S,
    pub local: SocketAddr,
    open: Arc<tokio::sync::Semaphore>,
}

/// Page connections open at once; one beyond is closed at once.
const CONNECTIONS_MAX: usize = 512;

/// A connection that gives its place back when it closes.
pub struct Counted<IO> {
    io: IO,
    _place: tokio::sync::OwnedSemaphorePermit,
}

impl<IO: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S> axum::serve::Listener for WebListener<S>
where
    S: Stream<Item = std::io::Result<crate::serve::Conn<tokio::net::TcpStream>>> + Unpin + Send + 'static,
{
    type Io = Counted<crate::serve::Conn<tokio::net::TcpStream>>;
    type Addr = WebPeer;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            match self.conns.next().await {
                Some(Ok(c)) => {
                    let peer = c.peer().clone();
                    let Ok(place) = self.open.clone().try_acquire_owned() else {
                        tracing::warn!(
                            target: "sdn::security",
                            from = ?WebPeer(peer),
                            "topology page connection closed: {CONNECTIONS_MAX} are open"
                        );
                        continue;
                    };
                    return (Counted { io: c, _place: place }, WebPeer(peer));
                }
                Some(Err(e)) => tracing::warn!(error = %e, "accepting a web connection"),
                // The accept loop ended: no more connections.
                None => std::future::pending::<()>().await,
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(WebPeer(Peer {
            identity: None,
            remote: Some(self.local),
            uid: None,
            expires: None,
        }))
    }
}

impl<S> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, WebListener<S>>> for WebPeer
where
    WebListener<S>: axum::serve::Listener<Addr = WebPeer>,
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, WebListener<S>>) -> Self {
        stream.remote_addr().clone()
    }
}

/// Who may read, or the answer to give instead.
fn authorize(web: &Web, peer: &Peer, headers: &HeaderMap) -> Result<Option<Identity>, Response> {
    if web.insecure {
        return Ok(None);
    }
    let from = peer.remote.map(|r| r.ip().to_string()).unwrap_or_else(|| "unknown".into());
    let identity = match &peer.identity {
        Some(id) => {
            if peer.expires.is_some_and(|e| Instant::now() >= e) {
                return Err(refused(StatusCode::UNAUTHORIZED, &from, &peer.actor(), "the client certificate expired"));
            }
            id.clone()
        }
        None => match cookie(headers).and_then(|s| web.sessions.session(&s)) {
            Some(id) => id,
            None => {
                return Err(page(
                    StatusCode::UNAUTHORIZED,
                    "Not signed in",
                    "Open the link that `sdnctl topology --web` prints (it works once, for two minutes), \
                     or come with a client certificate of the cluster's CA.",
                ))
            }
        },
    };
    if !Web::READERS.contains(&identity.role) {
        crate::refusals::note(&identity.uri(), identity.role.name(), "reading the topology page", identity.tenant.as_deref());
        return Err(refused(
            StatusCode::FORBIDDEN,
            &from,
            &identity.uri(),
            "only admins and supervisors read the topology",
        ));
    }
    Ok(Some(identity))
}

fn refused(code: StatusCode, from: &str, who: &str, why: &str) -> Response {
    tracing::warn!(target: "sdn::security", from, caller = who, reason = why, "topology page refused");
    page(code, "Refused", why)
}

fn cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v.to_string())
}

/// Headers every answer carries.
fn hardened(mut r: Response) -> Response {
    let h = r.headers_mut();
    h.insert("content-security-policy", HeaderValue::from_static(CSP));
    h.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    h.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A short page saying why; the text is ours, never the request's.
fn page(code: StatusCode, title: &str, text: &str) -> Response {
    let body = format!(
        "<!doctype html><meta charset=utf-8><title>{title}</title><h1>{title}</h1><p>{}</p>",
        text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
    );
    hardened((code, [(header::CONTENT_TYPE, "text/html; charset=utf-8")], body).into_response())
}

fn asset(kind: &'static str, body: &'static str) -> Response {
    hardened(([(header::CONTENT_TYPE, kind)], body).into_response())
}

/// The page's routes.
pub fn router(web: Web) -> axum::Router {
    let index = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, headers: HeaderMap| {
            let web = web.clone();
            async move {
                match authorize(&web, &peer, &headers) {
                    Ok(_) => asset("text/html; charset=utf-8", INDEX),
                    Err(r) => r,
                }
            }
        }
    };
    let json = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, headers: HeaderMap| {
            let web = web.clone();
            async move {
                if let Err(r) = authorize(&web, &peer, &headers) {
                    return r;
                }
                let t = web.topology().await;
                match serde_json::to_string(&t) {
                    Ok(body) => hardened(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
                    Err(e) => page(StatusCode::INTERNAL_SERVER_ERROR, "Error", &format!("encoding the topology: {e}")),
                }
            }
        }
    };
    let events = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, headers: HeaderMap| {
            let web = web.clone();
            async move { events(web, peer, headers).await }
        }
    };
    let login = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, uri: Uri| {
            let web = web.clone();
            async move { login(&web, &peer, &uri) }
        }
    };
    axum::Router::new()
        .route("/", get(index))
        .route("/topology.json", get(json))
        .route("/events", get(events))
        .route("/login", get(login))
        .route("/app.js", get(|| async { asset("text/javascript; charset=utf-8", APP) }))
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route(
            "/vendor/d3-hierarchy.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", D3_HIERARCHY) }),
        )
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not found", "There is no such page.") })
}

fn login(web: &Web, peer: &Peer, uri: &Uri) -> Response {
    let from = peer.remote.map(|r| r.ip().to_string()).unwrap_or_else(|| "unknown".into());
    let token = uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == "token")
        .map(|(_, v)| v);
    let Some(token) = token else {
        return page(StatusCode::BAD_REQUEST, "No token", "The link lacks its token.");
    };
    match web.sessions.redeem(token) {
        Some((session, identity)) => {
            tracing::info!(target: "sdn::security", from, caller = %identity.uri(), "signed in to the topology page");
            let mut r = hardened((StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response());
            let c = format!("{COOKIE}={session}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}", SESSION_TTL.as_secs());
            if let Ok(v) = HeaderValue::from_str(&c) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        None => refused(
            StatusCode::UNAUTHORIZED,
            &from,
            "unknown",
            "this link is not valid: it was used already, has expired, or was made by another replica",
        ),
    }
}

/// The graph now, then again after each change, while the caller may
/// still read it.
async fn events(web: Web, peer: Peer, headers: HeaderMap) -> Response {
    if let Err(r) = authorize(&web, &peer, &headers) {
        return r;
    }
    let Ok(permit) = web.streams.clone().try_acquire_owned() else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Too many pages are open on this replica; close some and reload.",
        );
    };
    let revisions = WatchStream::new(web.store.revisions.clone());
    let stream = revisions
        .then(move |_| {
            let (web, peer, headers) = (web.clone(), peer.clone(), headers.clone());
            async move {
                // A session that ended, or a certificate that expired,
                // ends the stream.
                if authorize(&web, &peer, &headers).is_err() {
                    return None;
                }
                let t = web.topology().await;
                Some(serde_json::to_string(&t).map(|j| Event::default().event("topology").data(j)))
            }
        })
        .take_while(|e| std::future::ready(e.is_some()))
        .filter_map(|e| async move {
            match e {
                Some(Ok(ev)) => Some(Ok::<_, Infallible>(ev)),
                Some(Err(err)) => {
                    tracing::error!(error = %err, "encoding the topology");
                    None
                }
                None => None,
            }
        })
        // The permit goes with the stream.
        .map(move |e| {
            let _ = &permit;
            e
        });
    hardened(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response())
}

/// Serves the page on `listener` until the process ends.
pub async fn serve(listeners: crate::serve::Listeners, listener: tokio::net::TcpListener, web: Web) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let conns = Box::pin(listeners.tcp(listener));
    let app = router(web).into_make_service_with_connect_info::<WebPeer>();
    let open = Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX));
    axum::serve(WebListener { conns, local, open }, app).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> Identity {
        Identity::parse_uri("sdn://admin/ops").unwrap()
    }

    #[test]
    fn a_login_link_works_once_and_becomes_a_session() {
        let s = Sessions::default();
        let (token, ttl) = s.mint(admin(), None).unwrap();
        assert_eq!(ttl, LOGIN_TTL);
        assert!(s.session(&token).is_none(), "a login secret is not a session");
        let (session, id) = s.redeem(&token).expect("the first use");
        assert_eq!(id.uri(), "sdn://admin/ops");
        assert!(s.redeem(&token).is_none(), "a second use");
        assert_eq!(s.session(&session).unwrap().uri(), "sdn://admin/ops");
        assert!(s.session(&token).is_none());
        assert!(s.session("00").is_none());
    }

    #[test]
    fn links_are_bounded_and_end_with_the_certificate() {
        let s = Sessions::default();
        let soon = Instant::now() + Duration::from_secs(5);
        let (token, ttl) = s.mint(admin(), Some(soon)).unwrap();
        assert!(ttl <= Duration::from_secs(5));
        let (session, _) = s.redeem(&token).unwrap();
        let g = s.sessions.lock().unwrap();
        assert!(g.get(&digest(&session)).unwrap().expires <= soon + Duration::from_millis(10));
        drop(g);
        assert!(s.mint(admin(), Some(Instant::now())).is_err(), "an expired certificate");
        for _ in 0..LOGINS_MAX {
            s.mint(admin(), None).unwrap();
        }
        let e = s.mint(admin(), None).unwrap_err();
        assert!(e.contains("waiting to be used"), "{e}");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; sdn_session=abc; b=2"));
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("sdn_sessionx=abc"));
        assert_eq!(cookie(&h), None);
    }
}
