//! A fault-injecting TCP proxy: forwards connections from its listener to
//! a target, and can cut the link (closing live connections and refusing
//! new ones), slow it (a delay before each chunk in either direction, which
//! also limits throughput), or add latency (each chunk arrives a fixed time
//! after it was sent, with throughput unchanged, like a long link). Every
//! peer and client link of the harness goes through one.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes read per forwarding step.
const CHUNK_BYTES: usize = 16 * 1024;

struct Shared {
    target: SocketAddr,
    cut: AtomicBool,
    delay_micros: AtomicU64,
    latency_micros: AtomicU64,
    /// Bytes delivered, both directions.
    forwarded_bytes: AtomicU64,
    connections: Mutex<Vec<JoinHandle<()>>>,
}

/// A running proxy; stops when dropped.
pub struct Proxy {
    address: SocketAddr,
    shared: Arc<Shared>,
    accept: JoinHandle<()>,
}

impl Proxy {
    /// Listens on `listen` (port 0 picks one) and forwards to `target`.
    pub async fn start(listen: SocketAddr, target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind(listen).await?;
        let address = listener.local_addr()?;
        let shared = Arc::new(Shared {
            target,
            cut: AtomicBool::new(false),
            delay_micros: AtomicU64::new(0),
            latency_micros: AtomicU64::new(0),
            forwarded_bytes: AtomicU64::new(0),
            connections: Mutex::new(Vec::new()),
        });
        let accept = tokio::spawn(accept_loop(listener, Arc::clone(&shared)));
        Ok(Proxy {
            address,
            shared,
            accept,
        })
    }

    /// Where clients connect.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Bytes delivered through the proxy so far, both directions: the
    /// harness's evidence that traffic really takes the faulty links.
    pub fn forwarded_bytes(&self) -> u64 {
        self.shared.forwarded_bytes.load(Ordering::Relaxed)
    }

    /// Cuts the link: live connections close, new ones are refused, until
    /// `heal`.
    pub fn cut(&self) {
        self.shared.cut.store(true, Ordering::SeqCst);
        for connection in self
            .shared
            .connections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            connection.abort();
        }
    }

    /// Restores the link.
    pub fn heal(&self) {
        self.shared.cut.store(false, Ordering::SeqCst);
    }

    /// Delays every chunk by `delay` in both directions (zero: none).
    pub fn slow(&self, delay: Duration) {
        self.shared
            .delay_micros
            .store(delay.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Proxy {
    /// Delivers every chunk `latency` after it was read, in both
    /// directions (zero: at once); chunks keep flowing meanwhile.
    pub fn set_latency(&self, latency: Duration) {
        self.shared
            .latency_micros
            .store(latency.as_micros() as u64, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((inbound, _)) = listener.accept().await else {
            continue;
        };
        if shared.cut.load(Ordering::SeqCst) {
            drop(inbound);
            continue;
        }
        let forward = tokio::spawn(forward(inbound, Arc::clone(&shared)));
        let mut connections = shared.connections.lock().unwrap_or_else(|p| p.into_inner());
        connections.retain(|connection| !connection.is_finished());
        connections.push(forward);
    }
}

async fn forward(inbound: TcpStream, shared: Arc<Shared>) {
    let Ok(outbound) = TcpStream::connect(shared.target).await else {
        return;
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (inbound_read, inbound_write) = inbound.into_split();
    let (outbound_read, outbound_write) = outbound.into_split();
    let there = pipe(inbound_read, outbound_write, Arc::clone(&shared));
    let back = pipe(outbound_read, inbound_write, shared);
    // Either direction ending ends the connection.
    tokio::select! {
        _ = there => {}
        _ = back => {}
    }
}

/// Copies `from` to `to`: a reader stamps each chunk with its due time, a
/// writer delivers it then. The connection ends when the writer does
/// (after the reader's end is drained, or on a write error or a cut).
async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel::<(Instant, Vec<u8>)>();
    let reader_shared = Arc::clone(&shared);
    let reader = tokio::spawn(async move {
        let mut buffer = vec![0u8; CHUNK_BYTES];
        loop {
            let read = match from.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(read) => read,
            };
            let delay = reader_shared.delay_micros.load(Ordering::SeqCst);
            if delay > 0 {
                tokio::time::sleep(Duration::from_micros(delay)).await;
            }
            let latency = reader_shared.latency_micros.load(Ordering::SeqCst);
            let due = Instant::now() + Duration::from_micros(latency);
            if sender.send((due, buffer[..read].to_vec())).is_err() {
                return;
            }
        }
    });
    while let Some((due, bytes)) = receiver.recv().await {
        tokio::time::sleep_until(due).await;
        if shared.cut.load(Ordering::SeqCst) || to.write_all(&bytes).await.is_err() {
            break;
        }
        shared
            .forwarded_bytes
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
    }
    reader.abort();
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 1024];
                    while let Ok(read) = stream.read(&mut buffer).await {
                        if read == 0 || stream.write_all(&buffer[..read]).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        address
    }

    async fn round_trip(address: SocketAddr) -> std::io::Result<Vec<u8>> {
        let mut stream = TcpStream::connect(address).await?;
        stream.write_all(b"ping").await?;
        let mut answer = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), stream.read_exact(&mut answer))
            .await
            .map_err(|_| std::io::Error::other("timed out"))??;
        Ok(answer.to_vec())
    }

    #[tokio::test]
    async fn forwards_cuts_heals_and_slows() {
        let target = echo_server().await;
        let proxy = Proxy::start("127.0.0.1:0".parse().expect("address"), target)
            .await
            .expect("proxy");
        assert_eq!(round_trip(proxy.address()).await.expect("through"), b"ping");

        // A live connection is closed by a cut, and new ones fail.
        let mut live = TcpStream::connect(proxy.address()).await.expect("connect");
        live.write_all(b"ping").await.expect("write");
        let mut answer = [0u8; 4];
        live.read_exact(&mut answer).await.expect("echo");
        proxy.cut();
        let mut rest = Vec::new();
        let closed =
            tokio::time::timeout(Duration::from_secs(2), live.read_to_end(&mut rest)).await;
        assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
        assert!(round_trip(proxy.address()).await.is_err());

        proxy.heal();
        proxy.slow(Duration::from_millis(100));
        let started = std::time::Instant::now();
        assert_eq!(round_trip(proxy.address()).await.expect("healed"), b"ping");
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "both directions are slowed"
        );
    }

    #[tokio::test]
    async fn latency_delays_each_chunk_without_serialising_them() {
        let target = echo_server().await;
        let proxy = Proxy::start("127.0.0.1:0".parse().expect("address"), target)
            .await
            .expect("proxy");
        proxy.set_latency(Duration::from_millis(50));
        let mut stream = TcpStream::connect(proxy.address()).await.expect("connect");
        let started = std::time::Instant::now();
        // Twenty chunks sent 5 ms apart: with a pipelined 50 ms each way
        // they are all back after about 100 + 95 ms, not 20 × 100 ms.
        let mut answer = vec![0u8; 20 * 4];
        let (mut read_half, mut write_half) = stream.split();
        let send = async {
            for _ in 0..20 {
                write_half.write_all(b"ping").await.expect("write");
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        let receive = async {
            tokio::time::timeout(Duration::from_secs(5), read_half.read_exact(&mut answer))
                .await
                .expect("in time")
                .expect("echo");
        };
        tokio::join!(send, receive);
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_millis(100),
            "{elapsed:?}: a round trip is 2 × 50 ms"
        );
        assert!(
            elapsed < Duration::from_millis(1000),
            "{elapsed:?}: chunks were serialised"
        );
        assert_eq!(&answer[..4], b"ping");
    }
}
