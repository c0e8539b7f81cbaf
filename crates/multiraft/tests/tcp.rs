//! Three node hosts over real TCP on 127.0.0.1, on ports the test chooses:
//! elect, replicate, read; a node crashes (its transport and host stop) and
//! comes back on the same address from its WAL; a peer of another cluster
//! is refused at the handshake; malformed snapshot streams are refused.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{
    HostConfig, NodeHost, PeerAddress, Resolver, StateMachine, TcpConfig, TcpTransport, Transport,
};
use regatta_raft::{LogIndex, Membership, Message, MessageBody, NodeId, Role, SnapshotMeta, Term};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GROUPS: [GroupId; 3] = [GroupId(1), GroupId(2), GroupId(3)];
const CLUSTER: u64 = 42;

#[derive(Default)]
struct Register {
    value: Arc<Mutex<String>>,
    applied: LogIndex,
}

impl StateMachine for Register {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        *self.value.lock().expect("lock") = String::from_utf8_lossy(command).to_string();
        self.applied = index;
        Bytes::new()
    }

    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::from(self.value.lock().expect("lock").clone())
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::from(self.value.lock().expect("lock").clone()) };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        *self.value.lock().expect("lock") = String::from_utf8_lossy(data).to_string();
        self.applied = index;
        Ok(())
    }
}

struct Node {
    host: NodeHost,
    transport: Arc<TcpTransport>,
}

async fn start_node(
    dir: &Path,
    id: u64,
    listener: TcpListener,
    peers: &HashMap<NodeId, SocketAddr>,
    bootstrap: bool,
) -> Node {
    start_node_configured(dir, id, listener, peers, bootstrap, |_| {}).await
}

/// `start_node`, with the host's settings changed by `configure`.
async fn start_node_configured(
    dir: &Path,
    id: u64,
    listener: TcpListener,
    peers: &HashMap<NodeId, SocketAddr>,
    bootstrap: bool,
    configure: impl FnOnce(&mut HostConfig),
) -> Node {
    let mut tcp = TcpConfig::new(NodeId(id), CLUSTER);
    tcp.peers = peers
        .iter()
        .map(|(id, a)| (*id, PeerAddress::from(*a)))
        .collect();
    let transport = TcpTransport::start(tcp, listener);
    let mut config = HostConfig::new(NodeId(id), dir);
    config.tick_interval = Duration::from_millis(10);
    configure(&mut config);
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let host =
        NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current()).expect("host");
    transport.attach(&host);
    let voters: Vec<NodeId> = if bootstrap {
        peers.keys().copied().collect()
    } else {
        Vec::new()
    };
    for group in GROUPS {
        host.start_group(group, voters.clone(), Box::new(Register::default()))
            .expect("group");
    }
    Node { host, transport }
}

/// A host with group 1 only (voters 1 and 2, node 2 never started)
/// behind `transport`: the receiver writes incoming snapshots for it into
/// its directory.
fn attach_bare_host(transport: &Arc<TcpTransport>, dir: &Path) -> NodeHost {
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(transport) as Arc<dyn Transport>;
    let host = NodeHost::new(
        HostConfig::new(NodeId(1), dir),
        wal,
        as_transport,
        tokio::runtime::Handle::current(),
    )
    .expect("host");
    transport.attach(&host);
    let machine = Register {
        value: Arc::default(),
        applied: LogIndex(0),
    };
    host.start_group(GroupId(1), vec![NodeId(1), NodeId(2)], Box::new(machine))
        .expect("group");
    host
}

/// Nodes 1 to 3, bootstrapping every group, each with its WAL in one of
/// `dirs` and on a port of its own, their host settings changed by
/// `configure`; the peers' addresses and the nodes by id.
async fn start_three_nodes(
    dirs: &[tempfile::TempDir],
    configure: impl Fn(&mut HostConfig),
) -> (HashMap<NodeId, SocketAddr>, BTreeMap<u64, Node>) {
    let mut listeners = Vec::new();
    let mut peers = HashMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(NodeId(id), listener.local_addr().expect("address"));
        listeners.push(listener);
    }
    let mut nodes = BTreeMap::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        let dir = dirs[position].path();
        let node = start_node_configured(dir, id, listener, &peers, true, &configure).await;
        nodes.insert(id, node);
    }
    (peers, nodes)
}

async fn leader_of(nodes: &BTreeMap<u64, Node>, group: GroupId) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        for (id, node) in nodes {
            if node
                .host
                .status(group)
                .await
                .expect("status")
                .soft_state
                .role
                == Role::Leader
            {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("group {} elected no leader", group.0);
}

async fn read_until(host: &NodeHost, group: GroupId, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Ok(value) = host.read_linearizable(group, Bytes::new()).await {
            if value == expected.as_bytes() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} never read {expected} in group {}",
            host.node_id(),
            group.0
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Three groups on three nodes over TCP: every group elects and commits;
/// a crashed node rejoins on the same address and catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_over_tcp() {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let (peers, mut nodes) = start_three_nodes(&dirs, |_| {}).await;
    for group in GROUPS {
        let leader = leader_of(&nodes, group).await;
        for i in 0..50 {
            nodes[&leader]
                .host
                .propose(group, Bytes::from(format!("g{}-v{i}", group.0)))
                .await
                .expect("commit");
        }
    }
    for node in nodes.values() {
        for group in GROUPS {
            read_until(&node.host, group, &format!("g{}-v49", group.0)).await;
        }
    }
    assert!(
        nodes[&1]
            .transport
            .stats()
            .frames_sent
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    // Counted by kind too: every message is one kind, and the writes made
    // leaders send appends and followers answer them.
    for node in nodes.values() {
        let stats = node.transport.stats();
        let load = |counter: &std::sync::atomic::AtomicU64| {
            counter.load(std::sync::atomic::Ordering::Relaxed)
        };
        let by_kind: u64 = stats.messages_sent_by_kind.iter().map(load).sum();
        assert_eq!(by_kind, load(&stats.messages_sent));
    }
    let kind = |name: &str| {
        regatta_raft::MESSAGE_KIND_NAMES
            .iter()
            .position(|kind| *kind == name)
            .expect("a kind")
    };
    let sent = |name: &str| -> u64 {
        nodes
            .values()
            .map(|node| {
                node.transport.stats().messages_sent_by_kind[kind(name)]
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    };
    assert!(sent("append") > 0 && sent("append_response") > 0);

    // Crash node 3: its transport stops (port released) and its host stops.
    let crashed = nodes.remove(&3).expect("node 3");
    crashed.transport.shutdown();
    crashed.host.stop().await;
    drop(crashed);
    for group in GROUPS {
        let leader = leader_of(&nodes, group).await;
        nodes[&leader]
            .host
            .propose(group, Bytes::from_static(b"while-down"))
            .await
            .expect("commit with 2 of 3");
    }
    let listener = TcpListener::bind(peers[&NodeId(3)])
        .await
        .expect("rebind the same port");
    let restarted = start_node(dirs[2].path(), 3, listener, &peers, false).await;
    for group in GROUPS {
        read_until(&restarted.host, group, "while-down").await;
    }
    for node in nodes.values() {
        node.transport.shutdown();
        node.host.stop().await;
    }
    restarted.transport.shutdown();
    restarted.host.stop().await;
}

/// A peer claiming another cluster id is refused at the handshake.
#[tokio::test]
async fn a_peer_of_another_cluster_is_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let transport = TcpTransport::start(TcpConfig::new(NodeId(1), CLUSTER), listener);
    let mut stream = send_handshake(address, CLUSTER + 1).await;
    assert_eq!(stream.read_u8().await.expect("answer"), 1, "wrong cluster");
    transport.shutdown();
}

/// Idle connections cannot use up the process's file descriptors: past
/// `incoming_connections_max` open at once, a new one is closed at once
/// (and counted); a slot frees when a connection ends.
#[tokio::test]
async fn incoming_connections_are_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = TcpConfig::new(NodeId(1), CLUSTER);
    config.incoming_connections_max = 2;
    let transport = TcpTransport::start(config, listener);
    let first = handshake(address).await;
    let _second = handshake(address).await;
    let mut third = TcpStream::connect(address).await.expect("connect");
    closed_unconfirmed(&mut third).await;
    assert_eq!(
        transport
            .stats()
            .connections_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut stream = send_handshake(address, CLUSTER).await;
        if stream.read_u8().await.ok() == Some(0) {
            break;
        }
        assert!(Instant::now() < deadline, "the slot never freed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    transport.shutdown();
}

/// Connects to `address` and sends the handshake of node 2 of `cluster`;
/// the answer is left for the caller to read.
async fn send_handshake(address: SocketAddr, cluster: u64) -> TcpStream {
    let mut stream = TcpStream::connect(address).await.expect("connect");
    let mut handshake = b"RGRAFTv1".to_vec();
    handshake.extend_from_slice(&1u32.to_le_bytes());
    handshake.extend_from_slice(&cluster.to_le_bytes());
    handshake.extend_from_slice(&2u64.to_le_bytes());
    stream.write_all(&handshake).await.expect("write");
    stream
}

/// Opens a connection to `address` as node 2 of `CLUSTER`, accepted.
async fn handshake(address: SocketAddr) -> TcpStream {
    let mut stream = send_handshake(address, CLUSTER).await;
    assert_eq!(stream.read_u8().await.expect("answer"), 0, "accepted");
    stream
}

fn frame(body: &[u8]) -> Vec<u8> {
    let mut frame = (body.len() as u32).to_le_bytes().to_vec();
    frame.extend_from_slice(&crc32c::crc32c(body).to_le_bytes());
    frame.extend_from_slice(body);
    frame
}

/// A snapshot header frame announcing `total` bytes of data for `body`,
/// from node 2 to node 1 in group 1.
fn snapshot_header(total: u64, body: MessageBody) -> Vec<u8> {
    let message = Message {
        from: NodeId(2),
        to: NodeId(1),
        term: Term(3),
        body,
    };
    snapshot_header_of(GroupId(1), message, total)
}

/// A snapshot header frame announcing `total` bytes of data for `message`
/// of `group`.
fn snapshot_header_of(group: GroupId, message: Message, total: u64) -> Vec<u8> {
    let mut header = vec![2u8];
    header.extend_from_slice(&total.to_le_bytes());
    regatta_multiraft::wire::encode_batch(&[(group, message)], &mut header);
    frame(&header)
}

/// A snapshot message body at index 10, term 3, voters 1 and 2.
fn snapshot_body() -> MessageBody {
    MessageBody::Snapshot {
        meta: SnapshotMeta {
            index: LogIndex(10),
            term: Term(3),
            membership: Membership::with_voters([NodeId(1), NodeId(2)]),
        },
    }
}

/// Waits until the peer closes the connection without confirming.
async fn closed_unconfirmed(stream: &mut TcpStream) {
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest))
        .await
        .expect("the receiver closes the connection");
    assert!(
        read.is_err() || rest.is_empty(),
        "no confirmation: {rest:?}"
    );
}

/// A receiver refuses, without confirming and without allocating what was
/// announced: a snapshot over `snapshot_bytes_max`, a chunk past the
/// announced length, a header whose message is not a snapshot, and a
/// snapshot message outside a snapshot stream.
#[tokio::test]
async fn malformed_snapshot_streams_are_refused() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = TcpConfig::new(NodeId(1), CLUSTER);
    config.snapshot_bytes_max = 1_000;
    let transport = TcpTransport::start(config, listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let _host = attach_bare_host(&transport, dir.path());
    let snapshot = snapshot_body();

    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header(u64::MAX, snapshot.clone()))
        .await
        .expect("write");
    closed_unconfirmed(&mut stream).await;

    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header(10, snapshot.clone()))
        .await
        .expect("write");
    let mut chunk = vec![3u8];
    chunk.extend_from_slice(&[7u8; 20]);
    stream.write_all(&frame(&chunk)).await.expect("write");
    closed_unconfirmed(&mut stream).await;

    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header(10, MessageBody::TimeoutNow))
        .await
        .expect("write");
    closed_unconfirmed(&mut stream).await;

    // A snapshot of a group this node does not run, or for another node:
    // refused at the header, before a file is made.
    for (group, to) in [(GroupId(7), NodeId(1)), (GroupId(1), NodeId(3))] {
        let message = Message {
            from: NodeId(2),
            to,
            term: Term(3),
            body: snapshot.clone(),
        };
        let mut stream = handshake(address).await;
        stream
            .write_all(&snapshot_header_of(group, message, 10))
            .await
            .expect("write");
        closed_unconfirmed(&mut stream).await;
    }

    // A snapshot message in an ordinary batch, without its data: the group
    // would accept a snapshot it cannot install.
    let mut stream = handshake(address).await;
    let message = Message {
        from: NodeId(2),
        to: NodeId(1),
        term: Term(3),
        body: snapshot.clone(),
    };
    let mut batch = vec![1u8];
    regatta_multiraft::wire::encode_batch(&[(GroupId(1), message)], &mut batch);
    stream.write_all(&frame(&batch)).await.expect("write");
    closed_unconfirmed(&mut stream).await;

    assert_eq!(
        transport
            .stats()
            .frames_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        6
    );
    assert_eq!(
        transport
            .stats()
            .snapshots_received
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    transport.shutdown();
}

/// A peer speaks only for the node it named at its handshake: a message,
/// or a snapshot header, claiming another sender closes the connection
/// (a removed node could otherwise pose as a member). A frame whose
/// length came but whose body stalls, and a snapshot whose chunks trickle
/// in each just inside the idle timeout, are dropped at their deadlines
/// instead of holding the connection, and a snapshot slot, for ever.
#[tokio::test]
async fn a_peer_speaks_only_for_itself_and_cannot_stall_a_frame_or_snapshot() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = TcpConfig::new(NodeId(1), CLUSTER);
    config.frame_body_timeout_min = Duration::from_millis(300);
    config.snapshot_idle_timeout = Duration::from_millis(500);
    config.snapshot_bytes_per_second_min = 1_000;
    let transport = TcpTransport::start(config, listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let _host = attach_bare_host(&transport, dir.path());
    let refused = || {
        transport
            .stats()
            .frames_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    };

    // Node 2's connection carrying a heartbeat from node 3.
    let mut stream = handshake(address).await;
    let posing = Message {
        from: NodeId(3),
        to: NodeId(1),
        term: Term(3),
        body: MessageBody::Heartbeat {
            commit: LogIndex(0),
            round: 0,
        },
    };
    let mut batch = vec![1u8];
    regatta_multiraft::wire::encode_batch(&[(GroupId(1), posing)], &mut batch);
    stream.write_all(&frame(&batch)).await.expect("write");
    closed_unconfirmed(&mut stream).await;
    assert_eq!(refused(), 1);

    // A snapshot header whose message is from node 3 (announcing enough
    // bytes that its whole-transfer deadline is far off).
    let snapshot = snapshot_body();
    let message = Message {
        from: NodeId(3),
        to: NodeId(1),
        term: Term(3),
        body: snapshot.clone(),
    };
    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header_of(GroupId(1), message, 100_000))
        .await
        .expect("write");
    closed_unconfirmed(&mut stream).await;
    assert_eq!(refused(), 2);

    // A frame of 1,000 bytes announced, 10 sent, then nothing.
    let mut stream = handshake(address).await;
    let mut stalled = 1_000u32.to_le_bytes().to_vec();
    stalled.extend_from_slice(&0u32.to_le_bytes());
    stalled.extend_from_slice(&[1u8; 10]);
    stream.write_all(&stalled).await.expect("write");
    closed_unconfirmed(&mut stream).await;
    assert_eq!(refused(), 3);

    // A snapshot of 1,000 bytes (so 1.5 s in all at 1,000 bytes/s after
    // the 0.5 s idle timeout), one byte every 0.2 s.
    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header(1_000, snapshot))
        .await
        .expect("write");
    let started = Instant::now();
    let trickle = async {
        loop {
            let chunk = frame(&[3u8, 7u8]);
            if stream.write_all(&chunk).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let ended = tokio::time::timeout(Duration::from_secs(10), trickle).await;
    assert!(
        ended.is_ok(),
        "the trickled snapshot held its slot for 10 s"
    );
    assert!(started.elapsed() >= Duration::from_millis(1_000));
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused() < 4 {
        assert!(Instant::now() < deadline, "the trickle was not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        transport
            .stats()
            .snapshots_received
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    transport.shutdown();
}

/// A snapshot whose data does not open (its session table's length runs
/// past the data) is refused before Raft sees it: unanswered, so the
/// sender retries, and the group runs on. Delivered, it was accepted by
/// Raft (the log replaced, the membership too) and then failed on the
/// apply thread, which stopped the group on this node for good.
#[tokio::test]
async fn a_snapshot_whose_data_does_not_open_is_refused_before_raft_sees_it() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let transport = TcpTransport::start(TcpConfig::new(NodeId(1), CLUSTER), listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let host = attach_bare_host(&transport, dir.path());
    let snapshot = snapshot_body();
    let mut stream = handshake(address).await;
    stream
        .write_all(&snapshot_header(10, snapshot))
        .await
        .expect("write");
    // A session table of 1,000 bytes announced in 10 bytes of data.
    let mut chunk = vec![3u8];
    chunk.extend_from_slice(&1_000u32.to_le_bytes());
    chunk.extend_from_slice(&[0u8; 6]);
    stream.write_all(&frame(&chunk)).await.expect("write");
    closed_unconfirmed(&mut stream).await;
    assert_eq!(
        transport
            .stats()
            .frames_refused
            .load(std::sync::atomic::Ordering::Relaxed),
        1
    );
    // The group still answers, at the term it had.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let status = host.status(GroupId(1)).await.expect("the group runs");
    assert!(status.hard_state.term < Term(3), "{status:?}");
    transport.shutdown();
}

/// Beyond `incoming_snapshots_max` snapshots being received at once, a
/// new one is refused at its header; once one finishes or stalls past
/// `snapshot_idle_timeout`, the slot is free.
#[tokio::test]
async fn concurrent_incoming_snapshots_are_bounded() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let mut config = TcpConfig::new(NodeId(1), CLUSTER);
    config.incoming_snapshots_max = 1;
    config.snapshot_idle_timeout = Duration::from_secs(1);
    let transport = TcpTransport::start(config, listener);
    let dir = tempfile::tempdir().expect("tempdir");
    let _host = attach_bare_host(&transport, dir.path());
    let refused = || {
        transport
            .stats()
            .snapshots_refused
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let header = snapshot_header(100, snapshot_body());

    // The first holds the only slot: its header is in, its data is not.
    let mut first = handshake(address).await;
    first.write_all(&header).await.expect("write");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut second = handshake(address).await;
    second.write_all(&header).await.expect("write");
    closed_unconfirmed(&mut second).await;
    assert_eq!(refused(), 1);

    // The first ends (the sender gave up): the slot is free again.
    drop(first);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut third = handshake(address).await;
    third.write_all(&header).await.expect("write");
    let mut byte = [0u8; 1];
    let waited = tokio::time::timeout(Duration::from_millis(300), third.read(&mut byte)).await;
    assert!(waited.is_err(), "the third is being received, not closed");
    assert_eq!(refused(), 1);

    // A sender that stalls is dropped after `snapshot_idle_timeout`
    // (here 1 s), which frees its slot.
    closed_unconfirmed(&mut third).await;
    let mut fourth = handshake(address).await;
    fourth.write_all(&header).await.expect("write");
    let waited = tokio::time::timeout(Duration::from_millis(300), fourth.read(&mut byte)).await;
    assert!(waited.is_err(), "the fourth is being received, not closed");
    assert_eq!(refused(), 1);
    transport.shutdown();
}

/// 1,000 groups across three nodes over TCP: every group elects a leader
/// and commits a proposal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_groups_elect_and_commit() {
    let groups = 1000u64;
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut listeners = Vec::new();
    let mut peers = HashMap::new();
    for id in 1..=3u64 {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(NodeId(id), listener.local_addr().expect("address"));
        listeners.push(listener);
    }
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut nodes = Vec::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        let mut tcp = TcpConfig::new(NodeId(id), CLUSTER);
        tcp.peers = peers
            .iter()
            .map(|(id, a)| (*id, PeerAddress::from(*a)))
            .collect();
        let transport = TcpTransport::start(tcp, listener);
        let mut config = HostConfig::new(NodeId(id), dirs[position].path());
        config.tick_interval = Duration::from_millis(50);
        let wal = Arc::new(Wal::open(WalConfig::new(dirs[position].path())).expect("wal"));
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let host = NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current())
            .expect("host");
        transport.attach(&host);
        for group in 1..=groups {
            host.start_group(
                GroupId(group),
                voters.clone(),
                Box::new(Register::default()),
            )
            .expect("group");
        }
        nodes.push(Node { host, transport });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut committed = 0u64;
    for group in 1..=groups {
        let group = GroupId(group);
        'this_group: loop {
            for node in &nodes {
                if node
                    .host
                    .status(group)
                    .await
                    .expect("status")
                    .soft_state
                    .role
                    == Role::Leader
                    && node
                        .host
                        .propose(group, Bytes::from_static(b"x"))
                        .await
                        .is_ok()
                {
                    committed += 1;
                    break 'this_group;
                }
            }
            assert!(
                Instant::now() < deadline,
                "group {} had no leader in time ({committed} committed)",
                group.0
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert_eq!(committed, groups);
    for node in &nodes {
        node.transport.shutdown();
        node.host.stop().await;
    }
}

/// A peer that takes the TCP connection but never answers the handshake
/// (a hung process, a black hole behind a load balancer) is given up on
/// after `connect_timeout` and dialled again: the writer never waits on it
/// for good.
#[tokio::test]
async fn a_peer_that_never_answers_the_handshake_is_given_up_on() {
    // Never accepted: the kernel completes the TCP handshake from the
    // backlog, and nothing ever answers ours.
    let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let own = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let mut tcp = TcpConfig::new(NodeId(1), CLUSTER);
    tcp.connect_timeout = Duration::from_millis(200);
    tcp.reconnect_delay_max = Duration::from_millis(50);
    let silent_address = PeerAddress::from(silent.local_addr().expect("address"));
    tcp.peers = [(NodeId(2), silent_address)].into();
    let transport = TcpTransport::start(tcp, own);
    let failures = || {
        transport
            .stats()
            .connection_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while failures() < 3 {
        assert!(
            Instant::now() < deadline,
            "the dial waited on a silent peer ({} failures)",
            failures()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    transport.shutdown();
    drop(silent);
}

/// A peer given by name is looked up again at every dial: when the name
/// moves to another address (a rescheduled container), the next
/// connection goes there, without a restart. Here the first address takes
/// the connection but never answers the handshake, so the transport gives
/// up on it and dials again, by then to the second address.
#[tokio::test]
async fn a_peer_name_is_resolved_again_at_every_dial() {
    let first = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let second = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let own = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let first_address = first.local_addr().expect("address");
    let second_address = second.local_addr().expect("address");
    let answer = Arc::new(Mutex::new(first_address));
    let lookups = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut tcp = TcpConfig::new(NodeId(1), CLUSTER);
    tcp.connect_timeout = Duration::from_millis(200);
    tcp.reconnect_delay_max = Duration::from_millis(50);
    tcp.resolver = Some(Resolver::new({
        let answer = Arc::clone(&answer);
        let lookups = Arc::clone(&lookups);
        move |name, port| {
            lookups.lock().expect("lock").push(format!("{name}:{port}"));
            Ok(vec![*answer.lock().expect("lock")])
        }
    }));
    let name: PeerAddress = "peer-two.regatta.test:7000".parse().expect("a name");
    tcp.peers = [(NodeId(2), name)].into();
    let transport = TcpTransport::start(tcp, own);

    // The first dial reaches the first address; then the name moves.
    let held = tokio::time::timeout(Duration::from_secs(10), first.accept())
        .await
        .expect("the first address was never dialled")
        .expect("accept");
    *answer.lock().expect("lock") = second_address;
    let (mut moved, _) = tokio::time::timeout(Duration::from_secs(10), second.accept())
        .await
        .expect("the name's new address was never dialled")
        .expect("accept");
    // It is the transport's own handshake that arrives there.
    let mut start = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), moved.read_exact(&mut start))
        .await
        .expect("the handshake never came")
        .expect("read");
    let lookups = lookups.lock().expect("lock").clone();
    assert!(lookups.len() >= 2, "looked up once only: {lookups:?}");
    assert!(
        lookups
            .iter()
            .all(|lookup| lookup == "peer-two.regatta.test:7000"),
        "{lookups:?}"
    );
    transport.shutdown();
    drop(held);
}

/// A follower whose leader has just crashed answers a forwarded proposal
/// at once with `Unsent` (the transport cannot reach the leader), not
/// after the 10 s request timeout, and not only once an election names
/// another leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_forwarded_to_an_unreachable_leader_fails_at_once() {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    // Elections after 3-6 s: the follower still follows the crashed
    // leader when it proposes, even on a slow machine.
    let patient = |config: &mut HostConfig| config.raft.election_timeout_ticks = 300;
    let (_, mut nodes) = start_three_nodes(&dirs, patient).await;
    let group = GROUPS[0];
    let leader = leader_of(&nodes, group).await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    nodes[&leader]
        .host
        .propose(group, Bytes::from_static(b"before"))
        .await
        .expect("commit");
    read_until(&nodes[&follower].host, group, "before").await;
    let failures = |node: &Node| {
        node.transport
            .stats()
            .connection_failures
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let failures_before = failures(&nodes[&follower]);
    let crashed = nodes.remove(&leader).expect("the leader");
    crashed.transport.shutdown();
    crashed.host.stop().await;
    drop(crashed);
    // The follower's link breaks (one failure), then a dial is refused
    // (another): from then on the leader counts as unreachable.
    let deadline = Instant::now() + Duration::from_secs(5);
    while failures(&nodes[&follower]) < failures_before + 2 {
        assert!(
            Instant::now() < deadline,
            "the follower never lost the link"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let id = regatta_raft::RequestId {
        client: 5,
        sequence: 1,
    };
    let started = Instant::now();
    let result = nodes[&follower]
        .host
        .propose_with_id(group, id, Bytes::from_static(b"after"))
        .await;
    match result {
        Err(regatta_multiraft::Error::Unsent { peer, cause, .. }) => {
            assert_eq!(peer, NodeId(leader));
            assert_eq!(cause, regatta_multiraft::UnsentCause::Unreachable);
        }
        other => panic!("the proposal fails as unsent, got {other:?}"),
    }
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "answered in {:?}",
        started.elapsed()
    );
    for node in nodes.values() {
        node.transport.shutdown();
        node.host.stop().await;
    }
}
