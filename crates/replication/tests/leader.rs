//! The leader side of replication against a real single-node leader
//! cluster (a `regatta_server::Node` on 127.0.0.1): table metadata, the
//! log stream from the start with every index in order, a new write pushed
//! to an open stream, `USE_SNAPSHOT` once the log is compacted,
//! `LEADER_BEHIND`, the errors for bad requests, and forwarded writes
//! checked as a client's would be.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use regatta_kv::command::{decode, Command, PutRequest};
use regatta_replication::proto::{self, log_client::LogClient, metadata_client::MetadataClient};
use regatta_replication::LeaderService;
use regatta_server::{Node, NodeConfig};
use tokio_stream::StreamExt;

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

struct Leader {
    node: Arc<Node>,
    address: SocketAddr,
    _dir: tempfile::TempDir,
}

async fn start_leader(snapshot_every_entries: u64) -> Leader {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::single(dir.path(), free_address());
    config.snapshot_every_entries = snapshot_every_entries;
    config.compaction_overhead_entries = 2;
    let node = Node::start(config).await.expect("node");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.table_group("etcd").is_err() {
        assert!(Instant::now() < deadline, "the etcd table never appeared");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    let service = LeaderService::new(Arc::clone(&node));
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::metadata_server::MetadataServer::new(service.clone()))
            .add_service(proto::log_server::LogServer::new(service.clone()))
            .add_service(proto::snapshot_server::SnapshotServer::new(service.clone()))
            .add_service(proto::forward_server::ForwardServer::new(service))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Leader {
        node,
        address,
        _dir: dir,
    }
}

async fn put(node: &Node, key: &str) {
    let group = node.table_group("etcd").expect("table");
    let command = Command::Put(PutRequest {
        key: key.as_bytes().to_vec(),
        value: b"v".to_vec(),
        prev_kv: false,
    });
    node.write(group, &command).await.expect("put");
}

/// Opens the log stream of `table` from `leader_index`.
async fn replicate(
    log: &mut LogClient<tonic::transport::Channel>,
    table: &str,
    leader_index: u64,
) -> tonic::Streaming<proto::ReplicateResponse> {
    log.replicate(request(table, leader_index))
        .await
        .expect("replicate")
        .into_inner()
}

fn channel(address: SocketAddr) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .expect("endpoint")
        .connect_lazy()
}

fn request(table: &str, leader_index: u64) -> proto::ReplicateRequest {
    proto::ReplicateRequest {
        table: table.as_bytes().to_vec(),
        leader_index,
        table_id: 0,
    }
}

fn put_key(command: &proto::ReplicateCommand) -> Option<String> {
    match decode::<Command>(&command.command) {
        Ok(Command::Put(put)) => Some(String::from_utf8_lossy(&put.key).into_owned()),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_log_streams_in_order_and_new_writes_are_pushed() {
    let leader = start_leader(10_000).await;
    for i in 0..20 {
        put(&leader.node, &format!("k{i}")).await;
    }
    let mut metadata = MetadataClient::new(channel(leader.address));
    let tables = metadata
        .get(proto::MetadataRequest {})
        .await
        .expect("metadata")
        .into_inner()
        .tables;
    assert!(
        tables.iter().any(|table| table.name == "etcd"),
        "{tables:?}"
    );

    let mut log = LogClient::new(channel(leader.address));
    let mut stream = replicate(&mut log, "etcd", 0).await;
    let mut next = 1u64;
    let mut keys = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while keys.len() < 20 {
        assert!(Instant::now() < deadline, "only {keys:?} arrived");
        let response = stream.next().await.expect("open").expect("response");
        let Some(proto::replicate_response::Response::CommandsResponse(commands)) =
            response.response
        else {
            panic!("unexpected {response:?}");
        };
        for command in &commands.commands {
            assert_eq!(command.leader_index, next, "indices in order, no gap");
            next += 1;
            keys.extend(put_key(command));
        }
        assert!(response.leader_index >= next - 1);
    }
    let expected: Vec<String> = (0..20).map(|i| format!("k{i}")).collect();
    assert_eq!(keys, expected);

    // A write after the stream caught up is pushed on the open stream.
    put(&leader.node, "late").await;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert!(Instant::now() < deadline, "the new write never arrived");
        let response = stream.next().await.expect("open").expect("response");
        let Some(proto::replicate_response::Response::CommandsResponse(commands)) =
            response.response
        else {
            panic!("unexpected {response:?}");
        };
        let mut found = false;
        for command in &commands.commands {
            assert_eq!(command.leader_index, next, "indices in order, no gap");
            next += 1;
            found |= put_key(command).as_deref() == Some("late");
        }
        if found {
            break;
        }
    }
    leader.node.stop().await;
}

/// A leader node that shuts down ends its open streams UNAVAILABLE,
/// naming the shutdown, so that a follower moves to another node at once:
/// NOT_FOUND (the table was dropped, which every node would say) kept it
/// on this address until a reconnect failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_ends_unavailable_when_the_leader_node_stops() {
    let leader = start_leader(0).await;
    put(&leader.node, "a").await;
    let mut log = LogClient::new(channel(leader.address));
    let mut stream = replicate(&mut log, "etcd", 0).await;
    stream
        .next()
        .await
        .expect("open")
        .expect("a first response");
    leader.node.stop().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .expect("the stream ends in time");
        match next {
            Some(Ok(_)) => continue,
            Some(Err(status)) => break status,
            None => panic!("the stream ended without a status"),
        }
    };
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(
        status.message().contains(regatta_multiraft::NODE_STOPPING),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_compacted_log_asks_for_a_snapshot_and_bad_requests_fail_clearly() {
    let leader = start_leader(10).await;
    for i in 0..40 {
        put(&leader.node, &format!("k{i}")).await;
    }
    let mut log = LogClient::new(channel(leader.address));
    // Compaction runs in the background after the applies.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut stream = replicate(&mut log, "etcd", 0).await;
        let response = stream.next().await.expect("open").expect("response");
        if let Some(proto::replicate_response::Response::ErrorResponse(error)) = response.response {
            assert_eq!(error.error, proto::ReplicateError::UseSnapshot as i32);
            break;
        }
        assert!(Instant::now() < deadline, "the log was never compacted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut stream = replicate(&mut log, "etcd", 1_000_000).await;
    let response = stream.next().await.expect("open").expect("response");
    match response.response {
        Some(proto::replicate_response::Response::ErrorResponse(error)) => {
            assert_eq!(error.error, proto::ReplicateError::LeaderBehind as i32);
        }
        other => panic!("expected LEADER_BEHIND, got {other:?}"),
    }

    let status = log
        .replicate(request("nope", 0))
        .await
        .expect_err("unknown table");
    assert_eq!(status.code(), tonic::Code::NotFound, "{status:?}");
    let status = log.replicate(request("", 0)).await.expect_err("empty name");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");

    // A copy of another table under this name (its id differs from the
    // table's own) is refused, by the log and by the snapshot; its own id
    // is served.
    let group = leader.node.table_group("etcd").expect("etcd table");
    let id = leader.node.table_identity(group).await.expect("identity");
    let mut other = request("etcd", 0);
    other.table_id = id.wrapping_add(1000);
    let status = log.replicate(other).await.expect_err("another table's id");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("re-created"), "{status:?}");
    let mut snapshots = proto::snapshot_client::SnapshotClient::new(channel(leader.address));
    let status = snapshots
        .stream(proto::SnapshotRequest {
            table: b"etcd".to_vec(),
            table_id: id.wrapping_add(1000),
        })
        .await
        .expect_err("another table's id");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    let mut own = request("etcd", 0);
    own.table_id = id;
    log.replicate(own).await.expect("the table's own id");
    leader.node.stop().await;
}

/// A follower cluster's forwarded write gets the checks a client's write
/// gets on the leader cluster, with the same statuses; none reaches the
/// log, where a bad key would stop every replica's table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_writes_are_checked_as_client_writes_are() {
    use regatta_kv::command::{encode, RequestOp, Response, ResponseOp, TxnRequest};
    let leader = start_leader(10_000).await;
    let mut forward = proto::forward_client::ForwardClient::new(channel(leader.address));
    let put_command = |key: Vec<u8>, value: Vec<u8>| {
        Command::Put(PutRequest {
            key,
            value,
            prev_kv: false,
        })
    };
    let send = |command: Vec<u8>| proto::ForwardRequest {
        table: b"etcd".to_vec(),
        command,
        table_id: 0,
    };
    let cases: Vec<(&str, Vec<u8>, tonic::Code, &str)> = vec![
        (
            "an empty key",
            encode(&put_command(Vec::new(), b"v".to_vec())),
            tonic::Code::InvalidArgument,
            "key must not be empty",
        ),
        (
            "a key over --kv.key-bytes-max",
            encode(&put_command(vec![b'k'; 70_000], b"v".to_vec())),
            tonic::Code::ResourceExhausted,
            "--kv.key-bytes-max",
        ),
        (
            "a value over --kv.value-bytes-max",
            encode(&put_command(b"k".to_vec(), vec![b'v'; 3 << 20])),
            tonic::Code::ResourceExhausted,
            "--kv.value-bytes-max",
        ),
        (
            "an empty key inside a transaction",
            encode(&Command::Txn(TxnRequest {
                compare: Vec::new(),
                success: vec![RequestOp::Put(PutRequest {
                    key: Vec::new(),
                    value: Vec::new(),
                    prev_kv: false,
                })],
                failure: Vec::new(),
            })),
            tonic::Code::InvalidArgument,
            "key must not be empty",
        ),
        (
            "a restore step",
            encode(&Command::RestoreBegin { restore_id: 7 }),
            tonic::Code::InvalidArgument,
            "only Put, DeleteRange and Txn",
        ),
        (
            "transactions nested 100,000 deep",
            {
                // Written byte by byte: Command::Txn, then per level no
                // compares and one success operation, a transaction.
                let levels = 100_000;
                let mut bytes = vec![regatta_kv::command::FORMAT_VERSION, 2];
                for _ in 0..levels {
                    bytes.extend_from_slice(&[0, 1, 3]);
                }
                bytes.extend_from_slice(&[0, 0, 0]);
                bytes.extend(std::iter::repeat_n(0, levels));
                bytes
            },
            tonic::Code::InvalidArgument,
            "nest more than",
        ),
    ];
    for (what, command, code, message) in cases {
        let status = forward.write(send(command)).await.expect_err(what);
        assert_eq!(status.code(), code, "{what}: {status:?}");
        assert!(
            status.message().contains(message),
            "{what}: {:?} does not name {message:?}",
            status.message()
        );
    }
    // A copy of another table of that name (re-created on the leader since
    // the copy was made): refused, since the follower could not show the
    // write from that copy.
    let group = leader.node.table_group("etcd").expect("table");
    let identity = leader.node.table_identity(group).await.expect("identity");
    let status = forward
        .write(proto::ForwardRequest {
            table_id: identity ^ 1,
            ..send(encode(&put_command(b"stale".to_vec(), b"v".to_vec())))
        })
        .await
        .expect_err("a copy of another table");
    assert_eq!(status.code(), tonic::Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("re-created"), "{status:?}");
    forward
        .write(proto::ForwardRequest {
            table_id: identity,
            ..send(encode(&put_command(b"good".to_vec(), b"v0".to_vec())))
        })
        .await
        .expect("a copy of this table");
    // A good one goes through, and the table took none of the above.
    let response = forward
        .write(send(encode(&put_command(b"good".to_vec(), b"v".to_vec()))))
        .await
        .expect("a valid forwarded put")
        .into_inner();
    let response = decode::<Response>(&response.response).expect("response");
    assert!(
        matches!(response.result, Ok(ResponseOp::Put(_))),
        "{response:?}"
    );
    let every_key = regatta_kv::command::Query::Range(regatta_kv::command::RangeRequest {
        range: regatta_kv::command::KeyRange {
            key: vec![0],
            range_end: vec![0],
        },
        keys_only: true,
        ..Default::default()
    });
    let response = leader
        .node
        .read(group, &every_key, true)
        .await
        .expect("read");
    let Ok(ResponseOp::Range(result)) = response.result else {
        panic!("a range result, not {response:?}");
    };
    let keys: Vec<Vec<u8>> = result.kvs.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, vec![b"good".to_vec()]);
    leader.node.stop().await;
}
