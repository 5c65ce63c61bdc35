//! The `sdn.v1` gRPC API. See `sdn/v1/sdn.proto` for every message and field.

/// Generated messages, clients and servers of `sdn.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("sdn.v1");
}

use tonic::transport::{Channel, Endpoint, Uri};

/// The form of a host's share this release's agents read
/// (`WatchRequest.protocol`): each port of a VPC is a resource of its own.
pub const WATCH_PROTOCOL: u32 = 1;

/// Connects to a controller at `addr`: `http://host:port` or
/// `unix:///path/to/socket`.
pub async fn connect(addr: &str) -> Result<Channel, tonic::transport::Error> {
    if let Some(path) = addr.strip_prefix("unix://") {
        let path = path.to_string();
        // The URI is required by the API but unused with a custom connector.
        Endpoint::from_static("http://controller.local")
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let path = path.clone();
                async move {
                    let s = tokio::net::UnixStream::connect(path).await?;
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(s))
                }
            }))
            .await
    } else {
        Endpoint::from_shared(addr.to_string())?
            .connect_timeout(std::time::Duration::from_secs(3))
            .connect()
            .await
    }
}
