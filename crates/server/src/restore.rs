//! Restoring a table from a stream of snapshot chunks through its Raft
//! group: `RestoreBegin`, `RestoreChunk`s of at most
//! [`RESTORE_CHUNK_BYTES_MAX`] of items, then `RestoreCommit` (or
//! `RestoreAbort`). A follower cluster installs the leader's snapshot
//! with it; the leader cluster restores a backup with it.
//!
//! Every chunk is checked (offset, length, CRC-32C, revision) before its
//! items are proposed, and the copy replaces the table only at the
//! commit, once the whole stream arrived: a torn or corrupt stream never
//! changes what readers see.

use bytes::Bytes;
use regatta_kv::command::{
    encode, encode_restore_commit_reset, Command, ReplicatedResult, ResponseOp,
};
use regatta_wal::GroupId;

use crate::{Error, Node, Result};

/// Bytes of items in one `RestoreChunk` proposal, at most.
pub const RESTORE_CHUNK_BYTES_MAX: usize = 1 << 20;

/// One chunk of a table's items, as `SnapshotChunk` carries it.
#[derive(Clone, Copy, Debug)]
pub struct Chunk<'a> {
    /// The bytes.
    pub data: &'a [u8],
    /// What the sender says `data.len()` is.
    pub len: u64,
    /// The revision (leader index) the copy holds.
    pub index: u64,
    /// CRC-32C of `data`.
    pub crc32c: u32,
    /// Where `data` starts in the stream.
    pub offset: u64,
    /// Whether this is the final chunk.
    pub last: bool,
}

/// What a finished restore installed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RestoreSummary {
    /// The revision (leader index) the copy held.
    pub index: u64,
    /// Items (keys) restored.
    pub keys: u64,
    /// Bytes of items restored.
    pub bytes: u64,
}

/// A restore under way into one table's group.
pub struct TableRestore<'a> {
    node: &'a Node,
    group: GroupId,
    restore_id: u64,
    /// Received bytes not yet split into items.
    buffer: Vec<u8>,
    items: Vec<(Vec<u8>, Vec<u8>)>,
    items_bytes: usize,
    index: Option<u64>,
    summary: RestoreSummary,
    complete: bool,
    /// The longest key and value accepted, when the items come from a
    /// client (a backup) rather than from the leader cluster.
    limits: Option<ItemLimits>,
}

/// Limits on a restored item, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ItemLimits {
    /// The longest key.
    pub key_bytes_max: usize,
    /// The longest value.
    pub value_bytes_max: usize,
}

impl<'a> TableRestore<'a> {
    /// Begins a restore of `group`, abandoning any unfinished one.
    pub async fn begin(node: &'a Node, group: GroupId) -> Result<TableRestore<'a>> {
        let restore_id = (crate::random_u64() & !regatta_kv::RESET_RESTORE_ID_BIT).max(1);
        TableRestore::begin_with_id(node, group, restore_id).await
    }

    /// Begins the install an operator's reset asked for: its id keeps the
    /// reset's mark, so that an install cut short and begun again may
    /// still take the table back to an older revision.
    pub async fn begin_reset(node: &'a Node, group: GroupId) -> Result<TableRestore<'a>> {
        let restore_id = crate::random_u64() | regatta_kv::RESET_RESTORE_ID_BIT;
        TableRestore::begin_with_id(node, group, restore_id).await
    }

    async fn begin_with_id(
        node: &'a Node,
        group: GroupId,
        restore_id: u64,
    ) -> Result<TableRestore<'a>> {
        if !propose(node, group, &Command::RestoreBegin { restore_id })
            .await?
            .accepted
        {
            return Err(Error::Internal(
                "the table refused to begin a restore".into(),
            ));
        }
        Ok(TableRestore {
            node,
            group,
            restore_id,
            buffer: Vec::new(),
            items: Vec::new(),
            items_bytes: 0,
            index: None,
            summary: RestoreSummary::default(),
            complete: false,
            limits: None,
        })
    }

    /// Refuses items over `limits` (a client's backup must fit the
    /// limits its writes would have had).
    pub fn with_limits(mut self, limits: ItemLimits) -> TableRestore<'a> {
        self.limits = Some(limits);
        self
    }

    /// The revision (leader index) of the copy, once a chunk named it.
    pub fn index(&self) -> Option<u64> {
        self.index
    }

    /// Bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.summary.bytes
    }

    /// Checks `chunk` and proposes the whole items it completes.
    pub async fn push(&mut self, chunk: Chunk<'_>) -> Result<()> {
        let offset = self.summary.bytes;
        if self.complete {
            return Err(Error::InvalidArgument(format!(
                "a snapshot chunk at offset {} after the last one",
                chunk.offset
            )));
        }
        if chunk.offset != offset || chunk.len != chunk.data.len() as u64 {
            return Err(Error::InvalidArgument(format!(
                "a snapshot chunk at offset {} of {} bytes (holding {}) where offset {offset} \
                 was next",
                chunk.offset,
                chunk.len,
                chunk.data.len()
            )));
        }
        if crc32c::crc32c(chunk.data) != chunk.crc32c {
            return Err(Error::InvalidArgument(format!(
                "the snapshot chunk at offset {offset} does not match its checksum"
            )));
        }
        if chunk.index > regatta_raft::INDEX_MAX {
            return Err(Error::InvalidArgument(format!(
                "a snapshot at revision {} (above the largest, {})",
                chunk.index,
                regatta_raft::INDEX_MAX
            )));
        }
        if *self.index.get_or_insert(chunk.index) != chunk.index {
            return Err(Error::InvalidArgument(format!(
                "snapshot chunks of two revisions ({} and {})",
                self.index.unwrap_or_default(),
                chunk.index
            )));
        }
        self.summary.bytes += chunk.len;
        self.buffer.extend_from_slice(chunk.data);
        let mut position = 0;
        while let Some((item, used)) = regatta_kv::split_table_item(&self.buffer[position..])
            .map_err(|error| Error::InvalidArgument(format!("a bad snapshot item: {error}")))?
        {
            position += used;
            if let Some(limits) = self.limits {
                let (key, record) = &item;
                let value_bytes = record.len().saturating_sub(regatta_kv::RECORD_HEADER_BYTES);
                if key.len() > limits.key_bytes_max || value_bytes > limits.value_bytes_max {
                    return Err(Error::TooLarge(format!(
                        "item {} of the backup has a key of {} bytes and a value of \
                         {value_bytes} bytes; this cluster takes keys up to {} and values up \
                         to {} bytes (--kv.key-bytes-max, --kv.value-bytes-max)",
                        self.summary.keys + 1,
                        key.len(),
                        limits.key_bytes_max,
                        limits.value_bytes_max
                    )));
                }
            }
            self.items_bytes += used;
            self.summary.keys += 1;
            self.items.push(item);
            if self.items_bytes >= RESTORE_CHUNK_BYTES_MAX {
                self.flush().await?;
            }
        }
        self.buffer.drain(..position);
        if chunk.last {
            if !self.buffer.is_empty() {
                return Err(Error::InvalidArgument(format!(
                    "the snapshot ends inside an item, {} bytes before its end",
                    self.buffer.len()
                )));
            }
            self.complete = true;
        }
        Ok(())
    }

    async fn flush(&mut self) -> Result<()> {
        let items = std::mem::take(&mut self.items);
        self.items_bytes = 0;
        let step = Command::RestoreChunk {
            restore_id: self.restore_id,
            items,
        };
        if propose(self.node, self.group, &step).await?.accepted {
            Ok(())
        } else {
            Err(Error::Unavailable(
                "another restore of the table replaced this one".into(),
            ))
        }
    }

    /// Replaces the table with the copy, once the last chunk arrived. On
    /// a follower cluster, the table then holds the copy's leader index.
    /// On any failure it proposes `RestoreAbort` (harmless if the commit
    /// applied after all: the abort then finds no restore under way).
    pub async fn commit(self) -> Result<RestoreSummary> {
        self.commit_carrying(None).await
    }

    /// Commits, recording in the same write that this install carried
    /// out the operator's reset `reset_id` (follower tables;
    /// `encode_restore_commit_reset`).
    pub async fn commit_reset(self, reset_id: u64) -> Result<RestoreSummary> {
        self.commit_carrying(Some(reset_id)).await
    }

    async fn commit_carrying(mut self, reset_id: Option<u64>) -> Result<RestoreSummary> {
        let committed = self.try_commit(reset_id).await;
        if committed.is_err() {
            self.abort().await;
        }
        committed
    }

    async fn try_commit(&mut self, reset_id: Option<u64>) -> Result<RestoreSummary> {
        if !self.complete {
            return Err(Error::InvalidArgument(format!(
                "the snapshot stream ended after {} bytes, before its last chunk",
                self.summary.bytes
            )));
        }
        if !self.items.is_empty() {
            self.flush().await?;
        }
        self.summary.index = self.index.unwrap_or(0);
        let step = match reset_id {
            None => encode(&Command::RestoreCommit {
                restore_id: self.restore_id,
                leader_index: self.summary.index,
            }),
            Some(reset_id) => {
                encode_restore_commit_reset(self.restore_id, self.summary.index, reset_id)
            }
        };
        if propose_encoded(self.node, self.group, step).await?.accepted {
            Ok(self.summary)
        } else {
            Err(Error::Unavailable(
                "another restore of the table replaced this one".into(),
            ))
        }
    }

    /// Drops the copy (best effort: a restore left behind is replaced by
    /// the next one, and a follower's puller redoes it).
    pub async fn abort(self) {
        let step = Command::RestoreAbort {
            restore_id: self.restore_id,
        };
        if let Err(error) = propose(self.node, self.group, &step).await {
            tracing::warn!(group = self.group.0, %error, "could not abort a restore");
        }
    }
}

/// Proposes a replication command (a `Replicated` batch or a restore
/// step) and returns the table's verdict.
pub async fn propose(node: &Node, group: GroupId, command: &Command) -> Result<ReplicatedResult> {
    propose_encoded(node, group, encode(command)).await
}

/// [`propose`] of an encoded command.
async fn propose_encoded(
    node: &Node,
    group: GroupId,
    command: Vec<u8>,
) -> Result<ReplicatedResult> {
    match node
        .propose_encoded(group, Bytes::from(command))
        .await?
        .result
    {
        Ok(ResponseOp::Replicated(result)) => Ok(result),
        Ok(other) => Err(Error::Internal(format!(
            "an unexpected result of a replication command: {other:?}"
        ))),
        // A deterministic refusal: the data sent (a backup's items, a
        // leader's snapshot) is not a table's.
        Err(error) => Err(Error::InvalidArgument(format!(
            "the table refused a replication command: {error}"
        ))),
    }
}

/// A chunk to send, owned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OwnedChunk {
    /// The bytes.
    pub data: Vec<u8>,
    /// `data.len()`.
    pub len: u64,
    /// The revision (leader index) the copy holds.
    pub index: u64,
    /// CRC-32C of `data`.
    pub crc32c: u32,
    /// Where `data` starts in the stream.
    pub offset: u64,
    /// Whether this is the final chunk.
    pub last: bool,
}

/// Bytes of a sent snapshot chunk, at most.
pub const SNAPSHOT_CHUNK_BYTES: usize = 1 << 20;

/// Sends `items` (a table's copy at revision `index`) to `sender` as
/// chunks of at most [`SNAPSHOT_CHUNK_BYTES`], each made into a message
/// by `wrap`, from a blocking task; stops when the receiver goes away. A
/// read error ends the stream with an INTERNAL status.
pub fn send_items<T: Send + 'static>(
    index: u64,
    items: regatta_kv::TableItems,
    sender: tokio::sync::mpsc::Sender<std::result::Result<T, tonic::Status>>,
    wrap: fn(OwnedChunk) -> T,
) {
    tokio::task::spawn_blocking(move || {
        let mut writer = ChunkWriter {
            sender,
            wrap,
            index,
            offset: 0,
            buffer: Vec::with_capacity(SNAPSHOT_CHUNK_BYTES),
        };
        match items.write_to(&mut writer) {
            Ok(()) => {
                let _ = writer.send(true);
            }
            Err(error) => {
                let status = tonic::Status::internal(format!("reading the table's copy: {error}"));
                let _ = writer.sender.blocking_send(Err(status));
            }
        }
    });
}

/// Cuts a stream of items into chunks.
struct ChunkWriter<T> {
    sender: tokio::sync::mpsc::Sender<std::result::Result<T, tonic::Status>>,
    wrap: fn(OwnedChunk) -> T,
    index: u64,
    offset: u64,
    buffer: Vec<u8>,
}

impl<T> ChunkWriter<T> {
    fn send(&mut self, last: bool) -> std::io::Result<()> {
        let data = std::mem::take(&mut self.buffer);
        let chunk = OwnedChunk {
            len: data.len() as u64,
            crc32c: crc32c::crc32c(&data),
            offset: self.offset,
            index: self.index,
            last,
            data,
        };
        self.offset += chunk.len;
        self.sender
            .blocking_send(Ok((self.wrap)(chunk)))
            .map_err(|_| std::io::Error::other("the receiver went away"))
    }
}

impl<T> std::io::Write for ChunkWriter<T> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        let room = SNAPSHOT_CHUNK_BYTES - self.buffer.len();
        let taken = room.min(bytes.len());
        self.buffer.extend_from_slice(&bytes[..taken]);
        if self.buffer.len() == SNAPSHOT_CHUNK_BYTES {
            self.send(false)?;
        }
        Ok(taken)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
