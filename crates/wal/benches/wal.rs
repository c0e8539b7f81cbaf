//! `cargo bench -p regatta-wal`: synced appends per second with 1, 16 and
//! 256 groups and 1 and 64 concurrent writers, 64 B and 4 KiB entries,
//! beside the disk's raw limit measured in the same run (a loop of `write`
//! plus `fdatasync` of the same size). Each writer appends one entry per
//! request and waits for it to be durable, like a Raft group persisting a
//! ready; appends to one group are ordered by a per-group lock, as a
//! group's readies are.
//!
//! `WAL_BENCH_SECONDS` sets the time per configuration (default 2);
//! `WAL_BENCH_ONLY=size,groups,writers` (e.g. `64,16,64`) runs one row;
//! `WAL_BENCH_PAIRED=1` alternates one writer and the raw loop over seven
//! rounds per size and reports the medians (the fair single-writer ratio on
//! a disk whose speed drifts).

use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_raft::{Entry, EntryPayload, LogIndex, Term};
use regatta_wal::{GroupId, Wal, WalConfig, WriteBatch};

fn bench_dir(name: &str) -> PathBuf {
    // Under target/: the same disk as the data, never a tmpfs.
    let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wal-bench");
    let _ = std::fs::remove_dir_all(&root);
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).expect("bench dir");
    // Let the deletions (TRIM on a `discard` mount) and the previous row's
    // writeback finish, so that they do not land in this row's timing.
    let _ = std::process::Command::new("sync").status();
    std::thread::sleep(Duration::from_millis(1500));
    dir
}

struct Measured {
    operations: u64,
    bytes: u64,
    seconds: f64,
}

impl Measured {
    fn per_second(&self) -> f64 {
        self.operations as f64 / self.seconds
    }

    fn megabytes_per_second(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1_000_000.0
    }
}

/// The disk's limit: one writer, `write` + `fdatasync` per operation.
fn raw_sync_loop(size: usize, duration: Duration) -> Measured {
    let dir = bench_dir(&format!("raw-{size}"));
    let mut file = OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("raw"))
        .expect("raw file");
    let buffer = vec![0x5Au8; size];
    let start = Instant::now();
    let mut operations = 0;
    while start.elapsed() < duration {
        file.write_all(&buffer).expect("write");
        file.sync_data().expect("fdatasync");
        operations += 1;
    }
    Measured {
        operations,
        bytes: operations * size as u64,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn wal_appends(groups: u64, writers: u64, size: usize, duration: Duration) -> (Measured, u64) {
    let dir = bench_dir(&format!("wal-{groups}-{writers}-{size}"));
    let wal = Arc::new(Wal::open(WalConfig::new(&dir)).expect("open"));
    let next_index: Arc<Vec<Mutex<u64>>> = Arc::new((0..groups).map(|_| Mutex::new(1)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let operations = Arc::new(AtomicU64::new(0));
    let payload = Bytes::from(vec![0x5Au8; size]);
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|writer| {
            let (wal, next_index, stop, operations, payload) = (
                Arc::clone(&wal),
                Arc::clone(&next_index),
                Arc::clone(&stop),
                Arc::clone(&operations),
                payload.clone(),
            );
            std::thread::spawn(move || {
                let mut turn = writer;
                let (sender, receiver) = mpsc::sync_channel(1);
                while !stop.load(Ordering::Relaxed) {
                    let group = turn % groups;
                    turn += writers;
                    let sender = sender.clone();
                    {
                        let mut next = next_index[group as usize].lock().expect("lock");
                        let entry = Entry {
                            term: Term(1),
                            index: LogIndex(*next),
                            payload: EntryPayload::Normal(payload.clone()),
                        };
                        let mut batch = WriteBatch::new();
                        batch.entries(GroupId(group + 1), vec![entry]);
                        wal.submit(batch, move |result| {
                            let _ = sender.send(result);
                        });
                        *next += 1;
                    }
                    receiver.recv().expect("answer").expect("durable");
                    operations.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    std::thread::sleep(duration);
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().expect("writer");
    }
    let seconds = start.elapsed().as_secs_f64();
    let operations = operations.load(Ordering::Relaxed);
    let fsyncs = wal.stats().fsyncs;
    (
        Measured {
            operations,
            bytes: operations * size as u64,
            seconds,
        },
        fsyncs,
    )
}

/// 64 logical writers, each with one append outstanding, resubmitting from
/// the completion callback: how an async runtime drives the log, without an
/// OS thread (and its context switches) per writer.
fn wal_appends_callback_driven(
    groups: u64,
    writers: u64,
    size: usize,
    duration: Duration,
) -> (Measured, u64) {
    struct Driver {
        wal: Wal,
        next_index: Vec<Mutex<u64>>,
        payload: Bytes,
        groups: u64,
        writers: u64,
        deadline: Instant,
        operations: AtomicU64,
        finished: Mutex<u64>,
        all_finished: std::sync::Condvar,
    }
    fn submit(driver: Arc<Driver>, turn: u64) {
        let group = turn % driver.groups;
        let mut next = driver.next_index[group as usize].lock().expect("lock");
        let entry = Entry {
            term: Term(1),
            index: LogIndex(*next),
            payload: EntryPayload::Normal(driver.payload.clone()),
        };
        *next += 1;
        let mut batch = WriteBatch::new();
        batch.entries(GroupId(group + 1), vec![entry]);
        let again = Arc::clone(&driver);
        driver.wal.submit(batch, move |result| {
            result.expect("durable");
            again.operations.fetch_add(1, Ordering::Relaxed);
            if Instant::now() < again.deadline {
                let next_turn = turn + again.writers;
                submit(again, next_turn);
            } else {
                *again.finished.lock().expect("lock") += 1;
                again.all_finished.notify_all();
            }
        });
        drop(next);
    }
    let dir = bench_dir(&format!("wal-callback-{groups}-{writers}-{size}"));
    let start = Instant::now();
    let driver = Arc::new(Driver {
        wal: Wal::open(WalConfig::new(&dir)).expect("open"),
        next_index: (0..groups).map(|_| Mutex::new(1)).collect(),
        payload: Bytes::from(vec![0x5Au8; size]),
        groups,
        writers,
        deadline: start + duration,
        operations: AtomicU64::new(0),
        finished: Mutex::new(0),
        all_finished: std::sync::Condvar::new(),
    });
    for writer in 0..writers {
        submit(Arc::clone(&driver), writer);
    }
    let mut finished = driver.finished.lock().expect("lock");
    while *finished < writers {
        finished = driver.all_finished.wait(finished).expect("wait");
    }
    drop(finished);
    let seconds = start.elapsed().as_secs_f64();
    let operations = driver.operations.load(Ordering::Relaxed);
    let fsyncs = driver.wal.stats().fsyncs;
    (
        Measured {
            operations,
            bytes: operations * size as u64,
            seconds,
        },
        fsyncs,
    )
}

/// Bytes one single-entry append puts on disk: record header (20), entries
/// header (12), entry header (12) and payload tag (1) around the payload.
const RECORD_OVERHEAD_BYTES: usize = 45;

/// One writer against two raw loops (the payload size, and the exact bytes
/// the WAL writes per append), alternated over several rounds so that the
/// disk's drift hits all alike. Returns the medians.
fn paired_single_writer(size: usize, groups: u64, rounds: usize) -> [f64; 5] {
    let slice = Duration::from_secs(1);
    let mut samples: [Vec<f64>; 5] = Default::default();
    for _ in 0..rounds {
        let raw_payload = raw_sync_loop(size, slice).per_second();
        let raw_record = raw_sync_loop(size + RECORD_OVERHEAD_BYTES, slice).per_second();
        let wal = wal_appends(groups, 1, size, slice).0.per_second();
        for (samples, value) in samples.iter_mut().zip([
            raw_payload,
            raw_record,
            wal,
            wal / raw_payload,
            wal / raw_record,
        ]) {
            samples.push(value);
        }
    }
    samples.map(|mut values| {
        values.sort_by(|a, b| a.total_cmp(b));
        values[values.len() / 2]
    })
}

fn main() {
    // `cargo test --benches` runs bench binaries with `--bench` absent: skip.
    if !std::env::args().any(|argument| argument == "--bench") {
        return;
    }
    let seconds: u64 = std::env::var("WAL_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let duration = Duration::from_secs(seconds);
    let only: Option<(usize, u64, u64)> = std::env::var("WAL_BENCH_ONLY").ok().and_then(|value| {
        let parts: Vec<u64> = value
            .split(',')
            .filter_map(|part| part.parse().ok())
            .collect();
        (parts.len() == 3).then(|| (parts[0] as usize, parts[1], parts[2]))
    });
    if let Some((size, groups, writers)) = only {
        let (measured, fsyncs) = wal_appends(groups, writers, size, duration);
        println!(
            "{size} B, {groups} groups, {writers} writers: {:.0} appends/s, {:.1} per fsync",
            measured.per_second(),
            measured.operations as f64 / fsyncs.max(1) as f64
        );
        return;
    }
    if std::env::var("WAL_BENCH_PAIRED").is_ok() {
        println!("| entry | raw, payload size | raw, WAL record size | WAL, 1 writer | WAL / raw payload | WAL / raw record |");
        println!("|---|---|---|---|---|---|");
        for size in [64usize, 4096] {
            let [raw_payload, raw_record, wal, versus_payload, versus_record] =
                paired_single_writer(size, 16, 7);
            println!(
                "| {size} B | {raw_payload:.0} ({size} B) | {raw_record:.0} ({} B) | {wal:.0} | {versus_payload:.2} | {versus_record:.2} |",
                size + RECORD_OVERHEAD_BYTES
            );
        }
        return;
    }
    println!("| entry | groups | writers | appends/s | MB/s | appends per fsync | vs raw sync | vs 1 writer |");
    println!("|---|---|---|---|---|---|---|---|");
    for size in [64usize, 4096] {
        let raw = raw_sync_loop(size, duration);
        println!(
            "| {size} B | raw write+fdatasync | 1 | {:.0} | {:.2} | 1 | 1.00 | |",
            raw.per_second(),
            raw.megabytes_per_second()
        );
        for groups in [1u64, 16, 256] {
            let mut single = 0.0;
            for writers in [1u64, 64] {
                let (measured, fsyncs) = wal_appends(groups, writers, size, duration);
                let rate = measured.per_second();
                if writers == 1 {
                    single = rate;
                }
                println!(
                    "| {size} B | {groups} | {writers} | {rate:.0} | {:.2} | {:.1} | {:.2} | {:.1}x |",
                    measured.megabytes_per_second(),
                    measured.operations as f64 / fsyncs.max(1) as f64,
                    rate / raw.per_second(),
                    rate / single,
                );
            }
            let (measured, fsyncs) = wal_appends_callback_driven(groups, 64, size, duration);
            let rate = measured.per_second();
            println!(
                "| {size} B | {groups} | 64 callback-driven | {rate:.0} | {:.2} | {:.1} | {:.2} | {:.1}x |",
                measured.megabytes_per_second(),
                measured.operations as f64 / fsyncs.max(1) as f64,
                rate / raw.per_second(),
                rate / single,
            );
        }
    }
}
