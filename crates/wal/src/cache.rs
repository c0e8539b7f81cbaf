//! A bounded cache of decoded entries records, keyed by their location.
//! Records read from disk go in (a lagging follower's catch-up reads the
//! same records for each retry); fresh writes do not, since Raft keeps
//! unapplied entries in memory. The oldest records leave first once the
//! budget is spent.

use std::collections::VecDeque;
use std::sync::Arc;

use regatta_raft::Entry;
use rustc_hash::FxHashMap;

use crate::index::Location;

/// Decoded records within a byte budget, evicted oldest first.
#[derive(Debug)]
pub struct RecordCache {
    records: FxHashMap<Location, Arc<Vec<Entry>>>,
    order: VecDeque<Location>,
    size_bytes: u64,
    size_bytes_max: u64,
}

impl RecordCache {
    /// An empty cache holding at most `size_bytes_max` bytes of entries.
    pub fn new(size_bytes_max: u64) -> RecordCache {
        RecordCache {
            records: FxHashMap::default(),
            order: VecDeque::new(),
            size_bytes: 0,
            size_bytes_max,
        }
    }

    /// The record at `location`, if cached.
    pub fn get(&self, location: &Location) -> Option<Arc<Vec<Entry>>> {
        self.records.get(location).cloned()
    }

    /// Caches a decoded record, evicting the oldest ones over budget.
    pub fn insert(&mut self, location: Location, entries: Arc<Vec<Entry>>) {
        let size = location.body_len as u64;
        if size > self.size_bytes_max || self.records.contains_key(&location) {
            return;
        }
        self.records.insert(location, entries);
        self.order.push_back(location);
        self.size_bytes += size;
        while self.size_bytes > self.size_bytes_max {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if self.records.remove(&oldest).is_some() {
                self.size_bytes -= oldest.body_len as u64;
            }
        }
    }

    /// Forgets every record of a deleted segment.
    pub fn forget_segment(&mut self, segment: u64) {
        let size_bytes = &mut self.size_bytes;
        self.records.retain(|location, _| {
            let keep = location.segment != segment;
            if !keep {
                *size_bytes -= location.body_len as u64;
            }
            keep
        });
        self.order.retain(|location| location.segment != segment);
    }
}
