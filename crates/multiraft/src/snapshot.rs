//! Snapshot data on disk. A state machine's snapshot is never held whole in
//! memory by the host or the transport: the sender writes it to a file
//! from a point-in-time [`SnapshotSource`], the transport streams that file
//! in chunks, the receiver writes the chunks to a file of its own, and the
//! state machine restores from a reader over it.
//!
//! The files are transient: they live in the host's `snapshots/`
//! directory, are deleted when the last [`SnapshotData`] handle goes, and
//! leftovers of a crash are deleted when the host starts. Their content is
//! described in `docs/transport-format.md` ("Snapshot connection").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// A point-in-time copy of a state machine, taken on the apply task and
/// written out later on another thread while applies go on (for example a
/// storage engine's snapshot, or a copy of a small state).
pub trait SnapshotSource: Send + 'static {
    /// Writes the whole copy to `out`.
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()>;
}

impl SnapshotSource for Bytes {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self)
    }
}

impl SnapshotSource for Vec<u8> {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> io::Result<()> {
        out.write_all(&self)
    }
}

static FILE_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The directory where a host keeps its transient snapshot files.
#[derive(Clone, Debug)]
pub struct SnapshotDir {
    dir: PathBuf,
}

impl SnapshotDir {
    /// Opens (creating) `dir` and deletes the files a crash left there.
    pub fn open(dir: impl Into<PathBuf>) -> io::Result<SnapshotDir> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.is_file() {
                fs::remove_file(&path)?;
            }
        }
        Ok(SnapshotDir { dir })
    }

    /// A new, empty file and the guard that deletes it unless finished.
    pub fn create(&self) -> io::Result<(File, PendingSnapshot)> {
        let number = FILE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = self
            .dir
            .join(format!("snapshot-{}-{number}.data", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .read(true)
            .create_new(true)
            .open(&path)?;
        Ok((file, PendingSnapshot { path: Some(path) }))
    }

    /// Writes `bytes` to a new snapshot file.
    pub fn write_bytes(&self, bytes: &[u8]) -> io::Result<SnapshotData> {
        let (mut file, pending) = self.create()?;
        file.write_all(bytes)?;
        Ok(pending.finish(bytes.len() as u64))
    }
}

/// A snapshot file being written; dropped unfinished, the file goes.
#[derive(Debug)]
pub struct PendingSnapshot {
    path: Option<PathBuf>,
}

impl PendingSnapshot {
    /// The file is complete with `len` bytes.
    pub fn finish(mut self, len: u64) -> SnapshotData {
        let path = self.path.take().unwrap_or_default();
        SnapshotData {
            file: Arc::new(DataFile { path, len }),
        }
    }
}

impl Drop for PendingSnapshot {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

#[derive(Debug)]
struct DataFile {
    path: PathBuf,
    len: u64,
}

impl Drop for DataFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// A complete snapshot file; cheap to clone, deleted with its last clone.
#[derive(Clone, Debug)]
pub struct SnapshotData {
    file: Arc<DataFile>,
}

impl SnapshotData {
    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.file.len
    }

    /// Whether it holds no byte.
    pub fn is_empty(&self) -> bool {
        self.file.len == 0
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Opens it for reading from the start.
    pub fn open(&self) -> io::Result<File> {
        File::open(&self.file.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn files_live_as_long_as_their_handles_and_leftovers_go() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = SnapshotDir::open(root.path().join("snapshots")).expect("open");
        let data = dir.write_bytes(b"state").expect("write");
        assert_eq!(data.len(), 5);
        let mut read = Vec::new();
        data.open()
            .expect("open")
            .read_to_end(&mut read)
            .expect("read");
        assert_eq!(read, b"state");
        let path = data.path().to_path_buf();
        let copy = data.clone();
        drop(data);
        assert!(path.exists(), "a clone still holds it");
        drop(copy);
        assert!(!path.exists());

        let (_file, pending) = dir.create().expect("create");
        drop(pending);
        let (_file, _pending) = dir.create().expect("create");
        std::mem::forget(_pending);
        SnapshotDir::open(root.path().join("snapshots")).expect("reopen");
        assert_eq!(
            fs::read_dir(root.path().join("snapshots"))
                .expect("list")
                .count(),
            0,
            "abandoned and leftover files are deleted"
        );
    }
}
