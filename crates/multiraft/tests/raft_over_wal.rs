//! Raft groups on the real WAL, driven synchronously: every `Ready` is
//! persisted through `Wal::append` and read back through `GroupStorage`.
//! Three nodes host two groups that share each node's WAL; a node restarts
//! from its WAL alone; a new node joins through a snapshot after the
//! leader compacted its log.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use regatta_multiraft::GroupStorage;
use regatta_raft::{
    ConfChange, Config, EntryPayload, LogIndex, Message, MessageBody, NodeId, RaftNode, Role,
};
use regatta_wal::{GroupId, Wal, WalConfig, WriteBatch};

const GROUPS: [GroupId; 2] = [GroupId(1), GroupId(2)];

struct Node {
    wal: Arc<Wal>,
    groups: BTreeMap<GroupId, RaftNode<GroupStorage>>,
    /// Applied commands per group: the state machine of this test.
    applied: BTreeMap<GroupId, Vec<String>>,
}

struct Cluster {
    dirs: BTreeMap<NodeId, tempfile::TempDir>,
    nodes: BTreeMap<NodeId, Node>,
    queue: VecDeque<(GroupId, Message)>,
}

fn open_node(
    dir: &Path,
    id: NodeId,
    voters: &[NodeId],
    applied: &BTreeMap<GroupId, Vec<String>>,
) -> Node {
    let mut config = WalConfig::new(dir);
    config.segment_size_bytes_max = 64 * 1024;
    let wal = Arc::new(Wal::open(config).expect("open wal"));
    let mut groups = BTreeMap::new();
    for group in GROUPS {
        let mut config = Config::new(id);
        config.initial_voters = voters.to_vec();
        config.applied = wal
            .hard_state(group)
            .commit
            .min(LogIndex(applied_index(applied, group)));
        let storage = GroupStorage::new(Arc::clone(&wal), group);
        groups.insert(
            group,
            RaftNode::new(config, storage).expect("raft over wal"),
        );
    }
    Node {
        wal,
        groups,
        applied: applied.clone(),
    }
}

/// Entries applied so far: commands plus the bootstrap and no-ops, which
/// this state machine counts but does not record.
fn applied_index(applied: &BTreeMap<GroupId, Vec<String>>, group: GroupId) -> u64 {
    applied
        .get(&group)
        .and_then(|commands| commands.last())
        .and_then(|last| last.split('@').nth(1))
        .and_then(|i| i.parse().ok())
        .unwrap_or(0)
}

impl Cluster {
    fn new(voters: &[u64]) -> Cluster {
        let voters: Vec<NodeId> = voters.iter().copied().map(NodeId).collect();
        let mut cluster = Cluster {
            dirs: BTreeMap::new(),
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
        };
        for id in &voters {
            let dir = tempfile::tempdir().expect("tempdir");
            let node = open_node(dir.path(), *id, &voters, &BTreeMap::new());
            cluster.dirs.insert(*id, dir);
            cluster.nodes.insert(*id, node);
        }
        cluster
    }

    fn raft(&mut self, id: u64, group: GroupId) -> &mut RaftNode<GroupStorage> {
        self.nodes
            .get_mut(&NodeId(id))
            .expect("node")
            .groups
            .get_mut(&group)
            .expect("group")
    }

    /// Handles every ready of every group of a node through its WAL.
    fn process(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        for (group, raft) in node.groups.iter_mut() {
            while raft.has_ready() {
                let ready = raft.ready().expect("ready");
                self.queue
                    .extend(ready.messages.into_iter().map(|m| (*group, m)));
                let mut batch = WriteBatch::new();
                if let Some(meta) = ready.snapshot.clone() {
                    // The state machine installs the leader's state: here,
                    // the commands are recovered from the leader's record.
                    batch.install_snapshot(*group, meta);
                }
                if !ready.entries.is_empty() {
                    batch.entries(*group, ready.entries.clone());
                }
                if let Some(hard_state) = ready.hard_state {
                    batch.hard_state(*group, hard_state);
                }
                node.wal.append(batch).expect("persist");
                raft.on_persisted(ready.number);
                self.queue
                    .extend(ready.persisted_messages.into_iter().map(|m| (*group, m)));
                for entry in &ready.committed_entries {
                    if let EntryPayload::Normal(data) = &entry.payload {
                        let command = format!("{}@{}", String::from_utf8_lossy(data), entry.index);
                        node.applied.entry(*group).or_default().push(command);
                    }
                }
                if let Some(last) = ready.committed_entries.last() {
                    raft.advance_apply(last.index);
                }
            }
        }
    }

    fn settle(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in &ids {
            self.process(*id);
        }
        let mut steps = 0;
        while let Some((group, message)) = self.queue.pop_front() {
            steps += 1;
            assert!(steps < 200_000, "never settles");
            let (from, to) = (message.from, message.to);
            let is_snapshot = matches!(message.body, MessageBody::Snapshot { .. });
            if is_snapshot {
                self.copy_state_for_snapshot(group, from, to);
            }
            let delivered = match self.nodes.get_mut(&to) {
                Some(node) => {
                    node.groups
                        .get_mut(&group)
                        .expect("group")
                        .step(message)
                        .expect("step");
                    true
                }
                None => false,
            };
            if is_snapshot {
                if let Some(node) = self.nodes.get_mut(&from) {
                    node.groups
                        .get_mut(&group)
                        .expect("group")
                        .report_snapshot(to, delivered);
                }
                self.process(from);
            }
            self.process(to);
        }
    }

    /// The test's stand-in for snapshot streaming: the receiver's state
    /// machine becomes the sender's.
    fn copy_state_for_snapshot(&mut self, group: GroupId, from: NodeId, to: NodeId) {
        let state = self.nodes[&from]
            .applied
            .get(&group)
            .cloned()
            .unwrap_or_default();
        if let Some(node) = self.nodes.get_mut(&to) {
            node.applied.insert(group, state);
        }
    }

    fn propose(&mut self, id: u64, group: GroupId, command: &str) {
        self.raft(id, group)
            .propose(vec![Bytes::from(command.to_string())])
            .expect("leader");
        self.process(NodeId(id));
    }

    fn commands(&self, id: u64, group: GroupId) -> Vec<String> {
        self.nodes[&NodeId(id)]
            .applied
            .get(&group)
            .map(|commands| {
                commands
                    .iter()
                    .map(|c| c.split('@').next().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn restart(&mut self, id: u64) {
        let node = self.nodes.remove(&NodeId(id)).expect("node");
        let applied = node.applied.clone();
        drop(node);
        let dir = self.dirs[&NodeId(id)].path().to_path_buf();
        let node = open_node(&dir, NodeId(id), &[], &applied);
        self.nodes.insert(NodeId(id), node);
    }
}

/// Two groups share each node's WAL, commit, and survive a restart that
/// rebuilds Raft from the WAL alone.
#[test]
fn groups_share_a_wal_and_recover_from_it() {
    let mut c = Cluster::new(&[1, 2, 3]);
    for group in GROUPS {
        c.raft(1, group).campaign();
    }
    c.settle();
    for group in GROUPS {
        assert_eq!(c.raft(1, group).role(), Role::Leader);
        for i in 0..50 {
            c.propose(1, group, &format!("g{}-{i}", group.0));
        }
    }
    c.settle();
    for id in [1, 2, 3] {
        for group in GROUPS {
            assert_eq!(
                c.commands(id, group).len(),
                50,
                "node {id} group {}",
                group.0
            );
        }
    }
    let before = c.raft(2, GroupId(1)).status();
    c.restart(2);
    let after = c.raft(2, GroupId(1)).status();
    assert_eq!(after.hard_state.term, before.hard_state.term);
    assert_eq!(after.hard_state.vote, before.hard_state.vote);
    assert_eq!(after.last_index, before.last_index);
    assert_eq!(after.membership, before.membership);
    for group in GROUPS {
        c.propose(1, group, "after-restart");
    }
    c.settle();
    c.raft(1, GroupId(1)).tick();
    c.settle();
    for group in GROUPS {
        let commands = c.commands(2, group);
        assert_eq!(
            commands.len(),
            51,
            "no entry applied twice or lost on node 2"
        );
        assert_eq!(commands.last().map(String::as_str), Some("after-restart"));
    }
}

/// After the leader compacts its log, a joining node can only catch up
/// through a snapshot; it installs it and then follows the log.
#[test]
fn a_new_node_joins_through_a_snapshot_after_compaction() {
    let mut c = Cluster::new(&[1, 2, 3]);
    let group = GroupId(1);
    c.raft(1, group).campaign();
    c.settle();
    for i in 0..30 {
        c.propose(1, group, &format!("e{i}"));
    }
    c.settle();
    let leader = c.raft(1, group);
    let applied = leader.status().applied;
    let meta = leader.snapshot_meta_at(applied).expect("meta");
    let wal = Arc::clone(&c.nodes[&NodeId(1)].wal);
    let mut batch = WriteBatch::new();
    batch
        .snapshot(group, meta.clone())
        .compact(group, meta.index);
    wal.append(batch).expect("compact");
    assert_eq!(wal.first_index(group), meta.index.next());

    let dir = tempfile::tempdir().expect("tempdir");
    let joining = open_node(dir.path(), NodeId(4), &[], &BTreeMap::new());
    c.dirs.insert(NodeId(4), dir);
    c.nodes.insert(NodeId(4), joining);
    c.raft(1, group)
        .propose_conf_change(ConfChange::AddLearner {
            node: NodeId(4),
            auto_promote: true,
        })
        .expect("add");
    c.settle();
    for _ in 0..3 {
        c.raft(1, group).tick();
        c.settle();
    }
    c.propose(1, group, "after-join");
    c.settle();
    let joined = c.raft(4, group).status();
    assert!(
        joined.first_index > LogIndex(1),
        "node 4 started from a snapshot"
    );
    assert!(
        joined.membership.voters.contains(&NodeId(4)),
        "auto-promoted"
    );
    let commands = c.commands(4, group);
    assert_eq!(commands.len(), 31);
    assert_eq!(commands.last().map(String::as_str), Some("after-join"));
    assert_eq!(
        c.nodes[&NodeId(4)].wal.snapshot(group).map(|m| m.index),
        Some(meta.index)
    );
}
