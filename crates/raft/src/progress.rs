//! The leader's view of each follower's log: flow control per follower.
//!
//! A follower is in one of three states:
//! - `Probe`: the leader does not know where the logs match; it sends one
//!   append at a time and waits for the answer.
//! - `Replicate`: the logs match up to `match_index`; appends are pipelined
//!   optimistically, up to `inflight_messages_max` unacknowledged at once.
//! - `Snapshot`: the follower needs a compacted entry; the leader waits for
//!   the snapshot to be installed.
//!
//! Invariant: `match_index < next_index`.

use std::collections::VecDeque;

use crate::types::LogIndex;

/// The replication state of one follower.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgressState {
    /// Finding the point where the logs match.
    Probe,
    /// Streaming entries.
    Replicate,
    /// Waiting for a snapshot to be installed.
    Snapshot,
}

/// The last index of each append in flight to one follower.
#[derive(Clone, Debug)]
pub(crate) struct Inflights {
    last_indexes: VecDeque<LogIndex>,
    count_max: usize,
}

impl Inflights {
    fn new(count_max: usize) -> Inflights {
        Inflights {
            last_indexes: VecDeque::new(),
            count_max,
        }
    }

    fn is_full(&self) -> bool {
        self.last_indexes.len() >= self.count_max
    }

    fn add(&mut self, last_index: LogIndex) {
        assert!(!self.is_full(), "inflight window overflow");
        self.last_indexes.push_back(last_index);
    }

    /// Frees every append acknowledged by a response up to `index`.
    fn free_to(&mut self, index: LogIndex) {
        while self
            .last_indexes
            .front()
            .is_some_and(|&last_index| last_index <= index)
        {
            self.last_indexes.pop_front();
        }
    }

    fn free_first(&mut self) {
        self.last_indexes.pop_front();
    }

    fn reset(&mut self) {
        self.last_indexes.clear();
    }
}

/// The leader's record of one member.
#[derive(Clone, Debug)]
pub(crate) struct Progress {
    /// The highest index known to match the leader's log.
    pub(crate) match_index: LogIndex,
    /// The next index to send.
    pub(crate) next_index: LogIndex,
    pub(crate) state: ProgressState,
    /// In `Snapshot`, the index of the snapshot being sent.
    pub(crate) pending_snapshot: LogIndex,
    /// In `Probe`, an append is outstanding.
    pub(crate) probe_sent: bool,
    /// Heard from since the last quorum check.
    pub(crate) recent_active: bool,
    /// Heard from in the check interval before the current one. Checks
    /// that ask "is this member up" use both, so that they do not fail in
    /// the moment after a quorum check cleared `recent_active`.
    pub(crate) active_last_interval: bool,
    pub(crate) inflights: Inflights,
    /// The latest heartbeat round this member acknowledged.
    pub(crate) acked_round: u64,
    /// The commit index carried by the latest append or read-round
    /// heartbeat sent.
    pub(crate) commit_sent: LogIndex,
    /// The last entry this member forwarded to us, or the read index we
    /// sent it for a read it forwarded. Its proposer or reader is answered
    /// when the member applies that index, so the member hears of its
    /// commit at once even under `CommitBroadcast::Deferred`.
    pub(crate) commit_wanted: LogIndex,
}

impl Progress {
    /// Heard from within the last one or two quorum-check intervals.
    pub(crate) fn reachable(&self) -> bool {
        self.recent_active || self.active_last_interval
    }

    pub(crate) fn new(next_index: LogIndex, inflight_messages_max: usize) -> Progress {
        Progress {
            match_index: LogIndex(0),
            next_index,
            state: ProgressState::Probe,
            pending_snapshot: LogIndex(0),
            probe_sent: false,
            recent_active: false,
            active_last_interval: false,
            inflights: Inflights::new(inflight_messages_max),
            acked_round: 0,
            commit_sent: LogIndex(0),
            commit_wanted: LogIndex(0),
        }
    }

    /// Waits for a commit index it has not been sent yet, and one has
    /// moved past what it was sent.
    pub(crate) fn wants_commit(&self, committed: LogIndex) -> bool {
        self.commit_sent < self.commit_wanted && self.commit_sent < committed
    }

    pub(crate) fn become_probe(&mut self) {
        self.next_index = if self.state == ProgressState::Snapshot {
            self.match_index.max(self.pending_snapshot).next()
        } else {
            self.match_index.next()
        };
        self.state = ProgressState::Probe;
        self.probe_sent = false;
        self.pending_snapshot = LogIndex(0);
        self.inflights.reset();
    }

    pub(crate) fn become_replicate(&mut self) {
        self.state = ProgressState::Replicate;
        self.next_index = self.match_index.next();
        self.probe_sent = false;
        self.pending_snapshot = LogIndex(0);
        self.inflights.reset();
    }

    pub(crate) fn become_snapshot(&mut self, snapshot_index: LogIndex) {
        self.state = ProgressState::Snapshot;
        self.pending_snapshot = snapshot_index;
        self.probe_sent = false;
        self.inflights.reset();
    }

    /// Records an acknowledgement up to `index`; true when it is news.
    pub(crate) fn maybe_update(&mut self, index: LogIndex) -> bool {
        let updated = self.match_index < index;
        if updated {
            self.match_index = index;
            self.probe_sent = false;
        }
        self.next_index = self.next_index.max(index.next());
        updated
    }

    /// Moves `next_index` back after a rejection of `rejected`, toward
    /// `match_hint + 1`. False when the rejection is stale.
    pub(crate) fn maybe_decrease_to(&mut self, rejected: LogIndex, match_hint: LogIndex) -> bool {
        if self.state == ProgressState::Replicate {
            if rejected <= self.match_index {
                return false;
            }
            self.next_index = self.match_index.next();
            return true;
        }
        if self.next_index.prev() != rejected {
            return false;
        }
        // `rejected` is below the next index, so a hint above it (a peer's
        // bad hint, up to u64::MAX) is capped before it is incremented.
        self.next_index = match_hint
            .min(rejected.prev())
            .next()
            .max(self.match_index.next());
        self.probe_sent = false;
        true
    }

    /// Bookkeeping after sending an append; `last_index` is its last entry,
    /// `None` for an append that only carries the commit index. Only appends
    /// with entries take a slot of the in-flight window.
    pub(crate) fn sent_append(&mut self, last_index: Option<LogIndex>) {
        match (self.state, last_index) {
            (ProgressState::Replicate, Some(last_index)) => {
                self.next_index = last_index.next();
                self.inflights.add(last_index);
            }
            (ProgressState::Probe, _) => self.probe_sent = true,
            _ => {}
        }
    }

    /// A heartbeat answer shows the follower is alive: if the window is
    /// full (appends lost, e.g. to a crash), let one more append through so
    /// that its answer can resynchronise the follower.
    pub(crate) fn on_heartbeat_response(&mut self) {
        self.recent_active = true;
        self.probe_sent = false;
        if self.state == ProgressState::Replicate && self.inflights.is_full() {
            self.inflights.free_first();
        }
    }

    pub(crate) fn free_inflights_to(&mut self, index: LogIndex) {
        self.inflights.free_to(index);
    }

    /// True when no append should be sent now.
    pub(crate) fn is_paused(&self) -> bool {
        match self.state {
            ProgressState::Probe => self.probe_sent,
            ProgressState::Replicate => self.inflights.is_full(),
            ProgressState::Snapshot => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A probe rejection moves the next index to just past the follower's
    /// hint, never past the rejected index; a hint near `u64::MAX` (a bad
    /// peer's) is capped, not overflowed.
    #[test]
    fn a_rejection_hint_is_bounded_by_the_rejected_index() {
        for (hint, expected) in [(2, 3), (9, 5), (u64::MAX, 5)] {
            let mut progress = Progress::new(LogIndex(6), 4);
            assert!(progress.maybe_decrease_to(LogIndex(5), LogIndex(hint)));
            assert_eq!(progress.next_index, LogIndex(expected), "hint {hint}");
        }
    }
}
