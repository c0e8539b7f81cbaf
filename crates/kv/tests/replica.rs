//! Follower-cluster tables: replicated batches fenced by the leader index,
//! restores from a leader snapshot through the follower's own log, and
//! replica state carried by reopen and by Raft snapshots.

mod common;

use bytes::Bytes;
use common::apply;
use regatta_kv::command::{
    decode, encode, encode_restore_commit_reset, Command, KeyRange, PutRequest, Query,
    RangeRequest, ReplicatedBatch, ReplicatedResult, Response, ResponseOp,
};
use regatta_kv::{read_table_item, split_table_item, Store, Table, TableMode};
use regatta_multiraft::StateMachine;
use regatta_raft::LogIndex;

fn put(key: &str, value: &str) -> Vec<u8> {
    encode(&Command::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    }))
}

fn replicated(first_leader_index: u64, commands: Vec<Vec<u8>>) -> Command {
    Command::Replicated(ReplicatedBatch {
        first_leader_index,
        commands,
    })
}

fn outcome(response: &Response) -> ReplicatedResult {
    match &response.result {
        Ok(ResponseOp::Replicated(result)) => result.clone(),
        other => panic!("a replicated result, not {other:?}"),
    }
}

/// Every key with its value, create and mod revision and version.
fn contents(table: &Table) -> Vec<(String, String, u64, u64, u64)> {
    let query = Query::Range(RangeRequest {
        range: KeyRange {
            key: vec![0],
            range_end: vec![0],
        },
        ..RangeRequest::default()
    });
    let response = decode::<Response>(&table.read(&Bytes::from(encode(&query)))).expect("decode");
    let Ok(ResponseOp::Range(range)) = response.result else {
        panic!("a range result, not {:?}", response.result);
    };
    range
        .kvs
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).to_string(),
                String::from_utf8_lossy(&kv.value).to_string(),
                kv.create_revision,
                kv.mod_revision,
                kv.version,
            )
        })
        .collect()
}

#[test]
fn replicated_batches_apply_once_in_leader_order_with_leader_revisions() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table_as(7, TableMode::Replica).expect("table");

    // Leader indexes 1..=3: a no-op, then two puts of one key.
    let first = apply(
        &mut table,
        &[replicated(
            1,
            vec![Vec::new(), put("a", "1"), put("a", "2")],
        )],
    );
    assert_eq!(
        outcome(&first[0]),
        ReplicatedResult {
            accepted: true,
            leader_index: 3
        }
    );
    assert_eq!(first[0].revision, 3);
    assert_eq!(contents(&table), vec![("a".into(), "2".into(), 2, 3, 2)]);

    // A gap is refused whole; an overlap applies only what is new.
    let gap = apply(&mut table, &[replicated(5, vec![put("gap", "x")])]);
    assert_eq!(
        outcome(&gap[0]),
        ReplicatedResult {
            accepted: false,
            leader_index: 3
        }
    );
    let overlap = apply(
        &mut table,
        &[replicated(
            2,
            vec![put("a", "again"), put("a", "again"), put("b", "1")],
        )],
    );
    assert_eq!(
        outcome(&overlap[0]),
        ReplicatedResult {
            accepted: true,
            leader_index: 4
        }
    );
    assert_eq!(
        contents(&table),
        vec![
            ("a".into(), "2".into(), 2, 3, 2),
            ("b".into(), "1".into(), 4, 4, 1)
        ]
    );

    // Clients' writes never apply on a follower table; replication
    // commands never apply on a leader table.
    let direct = apply(&mut table, &[Command::Put(PutRequest::default())]);
    assert!(direct[0].result.is_err());
    let mut primary = store.open_table(8).expect("table");
    let refused = apply(&mut primary, &[replicated(1, vec![put("a", "1")])]);
    assert!(refused[0].result.is_err());
    assert_eq!(contents(&primary), vec![]);

    // The leader index survives a reopen with the data.
    let applied = table.applied_index();
    table.sync().expect("sync");
    drop(table);
    let table = store.open_table_as(7, TableMode::Replica).expect("reopen");
    assert_eq!(table.applied_index(), applied);
    assert_eq!(table.revision(), 4);
    assert_eq!(contents(&table).len(), 2);
}

#[test]
fn a_restore_replaces_the_table_at_commit_and_survives_reopens_and_snapshots() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");

    // The leader's table and its snapshot, as Snapshot.Stream serves it.
    let mut leader = store.open_table(1).expect("leader table");
    let puts: Vec<Command> = (0..300)
        .map(|i| {
            Command::Put(PutRequest {
                key: format!("k{i:03}").into(),
                value: format!("v{i}").into(),
                prev_kv: false,
            })
        })
        .collect();
    apply(&mut leader, &puts);
    leader.sync().expect("sync");
    let (revision, items) = store.table_snapshot(1).expect("snapshot");
    assert_eq!(revision, 300);
    let mut stream = Vec::new();
    items.write_to(&mut stream).expect("write");
    let mut reader = stream.as_slice();
    let mut all_items = Vec::new();
    while let Some(item) = read_table_item(&mut reader).expect("item") {
        all_items.push(item);
    }
    assert_eq!(all_items.len(), 300);

    let mut follower = store
        .open_table_as(2, TableMode::Replica)
        .expect("follower");
    apply(&mut follower, &[replicated(1, vec![put("stale", "x")])]);
    // An abandoned restore, then the one that completes.
    let begun = apply(&mut follower, &[Command::RestoreBegin { restore_id: 1 }]);
    assert!(outcome(&begun[0]).accepted);
    apply(
        &mut follower,
        &[Command::RestoreChunk {
            restore_id: 1,
            items: all_items[..10].to_vec(),
        }],
    );
    apply(&mut follower, &[Command::RestoreBegin { restore_id: 2 }]);
    let stale_chunk = apply(
        &mut follower,
        &[Command::RestoreChunk {
            restore_id: 1,
            items: all_items[..10].to_vec(),
        }],
    );
    assert!(!outcome(&stale_chunk[0]).accepted);
    apply(
        &mut follower,
        &[Command::RestoreChunk {
            restore_id: 2,
            items: all_items[..100].to_vec(),
        }],
    );
    // Until the commit, reads see the old table.
    assert_eq!(
        contents(&follower),
        vec![("stale".into(), "x".into(), 1, 1, 1)]
    );

    // A Raft snapshot taken mid-restore carries the restore: a replica
    // installed from it accepts the remaining chunks like this one.
    let mut raft_snapshot = Vec::new();
    follower
        .snapshot()
        .write_to(&mut raft_snapshot)
        .expect("write");
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_store = Store::open(other_dir.path()).expect("store");
    let mut other = other_store
        .open_table_as(2, TableMode::Replica)
        .expect("table");
    other
        .restore(follower.applied_index(), &mut raft_snapshot.as_slice())
        .expect("install");

    // And a reopen mid-restore keeps it too.
    follower.sync().expect("sync");
    drop(follower);
    let mut follower = store.open_table_as(2, TableMode::Replica).expect("reopen");

    let rest = [
        Command::RestoreChunk {
            restore_id: 2,
            items: all_items[100..].to_vec(),
        },
        Command::RestoreCommit {
            restore_id: 2,
            leader_index: revision,
        },
    ];
    for table in [&mut follower, &mut other] {
        let responses = apply(table, &rest);
        assert!(responses.iter().all(|response| outcome(response).accepted));
        assert_eq!(table.revision(), 300);
        assert_eq!(contents(table), contents(&leader));
        // Replication resumes after the snapshot's index.
        let next = apply(table, &[replicated(301, vec![put("k000", "new")])]);
        assert!(outcome(&next[0]).accepted);
        assert_eq!(contents(table)[0], ("k000".into(), "new".into(), 1, 301, 2));
    }

    // A commit of a restore that is not under way changes nothing.
    let late = apply(
        &mut follower,
        &[Command::RestoreCommit {
            restore_id: 2,
            leader_index: 5,
        }],
    );
    assert!(!outcome(&late[0]).accepted);
    assert_eq!(follower.revision(), 301);
}

#[test]
fn items_split_only_when_whole_and_bad_ones_are_errors() {
    let mut bytes = Vec::new();
    for (key, record) in [(&b"a"[..], &[7u8; 30][..]), (b"bb", &[1u8; 24])] {
        bytes.extend_from_slice(&(key.len() as u32).to_le_bytes());
        bytes.extend_from_slice(key);
        bytes.extend_from_slice(&(record.len() as u32).to_le_bytes());
        bytes.extend_from_slice(record);
    }
    let first_length = 4 + 1 + 4 + 30;
    for cut in 0..first_length {
        assert!(split_table_item(&bytes[..cut]).expect("split").is_none());
    }
    let ((key, record), used) = split_table_item(&bytes).expect("split").expect("whole");
    assert_eq!(
        (key.as_slice(), record.len(), used),
        (&b"a"[..], 30, first_length)
    );
    let ((key, _), used) = split_table_item(&bytes[first_length..])
        .expect("split")
        .expect("whole");
    assert_eq!(
        (key.as_slice(), first_length + used),
        (&b"bb"[..], bytes.len())
    );
    // Over the item limit, and a record shorter than its header.
    assert!(split_table_item(&u32::MAX.to_le_bytes()).is_err());
    let short = [
        1u32.to_le_bytes().as_slice(),
        b"k",
        &3u32.to_le_bytes(),
        b"abc",
    ]
    .concat();
    assert!(split_table_item(&short).is_err());
}

/// A leader-cluster table restored from a backup: its items come back
/// verbatim (values, revisions, versions), its own revision keeps going
/// up, and followers' batches wait while a replica has a restore pending.
#[test]
fn a_leader_table_is_restored_from_a_backup_and_an_abort_keeps_its_data() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut source = store.open_table(1).expect("source");
    let puts: Vec<Command> = (0..50)
        .map(|i| {
            Command::Put(PutRequest {
                key: format!("k{:02}", i % 20).into(),
                value: format!("v{i}").into(),
                prev_kv: false,
            })
        })
        .collect();
    apply(&mut source, &puts);
    source.sync().expect("sync");
    let (_, items) = store.table_snapshot(1).expect("snapshot");
    let mut stream = Vec::new();
    items.write_to(&mut stream).expect("write");
    let mut reader = stream.as_slice();
    let mut backup = Vec::new();
    while let Some(item) = read_table_item(&mut reader).expect("item") {
        backup.push(item);
    }

    let mut target = store.open_table(2).expect("target");
    apply(
        &mut target,
        &[Command::Put(PutRequest {
            key: "old".into(),
            value: "gone after the restore".into(),
            prev_kv: false,
        })],
    );
    // An aborted restore changes nothing and leaves nothing pending.
    apply(&mut target, &[Command::RestoreBegin { restore_id: 9 }]);
    // Items the storage engine would assert on are refused, not applied.
    let empty_key = apply(
        &mut target,
        &[Command::RestoreChunk {
            restore_id: 9,
            items: vec![(Vec::new(), backup[0].1.clone())],
        }],
    );
    assert!(empty_key[0].result.is_err(), "{:?}", empty_key[0]);
    let long_key = apply(
        &mut target,
        &[Command::RestoreChunk {
            restore_id: 9,
            items: vec![(vec![b'k'; 70_000], backup[0].1.clone())],
        }],
    );
    assert!(long_key[0].result.is_err(), "{:?}", long_key[0]);
    assert!(store.table_restore_pending(2).expect("meta"));
    let wrong_abort = apply(&mut target, &[Command::RestoreAbort { restore_id: 8 }]);
    assert!(!outcome(&wrong_abort[0]).accepted);
    let abort = apply(&mut target, &[Command::RestoreAbort { restore_id: 9 }]);
    assert!(outcome(&abort[0]).accepted);
    assert!(!store.table_restore_pending(2).expect("meta"));
    assert_eq!(contents(&target).len(), 1);
    let late_chunk = apply(
        &mut target,
        &[Command::RestoreChunk {
            restore_id: 9,
            items: backup.clone(),
        }],
    );
    assert!(!outcome(&late_chunk[0]).accepted);

    let before = target.revision();
    let responses = apply(
        &mut target,
        &[
            Command::RestoreBegin { restore_id: 10 },
            Command::RestoreChunk {
                restore_id: 10,
                items: backup[..7].to_vec(),
            },
            Command::RestoreChunk {
                restore_id: 10,
                items: backup[7..].to_vec(),
            },
            Command::RestoreCommit {
                restore_id: 10,
                leader_index: 12345,
            },
        ],
    );
    assert!(responses.iter().all(|response| outcome(response).accepted));
    assert_eq!(contents(&target), contents(&source));
    assert_eq!(
        target.revision(),
        before + 4,
        "the revision is the applied index"
    );
    assert!(!store.table_restore_pending(2).expect("meta"));
    drop(target);
    let target = store.open_table(2).expect("reopen");
    assert_eq!(contents(&target), contents(&source));

    // A replica with a restore pending refuses replicated batches, so that
    // its puller installs a snapshot first.
    let mut replica = store.open_table_as(3, TableMode::Replica).expect("replica");
    apply(&mut replica, &[replicated(1, vec![put("a", "1")])]);
    apply(&mut replica, &[Command::RestoreBegin { restore_id: 4 }]);
    let refused = apply(&mut replica, &[replicated(2, vec![put("b", "2")])]);
    assert_eq!(
        outcome(&refused[0]),
        ReplicatedResult {
            accepted: false,
            leader_index: 1
        }
    );
    assert!(store.table_restore_pending(3).expect("meta"));
}

/// A leader command this version cannot read (a newer leader cluster's)
/// stops the follower table instead of being skipped: the copy never
/// silently differs from the leader's. Nothing of the batch applies, and
/// one already applied below the table's leader index is not looked at.
#[test]
fn a_leader_command_this_version_cannot_read_stops_the_table() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table_as(7, TableMode::Replica).expect("table");
    apply(&mut table, &[replicated(1, vec![put("a", "1")])]);
    let before = contents(&table);
    // A format version from the future, and a known version whose command
    // tag this version lacks.
    for unreadable in [vec![200u8, 1, 2, 3], vec![1u8, 250, 7]] {
        let batch = replicated(2, vec![put("b", "1"), unreadable]);
        let next = LogIndex(table.applied_index().0 + 1);
        let error = table
            .apply_batch(&[(next, Bytes::from(encode(&batch)))])
            .expect_err("an unreadable leader command must not be skipped");
        assert!(
            error.to_string().contains("leader index 3 cannot be read"),
            "{error}"
        );
        assert_eq!(table.revision(), 1, "the leader index did not move");
        assert_eq!(contents(&table), before, "nothing of the batch applied");
    }
    // Below the leader index, a command is not applied again, so not read.
    let old = apply(
        &mut table,
        &[replicated(1, vec![vec![200u8], put("b", "1")])],
    );
    assert_eq!(
        outcome(&old[0]),
        ReplicatedResult {
            accepted: true,
            leader_index: 2
        }
    );
}

/// Entries without a command (no-ops, membership changes) move a leader
/// table's applied index too: its revision, and the index of a snapshot
/// of it, are the group's applied index, never below what a follower
/// cluster received (an operator's reset would otherwise move a follower
/// back).
#[test]
fn entries_without_a_command_move_the_applied_index() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut leader = store.open_table(1).expect("table");
    apply(
        &mut leader,
        &[Command::Put(PutRequest {
            key: "k".into(),
            value: "v".into(),
            prev_kv: false,
        })],
    );
    assert_eq!(leader.applied_index(), LogIndex(1));
    leader.skip_to(LogIndex(3)).expect("skip");
    leader.skip_to(LogIndex(2)).expect("never back");
    assert_eq!(leader.applied_index(), LogIndex(3));
    assert_eq!(leader.revision(), 3);
    let (revision, _) = store.table_snapshot(1).expect("snapshot");
    assert_eq!(revision, 3);
    drop(leader);
    let reopened = store.open_table(1).expect("reopen");
    assert_eq!(
        reopened.applied_index(),
        LogIndex(3),
        "stored with the data"
    );
}

/// What makes the puller's last check before `RestoreCommit` sufficient
/// (`docs/replication.md`, "A snapshot older than the table"): once the
/// check saw the table's revision with the install's restore under way,
/// nothing can raise the revision before that restore commits. Batches
/// are refused while it is pending, and another puller's install must
/// replace it first, after which its commit is refused. So a deposed
/// puller that checked its copy (leader index 8) against revision 5
/// cannot take the table back from the 20 a newer puller installed.
#[test]
fn a_checked_install_cannot_take_the_table_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table_as(3, TableMode::Replica).expect("table");
    let puts: Vec<Vec<u8>> = (1..=5).map(|i| put(&format!("k{i}"), "old")).collect();
    apply(&mut table, &[replicated(1, puts)]);
    assert_eq!(table.revision(), 5);

    // The deposed puller's install: begun, its copy streamed, checked.
    let older_copy = vec![(b"old-copy".to_vec(), vec![0u8; 24])];
    let steps = apply(
        &mut table,
        &[
            Command::RestoreBegin { restore_id: 1 },
            Command::RestoreChunk {
                restore_id: 1,
                items: older_copy,
            },
        ],
    );
    assert!(steps.iter().all(|step| outcome(step).accepted));
    assert!(table.revision() <= 8, "the deposed puller's check passes");

    // The new puller's batches cannot move the revision past the check.
    let batch = apply(&mut table, &[replicated(6, vec![put("k6", "new")])]);
    assert_eq!(
        outcome(&batch[0]),
        ReplicatedResult {
            accepted: false,
            leader_index: 5
        }
    );
    assert_eq!(table.revision(), 5);

    // Its own install replaces the deposed one's and commits at 20.
    let newer_copy: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let steps = apply(
        &mut table,
        &[
            Command::RestoreBegin { restore_id: 2 },
            Command::RestoreChunk {
                restore_id: 2,
                items: newer_copy,
            },
            Command::RestoreCommit {
                restore_id: 2,
                leader_index: 20,
            },
        ],
    );
    assert!(steps.iter().all(|step| outcome(step).accepted));
    assert_eq!(table.revision(), 20);

    // The deposed puller's commit, and any late chunk, change nothing.
    let late = apply(
        &mut table,
        &[
            Command::RestoreChunk {
                restore_id: 1,
                items: vec![(b"late".to_vec(), vec![0u8; 24])],
            },
            Command::RestoreCommit {
                restore_id: 1,
                leader_index: 8,
            },
        ],
    );
    assert!(late.iter().all(|step| !outcome(step).accepted));
    assert_eq!(table.revision(), 20);
    assert_eq!(contents(&table), vec![]);
}

/// An install that carried out an operator's reset records the reset in
/// its commit's own write (`encode_restore_commit_reset`): the table's reset
/// carried survives a reopen and travels in the table's Raft snapshot,
/// and a later ordinary commit keeps it. A puller reads it to tell a
/// spent `reset/<group>` record from a live one.
#[test]
fn a_carried_out_reset_is_recorded_with_the_commit() {
    const RESET: u64 = (1 << 63) | 77;
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table_as(4, TableMode::Replica).expect("table");
    apply(&mut table, &[replicated(1, vec![put("k", "v")])]);
    assert_eq!(store.table_reset_carried(4).expect("meta"), 0);
    // A table that never carried out a reset keeps writing version 2
    // snapshots, which older readers take.
    let mut plain = Vec::new();
    table.snapshot().write_to(&mut plain).expect("write");
    assert_eq!(plain[0], 2);

    // A commit of another restore than the one under way records nothing.
    let begun = apply(&mut table, &[Command::RestoreBegin { restore_id: RESET }]);
    assert!(outcome(&begun[0]).accepted);
    assert!(store.table_reset_pending(4).expect("meta"));
    let refused = apply_encoded(&mut table, encode_restore_commit_reset(5, 1, RESET));
    assert!(!outcome(&refused).accepted);
    assert_eq!(store.table_reset_carried(4).expect("meta"), 0);

    let committed = apply_encoded(&mut table, encode_restore_commit_reset(RESET, 1, RESET));
    assert!(outcome(&committed).accepted);
    assert_eq!(table.revision(), 1);
    assert_eq!(contents(&table), Vec::new());
    assert_eq!(store.table_reset_carried(4).expect("meta"), RESET);
    assert!(!store.table_restore_pending(4).expect("meta"));

    // A retried begin of the same reset that applies late is a restore
    // under way, but not a reset that may take the table back.
    let late = apply(&mut table, &[Command::RestoreBegin { restore_id: RESET }]);
    assert!(outcome(&late[0]).accepted);
    assert!(store.table_restore_pending(4).expect("meta"));
    assert!(!store.table_reset_pending(4).expect("meta"));

    // An ordinary install later keeps it.
    let steps = apply(
        &mut table,
        &[
            Command::RestoreBegin { restore_id: 9 },
            Command::RestoreChunk {
                restore_id: 9,
                items: vec![(b"a".to_vec(), vec![0u8; 24])],
            },
            Command::RestoreCommit {
                restore_id: 9,
                leader_index: 30,
            },
        ],
    );
    assert!(steps.iter().all(|step| outcome(step).accepted));
    assert_eq!(table.revision(), 30);
    assert_eq!(store.table_reset_carried(4).expect("meta"), RESET);

    // A reopen keeps it.
    table.sync().expect("sync");
    drop(table);
    let table = store.open_table_as(4, TableMode::Replica).expect("reopen");
    assert_eq!(store.table_reset_carried(4).expect("meta"), RESET);

    // So does a replica installed from the table's Raft snapshot.
    let mut raft_snapshot = Vec::new();
    table
        .snapshot()
        .write_to(&mut raft_snapshot)
        .expect("write");
    assert_eq!(raft_snapshot[0], 3);
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_store = Store::open(other_dir.path()).expect("store");
    let mut other = other_store
        .open_table_as(4, TableMode::Replica)
        .expect("table");
    other
        .restore(table.applied_index(), &mut raft_snapshot.as_slice())
        .expect("install");
    assert_eq!(other.revision(), 30);
    assert_eq!(contents(&other), contents(&table));
    assert_eq!(other_store.table_reset_carried(4).expect("meta"), RESET);

    // And a version 2 snapshot installed over it clears it: the snapshot
    // is the whole state.
    other
        .restore(LogIndex(50), &mut plain.as_slice())
        .expect("install");
    assert_eq!(other_store.table_reset_carried(4).expect("meta"), 0);
}

/// Applies one encoded command as the next entry.
fn apply_encoded(table: &mut Table, command: Vec<u8>) -> Response {
    let index = LogIndex(table.applied_index().0 + 1);
    let results = table
        .apply_batch(&[(index, Bytes::from(command))])
        .expect("apply");
    decode::<Response>(&results[0]).expect("response")
}
