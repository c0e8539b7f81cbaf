//! Fuzzes the segment reader: any bytes, read as a segment (header check,
//! record scan, body decode), must give records or an error, never a panic.
//!
//! By hand: `cargo +nightly fuzz run segment_reader -- -max_total_time=300`
//! from `crates/wal`. CI only builds this target.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = regatta_wal::read_segment_bytes(data, 1);
});
