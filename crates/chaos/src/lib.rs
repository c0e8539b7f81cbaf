//! `regatta-chaos`: Jepsen-style verification of Regatta (issue 6).
//!
//! Built so far:
//! - [`checker`]: the linearizability checker for a key-value register
//!   model, tested on hand-written histories and against a brute-force
//!   oracle;
//! - [`proxy`]: the fault-injecting TCP proxy (cut, heal, slow).
//!
//! - [`harness`]: real `regatta` processes behind proxies, recording
//!   clients, a nemesis (kill and restart, partitions), and the check.

pub mod checker;
pub mod harness;
pub mod proxy;
