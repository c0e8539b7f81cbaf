//! De-duplication of retried proposals by request id
//! (`docs/decisions/0002-proposal-deduplication.md`): a counter state
//! machine counts every application, so a request applied twice shows as a
//! count too high. Its state lives outside the host, as a durable state
//! machine's would, so it survives a host's restart.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{
    Error, HostConfig, LocalTransport, NodeHost, StateMachine, Transport, UnsentCause,
};
use regatta_raft::{ConfChange, LogIndex, NodeId, RequestId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};

const GROUP: GroupId = GroupId(3);

/// What a durable state machine keeps on disk: the count and its index.
#[derive(Default)]
struct Durable {
    count: u64,
    applied: LogIndex,
    restores: u64,
}

/// Every command adds one; its result is the count after it.
struct Counter {
    state: Arc<Mutex<Durable>>,
}

impl StateMachine for Counter {
    fn apply(&mut self, index: LogIndex, _command: &Bytes) -> Bytes {
        let mut state = self.state.lock().expect("lock");
        state.count += 1;
        state.applied = index;
        Bytes::from(state.count.to_string())
    }

    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::from(self.state.lock().expect("lock").count.to_string())
    }

    fn applied_index(&self) -> LogIndex {
        self.state.lock().expect("lock").applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::from(self.state.lock().expect("lock").count.to_string()) };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        let mut state = self.state.lock().expect("lock");
        state.count = String::from_utf8_lossy(data).parse().expect("a count");
        state.applied = index;
        state.restores += 1;
        Ok(())
    }
}

struct Cluster {
    dirs: Vec<tempfile::TempDir>,
    states: Vec<Arc<Mutex<Durable>>>,
    transport: Arc<LocalTransport>,
    hosts: BTreeMap<u64, NodeHost>,
    tune: fn(&mut HostConfig),
}

impl Cluster {
    /// `voters` nodes bootstrapping `GROUP`, and room for `spare` more.
    fn start(voters: u64, spare: u64, tune: fn(&mut HostConfig)) -> Cluster {
        let nodes = voters + spare;
        let mut cluster = Cluster {
            dirs: (0..nodes)
                .map(|_| tempfile::tempdir().expect("tempdir"))
                .collect(),
            states: (0..nodes).map(|_| Arc::default()).collect(),
            transport: LocalTransport::new(),
            hosts: BTreeMap::new(),
            tune,
        };
        let members: Vec<NodeId> = (1..=voters).map(NodeId).collect();
        for id in 1..=voters {
            cluster.start_node(id, &members);
        }
        cluster
    }

    fn start_node(&mut self, id: u64, voters: &[NodeId]) {
        let position = id as usize - 1;
        let host = start_host(
            self.dirs[position].path(),
            id,
            &self.transport,
            voters,
            Arc::clone(&self.states[position]),
            self.tune,
        );
        self.hosts.insert(id, host);
    }

    async fn stop_node(&mut self, id: u64) {
        if let Some(host) = self.hosts.remove(&id) {
            self.transport.unregister(NodeId(id));
            host.stop().await;
        }
    }

    fn count(&self, id: u64) -> u64 {
        self.states[id as usize - 1].lock().expect("lock").count
    }

    async fn leader(&self) -> u64 {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            for (id, host) in &self.hosts {
                let status = host.status(GROUP).await.expect("status");
                if status.soft_state.role == Role::Leader {
                    return *id;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no leader within 10 s");
    }

    /// Waits until every running node has applied exactly `count`.
    async fn converge(&self, count: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let counts: Vec<u64> = self.hosts.keys().map(|id| self.count(*id)).collect();
            if counts.iter().all(|c| *c == count) {
                return;
            }
            assert!(
                counts.iter().all(|c| *c <= count),
                "a request was applied twice: counts {counts:?}, expected {count}"
            );
            assert!(
                Instant::now() < deadline,
                "counts {counts:?} never reached {count}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Applies one request (`id(1, 1)`) on every node; returns the leader
    /// and a follower.
    async fn one_write_applied_everywhere(&self) -> (u64, u64) {
        let leader = self.leader().await;
        let follower = (1..=3).find(|id| *id != leader).expect("a follower");
        assert_eq!(propose_on_leader(self, id(1, 1)).await.expect("first"), "1");
        self.converge(1).await;
        (leader, follower)
    }

    async fn stop(self) {
        for host in self.hosts.values() {
            host.stop().await;
        }
    }
}

fn start_host(
    dir: &Path,
    id: u64,
    transport: &Arc<LocalTransport>,
    voters: &[NodeId],
    state: Arc<Mutex<Durable>>,
    tune: fn(&mut HostConfig),
) -> NodeHost {
    let mut config = HostConfig::new(NodeId(id), dir);
    config.tick_interval = Duration::from_millis(5);
    tune(&mut config);
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let handle: Arc<dyn Transport> = Arc::clone(transport) as Arc<dyn Transport>;
    let host = NodeHost::new(config, wal, handle, tokio::runtime::Handle::current()).expect("host");
    host.start_group(GROUP, voters.to_vec(), Box::new(Counter { state }))
        .expect("group");
    transport.register(NodeId(id), &host);
    host
}

fn id(client: u64, sequence: u64) -> RequestId {
    RequestId { client, sequence }
}

async fn propose(host: &NodeHost, request: RequestId) -> Result<String, Error> {
    host.propose_with_id(GROUP, request, Bytes::from_static(b"+1"))
        .await
        .map(|result| String::from_utf8_lossy(&result).to_string())
}

/// Proposes on the leader, retrying through elections.
async fn propose_on_leader(cluster: &Cluster, request: RequestId) -> Result<String, Error> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let leader = cluster.leader().await;
        match propose(&cluster.hosts[&leader], request).await {
            Err(Error::NotLeader { .. } | Error::Dropped(_) | Error::OutcomeUnknown(_))
                if Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => return other,
        }
    }
}

fn no_tuning(_: &mut HostConfig) {}

/// Concurrent copies of one request, a copy whose caller gave up, and
/// copies sent through followers: each request is applied once, and every
/// copy gets the first application's result.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_request_is_applied_once_and_answered_with_its_result() {
    let cluster = Cluster::start(3, 0, no_tuning);
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let (first, second, forwarded) = tokio::join!(
        propose(&cluster.hosts[&leader], id(1, 1)),
        propose(&cluster.hosts[&leader], id(1, 1)),
        propose(&cluster.hosts[&follower], id(1, 1)),
    );
    assert_eq!(first.expect("first"), "1");
    assert_eq!(second.expect("second copy"), "1");
    assert_eq!(forwarded.expect("copy through a follower"), "1");
    cluster.converge(1).await;

    // The caller gives up before the answer: its request is queued by the
    // first poll, then its future is dropped.
    {
        let mut abandoned = Box::pin(propose(&cluster.hosts[&leader], id(2, 1)));
        let mut context = std::task::Context::from_waker(std::task::Waker::noop());
        assert!(abandoned.as_mut().poll(&mut context).is_pending());
    }
    cluster.converge(2).await;
    assert_eq!(
        propose(&cluster.hosts[&follower], id(2, 1))
            .await
            .expect("retry"),
        "2",
        "the retry gets the result of the lost answer"
    );

    assert_eq!(
        propose(&cluster.hosts[&leader], id(1, 2))
            .await
            .expect("next"),
        "3"
    );
    match propose(&cluster.hosts[&leader], id(1, 1)).await {
        Err(Error::StaleRequest {
            client: 1,
            sequence: 1,
            last: 2,
            ..
        }) => {}
        other => panic!("an older request must be refused as stale: {other:?}"),
    }
    assert!(matches!(
        propose(&cluster.hosts[&leader], id(0, 1)).await,
        Err(Error::Raft { .. })
    ));
    cluster.converge(3).await;
    cluster.stop().await;
}

fn compact_often(config: &mut HostConfig) {
    config.snapshot_every_entries = 20;
    config.compaction_overhead_entries = 5;
}

/// Retries across a leader change, then across a restart of every node
/// with compactions in between, still apply once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_across_a_leader_change_and_a_full_restart_apply_once() {
    let mut cluster = Cluster::start(3, 0, compact_often);
    assert_eq!(
        propose_on_leader(&cluster, id(2, 1)).await.expect("c2"),
        "1"
    );
    for sequence in 1..=60 {
        let expected = (sequence + 1).to_string();
        assert_eq!(
            propose_on_leader(&cluster, id(1, sequence))
                .await
                .expect("c1"),
            expected
        );
    }
    cluster.converge(61).await;

    let leader = cluster.leader().await;
    let target = (1..=3).find(|id| *id != leader).expect("another node");
    cluster.hosts[&leader]
        .transfer_leader(GROUP, NodeId(target))
        .await
        .expect("transfer");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.leader().await == leader {
        assert!(Instant::now() < deadline, "leadership never moved");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        propose_on_leader(&cluster, id(1, 60)).await.expect("retry"),
        "61",
        "the new leader answers a retry with the old leader's result"
    );
    cluster.converge(61).await;

    for id in 1..=3 {
        cluster.stop_node(id).await;
    }
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    for id in 1..=3 {
        cluster.start_node(id, &voters);
    }
    let first_index = cluster.hosts[&1]
        .status(GROUP)
        .await
        .expect("status")
        .first_index;
    assert!(
        first_index > LogIndex(2),
        "the log was compacted past client 2's request: {first_index:?}"
    );
    // Client 2's request is below the compaction: only the saved table
    // remembers it, with its result.
    assert_eq!(
        propose_on_leader(&cluster, id(2, 1)).await.expect("retry"),
        "1"
    );
    match propose_on_leader(&cluster, id(1, 60)).await {
        Ok(result) => assert_eq!(result, "61"),
        Err(Error::AlreadyApplied {
            client: 1,
            sequence: 60,
            ..
        }) => {}
        other => panic!("a retry after a restart must not apply again: {other:?}"),
    }
    assert_eq!(
        propose_on_leader(&cluster, id(1, 61)).await.expect("new"),
        "62"
    );
    cluster.converge(62).await;
    cluster.stop().await;
}

fn expire_fast(config: &mut HostConfig) {
    config.session_expiry_entries = 10;
}

/// A client silent for more than `session_expiry_entries` is forgotten:
/// its retry is applied again, exactly as documented.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_client_is_forgotten_after_the_documented_window() {
    let cluster = Cluster::start(1, 0, expire_fast);
    assert_eq!(
        propose_on_leader(&cluster, id(1, 1)).await.expect("c1"),
        "1"
    );
    for sequence in 1..=5 {
        propose_on_leader(&cluster, id(2, sequence))
            .await
            .expect("c2");
    }
    assert_eq!(
        propose_on_leader(&cluster, id(1, 1)).await.expect("within"),
        "1",
        "within the window, a retry is a duplicate"
    );
    for sequence in 6..=15 {
        propose_on_leader(&cluster, id(2, sequence))
            .await
            .expect("c2");
    }
    assert_eq!(
        propose_on_leader(&cluster, id(1, 1)).await.expect("after"),
        "17",
        "past the window, the retry is applied again"
    );
    cluster.converge(17).await;
    cluster.stop().await;
}

/// A node that joins through a snapshot gets the session table with it,
/// and answers a retry sent through it like the leader would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joining_through_a_snapshot_deduplicates_like_the_leader() {
    let mut cluster = Cluster::start(3, 1, compact_often);
    for sequence in 1..=60 {
        propose_on_leader(&cluster, id(1, sequence))
            .await
            .expect("c1");
    }
    cluster.converge(60).await;
    cluster.start_node(4, &[]);
    let leader = cluster.leader().await;
    cluster.hosts[&leader]
        .change_membership(
            GROUP,
            ConfChange::AddLearner {
                node: NodeId(4),
                auto_promote: false,
            },
        )
        .await
        .expect("learner");
    cluster.converge(60).await;
    assert_eq!(
        cluster.states[3].lock().expect("lock").restores,
        1,
        "node 4 caught up through a snapshot"
    );
    assert_eq!(
        propose(&cluster.hosts[&4], id(1, 60)).await.expect("retry"),
        "60",
        "the retry through the new node gets the first result"
    );
    assert_eq!(
        propose(&cluster.hosts[&4], id(1, 61)).await.expect("new"),
        "61"
    );
    cluster.converge(61).await;
    cluster.stop().await;
}

/// Cross-location replication ships the log to a copy of the state
/// machine elsewhere; it must drop the entries the apply thread refused.
/// `SessionFilter` replays that decision: from the start of the log, and
/// from any point after it, it admits exactly the commands applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_session_filter_admits_exactly_what_was_applied() {
    let cluster = Cluster::start(3, 0, no_tuning);
    let leader = cluster.leader().await;
    let host = &cluster.hosts[&leader];
    // Three copies of one request, a new one, and a stale copy: four
    // session entries refused, two applied.
    let (first, second, third) = tokio::join!(
        propose(host, id(7, 1)),
        propose(host, id(7, 1)),
        propose(host, id(7, 1)),
    );
    for result in [first, second, third] {
        assert_eq!(result.expect("a copy"), "1");
    }
    assert_eq!(propose(host, id(7, 2)).await.expect("next"), "2");
    assert!(matches!(
        propose(host, id(7, 2)).await,
        Ok(result) if result == "2"
    ));
    assert!(matches!(
        propose(host, id(7, 1)).await,
        Err(Error::StaleRequest { .. })
    ));
    cluster.converge(2).await;

    let last = host.status(GROUP).await.expect("status").applied;
    let entries = host
        .log_entries(GROUP, LogIndex(1), last.next(), u64::MAX)
        .expect("the whole log");
    let sessions = |entry: &regatta_raft::Entry| {
        matches!(entry.payload, regatta_raft::EntryPayload::Session { .. })
    };
    assert_eq!(entries.iter().filter(|e| sessions(e)).count(), 6);
    let mut filter = host.session_filter(GROUP, LogIndex(0)).expect("filter");
    let verdicts: Vec<bool> = entries.iter().map(|entry| filter.admits(entry)).collect();
    let admitted = entries
        .iter()
        .zip(&verdicts)
        .filter(|(entry, admitted)| sessions(entry) && **admitted)
        .count();
    assert_eq!(admitted, 2, "the counter reached 2: two commands applied");

    // From any point, the same verdicts for what follows.
    for start in 0..entries.len() {
        let after = entries[start].index.prev();
        let mut filter = host.session_filter(GROUP, after).expect("filter");
        let suffix: Vec<bool> = entries[start..]
            .iter()
            .map(|entry| filter.admits(entry))
            .collect();
        assert_eq!(suffix, verdicts[start..], "from after {after}");
    }
    cluster.stop().await;
}

fn small_apply_backlog(config: &mut HostConfig) {
    config.raft.apply_backlog_entries_max = 3;
}

/// A leader whose state machine falls behind refuses proposals, and a
/// follower that forwarded one hears so at once (it used to wait out its
/// request timeout, as if the proposal were lost). Once the leader catches
/// up, the same request goes through, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_proposal_a_busy_leader_refuses_fails_at_once() {
    let cluster = Cluster::start(3, 0, small_apply_backlog);
    let leader = cluster.leader().await;
    let follower = (1..=3).find(|id| *id != leader).expect("a follower");
    let leader_host = &cluster.hosts[&leader];
    // The leader's apply thread blocks on its state machine's lock, which
    // a thread of the test holds until told to let go.
    let (release, released) = std::sync::mpsc::channel::<()>();
    let (locked, is_locked) = std::sync::mpsc::channel::<()>();
    let state = Arc::clone(&cluster.states[leader as usize - 1]);
    let holder = std::thread::spawn(move || {
        let _held = state.lock().expect("lock");
        locked.send(()).expect("test waits");
        let _ = released.recv();
    });
    is_locked.recv().expect("locked");
    let mut stuck = Vec::new();
    // One client each: a client's requests must arrive in order, and
    // spawned tasks may run in any.
    for client in 11..=14 {
        let host = leader_host.clone();
        stuck.push(tokio::spawn(
            async move { propose(&host, id(client, 1)).await },
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = leader_host.status(GROUP).await.expect("status");
        if status.hard_state.commit.0 >= status.applied.0 + 4 {
            break;
        }
        assert!(Instant::now() < deadline, "the backlog never built");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    let refused = propose(&cluster.hosts[&follower], id(2, 1)).await;
    let waited = started.elapsed();
    match &refused {
        Err(Error::Raft {
            source: regatta_raft::Error::LeaderOverloaded { reason },
            ..
        }) => assert!(reason.contains("apply_backlog_entries_max 3"), "{reason}"),
        other => panic!("a refusal naming the backlog, got {other:?}"),
    }
    assert!(
        waited < Duration::from_secs(5),
        "answered in {waited:?}, not at the 10 s request timeout"
    );
    release.send(()).expect("holder waits");
    holder.join().expect("holder");
    for task in stuck {
        task.await
            .expect("task")
            .expect("applied once the leader caught up");
    }
    assert_eq!(
        propose(&cluster.hosts[&follower], id(2, 1))
            .await
            .expect("retry"),
        "5"
    );
    cluster.converge(5).await;
    cluster.stop().await;
}

/// A follower whose link to the leader is down answers a forwarded
/// proposal and a forwarded read at once with `Unsent` (they used to wait
/// out the request timeout: the transport dropped them, and nothing but a
/// change of leader answered them). Once the link is back, the proposal
/// retried under its request id applies once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_forwarded_over_a_cut_link_fails_at_once() {
    let cluster = Cluster::start(3, 0, |_| {});
    let (leader, follower) = cluster.one_write_applied_everywhere().await;
    // The follower still hears the leader (so it keeps following it), but
    // nothing it sends reaches the leader.
    cluster
        .transport
        .cut_one_way(NodeId(follower), NodeId(leader));
    let host = &cluster.hosts[&follower];
    let started = Instant::now();
    match propose(host, id(2, 1)).await {
        Err(Error::Unsent { peer, cause, .. }) => {
            assert_eq!(peer, NodeId(leader));
            assert_eq!(cause, UnsentCause::Unreachable);
        }
        other => panic!("the proposal fails as unsent, got {other:?}"),
    }
    match host
        .read_linearizable(GROUP, Bytes::from_static(b"count"))
        .await
    {
        Err(Error::Unsent { peer, .. }) => assert_eq!(peer, NodeId(leader)),
        other => panic!("the read fails as unsent, got {other:?}"),
    }
    let waited = started.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "answered in {waited:?}, not at the 10 s request timeout"
    );
    // Unsent means unsent: nothing arrives later (a few heartbeats on).
    tokio::time::sleep(Duration::from_millis(100)).await;
    for node in 1..=3 {
        assert_eq!(
            cluster.count(node),
            1,
            "the unsent proposal applied on {node}"
        );
    }
    cluster.transport.heal();
    let deadline = Instant::now() + Duration::from_secs(10);
    let applied = loop {
        match propose(host, id(2, 1)).await {
            Err(Error::Unsent { .. } | Error::NotLeader { .. }) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            other => break other.expect("the retry applies"),
        }
    };
    assert_eq!(applied, "2");
    cluster.converge(2).await;
    cluster.stop().await;
}

fn slow_elections_long_timeout(config: &mut HostConfig) {
    // 1 s without a leader's word before a follower campaigns (at 5 ms
    // ticks), so that a short one-way cut does not change the leader; and
    // a request timeout far beyond the test's patience.
    config.raft.election_timeout_ticks = 200;
    config.request_timeout = Duration::from_secs(60);
}

/// A forwarded read whose answer was lost on the way back (the leader's
/// link to the follower cut for a moment) is forwarded again after
/// `READ_RESEND_INTERVAL` (500 ms, as etcd retries its ReadIndex) and
/// served, instead of holding its caller until the request timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_read_whose_answer_was_lost_is_asked_again() {
    let cluster = Cluster::start(3, 0, slow_elections_long_timeout);
    let (leader, follower) = cluster.one_write_applied_everywhere().await;
    // The follower's ReadIndex reaches the leader; the answer does not.
    cluster
        .transport
        .cut_one_way(NodeId(leader), NodeId(follower));
    let host = cluster.hosts[&follower].clone();
    let started = Instant::now();
    let read = tokio::spawn(async move {
        host.read_linearizable(GROUP, Bytes::from_static(b"count"))
            .await
    });
    // Healed once the leader's answer was lost (and only then, so that
    // the read cannot have been served by its first answer).
    while cluster.transport.cut_off("read_index_response") == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the leader never answered"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.transport.heal();
    let answer = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("served long before the 60 s request timeout")
        .expect("task");
    assert_eq!(answer.expect("served"), Bytes::from_static(b"1"));
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(5), "served in {waited:?}");
    assert!(
        cluster.transport.delivered("read_index") >= 2,
        "the read was asked again"
    );
    assert_eq!(
        cluster.hosts[&leader]
            .status(GROUP)
            .await
            .expect("status")
            .soft_state
            .leader,
        Some(NodeId(leader)),
        "the leader did not change"
    );
    cluster.stop().await;
}

fn compact_often_slow_elections(config: &mut HostConfig) {
    slow_elections_long_timeout(config);
    compact_often(config);
}

/// A follower's forwarded proposal whose entry reaches the follower only
/// inside a snapshot (the leader could not send it the entries, and
/// compacted them) is answered `NotLeader` when the snapshot lands, not
/// at the request timeout; a retry under the same id then gets the first
/// result from the session table that came with the snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forwarded_proposal_a_snapshot_covers_is_answered_at_once() {
    let cluster = Cluster::start(3, 0, compact_often_slow_elections);
    let (leader, follower) = cluster.one_write_applied_everywhere().await;
    // The follower reaches the leader; nothing comes back.
    cluster
        .transport
        .cut_one_way(NodeId(leader), NodeId(follower));
    let follower_host = cluster.hosts[&follower].clone();
    let started = Instant::now();
    let proposal = tokio::spawn(async move { propose(&follower_host, id(5, 1)).await });
    // Applied by the leader and the third node, then compacted away.
    let third = (1..=3)
        .find(|n| *n != leader && *n != follower)
        .expect("a third node");
    while cluster.count(third) < 2 {
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "the forwarded proposal was not applied"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for sequence in 1..=40 {
        propose(&cluster.hosts[&leader], id(6, sequence))
            .await
            .expect("a write on the leader");
    }
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "the cut lasted too long: the follower may have campaigned"
    );
    assert_eq!(cluster.count(follower), 1, "the follower heard nothing");
    cluster.transport.heal();
    let answer = tokio::time::timeout(Duration::from_secs(5), proposal)
        .await
        .expect("answered long before the 60 s request timeout")
        .expect("task");
    assert!(
        matches!(answer, Err(Error::NotLeader { .. })),
        "a snapshot covered it: retry under the same id, not {answer:?}"
    );
    cluster.converge(42).await;
    assert_eq!(
        cluster.states[follower as usize - 1]
            .lock()
            .expect("lock")
            .restores,
        1,
        "the follower caught up through a snapshot"
    );
    assert_eq!(
        propose(&cluster.hosts[&follower], id(5, 1))
            .await
            .expect("the retry"),
        "2",
        "the retry gets the first result"
    );
    cluster.converge(42).await;
    cluster.stop().await;
}

fn never_quiet_slow_elections(config: &mut HostConfig) {
    slow_elections_long_timeout(config);
    // The followers cut off from their leader must notice (a local cut
    // does not wake a quiet group, as a lost TCP connection does).
    config.quiesce_after_ticks = 0;
}

/// The node among `candidates` that leads `GROUP`, once one does.
async fn leader_among(cluster: &Cluster, candidates: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for id in candidates {
            let status = cluster.hosts[id].status(GROUP).await.expect("status");
            if status.soft_state.role == Role::Leader {
                return *id;
            }
        }
        assert!(Instant::now() < deadline, "no leader among {candidates:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A leader's proposals whose entries another leader cut from its log
/// are answered `OutcomeUnknown` (retry under the same id) once the cut
/// lands. Before, they waited until something committed at their index:
/// the request timeout in a quiet group, or, when this node led again
/// and a new proposal took the index, a dropped reply (`GroupStopped`,
/// which the server does not retry).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_cut_from_a_deposed_leaders_log_are_answered_at_once() {
    let cluster = Cluster::start(3, 0, never_quiet_slow_elections);
    let (old_leader, _) = cluster.one_write_applied_everywhere().await;
    let others: Vec<u64> = (1..=3).filter(|n| *n != old_leader).collect();
    for other in &others {
        cluster
            .transport
            .cut_one_way(NodeId(old_leader), NodeId(*other));
        cluster
            .transport
            .cut_one_way(NodeId(*other), NodeId(old_leader));
    }
    // Five proposals the isolated leader appends and nobody else sees.
    let before = cluster.hosts[&old_leader]
        .status(GROUP)
        .await
        .expect("status")
        .last_index;
    let mut stranded = Vec::new();
    for sequence in 1..=5 {
        let host = cluster.hosts[&old_leader].clone();
        stranded.push(tokio::spawn(async move {
            propose(&host, id(7, sequence)).await
        }));
        // One entry each, in order (long before the isolated leader
        // steps down, an election timeout from now).
        let started = Instant::now();
        while cluster.hosts[&old_leader]
            .status(GROUP)
            .await
            .expect("status")
            .last_index
            .0
            < before.0 + sequence
        {
            assert!(
                started.elapsed() < Duration::from_millis(500),
                "stranded proposal {sequence} was not appended"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    // The others elect a leader and commit one write: their log ends
    // one entry past the new leader's empty entry.
    let new_leader = leader_among(&cluster, &others).await;
    assert_eq!(
        propose(&cluster.hosts[&new_leader], id(8, 1))
            .await
            .expect("a write on the new leader"),
        "2"
    );
    cluster.transport.heal();
    // The new leader's append cuts the old leader's log after the entries
    // it holds: the first two stranded proposals lost their indexes to
    // committed entries of another term (Dropped: never applied), the
    // other three are past the log's new end (OutcomeUnknown: retry under
    // the same id). All are answered at once, none at its timeout.
    let mut answers = Vec::new();
    for proposal in stranded {
        answers.push(
            tokio::time::timeout(Duration::from_secs(5), proposal)
                .await
                .expect("answered, not left to the 60 s request timeout")
                .expect("task"),
        );
    }
    for answer in &answers[..2] {
        assert!(
            matches!(answer, Err(Error::Dropped(_))),
            "overwritten by committed entries, not {answer:?}"
        );
    }
    for answer in &answers[2..] {
        assert!(
            matches!(answer, Err(Error::OutcomeUnknown(_))),
            "cut from the log: retry under its id, not {answer:?}"
        );
    }
    // Their retries apply each once.
    for (sequence, count) in [(3, "3"), (4, "4"), (5, "5")] {
        assert_eq!(
            propose(&cluster.hosts[&new_leader], id(7, sequence))
                .await
                .expect("the retry"),
            count
        );
    }
    cluster.converge(5).await;
    cluster.stop().await;
}
