//! A linearizability checker for a key-value register (get, put, delete,
//! compare-and-set). Keys are independent registers, so a history is
//! checked key by key (P-compositionality). Each key's sub-history is
//! searched with Wing and Gong's algorithm in Lowe's form: operations in
//! call order, linearize one whose call precedes every pending return,
//! backtrack at a return, and cache (linearized set, state) pairs already
//! explored.
//!
//! Outcomes: `Ok` took effect between call and return; `Fail` definitely
//! did not take effect and is dropped; `Info` is unknown: it may take
//! effect at any point after its call, or never.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

/// A value; `None` is a missing key.
pub type Value = Option<String>;

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Op {
    /// Read the key.
    Get,
    /// Set the key.
    Put(String),
    /// Delete the key.
    Delete,
    /// Set the key to `new` if it holds `expected`.
    Cas {
        /// The value required.
        expected: Value,
        /// The value set.
        new: String,
    },
}

/// How the call ended.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Outcome {
    /// A get's answer.
    Read(Value),
    /// A put or delete took effect.
    Done,
    /// A compare-and-set's verdict.
    Swapped(bool),
    /// Definitely not applied.
    Fail,
    /// Unknown: may have been applied.
    Info,
}

/// One operation of a history; times are in any one clock.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Operation {
    /// The client process.
    pub process: u64,
    /// The key.
    pub key: String,
    /// What it asked.
    pub op: Op,
    /// When it was invoked.
    pub call: u64,
    /// When it completed (ignored for `Info`).
    pub ret: u64,
    /// How it ended.
    pub outcome: Outcome,
    /// The table revision an acknowledged write took effect at (a put or
    /// delete that is `Done`, a compare-and-set that swapped); the
    /// follower check places writes by it.
    #[serde(default)]
    pub revision: Option<u64>,
}

/// The verdict on a history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Verdict {
    /// Every key's sub-history is linearizable.
    Linearizable,
    /// A key's sub-history is not; `minimal` is a smallest failing subset
    /// found by removing operations one at a time.
    NotLinearizable {
        /// The key.
        key: String,
        /// The failing operations, in call order.
        minimal: Vec<Operation>,
    },
    /// The search gave up (too many states); nothing is claimed.
    Unknown {
        /// The key it gave up on.
        key: String,
    },
}

/// The register's step: the state after `op` ended as `outcome` from
/// `state`, or `None` if that outcome is impossible there. Info outcomes
/// take effect with the write's effect.
fn step(state: &Value, op: &Op, outcome: &Outcome) -> Option<Value> {
    match (op, outcome) {
        (Op::Get, Outcome::Read(value)) => (value == state).then(|| state.clone()),
        (Op::Put(value), Outcome::Done | Outcome::Info) => Some(Some(value.clone())),
        (Op::Delete, Outcome::Done | Outcome::Info) => Some(None),
        (Op::Cas { expected, new }, Outcome::Swapped(true)) => {
            (state == expected).then(|| Some(new.clone()))
        }
        (Op::Cas { expected, .. }, Outcome::Swapped(false)) => {
            (state != expected).then(|| state.clone())
        }
        (Op::Cas { expected, new }, Outcome::Info) => {
            // Unknown: if it took effect, it behaved like a CAS would.
            Some(if state == expected {
                Some(new.clone())
            } else {
                state.clone()
            })
        }
        _ => None,
    }
}

/// States explored per key before the search gives up.
pub const STATES_MAX: usize = 500_000;

/// Checks a whole history, key by key.
pub fn check(history: &[Operation]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<Operation>> = BTreeMap::new();
    for operation in history {
        by_key
            .entry(operation.key.as_str())
            .or_default()
            .push(operation.clone());
    }
    for (key, operations) in by_key {
        match check_key(&operations) {
            Some(true) => {}
            Some(false) => {
                return Verdict::NotLinearizable {
                    key: key.to_string(),
                    minimal: minimize(operations),
                }
            }
            None => {
                return Verdict::Unknown {
                    key: key.to_string(),
                }
            }
        }
    }
    Verdict::Linearizable
}

/// Removes operations while the rest stays non-linearizable. A write
/// whose value a remaining read observes stays: without it every such
/// read fails trivially, which would hide the real anomaly.
fn minimize(mut operations: Vec<Operation>) -> Vec<Operation> {
    operations.retain(relevant);
    operations.sort_by_key(|operation| operation.call);
    let mut index = 0;
    while index < operations.len() {
        if supports_a_read(&operations[index], &operations) {
            index += 1;
            continue;
        }
        let mut candidate = operations.clone();
        candidate.remove(index);
        if check_key(&candidate) == Some(false) {
            operations = candidate;
        } else {
            index += 1;
        }
    }
    operations
}

/// Whether `write` sets a value that another operation observes.
fn supports_a_read(write: &Operation, operations: &[Operation]) -> bool {
    let written = match &write.op {
        Op::Put(value) | Op::Cas { new: value, .. } => value,
        Op::Get | Op::Delete => return false,
    };
    operations
        .iter()
        .any(|other| match (&other.op, &other.outcome) {
            (Op::Get, Outcome::Read(Some(seen))) => seen == written,
            (
                Op::Cas {
                    expected: Some(expected),
                    ..
                },
                Outcome::Swapped(true),
            ) => expected == written,
            _ => false,
        })
}

/// Failed operations and unknown reads change nothing.
fn relevant(operation: &Operation) -> bool {
    !matches!(
        (&operation.op, &operation.outcome),
        (_, Outcome::Fail) | (Op::Get, Outcome::Info)
    )
}

/// One key: `Some(true)` linearizable, `Some(false)` not, `None` gave up.
fn check_key(operations: &[Operation]) -> Option<bool> {
    // An unknown write whose value nobody observed can be taken as never
    // applied, which keeps the verdict and spares the search. A failed
    // compare-and-set observes any value but its expected one, so with one
    // in the history every unknown write stays (the brute-force test found
    // this).
    let failed_cas = operations
        .iter()
        .any(|o| matches!(o.outcome, Outcome::Swapped(false)));
    let operations: Vec<&Operation> = operations
        .iter()
        .filter(|o| relevant(o))
        .filter(|o| o.outcome != Outcome::Info || failed_cas || supports_a_read(o, operations))
        .collect();
    let count = operations.len();
    if count == 0 {
        return Some(true);
    }
    // Events in time order: calls before returns at equal times would
    // wrongly order overlapping operations, so returns sort after calls.
    // Unknown operations return at the end of time.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * count);
    for (index, operation) in operations.iter().enumerate() {
        events.push((operation.call, 0, index));
        let ret = if operation.outcome == Outcome::Info {
            u64::MAX
        } else {
            operation.ret.max(operation.call)
        };
        events.push((ret, 1, index));
    }
    events.sort();
    let definite = operations
        .iter()
        .filter(|o| o.outcome != Outcome::Info)
        .count();

    // The search: a stack of (operation, state before it).
    let mut linearized = vec![false; count];
    let mut linearized_definite = 0usize;
    let mut state: Value = None;
    let mut stack: Vec<(usize, Value, usize)> = Vec::new(); // (op, previous state, event position)
    let mut seen: HashSet<(Vec<u64>, Value)> = HashSet::new();
    let mut position = 0usize;
    loop {
        if linearized_definite == definite {
            return Some(true);
        }
        // Find the next event, skipping those of linearized operations.
        while position < events.len() && linearized[events[position].2] {
            position += 1;
        }
        if position >= events.len() {
            // Only unknown operations remain, none of them needed.
            return Some(true);
        }
        let (_, kind, index) = events[position];
        let mut advanced = false;
        if kind == 0 {
            if let Some(next) = step(&state, &operations[index].op, &operations[index].outcome) {
                linearized[index] = true;
                let key = (bitset(&linearized), next.clone());
                if seen.insert(key) {
                    if seen.len() > STATES_MAX {
                        return None;
                    }
                    stack.push((index, std::mem::replace(&mut state, next), position));
                    if operations[index].outcome != Outcome::Info {
                        linearized_definite += 1;
                    }
                    position = 0;
                    advanced = true;
                } else {
                    linearized[index] = false;
                }
            }
            if !advanced {
                position += 1;
            }
            continue;
        }
        if operations[index].outcome == Outcome::Info {
            // Only unknown operations remain pending: none is required.
            return Some(true);
        }
        // A return of a pending operation: undo the last choice.
        let Some((undone, previous, at)) = stack.pop() else {
            return Some(false);
        };
        linearized[undone] = false;
        if operations[undone].outcome != Outcome::Info {
            linearized_definite -= 1;
        }
        state = previous;
        position = at + 1;
    }
}

fn bitset(flags: &[bool]) -> Vec<u64> {
    let mut words = vec![0u64; flags.len().div_ceil(64)];
    for (index, flag) in flags.iter().enumerate() {
        if *flag {
            words[index / 64] |= 1 << (index % 64);
        }
    }
    words
}

/// Acknowledged writes the final state lost: an acknowledged put that no
/// other write, delete or compare-and-set (unless it definitely failed)
/// could have followed or overlapped, yet whose value is not the key's
/// final value.
pub fn lost_writes(history: &[Operation], final_values: &BTreeMap<String, Value>) -> usize {
    let writes: Vec<&Operation> = history
        .iter()
        .filter(|o| !matches!(o.op, Op::Get) && o.outcome != Outcome::Fail)
        .collect();
    let mut lost = 0;
    for (position, write) in writes.iter().enumerate() {
        let (Op::Put(value), Outcome::Done) = (&write.op, &write.outcome) else {
            continue;
        };
        let followed = writes.iter().enumerate().any(|(other_position, other)| {
            other_position != position
                && other.key == write.key
                && (other.call >= write.call
                    || other.outcome == Outcome::Info
                    || other.ret >= write.call)
        });
        if followed {
            continue;
        }
        // A key whose final value is unknown cannot tell.
        let Some(final_value) = final_values.get(&write.key) else {
            continue;
        };
        if final_value.as_deref() != Some(value.as_str()) {
            lost += 1;
        }
    }
    lost
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(process: u64, key: &str, op: Op, call: u64, ret: u64, outcome: Outcome) -> Operation {
        Operation {
            process,
            key: key.into(),
            op,
            call,
            ret,
            outcome,
            revision: None,
        }
    }

    fn put(process: u64, value: &str, call: u64, ret: u64) -> Operation {
        op(
            process,
            "k",
            Op::Put(value.into()),
            call,
            ret,
            Outcome::Done,
        )
    }

    fn get(process: u64, value: Option<&str>, call: u64, ret: u64) -> Operation {
        op(
            process,
            "k",
            Op::Get,
            call,
            ret,
            Outcome::Read(value.map(str::to_string)),
        )
    }

    fn cas(
        process: u64,
        expected: Option<&str>,
        new: &str,
        call: u64,
        ret: u64,
        ok: bool,
    ) -> Operation {
        op(
            process,
            "k",
            Op::Cas {
                expected: expected.map(str::to_string),
                new: new.into(),
            },
            call,
            ret,
            Outcome::Swapped(ok),
        )
    }

    #[test]
    fn sequential_and_overlapping_histories_pass() {
        let history = vec![
            get(1, None, 0, 1),
            put(1, "a", 2, 3),
            get(2, Some("a"), 4, 5),
            // Overlapping put and gets: either order is fine.
            put(1, "b", 6, 10),
            get(2, Some("a"), 7, 8),
            get(3, Some("b"), 7, 9),
            cas(1, Some("b"), "c", 11, 12, true),
            cas(2, Some("b"), "d", 13, 14, false),
            get(3, Some("c"), 15, 16),
            op(1, "k", Op::Delete, 17, 18, Outcome::Done),
            get(2, None, 19, 20),
        ];
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn a_stale_read_fails_and_is_minimized() {
        let history = vec![
            put(1, "a", 0, 1),
            put(1, "b", 2, 3),
            get(3, Some("b"), 2, 100), // concurrent and fine
            get(2, Some("a"), 4, 5),   // after b completed: stale
            get(2, Some("b"), 6, 7),
        ];
        match check(&history) {
            Verdict::NotLinearizable { key, minimal } => {
                assert_eq!(key, "k");
                // The smallest failing subset: b completed, then a read.
                let ops: Vec<&Op> = minimal.iter().map(|o| &o.op).collect();
                assert_eq!(
                    ops,
                    [&Op::Put("a".into()), &Op::Put("b".into()), &Op::Get],
                    "{minimal:?}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn two_successful_cas_from_one_state_fail() {
        let history = vec![
            put(1, "a", 0, 1),
            cas(2, Some("a"), "b", 2, 10, true),
            cas(3, Some("a"), "c", 3, 11, true),
        ];
        assert!(matches!(check(&history), Verdict::NotLinearizable { .. }));
    }

    #[test]
    fn unknown_operations_may_or_may_not_have_happened() {
        let unknown = op(1, "k", Op::Put("a".into()), 0, 0, Outcome::Info);
        // Seen once, long after its call: fine.
        assert_eq!(
            check(&[unknown.clone(), get(2, Some("a"), 50, 51)]),
            Verdict::Linearizable
        );
        // Never seen: fine.
        assert_eq!(
            check(&[unknown.clone(), get(2, None, 50, 51)]),
            Verdict::Linearizable
        );
        // Seen, then gone without a write: not linearizable.
        assert!(matches!(
            check(&[unknown, get(2, Some("a"), 50, 51), get(2, None, 52, 53)]),
            Verdict::NotLinearizable { .. }
        ));
        // A failed put must never be seen.
        let failed = op(1, "k", Op::Put("a".into()), 0, 1, Outcome::Fail);
        assert!(matches!(
            check(&[failed, get(2, Some("a"), 5, 6)]),
            Verdict::NotLinearizable { .. }
        ));
    }

    #[test]
    fn keys_are_independent_registers() {
        let mut history = vec![put(1, "a", 0, 1), get(2, Some("a"), 2, 3)];
        history.push(op(3, "other", Op::Get, 2, 3, Outcome::Read(None)));
        history.push(op(3, "other", Op::Put("z".into()), 4, 5, Outcome::Done));
        history.push(op(
            3,
            "other",
            Op::Get,
            6,
            7,
            Outcome::Read(Some("a".into())),
        ));
        match check(&history) {
            Verdict::NotLinearizable { key, .. } => assert_eq!(key, "other"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn many_concurrent_operations_are_checked_quickly() {
        // 8 processes, 200 rounds of overlapping puts and reads that see
        // the round's last put: linearizable, and the cache keeps it fast.
        let mut history = Vec::new();
        for round in 0..200u64 {
            let base = round * 10;
            for process in 0..4 {
                history.push(put(process, &format!("{round}-{process}"), base, base + 5));
            }
            history.push(get(9, Some(&format!("{round}-3")), base + 6, base + 7));
        }
        assert_eq!(check(&history), Verdict::Linearizable);
    }

    #[test]
    fn lost_acknowledged_writes_are_counted() {
        let history = vec![
            put(1, "a", 0, 1),
            op(1, "x", Op::Put("1".into()), 0, 1, Outcome::Done),
            op(2, "y", Op::Put("2".into()), 0, 1, Outcome::Done),
        ];
        let mut finals = BTreeMap::new();
        finals.insert("k".to_string(), Some("a".to_string()));
        finals.insert("x".to_string(), Some("1".to_string()));
        assert_eq!(
            lost_writes(&history, &finals),
            0,
            "y's final value is unknown"
        );
        finals.insert("y".to_string(), None);
        assert_eq!(lost_writes(&history, &finals), 1, "y is lost");
        finals.insert("y".to_string(), Some("3".to_string()));
        assert_eq!(
            lost_writes(&history, &finals),
            1,
            "y was overwritten by nobody"
        );
        finals.insert("y".to_string(), Some("2".to_string()));
        assert_eq!(lost_writes(&history, &finals), 0);
    }

    /// The brute-force oracle: some order of the operations (unknown ones
    /// optional) that respects real time and the register's semantics.
    fn brute_force(operations: &[Operation]) -> bool {
        let operations: Vec<&Operation> = operations.iter().filter(|o| relevant(o)).collect();
        fn search(operations: &[&Operation], used: &mut Vec<bool>, state: &Value) -> bool {
            let pending_definite = operations
                .iter()
                .zip(used.iter())
                .any(|(o, u)| !u && o.outcome != Outcome::Info);
            if !pending_definite {
                return true;
            }
            for index in 0..operations.len() {
                if used[index] {
                    continue;
                }
                // Every unused definite operation that returned before this
                // one was called must come first.
                let blocked = operations.iter().zip(used.iter()).any(|(other, u)| {
                    !u && other.outcome != Outcome::Info && other.ret < operations[index].call
                });
                if blocked {
                    continue;
                }
                if let Some(next) = step(state, &operations[index].op, &operations[index].outcome) {
                    used[index] = true;
                    if search(operations, used, &next) {
                        return true;
                    }
                    used[index] = false;
                }
            }
            false
        }
        let mut used = vec![false; operations.len()];
        search(&operations, &mut used, &None)
    }

    #[test]
    fn the_search_agrees_with_brute_force_on_random_histories() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let values = ["a", "b", "c"];
        let (mut linearizable, mut not) = (0, 0);
        for _ in 0..3000 {
            let count = 2 + (next() % 5) as usize;
            let mut history = Vec::new();
            for process in 0..count as u64 {
                let call = next() % 20;
                let ret = call + next() % 8;
                let value = values[(next() % 3) as usize];
                let (operation, outcome) = match next() % 6 {
                    0 | 1 => (
                        Op::Get,
                        Outcome::Read((next() % 4 != 0).then(|| value.to_string())),
                    ),
                    2 => (Op::Put(value.into()), Outcome::Done),
                    3 => (Op::Put(value.into()), Outcome::Info),
                    4 => (Op::Delete, Outcome::Done),
                    _ => (
                        Op::Cas {
                            expected: Some(values[(next() % 3) as usize].to_string()),
                            new: value.into(),
                        },
                        Outcome::Swapped(next() % 2 == 0),
                    ),
                };
                history.push(op(process, "k", operation, call, ret, outcome));
            }
            let expected = brute_force(&history);
            let verdict = check(&history);
            assert_eq!(
                verdict == Verdict::Linearizable,
                expected,
                "disagreement on {history:?}: {verdict:?}"
            );
            if expected {
                linearizable += 1;
            } else {
                not += 1;
            }
        }
        // Both kinds were exercised.
        assert!(linearizable > 100 && not > 100, "{linearizable} / {not}");
    }
}
