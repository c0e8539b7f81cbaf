//! Byte layout of segments: the segment header, the record frame, and the
//! scanner that reads a segment back and tells a torn tail from corruption.
//! The layout is documented in `docs/wal-format.md`.

/// Magic bytes at the start of every segment.
pub const SEGMENT_MAGIC: &[u8; 8] = b"RGWALSEG";
/// The format version this code writes.
pub const FORMAT_VERSION: u32 = 3;
/// The first version: no flags, segments not zero-filled. Still read.
pub const FORMAT_VERSION_1: u32 = 1;
/// The second version: flags and zero-fill, record checksums not salted.
/// Still read.
pub const FORMAT_VERSION_2: u32 = 2;
/// Record flag (version 2 on): the first record of a write that started when
/// every earlier byte of the segment was durable. A write that follows one
/// made without an fsync (it only advanced commit indexes) is unflagged.
pub const RECORD_FLAG_WRITE_START: u8 = 1;
/// Segments are zero-filled ahead of their records in steps of this many
/// bytes (version 2), so that appends overwrite existing blocks.
pub const ZERO_FILL_STEP_BYTES: u64 = 256 << 10;
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

/// How a segment's records are framed: its format version and the salt
/// its record checksums start from (version 3; `0`, no salt, before).
///
/// The salt is random and never leaves the disk, so bytes that a client
/// put inside a value cannot pass for a record of the segment: recovery
/// could otherwise take such bytes, found after a torn write, for a later
/// write and refuse to open (docs/wal-format.md, "Recovery").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentFormat {
    /// The format version.
    pub version: u32,
    /// The record checksum salt (non-zero from version 3, else `0`).
    pub salt: u32,
}

impl SegmentFormat {
    /// The format this code writes, with `salt` (non-zero).
    pub fn current(salt: u32) -> SegmentFormat {
        assert!(salt != 0, "a version 3 segment has a non-zero salt");
        SegmentFormat {
            version: FORMAT_VERSION,
            salt,
        }
    }
}

/// A fresh record checksum salt: random, never zero.
pub fn new_salt() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        // `RandomState` is keyed from the operating system's randomness.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.as_nanos())
            .unwrap_or_default();
        hasher.write_u128(now);
        hasher.write_u32(std::process::id());
        let salt = hasher.finish() as u32;
        if salt != 0 {
            return salt;
        }
    }
}

/// Encodes the header of a segment in the current format with `salt`.
pub fn encode_segment_header(sequence: u64, salt: u32) -> [u8; SEGMENT_HEADER_BYTES] {
    let format = SegmentFormat::current(salt);
    let mut header = [0u8; SEGMENT_HEADER_BYTES];
    header[0..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&format.version.to_le_bytes());
    header[12..16].copy_from_slice(&format.salt.to_le_bytes());
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
    /// A version this code does not read.
    Version(u32),
    /// The sequence in the header differs from the file name.
    Sequence(u64),
}

/// Checks a segment header against the sequence its file name gives, and
/// returns the segment's format.
pub fn check_segment_header(bytes: &[u8], sequence: u64) -> Result<SegmentFormat, HeaderProblem> {
    if bytes.len() < SEGMENT_HEADER_BYTES {
        return Err(HeaderProblem::Short);
    }
    let crc = read_u32(bytes, 24);
    if &bytes[0..8] != SEGMENT_MAGIC || crc != crc32c::crc32c(&bytes[0..24]) {
        return Err(HeaderProblem::Damaged);
    }
    let version = read_u32(bytes, 8);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_2 && version != FORMAT_VERSION_1 {
        return Err(HeaderProblem::Version(version));
    }
    let found = read_u64(bytes, 16);
    if found != sequence {
        return Err(HeaderProblem::Sequence(found));
    }
    // Versions 1 and 2 wrote zeros there and no salt into any checksum.
    let salt = if version == FORMAT_VERSION {
        read_u32(bytes, 12)
    } else {
        0
    };
    if version == FORMAT_VERSION && salt == 0 {
        return Err(HeaderProblem::Damaged);
    }
    Ok(SegmentFormat { version, salt })
}

/// Appends one framed record to `out` (see [`encode_record_with`]).
pub fn encode_record(kind: RecordType, group: u64, salt: u32, body: &[u8], out: &mut Vec<u8>) {
    encode_record_with(kind, group, salt, out, |out| out.extend_from_slice(body));
}

/// Appends one framed record to `out`, its body written in place by
/// `write_body` (no intermediate buffer); the header is filled in after.
///
/// `out` is one write's buffer: a record encoded at its start carries
/// [`RECORD_FLAG_WRITE_START`], and no other record does. `salt` is the
/// [`SegmentFormat::salt`] of the segments it goes to.
pub fn encode_record_with(
    kind: RecordType,
    group: u64,
    salt: u32,
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
    if start == 0 {
        out[start + 5] = RECORD_FLAG_WRITE_START;
    }
    out[start + 8..start + 16].copy_from_slice(&group.to_le_bytes());
    let crc = record_crc(
        salt,
        &out[start..start + 16],
        &out[start + RECORD_HEADER_BYTES..],
    );
    out[start + 16..start + 20].copy_from_slice(&crc.to_le_bytes());
}

/// A record's checksum: CRC32C started from the segment's salt (`0`, the
/// plain CRC32C, before version 3) over the header's first 16 bytes
/// (length, type, flags, reserved, group), then the body.
fn record_crc(salt: u32, header_covered: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c_append(salt, header_covered), body)
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
    /// The first record of a write ([`RECORD_FLAG_WRITE_START`]).
    pub write_start: bool,
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
    /// Every byte belongs to a valid record, or (version 2) only zeros
    /// follow the last one.
    Clean,
    /// A torn write starts at `offset`: nothing after it proves that a
    /// later write was made (docs/wal-format.md, "Recovery").
    Torn {
        /// Where the torn tail starts.
        offset: u64,
    },
    /// A damaged record at `offset` is followed by a later write.
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
    /// Where the valid records end: the segment's size as the log sees it.
    pub data_end: u64,
    /// How the segment ends.
    pub end: SegmentEnd,
}

/// Reads every record of a segment of `format` whose header has been
/// checked. Never panics, whatever the bytes.
pub fn scan_segment(bytes: &[u8], format: SegmentFormat) -> SegmentScan {
    let version = format.version;
    let mut records = Vec::new();
    let mut offset = SEGMENT_HEADER_BYTES.min(bytes.len());
    while offset < bytes.len() {
        match parse_record(bytes, offset, format) {
            Ok(record) => {
                offset += record.total_bytes() as usize;
                records.push(record);
            }
            Err(problem) => {
                let zero_filled =
                    version != FORMAT_VERSION_1 && bytes[offset..].iter().all(|byte| *byte == 0);
                let end = if zero_filled {
                    SegmentEnd::Clean
                } else if later_write_after(bytes, offset + 1, format) {
                    SegmentEnd::Corrupt {
                        offset: offset as u64,
                        reason: problem,
                    }
                } else {
                    SegmentEnd::Torn {
                        offset: offset as u64,
                    }
                };
                return SegmentScan {
                    records,
                    data_end: offset as u64,
                    end,
                };
            }
        }
    }
    SegmentScan {
        records,
        data_end: offset as u64,
        end: SegmentEnd::Clean,
    }
}

/// Parses the record at `offset`, or says why there is none.
fn parse_record(bytes: &[u8], offset: usize, format: SegmentFormat) -> Result<RawRecord, String> {
    let version = format.version;
    let remaining = bytes.len() - offset;
    if remaining < RECORD_HEADER_BYTES {
        return Err(format!("partial record header ({remaining} bytes)"));
    }
    let header = &bytes[offset..offset + RECORD_HEADER_BYTES];
    let body_len = read_u32(header, 0);
    let Some(kind) = RecordType::from_byte(header[4]) else {
        return Err(format!("unknown record type {}", header[4]));
    };
    let flags = header[5];
    let flags_known = if version == FORMAT_VERSION_1 {
        0
    } else {
        RECORD_FLAG_WRITE_START
    };
    if flags & !flags_known != 0 {
        return Err(format!("unknown record flags {flags:#04x}"));
    }
    if header[6..8] != [0, 0] {
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
    let actual = record_crc(format.salt, &header[0..16], body);
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
        write_start: flags & RECORD_FLAG_WRITE_START != 0,
    })
}

/// Clears the write-start flag of the record at the start of `buffer` and
/// re-seals its checksum: that write starts before the one before it is
/// durable, so it must not prove that one durable to recovery. It costs one
/// more checksum of that first record, and runs only for a write that
/// follows a commit-only one. `salt` is the one the record was sealed with.
pub fn clear_write_start(buffer: &mut [u8], salt: u32) {
    assert!(
        buffer.len() >= RECORD_HEADER_BYTES && buffer[5] == RECORD_FLAG_WRITE_START,
        "a write's buffer starts with a flagged record"
    );
    buffer[5] = 0;
    let body_end = RECORD_HEADER_BYTES + read_u32(buffer, 0) as usize;
    assert!(body_end <= buffer.len(), "the first record is whole");
    let crc = record_crc(salt, &buffer[0..16], &buffer[RECORD_HEADER_BYTES..body_end]);
    buffer[16..20].copy_from_slice(&crc.to_le_bytes());
}

/// True when a record at or after `from` proves that a write was made
/// after the one at `from`: from version 2 a valid record with the write
/// start flag (a torn write's own later records may be valid, as its
/// pages land in any order); in version 1 any valid record. From version
/// 3 a record is valid only under the segment's salt, so a record's image
/// inside a value (bytes a client chose) does not count.
fn later_write_after(bytes: &[u8], from: usize, format: SegmentFormat) -> bool {
    let version_1 = format.version == FORMAT_VERSION_1;
    let wanted_flags = if version_1 {
        0
    } else {
        RECORD_FLAG_WRITE_START
    };
    (from..bytes.len().saturating_sub(RECORD_HEADER_BYTES - 1)).any(|offset| {
        // Cheap filters first; the checksum decides.
        RecordType::from_byte(bytes[offset + 4]).is_some()
            && bytes[offset + 5] == wanted_flags
            && bytes[offset + 6..offset + 8] == [0, 0]
            && parse_record(bytes, offset, format).is_ok()
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

    type Write<'a> = &'a [(RecordType, u64, &'a [u8])];

    const SALT: u32 = 0x5A17_C0DE;
    const CURRENT: SegmentFormat = SegmentFormat {
        version: FORMAT_VERSION,
        salt: SALT,
    };
    const VERSION_2: SegmentFormat = SegmentFormat {
        version: FORMAT_VERSION_2,
        salt: 0,
    };
    const VERSION_1: SegmentFormat = SegmentFormat {
        version: FORMAT_VERSION_1,
        salt: 0,
    };

    /// A segment of `format` made of `writes`, each encoded as one write's
    /// buffer (its first record flagged).
    fn segment_in(format: SegmentFormat, writes: &[Write]) -> Vec<u8> {
        let mut bytes = header_of(format);
        for write in writes {
            let mut buffer = Vec::new();
            for (kind, group, body) in *write {
                encode_record(*kind, *group, format.salt, body, &mut buffer);
            }
            bytes.extend_from_slice(&buffer);
        }
        bytes
    }

    /// A current segment made of `writes`.
    fn segment_of(writes: &[Write]) -> Vec<u8> {
        segment_in(CURRENT, writes)
    }

    /// The header of segment 7 in `format`: an older version has zeros
    /// where the salt is.
    fn header_of(format: SegmentFormat) -> Vec<u8> {
        if format.version == FORMAT_VERSION {
            return encode_segment_header(7, format.salt).to_vec();
        }
        let mut bytes = encode_segment_header(7, 1).to_vec();
        bytes[8..12].copy_from_slice(&format.version.to_le_bytes());
        bytes[12..16].fill(0);
        let crc = crc32c::crc32c(&bytes[0..24]);
        bytes[24..28].copy_from_slice(&crc.to_le_bytes());
        bytes
    }

    /// The same records in a version 1 segment: version 1 in the header,
    /// no flags.
    fn version_1_segment(records: Write) -> Vec<u8> {
        let mut bytes = header_of(VERSION_1);
        for (kind, group, body) in records {
            // Encoded after the header, so no record is flagged.
            encode_record(*kind, *group, 0, body, &mut bytes);
        }
        bytes
    }

    /// Golden bytes of a header and a record: the layout is an interface.
    #[test]
    fn layout_matches_the_documentation() {
        let header = encode_segment_header(7, SALT);
        assert_eq!(&header[0..8], b"RGWALSEG");
        assert_eq!(read_u32(&header, 8), 3);
        assert_eq!(read_u32(&header, 12), SALT);
        assert_eq!(read_u64(&header, 16), 7);
        assert_eq!(read_u32(&header, 24), crc32c::crc32c(&header[0..24]));
        assert_eq!(&header[28..32], &[0; 4]);
        assert_eq!(check_segment_header(&header, 7), Ok(CURRENT));
        assert_eq!(
            check_segment_header(&header, 8),
            Err(HeaderProblem::Sequence(7))
        );
        let mut record = Vec::new();
        encode_record(RecordType::HardState, 3, SALT, b"xyz", &mut record);
        assert_eq!(&record[0..4], &3u32.to_le_bytes());
        assert_eq!(record[4], 2);
        assert_eq!(record[5], RECORD_FLAG_WRITE_START, "first of its write");
        assert_eq!(&record[6..8], &[0, 0]);
        assert_eq!(&record[8..16], &3u64.to_le_bytes());
        assert_eq!(&record[20..], b"xyz");
        let mut covered = record[0..16].to_vec();
        covered.extend_from_slice(b"xyz");
        assert_eq!(read_u32(&record, 16), crc32c::crc32c_append(SALT, &covered));
        let first_len = record.len();
        encode_record(RecordType::HardState, 3, SALT, b"", &mut record);
        assert_eq!(record[first_len + 5], 0, "not the first of its write");
    }

    #[test]
    fn scan_reads_back_every_record() {
        let bytes = segment_of(&[
            &[
                (RecordType::Entries, 1, b"aaaa"),
                (RecordType::HardState, 2, b""),
            ],
            &[(RecordType::Compaction, 1, b"cc")],
        ]);
        let scan = scan_segment(&bytes, CURRENT);
        assert_eq!(scan.end, SegmentEnd::Clean);
        assert_eq!(scan.data_end, bytes.len() as u64);
        let groups: Vec<u64> = scan.records.iter().map(|r| r.group).collect();
        assert_eq!(groups, vec![1, 2, 1]);
        let starts: Vec<bool> = scan.records.iter().map(|r| r.write_start).collect();
        assert_eq!(starts, vec![true, false, true]);
    }

    /// Zeros after the records are the end of a version 2 segment, not a
    /// torn tail; in version 1 they are a torn tail, as before.
    #[test]
    fn a_zero_filled_tail_ends_a_version_2_segment() {
        let records = segment_of(&[&[(RecordType::Entries, 1, b"first")]]);
        let filled = [records.clone(), vec![0u8; 4096]].concat();
        let scan = scan_segment(&filled, CURRENT);
        assert_eq!(scan.end, SegmentEnd::Clean);
        assert_eq!(scan.data_end, records.len() as u64);
        assert_eq!(scan.records.len(), 1);
        let empty = [header_of(CURRENT), vec![0u8; 4096]].concat();
        let scan = scan_segment(&empty, CURRENT);
        assert_eq!((scan.end, scan.data_end), (SegmentEnd::Clean, 32));
        let old = version_1_segment(&[(RecordType::Entries, 1, b"first")]);
        let old_filled = [old.clone(), vec![0u8; 100]].concat();
        assert_eq!(
            scan_segment(&old_filled, VERSION_1).end,
            SegmentEnd::Torn {
                offset: old.len() as u64
            }
        );
    }

    /// A torn last write whose pages landed out of order (a hole, then
    /// valid records of the same write) is a torn tail; damage followed by
    /// the start of a later write is corruption.
    #[test]
    fn torn_write_and_corruption_are_told_apart() {
        let first: Write = &[(RecordType::Entries, 1, b"first")];
        let second: Write = &[
            (RecordType::Entries, 1, b"second"),
            (RecordType::Entries, 2, b"third"),
            (RecordType::HardState, 1, b"fourth"),
        ];
        let bytes = [segment_of(&[first, second]), vec![0u8; 512]].concat();
        let second_at = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 5;
        // The page holding the start of the second write never landed.
        let mut hole = bytes.clone();
        hole[second_at..second_at + 30].fill(0);
        let scan = scan_segment(&hole, CURRENT);
        assert_eq!(
            scan.end,
            SegmentEnd::Torn {
                offset: second_at as u64
            }
        );
        assert_eq!(scan.records.len(), 1);
        // Garbage instead of zeros: the same.
        let mut garbage = bytes.clone();
        garbage[second_at + 2] ^= 0xFF;
        assert_eq!(
            scan_segment(&garbage, CURRENT).end,
            SegmentEnd::Torn {
                offset: second_at as u64
            }
        );
        // Damage in the first write, which the second proves acknowledged.
        let mut corrupt = bytes.clone();
        corrupt[SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES] ^= 0xFF;
        assert!(matches!(
            scan_segment(&corrupt, CURRENT).end,
            SegmentEnd::Corrupt { offset, .. } if offset == SEGMENT_HEADER_BYTES as u64
        ));
        // A hole in the middle of acknowledged data is not an end of records.
        let mut zeroed = bytes.clone();
        zeroed[SEGMENT_HEADER_BYTES..second_at].fill(0);
        assert!(matches!(
            scan_segment(&zeroed, CURRENT).end,
            SegmentEnd::Corrupt { offset, .. } if offset == SEGMENT_HEADER_BYTES as u64
        ));
    }

    /// Version 1 keeps its rules: a damaged record followed by any valid
    /// record is corruption, and flags are refused.
    #[test]
    fn version_1_segments_keep_their_rules() {
        let bytes = version_1_segment(&[
            (RecordType::Entries, 1, b"first"),
            (RecordType::Entries, 1, b"second"),
        ]);
        let scan = scan_segment(&bytes, VERSION_1);
        assert_eq!((scan.end, scan.records.len()), (SegmentEnd::Clean, 2));
        let second = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 5;
        let mut torn = bytes.clone();
        torn[bytes.len() - 1] ^= 0xFF;
        assert_eq!(
            scan_segment(&torn, VERSION_1).end,
            SegmentEnd::Torn {
                offset: second as u64
            }
        );
        let mut corrupt = bytes.clone();
        corrupt[SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES] ^= 0xFF;
        assert!(matches!(
            scan_segment(&corrupt, VERSION_1).end,
            SegmentEnd::Corrupt { offset, .. } if offset == SEGMENT_HEADER_BYTES as u64
        ));
        let flagged = segment_in(VERSION_2, &[&[(RecordType::Entries, 1, b"first")]]);
        let scan = scan_segment(&flagged, VERSION_1);
        assert!(scan.records.is_empty(), "a flag in version 1 is invalid");
    }

    /// A header whose version-3 salt is zero is damaged; older versions'
    /// zeros there are read as no salt.
    #[test]
    fn headers_of_every_version_are_read() {
        let mut unsalted = encode_segment_header(7, SALT);
        unsalted[12..16].fill(0);
        let crc = crc32c::crc32c(&unsalted[0..24]);
        unsalted[24..28].copy_from_slice(&crc.to_le_bytes());
        assert_eq!(
            check_segment_header(&unsalted, 7),
            Err(HeaderProblem::Damaged)
        );
        assert_eq!(
            check_segment_header(&header_of(VERSION_2), 7),
            Ok(VERSION_2)
        );
        assert_eq!(
            check_segment_header(&header_of(VERSION_1), 7),
            Ok(VERSION_1)
        );
        let old = segment_in(
            VERSION_2,
            &[&[
                (RecordType::Entries, 1, b"one"),
                (RecordType::HardState, 1, b""),
            ]],
        );
        let scan = scan_segment(&old, VERSION_2);
        assert_eq!((scan.end, scan.records.len()), (SegmentEnd::Clean, 2));
        assert!(
            scan_segment(&old, CURRENT).records.is_empty(),
            "salt differs"
        );
    }

    /// A value may hold the image of a record flagged as a write start (a
    /// client chose those bytes). When the write carrying it is torn before
    /// the image, recovery must read a torn tail, not corruption: version 2
    /// took the image for a later write and refused to open; version 3
    /// does not, as the image cannot know the segment's salt.
    #[test]
    fn a_record_image_inside_a_value_is_not_a_later_write() {
        let mut image = Vec::new();
        for salt in [0, SALT ^ 1] {
            encode_record(RecordType::HardState, 9, salt, b"forged", &mut image);
        }
        for format in [VERSION_2, CURRENT] {
            let first: Write = &[(RecordType::Entries, 1, b"acknowledged")];
            let second: Write = &[(RecordType::Entries, 1, &image)];
            let bytes = [segment_in(format, &[first, second]), vec![0u8; 512]].concat();
            let second_at = SEGMENT_HEADER_BYTES + RECORD_HEADER_BYTES + 12;
            // The second write's first page did not land: its header is
            // zeros, its body (holding the image) is there.
            let mut torn = bytes.clone();
            torn[second_at..second_at + RECORD_HEADER_BYTES].fill(0);
            let scan = scan_segment(&torn, format);
            assert_eq!(scan.records.len(), 1);
            if format == CURRENT {
                assert_eq!(
                    scan.end,
                    SegmentEnd::Torn {
                        offset: second_at as u64
                    }
                );
            } else {
                assert!(
                    matches!(scan.end, SegmentEnd::Corrupt { .. }),
                    "version 2 is fooled: {:?}",
                    scan.end
                );
            }
        }
    }
}
