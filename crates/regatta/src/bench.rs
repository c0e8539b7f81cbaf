//! `regatta bench`: a load generator speaking etcd's v3 API, so that the
//! same tool measures Regatta and etcd. Flags follow etcd's `benchmark`
//! tool: `--clients`, `--conns`, `--total`, `--key-size`, `--val-size`,
//! `--key-space-size`, `--consistency`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BufMut, Bytes, BytesMut};
use clap::{Args, ValueEnum};
use prost::Message;
use regatta_server::proto::etcdserverpb as pb;

/// What each request does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Workload {
    /// Put a random key of the key space.
    Put,
    /// Read a random key of the key space.
    Range,
    /// A transaction of one put (etcd's `txn-put`).
    TxnPut,
    /// Reads and puts, `--read-percent` of them reads.
    Mixed,
}

/// Read consistency of ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Consistency {
    /// Linearizable (etcd's default).
    L,
    /// Serializable: the local state.
    S,
}

/// `regatta bench` flags.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// The workload.
    #[arg(value_enum)]
    workload: Workload,
    /// Endpoints (host:port, http://host:port, or https://host:port with
    /// `--cacert`), comma-separated; connections go round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8443")]
    endpoints: Vec<String>,
    /// Speak TLS, verifying the servers' certificates with these CAs
    /// (PEM), as etcdctl's and etcd's benchmark's `--cacert`.
    #[arg(long, value_name = "FILE")]
    cacert: Option<std::path::PathBuf>,
    /// A client certificate (PEM), for servers that require one.
    #[arg(long = "cert", value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<std::path::PathBuf>,
    /// The private key of `--cert`.
    #[arg(long = "key", value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<std::path::PathBuf>,
    /// Concurrent clients, each with one request outstanding.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// gRPC connections the clients share.
    #[arg(long, default_value_t = 8)]
    conns: usize,
    /// Requests in all.
    #[arg(long, default_value_t = 100_000)]
    total: u64,
    /// Bytes per key.
    #[arg(long, default_value_t = 8)]
    key_size: usize,
    /// Bytes per value.
    #[arg(long, default_value_t = 256)]
    val_size: usize,
    /// Distinct keys used.
    #[arg(long, default_value_t = 10_000)]
    key_space_size: u64,
    /// Range consistency: l (linearizable) or s (serializable).
    #[arg(long, value_enum, default_value = "l")]
    consistency: Consistency,
    /// For `mixed`: the share of reads, in percent.
    #[arg(long, default_value_t = 50)]
    read_percent: u64,
    /// For `range` and `mixed`: do not write the key space first (an
    /// earlier run did), so that the run's server CPU is its own.
    #[arg(long)]
    no_fill: bool,
}

/// The host and port of an `--endpoints` entry, which may be written as
/// etcdctl takes it (`http://host:port`, or `https://host:port` when `tls`
/// is on).
fn bench_endpoint(entry: &str, tls: bool) -> Result<(String, u16), String> {
    let entry = entry.trim();
    let bare = match (entry.split_once("://"), tls) {
        (None, _) => entry,
        (Some(("http", rest)), false) | (Some(("https", rest)), true) => rest,
        (Some(("https", _)), false) => {
            return Err(format!(
                "--endpoints {entry}: an https endpoint needs --cacert to verify the server"
            ))
        }
        (Some(("http", _)), true) => {
            return Err(format!(
                "--endpoints {entry}: an http endpoint, but --cacert asks for TLS"
            ))
        }
        (Some((scheme, _)), _) => {
            return Err(format!(
                "--endpoints {entry}: unknown scheme {scheme:?} (use http or https)"
            ))
        }
    };
    let bare = bare.strip_suffix('/').unwrap_or(bare);
    if bare.contains('/') {
        return Err(format!(
            "--endpoints {entry}: give host:port, without a path"
        ));
    }
    let (host, port) = bare
        .rsplit_once(':')
        .ok_or_else(|| format!("--endpoints {entry}: not host:port"))?;
    let port: u16 = port
        .parse()
        .ok()
        .filter(|port| *port != 0)
        .ok_or_else(|| format!("--endpoints {entry}: the port must be from 1 to 65535"))?;
    if host.is_empty() {
        return Err(format!("--endpoints {entry}: no host"));
    }
    if host.contains(':') && !(host.starts_with('[') && host.ends_with(']')) {
        return Err(format!(
            "--endpoints {entry}: write an IPv6 address in brackets, as [::1]:8443"
        ));
    }
    Ok((host.to_string(), port))
}

fn key(index: u64, size: usize) -> Vec<u8> {
    let digits = format!("{index:0width$}", width = size.max(1));
    let bytes = digits.into_bytes();
    bytes[bytes.len() - size.max(1)..].to_vec()
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One HTTP/2 connection speaking unary gRPC, shared by the clients that
/// clone it. `regatta bench` drives the `h2` crate itself rather than a
/// tonic `Channel` (whose buffer task and streamed request bodies cost the
/// client two extra task hops per request, BENCHMARKS.md session 22) or
/// hyper's client (which spawns a task per request to send its body, and
/// copies that task's future in and out of the heap: 13% of the client's
/// CPU, session 26). The load tool then takes less of the CPU it shares
/// with the servers it measures, and it takes the same for etcd and
/// Regatta.
#[derive(Clone)]
struct Connection {
    sender: h2::client::SendRequest<Bytes>,
    uri_prefix: String,
}

/// HTTP/2 flow-control windows the load tool grants the server: hyper's
/// client defaults, so that a large range answer is not paced by window
/// updates.
const STREAM_WINDOW_BYTES: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW_BYTES: u32 = 5 * 1024 * 1024;

impl Connection {
    /// Dials `host:port` with TCP_NODELAY and, with `tls`, the TLS
    /// handshake, within the server crate's `CONNECT_TIMEOUT`, then runs
    /// the HTTP/2 handshake.
    async fn open(
        host: &str,
        port: u16,
        tls: Option<&regatta_server::tls::ClientTls>,
    ) -> Result<Connection, String> {
        let endpoint = format!("{host}:{port}");
        let stream = regatta_server::tls::dial(host, port, tls)
            .await
            .map_err(|error| format!("cannot reach {endpoint}: {error}"))?;
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW_BYTES)
            .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
            .handshake(stream)
            .await
            .map_err(|error| format!("{endpoint}: HTTP/2 handshake: {error}"))?;
        let name = endpoint.to_string();
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                eprintln!("connection to {name} ended: {error}");
            }
        });
        let scheme = if tls.is_some() { "https" } else { "http" };
        Ok(Connection {
            sender,
            uri_prefix: format!("{scheme}://{endpoint}"),
        })
    }

    /// Calls the unary method `path` (`/package.Service/Method`) with
    /// `request` and decodes the answer.
    async fn call<Q: Message, A: Message + Default>(
        &mut self,
        path: &str,
        request: &Q,
    ) -> Result<A, String> {
        let body = grpc_frame(request)?;
        let http_request = http::Request::post(format!("{}{path}", self.uri_prefix))
            .header(http::header::CONTENT_TYPE, "application/grpc")
            .header(http::header::TE, "trailers")
            .body(())
            .map_err(|error| format!("building the request: {error}"))?;
        // `ready` waits while the server's stream limit is reached.
        std::future::poll_fn(|context| self.sender.poll_ready(context))
            .await
            .map_err(|error| format!("connection: {error}"))?;
        let (response, mut stream) = self
            .sender
            .send_request(http_request, false)
            .map_err(|error| format!("request: {error}"))?;
        // Buffered by h2 and sent as the stream's window allows.
        stream
            .send_data(body, true)
            .map_err(|error| format!("request body: {error}"))?;
        let response = response
            .await
            .map_err(|error| format!("request: {error}"))?;
        let (head, mut received) = response.into_parts();
        if head.status != http::StatusCode::OK {
            return Err(format!("HTTP status {}", head.status));
        }
        let bytes = receive_body(&mut received).await?;
        let trailers = received
            .trailers()
            .await
            .map_err(|error| format!("response trailers: {error}"))?;
        let status = grpc_field(trailers.as_ref(), &head.headers, "grpc-status");
        if status != "0" {
            let message = grpc_field(trailers.as_ref(), &head.headers, "grpc-message");
            // gRPC percent-encodes the message.
            let message = percent_encoding::percent_decode_str(message).decode_utf8_lossy();
            return Err(format!("grpc-status {status:?}: {message}"));
        }
        grpc_message(bytes)
    }
}

/// `request` as a gRPC message: uncompressed, with its length prefix.
fn grpc_frame<Q: Message>(request: &Q) -> Result<Bytes, String> {
    let length = request.encoded_len();
    let mut body = BytesMut::with_capacity(GRPC_PREFIX_BYTES + length);
    body.put_u8(0);
    body.put_u32(u32::try_from(length).map_err(|_| "request too large".to_string())?);
    request
        .encode(&mut body)
        .map_err(|error| format!("encoding the request: {error}"))?;
    Ok(body.freeze())
}

/// A response's DATA frames, releasing their flow-control capacity. A
/// unary answer nearly always arrives as one frame: it is kept without a
/// copy, and frames are joined only when there are several.
async fn receive_body(received: &mut h2::RecvStream) -> Result<Bytes, String> {
    let mut message: Option<Bytes> = None;
    let mut joined: Option<BytesMut> = None;
    while let Some(chunk) = received.data().await {
        let chunk = chunk.map_err(|error| format!("response: {error}"))?;
        received
            .flow_control()
            .release_capacity(chunk.len())
            .map_err(|error| format!("response: {error}"))?;
        match (&mut joined, message.take()) {
            (Some(joined), _) => joined.extend_from_slice(&chunk),
            (None, None) => message = Some(chunk),
            (None, Some(first)) => {
                let mut both = BytesMut::with_capacity(first.len() + chunk.len());
                both.extend_from_slice(&first);
                both.extend_from_slice(&chunk);
                joined = Some(both);
            }
        }
    }
    Ok(match (joined, message) {
        (Some(joined), _) => joined.freeze(),
        (None, Some(message)) => message,
        (None, None) => Bytes::new(),
    })
}

/// The one uncompressed gRPC message of a response body, decoded.
fn grpc_message<A: Message + Default>(mut bytes: Bytes) -> Result<A, String> {
    let declared = match bytes.get(..GRPC_PREFIX_BYTES) {
        Some([0, length @ ..]) => u32::from_be_bytes([length[0], length[1], length[2], length[3]]),
        _ => return Err("a response without one uncompressed message".into()),
    };
    bytes.advance(GRPC_PREFIX_BYTES);
    if bytes.len() != declared as usize {
        return Err(format!(
            "a response of {} bytes, where its prefix says {declared}",
            bytes.len()
        ));
    }
    A::decode(bytes).map_err(|error| format!("decoding the response: {error}"))
}

/// A gRPC status field of a response: from its trailers, or from its
/// headers when the call failed before any message ("trailers only").
fn grpc_field<'a>(
    trailers: Option<&'a http::HeaderMap>,
    headers: &'a http::HeaderMap,
    name: &str,
) -> &'a str {
    trailers
        .and_then(|trailers| trailers.get(name))
        .or_else(|| headers.get(name))
        .and_then(|value| value.to_str().ok())
        .unwrap_or("")
}

/// gRPC's message prefix: a compression flag and a 4-byte length.
const GRPC_PREFIX_BYTES: usize = 5;

const RANGE: &str = "/etcdserverpb.KV/Range";
const PUT: &str = "/etcdserverpb.KV/Put";
const TXN: &str = "/etcdserverpb.KV/Txn";

async fn one(
    client: &mut Connection,
    workload: Workload,
    args: &BenchArgs,
    rng: &mut Rng,
    value: &[u8],
) -> Result<(), String> {
    let key = key(rng.next() % args.key_space_size.max(1), args.key_size);
    let read = match workload {
        Workload::Range => true,
        Workload::Mixed => rng.next() % 100 < args.read_percent,
        Workload::Put | Workload::TxnPut => false,
    };
    if read {
        let request = pb::RangeRequest {
            key,
            serializable: args.consistency == Consistency::S,
            ..pb::RangeRequest::default()
        };
        client.call::<_, pb::RangeResponse>(RANGE, &request).await?;
        return Ok(());
    }
    let put = pb::PutRequest {
        key,
        value: value.to_vec(),
        ..pb::PutRequest::default()
    };
    if workload == Workload::TxnPut {
        let request = pb::TxnRequest {
            compare: Vec::new(),
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put)),
            }],
            failure: Vec::new(),
        };
        client.call::<_, pb::TxnResponse>(TXN, &request).await?;
    } else {
        client.call::<_, pb::PutResponse>(PUT, &put).await?;
    }
    Ok(())
}

fn percentile(sorted: &[u32], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    f64::from(sorted[index]) / 1000.0
}

/// Runs the benchmark and prints its summary.
/// Puts every key of the key space once (`--clients` at a time), so that
/// reads find values.
async fn fill(
    connections: &[Connection],
    args: &Arc<BenchArgs>,
    value: &Arc<Vec<u8>>,
) -> Result<(), String> {
    eprintln!("filling {} keys", args.key_space_size);
    let next = Arc::new(AtomicU64::new(0));
    let mut fillers = Vec::new();
    for client in 0..args.clients {
        let mut kv = connections[client % connections.len()].clone();
        let (next, args, value) = (Arc::clone(&next), Arc::clone(args), Arc::clone(value));
        fillers.push(tokio::spawn(async move {
            loop {
                let index = next.fetch_add(1, Ordering::Relaxed);
                if index >= args.key_space_size {
                    return Ok(());
                }
                let put = pb::PutRequest {
                    key: key(index, args.key_size),
                    value: value.to_vec(),
                    ..pb::PutRequest::default()
                };
                kv.call::<_, pb::PutResponse>(PUT, &put).await?;
            }
        }));
    }
    for filler in fillers {
        filler
            .await
            .map_err(|error| error.to_string())?
            .map_err(|error: String| format!("filling: {error}"))?;
    }
    Ok(())
}

/// Prints how many of `total` requests are `done`, every 2 s, until
/// aborted.
fn report_progress(tally: Arc<Tally>, total: u64) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let finished = tally.done.load(Ordering::Relaxed);
            eprintln!(
                "  {finished}/{total} ({:.0}%)",
                finished as f64 * 100.0 / total as f64
            );
        }
    })
}

/// What the clients of a run share: how many requests were issued, how
/// many are done (for the progress line) and how many failed, with the
/// first failure's message.
#[derive(Default)]
struct Tally {
    issued: AtomicU64,
    done: AtomicU64,
    errors: AtomicU64,
    first_error: std::sync::Mutex<Option<String>>,
}

/// Runs the workload, with a progress line every 2 s, and prints one
/// `RESULT` line of its rate and latency percentiles.
pub async fn run(args: BenchArgs) -> Result<(), String> {
    if args.clients == 0 || args.conns == 0 || args.total == 0 || args.endpoints.is_empty() {
        return Err("--clients, --conns, --total and --endpoints must be positive".into());
    }
    let connections = open_connections(&args).await?;
    let args = Arc::new(args);
    let value = Arc::new(vec![b'v'; args.val_size]);
    if matches!(args.workload, Workload::Range | Workload::Mixed) && !args.no_fill {
        fill(&connections, &args, &value).await?;
    }
    eprintln!(
        "{:?}: {} requests, {} clients, {} connections",
        args.workload, args.total, args.clients, args.conns
    );
    let tally = Arc::new(Tally::default());
    let started = Instant::now();
    let progress = report_progress(Arc::clone(&tally), args.total);
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let kv = connections[client % connections.len()].clone();
        let (tally, args, value) = (Arc::clone(&tally), Arc::clone(&args), Arc::clone(&value));
        tasks.push(tokio::spawn(run_client(client, kv, tally, args, value)));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|error| error.to_string())?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    latencies.sort_unstable();
    let errors = tally.errors.load(Ordering::Relaxed);
    let rate = latencies.len() as f64 / elapsed;
    println!(
        "RESULT workload={:?} total={} clients={} conns={} seconds={elapsed:.2} requests_per_second={rate:.0} p50_ms={:.2} p90_ms={:.2} p99_ms={:.2} errors={errors}",
        args.workload,
        latencies.len(),
        args.clients,
        args.conns,
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.90),
        percentile(&latencies, 0.99),
    );
    if errors > 0 {
        let first = tally
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        return Err(format!(
            "{errors} requests failed; the first: {}",
            first.unwrap_or_default()
        ));
    }
    Ok(())
}

/// `--conns` connections, spread round-robin over `--endpoints`.
async fn open_connections(args: &BenchArgs) -> Result<Vec<Connection>, String> {
    let tls = crate::client::client_tls(
        args.cacert.as_deref(),
        args.tls_cert.as_deref(),
        args.tls_key.as_deref(),
    )?;
    let mut connections = Vec::new();
    for index in 0..args.conns {
        let entry = &args.endpoints[index % args.endpoints.len()];
        let (host, port) = bench_endpoint(entry, tls.is_some())?;
        connections.push(Connection::open(&host, port, tls.as_ref()).await?);
    }
    Ok(connections)
}

/// One client: a request at a time until the run's total is issued. Gives
/// each request's latency in microseconds.
async fn run_client(
    client: usize,
    mut kv: Connection,
    tally: Arc<Tally>,
    args: Arc<BenchArgs>,
    value: Arc<Vec<u8>>,
) -> Vec<u32> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1).wrapping_mul(0xD1B5));
    let mut latencies = Vec::new();
    while tally.issued.fetch_add(1, Ordering::Relaxed) < args.total {
        let start = Instant::now();
        if let Err(error) = one(&mut kv, args.workload, &args, &mut rng, &value).await {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            let mut first = tally.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert(error);
        }
        latencies.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
        tally.done.fetch_add(1, Ordering::Relaxed);
    }
    latencies
}

#[cfg(test)]
mod tests {
    use super::bench_endpoint;

    #[test]
    fn endpoints_take_etcdctl_urls_with_the_scheme_tls_asks_for() {
        let at = |host: &str, port: u16| Ok((host.to_string(), port));
        assert_eq!(
            bench_endpoint(" 127.0.0.1:8443 ", false),
            at("127.0.0.1", 8443)
        );
        assert_eq!(
            bench_endpoint("http://127.0.0.1:8443/", false),
            at("127.0.0.1", 8443)
        );
        assert_eq!(
            bench_endpoint("https://node1:8443", true),
            at("node1", 8443)
        );
        assert_eq!(bench_endpoint("[::1]:8443", true), at("[::1]", 8443));
        for (entry, tls, says) in [
            ("https://127.0.0.1:8443", false, "needs --cacert"),
            ("http://127.0.0.1:8443", true, "--cacert asks for TLS"),
            ("ftp://127.0.0.1:8443", false, "unknown scheme"),
            ("127.0.0.1", false, "not host:port"),
            ("127.0.0.1:0", false, "the port must be"),
            (":8443", false, "no host"),
            ("https://h:2379/v3", true, "without a path"),
            ("::1:8443", false, "in brackets"),
        ] {
            let refused = bench_endpoint(entry, tls).expect_err(entry);
            assert!(refused.contains(says), "{entry}: {refused}");
        }
    }
}
