//! [`RaftNode`]: the API the runtime drives, and [`Ready`], the batch of work
//! it collects.
//!
//! The loop a runtime runs:
//! 1. feed input: [`RaftNode::tick`], [`RaftNode::step`], proposals, reads;
//! 2. take a [`Ready`] when [`RaftNode::has_ready`];
//! 3. send `ready.messages` at once (a leader's appends go out before its own
//!    fsync: pipelining);
//! 4. persist `ready.snapshot`, then `ready.entries` (which may overwrite a
//!    suffix), then `ready.hard_state`; once that is durable, send
//!    `ready.persisted_messages` and call [`RaftNode::on_persisted`] with
//!    `ready.number`, in either order;
//! 5. apply `ready.committed_entries` (possibly on another task) and report
//!    progress with [`RaftNode::advance_apply`].
//!
//! Several readies may be in flight before the first is persisted, as long
//! as they are persisted in order.

use std::collections::VecDeque;

use bytes::Bytes;

use crate::config::{CommitBroadcast, Config};
use crate::error::{Error, Result};
use crate::message::{Message, MessageBody};
use crate::progress::ProgressState;
use crate::raft::{Proposed, Raft};
use crate::storage::Storage;
use crate::types::{
    ConfChange, Entry, HardState, LogIndex, Membership, NodeId, ReadId, ReadState, RequestId, Role,
    SnapshotMeta, SoftState, Term,
};

/// One batch of work for the runtime; see the module documentation for the
/// order in which to handle its parts.
#[derive(Debug, Default)]
pub struct Ready {
    /// Acknowledge with [`RaftNode::on_persisted`] once durable.
    pub number: u64,
    /// Leader and role, when they changed.
    pub soft_state: Option<SoftState>,
    /// Hard state to persist, when it changed.
    pub hard_state: Option<HardState>,
    /// A snapshot from the leader to install and persist before `entries`.
    pub snapshot: Option<SnapshotMeta>,
    /// Entries to persist; the first may overwrite a stored suffix.
    pub entries: Vec<Entry>,
    /// Messages to send now.
    pub messages: Vec<Message>,
    /// Messages to send only after this ready is durable.
    pub persisted_messages: Vec<Message>,
    /// Committed, durable entries to apply, in order.
    pub committed_entries: Vec<Entry>,
    /// Confirmed reads: serve each once `index` is applied.
    pub read_states: Vec<ReadState>,
    /// Proposals this node forwarded that the leader refused (it appended
    /// none of them), with the error for their callers.
    /// One error per refusal, not per id: a refusal's reason may be long.
    pub refused_proposals: Vec<(Vec<RequestId>, Error)>,
    /// Reads this node forwarded that the receiver would not confirm (not
    /// the leader, or over its pending-reads limit), with the error for
    /// their callers.
    pub refused_reads: Vec<(Vec<ReadId>, Error)>,
}

impl Ready {
    /// True when nothing needs persisting.
    pub fn is_persist_free(&self) -> bool {
        self.hard_state.is_none() && self.snapshot.is_none() && self.entries.is_empty()
    }
}

/// A readiness record kept until the runtime acknowledges persistence.
#[derive(Debug)]
struct PersistRecord {
    number: u64,
    /// The term of the ready's hard state, if it had one.
    term: Option<Term>,
    last_entry: Option<(LogIndex, Term)>,
    snapshot_index: Option<LogIndex>,
}

/// A member's replication state as the leader sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    /// The member.
    pub node: NodeId,
    /// The highest index known to match the leader.
    pub match_index: LogIndex,
    /// Its flow-control state.
    pub state: ProgressState,
}

/// A snapshot of a node's state, for status endpoints and tests.
#[derive(Clone, Debug)]
pub struct Status {
    /// This node.
    pub id: NodeId,
    /// Role, leader and removal.
    pub soft_state: SoftState,
    /// Term, vote and commit index.
    pub hard_state: HardState,
    /// The index handed out for applying.
    pub applying: LogIndex,
    /// The index the runtime reported applied.
    pub applied: LogIndex,
    /// The last log index.
    pub last_index: LogIndex,
    /// The first index still in the log.
    pub first_index: LogIndex,
    /// The durable prefix of the log.
    pub persisted: LogIndex,
    /// The membership in force: the latest in the log, committed or not.
    pub membership: Membership,
    /// The membership of the latest committed membership entry.
    pub committed_membership: Membership,
    /// Leader only: each member's progress.
    pub peers: Vec<PeerStatus>,
}

/// One node of one Raft group, as the runtime drives it.
pub struct RaftNode<S: Storage> {
    raft: Raft<S>,
    previous_soft_state: SoftState,
    previous_hard_state: HardState,
    next_ready_number: u64,
    unacknowledged: VecDeque<PersistRecord>,
}

impl<S: Storage> RaftNode<S> {
    /// Builds a node from its configuration and its storage.
    pub fn new(config: Config, storage: S) -> Result<RaftNode<S>> {
        let raft = Raft::new(config, storage)?;
        let previous_hard_state = HardState {
            commit: LogIndex(u64::MAX),
            ..HardState::default()
        };
        Ok(RaftNode {
            previous_soft_state: raft.soft_state(),
            previous_hard_state,
            raft,
            next_ready_number: 1,
            unacknowledged: VecDeque::new(),
        })
    }

    /// Advances the clock by one tick.
    pub fn tick(&mut self) {
        self.raft.tick();
        self.raft.assert_invariants();
    }

    /// Handles a message from a peer.
    pub fn step(&mut self, message: Message) -> Result<()> {
        let result = self.raft.step(message);
        self.raft.assert_invariants();
        result
    }

    /// Proposes application commands; see [`Proposed`].
    pub fn propose(&mut self, commands: Vec<Bytes>) -> Result<Proposed> {
        let result = self.raft.propose(commands);
        self.raft.assert_invariants();
        result
    }

    /// Proposes one command with the id of the request that sent it, so
    /// that the runtime can apply a retry once; see [`Proposed`].
    pub fn propose_with_id(&mut self, id: RequestId, command: Bytes) -> Result<Proposed> {
        let result = self.raft.propose_with_id(id, command);
        self.raft.assert_invariants();
        result
    }

    /// Proposes a membership change.
    pub fn propose_conf_change(&mut self, change: ConfChange) -> Result<Proposed> {
        let result = self.raft.propose_conf_change(change);
        self.raft.assert_invariants();
        result
    }

    /// Asks for a linearizable read, answered by a [`ReadState`].
    pub fn read_index(&mut self, id: ReadId) -> Result<()> {
        let result = self.raft.read_index(id);
        self.raft.assert_invariants();
        result
    }

    /// Hands leadership to `target`.
    pub fn transfer_leader(&mut self, target: NodeId) -> Result<()> {
        let result = self.raft.transfer_leader(target);
        self.raft.assert_invariants();
        result
    }

    /// Hands leadership to the most up-to-date voter.
    pub fn step_down(&mut self) -> Result<()> {
        self.raft.step_down()
    }

    /// Proposes this node's own removal (leave-on-terminate).
    pub fn leave(&mut self) -> Result<Proposed> {
        self.raft.leave()
    }

    /// UNSAFE: see [`Raft::force_remove`].
    pub fn force_remove(&mut self, node: NodeId) -> Result<()> {
        let result = self.raft.force_remove(node);
        self.raft.assert_invariants();
        result
    }

    /// Starts an election now.
    pub fn campaign(&mut self) {
        self.raft.campaign();
        self.raft.assert_invariants();
    }

    /// True when this leader's commit index moved and some follower's
    /// latest append did not carry it: [`RaftNode::broadcast_commit`] would
    /// send something. Under [`CommitBroadcast::Eager`] the next `Ready`
    /// always clears it.
    pub fn commit_unsent(&self) -> bool {
        self.raft.commit_unsent
    }

    /// Sends the commit index to every follower whose latest append did
    /// not carry it (with any entries it still lacks); the messages come
    /// with the next `Ready`. For [`CommitBroadcast::Deferred`].
    pub fn broadcast_commit(&mut self) {
        self.raft.flush_commit();
        self.raft.assert_invariants();
    }

    /// The transport could not reach `node`.
    pub fn report_unreachable(&mut self, node: NodeId) {
        self.raft.report_unreachable(node);
    }

    /// A snapshot transfer to `node` finished or failed.
    pub fn report_snapshot(&mut self, node: NodeId, success: bool) {
        self.raft.report_snapshot(node, success);
    }

    /// True when [`RaftNode::ready`] has something to hand out.
    pub fn has_ready(&self) -> bool {
        let raft = &self.raft;
        raft.soft_state() != self.previous_soft_state
            || raft.hard_state() != self.previous_hard_state
            || raft.log.has_unhanded_snapshot()
            || raft.log.has_unhanded_entries()
            || raft.appends_unsent
            || (raft.commit_unsent && raft.config.commit_broadcast == CommitBroadcast::Eager)
            || raft.commit_wanted_unsent()
            || !raft.msgs.is_empty()
            || !raft.msgs_after_persist.is_empty()
            || !raft.read_states.is_empty()
            || !raft.refused_proposals.is_empty()
            || !raft.refused_reads.is_empty()
            || raft.log.has_entries_to_apply()
    }

    /// Collects the work accumulated since the last call.
    pub fn ready(&mut self) -> Result<Ready> {
        // Appends first: they carry the commit index too.
        self.raft.flush_appends();
        match self.raft.config.commit_broadcast {
            CommitBroadcast::Eager => self.raft.flush_commit(),
            CommitBroadcast::Deferred => self.raft.flush_wanted_commit(),
        }
        let number = self.next_ready_number;
        self.next_ready_number += 1;
        let soft_state = self.raft.soft_state();
        let hard_state = self.raft.hard_state();
        let snapshot = self.raft.log.take_unhanded_snapshot();
        let entries = self.raft.log.take_unhanded_entries();
        let apply_bytes_max = self.raft.apply_batch_bytes_max();
        let committed_entries = self.raft.log.take_entries_to_apply(apply_bytes_max)?;
        let ready = Ready {
            number,
            soft_state: (soft_state != self.previous_soft_state).then_some(soft_state),
            hard_state: (hard_state != self.previous_hard_state).then_some(hard_state),
            snapshot,
            entries,
            messages: coalesce_reads(std::mem::take(&mut self.raft.msgs)),
            persisted_messages: coalesce_reads(std::mem::take(&mut self.raft.msgs_after_persist)),
            committed_entries,
            read_states: std::mem::take(&mut self.raft.read_states),
            refused_proposals: std::mem::take(&mut self.raft.refused_proposals),
            refused_reads: std::mem::take(&mut self.raft.refused_reads),
        };
        self.previous_soft_state = soft_state;
        self.previous_hard_state = hard_state;
        if !ready.is_persist_free() {
            self.unacknowledged.push_back(PersistRecord {
                number,
                term: ready.hard_state.as_ref().map(|hard_state| hard_state.term),
                last_entry: ready.entries.last().map(|entry| (entry.index, entry.term)),
                snapshot_index: ready.snapshot.as_ref().map(|snapshot| snapshot.index),
            });
        }
        Ok(ready)
    }

    /// Every ready up to `number` is durable.
    pub fn on_persisted(&mut self, number: u64) {
        while self
            .unacknowledged
            .front()
            .is_some_and(|record| record.number <= number)
        {
            let Some(record) = self.unacknowledged.pop_front() else {
                break;
            };
            if let Some(index) = record.snapshot_index {
                self.raft.log.stable_snapshot_to(index);
            }
            if let Some(term) = record.term {
                self.raft.on_persisted_term(term);
            }
            if let Some((index, term)) = record.last_entry {
                self.raft.on_persisted_entries(index, term);
            }
        }
        self.raft.assert_invariants();
    }

    /// The state machine applied every entry up to `index`.
    pub fn advance_apply(&mut self, index: LogIndex) {
        self.raft.log.applied_to(index);
    }

    /// Node state for status reports.
    pub fn status(&self) -> Status {
        let raft = &self.raft;
        Status {
            id: raft.id,
            soft_state: raft.soft_state(),
            hard_state: raft.hard_state(),
            applying: raft.log.applying,
            applied: raft.log.applied,
            last_index: raft.log.last_index(),
            first_index: raft.log.first_index(),
            persisted: raft.log.persisted,
            membership: raft.membership().clone(),
            committed_membership: raft.committed_membership(),
            peers: raft
                .progress_summary()
                .into_iter()
                .map(|(node, match_index, state)| PeerStatus {
                    node,
                    match_index,
                    state,
                })
                .collect(),
        }
    }

    /// This node's role.
    pub fn role(&self) -> Role {
        self.raft.role
    }

    /// The current term.
    pub fn term(&self) -> Term {
        self.raft.term
    }

    /// The leader this node believes in.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.leader
    }

    /// The term of the log entry at `index`, persisted or not; `None` when
    /// the index is compacted or past the end.
    pub fn log_term(&self, index: LogIndex) -> Option<Term> {
        self.raft.log.term(index).ok()
    }

    /// The last index of the log, persisted or not.
    pub fn last_index(&self) -> LogIndex {
        self.raft.log.last_index()
    }

    /// The membership of the latest committed membership entry.
    pub fn committed_membership(&self) -> Membership {
        self.raft.committed_membership()
    }

    /// The membership after applying entries up to `index`.
    pub fn membership_at(&self, index: LogIndex) -> Membership {
        self.raft.membership_at(index)
    }

    /// The snapshot this node accepted from its leader and has not yet
    /// handed out in a `Ready`: the one whose data the runtime must
    /// install. A snapshot message that did not change it was refused.
    pub fn snapshot_to_install(&self) -> Option<&SnapshotMeta> {
        self.raft.log.unhanded_snapshot()
    }

    /// Metadata for a state machine snapshot at an applied `index`.
    pub fn snapshot_meta_at(&self, index: LogIndex) -> Result<SnapshotMeta> {
        self.raft.snapshot_meta_at(index)
    }

    /// The storage, to read.
    pub fn storage(&self) -> &S {
        &self.raft.log.storage
    }

    /// The storage, to persist what a ready handed out.
    pub fn storage_mut(&mut self) -> &mut S {
        &mut self.raft.log.storage
    }
}

/// Merges the read messages of one `Ready` that go the same way: a
/// follower's forwarded reads into one `ReadIndex` per leader, and a
/// leader's answers with the same index into one `ReadIndexResponse` per
/// follower. They all leave together anyway; merged, each costs one
/// message instead of one per read. Other messages keep their order.
fn coalesce_reads(messages: Vec<Message>) -> Vec<Message> {
    let is_read = |message: &Message| {
        matches!(
            message.body,
            MessageBody::ReadIndex { .. } | MessageBody::ReadIndexResponse { .. }
        )
    };
    // Most readies carry at most one read: leave them as they are.
    if messages.iter().filter(|message| is_read(message)).count() < 2 {
        return messages;
    }
    let mut merged: Vec<Message> = Vec::with_capacity(messages.len());
    // Positions in `merged` of the read messages kept so far.
    let mut read_positions: Vec<usize> = Vec::new();
    for mut message in messages {
        if !is_read(&message) {
            merged.push(message);
            continue;
        }
        let adding = read_ids(&mut message.body).map_or(0, |ids| ids.len());
        let target = read_positions.iter().copied().find(|&position| {
            let kept = &mut merged[position];
            let room = read_ids(&mut kept.body)
                .is_some_and(|ids| ids.len() + adding <= crate::types::READ_IDS_PER_MESSAGE_MAX);
            room && same_read_route(kept, &message)
        });
        let kept = target.and_then(|position| read_ids(&mut merged[position].body));
        match (kept, read_ids(&mut message.body)) {
            (Some(kept), Some(ids)) => kept.append(ids),
            _ => {
                read_positions.push(merged.len());
                merged.push(message);
            }
        }
    }
    merged
}

/// Whether two read messages can travel as one: same sender, receiver
/// and term, and for answers the same index.
fn same_read_route(kept: &Message, message: &Message) -> bool {
    kept.from == message.from
        && kept.to == message.to
        && kept.term == message.term
        && match (&kept.body, &message.body) {
            (MessageBody::ReadIndex { .. }, MessageBody::ReadIndex { .. }) => true,
            (
                MessageBody::ReadIndexResponse { index: kept, .. },
                MessageBody::ReadIndexResponse { index, .. },
            ) => kept == index,
            _ => false,
        }
}

/// The ids a `ReadIndex` or `ReadIndexResponse` carries.
fn read_ids(body: &mut MessageBody) -> Option<&mut Vec<crate::types::ReadId>> {
    match body {
        MessageBody::ReadIndex { ids } | MessageBody::ReadIndexResponse { ids, .. } => Some(ids),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::coalesce_reads;
    use crate::message::{Message, MessageBody};
    use crate::types::{LogIndex, NodeId, ReadId, Term};

    fn message(from: u64, to: u64, term: u64, body: MessageBody) -> Message {
        Message {
            from: NodeId(from),
            to: NodeId(to),
            term: Term(term),
            body,
        }
    }

    fn read(to: u64, ids: &[u64]) -> Message {
        let ids = ids.iter().map(|id| ReadId(*id)).collect();
        message(2, to, 0, MessageBody::ReadIndex { ids })
    }

    fn answer(to: u64, index: u64, ids: &[u64]) -> Message {
        let ids = ids.iter().map(|id| ReadId(*id)).collect();
        let index = LogIndex(index);
        message(1, to, 5, MessageBody::ReadIndexResponse { index, ids })
    }

    fn heartbeat(to: u64) -> Message {
        let body = MessageBody::Heartbeat {
            commit: LogIndex(3),
            round: 1,
        };
        message(1, to, 5, body)
    }

    /// Reads to one leader merge into the first, in order; other messages
    /// keep their places; a read to another node stays apart.
    #[test]
    fn forwarded_reads_to_one_leader_merge() {
        let merged = coalesce_reads(vec![
            read(1, &[7]),
            heartbeat(3),
            read(1, &[8, 9]),
            read(3, &[10]),
            read(1, &[11]),
        ]);
        assert_eq!(
            merged,
            vec![read(1, &[7, 8, 9, 11]), heartbeat(3), read(3, &[10])]
        );
    }

    /// Answers merge only when they carry the same index to the same node.
    #[test]
    fn read_answers_merge_by_follower_and_index() {
        let merged = coalesce_reads(vec![
            answer(2, 40, &[1]),
            answer(3, 40, &[2]),
            answer(2, 40, &[3]),
            answer(2, 41, &[4]),
            heartbeat(2),
        ]);
        assert_eq!(
            merged,
            vec![
                answer(2, 40, &[1, 3]),
                answer(3, 40, &[2]),
                answer(2, 41, &[4]),
                heartbeat(2),
            ]
        );
    }

    /// A merged read message holds at most `READ_IDS_PER_MESSAGE_MAX` ids;
    /// the rest start another.
    #[test]
    fn merged_reads_are_split_at_the_limit() {
        let limit = crate::types::READ_IDS_PER_MESSAGE_MAX as u64;
        let messages: Vec<Message> = (0..limit + 3).map(|id| read(1, &[id])).collect();
        let merged = coalesce_reads(messages);
        let all: Vec<u64> = (0..limit + 3).collect();
        assert_eq!(
            merged,
            vec![
                read(1, &all[..limit as usize]),
                read(1, &all[limit as usize..])
            ]
        );
    }

    /// Without two reads there is nothing to merge.
    #[test]
    fn a_single_read_is_left_alone() {
        let messages = vec![heartbeat(2), read(1, &[1]), heartbeat(3)];
        assert_eq!(coalesce_reads(messages.clone()), messages);
    }
}
