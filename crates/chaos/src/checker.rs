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

use std::collections::{BTreeMap, HashMap, HashSet};

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
    /// A key's sub-history is not; `minimal` is a failing sub-history
    /// reduced by steps that cannot make a linearizable history fail
    /// (`minimize`), so it shows a real anomaly.
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

/// States explored per key before the search gives up. A state costs
/// about 100 bytes in the cache, so the budget bounds the checker's
/// memory to about a GiB per key.
pub const STATES_MAX: usize = 8_000_000;

/// An operation reduced to what the search needs: values are interned as
/// small numbers (0 is a missing key), and the outcome is folded in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Step {
    /// A read that saw this value.
    Read(u32),
    /// A write of this value (a put, or a delete writing 0), done or
    /// unknown.
    Write(u32),
    /// A compare-and-set that swapped.
    Swapped { expected: u32, new: u32 },
    /// A compare-and-set that did not swap.
    Refused { expected: u32 },
    /// A compare-and-set of unknown outcome.
    Maybe { expected: u32, new: u32 },
}

impl Step {
    fn new(operation: &Operation, ids: &mut BTreeMap<Value, u32>) -> Option<Step> {
        let mut id = |value: Value| {
            let next = ids.len() as u32;
            *ids.entry(value).or_insert(next)
        };
        let step = match (&operation.op, &operation.outcome) {
            (Op::Get, Outcome::Read(value)) => Step::Read(id(value.clone())),
            (Op::Put(value), Outcome::Done | Outcome::Info) => Step::Write(id(Some(value.clone()))),
            (Op::Delete, Outcome::Done | Outcome::Info) => Step::Write(id(None)),
            (Op::Cas { expected, new }, Outcome::Swapped(true)) => Step::Swapped {
                expected: id(expected.clone()),
                new: id(Some(new.clone())),
            },
            (Op::Cas { expected, .. }, Outcome::Swapped(false)) => Step::Refused {
                expected: id(expected.clone()),
            },
            (Op::Cas { expected, new }, Outcome::Info) => Step::Maybe {
                expected: id(expected.clone()),
                new: id(Some(new.clone())),
            },
            // A mismatched outcome (a read answered "swapped") fits no
            // state.
            _ => return None,
        };
        Some(step)
    }

    /// The state after this step from `state`, if the step fits it.
    fn apply(self, state: u32) -> Option<u32> {
        match self {
            Step::Read(value) => (value == state).then_some(state),
            Step::Write(value) => Some(value),
            Step::Swapped { expected, new } => (state == expected).then_some(new),
            Step::Refused { expected } => (state != expected).then_some(state),
            Step::Maybe { expected, new } => Some(if state == expected { new } else { state }),
        }
    }
}

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

/// Shrinks a failing key history by steps that can never turn a
/// linearizable history into a failing one, so what is left shows a real
/// anomaly (dropping writes at will would not: a read can fail for want
/// of a write that was removed):
///
/// 1. The shortest failing prefix: operations called after a cut time go,
///    and those still pending at it become unknown writes or go (reads).
/// 2. Reads and refused compare-and-sets, which only constrain, go while
///    the rest still fails: in runs (halves, quarters, ...) then one by
///    one until none can go.
/// 3. A blind write (a put or delete that returned) goes when a later one
///    started after it returned and no read or compare-and-set overlaps
///    the two: nothing could have seen its value. One whose value a
///    remaining read shows stays, to explain that read.
fn minimize(mut operations: Vec<Operation>) -> Vec<Operation> {
    operations.retain(relevant);
    operations.sort_by_key(|operation| operation.call);

    let mut cuts: Vec<u64> = operations
        .iter()
        .filter(|operation| operation.outcome != Outcome::Info)
        .map(|operation| operation.ret)
        .collect();
    cuts.sort_unstable();
    cuts.dedup();
    // A prefix of a linearizable history is linearizable, so failing is
    // monotone in the cut: binary search for the first cut that fails.
    let (mut low, mut high) = (0, cuts.len());
    while low < high {
        let middle = (low + high) / 2;
        if check_key(&cut(&operations, cuts[middle])) == Some(false) {
            high = middle;
        } else {
            low = middle + 1;
        }
    }
    if high < cuts.len() {
        operations = cut(&operations, cuts[high]);
    }

    let constraint = |operation: &Operation| {
        matches!(
            (&operation.op, &operation.outcome),
            (Op::Get, _) | (_, Outcome::Swapped(false))
        )
    };
    let mut run = operations.len().div_ceil(2).max(1);
    loop {
        let before = operations.len();
        let mut start = 0;
        while start < operations.len() {
            let end = (start + run).min(operations.len());
            let candidate: Vec<Operation> = operations
                .iter()
                .enumerate()
                .filter(|(index, operation)| {
                    !(start..end).contains(index) || !constraint(operation)
                })
                .map(|(_, operation)| operation.clone())
                .collect();
            if candidate.len() < operations.len() && check_key(&candidate) == Some(false) {
                operations = candidate;
            } else {
                start = end;
            }
        }
        if run == 1 && operations.len() == before {
            break;
        }
        run = run.div_ceil(2);
    }

    let mut index = 0;
    while index < operations.len() {
        if overwritten(&operations, index) {
            operations.remove(index);
        } else {
            index += 1;
        }
    }
    operations
}

/// The operations called by `time`: one pending at it (not returned, or
/// unknown) that writes becomes unknown, a pending read or refused
/// compare-and-set goes.
fn cut(operations: &[Operation], time: u64) -> Vec<Operation> {
    operations
        .iter()
        .filter(|operation| operation.call <= time)
        .filter_map(|operation| {
            let pending = operation.outcome == Outcome::Info || operation.ret > time;
            if !pending {
                return Some(operation.clone());
            }
            match (&operation.op, &operation.outcome) {
                (Op::Get, _) | (_, Outcome::Swapped(false)) => None,
                _ => Some(Operation {
                    outcome: Outcome::Info,
                    ..operation.clone()
                }),
            }
        })
        .collect()
}

/// Whether the blind write (a put or delete that returned) at `index` was
/// overwritten before anything could see it: another blind write began
/// after it returned, and no read or compare-and-set overlaps the span
/// from its call to that write's return. Either history, with it or
/// without it, is linearizable exactly when the other is: only blind
/// writes can be ordered between the two.
fn overwritten(operations: &[Operation], index: usize) -> bool {
    let write = &operations[index];
    let blind = |operation: &Operation| {
        matches!(operation.op, Op::Put(_) | Op::Delete) && operation.outcome == Outcome::Done
    };
    // One a remaining read saw stays, though it could go: a read of a
    // value nobody wrote would obscure the anomaly.
    if !blind(write) || supports_a_read(write, operations) {
        return false;
    }
    let Some(end) = operations
        .iter()
        .filter(|other| blind(other) && other.call > write.ret)
        .map(|other| other.ret)
        .min()
    else {
        return false;
    };
    operations.iter().enumerate().all(|(other_index, other)| {
        let observes = matches!(other.op, Op::Get | Op::Cas { .. });
        let overlaps =
            other.call <= end && (other.outcome == Outcome::Info || other.ret >= write.call);
        other_index == index || !observes || !overlaps
    })
}

/// Whether `write` sets a value (a delete sets "missing") that another
/// operation observes: a read that returned it, or a compare-and-set that
/// expected it and swapped or may have.
fn supports_a_read(write: &Operation, operations: &[Operation]) -> bool {
    let written: Option<&String> = match &write.op {
        Op::Put(value) | Op::Cas { new: value, .. } => Some(value),
        Op::Delete => None,
        Op::Get => return false,
    };
    operations
        .iter()
        .any(|other| match (&other.op, &other.outcome) {
            (Op::Get, Outcome::Read(seen)) => seen.as_ref() == written,
            (Op::Cas { expected, .. }, Outcome::Swapped(true) | Outcome::Info) => {
                !std::ptr::eq(other, write) && expected.as_ref() == written
            }
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
///
/// The search runs over a doubly linked list of call and return events
/// in time order (Lowe's form of Wing and Gong's algorithm): linearizing
/// an operation lifts its events out of the list, and backtracking puts
/// them back, so each step costs O(1) rather than a scan of the history.
/// A state is the set of definite operations linearized, kept as a
/// 128-bit Zobrist hash, the register's value and the set of unknown
/// operations linearized. At each point the search tries the definite
/// operations first and the deferred ones (unknown, or unknown writes
/// `narrow` made definite) only after, since such a write is needed only
/// where a read or a compare-and-set requires it.
fn check_key(operations: &[Operation]) -> Option<bool> {
    let Some((kept, mut steps, garbage)) = search_steps(operations) else {
        return Some(false);
    };
    if steps.is_empty() {
        return Some(true);
    }
    let mut unknown: Vec<bool> = kept.iter().map(|o| o.outcome == Outcome::Info).collect();
    let mut rets: Vec<u64> = kept.iter().map(|o| o.ret).collect();
    let was_unknown = unknown.clone();
    narrow(&mut steps, &mut unknown, &mut rets, garbage);
    // Tried in the second pass: unknown operations, and unknown writes
    // made definite (their windows are long, and they are needed only
    // where their value is read).
    let deferred = was_unknown;
    Search::new(&kept, steps, unknown, &rets, deferred).run()
}

/// The operations of a key the search needs, their steps and the
/// `garbage` value `narrow` may merge unobserved values into; `None` if a
/// definite outcome fits no state, which makes the history impossible.
fn search_steps(operations: &[Operation]) -> Option<(Vec<&Operation>, Vec<Step>, u32)> {
    // An unknown write whose value nobody observed can be taken as never
    // applied, which keeps the verdict and spares the search. A failed
    // compare-and-set observes any value but its expected one, so with one
    // in the history every unknown write stays (the brute-force test found
    // this).
    let failed_cas = operations
        .iter()
        .any(|o| matches!(o.outcome, Outcome::Swapped(false)));
    let mut ids: BTreeMap<Value, u32> = BTreeMap::new();
    ids.insert(None, 0);
    let mut kept: Vec<&Operation> = Vec::new();
    let mut steps: Vec<Step> = Vec::new();
    for operation in operations.iter().filter(|o| relevant(o)) {
        let unknown = operation.outcome == Outcome::Info;
        if unknown && !failed_cas && !supports_a_read(operation, operations) {
            continue;
        }
        match Step::new(operation, &mut ids) {
            Some(step) => {
                kept.push(operation);
                steps.push(step);
            }
            // An outcome that fits no state (a read answered "swapped"):
            // a definite one makes the history impossible, an unknown one
            // never took effect.
            None if unknown => {}
            None => return None,
        }
    }
    let garbage = ids.len() as u32;
    Some((kept, steps, garbage))
}

/// An event of the search: (time, 0 for a call or 1 for a return, the
/// operation's index).
type Event = (u64, u8, usize);

/// The call and return events of `kept` in time order: calls before
/// returns at equal times, since the other order would wrongly order
/// overlapping operations. An unknown operation never returns: it may take
/// effect at any time after its call, or never.
fn events(kept: &[&Operation], unknown: &[bool], rets: &[u64]) -> Vec<Event> {
    let mut events: Vec<Event> = Vec::with_capacity(2 * kept.len());
    for (index, operation) in kept.iter().enumerate() {
        events.push((operation.call, 0, index));
        if !unknown[index] {
            events.push((rets[index].max(operation.call), 1, index));
        }
    }
    events.sort_unstable();
    events
}

/// For each unknown operation, the one called just before it with the same
/// step. Such operations are interchangeable: once called, each stays a
/// candidate to the end, so only the earliest called of a class not yet
/// linearized is tried.
fn class_previous(events: &[Event], unknown: &[bool], steps: &[Step]) -> Vec<Option<usize>> {
    let mut class_previous: Vec<Option<usize>> = vec![None; steps.len()];
    let mut class_last: HashMap<Step, usize> = HashMap::new();
    for &(_, kind, index) in events {
        if kind == 0 && unknown[index] {
            class_previous[index] = class_last.insert(steps[index], index);
        }
    }
    class_previous
}

/// The doubly linked list of events the search lifts operations out of:
/// node 0 is the head, event `i` is node `i + 1`, and the last node is the
/// end.
struct EventList {
    next: Vec<usize>,
    prev: Vec<usize>,
    /// Each operation's call node.
    call_node: Vec<usize>,
    /// Each operation's return node (none for an unknown one).
    return_node: Vec<Option<usize>>,
    /// The end node.
    end: usize,
}

impl EventList {
    /// The list of `events`, for `count` operations.
    fn new(events: &[Event], count: usize) -> EventList {
        let end = events.len() + 1;
        let mut next: Vec<usize> = (1..=end + 1).collect();
        next[end] = end;
        let prev: Vec<usize> = (0..=end).map(|node| node.saturating_sub(1)).collect();
        let mut call_node = vec![0usize; count];
        let mut return_node: Vec<Option<usize>> = vec![None; count];
        for (position, &(_, kind, index)) in events.iter().enumerate() {
            if kind == 0 {
                call_node[index] = position + 1;
            } else {
                return_node[index] = Some(position + 1);
            }
        }
        EventList {
            next,
            prev,
            call_node,
            return_node,
            end,
        }
    }

    /// Lifts `operation`'s events out of the list.
    fn lift_operation(&mut self, operation: usize) {
        lift(&mut self.next, &mut self.prev, self.call_node[operation]);
        if let Some(node) = self.return_node[operation] {
            lift(&mut self.next, &mut self.prev, node);
        }
    }

    /// Puts `operation`'s events back, the reverse of `lift_operation`.
    fn unlift_operation(&mut self, operation: usize) {
        if let Some(node) = self.return_node[operation] {
            unlift(&mut self.next, &mut self.prev, node);
        }
        unlift(&mut self.next, &mut self.prev, self.call_node[operation]);
    }
}

/// Unknown operations are numbered apart, so that the set of them
/// linearized is a bitset: each one's number (`usize::MAX` for a definite
/// one) and how many there are.
fn unknown_slots(unknown: &[bool]) -> (Vec<usize>, usize) {
    let mut unknown_slot = vec![usize::MAX; unknown.len()];
    let mut unknown_count = 0usize;
    for (index, unknown) in unknown.iter().enumerate() {
        if *unknown {
            unknown_slot[index] = unknown_count;
            unknown_count += 1;
        }
    }
    (unknown_slot, unknown_count)
}

/// A choice the search made, to undo when it backtracks.
struct Choice {
    operation: usize,
    previous: u32,
    lazy: bool,
}

/// The search over one key's events (see `check_key`).
struct Search {
    events: Vec<Event>,
    steps: Vec<Step>,
    unknown: Vec<bool>,
    /// Operations tried only in the second pass.
    deferred: Vec<bool>,
    class_previous: Vec<Option<usize>>,
    list: EventList,
    zobrist: Vec<u128>,
    unknown_slot: Vec<usize>,
    /// How many definite operations there are: the search succeeds once
    /// it linearized them all.
    definite: usize,
    stack: Vec<Choice>,
    /// Explored states: (hash of the definite operations linearized,
    /// value) to the sets of unknown operations linearized with them. A
    /// state whose unknown set includes an explored one is no better than
    /// it: an unknown operation not yet linearized may still be, or never
    /// be, so fewer of them linearized leaves every choice open.
    seen: HashMap<(u128, u32), Vec<Box<[u64]>>>,
    states: usize,
    linearized_unknown: Vec<u64>,
    linearized_definite: usize,
    state: u32,
    set_hash: u128,
    node: usize,
    /// The pass: definite calls first (false), then unknown ones (true).
    lazy: bool,
}

impl Search {
    /// The search over `kept`'s `steps` once `narrow` ran; `unknown` and
    /// `rets` are as `narrow` left them.
    fn new(
        kept: &[&Operation],
        steps: Vec<Step>,
        unknown: Vec<bool>,
        rets: &[u64],
        deferred: Vec<bool>,
    ) -> Search {
        let count = steps.len();
        let definite = unknown.iter().filter(|unknown| !**unknown).count();
        let events = events(kept, &unknown, rets);
        let class_previous = class_previous(&events, &unknown, &steps);
        let list = EventList::new(&events, count);
        let zobrist: Vec<u128> = (0..count as u64).map(zobrist_key).collect();
        let (unknown_slot, unknown_count) = unknown_slots(&unknown);
        let node = list.next[0];
        Search {
            events,
            steps,
            unknown,
            deferred,
            class_previous,
            list,
            zobrist,
            unknown_slot,
            definite,
            stack: Vec::new(),
            seen: HashMap::new(),
            states: 0,
            linearized_unknown: vec![0u64; unknown_count.div_ceil(64)],
            linearized_definite: 0,
            state: 0,
            set_hash: 0,
            node,
            lazy: false,
        }
    }

    /// `Some(true)` linearizable, `Some(false)` not, `None` gave up.
    fn run(mut self) -> Option<bool> {
        loop {
            if self.linearized_definite == self.definite {
                return Some(true);
            }
            // A definite operation is left, so its return is in the list.
            assert!(
                self.node != self.list.end,
                "the scan passed every pending return"
            );
            let (_, kind, operation) = self.events[self.node - 1];
            if kind == 0 {
                if !self.visit_call(operation)? {
                    self.node = self.list.next[self.node];
                }
                continue;
            }
            if !self.lazy {
                // Every definite candidate was tried; now the unknown ones.
                self.lazy = true;
                self.node = self.list.next[0];
                continue;
            }
            // The first pending return: some candidate had to come first
            // and none led anywhere. Undo the last choice and try the next.
            if !self.backtrack() {
                return Some(false);
            }
        }
    }

    /// Tries to linearize `operation` at its call event: `Some(true)` if
    /// it did (the scan restarts), `Some(false)` if the scan moves on,
    /// `None` if the search ran out of states.
    fn visit_call(&mut self, operation: usize) -> Option<bool> {
        let unknown = self.unknown[operation];
        let canonical = !unknown
            || self.class_previous[operation].is_none_or(|previous| {
                is_set(&self.linearized_unknown, self.unknown_slot[previous])
            });
        if self.deferred[operation] != self.lazy || !canonical {
            return Some(false);
        }
        // An unknown operation that changes nothing only closes options:
        // it may as well never have happened.
        let state = self.state;
        let useful = |after: &u32| !unknown || *after != state;
        let Some(after) = self.steps[operation].apply(state).filter(useful) else {
            return Some(false);
        };
        let hash = if unknown {
            set_bit(&mut self.linearized_unknown, self.unknown_slot[operation]);
            self.set_hash
        } else {
            self.set_hash ^ self.zobrist[operation]
        };
        let explored = self.seen.entry((hash, after)).or_default();
        let dominated = explored
            .iter()
            .any(|other| is_subset(other, &self.linearized_unknown));
        if dominated {
            if unknown {
                clear_bit(&mut self.linearized_unknown, self.unknown_slot[operation]);
            }
            return Some(false);
        }
        explored.push(self.linearized_unknown.clone().into_boxed_slice());
        self.states += 1;
        if self.states > STATES_MAX {
            return None;
        }
        self.linearize(operation, after, hash);
        Some(true)
    }

    /// Takes `operation` as the next linearized one, leaving the register
    /// at `after` and the definite set's hash at `hash`.
    fn linearize(&mut self, operation: usize, after: u32, hash: u128) {
        self.stack.push(Choice {
            operation,
            previous: self.state,
            lazy: self.lazy,
        });
        self.state = after;
        self.set_hash = hash;
        self.list.lift_operation(operation);
        if !self.unknown[operation] {
            self.linearized_definite += 1;
        }
        self.node = self.list.next[0];
        self.lazy = false;
    }

    /// Undoes the last choice and moves the scan past it; false when there
    /// is none left to undo.
    fn backtrack(&mut self) -> bool {
        let Some(choice) = self.stack.pop() else {
            return false;
        };
        self.list.unlift_operation(choice.operation);
        if self.unknown[choice.operation] {
            clear_bit(
                &mut self.linearized_unknown,
                self.unknown_slot[choice.operation],
            );
        } else {
            self.linearized_definite -= 1;
            self.set_hash ^= self.zobrist[choice.operation];
        }
        self.state = choice.previous;
        self.lazy = choice.lazy;
        self.node = self.list.next[self.list.call_node[choice.operation]];
        true
    }
}

/// Rewrites a key's steps into an equivalent, easier search; the verdict
/// does not change.
///
/// - A value no operation reads or compares against is indistinguishable
///   from any other such value, so all of them become one, `garbage`, and
///   states that differ only in which one the register holds merge.
/// - An unknown write of a value that exactly one operation writes, and
///   that a definite read or a swapped compare-and-set observed, must have
///   taken effect (nothing else produces the value, and the key starts
///   missing) and before the earliest return of those observers. It
///   becomes definite with that return; an unknown compare-and-set so
///   observed must have swapped.
fn narrow(steps: &mut [Step], unknown: &mut [bool], rets: &mut [u64], garbage: u32) {
    let mut writers: HashMap<u32, usize> = HashMap::new();
    let mut mentioned: HashSet<u32> = HashSet::new();
    // Value to the earliest return of a definite operation that saw it.
    let mut deadline: HashMap<u32, u64> = HashMap::new();
    for (index, step) in steps.iter().enumerate() {
        let observed = match *step {
            Step::Read(value) => Some(value),
            Step::Swapped { expected, .. } => Some(expected),
            Step::Write(_) | Step::Refused { .. } | Step::Maybe { .. } => None,
        };
        if let Some(value) = observed {
            assert!(!unknown[index], "reads and swaps are definite");
            let earliest = deadline.entry(value).or_insert(rets[index]);
            *earliest = (*earliest).min(rets[index]);
        }
        match *step {
            Step::Read(value) | Step::Refused { expected: value } => {
                mentioned.insert(value);
            }
            Step::Write(new) => *writers.entry(new).or_default() += 1,
            Step::Swapped { expected, new } | Step::Maybe { expected, new } => {
                mentioned.insert(expected);
                *writers.entry(new).or_default() += 1;
            }
        }
    }
    for index in 0..steps.len() {
        let (written, forced) = match steps[index] {
            Step::Write(new) => (new, Step::Write(new)),
            Step::Swapped { expected, new } | Step::Maybe { expected, new } => {
                (new, Step::Swapped { expected, new })
            }
            Step::Read(_) | Step::Refused { .. } => continue,
        };
        if written == 0 {
            continue;
        }
        if unknown[index] && writers.get(&written) == Some(&1) {
            if let Some(&earliest) = deadline.get(&written) {
                steps[index] = forced;
                unknown[index] = false;
                rets[index] = earliest;
                continue;
            }
        }
        if !mentioned.contains(&written) {
            steps[index] = match steps[index] {
                Step::Write(_) => Step::Write(garbage),
                Step::Swapped { expected, .. } => Step::Swapped {
                    expected,
                    new: garbage,
                },
                Step::Maybe { expected, .. } => Step::Maybe {
                    expected,
                    new: garbage,
                },
                step => step,
            };
        }
    }
}

fn is_set(words: &[u64], bit: usize) -> bool {
    words[bit / 64] & (1 << (bit % 64)) != 0
}

fn set_bit(words: &mut [u64], bit: usize) {
    words[bit / 64] |= 1 << (bit % 64);
}

fn clear_bit(words: &mut [u64], bit: usize) {
    words[bit / 64] &= !(1 << (bit % 64));
}

/// Whether every bit of `small` is set in `large`.
fn is_subset(small: &[u64], large: &[u64]) -> bool {
    small
        .iter()
        .zip(large)
        .all(|(small, large)| small & !large == 0)
}

/// Removes `node` from the list; it keeps its own links for `unlift`.
fn lift(next: &mut [usize], prev: &mut [usize], node: usize) {
    next[prev[node]] = next[node];
    prev[next[node]] = prev[node];
}

/// Puts back the node most recently lifted.
fn unlift(next: &mut [usize], prev: &mut [usize], node: usize) {
    next[prev[node]] = node;
    prev[next[node]] = node;
}

/// A fixed pseudo-random 128-bit key per operation (splitmix64 twice).
fn zobrist_key(index: u64) -> u128 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    let high = mix(index.wrapping_mul(2));
    let low = mix(index.wrapping_mul(2).wrapping_add(1));
    (u128::from(high) << 64) | u128::from(low)
}

/// Acknowledged writes the final state lost: an acknowledged put that no
/// other write, delete or compare-and-set (unless it definitely failed)
/// could have followed or overlapped, yet whose value is not the key's
/// final value.
pub fn lost_writes(history: &[Operation], final_values: &BTreeMap<String, Value>) -> usize {
    let mut by_key: BTreeMap<&str, Vec<&Operation>> = BTreeMap::new();
    for operation in history {
        // A refused compare-and-set wrote nothing: it cannot follow.
        let wrote_maybe = !matches!(operation.outcome, Outcome::Fail | Outcome::Swapped(false));
        if !matches!(operation.op, Op::Get) && wrote_maybe {
            by_key.entry(&operation.key).or_default().push(operation);
        }
    }
    let mut lost = 0;
    for (key, writes) in by_key {
        // A key whose final value is unknown cannot tell.
        let Some(final_value) = final_values.get(key) else {
            continue;
        };
        // Whether another write might follow `write` is decided by the
        // latest call and the latest return among the others, so the two
        // largest of each (by position) answer it for every write at once.
        let unknown = writes.iter().filter(|o| o.outcome == Outcome::Info).count();
        let calls = two_largest(writes.iter().map(|o| o.call));
        let rets = two_largest(writes.iter().map(|o| o.ret));
        let largest_other = |top: &[(u64, usize); 2], position: usize| -> Option<u64> {
            top.iter()
                .find(|(_, at)| *at != position && *at != usize::MAX)
                .map(|(value, _)| *value)
        };
        for (position, write) in writes.iter().enumerate() {
            let (Op::Put(value), Outcome::Done) = (&write.op, &write.outcome) else {
                continue;
            };
            let followed = unknown > 0
                || largest_other(&calls, position).is_some_and(|call| call >= write.call)
                || largest_other(&rets, position).is_some_and(|ret| ret >= write.call);
            if !followed && final_value.as_deref() != Some(value.as_str()) {
                lost += 1;
            }
        }
    }
    lost
}

/// Revisions of acknowledged writes that etcd's semantics forbid: two
/// writes at one revision, or a write that completed before another was
/// invoked yet took effect at a later revision. Every key is in one
/// table, so its revisions are one sequence. A linearizable history can
/// still break these (the checker looks at values, not revisions).
pub fn revision_anomalies(history: &[Operation]) -> Vec<String> {
    let mut writes: Vec<&Operation> = history
        .iter()
        .filter(|o| o.revision.is_some() && !matches!(o.outcome, Outcome::Fail | Outcome::Info))
        .collect();
    let mut anomalies = Vec::new();
    let mut seen: BTreeMap<u64, &Operation> = BTreeMap::new();
    for write in &writes {
        let revision = write.revision.unwrap_or_default();
        if let Some(first) = seen.insert(revision, write) {
            anomalies.push(format!(
                "two writes at revision {revision}: {first:?} and {write:?}"
            ));
        }
    }
    // In call order, with the writes completed before each call swept in
    // ret order: the highest revision among them must be below the call's.
    let mut by_ret = writes.clone();
    by_ret.sort_by_key(|o| o.ret);
    writes.sort_by_key(|o| o.call);
    let mut done = 0;
    let mut highest: Option<&Operation> = None;
    for write in writes {
        while done < by_ret.len() && by_ret[done].ret < write.call {
            let candidate = by_ret[done];
            if highest.is_none_or(|h| candidate.revision > h.revision) {
                highest = Some(candidate);
            }
            done += 1;
        }
        if let Some(before) = highest {
            if before.revision >= write.revision {
                anomalies.push(format!(
                    "a write completed before another was invoked took effect at a revision not below it: {before:?}, then {write:?}"
                ));
            }
        }
    }
    anomalies
}

/// The two largest values with their positions (`usize::MAX` when there
/// are fewer than two).
fn two_largest(values: impl Iterator<Item = u64>) -> [(u64, usize); 2] {
    let mut top = [(0, usize::MAX); 2];
    for (position, value) in values.enumerate() {
        if top[0].1 == usize::MAX || value > top[0].0 {
            top[1] = top[0];
            top[0] = (value, position);
        } else if top[1].1 == usize::MAX || value > top[1].0 {
            top[1] = (value, position);
        }
    }
    top
}

#[cfg(test)]
mod tests {
    use super::*;

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

    /// A xorshift64 generator: the tests' seeded randomness.
    fn xorshift(mut seed: u64) -> impl FnMut() -> u64 {
        assert!(seed != 0, "xorshift needs a nonzero seed");
        move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        }
    }

    /// A history of one register as a real system would produce it:
    /// `processes` clients, each operation taking effect at a random point
    /// between its call and return; unknown writes take effect much later
    /// or never.
    fn simulated_history(seed: u64, processes: u64, operations: usize) -> Vec<Operation> {
        let mut next = xorshift(seed | 1);
        // (effect time, operation index); outcomes are filled in when the
        // effects are replayed in time order.
        let mut history: Vec<Operation> = Vec::with_capacity(operations);
        let mut effects: Vec<(u64, usize)> = Vec::new();
        let mut clocks = vec![0u64; processes as usize];
        let mut written: Vec<String> = Vec::new();
        for index in 0..operations {
            let process = next() % processes;
            let call = clocks[process as usize] + next() % 5;
            let effect = call + 1 + next() % 20;
            let ret = effect + 1 + next() % 20;
            clocks[process as usize] = ret;
            let value = format!("{process}-{index}");
            let request = match next() % 10 {
                0..=3 => Op::Get,
                4..=6 => Op::Put(value.clone()),
                7 => Op::Delete,
                _ => Op::Cas {
                    expected: match written.len() {
                        0 => None,
                        length => Some(
                            written[length - 1 - (next() % length.min(3) as u64) as usize].clone(),
                        ),
                    },
                    new: value.clone(),
                },
            };
            if !matches!(request, Op::Get) {
                written.push(value);
            }
            let unknown = !matches!(request, Op::Get) && next().is_multiple_of(25);
            let outcome = if unknown {
                Outcome::Info
            } else {
                Outcome::Done
            };
            if unknown {
                // Much later (after other clients moved on) or never.
                if next().is_multiple_of(2) {
                    effects.push((call + 1 + next() % 2000, index));
                }
            } else {
                effects.push((effect, index));
            }
            history.push(op(process, "k", request, call, ret, outcome));
        }
        effects.sort();
        let mut state: Value = None;
        for (_, index) in effects {
            let operation = &mut history[index];
            let unknown = operation.outcome == Outcome::Info;
            match operation.op.clone() {
                Op::Get => operation.outcome = Outcome::Read(state.clone()),
                Op::Put(value) => state = Some(value),
                Op::Delete => state = None,
                Op::Cas { expected, new } => {
                    let swapped = state == expected;
                    if swapped {
                        state = Some(new);
                    }
                    if !unknown {
                        operation.outcome = Outcome::Swapped(swapped);
                    }
                }
            }
        }
        history
    }

    #[test]
    fn a_long_history_with_unknown_writes_is_checked_and_a_stale_read_in_it_is_found() {
        const OPS: usize = 500;
        for seed in (1..=19u64).step_by(2) {
            let mut history = simulated_history(seed, 8, OPS);
            let unknown = history
                .iter()
                .filter(|o| o.outcome == Outcome::Info)
                .count();
            assert!(
                unknown >= OPS / 100,
                "seed {seed}: only {unknown} unknown writes"
            );
            assert_eq!(check(&history), Verdict::Linearizable, "seed {seed}");
            // A read three quarters in shows the first value ever written,
            // overwritten thousands of times since.
            let first = history
                .iter()
                .find_map(|o| match (&o.op, &o.outcome) {
                    (Op::Put(value), Outcome::Done) => Some(value.clone()),
                    _ => None,
                })
                .expect("a put");
            let stale = (history.len() * 3 / 4..history.len())
                .find(|index| matches!(history[*index].op, Op::Get))
                .expect("a read");
            history[stale].outcome = Outcome::Read(Some(first.clone()));
            match check(&history) {
                Verdict::NotLinearizable { minimal, .. } => {
                    // Only reads that matter remain; writes a compare-and-set
                    // may have seen stay with them.
                    let reads = minimal.iter().filter(|o| o.op == Op::Get).count();
                    assert!(
                        minimal.len() < history.len() / 2 && reads <= 2,
                        "seed {seed}: {} operations left: {minimal:?}",
                        minimal.len()
                    );
                    assert!(
                        minimal.contains(&history[stale]),
                        "seed {seed}: {minimal:?}"
                    );
                }
                other => panic!("seed {seed}: {other:?}"),
            }
        }
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

    #[test]
    fn revision_anomalies_find_duplicates_and_real_time_inversions() {
        let write = |call: u64, ret: u64, revision: u64| Operation {
            revision: Some(revision),
            ..op(
                0,
                "k",
                Op::Put(format!("v{revision}")),
                call,
                ret,
                Outcome::Done,
            )
        };
        let good = [write(0, 10, 5), write(5, 20, 4), write(21, 30, 6)];
        assert!(
            revision_anomalies(&good).is_empty(),
            "overlapping writes may go either way"
        );
        let duplicate = [write(0, 10, 5), write(20, 30, 5)];
        assert_eq!(revision_anomalies(&duplicate).len(), 2);
        let inverted = [write(0, 10, 7), write(11, 20, 6)];
        let found = revision_anomalies(&inverted);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("not below"), "{found:?}");
        let mut unknown = write(11, 20, 6);
        unknown.outcome = Outcome::Info;
        assert!(revision_anomalies(&[write(0, 10, 7), unknown]).is_empty());
    }

    #[test]
    fn lost_writes_agree_with_the_pairwise_definition() {
        // The definition, pairwise: an acknowledged put is lost if no other
        // write of its key (not failed) could follow it, and the key's
        // final value differs.
        fn pairwise(history: &[Operation], finals: &BTreeMap<String, Value>) -> usize {
            let writes: Vec<&Operation> = history
                .iter()
                .filter(|o| {
                    !matches!(o.op, Op::Get)
                        && !matches!(o.outcome, Outcome::Fail | Outcome::Swapped(false))
                })
                .collect();
            let mut lost = 0;
            for (position, write) in writes.iter().enumerate() {
                let (Op::Put(value), Outcome::Done) = (&write.op, &write.outcome) else {
                    continue;
                };
                let followed = writes.iter().enumerate().any(|(other_position, other)| {
                    other_position != position
                        && other.key == write.key
                        && (other.outcome == Outcome::Info || other.ret >= write.call)
                });
                let Some(final_value) = finals.get(&write.key) else {
                    continue;
                };
                if !followed && final_value.as_deref() != Some(value.as_str()) {
                    lost += 1;
                }
            }
            lost
        }
        let mut next = xorshift(0x9E37_79B9_7F4A_7C15);
        let mut lost_seen = 0;
        for _ in 0..5000 {
            let mut history = Vec::new();
            for index in 0..(1 + next() % 6) {
                let key = format!("k{}", next() % 2);
                let call = next() % 20;
                let ret = call + next() % 10;
                let value = format!("v{index}");
                let (request, outcome) = match next() % 5 {
                    0 => (Op::Put(value), Outcome::Info),
                    1 => (Op::Delete, Outcome::Done),
                    2 => (Op::Put(value), Outcome::Fail),
                    _ => (Op::Put(value), Outcome::Done),
                };
                history.push(op(index, &key, request, call, ret, outcome));
            }
            let mut finals = BTreeMap::new();
            for key in ["k0", "k1"] {
                if !next().is_multiple_of(4) {
                    let value = (!next().is_multiple_of(3)).then(|| format!("v{}", next() % 6));
                    finals.insert(key.to_string(), value);
                }
            }
            let expected = pairwise(&history, &finals);
            assert_eq!(
                lost_writes(&history, &finals),
                expected,
                "{history:?} {finals:?}"
            );
            lost_seen += expected;
        }
        assert!(lost_seen > 100, "{lost_seen}");
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
        let mut next = xorshift(0x2545_F491_4F6C_DD1D);
        // Writes pick from five values, reads and expectations from the
        // first four: "e" is never observed, the others at random.
        let values = ["a", "b", "c", "d", "e"];
        let (mut linearizable, mut not) = (0, 0);
        for _ in 0..20000 {
            let count = 2 + (next() % 5) as usize;
            let mut history = Vec::new();
            for process in 0..count as u64 {
                let call = next() % 20;
                let ret = call + next() % 8;
                let value = values[(next() % 5) as usize];
                let seen = values[(next() % 4) as usize];
                let expected =
                    (!next().is_multiple_of(4)).then(|| values[(next() % 4) as usize].to_string());
                let (operation, outcome) = match next() % 9 {
                    0..=2 => (
                        Op::Get,
                        Outcome::Read((!next().is_multiple_of(4)).then(|| seen.to_string())),
                    ),
                    3 => (Op::Put(value.into()), Outcome::Done),
                    4 => (Op::Put(value.into()), Outcome::Info),
                    5 => (Op::Delete, Outcome::Done),
                    6 => (Op::Delete, Outcome::Info),
                    7 => (
                        Op::Cas {
                            expected,
                            new: value.into(),
                        },
                        Outcome::Info,
                    ),
                    _ => (
                        Op::Cas {
                            expected,
                            new: value.into(),
                        },
                        Outcome::Swapped(next().is_multiple_of(2)),
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
