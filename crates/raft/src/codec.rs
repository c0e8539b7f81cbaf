//! The binary encoding of entry payloads and memberships, shared by the WAL
//! and the peer transport. Layout and tags are documented in
//! `docs/wal-format.md` ("Entry payload", "Membership"); integers are
//! little-endian. Decoding never panics: bad input is a [`CodecError`].

use std::collections::BTreeSet;

use bytes::Bytes;

use crate::types::{ConfChange, EntryPayload, Membership, NodeId, RequestId};

/// Why bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode {what}: {reason}")]
pub struct CodecError {
    /// What was being decoded.
    pub what: &'static str,
    /// What was wrong.
    pub reason: String,
}

fn error(what: &'static str, reason: impl Into<String>) -> CodecError {
    CodecError {
        what,
        reason: reason.into(),
    }
}

const PAYLOAD_EMPTY: u8 = 0;
const PAYLOAD_NORMAL: u8 = 1;
const PAYLOAD_CONF_CHANGE: u8 = 2;
const PAYLOAD_SESSION: u8 = 3;

const CHANGE_BOOTSTRAP: u8 = 0;
const CHANGE_ADD_LEARNER: u8 = 1;
const CHANGE_PROMOTE: u8 = 2;
const CHANGE_DEMOTE: u8 = 3;
const CHANGE_REMOVE: u8 = 4;

/// Node lists longer than this are refused when decoding.
pub const NODE_LIST_LENGTH_MAX: usize = 65_536;

/// The encoded size of a payload, without encoding it.
pub fn payload_size_bytes(payload: &EntryPayload) -> usize {
    match payload {
        EntryPayload::Empty => 1,
        EntryPayload::Normal(data) => 1 + data.len(),
        EntryPayload::Session { command, .. } => 1 + 16 + command.len(),
        EntryPayload::ConfChange(ConfChange::Bootstrap { voters }) => 2 + 4 + 8 * voters.len(),
        EntryPayload::ConfChange(ConfChange::AddLearner { .. }) => 2 + 9,
        EntryPayload::ConfChange(_) => 2 + 8,
    }
}

/// Appends the encoding of `payload` to `out`.
pub fn encode_payload(payload: &EntryPayload, out: &mut Vec<u8>) {
    match payload {
        EntryPayload::Empty => out.push(PAYLOAD_EMPTY),
        EntryPayload::Normal(data) => {
            out.push(PAYLOAD_NORMAL);
            out.extend_from_slice(data);
        }
        EntryPayload::ConfChange(change) => {
            out.push(PAYLOAD_CONF_CHANGE);
            encode_conf_change(change, out);
        }
        EntryPayload::Session { id, command } => {
            out.push(PAYLOAD_SESSION);
            out.extend_from_slice(&id.client.to_le_bytes());
            out.extend_from_slice(&id.sequence.to_le_bytes());
            out.extend_from_slice(command);
        }
    }
}

fn encode_conf_change(change: &ConfChange, out: &mut Vec<u8>) {
    match change {
        ConfChange::Bootstrap { voters } => {
            out.push(CHANGE_BOOTSTRAP);
            encode_nodes(voters.iter(), voters.len(), out);
        }
        ConfChange::AddLearner { node, auto_promote } => {
            out.push(CHANGE_ADD_LEARNER);
            out.extend_from_slice(&node.0.to_le_bytes());
            out.push(u8::from(*auto_promote));
        }
        ConfChange::Promote { node } => {
            out.push(CHANGE_PROMOTE);
            out.extend_from_slice(&node.0.to_le_bytes());
        }
        ConfChange::Demote { node } => {
            out.push(CHANGE_DEMOTE);
            out.extend_from_slice(&node.0.to_le_bytes());
        }
        ConfChange::Remove { node } => {
            out.push(CHANGE_REMOVE);
            out.extend_from_slice(&node.0.to_le_bytes());
        }
    }
}

/// Decodes a payload. `bytes` is sliced, not copied, for normal payloads.
pub fn decode_payload(bytes: &Bytes) -> Result<EntryPayload, CodecError> {
    let Some(&tag) = bytes.first() else {
        return Err(error("entry payload", "empty"));
    };
    match tag {
        PAYLOAD_EMPTY if bytes.len() == 1 => Ok(EntryPayload::Empty),
        PAYLOAD_EMPTY => Err(error("entry payload", "bytes after an empty payload")),
        PAYLOAD_NORMAL => Ok(EntryPayload::Normal(bytes.slice(1..))),
        PAYLOAD_CONF_CHANGE => {
            let mut reader = Reader::new(&bytes[1..], "membership change");
            let change = decode_conf_change(&mut reader)?;
            reader.finish()?;
            Ok(EntryPayload::ConfChange(change))
        }
        PAYLOAD_SESSION => {
            let mut reader = Reader::new(&bytes[1..], "session command");
            let client = reader.u64()?;
            let sequence = reader.u64()?;
            let id = RequestId { client, sequence };
            if !id.is_valid() {
                return Err(error(
                    "session command",
                    "client and sequence must be non-zero",
                ));
            }
            Ok(EntryPayload::Session {
                id,
                command: bytes.slice(17..),
            })
        }
        other => Err(error("entry payload", format!("unknown tag {other}"))),
    }
}

fn decode_conf_change(reader: &mut Reader<'_>) -> Result<ConfChange, CodecError> {
    let tag = reader.u8()?;
    let change = match tag {
        CHANGE_BOOTSTRAP => ConfChange::Bootstrap {
            voters: reader.nodes()?,
        },
        CHANGE_ADD_LEARNER => {
            let node = NodeId(reader.u64()?);
            let auto_promote = match reader.u8()? {
                0 => false,
                1 => true,
                other => {
                    return Err(error(
                        "membership change",
                        format!("auto-promote flag {other}"),
                    ))
                }
            };
            ConfChange::AddLearner { node, auto_promote }
        }
        CHANGE_PROMOTE => ConfChange::Promote {
            node: NodeId(reader.u64()?),
        },
        CHANGE_DEMOTE => ConfChange::Demote {
            node: NodeId(reader.u64()?),
        },
        CHANGE_REMOVE => ConfChange::Remove {
            node: NodeId(reader.u64()?),
        },
        other => return Err(error("membership change", format!("unknown tag {other}"))),
    };
    Ok(change)
}

/// Appends the encoding of a membership to `out`.
pub fn encode_membership(membership: &Membership, out: &mut Vec<u8>) {
    for set in [
        &membership.voters,
        &membership.learners,
        &membership.auto_promote,
    ] {
        encode_nodes(set.iter(), set.len(), out);
    }
}

/// Decodes a membership that fills `bytes` exactly.
pub fn decode_membership(bytes: &[u8]) -> Result<Membership, CodecError> {
    let mut reader = Reader::new(bytes, "membership");
    let membership = decode_membership_from(&mut reader)?;
    reader.finish()?;
    Ok(membership)
}

fn decode_membership_from(reader: &mut Reader<'_>) -> Result<Membership, CodecError> {
    let to_set = |nodes: Vec<NodeId>| nodes.into_iter().collect::<BTreeSet<NodeId>>();
    Ok(Membership {
        voters: to_set(reader.nodes()?),
        learners: to_set(reader.nodes()?),
        auto_promote: to_set(reader.nodes()?),
    })
}

fn encode_nodes<'a>(nodes: impl Iterator<Item = &'a NodeId>, count: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(&(count as u32).to_le_bytes());
    for node in nodes {
        out.extend_from_slice(&node.0.to_le_bytes());
    }
}

/// A bounds-checked little-endian reader.
struct Reader<'a> {
    bytes: &'a [u8],
    position: usize,
    what: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], what: &'static str) -> Reader<'a> {
        Reader {
            bytes,
            position: 0,
            what,
        }
    }

    fn take(&mut self, count: usize) -> Result<&'a [u8], CodecError> {
        let end = self
            .position
            .checked_add(count)
            .filter(|end| *end <= self.bytes.len());
        let Some(end) = end else {
            return Err(error(
                self.what,
                format!("truncated at byte {}", self.position),
            ));
        };
        let slice = &self.bytes[self.position..end];
        self.position = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, CodecError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, CodecError> {
        let mut buffer = [0u8; 4];
        buffer.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(buffer))
    }

    fn u64(&mut self) -> Result<u64, CodecError> {
        let mut buffer = [0u8; 8];
        buffer.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buffer))
    }

    fn nodes(&mut self) -> Result<Vec<NodeId>, CodecError> {
        let count = self.u32()? as usize;
        if count > NODE_LIST_LENGTH_MAX {
            return Err(error(self.what, format!("{count} nodes is over the limit")));
        }
        (0..count).map(|_| self.u64().map(NodeId)).collect()
    }

    fn finish(&self) -> Result<(), CodecError> {
        if self.position != self.bytes.len() {
            return Err(error(
                self.what,
                format!("{} trailing bytes", self.bytes.len() - self.position),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(payload: EntryPayload) -> Vec<u8> {
        let mut out = Vec::new();
        encode_payload(&payload, &mut out);
        assert_eq!(out.len(), payload_size_bytes(&payload));
        let decoded = decode_payload(&Bytes::from(out.clone())).expect("decodes");
        assert_eq!(decoded, payload);
        out
    }

    /// Golden bytes: the format is an interface; changing it breaks disks.
    #[test]
    fn payload_encoding_matches_the_documented_layout() {
        assert_eq!(round_trip(EntryPayload::Empty), vec![0]);
        assert_eq!(
            round_trip(EntryPayload::Normal(Bytes::from_static(b"ab"))),
            vec![1, b'a', b'b']
        );
        assert_eq!(
            round_trip(EntryPayload::ConfChange(ConfChange::AddLearner {
                node: NodeId(7),
                auto_promote: true
            })),
            vec![2, 1, 7, 0, 0, 0, 0, 0, 0, 0, 1]
        );
        assert_eq!(
            round_trip(EntryPayload::ConfChange(ConfChange::Bootstrap {
                voters: vec![NodeId(1), NodeId(2)]
            })),
            vec![2, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            round_trip(EntryPayload::Session {
                id: RequestId {
                    client: 2,
                    sequence: 5
                },
                command: Bytes::from_static(b"x"),
            }),
            vec![3, 2, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, b'x']
        );
        for change in [
            ConfChange::Promote { node: NodeId(3) },
            ConfChange::Demote { node: NodeId(3) },
            ConfChange::Remove { node: NodeId(3) },
        ] {
            round_trip(EntryPayload::ConfChange(change));
        }
    }

    #[test]
    fn membership_round_trips() {
        let membership = Membership {
            voters: [NodeId(1), NodeId(2)].into(),
            learners: [NodeId(3)].into(),
            auto_promote: [NodeId(3)].into(),
        };
        let mut out = Vec::new();
        encode_membership(&membership, &mut out);
        assert_eq!(out.len(), 4 + 16 + 4 + 8 + 4 + 8);
        assert_eq!(decode_membership(&out), Ok(membership));
    }

    /// Every truncation and every single-byte change of a valid encoding
    /// decodes to an error or a value, never a panic.
    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut valid = Vec::new();
        encode_payload(
            &EntryPayload::ConfChange(ConfChange::Bootstrap {
                voters: vec![NodeId(1), NodeId(2), NodeId(3)],
            }),
            &mut valid,
        );
        for length in 0..valid.len() {
            let truncated = Bytes::from(valid[..length].to_vec());
            assert!(decode_payload(&truncated).is_err(), "length {length}");
        }
        for position in 0..valid.len() {
            for value in [0u8, 1, 2, 5, 0xFF] {
                let mut changed = valid.clone();
                changed[position] = value;
                let _ = decode_payload(&Bytes::from(changed.clone()));
                let _ = decode_membership(&changed);
            }
        }
        let mut zero_client = vec![3u8];
        zero_client.extend_from_slice(&0u64.to_le_bytes());
        zero_client.extend_from_slice(&1u64.to_le_bytes());
        assert!(decode_payload(&Bytes::from(zero_client)).is_err());
        assert!(decode_payload(&Bytes::from_static(&[3, 1, 0, 0])).is_err());
        let error = decode_payload(&Bytes::from_static(&[9])).expect_err("unknown tag");
        assert_eq!(
            error.to_string(),
            "cannot decode entry payload: unknown tag 9"
        );
    }
}
