//! The topology page: HTML, script and the vendored layout library, the
//! graph as JSON, and its changes as server-sent events.
//!
//! Served over HTTPS with the controller's certificate (`--web-listen`).
//! Admins and supervisors get in two ways:
//! - a browser holding a client certificate of the cluster's CA;
//! - a one-time link from `sdnctl topology --web` (the `WebLogin` call,
//!   itself made with a certificate). Its secret is in the link's fragment,
//!   which browsers never send and link scanners never see: the login page's
//!   script posts it, and gets a session cookie (`__Host-`, `HttpOnly`,
//!   `Secure`, `SameSite=Strict`) that lasts [`SESSION_TTL`] or until the
//!   certificate that asked for the link expires, whichever comes first.
//!   A link is good once, within [`LOGIN_TTL`]. Sessions live in this
//!   replica's memory: a link works only on the replica that made it, and
//!   a restart ends them all.
//!
//! One task per replica builds the graph, once per change and at most
//! every [`DEBOUNCE`], only while a page is open, off the async workers;
//! every open page gets the same text. Names on the page come from
//! tenants, so the page writes text only as text (never as markup), and
//! the content security policy allows no script but the page's own files.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use sdn_proto::tls::{Identity, Peer, Role};
use sha2::{Digest, Sha256};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_stream::wrappers::WatchStream;

use crate::serve::EventBudget;
use crate::store::Store;
use crate::topology::Topology;

/// How long a login link stays good, unused.
pub const LOGIN_TTL: Duration = Duration::from_secs(120);
/// How long a session lasts at most.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Unused login links at once, in all and of one identity.
const LOGINS_MAX: usize = 256;
const LOGINS_PER_IDENTITY: usize = 8;
/// Sessions at once, in all and of one identity; a new one beyond either
/// ends the oldest of the same identity (or, beyond the total, the one
/// closest to its end).
const SESSIONS_MAX: usize = 1024;
const SESSIONS_PER_IDENTITY: usize = 16;
/// Event streams open at once; more get 503.
const STREAMS_MAX: usize = 256;
/// Page connections open at once, and from one address: one beyond is
/// closed at once, so that browsers (or anyone who reaches the page,
/// signed in or not) cannot take the file descriptors the replicas and
/// agents need.
const CONNECTIONS_MAX: usize = 512;
const CONNECTIONS_PER_ADDRESS: usize = 32;
/// How long a connection may take to send a request's headers, the first
/// or the next: an idle connection is closed after it.
const HEADER_READ: Duration = Duration::from_secs(10);
/// Changes within this time go to the pages together.
const DEBOUNCE: Duration = Duration::from_millis(100);
const COOKIE: &str = "__Host-sdn_session";
/// A secret is 64 hex digits.
const SECRET_LEN: usize = 64;

const INDEX: &str = include_str!("../web/index.html");
const LOGIN: &str = include_str!("../web/login.html");
const APP: &str = include_str!("../web/app.js");
const LOGIN_JS: &str = include_str!("../web/login.js");
const STYLE: &str = include_str!("../web/style.css");
const D3_HIERARCHY: &str = include_str!("../web/vendor/d3-hierarchy.min.js");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
                   base-uri 'none'; form-action 'none'; frame-ancestors 'none'; require-trusted-types-for 'script'";

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

/// Makes room for one more grant of `who`: drops the expired, then that
/// identity's oldest beyond `per_identity`; `false` if the total is at
/// `max` and nothing could go.
fn make_room(
    map: &mut HashMap<[u8; 32], Grant>,
    who: &Identity,
    per_identity: usize,
    max: usize,
    evict_any: bool,
) -> bool {
    let now = Instant::now();
    map.retain(|_, g| g.expires > now);
    let mut own: Vec<([u8; 32], Instant)> = map
        .iter()
        .filter(|(_, g)| g.identity == *who)
        .map(|(k, g)| (*k, g.expires))
        .collect();
    if own.len() >= per_identity {
        own.sort_by_key(|(_, e)| *e);
        for (k, _) in own.iter().take(own.len() + 1 - per_identity) {
            map.remove(k);
        }
    }
    if map.len() >= max {
        if !evict_any {
            return false;
        }
        if let Some(k) = map.iter().min_by_key(|(_, g)| g.expires).map(|(k, _)| *k) {
            map.remove(&k);
        }
    }
    true
}

impl Sessions {
    /// A one-time login secret for `identity`, good until `until` at most
    /// (its certificate's end).
    pub fn mint(&self, identity: Identity, until: Option<Instant>) -> Result<(String, Duration), String> {
        let now = Instant::now();
        let ttl = until.map_or(LOGIN_TTL, |u| LOGIN_TTL.min(u.saturating_duration_since(now)));
        if ttl.is_zero() {
            return Err("the certificate this call came with has expired".into());
        }
        let mut logins = self.logins.lock().unwrap_or_else(|p| p.into_inner());
        // An identity's unused links beyond its share: the oldest goes.
        if !make_room(&mut logins, &identity, LOGINS_PER_IDENTITY, LOGINS_MAX, false) {
            return Err(format!(
                "{LOGINS_MAX} login links are waiting to be used; try again when some have expired ({} s)",
                LOGIN_TTL.as_secs()
            ));
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
    fn redeem(&self, login: &str) -> Option<(String, Identity, Instant)> {
        let now = Instant::now();
        let grant = self
            .logins
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&digest(login))?;
        if grant.expires <= now {
            return None;
        }
        // A session lasts no longer than the certificate that asked for
        // the link.
        let expires = grant.until.map_or(now + SESSION_TTL, |u| u.min(now + SESSION_TTL));
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        make_room(
            &mut sessions,
            &grant.identity,
            SESSIONS_PER_IDENTITY,
            SESSIONS_MAX,
            true,
        );
        let s = secret();
        sessions.insert(
            digest(&s),
            Grant {
                identity: grant.identity.clone(),
                expires,
                until: grant.until,
            },
        );
        Some((s, grant.identity, expires))
    }

    /// The identity of a session, and when the session ends.
    fn session(&self, secret: &str) -> Option<(Identity, Instant)> {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let g = sessions.get(&digest(secret))?;
        (g.expires > Instant::now()).then(|| (g.identity.clone(), g.expires))
    }
}

/// The graph as the pages get it: built for a revision, shared.
#[derive(Clone)]
struct Graph {
    revision: u64,
    json: Arc<str>,
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
    streams: Arc<Semaphore>,
    /// The last graph built; its receivers are the open pages.
    graph: Arc<watch::Sender<Option<Graph>>>,
    /// A page opened: the graph may be older than the state.
    opened: Arc<Notify>,
}

impl Web {
    /// The page's state, and the task that builds the graph for it.
    pub fn new(store: Store, url: String, insecure: bool) -> Web {
        let web = Web {
            store,
            sessions: Default::default(),
            url,
            insecure,
            streams: Arc::new(Semaphore::new(STREAMS_MAX)),
            graph: Arc::new(watch::Sender::new(None)),
            opened: Arc::new(Notify::new()),
        };
        tokio::spawn(build_graphs(web.store.clone(), web.graph.clone(), web.opened.clone()));
        web
    }

    /// The roles that may read the page.
    pub const READERS: [Role; 2] = [Role::Admin, Role::Supervisor];
}

/// The graph of the store's state now, built off the async workers (the
/// state's read lock held meanwhile, so the graph is of one revision).
pub async fn topology(store: &Store) -> anyhow::Result<Topology> {
    let shared = store.shared.clone().read_owned().await;
    Ok(tokio::task::spawn_blocking(move || Topology::of(&shared.state, shared.revision)).await?)
}

/// Builds the graph after each change while a page is open, at most every
/// [`DEBOUNCE`]; sends it only if it changed.
async fn build_graphs(store: Store, graph: Arc<watch::Sender<Option<Graph>>>, opened: Arc<Notify>) {
    let mut revisions = store.revisions.clone();
    loop {
        tokio::select! {
            r = revisions.changed() => if r.is_err() { return },
            _ = opened.notified() => {}
        }
        if graph.receiver_count() == 0 {
            // No page is open: the next one to open wakes this.
            continue;
        }
        tokio::time::sleep(DEBOUNCE).await;
        let current = *revisions.borrow_and_update();
        if graph.borrow().as_ref().is_some_and(|g| g.revision == current) {
            continue;
        }
        let built = match topology(&store).await {
            Ok(t) => serde_json::to_string(&t).map(|j| (t.revision, j)),
            Err(e) => {
                tracing::error!(error = %e, "building the topology");
                continue;
            }
        };
        match built {
            Ok((revision, json)) => {
                graph.send_if_modified(|g| match g {
                    Some(old) if *old.json == *json => {
                        old.revision = revision;
                        false
                    }
                    _ => {
                        *g = Some(Graph {
                            revision,
                            json: json.into(),
                        });
                        true
                    }
                });
            }
            Err(e) => tracing::error!(error = %e, "encoding the topology"),
        }
    }
}

/// A connection's peer, as the handlers see it.
#[derive(Clone)]
pub struct WebPeer(pub Peer);

/// Who may read, until when.
struct Access {
    /// `None`: `--insecure`, no one asked.
    until: Option<Instant>,
}

/// Who may read, or the answer to give instead.
fn authorize(web: &Web, peer: &Peer, headers: &HeaderMap) -> Result<Access, Response> {
    if web.insecure {
        return Ok(Access { until: None });
    }
    let from = from(peer);
    let (identity, until) = match &peer.identity {
        Some(id) => {
            if peer.expires.is_some_and(|e| Instant::now() >= e) {
                return Err(refused(
                    StatusCode::UNAUTHORIZED,
                    &from,
                    &peer.actor(),
                    "the client certificate expired",
                ));
            }
            (id.clone(), peer.expires)
        }
        None => match cookie(headers).and_then(|s| web.sessions.session(&s)) {
            Some((id, until)) => (id, Some(until)),
            None => {
                if cookie(headers).is_some() {
                    return Err(refused(
                        StatusCode::UNAUTHORIZED,
                        &from,
                        "unknown",
                        "no such session: it ended, or was never made here",
                    ));
                }
                return Err(page(
                    StatusCode::UNAUTHORIZED,
                    "Not signed in",
                    "Open the link that `sdnctl topology --web` prints (it works once, for two minutes), \
                     or come with a client certificate of the cluster's CA.",
                ));
            }
        },
    };
    if !Web::READERS.contains(&identity.role) {
        crate::refusals::note(
            &identity.uri(),
            identity.role.name(),
            "reading the topology page",
            identity.tenant.as_deref(),
        );
        return Err(refused(
            StatusCode::FORBIDDEN,
            &from,
            &identity.uri(),
            "only admins and supervisors read the topology",
        ));
    }
    Ok(Access { until })
}

fn from(peer: &Peer) -> String {
    peer.remote
        .map(|r| r.ip().to_string())
        .unwrap_or_else(|| "unknown".into())
}

/// A refusal, logged as a security event (within a budget a second).
fn refused(code: StatusCode, from: &str, who: &str, why: &str) -> Response {
    static BUDGET: EventBudget = EventBudget::new();
    if let Some(suppressed) = BUDGET.admit() {
        tracing::warn!(target: "sdn::security", from, caller = who, reason = why, suppressed, "topology page refused");
    }
    let mut r = page(code, "Refused", why);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
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
    h.insert("cross-origin-resource-policy", HeaderValue::from_static("same-origin"));
    h.insert("cross-origin-opener-policy", HeaderValue::from_static("same-origin"));
    h.insert(
        "strict-transport-security",
        HeaderValue::from_static("max-age=31536000"),
    );
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
                match topology(&web.store).await.and_then(|t| Ok(serde_json::to_string(&t)?)) {
                    Ok(body) => hardened(([(header::CONTENT_TYPE, "application/json")], body).into_response()),
                    Err(e) => page(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Error",
                        &format!("building the topology: {e}"),
                    ),
                }
            }
        }
    };
    let events = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, headers: HeaderMap| {
            let web = web.clone();
            async move { events(web, peer, headers) }
        }
    };
    let login = {
        let web = web.clone();
        move |ConnectInfo(WebPeer(peer)): ConnectInfo<WebPeer>, headers: HeaderMap, body: String| {
            let web = web.clone();
            async move { login(&web, &peer, &headers, &body) }
        }
    };
    axum::Router::new()
        .route("/", get(index))
        .route("/topology.json", get(json))
        .route("/events", get(events))
        .route(
            "/login",
            get(|uri: Uri| async move {
                if uri.query().is_some() {
                    return page(
                        StatusCode::BAD_REQUEST,
                        "Not a login link",
                        "Open the link exactly as `sdnctl topology --web` printed it.",
                    );
                }
                asset("text/html; charset=utf-8", LOGIN)
            })
            .post(login),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/login.js",
            get(|| async { asset("text/javascript; charset=utf-8", LOGIN_JS) }),
        )
        .route("/style.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route(
            "/vendor/d3-hierarchy.min.js",
            get(|| async { asset("text/javascript; charset=utf-8", D3_HIERARCHY) }),
        )
        .fallback(|| async { page(StatusCode::NOT_FOUND, "Not found", "There is no such page.") })
}

/// The login page's script posts the link's secret here.
fn login(web: &Web, peer: &Peer, headers: &HeaderMap, body: &str) -> Response {
    let from = from(peer);
    // Only the page's own script posts: a page of another site cannot
    // sign a browser in to a session of its choosing.
    let cross_site = headers
        .get("sec-fetch-site")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v != "same-origin");
    if cross_site {
        return refused(
            StatusCode::FORBIDDEN,
            &from,
            "unknown",
            "a login posted from another site",
        );
    }
    let token = body.trim();
    if token.len() != SECRET_LEN || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return refused(StatusCode::BAD_REQUEST, &from, "unknown", "not a login secret");
    }
    match web.sessions.redeem(token) {
        Some((session, identity, expires)) => {
            tracing::info!(target: "sdn::security", from, caller = %identity.uri(), "signed in to the topology page");
            let mut r = hardened(StatusCode::NO_CONTENT.into_response());
            let max_age = expires.saturating_duration_since(Instant::now()).as_secs();
            let c = format!("{COOKIE}={session}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={max_age}");
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

/// The graph now, then again after each change, until the session or the
/// certificate ends.
fn events(web: Web, peer: Peer, headers: HeaderMap) -> Response {
    let access = match authorize(&web, &peer, &headers) {
        Ok(a) => a,
        Err(r) => return r,
    };
    let Ok(permit) = web.streams.clone().try_acquire_owned() else {
        return page(
            StatusCode::SERVICE_UNAVAILABLE,
            "Busy",
            "Too many pages are open on this replica; close some and reload.",
        );
    };
    let graphs = WatchStream::new(web.graph.subscribe());
    // The graph may be of an older revision than the state (none was
    // built while no page was open).
    web.opened.notify_one();
    let end = async move {
        match access.until {
            Some(t) => tokio::time::sleep_until(t.into()).await,
            None => std::future::pending().await,
        }
    };
    let stream = graphs
        .filter_map(|g| {
            std::future::ready(g.map(|g| Ok::<_, Infallible>(Event::default().event("topology").data(&*g.json))))
        })
        .take_until(end)
        // The permit goes with the stream.
        .map(move |e| {
            let _ = &permit;
            e
        });
    hardened(
        Sse::new(stream)
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
    )
}

/// Serves the page on `listener` until the process ends: HTTP/1.1 on each
/// authenticated connection (TLS, a client certificate optional; plain
/// under `--insecure`).
pub async fn serve(
    listeners: crate::serve::Listeners,
    listener: tokio::net::TcpListener,
    web: Web,
) -> std::io::Result<()> {
    let mut conns = Box::pin(listeners.tcp(listener));
    let app = router(web);
    let open = Arc::new(Semaphore::new(CONNECTIONS_MAX));
    let per_address = crate::serve::PerAddress::new(CONNECTIONS_PER_ADDRESS);
    static BUDGET: EventBudget = EventBudget::new();
    while let Some(c) = conns.next().await {
        let c = match c {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "accepting a topology page connection");
                continue;
            }
        };
        let peer = c.peer().clone();
        let places = open
            .clone()
            .try_acquire_owned()
            .ok()
            .zip(per_address.take(peer.remote.map(|r| r.ip())));
        let Some(places) = places else {
            if let Some(suppressed) = BUDGET.admit() {
                tracing::warn!(
                    target: "sdn::security",
                    from = %from(&peer),
                    suppressed,
                    "topology page connection closed: too many are open ({CONNECTIONS_MAX} in all, \
                     {CONNECTIONS_PER_ADDRESS} from one address)"
                );
            }
            continue;
        };
        let svc =
            tower::ServiceExt::map_request(app.clone(), move |mut r: axum::http::Request<hyper::body::Incoming>| {
                r.extensions_mut().insert(ConnectInfo(WebPeer(peer.clone())));
                r
            });
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ)
                .serve_connection(
                    hyper_util::rt::TokioIo::new(c),
                    hyper_util::service::TowerToHyperService::new(svc),
                )
                .await;
            drop(places);
            if let Err(e) = served {
                tracing::debug!(error = %e, "a topology page connection ended");
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(uri: &str) -> Identity {
        Identity::parse_uri(uri).unwrap()
    }

    #[test]
    fn a_login_link_works_once_and_becomes_a_session() {
        let s = Sessions::default();
        let (token, ttl) = s.mint(id("sdn://admin/ops"), None).unwrap();
        assert_eq!(ttl, LOGIN_TTL);
        assert_eq!(token.len(), SECRET_LEN);
        assert!(s.session(&token).is_none(), "a login secret is not a session");
        let (session, who, _) = s.redeem(&token).expect("the first use");
        assert_eq!(who.uri(), "sdn://admin/ops");
        assert!(s.redeem(&token).is_none(), "a second use");
        assert_eq!(s.session(&session).unwrap().0.uri(), "sdn://admin/ops");
        assert!(s.session(&token).is_none());
        assert!(s.session("00").is_none());
    }

    #[test]
    fn links_and_sessions_are_bounded_per_identity_and_end_with_the_certificate() {
        let s = Sessions::default();
        let soon = Instant::now() + Duration::from_secs(5);
        let (token, ttl) = s.mint(id("sdn://admin/ops"), Some(soon)).unwrap();
        assert!(ttl <= Duration::from_secs(5));
        let (_, _, ends) = s.redeem(&token).unwrap();
        assert!(ends <= soon);
        assert!(
            s.mint(id("sdn://admin/ops"), Some(Instant::now())).is_err(),
            "an expired certificate"
        );
        // One identity's links: the oldest go beyond its share, and the
        // others' are untouched.
        let (other, _) = s.mint(id("sdn://supervisor/reg"), None).unwrap();
        let first = s.mint(id("sdn://admin/ops"), None).unwrap().0;
        for _ in 0..LOGINS_PER_IDENTITY {
            s.mint(id("sdn://admin/ops"), None).unwrap();
        }
        assert!(s.redeem(&first).is_none(), "the oldest link of the identity went");
        assert!(s.redeem(&other).is_some(), "another identity's link stays");
        // Sessions likewise.
        let mut sessions = Vec::new();
        for _ in 0..SESSIONS_PER_IDENTITY + 1 {
            let (t, _) = s.mint(id("sdn://admin/ops"), None).unwrap();
            sessions.push(s.redeem(&t).unwrap().0);
        }
        assert!(
            s.session(&sessions[0]).is_none(),
            "the oldest session of the identity ended"
        );
        assert!(s.session(sessions.last().unwrap()).is_some());
    }

    #[test]
    fn links_in_all_are_bounded() {
        let s = Sessions::default();
        for i in 0..LOGINS_MAX {
            s.mint(id(&format!("sdn://admin/a{i}")), None).unwrap();
        }
        let e = s.mint(id("sdn://admin/late"), None).unwrap_err();
        assert!(e.contains("waiting to be used"), "{e}");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; __Host-sdn_session=abc; b=2"),
        );
        assert_eq!(cookie(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("sdn_session=abc"));
        assert_eq!(cookie(&h), None);
    }
}
