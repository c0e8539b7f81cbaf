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
mod direct;
mod error;
pub mod format;
mod index;
mod record;
mod snapshot;
mod wal;

pub use error::{Error, Result};

/// Reads `bytes` as segment `sequence` would be read at open: header check,
/// record scan, body decode. Returns the number of valid records. For the
/// fuzz target and tests; never panics, whatever the bytes.
#[doc(hidden)]
pub fn read_segment_bytes(bytes: &[u8], sequence: u64) -> Result<usize> {
    let corrupt = |offset: u64, reason: String| Error::Corruption {
        segment: std::path::PathBuf::from("<bytes>"),
        offset,
        reason,
    };
    let format = match format::check_segment_header(bytes, sequence) {
        Ok(format) => format,
        Err(problem) => return Err(corrupt(0, format!("bad segment header: {problem:?}"))),
    };
    let bytes = bytes::Bytes::copy_from_slice(bytes);
    let scan = format::scan_segment(&bytes, format);
    for raw in &scan.records {
        let end = (raw.body_offset + raw.body_len as u64) as usize;
        let body = bytes.slice(raw.body_offset as usize..end);
        record::Record::decode(raw.kind, &body).map_err(|reason| corrupt(raw.offset, reason))?;
    }
    match scan.end {
        format::SegmentEnd::Corrupt { offset, reason } => Err(corrupt(offset, reason)),
        _ => Ok(scan.records.len()),
    }
}
pub use snapshot::{SnapshotFile, SnapshotStore, SnapshotWriter};
pub use wal::{
    GroupId, SyncMode, Update, Wal, WalConfig, WalStats, WriteBatch, FSYNC_BUCKETS,
    FSYNC_BUCKET_BOUNDS_MICROS,
};
