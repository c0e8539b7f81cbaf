//! A group's applied index on this node, for the tasks that wait for it:
//! linearizable reads on the caller's task, revision waits and the
//! cross-location replication stream.
//!
//! The apply thread publishes as soon as it applied committed entries,
//! before it answers their proposers, so that an acknowledged write is
//! always counted here; the worker publishes after every apply report
//! (the only publish after a snapshot install; a publish never lowers the
//! index). A
//! `tokio::sync::watch` would lock eight mutexes per publish to wake
//! receivers that almost never wait; here a publish costs two atomic
//! operations unless some task is waiting.
//!
//! No wake-up is lost: a waiter counts itself in `waiters` and registers
//! with `notify` before it reads the index, and the publisher stores the
//! index before it reads `waiters` (all sequentially consistent). So
//! either the publisher sees the waiter and wakes it, or the waiter sees
//! the new index.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use regatta_raft::LogIndex;
use tokio::sync::Notify;

struct Shared {
    index: AtomicU64,
    stopped: AtomicBool,
    waiters: AtomicUsize,
    notify: Notify,
}

/// Where the worker publishes a group's applied index. Dropping it (the
/// group stopped on this node) stops every [`AppliedWatch`] of it.
pub(crate) struct AppliedPublisher {
    shared: Arc<Shared>,
}

/// Where the apply thread publishes a group's applied index. Unlike the
/// [`AppliedPublisher`], dropping it stops nothing.
#[derive(Clone)]
pub(crate) struct AppliedSink {
    shared: Arc<Shared>,
}

impl AppliedSink {
    /// Raises the applied index to `index` (see
    /// [`AppliedPublisher::publish`]) while the group runs on this node.
    /// Returns false, publishing nothing, once it stopped: the caller then
    /// answers its proposers `GroupStopped`, as the worker answered every
    /// other proposer of the group.
    pub(crate) fn publish(&self, index: LogIndex) -> bool {
        if self.shared.stopped.load(Ordering::SeqCst) {
            return false;
        }
        publish(&self.shared, index);
        true
    }
}

/// Raises the applied index to `index` (never lowers it) and wakes the
/// tasks waiting, if any.
fn publish(shared: &Shared, index: LogIndex) {
    let previous = shared.index.fetch_max(index.0, Ordering::SeqCst);
    if index.0 > previous && shared.waiters.load(Ordering::SeqCst) > 0 {
        shared.notify.notify_waiters();
    }
}

/// Follows a group's applied index on this node; cheap to clone.
#[derive(Clone)]
pub struct AppliedWatch {
    shared: Arc<Shared>,
}

/// The group stopped on this node: its applied index will not move again
/// (except by one apply-task publish that raced with the stop).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupStopped;

impl AppliedPublisher {
    /// A publisher starting at `applied`, and its first watch.
    pub(crate) fn new(applied: LogIndex) -> (AppliedPublisher, AppliedWatch) {
        let shared = Arc::new(Shared {
            index: AtomicU64::new(applied.0),
            stopped: AtomicBool::new(false),
            waiters: AtomicUsize::new(0),
            notify: Notify::new(),
        });
        let watch = AppliedWatch {
            shared: Arc::clone(&shared),
        };
        (AppliedPublisher { shared }, watch)
    }

    /// Raises the applied index to `index` (never lowers it) and wakes the
    /// tasks waiting, if any.
    pub(crate) fn publish(&self, index: LogIndex) {
        publish(&self.shared, index);
    }

    /// The applied index published so far, by either side.
    pub(crate) fn get(&self) -> LogIndex {
        LogIndex(self.shared.index.load(Ordering::SeqCst))
    }

    /// A handle for the apply thread to publish through.
    pub(crate) fn sink(&self) -> AppliedSink {
        AppliedSink {
            shared: Arc::clone(&self.shared),
        }
    }
}

impl Drop for AppliedPublisher {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::SeqCst);
        self.shared.notify.notify_waiters();
    }
}

/// Counts a waiting task in `waiters` while it lives.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(waiters: &'a AtomicUsize) -> Waiting<'a> {
        waiters.fetch_add(1, Ordering::SeqCst);
        Waiting(waiters)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppliedWatch {
    /// The applied index now.
    pub fn get(&self) -> LogIndex {
        LogIndex(self.shared.index.load(Ordering::SeqCst))
    }

    /// True once the group stopped on this node.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::SeqCst)
    }

    /// Resolves with the applied index once it is at least `index`, or
    /// with `GroupStopped` once the group stopped short of it.
    pub async fn wait_for(&self, index: LogIndex) -> Result<LogIndex, GroupStopped> {
        let _waiting = Waiting::new(&self.shared.waiters);
        loop {
            let notified = self.shared.notify.notified();
            tokio::pin!(notified);
            // Registered before the index is read: a publish after the
            // read wakes this future.
            notified.as_mut().enable();
            let applied = self.get();
            if applied >= index {
                return Ok(applied);
            }
            if self.is_stopped() {
                return Err(GroupStopped);
            }
            notified.await;
        }
    }

    /// Resolves once the applied index moved past `seen`.
    pub async fn changed_from(&self, seen: LogIndex) -> Result<LogIndex, GroupStopped> {
        self.wait_for(seen.next()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_wake_on_publish_and_on_stop() {
        let (publisher, watch) = AppliedPublisher::new(LogIndex(5));
        assert_eq!(watch.wait_for(LogIndex(5)).await, Ok(LogIndex(5)));
        let waiter = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.wait_for(LogIndex(7)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        publisher.publish(LogIndex(6));
        publisher.publish(LogIndex(4)); // never lowers
        assert_eq!(watch.get(), LogIndex(6));
        assert!(!waiter.is_finished(), "6 is short of 7");
        publisher.publish(LogIndex(9));
        assert_eq!(waiter.await.expect("waiter"), Ok(LogIndex(9)));
        assert_eq!(watch.changed_from(LogIndex(8)).await, Ok(LogIndex(9)));

        let stopped = {
            let watch = watch.clone();
            tokio::spawn(async move { watch.changed_from(LogIndex(9)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(publisher);
        assert_eq!(stopped.await.expect("waiter"), Err(GroupStopped));
        assert!(watch.is_stopped());
        assert_eq!(
            watch.wait_for(LogIndex(9)).await,
            Ok(LogIndex(9)),
            "reached"
        );
    }

    /// The apply thread's sink publishes while the group runs, and refuses
    /// (telling its caller) once the worker dropped the publisher.
    #[test]
    fn a_sink_stops_publishing_with_its_group() {
        let (publisher, watch) = AppliedPublisher::new(LogIndex(1));
        let sink = publisher.sink();
        assert!(sink.publish(LogIndex(3)));
        assert_eq!(watch.get(), LogIndex(3));
        assert_eq!(publisher.get(), LogIndex(3));
        drop(publisher);
        assert!(watch.is_stopped());
        assert!(!sink.publish(LogIndex(4)), "the group stopped");
        assert_eq!(watch.get(), LogIndex(3), "a stopped index does not move");
    }

    /// Many publishes racing many waiters: every waiter ends, none hangs.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_wake_up_is_lost_under_races() {
        let (publisher, watch) = AppliedPublisher::new(LogIndex(0));
        let waiters: Vec<_> = (1..=2_000u64)
            .map(|target| {
                let watch = watch.clone();
                tokio::spawn(async move { watch.wait_for(LogIndex(target)).await })
            })
            .collect();
        let publisher = tokio::spawn(async move {
            for index in 1..=2_000u64 {
                publisher.publish(LogIndex(index));
                if index % 64 == 0 {
                    tokio::task::yield_now().await;
                }
            }
            publisher
        });
        for waiter in waiters {
            let result = tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("a waiter hung")
                .expect("waiter");
            assert!(result.is_ok());
        }
        drop(publisher.await.expect("publisher"));
    }
}
