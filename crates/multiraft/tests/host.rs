//! Three node hosts in one process, wired by `LocalTransport`, each with
//! its own WAL on disk: elect, replicate, read linearizably on a follower,
//! crash a follower and restart it from its WAL alone, and refuse
//! proposals on followers with the leader's id.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{
    Error, HostConfig, LocalTransport, NodeHost, StateMachine, StateReader, Transport,
};
use regatta_raft::{CommitBroadcast, LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};

const GROUP: GroupId = GroupId(7);

/// A key-value map; commands are `key=value`, queries are keys.
#[derive(Default)]
struct KvMachine {
    data: Arc<Mutex<BTreeMap<String, String>>>,
    applied: LogIndex,
    /// Serve reads through a `StateReader` on the caller's task.
    with_reader: bool,
    /// Sleep this long in each apply, so that followers lag behind.
    apply_delay: Duration,
}

struct KvReader {
    data: Arc<Mutex<BTreeMap<String, String>>>,
}

impl StateReader for KvReader {
    fn read(&self, query: &Bytes) -> Bytes {
        let key = String::from_utf8_lossy(query).to_string();
        let data = self.data.lock().expect("lock");
        Bytes::from(data.get(&key).cloned().unwrap_or_default())
    }
}

impl StateMachine for KvMachine {
    fn apply(&mut self, index: LogIndex, command: &Bytes) -> Bytes {
        std::thread::sleep(self.apply_delay);
        let text = String::from_utf8_lossy(command);
        let (key, value) = text.split_once('=').unwrap_or((&text, ""));
        let previous = self
            .data
            .lock()
            .expect("lock")
            .insert(key.to_string(), value.to_string());
        self.applied = index;
        Bytes::from(previous.unwrap_or_default())
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

    fn reader(&self) -> Option<Arc<dyn StateReader>> {
        let reader = KvReader {
            data: Arc::clone(&self.data),
        };
        self.with_reader
            .then(|| Arc::new(reader) as Arc<dyn StateReader>)
    }

    fn applied_index(&self) -> LogIndex {
        self.applied
    }

    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = {
            let data = self.data.lock().expect("lock");
            let lines: Vec<String> = data
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect();
            Bytes::from(lines.join("\n"))
        };
        Box::new(bytes)
    }

    fn restore(&mut self, index: LogIndex, data: &mut dyn std::io::Read) -> std::io::Result<()> {
        let mut buffer = Vec::new();
        std::io::Read::read_to_end(data, &mut buffer)?;
        let data = &Bytes::from(buffer);
        let text = String::from_utf8_lossy(data);
        let mut map = self.data.lock().expect("lock");
        map.clear();
        for line in text.lines() {
            if let Some((key, value)) = line.split_once('=') {
                map.insert(key.to_string(), value.to_string());
            }
        }
        self.applied = index;
        Ok(())
    }
}

fn start_host(dir: &Path, id: u64, transport: &Arc<LocalTransport>, voters: &[NodeId]) -> NodeHost {
    start_host_with(dir, id, transport, voters, KvMachine::default())
}

fn start_host_with(
    dir: &Path,
    id: u64,
    transport: &Arc<LocalTransport>,
    voters: &[NodeId],
    machine: KvMachine,
) -> NodeHost {
    start_host_configured(dir, id, transport, voters, machine, |_| {})
}

/// `start_host_with`, with `configure` applied to the host's settings.
fn start_host_configured(
    dir: &Path,
    id: u64,
    transport: &Arc<LocalTransport>,
    voters: &[NodeId],
    machine: KvMachine,
    configure: impl FnOnce(&mut HostConfig),
) -> NodeHost {
    let host = new_host(dir, id, transport, configure);
    host.start_group(GROUP, voters.to_vec(), Box::new(machine))
        .expect("group");
    host
}

/// Node `id`'s host, with its WAL in `dir`, ticking every 5 ms, its
/// settings changed by `configure`, reachable through `transport`, and
/// running no group yet.
fn new_host(
    dir: &Path,
    id: u64,
    transport: &Arc<LocalTransport>,
    configure: impl FnOnce(&mut HostConfig),
) -> NodeHost {
    let mut config = HostConfig::new(NodeId(id), dir);
    config.tick_interval = Duration::from_millis(5);
    // Two workers whatever the machine (the default follows its cores):
    // groups on different workers of one host stay covered.
    config.workers = 2;
    configure(&mut config);
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let transport_handle: Arc<dyn Transport> = Arc::clone(transport) as Arc<dyn Transport>;
    let host = NodeHost::new(
        config,
        wal,
        transport_handle,
        tokio::runtime::Handle::current(),
    )
    .expect("host");
    transport.register(NodeId(id), &host);
    host
}

/// What `start_three_hosts_with` returns: the WAL directories (kept
/// alive), the network and the hosts by id.
type ThreeHosts = (
    Vec<tempfile::TempDir>,
    Arc<LocalTransport>,
    BTreeMap<u64, NodeHost>,
);

/// Three hosts, each with its own WAL in a new directory, bootstrapping
/// `GROUP` with voters 1, 2 and 3.
fn start_three_hosts() -> ThreeHosts {
    start_three_hosts_with(KvMachine::default, |_| {})
}

/// `start_three_hosts` with a state machine from `machine` and the host
/// settings changed by `configure`.
fn start_three_hosts_with(
    machine: impl Fn() -> KvMachine,
    configure: impl Fn(&mut HostConfig),
) -> ThreeHosts {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let transport = LocalTransport::new();
    let hosts = (1..=3u64)
        .map(|id| {
            let dir = dirs[id as usize - 1].path();
            let host = start_host_configured(dir, id, &transport, &voters, machine(), &configure);
            (id, host)
        })
        .collect();
    (dirs, transport, hosts)
}

async fn wait_for_leader(hosts: &BTreeMap<u64, NodeHost>) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        for (id, host) in hosts {
            if host.status(GROUP).await.expect("status").soft_state.role == Role::Leader {
                return *id;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("no leader within 10 s");
}

async fn read_until(host: &NodeHost, key: &str, expected: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(value) = host
            .read_linearizable(GROUP, Bytes::from(key.to_string()))
            .await
        {
            if value == expected.as_bytes() {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "node {} never read {key}={expected}",
            host.node_id()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Elect, replicate through the host, read linearizably on followers,
/// crash and restart a follower from its WAL.
/// Settings a host cannot run with are refused by name when it is
/// created, not met later as a panic (a zero-capacity inbox or a zero
/// tick would panic inside tokio).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_refuses_settings_it_cannot_run_with() {
    type Change = fn(&mut HostConfig);
    let settings: [(&str, Change); 4] = [
        ("workers is 0", |config| config.workers = 0),
        ("workers is 257", |config| {
            config.workers = regatta_multiraft::WORKERS_MAX + 1
        }),
        ("group_inbox_max is 0", |config| config.group_inbox_max = 0),
        ("tick_interval is 0", |config| {
            config.tick_interval = Duration::ZERO
        }),
    ];
    for (says, change) in settings {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = HostConfig::new(NodeId(1), dir.path());
        change(&mut config);
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).expect("wal"));
        let transport: Arc<dyn Transport> = LocalTransport::new();
        let refused = NodeHost::new(config, wal, transport, tokio::runtime::Handle::current());
        match refused {
            Err(Error::Config(message)) => assert!(message.contains(says), "{message}"),
            Err(other) => panic!("{says}: refused with {other}"),
            Ok(_) => panic!("{says}: accepted"),
        }
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = HostConfig::new(NodeId(1), dir.path());
    config.workers = regatta_multiraft::WORKERS_MAX;
    config
        .validate()
        .expect("the largest worker count is valid");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_elect_replicate_read_and_recover() {
    let (dirs, transport, mut hosts) = start_three_hosts();
    let leader = wait_for_leader(&hosts).await;
    for i in 0..100 {
        let previous = hosts[&leader]
            .propose(GROUP, Bytes::from(format!("k{}=v{i}", i % 10)))
            .await
            .expect("commit");
        let expected = if i >= 10 {
            format!("v{}", i - 10)
        } else {
            String::new()
        };
        assert_eq!(
            previous,
            expected.as_bytes(),
            "the proposer gets the state machine's result"
        );
    }
    for host in hosts.values() {
        read_until(host, "k9", "v99").await;
    }

    // A follower proposes: refused, naming the leader.
    let follower = (1..=3).find(|id| *id != leader).expect("follower");
    let error = hosts[&follower]
        .propose(GROUP, Bytes::from_static(b"x=1"))
        .await
        .expect_err("not leader");
    assert!(
        matches!(error, Error::NotLeader { leader_hint: Some(hint), .. } if hint == NodeId(leader)),
        "{error}"
    );

    // Stop the follower (its WAL stays on disk), write more, restart it.
    transport.unregister(NodeId(follower));
    let stopped = hosts.remove(&follower).expect("follower");
    stopped.stop().await;
    drop(stopped);
    for i in 0..20 {
        hosts[&leader]
            .propose(GROUP, Bytes::from(format!("after=v{i}")))
            .await
            .expect("commit with 2 of 3");
    }
    let restarted = start_host(
        dirs[follower as usize - 1].path(),
        follower,
        &transport,
        &[],
    );
    read_until(&restarted, "after", "v19").await;
    read_until(&restarted, "k9", "v99").await;
    let status = restarted.status(GROUP).await.expect("status");
    assert!(status.hard_state.commit >= LogIndex(121), "{status:?}");
}

/// A state machine with a `StateReader` serves reads on the caller's
/// task. A linearizable read on a follower must still see every write
/// acknowledged before it began, although the followers apply slowly (the
/// read waits for the follower's applied index to reach the read index);
/// a stale read answers at once from whatever is applied; both fail once
/// the group is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_through_a_state_reader_wait_for_the_read_index() {
    let machine = || KvMachine {
        with_reader: true,
        apply_delay: Duration::from_millis(2),
        ..KvMachine::default()
    };
    let (_dirs, _transport, hosts) = start_three_hosts_with(machine, |_| {});
    let leader = wait_for_leader(&hosts).await;
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for i in 0..60 {
        hosts[&leader]
            .propose(GROUP, Bytes::from(format!("k=v{i}")))
            .await
            .expect("commit");
        let follower = &hosts[&followers[i % 2]];
        let value = follower
            .read_linearizable(GROUP, Bytes::from_static(b"k"))
            .await
            .expect("read");
        assert_eq!(value, format!("v{i}").as_bytes(), "write {i}");
    }
    let stale = hosts[&leader]
        .read_stale(GROUP, Bytes::from_static(b"k"))
        .await
        .expect("stale read");
    assert_eq!(stale, "v59".as_bytes());

    hosts[&followers[0]]
        .remove_group(GROUP)
        .await
        .expect("remove");
    for result in [
        hosts[&followers[0]]
            .read_stale(GROUP, Bytes::from_static(b"k"))
            .await,
        hosts[&followers[0]]
            .read_linearizable(GROUP, Bytes::from_static(b"k"))
            .await,
    ] {
        let error = result.expect_err("the group is gone");
        assert!(
            matches!(error, Error::UnknownGroup(_) | Error::GroupStopped { .. }),
            "{error}"
        );
    }
}

/// Grow a group from 3 to 4 nodes through the host API: the new node joins
/// as a learner, is promoted automatically, takes leadership by transfer
/// and serves reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fourth_node_joins_and_takes_leadership() {
    let dirs: Vec<tempfile::TempDir> = (0..4)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let transport = LocalTransport::new();
    let mut hosts = BTreeMap::new();
    for id in 1..=3u64 {
        hosts.insert(
            id,
            start_host(dirs[id as usize - 1].path(), id, &transport, &voters),
        );
    }
    let leader = wait_for_leader(&hosts).await;
    hosts[&leader]
        .propose(GROUP, Bytes::from_static(b"a=1"))
        .await
        .expect("commit");
    // Node 4 starts empty: it joins, it does not bootstrap.
    hosts.insert(4, start_host(dirs[3].path(), 4, &transport, &[]));
    let change = regatta_raft::ConfChange::AddLearner {
        node: NodeId(4),
        auto_promote: true,
    };
    hosts[&leader]
        .change_membership(GROUP, change)
        .await
        .expect("learner added");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let status = hosts[&leader].status(GROUP).await.expect("status");
        if status.membership.voters.contains(&NodeId(4)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 4 was never promoted: {:?}",
            status.membership
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hosts[&leader]
        .transfer_leader(GROUP, NodeId(4))
        .await
        .expect("transfer started");
    let deadline = Instant::now() + Duration::from_secs(10);
    while hosts[&4]
        .status(GROUP)
        .await
        .expect("status")
        .soft_state
        .role
        != Role::Leader
    {
        assert!(Instant::now() < deadline, "node 4 never took leadership");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hosts[&4]
        .propose(GROUP, Bytes::from_static(b"a=2"))
        .await
        .expect("commit on the new leader");
    assert_eq!(
        hosts[&4]
            .read_stale(GROUP, Bytes::from_static(b"a"))
            .await
            .expect("read"),
        "2".as_bytes()
    );
    read_until(&hosts[&1], "a", "2").await;
    for host in hosts.values() {
        host.stop().await;
    }
}

/// Deleting a group removes its log and state from every node's WAL: its
/// requests then fail with `UnknownGroup`, a reopened WAL no longer knows
/// it, and the same id can host a new, empty group.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_group_leaves_nothing_in_the_wal() {
    let (dirs, transport, mut hosts) = start_three_hosts();
    let voters = [NodeId(1), NodeId(2), NodeId(3)];
    let leader = wait_for_leader(&hosts).await;
    for i in 0..50 {
        hosts[&leader]
            .propose(GROUP, Bytes::from(format!("k{i}=v{i}")))
            .await
            .expect("commit");
    }
    for host in hosts.values() {
        read_until(host, "k49", "v49").await;
    }

    for host in hosts.values() {
        host.remove_group(GROUP).await.expect("removed");
        let error = host
            .propose(GROUP, Bytes::from_static(b"x=1"))
            .await
            .expect_err("gone");
        assert_eq!(error, Error::UnknownGroup(GROUP));
        assert_eq!(
            host.remove_group(GROUP).await,
            Err(Error::UnknownGroup(GROUP))
        );
    }

    // The same id starts afresh: a new group with none of the old data.
    for (id, host) in &hosts {
        host.start_group(GROUP, voters.to_vec(), Box::new(KvMachine::default()))
            .unwrap_or_else(|e| panic!("node {id} restarts the group: {e}"));
    }
    let leader = wait_for_leader(&hosts).await;
    hosts[&leader]
        .propose(GROUP, Bytes::from_static(b"fresh=1"))
        .await
        .expect("commit in the new group");
    for host in hosts.values() {
        read_until(host, "fresh", "1").await;
        read_until(host, "k49", "").await;
    }
    for host in hosts.values() {
        host.remove_group(GROUP).await.expect("removed again");
    }
    for (id, host) in std::mem::take(&mut hosts) {
        transport.unregister(NodeId(id));
        host.stop().await;
    }

    for dir in &dirs {
        let wal = Wal::open(WalConfig::new(dir.path())).expect("reopen");
        assert!(!wal.groups().contains(&GROUP), "{:?}", wal.groups());
        assert_eq!(wal.last_index(GROUP), LogIndex(0));
        assert_eq!(wal.hard_state(GROUP), regatta_raft::HardState::default());
        assert!(wal.snapshot(GROUP).is_none());
    }
}

/// Answers each command with its own index, and records the size of every
/// batch it is given.
#[derive(Default)]
struct BatchRecorder {
    batches: Arc<Mutex<Vec<usize>>>,
    applied: LogIndex,
}

impl StateMachine for BatchRecorder {
    fn apply(&mut self, _index: LogIndex, _command: &Bytes) -> Bytes {
        panic!("the host must call apply_batch");
    }
    fn apply_batch(&mut self, commands: &[(LogIndex, Bytes)]) -> std::io::Result<Vec<Bytes>> {
        self.batches.lock().expect("lock").push(commands.len());
        let mut previous = self.applied;
        for (index, _) in commands {
            assert!(*index > previous, "in index order");
            previous = *index;
        }
        self.applied = previous;
        Ok(commands
            .iter()
            .map(|(index, _)| Bytes::from(index.0.to_string()))
            .collect())
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }
    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        let bytes: Bytes = { Bytes::new() };
        Box::new(bytes)
    }
    fn restore(&mut self, index: LogIndex, _data: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.applied = index;
        Ok(())
    }
}

/// Concurrent proposals reach the state machine in batches, and each
/// proposer gets the result of its own entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_commands_are_applied_in_batches() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let host = new_host(dir.path(), 1, &transport, |_| {});
    let machine = BatchRecorder::default();
    let batches = Arc::clone(&machine.batches);
    host.start_group(GROUP, vec![NodeId(1)], Box::new(machine))
        .expect("group");
    let hosts = BTreeMap::from([(1u64, host.clone())]);
    wait_for_leader(&hosts).await;

    let proposals: Vec<_> = (0..500)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(async move { host.propose(GROUP, Bytes::from(format!("c{i}"))).await })
        })
        .collect();
    let mut indexes = std::collections::BTreeSet::new();
    for proposal in proposals {
        let result = proposal.await.expect("task").expect("committed");
        let index: u64 = String::from_utf8_lossy(&result).parse().expect("an index");
        assert!(indexes.insert(index), "two proposers got index {index}");
    }
    assert_eq!(indexes.len(), 500);
    let batches = batches.lock().expect("lock").clone();
    assert_eq!(batches.iter().sum::<usize>(), 500, "{batches:?}");
    assert!(
        batches.iter().any(|size| *size > 1),
        "never more than one command per batch: {batches:?}"
    );
    host.stop().await;
}

/// Under `CommitBroadcast::Deferred` (the host's default) a leader sends
/// a moved commit index on its own only when the worker's commit timer
/// fires. With ticks too slow for any heartbeat during the test, the
/// followers can learn the commit of the last proposal only from that
/// timer (or, with `Eager`, from the ready that follows the advance).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn followers_apply_the_last_commit_without_heartbeats() {
    for broadcast in [CommitBroadcast::Deferred, CommitBroadcast::Eager] {
        let (_dirs, _transport, hosts) = start_three_hosts_with(KvMachine::default, |config| {
            config.tick_interval = Duration::from_secs(3600);
            config.raft.commit_broadcast = broadcast;
        });
        hosts[&1].campaign(GROUP).expect("campaign");
        assert_eq!(wait_for_leader(&hosts).await, 1, "{broadcast:?}");
        hosts[&1]
            .propose(GROUP, Bytes::from_static(b"last=1"))
            .await
            .expect("commit");
        let proposed = hosts[&1]
            .status(GROUP)
            .await
            .expect("status")
            .hard_state
            .commit;
        for follower in [2u64, 3] {
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                let value = hosts[&follower]
                    .read_stale(GROUP, Bytes::from_static(b"last"))
                    .await
                    .expect("stale read");
                if value == b"1"[..] {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{broadcast:?}: follower {follower} never applied index {}",
                    proposed.0
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        for host in hosts.values() {
            host.stop().await;
        }
    }
}

/// A caller that stops waiting for `remove_group` does not free the id
/// early: a `start_group` of the same id is refused with `GroupExists`
/// until the removal is durable, and the group started then works. Before,
/// the id was freed as the caller's future dropped, so the new group could
/// start while the old removal was still on its way, and that removal
/// then unregistered the new group's state machine.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_given_up_on_keeps_the_id_until_it_is_durable() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let host = start_host(dir.path(), 1, &transport, &[NodeId(1)]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while host
        .propose(GROUP, Bytes::from_static(b"old=1"))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the group never took a write");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut given_up = 0;
    for round in 0..20 {
        // Polled once, then dropped: the removal is asked for, and its
        // caller gives up at once.
        let mut removal = Box::pin(host.remove_group(GROUP));
        let first =
            std::future::poll_fn(|context| std::task::Poll::Ready(removal.as_mut().poll(context)))
                .await;
        drop(removal);
        if first.is_ready() {
            // Done within the first poll (this thread was descheduled
            // meanwhile): nothing was given up on this round.
            assert!(
                matches!(first, std::task::Poll::Ready(Ok(()))),
                "round {round}: {first:?}"
            );
        } else {
            given_up += 1;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match host.start_group(GROUP, vec![NodeId(1)], Box::new(KvMachine::default())) {
                Ok(()) => break,
                Err(Error::GroupExists(_)) => {
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: the id was never freed"
                    );
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                Err(error) => panic!("round {round}: {error}"),
            }
        }
        let key = format!("round{round}");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let command = Bytes::from(format!("{key}=1"));
            match tokio::time::timeout(Duration::from_secs(2), host.propose(GROUP, command)).await {
                Ok(Ok(_)) => break,
                outcome => assert!(
                    Instant::now() < deadline,
                    "round {round}: the new group never applied a write: {outcome:?}"
                ),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        read_until(&host, &key, "1").await;
        read_until(&host, "old", "").await;
    }
    assert!(
        given_up >= 10,
        "only {given_up} of 20 removals were given up on"
    );
    host.stop().await;
}

/// Proposals in flight while the leader removes the group all end, each
/// with its result or `GroupStopped`: none waits for ever, whichever of
/// the worker and the apply thread holds it at the removal.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn proposals_in_flight_at_a_removal_all_end() {
    // A slow state machine (and tokio threads to spare while it sleeps),
    // so that the removal also catches proposals whose entries the apply
    // task holds.
    let slow = || KvMachine {
        apply_delay: Duration::from_millis(1),
        ..KvMachine::default()
    };
    let (_dirs, _transport, hosts) = start_three_hosts_with(slow, |_| {});
    let leader = hosts[&wait_for_leader(&hosts).await].clone();
    // 64 proposers, each with one proposal in flight at all times until
    // the group is gone.
    let proposers: Vec<_> = (0..64)
        .map(|p| {
            let leader = leader.clone();
            tokio::spawn(async move {
                let mut applied = 0u64;
                loop {
                    let command = Bytes::from(format!("k{p}-{applied}=v"));
                    match leader.propose(GROUP, command).await {
                        Ok(_) => applied += 1,
                        Err(error) => return (applied, error),
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    leader.remove_group(GROUP).await.expect("removed");
    let mut in_flight = 0;
    for proposer in proposers {
        let (applied, error) = tokio::time::timeout(Duration::from_secs(10), proposer)
            .await
            .expect("a proposer waited for ever")
            .expect("proposer task");
        assert!(applied > 0, "every proposer got through before the removal");
        match error {
            Error::GroupStopped { .. } => in_flight += 1,
            Error::UnknownGroup(_) => {}
            other => panic!("unexpected outcome: {other:?}"),
        }
    }
    assert!(in_flight > 0, "the removal caught no proposal in flight");
}

/// Once a proposal is answered, this node's status and applied-index
/// watch already count its entry: a client may read at the revision it
/// was given, and a read-your-writes wait never waits for its own write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answered_proposal_is_counted_as_applied() {
    let (_dirs, _transport, hosts) = start_three_hosts();
    let leader = &hosts[&wait_for_leader(&hosts).await];
    let watch = leader.applied_index_watch(GROUP).expect("watch");
    for i in 0..200 {
        let before = leader.status(GROUP).await.expect("status").applied;
        leader
            .propose(GROUP, Bytes::from(format!("k=v{i}")))
            .await
            .expect("commit");
        let status = leader.status(GROUP).await.expect("status").applied;
        assert!(
            status > before,
            "proposal {i}: status applied {status:?}, before {before:?}"
        );
        assert!(
            watch.get() > before,
            "proposal {i}: watch {:?}, before {before:?}",
            watch.get()
        );
    }
}

/// A state machine whose `apply_batch` waits while its gate is closed, as
/// a storage engine does in a write stall; it tells `entered` each time it
/// starts waiting.
struct GatedMachine {
    gate: Arc<(Mutex<bool>, std::sync::Condvar)>,
    entered: std::sync::mpsc::Sender<()>,
    applied: LogIndex,
}

impl StateMachine for GatedMachine {
    fn apply(&mut self, _index: LogIndex, _command: &Bytes) -> Bytes {
        panic!("the host must call apply_batch");
    }
    fn apply_batch(&mut self, commands: &[(LogIndex, Bytes)]) -> std::io::Result<Vec<Bytes>> {
        let (closed, opened) = &*self.gate;
        let mut closed = closed.lock().expect("lock");
        if *closed {
            let _ = self.entered.send(());
        }
        while *closed {
            closed = opened.wait(closed).expect("lock");
        }
        if let Some((last, _)) = commands.last() {
            self.applied = *last;
        }
        Ok(commands.iter().map(|_| Bytes::new()).collect())
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }
    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        Box::new(Bytes::new())
    }
    fn restore(&mut self, index: LogIndex, _data: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.applied = index;
        Ok(())
    }
}

/// A gate a `GatedMachine` waits at while it is closed.
type Gate = Arc<(Mutex<bool>, std::sync::Condvar)>;

/// A one-node host in `dir` running `GROUP` on a `GatedMachine` (gate
/// open), once it leads; with the gate, and the receiver the machine
/// tells each time it starts waiting at it.
async fn gated_single_node(dir: &Path) -> (NodeHost, Gate, std::sync::mpsc::Receiver<()>) {
    let transport = LocalTransport::new();
    let host = new_host(dir, 1, &transport, |_| {});
    let gate: Gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
    let (entered, stalled) = std::sync::mpsc::channel();
    let machine = GatedMachine {
        gate: Arc::clone(&gate),
        entered,
        applied: LogIndex(0),
    };
    host.start_group(GROUP, vec![NodeId(1)], Box::new(machine))
        .expect("group");
    wait_for_leader(&BTreeMap::from([(1u64, host.clone())])).await;
    (host, gate, stalled)
}

/// Opens a gate when dropped, so that a failing test does not leave a
/// thread waiting at it (the runtime's shutdown would wait for ever).
struct OpenOnDrop(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl Drop for OpenOnDrop {
    fn drop(&mut self) {
        *self.0 .0.lock().unwrap_or_else(|p| p.into_inner()) = false;
        self.0 .1.notify_all();
    }
}

/// Runs `future` on `runtime` and waits for its output on this thread for
/// at most `wait`: `None` when the runtime did not get to it.
fn on_runtime<T: Send + 'static>(
    runtime: &tokio::runtime::Handle,
    future: impl std::future::Future<Output = T> + Send + 'static,
    wait: Duration,
) -> Option<T> {
    let (sender, receiver) = std::sync::mpsc::channel();
    runtime.spawn(async move {
        let _ = sender.send(future.await);
    });
    receiver.recv_timeout(wait).ok()
}

/// A state machine that blocks (a storage engine's write stall) holds up
/// only its own applies: Raft and every other task on the runtime go on.
/// With one runtime thread, an apply that ran on it stopped the node
/// outright: no status, no commits, no elections (chaos seed 2602,
/// `docs/verification.md`).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
async fn a_blocked_state_machine_does_not_stop_raft() {
    let dir = tempfile::tempdir().expect("tempdir");
    let runtime = tokio::runtime::Handle::current();
    let (host, gate, stalled) = gated_single_node(dir.path()).await;
    let first = host.propose(GROUP, Bytes::from("warm-up")).await;
    assert!(first.is_ok(), "{first:?}");

    *gate.0.lock().expect("lock") = true;
    let opener = OpenOnDrop(Arc::clone(&gate));
    let stuck = {
        let host = host.clone();
        tokio::spawn(async move { host.propose(GROUP, Bytes::from("stuck")).await })
    };
    stalled
        .recv_timeout(Duration::from_secs(10))
        .expect("the apply reached the closed gate");

    // The apply is held. Proposals must still commit, and the host must
    // still answer.
    let before = {
        let host = host.clone();
        on_runtime(
            &runtime,
            async move { host.status(GROUP).await },
            Duration::from_secs(5),
        )
        .expect("the host answers a status while an apply is held")
        .expect("status")
    };
    let later: Vec<_> = (0..10)
        .map(|i| {
            let host = host.clone();
            tokio::spawn(
                async move { host.propose(GROUP, Bytes::from(format!("later-{i}"))).await },
            )
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let host = host.clone();
        let status = on_runtime(
            &runtime,
            async move { host.status(GROUP).await },
            Duration::from_secs(5),
        )
        .expect("the host answers a status while an apply is held")
        .expect("status");
        if status.hard_state.commit.0 >= before.hard_state.commit.0 + 10 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "nothing committed while an apply was held: {status:?}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }

    // Opened, everything held is applied and answered.
    drop(opener);
    assert!(stuck.await.expect("task").is_ok());
    for proposal in later {
        assert!(proposal.await.expect("task").is_ok());
    }
    host.stop().await;
}

/// A group removed while its apply thread is held (a storage stall), and
/// started again under the same id at once, is not reached by the old
/// run's late apply report: before, that report's applied index, past the
/// new group's log, tripped an assertion in the worker and stopped every
/// group on it. The new group elects, commits and applies as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_groups_late_apply_report_does_not_reach_its_successor() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, gate, stalled) = gated_single_node(dir.path()).await;
    for i in 0..5 {
        host.propose(GROUP, Bytes::from(format!("warm-up-{i}")))
            .await
            .expect("applied");
    }
    // The old run's last apply is held at the gate, at an index past
    // anything the new run will have applied when it is released.
    *gate.0.lock().expect("lock") = true;
    let opener = OpenOnDrop(Arc::clone(&gate));
    let held = {
        let host = host.clone();
        tokio::spawn(async move { host.propose(GROUP, Bytes::from("held")).await })
    };
    stalled
        .recv_timeout(Duration::from_secs(10))
        .expect("the apply reached the closed gate");
    host.remove_group(GROUP).await.expect("removed");
    host.start_group(GROUP, vec![NodeId(1)], Box::new(KvMachine::default()))
        .expect("the id again");
    wait_for_leader(&BTreeMap::from([(1u64, host.clone())])).await;
    // Released: the old run's report comes back to a worker that now runs
    // the new group.
    drop(opener);
    let _ = held.await.expect("task");
    for i in 0..3 {
        let command = Bytes::from(format!("k{i}=v{i}"));
        let applied = tokio::time::timeout(Duration::from_secs(10), host.propose(GROUP, command))
            .await
            .expect("answered");
        assert!(applied.is_ok(), "the new group applies: {applied:?}");
    }
    let status = host.status(GROUP).await.expect("the new group runs");
    assert!(
        status.applied.0 <= status.hard_state.commit.0,
        "the new group's applied index came from its own log: {status:?}"
    );
    host.stop().await;
}

/// Fails to apply the command `fail`, as a state machine whose storage
/// broke (or that cannot read a command) does; applies the rest.
#[derive(Default)]
struct FailingMachine {
    applied: LogIndex,
}

impl StateMachine for FailingMachine {
    fn apply(&mut self, _index: LogIndex, _command: &Bytes) -> Bytes {
        panic!("the host must call apply_batch");
    }
    fn apply_batch(&mut self, commands: &[(LogIndex, Bytes)]) -> std::io::Result<Vec<Bytes>> {
        if commands
            .iter()
            .any(|(_, command)| command.as_ref() == b"fail")
        {
            return Err(std::io::Error::other("the disk is on fire"));
        }
        if let Some((last, _)) = commands.last() {
            self.applied = *last;
        }
        Ok(commands.iter().map(|_| Bytes::new()).collect())
    }
    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::new()
    }
    fn applied_index(&self) -> LogIndex {
        self.applied
    }
    fn snapshot(&self) -> Box<dyn regatta_multiraft::SnapshotSource> {
        Box::new(Bytes::new())
    }
    fn restore(&mut self, index: LogIndex, _data: &mut dyn std::io::Read) -> std::io::Result<()> {
        self.applied = index;
        Ok(())
    }
}

/// A WAL write that fails stops the group on the spot (nothing after it is
/// acknowledged), and every later request to the group names the failure.
/// The failure is a real one: the file the WAL rolls to next is taken, so
/// creating it fails, as it does on a full or read-only disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_write_stops_the_group_and_later_requests_name_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let mut config = HostConfig::new(NodeId(1), dir.path());
    config.tick_interval = Duration::from_millis(5);
    let mut wal_config = WalConfig::new(dir.path());
    wal_config.segment_size_bytes_max = 4096;
    let wal = Arc::new(Wal::open(wal_config).expect("wal"));
    let transport_handle: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let host = NodeHost::new(
        config,
        Arc::clone(&wal),
        transport_handle,
        tokio::runtime::Handle::current(),
    )
    .expect("host");
    transport.register(NodeId(1), &host);
    host.start_group(GROUP, vec![NodeId(1)], Box::new(KvMachine::default()))
        .expect("group");
    let hosts = BTreeMap::from([(1u64, host.clone())]);
    wait_for_leader(&hosts).await;
    host.propose(GROUP, Bytes::from_static(b"before=1"))
        .await
        .expect("applied");

    // Take the name of the segment after the newest one.
    let newest = std::fs::read_dir(dir.path())
        .expect("list")
        .filter_map(|entry| {
            let name = entry.expect("entry").file_name().into_string().ok()?;
            name.strip_suffix(".seg")?.parse::<u64>().ok()
        })
        .max()
        .expect("a segment");
    let taken = dir.path().join(format!("{:020}.seg", newest + 1));
    std::fs::write(&taken, b"not a segment").expect("take the next name");

    // 1 KiB proposals fill a 4 KiB segment within a few writes.
    let value = "v".repeat(1024);
    let mut acknowledged = 0;
    let failed = loop {
        let command = Bytes::from(format!("key{acknowledged}={value}"));
        match host.propose(GROUP, command).await {
            Ok(_) => acknowledged += 1,
            Err(error) => break error,
        }
        assert!(acknowledged < 100, "the WAL never rolled");
    };
    assert!(
        acknowledged >= 1,
        "the first write rolled the WAL: nothing acknowledged to check after the restart"
    );
    let named = |error: &Error| {
        let text = error.to_string();
        text.contains("persisting the group's Raft state failed")
            && text.contains(&taken.display().to_string())
    };
    // The proposal that met the failure hears of it, or of the group
    // stopping under it.
    assert!(
        named(&failed) || failed.to_string().contains("stopped"),
        "{failed}"
    );
    assert!(
        wal.failure().is_some(),
        "the WAL did not record its failure"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let later = host.status(GROUP).await;
        match &later {
            Err(error) if named(error) => break,
            _ => assert!(Instant::now() < deadline, "the reason was lost: {later:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let proposal = host
        .propose(GROUP, Bytes::from_static(b"after=1"))
        .await
        .expect_err("the group stopped");
    assert!(named(&proposal), "{proposal}");
    host.stop().await;
    drop(host);
    drop(hosts);
    transport.unregister(NodeId(1));
    drop(wal);

    // Freed again, the node restarts from its WAL with every write it
    // acknowledged before the failure.
    std::fs::remove_file(&taken).expect("free the name");
    let restarted = start_host(dir.path(), 1, &transport, &[]);
    read_until(&restarted, "before", "1").await;
    for i in 0..acknowledged {
        read_until(&restarted, &format!("key{i}"), &value).await;
    }
    restarted.stop().await;
}

/// A state machine that fails to apply stops its group, and every later
/// request to the group says why (it said "the group's worker has
/// exited"), until the group is removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_stopped_by_its_state_machine_names_the_reason_to_later_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let host = new_host(dir.path(), 1, &transport, |_| {});
    host.start_group(GROUP, vec![NodeId(1)], Box::new(FailingMachine::default()))
        .expect("group");
    let hosts = BTreeMap::from([(1u64, host.clone())]);
    wait_for_leader(&hosts).await;
    host.propose(GROUP, Bytes::from_static(b"fine"))
        .await
        .expect("applied");
    let failed = host
        .propose(GROUP, Bytes::from_static(b"fail"))
        .await
        .expect_err("the apply failed");
    assert!(
        failed.to_string().contains("the disk is on fire"),
        "{failed}"
    );
    // The worker hears of the stop a moment after the proposer does.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let later = host.status(GROUP).await;
        match &later {
            Err(error) if error.to_string().contains("the disk is on fire") => break,
            _ => assert!(Instant::now() < deadline, "the reason was lost: {later:?}"),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let proposal = host
        .propose(GROUP, Bytes::from_static(b"more"))
        .await
        .expect_err("the group stopped");
    assert!(
        proposal.to_string().contains("the disk is on fire"),
        "{proposal}"
    );
    host.remove_group(GROUP).await.expect("remove");
    host.stop().await;
}

/// Records what a host sends.
#[derive(Default)]
struct CaptureTransport {
    sent: Mutex<Vec<(GroupId, regatta_raft::Message)>>,
}

impl Transport for CaptureTransport {
    fn send(&self, messages: Vec<(GroupId, regatta_raft::Message)>) {
        self.sent.lock().expect("lock").extend(messages);
    }

    fn send_snapshot(
        &self,
        _group: GroupId,
        _message: regatta_raft::Message,
        _data: regatta_multiraft::SnapshotData,
    ) {
    }
}

/// Proposals and reads forwarded to a node whose worker is too busy to
/// take them (its inbox full) are dropped, as any message may be, but
/// their sender is told at once (`ProposeRefused` and `ReadRefused`,
/// overloaded) so that its callers retry now instead of at their
/// timeout. The host runs on a
/// current-thread runtime that the test stops driving, so that the
/// worker takes nothing from its inbox meanwhile.
#[test]
fn requests_forwarded_to_a_full_worker_are_refused_to_their_sender() {
    use regatta_raft::{EntryPayload, Message, MessageBody, ReadId, Refusal, RequestId, Term};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = Arc::new(CaptureTransport::default());
    let host = runtime.block_on(async {
        let mut config = HostConfig::new(NodeId(1), dir.path());
        config.tick_interval = Duration::from_millis(5);
        config.workers = 1;
        config.group_inbox_max = 2;
        let wal = Arc::new(Wal::open(WalConfig::new(dir.path())).expect("wal"));
        let handle: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
        let host =
            NodeHost::new(config, wal, handle, tokio::runtime::Handle::current()).expect("host");
        host.start_group(GROUP, vec![NodeId(1)], Box::new(KvMachine::default()))
            .expect("group");
        wait_for_leader(&BTreeMap::from([(1, host.clone())])).await;
        host
    });
    let forwarded = |sequence: u64| {
        let payload = EntryPayload::Session {
            id: RequestId {
                client: 9,
                sequence,
            },
            command: Bytes::from_static(b"k=v"),
        };
        Message {
            from: NodeId(2),
            to: NodeId(1),
            term: Term(0),
            body: MessageBody::Propose {
                payloads: vec![payload],
            },
        }
    };
    let read = Message {
        from: NodeId(2),
        to: NodeId(1),
        term: Term(0),
        body: MessageBody::ReadIndex {
            ids: vec![ReadId(11)],
        },
    };
    // Two fit in the inbox; the third batch does not.
    for sequence in 1..=2 {
        host.deliver(vec![(GROUP, forwarded(sequence))]);
    }
    host.deliver(vec![(GROUP, forwarded(3)), (GROUP, read)]);
    let (refusals, read_refusals) = runtime.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut refusals: Vec<(Vec<RequestId>, Refusal)> = Vec::new();
            let mut read_refusals: Vec<(Vec<ReadId>, Refusal)> = Vec::new();
            for (_, message) in transport.sent.lock().expect("lock").iter() {
                if message.to != NodeId(2) {
                    continue;
                }
                match &message.body {
                    MessageBody::ProposeRefused { ids, refusal } => {
                        refusals.push((ids.clone(), refusal.clone()))
                    }
                    MessageBody::ReadRefused { ids, refusal } => {
                        read_refusals.push((ids.clone(), refusal.clone()))
                    }
                    _ => {}
                }
            }
            if !refusals.is_empty() && !read_refusals.is_empty() {
                return (refusals, read_refusals);
            }
            assert!(Instant::now() < deadline, "no refusal was sent");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    assert_eq!(read_refusals.len(), 1, "{read_refusals:?}");
    assert_eq!(read_refusals[0].0, vec![ReadId(11)]);
    assert!(
        matches!(&read_refusals[0].1, Refusal::Overloaded { reason } if reason.contains("group_inbox_max")),
        "{read_refusals:?}"
    );
    // Only the dropped proposal is refused here: node 2 is not a member,
    // so the core ignores the two it took (a member's would be appended).
    assert_eq!(refusals.len(), 1, "{refusals:?}");
    let (ids, refusal) = &refusals[0];
    assert_eq!(
        ids,
        &vec![RequestId {
            client: 9,
            sequence: 3
        }]
    );
    match refusal {
        Refusal::Overloaded { reason } => {
            assert!(reason.contains("group_inbox_max"), "{reason}")
        }
        other => panic!("an overload refusal, got {other:?}"),
    }
    runtime.block_on(host.stop());
}

/// Node 1's host for a group of voters 1, 2 and 3, sending into a
/// capturing transport, ticking only once a second (no election of its
/// own during a test, which would fail reads as "leader changed") and
/// giving requests 30 s.
fn quiet_follower(dir: &Path) -> (NodeHost, Arc<CaptureTransport>) {
    let transport = Arc::new(CaptureTransport::default());
    let mut config = HostConfig::new(NodeId(1), dir);
    config.tick_interval = Duration::from_secs(1);
    config.request_timeout = Duration::from_secs(30);
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let handle: Arc<dyn Transport> = Arc::clone(&transport) as Arc<dyn Transport>;
    let host = NodeHost::new(config, wal, handle, tokio::runtime::Handle::current()).expect("host");
    host.start_group(
        GROUP,
        vec![NodeId(1), NodeId(2), NodeId(3)],
        Box::new(KvMachine::default()),
    )
    .expect("group");
    (host, transport)
}

/// Node 2's heartbeat as leader of term 1, to node 1.
fn heartbeat_from_node_2() -> (GroupId, regatta_raft::Message) {
    (
        GROUP,
        regatta_raft::Message {
            from: NodeId(2),
            to: NodeId(1),
            term: regatta_raft::Term(1),
            body: regatta_raft::MessageBody::Heartbeat {
                commit: regatta_raft::LogIndex(0),
                round: 1,
            },
        },
    )
}

/// The ids of every read node 1 forwarded to node 2 so far.
fn reads_forwarded_to_node_2(transport: &CaptureTransport) -> Vec<regatta_raft::ReadId> {
    transport
        .sent
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, message)| message.to == NodeId(2))
        .filter_map(|(_, message)| match &message.body {
            regatta_raft::MessageBody::ReadIndex { ids } => Some(ids.clone()),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A read asked in the same worker turn as the message that makes the
/// leader known goes to that leader and waits for its answer: the leader
/// change the turn reports does not fail it (it failed with `NotLeader`,
/// and its caller had to retry for nothing).
#[tokio::test]
async fn a_read_forwarded_as_its_leader_becomes_known_is_answered() {
    use regatta_raft::{LogIndex, Message, MessageBody, Term};
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, transport) = quiet_follower(dir.path());
    // Let the group start, so that its first turn is behind it.
    tokio::time::sleep(Duration::from_millis(50)).await;
    // On this single-threaded runtime nothing else runs until this task
    // waits: the heartbeat that makes node 2 the known leader and the read
    // are both queued before the worker's next turn, which takes them
    // together.
    host.deliver(vec![heartbeat_from_node_2()]);
    let read = host.read_linearizable(GROUP, Bytes::new());
    tokio::pin!(read);
    // Polled once: the read is queued, and waits for its answer.
    tokio::select! {
        biased;
        answer = &mut read => panic!("answered at once: {answer:?}"),
        () = std::future::ready(()) => {}
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let ids = loop {
        let ids = reads_forwarded_to_node_2(&transport);
        if !ids.is_empty() {
            break ids;
        }
        assert!(Instant::now() < deadline, "the read was not forwarded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    // The worker's turn has reported the new leader by now.
    tokio::time::sleep(Duration::from_millis(20)).await;
    tokio::select! {
        biased;
        answer = &mut read => panic!("the read ended before its answer came: {answer:?}"),
        () = std::future::ready(()) => {}
    }
    host.deliver(vec![(
        GROUP,
        Message {
            from: NodeId(2),
            to: NodeId(1),
            term: Term(1),
            body: MessageBody::ReadIndexResponse {
                index: LogIndex(0),
                ids,
            },
        },
    )]);
    let answer = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("answered");
    assert!(answer.is_ok(), "{answer:?}");
    host.stop().await;
}

/// A follower whose forwarded read is refused (`ReadRefused`) fails that
/// read at once with the leader's reason, instead of holding its caller
/// until the request timeout; other reads are not touched.
#[tokio::test]
async fn a_refused_forwarded_read_fails_at_once() {
    use regatta_raft::{Message, MessageBody, Refusal, Term};
    let dir = tempfile::tempdir().expect("tempdir");
    let (host, transport) = quiet_follower(dir.path());
    // Node 2 leads term 1 (node 1 hears its heartbeat, and answers into
    // the capturing transport).
    host.deliver(vec![heartbeat_from_node_2()]);
    let forwarded_ids = || reads_forwarded_to_node_2(&transport);
    let refused = {
        let host = host.clone();
        tokio::spawn(async move { host.read_linearizable(GROUP, Bytes::new()).await })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while forwarded_ids().is_empty() {
        assert!(Instant::now() < deadline, "the read was not forwarded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let first = forwarded_ids();
    let kept = {
        let host = host.clone();
        tokio::spawn(async move { host.read_linearizable(GROUP, Bytes::new()).await })
    };
    while forwarded_ids().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the second read was not forwarded"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let started = Instant::now();
    host.deliver(vec![(
        GROUP,
        Message {
            from: NodeId(2),
            to: NodeId(1),
            term: Term(0),
            body: MessageBody::ReadRefused {
                ids: first,
                refusal: Refusal::Overloaded {
                    reason: "pending_reads_max".into(),
                },
            },
        },
    )]);
    let answer = tokio::time::timeout(Duration::from_secs(5), refused)
        .await
        .expect("answered before the request timeout")
        .expect("task");
    match answer {
        Err(regatta_multiraft::Error::Raft {
            source: regatta_raft::Error::LeaderOverloaded { reason },
            ..
        }) => assert!(reason.contains("pending_reads_max"), "{reason}"),
        other => panic!("a refusal, got {other:?}"),
    }
    assert!(started.elapsed() < Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!kept.is_finished(), "the other read is still waiting");
    kept.abort();
    host.stop().await;
}
