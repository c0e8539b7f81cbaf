//! [`NodeHost`]: runs many Raft groups on one node. Each group is an actor
//! (a tokio task) that owns its `RaftNode`; an apply task per group owns the
//! state machine, so applying never blocks the Raft loop.
//!
//! The actor's loop: handle every queued input (peer messages, proposals,
//! reads, ticks, persistence and apply completions), then take the `Ready`:
//! 1. `messages` go to the transport at once: a leader's appends leave
//!    before its own fsync (pipelining);
//! 2. snapshot, entries and hard state go to the shared WAL in one
//!    `WriteBatch` (group commit across groups); its completion comes back
//!    as a control message, and only then are `persisted_messages` sent;
//! 3. committed entries go to the apply task, which resolves proposals with
//!    the state machine's result and serves reads once their index is
//!    applied.
//!
//! Not built yet (see `docs/multiraft.md`): TCP transport, snapshot
//! streaming, automatic compaction, quiescence, forwarding of proposals
//! from followers with request ids.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use regatta_raft::{
    Config, Entry, EntryPayload, LogIndex, Message, MessageBody, NodeId, Proposed, RaftNode,
    ReadId, Role, Status, Term,
};
use regatta_wal::{GroupId, Wal, WriteBatch};
use tokio::sync::{mpsc, oneshot};

use crate::error::Error;
use crate::storage::GroupStorage;
use crate::transport::Transport;

/// An application state machine, one per group.
pub trait StateMachine: Send + 'static {
    /// Applies one committed command; returns its result for the proposer.
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes;
    /// Serves a read from the local state.
    fn read(&self, query: &Bytes) -> Bytes;
    /// The highest index applied (persisted with the data by real state
    /// machines, so that a restart does not apply an entry twice).
    fn applied_index(&self) -> LogIndex;
}

/// Configuration of a host. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct HostConfig {
    /// This node.
    pub node_id: NodeId,
    /// Wall-clock length of one Raft tick. Default 10 ms.
    pub tick_interval: Duration,
    /// Requests queued per group before callers get `Busy`. Default 4096.
    pub group_inbox_max: usize,
    /// A group with no activity (proposals, reads, log growth, messages
    /// other than heartbeats) for this many ticks stops ticking until
    /// something arrives; 0 never quiesces. Default 200 (2 s at 10 ms).
    pub quiesce_after_ticks: u64,
    /// The Raft settings every group starts from (id, applied index and
    /// initial voters are filled in per group).
    pub raft: Config,
}

impl HostConfig {
    /// Defaults for node `id`.
    pub fn new(node_id: NodeId) -> HostConfig {
        HostConfig {
            node_id,
            tick_interval: Duration::from_millis(10),
            group_inbox_max: 4096,
            quiesce_after_ticks: 200,
            raft: Config::new(node_id),
        }
    }
}

type Reply = oneshot::Sender<Result<Bytes, Error>>;

/// Requests from clients and peers, bounded by `group_inbox_max`.
enum Input {
    Message(Message),
    Propose {
        command: Bytes,
        reply: Reply,
    },
    Read {
        query: Bytes,
        reply: Reply,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    Campaign,
    /// Resume ticking: a peer was lost, so a leader may be gone.
    Wake,
}

/// Completions from the WAL and the apply task; unbounded, because losing
/// one would stall the group.
enum Control {
    Persisted {
        number: u64,
        result: Result<(), regatta_wal::Error>,
    },
    Applied {
        index: LogIndex,
        results: Vec<(LogIndex, Term, Bytes)>,
    },
}

/// Work for the apply task.
enum ApplyWork {
    Entries(Vec<Entry>),
    Read {
        index: LogIndex,
        query: Bytes,
        reply: Reply,
    },
}

#[derive(Clone)]
struct GroupHandle {
    inbox: mpsc::Sender<Input>,
    actor: Arc<Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

struct HostInner {
    config: HostConfig,
    /// Groups not ticking now.
    quiesced_groups: Arc<std::sync::atomic::AtomicU64>,
    wal: Arc<Wal>,
    transport: Arc<dyn Transport>,
    groups: RwLock<HashMap<GroupId, GroupHandle>>,
    runtime: tokio::runtime::Handle,
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

impl WeakNodeHost {
    /// The host, if it still exists.
    pub fn upgrade(&self) -> Option<NodeHost> {
        self.inner.upgrade().map(|inner| NodeHost { inner })
    }
}

impl NodeHost {
    /// A host persisting to `wal` and talking through `transport`; its
    /// tasks run on `runtime`.
    pub fn new(
        config: HostConfig,
        wal: Arc<Wal>,
        transport: Arc<dyn Transport>,
        runtime: tokio::runtime::Handle,
    ) -> NodeHost {
        NodeHost {
            inner: Arc::new(HostInner {
                config,
                quiesced_groups: Arc::default(),
                wal,
                transport,
                groups: RwLock::new(HashMap::new()),
                runtime,
            }),
        }
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
        let mut config = self.inner.config.raft.clone();
        config.id = self.inner.config.node_id;
        config.applied = state_machine.applied_index();
        config.initial_voters = initial_voters;
        config.seed ^= group.0.rotate_left(17);
        let storage = GroupStorage::new(Arc::clone(&self.inner.wal), group);
        let raft =
            RaftNode::new(config, storage).map_err(|source| Error::Raft { group, source })?;
        let (inbox_sender, inbox) = mpsc::channel(self.inner.config.group_inbox_max);
        let (control_sender, control) = mpsc::unbounded_channel();
        let (apply_sender, apply_inbox) = mpsc::unbounded_channel();
        let apply_control = control_sender.clone();
        self.inner
            .runtime
            .spawn(apply_loop(state_machine, apply_inbox, apply_control));
        let actor = GroupActor {
            group,
            raft,
            wal: Arc::clone(&self.inner.wal),
            transport: Arc::clone(&self.inner.transport),
            control_sender,
            apply: apply_sender,
            proposals: BTreeMap::new(),
            reads: HashMap::new(),
            next_read: 1,
            unsent: VecDeque::new(),
            quiesce_after_ticks: self.inner.config.quiesce_after_ticks,
            idle_ticks: 0,
            quiesced: false,
            last_index_seen: LogIndex(0),
            quiesced_groups: Arc::clone(&self.inner.quiesced_groups),
        };
        let tick_interval = self.inner.config.tick_interval;
        let actor = self
            .inner
            .runtime
            .spawn(actor.run(inbox, control, tick_interval));
        let handle = GroupHandle {
            inbox: inbox_sender,
            actor: Arc::new(Mutex::new(Some(actor))),
        };
        groups.insert(group, handle);
        Ok(())
    }

    fn handle(&self, group: GroupId) -> Result<GroupHandle, Error> {
        let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
        groups
            .get(&group)
            .cloned()
            .ok_or(Error::UnknownGroup(group))
    }

    fn enqueue(&self, group: GroupId, input: Input) -> Result<(), Error> {
        self.handle(group)?
            .inbox
            .try_send(input)
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => Error::Busy(group),
                mpsc::error::TrySendError::Closed(_) => Error::GroupStopped {
                    group,
                    reason: "the group's actor has exited".into(),
                },
            })
    }

    /// Hands a peer's message to a group; dropped (and left to Raft's
    /// retransmission) when the group is unknown or its inbox is full.
    pub fn deliver(&self, group: GroupId, message: Message) {
        let _ = self.enqueue(group, Input::Message(message));
    }

    /// Proposes a command on this node, which must lead the group; resolves
    /// with the state machine's result once applied.
    pub async fn propose(&self, group: GroupId, command: Bytes) -> Result<Bytes, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Propose { command, reply })?;
        answer.await.unwrap_or_else(|_| Err(stopped(group)))
    }

    /// A linearizable read (ReadIndex, batched by the core; forwarded to the
    /// leader from a follower), served from this node's state machine.
    pub async fn read_linearizable(&self, group: GroupId, query: Bytes) -> Result<Bytes, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Read { query, reply })?;
        answer.await.unwrap_or_else(|_| Err(stopped(group)))
    }

    /// The group's Raft status on this node.
    pub async fn status(&self, group: GroupId) -> Result<Status, Error> {
        let (reply, answer) = oneshot::channel();
        self.enqueue(group, Input::Status { reply })?;
        answer.await.map_err(|_| stopped(group))
    }

    /// Stops every group and waits for their actors to exit. Requests still
    /// queued are dropped; their callers get `GroupStopped`. The WAL closes
    /// once the last clone of this host is gone.
    pub async fn stop(&self) {
        let handles: Vec<GroupHandle> = {
            let mut groups = self.inner.groups.write().unwrap_or_else(|p| p.into_inner());
            groups.drain().map(|(_, handle)| handle).collect()
        };
        for handle in handles {
            let actor = handle
                .actor
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take();
            drop(handle);
            if let Some(actor) = actor {
                let _ = actor.await;
            }
        }
    }

    /// Wakes every quiesced group, e.g. when a peer's connection is lost: a
    /// leader may be gone, and only ticking followers will notice.
    pub fn wake_all(&self) {
        let groups = self.inner.groups.read().unwrap_or_else(|p| p.into_inner());
        for handle in groups.values() {
            // A full inbox means the group is busy, hence awake.
            let _ = handle.inbox.try_send(Input::Wake);
        }
    }

    /// How many groups are quiesced (not ticking) now.
    pub fn quiesced_group_count(&self) -> u64 {
        self.inner
            .quiesced_groups
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Makes this node campaign in `group` now.
    pub fn campaign(&self, group: GroupId) -> Result<(), Error> {
        self.enqueue(group, Input::Campaign)
    }
}

fn stopped(group: GroupId) -> Error {
    Error::GroupStopped {
        group,
        reason: "the group's actor has exited".into(),
    }
}

/// One group's Raft loop.
struct GroupActor {
    group: GroupId,
    raft: RaftNode<GroupStorage>,
    wal: Arc<Wal>,
    transport: Arc<dyn Transport>,
    control_sender: mpsc::UnboundedSender<Control>,
    apply: mpsc::UnboundedSender<ApplyWork>,
    /// Proposals by index, with the term they were appended in.
    proposals: BTreeMap<LogIndex, (Term, Reply)>,
    reads: HashMap<ReadId, (Bytes, Reply)>,
    next_read: u64,
    /// Persisted messages of readies not yet durable, in ready order.
    unsent: VecDeque<(u64, Vec<Message>)>,
    quiesce_after_ticks: u64,
    /// Ticks since the last activity.
    idle_ticks: u64,
    /// Not ticking: no heartbeats sent, no election timer running.
    quiesced: bool,
    last_index_seen: LogIndex,
    quiesced_groups: Arc<std::sync::atomic::AtomicU64>,
}

/// Inputs handled per loop turn before the ready is taken.
const INPUTS_PER_TURN_MAX: usize = 256;

impl GroupActor {
    async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Input>,
        mut control: mpsc::UnboundedReceiver<Control>,
        tick_interval: Duration,
    ) {
        let mut ticker = tokio::time::interval(tick_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(event) = control.recv() => {
                    if let Err(reason) = self.handle_control(event) {
                        self.fail_all(reason);
                        return;
                    }
                }
                input = inbox.recv() => match input {
                    Some(input) => self.accept_input(input),
                    None => break,
                },
                _ = ticker.tick(), if !self.quiesced => self.tick(),
            }
            for _ in 0..INPUTS_PER_TURN_MAX {
                match inbox.try_recv() {
                    Ok(input) => self.accept_input(input),
                    Err(_) => break,
                }
            }
            while let Ok(event) = control.try_recv() {
                if let Err(reason) = self.handle_control(event) {
                    self.fail_all(reason);
                    return;
                }
            }
            if let Err(reason) = self.process_ready() {
                self.fail_all(reason);
                return;
            }
            let last_index = self.raft.last_index();
            if last_index != self.last_index_seen {
                self.last_index_seen = last_index;
                self.note_activity();
            }
        }
        self.set_quiesced(false);
    }

    fn tick(&mut self) {
        self.raft.tick();
        self.idle_ticks += 1;
        let settled = matches!(self.raft.role(), Role::Leader | Role::Follower)
            && self.raft.leader().is_some();
        if self.quiesce_after_ticks > 0 && self.idle_ticks >= self.quiesce_after_ticks && settled {
            self.set_quiesced(true);
        }
    }

    /// Any real work keeps the group ticking for another quiet period.
    fn note_activity(&mut self) {
        self.idle_ticks = 0;
        self.set_quiesced(false);
    }

    fn set_quiesced(&mut self, quiesced: bool) {
        if self.quiesced == quiesced {
            return;
        }
        self.quiesced = quiesced;
        let counter = &self.quiesced_groups;
        if quiesced {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        } else {
            counter.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Classifies an input for quiescence, then handles it. A heartbeat
    /// wakes a quiesced group without resetting its idle count, so that
    /// leader and followers go quiet within a tick of each other.
    fn accept_input(&mut self, input: Input) {
        match &input {
            Input::Message(message) => {
                let heartbeat = matches!(
                    message.body,
                    MessageBody::Heartbeat { .. } | MessageBody::HeartbeatResponse { .. }
                );
                if heartbeat {
                    self.set_quiesced(false);
                } else {
                    self.note_activity();
                }
            }
            Input::Status { .. } => {}
            Input::Propose { .. } | Input::Read { .. } | Input::Campaign | Input::Wake => {
                self.note_activity()
            }
        }
        self.handle_input(input);
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
                if self.raft.role() != Role::Leader {
                    let leader_hint = self.raft.leader();
                    let _ = reply.send(Err(Error::NotLeader { group, leader_hint }));
                    return;
                }
                match self.raft.propose(vec![command]) {
                    Ok(Proposed::Appended { last, term, .. }) => {
                        self.proposals.insert(last, (term, reply));
                    }
                    Ok(Proposed::Forwarded { leader }) => {
                        let _ = reply.send(Err(Error::NotLeader {
                            group,
                            leader_hint: Some(leader),
                        }));
                    }
                    Err(source) => {
                        let _ = reply.send(Err(Error::Raft { group, source }));
                    }
                }
            }
            Input::Read { query, reply } => {
                let id = ReadId(self.next_read);
                self.next_read += 1;
                match self.raft.read_index(id) {
                    Ok(()) => {
                        self.reads.insert(id, (query, reply));
                    }
                    Err(source) => {
                        let _ = reply.send(Err(Error::Raft { group, source }));
                    }
                }
            }
            Input::Status { reply } => {
                let _ = reply.send(self.raft.status());
            }
            Input::Campaign => self.raft.campaign(),
            Input::Wake => {}
        }
    }

    fn handle_control(&mut self, event: Control) -> Result<(), String> {
        match event {
            Control::Persisted { number, result } => {
                result.map_err(|error| format!("persisting failed: {error}"))?;
                self.raft.on_persisted(number);
                while self
                    .unsent
                    .front()
                    .is_some_and(|(ready, _)| *ready <= number)
                {
                    if let Some((_, messages)) = self.unsent.pop_front() {
                        self.transport.send(self.group, messages);
                    }
                }
            }
            Control::Applied { index, results } => {
                self.raft.advance_apply(index);
                for (entry_index, entry_term, result) in results {
                    if let Some((term, reply)) = self.proposals.remove(&entry_index) {
                        let outcome = if term == entry_term {
                            Ok(result)
                        } else {
                            Err(Error::Dropped(self.group))
                        };
                        let _ = reply.send(outcome);
                    }
                }
                // Proposals at or below the applied index whose entry was
                // not a command of theirs were overwritten.
                let group = self.group;
                while let Some(entry) = self.proposals.first_entry() {
                    if *entry.key() > index {
                        break;
                    }
                    let (_, reply) = entry.remove();
                    let _ = reply.send(Err(Error::Dropped(group)));
                }
            }
        }
        Ok(())
    }

    fn process_ready(&mut self) -> Result<(), String> {
        while self.raft.has_ready() {
            let ready = self
                .raft
                .ready()
                .map_err(|error| format!("raft: {error}"))?;
            if !ready.messages.is_empty() {
                self.transport.send(self.group, ready.messages);
            }
            let mut batch = WriteBatch::new();
            if let Some(meta) = ready.snapshot {
                batch.install_snapshot(self.group, meta);
            }
            if !ready.entries.is_empty() {
                batch.entries(self.group, ready.entries);
            }
            if let Some(hard_state) = ready.hard_state {
                batch.hard_state(self.group, hard_state);
            }
            self.unsent
                .push_back((ready.number, ready.persisted_messages));
            let control = self.control_sender.clone();
            let number = ready.number;
            // Empty batches too: the WAL answers them in order, so persisted
            // messages never overtake an earlier ready's fsync.
            self.wal.submit(batch, move |result| {
                let _ = control.send(Control::Persisted { number, result });
            });
            if !ready.committed_entries.is_empty() {
                let _ = self.apply.send(ApplyWork::Entries(ready.committed_entries));
            }
            for state in ready.read_states {
                if let Some((query, reply)) = self.reads.remove(&state.id) {
                    let _ = self.apply.send(ApplyWork::Read {
                        index: state.index,
                        query,
                        reply,
                    });
                }
            }
        }
        Ok(())
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
        for (_, (_, reply)) in std::mem::take(&mut self.reads) {
            let _ = reply.send(Err(error()));
        }
    }
}

/// Applies committed entries in order and serves reads once their index is
/// applied; reports progress and results back to the actor.
async fn apply_loop(
    mut state_machine: Box<dyn StateMachine>,
    mut work: mpsc::UnboundedReceiver<ApplyWork>,
    control: mpsc::UnboundedSender<Control>,
) {
    let mut applied = state_machine.applied_index();
    let mut waiting: Vec<(LogIndex, Bytes, Reply)> = Vec::new();
    while let Some(item) = work.recv().await {
        match item {
            ApplyWork::Entries(entries) => {
                let mut results = Vec::new();
                for entry in &entries {
                    if let EntryPayload::Normal(command) = &entry.payload {
                        let result = state_machine.apply(entry.index, command);
                        results.push((entry.index, entry.term, result));
                    }
                    applied = applied.max(entry.index);
                }
                let _ = control.send(Control::Applied {
                    index: applied,
                    results,
                });
                let (ready, still_waiting): (Vec<_>, Vec<_>) = waiting
                    .into_iter()
                    .partition(|(index, _, _)| *index <= applied);
                waiting = still_waiting;
                for (_, query, reply) in ready {
                    let _ = reply.send(Ok(state_machine.read(&query)));
                }
            }
            ApplyWork::Read {
                index,
                query,
                reply,
            } => {
                if index <= applied {
                    let _ = reply.send(Ok(state_machine.read(&query)));
                } else {
                    waiting.push((index, query, reply));
                }
            }
        }
    }
}
