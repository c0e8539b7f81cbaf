//! [`Wal`]: one segmented log shared by every Raft group of a node.
//!
//! Writes go through one writer thread. It takes every request queued at
//! that moment (up to `batch_bytes_max`, waiting at most
//! `batch_wait_micros_max` for more), writes them with one `write` and
//! makes them durable with one `fdatasync`, then updates the index and
//! acknowledges each request. Reads take a shared lock on the index and read
//! record bodies from the cache or with `pread`.
//!
//! A batch whose requests only advance commit indexes (hard states with
//! the term and vote already recorded) is written without an fsync: a lost
//! commit index is recomputed by Raft, as etcd's `MustSync` allows. The
//! next fsync covers it; a segment roll and garbage collection fsync it
//! first.
//!
//! Invariants:
//! - a request is acknowledged only after the fsync covering it succeeded,
//!   unless it only advances commit indexes;
//! - after any failed write or fsync, nothing more is acknowledged;
//! - the index only ever points at fsynced records, or at hard states
//!   that differ from a fsynced one only in their commit index;
//! - no segment is rolled or deleted while written bytes are not fsynced;
//! - segments are deleted only as a prefix, never the active one.

use std::collections::{BTreeMap, HashMap};

use rustc_hash::FxHashMap;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_raft::{Entry, HardState, LogIndex, SnapshotMeta, Term};

use crate::cache::RecordCache;
use crate::direct::{block_floor, DirectFile, DIRECT_BLOCK_BYTES};
use crate::error::{Error, Result};
use crate::format::{
    check_segment_header, encode_record_with, encode_segment_header, new_salt, read_u32,
    scan_segment, HeaderProblem, RawRecord, RecordType, SegmentEnd, SegmentFormat, SegmentScan,
    FORMAT_VERSION, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES, ZERO_FILL_STEP_BYTES,
};
use crate::index::{GroupState, Index, Location};
use crate::record::{entries_body_bytes, Record};

/// The id of a Raft group in the log. Id 0 is invalid.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GroupId(pub u64);

/// Whether appends wait for `fdatasync`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Every batch is made durable before it is acknowledged.
    Fdatasync,
    /// No fsync at all: acknowledged data can be lost. Tests only.
    NoSyncForTestsOnly,
}

/// Configuration of a [`Wal`]. Every limit carries its unit.
#[derive(Clone, Debug)]
pub struct WalConfig {
    /// Directory of the segments.
    pub dir: PathBuf,
    /// A segment is rolled before it would pass this size. Default 64 MiB.
    pub segment_size_bytes_max: u64,
    /// Bytes of queued requests coalesced into one write. Default 4 MiB.
    pub batch_bytes_max: u64,
    /// How long the writer waits for more requests before writing; 0 takes
    /// only what is already queued. Default 0.
    pub batch_wait_micros_max: u64,
    /// Requests waiting for the writer; `submit` blocks beyond. Default 4096.
    pub queue_requests_max: usize,
    /// Durability of appends. Default [`SyncMode::Fdatasync`].
    pub sync_mode: SyncMode,
    /// Bytes of decoded records kept in memory. Default 64 MiB.
    pub cache_bytes_max: u64,
    /// When more than this many segments follow the oldest one, the groups
    /// pinning it are rewritten forward. Default 4.
    pub rewrite_after_segments: u64,
    /// Only groups whose live records take at most this many bytes are
    /// rewritten; a larger group must be compacted by its owner. Default
    /// 1 MiB.
    pub rewrite_group_bytes_max: u64,
    /// After a batch, the writer polls for the next request this long
    /// before sleeping in the kernel: a caller that resubmits at once then
    /// skips a thread wake-up. It polls only while most recent waits for a
    /// request were this short, so a writer whose callers come back later
    /// does not burn CPU others need. 0 disables. Default 50.
    pub writer_spin_micros: u64,
    /// Write the active segment with `O_DIRECT`, in whole aligned blocks
    /// (docs/wal-format.md, "Direct writes"): the page cache is skipped,
    /// which makes a write and its `fdatasync` cheaper. Where the file
    /// system refuses direct I/O the writer falls back to buffered writes.
    /// Default true.
    pub direct_io: bool,
}

impl WalConfig {
    /// The defaults for a WAL in `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> WalConfig {
        WalConfig {
            dir: dir.into(),
            segment_size_bytes_max: 64 * 1024 * 1024,
            batch_bytes_max: 4 * 1024 * 1024,
            batch_wait_micros_max: 0,
            queue_requests_max: 4096,
            sync_mode: SyncMode::Fdatasync,
            cache_bytes_max: 64 * 1024 * 1024,
            rewrite_after_segments: 4,
            rewrite_group_bytes_max: 1024 * 1024,
            writer_spin_micros: 50,
            direct_io: true,
        }
    }

    /// Checks every field and names the first one that is wrong.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, rule: &str| Error::InvalidUpdate {
            group: 0,
            reason: format!("invalid WAL config: {field} {rule}"),
        };
        if self.segment_size_bytes_max < 4096 {
            return Err(invalid("segment_size_bytes_max", "must be at least 4096"));
        }
        if self.batch_bytes_max == 0 {
            return Err(invalid("batch_bytes_max", "must be at least 1"));
        }
        if self.queue_requests_max == 0 {
            return Err(invalid("queue_requests_max", "must be at least 1"));
        }
        if self.rewrite_group_bytes_max == 0 {
            return Err(invalid("rewrite_group_bytes_max", "must be at least 1"));
        }
        if self.rewrite_after_segments == 0 {
            return Err(invalid("rewrite_after_segments", "must be at least 1"));
        }
        Ok(())
    }
}

/// One change to one group's persisted state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Update {
    /// Append entries, truncating a conflicting suffix first.
    Entries {
        /// The group.
        group: GroupId,
        /// Contiguous entries.
        entries: Vec<Entry>,
    },
    /// Replace the hard state.
    HardState {
        /// The group.
        group: GroupId,
        /// The new hard state.
        state: HardState,
    },
    /// Record that the state machine took a snapshot; the log is kept.
    Snapshot {
        /// The group.
        group: GroupId,
        /// The snapshot's metadata.
        meta: SnapshotMeta,
    },
    /// Record a snapshot received from the leader; it replaces the log,
    /// which restarts after it.
    InstallSnapshot {
        /// The group.
        group: GroupId,
        /// The snapshot's metadata.
        meta: SnapshotMeta,
    },
    /// Discard entries up to `index`, which a snapshot must cover.
    Compact {
        /// The group.
        group: GroupId,
        /// The last index to discard.
        index: LogIndex,
    },
    /// Forget the group.
    RemoveGroup {
        /// The group.
        group: GroupId,
    },
}

/// Updates made durable together by one call.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WriteBatch {
    /// The updates, applied in order.
    pub updates: Vec<Update>,
}

impl WriteBatch {
    /// An empty batch.
    pub fn new() -> WriteBatch {
        WriteBatch::default()
    }

    /// Adds entries of a group.
    pub fn entries(&mut self, group: GroupId, entries: Vec<Entry>) -> &mut Self {
        self.updates.push(Update::Entries { group, entries });
        self
    }

    /// Adds a hard state of a group.
    pub fn hard_state(&mut self, group: GroupId, state: HardState) -> &mut Self {
        self.updates.push(Update::HardState { group, state });
        self
    }

    /// Records a snapshot the state machine took.
    pub fn snapshot(&mut self, group: GroupId, meta: SnapshotMeta) -> &mut Self {
        self.updates.push(Update::Snapshot { group, meta });
        self
    }

    /// Records a snapshot installed from the leader, replacing the log.
    pub fn install_snapshot(&mut self, group: GroupId, meta: SnapshotMeta) -> &mut Self {
        self.updates.push(Update::InstallSnapshot { group, meta });
        self
    }

    /// Adds a compaction of a group.
    pub fn compact(&mut self, group: GroupId, index: LogIndex) -> &mut Self {
        self.updates.push(Update::Compact { group, index });
        self
    }

    /// Removes a group.
    pub fn remove_group(&mut self, group: GroupId) -> &mut Self {
        self.updates.push(Update::RemoveGroup { group });
        self
    }

    fn size_bytes_estimate(&self) -> u64 {
        self.updates
            .iter()
            .map(|update| match update {
                Update::Entries { entries, .. } => entries_body_bytes(entries) as u64,
                _ => 64,
            })
            .sum::<u64>()
            + (RECORD_HEADER_BYTES * self.updates.len()) as u64
    }
}

/// Counters, for benchmarks, status and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WalStats {
    /// Requests acknowledged.
    pub requests: u64,
    /// Batches written (each one write and at most one fsync; with direct
    /// writes a batch that needs no fsync may ride with the next one).
    pub batches: u64,
    /// fsyncs done.
    pub fsyncs: u64,
    /// Batches written with direct I/O (docs/wal-format.md, "Direct
    /// writes"); the rest of `batches` went through the page cache.
    pub direct_writes: u64,
    /// Bytes written to segments.
    pub bytes_written: u64,
    /// Segments on disk.
    pub segments: u64,
    /// Bytes of all segments on disk.
    pub size_bytes: u64,
    /// Groups rewritten forward by garbage collection.
    pub groups_rewritten: u64,
    /// Entries records read from the cache.
    pub cache_hits: u64,
    /// Entries records read from disk (then cached).
    pub cache_misses: u64,
    /// fsyncs by latency: `fsync_buckets[i]` counts those that took at
    /// most `FSYNC_BUCKET_BOUNDS_MICROS[i]` (and more than the bound
    /// before); the last counts the slower rest.
    pub fsync_buckets: [u64; FSYNC_BUCKETS],
    /// The time all fsyncs took, in microseconds.
    pub fsync_micros_total: u64,
}

/// Upper bounds of the fsync latency buckets, in microseconds.
pub const FSYNC_BUCKET_BOUNDS_MICROS: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
/// Buckets of the fsync latency histogram: one per bound and one for the
/// rest.
pub const FSYNC_BUCKETS: usize = FSYNC_BUCKET_BOUNDS_MICROS.len() + 1;

type Done = Box<dyn FnOnce(Result<()>) + Send>;

struct Request {
    batch: WriteBatch,
    done: Done,
}

/// Batches with at most this many requests are answered on the writer
/// thread itself.
const INLINE_ANSWERS_MAX: usize = 2;

#[derive(Default)]
struct Counters {
    /// Batches of answers handed to the completion thread, not yet run.
    completions_queued: AtomicU64,
    requests: AtomicU64,
    batches: AtomicU64,
    fsyncs: AtomicU64,
    direct_writes: AtomicU64,
    bytes_written: AtomicU64,
    groups_rewritten: AtomicU64,
    cache_hits: AtomicU64,
    cache_misses: AtomicU64,
    fsync_buckets: [AtomicU64; FSYNC_BUCKETS],
    fsync_micros_total: AtomicU64,
}

struct Shared {
    config: WalConfig,
    index: RwLock<Index>,
    /// Read handles of every segment on disk, and their sizes.
    segments: Mutex<BTreeMap<u64, (Arc<File>, u64)>>,
    cache: Mutex<RecordCache>,
    failure: Mutex<Option<String>>,
    counters: Counters,
    /// The record checksum salt of the segments this process writes.
    salt: u32,
    /// Whether the active segment is written with direct I/O.
    direct_io: AtomicBool,
}

/// The shared write-ahead log of a node.
pub struct Wal {
    /// Held for the life of the log: a second `Wal` on the same directory
    /// (another process, or a forgotten instance) is refused.
    _lock: File,
    shared: Arc<Shared>,
    sender: Option<SyncSender<Request>>,
    writer: Option<JoinHandle<()>>,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding these locks is a bug already reported; the
    // data they guard stays consistent, so carry on.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn segment_path(dir: &Path, sequence: u64) -> PathBuf {
    dir.join(format!("{sequence:020}.seg"))
}

fn sync_dir(dir: &Path) -> Result<()> {
    let handle =
        File::open(dir).map_err(|e| Error::io(format!("open directory {}", dir.display()), e))?;
    handle
        .sync_all()
        .map_err(|e| Error::io(format!("fsync directory {}", dir.display()), e))
}

impl Wal {
    /// Opens (or creates) the log in `config.dir`, replaying every segment.
    pub fn open(config: WalConfig) -> Result<Wal> {
        config.validate()?;
        fs::create_dir_all(&config.dir)
            .map_err(|e| Error::io(format!("create {}", config.dir.display()), e))?;
        if let Some(parent) = config.dir.parent() {
            if !parent.as_os_str().is_empty() {
                sync_dir(parent)?;
            }
        }
        let lock_path = config.dir.join("LOCK");
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io(format!("open {}", lock_path.display()), e))?;
        if lock.try_lock().is_err() {
            return Err(Error::Io {
                context: format!("lock {}", lock_path.display()),
                message: "the log is in use by another process or instance; stop it first".into(),
            });
        }
        let (index, segments) = replay(&config.dir)?;
        let salt = salt_to_write(&segments);
        let shared = Arc::new(Shared {
            salt,
            index: RwLock::new(index),
            segments: Mutex::new(segments),
            cache: Mutex::new(RecordCache::new(config.cache_bytes_max)),
            failure: Mutex::new(None),
            counters: Counters::default(),
            direct_io: AtomicBool::new(false),
            config,
        });
        let active = Writer::open_active(&shared)?;
        let (sender, receiver) = mpsc::sync_channel(shared.config.queue_requests_max);
        let (completions, completion_receiver) = mpsc::channel::<Vec<(Done, Result<()>)>>();
        let completer_shared = Arc::clone(&shared);
        let completer = std::thread::Builder::new()
            .name("regatta-wal-completer".into())
            .spawn(move || {
                for answers in completion_receiver {
                    for (done, result) in answers {
                        done(result);
                    }
                    let counters = &completer_shared.counters;
                    counters.completions_queued.fetch_sub(1, Ordering::AcqRel);
                }
            })
            .map_err(|e| Error::io("spawn the WAL completion thread", e))?;
        let writer_shared = Arc::clone(&shared);
        let writer = std::thread::Builder::new()
            .name("regatta-wal-writer".into())
            .spawn(move || {
                Writer::new(writer_shared, active, completions).run(receiver);
                let _ = completer.join();
            })
            .map_err(|e| Error::io("spawn the WAL writer thread", e))?;
        Ok(Wal {
            _lock: lock,
            shared,
            sender: Some(sender),
            writer: Some(writer),
        })
    }

    /// Queues a batch; `done` runs on the writer thread once the batch is
    /// durable (or failed). Blocks while `queue_requests_max` requests wait.
    pub fn submit(&self, batch: WriteBatch, done: impl FnOnce(Result<()>) + Send + 'static) {
        let request = Request {
            batch,
            done: Box::new(done),
        };
        let Some(sender) = &self.sender else {
            (request.done)(Err(Error::Closed));
            return;
        };
        if let Err(mpsc::SendError(request)) = sender.send(request) {
            (request.done)(Err(Error::Closed));
        }
    }

    /// Appends a batch and returns once it is durable.
    pub fn append(&self, batch: WriteBatch) -> Result<()> {
        let (sender, receiver) = mpsc::sync_channel(1);
        self.submit(batch, move |result| {
            let _ = sender.send(result);
        });
        receiver.recv().unwrap_or(Err(Error::Closed))
    }

    fn with_group<T>(&self, group: GroupId, read: impl FnOnce(&GroupState) -> T) -> Option<T> {
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        index.groups.get(&group.0).map(read)
    }

    /// Every group with state in the log.
    pub fn groups(&self) -> Vec<GroupId> {
        let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
        let mut groups: Vec<GroupId> = index.groups.keys().map(|g| GroupId(*g)).collect();
        groups.sort();
        groups
    }

    /// The group's hard state (default if the group is unknown).
    pub fn hard_state(&self, group: GroupId) -> HardState {
        self.with_group(group, |state| state.hard_state)
            .unwrap_or_default()
    }

    /// The group's latest snapshot marker.
    pub fn snapshot(&self, group: GroupId) -> Option<SnapshotMeta> {
        self.with_group(group, |state| state.snapshot.clone())
            .flatten()
    }

    /// The first index held as an entry.
    pub fn first_index(&self, group: GroupId) -> LogIndex {
        self.with_group(group, GroupState::first_index)
            .unwrap_or(LogIndex(1))
    }

    /// Bytes of `group`'s log held in segments (its entries records; a
    /// record partly compacted counts whole).
    pub fn log_bytes(&self, group: GroupId) -> u64 {
        self.with_group(group, GroupState::log_bytes)
            .unwrap_or_default()
    }

    /// The last index held (the compaction point when no entry is held).
    pub fn last_index(&self, group: GroupId) -> LogIndex {
        self.with_group(group, GroupState::last_index)
            .unwrap_or_default()
    }

    /// The term of the entry at `index` (or of the compaction point).
    pub fn term(&self, group: GroupId, index: LogIndex) -> Result<Term> {
        let found = self.with_group(group, |state| (state.term(index), state.last_index()));
        match found {
            Some((Ok(Some(term)), _)) => Ok(term),
            Some((Err(compacted_to), _)) => Err(Error::Compacted {
                group: group.0,
                compacted_to,
            }),
            Some((Ok(None), last_index)) => Err(Error::Unavailable {
                group: group.0,
                index,
                last_index,
            }),
            None if index.0 == 0 => Ok(Term(0)),
            None => Err(Error::Unavailable {
                group: group.0,
                index,
                last_index: LogIndex(0),
            }),
        }
    }

    /// Entries in `[low, high)`, stopping before `size_bytes_max` is passed
    /// but always returning at least one entry.
    pub fn entries(
        &self,
        group: GroupId,
        low: LogIndex,
        high: LogIndex,
        size_bytes_max: u64,
    ) -> Result<Vec<Entry>> {
        read_entries(&self.shared, group, low, high, size_bytes_max)
    }

    /// Returns once every request submitted before it has been handled,
    /// along with the garbage collection that followed it. An empty batch
    /// costs no write and no fsync.
    pub fn barrier(&self) -> Result<()> {
        self.append(WriteBatch::new())
    }

    /// Whether the active segment is written with direct I/O: false when
    /// `WalConfig::direct_io` is off or the file system refuses `O_DIRECT`
    /// (docs/wal-format.md, "Direct writes").
    pub fn direct_io(&self) -> bool {
        self.shared.direct_io.load(Ordering::Relaxed)
    }

    /// Counters.
    pub fn stats(&self) -> WalStats {
        let counters = &self.shared.counters;
        let segments = lock(&self.shared.segments);
        WalStats {
            requests: counters.requests.load(Ordering::Relaxed),
            batches: counters.batches.load(Ordering::Relaxed),
            fsyncs: counters.fsyncs.load(Ordering::Relaxed),
            direct_writes: counters.direct_writes.load(Ordering::Relaxed),
            bytes_written: counters.bytes_written.load(Ordering::Relaxed),
            segments: segments.len() as u64,
            size_bytes: segments.values().map(|(_, size)| *size).sum(),
            groups_rewritten: counters.groups_rewritten.load(Ordering::Relaxed),
            cache_hits: counters.cache_hits.load(Ordering::Relaxed),
            cache_misses: counters.cache_misses.load(Ordering::Relaxed),
            fsync_buckets: std::array::from_fn(|bucket| {
                counters.fsync_buckets[bucket].load(Ordering::Relaxed)
            }),
            fsync_micros_total: counters.fsync_micros_total.load(Ordering::Relaxed),
        }
    }

    /// The failure that stopped the log, if any.
    pub fn failure(&self) -> Option<String> {
        lock(&self.shared.failure).clone()
    }

    /// Stops the writer after it has handled every queued request.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.sender = None;
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Drop for Wal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn list_segments(dir: &Path) -> Result<Vec<u64>> {
    let mut sequences = Vec::new();
    let entries = fs::read_dir(dir).map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
    for entry in entries {
        let entry = entry.map_err(|e| Error::io(format!("list {}", dir.display()), e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        if stem.len() == 20 {
            if let Ok(sequence) = stem.parse::<u64>() {
                sequences.push(sequence);
            }
        }
    }
    sequences.sort_unstable();
    Ok(sequences)
}

/// Where a record is: (segment, offset). Orders records in log order.
type Position = (u64, u64);

/// What the first pass learns of a group: where its log last restarted and
/// how far its prefix is compacted.
#[derive(Clone, Copy, Debug, Default)]
struct Floor {
    /// The last removal of the group: everything before it is dead.
    removed_at: Option<Position>,
    /// The last installed snapshot after that: entries before it are dead.
    installed_at: Option<Position>,
    /// Where the last rewrite of the group starts: records before it are dead.
    rewritten_from: Option<Position>,
    /// The highest compaction point (or install) after the removal, with
    /// its term and the segment of the record that set it.
    floor: Option<(LogIndex, Term, u64)>,
}

type SegmentHandles = BTreeMap<u64, (Arc<File>, u64)>;

/// Replays every segment in two passes.
///
/// Pass 1 checks each segment, truncates a torn tail, and finds each
/// group's [`Floor`]. Pass 2 applies the records, starting each group at its
/// floor. Records the floor makes dead are skipped: entries at or below the
/// compaction point, entries before the last install, and anything before
/// the last removal. Garbage collection deletes only whole segments before
/// the oldest one any group needs, so the kept segments may begin with such
/// dead records. Without the floor, replaying them would look like a gap.
fn replay(dir: &Path) -> Result<(Index, SegmentHandles)> {
    let sequences = list_segments(dir)?;
    // A process killed between a write and its fdatasync leaves bytes in
    // the page cache that no fsync covered and nobody was told of. Read
    // back, they would be trusted (and a later write flagged as proof that
    // they were durable) while a power loss can still take them: make
    // every segment durable, and the directory, before reading any.
    for sequence in &sequences {
        let path = segment_path(dir, *sequence);
        let file =
            File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        file.sync_all()
            .map_err(|e| Error::io(format!("fsync {}", path.display()), e))?;
    }
    sync_dir(dir)?;
    // Segments are only ever removed oldest first, so the ones left are
    // consecutive; a missing one in between lost records.
    if let Some(gap) = sequences.windows(2).find(|pair| pair[1] != pair[0] + 1) {
        return Err(corruption(
            &segment_path(dir, gap[1]),
            0,
            format!(
                "segments {} to {} are missing (only the oldest segments are ever removed)",
                gap[0] + 1,
                gap[1] - 1
            ),
        ));
    }
    let mut floors: HashMap<u64, Floor> = HashMap::new();
    let mut kept = Vec::new();
    for (position, sequence) in sequences.iter().enumerate() {
        let is_last = position + 1 == sequences.len();
        if let Some(size) = first_pass(dir, *sequence, is_last, &mut floors)? {
            kept.push((*sequence, size));
        }
    }
    let mut index = Index::default();
    let mut segments = BTreeMap::new();
    for (sequence, size) in kept {
        second_pass(dir, sequence, size, &floors, &mut index)?;
        let path = segment_path(dir, sequence);
        let file =
            File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        segments.insert(sequence, (Arc::new(file), size));
    }
    Ok((index, segments))
}

fn corruption(path: &Path, offset: u64, reason: String) -> Error {
    Error::Corruption {
        segment: path.to_path_buf(),
        offset,
        reason,
    }
}

/// A segment's bytes (up to `size`) and what a scan found in them.
type SegmentRead = (Bytes, SegmentScan);

fn read_segment(path: &Path, sequence: u64, size: Option<u64>) -> Result<SegmentRead> {
    let mut bytes = fs::read(path).map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    if let Some(size) = size {
        bytes.truncate(size as usize);
    }
    let format = match check_segment_header(&bytes, sequence) {
        Ok(format) => format,
        Err(HeaderProblem::Version(version)) => {
            return Err(Error::UnsupportedVersion {
                file: path.to_path_buf(),
                version,
                supported: FORMAT_VERSION,
            })
        }
        // The caller decides what a bad header means; read it as ours,
        // with the salt it holds if its bytes are there.
        Err(_) => SegmentFormat {
            version: FORMAT_VERSION,
            salt: if bytes.len() >= 16 {
                read_u32(&bytes, 12)
            } else {
                0
            },
        },
    };
    let scan = scan_segment(&bytes, format);
    Ok((Bytes::from(bytes), scan))
}

fn decode_at(path: &Path, bytes: &Bytes, raw: &RawRecord) -> Result<Record> {
    let end = (raw.body_offset + raw.body_len as u64) as usize;
    let body = bytes.slice(raw.body_offset as usize..end);
    Record::decode(raw.kind, &body).map_err(|reason| corruption(path, raw.offset, reason))
}

/// Pass 1 over one segment. Returns its valid size, or `None` when it was
/// a torn, empty last segment and has been deleted.
fn first_pass(
    dir: &Path,
    sequence: u64,
    is_last: bool,
    floors: &mut HashMap<u64, Floor>,
) -> Result<Option<u64>> {
    let path = segment_path(dir, sequence);
    let (bytes, scan) = read_segment(&path, sequence, None)?;
    let records = scan.records;
    if let Err(problem) = check_segment_header(&bytes, sequence) {
        // A segment is created with its header and zeros in one write,
        // fsynced before any record goes in: only zeros after the header
        // mean it was torn while being created and never held a record.
        // (A damaged salt hides the records from the scan; the zeros
        // still tell.)
        let never_written = bytes
            .get(SEGMENT_HEADER_BYTES..)
            .is_none_or(|rest| rest.iter().all(|byte| *byte == 0));
        if is_last
            && never_written
            && records.is_empty()
            && !matches!(problem, HeaderProblem::Sequence(_))
        {
            // Torn while being created: it never held a record.
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            sync_dir(dir)?;
            return Ok(None);
        }
        return Err(corruption(
            &path,
            0,
            format!("bad segment header: {problem:?}"),
        ));
    }
    for raw in &records {
        let floor = floors.entry(raw.group).or_default();
        note_floor(floor, (&path, &bytes, raw), sequence)?;
    }
    match scan.end {
        SegmentEnd::Clean => Ok(Some(scan.data_end)),
        SegmentEnd::Torn { offset } if is_last => {
            truncate_file(&path, offset)?;
            Ok(Some(offset))
        }
        SegmentEnd::Torn { offset } => Err(corruption(
            &path,
            offset,
            "damaged record in a segment that is not the last".into(),
        )),
        SegmentEnd::Corrupt { offset, reason } => Err(corruption(&path, offset, reason)),
    }
}

/// What a record of pass 1 says of its group's floor: a removal starts the
/// group over, a rewrite moves where its records start, an install or a
/// compaction raises the index its log starts after.
fn note_floor(
    floor: &mut Floor,
    (path, bytes, raw): (&Path, &Bytes, &RawRecord),
    sequence: u64,
) -> Result<()> {
    let position = (sequence, raw.offset);
    match raw.kind {
        RecordType::GroupRemoved => {
            *floor = Floor {
                removed_at: Some(position),
                ..Floor::default()
            }
        }
        RecordType::Rewritten => {
            if let Record::Rewritten { segment, offset } = decode_at(path, bytes, raw)? {
                let from = (segment, offset);
                floor.rewritten_from = floor.rewritten_from.max(Some(from));
                floor.installed_at = floor.installed_at.filter(|installed| *installed >= from);
            }
        }
        RecordType::Snapshot | RecordType::Compaction => match decode_at(path, bytes, raw)? {
            Record::Snapshot {
                meta,
                installed: true,
            } => {
                floor.installed_at = Some(position);
                floor.floor = Some((meta.index, meta.term, sequence));
            }
            Record::Compaction { index, term }
                if floor.floor.is_none_or(|(known, _, _)| index > known) =>
            {
                floor.floor = Some((index, term, sequence));
            }
            _ => {}
        },
        RecordType::Entries | RecordType::HardState => {}
    }
    Ok(())
}

/// Pass 2 over one segment: applies its live records to `index`.
fn second_pass(
    dir: &Path,
    sequence: u64,
    size: u64,
    floors: &HashMap<u64, Floor>,
    index: &mut Index,
) -> Result<()> {
    let path = segment_path(dir, sequence);
    let (bytes, scan) = read_segment(&path, sequence, Some(size))?;
    for raw in &scan.records {
        let position = (sequence, raw.offset);
        let floor = floors.get(&raw.group).copied().unwrap_or_default();
        let dead = floor.removed_at.is_some_and(|removed| position <= removed)
            || floor.rewritten_from.is_some_and(|from| position < from);
        if dead {
            continue;
        }
        let mut record = decode_at(&path, &bytes, raw)?;
        match &mut record {
            Record::Entries(entries) => {
                if floor
                    .installed_at
                    .is_some_and(|installed| position < installed)
                {
                    continue;
                }
                if let Some((floor_index, _, _)) = floor.floor {
                    entries.retain(|entry| entry.index > floor_index);
                    if entries.is_empty() {
                        // Wholly at or below the floor, the record still
                        // cut the log after its entries when it was
                        // written: entries above the floor replayed from
                        // earlier records were overwritten by it.
                        if let Some(state) = index.groups.get_mut(&raw.group) {
                            state.truncate_after(floor_index);
                        }
                        continue;
                    }
                }
                if entries.is_empty() {
                    continue;
                }
            }
            Record::Snapshot { installed, .. } => {
                // Only the last install restarts the log; the floor holds it.
                *installed = *installed && Some(position) == floor.installed_at;
            }
            _ => {}
        }
        let location = Location {
            segment: sequence,
            body_offset: raw.body_offset,
            body_len: raw.body_len,
        };
        let state = index
            .groups
            .entry(raw.group)
            .or_insert_with(|| match floor.floor {
                Some((floor_index, term, segment)) => {
                    GroupState::starting_at((floor_index, term), segment)
                }
                None => GroupState::default(),
            });
        state.apply(&record, location).map_err(|error| {
            corruption(
                &path,
                raw.offset,
                format!("group {}: {}", raw.group, error.0),
            )
        })?;
    }
    Ok(())
}

fn truncate_file(path: &Path, length: u64) -> Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    file.set_len(length)
        .map_err(|e| Error::io(format!("truncate {}", path.display()), e))?;
    file.sync_all()
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))
}

fn read_entries(
    shared: &Shared,
    group: GroupId,
    low: LogIndex,
    high: LogIndex,
    size_bytes_max: u64,
) -> Result<Vec<Entry>> {
    let (spans, handles) = {
        let index = shared.index.read().unwrap_or_else(|p| p.into_inner());
        let Some(state) = index.groups.get(&group.0) else {
            return Err(Error::Unavailable {
                group: group.0,
                index: high.prev(),
                last_index: LogIndex(0),
            });
        };
        if low < state.first_index() {
            return Err(Error::Compacted {
                group: group.0,
                compacted_to: state.compacted.0,
            });
        }
        if high > state.last_index().next() {
            return Err(Error::Unavailable {
                group: group.0,
                index: high.prev(),
                last_index: state.last_index(),
            });
        }
        let start = state.spans.partition_point(|span| span.last < low);
        let spans: Vec<_> = state
            .spans
            .iter()
            .skip(start)
            .take_while(|span| span.first < high)
            .copied()
            .collect();
        // Take the file handles under the index lock: a concurrent garbage
        // collection may delete a segment, but an open handle stays valid.
        let segments = lock(&shared.segments);
        let handles: HashMap<u64, Arc<File>> = spans
            .iter()
            .filter_map(|span| {
                segments
                    .get(&span.location.segment)
                    .map(|(file, _)| (span.location.segment, Arc::clone(file)))
            })
            .collect();
        (spans, handles)
    };
    let mut result = Vec::new();
    let mut used_bytes = 0u64;
    for span in spans {
        let record = load_record(shared, &handles, span.location)?;
        for entry in record
            .iter()
            .filter(|e| e.index >= low.max(span.first) && e.index < high && e.index <= span.last)
        {
            used_bytes += entry.size_bytes();
            if !result.is_empty() && used_bytes > size_bytes_max {
                return Ok(result);
            }
            result.push(entry.clone());
        }
    }
    Ok(result)
}

fn load_record(
    shared: &Shared,
    handles: &HashMap<u64, Arc<File>>,
    location: Location,
) -> Result<Arc<Vec<Entry>>> {
    if let Some(record) = lock(&shared.cache).get(&location) {
        shared.counters.cache_hits.fetch_add(1, Ordering::Relaxed);
        return Ok(record);
    }
    shared.counters.cache_misses.fetch_add(1, Ordering::Relaxed);
    let path = segment_path(&shared.config.dir, location.segment);
    let Some(file) = handles.get(&location.segment) else {
        return Err(Error::io(
            format!("read {}", path.display()),
            std::io::Error::other("segment deleted"),
        ));
    };
    let mut body = vec![0u8; location.body_len as usize];
    file.read_exact_at(&mut body, location.body_offset)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    let corruption = |reason: String| Error::Corruption {
        segment: path.clone(),
        offset: location.body_offset - RECORD_HEADER_BYTES as u64,
        reason,
    };
    let record = Record::decode(RecordType::Entries, &Bytes::from(body)).map_err(corruption)?;
    let Record::Entries(entries) = record else {
        return Err(corruption("expected an entries record".into()));
    };
    let entries = Arc::new(entries);
    lock(&shared.cache).insert(location, Arc::clone(&entries));
    Ok(entries)
}

/// The segment being appended to.
struct ActiveSegment {
    sequence: u64,
    /// Opened for positioned writes (not append mode: the file is longer
    /// than its records).
    file: File,
    /// Where the records end: the next write goes here.
    size_bytes: u64,
    /// The file's length: every byte from `size_bytes` to here is zero
    /// (docs/wal-format.md, "Zero-filled ahead").
    zeroed_end: u64,
    /// The same file opened for direct writes, when they are on and the
    /// file system takes them; buffered writes through `file` otherwise.
    direct: Option<DirectFile>,
}

/// Opens segment `path`, whose records end at `size_bytes`, for direct
/// writes if the configuration asks for them and allows them: segments
/// must end on a block boundary, so that whole-block writes never pass
/// `segment_size_bytes_max`.
fn open_direct(
    config: &WalConfig,
    path: &Path,
    file: &File,
    size_bytes: u64,
) -> Result<Option<DirectFile>> {
    if !config.direct_io
        || !config
            .segment_size_bytes_max
            .is_multiple_of(DIRECT_BLOCK_BYTES)
    {
        return Ok(None);
    }
    let start = block_floor(size_bytes);
    let mut tail = vec![0u8; (size_bytes - start) as usize];
    file.read_exact_at(&mut tail, start)
        .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
    DirectFile::open(path, tail)
        .map_err(|e| Error::io(format!("open {} for direct writes", path.display()), e))
}

/// Opens the active segment for direct writes (see [`open_direct`]) and
/// records whether they are on.
fn open_active_direct(
    shared: &Shared,
    path: &Path,
    file: &File,
    size_bytes: u64,
) -> Result<Option<DirectFile>> {
    let direct = open_direct(&shared.config, path, file, size_bytes)?;
    shared.direct_io.store(direct.is_some(), Ordering::Relaxed);
    Ok(direct)
}

/// What a request will write, checked against the log as it will be.
struct Encoded {
    records: Vec<(u64, Record, u64, u32)>,
    /// False when every record only advances a commit index.
    must_sync: bool,
}

/// The writer thread's state.
struct Writer {
    shared: Arc<Shared>,
    active: ActiveSegment,
    /// Acknowledgements go to the completion thread, batch by batch.
    completions: mpsc::Sender<Vec<(Done, Result<()>)>>,
    /// Set when a segment rolled or a group's pins moved (compaction,
    /// install, removal): garbage collection runs only then, so a batch
    /// costs nothing proportional to the number of groups.
    garbage_collection_due: bool,
    /// The active segment holds written bytes no fsync has covered yet.
    unsynced: bool,
    /// Whether to poll for the next request before sleeping.
    spin: SpinPolicy,
}

/// How often the writer's recent waits for a request ended within
/// `writer_spin_micros`, as a moving average in 1/1024ths (each wait
/// weighs 1/8): the writer polls only while at least half did, that is,
/// while polling would have caught the request.
#[derive(Clone, Copy, Debug)]
struct SpinPolicy {
    short_waits_per_1024: u32,
}

impl SpinPolicy {
    /// Polls at first: a lone writer's callers resubmit at once.
    fn new() -> SpinPolicy {
        SpinPolicy {
            short_waits_per_1024: 1024,
        }
    }

    fn should_spin(&self) -> bool {
        self.short_waits_per_1024 >= 512
    }

    fn record_wait(&mut self, short: bool) {
        let rate = self.short_waits_per_1024;
        self.short_waits_per_1024 = rate * 7 / 8 + if short { 128 } else { 0 };
        debug_assert!(self.short_waits_per_1024 <= 1024);
    }
}

impl Writer {
    fn new(
        shared: Arc<Shared>,
        active: ActiveSegment,
        completions: mpsc::Sender<Vec<(Done, Result<()>)>>,
    ) -> Writer {
        Writer {
            shared,
            active,
            completions,
            garbage_collection_due: true,
            unsynced: false,
            spin: SpinPolicy::new(),
        }
    }

    /// Opens the last segment for appending, or creates the first one. A
    /// full segment, or one of an older format version, is not appended
    /// to: a new segment follows it.
    fn open_active(shared: &Shared) -> Result<ActiveSegment> {
        let last = lock(&shared.segments)
            .iter()
            .next_back()
            .map(|(s, (_, size))| (*s, *size));
        let Some((sequence, size)) = last else {
            return create_segment(shared, 1);
        };
        if size >= shared.config.segment_size_bytes_max {
            return create_segment(shared, sequence + 1);
        }
        let path = segment_path(&shared.config.dir, sequence);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| Error::io(format!("open {}", path.display()), e))?;
        let mut header = [0u8; SEGMENT_HEADER_BYTES];
        file.read_exact_at(&mut header, 0)
            .map_err(|e| Error::io(format!("read {}", path.display()), e))?;
        if check_segment_header(&header, sequence) != Ok(SegmentFormat::current(shared.salt)) {
            return create_segment(shared, sequence + 1);
        }
        let length = file
            .metadata()
            .map_err(|e| Error::io(format!("stat {}", path.display()), e))?
            .len();
        // Replay found only zeros after the records, or truncated a torn
        // tail there.
        assert!(
            length >= size,
            "segment {sequence} shorter than its records"
        );
        let direct = open_active_direct(shared, &path, &file, size)?;
        Ok(ActiveSegment {
            sequence,
            file,
            size_bytes: size,
            zeroed_end: length,
            direct,
        })
    }

    /// Runs until every sender is gone; dropping `self` at the end closes
    /// the completion channel, so the completion thread drains and exits.
    fn run(mut self, receiver: Receiver<Request>) {
        while let Some(first) = self.next_request(&receiver) {
            let requests = self.collect_batch(first, &receiver);
            self.write_batch(requests);
            if self.garbage_collection_due && lock(&self.shared.failure).is_none() {
                self.garbage_collection_due = false;
                // The index may point at an unsynced hard state: the
                // segment with the last synced one must outlive it.
                let collected = self
                    .sync_if_unsynced()
                    .and_then(|()| self.collect_garbage());
                if let Err(error) = collected {
                    self.fail(error.to_string());
                }
            }
        }
        if lock(&self.shared.failure).is_none() {
            if let Err(error) = self.sync_if_unsynced() {
                self.fail(error.to_string());
            }
        }
    }

    /// The next request: polled for `writer_spin_micros` if recent waits
    /// were mostly that short, then waited for.
    fn next_request(&mut self, receiver: &Receiver<Request>) -> Option<Request> {
        match receiver.try_recv() {
            Ok(request) => return Some(request),
            Err(TryRecvError::Disconnected) => return None,
            Err(TryRecvError::Empty) => {}
        }
        let started = Instant::now();
        let spin_until = started + Duration::from_micros(self.shared.config.writer_spin_micros);
        let spin = self.spin.should_spin();
        let request = loop {
            match receiver.try_recv() {
                Ok(request) => break Some(request),
                Err(TryRecvError::Disconnected) => return None,
                Err(TryRecvError::Empty) if spin && Instant::now() < spin_until => {
                    std::thread::yield_now()
                }
                Err(TryRecvError::Empty) => break receiver.recv().ok(),
            }
        };
        self.spin.record_wait(Instant::now() < spin_until);
        request
    }

    /// Takes the requests queued now, within the batch size and wait bounds.
    fn collect_batch(&self, first: Request, receiver: &Receiver<Request>) -> Vec<Request> {
        let config = &self.shared.config;
        let mut size_bytes = first.batch.size_bytes_estimate();
        let mut requests = vec![first];
        let deadline = Instant::now() + Duration::from_micros(config.batch_wait_micros_max);
        while size_bytes < config.batch_bytes_max {
            let next = match receiver.try_recv() {
                Ok(request) => request,
                Err(TryRecvError::Disconnected) => break,
                Err(TryRecvError::Empty) => {
                    let now = Instant::now();
                    if now >= deadline {
                        break;
                    }
                    match receiver.recv_timeout(deadline - now) {
                        Ok(request) => request,
                        Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
                    }
                }
            };
            size_bytes += next.batch.size_bytes_estimate();
            requests.push(next);
        }
        requests
    }

    fn fail(&self, reason: String) {
        let mut failure = lock(&self.shared.failure);
        if failure.is_none() {
            *failure = Some(reason);
        }
    }

    fn failed(&self) -> Option<Error> {
        lock(&self.shared.failure)
            .clone()
            .map(|reason| Error::Failed { reason })
    }

    /// Writes one batch and hands its acknowledgements to the completion
    /// thread, in request order, so that the next write and fsync can start
    /// while the callers of this one are being woken.
    fn write_batch(&mut self, requests: Vec<Request>) {
        let mut answers: Vec<(Done, Result<()>)> = Vec::with_capacity(requests.len());
        if let Some(error) = self.failed() {
            answers.extend(
                requests
                    .into_iter()
                    .map(|request| (request.done, Err(error.clone()))),
            );
            self.complete(answers);
            return;
        }
        let mut buffer = Vec::new();
        let mut accepted = Vec::new();
        {
            let index = self.shared.index.read().unwrap_or_else(|p| p.into_inner());
            let mut view = BatchView::new(&index, self.shared.salt);
            for request in requests {
                let moves_pins = request.batch.updates.iter().any(|update| {
                    matches!(
                        update,
                        Update::Compact { .. }
                            | Update::InstallSnapshot { .. }
                            | Update::RemoveGroup { .. }
                    )
                });
                self.garbage_collection_due |= moves_pins;
                match view.encode(request.batch, &mut buffer) {
                    Ok(encoded) => accepted.push((request.done, encoded)),
                    Err(error) => answers.push((request.done, Err(error))),
                }
            }
        }
        // An empty buffer (empty batches, barriers) needs no write or fsync.
        let must_sync = accepted.iter().any(|(_, encoded)| encoded.must_sync);
        let written = if buffer.is_empty() {
            Ok(())
        } else {
            self.write(&mut buffer, must_sync)
                .map(|base| self.publish(&accepted, base))
        };
        let result = match written {
            Ok(()) => {
                let counters = &self.shared.counters;
                counters
                    .requests
                    .fetch_add(accepted.len() as u64, Ordering::Relaxed);
                Ok(())
            }
            Err(error) => {
                self.fail(error.to_string());
                Err(self.failed().unwrap_or(error))
            }
        };
        answers.extend(accepted.into_iter().map(|(done, _)| (done, result.clone())));
        self.complete(answers);
    }

    fn complete(&self, answers: Vec<(Done, Result<()>)>) {
        // A lone caller is answered here: a thread hop would only add
        // latency. Only when no earlier answers are queued, to keep order.
        let queued = self
            .shared
            .counters
            .completions_queued
            .load(Ordering::Acquire);
        if answers.len() <= INLINE_ANSWERS_MAX && queued == 0 {
            for (done, result) in answers {
                done(result);
            }
            return;
        }
        self.shared
            .counters
            .completions_queued
            .fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::SendError(answers)) = self.completions.send(answers) {
            self.shared
                .counters
                .completions_queued
                .fetch_sub(1, Ordering::AcqRel);
            // The completion thread is gone (only at shutdown): answer here.
            for (done, result) in answers {
                done(result);
            }
        }
    }

    /// Writes `buffer` at the end of the active segment's records (rolling
    /// first if it would not fit) and makes it durable. Returns where it
    /// starts.
    ///
    /// When the buffer would pass the zero-filled end of the file, the next
    /// step of zeros is written first, so that the one `fdatasync` makes
    /// both durable and later writes land on existing blocks.
    fn write_durably(&mut self, buffer: &mut [u8]) -> Result<u64> {
        self.write(buffer, true)
    }

    /// Appends `buffer` to the active segment and, if `must_sync`, makes it
    /// durable with the bytes before it.
    fn write(&mut self, buffer: &mut [u8], must_sync: bool) -> Result<u64> {
        assert!(
            buffer.get(5) == Some(&crate::format::RECORD_FLAG_WRITE_START),
            "a write must start with a record flagged as its start"
        );
        self.make_room(buffer.len() as u64)?;
        // Recovery reads a flagged write after damage as proof that the
        // damaged bytes were durable: true only if no write before this
        // one went without its fsync.
        if self.unsynced {
            crate::format::clear_write_start(buffer, self.shared.salt);
        }
        let base = self.active.size_bytes;
        let end = base + buffer.len() as u64;
        let zeros_to = if end > self.active.zeroed_end {
            (end + ZERO_FILL_STEP_BYTES).min(self.shared.config.segment_size_bytes_max)
        } else {
            end
        };
        if !self.write_direct(buffer, zeros_to, must_sync)? {
            self.write_buffered(buffer, zeros_to)?;
        }
        self.unsynced = true;
        if must_sync {
            self.sync_if_unsynced()?;
        }
        self.active.size_bytes = end;
        if let Some((_, size)) = lock(&self.shared.segments).get_mut(&self.active.sequence) {
            *size = self.active.size_bytes;
        }
        let counters = &self.shared.counters;
        counters.batches.fetch_add(1, Ordering::Relaxed);
        counters
            .bytes_written
            .fetch_add(buffer.len() as u64, Ordering::Relaxed);
        Ok(base)
    }

    /// Writes `buffer` at the records' end with a direct write, zeros after
    /// it to `zeros_to`. False when direct writes are off, or the file
    /// system refused this one (they stay off for the segment then, and
    /// the bytes deferred before it went through the page cache). A
    /// buffer that needs no fsync and fits before the zero-filled end is
    /// deferred, not written: the next write carries it, or the next fsync
    /// writes it first (a direct write waits for the disk).
    fn write_direct(&mut self, buffer: &[u8], zeros_to: u64, must_sync: bool) -> Result<bool> {
        let base = self.active.size_bytes;
        let end = base + buffer.len() as u64;
        let Some(direct) = self.active.direct.as_mut() else {
            return Ok(false);
        };
        if !must_sync && end <= self.active.zeroed_end && direct.defer(base, buffer) {
            return Ok(true);
        }
        let written = direct.write(base, buffer, zeros_to);
        self.direct_outcome(written, base)
    }

    /// Counts a direct write that succeeded and moves the zero-filled end
    /// to the end of its blocks. On `EINVAL` turns direct writes off for
    /// the segment, after writing the deferred bytes before `end` through
    /// the page cache; false then.
    fn direct_outcome(&mut self, written: std::io::Result<u64>, end: u64) -> Result<bool> {
        let path = || segment_path(&self.shared.config.dir, self.active.sequence);
        match written {
            Ok(written_end) => {
                self.active.zeroed_end = self.active.zeroed_end.max(written_end);
                self.shared
                    .counters
                    .direct_writes
                    .fetch_add(1, Ordering::Relaxed);
                Ok(true)
            }
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => {
                self.shared.direct_io.store(false, Ordering::Relaxed);
                if let Some(direct) = self.active.direct.take() {
                    if let Some((start, bytes)) = direct.unwritten(end) {
                        self.active
                            .file
                            .write_all_at(bytes, start)
                            .map_err(|e| Error::io(format!("write {}", path().display()), e))?;
                    }
                }
                Ok(false)
            }
            Err(error) => Err(Error::io(format!("write {}", path().display()), error)),
        }
    }

    /// Writes the bytes the direct writer deferred, before an fsync.
    fn flush_deferred(&mut self) -> Result<()> {
        let end = self.active.size_bytes;
        let Some(direct) = self.active.direct.as_mut() else {
            return Ok(());
        };
        let Some(written) = direct.flush(end).transpose() else {
            return Ok(());
        };
        self.direct_outcome(written, end).map(|_| ())
    }

    /// Writes `buffer` at the records' end through the page cache, and the
    /// zeros after it to `zeros_to` if they pass the zero-filled end.
    fn write_buffered(&mut self, buffer: &[u8], zeros_to: u64) -> Result<()> {
        let path = segment_path(&self.shared.config.dir, self.active.sequence);
        let base = self.active.size_bytes;
        let end = base + buffer.len() as u64;
        if end > self.active.zeroed_end {
            if zeros_to > end {
                let zeros = vec![0u8; (zeros_to - end) as usize];
                self.active
                    .file
                    .write_all_at(&zeros, end)
                    .map_err(|e| Error::io(format!("zero-fill {}", path.display()), e))?;
            }
            self.active.zeroed_end = zeros_to.max(end);
        }
        self.active
            .file
            .write_all_at(buffer, base)
            .map_err(|e| Error::io(format!("write {}", path.display()), e))
    }

    /// Makes every byte written to the active segment durable, if some
    /// write went without an fsync (in the no-sync test mode, only forgets
    /// that it did, so that writes keep their flags as they always had).
    fn sync_if_unsynced(&mut self) -> Result<()> {
        if !self.unsynced {
            return Ok(());
        }
        self.flush_deferred()?;
        if self.shared.config.sync_mode != SyncMode::Fdatasync {
            self.unsynced = false;
            return Ok(());
        }
        let started = std::time::Instant::now();
        self.active.file.sync_data().map_err(|e| {
            let path = segment_path(&self.shared.config.dir, self.active.sequence);
            Error::io(format!("fdatasync {}", path.display()), e)
        })?;
        self.unsynced = false;
        let micros = started.elapsed().as_micros().min(u64::MAX as u128) as u64;
        let counters = &self.shared.counters;
        counters.fsyncs.fetch_add(1, Ordering::Relaxed);
        counters
            .fsync_micros_total
            .fetch_add(micros, Ordering::Relaxed);
        let bucket = FSYNC_BUCKET_BOUNDS_MICROS
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(FSYNC_BUCKETS - 1);
        counters.fsync_buckets[bucket].fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Rolls to a new segment if `size_bytes` would not fit in the active
    /// one (unless it is empty: an oversized batch gets its own segment).
    /// Unsynced bytes of the old segment are made durable first: only the
    /// last segment may end in a torn write.
    fn make_room(&mut self, size_bytes: u64) -> Result<()> {
        let header = SEGMENT_HEADER_BYTES as u64;
        let full = self.active.size_bytes + size_bytes > self.shared.config.segment_size_bytes_max;
        if full && self.active.size_bytes > header {
            self.sync_if_unsynced()?;
            self.active = create_segment(&self.shared, self.active.sequence + 1)?;
            self.garbage_collection_due = true;
        }
        Ok(())
    }

    /// Points the index at the written records. Their entries are not
    /// cached: Raft keeps a group's unapplied entries in memory, and in
    /// steady state nothing reads a fresh record back (the cache counters
    /// read zero under put and mixed load); the cache fills on reads.
    fn publish(&self, accepted: &[(Done, Encoded)], base: u64) {
        let mut index = self.shared.index.write().unwrap_or_else(|p| p.into_inner());
        for (_, encoded) in accepted {
            for (group, record, body_offset, body_len) in &encoded.records {
                let (group, body_offset, body_len) = (*group, *body_offset, *body_len);
                let location = Location {
                    segment: self.active.sequence,
                    body_offset: base + body_offset,
                    body_len,
                };
                if let Err(error) = index.apply(group, record, location) {
                    // The batch view accepted it: a disagreement is a bug.
                    drop(index);
                    self.fail(format!(
                        "index rejected a checked record of group {group}: {}",
                        error.0
                    ));
                    return;
                }
            }
        }
    }

    /// Deletes segments no group needs; rewrites cold groups that pin old
    /// segments so that they do not keep the disk growing.
    fn collect_garbage(&mut self) -> Result<()> {
        self.delete_unneeded_segments()?;
        let oldest = lock(&self.shared.segments).keys().next().copied();
        let Some(oldest) = oldest else { return Ok(()) };
        if self.active.sequence - oldest <= self.shared.config.rewrite_after_segments {
            return Ok(());
        }
        let pinning = self
            .shared
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .groups_pinning(oldest);
        // Rewrite only small groups, and at most a quarter segment per pass,
        // so that rewriting never feeds on itself.
        let mut budget_bytes = self.shared.config.segment_size_bytes_max / 4;
        for (group, live_bytes) in pinning {
            if live_bytes > self.shared.config.rewrite_group_bytes_max || live_bytes > budget_bytes
            {
                continue;
            }
            budget_bytes -= live_bytes;
            self.rewrite_group(group)?;
        }
        self.delete_unneeded_segments()
    }

    fn delete_unneeded_segments(&mut self) -> Result<()> {
        let needed = self
            .shared
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .oldest_segment_needed();
        let keep_from = needed
            .unwrap_or(self.active.sequence)
            .min(self.active.sequence);
        let doomed: Vec<u64> = lock(&self.shared.segments)
            .range(..keep_from)
            .map(|(s, _)| *s)
            .collect();
        if doomed.is_empty() {
            return Ok(());
        }
        // Oldest first, each removal durable before the next: a crash
        // leaves the kept segments contiguous, never a later segment gone
        // while an earlier one (whose records it overrode) stays.
        for sequence in &doomed {
            let path = segment_path(&self.shared.config.dir, *sequence);
            fs::remove_file(&path)
                .map_err(|e| Error::io(format!("remove {}", path.display()), e))?;
            lock(&self.shared.segments).remove(sequence);
            lock(&self.shared.cache).forget_segment(*sequence);
            sync_dir(&self.shared.config.dir)?;
        }
        Ok(())
    }

    /// Appends a group's live state again, in the active segment.
    fn rewrite_group(&mut self, group: u64) -> Result<()> {
        let Some(state) = self
            .shared
            .index
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .groups
            .get(&group)
            .cloned()
        else {
            return Ok(());
        };
        let mut records = Vec::new();
        if state.compacted.0 .0 > 0 {
            records.push(Record::Compaction {
                index: state.compacted.0,
                term: state.compacted.1,
            });
        }
        let mut next = state.first_index();
        while next <= state.last_index() {
            let chunk = read_entries(
                &self.shared,
                GroupId(group),
                next,
                state.last_index().next(),
                self.shared.config.batch_bytes_max,
            )?;
            let Some(last) = chunk.last() else { break };
            next = last.index.next();
            records.push(Record::Entries(chunk));
        }
        if let Some(meta) = state.snapshot.clone() {
            records.push(Record::Snapshot {
                meta,
                installed: false,
            });
        }
        records.push(Record::HardState(state.hard_state));
        let mut buffer = Vec::new();
        let mut encoded = Encoded {
            records: Vec::new(),
            must_sync: true,
        };
        for record in records {
            push_record(group, record, self.shared.salt, &mut buffer, &mut encoded);
        }
        // The marker goes last, in the same write: a torn rewrite leaves
        // only duplicates, never a group whose old records are declared dead.
        self.make_room((buffer.len() + RECORD_HEADER_BYTES + 16) as u64)?;
        let start = Record::Rewritten {
            segment: self.active.sequence,
            offset: self.active.size_bytes,
        };
        push_record(group, start, self.shared.salt, &mut buffer, &mut encoded);
        let base = self.write_durably(&mut buffer)?;
        let done: Done = Box::new(|_| {});
        self.publish(&[(done, encoded)], base);
        self.shared
            .counters
            .groups_rewritten
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The salt of the last segment if it is of the current format, so that
/// appends to it go on; a fresh one otherwise (a new log, or a last
/// segment of an older format, which is not appended to).
fn salt_to_write(segments: &SegmentHandles) -> u32 {
    let Some((sequence, (file, _))) = segments.iter().next_back() else {
        return new_salt();
    };
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    let format = file
        .read_exact_at(&mut header, 0)
        .ok()
        .and_then(|()| check_segment_header(&header, *sequence).ok());
    match format {
        Some(format) if format.version == FORMAT_VERSION => format.salt,
        _ => new_salt(),
    }
}

fn push_record(group: u64, record: Record, salt: u32, buffer: &mut Vec<u8>, encoded: &mut Encoded) {
    let start = buffer.len();
    let body_offset = (start + RECORD_HEADER_BYTES) as u64;
    encode_record_with(record.kind(), group, salt, buffer, |out| {
        record.encode_body(out)
    });
    let body_len = (buffer.len() - start - RECORD_HEADER_BYTES) as u32;
    encoded.records.push((group, record, body_offset, body_len));
}

/// Creates segment `sequence`: its header and the first step of zeros,
/// fsynced, then the directory fsynced.
fn create_segment(shared: &Shared, sequence: u64) -> Result<ActiveSegment> {
    let dir = &shared.config.dir;
    let path = segment_path(dir, sequence);
    let file = OpenOptions::new()
        .create_new(true)
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io(format!("create {}", path.display()), e))?;
    let header = SEGMENT_HEADER_BYTES as u64;
    let zeroed_end = (header + ZERO_FILL_STEP_BYTES)
        .min(shared.config.segment_size_bytes_max)
        .max(header);
    let mut start = vec![0u8; zeroed_end as usize];
    start[..SEGMENT_HEADER_BYTES].copy_from_slice(&encode_segment_header(sequence, shared.salt));
    file.write_all_at(&start, 0)
        .map_err(|e| Error::io(format!("write {}", path.display()), e))?;
    file.sync_all()
        .map_err(|e| Error::io(format!("fsync {}", path.display()), e))?;
    sync_dir(dir)?;
    let reader = File::open(&path).map_err(|e| Error::io(format!("open {}", path.display()), e))?;
    let direct = open_active_direct(shared, &path, &file, header)?;
    lock(&shared.segments).insert(sequence, (Arc::new(reader), SEGMENT_HEADER_BYTES as u64));
    Ok(ActiveSegment {
        sequence,
        file,
        size_bytes: header,
        zeroed_end,
        direct,
    })
}

/// What validation needs of a group, as earlier requests of the batch leave
/// it: cheap to copy, unlike the group's whole index.
#[derive(Clone, Debug, Default)]
struct Bounds {
    compacted: (LogIndex, Term),
    last: LogIndex,
    snapshot_index: Option<LogIndex>,
    /// Terms of entries appended in this batch, from `overlay_start`.
    overlay_start: LogIndex,
    overlay: Vec<Term>,
    /// The indexed entries no longer count (snapshot installed, removed).
    hide_indexed: bool,
    /// The group's last hard state, as this batch leaves it.
    hard_state: HardState,
}

impl Bounds {
    fn of(state: Option<&GroupState>) -> Bounds {
        match state {
            Some(state) => Bounds {
                compacted: state.compacted,
                last: state.last_index(),
                snapshot_index: state.snapshot.as_ref().map(|meta| meta.index),
                overlay_start: state.last_index().next(),
                overlay: Vec::new(),
                hide_indexed: false,
                hard_state: state.hard_state,
            },
            None => Bounds {
                overlay_start: LogIndex(1),
                ..Bounds::default()
            },
        }
    }

    fn term(&self, indexed: Option<&GroupState>, index: LogIndex) -> Option<Term> {
        if index == self.compacted.0 {
            return Some(self.compacted.1);
        }
        if index < self.compacted.0 || index > self.last {
            return None;
        }
        if index >= self.overlay_start {
            return self
                .overlay
                .get(index.distance_from(self.overlay_start) as usize)
                .copied();
        }
        if self.hide_indexed {
            return None;
        }
        indexed.and_then(|state| state.term(index).ok().flatten())
    }
}

/// Checks the requests of one batch in order against the log as each will
/// leave it, and encodes the accepted ones.
struct BatchView<'a> {
    index: &'a Index,
    /// Groups changed by earlier requests of this batch.
    changed: FxHashMap<u64, Bounds>,
    /// The record checksum salt.
    salt: u32,
}

impl<'a> BatchView<'a> {
    fn new(index: &'a Index, salt: u32) -> BatchView<'a> {
        BatchView {
            index,
            salt,
            changed: FxHashMap::default(),
        }
    }

    /// Checks every update of a request; encodes all of it or none. The
    /// entries move into their records (and on to the cache), uncopied.
    fn encode(&mut self, batch: WriteBatch, buffer: &mut Vec<u8>) -> Result<Encoded> {
        let mut staged: FxHashMap<u64, Bounds> = FxHashMap::default();
        let mut records = Vec::new();
        let mut must_sync = false;
        for update in batch.updates {
            let group = update_group(&update);
            if group == 0 {
                return Err(Error::InvalidUpdate {
                    group,
                    reason: "group id 0 is invalid".into(),
                });
            }
            let indexed = self.index.groups.get(&group);
            let bounds = staged.entry(group).or_insert_with(|| {
                self.changed
                    .get(&group)
                    .cloned()
                    .unwrap_or_else(|| Bounds::of(indexed))
            });
            // Only a new term or vote needs the fsync; a commit index may
            // be lost and recomputed.
            must_sync |= match &update {
                Update::HardState { state, .. } => {
                    state.term != bounds.hard_state.term || state.vote != bounds.hard_state.vote
                }
                _ => true,
            };
            let mut record = check_update(&update, bounds, indexed)
                .map_err(|reason| Error::InvalidUpdate { group, reason })?;
            if let (Record::Entries(slot), Update::Entries { entries, .. }) = (&mut record, update)
            {
                *slot = entries;
            }
            records.push((group, record));
        }
        self.changed.extend(staged);
        let mut encoded = Encoded {
            records: Vec::new(),
            must_sync,
        };
        for (group, record) in records {
            push_record(group, record, self.salt, buffer, &mut encoded);
        }
        Ok(encoded)
    }
}

fn update_group(update: &Update) -> u64 {
    match update {
        Update::Entries { group, .. }
        | Update::HardState { group, .. }
        | Update::Snapshot { group, .. }
        | Update::InstallSnapshot { group, .. }
        | Update::Compact { group, .. }
        | Update::RemoveGroup { group } => group.0,
    }
}

/// Checks one update against `bounds`, advances them, and gives its record.
/// An entries record comes back empty: the caller moves the entries in.
fn check_update(
    update: &Update,
    bounds: &mut Bounds,
    indexed: Option<&GroupState>,
) -> Result<Record, String> {
    match update {
        Update::Entries { entries, .. } => {
            check_entries(entries, bounds)?;
            Ok(Record::Entries(Vec::new()))
        }
        Update::HardState { state, .. } => {
            bounds.hard_state = *state;
            Ok(Record::HardState(*state))
        }
        Update::Snapshot { meta, .. } => {
            if meta.index > bounds.last {
                return Err(format!(
                    "a snapshot taken at {} is past the last index {}; use an install",
                    meta.index, bounds.last
                ));
            }
            bounds.snapshot_index = bounds.snapshot_index.max(Some(meta.index));
            Ok(Record::Snapshot {
                meta: meta.clone(),
                installed: false,
            })
        }
        Update::InstallSnapshot { meta, .. } => {
            check_install(meta, bounds)?;
            Ok(Record::Snapshot {
                meta: meta.clone(),
                installed: true,
            })
        }
        Update::Compact { index, .. } => {
            let term = check_compaction(*index, bounds, indexed)?;
            Ok(Record::Compaction {
                index: *index,
                term,
            })
        }
        Update::RemoveGroup { .. } => {
            *bounds = Bounds {
                overlay_start: LogIndex(1),
                hide_indexed: true,
                ..Bounds::default()
            };
            Ok(Record::GroupRemoved)
        }
    }
}

/// Entries must follow on from the group's log (after its compacted
/// prefix, without a gap, contiguous); they replace any entries from
/// their first index on.
fn check_entries(entries: &[Entry], bounds: &mut Bounds) -> Result<(), String> {
    let Some(first) = entries.first().map(|entry| entry.index) else {
        return Err("an entries update with no entries".into());
    };
    if first <= bounds.compacted.0 {
        return Err(format!(
            "entries from {first} would overwrite the compacted prefix up to {}",
            bounds.compacted.0
        ));
    }
    if first > bounds.last.next() {
        return Err(format!(
            "entries from {first} leave a gap after the last index {}",
            bounds.last
        ));
    }
    if entries
        .iter()
        .enumerate()
        .any(|(p, e)| e.index != first.plus(p as u64))
    {
        return Err("entries are not contiguous".into());
    }
    if first < bounds.overlay_start {
        bounds.overlay.clear();
        bounds.overlay_start = first;
    } else {
        bounds
            .overlay
            .truncate(first.distance_from(bounds.overlay_start) as usize);
    }
    bounds
        .overlay
        .extend(entries.iter().map(|entry| entry.term));
    bounds.last = bounds
        .overlay_start
        .plus(bounds.overlay.len() as u64)
        .prev();
    Ok(())
}

/// An installed snapshot must be past the compacted prefix; the group's
/// log then starts after it.
fn check_install(meta: &SnapshotMeta, bounds: &mut Bounds) -> Result<(), String> {
    if meta.index <= bounds.compacted.0 {
        return Err(format!(
            "an installed snapshot at {} must be past the compacted prefix up to {}",
            meta.index, bounds.compacted.0
        ));
    }
    *bounds = Bounds {
        compacted: (meta.index, meta.term),
        last: meta.index,
        snapshot_index: Some(meta.index),
        overlay_start: meta.index.next(),
        overlay: Vec::new(),
        hide_indexed: true,
        hard_state: bounds.hard_state,
    };
    Ok(())
}

/// A compaction must end at an index the log holds and a snapshot
/// covers; gives that index's term.
fn check_compaction(
    index: LogIndex,
    bounds: &mut Bounds,
    indexed: Option<&GroupState>,
) -> Result<Term, String> {
    let covered = bounds
        .snapshot_index
        .is_some_and(|snapshot| snapshot >= index);
    match bounds.term(indexed, index) {
        Some(term) if covered => {
            if index > bounds.compacted.0 {
                bounds.compacted = (index, term);
            }
            Ok(term)
        }
        _ => Err(format!(
            "cannot compact to {index}: it must be held in the log and covered by a snapshot"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::SpinPolicy;

    /// The writer stops polling after a few long waits, starts again after
    /// a few short ones, and one odd wait changes nothing.
    #[test]
    fn spin_policy_follows_recent_waits() {
        let mut policy = SpinPolicy::new();
        assert!(policy.should_spin());
        policy.record_wait(false);
        assert!(policy.should_spin(), "one long wait is not a trend");
        let mut long_waits = 1;
        while policy.should_spin() {
            policy.record_wait(false);
            long_waits += 1;
        }
        assert_eq!(long_waits, 6, "stops after six long waits in a row");
        for _ in 0..100 {
            policy.record_wait(false);
        }
        assert_eq!(policy.short_waits_per_1024, 0);
        policy.record_wait(true);
        assert!(!policy.should_spin(), "one short wait is not a trend");
        let mut short_waits = 1;
        while !policy.should_spin() {
            policy.record_wait(true);
            short_waits += 1;
        }
        assert_eq!(short_waits, 6, "polls again after six short waits in a row");
        for _ in 0..100 {
            policy.record_wait(true);
        }
        assert!(policy.short_waits_per_1024 <= 1024 && policy.should_spin());
    }
}
