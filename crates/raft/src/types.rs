//! The Raft paper's vocabulary as types: terms, indices, node ids, log
//! entries, hard state, membership and snapshot metadata.
//!
//! An index, a term and a node id are different kinds of number, so each is a
//! newtype; arithmetic that makes sense (an index plus a count) is spelled out.

use std::collections::BTreeSet;
use std::fmt;

use bytes::Bytes;

use crate::error::Error;

/// A Raft term (§5.1). Term 0 is "no term": nothing is ever written in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Term(pub u64);

/// A position in the replicated log (§5.3). Index 0 is the empty prefix.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LogIndex(pub u64);

/// The id of a member of one Raft group. Id 0 is invalid.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct NodeId(pub u64);

impl Term {
    /// The term after this one.
    pub fn next(self) -> Term {
        Term(self.0 + 1)
    }
}

impl LogIndex {
    /// The index after this one.
    pub fn next(self) -> LogIndex {
        LogIndex(self.0 + 1)
    }

    /// The index before this one; the empty prefix stays at 0.
    pub fn prev(self) -> LogIndex {
        LogIndex(self.0.saturating_sub(1))
    }

    /// This index moved forward by `count` entries.
    pub fn plus(self, count: u64) -> LogIndex {
        LogIndex(self.0 + count)
    }

    /// The number of entries in `[from, self)`, or 0 when `from` is not below.
    pub fn distance_from(self, from: LogIndex) -> u64 {
        self.0.saturating_sub(from.0)
    }
}

impl fmt::Display for Term {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for LogIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A single-server membership change (thesis §4.1), proposed through the log.
///
/// See `docs/decisions/0001-single-server-membership-changes.md` for why
/// changes are single-server and take effect when committed.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ConfChange {
    /// The first entry of a bootstrapped cluster: the initial voters.
    Bootstrap {
        /// The initial voters, identical on every initial member.
        voters: Vec<NodeId>,
    },
    /// Add a non-voting learner. With `auto_promote` the leader promotes it
    /// to voter once it has caught up with the commit index.
    AddLearner {
        /// The node to add.
        node: NodeId,
        /// Promote automatically once caught up.
        auto_promote: bool,
    },
    /// Turn a caught-up learner into a voter.
    Promote {
        /// The learner to promote.
        node: NodeId,
    },
    /// Turn a voter into a learner.
    Demote {
        /// The voter to demote.
        node: NodeId,
    },
    /// Remove a voter or a learner.
    Remove {
        /// The node to remove.
        node: NodeId,
    },
}

impl ConfChange {
    /// The node this change is about, if it is about one node.
    pub fn node(&self) -> Option<NodeId> {
        match self {
            ConfChange::Bootstrap { .. } => None,
            ConfChange::AddLearner { node, .. }
            | ConfChange::Promote { node }
            | ConfChange::Demote { node }
            | ConfChange::Remove { node } => Some(*node),
        }
    }
}

/// What a log entry carries.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum EntryPayload {
    /// No command: the entry a new leader appends to commit its term (§5.4.2).
    Empty,
    /// An application command, opaque to Raft.
    Normal(Bytes),
    /// A membership change.
    ConfChange(ConfChange),
    /// An application command with the id of the request that sent it, so
    /// that the runtime applies a retried request once. Raft treats it like
    /// `Normal`.
    Session {
        /// Who sent it, and its place in that client's order.
        id: RequestId,
        /// The command, opaque to Raft.
        command: Bytes,
    },
}

/// The id of a client's request: a client (never 0) and the request's
/// sequence number (from 1, increasing) among that client's requests. A
/// client reuses an id only to retry the same request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId {
    /// The client; 0 is not a valid client.
    pub client: u64,
    /// The request's place among the client's requests; 0 is not valid.
    pub sequence: u64,
}

impl RequestId {
    /// Whether both parts are non-zero.
    pub fn is_valid(&self) -> bool {
        self.client != 0 && self.sequence != 0
    }
}

/// One entry of the replicated log.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Entry {
    /// The term of the leader that created the entry.
    pub term: Term,
    /// The entry's position in the log.
    pub index: LogIndex,
    /// The command.
    pub payload: EntryPayload,
}

/// The largest log index a peer's message or a stored record may name: far
/// above any real log, and far enough below `u64::MAX` that index
/// arithmetic (`next`, `plus`) never overflows.
pub const INDEX_MAX: u64 = u64::MAX / 2;

/// Entries in one append message, at most, whatever the byte limit
/// allows: a receiver refuses more (`regatta-multiraft`'s wire format), so
/// that a frame of tiny entries cannot decode to many times its size.
pub const APPEND_ENTRIES_MAX: u64 = 65_536;

/// Read ids in one `ReadIndex`, `ReadIndexResponse` or `ReadRefused`, at
/// most: senders split longer lists (a receiver refuses a refusal of more
/// than `regatta-multiraft`'s `MESSAGE_ITEMS_MAX`).
pub const READ_IDS_PER_MESSAGE_MAX: usize = 65_536;

/// Bytes of bookkeeping counted per entry on top of its payload when sizing
/// messages and batches: index, term and framing.
pub const ENTRY_OVERHEAD_BYTES: u64 = 24;

impl Entry {
    /// The size counted against message, batch and uncommitted-size limits.
    pub fn size_bytes(&self) -> u64 {
        let payload = match &self.payload {
            EntryPayload::Empty => 0,
            EntryPayload::Normal(data) => data.len() as u64,
            EntryPayload::Session { command, .. } => 16 + command.len() as u64,
            EntryPayload::ConfChange(ConfChange::Bootstrap { voters }) => 8 * voters.len() as u64,
            EntryPayload::ConfChange(_) => 16,
        };
        ENTRY_OVERHEAD_BYTES + payload
    }
}

/// The state that must be on stable storage before a message that depends on
/// it is sent (Figure 2, "persistent state on all servers").
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HardState {
    /// The latest term this node has seen.
    pub term: Term,
    /// The candidate this node voted for in `term`.
    pub vote: Option<NodeId>,
    /// The highest index known to be committed. Persisting it is an
    /// optimisation (it lets a restart apply without waiting for a leader).
    pub commit: LogIndex,
}

/// The members of a group: voters decide, learners only receive the log.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Membership {
    /// Members whose votes and acknowledgements count toward a quorum.
    pub voters: BTreeSet<NodeId>,
    /// Members that replicate the log but never vote or campaign.
    pub learners: BTreeSet<NodeId>,
    /// Learners the leader promotes on its own once they have caught up.
    pub auto_promote: BTreeSet<NodeId>,
}

impl Membership {
    /// A membership of the given voters and no learners.
    pub fn with_voters(voters: impl IntoIterator<Item = NodeId>) -> Membership {
        Membership {
            voters: voters.into_iter().collect(),
            ..Membership::default()
        }
    }

    /// True when the node votes.
    pub fn is_voter(&self, node: NodeId) -> bool {
        self.voters.contains(&node)
    }

    /// True when the node is a voter or a learner.
    pub fn contains(&self, node: NodeId) -> bool {
        self.voters.contains(&node) || self.learners.contains(&node)
    }

    /// Every member, voters first.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.voters.iter().chain(self.learners.iter()).copied()
    }

    /// The number of voters that make a majority.
    pub fn quorum(&self) -> usize {
        self.voters.len() / 2 + 1
    }

    /// The membership after `change`, or why the change is not valid here.
    pub fn apply(&self, change: &ConfChange) -> Result<Membership, Error> {
        let mut next = self.clone();
        match change {
            ConfChange::Bootstrap { voters } => {
                if !self.voters.is_empty() || !self.learners.is_empty() {
                    return Err(refused("bootstrap applies only to an empty membership"));
                }
                if voters.is_empty() || voters.contains(&NodeId(0)) {
                    return Err(refused(
                        "bootstrap needs at least one voter and no node id 0",
                    ));
                }
                next.voters = voters.iter().copied().collect();
            }
            ConfChange::AddLearner { node, auto_promote } => {
                if node.0 == 0 {
                    return Err(refused("node id 0 is invalid"));
                }
                if self.contains(*node) {
                    return Err(refused(format!("node {node} is already a member")));
                }
                next.learners.insert(*node);
                if *auto_promote {
                    next.auto_promote.insert(*node);
                }
            }
            ConfChange::Promote { node } => {
                if !self.learners.contains(node) {
                    return Err(refused(format!("node {node} is not a learner")));
                }
                next.learners.remove(node);
                next.auto_promote.remove(node);
                next.voters.insert(*node);
            }
            ConfChange::Demote { node } => {
                if !self.voters.contains(node) {
                    return Err(refused(format!("node {node} is not a voter")));
                }
                next.voters.remove(node);
                next.learners.insert(*node);
            }
            ConfChange::Remove { node } => {
                if !self.contains(*node) {
                    return Err(refused(format!("node {node} is not a member")));
                }
                next.voters.remove(node);
                next.learners.remove(node);
                next.auto_promote.remove(node);
            }
        }
        if next.voters.is_empty() {
            return Err(refused("the change would leave zero voters"));
        }
        Ok(next)
    }
}

fn refused(reason: impl Into<String>) -> Error {
    Error::ConfChangeRefused {
        reason: reason.into(),
    }
}

/// What a snapshot stands for: the state machine after applying every entry up
/// to `index`, and the membership in force at that point (§7).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// The last entry the snapshot includes.
    pub index: LogIndex,
    /// The term of that entry.
    pub term: Term,
    /// The membership after applying every entry up to `index`.
    pub membership: Membership,
}

/// An opaque id the runtime attaches to a read request, echoed in its
/// [`ReadState`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ReadId(pub u64);

/// A confirmed read: once the state machine has applied `index`, a read
/// served from it is linearizable (§6.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadState {
    /// The request this answers.
    pub id: ReadId,
    /// The commit index the read must wait for.
    pub index: LogIndex,
}

/// A node's role (§5.1 and §9.6 for pre-candidates).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Follows a leader, or waits for one.
    Follower,
    /// Asks whether it could win an election, without raising its term.
    PreCandidate,
    /// Campaigns in a new term.
    Candidate,
    /// Accepts proposals and replicates the log.
    Leader,
}

/// State that changes often and need not be persisted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftState {
    /// The leader this node believes in, if any.
    pub leader: Option<NodeId>,
    /// This node's role.
    pub role: Role,
    /// True once a committed change removed this node from the group: with
    /// shutdown-on-remove the runtime stops the group.
    pub removed: bool,
}
