//! The encoding of Raft messages between nodes: the *message batch* body
//! of a transport frame (`docs/transport-format.md`). Decoding checks every
//! length against the bytes left before allocating and never panics.

use bytes::Bytes;
use regatta_raft::codec::{
    decode_membership, decode_payload, encode_membership, encode_payload, payload_size_bytes,
};
use regatta_raft::{
    Entry, EntryPayload, LogIndex, Message, MessageBody, NodeId, ReadId, Refusal, RejectHint,
    RequestId, SnapshotMeta, Term,
};
use regatta_wal::GroupId;

/// Why a batch could not be decoded; the connection carrying it is closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid message batch at byte {offset}: {reason}")]
pub struct WireError {
    /// Where decoding stopped.
    pub offset: usize,
    /// What was wrong.
    pub reason: String,
}

const KIND_APPEND: u8 = 1;
const KIND_APPEND_RESPONSE: u8 = 2;
const KIND_VOTE: u8 = 3;
const KIND_VOTE_RESPONSE: u8 = 4;
const KIND_HEARTBEAT: u8 = 5;
const KIND_HEARTBEAT_RESPONSE: u8 = 6;
const KIND_SNAPSHOT: u8 = 7;
/// The largest term a message may carry.
pub const TERM_MAX: u64 = u64::MAX / 2;
const KIND_TIMEOUT_NOW: u8 = 8;
const KIND_READ_INDEX: u8 = 9;
const KIND_READ_INDEX_RESPONSE: u8 = 10;
const KIND_PROPOSE: u8 = 11;
const KIND_TRANSFER_LEADER: u8 = 12;
/// An append answered only on a mismatch (`wants_ack` false); the same
/// fields as `KIND_APPEND`.
const KIND_APPEND_QUIET: u8 = 13;
/// The leader's refusal of forwarded proposals; transport format version
/// 2 and later (`docs/transport-format.md`).
pub const KIND_PROPOSE_REFUSED: u8 = 14;
/// The refusal of forwarded reads; transport format version 3 and later.
pub const KIND_READ_REFUSED: u8 = 15;

const REFUSAL_NOT_LEADER: u8 = 1;
const REFUSAL_TRANSFER_IN_PROGRESS: u8 = 2;
const REFUSAL_OVERLOADED: u8 = 3;
const REFUSAL_INVALID: u8 = 4;
/// The longest reason a refusal carries, in bytes; a longer one is cut
/// (at a character boundary) when encoded and refused when decoded.
pub const REFUSAL_REASON_BYTES_MAX: usize = 1024;

/// Whether a peer speaking transport format `version` can decode
/// `message` (older peers close the connection on a kind they do not
/// know, so such messages are dropped before they reach one).
pub fn peer_understands(version: u32, message: &Message) -> bool {
    match message.body {
        MessageBody::ProposeRefused { .. } => version >= 2,
        MessageBody::ReadRefused { .. } => version >= 3,
        _ => true,
    }
}

/// Encodes a batch of messages, each addressed to a group.
pub fn encode_batch(messages: &[(GroupId, Message)], out: &mut Vec<u8>) {
    out.extend_from_slice(&(messages.len() as u32).to_le_bytes());
    for (group, message) in messages {
        encode_message(*group, message, out);
    }
}

/// Encodes one message of a group.
pub fn encode_message(group: GroupId, message: &Message, out: &mut Vec<u8>) {
    for value in [group.0, message.from.0, message.to.0, message.term.0] {
        put_u64(out, value);
    }
    match &message.body {
        MessageBody::Append {
            prev_index,
            prev_term,
            entries,
            commit,
            wants_ack,
        } => encode_append((*prev_index, *prev_term), entries, *commit, *wants_ack, out),
        MessageBody::AppendResponse { index, reject } => {
            out.push(KIND_APPEND_RESPONSE);
            put_u64(out, index.0);
            encode_reject(reject.as_ref(), out);
        }
        MessageBody::Vote {
            pre_vote,
            last_index,
            last_term,
            transfer,
        } => {
            out.push(KIND_VOTE);
            out.push(u8::from(*pre_vote) | (u8::from(*transfer) << 1));
            put_u64(out, last_index.0);
            put_u64(out, last_term.0);
        }
        MessageBody::VoteResponse { pre_vote, granted } => {
            out.push(KIND_VOTE_RESPONSE);
            out.push(u8::from(*pre_vote) | (u8::from(*granted) << 1));
        }
        MessageBody::Heartbeat { commit, round } => {
            out.push(KIND_HEARTBEAT);
            put_u64(out, commit.0);
            put_u64(out, *round);
        }
        MessageBody::HeartbeatResponse { round } => {
            out.push(KIND_HEARTBEAT_RESPONSE);
            put_u64(out, *round);
        }
        MessageBody::Snapshot { meta } => {
            out.push(KIND_SNAPSHOT);
            encode_snapshot_meta(meta, out);
        }
        MessageBody::TimeoutNow => out.push(KIND_TIMEOUT_NOW),
        MessageBody::ReadIndex { ids } => {
            out.push(KIND_READ_INDEX);
            put_read_ids(out, ids);
        }
        MessageBody::ReadIndexResponse { index, ids } => {
            out.push(KIND_READ_INDEX_RESPONSE);
            put_u64(out, index.0);
            put_read_ids(out, ids);
        }
        MessageBody::Propose { payloads } => {
            out.push(KIND_PROPOSE);
            put_u32(out, payloads.len() as u32);
            for payload in payloads {
                put_u32(out, payload_size_bytes(payload) as u32);
                encode_payload(payload, out);
            }
        }
        MessageBody::TransferLeader { target } => {
            out.push(KIND_TRANSFER_LEADER);
            put_u64(out, target.0);
        }
        MessageBody::ProposeRefused { ids, refusal } => {
            out.push(KIND_PROPOSE_REFUSED);
            encode_refusal(refusal, out);
            put_request_ids(out, ids);
        }
        MessageBody::ReadRefused { ids, refusal } => {
            out.push(KIND_READ_REFUSED);
            encode_refusal(refusal, out);
            put_read_ids(out, ids);
        }
    }
}

/// An append's kind (asking for an acknowledgement or not) and fields:
/// `(prev_index, prev_term)` is the entry the first one follows.
fn encode_append(
    (prev_index, prev_term): (LogIndex, Term),
    entries: &[Entry],
    commit: LogIndex,
    wants_ack: bool,
    out: &mut Vec<u8>,
) {
    out.push(if wants_ack {
        KIND_APPEND
    } else {
        KIND_APPEND_QUIET
    });
    put_u64(out, prev_index.0);
    put_u64(out, prev_term.0);
    put_u64(out, commit.0);
    put_u32(out, entries.len() as u32);
    for entry in entries {
        put_u64(out, entry.term.0);
        put_u32(out, payload_size_bytes(&entry.payload) as u32);
        encode_payload(&entry.payload, out);
    }
}

/// A snapshot's index, term and membership (length-prefixed).
fn encode_snapshot_meta(meta: &SnapshotMeta, out: &mut Vec<u8>) {
    put_u64(out, meta.index.0);
    put_u64(out, meta.term.0);
    let mut membership = Vec::new();
    encode_membership(&meta.membership, &mut membership);
    put_u32(out, membership.len() as u32);
    out.extend_from_slice(&membership);
}

/// Request ids: a count, then each id's client and sequence.
fn put_request_ids(out: &mut Vec<u8>, ids: &[RequestId]) {
    put_u32(out, ids.len() as u32);
    for id in ids {
        put_u64(out, id.client);
        put_u64(out, id.sequence);
    }
}

/// An append response's rejection: a flag, then the hint if rejected.
fn encode_reject(reject: Option<&RejectHint>, out: &mut Vec<u8>) {
    match reject {
        None => out.push(0),
        Some(hint) => {
            out.push(1);
            put_u64(out, hint.index.0);
            put_u64(out, hint.term.0);
        }
    }
}

/// A refusal: its kind, a node id (0 for none), and a reason cut to
/// `REFUSAL_REASON_BYTES_MAX` bytes at a character boundary.
fn encode_refusal(refusal: &Refusal, out: &mut Vec<u8>) {
    let (reason_kind, node, text) = match refusal {
        Refusal::NotLeader { leader_hint } => {
            (REFUSAL_NOT_LEADER, leader_hint.map_or(0, |id| id.0), "")
        }
        Refusal::TransferInProgress { target } => (REFUSAL_TRANSFER_IN_PROGRESS, target.0, ""),
        Refusal::Overloaded { reason } => (REFUSAL_OVERLOADED, 0, reason.as_str()),
        Refusal::Invalid { reason } => (REFUSAL_INVALID, 0, reason.as_str()),
    };
    out.push(reason_kind);
    put_u64(out, node);
    let mut cut = text.len().min(REFUSAL_REASON_BYTES_MAX);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    put_u32(out, cut as u32);
    out.extend_from_slice(&text.as_bytes()[..cut]);
}

/// Messages in one batch, at most (a sender's turn for thousands of
/// groups stays far below).
pub const BATCH_MESSAGES_MAX: usize = 100_000;
/// Commands in one forwarded proposal, at most (the runtime forwards one
/// at a time). An append holds at most `regatta_raft::APPEND_ENTRIES_MAX`
/// entries, which the leader's core respects.
pub const MESSAGE_ITEMS_MAX: usize = 100_000;

/// Decodes a whole batch; any fault rejects it whole.
pub fn decode_batch(bytes: &Bytes) -> Result<Vec<(GroupId, Message)>, WireError> {
    let mut reader = Reader { bytes, offset: 0 };
    let count = reader.u32()? as usize;
    // The smallest message is 33 bytes: refuse counts the bytes cannot hold.
    if count > reader.remaining() / 33 {
        return Err(reader.error(format!("{count} messages cannot fit")));
    }
    // And counts no sender makes: decoded, a message takes about four
    // times its wire size, so a 64 MiB frame of minimal messages would
    // take hundreds of MiB.
    if count > BATCH_MESSAGES_MAX {
        return Err(reader.error(format!(
            "{count} messages in one batch, over {BATCH_MESSAGES_MAX}"
        )));
    }
    let mut messages = Vec::with_capacity(count);
    for _ in 0..count {
        messages.push(decode_message(&mut reader)?);
    }
    if reader.remaining() != 0 {
        return Err(reader.error(format!("{} trailing bytes", reader.remaining())));
    }
    Ok(messages)
}

fn decode_message(reader: &mut Reader<'_>) -> Result<(GroupId, Message), WireError> {
    let group = GroupId(reader.u64()?);
    let from = NodeId(reader.u64()?);
    let to = NodeId(reader.u64()?);
    let term = Term(reader.u64()?);
    if term.0 > TERM_MAX {
        // No cluster gets near it (a term per election); a peer claiming
        // one would make every node adopt it and overflow the next.
        return Err(reader.error(format!("term {} is over {TERM_MAX}", term.0)));
    }
    let kind = reader.u8()?;
    let body = match kind {
        KIND_APPEND => decode_append(reader, true)?,
        KIND_APPEND_QUIET => decode_append(reader, false)?,
        KIND_APPEND_RESPONSE => decode_append_response(reader)?,
        KIND_VOTE => {
            let flags = reader.flags()?;
            MessageBody::Vote {
                pre_vote: flags & 1 != 0,
                transfer: flags & 2 != 0,
                last_index: LogIndex(reader.u64()?),
                last_term: Term(reader.u64()?),
            }
        }
        KIND_VOTE_RESPONSE => {
            let flags = reader.flags()?;
            MessageBody::VoteResponse {
                pre_vote: flags & 1 != 0,
                granted: flags & 2 != 0,
            }
        }
        KIND_HEARTBEAT => MessageBody::Heartbeat {
            commit: LogIndex(reader.u64()?),
            round: reader.u64()?,
        },
        KIND_HEARTBEAT_RESPONSE => MessageBody::HeartbeatResponse {
            round: reader.u64()?,
        },
        KIND_SNAPSHOT => decode_snapshot(reader)?,
        KIND_TIMEOUT_NOW => MessageBody::TimeoutNow,
        KIND_READ_INDEX => MessageBody::ReadIndex {
            ids: reader.read_ids()?,
        },
        KIND_READ_INDEX_RESPONSE => MessageBody::ReadIndexResponse {
            index: LogIndex(reader.u64()?),
            ids: reader.read_ids()?,
        },
        KIND_PROPOSE => decode_propose(reader)?,
        KIND_TRANSFER_LEADER => MessageBody::TransferLeader {
            target: NodeId(reader.u64()?),
        },
        KIND_PROPOSE_REFUSED => decode_propose_refused(reader)?,
        KIND_READ_REFUSED => decode_read_refused(reader)?,
        other => return Err(reader.error(format!("unknown message kind {other}"))),
    };
    Ok((
        group,
        Message {
            from,
            to,
            term,
            body,
        },
    ))
}

fn decode_append_response(reader: &mut Reader<'_>) -> Result<MessageBody, WireError> {
    let index = LogIndex(reader.u64()?);
    let reject = match reader.u8()? {
        0 => None,
        1 => Some(RejectHint {
            index: LogIndex(reader.u64()?),
            term: Term(reader.u64()?),
        }),
        other => return Err(reader.error(format!("reject flag {other}"))),
    };
    Ok(MessageBody::AppendResponse { index, reject })
}

fn decode_snapshot(reader: &mut Reader<'_>) -> Result<MessageBody, WireError> {
    let index = LogIndex(reader.u64()?);
    let term = Term(reader.u64()?);
    let length = reader.u32()? as usize;
    let membership =
        decode_membership(reader.take(length)?).map_err(|e| reader.error(e.to_string()))?;
    Ok(MessageBody::Snapshot {
        meta: SnapshotMeta {
            index,
            term,
            membership,
        },
    })
}

fn decode_propose(reader: &mut Reader<'_>) -> Result<MessageBody, WireError> {
    // A payload is at least its 4-byte length and a 1-byte kind.
    let count = reader.count(5)?.min(MESSAGE_ITEMS_MAX + 1);
    if count > MESSAGE_ITEMS_MAX {
        return Err(reader.error(format!("a proposal of over {MESSAGE_ITEMS_MAX} commands")));
    }
    let mut payloads = Vec::with_capacity(count);
    for _ in 0..count {
        let payload = reader.payload()?;
        // The core refuses empty entries from a peer; refused here, they
        // cost no memory first.
        if matches!(payload, EntryPayload::Empty) {
            return Err(reader.error("an empty entry in a proposal".into()));
        }
        payloads.push(payload);
    }
    Ok(MessageBody::Propose { payloads })
}

fn decode_read_refused(reader: &mut Reader<'_>) -> Result<MessageBody, WireError> {
    let refusal = decode_refusal(reader)?;
    let ids = reader.read_ids()?;
    if ids.len() > MESSAGE_ITEMS_MAX {
        return Err(reader.error(format!("a refusal of over {MESSAGE_ITEMS_MAX} reads")));
    }
    Ok(MessageBody::ReadRefused { ids, refusal })
}

fn decode_refusal(reader: &mut Reader<'_>) -> Result<Refusal, WireError> {
    let reason_kind = reader.u8()?;
    let node = reader.u64()?;
    let length = reader.u32()? as usize;
    if length > REFUSAL_REASON_BYTES_MAX {
        return Err(reader.error(format!(
            "a refusal reason of {length} bytes, over {REFUSAL_REASON_BYTES_MAX}"
        )));
    }
    let text = String::from_utf8_lossy(reader.take(length)?).into_owned();
    Ok(match reason_kind {
        REFUSAL_NOT_LEADER => Refusal::NotLeader {
            leader_hint: (node != 0).then_some(NodeId(node)),
        },
        REFUSAL_TRANSFER_IN_PROGRESS => Refusal::TransferInProgress {
            target: NodeId(node),
        },
        REFUSAL_OVERLOADED => Refusal::Overloaded { reason: text },
        REFUSAL_INVALID => Refusal::Invalid { reason: text },
        other => return Err(reader.error(format!("unknown refusal kind {other}"))),
    })
}

fn decode_propose_refused(reader: &mut Reader<'_>) -> Result<MessageBody, WireError> {
    let refusal = decode_refusal(reader)?;
    // An id is two u64s.
    let count = reader.count(16)?;
    if count > MESSAGE_ITEMS_MAX {
        return Err(reader.error(format!("a refusal of over {MESSAGE_ITEMS_MAX} requests")));
    }
    let mut ids = Vec::with_capacity(count);
    for _ in 0..count {
        ids.push(RequestId {
            client: reader.u64()?,
            sequence: reader.u64()?,
        });
    }
    Ok(MessageBody::ProposeRefused { ids, refusal })
}

fn decode_append(reader: &mut Reader<'_>, wants_ack: bool) -> Result<MessageBody, WireError> {
    let prev_index = LogIndex(reader.u64()?);
    let prev_term = Term(reader.u64()?);
    let commit = LogIndex(reader.u64()?);
    let count = reader.count(12)?;
    if count as u64 > regatta_raft::APPEND_ENTRIES_MAX {
        return Err(reader.error(format!(
            "an append of {count} entries, over {}",
            regatta_raft::APPEND_ENTRIES_MAX
        )));
    }
    let mut entries = Vec::with_capacity(count);
    for position in 0..count {
        let term = Term(reader.u64()?);
        let payload = reader.payload()?;
        let index = prev_index
            .0
            .checked_add(position as u64 + 1)
            .ok_or_else(|| reader.error("entry index overflows".into()))?;
        entries.push(Entry {
            term,
            index: LogIndex(index),
            payload,
        });
    }
    Ok(MessageBody::Append {
        prev_index,
        prev_term,
        entries,
        commit,
        wants_ack,
    })
}

fn put_u32(out: &mut Vec<u8>, value: u32) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(&value.to_le_bytes());
}

fn put_read_ids(out: &mut Vec<u8>, ids: &[ReadId]) {
    put_u32(out, ids.len() as u32);
    for id in ids {
        put_u64(out, id.0);
    }
}

/// A bounds-checked little-endian reader over a shared buffer.
struct Reader<'a> {
    bytes: &'a Bytes,
    offset: usize,
}

impl Reader<'_> {
    fn error(&self, reason: String) -> WireError {
        WireError {
            offset: self.offset,
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.offset
    }

    fn take(&mut self, count: usize) -> Result<&[u8], WireError> {
        if count > self.remaining() {
            return Err(self.error(format!("{count} bytes wanted, {} left", self.remaining())));
        }
        let start = self.offset;
        self.offset += count;
        Ok(&self.bytes[start..self.offset])
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let mut buffer = [0u8; 4];
        buffer.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(buffer))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        let mut buffer = [0u8; 8];
        buffer.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buffer))
    }

    fn flags(&mut self) -> Result<u8, WireError> {
        let flags = self.u8()?;
        if flags > 3 {
            return Err(self.error(format!("flags {flags}")));
        }
        Ok(flags)
    }

    /// A count of items of at least `item_bytes_min` bytes each.
    fn count(&mut self, item_bytes_min: usize) -> Result<usize, WireError> {
        let count = self.u32()? as usize;
        if count > self.remaining() / item_bytes_min {
            return Err(self.error(format!("{count} items cannot fit")));
        }
        Ok(count)
    }

    fn payload(&mut self) -> Result<EntryPayload, WireError> {
        let length = self.u32()? as usize;
        if length > self.remaining() {
            return Err(self.error(format!("payload of {length} bytes runs past the end")));
        }
        let slice = self.bytes.slice(self.offset..self.offset + length);
        self.offset += length;
        decode_payload(&slice).map_err(|e| self.error(e.to_string()))
    }

    /// At most `READ_IDS_PER_MESSAGE_MAX` (what a sender's merged read
    /// messages hold): a leader confirms each id it is sent.
    fn read_ids(&mut self) -> Result<Vec<ReadId>, WireError> {
        let count = self.count(8)?;
        if count > regatta_raft::READ_IDS_PER_MESSAGE_MAX {
            return Err(self.error(format!(
                "{count} read ids in one message, over {}",
                regatta_raft::READ_IDS_PER_MESSAGE_MAX
            )));
        }
        (0..count).map(|_| self.u64().map(ReadId)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regatta_raft::{ConfChange, Membership};

    fn every_kind() -> Vec<(GroupId, Message)> {
        let message = |body| Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(7),
            body,
        };
        let bodies = vec![
            MessageBody::Append {
                prev_index: LogIndex(10),
                prev_term: Term(6),
                entries: vec![
                    Entry {
                        term: Term(7),
                        index: LogIndex(11),
                        payload: EntryPayload::Normal(Bytes::from_static(b"put x")),
                    },
                    Entry {
                        term: Term(7),
                        index: LogIndex(12),
                        payload: EntryPayload::ConfChange(ConfChange::Promote { node: NodeId(4) }),
                    },
                ],
                commit: LogIndex(9),
                wants_ack: true,
            },
            MessageBody::Append {
                prev_index: LogIndex(12),
                prev_term: Term(7),
                entries: Vec::new(),
                commit: LogIndex(12),
                wants_ack: false,
            },
            MessageBody::AppendResponse {
                index: LogIndex(12),
                reject: None,
            },
            MessageBody::AppendResponse {
                index: LogIndex(12),
                reject: Some(RejectHint {
                    index: LogIndex(5),
                    term: Term(3),
                }),
            },
            MessageBody::Vote {
                pre_vote: true,
                last_index: LogIndex(12),
                last_term: Term(7),
                transfer: false,
            },
            MessageBody::VoteResponse {
                pre_vote: false,
                granted: true,
            },
            MessageBody::Heartbeat {
                commit: LogIndex(9),
                round: 44,
            },
            MessageBody::HeartbeatResponse { round: 44 },
            MessageBody::Snapshot {
                meta: SnapshotMeta {
                    index: LogIndex(100),
                    term: Term(5),
                    membership: Membership::with_voters([NodeId(1), NodeId(2), NodeId(3)]),
                },
            },
            MessageBody::TimeoutNow,
            MessageBody::ReadIndex {
                ids: vec![ReadId(1), ReadId(2)],
            },
            MessageBody::ReadIndexResponse {
                index: LogIndex(9),
                ids: vec![ReadId(3)],
            },
            MessageBody::Propose {
                payloads: vec![
                    EntryPayload::Normal(Bytes::from_static(b"cmd")),
                    EntryPayload::Session {
                        id: regatta_raft::RequestId {
                            client: 1,
                            sequence: 2,
                        },
                        command: Bytes::from_static(b"once"),
                    },
                ],
            },
            MessageBody::TransferLeader { target: NodeId(3) },
            MessageBody::ProposeRefused {
                ids: vec![
                    regatta_raft::RequestId {
                        client: 1,
                        sequence: 2,
                    },
                    regatta_raft::RequestId {
                        client: 3,
                        sequence: 4,
                    },
                ],
                refusal: Refusal::NotLeader {
                    leader_hint: Some(NodeId(3)),
                },
            },
            MessageBody::ProposeRefused {
                ids: vec![regatta_raft::RequestId {
                    client: 1,
                    sequence: 3,
                }],
                refusal: Refusal::NotLeader { leader_hint: None },
            },
            MessageBody::ProposeRefused {
                ids: Vec::new(),
                refusal: Refusal::TransferInProgress { target: NodeId(2) },
            },
            MessageBody::ProposeRefused {
                ids: Vec::new(),
                refusal: Refusal::Overloaded {
                    reason: "too many uncommitted bytes".into(),
                },
            },
            MessageBody::ProposeRefused {
                ids: Vec::new(),
                refusal: Refusal::Invalid {
                    reason: "ünïcode".into(),
                },
            },
            MessageBody::ReadRefused {
                ids: vec![ReadId(7), ReadId(8)],
                refusal: Refusal::NotLeader {
                    leader_hint: Some(NodeId(2)),
                },
            },
            MessageBody::ReadRefused {
                ids: vec![ReadId(9)],
                refusal: Refusal::Overloaded {
                    reason: "pending_reads_max".into(),
                },
            },
        ];
        bodies
            .into_iter()
            .enumerate()
            .map(|(position, body)| (GroupId(position as u64 + 1), message(body)))
            .collect()
    }

    /// Every message kind survives a round trip in one batch.
    #[test]
    fn every_kind_round_trips() {
        let batch = every_kind();
        let mut bytes = Vec::new();
        encode_batch(&batch, &mut bytes);
        assert_eq!(decode_batch(&Bytes::from(bytes)), Ok(batch));
    }

    /// Golden bytes: the layout is an interface between nodes.
    #[test]
    fn layout_matches_the_documentation() {
        let mut bytes = Vec::new();
        let heartbeat = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(3),
            body: MessageBody::Heartbeat {
                commit: LogIndex(4),
                round: 5,
            },
        };
        encode_batch(&[(GroupId(9), heartbeat)], &mut bytes);
        let mut expected = vec![1, 0, 0, 0];
        for value in [9u64, 1, 2, 3] {
            expected.extend_from_slice(&value.to_le_bytes());
        }
        expected.push(5);
        expected.extend_from_slice(&4u64.to_le_bytes());
        expected.extend_from_slice(&5u64.to_le_bytes());
        assert_eq!(bytes, expected);
    }

    /// Golden bytes of a refusal, and its long reasons cut at a character
    /// boundary, so that it always decodes.
    #[test]
    fn a_refusal_matches_the_documentation() {
        let bytes = one_message(
            0,
            MessageBody::ProposeRefused {
                ids: vec![RequestId {
                    client: 5,
                    sequence: 6,
                }],
                refusal: Refusal::Overloaded {
                    reason: "busy".into(),
                },
            },
        );
        let mut expected = vec![1, 0, 0, 0];
        for value in [1u64, 1, 2, 0] {
            expected.extend_from_slice(&value.to_le_bytes());
        }
        expected.extend_from_slice(&[14, 3]);
        expected.extend_from_slice(&0u64.to_le_bytes());
        expected.extend_from_slice(&4u32.to_le_bytes());
        expected.extend_from_slice(b"busy");
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&5u64.to_le_bytes());
        expected.extend_from_slice(&6u64.to_le_bytes());
        assert_eq!(bytes, expected);

        // 'é' is two bytes: 1,023 of them leave one byte of a 1,025th.
        let long = format!("x{}", "é".repeat(REFUSAL_REASON_BYTES_MAX));
        let bytes = one_message(
            0,
            MessageBody::ProposeRefused {
                ids: Vec::new(),
                refusal: Refusal::Invalid { reason: long },
            },
        );
        let decoded = decode_batch(&Bytes::from(bytes)).expect("decodes");
        let MessageBody::ProposeRefused {
            refusal: Refusal::Invalid { reason },
            ..
        } = &decoded[0].1.body
        else {
            panic!("{decoded:?}");
        };
        assert_eq!(reason.len(), REFUSAL_REASON_BYTES_MAX - 1);
        assert!(reason.starts_with("xé"));

        // A read refusal: the same refusal, then read ids as a read
        // message carries them.
        let bytes = one_message(
            0,
            MessageBody::ReadRefused {
                ids: vec![ReadId(7)],
                refusal: Refusal::NotLeader {
                    leader_hint: Some(NodeId(3)),
                },
            },
        );
        let mut expected = vec![1, 0, 0, 0];
        for value in [1u64, 1, 2, 0] {
            expected.extend_from_slice(&value.to_le_bytes());
        }
        expected.extend_from_slice(&[15, 1]);
        expected.extend_from_slice(&3u64.to_le_bytes());
        expected.extend_from_slice(&0u32.to_le_bytes());
        expected.extend_from_slice(&1u32.to_le_bytes());
        expected.extend_from_slice(&7u64.to_le_bytes());
        assert_eq!(bytes, expected);
    }

    /// Only peers of format version 2 or later are sent proposal
    /// refusals, and of version 3 or later read refusals.
    #[test]
    fn refusals_go_only_to_peers_that_know_them() {
        let refusal = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(0),
            body: MessageBody::ProposeRefused {
                ids: Vec::new(),
                refusal: Refusal::NotLeader { leader_hint: None },
            },
        };
        assert!(!peer_understands(1, &refusal));
        assert!(peer_understands(2, &refusal));
        let read_refusal = Message {
            body: MessageBody::ReadRefused {
                ids: vec![ReadId(1)],
                refusal: Refusal::NotLeader { leader_hint: None },
            },
            ..refusal.clone()
        };
        assert!(!peer_understands(1, &read_refusal));
        assert!(!peer_understands(2, &read_refusal));
        assert!(peer_understands(3, &read_refusal));
        let heartbeat = Message {
            body: MessageBody::HeartbeatResponse { round: 1 },
            ..refusal
        };
        assert!(peer_understands(1, &heartbeat));
    }

    /// Every truncation and many single-byte changes of a valid batch are
    /// errors or other valid batches, never a panic or a huge allocation.
    #[test]
    fn damaged_batches_are_errors_not_panics() {
        let mut valid = Vec::new();
        encode_batch(&every_kind(), &mut valid);
        for length in 0..valid.len() {
            assert!(
                decode_batch(&Bytes::from(valid[..length].to_vec())).is_err(),
                "length {length}"
            );
        }
        for position in 0..valid.len() {
            for value in [0u8, 1, 0x7F, 0xFF] {
                let mut changed = valid.clone();
                changed[position] = value;
                let _ = decode_batch(&Bytes::from(changed));
            }
        }
        let huge_count = Bytes::from(vec![0xFF, 0xFF, 0xFF, 0xFF]);
        assert!(decode_batch(&huge_count).is_err());
    }

    fn one_message(term: u64, body: MessageBody) -> Vec<u8> {
        let message = Message {
            from: NodeId(1),
            to: NodeId(2),
            term: Term(term),
            body,
        };
        let mut bytes = Vec::new();
        encode_batch(&[(GroupId(1), message)], &mut bytes);
        bytes
    }

    /// A term past `TERM_MAX` is refused: adopted, it would overflow the
    /// next election's term.
    #[test]
    fn terms_past_the_bound_are_refused() {
        let heartbeat = MessageBody::Heartbeat {
            commit: LogIndex(0),
            round: 1,
        };
        let at_bound = one_message(TERM_MAX, heartbeat.clone());
        assert!(decode_batch(&Bytes::from(at_bound)).is_ok());
        let error =
            decode_batch(&Bytes::from(one_message(u64::MAX, heartbeat))).expect_err("u64::MAX");
        assert!(error.to_string().contains("is over"), "{error}");
    }

    /// A proposal's count must fit 5 bytes per payload (its length and
    /// kind), not 4: the allocation follows the count.
    #[test]
    fn a_proposal_count_beyond_its_bytes_is_refused() {
        let mut bytes = one_message(
            1,
            MessageBody::Propose {
                payloads: Vec::new(),
            },
        );
        // 400 bytes: room for 100 four-byte items, 80 five-byte ones.
        let count_at = bytes.len() - 4;
        bytes[count_at..].copy_from_slice(&100u32.to_le_bytes());
        bytes.extend_from_slice(&[0u8; 400]);
        let error = decode_batch(&Bytes::from(bytes)).expect_err("100 payloads in 400 bytes");
        assert!(error.to_string().contains("cannot fit"), "{error}");
    }

    /// Counts a frame's bytes could hold but no sender makes are refused,
    /// as are empty entries in a proposal: decoded, tiny items take many
    /// times their wire size.
    #[test]
    fn counts_no_sender_makes_are_refused() {
        let empty = |count: usize| {
            let mut message = Vec::new();
            encode_message(
                GroupId(1),
                &Message {
                    from: NodeId(2),
                    to: NodeId(1),
                    term: Term(1),
                    body: MessageBody::Heartbeat {
                        commit: LogIndex(0),
                        round: 0,
                    },
                },
                &mut message,
            );
            let mut bytes = (count as u32).to_le_bytes().to_vec();
            for _ in 0..count {
                bytes.extend_from_slice(&message);
            }
            bytes
        };
        assert!(decode_batch(&Bytes::from(empty(3))).is_ok());
        let error = decode_batch(&Bytes::from(empty(BATCH_MESSAGES_MAX + 1)))
            .expect_err("too many messages");
        assert!(error.to_string().contains("in one batch"), "{error}");

        let entries = (regatta_raft::APPEND_ENTRIES_MAX + 1) as usize;
        let append = one_message(
            1,
            MessageBody::Append {
                prev_index: LogIndex(0),
                prev_term: Term(0),
                entries: (1..=entries as u64)
                    .map(|index| Entry {
                        term: Term(1),
                        index: LogIndex(index),
                        payload: EntryPayload::Empty,
                    })
                    .collect(),
                commit: LogIndex(0),
                wants_ack: true,
            },
        );
        let error = decode_batch(&Bytes::from(append)).expect_err("too many entries");
        assert!(error.to_string().contains("entries, over"), "{error}");

        // A leader confirms each read id it is sent: no more than a
        // sender's merged read message holds.
        let ids = |count: usize| (0..count as u64).map(ReadId).collect::<Vec<_>>();
        let most = regatta_raft::READ_IDS_PER_MESSAGE_MAX;
        let reads = one_message(1, MessageBody::ReadIndex { ids: ids(most) });
        assert!(decode_batch(&Bytes::from(reads)).is_ok());
        for body in [
            MessageBody::ReadIndex { ids: ids(most + 1) },
            MessageBody::ReadIndexResponse {
                index: LogIndex(3),
                ids: ids(most + 1),
            },
        ] {
            let error = decode_batch(&Bytes::from(one_message(1, body))).expect_err("too many ids");
            assert!(
                error.to_string().contains("read ids in one message"),
                "{error}"
            );
        }

        let proposal = one_message(
            1,
            MessageBody::Propose {
                payloads: vec![EntryPayload::Empty],
            },
        );
        let error = decode_batch(&Bytes::from(proposal)).expect_err("an empty entry");
        assert!(error.to_string().contains("empty entry"), "{error}");
    }
}
