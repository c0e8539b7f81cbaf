//! Three `regatta` processes as one leader cluster on 127.0.0.1: writes
//! through any node (followers forward), linearizable reads on every node,
//! tables created on one node served by all, and SIGKILL of the etcd
//! table's leader with writes going on: every acknowledged write survives
//! and the restarted node catches up. That cluster's nodes know each
//! other by host name (`localhost:<port>`), resolved at every dial.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{connect, free_address, Regatta};
use etcd_client::GetOptions;

fn start_node(root: &Path, id: u64, api: SocketAddr, raft: SocketAddr, members: &str) -> Regatta {
    start_node_with(root, id, api, raft, members, &[])
}

/// A member whose `--raft.address` and `--raft.initial-members` name the
/// nodes `localhost:<port>`.
fn start_named_node(
    root: &Path,
    id: u64,
    api: SocketAddr,
    raft: SocketAddr,
    members: &str,
) -> Regatta {
    let dir = root.join(format!("node{id}"));
    Regatta::start_member_named(&dir, id, api, raft, members, &[])
}

fn start_node_with(
    root: &Path,
    id: u64,
    api: SocketAddr,
    raft: SocketAddr,
    members: &str,
    extra: &[&str],
) -> Regatta {
    let dir = root.join(format!("node{id}"));
    Regatta::start_member(&dir, id, api, raft, members, extra)
}

async fn get(client: &mut etcd_client::Client, key: &str) -> Option<Vec<u8>> {
    let response = client.get(key, None).await.expect("get");
    response.kvs().first().map(|kv| kv.value().to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_processes_serve_one_cluster_through_a_leader_crash() {
    let root = tempfile::tempdir().expect("tempdir");
    let addresses: Vec<(SocketAddr, SocketAddr)> =
        (0..3).map(|_| (free_address(), free_address())).collect();
    let rafts: Vec<SocketAddr> = addresses.iter().map(|(_, raft)| *raft).collect();
    let members = common::members_named(&rafts);
    let mut nodes: BTreeMap<u64, Regatta> = BTreeMap::new();
    for (i, (api, raft)) in addresses.iter().enumerate() {
        let id = i as u64 + 1;
        nodes.insert(id, start_named_node(root.path(), id, *api, *raft, &members));
    }
    let mut clients = BTreeMap::new();
    for (id, node) in &nodes {
        clients.insert(*id, connect(node).await);
    }
    // MemberList gives the peer addresses by the names the nodes use.
    let listed = clients
        .get_mut(&1)
        .expect("client")
        .member_list()
        .await
        .expect("member list");
    let mut peer_urls: Vec<(u64, Vec<String>)> = listed
        .members()
        .iter()
        .map(|member| (member.id(), member.peer_urls().to_vec()))
        .collect();
    peer_urls.sort();
    let expected: Vec<(u64, Vec<String>)> = rafts
        .iter()
        .enumerate()
        .map(|(i, raft)| {
            (
                i as u64 + 1,
                vec![format!("http://{}", common::named(*raft))],
            )
        })
        .collect();
    assert_eq!(peer_urls, expected);

    // Writes through every node; reads on every node.
    let mut acknowledged = BTreeMap::new();
    for (id, client) in clients.iter_mut() {
        let key = format!("from/{id}");
        client.put(key.as_str(), "v", None).await.expect("put");
        acknowledged.insert(key, "v".to_string());
    }
    for client in clients.values_mut() {
        for key in acknowledged.keys() {
            assert_eq!(get(client, key).await.as_deref(), Some(b"v".as_slice()));
        }
    }

    // Maintenance.MoveLeader, asked of any member, hands the etcd table's
    // leadership to each node in turn; every node then reports it.
    for target in [2u64, 3, 1] {
        let asked = clients.get_mut(&(target % 3 + 1)).expect("client");
        asked.move_leader(target).await.expect("move leader");
        for (id, client) in clients.iter_mut() {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let leader = client.status().await.expect("status").leader();
                if leader == target {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "node {id} still reports leader {leader}, not {target}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        let key = format!("after-move/{target}");
        clients
            .get_mut(&1)
            .expect("client")
            .put(key.as_str(), "m", None)
            .await
            .expect("put after a move");
        acknowledged.insert(key, "m".to_string());
    }
    match clients.get_mut(&1).expect("client").move_leader(99).await {
        Err(etcd_client::Error::GRpcStatus(status)) => {
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
            assert!(
                status.message().contains("not a voting member"),
                "{status:?}"
            );
        }
        other => panic!("a move to a non-member must fail: {other:?}"),
    }

    // Find the etcd table's leader and kill it while writes go on.
    let leader = clients
        .get_mut(&1)
        .expect("client")
        .status()
        .await
        .expect("status")
        .leader();
    assert!((1..=3).contains(&leader), "leader {leader}");
    let survivor = (1..=3).find(|id| *id != leader).expect("survivor");
    let mut writer = clients[&survivor].clone();
    let writes = tokio::spawn(async move {
        let mut done = Vec::new();
        let started = Instant::now();
        let mut sequence = 0;
        while started.elapsed() < Duration::from_secs(4) {
            let key = format!("during/{sequence}");
            if writer.put(key.as_str(), "w", None).await.is_ok() {
                done.push((Instant::now(), key));
            }
            sequence += 1;
        }
        done
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    nodes.get_mut(&leader).expect("leader").kill();
    let killed_at = Instant::now();
    let during = writes.await.expect("writer");
    // The cluster failed over: writes were acknowledged after the kill,
    // by a new leader.
    let after_kill = during.iter().filter(|(at, _)| *at > killed_at).count();
    assert!(
        after_kill > 0,
        "no write was acknowledged after the leader was killed ({} before)",
        during.len()
    );
    acknowledged.extend(during.into_iter().map(|(_, key)| (key, "w".to_string())));
    assert!(acknowledged.len() > 20, "{} writes", acknowledged.len());

    // The killed node restarts on its directory and catches up.
    let (api, raft) = addresses[leader as usize - 1];
    nodes.insert(
        leader,
        start_named_node(root.path(), leader, api, raft, &members),
    );
    let mut restarted = connect(&nodes[&leader]).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    for (key, value) in &acknowledged {
        loop {
            let found = restarted
                .get(key.as_str(), Some(GetOptions::new().with_serializable()))
                .await
                .ok()
                .and_then(|r| r.kvs().first().map(|kv| kv.value().to_vec()));
            if found.as_deref() == Some(value.as_bytes()) {
                break;
            }
            assert!(Instant::now() < deadline, "node {leader} never got {key}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let mut survivor_client = clients[&survivor].clone();
    let everything = GetOptions::new().with_from_key().with_count_only();
    let total = survivor_client
        .get("\0", Some(everything))
        .await
        .expect("count")
        .count();
    // Writes whose answer was lost with the leader may have applied too.
    assert!(total >= acknowledged.len() as i64, "{total} keys");
}

/// With two of three nodes killed, the survivor cannot serve writes or
/// linearizable reads: each fails within about the request timeout with
/// DEADLINE_EXCEEDED or UNAVAILABLE, never hangs and never succeeds; a
/// serializable read still answers from local state.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_quorum_fails_requests_in_time() {
    let root = tempfile::tempdir().expect("tempdir");
    let addresses: Vec<(SocketAddr, SocketAddr)> =
        (0..3).map(|_| (free_address(), free_address())).collect();
    let rafts: Vec<SocketAddr> = addresses.iter().map(|(_, raft)| *raft).collect();
    let members = common::members(&rafts);
    let mut nodes = BTreeMap::new();
    for (i, (api, raft)) in addresses.iter().enumerate() {
        let id = i as u64 + 1;
        let extra = ["--api.request-timeout-ms", "1000"];
        nodes.insert(
            id,
            start_node_with(root.path(), id, *api, *raft, &members, &extra),
        );
    }
    let mut client = connect(&nodes[&1]).await;
    client.put("k", "v", None).await.expect("put");
    // Wait until node 1 has applied it, then cut it off.
    let deadline = Instant::now() + Duration::from_secs(10);
    while get(&mut client, "k").await.is_none() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for id in [2, 3] {
        nodes.get_mut(&id).expect("node").kill();
    }
    for attempt in 0..3 {
        let started = Instant::now();
        let error = client
            .put("k", "w", None)
            .await
            .expect_err("no quorum, no write");
        let elapsed = started.elapsed();
        match error {
            etcd_client::Error::GRpcStatus(status) => assert!(
                matches!(
                    status.code(),
                    tonic::Code::DeadlineExceeded | tonic::Code::Unavailable
                ),
                "attempt {attempt}: {status:?}"
            ),
            other => panic!("attempt {attempt}: {other:?}"),
        }
        assert!(
            elapsed < Duration::from_secs(4),
            "attempt {attempt} took {elapsed:?}"
        );
        let started = Instant::now();
        let read = client.get("k", None).await;
        assert!(
            read.is_err(),
            "a linearizable read without quorum: {read:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }
    let local = client
        .get("k", Some(GetOptions::new().with_serializable()))
        .await
        .expect("serializable read");
    assert_eq!(local.kvs()[0].value(), b"v");
}

/// A node that its peers dial at one address (here a forwarding proxy, as
/// a NAT would be) and that listens at another (`--raft.listen-address`);
/// and a client URL advertised apart from the address the API listens on
/// (`--api.advertise-address`), which MemberList gives to clients.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_dial_the_advertised_raft_address_and_clients_get_the_advertised_url() {
    let root = tempfile::tempdir().expect("tempdir");
    let apis: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let listens: Vec<SocketAddr> = (0..3).map(|_| free_address()).collect();
    let any = "127.0.0.1:0".parse().expect("address");
    let proxy = regatta_chaos::proxy::Proxy::start(any, listens[2])
        .await
        .expect("proxy");
    // Node 3 is known by the proxy's address; the proxy holds that port,
    // so node 3 starts only if it listens where `--raft.listen-address`
    // says.
    let rafts = [listens[0], listens[1], proxy.address()];
    let members = common::members(&rafts);
    let advertised = format!("http://localhost:{}", apis[1].port());
    let listen = listens[2].to_string();
    let mut nodes = BTreeMap::new();
    nodes.insert(1, start_node(root.path(), 1, apis[0], rafts[0], &members));
    nodes.insert(
        2,
        start_node_with(
            root.path(),
            2,
            apis[1],
            rafts[1],
            &members,
            &["--api.advertise-address", &advertised],
        ),
    );
    nodes.insert(
        3,
        start_node_with(
            root.path(),
            3,
            apis[2],
            rafts[2],
            &members,
            &["--raft.listen-address", &listen],
        ),
    );
    let mut first = connect(&nodes[&1]).await;
    first.put("k", "v", None).await.expect("put through node 1");
    let mut third = connect(&nodes[&3]).await;
    assert_eq!(
        get(&mut third, "k").await.as_deref(),
        Some(&b"v"[..]),
        "a linearizable read on node 3"
    );
    assert!(
        proxy.forwarded_bytes() > 0,
        "nodes 1 and 2 reached node 3 through its advertised address"
    );
    // Each node records its own addresses in the background (retried
    // every 2 s), and MemberList reads the records locally: wait for all.
    let deadline = Instant::now() + Duration::from_secs(20);
    let urls = loop {
        let listed = first.member_list().await.expect("member list");
        let urls: BTreeMap<u64, (Vec<String>, Vec<String>)> = listed
            .members()
            .iter()
            .map(|member| {
                (
                    member.id(),
                    (member.peer_urls().to_vec(), member.client_urls().to_vec()),
                )
            })
            .collect();
        let recorded = urls.len() == 3 && urls.values().all(|(_, client)| !client.is_empty());
        if recorded || Instant::now() >= deadline {
            break urls;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(urls.len(), 3, "{urls:?}");
    assert_eq!(urls[&1].1, vec![format!("http://{}", apis[0])], "{urls:?}");
    assert_eq!(urls[&2].1, vec![advertised.clone()], "{urls:?}");
    assert!(
        urls[&3]
            .0
            .iter()
            .any(|url| url.contains(&proxy.address().to_string())),
        "node 3's peer URL is the address peers dial: {urls:?}"
    );
}
