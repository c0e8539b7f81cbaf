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
    /// The records' bytes from the start of the block they end in to
    /// their end: shorter than one block.
    tail: Vec<u8>,
    /// Reused memory for the blocks of a write, one block longer than the
    /// largest write so far so that an aligned window always fits.
    staging: Vec<u8>,
}

impl DirectFile {
    /// Opens `path` for direct writes after records that end with `tail`
    /// (the bytes from the start of their last block). `Ok(None)` when the
    /// file system refuses `O_DIRECT`.
    pub(crate) fn open(path: &Path, tail: Vec<u8>) -> io::Result<Option<DirectFile>> {
        assert!(
            (tail.len() as u64) < DIRECT_BLOCK_BYTES,
            "a tail is shorter than a block"
        );
        let opened = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path);
        match opened {
            Ok(file) => Ok(Some(DirectFile {
                file,
                tail,
                staging: Vec::new(),
            })),
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Writes `data` at `base`, where the records end, and zeros after it
    /// to at least `zeros_to`, in whole blocks. Returns where the written
    /// blocks end. An `EINVAL` error means the file system refused direct
    /// I/O after all; nothing was written then.
    pub(crate) fn write(&mut self, base: u64, data: &[u8], zeros_to: u64) -> io::Result<u64> {
        let start = block_floor(base);
        assert_eq!(
            base - start,
            self.tail.len() as u64,
            "the tail must end where the records end"
        );
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
        Ok(written_end)
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
        for (step, length) in [10usize, 4000, 100, 9000, 1, 5000].into_iter().enumerate() {
            let data = vec![step as u8 + 1; length];
            let base = expected.len() as u64;
            let zeros_to = if step == 3 { base + 70_000 } else { 0 };
            let written = match direct.write(base, &data, zeros_to) {
                Ok(written) => written,
                Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                    eprintln!("the file system refused a direct write: nothing to test");
                    return;
                }
                Err(error) => panic!("direct write: {error}"),
            };
            expected.extend_from_slice(&data);
            assert_eq!(written % DIRECT_BLOCK_BYTES, 0);
            assert!(written >= expected.len() as u64 && written >= zeros_to);
            zeroed_end = zeroed_end.max(written);
        }
        let on_disk = std::fs::read(&path).expect("read back");
        assert_eq!(on_disk.len() as u64, zeroed_end);
        assert_eq!(&on_disk[..expected.len()], &expected[..]);
        assert!(on_disk[expected.len()..].iter().all(|byte| *byte == 0));
    }
}
