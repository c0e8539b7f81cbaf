//! `regatta-chaos`: Jepsen-style verification of Regatta (issue 6).
//!
//! Built so far:
//! - [`checker`]: the linearizability checker for a key-value register
//!   model, tested on hand-written histories and against a brute-force
//!   oracle;
//! - [`proxy`]: the fault-injecting TCP proxy (cut, heal, slow).
//!
//! The harness that drives real `regatta` processes through faults comes
//! next.

pub mod checker;
pub mod proxy;
