//! [`GroupStorage`]: the durable log of one Raft group, read from the WAL
//! every group of the node shares. Writes go through the WAL's batches (the
//! group actor persists each `Ready`), so this type only reads.

use std::sync::Arc;

use regatta_raft::{Entry, InitialState, LogIndex, SnapshotMeta, Storage, StorageError, Term};
use regatta_wal::{GroupId, Wal};

/// One group's view of the shared WAL, as Raft's [`Storage`].
#[derive(Clone)]
pub struct GroupStorage {
    wal: Arc<Wal>,
    group: GroupId,
}

impl GroupStorage {
    /// The storage of `group` in `wal`.
    pub fn new(wal: Arc<Wal>, group: GroupId) -> GroupStorage {
        GroupStorage { wal, group }
    }

    /// The group.
    pub fn group(&self) -> GroupId {
        self.group
    }

    /// The shared log.
    pub fn wal(&self) -> &Arc<Wal> {
        &self.wal
    }
}

/// Maps a WAL error to Raft's: compaction and the end of the log are
/// expected answers; anything else is fatal for the group.
fn storage_error(error: regatta_wal::Error) -> StorageError {
    match error {
        regatta_wal::Error::Compacted { compacted_to, .. } => {
            StorageError::Compacted { compacted_to }
        }
        regatta_wal::Error::Unavailable {
            index, last_index, ..
        } => StorageError::Unavailable { index, last_index },
        other => StorageError::Other(other.to_string()),
    }
}

impl Storage for GroupStorage {
    fn initial_state(&self) -> Result<InitialState, StorageError> {
        Ok(InitialState {
            hard_state: self.wal.hard_state(self.group),
            snapshot: self.wal.snapshot(self.group),
        })
    }

    fn entries(
        &self,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>, StorageError> {
        self.wal
            .entries(self.group, low, high, size_bytes_max)
            .map_err(storage_error)
    }

    fn term(&self, index: LogIndex) -> Result<Term, StorageError> {
        self.wal.term(self.group, index).map_err(storage_error)
    }

    fn first_index(&self) -> LogIndex {
        self.wal.first_index(self.group)
    }

    fn last_index(&self) -> LogIndex {
        self.wal.last_index(self.group)
    }

    fn snapshot_meta(&self) -> Result<SnapshotMeta, StorageError> {
        self.wal
            .snapshot(self.group)
            .ok_or(StorageError::SnapshotTemporarilyUnavailable)
    }
}
