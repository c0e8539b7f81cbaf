//! Helpers shared by the table tests.

use bytes::Bytes;
use regatta_kv::command::{decode, encode, Command, Response};
use regatta_kv::Table;
use regatta_multiraft::StateMachine;
use regatta_raft::LogIndex;

/// Applies commands at consecutive indexes after the table's applied one.
pub fn apply(table: &mut Table, commands: &[Command]) -> Vec<Response> {
    let first = table.applied_index().0 + 1;
    let batch: Vec<(LogIndex, Bytes)> = commands
        .iter()
        .enumerate()
        .map(|(offset, command)| {
            (
                LogIndex(first + offset as u64),
                Bytes::from(encode(command)),
            )
        })
        .collect();
    table
        .apply_batch(&batch)
        .expect("apply")
        .iter()
        .map(|bytes| decode::<Response>(bytes).expect("response"))
        .collect()
}
