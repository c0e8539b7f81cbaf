//! Byte layout of segments: the segment header, the record frame, and the
//! scanner that reads a segment back and tells a torn tail from corruption.
//! The layout is documented in `docs/wal-format.md`.

/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"RGWALSEG";
/// The format version this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes of the segment header.
pub const SEGMENT_HEADER_BYTES: usize = 32;
/// Bytes of a record header.
pub const RECORD_HEADER_BYTES: usize = 20;
/// The largest record body accepted; anything larger is corruption.
pub const RECORD_BODY_BYTES_MAX: u32 = 1 << 30;

/// The kinds of record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordType {
    /// A contiguous run of entries.
    Entries = 1,
    /// Term, vote and commit index.
    HardState = 2,
    /// A state machine snapshot exists at (index, term).
    Snapshot = 3,
    /// Entries up to an index are discarded.
    Compaction = 4,
    /// The group is gone.
    GroupRemoved = 5,
    /// The group's live state was rewritten from the given position on;
    /// its records before that position are dead.
    Rewritten = 6,
}

impl RecordType {
    /// The type for a byte read from disk, if it names one.
    pub fn from_byte(byte: u8) -> Option<RecordType> {
        match byte {
            1 => Some(RecordType::Entries),
            2 => Some(RecordType::HardState),
            3 => Some(RecordType::Snapshot),
            4 => Some(RecordType::Compaction),
            5 => Some(RecordType::GroupRemoved),
            6 => Some(RecordType::Rewritten),
            _ => None,
        }
    }
}

/// Encodes a segment header.
pub fn encode_segment_header(sequence: u64) -> [u8; SEGMENT_HEADER_BYTES] {
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&sequence.to_le_bytes());
    let crc = crc32c::crc32c(&header[0..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Why a segment header is not valid.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderProblem {
    /// Fewer bytes than a header.
    Short,
    /// Magic or checksum wrong.
    Damaged,
    /// A version this code does not know.
    Version(u32),
    /// The sequence in the header differs from the file name.
    Sequence(u64),
}

/// Checks a segment header against the sequence its file name gives.
pub fn check_segment_header(bytes: &[u8], sequence: u64) -> Result<(), HeaderProblem> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(HeaderProblem::Short);
    }
    let crc = read_u32(bytes, 24);
    if &bytes[0..8] != SEGMENT_MAGIC || crc != crc32c::crc32c(&bytes[0..24]) {
        return Err(HeaderProblem::Damaged);
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(HeaderProblem::Version(version));
    }
    let found = read_u64(bytes, 16);
    if found != sequence {
        return Err(HeaderProblem::Sequence(found));
    }
    Ok(())
}

/// Appends one framed record to `out`.
pub fn encode_record(kind: RecordType, group: u64, body: &[u8], out: &mut Vec<u8>) {
    encode_record_with(kind, group, out, |out| out.extend_from_slice(body));
}

/// Appends one framed record to `out`, its body written in place by
/// `write_body` (no intermediate buffer); the header is filled in after.
pub fn encode_record_with(
    kind: RecordType,
    group: u64,
    out: &mut Vec<u8>,
    write_body: impl FnOnce(&mut Vec<u8>),
) {
    let start = out.len();
    out.extend_from_slice(&[0u8; RECORD_HEADER_BYTES]);
    write_body(out);
    let body_len = out.len() - start - RECORD_HEADER_BYTES;
    assert!(
        body_len as u64 <= RECORD_BODY_BYTES_MAX as u64,
        "record body too large"
    );
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4] = kind as u8;
    out[start + 8..start + 16].copy_from_slice(&group.to_le_bytes());
    let mut crc = crc32c::crc32c(&out[start..start + 16]);
    crc = crc32c::crc32c_append(crc, &out[start + RECORD_HEADER_BYTES..]);
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

/// One record found by [`scan_segment`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RawRecord {
    /// Offset of the record header in the segment.
    pub offset: u64,
    /// Type of the record.
    pub kind: RecordType,
    /// Group the record belongs to.
    pub group: u64,
    /// Offset of the body in the segment.
    pub body_offset: u64,
    /// Length of the body.
    pub body_len: u32,
}

impl RawRecord {
    /// Bytes of header and body together.
    pub fn total_bytes(&self) -> u64 {
        RECORD_HEADER_BYTES as u64 + self.body_len as u64
    }
}

/// How a segment ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SegmentEnd {
    /// Every byte belongs to a valid record.
    Clean,
    /// A torn write starts at `offset`; everything from it on is garbage
    /// with no valid record after it.
    Torn {
        /// Where the torn tail starts.
        offset: u64,
    },
    /// A damaged record at `offset` is followed by a valid record.
    Corrupt {
        /// Where the damage starts.
        offset: u64,
        /// What is wrong there.
        reason: String,
    },
}

/// The records of a segment and how it ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// Valid records, in file order.
    pub records: Vec<RawRecord>,
    /// How the segment ends.
    pub end: SegmentEnd,
}

/// Reads every record of a segment whose header has been checked. Never
/// panics, whatever the bytes.
pub fn scan_segment(bytes: &[u8]) -> SegmentScan {
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES.min(bytes.len());
    while offset < bytes.len() {
        match parse_record(bytes, offset) {
            Ok(record) => {
                offset += record.total_bytes() as usize;
                records.push(record);
            }
            Err(problem) => {
                let end = if valid_record_after(bytes, offset + 1) {
                    SegmentEnd::Corrupt {
                        offset: offset as u64,
                        reason: problem,
                    }
                } else {
                    SegmentEnd::Torn {
                        offset: offset as u64,
                    }
                };
                return SegmentScan { records, end };
            }
        }
    }
    SegmentScan {
        records,
        end: SegmentEnd::Clean,
    }
}

/// Parses the record at `offset`, or says why there is none.
fn parse_record(bytes: &[u8], offset: usize) -> Result<RawRecord, String> {
    let remaining = bytes.len() - offset;
    if remaining < RECORD_HEADER_BYTES {
        return Err(format!("partial record header ({remaining} bytes)"));
    }
    let header = &bytes[offset..offset + RECORD_HEADER_BYTES];
    let body_len = read_u32(header, 0);
    let Some(kind) = RecordType::from_byte(header[4]) else {
        return Err(format!("unknown record type {}", header[4]));
    };
    if header[5..8] != [0, 0, 0] {
        return Err("non-zero reserved bytes".into());
    }
    if body_len > RECORD_BODY_BYTES_MAX {
        return Err(format!("record length {body_len} over the limit"));
    }
    let body_offset = offset + RECORD_HEADER_BYTES;
    let body_end = body_offset as u64 + body_len as u64;
    if body_end > bytes.len() as u64 {
        return Err(format!(
            "record length {body_len} runs past the end of the segment"
        ));
    }
    let body = &bytes[body_offset..body_end as usize];
    let expected = read_u32(header, 16);
    let actual = crc32c::crc32c_append(crc32c::crc32c(&header[0..16]), body);
    if expected != actual {
        return Err(format!(
            "checksum mismatch (stored {expected:08x}, computed {actual:08x})"
        ));
    }
    let group = read_u64(header, 8);
    if group == 0 {
        return Err("group id 0".into());
    }
    Ok(RawRecord {
        offset: offset as u64,
        kind,
        group,
        body_offset: body_offset as u64,
        body_len,
    })
}

/// True when any valid record starts at or after `from`.
fn valid_record_after(bytes: &[u8], from: usize) -> bool {
    (from..bytes.len().saturating_sub(RECORD_HEADER_BYTES - 1)).any(|offset| {
        // Cheap filters first; the checksum decides.
        RecordType::from_byte(bytes[offset + 4]).is_some()
            && bytes[offset + 5..offset + 8] == [0, 0, 0]
            && parse_record(bytes, offset).is_ok()
    })
}

/// Reads a little-endian u32 at `offset`; the caller checked the bounds.
pub fn read_u32(bytes: &[u8], offset: usize) -> u32 {
    let mut buffer = [0u8; 4];
    buffer.copy_from_slice(&bytes[offset..offset + 4]);
    u32::from_le_bytes(buffer)
}

/// Reads a little-endian u64 at `offset`; the caller checked the bounds.
pub fn read_u64(bytes: &[u8], offset: usize) -> u64 {
    let mut buffer = [0u8; 8];
    buffer.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(buffer)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segment_with(records: &[(RecordType, u64, &[u8])]) -> Vec<u8> {
        let mut bytes = encode_segment_header(7).to_vec();
        for (kind, group, body) in records {
            encode_record(*kind, *group, body, &mut bytes);
        }
        bytes
    }

    /// Golden bytes of a header and a record: the layout is an interface.
    #[test]
    fn layout_matches_the_documentation() {
        let header = encode_segment_header(7);
        assert_eq!(&header[0..8], b"RGWALSEG");
        assert_eq!(read_u32(&header, 8), 1);
        assert_eq!(read_u64(&header, 16), 7);
        assert_eq!(check_segment_header(&header, 7), Ok(()));
        assert_eq!(
            check_segment_header(&header, 8),
            Err(HeaderProblem::Sequence(7))
        );
        let mut record = Vec::new();
        encode_record(RecordType::HardState, 3, b"xyz", &mut record);
        assert_eq!(&record[0..4], &3u32.to_le_bytes());
        assert_eq!(record[4], 2);
        assert_eq!(&record[8..16], &3u64.to_le_bytes());
        assert_eq!(&record[20..], b"xyz");
        let mut covered = record[0..16].to_vec();
        covered.extend_from_slice(b"xyz");
        assert_eq!(read_u32(&record, 16), crc32c::crc32c(&covered));
    }

    #[test]
    fn scan_reads_back_every_record() {
        let bytes = segment_with(&[
            (RecordType::Entries, 1, b"aaaa"),
            (RecordType::HardState, 2, b""),
            (RecordType::Compaction, 1, b"cc"),
        ]);
        let scan = scan_segment(&bytes);
        assert_eq!(scan.end, SegmentEnd::Clean);
        let groups: Vec<u64> = scan.records.iter().map(|r| r.group).collect();
        assert_eq!(groups, vec![1, 2, 1]);
    }

    /// A damaged last record with nothing valid after it is a torn tail; a
    /// damaged record followed by a valid one is corruption.
    #[test]
    fn torn_tail_and_corruption_are_told_apart() {
        let bytes = segment_with(&[
            (RecordType::Entries, 1, b"first"),
            (RecordType::Entries, 1, b"second"),
        ]);
        let second = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 5;
        let mut torn = bytes.clone();
        torn[bytes.len() - 1] ^= 0xFF;
        assert_eq!(
            scan_segment(&torn).end,
            SegmentEnd::Torn {
                offset: second as u64
            }
        );
        let mut corrupt = bytes.clone();
        corrupt[SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES] ^= 0xFF;
        assert!(matches!(
            scan_segment(&corrupt).end,
            SegmentEnd::Corrupt { offset, .. } if offset == SEGMENT_HEADER_BYTES as u64
        ));
        let zeros = [bytes.clone(), vec![0u8; 100]].concat();
        assert_eq!(
            scan_segment(&zeros).end,
            SegmentEnd::Torn {
                offset: bytes.len() as u64
            }
        );
    }
}
