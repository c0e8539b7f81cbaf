//! The Raft state machine of one node of one group: roles, elections,
//! replication, commitment, reads, leadership transfer and membership.
//!
//! Everything here is driven by calls from [`crate::RaftNode`]; nothing here
//! sleeps, reads a clock or does I/O. Output accumulates in `msgs`,
//! `msgs_after_persist` and `read_states` until the next `Ready`.
//!
//! Invariants (checked in `assert_invariants` after every public call):
//! - at most one vote per term, persisted before any message depending on it;
//! - a leader's log holds every committed entry (§5.4);
//! - the leader commits by counting only entries of its own term (§5.4.2);
//! - at most one membership change is uncommitted at a time.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;

use crate::config::{Config, ReadMode};
use crate::error::{Error, Result};
use crate::log::RaftLog;
use crate::message::{Message, MessageBody, Refusal, RejectHint};
use crate::progress::{Progress, ProgressState};
use crate::rng::Rng;
use crate::storage::Storage;
use crate::types::{
    ConfChange, Entry, EntryPayload, HardState, LogIndex, Membership, NodeId, ReadId, ReadState,
    RequestId, Role, SnapshotMeta, SoftState, Term, APPEND_ENTRIES_MAX,
};

/// Where a proposal went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proposed {
    /// Appended to the leader's log at `[first, last]` in `term`. The
    /// proposal succeeded if the entry at `last` is applied with this term.
    Appended {
        /// Index of the first appended entry.
        first: LogIndex,
        /// Index of the last appended entry.
        last: LogIndex,
        /// The leader's term.
        term: Term,
    },
    /// Forwarded to the leader; its outcome shows up only when applied.
    Forwarded {
        /// The leader it went to.
        leader: NodeId,
    },
}

/// A read waiting for a heartbeat round (ReadIndex, §6.4).
#[derive(Clone, Copy, Debug)]
struct PendingRead {
    id: ReadId,
    /// `None` for a read asked on this node.
    from: Option<NodeId>,
    /// The commit index when the read arrived.
    index: LogIndex,
    /// The heartbeat round a quorum must acknowledge.
    round: u64,
}

/// Bookkeeping of heartbeat rounds for ReadIndex and the lease.
#[derive(Debug, Default)]
struct ReadTracker {
    /// The latest round started.
    round: u64,
    /// The highest round a quorum has acknowledged.
    quorum_acked_round: u64,
    /// Start ticks of rounds not yet acknowledged by a quorum, oldest first.
    round_start_ticks: VecDeque<(u64, u64)>,
    /// The tick at which `quorum_acked_round` started.
    quorum_acked_start_tick: Option<u64>,
    /// A read arrived while a round was in flight and needs a new round.
    round_wanted: bool,
    pending: VecDeque<PendingRead>,
    /// Reads that arrived before the leader committed an entry of its term.
    waiting_for_commit: Vec<(ReadId, Option<NodeId>)>,
    /// A TimeoutNow went out in this term. Its target may campaign at any
    /// later moment (the message can sit in the network past the transfer's
    /// abort), and that campaign bypasses stickiness: no lease holds for
    /// the rest of the term. Reset with the rest of the tracker.
    lease_revoked: bool,
}

/// Round start ticks kept for the lease; older rounds lose their lease.
const ROUND_HISTORY_MAX: usize = 1024;

/// One node of one Raft group.
pub struct Raft<S: Storage> {
    pub(crate) id: NodeId,
    pub(crate) config: Config,
    pub(crate) term: Term,
    pub(crate) vote: Option<NodeId>,
    pub(crate) role: Role,
    pub(crate) leader: Option<NodeId>,
    pub(crate) log: RaftLog<S>,
    /// The membership in force: the latest in the log, committed or not
    /// (thesis §4.1). Always equal to the last entry of `history`.
    membership: Membership,
    /// Every membership in the log and the index it took effect at; the
    /// first is the membership at the snapshot.
    history: Vec<(LogIndex, Membership)>,
    /// Leader: the index of the last membership change it appended, or of
    /// its first entry of the term (no change before that one commits).
    pending_conf_index: LogIndex,
    /// The highest term the runtime reported durable (`on_persisted_term`)
    /// or storage held at start. A leader's messages leave before its
    /// fsync only once its term is durable: a lone voter wins without a
    /// vote request (whose sending waits for the fsync), and appends sent
    /// in a term that a crash could forget would let the node, restarted,
    /// win that term again and send different entries at the same index
    /// and term to its learners.
    term_durable: Term,
    was_member: bool,
    removed: bool,
    /// The commit index before the latest advance, to spot newly committed
    /// membership entries.
    log_committed_before_advance: LogIndex,
    progress: BTreeMap<NodeId, Progress>,
    votes: BTreeMap<NodeId, bool>,
    election_elapsed: u64,
    heartbeat_elapsed: u64,
    randomized_election_timeout: u64,
    /// Ticks since this node started: its local clock.
    ticks: u64,
    /// A leadership transfer in progress: target and ticks elapsed.
    transfer: Option<(NodeId, u64)>,
    /// Leader: has an entry of its own term committed (§6.4 and §5.4.2).
    committed_in_term: bool,
    uncommitted: VecDeque<(LogIndex, u64)>,
    uncommitted_bytes: u64,
    reads: ReadTracker,
    /// Leader: the commit index moved and some follower has not been sent
    /// it. `flush_commit` (once per `Ready`) sends it, so that many
    /// advances within one batch of input cost one append per follower.
    pub(crate) commit_unsent: bool,
    /// Leader: proposals appended entries that no follower has been sent
    /// yet. `flush_appends` (once per `Ready`) sends them, so that every
    /// proposal of one batch of input leaves in one append per follower,
    /// not one append per proposal.
    pub(crate) appends_unsent: bool,
    /// Messages safe to send before this node persists anything.
    pub(crate) msgs: Vec<Message>,
    /// Messages to send only after the `Ready` they came with is durable.
    pub(crate) msgs_after_persist: Vec<Message>,
    pub(crate) read_states: Vec<ReadState>,
    /// Forwarded proposals the leader refused, with the error for their
    /// callers, until the next `Ready`.
    pub(crate) refused_proposals: Vec<(Vec<RequestId>, Error)>,
    /// Reads this node forwarded that the receiver refused, for the next
    /// `Ready`.
    pub(crate) refused_reads: Vec<(Vec<ReadId>, Error)>,
    rng: Rng,
}

impl<S: Storage> Raft<S> {
    /// Builds a node from its configuration and what storage holds.
    pub fn new(config: Config, storage: S) -> Result<Raft<S>> {
        config.validate()?;
        let initial = storage.initial_state()?;
        let mut raft = Raft {
            id: config.id,
            term: initial.hard_state.term,
            vote: initial.hard_state.vote,
            role: Role::Follower,
            leader: None,
            log: RaftLog::new(storage),
            membership: Membership::default(),
            history: Vec::new(),
            pending_conf_index: LogIndex(0),
            term_durable: initial.hard_state.term,
            was_member: false,
            removed: false,
            log_committed_before_advance: LogIndex(0),
            progress: BTreeMap::new(),
            votes: BTreeMap::new(),
            election_elapsed: 0,
            heartbeat_elapsed: 0,
            randomized_election_timeout: config.election_timeout_ticks,
            ticks: 0,
            transfer: None,
            committed_in_term: false,
            uncommitted: VecDeque::new(),
            uncommitted_bytes: 0,
            reads: ReadTracker::default(),
            commit_unsent: false,
            appends_unsent: false,
            msgs: Vec::new(),
            msgs_after_persist: Vec::new(),
            read_states: Vec::new(),
            refused_proposals: Vec::new(),
            refused_reads: Vec::new(),
            rng: Rng::new(config.seed ^ config.id.0.rotate_left(32)),
            config,
        };
        let base = initial.snapshot.clone().unwrap_or_default();
        raft.membership = base.membership.clone();
        raft.history.push((base.index, base.membership));
        raft.restore_from_storage(initial.hard_state)?;
        let storage_is_empty = initial.snapshot.is_none()
            && raft.log.last_index() == LogIndex(0)
            && initial.hard_state == HardState::default();
        if storage_is_empty && !raft.config.initial_voters.is_empty() {
            raft.bootstrap();
        }
        raft.update_removed();
        raft.reset_randomized_election_timeout();
        raft.assert_invariants();
        Ok(raft)
    }

    /// Rebuilds commit, applied and membership from the persisted log.
    fn restore_from_storage(&mut self, hard_state: HardState) -> Result<()> {
        let last_index = self.log.last_index();
        let applied = self.config.applied.max(self.log.first_index().prev());
        if applied > last_index {
            return Err(Error::InvalidConfig(format!(
                "applied index {applied} is past the last log index {last_index}; storage lost entries"
            )));
        }
        // The state machine may have applied entries whose commit index was
        // not yet persisted: they were committed all the same.
        let commit = hard_state.commit.max(applied).min(last_index);
        // A torn write may keep entries of a term whose hard state was lost.
        let last_term = self.log.last_term();
        if last_term > self.term {
            self.term = last_term;
            self.vote = None;
        }
        self.scan_membership_changes()?;
        self.log.applying = applied;
        self.log.applied = applied;
        self.commit_to(commit);
        Ok(())
    }

    /// Finds the membership changes in the stored log.
    fn scan_membership_changes(&mut self) -> Result<()> {
        const SCAN_BATCH_BYTES: u64 = 4 * 1024 * 1024;
        // Entries up to the snapshot are already in its membership; a
        // storage may keep them (compaction can lag the snapshot).
        let snapshot_index = self
            .history
            .first()
            .map(|(index, _)| *index)
            .unwrap_or_default();
        let mut next = self.log.first_index().max(snapshot_index.next());
        let last_index = self.log.last_index();
        while next <= last_index {
            let batch = self
                .log
                .entries(next, last_index.next(), SCAN_BATCH_BYTES)?;
            let Some(last) = batch.last() else { break };
            next = last.index.next();
            self.track_conf_changes(&batch);
        }
        if let Some((_, latest)) = self.history.last() {
            self.membership = latest.clone();
        }
        Ok(())
    }

    /// Starts a new cluster: entry 1 of term 1 holds the initial voters, is
    /// committed at once and is identical on every initial member.
    fn bootstrap(&mut self) {
        let entry = Entry {
            term: Term(1),
            index: LogIndex(1),
            payload: EntryPayload::ConfChange(ConfChange::Bootstrap {
                voters: self.config.initial_voters.clone(),
            }),
        };
        self.term = Term(1);
        self.vote = None;
        self.append_to_log(&[entry]);
        self.commit_to(LogIndex(1));
    }

    // ---------------------------------------------------------------------
    // Accessors.

    pub(crate) fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.log.committed,
        }
    }

    pub(crate) fn soft_state(&self) -> SoftState {
        SoftState {
            leader: self.leader,
            role: self.role,
            removed: self.removed,
        }
    }

    /// The membership in force: the latest in the log, committed or not.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The membership of the latest committed membership entry.
    pub fn committed_membership(&self) -> Membership {
        self.membership_at(self.log.committed)
    }

    /// The membership in force after applying entries up to `index`, which
    /// is what a snapshot at `index` must carry.
    pub fn membership_at(&self, index: LogIndex) -> Membership {
        self.membership_ref_at(index).cloned().unwrap_or_default()
    }

    /// Snapshot metadata for a state machine snapshot taken at `index`.
    pub fn snapshot_meta_at(&self, index: LogIndex) -> Result<SnapshotMeta> {
        let applied = self.log.applied.max(self.log.applying);
        if index > applied || index > self.log.committed {
            return Err(Error::SnapshotIndexNotApplied { index, applied });
        }
        Ok(SnapshotMeta {
            index,
            term: self.log.term(index)?,
            membership: self.membership_at(index),
        })
    }

    pub(crate) fn apply_batch_bytes_max(&self) -> u64 {
        self.config.apply_batch_bytes_max
    }

    /// May campaign: a voter in the latest membership, or in the committed
    /// one while its removal or demotion is uncommitted. Without the second
    /// case, a node holding the only up-to-date log could sit out forever
    /// behind its own uncommitted removal. Votes are still counted in the
    /// latest membership, and a leader outside it hands over once the
    /// change commits (thesis §4.2.2).
    fn promotable(&self) -> bool {
        if self.removed {
            return false;
        }
        self.membership.is_voter(self.id)
            || self
                .membership_ref_at(self.log.committed)
                .is_some_and(|membership| membership.is_voter(self.id))
    }

    fn membership_ref_at(&self, index: LogIndex) -> Option<&Membership> {
        self.history
            .iter()
            .rev()
            .find(|(effective, _)| *effective <= index)
            .or(self.history.first())
            .map(|(_, membership)| membership)
    }

    fn is_single_voter(&self) -> bool {
        self.membership.voters.len() == 1 && self.membership.is_voter(self.id)
    }

    // ---------------------------------------------------------------------
    // Sending.

    fn send(&mut self, to: NodeId, term: Term, body: MessageBody) {
        let message = Message {
            from: self.id,
            to,
            term,
            body,
        };
        // A leader's messages leave before its fsync once its term is
        // durable (see `term_durable`). A snapshot carries committed state
        // only, which no restart can contradict, and the runtime sends it
        // with the state it stands for.
        let leader_sends_now = self.role == Role::Leader
            && (self.term <= self.term_durable
                || matches!(message.body, MessageBody::Snapshot { .. }));
        if leader_sends_now || !needs_persistence(&message.body) {
            self.msgs.push(message);
        } else {
            self.msgs_after_persist.push(message);
        }
    }

    fn reply(&mut self, to: NodeId, body: MessageBody) {
        self.send(to, self.term, body);
    }

    // ---------------------------------------------------------------------
    // Roles.

    fn reset(&mut self, term: Term) {
        if term != self.term {
            self.term = term;
            self.vote = None;
        }
        self.leader = None;
        self.election_elapsed = 0;
        self.heartbeat_elapsed = 0;
        self.reset_randomized_election_timeout();
        self.transfer = None;
        self.votes.clear();
        self.progress.clear();
        self.committed_in_term = false;
        self.uncommitted.clear();
        self.uncommitted_bytes = 0;
        self.reads = ReadTracker::default();
    }

    fn reset_randomized_election_timeout(&mut self) {
        let timeout = self.config.election_timeout_ticks;
        self.randomized_election_timeout = self.rng.range(timeout, 2 * timeout);
    }

    pub(crate) fn become_follower(&mut self, term: Term, leader: Option<NodeId>) {
        self.reset(term);
        self.role = Role::Follower;
        self.leader = leader;
    }

    fn become_pre_candidate(&mut self) {
        assert!(self.role != Role::Leader, "a leader cannot pre-campaign");
        self.role = Role::PreCandidate;
        self.votes.clear();
        self.leader = None;
    }

    fn become_candidate(&mut self) {
        assert!(self.role != Role::Leader, "a leader cannot campaign");
        self.reset(self.term.next());
        self.vote = Some(self.id);
        self.role = Role::Candidate;
    }

    fn become_leader(&mut self) {
        assert!(
            self.role != Role::Follower,
            "a follower cannot become leader"
        );
        self.reset(self.term);
        self.role = Role::Leader;
        self.leader = Some(self.id);
        let last_index = self.log.last_index();
        // Members whose removal is not yet committed still hear from us, so
        // that they neither time out and campaign nor miss their removal.
        let committed = self.committed_membership();
        let mut members: Vec<NodeId> = self
            .membership
            .members()
            .chain(committed.members())
            .collect();
        members.sort();
        members.dedup();
        for node in members {
            self.progress.insert(node, self.new_progress(last_index));
        }
        let own = self.new_progress(last_index);
        let own = self.progress.entry(self.id).or_insert(own);
        own.match_index = self.log.persisted;
        own.become_replicate();
        own.recent_active = true;
        // No membership change until an entry of this term commits: the
        // fix to single-server changes from the thesis errata. That entry
        // is the one appended next; a whole log committed when the
        // election was won does not count.
        self.pending_conf_index = last_index.next();
        let noop = Entry {
            term: self.term,
            index: last_index.next(),
            payload: EntryPayload::Empty,
        };
        self.append_to_log(&[noop]);
        self.maybe_commit();
    }

    fn new_progress(&self, last_index: LogIndex) -> Progress {
        Progress::new(last_index.next(), self.config.inflight_messages_max)
    }

    // ---------------------------------------------------------------------
    // Ticks.

    /// Advances the node's clock by one tick.
    pub fn tick(&mut self) {
        self.ticks += 1;
        if let Some((target, elapsed)) = self.transfer {
            self.transfer = Some((target, elapsed + 1));
        }
        if self.role == Role::Leader {
            self.tick_leader();
        } else {
            self.tick_election();
        }
    }

    fn tick_election(&mut self) {
        self.election_elapsed += 1;
        if self.promotable() && self.election_elapsed >= self.randomized_election_timeout {
            self.election_elapsed = 0;
            self.start_election();
        }
    }

    fn tick_leader(&mut self) {
        self.heartbeat_elapsed += 1;
        self.election_elapsed += 1;
        if self
            .transfer
            .is_some_and(|(_, elapsed)| elapsed >= self.config.election_timeout_ticks)
        {
            self.abort_transfer();
            if !self.membership.is_voter(self.id) {
                // A removed or demoted leader whose handover failed steps
                // down anyway; the voters elect a leader among themselves.
                self.become_follower(self.term, None);
                return;
            }
        }
        if self.election_elapsed >= self.config.election_timeout_ticks {
            self.election_elapsed = 0;
            if self.config.check_quorum && !self.quorum_recently_active() {
                self.become_follower(self.term, None);
                return;
            }
        }
        if self.heartbeat_elapsed >= self.config.heartbeat_interval_ticks {
            self.heartbeat_elapsed = 0;
            self.start_read_round();
        }
    }

    /// CheckQuorum: true when a quorum was heard from since the last check;
    /// resets the record for the next interval.
    fn quorum_recently_active(&mut self) -> bool {
        let id = self.id;
        let active = self
            .membership
            .voters
            .iter()
            .filter(|voter| {
                **voter == id || self.progress.get(voter).is_some_and(|p| p.recent_active)
            })
            .count();
        for (node, progress) in self.progress.iter_mut() {
            progress.active_last_interval = progress.recent_active;
            progress.recent_active = *node == id;
        }
        active >= self.membership.quorum()
    }

    // ---------------------------------------------------------------------
    // Elections.

    /// Starts an election now (pre-vote first when enabled).
    pub fn campaign(&mut self) {
        self.start_election();
    }

    /// An election after a timeout: pre-vote first when enabled.
    fn start_election(&mut self) {
        let kind = if self.config.pre_vote {
            CampaignKind::PreVote
        } else {
            CampaignKind::Vote
        };
        self.campaign_with(kind);
    }

    fn campaign_with(&mut self, kind: CampaignKind) {
        if self.role == Role::Leader || !self.promotable() {
            return;
        }
        let pre_vote = kind == CampaignKind::PreVote;
        let transfer = kind == CampaignKind::Transfer;
        let vote_term = if pre_vote {
            self.become_pre_candidate();
            self.term.next()
        } else {
            self.become_candidate();
            self.term
        };
        if self.record_vote(self.id, true) == VoteOutcome::Won {
            self.on_election_won(pre_vote);
            return;
        }
        let last_index = self.log.last_index();
        let last_term = self.log.last_term();
        let id = self.id;
        let voters: Vec<NodeId> = self
            .membership
            .voters
            .iter()
            .copied()
            .filter(|v| *v != id)
            .collect();
        for voter in voters {
            let body = MessageBody::Vote {
                pre_vote,
                last_index,
                last_term,
                transfer,
            };
            self.send(voter, vote_term, body);
        }
    }

    fn on_election_won(&mut self, pre_vote: bool) {
        if pre_vote {
            self.campaign_with(CampaignKind::Vote);
        } else {
            self.become_leader();
            self.broadcast_append();
        }
    }

    fn record_vote(&mut self, from: NodeId, granted: bool) -> VoteOutcome {
        if !self.membership.is_voter(from) {
            return VoteOutcome::Pending;
        }
        self.votes.entry(from).or_insert(granted);
        let granted_count = self.votes.values().filter(|granted| **granted).count();
        let rejected_count = self.votes.len() - granted_count;
        let quorum = self.membership.quorum();
        if granted_count >= quorum {
            VoteOutcome::Won
        } else if self.membership.voters.len() - rejected_count < quorum {
            VoteOutcome::Lost
        } else {
            VoteOutcome::Pending
        }
    }

    /// Stickiness: this node heard from a live leader within the election
    /// timeout. With lease reads, a node that has just started counts as
    /// having heard from one: before a restart it may have acknowledged a
    /// heartbeat that a leader's lease still rests on.
    fn in_lease(&self) -> bool {
        let just_started = self.config.read_mode == ReadMode::LeaseBased
            && self.ticks < self.config.election_timeout_ticks;
        self.config.check_quorum
            && self.election_elapsed < self.config.election_timeout_ticks
            && (self.leader.is_some() || just_started)
    }

    fn handle_vote(
        &mut self,
        message: &Message,
        pre_vote: bool,
        last_index: LogIndex,
        last_term: Term,
    ) {
        let can_vote = self.vote == Some(message.from)
            || (self.vote.is_none() && self.leader.is_none())
            || (pre_vote && message.term > self.term);
        let granted = can_vote && self.log.is_up_to_date(last_index, last_term);
        if granted {
            // Granted answers carry the candidate's term so it counts them.
            self.send(
                message.from,
                message.term,
                MessageBody::VoteResponse {
                    pre_vote,
                    granted: true,
                },
            );
            if !pre_vote {
                self.election_elapsed = 0;
                self.vote = Some(message.from);
            }
        } else {
            self.reply(
                message.from,
                MessageBody::VoteResponse {
                    pre_vote,
                    granted: false,
                },
            );
        }
    }

    // ---------------------------------------------------------------------
    // Stepping messages.

    /// Handles a message from another node.
    pub fn step(&mut self, message: Message) -> Result<()> {
        if message.to != self.id || message.from == self.id {
            return Ok(());
        }
        if message.body.is_forward() {
            return self.step_forwarded(message);
        }
        if message.term > self.term {
            if !self.step_higher_term(&message) {
                return Ok(());
            }
        } else if message.term < self.term {
            self.step_lower_term(&message);
            return Ok(());
        }
        if let MessageBody::Vote {
            pre_vote,
            last_index,
            last_term,
            ..
        } = message.body
        {
            self.handle_vote(&message, pre_vote, last_index, last_term);
            return Ok(());
        }
        match self.role {
            Role::Leader => self.step_leader(message),
            Role::Candidate | Role::PreCandidate => self.step_candidate(message),
            Role::Follower => self.step_follower(message),
        }
    }

    /// Returns false when the message must be ignored.
    fn step_higher_term(&mut self, message: &Message) -> bool {
        match message.body {
            MessageBody::Vote {
                pre_vote, transfer, ..
            } => {
                // Only a member's transfer campaign (which the leader began)
                // passes the lease; a non-member's flag counts for nothing.
                // A member, not only a voter: a learner just promoted is a
                // voter in its own log before it is in this node's.
                let transfer = transfer && self.membership.contains(message.from);
                if !transfer && self.in_lease() {
                    return false;
                }
                if !pre_vote {
                    self.become_follower(message.term, None);
                }
            }
            // A granted pre-vote answer carries the term the candidate will
            // campaign in; it changes nothing yet.
            MessageBody::VoteResponse {
                pre_vote: true,
                granted: true,
            } => {}
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                self.become_follower(message.term, Some(message.from));
            }
            _ => self.become_follower(message.term, None),
        }
        true
    }

    fn step_lower_term(&mut self, message: &Message) {
        match message.body {
            // A stale leader (e.g. back from a partition) learns the new term
            // and steps down; without this, pre-vote and check-quorum could
            // leave it unable to rejoin.
            MessageBody::Append { .. } | MessageBody::Heartbeat { .. }
                if self.config.check_quorum || self.config.pre_vote =>
            {
                // Our term in the answer makes the stale leader step down.
                self.acknowledge(message.from, LogIndex(0));
            }
            MessageBody::Vote { pre_vote: true, .. } => {
                self.reply(
                    message.from,
                    MessageBody::VoteResponse {
                        pre_vote: true,
                        granted: false,
                    },
                );
            }
            _ => {}
        }
    }

    fn step_leader(&mut self, message: Message) -> Result<()> {
        let from = message.from;
        match message.body {
            MessageBody::AppendResponse { index, reject } => {
                self.handle_append_response(from, index, reject)?;
            }
            MessageBody::HeartbeatResponse { round } => {
                self.handle_heartbeat_response(from, round)?;
            }
            // Two leaders in one term cannot exist; the rest is stale.
            _ => {}
        }
        Ok(())
    }

    fn step_candidate(&mut self, message: Message) -> Result<()> {
        let from = message.from;
        match message.body {
            MessageBody::Append { .. }
            | MessageBody::Heartbeat { .. }
            | MessageBody::Snapshot { .. } => {
                self.become_follower(message.term, Some(from));
                self.step_follower(message)?;
            }
            MessageBody::VoteResponse { pre_vote, granted } => {
                let expected_pre_vote = self.role == Role::PreCandidate;
                if pre_vote != expected_pre_vote {
                    return Ok(());
                }
                match self.record_vote(from, granted) {
                    VoteOutcome::Won => self.on_election_won(pre_vote),
                    VoteOutcome::Lost => self.become_follower(self.term, None),
                    VoteOutcome::Pending => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn step_follower(&mut self, message: Message) -> Result<()> {
        let from = message.from;
        let message_term = message.term;
        match message.body {
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                wants_ack,
            } => {
                self.election_elapsed = 0;
                self.leader = Some(from);
                let append = AppendArgs {
                    term: message.term,
                    prev_index,
                    prev_term,
                    entries,
                    commit,
                    wants_ack,
                };
                self.handle_append(from, append);
            }
            MessageBody::Heartbeat { commit, round } => {
                self.election_elapsed = 0;
                self.leader = Some(from);
                let commit = commit.min(self.log.last_index());
                self.commit_to(commit);
                self.reply(from, MessageBody::HeartbeatResponse { round });
            }
            MessageBody::Snapshot { meta } => {
                if !is_well_formed_snapshot(message_term, &meta) {
                    return Ok(()); // Malformed input from the network is dropped.
                }
                self.election_elapsed = 0;
                self.leader = Some(from);
                self.handle_snapshot(from, meta);
            }
            // A transfer: campaign at once, past the voters' stickiness.
            // Only the leader this node follows begins one, or, while it
            // knows none (just restarted: the leader's TimeoutNow may come
            // before its next append or heartbeat), a voter: from anyone
            // else it would depose a healthy leader past its lease.
            MessageBody::TimeoutNow
                if self.leader == Some(from)
                    || (self.leader.is_none() && self.membership.is_voter(from)) =>
            {
                self.campaign_with(CampaignKind::Transfer);
            }
            MessageBody::ReadIndexResponse { index, ids } => {
                let states = ids.into_iter().map(|id| ReadState { id, index });
                self.read_states.extend(states);
            }
            _ => {}
        }
        Ok(())
    }

    /// Requests a follower forwards to its leader (term 0).
    fn step_forwarded(&mut self, message: Message) -> Result<()> {
        let from = message.from;
        // Only members forward: a proposal, read or transfer from any
        // other sender (a removed node, or anyone who reached the peer
        // port) is dropped.
        if !self.membership.contains(from) {
            return Ok(());
        }
        match message.body {
            MessageBody::Propose { payloads } => self.propose_forwarded(from, payloads),
            MessageBody::ProposeRefused { ids, refusal } if !ids.is_empty() => {
                self.refused_proposals.push((ids, refusal.into_error()));
            }
            MessageBody::ReadIndex { ids } => self.read_forwarded(from, ids),
            MessageBody::ReadRefused { ids, refusal } if !ids.is_empty() => {
                self.refused_reads.push((ids, refusal.into_error()));
            }
            MessageBody::TransferLeader { target } if self.role == Role::Leader => {
                let _ = self.transfer_leader(target);
            }
            _ => {}
        }
        Ok(())
    }

    /// A proposal a follower forwarded: appended here if this node leads.
    /// Only proposals with request ids have a caller waiting on the
    /// follower; they hear of a refusal at once.
    fn propose_forwarded(&mut self, from: NodeId, payloads: Vec<EntryPayload>) {
        let ids: Vec<RequestId> = payloads
            .iter()
            .filter_map(|payload| match payload {
                EntryPayload::Session { id, .. } => Some(*id),
                _ => None,
            })
            .collect();
        let refusal = if self.role != Role::Leader {
            Refusal::NotLeader {
                leader_hint: self.leader,
            }
        } else {
            match self.propose_payloads(payloads) {
                Ok(Proposed::Appended { last, .. }) => {
                    if let Some(progress) = self.progress.get_mut(&from) {
                        progress.commit_wanted = progress.commit_wanted.max(last);
                    }
                    return;
                }
                Ok(Proposed::Forwarded { .. }) => return,
                Err(error) => Refusal::from_error(&error, Some(self.id)),
            }
        };
        if !ids.is_empty() {
            self.send(from, Term(0), MessageBody::ProposeRefused { ids, refusal });
        }
    }

    /// Reads a follower forwarded: confirmed here if this node leads. Reads
    /// it will not confirm are answered, so that their callers retry (or
    /// give up) now rather than at their timeout; one refusal for all
    /// those refused alike.
    fn read_forwarded(&mut self, from: NodeId, ids: Vec<ReadId>) {
        let mut refused: Vec<(Refusal, Vec<ReadId>)> = Vec::new();
        for id in ids {
            let refusal = if self.role != Role::Leader {
                Refusal::NotLeader {
                    leader_hint: self.leader,
                }
            } else {
                match self.leader_read(id, Some(from)) {
                    Ok(()) => continue,
                    Err(error) => Refusal::from_error(&error, Some(self.id)),
                }
            };
            match refused.iter_mut().find(|(kept, _)| *kept == refusal) {
                Some((_, all)) => all.push(id),
                None => refused.push((refusal, vec![id])),
            }
        }
        for (refusal, ids) in refused {
            for chunk in ids.chunks(crate::types::READ_IDS_PER_MESSAGE_MAX) {
                let body = MessageBody::ReadRefused {
                    ids: chunk.to_vec(),
                    refusal: refusal.clone(),
                };
                self.send(from, Term(0), body);
            }
        }
    }

    // ---------------------------------------------------------------------
    // Follower side of replication.

    #[allow(clippy::too_many_arguments)]
    fn handle_append(&mut self, from: NodeId, append: AppendArgs) {
        let AppendArgs {
            term: message_term,
            prev_index,
            prev_term,
            entries,
            commit,
            wants_ack,
        } = append;
        if !is_well_formed(message_term, prev_index, prev_term, &entries) {
            return; // Malformed input from the network is dropped.
        }
        if prev_index < self.log.committed {
            self.acknowledge(from, self.log.committed);
            return;
        }
        if !self.log.match_term(prev_index, prev_term) {
            let hint_index = prev_index.min(self.log.last_index());
            let (index, term) = self.log.find_conflict_by_term(hint_index, prev_term);
            let reject = Some(RejectHint { index, term });
            self.reply(
                from,
                MessageBody::AppendResponse {
                    index: prev_index,
                    reject,
                },
            );
            return;
        }
        let last_new = prev_index.plus(entries.len() as u64);
        if let Some(conflict) = self.log.find_conflict(&entries) {
            let position = conflict.distance_from(prev_index.next()) as usize;
            self.append_to_log(&entries[position..]);
        }
        self.commit_to(commit.min(last_new));
        if wants_ack || !entries.is_empty() {
            self.acknowledge(from, last_new);
        }
    }

    /// Tells the leader that the log matches it up to `index`.
    fn acknowledge(&mut self, to: NodeId, index: LogIndex) {
        self.reply(
            to,
            MessageBody::AppendResponse {
                index,
                reject: None,
            },
        );
    }

    fn handle_snapshot(&mut self, from: NodeId, meta: SnapshotMeta) {
        if meta.index <= self.log.committed {
            self.acknowledge(from, self.log.committed);
            return;
        }
        if self.log.match_term(meta.index, meta.term) {
            // We already hold the snapshot's last entry: fast-forward.
            self.commit_to(meta.index);
            self.acknowledge(from, self.log.committed);
            return;
        }
        let index = meta.index;
        self.membership = meta.membership.clone();
        self.history = vec![(index, meta.membership.clone())];
        self.log.restore(meta);
        self.log_committed_before_advance = index;
        self.on_membership_changed();
        self.update_removed();
        self.acknowledge(from, index);
    }

    /// Appends entries to the log and tracks the membership changes and
    /// uncommitted bytes they carry. A membership change takes effect when
    /// appended, and is undone if a new leader truncates it away.
    fn append_to_log(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else { return };
        let mut changed = false;
        while self.history.len() > 1
            && self
                .history
                .last()
                .is_some_and(|(index, _)| *index >= first.index)
        {
            self.history.pop();
            changed = true;
        }
        self.log.append(entries);
        changed |= self.track_conf_changes(entries);
        if self.role == Role::Leader {
            for entry in entries {
                if let EntryPayload::Normal(_) | EntryPayload::Session { .. } = entry.payload {
                    let size = entry.size_bytes();
                    self.uncommitted.push_back((entry.index, size));
                    self.uncommitted_bytes += size;
                }
            }
        }
        if changed {
            self.on_membership_changed();
        }
    }

    /// Records the memberships the entries set; true if any did. A change
    /// that is invalid where it stands is a no-op on every node alike.
    fn track_conf_changes(&mut self, entries: &[Entry]) -> bool {
        let mut changed = false;
        for entry in entries {
            if let EntryPayload::ConfChange(change) = &entry.payload {
                let current = self
                    .history
                    .last()
                    .map(|(_, m)| m.clone())
                    .unwrap_or_default();
                if let Ok(next) = current.apply(change) {
                    self.history.push((entry.index, next));
                    changed = true;
                }
            }
        }
        if changed {
            if let Some((_, latest)) = self.history.last() {
                self.membership = latest.clone();
            }
        }
        changed
    }

    // ---------------------------------------------------------------------
    // Commitment.

    pub(crate) fn commit_to(&mut self, index: LogIndex) {
        if self.log.commit_to(index) {
            self.on_commit_advanced();
        }
    }

    fn on_commit_advanced(&mut self) {
        let committed = self.log.committed;
        while self
            .uncommitted
            .front()
            .is_some_and(|(index, _)| *index <= committed)
        {
            if let Some((_, size)) = self.uncommitted.pop_front() {
                self.uncommitted_bytes -= size;
            }
        }
        let previous = self.log_committed_before_advance;
        let membership_committed = self
            .history
            .iter()
            .any(|(index, _)| *index > previous && *index <= committed);
        self.log_committed_before_advance = committed;
        if membership_committed {
            self.update_removed();
            if self.role == Role::Leader {
                self.leader_on_membership_committed();
            }
        }
        let committed_own_term = self.log.term(committed).is_ok_and(|term| term == self.term);
        if self.role == Role::Leader && !self.committed_in_term && committed_own_term {
            self.committed_in_term = true;
            self.release_reads_waiting_for_commit();
        }
    }

    /// Shutdown-on-remove is signalled only once the removal is committed:
    /// an uncommitted removal may still be truncated away.
    fn update_removed(&mut self) {
        let committed = self.committed_membership();
        // Any committed membership still in the history counts, not only
        // the latest: after a restart, a node whose removal committed
        // finds itself in an earlier one (unless the log was compacted
        // past it). An uncommitted one does not: a joining learner is not
        // removed while the change that adds it is pending.
        let committed_index = self.log.committed;
        if self
            .history
            .iter()
            .any(|(index, membership)| *index <= committed_index && membership.contains(self.id))
        {
            self.was_member = true;
        }
        self.removed = self.was_member && !committed.contains(self.id);
        self.trim_history();
    }

    /// Forgets memberships below the log's start, keeping the one in force
    /// there, so that history stays as short as the log.
    fn trim_history(&mut self) {
        let floor = self.log.first_index().prev().min(self.log.committed);
        let in_force = self
            .history
            .iter()
            .rposition(|(index, _)| *index <= floor)
            .unwrap_or(0);
        if in_force > 0 {
            self.history.drain(..in_force);
        }
    }

    /// The membership in the log changed (appended or truncated).
    fn on_membership_changed(&mut self) {
        if let Some((_, latest)) = self.history.last() {
            self.membership = latest.clone();
        }
        match self.role {
            Role::Leader => self.leader_on_membership_changed(),
            Role::Candidate | Role::PreCandidate if !self.promotable() => {
                self.become_follower(self.term, None);
            }
            _ => {}
        }
    }

    /// Starts replicating to new members at once; removed members keep
    /// their progress (uncounted) until their removal commits, so that they
    /// learn of it.
    fn leader_on_membership_changed(&mut self) {
        let last_index = self.log.last_index();
        let members: Vec<NodeId> = self.membership.members().collect();
        for node in members {
            if !self.progress.contains_key(&node) {
                let mut progress = self.new_progress(last_index);
                progress.recent_active = true;
                self.progress.insert(node, progress);
            }
        }
        if let Some((target, _)) = self.transfer {
            if !self.membership.is_voter(target) {
                self.abort_transfer();
            }
        }
        if self.maybe_commit() {
            self.broadcast_append();
        }
    }

    /// A membership change committed on the leader: drop the progress of
    /// removed members (telling them the commit index), and hand leadership
    /// over if this node is no longer a voter.
    fn leader_on_membership_committed(&mut self) {
        let committed = self.log.committed;
        let id = self.id;
        let gone: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .filter(|(node, _)| **node != id && !self.membership.contains(**node))
            .map(|(node, progress)| (*node, progress.match_index.min(committed)))
            .collect();
        for (node, commit) in gone {
            // One last append (or heartbeat) carries the commit index, so
            // that a removed node that holds its removal learns of it.
            if !self.send_append(node, true) {
                let round = self.reads.round;
                self.reply(node, MessageBody::Heartbeat { commit, round });
            }
            self.progress.remove(&node);
        }
        if !self.membership.is_voter(self.id) && self.transfer.is_none() {
            if let Some(target) = self.best_transfer_target() {
                let _ = self.start_transfer(target);
            }
        }
    }

    /// Commits the highest index a quorum of voters holds, if it is of the
    /// current term (§5.4.2). True when the commit index moved.
    fn maybe_commit(&mut self) -> bool {
        let mut matched: Vec<LogIndex> = self
            .membership
            .voters
            .iter()
            .map(|voter| {
                self.progress
                    .get(voter)
                    .map(|progress| progress.match_index)
                    .unwrap_or_default()
            })
            .collect();
        if matched.is_empty() {
            return false;
        }
        matched.sort_unstable_by(|a, b| b.cmp(a));
        let candidate = matched[self.membership.quorum() - 1];
        if candidate <= self.log.committed {
            return false;
        }
        if !self.log.match_term(candidate, self.term) {
            return false;
        }
        self.commit_to(candidate);
        true
    }

    // ---------------------------------------------------------------------
    // Leader side of replication.

    /// The other members whose progress satisfies `keep`.
    fn followers_where(&self, keep: impl Fn(&Progress) -> bool) -> Vec<NodeId> {
        self.progress
            .iter()
            .filter(|(node, progress)| **node != self.id && keep(progress))
            .map(|(node, _)| *node)
            .collect()
    }

    pub(crate) fn broadcast_append(&mut self) {
        for target in self.followers_where(|_| true) {
            self.send_append(target, true);
        }
    }

    /// Sends the follower what it lacks; true if a message went out.
    fn send_append(&mut self, to: NodeId, send_if_empty: bool) -> bool {
        let Some(progress) = self.progress.get(&to) else {
            return false;
        };
        if progress.is_paused() {
            return false;
        }
        let next_index = progress.next_index;
        let prev_index = next_index.prev();
        let last_index = self.log.last_index();
        let prev_term = self.log.term(prev_index);
        let entries = self.log.entries(
            next_index,
            last_index.next().min(next_index.plus(APPEND_ENTRIES_MAX)),
            self.config.message_size_bytes_max,
        );
        let (prev_term, entries) = match (prev_term, entries) {
            (Ok(term), Ok(entries)) => (term, entries),
            _ => return self.send_snapshot(to),
        };
        if entries.is_empty() && !send_if_empty {
            return false;
        }
        let commit = self.log.committed;
        // In the replicate state an empty append only carries the commit
        // index: the follower answers it only on a mismatch (a lost
        // append), which sends it back to probing.
        let mut wants_ack = true;
        if let Some(progress) = self.progress.get_mut(&to) {
            wants_ack = !(entries.is_empty() && progress.state == ProgressState::Replicate);
            progress.commit_sent = commit;
            progress.sent_append(entries.last().map(|entry| entry.index));
        }
        self.reply(
            to,
            MessageBody::Append {
                prev_index,
                prev_term,
                entries,
                commit,
                wants_ack,
            },
        );
        true
    }

    fn send_snapshot(&mut self, to: NodeId) -> bool {
        let reachable = self.progress.get(&to).is_some_and(|p| p.reachable());
        if !reachable {
            return false;
        }
        let meta = match self.log.storage.snapshot_meta() {
            Ok(meta) if meta.index.0 > 0 => meta,
            _ => return false,
        };
        if let Some(progress) = self.progress.get_mut(&to) {
            progress.become_snapshot(meta.index);
        }
        self.reply(to, MessageBody::Snapshot { meta });
        true
    }

    fn handle_append_response(
        &mut self,
        from: NodeId,
        index: LogIndex,
        reject: Option<RejectHint>,
    ) -> Result<()> {
        let last_index = self.log.last_index();
        let Some(progress) = self.progress.get_mut(&from) else {
            return Ok(());
        };
        progress.recent_active = true;
        if let Some(hint) = reject {
            let match_hint = if hint.term.0 > 0 {
                self.log.find_conflict_by_term(hint.index, hint.term).0
            } else {
                hint.index
            };
            let Some(progress) = self.progress.get_mut(&from) else {
                return Ok(());
            };
            if progress.maybe_decrease_to(index, match_hint) {
                if progress.state == ProgressState::Replicate {
                    progress.become_probe();
                }
                self.send_append(from, true);
            }
            return Ok(());
        }
        if index > last_index {
            return Ok(()); // Nonsense from the network: ignore.
        }
        let was_paused = progress.is_paused();
        if !progress.maybe_update(index) {
            if was_paused {
                // A stale answer may still unblock a probe.
                self.send_append(from, false);
            }
            return Ok(());
        }
        match progress.state {
            ProgressState::Probe => progress.become_replicate(),
            ProgressState::Snapshot if progress.match_index >= progress.pending_snapshot => {
                progress.become_probe();
                progress.become_replicate();
            }
            ProgressState::Replicate => progress.free_inflights_to(index),
            ProgressState::Snapshot => {}
        }
        let committed = self.maybe_commit();
        if committed {
            self.commit_unsent = true;
        }
        while self.send_append(from, false) {}
        let caught_up = self
            .progress
            .get(&from)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if self.transfer.is_some_and(|(target, _)| target == from) && caught_up {
            self.send_timeout_now(from);
        }
        if committed {
            // The commit may be what a caught-up learner waited for (its
            // own addition): it will not necessarily answer again.
            let learners: Vec<NodeId> = self.membership.auto_promote.iter().copied().collect();
            for learner in learners {
                self.maybe_auto_promote(learner);
            }
        } else {
            self.maybe_auto_promote(from);
        }
        Ok(())
    }

    fn handle_heartbeat_response(&mut self, from: NodeId, round: u64) -> Result<()> {
        let last_index = self.log.last_index();
        let Some(progress) = self.progress.get_mut(&from) else {
            return Ok(());
        };
        progress.on_heartbeat_response();
        // No heartbeat of this term carried a later round than the current
        // one: a later one would confirm read rounds not yet begun.
        if round <= self.reads.round {
            progress.acked_round = progress.acked_round.max(round);
        }
        // A follower behind us gets an append even if it carries nothing
        // new: appends lost in flight leave `next_index` past what it holds,
        // and its rejection of this one resynchronises it.
        let behind = progress.match_index < last_index;
        if behind {
            self.send_append(from, true);
        }
        // An idle group sends only heartbeats: a learner that caught up
        // without an append answer the promotion could follow is promoted
        // here.
        self.maybe_auto_promote(from);
        self.advance_read_rounds();
        Ok(())
    }

    // ---------------------------------------------------------------------
    // Proposals.

    /// Proposes application commands.
    pub fn propose(&mut self, commands: Vec<Bytes>) -> Result<Proposed> {
        if commands.is_empty() {
            return Err(Error::InvalidProposal(
                "a proposal needs at least one command".into(),
            ));
        }
        let payloads = commands.into_iter().map(EntryPayload::Normal).collect();
        self.propose_or_forward(payloads)
    }

    /// Proposes one application command carrying the id of the request
    /// that sent it (see [`EntryPayload::Session`]).
    pub fn propose_with_id(&mut self, id: RequestId, command: Bytes) -> Result<Proposed> {
        if !id.is_valid() {
            return Err(Error::InvalidProposal(
                "a request id needs a non-zero client and sequence".into(),
            ));
        }
        self.propose_or_forward(vec![EntryPayload::Session { id, command }])
    }

    fn propose_or_forward(&mut self, payloads: Vec<EntryPayload>) -> Result<Proposed> {
        if self.role == Role::Leader {
            return self.propose_payloads(payloads);
        }
        let leader = self.forward_target()?;
        self.send(leader, Term(0), MessageBody::Propose { payloads });
        Ok(Proposed::Forwarded { leader })
    }

    fn forward_target(&self) -> Result<NodeId> {
        if self.removed {
            return Err(Error::Removed);
        }
        match self.leader {
            Some(leader) if self.config.forward_to_leader && leader != self.id => Ok(leader),
            leader_hint => Err(Error::NotLeader { leader_hint }),
        }
    }

    /// Refuses a proposal this leader cannot take now: empty, holding an
    /// empty entry, during a leadership transfer, over the apply backlog
    /// (membership changes excepted), or a membership change that is not
    /// alone or not allowed now.
    fn check_proposal(&self, payloads: &[EntryPayload]) -> Result<()> {
        if payloads.is_empty() {
            return Err(Error::InvalidProposal(
                "a proposal needs at least one command".into(),
            ));
        }
        if payloads
            .iter()
            .any(|payload| matches!(payload, EntryPayload::Empty))
        {
            // Only a new leader appends an empty entry; one proposed (or
            // forwarded by a peer) would count toward no size limit.
            return Err(Error::InvalidProposal(
                "an empty entry is Raft's own and cannot be proposed".into(),
            ));
        }
        if let Some((target, _)) = self.transfer {
            return Err(Error::TransferInProgress { target });
        }
        // Membership changes pass (etcd's limit holds back client writes
        // only): a cluster whose state machine is behind must still be
        // able to replace a member.
        let backlog_entries = self.log.committed.0.saturating_sub(self.log.applied.0);
        let changes_membership = payloads
            .iter()
            .any(|payload| matches!(payload, EntryPayload::ConfChange(_)));
        if backlog_entries > self.config.apply_backlog_entries_max && !changes_membership {
            return Err(Error::ApplyBacklog {
                backlog_entries,
                limit_entries: self.config.apply_backlog_entries_max,
            });
        }
        let mut changes = payloads.iter().filter_map(|payload| match payload {
            EntryPayload::ConfChange(change) => Some(change),
            _ => None,
        });
        if let Some(change) = changes.next() {
            if payloads.len() > 1 {
                return Err(Error::InvalidProposal(
                    "a membership change must be proposed alone".into(),
                ));
            }
            self.check_conf_change(change)?;
        }
        Ok(())
    }

    /// Appends payloads as the leader after every check.
    fn propose_payloads(&mut self, payloads: Vec<EntryPayload>) -> Result<Proposed> {
        self.check_proposal(&payloads)?;
        let last_index = self.log.last_index();
        let term = self.term;
        let entries: Vec<Entry> = payloads
            .into_iter()
            .enumerate()
            .map(|(position, payload)| Entry {
                term,
                index: last_index.plus(position as u64 + 1),
                payload,
            })
            .collect();
        let proposal_bytes: u64 = entries.iter().map(Entry::size_bytes).sum();
        let limit_bytes = self.config.uncommitted_size_bytes_max;
        // A single entry over the limit still goes when nothing else is
        // uncommitted (it could never go otherwise); a batch does not.
        let over = self.uncommitted_bytes + proposal_bytes > limit_bytes;
        if over && (self.uncommitted_bytes > 0 || entries.len() > 1) {
            return Err(Error::UncommittedSizeExceeded {
                uncommitted_bytes: self.uncommitted_bytes,
                proposal_bytes,
                limit_bytes,
            });
        }
        let first = last_index.next();
        let last = last_index.plus(entries.len() as u64);
        if entries
            .iter()
            .any(|e| matches!(e.payload, EntryPayload::ConfChange(_)))
        {
            self.pending_conf_index = last;
        }
        self.append_to_log(&entries);
        self.maybe_commit();
        // Sent by `flush_appends` when the runtime takes the `Ready`: the
        // proposals of the same batch of input join this append.
        self.appends_unsent = true;
        Ok(Proposed::Appended { first, last, term })
    }

    /// Proposes a membership change (one at a time).
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Proposed> {
        if let ConfChange::Bootstrap { .. } = change {
            return Err(Error::ConfChangeRefused {
                reason: "bootstrap is only valid as the first entry of a new cluster".into(),
            });
        }
        self.propose_or_forward(vec![EntryPayload::ConfChange(change)])
    }

    /// The leader's checks that a change is safe to start now.
    fn check_conf_change(&self, change: &ConfChange) -> Result<()> {
        let refused = |reason: String| Err(Error::ConfChangeRefused { reason });
        if let ConfChange::Bootstrap { .. } = change {
            return refused("bootstrap is only valid as the first entry of a new cluster".into());
        }
        let latest_change = self
            .history
            .last()
            .map(|(index, _)| *index)
            .unwrap_or_default();
        let pending = self.pending_conf_index.max(latest_change);
        if pending > self.log.committed {
            return refused(format!(
                "an earlier change or the new leader's first entry (index {pending}) is not yet committed; retry once it is"
            ));
        }
        let next = self.membership.apply(change)?;
        if let ConfChange::Promote { node } = change {
            let matched = self
                .progress
                .get(node)
                .map(|p| p.match_index)
                .unwrap_or_default();
            if matched < self.log.committed {
                return refused(format!(
                    "learner {node} has not caught up (holds {matched}, commit is {}); retry later",
                    self.log.committed
                ));
            }
        }
        let reachable = next
            .voters
            .iter()
            .filter(|voter| {
                **voter == self.id || self.progress.get(voter).is_some_and(|p| p.reachable())
            })
            .count();
        if reachable < next.quorum() {
            return refused(format!(
                "after the change only {reachable} of {} voters are reachable, below the quorum of {}",
                next.voters.len(),
                next.quorum()
            ));
        }
        Ok(())
    }

    fn maybe_auto_promote(&mut self, node: NodeId) {
        if !self.membership.auto_promote.contains(&node) || self.transfer.is_some() {
            return;
        }
        let caught_up = self
            .progress
            .get(&node)
            .is_some_and(|p| p.match_index >= self.log.committed);
        if caught_up && self.pending_conf_index <= self.log.committed {
            let _ =
                self.propose_payloads(vec![EntryPayload::ConfChange(ConfChange::Promote { node })]);
        }
    }

    /// UNSAFE operator override for a group that lost its quorum for good:
    /// removes `node` by committing the change locally, without a quorum.
    ///
    /// Run it on exactly one survivor, the one with the most up-to-date log;
    /// wipe and re-add the others. Entries committed only on lost nodes are
    /// lost, and running it on two nodes can make their logs diverge.
    pub fn force_remove(&mut self, node: NodeId) -> Result<()> {
        let change = ConfChange::Remove { node };
        self.membership.apply(&change)?;
        if self.role != Role::Leader {
            // A fresh term that this node alone has voted in.
            let term = self.term.next();
            self.become_follower(term, None);
            self.vote = Some(self.id);
        }
        let index = self.log.last_index().next();
        let entry = Entry {
            term: self.term,
            index,
            payload: EntryPayload::ConfChange(change),
        };
        self.append_to_log(&[entry]);
        self.commit_to(index);
        if self.role == Role::Leader {
            self.broadcast_append();
        }
        Ok(())
    }

    // ---------------------------------------------------------------------
    // Leadership transfer.

    /// Hands leadership to `target` (§3.10). On a follower the request is
    /// forwarded to the leader.
    pub fn transfer_leader(&mut self, target: NodeId) -> Result<()> {
        if self.role != Role::Leader {
            let leader = self.forward_target()?;
            self.send(leader, Term(0), MessageBody::TransferLeader { target });
            return Ok(());
        }
        if target == self.id {
            return Ok(());
        }
        self.start_transfer(target)
    }

    fn start_transfer(&mut self, target: NodeId) -> Result<()> {
        if !self.membership.is_voter(target) {
            return Err(Error::TransferRefused {
                reason: format!("node {target} is not a voter"),
            });
        }
        if let Some((current, _)) = self.transfer {
            if current == target {
                return Ok(());
            }
        }
        self.transfer = Some((target, 0));
        let caught_up = self
            .progress
            .get(&target)
            .is_some_and(|p| p.match_index == self.log.last_index());
        if caught_up {
            self.send_timeout_now(target);
        } else {
            self.send_append(target, true);
        }
        Ok(())
    }

    /// Tells a transfer's target to campaign now, which ends the lease for
    /// this term (see `ReadTracker::lease_revoked`).
    fn send_timeout_now(&mut self, target: NodeId) {
        self.reads.lease_revoked = true;
        self.reply(target, MessageBody::TimeoutNow);
    }

    fn abort_transfer(&mut self) {
        self.transfer = None;
    }

    fn best_transfer_target(&self) -> Option<NodeId> {
        self.membership
            .voters
            .iter()
            .filter(|voter| **voter != self.id)
            .filter_map(|voter| {
                self.progress
                    .get(voter)
                    .map(|p| (p.reachable(), p.match_index, *voter))
            })
            .max()
            .map(|(_, _, voter)| voter)
    }

    /// Asks the leader to hand over to the most up-to-date voter, e.g.
    /// before shutting down.
    pub fn step_down(&mut self) -> Result<()> {
        if self.role != Role::Leader {
            return Err(Error::NotLeader {
                leader_hint: self.leader,
            });
        }
        match self.best_transfer_target() {
            Some(target) => self.start_transfer(target),
            None => Err(Error::TransferRefused {
                reason: "no other voter to hand leadership to".into(),
            }),
        }
    }

    /// Leave-on-terminate: proposes removing this node; a leader hands over
    /// leadership once the removal commits.
    pub fn leave(&mut self) -> Result<Proposed> {
        self.propose_conf_change(ConfChange::Remove { node: self.id })
    }

    // ---------------------------------------------------------------------
    // Reads.

    /// Asks for a linearizable read; the answer arrives as a [`ReadState`].
    pub fn read_index(&mut self, id: ReadId) -> Result<()> {
        if self.role == Role::Leader {
            return self.leader_read(id, None);
        }
        let leader = self.forward_target()?;
        self.send(leader, Term(0), MessageBody::ReadIndex { ids: vec![id] });
        Ok(())
    }

    fn leader_read(&mut self, id: ReadId, from: Option<NodeId>) -> Result<()> {
        let queued = self.reads.pending.len() + self.reads.waiting_for_commit.len();
        if queued >= self.config.pending_reads_max {
            return Err(Error::TooManyPendingReads {
                queued,
                limit: self.config.pending_reads_max,
            });
        }
        if !self.committed_in_term {
            self.reads.waiting_for_commit.push((id, from));
            return Ok(());
        }
        self.confirm_read(id, from);
        Ok(())
    }

    fn confirm_read(&mut self, id: ReadId, from: Option<NodeId>) {
        let index = self.log.committed;
        if self.is_single_voter() || self.lease_valid() {
            self.release_read(id, from, index);
            return;
        }
        let in_flight = self.reads.quorum_acked_round < self.reads.round;
        let round = if in_flight {
            self.reads.round_wanted = true;
            self.reads.round + 1
        } else {
            self.start_read_round();
            self.reads.round
        };
        self.reads.pending.push_back(PendingRead {
            id,
            from,
            index,
            round,
        });
    }

    fn lease_valid(&self) -> bool {
        let revoked = self.transfer.is_some() || self.reads.lease_revoked;
        if self.config.read_mode != ReadMode::LeaseBased || revoked {
            return false;
        }
        let Some(start_tick) = self.reads.quorum_acked_start_tick else {
            return false;
        };
        let lease_ticks = self.config.election_timeout_ticks - self.config.lease_clock_drift_ticks;
        self.ticks < start_tick + lease_ticks
    }

    fn release_reads_waiting_for_commit(&mut self) {
        let waiting = std::mem::take(&mut self.reads.waiting_for_commit);
        for (id, from) in waiting {
            self.confirm_read(id, from);
        }
    }

    fn release_read(&mut self, id: ReadId, from: Option<NodeId>, index: LogIndex) {
        match from {
            None => self.read_states.push(ReadState { id, index }),
            Some(node) => {
                // The follower serves the read once it has applied
                // `index`. The read round's heartbeat told it the commit
                // if it held the entries then; if it did not, under
                // `CommitBroadcast::Deferred` it must still hear of that
                // commit now, not when the runtime's timer fires.
                if let Some(progress) = self.progress.get_mut(&node) {
                    progress.commit_wanted = progress.commit_wanted.max(index);
                }
                self.reply(
                    node,
                    MessageBody::ReadIndexResponse {
                        index,
                        ids: vec![id],
                    },
                );
            }
        }
    }

    /// Starts a heartbeat round: every voter that answers it confirms this
    /// node was leader when the round started.
    fn start_read_round(&mut self) {
        self.reads.round += 1;
        self.reads.round_wanted = false;
        let round = self.reads.round;
        if self.reads.round_start_ticks.len() >= ROUND_HISTORY_MAX {
            self.reads.round_start_ticks.pop_front();
        }
        self.reads.round_start_ticks.push_back((round, self.ticks));
        if let Some(own) = self.progress.get_mut(&self.id) {
            own.acked_round = round;
        }
        let committed = self.log.committed;
        let targets: Vec<(NodeId, LogIndex)> = self
            .progress
            .iter()
            .filter(|(node, _)| **node != self.id)
            .map(|(node, progress)| (*node, progress.match_index.min(committed)))
            .collect();
        for (node, commit) in targets {
            // The heartbeat carries the commit index as an append would:
            // a deferred broadcast need not send it again.
            if let Some(progress) = self.progress.get_mut(&node) {
                progress.commit_sent = progress.commit_sent.max(commit);
            }
            self.reply(node, MessageBody::Heartbeat { commit, round });
        }
        if self.is_single_voter() {
            self.advance_read_rounds();
        }
    }

    /// Releases the reads whose round a quorum acknowledged.
    fn advance_read_rounds(&mut self) {
        let mut acked: Vec<u64> = self
            .membership
            .voters
            .iter()
            .map(|voter| self.progress.get(voter).map(|p| p.acked_round).unwrap_or(0))
            .collect();
        if acked.is_empty() {
            return;
        }
        acked.sort_unstable_by(|a, b| b.cmp(a));
        let quorum_acked = acked[self.membership.quorum() - 1];
        if quorum_acked <= self.reads.quorum_acked_round {
            return;
        }
        self.reads.quorum_acked_round = quorum_acked;
        while self
            .reads
            .round_start_ticks
            .front()
            .is_some_and(|(round, _)| *round < quorum_acked)
        {
            self.reads.round_start_ticks.pop_front();
        }
        self.reads.quorum_acked_start_tick = match self.reads.round_start_ticks.front() {
            Some((round, tick)) if *round == quorum_acked => Some(*tick),
            _ => None,
        };
        while let Some(read) = self.reads.pending.front().copied() {
            if read.round > quorum_acked {
                break;
            }
            self.reads.pending.pop_front();
            self.release_read(read.id, read.from, read.index);
        }
        if self.reads.round_wanted && quorum_acked == self.reads.round {
            self.start_read_round();
        }
    }

    // ---------------------------------------------------------------------
    // Feedback from the runtime.

    /// The hard state of term `term` is durable.
    pub(crate) fn on_persisted_term(&mut self, term: Term) {
        self.term_durable = self.term_durable.max(term);
    }

    /// The runtime made entries up to `index` of `term` durable.
    pub(crate) fn on_persisted_entries(&mut self, index: LogIndex, term: Term) {
        self.log.stable_to(index, term);
        if self.role != Role::Leader {
            return;
        }
        let persisted = self.log.persisted;
        let updated = self
            .progress
            .get_mut(&self.id)
            .is_some_and(|own| own.maybe_update(persisted));
        if updated && self.maybe_commit() {
            self.commit_unsent = true;
        }
    }

    /// Leader: a follower waits for the commit of an entry it forwarded
    /// and has not been sent it (see `Progress::commit_wanted`).
    pub(crate) fn commit_wanted_unsent(&self) -> bool {
        // Asked by `has_ready` all the time: no allocation.
        self.commit_unsent
            && self.role == Role::Leader
            && self.progress.iter().any(|(node, progress)| {
                *node != self.id && progress.wants_commit(self.log.committed)
            })
    }

    /// Leader: sends the commit index to the followers that wait for it
    /// (`commit_wanted_unsent`); the others wait for `flush_commit`.
    pub(crate) fn flush_wanted_commit(&mut self) {
        if !self.commit_wanted_unsent() {
            return;
        }
        let committed = self.log.committed;
        for node in self.followers_where(|progress| progress.wants_commit(committed)) {
            self.send_append(node, true);
            // Paused (a full window, a snapshot in flight): give up the
            // wish; the follower learns the commit like the others.
            if let Some(progress) = self.progress.get_mut(&node) {
                if progress.wants_commit(committed) {
                    progress.commit_wanted = progress.commit_sent;
                }
            }
        }
    }

    /// Leader: sends every follower the proposed entries it lacks, as many
    /// appends as its progress allows (one, unless they exceed
    /// `message_size_bytes_max`), and a probe to a follower being probed.
    /// A follower that is paused (a full window, a probe or a snapshot in
    /// flight) gets them when it answers.
    pub(crate) fn flush_appends(&mut self) {
        if !std::mem::take(&mut self.appends_unsent) || self.role != Role::Leader {
            return;
        }
        for node in self.followers_where(|_| true) {
            // A probed follower (a new member, say) gets a probe even when
            // its next index is past the log: its answer finds the match.
            let probing = self
                .progress
                .get(&node)
                .is_some_and(|progress| progress.state == ProgressState::Probe);
            if self.send_append(node, probing) {
                while self.send_append(node, false) {}
            }
        }
    }

    /// Leader: sends the commit index to every follower whose latest
    /// append did not carry it (with any entries it still lacks).
    pub(crate) fn flush_commit(&mut self) {
        if !std::mem::take(&mut self.commit_unsent) || self.role != Role::Leader {
            return;
        }
        let committed = self.log.committed;
        for node in self.followers_where(|progress| progress.commit_sent < committed) {
            self.send_append(node, true);
        }
    }

    /// The transport could not reach `node`: stop pipelining to it.
    pub fn report_unreachable(&mut self, node: NodeId) {
        if let Some(progress) = self.progress.get_mut(&node) {
            if progress.state == ProgressState::Replicate {
                progress.become_probe();
            }
        }
    }

    /// The runtime finished (or failed) sending a snapshot to `node`.
    pub fn report_snapshot(&mut self, node: NodeId, success: bool) {
        let Some(progress) = self.progress.get_mut(&node) else {
            return;
        };
        if progress.state != ProgressState::Snapshot {
            return;
        }
        if !success {
            progress.pending_snapshot = LogIndex(0);
        }
        progress.become_probe();
        // Wait for a heartbeat answer before probing again.
        progress.probe_sent = true;
    }

    /// Checks the invariants that must hold after every call.
    pub(crate) fn assert_invariants(&self) {
        self.log.assert_invariants();
        assert!(
            self.log.last_term() <= self.term,
            "log term above current term"
        );
        if self.role == Role::Leader {
            assert_eq!(self.leader, Some(self.id), "leader does not know itself");
        }
        // A walk of every member set, after every step: debug builds (and
        // so the simulation) only. It cost 2% of a 64-group node's CPU.
        debug_assert_eq!(
            self.history.last().map(|(_, m)| m),
            Some(&self.membership),
            "membership is not the latest in the log"
        );
    }

    /// Leader-side view of each member, for status.
    pub(crate) fn progress_summary(&self) -> Vec<(NodeId, LogIndex, ProgressState)> {
        self.progress
            .iter()
            .map(|(node, p)| (*node, p.match_index, p.state))
            .collect()
    }
}

/// The fields of an append received from the leader.
struct AppendArgs {
    term: Term,
    prev_index: LogIndex,
    prev_term: Term,
    entries: Vec<Entry>,
    commit: LogIndex,
    wants_ack: bool,
}

/// Entries must follow `prev_index` without gaps, with terms that never go
/// down and never exceed the sender's term.
fn is_well_formed(
    message_term: Term,
    prev_index: LogIndex,
    prev_term: Term,
    entries: &[Entry],
) -> bool {
    // Only index 0 has term 0; and no entry is of a term after its sender's.
    if (prev_index > LogIndex(0) && prev_term == Term(0)) || prev_term > message_term {
        return false;
    }
    let mut previous_term = prev_term;
    for (position, entry) in entries.iter().enumerate() {
        let expected_index = prev_index.plus(position as u64 + 1);
        if entry.index != expected_index || entry.term < previous_term || entry.term > message_term
        {
            return false;
        }
        previous_term = entry.term;
    }
    true
}

/// Whether a snapshot's metadata can be true: it stands for entries of its
/// sender's term or earlier, at an index a log can hold, with voters.
fn is_well_formed_snapshot(message_term: Term, meta: &SnapshotMeta) -> bool {
    meta.term > Term(0)
        && meta.term <= message_term
        && meta.index > LogIndex(0)
        && meta.index.0 <= crate::types::INDEX_MAX
        && !meta.membership.voters.is_empty()
}

/// Whether a follower's or candidate's message may leave only once the
/// state of its `Ready` is durable (a leader's never need to).
///
/// Votes and append answers promise something about this node's durable
/// state: a vote that survives a crash, entries that survive it. The rest
/// promise nothing about it and leave at once, so that a disk under load
/// does not delay them: a heartbeat answer says only that this node knew
/// no higher term when it arrived (any vote for a higher term would have
/// raised it first), and forwarded proposals, reads and transfer requests
/// are plain requests to the leader.
fn needs_persistence(body: &MessageBody) -> bool {
    !(body.is_forward() || matches!(body, MessageBody::HeartbeatResponse { .. }))
}

/// Why a node campaigns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum CampaignKind {
    /// Ask first, without raising the term (§9.6).
    PreVote,
    /// A real election in a new term.
    Vote,
    /// A real election ordered by the leader (TimeoutNow); voters grant it
    /// even while they hear from that leader.
    Transfer,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum VoteOutcome {
    Won,
    Lost,
    Pending,
}
