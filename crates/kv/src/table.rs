//! [`Store`]: one fjall keyspace per node, holding every table hosted on it;
//! [`Table`]: one table's state machine (`regatta_multiraft::StateMachine`).
//! The layout is in `docs/kv-format.md`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::ops::Bound;
use std::path::Path;

use bytes::Bytes;
use fjall::{Keyspace, PartitionCreateOptions, PartitionHandle, PersistMode};
use regatta_multiraft::{SnapshotSource, StateMachine};
use regatta_raft::LogIndex;

use crate::command::{
    decode, encode, Command, Compare, CompareResult, CompareTarget, DeleteRangeRequest,
    DeleteRangeResult, KeyRange, KeyValue, PutRequest, PutResult, Query, RangeRequest, RangeResult,
    RequestOp, Response, ResponseOp, TxnRequest, TxnResult,
};
use crate::error::{Error, Result};

const META_PARTITION: &str = "meta";
/// Bytes of a record before its value: create, mod revision and version.
const RECORD_HEADER_BYTES: usize = 24;
const SNAPSHOT_VERSION: u8 = 1;
/// Restores write batches of about this many bytes.
const RESTORE_BATCH_BYTES: usize = 4 << 20;
/// The longest key or value a snapshot may carry.
const SNAPSHOT_ITEM_BYTES_MAX: u32 = 64 << 20;

/// Every table of a node, in one fjall keyspace.
#[derive(Clone)]
pub struct Store {
    keyspace: Keyspace,
    meta: PartitionHandle,
}

impl Store {
    /// Opens (creating) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store> {
        let keyspace = fjall::Config::new(dir).open()?;
        let meta = keyspace.open_partition(META_PARTITION, PartitionCreateOptions::default())?;
        Ok(Store { keyspace, meta })
    }

    /// Opens table `group`, creating it empty if it is new. Partitions of
    /// other generations that a crashed restore left are deleted.
    pub fn open_table(&self, group: u64) -> Result<Table> {
        let (generation, applied) = self.read_meta(group)?;
        let current = partition_name(group, generation);
        for name in self.keyspace.list_partitions() {
            let name: &str = &name;
            if name != current && name.starts_with(&format!("t-{group}-")) {
                let stale = self
                    .keyspace
                    .open_partition(name, PartitionCreateOptions::default())?;
                self.keyspace.delete_partition(stale)?;
            }
        }
        let data = self
            .keyspace
            .open_partition(&current, PartitionCreateOptions::default())?;
        Ok(Table {
            store: self.clone(),
            group,
            generation,
            data,
            applied: LogIndex(applied),
        })
    }

    /// Deletes table `group`'s data and metadata.
    pub fn remove_table(&self, group: u64) -> Result<()> {
        let (generation, _) = self.read_meta(group)?;
        let name = partition_name(group, generation);
        if self.keyspace.partition_exists(&name) {
            let data = self
                .keyspace
                .open_partition(&name, PartitionCreateOptions::default())?;
            self.keyspace.delete_partition(data)?;
        }
        self.meta.remove(group.to_be_bytes())?;
        self.keyspace.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// Bytes table `group`'s data takes on disk (its fjall partition's
    /// segments; writes still only in memory or the journal not counted).
    pub fn table_disk_bytes(&self, group: u64) -> Result<u64> {
        let (generation, _) = self.read_meta(group)?;
        let name = partition_name(group, generation);
        if !self.keyspace.partition_exists(&name) {
            return Ok(0);
        }
        let data = self
            .keyspace
            .open_partition(&name, PartitionCreateOptions::default())?;
        Ok(data.disk_space())
    }

    /// The table's data generation and applied index.
    fn read_meta(&self, group: u64) -> Result<(u64, u64)> {
        match self.meta.get(group.to_be_bytes())? {
            None => Ok((0, 0)),
            Some(bytes) if bytes.len() == 16 => Ok((read_u64(&bytes[..8]), read_u64(&bytes[8..]))),
            Some(bytes) => Err(Error::Decode(format!(
                "metadata of table {group}: {} bytes, expected 16",
                bytes.len()
            ))),
        }
    }
}

fn partition_name(group: u64, generation: u64) -> String {
    format!("t-{group}-{generation}")
}

fn meta_value(generation: u64, applied: LogIndex) -> [u8; 16] {
    let mut value = [0u8; 16];
    value[..8].copy_from_slice(&generation.to_le_bytes());
    value[8..].copy_from_slice(&applied.0.to_le_bytes());
    value
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
        if bytes.len() < RECORD_HEADER_BYTES {
            return Err(Error::Decode(format!(
                "a record of {} bytes, shorter than its header",
                bytes.len()
            )));
        }
        Ok(Record {
            create_revision: read_u64(&bytes[0..8]),
            mod_revision: read_u64(&bytes[8..16]),
            version: read_u64(&bytes[16..24]),
            value: bytes[RECORD_HEADER_BYTES..].to_vec(),
        })
    }

    fn key_value(&self, key: &[u8], with_value: bool) -> KeyValue {
        KeyValue {
            key: key.to_vec(),
            value: if with_value {
                self.value.clone()
            } else {
                Vec::new()
            },
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
            version: self.version,
        }
    }
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

/// The committed data of a table, with the writes of the batch being
/// applied on top.
struct View<'a> {
    data: &'a PartitionHandle,
    /// Keys written in this batch: a record, or `None` for a delete.
    writes: BTreeMap<Vec<u8>, Option<Record>>,
}

impl View<'_> {
    fn get(&self, key: &[u8]) -> Result<Option<Record>> {
        if let Some(written) = self.writes.get(key) {
            return Ok(written.clone());
        }
        match self.data.get(key)? {
            Some(bytes) => Record::decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// Calls `visit` for every key in `range`, in key order, until it
    /// returns false.
    fn scan(&self, range: &KeyRange, mut visit: impl FnMut(&[u8], &Record) -> bool) -> Result<()> {
        let Some((low, high)) = bounds(range) else {
            return Ok(());
        };
        let mut written = self
            .writes
            .range::<Vec<u8>, _>((low.clone(), high.clone()))
            .peekable();
        for item in self.data.range::<Vec<u8>, _>((low, high)) {
            let (key, bytes) = item?;
            // Keys written in this batch that sort first.
            while let Some((written_key, record)) =
                written.next_if(|(written_key, _)| written_key.as_slice() < &key[..])
            {
                if let Some(record) = record {
                    if !visit(written_key, record) {
                        return Ok(());
                    }
                }
            }
            if let Some((_, record)) =
                written.next_if(|(written_key, _)| written_key.as_slice() == &key[..])
            {
                if let Some(record) = record {
                    if !visit(&key, record) {
                        return Ok(());
                    }
                }
                continue;
            }
            if !visit(&key, &Record::decode(&bytes)?) {
                return Ok(());
            }
        }
        for (written_key, record) in written {
            if let Some(record) = record {
                if !visit(written_key, record) {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    fn range(&self, request: &RangeRequest) -> Result<RangeResult> {
        let mut result = RangeResult::default();
        let mut bytes = 0u64;
        self.scan(&request.range, |key, record| {
            result.count += 1;
            let full = (request.limit > 0 && result.kvs.len() as u64 >= request.limit)
                || (request.bytes_max > 0 && !result.kvs.is_empty() && bytes >= request.bytes_max);
            if request.count_only || full {
                result.more |= !request.count_only;
                return true;
            }
            let kv = record.key_value(key, !request.keys_only);
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
            found.push(record.key_value(key, true));
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
        self.scan(&compare.range, |_, record| {
            any = true;
            holds = compare_record(Some(record), compare);
            holds
        })?;
        if !any {
            return Ok(compare_record(None, compare));
        }
        Ok(holds)
    }

    fn txn(&mut self, request: &TxnRequest, revision: u64) -> Result<TxnResult> {
        let mut succeeded = true;
        for compare in &request.compare {
            if !self.compare(compare)? {
                succeeded = false;
                break;
            }
        }
        let branch = if succeeded {
            &request.success
        } else {
            &request.failure
        };
        let mut responses = Vec::with_capacity(branch.len());
        for op in branch {
            responses.push(match op {
                RequestOp::Range(range) => ResponseOp::Range(self.range(range)?),
                RequestOp::Put(put) => ResponseOp::Put(self.put(put, revision)?),
                RequestOp::DeleteRange(delete) => {
                    ResponseOp::DeleteRange(self.delete_range(delete)?)
                }
                RequestOp::Txn(txn) => ResponseOp::Txn(self.txn(txn, revision)?),
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
    generation: u64,
    data: PartitionHandle,
    applied: LogIndex,
}

impl Table {
    /// Applies commands as one atomic write with the last index.
    fn apply_commands(&mut self, commands: &[(LogIndex, Bytes)]) -> Result<Vec<Bytes>> {
        let mut view = View {
            data: &self.data,
            writes: BTreeMap::new(),
        };
        let mut results = Vec::with_capacity(commands.len());
        for (index, command) in commands {
            let revision = index.0;
            let result = match decode::<Command>(command) {
                Err(error) => Err(error.to_string()),
                Ok(Command::Put(put)) => view
                    .put(&put, revision)
                    .map(ResponseOp::Put)
                    .map_err(|e| e.to_string()),
                Ok(Command::DeleteRange(delete)) => view
                    .delete_range(&delete)
                    .map(ResponseOp::DeleteRange)
                    .map_err(|e| e.to_string()),
                Ok(Command::Txn(txn)) => view
                    .txn(&txn, revision)
                    .map(ResponseOp::Txn)
                    .map_err(|e| e.to_string()),
            };
            results.push(Bytes::from(encode(&Response { revision, result })));
        }
        let Some(&(last, _)) = commands.last() else {
            return Ok(results);
        };
        let mut batch = self.store.keyspace.batch();
        for (key, record) in view.writes {
            match record {
                Some(record) => batch.insert(&self.data, key, record.encode()),
                None => batch.remove(&self.data, key),
            }
        }
        batch.insert(
            &self.store.meta,
            self.group.to_be_bytes(),
            meta_value(self.generation, last),
        );
        batch.commit()?;
        self.applied = last;
        Ok(results)
    }

    /// Answers a query from the committed state.
    pub fn query(&self, query: &Query) -> Response {
        let mut view = View {
            data: &self.data,
            writes: BTreeMap::new(),
        };
        let result = match query {
            Query::Range(range) => view.range(range).map(ResponseOp::Range),
            Query::Txn(txn) if txn.is_read_only() => {
                view.txn(txn, self.applied.0).map(ResponseOp::Txn)
            }
            Query::Txn(_) => Err(Error::Decode(
                "a transaction that writes cannot be served as a read".into(),
            )),
        };
        Response {
            revision: self.applied.0,
            result: result.map_err(|error| error.to_string()),
        }
    }

    fn restore_from(&mut self, index: LogIndex, data: &mut dyn Read) -> Result<()> {
        let mut version = [0u8; 1];
        data.read_exact(&mut version)?;
        if version[0] != SNAPSHOT_VERSION {
            return Err(Error::Decode(format!(
                "table snapshot version {} is not known (expected {SNAPSHOT_VERSION})",
                version[0]
            )));
        }
        let generation = self.generation + 1;
        let name = partition_name(self.group, generation);
        let keyspace = &self.store.keyspace;
        let fresh = keyspace.open_partition(&name, PartitionCreateOptions::default())?;
        let filled = fill_from_snapshot(keyspace, &fresh, data);
        if let Err(error) = filled {
            let _ = keyspace.delete_partition(fresh);
            return Err(error);
        }
        // The switch: one atomic write names the new generation.
        keyspace.persist(PersistMode::SyncAll)?;
        self.store
            .meta
            .insert(self.group.to_be_bytes(), meta_value(generation, index))?;
        keyspace.persist(PersistMode::SyncAll)?;
        let old = std::mem::replace(&mut self.data, fresh);
        self.generation = generation;
        self.applied = index;
        keyspace.delete_partition(old)?;
        Ok(())
    }
}

/// Reads (key, record) pairs to the end of `data` into `partition`.
fn fill_from_snapshot(
    keyspace: &Keyspace,
    partition: &PartitionHandle,
    data: &mut dyn Read,
) -> Result<()> {
    let mut batch = keyspace.batch();
    let mut batch_bytes = 0usize;
    while let Some(key) = read_item(data, true)? {
        let Some(record) = read_item(data, false)? else {
            return Err(Error::Decode("a table snapshot ends after a key".into()));
        };
        Record::decode(&record)?;
        batch_bytes += key.len() + record.len();
        batch.insert(partition, key, record);
        if batch_bytes >= RESTORE_BATCH_BYTES {
            std::mem::replace(&mut batch, keyspace.batch()).commit()?;
            batch_bytes = 0;
        }
    }
    batch.commit()?;
    Ok(())
}

/// One length-prefixed item; `None` at a clean end of the stream when
/// `end_allowed`.
fn read_item(data: &mut dyn Read, end_allowed: bool) -> Result<Option<Vec<u8>>> {
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
    let length = u32::from_le_bytes(length);
    if length > SNAPSHOT_ITEM_BYTES_MAX {
        return Err(Error::Decode(format!(
            "a table snapshot item of {length} bytes is over the limit"
        )));
    }
    let mut item = vec![0u8; length as usize];
    data.read_exact(&mut item)?;
    Ok(Some(item))
}

/// A point-in-time view of a table, written out as a snapshot stream.
struct TableSnapshot {
    snapshot: fjall::Snapshot,
}

impl SnapshotSource for TableSnapshot {
    fn write_to(self: Box<Self>, out: &mut dyn Write) -> std::io::Result<()> {
        out.write_all(&[SNAPSHOT_VERSION])?;
        for item in self.snapshot.iter() {
            let (key, value) = item.map_err(std::io::Error::other)?;
            out.write_all(&(key.len() as u32).to_le_bytes())?;
            out.write_all(&key)?;
            out.write_all(&(value.len() as u32).to_le_bytes())?;
            out.write_all(&value)?;
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

    fn read(&self, query: &Bytes) -> Bytes {
        let response = match decode::<Query>(query) {
            Ok(query) => self.query(&query),
            Err(error) => Response {
                revision: self.applied.0,
                result: Err(error.to_string()),
            },
        };
        Bytes::from(encode(&response))
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
        Box::new(TableSnapshot {
            snapshot: self.data.snapshot(),
        })
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn Read) -> std::io::Result<()> {
        self.restore_from(index, data)
            .map_err(|error| std::io::Error::other(error.to_string()))
    }
}
