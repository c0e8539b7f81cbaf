//! [`NodeHost`]: runs many Raft groups on one node. Groups are spread over
//! a few *workers* (tokio tasks); a worker owns its groups' `RaftNode`s and
//! handles every group that has work in one wake-up, so the cost of a
//! wake-up, a WAL submission and a tick is shared by every busy group. An
//! apply thread per worker owns its groups' state machines, so applying
//! never blocks Raft.
//!
//! A worker's turn: handle every queued input (peer messages, proposals,
//! reads, ticks, persistence and apply completions), then take the `Ready`
//! of every group touched:
//! 1. `messages` go to the transport at once: a leader's appends leave
//!    before its own fsync (pipelining);
//! 2. every group's snapshot, entries and hard state go into **one**
//!    `WriteBatch` for the whole turn; its completion comes back as one
//!    control message, and only then are each group's `persisted_messages`
//!    sent;
//! 3. committed entries go to each group's apply thread, which resolves
//!    proposals with the state machine's result and serves reads once
//!    their index is applied.
//!
//! Not built yet (see `docs/multiraft.md`): snapshot streaming, automatic
//! compaction, forwarding of proposals from followers with request ids.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use regatta_raft::{
    CommitBroadcast, ConfChange, Config, Entry, EntryPayload, LogIndex, Message, MessageBody,
    NodeId, Proposed, RaftNode, ReadId, ReadState, Refusal, RequestId, Role, SnapshotMeta,
    SoftState, Status, Term,
};
use regatta_wal::{GroupId, SnapshotStore, Wal, WriteBatch};
use rustc_hash::FxHashMap;
use tokio::sync::{mpsc, oneshot};

use crate::applied::{AppliedPublisher, AppliedSink, AppliedWatch};
use crate::error::{Error, UnsentCause};
use crate::session::{Outcome, SessionTable, Verdict};
use crate::snapshot::{SnapshotData, SnapshotDir, SnapshotSource};
use crate::storage::GroupStorage;
use crate::transport::Transport;

/// An application state machine, one per group.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command; returns its result for the proposer.
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes;
    /// Applies consecutive committed commands, in index order, and returns
    /// exactly one result per command. The host calls this with everything
    /// committed since its last call (membership entries and no-ops split
    /// a batch). The default applies them one by one; a state machine with
    /// its own storage overrides it to write the whole batch at once,
    /// together with the last index.
    ///
    /// An error (the state machine's storage failed) stops the group on
    /// this node (`GroupStopped`): nothing after it is applied or
    /// acknowledged.
    fn apply_batch(&mut self, commands: &[(LogIndex, Bytes)]) -> std::io::Result<Vec<Bytes>> {
        Ok(commands
            .iter()
            .map(|(index, command)| self.apply(*index, command))
            .collect())
    }
    /// Entries without a command for the state machine (no-ops,
    /// membership changes, retried requests not applied again) were
    /// applied up to `index`, after every command before it. A state
    /// machine that stores its applied index may record `index`, so that
    /// its index (and a snapshot's) is the group's applied index, not its
    /// last command's. Like `apply`, it needs no fsync. The default does
    /// nothing.
    fn skip_to(&mut self, index: LogIndex) -> std::io::Result<()> {
        let _ = index;
        Ok(())
    }
    /// Serves a read from the local state, on the apply thread.
    fn read(&self, query: &Bytes) -> Bytes;
    /// A handle that serves reads on the caller's task, concurrently with
    /// the apply thread, or `None` (the default) to serve every read on the
    /// apply thread through `read`. Taken once, when the group starts.
    fn reader(&self) -> Option<Arc<dyn StateReader>> {
        None
    }
    /// Makes everything applied so far durable. The host calls it before
    /// each compaction, since the entries the compaction drops can no
    /// longer be applied again; applies in between need no fsync of their
    /// own (the WAL holds them). The default does nothing, for state
    /// machines whose `apply` is already durable.
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    /// The highest index applied, stored atomically with the data, so that
    /// a restart does not apply an entry twice. After a restart it must be
    /// at least the index of the last `sync`.
    fn applied_index(&self) -> LogIndex;
    /// A point-in-time copy of the whole state as of `applied_index()`, for
    /// a follower that needs compacted entries. It is taken on the apply
    /// task, so it should be cheap (a storage engine's snapshot); the host
    /// writes it out on another thread while applies go on.
    fn snapshot(&self) -> Box<dyn SnapshotSource>;
    /// Replaces the whole state with a snapshot taken at `index`, read from
    /// `data` to its end. Unlike `apply`, it must be durable when it
    /// returns: the log before `index` is gone.
    /// An error stops the group on this node (`GroupStopped`).
    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()>;
}

/// Serves reads of one group's state from any task while the apply thread
/// goes on (`StateMachine::reader`).
///
/// Contract: once the state machine's `apply_batch` or `restore` has
/// returned, a `read` sees that state or a later one; and each `read`
/// answers from one consistent state (never half of an applied batch).
/// The host relies on the first half for linearizable reads: it waits
/// until the group's applied index reaches the read index, then reads.
pub trait StateReader: Send + Sync + 'static {
    /// Serves a read from the state as of now.
    fn read(&self, query: &Bytes) -> Bytes;
}

/// Configuration of a host. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// This node.
    pub node_id: NodeId,
    /// Where the host keeps its own files: each group's session table,
    /// under `sessions/`. Must survive restarts like the WAL.
    pub state_dir: PathBuf,
    /// A client whose last request is this many entries below the applied
    /// index is forgotten, and a retry of it would be applied again.
    /// Default 1,000,000 entries.
    pub session_expiry_entries: u64,
    /// Wall-clock length of one Raft tick. Default 10 ms.
    pub tick_interval: Duration,
    /// Requests queued per worker before callers get `Busy`. Default 4096.
    pub group_inbox_max: usize,
    /// Worker tasks the groups are spread over. Default
    /// [`default_workers`]: half the machine's cores, at least 1.
    pub workers: usize,
    /// How long a proposal, read or membership change may wait for its
    /// answer before failing with `Timeout`; a partitioned node would
    /// otherwise keep callers waiting. Default 10 s.
    pub request_timeout: Duration,
    /// Take a snapshot and compact the log every this many applied
    /// entries; 0 never compacts. Default 10,000.
    pub snapshot_every_entries: u64,
    /// Entries kept below a compaction, for followers slightly behind.
    /// Default 1,000.
    pub compaction_overhead_entries: u64,
    /// A group with no activity (proposals, reads, log growth, messages
    /// other than heartbeats) for this many ticks stops ticking until
    /// something arrives; 0 never quiesces. Default 200 (2 s at 10 ms).
    pub quiesce_after_ticks: u64,
    /// With `raft.commit_broadcast` set to `CommitBroadcast::Deferred` (the
    /// default), how long after a leader's commit index moves the worker
    /// sends it to followers that have not had it on an append yet. In a
    /// busy group the next append carries it first, and no message goes
    /// out for the commit alone; an idle group's followers learn it this
    /// much later. Default 1 ms.
    pub commit_broadcast_delay: Duration,
    /// The Raft settings every group starts from (id, applied index and
    /// initial voters are filled in per group).
    pub raft: Config,
}

impl HostConfig {
    /// Defaults for node `node_id`, keeping its files in `state_dir`.
    pub fn new(node_id: NodeId, state_dir: impl Into<PathBuf>) -> HostConfig {
        HostConfig {
            node_id,
            state_dir: state_dir.into(),
            session_expiry_entries: 1_000_000,
            tick_interval: Duration::from_millis(10),
            group_inbox_max: 4096,
            workers: default_workers(),
            request_timeout: Duration::from_secs(10),
            snapshot_every_entries: 10_000,
            compaction_overhead_entries: 1_000,
            quiesce_after_ticks: 200,
            commit_broadcast_delay: Duration::from_millis(1),
            raft: Config {
                commit_broadcast: CommitBroadcast::Deferred,
                ..Config::new(node_id)
            },
        }
    }

    /// Checks the settings a host cannot run with (the Raft settings are
    /// checked per group, by `regatta-raft`).
    pub fn validate(&self) -> Result<(), Error> {
        if self.workers == 0 || self.workers > WORKERS_MAX {
            return Err(Error::Config(format!(
                "workers is {}: give 1 to {WORKERS_MAX}",
                self.workers
            )));
        }
        if self.group_inbox_max == 0 {
            return Err(Error::Config(
                "group_inbox_max is 0: a worker needs room for one request at least".into(),
            ));
        }
        if self.tick_interval.is_zero() {
            return Err(Error::Config(
                "tick_interval is 0: give a tick of at least 1 ms".into(),
            ));
        }
        Ok(())
    }
}

/// Workers a host runs by default: half the cores this process may use
/// (at least 1, at most [`WORKERS_DEFAULT_MAX`]). Each worker is a task
/// that steps, persists and sends for its groups, with an apply thread of
/// its own; the other half of the cores is left to the API, the WAL
/// writer and the apply threads. Fewer workers also make bigger batches:
/// each turn of a worker hands every group's messages to a peer in one
/// frame and every group's writes to the WAL in one batch. On two cores
/// and 64 busy groups, one worker per node does 15–25% more proposals per
/// second than two (`BENCHMARKS.md`, session 40).
pub fn default_workers() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |cores| cores.get());
    (cores / 2).clamp(1, WORKERS_DEFAULT_MAX)
}

/// The most workers [`default_workers`] picks, however many cores.
pub const WORKERS_DEFAULT_MAX: usize = 16;

/// The most workers a host runs (each has an apply thread).
pub const WORKERS_MAX: usize = 256;

type Reply = oneshot::Sender<Result<Bytes, Error>>;
/// Answers an apply thread collected during one wake-up, for its worker's
/// answer task to send.
type Answers = Vec<(Reply, Result<Bytes, Error>)>;
type IndexReply = oneshot::Sender<Result<LogIndex, Error>>;

/// A linearizable read waiting for its ReadIndex round.
enum PendingRead {
    /// Served on the apply thread once the index is applied.
    Query(Bytes, Reply),
    /// The caller waits for the index to be applied and reads itself.
    Index(IndexReply),
}

impl PendingRead {
    /// Its caller stopped waiting.
    fn is_abandoned(&self) -> bool {
        match self {
            PendingRead::Query(_, reply) => reply.is_closed(),
            PendingRead::Index(reply) => reply.is_closed(),
        }
    }

    fn fail(self, error: Error) {
        match self {
            PendingRead::Query(_, reply) => {
                let _ = reply.send(Err(error));
            }
            PendingRead::Index(reply) => {
                let _ = reply.send(Err(error));
            }
        }
    }
}

/// A caller waiting for a proposal forwarded to `peer` to be applied here.
struct Waiter {
    peer: NodeId,
    reply: Reply,
}

/// Requests from clients and peers, bounded by `group_inbox_max`.
enum Input {
    Message(Message),
    Propose {
        command: Bytes,
        reply: Reply,
    },
    ProposeWithId {
        id: RequestId,
        command: Bytes,
        reply: Reply,
    },
    /// A linearizable read: its ReadIndex round, then what `PendingRead`
    /// says.
    Read(PendingRead),
    Status {
        reply: oneshot::Sender<Status>,
    },
    Campaign,
    ConfChange {
        change: ConfChange,
        reply: Reply,
    },
    TransferLeader {
        target: NodeId,
        reply: Reply,
    },
    StepDown {
        reply: Reply,
    },
    ForceRemove {
        node: NodeId,
        reply: Reply,
    },
    StaleRead {
        query: Bytes,
        reply: Reply,
    },
    /// A snapshot message from the leader with the state it stands for.
    Snapshot {
        message: Message,
        data: SnapshotData,
    },
    /// The transport finished (or failed) sending a snapshot to `to`.
    SnapshotReport {
        to: NodeId,
        delivered: bool,
    },
}

/// Completions from the WAL and the apply threads, to a worker; unbounded,
/// because losing one would stall a group.
enum Control {
    /// One WAL batch, holding these groups' readies, is durable (or not).
    Persisted {
        readies: Vec<(GroupId, u64)>,
        /// Groups whose removal this batch recorded, with their callers.
        removed: Vec<Removal>,
        result: Result<(), regatta_wal::Error>,
    },
    /// Groups' applied indexes and the outcomes of their applied entries,
    /// one hand-over per wake-up of the apply thread.
    Applied(Vec<GroupApplied>),
    /// The apply thread saved the group's session table as of `index` (or
    /// failed to); a compaction may now drop entries up to there.
    SessionsSaved {
        group: GroupId,
        incarnation: u64,
        index: LogIndex,
        result: Result<(), Error>,
    },
    /// The apply thread cannot go on with the group (a snapshot it could not
    /// install); the group stops.
    Failed {
        group: GroupId,
        incarnation: u64,
        reason: String,
    },
    /// The transport finished sending a snapshot to `to` (or failed). On
    /// this unbounded channel, not the group's inbox: a lost report would
    /// leave Raft waiting for that follower's snapshot.
    SnapshotReport {
        group: GroupId,
        to: NodeId,
        delivered: bool,
    },
    /// Requests the group forwarded to `peer` that the transport did not
    /// send (or may not have): their callers are answered at once.
    Unsent {
        group: GroupId,
        peer: NodeId,
        proposals: Vec<RequestId>,
        reads: Vec<ReadId>,
        cause: UnsentCause,
    },
    /// Proposals and reads forwarded to this node that it dropped on
    /// arrival (the worker's inbox was full), by group and forwarding
    /// node: those nodes are told, so that their callers retry now rather
    /// than at their timeout.
    RefuseForwarded {
        refusals: Vec<ForwardedRefusal>,
        reason: String,
    },
    /// The apply thread copied the state at `index` for an outgoing snapshot
    /// (or failed to write it out).
    SnapshotReady {
        group: GroupId,
        incarnation: u64,
        message: Message,
        index: LogIndex,
        data: Result<SnapshotData, String>,
    },
}

/// Where a group run numbers its reads: a random point below 2^63, so
/// that an answer to a read of an earlier run (or process) of this group
/// that arrives late is not taken for the answer to a new read with the
/// same id, which would serve the new read at an older index.
fn first_read_id() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default(),
    );
    (hasher.finish() >> 1).max(1)
}

/// The requests a forwarded message carries that a caller waits for: the
/// request ids of a `Propose`'s session payloads, or a `ReadIndex`'s
/// reads; `None` for any other message.
fn forwarded_ids(body: &MessageBody) -> Option<(Vec<RequestId>, Vec<ReadId>)> {
    match body {
        MessageBody::Propose { payloads } => Some((session_ids(payloads), Vec::new())),
        MessageBody::ReadIndex { ids } => Some((Vec::new(), ids.clone())),
        _ => None,
    }
}

/// Requests of one group that one node forwarded here and that were
/// dropped on arrival.
struct ForwardedRefusal {
    group: GroupId,
    from: NodeId,
    proposals: Vec<RequestId>,
    reads: Vec<ReadId>,
}

/// How far a group has applied, with the outcomes since the last report.
struct GroupApplied {
    group: GroupId,
    /// The run of the group the report is about (`Group::incarnation`).
    incarnation: u64,
    index: LogIndex,
    results: Vec<AppliedResult>,
}

/// The outcome of one applied entry, for whoever proposed it.
struct AppliedResult {
    index: LogIndex,
    term: Term,
    /// The request id of a session command.
    id: Option<RequestId>,
    result: Result<Bytes, Error>,
}

/// A group being removed, and who waits for its removal to be durable.
type Removal = (GroupId, oneshot::Sender<Result<(), Error>>);

/// What a worker receives from the host.
enum WorkerInput {
    Group(GroupId, Input),
    /// Peers' messages for this worker's groups, from one frame.
    Messages(Vec<(GroupId, Message)>),
    Start(GroupId, Box<Group>),
    Remove(Removal),
    WakeAll,
}

/// Work for a worker's apply thread, which owns its groups' state machines.
enum ApplyWork {
    /// A group's state machine, its session table and where to publish
    /// its applied index.
    Register(
        GroupId,
        u64,
        Box<dyn StateMachine>,
        SessionTable,
        AppliedSink,
    ),
    /// Save the group's session table before a compaction.
    SaveSessions(GroupId),
    /// Drop the group's state machine; its waiting reads fail with
    /// `GroupStopped` and this reason.
    Unregister { group: GroupId, reason: String },
    /// Committed entries to apply, with this node's proposers of their
    /// commands (by index, ascending): each is answered once its entry is
    /// applied and the applied index published, without a hop back
    /// through the worker.
    Entries(GroupId, Vec<Entry>, Vec<(LogIndex, Reply)>),
    Read {
        group: GroupId,
        index: LogIndex,
        query: Bytes,
        reply: Reply,
    },
    /// Copy the state for this outgoing snapshot message.
    TakeSnapshot { group: GroupId, message: Message },
    /// Replace the state with a snapshot received from the leader.
    Restore {
        group: GroupId,
        meta: SnapshotMeta,
        data: SnapshotData,
    },
    /// A restore ran on a blocking thread (so that the apply thread's
    /// other groups went on): the group's applier comes back, with the
    /// outcome, and its work queued meanwhile follows.
    Restored {
        group: GroupId,
        applier: Box<Applier>,
        meta: SnapshotMeta,
        took: Duration,
        result: Result<(), String>,
    },
}

impl ApplyWork {
    /// The group it is for, and what it is, for the slow-apply warning.
    fn describe(&self) -> (GroupId, &'static str) {
        match self {
            ApplyWork::Register(group, ..) => (*group, "registering"),
            ApplyWork::SaveSessions(group) => (*group, "saving the session table"),
            ApplyWork::Unregister { group, .. } => (*group, "unregistering"),
            ApplyWork::Entries(group, ..) => (*group, "applying committed entries"),
            ApplyWork::Read { group, .. } => (*group, "reading"),
            ApplyWork::TakeSnapshot { group, .. } => (*group, "copying the state for a snapshot"),
            ApplyWork::Restore { group, .. } => (*group, "starting a snapshot install"),
            ApplyWork::Restored { group, .. } => (*group, "finishing a snapshot install"),
        }
    }
}

/// One piece of apply work that takes this long is logged as a warning:
/// every later apply of the worker's groups waited for it, so the
/// state machine's storage may be stalled or overloaded. (A snapshot
/// install runs on a blocking thread, holding up its own group only.)
const SLOW_APPLY_WARNING: Duration = Duration::from_secs(1);

type WorkerChannels = (
    mpsc::Sender<WorkerInput>,
    mpsc::UnboundedSender<Control>,
    ApplyOutbox,
);

/// A worker's way to its apply thread. The worker's groups queue their
/// work here during a turn, and the worker hands the whole turn's work
/// over in one send at its end: one wake-up of the apply thread per turn
/// instead of one per group with committed entries (with 64 busy groups,
/// the apply threads were switched in once per proposal).
#[derive(Clone)]
struct ApplyOutbox {
    queued: Arc<Mutex<Vec<ApplyWork>>>,
    sender: mpsc::UnboundedSender<Vec<ApplyWork>>,
}

impl ApplyOutbox {
    fn new(sender: mpsc::UnboundedSender<Vec<ApplyWork>>) -> ApplyOutbox {
        ApplyOutbox {
            queued: Arc::default(),
            sender,
        }
    }

    /// Queues `work` behind everything queued before; it leaves at the
    /// worker's next `flush`.
    fn send(&self, work: ApplyWork) {
        self.queued
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(work);
    }

    /// Hands everything queued to the apply thread, in order. Fails once
    /// the apply thread has exited.
    fn flush(&self) -> Result<(), ()> {
        let mut queued = self.queued.lock().unwrap_or_else(|p| p.into_inner());
        if queued.is_empty() {
            return Ok(());
        }
        self.sender
            .send(std::mem::take(&mut *queued))
            .map_err(|_| ())
    }

    /// Queues `work` and hands it over at once, for a caller outside the
    /// worker's turn.
    fn send_now(&self, work: ApplyWork) -> Result<(), ()> {
        self.send(work);
        self.flush()
    }
}

struct HostInner {
    config: HostConfig,
    /// The last group incarnation handed out (`Group::incarnation`).
    next_incarnation: std::sync::atomic::AtomicU64,
    /// Groups not ticking now, across the workers.
    quiesced_groups: Arc<std::sync::atomic::AtomicU64>,
    wal: Arc<Wal>,
    /// Each group's session table, saved at compactions.
    sessions: SnapshotStore,
    /// Transient files of snapshots being sent and received.
    snapshots: SnapshotDir,
    /// Each worker's inbox and control channel; emptied by `stop`.
    workers: RwLock<Vec<WorkerChannels>>,
    worker_tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    /// Which worker runs each group.
    groups: RwLock<FxHashMap<GroupId, usize>>,
    /// Each group's applied index as the worker learns it, and its state
    /// machine's reader.
    applied: RwLock<FxHashMap<GroupId, GroupView>>,
    /// Why each group that stopped on its own (a storage or state machine
    /// failure) did, until it is removed: every later request names it.
    stop_reasons: StopReasons,
}

/// Why groups stopped, shared by the host and its workers.
type StopReasons = Arc<Mutex<FxHashMap<GroupId, String>>>;

/// What a caller's task needs to read a group without its worker.
#[derive(Clone)]
struct GroupView {
    /// Closed once the group stops on this node.
    applied: AppliedWatch,
    reader: Option<Arc<dyn StateReader>>,
}

/// Runs the Raft groups of one node.
#[derive(Clone)]
pub struct NodeHost {
    inner: Arc<HostInner>,
}

/// A reference to a host that does not keep it alive: what a transport
/// holds, since the host holds the transport.
#[derive(Clone)]
pub struct WeakNodeHost {
    inner: std::sync::Weak<HostInner>,
}

/// What every worker of a host shares.
struct WorkerShared<'a> {
    wal: &'a Arc<Wal>,
    transport: &'a Arc<dyn Transport>,
    sessions: &'a SnapshotStore,
    snapshots: &'a SnapshotDir,
    quiesced_groups: &'a Arc<std::sync::atomic::AtomicU64>,
    stop_reasons: &'a StopReasons,
}

/// Starts a worker on `runtime`, with its apply thread and the task that
/// sends that thread's answers (pushed to `tasks`); gives the worker's
/// inbox, control channel and apply outbox.
fn spawn_worker(
    config: &HostConfig,
    shared: &WorkerShared<'_>,
    runtime: &tokio::runtime::Handle,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
) -> Result<WorkerChannels, Error> {
    let (inbox_sender, inbox) = mpsc::channel(config.group_inbox_max);
    let (control_sender, control) = mpsc::unbounded_channel();
    let (apply_sender, apply_inbox) = mpsc::unbounded_channel();
    let apply_back = apply_sender.downgrade();
    let apply = ApplyOutbox::new(apply_sender);
    let (answer_sender, mut answer_inbox) = mpsc::unbounded_channel::<Answers>();
    let context = ApplyContext {
        control: control_sender.clone(),
        sessions: shared.sessions.clone(),
        snapshots: shared.snapshots.clone(),
        session_expiry_entries: config.session_expiry_entries,
        runtime: runtime.clone(),
        answers: answer_sender,
        work: apply_back,
    };
    // The state machine's storage may block (an engine's write stall, a
    // large restore): on a thread of its own, that never holds up the
    // runtime's threads, which run Raft and the API.
    std::thread::Builder::new()
        .name("regatta-apply".into())
        .spawn(move || apply_loop(apply_inbox, context))
        .map_err(|error| Error::State(format!("start an apply thread: {error}")))?;
    // Waking a task from outside the runtime is dearer than from inside
    // it, so the apply thread hands each wake-up's answers over at once,
    // and this task, inside, wakes their callers. It ends when the apply
    // thread does.
    tasks.push(runtime.spawn(async move {
        while let Some(answers) = answer_inbox.recv().await {
            for (reply, answer) in answers {
                let _ = reply.send(answer);
            }
        }
    }));
    let worker = Worker {
        node_id: config.node_id,
        groups: FxHashMap::default(),
        commit_due: Vec::new(),
        active: BTreeSet::new(),
        wal: Arc::clone(shared.wal),
        transport: Arc::clone(shared.transport),
        control_sender: control_sender.clone(),
        quiesced_groups: Arc::clone(shared.quiesced_groups),
        quiesced_published: 0,
        removing: Vec::new(),
        sessions: shared.sessions.clone(),
        snapshots: shared.snapshots.clone(),
        apply: apply.clone(),
        stop_reasons: Arc::clone(shared.stop_reasons),
    };
    tasks.push(runtime.spawn(worker.run(
        inbox,
        control,
        config.tick_interval,
        config.commit_broadcast_delay,
    )));
    Ok((inbox_sender, control_sender, apply))
}

impl WeakNodeHost {
    /// The host, if it still exists.
    pub fn upgrade(&self) -> Option<NodeHost> {
        self.inner.upgrade().map(|inner| NodeHost { inner })
    }
}

impl NodeHost {
    /// A host persisting to `wal` and talking through `transport`; its
    /// tasks run on `runtime`. Fails when `state_dir` cannot be opened.
    pub fn new(
        config: HostConfig,
        wal: Arc<Wal>,
        transport: Arc<dyn Transport>,
        runtime: tokio::runtime::Handle,
    ) -> Result<NodeHost, Error> {
        config.validate()?;
        let stop_reasons = StopReasons::default();
        let sessions = SnapshotStore::open(config.state_dir.join("sessions"), 1)
            .map_err(|error| Error::State(format!("open the session tables: {error}")))?;
        let snapshots_path = config.state_dir.join("snapshots");
        let snapshots = SnapshotDir::open(&snapshots_path)
            .map_err(|error| Error::State(format!("open {}: {error}", snapshots_path.display())))?;
        let quiesced_groups: Arc<std::sync::atomic::AtomicU64> = Arc::default();
        let mut workers = Vec::new();
        let mut tasks = Vec::new();
        let shared = WorkerShared {
            wal: &wal,
            transport: &transport,
            sessions: &sessions,
            snapshots: &snapshots,
            quiesced_groups: &quiesced_groups,
            stop_reasons: &stop_reasons,
        };
        for _ in 0..config.workers {
            workers.push(spawn_worker(&config, &shared, &runtime, &mut tasks)?);
        }
        Ok(NodeHost {
            inner: Arc::new(HostInner {
                next_incarnation: std::sync::atomic::AtomicU64::new(0),
                config,
                quiesced_groups,
                wal,
                sessions,
                snapshots,
                workers: RwLock::new(workers),
                worker_tasks: Mutex::new(tasks),
                groups: RwLock::new(FxHashMap::default()),
                applied: RwLock::new(FxHashMap::default()),
                stop_reasons,
            }),
        })
    }

    /// A reference that does not keep the host alive.
    pub fn downgrade(&self) -> WeakNodeHost {
        WeakNodeHost {
            inner: Arc::downgrade(&self.inner),
        }
    }

    /// This node.
    pub fn node_id(&self) -> NodeId {
        self.inner.config.node_id
    }

    /// Starts hosting a group. `initial_voters` bootstraps a new group when
    /// the WAL has nothing of it; leave it empty to join an existing group.
    pub fn start_group(
        &self,
        group: GroupId,
        initial_voters: Vec<NodeId>,
        state_machine: Box<dyn StateMachine>,
    ) -> Result<(), Error> {
        let mut groups = self.inner.groups.write().unwrap_or_else(|p| p.into_inner());
        if groups.contains_key(&group) {
            return Err(Error::GroupExists(group));
        }
        let mut state_machine = state_machine;
        let (raft, sessions, initially_applied) =
            self.open_group(group, initial_voters, state_machine.as_mut())?;
        let reader = state_machine.reader();
        let worker_index = self.worker_of(group);
        let (inbox, apply) = {
            let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
            match workers.get(worker_index) {
                Some((inbox, _, apply)) => (inbox.clone(), apply.clone()),
                None => return Err(self.stopped(group)),
            }
        };
        let (applied_sender, applied_receiver) = AppliedPublisher::new(initially_applied);
        let apply_outbox = apply.clone();
        // Reports of an earlier run of this id (removed while its apply
        // thread lagged) must not reach this one.
        let incarnation = self
            .inner
            .next_incarnation
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1;
        apply
            .send_now(ApplyWork::Register(
                group,
                incarnation,
                state_machine,
                sessions,
                applied_sender.sink(),
            ))
            .map_err(|_| self.stopped(group))?;
        let state = Group::new(
            (group, incarnation),
            raft,
            apply,
            applied_sender,
            &self.inner.config,
            self.inner.snapshots.clone(),
        );
        inbox
            .try_send(WorkerInput::Start(group, Box::new(state)))
            .map_err(|_| {
                // The apply thread registered the state machine: drop it
                // there again, or it would stay without its group.
                let _ = apply_outbox.send_now(ApplyWork::Unregister {
                    group,
                    reason: format!("group {} did not start: its worker was busy", group.0),
                });
                Error::Busy(group)
            })?;
        groups.insert(group, worker_index);
        self.inner
            .applied
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                group,
                GroupView {
                    applied: applied_receiver,
                    reader,
                },
            );
        Ok(())
    }

    /// A group's Raft node as the WAL and the state machine left it (an
    /// install a crash interrupted is finished first), its session table,
    /// and the index the state machine has applied.
    fn open_group(
        &self,
        group: GroupId,
        initial_voters: Vec<NodeId>,
        state_machine: &mut dyn StateMachine,
    ) -> Result<(RaftNode<GroupStorage>, SessionTable, LogIndex), Error> {
        let mut config = self.inner.config.raft.clone();
        config.id = self.inner.config.node_id;
        config.applied = self.finish_install(group, state_machine)?;
        config.initial_voters = initial_voters;
        config.seed ^= group.0.rotate_left(17);
        let sessions = load_sessions(
            &self.inner.sessions,
            &self.inner.wal,
            group,
            config.applied,
            self.inner.config.session_expiry_entries,
        )?;
        let applied = config.applied;
        let storage = GroupStorage::new(Arc::clone(&self.inner.wal), group);
        let raft =
            RaftNode::new(config, storage).map_err(|source| Error::Raft { group, source })?;
        Ok((raft, sessions, applied))
    }

    /// Brings the state machine to the snapshot the WAL installed, when a
    /// crash came between the WAL recording the install and the state
    /// machine restoring it: the log then starts past the state machine,
    /// and only the kept copy of the snapshot bridges the gap. Deletes the
    /// copies no longer needed. Gives the state machine's applied index.
    fn finish_install(
        &self,
        group: GroupId,
        state_machine: &mut dyn StateMachine,
    ) -> Result<LogIndex, Error> {
        let wal = &self.inner.wal;
        let snapshots = &self.inner.snapshots;
        let failed = |what: String| Error::State(format!("group {}: {what}", group.0));
        let applied = state_machine.applied_index();
        let installed = wal.snapshot(group);
        let gap = applied.next() < wal.first_index(group);
        let needed = installed
            .as_ref()
            .filter(|meta| gap && meta.index > applied);
        let Some(meta) = needed else {
            let removed = snapshots
                .remove_installs(group.0, u64::MAX, None)
                .map_err(|error| failed(format!("delete stale snapshot copies: {error}")))?;
            if removed > 0 {
                tracing::info!(
                    group = group.0,
                    copies = removed,
                    "{INSTALL_CUT_BEFORE_WAL}; the leader sends the snapshot again"
                );
            }
            return Ok(applied);
        };
        let Some(data) = snapshots
            .kept_install(group.0, meta.index.0)
            .map_err(|error| failed(format!("look for the installed snapshot's copy: {error}")))?
        else {
            return Err(failed(format!(
                "the state machine is at index {} but the log starts after the snapshot at {}, \
                 and no copy of that snapshot is kept; this replica cannot recover by itself: \
                 remove it from the group and add it again with empty storage",
                applied.0, meta.index.0
            )));
        };
        let (mut sessions, mut state) = read_snapshot(&data).map_err(failed)?;
        // The session table first: once the state machine holds the
        // snapshot, the copy (and the table inside it) may go.
        sessions.advance(meta.index);
        save_sessions(&self.inner.sessions, group, &sessions)
            .map_err(|error| failed(format!("save the session table: {error}")))?;
        state_machine
            .restore(meta.index, &mut state)
            .map_err(|error| failed(format!("restore the installed snapshot: {error}")))?;
        drop(data);
        snapshots
            .remove_installs(group.0, u64::MAX, None)
            .map_err(|error| failed(format!("delete the installed snapshot's copy: {error}")))?;
        tracing::info!(
            group = group.0,
            index = meta.index.0,
            "{INSTALL_CUT_AFTER_WAL}"
        );
        Ok(meta.index)
    }

    /// A [`SessionFilter`] for `group`'s entries after `after`: the session
    /// table as of `after`, rebuilt from the last saved table and the log.
    /// `Compacted` when the saved table is already past `after` (the log
    /// before it no longer tells which requests were applied).
    pub fn session_filter(&self, group: GroupId, after: LogIndex) -> Result<SessionFilter, Error> {
        let saved = saved_sessions(&self.inner.sessions, group)?;
        if let Some(table) = saved.as_ref().filter(|table| table.index() > after) {
            return Err(Error::Compacted {
                group,
                compacted_to: table.index(),
            });
        }
        let table = rebuild_sessions(
            saved,
            &self.inner.wal,
            group,
            after,
            self.inner.config.session_expiry_entries,
        )?;
        if table.index() > after {
            // The log starts past `after` (an installed snapshot).
            return Err(Error::Compacted {
                group,
                compacted_to: table.index(),
            });
        }
        Ok(SessionFilter {
            table,
            expiry_entries: self.inner.config.session_expiry_entries,
        })
    }

    /// Follows the group's applied index on this node: waiters see every
    /// advance (the latest value; intermediate ones may be skipped). It
    /// stops when the group stops here.
    pub fn applied_index_watch(&self, group: GroupId) -> Result<AppliedWatch, Error> {
        Ok(self.group_view(group)?.applied)
    }

    fn group_view(&self, group: GroupId) -> Result<GroupView, Error> {
        self.inner
            .applied
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
            .ok_or(Error::UnknownGroup(group))
    }

    /// Committed entries of the group's log in `[low, high)`, read from the
    /// WAL (never through the group's worker), within `size_bytes_max`
    /// but at least one. Entries at or below the group's applied index are
    /// committed; the caller must not ask beyond it.
    pub fn log_entries(
        &self,
        group: GroupId,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<regatta_raft::Entry>, Error> {
        self.inner
            .wal
            .entries(group, low, high, size_bytes_max)
            .map_err(|error| match error {
                regatta_wal::Error::Compacted { compacted_to, .. } => Error::Compacted {
                    group,
                    compacted_to,
                },
                other => Error::Storage {
                    group,
                    reason: other.to_string(),
                },
            })
    }

    fn enqueue(&self, group: GroupId, input: Input) -> Result<(), Error> {
        let worker = {
            let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
            *groups.get(&group).ok_or(Error::UnknownGroup(group))?
        };
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        let (inbox, _, _) = workers.get(worker).ok_or_else(|| self.stopped(group))?;
        inbox
            .try_send(WorkerInput::Group(group, input))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Error::Busy(group),
                mpsc::error::TrySendError::Closed(_) => self.stopped(group),
            })
    }

    /// Hands peers' messages to their groups, one inbox item per worker;
    /// a message for an unknown group, or for a worker whose inbox is
    /// full, is dropped (and left to Raft's retransmission), except that
    /// the senders of dropped forwarded proposals and reads are answered
    /// (`ProposeRefused` and `ReadRefused`, overloaded).
    pub fn deliver(&self, messages: Vec<(GroupId, Message)>) {
        let mut by_worker: Vec<Vec<(GroupId, Message)>> = Vec::new();
        {
            let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
            for (group, message) in messages {
                let Some(&worker) = groups.get(&group) else {
                    continue;
                };
                if by_worker.len() <= worker {
                    by_worker.resize_with(worker + 1, Vec::new);
                }
                by_worker[worker].push((group, message));
            }
        }
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        for (worker, batch) in by_worker.into_iter().enumerate() {
            if batch.is_empty() {
                continue;
            }
            let Some((inbox, control, _)) = workers.get(worker) else {
                continue;
            };
            let Err(mpsc::error::TrySendError::Full(WorkerInput::Messages(batch))) =
                inbox.try_send(WorkerInput::Messages(batch))
            else {
                continue;
            };
            // Dropped. Raft retransmits the rest, but forwarded proposals
            // and reads are not retransmitted: their sender hears of the
            // drop now, and its callers retry, instead of waiting out a
            // timeout. One hand-over for the whole batch.
            let mut refusals: Vec<ForwardedRefusal> = Vec::new();
            for (group, message) in batch {
                let Some((proposals, reads)) = forwarded_ids(&message.body) else {
                    continue;
                };
                if proposals.is_empty() && reads.is_empty() {
                    continue;
                }
                let found = refusals
                    .iter_mut()
                    .find(|refusal| refusal.group == group && refusal.from == message.from);
                match found {
                    Some(refusal) => {
                        refusal.proposals.extend(proposals);
                        refusal.reads.extend(reads);
                    }
                    None => refusals.push(ForwardedRefusal {
                        group,
                        from: message.from,
                        proposals,
                        reads,
                    }),
                }
            }
            if !refusals.is_empty() {
                let _ = control.send(Control::RefuseForwarded {
                    refusals,
                    reason: format!(
                        "node {} is too busy to take more requests (group_inbox_max); retry later",
                        self.inner.config.node_id
                    ),
                });
            }
        }
    }

    /// A transport reports messages it did not send, or may not have
    /// (`UnsentCause`). The callers of forwarded proposals and reads among
    /// them are answered at once (`Error::Unsent`) and retry; every other
    /// message is left to Raft, which retransmits. Takes no lock a worker
    /// may wait on: transports call it from workers' threads.
    pub fn report_unsent(&self, messages: &[(GroupId, Message)], cause: UnsentCause) {
        type Unsent = (GroupId, NodeId, Vec<RequestId>, Vec<ReadId>);
        let mut unsent: Vec<Unsent> = Vec::new();
        for (group, message) in messages {
            let Some((proposals, reads)) = forwarded_ids(&message.body) else {
                continue;
            };
            if proposals.is_empty() && reads.is_empty() {
                continue;
            }
            let found = unsent
                .iter_mut()
                .find(|(g, peer, ..)| g == group && *peer == message.to);
            match found {
                Some((_, _, all_proposals, all_reads)) => {
                    all_proposals.extend(proposals);
                    all_reads.extend(reads);
                }
                None => unsent.push((*group, message.to, proposals, reads)),
            }
        }
        if unsent.is_empty() {
            return;
        }
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        for (group, peer, proposals, reads) in unsent {
            if let Some((_, control, _)) = workers.get(self.worker_of(group)) {
                let _ = control.send(Control::Unsent {
                    group,
                    peer,
                    proposals,
                    reads,
                    cause,
                });
            }
        }
    }

    /// The worker that runs (or would run) `group`.
    fn worker_of(&self, group: GroupId) -> usize {
        (group.0 % self.inner.config.workers.max(1) as u64) as usize
    }

    /// Hands a snapshot message and the state it stands for to a group.
    /// Returns false when the group cannot take it now.
    pub fn deliver_snapshot(&self, group: GroupId, message: Message, data: SnapshotData) -> bool {
        self.enqueue(group, Input::Snapshot { message, data })
            .is_ok()
    }

    /// Where a transport writes the snapshots it receives.
    pub fn snapshot_dir(&self) -> &SnapshotDir {
        &self.inner.snapshots
    }

    /// The transport tells the group how sending a snapshot to `to` ended.
    pub fn report_snapshot(&self, group: GroupId, to: NodeId, delivered: bool) {
        let worker = {
            let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
            groups.get(&group).copied()
        };
        let Some(worker) = worker else {
            return;
        };
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        if let Some((_, control, _)) = workers.get(worker) {
            let _ = control.send(Control::SnapshotReport {
                group,
                to,
                delivered,
            });
        }
    }

    /// Proposes a command on this node, which must lead the group; resolves
    /// with the state machine's result once applied.
    pub async fn propose(&self, group: GroupId, command: Bytes) -> Result<Bytes, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Propose { command, reply })?;
        self.answer(group, answer).await
    }

    /// Proposes a command sent by request `id`: applied at most once however
    /// often it is proposed, on this node or another. A retry with the same
    /// id (after a `Timeout`, a `Dropped` or a lost connection) gets the
    /// first application's result, or `AlreadyApplied` when that result was
    /// lost to a restart; an id older than its client's last applied one
    /// gets `StaleRequest`. On a follower, the proposal is forwarded to the
    /// leader and resolves once this node applies it, or fails with
    /// `NotLeader` when this node sees the leader change first: it may then
    /// have been applied, or may yet be, so retry it with the same id (a
    /// fresh id could apply it twice).
    pub async fn propose_with_id(
        &self,
        group: GroupId,
        id: RequestId,
        command: Bytes,
    ) -> Result<Bytes, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::ProposeWithId { id, command, reply })?;
        self.answer(group, answer).await
    }

    /// A linearizable read (ReadIndex, batched by the core; forwarded to the
    /// leader from a follower), served from this node's state machine.
    pub async fn read_linearizable(&self, group: GroupId, query: Bytes) -> Result<Bytes, Error> {
        let view = self.group_view(group)?;
        let Some(reader) = view.reader else {
            let (reply, answer) = oneshot::channel();
            self.enqueue(group, Input::Read(PendingRead::Query(query, reply)))?;
            return self.answer(group, answer).await;
        };
        // The round runs on the worker; the read itself on this task, once
        // the state machine has applied the read index.
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Read(PendingRead::Index(reply)))?;
        let index = self.answer(group, answer).await?;
        let waited = tokio::time::timeout_at(deadline, view.applied.wait_for(index)).await;
        match waited {
            Ok(Ok(_)) => Ok(reader.read(&query)),
            Ok(Err(_)) => Err(self.stopped(group)),
            Err(_) => Err(Error::Timeout {
                group,
                timeout_ms: self.inner.config.request_timeout.as_millis() as u64,
            }),
        }
    }

    /// Stops hosting `group` on this node and removes its log and state
    /// from the WAL; resolves once that removal is durable. Its pending
    /// requests fail with `GroupStopped`. The state machine is dropped:
    /// its own data is the application's to delete. This does not change
    /// the group's membership: remove the node from the group first (or
    /// remove the group on every member), or its peers will keep
    /// replicating to it.
    pub async fn remove_group(&self, group: GroupId) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        {
            let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
            let worker = *groups.get(&group).ok_or(Error::UnknownGroup(group))?;
            let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
            let (inbox, _, _) = workers.get(worker).ok_or_else(|| self.stopped(group))?;
            inbox
                .try_send(WorkerInput::Remove((group, reply)))
                .map_err(|error| match error {
                    mpsc::error::TrySendError::Full(_) => Error::Busy(group),
                    mpsc::error::TrySendError::Closed(_) => self.stopped(group),
                })?;
        }
        // The id stays taken until the removal is durable, so that a
        // `start_group` of the same id (GroupExists meanwhile) never reads
        // the old group's log from the WAL, nor has its state machine
        // unregistered by the old group's removal. A task of its own waits
        // for that, so a caller that gives up waiting does not free the
        // id early.
        let host = self.clone();
        let removal = tokio::spawn(async move {
            let removed = answer
                .await
                .map_err(|_| host.stopped(group))
                .and_then(|done| done);
            host.release_group_id(group);
            removed
        });
        removal.await.map_err(|_| self.stopped(group))?
    }

    /// Frees a removed group's id once its removal is over.
    fn release_group_id(&self, group: GroupId) {
        self.inner
            .groups
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        self.inner
            .applied
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
        self.inner
            .stop_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&group);
    }

    /// The group's Raft status on this node.
    pub async fn status(&self, group: GroupId) -> Result<Status, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Status { reply })?;
        answer.await.map_err(|_| self.stopped(group))
    }

    /// Stops every group and waits for the workers to exit. Requests still
    /// queued are dropped; their callers get `GroupStopped`. The WAL closes
    /// once the last clone of this host is gone.
    pub async fn stop(&self) {
        {
            let mut groups = self.inner.groups.write().unwrap_or_else(|p| p.into_inner());
            // Callers and streams that see a group go learn that this node
            // stops (another node may serve them), not that the group was
            // removed (which every node would say).
            let mut reasons = self
                .inner
                .stop_reasons
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            for group in groups.keys() {
                reasons
                    .entry(*group)
                    .or_insert_with(|| NODE_STOPPING.to_string());
            }
            groups.clear();
        }
        self.inner
            .workers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        let tasks = std::mem::take(
            &mut *self
                .inner
                .worker_tasks
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for task in tasks {
            let _ = task.await;
        }
    }

    /// Wakes every quiesced group, e.g. when a peer's connection is lost: a
    /// leader may be gone, and only ticking followers will notice.
    pub fn wake_all(&self) {
        let workers = self.inner.workers.read().unwrap_or_else(|p| p.into_inner());
        for (inbox, _, _) in workers.iter() {
            // A full inbox means the worker is busy, hence awake.
            let _ = inbox.try_send(WorkerInput::WakeAll);
        }
    }

    /// How many groups are quiesced (not ticking) now.
    pub fn quiesced_group_count(&self) -> u64 {
        self.inner
            .quiesced_groups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Proposes a membership change of `group` on its leader; resolves once
    /// the change is applied.
    pub async fn change_membership(&self, group: GroupId, change: ConfChange) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::ConfChange { change, reply })?;
        self.answer(group, answer).await.map(|_| ())
    }

    /// Asks the group's leader (this node, or forwarded to it) to hand
    /// leadership to `target`; returns once the request is under way.
    pub async fn transfer_leader(&self, group: GroupId, target: NodeId) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::TransferLeader { target, reply })?;
        self.answer(group, answer).await.map(|_| ())
    }

    /// Asks this node, when it leads `group`, to hand leadership to its
    /// most up-to-date voter (before a restart); returns once under way.
    pub async fn step_down(&self, group: GroupId) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::StepDown { reply })?;
        self.answer(group, answer).await.map(|_| ())
    }

    /// UNSAFE: removes `node` from `group` on this node alone, without a
    /// quorum, for a group that lost its quorum for good. Run it on one
    /// survivor only (see `regatta_raft::RaftNode::force_remove`).
    pub async fn force_remove(&self, group: GroupId, node: NodeId) -> Result<(), Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::ForceRemove { node, reply })?;
        self.answer(group, answer).await.map(|_| ())
    }

    /// A read from this node's state machine as it is now: no Raft round,
    /// possibly stale (serializable).
    pub async fn read_stale(&self, group: GroupId, query: Bytes) -> Result<Bytes, Error> {
        let view = self.group_view(group)?;
        if let Some(reader) = view.reader {
            if view.applied.is_stopped() {
                return Err(self.stopped(group));
            }
            return Ok(reader.read(&query));
        }
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::StaleRead { query, reply })?;
        self.answer(group, answer).await
    }

    /// Makes this node campaign in `group` now.
    pub fn campaign(&self, group: GroupId) -> Result<(), Error> {
        self.enqueue(group, Input::Campaign)
    }
}

impl NodeHost {
    /// Whether this node runs `group`.
    pub fn hosts_group(&self, group: GroupId) -> bool {
        self.inner
            .groups
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&group)
    }

    /// Why `group` stopped on this node: it failed (a WAL or state machine
    /// failure), or the host stopped ([`NODE_STOPPING`]); `None` for a
    /// group running, removed or never here.
    pub fn stop_reason(&self, group: GroupId) -> Option<String> {
        self.inner
            .stop_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
    }

    /// The error of a request to a group that stopped on this node, with
    /// the reason it stopped when known.
    fn stopped(&self, group: GroupId) -> Error {
        let reason = self
            .inner
            .stop_reasons
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&group)
            .cloned()
            .unwrap_or_else(|| "the group's worker has exited".into());
        Error::GroupStopped { group, reason }
    }

    /// Waits for an answer within `request_timeout`.
    async fn answer<T>(
        &self,
        group: GroupId,
        answer: oneshot::Receiver<Result<T, Error>>,
    ) -> Result<T, Error> {
        let timeout = self.inner.config.request_timeout;
        match tokio::time::timeout(timeout, answer).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(self.stopped(group)),
            Err(_) => Err(Error::Timeout {
                group,
                timeout_ms: timeout.as_millis() as u64,
            }),
        }
    }
}

/// The request ids of a forwarded proposal's commands (only commands
/// with ids have a caller waiting on the forwarding node).
fn session_ids(payloads: &[EntryPayload]) -> Vec<RequestId> {
    payloads
        .iter()
        .filter_map(|payload| match payload {
            EntryPayload::Session { id, .. } => Some(*id),
            _ => None,
        })
        .collect()
}

/// Logs why `group` stopped on this node and keeps the reason for the
/// requests that come after.
fn note_stopped(reasons: &StopReasons, group: GroupId, reason: &str) {
    tracing::error!(group = group.0, %reason, "group stopped on this node");
    reasons
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(group, reason.to_string());
}

/// One group's state inside its worker.
struct Group {
    group: GroupId,
    /// This run of the group on this host, unique per host: reports from
    /// the apply thread name it, so that those of an earlier run of the
    /// same id (removed while its apply thread lagged) are ignored.
    incarnation: u64,
    raft: RaftNode<GroupStorage>,
    apply: ApplyOutbox,
    /// Publishes the applied index (`NodeHost::applied_index_watch`).
    applied: AppliedPublisher,
    /// Proposals by index, with the term they were appended in.
    proposals: BTreeMap<LogIndex, (Term, Reply)>,
    /// Proposals with a request id forwarded to the leader, resolved when
    /// an entry with their id is applied here.
    waiting_ids: FxHashMap<RequestId, Vec<Waiter>>,
    reads: FxHashMap<ReadId, PendingRead>,
    /// The leader each forwarded read was last sent to (a follower's
    /// reads only): removed with the read; those of reads abandoned by
    /// their callers go at the next resend check (`resend_reads`).
    read_leaders: FxHashMap<ReadId, NodeId>,
    /// The leader as of the last `Ready`: when it changes, reads waiting
    /// on the old one fail with `NotLeader` (their caller retries) instead
    /// of waiting for a leader that may be gone.
    known_leader: Option<NodeId>,
    next_read: u64,
    /// Reads with an id below this were asked before the last resend
    /// check: those still waiting at the next one are forwarded again.
    reads_checked_below: u64,
    /// Resend checks so far.
    read_checks: u64,
    /// Reads forwarded again: how often, and the check at which the next
    /// resend is due (the gap doubles, so that a leader that is slow,
    /// not deaf, queues a few copies of a read, not one per check).
    read_resends: FxHashMap<ReadId, (u32, u64)>,
    /// Ticks between resend checks (`READ_RESEND_INTERVAL`).
    read_resend_ticks: u64,
    quiesce_after_ticks: u64,
    /// Ticks since the last activity.
    idle_ticks: u64,
    /// Ticks since the group started here.
    ticks: u64,
    /// Not ticking: no heartbeats sent, no election timer running.
    quiesced: bool,
    last_index_seen: LogIndex,
    /// In the worker's `commit_due` list.
    commit_due: bool,
    /// The data of a snapshot message stepped in, until its ready.
    pending_install: Option<(LogIndex, Term, SnapshotData)>,
    /// Snapshots being written or sent to followers: the index each
    /// stands for and the tick it was asked for. Compaction stays at or
    /// below the lowest, so that the snapshot's term can still be read and
    /// the entries after it are there once it lands; without this, a
    /// snapshot that takes longer than a compaction interval to write or
    /// send would fail every time. Released on the transport's report, or
    /// after `SNAPSHOT_HOLD_TICKS_MAX`.
    snapshots_out: FxHashMap<NodeId, (LogIndex, u64)>,
    snapshot_every_entries: u64,
    compaction_overhead_entries: u64,
    /// Applied index of the last compaction.
    compacted_at: LogIndex,
    /// The apply thread is saving the session table for a compaction.
    saving_sessions: bool,
    /// A snapshot marker and compaction to persist with the next ready.
    pending_compaction: Option<(regatta_raft::SnapshotMeta, LogIndex)>,
    /// A snapshot whose install the WAL is writing (in the ready with this
    /// number); the state machine restores it once that is durable.
    installing: Option<(u64, SnapshotMeta, SnapshotData)>,
    /// Where the install copies are kept.
    snapshots: SnapshotDir,
}

/// Logged at start when a snapshot install was cut short before the WAL
/// recorded it (its copy is deleted).
pub const INSTALL_CUT_BEFORE_WAL: &str =
    "a snapshot install was cut short before the WAL recorded it";
/// Logged at start when a snapshot install cut short after the WAL
/// recorded it is finished from its copy.
pub const INSTALL_CUT_AFTER_WAL: &str = "finished installing a snapshot interrupted by a restart";

/// The stop reason of every group of a host that is stopping.
pub const NODE_STOPPING: &str = "this node is shutting down";

/// Ticks between sweeps of forwarded proposals and reads nobody waits
/// for.
const WAITING_SWEEP_TICKS: u64 = 100;
/// How long a forwarded read waits for the leader's answer before it is
/// forwarded again (as etcd retries its ReadIndex after 500 ms): an
/// answer lost on the way (a connection that broke, a full queue) would
/// otherwise hold its caller until the request timeout. A read answered
/// twice is served once; the second answer finds nobody.
const READ_RESEND_INTERVAL: Duration = Duration::from_millis(500);

/// Whole ticks in `interval`, at least one.
fn ticks_in(interval: Duration, tick: Duration) -> u64 {
    let tick_micros = tick.as_micros().max(1);
    ((interval.as_micros() / tick_micros) as u64).max(1)
}
/// The longest an outgoing snapshot holds compaction back, in ticks (10
/// minutes at the default 10 ms tick): a report that never comes must not
/// stop compaction for good.
const SNAPSHOT_HOLD_TICKS_MAX: u64 = 60_000;

/// Inputs handled per turn before the readies are taken.
const INPUTS_PER_TURN_MAX: usize = 1024;

/// Runs many groups: one wake-up, one WAL batch and one tick timer serve
/// every group with work.
struct Worker {
    node_id: NodeId,
    groups: FxHashMap<GroupId, Group>,
    /// Leaders whose moved commit index some follower has not had yet
    /// (`CommitBroadcast::Deferred`); sent when the commit timer fires.
    commit_due: Vec<GroupId>,
    /// Groups that are not quiesced, hence ticked.
    active: BTreeSet<GroupId>,
    wal: Arc<Wal>,
    transport: Arc<dyn Transport>,
    control_sender: mpsc::UnboundedSender<Control>,
    quiesced_groups: Arc<std::sync::atomic::AtomicU64>,
    /// This worker's share of `quiesced_groups`.
    quiesced_published: u64,
    /// Groups removed this turn; the turn's WAL batch records it.
    removing: Vec<Removal>,
    /// The session tables, deleted with their groups.
    sessions: SnapshotStore,
    /// Snapshot install copies, deleted with their groups.
    snapshots: SnapshotDir,
    /// This worker's apply thread; flushed at the end of every turn.
    apply: ApplyOutbox,
    /// The host's record of why groups stopped.
    stop_reasons: StopReasons,
}

impl Worker {
    fn note_stopped(&self, group: GroupId, reason: &str) {
        note_stopped(&self.stop_reasons, group, reason);
    }

    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<WorkerInput>,
        mut control: mpsc::UnboundedReceiver<Control>,
        tick_interval: Duration,
        commit_broadcast_delay: Duration,
    ) {
        let mut ticker = tokio::time::interval(tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Armed while `commit_due` is not empty; reset, never re-created.
        let commit_timer = tokio::time::sleep(Duration::ZERO);
        tokio::pin!(commit_timer);
        let mut commit_timer_armed = false;
        let mut touched: BTreeSet<GroupId> = BTreeSet::new();
        loop {
            tokio::select! {
                biased;
                Some(event) = control.recv() => self.handle_control(event, &mut touched),
                input = inbox.recv() => match input {
                    Some(input) => self.accept(input, &mut touched),
                    None => break,
                },
                () = &mut commit_timer, if commit_timer_armed => {
                    commit_timer_armed = false;
                    self.broadcast_commits(&mut touched);
                }
                _ = ticker.tick(), if !self.active.is_empty() => self.tick(&mut touched),
            }
            for _ in 0..INPUTS_PER_TURN_MAX {
                match inbox.try_recv() {
                    Ok(input) => self.accept(input, &mut touched),
                    Err(_) => break,
                }
            }
            while let Ok(event) = control.try_recv() {
                self.handle_control(event, &mut touched);
            }
            self.process_readies(&mut touched);
            let _ = self.apply.flush();
            self.publish_quiesced();
            if !commit_timer_armed && !self.commit_due.is_empty() {
                let deadline = tokio::time::Instant::now() + commit_broadcast_delay;
                commit_timer.as_mut().reset(deadline);
                commit_timer_armed = true;
            }
        }
        self.active.clear();
        for (group, mut state) in std::mem::take(&mut self.groups) {
            state.fail_all(format!("group {} stopped with its host", group.0));
        }
        let _ = self.apply.flush();
        self.publish_quiesced();
    }

    fn accept(&mut self, input: WorkerInput, touched: &mut BTreeSet<GroupId>) {
        match input {
            WorkerInput::Start(group, state) => {
                self.groups.insert(group, *state);
                self.active.insert(group);
                touched.insert(group);
            }
            WorkerInput::Group(group, input) => self.accept_group_input(group, input, touched),
            WorkerInput::Messages(messages) => {
                for (group, message) in messages {
                    self.accept_group_input(group, Input::Message(message), touched);
                }
            }
            WorkerInput::Remove((group, reply)) => {
                if let Some(mut state) = self.groups.remove(&group) {
                    state.fail_all(format!("group {} was removed from this node", group.0));
                }
                self.active.remove(&group);
                touched.remove(&group);
                self.removing.push((group, reply));
            }
            WorkerInput::WakeAll => {
                for (group, state) in self.groups.iter_mut() {
                    state.note_activity();
                    self.active.insert(*group);
                }
            }
        }
    }

    /// The commit timer fired: leaders send their moved commit index to
    /// the followers that have not had it on an append since.
    fn broadcast_commits(&mut self, touched: &mut BTreeSet<GroupId>) {
        for group in std::mem::take(&mut self.commit_due) {
            let Some(state) = self.groups.get_mut(&group) else {
                continue;
            };
            state.commit_due = false;
            if state.raft.commit_unsent() {
                state.raft.broadcast_commit();
                touched.insert(group);
            }
        }
    }

    fn accept_group_input(
        &mut self,
        group: GroupId,
        input: Input,
        touched: &mut BTreeSet<GroupId>,
    ) {
        let Some(state) = self.groups.get_mut(&group) else {
            return;
        };
        if state.accept_input(input) {
            self.active.insert(group);
        }
        touched.insert(group);
    }

    fn tick(&mut self, touched: &mut BTreeSet<GroupId>) {
        let active: Vec<GroupId> = self.active.iter().copied().collect();
        for group in active {
            let Some(state) = self.groups.get_mut(&group) else {
                self.active.remove(&group);
                continue;
            };
            state.tick();
            touched.insert(group);
            if state.quiesced {
                self.active.remove(&group);
            }
        }
    }

    /// Each worker owns a share of the host-wide count of quiesced groups
    /// and reports changes to it as deltas.
    fn publish_quiesced(&mut self) {
        let quiesced = self.groups.len().saturating_sub(self.active.len()) as u64;
        let counter = &self.quiesced_groups;
        if quiesced > self.quiesced_published {
            counter.fetch_add(
                quiesced - self.quiesced_published,
                std::sync::atomic::Ordering::Relaxed,
            );
        } else {
            counter.fetch_sub(
                self.quiesced_published - quiesced,
                std::sync::atomic::Ordering::Relaxed,
            );
        }
        self.quiesced_published = quiesced;
    }

    fn handle_control(&mut self, event: Control, touched: &mut BTreeSet<GroupId>) {
        match event {
            Control::Persisted {
                readies,
                removed,
                result,
            } => self.on_batch_persisted(readies, removed, result, touched),
            Control::SnapshotReady {
                group,
                incarnation,
                message,
                index,
                data,
            } => self.send_snapshot(group, incarnation, message, index, data, touched),
            Control::Applied(reports) => self.on_applied(reports, touched),
            Control::SessionsSaved {
                group,
                incarnation,
                index,
                result,
            } => {
                if let Some(state) = self.groups.get_mut(&group) {
                    if state.incarnation == incarnation {
                        state.on_sessions_saved(index, result);
                        touched.insert(group);
                    }
                }
            }
            Control::Failed {
                group,
                incarnation,
                reason,
            } => self.on_failed(group, incarnation, reason, touched),
            Control::SnapshotReport {
                group,
                to,
                delivered,
            } => {
                if let Some(state) = self.groups.get_mut(&group) {
                    state.accept_input(Input::SnapshotReport { to, delivered });
                    touched.insert(group);
                }
            }
            Control::Unsent {
                group,
                peer,
                proposals,
                reads,
                cause,
            } => {
                if let Some(state) = self.groups.get_mut(&group) {
                    let error = Error::Unsent { group, peer, cause };
                    state.fail_forwarded(peer, &proposals, &reads, &error);
                }
            }
            Control::RefuseForwarded { refusals, reason } => {
                self.refuse_forwarded(refusals, Refusal::Overloaded { reason });
            }
        }
    }

    /// The apply thread's reports: applied indexes and results, for the
    /// current run of each group only.
    fn on_applied(&mut self, reports: Vec<GroupApplied>, touched: &mut BTreeSet<GroupId>) {
        for GroupApplied {
            group,
            incarnation,
            index,
            results,
        } in reports
        {
            if let Some(state) = self.groups.get_mut(&group) {
                if state.incarnation != incarnation {
                    continue;
                }
                state.on_applied(index, results);
                touched.insert(group);
            }
        }
    }

    /// The apply thread cannot go on with a group: it stops, only for the
    /// run that failed (a late report of a removed group must not stop,
    /// nor name a reason for, the next group of its id).
    fn on_failed(
        &mut self,
        group: GroupId,
        incarnation: u64,
        reason: String,
        touched: &mut BTreeSet<GroupId>,
    ) {
        if self
            .groups
            .get(&group)
            .is_some_and(|state| state.incarnation == incarnation)
        {
            if let Some(mut state) = self.groups.remove(&group) {
                self.note_stopped(group, &reason);
                state.fail_all(reason);
            }
            self.active.remove(&group);
            touched.remove(&group);
        }
    }

    /// A WAL batch of this worker is durable (or failed): removed groups
    /// finish their removal, and each ready's group hears it persisted.
    fn on_batch_persisted(
        &mut self,
        readies: Vec<(GroupId, u64)>,
        removed: Vec<Removal>,
        result: regatta_wal::Result<()>,
        touched: &mut BTreeSet<GroupId>,
    ) {
        for (group, reply) in removed {
            if result.is_ok() {
                if let Err(error) = self.snapshots.remove_installs(group.0, u64::MAX, None) {
                    tracing::warn!(group = group.0, %error, "cannot delete a removed group's snapshot copies");
                }
            }
            let outcome = result.clone().map_err(Error::Wal).and_then(|()| {
                self.sessions.remove_group(group).map_err(|error| {
                    Error::State(format!(
                        "remove the session table of group {}: {error}",
                        group.0
                    ))
                })
            });
            let _ = reply.send(outcome);
        }
        for (group, number) in readies {
            let Some(state) = self.groups.get_mut(&group) else {
                continue;
            };
            if let Err(error) = &result {
                // Never acknowledge after a failed write: stop the group.
                let reason = format!("persisting the group's Raft state failed: {error}");
                note_stopped(&self.stop_reasons, group, &reason);
                state.fail_all(reason);
                self.groups.remove(&group);
                self.active.remove(&group);
                continue;
            }
            state.on_persisted(number);
            touched.insert(group);
        }
    }

    /// The apply thread copied the state a snapshot message stands for:
    /// the message leaves with it, or Raft hears the snapshot failed.
    fn send_snapshot(
        &mut self,
        group: GroupId,
        incarnation: u64,
        mut message: Message,
        index: LogIndex,
        data: Result<SnapshotData, String>,
        touched: &mut BTreeSet<GroupId>,
    ) {
        let Some(state) = self.groups.get_mut(&group) else {
            return;
        };
        if state.incarnation != incarnation {
            return;
        }
        let to = message.to;
        let meta = data.and_then(|data| {
            let meta = state
                .raft
                .snapshot_meta_at(index)
                .map_err(|error| error.to_string())?;
            Ok((meta, data))
        });
        match meta {
            Ok((meta, data)) => {
                // The state copied is at `index`, maybe newer than the one
                // Raft named: describe what is sent.
                state.snapshots_out.insert(to, (meta.index, state.ticks));
                message.body = MessageBody::Snapshot { meta };
                self.transport.send_snapshot(group, message, data);
            }
            Err(_) => {
                state.snapshots_out.remove(&to);
                state.raft.report_snapshot(to, false);
            }
        }
        touched.insert(group);
    }

    /// Forwarded proposals and reads this worker's full inbox dropped:
    /// their senders hear `refusal` now rather than at their timeout.
    fn refuse_forwarded(&mut self, refusals: Vec<ForwardedRefusal>, refusal: Refusal) {
        let mut messages: Vec<(GroupId, Message)> = Vec::new();
        for forwarded in refusals {
            if !self.groups.contains_key(&forwarded.group) {
                continue;
            }
            let message = |body| Message {
                from: self.node_id,
                to: forwarded.from,
                term: Term(0),
                body,
            };
            if !forwarded.proposals.is_empty() {
                let body = MessageBody::ProposeRefused {
                    ids: forwarded.proposals,
                    refusal: refusal.clone(),
                };
                messages.push((forwarded.group, message(body)));
            }
            for ids in forwarded
                .reads
                .chunks(regatta_raft::READ_IDS_PER_MESSAGE_MAX)
            {
                let body = MessageBody::ReadRefused {
                    ids: ids.to_vec(),
                    refusal: refusal.clone(),
                };
                messages.push((forwarded.group, message(body)));
            }
        }
        if !messages.is_empty() {
            self.transport.send(messages);
        }
    }

    /// Takes the ready of every touched group; one WAL batch for all.
    fn process_readies(&mut self, touched: &mut BTreeSet<GroupId>) {
        let mut batch = WriteBatch::new();
        let mut readies = Vec::new();
        let mut outbox = Vec::new();
        let mut persisted = Vec::new();
        let mut failed = Vec::new();
        for group in std::mem::take(touched) {
            let Some(state) = self.groups.get_mut(&group) else {
                continue;
            };
            if let Err(reason) =
                state.process_ready(&mut outbox, &mut batch, &mut readies, &mut persisted)
            {
                note_stopped(&self.stop_reasons, group, &reason);
                state.fail_all(reason);
                failed.push(group);
                continue;
            }
            if state.raft.commit_unsent() && !state.commit_due {
                state.commit_due = true;
                self.commit_due.push(group);
            }
            let last_index = state.raft.last_index();
            if last_index != state.last_index_seen {
                state.last_index_seen = last_index;
                state.note_activity();
                self.active.insert(group);
            }
        }
        for group in failed {
            self.groups.remove(&group);
            self.active.remove(&group);
        }
        // Every group's messages of this turn in one hand-over (pipelined:
        // they leave before the local fsync).
        if !outbox.is_empty() {
            self.transport.send(outbox);
        }
        let removed = std::mem::take(&mut self.removing);
        for (group, _) in &removed {
            batch.remove_group(*group);
        }
        if readies.is_empty() && removed.is_empty() {
            return;
        }
        let control = self.control_sender.clone();
        let transport = Arc::clone(&self.transport);
        // Empty batches too: the WAL answers them in order, so persisted
        // messages never overtake an earlier ready's fsync. They leave
        // from here, on the WAL's thread, as soon as the batch is durable:
        // a follower's acknowledgement does not wait for this worker.
        self.wal.submit(batch, move |result| {
            if result.is_ok() && !persisted.is_empty() {
                transport.send(persisted);
            }
            let _ = control.send(Control::Persisted {
                readies,
                removed,
                result,
            });
        });
    }
}

impl Group {
    /// A group run that has not stepped yet: `id` is the group and the
    /// incarnation of this run, `applied` publishes its applied index.
    fn new(
        id: (GroupId, u64),
        raft: RaftNode<GroupStorage>,
        apply: ApplyOutbox,
        applied: AppliedPublisher,
        config: &HostConfig,
        snapshots: SnapshotDir,
    ) -> Group {
        let (group, incarnation) = id;
        Group {
            group,
            incarnation,
            raft,
            apply,
            applied,
            proposals: BTreeMap::new(),
            waiting_ids: FxHashMap::default(),
            reads: FxHashMap::default(),
            read_leaders: FxHashMap::default(),
            known_leader: None,
            next_read: first_read_id(),
            reads_checked_below: 0,
            read_checks: 0,
            read_resends: FxHashMap::default(),
            read_resend_ticks: ticks_in(READ_RESEND_INTERVAL, config.tick_interval),
            quiesce_after_ticks: config.quiesce_after_ticks,
            idle_ticks: 0,
            ticks: 0,
            quiesced: false,
            last_index_seen: LogIndex(0),
            commit_due: false,
            pending_install: None,
            snapshots_out: FxHashMap::default(),
            snapshot_every_entries: config.snapshot_every_entries,
            compaction_overhead_entries: config.compaction_overhead_entries,
            compacted_at: LogIndex(0),
            saving_sessions: false,
            pending_compaction: None,
            installing: None,
            snapshots,
        }
    }

    fn tick(&mut self) {
        self.raft.tick();
        self.idle_ticks += 1;
        self.ticks += 1;
        // Forwarded proposals whose callers gave up (their entry may never
        // come) are forgotten now and then.
        if self.ticks.is_multiple_of(WAITING_SWEEP_TICKS) {
            self.waiting_ids.retain(|_, replies| {
                replies.retain(|waiter| !waiter.reply.is_closed());
                !replies.is_empty()
            });
            // Reads whose callers gave up, where the read index may never
            // come (its answer or refusal lost on the way); a read state
            // that comes later finds nobody and is ignored.
            self.reads.retain(|_, read| !read.is_abandoned());
            // Only the compaction hold is released: the transfer may still
            // be running (a large snapshot on a paced link), and its report
            // comes on the unbounded control channel.
            let ticks = self.ticks;
            self.snapshots_out
                .retain(|_, (_, since)| ticks.saturating_sub(*since) < SNAPSHOT_HOLD_TICKS_MAX);
        }
        if self.ticks.is_multiple_of(self.read_resend_ticks) {
            self.resend_reads();
        }
        // A group with reads waiting keeps ticking, so that their resend
        // comes.
        let settled = matches!(self.raft.role(), Role::Leader | Role::Follower)
            && self.raft.leader().is_some()
            && self.reads.is_empty();
        if self.quiesce_after_ticks > 0 && self.idle_ticks >= self.quiesce_after_ticks && settled {
            self.quiesced = true;
        }
    }

    /// Forwards again the reads still waiting that were asked before the
    /// previous check (so at least `READ_RESEND_INTERVAL` ago) to the
    /// leader known now. Safe: any answer to a request sent after the
    /// read was asked gives an index that covers every write acknowledged
    /// before it. A leader's own reads wait in its core, not on a message.
    fn resend_reads(&mut self) {
        let below = std::mem::replace(&mut self.reads_checked_below, self.next_read);
        self.read_checks += 1;
        let check = self.read_checks;
        // Reads whose callers gave up are not asked again.
        self.reads.retain(|_, read| !read.is_abandoned());
        self.read_resends
            .retain(|id, _| self.reads.contains_key(id));
        self.read_leaders
            .retain(|id, _| self.reads.contains_key(id));
        if self.raft.role() == Role::Leader || self.reads.is_empty() {
            return;
        }
        let mut due: Vec<ReadId> = self
            .reads
            .keys()
            .copied()
            .filter(|id| id.0 < below)
            .filter(|id| {
                self.read_resends
                    .get(id)
                    .is_none_or(|(_, next)| check >= *next)
            })
            .collect();
        due.sort_unstable();
        for id in due {
            let times = self.read_resends.get(&id).map_or(0, |(times, _)| *times) + 1;
            let gap_checks = 1u64 << times.min(6);
            self.read_resends.insert(id, (times, check + gap_checks));
            match self.raft.read_index(id) {
                Ok(()) => self.note_read_leader(id),
                Err(source) => {
                    self.read_leaders.remove(&id);
                    if let Some(read) = self.reads.remove(&id) {
                        read.fail(Error::Raft {
                            group: self.group,
                            source,
                        });
                    }
                }
            }
        }
    }

    /// Notes where read `id`, just asked of the core, went: the leader,
    /// if this node follows one.
    fn note_read_leader(&mut self, id: ReadId) {
        if self.raft.role() == Role::Leader {
            return;
        }
        if let Some(leader) = self.raft.leader() {
            self.read_leaders.insert(id, leader);
        }
    }

    /// Any real work keeps the group ticking for another quiet period.
    fn note_activity(&mut self) {
        self.idle_ticks = 0;
        self.quiesced = false;
    }

    /// Classifies an input for quiescence, then handles it; true when the
    /// group must tick. Heartbeats and their answers are handled without
    /// resuming ticks: a quiet group needs no timer to answer, and if a
    /// woken leader sent heartbeats on its next tick, they would wake the
    /// followers, whose answers would wake the leader again, and the group
    /// would never settle. A leader's failure is noticed through the lost
    /// peer instead (`wake_all`).
    fn accept_input(&mut self, input: Input) -> bool {
        match &input {
            Input::Message(message) => {
                let heartbeat = matches!(
                    message.body,
                    MessageBody::Heartbeat { .. } | MessageBody::HeartbeatResponse { .. }
                );
                if !heartbeat {
                    self.note_activity();
                }
            }
            Input::Status { .. } => {}
            Input::StaleRead { .. } | Input::SnapshotReport { .. } => {}
            Input::Propose { .. }
            | Input::ProposeWithId { .. }
            | Input::Read(_)
            | Input::Campaign
            | Input::ConfChange { .. }
            | Input::TransferLeader { .. }
            | Input::StepDown { .. }
            | Input::ForceRemove { .. }
            | Input::Snapshot { .. } => self.note_activity(),
        }
        self.handle_input(input);
        !self.quiesced
    }

    /// Proposes on this node if it leads, and tracks the entry so that its
    /// `reply` is answered once it is applied (by the apply thread for a
    /// command, by `on_applied` for a membership change); otherwise
    /// answers `NotLeader`.
    fn propose_on_leader(
        &mut self,
        reply: Reply,
        propose: impl FnOnce(&mut RaftNode<GroupStorage>) -> regatta_raft::Result<Proposed>,
    ) {
        let group = self.group;
        if self.raft.role() != Role::Leader {
            let leader_hint = self.raft.leader();
            let _ = reply.send(Err(Error::NotLeader { group, leader_hint }));
            return;
        }
        self.propose_and_track(reply, propose);
    }

    /// Proposes, and tracks an appended entry so that `reply` is answered
    /// once it is applied (see `propose_on_leader`); a forwarded proposal
    /// without a request id cannot be tracked, so it is answered
    /// `NotLeader`.
    fn propose_and_track(
        &mut self,
        reply: Reply,
        propose: impl FnOnce(&mut RaftNode<GroupStorage>) -> regatta_raft::Result<Proposed>,
    ) {
        let group = self.group;
        match propose(&mut self.raft) {
            Ok(Proposed::Appended { last, term, .. }) => {
                self.track_proposal(last, term, reply);
            }
            Ok(Proposed::Forwarded { leader }) => {
                let leader_hint = Some(leader);
                let _ = reply.send(Err(Error::NotLeader { group, leader_hint }));
            }
            Err(source) => {
                let _ = reply.send(Err(Error::Raft { group, source }));
            }
        }
    }

    /// Tracks a proposal appended at `index` in `term`. A caller already
    /// tracked at that index proposed in an older term, on this node as
    /// leader then, and its entry was cut from this log by another
    /// leader's; it is answered `OutcomeUnknown` now (retry under the
    /// same request id): that entry may still commit through a node that
    /// holds it, so `Dropped` would be a claim nobody can make yet.
    /// Before, its reply was dropped, and the caller heard
    /// `GroupStopped`.
    fn track_proposal(&mut self, index: LogIndex, term: Term, reply: Reply) {
        if let Some((older, displaced)) = self.proposals.insert(index, (term, reply)) {
            debug_assert!(older < term, "one term appends an index once");
            let _ = displaced.send(Err(Error::OutcomeUnknown(self.group)));
        }
    }

    fn handle_input(&mut self, input: Input) {
        let group = self.group;
        match input {
            Input::Message(message) => {
                // Malformed or stale messages are the core's to drop; a
                // storage error here resurfaces in the next ready.
                let _ = self.raft.step(message);
            }
            Input::Propose { command, reply } => {
                self.propose_on_leader(reply, |raft| raft.propose(vec![command]));
            }
            Input::ProposeWithId { id, command, reply } => {
                self.propose_with_id(id, command, reply);
            }
            Input::Read(read) => {
                let id = ReadId(self.next_read);
                self.next_read += 1;
                match self.raft.read_index(id) {
                    Ok(()) => {
                        self.reads.insert(id, read);
                        self.note_read_leader(id);
                    }
                    Err(source) => read.fail(Error::Raft { group, source }),
                }
            }
            Input::Status { reply } => {
                let mut status = self.raft.status();
                // The apply thread publishes before it answers proposers, so
                // its index may run ahead of the worker's report.
                status.applied = status.applied.max(self.applied.get());
                let _ = reply.send(status);
            }
            Input::Campaign => self.raft.campaign(),
            Input::ConfChange { change, reply } => {
                // Resolved like a proposal: once applied in this term.
                self.propose_on_leader(reply, |raft| raft.propose_conf_change(change));
            }
            Input::TransferLeader { target, reply } => {
                let result = self.raft.transfer_leader(target).map(|()| Bytes::new());
                let _ = reply.send(result.map_err(|source| Error::Raft { group, source }));
            }
            Input::StepDown { reply } => {
                let result = self.raft.step_down().map(|()| Bytes::new());
                let _ = reply.send(result.map_err(|source| Error::Raft { group, source }));
            }
            Input::ForceRemove { node, reply } => {
                let result = self.raft.force_remove(node).map(|()| Bytes::new());
                let _ = reply.send(result.map_err(|source| Error::Raft { group, source }));
            }
            Input::Snapshot { message, data } => self.offer_snapshot(message, data),
            Input::SnapshotReport { to, delivered } => {
                self.snapshots_out.remove(&to);
                self.raft.report_snapshot(to, delivered);
            }
            Input::StaleRead { query, reply } => {
                self.apply.send(ApplyWork::Read {
                    group,
                    index: LogIndex(0),
                    query,
                    reply,
                });
            }
        }
    }

    /// A proposal under a client's request id: a leader appends and
    /// tracks it; a follower forwards it and answers when this node
    /// applies the id.
    fn propose_with_id(&mut self, id: RequestId, command: Bytes, reply: Reply) {
        if self.raft.role() == Role::Leader {
            self.propose_and_track(reply, |raft| raft.propose_with_id(id, command));
            return;
        }
        match self.raft.propose_with_id(id, command) {
            Ok(Proposed::Appended { last, term, .. }) => {
                self.track_proposal(last, term, reply);
            }
            Ok(Proposed::Forwarded { leader }) => {
                let waiter = Waiter {
                    peer: leader,
                    reply,
                };
                self.waiting_ids.entry(id).or_default().push(waiter);
            }
            Err(source) => {
                let group = self.group;
                let _ = reply.send(Err(Error::Raft { group, source }));
            }
        }
    }

    /// A snapshot from the leader, with its data: Raft decides whether to
    /// take it. The data goes with the snapshot Raft took: one it refused
    /// (an older term's, one at or below the commit index) must not
    /// replace the data of one accepted earlier this turn.
    fn offer_snapshot(&mut self, message: Message, data: SnapshotData) {
        let offered = match &message.body {
            MessageBody::Snapshot { meta } => Some((meta.index, meta.term)),
            _ => None,
        };
        let _ = self.raft.step(message);
        let accepted = self
            .raft
            .snapshot_to_install()
            .map(|meta| (meta.index, meta.term));
        if let Some((index, term)) = offered.filter(|_| offered == accepted) {
            self.pending_install = Some((index, term, data));
        }
    }

    /// The ready `number` is durable: tell Raft (its persisted messages
    /// already left from the WAL's callback, see `process_readies`).
    fn on_persisted(&mut self, number: u64) {
        self.raft.on_persisted(number);
        // The WAL holds the install: the state machine may restore now,
        // before any entry after it (those are sent to the apply thread by
        // the readies that follow).
        if self
            .installing
            .as_ref()
            .is_some_and(|(ready, _, _)| *ready <= number)
        {
            if let Some((_, meta, data)) = self.installing.take() {
                self.apply.send(ApplyWork::Restore {
                    group: self.group,
                    meta,
                    data,
                });
                self.drain_forwarded_for_snapshot();
            }
        }
    }

    /// A snapshot from the leader replaces this node's log: the entries of
    /// forwarded proposals it covers will never be applied here one by
    /// one, so nothing would answer their callers but the timeout. They
    /// get `NotLeader` now, the answer that says "retry under the same
    /// request id": the session table that came with the snapshot answers
    /// a retry of an id already applied with its first result.
    fn drain_forwarded_for_snapshot(&mut self) {
        let group = self.group;
        let leader_hint = self.raft.leader();
        for (_, waiters) in std::mem::take(&mut self.waiting_ids) {
            for waiter in waiters {
                let _ = waiter
                    .reply
                    .send(Err(Error::NotLeader { group, leader_hint }));
            }
        }
    }

    /// Every `snapshot_every_entries` applied entries, compaction starts:
    /// the apply thread saves the session table first (the entries the
    /// compaction drops are no longer there to rebuild it from), then
    /// `on_sessions_saved` compacts.
    fn maybe_schedule_compaction(&mut self, applied: LogIndex) {
        let every = self.snapshot_every_entries;
        if every == 0 || self.saving_sessions || applied.distance_from(self.compacted_at) < every {
            return;
        }
        self.saving_sessions = true;
        self.compacted_at = applied;
        self.apply.send(ApplyWork::SaveSessions(self.group));
    }

    /// The session table is durable as of `saved`: record a snapshot
    /// marker (the state machine holds at least that state durably) and
    /// compact the log below it, keeping the overhead for followers. The
    /// entries after `saved` stay, so a restart can rebuild the table.
    fn on_sessions_saved(&mut self, saved: LogIndex, result: Result<(), Error>) {
        self.saving_sessions = false;
        if result.is_err() {
            // Keep every entry; the next interval tries again.
            return;
        }
        let status = self.raft.status();
        let marker = saved.min(status.applied);
        let mut compact_to = LogIndex(marker.0.saturating_sub(self.compaction_overhead_entries));
        // Not past a snapshot still being written or sent (`snapshots_out`).
        if let Some(held) = self.snapshots_out.values().map(|(index, _)| *index).min() {
            compact_to = compact_to.min(held);
        }
        // Never ask the WAL for a compaction it would refuse: the whole
        // worker's batch would fail with it.
        if compact_to < status.first_index {
            return;
        }
        if let Ok(meta) = self.raft.snapshot_meta_at(marker) {
            self.pending_compaction = Some((meta, compact_to));
        }
    }

    /// The proposers of these committed commands, for the apply thread to
    /// answer. A proposer whose index now holds an entry of another term
    /// lost its entry to a new leader: answered `Dropped` here. Membership
    /// changes stay here: their proposers are answered from the apply
    /// report, after Raft counts them applied.
    fn take_replies(&mut self, committed: &[Entry]) -> Vec<(LogIndex, Reply)> {
        let mut replies = Vec::new();
        if self.proposals.is_empty() {
            return replies;
        }
        for entry in committed {
            if !matches!(
                entry.payload,
                EntryPayload::Normal(_) | EntryPayload::Session { .. }
            ) {
                continue;
            }
            let Some((term, reply)) = self.proposals.remove(&entry.index) else {
                continue;
            };
            if term == entry.term {
                replies.push((entry.index, reply));
            } else {
                let _ = reply.send(Err(Error::Dropped(self.group)));
            }
        }
        replies
    }

    /// The apply thread applied up to `index`: resolve the proposals it did
    /// not answer itself: membership changes, proposals forwarded to the
    /// leader and waiting here for their request id, and (`Dropped`)
    /// proposals whose index now holds an empty entry or came with a
    /// snapshot.
    fn on_applied(&mut self, index: LogIndex, results: Vec<AppliedResult>) {
        self.raft.advance_apply(index);
        self.applied.publish(index);
        self.maybe_schedule_compaction(index);
        for applied in results {
            let result = applied.result;
            if let Some((term, reply)) = self.proposals.remove(&applied.index) {
                let outcome = if term == applied.term {
                    result.clone()
                } else {
                    Err(Error::Dropped(self.group))
                };
                let _ = reply.send(outcome);
            }
            if let Some(id) = applied.id {
                for waiter in self.waiting_ids.remove(&id).unwrap_or_default() {
                    let _ = waiter.reply.send(result.clone());
                }
            }
        }
        // Proposals at or below the applied index that no result answered:
        // overwritten, where the log holds another term there; otherwise a
        // snapshot covered them (compacted here, or its own index), and
        // they may have been applied.
        let group = self.group;
        let mut covered = false;
        while let Some(entry) = self.proposals.first_entry() {
            let at = *entry.key();
            if at > index {
                break;
            }
            let (term, reply) = entry.remove();
            let overwritten = self.raft.log_term(at).is_some_and(|held| held != term);
            covered |= !overwritten;
            let error = if overwritten {
                Error::Dropped(group)
            } else {
                Error::OutcomeUnknown(group)
            };
            let _ = reply.send(Err(error));
        }
        if covered {
            // A snapshot (see `drain_forwarded_for_snapshot`, which a
            // follower's install also calls).
            self.drain_forwarded_for_snapshot();
        }
    }

    /// Takes this group's readies: messages into the worker's outbox (sent
    /// at the end of the turn), persistence into the worker's batch,
    /// committed entries and reads to the apply thread.
    fn process_ready(
        &mut self,
        outbox: &mut Vec<(GroupId, Message)>,
        batch: &mut WriteBatch,
        readies: &mut Vec<(GroupId, u64)>,
        persisted: &mut Vec<(GroupId, Message)>,
    ) -> Result<(), String> {
        while self.raft.has_ready() {
            let mut ready = self
                .raft
                .ready()
                .map_err(|error| format!("raft: {error}"))?;
            let group = self.group;
            self.route_messages(std::mem::take(&mut ready.messages), outbox);
            if let Some(meta) = ready.snapshot.take() {
                self.stage_install(meta, ready.number, batch)?;
            }
            if let Some((meta, compact_to)) = self.pending_compaction.take() {
                batch.snapshot(self.group, meta);
                batch.compact(self.group, compact_to);
            }
            if !ready.entries.is_empty() {
                batch.entries(self.group, std::mem::take(&mut ready.entries));
            }
            if let Some(hard_state) = ready.hard_state {
                batch.hard_state(self.group, hard_state);
            }
            persisted.extend(
                std::mem::take(&mut ready.persisted_messages)
                    .into_iter()
                    .map(|message| (group, message)),
            );
            readies.push((self.group, ready.number));
            self.pending_install = None;
            if !ready.committed_entries.is_empty() {
                let committed = std::mem::take(&mut ready.committed_entries);
                let replies = self.take_replies(&committed);
                self.apply
                    .send(ApplyWork::Entries(self.group, committed, replies));
            }
            self.answer_read_states(std::mem::take(&mut ready.read_states));
            self.answer_refusals(
                std::mem::take(&mut ready.refused_reads),
                std::mem::take(&mut ready.refused_proposals),
            );
            if let Some(soft) = ready.soft_state {
                if soft.leader != self.known_leader {
                    self.on_leader_change(soft);
                }
            }
        }
        self.answer_proposals_cut_from_the_log();
        Ok(())
    }

    /// A ready's messages go to `outbox`, but for snapshot messages: a
    /// snapshot message leaves only with the state it stands for, which
    /// the apply thread copies first (see `Control::SnapshotReady`).
    fn route_messages(&mut self, messages: Vec<Message>, outbox: &mut Vec<(GroupId, Message)>) {
        let group = self.group;
        for message in messages {
            if let MessageBody::Snapshot { meta } = &message.body {
                self.snapshots_out
                    .insert(message.to, (meta.index, self.ticks));
                self.apply.send(ApplyWork::TakeSnapshot { group, message });
            } else {
                outbox.push((group, message));
            }
        }
    }

    /// Raft accepted the snapshot at `meta` in ready `number`: its data is
    /// kept for the install and the WAL batch records the install.
    fn stage_install(
        &mut self,
        meta: SnapshotMeta,
        number: u64,
        batch: &mut WriteBatch,
    ) -> Result<(), String> {
        let data = match self.pending_install.take() {
            Some((index, term, data)) if index == meta.index && term == meta.term => data,
            Some((index, term, _)) => {
                return Err(format!(
                    "the snapshot accepted at {} (term {}) came with the data of another, at {index} (term {})",
                    meta.index.0, meta.term.0, term.0
                ));
            }
            None => return Err("a snapshot was accepted without its data".into()),
        };
        // The order that survives a crash anywhere: the data is kept
        // durably, then the WAL records the install, then (`on_persisted`)
        // the state machine restores. A restart between the last two
        // restores from the kept copy.
        self.snapshots
            .keep_for_install(&data, self.group.0, meta.index.0)
            .map_err(|error| {
                format!(
                    "keep the snapshot at {} for its install: {error}",
                    meta.index.0
                )
            })?;
        self.compacted_at = meta.index;
        // A compaction planned against the old log would refuse the whole
        // batch: the install replaces that log.
        self.pending_compaction = None;
        batch.install_snapshot(self.group, meta.clone());
        self.installing = Some((number, meta, data));
        Ok(())
    }

    /// Confirmed read indexes: a query waits on the apply thread for its
    /// index; a caller that wanted the index alone gets it now.
    fn answer_read_states(&mut self, read_states: Vec<ReadState>) {
        for state in read_states {
            self.read_leaders.remove(&state.id);
            match self.reads.remove(&state.id) {
                Some(PendingRead::Query(query, reply)) => {
                    self.apply.send(ApplyWork::Read {
                        group: self.group,
                        index: state.index,
                        query,
                        reply,
                    });
                }
                Some(PendingRead::Index(reply)) => {
                    let _ = reply.send(Ok(state.index));
                }
                None => {}
            }
        }
    }

    /// Forwarded reads the receiver would not confirm, and forwarded
    /// proposals the leader did not append: their callers hear why now
    /// (and retry if that may help) instead of waiting out their timeout.
    fn answer_refusals(
        &mut self,
        refused_reads: Vec<(Vec<ReadId>, regatta_raft::Error)>,
        refused_proposals: Vec<(Vec<RequestId>, regatta_raft::Error)>,
    ) {
        let group = self.group;
        for (ids, source) in refused_reads {
            for id in ids {
                self.read_leaders.remove(&id);
                if let Some(read) = self.reads.remove(&id) {
                    read.fail(Error::Raft {
                        group,
                        source: source.clone(),
                    });
                }
            }
        }
        for (ids, source) in refused_proposals {
            for id in ids {
                for waiter in self.waiting_ids.remove(&id).unwrap_or_default() {
                    let source = source.clone();
                    let _ = waiter.reply.send(Err(Error::Raft { group, source }));
                }
            }
        }
    }

    /// The group's leader changed (once per change: elections, moves and
    /// losses of quorum can be read from the log). Reads and forwarded
    /// proposals that went to another node may never be answered; their
    /// callers hear `NotLeader` and retry.
    fn on_leader_change(&mut self, soft: SoftState) {
        tracing::info!(
            group = self.group.0,
            leader = ?soft.leader.map(|leader| leader.0),
            role = ?soft.role,
            "group leader changed"
        );
        self.known_leader = soft.leader;
        // A read forwarded to (or confirmed by) the old leader may never be
        // answered; its caller retries with the new one. A read already
        // forwarded to the new leader (asked in the same turn as the
        // message that made it known) waits for its answer, or for its
        // resend if that was lost.
        let read_leaders = std::mem::take(&mut self.read_leaders);
        for (id, read) in std::mem::take(&mut self.reads) {
            match read_leaders.get(&id) {
                Some(asked) if soft.leader == Some(*asked) => {
                    self.reads.insert(id, read);
                    self.read_leaders.insert(id, *asked);
                }
                _ => read.fail(Error::NotLeader {
                    group: self.group,
                    leader_hint: soft.leader,
                }),
            }
        }
        // So may a proposal forwarded to the old leader (it dies with the
        // leader unless it was replicated). Its caller retries under the
        // same request id, which the session table applies at most once,
        // without waiting out its timeout.
        for (_, replies) in self.waiting_ids.drain() {
            for waiter in replies {
                let _ = waiter.reply.send(Err(Error::NotLeader {
                    group: self.group,
                    leader_hint: soft.leader,
                }));
            }
        }
    }

    /// Proposals past the end of this node's log: another leader's append
    /// cut their entries (a log is cut where it conflicts with the
    /// leader's, and everything after goes). Nothing in this log will
    /// answer them; a node that received an entry before may still hold
    /// it, so their callers hear `OutcomeUnknown` (retry under the same
    /// request id) now, not at their timeout.
    fn answer_proposals_cut_from_the_log(&mut self) {
        let last = self.raft.last_index();
        if self
            .proposals
            .last_key_value()
            .is_none_or(|(index, _)| *index <= last)
        {
            return;
        }
        for (_, (_, reply)) in self.proposals.split_off(&LogIndex(last.0 + 1)) {
            let _ = reply.send(Err(Error::OutcomeUnknown(self.group)));
        }
    }

    /// Fails the callers of forwarded proposals and reads that never
    /// reached `peer` (or may not have); they retry at once. A caller
    /// whose request went to another node since is left waiting.
    fn fail_forwarded(
        &mut self,
        peer: NodeId,
        proposals: &[RequestId],
        reads: &[ReadId],
        error: &Error,
    ) {
        for id in proposals {
            let Some(waiters) = self.waiting_ids.get_mut(id) else {
                continue;
            };
            let (failed, kept): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(waiters)
                .into_iter()
                .partition(|w| w.peer == peer);
            *waiters = kept;
            if waiters.is_empty() {
                self.waiting_ids.remove(id);
            }
            for waiter in failed {
                let _ = waiter.reply.send(Err(error.clone()));
            }
        }
        for id in reads {
            self.read_leaders.remove(id);
            if let Some(read) = self.reads.remove(id) {
                read.fail(error.clone());
            }
        }
    }

    fn fail_all(&mut self, reason: String) {
        let group = self.group;
        let error = || Error::GroupStopped {
            group,
            reason: reason.clone(),
        };
        for (_, (_, reply)) in std::mem::take(&mut self.proposals) {
            let _ = reply.send(Err(error()));
        }
        for (_, read) in std::mem::take(&mut self.reads) {
            read.fail(error());
        }
        for (_, replies) in std::mem::take(&mut self.waiting_ids) {
            for waiter in replies {
                let _ = waiter.reply.send(Err(error()));
            }
        }
        // Reads already handed to the apply thread wait there for their
        // index; the state machine goes too.
        self.apply.send(ApplyWork::Unregister { group, reason });
    }
}

/// One group's state machine inside its worker's apply thread.
struct Applier {
    /// The group run it belongs to; every report names it.
    incarnation: u64,
    state_machine: Box<dyn StateMachine>,
    applied: LogIndex,
    /// Published before proposers are answered.
    published: AppliedSink,
    waiting: Vec<(LogIndex, Bytes, Reply)>,
    sessions: SessionTable,
}

/// What every apply thread shares.
struct ApplyContext {
    control: mpsc::UnboundedSender<Control>,
    sessions: SnapshotStore,
    snapshots: SnapshotDir,
    session_expiry_entries: u64,
    /// Runs snapshot writes on its blocking pool.
    runtime: tokio::runtime::Handle,
    /// To the worker's answer task.
    answers: mpsc::UnboundedSender<Answers>,
    /// To this apply thread, for restores that ran elsewhere; weak, so
    /// that the thread still ends when its worker goes.
    work: mpsc::WeakUnboundedSender<Vec<ApplyWork>>,
}

/// Applies committed entries in order for every group of a worker, and
/// serves reads once their index is applied. Everything queued is handled
/// per wake-up; each touched group gets one `Applied` report. Runs on a
/// thread of its own until the worker's side of `work` is gone.
fn apply_loop(mut work: mpsc::UnboundedReceiver<Vec<ApplyWork>>, context: ApplyContext) {
    let mut appliers: FxHashMap<GroupId, Applier> = FxHashMap::default();
    let mut reports: BTreeMap<GroupId, Vec<AppliedResult>> = BTreeMap::new();
    let mut answers: Answers = Vec::new();
    // Groups whose restore runs on a blocking thread, with their work
    // that came meanwhile, in order.
    let mut restoring: FxHashMap<GroupId, Vec<ApplyWork>> = FxHashMap::default();
    while let Some(first) = work.blocking_recv() {
        let mut turns = vec![first];
        while let Ok(turn) = work.try_recv() {
            turns.push(turn);
        }
        for item in turns.into_iter().flatten() {
            let (group, what) = item.describe();
            let started = std::time::Instant::now();
            let mut state = ApplyState {
                appliers: &mut appliers,
                reports: &mut reports,
                answers: &mut answers,
                restoring: &mut restoring,
            };
            apply_or_defer(item, &mut state, &context);
            let took = started.elapsed();
            if took >= SLOW_APPLY_WARNING {
                tracing::warn!(
                    group = group.0,
                    took_ms = took.as_millis() as u64,
                    "{what} took long; the group's applies waited for the state machine (is its storage stalled or overloaded?)"
                );
            }
        }
        let mut applied = Vec::with_capacity(reports.len());
        for (group, results) in std::mem::take(&mut reports) {
            let Some(applier) = appliers.get_mut(&group) else {
                continue;
            };
            let index = applier.applied;
            applied.push(GroupApplied {
                group,
                incarnation: applier.incarnation,
                index,
                results,
            });
            let (ready, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut applier.waiting)
                .into_iter()
                .partition(|(read_index, _, _)| *read_index <= index);
            applier.waiting = waiting;
            for (_, query, reply) in ready {
                answers.push((reply, Ok(applier.state_machine.read(&query))));
            }
        }
        if !applied.is_empty() {
            let _ = context.control.send(Control::Applied(applied));
        }
        if !answers.is_empty() {
            let _ = context.answers.send(std::mem::take(&mut answers));
        }
    }
}

/// Consecutive commands chosen for the state machine, applied as one
/// batch.
#[derive(Default)]
struct Run {
    commands: Vec<(LogIndex, Bytes)>,
    /// Per command: its term and, for a session command, its id.
    origins: Vec<(Term, Option<RequestId>)>,
}

/// Applies the commands gathered so far as one batch, records the results
/// of session commands, and clears the run.
fn apply_run(
    applier: &mut Applier,
    run: &mut Run,
    results: &mut Vec<AppliedResult>,
) -> Result<(), String> {
    let Some(&(last, _)) = run.commands.last() else {
        return Ok(());
    };
    let answers = applier
        .state_machine
        .apply_batch(&run.commands)
        .map_err(|error| format!("the state machine failed to apply: {error}"))?;
    assert_eq!(
        answers.len(),
        run.commands.len(),
        "StateMachine::apply_batch must return one result per command"
    );
    for (((index, _), (term, id)), answer) in run.commands.iter().zip(&run.origins).zip(answers) {
        if let Some(id) = id {
            applier.sessions.complete(id.client, *index, answer.clone());
        }
        results.push(AppliedResult {
            index: *index,
            term: *term,
            id: *id,
            result: Ok(answer),
        });
    }
    applier.applied = applier.applied.max(last);
    run.commands.clear();
    run.origins.clear();
    Ok(())
}

/// The answer to a session command that is not applied again.
fn not_applied_again(group: GroupId, id: RequestId, verdict: Verdict) -> Result<Bytes, Error> {
    match verdict {
        Verdict::Duplicate(Outcome::Known(result)) => Ok(result),
        Verdict::Stale { last } => Err(Error::StaleRequest {
            group,
            client: id.client,
            sequence: id.sequence,
            last,
        }),
        _ => Err(Error::AlreadyApplied {
            group,
            client: id.client,
            sequence: id.sequence,
        }),
    }
}

/// Applies committed entries: commands in runs, each session command only
/// if its request was not applied before.
fn apply_entries(
    group: GroupId,
    applier: &mut Applier,
    entries: &[Entry],
    results: &mut Vec<AppliedResult>,
    session_expiry_entries: u64,
) -> Result<(), String> {
    let mut run = Run::default();
    for entry in entries {
        match &entry.payload {
            EntryPayload::Normal(command) => {
                run.commands.push((entry.index, command.clone()));
                run.origins.push((entry.term, None));
                applier.sessions.advance(entry.index);
            }
            EntryPayload::Session { id, command } => {
                let mut verdict = applier.sessions.check(*id);
                if verdict == Verdict::Flush {
                    // A retry of a command in this very run: its result
                    // comes from applying the run.
                    apply_run(applier, &mut run, results)?;
                    verdict = applier.sessions.check(*id);
                }
                if verdict == Verdict::Apply {
                    applier.sessions.expire(entry.index, session_expiry_entries);
                    applier.sessions.record(*id, entry.index, Outcome::Pending);
                    run.commands.push((entry.index, command.clone()));
                    run.origins.push((entry.term, Some(*id)));
                    continue;
                }
                assert_ne!(
                    verdict,
                    Verdict::Flush,
                    "a flushed run leaves nothing pending"
                );
                results.push(AppliedResult {
                    index: entry.index,
                    term: entry.term,
                    id: Some(*id),
                    result: not_applied_again(group, *id, verdict),
                });
                applier.applied = applier.applied.max(entry.index);
            }
            EntryPayload::ConfChange(_) | EntryPayload::Empty => {
                apply_run(applier, &mut run, results)?;
                // A membership change resolves its proposer when applied.
                if let EntryPayload::ConfChange(_) = &entry.payload {
                    results.push(AppliedResult {
                        index: entry.index,
                        term: entry.term,
                        id: None,
                        result: Ok(Bytes::new()),
                    });
                }
                applier.applied = applier.applied.max(entry.index);
            }
        }
    }
    apply_run(applier, &mut run, results)?;
    // Entries after the last command: the state machine's index follows.
    if applier.applied > applier.state_machine.applied_index() {
        applier
            .state_machine
            .skip_to(applier.applied)
            .map_err(|error| format!("the state machine failed to record its index: {error}"))?;
    }
    Ok(())
}

/// Answers proposers whose group stopped on this node (their entries may
/// or may not be applied: the outcome is unknown to them).
fn answer_stopped(group: GroupId, reason: &str, replies: Vec<(LogIndex, Reply)>) {
    for (_, reply) in replies {
        let _ = reply.send(Err(Error::GroupStopped {
            group,
            reason: reason.to_string(),
        }));
    }
}

/// Answers each proposer (listed in index order) with the result of its
/// entry. Results are not in index order: a retry's known result is
/// reported before the run around it is applied. A proposer without a
/// result (not expected: its entry is one of its commands) gets `Dropped`.
fn answer_proposers(
    group: GroupId,
    results: &[AppliedResult],
    replies: Vec<(LogIndex, Reply)>,
    answers: &mut Answers,
) {
    if replies.is_empty() {
        return;
    }
    // Almost always in order already: sort (and allocate) only when not.
    if results.is_sorted_by_key(|applied| applied.index) {
        match_replies(group, results.iter(), replies, answers);
    } else {
        let mut sorted: Vec<&AppliedResult> = results.iter().collect();
        sorted.sort_unstable_by_key(|applied| applied.index);
        match_replies(group, sorted.into_iter(), replies, answers);
    }
}

/// Pairs proposers and results, both in index order.
fn match_replies<'a>(
    group: GroupId,
    sorted: impl Iterator<Item = &'a AppliedResult>,
    replies: Vec<(LogIndex, Reply)>,
    answers: &mut Answers,
) {
    let mut sorted = sorted.peekable();
    for (index, reply) in replies {
        while sorted.next_if(|applied| applied.index < index).is_some() {}
        let answer = match sorted.next_if(|applied| applied.index == index) {
            Some(applied) => applied.result.clone(),
            None => Err(Error::Dropped(group)),
        };
        answers.push((reply, answer));
    }
}

/// Writes the session table to its file (fsynced, atomically replaced).
fn save_sessions(
    store: &SnapshotStore,
    group: GroupId,
    table: &SessionTable,
) -> Result<LogIndex, Error> {
    let failed = |error: regatta_wal::Error| {
        Error::State(format!(
            "save the session table of group {}: {error}",
            group.0
        ))
    };
    // The file's term and membership are unused: only the index matters.
    let meta = SnapshotMeta {
        index: table.index(),
        ..SnapshotMeta::default()
    };
    let mut writer = store.writer(group, &meta).map_err(failed)?;
    writer.write(&table.encode()).map_err(failed)?;
    writer.finish().map_err(failed)?;
    Ok(table.index())
}

/// The session table of `group` as of the state machine's `applied`
/// index: the saved table, then the session commands of the WAL's entries
/// up to `applied` (not applied again, so their results are unknown).
/// Entries after `applied` are applied as usual and complete the table.
fn load_sessions(
    store: &SnapshotStore,
    wal: &Wal,
    group: GroupId,
    applied: LogIndex,
    expiry_entries: u64,
) -> Result<SessionTable, Error> {
    // A table ahead of the state machine means the state machine lost
    // entries (it keeps its state in memory): they are applied again, and
    // rebuild the table as they go.
    let saved = saved_sessions(store, group)?.filter(|table| table.index() <= applied);
    rebuild_sessions(saved, wal, group, applied, expiry_entries)
}

/// The group's session table as last saved, if any.
fn saved_sessions(store: &SnapshotStore, group: GroupId) -> Result<Option<SessionTable>, Error> {
    let failed = |what: String| Error::State(format!("group {}: {what}", group.0));
    let Some(file) = store.latest(group).map_err(|e| failed(e.to_string()))? else {
        return Ok(None);
    };
    let mut bytes = Vec::new();
    file.data()
        .and_then(|mut data| {
            data.read_to_end(&mut bytes)
                .map_err(|e| regatta_wal::Error::io("read the session table", e))
        })
        .map_err(|e| failed(e.to_string()))?;
    let table = SessionTable::decode(&Bytes::from(bytes))
        .map_err(|e| failed(format!("session table: {}", e.0)))?;
    Ok(Some(table))
}

/// Brings `saved` (or, without one, an empty table at the start of the
/// log) up to `upto` by replaying the WAL's session entries the way the
/// apply thread does.
fn rebuild_sessions(
    saved: Option<SessionTable>,
    wal: &Wal,
    group: GroupId,
    upto: LogIndex,
    expiry_entries: u64,
) -> Result<SessionTable, Error> {
    let failed = |what: String| Error::State(format!("group {}: {what}", group.0));
    let first_index = wal.first_index(group);
    let mut table =
        saved.unwrap_or_else(|| SessionTable::new(LogIndex(first_index.0.saturating_sub(1))));
    let mut low = LogIndex(table.index().0 + 1).max(first_index);
    while low <= upto {
        let entries = wal
            .entries(group, low, LogIndex(upto.0 + 1), 4 << 20)
            .map_err(|e| failed(format!("read the log to rebuild the session table: {e}")))?;
        let Some(last) = entries.last().map(|entry| entry.index) else {
            break;
        };
        for entry in &entries {
            admit_session_entry(&mut table, entry, expiry_entries);
        }
        low = LogIndex(last.0 + 1);
    }
    table.advance(upto);
    Ok(table)
}

/// The apply thread's rule, replayed: whether the state machine applies
/// `entry`'s command (a session command only the first time its request
/// appears), recording it in `table`.
fn admit_session_entry(table: &mut SessionTable, entry: &Entry, expiry_entries: u64) -> bool {
    let EntryPayload::Session { id, .. } = &entry.payload else {
        return true;
    };
    if table.check(*id) != Verdict::Apply {
        return false;
    }
    table.expire(entry.index, expiry_entries);
    table.record(*id, entry.index, Outcome::Unknown);
    true
}

/// Tells, for each entry of a group's log in order, whether the state
/// machine applied its command: a retried request's second entry, and a
/// stale one, are in the log but never applied. Whoever ships the log to
/// a copy of the state machine elsewhere (cross-location replication)
/// must drop what this refuses, or the copy applies a retry twice.
pub struct SessionFilter {
    table: SessionTable,
    expiry_entries: u64,
}

impl SessionFilter {
    /// Whether the state machine applied the command of `entry`, the entry
    /// after the last one given (or after the filter's start).
    pub fn admits(&mut self, entry: &Entry) -> bool {
        assert!(
            entry.index > self.table.index(),
            "entries reach a session filter in order: {} after {}",
            entry.index,
            self.table.index()
        );
        let admitted = admit_session_entry(&mut self.table, entry, self.expiry_entries);
        self.table.advance(entry.index);
        admitted
    }
}

/// What the apply thread keeps across its work items.
struct ApplyState<'a> {
    appliers: &'a mut FxHashMap<GroupId, Applier>,
    reports: &'a mut BTreeMap<GroupId, Vec<AppliedResult>>,
    answers: &'a mut Answers,
    /// Groups whose restore runs on a blocking thread, with their work
    /// that came meanwhile, in order.
    restoring: &'a mut FxHashMap<GroupId, Vec<ApplyWork>>,
}

/// Does one piece of apply work, or queues it behind its group's restore.
fn apply_or_defer(item: ApplyWork, state: &mut ApplyState<'_>, context: &ApplyContext) {
    let (group, _) = item.describe();
    if state.restoring.contains_key(&group) && !matches!(item, ApplyWork::Restored { .. }) {
        if let Some(queued) = state.restoring.get_mut(&group) {
            queued.push(item);
        }
        return;
    }
    match item {
        ApplyWork::Register(group, incarnation, state_machine, sessions, published) => {
            let applied = state_machine.applied_index();
            state.appliers.insert(
                group,
                Applier {
                    incarnation,
                    state_machine,
                    applied,
                    published,
                    waiting: Vec::new(),
                    sessions,
                },
            );
        }
        ApplyWork::Unregister { group, reason } => unregister(group, reason, state),
        ApplyWork::Entries(group, entries, replies) => {
            apply_committed(group, &entries, replies, state, context);
        }
        ApplyWork::SaveSessions(group) => {
            if let Some(applier) = state.appliers.get_mut(&group) {
                save_applier_sessions(group, applier, context);
            }
        }
        ApplyWork::TakeSnapshot { group, message } => {
            if let Some(applier) = state.appliers.get_mut(&group) {
                take_snapshot(group, applier, message, context);
            }
        }
        ApplyWork::Restore { group, meta, data } => {
            start_restore(group, meta, data, state, context);
        }
        ApplyWork::Restored {
            group,
            applier,
            meta,
            took,
            result,
        } => {
            finish_restore(group, *applier, (meta, took, result), state, context);
            // The group's work that waited, in order; a restore among it
            // makes the rest wait again.
            for queued in state.restoring.remove(&group).unwrap_or_default() {
                apply_or_defer(queued, state, context);
            }
        }
        ApplyWork::Read {
            group,
            index,
            query,
            reply,
        } => read_at(group, (index, query, reply), state),
    }
}

/// Drops a group's state machine; the reads waiting on it fail.
fn unregister(group: GroupId, reason: String, state: &mut ApplyState<'_>) {
    if let Some(applier) = state.appliers.remove(&group) {
        for (_, _, reply) in applier.waiting {
            let _ = reply.send(Err(Error::GroupStopped {
                group,
                reason: reason.clone(),
            }));
        }
    }
    state.reports.remove(&group);
}

/// Serves a read once its index is applied: now, or when the apply that
/// reaches it reports.
fn read_at(
    group: GroupId,
    (index, query, reply): (LogIndex, Bytes, Reply),
    state: &mut ApplyState<'_>,
) {
    let Some(applier) = state.appliers.get_mut(&group) else {
        return;
    };
    if index <= applier.applied {
        let answer = applier.state_machine.read(&query);
        state.answers.push((reply, Ok(answer)));
    } else {
        applier.waiting.push((index, query, reply));
    }
}

/// Applies committed entries of `group` and queues its proposers'
/// answers; a failed apply stops the group.
fn apply_committed(
    group: GroupId,
    entries: &[Entry],
    replies: Vec<(LogIndex, Reply)>,
    state: &mut ApplyState<'_>,
    context: &ApplyContext,
) {
    let ApplyState {
        appliers,
        reports,
        answers,
        ..
    } = state;
    let Some(applier) = appliers.get_mut(&group) else {
        let reason = format!("group {} was removed from this node", group.0);
        answer_stopped(group, &reason, replies);
        return;
    };
    let results = reports.entry(group).or_default();
    let reported = results.len();
    let applied = apply_entries(
        group,
        applier,
        entries,
        results,
        context.session_expiry_entries,
    );
    if let Err(reason) = applied {
        answer_stopped(group, &reason, replies);
        stop_applier(group, reason, appliers, reports, context);
        return;
    }
    // Counted before answered: whoever hears of a write can find it in the
    // applied index (`NodeHost::applied_index_watch`).
    if applier.published.publish(applier.applied) {
        answer_proposers(group, &results[reported..], replies, answers);
    } else {
        // The worker stopped the group meanwhile and answered all its
        // other proposers so.
        answer_stopped(group, "the group stopped on this node", replies);
    }
}

/// Makes the state machine durable, then saves the session table, and
/// tells the worker at which index (so that it may compact up to it).
fn save_applier_sessions(group: GroupId, applier: &mut Applier, context: &ApplyContext) {
    let synced = applier.state_machine.sync().map_err(|error| {
        Error::State(format!(
            "make the state machine of group {} durable: {error}",
            group.0
        ))
    });
    let saved = synced.and_then(|()| save_sessions(&context.sessions, group, &applier.sessions));
    let (index, result) = match saved {
        Ok(index) => (index, Ok(())),
        Err(error) => (LogIndex(0), Err(error)),
    };
    let _ = context.control.send(Control::SessionsSaved {
        group,
        incarnation: applier.incarnation,
        index,
        result,
    });
}

/// Copies the state for a snapshot message here, at the applied index;
/// writing it out happens on a blocking thread while the apply thread
/// goes on, and the worker sends the message once it is written.
fn take_snapshot(group: GroupId, applier: &mut Applier, message: Message, context: &ApplyContext) {
    let source = applier.state_machine.snapshot();
    let table = applier.sessions.encode();
    let index = applier.applied;
    let incarnation = applier.incarnation;
    let control = context.control.clone();
    let snapshots = context.snapshots.clone();
    context.runtime.spawn_blocking(move || {
        let data = write_snapshot(&snapshots, &table, source)
            .map_err(|error| format!("write the snapshot at {}: {error}", index.0));
        let _ = control.send(Control::SnapshotReady {
            group,
            incarnation,
            message,
            index,
            data,
        });
    });
}

/// Starts installing a snapshot from the leader into the group's state
/// machine, on a blocking thread that takes the group's applier along:
/// the apply thread's other groups go on meanwhile (a large install takes
/// seconds), and the group's own work waits in `ApplyState::restoring`
/// until `ApplyWork::Restored` brings the applier back.
fn start_restore(
    group: GroupId,
    meta: SnapshotMeta,
    data: SnapshotData,
    state: &mut ApplyState<'_>,
    context: &ApplyContext,
) {
    let Some(mut applier) = state.appliers.remove(&group) else {
        return;
    };
    state.restoring.insert(group, Vec::new());
    let sessions = context.sessions.clone();
    let back = context.work.clone();
    // Held until the restore ends: the host's `stop` waits for the answer
    // task, hence for the state machine to be left alone.
    let answers = context.answers.clone();
    context.runtime.spawn_blocking(move || {
        let started = std::time::Instant::now();
        let result = restore_applier(group, &meta, &data, &mut applier, &sessions);
        let restored = ApplyWork::Restored {
            group,
            applier: Box::new(applier),
            meta,
            took: started.elapsed(),
            result,
        };
        // Without the apply thread (its host stopped), the applier drops.
        if let Some(back) = back.upgrade() {
            let _ = back.send(vec![restored]);
        }
        drop(answers);
    });
}

/// Replaces the applier's state with the snapshot in `data`.
///
/// The snapshot's session table is durable before the state machine holds
/// the snapshot. In the other order, a crash between the two would
/// restart with the state machine at the snapshot (no gap, so the copy is
/// deleted) and the old session table: request ids applied before the
/// snapshot would be unknown here, and a retry of one applied again on
/// this replica alone. A crash after the save and before the restore
/// leaves a gap, which `finish_install` closes from the kept copy.
fn restore_applier(
    group: GroupId,
    meta: &SnapshotMeta,
    data: &SnapshotData,
    applier: &mut Applier,
    store: &SnapshotStore,
) -> Result<(), String> {
    let (mut sessions, mut state) = read_snapshot(data)?;
    sessions.advance(meta.index);
    save_sessions(store, group, &sessions).map_err(|error| error.to_string())?;
    applier
        .state_machine
        .restore(meta.index, &mut state)
        .map_err(|error| format!("the state machine's restore failed: {error}"))?;
    applier.sessions = sessions;
    applier.applied = meta.index;
    Ok(())
}

/// The group's applier is back from its restore: a restored group
/// publishes its new applied index (waiting reads go on), and a failed
/// install stops the group.
fn finish_restore(
    group: GroupId,
    applier: Applier,
    (meta, took, result): (SnapshotMeta, Duration, Result<(), String>),
    state: &mut ApplyState<'_>,
    context: &ApplyContext,
) {
    state.appliers.insert(group, applier);
    match result {
        Ok(()) => {
            tracing::info!(
                group = group.0,
                index = meta.index.0,
                term = meta.term.0,
                took_ms = took.as_millis() as u64,
                "installed a snapshot from the leader"
            );
            // The state machine holds it durably: its copy goes.
            if let Err(error) = context
                .snapshots
                .remove_installs(group.0, meta.index.0, None)
            {
                tracing::warn!(group = group.0, %error, "cannot delete an installed snapshot's copy; the next start retries");
            }
            state.reports.entry(group).or_default();
        }
        Err(reason) => {
            let reason = format!("cannot install the snapshot at {}: {reason}", meta.index.0);
            tracing::error!(group = group.0, "{reason}; the group stops");
            stop_applier(group, reason, state.appliers, state.reports, context);
        }
    }
}

/// The apply thread cannot go on with `group`: its waiting reads fail, and
/// the worker stops the group.
fn stop_applier(
    group: GroupId,
    reason: String,
    appliers: &mut FxHashMap<GroupId, Applier>,
    reports: &mut BTreeMap<GroupId, Vec<AppliedResult>>,
    context: &ApplyContext,
) {
    reports.remove(&group);
    // Callers stop a group whose applier they just used; were it gone,
    // so would be the run it could report on (its `Failed` needs the
    // run's incarnation).
    let Some(applier) = appliers.remove(&group) else {
        return;
    };
    for (_, _, reply) in applier.waiting {
        let _ = reply.send(Err(Error::GroupStopped {
            group,
            reason: reason.clone(),
        }));
    }
    let _ = context.control.send(Control::Failed {
        group,
        incarnation: applier.incarnation,
        reason,
    });
}

/// Writes a snapshot's data to a new file: the session table's length
/// (u32) and encoding, then the state machine's stream
/// (`docs/transport-format.md`).
fn write_snapshot(
    snapshots: &SnapshotDir,
    table: &[u8],
    source: Box<dyn SnapshotSource>,
) -> std::io::Result<SnapshotData> {
    let (file, pending) = snapshots.create()?;
    let mut out = CountingWriter {
        inner: std::io::BufWriter::new(file),
        written: 0,
    };
    let table_len = u32::try_from(table.len())
        .map_err(|_| std::io::Error::other("the session table is over 4 GiB"))?;
    out.write_all(&table_len.to_le_bytes())?;
    out.write_all(table)?;
    source.write_to(&mut out)?;
    out.flush()?;
    Ok(pending.finish(out.written))
}

/// Counts what goes through it.
struct CountingWriter<W> {
    inner: W,
    written: u64,
}

impl<W: std::io::Write> std::io::Write for CountingWriter<W> {
    fn write(&mut self, buffer: &[u8]) -> std::io::Result<usize> {
        let written = self.inner.write(buffer)?;
        self.written += written as u64;
        Ok(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Whether a snapshot's data opens: its session table's length fits the
/// data and the table decodes. A transport checks data from the network
/// with it before delivering: a snapshot that Raft accepted and the apply
/// thread then could not open would stop the group on this node for good.
pub(crate) fn check_snapshot_data(data: &SnapshotData) -> Result<(), String> {
    read_snapshot(data).map(|_| ())
}

/// Opens a snapshot's data: the session table, and a reader positioned at
/// the state machine's stream, limited to the file's announced length.
fn read_snapshot(
    data: &SnapshotData,
) -> Result<
    (
        SessionTable,
        std::io::Take<std::io::BufReader<std::fs::File>>,
    ),
    String,
> {
    let file = data
        .open()
        .map_err(|error| format!("open {}: {error}", data.path().display()))?;
    let mut reader = std::io::BufReader::new(file);
    let mut length = [0u8; 4];
    reader
        .read_exact(&mut length)
        .map_err(|_| "the snapshot is shorter than its session table's length".to_string())?;
    let table_len = u64::from(u32::from_le_bytes(length));
    let state_len = data.len().checked_sub(4 + table_len).ok_or_else(|| {
        format!(
            "the session table needs {table_len} bytes, the snapshot has {}",
            data.len()
        )
    })?;
    let mut table = vec![0u8; table_len as usize];
    reader
        .read_exact(&mut table)
        .map_err(|error| format!("read the session table: {error}"))?;
    let sessions = SessionTable::decode(&Bytes::from(table))
        .map_err(|error| format!("session table: {}", error.0))?;
    Ok((sessions, reader.take(state_len)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_whose_caller_gave_up_is_abandoned() {
        let (reply, answer) = oneshot::channel();
        let read = PendingRead::Index(reply);
        assert!(!read.is_abandoned());
        drop(answer);
        assert!(read.is_abandoned());
        let (reply, answer) = oneshot::channel();
        let read = PendingRead::Query(Bytes::from_static(b"q"), reply);
        assert!(!read.is_abandoned());
        drop(answer);
        assert!(read.is_abandoned());
    }

    #[test]
    fn apply_work_of_a_turn_leaves_in_one_hand_over_in_order() {
        let (sender, mut receiver) = mpsc::unbounded_channel();
        let outbox = ApplyOutbox::new(sender);
        for group in [3, 1, 2] {
            outbox.send(ApplyWork::SaveSessions(GroupId(group)));
        }
        assert!(
            receiver.try_recv().is_err(),
            "queued work waits for the flush"
        );
        outbox.flush().expect("the receiver is open");
        let turn = receiver.try_recv().expect("one hand-over");
        let groups: Vec<u64> = turn.iter().map(|work| work.describe().0 .0).collect();
        assert_eq!(groups, vec![3, 1, 2]);
        outbox.flush().expect("the receiver is open");
        assert!(receiver.try_recv().is_err(), "an empty turn sends nothing");
        outbox
            .send_now(ApplyWork::Unregister {
                group: GroupId(7),
                reason: String::new(),
            })
            .expect("the receiver is open");
        assert_eq!(receiver.try_recv().expect("sent at once").len(), 1);
        drop(receiver);
        assert!(outbox
            .send_now(ApplyWork::Unregister {
                group: GroupId(8),
                reason: String::new(),
            })
            .is_err());
    }

    fn result(index: u64, text: &'static str) -> AppliedResult {
        AppliedResult {
            index: LogIndex(index),
            term: Term(1),
            id: None,
            result: Ok(Bytes::from_static(text.as_bytes())),
        }
    }

    /// A retry's known result is reported before the run around it is
    /// applied: results out of index order still reach their proposers,
    /// and a proposer without a result hears `Dropped`, not silence.
    #[test]
    fn proposers_get_their_own_results_in_any_order() {
        let in_order = [result(4, "four"), result(5, "five"), result(6, "six")];
        let out_of_order = [result(6, "six"), result(4, "four"), result(5, "five")];
        for results in [in_order, out_of_order] {
            check_answers(&results);
        }
    }

    fn check_answers(results: &[AppliedResult]) {
        let (replies, answers): (Vec<_>, Vec<_>) = [4u64, 6, 7]
            .into_iter()
            .map(|index| {
                let (reply, answer) = oneshot::channel();
                ((LogIndex(index), reply), answer)
            })
            .unzip();
        let mut sent = Vec::new();
        answer_proposers(GroupId(1), results, replies, &mut sent);
        for (reply, answer) in sent {
            let _ = reply.send(answer);
        }
        let answers: Vec<_> = answers
            .into_iter()
            .map(|mut answer| answer.try_recv().expect("answered"))
            .collect();
        assert_eq!(answers[0].as_deref().ok(), Some(&b"four"[..]));
        assert_eq!(answers[1].as_deref().ok(), Some(&b"six"[..]));
        assert!(matches!(answers[2], Err(Error::Dropped(GroupId(1)))));
    }
}
