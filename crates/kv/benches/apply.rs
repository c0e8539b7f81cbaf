//! The table's apply path on its own: batches of etcd puts through
//! `Table::apply_batch` (decode, read the replaced record, write, commit
//! with the applied index), as the Raft apply thread runs them.
//!
//! `cargo bench -p regatta-kv --bench apply`

// `criterion_group!` defines a function it cannot document.
#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use regatta_kv::command::{encode, Command, PutRequest};
use regatta_kv::Store;
use regatta_multiraft::StateMachine;
use regatta_raft::LogIndex;

/// Puts per batch: about what one apply round takes at 64 clients.
const BATCH: u64 = 16;
/// Keys the puts go to, as in `scripts/bench-vs-etcd.sh`.
const KEYS: u64 = 10_000;
const VALUE_BYTES: usize = 256;

fn puts(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let value = vec![b'v'; VALUE_BYTES];
    // xorshift, seeded: the same keys in every run.
    let mut state = 0x9E37_79B9_7F4A_7C15_u64;
    let mut next_key = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        format!("{:08}", state % KEYS).into_bytes()
    };
    let mut index = 0u64;
    let mut batch = |next_key: &mut dyn FnMut() -> Vec<u8>| -> Vec<(LogIndex, Bytes)> {
        (0..BATCH)
            .map(|_| {
                index += 1;
                let put = Command::Put(PutRequest {
                    key: next_key(),
                    value: value.clone(),
                    prev_kv: false,
                });
                (LogIndex(index), Bytes::from(encode(&put)))
            })
            .collect()
    };
    // Every key exists, and the memtable holds several versions of each.
    for _ in 0..(4 * KEYS / BATCH) {
        let commands = batch(&mut next_key);
        table.apply_batch(&commands).expect("apply");
    }
    let mut group = c.benchmark_group("apply");
    group.throughput(Throughput::Elements(BATCH));
    group.bench_function(
        format!("put_{BATCH}x{VALUE_BYTES}B_over_{KEYS}_keys"),
        |b| {
            b.iter_batched(
                || batch(&mut next_key),
                |commands| table.apply_batch(&commands).expect("apply"),
                criterion::BatchSize::SmallInput,
            );
        },
    );
    group.finish();
}

criterion_group!(benches, puts);
criterion_main!(benches);
