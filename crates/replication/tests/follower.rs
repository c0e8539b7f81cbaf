//! The follower side of replication against fake leader nodes served
//! from the test: what a puller does when a leader node's log streams end
//! cleanly with nothing in them, and how much of a fast stream it holds.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use regatta_kv::command::{encode, Command, PutRequest};
use regatta_replication::proto;
use regatta_replication::{start_follower, FollowerConfig};
use regatta_server::ClusterRole;
use regatta_server::{reset_request_key, Node, NodeConfig, META_GROUP};
use tonic::{Request, Response, Status};

fn free_address() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// A leader node of a cluster with one table. With `heartbeats` off, its
/// log streams all end at once, cleanly, with nothing in them (as a
/// stopping node's may); with it on, they stay open and send an empty
/// batch every 100 ms, as a healthy idle node does.
#[derive(Clone, Default)]
struct FakeLeader {
    replicates: Arc<AtomicUsize>,
    heartbeats: bool,
    /// When set, the stream sends commands of this many value bytes, one
    /// per response, from the requested leader index on, as fast as the
    /// follower takes them; `sent` is the highest leader index sent (a
    /// reopened stream starts again from the follower's index).
    flood_value_bytes: Option<usize>,
    sent: Arc<AtomicUsize>,
    /// When set, a stream from index 0 sends ten puts (leader indexes 1
    /// to 10) and then sends the follower to a snapshot; a stream from any
    /// other index goes to the snapshot at once. The snapshot is of an
    /// empty table at this index (a serving node behind the follower).
    stale_snapshot_at: Option<u64>,
    snapshots: Arc<AtomicUsize>,
    /// When set, a snapshot request waits for a permit before it is
    /// answered (counted in `snapshots` before it waits).
    snapshot_gate: Option<Arc<tokio::sync::Semaphore>>,
    /// With `stale_snapshot_at`: a stream from any index below 10 (not
    /// only 0) first sends the puts up to leader index 10, so that a
    /// table taken back to the stale snapshot moves on past it again.
    refill: bool,
}

impl FakeLeader {
    fn replicates(&self) -> usize {
        self.replicates.load(Ordering::SeqCst)
    }

    /// Serves it on 127.0.0.1; returns its URL.
    async fn serve(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(proto::metadata_server::MetadataServer::new(self.clone()))
                .add_service(proto::log_server::LogServer::new(self.clone()))
                .add_service(proto::snapshot_server::SnapshotServer::new(self.clone()))
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        format!("http://{address}")
    }
}

#[tonic::async_trait]
impl proto::metadata_server::Metadata for FakeLeader {
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
impl proto::log_server::Log for FakeLeader {
    type ReplicateStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::ReplicateResponse, Status>>;

    async fn replicate(
        &self,
        request: Request<proto::ReplicateRequest>,
    ) -> Result<Response<Self::ReplicateStream>, Status> {
        self.replicates.fetch_add(1, Ordering::SeqCst);
        let (sender, receiver) = tokio::sync::mpsc::channel(4);
        if self.stale_snapshot_at.is_some() {
            let from = request.get_ref().leader_index;
            let refill = from == 0 || (self.refill && from < 10);
            tokio::spawn(async move {
                if refill {
                    let commands = (from + 1..=10u64)
                        .map(|index| put_command(index, 1))
                        .collect();
                    let response = commands_response(commands, 10);
                    if sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                }
                let use_snapshot = proto::ReplicateResponse {
                    response: Some(proto::replicate_response::Response::ErrorResponse(
                        proto::ReplicateErrResponse {
                            error: proto::ReplicateError::UseSnapshot as i32,
                        },
                    )),
                    leader_index: 10,
                };
                let _ = sender.send(Ok(use_snapshot)).await;
            });
        } else if let Some(value_bytes) = self.flood_value_bytes {
            let sent = Arc::clone(&self.sent);
            let mut next = request.get_ref().leader_index + 1;
            tokio::spawn(async move {
                loop {
                    let command = put_command(next, value_bytes);
                    let response = commands_response(vec![command], next);
                    if sender.send(Ok(response)).await.is_err() {
                        return;
                    }
                    sent.fetch_max(next as usize, Ordering::SeqCst);
                    next += 1;
                }
            });
        } else if self.heartbeats {
            tokio::spawn(async move {
                loop {
                    let heartbeat = commands_response(Vec::new(), 0);
                    if sender.send(Ok(heartbeat)).await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            });
        }
        // Without heartbeats the sender is dropped here: the stream ends.
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

#[tonic::async_trait]
impl proto::snapshot_server::Snapshot for FakeLeader {
    type StreamStream =
        tokio_stream::wrappers::ReceiverStream<Result<proto::SnapshotChunk, Status>>;

    async fn stream(
        &self,
        _request: Request<proto::SnapshotRequest>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        self.snapshots.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.snapshot_gate {
            gate.acquire().await.expect("gate open").forget();
        }
        let index = self
            .stale_snapshot_at
            .ok_or_else(|| Status::unimplemented("no snapshot in this fake"))?;
        let (sender, receiver) = tokio::sync::mpsc::channel(1);
        let chunk = proto::SnapshotChunk {
            data: Vec::new(),
            len: 0,
            index,
            crc32c: 0,
            offset: 0,
            last: true,
        };
        sender.send(Ok(chunk)).await.expect("room for one");
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(
            receiver,
        )))
    }
}

/// A put of key `k<index>` with a value of `value_bytes` bytes, at leader
/// index `index`.
fn put_command(index: u64, value_bytes: usize) -> proto::ReplicateCommand {
    proto::ReplicateCommand {
        leader_index: index,
        command: encode(&Command::Put(PutRequest {
            key: format!("k{index}").into_bytes(),
            value: vec![b'v'; value_bytes],
            prev_kv: false,
        })),
    }
}

/// A log stream response carrying `commands` (none for a heartbeat).
fn commands_response(
    commands: Vec<proto::ReplicateCommand>,
    leader_index: u64,
) -> proto::ReplicateResponse {
    proto::ReplicateResponse {
        response: Some(proto::replicate_response::Response::CommandsResponse(
            proto::ReplicateCommandsResponse { commands },
        )),
        leader_index,
    }
}

async fn start_follower_node(dir: &std::path::Path) -> Arc<Node> {
    let mut config = NodeConfig::single(dir, free_address());
    config.role = ClusterRole::Follower;
    Node::start(config).await.expect("node")
}

/// Waits until the fake has had `count` snapshot requests, failing with
/// `what` past `deadline`.
async fn wait_for_snapshot_requests(
    fake: &FakeLeader,
    count: usize,
    deadline: Instant,
    what: &str,
) {
    while fake.snapshots.load(Ordering::SeqCst) < count {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn wait_for_replicates(fake: &FakeLeader, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while fake.replicates() == 0 {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A stream that ends cleanly with nothing in it is reopened after a pause
/// that doubles, as after a failure. Before, the puller reopened it at
/// once, in a loop that spun a core and flooded the leader node with
/// requests (4,552 in the time this test waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_stream_that_ends_with_nothing_new_is_reopened_after_a_pause() {
    let fake = FakeLeader::default();
    let url = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower = start_follower(Arc::clone(&node), FollowerConfig::new(url)).expect("follower");

    // The puller starts once the copy of the table exists here.
    wait_for_replicates(&fake, "the follower never asked for the log").await;
    let first = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reopened = fake.replicates() - 1;
    let waited = first.elapsed();
    follower.stop().await;
    // Pauses of 100, 200, 400, 800 and 1,600 ms: four or five reopenings
    // fit 3 s (a few more for the scheduler's slack, none spinning).
    assert!(
        (2..=8).contains(&reopened),
        "the stream was reopened {reopened} times in {waited:?}; expected a few, with pauses"
    );
}

/// With more than one leader address, a node whose streams keep ending
/// empty is left for the next address after three in a row; a healthy
/// stream there, idle but sending heartbeats, is kept open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_node_whose_streams_keep_ending_empty_is_left_for_the_next_address() {
    let empty = FakeLeader::default();
    let healthy = FakeLeader {
        heartbeats: true,
        ..FakeLeader::default()
    };
    let urls = vec![empty.serve().await, healthy.serve().await];
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower =
        start_follower(Arc::clone(&node), FollowerConfig::with_addresses(urls)).expect("follower");

    wait_for_replicates(&empty, "the follower never asked the first address").await;
    wait_for_replicates(&healthy, "the follower never moved to the next address").await;
    let (empty_before, healthy_before) = (empty.replicates(), healthy.replicates());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (empty_after, healthy_after) = (empty.replicates(), healthy.replicates());
    follower.stop().await;
    assert!(
        empty_before <= 4,
        "three empty streams move the puller, then it stays away: {empty_before}"
    );
    assert_eq!(
        (empty_after, healthy_after),
        (empty_before, healthy_before),
        "the healthy stream stays open, and nothing goes back to the empty node"
    );
}

/// A leader stream faster than the follower's proposals fills the
/// puller's buffer only up to its byte budget (16 MiB): with 1 MiB
/// commands, about 16 responses, plus what the channel and the sockets
/// hold (23 measured). Counted in responses alone, the buffer held 64
/// (73 measured; up to 256 MiB of the leader's 4 MiB responses per
/// table).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fast_leader_stream_is_buffered_up_to_the_byte_budget() {
    let fake = FakeLeader {
        flood_value_bytes: Some(1 << 20),
        ..FakeLeader::default()
    };
    let url = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower = start_follower(Arc::clone(&node), FollowerConfig::new(url)).expect("follower");
    wait_for_replicates(&fake, "the follower never asked for the log").await;
    let group = node.table_group("etcd").expect("the copy of the table");
    let mut most_in_flight = 0;
    let mut applied = 0;
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let sent = fake.sent.load(Ordering::SeqCst) as u64;
        applied = node.table_revision(group, false).await.unwrap_or(applied);
        most_in_flight = most_in_flight.max(sent.saturating_sub(applied));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    follower.stop().await;
    assert!(applied > 0, "nothing was applied");
    // 16 in the budget (the batch being proposed among them), one in the
    // reader's hand, 4 in the fake's channel, and what HTTP/2 and TCP
    // buffer.
    assert!(
        most_in_flight <= 40,
        "{most_in_flight} responses of 1 MiB were in flight at once"
    );
    // And the budget was reached: the follower was the slower side.
    assert!(
        most_in_flight >= 12,
        "only {most_in_flight} responses were ever in flight: the stream never outran the follower"
    );
}

/// A snapshot older than what the table applied is not installed: the
/// table keeps its revision and its data, and the puller reports the
/// serving node behind and tries again later. Before, the install took
/// the table back to the snapshot's revision, undoing applied writes (a
/// deposed puller's late install could do the same). An operator's reset
/// does install it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_older_than_the_table_is_not_installed() {
    let fake = FakeLeader {
        stale_snapshot_at: Some(5),
        ..FakeLeader::default()
    };
    let url = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower = start_follower(Arc::clone(&node), FollowerConfig::new(url)).expect("follower");
    let deadline = Instant::now() + Duration::from_secs(20);
    wait_for_snapshot_requests(
        &fake,
        1,
        deadline,
        "the follower never asked for the snapshot",
    )
    .await;
    let group = node.table_group("etcd").expect("the copy of the table");
    // The second snapshot request comes after the first was refused; the
    // refusal is reported while the puller pauses (a new stream clears
    // it).
    let mut reported = false;
    while fake.snapshots.load(Ordering::SeqCst) < 2 || !reported {
        assert!(
            Instant::now() < deadline,
            "the follower never retried, or never reported the refusal"
        );
        let error = node.replication_facts(group).and_then(|facts| facts.error);
        reported |= error
            .as_deref()
            .is_some_and(|error| error.contains("behind this follower's 10"));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        node.table_revision(group, true).await.expect("revision"),
        10,
        "the table's revision moved back"
    );
    // An operator's reset follows the leader cluster's copy, older or not.
    node.request_resync(group).await.expect("reset");
    let deadline = Instant::now() + Duration::from_secs(20);
    while node.table_revision(group, true).await.expect("revision") != 5 {
        assert!(
            Instant::now() < deadline,
            "the reset never installed the older copy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    follower.stop().await;
    node.stop().await;
}

/// An operator's reset that lands while the puller is about to begin an
/// ordinary install (it chose to refuse older copies, and waits for the
/// serving node's snapshot) is followed all the same. The install's begin
/// replaces the reset's restore (a table has one), and before, when the
/// copy turned out older and was refused, the reset was lost: the table
/// never went back to the leader cluster's copy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_that_an_ordinary_install_displaces_is_still_followed() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = FakeLeader {
        stale_snapshot_at: Some(5),
        snapshot_gate: Some(Arc::clone(&gate)),
        ..FakeLeader::default()
    };
    let url = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower = start_follower(Arc::clone(&node), FollowerConfig::new(url)).expect("follower");
    let deadline = Instant::now() + Duration::from_secs(20);
    // The log sent the table (at revision 10) to a snapshot: the puller
    // asked for it, refusing older copies, and waits at the gate.
    wait_for_snapshot_requests(
        &fake,
        1,
        deadline,
        "the follower never asked for the snapshot",
    )
    .await;
    let group = node.table_group("etcd").expect("the copy of the table");
    assert_eq!(
        node.table_revision(group, true).await.expect("revision"),
        10
    );
    node.request_resync(group).await.expect("reset");
    gate.add_permits(1_000);
    while node.table_revision(group, true).await.expect("revision") != 5 {
        assert!(
            Instant::now() < deadline,
            "the reset was lost: the table stayed at revision 10"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Carried out, the reset's record is gone: a later install refuses
    // older copies again.
    let deadline = Instant::now() + Duration::from_secs(10);
    while node
        .table_reset_requested(group)
        .await
        .expect("reset record")
        .is_some()
    {
        assert!(Instant::now() < deadline, "the reset's record stayed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    follower.stop().await;
    node.stop().await;
}

/// A reset's record that outlives the install that carried the reset out
/// (a crash between that install's commit and the record's deletion, or a
/// failed deletion) is spent: the table recorded the reset in the
/// install's commit, and the next puller to read the record deletes it
/// instead of following it. Before, that record let one later install
/// take the table back to an older copy a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_reset_record_does_not_take_the_table_back() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fake = FakeLeader {
        stale_snapshot_at: Some(5),
        snapshot_gate: Some(Arc::clone(&gate)),
        refill: true,
        ..FakeLeader::default()
    };
    let url = fake.serve().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let node = start_follower_node(dir.path()).await;
    let follower = start_follower(Arc::clone(&node), FollowerConfig::new(url)).expect("follower");
    let deadline = Instant::now() + Duration::from_secs(30);
    wait_for_snapshot_requests(
        &fake,
        1,
        deadline,
        "the follower never asked for the snapshot",
    )
    .await;
    let group = node.table_group("etcd").expect("the copy of the table");
    node.request_resync(group).await.expect("reset");
    let reset_id = node
        .table_reset_requested(group)
        .await
        .expect("reset record")
        .expect("the reset's record");
    gate.add_permits(1_000);
    // The reset is carried out (to the leader's copy at 5) and its record
    // deleted; the log then brings the table back up to 10, where the
    // stale snapshot is refused again.
    while node.snapshot_installs(group) < 1
        || node
            .table_reset_requested(group)
            .await
            .expect("reset record")
            .is_some()
        || node.table_revision(group, true).await.expect("revision") != 10
    {
        assert!(
            Instant::now() < deadline,
            "the reset was not carried out, or the table did not move on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.table_reset_carried(group), reset_id);
    let installs = node.snapshot_installs(group);

    // The record comes back, as a crash before its deletion leaves it.
    let record = Command::Put(PutRequest {
        key: reset_request_key(group),
        value: reset_id.to_le_bytes().to_vec(),
        prev_kv: false,
    });
    node.write(META_GROUP, &record).await.expect("record");
    // The puller's pauses after refused copies have grown (to 5 s).
    let deadline = Instant::now() + Duration::from_secs(30);
    while node
        .table_reset_requested(group)
        .await
        .expect("reset record")
        .is_some()
    {
        assert!(
            Instant::now() < deadline,
            "the spent record was never deleted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Two more snapshot requests: installs that read no record and refuse
    // the older copy.
    let requests = fake.snapshots.load(Ordering::SeqCst);
    wait_for_snapshot_requests(&fake, requests + 2, deadline, "the puller stopped asking").await;
    assert_eq!(
        node.snapshot_installs(group),
        installs,
        "the spent record took the table back again"
    );
    assert_eq!(
        node.table_revision(group, true).await.expect("revision"),
        10,
        "the table's revision moved back"
    );
    follower.stop().await;
    node.stop().await;
}
