//! Chooses the table engine (`docs/decisions/0003-table-engine.md`):
//! redb against fjall on the table workload, each without an fsync per
//! write (the WAL is the durability):
//! - `apply_batch`: 64 puts in one write transaction or batch, keys of
//!   16 B, values of 64 B and 1 KiB;
//! - `get`: point reads of random keys among 100,000;
//! - `scan_100`: a range read of 100 consecutive keys;
//! - `snapshot_100k`: open a point-in-time view and read all 100,000 keys.
//!
//! `cargo bench -p regatta-kv --features engine-bench --bench engines`

use std::path::Path;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};

const KEYS: u64 = 100_000;
const BATCH: u64 = 64;

fn key(index: u64) -> [u8; 16] {
    let mut key = [0u8; 16];
    key[..4].copy_from_slice(b"key/");
    key[4..].copy_from_slice(format!("{index:012}").as_bytes());
    key
}

/// A deterministic sequence of key numbers.
struct Keys(u64);

impl Keys {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % KEYS
    }
}

const TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("kv");

fn redb_open(dir: &Path) -> redb::Database {
    redb::Database::create(dir.join("table.redb")).expect("redb")
}

fn redb_put_batch(db: &redb::Database, keys: &mut Keys, value: &[u8]) {
    let mut transaction = db.begin_write().expect("begin");
    transaction.set_durability(redb::Durability::None);
    {
        let mut table = transaction.open_table(TABLE).expect("table");
        for _ in 0..BATCH {
            table
                .insert(key(keys.next()).as_slice(), value)
                .expect("insert");
        }
    }
    transaction.commit().expect("commit");
}

fn redb_fill(db: &redb::Database, value: &[u8]) {
    let mut transaction = db.begin_write().expect("begin");
    transaction.set_durability(redb::Durability::Immediate);
    {
        let mut table = transaction.open_table(TABLE).expect("table");
        for index in 0..KEYS {
            table.insert(key(index).as_slice(), value).expect("insert");
        }
    }
    transaction.commit().expect("commit");
}

fn fjall_open(dir: &Path) -> (fjall::Keyspace, fjall::PartitionHandle) {
    let keyspace = fjall::Config::new(dir.join("fjall")).open().expect("fjall");
    let partition = keyspace
        .open_partition("kv", fjall::PartitionCreateOptions::default())
        .expect("partition");
    (keyspace, partition)
}

fn fjall_put_batch(
    keyspace: &fjall::Keyspace,
    partition: &fjall::PartitionHandle,
    keys: &mut Keys,
    value: &[u8],
) {
    let mut batch = keyspace.batch();
    for _ in 0..BATCH {
        batch.insert(partition, key(keys.next()), value);
    }
    batch.commit().expect("commit");
}

fn fjall_fill(keyspace: &fjall::Keyspace, partition: &fjall::PartitionHandle, value: &[u8]) {
    for chunk in 0..KEYS / 1000 {
        let mut batch = keyspace.batch();
        for index in chunk * 1000..(chunk + 1) * 1000 {
            batch.insert(partition, key(index), value);
        }
        batch.commit().expect("commit");
    }
    keyspace
        .persist(fjall::PersistMode::SyncAll)
        .expect("persist");
}

fn apply_batch(c: &mut Criterion) {
    for value_bytes in [64usize, 1024] {
        let value = vec![7u8; value_bytes];
        let mut group = c.benchmark_group(format!("apply_batch_{value_bytes}B"));
        group.throughput(Throughput::Elements(BATCH));
        let dir = tempfile::tempdir().expect("tempdir");
        let db = redb_open(dir.path());
        let mut keys = Keys(0x9E37_79B9_7F4A_7C15);
        group.bench_function("redb", |b| {
            b.iter(|| redb_put_batch(&db, &mut keys, &value))
        });
        let (keyspace, partition) = fjall_open(dir.path());
        group.bench_function("fjall", |b| {
            b.iter(|| fjall_put_batch(&keyspace, &partition, &mut keys, &value))
        });
        group.finish();
    }
}

fn reads(c: &mut Criterion) {
    let value = vec![7u8; 256];
    let dir = tempfile::tempdir().expect("tempdir");
    let db = redb_open(dir.path());
    redb_fill(&db, &value);
    let (keyspace, partition) = fjall_open(dir.path());
    fjall_fill(&keyspace, &partition, &value);
    let mut keys = Keys(0x2545_F491_4F6C_DD1D);

    let mut group = c.benchmark_group("get");
    group.bench_function("redb", |b| {
        b.iter(|| {
            let transaction = db.begin_read().expect("read");
            let table = transaction.open_table(TABLE).expect("table");
            let found = table.get(key(keys.next()).as_slice()).expect("get");
            assert!(found.is_some());
        })
    });
    group.bench_function("fjall", |b| {
        b.iter(|| {
            let found = partition.get(key(keys.next())).expect("get");
            assert!(found.is_some());
        })
    });
    group.finish();

    let mut group = c.benchmark_group("scan_100");
    group.throughput(Throughput::Elements(100));
    group.bench_function("redb", |b| {
        b.iter(|| {
            let start = keys.next().min(KEYS - 100);
            let transaction = db.begin_read().expect("read");
            let table = transaction.open_table(TABLE).expect("table");
            let (low, high) = (key(start), key(start + 100));
            let count = table
                .range(low.as_slice()..high.as_slice())
                .expect("range")
                .count();
            assert_eq!(count, 100);
        })
    });
    group.bench_function("fjall", |b| {
        b.iter(|| {
            let start = keys.next().min(KEYS - 100);
            let count = partition.range(key(start)..key(start + 100)).count();
            assert_eq!(count, 100);
        })
    });
    group.finish();

    let mut group = c.benchmark_group("snapshot_100k");
    group.sample_size(10);
    group.throughput(Throughput::Elements(KEYS));
    group.bench_function("redb", |b| {
        b.iter_batched(
            || db.begin_read().expect("read"),
            |transaction| {
                let table = transaction.open_table(TABLE).expect("table");
                let mut bytes = 0usize;
                for item in table.range::<&[u8]>(..).expect("iter") {
                    let (k, v) = item.expect("item");
                    bytes += k.value().len() + v.value().len();
                }
                assert_eq!(bytes, (KEYS as usize) * (16 + 256));
            },
            BatchSize::PerIteration,
        )
    });
    group.bench_function("fjall", |b| {
        b.iter_batched(
            || keyspace.instant(),
            |instant| {
                let snapshot = partition.snapshot_at(instant);
                let mut bytes = 0usize;
                for item in snapshot.iter() {
                    let (k, v) = item.expect("item");
                    bytes += k.len() + v.len();
                }
                assert_eq!(bytes, (KEYS as usize) * (16 + 256));
            },
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, apply_batch, reads);
criterion_main!(benches);
