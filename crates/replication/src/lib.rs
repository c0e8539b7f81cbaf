//! `regatta-replication`: cross-location replication
//! (`docs/replication.md`, `docs/decisions/0004-replication-protocol.md`).
//!
//! - `leader`: the leader cluster's replication API: table metadata and
//!   each table's log as a stream that stays open and pushes commands as
//!   soon as they apply.
//!
//! The follower side (the puller) is being built (issue 7).

pub mod error;
pub mod leader;

pub use error::{Error, Result};
pub use leader::{serve, LeaderService, RESPONSE_BYTES_MAX};

/// Generated gRPC code of `proto/`.
pub mod proto {
    #![allow(missing_docs, clippy::all)]
    tonic::include_proto!("regatta.replication.v1");
}
