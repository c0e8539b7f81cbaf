//! [`Store`]: one fjall keyspace per node, holding every table hosted on it;
//! [`Table`]: one table's state machine (`regatta_multiraft::StateMachine`).
//! The layout is in `docs/kv-format.md`.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use bytes::Bytes;
use fjall::{Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use regatta_multiraft::{SnapshotSource, StateMachine, StateReader};
use regatta_raft::LogIndex;

use crate::command::{
    decode, encode, restore_commit_reset_id, Command, Compare, CompareResult, CompareTarget,
    DeleteRangeRequest, DeleteRangeResult, KeyRange, KeyValue, PutRequest, PutResult, Query,
    RangeRequest, RangeResult, ReplicatedBatch, ReplicatedResult, RequestOp, Response, ResponseOp,
    TxnRequest, TxnResult,
};
use crate::error::{Error, Result};

const META_PARTITION: &str = "meta";
/// Bytes of a record before its value: create, mod revision and version.
pub const RECORD_HEADER_BYTES: usize = 24;
/// Snapshots are written in version 2, or 3 when the table carried out
/// a reset (version 3 adds the reset carried); version 1 (no replica
/// state) is still read.
const SNAPSHOT_VERSION: u8 = 2;
const SNAPSHOT_VERSION_1: u8 = 1;
const SNAPSHOT_VERSION_3: u8 = 3;
/// In a snapshot, a key length that ends the table's items and starts
/// those of the unfinished restore.
const SNAPSHOT_STAGING_MARKER: u32 = u32::MAX;
/// Bytes of a `meta` value written before replica state existed.
const META_V1_BYTES: usize = 16;
/// Bytes of a `meta` value written before the reset carried existed.
const META_V2_BYTES: usize = 40;
/// Bytes of a `meta` value: generation, applied index, leader index,
/// restore id, staging generation, reset carried.
const META_BYTES: usize = 48;
/// Restores write batches of about this many bytes.
const RESTORE_BATCH_BYTES: usize = 4 << 20;
/// The storage engine's write buffer: table writes in memtables not yet
/// flushed, across every table. Above it the engine halts writes until a
/// flush frees room (fjall's default, set here so that it is stated).
pub const WRITE_BUFFER_BYTES_MAX: u64 = 64 << 20;
/// The longest key or value a snapshot may carry.
const SNAPSHOT_ITEM_BYTES_MAX: u32 = 64 << 20;
/// The longest key the storage engine takes (fjall: a u16 length).
const STORED_KEY_BYTES_MAX: usize = u16::MAX as usize;

/// Checks an item of a snapshot, a backup or a restore chunk before it
/// reaches the storage engine: a key of 1 to 65,535 bytes and a record
/// with its whole header. Input from the network never reaches the
/// engine's own assertions.
fn check_item(key: &[u8], record: &[u8]) -> Result<()> {
    if let Some(refusal) = key_refusal("a table item's key", key, true) {
        return Err(Error::Decode(refusal));
    }
    Record::decode(record)?;
    Ok(())
}

/// Why the storage engine cannot take a key of `key.len()` bytes as a
/// bound or, with `stored`, as a key to write (a written key must not be
/// empty; a bound may be, as the open end of a range).
fn key_refusal(what: &str, key: &[u8], stored: bool) -> Option<String> {
    if key.len() > STORED_KEY_BYTES_MAX || (stored && key.is_empty()) {
        return Some(format!(
            "{what} of {} bytes: keys are 1 to {STORED_KEY_BYTES_MAX} bytes",
            key.len()
        ));
    }
    None
}

fn range_refusal(range: &KeyRange) -> Option<String> {
    key_refusal("a range key", &range.key, false)
        .or_else(|| key_refusal("a range end", &range.range_end, false))
}

/// Why a transaction's keys cannot reach the storage engine, if they
/// cannot: checked whole before any of it applies, so that a refused
/// transaction writes nothing.
fn txn_refusal(txn: &TxnRequest) -> Option<String> {
    txn.compare
        .iter()
        .find_map(|compare| range_refusal(&compare.range))
        .or_else(|| {
            txn.success
                .iter()
                .chain(&txn.failure)
                .find_map(|op| match op {
                    RequestOp::Range(range) => range_refusal(&range.range),
                    RequestOp::Put(put) => key_refusal("a put's key", &put.key, true),
                    RequestOp::DeleteRange(delete) => range_refusal(&delete.range),
                    RequestOp::Txn(txn) => txn_refusal(txn),
                })
        })
}

/// Why a query's keys cannot reach the storage engine, if they cannot.
fn query_refusal(query: &Query) -> Option<String> {
    match query {
        Query::Range(range) | Query::RangePage(range) => range_refusal(&range.range),
        Query::Txn(txn) => txn_refusal(txn),
    }
}

/// The storage engine's counters (`Store::engine_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Bytes in memtables not yet flushed, across every table. Writes halt
    /// while it is above [`WRITE_BUFFER_BYTES_MAX`].
    pub write_buffer_bytes: u64,
    /// Journal files on disk; each holds writes some memtable has not yet
    /// flushed.
    pub journals: u64,
}

/// Every table of a node, in one fjall keyspace.
#[derive(Clone)]
pub struct Store {
    keyspace: Keyspace,
    /// The store's directory: `next_generation` looks at the partition
    /// folders in it.
    dir: PathBuf,
    meta: PartitionHandle,
    /// Held shared while a consistent copy opens a table's data
    /// partition, and exclusively while a table switches generations and
    /// deletes the old one: a copy never opens (and so re-creates, empty)
    /// a partition being deleted.
    switch: Arc<RwLock<()>>,
}

impl Store {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        remove_unfinished_partitions(dir)?;
        let keyspace = fjall::Config::new(dir)
            .max_write_buffer_size(WRITE_BUFFER_BYTES_MAX)
            .open()?;
        let meta = keyspace.open_partition(META_PARTITION, PartitionCreateOptions::default())?;
        Ok(Store {
            keyspace,
            dir: dir.to_path_buf(),
            meta,
            switch: Arc::new(RwLock::new(())),
        })
    }

    /// The storage engine's own state, for metrics: a write buffer near
    /// its limit, or journals that keep growing, mean the engine is not
    /// flushing and its writes are about to stall.
    pub fn engine_stats(&self) -> EngineStats {
        EngineStats {
            write_buffer_bytes: self.keyspace.write_buffer_size(),
            journals: self.keyspace.journal_count() as u64,
        }
    }

    /// Opens table `group` of the leader cluster, creating it empty if it
    /// is new.
    pub fn open_table(&self, group: u64) -> Result<Table> {
        self.open_table_as(group, TableMode::Primary)
    }

    /// Opens table `group` in `mode`, creating it empty if it is new.
    /// Partitions of other generations that a crashed restore left are
    /// deleted.
    pub fn open_table_as(&self, group: u64, mode: TableMode) -> Result<Table> {
        let meta = self.read_meta(group)?;
        let current = partition_name(group, meta.generation);
        let staging_name = (meta.restore_id != 0).then(|| partition_name(group, meta.staging));
        for name in self.keyspace.list_partitions() {
            let name: &str = &name;
            let kept = name == current || Some(name) == staging_name.as_deref();
            if !kept && name.starts_with(&format!("t-{group}-")) {
                let stale = self
                    .keyspace
                    .open_partition(name, PartitionCreateOptions::default())?;
                self.keyspace.delete_partition(stale)?;
            }
        }
        let data = self
            .keyspace
            .open_partition(&current, PartitionCreateOptions::default())?;
        let restoring = match staging_name {
            Some(name) => Some(Restoring {
                restore_id: meta.restore_id,
                generation: meta.staging,
                data: self
                    .keyspace
                    .open_partition(&name, PartitionCreateOptions::default())?,
            }),
            None => None,
        };
        let revision = match mode {
            TableMode::Primary => meta.applied,
            TableMode::Replica => meta.leader_index,
        };
        let published = Arc::new(RwLock::new(Published {
            data: data.clone(),
            revision,
        }));
        Ok(Table {
            store: self.clone(),
            group,
            mode,
            generation: meta.generation,
            data,
            applied: LogIndex(meta.applied),
            leader_index: meta.leader_index,
            reset_carried: meta.reset_carried,
            restoring,
            published,
            recent: RecentWrites::default(),
        })
    }

    /// A consistent point-in-time copy of table `group`, for a follower
    /// cluster: its revision (the applied index, which a follower calls
    /// the leader index) and its items in snapshot order. Reads the
    /// committed data, never the apply path.
    pub fn table_snapshot(&self, group: u64) -> Result<(u64, TableItems)> {
        let _switch = self.switch.read().unwrap_or_else(|p| p.into_inner());
        let instant = self.keyspace.instant();
        let meta = match self.meta.snapshot_at(instant).get(group.to_be_bytes())? {
            Some(bytes) => Meta::decode(group, &bytes)?,
            // A table that never applied a command: empty, at revision 0.
            // (Callers check that the table's group runs on this node.)
            None => return Ok((0, TableItems { snapshot: None })),
        };
        let name = partition_name(group, meta.generation);
        if !self.keyspace.partition_exists(&name) {
            return Err(Error::Storage(format!(
                "table {group} changed while its snapshot began; retry"
            )));
        }
        let data = self
            .keyspace
            .open_partition(&name, PartitionCreateOptions::default())?;
        let revision = if meta.leader_index > 0 {
            meta.leader_index
        } else {
            meta.applied
        };
        Ok((
            revision,
            TableItems {
                snapshot: Some(data.snapshot_at(instant)),
            },
        ))
    }

    /// Whether table `group` has a restore under way (begun, neither
    /// committed nor aborted), as this node applied it.
    pub fn table_restore_pending(&self, group: u64) -> Result<bool> {
        Ok(self.read_meta(group)?.restore_id != 0)
    }

    /// Whether the restore under way in table `group` was begun by an
    /// operator's reset (or by an install that carries one on): its id
    /// has [`RESET_RESTORE_ID_BIT`] set, and is not that of the reset an
    /// install already carried out (a retried begin of that reset that
    /// applied late).
    pub fn table_reset_pending(&self, group: u64) -> Result<bool> {
        let meta = self.read_meta(group)?;
        Ok(meta.restore_id & RESET_RESTORE_ID_BIT != 0 && meta.restore_id != meta.reset_carried)
    }

    /// The restore id of the last operator's reset that an install of
    /// table `group` carried out (0 if none), as this node applied it:
    /// a `reset/<group>` record naming it is spent.
    pub fn table_reset_carried(&self, group: u64) -> Result<u64> {
        Ok(self.read_meta(group)?.reset_carried)
    }

    /// Deletes table `group`'s data and metadata.
    pub fn remove_table(&self, group: u64) -> Result<()> {
        let _switch = self.switch.write().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("t-{group}-");
        for name in self.keyspace.list_partitions() {
            let name: &str = &name;
            if name.starts_with(&prefix) {
                let data = self
                    .keyspace
                    .open_partition(name, PartitionCreateOptions::default())?;
                self.keyspace.delete_partition(data)?;
            }
        }
        self.meta.remove(group.to_be_bytes())?;
        self.keyspace.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Bytes table `group`'s data takes on disk (its fjall partition's
    /// segments; writes still only in memory or the journal not counted).
    pub fn table_disk_bytes(&self, group: u64) -> Result<u64> {
        let name = partition_name(group, self.read_meta(group)?.generation);
        if !self.keyspace.partition_exists(&name) {
            return Ok(0);
        }
        let data = self
            .keyspace
            .open_partition(&name, PartitionCreateOptions::default())?;
        Ok(data.disk_space())
    }

    /// The table's `meta` entry; all zero for a new table.
    fn read_meta(&self, group: u64) -> Result<Meta> {
        match self.meta.get(group.to_be_bytes())? {
            None => Ok(Meta::default()),
            Some(bytes) => Meta::decode(group, &bytes),
        }
    }
}

/// How a table takes writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableMode {
    /// A table of the leader cluster: clients' Put, DeleteRange and Txn;
    /// its revision is its applied index.
    Primary,
    /// A table of a follower cluster: only the leader's replicated
    /// commands and snapshot restores; its revision is the leader index.
    Replica,
}

/// A table's `meta` entry (`docs/kv-format.md`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Meta {
    generation: u64,
    applied: u64,
    leader_index: u64,
    /// 0 when no restore is under way.
    restore_id: u64,
    /// The generation being filled by the restore.
    staging: u64,
    /// The restore id of the last operator's reset that an install
    /// carried out (`encode_restore_commit_reset`), 0 if none.
    reset_carried: u64,
}

impl Meta {
    fn decode(group: u64, bytes: &[u8]) -> Result<Meta> {
        match bytes.len() {
            META_V1_BYTES => Ok(Meta {
                generation: read_u64(&bytes[0..8]),
                applied: read_u64(&bytes[8..16]),
                ..Meta::default()
            }),
            META_V2_BYTES | META_BYTES => Ok(Meta {
                generation: read_u64(&bytes[0..8]),
                applied: read_u64(&bytes[8..16]),
                leader_index: read_u64(&bytes[16..24]),
                restore_id: read_u64(&bytes[24..32]),
                staging: read_u64(&bytes[32..40]),
                reset_carried: bytes.get(40..48).map_or(0, read_u64),
            }),
            other => Err(Error::Decode(format!(
                "metadata of table {group}: {other} bytes, expected {META_V1_BYTES}, \
                 {META_V2_BYTES} or {META_BYTES}"
            ))),
        }
    }

    /// The `meta` value: 40 bytes while no reset was carried out, so
    /// that a version older than the reset carried still opens the table;
    /// 48 after one.
    fn encode(&self) -> MetaBytes {
        let mut bytes = [0u8; META_BYTES];
        for (position, field) in [
            self.generation,
            self.applied,
            self.leader_index,
            self.restore_id,
            self.staging,
            self.reset_carried,
        ]
        .into_iter()
        .enumerate()
        {
            bytes[position * 8..position * 8 + 8].copy_from_slice(&field.to_le_bytes());
        }
        let len = if self.reset_carried == 0 {
            META_V2_BYTES
        } else {
            META_BYTES
        };
        MetaBytes { bytes, len }
    }
}

/// An encoded `meta` value.
struct MetaBytes {
    bytes: [u8; META_BYTES],
    len: usize,
}

impl AsRef<[u8]> for MetaBytes {
    fn as_ref(&self) -> &[u8] {
        &self.bytes[..self.len]
    }
}

/// A table's items at one instant, written as the items of a table
/// snapshot (`docs/kv-format.md`): key length u32 LE, key, record length
/// u32 LE, record.
pub struct TableItems {
    /// `None` for a table that holds nothing yet.
    snapshot: Option<fjall::Snapshot>,
}

impl TableItems {
    /// Writes every item to `out`.
    pub fn write_to(&self, out: &mut dyn Write) -> std::io::Result<()> {
        match &self.snapshot {
            Some(snapshot) => write_items(snapshot, out),
            None => Ok(()),
        }
    }
}

fn write_items(snapshot: &fjall::Snapshot, out: &mut dyn Write) -> std::io::Result<()> {
    for item in snapshot.iter() {
        let (key, value) = item.map_err(std::io::Error::other)?;
        out.write_all(&(key.len() as u32).to_le_bytes())?;
        out.write_all(&key)?;
        out.write_all(&(value.len() as u32).to_le_bytes())?;
        out.write_all(&value)?;
    }
    Ok(())
}

/// Reads the items `write_items` wrote, one (key, record) at a time,
/// checking each record's header; `None` at the end.
pub fn read_table_item(data: &mut dyn Read) -> Result<Option<TableItem>> {
    let Some(key) = read_item(data, true)? else {
        return Ok(None);
    };
    let Some(record) = read_item(data, false)? else {
        return Err(Error::Decode("a table snapshot ends after a key".into()));
    };
    check_item(&key, &record)?;
    Ok(Some((key, record)))
}

/// The engine's marker that a partition is initialized, and the file its
/// tree is opened from (lsm-tree 2.10: `manifest`, `levels`).
const PARTITION_MARKER_FILE: &str = "manifest";
const PARTITION_LEVELS_FILE: &str = "levels";

/// Removes partitions whose creation a crash interrupted.
///
/// lsm-tree 2.10 writes a new tree's `manifest` (which fjall takes as
/// "initialized") before its `levels` file, so a kill between the two
/// leaves a partition that fjall will not open ("No such file or
/// directory"), and with it the whole store (anomaly 5 in
/// `docs/verification.md`). Such a partition never returned from its
/// creation, so it holds nothing: it is removed, provided it has no table
/// file either. Anything else missing its `levels` file is a real loss, and
/// opening stops with an error that names it.
fn remove_unfinished_partitions(dir: &Path) -> Result<()> {
    let partitions = dir.join("partitions");
    let entries = match std::fs::read_dir(&partitions) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => {
            return Err(Error::Storage(format!(
                "list {}: {error}",
                partitions.display()
            )))
        }
    };
    let io = |what: &str, path: &Path, error: std::io::Error| {
        Error::Storage(format!("{what} {}: {error}", path.display()))
    };
    for entry in entries {
        let entry = entry.map_err(|e| io("list", &partitions, e))?;
        let path = entry.path();
        if !path.is_dir()
            || !path.join(PARTITION_MARKER_FILE).exists()
            || path.join(PARTITION_LEVELS_FILE).exists()
        {
            continue;
        }
        let segments = path.join("segments");
        let holds_tables = match std::fs::read_dir(&segments) {
            Ok(mut files) => files.next().is_some(),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => false,
            Err(error) => return Err(io("list", &segments, error)),
        };
        if holds_tables {
            return Err(Error::Storage(format!(
                "partition {} has table files but no {PARTITION_LEVELS_FILE} file; \
                 the table store is damaged",
                path.display()
            )));
        }
        tracing::warn!(
            partition = %path.display(),
            "removing a partition whose creation a crash interrupted"
        );
        std::fs::remove_dir_all(&path).map_err(|e| io("remove", &path, e))?;
        std::fs::File::open(&partitions)
            .and_then(|directory| directory.sync_all())
            .map_err(|e| io("fsync", &partitions, e))?;
    }
    Ok(())
}

fn partition_name(group: u64, generation: u64) -> String {
    format!("t-{group}-{generation}")
}

fn read_u64(bytes: &[u8]) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(&bytes[..8]);
    u64::from_le_bytes(buffer)
}

/// A key's stored state.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Record {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    value: Vec<u8>,
}

impl Record {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(RECORD_HEADER_BYTES + self.value.len());
        out.extend_from_slice(&self.create_revision.to_le_bytes());
        out.extend_from_slice(&self.mod_revision.to_le_bytes());
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.value);
        out
    }

    fn decode(bytes: &[u8]) -> Result<Record> {
        Found::parse(bytes).map(|found| found.record())
    }

    fn key_value(&self, key: &[u8], with_value: bool) -> KeyValue {
        Found::written(self).key_value(key, with_value)
    }
}

/// The bit of a restore id that marks a restore begun by an operator's
/// reset of a follower table: its install may take the table back to an
/// older revision, which an install the log asked for may not
/// (`docs/replication.md`). Other restores use ids without it.
pub const RESET_RESTORE_ID_BIT: u64 = 1 << 63;

/// A key's record as a scan meets it, borrowed: one written in the batch
/// being applied, or the stored bytes parsed in place, so that a value is
/// copied out only when a caller asks for it. Counting a range, or taking
/// only its keys, then copies no values.
#[derive(Clone, Copy)]
struct Found<'a> {
    create_revision: u64,
    mod_revision: u64,
    version: u64,
    value: &'a [u8],
}

impl<'a> Found<'a> {
    /// A stored record: its header, then its value.
    fn parse(bytes: &'a [u8]) -> Result<Found<'a>> {
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(Error::Decode(format!(
                "a record of {} bytes, shorter than its header",
                bytes.len()
            )));
        }
        Ok(Found {
            create_revision: read_u64(&bytes[0..8]),
            mod_revision: read_u64(&bytes[8..16]),
            version: read_u64(&bytes[16..24]),
            value: &bytes[RECORD_HEADER_BYTES..],
        })
    }

    fn written(record: &'a Record) -> Found<'a> {
        Found {
            create_revision: record.create_revision,
            mod_revision: record.mod_revision,
            version: record.version,
            value: &record.value,
        }
    }

    fn key_value(&self, key: &[u8], with_value: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if with_value {
                self.value.to_vec()
            } else {
                Vec::new()
            },
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }

    fn record(&self) -> Record {
        Record {
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
            value: self.value.to_vec(),
        }
    }
}

/// How far a range read counts keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counting {
    /// Every key of the range, past the limit too (etcd's `count`).
    WholeRange,
    /// Only the keys returned: the scan stops at the first key past the
    /// page (`Query::RangePage`).
    Page,
}

/// The low and high bounds of a key range.
type KeyBounds = (Bound<Vec<u8>>, Bound<Vec<u8>>);

/// The bounds of a key range (`KeyRange`'s rules); `None` when empty.
fn bounds(range: &KeyRange) -> Option<KeyBounds> {
    if range.range_end.is_empty() {
        return Some((
            Bound::Included(range.key.clone()),
            Bound::Included(range.key.clone()),
        ));
    }
    if range.range_end == [0] {
        return Some((Bound::Included(range.key.clone()), Bound::Unbounded));
    }
    if range.range_end <= range.key {
        return None;
    }
    Some((
        Bound::Included(range.key.clone()),
        Bound::Excluded(range.range_end.clone()),
    ))
}

/// The latest committed record of keys this table wrote recently (`None`
/// for a key it deleted), so that a write's read of the key it replaces
/// (for the version, the create revision, `prev_kv` and compares) skips
/// the engine's memtable search. In a profile of a 3-node put, that search
/// took about 8% of a follower's CPU.
///
/// Invariant: an entry equals what the table's data partition holds for
/// its key. Every write of the partition goes through `commit_writes`,
/// which notes the keys after the commit; every switch of the partition
/// (`Table::replace_data`) clears the cache.
#[derive(Default)]
struct RecentWrites {
    records: HashMap<Vec<u8>, Option<Record>>,
    /// Keys and values held, plus `RECENT_ENTRY_OVERHEAD_BYTES` each.
    bytes: usize,
}

/// The most a table's [`RecentWrites`] holds; past it the cache starts
/// over empty (simple, and a busy key is back after its next write).
const RECENT_WRITES_BYTES_MAX: usize = 4 << 20;
/// What one cache entry costs beyond its key and value: the hash table
/// slot, the record's fields and two allocations' headers.
const RECENT_ENTRY_OVERHEAD_BYTES: usize = 96;

impl RecentWrites {
    fn get(&self, key: &[u8]) -> Option<&Option<Record>> {
        self.records.get(key)
    }

    /// Records `key`'s committed state. A key that would not fit even
    /// alone is left out (after the cache started over, so no older entry
    /// of it stays).
    fn note(&mut self, key: Vec<u8>, record: Option<Record>, bytes_max: usize) {
        let key_bytes = key.len();
        let size = |record: &Option<Record>| {
            key_bytes + record.as_ref().map_or(0, |r| r.value.len()) + RECENT_ENTRY_OVERHEAD_BYTES
        };
        let added = size(&record);
        if self.bytes + added > bytes_max {
            self.clear();
            if added > bytes_max {
                return;
            }
        }
        if let Some(old) = self.records.insert(key, record) {
            self.bytes -= size(&old);
        }
        self.bytes += added;
        debug_assert!(self.bytes <= bytes_max);
    }

    fn clear(&mut self) {
        self.records.clear();
        self.bytes = 0;
    }
}

/// The committed data of a table, with the writes of the batch being
/// applied on top.
/// What a `View` reads: the live partition (the apply path, which alone
/// writes it), or a point-in-time snapshot of it (reads on other tasks).
#[derive(Clone, Copy)]
enum Source<'a> {
    Live(&'a PartitionHandle),
    Frozen(&'a fjall::Snapshot),
}

impl Source<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<fjall::Slice>> {
        Ok(match self {
            Source::Live(data) => data.get(key)?,
            Source::Frozen(snapshot) => snapshot.get(key).map_err(fjall::Error::from)?,
        })
    }

    fn range(
        &self,
        bounds: (Bound<Vec<u8>>, Bound<Vec<u8>>),
    ) -> Box<dyn Iterator<Item = Result<(fjall::Slice, fjall::Slice)>>> {
        match self {
            Source::Live(data) => Box::new(
                data.range::<Vec<u8>, _>(bounds)
                    .map(|item| item.map_err(Into::into)),
            ),
            Source::Frozen(snapshot) => Box::new(
                snapshot
                    .range::<Vec<u8>, _>(bounds)
                    .map(|item| item.map_err(|error| fjall::Error::from(error).into())),
            ),
        }
    }
}

struct View<'a> {
    data: Source<'a>,
    /// Records of recently written keys, equal to `data`'s; `None` for
    /// reads, which run on other tasks.
    recent: Option<&'a RecentWrites>,
    /// Keys written in this batch: a record, or `None` for a delete.
    writes: BTreeMap<Vec<u8>, Option<Record>>,
}

impl View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        if let Some(recent) = self.recent.and_then(|recent| recent.get(key)) {
            return Ok(recent.clone());
        }
        match self.data.get(key)? {
            Some(bytes) => Record::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `visit` for every key in `range`, in key order, until it
    /// returns false.
    fn scan(
        &self,
        range: &KeyRange,
        mut visit: impl FnMut(&[u8], Found<'_>) -> bool,
    ) -> Result<()> {
        let Some((low, high)) = bounds(range) else {
            return Ok(());
        };
        let mut written = self
            .writes
            .range::<Vec<u8>, _>((low.clone(), high.clone()))
            .peekable();
        for item in self.data.range((low, high)) {
            let (key, bytes) = item?;
            // Keys written in this batch that sort first.
            while let Some((written_key, record)) =
                written.next_if(|(written_key, _)| written_key.as_slice() < &key[..])
            {
                if let Some(record) = record {
                    if !visit(written_key, Found::written(record)) {
                        return Ok(());
                    }
                }
            }
            if let Some((_, record)) =
                written.next_if(|(written_key, _)| written_key.as_slice() == &key[..])
            {
                if let Some(record) = record {
                    if !visit(&key, Found::written(record)) {
                        return Ok(());
                    }
                }
                continue;
            }
            if !visit(&key, Found::parse(&bytes)?) {
                return Ok(());
            }
        }
        for (written_key, record) in written {
            if let Some(record) = record {
                if !visit(written_key, Found::written(record)) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn range(&self, request: &RangeRequest, counting: Counting) -> Result<RangeResult> {
        let mut result = RangeResult::default();
        let mut bytes = 0u64;
        self.scan(&request.range, |key, found| {
            let full = (request.limit > 0 && result.kvs.len() as u64 >= request.limit)
                || (request.bytes_max > 0 && !result.kvs.is_empty() && bytes >= request.bytes_max);
            if counting == Counting::Page && full && !request.count_only {
                // A key past the page: the page is done, and more follow.
                result.more = true;
                return false;
            }
            result.count += 1;
            if request.count_only || full {
                result.more |= !request.count_only;
                return true;
            }
            let kv = found.key_value(key, !request.keys_only);
            bytes += (kv.key.len() + kv.value.len()) as u64;
            result.kvs.push(kv);
            true
        })?;
        Ok(result)
    }

    fn put(&mut self, request: &PutRequest, revision: u64) -> Result<PutResult> {
        let previous = self.get(&request.key)?;
        let record = Record {
            create_revision: previous
                .as_ref()
                .map_or(revision, |previous| previous.create_revision),
            mod_revision: revision,
            version: previous.as_ref().map_or(1, |previous| previous.version + 1),
            value: request.value.clone(),
        };
        self.writes.insert(request.key.clone(), Some(record));
        Ok(PutResult {
            prev_kv: previous
                .filter(|_| request.prev_kv)
                .map(|previous| previous.key_value(&request.key, true)),
        })
    }

    fn delete_range(&mut self, request: &DeleteRangeRequest) -> Result<DeleteRangeResult> {
        let mut found = Vec::new();
        self.scan(&request.range, |key, record| {
            found.push(record.key_value(key, request.prev_kv));
            true
        })?;
        let mut result = DeleteRangeResult {
            deleted: found.len() as u64,
            prev_kvs: Vec::new(),
        };
        for kv in &found {
            self.writes.insert(kv.key.clone(), None);
        }
        if request.prev_kv {
            result.prev_kvs = found;
        }
        Ok(result)
    }

    fn compare(&self, compare: &Compare) -> Result<bool> {
        let mut any = false;
        let mut holds = true;
        self.scan(&compare.range, |_, found| {
            any = true;
            holds = compare_record(Some(&found.record()), compare);
            holds
        })?;
        if !any {
            return Ok(compare_record(None, compare));
        }
        Ok(holds)
    }

    /// Applies a transaction as etcd does: every compare, nested ones
    /// included, is decided on the state before the transaction's first
    /// write, and only then do the chosen branches run (their reads see
    /// the writes before them).
    fn txn(&mut self, request: &TxnRequest, revision: u64) -> Result<TxnResult> {
        let mut path = Vec::new();
        self.txn_path(request, &mut path)?;
        let mut choices = path.into_iter();
        let result = self.txn_along(request, revision, &mut choices)?;
        assert!(
            choices.next().is_none(),
            "a transaction left branch choices unused"
        );
        Ok(result)
    }

    /// The branch each transaction of the tree takes, in the order the
    /// transactions run: this one's, then those nested in its branch.
    fn txn_path(&self, request: &TxnRequest, path: &mut Vec<bool>) -> Result<()> {
        let mut succeeded = true;
        for compare in &request.compare {
            if !self.compare(compare)? {
                succeeded = false;
                break;
            }
        }
        path.push(succeeded);
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        for op in branch {
            if let RequestOp::Txn(inner) = op {
                self.txn_path(inner, path)?;
            }
        }
        Ok(())
    }

    fn txn_along(
        &mut self,
        request: &TxnRequest,
        revision: u64,
        choices: &mut std::vec::IntoIter<bool>,
    ) -> Result<TxnResult> {
        let Some(succeeded) = choices.next() else {
            panic!("a transaction of the tree has no branch chosen");
        };
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            responses.push(match op {
                RequestOp::Range(range) => {
                    ResponseOp::Range(self.range(range, Counting::WholeRange)?)
                }
                RequestOp::Put(put) => ResponseOp::Put(self.put(put, revision)?),
                RequestOp::DeleteRange(delete) => {
                    ResponseOp::DeleteRange(self.delete_range(delete)?)
                }
                RequestOp::Txn(txn) => ResponseOp::Txn(self.txn_along(txn, revision, choices)?),
            });
        }
        Ok(TxnResult {
            succeeded,
            responses,
        })
    }
}

/// etcd's rule: a missing key never matches a value compare, and has 0 as
/// its version and revisions.
fn compare_record(record: Option<&Record>, compare: &Compare) -> bool {
    let ordering = match (&compare.target, record) {
        (CompareTarget::Value(_), None) => return false,
        (CompareTarget::Value(value), Some(record)) => record.value.as_slice().cmp(value),
        (CompareTarget::Version(operand), record) => {
            i128::from(record.map_or(0, |r| r.version)).cmp(&i128::from(*operand))
        }
        (CompareTarget::CreateRevision(operand), record) => {
            i128::from(record.map_or(0, |r| r.create_revision)).cmp(&i128::from(*operand))
        }
        (CompareTarget::ModRevision(operand), record) => {
            i128::from(record.map_or(0, |r| r.mod_revision)).cmp(&i128::from(*operand))
        }
    };
    match compare.result {
        CompareResult::Equal => ordering.is_eq(),
        CompareResult::Greater => ordering.is_gt(),
        CompareResult::Less => ordering.is_lt(),
        CompareResult::NotEqual => ordering.is_ne(),
    }
}

/// One table's state machine.
pub struct Table {
    store: Store,
    group: u64,
    mode: TableMode,
    generation: u64,
    data: PartitionHandle,
    applied: LogIndex,
    /// The leader cluster's index this table holds (replica tables).
    leader_index: u64,
    /// The last operator's reset an install carried out (`Meta`).
    reset_carried: u64,
    /// The restore being filled (replica tables).
    restoring: Option<Restoring>,
    /// What readers on other tasks see (`TableReader`).
    published: Arc<RwLock<Published>>,
    /// The records of keys written lately, for the apply path's reads.
    recent: RecentWrites,
}

/// The committed state as readers on other tasks see it: the data and the
/// revision it holds, which change together under the lock. The apply
/// path commits each batch while it holds the lock for writing, so a read
/// (holding it for reading) never sees half a batch, nor data newer or
/// older than its revision.
struct Published {
    data: PartitionHandle,
    revision: u64,
}

/// Serves a table's reads on any task, concurrently with its applies
/// (`StateMachine::reader`).
struct TableReader {
    published: Arc<RwLock<Published>>,
}

impl StateReader for TableReader {
    fn read(&self, query: &Bytes) -> Bytes {
        // The lock only for a consistent snapshot (no batch half
        // committed), not for the scan: a long read must not hold up the
        // apply thread's next commit, which waits for the write lock (and
        // with it every group sharing that thread).
        // The handle is kept until the read ends: dropping the last one of
        // a partition a restore deleted meanwhile removes its files.
        let (snapshot, _data, revision) = {
            let published = self.published.read().unwrap_or_else(|p| p.into_inner());
            (
                published.data.snapshot(),
                published.data.clone(),
                published.revision,
            )
        };
        read_encoded(Source::Frozen(&snapshot), revision, query)
    }
}

/// Decodes a query, serves it from `data` at `revision`, and encodes the
/// response.
fn read_encoded(data: Source<'_>, revision: u64, query: &Bytes) -> Bytes {
    let response = match decode::<Query>(query) {
        Ok(query) => answer_query(data, revision, &query),
        Err(error) => Response {
            revision,
            result: Err(error.to_string()),
        },
    };
    Bytes::from(encode(&response))
}

/// Answers a query from `data`, which holds the table at `revision`.
fn answer_query(data: Source<'_>, revision: u64, query: &Query) -> Response {
    let mut view = View {
        data,
        recent: None,
        writes: BTreeMap::new(),
    };
    if let Some(refusal) = query_refusal(query) {
        return Response {
            revision,
            result: Err(refusal),
        };
    }
    let result = match query {
        Query::Range(range) => view
            .range(range, Counting::WholeRange)
            .map(ResponseOp::Range),
        Query::RangePage(range) => view.range(range, Counting::Page).map(ResponseOp::Range),
        Query::Txn(txn) if txn.is_read_only() => view.txn(txn, revision).map(ResponseOp::Txn),
        Query::Txn(_) => Err(Error::Decode(
            "a transaction that writes cannot be served as a read".into(),
        )),
    };
    Response {
        revision,
        result: result.map_err(|error| error.to_string()),
    }
}

/// A restore under way: a fresh generation being filled with the items
/// of a leader snapshot.
struct Restoring {
    restore_id: u64,
    generation: u64,
    data: PartitionHandle,
}

/// Applies one client write (or an inner replicated one) at `revision`.
///
/// The outer error is the storage engine's: the table cannot go on, and
/// nothing of the batch is committed. The inner one is the command's own
/// refusal, the same on every replica; a refused command writes nothing.
fn apply_write(
    view: &mut View<'_>,
    command: Command,
    revision: u64,
) -> Result<std::result::Result<ResponseOp, String>> {
    let op = match command {
        Command::Put(put) => match key_refusal("a put's key", &put.key, true) {
            Some(refusal) => return Ok(Err(refusal)),
            None => ResponseOp::Put(view.put(&put, revision)?),
        },
        Command::DeleteRange(delete) => match range_refusal(&delete.range) {
            Some(refusal) => return Ok(Err(refusal)),
            None => ResponseOp::DeleteRange(view.delete_range(&delete)?),
        },
        Command::Txn(txn) => match txn_refusal(&txn) {
            Some(refusal) => return Ok(Err(refusal)),
            None => ResponseOp::Txn(view.txn(&txn, revision)?),
        },
        Command::Replicated(_)
        | Command::RestoreBegin { .. }
        | Command::RestoreChunk { .. }
        | Command::RestoreCommit { .. }
        | Command::RestoreAbort { .. } => {
            return Ok(Err("a replication command cannot be nested".into()))
        }
    };
    Ok(Ok(op))
}

/// Applies a replicated batch on top of `leader_index`: commands at or
/// below it were applied before and are skipped; a batch that would leave
/// a gap is refused whole.
///
/// A command this version cannot decode is an error, which stops the
/// table: the leader applied it (every command in a leader's log is one
/// its API built and checked), so skipping it would leave the copy
/// silently different. Only a leader cluster of a newer version writes
/// one. The batch stays in the follower cluster's log, and a follower of
/// that version applies it after its restart.
fn apply_replicated(
    view: &mut View<'_>,
    leader_index: &mut u64,
    batch: ReplicatedBatch,
) -> Result<ResponseOp> {
    if batch.first_leader_index == 0 || batch.first_leader_index > leader_index.saturating_add(1) {
        return Ok(ResponseOp::Replicated(ReplicatedResult {
            accepted: false,
            leader_index: *leader_index,
        }));
    }
    // Every new command is decoded before any applies: an unreadable one
    // leaves the table as it was.
    let mut decoded = Vec::with_capacity(batch.commands.len());
    for (offset, command) in batch.commands.iter().enumerate() {
        let index = batch.first_leader_index + offset as u64;
        if index <= *leader_index {
            continue;
        }
        if command.is_empty() {
            decoded.push((index, None));
            continue;
        }
        let command = decode::<Command>(command).map_err(|error| {
            Error::Decode(format!(
                "the leader cluster's command at leader index {index} cannot be read by \
                 this version ({error}): upgrade this follower cluster to the leader \
                 cluster's version; the table stops until then"
            ))
        })?;
        decoded.push((index, Some(command)));
    }
    for (index, command) in decoded {
        if let Some(command) = command {
            // A refusal here is the leader's refusal; a storage failure
            // stops the table.
            let _refused = apply_write(view, command, index)?;
        }
        *leader_index = index;
    }
    Ok(ResponseOp::Replicated(ReplicatedResult {
        accepted: true,
        leader_index: *leader_index,
    }))
}

impl Table {
    /// The table's revision: its applied index on the leader cluster, the
    /// leader index it holds on a follower cluster.
    pub fn revision(&self) -> u64 {
        match self.mode {
            TableMode::Primary => self.applied.0,
            TableMode::Replica => self.leader_index,
        }
    }

    fn meta(&self) -> Meta {
        let (restore_id, staging) = self.restoring.as_ref().map_or((0, 0), |restoring| {
            (restoring.restore_id, restoring.generation)
        });
        Meta {
            generation: self.generation,
            applied: self.applied.0,
            leader_index: self.leader_index,
            restore_id,
            staging,
            reset_carried: self.reset_carried,
        }
    }

    /// The first generation number above every partition of this table on
    /// disk (an open partition always has its folder). A deleted partition
    /// keeps its folder, with
    /// fjall's deletion mark, until its last handle drops (a queued flush
    /// holds one), and fjall refuses to create a partition of that name
    /// ("PartitionDeleted"). Reusing the number of a failed or abandoned
    /// restore's partition therefore failed every retry of a restore, and
    /// the table stayed down (anomaly 6 in `docs/verification.md`).
    fn next_generation(&self) -> Result<u64> {
        let staging = self.restoring.as_ref().map_or(0, |r| r.generation);
        let mut highest = self.generation.max(staging);
        let prefix = format!("t-{}-", self.group);
        let folder = self.store.dir.join("partitions");
        let entries = std::fs::read_dir(&folder)
            .map_err(|error| Error::Storage(format!("list {}: {error}", folder.display())))?;
        for entry in entries {
            let entry = entry
                .map_err(|error| Error::Storage(format!("list {}: {error}", folder.display())))?;
            if let Some(generation) = entry
                .file_name()
                .to_string_lossy()
                .strip_prefix(&prefix)
                .and_then(|rest| rest.parse::<u64>().ok())
            {
                highest = highest.max(generation);
            }
        }
        Ok(highest + 1)
    }

    /// Applies commands as one atomic write with the last index; restore
    /// steps commit what came before them and write on their own.
    fn apply_commands(&mut self, commands: &[(LogIndex, Bytes)]) -> Result<Vec<Bytes>> {
        let mut results = Vec::with_capacity(commands.len());
        let mut writes = BTreeMap::new();
        let mut pending = false;
        for (index, command) in commands {
            let decoded = decode::<Command>(command);
            let restore_step = matches!(
                decoded,
                Ok(Command::RestoreBegin { .. }
                    | Command::RestoreChunk { .. }
                    | Command::RestoreCommit { .. }
                    | Command::RestoreAbort { .. })
            );
            if restore_step {
                if pending {
                    self.commit_writes(std::mem::take(&mut writes))?;
                    pending = false;
                }
                let Ok(step) = decoded else {
                    unreachable!("a restore step decoded")
                };
                let reset_id = restore_commit_reset_id(command);
                let result = self.apply_restore_step(*index, step, reset_id)?;
                results.push(Bytes::from(encode(&Response {
                    revision: self.revision(),
                    result,
                })));
                continue;
            }
            let mut view = View {
                data: Source::Live(&self.data),
                recent: Some(&self.recent),
                writes: std::mem::take(&mut writes),
            };
            let result = match (decoded, self.mode) {
                (Err(error), _) => Err(error.to_string()),
                (Ok(Command::Replicated(_)), TableMode::Replica) if self.restoring.is_some() => {
                    // A restore under way (a puller's snapshot install, or
                    // an operator's reset) must finish first.
                    Ok(ResponseOp::Replicated(ReplicatedResult {
                        accepted: false,
                        leader_index: self.leader_index,
                    }))
                }
                (Ok(Command::Replicated(batch)), TableMode::Replica) => {
                    Ok(apply_replicated(&mut view, &mut self.leader_index, batch)?)
                }
                (Ok(Command::Replicated(_)), TableMode::Primary) => {
                    Err("a table of the leader cluster takes no replicated commands".into())
                }
                (Ok(_), TableMode::Replica) => Err(
                    "a table of a follower cluster takes writes only from the leader cluster"
                        .into(),
                ),
                (Ok(command), TableMode::Primary) => apply_write(&mut view, command, index.0)?,
            };
            writes = view.writes;
            self.applied = *index;
            pending = true;
            results.push(Bytes::from(encode(&Response {
                revision: self.revision(),
                result,
            })));
        }
        if pending {
            self.commit_writes(writes)?;
        }
        Ok(results)
    }

    /// Switches the table to another data partition (a restore's) and
    /// returns the old one. The cache of recent writes described the old.
    fn replace_data(&mut self, data: PartitionHandle) -> PartitionHandle {
        self.recent.clear();
        std::mem::replace(&mut self.data, data)
    }

    /// Writes a batch's keys and the table's `meta` in one atomic write.
    fn commit_writes(&mut self, writes: BTreeMap<Vec<u8>, Option<Record>>) -> Result<()> {
        let mut batch = self.store.keyspace.batch();
        for (key, record) in &writes {
            match record {
                Some(record) => batch.insert(&self.data, key.as_slice(), record.encode()),
                None => batch.remove(&self.data, key.as_slice()),
            }
        }
        batch.insert(
            &self.store.meta,
            self.group.to_be_bytes(),
            self.meta().encode().as_ref(),
        );
        // Readers wait for the commit, so that none sees half of it.
        let mut published = self.published.write().unwrap_or_else(|p| p.into_inner());
        if let Err(error) = batch.commit() {
            // What the partition holds is unknown now.
            self.recent.clear();
            return Err(error.into());
        }
        published.revision = self.revision();
        drop(published);
        for (key, record) in writes {
            self.recent.note(key, record, RECENT_WRITES_BYTES_MAX);
        }
        Ok(())
    }

    /// Applies `RestoreBegin`, `RestoreChunk`, `RestoreCommit` or
    /// `RestoreAbort` at `index`. A commit that names the operator's reset
    /// its install carried out (`reset_id`) records it in the same write.
    /// Begins restore `restore_id` into a new partition (a generation of
    /// its own), dropping any restore left unfinished.
    fn begin_restore(&mut self, restore_id: u64) -> Result<()> {
        let generation = self.next_generation()?;
        if let Some(abandoned) = self.restoring.take() {
            self.store.keyspace.delete_partition(abandoned.data)?;
        }
        let data = self.store.keyspace.open_partition(
            &partition_name(self.group, generation),
            PartitionCreateOptions::default(),
        )?;
        self.restoring = Some(Restoring {
            restore_id,
            generation,
            data,
        });
        self.commit_writes(BTreeMap::new())
    }

    /// Writes checked items into the restore under way, with the table's
    /// meta (its applied index) in the same batch.
    fn write_restore_chunk(&mut self, items: Vec<(Vec<u8>, Vec<u8>)>) -> Result<()> {
        let Some(restoring) = &self.restoring else {
            return Ok(());
        };
        let mut batch = self.store.keyspace.batch();
        for (key, record) in items {
            batch.insert(&restoring.data, key, record);
        }
        batch.insert(
            &self.store.meta,
            self.group.to_be_bytes(),
            self.meta().encode().as_ref(),
        );
        batch.commit()?;
        self.publish();
        Ok(())
    }

    /// Switches the table to the restored copy: the copy is durable before
    /// the switch names it, and readers move to it before the old data is
    /// deleted.
    fn commit_restore(
        &mut self,
        restoring: Restoring,
        leader_index: u64,
        reset_id: Option<u64>,
    ) -> Result<()> {
        self.switch_data(restoring.data, |table| {
            table.generation = restoring.generation;
            if table.mode == TableMode::Replica {
                table.leader_index = leader_index;
            }
            if let Some(reset_id) = reset_id {
                table.reset_carried = reset_id;
            }
        })
    }

    /// Switches the table to the data in `fresh`: the new data is durable
    /// before the switch names it; under the switch lock, `update` sets
    /// what the new data stands for and one meta write names it; readers
    /// move to it before the old data is deleted.
    fn switch_data(
        &mut self,
        fresh: PartitionHandle,
        update: impl FnOnce(&mut Table),
    ) -> Result<()> {
        let keyspace = self.store.keyspace.clone();
        keyspace.persist(PersistMode::SyncAll)?;
        let switch = Arc::clone(&self.store.switch);
        let _switch = switch.write().unwrap_or_else(|p| p.into_inner());
        let old = self.replace_data(fresh);
        update(self);
        self.store
            .meta
            .insert(self.group.to_be_bytes(), self.meta().encode().as_ref())?;
        keyspace.persist(PersistMode::SyncAll)?;
        self.publish();
        keyspace.delete_partition(old)?;
        Ok(())
    }

    fn apply_restore_step(
        &mut self,
        index: LogIndex,
        step: Command,
        reset_id: Option<u64>,
    ) -> Result<std::result::Result<ResponseOp, String>> {
        self.applied = index;
        let current = self.restoring.as_ref().map(|r| r.restore_id);
        let accepted = match (step, reset_id) {
            (Command::RestoreBegin { restore_id }, _) if restore_id != 0 => {
                self.begin_restore(restore_id)?;
                true
            }
            (Command::RestoreChunk { restore_id, items }, _) if current == Some(restore_id) => {
                if let Some(error) = items
                    .iter()
                    .find_map(|(key, record)| check_item(key, record).err())
                {
                    self.commit_writes(BTreeMap::new())?;
                    return Ok(Err(format!("a restore chunk is refused: {error}")));
                }
                self.write_restore_chunk(items)?;
                true
            }
            (
                Command::RestoreCommit {
                    restore_id,
                    leader_index,
                },
                reset_id,
            ) if current == Some(restore_id) => {
                if let Some(restoring) = self.restoring.take() {
                    self.commit_restore(restoring, leader_index, reset_id)?;
                }
                true
            }
            (Command::RestoreAbort { restore_id }, _) if current == Some(restore_id) => {
                // The meta written with the applied index no longer names
                // the restore; then its partition goes.
                let abandoned = self.restoring.take();
                self.commit_writes(BTreeMap::new())?;
                if let Some(abandoned) = abandoned {
                    self.store.keyspace.delete_partition(abandoned.data)?;
                }
                true
            }
            _ => {
                self.commit_writes(BTreeMap::new())?;
                false
            }
        };
        Ok(Ok(ResponseOp::Replicated(ReplicatedResult {
            accepted,
            leader_index: self.leader_index,
        })))
    }

    /// Answers a query from the committed state.
    pub fn query(&self, query: &Query) -> Response {
        answer_query(Source::Live(&self.data), self.revision(), query)
    }

    /// Shows readers on other tasks the current data and revision.
    fn publish(&self) {
        let mut published = self.published.write().unwrap_or_else(|p| p.into_inner());
        published.data = self.data.clone();
        published.revision = self.revision();
    }

    fn restore_from(&mut self, index: LogIndex, data: &mut dyn Read) -> Result<()> {
        let mut version = [0u8; 1];
        data.read_exact(&mut version)?;
        let (leader_index, restore_id, reset_carried) = match version[0] {
            SNAPSHOT_VERSION_1 => (0, 0, 0),
            SNAPSHOT_VERSION => {
                let mut header = [0u8; 16];
                data.read_exact(&mut header)?;
                (read_u64(&header[..8]), read_u64(&header[8..]), 0)
            }
            SNAPSHOT_VERSION_3 => {
                let mut header = [0u8; 24];
                data.read_exact(&mut header)?;
                (
                    read_u64(&header[..8]),
                    read_u64(&header[8..16]),
                    read_u64(&header[16..]),
                )
            }
            other => {
                return Err(Error::Decode(format!(
                    "table snapshot version {other} is not known (expected \
                     {SNAPSHOT_VERSION_1} to {SNAPSHOT_VERSION_3})"
                )))
            }
        };
        let generation = self.next_generation()?;
        let keyspace = self.store.keyspace.clone();
        let fresh = keyspace.open_partition(
            &partition_name(self.group, generation),
            PartitionCreateOptions::default(),
        )?;
        let mut staging = None;
        let filled = fill_from_snapshot(&keyspace, &fresh, data).and_then(|marker| {
            match (marker, restore_id) {
                (false, 0) => Ok(()),
                (true, id) if id != 0 => {
                    let partition = keyspace.open_partition(
                        &partition_name(self.group, generation + 1),
                        PartitionCreateOptions::default(),
                    )?;
                    let filled = fill_from_snapshot(&keyspace, &partition, data);
                    staging = Some(Restoring {
                        restore_id: id,
                        generation: generation + 1,
                        data: partition,
                    });
                    match filled? {
                        false => Ok(()),
                        true => Err(Error::Decode(
                            "a table snapshot has two staging marks".into(),
                        )),
                    }
                }
                _ => Err(Error::Decode(
                    "a table snapshot's staging mark does not match its restore id".into(),
                )),
            }
        });
        if let Err(error) = filled {
            let _ = keyspace.delete_partition(fresh);
            if let Some(staging) = staging {
                let _ = keyspace.delete_partition(staging.data);
            }
            return Err(error);
        }
        // The switch: one atomic write names the new generations.
        let mut old_staging = None;
        self.switch_data(fresh, |table| {
            old_staging = std::mem::replace(&mut table.restoring, staging);
            table.generation = generation;
            table.applied = index;
            table.leader_index = leader_index;
            table.reset_carried = reset_carried;
        })?;
        if let Some(old_staging) = old_staging {
            keyspace.delete_partition(old_staging.data)?;
        }
        Ok(())
    }
}

/// Reads (key, record) pairs into `partition` until the end of `data`
/// (false) or the staging mark (true).
fn fill_from_snapshot(
    keyspace: &Keyspace,
    partition: &PartitionHandle,
    data: &mut dyn Read,
) -> Result<bool> {
    let mut batch = keyspace.batch();
    let mut batch_bytes = 0usize;
    let marked = loop {
        let key = match read_length(data, true)? {
            None => break false,
            Some(SNAPSHOT_STAGING_MARKER) => break true,
            Some(length) => read_body(data, length)?,
        };
        let Some(record) = read_item(data, false)? else {
            return Err(Error::Decode("a table snapshot ends after a key".into()));
        };
        check_item(&key, &record)?;
        batch_bytes += key.len() + record.len();
        batch.insert(partition, key, record);
        if batch_bytes >= RESTORE_BATCH_BYTES {
            std::mem::replace(&mut batch, keyspace.batch()).commit()?;
            batch_bytes = 0;
        }
    };
    batch.commit()?;
    Ok(marked)
}

/// An item's length prefix; `None` at a clean end of the stream when
/// `end_allowed`.
fn read_length(data: &mut dyn Read, end_allowed: bool) -> Result<Option<u32>> {
    let mut length = [0u8; 4];
    let mut filled = 0;
    while filled < 4 {
        let read = data.read(&mut length[filled..])?;
        if read == 0 {
            if filled == 0 && end_allowed {
                return Ok(None);
            }
            return Err(Error::Decode("a table snapshot is truncated".into()));
        }
        filled += read;
    }
    Ok(Some(u32::from_le_bytes(length)))
}

fn read_body(data: &mut dyn Read, length: u32) -> Result<Vec<u8>> {
    if length > SNAPSHOT_ITEM_BYTES_MAX {
        return Err(Error::Decode(format!(
            "a table snapshot item of {length} bytes is over the limit"
        )));
    }
    let mut item = vec![0u8; length as usize];
    data.read_exact(&mut item)?;
    Ok(item)
}

/// One length-prefixed item; `None` at a clean end of the stream when
/// `end_allowed`.
fn read_item(data: &mut dyn Read, end_allowed: bool) -> Result<Option<Vec<u8>>> {
    match read_length(data, end_allowed)? {
        None => Ok(None),
        Some(length) => read_body(data, length).map(Some),
    }
}

/// A table snapshot item: a key and its stored record.
pub type TableItem = (Vec<u8>, Vec<u8>);

/// The first item in `bytes` (items as `TableItems::write_to` writes
/// them) and the bytes it took, or `None` while `bytes` does not hold a
/// whole item yet. For readers that receive the items in chunks.
pub fn split_table_item(bytes: &[u8]) -> Result<Option<(TableItem, usize)>> {
    let mut position = 0;
    let mut parts = [Vec::new(), Vec::new()];
    for part in &mut parts {
        let Some(prefix) = bytes.get(position..position + 4) else {
            return Ok(None);
        };
        let length = read_u32(prefix);
        if length > SNAPSHOT_ITEM_BYTES_MAX {
            return Err(Error::Decode(format!(
                "a table snapshot item of {length} bytes is over the limit"
            )));
        }
        position += 4;
        let Some(body) = bytes.get(position..position + length as usize) else {
            return Ok(None);
        };
        *part = body.to_vec();
        position += length as usize;
    }
    let [key, record] = parts;
    check_item(&key, &record)?;
    Ok(Some(((key, record), position)))
}

fn read_u32(bytes: &[u8]) -> u32 {
    let mut buffer = [0u8; 4];
    buffer.copy_from_slice(&bytes[..4]);
    u32::from_le_bytes(buffer)
}

/// A point-in-time view of a table, written out as a snapshot stream.
struct TableSnapshot {
    leader_index: u64,
    reset_carried: u64,
    data: fjall::Snapshot,
    /// The restore under way: its id and items.
    staging: Option<(u64, fjall::Snapshot)>,
}

impl SnapshotSource for TableSnapshot {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
        // Version 3 only when it says more than version 2 would, so that
        // readers older than it still take every other snapshot.
        let version = if self.reset_carried == 0 {
            SNAPSHOT_VERSION
        } else {
            SNAPSHOT_VERSION_3
        };
        out.write_all(&[version])?;
        out.write_all(&self.leader_index.to_le_bytes())?;
        let restore_id = self.staging.as_ref().map_or(0, |(id, _)| *id);
        out.write_all(&restore_id.to_le_bytes())?;
        if version == SNAPSHOT_VERSION_3 {
            out.write_all(&self.reset_carried.to_le_bytes())?;
        }
        write_items(&self.data, out)?;
        if let Some((_, staging)) = &self.staging {
            out.write_all(&SNAPSHOT_STAGING_MARKER.to_le_bytes())?;
            write_items(staging, out)?;
        }
        Ok(())
    }
}

impl StateMachine for Table {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        match self.apply_commands(&[(index, command.clone())]) {
            Ok(mut results) => results.pop().unwrap_or_default(),
            Err(error) => panic!("table {}: storage failed: {error}", self.group),
        }
    }

    fn apply_batch(&mut self, commands: &[(LogIndex, Bytes)]) -> std::io::Result<Vec<Bytes>> {
        self.apply_commands(commands)
            .map_err(|error| std::io::Error::other(error.to_string()))
    }

    fn skip_to(&mut self, index: LogIndex) -> std::io::Result<()> {
        if index <= self.applied {
            return Ok(());
        }
        self.applied = index;
        self.commit_writes(BTreeMap::new())
            .map_err(|error| std::io::Error::other(error.to_string()))
    }

    fn read(&self, query: &Bytes) -> Bytes {
        read_encoded(Source::Live(&self.data), self.revision(), query)
    }

    fn reader(&self) -> Option<Arc<dyn StateReader>> {
        Some(Arc::new(TableReader {
            published: Arc::clone(&self.published),
        }))
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.store
            .keyspace
            .persist(PersistMode::SyncAll)
            .map_err(|error| std::io::Error::other(error.to_string()))
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn SnapshotSource> {
        let instant = self.store.keyspace.instant();
        Box::new(TableSnapshot {
            leader_index: self.leader_index,
            reset_carried: self.reset_carried,
            data: self.data.snapshot_at(instant),
            staging: self
                .restoring
                .as_ref()
                .map(|restoring| (restoring.restore_id, restoring.data.snapshot_at(instant))),
        })
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn Read) -> std::io::Result<()> {
        self.restore_from(index, data)
            .map_err(|error| std::io::Error::other(error.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_is_written_short_until_a_reset_is_carried_out() {
        let meta = Meta {
            generation: 3,
            applied: 40,
            leader_index: 39,
            restore_id: 7,
            staging: 4,
            reset_carried: 0,
        };
        // Without a reset carried, the value a version before it wrote
        // and reads.
        let short = meta.encode();
        assert_eq!(short.as_ref().len(), META_V2_BYTES);
        assert_eq!(Meta::decode(1, short.as_ref()).expect("decode"), meta);
        let carried = Meta {
            reset_carried: (1 << 63) | 9,
            ..meta
        };
        let long = carried.encode();
        assert_eq!(long.as_ref().len(), META_BYTES);
        assert_eq!(&long.as_ref()[..META_V2_BYTES], short.as_ref());
        assert_eq!(Meta::decode(1, long.as_ref()).expect("decode"), carried);
        let v1 = Meta::decode(1, &short.as_ref()[..META_V1_BYTES]).expect("decode");
        assert_eq!((v1.generation, v1.applied, v1.reset_carried), (3, 40, 0));
        assert!(Meta::decode(1, &long.as_ref()[..44]).is_err());
    }

    fn apply_one(table: &mut Table, command: &Command) -> Response {
        let index = LogIndex(table.applied_index().0 + 1);
        let results = table
            .apply_batch(&[(index, Bytes::from(encode(command)))])
            .expect("apply");
        decode::<Response>(&results[0]).expect("response")
    }

    fn put_replacing(table: &mut Table, value: &str) -> KeyValue {
        let response = apply_one(
            table,
            &Command::Put(PutRequest {
                key: b"k".to_vec(),
                value: value.into(),
                prev_kv: true,
            }),
        );
        match response.result {
            Ok(ResponseOp::Put(PutResult {
                prev_kv: Some(prev),
            })) => prev,
            other => panic!("a put that replaced a record, not {other:?}"),
        }
    }

    /// The apply path reads a key's old record from the cache of recent
    /// writes. Both kinds of restore switch the data under it: the next
    /// write of the key must replace the restored record, not the cached
    /// one (else it would count its version on from the lost write).
    #[test]
    fn a_write_after_a_restore_replaces_the_restored_record() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut table = store.open_table(3).expect("table");
        apply_one(
            &mut table,
            &Command::Put(PutRequest {
                key: b"k".to_vec(),
                value: b"v1".to_vec(),
                prev_kv: false,
            }),
        );
        let mut snapshot = Vec::new();
        table.snapshot().write_to(&mut snapshot).expect("snapshot");
        assert_eq!(put_replacing(&mut table, "v2").value, b"v1");

        // A snapshot install (`restore_from`).
        table
            .restore(LogIndex(10), &mut snapshot.as_slice())
            .expect("restore");
        let prev = put_replacing(&mut table, "v3");
        assert_eq!((prev.value.as_slice(), prev.version), (&b"v1"[..], 1));

        // A restore through Raft (a backup's): begin, a chunk, commit.
        assert_eq!(put_replacing(&mut table, "v4").value, b"v3");
        let restored = Record {
            create_revision: 1,
            mod_revision: 1,
            version: 1,
            value: b"old".to_vec(),
        };
        for step in [
            Command::RestoreBegin { restore_id: 7 },
            Command::RestoreChunk {
                restore_id: 7,
                items: vec![(b"k".to_vec(), restored.encode())],
            },
            Command::RestoreCommit {
                restore_id: 7,
                leader_index: 0,
            },
        ] {
            let response = apply_one(&mut table, &step);
            assert!(response.result.is_ok(), "{step:?}: {response:?}");
        }
        let prev = put_replacing(&mut table, "v5");
        assert_eq!((prev.value.as_slice(), prev.version), (&b"old"[..], 1));
    }

    #[test]
    fn the_recent_writes_cache_counts_its_bytes_and_starts_over_when_full() {
        let record = |value_bytes: usize| {
            Some(Record {
                create_revision: 1,
                mod_revision: 1,
                version: 1,
                value: vec![b'v'; value_bytes],
            })
        };
        let entry = 1 + 10 + RECENT_ENTRY_OVERHEAD_BYTES;
        let max = 3 * entry;
        let mut recent = RecentWrites::default();
        recent.note(b"a".to_vec(), record(10), max);
        recent.note(b"b".to_vec(), record(10), max);
        recent.note(b"a".to_vec(), record(10), max);
        assert_eq!(recent.bytes, 2 * entry, "a replaced entry counts once");
        recent.note(b"c".to_vec(), None, max);
        assert_eq!(recent.records.len(), 3);
        assert_eq!(recent.get(b"c"), Some(&None), "a delete is remembered");
        recent.note(b"d".to_vec(), record(10), max);
        assert_eq!(recent.records.len(), 1, "over the limit: starts over");
        assert!(recent.get(b"a").is_none());
        assert_eq!(recent.bytes, entry);
        recent.note(b"d".to_vec(), record(max), max);
        assert!(recent.get(b"d").is_none(), "too big alone: left out");
        assert_eq!(recent.bytes, 0);
    }

    /// A partition deleted while something still holds it keeps its
    /// folder, and fjall will not create one of that name: a restore must
    /// take a fresh number rather than the deleted one's (anomaly 6).
    #[test]
    fn a_restore_skips_the_number_of_a_partition_still_being_deleted() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("store");
        let mut table = store.open_table(2).expect("table");
        let mut snapshot = Vec::new();
        {
            let other_dir = tempfile::tempdir().expect("tempdir");
            let other = Store::open(other_dir.path()).expect("store");
            let mut source = other.open_table(2).expect("table");
            let put = encode(&Command::Put(PutRequest {
                key: b"key".to_vec(),
                value: b"value".to_vec(),
                ..PutRequest::default()
            }));
            source
                .apply_batch(&[(LogIndex(1), Bytes::from(put))])
                .expect("apply");
            source.snapshot().write_to(&mut snapshot).expect("write");
        }
        // What an abandoned restore leaves: the next generation's
        // partition, deleted, its folder kept by a handle still held.
        let abandoned = store
            .keyspace
            .open_partition("t-2-1", PartitionCreateOptions::default())
            .expect("create");
        abandoned.insert(b"partial", b"copy").expect("insert");
        let held = abandoned.clone();
        store.keyspace.delete_partition(abandoned).expect("delete");
        assert!(dir.path().join("partitions/t-2-1").exists());

        table
            .restore(LogIndex(7), &mut snapshot.as_slice())
            .expect("the restore takes another number");
        assert_eq!(table.applied_index(), LogIndex(7));
        assert!(table.generation > 1, "generation {}", table.generation);
        let found = table.data.get(b"key").expect("get").expect("restored key");
        assert_eq!(Record::decode(&found).expect("record").value, b"value");
        drop(held);
        drop(table);
        drop(store);
        let store = Store::open(dir.path()).expect("reopen");
        let table = store.open_table(2).expect("table");
        assert_eq!(table.applied_index(), LogIndex(7));
        assert!(table.data.get(b"key").expect("get").is_some());
    }
}
