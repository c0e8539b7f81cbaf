//! [`Node`]: one Regatta node. It hosts the metadata group (the table
//! catalogue) and one Raft group per table, over one WAL, one fjall store
//! and one peer transport, and reconciles its running groups with the
//! catalogue. The gRPC services call it; it speaks `regatta_kv` commands.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_kv::command::{
    decode, encode, Command, Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyRange,
    PutRequest, Query, RangeRequest, RequestOp, Response, ResponseOp, TxnRequest,
};
use regatta_kv::Store;
use regatta_multiraft::{HostConfig, NodeHost, PeerAddress, TcpConfig, TcpTransport, Transport};
use regatta_raft::{NodeId, RequestId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::net::TcpListener;

use crate::error::{Error, Result};

mod membership;
pub use membership::{MemberAddresses, MemberInfo};

/// The metadata group: the table catalogue.
pub const META_GROUP: GroupId = GroupId(1);
/// The first group id given to a table.
const FIRST_TABLE_GROUP: u64 = 2;
const CATALOGUE_PREFIX: &[u8] = b"table/";
const NEXT_ID_KEY: &[u8] = b"next-group-id";
/// Follower clusters: `replica-source/<table>` holds the leader cluster's
/// id of the table the local copy replicates (8 bytes, little-endian).
const REPLICA_SOURCE_PREFIX: &[u8] = b"replica-source/";
/// Follower clusters: `reset/<group id>` holds the restore id (8 bytes,
/// little-endian) of an operator's reset of that table that no install
/// has carried out yet (`request_resync`).
const RESET_REQUEST_PREFIX: &[u8] = b"reset/";
const BOOTSTRAPPED_KEY: &[u8] = b"bootstrapped";
/// A random u64 (LE) drawn when the cluster bootstraps: a cluster wiped
/// and bootstrapped again gets another, so that follower clusters can
/// tell its tables from the old cluster's (`Node::table_identity`).
const INCARNATION_KEY: &[u8] = b"incarnation";
/// How often a node compares its groups with the catalogue.
const RECONCILE_INTERVAL: Duration = Duration::from_millis(100);

/// Which kind of cluster a node belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClusterRole {
    /// The leader cluster: it takes writes and owns the table catalogue.
    Leader,
    /// A follower cluster: its tables replicate the leader cluster's
    /// (`regatta-replication`); writes are forwarded there.
    Follower,
}

/// Sends a write made on a follower cluster to the leader cluster, and
/// answers with the leader's response (its revision is the leader index of
/// the write). `regatta-replication` provides it.
pub trait WriteForwarder: Send + Sync {
    /// Forwards `command` for table `table`, whose copy here replicates
    /// the leader cluster's table `table_id` (0: not known).
    fn forward(
        &self,
        table: String,
        table_id: u64,
        command: Command,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Response>> + Send + '_>>;
}

/// How a node runs. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// This node's id in every group.
    pub node_id: NodeId,
    /// The cluster's id; peers of another cluster are refused.
    pub cluster_id: u64,
    /// Where the WAL, the table store and the host's files live.
    pub data_dir: PathBuf,
    /// The peer address of every member, this node included.
    pub members: BTreeMap<NodeId, PeerAddress>,
    /// Where this node listens for peers, when not at its own address in
    /// `members` (which is what peers dial): all interfaces behind a NAT
    /// or in a container (`--raft.listen-address`).
    pub listen_address: Option<SocketAddr>,
    /// Where to dial nodes that are not initial members (added later),
    /// instead of the address they record for themselves: a proxy, a NAT
    /// address. Never bootstrap voters.
    pub peer_addresses: BTreeMap<NodeId, PeerAddress>,
    /// The client URL of members, where known (shown by MemberList).
    pub client_urls: BTreeMap<NodeId, String>,
    /// Bootstrap the cluster (true) or join one (false).
    pub bootstrap: bool,
    /// The table behind the etcd API, created at bootstrap.
    pub etcd_table: String,
    /// The longest key accepted.
    pub key_bytes_max: usize,
    /// The longest value accepted.
    pub value_bytes_max: usize,
    /// How long a request may wait for Raft.
    pub request_timeout: Duration,
    /// Snapshot and compact each group every this many entries.
    pub snapshot_every_entries: u64,
    /// Entries a compaction leaves in the log, for followers that lag.
    pub compaction_overhead_entries: u64,
    /// Raft workers (each with an apply thread), 1 to
    /// [`regatta_multiraft::WORKERS_MAX`]. Default
    /// [`regatta_multiraft::default_workers`].
    pub workers: usize,
    /// Leader or follower cluster.
    pub role: ClusterRole,
    /// Mutual TLS between Raft peers; plain TCP when `None`.
    pub peer_tls: Option<regatta_multiraft::PeerTls>,
    /// The token admin operations need; none needed when `None`.
    pub admin_token: Option<crate::auth::AdminToken>,
}

impl NodeConfig {
    /// A single-node cluster in `data_dir`, peers on `raft_address`.
    pub fn single(
        data_dir: impl Into<PathBuf>,
        raft_address: impl Into<PeerAddress>,
    ) -> NodeConfig {
        NodeConfig {
            node_id: NodeId(1),
            cluster_id: 1,
            data_dir: data_dir.into(),
            members: [(NodeId(1), raft_address.into())].into(),
            listen_address: None,
            peer_addresses: BTreeMap::new(),
            client_urls: BTreeMap::new(),
            bootstrap: true,
            etcd_table: "etcd".into(),
            key_bytes_max: 1024,
            value_bytes_max: 2 * 1024 * 1024,
            request_timeout: Duration::from_secs(10),
            snapshot_every_entries: 10_000,
            compaction_overhead_entries: 1_000,
            workers: regatta_multiraft::default_workers(),
            role: ClusterRole::Leader,
            peer_tls: None,
            admin_token: None,
        }
    }
}

/// A table in the catalogue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableEntry {
    /// Its name.
    pub name: String,
    /// Its Raft group.
    pub group: GroupId,
}

/// Raft facts about a group on this node, refreshed in the background.
#[derive(Clone, Copy, Debug, Default)]
pub struct GroupFacts {
    /// The leader this node knows, 0 when none.
    pub leader: u64,
    /// The current term.
    pub term: u64,
}

/// One Regatta node.
pub struct Node {
    config: NodeConfig,
    host: NodeHost,
    wal: Arc<Wal>,
    store: Store,
    transport: Arc<TcpTransport>,
    /// Tables by name, as last read from the catalogue.
    tables: RwLock<BTreeMap<String, GroupId>>,
    facts: RwLock<HashMap<GroupId, GroupFacts>>,
    /// Client sessions for request de-duplication (see `SessionPool`).
    sessions: SessionPool,
    /// Groups started on this node.
    running: std::sync::Mutex<std::collections::BTreeSet<GroupId>>,
    started: Instant,
    /// Follower clusters: where writes go.
    forwarder: std::sync::OnceLock<Arc<dyn WriteForwarder>>,
    /// The cluster's incarnation, once read (`incarnation`).
    incarnation: std::sync::OnceLock<u64>,
    /// Follower clusters: replication state per table, as the puller
    /// reports it.
    replication: RwLock<HashMap<GroupId, ReplicationFacts>>,
    /// The voters each table's group started with, from its catalogue
    /// entry (absent for entries written before membership changes).
    table_voters: RwLock<HashMap<GroupId, Vec<NodeId>>>,
    /// True once this node was removed from the cluster.
    removed: tokio::sync::watch::Sender<bool>,
    /// Table groups with a membership change under way (see
    /// `membership.rs`).
    changing: Arc<std::sync::Mutex<std::collections::HashSet<GroupId>>>,
    /// Members seen leave the cluster, whose address records the metadata
    /// group's leader deletes (`membership::Departures`).
    departures: std::sync::Mutex<membership::Departures>,
    /// Ids this node force-removed whose `removed/<id>` tombstone is not
    /// written yet (the metadata group may have had no quorum until the
    /// last of them went); the reconciler writes them.
    tombstones_due: membership::DueTombstones,
    /// When this node last wrote its own address record.
    registered_at: std::sync::Mutex<Option<Instant>>,
    /// Leader changes and elections seen per group (see `RaftEvents`).
    raft_events: RwLock<HashMap<GroupId, RaftEvents>>,
    /// Proposals this node made, per group (see `ProposalCounts`).
    proposals: RwLock<HashMap<GroupId, Arc<ProposalCounters>>>,
    /// Follower clusters: snapshots of the leader's tables this node
    /// installed, per table group.
    snapshot_installs: RwLock<HashMap<GroupId, u64>>,
    /// Per-method gRPC counters, recorded by the API servers.
    grpc_metrics: crate::grpc_metrics::GrpcMetrics,
}

/// Raft events of a group as this node saw them, counted at each refresh
/// of its facts (100 ms): changes of the known leader, and term increases
/// (each election raises the term at least once).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RaftEvents {
    /// Times the known leader changed to another node.
    pub leader_changes: u64,
    /// The sum of term increases: elections (and failed campaigns).
    pub term_increases: u64,
}

/// Proposals this node made to a group through `Node::propose`: each
/// counted once however often Raft retried it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProposalCounts {
    /// Proposals made.
    pub proposed: u64,
    /// Proposals that failed (no leader in time, refused, group gone);
    /// a command the table applied with an error is not a failure here.
    pub failed: u64,
}

/// The live counters behind `ProposalCounts`.
#[derive(Debug, Default)]
struct ProposalCounters {
    proposed: std::sync::atomic::AtomicU64,
    failed: std::sync::atomic::AtomicU64,
}

/// A follower table's replication state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicationFacts {
    /// The leader cluster's applied index of the table, as last heard.
    pub leader_index: u64,
    /// The leader index this follower applied.
    pub applied_leader_index: u64,
    /// How long the follower has been behind, in milliseconds; 0 when it
    /// holds everything the leader last reported and heard from it within
    /// `LAG_SILENCE_GRACE`. Computed when read (`replication_view`).
    pub lag_ms: u64,
    /// Why replication is not progressing, if it is not (e.g. the leader
    /// is behind this follower).
    pub error: Option<String>,
    /// Since when the puller knows this copy to be behind the leader's.
    pub behind_since: Option<std::time::Instant>,
    /// When the puller last heard from the leader cluster (or started).
    pub heard_at: Option<std::time::Instant>,
    /// A snapshot install is under way: the copy is behind, whatever the
    /// leader index says (an operator's reset asks for one at any index).
    pub installing: bool,
}

/// How long a follower may go without hearing from the leader cluster
/// before its lag counts the silence: two of the leader's 1 s heartbeats.
/// A copy cut off from the leader cannot know what it misses, so its lag
/// grows from the last time it heard.
pub const LAG_SILENCE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl ReplicationFacts {
    /// The lag at `now` of a copy at `applied` (its leader index): the
    /// longer of how long it has been known behind and, past the grace,
    /// how long the leader cluster has been silent.
    pub fn lag_ms_at(&self, applied: u64, now: std::time::Instant) -> u64 {
        let behind = self
            .behind_since
            .filter(|_| applied < self.leader_index || self.installing)
            .map_or(std::time::Duration::ZERO, |since| {
                now.saturating_duration_since(since)
            });
        let silence = self
            .heard_at
            .map(|heard| now.saturating_duration_since(heard))
            .filter(|silence| *silence > LAG_SILENCE_GRACE)
            .unwrap_or_default();
        behind.max(silence).as_millis() as u64
    }
}

/// Client sessions for de-duplication. A session carries one request at a
/// time, so its sequence numbers reach the log in order; concurrent writes
/// check out different sessions. The pool grows to the highest concurrency
/// seen, which bounds the session tables. Client ids are random, so a
/// restarted process never reuses an old sequence.
#[derive(Default)]
struct SessionPool {
    free: std::sync::Mutex<Vec<Session>>,
}

struct Session {
    id: RequestId,
}

impl SessionPool {
    fn check_out(&self) -> Session {
        let reused = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        reused.unwrap_or_else(|| Session {
            id: RequestId {
                client: random_u64(),
                sequence: 1,
            },
        })
    }

    /// Returns a session after its request ended, whatever the outcome: a
    /// late application of that request only makes the next one stale
    /// relative to it, never applies anything twice.
    fn check_in(&self, mut session: Session) {
        session.id.sequence += 1;
        self.free
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(session);
    }
}

/// A random non-zero id (client ids, restore ids): the process's hasher
/// keys mixed with the time and process id.
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default(),
    );
    hasher.write_u32(std::process::id());
    hasher.finish().max(1)
}

impl Node {
    /// Opens the node's storage, binds its peer listener and starts its
    /// groups and background tasks.
    pub async fn start(config: NodeConfig) -> Result<Arc<Node>> {
        let own_address = config.members.get(&config.node_id).ok_or_else(|| {
            Error::Config(format!(
                "node {} is not among the members {:?}",
                config.node_id.0,
                config.members.keys().map(|id| id.0).collect::<Vec<_>>()
            ))
        })?;
        create_data_dir(&config.data_dir)?;
        let listener = match config.listen_address {
            Some(address) => TcpListener::bind(address).await.map_err(|error| {
                Error::Config(format!(
                    "listen for peers on {address} (--raft.listen-address): {error}"
                ))
            })?,
            None => listen_on_own_address(own_address, config.members.len() > 1).await?,
        };
        let tcp = peer_transport_config(&config, &listener);
        let tombstones_due = membership::DueTombstones::open(&config.data_dir)?;
        let transport = TcpTransport::start(tcp, listener);
        let wal = Wal::open(WalConfig::new(config.data_dir.join("wal")))
            .map_err(|error| Error::Storage(format!("open the WAL: {error}")))?;
        if wal.direct_io() {
            tracing::info!("the WAL writes with direct I/O (O_DIRECT)");
        } else {
            tracing::warn!(
                "the WAL's file system refuses direct I/O (O_DIRECT): it writes through the page cache"
            );
        }
        let store = Store::open(&config.data_dir.join("tables"))
            .map_err(|error| Error::Storage(format!("open the table store: {error}")))?;
        let mut host_config = HostConfig::new(config.node_id, config.data_dir.join("host"));
        host_config.request_timeout = config.request_timeout;
        host_config.snapshot_every_entries = config.snapshot_every_entries;
        host_config.compaction_overhead_entries = config.compaction_overhead_entries;
        host_config.workers = config.workers;
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let wal = Arc::new(wal);
        let host = NodeHost::new(
            host_config,
            Arc::clone(&wal),
            as_transport,
            tokio::runtime::Handle::current(),
        )
        .map_err(|error| match error {
            regatta_multiraft::Error::Config(message) => Error::Config(message),
            other => Error::Storage(other.to_string()),
        })?;
        transport.attach(&host);
        let node = Arc::new(Node {
            config,
            host,
            wal,
            store,
            transport,
            tables: RwLock::new(BTreeMap::new()),
            facts: RwLock::new(HashMap::new()),
            sessions: SessionPool::default(),
            running: std::sync::Mutex::new([META_GROUP].into()),
            started: Instant::now(),
            forwarder: std::sync::OnceLock::new(),
            incarnation: std::sync::OnceLock::new(),
            replication: RwLock::new(HashMap::new()),
            table_voters: RwLock::new(HashMap::new()),
            removed: tokio::sync::watch::channel(false).0,
            changing: Arc::default(),
            departures: std::sync::Mutex::default(),
            tombstones_due,
            registered_at: std::sync::Mutex::new(None),
            raft_events: RwLock::new(HashMap::new()),
            snapshot_installs: RwLock::new(HashMap::new()),
            proposals: RwLock::new(HashMap::new()),
            grpc_metrics: crate::grpc_metrics::GrpcMetrics::default(),
        });
        node.start_group(META_GROUP)?;
        tokio::spawn(Arc::clone(&node).reconcile_loop());
        Ok(node)
    }

    /// This node's configuration.
    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// How long the node has run.
    pub fn uptime(&self) -> Duration {
        self.started.elapsed()
    }

    /// The WAL's counters.
    pub fn wal_stats(&self) -> regatta_wal::WalStats {
        self.wal.stats()
    }

    /// Raft messages sent to peers, by kind: (kind, count).
    pub fn transport_messages_by_kind(&self) -> Vec<(&'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.transport.stats();
        regatta_raft::MESSAGE_KIND_NAMES
            .iter()
            .zip(&stats.messages_sent_by_kind)
            .map(|(kind, count)| (*kind, count.load(Relaxed)))
            .collect()
    }

    /// The peer transport's counters: (metric name, help, value).
    pub fn transport_stats(&self) -> Vec<(&'static str, &'static str, u64)> {
        use std::sync::atomic::Ordering::Relaxed;
        let stats = self.transport.stats();
        vec![
            (
                "peer_messages_sent",
                "Raft messages sent to peers.",
                stats.messages_sent.load(Relaxed),
            ),
            (
                "peer_frames_sent",
                "Frames sent to peers (each holds one or more messages).",
                stats.frames_sent.load(Relaxed),
            ),
            (
                "peer_messages_dropped",
                "Raft messages dropped because a peer's queue was full.",
                stats.dropped_messages.load(Relaxed),
            ),
            (
                "peer_connection_failures",
                "Peer connections that failed or broke.",
                stats.connection_failures.load(Relaxed),
            ),
            (
                "peer_frames_refused",
                "Frames from peers refused (checksum, size, type, decoding).",
                stats.frames_refused.load(Relaxed),
            ),
            (
                "peer_handshakes_refused",
                "Incoming peer connections refused at the TLS or Regatta handshake.",
                stats.handshakes_refused.load(Relaxed),
            ),
            (
                "peer_connections_refused",
                "Incoming peer connections closed at once: too many were open.",
                stats.connections_refused.load(Relaxed),
            ),
            (
                "snapshots_sent",
                "Raft snapshots the receiving peer confirmed.",
                stats.snapshots_sent.load(Relaxed),
            ),
            (
                "snapshots_received",
                "Raft snapshots received whole from peers.",
                stats.snapshots_received.load(Relaxed),
            ),
        ]
    }

    /// Leader changes and elections seen for `group`.
    pub fn raft_events(&self, group: GroupId) -> RaftEvents {
        self.raft_events
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
            .unwrap_or_default()
    }

    /// Proposals this node made to `group`.
    pub fn proposal_counts(&self, group: GroupId) -> ProposalCounts {
        let counters = self.proposal_counters(group);
        ProposalCounts {
            proposed: counters.proposed.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
        }
    }

    /// `group`'s proposal counters: a shared read and two atomic adds on
    /// the write path; the map is written once per group.
    fn proposal_counters(&self, group: GroupId) -> Arc<ProposalCounters> {
        if let Some(counters) = self
            .proposals
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
        {
            return Arc::clone(counters);
        }
        Arc::clone(
            self.proposals
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .entry(group)
                .or_default(),
        )
    }

    /// The per-method gRPC counters of this node's API servers.
    pub fn grpc_metrics(&self) -> &crate::grpc_metrics::GrpcMetrics {
        &self.grpc_metrics
    }

    /// Why the WAL stopped taking writes, if it did (a failed write or
    /// fsync: nothing is acknowledged after it).
    pub fn wal_failure(&self) -> Option<String> {
        self.wal.failure()
    }

    /// The multi-Raft host.
    pub fn host(&self) -> &NodeHost {
        &self.host
    }

    fn voters(&self) -> Vec<NodeId> {
        if self.config.bootstrap {
            self.config.members.keys().copied().collect()
        } else {
            Vec::new()
        }
    }

    fn start_group(&self, group: GroupId) -> Result<()> {
        let mode = match self.config.role {
            ClusterRole::Follower if group != META_GROUP => regatta_kv::TableMode::Replica,
            _ => regatta_kv::TableMode::Primary,
        };
        let table = self
            .store
            .open_table_as(group.0, mode)
            .map_err(|error| Error::Storage(format!("open table group {}: {error}", group.0)))?;
        // A table's entry names the voters its group starts with; a node
        // among them bootstraps the group, any other joins it (the leader
        // adds it). Older entries, and the metadata group, use the
        // configured initial members.
        let recorded = self
            .table_voters
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned();
        let voters = match recorded {
            Some(voters) if voters.contains(&self.config.node_id) => voters,
            Some(_) => Vec::new(),
            None => self.voters(),
        };
        self.host
            .start_group(group, voters, Box::new(table))
            .map_err(|error| Error::Storage(format!("start group {}: {error}", group.0)))
    }

    /// Stops the node's groups.
    pub async fn stop(&self) {
        self.host.stop().await;
        self.transport.shutdown();
    }

    /// The tables in the catalogue, as this node last read it.
    pub fn tables(&self) -> Vec<TableEntry> {
        self.tables
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(name, group)| TableEntry {
                name: name.clone(),
                group: *group,
            })
            .collect()
    }

    /// The group of table `name`.
    pub fn table_group(&self, name: &str) -> Result<GroupId> {
        let tables = self.tables.read().unwrap_or_else(|p| p.into_inner());
        if let Some(group) = tables.get(name) {
            return Ok(*group);
        }
        // Before the catalogue is first read (no metadata leader yet), an
        // unknown table is not proof that it does not exist.
        if tables.is_empty() && self.facts(META_GROUP).leader == 0 {
            return Err(Error::Unavailable(format!(
                "table {name:?} is not known yet: the table catalogue is not loaded (no leader for it yet); retry"
            )));
        }
        Err(Error::TableNotFound(name.to_string()))
    }

    /// Bytes of `group`'s Raft log held in the WAL.
    pub fn log_bytes(&self, group: GroupId) -> u64 {
        self.wal.log_bytes(group)
    }

    /// The table store's engine counters.
    pub fn table_engine_stats(&self) -> regatta_kv::EngineStats {
        self.store.engine_stats()
    }

    /// Bytes table `group`'s data takes on disk; 0 when unknown.
    pub fn table_disk_bytes(&self, group: GroupId) -> u64 {
        self.store.table_disk_bytes(group.0).unwrap_or(0)
    }

    /// Leader and term of `group`, as last seen.
    pub fn facts(&self, group: GroupId) -> GroupFacts {
        self.facts
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
            .unwrap_or_default()
    }

    /// Installs where a follower cluster sends writes (once).
    pub fn set_forwarder(&self, forwarder: Arc<dyn WriteForwarder>) {
        let _ = self.forwarder.set(forwarder);
    }

    /// Records a follower table's replication state.
    pub fn set_replication_facts(&self, group: GroupId, facts: ReplicationFacts) {
        self.replication
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(group, facts);
    }

    /// Forgets a follower table's replication state (its puller moved to
    /// another node).
    pub fn clear_replication_facts(&self, group: GroupId) {
        self.replication
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// Counts a snapshot of the leader's table installed by this node.
    pub fn count_snapshot_install(&self, group: GroupId) {
        *self
            .snapshot_installs
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .entry(group)
            .or_default() += 1;
    }

    /// Snapshots of the leader's table `group` this node installed.
    pub fn snapshot_installs(&self, group: GroupId) -> u64 {
        self.snapshot_installs
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .copied()
            .unwrap_or(0)
    }

    /// A follower table's replication state, if it is one.
    pub fn replication_facts(&self, group: GroupId) -> Option<ReplicationFacts> {
        self.replication
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// A follower table's replication state as this node sees it: the
    /// puller's report where this node pulls, and always the leader index
    /// this node's copy holds.
    pub async fn replication_view(&self, group: GroupId) -> ReplicationFacts {
        let mut facts = self.replication_facts(group).unwrap_or_default();
        if let Ok(revision) = self.table_revision(group, false).await {
            facts.applied_leader_index = revision;
        }
        facts.lag_ms = facts.lag_ms_at(facts.applied_leader_index, std::time::Instant::now());
        facts
    }

    /// A consistent copy of table `group`'s data: its revision and items
    /// (`regatta_kv::Store::table_snapshot`).
    pub fn table_snapshot(&self, group: GroupId) -> Result<(u64, regatta_kv::TableItems)> {
        self.store
            .table_snapshot(group.0)
            .map_err(|error| Error::Unavailable(format!("table snapshot: {error}")))
    }

    /// Whether table `group` has a restore under way on this node (a
    /// snapshot install, or a reset that waits for one).
    pub fn table_restore_pending(&self, group: GroupId) -> bool {
        table_flag(group, self.store.table_restore_pending(group.0))
    }

    /// Whether the restore under way in table `group` was begun by an
    /// operator's reset (`request_resync`), as this node applied it.
    pub fn table_reset_pending(&self, group: GroupId) -> bool {
        table_flag(group, self.store.table_reset_pending(group.0))
    }

    /// The restore id of the last operator's reset that an install of
    /// table `group` carried out (0 if none, or if the table's metadata
    /// cannot be read), as this node applied it.
    pub fn table_reset_carried(&self, group: GroupId) -> u64 {
        self.store
            .table_reset_carried(group.0)
            .unwrap_or_else(|error| {
                tracing::warn!(group = group.0, %error, "cannot read the table's metadata");
                0
            })
    }

    /// Follower clusters: makes table `group` install a fresh snapshot of
    /// the leader cluster's copy. It begins a restore that no puller owns:
    /// the table refuses replicated batches until a snapshot install
    /// replaces it, and its puller starts one when it sees it pending.
    /// Readers keep the table's current data until the install commits.
    pub async fn request_resync(&self, group: GroupId) -> Result<()> {
        // Marked as a reset: its install may take the table back.
        let restore_id = random_u64() | regatta_kv::RESET_RESTORE_ID_BIT;
        // Recorded first, in the metadata group: a puller that begins an
        // ordinary install just after this reset replaces the reset's
        // restore (a table has one), and reads this record to follow the
        // reset all the same (`table_reset_requested`).
        let record = Command::Put(PutRequest {
            key: reset_request_key(group),
            value: restore_id.to_le_bytes().to_vec(),
            prev_kv: false,
        });
        self.write(META_GROUP, &record).await?;
        let began = self
            .propose(group, &Command::RestoreBegin { restore_id })
            .await;
        let error = match began.map(|response| response.result) {
            Ok(Ok(ResponseOp::Replicated(result))) if result.accepted => return Ok(()),
            Ok(other) => Error::Internal(format!("the table refused the reset: {other:?}")),
            Err(error) => error,
        };
        // Not begun (or not known to be): its record must not let a later
        // ordinary install take the table back. A begin whose outcome is
        // unknown and that did apply is still carried out: the restore it
        // left pending is marked as a reset.
        if let Err(clear) = self.clear_reset_request(group, restore_id).await {
            tracing::warn!(group = group.0, error = %clear, "could not clear the record of a reset that failed");
        }
        Err(error)
    }

    /// Writes `command` to table `group`. On the leader cluster, through
    /// this cluster's Raft; on a follower cluster, through the leader
    /// cluster, answering once this node applied the write (so that the
    /// client reads it here right after).
    pub async fn write(&self, group: GroupId, command: &Command) -> Result<Response> {
        if self.config.role == ClusterRole::Leader || group == META_GROUP {
            return self.propose(group, command).await;
        }
        let Some(forwarder) = self.forwarder.get() else {
            return Err(Error::Unavailable(
                "this follower cluster has no connection to the leader cluster for writes".into(),
            ));
        };
        let name = self
            .tables()
            .into_iter()
            .find(|table| table.group == group)
            .map(|table| table.name)
            .ok_or_else(|| Error::TableNotFound(format!("group {}", group.0)))?;
        // The leader refuses the write if its table of this name is not
        // the one this copy replicates: the reply below waits for the
        // write's revision in this copy, which another table's numbers
        // would satisfy at once. Read from this node's state, not through
        // a ReadIndex round on every write: the record is written before
        // the copy exists (so a copy this node serves has it locally
        // unless it is about to be replaced), and a stale answer only
        // gets a spurious refusal, which the client retries.
        let table_id = self
            .read_meta_u64_as(&replica_source_key(&name), false)
            .await?
            .map_or(0, |(id, _)| id);
        let deadline = Instant::now() + self.config.request_timeout;
        let response = tokio::time::timeout(
            self.config.request_timeout,
            forwarder.forward(name.clone(), table_id, command.clone()),
        )
        .await
        .map_err(|_| {
            Error::Raft(regatta_multiraft::Error::Timeout {
                group,
                timeout_ms: self.config.request_timeout.as_millis() as u64,
            })
        })??;
        self.wait_for_revision(group, response.revision, deadline)
            .await
            .map_err(|error| match error {
                Error::Raft(regatta_multiraft::Error::Timeout { .. }) => Error::Unavailable(format!(
                    "the leader cluster applied the write at index {} of table {name:?}, but this follower has not replicated it within {} ms; it will appear here once replication catches up",
                    response.revision,
                    self.config.request_timeout.as_millis()
                )),
                other => other,
            })?;
        Ok(response)
    }

    /// The table's revision on this node (its applied index; the leader
    /// index it holds on a follower cluster), read from the local state
    /// or, with `linearizable`, after a ReadIndex round.
    pub async fn table_revision(&self, group: GroupId, linearizable: bool) -> Result<u64> {
        let probe = Query::Range(RangeRequest {
            range: KeyRange {
                key: vec![0],
                range_end: Vec::new(),
            },
            count_only: true,
            ..RangeRequest::default()
        });
        Ok(self.read(group, &probe, linearizable).await?.revision)
    }

    /// Returns once this node's copy of `group` holds `revision` (its
    /// leader index, on a follower cluster).
    pub async fn wait_for_revision(
        &self,
        group: GroupId,
        revision: u64,
        deadline: Instant,
    ) -> Result<()> {
        let applied = self.host.applied_index_watch(group)?;
        loop {
            // Read before the check: an apply after it wakes the wait.
            let seen = applied.get();
            if self.table_revision(group, false).await? >= revision {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, applied.changed_from(seen)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => {
                    return Err(Error::Unavailable(format!(
                        "table group {} stopped on this node",
                        group.0
                    )))
                }
                Err(_) => {
                    return Err(Error::Raft(regatta_multiraft::Error::Timeout {
                        group,
                        timeout_ms: self.config.request_timeout.as_millis() as u64,
                    }))
                }
            }
        }
    }

    /// Proposes `command` to `group` through this cluster's Raft, with a
    /// fresh request id, retrying it (with the same id, so it applies
    /// once) while there is no leader.
    pub async fn propose(&self, group: GroupId, command: &Command) -> Result<Response> {
        self.propose_encoded(group, Bytes::from(encode(command)))
            .await
    }

    /// [`Node::propose`] of an encoded command.
    pub async fn propose_encoded(&self, group: GroupId, payload: Bytes) -> Result<Response> {
        let session = self.sessions.check_out();
        let id = session.id;
        let deadline = Instant::now() + self.config.request_timeout;
        // Whether an attempt may have reached a log: forwarded and then
        // the leader changed (`NotLeader` from the host), or covered by a
        // snapshot. It may still apply, so running out of time then is an
        // unknown outcome, not the last attempt's "no leader, retry".
        let mut in_doubt = false;
        let mut pauses = RetryPauses::default();
        let result = loop {
            match self.host.propose_with_id(group, id, payload.clone()).await {
                Ok(bytes) => break decode_response(&bytes),
                Err(error)
                    if (retryable(&error) || self.starting_here(&error))
                        && Instant::now() < deadline =>
                {
                    in_doubt |= may_be_in_a_log(&error);
                    pauses.wait(&error, deadline).await;
                }
                Err(error) if retryable(&error) && (in_doubt || may_be_in_a_log(&error)) => {
                    break Err(Error::Raft(regatta_multiraft::Error::Timeout {
                        group,
                        timeout_ms: self.config.request_timeout.as_millis() as u64,
                    }))
                }
                Err(error) => break Err(Error::Raft(error)),
            }
        };
        self.sessions.check_in(session);
        let counters = self.proposal_counters(group);
        counters.proposed.fetch_add(1, Ordering::Relaxed);
        if result.is_err() {
            counters.failed.fetch_add(1, Ordering::Relaxed);
        }
        result
    }

    /// Hands the leadership of `group` to `target`, one of its voters, and
    /// returns once `target` leads it (at once if it already does).
    pub async fn transfer_leader(&self, group: GroupId, target: NodeId) -> Result<()> {
        let deadline = Instant::now() + self.config.request_timeout;
        loop {
            let status = self.host.status(group).await?;
            if !status.membership.voters.contains(&target) {
                let voters: Vec<String> = status
                    .membership
                    .voters
                    .iter()
                    .map(|voter| voter.0.to_string())
                    .collect();
                return Err(Error::InvalidArgument(format!(
                    "node {} is not a voting member of group {}; its voters are {}",
                    target.0,
                    group.0,
                    voters.join(", ")
                )));
            }
            if status.soft_state.leader == Some(target) {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(Error::Raft(regatta_multiraft::Error::Timeout {
                    group,
                    timeout_ms: self.config.request_timeout.as_millis() as u64,
                }));
            }
            match self.host.transfer_leader(group, target).await {
                Ok(()) => {}
                // No leader yet, or a transfer already under way: wait.
                Err(error) if retryable(&error) => {}
                Err(regatta_multiraft::Error::Raft {
                    source: regatta_raft::Error::TransferInProgress { .. },
                    ..
                }) => {}
                Err(error) => return Err(Error::Raft(error)),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Runs a transaction: a read-only one as a linearizable read, without
    /// a log entry; any other through Raft.
    pub async fn transact(&self, group: GroupId, txn: TxnRequest) -> Result<Response> {
        if txn.is_read_only() {
            self.read(group, &Query::Txn(txn), true).await
        } else {
            self.write(group, &Command::Txn(txn)).await
        }
    }

    /// Reads from `group`: linearizable (ReadIndex) or from local state.
    pub async fn read(
        &self,
        group: GroupId,
        query: &Query,
        linearizable: bool,
    ) -> Result<Response> {
        let payload = Bytes::from(encode(query));
        let deadline = Instant::now() + self.config.request_timeout;
        let mut pauses = RetryPauses::default();
        loop {
            let answer = if linearizable {
                self.host.read_linearizable(group, payload.clone()).await
            } else {
                self.host.read_stale(group, payload.clone()).await
            };
            match answer {
                Ok(bytes) => return decode_response(&bytes),
                Err(error)
                    if (retryable(&error) || self.starting_here(&error))
                        && Instant::now() < deadline =>
                {
                    pauses.wait(&error, deadline).await;
                }
                Err(error) => return Err(Error::Raft(error)),
            }
        }
    }

    /// Whether `error` says that a table the catalogue lists is not yet
    /// running on this node: the catalogue reached it first, and the
    /// reconciler starts its group within moments, so a request waits
    /// for it instead of failing.
    fn starting_here(&self, error: &regatta_multiraft::Error) -> bool {
        match error {
            regatta_multiraft::Error::UnknownGroup(group) => {
                self.tables().iter().any(|table| table.group == *group)
            }
            _ => false,
        }
    }

    /// Creates table `name`; fails with `TableExists` when it is there.
    pub async fn create_table(&self, name: &str) -> Result<TableEntry> {
        self.leader_cluster_only()?;
        validate_table_name(name)?;
        self.create_table_once(name, false).await
    }

    fn leader_cluster_only(&self) -> Result<()> {
        match self.config.role {
            ClusterRole::Leader => Ok(()),
            ClusterRole::Follower => Err(Error::FailedPrecondition(
                "this is a follower cluster: tables are managed on the leader cluster and \
                 replicated here"
                    .into(),
            )),
        }
    }

    /// Follower clusters: creates the local copy of the leader's table
    /// `name` (no error if it is there).
    pub async fn create_replica_table(&self, name: &str) -> Result<()> {
        validate_table_name(name)?;
        match self.create_table_once(name, false).await {
            Ok(_) | Err(Error::TableExists(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Follower clusters: deletes the local copy of a table the leader
    /// dropped, then the record of which leader table it copied (in this
    /// order, so that a crash between the two never leaves a copy whose
    /// record is missing).
    pub async fn delete_replica_table(&self, name: &str) -> Result<()> {
        self.delete_table_unchecked(name).await?;
        let command = Command::DeleteRange(regatta_kv::command::DeleteRangeRequest {
            range: KeyRange {
                key: replica_source_key(name),
                range_end: Vec::new(),
            },
            prev_kv: false,
        });
        self.write(META_GROUP, &command).await.map(|_| ())
    }

    /// The identity of the table whose group is `group`, for follower
    /// clusters (`Table.id` of the replication API): the group id mixed
    /// with this cluster's incarnation, so that it changes when the table
    /// is dropped and re-created and when the cluster is wiped and
    /// bootstrapped again. Never 0. A cluster bootstrapped before
    /// incarnations existed has incarnation 0: its ids are the group ids.
    pub async fn table_identity(&self, group: GroupId) -> Result<u64> {
        let incarnation = match self.incarnation.get() {
            Some(incarnation) => *incarnation,
            None => {
                let read = self.read_meta_u64(INCARNATION_KEY).await?;
                *self
                    .incarnation
                    .get_or_init(|| read.map_or(0, |(value, _)| value))
            }
        };
        let identity = incarnation ^ group.0;
        Ok(if identity == 0 { group.0 } else { identity })
    }

    /// Follower clusters: the leader cluster's id of the table that the
    /// local copy `name` replicates, if recorded (`record_replica_source`).
    pub async fn replica_source(&self, name: &str) -> Result<Option<u64>> {
        Ok(self
            .read_meta_u64(&replica_source_key(name))
            .await?
            .map(|(id, _)| id))
    }

    /// A u64 (8 bytes, little-endian) under `key` in the metadata group,
    /// read linearizably, with the key's version; `None` when the key is
    /// missing.
    async fn read_meta_u64(&self, key: &[u8]) -> Result<Option<(u64, u64)>> {
        self.read_meta_u64_as(key, true).await
    }

    /// `read_meta_u64`, from this node's state when not `linearizable`.
    async fn read_meta_u64_as(&self, key: &[u8], linearizable: bool) -> Result<Option<(u64, u64)>> {
        let query = Query::Range(RangeRequest {
            range: KeyRange {
                key: key.to_vec(),
                range_end: Vec::new(),
            },
            ..RangeRequest::default()
        });
        match self.read(META_GROUP, &query, linearizable).await?.result {
            Ok(ResponseOp::Range(range)) => match range.kvs.first() {
                None => Ok(None),
                Some(kv) => match <[u8; 8]>::try_from(kv.value.as_slice()) {
                    Ok(bytes) => Ok(Some((u64::from_le_bytes(bytes), kv.version))),
                    Err(_) => Err(Error::Internal(format!(
                        "a malformed record under {:?} in the metadata group",
                        String::from_utf8_lossy(key)
                    ))),
                },
            },
            Ok(other) => Err(Error::Internal(format!("unexpected {other:?}"))),
            Err(error) => Err(Error::Internal(error)),
        }
    }

    /// Follower clusters: the restore id of an operator's reset of table
    /// `group` that no install has carried out yet (read linearizably).
    pub async fn table_reset_requested(&self, group: GroupId) -> Result<Option<u64>> {
        Ok(self
            .read_meta_u64(&reset_request_key(group))
            .await?
            .map(|(restore_id, _)| restore_id))
    }

    /// Follower clusters: an install carried out the reset `restore_id`
    /// of table `group` asked for; its record goes, unless a later reset
    /// replaced it.
    pub async fn clear_reset_request(&self, group: GroupId, restore_id: u64) -> Result<()> {
        let key = reset_request_key(group);
        let command = Command::Txn(TxnRequest {
            compare: vec![compare(
                &key,
                CompareTarget::Value(restore_id.to_le_bytes().to_vec()),
            )],
            success: vec![RequestOp::DeleteRange(DeleteRangeRequest {
                range: KeyRange {
                    key,
                    range_end: Vec::new(),
                },
                prev_kv: false,
            })],
            failure: Vec::new(),
        });
        self.write(META_GROUP, &command).await.map(|_| ())
    }

    /// Follower clusters: records that the local copy `name` replicates
    /// the leader cluster's table `id` (its `Table.id`).
    pub async fn record_replica_source(&self, name: &str, id: u64) -> Result<()> {
        let command = Command::Put(regatta_kv::command::PutRequest {
            key: replica_source_key(name),
            value: id.to_le_bytes().to_vec(),
            prev_kv: false,
        });
        self.write(META_GROUP, &command).await.map(|_| ())
    }

    /// Creates a table: one compare-and-set on the catalogue entry and the
    /// group id counter. With `bootstrap`, also on the bootstrap marker, so
    /// that it happens once per cluster.
    async fn create_table_once(&self, name: &str, bootstrap: bool) -> Result<TableEntry> {
        // The group starts with the cluster's voters of now; learners and
        // later members are added by the group's leader (membership.rs).
        let voters: Vec<NodeId> = self.membership().await?.voters.into_iter().collect();
        if voters.is_empty() {
            return Err(Error::Unavailable(
                "this node has not joined the cluster yet".into(),
            ));
        }
        for _ in 0..16 {
            let next = self.next_group_id().await?;
            let command = Command::Txn(create_table_txn(name, next, &voters, bootstrap));
            let response = self.write(META_GROUP, &command).await?;
            match response.result {
                Ok(ResponseOp::Txn(txn)) if txn.succeeded => {
                    self.refresh_catalogue().await?;
                    self.reconcile_groups().await;
                    return Ok(TableEntry {
                        name: name.to_string(),
                        group: GroupId(next.0),
                    });
                }
                Ok(ResponseOp::Txn(txn)) => {
                    let found = |position: usize| {
                        matches!(
                            txn.responses.get(position),
                            Some(ResponseOp::Range(range)) if range.count > 0
                        )
                    };
                    if bootstrap && found(1) {
                        return Err(Error::TableExists(name.to_string()));
                    }
                    if found(0) {
                        return Err(Error::TableExists(name.to_string()));
                    }
                    // Another table took the id meanwhile: try the next.
                }
                Ok(other) => return Err(Error::Internal(format!("unexpected {other:?}"))),
                Err(error) => return Err(Error::Internal(error)),
            }
        }
        Err(Error::Unavailable(
            "tables are being created concurrently; retry".into(),
        ))
    }

    /// Deletes table `name` from the catalogue; every node then removes
    /// its group and data.
    pub async fn delete_table(&self, name: &str) -> Result<()> {
        self.leader_cluster_only()?;
        self.delete_table_unchecked(name).await
    }

    async fn delete_table_unchecked(&self, name: &str) -> Result<()> {
        validate_table_name(name)?;
        let group = self
            .tables()
            .into_iter()
            .find(|table| table.name == name)
            .map(|table| table.group);
        let key = catalogue_key(name);
        let command = Command::DeleteRange(regatta_kv::command::DeleteRangeRequest {
            range: KeyRange {
                key,
                range_end: Vec::new(),
            },
            prev_kv: false,
        });
        match self.write(META_GROUP, &command).await?.result {
            Ok(ResponseOp::DeleteRange(result)) if result.deleted == 1 => {
                if let Some(group) = group {
                    // Garbage otherwise (group ids are never reused), but
                    // not worth keeping.
                    let record = Command::DeleteRange(regatta_kv::command::DeleteRangeRequest {
                        range: KeyRange {
                            key: reset_request_key(group),
                            range_end: Vec::new(),
                        },
                        prev_kv: false,
                    });
                    if let Err(error) = self.write(META_GROUP, &record).await {
                        tracing::warn!(table = name, %error, "could not delete the table's reset record");
                    }
                }
                self.refresh_catalogue().await?;
                self.reconcile_groups().await;
                Ok(())
            }
            Ok(ResponseOp::DeleteRange(_)) => Err(Error::TableNotFound(name.to_string())),
            Ok(other) => Err(Error::Internal(format!("unexpected {other:?}"))),
            Err(error) => Err(Error::Internal(error)),
        }
    }

    /// The next free group id and the version of its counter (0 before
    /// the first table).
    async fn next_group_id(&self) -> Result<(u64, i64)> {
        Ok(match self.read_meta_u64(NEXT_ID_KEY).await? {
            Some((id, version)) => (id, version as i64),
            None => (FIRST_TABLE_GROUP, 0),
        })
    }

    /// Reads the catalogue from the local metadata group.
    async fn refresh_catalogue(&self) -> Result<()> {
        let (tables, voters) = self.read_catalogue(false).await?;
        *self.table_voters.write().unwrap_or_else(|p| p.into_inner()) = voters;
        *self.tables.write().unwrap_or_else(|p| p.into_inner()) = tables;
        Ok(())
    }

    /// The cluster's tables as of now: a linearizable read of the
    /// catalogue, never this node's possibly stale copy (a node just
    /// restarted, or cut off, may not know every table yet). For those who
    /// act on a table's absence, such as follower clusters, which delete
    /// the tables the leader cluster no longer lists.
    pub async fn tables_linearizable(&self) -> Result<Vec<TableEntry>> {
        let (tables, _) = self.read_catalogue(true).await?;
        Ok(tables
            .into_iter()
            .map(|(name, group)| TableEntry { name, group })
            .collect())
    }

    /// Reads the catalogue: tables by name, and the voters each table's
    /// group started with.
    async fn read_catalogue(
        &self,
        linearizable: bool,
    ) -> Result<(BTreeMap<String, GroupId>, HashMap<GroupId, Vec<NodeId>>)> {
        let query = Query::Range(RangeRequest {
            range: KeyRange {
                key: CATALOGUE_PREFIX.to_vec(),
                range_end: prefix_end(CATALOGUE_PREFIX),
            },
            ..RangeRequest::default()
        });
        let response = self.read(META_GROUP, &query, linearizable).await?;
        let Ok(ResponseOp::Range(range)) = response.result else {
            return Err(Error::Internal("the catalogue read failed".into()));
        };
        let mut tables = BTreeMap::new();
        let mut voters = HashMap::new();
        for kv in range.kvs {
            let name = String::from_utf8_lossy(&kv.key[CATALOGUE_PREFIX.len()..]).to_string();
            // The group id, then (since membership changes) the voters it
            // started with; 8 bytes each, little-endian.
            if kv.value.len() < 8 || kv.value.len() % 8 != 0 {
                tracing::error!(table = %name, "a malformed catalogue entry");
                continue;
            }
            let mut ids = kv.value.chunks_exact(8).map(|chunk| {
                let mut bytes = [0u8; 8];
                bytes.copy_from_slice(chunk);
                u64::from_le_bytes(bytes)
            });
            let Some(group) = ids.next().map(GroupId) else {
                continue;
            };
            let group_voters: Vec<NodeId> = ids.map(NodeId).collect();
            if !group_voters.is_empty() {
                voters.insert(group, group_voters);
            }
            tables.insert(name, group);
        }
        Ok((tables, voters))
    }

    /// Bootstraps the catalogue once per cluster, with the etcd table.
    async fn bootstrap_catalogue(&self) -> Result<()> {
        match self.create_table_once(&self.config.etcd_table, true).await {
            Ok(_) | Err(Error::TableExists(_)) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Starts the groups of new tables and removes those of deleted ones,
    /// from the catalogue as this node last read it.
    async fn reconcile_groups(&self) {
        let wanted: std::collections::BTreeSet<GroupId> = self
            .tables()
            .iter()
            .map(|table| table.group)
            .chain([META_GROUP])
            .collect();
        let running: Vec<GroupId> = self.running_groups();
        for group in &wanted {
            if !running.contains(group) {
                match self.start_group(*group) {
                    Ok(()) => {
                        self.running
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(*group);
                    }
                    Err(error) => tracing::error!(group = group.0, %error, "cannot start a table"),
                }
            }
        }
        for group in running.iter().filter(|group| !wanted.contains(group)) {
            // `UnknownGroup`: an earlier removal finished after its caller
            // stopped waiting (a cancelled delete); the cleanup is still due.
            let removed = match self.host.remove_group(*group).await {
                Ok(()) | Err(regatta_multiraft::Error::UnknownGroup(_)) => true,
                Err(_) => false,
            };
            if removed {
                if let Err(error) = self.store.remove_table(group.0) {
                    tracing::error!(group = group.0, %error, "cannot delete a table's data");
                }
                self.running
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .remove(group);
            }
        }
    }

    fn running_groups(&self) -> Vec<GroupId> {
        self.running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .collect()
    }

    /// Keeps the running groups equal to the catalogue, and the facts
    /// fresh.
    async fn reconcile_loop(self: Arc<Node>) {
        let mut bootstrapped = false;
        loop {
            tokio::time::sleep(RECONCILE_INTERVAL).await;
            let meta = match self.host.status(META_GROUP).await {
                Ok(status) => status,
                Err(_) => return, // stopped
            };
            if !bootstrapped
                && self.config.bootstrap
                && self.config.role == ClusterRole::Leader
                && meta.soft_state.role == Role::Leader
                && self.bootstrap_catalogue().await.is_ok()
            {
                bootstrapped = true;
            }
            if self.refresh_catalogue().await.is_err() {
                continue;
            }
            self.reconcile_groups().await;
            self.reconcile_membership(&meta).await;
            let running = self.running_groups();
            let mut facts = HashMap::new();
            for group in &running {
                if let Ok(status) = self.host.status(*group).await {
                    facts.insert(
                        *group,
                        GroupFacts {
                            leader: status.soft_state.leader.map_or(0, |id| id.0),
                            term: status.hard_state.term.0,
                        },
                    );
                }
            }
            {
                let previous = self.facts.read().unwrap_or_else(|p| p.into_inner());
                let mut events = self.raft_events.write().unwrap_or_else(|p| p.into_inner());
                for (group, now) in &facts {
                    let Some(before) = previous.get(group) else {
                        continue;
                    };
                    let counted = events.entry(*group).or_default();
                    if now.leader != 0 && now.leader != before.leader {
                        counted.leader_changes += 1;
                    }
                    counted.term_increases += now.term.saturating_sub(before.term);
                }
                events.retain(|group, _| facts.contains_key(group));
            }
            *self.facts.write().unwrap_or_else(|p| p.into_inner()) = facts;
        }
    }
}

/// Makes the data directory, refusing a file in its place.
fn create_data_dir(dir: &std::path::Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::Config(format!(
            "the data directory {} is a file, not a directory (--data-dir)",
            dir.display()
        )));
    }
    std::fs::create_dir_all(dir).map_err(|error| {
        Error::Config(format!(
            "create the data directory {} (--data-dir): {error}",
            dir.display()
        ))
    })
}

/// The peer transport's settings: every other member and declared peer
/// address, and TLS. Warns when the peer port listens beyond loopback
/// without TLS.
fn peer_transport_config(config: &NodeConfig, listener: &TcpListener) -> TcpConfig {
    let mut tcp = TcpConfig::new(config.node_id, config.cluster_id);
    tcp.peers = config
        .members
        .iter()
        .chain(&config.peer_addresses)
        .filter(|(id, _)| **id != config.node_id)
        .map(|(id, address)| (*id, address.clone()))
        .collect();
    tcp.tls = config.peer_tls.clone();
    if let (None, Ok(local)) = (&tcp.tls, listener.local_addr()) {
        if !local.ip().is_loopback() {
            tracing::warn!(
                address = %local,
                "the Raft peer port listens beyond loopback without TLS: whoever reaches it can send Raft messages as any node (docs/security.md); set --raft.cert-filename, --raft.key-filename, --raft.ca-filename and --raft.allowed-cn"
            );
        }
    }
    tcp
}

/// Listens for peers on this node's own peer address (`--raft.address`).
/// A host name is resolved once, here, and the first address it stands
/// for that can be bound is used; `--raft.listen-address` picks another.
/// A name other than `localhost` that resolves to a loopback address in a
/// cluster of several members is warned about: peers on other hosts
/// resolve it elsewhere (Debian's /etc/hosts maps the host's own name to
/// 127.0.1.1).
async fn listen_on_own_address(own: &PeerAddress, clustered: bool) -> Result<TcpListener> {
    let refused = |why: String| {
        Error::Config(format!(
            "listen for peers on {own} (--raft.address): {why}; \
             --raft.listen-address sets where to listen"
        ))
    };
    let candidates = own
        .resolve()
        .await
        .map_err(|error| refused(error.to_string()))?;
    let mut last_error = None;
    for address in &candidates {
        match TcpListener::bind(address).await {
            Ok(listener) => {
                if own.is_name() {
                    tracing::info!(raft_address = %own, listening = %address, "peer address resolved");
                    if clustered && address.ip().is_loopback() && own.host() != "localhost" {
                        tracing::warn!(
                            raft_address = %own,
                            listening = %address,
                            "--raft.address resolves to a loopback address here, which peers on \
                             other hosts cannot reach: set --raft.listen-address (0.0.0.0:<port> \
                             for every interface)"
                        );
                    }
                }
                return Ok(listener);
            }
            Err(error) => last_error = Some(format!("{address}: {error}")),
        }
    }
    Err(refused(
        last_error.unwrap_or_else(|| "resolves to no address".into()),
    ))
}

/// Whether a proposal that failed with `error` may still be in some
/// node's log, hence may yet apply.
fn may_be_in_a_log(error: &regatta_multiraft::Error) -> bool {
    use regatta_multiraft::Error as E;
    match error {
        E::NotLeader { .. } | E::OutcomeUnknown(_) => true,
        E::Unsent { cause, .. } => cause.may_have_arrived(),
        _ => false,
    }
}

/// A flag read from table `group`'s metadata; false (and logged) when the
/// metadata cannot be read.
fn table_flag(group: GroupId, read: regatta_kv::Result<bool>) -> bool {
    read.unwrap_or_else(|error| {
        tracing::warn!(group = group.0, %error, "cannot read the table's metadata");
        false
    })
}

/// The pause before a proposal is tried again after a retryable error.
const RETRY_PAUSE: Duration = Duration::from_millis(20);
/// The longest pause between tries while the leader is overloaded (the
/// pause doubles from `RETRY_PAUSE`).
const OVERLOAD_PAUSE_MAX: Duration = Duration::from_millis(500);

/// The pauses between tries of one request. An overloaded leader is
/// retried ever more slowly, so that its refusals (which come at once) do
/// not turn into a stream of the same request; elections are polled at a
/// steady pace.
struct RetryPauses {
    overload_pause: Duration,
}

impl Default for RetryPauses {
    fn default() -> RetryPauses {
        RetryPauses {
            overload_pause: RETRY_PAUSE,
        }
    }
}

impl RetryPauses {
    /// Sleeps before the next try after `error`, never past `deadline`.
    async fn wait(&mut self, error: &regatta_multiraft::Error, deadline: Instant) {
        let pause = if overloaded(error) {
            let pause = self.overload_pause;
            self.overload_pause = (self.overload_pause * 2).min(OVERLOAD_PAUSE_MAX);
            pause
        } else {
            RETRY_PAUSE
        };
        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(pause.min(left)).await;
    }
}

/// Whether `error` says the leader is over a load limit (as opposed to
/// having no leader): its caller backs off.
fn overloaded(error: &regatta_multiraft::Error) -> bool {
    use regatta_multiraft::Error as E;
    use regatta_raft::Error as R;
    match error {
        E::Busy(_) => true,
        E::Unsent { cause, .. } => cause.is_overload(),
        E::Raft { source, .. } => matches!(
            source,
            R::UncommittedSizeExceeded { .. }
                | R::ApplyBacklog { .. }
                | R::LeaderOverloaded { .. }
                | R::TooManyPendingReads { .. }
        ),
        _ => false,
    }
}

/// Errors that an election or a moment's patience may cure: the request
/// is tried again (with the same request id) until its deadline.
fn retryable(error: &regatta_multiraft::Error) -> bool {
    use regatta_multiraft::Error as E;
    use regatta_raft::Error as R;
    match error {
        E::NotLeader { .. }
        | E::Dropped(_)
        | E::Busy(_)
        | E::OutcomeUnknown(_)
        | E::Unsent { .. } => true,
        E::Raft { source, .. } => matches!(
            source,
            R::NotLeader { .. }
                | R::TransferInProgress { .. }
                | R::UncommittedSizeExceeded { .. }
                | R::ApplyBacklog { .. }
                | R::LeaderOverloaded { .. }
                | R::TooManyPendingReads { .. }
        ),
        _ => false,
    }
}

fn decode_response(bytes: &Bytes) -> Result<Response> {
    decode::<Response>(bytes).map_err(|error| Error::Internal(error.to_string()))
}

fn replica_source_key(name: &str) -> Vec<u8> {
    let mut key = REPLICA_SOURCE_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

/// The metadata group's key of the record of an operator's reset of
/// follower table `group` (`reset/<group>`, `docs/kv-format.md`).
pub fn reset_request_key(group: GroupId) -> Vec<u8> {
    let mut key = RESET_REQUEST_PREFIX.to_vec();
    key.extend_from_slice(group.0.to_string().as_bytes());
    key
}

/// The catalogue transaction that creates table `name` as group `next.0`
/// (the next-id key at version `next.1`) with `voters`: it succeeds only
/// if the name is free, no other creation took the id and (for
/// `bootstrap`, which also marks the cluster bootstrapped) the cluster was
/// not bootstrapped yet; when it fails, its responses count the name's
/// key and the bootstrap key, for the caller to tell why.
fn create_table_txn(
    name: &str,
    next: (u64, i64),
    voters: &[NodeId],
    bootstrap: bool,
) -> TxnRequest {
    let count = |key: &[u8]| {
        RequestOp::Range(RangeRequest {
            range: KeyRange {
                key: key.to_vec(),
                range_end: Vec::new(),
            },
            count_only: true,
            ..RangeRequest::default()
        })
    };
    let key = catalogue_key(name);
    let mut entry = Vec::with_capacity(8 + 8 * voters.len());
    entry.extend_from_slice(&next.0.to_le_bytes());
    for voter in voters {
        entry.extend_from_slice(&voter.0.to_le_bytes());
    }
    let mut command = TxnRequest {
        compare: vec![
            compare(&key, CompareTarget::CreateRevision(0)),
            compare(NEXT_ID_KEY, CompareTarget::Version(next.1)),
        ],
        success: vec![
            put(&key, &entry),
            put(NEXT_ID_KEY, &(next.0 + 1).to_le_bytes()),
        ],
        failure: vec![count(&key), count(BOOTSTRAPPED_KEY)],
    };
    if bootstrap {
        command
            .compare
            .push(compare(BOOTSTRAPPED_KEY, CompareTarget::CreateRevision(0)));
        command.success.push(put(BOOTSTRAPPED_KEY, b"1"));
        command
            .success
            .push(put(INCARNATION_KEY, &random_u64().to_le_bytes()));
    }
    command
}

fn catalogue_key(name: &str) -> Vec<u8> {
    let mut key = CATALOGUE_PREFIX.to_vec();
    key.extend_from_slice(name.as_bytes());
    key
}

fn compare(key: &[u8], target: CompareTarget) -> Compare {
    Compare {
        range: KeyRange {
            key: key.to_vec(),
            range_end: Vec::new(),
        },
        target,
        result: CompareResult::Equal,
    }
}

fn put(key: &[u8], value: &[u8]) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: key.to_vec(),
        value: value.to_vec(),
        prev_kv: false,
    })
}

/// The end of the range of every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xFF {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Table names: 1 to 128 characters of letters, digits, `-`, `_`, `.`.
pub fn validate_table_name(name: &str) -> Result<()> {
    let valid = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        Ok(())
    } else {
        Err(Error::InvalidArgument(format!(
            "table name {name:?}: use 1 to 128 letters, digits, '-', '_' or '.'"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Lag counts how long a copy has been known behind, and, past the
    /// grace, how long the leader cluster has been silent; an install
    /// counts as behind whatever the indexes say.
    #[test]
    fn lag_counts_being_behind_and_silence() {
        let now = Instant::now();
        let ago = |seconds: u64| now.checked_sub(Duration::from_secs(seconds));
        let facts = |behind: Option<u64>, heard: u64, installing: bool| ReplicationFacts {
            leader_index: 10,
            behind_since: behind.and_then(ago),
            heard_at: ago(heard),
            installing,
            ..ReplicationFacts::default()
        };
        let Some(_) = ago(60) else {
            return; // A clock too close to its start to look back.
        };
        assert_eq!(facts(None, 1, false).lag_ms_at(10, now), 0, "caught up");
        assert_eq!(facts(None, 9, false).lag_ms_at(10, now), 9000, "silent");
        assert_eq!(facts(Some(5), 0, false).lag_ms_at(7, now), 5000, "behind");
        assert_eq!(facts(Some(5), 0, false).lag_ms_at(10, now), 0, "applied");
        assert_eq!(facts(Some(3), 0, true).lag_ms_at(10, now), 3000, "install");
        assert_eq!(facts(Some(5), 30, false).lag_ms_at(7, now), 30000, "both");
    }
}
