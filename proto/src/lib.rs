//! The `sdn.v1` gRPC API. See `sdn/v1/sdn.proto` for every message and field.

/// Generated messages, clients and servers of `sdn.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sdn.v1");
}

use tonic::transport::{Channel, Endpoint, Uri};

/// The API's file descriptors, for server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("sdn_descriptor");

/// The form of a host's share this release's agents read
/// (`WatchRequest.protocol`): each port of a VPC is a resource of its own.
pub const WATCH_PROTOCOL: u32 = 1;

pub mod audit;
pub mod syslog;
pub mod tls;

/// Connects to a controller at `addr`: `https://host:port` (mutual TLS,
/// with the certificate [`tls::install_client`] set), `unix:///path` (TLS
/// over the local socket when a certificate is set, the caller's user id
/// otherwise), or `http://host:port` (no TLS: only a controller started
/// with `--insecure` answers).
pub async fn connect(addr: &str) -> Result<Channel, ConnectError> {
    connect_with(addr, tls::client()).await
}

/// Why a connection could not be made.
#[derive(Debug)]
pub enum ConnectError {
    /// The address or the configuration is wrong.
    Config(String),
    Transport(tonic::transport::Error),
}

impl std::fmt::Display for ConnectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConnectError::Config(m) => f.write_str(m),
            // The transport error's own text says only "transport error";
            // its source says what failed.
            ConnectError::Transport(e) => {
                write!(f, "{e}")?;
                let mut src = std::error::Error::source(e);
                while let Some(s) = src {
                    write!(f, ": {s}")?;
                    src = s.source();
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<tonic::transport::Error> for ConnectError {
    fn from(e: tonic::transport::Error) -> Self {
        ConnectError::Transport(e)
    }
}

/// [`connect`] with an explicit certificate (or none).
pub async fn connect_with(addr: &str, tls: Option<std::sync::Arc<tls::Connector>>) -> Result<Channel, ConnectError> {
    let timeout = std::time::Duration::from_secs(3);
    if let Some(path) = addr.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is required by the API but unused with a custom connector.
        let ep = Endpoint::from_static("http://controller.local").connect_timeout(timeout);
        let ch = match tls {
            Some(tls) => {
                ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let (path, tls) = (path.clone(), tls.clone());
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        let s = tls.connect(s).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await?
            }
            None => {
                ep.connect_with_connector(tower::service_fn(move |_: Uri| {
                    let path = path.clone();
                    async move {
                        let s = tokio::net::UnixStream::connect(path).await?;
                        Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                    }
                }))
                .await?
            }
        };
        return Ok(ch);
    }
    if let Some(rest) = addr.strip_prefix("https://") {
        let Some(tls) = tls else {
            return Err(ConnectError::Config(format!(
                "{addr}: TLS needs this party's certificate (--tls-ca, --tls-cert, --tls-key)"
            )));
        };
        let hostport = rest.trim_end_matches('/').to_string();
        let ep = Endpoint::from_shared(format!("http://{hostport}"))?.connect_timeout(timeout);
        return Ok(ep
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let (hostport, tls) = (hostport.clone(), tls.clone());
                async move {
                    let s = tokio::net::TcpStream::connect(hostport.as_str()).await?;
                    s.set_nodelay(true)?;
                    let s = tls.connect(s).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await?);
    }
    if addr.starts_with("http://") {
        if tls.is_some() {
            return Err(ConnectError::Config(format!(
                "{addr}: plain HTTP while this party has a certificate; use https://"
            )));
        }
        return Ok(Endpoint::from_shared(addr.to_string())?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .connect()
            .await?);
    }
    Err(ConnectError::Config(format!(
        "controller address {addr:?}: expected https://HOST:PORT, unix:///PATH or http://HOST:PORT"
    )))
}
