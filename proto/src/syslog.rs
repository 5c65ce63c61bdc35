//! Security events as syslog messages (RFC 5424), sent to receivers over
//! UDP (RFC 5426), TCP with octet counting (RFC 6587) or TLS (RFC 5425).
//!
//! A message carries the event's fields as structured data under one
//! SD-ID (`sdn@PEN`), so a receiver reads them by name, and a short text
//! for people. Each receiver has its own bounded queue and task: a receiver
//! that is slow or down loses messages (counted), never holds up the
//! process that sends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncWrite, AsyncWriteExt};

/// A message is cut to this many bytes (the text goes first).
pub const MESSAGE_MAX: usize = 8192;
/// Messages each receiver's queue holds.
pub const QUEUE: usize = 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const WRITE_TIMEOUT: Duration = Duration::from_secs(3);
/// After a failed connection, messages are dropped (and counted) for this
/// long before the next attempt.
const RETRY_AFTER: Duration = Duration::from_secs(1);

/// How messages reach a receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// A syslog receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receiver {
    pub transport: Transport,
    pub addr: SocketAddr,
}

impl std::str::FromStr for Receiver {
    type Err = String;

    /// `udp://ADDRESS:PORT`, `tcp://ADDRESS:PORT` or `tls://ADDRESS:PORT`.
    fn from_str(s: &str) -> Result<Receiver, String> {
        let (transport, rest) = match s.split_once("://") {
            Some(("udp", r)) => (Transport::Udp, r),
            Some(("tcp", r)) => (Transport::Tcp, r),
            Some(("tls", r)) => (Transport::Tls, r),
            _ => return Err(format!("{s:?}: not udp://, tcp:// or tls://ADDRESS:PORT")),
        };
        let addr = rest
            .parse()
            .map_err(|e| format!("{s:?}: {rest:?} is not an address and port ({e})"))?;
        Ok(Receiver { transport, addr })
    }
}

impl std::fmt::Display for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = match self.transport {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
        };
        write!(f, "{t}://{}", self.addr)
    }
}

/// How TLS receivers are checked.
#[derive(Clone, Debug)]
pub struct TlsSettings {
    /// The CA that issued the receivers' certificates.
    pub ca: PathBuf,
    /// The name (DNS name or IP address) a receiver's certificate must carry.
    pub name: String,
    /// This party's own certificate and key, presented when asked.
    pub own: Option<(PathBuf, PathBuf)>,
}

/// The flags of a process that sends events.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct SyslogArgs {
    /// Send security events as syslog (RFC 5424) to this receiver:
    /// udp://ADDRESS:PORT, tcp://ADDRESS:PORT (octet counting, RFC 6587)
    /// or tls://ADDRESS:PORT (RFC 5425); repeat or separate with commas.
    #[arg(id = "syslog_receivers", long = "syslog", value_delimiter = ',')]
    pub receivers: Vec<Receiver>,
    /// The CA that issued the TLS receivers' certificates.
    #[arg(id = "syslog_tls_ca", long = "syslog-tls-ca")]
    pub tls_ca: Option<PathBuf>,
    /// The name a TLS receiver's certificate must carry (a DNS name or an
    /// IP address); by default the receiver's address.
    #[arg(id = "syslog_tls_name", long = "syslog-tls-name")]
    pub tls_name: Option<String>,
    /// Events sent per second at most (refusals of callers, already
    /// grouped by the controller, are not limited); the rest are counted
    /// and said in a summary event.
    #[arg(id = "syslog_rate", long = "syslog-rate", default_value_t = 50)]
    pub per_sec: u32,
    /// The private enterprise number of the events' structured data
    /// (`sdn@PEN`).
    #[arg(id = "syslog_pen", long = "syslog-pen", default_value_t = 32473)]
    pub pen: u32,
}

impl SyslogArgs {
    /// The sender, if any receiver is given; `own`: the certificate and key
    /// this party presents to TLS receivers that ask.
    pub fn start(&self, hostname: &str, app: &str, own: Option<(PathBuf, PathBuf)>) -> Result<Option<Syslog>, String> {
        if self.receivers.is_empty() {
            return Ok(None);
        }
        let tls = self.tls_ca.as_ref().map(|ca| TlsSettings {
            ca: ca.clone(),
            name: self.tls_name.clone().unwrap_or_default(),
            own,
        });
        Syslog::start(&self.receivers, tls, Origin::new(hostname, app, self.pen)).map(Some)
    }
}

/// Severity (RFC 5424 6.2.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Alert = 1,
    Critical = 2,
    Error = 3,
    Warning = 4,
    Notice = 5,
    Informational = 6,
}

/// Facility: security/authorization messages.
pub const FACILITY_AUTH: u8 = 4;
/// Facility: system daemons (measurements, such as bandwidth peaks).
pub const FACILITY_DAEMON: u8 = 3;
/// Facility: log audit.
pub const FACILITY_AUDIT: u8 = 13;

/// One event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    pub facility: u8,
    pub severity: Severity,
    /// What happened, as a short token (`MSGID`: at most 32 printable
    /// characters), e.g. `quarantine`, `spoof`, `auth_refused`.
    pub kind: &'static str,
    /// Unix milliseconds.
    pub time_ms: u64,
    /// The fields, by name (SD-PARAM names: at most 32 printable characters,
    /// no `=`, space, `]` or `"`).
    pub fields: Vec<(&'static str, String)>,
    /// For people.
    pub text: String,
}

/// Who sends: HOSTNAME, APP-NAME, PROCID, and the SD-ID of the fields.
#[derive(Clone, Debug)]
pub struct Origin {
    pub hostname: String,
    pub app: String,
    pub procid: String,
    pub sd_id: String,
}

impl Origin {
    /// This process, named `hostname`, its fields under `sdn@PEN`.
    pub fn new(hostname: &str, app: &str, pen: u32) -> Origin {
        Origin {
            hostname: header_token(hostname, 255),
            app: header_token(app, 48),
            procid: std::process::id().to_string(),
            sd_id: format!("sdn@{pen}"),
        }
    }
}

/// This machine's host name.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let r = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if r != 0 {
        return "-".into();
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// A header field: printable US-ASCII without spaces, at most `max`
/// characters; `-` when empty.
fn header_token(s: &str, max: usize) -> String {
    let t: String = s.chars().filter(|c| c.is_ascii_graphic()).take(max).collect();
    if t.is_empty() {
        "-".into()
    } else {
        t
    }
}

/// A value is cut to this many bytes, so every field of an event fits.
pub const VALUE_MAX: usize = 1024;

/// Characters that change how text around them is shown (bidirectional
/// overrides, invisible joiners, line separators): written as escapes, so
/// what a viewer shows is what the event says.
pub fn deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200b}'..='\u{200f}' | '\u{2028}'..='\u{202e}' | '\u{2060}'..='\u{2069}' | '\u{feff}'
        )
}

/// A parameter value: `"`, `\` and `]` escaped (RFC 5424 6.3.3), control
/// and deceptive characters shown as `\u{..}` so no value can end the
/// message early or disguise itself; at most [`VALUE_MAX`] bytes.
fn param_value(v: &str, out: &mut String) {
    let start = out.len();
    for c in v.chars() {
        if out.len() - start >= VALUE_MAX {
            out.push_str("...");
            break;
        }
        match c {
            '"' | '\\' | ']' => {
                out.push('\\');
                out.push(c);
            }
            c if deceptive(c) => out.push_str(&c.escape_unicode().to_string()),
            c => out.push(c),
        }
    }
}

/// The message of `e` from `o` (RFC 5424 6).
pub fn format(o: &Origin, e: &Event) -> String {
    let pri = u32::from(e.facility.min(23)) * 8 + e.severity as u32;
    let mut s = format!(
        "<{pri}>1 {} {} {} {} {} [{}",
        crate::audit::rfc3339(e.time_ms),
        o.hostname,
        o.app,
        o.procid,
        header_token(e.kind, 32),
        o.sd_id
    );
    for (k, v) in &e.fields {
        s.push(' ');
        s.push_str(&header_token(&k.replace(['=', ']', '"'], "_"), 32));
        s.push_str("=\"");
        param_value(v, &mut s);
        s.push('"');
    }
    s.push(']');
    if !e.text.is_empty() && s.len() + 4 < MESSAGE_MAX {
        // A UTF-8 text starts with the byte order mark (6.4).
        s.push_str(" \u{feff}");
        for c in e.text.chars() {
            if deceptive(c) {
                s.push(' ');
            } else {
                s.push(c);
            }
        }
    }
    // Only the text is ever cut: the structured data is whole (each value
    // is bounded, and fields are few).
    if s.len() > MESSAGE_MAX {
        let mut cut = MESSAGE_MAX;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// What the senders have done, over every receiver.
#[derive(Debug, Default)]
pub struct Stats {
    pub sent: AtomicU64,
    /// Lost to a full queue, a failed connection, or a receiver down.
    pub dropped: AtomicU64,
}

/// Sends events to every receiver.
#[derive(Clone)]
pub struct Syslog {
    origin: Arc<Origin>,
    queues: Vec<tokio::sync::mpsc::Sender<Arc<String>>>,
    pub stats: Arc<Stats>,
}

impl Syslog {
    /// A task per receiver. TLS receivers need `tls`.
    pub fn start(receivers: &[Receiver], tls: Option<TlsSettings>, origin: Origin) -> Result<Syslog, String> {
        let stats = Arc::new(Stats::default());
        let connector = match (&tls, receivers.iter().any(|r| r.transport == Transport::Tls)) {
            (Some(t), true) => Some(Arc::new(tls_connector(t)?)),
            (None, true) => return Err("a tls:// syslog receiver needs the CA that issued its certificate".into()),
            _ => None,
        };
        let name = tls.map(|t| t.name).unwrap_or_default();
        let mut queues = Vec::new();
        for r in receivers {
            let (tx, rx) = tokio::sync::mpsc::channel(QUEUE);
            tokio::spawn(deliver(*r, rx, stats.clone(), connector.clone(), name.clone()));
            queues.push(tx);
        }
        Ok(Syslog {
            origin: Arc::new(origin),
            queues,
            stats,
        })
    }

    /// Queues `e` for every receiver; a full queue drops it (counted).
    pub fn send(&self, e: &Event) {
        let m = Arc::new(format(&self.origin, e));
        for q in &self.queues {
            if q.try_send(m.clone()).is_err() {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn tls_connector(t: &TlsSettings) -> Result<boring::ssl::SslConnector, String> {
    use boring::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
    let mut b = SslConnector::builder(SslMethod::tls()).map_err(|e| format!("TLS setup: {e}"))?;
    // Only the configured CA is trusted, not the system's roots: a public
    // CA's certificate for the receiver's name or address is refused.
    let pem = std::fs::read(&t.ca).map_err(|e| format!("reading the syslog CA {}: {e}", t.ca.display()))?;
    let cas = boring::x509::X509::stack_from_pem(&pem).map_err(|e| format!("the syslog CA {}: {e}", t.ca.display()))?;
    if cas.is_empty() {
        return Err(format!("the syslog CA {}: no certificate in it", t.ca.display()));
    }
    let mut store = boring::x509::store::X509StoreBuilder::new().map_err(|e| format!("TLS setup: {e}"))?;
    for c in &cas {
        store
            .add_cert(c.clone())
            .map_err(|e| format!("the syslog CA {}: {e}", t.ca.display()))?;
    }
    b.set_cert_store(store.build());
    b.set_verify(SslVerifyMode::PEER);
    if let Some((cert, key)) = &t.own {
        b.set_certificate_chain_file(cert)
            .map_err(|e| format!("{}: {e}", cert.display()))?;
        b.set_private_key_file(key, SslFiletype::PEM)
            .map_err(|e| format!("{}: {e}", key.display()))?;
    }
    Ok(b.build())
}

trait Stream: AsyncWrite + Unpin + Send {}
impl<T: AsyncWrite + Unpin + Send> Stream for T {}

async fn connect(
    r: Receiver,
    tls: &Option<Arc<boring::ssl::SslConnector>>,
    name: &str,
) -> std::io::Result<Box<dyn Stream>> {
    let tcp = tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(r.addr))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
    let _ = tcp.set_nodelay(true);
    if r.transport != Transport::Tls {
        return Ok(Box::new(tcp));
    }
    let c = tls.as_ref().expect("checked at start");
    let mut config = c.configure().map_err(std::io::Error::other)?;
    let name = if name.is_empty() {
        r.addr.ip().to_string()
    } else {
        name.to_string()
    };
    if name.parse::<std::net::IpAddr>().is_ok() {
        // An address: checked against the certificate's IP addresses.
        config.set_use_server_name_indication(false);
        config.set_verify_hostname(false);
        config
            .param_mut()
            .set_ip(name.parse().expect("an address"))
            .map_err(std::io::Error::other)?;
    }
    let s = tokio::time::timeout(CONNECT_TIMEOUT, tokio_boring::connect(config, &name, tcp))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
        .map_err(|e| std::io::Error::other(format!("TLS handshake: {e}")))?;
    Ok(Box::new(s))
}

/// Delivers one receiver's queue until the process ends.
async fn deliver(
    r: Receiver,
    mut rx: tokio::sync::mpsc::Receiver<Arc<String>>,
    stats: Arc<Stats>,
    tls: Option<Arc<boring::ssl::SslConnector>>,
    name: String,
) {
    let mut udp: Option<tokio::net::UdpSocket> = None;
    let mut stream: Option<Box<dyn Stream>> = None;
    let mut down_until: Option<Instant> = None;
    let mut failing = false;
    while let Some(m) = rx.recv().await {
        if down_until.is_some_and(|t| Instant::now() < t) {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let r2 = match r.transport {
            Transport::Udp => {
                if udp.is_none() {
                    let local: SocketAddr = if r.addr.is_ipv4() {
                        ([0, 0, 0, 0], 0).into()
                    } else {
                        ([0u16; 8], 0).into()
                    };
                    udp = match tokio::net::UdpSocket::bind(local).await {
                        Ok(s) => Some(s),
                        Err(e) => {
                            tracing::warn!(receiver = %r, error = %e, "syslog socket");
                            None
                        }
                    };
                }
                match &udp {
                    Some(s) => s.send_to(m.as_bytes(), r.addr).await.map(|_| ()),
                    None => Err(std::io::Error::other("no socket")),
                }
            }
            Transport::Tcp | Transport::Tls => {
                if stream.is_none() {
                    match connect(r, &tls, &name).await {
                        Ok(s) => stream = Some(s),
                        Err(e) => {
                            if !failing {
                                tracing::warn!(receiver = %r, error = %e, "syslog receiver unreachable; events are dropped and counted until it answers");
                            }
                            failing = true;
                            down_until = Some(Instant::now() + RETRY_AFTER);
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                    }
                }
                // Octet counting (RFC 6587 3.4.1, RFC 5425 4.3).
                let framed = format!("{} {}", m.len(), m);
                let s = stream.as_mut().expect("connected");
                match tokio::time::timeout(WRITE_TIMEOUT, s.write_all(framed.as_bytes())).await {
                    Ok(r) => r,
                    Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
                }
            }
        };
        match r2 {
            Ok(()) => {
                if failing {
                    tracing::info!(receiver = %r, "syslog receiver reached again");
                    failing = false;
                }
                down_until = None;
                stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(receiver = %r, error = %e, "sending to the syslog receiver failed; events are dropped and counted until it answers");
                }
                failing = true;
                stream = None;
                down_until = Some(Instant::now() + RETRY_AFTER);
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn origin() -> Origin {
        Origin {
            hostname: "h1".into(),
            app: "sdn-agent".into(),
            procid: "42".into(),
            sd_id: "sdn@32473".into(),
        }
    }

    #[test]
    fn messages_follow_rfc5424_and_escape_what_they_must() {
        let e = Event {
            facility: FACILITY_AUDIT,
            severity: Severity::Warning,
            kind: "spoof",
            time_ms: 1_764_979_200_123,
            fields: vec![("port", "vm1".into()), ("rule", "a\"b]c\\d\ne".into())],
            text: "port vm1 sent\nfrom a forged address".into(),
        };
        let m = format(&origin(), &e);
        assert_eq!(
            m,
            "<108>1 2025-12-06T00:00:00.123Z h1 sdn-agent 42 spoof [sdn@32473 port=\"vm1\" rule=\"a\\\"b\\]c\\\\d\\u{a}e\"] \u{feff}port vm1 sent from a forged address"
        );
        let long = Event {
            text: "x".repeat(3 * MESSAGE_MAX),
            fields: vec![("reason", "y".repeat(5 * VALUE_MAX)), ("port", "vm1\u{202e}1mv".into())],
            ..e
        };
        let m = format(&origin(), &long);
        assert_eq!(m.len(), MESSAGE_MAX);
        // The values are cut, not the structured data: it ends, and every
        // field is in it.
        let sd_end = m.find("] \u{feff}").expect("the structured data ends");
        assert!(m[..sd_end].contains("port=\"vm1\\u{202e}1mv\""), "{}", &m[..sd_end]);
        assert!(m[..sd_end].contains(&format!("{}...\"", "y".repeat(VALUE_MAX - 1))));
    }

    #[test]
    fn receivers_parse_or_say_why_not() {
        let r: Receiver = "tls://127.0.0.1:6514".parse().unwrap();
        assert_eq!((r.transport, r.addr.port()), (Transport::Tls, 6514));
        assert_eq!(r.to_string(), "tls://127.0.0.1:6514");
        for bad in ["127.0.0.1:514", "relp://127.0.0.1:1", "udp://loghost:514"] {
            assert!(bad.parse::<Receiver>().unwrap_err().contains(bad));
        }
    }

    /// A receiver that is down: events are dropped and counted, at once.
    #[tokio::test]
    async fn a_receiver_down_costs_the_sender_nothing() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let s = Syslog::start(
            &[Receiver {
                transport: Transport::Tcp,
                addr,
            }],
            None,
            origin(),
        )
        .unwrap();
        let e = Event {
            facility: FACILITY_AUTH,
            severity: Severity::Notice,
            kind: "auth_refused",
            time_ms: 0,
            fields: vec![],
            text: String::new(),
        };
        let started = Instant::now();
        for _ in 0..(QUEUE * 2) {
            s.send(&e);
        }
        assert!(started.elapsed() < Duration::from_millis(500));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(s.stats.dropped.load(Ordering::Relaxed) >= QUEUE as u64);
        assert_eq!(s.stats.sent.load(Ordering::Relaxed), 0);
    }

    /// A TLS receiver whose certificate the configured CA issued for its
    /// address gets the events, framed by octet counting; one whose
    /// certificate another CA issued, or that names another address, gets
    /// nothing.
    #[tokio::test]
    async fn tls_receivers_are_checked_by_the_configured_ca_and_address() {
        use crate::tls::pki::{Ca, Validity};
        use crate::tls::{Identity, Role};
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::create("syslog-ca", Validity::days(1)).unwrap();
        let other = Ca::create("another-ca", Validity::days(1)).unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.cert_pem().unwrap()).unwrap();
        let id = Identity {
            role: Role::Supervisor,
            name: "syslog".into(),
            tenant: None,
        };
        let receive = |issuer: &Ca| {
            let (cert, key) = issuer
                .issue(&id, &["127.0.0.1".to_string()], Validity::days(1))
                .unwrap();
            let mut b = boring::ssl::SslAcceptor::mozilla_intermediate(boring::ssl::SslMethod::tls()).unwrap();
            b.set_certificate(&boring::x509::X509::from_pem(&cert).unwrap())
                .unwrap();
            b.set_private_key(&boring::pkey::PKey::private_key_from_pem(&key).unwrap())
                .unwrap();
            let acceptor = b.build();
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.set_nonblocking(true).unwrap();
            let addr = l.local_addr().unwrap();
            let l = tokio::net::TcpListener::from_std(l).unwrap();
            let got = tokio::spawn(async move {
                let (s, _) = l.accept().await.unwrap();
                let Ok(mut s) = tokio_boring::accept(&acceptor, s).await else {
                    return Vec::new();
                };
                let mut v = Vec::new();
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut v),
                )
                .await;
                v
            });
            (addr, got)
        };
        let event = Event {
            facility: FACILITY_AUTH,
            severity: Severity::Warning,
            kind: "auth_refused",
            time_ms: 0,
            fields: vec![("actor", "mallory".into())],
            text: String::new(),
        };
        let settings = |name: &str| TlsSettings {
            ca: dir.path().join("ca.pem"),
            name: name.into(),
            own: None,
        };
        for (issuer, name, delivered) in [(&ca, "", true), (&other, "", false), (&ca, "10.9.9.9", false)] {
            let (addr, got) = receive(issuer);
            let r = Receiver {
                transport: Transport::Tls,
                addr,
            };
            let s = Syslog::start(&[r], Some(settings(name)), origin()).unwrap();
            s.send(&event);
            tokio::time::sleep(Duration::from_millis(500)).await;
            let sent = s.stats.sent.load(Ordering::Relaxed);
            drop(s);
            let bytes = got.await.unwrap();
            let text = String::from_utf8_lossy(&bytes).to_string();
            if delivered {
                assert_eq!(sent, 1);
                let (len, msg) = text.split_once(' ').unwrap();
                assert_eq!(len.parse::<usize>().unwrap(), msg.len(), "{text}");
                assert!(msg.contains("auth_refused [sdn@32473 actor=\"mallory\"]"), "{text}");
            } else {
                assert_eq!(
                    (sent, text.as_str()),
                    (0, ""),
                    "issuer {}, name {name:?}",
                    if std::ptr::eq(issuer, &ca) { "ca" } else { "other" }
                );
            }
        }
    }
}
