//! Typed record bodies (see `docs/wal-format.md`, "Record types and
//! bodies"). Encoding cannot fail; decoding checks every length.

use bytes::Bytes;
use regatta_raft::codec::{
    decode_membership, decode_payload, encode_membership, encode_payload, payload_size_bytes,
};
use regatta_raft::{Entry, HardState, LogIndex, NodeId, SnapshotMeta, Term, INDEX_MAX};

use crate::format::{read_u32, read_u64, RecordType};

/// The body of one record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    /// Contiguous entries; may truncate the group's log where they start.
    Entries(Vec<Entry>),
    /// The group's hard state.
    HardState(HardState),
    /// A snapshot exists at the meta's index; `installed` when it came from
    /// a leader and replaces the log.
    Snapshot {
        /// What the snapshot stands for.
        meta: SnapshotMeta,
        /// True when it replaces the log.
        installed: bool,
    },
    /// Entries up to `index` are discarded.
    Compaction {
        /// The last discarded index.
        index: LogIndex,
        /// Its term.
        term: Term,
    },
    /// The group is gone.
    GroupRemoved,
    /// The group's live state was rewritten starting at this position;
    /// every earlier record of the group is dead.
    Rewritten {
        /// Segment of the first rewritten record.
        segment: u64,
        /// Offset of the first rewritten record.
        offset: u64,
    },
}

impl Record {
    /// The record's type byte.
    pub fn kind(&self) -> RecordType {
        match self {
            Record::Entries(_) => RecordType::Entries,
            Record::HardState(_) => RecordType::HardState,
            Record::Snapshot { .. } => RecordType::Snapshot,
            Record::Compaction { .. } => RecordType::Compaction,
            Record::GroupRemoved => RecordType::GroupRemoved,
            Record::Rewritten { .. } => RecordType::Rewritten,
        }
    }

    /// Appends the body's encoding to `out`.
    pub fn encode_body(&self, out: &mut Vec<u8>) {
        match self {
            Record::Entries(entries) => encode_entries(entries, out),
            Record::HardState(state) => {
                out.extend_from_slice(&state.term.0.to_le_bytes());
                out.extend_from_slice(&state.vote.map(|v| v.0).unwrap_or(0).to_le_bytes());
                out.extend_from_slice(&state.commit.0.to_le_bytes());
            }
            Record::Snapshot { meta, installed } => {
                out.extend_from_slice(&meta.index.0.to_le_bytes());
                out.extend_from_slice(&meta.term.0.to_le_bytes());
                out.push(u8::from(*installed));
                encode_membership(&meta.membership, out);
            }
            Record::Compaction { index, term } => {
                out.extend_from_slice(&index.0.to_le_bytes());
                out.extend_from_slice(&term.0.to_le_bytes());
            }
            Record::GroupRemoved => {}
            Record::Rewritten { segment, offset } => {
                out.extend_from_slice(&segment.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
            }
        }
    }

    /// Decodes a body of the given type.
    pub fn decode(kind: RecordType, body: &Bytes) -> Result<Record, String> {
        match kind {
            RecordType::Entries => decode_entries(body).map(Record::Entries),
            RecordType::HardState => {
                expect_len(body, 24)?;
                let vote = read_u64(body, 8);
                Ok(Record::HardState(HardState {
                    term: Term(read_u64(body, 0)),
                    vote: (vote != 0).then_some(NodeId(vote)),
                    commit: LogIndex(read_u64(body, 16)),
                }))
            }
            RecordType::Snapshot => {
                if body.len() < 17 {
                    return Err(format!("snapshot marker of {} bytes", body.len()));
                }
                let installed = match body[16] {
                    0 => false,
                    1 => true,
                    other => return Err(format!("snapshot flags {other}")),
                };
                let membership = decode_membership(&body[17..]).map_err(|e| e.to_string())?;
                let meta = SnapshotMeta {
                    index: bounded_index(read_u64(body, 0), "snapshot")?,
                    term: Term(read_u64(body, 8)),
                    membership,
                };
                Ok(Record::Snapshot { meta, installed })
            }
            RecordType::Compaction => {
                expect_len(body, 16)?;
                Ok(Record::Compaction {
                    index: bounded_index(read_u64(body, 0), "compaction")?,
                    term: Term(read_u64(body, 8)),
                })
            }
            RecordType::GroupRemoved => {
                expect_len(body, 0)?;
                Ok(Record::GroupRemoved)
            }
            RecordType::Rewritten => {
                expect_len(body, 16)?;
                Ok(Record::Rewritten {
                    segment: read_u64(body, 0),
                    offset: read_u64(body, 8),
                })
            }
        }
    }
}

/// `index`, unless it is past [`INDEX_MAX`] (only a damaged or crafted
/// record, with a valid checksum, can name one).
fn bounded_index(index: u64, what: &str) -> Result<LogIndex, String> {
    if index > INDEX_MAX {
        return Err(format!("{what} index {index} is past the largest index"));
    }
    Ok(LogIndex(index))
}

fn expect_len(body: &[u8], expected: usize) -> Result<(), String> {
    if body.len() != expected {
        return Err(format!("body of {} bytes, expected {expected}", body.len()));
    }
    Ok(())
}

/// The encoded size of an entries body.
pub fn entries_body_bytes(entries: &[Entry]) -> usize {
    12 + entries
        .iter()
        .map(|entry| 12 + payload_size_bytes(&entry.payload))
        .sum::<usize>()
}

fn encode_entries(entries: &[Entry], out: &mut Vec<u8>) {
    let first = entries.first().map(|entry| entry.index.0).unwrap_or(0);
    out.reserve(entries_body_bytes(entries));
    out.extend_from_slice(&first.to_le_bytes());
    out.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for entry in entries {
        out.extend_from_slice(&entry.term.0.to_le_bytes());
        out.extend_from_slice(&(payload_size_bytes(&entry.payload) as u32).to_le_bytes());
        encode_payload(&entry.payload, out);
    }
}

fn decode_entries(body: &Bytes) -> Result<Vec<Entry>, String> {
    if body.len() < 12 {
        return Err(format!("entries body of {} bytes", body.len()));
    }
    let first = read_u64(body, 0);
    let count = read_u32(body, 8) as usize;
    if count == 0 || first == 0 {
        return Err("entries record with no entries or index 0".into());
    }
    // Each entry takes at least 13 bytes: a count beyond that is a lie.
    if count > (body.len() - 12) / 13 {
        return Err(format!("entry count {count} does not fit the body"));
    }
    bounded_index(first, "first entry")?;
    bounded_index(first + count as u64 - 1, "last entry")?;
    let mut entries = Vec::with_capacity(count);
    let mut offset = 12usize;
    for position in 0..count {
        if body.len() - offset < 12 {
            return Err(format!("entry {position} truncated"));
        }
        let term = Term(read_u64(body, offset));
        let length = read_u32(body, offset + 8) as usize;
        offset += 12;
        if body.len() - offset < length {
            return Err(format!("entry {position} payload truncated"));
        }
        let payload =
            decode_payload(&body.slice(offset..offset + length)).map_err(|e| e.to_string())?;
        offset += length;
        entries.push(Entry {
            term,
            index: LogIndex(first + position as u64),
            payload,
        });
    }
    if offset != body.len() {
        return Err(format!(
            "{} trailing bytes after the entries",
            body.len() - offset
        ));
    }
    Ok(entries)
}

#[cfg(test)]
mod tests {
    use super::*;
    use regatta_raft::{EntryPayload, Membership};

    fn round_trip(record: Record) {
        let mut body = Vec::new();
        record.encode_body(&mut body);
        if let Record::Entries(entries) = &record {
            assert_eq!(body.len(), entries_body_bytes(entries));
        }
        assert_eq!(
            Record::decode(record.kind(), &Bytes::from(body)),
            Ok(record)
        );
    }

    /// Every record type survives encoding and decoding.
    #[test]
    fn every_record_type_round_trips() {
        round_trip(Record::Entries(vec![
            Entry {
                term: Term(3),
                index: LogIndex(10),
                payload: EntryPayload::Normal(Bytes::from_static(b"hello")),
            },
            Entry {
                term: Term(4),
                index: LogIndex(11),
                payload: EntryPayload::Empty,
            },
        ]));
        round_trip(Record::HardState(HardState {
            term: Term(5),
            vote: Some(NodeId(2)),
            commit: LogIndex(9),
        }));
        round_trip(Record::HardState(HardState::default()));
        for installed in [false, true] {
            round_trip(Record::Snapshot {
                meta: SnapshotMeta {
                    index: LogIndex(100),
                    term: Term(7),
                    membership: Membership::with_voters([NodeId(1), NodeId(2)]),
                },
                installed,
            });
        }
        round_trip(Record::Compaction {
            index: LogIndex(50),
            term: Term(6),
        });
        round_trip(Record::GroupRemoved);
        round_trip(Record::Rewritten {
            segment: 9,
            offset: 4096,
        });
    }

    /// Indexes past `INDEX_MAX` are damage, not entries: replay would
    /// overflow on them.
    #[test]
    fn indexes_past_the_largest_are_errors() {
        let entries = Record::Entries(vec![Entry {
            term: Term(1),
            index: LogIndex(INDEX_MAX),
            payload: EntryPayload::Empty,
        }]);
        let mut body = Vec::new();
        entries.encode_body(&mut body);
        assert!(Record::decode(RecordType::Entries, &Bytes::from(body.clone())).is_ok());
        body[..8].copy_from_slice(&(INDEX_MAX + 1).to_le_bytes());
        let error = Record::decode(RecordType::Entries, &Bytes::from(body)).expect_err("too far");
        assert!(error.contains("past the largest index"), "{error}");
        let compaction = Record::Compaction {
            index: LogIndex(u64::MAX),
            term: Term(1),
        };
        let mut body = Vec::new();
        compaction.encode_body(&mut body);
        assert!(Record::decode(RecordType::Compaction, &Bytes::from(body)).is_err());
        let snapshot = Record::Snapshot {
            meta: SnapshotMeta {
                index: LogIndex(u64::MAX),
                term: Term(1),
                membership: Membership::with_voters([NodeId(1)]),
            },
            installed: false,
        };
        let mut body = Vec::new();
        snapshot.encode_body(&mut body);
        assert!(Record::decode(RecordType::Snapshot, &Bytes::from(body)).is_err());
    }

    #[test]
    fn lying_lengths_are_errors() {
        let mut body = Vec::new();
        Record::Entries(vec![Entry {
            term: Term(1),
            index: LogIndex(1),
            payload: EntryPayload::Empty,
        }])
        .encode_body(&mut body);
        body[8] = 200; // entry count
        assert!(Record::decode(RecordType::Entries, &Bytes::from(body)).is_err());
        assert!(Record::decode(RecordType::HardState, &Bytes::from_static(b"short")).is_err());
    }
}
