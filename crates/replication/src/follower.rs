//! The follower cluster's side (`docs/replication.md`,
//! `docs/decisions/0004-replication-protocol.md`):
//!
//! - the node leading the follower's metadata group keeps the catalogue
//!   equal to the leader cluster's tables (`Metadata.Get`);
//! - for each table, the node leading the table's group pulls its log
//!   (`Log.Replicate`, a stream that stays open) and proposes what arrives
//!   as `Replicated` batches into the table's own group; the table applies
//!   a batch only on top of the leader index it holds, so a deposed
//!   puller can neither skip nor repeat a command;
//! - when the log no longer reaches back, the puller streams the leader's
//!   snapshot (`Snapshot.Stream`) and proposes it as `RestoreBegin`,
//!   `RestoreChunk`s and `RestoreCommit`;
//! - writes made on this cluster go to the leader cluster
//!   (`Forward.Write`, through `regatta_server::WriteForwarder`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regatta_kv::command::{decode, encode, Command, ReplicatedBatch, Response as KvResponse};
use regatta_server::restore::{propose, Chunk, RestoreSummary, TableRestore};
use regatta_server::{Node, ReplicationFacts, WriteForwarder, META_GROUP};
use regatta_wal::GroupId;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

use crate::error::{Error, Result};
use crate::proto;

/// Bytes of commands in one `Replicated` proposal, at most (a larger
/// single command goes alone).
pub const PROPOSAL_BYTES_MAX: usize = 1 << 20;

/// The largest message a follower cluster takes from the leader cluster:
/// a log stream response (one command goes alone, however large the
/// leader's value limit lets it be), a snapshot chunk, or the answer to a
/// forwarded write (a DeleteRange with `prev_kv` over many keys). tonic's
/// 4 MiB default would stop replication at the first larger command, for
/// good, and fail a forwarded write after it applied. As etcd's clients:
/// 2 GiB.
pub const LEADER_MESSAGE_BYTES_MAX: usize = i32::MAX as usize;

/// How often the follower pings an idle or busy connection to a leader
/// node, and how long it waits for the answer before the connection is
/// dead.
const LEADER_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(5);
const LEADER_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// A log stream that brings nothing for this long is broken: the leader
/// sends a heartbeat every second.
const LOG_SILENCE_MAX: Duration = Duration::from_secs(10);

/// How often pullers are started and stopped as leaderships move.
const SUPERVISE_INTERVAL: Duration = Duration::from_millis(100);

/// Responses buffered between a log stream and its proposer.
const STREAM_BUFFER_RESPONSES: usize = 64;
/// Bytes of the leader's responses one puller holds at most, received and
/// not yet proposed (one response larger than this is taken alone). The
/// leader sends up to 4 MiB per response: counting responses alone let a
/// table's puller hold 256 MiB while its proposals were slow, and a
/// follower catching up many tables run out of memory.
const STREAM_BUFFER_BYTES_MAX: usize = 16 << 20;

/// A puller's pause after a failure, doubled up to the maximum.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(5);
/// Log streams in a row that end cleanly with nothing in them before the
/// puller moves to the leader cluster's next address.
const EMPTY_STREAMS_BEFORE_NEXT_ADDRESS: u32 = 3;

/// How a follower cluster replicates.
#[derive(Clone, Debug)]
pub struct FollowerConfig {
    /// The leader cluster's replication API on one or more of its nodes,
    /// as URLs (`http://host:port`). The follower uses one at a time and
    /// moves to the next when it cannot be reached or is behind.
    pub leader_urls: Vec<String>,
    /// How often the catalogue is compared with the leader's tables.
    pub metadata_interval: Duration,
    /// Snapshot installs running at once on this node, at most.
    pub snapshot_installs_max: usize,
    /// Snapshot bytes received per second on this node, over all installs;
    /// 0 for no limit.
    pub snapshot_bytes_per_second_max: u64,
    /// TLS towards the leader cluster; plain when `None`.
    pub tls: Option<regatta_server::tls::ClientTls>,
}

impl FollowerConfig {
    /// Defaults for the leader cluster at `leader_url`.
    pub fn new(leader_url: impl Into<String>) -> FollowerConfig {
        FollowerConfig::with_addresses(vec![leader_url.into()])
    }

    /// Defaults for the leader cluster reached at any of `leader_urls`.
    pub fn with_addresses(leader_urls: Vec<String>) -> FollowerConfig {
        FollowerConfig {
            leader_urls,
            metadata_interval: Duration::from_secs(1),
            snapshot_installs_max: 2,
            snapshot_bytes_per_second_max: 0,
            tls: None,
        }
    }
}

/// The running follower side of one node; stops when dropped.
pub struct Follower {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl Follower {
    /// Stops pulling and waits for the pullers to end.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// Starts replicating the leader cluster at `config.leader_urls` into
/// `node`'s cluster, and forwarding its writes there.
pub fn start(node: Arc<Node>, config: FollowerConfig) -> Result<Follower> {
    let link = Arc::new(LeaderLink::new(&config)?);
    node.set_forwarder(Arc::new(GrpcForwarder {
        link: Arc::clone(&link),
    }));
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(supervise(node, config, link, stopped));
    Ok(Follower {
        stop,
        task: Some(task),
    })
}

/// The channels to the leader cluster's nodes, one in use at a time.
///
/// Every node of the leader cluster serves the whole replication API: the
/// catalogue is read linearizably, and a node whose log is behind this
/// follower says so (`LeaderBehind`) rather than send an older state. So
/// moving between them is safe, and needed: with one address, losing that
/// node stopped replication and forwarded writes.
struct LeaderLink {
    addresses: Vec<String>,
    channels: Vec<Channel>,
    /// The channel in use: an index into `channels`.
    current: AtomicUsize,
}

impl LeaderLink {
    fn new(config: &FollowerConfig) -> Result<LeaderLink> {
        if config.leader_urls.is_empty() {
            return Err(Error::InvalidArgument(
                "no address of the leader cluster was given".into(),
            ));
        }
        let mut channels = Vec::with_capacity(config.leader_urls.len());
        for url in &config.leader_urls {
            let endpoint = regatta_server::tls::endpoint(url, config.tls.as_ref())
                .map_err(|error| {
                    Error::InvalidArgument(format!("the leader cluster's address: {error}"))
                })?
                // A leader node that died without closing its connection
                // (power loss, a dropped route) is found by HTTP/2 pings,
                // not after TCP's retransmissions give up (about 15 min):
                // every call on it then fails, and the link moves on.
                .http2_keep_alive_interval(LEADER_KEEPALIVE_INTERVAL)
                .keep_alive_timeout(LEADER_KEEPALIVE_TIMEOUT)
                .keep_alive_while_idle(true);
            channels.push(regatta_server::tls::connect_lazy(
                endpoint,
                config.tls.as_ref(),
            ));
        }
        Ok(LeaderLink {
            addresses: config.leader_urls.clone(),
            channels,
            current: AtomicUsize::new(0),
        })
    }

    /// The channel in use, and its index for [`LeaderLink::failed`].
    fn pick(&self) -> (usize, Channel) {
        let index = self.current.load(Ordering::Acquire) % self.channels.len();
        (index, self.channels[index].clone())
    }

    /// Moves to the next address when `error`, met on channel `used`, says
    /// that node may not serve: unreachable, timed out, failing, or
    /// behind. Errors about the request itself, which every node would
    /// repeat, do not move. Many callers may report the same failure; the
    /// first one moves.
    fn failed(&self, used: usize, error: &Error) {
        let moves = match error {
            Error::Remote(status) => !matches!(
                status.code(),
                tonic::Code::Ok
                    | tonic::Code::InvalidArgument
                    | tonic::Code::NotFound
                    | tonic::Code::AlreadyExists
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::OutOfRange
                    // A forwarded write over the leader cluster's limits:
                    // every node refuses it alike.
                    | tonic::Code::ResourceExhausted
                    | tonic::Code::PermissionDenied
                    | tonic::Code::Unauthenticated
                    | tonic::Code::Unimplemented
            ),
            Error::LeaderBehind(_) => true,
            _ => false,
        };
        if !moves || self.channels.len() < 2 {
            return;
        }
        let next = (used + 1) % self.channels.len();
        if self
            .current
            .compare_exchange(used, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            tracing::warn!(
                from = %self.addresses[used],
                to = %self.addresses[next],
                %error,
                "moving to another node of the leader cluster"
            );
        }
    }
}

/// Forwards writes over `Forward.Write`.
struct GrpcForwarder {
    link: Arc<LeaderLink>,
}

impl WriteForwarder for GrpcForwarder {
    fn forward(
        &self,
        table: String,
        table_id: u64,
        command: Command,
    ) -> Pin<Box<dyn Future<Output = regatta_server::Result<KvResponse>> + Send + '_>> {
        Box::pin(async move {
            let (used, channel) = self.link.pick();
            let mut client = proto::forward_client::ForwardClient::new(channel)
                .max_decoding_message_size(LEADER_MESSAGE_BYTES_MAX);
            let request = proto::ForwardRequest {
                table: table.into_bytes(),
                command: encode(&command),
                table_id,
            };
            // Not retried on another node: the write may have been applied.
            // The client retries, and the next attempt uses the next node.
            let reply = client.write(request).await.map_err(|status| {
                let forwarded = regatta_server::Error::Forwarded {
                    code: status.code(),
                    message: status.message().to_string(),
                };
                self.link.failed(used, &Error::from(status));
                forwarded
            })?;
            decode::<KvResponse>(&reply.into_inner().response).map_err(|error| {
                regatta_server::Error::Internal(format!(
                    "the leader cluster's response to a forwarded write: {error}"
                ))
            })
        })
    }
}

/// A running puller.
struct Puller {
    group: GroupId,
    task: JoinHandle<()>,
}

/// Keeps the catalogue in step with the leader (on the metadata group's
/// leader) and one puller per table this node leads.
async fn supervise(
    node: Arc<Node>,
    config: FollowerConfig,
    link: Arc<LeaderLink>,
    mut stopped: watch::Receiver<bool>,
) {
    let own = node.config().node_id.0;
    let installs = Arc::new(InstallLimits {
        slots: Semaphore::new(config.snapshot_installs_max.max(1)),
        pace: Pace::new(config.snapshot_bytes_per_second_max),
    });
    let mut pullers: HashMap<String, Puller> = HashMap::new();
    let mut metadata_due = Instant::now();
    // The catalogue check runs on a task of its own: a slow or
    // unreachable leader node must not hold up starting and stopping
    // pullers (tables whose leadership moved here would not be pulled,
    // and pullers of tables that moved away would keep running).
    let mut reconciling: Option<JoinHandle<()>> = None;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(SUPERVISE_INTERVAL) => {}
            _ = stopped.changed() => break,
        }
        if *stopped.borrow() {
            break;
        }
        let idle = reconciling.as_ref().is_none_or(|task| task.is_finished());
        if node.facts(META_GROUP).leader == own && Instant::now() >= metadata_due && idle {
            metadata_due = Instant::now() + config.metadata_interval;
            let (used, channel) = link.pick();
            let (node, link) = (Arc::clone(&node), Arc::clone(&link));
            reconciling = Some(tokio::spawn(async move {
                if let Err(error) = reconcile_tables(&node, &channel).await {
                    tracing::warn!(%error, "cannot compare the tables with the leader cluster's");
                    link.failed(used, &error);
                }
            }));
        }
        let led: HashMap<String, GroupId> = node
            .tables()
            .into_iter()
            .filter(|table| node.facts(table.group).leader == own)
            .map(|table| (table.name, table.group))
            .collect();
        pullers.retain(|name, puller| {
            let keep = led.get(name) == Some(&puller.group) && !puller.task.is_finished();
            if !keep {
                puller.task.abort();
                // Its lag, computed when read, would grow for good here;
                // the node that pulls now reports the table's.
                node.clear_replication_facts(puller.group);
            }
            keep
        });
        for (name, group) in led {
            pullers.entry(name.clone()).or_insert_with(|| {
                tracing::info!(table = %name, group = group.0, "pulling the table from the leader cluster");
                Puller {
                    group,
                    task: tokio::spawn(pull(
                        Arc::clone(&node),
                        Arc::clone(&link),
                        name,
                        group,
                        Arc::clone(&installs),
                    )),
                }
            });
        }
    }
    for puller in pullers.into_values() {
        puller.task.abort();
    }
    if let Some(task) = reconciling {
        task.abort();
    }
}

/// Creates the leader's new tables here and deletes those it dropped.
async fn reconcile_tables(node: &Node, channel: &Channel) -> Result<()> {
    let mut client = proto::metadata_client::MetadataClient::new(channel.clone());
    let tables = client
        .get(proto::MetadataRequest {})
        .await?
        .into_inner()
        .tables;
    let wanted: BTreeMap<String, u64> = tables
        .into_iter()
        .filter(|table| table.r#type == proto::table::Type::Replicated as i32)
        .map(|table| (table.name, table.id))
        .collect();
    let local: BTreeSet<String> = node.tables().into_iter().map(|table| table.name).collect();
    for (name, id) in &wanted {
        if !local.contains(name) {
            tracing::info!(table = %name, "creating a table of the leader cluster");
            // The source first: a copy never exists without the id of the
            // table it replicates, so its puller never asks for "any
            // table of this name", which could be a re-created one. (A
            // crash between the two leaves a record without a table; the
            // next check records again and creates it.)
            if *id != 0 {
                node.record_replica_source(name, *id).await?;
            }
            node.create_replica_table(name).await?;
            continue;
        }
        match node.replica_source(name).await? {
            // A leader that gives no ids, or the same table.
            _ if *id == 0 => {}
            Some(recorded) if recorded == *id => {}
            Some(recorded) => {
                // Dropped and re-created between two checks: the copy is
                // of the old table, and the new one starts from scratch.
                tracing::warn!(table = %name, old = recorded, new = id, "the leader cluster re-created the table; replacing this copy");
                node.delete_replica_table(name).await?;
                node.record_replica_source(name, *id).await?;
                node.create_replica_table(name).await?;
            }
            // A copy made before ids were recorded: taken to be of this
            // table.
            None => node.record_replica_source(name, *id).await?,
        }
    }
    for name in local.iter().filter(|name| !wanted.contains_key(*name)) {
        tracing::info!(table = %name, "deleting a table the leader cluster dropped");
        node.delete_replica_table(name).await?;
    }
    Ok(())
}

/// Pulls table `name` until aborted, starting over after each failure.
async fn pull(
    node: Arc<Node>,
    link: Arc<LeaderLink>,
    name: String,
    group: GroupId,
    installs: Arc<InstallLimits>,
) {
    let mut delay = RETRY_DELAY_MIN;
    let mut state = LagState::new();
    // Streams in a row that ended cleanly without a message.
    let mut empty_streams = 0u32;
    loop {
        let (used, channel) = link.pick();
        let received_before = state.received;
        match pull_once(&node, &channel, &name, group, &installs, &mut state).await {
            Ok(()) if state.received > received_before => {
                empty_streams = 0;
                delay = RETRY_DELAY_MIN;
            }
            Ok(()) => {
                // Ended without a message: a leader node that is
                // stopping, or one that ends every stream at once.
                // Reopening at once would spin: pause as after a failure,
                // and after a few in a row try the next address.
                empty_streams += 1;
                tracing::info!(
                    table = %name,
                    pause_ms = delay.as_millis() as u64,
                    "the leader's log stream ended with nothing in it; reopening after a pause"
                );
                if empty_streams >= EMPTY_STREAMS_BEFORE_NEXT_ADDRESS {
                    empty_streams = 0;
                    link.failed(
                        used,
                        &Error::from(tonic::Status::unavailable(format!(
                            "the leader node ended {EMPTY_STREAMS_BEFORE_NEXT_ADDRESS} log \
                             streams in a row with nothing in them"
                        ))),
                    );
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
            }
            Err(error) => {
                tracing::warn!(table = %name, %error, "replication paused; retrying");
                link.failed(used, &error);
                state.error = Some(error.to_string());
                state.report(&node, group);
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_DELAY_MAX);
            }
        }
    }
}

/// What the puller knows of its table's lag. The lag itself is computed
/// when read (`ReplicationFacts::lag_ms_at`), so it keeps growing while
/// the puller waits: cut off from the leader cluster, or installing a
/// snapshot.
struct LagState {
    /// Stream messages received and snapshots installed, ever: whether a
    /// stream did anything.
    received: u64,
    leader_index: u64,
    applied: u64,
    behind_since: Option<Instant>,
    /// The last message from the leader cluster (or the puller's start).
    heard_at: Instant,
    /// A snapshot install is under way.
    installing: bool,
    error: Option<String>,
}

impl LagState {
    fn new() -> LagState {
        LagState {
            received: 0,
            leader_index: 0,
            applied: 0,
            behind_since: None,
            heard_at: Instant::now(),
            installing: false,
            error: None,
        }
    }

    /// A message from the leader cluster reports `leader_index`.
    fn heard(&mut self, leader_index: u64, applied: u64) {
        self.heard_at = Instant::now();
        self.update(leader_index, applied);
    }

    fn update(&mut self, leader_index: u64, applied: u64) {
        self.leader_index = self.leader_index.max(leader_index);
        self.applied = applied;
        if self.applied >= self.leader_index && !self.installing {
            self.behind_since = None;
        } else if self.behind_since.is_none() {
            self.behind_since = Some(Instant::now());
        }
    }

    /// A snapshot install starts: the copy is behind until one lands.
    fn install_started(&mut self) {
        self.installing = true;
        self.behind_since.get_or_insert_with(Instant::now);
    }

    /// An install ended; after a failed one the copy is still behind.
    fn install_ended(&mut self, installed: bool) {
        self.installing = false;
        if installed && self.applied >= self.leader_index {
            self.behind_since = None;
        }
    }

    fn report(&self, node: &Node, group: GroupId) {
        let facts = ReplicationFacts {
            leader_index: self.leader_index,
            applied_leader_index: self.applied,
            lag_ms: 0,
            error: self.error.clone(),
            behind_since: self.behind_since,
            heard_at: Some(self.heard_at),
            installing: self.installing,
        };
        let lag_ms = facts.lag_ms_at(self.applied, Instant::now());
        node.set_replication_facts(group, ReplicationFacts { lag_ms, ..facts });
    }
}

/// One log stream: from the table's leader index until the stream ends,
/// a batch is refused (another puller moved the table on), or the leader
/// sends the table to a snapshot (installed here).
async fn pull_once(
    node: &Node,
    channel: &Channel,
    name: &str,
    group: GroupId,
    installs: &InstallLimits,
    state: &mut LagState,
) -> Result<()> {
    let mut applied = node.table_revision(group, true).await?;
    if node.table_restore_pending(group) {
        // A reset (its restore id says so): the copy may be older than the
        // table, which is what a reset is for. Or an install another
        // puller left unfinished: the same rule as after USE_SNAPSHOT.
        let older = if node.table_reset_pending(group) {
            OlderCopy::Allowed
        } else {
            OlderCopy::Refused
        };
        return install_snapshot(node, channel, name, group, installs, state, older).await;
    }
    tracing::info!(table = %name, leader_index = applied, "streaming the leader's log");
    let (mut receiver, _reader) = open_log_stream(node, channel, name, applied).await?;
    state.error = None;
    // The budget shares of the responses being proposed.
    let mut held = Vec::new();
    loop {
        held.clear();
        let Some(message) = receiver.recv().await else {
            return Ok(());
        };
        let first = applied + 1;
        let Gathered {
            commands,
            stop,
            served,
        } = gather(message, &mut receiver, &mut held, (first, applied), state)?;
        if !commands.is_empty() {
            let result = propose(
                node,
                group,
                &Command::Replicated(ReplicatedBatch {
                    first_leader_index: first,
                    commands,
                }),
            )
            .await?;
            applied = result.leader_index;
            state.update(0, applied);
            state.report(node, group);
            if !result.accepted {
                // Another puller moved the table, or a reset waits for a
                // snapshot: start from where the table is.
                return Ok(());
            }
        } else {
            state.report(node, group);
            if node.table_restore_pending(group) {
                // An operator's reset, seen at the leader's heartbeat.
                return Ok(());
            }
        }
        match stop {
            None => {}
            Some(Ok(())) => return Ok(()),
            Some(Err(code)) if code == proto::ReplicateError::UseSnapshot as i32 => {
                let older = OlderCopy::Refused;
                install_snapshot(node, channel, name, group, installs, state, older).await?;
                return Ok(());
            }
            Some(Err(code)) => return Err(stream_refusal(code, name, served, applied)),
        }
    }
}

/// Asks the leader cluster for the table's log after `applied`; the
/// responses arrive on the returned receiver (read by the returned task).
async fn open_log_stream(
    node: &Node,
    channel: &Channel,
    name: &str,
    applied: u64,
) -> Result<(mpsc::Receiver<Received>, AbortOnDrop)> {
    let table_id = node.replica_source(name).await?.unwrap_or(0);
    let mut client = proto::log_client::LogClient::new(channel.clone())
        .max_decoding_message_size(LEADER_MESSAGE_BYTES_MAX);
    let stream = client
        .replicate(proto::ReplicateRequest {
            table: name.as_bytes().to_vec(),
            leader_index: applied,
            table_id,
        })
        .await?
        .into_inner();
    Ok(spawn_log_reader(stream))
}

/// The error for a log stream the leader ended with `code` (other than
/// `USE_SNAPSHOT`, which the caller answers with an install).
fn stream_refusal(code: i32, name: &str, served: u64, applied: u64) -> Error {
    if code == proto::ReplicateError::LeaderBehind as i32 {
        return Error::LeaderBehind(format!(
            "the serving node's table {name:?} is at index {served}, behind this \
             follower's {applied}; nothing is deleted here; the follower tries the \
             leader cluster's other nodes and waits for one to catch up, or for an \
             operator to reset this table"
        ));
    }
    Error::Protocol(format!("an unknown replicate error {code}"))
}

/// A response of the leader's log stream (or how the stream ended),
/// with its share of the stream's buffer budget.
type Received = (
    std::result::Result<Option<proto::ReplicateResponse>, tonic::Status>,
    OwnedSemaphorePermit,
);

/// A reader task keeps receiving while a batch is being proposed, so that
/// the next proposal takes everything that arrived meanwhile, up to
/// `STREAM_BUFFER_BYTES_MAX`: each response travels with its share of the
/// budget, given back once its commands are proposed. The task ends with
/// the stream, or when the returned guard drops.
fn spawn_log_reader(
    mut stream: tonic::Streaming<proto::ReplicateResponse>,
) -> (mpsc::Receiver<Received>, AbortOnDrop) {
    let (sender, receiver) = mpsc::channel(STREAM_BUFFER_RESPONSES);
    let budget = Arc::new(Semaphore::new(STREAM_BUFFER_BYTES_MAX));
    let reader = tokio::spawn(async move {
        loop {
            let message = match tokio::time::timeout(LOG_SILENCE_MAX, stream.message()).await {
                Ok(message) => message,
                Err(_) => Err(tonic::Status::unavailable(format!(
                    "the leader node sent nothing for {} s (it sends a heartbeat every second)",
                    LOG_SILENCE_MAX.as_secs()
                ))),
            };
            let size = match &message {
                Ok(Some(response)) => prost::Message::encoded_len(response),
                _ => 0,
            };
            let share = size.min(STREAM_BUFFER_BYTES_MAX) as u32;
            let Ok(permit) = Arc::clone(&budget).acquire_many_owned(share).await else {
                return;
            };
            let end = !matches!(message, Ok(Some(_)));
            if sender.send((message, permit)).await.is_err() || end {
                return;
            }
        }
    });
    (receiver, AbortOnDrop(reader))
}

/// What one turn of the pull loop took from the stream.
struct Gathered {
    /// Commands in leader-index order, from the next one on.
    commands: Vec<Vec<u8>>,
    /// The stream ended (`Ok`) or the leader answered an error code.
    stop: Option<std::result::Result<(), i32>>,
    /// The serving node's own commit index, for a `LeaderBehind` error
    /// (the state keeps the highest any node reported).
    served: u64,
}

/// Takes `message` and whatever else arrived meanwhile, up to
/// `PROPOSAL_BYTES_MAX` of commands, checking that the commands follow on
/// from `first`; `applied` is the leader index the table holds. The
/// responses' budget shares go to `held` until the commands are proposed.
fn gather(
    message: Received,
    receiver: &mut mpsc::Receiver<Received>,
    held: &mut Vec<OwnedSemaphorePermit>,
    (first, applied): (u64, u64),
    state: &mut LagState,
) -> Result<Gathered> {
    let mut pending = Some(message);
    let mut gathered = Gathered {
        commands: Vec::new(),
        stop: None,
        served: 0,
    };
    let mut bytes = 0usize;
    while let Some((message, permit)) = pending.take() {
        held.push(permit);
        let Some(response) = message? else {
            gathered.stop = Some(Ok(()));
            break;
        };
        gathered.served = response.leader_index;
        state.received += 1;
        state.heard(response.leader_index, applied);
        match response.response {
            Some(proto::replicate_response::Response::CommandsResponse(batch)) => {
                for command in batch.commands {
                    let expected = first + gathered.commands.len() as u64;
                    if command.leader_index != expected {
                        return Err(Error::Protocol(format!(
                            "leader index {} where {expected} was next",
                            command.leader_index
                        )));
                    }
                    bytes += command.command.len();
                    gathered.commands.push(command.command);
                }
            }
            Some(proto::replicate_response::Response::ErrorResponse(error)) => {
                gathered.stop = Some(Err(error.error));
                break;
            }
            None => return Err(Error::Protocol("an empty replicate response".into())),
        }
        if bytes < PROPOSAL_BYTES_MAX {
            pending = receiver.try_recv().ok();
        }
    }
    Ok(gathered)
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// What bounds snapshot installs on a node: how many run at once, and how
/// fast they may receive.
struct InstallLimits {
    slots: Semaphore,
    pace: Pace,
}

/// A node-wide byte rate: each `take` is scheduled after the bytes taken
/// before it, so installs share the rate.
struct Pace {
    bytes_per_second: u64,
    next_free: std::sync::Mutex<tokio::time::Instant>,
}

impl Pace {
    fn new(bytes_per_second: u64) -> Pace {
        Pace {
            bytes_per_second,
            next_free: std::sync::Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Waits until `bytes` more fit the rate; at once without a limit.
    async fn take(&self, bytes: u64) {
        if self.bytes_per_second == 0 {
            return;
        }
        let cost = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let start = {
            let mut next_free = match self.next_free.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            let start = (*next_free).max(tokio::time::Instant::now());
            *next_free = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

/// Whether an install may take the table back to an older revision.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum OlderCopy {
    /// An operator's reset, or an install that carries one on (a restore
    /// id with `RESET_RESTORE_ID_BIT`): the leader cluster's table may be
    /// older than this copy, and the reset says to follow it anyway.
    Allowed,
    /// The log sent the table to a snapshot: one older than the table is
    /// refused, so that its revision never moves back. A deposed puller
    /// whose install ends after the new puller applied more, or a serving
    /// node behind this copy, would otherwise undo applied writes.
    Refused,
}

/// Streams the leader's snapshot of table `name` and proposes it into the
/// table's group as a restore (`regatta_server::restore`).
async fn install_snapshot(
    node: &Node,
    channel: &Channel,
    name: &str,
    group: GroupId,
    installs: &InstallLimits,
    state: &mut LagState,
    older: OlderCopy,
) -> Result<()> {
    state.install_started();
    state.report(node, group);
    let result = install_snapshot_once(node, channel, name, group, installs, state, older).await;
    state.install_ended(result.is_ok());
    state.report(node, group);
    result
}

/// One attempt of [`install_snapshot`].
async fn install_snapshot_once(
    node: &Node,
    channel: &Channel,
    name: &str,
    group: GroupId,
    installs: &InstallLimits,
    state: &mut LagState,
    older: OlderCopy,
) -> Result<()> {
    let _permit = installs
        .slots
        .acquire()
        .await
        .map_err(|_| Error::Protocol("the install limit was closed".into()))?;
    tracing::info!(table = %name, "installing the leader's snapshot");
    let started = Instant::now();
    let mut stream = open_snapshot_stream(node, channel, name).await?;
    let mut restore = match older {
        OlderCopy::Allowed => TableRestore::begin_reset(node, group).await?,
        OlderCopy::Refused => TableRestore::begin(node, group).await?,
    };
    let (reset_request, older) = match reset_to_carry_out(node, name, group, older).await {
        Ok(reset) => reset,
        Err(error) => {
            restore.abort().await;
            return Err(error);
        }
    };
    let received = receive_chunks(
        node,
        (name, group),
        &mut stream,
        &mut restore,
        installs,
        older,
    )
    .await;
    let received = match received {
        Ok(()) if older == OlderCopy::Refused => {
            refuse_older_copy(node, name, group, restore.index()).await
        }
        other => other,
    };
    if let Err(error) = received {
        restore.abort().await;
        return Err(error);
    }
    let summary = commit_install(node, name, group, restore, reset_request).await?;
    state.received += 1;
    state.update(summary.index, summary.index);
    state.report(node, group);
    tracing::info!(
        table = %name,
        leader_index = summary.index,
        keys = summary.keys,
        bytes = summary.bytes,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "installed the leader's snapshot"
    );
    Ok(())
}

/// Asks the leader cluster for a snapshot of the table.
async fn open_snapshot_stream(
    node: &Node,
    channel: &Channel,
    name: &str,
) -> Result<tonic::Streaming<proto::SnapshotChunk>> {
    let table_id = node.replica_source(name).await?.unwrap_or(0);
    let mut client = proto::snapshot_client::SnapshotClient::new(channel.clone())
        .max_decoding_message_size(LEADER_MESSAGE_BYTES_MAX);
    let stream = client
        .stream(proto::SnapshotRequest {
            table: name.as_bytes().to_vec(),
            table_id,
        })
        .await?
        .into_inner();
    Ok(stream)
}

/// Switches the table to the received copy (recording the reset it
/// carries out, if any), then clears that reset's record.
async fn commit_install(
    node: &Node,
    name: &str,
    group: GroupId,
    restore: TableRestore<'_>,
    reset_request: Option<u64>,
) -> Result<RestoreSummary> {
    let committed = match reset_request {
        Some(reset_id) => restore.commit_reset(reset_id).await,
        None => restore.commit().await,
    };
    let summary = committed.map_err(|error| Error::Protocol(format!("the snapshot: {error}")))?;
    node.count_snapshot_install(group);
    if let Some(restore_id) = reset_request {
        if let Err(error) = node.clear_reset_request(group, restore_id).await {
            // Left, it is found spent by the next install (the table
            // recorded the reset with the commit).
            tracing::warn!(table = %name, %error, "could not clear the carried-out reset's record");
        }
    }
    Ok(summary)
}

/// The operator's reset this install carries out, if any, and whether the
/// copy may be older than the table.
///
/// A reset that came just before this install began was replaced by it
/// (a table has one restore under way), and its record says to follow it
/// all the same; it is read after the install's begin, so that no reset
/// applied before it is missed. A record of a reset that an install
/// already carried out (a crash came between that install's commit and
/// the record's deletion, or the deletion failed) is spent: followed, it
/// would take the table back a second time. The begin was applied here,
/// so the table's reset carried includes every commit before it.
async fn reset_to_carry_out(
    node: &Node,
    name: &str,
    group: GroupId,
    older: OlderCopy,
) -> Result<(Option<u64>, OlderCopy)> {
    match node.table_reset_requested(group).await? {
        Some(restore_id) if restore_id == node.table_reset_carried(group) => {
            tracing::info!(table = %name, "deleting the record of a reset already carried out");
            if let Err(error) = node.clear_reset_request(group, restore_id).await {
                tracing::warn!(table = %name, %error, "could not delete a spent reset's record");
            }
            // No reset is live (one writes its record before its begin),
            // so a reset-marked restore this install began from (a
            // deposed puller's view) does not let it go back either.
            Ok((None, OlderCopy::Refused))
        }
        Some(restore_id) => Ok((Some(restore_id), OlderCopy::Allowed)),
        None => Ok((None, older)),
    }
}

/// Pushes the snapshot's chunks into `restore` at the install pace, until
/// the last; an older copy than the table's is refused from its first
/// chunk on, unless `older` allows it.
async fn receive_chunks(
    node: &Node,
    (name, group): (&str, GroupId),
    stream: &mut tonic::Streaming<proto::SnapshotChunk>,
    restore: &mut TableRestore<'_>,
    installs: &InstallLimits,
    older: OlderCopy,
) -> Result<()> {
    let mut reported_bytes = 0u64;
    let mut checked_index = None;
    while let Some(chunk) = stream.message().await? {
        restore
            .push(Chunk {
                data: &chunk.data,
                len: chunk.len,
                index: chunk.index,
                crc32c: chunk.crc32c,
                offset: chunk.offset,
                last: chunk.last,
            })
            .await
            .map_err(|error| Error::Protocol(format!("a bad snapshot: {error}")))?;
        if checked_index.is_none() && older == OlderCopy::Refused {
            // Checked once the first chunk names the copy's revision,
            // before the rest is streamed, and again before the commit.
            checked_index = restore.index();
            refuse_older_copy(node, name, group, restore.index()).await?;
        }
        installs.pace.take(chunk.data.len() as u64).await;
        let received = restore.received_bytes();
        if received - reported_bytes >= 64 << 20 {
            reported_bytes = received;
            tracing::info!(table = %name, mib = received >> 20, "installing the leader's snapshot");
        }
        if chunk.last {
            break;
        }
    }
    Ok(())
}

/// Fails with `LeaderBehind` when the copy being installed, at revision
/// `index`, is older than what table `name` has applied: the serving node
/// is behind this follower (or another puller applied more meanwhile), and
/// installing it would move the table's revision back.
async fn refuse_older_copy(
    node: &Node,
    name: &str,
    group: GroupId,
    index: Option<u64>,
) -> Result<()> {
    let Some(index) = index else {
        return Ok(());
    };
    let applied = node.table_revision(group, true).await?;
    if index < applied {
        return Err(Error::LeaderBehind(format!(
            "the serving node's snapshot of table {name:?} is at index {index}, behind this \
             follower's {applied}; it is not installed (the table's revision never moves \
             back); the follower tries the leader cluster's other nodes and waits for one to \
             catch up, or for an operator to reset this table"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Installs share the node's rate: 4 MiB taken by two installs at
    /// 1 MiB/s end no sooner than 3 s after the first chunk (which is not
    /// delayed); with no limit, nothing waits.
    #[tokio::test(start_paused = true)]
    async fn snapshot_bytes_are_paced_across_installs() {
        let pace = Arc::new(Pace::new(1 << 20));
        let started = tokio::time::Instant::now();
        let mut installs = Vec::new();
        for _ in 0..2 {
            let pace = Arc::clone(&pace);
            installs.push(tokio::spawn(async move {
                pace.take(1 << 20).await;
                pace.take(1 << 20).await;
            }));
        }
        for install in installs {
            install.await.expect("install");
        }
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(3) && elapsed < Duration::from_secs(4),
            "{elapsed:?}"
        );
        let unlimited = Pace::new(0);
        let started = tokio::time::Instant::now();
        unlimited.take(1 << 30).await;
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
