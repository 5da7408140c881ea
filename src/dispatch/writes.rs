//! The write strategies beyond "invalidate": write-through and write-behind.
//!
//! A rule's `write` decides what a write of a matching key through tierd
//! does to L1. `"invalidate"` (the default) is the write path of
//! [`super::cache`]: drop the key before the write is forwarded and again
//! when its reply arrives. The other two live here.
//!
//! **Write-through** (`write = "through"`). A `SET`-family write
//! ([`SetWrite`]) of such keys, from a session that may use L1, is sent
//! as one transaction on a pooled connection:
//!
//! ```text
//! CLIENT CACHING YES      (tracking "default": Redis tracks what follows)
//! MULTI
//! SET k v …               the client's request, byte for byte
//! EVAL <register> …       the tags' registration, if a rule tags the keys
//! PTTL k                  one per key written through
//! EXEC
//! ```
//!
//! The client's reply is the write's own element of `EXEC`'s array. The
//! `PTTL`s run right after the write, atomically, so they give the expiry
//! the write left (whatever its options) and, after `CLIENT CACHING YES`,
//! make Redis track the key for tierd exactly as a fill's read does; no
//! other client's write can come between the write and them. A fill token
//! is taken before the transaction is sent (after the write's first
//! invalidation); when `EXEC`'s reply arrives, [`crate::cache::Store::renew_fill`]
//! does the write's second invalidation and, only if nothing invalidated
//! the key meanwhile, hands the token on, and L1 gets the written value as
//! the reply of `GET key` (RESP2 and RESP3, the same bulk string bytes),
//! for the shorter of the rule's ttl and the `PTTL`. Anything that raced
//! the write, a tracking report, a bus message, another client's write
//! through this instance, a flush, cancels it: then the key is simply
//! invalidated, as with `"invalidate"`. With tracking on, the usual such
//! race is Redis reporting this very write back to tierd; then the key is
//! read back in the background as an ordinary fill ([`refill`]).
//!
//! **Write-behind** (`write = "behind"`). A write whose Redis reply would
//! be `+OK` ([`SetWrite::queueable`]), of keys whose rules all say
//! `"behind"`, from a session on the default identity, db and without
//! MULTI/WATCH, is answered `+OK` at once and queued ([`Writes`]). A
//! flusher task sends the queue to Redis in pipelined batches, on its own
//! connection (`tierd:write-behind`), within `[write_behind] flush`; once
//! Redis answered an entry it is announced like any write (L1 and the bus).
//! Until then:
//!
//! - a `GET` of the key through this instance is answered with the queued
//!   value;
//! - every other request that names the key waits for its queued writes to
//!   reach Redis, and so do requests whose keys tierd cannot know (scripts,
//!   unknown commands) or that read or write the whole keyspace (`SCAN`,
//!   `DBSIZE`, `FLUSHALL` …), which wait for the whole queue;
//! - `EXEC` waits for the whole queue: the transaction's commands were
//!   queued in Redis unseen, and must not run before a write acknowledged
//!   earlier;
//! - at most `max_queue` writes are queued; a writer past that waits for
//!   room (backpressure; nothing is dropped).
//!
//! A request is let through only once the queued writes it waits for have
//! been answered by Redis ([`Writes::wait_for`]). While the circuit
//! breaker is not closed (open, or half-open and probing) it is answered
//! `-TRYAGAIN` at once, as any request the breaker refuses, and never
//! sent: sent as a half-open probe it would reach Redis ahead of the queued
//! write once Redis answers again. Otherwise it gives up after the command
//! timeout (tierd's "upstream unavailable" error, not sent either, as it
//! could overtake the queued write once a frozen Redis thaws). An `EXEC`
//! that gives up discards its transaction. A writer waiting for room in a
//! full queue is bounded the same way: nothing was acknowledged, so it
//! fails rather than waits. A request that waits for queued writes makes
//! them due at once, so that it does not also wait out `flush`; a refused
//! one does too, so that the flusher keeps sending them (retrying at its
//! backoff) and they reach Redis as soon as it answers again: the keys'
//! requests are served again once they have.
//!
//! Writes of one key reach Redis in the order they were acknowledged. A
//! reply Redis gives to a flushed write can no longer reach the client,
//! which was told `+OK`: it is logged and counted. Shutdown drains the
//! queue (bounded by `shutdown_timeout`); a crash loses what is queued.
//!
//! This module decides and queues; the upstream connections are
//! [`crate::upstream`]'s and the L1 store is [`crate::cache`]'s.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::{mpsc, watch, Notify, Semaphore};

use super::cache::{self, Hook, SIDE, SIDE_INDEX_BITS, TAG_DROP_INDEX, TAG_QUEUED_INDEX};
use super::compression::{self, Decode};
use super::{Flow, Want};
use crate::cache::{FillToken, Timing, Variant};
use crate::command::{Keys, Kind};
use crate::config::{CompressConfig, Config, WriteStrategy};
use crate::metrics::Metrics;
use crate::protocol::parse::string2ll;
use crate::protocol::{inspect, reply, Proto, Request};
use crate::session::{Ctx, Route, Session};
use crate::upstream::{BreakerState, Conn, ReplyTo, UpstreamError, Upstreamed};

/// Most keys one write fills L1 with through; further keys of an `MSET`
/// are only invalidated. Each costs a `PTTL` inside the transaction.
const MAX_THROUGH_KEYS: usize = 1024;

/// Most queued writes the flusher sends in one pipelined batch.
const BATCH: usize = 1024;

/// The flusher's first wait after Redis could not be reached; it doubles up
/// to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// While a request waits for queued writes to reach Redis (or a writer
/// for room in the queue), how often it looks at the circuit breaker: once
/// the breaker is not closed it fails fast like any other, so it stops
/// waiting.
const BREAKER_POLL: Duration = Duration::from_millis(100);

/// The flusher connection's name upstream (`CLIENT LIST`).
pub const FLUSHER_NAME: &str = "tierd:write-behind";

/// The largest relative expiry a queued `SET … EX`/`SETEX` may carry (in
/// seconds; `PX`/`PSETEX` take 1000× that in milliseconds): far beyond any
/// real one, and small enough that Redis cannot refuse it as overflowing
/// once it adds the current time. Larger ones go to Redis synchronously,
/// which decides.
const MAX_QUEUED_EXPIRE_S: i64 = 100_000_000_000_000;

const OK: &[u8] = b"+OK\r\n";

// ---------------------------------------------------------------------------
// The writes these strategies understand
// ---------------------------------------------------------------------------

/// What a write's reply says about whether it wrote its values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ran {
    /// `+OK` (`SET`, `SET … NX|XX` when it set, `SETEX`, `PSETEX`, `MSET`).
    Ok,
    /// `:1` (`SETNX`, `MSETNX`).
    One,
    /// Anything but an error (`SET … GET`, `GETSET`: the old value or nil).
    NotError,
    /// Nil (`SET … NX GET`: the key did not exist, so it was set).
    Nil,
    /// Neither nil nor an error (`SET … XX GET`: the key existed).
    NotNil,
}

impl Ran {
    fn matches(self, frame: &[u8]) -> bool {
        let error = inspect::is_error(frame);
        match self {
            Ran::Ok => inspect::is_ok(frame),
            Ran::One => frame == b":1\r\n",
            Ran::NotError => !error && !frame.is_empty(),
            Ran::Nil => cache::is_nil(frame),
            Ran::NotNil => !error && !frame.is_empty() && !cache::is_nil(frame),
        }
    }
}

/// A write of whole string values: `SET key value [NX|XX] [GET]
/// [EX s|PX ms|EXAT ts|PXAT ts-ms|KEEPTTL]`, `SETEX key s value`, `PSETEX
/// key ms value`, `SETNX key value`, `GETSET key value`, `MSET key value
/// [key value …]` and `MSETNX key value [key value …]`.
#[derive(Debug)]
struct SetWrite<'r> {
    /// Each key with the value written to it, in request order (a key
    /// given twice ends with its last value).
    pairs: Vec<(&'r Bytes, &'r Bytes)>,
    /// How the reply tells that the values were written.
    ran: Ran,
    /// Redis answers `+OK` whenever it accepts the request and the request
    /// is surely well-formed: `SET key value` alone or with exactly one of
    /// `EX s`, `PX ms` (in range) and `KEEPTTL`, `SETEX` and `PSETEX` (in
    /// range), `MSET`. Only these are queued by write-behind.
    queueable: bool,
}

impl<'r> SetWrite<'r> {
    /// The write `req` is, if it is one; malformed forms too (Redis refuses
    /// them, and the reply shows it), except where the arguments do not
    /// even say which key gets which value.
    fn parse(req: &'r Request) -> Option<SetWrite<'r>> {
        let name = req.name();
        let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
        let args = &req.args;
        let single = |key: usize, value: usize| Some(vec![(args.get(key)?, args.get(value)?)]);
        if is(b"SET") {
            if args.len() < 3 {
                return None;
            }
            let (ran, queueable) = set_options(args.get(3..).unwrap_or_default());
            return Some(SetWrite {
                pairs: single(1, 2)?,
                ran,
                queueable,
            });
        }
        if is(b"SETEX") || is(b"PSETEX") {
            if args.len() != 4 {
                return None;
            }
            let limit = if is(b"SETEX") {
                MAX_QUEUED_EXPIRE_S
            } else {
                MAX_QUEUED_EXPIRE_S * 1000
            };
            return Some(SetWrite {
                pairs: single(1, 3)?,
                ran: Ran::Ok,
                queueable: positive_up_to(args.get(2), limit),
            });
        }
        if is(b"SETNX") || is(b"GETSET") {
            if args.len() != 3 {
                return None;
            }
            return Some(SetWrite {
                pairs: single(1, 2)?,
                ran: if is(b"SETNX") {
                    Ran::One
                } else {
                    Ran::NotError
                },
                queueable: false,
            });
        }
        if is(b"MSET") || is(b"MSETNX") {
            if args.len() < 3 || args.len() % 2 == 0 {
                return None;
            }
            let pairs = args[1..]
                .chunks_exact(2)
                .map(|kv| (&kv[0], &kv[1]))
                .collect();
            return Some(SetWrite {
                pairs,
                ran: if is(b"MSET") { Ran::Ok } else { Ran::One },
                queueable: is(b"MSET"),
            });
        }
        None
    }
}

/// What `SET`'s options (the arguments after the value) make of its reply:
/// how it says it wrote, and whether it is surely `+OK`. Options are
/// walked as Redis walks them, an expiry option taking the next argument.
fn set_options(opts: &[Bytes]) -> (Ran, bool) {
    let (mut nx, mut xx, mut get) = (false, false, false);
    let mut expiries = 0;
    let mut plain = true;
    let mut i = 0;
    while let Some(opt) = opts.get(i) {
        let is = |n: &[u8]| opt.eq_ignore_ascii_case(n);
        if is(b"NX") {
            nx = true;
        } else if is(b"XX") {
            xx = true;
        } else if is(b"GET") {
            get = true;
        } else if is(b"KEEPTTL") {
            expiries += 1;
        } else if is(b"EX") || is(b"PX") {
            let limit = if is(b"EX") {
                MAX_QUEUED_EXPIRE_S
            } else {
                MAX_QUEUED_EXPIRE_S * 1000
            };
            plain &= positive_up_to(opts.get(i + 1), limit);
            expiries += 1;
            i += 1;
        } else if is(b"EXAT") || is(b"PXAT") {
            // An absolute time in the past deletes the key: not a plain
            // write to answer from a queue.
            plain = false;
            i += 1;
        } else {
            plain = false;
        }
        i += 1;
    }
    let ran = match (nx || xx, get) {
        (_, false) => Ran::Ok,
        (false, true) => Ran::NotError,
        (true, true) if nx && !xx => Ran::Nil,
        (true, true) => Ran::NotNil,
    };
    (ran, plain && !nx && !xx && !get && expiries <= 1)
}

/// Whether the argument is an integer in `1..=limit`, as Redis reads it.
fn positive_up_to(arg: Option<&Bytes>, limit: i64) -> bool {
    arg.and_then(|a| string2ll(a))
        .is_some_and(|n| (1..=limit).contains(&n))
}

fn bulk(value: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(value.len() + 16);
    reply::bulk(&mut out, value);
    out.freeze()
}

// ---------------------------------------------------------------------------
// Write-through
// ---------------------------------------------------------------------------

/// A write-through in flight ([`Hook::Through`]): what `EXEC`'s reply
/// completes.
pub(crate) struct Through {
    /// The side-request id of the transaction (the write's own `QUEUED`).
    id: u64,
    /// The side-request id of `CLIENT CACHING YES`, when it was sent.
    caching: Option<u64>,
    /// How many tag registrations sit between the write and the `PTTL`s.
    evals: usize,
    /// One per key written through, in `PTTL` order.
    fills: Vec<ThroughFill>,
    /// Every key the write touches: invalidated again once it ran.
    keys: Vec<Bytes>,
    ran: Ran,
    /// When the transaction was sent: expiries count from here.
    sent: Instant,
    db: u32,
}

impl Through {
    /// Every key the write touches.
    pub(crate) fn keys(&self) -> &[Bytes] {
        &self.keys
    }
}

/// One key of a write-through: its fill token (taken before the write was
/// sent) and the value as Redis stores it.
struct ThroughFill {
    token: FillToken,
    rule: usize,
    ttl: Duration,
    compress: Option<CompressConfig>,
    value: Bytes,
}

/// A write that goes through ([`plan_through`]).
pub(super) struct ThroughPlan {
    conn: Conn,
    route: Route,
    ran: Ran,
    fills: Vec<ThroughFill>,
}

/// The keys of a write's hook from [`cache::before_write`], and the
/// decoding wrapped around it: write-through replaces that hook.
fn write_keys(hook: Option<&Hook>) -> Option<&[Bytes]> {
    match hook? {
        Hook::Invalidate(keys) => Some(keys),
        Hook::Decoded {
            inner: Some(inner), ..
        } => match &**inner {
            Hook::Invalidate(keys) => Some(keys),
            _ => None,
        },
        _ => None,
    }
}

/// Whether `req` writes through: a `SET`-family write of at least one key
/// whose rule has `write = "through"`, from a session that may use L1, on a
/// pooled connection whose reads Redis will report changes to. Takes the
/// fill tokens now, after the write's first invalidation and before it is
/// sent. `hook` is the write's hook from [`cache::before_write`].
pub(super) fn plan_through(
    s: &mut Session,
    req: &Request,
    want: Want,
    hook: Option<&Hook>,
) -> Option<ThroughPlan> {
    if !s.ctx.writes.any_through || want != Want::Any || !cache::eligible(s) {
        return None;
    }
    write_keys(hook)?;
    let l1 = s.ctx.l1.clone()?;
    let write = SetWrite::parse(req)?;
    // (key, value, rule index, ttl, compression), a key's last value.
    type Wanted<'a> = (
        &'a Bytes,
        &'a Bytes,
        usize,
        Duration,
        Option<CompressConfig>,
    );
    let mut wanted: Vec<Wanted<'_>> = Vec::new();
    let mut index_of: HashMap<&[u8], usize> = HashMap::new();
    for &(key, value) in &write.pairs {
        let Some((index, rule)) = l1.rules.find(key) else {
            continue;
        };
        if !rule.cache || rule.write != WriteStrategy::Through {
            continue;
        }
        if let Some(slot) = index_of.get(&key[..]).and_then(|&i| wanted.get_mut(i)) {
            slot.1 = value;
        } else if wanted.len() < MAX_THROUGH_KEYS {
            index_of.insert(key, wanted.len());
            wanted.push((key, value, index, rule.ttl, rule.compress));
        }
    }
    if wanted.is_empty() {
        return None;
    }
    let (conn, route) = cache::fill_conn(s, true)?;
    let mut fills = Vec::with_capacity(wanted.len());
    for (key, value, rule, ttl, compress) in wanted {
        fills.push(ThroughFill {
            token: l1.store.begin_fill(key)?,
            rule,
            ttl,
            compress,
            value: value.clone(),
        });
    }
    Some(ThroughPlan {
        conn,
        route,
        ran: write.ran,
        fills,
    })
}

/// Sends a planned write-through: the transaction described in the module
/// docs, back to back on the plan's connection, with `evals` (the tags'
/// registration) inside it. Its hook replaces the write's own.
pub(super) fn send_through(
    s: &mut Session,
    req: Request,
    hook: Option<Hook>,
    evals: Vec<Bytes>,
    plan: ThroughPlan,
) -> Flow {
    let (decode, keys) = match hook {
        Some(Hook::Invalidate(keys)) => (None, keys),
        Some(Hook::Decoded {
            decode,
            inner: Some(inner),
        }) => match *inner {
            Hook::Invalidate(keys) => (Some(decode), keys),
            // plan_through only plans writes whose hook is one of these.
            _ => (Some(decode), Vec::new()),
        },
        _ => (None, Vec::new()),
    };
    let opt_in = s.ctx.tracking.opt_in();
    let mut next_id = || {
        let id = s.next_fill;
        s.next_fill += 1;
        id
    };
    let id = next_id();
    let caching = opt_in.then(next_id);
    let pttls: Vec<Bytes> = plan
        .fills
        .iter()
        .map(|f| reply::encode_command(&[b"PTTL", f.token.key()]))
        .collect();
    let seq = s.pending_slot();
    let through = Hook::Through(Box::new(Through {
        id,
        caching,
        evals: evals.len(),
        fills: plan.fills,
        keys,
        ran: plan.ran,
        sent: Instant::now(),
        db: s.state.db,
    }));
    let hook = match decode {
        Some(decode) => Hook::Decoded {
            decode,
            inner: Some(Box::new(through)),
        },
        None => through,
    };
    cache::register(s, seq, hook);
    let inbox = s.inbox.clone();
    let side = |id: u64, index: u64| ReplyTo::Inbox {
        seq: SIDE | (id << SIDE_INDEX_BITS) | index,
        inbox: &inbox,
        timed: true,
    };
    let mut requests: Vec<(&[u8], ReplyTo<'_>)> = Vec::with_capacity(pttls.len() + evals.len() + 4);
    if let Some(caching) = caching {
        // Its error, if any, is kept (TAG_QUEUED_INDEX): then nothing the
        // transaction reads is tracked, and nothing is filled.
        requests.push((super::cache::CACHING_YES, side(caching, TAG_QUEUED_INDEX)));
    }
    requests.push((b"*1\r\n$5\r\nMULTI\r\n", side(id, TAG_DROP_INDEX)));
    requests.push((&req.raw, side(id, TAG_QUEUED_INDEX)));
    for eval in &evals {
        requests.push((eval, side(id, TAG_DROP_INDEX)));
    }
    for pttl in &pttls {
        requests.push((pttl, side(id, TAG_DROP_INDEX)));
    }
    requests.push((
        b"*1\r\n$4\r\nEXEC\r\n",
        ReplyTo::Inbox {
            seq,
            inbox: &inbox,
            timed: true,
        },
    ));
    let sent = plan.conn.send_all(&requests);
    drop(requests);
    super::account_send(s, plan.route, seq, sent);
    Flow::Continue
}

/// The client's reply out of `EXEC`'s (or the error Redis gave when
/// queuing the write), with the array's elements when it ran.
fn exec_parts(s: &mut Session, id: u64, exec: &Bytes) -> (Bytes, Option<Vec<Bytes>>) {
    if let Some(queued) = s.queued_errors.remove(&id) {
        return (queued, None);
    }
    if exec.is_empty() || inspect::is_error(exec) {
        if exec.starts_with(b"-EXECABORT") {
            // The write queued fine, so one of tierd's own requests was
            // refused (an ACL without PTTL or EVAL, say): nothing ran.
            return (
                super::error(
                    "ERR tierd could not run this write with its write-through reads (upstream refused a command inside MULTI); the write did not run",
                ),
                None,
            );
        }
        return (exec.clone(), None);
    }
    let depth = s.ctx.config.limits.max_reply_depth;
    match inspect::elements(exec, depth) {
        Some(els) if exec.first() == Some(&b'*') && !els.is_empty() => {
            let els: Vec<Bytes> = els.iter().map(|e| exec.slice_ref(e)).collect();
            (els[0].clone(), Some(els))
        }
        _ => (
            super::error("ERR upstream sent an unexpected reply to EXEC"),
            None,
        ),
    }
}

/// How long L1 keeps a written value: the rule's ttl, shortened to the
/// key's `PTTL` right after the write. `None` when the key is already gone
/// or the `PTTL` did not come.
fn through_life(ttl: Duration, pttl: Option<&Bytes>) -> Option<Duration> {
    match pttl_ms(pttl)? {
        -1 => Some(ttl),
        ms if ms > 0 => Some(ttl.min(Duration::from_millis(ms.unsigned_abs()))),
        _ => None,
    }
}

/// A `PTTL` reply's milliseconds.
fn pttl_ms(pttl: Option<&Bytes>) -> Option<i64> {
    inspect::integer(pttl?)
}

/// `EXEC`'s reply to a write-through: the client's frame, once L1 holds
/// what was written (when the write ran and nothing raced it) and every
/// key has had its second invalidation, here and on the bus.
pub(crate) fn through_reply(s: &mut Session, t: Through, exec: Bytes) -> Bytes {
    let caching_ok = t
        .caching
        .map_or(true, |c| s.queued_errors.remove(&c).is_none());
    let (frame, elements) = exec_parts(s, t.id, &exec);
    if let Some(els) = &elements {
        if let Some(failed) = els
            .iter()
            .skip(1)
            .take(t.evals)
            .find(|r| inspect::is_error(r))
        {
            // The write ran; only its tags are missing.
            tracing::warn!(
                event = "tag_register_failed",
                reply = %String::from_utf8_lossy(failed).trim_end(),
                "registering a key's tags failed after its write"
            );
        }
    }
    let ran = elements.is_some() && caching_ok && t.ran.matches(&frame);
    let ctx = s.ctx.clone();
    let tracked = ctx.tracking.mode() != crate::config::TrackingMode::Off;
    let mut renewed: Vec<Bytes> = Vec::with_capacity(t.fills.len());
    if let Some(l1) = &ctx.l1 {
        for (i, fill) in t.fills.into_iter().enumerate() {
            let key = Bytes::copy_from_slice(fill.token.key());
            let pttl = elements.as_ref().and_then(|els| els.get(1 + t.evals + i));
            let life = through_life(fill.ttl, pttl).filter(|_| ran);
            // The second invalidation, and the fill's claim handed on in
            // the same step.
            let tokens = l1
                .store
                .renew_fill(fill.token, if life.is_some() { 2 } else { 0 });
            if life.is_some() && tokens.is_empty() && tracked {
                refill(&ctx, &key, (fill.rule, fill.ttl, fill.compress), t.db);
            }
            if let Some(life) = life {
                let value = bulk(&fill.value);
                let value = match &fill.compress {
                    Some(c) => compression::l1_form(c, value, ctx.config.l1.max_value_size),
                    None => value,
                };
                // The key's own expiry in Redis, counted from the L1 one.
                let key_ttl = pttl_ms(pttl).and_then(|ms| u64::try_from(ms).ok());
                let timing = Timing {
                    life,
                    fetch: t.sent.elapsed(),
                    key_expiry: key_ttl.map(|ms| Duration::from_millis(ms).saturating_sub(life)),
                };
                for (token, proto) in tokens.into_iter().zip([Proto::Resp2, Proto::Resp3]) {
                    let variant =
                        Variant::from_args(t.db, proto, &[Bytes::from_static(b"GET"), key.clone()]);
                    l1.store.finish_fill_timed(
                        token,
                        fill.rule,
                        variant,
                        value.clone(),
                        t.sent + life,
                        timing,
                    );
                }
            }
            renewed.push(key);
        }
    }
    // The other keys are invalidated here and announced; the ones renewed
    // above only need announcing to the other instances.
    let renewed_set: std::collections::HashSet<&Bytes> = renewed.iter().collect();
    let others: Vec<Bytes> = t
        .keys
        .iter()
        .filter(|k| !renewed_set.contains(k))
        .cloned()
        .collect();
    cache::announce_keys(&ctx, t.db, &others);
    if let Some(bus) = &ctx.bus {
        bus.publish_keys(t.db, &renewed);
    }
    if !frame.is_empty() && !inspect::is_error(&frame) && !cache::is_nil(&frame) {
        super::stampede::written(&ctx, s.id, t.db, &t.keys);
    }
    frame
}

/// A write-through that ran but whose fill was cancelled, with tracking
/// on. Redis reports every tracked write to tierd, this instance's own
/// included (tracking cannot tell writers apart, and `NOLOOP` would also
/// hide evictions), so a key this instance has read before (`default`),
/// or any key (`bcast`), is reported back for the very write that fills
/// it, and that report usually lands before `EXEC`'s reply: it is what
/// cancelled the fill, most of the time. The key is read back in the
/// background, as an ordinary fill (whatever raced the write, the fill
/// protocol keeps what it reads coherent), so that L1 holds the value
/// shortly after the reply. One at a time per key.
fn refill(
    ctx: &Arc<Ctx>,
    key: &Bytes,
    (rule, ttl, compress): (usize, Duration, Option<CompressConfig>),
    db: u32,
) {
    if !ctx.writes.refilling.lock().insert(key.clone()) {
        return;
    }
    let get = |proto| Variant::from_args(db, proto, &[Bytes::from_static(b"GET"), key.clone()]);
    let job = super::stampede::Refresh {
        rule,
        ttl,
        // A nil read back means the key is gone again: nothing to keep.
        negative: false,
        key: key.clone(),
        variant: get(Proto::Resp2),
        request: reply::encode_command(&[b"GET", key]),
        compress,
    };
    let also = get(Proto::Resp3);
    let ctx = ctx.clone();
    tokio::spawn(async move {
        let key = job.key.clone();
        super::stampede::fill_also(&ctx, job, Some(also)).await;
        ctx.writes.refilling.lock().remove(&key);
    });
}

// ---------------------------------------------------------------------------
// Write-behind
// ---------------------------------------------------------------------------

/// The write strategies' shared state: which ones the rules use, and the
/// write-behind queue.
pub(crate) struct Writes {
    /// Some rule has `write = "through"`.
    any_through: bool,
    /// Keys being read back after a cancelled write-through ([`refill`]).
    /// Sync lock, held only to insert or remove.
    refilling: parking_lot::Mutex<std::collections::HashSet<Bytes>>,
    /// Some rule has `write = "behind"`: the queue is in use.
    any_behind: bool,
    /// `[write_behind] flush`.
    flush: Duration,
    /// `[write_behind] max_queue`.
    max_queue: usize,
    /// The queue. Sync lock, held only to add, look up or take entries,
    /// never across an `.await`.
    state: parking_lot::Mutex<Queue>,
    /// Entries queued and not yet answered by Redis (the lock-free copy the
    /// hot path and `INFO` read).
    depth: AtomicUsize,
    /// `max_queue` permits: a writer takes one per queued write and the
    /// flusher gives it back once Redis answered. FIFO, so writers that
    /// wait for room are served in order.
    room: Semaphore,
    /// Wakes the flusher: something was queued, or shutdown hurries it.
    wake: Notify,
    /// The sequence number of the oldest entry Redis has not answered yet
    /// (every lower one has been): what waiting requests watch. Also
    /// touched, unchanged, when the flusher fails, so that waiters look at
    /// the circuit breaker.
    done: watch::Sender<u64>,
    /// Shutdown: flush without waiting for `flush` to pass.
    hurry: AtomicBool,
    /// Entries with a lower sequence number are wanted in Redis by a
    /// request that waits for them (or was refused for them): they are
    /// sent without waiting for `flush` to pass.
    wanted: AtomicU64,
    /// Queued writes Redis accepted, and refused, since start (`INFO`).
    flushed: AtomicU64,
    errors: AtomicU64,
    metrics: Arc<Metrics>,
}

#[derive(Default)]
struct Queue {
    /// Oldest first. The first `in_flight` are in the batch being sent.
    entries: VecDeque<Entry>,
    in_flight: usize,
    /// Per key with a queued write: the newest one's sequence number and
    /// the value it writes (as Redis will store it).
    keys: HashMap<Bytes, Queued>,
    next_seq: u64,
}

struct Queued {
    last: u64,
    value: Bytes,
}

struct Entry {
    seq: u64,
    /// The request as it goes to Redis (values compressed if their rule
    /// says so).
    raw: Bytes,
    keys: Vec<Bytes>,
    /// The session that wrote it, for the leases its write releases.
    session: u64,
    db: u32,
    queued: Instant,
}

impl std::fmt::Debug for Writes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writes")
            .field("any_through", &self.any_through)
            .field("any_behind", &self.any_behind)
            .field("depth", &self.depth())
            .finish_non_exhaustive()
    }
}

impl Writes {
    /// The strategies of `config`'s rules, with an empty queue.
    pub(crate) fn new(config: &Config, metrics: Arc<Metrics>) -> Writes {
        let uses = |w: WriteStrategy| config.rules.iter().any(|r| r.cache && r.write == w);
        let max_queue = config
            .write_behind
            .max_queue
            .clamp(1, Semaphore::MAX_PERMITS);
        Writes {
            any_through: uses(WriteStrategy::Through),
            refilling: parking_lot::Mutex::default(),
            any_behind: uses(WriteStrategy::Behind),
            flush: config.write_behind.flush,
            max_queue,
            state: parking_lot::Mutex::new(Queue::default()),
            depth: AtomicUsize::new(0),
            room: Semaphore::new(max_queue),
            wake: Notify::new(),
            done: watch::Sender::new(0),
            hurry: AtomicBool::new(false),
            wanted: AtomicU64::new(0),
            flushed: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            metrics,
        }
    }

    /// Writes queued and not yet answered by Redis.
    pub(crate) fn depth(&self) -> usize {
        self.depth.load(Ordering::Acquire)
    }

    /// Queued writes Redis accepted since start.
    pub(crate) fn flushed(&self) -> u64 {
        self.flushed.load(Ordering::Relaxed)
    }

    /// Queued writes Redis refused since start.
    pub(crate) fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    /// Queues a write; the caller holds a permit of `room` for it.
    fn push(&self, session: u64, db: u32, raw: Bytes, pairs: Vec<(Bytes, Bytes)>) {
        let depth = {
            let mut q = self.state.lock();
            let seq = q.next_seq;
            q.next_seq += 1;
            let mut keys = Vec::with_capacity(pairs.len());
            for (key, value) in pairs {
                q.keys.insert(key.clone(), Queued { last: seq, value });
                keys.push(key);
            }
            q.entries.push_back(Entry {
                seq,
                raw,
                keys,
                session,
                db,
                queued: Instant::now(),
            });
            let depth = q.entries.len();
            self.depth.store(depth, Ordering::Release);
            depth
        };
        self.metrics.write_behind_queue(depth);
        self.wake.notify_one();
    }

    /// The value the newest queued write of `key` writes, if there is one.
    fn queued_value(&self, key: &[u8]) -> Option<Bytes> {
        self.state.lock().keys.get(key).map(|q| q.value.clone())
    }

    /// The newest queued write of any of `keys`.
    fn newest_of<'k>(&self, keys: impl Iterator<Item = &'k [u8]>) -> Option<u64> {
        let q = self.state.lock();
        keys.filter_map(|k| q.keys.get(k).map(|queued| queued.last))
            .max()
    }

    /// The newest queued write.
    fn newest(&self) -> Option<u64> {
        self.state.lock().entries.back().map(|e| e.seq)
    }

    /// When the next batch is due: `None` with nothing to send; at once
    /// when a batch is full (or the queue is, or shutdown hurries, or a
    /// request wants the oldest unsent write in Redis); otherwise `flush`
    /// after the oldest unsent write was queued.
    fn due(&self) -> Option<Instant> {
        let q = self.state.lock();
        let first = q.entries.get(q.in_flight)?;
        let unsent = q.entries.len() - q.in_flight;
        if self.hurry.load(Ordering::Acquire)
            || unsent >= BATCH
            || q.entries.len() >= self.max_queue
            || first.seq < self.wanted.load(Ordering::Acquire)
        {
            return Some(Instant::now());
        }
        Some(first.queued + self.flush)
    }

    /// The next batch to send, oldest first (it stays queued, marked in
    /// flight, until Redis answers).
    fn take_batch(&self) -> Vec<Bytes> {
        let mut q = self.state.lock();
        let n = q.entries.len().min(BATCH);
        q.in_flight = n;
        q.entries.iter().take(n).map(|e| e.raw.clone()).collect()
    }

    /// Redis answered the first `replies.len()` entries of the batch in
    /// flight; the rest of it (if any) goes again with the next batch.
    /// Each answered write is announced like any write (L1 here, the bus),
    /// and only then leaves the queue, so that reads let through once it
    /// left cannot find what it overwrote in L1.
    fn answered(&self, ctx: &Ctx, replies: &[Bytes]) {
        let done: Vec<Entry> = {
            let mut q = self.state.lock();
            q.in_flight = 0;
            let n = replies.len().min(q.entries.len());
            q.entries.drain(..n).collect()
        };
        for (entry, frame) in done.iter().zip(replies) {
            cache::announce_keys(ctx, entry.db, &entry.keys);
            if inspect::is_error(frame) {
                self.errors.fetch_add(1, Ordering::Relaxed);
                self.metrics.write_behind_flushed(false);
                tracing::warn!(
                    event = "write_behind_error",
                    key = %crate::admin::shown(entry.keys.first().map_or(&b""[..], |k| &k[..])),
                    keys = entry.keys.len(),
                    reply = %String::from_utf8_lossy(frame).trim_end(),
                    "Redis refused a queued write; its client was already told OK"
                );
            } else {
                self.flushed.fetch_add(1, Ordering::Relaxed);
                self.metrics.write_behind_flushed(true);
                super::stampede::written(ctx, entry.session, entry.db, &entry.keys);
            }
        }
        if done.is_empty() {
            return;
        }
        let (depth, oldest) = {
            let mut q = self.state.lock();
            for entry in &done {
                for key in &entry.keys {
                    if q.keys
                        .get(key)
                        .is_some_and(|queued| queued.last == entry.seq)
                    {
                        q.keys.remove(key);
                    }
                }
            }
            let oldest = q.entries.front().map_or(q.next_seq, |e| e.seq);
            let depth = q.entries.len();
            self.depth.store(depth, Ordering::Release);
            (depth, oldest)
        };
        self.room.add_permits(done.len());
        self.metrics.write_behind_queue(depth);
        self.done.send_replace(oldest);
    }

    /// Nothing of the batch in flight was answered: it goes again.
    fn unsend(&self) {
        self.state.lock().in_flight = 0;
    }

    /// Waits until Redis has answered the queued write `seq` (and so every
    /// one before it): [`Waited::Done`], and only then may the request that
    /// waits go. While the circuit breaker is not closed,
    /// [`Waited::FailFast`] at once: the request fails fast like any other
    /// the breaker refuses, and is not sent (as a half-open probe it would
    /// reach Redis before the write). [`Waited::TimedOut`] when Redis has not
    /// answered within the command timeout (it is frozen): not sent either,
    /// as it could overtake the write once Redis thaws.
    ///
    /// Either way the write is wanted now: the flusher sends it without
    /// waiting for `flush` to pass (and keeps retrying at its backoff while
    /// Redis cannot be reached), so that it reaches Redis as soon as Redis
    /// answers again, and the requests refused meanwhile go once it has.
    async fn wait_for(&self, ctx: &Ctx, seq: u64) -> Waited {
        let mut done = self.done.subscribe();
        if *done.borrow_and_update() > seq {
            return Waited::Done;
        }
        if self.wanted.fetch_max(seq + 1, Ordering::AcqRel) <= seq {
            self.wake.notify_one();
        }
        let breaker = ctx.upstream.breaker();
        let wait = async {
            loop {
                if *done.borrow_and_update() > seq {
                    return Waited::Done;
                }
                if breaker.state() != BreakerState::Closed {
                    return Waited::FailFast;
                }
                tokio::select! {
                    changed = done.changed() => {
                        if changed.is_err() {
                            // The queue is gone (shutdown): its writes
                            // can no longer be known to be in Redis.
                            return Waited::TimedOut;
                        }
                    }
                    _ = tokio::time::sleep(BREAKER_POLL) => {}
                }
            }
        };
        tokio::time::timeout(ctx.config.upstream.command_timeout, wait)
            .await
            .unwrap_or(Waited::TimedOut)
    }

    /// Takes a place in the queue for one write, waiting for room while it
    /// is full, FIFO. Bounded like [`Writes::wait_for`]: [`Waited::FailFast`]
    /// while the breaker is not closed, [`Waited::TimedOut`] after the
    /// command timeout. The write was not acknowledged, so failing it is
    /// safe; waiting on a Redis that does not answer is not.
    async fn room(&self, ctx: &Ctx) -> Waited {
        let breaker = ctx.upstream.breaker();
        let wait = async {
            // Created once, so that the writer keeps its place in line
            // while it looks at the breaker.
            let acquire = self.room.acquire();
            tokio::pin!(acquire);
            loop {
                if breaker.state() != BreakerState::Closed {
                    return Waited::FailFast;
                }
                tokio::select! {
                    biased;
                    permit = &mut acquire => {
                        return match permit {
                            Ok(permit) => {
                                permit.forget();
                                Waited::Done
                            }
                            // The semaphore is never closed.
                            Err(_) => Waited::TimedOut,
                        };
                    }
                    _ = tokio::time::sleep(BREAKER_POLL) => {}
                }
            }
        };
        tokio::time::timeout(ctx.config.upstream.command_timeout, wait)
            .await
            .unwrap_or(Waited::TimedOut)
    }

    /// Shutdown has begun: flush what is queued without waiting.
    pub(crate) fn hurry(&self) {
        self.hurry.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// Shutdown: waits until the queue is empty or `deadline` passes, and
    /// logs what could not be flushed (its clients were told OK).
    pub(crate) async fn drain(&self, deadline: tokio::time::Instant) {
        if !self.any_behind {
            return;
        }
        self.hurry();
        let mut done = self.done.subscribe();
        let empty = async {
            while self.depth() > 0 {
                if done.changed().await.is_err() {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout_at(deadline, empty).await;
        let (left, keys) = {
            let q = self.state.lock();
            let keys: Vec<String> = q
                .entries
                .iter()
                .flat_map(|e| e.keys.iter())
                .take(10)
                .map(|k| crate::admin::shown(k).into_owned())
                .collect();
            (q.entries.len(), keys)
        };
        if left > 0 {
            tracing::error!(
                event = "write_behind_lost",
                writes = left,
                keys = ?keys,
                "shutdown timeout: queued writes never reached Redis, though their clients were told OK"
            );
        } else {
            tracing::info!(event = "write_behind_drained", "write-behind queue drained");
        }
    }
}

/// Whether `req` is queued by write-behind: a write whose reply is surely
/// `+OK` ([`SetWrite::queueable`]), of keys whose rules all have `write =
/// "behind"` (and no tags, whose registration must run with the write),
/// from a session on the default identity and db without MULTI, WATCH or
/// other state of its own, small enough for the pool.
pub(super) fn queues(s: &Session, req: &Request) -> bool {
    queued_form(s, req).is_some()
}

fn queued_form<'r>(s: &Session, req: &'r Request) -> Option<SetWrite<'r>> {
    if !s.ctx.writes.any_behind
        || req.raw.len() > super::LARGE_REQUEST
        || s.ctx.l1.is_none()
        || !cache::eligible(s)
    {
        return None;
    }
    let write = SetWrite::parse(req).filter(|w| w.queueable)?;
    let behind = |key: &[u8]| {
        s.ctx
            .rules
            .find(key)
            .is_some_and(|(_, r)| r.cache && r.write == WriteStrategy::Behind && r.tags.is_empty())
    };
    write.pairs.iter().all(|(k, _)| behind(k)).then_some(write)
}

/// How a wait for the write-behind queue ended ([`Writes::wait_for`],
/// [`Writes::room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Waited {
    /// What was waited for happened: the request may go.
    Done,
    /// The circuit breaker is not closed: the request fails fast, as any
    /// the breaker refuses, without being sent.
    FailFast,
    /// Nothing happened within the command timeout.
    TimedOut,
}

/// The error a request gets when its wait did not end in
/// [`Waited::Done`]: the breaker's own `-TRYAGAIN`, or tierd's
/// "upstream unavailable" error for `timed_out`. Counted as an upstream
/// error, like any request the breaker or a timeout refuses.
fn refusal(ctx: &Ctx, waited: Waited, timed_out: &str) -> Bytes {
    ctx.metrics.upstream_error();
    match waited {
        Waited::FailFast => UpstreamError::CircuitOpen.to_resp(),
        _ => UpstreamError::unavailable(timed_out).to_resp(),
    }
}

/// Queues a write [`queues`] accepted and answers `+OK`, once there is
/// room. A full queue makes the writer wait, within the command timeout
/// and only while the circuit breaker is closed ([`Writes::room`]); past
/// that the write fails, unacknowledged and not sent. A write sent while
/// this session still has requests in flight waits for them first
/// ([`Flow::Stall`]): it must not reach Redis before them.
pub(super) async fn enqueue(s: &mut Session, req: Request) -> Flow {
    if s.inflight > 0 {
        return Flow::Stall(req);
    }
    let ctx = s.ctx.clone();
    match ctx.writes.room.try_acquire() {
        Ok(permit) => permit.forget(),
        // The queue is full. The client gets the replies it already has
        // first (the session writes them before it retries a stalled
        // request; with nothing in flight it retries at once), then this
        // session waits for room.
        Err(_) if s.queue.len() + s.out.len() > 0 => return Flow::Stall(req),
        Err(_) => {
            let waited = ctx.writes.room(&ctx).await;
            if waited != Waited::Done {
                s.local(refusal(
                    &ctx,
                    waited,
                    "the write-behind queue stayed full for the command timeout; the write was not queued",
                ));
                return Flow::Continue;
            }
        }
    }
    let pairs: Vec<(Bytes, Bytes)> = match SetWrite::parse(&req) {
        Some(write) => write
            .pairs
            .into_iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        None => Vec::new(),
    };
    ctx.writes.push(s.id, s.state.db, req.raw.clone(), pairs);
    s.local(Bytes::from_static(OK));
    Flow::Continue
}

/// Before any request is dispatched while writes are queued: a `GET` of a
/// key with a queued write is answered with its value (`Some`); a request
/// that touches such a key, or keys tierd cannot know, and `EXEC`, wait
/// here until those writes reached Redis ([`Writes::wait_for`]), and are
/// answered with an error, unsent, when they cannot. Writes that are
/// queued themselves go on at once: the queue keeps them in order; so do
/// requests inside MULTI, which Redis only queues until `EXEC`.
pub(super) async fn before_dispatch(s: &mut Session, kind: Kind, req: &Request) -> Option<Flow> {
    // The common case, on every request: nothing queued.
    if !s.ctx.writes.any_behind || s.ctx.writes.depth() == 0 {
        return None;
    }
    if s.state.multi {
        // Inside MULTI, Redis queues requests rather than runs them; what
        // runs them is EXEC, which waits for every write queued before it.
        return match kind {
            Kind::Exec if !s.state.multi_aborted => before_exec(s, req).await,
            _ => None,
        };
    }
    let ctx = s.ctx.clone();
    let writes = &ctx.writes;
    let wait = match kind {
        Kind::Plain | Kind::Blocking | Kind::Watch => {
            if kind == Kind::Plain && queues(s, req) {
                return None;
            }
            if kind == Kind::Plain
                && req.args.len() == 2
                && req.name().eq_ignore_ascii_case(b"GET")
                && cache::eligible(s)
            {
                let key = &req.args[1];
                if let Some(value) = writes.queued_value(key) {
                    let mut frame = bulk(&value);
                    // The queued value is as Redis will store it: compressed
                    // only when the key's own rule compresses in Redis (as
                    // `compression::plan` decides for a GET sent there). Any
                    // other value is returned as written, byte for byte,
                    // even one that looks like tierd's compression frame.
                    if ctx.rules.compress_for(key).is_some_and(|c| c.upstream) {
                        frame = compression::decode_reply(&ctx, frame, &Decode::Bulk);
                    }
                    s.local(frame);
                    return Some(Flow::Continue);
                }
            }
            newest_touched(s, req)
        }
        Kind::Cache if super::jobs::is_job(req) => writes.newest(),
        _ => None,
    };
    if let Some(seq) = wait {
        let waited = writes.wait_for(&ctx, seq).await;
        if waited != Waited::Done {
            s.local(refusal(
                &ctx,
                waited,
                "queued writes of its keys did not reach Redis within the command timeout",
            ));
            return Some(Flow::Continue);
        }
    }
    None
}

/// `EXEC` of a transaction while writes are queued. The commands queued in
/// the transaction were not looked at for the queue's keys when they were
/// queued (a write queued by another client may have come after them), so
/// `EXEC` waits for every write queued before it. When that fails
/// ([`Writes::wait_for`]), the transaction is discarded instead of run and
/// `EXEC` gets the error: the dedicated connection that holds it in Redis
/// is dropped (which discards it whatever state Redis is in, without
/// sending anything to a Redis the breaker refuses or that is frozen). A
/// session with state that only lived on that connection (`CLIENT
/// TRACKING`, `NO-EVICT`, `NO-TOUCH`) is closed after the reply, as when
/// its dedicated connection is lost.
async fn before_exec(s: &mut Session, req: &Request) -> Option<Flow> {
    let ctx = s.ctx.clone();
    let seq = ctx.writes.newest()?;
    // Whatever it queued must be answered before its connection may be
    // dropped.
    if super::must_wait(s, None) {
        return Some(Flow::Stall(req.clone()));
    }
    let waited = ctx.writes.wait_for(&ctx, seq).await;
    if waited == Waited::Done {
        return None;
    }
    if s.pinned.take().is_some() {
        s.note_pinned();
    }
    let lost_state = s.state.tracking || s.state.no_evict || s.state.no_touch;
    super::end_multi(s);
    s.local(refusal(
        &ctx,
        waited,
        "writes queued before EXEC did not reach Redis within the command timeout; the transaction was discarded",
    ));
    if lost_state {
        Some(Flow::Close)
    } else {
        Some(Flow::Continue)
    }
}

/// The newest queued write `req` must wait for: of the keys it names, or
/// of the whole queue when its keys cannot be known (scripts, `SORT … BY`,
/// commands the table does not know) or it reads or writes the whole
/// keyspace (`SCAN`, `KEYS`, `DBSIZE`, `FLUSHALL` …).
fn newest_touched(s: &mut Session, req: &Request) -> Option<u64> {
    let ctx = s.ctx.clone();
    let writes = &ctx.writes;
    let Some(table) = s.command_table() else {
        return writes.newest();
    };
    let Some(command) = table.resolve(&req.args) else {
        return writes.newest();
    };
    let category = |c: &str| command.acl_categories.iter().any(|a| a == c);
    if category("@scripting") || command.name == "sort" || command.name == "sort_ro" {
        return writes.newest();
    }
    match command.keys(&req.args) {
        Keys::Unknown => writes.newest(),
        Keys::Known(keys) if keys.is_empty() => {
            if command.is_write() || category("@keyspace") {
                writes.newest()
            } else {
                None
            }
        }
        Keys::Known(keys) => writes.newest_of(keys.iter().map(|k| k.key)),
    }
}

/// Starts the flusher when some rule has `write = "behind"`; it stops when
/// `stop` changes or closes (after the server drained the queue).
pub(crate) fn start(
    ctx: &Arc<Ctx>,
    stop: &watch::Receiver<()>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !ctx.writes.any_behind {
        return None;
    }
    Some(tokio::spawn(flusher(ctx.clone(), stop.clone())))
}

/// The flusher's own connection upstream.
struct FlushConn {
    conn: Conn,
    /// Held so that the connection can report its end; nothing is read.
    _events: mpsc::Receiver<Upstreamed>,
}

async fn connect(ctx: &Ctx) -> Result<FlushConn, UpstreamError> {
    let (tx, rx) = mpsc::channel(16);
    let conn = ctx
        .upstream
        .default_identity()
        .dedicated(Proto::Resp2, tx)
        .await?;
    let name = reply::encode_command(&[b"CLIENT", b"SETNAME", FLUSHER_NAME.as_bytes()]);
    conn.request(&name).await?;
    Ok(FlushConn { conn, _events: rx })
}

/// Sends the queue to Redis, batch after batch, for as long as the server
/// runs. A batch goes on one dedicated connection, pipelined, without a
/// command timeout: a frozen Redis holds it until it thaws, and a batch is
/// sent again only when its connection was lost (the writes are all
/// idempotent, and the next batch goes only after this one was answered,
/// so writes of one key stay in order).
async fn flusher(ctx: Arc<Ctx>, mut stop: watch::Receiver<()>) {
    let writes = &ctx.writes;
    let mut conn: Option<FlushConn> = None;
    let mut backoff = BACKOFF_MIN;
    loop {
        // Wait until a batch is due.
        loop {
            let wake = writes.wake.notified();
            match writes.due() {
                None => {
                    tokio::select! {
                        _ = wake => {}
                        _ = stop.changed() => return,
                    }
                }
                Some(at) if at <= Instant::now() => break,
                Some(at) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(at.into()) => break,
                        _ = wake => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
        let result = match &conn {
            Some(c) if c.conn.is_up() => flush_batch(&ctx, &c.conn).await,
            _ => match connect(&ctx).await {
                Ok(c) => {
                    let result = flush_batch(&ctx, &c.conn).await;
                    conn = Some(c);
                    result
                }
                Err(e) => Err(e),
            },
        };
        match result {
            Ok(()) => backoff = BACKOFF_MIN,
            Err(e) => {
                conn = None;
                tracing::warn!(event = "write_behind_retry", error = %e, queued = writes.depth(), retry_in = ?backoff, "queued writes could not be sent to Redis; retrying");
                // Waiting requests look at the breaker again.
                writes.done.send_modify(|_| {});
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Sends one batch and takes in Redis's answers, in order. `Err` when the
/// connection failed: what it answered before that counts, the rest goes
/// again.
async fn flush_batch(ctx: &Ctx, conn: &Conn) -> Result<(), UpstreamError> {
    let writes = &ctx.writes;
    let raws = writes.take_batch();
    if raws.is_empty() {
        return Ok(());
    }
    let (tx, mut rx) = mpsc::unbounded_channel();
    let requests: Vec<(&[u8], ReplyTo<'_>)> = raws
        .iter()
        .enumerate()
        .map(|(i, raw)| {
            let to = ReplyTo::Inbox {
                seq: i as u64,
                inbox: &tx,
                timed: false,
            };
            (&raw[..], to)
        })
        .collect();
    if let Err(e) = conn.send_all(&requests) {
        writes.unsend();
        return Err(e);
    }
    drop(requests);
    drop(tx);
    // Replies come in order on one connection; they are placed by number
    // all the same, and only the answered prefix counts.
    let mut slots: Vec<Option<Bytes>> = vec![None; raws.len()];
    let mut left = raws.len();
    let failed = loop {
        if left == 0 {
            break None;
        }
        match rx.recv().await {
            Some(Upstreamed::Reply { seq, reply }) => {
                let slot = usize::try_from(seq).ok().and_then(|i| slots.get_mut(i));
                match (reply, slot) {
                    (Ok(frame), Some(slot)) if slot.is_none() => {
                        *slot = Some(frame);
                        left -= 1;
                    }
                    (Err(e), _) => break Some(e),
                    _ => {}
                }
            }
            Some(_) => {}
            None => break Some(UpstreamError::unavailable("connection lost")),
        }
    };
    let replies: Vec<Bytes> = slots.into_iter().map_while(|r| r).collect();
    writes.answered(ctx, &replies);
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cache::store::{RuleCap, Store, StoreConfig};

    type Parsed = (Vec<(String, String)>, Ran, bool);

    fn parsed(args: &[&str]) -> Option<Parsed> {
        let req = Request::from_strs(args);
        let w = SetWrite::parse(&req)?;
        let pairs = w
            .pairs
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect();
        Some((pairs, w.ran, w.queueable))
    }

    fn kv(k: &str, v: &str) -> (String, String) {
        (k.to_owned(), v.to_owned())
    }

    #[test]
    fn set_forms_say_how_their_reply_tells_they_ran() {
        let one = |k, v| vec![kv(k, v)];
        assert_eq!(
            parsed(&["SET", "k", "v"]),
            Some((one("k", "v"), Ran::Ok, true))
        );
        assert_eq!(
            parsed(&["set", "k", "v", "ex", "10"]),
            Some((one("k", "v"), Ran::Ok, true))
        );
        assert!(parsed(&["SET", "k", "v", "PX", "1500"]).unwrap().2);
        assert!(parsed(&["SET", "k", "v", "KEEPTTL"]).unwrap().2);
        // Conditional or value-returning forms are written through but never
        // queued.
        assert_eq!(parsed(&["SET", "k", "v", "NX"]).unwrap().1, Ran::Ok);
        assert!(!parsed(&["SET", "k", "v", "NX"]).unwrap().2);
        assert_eq!(parsed(&["SET", "k", "v", "GET"]).unwrap().1, Ran::NotError);
        assert_eq!(parsed(&["SET", "k", "v", "NX", "GET"]).unwrap().1, Ran::Nil);
        assert_eq!(
            parsed(&["SET", "k", "v", "GET", "XX"]).unwrap().1,
            Ran::NotNil
        );
        // Forms Redis may refuse are not queued.
        for bad in [
            &["SET", "k", "v", "EX", "0"][..],
            &["SET", "k", "v", "EX", "-5"],
            &["SET", "k", "v", "EX", "ten"],
            &["SET", "k", "v", "EX"],
            &["SET", "k", "v", "EX", "10", "PX", "10"],
            &["SET", "k", "v", "EX", "10", "KEEPTTL"],
            &["SET", "k", "v", "EX", "99999999999999999"],
            &["SET", "k", "v", "EXAT", "1"],
            &["SET", "k", "v", "PXAT", "1"],
            &["SET", "k", "v", "BOGUS"],
            &["SETEX", "k", "0", "v"],
            &["PSETEX", "k", "x", "v"],
        ] {
            assert!(!parsed(bad).unwrap().2, "{bad:?} must not be queued");
        }
        assert_eq!(
            parsed(&["SETEX", "k", "10", "v"]),
            Some((one("k", "v"), Ran::Ok, true))
        );
        assert_eq!(
            parsed(&["PSETEX", "k", "10", "v"]),
            Some((one("k", "v"), Ran::Ok, true))
        );
        assert_eq!(
            parsed(&["SETNX", "k", "v"]),
            Some((one("k", "v"), Ran::One, false))
        );
        assert_eq!(
            parsed(&["GETSET", "k", "v"]),
            Some((one("k", "v"), Ran::NotError, false))
        );
        assert_eq!(
            parsed(&["MSET", "a", "1", "b", "2", "a", "3"]),
            Some((
                vec![kv("a", "1"), kv("b", "2"), kv("a", "3")],
                Ran::Ok,
                true
            ))
        );
        assert_eq!(parsed(&["MSETNX", "a", "1"]).unwrap().1, Ran::One);
        // Not writes of whole values, or not well-formed enough to say
        // which key gets which value.
        for none in [
            &["GET", "k"][..],
            &["SET", "k"],
            &["MSET", "a"],
            &["MSET", "a", "1", "b"],
            &["SETEX", "k", "10"],
            &["APPEND", "k", "v"],
        ] {
            assert!(parsed(none).is_none(), "{none:?}");
        }
    }

    #[test]
    fn replies_say_whether_the_write_ran() {
        assert!(Ran::Ok.matches(b"+OK\r\n"));
        assert!(!Ran::Ok.matches(b"$-1\r\n"));
        assert!(!Ran::Ok.matches(b"_\r\n"));
        assert!(Ran::One.matches(b":1\r\n"));
        assert!(!Ran::One.matches(b":0\r\n"));
        assert!(Ran::NotError.matches(b"$-1\r\n"));
        assert!(Ran::NotError.matches(b"$1\r\nx\r\n"));
        assert!(!Ran::NotError.matches(b"-WRONGTYPE x\r\n"));
        assert!(Ran::Nil.matches(b"_\r\n"));
        assert!(!Ran::Nil.matches(b"$1\r\nx\r\n"));
        assert!(Ran::NotNil.matches(b"$1\r\nx\r\n"));
        assert!(!Ran::NotNil.matches(b"$-1\r\n"));
        assert!(!Ran::NotNil.matches(b"-ERR x\r\n"));
    }

    #[test]
    fn written_values_live_as_long_as_the_write_left_them() {
        let hour = Duration::from_secs(3600);
        let frame = |s: &str| Bytes::from(s.to_owned());
        assert_eq!(through_life(hour, Some(&frame(":-1\r\n"))), Some(hour));
        assert_eq!(
            through_life(hour, Some(&frame(":1500\r\n"))),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            through_life(Duration::from_secs(1), Some(&frame(":5000\r\n"))),
            Some(Duration::from_secs(1))
        );
        assert_eq!(through_life(hour, Some(&frame(":-2\r\n"))), None);
        assert_eq!(through_life(hour, Some(&frame(":0\r\n"))), None);
        assert_eq!(through_life(hour, Some(&frame("-ERR x\r\n"))), None);
        assert_eq!(through_life(hour, None), None);
    }

    fn writes(flush: Duration, max_queue: usize) -> Writes {
        let mut config = Config::default();
        config.write_behind.flush = flush;
        config.write_behind.max_queue = max_queue;
        Writes::new(&config, Arc::new(Metrics::new()))
    }

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn the_queue_knows_the_newest_write_of_each_key() {
        let w = writes(Duration::from_secs(60), 10);
        assert_eq!(w.due(), None);
        w.push(1, 0, b("SET a 1"), vec![(b("a"), b("1"))]);
        w.push(
            1,
            0,
            b("MSET a 2 b 3"),
            vec![(b("a"), b("2")), (b("b"), b("3"))],
        );
        w.push(2, 0, b("SET c 4"), vec![(b("c"), b("4"))]);
        assert_eq!(w.depth(), 3);
        assert_eq!(w.queued_value(b"a"), Some(b("2")));
        assert_eq!(w.queued_value(b"b"), Some(b("3")));
        assert_eq!(w.queued_value(b"zz"), None);
        let keys = [&b"zz"[..], b"a"];
        assert_eq!(w.newest_of(keys.into_iter()), Some(1));
        assert_eq!(w.newest_of([&b"c"[..]].into_iter()), Some(2));
        assert_eq!(w.newest_of([&b"zz"[..]].into_iter()), None);
        assert_eq!(w.newest(), Some(2));
        // Due `flush` after the oldest write, unless hurried.
        let due = w.due().unwrap();
        assert!(due > Instant::now() + Duration::from_secs(59));
        w.hurry();
        assert!(w.due().unwrap() <= Instant::now());
        // A batch takes them all, oldest first; nothing unsent is left due.
        assert_eq!(
            w.take_batch(),
            [b("SET a 1"), b("MSET a 2 b 3"), b("SET c 4")]
        );
        assert_eq!(w.due(), None);
        w.unsend();
        assert_eq!(w.take_batch().len(), 3);
    }

    #[test]
    fn a_write_a_request_waits_for_is_due_at_once() {
        let w = writes(Duration::from_secs(60), 10);
        w.push(1, 0, b("SET a 1"), vec![(b("a"), b("1"))]);
        w.push(1, 0, b("SET b 1"), vec![(b("b"), b("1"))]);
        assert!(w.due().unwrap() > Instant::now());
        // A request waits for `a` (seq 0), as `wait_for` records it.
        w.wanted.fetch_max(1, Ordering::AcqRel);
        assert!(w.due().unwrap() <= Instant::now());
        // Once the batch with it is in flight, later writes wait for
        // `flush` again.
        assert_eq!(w.take_batch().len(), 2);
        w.push(1, 0, b("SET c 1"), vec![(b("c"), b("1"))]);
        assert!(w.due().unwrap() > Instant::now());
    }

    #[test]
    fn a_full_queue_is_due_at_once() {
        let w = writes(Duration::from_secs(60), 2);
        w.push(1, 0, b("SET a 1"), vec![(b("a"), b("1"))]);
        assert!(w.due().unwrap() > Instant::now());
        w.push(1, 0, b("SET b 1"), vec![(b("b"), b("1"))]);
        assert!(w.due().unwrap() <= Instant::now());
    }

    fn store() -> Store {
        Store::new(StoreConfig {
            max_memory: 1 << 20,
            max_value_size: 1 << 16,
            rules: vec![RuleCap {
                name: "r".into(),
                max_memory: None,
            }],
        })
        .unwrap()
    }

    fn get(db: u32, proto: Proto, key: &str) -> Variant {
        Variant::from_args(
            db,
            proto,
            &[
                Bytes::from_static(b"GET"),
                Bytes::copy_from_slice(key.as_bytes()),
            ],
        )
    }

    #[test]
    fn a_renewed_fill_survives_its_own_invalidation_and_no_other_does() {
        let store = store();
        let now = Instant::now();
        let later = now + Duration::from_secs(60);
        // The write's token, and a read's fill that began after it (old
        // value, read before the write ran).
        let write = store.begin_fill(b"k").unwrap();
        let read = store.begin_fill(b"k").unwrap();
        let renewed = store.renew_fill(write, 2);
        assert_eq!(renewed.len(), 2);
        assert!(!store.finish_fill(read, 0, get(0, Proto::Resp2, "k"), bulk(b"old"), later));
        for (token, proto) in renewed.into_iter().zip([Proto::Resp2, Proto::Resp3]) {
            assert!(store.finish_fill(token, 0, get(0, proto, "k"), bulk(b"new"), later));
        }
        for proto in [Proto::Resp2, Proto::Resp3] {
            assert_eq!(
                store.get(0, b"k", &get(0, proto, "k"), now),
                Some(bulk(b"new"))
            );
        }
    }

    #[test]
    fn an_invalidation_racing_the_write_cancels_its_fill() {
        let store = store();
        let later = Instant::now() + Duration::from_secs(60);
        let write = store.begin_fill(b"k").unwrap();
        store.invalidate(b"k");
        assert!(store.renew_fill(write, 2).is_empty());
        // A flush since the write began cancels it at the finish.
        let write = store.begin_fill(b"k").unwrap();
        store.flush_all();
        let renewed = store.renew_fill(write, 1);
        for token in renewed {
            assert!(!store.finish_fill(token, 0, get(0, Proto::Resp2, "k"), bulk(b"v"), later));
        }
        // An entry cached meanwhile is dropped by the renewal.
        let fill = store.begin_fill(b"k").unwrap();
        assert!(store.finish_fill(fill, 0, get(0, Proto::Resp2, "k"), bulk(b"old"), later));
        let write = store.begin_fill(b"k").unwrap();
        assert!(store.renew_fill(write, 0).is_empty());
        assert_eq!(
            store.get(0, b"k", &get(0, Proto::Resp2, "k"), Instant::now()),
            None
        );
    }
}
