//! Waiting for a key to change: what a reader waiting for another client to
//! load a key ([`crate::dispatch::stampede`]) listens to.
//!
//! The store fires a key's watches whenever it hears that the key changed,
//! whoever reported it (a write through this instance, the bus, tracking),
//! and every watch on a flush or a suspension. A watch is a
//! [`tokio::sync::Notify`] permit: a change reported while nobody awaits is
//! kept for the next [`Watch::changed`], so none is lost between a check
//! and the wait. With no watch registered, firing costs one atomic load.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::Notify;

/// The watches of one store, by key hash. Keys that share a hash share
/// wake-ups: a spurious wake-up, never a missed one.
#[derive(Default)]
pub(crate) struct Watches {
    /// Watches registered; 0 lets [`Watches::fire`] return at once.
    count: AtomicUsize,
    next_id: AtomicU64,
    map: Mutex<HashMap<u64, Vec<Registered>>>,
}

/// A watch's id and what wakes it.
type Registered = (u64, Arc<Notify>);

impl Watches {
    /// Registers a watch on `hash`; dropping the [`Watch`] removes it.
    pub(crate) fn watch(self: &Arc<Self>, hash: u64) -> Watch {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let notify = Arc::new(Notify::new());
        self.map
            .lock()
            .entry(hash)
            .or_default()
            .push((id, notify.clone()));
        self.count.fetch_add(1, Ordering::SeqCst);
        Watch {
            watches: self.clone(),
            hash,
            id,
            notify,
        }
    }

    /// Wakes the watches of `hash`.
    pub(crate) fn fire(&self, hash: u64) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(list) = self.map.lock().get(&hash) {
            for (_, notify) in list {
                notify.notify_one();
            }
        }
    }

    /// Wakes every watch (a flush, a suspension, a pattern).
    pub(crate) fn fire_all(&self) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        for list in self.map.lock().values() {
            for (_, notify) in list {
                notify.notify_one();
            }
        }
    }
}

/// One registered watch, from [`crate::cache::Store::watch`].
pub struct Watch {
    watches: Arc<Watches>,
    hash: u64,
    id: u64,
    notify: Arc<Notify>,
}

impl Watch {
    /// Completes once the key changed (or may have) since the watch was
    /// made or since the last call returned.
    pub async fn changed(&self) {
        self.notify.notified().await;
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut map = self.watches.map.lock();
        if let Some(list) = map.get_mut(&self.hash) {
            list.retain(|(id, _)| *id != self.id);
            if list.is_empty() {
                map.remove(&self.hash);
            }
        }
        self.watches.count.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_change_before_the_wait_is_kept_and_other_keys_do_not_wake() {
        let watches = Arc::new(Watches::default());
        let a = watches.watch(1);
        let b = watches.watch(2);
        watches.fire(1);
        tokio::time::timeout(Duration::from_secs(5), a.changed())
            .await
            .unwrap();
        let early = tokio::time::timeout(Duration::from_millis(50), b.changed()).await;
        assert!(early.is_err(), "a change of another key woke the watch");
        watches.fire_all();
        tokio::time::timeout(Duration::from_secs(5), b.changed())
            .await
            .unwrap();
    }

    #[test]
    fn dropping_watches_unregisters_them() {
        let watches = Arc::new(Watches::default());
        let a = watches.watch(7);
        let b = watches.watch(7);
        drop(a);
        assert_eq!(watches.count.load(Ordering::SeqCst), 1);
        drop(b);
        assert_eq!(watches.count.load(Ordering::SeqCst), 0);
        assert!(watches.map.lock().is_empty());
    }
}
