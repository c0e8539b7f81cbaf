//! The follower-cluster check: each follower read is compared with the
//! leader cluster's history. A follower replicates asynchronously, so its
//! reads may be stale, but per table they must be sequentially
//! consistent: every state it shows is a state the leader's table passed
//! through, and a reader never sees the table go back.
//!
//! A follower read returns the key's value, the revision the value was
//! written at (`mod_revision`), and the table revision the follower had
//! applied (the response header's revision, the leader's log index of its
//! last replicated entry). Acknowledged leader writes carry the revision
//! they took effect at. An anomaly is any of:
//! - a value no leader write could have produced (every write that
//!   definitely failed, and every value never written, is excluded);
//! - a value whose acknowledged write took effect at another revision
//!   than the read reports;
//! - at table revision `R`, a value written at `m` although an
//!   acknowledged write to the key took effect in `(m, R]` (the follower
//!   claims a state it is not in), or the key missing although an
//!   acknowledged put at `p ≤ R` has no delete that may follow it up to
//!   `R`;
//! - a reader's table revision, or a key's `mod_revision`, going down
//!   between its reads (each reader is bound to one follower node).
//!
//! Writes whose outcome is unknown have no known revision: they can hide
//! an anomaly, never invent one.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::checker::{Op, Operation, Outcome, Value};

/// One read on a follower node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FollowerRead {
    /// The reader; bound to one follower node.
    pub process: u64,
    /// The follower node read.
    pub node: u64,
    /// The key.
    pub key: String,
    /// The value shown.
    pub value: Value,
    /// The revision the value was written at (0 when missing).
    pub mod_revision: u64,
    /// The table revision the follower had applied.
    pub revision: u64,
    /// When it was invoked (the leader history's clock).
    pub call: u64,
    /// When it completed.
    pub ret: u64,
}

/// What one key's leader writes allow.
#[derive(Default)]
struct KeyWrites {
    /// Value → the revision of its acknowledged write, or `None` if its
    /// outcome is unknown.
    values: HashMap<String, Option<u64>>,
    /// Acknowledged writes by revision: `Some(value)` for a put, `None`
    /// for a delete.
    acknowledged: BTreeMap<u64, Value>,
    /// A delete with an unknown outcome exists: a missing key can never be
    /// called wrong.
    unknown_delete: bool,
}

fn written_value(operation: &Operation) -> Option<Value> {
    match (&operation.op, &operation.outcome) {
        (_, Outcome::Fail) | (Op::Get, _) | (Op::Cas { .. }, Outcome::Swapped(false)) => None,
        (Op::Put(value), _) | (Op::Cas { new: value, .. }, _) => Some(Some(value.clone())),
        (Op::Delete, _) => Some(None),
    }
}

fn index_writes(leader: &[Operation]) -> HashMap<&str, KeyWrites> {
    let mut keys: HashMap<&str, KeyWrites> = HashMap::new();
    for operation in leader {
        let Some(value) = written_value(operation) else {
            continue;
        };
        let writes = keys.entry(operation.key.as_str()).or_default();
        let acknowledged = operation.outcome != Outcome::Info;
        let revision = if acknowledged {
            operation.revision
        } else {
            None
        };
        match &value {
            Some(value) => {
                writes.values.insert(value.clone(), revision);
            }
            None if revision.is_none() => writes.unknown_delete = true,
            None => {}
        }
        if let Some(revision) = revision {
            writes.acknowledged.insert(revision, value);
        }
    }
    keys
}

/// Checks every follower read against the leader's history; gives one line
/// per anomaly (empty: sequentially consistent as far as this can tell).
pub fn check_follower(leader: &[Operation], reads: &[FollowerRead]) -> Vec<String> {
    let keys = index_writes(leader);
    let empty = KeyWrites::default();
    let mut anomalies = Vec::new();
    for read in reads {
        let writes = keys.get(read.key.as_str()).unwrap_or(&empty);
        let at = format!(
            "follower node {} (reader {}), {} at revision {}",
            read.node, read.process, read.key, read.revision
        );
        if read.mod_revision > read.revision {
            anomalies.push(format!(
                "{at}: the value was written at {}, after the table's revision",
                read.mod_revision
            ));
            continue;
        }
        match &read.value {
            Some(value) => match writes.values.get(value) {
                None => anomalies.push(format!(
                    "{at}: shows {value:?}, which the leader cluster never committed"
                )),
                Some(Some(revision)) if *revision != read.mod_revision => anomalies.push(format!(
                    "{at}: shows {value:?} as written at {}, the leader wrote it at {revision}",
                    read.mod_revision
                )),
                Some(_) => {
                    // mod_revision <= revision, checked above.
                    let later = writes
                        .acknowledged
                        .range(read.mod_revision + 1..read.revision + 1)
                        .next();
                    if let Some((revision, value)) = later {
                        anomalies.push(format!(
                            "{at}: shows the state of revision {}, but the leader's write of {value:?} at {revision} came before {}",
                            read.mod_revision, read.revision
                        ));
                    }
                }
            },
            None if writes.unknown_delete => {}
            None => {
                let last = writes.acknowledged.range(..=read.revision).next_back();
                if let Some((revision, Some(value))) = last {
                    anomalies.push(format!(
                        "{at}: the key is missing, but the leader's last write up to there is {value:?} at {revision}"
                    ));
                }
            }
        }
    }
    anomalies.extend(check_monotonic(reads));
    anomalies
}

/// A reader's table revision and each key's `mod_revision` never go back.
fn check_monotonic(reads: &[FollowerRead]) -> Vec<String> {
    let mut by_process: BTreeMap<u64, Vec<&FollowerRead>> = BTreeMap::new();
    for read in reads {
        by_process.entry(read.process).or_default().push(read);
    }
    let mut anomalies = Vec::new();
    for (process, mut reads) in by_process {
        reads.sort_by_key(|read| read.call);
        let mut revision = 0;
        let mut keys: HashMap<&str, u64> = HashMap::new();
        for read in reads {
            if read.revision < revision {
                anomalies.push(format!(
                    "reader {process} on follower node {}: the table went back from revision {revision} to {}",
                    read.node, read.revision
                ));
            }
            revision = revision.max(read.revision);
            let seen = keys.entry(read.key.as_str()).or_default();
            if read.value.is_some() && read.mod_revision < *seen {
                anomalies.push(format!(
                    "reader {process} on follower node {}: {} went back from the value of revision {seen} to that of {}",
                    read.node, read.key, read.mod_revision
                ));
            }
            *seen = (*seen).max(read.mod_revision);
        }
    }
    anomalies
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(op: Op, outcome: Outcome, revision: Option<u64>) -> Operation {
        Operation {
            process: 0,
            key: "k".into(),
            op,
            call: 0,
            ret: 0,
            outcome,
            revision,
        }
    }

    fn put(value: &str, revision: u64) -> Operation {
        write(Op::Put(value.into()), Outcome::Done, Some(revision))
    }

    fn read(
        process: u64,
        call: u64,
        value: Option<&str>,
        mod_revision: u64,
        revision: u64,
    ) -> FollowerRead {
        FollowerRead {
            process,
            node: 1,
            key: "k".into(),
            value: value.map(str::to_string),
            mod_revision,
            revision,
            call,
            ret: call + 1,
        }
    }

    /// The leader wrote a at 10, deleted at 20, wrote b at 30, and c with
    /// an unknown outcome.
    fn leader() -> Vec<Operation> {
        vec![
            put("a", 10),
            write(Op::Delete, Outcome::Done, Some(20)),
            put("b", 30),
            write(Op::Put("c".into()), Outcome::Info, None),
            write(Op::Put("failed".into()), Outcome::Fail, None),
        ]
    }

    #[test]
    fn stale_but_consistent_reads_pass() {
        let reads = vec![
            read(1, 0, None, 0, 5),
            read(1, 1, Some("a"), 10, 15),
            read(1, 2, None, 0, 25),
            read(1, 3, Some("b"), 30, 30),
            read(1, 4, Some("c"), 41, 45),
            read(2, 0, Some("a"), 10, 19),
        ];
        assert_eq!(check_follower(&leader(), &reads), Vec::<String>::new());
    }

    #[test]
    fn a_value_never_committed_is_an_anomaly() {
        for value in ["failed", "never"] {
            let anomalies = check_follower(&leader(), &[read(1, 0, Some(value), 12, 12)]);
            assert_eq!(anomalies.len(), 1, "{value}: {anomalies:?}");
            assert!(anomalies[0].contains("never committed"), "{anomalies:?}");
        }
    }

    #[test]
    fn a_state_the_leader_never_passed_through_is_an_anomaly() {
        // a at revision 25: the delete at 20 came first.
        let anomalies = check_follower(&leader(), &[read(1, 0, Some("a"), 10, 25)]);
        assert_eq!(anomalies.len(), 1, "{anomalies:?}");
        assert!(anomalies[0].contains("came before"), "{anomalies:?}");
        // Missing at 35: b was written at 30 and nothing deleted it.
        let anomalies = check_follower(&leader(), &[read(1, 0, None, 0, 35)]);
        assert_eq!(anomalies.len(), 1, "{anomalies:?}");
        // b shown as written at 31.
        let anomalies = check_follower(&leader(), &[read(1, 0, Some("b"), 31, 40)]);
        assert_eq!(anomalies.len(), 1, "{anomalies:?}");
        // A value newer than the table.
        let anomalies = check_follower(&leader(), &[read(1, 0, Some("b"), 30, 29)]);
        assert_eq!(anomalies.len(), 1, "{anomalies:?}");
    }

    #[test]
    fn a_reader_that_goes_back_is_an_anomaly() {
        let reads = vec![read(1, 0, Some("b"), 30, 31), read(1, 1, Some("a"), 10, 15)];
        let anomalies = check_follower(&leader(), &reads);
        assert_eq!(
            anomalies.len(),
            2,
            "table and key both went back: {anomalies:?}"
        );
        // Two readers may see different points; each alone moves forward.
        let reads = vec![read(1, 0, Some("b"), 30, 31), read(2, 1, Some("a"), 10, 15)];
        assert_eq!(check_follower(&leader(), &reads), Vec::<String>::new());
    }

    #[test]
    fn an_unknown_delete_excuses_a_missing_key() {
        let mut leader = leader();
        leader.push(write(Op::Delete, Outcome::Info, None));
        assert_eq!(
            check_follower(&leader, &[read(1, 0, None, 0, 35)]),
            Vec::<String>::new()
        );
    }
}
