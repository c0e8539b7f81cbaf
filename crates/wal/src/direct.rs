//! Direct writes of the active segment (docs/wal-format.md, "Direct
//! writes").
//!
//! With `O_DIRECT` a write must cover whole blocks, at a block-aligned file
//! offset, from block-aligned memory. Records end anywhere, so the writer
//! keeps the bytes of the block its records end in (the tail) and writes
//! every batch from the start of that block: the tail again, unchanged, then
//! the batch, then zeros to the end of the last block. The bytes on disk
//! are the same as a buffered write would leave; only the route differs.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;

/// The block of a direct write: its offset, length and memory address are
/// multiples of this. 4 KiB covers the logical block size of every common
/// disk and file system.
pub(crate) const DIRECT_BLOCK_BYTES: u64 = 4096;

/// `offset` rounded down to a block boundary.
pub(crate) fn block_floor(offset: u64) -> u64 {
    offset - offset % DIRECT_BLOCK_BYTES
}

/// `offset` rounded up to a block boundary.
pub(crate) fn block_ceil(offset: u64) -> u64 {
    block_floor(offset + DIRECT_BLOCK_BYTES - 1)
}

/// The active segment opened for direct writes.
pub(crate) struct DirectFile {
    file: File,
    /// The records' bytes from the start of a block to their end: the
    /// partial block they end in, and before it any bytes deferred (see
    /// [`DirectFile::defer`]). Everything before it is on disk.
    tail: Vec<u8>,
    /// Whether `tail` holds bytes not written yet.
    deferred: bool,
    /// Reused memory for the blocks of a write, one block longer than the
    /// largest write so far so that an aligned window always fits.
    staging: Vec<u8>,
}

/// Deferred bytes beyond this are written out at the next deferral.
const DEFERRED_BYTES_MAX: usize = 64 * 1024;

impl DirectFile {
    /// Opens `path` for direct writes after records that end with `tail`
    /// (the bytes from the start of their last block). `Ok(None)` when the
    /// file system refuses `O_DIRECT`.
    pub(crate) fn open(path: &Path, tail: Vec<u8>) -> io::Result<Option<DirectFile>> {
        assert!(
            (tail.len() as u64) < DIRECT_BLOCK_BYTES,
            "an opened segment's tail is shorter than a block"
        );
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match opened {
            Ok(file) => Ok(Some(DirectFile {
                file,
                tail,
                deferred: false,
                staging: Vec::new(),
            })),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Takes `data`, to go at `base` where the records end, without
    /// writing it: the next write or [`DirectFile::flush`] writes it with
    /// the tail. For records that need no fsync (commit indexes): a direct
    /// write waits for the disk, which a buffered one did not. Returns
    /// false, taking nothing, when enough is deferred already.
    pub(crate) fn defer(&mut self, base: u64, data: &[u8]) -> bool {
        self.check_tail(base);
        if self.tail.len() + data.len() > DEFERRED_BYTES_MAX {
            return false;
        }
        self.tail.extend_from_slice(data);
        self.deferred = true;
        true
    }

    /// Writes any deferred bytes; `end` is where the records end. Returns
    /// where the written blocks end, if anything was written.
    pub(crate) fn flush(&mut self, end: u64) -> io::Result<Option<u64>> {
        if !self.deferred {
            return Ok(None);
        }
        self.write(end, &[], end).map(Some)
    }

    /// The deferred bytes and the offset they start at, when there are
    /// any: what a writer falling back to buffered writes must write first.
    pub(crate) fn unwritten(&self, end: u64) -> Option<(u64, &[u8])> {
        self.deferred
            .then(|| (end - self.tail.len() as u64, self.tail.as_slice()))
    }

    /// Writes `data` at `base`, where the records end, and zeros after it
    /// to at least `zeros_to`, in whole blocks, with the deferred bytes
    /// before it. Returns where the written blocks end. An `EINVAL` error
    /// means the file system refused direct I/O after all; nothing was
    /// written then.
    pub(crate) fn write(&mut self, base: u64, data: &[u8], zeros_to: u64) -> io::Result<u64> {
        self.check_tail(base);
        let start = base - self.tail.len() as u64;
        let end = base + data.len() as u64;
        let written_end = block_ceil(end.max(zeros_to));
        let length = (written_end - start) as usize;
        let block = DIRECT_BLOCK_BYTES as usize;
        if self.staging.len() < length + block {
            self.staging = vec![0u8; length + block];
        }
        let skip = self.staging.as_ptr().align_offset(block);
        assert!(skip < block, "a byte buffer can always be aligned");
        let window = &mut self.staging[skip..skip + length];
        let (tail, rest) = window.split_at_mut(self.tail.len());
        tail.copy_from_slice(&self.tail);
        let (records, zeros) = rest.split_at_mut(data.len());
        records.copy_from_slice(data);
        zeros.fill(0);
        self.file.write_all_at(window, start)?;
        let tail_start = (block_floor(end) - start) as usize;
        let tail_end = (end - start) as usize;
        self.tail.clear();
        self.tail.extend_from_slice(&window[tail_start..tail_end]);
        self.deferred = false;
        Ok(written_end)
    }

    /// The tail starts on a block boundary and ends at `base`.
    fn check_tail(&self, base: u64) {
        let length = self.tail.len() as u64;
        assert!(
            base >= length && (base - length).is_multiple_of(DIRECT_BLOCK_BYTES),
            "the tail must run from a block boundary to where the records end"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_round_both_ways() {
        assert_eq!(block_floor(0), 0);
        assert_eq!(block_floor(4095), 0);
        assert_eq!(block_floor(4096), 4096);
        assert_eq!(block_ceil(0), 0);
        assert_eq!(block_ceil(1), 4096);
        assert_eq!(block_ceil(4096), 4096);
        assert_eq!(block_ceil(4097), 8192);
    }

    /// Direct writes leave the same bytes as plain writes of the records,
    /// across block boundaries, with zeros after them.
    #[test]
    fn direct_writes_leave_the_records_and_zeros() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("segment");
        let header = vec![7u8; 32];
        std::fs::write(&path, &header).expect("write header");
        let Some(mut direct) = DirectFile::open(&path, header.clone()).expect("open") else {
            eprintln!("the temp dir's file system refuses O_DIRECT: nothing to test");
            return;
        };
        let mut expected = header;
        let mut zeroed_end = 0;
        // Steps 1, 4, 6 and 7 are deferred: the next write, or the flush at
        // the end, writes them.
        let lengths = [10usize, 300, 4000, 100, 9000, 1, 5000, 700];
        for (step, length) in lengths.into_iter().enumerate() {
            let data = vec![step as u8 + 1; length];
            let base = expected.len() as u64;
            expected.extend_from_slice(&data);
            if matches!(step, 1 | 4 | 6 | 7) {
                assert!(direct.defer(base, &data), "a small deferral is taken");
                continue;
            }
            let zeros_to = if step == 3 { base + 70_000 } else { 0 };
            let written = match direct.write(base, &data, zeros_to) {
                Ok(written) => written,
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    eprintln!("the file system refused a direct write: nothing to test");
                    return;
                }
                Err(error) => panic!("direct write: {error}"),
            };
            assert_eq!(written % DIRECT_BLOCK_BYTES, 0);
            assert!(written >= expected.len() as u64 && written >= zeros_to);
            zeroed_end = zeroed_end.max(written);
        }
        let end = expected.len() as u64;
        let (start, unwritten) = direct.unwritten(end).expect("deferred bytes");
        assert_eq!(start % DIRECT_BLOCK_BYTES, 0);
        assert_eq!(unwritten, &expected[start as usize..]);
        assert!(unwritten.len() > 5700, "two deferrals after the last write");
        let flushed = direct.flush(end).expect("flush").expect("deferred bytes");
        zeroed_end = zeroed_end.max(flushed);
        assert_eq!(direct.flush(end).expect("flush"), None, "nothing left");
        assert!(
            !direct.defer(end, &vec![9u8; DEFERRED_BYTES_MAX]),
            "too much to defer"
        );
        let on_disk = std::fs::read(&path).expect("read back");
        assert_eq!(on_disk.len() as u64, zeroed_end);
        assert_eq!(&on_disk[..expected.len()], &expected[..]);
        assert!(on_disk[expected.len()..].iter().all(|byte| *byte == 0));
    }
}
