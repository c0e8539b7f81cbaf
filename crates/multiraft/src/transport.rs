//! How a node host hands Raft messages to other nodes: the [`Transport`]
//! trait, which `TcpTransport` implements (`docs/transport-format.md`),
//! and [`LocalTransport`], which connects hosts in one process, for tests,
//! with partitions.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, RwLock};

use regatta_raft::{Message, NodeId};
use regatta_wal::GroupId;

use crate::error::UnsentCause;
use crate::host::{NodeHost, WeakNodeHost};
use crate::snapshot::SnapshotData;

/// Delivers messages to other nodes; never blocks, may drop (Raft
/// retransmits), and counts what it drops.
pub trait Transport: Send + Sync + 'static {
    /// Sends messages of any groups, each with its group; each message
    /// carries its receiver. Messages to one receiver keep their order.
    fn send(&self, messages: Vec<(GroupId, Message)>);

    /// Sends a snapshot message with the state it stands for, apart from
    /// the other messages, and reports the outcome to the sending host
    /// (`NodeHost::report_snapshot`): Raft waits for that report.
    fn send_snapshot(&self, group: GroupId, message: Message, data: SnapshotData);
}

/// Hosts in one process, wired together directly.
#[derive(Default)]
pub struct LocalTransport {
    hosts: RwLock<BTreeMap<NodeId, WeakNodeHost>>,
    blocked: Mutex<BTreeSet<(NodeId, NodeId)>>,
    /// Messages handed to a host, and messages a cut dropped, by kind
    /// (`MessageBody::kind_name`), for tests to check what travelled.
    delivered: Mutex<BTreeMap<&'static str, u64>>,
    cut_off: Mutex<BTreeMap<&'static str, u64>>,
}

impl LocalTransport {
    /// An empty network.
    pub fn new() -> Arc<LocalTransport> {
        Arc::new(LocalTransport::default())
    }

    /// Connects a host (held weakly: the host owns its transport).
    pub fn register(&self, id: NodeId, host: &NodeHost) {
        self.hosts
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, host.downgrade());
    }

    /// Disconnects a host (a crash). The others notice the lost peer and
    /// wake their quiesced groups, as the TCP transport does.
    pub fn unregister(&self, id: NodeId) {
        let mut hosts = self.hosts.write().unwrap_or_else(|p| p.into_inner());
        hosts.remove(&id);
        for host in hosts.values().filter_map(WeakNodeHost::upgrade) {
            host.wake_all();
        }
    }

    /// Cuts both directions between two nodes.
    pub fn cut(&self, a: NodeId, b: NodeId) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        blocked.insert((a, b));
        blocked.insert((b, a));
    }

    /// Cuts the direction from `from` to `to` only.
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        let mut blocked = self.blocked.lock().unwrap_or_else(|p| p.into_inner());
        blocked.insert((from, to));
    }

    /// Messages of `kind` (`MessageBody::kind_name`) handed to a host so
    /// far.
    pub fn delivered(&self, kind: &str) -> u64 {
        let delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
        delivered.get(kind).copied().unwrap_or(0)
    }

    /// Messages of `kind` that a cut dropped so far.
    pub fn cut_off(&self, kind: &str) -> u64 {
        let cut_off = self.cut_off.lock().unwrap_or_else(|p| p.into_inner());
        cut_off.get(kind).copied().unwrap_or(0)
    }

    /// Restores every link.
    pub fn heal(&self) {
        self.blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }
}

impl Transport for LocalTransport {
    fn send_snapshot(&self, group: GroupId, message: Message, data: SnapshotData) {
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        let blocked = self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&(message.from, message.to));
        let (from, to) = (message.from, message.to);
        let receiver = hosts.get(&to).and_then(WeakNodeHost::upgrade);
        let delivered =
            !blocked && receiver.is_some_and(|host| host.deliver_snapshot(group, message, data));
        if let Some(sender) = hosts.get(&from).and_then(WeakNodeHost::upgrade) {
            sender.report_snapshot(group, to, delivered);
        }
    }

    fn send(&self, messages: Vec<(GroupId, Message)>) {
        let hosts = self.hosts.read().unwrap_or_else(|p| p.into_inner());
        let blocked = self
            .blocked
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut by_receiver: BTreeMap<NodeId, Vec<(GroupId, Message)>> = BTreeMap::new();
        let mut cut = Vec::new();
        let mut sender = None;
        for (group, message) in messages {
            sender.get_or_insert(message.from);
            if blocked.contains(&(message.from, message.to)) {
                cut.push((group, message));
            } else {
                by_receiver
                    .entry(message.to)
                    .or_default()
                    .push((group, message));
            }
        }
        {
            let mut cut_off = self.cut_off.lock().unwrap_or_else(|p| p.into_inner());
            for (_, message) in &cut {
                *cut_off.entry(message.body.kind_name()).or_default() += 1;
            }
            let mut delivered = self.delivered.lock().unwrap_or_else(|p| p.into_inner());
            for (_, message) in by_receiver.values().flatten() {
                *delivered.entry(message.body.kind_name()).or_default() += 1;
            }
        }
        let mut gone = Vec::new();
        for (to, batch) in by_receiver {
            match hosts.get(&to).and_then(WeakNodeHost::upgrade) {
                Some(host) => host.deliver(batch),
                None => gone.extend(batch),
            }
        }
        // As the TCP transport does for a peer it cannot reach.
        if let Some(host) = sender.and_then(|from| hosts.get(&from)?.upgrade()) {
            host.report_unsent(&cut, UnsentCause::Unreachable);
            host.report_unsent(&gone, UnsentCause::Unreachable);
        }
    }
}
