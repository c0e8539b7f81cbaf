//! `RaftNode::commit`: committed entries per second for a 3-node group
//! driven in memory (no I/O, no network), 64-byte entries, one batch of
//! proposals committed per iteration. This measures the consensus core's
//! own cost, which must stay far below the cost of an fsync.

#![allow(missing_docs)] // criterion_group! generates undocumented items.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use regatta_raft::{Config, LogIndex, MemStorage, Message, NodeId, RaftNode, Role};

const ENTRY_BYTES: usize = 64;
/// Compact every node's log after this many entries to bound memory.
const COMPACT_EVERY_ENTRIES: u64 = 16_384;

struct Group {
    nodes: Vec<RaftNode<MemStorage>>,
    queue: Vec<Message>,
    since_compaction: u64,
}

impl Group {
    fn new() -> Group {
        let voters = vec![NodeId(1), NodeId(2), NodeId(3)];
        let nodes = voters
            .iter()
            .map(|id| {
                let mut config = Config::new(*id);
                config.initial_voters = voters.clone();
                RaftNode::new(config, MemStorage::new()).expect("valid config")
            })
            .collect();
        let mut group = Group {
            nodes,
            queue: Vec::new(),
            since_compaction: 0,
        };
        group.nodes[0].campaign();
        group.drive();
        assert_eq!(group.nodes[0].role(), Role::Leader);
        group
    }

    /// Runs every node until no ready and no message is left.
    fn drive(&mut self) {
        loop {
            for node in &mut self.nodes {
                while node.has_ready() {
                    let ready = node.ready().expect("ready");
                    self.queue.extend(ready.messages);
                    let storage = node.storage_mut();
                    if let Some(snapshot) = ready.snapshot {
                        storage.apply_snapshot(snapshot);
                    }
                    storage.append(&ready.entries);
                    if let Some(hard_state) = ready.hard_state {
                        storage.set_hard_state(hard_state);
                    }
                    node.on_persisted(ready.number);
                    self.queue.extend(ready.persisted_messages);
                    if let Some(last) = ready.committed_entries.last() {
                        node.advance_apply(last.index);
                    }
                }
            }
            if self.queue.is_empty() {
                return;
            }
            for message in self.queue.drain(..) {
                let to = message.to.0 as usize - 1;
                self.nodes[to].step(message).expect("step");
            }
        }
    }

    fn commit_batch(&mut self, batch: &[Bytes]) {
        self.nodes[0].propose(batch.to_vec()).expect("leader");
        self.drive();
        self.since_compaction += batch.len() as u64;
        if self.since_compaction >= COMPACT_EVERY_ENTRIES {
            self.compact();
        }
    }

    fn compact(&mut self) {
        self.since_compaction = 0;
        for node in &mut self.nodes {
            let applied: LogIndex = node.status().applied;
            let meta = node.snapshot_meta_at(applied).expect("meta");
            node.storage_mut().create_snapshot(meta);
        }
    }
}

fn commit(c: &mut Criterion) {
    let mut group = c.benchmark_group("RaftNode::commit");
    for batch_size in [1usize, 64] {
        let batch: Vec<Bytes> = (0..batch_size)
            .map(|i| Bytes::from(vec![i as u8; ENTRY_BYTES]))
            .collect();
        group.throughput(Throughput::Elements(batch_size as u64));
        group.bench_with_input(
            BenchmarkId::new("3_nodes_64B", format!("batch_{batch_size}")),
            &batch,
            |b, batch| {
                let mut raft_group = Group::new();
                b.iter(|| raft_group.commit_batch(batch));
            },
        );
    }
    group.finish();
}

criterion_group!(benches, commit);
criterion_main!(benches);
