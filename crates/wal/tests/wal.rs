//! Behaviour of the WAL through its public API: persistence of every record
//! type across reopen, truncation, compaction, rolling, garbage collection,
//! cold-group rewrite, group commit, refusals and corruption handling.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use regatta_raft::{
    Entry, EntryPayload, HardState, LogIndex, Membership, NodeId, SnapshotMeta, Term,
};
use regatta_wal::format::{
    check_segment_header, scan_segment, SegmentEnd, SegmentFormat, FORMAT_VERSION,
    FORMAT_VERSION_1, FORMAT_VERSION_2, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES,
};
use regatta_wal::{Error, GroupId, SyncMode, Wal, WalConfig, WriteBatch};

fn entries(first: u64, count: u64, term: u64, tag: &str) -> Vec<Entry> {
    (first..first + count)
        .map(|index| Entry {
            term: Term(term),
            index: LogIndex(index),
            payload: EntryPayload::Normal(Bytes::from(format!("{tag}-{index}"))),
        })
        .collect()
}

fn config(dir: &Path) -> WalConfig {
    let mut config = WalConfig::new(dir);
    config.segment_size_bytes_max = 64 * 1024;
    config.rewrite_group_bytes_max = 1024;
    config
}

fn append_entries(wal: &Wal, group: u64, entries: Vec<Entry>) {
    let mut batch = WriteBatch::new();
    batch.entries(GroupId(group), entries);
    wal.append(batch).expect("append");
}

fn all_entries(wal: &Wal, group: u64) -> Vec<Entry> {
    let group = GroupId(group);
    let (first, last) = (wal.first_index(group), wal.last_index(group));
    if last < first {
        return Vec::new();
    }
    wal.entries(group, first, last.next(), u64::MAX)
        .expect("entries")
}

fn meta(index: u64, term: u64) -> SnapshotMeta {
    SnapshotMeta {
        index: LogIndex(index),
        term: Term(term),
        membership: Membership::with_voters([NodeId(1), NodeId(2), NodeId(3)]),
    }
}

/// Every record type is durable across a reopen.
#[test]
fn every_record_type_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let hard_state = HardState {
        term: Term(3),
        vote: Some(NodeId(2)),
        commit: LogIndex(5),
    };
    {
        let wal = Wal::open(config(dir.path())).expect("open");
        let mut batch = WriteBatch::new();
        batch
            .entries(GroupId(1), entries(1, 10, 3, "a"))
            .hard_state(GroupId(1), hard_state)
            .snapshot(GroupId(1), meta(4, 3))
            .compact(GroupId(1), LogIndex(4))
            .entries(GroupId(2), entries(1, 3, 1, "b"))
            .entries(GroupId(3), entries(1, 3, 1, "c"));
        wal.append(batch).expect("append");
        let mut batch = WriteBatch::new();
        batch.remove_group(GroupId(3));
        wal.append(batch).expect("remove");
    }
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.groups(), vec![GroupId(1), GroupId(2)]);
    assert_eq!(wal.hard_state(GroupId(1)), hard_state);
    assert_eq!(wal.snapshot(GroupId(1)), Some(meta(4, 3)));
    assert_eq!(wal.first_index(GroupId(1)), LogIndex(5));
    assert_eq!(wal.term(GroupId(1), LogIndex(4)), Ok(Term(3)));
    assert_eq!(all_entries(&wal, 1), entries(5, 6, 3, "a"));
    assert_eq!(all_entries(&wal, 2), entries(1, 3, 1, "b"));
    assert!(matches!(
        wal.entries(GroupId(1), LogIndex(2), LogIndex(6), u64::MAX),
        Err(Error::Compacted {
            compacted_to: LogIndex(4),
            ..
        })
    ));
    assert!(matches!(
        wal.entries(GroupId(1), LogIndex(5), LogIndex(12), u64::MAX),
        Err(Error::Unavailable { .. })
    ));
}

/// A new leader's entries that overwrote a suffix stay overwritten after a
/// reopen even when the log is then compacted past all of them: the
/// record that cut the suffix falls wholly below the compaction point,
/// and replay must still apply its cut.
#[test]
fn a_suffix_cut_below_the_compaction_point_stays_cut() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(config(dir.path())).expect("open");
        append_entries(&wal, 1, entries(1, 200, 1, "old"));
        append_entries(&wal, 1, entries(50, 11, 2, "new"));
        assert_eq!(wal.last_index(GroupId(1)), LogIndex(60));
        let mut batch = WriteBatch::new();
        batch
            .snapshot(GroupId(1), meta(60, 2))
            .compact(GroupId(1), LogIndex(60));
        wal.append(batch).expect("compact to the last index");
        assert_eq!(wal.last_index(GroupId(1)), LogIndex(60));
    }
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(
        wal.last_index(GroupId(1)),
        LogIndex(60),
        "entries 61..200 of the old term came back"
    );
    assert!(all_entries(&wal, 1).is_empty());
    append_entries(&wal, 1, entries(61, 1, 3, "next"));
    assert_eq!(wal.term(GroupId(1), LogIndex(61)), Ok(Term(3)));
}

/// A new leader's entries replace a conflicting suffix, durably.
#[test]
fn a_conflicting_suffix_is_truncated() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(config(dir.path())).expect("open");
        append_entries(&wal, 1, entries(1, 10, 1, "old"));
        append_entries(&wal, 1, entries(6, 2, 2, "new"));
        assert_eq!(wal.last_index(GroupId(1)), LogIndex(7));
    }
    let wal = Wal::open(config(dir.path())).expect("reopen");
    let mut expected = entries(1, 5, 1, "old");
    expected.extend(entries(6, 2, 2, "new"));
    assert_eq!(all_entries(&wal, 1), expected);
    assert_eq!(wal.term(GroupId(1), LogIndex(6)), Ok(Term(2)));
}

/// An installed snapshot replaces a log that does not contain it.
#[test]
fn an_installed_snapshot_replaces_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_entries(&wal, 1, entries(1, 5, 1, "old"));
    let mut batch = WriteBatch::new();
    batch.install_snapshot(GroupId(1), meta(100, 4));
    wal.append(batch).expect("install");
    assert_eq!(wal.first_index(GroupId(1)), LogIndex(101));
    assert_eq!(wal.last_index(GroupId(1)), LogIndex(100));
    append_entries(&wal, 1, entries(101, 2, 4, "after"));
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(all_entries(&wal, 1), entries(101, 2, 4, "after"));
    assert_eq!(wal.term(GroupId(1), LogIndex(100)), Ok(Term(4)));
}

/// Bad updates are refused with a clear error; nothing of that request is
/// written and the log keeps working.
#[test]
fn invalid_updates_are_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_entries(&wal, 1, entries(1, 3, 1, "a"));
    let mut gap = WriteBatch::new();
    gap.hard_state(GroupId(1), HardState::default())
        .entries(GroupId(1), entries(9, 1, 1, "gap"));
    let error = wal.append(gap).expect_err("gap");
    assert!(
        error.to_string().contains("gap after the last index 3"),
        "{error}"
    );
    let mut no_snapshot = WriteBatch::new();
    no_snapshot.compact(GroupId(1), LogIndex(2));
    let error = wal
        .append(no_snapshot)
        .expect_err("compaction without a snapshot");
    assert!(
        error.to_string().contains("covered by a snapshot"),
        "{error}"
    );
    let mut zero = WriteBatch::new();
    zero.entries(GroupId(0), entries(1, 1, 1, "z"));
    assert!(wal.append(zero).is_err());
    append_entries(&wal, 1, entries(4, 1, 1, "a"));
    assert_eq!(all_entries(&wal, 1), entries(1, 4, 1, "a"));
    assert_eq!(wal.hard_state(GroupId(1)), HardState::default());
}

/// Reads stop at the byte budget but always return one entry.
#[test]
fn reads_respect_the_size_budget() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    for first in (1..=100).step_by(10) {
        append_entries(&wal, 1, entries(first, 10, 1, "x"));
    }
    let one = wal
        .entries(GroupId(1), LogIndex(1), LogIndex(101), 1)
        .expect("read");
    assert_eq!(one.len(), 1);
    let some = wal
        .entries(GroupId(1), LogIndex(1), LogIndex(101), 300)
        .expect("read");
    assert!(some.len() > 1 && some.len() < 100);
    assert_eq!(some[0].index, LogIndex(1));
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "seg"))
        .collect();
    files.sort();
    files
}

/// Segments roll at the configured size; reads span segments and reopen.
#[test]
fn segments_roll_and_reads_cross_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let wal = Wal::open(config(dir.path())).expect("open");
        for first in (1..=2000).step_by(20) {
            append_entries(&wal, 1, entries(first, 20, 1, &"y".repeat(50)));
        }
        assert!(wal.stats().segments >= 3, "{:?}", wal.stats());
    }
    assert!(segment_files(dir.path()).len() >= 3);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(all_entries(&wal, 1), entries(1, 2000, 1, &"y".repeat(50)));
    drop(wal);

    // Only the oldest segments are ever removed: one missing in between
    // lost records, and the log refuses to open rather than skip them.
    let files = segment_files(dir.path());
    fs::remove_file(&files[1]).expect("remove a middle segment");
    match Wal::open(config(dir.path())) {
        Err(Error::Corruption { reason, .. }) => {
            assert!(reason.contains("missing"), "{reason}")
        }
        other => panic!("a gap in the segments was not refused: {:?}", other.err()),
    }
}

/// Garbage collection with many groups: once every group has compacted,
/// old segments go, and what remains reopens to the same state.
#[test]
fn garbage_collection_with_many_groups() {
    let dir = tempfile::tempdir().expect("tempdir");
    let groups = 100u64;
    let wal = Wal::open(config(dir.path())).expect("open");
    for round in 0..20u64 {
        let mut batch = WriteBatch::new();
        for group in 1..=groups {
            batch.entries(
                GroupId(group),
                entries(round * 5 + 1, 5, 1, &"z".repeat(20)),
            );
        }
        wal.append(batch).expect("append");
    }
    wal.barrier().expect("barrier");
    let before = wal.stats().segments;
    assert!(before >= 5, "{before} segments");
    let mut batch = WriteBatch::new();
    for group in 1..=groups {
        batch
            .snapshot(GroupId(group), meta(95, 1))
            .compact(GroupId(group), LogIndex(95));
    }
    wal.append(batch).expect("compact");
    wal.barrier().expect("barrier");
    let after = wal.stats().segments;
    assert!(after < before, "segments {before} -> {after}");
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    for group in [1, 50, 100] {
        assert_eq!(all_entries(&wal, group), entries(96, 5, 1, &"z".repeat(20)));
        assert_eq!(wal.snapshot(GroupId(group)), Some(meta(95, 1)));
    }
}

/// A group that never writes again does not pin old segments forever: its
/// live records are rewritten forward and the disk stays bounded.
#[test]
fn a_cold_group_is_rewritten_forward() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cold_hard_state = HardState {
        term: Term(9),
        vote: Some(NodeId(1)),
        commit: LogIndex(3),
    };
    {
        let wal = Wal::open(config(dir.path())).expect("open");
        let mut batch = WriteBatch::new();
        batch
            .entries(GroupId(7), entries(1, 3, 9, "cold"))
            .hard_state(GroupId(7), cold_hard_state);
        wal.append(batch).expect("cold");
        let mut first = 1;
        for _ in 0..1500 {
            let mut batch = WriteBatch::new();
            batch
                .entries(GroupId(1), entries(first, 10, 1, &"h".repeat(40)))
                .snapshot(GroupId(1), meta(first + 9, 1))
                .compact(GroupId(1), LogIndex(first + 9));
            wal.append(batch).expect("hot");
            first += 10;
        }
        wal.barrier().expect("barrier");
        let stats = wal.stats();
        assert!(
            stats.bytes_written > 15 * 64 * 1024,
            "too little written: {stats:?}"
        );
        assert!(stats.groups_rewritten >= 1, "{stats:?}");
        assert!(stats.segments <= 6, "disk keeps growing: {stats:?}");
    }
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(all_entries(&wal, 7), entries(1, 3, 9, "cold"));
    assert_eq!(wal.hard_state(GroupId(7)), cold_hard_state);
    assert_eq!(wal.last_index(GroupId(1)), LogIndex(15_000));
}

/// Group commit is real: many concurrent writers share fsyncs.
#[test]
fn concurrent_appends_share_fsyncs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Arc::new(Wal::open(config(dir.path())).expect("open"));
    let writers = 32u64;
    let appends = 40u64;
    let threads: Vec<_> = (1..=writers)
        .map(|group| {
            let wal = Arc::clone(&wal);
            std::thread::spawn(move || {
                for index in 1..=appends {
                    append_entries(&wal, group, entries(index, 1, 1, "c"));
                }
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("writer");
    }
    let stats = wal.stats();
    assert_eq!(stats.requests, writers * appends);
    assert!(
        stats.fsyncs * 2 <= stats.requests,
        "{} fsyncs for {} requests: no coalescing",
        stats.fsyncs,
        stats.requests
    );
    for group in 1..=writers {
        assert_eq!(wal.last_index(GroupId(group)), LogIndex(appends));
    }
}

fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
    HardState {
        term: Term(term),
        vote: Some(NodeId(vote)),
        commit: LogIndex(commit),
    }
}

fn append_hard_state(wal: &Wal, group: u64, state: HardState) {
    let mut batch = WriteBatch::new();
    batch.hard_state(GroupId(group), state);
    wal.append(batch).expect("append");
}

/// Entries and a hard state of group 1 in one batch: a write that syncs.
fn append_synced(wal: &Wal, entries: Vec<Entry>, state: HardState) {
    let mut batch = WriteBatch::new();
    batch
        .entries(GroupId(1), entries)
        .hard_state(GroupId(1), state);
    wal.append(batch).expect("append");
}

/// A batch that only advances commit indexes is written without an fsync
/// (Raft recomputes a lost commit index); a new term or vote, entries, or
/// a later batch that must sync, fsync it.
#[test]
fn commit_only_hard_states_are_written_without_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_synced(&wal, entries(1, 3, 1, "s"), hard_state(1, 1, 0));
    let synced = wal.stats();
    assert_eq!(synced.fsyncs, 1);

    append_hard_state(&wal, 1, hard_state(1, 1, 2));
    append_hard_state(&wal, 1, hard_state(1, 1, 3));
    let stats = wal.stats();
    assert_eq!(stats.batches, synced.batches + 2, "both were written");
    assert_eq!(stats.fsyncs, 1, "a commit index alone needs no fsync");
    assert_eq!(wal.hard_state(GroupId(1)), hard_state(1, 1, 3));

    // A group the log has never seen: its first hard state is a new term.
    append_hard_state(&wal, 2, hard_state(1, 1, 0));
    assert_eq!(wal.stats().fsyncs, 2);
    // A new vote, then a new term, each fsync.
    append_hard_state(&wal, 2, hard_state(1, 3, 0));
    assert_eq!(wal.stats().fsyncs, 3);
    append_hard_state(&wal, 1, hard_state(2, 1, 3));
    assert_eq!(wal.stats().fsyncs, 4);
    // A commit-only change in the same batch as entries rides their fsync.
    let mut batch = WriteBatch::new();
    batch
        .hard_state(GroupId(1), hard_state(2, 1, 4))
        .entries(GroupId(3), entries(1, 1, 1, "t"));
    wal.append(batch).expect("append");
    assert_eq!(wal.stats().fsyncs, 5);
    drop(wal);

    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.hard_state(GroupId(1)), hard_state(2, 1, 4));
    assert_eq!(wal.hard_state(GroupId(2)), hard_state(1, 3, 0));
}

/// With direct writes, commit-only batches wait in memory for the next
/// write: they cost no disk write of their own. A clean close writes and
/// fsyncs what waits, so the last commit index survives it.
#[test]
fn deferred_commit_indexes_ride_the_next_write_and_survive_a_close() {
    let dir = tempfile::tempdir().expect("tempdir");
    let direct = takes_direct_io(dir.path());
    let wal = Wal::open(config(dir.path())).expect("open");
    append_synced(&wal, entries(1, 3, 1, "s"), hard_state(1, 1, 0));
    // The first batch after an open is followed by garbage collection,
    // which fsyncs; the ones after it are steady state.
    append_hard_state(&wal, 1, hard_state(1, 1, 1));
    let before = wal.stats();
    append_hard_state(&wal, 1, hard_state(1, 1, 2));
    append_hard_state(&wal, 1, hard_state(1, 1, 3));
    let after = wal.stats();
    assert_eq!(after.fsyncs, before.fsyncs, "commit indexes need no fsync");
    if direct {
        assert_eq!(
            after.direct_writes, before.direct_writes,
            "nor a write of their own"
        );
    }
    append_synced(&wal, entries(4, 1, 1, "s"), hard_state(1, 1, 3));
    if direct {
        assert_eq!(wal.stats().direct_writes, after.direct_writes + 1);
    }
    append_hard_state(&wal, 1, hard_state(1, 1, 4));
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.hard_state(GroupId(1)), hard_state(1, 1, 4));
    assert_eq!(all_entries(&wal, 1), entries(1, 4, 1, "s"));
}

/// Only the last segment may end in bytes no fsync covered: a roll, and
/// garbage collection, fsync an unsynced commit index first.
#[test]
fn a_segment_roll_fsyncs_unsynced_commit_indexes_first() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_synced(&wal, entries(1, 1, 1, "r"), hard_state(1, 1, 0));
    append_hard_state(&wal, 1, hard_state(1, 1, 1));
    let before = wal.stats();
    // Larger than what is left of the 64 KiB segment: it rolls.
    let big = Entry {
        term: Term(1),
        index: LogIndex(2),
        payload: EntryPayload::Normal(Bytes::from(vec![7u8; 64 * 1024])),
    };
    append_entries(&wal, 1, vec![big]);
    let after = wal.stats();
    assert_eq!(
        after.fsyncs,
        before.fsyncs + 2,
        "the old segment's unsynced tail, then the new batch"
    );
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    assert_eq!(wal.hard_state(GroupId(1)), hard_state(1, 1, 1));
    assert_eq!(wal.last_index(GroupId(1)), LogIndex(2));
}

/// A write that starts while a commit-only write before it is not yet
/// fsynced carries no write-start flag: if a crash loses that earlier
/// write's pages, what follows is a torn tail, not corruption.
#[test]
fn a_write_after_an_unsynced_one_does_not_prove_it_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_synced(&wal, entries(1, 3, 1, "acked"), hard_state(1, 1, 0));
    drop(wal);
    let segment = segment_files(dir.path()).pop().expect("segment");
    let (synced_end, _) = data_end(&segment);

    let wal = Wal::open(config(dir.path())).expect("open");
    // The garbage collection after a reopen's first write fsyncs it.
    append_hard_state(&wal, 1, hard_state(1, 1, 2));
    append_hard_state(&wal, 1, hard_state(1, 1, 3));
    append_entries(&wal, 1, entries(4, 1, 1, "after"));
    drop(wal);
    let mut bytes = fs::read(&segment).expect("read");
    let scan = scan_segment(&bytes, format_of(&segment));
    let starts: Vec<(u64, bool)> = scan
        .records
        .iter()
        .filter(|record| record.offset >= synced_end)
        .map(|record| (record.offset, record.write_start))
        .collect();
    assert_eq!(starts.len(), 3, "two commit-only writes, then the entries");
    assert!(
        starts[0].1 && starts[1].1,
        "each started after a durable log"
    );
    assert!(!starts[2].1, "written before the one before it was durable");

    // A crash lost the unsynced write's page; the next write's landed.
    let lost = starts[1].0 as usize;
    bytes[lost..lost + RECORD_HEADER_BYTES].fill(0);
    fs::write(&segment, &bytes).expect("write");
    let (_, how) = data_end(&segment);
    assert_eq!(
        how,
        SegmentEnd::Torn {
            offset: starts[1].0
        }
    );
    let wal = Wal::open(config(dir.path())).expect("a torn tail, not corruption");
    assert_eq!(all_entries(&wal, 1), entries(1, 3, 1, "acked"));
    assert_eq!(wal.hard_state(GroupId(1)), hard_state(1, 1, 2));
}

/// Fresh writes are not cached (Raft keeps unapplied entries in memory);
/// a record read from disk is, so a retried catch-up read hits.
#[test]
fn records_are_cached_when_read_not_when_written() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_entries(&wal, 1, entries(1, 4, 1, "c"));
    let stats = wal.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (0, 0));
    assert_eq!(all_entries(&wal, 1), entries(1, 4, 1, "c"));
    let stats = wal.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (0, 1));
    assert_eq!(all_entries(&wal, 1), entries(1, 4, 1, "c"));
    let stats = wal.stats();
    assert_eq!((stats.cache_hits, stats.cache_misses), (1, 1));
}

/// The no-sync mode exists for tests and never fsyncs.
#[test]
fn no_sync_mode_skips_fsync() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = config(dir.path());
    config.sync_mode = SyncMode::NoSyncForTestsOnly;
    let wal = Wal::open(config).expect("open");
    append_entries(&wal, 1, entries(1, 1, 1, "n"));
    assert_eq!(wal.stats().fsyncs, 0);
}

/// Where the records of a segment file end (the file is zero-filled
/// beyond), and how the segment ends.
fn data_end(segment: &Path) -> (u64, SegmentEnd) {
    let bytes = fs::read(segment).expect("read");
    let scan = scan_segment(&bytes, format_of(segment));
    (scan.data_end, scan.end)
}

/// The format a segment file's header gives.
fn format_of(segment: &Path) -> SegmentFormat {
    let bytes = fs::read(segment).expect("read");
    let sequence = segment
        .file_stem()
        .and_then(|stem| stem.to_str())
        .and_then(|stem| stem.parse().ok())
        .expect("sequence");
    check_segment_header(&bytes, sequence).expect("header")
}

/// Writes a small log whose last `tail_records` records follow the
/// checkpoint; returns the segment path and the byte length at the
/// checkpoint (everything before it must survive).
fn small_log(dir: &Path, tail_records: u64) -> (PathBuf, u64) {
    let wal = Wal::open(config(dir)).expect("open");
    for index in 1..=5 {
        append_entries(&wal, 1, entries(index, 1, 1, "synced"));
    }
    drop(wal);
    let segment = segment_files(dir).pop().expect("segment");
    let (checkpoint, _) = data_end(&segment);
    let wal = Wal::open(config(dir)).expect("open");
    for index in 6..6 + tail_records {
        append_entries(&wal, 1, entries(index, 1, 1, "tail"));
    }
    (segment, checkpoint)
}

/// Opens the log in `dir`: it must recover every synced entry and a prefix
/// of the tail, or (only with `corruption_allowed`) report corruption.
fn check_recovers_synced_prefix(dir: &Path, corruption_allowed: bool) {
    match Wal::open(config(dir)) {
        Ok(wal) => {
            let recovered = all_entries(&wal, 1);
            assert!(
                recovered.len() >= 5,
                "lost synced entries: {}",
                recovered.len()
            );
            let mut expected = entries(1, 5, 1, "synced");
            expected.extend(entries(6, recovered.len() as u64 - 5, 1, "tail"));
            assert_eq!(
                recovered, expected,
                "recovered something that is not a prefix"
            );
        }
        Err(Error::Corruption { segment, .. }) if corruption_allowed => assert!(segment.exists()),
        Err(other) => panic!("unexpected error: {other}"),
    }
}

/// Truncation at every offset of the tail written after the checkpoint:
/// open recovers a prefix holding every record before the checkpoint. A
/// flipped byte at every offset of that tail (and in the zeros after it):
/// the same, or a report of corruption; never a panic.
#[test]
fn damage_in_the_tail_recovers_a_prefix_or_reports_corruption() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (segment, checkpoint) = small_log(dir.path(), 3);
    let good = fs::read(&segment).expect("read");
    let (end, _) = data_end(&segment);
    assert!(
        end > checkpoint + 60,
        "three tail records after {checkpoint}"
    );
    assert!(
        good.len() as u64 > end + 1000,
        "zero-filled after the records"
    );
    let work = tempfile::tempdir().expect("tempdir");
    let target = work.path().join(segment.file_name().expect("name"));
    for length in checkpoint..=end {
        // A file cut short is what a crash leaves: always a torn tail to
        // drop, never corruption.
        fs::write(&target, &good[..length as usize]).expect("write");
        check_recovers_synced_prefix(work.path(), false);
        fs::remove_dir_all(work.path()).expect("clean");
        fs::create_dir_all(work.path()).expect("mkdir");
    }
    for position in (checkpoint as usize..end as usize).chain(end as usize..end as usize + 64) {
        let mut bad = good.clone();
        bad[position] ^= 0x5A;
        fs::write(&target, &bad).expect("write");
        check_recovers_synced_prefix(work.path(), true);
        fs::remove_dir_all(work.path()).expect("clean");
        fs::create_dir_all(work.path()).expect("mkdir");
    }
}

/// A damaged record followed by valid ones is corruption: open fails and
/// names the file and the offset, instead of skipping it.
#[test]
fn damage_before_valid_records_is_reported_with_file_and_offset() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (segment, _) = small_log(dir.path(), 3);
    let mut bytes = fs::read(&segment).expect("read");
    let damaged_at = 32 + 20 + 3; // Inside the body of the first record.
    bytes[damaged_at] ^= 0xFF;
    fs::write(&segment, &bytes).expect("write");
    match Wal::open(config(dir.path())) {
        Err(Error::Corruption {
            segment: file,
            offset,
            reason,
        }) => {
            assert_eq!(file, segment);
            assert_eq!(offset, 32);
            assert!(reason.contains("checksum"), "{reason}");
        }
        Err(other) => panic!("expected corruption, got {other}"),
        Ok(_) => panic!("opened a corrupt log"),
    }
}

/// A segment header that is not ours is refused with the file named.
#[test]
fn a_foreign_segment_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (segment, _) = small_log(dir.path(), 0);
    let mut bytes = fs::read(&segment).expect("read");
    bytes[8] = 9; // Version.
    fs::write(&segment, &bytes).expect("write");
    let error = Wal::open(config(dir.path())).err().expect("refused");
    assert!(
        error.to_string().contains(&segment.display().to_string()),
        "{error}"
    );
}

/// A last segment with a bad header is deleted as torn at its creation
/// only when only zeros follow the header. A damaged salt hides the
/// records from the scan: that segment must be refused, not deleted.
#[test]
fn a_bad_header_is_a_torn_creation_only_before_any_record() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (segment, _) = small_log(dir.path(), 0);
    let mut bytes = fs::read(&segment).expect("read");
    bytes[12] ^= 0xFF; // The salt.
    fs::write(&segment, &bytes).expect("write");
    let error = Wal::open(config(dir.path())).err().expect("refused");
    assert!(matches!(error, Error::Corruption { .. }), "{error}");
    assert!(segment.exists(), "not deleted");

    // A second segment torn while being created: its header is damaged
    // and only zeros follow. It is deleted; the first one's records stay.
    bytes[12] ^= 0xFF;
    fs::write(&segment, &bytes).expect("write");
    let created = segment.with_file_name(format!("{:020}.seg", 2));
    let mut torn = vec![0u8; SEGMENT_HEADER_BYTES + 4096];
    torn[0..8].copy_from_slice(b"RGWALSEG");
    fs::write(&created, &torn).expect("write");
    let wal = Wal::open(config(dir.path())).expect("open");
    assert!(!created.exists(), "torn at its creation: deleted");
    assert_eq!(wal.last_index(GroupId(1)), LogIndex(5));
}

/// A second instance on the same directory is refused while the first is
/// open, with a message that says what to do; after a close it opens.
#[test]
fn a_second_instance_on_one_directory_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = Wal::open(config(dir.path())).expect("open");
    let error = Wal::open(config(dir.path())).err().expect("refused");
    assert!(error.to_string().contains("in use"), "{error}");
    first.close();
    Wal::open(config(dir.path())).expect("reopen after close");
}

/// Segments are zero-filled ahead of their records (format version 2):
/// the file is longer than its records and only zeros follow them; after
/// a reopen, appends continue where the records end; a write past the
/// filled end fills the next step.
#[test]
fn segments_are_zero_filled_ahead_and_appends_continue_after_reopen() {
    zero_fill_and_reopen(false);
    zero_fill_and_reopen(true);
}

/// The zero-fill test with buffered or direct writes; direct writes round
/// the zeros up to the next 4 KiB block.
fn zero_fill_and_reopen(direct_io: bool) {
    let dir = tempfile::tempdir().expect("tempdir");
    let step = regatta_wal::format::ZERO_FILL_STEP_BYTES;
    let config = || WalConfig {
        direct_io,
        ..WalConfig::new(dir.path())
    };
    let block = |offset: u64| {
        if direct_io {
            offset.div_ceil(4096) * 4096
        } else {
            offset
        }
    };
    let wal = Wal::open(config()).expect("open");
    for index in 1..=3 {
        append_entries(&wal, 1, entries(index, 1, 1, "first"));
    }
    drop(wal);
    let segment = segment_files(dir.path()).pop().expect("segment");
    let bytes = fs::read(&segment).expect("read");
    assert_eq!(bytes.len() as u64, SEGMENT_HEADER_BYTES as u64 + step);
    let (end, how) = data_end(&segment);
    assert_eq!(how, SegmentEnd::Clean);
    assert!(end > SEGMENT_HEADER_BYTES as u64);
    assert!(bytes[end as usize..].iter().all(|byte| *byte == 0));
    let wal = Wal::open(config()).expect("reopen");
    for index in 4..=6 {
        append_entries(&wal, 1, entries(index, 1, 1, "second"));
    }
    // One batch larger than what is left of the first step.
    let big = Entry {
        term: Term(1),
        index: LogIndex(7),
        payload: EntryPayload::Normal(Bytes::from(vec![7u8; step as usize])),
    };
    append_entries(&wal, 1, vec![big.clone()]);
    let direct_writes = wal.stats().direct_writes;
    let expect_direct = direct_io && takes_direct_io(dir.path());
    assert_eq!(
        direct_writes > 0,
        expect_direct,
        "{direct_writes} direct writes"
    );
    assert_eq!(wal.direct_io(), expect_direct, "the log says how it writes");
    drop(wal);
    assert_eq!(segment_files(dir.path()), vec![segment.clone()]);
    let (end, how) = data_end(&segment);
    assert_eq!(how, SegmentEnd::Clean);
    assert_eq!(
        fs::metadata(&segment).expect("stat").len(),
        block(end + step),
        "the write past the filled end filled one more step"
    );
    let wal = Wal::open(config()).expect("reopen");
    let mut expected = entries(1, 3, 1, "first");
    expected.extend(entries(4, 3, 1, "second"));
    expected.push(big);
    assert_eq!(all_entries(&wal, 1), expected);
}

/// Whether the file system of `dir` opens files with `O_DIRECT` (tmpfs
/// before Linux 6.6 does not; the WAL then writes through the page cache).
fn takes_direct_io(dir: &Path) -> bool {
    use std::os::unix::fs::OpenOptionsExt;
    let path = dir.join("direct-probe");
    let opened = fs::OpenOptions::new()
        .create(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(&path)
        .is_ok();
    let _ = fs::remove_file(&path);
    opened
}

/// Rewrites a current segment as an older `version` wrote it: that version
/// in the header, zeros where the salt was, record checksums unsalted;
/// version 1 also had no record flags and no zeros after the records.
fn downgrade(segment: &Path, version: u32) {
    let bytes = fs::read(segment).expect("read");
    let scan = scan_segment(&bytes, format_of(segment));
    let mut old = if version == FORMAT_VERSION_1 {
        bytes[..scan.data_end as usize].to_vec()
    } else {
        bytes.clone()
    };
    old[8..12].copy_from_slice(&version.to_le_bytes());
    old[12..16].fill(0);
    let crc = crc32c::crc32c(&old[0..24]);
    old[24..28].copy_from_slice(&crc.to_le_bytes());
    for record in &scan.records {
        let at = record.offset as usize;
        if version == FORMAT_VERSION_1 {
            old[at + 5] = 0;
        }
        let body_end = record.body_offset as usize + record.body_len as usize;
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&old[at..at + 16]),
            &old[record.body_offset as usize..body_end],
        );
        old[at + 16..at + RECORD_HEADER_BYTES].copy_from_slice(&crc.to_le_bytes());
    }
    fs::write(segment, &old).expect("write");
}

/// A log written in format version 1 or 2 opens with that version's
/// rules; new writes go to a new segment of the current version, and the
/// two read back together.
#[test]
fn an_older_log_opens_and_new_writes_take_a_new_segment() {
    for version in [FORMAT_VERSION_1, FORMAT_VERSION_2] {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = Wal::open(config(dir.path())).expect("open");
        for index in 1..=3 {
            append_entries(&wal, 1, entries(index, 1, 1, "old"));
        }
        drop(wal);
        let old = segment_files(dir.path()).pop().expect("segment");
        downgrade(&old, version);
        let wal = Wal::open(config(dir.path())).expect("open the older version");
        assert_eq!(all_entries(&wal, 1), entries(1, 3, 1, "old"));
        append_entries(&wal, 1, entries(4, 2, 1, "new"));
        drop(wal);
        let files = segment_files(dir.path());
        assert_eq!(files.len(), 2, "{files:?}");
        assert_eq!(format_of(&files[0]).version, version);
        let current = format_of(&files[1]);
        assert_eq!(current.version, FORMAT_VERSION);
        assert_ne!(current.salt, 0);
        let wal = Wal::open(config(dir.path())).expect("reopen");
        let mut expected = entries(1, 3, 1, "old");
        expected.extend(entries(4, 2, 1, "new"));
        assert_eq!(all_entries(&wal, 1), expected);
        // A reopen keeps appending to the current segment, with its salt.
        append_entries(&wal, 1, entries(6, 1, 1, "more"));
        drop(wal);
        assert_eq!(segment_files(dir.path()).len(), 2);
        assert_eq!(format_of(&files[1]), current);
        let wal = Wal::open(config(dir.path())).expect("reopen");
        expected.extend(entries(6, 1, 1, "more"));
        assert_eq!(all_entries(&wal, 1), expected);
    }
}

/// A client's value may hold the image of a record flagged as a write
/// start. When the write carrying it is torn before the image, open must
/// find a torn tail and keep every acknowledged write, not take the image
/// for a later write and refuse to open: the image cannot carry the
/// segment's salt (format version 3). Fails on version 2.
#[test]
fn a_record_image_in_a_value_does_not_stop_a_torn_log_from_opening() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    append_entries(&wal, 1, entries(1, 3, 1, "acked"));
    drop(wal);
    let segment = segment_files(dir.path()).pop().expect("segment");
    let (acked_end, _) = data_end(&segment);
    // Images under no salt (what version 2 would take) and under a guess.
    let mut image = Vec::new();
    for salt in [0, 0x1234_5678] {
        regatta_wal::format::encode_record(
            regatta_wal::format::RecordType::HardState,
            1,
            salt,
            &[7; 24],
            &mut image,
        );
    }
    let wal = Wal::open(config(dir.path())).expect("open");
    let value = Entry {
        index: LogIndex(4),
        term: Term(1),
        payload: EntryPayload::Normal(Bytes::from(image)),
    };
    append_entries(&wal, 1, vec![value]);
    drop(wal);
    // The crash lost the page holding the last write's record header.
    let mut bytes = fs::read(&segment).expect("read");
    let at = acked_end as usize;
    bytes[at..at + RECORD_HEADER_BYTES].fill(0);
    fs::write(&segment, &bytes).expect("write");
    assert_eq!(data_end(&segment).1, SegmentEnd::Torn { offset: acked_end });
    let wal = Wal::open(config(dir.path())).expect("a torn tail, not corruption");
    assert_eq!(all_entries(&wal, 1), entries(1, 3, 1, "acked"));
}

/// A direct write rewrites the block its records start in, and a crash can
/// tear it at any 512-byte sector: the sectors before the tear hold the new
/// bytes, the ones after it the old zeros. The acknowledged records in the
/// rewritten block are the same bytes in both, so what is lost is only the
/// torn write's own records from the tear on; each group's log stays a
/// prefix of what was written, and appends go on after it.
#[test]
fn a_direct_write_torn_at_a_sector_loses_only_that_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    for index in 1..=3 {
        append_entries(&wal, 1, entries(index, 1, 1, "acked"));
    }
    assert_eq!(
        wal.stats().direct_writes > 0,
        takes_direct_io(dir.path()),
        "direct writes are the default"
    );
    drop(wal);
    let segment = segment_files(dir.path()).pop().expect("segment");
    let (acked_end, _) = data_end(&segment);
    assert!(
        acked_end % 4096 != 0,
        "the acknowledged records end mid-block"
    );
    let wal = Wal::open(config(dir.path())).expect("open");
    let torn_tag = "torn".repeat(20);
    let mut batch = WriteBatch::new();
    batch.entries(GroupId(1), entries(4, 20, 1, &torn_tag));
    batch.entries(GroupId(2), entries(1, 20, 1, &torn_tag));
    wal.append(batch).expect("append");
    drop(wal);
    let (written_end, _) = data_end(&segment);
    assert!(written_end - acked_end > 2048, "the write spans sectors");
    // The first sector boundary past the write's first record header.
    let tear = (acked_end + RECORD_HEADER_BYTES as u64).div_ceil(512) * 512;
    let mut bytes = fs::read(&segment).expect("read");
    bytes[tear as usize..written_end as usize].fill(0);
    fs::write(&segment, &bytes).expect("write");
    let (_, how) = data_end(&segment);
    assert!(
        matches!(how, SegmentEnd::Torn { offset } if offset >= acked_end),
        "a torn tail after the acknowledged records, not {how:?}"
    );
    let wal = Wal::open(config(dir.path())).expect("open after the torn write");
    let group_1 = all_entries(&wal, 1);
    let mut written_1 = entries(1, 3, 1, "acked");
    written_1.extend(entries(4, 20, 1, &torn_tag));
    assert!(group_1.len() >= 3 && written_1.starts_with(&group_1));
    assert!(entries(1, 20, 1, &torn_tag).starts_with(&all_entries(&wal, 2)));
    let next = group_1.len() as u64 + 1;
    append_entries(&wal, 1, entries(next, 2, 2, "after"));
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    let mut expected = group_1;
    expected.extend(entries(next, 2, 2, "after"));
    assert_eq!(all_entries(&wal, 1), expected);
}

/// The pages of a write reach the disk in any order: a last write whose
/// first page is missing while its later records landed is a torn write.
/// Open keeps every acknowledged write before it, drops it, and appends
/// continue over it; the next open reads everything back.
#[test]
fn a_torn_last_write_with_a_hole_loses_only_that_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wal = Wal::open(config(dir.path())).expect("open");
    for index in 1..=3 {
        append_entries(&wal, 1, entries(index, 1, 1, "acked"));
    }
    drop(wal);
    let segment = segment_files(dir.path()).pop().expect("segment");
    let (acked_end, _) = data_end(&segment);
    // The last write: entries of two groups and hard states.
    let wal = Wal::open(config(dir.path())).expect("open");
    let mut batch = WriteBatch::new();
    batch.entries(GroupId(1), entries(4, 2, 1, "torn"));
    batch.entries(GroupId(2), entries(1, 2, 1, "torn"));
    batch.hard_state(
        GroupId(1),
        HardState {
            term: Term(1),
            vote: None,
            commit: LogIndex(3),
        },
    );
    wal.append(batch).expect("append");
    drop(wal);
    let mut bytes = fs::read(&segment).expect("read");
    bytes[acked_end as usize..acked_end as usize + RECORD_HEADER_BYTES + 8].fill(0);
    fs::write(&segment, &bytes).expect("write");
    let (_, how) = data_end(&segment);
    assert_eq!(how, SegmentEnd::Torn { offset: acked_end });
    let wal = Wal::open(config(dir.path())).expect("open after the torn write");
    assert_eq!(all_entries(&wal, 1), entries(1, 3, 1, "acked"));
    assert!(all_entries(&wal, 2).is_empty());
    append_entries(&wal, 1, entries(4, 1, 2, "after"));
    drop(wal);
    let wal = Wal::open(config(dir.path())).expect("reopen");
    let mut expected = entries(1, 3, 1, "acked");
    expected.extend(entries(4, 1, 2, "after"));
    assert_eq!(all_entries(&wal, 1), expected);
}
