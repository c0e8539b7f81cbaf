//! `regatta-raft`: a deterministic, sans-IO Raft consensus core for one group.
//!
//! The core owns no clock, thread, socket or file. A runtime drives a
//! [`RaftNode`] with [`RaftNode::tick`], [`RaftNode::step`] and client calls,
//! and carries out the [`Ready`] batches it hands back: send messages,
//! persist entries and hard state, apply committed entries. Because every
//! input is explicit, a seeded simulation replays any run exactly.
//!
//! Features: leader election with PreVote, CheckQuorum and leader stickiness;
//! pipelined log replication with per-follower flow control and fast
//! conflict back-off; ReadIndex reads batched per heartbeat round and opt-in
//! lease reads; leadership transfer; single-server membership changes with
//! learners; snapshots; forwarding to the leader; asynchronous persistence.
//!
//! See `ARCHITECTURE.md` for invariants and `docs/raft.md` for the protocol
//! details and choices.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod codec;
mod config;
mod error;
mod log;
mod message;
mod node;
mod progress;
mod raft;
mod rng;
mod storage;
mod types;

pub use config::{CommitBroadcast, Config, ReadMode};
pub use error::{Error, Result, StorageError};
pub use message::{normal, Message, MessageBody, Refusal, RejectHint, MESSAGE_KIND_NAMES};
pub use node::{PeerStatus, RaftNode, Ready, Status};
pub use progress::ProgressState;
pub use raft::Proposed;
pub use rng::Rng;
pub use storage::{limit_size, InitialState, MemStorage, Storage};
pub use types::{
    ConfChange, Entry, EntryPayload, HardState, LogIndex, Membership, NodeId, ReadId, ReadState,
    RequestId, Role, SnapshotMeta, SoftState, Term, APPEND_ENTRIES_MAX, ENTRY_OVERHEAD_BYTES,
    INDEX_MAX, READ_IDS_PER_MESSAGE_MAX,
};
