//! TLS for the gRPC listeners and channels (client API, replication API):
//! an accept loop that runs handshakes off the loop, and a channel
//! connector that dials TCP and runs the TLS handshake. The rustls
//! configurations come from `regatta_multiraft::tls`, which reloads
//! certificates when their files change.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

pub use regatta_multiraft::tls::{
    client_config, common_names, server_config, ClientTlsOptions, Identity, Pem, ServerTlsOptions,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::either::Either;
use tonic::transport::server::{Connected, TcpConnectInfo};
use tonic::transport::{Channel, Endpoint, Uri};

use crate::error::{Error, Result};

/// How long a TLS handshake may take, on either side.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long dialling a server may take (TCP and TLS).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Accepted connections waiting to be served, at most.
const ACCEPT_QUEUE_CONNECTIONS_MAX: usize = 128;

/// ALPN for gRPC: HTTP/2. grpc-go clients (etcdctl) insist on it.
pub fn grpc_alpn() -> Vec<Vec<u8>> {
    vec![b"h2".to_vec()]
}

/// A connection a gRPC server serves: plain TCP or TLS over TCP, reporting
/// no vectored writes like every gRPC connection here (see [`Unvectored`]).
pub type ServerIo = Unvectored<Either<TcpStream, Box<tokio_rustls::server::TlsStream<TcpStream>>>>;

impl Connected for ServerIo {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        let tcp = match &self.0 {
            Either::Left(stream) => stream,
            Either::Right(stream) => stream.get_ref().0,
        };
        TcpConnectInfo {
            local_addr: tcp.local_addr().ok(),
            remote_addr: tcp.peer_addr().ok(),
        }
    }
}

/// A connection that tells HTTP/2 (h2) it has no vectored writes, so that
/// h2 copies DATA frames of up to 1 KiB into its write buffer instead of
/// chaining them. h2 holds at most one chained payload and flushes the
/// socket before it buffers the next frame; with vectored writes it
/// chains every payload of 256 B or more, so each request or response
/// with a value (a put of 256 B, a range answering one) cost a `writev`
/// of its own. Copied, the frames of every stream that is ready go out in
/// one write. Payloads of 1 KiB and more are still chained; on a
/// non-vectored stream they cost two writes (h2's buffer, then the
/// payload) instead of one `writev`.
/// `docs/decisions/0007-h2-small-frames.md` has the measurements.
#[derive(Debug)]
pub struct Unvectored<T>(pub T);

impl<T: AsyncRead + Unpin> AsyncRead for Unvectored<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Unvectored<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}

/// The connections of `listener` for `Server::serve_with_incoming`, with
/// TCP_NODELAY set (small responses must not wait for a delayed ACK) and,
/// with `tls`, the handshake done. A failed handshake is logged and
/// dropped; it never stops the listener. The accept loop ends when the
/// server drops the stream.
pub fn incoming(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    what: &'static str,
) -> tokio_stream::wrappers::ReceiverStream<io::Result<ServerIo>> {
    let (sender, receiver) = mpsc::channel(ACCEPT_QUEUE_CONNECTIONS_MAX);
    tokio::spawn(async move {
        let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = sender.closed() => return,
            };
            let (tcp, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of descriptors and the like: back off, keep serving.
                    tracing::warn!(listener = what, "accept failed: {error}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            match &acceptor {
                None => {
                    if sender
                        .send(Ok(Unvectored(Either::Left(tcp))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    let sender = sender.clone();
                    tokio::spawn(async move {
                        if let Some(stream) = handshake(&acceptor, tcp, what, remote).await {
                            let io = Unvectored(Either::Right(Box::new(stream)));
                            let _ = sender.send(Ok(io)).await;
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(receiver)
}

/// The server side of a TLS handshake on a connection `what` accepted,
/// bounded by [`HANDSHAKE_TIMEOUT`]; a refusal is logged and gives `None`.
pub(crate) async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    what: &str,
    remote: std::net::SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(stream)) => Some(stream),
        Ok(Err(error)) => {
            tracing::info!(listener = what, %remote, "refused a TLS connection: {error}");
            None
        }
        Err(_) => {
            tracing::info!(
                listener = what,
                %remote,
                "refused a TLS connection: the handshake timed out"
            );
            None
        }
    }
}

/// TLS for a gRPC client: the rustls configuration and, optionally, the
/// name to check in the server's certificate instead of the host dialled.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<String>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// TLS from `options` (ALPN is set to HTTP/2 for gRPC).
    pub fn new(options: &ClientTlsOptions, server_name: Option<String>) -> Result<ClientTls> {
        let mut options = options.clone();
        options.alpn_protocols = grpc_alpn();
        let config = client_config(&options).map_err(|error| Error::Config(error.to_string()))?;
        Ok(ClientTls {
            config,
            server_name,
        })
    }
}

/// An endpoint for `address` (`host:port` or a URL); the scheme follows
/// `tls` when `address` has none, and a URL's scheme must agree with it.
pub fn endpoint(address: &str, tls: Option<&ClientTls>) -> Result<Endpoint> {
    let address = address.trim();
    let url = match (address.split_once("://"), tls) {
        (None, None) => format!("http://{address}"),
        (None, Some(_)) => format!("https://{address}"),
        (Some(("http", _)), None) | (Some(("https", _)), Some(_)) => address.to_string(),
        (Some(("https", _)), None) => {
            return Err(Error::Config(format!(
                "{address} is an https URL, but no CA certificate was given to verify it"
            )))
        }
        (Some(("http", _)), Some(_)) => {
            return Err(Error::Config(format!(
                "{address} is an http URL, but TLS options were given"
            )))
        }
        (Some((scheme, _)), _) => {
            return Err(Error::Config(format!(
                "{address}: unknown scheme {scheme:?} (use http or https)"
            )))
        }
    };
    Endpoint::from_shared(url.clone())
        .map(|endpoint| endpoint.tcp_nodelay(true).connect_timeout(CONNECT_TIMEOUT))
        .map_err(|error| Error::Config(format!("{address:?} is not a valid address: {error}")))
}

/// A channel to `endpoint` that connects on first use (and reconnects),
/// over TLS when `tls` is given.
pub fn connect_lazy(endpoint: Endpoint, tls: Option<&ClientTls>) -> Channel {
    endpoint.connect_with_connector_lazy(connector(tls.cloned()))
}

/// A channel to `endpoint`, connected now, over TLS when `tls` is given.
pub async fn connect(endpoint: Endpoint, tls: Option<&ClientTls>) -> Result<Channel> {
    let uri = endpoint.uri().clone();
    let connected = endpoint
        .connect_with_connector(connector(tls.cloned()))
        .await;
    connected.map_err(|error| {
        let mut message = format!("cannot reach {uri}: {error}");
        let mut source = std::error::Error::source(&error);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        Error::Unavailable(message)
    })
}

/// A client connection: plain TCP or TLS over TCP.
pub type ClientStream = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;
type ClientIo = hyper_util::rt::TokioIo<Unvectored<ClientStream>>;
type Dial = Pin<Box<dyn std::future::Future<Output = io::Result<ClientIo>> + Send>>;

/// Dials `host:port` (`host` may be a bracketed IPv6 address) with
/// TCP_NODELAY and, with `tls`, runs the TLS handshake, checking the
/// server's certificate against `host` (or the configured server name);
/// both within [`CONNECT_TIMEOUT`].
pub async fn dial(
    host: &str,
    port: u16,
    tls: Option<&ClientTls>,
) -> io::Result<Unvectored<ClientStream>> {
    let dialled = async {
        let bare_host = host.trim_start_matches('[').trim_end_matches(']');
        let tcp = TcpStream::connect((bare_host, port)).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = tls else {
            return Ok(Either::Left(tcp));
        };
        let name = regatta_multiraft::tls::server_name(host, tls.server_name.as_deref())
            .map_err(|error| io::Error::new(io::ErrorKind::InvalidInput, error.to_string()))?;
        let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config))
            .connect(name, tcp)
            .await?;
        Ok(Either::Right(stream))
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, dialled).await {
        Ok(Ok(stream)) => Ok(Unvectored(stream)),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            format!("connecting to {host}:{port} timed out"),
        )),
    }
}

/// Dials the URI's host and port (see [`dial`]).
fn connector(
    tls: Option<ClientTls>,
) -> impl tower::Service<Uri, Response = ClientIo, Error = io::Error, Future = Dial>
       + Clone
       + Send
       + 'static {
    tower::service_fn(move |uri: Uri| {
        let tls = tls.clone();
        let dial: Dial = Box::pin(async move {
            let host = uri
                .host()
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no host"))?
                .to_string();
            let default_port = if tls.is_some() { 443 } else { 80 };
            let port = uri.port_u16().unwrap_or(default_port);
            let stream = dial(&host, port, tls.as_ref()).await?;
            Ok(hyper_util::rt::TokioIo::new(stream))
        });
        dial
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    // h2 reads `is_write_vectored` once, when it wraps the connection, to
    // choose how large a DATA frame it chains rather than copies. Both
    // sides, served and dialled, must say "no", or every request and response
    // carrying a value is flushed on its own again.
    #[tokio::test]
    async fn connections_report_no_vectored_writes_and_pass_bytes_through() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let client = TcpStream::connect(address).await.expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        assert!(
            client.is_write_vectored(),
            "the test needs a vectored TCP stream"
        );

        let mut client = Unvectored(client);
        let mut server: ServerIo = Unvectored(Either::Left(server));
        assert!(!client.is_write_vectored());
        assert!(!server.is_write_vectored());

        client.write_all(b"request").await.expect("client write");
        let mut request = [0u8; 7];
        server.read_exact(&mut request).await.expect("server read");
        assert_eq!(&request, b"request");
        let slices = [io::IoSlice::new(b"resp"), io::IoSlice::new(b"onse")];
        let written = server.write_vectored(&slices).await.expect("server write");
        let mut response = vec![0u8; written];
        client.read_exact(&mut response).await.expect("client read");
        assert_eq!(response, &b"response"[..written]);
    }
}
