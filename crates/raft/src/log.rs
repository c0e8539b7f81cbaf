//! The Raft log as the core sees it: the durable prefix in [`Storage`] plus
//! an *unstable* tail of entries (or a snapshot) handed to the runtime for
//! persisting but not yet acknowledged.
//!
//! Invariants (checked by `assert_invariants`):
//! - `applied <= applying <= min(committed, persisted)`;
//! - `committed <= last_index()`;
//! - unstable entries are contiguous from `offset`;
//! - `handed_out < offset + unstable.len()` (or the log end).

use crate::error::StorageError;
use crate::storage::{limit_size, Storage};
use crate::types::{Entry, LogIndex, SnapshotMeta, Term};

pub(crate) struct RaftLog<S: Storage> {
    pub(crate) storage: S,
    /// A snapshot received from the leader and not yet persisted.
    unstable_snapshot: Option<SnapshotMeta>,
    unstable_snapshot_handed_out: bool,
    /// Entries not yet known durable; `unstable[0].index == offset`. Entries
    /// at or after `offset` in storage are stale and being overwritten.
    unstable: Vec<Entry>,
    offset: LogIndex,
    /// The last unstable index already handed to a `Ready` for persisting.
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
            unstable: Vec::new(),
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
        if let Some(last) = self.unstable.last() {
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
            return match self.unstable.get(position) {
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

    /// Appends entries, truncating any conflicting unstable or stored
    /// suffix. Returns the new last index.
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
        if after == self.offset.plus(self.unstable.len() as u64) {
            self.unstable.extend_from_slice(entries);
        } else if after <= self.offset {
            // Replaces the whole unstable tail and a stored suffix.
            self.offset = after;
            self.unstable.clear();
            self.unstable.extend_from_slice(entries);
        } else {
            let keep = after.distance_from(self.offset) as usize;
            self.unstable.truncate(keep);
            self.unstable.extend_from_slice(entries);
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
            let tail = &self.unstable[start..end];
            if result.is_empty() {
                result.extend_from_slice(limit_size(tail, size_bytes_max));
            } else {
                for entry in tail {
                    used_bytes += entry.size_bytes();
                    if used_bytes > size_bytes_max {
                        break;
                    }
                    result.push(entry.clone());
                }
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
        self.unstable.clear();
        self.offset = index.next();
        self.handed_out = index;
        self.committed = index;
        self.persisted = index;
        self.applying = index;
        self.applied = index;
        self.unstable_snapshot = Some(snapshot);
        self.unstable_snapshot_handed_out = false;
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
        self.last_index() > self.handed_out && !self.unstable.is_empty()
    }

    /// The unstable entries not yet handed out for persisting.
    pub(crate) fn take_unhanded_entries(&mut self) -> Vec<Entry> {
        if !self.has_unhanded_entries() {
            return Vec::new();
        }
        let start = self.handed_out.next().max(self.offset);
        let position = start.distance_from(self.offset) as usize;
        let entries = self.unstable[position..].to_vec();
        self.handed_out = self.last_index();
        entries
    }

    /// The runtime made entries up to `index` (of `term`) durable.
    pub(crate) fn stable_to(&mut self, index: LogIndex, term: Term) {
        if index < self.offset {
            return;
        }
        let position = index.distance_from(self.offset) as usize;
        let Some(entry) = self.unstable.get(position) else {
            return;
        };
        // A mismatch means the entries were overwritten after being handed
        // out; the newer ones will be acknowledged later.
        if entry.term != term {
            return;
        }
        self.unstable.drain(..=position);
        self.offset = index.next();
        self.persisted = self.persisted.max(index);
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
        if let Some(first) = self.unstable.first() {
            assert_eq!(first.index, self.offset, "unstable offset");
        }
    }
}
