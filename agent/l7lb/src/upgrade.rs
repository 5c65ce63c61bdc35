//! Upgrades without dropping a connection, as nginx's binary upgrade and
//! haproxy's `-x` do: the running proxy listens on a control socket; a
//! new one (`--upgrade`) asks it for its listening sockets, serves on them
//! (connections waiting in their queues are the new one's to accept), and
//! says it is ready; the old one then stops accepting, finishes the
//! requests its connections carry, and exits. The new one takes the
//! control socket over for the next upgrade.
//!
//! The exchange, one line each, the sockets passed with `SCM_RIGHTS`:
//! new `upgrade` → old `sockets N` (with N descriptors) → new `ready` →
//! old `bye`. A new process that fails before `ready` (a bad
//! configuration, a crash) leaves the old one serving as it was.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::Path;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader as AsyncBufReader};
use tokio::net::{UnixListener, UnixStream};

/// The most listening sockets handed over (one message).
pub const SOCKETS_MAX: usize = 250;
/// How long either side waits for the other's next line.
pub const STEP_TIMEOUT: Duration = Duration::from_secs(10);

/// The new process's side: the old one's listening sockets, from the
/// control socket at `path`, and the connection to say `ready` on. None:
/// no proxy answers there (none runs, or it died): start afresh.
pub fn take_over(path: &Path) -> Result<Option<(Vec<std::net::TcpListener>, Handover)>, String> {
    let mut s = match StdUnixStream::connect(path) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(control = %path.display(), error = %e, "no running proxy to upgrade from; starting afresh");
            return Ok(None);
        }
    };
    s.set_read_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
    s.set_write_timeout(Some(STEP_TIMEOUT)).map_err(|e| e.to_string())?;
    s.write_all(b"upgrade\n")
        .map_err(|e| format!("asking for the sockets: {e}"))?;
    let mut line = [0u8; 64];
    let mut space = nix::cmsg_space!([RawFd; SOCKETS_MAX]);
    let mut iov = [IoSliceMut::new(&mut line)];
    let msg = recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
        .map_err(|e| format!("receiving the sockets: {e}"))?;
    let mut fds = Vec::new();
    for c in msg.cmsgs().map_err(|e| format!("receiving the sockets: {e}"))? {
        if let ControlMessageOwned::ScmRights(got) = c {
            // SAFETY: the kernel gave this process these descriptors,
            // each once; nothing else owns them.
            fds.extend(got.into_iter().map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }));
        }
    }
    let n = msg.bytes;
    let said = std::str::from_utf8(&line[..n]).unwrap_or("").trim().to_string();
    let want = said
        .strip_prefix("sockets ")
        .and_then(|v| v.parse::<usize>().ok())
        .ok_or_else(|| format!("the running proxy said {said:?}, not the sockets"))?;
    if want != fds.len() {
        return Err(format!(
            "the running proxy named {want} sockets and passed {}",
            fds.len()
        ));
    }
    let listeners = fds.into_iter().map(std::net::TcpListener::from).collect();
    Ok(Some((listeners, Handover(s))))
}

/// The new process's connection to the old one.
pub struct Handover(StdUnixStream);

impl Handover {
    /// Tells the old process this one serves; returns once it has
    /// stopped accepting.
    pub fn ready(mut self) -> Result<(), String> {
        self.0.write_all(b"ready\n").map_err(|e| format!("saying ready: {e}"))?;
        let mut line = String::new();
        BufReader::new(&self.0)
            .read_line(&mut line)
            .map_err(|e| format!("waiting for the old proxy to stop accepting: {e}"))?;
        if line.trim() != "bye" {
            return Err(format!("the old proxy said {:?}, not bye", line.trim()));
        }
        Ok(())
    }
}

/// The control socket at `path` (a stale file there is replaced).
pub fn listen(path: &Path) -> Result<UnixListener, String> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("control socket {}: {e}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("control socket {}: {e}", path.display()))?;
    Ok(l)
}

/// A new process that took the sockets and serves: the old one stops
/// accepting, then says [`Asked::bye`].
pub struct Asked(AsyncBufReader<UnixStream>);

/// The old process's side of one control connection: hands `sockets`
/// over when asked. `Some` once the new process said `ready`; `None` when
/// it went away before (this one serves on).
pub async fn serve_one(s: UnixStream, sockets: &[BorrowedFd<'_>]) -> Result<Option<Asked>, String> {
    let mut r = AsyncBufReader::new(s);
    let mut line = String::new();
    let read = tokio::time::timeout(STEP_TIMEOUT, r.read_line(&mut line)).await;
    if !matches!(read, Ok(Ok(n)) if n > 0) || line.trim() != "upgrade" {
        return Err(format!("a control connection said {:?}, not upgrade", line.trim()));
    }
    if sockets.len() > SOCKETS_MAX {
        return Err(format!(
            "{} listening sockets: at most {SOCKETS_MAX} are handed over",
            sockets.len()
        ));
    }
    let fds: Vec<RawFd> = sockets.iter().map(|f| f.as_raw_fd()).collect();
    let head = format!("sockets {}\n", fds.len());
    let s = r.get_ref();
    s.writable().await.map_err(|e| e.to_string())?;
    s.try_io(tokio::io::Interest::WRITABLE, || {
        sendmsg::<()>(
            s.as_raw_fd(),
            &[IoSlice::new(head.as_bytes())],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)
    })
    .map_err(|e| format!("handing the sockets over: {e}"))?;
    line.clear();
    // The new process applies its configuration first: it may take a
    // while (certificates), or fail (then it closes without a word).
    match tokio::time::timeout(STEP_TIMEOUT * 3, r.read_line(&mut line)).await {
        Ok(Ok(n)) if n > 0 && line.trim() == "ready" => Ok(Some(Asked(r))),
        _ => Ok(None),
    }
}

impl Asked {
    pub async fn bye(mut self) {
        let _ = self.0.get_mut().write_all(b"bye\n").await;
    }
}
