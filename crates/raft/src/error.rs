//! The one error type of `regatta-raft`.
//!
//! Request errors (`NotLeader`, `ProposalDropped`, ...) reject one call and
//! leave the group healthy. `Storage` errors other than the expected
//! `Compacted` are fatal for the group: the runtime must stop it.

use crate::types::{LogIndex, NodeId};

/// Errors of the consensus core.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// The configuration is invalid; the message names the field.
    #[error("invalid raft config: {0}")]
    InvalidConfig(String),
    /// This node is not the leader and cannot forward the request.
    #[error("not leader; {}", match .leader_hint { Some(id) => format!("the leader is node {id}"), None => "no leader is known, retry after an election".to_string() })]
    NotLeader {
        /// The leader this node believes in, if any.
        leader_hint: Option<NodeId>,
    },
    /// The leader refuses proposals while it hands leadership over.
    #[error("leadership transfer to node {target} in progress; retry on the new leader")]
    TransferInProgress {
        /// The node leadership is moving to.
        target: NodeId,
    },
    /// The uncommitted tail of the log is over `max_uncommitted_size_bytes`.
    #[error("too many uncommitted bytes ({uncommitted_bytes} + {proposal_bytes} > {limit_bytes}); slow down and retry")]
    UncommittedSizeExceeded {
        /// Bytes already waiting to commit.
        uncommitted_bytes: u64,
        /// Bytes of the refused proposal.
        proposal_bytes: u64,
        /// The configured limit.
        limit_bytes: u64,
    },
    /// More committed entries wait to be applied than
    /// `apply_backlog_entries_max`: the state machine is behind, and the
    /// leader takes no proposal until it catches up (etcd's "too many
    /// requests").
    #[error("{backlog_entries} committed entries wait to be applied (apply_backlog_entries_max {limit_entries}); slow down and retry")]
    ApplyBacklog {
        /// Committed entries not yet applied.
        backlog_entries: u64,
        /// The configured limit.
        limit_entries: u64,
    },
    /// The leader refused a proposal this follower forwarded because it is
    /// over a load limit; the reason is the leader's.
    #[error("the leader is overloaded: {reason}")]
    LeaderOverloaded {
        /// The leader's error.
        reason: String,
    },
    /// A membership change was refused; the reason says why.
    #[error("membership change refused: {reason}")]
    ConfChangeRefused {
        /// Why.
        reason: String,
    },
    /// A leadership transfer was refused; the reason says why.
    #[error("leadership transfer refused: {reason}")]
    TransferRefused {
        /// Why.
        reason: String,
    },
    /// The proposal was empty or malformed.
    #[error("invalid proposal: {0}")]
    InvalidProposal(String),
    /// Too many reads wait for confirmation on this leader.
    #[error(
        "{queued} reads already wait for confirmation (pending_reads_max {limit}); retry later"
    )]
    TooManyPendingReads {
        /// Reads queued now.
        queued: usize,
        /// The configured limit.
        limit: usize,
    },
    /// A snapshot was asked for at an index the state machine has not
    /// applied yet.
    #[error("cannot describe a snapshot at index {index}: only {applied} is applied")]
    SnapshotIndexNotApplied {
        /// The index asked for.
        index: LogIndex,
        /// The highest applied (or handed out) index.
        applied: LogIndex,
    },
    /// This node has been removed from the group.
    #[error("node has been removed from the group")]
    Removed,
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] StorageError),
}

/// Errors a [`crate::Storage`] implementation reports.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// The entry was compacted into a snapshot: send the snapshot instead.
    #[error("log compacted up to index {compacted_to}")]
    Compacted {
        /// The last compacted index.
        compacted_to: LogIndex,
    },
    /// The index is past the end of the log.
    #[error("index {index} is past the last index {last_index}")]
    Unavailable {
        /// The index asked for.
        index: LogIndex,
        /// The last index stored.
        last_index: LogIndex,
    },
    /// The snapshot the leader needs is not ready yet; it retries later.
    #[error("snapshot temporarily unavailable")]
    SnapshotTemporarilyUnavailable,
    /// Any other failure; fatal for the group.
    #[error("{0}")]
    Other(String),
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
