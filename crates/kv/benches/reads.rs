//! Range reads over a large table, as `Table::read` serves them: counting
//! a whole range, a limited read that counts past its limit (etcd's
//! `count`), and paging through the table the way `IterateRange` does,
//! with every page counting the rest of the range (before session 35)
//! against later pages counting only their own keys (`Query::RangePage`).
//!
//! `cargo bench -p regatta-kv --bench reads`

// `criterion_group!` defines a function it cannot document.
#![allow(missing_docs)]

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use regatta_kv::command::{
    decode, encode, Command, KeyRange, PutRequest, Query, RangeRequest, Response, ResponseOp,
};
use regatta_kv::{Store, Table};
use regatta_multiraft::StateMachine;
use regatta_raft::LogIndex;

const KEYS: u64 = 100_000;
const VALUE_BYTES: usize = 256;
/// Keys applied per batch while filling the table.
const FILL_BATCH: u64 = 1_000;
/// A page's byte cap: 1 MiB, about 3,700 of these keys.
const PAGE_BYTES: u64 = 1 << 20;

fn every_key() -> KeyRange {
    KeyRange {
        key: b"k".to_vec(),
        range_end: b"l".to_vec(),
    }
}

fn read(table: &Table, query: &Query) -> regatta_kv::command::RangeResult {
    let bytes = table.read(&Bytes::from(encode(query)));
    match decode::<Response>(&bytes).expect("response").result {
        Ok(ResponseOp::Range(result)) => result,
        other => panic!("a range result, not {other:?}"),
    }
}

/// Reads every key in pages of `PAGE_BYTES`; with `pages_count_themselves`
/// the pages after the first are `RangePage`s. Returns the keys read.
fn page_through(table: &Table, pages_count_themselves: bool) -> u64 {
    let mut request = RangeRequest {
        range: every_key(),
        bytes_max: PAGE_BYTES,
        ..RangeRequest::default()
    };
    let mut keys = 0;
    let mut first = true;
    loop {
        let query = if first || !pages_count_themselves {
            Query::Range(request.clone())
        } else {
            Query::RangePage(request.clone())
        };
        first = false;
        let page = read(table, &query);
        keys += page.kvs.len() as u64;
        match page.kvs.last() {
            Some(last) if page.more => {
                let mut next = last.key.clone();
                next.push(0);
                request.range.key = next;
            }
            _ => return keys,
        }
    }
}

fn reads(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let value = vec![b'v'; VALUE_BYTES];
    let mut index = 0u64;
    for start in (0..KEYS).step_by(FILL_BATCH as usize) {
        let commands: Vec<(LogIndex, Bytes)> = (start..start + FILL_BATCH)
            .map(|key| {
                index += 1;
                let put = Command::Put(PutRequest {
                    key: format!("k{key:08}").into_bytes(),
                    value: value.clone(),
                    prev_kv: false,
                });
                (LogIndex(index), Bytes::from(encode(&put)))
            })
            .collect();
        table.apply_batch(&commands).expect("apply");
    }
    assert_eq!(page_through(&table, true), KEYS);
    assert_eq!(page_through(&table, false), KEYS);

    let mut group = c.benchmark_group("reads");
    group.throughput(Throughput::Elements(KEYS));
    group.sample_size(10);
    group.bench_function(format!("count_only_{KEYS}_keys"), |b| {
        let query = Query::Range(RangeRequest {
            range: every_key(),
            count_only: true,
            ..RangeRequest::default()
        });
        b.iter(|| assert_eq!(read(&table, &query).count, KEYS));
    });
    group.bench_function(format!("limit_10_counting_{KEYS}_keys"), |b| {
        let query = Query::Range(RangeRequest {
            range: every_key(),
            limit: 10,
            ..RangeRequest::default()
        });
        b.iter(|| assert_eq!(read(&table, &query).count, KEYS));
    });
    group.bench_function(format!("pages_counting_the_rest_{KEYS}_keys"), |b| {
        b.iter(|| page_through(&table, false));
    });
    group.bench_function(format!("pages_counting_themselves_{KEYS}_keys"), |b| {
        b.iter(|| page_through(&table, true));
    });
    group.finish();
}

criterion_group!(benches, reads);
criterion_main!(benches);
