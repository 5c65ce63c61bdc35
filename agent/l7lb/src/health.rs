//! Health checks of a pool's members: each member is asked on a new
//! connection, as haproxy's `option httpchk` does, and its `healthy` flag
//! follows the answers (`rise` passes to go up, `fall` failures to go
//! down, the first answer at once). Transitions are logged with the
//! reason of the last failure.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::{header, Request};
use hyper_util::rt::TokioIo;
use tokio::task::JoinHandle;

use crate::config::Health;
use crate::sched::{Member, Pool};

/// The part of a check's answer read for its body match.
pub const BODY_READ_MAX: usize = 64 * 1024;

/// A pool's checks; they stop when this is dropped.
pub struct Checks(Vec<JoinHandle<()>>);

impl Drop for Checks {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// Starts checking every member of `pool` as `h` says.
pub fn start(pool: &Arc<Pool>, h: &Health) -> Checks {
    Checks(
        pool.members
            .iter()
            .map(|m| tokio::spawn(watch(pool.name.clone(), m.clone(), h.clone())))
            .collect(),
    )
}

async fn watch(pool: String, m: Arc<Member>, h: Health) {
    let interval = Duration::from_millis(h.interval_ms);
    // Members' checks spread over the interval, not all at once.
    let offset = (crate::sched::spread(&m.name) % h.interval_ms.max(1)) / 4;
    tokio::time::sleep(Duration::from_millis(offset)).await;
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut passes, mut failures, mut first) = (0u32, 0u32, true);
    loop {
        tick.tick().await;
        let result = tokio::time::timeout(Duration::from_millis(h.timeout_ms), check(&m, &h))
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {} ms", h.timeout_ms)));
        let was = m.healthy.load(Ordering::Relaxed);
        match result {
            Ok(()) => {
                m.restore();
                passes += 1;
                failures = 0;
                if !was && (first || passes >= h.rise) {
                    m.healthy.store(true, Ordering::Relaxed);
                    tracing::info!(pool = %pool, member = %m.name, address = %m.address, "member up: its health check passes");
                }
            }
            Err(why) => {
                failures += 1;
                passes = 0;
                if was && (first || failures >= h.fall) {
                    m.healthy.store(false, Ordering::Relaxed);
                    tracing::warn!(pool = %pool, member = %m.name, address = %m.address, reason = %why, "member down: its health check fails");
                } else if was {
                    tracing::debug!(pool = %pool, member = %m.name, reason = %why, failures, "a health check failed");
                }
            }
        }
        first = false;
    }
}

/// One check of `m`: Ok when it passes, else why not.
async fn check(m: &Member, h: &Health) -> Result<(), String> {
    let tcp = tokio::net::TcpStream::connect(m.address)
        .await
        .map_err(|e| format!("connecting: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let (mut send, conn) = hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(tcp))
        .await
        .map_err(|e| format!("HTTP: {e}"))?;
    let driver = tokio::spawn(conn);
    let host = h.host.clone().unwrap_or_else(|| m.address.to_string());
    let req = Request::get(h.path.as_str())
        .header(header::HOST, host)
        .header(header::USER_AGENT, "sdn-l7lb-check")
        .header(header::CONNECTION, "close")
        .body(Empty::new())
        .map_err(|e| format!("request: {e}"))?;
    let result = async {
        let resp = send.send_request(req).await.map_err(|e| format!("HTTP: {e}"))?;
        let status = resp.status().as_u16();
        if !h.status.contains(&status) {
            return Err(format!("status {status}"));
        }
        if let Some(want) = &h.body {
            let body = read_some(resp.into_body())
                .await
                .map_err(|e| format!("reading the body: {e}"))?;
            if !contains(&body, want.as_bytes()) {
                return Err(format!("the body does not contain {want:?}"));
            }
        }
        Ok(())
    }
    .await;
    driver.abort();
    result
}

/// The body's first [`BODY_READ_MAX`] bytes (a longer body is cut there).
async fn read_some(mut body: hyper::body::Incoming) -> Result<Vec<u8>, hyper::Error> {
    let mut out = Vec::new();
    while out.len() < BODY_READ_MAX {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame?.into_data() {
            let room = BODY_READ_MAX - out.len();
            out.extend_from_slice(&data[..data.len().min(room)]);
        }
    }
    Ok(out)
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
