//! The in-memory index of every group: where its live entries are on disk,
//! their terms, its hard state, snapshot and compaction point.
//!
//! Memory stays small for large logs: one [`Span`] per entries *record*
//! (not per entry), and terms run-length encoded (a new run only where the
//! term changes). Entry payloads are never kept here; see the record cache.
//!
//! Invariants (checked by `GroupState::assert_invariants`):
//! - spans are contiguous, from `first_index()` to `last_index()`;
//! - term runs start at or after `first_index()` and increase strictly.

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use regatta_raft::{Entry, HardState, LogIndex, SnapshotMeta, Term};

use crate::record::Record;

/// Where a record's body is on disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Location {
    /// Segment sequence.
    pub segment: u64,
    /// Offset of the body in the segment.
    pub body_offset: u64,
    /// Length of the body.
    pub body_len: u32,
}

/// Live entries `[first, last]` stored in one entries record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    /// First live entry of the record.
    pub first: LogIndex,
    /// Last live entry of the record.
    pub last: LogIndex,
    /// The record.
    pub location: Location,
}

/// Why a record cannot be applied to a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApplyError(pub String);

/// Everything the WAL knows about one group.
#[derive(Clone, Debug, Default)]
pub struct GroupState {
    pub(crate) hard_state: HardState,
    hard_state_segment: Option<u64>,
    pub(crate) snapshot: Option<SnapshotMeta>,
    snapshot_segment: Option<u64>,
    /// Entries up to this index (of this term) are gone.
    pub(crate) compacted: (LogIndex, Term),
    compacted_segment: Option<u64>,
    pub(crate) spans: VecDeque<Span>,
    /// (first index of the run, term), strictly increasing in both.
    term_runs: VecDeque<(LogIndex, Term)>,
}

impl GroupState {
    /// The first index still held as an entry.
    pub fn first_index(&self) -> LogIndex {
        self.compacted.0.next()
    }

    /// Bytes of the entries records still held for this group (a record
    /// partly compacted counts whole).
    pub fn log_bytes(&self) -> u64 {
        self.spans
            .iter()
            .map(|span| span.location.body_len as u64)
            .sum()
    }

    /// The last index held, or the compaction point when empty.
    pub fn last_index(&self) -> LogIndex {
        self.spans
            .back()
            .map(|span| span.last)
            .unwrap_or(self.compacted.0)
    }

    /// The term at `index`: `Ok(None)` past the end, `Err` when compacted.
    pub fn term(&self, index: LogIndex) -> Result<Option<Term>, LogIndex> {
        if index == self.compacted.0 {
            return Ok(Some(self.compacted.1));
        }
        if index < self.compacted.0 {
            return Err(self.compacted.0);
        }
        if index > self.last_index() {
            return Ok(None);
        }
        let position = self.term_runs.partition_point(|(start, _)| *start <= index);
        Ok(position.checked_sub(1).map(|p| self.term_runs[p].1))
    }

    /// A group whose log, as far as replay is concerned, starts after
    /// `floor`, set by the record in `segment` (see `Wal::open`).
    pub fn starting_at(floor: (LogIndex, Term), segment: u64) -> GroupState {
        GroupState {
            compacted: floor,
            compacted_segment: Some(segment),
            ..GroupState::default()
        }
    }

    /// The oldest segment this group still needs.
    pub fn oldest_segment_needed(&self) -> Option<u64> {
        [
            self.hard_state_segment,
            self.snapshot_segment,
            self.compacted_segment,
            self.spans.front().map(|span| span.location.segment),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Applies one record found at `location` (replay or a fresh write).
    pub fn apply(&mut self, record: &Record, location: Location) -> Result<(), ApplyError> {
        let segment = location.segment;
        match record {
            Record::Entries(entries) => self.append(entries, location)?,
            Record::HardState(state) => {
                self.hard_state = *state;
                self.hard_state_segment = Some(segment);
            }
            Record::Snapshot { meta, installed } => {
                if *installed && meta.index > self.compacted.0 {
                    // From a leader: the log restarts after it.
                    self.spans.clear();
                    self.term_runs.clear();
                    self.compacted = (meta.index, meta.term);
                    self.compacted_segment = Some(segment);
                }
                let newer = self
                    .snapshot
                    .as_ref()
                    .is_none_or(|known| known.index <= meta.index);
                if newer {
                    self.snapshot = Some(meta.clone());
                    self.snapshot_segment = Some(segment);
                }
            }
            Record::Compaction { index, term } => {
                self.compact(*index, *term);
                self.compacted_segment = Some(segment);
            }
            Record::GroupRemoved => *self = GroupState::default(),
            // Replay uses it to skip dead records; the state is already whole.
            Record::Rewritten { .. } => {}
        }
        self.assert_invariants();
        Ok(())
    }

    /// Checks that `entries` may be appended now; see [`GroupState::apply`].
    pub fn check_append(&self, entries: &[Entry]) -> Result<(), ApplyError> {
        let Some(first) = entries.first() else {
            return Err(ApplyError("an entries update with no entries".into()));
        };
        if first.index <= self.compacted.0 {
            return Err(ApplyError(format!(
                "entries from {} would overwrite the compacted prefix up to {}",
                first.index, self.compacted.0
            )));
        }
        if first.index > self.last_index().next() {
            return Err(ApplyError(format!(
                "entries from {} leave a gap after the last index {}",
                first.index,
                self.last_index()
            )));
        }
        let contiguous = entries
            .iter()
            .enumerate()
            .all(|(position, entry)| entry.index == first.index.plus(position as u64));
        if !contiguous {
            return Err(ApplyError("entries are not contiguous".into()));
        }
        Ok(())
    }

    fn append(&mut self, entries: &[Entry], location: Location) -> Result<(), ApplyError> {
        self.check_append(entries)?;
        let first = entries[0].index;
        let last = first.plus(entries.len() as u64 - 1);
        self.truncate_from(first);
        self.spans.push_back(Span {
            first,
            last,
            location,
        });
        for entry in entries {
            if self.term_runs.back().map(|(_, term)| *term) != Some(entry.term) {
                self.term_runs.push_back((entry.index, entry.term));
            }
        }
        Ok(())
    }

    /// Drops every entry after `index` (replay: a record below the
    /// compaction point that overwrote what followed it).
    pub fn truncate_after(&mut self, index: LogIndex) {
        self.truncate_from(index.next());
        self.assert_invariants();
    }

    /// Drops every entry at or after `index`.
    fn truncate_from(&mut self, index: LogIndex) {
        while self.spans.back().is_some_and(|span| span.first >= index) {
            self.spans.pop_back();
        }
        if let Some(span) = self.spans.back_mut() {
            if span.last >= index {
                span.last = index.prev();
            }
        }
        while self
            .term_runs
            .back()
            .is_some_and(|(start, _)| *start >= index)
        {
            self.term_runs.pop_back();
        }
    }

    /// Drops every entry up to and including `index`.
    fn compact(&mut self, index: LogIndex, term: Term) {
        if index <= self.compacted.0 {
            return;
        }
        while self.spans.front().is_some_and(|span| span.last <= index) {
            self.spans.pop_front();
        }
        if let Some(span) = self.spans.front_mut() {
            if span.first <= index {
                span.first = index.next();
            }
        }
        // Keep the run covering index + 1, starting it there.
        while self.term_runs.len() > 1 && self.term_runs[1].0 <= index.next() {
            self.term_runs.pop_front();
        }
        if self.spans.is_empty() {
            self.term_runs.clear();
        } else if let Some(run) = self.term_runs.front_mut() {
            run.0 = run.0.max(index.next());
        }
        self.compacted = (index, term);
    }

    /// O(1) checks always; the full walk over every span in debug builds
    /// only, since appends must not cost time proportional to the log.
    fn assert_invariants(&self) {
        if let (Some(first), Some(last)) = (self.spans.front(), self.spans.back()) {
            assert_eq!(
                first.first,
                self.first_index(),
                "spans do not start at the first index"
            );
            assert!(last.first <= last.last, "empty span");
        }
        if let Some((start, _)) = self.term_runs.front() {
            assert!(
                *start >= self.first_index(),
                "term run before the first index"
            );
        }
        assert_eq!(
            self.term_runs.is_empty(),
            self.spans.is_empty(),
            "terms without entries"
        );
        #[cfg(debug_assertions)]
        {
            let mut expected = self.first_index();
            for span in &self.spans {
                assert_eq!(span.first, expected, "spans are not contiguous");
                assert!(span.first <= span.last, "empty span");
                expected = span.last.next();
            }
        }
    }
}

/// Every group's state.
#[derive(Default, Debug)]
pub struct Index {
    pub(crate) groups: FxHashMap<u64, GroupState>,
}

impl Index {
    /// Applies a record of `group`.
    pub fn apply(
        &mut self,
        group: u64,
        record: &Record,
        location: Location,
    ) -> Result<(), ApplyError> {
        if let Record::GroupRemoved = record {
            self.groups.remove(&group);
            return Ok(());
        }
        self.groups
            .entry(group)
            .or_default()
            .apply(record, location)
    }

    /// The oldest segment any group still needs.
    pub fn oldest_segment_needed(&self) -> Option<u64> {
        self.groups
            .values()
            .filter_map(GroupState::oldest_segment_needed)
            .min()
    }

    /// Groups that still need `segment`, with the bytes of their live
    /// entries records.
    pub fn groups_pinning(&self, segment: u64) -> Vec<(u64, u64)> {
        let mut groups: Vec<(u64, u64)> = self
            .groups
            .iter()
            .filter(|(_, state)| state.oldest_segment_needed() == Some(segment))
            .map(|(group, state)| {
                let live_bytes = state
                    .spans
                    .iter()
                    .map(|span| span.location.body_len as u64)
                    .sum();
                (*group, live_bytes)
            })
            .collect();
        groups.sort_unstable();
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use regatta_raft::EntryPayload;

    fn entries(first: u64, count: u64, term: u64) -> Vec<Entry> {
        (first..first + count)
            .map(|index| Entry {
                term: Term(term),
                index: LogIndex(index),
                payload: EntryPayload::Empty,
            })
            .collect()
    }

    fn at(segment: u64) -> Location {
        Location {
            segment,
            body_offset: 0,
            body_len: 0,
        }
    }

    #[test]
    fn appends_truncate_and_compact() {
        let mut group = GroupState::default();
        group
            .apply(&Record::Entries(entries(1, 10, 1)), at(1))
            .expect("append");
        group
            .apply(&Record::Entries(entries(11, 5, 2)), at(1))
            .expect("append");
        assert_eq!(group.last_index(), LogIndex(15));
        assert_eq!(group.term(LogIndex(10)), Ok(Some(Term(1))));
        assert_eq!(group.term(LogIndex(11)), Ok(Some(Term(2))));
        // A new leader overwrites from 8.
        group
            .apply(&Record::Entries(entries(8, 2, 3)), at(2))
            .expect("truncate");
        assert_eq!(group.last_index(), LogIndex(9));
        assert_eq!(group.term(LogIndex(8)), Ok(Some(Term(3))));
        assert_eq!(group.term(LogIndex(7)), Ok(Some(Term(1))));
        assert_eq!(group.term(LogIndex(10)), Ok(None));
        group
            .apply(
                &Record::Compaction {
                    index: LogIndex(8),
                    term: Term(3),
                },
                at(3),
            )
            .expect("compact");
        assert_eq!(group.first_index(), LogIndex(9));
        assert_eq!(group.term(LogIndex(8)), Ok(Some(Term(3))));
        assert_eq!(group.term(LogIndex(7)), Err(LogIndex(8)));
        assert_eq!(group.spans.len(), 1);
        assert_eq!(group.oldest_segment_needed(), Some(2));
    }

    #[test]
    fn bad_appends_are_refused() {
        let mut group = GroupState::default();
        assert!(group
            .apply(&Record::Entries(entries(2, 1, 1)), at(1))
            .is_err());
        group
            .apply(&Record::Entries(entries(1, 3, 1)), at(1))
            .expect("append");
        group
            .apply(
                &Record::Compaction {
                    index: LogIndex(2),
                    term: Term(1),
                },
                at(1),
            )
            .expect("compact");
        assert!(group
            .apply(&Record::Entries(entries(2, 1, 1)), at(1))
            .is_err());
    }

    #[test]
    fn an_installed_snapshot_replaces_the_log() {
        let mut group = GroupState::default();
        group
            .apply(&Record::Entries(entries(1, 5, 1)), at(1))
            .expect("append");
        let meta = SnapshotMeta {
            index: LogIndex(3),
            term: Term(1),
            membership: Default::default(),
        };
        let taken = Record::Snapshot {
            meta: meta.clone(),
            installed: false,
        };
        group.apply(&taken, at(2)).expect("snapshot");
        assert_eq!(
            group.last_index(),
            LogIndex(5),
            "a snapshot taken here keeps the log"
        );
        let foreign = SnapshotMeta {
            index: LogIndex(20),
            term: Term(4),
            ..meta
        };
        group
            .apply(
                &Record::Snapshot {
                    meta: foreign,
                    installed: true,
                },
                at(3),
            )
            .expect("install");
        assert_eq!(group.first_index(), LogIndex(21));
        assert_eq!(group.last_index(), LogIndex(20));
        assert_eq!(group.term(LogIndex(20)), Ok(Some(Term(4))));
    }
}
