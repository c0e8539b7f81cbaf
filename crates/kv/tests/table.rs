//! The table state machine on its own: etcd's range, put, delete and
//! transaction semantics, revisions, atomic batches, durability of the
//! applied index, snapshots and table removal.

mod common;

use bytes::Bytes;
use common::apply;
use regatta_kv::command::{
    decode, encode, Command, Compare, CompareResult, CompareTarget, DeleteRangeRequest, KeyRange,
    PutRequest, Query, RangeRequest, RequestOp, Response, ResponseOp,
};
use regatta_kv::{Store, Table};
use regatta_multiraft::StateMachine;
use regatta_raft::LogIndex;

fn put(key: &str, value: &str) -> Command {
    Command::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: true,
    })
}

fn range(key: &str, range_end: &[u8]) -> KeyRange {
    KeyRange {
        key: key.into(),
        range_end: range_end.to_vec(),
    }
}

fn get(table: &Table, request: RangeRequest) -> regatta_kv::command::RangeResult {
    read_range(table, &Query::Range(request))
}

fn read_range(table: &Table, query: &Query) -> regatta_kv::command::RangeResult {
    let bytes = table.read(&Bytes::from(encode(query)));
    match decode::<Response>(&bytes).expect("response").result {
        Ok(ResponseOp::Range(result)) => result,
        other => panic!("a range result, not {other:?}"),
    }
}

fn keys(result: &regatta_kv::command::RangeResult) -> Vec<String> {
    result
        .kvs
        .iter()
        .map(|kv| String::from_utf8_lossy(&kv.key).to_string())
        .collect()
}

#[test]
fn puts_ranges_and_deletes_follow_etcd() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let responses = apply(
        &mut table,
        &[
            put("a", "1"),
            put("b/1", "x"),
            put("b/2", "y"),
            put("c", "3"),
            put("a", "2"),
        ],
    );
    assert_eq!(responses[4].revision, 5);
    match &responses[4].result {
        Ok(ResponseOp::Put(result)) => {
            let previous = result.prev_kv.as_ref().expect("prev_kv");
            assert_eq!(previous.value, b"1");
            assert_eq!(
                (
                    previous.create_revision,
                    previous.mod_revision,
                    previous.version
                ),
                (1, 1, 1)
            );
        }
        other => panic!("{other:?}"),
    }
    let a = get(
        &table,
        RangeRequest {
            range: range("a", b""),
            ..RangeRequest::default()
        },
    );
    assert_eq!(a.count, 1);
    let kv = &a.kvs[0];
    assert_eq!(
        (
            kv.value.as_slice(),
            kv.create_revision,
            kv.mod_revision,
            kv.version
        ),
        (b"2".as_slice(), 1, 5, 2)
    );

    let prefix = get(
        &table,
        RangeRequest {
            range: range("b/", b"b0"),
            ..RangeRequest::default()
        },
    );
    assert_eq!(keys(&prefix), ["b/1", "b/2"]);
    let from_key = get(
        &table,
        RangeRequest {
            range: range("b/2", &[0]),
            ..RangeRequest::default()
        },
    );
    assert_eq!(keys(&from_key), ["b/2", "c"]);
    let all = get(
        &table,
        RangeRequest {
            range: KeyRange {
                key: vec![0],
                range_end: vec![0],
            },
            limit: 2,
            keys_only: true,
            ..RangeRequest::default()
        },
    );
    assert_eq!(
        (keys(&all), all.count, all.more),
        (vec!["a".to_string(), "b/1".to_string()], 4, true)
    );
    assert!(all.kvs.iter().all(|kv| kv.value.is_empty()));
    let counted = get(
        &table,
        RangeRequest {
            range: range("a", &[0]),
            count_only: true,
            ..RangeRequest::default()
        },
    );
    assert_eq!(
        (counted.count, counted.kvs.len(), counted.more),
        (4, 0, false)
    );
    let inverted = get(
        &table,
        RangeRequest {
            range: range("c", b"a"),
            ..RangeRequest::default()
        },
    );
    assert_eq!(inverted.count, 0);
    let capped = get(
        &table,
        RangeRequest {
            range: range("a", &[0]),
            bytes_max: 1,
            ..RangeRequest::default()
        },
    );
    assert_eq!((capped.kvs.len(), capped.more), (1, true));

    let deleted = apply(
        &mut table,
        &[Command::DeleteRange(DeleteRangeRequest {
            range: range("b/", b"b0"),
            prev_kv: true,
        })],
    );
    match &deleted[0].result {
        Ok(ResponseOp::DeleteRange(result)) => {
            assert_eq!(result.deleted, 2);
            assert_eq!(result.prev_kvs.len(), 2);
        }
        other => panic!("{other:?}"),
    }
    let all = get(
        &table,
        RangeRequest {
            range: range("a", &[0]),
            ..RangeRequest::default()
        },
    );
    assert_eq!(keys(&all), ["a", "c"]);
    // A key created again starts a new life.
    apply(&mut table, &[put("b/1", "again")]);
    let b1 = get(
        &table,
        RangeRequest {
            range: range("b/1", b""),
            ..RangeRequest::default()
        },
    );
    assert_eq!((b1.kvs[0].create_revision, b1.kvs[0].version), (7, 1));
}

fn page(table: &Table, request: RangeRequest) -> regatta_kv::command::RangeResult {
    read_range(table, &Query::RangePage(request))
}

/// A page of a longer read (`Query::RangePage`) stops at the first key
/// past it: `count` is its own keys, `more` whether any follow; the keys,
/// values and revisions are those a Range returns. (That counting and
/// `keys_only` now copy no values is not visible here; the DeleteRange
/// below checks only that its answer stays the same.)
#[test]
fn a_page_counts_only_its_own_keys() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let puts: Vec<Command> = (0..10).map(|i| put(&format!("k{i}"), "v")).collect();
    apply(&mut table, &puts);
    let request = |key: &str, limit: u64| RangeRequest {
        range: range(key, b"l"),
        limit,
        ..RangeRequest::default()
    };
    let whole = get(&table, request("k0", 3));
    assert_eq!(
        (keys(&whole), whole.count, whole.more),
        (
            vec!["k0".to_string(), "k1".to_string(), "k2".to_string()],
            10,
            true
        )
    );
    let first = page(&table, request("k0", 3));
    assert_eq!(keys(&first), ["k0", "k1", "k2"]);
    assert_eq!((first.count, first.more), (3, true));
    assert_eq!(first.kvs, whole.kvs, "the same keys, values and revisions");
    let last = page(&table, request("k7", 3));
    assert_eq!(keys(&last), ["k7", "k8", "k9"]);
    assert_eq!((last.count, last.more), (3, false), "nothing follows");
    let capped = page(
        &table,
        RangeRequest {
            bytes_max: 1,
            ..request("k0", 0)
        },
    );
    assert_eq!(
        (keys(&capped), capped.count, capped.more),
        (vec!["k0".to_string()], 1, true)
    );
    let unlimited = page(&table, request("k5", 0));
    assert_eq!((unlimited.count, unlimited.more), (5, false));

    let deleted = apply(
        &mut table,
        &[Command::DeleteRange(DeleteRangeRequest {
            range: range("k0", b"k5"),
            prev_kv: false,
        })],
    );
    match &deleted[0].result {
        Ok(ResponseOp::DeleteRange(result)) => {
            assert_eq!((result.deleted, result.prev_kvs.len()), (5, 0));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(get(&table, request("k0", 0)).count, 5);
}

fn txn(compare: Vec<Compare>, success: Vec<RequestOp>, failure: Vec<RequestOp>) -> Command {
    Command::Txn(regatta_kv::command::TxnRequest {
        compare,
        success,
        failure,
    })
}

fn compare(key: &str, target: CompareTarget, result: CompareResult) -> Compare {
    Compare {
        range: range(key, b""),
        target,
        result,
    }
}

fn succeeded(response: &Response) -> bool {
    match &response.result {
        Ok(ResponseOp::Txn(result)) => result.succeeded,
        other => panic!("{other:?}"),
    }
}

/// A put inside a transaction, without its previous value.
fn set(key: &str, value: &str) -> RequestOp {
    RequestOp::Put(PutRequest {
        key: key.into(),
        value: value.into(),
        prev_kv: false,
    })
}

/// etcd decides every compare of a transaction, nested ones included, on
/// the state before the transaction's first write; the branches then run
/// in order and their reads see the writes before them.
#[test]
fn nested_compares_see_the_state_before_the_transaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let nested = |compare_value: &str, key: &str| {
        RequestOp::Txn(regatta_kv::command::TxnRequest {
            compare: vec![compare(
                "k",
                CompareTarget::Value(compare_value.as_bytes().to_vec()),
                CompareResult::Equal,
            )],
            success: vec![set(key, "then")],
            failure: vec![set(key, "else")],
        })
    };
    apply(&mut table, &[put("k", "v1")]);
    let responses = apply(
        &mut table,
        &[txn(
            vec![],
            vec![
                set("k", "v2"),
                // Decided on k = v1, although k = v2 by the time it runs.
                nested("v1", "x"),
                nested("v2", "y"),
                RequestOp::Range(RangeRequest {
                    range: range("k", b""),
                    ..RangeRequest::default()
                }),
            ],
            vec![],
        )],
    );
    match &responses[0].result {
        Ok(ResponseOp::Txn(result)) => {
            let nested_outcomes: Vec<bool> = result
                .responses
                .iter()
                .filter_map(|op| match op {
                    ResponseOp::Txn(inner) => Some(inner.succeeded),
                    _ => None,
                })
                .collect();
            assert_eq!(nested_outcomes, [true, false]);
            match &result.responses[3] {
                ResponseOp::Range(range) => assert_eq!(range.kvs[0].value, b"v2"),
                other => panic!("{other:?}"),
            }
        }
        other => panic!("{other:?}"),
    }
    let all = get(
        &table,
        RangeRequest {
            range: range("a", &[0]),
            ..RangeRequest::default()
        },
    );
    let values: Vec<(String, String)> = all
        .kvs
        .iter()
        .map(|kv| {
            (
                String::from_utf8_lossy(&kv.key).to_string(),
                String::from_utf8_lossy(&kv.value).to_string(),
            )
        })
        .collect();
    assert_eq!(
        values,
        [
            ("k".to_string(), "v2".to_string()),
            ("x".to_string(), "then".to_string()),
            ("y".to_string(), "else".to_string()),
        ]
    );
}

#[test]
fn transactions_compare_then_apply_one_branch_atomically() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    // One batch: each command sees the writes of those before it.
    let responses = apply(
        &mut table,
        &[
            // Missing key: version 0, create 0, and a value compare fails.
            txn(
                vec![compare(
                    "k",
                    CompareTarget::Version(0),
                    CompareResult::Equal,
                )],
                vec![set("k", "1")],
                vec![],
            ),
            txn(
                vec![compare(
                    "k",
                    CompareTarget::Value(b"1".to_vec()),
                    CompareResult::Equal,
                )],
                vec![set("k", "2")],
                vec![set("k", "wrong")],
            ),
            txn(
                vec![compare(
                    "missing",
                    CompareTarget::Value(Vec::new()),
                    CompareResult::Equal,
                )],
                vec![],
                vec![set("m", "1")],
            ),
            txn(
                vec![
                    compare("k", CompareTarget::ModRevision(2), CompareResult::Equal),
                    compare("k", CompareTarget::CreateRevision(1), CompareResult::Equal),
                    compare("k", CompareTarget::Version(1), CompareResult::Greater),
                ],
                vec![
                    set("k", "3"),
                    RequestOp::Range(RangeRequest {
                        range: range("k", b""),
                        ..RangeRequest::default()
                    }),
                ],
                vec![],
            ),
            txn(
                vec![
                    compare(
                        "k",
                        CompareTarget::Value(b"9".to_vec()),
                        CompareResult::Less,
                    ),
                    compare("k", CompareTarget::Version(5), CompareResult::NotEqual),
                ],
                vec![],
                vec![set("never", "1")],
            ),
        ],
    );
    let outcomes: Vec<bool> = responses.iter().map(succeeded).collect();
    assert_eq!(outcomes, [true, true, false, true, true]);
    match &responses[3].result {
        Ok(ResponseOp::Txn(result)) => match &result.responses[1] {
            ResponseOp::Range(range) => {
                assert_eq!(
                    range.kvs[0].value, b"3",
                    "a range in a txn sees its own writes"
                );
                assert_eq!(range.kvs[0].mod_revision, 4);
            }
            other => panic!("{other:?}"),
        },
        other => panic!("{other:?}"),
    }
    let all = get(
        &table,
        RangeRequest {
            range: range("a", &[0]),
            ..RangeRequest::default()
        },
    );
    assert_eq!(keys(&all), ["k", "m"]);
    assert_eq!(all.kvs[0].version, 3);
    // A read-only transaction is served as a query; one that writes is not.
    let read_only = regatta_kv::command::TxnRequest {
        compare: vec![],
        success: vec![RequestOp::Range(RangeRequest {
            range: range("k", b""),
            ..RangeRequest::default()
        })],
        failure: vec![],
    };
    let response = decode::<Response>(&table.read(&Bytes::from(encode(&Query::Txn(read_only)))))
        .expect("response");
    assert!(succeeded(&response));
    let writing = regatta_kv::command::TxnRequest {
        compare: vec![],
        success: vec![set("x", "1")],
        failure: vec![],
    };
    let response = decode::<Response>(&table.read(&Bytes::from(encode(&Query::Txn(writing)))))
        .expect("response");
    assert!(response.result.is_err());
    // Garbage is an error response, never a panic.
    let response =
        decode::<Response>(&table.read(&Bytes::from_static(b"\x01\xff\xff"))).expect("response");
    assert!(response.result.is_err());
    let responses = apply_raw(&mut table, b"\x07junk");
    assert!(responses[0].result.is_err());
}

fn apply_raw(table: &mut Table, command: &'static [u8]) -> Vec<Response> {
    let index = LogIndex(table.applied_index().0 + 1);
    table
        .apply_batch(&[(index, Bytes::from_static(command))])
        .expect("apply")
        .iter()
        .map(|bytes| decode::<Response>(bytes).expect("response"))
        .collect()
}

#[test]
fn data_and_applied_index_survive_a_reopen_and_tables_are_separate() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = Store::open(dir.path()).expect("store");
        let mut one = store.open_table(1).expect("table");
        let mut two = store.open_table(2).expect("table");
        apply(&mut one, &[put("a", "1"), put("b", "2")]);
        apply(&mut two, &[put("a", "other")]);
        one.sync().expect("sync");
    }
    let store = Store::open(dir.path()).expect("reopen");
    let one = store.open_table(1).expect("table");
    let two = store.open_table(2).expect("table");
    assert_eq!(one.applied_index(), LogIndex(2));
    assert_eq!(two.applied_index(), LogIndex(1));
    let a = get(
        &one,
        RangeRequest {
            range: range("a", b""),
            ..RangeRequest::default()
        },
    );
    assert_eq!(a.kvs[0].value, b"1");
    let a = get(
        &two,
        RangeRequest {
            range: range("a", b""),
            ..RangeRequest::default()
        },
    );
    assert_eq!(a.kvs[0].value, b"other");
    drop((one, two));
    store.remove_table(1).expect("remove");
    let one = store.open_table(1).expect("table");
    assert_eq!(one.applied_index(), LogIndex(0));
    assert_eq!(
        get(
            &one,
            RangeRequest {
                range: range("a", &[0]),
                ..RangeRequest::default()
            }
        )
        .count,
        0
    );
}

#[test]
fn a_snapshot_restores_the_same_table_and_a_bad_one_changes_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut source = store.open_table(1).expect("table");
    let commands: Vec<Command> = (0..500)
        .map(|i| put(&format!("key/{i:04}"), &"v".repeat(i % 50)))
        .collect();
    apply(&mut source, &commands);
    let snapshot = source.snapshot();
    // Writes after the snapshot are not in it.
    apply(&mut source, &[put("late", "1")]);
    let mut bytes = Vec::new();
    snapshot.write_to(&mut bytes).expect("write");

    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Store::open(other_dir.path()).expect("store");
    let mut target = other.open_table(1).expect("table");
    apply(&mut target, &[put("stale", "gone after restore")]);
    target
        .restore(LogIndex(500), &mut bytes.as_slice())
        .expect("restore");
    assert_eq!(target.applied_index(), LogIndex(500));
    let everything = RangeRequest {
        range: range("a", &[0]),
        ..RangeRequest::default()
    };
    let restored = get(&target, everything.clone());
    assert_eq!(restored.count, 500);
    let mut original = get(&source, everything.clone());
    original.kvs.retain(|kv| kv.key != b"late");
    assert_eq!(restored.kvs, original.kvs);

    // Damaged: truncated, and a wrong version. The table keeps its data.
    assert!(target
        .restore(LogIndex(900), &mut &bytes[..bytes.len() - 3])
        .is_err());
    assert!(target
        .restore(LogIndex(900), &mut &[9u8, 0, 0][..])
        .is_err());
    assert_eq!(target.applied_index(), LogIndex(500));
    assert_eq!(get(&target, everything.clone()).kvs, restored.kvs);

    // After a reopen, the restored generation is the one in use.
    drop(target);
    drop(other);
    let other = Store::open(other_dir.path()).expect("reopen");
    let target = other.open_table(1).expect("table");
    assert_eq!(target.applied_index(), LogIndex(500));
    assert_eq!(get(&target, everything).kvs, restored.kvs);
}

/// A table's `StateReader` serves reads on other threads while batches
/// apply: every read sees whole batches only (each batch sets the same
/// value on two keys), its revision is exactly the newest change it sees,
/// and it follows the table through a snapshot restore.
#[test]
fn a_reader_on_another_thread_sees_whole_batches_at_their_revision() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let reader = table.reader().expect("tables serve reads on other tasks");
    let query = Bytes::from(encode(&Query::Range(RangeRequest {
        range: range("a", b"c"),
        ..RangeRequest::default()
    })));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let checker = {
        let stop = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut reads = 0u64;
            let mut last_revision = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let response = decode::<Response>(&reader.read(&query)).expect("response");
                let Ok(ResponseOp::Range(result)) = response.result else {
                    panic!("a range read failed: {response:?}");
                };
                assert!(response.revision >= last_revision, "revisions go back");
                last_revision = response.revision;
                reads += 1;
                if result.kvs.is_empty() {
                    continue;
                }
                assert_eq!(result.kvs.len(), 2, "half a batch: {result:?}");
                assert_eq!(result.kvs[0].value, result.kvs[1].value, "half a batch");
                let newest = result.kvs.iter().map(|kv| kv.mod_revision).max();
                assert_eq!(newest, Some(response.revision), "data and revision differ");
            }
            // The same reader, made before the restore, once more after
            // every write: it must see the restored table's latest value.
            let response = decode::<Response>(&reader.read(&query)).expect("response");
            let Ok(ResponseOp::Range(result)) = response.result else {
                panic!("the final read failed: {response:?}");
            };
            let last_value = result.kvs.first().map(|kv| kv.value.clone());
            (reads, last_value)
        })
    };
    // Few enough that reads (which step over every version of a key in
    // the memtable) stay quick.
    for i in 0..400 {
        let value = format!("v{i}");
        apply(&mut table, &[put("a", &value), put("b", &value)]);
    }
    // A restore to a snapshot of another table, at a later index.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Store::open(other_dir.path()).expect("store");
    let mut source = other.open_table(1).expect("table");
    let first = table.applied_index().0 + 1;
    let filler: Vec<Command> = (0..first).map(|i| put("z", &i.to_string())).collect();
    apply(&mut source, &filler);
    apply(&mut source, &[put("a", "restored"), put("b", "restored")]);
    let mut bytes = Vec::new();
    source.snapshot().write_to(&mut bytes).expect("write");
    let restored_at = source.applied_index();
    table
        .restore(restored_at, &mut bytes.as_slice())
        .expect("restore");
    for i in 0..200 {
        let value = format!("after{i}");
        apply(&mut table, &[put("a", &value), put("b", &value)]);
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (reads, last_value) = checker.join().expect("the reader thread");
    assert!(reads > 0);
    assert_eq!(
        last_value.as_deref(),
        Some(b"after199".as_slice()),
        "a reader made before the restore does not follow the table"
    );
    // After the restore, readers see the restored table, not the old one.
    let reader = table.reader().expect("reader");
    let response = decode::<Response>(&reader.read(&Bytes::from(encode(&Query::Range(
        RangeRequest {
            range: range("z", b""),
            ..RangeRequest::default()
        },
    )))))
    .expect("response");
    assert_eq!(response.revision, table.applied_index().0);
    let Ok(ResponseOp::Range(result)) = response.result else {
        panic!("{response:?}");
    };
    assert_eq!(result.kvs.len(), 1, "the restored table has key z");
}

/// Commands reach the table from other clusters and from the log, not only
/// through the APIs' checks. Keys the storage engine cannot hold (empty,
/// or over its 65,535 bytes) are refused by the command, the same way on
/// every replica, instead of reaching the engine's assertions; a refused
/// transaction writes none of its operations, and the batch goes on.
#[test]
fn keys_the_engine_cannot_hold_are_refused_and_write_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(dir.path()).expect("store");
    let mut table = store.open_table(1).expect("table");
    let too_long = "k".repeat(65_536);
    let valid_put = RequestOp::Put(PutRequest {
        key: b"first".to_vec(),
        value: b"v".to_vec(),
        prev_kv: false,
    });
    let responses = apply(
        &mut table,
        &[
            put("", "v"),
            put(&too_long, "v"),
            // A valid put, then one the engine cannot hold: neither lands.
            txn(
                vec![],
                vec![
                    valid_put.clone(),
                    RequestOp::Put(PutRequest {
                        key: Vec::new(),
                        value: b"v".to_vec(),
                        prev_kv: false,
                    }),
                ],
                vec![],
            ),
            // A nested one with a range bound over the limit.
            txn(
                vec![],
                vec![
                    valid_put.clone(),
                    RequestOp::Txn(regatta_kv::command::TxnRequest {
                        compare: vec![],
                        success: vec![RequestOp::Range(RangeRequest {
                            range: range("a", too_long.as_bytes()),
                            ..RangeRequest::default()
                        })],
                        failure: vec![],
                    }),
                ],
                vec![],
            ),
            Command::DeleteRange(DeleteRangeRequest {
                range: range(&too_long, b""),
                prev_kv: false,
            }),
            put("after", "v"),
        ],
    );
    let errors: Vec<String> = responses[..5]
        .iter()
        .map(|response| match &response.result {
            Err(error) => error.clone(),
            Ok(op) => panic!("refused, not {op:?}"),
        })
        .collect();
    assert!(
        errors[0].contains("a put's key of 0 bytes"),
        "{}",
        errors[0]
    );
    assert!(
        errors[1].contains("a put's key of 65536 bytes"),
        "{}",
        errors[1]
    );
    assert!(
        errors[2].contains("a put's key of 0 bytes"),
        "{}",
        errors[2]
    );
    assert!(
        errors[3].contains("a range end of 65536 bytes"),
        "{}",
        errors[3]
    );
    assert!(
        errors[4].contains("a range key of 65536 bytes"),
        "{}",
        errors[4]
    );
    assert!(responses[5].result.is_ok(), "{:?}", responses[5]);
    // The batch applied through: revisions moved for every command.
    assert_eq!(responses[5].revision, 6);
    let all = get(
        &table,
        RangeRequest {
            range: range("\0", b"\0"),
            ..RangeRequest::default()
        },
    );
    assert_eq!(keys(&all), ["after"], "a refused transaction wrote");
    // Reads are refused the same way.
    let response =
        decode::<Response>(&table.read(&Bytes::from(encode(&Query::Range(RangeRequest {
            range: range(&too_long, b""),
            ..RangeRequest::default()
        })))))
        .expect("response");
    assert!(
        matches!(&response.result, Err(error) if error.contains("a range key of 65536 bytes")),
        "{response:?}"
    );
}
