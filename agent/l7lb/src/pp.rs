//! The PROXY protocol towards members (haproxy's `send-proxy` and
//! `send-proxy-v2`): each connection to a member begins with a header
//! naming the client's address and the address it reached, so a member
//! behind the proxy sees who its client is. Such a connection carries one
//! client's requests only (its header names that client): a client
//! connection gets its own kept-alive connections to the members
//! ([`Private`]), closed when it ends.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use hyper::Uri;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioIo;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::config::ProxyProtocol;
use crate::proxy::Body;

/// The header for a client at `client` that reached `local` (both made
/// one family: a v4 address on a v6 socket is read as v4, and one v4
/// beside a v6 is written v4-mapped).
pub fn header(v: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> Vec<u8> {
    let (mut c, mut l) = (canonical(client), canonical(local));
    if c.is_ipv4() != l.is_ipv4() {
        c = mapped(c);
        l = mapped(l);
    }
    match v {
        ProxyProtocol::V1 => ppp::v1::Addresses::from((c, l)).to_string().into_bytes(),
        ProxyProtocol::V2 => ppp::v2::Builder::with_addresses(
            ppp::v2::Version::Two | ppp::v2::Command::Proxy,
            ppp::v2::Protocol::Stream,
            (c, l),
        )
        .build()
        .unwrap_or_default(),
    }
}

fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

fn mapped(a: SocketAddr) -> SocketAddr {
    match a.ip() {
        IpAddr::V4(v4) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), a.port()),
        IpAddr::V6(_) => a,
    }
}

/// A connector that writes a fixed PROXY header first.
#[derive(Clone)]
pub struct Connector {
    inner: HttpConnector,
    header: Arc<[u8]>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut inner = self.inner.clone();
        let header = self.header.clone();
        Box::pin(async move {
            let mut io = inner.call(uri).await?;
            io.inner_mut().write_all(&header).await?;
            Ok(io)
        })
    }
}

/// One client connection's clients to members with the PROXY protocol,
/// made when first needed.
#[derive(Default)]
pub struct Private([OnceLock<Client<Connector, Body>>; 2]);

impl Private {
    pub fn client(&self, v: ProxyProtocol, client: SocketAddr, local: SocketAddr) -> &Client<Connector, Body> {
        let i = match v {
            ProxyProtocol::V1 => 0,
            ProxyProtocol::V2 => 1,
        };
        self.0[i].get_or_init(|| {
            crate::proxy::member_client(Connector {
                inner: crate::proxy::member_connector(),
                header: header(v, client, local).into(),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The headers read back by the crate's own parser, each family.
    #[test]
    fn headers_name_the_client_and_what_it_reached() {
        let c: SocketAddr = "192.0.2.7:40000".parse().unwrap();
        let l: SocketAddr = "198.51.100.1:443".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, c, l),
            b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n"
        );
        // A v4 client on a v6 socket: v4 both.
        let mapped_c: SocketAddr = "[::ffff:192.0.2.7]:40000".parse().unwrap();
        let mapped_l: SocketAddr = "[::ffff:198.51.100.1]:443".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, mapped_c, mapped_l),
            header(ProxyProtocol::V1, c, l)
        );
        let v6: SocketAddr = "[2001:db8::1]:443".parse().unwrap();
        assert_eq!(
            header(ProxyProtocol::V1, c, v6),
            b"PROXY TCP6 ::ffff:192.0.2.7 2001:db8::1 40000 443\r\n"
        );
        let h = header(ProxyProtocol::V2, c, l);
        let parsed = ppp::v2::Header::try_from(h.as_slice()).unwrap();
        assert_eq!(parsed.command, ppp::v2::Command::Proxy);
        assert_eq!(parsed.addresses, ppp::v2::Addresses::from((c, l)));
    }
}
