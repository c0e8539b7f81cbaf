//! `regatta-multiraft`: runs many Raft groups on one node, sharing one WAL,
//! one transport and one runtime. See `docs/multiraft.md` for the design.
//!
//! Built so far:
//! - [`NodeHost`]: group actors on tokio with pipelined persistence through
//!   the shared WAL and a separate apply thread per group;
//! - [`GroupStorage`]: the Raft storage of one group over the shared WAL;
//! - [`wire`]: the encoding of Raft messages between nodes
//!   (`docs/transport-format.md`);
//! - [`TcpTransport`]: the peer transport over TCP, with optional mutual
//!   TLS and chunked snapshot streams;
//! - [`LocalTransport`]: hosts of one process wired together, for tests;
//! - [`runtime`]: the tokio runtime the processes run on.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod address;
mod applied;
mod error;
mod host;
pub mod runtime;
mod session;
mod snapshot;
mod storage;
mod tcp;
pub mod tls;
mod transport;
pub mod wire;

pub use address::{AddressError, PeerAddress, Resolver};
pub use applied::{AppliedWatch, GroupStopped};
pub use error::{Error, UnsentCause};
pub use host::{
    default_workers, HostConfig, NodeHost, SessionFilter, StateMachine, StateReader, WeakNodeHost,
    INSTALL_CUT_AFTER_WAL, INSTALL_CUT_BEFORE_WAL, NODE_STOPPING, WORKERS_DEFAULT_MAX, WORKERS_MAX,
};
pub use snapshot::{PendingSnapshot, SnapshotData, SnapshotDir, SnapshotSource};
pub use storage::GroupStorage;
pub use tcp::{PeerTls, TcpConfig, TcpStats, TcpTransport};
pub use transport::{LocalTransport, Transport};
