//! The commands a table applies and the queries it answers, with their
//! results. They travel inside Raft entries and read queries, encoded as a
//! format version byte followed by postcard (`docs/kv-format.md`). The
//! semantics follow etcd's v3 KV API; the server maps both wire APIs onto
//! these types.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The encoding's version byte.
pub const FORMAT_VERSION: u8 = 1;

/// One key's state.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value; empty when only keys were asked for.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// The revision (table index) that created the key.
    pub create_revision: u64,
    /// The revision of its last change.
    pub mod_revision: u64,
    /// Changes since creation, from 1.
    pub version: u64,
}

/// Which keys: `key` alone when `range_end` is empty; every key from `key`
/// on when `range_end` is `[0]`; otherwise `[key, range_end)`. A `key` of
/// `[0]` with a `range_end` of `[0]` means every key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// The first key.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The end of the range, exclusive (see above).
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// A read of a range.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeRequest {
    /// The keys.
    pub range: KeyRange,
    /// At most this many keys; 0 for no limit.
    pub limit: u64,
    /// Leave values out.
    pub keys_only: bool,
    /// Only count.
    pub count_only: bool,
    /// Stop adding keys once the response holds this many bytes of keys
    /// and values (at least one key is returned); 0 for no limit.
    pub bytes_max: u64,
}

/// The keys found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeResult {
    /// The keys, in key order.
    pub kvs: Vec<KeyValue>,
    /// Keys in the range, regardless of the limit.
    pub count: u64,
    /// Whether keys were left out by `limit` or `bytes_max`.
    pub more: bool,
}

/// Sets a key.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutRequest {
    /// The key; never empty.
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    /// The value.
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    /// Return the previous state.
    pub prev_kv: bool,
}

/// The outcome of a put.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PutResult {
    /// The previous state, when asked for and the key existed.
    pub prev_kv: Option<KeyValue>,
}

/// Deletes a range of keys.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeRequest {
    /// The keys.
    pub range: KeyRange,
    /// Return the deleted keys.
    pub prev_kv: bool,
}

/// The outcome of a delete.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeleteRangeResult {
    /// How many keys were deleted.
    pub deleted: u64,
    /// The deleted keys, when asked for.
    pub prev_kvs: Vec<KeyValue>,
}

/// What a compare looks at, and the operand.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value; a missing key never matches.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The version; a missing key has version 0.
    Version(i64),
    /// The create revision; 0 for a missing key.
    CreateRevision(i64),
    /// The mod revision; 0 for a missing key.
    ModRevision(i64),
}

/// How the key's side compares with the operand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    /// Equal.
    Equal,
    /// Greater than the operand.
    Greater,
    /// Less than the operand.
    Less,
    /// Not equal.
    NotEqual,
}

/// One condition of a transaction; over a range, every key must hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    /// The keys.
    pub range: KeyRange,
    /// What to compare.
    pub target: CompareTarget,
    /// The relation that must hold.
    pub result: CompareResult,
}

/// One operation of a transaction branch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    /// A read.
    Range(RangeRequest),
    /// A put.
    Put(PutRequest),
    /// A delete.
    DeleteRange(DeleteRangeRequest),
    /// A nested transaction.
    Txn(#[serde(with = "nested")] TxnRequest),
}

/// The result of one operation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    /// Of a read.
    Range(RangeResult),
    /// Of a put.
    Put(PutResult),
    /// Of a delete.
    DeleteRange(DeleteRangeResult),
    /// Of a nested transaction.
    Txn(#[serde(with = "nested")] TxnResult),
    /// Of a replicated batch or a restore step, on a follower table.
    Replicated(ReplicatedResult),
}

/// Compares, then one branch, atomically.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnRequest {
    /// Conditions; all must hold for `success` to run.
    pub compare: Vec<Compare>,
    /// Run when every compare holds.
    pub success: Vec<RequestOp>,
    /// Run otherwise.
    pub failure: Vec<RequestOp>,
}

impl TxnRequest {
    /// Whether no branch writes, so that it can be served as a read.
    pub fn is_read_only(&self) -> bool {
        self.success.iter().chain(&self.failure).all(|op| match op {
            RequestOp::Range(_) => true,
            RequestOp::Txn(txn) => txn.is_read_only(),
            RequestOp::Put(_) | RequestOp::DeleteRange(_) => false,
        })
    }
}

/// The outcome of a transaction.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResult {
    /// Whether the compares held.
    pub succeeded: bool,
    /// One result per operation of the branch that ran.
    pub responses: Vec<ResponseOp>,
}

/// A write, proposed through Raft.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Sets a key.
    Put(PutRequest),
    /// Deletes keys.
    DeleteRange(DeleteRangeRequest),
    /// A transaction.
    Txn(TxnRequest),
    /// Follower tables only: commands of the leader cluster's table, in
    /// its log order (`docs/decisions/0004-replication-protocol.md`).
    Replicated(ReplicatedBatch),
    /// Start filling a fresh copy of the table (from a leader snapshot on
    /// a follower cluster, from a backup on the leader cluster),
    /// abandoning any unfinished one.
    RestoreBegin {
        /// Names this restore; later steps must carry it.
        restore_id: u64,
    },
    /// Keys of the snapshot being restored.
    RestoreChunk {
        /// The restore, as begun.
        restore_id: u64,
        /// Keys and their stored records (the table snapshot's items).
        #[serde(with = "byte_pairs")]
        items: Vec<(Vec<u8>, Vec<u8>)>,
    },
    /// The copy is complete and replaces the table atomically. On a
    /// follower cluster it holds the leader's table at `leader_index`; a
    /// leader-cluster table keeps its revision (its applied index) and
    /// ignores `leader_index`.
    RestoreCommit {
        /// The restore, as begun.
        restore_id: u64,
        /// The leader index the snapshot holds.
        leader_index: u64,
    },
    /// Drops the copy of the restore under way, if it is `restore_id`;
    /// the table keeps its data.
    RestoreAbort {
        /// The restore, as begun.
        restore_id: u64,
    },
}

/// The postcard variant tags of the restore steps (their positions):
/// `RestoreBegin`, `RestoreChunk`, `RestoreCommit`, `RestoreAbort`.
const RESTORE_BEGIN_TAG: u8 = 4;
const RESTORE_CHUNK_TAG: u8 = 5;
const RESTORE_COMMIT_TAG: u8 = 6;
const RESTORE_ABORT_TAG: u8 = 7;

/// Whether an encoded command is a restore step other than the commit
/// (`RestoreBegin`, `RestoreChunk`, `RestoreAbort`), read from its tag:
/// the leader's log stream sends these to follower clusters as empty
/// commands, since only the commit's outcome (a snapshot) matters there.
pub fn is_restore_preparation(bytes: &[u8]) -> bool {
    matches!(
        bytes,
        [
            FORMAT_VERSION,
            RESTORE_BEGIN_TAG | RESTORE_CHUNK_TAG | RESTORE_ABORT_TAG,
            ..
        ]
    )
}

/// Whether an encoded command is a `RestoreCommit`, read from its tag
/// without decoding the rest: the leader's log stream looks at every
/// entry with it.
pub fn is_restore_commit(bytes: &[u8]) -> bool {
    matches!(bytes, [FORMAT_VERSION, RESTORE_COMMIT_TAG, ..])
}

/// Bytes after an encoded `RestoreCommit` that name the operator's reset
/// its install carried out: the reset's restore id, u64 LE.
const RESET_CARRIED_BYTES: usize = 8;

/// A `RestoreCommit` of an install that carried out the operator's reset
/// `reset_id` (follower tables): the encoded command followed by
/// `reset_id` (u64 LE). The table records the reset in the commit's own
/// write (`docs/kv-format.md`). A version that predates it decodes the
/// `RestoreCommit` and ignores the rest, so a follower cluster in a
/// rolling upgrade installs the same copy on every node.
pub fn encode_restore_commit_reset(restore_id: u64, leader_index: u64, reset_id: u64) -> Vec<u8> {
    let mut bytes = encode(&Command::RestoreCommit {
        restore_id,
        leader_index,
    });
    bytes.extend_from_slice(&reset_id.to_le_bytes());
    bytes
}

/// The reset an encoded `RestoreCommit` says its install carried out
/// ([`encode_restore_commit_reset`]); `None` for any other command.
pub fn restore_commit_reset_id(bytes: &[u8]) -> Option<u64> {
    if !is_restore_commit(bytes) {
        return None;
    }
    match postcard::take_from_bytes::<Command>(&bytes[1..]) {
        Ok((Command::RestoreCommit { .. }, rest)) if rest.len() == RESET_CARRIED_BYTES => {
            let mut id = [0u8; RESET_CARRIED_BYTES];
            id.copy_from_slice(rest);
            Some(u64::from_le_bytes(id))
        }
        _ => None,
    }
}

/// A run of the leader's commands, the first at `first_leader_index` and
/// each next one at the next index. An empty command is an entry without
/// one (a no-op); it only advances the leader index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedBatch {
    /// The leader index of `commands[0]`.
    pub first_leader_index: u64,
    /// The commands, encoded as in the leader's log.
    #[serde(with = "byte_lists")]
    pub commands: Vec<Vec<u8>>,
}

/// What a follower table did with a replicated batch or restore step.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicatedResult {
    /// Whether it applied: a batch that leaves a gap after the table's
    /// leader index, or a restore step of another restore, does not.
    pub accepted: bool,
    /// The table's leader index after the command.
    pub leader_index: u64,
}

/// A read, served from the local state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Query {
    /// A range read.
    Range(RangeRequest),
    /// A read-only transaction.
    Txn(TxnRequest),
    /// A range read for one page of a longer read (`IterateRange` after
    /// its first page): it stops at the first key past its limit or byte
    /// cap instead of counting the rest of the range, so a read of N keys
    /// in P pages scans about 2N keys (the first page, a `Range`, counts
    /// them all), not about N × P / 2. `count` is the keys
    /// returned; `more` says whether a key follows them.
    RangePage(RangeRequest),
}

/// A command's or query's answer, with the table's revision (its applied
/// index) when it was served.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The table's revision.
    pub revision: u64,
    /// The result, or why the request failed (deterministically, so every
    /// replica fails it the same way).
    pub result: std::result::Result<ResponseOp, String>,
}

/// Byte strings are encoded as one length and the bytes (serde's bytes,
/// which postcard writes exactly as it writes a sequence of `u8`), so that
/// encoding and decoding copy them whole rather than byte by byte. These
/// two modules do the same for the lists of byte strings.
mod byte_lists {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    pub fn serialize<S: Serializer>(items: &[Vec<u8>], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(items.iter().map(|item| Bytes::new(item)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<Vec<u8>>, D::Error> {
        let items = Vec::<ByteBuf>::deserialize(deserializer)?;
        Ok(items.into_iter().map(ByteBuf::into_vec).collect())
    }
}

mod byte_pairs {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer>(items: &Pairs, serializer: S) -> Result<S::Ok, S::Error> {
        let pairs = items
            .iter()
            .map(|(key, value)| (Bytes::new(key), Bytes::new(value)));
        serializer.collect_seq(pairs)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        let items = Vec::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
        let pairs = items
            .into_iter()
            .map(|(key, value)| (key.into_vec(), value.into_vec()));
        Ok(pairs.collect())
    }
}

/// Nested transactions (and their results) decode at most this many
/// levels below the outermost one. The APIs refuse more than 8
/// (`regatta_server::validate::TXN_DEPTH_MAX`); this bound keeps a crafted
/// message from exhausting the decoding thread's stack.
pub const TXN_NESTING_DECODE_MAX: usize = 64;

thread_local! {
    /// While decoding on this thread: the nested transactions open, and
    /// whether one went past `TXN_NESTING_DECODE_MAX`.
    static TXN_NESTING: std::cell::Cell<(usize, bool)> = const { std::cell::Cell::new((0, false)) };
}

/// A nested transaction's encoding is its plain encoding; decoding counts
/// the levels and refuses one past `TXN_NESTING_DECODE_MAX` before it
/// recurses.
mod nested {
    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{TXN_NESTING, TXN_NESTING_DECODE_MAX};

    pub fn serialize<S: Serializer, T: Serialize>(
        value: &T,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        value.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
        deserializer: D,
    ) -> Result<T, D::Error> {
        /// Closes the level on every way out, errors included.
        struct Level;
        impl Drop for Level {
            fn drop(&mut self) {
                TXN_NESTING.with(|nesting| {
                    let (depth, too_deep) = nesting.get();
                    nesting.set((depth.saturating_sub(1), too_deep));
                });
            }
        }
        let depth = TXN_NESTING.with(|nesting| {
            let (depth, too_deep) = nesting.get();
            nesting.set((depth + 1, too_deep));
            depth + 1
        });
        let _level = Level;
        if depth > TXN_NESTING_DECODE_MAX {
            TXN_NESTING.with(|nesting| nesting.set((nesting.get().0, true)));
            return Err(D::Error::custom("transactions nest too deep"));
        }
        T::deserialize(deserializer)
    }
}

/// Encodes a value: the version byte, then postcard.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Sized first, so that the buffer is allocated once.
    let size = postcard::experimental::serialized_size(value).unwrap_or(0);
    let mut out = Vec::with_capacity(1 + size);
    out.push(FORMAT_VERSION);
    // Encoding into a Vec fails only if serde itself fails, which these
    // plain types never do.
    match postcard::to_extend(value, out) {
        Ok(out) => out,
        Err(error) => panic!("postcard cannot encode a kv type: {error}"),
    }
}

/// Decodes what `encode` produced; bad input is an error, never a panic.
pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, rest)) => {
            TXN_NESTING.with(|nesting| nesting.set((0, false)));
            let decoded = postcard::from_bytes(rest);
            let (_, too_deep) = TXN_NESTING.with(|nesting| nesting.replace((0, false)));
            decoded.map_err(|error| {
                if too_deep {
                    Error::Decode(format!(
                        "kv request or result: transactions nest more than {TXN_NESTING_DECODE_MAX} deep"
                    ))
                } else {
                    Error::Decode(format!("kv request or result: {error}"))
                }
            })
        }
        Some((version, _)) => Err(Error::Decode(format!(
            "kv format version {version} is not known (expected {FORMAT_VERSION})"
        ))),
        None => Err(Error::Decode("an empty kv request or result".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An encoded `Command::Txn` whose success branch nests `levels`
    /// transactions, written byte by byte (building it as a value would
    /// itself recurse that deep).
    fn nested_txn_bytes(levels: usize) -> Vec<u8> {
        const COMMAND_TXN_TAG: u8 = 2;
        const REQUEST_OP_TXN_TAG: u8 = 3;
        let mut bytes = vec![FORMAT_VERSION, COMMAND_TXN_TAG];
        for _ in 0..levels {
            // No compares, one success operation: a transaction.
            bytes.extend_from_slice(&[0, 1, REQUEST_OP_TXN_TAG]);
        }
        // The innermost transaction is empty.
        bytes.extend_from_slice(&[0, 0, 0]);
        // Each enclosing one has an empty failure branch.
        bytes.extend(std::iter::repeat_n(0, levels));
        bytes
    }

    fn nesting(command: &Command) -> usize {
        let Command::Txn(mut txn) = command.clone() else {
            panic!("not a transaction: {command:?}");
        };
        let mut levels = 0;
        while let Some(RequestOp::Txn(inner)) = txn.success.pop() {
            levels += 1;
            txn = inner;
        }
        levels
    }

    #[test]
    fn nested_transactions_decode_up_to_the_bound_and_deeper_ones_fail_cleanly() {
        let at_bound =
            decode::<Command>(&nested_txn_bytes(TXN_NESTING_DECODE_MAX)).expect("decode");
        assert_eq!(nesting(&at_bound), TXN_NESTING_DECODE_MAX);
        // Encoding is unchanged by the bound: the value re-encodes to the
        // same bytes.
        assert_eq!(encode(&at_bound), nested_txn_bytes(TXN_NESTING_DECODE_MAX));
        let error = decode::<Command>(&nested_txn_bytes(TXN_NESTING_DECODE_MAX + 1))
            .expect_err("one level too deep");
        assert!(
            error.to_string().contains("nest more than 64 deep"),
            "{error}"
        );
        // Deep enough to overflow any thread's stack if decoding recursed
        // into it: refused at the bound instead.
        let error = decode::<Command>(&nested_txn_bytes(500_000)).expect_err("far too deep");
        assert!(error.to_string().contains("nest more than"), "{error}");
        // The count starts afresh on the next decode.
        decode::<Command>(&nested_txn_bytes(3)).expect("a shallow one after a refusal");
    }

    /// The types as they were encoded before byte strings went through
    /// `serde_bytes`: sequences of `u8`. Data on disk and in flight was
    /// written that way, so both encodings must be the same bytes.
    mod before {
        use serde::Serialize;

        #[derive(Serialize)]
        pub struct KeyRange {
            pub key: Vec<u8>,
            pub range_end: Vec<u8>,
        }

        #[derive(Serialize)]
        pub struct PutRequest {
            pub key: Vec<u8>,
            pub value: Vec<u8>,
            pub prev_kv: bool,
        }

        #[derive(Serialize)]
        pub struct KeyValue {
            pub key: Vec<u8>,
            pub value: Vec<u8>,
            pub create_revision: u64,
            pub mod_revision: u64,
            pub version: u64,
        }

        #[derive(Serialize)]
        pub enum CompareTarget {
            Value(Vec<u8>),
        }

        #[derive(Serialize)]
        pub enum Command {
            Put(PutRequest),
            DeleteRange,
            Txn,
            Replicated {
                first_leader_index: u64,
                commands: Vec<Vec<u8>>,
            },
            RestoreBegin,
            RestoreChunk {
                restore_id: u64,
                items: Vec<(Vec<u8>, Vec<u8>)>,
            },
        }
    }

    #[test]
    fn byte_strings_encode_as_they_did_as_sequences_of_u8() {
        // Lengths around postcard's one-byte varint limit (127).
        for length in [0usize, 1, 127, 128, 300, 20_000] {
            let key: Vec<u8> = (0..length).map(|i| (i * 7) as u8).collect();
            let value: Vec<u8> = (0..length + 3).map(|i| (i * 13) as u8).collect();
            let range = KeyRange {
                key: key.clone(),
                range_end: value.clone(),
            };
            let old_range = before::KeyRange {
                key: key.clone(),
                range_end: value.clone(),
            };
            assert_eq!(encode(&range), encode(&old_range));
            let put = Command::Put(PutRequest {
                key: key.clone(),
                value: value.clone(),
                prev_kv: true,
            });
            let old_put = before::Command::Put(before::PutRequest {
                key: key.clone(),
                value: value.clone(),
                prev_kv: true,
            });
            assert_eq!(encode(&put), encode(&old_put));
            assert_eq!(decode::<Command>(&encode(&old_put)).ok(), Some(put));
            let kv = KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: 3,
                mod_revision: 300,
                version: 2,
            };
            let old_kv = before::KeyValue {
                key: key.clone(),
                value: value.clone(),
                create_revision: 3,
                mod_revision: 300,
                version: 2,
            };
            assert_eq!(encode(&kv), encode(&old_kv));
            let compare = CompareTarget::Value(value.clone());
            let old_compare = before::CompareTarget::Value(value.clone());
            assert_eq!(encode(&compare), encode(&old_compare));
            let lists = vec![key.clone(), Vec::new(), value.clone()];
            let replicated = Command::Replicated(ReplicatedBatch {
                first_leader_index: 9,
                commands: lists.clone(),
            });
            let old_replicated = before::Command::Replicated {
                first_leader_index: 9,
                commands: lists,
            };
            assert_eq!(encode(&replicated), encode(&old_replicated));
            let _ = (before::Command::DeleteRange, before::Command::Txn);
            let _ = before::Command::RestoreBegin;
            let pairs = vec![(key.clone(), value.clone()), (Vec::new(), key.clone())];
            let chunk = Command::RestoreChunk {
                restore_id: 5,
                items: pairs.clone(),
            };
            let old_chunk = before::Command::RestoreChunk {
                restore_id: 5,
                items: pairs,
            };
            assert_eq!(encode(&chunk), encode(&old_chunk));
            assert_eq!(decode::<Command>(&encode(&old_chunk)).ok(), Some(chunk));
        }
    }

    #[test]
    fn the_restore_commit_tag_is_the_variant_postcard_writes() {
        let commands = [
            Command::Put(PutRequest::default()),
            Command::RestoreBegin { restore_id: 300 },
            Command::RestoreChunk {
                restore_id: 7,
                items: vec![(vec![6], vec![6])],
            },
            Command::RestoreAbort { restore_id: 6 },
            Command::RestoreCommit {
                restore_id: 1 << 40,
                leader_index: 6,
            },
        ];
        for command in commands {
            let commit = matches!(command, Command::RestoreCommit { .. });
            let preparation = matches!(
                command,
                Command::RestoreBegin { .. }
                    | Command::RestoreChunk { .. }
                    | Command::RestoreAbort { .. }
            );
            assert_eq!(is_restore_commit(&encode(&command)), commit, "{command:?}");
            assert_eq!(
                is_restore_preparation(&encode(&command)),
                preparation,
                "{command:?}"
            );
        }
        assert!(!is_restore_commit(&[]));
        assert!(!is_restore_commit(&[FORMAT_VERSION]));
    }

    #[test]
    fn a_commit_that_carried_out_a_reset_reads_as_a_commit_to_older_decoders() {
        let reset_id = (1 << 63) | 5;
        let bytes = encode_restore_commit_reset(1 << 62, 9, reset_id);
        assert!(is_restore_commit(&bytes));
        assert_eq!(restore_commit_reset_id(&bytes), Some(reset_id));
        // What a version without the reset carried does with it.
        assert_eq!(
            decode::<Command>(&bytes).ok(),
            Some(Command::RestoreCommit {
                restore_id: 1 << 62,
                leader_index: 9,
            })
        );
        let plain = encode(&Command::RestoreCommit {
            restore_id: 1 << 62,
            leader_index: 9,
        });
        assert_eq!(restore_commit_reset_id(&plain), None);
        assert_eq!(&bytes[..plain.len()], plain.as_slice());
        // Only a commit carries one.
        let mut begin = encode(&Command::RestoreBegin { restore_id: 3 });
        begin.extend_from_slice(&reset_id.to_le_bytes());
        assert_eq!(restore_commit_reset_id(&begin), None);
        assert_eq!(restore_commit_reset_id(&bytes[..bytes.len() - 1]), None);
    }

    #[test]
    fn commands_round_trip_and_bad_bytes_are_errors() {
        let command = Command::Txn(TxnRequest {
            compare: vec![Compare {
                range: KeyRange {
                    key: b"a".to_vec(),
                    range_end: Vec::new(),
                },
                target: CompareTarget::ModRevision(7),
                result: CompareResult::Less,
            }],
            success: vec![RequestOp::Put(PutRequest {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
                prev_kv: true,
            })],
            failure: vec![RequestOp::Range(RangeRequest::default())],
        });
        let bytes = encode(&command);
        assert_eq!(bytes[0], FORMAT_VERSION);
        assert_eq!(decode::<Command>(&bytes).expect("decode"), command);
        for length in 0..bytes.len() {
            assert!(decode::<Command>(&bytes[..length]).is_err());
        }
        let mut other_version = bytes.clone();
        other_version[0] = 9;
        assert!(decode::<Command>(&other_version).is_err());
        for position in 1..bytes.len() {
            let mut changed = bytes.clone();
            changed[position] = 0xFF;
            let _ = decode::<Command>(&changed);
        }
    }
}
