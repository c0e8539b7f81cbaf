//! A deterministic, seeded simulation of one Raft group.
//!
//! One thread, one seeded generator, simulated time. The network drops,
//! duplicates, delays and reorders messages and can be partitioned; disks
//! persist `Ready` batches after a delay, and a crash loses every write not
//! yet acknowledged (optionally tearing the oldest one); nodes restart from
//! what was persisted. Membership changes, leadership transfers, proposals
//! and reads run throughout.
//!
//! Each invariant has its own checker, run as events happen:
//! - election safety: at most one leader per term;
//! - log matching: an (index, term) pair names one entry and one prefix;
//! - leader completeness: a new leader holds every entry committed in an
//!   earlier term;
//! - state machine safety: no two nodes apply different entries at an index;
//! - read safety: a ReadIndex answer is at least every index applied
//!   anywhere when the read was asked.
//!
//! After the faults heal, a leader must be elected and a proposal committed
//! within a bound.

#![allow(dead_code)]

use std::cmp::Reverse;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BinaryHeap, HashMap, VecDeque};
use std::hash::{Hash, Hasher};

use bytes::Bytes;
use regatta_raft::{
    CommitBroadcast, ConfChange, Config, Entry, EntryPayload, HardState, LogIndex, MemStorage,
    Message, MessageBody, NodeId, RaftNode, ReadId, ReadMode, Rng, Role, SnapshotMeta, Term,
};

/// Simulated time units per tick.
pub const TICK_UNITS: u64 = 10;

/// What a simulation run does; derived from a seed.
#[derive(Clone, Debug)]
pub struct SimOptions {
    pub seed: u64,
    pub voters: u64,
    pub spare_nodes: u64,
    pub chaos_ticks: u64,
    pub liveness_ticks_max: u64,
    pub drop_per_mille: u64,
    pub duplicate_per_mille: u64,
    pub delay_units_max: u64,
    pub persist_delay_units_max: u64,
    pub crashes: bool,
    pub torn_writes: bool,
    pub partitions: bool,
    pub membership_changes: bool,
    pub transfers: bool,
    pub compaction: bool,
    pub pre_vote: bool,
    pub check_quorum: bool,
    pub lease_reads: bool,
    /// Small values split the log into one-entry appends, which exposes
    /// commit-by-counting bugs (Figure 8).
    pub message_size_bytes_max: u64,
    /// Deliver messages out of order on a link (TCP keeps order; a
    /// reconnect or a UDP-like transport does not).
    pub reorder: bool,
    /// `CommitBroadcast::Deferred`: leaders send a moved commit index on
    /// its own only when the harness asks, at random steps.
    pub deferred_commit: bool,
    pub verbose: bool,
}

impl SimOptions {
    /// Options drawn from the seed: most runs use every fault and the
    /// default protocol settings; some vary them.
    pub fn from_seed(seed: u64, voters: u64) -> SimOptions {
        let mut rng = Rng::new(seed ^ 0x5EED);
        let defaults = rng.chance(7, 10);
        let check_quorum = defaults || rng.chance(1, 2);
        SimOptions {
            seed,
            voters,
            spare_nodes: 2,
            chaos_ticks: 300,
            liveness_ticks_max: 600,
            drop_per_mille: rng.range(0, 100),
            duplicate_per_mille: rng.range(0, 50),
            delay_units_max: rng.range(1, 3 * TICK_UNITS),
            persist_delay_units_max: rng.range(0, 2 * TICK_UNITS),
            crashes: rng.chance(4, 5),
            torn_writes: rng.chance(1, 2),
            partitions: rng.chance(4, 5),
            // Without PreVote or CheckQuorum a removed node can depose
            // leaders forever (thesis §4.2.3); churn only with one of them.
            membership_changes: rng.chance(3, 5) && (defaults || check_quorum),
            transfers: rng.chance(3, 5),
            compaction: rng.chance(3, 5),
            pre_vote: defaults || rng.chance(1, 2),
            check_quorum,
            lease_reads: check_quorum && rng.chance(1, 3),
            message_size_bytes_max: if rng.chance(1, 3) {
                1
            } else {
                rng.range(64, 2048)
            },
            reorder: rng.chance(1, 4),
            deferred_commit: rng.chance(1, 2),
            verbose: std::env::var("SIM_VERBOSE").is_ok(),
        }
    }

    pub fn replay_command(&self) -> String {
        format!(
            "SIM_SEED={} SIM_VOTERS={} cargo test -p regatta-raft --test sim sim_replay -- --nocapture",
            self.seed, self.voters
        )
    }
}

/// A state machine that folds every applied entry into a hash chain.
#[derive(Clone, Copy, Debug, Default)]
struct StateMachine {
    applied: LogIndex,
    hash: u64,
    durable_applied: LogIndex,
    durable_hash: u64,
}

struct PendingWrite {
    number: u64,
    snapshot: Option<SnapshotMeta>,
    entries: Vec<Entry>,
    hard_state: Option<HardState>,
    messages: Vec<Message>,
    done_at: u64,
}

struct SimNode {
    id: NodeId,
    raft: Option<RaftNode<MemStorage>>,
    /// The disk while the node is down.
    storage: MemStorage,
    writes: VecDeque<PendingWrite>,
    sm: StateMachine,
    /// The hard state as of the last write that had to be synced. A write
    /// that only moves the commit index is acknowledged unsynced (the
    /// WAL's `MustSync` rule), so a crash may fall back to this one.
    synced_hard_state: Option<HardState>,
    tick_phase: u64,
    restart_at: Option<u64>,
    incarnation: u64,
}

impl SimNode {
    /// A node with an empty disk, started or not.
    fn new(id: NodeId, tick_phase: u64, raft: Option<RaftNode<MemStorage>>) -> SimNode {
        SimNode {
            id,
            raft,
            storage: MemStorage::new(),
            writes: VecDeque::new(),
            sm: StateMachine::default(),
            synced_hard_state: None,
            tick_phase,
            restart_at: None,
            incarnation: 0,
        }
    }
}

/// Records and checks the safety invariants.
#[derive(Default)]
struct Checker {
    leaders: HashMap<Term, NodeId>,
    /// (index, term) -> (payload hash, term of the previous entry).
    entries: HashMap<(LogIndex, Term), (u64, Option<Term>)>,
    /// index - 1 -> (entry term, state hash after applying it).
    applied: Vec<(Term, u64)>,
    /// index - 1 -> (entry term, lowest term of a leader that committed it).
    committed: Vec<(Term, Term)>,
    reads: HashMap<ReadId, (NodeId, LogIndex)>,
    /// The highest commit index recorded per leader term.
    leader_commits: HashMap<Term, LogIndex>,
    reads_answered: u64,
    proposals_applied: u64,
    elections: u64,
    /// Crashes that lost an acknowledged, unsynced commit index.
    commit_indexes_lost: u64,
}

pub struct SimReport {
    pub elections: u64,
    pub applied: u64,
    pub reads_answered: u64,
    pub messages: u64,
    pub commit_indexes_lost: u64,
    /// Deferred commit broadcasts the harness made.
    pub commit_broadcasts_deferred: u64,
}

pub struct Sim {
    pub options: SimOptions,
    rng: Rng,
    now: u64,
    nodes: BTreeMap<NodeId, SimNode>,
    network: BinaryHeap<Reverse<(u64, u64, MessageKey)>>,
    in_flight: HashMap<u64, Message>,
    next_sequence: u64,
    blocked: Vec<(NodeId, NodeId)>,
    /// The latest delivery time per link, to keep links in order.
    link_tail: HashMap<(NodeId, NodeId), u64>,
    heal_partition_at: Option<u64>,
    checker: Checker,
    next_read: u64,
    next_command: u64,
    messages_sent: u64,
    commit_broadcasts_deferred: u64,
    chaos: bool,
    pub trace: Vec<String>,
}

type MessageKey = u64;

fn hash_of(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

impl Sim {
    pub fn new(options: SimOptions) -> Sim {
        let rng = Rng::new(options.seed);
        let mut sim = Sim {
            options,
            rng,
            now: 0,
            nodes: BTreeMap::new(),
            network: BinaryHeap::new(),
            in_flight: HashMap::new(),
            next_sequence: 0,
            blocked: Vec::new(),
            link_tail: HashMap::new(),
            heal_partition_at: None,
            checker: Checker::default(),
            next_read: 1,
            next_command: 1,
            messages_sent: 0,
            commit_broadcasts_deferred: 0,
            chaos: true,
            trace: Vec::new(),
        };
        let voters: Vec<NodeId> = (1..=sim.options.voters).map(NodeId).collect();
        for id in 1..=sim.options.voters {
            let id = NodeId(id);
            let tick_phase = sim.rng.range(0, TICK_UNITS);
            let mut node = SimNode::new(id, tick_phase, None);
            if voters.contains(&id) {
                node.raft = Some(sim.start_raft(id, MemStorage::new(), LogIndex(0), &voters, 0));
            }
            sim.nodes.insert(id, node);
        }
        sim
    }

    fn config(
        &self,
        id: NodeId,
        applied: LogIndex,
        initial_voters: &[NodeId],
        incarnation: u64,
    ) -> Config {
        let mut config = Config::new(id);
        config.seed = self
            .options
            .seed
            .wrapping_mul(31)
            .wrapping_add(id.0 * 1009 + incarnation);
        config.pre_vote = self.options.pre_vote;
        config.check_quorum = self.options.check_quorum;
        config.read_mode = if self.options.lease_reads {
            ReadMode::LeaseBased
        } else {
            ReadMode::Safe
        };
        if self.options.deferred_commit {
            config.commit_broadcast = CommitBroadcast::Deferred;
        }
        config.applied = applied;
        config.initial_voters = initial_voters.to_vec();
        config.message_size_bytes_max = self.options.message_size_bytes_max;
        config.inflight_messages_max = 8;
        config.uncommitted_size_bytes_max = 16 * 1024;
        config
    }

    fn start_raft(
        &self,
        id: NodeId,
        storage: MemStorage,
        applied: LogIndex,
        initial_voters: &[NodeId],
        incarnation: u64,
    ) -> RaftNode<MemStorage> {
        let config = self.config(id, applied, initial_voters, incarnation);
        match RaftNode::new(config, storage) {
            Ok(node) => node,
            Err(error) => panic!("node {id} failed to start: {error}"),
        }
    }

    fn log(&mut self, line: impl FnOnce() -> String) {
        if self.options.verbose {
            let text = format!("[{:>6}] {}", self.now, line());
            println!("{text}");
        }
    }

    // ------------------------------------------------------------------
    // Running.

    /// Runs the safety phase, heals, then checks liveness.
    pub fn run(&mut self) -> SimReport {
        let chaos_units = self.options.chaos_ticks * TICK_UNITS;
        while self.now < chaos_units {
            self.step();
            self.inject_faults();
        }
        self.heal_all();
        self.check_liveness();
        self.check_logs_match();
        SimReport {
            elections: self.checker.elections,
            applied: self.checker.applied.len() as u64,
            reads_answered: self.checker.reads_answered,
            messages: self.messages_sent,
            commit_indexes_lost: self.checker.commit_indexes_lost,
            commit_broadcasts_deferred: self.commit_broadcasts_deferred,
        }
    }

    /// One unit of simulated time.
    pub fn step(&mut self) {
        self.now += 1;
        self.deliver_due_messages();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            self.maybe_restart(*id);
            let due = self.nodes[id].tick_phase == self.now % TICK_UNITS;
            if due {
                if let Some(raft) = self.node_mut(*id) {
                    raft.tick();
                }
            }
        }
        for id in &ids {
            self.maybe_broadcast_commit(*id);
            self.drain_ready(*id);
            self.complete_due_writes(*id);
            self.drain_ready(*id);
        }
    }

    /// Under `CommitBroadcast::Deferred`, the runtime's delayed broadcast:
    /// at a random later step.
    fn maybe_broadcast_commit(&mut self, id: NodeId) {
        if !self.options.deferred_commit || !self.rng.chance(1, 3) {
            return;
        }
        if let Some(raft) = self.node_mut(id) {
            if raft.commit_unsent() {
                raft.broadcast_commit();
                self.commit_broadcasts_deferred += 1;
            }
        }
    }

    fn node_mut(&mut self, id: NodeId) -> Option<&mut RaftNode<MemStorage>> {
        self.nodes.get_mut(&id).and_then(|node| node.raft.as_mut())
    }

    fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .values()
            .filter(|node| node.raft.is_some())
            .map(|node| node.id)
            .collect()
    }

    /// The leader with the highest term among running nodes.
    pub fn leader(&self) -> Option<NodeId> {
        self.nodes
            .values()
            .filter_map(|node| node.raft.as_ref().map(|raft| (node.id, raft)))
            .filter(|(_, raft)| raft.role() == Role::Leader)
            .max_by_key(|(_, raft)| raft.term())
            .map(|(id, _)| id)
    }

    // ------------------------------------------------------------------
    // Network.

    fn send(&mut self, message: Message) {
        self.messages_sent += 1;
        let lost = self.blocked.contains(&(message.from, message.to))
            || (self.chaos && self.rng.chance(self.options.drop_per_mille, 1000));
        if lost {
            self.report_lost_snapshot(&message);
            return;
        }
        let copies = if self.chaos && self.rng.chance(self.options.duplicate_per_mille, 1000) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let mut at = self.now + self.rng.range(1, self.options.delay_units_max + 1);
            if !self.options.reorder {
                let tail = self
                    .link_tail
                    .entry((message.from, message.to))
                    .or_insert(0);
                at = at.max(*tail);
                *tail = at;
            }
            let sequence = self.next_sequence;
            self.next_sequence += 1;
            self.in_flight.insert(sequence, message.clone());
            self.network.push(Reverse((at, sequence, sequence)));
        }
    }

    /// The transport reports a failed snapshot stream, as a real one does.
    fn report_lost_snapshot(&mut self, message: &Message) {
        if let MessageBody::Snapshot { .. } = message.body {
            if let Some(sender) = self.node_mut(message.from) {
                sender.report_snapshot(message.to, false);
            }
        }
    }

    fn deliver_due_messages(&mut self) {
        while let Some(Reverse((at, _, key))) = self.network.peek().copied() {
            if at > self.now {
                break;
            }
            self.network.pop();
            let Some(message) = self.in_flight.remove(&key) else {
                continue;
            };
            if self.blocked.contains(&(message.from, message.to)) {
                self.report_lost_snapshot(&message);
                continue;
            }
            let to = message.to;
            let from = message.from;
            let is_snapshot = matches!(message.body, MessageBody::Snapshot { .. });
            if let MessageBody::Snapshot { meta } = &message.body {
                // The snapshot data travels with the message: check that the
                // sender's state at that index is the one everyone applied.
                let expected = self.checker.state_hash_at(meta.index);
                assert!(
                    expected.is_some(),
                    "snapshot at {} of unapplied state",
                    meta.index
                );
            }
            let text = format!("deliver {:?}", message);
            self.log(|| text);
            let delivered = match self.node_mut(to) {
                Some(raft) => {
                    if let Err(error) = raft.step(message) {
                        panic!("node {to} failed to step: {error}");
                    }
                    true
                }
                None => false,
            };
            if is_snapshot {
                if let Some(sender) = self.node_mut(from) {
                    sender.report_snapshot(to, delivered);
                }
            }
        }
    }

    // ------------------------------------------------------------------
    // Ready handling and persistence.

    fn drain_ready(&mut self, id: NodeId) {
        for _ in 0..64 {
            let Some(raft) = self.node_mut(id) else {
                return;
            };
            if !raft.has_ready() {
                return;
            }
            let ready = match raft.ready() {
                Ok(ready) => ready,
                Err(error) => panic!("node {id} ready failed: {error}"),
            };
            let term = raft.term();
            let role = raft.role();
            if ready
                .soft_state
                .is_some_and(|soft| soft.role == Role::Leader)
            {
                self.on_new_leader(id, term);
            }
            if let (Some(hard_state), Role::Leader) = (ready.hard_state, role) {
                self.record_leader_commit(id, hard_state.commit);
            }
            for message in ready.messages {
                self.send(message);
            }
            for entry in &ready.committed_entries {
                self.apply(id, entry);
            }
            for read in ready.read_states {
                self.check_read(id, read.id, read.index);
            }
            let delay = self.rng.range(0, self.options.persist_delay_units_max + 1);
            let node = self.nodes.get_mut(&id).expect("node exists");
            let after = node.writes.back().map(|w| w.done_at).unwrap_or(0);
            node.writes.push_back(PendingWrite {
                number: ready.number,
                snapshot: ready.snapshot,
                entries: ready.entries,
                hard_state: ready.hard_state,
                messages: ready.persisted_messages,
                done_at: (self.now + delay).max(after),
            });
        }
        panic!("node {id} keeps producing readies");
    }

    fn complete_due_writes(&mut self, id: NodeId) {
        loop {
            let node = self.nodes.get_mut(&id).expect("node exists");
            if node.raft.is_none() {
                return;
            }
            let due = node
                .writes
                .front()
                .is_some_and(|write| write.done_at <= self.now);
            if !due {
                return;
            }
            let Some(write) = node.writes.pop_front() else {
                return;
            };
            self.persist(id, &write);
            let node = self.nodes.get_mut(&id).expect("node exists");
            if let Some(raft) = node.raft.as_mut() {
                raft.on_persisted(write.number);
            }
            for message in write.messages {
                self.send(message);
            }
        }
    }

    fn persist(&mut self, id: NodeId, write: &PendingWrite) {
        if let Some(meta) = &write.snapshot {
            let hash = self
                .checker
                .state_hash_at(meta.index)
                .expect("snapshot of applied state");
            let node = self.nodes.get_mut(&id).expect("node exists");
            let raft = node.raft.as_mut().expect("node is up");
            raft.storage_mut().apply_snapshot(meta.clone());
            node.sm = StateMachine {
                applied: meta.index,
                hash,
                durable_applied: meta.index,
                durable_hash: hash,
            };
        }
        if !write.entries.is_empty() {
            let node = self.nodes.get_mut(&id).expect("node exists");
            let raft = node.raft.as_mut().expect("node is up");
            raft.storage_mut().append(&write.entries);
            let storage = raft.storage().clone();
            self.checker.check_entries(id, &storage, &write.entries);
        }
        let node = self.nodes.get_mut(&id).expect("node exists");
        let raft = node.raft.as_mut().expect("node is up");
        let before = raft.storage().hard_state();
        if let Some(hard_state) = write.hard_state {
            raft.storage_mut().set_hard_state(hard_state);
        }
        // As the WAL does: only a write that moves nothing but commit
        // indexes goes without an fsync; any other write syncs it too.
        let commit_only = write.snapshot.is_none()
            && write.entries.is_empty()
            && write
                .hard_state
                .is_none_or(|hs| hs.term == before.term && hs.vote == before.vote);
        if !commit_only {
            node.synced_hard_state = Some(raft.storage().hard_state());
        }
    }

    fn apply(&mut self, id: NodeId, entry: &Entry) {
        let flush = self.rng.chance(1, 10);
        let node = self.nodes.get_mut(&id).expect("node exists");
        assert_eq!(
            entry.index,
            node.sm.applied.next(),
            "node {id} applied {} after {}",
            entry.index,
            node.sm.applied
        );
        let hash = hash_of(&(node.sm.hash, entry.term, hash_of(&entry.payload)));
        node.sm.applied = entry.index;
        node.sm.hash = hash;
        if flush {
            node.sm.durable_applied = entry.index;
            node.sm.durable_hash = hash;
        }
        if let Some(raft) = node.raft.as_mut() {
            raft.advance_apply(entry.index);
        }
        self.checker.check_apply(id, entry, hash);
    }

    // ------------------------------------------------------------------
    // Checkers.

    fn on_new_leader(&mut self, id: NodeId, term: Term) {
        if self.checker.leaders.get(&term) == Some(&id) {
            return; // Another soft-state change of the same leader.
        }
        self.checker.elections += 1;
        self.log(|| format!("node {id} became leader in term {term}"));
        if let Some(other) = self.checker.leaders.insert(term, id) {
            assert_eq!(
                other, id,
                "election safety: nodes {other} and {id} both led term {term}"
            );
        }
        let raft = self.nodes[&id].raft.as_ref().expect("leader is up");
        let first_index = raft.status().first_index;
        for (position, (entry_term, commit_term)) in self.checker.committed.iter().enumerate() {
            let index = LogIndex(position as u64 + 1);
            if index < first_index || *commit_term >= term {
                continue;
            }
            assert_eq!(
                raft.log_term(index),
                Some(*entry_term),
                "leader completeness: leader {id} of term {term} lacks entry {index} committed in term {commit_term}"
            );
        }
    }

    fn record_leader_commit(&mut self, id: NodeId, commit: LogIndex) {
        let raft = self.nodes[&id].raft.as_ref().expect("leader is up");
        let term = raft.term();
        let first_index = raft.status().first_index;
        let seen = self.checker.leader_commits.entry(term).or_default();
        let from = seen.next();
        if commit > *seen {
            *seen = commit;
        }
        let committed = &mut self.checker.committed;
        for index in from.0..=commit.0 {
            let index = LogIndex(index);
            let position = index.0 as usize - 1;
            let entry_term = raft.log_term(index);
            if let Some((known_term, commit_term)) = committed.get_mut(position) {
                if let Some(entry_term) = entry_term {
                    assert_eq!(
                        *known_term, entry_term,
                        "committed entry {index} changed term"
                    );
                }
                *commit_term = (*commit_term).min(term);
                continue;
            }
            if index < first_index {
                // Compacted here, so applied here: take the applied term.
                let applied = self.checker.applied.get(position).map(|(t, _)| *t);
                committed.push((applied.unwrap_or(Term(0)), term));
                continue;
            }
            let entry_term = entry_term.expect("committed entry exists");
            committed.push((entry_term, term));
        }
    }

    fn check_read(&mut self, id: NodeId, read: ReadId, index: LogIndex) {
        let Some((asked_on, required)) = self.checker.reads.remove(&read) else {
            return; // Duplicated answer.
        };
        assert_eq!(asked_on, id, "read {read:?} answered on the wrong node");
        assert!(
            index >= required,
            "read safety: read {read:?} on node {id} confirmed index {index} but {required} was already applied"
        );
        self.checker.reads_answered += 1;
    }

    /// Full log matching over every pair of running nodes.
    pub fn check_logs_match(&self) {
        let logs: Vec<(NodeId, &MemStorage)> = self
            .nodes
            .values()
            .filter_map(|node| node.raft.as_ref().map(|raft| (node.id, raft.storage())))
            .collect();
        for (a_id, a) in &logs {
            for (b_id, b) in &logs {
                if a_id >= b_id {
                    continue;
                }
                check_pair(*a_id, a, *b_id, b);
            }
        }
    }

    // ------------------------------------------------------------------
    // Faults and client operations.

    fn inject_faults(&mut self) {
        if !self.now.is_multiple_of(TICK_UNITS) {
            return;
        }
        if self.rng.chance(3, 10) {
            self.client_propose();
        }
        if self.rng.chance(15, 100) {
            self.client_read();
        }
        if self.options.crashes && self.rng.chance(1, 100) {
            self.crash_random();
        }
        if self.options.partitions {
            self.maybe_partition();
        }
        if self.options.transfers && self.rng.chance(1, 100) {
            self.transfer_random();
        }
        if self.options.membership_changes && self.rng.chance(2, 100) {
            self.change_membership();
        }
        if self.options.compaction && self.rng.chance(3, 100) {
            self.compact_random();
        }
    }

    fn random_up_node(&mut self) -> Option<NodeId> {
        let up = self.up_nodes();
        if up.is_empty() {
            return None;
        }
        let position = self.rng.range(0, up.len() as u64) as usize;
        Some(up[position])
    }

    pub fn client_propose(&mut self) {
        let Some(id) = self.random_up_node() else {
            return;
        };
        let count = if self.rng.chance(1, 4) {
            self.rng.range(2, 20)
        } else {
            1
        };
        let commands: Vec<Bytes> = (0..count)
            .map(|_| {
                let command = self.next_command;
                self.next_command += 1;
                Bytes::from(format!(
                    "cmd-{command}-{}",
                    "x".repeat((command % 40) as usize)
                ))
            })
            .collect();
        if let Some(raft) = self.node_mut(id) {
            let _ = raft.propose(commands);
        }
    }

    pub fn client_read(&mut self) {
        let Some(id) = self.random_up_node() else {
            return;
        };
        let read = ReadId(self.next_read);
        self.next_read += 1;
        let required = LogIndex(self.checker.applied.len() as u64);
        let Some(raft) = self.node_mut(id) else {
            return;
        };
        if raft.read_index(read).is_ok() {
            self.checker.reads.insert(read, (id, required));
        }
    }

    fn crash_random(&mut self) {
        let Some(id) = self.random_up_node() else {
            return;
        };
        let down_units = self.rng.range(5, 50) * TICK_UNITS;
        self.crash(id, self.now + down_units);
    }

    /// Kills a node: writes not yet acknowledged are lost, the oldest one
    /// possibly torn; the state machine falls back to its durable state.
    pub fn crash(&mut self, id: NodeId, restart_at: u64) {
        let tear = self.options.torn_writes && self.rng.chance(1, 2);
        let keep_fraction = self.rng.range(0, 100);
        let node = self.nodes.get_mut(&id).expect("node exists");
        let Some(raft) = node.raft.take() else { return };
        let mut storage = raft.storage().clone();
        if tear {
            if let Some(write) = node.writes.front() {
                if write.snapshot.is_none() && !write.entries.is_empty() {
                    let keep = write.entries.len() * keep_fraction as usize / 100;
                    storage.append(&write.entries[..keep]);
                }
            }
        }
        node.writes.clear();
        // A commit index written after the last synced write may be lost.
        if let Some(synced) = node.synced_hard_state {
            if synced != storage.hard_state() && self.rng.chance(1, 2) {
                assert_eq!(
                    (synced.term, synced.vote),
                    (storage.hard_state().term, storage.hard_state().vote),
                    "only a commit index goes unsynced"
                );
                storage.set_hard_state(synced);
                self.checker.commit_indexes_lost += 1;
            }
        }
        node.storage = storage;
        node.sm.applied = node.sm.durable_applied;
        node.sm.hash = node.sm.durable_hash;
        node.restart_at = Some(restart_at);
        self.log(|| format!("crash node {id}"));
    }

    fn maybe_restart(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let due = node.restart_at.is_some_and(|at| at <= self.now);
        if !due || node.raft.is_some() {
            return;
        }
        self.restart(id);
    }

    pub fn restart(&mut self, id: NodeId) {
        let node = &self.nodes[&id];
        let storage = node.storage.clone();
        let applied = node.sm.applied;
        let incarnation = node.incarnation + 1;
        let raft = self.start_raft(id, storage, applied, &[], incarnation);
        let node = self.nodes.get_mut(&id).expect("node exists");
        node.raft = Some(raft);
        node.restart_at = None;
        node.incarnation = incarnation;
        self.log(|| format!("restart node {id}"));
    }

    fn maybe_partition(&mut self) {
        if let Some(at) = self.heal_partition_at {
            if at <= self.now {
                self.blocked.clear();
                self.heal_partition_at = None;
                self.log(|| "heal partition".to_string());
            }
            return;
        }
        if !self.rng.chance(2, 100) {
            return;
        }
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let kind = self.rng.range(0, 4);
        let mut side_a: Vec<NodeId> = Vec::new();
        match kind {
            0 => {
                // Isolate the leader.
                if let Some(leader) = self.leader() {
                    side_a.push(leader);
                }
            }
            1 | 2 => {
                // A random minority/majority split.
                for id in &ids {
                    if self.rng.chance(1, 2) {
                        side_a.push(*id);
                    }
                }
            }
            _ => {
                // Bridge: two halves that only one node connects.
                let bridge = ids[self.rng.range(0, ids.len() as u64) as usize];
                let half: Vec<NodeId> = ids.iter().copied().filter(|id| *id != bridge).collect();
                let (left, right) = half.split_at(half.len() / 2);
                for a in left {
                    for b in right {
                        self.blocked.push((*a, *b));
                        self.blocked.push((*b, *a));
                    }
                }
            }
        }
        for a in &side_a {
            for b in ids.iter().filter(|id| !side_a.contains(id)) {
                self.blocked.push((*a, *b));
                self.blocked.push((*b, *a));
            }
        }
        let heal_after = self.rng.range(10, 60) * TICK_UNITS;
        self.heal_partition_at = Some(self.now + heal_after);
        let text = format!("partition kind {kind}: {:?}", self.blocked);
        self.log(|| text);
    }

    fn transfer_random(&mut self) {
        let Some(leader) = self.leader() else { return };
        let voters: Vec<NodeId> = self.nodes[&leader]
            .raft
            .as_ref()
            .map(|raft| raft.status().membership.voters.iter().copied().collect())
            .unwrap_or_default();
        if voters.is_empty() {
            return;
        }
        let target = voters[self.rng.range(0, voters.len() as u64) as usize];
        let use_step_down = self.rng.chance(1, 4);
        if let Some(raft) = self.node_mut(leader) {
            if use_step_down {
                let _ = raft.step_down();
            } else {
                let _ = raft.transfer_leader(target);
            }
        }
        self.log(|| format!("transfer from {leader} to {target}"));
    }

    fn change_membership(&mut self) {
        let Some(leader) = self.leader() else { return };
        let membership = match self.nodes[&leader].raft.as_ref() {
            Some(raft) => raft.status().membership,
            None => return,
        };
        let learners: Vec<NodeId> = membership.learners.iter().copied().collect();
        let voters: Vec<NodeId> = membership.voters.iter().copied().collect();
        let node_count_max = self.options.voters + self.options.spare_nodes + 4;
        let change = match self.rng.range(0, 4) {
            0 if (self.nodes.len() as u64) < node_count_max => {
                // A joining node always gets a new id: a wiped disk has lost
                // its votes, so reusing an id could let it vote twice.
                let node = self.add_empty_node();
                ConfChange::AddLearner {
                    node,
                    auto_promote: self.rng.chance(1, 2),
                }
            }
            1 if !learners.is_empty() => ConfChange::Promote {
                node: learners[self.rng.range(0, learners.len() as u64) as usize],
            },
            2 if voters.len() > 2 => ConfChange::Demote {
                node: voters[self.rng.range(0, voters.len() as u64) as usize],
            },
            3 if voters.len() > 2 || !learners.is_empty() => {
                let members: Vec<NodeId> = membership.members().collect();
                ConfChange::Remove {
                    node: members[self.rng.range(0, members.len() as u64) as usize],
                }
            }
            _ => return,
        };
        let text = format!("propose change {change:?} at {leader}");
        self.log(|| text);
        if let Some(raft) = self.node_mut(leader) {
            let _ = raft.propose_conf_change(change);
        }
    }

    /// Starts a new, empty node with a fresh id; it joins once added.
    fn add_empty_node(&mut self) -> NodeId {
        let id = NodeId(self.nodes.keys().map(|id| id.0).max().unwrap_or(0) + 1);
        let raft = self.start_raft(id, MemStorage::new(), LogIndex(0), &[], 0);
        let tick_phase = self.rng.range(0, TICK_UNITS);
        self.nodes
            .insert(id, SimNode::new(id, tick_phase, Some(raft)));
        self.log(|| format!("new node {id}"));
        id
    }

    fn compact_random(&mut self) {
        use regatta_raft::Storage;
        let Some(id) = self.random_up_node() else {
            return;
        };
        let node = self.nodes.get_mut(&id).expect("node exists");
        let index = node.sm.durable_applied;
        let Some(raft) = node.raft.as_mut() else {
            return;
        };
        let storage = raft.storage();
        if index <= storage.snapshot().index || index > storage.last_index() {
            return;
        }
        let Ok(meta) = raft.snapshot_meta_at(index) else {
            return;
        };
        raft.storage_mut().create_snapshot(meta);
    }

    // ------------------------------------------------------------------
    // Liveness.

    fn heal_all(&mut self) {
        self.chaos = false;
        self.blocked.clear();
        self.heal_partition_at = None;
        // Restart every crashed node first: the membership must be judged
        // from every node's disk, not from whichever happened to be up.
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            if self.nodes[id].raft.is_none() && self.nodes[id].restart_at.is_some() {
                self.restart(*id);
            }
        }
        let membership = self.latest_membership();
        for id in ids {
            let node = &self.nodes[&id];
            let knows_removed = node
                .raft
                .as_ref()
                .is_some_and(|raft| raft.status().soft_state.removed);
            let is_member =
                !knows_removed && membership.as_ref().map(|m| m.contains(id)).unwrap_or(true);
            if !is_member {
                // Shutdown-on-remove: a removed node stops.
                let node = self.nodes.get_mut(&id).expect("node exists");
                node.raft = None;
                node.restart_at = None;
            }
        }
        self.log(|| "healed".to_string());
    }

    fn latest_membership(&self) -> Option<regatta_raft::Membership> {
        self.nodes
            .values()
            .filter_map(|node| node.raft.as_ref())
            .max_by_key(|raft| (raft.status().hard_state.commit, raft.term()))
            .map(|raft| raft.committed_membership())
    }

    fn check_liveness(&mut self) {
        let deadline = self.now + self.options.liveness_ticks_max * TICK_UNITS;
        let mut proposed_at: Option<(NodeId, LogIndex, Term)> = None;
        while self.now < deadline {
            self.step();
            let Some(leader) = self.leader() else {
                continue;
            };
            let raft = self.nodes[&leader].raft.as_ref().expect("leader is up");
            let term = raft.term();
            match proposed_at {
                None => {
                    let Some(raft) = self.node_mut(leader) else {
                        continue;
                    };
                    if let Ok(regatta_raft::Proposed::Appended { last, term, .. }) =
                        raft.propose(vec![Bytes::from_static(b"liveness")])
                    {
                        proposed_at = Some((leader, last, term));
                    }
                }
                Some((node, index, proposed_term)) => {
                    if node != leader || proposed_term != term {
                        proposed_at = None;
                        continue;
                    }
                    let applied = self.nodes[&node].sm.applied;
                    if applied >= index {
                        return;
                    }
                }
            }
        }
        for node in self.nodes.values() {
            match &node.raft {
                Some(raft) => eprintln!("node {}: {:?}", node.id, raft.status()),
                None => eprintln!("node {}: down", node.id),
            }
        }
        panic!(
            "liveness: no leader committed a proposal within {} ticks after healing",
            self.options.liveness_ticks_max
        );
    }
}

impl Checker {
    fn state_hash_at(&self, index: LogIndex) -> Option<u64> {
        if index.0 == 0 {
            return Some(0);
        }
        self.applied
            .get(index.0 as usize - 1)
            .map(|(_, hash)| *hash)
    }

    fn check_apply(&mut self, id: NodeId, entry: &Entry, hash: u64) {
        let position = entry.index.0 as usize - 1;
        match self.applied.get(position) {
            Some((term, known)) => assert!(
                *term == entry.term && *known == hash,
                "state machine safety: node {id} applied a different entry at {} (term {} vs {})",
                entry.index,
                entry.term,
                term
            ),
            None => {
                assert_eq!(
                    position,
                    self.applied.len(),
                    "applied past the known prefix"
                );
                self.applied.push((entry.term, hash));
                if let EntryPayload::Normal(_) = entry.payload {
                    self.proposals_applied += 1;
                }
            }
        }
    }

    fn check_entries(&mut self, id: NodeId, storage: &MemStorage, entries: &[Entry]) {
        use regatta_raft::Storage;
        for entry in entries {
            let prev_term = storage.term(entry.index.prev()).ok();
            let key = (entry.index, entry.term);
            let value = (hash_of(&entry.payload), prev_term);
            match self.entries.get_mut(&key) {
                Some(known) => {
                    assert_eq!(
                        known.0, value.0,
                        "log matching: node {id} holds a different entry at index {} term {}",
                        entry.index, entry.term
                    );
                    match (known.1, value.1) {
                        (Some(a), Some(b)) => assert_eq!(
                            a, b,
                            "log matching: node {id} has a different prefix before index {} term {}",
                            entry.index, entry.term
                        ),
                        (None, Some(b)) => known.1 = Some(b),
                        _ => {}
                    }
                }
                None => {
                    self.entries.insert(key, value);
                }
            }
        }
    }
}

/// Two logs that share an (index, term) are identical up to that index.
fn check_pair(a_id: NodeId, a: &MemStorage, b_id: NodeId, b: &MemStorage) {
    use regatta_raft::Storage;
    let low = a.first_index().max(b.first_index());
    let high = a.last_index().min(b.last_index());
    let mut index = high;
    while index >= low && index.0 > 0 {
        let (Ok(term_a), Ok(term_b)) = (a.term(index), b.term(index)) else {
            break;
        };
        if term_a == term_b {
            let mut below = index;
            while below >= low && below.0 > 0 {
                let entry_a = a.entries(below, below.next(), u64::MAX);
                let entry_b = b.entries(below, below.next(), u64::MAX);
                assert_eq!(
                    entry_a.ok(),
                    entry_b.ok(),
                    "log matching: nodes {a_id} and {b_id} share ({index}, {term_a}) but differ at {below}"
                );
                below = below.prev();
            }
            return;
        }
        index = index.prev();
    }
}
