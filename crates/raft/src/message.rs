//! The messages Raft nodes exchange. The runtime carries them between nodes;
//! their encoding on the wire belongs to the transport (`docs/`).

use bytes::Bytes;

use crate::types::{EntryPayload, LogIndex, NodeId, ReadId, RequestId, SnapshotMeta, Term};
use crate::Entry;

/// One message from one member of a group to another.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The sender.
    pub from: NodeId,
    /// The receiver.
    pub to: NodeId,
    /// The sender's term. Forwarded requests ([`MessageBody::is_forward`])
    /// carry term 0: they are not part of the term protocol.
    pub term: Term,
    /// What the message says.
    pub body: MessageBody,
}

/// Why a follower rejected an append, with a hint that lets the leader skip a
/// whole conflicting term at once instead of probing one index at a time.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectHint {
    /// The largest index at which the follower may match the leader.
    pub index: LogIndex,
    /// The follower's term at `index`.
    pub term: Term,
}

/// The kinds of message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageBody {
    /// AppendEntries (§5.3): entries after `prev_index`, and the commit index.
    Append {
        /// The index of the entry just before `entries`.
        prev_index: LogIndex,
        /// The term of that entry.
        prev_term: Term,
        /// The entries to append; empty for a pure probe.
        entries: Vec<Entry>,
        /// The leader's commit index.
        commit: LogIndex,
        /// False when only a mismatch needs an answer: the leader sends
        /// such appends, with no entries, to carry a new commit index to a
        /// follower it already replicates to, whose earlier answers
        /// settle everything else.
        wants_ack: bool,
    },
    /// The answer to an append or a snapshot.
    AppendResponse {
        /// On success, the highest index known to match the leader. On
        /// rejection, the `prev_index` that did not match.
        index: LogIndex,
        /// Set when the append was rejected.
        reject: Option<RejectHint>,
    },
    /// RequestVote (§5.2), or a pre-vote (§9.6) that changes no term.
    Vote {
        /// True for a pre-vote.
        pre_vote: bool,
        /// The candidate's last log index.
        last_index: LogIndex,
        /// The candidate's last log term.
        last_term: Term,
        /// True when the campaign follows a leadership transfer: voters
        /// grant it even if they heard from a leader recently.
        transfer: bool,
    },
    /// The answer to a vote or pre-vote.
    VoteResponse {
        /// True for a pre-vote answer.
        pre_vote: bool,
        /// True when the vote is granted.
        granted: bool,
    },
    /// The leader's heartbeat; `round` numbers it so that read requests and
    /// the leader lease can tell which heartbeats a quorum acknowledged.
    Heartbeat {
        /// The commit index, capped at what the follower is known to hold.
        commit: LogIndex,
        /// The leader's heartbeat round.
        round: u64,
    },
    /// The answer to a heartbeat.
    HeartbeatResponse {
        /// The round being acknowledged.
        round: u64,
    },
    /// InstallSnapshot (§7). Only the metadata travels here: the runtime
    /// streams the state machine's data beside it and steps this message in
    /// once the data is in place.
    Snapshot {
        /// What the snapshot stands for.
        meta: SnapshotMeta,
    },
    /// Tells the target of a leadership transfer to campaign now (§3.10).
    TimeoutNow,
    /// A follower forwards read requests to its leader.
    ReadIndex {
        /// The requests, answered together.
        ids: Vec<ReadId>,
    },
    /// The leader's answer to forwarded read requests.
    ReadIndexResponse {
        /// The commit index the reads must wait for.
        index: LogIndex,
        /// The requests answered.
        ids: Vec<ReadId>,
    },
    /// A follower forwards proposals to its leader.
    Propose {
        /// The commands to append.
        payloads: Vec<EntryPayload>,
    },
    /// A follower forwards a leadership transfer request to its leader.
    TransferLeader {
        /// The node that should become leader.
        target: NodeId,
    },
    /// The answer to a forwarded proposal that was not appended, naming
    /// the request ids it carried (a proposal without ids gets no answer:
    /// nobody waits for it). Without it the follower's caller would wait
    /// out its timeout for an entry that never comes.
    ProposeRefused {
        /// The requests refused.
        ids: Vec<RequestId>,
        /// Why.
        refusal: Refusal,
    },
    /// The answer to forwarded reads that the receiver will not confirm:
    /// it is not the leader, or it is over its pending-reads limit.
    /// Without it the follower's caller would wait out its timeout for a
    /// `ReadIndexResponse` that never comes.
    ReadRefused {
        /// The reads refused.
        ids: Vec<ReadId>,
        /// Why.
        refusal: Refusal,
    },
}

/// Why a node did not append proposals a follower forwarded to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// The receiver is not the leader; it names the leader it knows.
    NotLeader {
        /// The leader the receiver believes in, if any.
        leader_hint: Option<NodeId>,
    },
    /// The leader is handing leadership to `target`.
    TransferInProgress {
        /// The node leadership is moving to.
        target: NodeId,
    },
    /// The leader is over one of its load limits (uncommitted bytes, apply
    /// backlog); the reason names it.
    Overloaded {
        /// The limit and the figures, for the caller's error.
        reason: String,
    },
    /// The proposal is malformed or not allowed.
    Invalid {
        /// Why.
        reason: String,
    },
}

impl Refusal {
    /// The refusal a leader sends for its own `error`.
    pub fn from_error(error: &crate::Error, leader_hint: Option<NodeId>) -> Refusal {
        use crate::Error as E;
        match error {
            E::NotLeader { leader_hint } => Refusal::NotLeader {
                leader_hint: *leader_hint,
            },
            E::TransferInProgress { target } => Refusal::TransferInProgress { target: *target },
            E::UncommittedSizeExceeded { .. }
            | E::ApplyBacklog { .. }
            | E::TooManyPendingReads { .. } => Refusal::Overloaded {
                reason: error.to_string(),
            },
            E::Removed => Refusal::NotLeader { leader_hint },
            other => Refusal::Invalid {
                reason: other.to_string(),
            },
        }
    }

    /// The error the forwarding node's caller gets.
    pub fn into_error(self) -> crate::Error {
        use crate::Error as E;
        match self {
            Refusal::NotLeader { leader_hint } => E::NotLeader { leader_hint },
            Refusal::TransferInProgress { target } => E::TransferInProgress { target },
            Refusal::Overloaded { reason } => E::LeaderOverloaded { reason },
            Refusal::Invalid { reason } => E::InvalidProposal(reason),
        }
    }
}

impl MessageBody {
    /// True for requests a follower forwards to its leader, and for the
    /// leader's refusals of forwarded proposals and reads. They carry term 0 and are
    /// handled outside the term protocol.
    pub fn is_forward(&self) -> bool {
        matches!(
            self,
            MessageBody::ReadIndex { .. }
                | MessageBody::Propose { .. }
                | MessageBody::TransferLeader { .. }
                | MessageBody::ProposeRefused { .. }
                | MessageBody::ReadRefused { .. }
        )
    }

    /// A short name, for logs and metrics.
    pub fn kind_name(&self) -> &'static str {
        MESSAGE_KIND_NAMES[self.kind_index()]
    }

    /// The position of this message's kind in [`MESSAGE_KIND_NAMES`], for
    /// counting messages by kind in an array.
    pub fn kind_index(&self) -> usize {
        match self {
            MessageBody::Append { .. } => 0,
            MessageBody::AppendResponse { .. } => 1,
            MessageBody::Vote { pre_vote: true, .. } => 2,
            MessageBody::Vote { .. } => 3,
            MessageBody::VoteResponse { pre_vote: true, .. } => 4,
            MessageBody::VoteResponse { .. } => 5,
            MessageBody::Heartbeat { .. } => 6,
            MessageBody::HeartbeatResponse { .. } => 7,
            MessageBody::Snapshot { .. } => 8,
            MessageBody::TimeoutNow => 9,
            MessageBody::ReadIndex { .. } => 10,
            MessageBody::ReadIndexResponse { .. } => 11,
            MessageBody::Propose { .. } => 12,
            MessageBody::TransferLeader { .. } => 13,
            MessageBody::ProposeRefused { .. } => 14,
            MessageBody::ReadRefused { .. } => 15,
        }
    }
}

/// The kinds of message, by [`MessageBody::kind_index`].
pub const MESSAGE_KIND_NAMES: [&str; 16] = [
    "append",
    "append_response",
    "pre_vote",
    "vote",
    "pre_vote_response",
    "vote_response",
    "heartbeat",
    "heartbeat_response",
    "snapshot",
    "timeout_now",
    "read_index",
    "read_index_response",
    "propose",
    "transfer_leader",
    "propose_refused",
    "read_refused",
];

/// A convenience for building normal payloads.
pub fn normal(data: impl Into<Bytes>) -> EntryPayload {
    EntryPayload::Normal(data.into())
}

#[cfg(test)]
mod tests {
    use super::MESSAGE_KIND_NAMES;

    /// Counting by kind needs every kind to have a name of its own.
    #[test]
    fn message_kind_names_are_distinct() {
        let mut names = MESSAGE_KIND_NAMES.to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), MESSAGE_KIND_NAMES.len());
    }
}
