//! The read side of stable storage, which the core consults, and
//! [`MemStorage`], an in-memory implementation for tests and simulation.
//!
//! The core never writes storage: the runtime persists what a `Ready` hands
//! out (snapshot, then entries, then hard state) and then acknowledges it.

use crate::error::StorageError;
use crate::types::{Entry, HardState, LogIndex, SnapshotMeta, Term};

/// What storage held when the node started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct InitialState {
    /// The persisted hard state.
    pub hard_state: HardState,
    /// The latest snapshot, if any; entries up to its index are gone.
    pub snapshot: Option<SnapshotMeta>,
}

/// Read access to a group's persisted log. Implementations must return only
/// durable data, so that what the core reads survives a crash.
pub trait Storage {
    /// The hard state and snapshot found at start-up.
    fn initial_state(&self) -> Result<InitialState, StorageError>;

    /// Entries in `[low, high)`, stopping before the total passes
    /// `size_bytes_max` but always returning at least one entry.
    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError>;

    /// The term of the entry at `index`; also answers for the snapshot index.
    fn term(&self, index: LogIndex) -> Result<Term, StorageError>;

    /// The first index still available as an entry (snapshot index + 1).
    fn first_index(&self) -> LogIndex;

    /// The last index stored, or the snapshot index when no entry follows.
    fn last_index(&self) -> LogIndex;

    /// The latest snapshot the runtime can send to a follower.
    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError>;
}

/// An in-memory [`Storage`] for tests, the simulation and benchmarks.
#[derive(Clone, Debug, Default)]
pub struct MemStorage {
    hard_state: HardState,
    snapshot: SnapshotMeta,
    /// Entries after `snapshot.index`, contiguous.
    entries: Vec<Entry>,
}

impl MemStorage {
    /// Empty storage.
    pub fn new() -> MemStorage {
        MemStorage::default()
    }

    /// Persists a hard state.
    pub fn set_hard_state(&mut self, hard_state: HardState) {
        self.hard_state = hard_state;
    }

    /// The persisted hard state.
    pub fn hard_state(&self) -> HardState {
        self.hard_state
    }

    /// Appends entries, first dropping any stored suffix they overwrite.
    pub fn append(&mut self, entries: &[Entry]) {
        let Some(first) = entries.first() else {
            return;
        };
        assert!(
            first.index > self.snapshot.index,
            "append at {} below the snapshot at {}",
            first.index,
            self.snapshot.index
        );
        assert!(
            first.index <= self.last_index().next(),
            "append at {} leaves a gap after {}",
            first.index,
            self.last_index()
        );
        let keep = first.index.distance_from(self.snapshot.index.next()) as usize;
        self.entries.truncate(keep);
        self.entries.extend_from_slice(entries);
    }

    /// Replaces the whole log with a received snapshot.
    pub fn apply_snapshot(&mut self, meta: SnapshotMeta) {
        if self.hard_state.commit < meta.index {
            self.hard_state.commit = meta.index;
        }
        self.entries.clear();
        self.snapshot = meta;
    }

    /// Records that the state machine took a snapshot at `meta.index` and
    /// compacts the log: entries up to `meta.index` are dropped.
    pub fn create_snapshot(&mut self, meta: SnapshotMeta) {
        assert!(meta.index <= self.last_index(), "snapshot past the log");
        if meta.index <= self.snapshot.index {
            return;
        }
        let drop = meta.index.next().distance_from(self.first_index()) as usize;
        self.entries.drain(..drop);
        self.snapshot = meta;
    }

    /// Every stored entry, for checks in tests.
    pub fn all_entries(&self) -> &[Entry] {
        &self.entries
    }

    /// The stored snapshot's metadata (index 0 when there is none).
    pub fn snapshot(&self) -> &SnapshotMeta {
        &self.snapshot
    }
}

impl Storage for MemStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        let snapshot = (self.snapshot.index.0 > 0).then(|| self.snapshot.clone());
        Ok(InitialState {
            hard_state: self.hard_state,
            snapshot,
        })
    }

    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        if low <= self.snapshot.index {
            return Err(StorageError::Compacted {
                compacted_to: self.snapshot.index,
            });
        }
        if high > self.last_index().next() {
            return Err(StorageError::Unavailable {
                index: high.prev(),
                last_index: self.last_index(),
            });
        }
        let start = low.distance_from(self.first_index()) as usize;
        let end = high.distance_from(self.first_index()) as usize;
        Ok(limit_size(&self.entries[start..end], size_bytes_max).to_vec())
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.snapshot.index {
            return Err(StorageError::Compacted {
                compacted_to: self.snapshot.index,
            });
        }
        let offset = index.distance_from(self.first_index()) as usize;
        match self.entries.get(offset) {
            Some(entry) => Ok(entry.term),
            None => Err(StorageError::Unavailable {
                index,
                last_index: self.last_index(),
            }),
        }
    }

    fn first_index(&self) -> LogIndex {
        self.snapshot.index.next()
    }

    fn last_index(&self) -> LogIndex {
        self.snapshot.index.plus(self.entries.len() as u64)
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        Ok(self.snapshot.clone())
    }
}

/// The longest prefix of `entries` within `size_bytes_max`, never empty when
/// `entries` is not.
pub fn limit_size(entries: &[Entry], size_bytes_max: u64) -> &[Entry] {
    let mut total_bytes = 0u64;
    for (position, entry) in entries.iter().enumerate() {
        total_bytes += entry.size_bytes();
        if position > 0 && total_bytes > size_bytes_max {
            return &entries[..position];
        }
    }
    entries
}
