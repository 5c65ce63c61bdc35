//! What keeps one client from holding the proxy: every connection's
//! activity watched (a connection that sends no request, stays idle, or
//! stalls in the middle of one is closed), and a cap on the connections of
//! one source address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A new connection's first request must begin within this (the TLS
/// handshake and the protocol's first bytes included).
pub const FIRST_REQUEST: Duration = Duration::from_secs(10);
/// A connection with no request in flight is closed after this (HTTP/2
/// too, whose pings do not count).
pub const IDLE: Duration = Duration::from_secs(60);
/// A connection with requests in flight that moves no byte either way for
/// this is closed (a body trickled or never read).
pub const STALLED: Duration = Duration::from_secs(60);
/// Connections of one source address at once; past this new ones are
/// closed at once.
pub const PER_CLIENT_MAX: usize = 512;

fn now_ms() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// One connection's activity.
pub struct Activity {
    born_ms: u64,
    last_io_ms: AtomicU64,
    last_end_ms: AtomicU64,
    in_flight: AtomicUsize,
    requests: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        let now = now_ms();
        Activity {
            born_ms: now,
            last_io_ms: AtomicU64::new(now),
            last_end_ms: AtomicU64::new(now),
            in_flight: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
        }
    }
}

/// A request in flight on its connection, until its response's end.
pub struct Request(Arc<Activity>);

impl Drop for Request {
    fn drop(&mut self) {
        self.0.last_end_ms.store(now_ms(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Activity {
    pub fn begin(self: &Arc<Self>) -> Request {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Request(self.clone())
    }

    /// Why the connection should be closed now, if it should.
    fn verdict(&self, limits: &Limits) -> Option<&'static str> {
        let now = now_ms();
        let since = |t: &AtomicU64| Duration::from_millis(now.saturating_sub(t.load(Ordering::Relaxed)));
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return (since(&self.last_io_ms) > limits.stalled).then_some("stalled in the middle of a request");
        }
        if self.requests.load(Ordering::Relaxed) == 0 {
            let age = Duration::from_millis(now.saturating_sub(self.born_ms));
            return (age > limits.first_request).then_some("no request");
        }
        (since(&self.last_end_ms) > limits.idle).then_some("idle")
    }

    /// Resolves once the connection began a request, or after `grace`.
    pub async fn first_request(&self, grace: Duration) {
        let until = tokio::time::Instant::now() + grace;
        while self.requests.load(Ordering::Relaxed) == 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Resolves when the connection should be closed, with why.
    pub async fn watch(&self, limits: Limits) -> &'static str {
        loop {
            tokio::time::sleep(limits.tick).await;
            if let Some(why) = self.verdict(&limits) {
                return why;
            }
        }
    }
}

/// The watchdog's limits (the constants above, shorter in tests).
#[derive(Clone, Copy)]
pub struct Limits {
    pub first_request: Duration,
    pub idle: Duration,
    pub stalled: Duration,
    pub tick: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            first_request: FIRST_REQUEST,
            idle: IDLE,
            stalled: STALLED,
            tick: Duration::from_millis(500),
        }
    }
}

/// A stream whose reads and writes mark its connection active.
pub struct Watched<T> {
    inner: T,
    activity: Arc<Activity>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }

    fn moved(&self) {
        self.activity.last_io_ms.store(now_ms(), Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.moved();
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.moved();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Connections open per source address.
#[derive(Default)]
pub struct PerClient(Mutex<HashMap<IpAddr, usize>>);

/// One connection counted for its source, until dropped.
pub struct Counted(Arc<PerClient>, IpAddr);

impl Drop for Counted {
    fn drop(&mut self) {
        let mut m = self.0 .0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.1) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.1);
            }
        }
    }
}

impl PerClient {
    /// Counts a connection from `ip`; None when it has `max` already.
    pub fn admit(self: &Arc<Self>, ip: IpAddr, max: usize) -> Option<Counted> {
        let ip = ip.to_canonical();
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= max {
            return None;
        }
        *n += 1;
        Some(Counted(self.clone(), ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_gets_its_share_and_no_more() {
        let p = Arc::new(PerClient::default());
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let held: Vec<Counted> = (0..3).map(|_| p.admit(a, 3).unwrap()).collect();
        assert!(p.admit(a, 3).is_none());
        // The same address mapped into IPv6 is the same client.
        assert!(p.admit("::ffff:192.0.2.1".parse().unwrap(), 3).is_none());
        assert!(p.admit("192.0.2.2".parse().unwrap(), 3).is_some());
        drop(held);
        assert!(p.admit(a, 3).is_some());
        assert!(p.0.lock().unwrap().is_empty());
    }

    #[test]
    fn connections_without_requests_idle_or_stalled_are_judged() {
        let l = Limits {
            first_request: Duration::from_millis(30),
            idle: Duration::from_millis(30),
            stalled: Duration::from_millis(30),
            tick: Duration::from_millis(5),
        };
        let a = Arc::new(Activity::default());
        assert_eq!(a.verdict(&l), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(a.verdict(&l), Some("no request"));
        let r = a.begin();
        a.last_io_ms.store(now_ms(), Ordering::Relaxed);
        assert_eq!(a.verdict(&l), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(a.verdict(&l), Some("stalled in the middle of a request"));
        drop(r);
        assert_eq!(a.verdict(&l), None);
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(a.verdict(&l), Some("idle"));
    }
}
