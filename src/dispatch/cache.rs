//! Where dispatch meets the L1 tier: lookups, fills, and the invalidations
//! that go with writes.
//!
//! - **Reads.** A read-only, deterministic, single-key command (by the
//!   upstream's own `COMMAND` table) whose key a caching rule matches is
//!   answered from L1 when the entry is there. Otherwise it goes upstream on
//!   the session's pooled connection as part of a *fill*: `CLIENT CACHING
//!   YES` (in `default` tracking mode, so Redis remembers the key for
//!   tierd), the client's own request, then `PTTL key`, written back to back
//!   ([`Conn::send_all`]). The client's reply passes through untouched; the
//!   reply is cached once the `PTTL` arrives, for the shorter of the rule's
//!   ttl and the key's remaining upstream TTL, and only if no invalidation
//!   of the key arrived meanwhile (the store's fill marks).
//! - **MGET** is split per key: hits answer locally, the misses go upstream
//!   in one `MGET`, and the client's reply is assembled in key order.
//! - **Writes** invalidate their keys (from the table's key specs) before
//!   they are forwarded and again when their reply arrives. Writes whose
//!   keys cannot be known flush L1; `FLUSHDB`, `FLUSHALL` and `SWAPDB` flush
//!   exactly their dbs.
//!
//! Only the default identity's clients, outside MULTI and without a
//! dedicated connection, read from or fill L1: what a reply holds may depend
//! on who asks (ACLs) and on connection state. Everyone's writes
//! invalidate.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::compression::{self, Decode};
use super::{choose, error, leave_pinned, must_wait, needs_pin, Flow, Want};
use crate::cache::store::{encode_arg, encode_request, VariantRef};
use crate::cache::{FillToken, ReplySlice, Variant, L1};
use crate::command::{Command, Keys, Kind};
use crate::config::CompressConfig;
use crate::protocol::parse::string2ll;
use crate::protocol::{inspect, reply, Proto, Request};
use crate::session::{Ctx, Route, Session};
use crate::upstream::{Conn, Fanout, ReplyTo, UpstreamError};
use std::sync::Arc;

/// Sequence numbers of the requests tierd adds to a fill (`CLIENT CACHING
/// YES`, `PTTL`) have this bit set: their replies are tierd's, never a
/// client's, and never occupy a slot in the reply queue.
pub(crate) const SIDE: u64 = 1 << 63;

/// A side request's sequence number: the fill id above this many bits, the
/// key's index in the fill below.
pub(crate) const SIDE_INDEX_BITS: u32 = 16;

/// Most keys one `MGET` fills; further misses are fetched but not cached.
/// Each costs a `PTTL` upstream, so a huge `MGET` must not fan out without
/// bound. Below [`CACHING_INDEX`], which no key index may reach.
const MAX_FILL_KEYS: usize = 1024;

/// `CLIENT CACHING YES`: in `default` tracking mode, the read that follows
/// it is tracked for tierd.
pub(crate) const CACHING_YES: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$7\r\nCACHING\r\n$3\r\nYES\r\n";

/// The side index of a fill's `CLIENT CACHING YES`, whose `+OK` is dropped.
const CACHING_INDEX: u64 = (1 << SIDE_INDEX_BITS) - 1;

/// The side index of a tagged write's own `QUEUED` reply (kept if it is an
/// error: the client's answer). See [`super::tagging`].
pub(crate) const TAG_QUEUED_INDEX: u64 = CACHING_INDEX - 1;

/// The side index of the other replies inside a tagged write's
/// transaction (`MULTI`'s `+OK`, the `EVAL`s' `QUEUED`), which are dropped.
pub(crate) const TAG_DROP_INDEX: u64 = CACHING_INDEX - 2;

/// The start of tierd's own error for a request upstream did not answer.
const UNAVAILABLE: &[u8] = b"-ERR upstream unavailable";

/// What to do when the reply to a request arrives.
pub(crate) enum Hook {
    /// A write: invalidate its keys again, now that it ran.
    Invalidate(Vec<Bytes>),
    /// A write that empties dbs, or whose keys cannot be known.
    Flush(Flush),
    /// A single-key read that went upstream (or joined one that did): the
    /// reply passes through, is kept for its fill, handed to the reads that
    /// joined it, and, when nil for a rule with leases, waits for a loader
    /// instead ([`super::stampede`]).
    Fill(Box<ReadHook>),
    /// A split `MGET`: the client's reply is assembled from `parts` and the
    /// upstream `MGET` of the misses; fill `id` caches what came back.
    Mget {
        /// The fill, if any key is being cached.
        fill: Option<u64>,
        /// One per key of the client's `MGET`.
        parts: Vec<Part>,
        /// Which keys' values come compressed from upstream, by key.
        decode: Vec<bool>,
    },
    /// `EXEC`: the hooks of the writes it ran.
    Many(Vec<Hook>),
    /// A write sent inside tierd's own `MULTI`/`EXEC` with its tags'
    /// registration ([`super::tagging`]): the client's reply is taken out
    /// of `EXEC`'s, then the write's own hook runs on it.
    Tagged {
        /// The side-request id of the transaction's other replies.
        id: u64,
        /// The write's hook.
        write: Option<Box<Hook>>,
    },
    /// `INFO`: tierd's own sections are appended to upstream's reply.
    Info(crate::admin::Sections),
    /// A write of keys whose rule has `write = "through"`, sent inside
    /// tierd's own `MULTI`/`EXEC` with a `PTTL` per such key
    /// ([`super::writes`]): the client's reply is taken out of `EXEC`'s,
    /// and L1 is filled with what was written once it ran.
    Through(Box<super::writes::Through>),
    /// A reply that carries compressed values: `inner` runs on the reply
    /// as it came (a fill keeps it compressed), then the client's frame is
    /// decoded ([`super::compression`]).
    Decoded {
        /// What to decode.
        decode: Decode,
        /// The request's own hook.
        inner: Option<Box<Hook>>,
    },
}

/// What a single-key read does with its reply ([`Hook::Fill`]).
pub(crate) struct ReadHook {
    /// The fill that caches it, if any.
    pub(crate) fill: Option<u64>,
    /// The reads that joined it, if it leads any.
    pub(crate) flight: Option<super::stampede::FlightGuard>,
    /// How it waits for a loader when the reply is nil.
    pub(crate) lease: Option<super::stampede::Lease>,
}

/// Which dbs a flush empties.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Flush {
    /// Every db (`FLUSHALL`, or a write whose keys are unknown).
    All,
    /// One db (`FLUSHDB`).
    Db(u32),
    /// Two dbs (`SWAPDB a b`).
    Swap(u32, u32),
    /// Every db, unless the reply is an error: a command the table does not
    /// know (upstream refuses it, unless a module was loaded since).
    AllUnlessError,
}

/// One key of a split `MGET`.
pub(crate) enum Part {
    /// Answered from L1.
    Hit(ReplySlice),
    /// Answered from L1, where it was kept compressed: the restored reply.
    Restored(Bytes),
    /// Element `n` of the upstream `MGET`'s reply.
    Miss(usize),
}

/// A fill in flight: the replies, once they arrive, and their `PTTL`s.
pub(crate) struct PendingFill {
    /// When the requests were sent: expiries count from here, so they err
    /// early.
    sent: Instant,
    entries: Vec<FillEntry>,
    /// `PTTL` replies still to come.
    pttls_left: usize,
}

pub(crate) struct FillEntry {
    token: FillToken,
    rule: usize,
    ttl: Duration,
    negative: bool,
    variant: Variant,
    /// For an `MGET`: which element of the upstream reply is this key's.
    element: usize,
    /// The rule's compression, for a value read (`GET`, `MGET`): L1 keeps
    /// the large ones compressed.
    compress: Option<CompressConfig>,
    reply: Option<Bytes>,
    pttl: Option<i64>,
}

impl FillEntry {
    /// A single-key fill's entry, before its reply and `PTTL` arrive.
    pub(crate) fn new(
        token: FillToken,
        rule: usize,
        ttl: Duration,
        negative: bool,
        variant: Variant,
        compress: Option<CompressConfig>,
    ) -> FillEntry {
        FillEntry {
            token,
            rule,
            ttl,
            negative,
            variant,
            element: 0,
            compress,
            reply: None,
            pttl: None,
        }
    }

    /// The entry with its reply and the key's `PTTL` in.
    pub(crate) fn replied(mut self, reply: Bytes, pttl: Option<i64>) -> FillEntry {
        self.reply = Some(reply);
        self.pttl = pttl;
        self
    }
}

/// Whether this session may use L1 at all: the default identity, no state
/// that pins it, not a stream.
pub(super) fn eligible(s: &Session) -> bool {
    s.ctx.upstream.is_default(&s.identity)
        && !needs_pin(s)
        && !s.pinned.as_ref().is_some_and(|p| p.stream)
}

/// Tries to answer a read from L1 or send it as a fill. `Err` gives the
/// request back when L1 has nothing to do with it.
///
/// A hit is the hot path: the request is encoded into the session's scratch
/// buffer, the reply is copied straight from the entry into the client's
/// output, and nothing is allocated.
///
/// `decode` says which values in the reply come compressed from upstream
/// ([`super::compression::plan`]); L1 keeps large values of compressing
/// rules compressed, and restores them on a hit.
pub(crate) fn read(
    s: &mut Session,
    req: Request,
    decode: Option<&Decode>,
) -> Result<Flow, Request> {
    // A request in flight on the dedicated connection (a blocking read,
    // say) runs before this one in Redis: a hit now would answer with a
    // value from before it.
    let pinned_busy = s.inflight > 0 && s.inflight_route == Some(Route::Pinned);
    if s.ctx.l1.is_none() || !eligible(s) || s.writes_in_flight > 0 || pinned_busy {
        return Err(req);
    }
    s.refresh_table();
    if req.name().eq_ignore_ascii_case(b"MGET") {
        let flags = match decode {
            Some(Decode::Elements(flags)) => flags.clone(),
            _ => Vec::new(),
        };
        return mget(s, req, flags);
    }
    let value_read = req.name().eq_ignore_ascii_case(b"GET");
    let (db, proto, now) = (s.state.db, s.state.proto, s.now);
    // Field by field, so that the hit can write to the session's output
    // while the table and the store are borrowed.
    let looked = {
        let (Some(l1), Some(table)) = (s.ctx.l1.as_deref(), s.table.as_deref()) else {
            return Err(req);
        };
        let Some(key) = table
            .resolve(&req.args)
            .and_then(|c| c.cacheable_key(&req.args))
        else {
            return Err(req);
        };
        let Some((rule_index, rule)) = l1.rules.find(key) else {
            return Err(req);
        };
        let mut scratch = std::mem::take(&mut s.scratch);
        scratch.clear();
        encode_request(&mut scratch, req.args.iter().map(|a| &a[..]));
        let variant = VariantRef {
            db,
            proto,
            request: &scratch,
        };
        let (queue, out, mode) = (&mut s.queue, &mut s.out, &mut s.state.reply_mode);
        let compress = rule.compress.filter(|_| value_read);
        let ctx = &*s.ctx;
        let mut serve = |hit: &ReplySlice| {
            if compress.is_some() && compression::l1_compressed(hit.as_ref()) {
                let plain = compression::l1_hit(ctx, hit.as_ref());
                crate::session::answer(queue, out, mode, &plain, || plain.clone());
            } else {
                let shared = || Bytes::from_owner(hit.clone());
                crate::session::answer(queue, out, mode, hit.as_ref(), shared);
            }
        };
        let mut hit = l1
            .store
            .get_with(rule_index, key, &[variant], now, |h| serve(h));
        super::warm::note_read(ctx, rule_index, key);
        if hit.is_none() && rule.stale_ttl.is_some() && ctx.upstream.breaker().is_open() {
            // Upstream is unavailable: a reply past its ttl (or kept
            // through a lost link) beats an error.
            if l1
                .store
                .get_stale(rule_index, key, &[variant], now, |h| serve(h))
                .is_some()
            {
                crate::session::keep_scratch(&mut s.scratch, scratch);
                return Ok(Flow::Continue);
            }
            hit = None;
        }
        let due = match (&hit, rule.refresh_ahead) {
            (Some((slice, ())), Some(policy)) => {
                l1.store
                    .refresh_due(slice, now, policy, super::stampede::uniform())
                    && !super::stampede::refreshing(ctx, key)
            }
            _ => false,
        };
        let found = (hit.is_none() || due).then(|| Miss {
            rule: rule_index,
            ttl: rule.ttl,
            // A nil under a lease means "being loaded", not "missing".
            negative: rule.negative && rule.stampede.is_none(),
            key: Bytes::copy_from_slice(key),
            variant: Variant {
                db,
                proto,
                request: Bytes::copy_from_slice(&scratch),
            },
            compress,
            stampede: rule.stampede,
        });
        crate::session::keep_scratch(&mut s.scratch, scratch);
        match found {
            None => return Ok(Flow::Continue),
            Some(found) => (found, hit.is_some()),
        }
    };
    let (miss, refresh) = looked;
    if refresh {
        // A hit late in its life: served above, refreshed behind it.
        let request = reply::encode_command(&req.args.iter().map(|a| &a[..]).collect::<Vec<_>>());
        super::stampede::refresh(
            &s.ctx,
            super::stampede::Refresh {
                rule: miss.rule,
                ttl: miss.ttl,
                negative: miss.negative,
                key: miss.key,
                variant: miss.variant,
                request,
                compress: miss.compress,
            },
        );
        return Ok(Flow::Continue);
    }
    let lease = |seq: u64, miss: &Miss| {
        miss.stampede.map(|config| super::stampede::Lease {
            seq,
            rule: miss.rule,
            key: miss.key.clone(),
            variant: miss.variant.clone(),
            request: reply::encode_command(&req.args.iter().map(|a| &a[..]).collect::<Vec<_>>()),
            config,
            decode: decode.cloned(),
        })
    };
    let follower = |s: &mut Session, seq: u64| {
        let hook = ReadHook {
            fill: None,
            flight: None,
            lease: lease(seq, &miss),
        };
        register(s, seq, read_hook(hook, decode));
        Ok(Flow::Continue)
    };
    if let Some(seq) = super::stampede::join(s, &miss.variant, miss.rule) {
        return follower(s, seq);
    }
    let Some((conn, route)) = fill_conn(s, true) else {
        return Err(req);
    };
    let Some(l1) = s.ctx.l1.clone() else {
        return Err(req);
    };
    let Some(token) = l1.store.begin_fill(&miss.key) else {
        return Err(req);
    };
    let flight = match super::stampede::lead(s, &miss.variant, token.mark(), route) {
        super::stampede::Lead::Leader(flight) => flight,
        super::stampede::Lead::Follow(flight) => {
            match super::stampede::follow(s, &flight, miss.rule) {
                Some(seq) => return follower(s, seq),
                None => None,
            }
        }
    };
    let fanout = flight.as_ref().map(|f| f.fanout().clone());
    let id = s.next_fill;
    s.next_fill += 1;
    let seq = s.pending_slot();
    let hook = ReadHook {
        fill: Some(id),
        flight,
        lease: lease(seq, &miss),
    };
    let key = miss.key.clone();
    s.fills.insert(
        id,
        PendingFill {
            sent: now,
            entries: vec![FillEntry::new(
                token,
                miss.rule,
                miss.ttl,
                miss.negative,
                miss.variant,
                miss.compress,
            )],
            pttls_left: 1,
        },
    );
    register(s, seq, read_hook(hook, decode));
    let read = FillRead {
        raw: &req.raw,
        keys: &[key],
        fanout: fanout.as_ref(),
    };
    send_fill(s, &conn, route, seq, Some(id), read);
    Ok(Flow::Continue)
}

/// A single-key read that L1 did not answer (or answered late in its
/// entry's life): what its fill or refresh needs.
struct Miss {
    rule: usize,
    ttl: Duration,
    negative: bool,
    key: Bytes,
    variant: Variant,
    compress: Option<CompressConfig>,
    stampede: Option<crate::config::StampedeConfig>,
}

/// A read's hook, inside the decoding of compressed values if its reply
/// carries any.
fn read_hook(hook: ReadHook, decode: Option<&Decode>) -> Hook {
    let hook = Hook::Fill(Box::new(hook));
    match decode {
        Some(decode) => Hook::Decoded {
            decode: decode.clone(),
            inner: Some(Box::new(hook)),
        },
        None => hook,
    }
}

/// The pooled connection a fill goes out on, if requests in flight
/// elsewhere do not hold it up. With `tracked`, also only if tracking will
/// report changes to what is read on it. `None` means "not now".
pub(super) fn fill_conn(s: &mut Session, tracked: bool) -> Option<(Conn, Route)> {
    let route = choose(s, Want::Any);
    let Route::Pool { proto, idx, .. } = route else {
        return None;
    };
    if must_wait(s, Some(route)) {
        return None;
    }
    let conn = s.identity.pool(proto).conn(idx).clone();
    if tracked && !s.ctx.tracking.fill_allowed(&conn) {
        return None;
    }
    leave_pinned(s, route);
    Some((conn, route))
}

/// The client's read a fill sends ([`send_fill`]).
struct FillRead<'a> {
    /// The request as the client sent it.
    raw: &'a [u8],
    /// The keys whose `PTTL` follows it.
    keys: &'a [Bytes],
    /// Who else gets its reply (coalesced reads).
    fanout: Option<&'a Arc<Fanout>>,
}

/// Writes a fill: `CLIENT CACHING YES` (when tracking opts in), the
/// client's request (answering queue slot `seq`, whose hook is
/// registered), then one `PTTL` per key of fill `id`. Without a fill, just
/// the request.
fn send_fill(
    s: &mut Session,
    conn: &Conn,
    route: Route,
    seq: u64,
    fill: Option<u64>,
    read: FillRead<'_>,
) {
    let FillRead { raw, keys, fanout } = read;
    let id = fill.unwrap_or(0);
    let pttls: Vec<Bytes> = keys
        .iter()
        .map(|k| reply::encode_command(&[b"PTTL", k]))
        .collect();
    let inbox = s.inbox.clone();
    let side = |index: u64| ReplyTo::Inbox {
        seq: SIDE | (id << SIDE_INDEX_BITS) | index,
        inbox: &inbox,
        timed: true,
    };
    let mut requests: Vec<(&[u8], ReplyTo<'_>)> = Vec::with_capacity(keys.len() + 2);
    if fill.is_some() && s.ctx.tracking.opt_in() {
        requests.push((CACHING_YES, side(CACHING_INDEX)));
    }
    let to = match fanout {
        Some(fanout) => ReplyTo::Shared {
            seq,
            inbox: &inbox,
            fanout,
        },
        None => ReplyTo::Inbox {
            seq,
            inbox: &inbox,
            timed: true,
        },
    };
    requests.push((raw, to));
    for (i, pttl) in pttls.iter().enumerate() {
        requests.push((pttl, side(i as u64)));
    }
    let sent = conn.send_all(&requests);
    drop(requests);
    if sent.is_err() {
        if let Some(id) = fill {
            s.fills.remove(&id);
        }
    }
    super::account_send(s, route, seq, sent);
}

/// `MGET key [key ...]`, split: hits from L1, misses in one upstream `MGET`.
///
/// `decode` flags the keys whose values come compressed from upstream.
fn mget(s: &mut Session, req: Request, decode: Vec<bool>) -> Result<Flow, Request> {
    let Some(l1) = s.ctx.l1.clone() else {
        return Err(req);
    };
    let l1 = &*l1;
    let keys = req.args.get(1..).unwrap_or_default();
    if keys.is_empty() {
        return Err(req);
    }
    let now = s.now;
    let (db, proto) = (s.state.db, s.state.proto);
    let mut parts = Vec::with_capacity(keys.len());
    let mut misses: Vec<&Bytes> = Vec::new();
    // Keys to cache: (key, rule, index of its element in the upstream reply).
    let mut wanted: Vec<(&Bytes, usize, usize)> = Vec::new();
    let mut seen: std::collections::HashSet<&[u8]> = std::collections::HashSet::new();
    let mut scratch = std::mem::take(&mut s.scratch);
    for key in keys {
        let rule = l1.rules.find(key);
        if let Some((rule_index, r)) = rule {
            if let Some(hit) = mget_lookup(l1, rule_index, key, db, proto, now, &mut scratch) {
                if r.compress.is_some() && compression::l1_compressed(hit.as_ref()) {
                    parts.push(Part::Restored(compression::l1_hit(&s.ctx, hit.as_ref())));
                } else {
                    parts.push(Part::Hit(hit));
                }
                continue;
            }
        }
        if let Some((rule_index, _)) = rule {
            if wanted.len() < MAX_FILL_KEYS && seen.insert(&key[..]) {
                wanted.push((key, rule_index, misses.len()));
            }
        }
        parts.push(Part::Miss(misses.len()));
        misses.push(key);
    }
    crate::session::keep_scratch(&mut s.scratch, scratch);
    if misses.is_empty() {
        let len: usize = parts
            .iter()
            .map(|p| match p {
                Part::Hit(hit) => hit.as_ref().len(),
                Part::Restored(plain) => plain.len(),
                Part::Miss(_) => 0,
            })
            .sum();
        let mut assembled = BytesMut::with_capacity(len + 16);
        reply::array_header(&mut assembled, parts.len());
        for part in &parts {
            match part {
                Part::Hit(hit) => assembled.extend_from_slice(hit.as_ref()),
                Part::Restored(plain) => assembled.extend_from_slice(plain),
                Part::Miss(_) => {}
            }
        }
        let assembled = assembled.freeze();
        let shared = || assembled.clone();
        crate::session::answer(
            &mut s.queue,
            &mut s.out,
            &mut s.state.reply_mode,
            &assembled,
            shared,
        );
        return Ok(Flow::Continue);
    }
    if wanted.is_empty() && misses.len() == keys.len() {
        // Nothing cached and nothing to cache: an ordinary MGET.
        return Err(req);
    }
    let Some((conn, route)) = fill_conn(s, false) else {
        return Ok(Flow::Stall(req));
    };
    let mut args: Vec<&[u8]> = Vec::with_capacity(misses.len() + 1);
    args.push(b"MGET");
    args.extend(misses.iter().map(|k| &k[..]));
    let raw = reply::encode_command(&args);

    let fill_allowed = s.ctx.tracking.fill_allowed(&conn);
    let mut entries = Vec::new();
    if fill_allowed {
        for &(key, rule_index, element) in &wanted {
            let Some(rule) = l1.rules.iter().nth(rule_index) else {
                continue;
            };
            let Some(token) = l1.store.begin_fill(key) else {
                break;
            };
            entries.push(FillEntry {
                token,
                rule: rule_index,
                ttl: rule.ttl,
                negative: rule.negative && rule.stampede.is_none(),
                variant: get_variant(db, proto, key),
                element,
                compress: rule.compress,
                reply: None,
                pttl: None,
            });
        }
    }
    let seq = s.pending_slot();
    let keys: Vec<Bytes> = entries
        .iter()
        .map(|e| Bytes::copy_from_slice(e.token.key()))
        .collect();
    let fill = if entries.is_empty() {
        None
    } else {
        let id = s.next_fill;
        s.next_fill += 1;
        s.fills.insert(
            id,
            PendingFill {
                sent: now,
                pttls_left: entries.len(),
                entries,
            },
        );
        Some(id)
    };
    register(
        s,
        seq,
        Hook::Mget {
            fill,
            parts,
            decode,
        },
    );
    // Without a fill, id 0 names nothing: no PTTL or CACHING reply is
    // asked for.
    let read = FillRead {
        raw: &raw,
        keys: &keys,
        fanout: None,
    };
    send_fill(s, &conn, route, seq, fill, read);
    Ok(Flow::Continue)
}

/// The variant an `MGET` element is cached under: `GET key`'s, whose reply
/// is the same bulk string (or nil for a missing key). An `MGET` nil can
/// also mean "not a string", which `GET` answers with an error, so nil
/// elements are cached under their own `MGET key` variant instead.
fn get_variant(db: u32, proto: Proto, key: &[u8]) -> Variant {
    Variant::from_args(
        db,
        proto,
        &[Bytes::from_static(b"GET"), Bytes::copy_from_slice(key)],
    )
}

fn mget_nil_variant(db: u32, proto: Proto, key: &[u8]) -> Variant {
    Variant::from_args(
        db,
        proto,
        &[Bytes::from_static(b"MGET"), Bytes::copy_from_slice(key)],
    )
}

/// The canonical encodings of `GET key` and `MGET key` (see
/// [`get_variant`]), spelled out in `scratch`: this runs once per key of
/// every MGET.
fn mget_encodings<'s>(scratch: &'s mut Vec<u8>, key: &[u8]) -> (&'s [u8], &'s [u8]) {
    scratch.clear();
    scratch.extend_from_slice(b"\x03get");
    encode_arg(scratch, key);
    let split = scratch.len();
    scratch.extend_from_slice(b"\x04mget");
    encode_arg(scratch, key);
    scratch.split_at(split)
}

/// An `MGET` element from L1: `GET key`'s reply, else a nil cached for
/// this `MGET` form. `scratch` holds both encoded requests.
fn mget_lookup(
    l1: &L1,
    rule: usize,
    key: &[u8],
    db: u32,
    proto: Proto,
    now: Instant,
    scratch: &mut Vec<u8>,
) -> Option<ReplySlice> {
    let (get, nil) = mget_encodings(scratch, key);
    let variants = [
        VariantRef {
            db,
            proto,
            request: get,
        },
        VariantRef {
            db,
            proto,
            request: nil,
        },
    ];
    l1.store
        .get_with(rule, key, &variants, now, |_| ())
        .map(|(hit, ())| hit)
}

pub(crate) fn is_nil(frame: &[u8]) -> bool {
    matches!(frame, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n")
}

/// A reply Redis gives for a key that does not exist: nil, 0, an empty
/// aggregate, or `TYPE`'s `none`.
fn looks_absent(frame: &[u8]) -> bool {
    is_nil(frame)
        || matches!(
            frame,
            b":0\r\n" | b"*0\r\n" | b"~0\r\n" | b"%0\r\n" | b"+none\r\n"
        )
}

impl Hook {
    /// Whether the hook belongs to a write (counted in
    /// `Session::writes_in_flight`).
    fn is_write(&self) -> bool {
        match self {
            Hook::Invalidate(_)
            | Hook::Flush(_)
            | Hook::Many(_)
            | Hook::Tagged { .. }
            | Hook::Through(_) => true,
            Hook::Decoded { inner, .. } => inner.as_ref().is_some_and(|h| h.is_write()),
            Hook::Fill(_) | Hook::Mget { .. } | Hook::Info(_) => false,
        }
    }
}

/// Registers `hook` for the reply to request `seq`.
pub(crate) fn register(s: &mut Session, seq: u64, hook: Hook) {
    if hook.is_write() {
        s.writes_in_flight += 1;
    }
    s.hooks.insert(seq, hook);
}

/// Runs a write's hook for a request that ran outside the queue (an `EXEC`
/// run alone).
pub(crate) fn run_now(s: &mut Session, hook: Hook) {
    run(s, hook, Bytes::new());
}

/// Runs a request's hook when its reply arrives; returns the frame the
/// client gets (an assembled `MGET`, or the reply unchanged), or `None`
/// when the read now waits for a loader ([`super::stampede::park`]): its
/// slot stays pending until the herd answers it.
pub(crate) fn after_reply(s: &mut Session, hook: Hook, frame: Bytes) -> Option<Bytes> {
    if hook.is_write() {
        s.writes_in_flight = s.writes_in_flight.saturating_sub(1);
    }
    run(s, hook, frame)
}

fn run(s: &mut Session, hook: Hook, frame: Bytes) -> Option<Bytes> {
    Some(match hook {
        Hook::Invalidate(keys) => {
            announce_keys(&s.ctx, s.state.db, &keys);
            // Only a write whose reply says it ran (not the empty frame of
            // a write inside `EXEC`, whose outcome is not looked at).
            if !frame.is_empty() && !inspect::is_error(&frame) && !is_nil(&frame) {
                super::stampede::written(&s.ctx, s.id, s.state.db, &keys);
            }
            frame
        }
        Hook::Flush(flush) => {
            // A command the table does not know and Redis refused changed
            // nothing; tierd's own "upstream unavailable" says nothing about
            // whether it ran.
            let refused = inspect::is_error(&frame) && !frame.starts_with(UNAVAILABLE);
            if !(matches!(flush, Flush::AllUnlessError) && refused) {
                announce_flush(&s.ctx, flush);
            }
            frame
        }
        Hook::Many(hooks) => {
            // `EXEC`'s array: the writes ran (each may still have failed,
            // which is not looked at). Nil or an error: none ran. Empty:
            // unknown (run alone).
            let ran = frame.first() == Some(&b'*') && !is_nil(&frame);
            let each = if ran {
                Bytes::from_static(b"+OK\r\n")
            } else {
                Bytes::new()
            };
            for hook in hooks {
                run(s, hook, each.clone());
            }
            frame
        }
        Hook::Fill(read) => {
            let ReadHook {
                fill,
                flight,
                lease,
            } = *read;
            if let Some(flight) = flight {
                flight.complete(&frame);
            }
            if let Some(id) = fill {
                if inspect::is_error(&frame) {
                    s.fills.remove(&id);
                } else if let Some(entry) = s.fills.get_mut(&id).and_then(|f| f.entries.first_mut())
                {
                    entry.reply = Some(frame.clone());
                }
            }
            if let Some(lease) = lease {
                if is_nil(&frame) && super::stampede::park(s, lease, frame.clone()) {
                    return None;
                }
            }
            frame
        }
        Hook::Tagged { id, write } => {
            let frame = super::tagging::write_reply(s, id, frame);
            match write {
                Some(hook) => run(s, *hook, frame)?,
                None => frame,
            }
        }
        Hook::Mget {
            fill,
            parts,
            decode,
        } => assemble_mget(s, fill, parts, &decode, frame),
        Hook::Decoded { decode, inner } => {
            let frame = match inner {
                Some(hook) => run(s, *hook, frame)?,
                None => frame,
            };
            compression::decode_reply(&s.ctx, frame, &decode)
        }
        Hook::Info(sections) => crate::admin::append_info(&s.ctx, sections, frame),
        Hook::Through(through) => super::writes::through_reply(s, *through, frame),
    })
}

/// The client's `MGET` reply from its hits and the upstream reply for the
/// misses; keeps the elements being cached.
fn assemble_mget(
    s: &mut Session,
    fill: Option<u64>,
    parts: Vec<Part>,
    decode: &[bool],
    frame: Bytes,
) -> Bytes {
    let depth = s.ctx.config.limits.max_reply_depth;
    let misses = parts.iter().filter(|p| matches!(p, Part::Miss(_))).count();
    let elements = match inspect::elements(&frame, depth) {
        Some(els) if frame.first() == Some(&b'*') && els.len() == misses => els,
        _ => {
            if let Some(id) = fill {
                s.fills.remove(&id);
            }
            // An error (upstream down, -NOAUTH …) is the client's answer
            // too; anything else would be a broken upstream.
            if inspect::is_error(&frame) {
                return frame;
            }
            return error("ERR upstream sent an unexpected reply to MGET");
        }
    };
    let mut out = BytesMut::with_capacity(frame.len() + parts.len() * 16);
    reply::array_header(&mut out, parts.len());
    for (i, part) in parts.iter().enumerate() {
        match part {
            Part::Hit(hit) => out.extend_from_slice(hit.as_ref()),
            Part::Restored(plain) => out.extend_from_slice(plain),
            Part::Miss(n) => {
                let el = elements.get(*n).copied().unwrap_or(b"");
                if decode.get(i).copied().unwrap_or(false) {
                    let el = frame.slice_ref(el);
                    out.extend_from_slice(&compression::decode_reply(&s.ctx, el, &Decode::Bulk));
                } else {
                    out.extend_from_slice(el);
                }
            }
        }
    }
    if let Some(pending) = fill.and_then(|id| s.fills.get_mut(&id)) {
        for entry in &mut pending.entries {
            if let Some(el) = elements.get(entry.element) {
                let el = frame.slice_ref(el);
                if is_nil(&el) {
                    let key = entry.token.key();
                    entry.variant = mget_nil_variant(entry.variant.db, entry.variant.proto, key);
                }
                entry.reply = Some(el);
            }
        }
    }
    out.freeze()
}

/// A reply to a request tierd added: `CLIENT CACHING YES`'s `+OK` is
/// dropped, a `PTTL` completes its fill.
pub(crate) fn side_reply(s: &mut Session, seq: u64, reply: Result<Bytes, UpstreamError>) {
    let index = seq & CACHING_INDEX;
    let id = (seq & !SIDE) >> SIDE_INDEX_BITS;
    if index == TAG_DROP_INDEX {
        return;
    }
    if index == TAG_QUEUED_INDEX {
        if let Ok(frame) = reply {
            if inspect::is_error(&frame) {
                s.queued_errors.insert(id, frame);
            }
        }
        return;
    }
    if index == CACHING_INDEX {
        if !matches!(&reply, Ok(r) if inspect::is_ok(r)) {
            // Redis did not opt the read in: nothing it reads is tracked.
            s.fills.remove(&id);
        }
        return;
    }
    let Some(pending) = s.fills.get_mut(&id) else {
        return;
    };
    let pttl = reply.ok().and_then(|r| inspect::integer(&r));
    if let Some(entry) = usize::try_from(index)
        .ok()
        .and_then(|i| pending.entries.get_mut(i))
    {
        entry.pttl = pttl;
    }
    pending.pttls_left = pending.pttls_left.saturating_sub(1);
    if pending.pttls_left > 0 {
        return;
    }
    let Some(pending) = s.fills.remove(&id) else {
        return;
    };
    let Some(l1) = s.ctx.l1.clone() else {
        return;
    };
    let fetch = pending.sent.elapsed();
    for entry in pending.entries {
        store_fill(&s.ctx, &l1, pending.sent, fetch, entry);
    }
}

/// Caches a fill's reply, once its `PTTL` is in, for the shorter of the
/// rule's ttl and the key's remaining upstream TTL counted from `sent`
/// (when the read was sent, so expiries err early). `fetch` is how long
/// the read took, kept for refresh-ahead. Errors are never cached, nor
/// nils unless the rule caches them.
pub(crate) fn store_fill(
    ctx: &Ctx,
    l1: &L1,
    sent: Instant,
    fetch: Duration,
    entry: FillEntry,
) -> bool {
    let (Some(reply), Some(pttl)) = (entry.reply, entry.pttl) else {
        return false;
    };
    if inspect::is_error(&reply) {
        return false;
    }
    let nil = is_nil(&reply);
    if nil && !entry.negative {
        return false;
    }
    let tracked = ctx.tracking.mode() != crate::config::TrackingMode::Off;
    // The key's own expiry in Redis, counted from the L1 expiry below
    // (gone already for -2: never served stale past the L1 expiry).
    let key_ttl = match pttl {
        -2 => Some(Duration::ZERO),
        ms => u64::try_from(ms).ok().map(Duration::from_millis),
    };
    let life = match pttl {
        // No TTL upstream: the rule decides.
        -1 => entry.ttl,
        // No key. If it vanished (expired) between the read and the
        // PTTL, tracking reports it and the fill mark is gone; without
        // tracking, only a reply that says "no such key" is safe.
        -2 if tracked || looks_absent(&reply) => entry.ttl,
        ms if ms >= 0 => entry.ttl.min(Duration::from_millis(ms.unsigned_abs())),
        _ => return false,
    };
    let reply = match &entry.compress {
        Some(c) => compression::l1_form(c, reply, ctx.config.l1.max_value_size),
        None => reply,
    };
    l1.store.finish_fill_timed(
        entry.token,
        entry.rule,
        entry.variant,
        reply,
        sent + life,
        crate::cache::Timing {
            life,
            fetch,
            key_expiry: key_ttl.map(|k| k.saturating_sub(life)),
        },
    )
}

/// A request on a RESP3 pub/sub stream, where Redis accepts any command
/// and answers each with one frame that is not a push (subscription
/// changes are confirmed by pushes instead). A write there invalidates like
/// any other; its hook waits in line for its reply
/// ([`stream_reply`]). RESP2 subscribers and MONITOR clients cannot touch
/// the keyspace (Redis refuses), so their requests need nothing.
pub(crate) fn before_stream_request(s: &mut Session, kind: Kind, req: &Request) {
    /// Most requests waiting for their reply on a stream; past it L1 is
    /// flushed instead of remembering more (a client that sends and never
    /// reads must not grow tierd's memory).
    const MAX_STREAM_HOOKS: usize = 1024;
    if s.ctx.l1.is_none() || s.state.proto != Proto::Resp3 {
        return;
    }
    // Subscription changes are confirmed by pushes, except a SUBSCRIBE
    // without channels, which gets an error reply.
    let confirmed_by_push = match kind {
        Kind::PubSub => req.args.len() > 1,
        Kind::Unsubscribe | Kind::Monitor => true,
        _ => false,
    };
    if confirmed_by_push {
        return;
    }
    let hook = before_write(s, req);
    if s.stream_hooks.len() >= MAX_STREAM_HOOKS {
        // The hooks in line collapse into one count: once that many
        // replies have come, every key those writes touched (all of L1,
        // as far as tierd knows) is flushed, here and on the bus. A flush
        // now as well keeps this instance from serving what they already
        // changed meanwhile.
        s.ctx.metrics.flushed(Some(crate::metrics::Source::Write));
        apply_flush(s, Flush::All);
        s.stream_flush_after += s.stream_hooks.len();
        s.stream_hooks.clear();
    }
    s.stream_hooks.push_back(hook);
}

/// The stream ended with requests unanswered: they may have run.
pub(crate) fn stream_lost(s: &mut Session) {
    if s.stream_flush_after > 0 {
        s.stream_flush_after = 0;
        run(s, Hook::Flush(Flush::All), Bytes::new());
    }
    while let Some(hook) = s.stream_hooks.pop_front() {
        if let Some(hook) = hook {
            run(s, hook, Bytes::new());
        }
    }
}

/// A frame on a RESP3 stream: a reply (not a push) answers the oldest
/// request in line, and a write's hook runs.
pub(crate) fn stream_reply(s: &mut Session, frame: &[u8]) {
    if reply::is_push(frame) {
        return;
    }
    if s.stream_flush_after > 0 {
        s.stream_flush_after -= 1;
        if s.stream_flush_after == 0 {
            run(s, Hook::Flush(Flush::All), Bytes::new());
        }
        return;
    }
    if let Some(Some(hook)) = s.stream_hooks.pop_front() {
        run(s, hook, Bytes::new());
    }
}

/// A write emptied dbs (or touched keys tierd cannot name): flushes them
/// here and tells every other instance.
fn announce_flush(ctx: &Ctx, flush: Flush) {
    flush_l1(ctx, flush);
    if let Some(bus) = &ctx.bus {
        match flush {
            Flush::All | Flush::AllUnlessError => bus.publish_flush(None),
            Flush::Db(db) => bus.publish_flush(Some(db)),
            Flush::Swap(a, b) => {
                bus.publish_flush(Some(a));
                bus.publish_flush(Some(b));
            }
        }
    }
}

/// What a write's hook announces once the write ran, for a write whose
/// session is gone ([`orphaned`]): its keys, or its flush.
fn announce_hook(ctx: &Ctx, db: u32, hook: &Hook) {
    match hook {
        Hook::Invalidate(keys) => announce_keys(ctx, db, keys),
        Hook::Flush(flush) => announce_flush(ctx, *flush),
        Hook::Many(hooks) => {
            for hook in hooks {
                announce_hook(ctx, db, hook);
            }
        }
        Hook::Tagged { write, .. } => {
            if let Some(hook) = write {
                announce_hook(ctx, db, hook);
            }
        }
        Hook::Decoded { inner, .. } => {
            if let Some(hook) = inner {
                announce_hook(ctx, db, hook);
            }
        }
        Hook::Through(through) => announce_keys(ctx, db, through.keys()),
        Hook::Fill(_) | Hook::Mget { .. } | Hook::Info(_) => {}
    }
}

/// Writes sent for a session that ended before their replies came (the
/// client hung up or was killed, the shutdown timed out): they run anyway,
/// so what they change must still be announced, here and to the other
/// instances, and not before they ran, or an instance could cache the old
/// value again. Each is announced at once (the sooner stale entries go,
/// the better) and again when its reply arrives on `inbox`, or at the
/// latest after the command timeout (a write on the session's dedicated
/// connection, whose replies went with it, or one upstream never
/// answered).
pub(crate) fn orphaned(
    ctx: std::sync::Arc<Ctx>,
    db: u32,
    mut writes: std::collections::HashMap<u64, Hook>,
    mut inbox: tokio::sync::mpsc::UnboundedReceiver<crate::upstream::Upstreamed>,
) {
    writes.retain(|_, hook| hook.is_write());
    if writes.is_empty() {
        return;
    }
    for hook in writes.values() {
        announce_hook(&ctx, db, hook);
    }
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    let deadline = ctx.config.upstream.command_timeout + Duration::from_secs(1);
    runtime.spawn(async move {
        let wait = async {
            while !writes.is_empty() {
                match inbox.recv().await {
                    Some(crate::upstream::Upstreamed::Reply { seq, .. }) => {
                        if let Some(hook) = writes.remove(&seq) {
                            announce_hook(&ctx, db, &hook);
                        }
                    }
                    Some(_) => {}
                    None => break,
                }
            }
        };
        let _ = tokio::time::timeout(deadline, wait).await;
        for hook in writes.values() {
            announce_hook(&ctx, db, hook);
        }
    });
}

/// Drops `keys` from this instance's L1 (every db), cancelling their
/// in-flight fills. Other instances are not told.
pub(crate) fn invalidate_local(ctx: &Ctx, keys: &[Bytes]) {
    if let Some(l1) = &ctx.l1 {
        for key in keys {
            l1.store.invalidate(key);
        }
    }
}

/// `keys` changed in `db` (a write ran, or a `CACHE.INVALIDATE` removed
/// them): drops them here and tells every other instance over the bus.
/// Call it once the change has happened upstream, so that no instance can
/// fill an old value after hearing of it.
pub(crate) fn announce_keys(ctx: &Ctx, db: u32, keys: &[Bytes]) {
    invalidate_local(ctx, keys);
    let (Some(bus), Some(l1)) = (&ctx.bus, &ctx.l1) else {
        return;
    };
    // Only keys a rule caches: the other instances share the rules, so
    // nothing else can be in their L1, and most writes are of keys no rule
    // caches.
    let cached = |k: &Bytes| l1.rules.find(k).is_some();
    if keys.iter().all(cached) {
        bus.publish_keys(db, keys);
    } else {
        let keys: Vec<Bytes> = keys.iter().filter(|k| cached(k)).cloned().collect();
        bus.publish_keys(db, &keys);
    }
}

/// Drops every key matching the Redis glob from this instance's L1 and
/// tells every other instance to do the same. Returns how many keys had a
/// reply cached here.
pub(crate) async fn announce_pattern(ctx: &Ctx, db: u32, glob: &[u8]) -> u64 {
    let dropped = match &ctx.l1 {
        Some(l1) => crate::invalidation::bus::drop_matching(l1.clone(), vec![glob.to_vec()]).await,
        None => 0,
    };
    if let Some(bus) = &ctx.bus {
        bus.publish_pattern(db, glob);
    }
    dropped
}

/// Invalidates what a write is about to change and returns the hook that
/// invalidates it again once it ran. `None` for reads.
pub(crate) fn before_write(s: &mut Session, req: &Request) -> Option<Hook> {
    let l1 = s.ctx.l1.clone()?;
    let table = s.command_table()?;
    let hook = match table.resolve(&req.args) {
        None => Hook::Flush(Flush::AllUnlessError),
        Some(command) => write_hook(s, command, req)?,
    };
    match &hook {
        Hook::Invalidate(keys) => super::stampede::before_write(s, Some(keys)),
        _ => super::stampede::before_write(s, None),
    }
    match &hook {
        Hook::Invalidate(keys) => {
            for key in keys {
                l1.store.invalidate(key);
            }
            s.ctx
                .metrics
                .invalidated(crate::metrics::Source::Write, keys.len() as u64);
        }
        Hook::Flush(Flush::AllUnlessError) => {}
        Hook::Flush(flush) => {
            // Counted and logged once, here; the flush again on the reply
            // is the same event.
            s.ctx.metrics.flushed(Some(crate::metrics::Source::Write));
            tracing::info!(event = "invalidated", source = "write", kind = "flush", scope = ?flush, "a write flushed L1");
            apply_flush(s, *flush);
        }
        _ => {}
    }
    // Inside MULTI the db a queued FLUSHDB or SWAPDB runs in depends on
    // the SELECTs queued before it: flush them all.
    if s.state.multi && matches!(hook, Hook::Flush(Flush::Db(_) | Flush::Swap(..))) {
        apply_flush(s, Flush::All);
        return Some(Hook::Flush(Flush::All));
    }
    Some(hook)
}

fn write_hook(s: &Session, command: &Command, req: &Request) -> Option<Hook> {
    let name = command.name.as_str();
    match name {
        "flushall" => return Some(Hook::Flush(Flush::All)),
        "flushdb" => return Some(Hook::Flush(Flush::Db(s.state.db))),
        "swapdb" => {
            let db = |i| {
                req.arg(i)
                    .and_then(|a| string2ll(a))
                    .and_then(|n| u32::try_from(n).ok())
            };
            return Some(match (db(1), db(2)) {
                (Some(a), Some(b)) => Hook::Flush(Flush::Swap(a, b)),
                _ => Hook::Flush(Flush::All),
            });
        }
        // SORT writes only with STORE, and its key specs cannot say which
        // argument that is.
        "sort" => return sort_hook(req),
        _ => {}
    }
    if !command.is_write() {
        return None;
    }
    match command.keys(&req.args) {
        Keys::Known(keys) => Some(Hook::Invalidate(
            keys.iter().map(|k| Bytes::copy_from_slice(k.key)).collect(),
        )),
        Keys::Unknown => Some(Hook::Flush(Flush::All)),
    }
}

/// `SORT key [BY p] [LIMIT o c] [GET p ...] [ASC|DESC] [ALPHA] [STORE dst]`:
/// a write of `dst` with `STORE`, else a read.
fn sort_hook(req: &Request) -> Option<Hook> {
    let mut i = 2;
    let mut dst = None;
    while let Some(arg) = req.arg(i) {
        let arg: &[u8] = arg;
        if arg.eq_ignore_ascii_case(b"STORE") {
            dst = req.arg(i + 1).cloned();
            i += 2;
        } else if arg.eq_ignore_ascii_case(b"LIMIT") {
            i += 3;
        } else if arg.eq_ignore_ascii_case(b"BY") || arg.eq_ignore_ascii_case(b"GET") {
            i += 2;
        } else {
            i += 1;
        }
    }
    dst.map(|d| Hook::Invalidate(vec![d]))
}

fn apply_flush(s: &Session, flush: Flush) {
    flush_l1(&s.ctx, flush);
}

fn flush_l1(ctx: &Ctx, flush: Flush) {
    let Some(l1) = &ctx.l1 else {
        return;
    };
    match flush {
        Flush::All | Flush::AllUnlessError => l1.store.flush_all(),
        Flush::Db(db) => l1.store.flush_db(db),
        Flush::Swap(a, b) => {
            l1.store.flush_db(a);
            l1.store.flush_db(b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mget_lookup` spells out the encodings of `GET key` and `MGET key`;
    /// they must be exactly the variants fills store, or every MGET would
    /// miss.
    #[test]
    fn mget_lookup_encodings_match_the_fill_variants() {
        for len in [0, 1, 127, 128, 300, 20_000] {
            let key = vec![b'k'; len];
            let mut scratch = Vec::new();
            let (get, nil) = mget_encodings(&mut scratch, &key);
            assert_eq!(
                get,
                get_variant(0, Proto::Resp2, &key).request,
                "GET, key of {len}"
            );
            assert_eq!(
                nil,
                mget_nil_variant(0, Proto::Resp2, &key).request,
                "MGET, key of {len}"
            );
        }
    }
}
