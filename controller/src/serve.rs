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
use sdn_proto::tls::{Acceptor, Identity, Peer, PlainIo, TlsIo};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio_stream::wrappers::ReceiverStream;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// Connections whose handshake is done, waiting for the server.
const READY_QUEUED: usize = 64;

/// How the controller authenticates callers.
#[derive(Clone)]
pub struct Listeners {
    /// `None` only with `--insecure`.
    pub tls: Option<Arc<Acceptor>>,
    /// Identities of local callers by user id.
    pub unix_roles: Arc<BTreeMap<u32, Identity>>,
    pub insecure: bool,
}

/// Either kind of accepted connection.
pub enum Conn<S> {
    Tls(TlsIo<S>),
    Plain(PlainIo<S>),
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncRead for Conn<S> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Conn<S> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_flush(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Tls(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Conn::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl<S> tonic::transport::server::Connected for Conn<S> {
    type ConnectInfo = Peer;
    fn connect_info(&self) -> Peer {
        match self {
            Conn::Tls(s) => s.peer().clone(),
            Conn::Plain(s) => tonic::transport::server::Connected::connect_info(s),
        }
    }
}

fn refused(transport: &str, from: &str, why: &str) {
    tracing::warn!(target: "sdn::security", transport, from, reason = why, "connection refused");
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
                // Without it, small replies wait on delayed ACKs (40 ms).
                let _ = stream.set_nodelay(true);
                let (me, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(c) = me.tcp_conn(stream, remote).await {
                        let _ = tx.send(Ok(c)).await;
                    }
                });
            }
        });
        ReceiverStream::new(rx)
    }

    async fn tcp_conn(&self, stream: TcpStream, remote: SocketAddr) -> Option<Conn<TcpStream>> {
        match &self.tls {
            Some(acceptor) => match acceptor.accept(stream, Some(remote)).await {
                Ok(s) => Some(Conn::Tls(s)),
                Err(why) => {
                    refused("tcp", &remote.to_string(), &why);
                    None
                }
            },
            None => Some(Conn::Plain(PlainIo::new(
                stream,
                Peer {
                    identity: None,
                    remote: Some(remote),
                    uid: None,
                },
            ))),
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
                let (me, tx) = (me.clone(), tx.clone());
                tokio::spawn(async move {
                    if let Some(c) = me.unix_conn(stream).await {
                        let _ = tx.send(Ok(c)).await;
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
        let first = match tokio::time::timeout(sdn_proto::tls::HANDSHAKE_TIMEOUT, first_byte(&stream)).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => return None,
            Ok(Err(e)) => {
                refused("unix", &from, &e.to_string());
                return None;
            }
            Err(_) => {
                refused("unix", &from, "sent nothing");
                return None;
            }
        };
        if first == TLS_HANDSHAKE {
            let Some(acceptor) = &self.tls else {
                refused("unix", &from, "a TLS handshake, and this controller has no certificate");
                return None;
            };
            return match acceptor.accept(stream, None).await {
                Ok(s) => Some(Conn::Tls(s)),
                Err(why) => {
                    refused("unix", &from, &why);
                    None
                }
            };
        }
        // A caller of no configured user id gets its requests refused with
        // a reason it can read (`UNAUTHENTICATED`), rather than a closed
        // connection.
        let identity = uid.and_then(|u| self.unix_roles.get(&u).cloned());
        Some(Conn::Plain(PlainIo::new(
            stream,
            Peer {
                identity,
                remote: None,
                uid,
            },
        )))
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
    Ok((uid, id))
}
