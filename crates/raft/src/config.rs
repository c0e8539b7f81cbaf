//! Configuration of one Raft node of one group, validated at construction.

use crate::error::Error;
use crate::types::{LogIndex, NodeId};

/// How linearizable reads are confirmed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadMode {
    /// ReadIndex (§6.4): one heartbeat round to a quorum confirms every read
    /// queued when the round started. Safe whatever the clocks do.
    Safe,
    /// Leader lease (§6.4.1): the leader answers without a round while a
    /// quorum acknowledged a heartbeat it sent less than
    /// `election_timeout_ticks - lease_clock_drift_ticks` ticks ago.
    ///
    /// Assumption: every node's tick runs at the same rate within
    /// `lease_clock_drift_ticks` per election timeout. A node whose clock
    /// runs that much slower than the leader's (or a process paused in the
    /// middle of a read) can let a stale read through. Requires
    /// `check_quorum`, because stickiness is what stops voters from electing
    /// a new leader during the lease.
    LeaseBased,
}

/// When a leader tells followers that the commit index moved.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitBroadcast {
    /// In the `Ready` that follows the advance: every follower whose
    /// latest append did not carry the new index gets an append that does
    /// (empty if it lacks no entries).
    Eager,
    /// Only when the runtime calls [`crate::RaftNode::broadcast_commit`]
    /// ([`crate::RaftNode::commit_unsent`] says when one would send
    /// anything). Meanwhile the index rides every append with entries and
    /// every heartbeat, so a busy group sends no append for the commit
    /// alone. Followers apply later by up to the runtime's delay; safety is
    /// unaffected, since followers never need the commit index to vote or
    /// to append. A follower that forwarded a proposal still hears of its
    /// commit in the next `Ready`: its proposer waits for it to apply.
    Deferred,
}

/// Configuration of one node of one group. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct Config {
    /// This node's id; must be non-zero.
    pub id: NodeId,
    /// Ticks without hearing from a leader before a follower campaigns. The
    /// actual timeout is drawn from `[election_timeout_ticks, 2 *
    /// election_timeout_ticks)` after every reset. Default 10.
    pub election_timeout_ticks: u64,
    /// Ticks between a leader's heartbeats; below the election timeout.
    /// Default 1.
    pub heartbeat_interval_ticks: u64,
    /// Largest AppendEntries message in entry bytes; one entry is always sent
    /// even if it is larger. Default 1 MiB.
    pub message_size_bytes_max: u64,
    /// Appends in flight to one follower in the replicate state. Default 256.
    pub inflight_messages_max: usize,
    /// Bytes of appended but uncommitted entries beyond which the leader
    /// refuses proposals with [`Error::UncommittedSizeExceeded`]. Default 64 MiB.
    pub uncommitted_size_bytes_max: u64,
    /// Bytes of committed entries handed out in one `Ready`. Default 64 MiB.
    pub apply_batch_bytes_max: u64,
    /// Committed entries not yet applied beyond which the leader refuses
    /// proposals with [`Error::ApplyBacklog`] (etcd's limit, 5,000). The
    /// backlog is held in memory and in the log until it is applied, so
    /// a state machine that falls behind must slow its writers down.
    /// Default 5,000.
    pub apply_backlog_entries_max: u64,
    /// Read requests waiting on one leader for confirmation. Default 65,536.
    pub pending_reads_max: usize,
    /// Use PreVote (§9.6). Default on.
    pub pre_vote: bool,
    /// A leader steps down when it has not heard from a quorum within an
    /// election timeout, and followers ignore vote requests while they hear
    /// from a leader (stickiness). Default on.
    pub check_quorum: bool,
    /// How linearizable reads are confirmed. Default [`ReadMode::Safe`].
    pub read_mode: ReadMode,
    /// Ticks subtracted from the election timeout to bound the lease; see
    /// [`ReadMode::LeaseBased`]. Default 2.
    pub lease_clock_drift_ticks: u64,
    /// Followers forward proposals, reads and transfer requests to the
    /// leader instead of refusing them with [`Error::NotLeader`]. Default on.
    pub forward_to_leader: bool,
    /// When a leader sends a moved commit index on its own. Default
    /// [`CommitBroadcast::Eager`].
    pub commit_broadcast: CommitBroadcast,
    /// The highest index the state machine has already applied (it persists
    /// its applied index with its data). Entries up to it are not handed out
    /// again after a restart.
    pub applied: LogIndex,
    /// Voters of a new cluster. Used only when storage is empty; must be the
    /// same on every initial member. Empty for a node joining an existing
    /// cluster: it learns its membership from the leader.
    pub initial_voters: Vec<NodeId>,
    /// Seed of the generator behind randomized election timeouts.
    pub seed: u64,
}

impl Config {
    /// A configuration with the defaults for node `id`.
    pub fn new(id: NodeId) -> Config {
        Config {
            id,
            election_timeout_ticks: 10,
            heartbeat_interval_ticks: 1,
            message_size_bytes_max: 1024 * 1024,
            inflight_messages_max: 256,
            uncommitted_size_bytes_max: 64 * 1024 * 1024,
            apply_batch_bytes_max: 64 * 1024 * 1024,
            apply_backlog_entries_max: 5_000,
            pending_reads_max: 65_536,
            pre_vote: true,
            check_quorum: true,
            read_mode: ReadMode::Safe,
            lease_clock_drift_ticks: 2,
            forward_to_leader: true,
            commit_broadcast: CommitBroadcast::Eager,
            applied: LogIndex(0),
            initial_voters: Vec::new(),
            seed: id.0,
        }
    }

    /// Checks every field and names the first one that is wrong.
    pub fn validate(&self) -> Result<(), Error> {
        let invalid = |message: String| Err(Error::InvalidConfig(message));
        if self.id.0 == 0 {
            return invalid("id must be non-zero".into());
        }
        if self.heartbeat_interval_ticks == 0 {
            return invalid("heartbeat_interval_ticks must be at least 1".into());
        }
        if self.election_timeout_ticks <= self.heartbeat_interval_ticks {
            return invalid(format!(
                "election_timeout_ticks ({}) must be greater than heartbeat_interval_ticks ({})",
                self.election_timeout_ticks, self.heartbeat_interval_ticks
            ));
        }
        if self.message_size_bytes_max == 0 {
            return invalid("message_size_bytes_max must be at least 1".into());
        }
        if self.inflight_messages_max == 0 {
            return invalid("inflight_messages_max must be at least 1".into());
        }
        if self.uncommitted_size_bytes_max == 0 {
            return invalid("uncommitted_size_bytes_max must be at least 1".into());
        }
        if self.apply_batch_bytes_max == 0 {
            return invalid("apply_batch_bytes_max must be at least 1".into());
        }
        if self.apply_backlog_entries_max == 0 {
            return invalid("apply_backlog_entries_max must be at least 1".into());
        }
        if self.pending_reads_max == 0 {
            return invalid("pending_reads_max must be at least 1".into());
        }
        if self.read_mode == ReadMode::LeaseBased {
            if !self.check_quorum {
                return invalid("read_mode LeaseBased requires check_quorum".into());
            }
            if self.lease_clock_drift_ticks >= self.election_timeout_ticks {
                return invalid(format!(
                    "lease_clock_drift_ticks ({}) must be below election_timeout_ticks ({})",
                    self.lease_clock_drift_ticks, self.election_timeout_ticks
                ));
            }
        }
        if self.initial_voters.contains(&NodeId(0)) {
            return invalid("initial_voters must not contain node id 0".into());
        }
        let mut voters = self.initial_voters.clone();
        voters.sort();
        voters.dedup();
        if voters.len() != self.initial_voters.len() {
            return invalid("initial_voters lists a node twice".into());
        }
        if !self.initial_voters.is_empty() && !self.initial_voters.contains(&self.id) {
            return invalid(format!(
                "initial_voters must include this node ({}); a joining node starts with none",
                self.id
            ));
        }
        Ok(())
    }
}
