//! State machine snapshot files (see `docs/wal-format.md`, "Snapshot
//! files"): streamed into a temporary file, fsynced, renamed into place,
//! the directory fsynced; checksummed over the whole file; the latest
//! `kept` per group survive.

use std::fs::{self, File, OpenOptions};
use std::io::{BufReader, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use regatta_raft::codec::{decode_membership, encode_membership};
use regatta_raft::{LogIndex, SnapshotMeta, Term};

use crate::error::{Error, Result};
use crate::format::{read_u32, read_u64};
use crate::wal::GroupId;

const SNAPSHOT_MAGIC: &[u8; 8] = b"RGSNAPSH";
const SNAPSHOT_VERSION: u32 = 1;
/// Fixed header bytes before the membership.
const FIXED_HEADER_BYTES: usize = 44;
const MEMBERSHIP_BYTES_MAX: u32 = 16 * 1024 * 1024;

static TEMPORARY_COUNTER: AtomicU64 = AtomicU64::new(0);

/// The snapshot files of every group, under one directory.
#[derive(Clone, Debug)]
pub struct SnapshotStore {
    dir: PathBuf,
    kept: usize,
}

/// A snapshot file whose checksum has been verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its group.
    pub group: GroupId,
    /// What it stands for.
    pub meta: SnapshotMeta,
    data_offset: u64,
    /// Bytes of state machine data.
    pub data_len: u64,
}

fn io(context: String) -> impl FnOnce(std::io::Error) -> Error {
    move |error| Error::io(context, error)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|handle| handle.sync_all())
        .map_err(io(format!("fsync directory {}", dir.display())))
}

fn file_name(meta: &SnapshotMeta) -> String {
    format!("snapshot-{:020}-{:020}.snap", meta.index.0, meta.term.0)
}

impl SnapshotStore {
    /// Opens the store in `dir`, keeping the latest `kept` snapshots of each
    /// group, and deletes temporary files a crash left behind.
    pub fn open(dir: impl Into<PathBuf>, kept: usize) -> Result<SnapshotStore> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let store = SnapshotStore {
            dir,
            kept: kept.max(1),
        };
        for group_dir in store.group_dirs()? {
            for entry in
                fs::read_dir(&group_dir).map_err(io(format!("list {}", group_dir.display())))?
            {
                let path = entry
                    .map_err(io(format!("list {}", group_dir.display())))?
                    .path();
                let temporary = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(".tmp-"));
                if temporary {
                    fs::remove_file(&path).map_err(io(format!("remove {}", path.display())))?;
                }
            }
        }
        Ok(store)
    }

    fn group_dirs(&self) -> Result<Vec<PathBuf>> {
        let mut dirs = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io(format!("list {}", self.dir.display())))? {
            let path = entry
                .map_err(io(format!("list {}", self.dir.display())))?
                .path();
            if path.is_dir() {
                dirs.push(path);
            }
        }
        Ok(dirs)
    }

    fn group_dir(&self, group: GroupId) -> PathBuf {
        self.dir.join(group.0.to_string())
    }

    /// Starts writing a snapshot of `group` at `meta`.
    pub fn writer(&self, group: GroupId, meta: &SnapshotMeta) -> Result<SnapshotWriter> {
        let dir = self.group_dir(group);
        fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
        let counter = TEMPORARY_COUNTER.fetch_add(1, Ordering::Relaxed);
        let temporary_path = dir.join(format!(".tmp-{}-{counter}", std::process::id()));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temporary_path)
            .map_err(io(format!("create {}", temporary_path.display())))?;
        let mut header = Vec::with_capacity(FIXED_HEADER_BYTES + 64);
        header.extend_from_slice(SNAPSHOT_MAGIC);
        header.extend_from_slice(&SNAPSHOT_VERSION.to_le_bytes());
        header.extend_from_slice(&0u32.to_le_bytes());
        header.extend_from_slice(&group.0.to_le_bytes());
        header.extend_from_slice(&meta.index.0.to_le_bytes());
        header.extend_from_slice(&meta.term.0.to_le_bytes());
        let mut membership = Vec::new();
        encode_membership(&meta.membership, &mut membership);
        header.extend_from_slice(&(membership.len() as u32).to_le_bytes());
        header.extend_from_slice(&membership);
        let mut writer = SnapshotWriter {
            file: Some(file),
            temporary_path,
            final_path: dir.join(file_name(meta)),
            dir,
            crc: 0,
            store: self.clone(),
            group,
        };
        writer.write(&header)?;
        Ok(writer)
    }

    /// Every snapshot file of a group, oldest first, by name (unverified).
    pub fn list(&self, group: GroupId) -> Result<Vec<PathBuf>> {
        let dir = self.group_dir(group);
        if !dir.exists() {
            return Ok(Vec::new());
        }
        let mut paths = Vec::new();
        for entry in fs::read_dir(&dir).map_err(io(format!("list {}", dir.display())))? {
            let path = entry.map_err(io(format!("list {}", dir.display())))?.path();
            let is_snapshot = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("snapshot-") && n.ends_with(".snap"));
            if is_snapshot {
                paths.push(path);
            }
        }
        paths.sort();
        Ok(paths)
    }

    /// The newest snapshot of a group, verified.
    pub fn latest(&self, group: GroupId) -> Result<Option<SnapshotFile>> {
        match self.list(group)?.pop() {
            Some(path) => SnapshotFile::open(&path).map(Some),
            None => Ok(None),
        }
    }

    /// Deletes every snapshot of a group.
    pub fn remove_group(&self, group: GroupId) -> Result<()> {
        let dir = self.group_dir(group);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io(format!("remove {}", dir.display())))?;
            sync_dir(&self.dir)?;
        }
        Ok(())
    }

    fn prune(&self, group: GroupId) -> Result<()> {
        let paths = self.list(group)?;
        let excess = paths.len().saturating_sub(self.kept);
        for path in &paths[..excess] {
            fs::remove_file(path).map_err(io(format!("remove {}", path.display())))?;
        }
        if excess > 0 {
            sync_dir(&self.group_dir(group))?;
        }
        Ok(())
    }
}

/// A snapshot being written; dropped unfinished, its temporary file goes.
pub struct SnapshotWriter {
    file: Option<File>,
    temporary_path: PathBuf,
    final_path: PathBuf,
    dir: PathBuf,
    crc: u32,
    store: SnapshotStore,
    group: GroupId,
}

impl SnapshotWriter {
    /// Appends state machine data.
    pub fn write(&mut self, data: &[u8]) -> Result<()> {
        let Some(file) = self.file.as_mut() else {
            return Err(Error::Closed);
        };
        file.write_all(data)
            .map_err(io(format!("write {}", self.temporary_path.display())))?;
        self.crc = crc32c::crc32c_append(self.crc, data);
        Ok(())
    }

    /// Seals the file: checksum, fsync, rename, directory fsync, prune.
    pub fn finish(mut self) -> Result<PathBuf> {
        let Some(mut file) = self.file.take() else {
            return Err(Error::Closed);
        };
        let temporary = self.temporary_path.display().to_string();
        file.write_all(&self.crc.to_le_bytes())
            .map_err(io(format!("write {temporary}")))?;
        file.sync_all().map_err(io(format!("fsync {temporary}")))?;
        drop(file);
        fs::rename(&self.temporary_path, &self.final_path).map_err(io(format!(
            "rename {temporary} to {}",
            self.final_path.display()
        )))?;
        sync_dir(&self.dir)?;
        self.store.prune(self.group)?;
        Ok(self.final_path.clone())
    }
}

impl Drop for SnapshotWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = fs::remove_file(&self.temporary_path);
        }
    }
}

impl SnapshotFile {
    /// Opens a snapshot file and verifies its checksum before trusting it.
    pub fn open(path: &Path) -> Result<SnapshotFile> {
        let damaged = |reason: String| Error::Snapshot {
            file: path.to_path_buf(),
            reason,
        };
        let file = File::open(path).map_err(io(format!("open {}", path.display())))?;
        let length = file
            .metadata()
            .map_err(io(format!("stat {}", path.display())))?
            .len();
        let mut reader = BufReader::new(file);
        let mut fixed = [0u8; FIXED_HEADER_BYTES];
        if length < (FIXED_HEADER_BYTES + 4) as u64 {
            return Err(damaged(format!("only {length} bytes")));
        }
        reader
            .read_exact(&mut fixed)
            .map_err(io(format!("read {}", path.display())))?;
        if &fixed[0..8] != SNAPSHOT_MAGIC {
            return Err(damaged("bad magic".into()));
        }
        let version = read_u32(&fixed, 8);
        if version != SNAPSHOT_VERSION {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                version,
                supported: SNAPSHOT_VERSION,
            });
        }
        let membership_len = read_u32(&fixed, 40);
        let data_offset = FIXED_HEADER_BYTES as u64 + membership_len as u64;
        if membership_len > MEMBERSHIP_BYTES_MAX || data_offset + 4 > length {
            return Err(damaged(format!(
                "membership length {membership_len} does not fit"
            )));
        }
        let mut membership = vec![0u8; membership_len as usize];
        reader
            .read_exact(&mut membership)
            .map_err(io(format!("read {}", path.display())))?;
        let mut crc = crc32c::crc32c(&fixed);
        crc = crc32c::crc32c_append(crc, &membership);
        let data_len = length - data_offset - 4;
        crc = checksum_data(&mut reader, data_len, crc)
            .map_err(io(format!("read {}", path.display())))?;
        let mut stored = [0u8; 4];
        reader
            .read_exact(&mut stored)
            .map_err(io(format!("read {}", path.display())))?;
        if u32::from_le_bytes(stored) != crc {
            return Err(damaged("checksum mismatch".into()));
        }
        let membership = decode_membership(&membership).map_err(|e| damaged(e.to_string()))?;
        Ok(SnapshotFile {
            path: path.to_path_buf(),
            group: GroupId(read_u64(&fixed, 16)),
            meta: SnapshotMeta {
                index: LogIndex(read_u64(&fixed, 24)),
                term: Term(read_u64(&fixed, 32)),
                membership,
            },
            data_offset,
            data_len,
        })
    }

    /// A reader over the state machine data (already verified).
    pub fn data(&self) -> Result<impl Read> {
        let mut file =
            File::open(&self.path).map_err(io(format!("open {}", self.path.display())))?;
        file.seek(SeekFrom::Start(self.data_offset))
            .map_err(io(format!("seek {}", self.path.display())))?;
        Ok(BufReader::new(file).take(self.data_len))
    }
}

fn checksum_data(reader: &mut impl Read, mut remaining: u64, mut crc: u32) -> std::io::Result<u32> {
    let mut buffer = vec![0u8; 64 * 1024];
    while remaining > 0 {
        let want = remaining.min(buffer.len() as u64) as usize;
        reader.read_exact(&mut buffer[..want])?;
        crc = crc32c::crc32c_append(crc, &buffer[..want]);
        remaining -= want as u64;
    }
    Ok(crc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use regatta_raft::{Membership, NodeId};

    fn meta(index: u64) -> SnapshotMeta {
        SnapshotMeta {
            index: LogIndex(index),
            term: Term(2),
            membership: Membership::with_voters([NodeId(1), NodeId(2), NodeId(3)]),
        }
    }

    fn write(store: &SnapshotStore, group: GroupId, index: u64, data: &[u8]) -> PathBuf {
        let mut writer = store.writer(group, &meta(index)).expect("writer");
        for chunk in data.chunks(7) {
            writer.write(chunk).expect("write");
        }
        writer.finish().expect("finish")
    }

    /// A snapshot written in chunks reads back whole, with its metadata.
    #[test]
    fn write_then_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path(), 2).expect("open");
        let data: Vec<u8> = (0..10_000u32).flat_map(|i| i.to_le_bytes()).collect();
        write(&store, GroupId(7), 10, &data);
        let latest = store.latest(GroupId(7)).expect("read").expect("exists");
        assert_eq!(latest.meta, meta(10));
        assert_eq!(latest.group, GroupId(7));
        let mut read = Vec::new();
        latest
            .data()
            .expect("data")
            .read_to_end(&mut read)
            .expect("read");
        assert_eq!(read, data);
    }

    /// Only the latest `kept` snapshots stay; unfinished writes leave nothing.
    #[test]
    fn keeps_the_latest_and_cleans_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path(), 2).expect("open");
        for index in [10, 20, 30] {
            write(&store, GroupId(1), index, b"data");
        }
        let names: Vec<String> = store
            .list(GroupId(1))
            .expect("list")
            .iter()
            .map(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .unwrap_or("")
                    .to_string()
            })
            .collect();
        assert_eq!(names.len(), 2);
        assert!(names[0].contains("00000000000000000020"));
        let mut abandoned = store.writer(GroupId(1), &meta(40)).expect("writer");
        abandoned.write(b"partial").expect("write");
        drop(abandoned);
        assert_eq!(fs::read_dir(dir.path().join("1")).expect("list").count(), 2);
        store.remove_group(GroupId(1)).expect("remove");
        assert!(store.latest(GroupId(1)).expect("read").is_none());
    }

    /// Any flipped byte is caught by the checksum; nothing panics.
    #[test]
    fn damage_is_detected() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SnapshotStore::open(dir.path(), 2).expect("open");
        let path = write(&store, GroupId(1), 10, b"some state machine data");
        let good = fs::read(&path).expect("read");
        for position in 0..good.len() {
            let mut bad = good.clone();
            bad[position] ^= 0x40;
            fs::write(&path, &bad).expect("write");
            assert!(
                SnapshotFile::open(&path).is_err(),
                "flip at {position} went unnoticed"
            );
        }
        for length in 0..good.len() {
            fs::write(&path, &good[..length]).expect("write");
            assert!(
                SnapshotFile::open(&path).is_err(),
                "truncation at {length} went unnoticed"
            );
        }
    }
}
