//! `regatta bench`: a load generator speaking etcd's v3 API, so that the
//! same tool measures Regatta and etcd. Flags follow etcd's `benchmark`
//! tool: `--clients`, `--conns`, `--total`, `--key-size`, `--val-size`,
//! `--key-space-size`, `--consistency`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use regatta_server::proto::etcdserverpb as pb;
use tonic::transport::Channel;

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
    /// Endpoints (host:port), comma-separated; connections go round-robin.
    #[arg(long, value_delimiter = ',', default_value = "127.0.0.1:8443")]
    endpoints: Vec<String>,
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

async fn one(
    client: &mut pb::kv_client::KvClient<Channel>,
    workload: Workload,
    args: &BenchArgs,
    rng: &mut Rng,
    value: &[u8],
) -> Result<(), tonic::Status> {
    let key = key(rng.next() % args.key_space_size.max(1), args.key_size);
    let read = match workload {
        Workload::Range => true,
        Workload::Mixed => rng.next() % 100 < args.read_percent,
        Workload::Put | Workload::TxnPut => false,
    };
    if read {
        client
            .range(pb::RangeRequest {
                key,
                serializable: args.consistency == Consistency::S,
                ..pb::RangeRequest::default()
            })
            .await?;
        return Ok(());
    }
    let put = pb::PutRequest {
        key,
        value: value.to_vec(),
        ..pb::PutRequest::default()
    };
    if workload == Workload::TxnPut {
        client
            .txn(pb::TxnRequest {
                compare: Vec::new(),
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(put)),
                }],
                failure: Vec::new(),
            })
            .await?;
    } else {
        client.put(put).await?;
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
pub async fn run(args: BenchArgs) -> Result<(), String> {
    if args.clients == 0 || args.conns == 0 || args.total == 0 || args.endpoints.is_empty() {
        return Err("--clients, --conns, --total and --endpoints must be positive".into());
    }
    let mut channels = Vec::new();
    for index in 0..args.conns {
        let endpoint = &args.endpoints[index % args.endpoints.len()];
        // Through the server crate's connector, which keeps small frames
        // in h2's write buffer (see `regatta_server::tls::Unvectored`).
        let address = regatta_server::tls::endpoint(endpoint, None)
            .map_err(|error| format!("{endpoint}: {error}"))?;
        let channel = regatta_server::tls::connect(address, None)
            .await
            .map_err(|error| error.to_string())?;
        channels.push(channel);
    }
    let args = Arc::new(args);
    let value = Arc::new(vec![b'v'; args.val_size]);
    if matches!(args.workload, Workload::Range | Workload::Mixed) {
        eprintln!("filling {} keys", args.key_space_size);
        let next = Arc::new(AtomicU64::new(0));
        let mut fillers = Vec::new();
        for client in 0..args.clients {
            let mut kv = pb::kv_client::KvClient::new(channels[client % channels.len()].clone());
            let (next, args, value) = (Arc::clone(&next), Arc::clone(&args), Arc::clone(&value));
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
                    kv.put(put).await?;
                }
            }));
        }
        for filler in fillers {
            filler
                .await
                .map_err(|error| error.to_string())?
                .map_err(|status: tonic::Status| format!("filling: {status}"))?;
        }
    }
    eprintln!(
        "{:?}: {} requests, {} clients, {} connections",
        args.workload, args.total, args.clients, args.conns
    );
    let issued = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let progress_done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = {
        let (done, total) = (Arc::clone(&progress_done), args.total);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                let finished = done.load(Ordering::Relaxed);
                eprintln!(
                    "  {finished}/{total} ({:.0}%)",
                    finished as f64 * 100.0 / total as f64
                );
            }
        })
    };
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let mut kv = pb::kv_client::KvClient::new(channels[client % channels.len()].clone());
        let (issued, errors, done, args, value) = (
            Arc::clone(&issued),
            Arc::clone(&errors),
            Arc::clone(&progress_done),
            Arc::clone(&args),
            Arc::clone(&value),
        );
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (client as u64 + 1).wrapping_mul(0xD1B5));
            let mut latencies = Vec::new();
            while issued.fetch_add(1, Ordering::Relaxed) < args.total {
                let start = Instant::now();
                if one(&mut kv, args.workload, &args, &mut rng, &value)
                    .await
                    .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                latencies.push(start.elapsed().as_micros().min(u128::from(u32::MAX)) as u32);
                done.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await.map_err(|error| error.to_string())?);
    }
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    latencies.sort_unstable();
    let errors = errors.load(Ordering::Relaxed);
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
        return Err(format!("{errors} requests failed"));
    }
    Ok(())
}
