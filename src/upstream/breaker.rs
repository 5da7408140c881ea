//! The circuit breaker of one upstream node.
//!
//! Every connection to the node reports to it: a reply is a success; a
//! command timeout or a failed connect is a failure.
//! After `failure_threshold` failures in a row the breaker *opens*: new
//! requests fail at once ([`Conn::send_all`](super::Conn::send_all) refuses
//! them with [`UpstreamError::CircuitOpen`](super::UpstreamError)), so that
//! nothing waits on a Redis that is down or frozen, and dispatch may answer
//! cacheable reads from L1, stale entries included. While it is open a
//! probe (a fresh connection and a `PING`, every reconnect delay) checks
//! whether Redis answers again, and closes it when it does. Failing that,
//! it turns *half-open* `reset` after it opened: requests go through as
//! probes, the first success closes it and a failure opens it again.
//! A connection that is lost and reconnects at once is not a failure;
//! neither is a reply, even an error, unless it says Redis cannot serve
//! yet (`-LOADING`).
//!
//! The state is one atomic for the hot path (`allows` on every request,
//! `success` on every reply); transitions take a small lock.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const CLOSED: u8 = 0;
const OPEN: u8 = 1;
const HALF_OPEN: u8 = 2;

/// What the breaker lets through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Everything goes upstream.
    Closed,
    /// Requests fail at once.
    Open,
    /// Requests go through as probes.
    HalfOpen,
}

impl BreakerState {
    /// The name `INFO` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// One node's circuit breaker. See the module docs.
#[derive(Debug)]
pub struct Breaker {
    threshold: u32,
    reset: Duration,
    state: AtomicU8,
    /// Failures in a row while closed.
    failures: AtomicU32,
    /// When it last opened.
    opened: Mutex<Option<Instant>>,
    /// Times it opened.
    opens: AtomicU64,
    /// Whether a probe task is running ([`Breaker::start_probe`]).
    probing: std::sync::atomic::AtomicBool,
}

impl Breaker {
    /// A closed breaker opening after `threshold` failures in a row and
    /// probing `reset` after opening.
    pub fn new(threshold: usize, reset: Duration) -> Breaker {
        Breaker {
            threshold: u32::try_from(threshold.max(1)).unwrap_or(u32::MAX),
            reset,
            state: AtomicU8::new(CLOSED),
            failures: AtomicU32::new(0),
            opened: Mutex::new(None),
            opens: AtomicU64::new(0),
            probing: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Claims the right to run the one probe task; false if one runs
    /// already. The task calls [`Breaker::probe_ended`] when it stops.
    pub fn start_probe(&self) -> bool {
        !self.probing.swap(true, Ordering::AcqRel)
    }

    /// The probe task stopped.
    pub fn probe_ended(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// The current state.
    pub fn state(&self) -> BreakerState {
        match self.state.load(Ordering::Acquire) {
            OPEN => BreakerState::Open,
            HALF_OPEN => BreakerState::HalfOpen,
            _ => BreakerState::Closed,
        }
    }

    /// Whether the breaker is not closed (open, or half-open while
    /// probing): dispatch then serves stale entries rather than read them
    /// from an upstream that may not answer.
    pub fn is_open(&self) -> bool {
        self.state.load(Ordering::Acquire) != CLOSED
    }

    /// How many times it opened.
    pub fn opens(&self) -> u64 {
        self.opens.load(Ordering::Relaxed)
    }

    /// Whether a request may go upstream now. An open breaker whose
    /// `reset` has passed turns half-open and lets it through.
    pub fn allows(&self) -> bool {
        if self.state.load(Ordering::Acquire) != OPEN {
            return true;
        }
        if self.probe_due() {
            self.half_open("reset elapsed");
            return true;
        }
        false
    }

    fn probe_due(&self) -> bool {
        self.opened
            .lock()
            .is_some_and(|at| at.elapsed() >= self.reset)
    }

    /// A reply arrived.
    pub fn success(&self) {
        if self.state.load(Ordering::Acquire) == CLOSED {
            if self.failures.load(Ordering::Relaxed) != 0 {
                self.failures.store(0, Ordering::Relaxed);
            }
            return;
        }
        let mut opened = self.opened.lock();
        if self.state.load(Ordering::Acquire) != CLOSED {
            self.state.store(CLOSED, Ordering::Release);
            self.failures.store(0, Ordering::Relaxed);
            let down = opened.take().map(|at| at.elapsed());
            drop(opened);
            tracing::info!(
                event = "circuit_closed",
                open_ms = down.map(|d| d.as_millis() as u64).unwrap_or(0),
                "upstream answers again: circuit breaker closed"
            );
        }
    }

    /// A command timed out or a connect failed. Returns whether this
    /// opened the breaker (then the caller starts probing).
    pub fn failure(&self, why: &str) -> bool {
        match self.state.load(Ordering::Acquire) {
            CLOSED => {
                let n = self.failures.fetch_add(1, Ordering::Relaxed) + 1;
                n >= self.threshold && self.open(why)
            }
            HALF_OPEN => self.open(why),
            // Already open: the reset counts from when it opened.
            _ => false,
        }
    }

    /// Redis answered a probe again: the breaker closes.
    pub fn reconnected(&self) {
        if self.state.load(Ordering::Acquire) != CLOSED {
            self.success();
        }
    }

    fn open(&self, why: &str) -> bool {
        let mut opened = self.opened.lock();
        if self.state.load(Ordering::Acquire) == OPEN {
            return false;
        }
        self.state.store(OPEN, Ordering::Release);
        *opened = Some(Instant::now());
        drop(opened);
        self.opens.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(
            event = "circuit_open",
            reason = why,
            threshold = self.threshold,
            reset_ms = self.reset.as_millis() as u64,
            "upstream failing: circuit breaker open, requests fail fast"
        );
        true
    }

    fn half_open(&self, why: &str) {
        let _opened = self.opened.lock();
        if self.state.load(Ordering::Acquire) == OPEN {
            self.state.store(HALF_OPEN, Ordering::Release);
            tracing::info!(
                event = "circuit_half_open",
                reason = why,
                "circuit breaker half-open: probing upstream"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_in_a_row_and_a_success_resets_the_count() {
        let b = Breaker::new(3, Duration::from_secs(60));
        b.failure("t");
        b.failure("t");
        b.success();
        b.failure("t");
        b.failure("t");
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allows());
        b.failure("t");
        assert_eq!(b.state(), BreakerState::Open);
        assert!(b.is_open());
        assert!(!b.allows());
        assert_eq!(b.opens(), 1);
    }

    #[test]
    fn a_reconnect_closes() {
        let b = Breaker::new(1, Duration::from_secs(60));
        b.failure("t");
        assert!(!b.allows());
        b.reconnected();
        assert_eq!(b.state(), BreakerState::Closed);
        assert!(b.allows());
        assert!(!b.is_open());
    }

    /// Half-open after `reset`: requests go through as probes; the first
    /// success closes, a failure opens again.
    fn half_open(b: &Breaker) {
        b.failure("t");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !b.probe_due() {
            assert!(Instant::now() < deadline, "reset never passed");
            std::thread::yield_now();
        }
        assert!(b.allows());
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(b.is_open(), "stale entries are still served while probing");
    }

    #[test]
    fn after_reset_a_success_closes() {
        let b = Breaker::new(1, Duration::from_millis(1));
        half_open(&b);
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn after_reset_a_failure_opens_again() {
        let b = Breaker::new(1, Duration::from_millis(1));
        half_open(&b);
        b.failure("t");
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(b.opens(), 2);
    }
}
