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
//!
//! One kind is kept across a crash: a snapshot received from the leader is
//! linked durably as `install-<group>-<index>.data` before the WAL records
//! its install, and unlinked once the state machine holds it. A restart
//! that finds the WAL's log starting past the state machine restores from
//! it (`docs/multiraft.md`, "Installing a snapshot").

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

/// A point-in-time copy of a state machine, taken on the apply thread and
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
            if path.is_file() && parse_install_name(&path).is_none() {
                fs::remove_file(&path)?;
            }
        }
        Ok(SnapshotDir { dir })
    }

    /// Links `data` durably as the install copy of `group`'s snapshot at
    /// `index`: the file and its name are on disk when this returns.
    pub fn keep_for_install(
        &self,
        data: &SnapshotData,
        group: u64,
        index: u64,
    ) -> io::Result<PathBuf> {
        let path = self.dir.join(install_name(group, index));
        match fs::remove_file(&path) {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        fs::hard_link(data.path(), &path)?;
        File::open(&path)?.sync_all()?;
        File::open(&self.dir)?.sync_all()?;
        Ok(path)
    }

    /// The install copy of `group`'s snapshot at `index`, if one is kept;
    /// the handle does not delete it.
    pub fn kept_install(&self, group: u64, index: u64) -> io::Result<Option<SnapshotData>> {
        let path = self.dir.join(install_name(group, index));
        match fs::metadata(&path) {
            Ok(metadata) => Ok(Some(SnapshotData {
                file: Arc::new(DataFile {
                    path,
                    len: metadata.len(),
                    delete_on_drop: false,
                }),
            })),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Deletes `group`'s install copies at or below `index`, but the one
    /// at `keep` (the WAL's installed snapshot the state machine still
    /// needs), if any. Gives how many went.
    pub fn remove_installs(&self, group: u64, index: u64, keep: Option<u64>) -> io::Result<usize> {
        let mut removed = 0;
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let Some((kept_group, kept_index)) = parse_install_name(&path) else {
                continue;
            };
            if kept_group == group && kept_index <= index && Some(kept_index) != keep {
                fs::remove_file(&path)?;
                removed += 1;
            }
        }
        Ok(removed)
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

fn install_name(group: u64, index: u64) -> String {
    format!("install-{group}-{index}.data")
}

/// The group and index of an install copy's name.
fn parse_install_name(path: &Path) -> Option<(u64, u64)> {
    let name = path.file_name()?.to_str()?;
    let rest = name.strip_prefix("install-")?.strip_suffix(".data")?;
    let (group, index) = rest.split_once('-')?;
    Some((group.parse().ok()?, index.parse().ok()?))
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
            file: Arc::new(DataFile {
                path,
                len,
                delete_on_drop: true,
            }),
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
    /// False for a kept install copy, whose owner deletes it.
    delete_on_drop: bool,
}

impl Drop for DataFile {
    fn drop(&mut self) {
        if self.delete_on_drop {
            let _ = fs::remove_file(&self.path);
        }
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

    #[test]
    fn install_copies_survive_a_restart_until_removed() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = SnapshotDir::open(root.path().join("snapshots")).expect("open");
        let data = dir.write_bytes(b"state").expect("write");
        let kept = dir.keep_for_install(&data, 7, 40).expect("keep");
        dir.keep_for_install(&data, 7, 50).expect("keep");
        dir.keep_for_install(&data, 8, 40).expect("keep");
        drop(data);
        assert!(kept.exists(), "the link outlives the transient file");

        let dir = SnapshotDir::open(root.path().join("snapshots")).expect("reopen");
        let copy = dir.kept_install(7, 40).expect("look").expect("kept");
        assert_eq!(copy.len(), 5);
        drop(copy);
        assert!(kept.exists(), "a kept copy's handle does not delete it");
        assert!(dir.kept_install(7, 41).expect("look").is_none());

        assert_eq!(dir.remove_installs(7, 50, Some(50)).expect("remove"), 1);
        assert!(dir.kept_install(7, 40).expect("look").is_none());
        assert!(dir.kept_install(7, 50).expect("look").is_some());
        assert!(
            dir.kept_install(8, 40).expect("look").is_some(),
            "other groups stay"
        );
        assert_eq!(dir.remove_installs(7, u64::MAX, None).expect("remove"), 1);
    }
}
