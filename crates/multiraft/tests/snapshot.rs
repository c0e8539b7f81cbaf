//! Snapshots through the host: the leader compacts its log every N applied
//! entries, so a node that joins later can only catch up through a
//! snapshot copied from the leader's state machine. Over the in-process
//! transport and over TCP (a connection of its own per snapshot).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{
    HostConfig, LocalTransport, NodeHost, PeerAddress, StateMachine, TcpConfig, TcpTransport,
    Transport,
};
use regatta_raft::{ConfChange, LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};
use tokio::net::TcpListener;

const GROUP: GroupId = GroupId(5);

/// A key-value map; commands are `key=value`, queries are keys.
#[derive(Default)]
struct Kv {
    data: Arc<Mutex<BTreeMap<String, String>>>,
    applied: LogIndex,
    restored_at: Arc<Mutex<Option<LogIndex>>>,
    /// Restores to refuse before one succeeds, as a crash would cut them.
    failing_restores: Arc<std::sync::atomic::AtomicUsize>,
    /// How long writing out a snapshot takes, as for a large table.
    snapshot_delay: Duration,
    /// While set, a restore waits (as a large table's install takes
    /// long); `restore_entered` tells that one began.
    restore_held: Arc<std::sync::atomic::AtomicBool>,
    restore_entered: Arc<std::sync::atomic::AtomicBool>,
}

/// A snapshot that takes `delay` to write out.
struct SlowSnapshot {
    bytes: Bytes,
    delay: Duration,
}

impl regatta_multiraft::SnapshotSource for SlowSnapshot {
    fn write_to(self: Box<Self>, out: &mut dyn std::io::Write) -> std::io::Result<()> {
        std::thread::sleep(self.delay);
        out.write_all(&self.bytes)
    }
}

impl StateMachine for Kv {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        let text = String::from_utf8_lossy(command);
        let (key, value) = text.split_once('=').unwrap_or((&text, ""));
        self.data
            .lock()
            .expect("lock")
            .insert(key.to_string(), value.to_string());
        self.applied = index;
        Bytes::new()
    }
    fn read(&self, query: &Bytes) -> Bytes {
        let key = String::from_utf8_lossy(query).to_string();
        Bytes::from(
            self.data
                .lock()
                .expect("lock")
                .get(&key)
                .cloned()
                .unwrap_or_default(),
        )
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }
    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = {
            let data = self.data.lock().expect("lock");
            Bytes::from(
                data.iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join("\n"),
            )
        };
        Box::new(SlowSnapshot {
            bytes,
            delay: self.snapshot_delay,
        })
    }
    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.restore_entered.store(true, Ordering::SeqCst);
        while self.restore_held.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(5));
        }
        let failing = self.failing_restores.load(Ordering::SeqCst);
        if failing > 0 {
            self.failing_restores.store(failing - 1, Ordering::SeqCst);
            return Err(std::io::Error::other("cut short, as by a crash"));
        }
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        let mut map = self.data.lock().expect("lock");
        map.clear();
        for line in String::from_utf8_lossy(data).lines() {
            if let Some((k, v)) = line.split_once('=') {
                map.insert(k.to_string(), v.to_string());
            }
        }
        self.applied = index;
        *self.restored_at.lock().expect("lock") = Some(index);
        Ok(())
    }
}

fn config(id: u64, dir: &std::path::Path) -> HostConfig {
    let mut config = HostConfig::new(NodeId(id), dir);
    config.tick_interval = Duration::from_millis(10);
    config.snapshot_every_entries = 50;
    config.compaction_overhead_entries = 10;
    config
}

/// Appends small enough for the 256 KiB frames of the chunked test.
fn config_large(id: u64, dir: &std::path::Path) -> HostConfig {
    let mut config = config(id, dir);
    config.raft.message_size_bytes_max = 128 * 1024;
    config
}

/// Host `id` on `dir`, reachable over the in-process `transport`.
fn open_in_process(transport: &Arc<LocalTransport>, id: u64, dir: &std::path::Path) -> NodeHost {
    open_in_process_with(transport, config(id, dir))
}

/// A host with `config`, reachable over the in-process `transport`.
fn open_in_process_with(transport: &Arc<LocalTransport>, config: HostConfig) -> NodeHost {
    let id = config.node_id;
    let wal = Arc::new(Wal::open(WalConfig::new(&config.state_dir)).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(transport) as Arc<dyn Transport>;
    let host =
        NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current()).expect("host");
    transport.register(id, &host);
    host
}

async fn leader(hosts: &BTreeMap<u64, NodeHost>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        for (id, host) in hosts {
            if host.status(GROUP).await.expect("status").soft_state.role == Role::Leader {
                return *id;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The value written for `i`: `v{i}` padded with `padding_bytes` dots.
fn value(i: usize, padding_bytes: usize) -> String {
    format!("v{i}{}", ".".repeat(padding_bytes))
}

/// Writes enough to compact, adds node 5 as a learner, and checks that it
/// restored from a snapshot and holds exactly the leader's state.
async fn join_through_snapshot(
    hosts: &BTreeMap<u64, NodeHost>,
    joiner: &NodeHost,
    restored_at: &Arc<Mutex<Option<LogIndex>>>,
    padding_bytes: usize,
) {
    write_compact_and_add(hosts, joiner.node_id(), padding_bytes).await;
    check_joined(joiner, restored_at, padding_bytes).await;
}

/// Writes 200 entries over 7 keys, waits for the leader to compact them,
/// and adds `joiner` as a learner: it can only catch up by a snapshot.
async fn write_compact_and_add(
    hosts: &BTreeMap<u64, NodeHost>,
    joiner: NodeId,
    padding_bytes: usize,
) {
    let leader = leader(hosts).await;
    for i in 0..200 {
        hosts[&leader]
            .propose(
                GROUP,
                Bytes::from(format!("k{}={}", i % 7, value(i, padding_bytes))),
            )
            .await
            .expect("commit");
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while hosts[&leader]
        .status(GROUP)
        .await
        .expect("status")
        .first_index
        <= LogIndex(100)
    {
        assert!(Instant::now() < deadline, "the leader never compacted");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let change = ConfChange::AddLearner {
        node: joiner,
        auto_promote: false,
    };
    hosts[&leader]
        .change_membership(GROUP, change)
        .await
        .expect("learner added");
}

/// `joiner` restored a snapshot and holds exactly the leader's state.
async fn check_joined(
    joiner: &NodeHost,
    restored_at: &Arc<Mutex<Option<LogIndex>>>,
    padding_bytes: usize,
) {
    let deadline = Instant::now() + Duration::from_secs(15);
    for key in 0..7 {
        let expected = (0..200)
            .filter(|i| i % 7 == key)
            .max()
            .map(|i| value(i, padding_bytes))
            .unwrap_or_default();
        loop {
            let value = joiner
                .read_stale(GROUP, Bytes::from(format!("k{key}")))
                .await
                .expect("read");
            if value == expected.as_bytes() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "k{key} never reached v{}… on the new node",
                expected.trim_end_matches('.')
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    let restored = *restored_at.lock().expect("lock");
    assert!(
        restored.is_some_and(|index| index > LogIndex(100)),
        "the new node did not restore a snapshot: {restored:?}"
    );
}

/// Hosts 1 to 3 bootstrapping `GROUP` in process, and host 5 with no
/// group members yet (to join later): every state machine takes
/// `snapshot_delay` to write a snapshot; `restored_at` is the joiner's.
fn start_voters_and_joiner(
    transport: &Arc<LocalTransport>,
    dirs: &[tempfile::TempDir],
    snapshot_delay: Duration,
) -> (
    BTreeMap<u64, NodeHost>,
    NodeHost,
    Arc<Mutex<Option<LogIndex>>>,
) {
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let start = |id: u64,
                 dir: &std::path::Path,
                 voters: &[NodeId],
                 restored_at: Arc<Mutex<Option<LogIndex>>>| {
        let host = open_in_process(transport, id, dir);
        let machine = Kv {
            restored_at,
            snapshot_delay,
            ..Kv::default()
        };
        host.start_group(GROUP, voters.to_vec(), Box::new(machine))
            .expect("group");
        host
    };
    let hosts = (1..=3u64)
        .map(|id| {
            let host = start(id, dirs[id as usize - 1].path(), &voters, Arc::default());
            (id, host)
        })
        .collect();
    let restored_at: Arc<Mutex<Option<LogIndex>>> = Arc::default();
    let joiner = start(5, dirs[3].path(), &[], Arc::clone(&restored_at));
    (hosts, joiner, restored_at)
}

/// A snapshot that takes longer to write than the leader takes to compact
/// past it, under steady writes, still reaches the new node: compaction
/// holds at the snapshot's index until the transfer is reported. Before,
/// the leader looked up the snapshot's term after writing it, found it
/// compacted away, and started over, for as long as the writes went on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_snapshot_lands_while_writes_go_on() {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let (hosts, joiner, restored_at) =
        start_voters_and_joiner(&transport, &dirs, Duration::from_millis(400));
    write_compact_and_add(&hosts, joiner.node_id(), 0).await;

    // Writes go on, far faster than one compaction interval (50 entries)
    // per snapshot write (0.4 s).
    let leader = hosts[&leader(&hosts).await].clone();
    let writing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let writers: Vec<_> = (0..4)
        .map(|writer| {
            let writing = Arc::clone(&writing);
            let leader = leader.clone();
            tokio::spawn(async move {
                let mut written = 0u64;
                while writing.load(Ordering::Relaxed) {
                    let _ = leader
                        .propose(GROUP, Bytes::from(format!("w{writer}={written}")))
                        .await;
                    written += 1;
                }
                written
            })
        })
        .collect();
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(20);
    while restored_at.lock().expect("lock").is_none() {
        assert!(
            Instant::now() < deadline,
            "no snapshot landed while writes went on"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    writing.store(false, Ordering::Relaxed);
    let mut written = 0;
    for writer in writers {
        written += writer.await.expect("writer");
    }
    // More than a compaction interval (50 entries) per snapshot write
    // (0.4 s): enough to compact past every attempt without the hold.
    let per_second = written as f64 / started.elapsed().as_secs_f64();
    assert!(
        per_second > 150.0,
        "too few writes to outrun compaction: {per_second:.0}/s"
    );
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}

/// A snapshot install runs beside the apply thread, not on it: while one
/// group's install is held up (as a large table's would be), another
/// group sharing the apply thread (one worker) still applies and answers
/// its proposals. Before, the install ran on the apply thread and every
/// group of the node waited for it, leaders' writes included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_install_does_not_hold_up_other_groups_applies() {
    const OTHER: GroupId = GroupId(6);
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let hosts: BTreeMap<u64, NodeHost> = (1..=3u64)
        .map(|id| {
            let host = open_in_process(&transport, id, dirs[id as usize - 1].path());
            host.start_group(GROUP, voters.clone(), Box::new(Kv::default()))
                .expect("group");
            (id, host)
        })
        .collect();
    let mut joiner_config = config(5, dirs[3].path());
    joiner_config.workers = 1;
    let joiner = open_in_process_with(&transport, joiner_config);
    let held = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let restored_at: Arc<Mutex<Option<LogIndex>>> = Arc::default();
    let machine = Kv {
        restored_at: Arc::clone(&restored_at),
        restore_held: Arc::clone(&held),
        restore_entered: Arc::clone(&entered),
        ..Kv::default()
    };
    joiner
        .start_group(GROUP, Vec::new(), Box::new(machine))
        .expect("group");
    // A group of its own, on the same worker and apply thread.
    joiner
        .start_group(OTHER, vec![NodeId(5)], Box::new(Kv::default()))
        .expect("other group");
    let deadline = Instant::now() + Duration::from_secs(10);
    while joiner.propose(OTHER, Bytes::from("o=0")).await.is_err() {
        assert!(Instant::now() < deadline, "the other group never elected");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    write_compact_and_add(&hosts, joiner.node_id(), 0).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while !entered.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the joiner never began its install"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for i in 1..=20 {
        let write = joiner.propose(OTHER, Bytes::from(format!("o={i}")));
        tokio::time::timeout(Duration::from_secs(5), write)
            .await
            .expect("a write of the other group waited for the held install")
            .expect("the other group's write applied");
    }
    assert_eq!(
        joiner
            .read_stale(OTHER, Bytes::from("o"))
            .await
            .expect("read"),
        Bytes::from("20")
    );
    assert!(
        restored_at.lock().expect("lock").is_none(),
        "the install finished while held"
    );

    held.store(false, Ordering::SeqCst);
    check_joined(&joiner, &restored_at, 0).await;
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_node_catches_up_through_a_snapshot_in_process() {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let (hosts, joiner, restored_at) = start_voters_and_joiner(&transport, &dirs, Duration::ZERO);
    join_through_snapshot(&hosts, &joiner, &restored_at, 0).await;
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
/// Over TCP, with values large enough that the snapshot (7 × 64 KiB) is
/// larger than a frame (256 KiB): it must travel in chunks, here of 16 KiB,
/// paced at 20 MB/s.
async fn a_new_node_catches_up_through_a_chunked_snapshot_over_tcp() {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let mut listeners = Vec::new();
    let mut peers: HashMap<NodeId, SocketAddr> = HashMap::new();
    for id in [1u64, 2, 3, 5] {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        peers.insert(NodeId(id), listener.local_addr().expect("address"));
        listeners.push((id, listener));
    }
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut hosts = BTreeMap::new();
    let mut transports = Vec::new();
    let restored_at: Arc<Mutex<Option<LogIndex>>> = Arc::default();
    let mut joiner = None;
    for (position, (id, listener)) in listeners.into_iter().enumerate() {
        let mut tcp = TcpConfig::new(NodeId(id), 9);
        tcp.peers = peers
            .iter()
            .map(|(id, a)| (*id, PeerAddress::from(*a)))
            .collect();
        tcp.frame_bytes_max = 256 * 1024;
        tcp.snapshot_chunk_bytes = 16 * 1024;
        tcp.snapshot_bytes_per_second_max = Some(20_000_000);
        let transport = TcpTransport::start(tcp, listener);
        let wal = Arc::new(Wal::open(WalConfig::new(dirs[position].path())).expect("wal"));
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let host = NodeHost::new(
            config_large(id, dirs[position].path()),
            wal,
            as_transport,
            tokio::runtime::Handle::current(),
        )
        .expect("host");
        transport.attach(&host);
        transports.push(transport);
        if id == 5 {
            let machine = Kv {
                restored_at: Arc::clone(&restored_at),
                ..Kv::default()
            };
            host.start_group(GROUP, Vec::new(), Box::new(machine))
                .expect("group");
            joiner = Some(host);
        } else {
            host.start_group(GROUP, voters.clone(), Box::new(Kv::default()))
                .expect("group");
            hosts.insert(id, host);
        }
    }
    let joiner = joiner.expect("node 5");
    join_through_snapshot(&hosts, &joiner, &restored_at, 64 * 1024).await;
    let chunks: u64 = transports
        .iter()
        .map(|t| t.stats().snapshot_chunks_sent.load(Ordering::Relaxed))
        .sum();
    let received: u64 = transports
        .iter()
        .map(|t| t.stats().snapshots_received.load(Ordering::Relaxed))
        .sum();
    assert!(chunks >= 28, "7 × 64 KiB in 16 KiB chunks, sent {chunks}");
    assert!(received >= 1, "received {received}");
    // Snapshot data is transient: sent and received files are deleted once
    // streamed and installed.
    let deadline = Instant::now() + Duration::from_secs(10);
    for dir in &dirs {
        let snapshots = dir.path().join("snapshots");
        while std::fs::read_dir(&snapshots).expect("list").count() > 0 {
            assert!(
                Instant::now() < deadline,
                "snapshot files left in {}",
                snapshots.display()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    for transport in &transports {
        transport.shutdown();
    }
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}

/// Four directories, and nodes 1 to 3 on the first three over one
/// in-process transport, bootstrapping `GROUP` with a fresh `Kv` each.
fn three_voters_and_a_spare_dir() -> (
    Vec<tempfile::TempDir>,
    Arc<LocalTransport>,
    BTreeMap<u64, NodeHost>,
) {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut hosts = BTreeMap::new();
    for id in 1..=3u64 {
        let host = open_in_process(&transport, id, dirs[id as usize - 1].path());
        host.start_group(GROUP, voters.clone(), Box::new(Kv::default()))
            .expect("group");
        hosts.insert(id, host);
    }
    (dirs, transport, hosts)
}

/// Install copies left in a host's snapshot directory.
fn install_copies(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir.join("snapshots"))
        .expect("list")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.starts_with("install-"))
        })
        .collect()
}

/// A crash after the WAL recorded a snapshot's install and before the state
/// machine restored it (here the restore fails instead, which leaves the
/// same state on disk): the log starts past the state machine. A restart
/// without the kept copy is refused with a clear error; with it, the
/// install finishes and the node catches up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_cut_after_the_wal_finishes_on_restart() {
    let (dirs, transport, hosts) = three_voters_and_a_spare_dir();
    let open = |id: u64, dir: &std::path::Path| open_in_process(&transport, id, dir);
    let joiner_dir = dirs[3].path();
    let joiner = open(5, joiner_dir);
    let cut = Kv {
        failing_restores: Arc::new(std::sync::atomic::AtomicUsize::new(1)),
        ..Kv::default()
    };
    joiner
        .start_group(GROUP, Vec::new(), Box::new(cut))
        .expect("group");
    write_compact_and_add(&hosts, NodeId(5), 0).await;
    // The restore fails after the WAL recorded the install: the group
    // stops on node 5 and the copy stays.
    let deadline = Instant::now() + Duration::from_secs(15);
    while joiner.status(GROUP).await.is_ok() || install_copies(joiner_dir).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the cut install never stopped the group with its copy kept"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    joiner.stop().await;
    drop(joiner);
    let copies = install_copies(joiner_dir);
    assert_eq!(copies.len(), 1, "one kept copy: {copies:?}");

    // Without the copy, the replica refuses to start.
    let aside = joiner_dir.join("install-copy-aside");
    std::fs::rename(&copies[0], &aside).expect("move the copy aside");
    let joiner = open(5, joiner_dir);
    let refused = joiner
        .start_group(GROUP, Vec::new(), Box::new(Kv::default()))
        .expect_err("a log past the state machine with no copy must be refused");
    assert!(
        refused
            .to_string()
            .contains("no copy of that snapshot is kept"),
        "{refused}"
    );
    joiner.stop().await;
    drop(joiner);

    // With it (and a stale copy of a later index, which goes), the install
    // finishes before Raft starts.
    std::fs::rename(&aside, &copies[0]).expect("put the copy back");
    std::fs::write(
        joiner_dir
            .join("snapshots")
            .join(format!("install-{}-999999.data", GROUP.0)),
        b"stale",
    )
    .expect("stale copy");
    let joiner = open(5, joiner_dir);
    let restored_at: Arc<Mutex<Option<LogIndex>>> = Arc::default();
    let machine = Kv {
        restored_at: Arc::clone(&restored_at),
        ..Kv::default()
    };
    joiner
        .start_group(GROUP, Vec::new(), Box::new(machine))
        .expect("the install finishes at start");
    assert!(
        restored_at.lock().expect("lock").is_some(),
        "restored before Raft started"
    );
    assert!(install_copies(joiner_dir).is_empty(), "the copies are gone");
    check_joined(&joiner, &restored_at, 0).await;
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}

/// A crash inside an install, after the session table's save could have
/// happened and before it did: here the save fails (a file stands where
/// the session store's directory for the group goes), and the state
/// machine keeps whatever the install gave it across the restart, as a
/// durable one would. A request id applied before the snapshot must still
/// be known on the joiner afterwards: its retry is a duplicate on every
/// replica, the joiner included. (With the restore before the save, the
/// joiner restarted at the snapshot with no session table, deleted the
/// copy, and applied the retry again.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_install_cut_before_its_session_table_keeps_request_ids() {
    let (dirs, transport, hosts) = three_voters_and_a_spare_dir();
    let open = |id: u64, dir: &std::path::Path| open_in_process(&transport, id, dir);
    let first_leader = leader(&hosts).await;
    let id = regatta_raft::RequestId {
        client: 7,
        sequence: 1,
    };
    hosts[&first_leader]
        .propose_with_id(GROUP, id, Bytes::from_static(b"dup=first"))
        .await
        .expect("the request applies once");

    let joiner_dir = dirs[3].path();
    let data: Arc<Mutex<BTreeMap<String, String>>> = Arc::default();
    let restored_at: Arc<Mutex<Option<LogIndex>>> = Arc::default();
    let machine = Kv {
        data: Arc::clone(&data),
        restored_at: Arc::clone(&restored_at),
        ..Kv::default()
    };
    let joiner = open(5, joiner_dir);
    joiner
        .start_group(GROUP, Vec::new(), Box::new(machine))
        .expect("group");
    // From now on the session store cannot make the group's directory.
    let blocker = joiner_dir.join("sessions").join(GROUP.0.to_string());
    assert!(!blocker.exists(), "an empty joiner saved no session table");
    std::fs::write(&blocker, b"not a directory").expect("blocker");
    write_compact_and_add(&hosts, NodeId(5), 0).await;
    let deadline = Instant::now() + Duration::from_secs(15);
    while joiner.status(GROUP).await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "the install never failed on the blocked session store"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    joiner.stop().await;
    drop(joiner);

    // Restart with the store unblocked and the state machine as the cut
    // install left it (restored or not).
    std::fs::remove_file(&blocker).expect("unblock");
    let kept = *restored_at.lock().expect("lock");
    let machine = Kv {
        data: Arc::clone(&data),
        applied: kept.unwrap_or(LogIndex(0)),
        restored_at: Arc::clone(&restored_at),
        ..Kv::default()
    };
    let joiner = open(5, joiner_dir);
    joiner
        .start_group(GROUP, Vec::new(), Box::new(machine))
        .expect("the install finishes at start");
    check_joined(&joiner, &restored_at, 0).await;

    // The retry is a duplicate everywhere: "dup" keeps its later value.
    let leader = leader(&hosts).await;
    hosts[&leader]
        .propose(GROUP, Bytes::from_static(b"dup=second"))
        .await
        .expect("commit");
    let retried = hosts[&leader]
        .propose_with_id(GROUP, id, Bytes::from_static(b"dup=first"))
        .await;
    assert!(
        retried.is_ok(),
        "the retry gets the first result: {retried:?}"
    );
    let target = hosts[&leader]
        .status(GROUP)
        .await
        .expect("status")
        .hard_state
        .commit;
    let deadline = Instant::now() + Duration::from_secs(15);
    while joiner.status(GROUP).await.expect("status").applied < target {
        assert!(
            Instant::now() < deadline,
            "the joiner never applied the retry"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let value = joiner
        .read_stale(GROUP, Bytes::from_static(b"dup"))
        .await
        .expect("read");
    assert_eq!(
        value,
        Bytes::from_static(b"second"),
        "the joiner applied a request id it should have known"
    );
    for host in hosts.values().chain([&joiner]) {
        host.stop().await;
    }
}
