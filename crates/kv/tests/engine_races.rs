//! Races in the storage engine that the table store relies on being fixed
//! (`vendor/fjall`, `docs/decisions/0005-fjall-patches.md`).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fjall::{AbstractTree, PartitionCreateOptions, PersistMode};

/// Creates partition `name` with 64 KiB memtables and writes 600 values
/// of 1 KiB to it (keys 0 to 599): about nine sealed memtables.
fn fill_small_memtables(keyspace: &fjall::Keyspace, name: &str) -> fjall::PartitionHandle {
    let partition = keyspace
        .open_partition(
            name,
            PartitionCreateOptions::default().max_memtable_size(64 * 1024),
        )
        .expect("create");
    let value = vec![0x42u8; 1024];
    for key in 0..600u32 {
        partition
            .insert(key.to_be_bytes(), value.as_slice())
            .expect("insert");
    }
    partition
}

/// A table restore deletes the partition it replaced while the engine may
/// still be flushing that partition's memtables. Unpatched fjall 2.11.2
/// panics in its flush thread ("removal index (is 0) should be < len"),
/// found by the chaos harness (anomaly 4 in `docs/verification.md`).
#[test]
fn deleting_a_partition_while_it_flushes_does_not_panic_the_engine() {
    let panics = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        seen.fetch_add(1, Ordering::SeqCst);
        previous(info);
    }));
    let dir = tempfile::tempdir().expect("tempdir");
    let keyspace = fjall::Config::new(dir.path())
        .max_write_buffer_size(1 << 20)
        .open()
        .expect("open");
    for round in 0..60u32 {
        let partition = fill_small_memtables(&keyspace, &format!("p-{round}"));
        keyspace.persist(PersistMode::Buffer).expect("persist");
        keyspace.delete_partition(partition).expect("delete");
        assert_eq!(panics.load(Ordering::SeqCst), 0, "round {round}");
    }
    // Every byte the deleted partitions held is freed once their flushes
    // finish; unpatched, queued memtables stayed counted and, once they
    // filled the write buffer, halted every write of the node.
    let mut waited_ms = 0;
    while keyspace.write_buffer_size() > 0 && waited_ms < 10_000 {
        std::thread::sleep(Duration::from_millis(50));
        waited_ms += 50;
    }
    assert_eq!(keyspace.write_buffer_size(), 0, "write buffer bytes leaked");
    assert_eq!(panics.load(Ordering::SeqCst), 0, "the engine panicked");
}

/// A restart with more unflushed memtables than partitions: fjall 2.11.2
/// queued a flush task for each recovered memtable but woke its flush
/// thread once per partition, and the flush thread takes one task per
/// wake-up on a machine with two cores (`cpus - 1` flush workers). The
/// tasks left over were never flushed: their bytes stayed in the write
/// buffer and their journals on disk, every restart added more, and once
/// they passed the write buffer's limit every write of the node halted
/// for good (chaos seed 2602, `docs/verification.md`).
#[test]
fn every_memtable_recovered_at_a_restart_is_flushed() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // No flush thread: every memtable this session seals stays
        // unflushed, as a kill leaves them.
        let keyspace = fjall::Config::new(dir.path())
            .flush_workers(0)
            .open()
            .expect("open");
        fill_small_memtables(&keyspace, "p");
        keyspace.persist(PersistMode::SyncAll).expect("persist");
    }
    let keyspace = fjall::Config::new(dir.path())
        .flush_workers(1)
        .open()
        .expect("reopen");
    let recovered_journals = keyspace.journal_count();
    assert!(
        recovered_journals > 2,
        "the test needs several sealed journals for one partition, got {recovered_journals}"
    );
    let partition = keyspace
        .open_partition("p", PartitionCreateOptions::default())
        .expect("open");
    // Flushed, only the active memtable is left in the write buffer, and
    // only the active journal on disk.
    let unflushed = || {
        keyspace
            .write_buffer_size()
            .saturating_sub(u64::from(partition.tree.active_memtable_size()))
    };
    let mut waited_ms = 0;
    while (unflushed() > 0 || keyspace.journal_count() > 1) && waited_ms < 10_000 {
        std::thread::sleep(Duration::from_millis(50));
        waited_ms += 50;
    }
    assert_eq!(
        unflushed(),
        0,
        "recovered memtables were never flushed ({recovered_journals} journals recovered, {} left)",
        keyspace.journal_count()
    );
    assert_eq!(
        keyspace.journal_count(),
        1,
        "sealed journals were never freed"
    );
    for key in 0..600u32 {
        assert!(partition.contains_key(key.to_be_bytes()).expect("read"));
    }
}

/// The on-disk state a kill leaves inside lsm-tree 2.10's tree creation:
/// the partition's `manifest` written, its `levels` file not yet. Unfixed,
/// the store does not open again ("No such file or directory"; anomaly 5 in
/// `docs/verification.md`).
#[test]
fn a_partition_whose_creation_was_cut_is_removed_at_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = regatta_kv::Store::open(dir.path()).expect("open");
        let table = store.open_table(2).expect("table");
        drop(table);
    }
    // A partition created completely, then reduced to what a kill between
    // the two files leaves.
    {
        let keyspace = fjall::Config::new(dir.path()).open().expect("open");
        let partition = keyspace
            .open_partition("t-2-9", PartitionCreateOptions::default())
            .expect("create");
        drop(partition);
        keyspace.persist(PersistMode::SyncAll).expect("persist");
    }
    let cut = dir.path().join("partitions").join("t-2-9");
    std::fs::remove_file(cut.join("levels")).expect("remove levels");
    let unpatched = fjall::Config::new(dir.path()).open();
    assert!(
        unpatched.is_err(),
        "the engine itself opens a cut partition: this repair is no longer needed"
    );
    drop(unpatched);

    let store = regatta_kv::Store::open(dir.path()).expect("the store opens again");
    assert!(!cut.exists(), "the cut partition is removed");
    store.open_table(2).expect("the table opens");
}

/// A partition missing its `levels` file but holding table files is not a
/// cut creation: the store refuses to open and names it, rather than
/// deleting data.
#[test]
fn a_partition_with_data_but_no_levels_file_is_an_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let keyspace = fjall::Config::new(dir.path()).open().expect("open");
        let partition = keyspace
            .open_partition("t-3-1", PartitionCreateOptions::default())
            .expect("create");
        partition.insert(b"key", b"value").expect("insert");
        partition.rotate_memtable_and_wait().expect("flush");
        drop(partition);
        keyspace.persist(PersistMode::SyncAll).expect("persist");
    }
    let partition = dir.path().join("partitions").join("t-3-1");
    assert!(
        std::fs::read_dir(partition.join("segments"))
            .expect("segments")
            .next()
            .is_some(),
        "the flush wrote a table file"
    );
    std::fs::remove_file(partition.join("levels")).expect("remove levels");
    let error = match regatta_kv::Store::open(dir.path()) {
        Ok(_) => panic!("a damaged store opened"),
        Err(error) => error.to_string(),
    };
    assert!(
        error.contains("t-3-1") && error.contains("levels"),
        "{error}"
    );
    assert!(partition.exists(), "nothing is deleted");
}
