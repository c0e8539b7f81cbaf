//! `replication-lag`: measures cross-location replication with real
//! processes on 127.0.0.1. It starts a leader cluster (`--leader-nodes`,
//! each serving `--replication.address`) and a single-node follower
//! cluster that reaches leader node 1 through a proxy adding
//! `--latency-ms` each way, then measures:
//!
//! - **lag under load**: puts at a steady `--rate` on the leader for
//!   `--seconds`; a prober reads the follower's revision every
//!   millisecond; each put's lag is the time from its acknowledgement on
//!   the leader to the first probe that shows its revision on the follower;
//! - **first visibility**: the same for lone writes, one every 200 ms;
//! - **apply rate**: puts made while the link is cut, then the time the
//!   follower takes to hold them all once the link heals.
//!
//! `cargo run --release -p regatta-chaos --bin replication-lag -- --rate 5000`

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use regatta_chaos::harness::{free_address, initial_members};
use regatta_chaos::proxy::Proxy;
use regatta_server::proto::etcdserverpb as pb;
use tonic::transport::Channel;

/// Cross-location replication lag, first visibility and follower apply
/// rate, measured with real processes on 127.0.0.1.
#[derive(Parser, Debug)]
#[command(name = "replication-lag", version, about)]
struct Cli {
    /// Puts per second on the leader during the lag run.
    #[arg(long, default_value_t = 5_000)]
    rate: u64,
    /// Seconds the lag run lasts.
    #[arg(long, default_value_t = 20)]
    seconds: u64,
    /// Latency added each way between the locations, in milliseconds.
    #[arg(long, default_value_t = 50)]
    latency_ms: u64,
    /// Nodes in the leader cluster.
    #[arg(long, default_value_t = 3)]
    leader_nodes: u64,
    /// Bytes of each value.
    #[arg(long, default_value_t = 64)]
    value_bytes: usize,
    /// Puts made while the link is cut, for the apply-rate run (0 skips
    /// it).
    #[arg(long, default_value_t = 30_000)]
    backlog: u64,
    /// The regatta binary (default: target/release/regatta).
    #[arg(long, default_value = "target/release/regatta")]
    regatta: PathBuf,
}

struct Process {
    child: Child,
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(
    binary: &Path,
    subcommand: &str,
    dir: &Path,
    flags: &[String],
) -> std::io::Result<Process> {
    let log = std::fs::File::create(dir.with_extension("log"))?;
    let child = Command::new(binary)
        .args([subcommand, "--log-level", "warn", "--data-dir"])
        .arg(dir)
        .args(flags)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    Ok(Process { child })
}

async fn kv_client(address: std::net::SocketAddr) -> pb::kv_client::KvClient<Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("an endpoint")
        .tcp_nodelay(true)
        .connect_lazy();
    pb::kv_client::KvClient::new(channel)
}

fn put_request(key: String, value_bytes: usize) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into_bytes(),
        value: vec![b'v'; value_bytes],
        ..Default::default()
    }
}

/// The follower's revision (a serializable read of one key).
async fn follower_revision(client: &mut pb::kv_client::KvClient<Channel>) -> Option<i64> {
    let request = pb::RangeRequest {
        key: b"probe".to_vec(),
        serializable: true,
        ..Default::default()
    };
    let response = client.range(request).await.ok()?.into_inner();
    response.header.map(|header| header.revision)
}

async fn wait_until_serving(client: &mut pb::kv_client::KvClient<Channel>, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while follower_revision(client).await.is_none() {
        assert!(Instant::now() < deadline, "{what} never served");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Probes the follower every millisecond until `stop`, recording
/// (time, revision).
fn start_prober(
    mut client: pb::kv_client::KvClient<Channel>,
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            if let Some(revision) = follower_revision(&mut client).await {
                samples
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push((Instant::now(), revision));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
}

/// Each acknowledged put's lag: from its acknowledgement to the first
/// probe showing its revision. Puts never seen are left out (and counted).
fn lags(acks: &[(i64, Instant)], samples: &[(Instant, i64)]) -> (Vec<Duration>, usize) {
    let mut acks = acks.to_vec();
    acks.sort_by_key(|(revision, _)| *revision);
    let mut lags = Vec::with_capacity(acks.len());
    let mut unseen = 0;
    let mut sample = 0;
    let mut highest = i64::MIN;
    // Probes are in time order and revisions only grow on a follower.
    for (revision, acked) in acks {
        while highest < revision && sample < samples.len() {
            highest = highest.max(samples[sample].1);
            sample += 1;
        }
        if highest < revision {
            unseen += 1;
            continue;
        }
        let seen = samples[sample - 1].0;
        lags.push(seen.saturating_duration_since(acked));
    }
    (lags, unseen)
}

fn percentile(sorted: &[Duration], fraction: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let position = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[position.min(sorted.len() - 1)]
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.1} ms", duration.as_secs_f64() * 1000.0)
}

fn report(name: &str, mut values: Vec<Duration>, unseen: usize) {
    values.sort();
    println!(
        "{name}: {} writes, p50 {}, p90 {}, p99 {}, max {}{}",
        values.len(),
        milliseconds(percentile(&values, 0.50)),
        milliseconds(percentile(&values, 0.90)),
        milliseconds(percentile(&values, 0.99)),
        milliseconds(values.last().copied().unwrap_or_default()),
        if unseen > 0 {
            format!(", {unseen} never seen")
        } else {
            String::new()
        }
    );
}

/// Starts both clusters, then measures lag under load, first visibility
/// and (unless `--backlog` is 0) the follower's apply rate.
async fn run(cli: Cli) -> Result<(), String> {
    if !cli.regatta.exists() {
        return Err(format!(
            "{} does not exist: run `cargo build --release` first, or pass --regatta",
            cli.regatta.display()
        ));
    }
    if cli.rate == 0 || cli.leader_nodes == 0 {
        return Err("--rate and --leader-nodes must be at least 1".into());
    }
    let root = tempfile::tempdir().map_err(|error| error.to_string())?;
    let (mut processes, leader_api, replication) = start_leader_cluster(&cli, root.path())?;
    let any = "127.0.0.1:0".parse().map_err(|_| "an address")?;
    let link = Proxy::start(any, replication)
        .await
        .map_err(|error| error.to_string())?;
    link.set_latency(Duration::from_millis(cli.latency_ms));
    let (follower_process, follower_api) = start_follower(&cli, root.path(), &link)?;
    processes.push(follower_process);

    let mut leader = kv_client(leader_api).await;
    let mut follower = kv_client(follower_api).await;
    wait_until_serving(&mut leader, "the leader").await;
    wait_until_serving(&mut follower, "the follower").await;
    println!(
        "leader cluster: {} nodes; follower: 1 node, {} ms each way; {} puts/s of {} B for {} s",
        cli.leader_nodes, cli.latency_ms, cli.rate, cli.value_bytes, cli.seconds
    );
    measure_load(&cli, &leader, &follower).await;
    measure_lone_writes(&cli, &mut leader, &follower).await;
    if cli.backlog > 0 {
        measure_apply_rate(&cli, &leader, &mut follower, &link).await?;
    }
    drop(processes);
    Ok(())
}

/// A free address on 127.0.0.1, its error as text.
fn free() -> Result<std::net::SocketAddr, String> {
    free_address().map_err(|error| error.to_string())
}

/// Starts the leader cluster; returns its processes, node 1's API address
/// and node 1's replication address (the one the follower reaches).
fn start_leader_cluster(
    cli: &Cli,
    root: &Path,
) -> Result<(Vec<Process>, std::net::SocketAddr, std::net::SocketAddr), String> {
    let mut rafts = Vec::new();
    for _ in 0..cli.leader_nodes {
        rafts.push(free()?);
    }
    let members = initial_members(&rafts);
    let mut processes = Vec::new();
    let mut leader_api = None;
    let mut replication = None;
    for id in 1..=cli.leader_nodes {
        let (api, replication_address) = (free()?, free()?);
        leader_api.get_or_insert(api);
        replication.get_or_insert(replication_address);
        let flags = vec![
            "--raft.node-id".into(),
            id.to_string(),
            "--raft.address".into(),
            rafts[id as usize - 1].to_string(),
            "--raft.initial-members".into(),
            members.clone(),
            "--api.address".into(),
            api.to_string(),
            "--replication.address".into(),
            replication_address.to_string(),
        ];
        let dir = root.join(format!("leader{id}"));
        processes.push(spawn(&cli.regatta, "leader", &dir, &flags).map_err(|e| e.to_string())?);
    }
    match (leader_api, replication) {
        (Some(api), Some(replication)) => Ok((processes, api, replication)),
        _ => Err("no leader node".into()),
    }
}

/// Starts the single-node follower cluster, reaching the leader cluster
/// through `link`; returns its process and its API address.
fn start_follower(
    cli: &Cli,
    root: &Path,
    link: &Proxy,
) -> Result<(Process, std::net::SocketAddr), String> {
    let follower_api = free()?;
    let flags = vec![
        "--dev".into(),
        "--raft.address".into(),
        free()?.to_string(),
        "--api.address".into(),
        follower_api.to_string(),
        "--replication.leader-address".into(),
        link.address().to_string(),
    ];
    let dir = root.join("follower");
    let process = spawn(&cli.regatta, "follower", &dir, &flags).map_err(|e| e.to_string())?;
    Ok((process, follower_api))
}

/// A prober of the follower's revision and what it has seen so far.
struct Probe {
    samples: Arc<Mutex<Vec<(Instant, i64)>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    prober: tokio::task::JoinHandle<()>,
}

impl Probe {
    /// Starts probing `follower`.
    fn start(follower: &pb::kv_client::KvClient<Channel>) -> Probe {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let prober = start_prober(follower.clone(), Arc::clone(&samples), Arc::clone(&stop));
        Probe {
            samples,
            stop,
            prober,
        }
    }

    /// Stops probing; returns every (time, revision) seen.
    async fn finish(self) -> Vec<(Instant, i64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.prober.await;
        let samples = self
            .samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        samples
    }
}

/// Lag under a steady load: puts at `--rate` for `--seconds`, each put's
/// lag from its acknowledgement to the first probe showing it.
async fn measure_load(
    cli: &Cli,
    leader: &pb::kv_client::KvClient<Channel>,
    follower: &pb::kv_client::KvClient<Channel>,
) {
    let probe = Probe::start(follower);
    let acks = Arc::new(Mutex::new(Vec::new()));
    let total = cli.rate * cli.seconds;
    let (failed, elapsed) = offer_load(cli, leader, &acks).await;
    // Let the last writes arrive.
    tokio::time::sleep(Duration::from_millis(cli.latency_ms * 4 + 500)).await;
    let samples = probe.finish().await;
    let acks = acks.lock().unwrap_or_else(|p| p.into_inner()).clone();
    println!(
        "offered {:.0} puts/s: {} acknowledged, {failed} failed, in {:.1} s; {} follower probes",
        total as f64 / elapsed.as_secs_f64(),
        acks.len(),
        elapsed.as_secs_f64(),
        samples.len()
    );
    let (load_lags, unseen) = lags(&acks, &samples);
    report(
        "lag under load (ack on leader → visible on follower)",
        load_lags,
        unseen,
    );
}

/// Puts at `--rate` for `--seconds`, at most 512 in flight, recording
/// each acknowledgement's (revision, time) in `acks`; returns how many
/// failed and how long they all took.
async fn offer_load(
    cli: &Cli,
    leader: &pb::kv_client::KvClient<Channel>,
    acks: &Arc<Mutex<Vec<(i64, Instant)>>>,
) -> (u64, Duration) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(512));
    let interval = Duration::from_secs_f64(1.0 / cli.rate as f64);
    let started = Instant::now();
    let total = cli.rate * cli.seconds;
    let mut failed = 0u64;
    let mut tasks = Vec::new();
    for sequence in 0..total {
        let due = started + interval.mul_f64(sequence as f64);
        tokio::time::sleep_until(due.into()).await;
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break;
        };
        let mut client = leader.clone();
        let acks = Arc::clone(acks);
        let request = put_request(format!("load/{:06}", sequence % 100_000), cli.value_bytes);
        tasks.push(tokio::spawn(async move {
            let result = client.put(request).await;
            drop(permit);
            match result {
                Ok(response) => {
                    let revision = response.into_inner().header.map_or(0, |h| h.revision);
                    acks.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push((revision, Instant::now()));
                    true
                }
                Err(_) => false,
            }
        }));
    }
    for task in tasks {
        if !matches!(task.await, Ok(true)) {
            failed += 1;
        }
    }
    (failed, started.elapsed())
}

/// First visibility: the lag of lone writes, one every 200 ms.
async fn measure_lone_writes(
    cli: &Cli,
    leader: &mut pb::kv_client::KvClient<Channel>,
    follower: &pb::kv_client::KvClient<Channel>,
) {
    let probe = Probe::start(follower);
    let mut lone = Vec::new();
    for i in 0..30 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(response) = leader
            .put(put_request(format!("lone/{i}"), cli.value_bytes))
            .await
        {
            let revision = response.into_inner().header.map_or(0, |h| h.revision);
            lone.push((revision, Instant::now()));
        }
    }
    tokio::time::sleep(Duration::from_millis(cli.latency_ms * 4 + 500)).await;
    let samples = probe.finish().await;
    let (lone_lags, unseen) = lags(&lone, &samples);
    report("first visibility of a lone write", lone_lags, unseen);
}

/// Apply rate: a backlog built while the link is cut, then the time the
/// follower takes to hold it all once the link heals.
async fn measure_apply_rate(
    cli: &Cli,
    leader: &pb::kv_client::KvClient<Channel>,
    follower: &mut pb::kv_client::KvClient<Channel>,
    link: &Proxy,
) -> Result<(), String> {
    link.cut();
    let target = write_backlog(cli, leader).await;
    let before = follower_revision(follower).await.unwrap_or(0);
    link.heal();
    let healed = Instant::now();
    loop {
        let revision = follower_revision(follower).await.unwrap_or(0);
        if revision >= target {
            break;
        }
        if healed.elapsed() > Duration::from_secs(300) {
            return Err(format!(
                "the follower is at revision {revision} of {target} 300 s after the link healed"
            ));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let took = healed.elapsed();
    println!(
        "follower apply rate: {} leader entries in {:.2} s after the link healed = {:.0} entries/s",
        target - before,
        took.as_secs_f64(),
        (target - before) as f64 / took.as_secs_f64()
    );
    Ok(())
}

/// Writes `--backlog` puts on the leader from 64 workers; returns the
/// highest revision acknowledged, which the follower must reach.
async fn write_backlog(cli: &Cli, leader: &pb::kv_client::KvClient<Channel>) -> i64 {
    let written = Instant::now();
    let mut tasks = Vec::new();
    let chunk = cli.backlog.div_ceil(64);
    for worker in 0..64u64 {
        let mut client = leader.clone();
        let value_bytes = cli.value_bytes;
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for i in worker * chunk..((worker + 1) * chunk) {
                if let Ok(response) = client
                    .put(put_request(format!("backlog/{i:07}"), value_bytes))
                    .await
                {
                    last = response.into_inner().header.map_or(0, |h| h.revision);
                }
            }
            last
        }));
    }
    let mut target = 0;
    for task in tasks {
        target = target.max(task.await.unwrap_or(0));
    }
    println!(
        "backlog: {} puts in {:.1} s on the leader while the link was cut",
        chunk * 64,
        written.elapsed().as_secs_f64()
    );
    target
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match regatta_multiraft::runtime::builder().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("replication-lag: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("replication-lag: {error}");
            ExitCode::FAILURE
        }
    }
}
