//! The peer transport over TLS with mutual authentication, on loopback:
//! nodes with certificates from the cluster CA form a group and commit; a
//! node whose certificate comes from another CA, and a client without TLS,
//! are refused. Peers dialled by host name must show a certificate that
//! names that host.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rcgen::{BasicConstraints, Certificate, CertificateParams, IsCa, KeyPair};
use regatta_multiraft::tls::{Identity, Pem};
use regatta_multiraft::{
    HostConfig, NodeHost, PeerAddress, PeerTls, StateMachine, TcpConfig, TcpTransport, Transport,
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

    /// A certificate naming `names` (DNS names), checked against the host
    /// each peer is dialled on (no server-name override).
    fn peer_tls_naming(&self, names: &[&str]) -> PeerTls {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let params = CertificateParams::new(names).expect("params");
        let key = KeyPair::generate().expect("key");
        let certificate = params
            .signed_by(&key, &self.certificate, &self.key)
            .expect("sign");
        PeerTls::new(
            Identity {
                certificate_chain: Pem::Inline(certificate.pem().into_bytes()),
                key: Pem::Inline(key.serialize_pem().into_bytes()),
            },
            Pem::Inline(self.certificate.pem().into_bytes()),
            Vec::new(),
            None,
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
    peers: &HashMap<NodeId, PeerAddress>,
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

/// The peers at their IP addresses.
fn by_ip(peers: &HashMap<NodeId, SocketAddr>) -> HashMap<NodeId, PeerAddress> {
    peers
        .iter()
        .map(|(id, address)| (*id, PeerAddress::from(*address)))
        .collect()
}

/// The peers as `localhost:<port>`: dialled by name, resolved on every
/// connection attempt (to ::1 first on some systems, where nothing
/// listens, so the next address is tried).
fn by_name(peers: &HashMap<NodeId, SocketAddr>) -> HashMap<NodeId, PeerAddress> {
    peers
        .iter()
        .map(|(id, address)| {
            let name = format!("localhost:{}", address.port());
            (*id, name.parse().expect("peer address"))
        })
        .collect()
}

/// Waits for a leader among `nodes`, commits a value through it and reads
/// it back linearizably on every node.
async fn commit_and_read_everywhere(nodes: &BTreeMap<u64, Node>) {
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let mut found = None;
        for (id, node) in nodes {
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
}

/// Three nodes of one CA form a group over mutual TLS and commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_of_one_ca_commit_over_mutual_tls() {
    let authority = Authority::new();
    let (listeners, peers) = listeners(3).await;
    let peers = by_ip(&peers);
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut nodes = BTreeMap::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        nodes.insert(
            id,
            start(id, listener, &peers, authority.peer_tls(), &voters),
        );
    }
    commit_and_read_everywhere(&nodes).await;
    for node in nodes.values() {
        node.transport.shutdown();
        node.host.stop().await;
    }
}

/// Peers dialled by host name, with certificates that name that host and
/// no server-name override, commit: the name dialled is the name checked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_dialled_by_name_are_checked_against_that_name() {
    let authority = Authority::new();
    let (listeners, peers) = listeners(3).await;
    let peers = by_name(&peers);
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut nodes = BTreeMap::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        let tls = authority.peer_tls_naming(&["localhost"]);
        nodes.insert(id, start(id, listener, &peers, tls, &voters));
    }
    commit_and_read_everywhere(&nodes).await;
    for node in nodes.values() {
        assert_eq!(
            node.transport
                .stats()
                .connection_failures
                .load(Ordering::Relaxed),
            0,
            "node {} failed to dial a peer by name",
            node.host.node_id()
        );
    }
    for node in nodes.values() {
        node.transport.shutdown();
        node.host.stop().await;
    }
}

/// A peer dialled by host name whose certificate names another host is
/// refused by the dialling side, even though one CA signed both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_certificate_names_another_host_is_refused() {
    let authority = Authority::new();
    let (listeners, peers) = listeners(2).await;
    let peers = by_name(&peers);
    let voters = vec![NodeId(1), NodeId(2)];
    let mut nodes = Vec::new();
    for (position, listener) in listeners.into_iter().enumerate() {
        let id = position as u64 + 1;
        let tls = authority.peer_tls_naming(&["node.example"]);
        nodes.push(start(id, listener, &peers, tls, &voters));
    }
    let failures = |node: &Node| {
        node.transport
            .stats()
            .connection_failures
            .load(Ordering::Relaxed)
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    while nodes.iter().any(|node| failures(node) < 3) {
        assert!(
            Instant::now() < deadline,
            "the mismatched names were never refused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The dials reached TLS: each side's server saw handshakes fail (the
    // dialling side refused the certificate), not a resolver or connect
    // error.
    while nodes.iter().any(|node| {
        node.transport
            .stats()
            .handshakes_refused
            .load(Ordering::Relaxed)
            == 0
    }) {
        assert!(
            Instant::now() < deadline,
            "no TLS handshake was ever attempted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for node in &nodes {
        let status = node.host.status(GROUP).await.expect("status");
        assert_ne!(status.soft_state.role, Role::Leader, "no link, no quorum");
        assert_eq!(
            node.transport.stats().messages_sent.load(Ordering::Relaxed),
            0,
            "a message left over a refused link"
        );
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
    let (mut listeners, ip_peers) = listeners(2).await;
    let peers = by_ip(&ip_peers);
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
    let mut plain = TcpStream::connect(ip_peers[&NodeId(1)])
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
