//! The peer transport over TLS with mutual authentication, on loopback:
//! nodes with certificates from the cluster CA form a group and commit; a
//! node whose certificate comes from another CA, and a client without TLS,
//! are refused.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use regatta_multiraft::{
    HostConfig, NodeHost, PeerTls, StateMachine, TcpConfig, TcpTransport, Transport,
};
use regatta_raft::{LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const GROUP: GroupId = GroupId(1);
const CLUSTER: u64 = 7;
const PEER_NAME: &str = "regatta-peer";

struct Authority {
    certificate: Certificate,
    key: KeyPair,
}

impl Authority {
    fn new() -> Authority {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let key = KeyPair::generate().expect("key");
        let certificate = params.self_signed(&key).expect("CA");
        Authority { certificate, key }
    }

    fn peer_tls(&self) -> PeerTls {
        let params = CertificateParams::new(vec![PEER_NAME.to_string()]).expect("params");
        let key = KeyPair::generate().expect("key");
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("sign");
        PeerTls::from_pem(
            self.certificate.pem().as_bytes(),
            certificate.pem().as_bytes(),
            key.serialize_pem().as_bytes(),
            PEER_NAME,
        )
        .expect("tls")
    }
}

#[derive(Default)]
struct Register {
    value: Bytes,
    applied: LogIndex,
}

impl StateMachine for Register {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        self.value = command.clone();
        self.applied = index;
        Bytes::new()
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        self.value.clone()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { self.value.clone() };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        self.value = data.clone();
        self.applied = index;
        Ok(())
    }
}

struct Node {
    host: NodeHost,
    transport: Arc<TcpTransport>,
    _dir: tempfile::TempDir,
}

fn start(
    id: u64,
    listener: TcpListener,
    peers: &HashMap<NodeId, SocketAddr>,
    tls: PeerTls,
    voters: &[NodeId],
) -> Node {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut tcp = TcpConfig::new(NodeId(id), CLUSTER);
    tcp.peers = peers.clone();
    tcp.tls = Some(tls);
    let transport = TcpTransport::start(tcp, listener);
    let mut config = HostConfig::new(NodeId(id), dir.path());
    config.tick_interval = Duration::from_millis(10);
    let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let host =
        NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current()).expect("host");
    transport.attach(&host);
    host.start_group(GROUP, voters.to_vec(), Box::new(Register::default()))
        .expect("group");
    Node {
        host,
        transport,
        _dir: dir,
    }
}

async fn listeners(count: u64) -> (Vec<TcpListener>, HashMap<NodeId, SocketAddr>) {
    let mut listeners = Vec::new();
    let mut peers = HashMap::new();
    for id in 1..=count {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(NodeId(id), listener.local_addr().expect("address"));
        listeners.push(listener);
    }
    (listeners, peers)
}

/// Three nodes of one CA form a group over mutual TLS and commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_ca_commit_over_mutual_tls() {
    let authority = Authority::new();
    let (listeners, peers) = listeners(3).await;
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut nodes = BTreeMap::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        nodes.insert(
            id,
            start(id, listener, &peers, authority.peer_tls(), &voters),
        );
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let mut found = None;
        for (id, node) in &nodes {
            if node
                .host
                .status(GROUP)
                .await
                .expect("status")
                .soft_state
                .role
                == Role::Leader
            {
                found = Some(*id);
            }
        }
        if let Some(id) = found {
            break id;
        }
        assert!(Instant::now() < deadline, "no leader over TLS");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    nodes[&leader]
        .host
        .propose(GROUP, Bytes::from_static(b"secret"))
        .await
        .expect("commit");
    for node in nodes.values() {
        let deadline = Instant::now() + Duration::from_secs(15);
        while node
            .host
            .read_linearizable(GROUP, Bytes::new())
            .await
            .ok()
            .as_deref()
            != Some(b"secret".as_slice())
        {
            assert!(
                Instant::now() < deadline,
                "node {} never read the value",
                node.host.node_id()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            node.transport
                .stats()
                .handshakes_refused
                .load(Ordering::Relaxed),
            0
        );
    }
    for node in nodes.values() {
        node.transport.shutdown();
        node.host.stop().await;
    }
}

/// A node whose certificate another CA signed, and a client without TLS,
/// are refused at the handshake.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_are_refused() {
    let authority = Authority::new();
    let stranger_authority = Authority::new();
    let (mut listeners, peers) = listeners(2).await;
    let stranger_listener = listeners.pop().expect("listener");
    let member_listener = listeners.pop().expect("listener");
    let voters = vec![NodeId(1), NodeId(2)];
    let member = start(1, member_listener, &peers, authority.peer_tls(), &voters);
    let refused = |node: &Node| {
        node.transport
            .stats()
            .handshakes_refused
            .load(Ordering::Relaxed)
    };
    // First a client without TLS, alone: refused, and its connection
    // closed without an answer.
    let mut plain = TcpStream::connect(peers[&NodeId(1)])
        .await
        .expect("connect");
    let _ = plain.write_all(b"RGRAFTv1 not a TLS client hello").await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), plain.read_to_end(&mut answer))
        .await
        .expect("the member closes the plain connection");
    // Closed (read_to_end returned); at most a TLS alert came back, never
    // the handshake's "accepted" byte (0).
    assert!(
        read.is_err() || answer.first() != Some(&0),
        "the plain client was accepted: {answer:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    while refused(&member) < 1 {
        assert!(
            Instant::now() < deadline,
            "the plain client was not counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after_plain = refused(&member);
    // Then a node whose certificate another CA signed.
    let stranger = start(
        2,
        stranger_listener,
        &peers,
        stranger_authority.peer_tls(),
        &voters,
    );
    while refused(&member) <= after_plain {
        assert!(Instant::now() < deadline, "the stranger was not refused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = member.host.status(GROUP).await.expect("status");
    assert_ne!(
        status.soft_state.role,
        Role::Leader,
        "no quorum can form with a stranger"
    );
    for node in [&member, &stranger] {
        node.transport.shutdown();
        node.host.stop().await;
    }
}
