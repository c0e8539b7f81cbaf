//! `regatta-replication`: cross-location replication
//! (`docs/replication.md`, `docs/decisions/0004-replication-protocol.md`).
//!
//! - `leader`: the leader cluster's replication API: table metadata and
//!   each table's log as a stream that stays open and pushes commands as
//!   soon as they apply.
//! - `follower`: the follower cluster's side: the catalogue kept in step
//!   with the leader's, one puller per table on the node leading it, and
//!   writes forwarded to the leader cluster.

#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod error;
pub mod follower;
pub mod leader;

pub use error::{Error, Result};
pub use follower::{start as start_follower, Follower, FollowerConfig};
pub use leader::{serve, LeaderService, RESPONSE_BYTES_MAX, SNAPSHOT_CHUNK_BYTES};

/// Generated gRPC code of `proto/`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("regatta.replication.v1");
}
