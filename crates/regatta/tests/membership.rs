//! Dynamic membership with real processes on 127.0.0.1, under a steady
//! write load whose every acknowledged write must survive:
//! - a cluster grows from 1 to 3 to 5 nodes (`regatta member add`, then
//!   `--raft.join`) and shrinks back to 3 (`regatta member remove`); the
//!   removed nodes shut themselves down, and the tables' groups follow, so
//!   that the 3 nodes left still have a quorum with one of them down;
//! - a rolling restart of 3 nodes (SIGTERM hands over leaderships first);
//! - a removal that would leave no reachable quorum is refused with a
//!   clear message; `--raft.leave-on-terminate` removes a node on SIGTERM;
//!   force-remove revives a survivor whose peers are gone for good.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{connect, free_address, Regatta};
use etcd_client::Client;

/// Runs the `regatta` CLI; (success, stdout, stderr).
fn cli(arguments: &[&str]) -> (bool, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_regatta"))
        .args(arguments)
        .output()
        .expect("run regatta");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).to_string(),
        String::from_utf8_lossy(&output.stderr).to_string(),
    )
}

/// Runs the CLI until it succeeds (a change may be refused while the
/// previous one commits); panics with the last error after 30 s.
fn cli_until_ok(arguments: &[&str]) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (success, stdout, stderr) = cli(arguments);
        if success {
            return stdout;
        }
        assert!(
            Instant::now() < deadline,
            "regatta {arguments:?} kept failing: {stderr}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `regatta member list -o json` at `api`: (id, role) pairs.
fn member_roles(api: SocketAddr) -> Vec<(u64, String)> {
    let (success, stdout, stderr) = cli(&[
        "member",
        "list",
        "--address",
        &api.to_string(),
        "-o",
        "json",
    ]);
    assert!(success, "member list: {stderr}");
    let members: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    let mut roles: Vec<(u64, String)> = members
        .as_array()
        .expect("array")
        .iter()
        .map(|member| {
            (
                member["id"]
                    .as_str()
                    .and_then(|id| id.parse().ok())
                    .expect("id"),
                member["role"].as_str().expect("role").to_string(),
            )
        })
        .collect();
    roles.sort();
    roles
}

fn wait_for_roles(api: SocketAddr, expected: &[(u64, &str)]) {
    let expected: Vec<(u64, String)> = expected
        .iter()
        .map(|(id, role)| (*id, role.to_string()))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let roles = member_roles(api);
        if roles == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "members {roles:?}, expected {expected:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Polls `regatta status` at `api` (up to 30 s) until `settled` holds for
/// its tables; `what` names the wait in the failure.
fn wait_for_tables(api: SocketAddr, what: &str, settled: impl Fn(&[serde_json::Value]) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (success, stdout, stderr) =
            cli(&["status", "--address", &api.to_string(), "-o", "json"]);
        assert!(success, "status: {stderr}");
        let status: serde_json::Value = serde_json::from_str(&stdout).expect("json");
        if settled(status["tables"].as_array().expect("tables")) {
            return;
        }
        assert!(Instant::now() < deadline, "{what}: {stdout}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until every table's group on the node at `api` has exactly
/// `voters` as voters and no learner (`regatta status`).
fn wait_for_table_voters(api: SocketAddr, voters: &[u64]) {
    let what = format!("the tables never settled on voters {voters:?}");
    wait_for_tables(api, &what, |tables| {
        !tables.is_empty()
            && tables.iter().all(|table| {
                let ids = |field: &str| -> Vec<u64> {
                    table[field]
                        .as_array()
                        .map(|ids| ids.iter().filter_map(serde_json::Value::as_u64).collect())
                        .unwrap_or_default()
                };
                ids("voters") == voters && ids("learners").is_empty()
            })
    });
}

/// Waits until the node at `api` reports `leader` as the leader of `table`
/// (`regatta status`).
fn wait_for_table_leader(api: SocketAddr, table: &str, leader: u64) {
    let what = format!("node {leader} never led table {table}");
    // Ids are strings in the JSON output, as in etcd's.
    let leader = leader.to_string();
    wait_for_tables(api, &what, |tables| {
        tables
            .iter()
            .any(|entry| entry["name"] == table && entry["leader"] == leader.as_str())
    });
}

/// Sends SIGTERM, as an orchestrator stopping the node does.
fn terminate(node: &Regatta) {
    let status = Command::new("kill")
        .args(["-TERM", &node.child.id().to_string()])
        .status()
        .expect("kill -TERM");
    assert!(status.success());
}

/// Waits for the process to exit; its exit status.
fn wait_for_exit(node: &mut Regatta, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = node.child.try_wait().expect("try_wait") {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "node {} did not exit; its log:\n{}",
            node.api,
            node.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes `load-<n>` keys through `endpoints` until stopped; the keys
/// whose put was acknowledged.
struct Load {
    stop: Arc<AtomicBool>,
    acknowledged: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(endpoints: Vec<String>) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acknowledged = Arc::new(Mutex::new(Vec::new()));
        let task = {
            let stop = Arc::clone(&stop);
            let acknowledged = Arc::clone(&acknowledged);
            tokio::spawn(async move {
                let mut client: Option<Client> = None;
                let mut next = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if client.is_none() {
                        client = Client::connect(endpoints.clone(), None).await.ok();
                    }
                    let Some(connected) = client.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    };
                    let key = format!("load-{next:06}");
                    next += 1;
                    let put = tokio::time::timeout(
                        Duration::from_secs(5),
                        connected.put(key.as_str(), "v", None),
                    )
                    .await;
                    match put {
                        Ok(Ok(_)) => acknowledged.lock().expect("lock").push(key),
                        _ => {
                            client = None;
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        };
        Load {
            stop,
            acknowledged,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acknowledged.lock().expect("lock").len()
    }

    /// Waits for `more` acknowledged writes beyond now.
    async fn wait_for_progress(&self, more: usize) {
        let target = self.count() + more;
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.count() < target {
            assert!(
                Instant::now() < deadline,
                "the load stopped making progress"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn finish(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("load task");
        Arc::try_unwrap(self.acknowledged)
            .expect("one owner")
            .into_inner()
            .expect("lock")
    }
}

/// Every acknowledged key is readable (linearizably) through `node`.
async fn assert_all_present(node: &Regatta, acknowledged: &[String]) {
    let mut client = connect(node).await;
    let response = client
        .get(
            "load-",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_keys_only(),
            ),
        )
        .await
        .expect("range");
    let present: std::collections::HashSet<Vec<u8>> =
        response.kvs().iter().map(|kv| kv.key().to_vec()).collect();
    let lost: Vec<&String> = acknowledged
        .iter()
        .filter(|key| !present.contains(key.as_bytes()))
        .collect();
    assert!(
        lost.is_empty(),
        "{} of {} acknowledged writes are lost on {}: {:?}",
        lost.len(),
        acknowledged.len(),
        node.api,
        &lost[..lost.len().min(10)]
    );
}

/// Waits until a put through `node` succeeds.
async fn wait_writable(node: &Regatta, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut client) = Client::connect([node.endpoint()], None).await {
            if let Ok(Ok(_)) =
                tokio::time::timeout(Duration::from_secs(3), client.put(key, "v", None)).await
            {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{} never took a write; its log:\n{}",
            node.api,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `--raft.initial-members` for the nodes `ids` (1-based) at `rafts`.
fn members_of(rafts: &[SocketAddr], ids: &[u64]) -> String {
    ids.iter()
        .map(|id| format!("{id}={}", rafts[*id as usize - 1]))
        .collect::<Vec<_>>()
        .join(",")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grow_from_one_to_five_and_shrink_to_three_under_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let apis: Vec<SocketAddr> = (0..5).map(|_| free_address()).collect();
    let rafts: Vec<SocketAddr> = (0..5).map(|_| free_address()).collect();
    let mut nodes: Vec<Option<Regatta>> = Vec::new();
    nodes.push(Some(Regatta::start_member(
        &dir.path().join("n1"),
        1,
        apis[0],
        rafts[0],
        &members_of(&rafts, &[1]),
        &[],
    )));
    let first = nodes[0].as_ref().expect("node 1");
    let _ready = connect(first).await;
    let load = Load::start(vec![first.endpoint()]);
    load.wait_for_progress(20).await;
    let admin = apis[0].to_string();
    for id in 2..=5u64 {
        let raft = rafts[id as usize - 1].to_string();
        let client_url = format!("http://{}", apis[id as usize - 1]);
        cli_until_ok(&[
            "member",
            "add",
            &raft,
            "--id",
            &id.to_string(),
            "--client-url",
            &client_url,
            "--address",
            &admin,
        ]);
        let known: Vec<u64> = (1..=id).collect();
        nodes.push(Some(Regatta::start_member(
            &dir.path().join(format!("n{id}")),
            id,
            apis[id as usize - 1],
            rafts[id as usize - 1],
            &members_of(&rafts, &known),
            &["--raft.join"],
        )));
        let expected: Vec<(u64, &str)> = (1..=id).map(|member| (member, "voter")).collect();
        wait_for_roles(apis[0], &expected);
        let voters: Vec<u64> = (1..=id).collect();
        wait_for_table_voters(apis[0], &voters);
        load.wait_for_progress(20).await;
        eprintln!("grew to {id} nodes; {} writes acknowledged", load.count());
    }
    // Every node serves, and a new node has the data written before it
    // joined.
    for node in nodes.iter().flatten() {
        let mut client = connect(node).await;
        let early = client.get("load-000000", None).await.expect("get");
        assert_eq!(
            early.kvs().len(),
            1,
            "node {} lacks the first write",
            node.api
        );
    }
    // A removal that leaves no reachable quorum is refused: with 4 and 5
    // down, removing 3 would leave {1, 2, 4, 5} with 2 reachable.
    for id in [4usize, 5] {
        nodes[id - 1].as_mut().expect("node").kill();
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    eprintln!("nodes 4 and 5 down");
    let (success, _, stderr) = cli(&["member", "remove", "3", "--address", &admin]);
    assert!(!success, "a removal that breaks the quorum was accepted");
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("reachable"),
        "unclear refusal: {stderr}"
    );
    // Shrink to 3: remove the two dead nodes (3 of 5 reachable suffice).
    for id in [5u64, 4] {
        cli_until_ok(&["member", "remove", &id.to_string(), "--address", &admin]);
    }
    wait_for_roles(apis[0], &[(1, "voter"), (2, "voter"), (3, "voter")]);
    // A removed id is never added again: a table may still hold its old
    // incarnation as a voter, which a wiped node would then stand for.
    let spare = free_address().to_string();
    let (success, _, stderr) = cli(&["member", "add", &spare, "--id", "5", "--address", &admin]);
    assert!(!success, "a removed id was added again");
    assert!(
        stderr.contains("FailedPrecondition") && stderr.contains("never reused"),
        "unclear refusal: {stderr}"
    );
    // The tables follow the cluster (a table still waiting to commit a
    // change needs the node the change counts on).
    wait_for_table_voters(apis[0], &[1, 2, 3]);
    eprintln!("shrank to 3 nodes");
    load.wait_for_progress(20).await;
    // The etcd table followed: with node 3 also down, 1 and 2 are a
    // quorum of {1, 2, 3}; they would not be of {1, ..., 5}.
    nodes[2].as_mut().expect("node 3").kill();
    eprintln!("node 3 down");
    load.wait_for_progress(20).await;
    let acknowledged = load.finish().await;
    assert_all_present(nodes[0].as_ref().expect("node 1"), &acknowledged).await;
    assert_all_present(nodes[1].as_ref().expect("node 2"), &acknowledged).await;
    eprintln!("{} acknowledged writes, none lost", acknowledged.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_nodes_shut_down_and_a_rolling_restart_loses_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let apis: Vec<SocketAddr> = (0..4).map(|_| free_address()).collect();
    let rafts: Vec<SocketAddr> = (0..4).map(|_| free_address()).collect();
    let initial = members_of(&rafts, &[1, 2, 3]);
    let start = |id: usize, extra: &[&str]| {
        Regatta::start_member(
            &dir.path().join(format!("n{id}")),
            id as u64,
            apis[id - 1],
            rafts[id - 1],
            &initial,
            extra,
        )
    };
    let info: &[&str] = &["--log-level", "info"];
    let mut nodes: Vec<Regatta> = (1..=3).map(|id| start(id, info)).collect();
    for node in &nodes {
        let _ready = connect(node).await;
    }
    let load = Load::start(nodes.iter().map(Regatta::endpoint).collect());
    load.wait_for_progress(20).await;
    // Rolling restart: SIGTERM hands leaderships over, then the node
    // exits cleanly and comes back on the same data.
    for (index, node) in nodes.iter_mut().enumerate() {
        terminate(node);
        let status = wait_for_exit(node, Duration::from_secs(20));
        assert!(status.success(), "node {} exited with {status}", index + 1);
        assert!(
            node.log().contains("handed over leaderships"),
            "no drain in the log of node {}",
            index + 1
        );
        *node = start(index + 1, info);
        wait_writable(node, "restart-probe").await;
        load.wait_for_progress(20).await;
    }
    // A node added and then removed shuts itself down.
    let fourth_raft = rafts[3].to_string();
    let admin = apis[0].to_string();
    cli_until_ok(&[
        "member",
        "add",
        &fourth_raft,
        "--id",
        "4",
        "--address",
        &admin,
    ]);
    let mut fourth = Regatta::start_member(
        &dir.path().join("n4"),
        4,
        apis[3],
        rafts[3],
        &members_of(&rafts, &[1, 2, 3, 4]),
        &["--raft.join", "--log-level", "info"],
    );
    wait_for_roles(
        apis[0],
        &[(1, "voter"), (2, "voter"), (3, "voter"), (4, "voter")],
    );
    // Node 4 leads the etcd table when it is removed: it learns of its
    // removal from the metadata group before the table drops it, and hands
    // the table's leadership over on its way out.
    wait_for_table_voters(apis[0], &[1, 2, 3, 4]);
    let fourth_api = apis[3].to_string();
    cli_until_ok(&[
        "table",
        "transfer-leader",
        "etcd",
        "--to",
        "4",
        "--address",
        &fourth_api,
    ]);
    wait_for_table_leader(apis[3], "etcd", 4);
    cli_until_ok(&["member", "remove", "4", "--address", &admin]);
    let status = wait_for_exit(&mut fourth, Duration::from_secs(20));
    assert!(status.success(), "the removed node exited with {status}");
    let log = fourth.log();
    let removed_at = log
        .find("removed from the cluster")
        .unwrap_or_else(|| panic!("no removal in the log: {log}"));
    assert!(
        log[removed_at..].contains("handed over leaderships still_leading=0"),
        "the removed node did not hand its leaderships over: {log}"
    );
    wait_for_table_voters(apis[0], &[1, 2, 3]);
    let acknowledged = load.finish().await;
    for node in &nodes {
        assert_all_present(node, &acknowledged).await;
    }
    eprintln!("{} acknowledged writes, none lost", acknowledged.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leave_on_terminate_and_force_remove() {
    let dir = tempfile::tempdir().expect("tempdir");
    let apis: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let rafts: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let initial = members_of(&rafts, &[1, 2, 3]);
    let mut nodes: Vec<Regatta> = (1..=3)
        .map(|id| {
            let extra: &[&str] = if id == 3 {
                &["--raft.leave-on-terminate", "--log-level", "info"]
            } else {
                &[]
            };
            Regatta::start_member(
                &dir.path().join(format!("n{id}")),
                id as u64,
                apis[id - 1],
                rafts[id - 1],
                &initial,
                extra,
            )
        })
        .collect();
    for node in &nodes {
        let _ready = connect(node).await;
    }
    wait_writable(&nodes[0], "before").await;
    // Node 3 leaves on SIGTERM.
    terminate(&nodes[2]);
    let status = wait_for_exit(&mut nodes[2], Duration::from_secs(40));
    assert!(
        status.success(),
        "node 3 exited with {status}: {}",
        nodes[2].log()
    );
    assert!(
        nodes[2].log().contains("left the cluster"),
        "{}",
        nodes[2].log()
    );
    wait_for_roles(apis[0], &[(1, "voter"), (2, "voter")]);
    wait_writable(&nodes[0], "after-leave").await;
    // With a quorum, force-remove is refused on a node that leads: every
    // leadership moves to node 1, which is then asked to force out node 2.
    let (success, _, stderr) = cli(&[
        "table",
        "transfer-leader",
        "--all",
        "--to",
        "1",
        "--address",
        &apis[1].to_string(),
    ]);
    assert!(success, "transfer-leader: {stderr}");
    let (success, _, refused) = cli(&[
        "member",
        "force-remove",
        "2",
        "--yes-i-know-this-can-lose-data",
        "--address",
        &apis[0].to_string(),
    ]);
    assert!(!success, "force-remove beside a quorum succeeded");
    assert!(
        refused.contains("FailedPrecondition") && refused.contains("member remove 2"),
        "{refused}"
    );
    wait_for_roles(apis[0], &[(1, "voter"), (2, "voter")]);
    // Node 2 dies for good: {1, 2} has no quorum; a normal removal cannot
    // commit, force-remove on the survivor can.
    nodes[1].kill();
    let admin = apis[0].to_string();
    let (success, _, stderr) = cli(&["member", "remove", "2", "--address", &admin]);
    assert!(!success, "a removal without a quorum succeeded");
    let (success, _, stderr_unconfirmed) =
        cli(&["member", "force-remove", "2", "--address", &admin]);
    assert!(!success);
    assert!(
        stderr_unconfirmed.contains("can lose"),
        "{stderr_unconfirmed}"
    );
    let (success, stdout, force_stderr) = cli(&[
        "member",
        "force-remove",
        "2",
        "--yes-i-know-this-can-lose-data",
        "--address",
        &admin,
    ]);
    assert!(
        success,
        "force-remove failed: {force_stderr} (remove said: {stderr})"
    );
    assert!(stdout.contains("done: member 2"), "{stdout}");
    wait_writable(&nodes[0], "after-force-remove").await;
    wait_for_roles(apis[0], &[(1, "voter")]);
    let mut client = connect(&nodes[0]).await;
    for key in ["before", "after-leave", "after-force-remove"] {
        let found = client.get(key, None).await.expect("get");
        assert_eq!(found.kvs().len(), 1, "{key} is lost");
    }
    // Node 3's address is free again: etcd's MemberAdd of a new node
    // there succeeds. Before, node 3's address record outlived it (a
    // removed node cannot delete it), and the address was refused as
    // node 3's.
    let added = client
        .member_add([format!("http://{}", rafts[2])], None)
        .await
        .expect("member add at the departed node's address");
    let id = added.member().expect("the added member").id();
    assert_eq!(id, 4, "one past the highest id ever configured");
    client.member_remove(id).await.expect("member remove");
}

/// Waits until `key` is readable on `node`.
async fn wait_for_key(node: &Regatta, key: &str) {
    let mut client = connect(node).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(found) = client.get(key, None).await {
            if found.kvs().len() == 1 {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{key} never reached {}; its log:\n{}",
            node.api,
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cluster_grows_by_a_node() {
    let dir = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let leader = Regatta::start_on(
        &dir.path().join("leader"),
        free_address(),
        free_address(),
        &["--replication.address", &replication_flag],
    );
    let mut client = connect(&leader).await;
    for i in 0..50 {
        client
            .put(format!("before-{i:02}"), "v", None)
            .await
            .expect("put");
    }
    let apis: Vec<SocketAddr> = (0..2).map(|_| free_address()).collect();
    let rafts: Vec<SocketAddr> = (0..2).map(|_| free_address()).collect();
    let first = Regatta::start_follower_member(
        &dir.path().join("f1"),
        1,
        apis[0],
        rafts[0],
        &members_of(&rafts, &[1]),
        replication,
        &[],
    );
    wait_for_key(&first, "before-49").await;
    let raft = rafts[1].to_string();
    let admin = apis[0].to_string();
    cli_until_ok(&["member", "add", &raft, "--id", "2", "--address", &admin]);
    let second = Regatta::start_follower_member(
        &dir.path().join("f2"),
        2,
        apis[1],
        rafts[1],
        &members_of(&rafts, &[1, 2]),
        replication,
        &["--raft.join"],
    );
    wait_for_roles(apis[0], &[(1, "voter"), (2, "voter")]);
    wait_for_table_voters(apis[0], &[1, 2]);
    // The new node holds what was replicated before it joined, and what
    // the leader cluster writes after.
    wait_for_key(&second, "before-00").await;
    client.put("after", "v", None).await.expect("put");
    wait_for_key(&second, "after").await;
    wait_for_key(&first, "after").await;
}

/// Three members on 127.0.0.1, logging at info, with their data under
/// one directory, so that any of them can be started again on its data.
struct ThreeNodes {
    dir: tempfile::TempDir,
    apis: Vec<SocketAddr>,
    rafts: Vec<SocketAddr>,
    initial: String,
}

impl ThreeNodes {
    fn new() -> ThreeNodes {
        let rafts: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
        ThreeNodes {
            dir: tempfile::tempdir().expect("tempdir"),
            apis: (0..3).map(|_| free_address()).collect(),
            initial: members_of(&rafts, &[1, 2, 3]),
            rafts,
        }
    }

    /// Node `id` (1-based), on its data.
    fn start(&self, id: usize) -> Regatta {
        Regatta::start_member(
            &self.dir.path().join(format!("n{id}")),
            id as u64,
            self.apis[id - 1],
            self.rafts[id - 1],
            &self.initial,
            &["--log-level", "info"],
        )
    }

    /// All three, serving and writable.
    async fn start_all(&self) -> Vec<Regatta> {
        let nodes: Vec<Regatta> = (1..=3).map(|id| self.start(id)).collect();
        for node in &nodes {
            let _ready = connect(node).await;
        }
        wait_writable(&nodes[0], "before").await;
        nodes
    }
}

/// A node removed while it was down used to come back as a ghost: no
/// member talks to a removed node, so it never learned of its removal and
/// went on serving its stale copy. Its peers now refuse its dials with an
/// answer that says it was removed, and it shuts itself down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_removed_while_down_shuts_down_when_it_comes_back() {
    let cluster = ThreeNodes::new();
    let mut nodes = cluster.start_all().await;
    let apis = &cluster.apis;
    nodes[2].kill();
    let admin = apis[0].to_string();
    cli_until_ok(&["member", "remove", "3", "--address", &admin]);
    wait_for_roles(apis[0], &[(1, "voter"), (2, "voter")]);
    wait_writable(&nodes[0], "after-removal").await;
    nodes[2] = cluster.start(3);
    let status = wait_for_exit(&mut nodes[2], Duration::from_secs(30));
    assert!(
        status.success(),
        "the removed node exited with {status}: {}",
        nodes[2].log()
    );
    let log = nodes[2].log();
    assert!(
        log.contains("removed from the cluster while it was down"),
        "{log}"
    );
    let refused = nodes[0].log() + &nodes[1].log();
    assert!(
        refused.contains("refused a dial from a node removed from the cluster"),
        "{refused}"
    );
    wait_writable(&nodes[0], "after-return").await;
}

/// A node force-removed (its peers gone for good, then back after all)
/// shuts down when it returns: force-remove leaves a tombstone once the
/// survivors have a quorum again, so the survivors refuse it. Without
/// the tombstone no peer refused it, and it ran as a ghost. The survivor
/// restarts between the two removals, before the first tombstone can be
/// written: the pending tombstone is on disk (`tombstones-due`), so it is
/// not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_force_removed_node_that_comes_back_shuts_down() {
    let cluster = ThreeNodes::new();
    let mut nodes = cluster.start_all().await;
    let apis = &cluster.apis;
    nodes[1].kill();
    nodes[2].kill();
    // Node 1 is left without a quorum; once it no longer leads (a leader
    // refuses force-remove), it forces both out.
    let admin = apis[0].to_string();
    let force_remove = |id: &str| {
        cli_until_ok(&[
            "member",
            "force-remove",
            id,
            "--yes-i-know-this-can-lose-data",
            "--address",
            &admin,
        ])
    };
    force_remove("2");
    // Members 1 and 3, one of them down: no quorum, so the tombstone of 2
    // is pending when node 1 goes down hard.
    let due = cluster.dir.path().join("n1").join("tombstones-due");
    assert_eq!(
        std::fs::read_to_string(&due).expect("the pending tombstone file"),
        "2\n"
    );
    nodes[0].kill();
    // Without a quorum it serves no reads; the CLI retries until it
    // answers.
    nodes[0] = cluster.start(1);
    force_remove("3");
    wait_writable(&nodes[0], "after-force-remove").await;
    nodes[1] = cluster.start(2);
    let status = wait_for_exit(&mut nodes[1], Duration::from_secs(40));
    assert!(status.success(), "node 2 exited with {status}");
    let log = nodes[1].log();
    assert!(
        log.contains("removed from the cluster while it was down"),
        "{log}"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while due.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "the pending file outlived its tombstones"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
