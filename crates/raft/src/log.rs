//! The Raft log as the core sees it: the durable prefix in [`Storage`] plus
//! an in-memory *tail* of entries from `offset` on. The tail holds every
//! entry not yet known durable (handed to the runtime for persisting, or
//! not yet handed out) and, so that replication and apply do not read
//! storage back, the durable entries not yet applied, within
//! `RETAINED_BYTES_MAX`. A snapshot received from the leader waits in
//! memory the same way until it is durable.
//!
//! Invariants (checked by `assert_invariants`):
//! - `applied <= applying <= min(committed, persisted)`;
//! - `committed <= last_index()`;
//! - tail entries are contiguous from `offset`, and `tail_bytes` is their
//!   size;
//! - every entry before `offset` is durable in storage.

use std::collections::VecDeque;

use crate::error::StorageError;
use crate::storage::Storage;
use crate::types::{Entry, LogIndex, SnapshotMeta, Term};

/// Durable, unapplied entries kept in the tail beyond this are read back
/// from storage when needed.
const RETAINED_BYTES_MAX: u64 = 1 << 20;

pub(crate) struct RaftLog<S: Storage> {
    pub(crate) storage: S,
    /// A snapshot received from the leader and not yet persisted.
    unstable_snapshot: Option<SnapshotMeta>,
    unstable_snapshot_handed_out: bool,
    /// Entries from `offset` on: `tail[0].index == offset`. Those after
    /// `persisted` are not known durable; entries in storage at or after
    /// `offset` may be stale ones being overwritten.
    tail: VecDeque<Entry>,
    /// The size of `tail`, as `Entry::size_bytes` counts it.
    tail_bytes: u64,
    offset: LogIndex,
    /// The last tail index already handed to a `Ready` for persisting.
    handed_out: LogIndex,
    /// The highest index known committed.
    pub(crate) committed: LogIndex,
    /// The highest index durable on this node and part of the current log.
    pub(crate) persisted: LogIndex,
    /// The highest index handed out for applying.
    pub(crate) applying: LogIndex,
    /// The highest index the runtime reported applied.
    pub(crate) applied: LogIndex,
}

impl<S: Storage> RaftLog<S> {
    pub(crate) fn new(storage: S) -> RaftLog<S> {
        let last_index = storage.last_index();
        let first_index = storage.first_index();
        RaftLog {
            storage,
            unstable_snapshot: None,
            unstable_snapshot_handed_out: false,
            tail: VecDeque::new(),
            tail_bytes: 0,
            offset: last_index.next(),
            handed_out: last_index,
            committed: first_index.prev(),
            persisted: last_index,
            applying: first_index.prev(),
            applied: first_index.prev(),
        }
    }

    pub(crate) fn first_index(&self) -> LogIndex {
        match &self.unstable_snapshot {
            Some(snapshot) => snapshot.index.next(),
            None => self.storage.first_index(),
        }
    }

    pub(crate) fn last_index(&self) -> LogIndex {
        if let Some(last) = self.tail.back() {
            return last.index;
        }
        match &self.unstable_snapshot {
            Some(snapshot) => snapshot.index,
            None => self.offset.prev(),
        }
    }

    pub(crate) fn last_term(&self) -> Term {
        // The last index always has a term: it is an entry or the snapshot.
        self.term(self.last_index()).unwrap_or(Term(0))
    }

    pub(crate) fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if let Some(snapshot) = &self.unstable_snapshot {
            if index == snapshot.index {
                return Ok(snapshot.term);
            }
            if index < snapshot.index {
                return Err(StorageError::Compacted {
                    compacted_to: snapshot.index,
                });
            }
        }
        if index >= self.offset {
            let position = index.distance_from(self.offset) as usize;
            return match self.tail.get(position) {
                Some(entry) => Ok(entry.term),
                None => Err(StorageError::Unavailable {
                    index,
                    last_index: self.last_index(),
                }),
            };
        }
        self.storage.term(index)
    }

    pub(crate) fn match_term(&self, index: LogIndex, term: Term) -> bool {
        self.term(index).map(|t| t == term).unwrap_or(false)
    }

    /// §5.4.1: a candidate's log is at least as up to date as ours.
    pub(crate) fn is_up_to_date(&self, last_index: LogIndex, last_term: Term) -> bool {
        let our_term = self.last_term();
        last_term > our_term || (last_term == our_term && last_index >= self.last_index())
    }

    /// The index of the first entry that is not already in the log with the
    /// same term, or `None` when every entry is present.
    pub(crate) fn find_conflict(&self, entries: &[Entry]) -> Option<LogIndex> {
        entries
            .iter()
            .find(|entry| !self.match_term(entry.index, entry.term))
            .map(|entry| entry.index)
    }

    /// The largest index at or below `index` whose term is at most `term`,
    /// with its term: where a log that has `term` at `index` may match ours.
    pub(crate) fn find_conflict_by_term(&self, index: LogIndex, term: Term) -> (LogIndex, Term) {
        let mut index = index.min(self.last_index());
        loop {
            match self.term(index) {
                Ok(our_term) if our_term > term => index = index.prev(),
                Ok(our_term) => return (index, our_term),
                // Compacted: the snapshot prefix matches any leader's log.
                Err(_) => return (index, Term(0)),
            }
        }
    }

    /// Appends entries, truncating any conflicting suffix in the tail or in
    /// storage. Returns the new last index.
    pub(crate) fn append(&mut self, entries: &[Entry]) -> LogIndex {
        let Some(first) = entries.first() else {
            return self.last_index();
        };
        assert!(
            first.index > self.committed,
            "append at {} would overwrite committed entries up to {}",
            first.index,
            self.committed
        );
        assert!(
            first.index <= self.last_index().next(),
            "append at {} leaves a gap after {}",
            first.index,
            self.last_index()
        );
        let after = first.index;
        if after <= self.offset {
            // Replaces the whole tail and a stored suffix.
            self.offset = after;
            self.tail.clear();
            self.tail_bytes = 0;
        } else {
            let keep = after.distance_from(self.offset) as usize;
            while self.tail.len() > keep {
                if let Some(dropped) = self.tail.pop_back() {
                    self.tail_bytes -= dropped.size_bytes();
                }
            }
        }
        for entry in entries {
            self.tail_bytes += entry.size_bytes();
            self.tail.push_back(entry.clone());
        }
        self.handed_out = self.handed_out.min(after.prev());
        self.persisted = self.persisted.min(after.prev());
        self.last_index()
    }

    /// Entries in `[low, high)` within `size_bytes_max` (at least one).
    pub(crate) fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low < self.first_index() {
            return Err(StorageError::Compacted {
                compacted_to: self.first_index().prev(),
            });
        }
        if high > self.last_index().next() {
            return Err(StorageError::Unavailable {
                index: high.prev(),
                last_index: self.last_index(),
            });
        }
        if low >= high {
            return Ok(Vec::new());
        }
        let mut result = Vec::new();
        let mut used_bytes = 0u64;
        if low < self.offset {
            let stop = high.min(self.offset);
            result = self.storage.entries(low, stop, size_bytes_max)?;
            if (result.len() as u64) < stop.distance_from(low) {
                return Ok(result);
            }
            used_bytes = result.iter().map(Entry::size_bytes).sum();
        }
        if high > self.offset {
            let start = low.max(self.offset).distance_from(self.offset) as usize;
            let end = high.distance_from(self.offset) as usize;
            for entry in self.tail.range(start..end) {
                used_bytes += entry.size_bytes();
                if !result.is_empty() && used_bytes > size_bytes_max {
                    break;
                }
                result.push(entry.clone());
            }
        }
        Ok(result)
    }

    /// Raises the commit index; never lowers it.
    pub(crate) fn commit_to(&mut self, index: LogIndex) -> bool {
        if index <= self.committed {
            return false;
        }
        assert!(
            index <= self.last_index(),
            "commit {index} past the last index {}",
            self.last_index()
        );
        self.committed = index;
        true
    }

    /// Replaces the log with a snapshot received from the leader.
    pub(crate) fn restore(&mut self, snapshot: SnapshotMeta) {
        let index = snapshot.index;
        assert!(index > self.committed, "restore below the commit index");
        self.tail.clear();
        self.tail_bytes = 0;
        self.offset = index.next();
        self.handed_out = index;
        self.committed = index;
        self.persisted = index;
        self.applying = index;
        self.applied = index;
        self.unstable_snapshot = Some(snapshot);
        self.unstable_snapshot_handed_out = false;
    }

    /// The snapshot received and not yet handed out in a `Ready`.
    pub(crate) fn unhanded_snapshot(&self) -> Option<&SnapshotMeta> {
        self.unstable_snapshot
            .as_ref()
            .filter(|_| !self.unstable_snapshot_handed_out)
    }

    pub(crate) fn has_unhanded_snapshot(&self) -> bool {
        self.unstable_snapshot.is_some() && !self.unstable_snapshot_handed_out
    }

    pub(crate) fn take_unhanded_snapshot(&mut self) -> Option<SnapshotMeta> {
        if !self.has_unhanded_snapshot() {
            return None;
        }
        self.unstable_snapshot_handed_out = true;
        self.unstable_snapshot.clone()
    }

    pub(crate) fn has_unhanded_entries(&self) -> bool {
        self.last_index() > self.handed_out && !self.tail.is_empty()
    }

    /// The tail entries not yet handed out for persisting.
    pub(crate) fn take_unhanded_entries(&mut self) -> Vec<Entry> {
        if !self.has_unhanded_entries() {
            return Vec::new();
        }
        let start = self.handed_out.next().max(self.offset);
        let position = start.distance_from(self.offset) as usize;
        let entries: Vec<Entry> = self.tail.range(position..).cloned().collect();
        self.handed_out = self.last_index();
        entries
    }

    /// The runtime made entries up to `index` (of `term`) durable.
    pub(crate) fn stable_to(&mut self, index: LogIndex, term: Term) {
        if index < self.offset {
            return;
        }
        let position = index.distance_from(self.offset) as usize;
        let Some(entry) = self.tail.get(position) else {
            return;
        };
        // A mismatch means the entries were overwritten after being handed
        // out; the newer ones will be acknowledged later.
        if entry.term != term {
            return;
        }
        self.persisted = self.persisted.max(index);
        self.trim_tail();
    }

    /// Drops durable entries from the front of the tail: all that are
    /// applied, and more while the tail is over `RETAINED_BYTES_MAX`.
    fn trim_tail(&mut self) {
        while let Some(front) = self.tail.front() {
            let durable = front.index <= self.persisted;
            let unneeded = front.index <= self.applied || self.tail_bytes > RETAINED_BYTES_MAX;
            if !(durable && unneeded) {
                break;
            }
            self.tail_bytes -= front.size_bytes();
            self.tail.pop_front();
            self.offset = self.offset.next();
        }
    }

    /// The runtime made the snapshot at `index` durable.
    pub(crate) fn stable_snapshot_to(&mut self, index: LogIndex) {
        if self
            .unstable_snapshot
            .as_ref()
            .is_some_and(|snapshot| snapshot.index == index)
        {
            self.unstable_snapshot = None;
            self.unstable_snapshot_handed_out = false;
        }
    }

    pub(crate) fn apply_limit(&self) -> LogIndex {
        self.committed.min(self.persisted)
    }

    pub(crate) fn has_entries_to_apply(&self) -> bool {
        self.applying < self.apply_limit()
    }

    /// The next committed and durable entries to apply, within a size.
    pub(crate) fn take_entries_to_apply(
        &mut self,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if !self.has_entries_to_apply() {
            return Ok(Vec::new());
        }
        let entries = self.entries(
            self.applying.next(),
            self.apply_limit().next(),
            size_bytes_max,
        )?;
        if let Some(last) = entries.last() {
            self.applying = last.index;
        }
        Ok(entries)
    }

    pub(crate) fn applied_to(&mut self, index: LogIndex) {
        assert!(
            index <= self.applying,
            "applied {index} past the entries handed out ({})",
            self.applying
        );
        self.applied = self.applied.max(index);
        self.trim_tail();
    }

    pub(crate) fn assert_invariants(&self) {
        assert!(self.applied <= self.applying, "applied > applying");
        assert!(
            self.applying <= self.apply_limit(),
            "applying {} > min(committed {}, persisted {})",
            self.applying,
            self.committed,
            self.persisted
        );
        assert!(
            self.committed <= self.last_index(),
            "committed > last index"
        );
        if let Some(first) = self.tail.front() {
            assert_eq!(first.index, self.offset, "tail offset");
        }
        assert!(
            self.offset <= self.persisted.next(),
            "offset {} leaves non-durable entries out of the tail (persisted {})",
            self.offset,
            self.persisted
        );
        debug_assert_eq!(
            self.tail_bytes,
            self.tail.iter().map(Entry::size_bytes).sum::<u64>(),
            "tail size"
        );
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::storage::MemStorage;
    use crate::types::EntryPayload;

    fn entry(index: u64, term: u64, payload_bytes: usize) -> Entry {
        Entry {
            index: LogIndex(index),
            term: Term(term),
            payload: EntryPayload::Normal(Bytes::from(vec![7u8; payload_bytes])),
        }
    }

    /// Persists what the log hands out, as a runtime would.
    fn persist(log: &mut RaftLog<MemStorage>) {
        let entries = log.take_unhanded_entries();
        log.storage.append(&entries);
        if let Some(last) = entries.last() {
            log.stable_to(last.index, last.term);
        }
        log.assert_invariants();
    }

    #[test]
    fn durable_entries_stay_in_memory_until_applied() {
        let mut log = RaftLog::new(MemStorage::new());
        let entries: Vec<Entry> = (1..=10).map(|i| entry(i, 1, 16)).collect();
        log.append(&entries);
        persist(&mut log);
        assert_eq!(log.persisted, LogIndex(10));
        assert_eq!(
            log.tail.len(),
            10,
            "durable, unapplied entries are retained"
        );
        log.commit_to(LogIndex(10));
        let applying = log.take_entries_to_apply(u64::MAX).expect("entries");
        assert_eq!(applying, entries);
        log.applied_to(LogIndex(6));
        log.assert_invariants();
        assert_eq!(log.offset, LogIndex(7));
        assert_eq!(log.tail.len(), 4);
        // Reads spanning storage and memory see one log.
        assert_eq!(
            log.entries(LogIndex(2), LogIndex(11), u64::MAX)
                .expect("read"),
            entries[1..].to_vec()
        );
        assert_eq!(log.term(LogIndex(3)), Ok(Term(1)));
        log.applied_to(LogIndex(10));
        assert!(log.tail.is_empty());
        assert_eq!(log.last_index(), LogIndex(10));
        assert_eq!(log.last_term(), Term(1));
    }

    #[test]
    fn retention_is_bounded_and_never_drops_unpersisted_entries() {
        let mut log = RaftLog::new(MemStorage::new());
        let payload_bytes = 64 * 1024;
        let count = 2 * RETAINED_BYTES_MAX / payload_bytes as u64;
        let entries: Vec<Entry> = (1..=count).map(|i| entry(i, 1, payload_bytes)).collect();
        log.append(&entries);
        log.assert_invariants();
        assert_eq!(log.tail.len() as u64, count, "nothing durable yet");
        persist(&mut log);
        assert!(log.tail_bytes <= RETAINED_BYTES_MAX);
        assert!(!log.tail.is_empty());
        assert_eq!(
            log.entries(LogIndex(1), LogIndex(count + 1), u64::MAX)
                .expect("read"),
            entries
        );
    }

    #[test]
    fn a_conflicting_append_replaces_retained_entries() {
        let mut log = RaftLog::new(MemStorage::new());
        log.append(&(1..=5).map(|i| entry(i, 1, 8)).collect::<Vec<_>>());
        persist(&mut log);
        log.commit_to(LogIndex(2));
        // A new leader overwrites 3..=5 with its own entries of term 2.
        let newer: Vec<Entry> = (3..=4).map(|i| entry(i, 2, 8)).collect();
        log.append(&newer);
        log.assert_invariants();
        assert_eq!(log.persisted, LogIndex(2));
        assert_eq!(log.last_index(), LogIndex(4));
        assert_eq!(log.term(LogIndex(3)), Ok(Term(2)));
        assert_eq!(log.term(LogIndex(2)), Ok(Term(1)));
        persist(&mut log);
        assert_eq!(log.persisted, LogIndex(4));
        assert_eq!(
            log.entries(LogIndex(1), LogIndex(5), u64::MAX)
                .expect("read"),
            [vec![entry(1, 1, 8), entry(2, 1, 8)], newer].concat()
        );
    }
}
