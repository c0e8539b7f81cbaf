//! `regatta-chaos`: Jepsen-style verification of Regatta (issue 6).
//!
//! Built so far:
//! - [`checker`]: the linearizability checker for a key-value register
//!   model, tested on hand-written histories and against a brute-force
//!   oracle;
//! - [`proxy`]: the fault-injecting TCP proxy (cut, heal, slow).
//!
//! - [`harness`]: real `regatta` processes behind proxies, recording
//!   clients, a nemesis (kill and restart, partitions), and the check;
//! - [`sequential`]: the check of a follower cluster's reads against the
//!   leader cluster's history (per-table sequential consistency).

pub mod checker;
pub mod harness;
pub mod proxy;
pub mod sequential;
