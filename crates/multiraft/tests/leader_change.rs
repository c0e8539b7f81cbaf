//! Proposals under leader changes: every proposal resolves with its result
//! or fails with an error; no command is applied twice; every command that
//! resolved `Ok` is applied on every node; a `Dropped` command is applied
//! nowhere.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{Error, HostConfig, LocalTransport, NodeHost, StateMachine, Transport};
use regatta_raft::{LogIndex, NodeId, RequestId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};

const GROUP: GroupId = GroupId(3);

/// Records every command it applies, in order.
struct Journal {
    applied_commands: Arc<Mutex<Vec<String>>>,
    applied: LogIndex,
}

impl StateMachine for Journal {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        self.applied_commands
            .lock()
            .expect("lock")
            .push(String::from_utf8_lossy(command).to_string());
        self.applied = index;
        Bytes::new()
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::from(self.applied_commands.lock().expect("lock").join("\n")) };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        let text = String::from_utf8_lossy(data);
        *self.applied_commands.lock().expect("lock") = text.lines().map(str::to_string).collect();
        self.applied = index;
        Ok(())
    }
}

type Journals = BTreeMap<u64, Arc<Mutex<Vec<String>>>>;

/// Three hosts bootstrapping `GROUP`, each with a journal of what it
/// applies.
fn start_cluster(
    request_timeout: Duration,
) -> (
    Vec<tempfile::TempDir>,
    Arc<LocalTransport>,
    BTreeMap<u64, NodeHost>,
    Journals,
) {
    start_cluster_with(request_timeout, |_| {})
}

/// `start_cluster`, with `configure` applied to every host's config.
fn start_cluster_with(
    request_timeout: Duration,
    configure: fn(&mut HostConfig),
) -> (
    Vec<tempfile::TempDir>,
    Arc<LocalTransport>,
    BTreeMap<u64, NodeHost>,
    Journals,
) {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let voters: Vec<NodeId> = (1..=3).map(NodeId).collect();
    let mut hosts = BTreeMap::new();
    let mut journals = BTreeMap::new();
    for id in 1..=3u64 {
        let mut config = HostConfig::new(NodeId(id), dirs[id as usize - 1].path());
        config.tick_interval = Duration::from_millis(5);
        config.request_timeout = request_timeout;
        configure(&mut config);
        let wal = Arc::new(Wal::open(WalConfig::new(dirs[id as usize - 1].path())).expect("wal"));
        let as_transport: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let host = NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current())
            .expect("host");
        transport.register(NodeId(id), &host);
        let journal: Arc<Mutex<Vec<String>>> = Arc::default();
        let machine = Journal {
            applied_commands: Arc::clone(&journal),
            applied: LogIndex(0),
        };
        host.start_group(GROUP, voters.clone(), Box::new(machine))
            .expect("group");
        hosts.insert(id, host);
        journals.insert(id, journal);
    }
    (dirs, transport, hosts, journals)
}

/// Moves leadership around the three nodes, `rounds` times.
async fn move_leadership(hosts: &BTreeMap<u64, NodeHost>, rounds: u64) {
    for round in 0..rounds {
        tokio::time::sleep(Duration::from_millis(60)).await;
        let target = NodeId(round % 3 + 1);
        for host in hosts.values() {
            if host.status(GROUP).await.expect("status").soft_state.role == Role::Leader {
                let _ = host.transfer_leader(GROUP, target).await;
            }
        }
    }
}

/// Waits until every node applied everything any node knows committed.
/// Not only what the leader of the moment committed: right after a
/// transfer, the node that still calls itself leader may be a deposed
/// one whose commit index trails the entries a newer leader acknowledged.
async fn wait_until_applied_everywhere(hosts: &BTreeMap<u64, NodeHost>) {
    let leader_index = loop {
        let mut committed = LogIndex(0);
        let mut has_leader = false;
        for host in hosts.values() {
            let status = host.status(GROUP).await.expect("status");
            has_leader |= status.soft_state.role == Role::Leader;
            committed = committed.max(status.hard_state.commit);
        }
        if has_leader {
            break committed;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    for host in hosts.values() {
        while host.status(GROUP).await.expect("status").applied < leader_index {
            assert!(
                Instant::now() < deadline,
                "node {} did not catch up",
                host.node_id()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// The leader every node names, once they agree (10 s at most).
async fn agreed_leader(hosts: &BTreeMap<u64, NodeHost>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut named = Vec::new();
        for host in hosts.values() {
            named.push(host.status(GROUP).await.expect("status").soft_state.leader);
        }
        if let Some(Some(leader)) = named.first().copied() {
            if named.iter().all(|each| *each == Some(leader)) {
                return leader.0;
            }
        }
        assert!(Instant::now() < deadline, "no agreed leader: {named:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// The node of `among` that leads, once one does (10 s at most).
async fn leader_among(hosts: &BTreeMap<u64, NodeHost>, among: &[u64]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        for node in among {
            let status = hosts[node].status(GROUP).await.expect("status");
            if status.soft_state.role == Role::Leader {
                return *node;
            }
        }
        assert!(Instant::now() < deadline, "the majority elected no leader");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// How many times each command was applied on a node.
fn application_counts(journal: &Arc<Mutex<Vec<String>>>) -> HashMap<String, usize> {
    let mut counts: HashMap<String, usize> = HashMap::new();
    for command in journal.lock().expect("lock").iter() {
        *counts.entry(command.clone()).or_default() += 1;
    }
    counts
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proposals_survive_leader_changes_exactly_once() {
    let (_dirs, _transport, hosts, journals) = start_cluster(Duration::from_secs(10));
    let hosts = Arc::new(hosts);
    let outcomes: Arc<Mutex<HashMap<String, Result<(), Error>>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut proposers = Vec::new();
    for proposer in 0..8u64 {
        let (hosts, outcomes, stop) =
            (Arc::clone(&hosts), Arc::clone(&outcomes), Arc::clone(&stop));
        proposers.push(tokio::spawn(async move {
            let mut sequence = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for host in hosts.values() {
                    let command = format!("p{proposer}-{sequence}");
                    match host.propose(GROUP, Bytes::from(command.clone())).await {
                        Err(Error::NotLeader { .. }) => continue,
                        result => {
                            outcomes
                                .lock()
                                .expect("lock")
                                .insert(command, result.map(|_| ()));
                            sequence += 1;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }));
    }
    // Move leadership around while the proposers run.
    move_leadership(&hosts, 12).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for proposer in proposers {
        proposer.await.expect("proposer");
    }
    // Let every node apply everything that committed.
    wait_until_applied_everywhere(&hosts).await;
    let outcomes = outcomes.lock().expect("lock").clone();
    let succeeded = outcomes.values().filter(|outcome| outcome.is_ok()).count();
    let dropped = outcomes
        .values()
        .filter(|o| matches!(o, Err(Error::Dropped(_))))
        .count();
    let term = hosts[&1]
        .status(GROUP)
        .await
        .expect("status")
        .hard_state
        .term;
    eprintln!(
        "{} proposals: {succeeded} ok, {dropped} dropped, {} other errors; term {term}",
        outcomes.len(),
        outcomes.len() - succeeded - dropped
    );
    assert!(term.0 >= 5, "leadership barely moved (term {term})");
    assert!(succeeded > 100, "too few proposals succeeded: {succeeded}");
    for (id, journal) in &journals {
        let counts = application_counts(journal);
        for (command, count) in &counts {
            assert_eq!(*count, 1, "node {id} applied {command} {count} times");
        }
        for (command, outcome) in &outcomes {
            match outcome {
                Ok(()) => assert!(
                    counts.contains_key(command),
                    "node {id} lacks acknowledged {command}"
                ),
                // Dropped, and refused by the core (e.g. during a transfer):
                // definitely not applied.
                Err(Error::Dropped(_) | Error::Raft { .. }) => {
                    assert!(
                        !counts.contains_key(command),
                        "node {id} applied refused {command}"
                    )
                }
                Err(_) => {}
            }
        }
    }
    for host in hosts.values() {
        host.stop().await;
    }
}

/// The same churn, with clients that retry every failed request with its
/// id, through whichever node they reach (followers forward): every
/// request ends applied, each exactly once on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_requests_survive_leader_changes_applied_exactly_once() {
    let (_dirs, transport, hosts, journals) = start_cluster(Duration::from_millis(15));
    let hosts = Arc::new(hosts);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let retries = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 1..=6u64 {
        let (hosts, stop, retries) = (Arc::clone(&hosts), Arc::clone(&stop), Arc::clone(&retries));
        clients.push(tokio::spawn(async move {
            let mut done = Vec::new();
            let mut sequence = 1u64;
            let mut attempt = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let id = RequestId { client, sequence };
                let command = format!("c{client}-{sequence}");
                // Rotate over every node, followers included.
                let host = &hosts[&(attempt % 3 + 1)];
                attempt += 1;
                match host
                    .propose_with_id(GROUP, id, Bytes::from(command.clone()))
                    .await
                {
                    Ok(_) => {
                        done.push(command);
                        sequence += 1;
                    }
                    Err(
                        Error::NotLeader { .. }
                        | Error::Dropped(_)
                        | Error::OutcomeUnknown(_)
                        | Error::Timeout { .. }
                        | Error::Unsent { .. }
                        | Error::Raft { .. },
                    ) => {
                        retries.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    Err(other) => panic!("request {command}: unexpected {other}"),
                }
            }
            done
        }));
    }
    // Leadership moves, and the leader is cut off for less than an
    // election timeout: its appended entries commit after the heal, while
    // their callers have timed out and retried elsewhere.
    move_leadership(&hosts, 6).await;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(20)).await;
        for (id, host) in hosts.iter() {
            if host.status(GROUP).await.expect("status").soft_state.role == Role::Leader {
                for other in (1..=3).filter(|other| other != id) {
                    transport.cut(NodeId(*id), NodeId(other));
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(30)).await;
        transport.heal();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    for client in clients {
        acknowledged.extend(client.await.expect("client"));
    }
    wait_until_applied_everywhere(&hosts).await;
    let retries = retries.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "{} requests acknowledged after {retries} retries",
        acknowledged.len()
    );
    assert!(
        acknowledged.len() > 100,
        "too few requests: {}",
        acknowledged.len()
    );
    assert!(retries > 0, "leadership changes never made a client retry");
    for (id, journal) in &journals {
        let counts = application_counts(journal);
        for (command, count) in &counts {
            assert_eq!(*count, 1, "node {id} applied {command} {count} times");
        }
        for command in &acknowledged {
            assert!(counts.contains_key(command), "node {id} lacks {command}");
        }
    }
    for host in hosts.values() {
        host.stop().await;
    }
}

/// The `Dropped` path, deterministically: a leader cut off from both
/// followers appends a proposal that can never commit; the majority
/// elects a new leader and commits its own; after the heal the old
/// leader's entry is overwritten, and its proposer gets `Dropped` (not
/// `Ok`, not a hang), and no node ever applies the command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_overwritten_after_a_partition_is_dropped_and_applied_nowhere() {
    let (_dirs, transport, hosts, journals) = start_cluster(Duration::from_secs(10));
    // Wait for a leader every node agrees on.
    let old = agreed_leader(&hosts).await;
    hosts[&old]
        .propose(GROUP, Bytes::from_static(b"before"))
        .await
        .expect("a commit before the cut");
    let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    for other in &others {
        transport.cut(NodeId(old), NodeId(*other));
    }
    let stranded_host = hosts[&old].clone();
    let stranded = tokio::spawn(async move {
        stranded_host
            .propose(GROUP, Bytes::from_static(b"stranded"))
            .await
    });
    // The majority elects one of its own and commits through it.
    let new = leader_among(&hosts, &others).await;
    hosts[&new]
        .propose(GROUP, Bytes::from_static(b"majority"))
        .await
        .expect("the majority commits");
    transport.heal();
    let outcome = tokio::time::timeout(Duration::from_secs(10), stranded)
        .await
        .expect("the stranded proposal is answered after the heal")
        .expect("join");
    assert!(
        matches!(outcome, Err(Error::Dropped(_))),
        "the overwritten proposal ended {outcome:?}, not Dropped"
    );
    wait_until_applied_everywhere(&hosts).await;
    for (id, journal) in &journals {
        let counts = application_counts(journal);
        assert_eq!(counts.get("before"), Some(&1), "node {id}");
        assert_eq!(counts.get("majority"), Some(&1), "node {id}");
        assert!(
            !counts.contains_key("stranded"),
            "node {id} applied the dropped command"
        );
    }
    for host in hosts.values() {
        host.stop().await;
    }
}

/// A proposal whose entry a new leader committed, while its proposer was
/// cut off, and then compacted away: the proposer catches up through a
/// snapshot that holds it, so it may have been applied. It is answered
/// `OutcomeUnknown`, not `Dropped` (which says it was not applied: here
/// it was, on every node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_a_snapshot_covers_has_an_unknown_outcome_not_dropped() {
    fn compact_often(config: &mut HostConfig) {
        config.snapshot_every_entries = 20;
        config.compaction_overhead_entries = 5;
    }
    let (_dirs, transport, hosts, journals) =
        start_cluster_with(Duration::from_secs(20), compact_often);
    let old = agreed_leader(&hosts).await;
    hosts[&old]
        .propose(GROUP, Bytes::from_static(b"before"))
        .await
        .expect("a commit before the cut");
    let before = hosts[&old].status(GROUP).await.expect("status").last_index;
    let others: Vec<u64> = (1..=3).filter(|id| *id != old).collect();
    // The followers receive the entry but their answers never arrive.
    for other in &others {
        transport.cut_one_way(NodeId(*other), NodeId(old));
    }
    let proposer = hosts[&old].clone();
    let covered = tokio::spawn(async move {
        proposer
            .propose(GROUP, Bytes::from_static(b"covered"))
            .await
    });
    let replicated_by = Instant::now() + Duration::from_secs(10);
    let held = loop {
        let last = hosts[&old].status(GROUP).await.expect("status").last_index;
        let mut everywhere = true;
        for other in &others {
            everywhere &= hosts[other].status(GROUP).await.expect("status").last_index >= last;
        }
        // Past `before`: the proposal's entry is in the old leader's log.
        if everywhere && last > before {
            break last;
        }
        assert!(Instant::now() < replicated_by, "never replicated");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    for other in &others {
        transport.cut(NodeId(old), NodeId(*other));
    }
    // The others elect one of their own, which commits the entry and
    // compacts well past it.
    let new = leader_among(&hosts, &others).await;
    for round in 0..60 {
        hosts[&new]
            .propose(GROUP, Bytes::from(format!("after-{round}")))
            .await
            .expect("the majority commits");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts[&new].status(GROUP).await.expect("status").first_index <= held {
        assert!(
            Instant::now() < deadline,
            "the new leader never compacted past the entry"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    transport.heal();
    let outcome = tokio::time::timeout(Duration::from_secs(15), covered)
        .await
        .expect("answered after the heal")
        .expect("join");
    assert!(
        matches!(outcome, Err(Error::OutcomeUnknown(_))),
        "the covered proposal ended {outcome:?}"
    );
    wait_until_applied_everywhere(&hosts).await;
    for (id, journal) in &journals {
        let counts = application_counts(journal);
        assert_eq!(counts.get("covered"), Some(&1), "node {id}: it was applied");
    }
    for host in hosts.values() {
        host.stop().await;
    }
}
