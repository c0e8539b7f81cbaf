//! A partition through fault-injecting TCP proxies: every ordered pair of
//! nodes talks through its own proxy, so any link can be cut. The leader is
//! isolated; the others elect a new leader and commit; the partition heals
//! and the old leader steps down and converges.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{HostConfig, NodeHost, StateMachine, TcpConfig, TcpTransport, Transport};
use regatta_raft::{LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::net::{TcpListener, TcpStream};

const GROUP: GroupId = GroupId(1);

/// Forwards one link; when cut, drops its connections and refuses new ones.
struct Proxy {
    address: SocketAddr,
    cut: Arc<AtomicBool>,
    connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Proxy {
    async fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        let cut = Arc::new(AtomicBool::new(false));
        let connections: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (accept_cut, accept_connections) = (Arc::clone(&cut), Arc::clone(&connections));
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if accept_cut.load(Ordering::SeqCst) {
                    continue; // Dropped: the link is down.
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                accept_connections
                    .lock()
                    .expect("lock")
                    .push(task.abort_handle());
            }
        });
        Proxy {
            address,
            cut,
            connections,
        }
    }

    fn set_cut(&self, cut: bool) {
        self.cut.store(cut, Ordering::SeqCst);
        if cut {
            for connection in self.connections.lock().expect("lock").drain(..) {
                connection.abort();
            }
        }
    }
}

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

async fn leader_among(hosts: &BTreeMap<u64, NodeHost>, among: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for id in among {
            if hosts[id]
                .status(GROUP)
                .await
                .expect("status")
                .soft_state
                .role
                == Role::Leader
            {
                return *id;
            }
        }
        assert!(Instant::now() < deadline, "no leader among {among:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn read_until(host: &NodeHost, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while host
        .read_linearizable(GROUP, Bytes::new())
        .await
        .ok()
        .as_deref()
        != Some(expected.as_bytes())
    {
        assert!(
            Instant::now() < deadline,
            "node {} never read {expected}",
            host.node_id()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_leader_is_replaced_and_rejoins() {
    let ids = [1u64, 2, 3];
    let mut listeners = HashMap::new();
    let mut real = HashMap::new();
    for id in ids {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        real.insert(id, listener.local_addr().expect("address"));
        listeners.insert(id, listener);
    }
    // proxies[(from, to)] carries from's connections to to.
    let mut proxies: HashMap<(u64, u64), Proxy> = HashMap::new();
    for from in ids {
        for to in ids.iter().copied().filter(|to| *to != from) {
            proxies.insert((from, to), Proxy::start(real[&to]).await);
        }
    }
    let dirs: Vec<tempfile::TempDir> = ids
        .iter()
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let voters: Vec<NodeId> = ids.iter().copied().map(NodeId).collect();
    let mut hosts = BTreeMap::new();
    let mut transports = Vec::new();
    for id in ids {
        let mut tcp = TcpConfig::new(NodeId(id), 3);
        tcp.peers = ids
            .iter()
            .filter(|to| **to != id)
            .map(|to| (NodeId(*to), proxies[&(id, *to)].address.into()))
            .collect();
        let transport = TcpTransport::start(tcp, listeners.remove(&id).expect("listener"));
        let mut config = HostConfig::new(NodeId(id), dirs[id as usize - 1].path());
        config.tick_interval = Duration::from_millis(10);
        // The isolated node's reads must fail, not wait for ever.
        config.request_timeout = Duration::from_secs(2);
        let wal = Arc::new(Wal::open(WalConfig::new(dirs[id as usize - 1].path())).expect("wal"));
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let host = NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current())
            .expect("host");
        transport.attach(&host);
        host.start_group(GROUP, voters.clone(), Box::new(Register::default()))
            .expect("group");
        hosts.insert(id, host);
        transports.push(transport);
    }
    let old_leader = leader_among(&hosts, &ids).await;
    hosts[&old_leader]
        .propose(GROUP, Bytes::from_static(b"before"))
        .await
        .expect("commit");

    // Isolate the leader: cut every link to and from it.
    for ((from, to), proxy) in &proxies {
        if *from == old_leader || *to == old_leader {
            proxy.set_cut(true);
        }
    }
    let others: Vec<u64> = ids.iter().copied().filter(|id| *id != old_leader).collect();
    // A read a follower forwards to the lost leader is answered when its
    // link to the leader fails, or when the leader changes (its caller
    // retries then), not after the timeout.
    let follower = hosts[&others[0]].clone();
    let stranded =
        tokio::spawn(async move { follower.read_linearizable(GROUP, Bytes::new()).await });
    let new_leader = leader_among(&hosts, &others).await;
    match stranded.await.expect("join") {
        Err(regatta_multiraft::Error::NotLeader { .. }) => {}
        Err(regatta_multiraft::Error::Unsent { peer, .. }) => {
            assert_eq!(peer, NodeId(old_leader))
        }
        Err(regatta_multiraft::Error::Raft {
            source: regatta_raft::Error::NotLeader { .. },
            ..
        }) => {}
        other => panic!("the stranded read ended with {other:?}, not NotLeader"),
    }
    hosts[&new_leader]
        .propose(GROUP, Bytes::from_static(b"during"))
        .await
        .expect("the majority commits");
    // Cut off from every peer, the old leader can confirm no read: it
    // answers an error (not the stale "before", which a leader serving
    // reads without a quorum would).
    let isolated_read = tokio::time::timeout(
        Duration::from_secs(30),
        hosts[&old_leader].read_linearizable(GROUP, Bytes::new()),
    )
    .await
    .expect("the isolated node answers within its request timeout");
    assert!(
        isolated_read.is_err(),
        "the isolated node served a linearizable read: {isolated_read:?}"
    );

    // Heal: the old leader steps down and catches up.
    for proxy in proxies.values() {
        proxy.set_cut(false);
    }
    read_until(&hosts[&old_leader], "during").await;
    let status = hosts[&old_leader].status(GROUP).await.expect("status");
    assert_ne!(
        status.soft_state.role,
        Role::Leader,
        "two leaders after healing"
    );
    for transport in &transports {
        transport.shutdown();
    }
    for host in hosts.values() {
        host.stop().await;
    }
}
