//! A small deterministic cluster for scenario tests: synchronous
//! persistence, a FIFO network the test controls, and per-node records of
//! applied entries and confirmed reads.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use bytes::Bytes;
use regatta_raft::{
    Config, Entry, EntryPayload, LogIndex, MemStorage, Message, MessageBody, NodeId, RaftNode,
    ReadId, ReadState, RequestId, Role, Term,
};

pub fn n(id: u64) -> NodeId {
    NodeId(id)
}

pub struct Cluster {
    pub nodes: BTreeMap<NodeId, RaftNode<MemStorage>>,
    pub queue: VecDeque<Message>,
    pub blocked: BTreeSet<(NodeId, NodeId)>,
    /// Every message delivered, for tests that count them.
    pub delivered: Vec<Message>,
    pub applied: BTreeMap<NodeId, Vec<Entry>>,
    pub reads: BTreeMap<NodeId, Vec<ReadState>>,
    /// Forwarded proposals the leader refused, by the node that forwarded.
    pub refused: BTreeMap<NodeId, Vec<(RequestId, regatta_raft::Error)>>,
    /// Forwarded reads the receiver refused, by the node that forwarded.
    pub refused_reads: BTreeMap<NodeId, Vec<(ReadId, regatta_raft::Error)>>,
    /// Nodes whose state machine takes committed entries but does not
    /// report them applied (a slow apply path).
    pub applies_held: BTreeSet<NodeId>,
    pub config: fn(&mut Config),
}

fn no_change(_: &mut Config) {}

impl Cluster {
    /// A bootstrapped cluster of `voters` with default settings.
    pub fn new(voters: &[u64]) -> Cluster {
        Cluster::with_config(voters, no_change)
    }

    pub fn with_config(voters: &[u64], config: fn(&mut Config)) -> Cluster {
        let mut cluster = Cluster {
            nodes: BTreeMap::new(),
            queue: VecDeque::new(),
            blocked: BTreeSet::new(),
            delivered: Vec::new(),
            applied: BTreeMap::new(),
            reads: BTreeMap::new(),
            refused: BTreeMap::new(),
            refused_reads: BTreeMap::new(),
            applies_held: BTreeSet::new(),
            config,
        };
        let initial: Vec<NodeId> = voters.iter().copied().map(NodeId).collect();
        for id in voters {
            cluster.start(NodeId(*id), MemStorage::new(), &initial);
        }
        cluster
    }

    pub fn config_for(&self, id: NodeId, initial_voters: &[NodeId]) -> Config {
        let mut config = Config::new(id);
        config.initial_voters = initial_voters.to_vec();
        (self.config)(&mut config);
        config
    }

    pub fn start(&mut self, id: NodeId, storage: MemStorage, initial_voters: &[NodeId]) {
        let config = self.config_for(id, initial_voters);
        let node = RaftNode::new(config, storage).expect("valid config");
        self.nodes.insert(id, node);
    }

    /// Adds an empty node that will join through a membership change.
    pub fn add_empty(&mut self, id: u64) {
        self.start(NodeId(id), MemStorage::new(), &[]);
    }

    /// Stops a node; its storage is returned for a restart.
    pub fn stop(&mut self, id: u64) -> MemStorage {
        let node = self.nodes.remove(&NodeId(id)).expect("node exists");
        node.storage().clone()
    }

    pub fn restart(&mut self, id: u64, storage: MemStorage) {
        let applied = self
            .applied
            .get(&NodeId(id))
            .and_then(|entries| entries.last())
            .map(|entry| entry.index)
            .unwrap_or_default();
        let mut config = self.config_for(NodeId(id), &[]);
        config.applied = applied;
        let node = RaftNode::new(config, storage).expect("valid config");
        self.nodes.insert(NodeId(id), node);
    }

    pub fn node(&mut self, id: u64) -> &mut RaftNode<MemStorage> {
        self.nodes.get_mut(&NodeId(id)).expect("node exists")
    }

    pub fn role(&self, id: u64) -> Role {
        self.nodes[&NodeId(id)].role()
    }

    pub fn term(&self, id: u64) -> Term {
        self.nodes[&NodeId(id)].term()
    }

    /// Handles every ready of one node: persist, acknowledge, queue messages.
    pub fn process(&mut self, id: NodeId) {
        let Some(node) = self.nodes.get_mut(&id) else {
            return;
        };
        while node.has_ready() {
            let ready = node.ready().expect("ready");
            self.queue.extend(ready.messages);
            if let Some(snapshot) = ready.snapshot.clone() {
                node.storage_mut().apply_snapshot(snapshot);
            }
            node.storage_mut().append(&ready.entries);
            if let Some(hard_state) = ready.hard_state {
                node.storage_mut().set_hard_state(hard_state);
            }
            node.on_persisted(ready.number);
            self.queue.extend(ready.persisted_messages);
            if let Some(last) = ready.committed_entries.last() {
                if !self.applies_held.contains(&id) {
                    node.advance_apply(last.index);
                }
            }
            self.refused.entry(id).or_default().extend(
                ready
                    .refused_proposals
                    .into_iter()
                    .flat_map(|(ids, error)| ids.into_iter().map(move |id| (id, error.clone()))),
            );
            self.refused_reads.entry(id).or_default().extend(
                ready
                    .refused_reads
                    .into_iter()
                    .flat_map(|(ids, error)| ids.into_iter().map(move |id| (id, error.clone()))),
            );
            self.applied
                .entry(id)
                .or_default()
                .extend(ready.committed_entries);
            self.reads.entry(id).or_default().extend(ready.read_states);
        }
    }

    /// Reports every entry handed to a held node's state machine applied,
    /// and stops holding its applies.
    pub fn release_applies(&mut self, id: u64) {
        self.applies_held.remove(&NodeId(id));
        let last = self.applied[&NodeId(id)].last().map(|entry| entry.index);
        if let Some(last) = last {
            self.node(id).advance_apply(last);
        }
        self.process(NodeId(id));
    }

    pub fn process_all(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            self.process(id);
        }
    }

    /// Delivers one queued message; false when the queue is empty.
    pub fn deliver_one(&mut self) -> bool {
        let Some(message) = self.queue.pop_front() else {
            return false;
        };
        if self.blocked.contains(&(message.from, message.to)) {
            return true;
        }
        self.delivered.push(message.clone());
        let to = message.to;
        let from = message.from;
        let is_snapshot = matches!(message.body, MessageBody::Snapshot { .. });
        let delivered = match self.nodes.get_mut(&to) {
            Some(node) => {
                node.step(message).expect("step");
                true
            }
            None => false,
        };
        if is_snapshot {
            // The transport reports the end of a snapshot stream.
            if let Some(sender) = self.nodes.get_mut(&from) {
                sender.report_snapshot(to, delivered);
            }
            self.process(from);
        }
        self.process(to);
        true
    }

    /// Runs until no message is left.
    pub fn settle(&mut self) {
        self.process_all();
        let mut steps = 0;
        while self.deliver_one() {
            steps += 1;
            assert!(steps < 1_000_000, "the cluster never settles");
        }
    }

    pub fn tick(&mut self, id: u64) {
        self.node(id).tick();
        self.process(NodeId(id));
    }

    /// Ticks every node `count` times, settling after each round.
    pub fn tick_all(&mut self, count: u64) {
        for _ in 0..count {
            let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
            for id in ids {
                self.node(id.0).tick();
            }
            self.settle();
        }
    }

    /// Makes `id` campaign and settles; asserts it won.
    pub fn elect(&mut self, id: u64) {
        self.node(id).campaign();
        self.settle();
        assert_eq!(self.role(id), Role::Leader, "node {id} should have won");
    }

    pub fn isolate(&mut self, id: u64) {
        let others: Vec<NodeId> = self.nodes.keys().copied().filter(|n| n.0 != id).collect();
        for other in others {
            self.blocked.insert((NodeId(id), other));
            self.blocked.insert((other, NodeId(id)));
        }
    }

    pub fn cut(&mut self, a: u64, b: u64) {
        self.blocked.insert((NodeId(a), NodeId(b)));
        self.blocked.insert((NodeId(b), NodeId(a)));
    }

    pub fn heal(&mut self) {
        self.blocked.clear();
    }

    pub fn propose(&mut self, id: u64, data: &str) -> regatta_raft::Result<regatta_raft::Proposed> {
        let result = self.node(id).propose(vec![Bytes::from(data.to_string())]);
        self.process(NodeId(id));
        result
    }

    /// The application commands a node applied, in order.
    pub fn applied_commands(&self, id: u64) -> Vec<String> {
        self.applied
            .get(&NodeId(id))
            .map(|entries| {
                entries
                    .iter()
                    .filter_map(|entry| match &entry.payload {
                        EntryPayload::Normal(data) => {
                            Some(String::from_utf8_lossy(data).into_owned())
                        }
                        _ => None,
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn commit(&self, id: u64) -> LogIndex {
        self.nodes[&NodeId(id)].status().hard_state.commit
    }

    pub fn last_index(&self, id: u64) -> LogIndex {
        self.nodes[&NodeId(id)].last_index()
    }

    pub fn read(&mut self, id: u64, read: u64) -> regatta_raft::Result<()> {
        let result = self.node(id).read_index(ReadId(read));
        self.process(NodeId(id));
        result
    }

    pub fn confirmed_reads(&self, id: u64) -> Vec<ReadState> {
        self.reads.get(&NodeId(id)).cloned().unwrap_or_default()
    }

    /// Messages of one kind delivered so far.
    pub fn count_delivered(&self, kind: &str) -> usize {
        self.delivered
            .iter()
            .filter(|message| message.body.kind_name() == kind)
            .count()
    }

    /// Drops every queued message matching `predicate`.
    pub fn drop_queued(&mut self, predicate: impl Fn(&Message) -> bool) {
        self.queue.retain(|message| !predicate(message));
    }
}

pub fn is_append_to(message: &Message, to: u64) -> bool {
    message.to == NodeId(to) && matches!(message.body, MessageBody::Append { .. })
}
