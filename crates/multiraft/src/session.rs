//! The session table of one group: for each client, the last request
//! applied and its result, so that a retried request is applied once
//! (`docs/decisions/0002-proposal-deduplication.md`). It lives in the
//! group's apply thread; its encoding is in `docs/multiraft.md` ("Session
//! table").

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use regatta_raft::{LogIndex, RequestId};

const TABLE_VERSION: u32 = 1;
/// Fixed bytes of one encoded client, before its result.
const CLIENT_FIXED_BYTES: usize = 8 + 8 + 8 + 1;

/// What the table holds for a client's last request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Chosen for application in the run of entries being applied now; its
    /// result is not there yet.
    Pending,
    /// Applied, with this result.
    Known(Bytes),
    /// Applied before a restart; its result was not kept.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ClientSession {
    sequence: u64,
    index: LogIndex,
    outcome: Outcome,
}

/// What to do with a session command.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// A new request: apply it.
    Apply,
    /// The client's last request is pending in the current run: apply the
    /// run first, then ask again.
    Flush,
    /// A retry of the client's last request: answer with this.
    Duplicate(Outcome),
    /// Older than the client's last request; nobody waits for it.
    Stale {
        /// The client's last sequence.
        last: u64,
    },
}

/// Why an encoded table was refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct DecodeError(pub String);

/// Clients and their last requests, as of `index`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct SessionTable {
    clients: HashMap<u64, ClientSession>,
    /// Each client by the index of its last request, for expiry.
    by_index: BTreeMap<LogIndex, u64>,
    /// Every entry up to here is reflected in the table.
    index: LogIndex,
}

impl SessionTable {
    /// An empty table standing for every entry up to `index`.
    pub(crate) fn new(index: LogIndex) -> SessionTable {
        SessionTable {
            index,
            ..SessionTable::default()
        }
    }

    /// Every entry up to this index is reflected in the table.
    pub(crate) fn index(&self) -> LogIndex {
        self.index
    }

    /// Clients in the table.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.clients.len()
    }

    /// The table reflects every entry up to `index` (entries that are not
    /// session commands change nothing).
    pub(crate) fn advance(&mut self, index: LogIndex) {
        self.index = self.index.max(index);
    }

    /// Decides about request `id`.
    pub(crate) fn check(&self, id: RequestId) -> Verdict {
        match self.clients.get(&id.client) {
            None => Verdict::Apply,
            Some(session) if id.sequence > session.sequence => Verdict::Apply,
            Some(session) if id.sequence == session.sequence => match &session.outcome {
                Outcome::Pending => Verdict::Flush,
                outcome => Verdict::Duplicate(outcome.clone()),
            },
            Some(session) => Verdict::Stale {
                last: session.sequence,
            },
        }
    }

    /// Request `id` at `index` becomes its client's last, with `outcome`.
    pub(crate) fn record(&mut self, id: RequestId, index: LogIndex, outcome: Outcome) {
        let session = ClientSession {
            sequence: id.sequence,
            index,
            outcome,
        };
        if let Some(previous) = self.clients.insert(id.client, session) {
            self.by_index.remove(&previous.index);
        }
        self.by_index.insert(index, id.client);
        self.advance(index);
    }

    /// The pending request of `client` at `index` was applied.
    pub(crate) fn complete(&mut self, client: u64, index: LogIndex, result: Bytes) {
        if let Some(session) = self.clients.get_mut(&client) {
            if session.index == index {
                session.outcome = Outcome::Known(result);
            }
        }
    }

    /// Forgets clients whose last request is more than `expiry_entries`
    /// below `index`: the same at every replica, since it depends only on
    /// the log.
    pub(crate) fn expire(&mut self, index: LogIndex, expiry_entries: u64) {
        let Some(horizon) = index.0.checked_sub(expiry_entries) else {
            return;
        };
        while let Some(entry) = self.by_index.first_entry() {
            if entry.key().0 >= horizon {
                break;
            }
            let client = entry.remove();
            self.clients.remove(&client);
        }
    }

    /// The encoding: version u32, index u64, count u32, then per client
    /// client u64, sequence u64, index u64, and a result tag u8 (0 unknown,
    /// 1 known followed by length u32 and bytes). Only between runs: no
    /// request is pending.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.clients.len() * (CLIENT_FIXED_BYTES + 16));
        out.extend_from_slice(&TABLE_VERSION.to_le_bytes());
        out.extend_from_slice(&self.index.0.to_le_bytes());
        out.extend_from_slice(&(self.clients.len() as u32).to_le_bytes());
        // In index order, so that equal tables encode equally.
        for (index, client) in &self.by_index {
            let session = &self.clients[client];
            out.extend_from_slice(&client.to_le_bytes());
            out.extend_from_slice(&session.sequence.to_le_bytes());
            out.extend_from_slice(&index.0.to_le_bytes());
            match &session.outcome {
                Outcome::Unknown => out.push(0),
                Outcome::Known(result) => {
                    out.push(1);
                    out.extend_from_slice(&(result.len() as u32).to_le_bytes());
                    out.extend_from_slice(result);
                }
                Outcome::Pending => panic!("a session table is encoded with a pending request"),
            }
        }
        out
    }

    /// Decodes `bytes`; never panics on bad input.
    pub(crate) fn decode(bytes: &Bytes) -> Result<SessionTable, DecodeError> {
        let mut reader = Reader { bytes, position: 0 };
        let version = reader.u32()?;
        if version != TABLE_VERSION {
            return Err(DecodeError(format!(
                "session table version {version} is not known (expected {TABLE_VERSION})"
            )));
        }
        let mut table = SessionTable::new(LogIndex(reader.u64()?));
        let count = reader.u32()? as usize;
        if count > reader.remaining() / CLIENT_FIXED_BYTES {
            return Err(DecodeError(format!(
                "{count} clients cannot fit in {} bytes",
                reader.remaining()
            )));
        }
        for _ in 0..count {
            let client = reader.u64()?;
            let sequence = reader.u64()?;
            let index = LogIndex(reader.u64()?);
            let outcome = match reader.u8()? {
                0 => Outcome::Unknown,
                1 => {
                    let length = reader.u32()? as usize;
                    Outcome::Known(reader.bytes(length)?)
                }
                tag => return Err(DecodeError(format!("unknown result tag {tag}"))),
            };
            let id = RequestId { client, sequence };
            if !id.is_valid() || index > table.index {
                return Err(DecodeError(format!(
                    "invalid client {client}, sequence {sequence} at index {}",
                    index.0
                )));
            }
            if table.clients.contains_key(&client) || table.by_index.contains_key(&index) {
                return Err(DecodeError(format!(
                    "client {client} or index {} appears twice",
                    index.0
                )));
            }
            let table_index = table.index;
            table.record(id, index, outcome);
            table.index = table_index;
        }
        if reader.remaining() != 0 {
            return Err(DecodeError(format!(
                "{} bytes after the last client",
                reader.remaining()
            )));
        }
        Ok(table)
    }
}

struct Reader<'a> {
    bytes: &'a Bytes,
    position: usize,
}

impl Reader<'_> {
    fn remaining(&self) -> usize {
        self.bytes.len() - self.position
    }

    fn take(&mut self, length: usize) -> Result<&[u8], DecodeError> {
        if length > self.remaining() {
            return Err(DecodeError(format!(
                "truncated: {length} bytes needed at offset {}, {} left",
                self.position,
                self.remaining()
            )));
        }
        let start = self.position;
        self.position += length;
        Ok(&self.bytes[start..self.position])
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u32(&mut self) -> Result<u32, DecodeError> {
        let mut buffer = [0u8; 4];
        buffer.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(buffer))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let mut buffer = [0u8; 8];
        buffer.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(buffer))
    }

    fn bytes(&mut self, length: usize) -> Result<Bytes, DecodeError> {
        let start = self.position;
        self.take(length)?;
        Ok(self.bytes.slice(start..self.position))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(client: u64, sequence: u64) -> RequestId {
        RequestId { client, sequence }
    }

    #[test]
    fn new_retry_and_stale_requests_are_told_apart() {
        let mut table = SessionTable::new(LogIndex(0));
        assert_eq!(table.check(id(7, 1)), Verdict::Apply);
        table.record(id(7, 1), LogIndex(3), Outcome::Pending);
        assert_eq!(table.check(id(7, 1)), Verdict::Flush);
        table.complete(7, LogIndex(3), Bytes::from_static(b"ok"));
        assert_eq!(
            table.check(id(7, 1)),
            Verdict::Duplicate(Outcome::Known(Bytes::from_static(b"ok")))
        );
        assert_eq!(table.check(id(7, 2)), Verdict::Apply);
        table.record(id(7, 2), LogIndex(4), Outcome::Unknown);
        assert_eq!(table.check(id(7, 1)), Verdict::Stale { last: 2 });
        assert_eq!(table.check(id(8, 1)), Verdict::Apply);
        assert_eq!(table.index(), LogIndex(4));
    }

    #[test]
    fn clients_expire_by_log_index_only() {
        let mut table = SessionTable::new(LogIndex(0));
        table.record(id(1, 1), LogIndex(10), Outcome::Unknown);
        table.record(id(2, 1), LogIndex(20), Outcome::Unknown);
        table.expire(LogIndex(110), 100);
        assert_eq!(table.len(), 2, "client 1 is exactly at the horizon");
        table.expire(LogIndex(111), 100);
        assert_eq!(table.len(), 1);
        assert_eq!(table.check(id(1, 1)), Verdict::Apply);
        assert_eq!(table.check(id(2, 1)), Verdict::Duplicate(Outcome::Unknown));
        // A client's newer request moves it out of the expiry horizon.
        table.record(id(2, 2), LogIndex(200), Outcome::Unknown);
        table.expire(LogIndex(250), 100);
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn the_encoding_round_trips_and_refuses_damage() {
        let mut table = SessionTable::new(LogIndex(0));
        table.record(
            id(1, 5),
            LogIndex(10),
            Outcome::Known(Bytes::from_static(b"r")),
        );
        table.record(id(2, 1), LogIndex(11), Outcome::Unknown);
        table.advance(LogIndex(12));
        let encoded = Bytes::from(table.encode());
        assert_eq!(encoded.len(), 16 + 2 * CLIENT_FIXED_BYTES + 4 + 1);
        assert_eq!(SessionTable::decode(&encoded), Ok(table.clone()));
        for length in 0..encoded.len() {
            assert!(
                SessionTable::decode(&encoded.slice(..length)).is_err(),
                "length {length}"
            );
        }
        for position in 0..encoded.len() {
            for value in [0u8, 1, 0x7F, 0xFF] {
                let mut changed = encoded.to_vec();
                changed[position] = value;
                let _ = SessionTable::decode(&Bytes::from(changed));
            }
        }
        let mut huge_count = encoded.to_vec();
        huge_count[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(SessionTable::decode(&Bytes::from(huge_count)).is_err());
    }
}
