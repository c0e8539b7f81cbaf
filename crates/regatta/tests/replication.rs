//! Cross-location replication with real processes on 127.0.0.1: a leader
//! cluster serving `--replication.address` and a follower cluster
//! (`regatta follower`) replicating it. Writes on the leader appear on the
//! follower with the leader's revisions; writes on the follower are
//! forwarded and readable there at once; the Tables API is refused on the
//! follower, while tables created and dropped on the leader come and go
//! there; a follower that was stopped while the leader compacted, and one
//! whose data was wiped, recover through the leader's snapshot; and the
//! follower's full contents end equal to the leader's.

mod common;

use std::time::{Duration, Instant};

use common::{connect, everything, free_address, members, Regatta, Row};
use etcd_client::{Client, GetOptions};
use regatta_server::proto::regatta::v1 as pb;
use tonic::Code;

/// Waits until the follower holds exactly what the leader holds.
async fn converge(leader: &mut Client, follower: &mut Client, what: &str) {
    let expected = everything(leader, false).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = match follower
            .get(vec![0u8], Some(GetOptions::new().with_from_key()))
            .await
        {
            Ok(_) => everything(follower, false).await,
            Err(_) => Vec::new(),
        };
        if found == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the follower never converged: it holds {} keys, the leader {}",
            found.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn tables(endpoint: String) -> pb::tables_client::TablesClient<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint)
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    pb::tables_client::TablesClient::new(channel)
}

async fn table_names(
    client: &mut pb::tables_client::TablesClient<tonic::transport::Channel>,
) -> Vec<String> {
    let mut names: Vec<String> = client
        .list(pb::ListTablesRequest {})
        .await
        .expect("list")
        .into_inner()
        .tables
        .into_iter()
        .map(|table| table.name)
        .collect();
    names.sort();
    names
}

async fn wait_for_tables(
    client: &mut pb::tables_client::TablesClient<tonic::transport::Channel>,
    expected: &[&str],
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let names = table_names(client).await;
        if names == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "tables {names:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_cluster_replicates_forwards_writes_and_recovers_through_snapshots() {
    let root = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let mut leader = Regatta::start_on(
        &root.path().join("leader"),
        free_address(),
        free_address(),
        &[
            "--replication.address",
            &replication_flag,
            "--raft.snapshot-entries",
            "100",
            "--raft.compaction-overhead",
            "10",
        ],
    );
    let mut leader_client = connect(&leader).await;
    for i in 0..50 {
        leader_client
            .put(format!("key/{i:03}"), format!("value {i}"), None)
            .await
            .expect("put on the leader");
    }

    let follower_dir = root.path().join("follower");
    let (follower_api, follower_raft) = (free_address(), free_address());
    let rest = free_address();
    let rest_flag = rest.to_string();
    let mut follower = Regatta::start_follower(
        &follower_dir,
        follower_api,
        follower_raft,
        replication,
        &["--rest.address", &rest_flag],
    );
    let mut follower_client = connect(&follower).await;
    // The node says it is ready (after a linearizable read of its etcd
    // table succeeds there).
    let deadline = Instant::now() + Duration::from_secs(20);
    while !follower.log().contains("ready: try `etcdctl") {
        assert!(
            Instant::now() < deadline,
            "the follower never logged that it is ready:\n{}",
            follower.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    converge(
        &mut leader_client,
        &mut follower_client,
        "the first 50 keys",
    )
    .await;

    // A lone write streams over at once; no poll interval in the way.
    let written = Instant::now();
    let put = leader_client.put("lone", "write", None).await.expect("put");
    let revision = put.header().expect("header").revision();
    loop {
        let found = follower_client.get("lone", None).await.expect("get");
        if let Some(kv) = found.kvs().first() {
            assert_eq!(kv.mod_revision(), revision, "the leader's revision");
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(5),
            "the lone write never arrived"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // The follower's status shows the table caught up with the leader.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = cluster_status(&follower.endpoint()).await;
        assert!(status.info.contains("follower"), "{}", status.info);
        let table = &status.tables["etcd"];
        if table.leader_index >= revision as u64 {
            assert_eq!(table.applied_leader_index, table.leader_index, "{table:?}");
            assert_eq!(table.replication_lag_ms, 0, "{table:?}");
            assert!(table.replication_error.is_empty(), "{table:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status never caught up: {table:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A write on the follower goes to the leader and is readable on the
    // follower as soon as it is acknowledged.
    for i in 0..20 {
        let key = format!("from-follower/{i}");
        let reply = follower_client
            .put(key.as_str(), "v", None)
            .await
            .expect("put on the follower");
        let got = follower_client.get(key.as_str(), None).await.expect("get");
        assert_eq!(
            got.kvs().len(),
            1,
            "read-your-writes on the follower for {key}"
        );
        assert_eq!(
            got.kvs()[0].mod_revision(),
            reply.header().expect("header").revision()
        );
    }
    let deleted = follower_client
        .delete("from-follower/0", None)
        .await
        .expect("delete on the follower");
    assert_eq!(deleted.deleted(), 1);
    assert!(follower_client
        .get("from-follower/0", None)
        .await
        .expect("get")
        .kvs()
        .is_empty());

    // Tables are managed on the leader cluster only.
    let mut follower_tables = tables(follower.endpoint()).await;
    let refused = follower_tables
        .create(pb::CreateTableRequest {
            name: "local".into(),
            config: None,
        })
        .await
        .expect_err("create on a follower");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(refused.message().contains("leader cluster"), "{refused:?}");
    let mut leader_tables = tables(leader.endpoint()).await;
    leader_tables
        .create(pb::CreateTableRequest {
            name: "second".into(),
            config: None,
        })
        .await
        .expect("create on the leader");
    wait_for_tables(&mut follower_tables, &["etcd", "second"]).await;

    // Stop the follower, let the leader compact far past it, restart it:
    // it takes the snapshot path and converges.
    follower.kill();
    for i in 0..400 {
        leader_client
            .put(format!("while-stopped/{i:03}"), "x".repeat(100), None)
            .await
            .expect("put on the leader");
    }
    leader_client.delete("key/000", None).await.expect("delete");
    let mut follower =
        Regatta::start_follower(&follower_dir, follower_api, follower_raft, replication, &[]);
    let mut follower_client = connect(&follower).await;
    converge(&mut leader_client, &mut follower_client, "after a restart").await;
    assert!(
        follower.log().contains("installed the leader's snapshot"),
        "the restarted follower did not take the snapshot path:\n{}",
        follower.log()
    );

    // Wipe the follower's data: it recovers everything.
    follower.kill();
    std::fs::remove_dir_all(&follower_dir).expect("wipe");
    let follower =
        Regatta::start_follower(&follower_dir, follower_api, follower_raft, replication, &[]);
    let mut follower_client = connect(&follower).await;
    converge(&mut leader_client, &mut follower_client, "after a wipe").await;

    // A table dropped on the leader disappears from the follower.
    let mut follower_tables = tables(follower.endpoint()).await;
    wait_for_tables(&mut follower_tables, &["etcd", "second"]).await;
    leader_tables
        .delete(pb::DeleteTableRequest {
            name: "second".into(),
        })
        .await
        .expect("delete on the leader");
    wait_for_tables(&mut follower_tables, &["etcd"]).await;

    // Cut off from the leader cluster, the follower cannot know what it
    // misses: its lag grows from the last time it heard, instead of
    // staying at the 0 of its last report.
    leader.kill();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = cluster_status(&follower.endpoint()).await;
        let table = &status.tables["etcd"];
        if table.replication_lag_ms >= 3000 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the lag did not grow without the leader cluster: {table:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `Cluster.Status` of the node at `endpoint`.
async fn cluster_status(endpoint: &str) -> pb::StatusResponse {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    pb::cluster_client::ClusterClient::new(channel)
        .status(pb::StatusRequest { config: false })
        .await
        .expect("status")
        .into_inner()
}

/// Waits until the follower node `client` holds exactly `expected`.
async fn wait_for_contents(client: &mut Client, expected: &[Row], what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let found = match client
            .get(vec![0u8], Some(GetOptions::new().with_from_key()))
            .await
        {
            Ok(_) => everything(client, false).await,
            Err(_) => Vec::new(),
        };
        if found == expected {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{what}: the follower holds {} keys, the leader {}",
            found.len(),
            expected.len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_follower_clusters_50ms_away_converge_and_a_dead_puller_is_replaced() {
    let root = tempfile::tempdir().expect("tempdir");
    let latency = Duration::from_millis(50);

    // The leader cluster: three processes, each serving replication.
    let mut leader_nodes = Vec::new();
    let leader_rafts: Vec<_> = (0..3).map(|_| free_address()).collect();
    let leader_members = members(&leader_rafts);
    let mut replication = Vec::new();
    for id in 1..=3u64 {
        let address = free_address();
        replication.push(address);
        let flag = address.to_string();
        leader_nodes.push(Regatta::start_member(
            &root.path().join(format!("leader{id}")),
            id,
            free_address(),
            leader_rafts[id as usize - 1],
            &leader_members,
            &["--replication.address", &flag],
        ));
    }
    let mut leader = connect(&leader_nodes[0]).await;

    // Each follower cluster reaches leader node 1 through a link with
    // 50 ms of latency each way, and one more leader node directly (node 2
    // for the single node, node 3 for the three), which it moves to when
    // node 1 is lost.
    let any = "127.0.0.1:0".parse().expect("address");
    let link_a = regatta_chaos::proxy::Proxy::start(any, replication[0])
        .await
        .expect("proxy");
    let link_b = regatta_chaos::proxy::Proxy::start(any, replication[0])
        .await
        .expect("proxy");
    link_a.set_latency(latency);
    link_b.set_latency(latency);
    let single = Regatta::start_follower(
        &root.path().join("single"),
        free_address(),
        free_address(),
        format!("{},{}", link_a.address(), replication[1]),
        &["--raft.cluster-id", "2"],
    );
    let follower_rafts: Vec<_> = (0..3).map(|_| free_address()).collect();
    let follower_members = members(&follower_rafts);
    let mut trio: Vec<Option<Regatta>> = (1..=3u64)
        .map(|id| {
            Some(Regatta::start_follower_member(
                &root.path().join(format!("follower{id}")),
                id,
                free_address(),
                follower_rafts[id as usize - 1],
                &follower_members,
                format!("{},{}", link_b.address(), replication[2]),
                &["--raft.cluster-id", "3"],
            ))
        })
        .collect();

    for i in 0..200 {
        leader
            .put(format!("k/{i:03}"), format!("{i}"), None)
            .await
            .expect("put on the leader");
    }
    let expected = everything(&mut leader, false).await;
    let mut single_client = connect(&single).await;
    wait_for_contents(&mut single_client, &expected, "the single-node follower").await;
    let mut trio_clients = Vec::new();
    for node in trio.iter().flatten() {
        let mut client = connect(node).await;
        wait_for_contents(&mut client, &expected, "a node of the three-node follower").await;
        trio_clients.push(client);
    }

    // Kill the node that pulls the etcd table (it leads the table's group).
    let status = trio_clients[0].status().await.expect("status");
    let puller = status.leader();
    assert!(
        (1..=3).contains(&puller),
        "the follower's etcd table has a leader"
    );
    trio[puller as usize - 1].as_mut().expect("running").kill();
    trio[puller as usize - 1] = None;
    let mut survivors: Vec<Client> = trio_clients
        .into_iter()
        .enumerate()
        .filter(|(index, _)| *index as u64 + 1 != puller)
        .map(|(_, client)| client)
        .collect();

    // Writes go on; another node takes over the pull.
    let killed = Instant::now();
    leader.put("after-kill", "1", None).await.expect("put");
    let expected = everything(&mut leader, false).await;
    wait_for_contents(&mut survivors[0], &expected, "after the puller died").await;
    let takeover = killed.elapsed();
    eprintln!("a new puller delivered the next write {takeover:?} after the old one died");
    if takeover >= Duration::from_secs(10) {
        let logs: Vec<String> = trio.iter().flatten().map(|node| node.log()).collect();
        panic!(
            "took {takeover:?} to replace the puller; the surviving nodes' logs:\n{}",
            logs.join("\n----\n")
        );
    }

    // A write on the follower, 50 ms from the leader, is readable there
    // at once.
    let reply = survivors[1]
        .put("written-on-follower", "yes", None)
        .await
        .expect("a forwarded put");
    let got = survivors[1]
        .get("written-on-follower", None)
        .await
        .expect("get");
    assert_eq!(
        got.kvs().first().map(|kv| kv.mod_revision()),
        Some(reply.header().expect("header").revision())
    );

    // Every follower node ends with the leader's exact contents.
    for i in 0..100 {
        leader
            .put(format!("late/{i:03}"), "z", None)
            .await
            .expect("put on the leader");
    }
    let expected = everything(&mut leader, false).await;
    wait_for_contents(
        &mut single_client,
        &expected,
        "the single-node follower, at the end",
    )
    .await;
    for client in &mut survivors {
        wait_for_contents(client, &expected, "a surviving follower node, at the end").await;
    }

    // Leader node 1, the first address both follower clusters were given,
    // dies: they move to their second address and keep replicating.
    leader_nodes[0].kill();
    let mut leader = connect(&leader_nodes[1]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for i in 0..20 {
        while let Err(error) = leader.put(format!("after-node-1/{i:02}"), "z", None).await {
            assert!(
                Instant::now() < deadline,
                "the leader cluster took no write after node 1 died: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let expected = everything(&mut leader, false).await;
    wait_for_contents(
        &mut single_client,
        &expected,
        "the single-node follower, after leader node 1 died",
    )
    .await;
    for client in &mut survivors {
        wait_for_contents(
            client,
            &expected,
            "a follower node, after leader node 1 died",
        )
        .await;
    }
}

/// The keys of `table` on `endpoint`, read from that node's own copy.
async fn table_keys(endpoint: &str, table: &str) -> Option<Vec<String>> {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .ok()?
        .connect()
        .await
        .ok()?;
    let mut kv = pb::kv_client::KvClient::new(channel);
    let response = kv
        .range(pb::RangeRequest {
            table: table.as_bytes().to_vec(),
            key: vec![0],
            range_end: vec![0],
            keys_only: true,
            ..pb::RangeRequest::default()
        })
        .await
        .ok()?
        .into_inner();
    Some(
        response
            .kvs
            .into_iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).to_string())
            .collect(),
    )
}

/// Puts `key` into `table`, retrying while a new table has no leader yet.
async fn put_into(endpoint: &str, table: &str, key: &str) {
    let channel = tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .expect("endpoint")
        .connect()
        .await
        .expect("connect");
    let mut kv = pb::kv_client::KvClient::new(channel);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let request = pb::PutRequest {
            table: table.as_bytes().to_vec(),
            key: key.as_bytes().to_vec(),
            value: b"v".to_vec(),
            ..pb::PutRequest::default()
        };
        match kv.put(request).await {
            Ok(_) => return,
            Err(status) => assert!(
                Instant::now() < deadline,
                "put {key} into {table}: {status}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_for_keys(endpoint: &str, table: &str, expected: &[String], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = table_keys(endpoint, table).await;
        if found.as_deref() == Some(expected) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the follower holds {found:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A table dropped and re-created on the leader under the same name
/// between two of the follower's catalogue checks is a new table: the
/// follower replaces its copy instead of continuing the new table's log
/// on top of the old table's data (the leader refuses that stream, since
/// the copy names the old table's id).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_recreated_between_two_catalogue_checks_is_replaced() {
    let root = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let leader = Regatta::start_on(
        &root.path().join("leader"),
        free_address(),
        free_address(),
        &["--replication.address", &replication_flag],
    );
    let _ready = connect(&leader).await;
    let mut leader_tables = tables(leader.endpoint()).await;
    let create = || pb::CreateTableRequest {
        name: "t".into(),
        ..pb::CreateTableRequest::default()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while leader_tables.create(create()).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the leader never created the table"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let old: Vec<String> = (0..5).map(|i| format!("old/{i}")).collect();
    for key in &old {
        put_into(&leader.endpoint(), "t", key).await;
    }
    // Checks 2 s apart: the drop and the re-creation fall between two.
    let follower = Regatta::start_follower_every(
        &root.path().join("follower"),
        free_address(),
        free_address(),
        replication,
        2_000,
        &[],
    );
    wait_for_keys(&follower.endpoint(), "t", &old, "the old table").await;

    leader_tables
        .delete(pb::DeleteTableRequest { name: "t".into() })
        .await
        .expect("drop");
    leader_tables.create(create()).await.expect("re-create");
    // More entries than the old table had, so that its log runs past the
    // index the follower's copy holds.
    let new: Vec<String> = (0..20).map(|i| format!("new/{i:02}")).collect();
    for key in &new {
        put_into(&leader.endpoint(), "t", key).await;
    }
    wait_for_keys(&follower.endpoint(), "t", &new, "the re-created table").await;
}

/// A leader cluster wiped and bootstrapped again on the same addresses is
/// a new cluster: its tables have new identities, so a follower replaces
/// its copies and ends holding exactly the new cluster's data, even once
/// the new cluster's log runs past the index the old copy held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_of_a_wiped_leader_cluster_replaces_its_copies() {
    let root = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let (api, raft) = (free_address(), free_address());
    let leader_dir = root.path().join("leader");
    let mut leader = Regatta::start_on(
        &leader_dir,
        api,
        raft,
        &["--replication.address", &replication_flag],
    );
    drop(connect(&leader).await);
    let old: Vec<String> = (0..10).map(|i| format!("old/{i}")).collect();
    for key in &old {
        put_into(&leader.endpoint(), "etcd", key).await;
    }
    // Checks 10 s apart: the next one comes after the new cluster is up,
    // so that the follower never sees a catalogue without the table (which
    // would make it drop its copy for that reason alone).
    let follower = Regatta::start_follower_every(
        &root.path().join("follower"),
        free_address(),
        free_address(),
        replication,
        10_000,
        &[],
    );
    wait_for_keys(&follower.endpoint(), "etcd", &old, "the old cluster").await;

    leader.kill();
    drop(leader);
    std::fs::remove_dir_all(&leader_dir).expect("wipe");
    let leader = Regatta::start_on(
        &leader_dir,
        api,
        raft,
        &["--replication.address", &replication_flag],
    );
    let _ready = connect(&leader).await;
    let new: Vec<String> = (0..30).map(|i| format!("new/{i:02}")).collect();
    for key in &new {
        put_into(&leader.endpoint(), "etcd", key).await;
    }
    wait_for_keys(&follower.endpoint(), "etcd", &new, "the new cluster").await;
}

/// Values over gRPC's customary 4 MiB, with `--kv.value-bytes-max` raised
/// on both clusters: one streams to the follower cluster (a log entry goes
/// alone in its stream message), and one written on the follower is
/// forwarded to the leader cluster. Before, the follower's replication
/// clients kept tonic's 4 MiB limit and replication stopped for good at
/// the first such entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_over_4_mib_replicate_and_forward() {
    const VALUE_BYTES: usize = 5 << 20;
    let root = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let value_max = (8usize << 20).to_string();
    let leader = Regatta::start_on(
        &root.path().join("leader"),
        free_address(),
        free_address(),
        &[
            "--replication.address",
            &replication_flag,
            "--kv.value-bytes-max",
            &value_max,
        ],
    );
    let mut leader_client = connect(&leader).await;
    let follower = Regatta::start_follower(
        &root.path().join("follower"),
        free_address(),
        free_address(),
        replication,
        &["--kv.value-bytes-max", &value_max],
    );
    let mut follower_client = connect(&follower).await;
    let big = vec![b'v'; VALUE_BYTES];
    let put = leader_client
        .put("big/leader", big.clone(), None)
        .await
        .expect("a 5 MiB put on the leader");
    let leader_revision = put.header().expect("header").revision();
    leader_client
        .put("small/after", "v", None)
        .await
        .expect("a small put after it");
    // Keys only: the answer stays small for the client's own limit; the
    // revisions prove the entry applied there.
    let keys_only = || Some(GetOptions::new().with_prefix().with_keys_only());
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let found = follower_client
            .get("", Some(GetOptions::new().with_from_key().with_keys_only()))
            .await
            .expect("get on the follower");
        let keys: Vec<&str> = found
            .kvs()
            .iter()
            .map(|kv| kv.key_str().unwrap_or(""))
            .collect();
        if keys == ["big/leader", "small/after"] {
            assert_eq!(found.kvs()[0].mod_revision(), leader_revision);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower cluster never replicated past the 5 MiB entry: it holds {keys:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Forwarded: the write is applied on the leader cluster, and the
    // follower answers once its copy holds it.
    follower_client
        .put("big/follower", big, None)
        .await
        .expect("a 5 MiB put forwarded from the follower");
    let found = leader_client
        .get("big/", keys_only())
        .await
        .expect("get on the leader");
    let keys: Vec<&str> = found
        .kvs()
        .iter()
        .map(|kv| kv.key_str().unwrap_or(""))
        .collect();
    assert_eq!(keys, ["big/follower", "big/leader"]);
}

/// A leader node that goes silent without closing its connections (power
/// loss, a dropped route): the follower notices within seconds, through
/// the log stream's missing heartbeats and HTTP/2 pings, and moves to the
/// next leader address, instead of waiting for TCP to give up (about
/// 15 minutes). Here both addresses reach the same leader node, one of
/// them through a link that starts holding every byte for an hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_leader_link_is_left_for_the_next_address() {
    let root = tempfile::tempdir().expect("tempdir");
    let replication = free_address();
    let replication_flag = replication.to_string();
    let leader = Regatta::start_on(
        &root.path().join("leader"),
        free_address(),
        free_address(),
        &["--replication.address", &replication_flag],
    );
    let mut leader_client = connect(&leader).await;
    let any = "127.0.0.1:0".parse().expect("address");
    let silent = regatta_chaos::proxy::Proxy::start(any, replication)
        .await
        .expect("proxy");
    let direct = regatta_chaos::proxy::Proxy::start(any, replication)
        .await
        .expect("proxy");
    let follower = Regatta::start_follower(
        &root.path().join("follower"),
        free_address(),
        free_address(),
        format!("{},{}", silent.address(), direct.address()),
        &[],
    );
    let mut follower_client = connect(&follower).await;
    leader_client.put("before", "v", None).await.expect("put");
    converge(
        &mut leader_client,
        &mut follower_client,
        "before the silence",
    )
    .await;
    assert!(
        direct.forwarded_bytes() < silent.forwarded_bytes(),
        "the follower started on the first address"
    );

    silent.slow(Duration::from_secs(3600));
    let went_silent = Instant::now();
    leader_client.put("after", "v", None).await.expect("put");
    let deadline = went_silent + Duration::from_secs(60);
    loop {
        let found = follower_client
            .get("after", Some(GetOptions::new().with_serializable()))
            .await
            .expect("get");
        if !found.kvs().is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the follower kept waiting on the silent link"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "replicated through the next address {:?} after the link went silent",
        went_silent.elapsed()
    );
}
