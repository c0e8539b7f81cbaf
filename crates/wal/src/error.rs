//! The one error type of `regatta-wal`.
//!
//! `Failed` is fatal: after a failed write or fsync the WAL acknowledges
//! nothing more, because the state of the failed write on disk is unknown.
//! `Corruption` stops `open`. The rest reject one call.

use std::path::PathBuf;

use regatta_raft::LogIndex;

/// Errors of the write-ahead log.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A file operation failed.
    #[error("{context}: {message}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The operating system's message.
        message: String,
    },
    /// Damaged data that is not a torn tail. Nothing was skipped.
    #[error("corruption in {} at offset {offset}: {reason}; restore this node from a peer or a backup", segment.display())]
    Corruption {
        /// The damaged file.
        segment: PathBuf,
        /// Where the damage starts.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A file of a format version this build does not know.
    #[error("{} has format version {version}; this build reads version {supported}", file.display())]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Its version.
        version: u32,
        /// The version this build reads.
        supported: u32,
    },
    /// An update was refused before anything was written.
    #[error("invalid update for group {group}: {reason}")]
    InvalidUpdate {
        /// The group.
        group: u64,
        /// Why.
        reason: String,
    },
    /// The entries asked for were compacted away.
    #[error("group {group}: entries up to {compacted_to} are compacted")]
    Compacted {
        /// The group.
        group: u64,
        /// The last compacted index.
        compacted_to: LogIndex,
    },
    /// The index asked for is past the end of the group's log.
    #[error("group {group}: index {index} is past the last index {last_index}")]
    Unavailable {
        /// The group.
        group: u64,
        /// The index asked for.
        index: LogIndex,
        /// The last index held.
        last_index: LogIndex,
    },
    /// The WAL stopped after a failed write or fsync.
    #[error("the write-ahead log failed and accepts no more writes: {reason}")]
    Failed {
        /// The failure.
        reason: String,
    },
    /// The WAL was closed.
    #[error("the write-ahead log is closed")]
    Closed,
    /// A snapshot file is damaged or was asked for wrongly.
    #[error("snapshot {}: {reason}", file.display())]
    Snapshot {
        /// The file.
        file: PathBuf,
        /// What is wrong.
        reason: String,
    },
}

impl Error {
    /// Wraps an I/O error with what was being done.
    pub fn io(context: impl Into<String>, error: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            message: error.to_string(),
        }
    }
}

/// The result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;
