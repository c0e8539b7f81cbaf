//! The follower side of replication against a fake leader cluster served
//! from the test: what a puller does when the leader's log stream ends
//! cleanly without sending anything new.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regatta_replication::proto;
use regatta_replication::{start_follower, FollowerConfig};
use regatta_server::ClusterRole;
use regatta_server::{Node, NodeConfig};
use tonic::{Request, Response, Status};

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// A leader cluster with one table, whose log streams all end at once,
/// cleanly, with nothing in them (as a stopping node's may).
#[derive(Clone, Default)]
struct EmptyStreams {
    replicates: Arc<AtomicUsize>,
}

#[tonic::async_trait]
impl proto::metadata_server::Metadata for EmptyStreams {
    async fn get(
        &self,
        _request: Request<proto::MetadataRequest>,
    ) -> Result<Response<proto::MetadataResponse>, Status> {
        Ok(Response::new(proto::MetadataResponse {
            tables: vec![proto::Table {
                name: "etcd".into(),
                r#type: proto::table::Type::Replicated as i32,
                id: 7,
            }],
        }))
    }
}

#[tonic::async_trait]
impl proto::log_server::Log for EmptyStreams {
    type ReplicateStream =
        tokio_stream::Iter<std::vec::IntoIter<Result<proto::ReplicateResponse, Status>>>;

    async fn replicate(
        &self,
        _request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        self.replicates.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(tokio_stream::iter(Vec::new())))
    }
}

/// A stream that ends cleanly with nothing new is reopened after a pause
/// that doubles, as after a failure. Before, the puller reopened it at
/// once, in a loop that spun a core and flooded the leader node with
/// requests (thousands in the time this test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_stream_that_ends_with_nothing_new_is_reopened_after_a_pause() {
    let fake = EmptyStreams::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let leader_address = listener.local_addr().expect("address");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(proto::metadata_server::MetadataServer::new(fake.clone()))
            .add_service(proto::log_server::LogServer::new(fake.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = NodeConfig::single(dir.path(), free_address());
    config.role = ClusterRole::Follower;
    let node = Node::start(config).await.expect("node");
    let follower = start_follower(
        Arc::clone(&node),
        FollowerConfig::new(format!("http://{leader_address}")),
    )
    .expect("follower");

    // The puller starts once the copy of the table exists here.
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.replicates.load(Ordering::SeqCst) == 0 {
        assert!(
            Instant::now() < deadline,
            "the follower never asked for the log"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reopened = fake.replicates.load(Ordering::SeqCst) - 1;
    let waited = first.elapsed();
    follower.stop().await;
    // Pauses of 100, 200, 400, 800 and 1,600 ms fit 3 s: five reopenings
    // (a few more for the scheduler's slack, none spinning).
    assert!(
        (2..=8).contains(&reopened),
        "the stream was reopened {reopened} times in {waited:?}; expected a few, with pauses"
    );
}
