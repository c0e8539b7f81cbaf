//! `regatta-wal`: the write-ahead log that every Raft group of a node
//! shares.
//!
//! Concurrent appends from many groups are coalesced into one write and one
//! `fdatasync` (group commit). The log is made of segments that roll at a
//! configurable size, with records framed and checksummed (CRC32C). An
//! in-memory index per group is rebuilt at open. Garbage collection deletes
//! segments no group needs, and rewrites cold groups forward so they cannot
//! pin old segments forever. Recovery truncates a torn tail and refuses
//! corruption with the file and offset. State machine snapshots live in
//! checksummed files beside the log ([`SnapshotStore`]).
//!
//! The format is specified in `docs/wal-format.md`.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod cache;
mod error;
pub mod format;
mod index;
mod record;
mod snapshot;
mod wal;

pub use error::{Error, Result};
pub use snapshot::{SnapshotFile, SnapshotStore, SnapshotWriter};
pub use wal::{GroupId, SyncMode, Update, Wal, WalConfig, WalStats, WriteBatch};
