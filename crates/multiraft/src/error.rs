//! The one error type of `regatta-multiraft`.
//!
//! A request error (`NotLeader`, `Dropped`, `Timeout`, ...) fails one
//! call; `GroupStopped` means the group's actor is gone (fatal storage
//! error, or the group was removed).

use regatta_raft::NodeId;
use regatta_wal::GroupId;

/// Errors of the multi-Raft runtime.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The group is not hosted on this node.
    #[error("group {} is not hosted on this node", .0 .0)]
    UnknownGroup(GroupId),
    /// The group is already hosted.
    #[error("group {} is already hosted on this node", .0 .0)]
    GroupExists(GroupId),
    /// This node is not the group's leader; or, for a proposal this
    /// follower forwarded, the leader changed before it was applied here
    /// (its outcome is unknown: retry it with the same request id).
    #[error("not the leader of group {}; {}", group.0, match leader_hint { Some(id) => format!("the leader is node {id}"), None => "no leader is known, retry after an election".to_string() })]
    NotLeader {
        /// The group.
        group: GroupId,
        /// The leader this node believes in.
        leader_hint: Option<NodeId>,
    },
    /// The proposal's index committed with another term's entry: it was
    /// not applied, and never will be.
    #[error("group {}: the proposal was dropped before it committed; it was not applied", .0 .0)]
    Dropped(GroupId),
    /// The proposal's entry may have been applied, but not by an apply this
    /// node reports: a snapshot from the leader replaced the log that held
    /// it, or a new leader's append cut it from this node's log while
    /// another node may still hold it. Retry it with the same request id
    /// to learn its result; without one, check before retrying a write.
    #[error("group {}: the outcome of the proposal is unknown (a snapshot or a new leader replaced the log that held it here); retry with the same request id, or check before retrying a write", .0 .0)]
    OutcomeUnknown(GroupId),
    /// The request did not complete in time. For a proposal the outcome is
    /// unknown: it may still be applied.
    #[error("group {}: no answer within {timeout_ms} ms; the outcome is unknown, so check before retrying a write", group.0)]
    Timeout {
        /// The group.
        group: GroupId,
        /// The deadline that passed.
        timeout_ms: u64,
    },
    /// A request this node forwarded to the group's leader did not reach
    /// it (the link was full or down), or may not have (the connection
    /// broke while it was written). It is answered at once rather than
    /// left to its timeout; retry it, a write with the same request id.
    #[error("group {}: the request forwarded to node {peer} {cause}; retry it (a write with the same request id)", group.0)]
    Unsent {
        /// The group.
        group: GroupId,
        /// The node it was forwarded to.
        peer: NodeId,
        /// What happened to it.
        cause: UnsentCause,
    },
    /// The group's inbox is full; retry later.
    #[error("group {}: too many requests queued (group_inbox_max); retry later", .0 .0)]
    Busy(GroupId),
    /// The consensus core refused the request.
    #[error("group {}: {source}", group.0)]
    Raft {
        /// The group.
        group: GroupId,
        /// The core's error.
        source: regatta_raft::Error,
    },
    /// The entries asked for were compacted away: only a snapshot holds
    /// them now.
    #[error("group {}: the log is compacted up to index {}", group.0, compacted_to.0)]
    Compacted {
        /// The group.
        group: GroupId,
        /// The last index compacted away.
        compacted_to: regatta_raft::LogIndex,
    },
    /// The group's log could not be read.
    #[error("group {}: reading the log failed: {reason}", group.0)]
    Storage {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// The group's actor stopped (a fatal error, or the group was removed).
    #[error("group {}: stopped: {reason}", group.0)]
    GroupStopped {
        /// The group.
        group: GroupId,
        /// Why.
        reason: String,
    },
    /// A request older than its client's last applied request: it was not
    /// applied, and its client has moved on.
    #[error("group {}: request {sequence} of client {client} is older than the client's last applied request {last}; it was not applied", group.0)]
    StaleRequest {
        /// The group.
        group: GroupId,
        /// The request's client.
        client: u64,
        /// The request's sequence.
        sequence: u64,
        /// The client's last applied sequence.
        last: u64,
    },
    /// A retry of a request applied before this node restarted; it was not
    /// applied again, but its result was not kept.
    #[error("group {}: request {sequence} of client {client} was already applied; its result was not kept across a restart", group.0)]
    AlreadyApplied {
        /// The group.
        group: GroupId,
        /// The request's client.
        client: u64,
        /// The request's sequence.
        sequence: u64,
    },
    /// The host's own files (session tables) could not be read or written.
    #[error("host state: {0}")]
    State(String),
    /// A setting of `HostConfig` is out of its range; the message names it.
    #[error("host configuration: {0}")]
    Config(String),
    /// The log failed.
    #[error("write-ahead log: {0}")]
    Wal(#[from] regatta_wal::Error),
    /// TLS material is invalid; the message says which part.
    #[error("TLS: {0}")]
    Tls(String),
}

/// Why a transport did not send a forwarded request (`Error::Unsent`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnsentCause {
    /// The queue to the peer was full (`peer_queue_messages_max`): the
    /// link is overloaded.
    QueueFull,
    /// The peer could not be reached (its last dial failed).
    Unreachable,
    /// The peer is not one this node sends to.
    UnknownPeer,
    /// The connection broke while the request was written: it may have
    /// arrived.
    ConnectionBroke,
}

impl UnsentCause {
    /// Whether the request may have reached the peer all the same.
    pub fn may_have_arrived(self) -> bool {
        self == UnsentCause::ConnectionBroke
    }

    /// Whether the link was over its load limit (its caller backs off).
    pub fn is_overload(self) -> bool {
        self == UnsentCause::QueueFull
    }
}

impl std::fmt::Display for UnsentCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UnsentCause::QueueFull => {
                "was not sent: the queue to that node is full (peer_queue_messages_max)"
            }
            UnsentCause::Unreachable => "was not sent: that node cannot be reached",
            UnsentCause::UnknownPeer => "was not sent: that node is not a known peer",
            UnsentCause::ConnectionBroke => {
                "may not have arrived: the connection to that node broke while it was sent"
            }
        })
    }
}
