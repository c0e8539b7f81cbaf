//! The harness: a leader cluster of real `regatta` processes on 127.0.0.1
//! with a proxy on every peer link (one per ordered pair) and every client
//! link; clients that run gets, puts, compare-and-sets and deletes on a
//! small key set through etcd's API and record each operation's invoke and
//! completion; a nemesis that kills, pauses, partitions, slows, moves
//! leadership and replaces members (see [`Fault`]); then the checker over
//! the history.
//!
//! A node runs in a *slot*: its addresses, its proxies and its data
//! directory. `member-replace` removes the slot's node from the cluster,
//! wipes it and adds it back under a new id, `slot + generation × nodes`.
//! Every node is told, with `--raft.peer-addresses`, to reach every future
//! id of a slot through its proxy to that slot, so the partitions keep
//! covering replaced nodes.
//!
//! Nodes compact their logs every `SNAPSHOT_ENTRIES` entries, keeping only
//! `COMPACTION_OVERHEAD_ENTRIES`, so that a node that was down or cut off
//! for a second usually catches up through a snapshot: every fault also
//! exercises snapshot transfer and install.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regatta_server::proto::etcdserverpb as pb;
use regatta_server::proto::regatta::v1 as rpb;
use serde::Serialize;
use tonic::transport::Channel;

use crate::checker::{self, Op, Operation, Outcome, Value, Verdict};
use crate::proxy::Proxy;
use crate::sequential::{self, FollowerRead};

/// Faults the nemesis may inject. Each lasts about a second and is then
/// healed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Fault {
    /// SIGKILL a node, restart it later.
    Kill,
    /// SIGSTOP a node, SIGCONT it later.
    Pause,
    /// Cut every peer link to and from a random node.
    Partition,
    /// Cut every peer link to and from the etcd table's leader.
    IsolateLeader,
    /// Split the nodes into a random minority and a majority.
    Minority,
    /// Split the nodes into two halves that only a bridge node connects.
    Bridge,
    /// Delay every chunk on the peer links of a node by 50 ms.
    Slow,
    /// Move the etcd table's leadership to a random node
    /// (Maintenance.MoveLeader).
    TransferLeader,
    /// SIGKILL a node, restart it once the others compacted past its log,
    /// SIGKILL it again while it installs the snapshot, restart it.
    SnapshotCrash,
    /// Cut the link between the locations: the follower cluster's
    /// replication connections to the leader cluster.
    CutLocation,
    /// Remove a node from the cluster (Membership.Remove), kill it and
    /// wipe its data; then add it back under a new id (Membership.Add, a
    /// learner promoted once caught up) and start it empty with
    /// `--raft.join`.
    MemberReplace,
}

impl Fault {
    /// Every fault, the `all` nemesis.
    pub const ALL: [Fault; 11] = [
        Fault::Kill,
        Fault::Pause,
        Fault::Partition,
        Fault::IsolateLeader,
        Fault::Minority,
        Fault::Bridge,
        Fault::Slow,
        Fault::TransferLeader,
        Fault::SnapshotCrash,
        Fault::CutLocation,
        Fault::MemberReplace,
    ];

    /// The name used on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::Partition => "partition",
            Fault::IsolateLeader => "isolate-leader",
            Fault::Minority => "minority",
            Fault::Bridge => "bridge",
            Fault::Slow => "slow",
            Fault::TransferLeader => "transfer-leader",
            Fault::SnapshotCrash => "snapshot-crash",
            Fault::CutLocation => "cut-location",
            Fault::MemberReplace => "member-replace",
        }
    }

    /// The fault named `name` on the command line.
    pub fn from_name(name: &str) -> Option<Fault> {
        Fault::ALL.into_iter().find(|fault| fault.name() == name)
    }
}

/// Nodes snapshot and compact their logs this often (entries)...
const SNAPSHOT_ENTRIES: u64 = 200;
/// ...keeping this many entries for followers that lag.
const COMPACTION_OVERHEAD_ENTRIES: u64 = 50;
/// How many times one slot's node can be replaced (`member-replace`).
const GENERATIONS_MAX: u64 = 64;

/// One run's settings.
#[derive(Clone, Debug)]
pub struct RunConfig {
    /// The `regatta` binary.
    pub binary: PathBuf,
    /// A scratch directory.
    pub dir: PathBuf,
    /// Nodes (3 or 5).
    pub nodes: u64,
    /// Nodes of the follower cluster (0 for none, 1 or 3), which
    /// replicates the leader cluster over one proxied link and is read by
    /// two readers per node.
    pub followers: u64,
    /// Concurrent clients.
    pub clients: u64,
    /// Keys the clients use at once.
    pub keys: u64,
    /// Operations on one key before its slot moves on to a fresh key, so
    /// that each key's history stays short enough to check (Jepsen's
    /// independent keys).
    pub ops_per_key: u64,
    /// How long the workload runs.
    pub duration: Duration,
    /// The faults to draw from. They are dealt like a shuffled deck: every
    /// listed fault (a fault listed twice, twice) is injected once before
    /// any is injected again, in an order the seed picks.
    pub faults: Vec<Fault>,
    /// The seed of every random choice.
    pub seed: u64,
    /// Bytes of ballast written once before the workload (keys outside
    /// the checked ones), so that snapshots take long enough to install
    /// for `snapshot-crash` to cut them.
    pub ballast_bytes: u64,
}

/// Attempts at a fault that finds nothing to act on, within its slot.
const INJECT_ATTEMPTS_MAX: u32 = 4;
/// The pause between two such attempts.
const INJECT_RETRY_DELAY: Duration = Duration::from_millis(250);

/// The process id of the final reads in the history (workers are
/// numbered from 0).
pub const FINAL_READS_PROCESS: u64 = u64::MAX;

/// What a run found.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// The faults injected, with their times in ms.
    pub schedule: Vec<(u64, String)>,
    /// The faults injected, in order (each also has its lines in
    /// `schedule`): only those that acted. A fault that found nothing to
    /// act on (no leader known, a slot being replaced, a refused removal
    /// or transfer, no follower cluster) is in `schedule`, marked
    /// "nothing done", and not here.
    pub faults: Vec<Fault>,
    /// Faults drawn that found nothing to act on.
    pub faults_not_acted: usize,
    /// Operations that completed ok.
    pub ok: usize,
    /// Operations that definitely failed.
    pub fail: usize,
    /// Operations whose outcome is unknown.
    pub info: usize,
    /// The checker's verdict.
    pub verdict: Verdict,
    /// Acknowledged puts missing from the final state.
    pub lost_writes: usize,
    /// Acknowledged writes whose revisions break etcd's order
    /// (`checker::revision_anomalies`).
    pub revision_anomalies: Vec<String>,
    /// Keys whose final value could not be read (lost writes are then not
    /// counted for them).
    pub unread_keys: u64,
    /// Snapshots installed from a leader, counted in the nodes' logs.
    pub snapshots_installed: usize,
    /// Snapshot installs a kill cut short, as the nodes logged when they
    /// restarted (before or after the WAL recorded the install): the
    /// proof that `snapshot-crash` lands inside installs.
    pub installs_cut: usize,
    /// Bytes the peer-link proxies delivered while the workload ran: if
    /// nodes reached each other around the proxies, the partitions would
    /// cut nothing, and this would be about zero.
    pub peer_link_bytes: u64,
    /// Reads made on the follower cluster.
    pub follower_reads: Vec<FollowerRead>,
    /// What the follower check found (empty: per-table sequential
    /// consistency held as far as the reads tell).
    pub follower_anomalies: Vec<String>,
    /// Nodes whose own state never matched the final one after healing,
    /// each with why: a replica that stopped its table (or lags for good)
    /// is a defect even when every answered operation was linearizable.
    pub diverged: Vec<String>,
    /// The whole history.
    pub history: Vec<Operation>,
}

/// How often a run prints its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_secs(30);

/// How long the final linearizable reads of every key used may take in
/// all.
const FINAL_READS_TIMEOUT: Duration = Duration::from_secs(60);

/// Readers per follower node.
const FOLLOWER_READERS_PER_NODE: u64 = 2;

/// How long every node has, after the final read, to show the final state
/// in its own serializable reads.
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a node's local read shows.
struct LocalRead {
    value: Value,
    /// The revision the value was written at (0 when missing).
    mod_revision: u64,
    /// The table revision the node had applied.
    revision: u64,
}

/// A node's local (serializable) read of `key`; `None` if it failed.
async fn local_read(client: &mut pb::kv_client::KvClient<Channel>, key: &str) -> Option<LocalRead> {
    let request = pb::RangeRequest {
        key: key.into(),
        serializable: true,
        ..pb::RangeRequest::default()
    };
    let response = tokio::time::timeout(OPERATION_TIMEOUT, client.range(request))
        .await
        .ok()?
        .ok()?
        .into_inner();
    let kv = response.kvs.first();
    Some(LocalRead {
        value: kv.map(|kv| String::from_utf8_lossy(&kv.value).to_string()),
        mod_revision: kv.map_or(0, |kv| kv.mod_revision as u64),
        revision: response.header.map_or(0, |header| header.revision as u64),
    })
}

/// The keys of a run: `slots` in use at once; a slot's key changes (from
/// `k3.0` to `k3.1`, ...) after `ops_per_key` operations on it, so no
/// key's history outgrows the checker.
struct KeySpace {
    ops_per_key: u64,
    used: Vec<std::sync::atomic::AtomicU64>,
}

impl KeySpace {
    /// `slots` keys at once (at least one), each for `ops_per_key`
    /// operations (at least one).
    fn new(slots: u64, ops_per_key: u64) -> KeySpace {
        KeySpace {
            ops_per_key: ops_per_key.max(1),
            used: (0..slots.max(1))
                .map(|_| std::sync::atomic::AtomicU64::new(0))
                .collect(),
        }
    }

    /// The key for the next operation in `slot`.
    fn take(&self, slot: u64) -> String {
        let index = (slot % self.used.len() as u64) as usize;
        let count = self.used[index].fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("k{index}.{}", count / self.ops_per_key)
    }

    /// The key `slot` is on now (for readers, which do not advance it).
    fn current(&self, slot: u64) -> String {
        let index = (slot % self.used.len() as u64) as usize;
        let count = self.used[index].load(std::sync::atomic::Ordering::Relaxed);
        format!("k{index}.{}", count.saturating_sub(1) / self.ops_per_key)
    }

    /// Every key an operation was taken for.
    fn all(&self) -> Vec<String> {
        let mut keys = Vec::new();
        for (index, used) in self.used.iter().enumerate() {
            let count = used.load(std::sync::atomic::Ordering::Relaxed);
            for generation in 0..count.div_ceil(self.ops_per_key) {
                keys.push(format!("k{index}.{generation}"));
            }
        }
        keys
    }

    fn slots(&self) -> u64 {
        self.used.len() as u64
    }
}

/// One follower reader: bound to one follower node, reading random keys
/// until the workload is over.
struct FollowerReader {
    process: u64,
    node: u64,
    api: SocketAddr,
    keys: Arc<KeySpace>,
    rng: Rng,
}

impl FollowerReader {
    /// Records each answered read in `reads`.
    async fn run(
        mut self,
        started: Instant,
        duration: Duration,
        reads: Arc<Mutex<Vec<FollowerRead>>>,
    ) {
        let Some(mut client) = connect(self.api).await else {
            return;
        };
        while started.elapsed() < duration {
            let key = self.keys.current(self.rng.next() % self.keys.slots());
            let call = started.elapsed().as_micros() as u64;
            let read = local_read(&mut client, &key).await;
            let ret = started.elapsed().as_micros() as u64;
            match read {
                Some(read) => {
                    reads
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(FollowerRead {
                            process: self.process,
                            node: self.node,
                            key,
                            value: read.value,
                            mod_revision: read.mod_revision,
                            revision: read.revision,
                            call,
                            ret,
                        });
                    tokio::time::sleep(FOLLOWER_READ_PAUSE).await;
                }
                None => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

/// Each ballast value's size.
const BALLAST_VALUE_BYTES: usize = 64 * 1024;

/// Writes `bytes` of ballast under `ballast/`, retrying each put until
/// the cluster takes it.
async fn write_ballast(address: SocketAddr, bytes: u64) -> std::io::Result<()> {
    let Some(mut client) = connect(address).await else {
        return Err(std::io::Error::other("no client channel for the ballast"));
    };
    let values = bytes.div_ceil(BALLAST_VALUE_BYTES as u64);
    for index in 0..values {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let request = pb::PutRequest {
                key: format!("ballast/{index:05}").into_bytes(),
                value: vec![b'.'; BALLAST_VALUE_BYTES],
                ..pb::PutRequest::default()
            };
            match client.put(request).await {
                Ok(_) => break,
                Err(status) if Instant::now() >= deadline => {
                    return Err(std::io::Error::other(format!(
                        "the cluster took no ballast for 30 s: {status}"
                    )))
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// A follower reader's pause between reads: local reads are cheap, and the
/// check's cost grows with their number.
const FOLLOWER_READ_PAUSE: Duration = Duration::from_millis(5);

/// Waits until each node's own reads show `finals`; gives the nodes that
/// never did, with the first difference seen last.
async fn check_convergence(
    apis: &[(String, SocketAddr)],
    finals: &BTreeMap<String, Value>,
) -> Vec<String> {
    let deadline = Instant::now() + CONVERGENCE_TIMEOUT;
    let mut diverged = Vec::new();
    for (node, api) in apis {
        let Some(mut client) = connect(*api).await else {
            diverged.push(format!("{node}: no client channel to {api}"));
            continue;
        };
        let mut difference;
        loop {
            difference = None;
            for (key, wanted) in finals {
                match local_read(&mut client, key).await.map(|read| read.value) {
                    Some(value) if value == *wanted => {}
                    Some(value) => {
                        difference = Some(format!(
                            "{node}: {key} reads {value:?}, the cluster's final value is {wanted:?}"
                        ));
                        break;
                    }
                    None => {
                        difference = Some(format!("{node}: a serializable read of {key} fails"));
                        break;
                    }
                }
            }
            if difference.is_none() || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        diverged.extend(difference);
    }
    diverged
}

/// The longest a client waits for one operation.
const OPERATION_TIMEOUT: Duration = Duration::from_secs(5);

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// `items` in an order `rng` picks (Fisher-Yates).
fn shuffled<T: Copy>(items: &[T], rng: &mut Rng) -> Vec<T> {
    let mut items = items.to_vec();
    for last in (1..items.len()).rev() {
        let other = (rng.next() % (last as u64 + 1)) as usize;
        items.swap(last, other);
    }
    items
}

/// `--raft.initial-members` for nodes 1, 2, … at `rafts`: `1=addr,2=addr`.
pub fn initial_members(rafts: &[SocketAddr]) -> String {
    rafts
        .iter()
        .enumerate()
        .map(|(position, address)| format!("{}={address}", position + 1))
        .collect::<Vec<_>>()
        .join(",")
}

/// A free port on 127.0.0.1 for a node that may be killed and restarted on
/// it. It is picked below Linux's ephemeral range (32768 and up), which
/// the kernel hands to outgoing connections: a port from that range, free
/// while its node is down, could be taken by any client's connection and
/// the restart would fail to bind. Ports are drawn from a per-process
/// sequence (so one test binary never hands one out twice) starting at a
/// point derived from the process id (so concurrent binaries rarely meet),
/// and bound once to check they are free.
pub fn free_address() -> std::io::Result<SocketAddr> {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST_PORT: u32 = 20_000;
    const PORTS: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let start = (std::process::id().wrapping_mul(7_919)) % PORTS;
    let _ = NEXT.compare_exchange(u32::MAX, start, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..PORTS {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % PORTS;
        let port = (FIRST_PORT + offset) as u16;
        if let Ok(listener) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            return listener.local_addr();
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free port on 127.0.0.1 in 20000..32000",
    ))
}

struct Node {
    id: u64,
    raft: SocketAddr,
    api: SocketAddr,
    members: String,
    /// `--raft.peer-addresses` (empty: not given).
    peer_addresses: String,
    /// Started with `--raft.join` (a replacement node).
    join: bool,
    dir: PathBuf,
    /// `leader` or `follower`.
    subcommand: &'static str,
    /// Flags after the common ones.
    extra: Vec<String>,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self, binary: &Path) -> std::io::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.with_extension("log"))?;
        let child = Command::new(binary)
            .args([self.subcommand, "--log-level", "info", "--raft.node-id"])
            .arg(self.id.to_string())
            .arg("--raft.address")
            .arg(self.raft.to_string())
            .arg("--raft.initial-members")
            .arg(&self.members)
            .arg("--api.address")
            .arg(self.api.to_string())
            .arg("--api.request-timeout-ms")
            .arg("2000")
            .arg("--raft.snapshot-entries")
            .arg(SNAPSHOT_ENTRIES.to_string())
            .arg("--raft.compaction-overhead")
            .arg(COMPACTION_OVERHEAD_ENTRIES.to_string())
            .arg("--data-dir")
            .arg(&self.dir)
            .args(&self.extra)
            .args(
                (!self.peer_addresses.is_empty())
                    .then_some(["--raft.peer-addresses", self.peer_addresses.as_str()])
                    .into_iter()
                    .flatten(),
            )
            .args(self.join.then_some("--raft.join"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP (`pause`) or SIGCONT the process.
    fn signal_pause(&self, pause: bool) {
        use rustix::process::{kill_process, Pid, Signal};
        let Some(child) = &self.child else {
            return;
        };
        let Some(pid) = Pid::from_raw(child.id() as i32) else {
            return;
        };
        let signal = if pause { Signal::STOP } else { Signal::CONT };
        let _ = kill_process(pid, signal);
    }

    /// Started and not exited (a node that aborted on a panic is down, and
    /// the final heal restarts it, as a supervisor would).
    fn is_running(&mut self) -> bool {
        matches!(
            self.child.as_mut().map(|child| child.try_wait()),
            Some(Ok(None))
        )
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The cluster and its proxies.
struct Cluster {
    nodes: Vec<Node>,
    /// (from, to) → the proxy `from` uses to reach `to`.
    peer_proxies: BTreeMap<(u64, u64), Proxy>,
    /// One client proxy per node.
    client_proxies: Vec<Proxy>,
    /// The follower cluster's nodes (none without one).
    followers: Vec<Node>,
    /// The link between the locations: one proxy per leader node, through
    /// which every follower node reaches that node's replication API. The
    /// followers are given all of them and move between them when one
    /// fails. Empty without a follower cluster.
    location_links: Vec<Proxy>,
    /// A `member-replace` whose node was removed and not yet added back:
    /// (slot, the new id).
    replacing: Option<(u64, u64)>,
}

/// The `--raft.initial-members` and `--raft.peer-addresses` values for the
/// node in `slot` when the slots' current ids are `ids`: itself at its own
/// address, every other slot's current id through the proxy from `slot`
/// to it, and every other id that slot may take (`member-replace`) through
/// the same proxy.
fn address_flags(
    slot: u64,
    ids: &[u64],
    own_raft: SocketAddr,
    proxies: &BTreeMap<(u64, u64), Proxy>,
) -> (String, String) {
    let nodes = ids.len() as u64;
    let mut members = Vec::new();
    let mut peers = Vec::new();
    for (position, id) in ids.iter().enumerate() {
        let other = position as u64 + 1;
        if other == slot {
            members.push(format!("{id}={own_raft}"));
            continue;
        }
        let address = proxies[&(slot, other)].address();
        members.push(format!("{id}={address}"));
        for generation in 0..=GENERATIONS_MAX {
            let later = other + generation * nodes;
            if later != *id {
                peers.push(format!("{later}={address}"));
            }
        }
    }
    (members.join(","), peers.join(","))
}

/// The raft and API addresses of `count` nodes, drawn in turn for each
/// node so that the ports match what the harness always picked.
fn node_addresses(count: u64) -> std::io::Result<(Vec<SocketAddr>, Vec<SocketAddr>)> {
    let mut rafts = Vec::new();
    let mut apis = Vec::new();
    for _ in 0..count {
        rafts.push(free_address()?);
        apis.push(free_address()?);
    }
    Ok((rafts, apis))
}

/// One proxy per ordered pair of nodes, listening on `any`: (from, to) →
/// the proxy `from` uses to reach `to`'s raft address, so that the
/// nemesis can cut each direction of each link on its own.
async fn start_peer_proxies(
    any: SocketAddr,
    rafts: &[SocketAddr],
) -> std::io::Result<BTreeMap<(u64, u64), Proxy>> {
    let count = rafts.len() as u64;
    let mut peer_proxies = BTreeMap::new();
    for from in 1..=count {
        for to in 1..=count {
            if from != to {
                let proxy = Proxy::start(any, rafts[to as usize - 1]).await?;
                peer_proxies.insert((from, to), proxy);
            }
        }
    }
    Ok(peer_proxies)
}

/// Starts the follower cluster behind the link between the locations:
/// one proxy per leader node's replication address, all of them given to
/// every follower node so that it can move between them.
async fn start_followers(
    config: &RunConfig,
    any: SocketAddr,
    replications: &[SocketAddr],
) -> std::io::Result<(Vec<Node>, Vec<Proxy>)> {
    let mut links = Vec::new();
    for replication in replications {
        links.push(Proxy::start(any, *replication).await?);
    }
    let leader_addresses = links
        .iter()
        .map(|link| link.address().to_string())
        .collect::<Vec<_>>()
        .join(",");
    let mut rafts = Vec::new();
    for _ in 0..config.followers {
        rafts.push(free_address()?);
    }
    let members = initial_members(&rafts);
    let mut followers = Vec::new();
    for id in 1..=config.followers {
        let mut node = Node {
            id,
            raft: rafts[id as usize - 1],
            api: free_address()?,
            members: members.clone(),
            peer_addresses: String::new(),
            join: false,
            dir: config.dir.join(format!("follower{id}")),
            subcommand: "follower",
            extra: vec![
                "--replication.leader-address".into(),
                leader_addresses.clone(),
                "--replication.metadata-interval-ms".into(),
                "100".into(),
            ],
            child: None,
        };
        node.start(&config.binary)?;
        followers.push(node);
    }
    Ok((followers, links))
}

impl Cluster {
    /// Starts the leader cluster's nodes behind their proxies, and the
    /// follower cluster when the run has one.
    async fn start(config: &RunConfig) -> std::io::Result<Cluster> {
        let count = config.nodes;
        let (rafts, apis) = node_addresses(count)?;
        let any: SocketAddr = "127.0.0.1:0".parse().map_err(std::io::Error::other)?;
        let peer_proxies = start_peer_proxies(any, &rafts).await?;
        let mut client_proxies = Vec::new();
        for api in &apis {
            client_proxies.push(Proxy::start(any, *api).await?);
        }
        let mut replications = Vec::new();
        for _ in 0..count {
            replications.push(free_address()?);
        }
        let ids: Vec<u64> = (1..=count).collect();
        let mut nodes = Vec::new();
        for id in ids.iter().copied() {
            let position = id as usize - 1;
            let (members, peer_addresses) = address_flags(id, &ids, rafts[position], &peer_proxies);
            let mut node = Node {
                id,
                raft: rafts[position],
                api: apis[position],
                members,
                peer_addresses,
                join: false,
                dir: config.dir.join(format!("node{id}")),
                subcommand: "leader",
                extra: vec![
                    "--replication.address".into(),
                    replications[position].to_string(),
                ],
                child: None,
            };
            node.start(&config.binary)?;
            nodes.push(node);
        }
        let (followers, location_links) = if config.followers == 0 {
            (Vec::new(), Vec::new())
        } else {
            start_followers(config, any, &replications).await?
        };
        Ok(Cluster {
            nodes,
            peer_proxies,
            client_proxies,
            followers,
            location_links,
            replacing: None,
        })
    }

    /// The slot whose node has id `id` now.
    fn slot_of(&self, id: u64) -> Option<u64> {
        self.nodes
            .iter()
            .position(|node| node.id == id)
            .map(|position| position as u64 + 1)
    }

    fn slow(&self, node: u64, delay: Duration) {
        for ((from, to), proxy) in &self.peer_proxies {
            if *from == node || *to == node {
                proxy.slow(delay);
            }
        }
    }

    /// Cuts the peer links, both ways, between every node of `a` and every
    /// node of `b`.
    fn cut_between(&self, a: &[u64], b: &[u64]) {
        for ((from, to), proxy) in &self.peer_proxies {
            let across =
                (a.contains(from) && b.contains(to)) || (b.contains(from) && a.contains(to));
            if across {
                proxy.cut();
            }
        }
    }

    /// Cuts every peer link of `node`.
    fn isolate(&self, node: u64) {
        let others: Vec<u64> = (1..=self.nodes.len() as u64)
            .filter(|other| *other != node)
            .collect();
        self.cut_between(&[node], &others);
    }

    fn heal_all(&self) {
        for proxy in self.peer_proxies.values().chain(&self.location_links) {
            proxy.heal();
        }
    }
}

/// The etcd table's leader as some node reports it.
async fn find_leader(client_addresses: &[SocketAddr]) -> Option<u64> {
    for address in client_addresses {
        let Some(channel) = channel(*address, Duration::from_secs(1)) else {
            continue;
        };
        let mut client = pb::maintenance_client::MaintenanceClient::new(channel);
        if let Ok(status) = client.status(pb::StatusRequest {}).await {
            let leader = status.into_inner().leader;
            if leader != 0 {
                return Some(leader);
            }
        }
    }
    None
}

/// Asks `address`'s node to move the etcd table's leadership to `target`.
/// What `move_leader` says when the node accepted the transfer.
const MOVE_LEADER_DONE: &str = "done";

async fn move_leader(address: SocketAddr, target: u64) -> String {
    let Some(channel) = channel(address, Duration::from_secs(5)) else {
        return format!("bad address {address}");
    };
    let mut client = pb::maintenance_client::MaintenanceClient::new(channel);
    match client
        .move_leader(pb::MoveLeaderRequest { target_id: target })
        .await
    {
        Ok(_) => MOVE_LEADER_DONE.into(),
        Err(status) => format!("{:?}: {}", status.code(), status.message()),
    }
}

/// `count` distinct nodes of `1..=nodes`, drawn with `rng`.
fn draw_nodes(rng: &mut Rng, nodes: u64, count: u64) -> Vec<u64> {
    let mut pool: Vec<u64> = (1..=nodes).collect();
    let mut drawn = Vec::new();
    while (drawn.len() as u64) < count && !pool.is_empty() {
        let position = (rng.next() % pool.len() as u64) as usize;
        drawn.push(pool.swap_remove(position));
    }
    drawn
}

/// A lazily connecting channel to `address`, each call bounded by
/// `timeout`.
fn channel(address: SocketAddr, timeout: Duration) -> Option<Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .ok()?
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout);
    Some(endpoint.connect_lazy())
}

async fn connect(address: SocketAddr) -> Option<pb::kv_client::KvClient<Channel>> {
    channel(address, Duration::from_secs(4)).map(pb::kv_client::KvClient::new)
}

/// Whether a failed write may still have taken effect.
fn write_outcome(status: &tonic::Status) -> Outcome {
    // The connection was never made: the request never left.
    let message = format!("{status:?}");
    if message.contains("tcp connect error") || message.contains("Connection refused") {
        return Outcome::Fail;
    }
    match status.code() {
        tonic::Code::InvalidArgument
        | tonic::Code::ResourceExhausted
        | tonic::Code::NotFound
        | tonic::Code::OutOfRange
        | tonic::Code::Unimplemented => Outcome::Fail,
        _ => Outcome::Info,
    }
}

/// Runs `op`; for an acknowledged write, also the revision it took effect
/// at.
async fn run_op(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
    op: &Op,
) -> (Outcome, Option<u64>) {
    match op {
        Op::Get => run_get(client, key).await,
        Op::Put(value) => run_put(client, key, value).await,
        Op::Delete => run_delete(client, key).await,
        Op::Cas { expected, new } => run_cas(client, key, expected, new).await,
    }
}

/// The revision a response header carries, if it has one.
fn header_revision(header: Option<pb::ResponseHeader>) -> Option<u64> {
    header.map(|h| h.revision as u64)
}

/// A linearizable get of `key`: a read's outcome carries no revision.
async fn run_get(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
) -> (Outcome, Option<u64>) {
    let request = pb::RangeRequest {
        key: key.into(),
        ..pb::RangeRequest::default()
    };
    match client.range(request).await {
        Ok(response) => (
            Outcome::Read(
                response
                    .into_inner()
                    .kvs
                    .first()
                    .map(|kv| String::from_utf8_lossy(&kv.value).to_string()),
            ),
            None,
        ),
        Err(_) => (Outcome::Fail, None),
    }
}

/// A put of `value` at `key`, with the revision it took effect at.
async fn run_put(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
    value: &str,
) -> (Outcome, Option<u64>) {
    let request = pb::PutRequest {
        key: key.into(),
        value: value.as_bytes().to_vec(),
        ..pb::PutRequest::default()
    };
    match client.put(request).await {
        Ok(response) => (Outcome::Done, header_revision(response.into_inner().header)),
        Err(status) => (write_outcome(&status), None),
    }
}

/// A delete of `key`, with the revision it took effect at.
async fn run_delete(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
) -> (Outcome, Option<u64>) {
    let request = pb::DeleteRangeRequest {
        key: key.into(),
        ..pb::DeleteRangeRequest::default()
    };
    match client.delete_range(request).await {
        Ok(response) => (Outcome::Done, header_revision(response.into_inner().header)),
        Err(status) => (write_outcome(&status), None),
    }
}

/// The comparison a compare-and-set makes: `key` holds `expected`, or is
/// missing (version 0) when `expected` is `None`.
fn cas_compare(key: &str, expected: &Value) -> pb::Compare {
    use pb::compare::{CompareResult, CompareTarget, TargetUnion};
    match expected {
        Some(value) => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Value as i32,
            key: key.into(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Value(value.clone().into_bytes())),
        },
        None => pb::Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Version as i32,
            key: key.into(),
            range_end: Vec::new(),
            target_union: Some(TargetUnion::Version(0)),
        },
    }
}

/// A compare-and-set as an etcd transaction; only a swap carries the
/// revision it took effect at, since a refused one wrote nothing.
async fn run_cas(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
    expected: &Value,
    new: &str,
) -> (Outcome, Option<u64>) {
    let request = pb::TxnRequest {
        compare: vec![cas_compare(key, expected)],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.into(),
                value: new.as_bytes().to_vec(),
                ..pb::PutRequest::default()
            })),
        }],
        failure: Vec::new(),
    };
    match client.txn(request).await {
        Ok(response) => {
            let response = response.into_inner();
            let swapped = response.succeeded;
            let at = if swapped {
                header_revision(response.header)
            } else {
                None
            };
            (Outcome::Swapped(swapped), at)
        }
        Err(status) => (write_outcome(&status), None),
    }
}

/// What a node logs when it installed a snapshot from its leader.
const SNAPSHOT_INSTALLED: &str = "installed a snapshot from the leader";

fn lock(cluster: &Mutex<Cluster>) -> std::sync::MutexGuard<'_, Cluster> {
    cluster.lock().unwrap_or_else(|p| p.into_inner())
}

/// Whether `fault` would act on the process of `slot` while that slot's
/// replacement is pending: its old member was removed, killed and wiped,
/// and its new one not yet added. Restarting it would bring back the
/// removed member with no data, which no operator does (seed 2602 did,
/// and the slot never converged).
fn is_being_replaced(fault: Fault, slot: u64, cluster: &Mutex<Cluster>) -> bool {
    let acts_on_process = matches!(fault, Fault::Kill | Fault::SnapshotCrash | Fault::Pause);
    acts_on_process
        && lock(cluster)
            .replacing
            .is_some_and(|(replacing, _)| replacing == slot)
}

/// Starts `fault` (on `node` where it takes one); returns whether it acted
/// and what was done.
async fn inject(
    fault: Fault,
    node: u64,
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    rng: &mut Rng,
) -> (bool, String) {
    let nodes = client_addresses.len() as u64;
    if is_being_replaced(fault, node, cluster) {
        return (
            false,
            format!(
                "{} node {node}: it is being replaced, nothing done",
                fault.name()
            ),
        );
    }
    match fault {
        Fault::Kill | Fault::SnapshotCrash => {
            lock(cluster).nodes[node as usize - 1].kill();
            (true, format!("{} node {node}: kill", fault.name()))
        }
        Fault::Pause => {
            lock(cluster).nodes[node as usize - 1].signal_pause(true);
            (true, format!("pause node {node}"))
        }
        Fault::Partition => {
            lock(cluster).isolate(node);
            (true, format!("isolate node {node}"))
        }
        Fault::IsolateLeader => isolate_leader(cluster, client_addresses).await,
        Fault::Minority => cut_minority(cluster, nodes, rng),
        Fault::Bridge => cut_bridge(cluster, nodes, rng),
        Fault::Slow => {
            lock(cluster).slow(node, Duration::from_millis(50));
            (true, format!("slow node {node} by 50 ms"))
        }
        Fault::CutLocation => cut_location(cluster),
        Fault::TransferLeader => transfer_leader(node, cluster, client_addresses, rng).await,
        Fault::MemberReplace => remove_member(node, cluster, client_addresses).await,
    }
}

/// `isolate-leader`: cuts every peer link of the node some node reports
/// as the etcd table's leader.
async fn isolate_leader(
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
) -> (bool, String) {
    let Some(leader) = find_leader(client_addresses).await else {
        return (
            false,
            "isolate the leader: no leader known, nothing done".into(),
        );
    };
    let cluster = lock(cluster);
    match cluster.slot_of(leader) {
        Some(slot) => {
            cluster.isolate(slot);
            (true, format!("isolate the leader, node {leader}"))
        }
        None => (
            false,
            format!("isolate the leader: node {leader} is gone, nothing done"),
        ),
    }
}

/// `minority`: cuts a random minority of the `nodes` from the majority.
fn cut_minority(cluster: &Mutex<Cluster>, nodes: u64, rng: &mut Rng) -> (bool, String) {
    let minority = draw_nodes(rng, nodes, (nodes - 1) / 2);
    let majority: Vec<u64> = (1..=nodes).filter(|n| !minority.contains(n)).collect();
    lock(cluster).cut_between(&minority, &majority);
    (
        true,
        format!("cut minority {minority:?} from majority {majority:?}"),
    )
}

/// `bridge`: splits the `nodes` into two halves that only a random bridge
/// node still connects.
fn cut_bridge(cluster: &Mutex<Cluster>, nodes: u64, rng: &mut Rng) -> (bool, String) {
    let order = draw_nodes(rng, nodes, nodes);
    let bridge = order[0];
    let (left, right) = order[1..].split_at((order.len() - 1) / 2);
    lock(cluster).cut_between(left, right);
    (
        true,
        format!("bridge node {bridge} alone joins {left:?} and {right:?}"),
    )
}

/// `cut-location`: cuts every follower node's link to the leader cluster;
/// nothing to do without a follower cluster.
fn cut_location(cluster: &Mutex<Cluster>) -> (bool, String) {
    let cluster = lock(cluster);
    if cluster.location_links.is_empty() {
        return (
            false,
            "cut the link between the locations: no follower cluster, nothing done".into(),
        );
    }
    for link in &cluster.location_links {
        link.cut();
    }
    (true, "cut the link between the locations".into())
}

/// `transfer-leader`: asks a random node to move the etcd table's
/// leadership to the node in `slot`; a refused transfer did nothing.
async fn transfer_leader(
    slot: u64,
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    rng: &mut Rng,
) -> (bool, String) {
    let via = 1 + rng.next() % client_addresses.len() as u64;
    let (target, via_id) = {
        let cluster = lock(cluster);
        (
            cluster.nodes[slot as usize - 1].id,
            cluster.nodes[via as usize - 1].id,
        )
    };
    let outcome = move_leader(client_addresses[via as usize - 1], target).await;
    let what = format!("move the leadership to node {target}, asking node {via_id}: {outcome}");
    if outcome == MOVE_LEADER_DONE {
        (true, what)
    } else {
        (false, format!("{what}, nothing done"))
    }
}

/// A membership change the nemesis asks for.
enum Change {
    Remove {
        id: u64,
    },
    Add {
        id: u64,
        raft: SocketAddr,
        client_url: String,
    },
}

/// Asks the nodes at `via`, in turn, to make `change` (Regatta's
/// Membership API), until one accepts. A change that fails with an
/// unknown outcome is checked against the member list.
async fn change_membership(via: &[SocketAddr], change: &Change) -> Result<(), String> {
    let mut last = "no node to ask".to_string();
    for address in via {
        let Some(channel) = channel(*address, Duration::from_secs(10)) else {
            continue;
        };
        let mut client = rpb::membership_client::MembershipClient::new(channel);
        let result = match change {
            Change::Remove { id } => client.remove(rpb::MemberIdRequest { id: *id }).await,
            Change::Add {
                id,
                raft,
                client_url,
            } => {
                client
                    .add(rpb::MemberAddRequest {
                        id: *id,
                        raft_address: raft.to_string(),
                        client_url: client_url.clone(),
                        learner: false,
                    })
                    .await
            }
        };
        match result {
            Ok(_) => return Ok(()),
            Err(status) => last = format!("{:?}: {}", status.code(), status.message()),
        }
    }
    // The change may have been made although no answer said so.
    let done = match (member_ids(via).await, change) {
        (Some(ids), Change::Remove { id }) => !ids.contains(id),
        (Some(ids), Change::Add { id, .. }) => ids.contains(id),
        (None, _) => false,
    };
    if done {
        Ok(())
    } else {
        Err(last)
    }
}

/// The member ids as the first node of `via` that answers lists them.
async fn member_ids(via: &[SocketAddr]) -> Option<Vec<u64>> {
    for address in via {
        let Some(channel) = channel(*address, Duration::from_secs(5)) else {
            continue;
        };
        let request = pb::MemberListRequest { linearizable: true };
        if let Ok(response) = pb::cluster_client::ClusterClient::new(channel)
            .member_list(request)
            .await
        {
            return Some(response.into_inner().members.iter().map(|m| m.id).collect());
        }
    }
    None
}

/// The client addresses of every slot but `slot`.
fn others(slot: u64, client_addresses: &[SocketAddr]) -> Vec<SocketAddr> {
    client_addresses
        .iter()
        .enumerate()
        .filter(|(position, _)| *position as u64 + 1 != slot)
        .map(|(_, address)| *address)
        .collect()
}

/// `member-replace`, first half: removes the node in `slot` from the
/// cluster, then kills it and wipes its data.
async fn remove_member(
    slot: u64,
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
) -> (bool, String) {
    let (id, nodes) = {
        let cluster = lock(cluster);
        (
            cluster.nodes[slot as usize - 1].id,
            cluster.nodes.len() as u64,
        )
    };
    let new_id = id + nodes;
    if new_id > slot + GENERATIONS_MAX * nodes {
        return (
            false,
            format!("replace node {id}: no ids left for its slot, nothing done"),
        );
    }
    let via = others(slot, client_addresses);
    if let Err(error) = change_membership(&via, &Change::Remove { id }).await {
        return (
            false,
            format!("replace node {id}: the removal was refused ({error}), nothing done"),
        );
    }
    let mut cluster = lock(cluster);
    let node = &mut cluster.nodes[slot as usize - 1];
    node.kill();
    let wiped = match std::fs::remove_dir_all(&node.dir) {
        Ok(()) => "wiped".to_string(),
        Err(error) => format!("not wiped ({error})"),
    };
    cluster.replacing = Some((slot, new_id));
    (
        true,
        format!(
            "replace node {id}: removed, killed, its data {wiped}; it returns as node {new_id}"
        ),
    )
}

/// `member-replace`, second half: adds the new id of the slot being
/// replaced and starts its node empty with `--raft.join`. Tries until
/// `deadline`; on failure the replacement stays pending.
async fn add_member(
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    binary: &Path,
    deadline: Instant,
) -> std::io::Result<String> {
    let Some((slot, new_id)) = lock(cluster).replacing else {
        return Ok("no replacement pending".into());
    };
    let (raft, api) = {
        let cluster = lock(cluster);
        let node = &cluster.nodes[slot as usize - 1];
        (node.raft, node.api)
    };
    let change = Change::Add {
        id: new_id,
        raft,
        client_url: format!("http://{api}"),
    };
    let via = others(slot, client_addresses);
    loop {
        match change_membership(&via, &change).await {
            Ok(()) => break,
            Err(error) if Instant::now() >= deadline => {
                return Ok(format!(
                    "add node {new_id}: refused ({error}); still pending"
                ));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
    let mut cluster = lock(cluster);
    let mut ids: Vec<u64> = cluster.nodes.iter().map(|node| node.id).collect();
    ids[slot as usize - 1] = new_id;
    let (members, peer_addresses) = address_flags(slot, &ids, raft, &cluster.peer_proxies);
    let node = &mut cluster.nodes[slot as usize - 1];
    node.id = new_id;
    node.members = members;
    node.peer_addresses = peer_addresses;
    node.join = true;
    node.start(binary)?;
    cluster.replacing = None;
    Ok(format!("add node {new_id} and start it empty"))
}

/// Ends `fault`; returns what was done.
async fn heal(
    fault: Fault,
    node: u64,
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    binary: &Path,
    rng: &mut Rng,
) -> std::io::Result<String> {
    let index = node as usize - 1;
    if is_being_replaced(fault, node, cluster) {
        return Ok("nothing to heal".into());
    }
    Ok(match fault {
        Fault::Kill => {
            lock(cluster).nodes[index].start(binary)?;
            format!("restart node {node}")
        }
        Fault::SnapshotCrash => {
            // The others compacted past its log meanwhile: it restarts
            // into a snapshot install, and is killed again within it.
            lock(cluster).nodes[index].start(binary)?;
            let delay_ms = 100 + rng.next() % 500;
            tokio::time::sleep(Duration::from_millis(delay_ms)).await;
            lock(cluster).nodes[index].kill();
            tokio::time::sleep(Duration::from_millis(100)).await;
            lock(cluster).nodes[index].start(binary)?;
            format!("restart node {node}, kill it again after {delay_ms} ms, restart it")
        }
        Fault::Pause => {
            lock(cluster).nodes[index].signal_pause(false);
            format!("resume node {node}")
        }
        Fault::Partition
        | Fault::IsolateLeader
        | Fault::Minority
        | Fault::Bridge
        | Fault::CutLocation => {
            lock(cluster).heal_all();
            "heal every link".into()
        }
        Fault::Slow => {
            lock(cluster).slow(node, Duration::ZERO);
            format!("unslow node {node}")
        }
        Fault::TransferLeader => "nothing to heal".into(),
        Fault::MemberReplace => {
            let deadline = Instant::now() + Duration::from_secs(10);
            add_member(cluster, client_addresses, binary, deadline).await?
        }
    })
}

/// Runs the workload and the nemesis, then checks the history.
pub async fn run(config: RunConfig) -> std::io::Result<Report> {
    std::fs::create_dir_all(&config.dir)?;
    let cluster = Arc::new(Mutex::new(Cluster::start(&config).await?));
    let client_addresses: Vec<SocketAddr> = lock(&cluster)
        .client_proxies
        .iter()
        .map(Proxy::address)
        .collect();
    // Let the cluster elect and create the etcd table.
    tokio::time::sleep(Duration::from_secs(2)).await;
    write_ballast(client_addresses[0], config.ballast_bytes).await?;
    let peer_bytes_at_start = peer_bytes(&cluster);
    let workload = Workload {
        started: Instant::now(),
        history: Arc::default(),
        keys: Arc::new(KeySpace::new(config.keys, config.ops_per_key)),
        follower_reads: Arc::default(),
    };
    let mut workers = workload.spawn_clients(&config, &client_addresses);
    workers.extend(workload.spawn_follower_readers(&config, &cluster));
    let progress = workload.spawn_progress(config.duration);
    let nemesis = run_nemesis(&config, workload.started, &cluster, &client_addresses).await?;
    for worker in workers {
        let _ = worker.await;
    }
    progress.abort();
    println!("workload over; healing every fault and reading the final state");
    let peer_link_bytes = peer_bytes(&cluster) - peer_bytes_at_start;

    let end = final_state(&cluster, &client_addresses, &config.binary, &workload).await?;
    let (snapshots_installed, installs_cut) = logged_installs(&cluster);
    let follower_reads = std::mem::take(
        &mut *workload
            .follower_reads
            .lock()
            .unwrap_or_else(|p| p.into_inner()),
    );
    let history = std::mem::take(&mut *workload.history.lock().unwrap_or_else(|p| p.into_inner()));
    Ok(check_run(
        &config,
        nemesis,
        end,
        RunCounts {
            peer_link_bytes,
            snapshots_installed,
            installs_cut,
        },
        follower_reads,
        history,
    ))
}

/// What the end of a run found: the keys used, the final values read
/// linearizably, and the nodes that never showed them.
struct FinalState {
    used_keys: Vec<String>,
    finals: BTreeMap<String, Value>,
    diverged: Vec<String>,
}

/// Heals everything, then reads the final state linearizably and waits
/// for every node to show it. A replacement still pending is finished
/// first; if its node cannot be added, its slot stays down and is
/// reported.
async fn final_state(
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    binary: &Path,
    workload: &Workload,
) -> std::io::Result<FinalState> {
    let (down, unfinished) = heal_for_final_reads(cluster, client_addresses, binary).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used_keys = workload.keys.all();
    let finals = workload.read_finals(client_addresses, &used_keys).await;
    let apis = convergence_apis(cluster, down);
    let mut diverged = check_convergence(&apis, &finals).await;
    diverged.extend(unfinished);
    Ok(FinalState {
        used_keys,
        finals,
        diverged,
    })
}

/// What a run counted outside the history: bytes over the peer links and
/// snapshot installs in the nodes' logs.
struct RunCounts {
    peer_link_bytes: u64,
    snapshots_installed: usize,
    installs_cut: usize,
}

/// Runs every check over the history and the follower reads, and puts
/// the report together.
fn check_run(
    config: &RunConfig,
    nemesis: NemesisLog,
    end: FinalState,
    counts: RunCounts,
    follower_reads: Vec<FollowerRead>,
    history: Vec<Operation>,
) -> Report {
    let (ok, fail, info) = outcome_counts(&history);
    let lost = checker::lost_writes(&history, &end.finals);
    let revision_anomalies = checker::revision_anomalies(&history);
    let unread_keys = (end.used_keys.len() - end.finals.len()) as u64;
    println!(
        "checking {} operations on {} keys and {} follower reads",
        history.len(),
        end.used_keys.len(),
        follower_reads.len()
    );
    let verdict = checker::check(&history);
    let follower_anomalies = sequential::check_follower(&history, &follower_reads);
    Report {
        seed: config.seed,
        schedule: nemesis.schedule,
        faults: nemesis.injected,
        faults_not_acted: nemesis.faults_not_acted,
        ok,
        fail,
        info,
        verdict,
        lost_writes: lost,
        revision_anomalies,
        unread_keys,
        snapshots_installed: counts.snapshots_installed,
        installs_cut: counts.installs_cut,
        peer_link_bytes: counts.peer_link_bytes,
        follower_reads,
        follower_anomalies,
        diverged: end.diverged,
        history,
    }
}

/// Bytes the peer-link proxies have delivered so far.
fn peer_bytes(cluster: &Mutex<Cluster>) -> u64 {
    lock(cluster)
        .peer_proxies
        .values()
        .map(Proxy::forwarded_bytes)
        .sum()
}

/// What the workload's tasks share: the clock every time in the history
/// is measured from, the history, the keys and the follower reads.
struct Workload {
    started: Instant,
    history: Arc<Mutex<Vec<Operation>>>,
    keys: Arc<KeySpace>,
    follower_reads: Arc<Mutex<Vec<FollowerRead>>>,
}

impl Workload {
    /// Starts one recording client per process, spread over the client
    /// proxies in turn.
    fn spawn_clients(
        &self,
        config: &RunConfig,
        client_addresses: &[SocketAddr],
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let mut workers = Vec::new();
        for process in 0..config.clients {
            let client = Client {
                process,
                address: client_addresses[(process % client_addresses.len() as u64) as usize],
                keys: Arc::clone(&self.keys),
                rng: Rng(config.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (process + 1)),
            };
            workers.push(tokio::spawn(client.run(
                self.started,
                config.duration,
                Arc::clone(&self.history),
            )));
        }
        workers
    }

    /// Starts `FOLLOWER_READERS_PER_NODE` readers on each follower node,
    /// numbered after the clients.
    fn spawn_follower_readers(
        &self,
        config: &RunConfig,
        cluster: &Mutex<Cluster>,
    ) -> Vec<tokio::task::JoinHandle<()>> {
        let follower_apis: Vec<(u64, SocketAddr)> = lock(cluster)
            .followers
            .iter()
            .map(|node| (node.id, node.api))
            .collect();
        let mut workers = Vec::new();
        for (position, (node, api)) in follower_apis.iter().enumerate() {
            for reader in 0..FOLLOWER_READERS_PER_NODE {
                let process = config.clients + position as u64 * FOLLOWER_READERS_PER_NODE + reader;
                let reader = FollowerReader {
                    process,
                    node: *node,
                    api: *api,
                    keys: Arc::clone(&self.keys),
                    rng: Rng(config.seed.wrapping_mul(0x2545_F491_4F6C_DD1D) ^ (process + 1)),
                };
                workers.push(tokio::spawn(reader.run(
                    self.started,
                    config.duration,
                    Arc::clone(&self.follower_reads),
                )));
            }
        }
        workers
    }

    /// Progress on a long run: prints the operations so far every
    /// `PROGRESS_INTERVAL` until the workload is over.
    fn spawn_progress(&self, duration: Duration) -> tokio::task::JoinHandle<()> {
        let history = Arc::clone(&self.history);
        let started = self.started;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROGRESS_INTERVAL).await;
                if started.elapsed() >= duration {
                    return;
                }
                let (ok, fail, info) =
                    outcome_counts(&history.lock().unwrap_or_else(|p| p.into_inner()));
                println!(
                    "{:>5} s of {}: {ok} ok, {fail} fail, {info} info",
                    started.elapsed().as_secs(),
                    duration.as_secs()
                );
            }
        })
    }

    /// Reads the final value of every key in `used_keys` linearizably,
    /// through each node in turn: one node that does not recover must not
    /// hide the final state (the convergence check reports that node).
    /// Keys left unread are missing from the map.
    async fn read_finals(
        &self,
        client_addresses: &[SocketAddr],
        used_keys: &[String],
    ) -> BTreeMap<String, Value> {
        let mut finals: BTreeMap<String, Value> = BTreeMap::new();
        let mut clients = Vec::new();
        for address in client_addresses {
            clients.extend(connect(*address).await);
        }
        // One deadline for all of them: a cluster that cannot answer must
        // not hold the run for 20 attempts of every key (the keys left are
        // reported unread, which fails the run).
        let reads_deadline = Instant::now() + FINAL_READS_TIMEOUT;
        for key in used_keys {
            let attempts = FinalReadAttempts {
                nodes: client_addresses.len(),
                deadline: reads_deadline,
            };
            if let Some(value) = self.read_final(&mut clients, key, attempts).await {
                finals.insert(key.clone(), value);
            }
        }
        finals
    }

    /// Reads `key` through the nodes in turn, up to 20 times before the
    /// deadline, and records the answer in the history.
    async fn read_final(
        &self,
        clients: &mut [pb::kv_client::KvClient<Channel>],
        key: &str,
        attempts: FinalReadAttempts,
    ) -> Option<Value> {
        for attempt in 0..20 {
            if Instant::now() >= attempts.deadline {
                break;
            }
            let client = clients.get_mut(attempt % attempts.nodes.max(1))?;
            let call = self.started.elapsed().as_micros() as u64;
            let read = tokio::time::timeout(OPERATION_TIMEOUT, run_op(client, key, &Op::Get)).await;
            let ret = self.started.elapsed().as_micros() as u64;
            if let Ok((Outcome::Read(value), _)) = read {
                // Into the history too: the checker, not only the lost
                // write count, must square every write with the final
                // state (a lost write with nothing after it is caught
                // only so).
                self.history
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(Operation {
                        process: FINAL_READS_PROCESS,
                        key: key.to_string(),
                        op: Op::Get,
                        call,
                        ret,
                        outcome: Outcome::Read(value.clone()),
                        revision: None,
                    });
                return Some(value);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
}

/// Where and until when the final reads of one key may be tried.
#[derive(Clone, Copy)]
struct FinalReadAttempts {
    /// The leader cluster's nodes, which the attempts go through in turn.
    nodes: usize,
    /// When the final reads of every key must stop.
    deadline: Instant,
}

/// (ok, fail, info): operations that completed, that definitely failed,
/// and whose outcome is unknown.
fn outcome_counts(history: &[Operation]) -> (usize, usize, usize) {
    let (mut ok, mut fail, mut info) = (0, 0, 0);
    for operation in history {
        match operation.outcome {
            Outcome::Fail => fail += 1,
            Outcome::Info => info += 1,
            _ => ok += 1,
        }
    }
    (ok, fail, info)
}

/// One recording client: runs random operations on the keys through one
/// node until the workload is over.
struct Client {
    process: u64,
    address: SocketAddr,
    keys: Arc<KeySpace>,
    rng: Rng,
}

impl Client {
    /// Records each operation, with its invoke and completion times, in
    /// `history`.
    async fn run(
        mut self,
        started: Instant,
        duration: Duration,
        history: Arc<Mutex<Vec<Operation>>>,
    ) {
        let Some(mut client) = connect(self.address).await else {
            return;
        };
        let mut written = 0u64;
        while started.elapsed() < duration {
            let key = self.keys.take(self.rng.next() % self.keys.slots());
            written += 1;
            let op = self.draw_op(written);
            let call = started.elapsed().as_micros() as u64;
            let (outcome, revision) = timed_op(&mut client, &key, &op).await;
            let ret = started.elapsed().as_micros() as u64;
            let failed = matches!(outcome, Outcome::Fail | Outcome::Info);
            history
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(Operation {
                    process: self.process,
                    key,
                    op,
                    call,
                    ret,
                    outcome,
                    revision,
                });
            if failed {
                // Do not flood a node that is down or cut off.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// The client's `written`-th operation: 40% gets, 30% puts, 10%
    /// deletes, 20% compare-and-sets, most of them expecting the client's
    /// previous value and the rest a missing key.
    fn draw_op(&mut self, written: u64) -> Op {
        let process = self.process;
        let value = format!("{process}-{written}");
        match self.rng.next() % 10 {
            0..=3 => Op::Get,
            4..=6 => Op::Put(value),
            7 => Op::Delete,
            _ => Op::Cas {
                expected: (!self.rng.next().is_multiple_of(4))
                    .then(|| format!("{process}-{}", written.saturating_sub(1))),
                new: value,
            },
        }
    }
}

/// Runs `op` within `OPERATION_TIMEOUT`.
async fn timed_op(
    client: &mut pb::kv_client::KvClient<Channel>,
    key: &str,
    op: &Op,
) -> (Outcome, Option<u64>) {
    match tokio::time::timeout(OPERATION_TIMEOUT, run_op(client, key, op)).await {
        Ok(answer) => answer,
        // No answer: a write's outcome is unknown, a read's does not
        // matter.
        Err(_) if *op == Op::Get => (Outcome::Fail, None),
        Err(_) => (Outcome::Info, None),
    }
}

/// What the nemesis did.
struct NemesisLog {
    /// Every injection and heal, with its time in ms.
    schedule: Vec<(u64, String)>,
    /// The faults that acted, in order.
    injected: Vec<Fault>,
    /// Faults drawn that found nothing to act on.
    faults_not_acted: usize,
}

/// The nemesis: a fault every 2 s, healed 1 s later, until the workload
/// is within 2 s of its end.
async fn run_nemesis(
    config: &RunConfig,
    started: Instant,
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
) -> std::io::Result<NemesisLog> {
    let mut log = NemesisLog {
        schedule: Vec::new(),
        injected: Vec::new(),
        faults_not_acted: 0,
    };
    let mut rng = Rng(config.seed ^ 0xA5A5_5A5A_1234_5678);
    let mut deck: Vec<Fault> = Vec::new();
    while started.elapsed() + Duration::from_secs(2) < config.duration && !config.faults.is_empty()
    {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if deck.is_empty() {
            deck = shuffled(&config.faults, &mut rng);
        }
        let Some(fault) = deck.pop() else {
            break;
        };
        let node = 1 + rng.next() % config.nodes;
        let target = Target {
            fault,
            node,
            cluster,
            client_addresses,
        };
        if target
            .inject_with_retries(started, &mut rng, &mut log.schedule)
            .await
        {
            log.injected.push(fault);
        } else {
            log.faults_not_acted += 1;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let at = started.elapsed().as_millis() as u64;
        let what = heal(
            fault,
            node,
            cluster,
            client_addresses,
            &config.binary,
            &mut rng,
        )
        .await?;
        log.schedule.push((at, what));
    }
    Ok(log)
}

/// One fault the nemesis drew, with the node it falls on and the cluster
/// it acts in.
struct Target<'a> {
    fault: Fault,
    node: u64,
    cluster: &'a Mutex<Cluster>,
    client_addresses: &'a [SocketAddr],
}

impl Target<'_> {
    /// Injects the fault; one that found nothing to act on (no leader
    /// known yet, say) is tried again a few times within its slot. Every
    /// attempt goes into `schedule`; returns whether one acted.
    async fn inject_with_retries(
        &self,
        started: Instant,
        rng: &mut Rng,
        schedule: &mut Vec<(u64, String)>,
    ) -> bool {
        let mut attempts = 0;
        loop {
            let at = started.elapsed().as_millis() as u64;
            let (acted, what) = inject(
                self.fault,
                self.node,
                self.cluster,
                self.client_addresses,
                rng,
            )
            .await;
            schedule.push((at, what));
            attempts += 1;
            if acted || attempts >= INJECT_ATTEMPTS_MAX {
                return acted;
            }
            tokio::time::sleep(INJECT_RETRY_DELAY).await;
        }
    }
}

/// Heals every link, finishes a pending replacement and restarts every
/// node that is down, so that the final reads see the whole cluster.
/// Returns the slot left down by a replacement that could not finish,
/// and why, for the report.
async fn heal_for_final_reads(
    cluster: &Mutex<Cluster>,
    client_addresses: &[SocketAddr],
    binary: &Path,
) -> std::io::Result<(Option<u64>, Vec<String>)> {
    lock(cluster).heal_all();
    let deadline = Instant::now() + CONVERGENCE_TIMEOUT;
    let pending = add_member(cluster, client_addresses, binary, deadline).await?;
    let mut unfinished = Vec::new();
    let down = lock(cluster).replacing.map(|(slot, _)| slot);
    let mut guard = lock(cluster);
    if down.is_some() {
        unfinished.push(format!("member-replace: {pending}"));
    }
    for (position, node) in guard.nodes.iter_mut().enumerate() {
        node.signal_pause(false);
        if !node.is_running() && down != Some(position as u64 + 1) {
            node.start(binary)?;
        }
    }
    Ok((down, unfinished))
}

/// The nodes whose own reads must show the final state: every leader
/// node but the slot left `down`, and every follower node.
fn convergence_apis(cluster: &Mutex<Cluster>, down: Option<u64>) -> Vec<(String, SocketAddr)> {
    let guard = lock(cluster);
    let leaders = guard
        .nodes
        .iter()
        .enumerate()
        .filter(|(position, _)| down != Some(*position as u64 + 1))
        .map(|(_, node)| (format!("node {}", node.id), node.api));
    let followers = guard
        .followers
        .iter()
        .map(|node| (format!("follower node {}", node.id), node.api));
    leaders.chain(followers).collect()
}

/// (snapshots installed, installs a kill cut short), counted in the leader
/// nodes' logs: the proof that the faults exercised snapshot transfer.
fn logged_installs(cluster: &Mutex<Cluster>) -> (usize, usize) {
    let logs: Vec<String> = lock(cluster)
        .nodes
        .iter()
        .map(|node| std::fs::read_to_string(node.dir.with_extension("log")).unwrap_or_default())
        .collect();
    let logged = |what: &str| -> usize { logs.iter().map(|log| log.matches(what).count()).sum() };
    let snapshots_installed = logged(SNAPSHOT_INSTALLED);
    let installs_cut = logged(regatta_multiraft::INSTALL_CUT_BEFORE_WAL)
        + logged(regatta_multiraft::INSTALL_CUT_AFTER_WAL);
    (snapshots_installed, installs_cut)
}

#[cfg(test)]
mod tests {
    use super::{shuffled, Fault, KeySpace, Rng};

    #[test]
    fn a_shuffled_deck_holds_every_card_once_in_a_seeded_order() {
        let mut orders = std::collections::BTreeSet::new();
        for seed in 1..=50u64 {
            let mut rng = Rng(seed ^ 0xA5A5_5A5A_1234_5678);
            let deck = shuffled(&Fault::ALL, &mut rng);
            let mut names: Vec<&str> = deck.iter().map(|fault| fault.name()).collect();
            orders.insert(names.join(","));
            names.sort_unstable();
            let mut all: Vec<&str> = Fault::ALL.iter().map(|fault| fault.name()).collect();
            all.sort_unstable();
            assert_eq!(names, all, "seed {seed}: not a permutation");
            let mut again = Rng(seed ^ 0xA5A5_5A5A_1234_5678);
            assert_eq!(deck, shuffled(&Fault::ALL, &mut again), "seed {seed}");
        }
        assert!(
            orders.len() > 40,
            "only {} orders in 50 seeds",
            orders.len()
        );
    }

    #[test]
    fn a_slot_moves_to_a_fresh_key_after_its_operations() {
        let keys = KeySpace::new(2, 3);
        let taken: Vec<String> = (0..4).map(|_| keys.take(0)).collect();
        assert_eq!(taken, ["k0.0", "k0.0", "k0.0", "k0.1"]);
        assert_eq!(keys.current(0), "k0.1");
        assert_eq!(keys.take(3), "k1.0", "slots wrap around");
        assert_eq!(keys.all(), ["k0.0", "k0.1", "k1.0"]);
        // A slot never used has no key to read back.
        assert_eq!(KeySpace::new(1, 5).all(), Vec::<String>::new());
    }
}
