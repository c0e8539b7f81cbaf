//! Quiescence: idle groups stop ticking (no heartbeats, no election
//! timers), wake on work, and wake when a peer is lost so that a dead
//! leader is still replaced.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use regatta_multiraft::{HostConfig, LocalTransport, NodeHost, StateMachine, Transport};
use regatta_raft::{LogIndex, NodeId, Role};
use regatta_wal::{GroupId, Wal, WalConfig};

#[derive(Default)]
struct Counter {
    applied: LogIndex,
}

impl StateMachine for Counter {
    fn apply(&mut self, index: LogIndex, _command: &Bytes) -> Bytes {
        self.applied = index;
        Bytes::new()
    }

    fn read(&self, _query: &Bytes) -> Bytes {
        Bytes::from(self.applied.0.to_string())
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

fn host(dir: &Path, id: u64, transport: &Arc<LocalTransport>) -> NodeHost {
    let mut config = HostConfig::new(NodeId(id), dir);
    config.tick_interval = Duration::from_millis(5);
    config.quiesce_after_ticks = 20;
    let wal = Arc::new(Wal::open(WalConfig::new(dir)).expect("wal"));
    let as_transport: Arc<dyn Transport> = Arc::clone(transport) as Arc<dyn Transport>;
    let host =
        NodeHost::new(config, wal, as_transport, tokio::runtime::Handle::current()).expect("host");
    transport.register(NodeId(id), &host);
    host
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// 1,000 idle single-node groups all stop ticking; a proposal wakes its
/// group, which goes quiet again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_groups_quiesce_and_wake_on_work() {
    let dir = tempfile::tempdir().expect("tempdir");
    let transport = LocalTransport::new();
    let host = host(dir.path(), 1, &transport);
    let groups = 1000u64;
    for group in 1..=groups {
        host.start_group(
            GroupId(group),
            vec![NodeId(1)],
            Box::new(Counter::default()),
        )
        .expect("group");
    }
    wait_until("every group to quiesce", || {
        host.quiesced_group_count() == groups
    })
    .await;
    host.propose(GroupId(500), Bytes::from_static(b"work"))
        .await
        .expect("a quiesced group still commits");
    assert!(
        host.quiesced_group_count() < groups,
        "the proposal woke its group"
    );
    wait_until("the group to go quiet again", || {
        host.quiesced_group_count() == groups
    })
    .await;
    host.stop().await;
}

/// A quiesced three-node group whose leader dies elects a new leader: the
/// lost peer wakes the survivors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiesced_group_replaces_a_dead_leader() {
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    let transport = LocalTransport::new();
    let group = GroupId(9);
    let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
    let mut hosts = BTreeMap::new();
    for id in 1..=3u64 {
        let node = host(dirs[id as usize - 1].path(), id, &transport);
        node.start_group(group, voters.clone(), Box::new(Counter::default()))
            .expect("group");
        hosts.insert(id, node);
    }
    let mut leader = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while leader == 0 {
        for (id, node) in &hosts {
            if node.status(group).await.expect("status").soft_state.role == Role::Leader {
                leader = *id;
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    hosts[&leader]
        .propose(group, Bytes::from_static(b"before"))
        .await
        .expect("commit");
    wait_until("all three to quiesce", || {
        hosts.values().all(|node| node.quiesced_group_count() == 1)
    })
    .await;

    transport.unregister(NodeId(leader));
    let dead = hosts.remove(&leader).expect("leader");
    dead.stop().await;
    drop(dead);
    let deadline = Instant::now() + Duration::from_secs(20);
    let new_leader = loop {
        let mut found = None;
        for (id, node) in &hosts {
            if node.status(group).await.expect("status").soft_state.role == Role::Leader {
                found = Some(*id);
            }
        }
        if let Some(id) = found {
            break id;
        }
        assert!(
            Instant::now() < deadline,
            "no new leader after the old one died"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    hosts[&new_leader]
        .propose(group, Bytes::from_static(b"after"))
        .await
        .expect("commit with 2 of 3");
    for node in hosts.values() {
        node.stop().await;
    }
}
