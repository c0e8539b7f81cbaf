//! `cargo bench -p regatta-multiraft --bench throughput`: three nodes in
//! one process over TCP on 127.0.0.1, each with its own WAL (fdatasync on),
//! 1 or 64 groups, 64 concurrent proposers (tokio tasks, one proposal
//! outstanding each, proposer i on group i mod groups), 64 B and 1 KiB
//! payloads. Prints proposals/s, the p50/p99 latency of a proposal
//! (submit at the leader until the leader applied it), and the CPU time of
//! the whole process (all three nodes) per proposal.
//!
//! `THROUGHPUT_SECONDS` sets the time per row (default 5);
//! `THROUGHPUT_ROUNDS` runs every row that many times, each on a fresh
//! cluster (default 1), and prints the median round with the range of
//! proposals/s (this VM's speed drifts between runs);
//! `THROUGHPUT_GROUPS` (1 or 64) and `THROUGHPUT_PAYLOAD_BYTES` (64 or
//! 1024) run one row only, e.g. under a profiler.
//! `THROUGHPUT_WAL_BATCH_WAIT_MICROS` and `THROUGHPUT_WAL_CACHE_BYTES` set
//! the WAL's `batch_wait_micros_max` and `cache_bytes_max` for experiments;
//! `THROUGHPUT_WAL_STATS` prints per-node WAL and transport rates;
//! `THROUGHPUT_WORKERS` sets the workers per node (default the hosts' own,
//! `HostConfig::workers`: half the cores, at least 1);
//! `THROUGHPUT_COMMIT_DELAY_MICROS` sets the hosts' `commit_broadcast_delay`;
//! `THROUGHPUT_LEADERS_ON=<node>` moves every group's leadership to that
//! node (1, 2 or 3) before measuring, instead of leaving the elections'
//! spread.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{
    HostConfig, NodeHost, PeerAddress, StateMachine, TcpConfig, TcpTransport, Transport,
};
use regatta_raft::{LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::net::TcpListener;

/// The allocator the `regatta` binary runs on (docs/decisions/0008-mimalloc.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Sink {
    applied: LogIndex,
}

impl StateMachine for Sink {
    fn apply(&mut self, index: LogIndex, _command: &Bytes) -> Bytes {
        self.applied = index;
        Bytes::new()
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::new() };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, _data: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.applied = index;
        Ok(())
    }
}

struct Cluster {
    hosts: Vec<NodeHost>,
    transports: Vec<Arc<TcpTransport>>,
    wals: Vec<Arc<Wal>>,
    _dirs: Vec<tempfile::TempDir>,
}

async fn start_cluster(groups: u64) -> Cluster {
    let mut listeners = Vec::new();
    let mut peers = HashMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(NodeId(id), listener.local_addr().expect("address"));
        listeners.push(listener);
    }
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut cluster = Cluster {
        hosts: Vec::new(),
        transports: Vec::new(),
        wals: Vec::new(),
        _dirs: Vec::new(),
    };
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        // Under target/: the same disk as real data, never a tmpfs.
        let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("tempdir");
        let mut tcp = TcpConfig::new(NodeId(id), 1);
        tcp.peers = peers
            .iter()
            .map(|(id, a)| (*id, PeerAddress::from(*a)))
            .collect();
        let transport = TcpTransport::start(tcp, listener);
        let mut config = HostConfig::new(NodeId(id), dir.path());
        config.tick_interval = Duration::from_millis(50);
        if let Some(workers) = env_number("THROUGHPUT_WORKERS") {
            config.workers = workers;
        }
        if let Some(micros) = env_number("THROUGHPUT_COMMIT_DELAY_MICROS") {
            config.commit_broadcast_delay = Duration::from_micros(micros);
        }
        let mut wal_config = WalConfig::new(dir.path());
        if let Some(wait) = env_number("THROUGHPUT_WAL_BATCH_WAIT_MICROS") {
            wal_config.batch_wait_micros_max = wait;
        }
        if let Some(spin) = env_number("THROUGHPUT_WAL_SPIN_MICROS") {
            wal_config.writer_spin_micros = spin;
        }
        if std::env::var_os("THROUGHPUT_NO_FSYNC").is_some() {
            wal_config.sync_mode = regatta_wal::SyncMode::NoSyncForTestsOnly;
        }
        if let Some(cache) = env_number("THROUGHPUT_WAL_CACHE_BYTES") {
            wal_config.cache_bytes_max = cache;
        }
        let wal = Arc::new(Wal::open(wal_config).expect("wal"));
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        cluster.wals.push(Arc::clone(&wal));
        let host = NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current())
            .expect("host");
        transport.attach(&host);
        for group in 1..=groups {
            host.start_group(
                GroupId(group),
                voters.clone(),
                Box::new(Sink {
                    applied: LogIndex(0),
                }),
            )
            .expect("group");
        }
        cluster.hosts.push(host);
        cluster.transports.push(transport);
        cluster._dirs.push(dir);
    }
    cluster
}

async fn leader_of(cluster: &Cluster, group: GroupId) -> NodeHost {
    loop {
        for host in &cluster.hosts {
            if host.status(group).await.expect("status").soft_state.role == Role::Leader {
                return host.clone();
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_row(groups: u64, payload_bytes: usize, duration: Duration) -> Row {
    let cluster = start_cluster(groups).await;
    if let Some(node) = env_number::<u64>("THROUGHPUT_LEADERS_ON") {
        assert!(
            (1..=3).contains(&node),
            "THROUGHPUT_LEADERS_ON must name node 1, 2 or 3, not {node}"
        );
        for group in 1..=groups {
            loop {
                let leader = leader_of(&cluster, GroupId(group)).await;
                if leader.node_id() == NodeId(node) {
                    break;
                }
                let _ = leader.transfer_leader(GroupId(group), NodeId(node)).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let mut leaders = Vec::new();
    for group in 1..=groups {
        leaders.push(leader_of(&cluster, GroupId(group)).await);
    }
    if std::env::var_os("THROUGHPUT_WAL_STATS").is_some() {
        let mut led = [0u32; 3];
        for leader in &leaders {
            led[(leader.node_id().0 - 1) as usize] += 1;
        }
        eprintln!("groups led by nodes 1, 2, 3: {led:?}");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let latencies: Arc<Mutex<Vec<Duration>>> = Arc::default();
    let payload = Bytes::from(vec![0x5Au8; payload_bytes]);
    let mut proposers = Vec::new();
    for proposer in 0..64u64 {
        let group = GroupId(proposer % groups + 1);
        let leader = leaders[(proposer % groups) as usize].clone();
        let (stop, latencies, payload) =
            (Arc::clone(&stop), Arc::clone(&latencies), payload.clone());
        proposers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let start = Instant::now();
                if leader.propose(group, payload.clone()).await.is_ok() {
                    mine.push(start.elapsed());
                }
            }
            latencies.lock().expect("lock").extend(mine);
        }));
    }
    let before: Vec<_> = cluster.wals.iter().map(|wal| wal.stats()).collect();
    let frames_before: Vec<(u64, Vec<u64>)> = cluster
        .transports
        .iter()
        .map(|transport| {
            let stats = transport.stats();
            (
                stats.frames_sent.load(Ordering::Relaxed),
                stats
                    .messages_sent_by_kind
                    .iter()
                    .map(|count| count.load(Ordering::Relaxed))
                    .collect(),
            )
        })
        .collect();
    let start = Instant::now();
    let cpu_before = process_cpu_seconds();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    if std::env::var_os("THROUGHPUT_WAL_STATS").is_some() {
        for (node, (wal, before)) in cluster.wals.iter().zip(&before).enumerate() {
            let after = wal.stats();
            let seconds = duration.as_secs_f64();
            eprintln!(
                "node {}: {:.0} requests/s, {:.0} batches/s, {:.0} fsyncs/s ({:.0} µs each), {:.0} KiB/s, {:.0} cache hits/s, {:.0} cache misses/s",
                node + 1,
                (after.requests - before.requests) as f64 / seconds,
                (after.batches - before.batches) as f64 / seconds,
                (after.fsyncs - before.fsyncs) as f64 / seconds,
                (after.fsync_micros_total - before.fsync_micros_total) as f64
                    / (after.fsyncs - before.fsyncs).max(1) as f64,
                (after.bytes_written - before.bytes_written) as f64 / seconds / 1024.0,
                (after.cache_hits - before.cache_hits) as f64 / seconds,
                (after.cache_misses - before.cache_misses) as f64 / seconds,
            );
        }
        for (node, (transport, (frames, by_kind))) in
            cluster.transports.iter().zip(&frames_before).enumerate()
        {
            let stats = transport.stats();
            let seconds = duration.as_secs_f64();
            let kinds: Vec<String> = regatta_raft::MESSAGE_KIND_NAMES
                .iter()
                .zip(stats.messages_sent_by_kind.iter().zip(by_kind))
                .map(|(name, (count, before))| (name, count.load(Ordering::Relaxed) - before))
                .filter(|(_, sent)| *sent > 0)
                .map(|(name, sent)| format!("{name} {:.0}", sent as f64 / seconds))
                .collect();
            eprintln!(
                "node {}: {:.0} frames/s; messages/s sent: {}",
                node + 1,
                (stats.frames_sent.load(Ordering::Relaxed) - frames) as f64 / seconds,
                kinds.join(", "),
            );
        }
    }
    for proposer in proposers {
        proposer.await.expect("proposer");
    }
    let elapsed = start.elapsed().as_secs_f64();
    for transport in &cluster.transports {
        transport.shutdown();
    }
    for host in &cluster.hosts {
        host.stop().await;
    }
    let mut latencies = latencies.lock().expect("lock").clone();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let rate = latencies.len() as f64 / elapsed;
    Row {
        rate,
        p50: percentile(0.50),
        p99: percentile(0.99),
        cpu_micros_per_proposal: cpu_seconds * 1e6 / (rate * duration.as_secs_f64()),
    }
}

struct Row {
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_micros_per_proposal: f64,
}

/// The number in environment variable `name`, if set and valid.
fn env_number<T: std::str::FromStr>(name: &str) -> Option<T> {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
}

/// User and system CPU of the whole process (every thread of every node),
/// from `/proc/self/stat` in clock ticks of 10 ms.
fn process_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after_name = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    // After the name: state is field 3 of the line, utime 14, stime 15.
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |n: usize| {
        fields
            .get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(14) + ticks(15)) / 100.0
}

fn main() {
    if !std::env::args().any(|argument| argument == "--bench") {
        return;
    }
    let seconds: u64 = env_number("THROUGHPUT_SECONDS").unwrap_or(5);
    let runtime = regatta_multiraft::runtime::builder()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let rounds: usize = env_number("THROUGHPUT_ROUNDS").unwrap_or(1).max(1);
    println!("| groups | payload | proposers | proposals/s | range | p50 | p99 | CPU/proposal |");
    println!("|---|---|---|---|---|---|---|---|");
    runtime.block_on(async {
        let only_groups: Option<u64> = env_number("THROUGHPUT_GROUPS");
        let only_payload: Option<usize> = env_number("THROUGHPUT_PAYLOAD_BYTES");
        let rows: Vec<(u64, usize)> = [1u64, 64]
            .into_iter()
            .flat_map(|groups| [64usize, 1024].map(|payload| (groups, payload)))
            .filter(|(groups, payload)| {
                only_groups.is_none_or(|only| only == *groups)
                    && only_payload.is_none_or(|only| only == *payload)
            })
            .collect();
        // Rounds go over every row in turn, so that a drift of the
        // machine's speed hits every row alike.
        let mut results: Vec<Vec<Row>> = rows.iter().map(|_| Vec::new()).collect();
        for _ in 0..rounds {
            for (row, (groups, payload_bytes)) in rows.iter().enumerate() {
                let result = run_row(*groups, *payload_bytes, Duration::from_secs(seconds)).await;
                results[row].push(result);
            }
        }
        for ((groups, payload_bytes), mut results) in rows.into_iter().zip(results) {
            results.sort_by(|a, b| a.rate.total_cmp(&b.rate));
            let (low, high) = (results[0].rate, results[results.len() - 1].rate);
            let median = &results[results.len() / 2];
            println!(
                "| {groups} | {payload_bytes} B | 64 | {:.0} | {:.0}–{:.0} | {:.2} ms | {:.2} ms | {:.1} µs |",
                median.rate,
                low,
                high,
                median.p50.as_secs_f64() * 1000.0,
                median.p99.as_secs_f64() * 1000.0,
                median.cpu_micros_per_proposal,
            );
        }
    });
}
