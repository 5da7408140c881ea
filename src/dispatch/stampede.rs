//! Stampede protection: what happens when many clients want the same
//! missing reply at once.
//!
//! - **Coalescing** (one instance). A cacheable read that misses L1 while an
//!   identical read (same db, protocol and request) is already upstream
//!   joins it as a *follower*: it sends nothing, and the *leader*'s reply is
//!   handed to every follower when it arrives ([`Flight`]). A follower joins
//!   only while the leader's fill is still current (nothing invalidated the
//!   key since it was sent), which is exactly when L1 could have served
//!   that reply; and only if its own requests in flight are on the leader's
//!   connection, so that nothing it sends next can run before the shared
//!   read.
//! - **Leases** (every instance). A read of a key whose rule has `stampede`
//!   that finds nothing upstream (a nil reply) is *parked* instead of
//!   answered: it joins this instance's [`Herd`] for that read, whose task
//!   asks Redis, in one transaction, for the key again and for the lease
//!   `{prefix}lease:{key}` (`SET … NX PX`, in a script that takes it only
//!   while the key is missing). Exactly one reader across all instances is
//!   granted it and gets its nil: the loader, expected to load the value and
//!   write it. The others wait in their herds, which read the key again
//!   whenever the store hears it changed (a write through this instance, the
//!   bus, tracking), when the lease runs out (a new loader is elected), and
//!   answer each waiter with the value, or at its `wait` deadline with its
//!   nil or an error. What the client sends after a parked read still
//!   runs, and is answered after it, in order; a write of the same key from
//!   that client first answers the parked read with its nil
//!   ([`before_write`]). The loader's own write releases the lease with a
//!   compare-and-delete on its token.
//! - **Refresh-ahead**. A hit late in its entry's life (a fixed fraction, or
//!   XFetch's probabilistic rule) sends one background refresh of that
//!   reply, at most one per key at a time; the hit, and the hits after it,
//!   are served from the entry until the refreshed reply replaces it.
//!
//! Waiting costs a herd task per read being waited for (shared by all its
//! waiters on this instance) and one queue slot per waiting client: no
//! thread and no upstream connection.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;

use super::cache::{store_fill, FillEntry, CACHING_YES};
use super::compression::Decode;
use crate::cache::{Event, FillMark, Variant};
use crate::config::{CompressConfig, OnTimeout, StampedeConfig};
use crate::protocol::{inspect, reply};
use crate::session::{Ctx, Route, Session};
use crate::upstream::{Fanout, Inbox, Upstreamed};

/// Takes the lease only while the key is missing, atomically with the
/// check. `KEYS[1]` the key, `KEYS[2]` its lease; `ARGV[1]` the token,
/// `ARGV[2]` the lease in ms. Answers `{1, 0}` granted, `{0, 0}` the key
/// exists, `{2, pttl}` held by someone else.
const LEASE_SCRIPT: &[u8] = b"if redis.call('EXISTS', KEYS[1]) == 1 then return {0, 0} end \
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {1, 0} end \
return {2, redis.call('PTTL', KEYS[2])}";

/// Compare-and-delete: drops the lease `KEYS[1]` only if it still holds
/// the token `ARGV[1]`.
const RELEASE_SCRIPT: &[u8] = b"if redis.call('GET', KEYS[1]) == ARGV[1] then \
return redis.call('DEL', KEYS[1]) end return 0";

const MULTI: &[u8] = b"*1\r\n$5\r\nMULTI\r\n";
const EXEC: &[u8] = b"*1\r\n$4\r\nEXEC\r\n";

/// Most leases this instance remembers holding for its loaders at once;
/// past it the oldest are forgotten (they then expire in Redis instead of
/// being released).
const MAX_HELD: usize = 64 * 1024;

/// Stampede protection's shared state, one per server ([`Ctx`]).
pub(crate) struct Stampede {
    flights: Mutex<HashMap<Variant, Arc<Flight>>>,
    herds: Mutex<HashMap<Variant, Arc<Herd>>>,
    /// Leases granted to this instance's loaders, by (db, key): a write of
    /// the key through this instance releases them.
    held: Mutex<Leases>,
    held_count: AtomicUsize,
    /// Keys with a refresh in flight.
    refreshing: Mutex<HashSet<Bytes>>,
    /// Tokens are this instance's random id and a counter.
    instance: u64,
    next_token: AtomicU64,
}

struct Held {
    token: Bytes,
    until: Instant,
    /// The loader's session.
    session: u64,
}

/// The leases this instance's loaders hold, by (db, key) and by session.
#[derive(Default)]
struct Leases {
    by_key: HashMap<(u32, Bytes), Held>,
    /// How many leases each loader session holds.
    by_session: HashMap<u64, usize>,
}

impl Leases {
    fn insert(&mut self, db: u32, key: Bytes, held: Held) {
        *self.by_session.entry(held.session).or_default() += 1;
        if let Some(old) = self.by_key.insert((db, key), held) {
            self.forget_session(old.session);
        }
    }

    fn remove(&mut self, db: u32, key: &Bytes) -> Option<Held> {
        let held = self.by_key.remove(&(db, key.clone()))?;
        self.forget_session(held.session);
        Some(held)
    }

    fn forget_session(&mut self, session: u64) {
        if let Some(n) = self.by_session.get_mut(&session) {
            *n -= 1;
            if *n == 0 {
                self.by_session.remove(&session);
            }
        }
    }

    /// Forgets the leases that ran out by `now`.
    fn prune(&mut self, now: Instant) {
        let gone: Vec<(u32, Bytes)> = self
            .by_key
            .iter()
            .filter(|(_, h)| h.until <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for (db, key) in gone {
            self.remove(db, &key);
        }
    }
}

impl Default for Stampede {
    fn default() -> Stampede {
        Stampede {
            flights: Mutex::default(),
            herds: Mutex::default(),
            held: Mutex::default(),
            held_count: AtomicUsize::new(0),
            refreshing: Mutex::default(),
            instance: random_u64(),
            next_token: AtomicU64::new(1),
        }
    }
}

impl Stampede {
    fn token(&self) -> Bytes {
        let n = self.next_token.fetch_add(1, Ordering::Relaxed);
        Bytes::from(format!("{:016x}:{n}", self.instance))
    }
}

/// A random 64-bit number from the standard library's per-process hash
/// seed and the clock: enough to tell instances' tokens apart.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    h.write_u128(nanos);
    h.finish()
}

/// A uniform random number in (0, 1], for XFetch: a per-thread xorshift.
pub(crate) fn uniform() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(random_u64() | 1);
    }
    STATE.with(|state| {
        let mut x = state.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        ((x >> 11) as f64 + 1.0) / (1u64 << 53) as f64
    })
}

// ---------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------

/// A read upstream that identical reads may join.
pub(crate) struct Flight {
    variant: Variant,
    /// The leader's fill: followers join only while it is current.
    mark: FillMark,
    /// The leader's connection, which followers count as theirs.
    route: Route,
    /// Who gets the reply besides the leader: the connection hands it to
    /// them directly, so a leader whose client does not read holds up
    /// nobody.
    pub(crate) fanout: Arc<Fanout>,
}

/// The leader's side of a [`Flight`]: takes it off the map of joinable
/// reads once the reply is in ([`FlightGuard::complete`]) or the leader is
/// gone. The connection answers the followers either way.
pub(crate) struct FlightGuard {
    stampede: Arc<Stampede>,
    flight: Arc<Flight>,
}

impl FlightGuard {
    /// The leader's reply arrived: hands `frame` to any follower the
    /// connection has not answered yet (a request that was never sent).
    pub(crate) fn complete(self, frame: &Bytes) {
        self.flight.fanout.deliver(&Ok(frame.clone()));
    }

    /// The fanout the leader's read is sent with.
    pub(crate) fn fanout(&self) -> &Arc<Fanout> {
        &self.flight.fanout
    }
}

impl Drop for FlightGuard {
    fn drop(&mut self) {
        let mut flights = self.stampede.flights.lock();
        if flights
            .get(&self.flight.variant)
            .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
        {
            flights.remove(&self.flight.variant);
        }
    }
}

/// What a read about to be sent as a fill does about identical reads.
pub(crate) enum Lead {
    /// It leads: others may join it (`None`: coalescing is off).
    Leader(Option<FlightGuard>),
    /// An identical read it may join is in flight after all.
    Follow(Arc<Flight>),
}

/// Registers a fill about to be sent on `route` as a read others may join,
/// unless one it may join got there first (between [`join`] and now):
/// looking and registering are one step, so two identical misses never
/// both go upstream.
pub(crate) fn lead(s: &Session, variant: &Variant, mark: FillMark, route: Route) -> Lead {
    let Some(l1) = s.ctx.l1.as_ref().filter(|_| s.ctx.config.l1.coalesce) else {
        return Lead::Leader(None);
    };
    let mut flights = s.ctx.stampede.flights.lock();
    if let Some(flight) = flights.get(variant) {
        if flight.fanout.is_open() && l1.store.fill_current(&flight.mark, variant.db) {
            return Lead::Follow(flight.clone());
        }
    }
    let flight = Arc::new(Flight {
        variant: variant.clone(),
        mark,
        route,
        fanout: Arc::new(Fanout::new()),
    });
    flights.insert(variant.clone(), flight.clone());
    Lead::Leader(Some(FlightGuard {
        stampede: s.ctx.stampede.clone(),
        flight,
    }))
}

/// Joins an identical read in flight, if there is one this session may
/// share. Returns the queue slot its reply will fill (the caller registers
/// the slot's hook), having counted the slot as in flight on the leader's
/// connection.
pub(crate) fn join(s: &mut Session, variant: &Variant, rule: usize) -> Option<u64> {
    if !s.ctx.config.l1.coalesce {
        return None;
    }
    let flight = s.ctx.stampede.flights.lock().get(variant).cloned()?;
    follow(s, &flight, rule)
}

/// Joins `flight` as a follower, if this session may share it.
pub(crate) fn follow(s: &mut Session, flight: &Flight, rule: usize) -> Option<u64> {
    let l1 = s.ctx.l1.clone()?;
    if s.inflight > 0 && s.inflight_route != Some(flight.route) {
        return None;
    }
    if !flight.fanout.is_open() || !l1.store.fill_current(&flight.mark, flight.variant.db) {
        return None;
    }
    let inbox = s.inbox.clone();
    let seq = flight.fanout.join(&inbox, || s.pending_slot())?;
    s.inflight += 1;
    s.inflight_route = Some(flight.route);
    super::leave_pinned(s, flight.route);
    l1.store.note(rule, Event::Coalesced);
    Some(seq)
}

// ---------------------------------------------------------------------------
// Leases
// ---------------------------------------------------------------------------

/// What a read of a key with a `stampede` rule needs to wait for a loader
/// if its reply is nil.
pub(crate) struct Lease {
    /// The read's queue slot.
    pub(crate) seq: u64,
    pub(crate) rule: usize,
    pub(crate) key: Bytes,
    pub(crate) variant: Variant,
    /// The read, encoded as a RESP command.
    pub(crate) request: Bytes,
    pub(crate) config: StampedeConfig,
    /// What to decode in the reply that finally answers it.
    pub(crate) decode: Option<Decode>,
}

/// Reads waiting on this instance for one reply of one key to be loaded.
struct Herd {
    rule: usize,
    key: Bytes,
    variant: Variant,
    request: Bytes,
    config: StampedeConfig,
    state: Mutex<HerdState>,
}

#[derive(Default)]
struct HerdState {
    waiters: VecDeque<Waiter>,
    /// The ticket the next waiter gets: an attempt answers only the waiters
    /// that were there when it was sent.
    next_ticket: u64,
    /// Set under the herds lock when the task ends: a reader that finds a
    /// closed herd starts a new one.
    closed: bool,
}

#[derive(Clone)]
struct Waiter {
    /// Its place in the herd, in arrival order.
    ticket: u64,
    inbox: Inbox,
    /// The client's session id.
    session: u64,
    seq: u64,
    /// The nil its own read got: its answer if it becomes the loader or
    /// times out.
    nil: Bytes,
    since: Instant,
    deadline: Instant,
}

impl Herd {
    /// Takes session `session`'s waiter for slot `seq` out of the herd, if
    /// it is still there.
    fn leave(&self, session: u64, seq: u64) -> Option<Waiter> {
        let mut state = self.state.lock();
        let i = state
            .waiters
            .iter()
            .position(|w| w.session == session && w.seq == seq)?;
        state.waiters.remove(i)
    }
}

impl HerdState {
    fn push(&mut self, mut waiter: Waiter) {
        waiter.ticket = self.next_ticket;
        self.next_ticket += 1;
        self.waiters.push_back(waiter);
    }

    /// Takes the waiters that arrived before ticket `upto`.
    fn take_before(&mut self, upto: u64) -> Vec<Waiter> {
        let (taken, kept): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.ticket < upto);
        self.waiters = kept.into();
        taken
    }
}

impl Waiter {
    fn answer(&self, frame: Bytes) {
        let _ = self.inbox.send(Upstreamed::Reply {
            seq: self.seq,
            reply: Ok(frame),
        });
    }
}

/// Parks a read whose reply was nil (`nil`) until the key is loaded.
/// Returns false when it cannot wait (then the nil is its answer): no L1,
/// or a db tierd's pooled connections are not on.
pub(crate) fn park(s: &mut Session, lease: Lease, nil: Bytes) -> bool {
    if s.ctx.l1.is_none() {
        return false;
    }
    if lease.variant.db != s.ctx.upstream.default_db() {
        return false;
    }
    // A write the client sent after the read is on its way (replies come
    // in order, so it is still in flight): the read must answer from
    // before it. A read whose reply is discarded (`CLIENT REPLY OFF`) must
    // not become the loader, nobody would know. The loader reading its key
    // again before writing it would wait for itself.
    if s.writes_in_flight > 0
        || s.queue.discards(lease.seq)
        || is_loader(&s.ctx, s.id, lease.variant.db, &lease.key)
    {
        return false;
    }
    let now = Instant::now();
    let waiter = Waiter {
        ticket: 0,
        inbox: s.inbox.clone(),
        session: s.id,
        seq: lease.seq,
        nil,
        since: now,
        deadline: now + lease.config.wait,
    };
    let seq = lease.seq;
    if let Some(decode) = lease.decode.clone() {
        super::cache::register(
            s,
            seq,
            super::cache::Hook::Decoded {
                decode,
                inner: None,
            },
        );
    }
    let rule = lease.rule;
    let spawn = {
        let mut herds = s.ctx.stampede.herds.lock();
        let joined = herds.get(&lease.variant).and_then(|herd| {
            let mut state = herd.state.lock();
            (!state.closed).then(|| state.push(waiter.clone()))
        });
        match joined {
            Some(()) => None,
            None => {
                let herd = Arc::new(Herd {
                    rule,
                    key: lease.key.clone(),
                    variant: lease.variant.clone(),
                    request: lease.request,
                    config: lease.config,
                    state: Mutex::new({
                        let mut state = HerdState::default();
                        state.push(waiter);
                        state
                    }),
                });
                herds.insert(lease.variant.clone(), herd.clone());
                Some(herd)
            }
        }
    };
    if let Some(herd) = spawn {
        tokio::spawn(run_herd(s.ctx.clone(), herd));
    }
    if let Some(l1) = &s.ctx.l1 {
        l1.store.note(rule, Event::LeaseWait);
    }
    s.parked.insert(
        seq,
        Parked {
            variant: lease.variant,
            key: lease.key,
        },
    );
    true
}

/// A read of this session waiting for a loader, by queue slot
/// ([`Session::parked`]).
pub(crate) struct Parked {
    variant: Variant,
    key: Bytes,
}

/// The session is about to send a write of `keys` (`None`: of keys it
/// cannot name, or a flush): its reads of those keys that wait for a
/// loader are answered now with their nil, as if they had run before the
/// write, which the client sent after them. (Its other waiting reads keep
/// waiting: a later write of another key does not change what they read.)
pub(crate) fn before_write(s: &mut Session, keys: Option<&[Bytes]>) {
    if s.parked.is_empty() {
        return;
    }
    let hit: Vec<u64> = s
        .parked
        .iter()
        .filter(|(_, p)| match keys {
            Some(keys) => keys.contains(&p.key),
            None => true,
        })
        .map(|(seq, _)| *seq)
        .collect();
    for seq in hit {
        let Some(parked) = s.parked.remove(&seq) else {
            continue;
        };
        let waiter = s
            .ctx
            .stampede
            .herds
            .lock()
            .get(&parked.variant)
            .cloned()
            .and_then(|herd| herd.leave(s.id, seq));
        if let Some(w) = waiter {
            s.on_upstream(
                Upstreamed::Reply {
                    seq,
                    reply: Ok(w.nil),
                },
                false,
            );
        }
    }
}

/// What one lease attempt found.
enum Outcome {
    /// The key has a value (or the read failed the way it would for the
    /// client): every waiter gets it.
    Value(Bytes),
    /// The key exists but the read is nil (a missing field): no load is
    /// coming, every waiter gets this nil.
    Nil(Bytes),
    /// The key is missing and this instance took the lease (`token`).
    Granted(Bytes),
    /// Another reader holds the lease, for this much longer.
    Held(Duration),
    /// The attempt failed (upstream down, the script refused).
    Failed,
}

/// One herd's task: attempts, waits for changes, answers its waiters, and
/// ends when none is left.
async fn run_herd(ctx: Arc<Ctx>, herd: Arc<Herd>) {
    let Some(l1) = ctx.l1.clone() else {
        return;
    };
    let watch = l1.store.watch(&herd.key);
    let mut attempt_now = true;
    // When to try again for the lease: it expires then.
    let mut retry_at: Option<Instant> = None;
    // After an answer: readers that joined after the attempt was sent read
    // nil after it, so they are asked for again.
    let mut answered_upto: Option<u64> = None;
    loop {
        if attempt_now {
            attempt_now = false;
            let asked = herd.state.lock().next_ticket;
            let outcome = {
                let attempt = attempt(&ctx, &herd);
                tokio::pin!(attempt);
                // Deadlines pass while Redis answers (slowly, or not at
                // all until the command timeout).
                loop {
                    let next = herd.state.lock().waiters.iter().map(|w| w.deadline).min();
                    let far = Instant::now() + Duration::from_secs(3600);
                    tokio::select! {
                        outcome = &mut attempt => break outcome,
                        _ = tokio::time::sleep_until(next.unwrap_or(far).into()) => expire(&l1, &herd),
                    }
                }
            };
            match outcome {
                Outcome::Value(frame) => {
                    retry_at = None;
                    let answered = answer_first(&herd, asked, &frame);
                    for _ in 0..answered {
                        l1.store.note(herd.rule, Event::LeaseWakeup);
                    }
                    answered_upto = Some(asked);
                }
                Outcome::Nil(frame) => {
                    retry_at = None;
                    answer_first(&herd, asked, &frame);
                    answered_upto = Some(asked);
                }
                Outcome::Granted(token) => {
                    let loader = {
                        let mut state = herd.state.lock();
                        let live = state.waiters.iter().position(|w| !w.inbox.is_closed());
                        live.and_then(|i| state.waiters.remove(i))
                    };
                    match loader {
                        Some(loader) => {
                            // Recorded first: the loader's write, once it
                            // has its nil, must find the lease to release.
                            let held = Held {
                                token,
                                until: Instant::now() + herd.config.lease,
                                session: loader.session,
                            };
                            hold(&ctx, herd.variant.db, &herd.key, held);
                            loader.answer(loader.nil.clone());
                            l1.store.note(herd.rule, Event::LeaseGrant);
                            tracing::debug!(event = "lease_granted", key = %crate::admin::shown(&herd.key), waited_ms = loader.since.elapsed().as_millis() as u64, "a reader was made the loader");
                        }
                        None => release(&ctx, &herd.key, token),
                    }
                    // If the loader never writes, the lease runs out.
                    retry_at = Some(Instant::now() + herd.config.lease);
                }
                Outcome::Held(left) => {
                    retry_at = Some(Instant::now() + left);
                }
                Outcome::Failed => {
                    retry_at = None;
                    let state = std::mem::take(&mut herd.state.lock().waiters);
                    for w in state {
                        w.answer(w.nil.clone());
                    }
                }
            }
        }
        expire(&l1, &herd);
        let next = {
            let mut herds = ctx.stampede.herds.lock();
            let mut state = herd.state.lock();
            if let Some(upto) = answered_upto.take() {
                attempt_now |= state.waiters.iter().any(|w| w.ticket >= upto);
            }
            match state.waiters.iter().map(|w| w.deadline).min() {
                None => {
                    state.closed = true;
                    if herds
                        .get(&herd.variant)
                        .is_some_and(|h| Arc::ptr_eq(h, &herd))
                    {
                        herds.remove(&herd.variant);
                    }
                    return;
                }
                Some(deadline) => retry_at.map_or(deadline, |r| r.min(deadline)),
            }
        };
        if attempt_now {
            continue;
        }
        tokio::select! {
            _ = watch.changed() => attempt_now = true,
            _ = tokio::time::sleep_until(next.into()) => {
                if retry_at.is_some_and(|r| r <= Instant::now()) {
                    retry_at = None;
                    attempt_now = true;
                }
            }
        }
    }
}

/// Answers the waiters that arrived before ticket `upto` with `frame`;
/// returns how many.
fn answer_first(herd: &Herd, upto: u64, frame: &Bytes) -> usize {
    let answered = herd.state.lock().take_before(upto);
    for w in &answered {
        w.answer(frame.clone());
    }
    answered.len()
}

/// Answers the waiters whose `wait` ran out, and forgets those whose
/// client left.
fn expire(l1: &crate::cache::L1, herd: &Herd) {
    let now = Instant::now();
    let expired: Vec<Waiter> = {
        let mut state = herd.state.lock();
        let (gone, kept): (Vec<Waiter>, Vec<Waiter>) = std::mem::take(&mut state.waiters)
            .into_iter()
            .partition(|w| w.deadline <= now || w.inbox.is_closed());
        state.waiters = kept.into();
        gone
    };
    for w in expired {
        if w.inbox.is_closed() {
            continue;
        }
        l1.store.note(herd.rule, Event::LeaseTimeout);
        w.answer(timeout_reply(herd, &w));
    }
}

/// What a waiter gets when its `wait` ran out.
fn timeout_reply(herd: &Herd, w: &Waiter) -> Bytes {
    match herd.config.on_timeout {
        OnTimeout::Nil => w.nil.clone(),
        OnTimeout::Error => super::error(&format!(
            "TRYAGAIN tierd: {} is still being loaded by another client (waited {} ms)",
            crate::admin::shown(&herd.key),
            w.since.elapsed().as_millis()
        )),
    }
}

/// The lease key of `key`.
fn lease_key(ctx: &Ctx, key: &[u8]) -> Bytes {
    let prefix = ctx.config.invalidation.prefix.as_bytes();
    Bytes::from([prefix, b"lease:", key].concat())
}

/// Reads the key again and asks for its lease, in one transaction. With
/// opt-in tracking, a tracked read of the key goes first, so that a writer
/// bypassing tierd wakes the herd too.
async fn attempt(ctx: &Ctx, herd: &Herd) -> Outcome {
    let identity = ctx.upstream.default_identity();
    let pool = identity.pool(herd.variant.proto);
    let conn = pool.conn(pool.pick()).clone();
    let token = ctx.stampede.token();
    let ms = herd.config.lease.as_millis().max(1).to_string();
    let eval = reply::encode_command(&[
        b"EVAL",
        LEASE_SCRIPT,
        b"2",
        &herd.key,
        &lease_key(ctx, &herd.key),
        &token,
        ms.as_bytes(),
    ]);
    let mut raws: Vec<&[u8]> = Vec::with_capacity(6);
    if ctx.tracking.opt_in() && ctx.tracking.fill_allowed(&conn) {
        raws.push(CACHING_YES);
        raws.push(&herd.request);
    }
    raws.extend([MULTI, &eval[..], &herd.request[..], EXEC]);
    let exec = match conn.request_all(&raws).await {
        Ok(mut replies) => replies.pop(),
        Err(e) => Some(Err(e)),
    };
    let exec = match exec {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return failed(herd, &e.to_string()),
        None => return failed(herd, "no reply"),
    };
    let depth = ctx.config.limits.max_reply_depth;
    let (lease, read) = match inspect::elements(&exec, depth).as_deref() {
        Some([lease, read]) if exec.first() == Some(&b'*') => {
            (exec.slice_ref(lease), exec.slice_ref(read))
        }
        _ => return failed(herd, &String::from_utf8_lossy(&exec)),
    };
    let code: Vec<i64> = inspect::elements(&lease, depth)
        .unwrap_or_default()
        .iter()
        .filter_map(|e| inspect::integer(e))
        .collect();
    let nil = super::cache::is_nil(&read);
    match (code.as_slice(), nil) {
        (_, false) if !inspect::is_error(&lease) => {
            if code.first() == Some(&1) {
                release(ctx, &herd.key, token);
            }
            Outcome::Value(read)
        }
        ([0, _], true) => Outcome::Nil(read),
        ([1, _], true) => Outcome::Granted(token),
        ([2, pttl], true) => {
            // A lease without an expiry (set by hand) counts as a full one.
            let left = u64::try_from(*pttl).map_or(herd.config.lease, Duration::from_millis);
            Outcome::Held(left.max(Duration::from_millis(1)))
        }
        _ => failed(herd, &String::from_utf8_lossy(&lease)),
    }
}

fn failed(herd: &Herd, why: &str) -> Outcome {
    tracing::warn!(event = "lease_failed", key = %crate::admin::shown(&herd.key), error = %why.trim_end(), "a lease attempt failed; the waiting reads get their nil");
    Outcome::Failed
}

/// Whether session `id` holds the live lease of `key` in `db`: it was
/// made its loader and has not written it yet. Reading it again, it gets
/// nil again rather than waiting for itself.
fn is_loader(ctx: &Ctx, id: u64, db: u32, key: &Bytes) -> bool {
    if ctx.stampede.held_count.load(Ordering::SeqCst) == 0 {
        return false;
    }
    let now = Instant::now();
    ctx.stampede
        .held
        .lock()
        .by_key
        .get(&(db, key.clone()))
        .is_some_and(|h| h.session == id && h.until > now)
}

/// Remembers a lease granted to a loader on this instance, so that its
/// write releases it. Past [`MAX_HELD`] live leases a new one is not
/// remembered: it then expires in Redis instead of being released.
fn hold(ctx: &Ctx, db: u32, key: &Bytes, lease: Held) {
    let mut held = ctx.stampede.held.lock();
    if held.by_key.len() >= MAX_HELD / 2 {
        held.prune(Instant::now());
    }
    if held.by_key.len() < MAX_HELD {
        held.insert(db, key.clone(), lease);
    }
    ctx.stampede
        .held_count
        .store(held.by_key.len(), Ordering::SeqCst);
}

/// Session `session` wrote `keys` in `db` through this instance (and the
/// write ran): releases the leases it holds on them as their loader.
/// Anyone else's write leaves them alone: a neighbour's short-lived
/// placeholder, or a `DEL` of the still-missing key, must not make a second
/// loader while the first is loading; and a late loader's write must not
/// release the lease of the loader elected after it.
pub(crate) fn written(ctx: &Ctx, session: u64, db: u32, keys: &[Bytes]) {
    if ctx.stampede.held_count.load(Ordering::SeqCst) == 0 {
        return;
    }
    let now = Instant::now();
    let tokens: Vec<(Bytes, Bytes)> = {
        let mut held = ctx.stampede.held.lock();
        if !held.by_session.contains_key(&session) {
            return;
        }
        let mut tokens = Vec::new();
        for key in keys {
            let mine = held
                .by_key
                .get(&(db, key.clone()))
                .is_some_and(|h| h.session == session);
            if let Some(h) = mine.then(|| held.remove(db, key)).flatten() {
                if h.until > now {
                    tokens.push((key.clone(), h.token));
                }
            }
        }
        ctx.stampede
            .held_count
            .store(held.by_key.len(), Ordering::SeqCst);
        tokens
    };
    for (key, token) in tokens {
        release(ctx, &key, token);
    }
}

/// Deletes the lease of `key` if it still holds `token`, in the
/// background.
fn release(ctx: &Ctx, key: &[u8], token: Bytes) {
    let request =
        reply::encode_command(&[b"EVAL", RELEASE_SCRIPT, b"1", &lease_key(ctx, key), &token]);
    let pool = ctx.upstream.default_identity();
    let pool = pool.pool(crate::protocol::Proto::Resp2);
    let conn = pool.conn(pool.pick()).clone();
    tokio::spawn(async move {
        if let Err(e) = conn.request(&request).await {
            tracing::debug!(error = %e, "releasing a lease failed; it expires on its own");
        }
    });
}

// ---------------------------------------------------------------------------
// Refresh-ahead
// ---------------------------------------------------------------------------

/// A refresh (or warming) to send: everything a fill of one reply needs.
pub(crate) struct Refresh {
    pub(crate) rule: usize,
    pub(crate) ttl: Duration,
    pub(crate) negative: bool,
    pub(crate) key: Bytes,
    pub(crate) variant: Variant,
    /// The read, encoded as a RESP command.
    pub(crate) request: Bytes,
    pub(crate) compress: Option<CompressConfig>,
}

/// Whether a refresh of `key` is in flight: a hit need not build another.
pub(crate) fn refreshing(ctx: &Ctx, key: &[u8]) -> bool {
    ctx.stampede.refreshing.lock().contains(key)
}

/// Sends `job` in the background unless a refresh of its key is in flight.
pub(crate) fn refresh(ctx: &Arc<Ctx>, job: Refresh) {
    if !ctx.stampede.refreshing.lock().insert(job.key.clone()) {
        return;
    }
    if let Some(l1) = &ctx.l1 {
        l1.store.note(job.rule, Event::Refresh);
    }
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let key = job.key.clone();
        if !fill(&ctx, job).await {
            // Upstream's answer cannot be cached (the key is gone and the
            // rule keeps no nils, an error, an invalidation came first):
            // the entry goes, rather than being refreshed again on every
            // hit.
            if let Some(l1) = &ctx.l1 {
                l1.store.invalidate(&key);
            }
        }
        ctx.stampede.refreshing.lock().remove(&key);
    });
}

/// Reads one reply from upstream and caches it in L1, as a client's fill
/// would (tracked, with the key's `PTTL`, cancelled by an invalidation
/// meanwhile): for refresh-ahead and warming. Returns whether it was
/// cached.
pub(crate) async fn fill(ctx: &Ctx, job: Refresh) -> bool {
    fill_also(ctx, job, None).await
}

/// [`fill`], also caching the reply as the variant `also` when it is a
/// bulk string that is not nil: such a reply is the same bytes in RESP2
/// and RESP3, so warming fills a `GET`'s two variants with one read. The
/// second entry has a fill mark of its own, taken before the read is sent,
/// so an invalidation meanwhile cancels both. Returns whether the job's own
/// variant was cached.
pub(crate) async fn fill_also(ctx: &Ctx, job: Refresh, also: Option<Variant>) -> bool {
    let Some(l1) = ctx.l1.clone() else {
        return false;
    };
    if job.variant.db != ctx.upstream.default_db() {
        return false;
    }
    let identity = ctx.upstream.default_identity();
    let pool = identity.pool(job.variant.proto);
    let conn = pool.conn(pool.pick()).clone();
    if !ctx.tracking.fill_allowed(&conn) {
        return false;
    }
    let Some(token) = l1.store.begin_fill(&job.key) else {
        return false;
    };
    let also = also.and_then(|v| Some((l1.store.begin_fill(&job.key)?, v)));
    let pttl = reply::encode_command(&[b"PTTL", &job.key]);
    let mut raws: Vec<&[u8]> = Vec::with_capacity(3);
    if ctx.tracking.opt_in() {
        raws.push(CACHING_YES);
    }
    raws.extend([&job.request[..], &pttl[..]]);
    let sent = Instant::now();
    let replies = match conn.request_all(&raws).await {
        Ok(replies) => replies,
        Err(e) => {
            tracing::debug!(error = %e, "fill not sent");
            return false;
        }
    };
    let fetch = sent.elapsed();
    let mut replies = replies.into_iter().rev();
    let (pttl, read) = (replies.next(), replies.next());
    let caching_ok =
        !ctx.tracking.opt_in() || matches!(replies.next(), Some(Ok(ok)) if inspect::is_ok(&ok));
    let (Some(Ok(read)), Some(Ok(pttl)), true) = (read, pttl, caching_ok) else {
        return false;
    };
    let pttl = inspect::integer(&pttl);
    if let Some((token, variant)) = also {
        if read.starts_with(b"$") && !super::cache::is_nil(&read) {
            let entry = FillEntry::new(
                token,
                job.rule,
                job.ttl,
                job.negative,
                variant,
                job.compress,
            );
            store_fill(ctx, &l1, sent, fetch, entry.replied(read.clone(), pttl));
        }
    }
    let entry = FillEntry::new(
        token,
        job.rule,
        job.ttl,
        job.negative,
        job.variant,
        job.compress,
    );
    store_fill(ctx, &l1, sent, fetch, entry.replied(read, pttl))
}

impl std::fmt::Debug for Stampede {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stampede")
            .field("held", &self.held_count.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}
