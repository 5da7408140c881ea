//! A small pool of multiplexed connections for one protocol and identity.
//!
//! A session keeps using one connection while it has requests in flight
//! (replies across connections would otherwise race), and picks the next one
//! round-robin when it is idle, preferring connections that are up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{Conn, Credentials, Settings, SetupHook};
use crate::protocol::Proto;

/// Multiplexed connections shared by every session of one identity and
/// protocol.
pub struct Pool {
    conns: Box<[Conn]>,
    next: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(
        settings: Arc<Settings>,
        proto: Proto,
        creds: Option<Credentials>,
        hook: Option<Arc<SetupHook>>,
    ) -> Pool {
        let conns = (0..settings.pool_size.max(1))
            .map(|_| Conn::pooled(settings.clone(), proto, creds.clone(), hook.clone()))
            .collect();
        Pool {
            conns,
            next: AtomicUsize::new(0),
        }
    }

    /// Picks a connection for a session that has nothing in flight: the next
    /// one round-robin that is up, or the next one at all when none is (it
    /// then answers with the reason at once).
    pub fn pick(&self) -> usize {
        let n = self.conns.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n)
            .map(|i| (start + i) % n)
            .find(|&i| self.conns[i].is_up())
            .unwrap_or(start)
    }

    /// Every connection of the pool.
    pub fn conns(&self) -> &[Conn] {
        &self.conns
    }

    /// Connection number `i` (as returned by [`Pool::pick`]).
    pub fn conn(&self, i: usize) -> &Conn {
        &self.conns[i % self.conns.len()]
    }
}
