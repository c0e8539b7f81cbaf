//! Fuzzes the segment reader: any bytes, read as a segment (header check,
//! record scan, body decode), must give records or an error, never a panic.
//!
//! Checksums would stop a fuzzer at the first header, so the first input
//! byte picks a mode:
//! - even: a valid segment header followed by the raw input (framing, torn
//!   tails, corruption);
//! - odd: the input cut into records `[type][length: u16][body]` framed with
//!   valid checksums (every record body decoder); an even low length byte
//!   makes the record the first of a write (flagged).
//!
//! By hand: `cargo +nightly fuzz run segment_reader -- -max_total_time=300`
//! from `crates/wal`. CI only builds this target.

#![no_main]

use libfuzzer_sys::fuzz_target;
use regatta_wal::format::{encode_record, encode_segment_header, RecordType};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    const SALT: u32 = 0x5A17;
    let mut segment = encode_segment_header(1, SALT).to_vec();
    if mode % 2 == 0 {
        segment.extend_from_slice(rest);
    } else {
        let mut input = rest;
        while input.len() >= 3 {
            let kind = RecordType::from_byte(1 + input[0] % 6).unwrap_or(RecordType::Entries);
            let length = (u16::from_le_bytes([input[1], input[2]]) as usize).min(input.len() - 3);
            let group = 1 + input[0] as u64 / 6;
            if input[1] % 2 == 0 {
                // Encoded as the first record of a write: flagged.
                let mut write = Vec::new();
                encode_record(kind, group, SALT, &input[3..3 + length], &mut write);
                segment.extend_from_slice(&write);
            } else {
                encode_record(kind, group, SALT, &input[3..3 + length], &mut segment);
            }
            input = &input[3 + length..];
        }
    }
    let _ = regatta_wal::read_segment_bytes(&segment, 1);
});
