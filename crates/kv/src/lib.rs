//! `regatta-kv`: the state machine of a Regatta table. Each table is a Raft
//! group (`regatta-multiraft`); its keys live in a partition of the node's
//! fjall keyspace (`docs/decisions/0003-table-engine.md`), with etcd's
//! revisions: a table's revision is its applied Raft index.
//!
//! - [`command`]: the commands and queries, with their results, and their
//!   encoding (`docs/kv-format.md`);
//! - [`Store`] and [`Table`]: the storage, and the `StateMachine`.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod command;
mod error;
mod table;

pub use error::{Error, Result};
pub use table::{
    read_table_item, split_table_item, EngineStats, Store, Table, TableItem, TableItems, TableMode,
    RECORD_HEADER_BYTES, RESET_RESTORE_ID_BIT, WRITE_BUFFER_BYTES_MAX,
};
