//! `regatta-multiraft`: runs many Raft groups on one node, sharing one WAL,
//! one transport and one runtime. See `docs/multiraft.md` for the design.
//!
//! Built so far: [`GroupStorage`], the Raft storage of one group over the
//! shared WAL, and [`wire`], the encoding of Raft messages between nodes
//! (`docs/transport-format.md`).

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

mod storage;
pub mod wire;

pub use storage::GroupStorage;
