//! Crash safety of the whole node: writers run against a real `regatta`
//! process, which is killed with SIGKILL mid-write (after compactions, so
//! the table store's own durability is exercised), restarted on the same
//! directory and ports, and every acknowledged write must read back.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{connect, free_address, Regatta};

/// Session tables saved under `dir`: a group saves one
/// (`snapshot-<index>-<term>.snap`) before each log compaction.
fn compactions_recorded(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().to_string();
            if path.is_dir() {
                compactions_recorded(&path)
            } else {
                usize::from(name.starts_with("snapshot-") && name.ends_with(".snap"))
            }
        })
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kill_9() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let (api, raft) = (free_address(), free_address());
    let flags = ["--raft.snapshot-entries", "100"];
    let acknowledged: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    for round in 0..3 {
        let mut regatta = Regatta::start_on(&data, api, raft, &flags);
        let client = connect(&regatta).await;
        // Everything acknowledged before, in every earlier life, is there.
        {
            let mut client = client.clone();
            let expected = acknowledged.lock().expect("lock").clone();
            for (key, value) in &expected {
                let found = client.get(key.as_str(), None).await.expect("get");
                let kvs = found.kvs();
                assert_eq!(kvs.len(), 1, "round {round}: acknowledged {key} is lost");
                assert_eq!(kvs[0].value(), value.as_bytes(), "round {round}: {key}");
            }
            eprintln!(
                "round {round}: {} acknowledged writes verified",
                expected.len()
            );
        }
        let before_round = acknowledged.lock().expect("lock").len();
        let mut writers = Vec::new();
        for writer in 0..4 {
            let (mut client, acknowledged) = (client.clone(), Arc::clone(&acknowledged));
            writers.push(tokio::spawn(async move {
                for sequence in 0.. {
                    let key = format!("r{round}/w{writer}/{sequence}");
                    let value = format!("v{sequence}");
                    match client.put(key.as_str(), value.as_str(), None).await {
                        Ok(_) => {
                            acknowledged.lock().expect("lock").insert(key, value);
                        }
                        Err(_) => return,
                    }
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(700 + 300 * round)).await;
        regatta.kill();
        for writer in writers {
            // A writer stops at its first error (the kill); a panic fails.
            writer.await.expect("writer task");
        }
        let written = acknowledged.lock().expect("lock").len() - before_round;
        assert!(
            written > 50,
            "round {round}: only {written} writes were acknowledged before the kill"
        );
    }
    // The store's own durability under compaction is the point: the log
    // was compacted (every 100 entries) before the last kills.
    assert!(
        compactions_recorded(&data) > 0,
        "no log compaction happened in three rounds"
    );
    let regatta = Regatta::start_on(&data, api, raft, &flags);
    let mut client = connect(&regatta).await;
    let expected = acknowledged.lock().expect("lock").clone();
    assert!(expected.len() > 300, "too few writes: {}", expected.len());
    for (key, value) in &expected {
        let found = client.get(key.as_str(), None).await.expect("get");
        assert_eq!(found.kvs().len(), 1, "acknowledged {key} is lost");
        assert_eq!(found.kvs()[0].value(), value.as_bytes());
    }
}

/// SIGTERM stops the node cleanly (exit status 0, promptly), and a second
/// `regatta leader --dev` on the same directory serves every write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_and_restart_keeps_everything() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("node");
    let (api, raft) = (free_address(), free_address());
    let mut regatta = Regatta::start_on(&data, api, raft, &[]);
    let mut client = connect(&regatta).await;
    for i in 0..50 {
        client
            .put(format!("k{i}"), format!("v{i}"), None)
            .await
            .expect("put");
    }
    let terminated = std::process::Command::new("kill")
        .args(["-TERM", &regatta.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(terminated.success());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = regatta.child.try_wait().expect("wait") {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "regatta did not stop on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(status.success(), "exit status {status:?}");
    drop(regatta);
    let regatta = Regatta::start_on(&data, api, raft, &[]);
    let mut client = connect(&regatta).await;
    for i in 0..50 {
        let found = client.get(format!("k{i}"), None).await.expect("get");
        assert_eq!(found.kvs()[0].value(), format!("v{i}").as_bytes());
    }
}
