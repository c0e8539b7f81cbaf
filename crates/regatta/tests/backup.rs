//! Backup, restore and reset with real processes on 127.0.0.1 and the
//! `regatta` CLI:
//!
//! - a 3-node cluster is backed up, wiped (every data directory deleted)
//!   and restored: every node then holds exactly what was backed up,
//!   values, revisions and versions; refusals (no token, no confirmation,
//!   a damaged file) change nothing;
//! - a restore on the leader cluster reaches its follower cluster, which
//!   installs the restored table; `regatta reset` makes a follower table
//!   install a fresh copy; both are refused where they do not apply.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{connect, everything, free_address, members, wait_for_http, Regatta, Row};
use regatta_server::proto::regatta::v1 as pb;
use sha2::Digest;

const TOKEN: &str = "backup-admin-token-0123456789";

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

fn cli_ok(arguments: &[&str]) -> String {
    let (success, stdout, stderr) = cli(arguments);
    assert!(success, "regatta {arguments:?} failed: {stderr}");
    format!("{stdout}{stderr}")
}

fn cli_err(arguments: &[&str]) -> String {
    let (success, _, stderr) = cli(arguments);
    assert!(!success, "regatta {arguments:?} should have failed");
    stderr
}

/// Every key of table `table` through regatta.v1, from this node's copy,
/// or the status the node answered (UNAVAILABLE when it cannot be
/// reached).
async fn try_table_rows(endpoint: &str, table: &str) -> Result<Vec<Row>, tonic::Status> {
    let endpoint = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .map_err(|error| tonic::Status::invalid_argument(error.to_string()))?;
    let channel = endpoint
        .connect()
        .await
        .map_err(|error| tonic::Status::unavailable(error.to_string()))?;
    let mut kv = pb::kv_client::KvClient::new(channel).max_decoding_message_size(64 << 20);
    let response = kv
        .range(pb::RangeRequest {
            table: table.into(),
            key: vec![0],
            range_end: vec![0],
            ..pb::RangeRequest::default()
        })
        .await?;
    Ok(response
        .into_inner()
        .kvs
        .into_iter()
        .map(|kv| {
            (
                kv.key,
                kv.value,
                kv.create_revision,
                kv.mod_revision,
                // regatta.v1 has no version; the etcd API shows it.
                0,
            )
        })
        .collect())
}

/// Every key of table `table`, which must be readable on `endpoint`.
async fn table_rows(endpoint: &str, table: &str) -> Vec<Row> {
    match try_table_rows(endpoint, table).await {
        Ok(rows) => rows,
        Err(status) => panic!("reading table {table} on {endpoint}: {status:?}"),
    }
}

/// Waits until `endpoint`'s copy of `table` is `expected` (a table that
/// is missing or unreadable is not an empty one).
async fn wait_for_rows(endpoint: &str, table: &str, expected: &[Row], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = try_table_rows(endpoint, table).await;
        if found.as_ref().is_ok_and(|rows| rows.as_slice() == expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {endpoint} holds {} of {table}, expected {} keys",
            match &found {
                Ok(rows) => format!("{} keys", rows.len()),
                Err(status) => format!("no readable copy ({status:?})"),
            },
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn kv_client(endpoint: &str) -> pb::kv_client::KvClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    pb::kv_client::KvClient::new(channel).max_decoding_message_size(64 << 20)
}

/// Puts through regatta.v1, retrying while the table's group has no
/// leader yet.
async fn put(endpoint: &str, table: &str, key: String, value: Vec<u8>) -> u64 {
    let mut kv = kv_client(endpoint).await;
    let request = pb::PutRequest {
        table: table.into(),
        key: key.into_bytes(),
        value,
        prev_kv: false,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match kv.put(request.clone()).await {
            Ok(response) => {
                return response
                    .into_inner()
                    .header
                    .map_or(0, |header| header.revision)
            }
            Err(status) => {
                assert!(Instant::now() < deadline, "put never succeeded: {status:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

fn create_table(address: SocketAddr, name: &str) {
    let address = address.to_string();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (success, _, stderr) = cli(&[
            "table",
            "create",
            name,
            "--address",
            &address,
            "--token",
            TOKEN,
        ]);
        if success || stderr.contains("already exists") {
            return;
        }
        assert!(Instant::now() < deadline, "table create failed: {stderr}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn token_file(dir: &Path) -> String {
    let path = dir.join("token");
    std::fs::write(&path, format!("{TOKEN}\n")).expect("write token");
    path.to_string_lossy().to_string()
}

/// Starts a 3-node leader cluster on `dirs` and the given addresses.
fn start_cluster(
    dirs: &[std::path::PathBuf],
    apis: &[SocketAddr],
    rafts: &[SocketAddr],
    token: &str,
) -> Vec<Regatta> {
    let initial = members(rafts);
    (0..3)
        .map(|index| {
            std::fs::create_dir_all(&dirs[index]).expect("dir");
            Regatta::start_member(
                &dirs[index],
                index as u64 + 1,
                apis[index],
                rafts[index],
                &initial,
                &["--api.admin-token-file", token],
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backup_wipe_and_restore_give_identical_contents_on_every_node() {
    let root = tempfile::tempdir().expect("tempdir");
    let token = token_file(root.path());
    let dirs: Vec<_> = (1..=3)
        .map(|id| root.path().join(format!("node{id}")))
        .collect();
    let apis: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let rafts: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let endpoints: Vec<String> = apis.iter().map(|api| format!("http://{api}")).collect();
    let address = apis[0].to_string();
    let mut nodes = start_cluster(&dirs, &apis, &rafts, &token);
    let mut client = connect(&nodes[0]).await;

    // The etcd table: puts, overwrites and deletes.
    for round in 0..3 {
        for i in 0..100 {
            client
                .put(
                    format!("key{i:03}"),
                    format!("value {i} round {round}"),
                    None,
                )
                .await
                .expect("put");
        }
    }
    for i in (0..100).step_by(7) {
        client
            .delete(format!("key{i:03}"), None)
            .await
            .expect("delete");
    }
    // A second table, with values that span several 1 MiB chunks.
    create_table(apis[0], "users");
    for i in 0..24 {
        let value = vec![b'a' + (i % 26) as u8; 100 << 10];
        put(&endpoints[0], "users", format!("blob{i:02}"), value).await;
    }
    for i in 0..50 {
        put(
            &endpoints[0],
            "users",
            format!("user{i:02}"),
            format!("{i}").into_bytes(),
        )
        .await;
    }
    // An empty table.
    create_table(apis[0], "empty");
    let etcd_rows = everything(&mut client, true).await;
    let etcd_v1_rows = table_rows(&endpoints[0], "etcd").await;
    let users_rows = table_rows(&endpoints[0], "users").await;
    assert_eq!(etcd_rows.len(), 100 - 15);
    assert_eq!(users_rows.len(), 74);

    // Backups are admin operations.
    let backup_dir = root.path().join("backup");
    let backup_path = backup_dir.to_string_lossy().to_string();
    let refused = cli_err(&["backup", "--address", &address, "--dir", &backup_path]);
    assert!(refused.contains("Unauthenticated"), "{refused}");
    let output = cli_ok(&[
        "backup",
        "--address",
        &address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
    ]);
    assert!(output.contains("backed up 3 tables"), "{output}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(backup_dir.join("manifest.json")).expect("manifest"))
            .expect("json");
    let tables = manifest["tables"].as_array().expect("tables");
    let names: Vec<&str> = tables
        .iter()
        .map(|t| t["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["empty", "etcd", "users"]);
    assert_eq!(tables[1]["keys"], 85);
    assert_eq!(tables[2]["keys"], 74);
    assert!(tables[2]["bytes"].as_u64().expect("bytes") > 24 * (100 << 10));
    // A second backup into the same directory is refused.
    let again = cli_err(&[
        "backup",
        "--address",
        &address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
    ]);
    assert!(again.contains("holds a backup already"), "{again}");

    // Wipe: every node dies and loses its data directory.
    drop(client);
    for node in &mut nodes {
        node.kill();
    }
    drop(nodes);
    for dir in &dirs {
        std::fs::remove_dir_all(dir).expect("wipe");
    }
    let nodes = start_cluster(&dirs, &apis, &rafts, &token);
    let mut client = connect(&nodes[0]).await;
    client
        .put("written-before-restore", "x", None)
        .await
        .expect("put");
    // The wiped cluster has no users table at all until the restore.
    match try_table_rows(&endpoints[0], "users").await {
        Err(status) if status.code() == tonic::Code::NotFound => {}
        other => panic!("the wiped cluster has a users table: {other:?}"),
    }

    // Without the confirmation flag, restore checks and changes nothing.
    let dry = cli_err(&[
        "restore",
        "--address",
        &address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
    ]);
    assert!(dry.contains("the backup checks out: 3 tables"), "{dry}");
    assert!(dry.contains("--yes-i-know-this-overwrites-data"), "{dry}");
    // A restore needs the token too.
    let refused = cli_err(&[
        "restore",
        "--address",
        &address,
        "--dir",
        &backup_path,
        "--yes-i-know-this-overwrites-data",
    ]);
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // A damaged copy of the backup is refused before anything is sent.
    let damaged_dir = root.path().join("damaged");
    std::fs::create_dir_all(&damaged_dir).expect("dir");
    for entry in std::fs::read_dir(&backup_dir).expect("list") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), damaged_dir.join(entry.file_name())).expect("copy");
    }
    let users_file = damaged_dir.join("users.table");
    let mut bytes = std::fs::read(&users_file).expect("read");
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x40;
    std::fs::write(&users_file, bytes).expect("write");
    let damaged = cli_err(&[
        "restore",
        "--address",
        &address,
        "--dir",
        &damaged_dir.to_string_lossy(),
        "--token",
        TOKEN,
        "--yes-i-know-this-overwrites-data",
    ]);
    assert!(damaged.contains("does not match its checksum"), "{damaged}");
    assert_eq!(everything(&mut client, true).await.len(), 1);

    // A crafted backup with valid checksums but items the storage or the
    // cluster's limits refuse: an empty key, and a value over
    // --kv.value-bytes-max. The server refuses each, and keeps serving.
    let record = |value: &[u8]| {
        let mut record = vec![0u8; regatta_kv::RECORD_HEADER_BYTES];
        record.extend_from_slice(value);
        record
    };
    for (what, key, value, expected) in [
        ("empty key", Vec::new(), record(b"v"), "key of 0 bytes"),
        (
            "huge value",
            b"k".to_vec(),
            record(&vec![7u8; 3 << 20]),
            "ResourceExhausted",
        ),
    ] {
        let crafted = root
            .path()
            .join(format!("crafted-{}", what.replace(' ', "-")));
        std::fs::create_dir_all(&crafted).expect("dir");
        let mut items = Vec::new();
        items.extend_from_slice(&(key.len() as u32).to_le_bytes());
        items.extend_from_slice(&key);
        items.extend_from_slice(&(value.len() as u32).to_le_bytes());
        items.extend_from_slice(&value);
        std::fs::write(crafted.join("etcd.table"), &items).expect("write");
        let digest: String = sha2::Sha256::digest(&items)
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect();
        let manifest = serde_json::json!({
            "format": "regatta-backup", "version": 1, "created_unix_ms": 1,
            "source": "test", "regatta_version": "0",
            "tables": [{"name": "etcd", "file": "etcd.table", "revision": 9,
                        "keys": 1, "bytes": items.len(), "sha256": digest}],
        });
        std::fs::write(
            crafted.join("manifest.json"),
            serde_json::to_vec(&manifest).expect("json"),
        )
        .expect("write");
        let refused = cli(&[
            "restore",
            "--address",
            &address,
            "--dir",
            &crafted.to_string_lossy(),
            "--token",
            TOKEN,
            "--yes-i-know-this-overwrites-data",
        ]);
        assert!(!refused.0, "{what}: the restore should fail");
        assert!(refused.2.contains(expected), "{what}: {}", refused.2);
        assert_eq!(everything(&mut client, true).await.len(), 1, "{what}");
        // The server checks too, for clients other than this CLI.
        let chunk = pb::SnapshotChunk {
            len: items.len() as u64,
            index: 9,
            crc32c: crc32c::crc32c(&items),
            offset: 0,
            last: true,
            data: items.clone(),
        };
        let messages = vec![
            pb::RestoreMessage {
                data: Some(pb::restore_message::Data::Info(pb::RestoreInfo {
                    table: b"etcd".to_vec(),
                })),
            },
            pb::RestoreMessage {
                data: Some(pb::restore_message::Data::Chunk(chunk)),
            },
        ];
        let channel = tonic::transport::Endpoint::from_shared(endpoints[0].clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect");
        let mut maintenance = pb::maintenance_client::MaintenanceClient::new(channel);
        let mut request = tonic::Request::new(tokio_stream::iter(messages));
        request.metadata_mut().insert(
            "authorization",
            format!("Bearer {TOKEN}").parse().expect("header"),
        );
        let status = maintenance.restore(request).await.expect_err("refused");
        let code = if key.is_empty() {
            tonic::Code::InvalidArgument
        } else {
            tonic::Code::ResourceExhausted
        };
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert_eq!(everything(&mut client, true).await.len(), 1, "{what}");
    }

    let restored = cli_ok(&[
        "restore",
        "--address",
        &address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
        "--yes-i-know-this-overwrites-data",
    ]);
    assert!(restored.contains("restored 3 tables"), "{restored}");
    assert!(restored.contains("table users: 74 keys"), "{restored}");

    // Every node holds exactly the backup: values, revisions, versions.
    for (index, endpoint) in endpoints.iter().enumerate() {
        wait_for_rows(endpoint, "users", &users_rows, "after the restore").await;
        wait_for_rows(endpoint, "etcd", &etcd_v1_rows, "after the restore").await;
        wait_for_rows(endpoint, "empty", &[], "after the restore").await;
        let mut node_client = connect(&nodes[index]).await;
        assert_eq!(everything(&mut node_client, true).await, etcd_rows);
    }
    // The tables take writes again, with revisions past the restore.
    let before = client.get("key001", None).await.expect("get");
    let revision_before = before.header().expect("header").revision();
    let put = client.put("key001", "after", None).await.expect("put");
    assert!(put.header().expect("header").revision() > revision_before);
    let got = client.get("key001", None).await.expect("get");
    assert_eq!(got.kvs()[0].value(), b"after");
    assert_eq!(
        got.kvs()[0].version(),
        4,
        "the version counts on from the backup's"
    );
}

/// The metric `name{table="table"}` on a node's /metrics, or 0.
fn metric(rest: SocketAddr, name: &str, table: &str) -> u64 {
    let body = wait_for_http(rest, "/metrics", 200);
    let prefix = format!("{name}{{table=\"{table}\"}} ");
    body.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

fn wait_for_metric_at_least(rest: SocketAddr, name: &str, table: &str, least: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let value = metric(rest, name, table);
        if value >= least {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} of {table} stayed at {value}, below {least}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_reaches_the_follower_cluster_and_reset_resyncs_a_follower_table() {
    let root = tempfile::tempdir().expect("tempdir");
    let token = token_file(root.path());
    let leader_dir = root.path().join("leader");
    let follower_dir = root.path().join("follower");
    std::fs::create_dir_all(&leader_dir).expect("dir");
    std::fs::create_dir_all(&follower_dir).expect("dir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let leader = Regatta::start_on(
        &leader_dir,
        free_address(),
        free_address(),
        &[
            "--api.admin-token-file",
            &token,
            "--replication.address",
            &replication_flag,
        ],
    );
    let follower_rest = free_address();
    let follower_rest_flag = follower_rest.to_string();
    let follower = Regatta::start_follower(
        &follower_dir,
        free_address(),
        free_address(),
        replication,
        &[
            "--api.admin-token-file",
            &token,
            "--rest.address",
            &follower_rest_flag,
        ],
    );
    let leader_address = leader.api.to_string();
    let follower_address = follower.api.to_string();
    let leader_endpoint = leader.endpoint();
    let follower_endpoint = follower.endpoint();
    drop(connect(&leader).await);
    create_table(leader.api, "orders");
    for i in 0..200 {
        put(
            &leader_endpoint,
            "orders",
            format!("order{i:03}"),
            b"v1".to_vec(),
        )
        .await;
    }
    let state_a = table_rows(&leader_endpoint, "orders").await;
    wait_for_rows(&follower_endpoint, "orders", &state_a, "before the backup").await;

    let backup_dir = root.path().join("backup");
    let backup_path = backup_dir.to_string_lossy().to_string();
    // `-o json`: the result on stdout as one JSON document.
    let (success, stdout, stderr) = cli(&[
        "backup",
        "--address",
        &leader_address,
        "--dir",
        &backup_path,
        "--table",
        "orders",
        "--token",
        TOKEN,
        "-o",
        "json",
    ]);
    assert!(success, "backup -o json failed: {stderr}");
    let result: serde_json::Value = serde_json::from_str(&stdout).expect("backup -o json");
    assert_eq!(result["tables"][0]["name"], "orders", "{result}");
    assert!(result["tables"][0]["keys"].as_u64() > Some(0), "{result}");
    // State B: more writes after the backup, replicated.
    for i in 0..200 {
        put(
            &leader_endpoint,
            "orders",
            format!("order{i:03}"),
            b"v2".to_vec(),
        )
        .await;
    }
    put(&leader_endpoint, "orders", "late".into(), b"x".to_vec()).await;
    let state_b = table_rows(&leader_endpoint, "orders").await;
    wait_for_rows(&follower_endpoint, "orders", &state_b, "state B").await;
    let installs_before = metric(
        follower_rest,
        "regatta_replication_snapshot_installs_total",
        "orders",
    );

    // A follower cluster refuses a restore; the leader cluster a reset.
    let refused = cli_err(&[
        "restore",
        "--address",
        &follower_address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
        "--yes-i-know-this-overwrites-data",
    ]);
    assert!(refused.contains("FailedPrecondition"), "{refused}");
    let refused = cli_err(&[
        "reset",
        "--address",
        &leader_address,
        "--table",
        "orders",
        "--token",
        TOKEN,
    ]);
    assert!(refused.contains("FailedPrecondition"), "{refused}");
    let refused = cli_err(&["reset", "--address", &follower_address, "--table", "orders"]);
    assert!(refused.contains("Unauthenticated"), "{refused}");

    // Restoring A on the leader cluster brings the follower back to A.
    cli_ok(&[
        "restore",
        "--address",
        &leader_address,
        "--dir",
        &backup_path,
        "--token",
        TOKEN,
        "--yes-i-know-this-overwrites-data",
    ]);
    assert_eq!(table_rows(&leader_endpoint, "orders").await, state_a);
    wait_for_rows(&follower_endpoint, "orders", &state_a, "after the restore").await;
    wait_for_metric_at_least(
        follower_rest,
        "regatta_replication_snapshot_installs_total",
        "orders",
        installs_before + 1,
    );
    // Replication goes on after it.
    put(
        &leader_endpoint,
        "orders",
        "after-restore".into(),
        b"y".to_vec(),
    )
    .await;
    let state_c = table_rows(&leader_endpoint, "orders").await;
    wait_for_rows(&follower_endpoint, "orders", &state_c, "after the restore").await;

    // A reset makes the follower table install a fresh copy; it keeps
    // serving its data meanwhile, and replication continues after it.
    let installs = metric(
        follower_rest,
        "regatta_replication_snapshot_installs_total",
        "orders",
    );
    let output = cli_ok(&[
        "reset",
        "--address",
        &follower_address,
        "--table",
        "orders",
        "--token",
        TOKEN,
    ]);
    assert!(output.contains("table orders"), "{output}");
    wait_for_metric_at_least(
        follower_rest,
        "regatta_replication_snapshot_installs_total",
        "orders",
        installs + 1,
    );
    wait_for_rows(&follower_endpoint, "orders", &state_c, "after the reset").await;
    let output = cli_ok(&[
        "reset",
        "--address",
        &follower_address,
        "--all",
        "--token",
        TOKEN,
    ]);
    assert!(output.contains("table orders"), "{output}");
    assert!(output.contains("table etcd"), "{output}");
    wait_for_metric_at_least(
        follower_rest,
        "regatta_replication_snapshot_installs_total",
        "orders",
        installs + 2,
    );
    put(
        &leader_endpoint,
        "orders",
        "after-reset".into(),
        b"z".to_vec(),
    )
    .await;
    let state_d = table_rows(&leader_endpoint, "orders").await;
    wait_for_rows(&follower_endpoint, "orders", &state_d, "after the resets").await;
    let missing = cli_err(&[
        "reset",
        "--address",
        &follower_address,
        "--table",
        "nope",
        "--token",
        TOKEN,
    ]);
    assert!(missing.contains("NotFound"), "{missing}");
}
