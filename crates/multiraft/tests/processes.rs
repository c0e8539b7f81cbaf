//! Three nodes as separate processes on 127.0.0.1, with ports the test
//! chooses: elect, replicate, read; kill -9 the leader while writes go on;
//! restart it on its data directory. No acknowledged write is lost: every
//! one reads back, linearizably, on every node. A node whose data is wiped
//! is removed, re-added, and recovers everything through a snapshot.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

struct Node {
    id: u64,
    raft: SocketAddr,
    client: SocketAddr,
    child: Option<Child>,
}

/// A failing test must not leave processes behind.
impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A free port on 127.0.0.1 below the kernel's ephemeral range (32768 and
/// up), so that no outgoing connection takes the port of a node that is
/// down and about to restart on it. Drawn from a per-process sequence.
fn free_address() -> SocketAddr {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = std::process::id().wrapping_mul(7_919);
    loop {
        let port = 20_000 + (start.wrapping_add(NEXT.fetch_add(1, Ordering::Relaxed)) % 12_000);
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port as u16)) {
            return listener.local_addr().expect("address");
        }
    }
}

fn spawn(node: &Node, dir: &Path, peers: &str) -> Child {
    spawn_with(node, dir, peers, &[])
}

fn spawn_with(node: &Node, dir: &Path, peers: &str, extra: &[&str]) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_test_node"))
        .args(extra)
        .args(["--id", &node.id.to_string()])
        .args(["--dir", &dir.display().to_string()])
        .args(["--raft", &node.raft.to_string()])
        .args(["--client", &node.client.to_string()])
        .args(["--peers", peers])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn test_node");
    let stdout = child.stdout.take().expect("stdout");
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .expect("ready line");
    assert_eq!(line.trim(), "ready", "node {} did not start", node.id);
    child
}

/// One request on a fresh connection; `None` when the node is unreachable.
fn request(address: SocketAddr, line: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&address, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream.write_all(format!("{line}\n").as_bytes()).ok()?;
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).ok()?;
    Some(answer.trim().to_string())
}

fn leader(nodes: &BTreeMap<u64, Node>) -> Option<u64> {
    nodes
        .values()
        .filter(|node| node.child.is_some())
        .find_map(|node| {
            let answer = request(node.client, "LEADER")?;
            let id: u64 = answer.strip_prefix("LEADER ")?.parse().ok()?;
            (id != 0 && nodes.get(&id).is_some_and(|leader| leader.child.is_some())).then_some(id)
        })
}

fn wait_for_leader(nodes: &BTreeMap<u64, Node>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(id) = leader(nodes) {
            return id;
        }
        assert!(Instant::now() < deadline, "no leader among the processes");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Writes `key`; true only when the leader acknowledged it.
fn put(nodes: &BTreeMap<u64, Node>, key: &str, value: &str) -> bool {
    let Some(id) = leader(nodes) else {
        return false;
    };
    request(nodes[&id].client, &format!("PUT {key} {value}")).as_deref() == Some("OK")
}

#[test]
fn three_processes_survive_kill_9_of_the_leader() {
    let (dirs, mut nodes, peers) = start_three(&[]);
    let first_leader = wait_for_leader(&nodes);
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..50 {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if put(&nodes, &key, &value) {
            acknowledged.insert(key, value);
        }
    }
    assert!(
        acknowledged.len() >= 45,
        "too few writes acknowledged before the kill"
    );

    // kill -9 the leader; writes go on against whoever leads next.
    let victim = nodes.get_mut(&first_leader).expect("leader");
    victim
        .child
        .take()
        .expect("running")
        .kill()
        .expect("SIGKILL");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut written_after = 0;
    let mut i = 50;
    while written_after < 50 {
        assert!(
            Instant::now() < deadline,
            "writes did not resume after the kill"
        );
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if put(&nodes, &key, &value) {
            acknowledged.insert(key, value);
            written_after += 1;
        } else {
            std::thread::sleep(Duration::from_millis(20));
        }
        i += 1;
    }
    assert_ne!(wait_for_leader(&nodes), first_leader);

    // Restart the killed node on its data directory.
    let victim = nodes.get_mut(&first_leader).expect("node");
    victim.child = Some(spawn(
        victim,
        dirs[first_leader as usize - 1].path(),
        &peers,
    ));
    for node in nodes.values() {
        let deadline = Instant::now() + Duration::from_secs(20);
        for (key, value) in &acknowledged {
            loop {
                if request(node.client, &format!("GET {key}")).as_deref()
                    == Some(format!("VAL {value}").as_str())
                {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {} lost acknowledged {key}={value}",
                    node.id
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
    for node in nodes.values_mut() {
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start_three(extra: &[&str]) -> (Vec<tempfile::TempDir>, BTreeMap<u64, Node>, String) {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut nodes: BTreeMap<u64, Node> = (1..=3)
        .map(|id| {
            (
                id,
                Node {
                    id,
                    raft: free_address(),
                    client: free_address(),
                    child: None,
                },
            )
        })
        .collect();
    let peers = nodes
        .values()
        .map(|n| format!("{}={}", n.id, n.raft))
        .collect::<Vec<_>>()
        .join(",");
    for (id, node) in nodes.iter_mut() {
        node.child = Some(spawn_with(
            node,
            dirs[*id as usize - 1].path(),
            &peers,
            extra,
        ));
    }
    (dirs, nodes, peers)
}

/// Sends `line` to the leader until it answers `OK`.
fn on_leader_until_ok(nodes: &BTreeMap<u64, Node>, line: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let id = wait_for_leader(nodes);
        let answer = request(nodes[&id].client, line);
        if answer.as_deref() == Some("OK") {
            return;
        }
        assert!(Instant::now() < deadline, "{line}: {answer:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_wiped_node_recovers_through_a_snapshot() {
    let (dirs, mut nodes, peers) = start_three(&["--snapshot-every", "20"]);
    let leader = wait_for_leader(&nodes);
    let mut acknowledged: BTreeMap<String, String> = BTreeMap::new();
    for i in 0..100 {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if put(&nodes, &key, &value) {
            acknowledged.insert(key, value);
        }
    }
    assert!(acknowledged.len() >= 95, "too few writes acknowledged");

    // kill -9 a follower and wipe its data directory.
    let wiped = (1..=3).find(|id| *id != leader).expect("a follower");
    let node = nodes.get_mut(&wiped).expect("node");
    let mut child = node.child.take().expect("running");
    child.kill().expect("SIGKILL");
    let _ = child.wait();
    let dir = dirs[wiped as usize - 1].path();
    std::fs::remove_dir_all(dir).expect("wipe");
    std::fs::create_dir(dir).expect("empty directory");

    // Its old identity goes; it comes back empty as a learner. The leader
    // has compacted, so only a snapshot can bring it up to date.
    on_leader_until_ok(&nodes, &format!("REMOVE {wiped}"));
    for i in 100..120 {
        let (key, value) = (format!("k{i}"), format!("v{i}"));
        if put(&nodes, &key, &value) {
            acknowledged.insert(key, value);
        }
    }
    let leader = wait_for_leader(&nodes);
    let first: u64 = request(nodes[&leader].client, "FIRST")
        .and_then(|answer| answer.strip_prefix("FIRST ")?.parse().ok())
        .expect("first index");
    assert!(
        first > 50,
        "the leader has not compacted: first index {first}"
    );
    on_leader_until_ok(&nodes, &format!("ADD {wiped}"));
    let node = nodes.get_mut(&wiped).expect("node");
    node.child = Some(spawn_with(
        node,
        dir,
        &peers,
        &["--snapshot-every", "20", "--join", "true"],
    ));

    let node = &nodes[&wiped];
    let deadline = Instant::now() + Duration::from_secs(30);
    for (key, value) in &acknowledged {
        loop {
            if request(node.client, &format!("GET {key}")).as_deref()
                == Some(format!("VAL {value}").as_str())
            {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the wiped node never recovered acknowledged {key}={value}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let first: u64 = request(node.client, "FIRST")
        .and_then(|answer| answer.strip_prefix("FIRST ")?.parse().ok())
        .expect("first index");
    assert!(
        first > 50,
        "the wiped node's log starts at {first}: it replayed entries, not a snapshot"
    );
    for node in nodes.values_mut() {
        if let Some(mut child) = node.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
