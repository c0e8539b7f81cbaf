//! Crash consistency with a real process: a child appends synced batches
//! from several threads and reports every acknowledged index; the parent
//! kills it with SIGKILL at a random moment, reopens the log and checks
//! that every acknowledged entry is there, with the right content, and that
//! nothing beyond a torn point is visible (each group's log is an exact
//! prefix of what the child wrote). Each seed crashes twice: the second
//! child reopens the recovered log and appends after its tail, so that the
//! second crash hits a log that already went through a recovery. Rounds
//! alternate between direct and buffered writes (`WalConfig::direct_io`).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use regatta_raft::{
    Entry, EntryPayload, HardState, LogIndex, Membership, NodeId, Rng, SnapshotMeta, Term,
};
use regatta_wal::{GroupId, Wal, WalConfig, WriteBatch};

const CHILD_DIR_ENV: &str = "REGATTA_WAL_CRASH_CHILD_DIR";
const CHILD_SEED_ENV: &str = "REGATTA_WAL_CRASH_CHILD_SEED";
/// Varies the child's batching between rounds; payloads depend on the
/// seed alone, so that a later round continues the same logs.
const CHILD_ROUND_ENV: &str = "REGATTA_WAL_CRASH_CHILD_ROUND";
const THREADS: u64 = 4;
const GROUPS_PER_THREAD: u64 = 4;
const COMPACT_EVERY_ENTRIES: u64 = 300;

/// The log's settings for a child of `seed` in `round`: direct and
/// buffered writes alternate between rounds (and between seeds at a
/// round), so both paths crash, and each recovers what the other wrote.
fn config(dir: &Path, seed: u64, round: u64) -> WalConfig {
    let mut config = WalConfig::new(dir);
    config.direct_io = (seed + round).is_multiple_of(2);
    config.segment_size_bytes_max = 64 * 1024;
    config.rewrite_after_segments = 3;
    config.rewrite_group_bytes_max = 16 * 1024;
    config
}

/// The payload of entry `index` of `group`: its content depends only on
/// the seed, the group and the index, never on how it was batched.
fn payload(seed: u64, group: u64, index: u64) -> Bytes {
    let length = (seed ^ group.wrapping_mul(31) ^ index.wrapping_mul(17)) % 300;
    let mut bytes = format!("s{seed}-g{group}-i{index}-").into_bytes();
    bytes.extend(std::iter::repeat_n(
        b'a' + (index % 26) as u8,
        length as usize,
    ));
    Bytes::from(bytes)
}

fn meta(index: u64) -> SnapshotMeta {
    SnapshotMeta {
        index: LogIndex(index),
        term: Term(1),
        membership: Membership::with_voters([NodeId(1)]),
    }
}

/// The child: appends until killed. Not a test when the variable is unset.
#[test]
fn crash_child() {
    let (Ok(dir), Ok(seed)) = (std::env::var(CHILD_DIR_ENV), std::env::var(CHILD_SEED_ENV)) else {
        return;
    };
    let seed: u64 = seed.parse().expect("seed");
    let round: u64 = std::env::var(CHILD_ROUND_ENV)
        .ok()
        .and_then(|round| round.parse().ok())
        .unwrap_or(0);
    let wal = Arc::new(Wal::open(config(Path::new(&dir), seed, round)).expect("child open"));
    let threads: Vec<_> = (0..THREADS)
        .map(|thread| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || child_writer(&wal, seed, round, thread))
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
}

fn child_writer(wal: &Wal, seed: u64, round: u64, thread: u64) {
    let mut rng = Rng::new(seed * 1000 + round * 100 + thread);
    let groups: Vec<u64> = (1..=GROUPS_PER_THREAD)
        .map(|g| thread * GROUPS_PER_THREAD + g)
        .collect();
    // After the recovered tail: a fresh log starts at 1.
    let mut next: HashMap<u64, u64> = groups
        .iter()
        .map(|g| (*g, wal.last_index(GroupId(*g)).0 + 1))
        .collect();
    for _ in 0..100_000 {
        let group = groups[rng.range(0, groups.len() as u64) as usize];
        let first = next[&group];
        let count = rng.range(1, 9);
        let entries: Vec<Entry> = (first..first + count)
            .map(|index| Entry {
                term: Term(1),
                index: LogIndex(index),
                payload: EntryPayload::Normal(payload(seed, group, index)),
            })
            .collect();
        let last = first + count - 1;
        let mut batch = WriteBatch::new();
        batch.entries(GroupId(group), entries).hard_state(
            GroupId(group),
            HardState {
                term: Term(1),
                vote: Some(NodeId(1)),
                commit: LogIndex(last),
            },
        );
        if last / COMPACT_EVERY_ENTRIES > (first - 1) / COMPACT_EVERY_ENTRIES {
            let keep_from = last.saturating_sub(50).max(1);
            batch
                .snapshot(GroupId(group), meta(keep_from))
                .compact(GroupId(group), LogIndex(keep_from));
        }
        wal.append(batch).expect("child append");
        next.insert(group, last + 1);
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "ack {group} {last}").expect("report");
        stdout.flush().expect("flush");
    }
}

fn run_and_kill(dir: &Path, seed: u64, round: u64, kill_after: Duration) -> HashMap<u64, u64> {
    let mut child = Command::new(std::env::current_exe().expect("test binary"))
        .args(["crash_child", "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_SEED_ENV, seed.to_string())
        .env(CHILD_ROUND_ENV, round.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let acknowledged: Arc<Mutex<HashMap<u64, u64>>> = Arc::default();
    let stdout = child.stdout.take().expect("stdout");
    let reader = {
        let acknowledged = Arc::clone(&acknowledged);
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let mut words = line.split_whitespace();
                if words.next() != Some("ack") {
                    continue;
                }
                let group: u64 = words.next().and_then(|w| w.parse().ok()).expect("group");
                let last: u64 = words.next().and_then(|w| w.parse().ok()).expect("index");
                let mut acknowledged = acknowledged.lock().expect("lock");
                let known = acknowledged.entry(group).or_insert(0);
                *known = (*known).max(last);
            }
        })
    };
    std::thread::sleep(kill_after);
    child.kill().expect("SIGKILL");
    child.wait().expect("reap");
    reader.join().expect("reader");
    let acknowledged = acknowledged.lock().expect("lock").clone();
    acknowledged
}

fn check_recovered(dir: &Path, seed: u64, acknowledged: &HashMap<u64, u64>) {
    let wal = Wal::open(config(dir, seed, 0)).expect("reopen after SIGKILL");
    for (group, acknowledged_last) in acknowledged {
        let group_id = GroupId(*group);
        let last = wal.last_index(group_id);
        assert!(
            last.0 >= *acknowledged_last,
            "seed {seed}: group {group} acknowledged up to {acknowledged_last}, recovered {last}"
        );
        let first = wal.first_index(group_id);
        let entries = wal
            .entries(group_id, first, last.next(), u64::MAX)
            .expect("read");
        assert_eq!(
            entries.len() as u64,
            last.next().distance_from(first),
            "seed {seed}: gap in group {group}"
        );
        for entry in entries {
            assert_eq!(
                entry.payload,
                EntryPayload::Normal(payload(seed, *group, entry.index.0)),
                "seed {seed}: group {group} entry {} is not what was written",
                entry.index
            );
        }
        let hard_state = wal.hard_state(group_id);
        assert!(
            hard_state.commit <= last,
            "seed {seed}: commit past the log"
        );
    }
}

/// SIGKILL at random moments never loses an acknowledged append and never
/// exposes anything but a prefix of what was written.
#[test]
fn acknowledged_appends_survive_sigkill() {
    let seeds: u64 = std::env::var("WAL_CRASH_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    for seed in 1..=seeds {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut rng = Rng::new(seed);
        // Every acknowledgement of every round so far: all must survive.
        let mut acknowledged: HashMap<u64, u64> = HashMap::new();
        // Two crashes per seed; the second child appends to the log the
        // first crash left, so its crash hits a recovered log.
        for round in 0..2 {
            // The second child first recovers the log: give it longer.
            let kill_after = Duration::from_millis(rng.range(50 + 100 * round, 400));
            let recovered_before: HashMap<u64, u64> = acknowledged.clone();
            let new = run_and_kill(dir.path(), seed, round, kill_after);
            assert!(
                new.iter().any(|(group, last)| recovered_before
                    .get(group)
                    .is_none_or(|before| last > before)),
                "seed {seed} round {round}: the child acknowledged nothing new"
            );
            for (group, last) in new {
                let known = acknowledged.entry(group).or_insert(0);
                *known = (*known).max(last);
            }
            check_recovered(dir.path(), seed, &acknowledged);
        }
    }
}
