//! The L1 store: tierd's in-process, byte-weighted cache of read replies.
//!
//! This file owns where cached replies live, how much memory they may use, and
//! the bookkeeping that keeps them coherent: per-key fill marks (the
//! placeholder pattern of DESIGN.md invariant 4), flush epochs, expiry and the
//! per-rule counters behind `CACHE.STATS`. It must not touch sockets, the
//! upstream, rule matching or time sources: callers pass the rule index, the
//! [`Variant`] and `Instant`s in, so everything here is synchronous and
//! testable without a server.
//!
//! # Layout
//!
//! A cached reply is identified by (key, [`Variant`]): the same key read by
//! `GET` and `GETRANGE`, in db 0 and db 3, over RESP2 and RESP3, gives
//! different bytes. All variants of one key are stored together in one cache
//! entry, so invalidating a key (which Redis reports without a db or command)
//! is one remove per cache. There is one [`quick_cache`] cache per rule that
//! has its own `max_memory`, plus one shared cache for the rules without,
//! sized to the global cap minus the rule caps.
//!
//! An entry is a single `Arc<[u8]>`: a small header, the key, then one record
//! per variant (db, protocol, expiry, request, reply). Packing everything into
//! one allocation is a measured deviation from an `Arc` of a struct holding a
//! `Vec` of `(Variant, Bytes, Instant)` under a `Bytes` key: that layout makes
//! five heap allocations per cached reply (key, entry, vector, request,
//! reply, plus `Bytes`' shared header once the reply is first served) and
//! measured 327 bytes of RSS per entry beyond a 12-byte key and a 100-byte
//! reply (359 once served), against 129 for this one (`benches/l1.rs`). The
//! quick_cache key is a 64-bit hash of the Redis key rather than the key
//! itself, which saves a 32-byte `Bytes` in every slab slot; the full key is
//! kept in the entry and compared on every access, so a hash collision costs
//! a miss (or a conservative invalidation of fills), never a wrong reply. A
//! record's request is stored without the key argument when it is the first
//! argument (nearly every cacheable read), since the entry holds the key.
//!
//! A hit returns the reply as a `Bytes` that shares the entry
//! (`Bytes::from_owner`), so it copies nothing, at the price of one small
//! allocation per hit; storing a `Bytes` per entry instead would avoid it but
//! costs 32 more bytes per entry.
//!
//! # Coherence
//!
//! Three mechanisms, each cheap on the hit path:
//!
//! - **Fill marks.** [`Store::begin_fill`] marks the key before the upstream
//!   read is sent; [`Store::invalidate`] removes the mark; [`Store::finish_fill`]
//!   inserts only if the mark it started with is still there. Invalidation and
//!   insertion take the same per-key mark lock, so an invalidation is ordered
//!   entirely before or entirely after an insert and can never be undone by it.
//! - **Flush epochs.** Every flush bumps a global epoch and raises a floor (for
//!   all dbs, or for one). Each entry carries the epoch its (oldest) fill
//!   began at, and an entry below its db's floor is dead: never served,
//!   dropped lazily. A fill begun before a flush carries the old epoch and is
//!   rejected, or dies with the floor if the flush raises it just after. Flushes are
//!   therefore correct the moment the floor is raised, without locking every
//!   shard; the physical removal that follows only reclaims memory.
//! - **Suspension.** While the tracking link is down nothing can be trusted:
//!   [`Store::suspend`] raises the floor to "everything" and drops all entries,
//!   [`Store::resume`] sets it back to the current epoch, which also kills any
//!   fill begun before the resume.
//!
//! # Locks
//!
//! Mark shards are `parking_lot` mutexes held for a hash-map operation and, on
//! the fill and invalidation paths, for one quick_cache insert or remove; never
//! across I/O (there is none here) and never while calling out. Lock order is
//! always mark shard, then cache shard; the eviction hook only collects the
//! evicted values, which are accounted and dropped after the locks are released.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes};
use parking_lot::Mutex;
use quick_cache::sync::Cache;
use quick_cache::{DefaultHashBuilder, Lifecycle, OptionsBuilder, Weighter};

use crate::protocol::Proto;

/// Memory charged to every entry on top of its packed bytes: the `Arc`
/// header (16), the allocator's chunk header and rounding (8 to 24), the
/// quick_cache slab slot (40: a `u64` key, a fat `Arc<[u8]>`, clock state and
/// two list links) and its hash-table slot (about 8), plus a share of the
/// ghost entries quick_cache keeps for admission. Checked by `benches/l1.rs`:
/// 200k entries of a 12-byte key and a 100-byte reply take 241 bytes of RSS
/// each and are charged 249, and a 100 MiB store kept full by three times
/// its capacity of distinct keys grows RSS by about 1.1x its cap.
pub const ENTRY_OVERHEAD: u64 = 96;

/// Most variants kept for one key. Lookups scan a key's variants linearly, so
/// this bounds the cost of a hit on a key read many ways (`HGET` of many
/// fields); the oldest variant makes room for a new one.
pub const MAX_VARIANTS: usize = 32;

/// Most rules a store accepts: an entry records its rule in a `u16`.
pub const MAX_RULES: usize = u16::MAX as usize;

/// Mark-table shards. Fills and invalidations of different keys rarely meet
/// on one mutex with 64 of them, and an idle shard costs ~80 bytes.
const MARK_SHARDS: usize = 64;

/// Dbs with their own flush floor. Redis defaults to 16 databases; a flush of
/// a db at or above this index raises the shared floor of all of them, which
/// is conservative (some extra misses) and never stale.
const DB_SLOTS: usize = 64;

/// Set in a record's protocol byte when its request is stored without the
/// key argument: nearly every cached read is `CMD key ...`, and the key is
/// already in the entry, so this saves the key's length per cached reply.
const KEY_ELIDED: u8 = 0x80;

/// The global floor while suspended: no entry is ever at or above it.
const SUSPENDED: u64 = u64::MAX;

/// quick_cache's default share of a shard reserved for hot entries; an entry
/// heavier than this share of its shard is never admitted.
const HOT_ALLOCATION: f64 = 0.97;

/// Typical weight of one entry, used only to size quick_cache's tables and
/// ghost list: a short key, a ~100-byte reply, its request and the overhead.
const ESTIMATED_ENTRY_WEIGHT: u64 = 256;

/// Bytes before the key in an entry: rule (u16), variant count (u16), key
/// length (u32), epoch the entry was built at (u64).
const ENTRY_HEADER: usize = 16;

/// Bytes before a record's request: db (u32), protocol (u8), expiry in
/// nanoseconds since the store's base instant (u64), the reply's life in
/// milliseconds (u32) and how long its upstream read took in microseconds
/// (u32), both for refresh-ahead ([`Timing`]), how long after the expiry
/// the key itself expires in Redis, in milliseconds ([`NO_KEY_EXPIRY`] for
/// never: stale serving stops there), request length (u32), reply length
/// (u32).
const RECORD_HEADER: usize = 33;

/// A record's key has no expiry in Redis.
const NO_KEY_EXPIRY: u32 = u32::MAX;

/// How a reply was filled, kept with it for refresh-ahead
/// ([`Store::finish_fill_timed`], [`ReplySlice::refresh_due`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Timing {
    /// How long the reply was given to live in L1 (its expiry minus the
    /// time its read was sent). Zero means unknown: never refreshed.
    pub life: Duration,
    /// How long its upstream read took (XFetch's `delta`).
    pub fetch: Duration,
    /// How long after the reply's L1 expiry its key expires in Redis;
    /// `None` when it has no expiry (or it is not known). A reply is never
    /// served stale past its key's own expiry.
    pub key_expiry: Option<Duration>,
}

/// What a stampede-protection event counts, per rule ([`Store::note`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A read answered by another read of the same reply in flight.
    Coalesced,
    /// A lease taken: a reader was made the loader.
    LeaseGrant,
    /// A read that found nothing and waited for a loader.
    LeaseWait,
    /// A wait that ended with a value.
    LeaseWakeup,
    /// A wait that ran out.
    LeaseTimeout,
    /// A background refresh sent.
    Refresh,
}

/// Which reply a cached entry is: the same key read by different commands,
/// arguments, db or protocol gives different bytes.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct Variant {
    /// The db the client had selected.
    pub db: u32,
    /// The protocol the reply is encoded in.
    pub proto: Proto,
    /// The request's arguments, command name lowercased, encoded canonically
    /// (see [`Variant::from_args`]).
    pub request: Bytes,
}

impl Variant {
    /// The variant for a request's arguments (command name first), read in
    /// `db` over `proto`.
    ///
    /// The encoding is each argument's length as a LEB128 varint followed by
    /// its bytes, with the command name ASCII-lowercased: `GET k` and `get k`
    /// are one variant, and `["a", "bc"]` and `["ab", "c"]` are two. Lengths
    /// cost a byte for arguments under 128 bytes, which matters because the
    /// request is stored with every cached reply.
    pub fn from_args(db: u32, proto: Proto, args: &[Bytes]) -> Variant {
        let mut out = Vec::new();
        encode_request(&mut out, args.iter().map(|a| &a[..]));
        Variant {
            db,
            proto,
            request: Bytes::from(out),
        }
    }

    /// The borrowed form lookups take.
    pub fn as_ref(&self) -> VariantRef<'_> {
        VariantRef {
            db: self.db,
            proto: self.proto,
            request: &self.request,
        }
    }
}

/// A [`Variant`] as a lookup sees it: borrowed, so that answering a hit
/// allocates nothing. Build the request with [`encode_request`] into a
/// buffer the caller reuses.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct VariantRef<'a> {
    /// The db the client had selected.
    pub db: u32,
    /// The protocol the reply is encoded in.
    pub proto: Proto,
    /// The canonical request encoding (see [`Variant::from_args`]).
    pub request: &'a [u8],
}

/// Somewhere an encoded request goes.
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);
    /// Appends bytes, ASCII-lowercased.
    fn put_lower(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
    fn put_lower(&mut self, bytes: &[u8]) {
        self.extend(bytes.iter().map(u8::to_ascii_lowercase));
    }
}

/// Appends one argument (not the command name) in the canonical encoding:
/// its length as a LEB128 varint, then its bytes.
pub fn encode_arg(out: &mut Vec<u8>, arg: &[u8]) {
    let mut n = arg.len();
    while n >= 0x80 {
        out.push((n as u8 & 0x7f) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
    out.extend_from_slice(arg);
}

/// Appends the canonical encoding of a request ([`Variant::from_args`]) to
/// `out`: each argument's length as a LEB128 varint, then its bytes; the
/// command name lowercased.
pub fn encode_request<'a>(out: &mut impl Sink, args: impl Iterator<Item = &'a [u8]>) {
    for (i, arg) in args.enumerate() {
        let mut n = arg.len();
        let mut len = [0u8; 10];
        let mut at = 0;
        while n >= 0x80 {
            len[at] = (n as u8 & 0x7f) | 0x80;
            n >>= 7;
            at += 1;
        }
        len[at] = n as u8;
        out.put(len.get(..=at).unwrap_or_default());
        if i == 0 {
            out.put_lower(arg);
        } else {
            out.put(arg);
        }
    }
}

/// One rule as the store sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleCap {
    /// The rule's name, for [`RuleStats`].
    pub name: String,
    /// The rule's own byte cap, or `None` to share the global cap's remainder
    /// with the other rules that have none.
    pub max_memory: Option<u64>,
}

/// What a [`Store`] is built from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The global cap in bytes (`[l1] max_memory`), rule caps included.
    pub max_memory: u64,
    /// Replies longer than this are not cached (`[l1] max_value_size`).
    pub max_value_size: u64,
    /// The rules in match order; a rule's index here is the `rule` argument
    /// of [`Store::get`] and [`Store::finish_fill`].
    pub rules: Vec<RuleCap>,
}

/// Why a [`StoreConfig`] was rejected. Each message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// The per-rule caps do not fit in the global cap.
    #[error(
        "the rules' max_memory add up to {rules} bytes, more than [l1] max_memory ({global} bytes): \
         raise [l1] max_memory or lower the rules' caps"
    )]
    RuleCapsExceedGlobal {
        /// Sum of the rules' caps.
        rules: u64,
        /// The global cap.
        global: u64,
    },
    /// More rules than an entry can name.
    #[error("{count} rules; the L1 store supports at most {MAX_RULES}: merge rules")]
    TooManyRules {
        /// How many rules were given.
        count: usize,
    },
    /// quick_cache refused the cache options (a bug in tierd, not in the config).
    #[error("internal error building the L1 cache: {0}")]
    CacheOptions(String),
}

/// One rule's counters, as `CACHE.STATS` shows them. Counts are of cached
/// replies (one per key and variant), not of keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleStats {
    /// The rule's name.
    pub name: String,
    /// Lookups answered from L1.
    pub hits: u64,
    /// Lookups that had to go upstream.
    pub misses: u64,
    /// Replies currently cached.
    pub entries: u64,
    /// Bytes charged for them, overhead included.
    pub bytes: u64,
    /// Replies dropped to make room.
    pub evictions: u64,
    /// Replies dropped by invalidations and flushes.
    pub invalidations: u64,
    /// Reads answered by joining an identical read in flight.
    pub coalesced: u64,
    /// Leases taken for readers made loaders.
    pub lease_grants: u64,
    /// Reads that waited for a loader.
    pub lease_waits: u64,
    /// Waits that ended with a value.
    pub lease_wakeups: u64,
    /// Waits that ran out.
    pub lease_timeouts: u64,
    /// Background refreshes sent.
    pub refreshes: u64,
    /// Replies served past their ttl (or their link) while upstream was
    /// unavailable.
    pub stale_serves: u64,
}

/// What L1 holds for one key, as `CACHE.INSPECT` shows it
/// ([`Store::inspect`]): only the variants still live.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The rule the entry was cached under (its index).
    pub rule: usize,
    /// Bytes charged for the whole entry, overhead included (what
    /// [`RuleStats::bytes`] counts).
    pub bytes: u64,
    /// The live cached replies, oldest first.
    pub variants: Vec<VariantInfo>,
}

/// One cached reply of an [`EntryInfo`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VariantInfo {
    /// The db it was read in.
    pub db: u32,
    /// The protocol its reply is encoded in.
    pub proto: Proto,
    /// The request's arguments, command name first and lowercased.
    pub args: Vec<Bytes>,
    /// How long it has left to live.
    pub ttl: std::time::Duration,
    /// The reply's length in bytes.
    pub size: usize,
    /// The reply is a bulk string holding a compressed value (see
    /// [`crate::cache::compress::is_framed_bulk`]).
    pub framed: bool,
}

/// Permission to cache one reply for one key, from [`Store::begin_fill`].
///
/// Dropping it without [`Store::finish_fill`] (the upstream read failed, the
/// client went away) releases the key's mark, so an aborted fill leaks
/// nothing.
pub struct FillToken {
    marks: Arc<Marks>,
    key: Box<[u8]>,
    hash: u64,
    mark_id: u64,
    /// The store's epoch when the fill began.
    born: u64,
    /// Whether dropping the token must still release its mark.
    armed: bool,
}

impl FillToken {
    /// The key being filled.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// What [`Store::fill_current`] checks, kept apart from the token.
    pub fn mark(&self) -> FillMark {
        FillMark {
            hash: self.hash,
            mark_id: self.mark_id,
            born: self.born,
        }
    }
}

/// Which fill a [`FillToken`] is, for asking whether it is still current
/// after the token itself went elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FillMark {
    hash: u64,
    mark_id: u64,
    born: u64,
}

impl std::fmt::Debug for FillToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FillToken")
            .field("key", &String::from_utf8_lossy(&self.key))
            .field("mark_id", &self.mark_id)
            .field("born", &self.born)
            .finish_non_exhaustive()
    }
}

impl Drop for FillToken {
    fn drop(&mut self) {
        if self.armed {
            self.marks.release(self.hash, self.mark_id);
        }
    }
}

/// The L1 store. See the module docs for the layout and the coherence rules.
pub struct Store {
    /// Index 0 is the shared cache; rules with a cap have their own.
    caches: Vec<L1Cache>,
    rules: Vec<RuleSlot>,
    marks: Arc<Marks>,
    hasher: DefaultHashBuilder,
    /// Expiries are stored as nanoseconds since this instant.
    base: Instant,
    max_value_size: u64,
    /// Bumped by every flush; entries and fills record it.
    epoch: AtomicU64,
    /// Entries built before this epoch are dead in every db; [`SUSPENDED`]
    /// while suspended.
    all_floor: AtomicU64,
    /// Per-db floors (db ≥ `DB_SLOTS - 1` share the last slot).
    db_floors: [AtomicU64; DB_SLOTS],
    /// Entries built before this epoch may not even be served stale: raised
    /// by flushes ([`Store::flush_all`]), never by a lost link.
    stale_floor: AtomicU64,
    /// Whether some rule keeps stale replies.
    any_stale: bool,
    /// The epoch of the last lost link or connection
    /// ([`Store::distrust`], [`Store::suspend`]): what was kept then is
    /// retired once the link is back ([`Store::retire_stale`]).
    last_distrust: AtomicU64,
    /// Who holds the store suspended, one bit per [`Holder`]. A sync lock,
    /// held only while the floor is switched, so that one link resuming
    /// can never undo another link's suspension.
    holders: parking_lot::Mutex<u8>,
    /// Readers waiting for keys to change ([`Store::watch`]).
    watches: Arc<super::watch::Watches>,
}

/// What may hold the store suspended: each invalidation link on its own.
/// The store serves again only once no holder is left.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The tracking link (Redis `CLIENT TRACKING`).
    Tracking,
    /// The invalidation bus link (pub/sub between tierd instances).
    Bus,
}

impl Holder {
    fn bit(self) -> u8 {
        match self {
            Holder::Tracking => 1,
            Holder::Bus => 2,
        }
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("caches", &self.caches.len())
            .field("rules", &self.rules.len())
            .field("max_value_size", &self.max_value_size)
            .finish_non_exhaustive()
    }
}

type EntryCache = Cache<u64, Arc<[u8]>, EntryWeighter, BuildHasherDefault<IdHasher>, Collect>;

struct L1Cache {
    cache: EntryCache,
    /// Heaviest entry quick_cache admits in one shard; merges trim to it.
    max_entry_weight: u64,
}

struct RuleSlot {
    name: String,
    cache: usize,
    counters: Counters,
    /// How long past its expiry a reply is kept for stale serving, in
    /// nanoseconds; 0 keeps nothing ([`Store::set_stale_ttl`]).
    stale: u64,
}

/// Padded so that hit counters of different rules never share a cache line.
#[derive(Default)]
#[repr(align(128))]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    entries: AtomicU64,
    bytes: AtomicU64,
    evictions: AtomicU64,
    invalidations: AtomicU64,
    coalesced: AtomicU64,
    lease_grants: AtomicU64,
    lease_waits: AtomicU64,
    lease_wakeups: AtomicU64,
    lease_timeouts: AtomicU64,
    refreshes: AtomicU64,
    stale_serves: AtomicU64,
}

/// Charges each entry its packed length plus [`ENTRY_OVERHEAD`].
#[derive(Clone, Copy)]
struct EntryWeighter;

impl Weighter<u64, Arc<[u8]>> for EntryWeighter {
    fn weight(&self, _key: &u64, val: &Arc<[u8]>) -> u64 {
        entry_weight(val)
    }
}

fn entry_weight(entry: &[u8]) -> u64 {
    entry.len() as u64 + ENTRY_OVERHEAD
}

/// quick_cache's lifecycle hook: collects evicted and replaced entries into
/// the request state, so the store can account for them (and drop them)
/// after the shard lock is released.
#[derive(Clone, Copy)]
struct Collect;

impl Lifecycle<u64, Arc<[u8]>> for Collect {
    type RequestState = Vec<(u64, Arc<[u8]>)>;

    fn begin_request(&self) -> Self::RequestState {
        Vec::new()
    }

    fn on_evict(&self, state: &mut Self::RequestState, key: u64, val: Arc<[u8]>) {
        state.push((key, val));
    }
}

/// The cache keys are already good 64-bit hashes (ahash of the Redis key, with
/// a per-process seed), so hashing them again would only cost time.
#[derive(Default, Clone, Copy)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than a u64 is hashed; fold it in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// The placeholder marks: key hash → the fill generation in progress.
///
/// Keyed by hash, so two colliding keys share a mark and an invalidation of
/// one cancels fills of the other: conservative, never stale. Each shard's
/// mutex is held for one map operation (plus, for fills and invalidations, one
/// cache insert or remove, see the module docs), never across I/O.
struct Marks {
    shards: [Mutex<MarkShard>; MARK_SHARDS],
}

#[derive(Default)]
struct MarkShard {
    map: HashMap<u64, Mark, BuildHasherDefault<IdHasher>>,
    /// Source of mark ids, unique within the shard.
    next_id: u64,
}

struct Mark {
    id: u64,
    inflight: u32,
}

impl Marks {
    fn new() -> Marks {
        Marks {
            shards: std::array::from_fn(|_| Mutex::new(MarkShard::default())),
        }
    }

    /// The shard for a hash. Uses middle bits: the shard's own hash map uses
    /// the low bits for buckets and the top seven for tags.
    fn shard(&self, hash: u64) -> &Mutex<MarkShard> {
        &self.shards[(hash >> 32) as usize % MARK_SHARDS]
    }

    /// Joins (or starts) the fill generation of a key; returns its id.
    fn begin(&self, hash: u64) -> u64 {
        let mut shard = self.shard(hash).lock();
        let shard = &mut *shard;
        let next_id = &mut shard.next_id;
        let mark = shard.map.entry(hash).or_insert_with(|| {
            *next_id += 1;
            Mark {
                id: *next_id,
                inflight: 0,
            }
        });
        mark.inflight = mark.inflight.saturating_add(1);
        mark.id
    }

    fn release(&self, hash: u64, id: u64) -> bool {
        self.shard(hash).lock().release(hash, id)
    }

    fn clear(&self) {
        for shard in self.shards.iter() {
            shard.lock().map.clear();
        }
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.shards.iter().all(|s| s.lock().map.is_empty())
    }
}

impl MarkShard {
    /// Leaves the fill generation `id` of `hash`. Returns whether that
    /// generation was still current, i.e. nothing invalidated the key since
    /// the fill began.
    fn release(&mut self, hash: u64, id: u64) -> bool {
        match self.map.get_mut(&hash) {
            Some(mark) if mark.id == id => {
                mark.inflight = mark.inflight.saturating_sub(1);
                if mark.inflight == 0 {
                    self.map.remove(&hash);
                }
                true
            }
            _ => false,
        }
    }
}

/// A parsed view of a packed entry.
struct EntryView<'a> {
    buf: &'a [u8],
    rule: u16,
    count: u16,
    born: u64,
    key: &'a [u8],
}

/// One variant's record inside an entry.
struct Record<'a> {
    db: u32,
    proto: u8,
    expires: u64,
    life_ms: u32,
    fetch_us: u32,
    key_left_ms: u32,
    request: &'a [u8],
    /// Where the reply is in the entry.
    reply: Range<usize>,
    /// Where the whole record is in the entry.
    span: Range<usize>,
}

/// The entry `entry` parsed, if it is `key`'s, and the record of the first
/// of `variants` it holds.
fn find_variant<'e>(
    entry: &'e [u8],
    key: &[u8],
    variants: &[VariantRef<'_>],
) -> Option<(EntryView<'e>, Record<'e>)> {
    let view = EntryView::parse(entry)?;
    if view.key != key {
        return None;
    }
    let record = variants
        .iter()
        .find_map(|v| view.records().find(|r| r.is(key, *v)))?;
    Some((view, record))
}

impl Record<'_> {
    /// What makes a [`ReplySlice`] of this record, once given the entry
    /// it was read from (which this record borrows until then).
    fn slice_of(&self) -> impl FnOnce(Arc<[u8]>) -> ReplySlice {
        let (range, expires) = (self.reply.clone(), self.expires);
        let (life_ms, fetch_us) = (self.life_ms, self.fetch_us);
        move |entry| ReplySlice {
            entry,
            range,
            expires,
            life_ms,
            fetch_us,
        }
    }

    /// Whether this record is `variant` of `key`.
    fn is(&self, key: &[u8], variant: VariantRef<'_>) -> bool {
        if self.db != variant.db || self.proto & !KEY_ELIDED != variant.proto.as_u8() {
            return false;
        }
        let request = variant.request;
        if self.proto & KEY_ELIDED == 0 {
            return self.request == request;
        }
        // Stored without its key argument: the request must be the stored
        // command, then the key, then the stored rest. The command part is
        // self-delimiting, so a prefix, a suffix and the length settle it.
        match split_key_arg(request, key) {
            Some((command, rest)) => {
                self.request.len() == command.len() + rest.len()
                    && self.request.starts_with(command)
                    && self.request.ends_with(rest)
            }
            None => false,
        }
    }
}

/// Splits a canonical request whose first argument after the command is
/// `key` into the command part and the arguments after the key.
fn split_key_arg<'a>(request: &'a [u8], key: &[u8]) -> Option<(&'a [u8], &'a [u8])> {
    let (command_len, at) = read_varint(request)?;
    let command_end = at.checked_add(command_len)?;
    let after = request.get(command_end..)?;
    let (arg_len, at) = read_varint(after)?;
    if arg_len != key.len() || after.get(at..at + arg_len)? != key {
        return None;
    }
    Some((request.get(..command_end)?, after.get(at + arg_len..)?))
}

/// A LEB128 length and how many bytes it took.
fn read_varint(buf: &[u8]) -> Option<(usize, usize)> {
    let mut n: usize = 0;
    for (i, b) in buf.iter().enumerate().take(10) {
        n |= usize::from(b & 0x7f).checked_shl(7 * i as u32)?;
        if b & 0x80 == 0 {
            return Some((n, i + 1));
        }
    }
    None
}

fn read_u16(buf: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(buf.get(at..at + 2)?.try_into().ok()?))
}

fn read_u32(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn read_u64(buf: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

impl<'a> EntryView<'a> {
    fn parse(buf: &'a [u8]) -> Option<EntryView<'a>> {
        let rule = read_u16(buf, 0)?;
        let count = read_u16(buf, 2)?;
        let key_len = read_u32(buf, 4)? as usize;
        let born = read_u64(buf, 8)?;
        let key = buf.get(ENTRY_HEADER..ENTRY_HEADER + key_len)?;
        Some(EntryView {
            buf,
            rule,
            count,
            born,
            key,
        })
    }

    fn records(&self) -> Records<'a> {
        Records {
            buf: self.buf,
            at: ENTRY_HEADER + self.key.len(),
        }
    }
}

struct Records<'a> {
    buf: &'a [u8],
    at: usize,
}

impl<'a> Iterator for Records<'a> {
    type Item = Record<'a>;

    fn next(&mut self) -> Option<Record<'a>> {
        let buf = self.buf;
        let at = self.at;
        let db = read_u32(buf, at)?;
        let proto = *buf.get(at + 4)?;
        let expires = read_u64(buf, at + 5)?;
        let life_ms = read_u32(buf, at + 13)?;
        let fetch_us = read_u32(buf, at + 17)?;
        let key_left_ms = read_u32(buf, at + 21)?;
        let req_len = read_u32(buf, at + 25)? as usize;
        let reply_len = read_u32(buf, at + 29)? as usize;
        let req_at = at + RECORD_HEADER;
        let reply_at = req_at + req_len;
        let end = reply_at + reply_len;
        let request = buf.get(req_at..reply_at)?;
        if end > buf.len() {
            return None;
        }
        self.at = end;
        Some(Record {
            db,
            proto,
            expires,
            life_ms,
            fetch_us,
            key_left_ms,
            request,
            reply: reply_at..end,
            span: at..end,
        })
    }
}

/// A new record to append to an entry.
struct NewRecord<'a> {
    db: u32,
    /// With [`KEY_ELIDED`] if the request is stored without its key.
    proto: u8,
    expires: u64,
    timing: Timing,
    /// The stored request is these two parts, concatenated.
    request: &'a [u8],
    request_rest: &'a [u8],
    reply: &'a [u8],
}

impl NewRecord<'_> {
    fn request_len(&self) -> usize {
        self.request.len() + self.request_rest.len()
    }

    fn len(&self) -> usize {
        RECORD_HEADER + self.request_len() + self.reply.len()
    }
}

/// Packs an entry: the header, the key, the kept records of an old entry
/// (copied as they are) and optionally one new record. `None` if a length
/// does not fit the format (a key, request or reply over 4 GiB).
fn encode_entry(
    rule: u16,
    born: u64,
    key: &[u8],
    old: &[u8],
    kept: &[Range<usize>],
    new: Option<&NewRecord<'_>>,
) -> Option<Arc<[u8]>> {
    let count = u16::try_from(kept.len() + usize::from(new.is_some())).ok()?;
    let key_len = u32::try_from(key.len()).ok()?;
    let len = ENTRY_HEADER
        + key.len()
        + kept.iter().map(|r| r.len()).sum::<usize>()
        + new.map_or(0, NewRecord::len);
    let mut out = Vec::with_capacity(len);
    out.put_u16_le(rule);
    out.put_u16_le(count);
    out.put_u32_le(key_len);
    out.put_u64_le(born);
    out.extend_from_slice(key);
    for span in kept {
        out.extend_from_slice(old.get(span.clone())?);
    }
    if let Some(new) = new {
        out.put_u32_le(new.db);
        out.put_u8(new.proto);
        out.put_u64_le(new.expires);
        out.put_u32_le(millis_u32(new.timing.life));
        out.put_u32_le(micros_u32(new.timing.fetch));
        out.put_u32_le(
            new.timing
                .key_expiry
                .map_or(NO_KEY_EXPIRY, |d| millis_u32(d).min(NO_KEY_EXPIRY - 1)),
        );
        out.put_u32_le(u32::try_from(new.request_len()).ok()?);
        out.put_u32_le(u32::try_from(new.reply.len()).ok()?);
        out.extend_from_slice(new.request);
        out.extend_from_slice(new.request_rest);
        out.extend_from_slice(new.reply);
    }
    Some(Arc::from(out))
}

/// A duration in whole milliseconds, saturating at `u32::MAX` (49 days).
fn millis_u32(d: Duration) -> u32 {
    u32::try_from(d.as_millis()).unwrap_or(u32::MAX)
}

/// A duration in whole microseconds, saturating at `u32::MAX` (71 minutes).
fn micros_u32(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The reply bytes of a hit: shares the entry, so serving a hit copies
/// nothing however large the reply (`Bytes::from_owner` takes it as is).
#[derive(Clone)]
pub struct ReplySlice {
    entry: Arc<[u8]>,
    range: Range<usize>,
    /// The record's expiry (nanoseconds since the store's base), life and
    /// read time, for [`Store::refresh_due`].
    expires: u64,
    life_ms: u32,
    fetch_us: u32,
}

impl AsRef<[u8]> for ReplySlice {
    fn as_ref(&self) -> &[u8] {
        self.entry.get(self.range.clone()).unwrap_or(&[])
    }
}

/// Why replies are being dropped, for the counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DropReason {
    /// Expired or dead below a floor: not counted.
    Dead,
    /// An invalidation or flush.
    Invalidated,
}

impl Store {
    /// Builds a store with one cache per capped rule and one shared cache.
    ///
    /// # Errors
    ///
    /// [`StoreError::RuleCapsExceedGlobal`] if the rules' caps add up to more
    /// than `max_memory`, [`StoreError::TooManyRules`] past [`MAX_RULES`].
    pub fn new(cfg: StoreConfig) -> Result<Store, StoreError> {
        if cfg.rules.len() > MAX_RULES {
            return Err(StoreError::TooManyRules {
                count: cfg.rules.len(),
            });
        }
        let capped: u64 = cfg
            .rules
            .iter()
            .filter_map(|r| r.max_memory)
            .fold(0u64, u64::saturating_add);
        if capped > cfg.max_memory {
            return Err(StoreError::RuleCapsExceedGlobal {
                rules: capped,
                global: cfg.max_memory,
            });
        }
        let largest = cfg.max_value_size.saturating_add(ENTRY_OVERHEAD);
        let mut caches = vec![L1Cache::new(cfg.max_memory - capped, largest)?];
        let mut rules = Vec::with_capacity(cfg.rules.len());
        for rule in cfg.rules {
            let cache = match rule.max_memory {
                Some(cap) => {
                    caches.push(L1Cache::new(cap, largest)?);
                    caches.len() - 1
                }
                None => 0,
            };
            rules.push(RuleSlot {
                name: rule.name,
                cache,
                counters: Counters::default(),
                stale: 0,
            });
        }
        Ok(Store {
            caches,
            rules,
            marks: Arc::new(Marks::new()),
            hasher: DefaultHashBuilder::default(),
            base: Instant::now(),
            max_value_size: cfg.max_value_size,
            epoch: AtomicU64::new(0),
            all_floor: AtomicU64::new(0),
            db_floors: std::array::from_fn(|_| AtomicU64::new(0)),
            holders: parking_lot::Mutex::new(0),
            watches: Arc::default(),
            stale_floor: AtomicU64::new(0),
            any_stale: false,
            last_distrust: AtomicU64::new(0),
        })
    }

    /// L1 hit: the reply bytes, if present and not expired (lazy expiry: an
    /// expired variant is removed on access). Counts a hit or a miss for
    /// `rule`; an unknown rule is a miss that counts nothing.
    pub fn get(&self, rule: usize, key: &[u8], variant: &Variant, now: Instant) -> Option<Bytes> {
        self.get_with(rule, key, &[variant.as_ref()], now, |_| ())
            .map(|(hit, ())| Bytes::from_owner(hit))
    }

    /// The hit path: finds the first of `variants` that is cached and hands
    /// `f` the reply in place, without copying or allocating (`f` may clone
    /// it to share the entry, e.g. for a large reply). Counts one hit or one
    /// miss for `rule` in all. Returns the reply and what `f` returned.
    pub fn get_with<R>(
        &self,
        rule: usize,
        key: &[u8],
        variants: &[VariantRef<'_>],
        now: Instant,
        f: impl FnOnce(&ReplySlice) -> R,
    ) -> Option<(ReplySlice, R)> {
        let slot = self.rules.get(rule)?;
        let found = self.lookup(slot.cache, key, variants, now);
        let counter = if found.is_some() {
            &slot.counters.hits
        } else {
            &slot.counters.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        let hit = found?;
        let out = f(&hit);
        Some((hit, out))
    }

    /// The first of `variants` cached for `key`, found with one hash
    /// lookup.
    fn lookup(
        &self,
        cache: usize,
        key: &[u8],
        variants: &[VariantRef<'_>],
        now: Instant,
    ) -> Option<ReplySlice> {
        let all = self.all_floor.load(Ordering::SeqCst);
        if all == SUSPENDED {
            return None;
        }
        let cache_index = cache;
        let cache = self.caches.get(cache)?;
        let hash = self.hash_key(key);
        let entry = cache.cache.get(&hash)?;
        let (view, record) = find_variant(&entry, key, variants)?;
        let now = self.nanos(now);
        if view.born >= self.floor(all, record.db) && record.expires > now {
            let slice = record.slice_of();
            return Some(slice(entry));
        }
        drop(entry);
        self.compact(cache_index, hash, Some(now), DropReason::Dead);
        None
    }

    /// Marks `key` as being filled (the placeholder) and returns the token
    /// [`Store::finish_fill`] needs, or `None` while caching is suspended.
    /// Call it before sending the upstream read.
    pub fn begin_fill(&self, key: &[u8]) -> Option<FillToken> {
        // Read the epoch before the suspension flag: a suspend that lands in
        // between has already bumped the epoch past `born`, and resume sets
        // the floor above it, so such a token can never insert.
        let born = self.epoch.load(Ordering::SeqCst);
        if self.all_floor.load(Ordering::SeqCst) == SUSPENDED {
            return None;
        }
        let hash = self.hash_key(key);
        let mark_id = self.marks.begin(hash);
        Some(FillToken {
            marks: Arc::clone(&self.marks),
            key: key.into(),
            hash,
            mark_id,
            born,
            armed: true,
        })
    }

    /// Inserts the reply only if no invalidation of the token's key (and no
    /// flush of the variant's db) happened since [`Store::begin_fill`];
    /// returns whether it was inserted. Replies larger than `max_value_size`
    /// are not cached. `expires_at` = now + min(rule ttl, upstream remaining
    /// TTL), computed by the caller. Other variants of the key stay; the
    /// oldest make room if the key has [`MAX_VARIANTS`] or outgrows its
    /// cache shard.
    pub fn finish_fill(
        &self,
        token: FillToken,
        rule: usize,
        variant: Variant,
        reply: Bytes,
        expires_at: Instant,
    ) -> bool {
        self.finish_fill_timed(token, rule, variant, reply, expires_at, Timing::default())
    }

    /// [`Store::finish_fill`], keeping how the reply was read for
    /// refresh-ahead ([`Store::refresh_due`]).
    pub fn finish_fill_timed(
        &self,
        mut token: FillToken,
        rule: usize,
        variant: Variant,
        reply: Bytes,
        expires_at: Instant,
        timing: Timing,
    ) -> bool {
        // Every early return leaves the token armed, so its Drop releases
        // the mark; only the main path releases it under the lock.
        if !Arc::ptr_eq(&token.marks, &self.marks) || reply.len() as u64 > self.max_value_size {
            return false;
        }
        let Some(slot) = self.rules.get(rule) else {
            return false;
        };
        let Ok(rule_id) = u16::try_from(rule) else {
            return false;
        };
        let Some(cache) = self.caches.get(slot.cache) else {
            return false;
        };
        let (proto, request, request_rest) = match split_key_arg(&variant.request, &token.key) {
            Some((command, rest)) => (variant.proto.as_u8() | KEY_ELIDED, command, rest),
            None => (variant.proto.as_u8(), &variant.request[..], &[][..]),
        };
        let new = NewRecord {
            db: variant.db,
            proto,
            expires: self.nanos(expires_at),
            timing,
            request,
            request_rest,
            reply: &reply,
        };
        let hash = token.hash;
        let mut marks = self.marks.shard(hash).lock();
        token.armed = false;
        if !marks.release(hash, token.mark_id) {
            return false;
        }
        // The entry is stamped with the epoch its fill began at, not the
        // current one: a flush that bumped the epoch but has not raised its
        // floor yet would otherwise let a reply read before it outlive it.
        let mut born = token.born;
        let all = self.all_floor.load(Ordering::SeqCst);
        if token.born < self.floor(all, variant.db) {
            return false;
        }
        let old = cache.cache.peek(&hash);
        let mut kept = Vec::new();
        if let Some(view) = old.as_deref().and_then(EntryView::parse) {
            if view.key == &token.key[..] && usize::from(view.rule) == rule {
                kept.extend(
                    view.records()
                        .filter(|r| {
                            !r.is(&token.key, variant.as_ref())
                                && view.born >= self.floor(all, r.db)
                        })
                        .map(|r| r.span),
                );
                if !kept.is_empty() {
                    // One stamp covers every record: the older one.
                    born = born.min(view.born);
                }
            }
        }
        // Make room: the oldest variants go first.
        let mut weight = (ENTRY_HEADER + token.key.len() + new.len()) as u64
            + ENTRY_OVERHEAD
            + kept.iter().map(|r| r.len() as u64).sum::<u64>();
        let mut first = 0;
        while first < kept.len()
            && (weight > cache.max_entry_weight || kept.len() - first + 1 > MAX_VARIANTS)
        {
            weight -= kept[first].len() as u64;
            first += 1;
        }
        if weight > cache.max_entry_weight {
            return false;
        }
        let old_buf = old.as_deref().unwrap_or(&[]);
        let Some(entry) = encode_entry(
            rule_id,
            born,
            &token.key,
            old_buf,
            &kept[first..],
            Some(&new),
        ) else {
            return false;
        };
        self.account_add(&entry);
        let evicted = cache.cache.insert_with_lifecycle(hash, Arc::clone(&entry));
        drop(marks);
        if first > 0 {
            slot.counters
                .evictions
                .fetch_add(first as u64, Ordering::Relaxed);
        }
        drop(old);
        self.settle(evicted, Some(&entry), hash)
    }

    /// Drops every variant of `key` in every db (Redis tracking is not
    /// per-db) and cancels in-flight fills of it. Returns whether any cached
    /// reply was dropped.
    pub fn invalidate(&self, key: &[u8]) -> bool {
        let hash = self.hash_key(key);
        let mut removed = Vec::new();
        {
            let mut marks = self.marks.shard(hash).lock();
            marks.map.remove(&hash);
            // A key lives in one cache, but which one depends on its rule,
            // which the invalidation does not know: ask them all.
            for cache in &self.caches {
                let same_key = |v: &Arc<[u8]>| EntryView::parse(v).is_some_and(|e| e.key == key);
                if let Some((_, entry)) = cache.cache.remove_if(&hash, same_key) {
                    removed.push(entry);
                }
            }
        }
        self.watches.fire(hash);
        for entry in &removed {
            self.account_drop(entry, DropReason::Invalidated);
        }
        !removed.is_empty()
    }

    /// For a write whose value the writer caches itself (write-through,
    /// `dispatch::writes`): drops the token's key and cancels every other
    /// fill of it, exactly as [`Store::invalidate`] does, and in the same
    /// step (under the key's mark lock) hands the token's claim on to
    /// `count` tokens of a fresh fill generation. Nothing comes back when
    /// anything invalidated the key since `token` began: an invalidation
    /// that raced the write cancels it. The new tokens keep the original's
    /// start, so a flush since then still cancels them. Keep the removal in
    /// step with [`Store::invalidate`].
    pub fn renew_fill(&self, mut token: FillToken, count: usize) -> Vec<FillToken> {
        let hash = token.hash;
        let mut removed = Vec::new();
        let mut renewed = Vec::new();
        {
            let mut marks = self.marks.shard(hash).lock();
            let current = Arc::ptr_eq(&token.marks, &self.marks)
                && marks.map.get(&hash).is_some_and(|m| m.id == token.mark_id);
            marks.map.remove(&hash);
            // The mark is gone either way: nothing left to release.
            token.armed = false;
            for cache in &self.caches {
                let key = &token.key[..];
                let same_key = |v: &Arc<[u8]>| EntryView::parse(v).is_some_and(|e| e.key == key);
                if let Some((_, entry)) = cache.cache.remove_if(&hash, same_key) {
                    removed.push(entry);
                }
            }
            if current && count > 0 {
                marks.next_id += 1;
                let id = marks.next_id;
                let inflight = u32::try_from(count).unwrap_or(u32::MAX);
                marks.map.insert(hash, Mark { id, inflight });
                renewed = (0..count)
                    .map(|_| FillToken {
                        marks: Arc::clone(&self.marks),
                        key: token.key.clone(),
                        hash,
                        mark_id: id,
                        born: token.born,
                        armed: true,
                    })
                    .collect();
            }
        }
        self.watches.fire(hash);
        for entry in &removed {
            self.account_drop(entry, DropReason::Invalidated);
        }
        renewed
    }

    /// Drops everything and cancels all in-flight fills (`FLUSHALL`, or a
    /// lost invalidation link).
    pub fn flush_all(&self) {
        let epoch = self.bump_epoch();
        self.stale_floor.fetch_max(epoch, Ordering::SeqCst);
        self.all_floor.fetch_max(epoch, Ordering::SeqCst);
        self.marks.clear();
        self.watches.fire_all();
        self.drop_all(DropReason::Invalidated);
    }

    /// Drops the variants read in `db` (`FLUSHDB`, `SWAPDB`) and cancels the
    /// in-flight fills of that db; other dbs keep their entries and fills.
    /// Dbs from 63 up share one floor, so flushing one of them flushes all
    /// of them. The db's entries stop being served at once; their memory is
    /// reclaimed by the next [`Store::sweep`], which a flush does not run
    /// itself: a client sending `FLUSHDB` in a loop must not make tierd scan
    /// the whole store each time.
    pub fn flush_db(&self, db: u32) {
        let epoch = self.bump_epoch();
        if let Some(floor) = self.db_floors.get(db_slot(db)) {
            floor.fetch_max(epoch, Ordering::SeqCst);
        }
        self.watches.fire_all();
    }

    /// A watch on `key`: it completes whenever the store hears that the
    /// key changed (an invalidation of it, a flush, a suspension, a pattern
    /// invalidation). See [`super::watch`].
    pub fn watch(&self, key: &[u8]) -> super::watch::Watch {
        self.watches.watch(self.hash_key(key))
    }

    /// Suspends caching while invalidations cannot be trusted (`holder`'s
    /// link is down, lagging or overflowed): drops everything, cancels
    /// in-flight fills, and until every holder has called [`Store::resume`]
    /// every `get` misses and [`Store::begin_fill`] returns `None`, so all
    /// reads go upstream.
    pub fn suspend(&self, holder: Holder) {
        let mut holders = self.holders.lock();
        *holders |= holder.bit();
        self.all_floor.store(SUSPENDED, Ordering::SeqCst);
        let epoch = self.bump_epoch();
        self.last_distrust.fetch_max(epoch, Ordering::SeqCst);
        self.marks.clear();
        drop(holders);
        self.watches.fire_all();
        if self.any_stale {
            // Replies of rules with a stale_ttl stay, to be served only
            // while the circuit breaker is open; the rest go.
            self.sweep_with(None, DropReason::Invalidated);
        } else {
            self.drop_all(DropReason::Invalidated);
        }
    }

    /// Ends `holder`'s suspension; call it once its link is trusted again.
    /// The store serves again when no other holder keeps it suspended.
    /// Fills begun before this call are still rejected. Does nothing if
    /// the store is not suspended.
    pub fn resume(&self, holder: Holder) {
        let mut holders = self.holders.lock();
        *holders &= !holder.bit();
        if *holders != 0 {
            return;
        }
        let epoch = self.bump_epoch();
        // Only from suspended: otherwise this would kill every live entry.
        let resumed = self
            .all_floor
            .compare_exchange(SUSPENDED, epoch, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok();
        drop(holders);
        if resumed {
            self.retire_stale();
        }
    }

    /// The link (or connection) lost at the last [`Store::distrust`] or
    /// [`Store::suspend`] is back: what was kept for stale serving then
    /// goes. Redis no longer tracks those keys for tierd, so a change to
    /// one would never be reported; they were worth keeping only through
    /// the outage, which is over.
    pub fn retire_stale(&self) {
        if !self.any_stale {
            return;
        }
        let distrusted = self.last_distrust.load(Ordering::SeqCst);
        if self.stale_floor.fetch_max(distrusted, Ordering::SeqCst) < distrusted {
            self.sweep_with(None, DropReason::Dead);
        }
    }

    /// Stops serving everything cached so far, because a change to any of
    /// it may go unreported (a connection whose reads Redis tracked was
    /// lost), and cancels in-flight fills; unlike [`Store::flush_all`],
    /// replies of rules with a stale_ttl stay, to be served only while the
    /// circuit breaker is open.
    pub fn distrust(&self) {
        let epoch = self.bump_epoch();
        self.last_distrust.fetch_max(epoch, Ordering::SeqCst);
        self.all_floor.fetch_max(epoch, Ordering::SeqCst);
        self.marks.clear();
        self.watches.fire_all();
        if self.any_stale {
            self.sweep_with(None, DropReason::Invalidated);
        } else {
            self.drop_all(DropReason::Invalidated);
        }
    }

    /// Keeps replies of `rule` for `stale` past their expiry, to be served
    /// by [`Store::get_stale`] while upstream is unavailable. Set while
    /// building the store.
    pub fn set_stale_ttl(&mut self, rule: usize, stale: Duration) {
        if let Some(slot) = self.rules.get_mut(rule) {
            slot.stale = u64::try_from(stale.as_nanos()).unwrap_or(u64::MAX);
            self.any_stale |= slot.stale > 0;
        }
    }

    /// The stale-serving lookup, for when upstream is unavailable (the
    /// circuit breaker is open): like [`Store::get_with`], but a reply past
    /// its expiry, within its rule's stale_ttl, is served too, and so is
    /// one kept through a suspension. Nothing flushed or invalidated is.
    /// Counts a stale serve (not a hit or miss) when found.
    pub fn get_stale<R>(
        &self,
        rule: usize,
        key: &[u8],
        variants: &[VariantRef<'_>],
        now: Instant,
        f: impl FnOnce(&ReplySlice) -> R,
    ) -> Option<(ReplySlice, R)> {
        let slot = self.rules.get(rule)?;
        if slot.stale == 0 {
            return None;
        }
        let cache = self.caches.get(slot.cache)?;
        let entry = cache.cache.peek(&self.hash_key(key))?;
        let (view, record) = find_variant(&entry, key, variants)?;
        if !self.stale_kept(&view, &record, Some(self.nanos(now))) {
            return None;
        }
        let slice = record.slice_of();
        let hit = slice(entry);
        slot.counters.stale_serves.fetch_add(1, Ordering::Relaxed);
        let out = f(&hit);
        Some((hit, out))
    }

    /// Whether a record may still be served stale at `now` (any time, for
    /// `None`): its rule keeps stale replies, it is within that stale_ttl
    /// of its expiry, and no flush (or end of a suspension) came after it.
    fn stale_kept(&self, view: &EntryView<'_>, record: &Record<'_>, now: Option<u64>) -> bool {
        let Some(slot) = self.rules.get(usize::from(view.rule)) else {
            return false;
        };
        if slot.stale == 0 {
            return false;
        }
        let floor = self.floor(self.stale_floor.load(Ordering::SeqCst), record.db);
        // Never past the key's own expiry in Redis: the key is gone then.
        let key_gone = match record.key_left_ms {
            NO_KEY_EXPIRY => u64::MAX,
            ms => record
                .expires
                .saturating_add(u64::from(ms).saturating_mul(1_000_000)),
        };
        let until = record.expires.saturating_add(slot.stale).min(key_gone);
        view.born >= floor && now.map_or(true, |n| until > n)
    }

    /// Drops every key `matches` accepts (a pattern invalidation) and
    /// cancels all in-flight fills: one begun before a key was deleted
    /// upstream may not be in the store yet, and which key a fill is for
    /// is not kept. Returns how many keys had a reply dropped (replies kept
    /// for stale serving included: none may outlive the pattern). Walks
    /// every entry like [`Store::sweep`], one shard lock at a time.
    pub fn invalidate_matching(&self, mut matches: impl FnMut(&[u8]) -> bool) -> u64 {
        self.marks.clear();
        self.watches.fire_all();
        let mut doomed: Vec<Box<[u8]>> = Vec::new();
        // Every stored entry, live or not (kept for stale serving, or
        // while suspended): none may outlive the pattern.
        for cache in &self.caches {
            for (_, entry) in cache.cache.iter() {
                if let Some(view) = EntryView::parse(&entry) {
                    if matches(view.key) {
                        doomed.push(view.key.into());
                    }
                }
            }
        }
        doomed.sort_unstable();
        doomed.dedup();
        doomed.iter().filter(|key| self.invalidate(key)).count() as u64
    }

    /// Whether the store is suspended.
    pub fn is_suspended(&self) -> bool {
        self.all_floor.load(Ordering::SeqCst) == SUSPENDED
    }

    /// Drops the variants that expired by `now` (and any left dead by a
    /// flush); returns how many. The periodic sweep task calls it; lookups
    /// also drop expired variants as they meet them. Scans every entry but
    /// holds a shard lock for one entry at a time; `benches/l1.rs` prints
    /// the cost per entry, which is mostly a cache miss on the entry.
    pub fn sweep(&self, now: Instant) -> usize {
        self.sweep_with(Some(self.nanos(now)), DropReason::Dead)
    }

    /// Per rule, in rule order: name, hits, misses, entries, bytes, evictions
    /// and invalidations.
    pub fn stats(&self) -> Vec<RuleStats> {
        self.rules
            .iter()
            .map(|r| RuleStats {
                name: r.name.clone(),
                hits: r.counters.hits.load(Ordering::Relaxed),
                misses: r.counters.misses.load(Ordering::Relaxed),
                entries: r.counters.entries.load(Ordering::Relaxed),
                bytes: r.counters.bytes.load(Ordering::Relaxed),
                evictions: r.counters.evictions.load(Ordering::Relaxed),
                invalidations: r.counters.invalidations.load(Ordering::Relaxed),
                coalesced: r.counters.coalesced.load(Ordering::Relaxed),
                lease_grants: r.counters.lease_grants.load(Ordering::Relaxed),
                lease_waits: r.counters.lease_waits.load(Ordering::Relaxed),
                lease_wakeups: r.counters.lease_wakeups.load(Ordering::Relaxed),
                lease_timeouts: r.counters.lease_timeouts.load(Ordering::Relaxed),
                refreshes: r.counters.refreshes.load(Ordering::Relaxed),
                stale_serves: r.counters.stale_serves.load(Ordering::Relaxed),
            })
            .collect()
    }

    /// Whether a hit should refresh its entry in the background under
    /// `policy`: it comes after `ratio` of the entry's life, or XFetch says
    /// so, given `uniform`, a random number in (0, 1]. An entry filled
    /// without [`Timing`] never refreshes.
    pub fn refresh_due(
        &self,
        hit: &ReplySlice,
        now: Instant,
        policy: crate::config::RefreshAhead,
        uniform: f64,
    ) -> bool {
        if hit.life_ms == 0 {
            return false;
        }
        let now = self.nanos(now);
        let life = u64::from(hit.life_ms) * 1_000_000;
        match policy {
            crate::config::RefreshAhead::Ratio(ratio) => {
                let left = hit.expires.saturating_sub(now);
                // Past `ratio` of the life: less than (1 - ratio) of it left.
                (left as f64) < life as f64 * (1.0 - ratio)
            }
            crate::config::RefreshAhead::XFetch { beta } => {
                let delta = u64::from(hit.fetch_us).max(1) as f64 * 1000.0;
                let early = delta * beta * -uniform.max(f64::MIN_POSITIVE).ln();
                now as f64 + early >= hit.expires as f64
            }
        }
    }

    /// Counts a stampede-protection event for `rule`.
    pub fn note(&self, rule: usize, event: Event) {
        let Some(slot) = self.rules.get(rule) else {
            return;
        };
        let c = &slot.counters;
        let counter = match event {
            Event::Coalesced => &c.coalesced,
            Event::LeaseGrant => &c.lease_grants,
            Event::LeaseWait => &c.lease_waits,
            Event::LeaseWakeup => &c.lease_wakeups,
            Event::LeaseTimeout => &c.lease_timeouts,
            Event::Refresh => &c.refreshes,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether the fill `token` marks could still insert for `db`: nothing
    /// invalidated its key or flushed the db since it began. For readers
    /// deciding whether to share that fill's reply.
    pub fn fill_current(&self, token: &FillMark, db: u32) -> bool {
        let current = {
            let shard = self.marks.shard(token.hash).lock();
            shard
                .map
                .get(&token.hash)
                .is_some_and(|m| m.id == token.mark_id)
        };
        current && token.born >= self.floor(self.all_floor.load(Ordering::SeqCst), db)
    }

    /// Bytes charged across all caches, overhead included.
    pub fn weight(&self) -> u64 {
        self.caches.iter().map(|c| c.cache.weight()).sum()
    }

    fn hash_key(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    fn nanos(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX)
    }

    fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The lowest entry epoch still alive in `db`, given the global floor.
    fn floor(&self, all: u64, db: u32) -> u64 {
        let db_floor = self
            .db_floors
            .get(db_slot(db))
            .map_or(0, |f| f.load(Ordering::SeqCst));
        all.max(db_floor)
    }

    fn counters(&self, rule: u16) -> Option<&Counters> {
        self.rules.get(usize::from(rule)).map(|r| &r.counters)
    }

    fn account_add(&self, entry: &[u8]) {
        if let Some(view) = EntryView::parse(entry) {
            if let Some(c) = self.counters(view.rule) {
                c.entries
                    .fetch_add(u64::from(view.count), Ordering::Relaxed);
                c.bytes.fetch_add(entry_weight(entry), Ordering::Relaxed);
            }
        }
    }

    /// Un-charges an entry that left the cache; returns its rule and count.
    fn account_sub(&self, entry: &[u8]) -> Option<(&Counters, u64)> {
        let view = EntryView::parse(entry)?;
        let c = self.counters(view.rule)?;
        let count = u64::from(view.count);
        c.entries.fetch_sub(count, Ordering::Relaxed);
        c.bytes.fetch_sub(entry_weight(entry), Ordering::Relaxed);
        Some((c, count))
    }

    fn account_drop(&self, entry: &[u8], reason: DropReason) -> u64 {
        match self.account_sub(entry) {
            Some((c, count)) => {
                if reason == DropReason::Invalidated {
                    c.invalidations.fetch_add(count, Ordering::Relaxed);
                }
                count
            }
            None => 0,
        }
    }

    /// Accounts for what quick_cache pushed out during an insert of `hash`:
    /// the replaced old entry of the same key, evictions of other keys, or
    /// the inserted entry itself if it was rejected as too heavy. Returns
    /// whether `inserted` was admitted.
    fn settle(
        &self,
        evicted: Vec<(u64, Arc<[u8]>)>,
        inserted: Option<&Arc<[u8]>>,
        hash: u64,
    ) -> bool {
        let mut admitted = true;
        for (key, entry) in evicted {
            let sub = self.account_sub(&entry);
            if inserted.is_some_and(|i| Arc::ptr_eq(i, &entry)) {
                admitted = false;
            } else if key != hash {
                if let Some((c, count)) = sub {
                    c.evictions.fetch_add(count, Ordering::Relaxed);
                }
            }
        }
        admitted
    }

    /// Empties every cache. Drains one entry per shard-lock acquisition,
    /// and accounts for and frees it outside the lock, so lookups never wait
    /// for a whole flush.
    fn drop_all(&self, reason: DropReason) {
        for cache in &self.caches {
            for (_, entry) in cache.cache.drain() {
                self.account_drop(&entry, reason);
            }
        }
    }

    /// Drops dead variants everywhere: below their db's floor, or expired if
    /// `now` is given. The scan takes a shard's read lock for one entry at a
    /// time, so lookups and fills wait for one entry at most, never for a
    /// whole scan; entries with a dead variant are then rewritten or removed
    /// one by one.
    fn sweep_with(&self, now: Option<u64>, reason: DropReason) -> usize {
        let mut dropped = 0;
        for (index, cache) in self.caches.iter().enumerate() {
            for (hash, entry) in cache.cache.iter() {
                let all = self.all_floor.load(Ordering::SeqCst);
                let Some(view) = EntryView::parse(&entry) else {
                    continue;
                };
                let all_kept = view.records().all(|r| self.is_kept(&view, &r, all, now));
                if !all_kept {
                    dropped += self.compact(index, hash, now, reason);
                }
            }
        }
        dropped
    }

    fn is_live(
        &self,
        view: &EntryView<'_>,
        record: &Record<'_>,
        all: u64,
        now: Option<u64>,
    ) -> bool {
        view.born >= self.floor(all, record.db) && now.map_or(true, |n| record.expires > n)
    }

    /// Whether a record stays in memory: live, or kept for stale serving.
    fn is_kept(
        &self,
        view: &EntryView<'_>,
        record: &Record<'_>,
        all: u64,
        now: Option<u64>,
    ) -> bool {
        self.is_live(view, record, all, now) || self.stale_kept(view, record, now)
    }

    /// Rewrites the entry at `hash` without its dead variants (removing it if
    /// none is left); returns how many variants were dropped. Takes the
    /// key's mark lock so that it cannot resurrect an entry an invalidation
    /// just removed.
    fn compact(&self, cache: usize, hash: u64, now: Option<u64>, reason: DropReason) -> usize {
        let Some(cache) = self.caches.get(cache) else {
            return 0;
        };
        let marks = self.marks.shard(hash).lock();
        let Some(old) = cache.cache.peek(&hash) else {
            return 0;
        };
        let Some(view) = EntryView::parse(&old) else {
            return 0;
        };
        let all = self.all_floor.load(Ordering::SeqCst);
        let kept: Vec<Range<usize>> = view
            .records()
            .filter(|r| self.is_kept(&view, r, all, now))
            .map(|r| r.span)
            .collect();
        let dropped = usize::from(view.count).saturating_sub(kept.len());
        if dropped == 0 {
            return 0;
        }
        if kept.is_empty() {
            let removed = cache.cache.remove_if(&hash, |v| Arc::ptr_eq(v, &old));
            drop(marks);
            if let Some((_, entry)) = removed {
                self.account_drop(&entry, reason);
            }
            return dropped;
        }
        // The surviving variants keep the entry's epoch: they are exactly as
        // fresh as before.
        let Some(entry) = encode_entry(view.rule, view.born, view.key, &old, &kept, None) else {
            return 0;
        };
        self.account_add(&entry);
        let evicted = cache.cache.insert_with_lifecycle(hash, Arc::clone(&entry));
        drop(marks);
        if reason == DropReason::Invalidated {
            if let Some(c) = self.counters(view.rule) {
                c.invalidations.fetch_add(dropped as u64, Ordering::Relaxed);
            }
        }
        self.settle(evicted, Some(&entry), hash);
        dropped
    }

    /// Visits the keys that have at least one live cached reply at `now`, in
    /// no particular order, until `f` returns `false` (`CACHE.KEYS`).
    /// Read-only: counts nothing and leaves eviction state alone. Like
    /// [`Store::sweep`], the walk holds a shard's lock for one entry at a
    /// time, so lookups and fills never wait for it; keys cached or dropped
    /// while it runs may or may not be seen. Nothing is visited while the
    /// store is suspended.
    pub fn for_each_key(&self, now: Instant, mut f: impl FnMut(&[u8]) -> bool) {
        let all = self.all_floor.load(Ordering::SeqCst);
        if all == SUSPENDED {
            return;
        }
        let now = self.nanos(now);
        for cache in &self.caches {
            for (_, entry) in cache.cache.iter() {
                let Some(view) = EntryView::parse(&entry) else {
                    continue;
                };
                let live = view
                    .records()
                    .any(|r| self.is_live(&view, &r, all, Some(now)));
                if live && !f(view.key) {
                    return;
                }
            }
        }
    }

    /// What L1 holds for `key` at `now` (`CACHE.INSPECT`): its rule, the
    /// entry's charged bytes and each live variant. `None` when no live reply
    /// is cached for it. Read-only like [`Store::for_each_key`]: no hit or
    /// miss is counted, and the entry is not made hotter for eviction.
    pub fn inspect(&self, key: &[u8], now: Instant) -> Option<EntryInfo> {
        let all = self.all_floor.load(Ordering::SeqCst);
        if all == SUSPENDED {
            return None;
        }
        let now = self.nanos(now);
        let hash = self.hash_key(key);
        // Which cache holds the key depends on its rule, which the caller
        // need not know: look in each, as `invalidate` does.
        for cache in &self.caches {
            let Some(entry) = cache.cache.peek(&hash) else {
                continue;
            };
            let Some(view) = EntryView::parse(&entry) else {
                continue;
            };
            if view.key != key {
                continue;
            }
            let variants: Vec<VariantInfo> = view
                .records()
                .filter(|r| self.is_live(&view, r, all, Some(now)))
                .filter_map(|r| {
                    Some(VariantInfo {
                        db: r.db,
                        proto: match r.proto & !KEY_ELIDED {
                            3 => Proto::Resp3,
                            _ => Proto::Resp2,
                        },
                        args: stored_args(&r, key)?,
                        ttl: std::time::Duration::from_nanos(r.expires.saturating_sub(now)),
                        size: r.reply.len(),
                        framed: entry
                            .get(r.reply.clone())
                            .is_some_and(crate::cache::compress::is_framed_bulk),
                    })
                })
                .collect();
            if variants.is_empty() {
                return None;
            }
            return Some(EntryInfo {
                rule: usize::from(view.rule),
                bytes: entry_weight(&entry),
                variants,
            });
        }
        None
    }
}

/// A record's request as arguments: the stored canonical encoding, with
/// the key put back when it was elided. `None` if the bytes do not decode,
/// which only a bug could cause.
fn stored_args(record: &Record<'_>, key: &[u8]) -> Option<Vec<Bytes>> {
    let mut args = Vec::new();
    let mut rest = record.request;
    while !rest.is_empty() {
        let (len, at) = read_varint(rest)?;
        let end = at.checked_add(len)?;
        args.push(Bytes::copy_from_slice(rest.get(at..end)?));
        rest = rest.get(end..)?;
        if args.len() == 1 && record.proto & KEY_ELIDED != 0 {
            args.push(Bytes::copy_from_slice(key));
        }
    }
    Some(args)
}

fn db_slot(db: u32) -> usize {
    (db as usize).min(DB_SLOTS - 1)
}

impl L1Cache {
    fn new(capacity: u64, largest: u64) -> Result<L1Cache, StoreError> {
        // As many shards as quick_cache would use, but few enough that each
        // holds a handful of the largest replies: a shard never admits an
        // entry heavier than ~97% of its capacity.
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
        let by_size = capacity / largest.saturating_mul(4).max(1);
        let shards = prev_power_of_two((cpus * 4).min(by_size).max(1));
        let items = (capacity / ESTIMATED_ENTRY_WEIGHT).max(1);
        let options = OptionsBuilder::new()
            .shards(shards as usize)
            .estimated_items_capacity(items as usize)
            .weight_capacity(capacity)
            .build()
            .map_err(|e| StoreError::CacheOptions(e.to_string()))?;
        let cache = Cache::with_options(
            options,
            EntryWeighter,
            BuildHasherDefault::default(),
            Collect,
        );
        let max_entry_weight =
            ((cache.shard_capacity() as f64 * HOT_ALLOCATION) as u64).saturating_sub(1);
        Ok(L1Cache {
            cache,
            max_entry_weight,
        })
    }
}

fn prev_power_of_two(n: u64) -> u64 {
    if n == 0 {
        1
    } else {
        1 << (63 - n.leading_zeros())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOUR: Duration = Duration::from_secs(3600);

    fn rule(name: &str, max_memory: Option<u64>) -> RuleCap {
        RuleCap {
            name: name.to_string(),
            max_memory,
        }
    }

    /// A 16 MB store with rule 0 shared ("users") and rule 1 capped at 1 MB
    /// ("images").
    fn store() -> Store {
        Store::new(StoreConfig {
            max_memory: 16 << 20,
            max_value_size: 64 << 10,
            rules: vec![rule("users", None), rule("images", Some(1 << 20))],
        })
        .unwrap()
    }

    fn get_var(key: &str) -> Variant {
        Variant::from_args(
            0,
            Proto::Resp2,
            &[
                Bytes::from_static(b"GET"),
                Bytes::copy_from_slice(key.as_bytes()),
            ],
        )
    }

    fn fill(
        s: &Store,
        rule: usize,
        key: &str,
        variant: &Variant,
        reply: &str,
        expires: Instant,
    ) -> bool {
        let token = s.begin_fill(key.as_bytes()).unwrap();
        s.finish_fill(
            token,
            rule,
            variant.clone(),
            Bytes::copy_from_slice(reply.as_bytes()),
            expires,
        )
    }

    fn get(s: &Store, rule: usize, key: &str, variant: &Variant, now: Instant) -> Option<String> {
        s.get(rule, key.as_bytes(), variant, now)
            .map(|b| String::from_utf8(b.to_vec()).unwrap())
    }

    /// The per-rule byte counters must always equal what the caches hold.
    fn assert_accounting(s: &Store) {
        let stats = s.stats();
        let counted: u64 = stats.iter().map(|r| r.bytes).sum();
        assert_eq!(
            counted,
            s.weight(),
            "stats bytes vs cache weight: {stats:?}"
        );
    }

    #[test]
    fn store_and_token_cross_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Store>();
        send_sync::<FillToken>();
    }

    /// Whether rule 0 serves `key`'s `GET` stale at `now`.
    fn stale_at(s: &Store, key: &str, now: Instant) -> bool {
        s.get_stale(0, key.as_bytes(), &[get_var(key).as_ref()], now, |_| ())
            .is_some()
    }

    /// A store whose rule 0 keeps stale replies for an hour, with `GET
    /// key` of each of `keys` cached for rule 0.
    fn stale_store(keys: &[&str], now: Instant) -> Store {
        let mut s = store();
        s.set_stale_ttl(0, Duration::from_secs(3600));
        for key in keys {
            assert!(fill(&s, 0, key, &get_var(key), key, now + HOUR));
        }
        s
    }

    /// A hit's slice, for `refresh_due`.
    fn hit(s: &Store, key: &str, variant: &Variant, now: Instant) -> ReplySlice {
        s.get_with(0, key.as_bytes(), &[variant.as_ref()], now, |_| ())
            .unwrap()
            .0
    }

    #[test]
    fn refresh_ahead_by_ratio_uses_the_life_kept_with_the_reply() {
        let s = store();
        let t0 = Instant::now();
        let v = get_var("k");
        let token = s.begin_fill(b"k").unwrap();
        let timing = Timing {
            life: Duration::from_secs(10),
            fetch: Duration::from_millis(2),
            key_expiry: None,
        };
        let reply = Bytes::from_static(b"$1\r\nx\r\n");
        assert!(s.finish_fill_timed(token, 0, v.clone(), reply, t0 + timing.life, timing));
        let ratio = crate::config::RefreshAhead::Ratio(0.8);
        let at = |secs: f64| t0 + Duration::from_secs_f64(secs);
        let slice = hit(&s, "k", &v, t0);
        assert!(!s.refresh_due(&slice, at(1.0), ratio, 0.5));
        assert!(!s.refresh_due(&slice, at(7.9), ratio, 0.5));
        assert!(s.refresh_due(&slice, at(8.1), ratio, 0.5));
        // Other variants keep their own timing; a fill without one never
        // refreshes.
        let w = Variant::from_args(
            0,
            Proto::Resp3,
            &[Bytes::from_static(b"GET"), Bytes::from_static(b"k")],
        );
        assert!(fill(&s, 0, "k", &w, "y", t0 + Duration::from_secs(10)));
        let slice = hit(&s, "k", &w, t0);
        assert!(!s.refresh_due(&slice, at(9.9), ratio, 0.5));
        let slice = hit(&s, "k", &v, at(8.5));
        assert!(s.refresh_due(&slice, at(8.5), ratio, 0.5));
    }

    #[test]
    fn refresh_ahead_by_xfetch_comes_earlier_for_slow_reads_and_unlucky_draws() {
        let s = store();
        let t0 = Instant::now();
        let life = Duration::from_secs(10);
        let policy = crate::config::RefreshAhead::XFetch { beta: 1.0 };
        for (key, fetch) in [
            ("fast", Duration::from_millis(1)),
            ("slow", Duration::from_secs(1)),
        ] {
            let v = get_var(key);
            let token = s.begin_fill(key.as_bytes()).unwrap();
            let reply = Bytes::from_static(b"$1\r\nx\r\n");
            assert!(s.finish_fill_timed(
                token,
                0,
                v,
                reply,
                t0 + life,
                Timing {
                    life,
                    fetch,
                    key_expiry: None
                }
            ));
        }
        let fast = hit(&s, "fast", &get_var("fast"), t0);
        let slow = hit(&s, "slow", &get_var("slow"), t0);
        let at = t0 + Duration::from_secs(8);
        // -ln(0.5) ≈ 0.69: 0.69 ms early for the fast read, 0.69 s for the
        // slow one; 2 s before expiry neither is due.
        assert!(!s.refresh_due(&fast, at, policy, 0.5));
        assert!(!s.refresh_due(&slow, at, policy, 0.5));
        // -ln(0.01) ≈ 4.6: the slow read's 4.6 s reaches past the expiry.
        assert!(s.refresh_due(&slow, at, policy, 0.01));
        assert!(!s.refresh_due(&fast, at, policy, 0.01));
        // Past the expiry minus nothing, any draw refreshes.
        let late = t0 + Duration::from_millis(9_999);
        assert!(s.refresh_due(&fast, late, policy, 1.0) || s.refresh_due(&fast, late, policy, 0.1));
    }

    #[test]
    fn stale_replies_are_kept_past_ttl_within_stale_ttl_and_the_keys_own_expiry() {
        let mut s = store();
        s.set_stale_ttl(0, Duration::from_secs(100));
        let t0 = Instant::now();
        let at = |secs: u64| t0 + Duration::from_secs(secs);
        let reply = Bytes::from_static(b"$1\r\nx\r\n");
        let stale = stale_at;
        let timed = |key_expiry| Timing {
            life: Duration::from_secs(10),
            fetch: Duration::ZERO,
            key_expiry,
        };
        // "a": no expiry in Redis; "b": its key expires 5 s after its ttl.
        for (key, key_expiry) in [("a", None), ("b", Some(Duration::from_secs(5)))] {
            let token = s.begin_fill(key.as_bytes()).unwrap();
            let v = get_var(key);
            assert!(s.finish_fill_timed(token, 0, v, reply.clone(), at(10), timed(key_expiry)));
        }
        // Past the ttl: no hit, but kept, sweeps included.
        assert_eq!(get(&s, 0, "a", &get_var("a"), at(14)), None);
        s.sweep(at(14));
        assert!(stale(&s, "b", at(14)));
        assert!(!stale(&s, "b", at(16)), "served past its key's own expiry");
        assert!(stale(&s, "a", at(20)));
        assert!(stale(&s, "a", at(109)));
        assert!(!stale(&s, "a", at(111)), "served past stale_ttl");
        s.sweep(at(111));
        assert_eq!(s.stats()[0].entries, 0);
        assert_eq!(s.stats()[0].stale_serves, 3);
        // A rule without stale_ttl keeps nothing.
        assert!(fill(&s, 1, "c", &get_var("c"), "y", at(10)));
        assert!(s
            .get_stale(1, b"c", &[get_var("c").as_ref()], at(11), |_| ())
            .is_none());
    }

    #[test]
    fn a_lost_link_keeps_stale_replies_and_invalidations_and_flushes_end_them() {
        let now = Instant::now();
        let s = stale_store(&["a", "b", "c"], now);
        let stale = |s: &Store, key: &str| stale_at(s, key, now);
        assert!(fill(&s, 1, "other", &get_var("other"), "o", now + HOUR));
        s.suspend(Holder::Tracking);
        assert_eq!(get(&s, 0, "a", &get_var("a"), now), None);
        assert!(stale(&s, "a"), "a suspension keeps stale replies");
        assert_eq!(s.stats()[1].entries, 0, "other rules' replies go");
        s.invalidate(b"b");
        assert!(!stale(&s, "b"), "an invalidation ends a stale reply");
        s.distrust();
        assert!(stale(&s, "c"), "nor does a lost connection");
        s.flush_all();
        assert!(!stale(&s, "a") && !stale(&s, "c"), "a flush does");
    }

    #[test]
    fn kept_replies_retire_once_the_lost_link_is_back_and_patterns_reach_them() {
        let now = Instant::now();
        let s = stale_store(&["user:1", "user:2", "post:1"], now);
        let stale = |s: &Store, key: &str| stale_at(s, key, now);
        s.distrust();
        assert!(stale(&s, "user:1") && stale(&s, "post:1"));
        assert_eq!(s.invalidate_matching(|k| k.starts_with(b"user:")), 2);
        assert!(!stale(&s, "user:1") && !stale(&s, "user:2"));
        assert!(stale(&s, "post:1"), "what the pattern does not match stays");
        // A reply filled after the loss is tracked again: it stays.
        assert!(fill(&s, 0, "post:2", &get_var("post:2"), "p", now + HOUR));
        s.retire_stale();
        assert!(
            !stale(&s, "post:1"),
            "kept through the loss, retired when it is over"
        );
        assert!(stale(&s, "post:2"));
        assert_eq!(s.stats()[0].entries, 1);
        // The same for a suspension, retired by the resume.
        s.suspend(Holder::Bus);
        assert!(stale(&s, "post:2"));
        s.resume(Holder::Bus);
        assert!(!stale(&s, "post:2"));
    }

    #[test]
    fn fill_current_ends_with_an_invalidation_or_a_flush_of_its_db() {
        let s = store();
        let token = s.begin_fill(b"k").unwrap();
        let mark = token.mark();
        assert!(s.fill_current(&mark, 0));
        s.invalidate(b"other");
        assert!(s.fill_current(&mark, 0));
        s.flush_db(3);
        assert!(s.fill_current(&mark, 0));
        assert!(!s.fill_current(&mark, 3));
        s.invalidate(b"k");
        assert!(!s.fill_current(&mark, 0));
        drop(token);
        let token = s.begin_fill(b"k").unwrap();
        let mark = token.mark();
        s.flush_all();
        assert!(!s.fill_current(&mark, 0));
    }

    #[test]
    fn stampede_events_are_counted_per_rule() {
        let s = store();
        for event in [
            Event::Coalesced,
            Event::LeaseGrant,
            Event::LeaseWait,
            Event::LeaseWait,
            Event::LeaseWakeup,
            Event::LeaseTimeout,
            Event::Refresh,
        ] {
            s.note(1, event);
        }
        s.note(9, Event::Refresh);
        let stats = s.stats();
        assert_eq!(stats[0].lease_waits, 0);
        let r = &stats[1];
        assert_eq!(
            (
                r.coalesced,
                r.lease_grants,
                r.lease_waits,
                r.lease_wakeups,
                r.lease_timeouts,
                r.refreshes
            ),
            (1, 1, 2, 1, 1, 1)
        );
    }

    #[tokio::test]
    async fn watches_wake_on_their_key_and_on_flushes() {
        let s = store();
        let w = s.watch(b"k");
        s.invalidate(b"k");
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap();
        s.invalidate(b"other");
        assert!(tokio::time::timeout(Duration::from_millis(50), w.changed())
            .await
            .is_err());
        s.flush_db(4);
        tokio::time::timeout(Duration::from_secs(5), w.changed())
            .await
            .unwrap();
    }

    #[test]
    fn hit_after_fill_and_miss_before() {
        let s = store();
        let now = Instant::now();
        let v = get_var("user:1");
        assert_eq!(get(&s, 0, "user:1", &v, now), None);
        assert!(fill(&s, 0, "user:1", &v, "$3\r\nbob\r\n", now + HOUR));
        assert_eq!(
            get(&s, 0, "user:1", &v, now).as_deref(),
            Some("$3\r\nbob\r\n")
        );
        assert_eq!(get(&s, 0, "user:2", &get_var("user:2"), now), None);
        let st = &s.stats()[0];
        assert_eq!((st.hits, st.misses, st.entries), (1, 2, 1));
        assert_eq!(st.name, "users");
        assert_eq!(st.bytes, s.weight());
        assert!(s.marks.is_empty());
        // An unknown rule is a miss that counts nothing and never panics.
        assert_eq!(get(&s, 9, "user:1", &v, now), None);
        assert!(!fill(&s, 9, "user:1", &v, "x", now + HOUR));
        assert!(s.marks.is_empty());
    }

    #[test]
    fn variant_encoding_is_canonical() {
        let a = |args: &[&[u8]]| {
            let args: Vec<Bytes> = args.iter().map(|a| Bytes::copy_from_slice(a)).collect();
            Variant::from_args(0, Proto::Resp2, &args)
        };
        assert_eq!(a(&[b"GET", b"k"]), a(&[b"get", b"k"]));
        // Only the command name is case-folded.
        assert_ne!(a(&[b"get", b"K"]), a(&[b"get", b"k"]));
        assert_ne!(a(&[b"hget", b"a", b"bc"]), a(&[b"hget", b"ab", b"c"]));
        assert_eq!(&a(&[b"GET", b"k"]).request[..], b"\x03get\x01k");
        let long = vec![b'x'; 300];
        let req = a(&[b"get", &long]).request;
        assert_eq!(&req[..6], b"\x03get\xac\x02");
        assert_eq!(req.len(), 6 + 300);
    }

    #[test]
    fn variants_are_isolated_by_db_proto_and_args() {
        let s = store();
        let now = Instant::now();
        let key = "user:1";
        let args = |cmd: &'static [u8], extra: &'static [&'static [u8]]| {
            let mut v = vec![Bytes::from_static(cmd), Bytes::from_static(b"user:1")];
            v.extend(extra.iter().map(|e| Bytes::from_static(e)));
            v
        };
        let variants = [
            Variant::from_args(0, Proto::Resp2, &args(b"GET", &[])),
            Variant::from_args(1, Proto::Resp2, &args(b"GET", &[])),
            Variant::from_args(0, Proto::Resp3, &args(b"GET", &[])),
            Variant::from_args(0, Proto::Resp2, &args(b"GETRANGE", &[b"0", b"1"])),
            Variant::from_args(0, Proto::Resp2, &args(b"GETRANGE", &[b"0", b"2"])),
            // The key not first: stored whole rather than without the key.
            Variant::from_args(
                0,
                Proto::Resp2,
                &[
                    Bytes::from_static(b"EXISTS"),
                    Bytes::from_static(b"x"),
                    Bytes::from_static(b"user:1"),
                ],
            ),
            // Not a canonical encoding at all (the caller's business): still
            // a distinct variant.
            Variant {
                db: 0,
                proto: Proto::Resp2,
                request: Bytes::from_static(b"\xff\xff"),
            },
            // The stored form of `GET user:1` without its key: must not be
            // confused with it.
            Variant {
                db: 0,
                proto: Proto::Resp2,
                request: Bytes::from_static(b"\x03get"),
            },
        ];
        for (i, v) in variants.iter().enumerate() {
            for w in &variants[i..] {
                assert_eq!(get(&s, 0, key, w, now), None, "{i}");
            }
            assert!(fill(&s, 0, key, v, &format!("reply{i}"), now + HOUR));
        }
        for (i, v) in variants.iter().enumerate() {
            assert_eq!(get(&s, 0, key, v, now), Some(format!("reply{i}")));
        }
        assert_eq!(s.stats()[0].entries, variants.len() as u64);
        // Refilling a variant replaces it rather than adding one.
        assert!(fill(&s, 0, key, &variants[2], "again", now + HOUR));
        assert_eq!(get(&s, 0, key, &variants[2], now).as_deref(), Some("again"));
        assert_eq!(s.stats()[0].entries, variants.len() as u64);
        assert_accounting(&s);
    }

    #[test]
    fn invalidate_drops_all_variants_in_all_dbs() {
        let s = store();
        let now = Instant::now();
        let v0 = get_var("k");
        let v5 = Variant {
            db: 5,
            ..get_var("k")
        };
        let v3 = Variant {
            proto: Proto::Resp3,
            ..get_var("k")
        };
        for v in [&v0, &v5, &v3] {
            assert!(fill(&s, 0, "k", v, "x", now + HOUR));
        }
        assert!(fill(&s, 0, "other", &get_var("other"), "y", now + HOUR));
        assert!(fill(&s, 1, "img", &get_var("img"), "z", now + HOUR));

        assert!(s.invalidate(b"k"));
        for v in [&v0, &v5, &v3] {
            assert_eq!(get(&s, 0, "k", v, now), None);
        }
        assert!(!s.invalidate(b"k"), "nothing left to drop");
        assert_eq!(
            get(&s, 0, "other", &get_var("other"), now).as_deref(),
            Some("y")
        );
        // A key in a rule's own cache is found without knowing the rule.
        assert!(s.invalidate(b"img"));
        assert_eq!(get(&s, 1, "img", &get_var("img"), now), None);
        let st = s.stats();
        assert_eq!((st[0].entries, st[0].invalidations), (1, 3));
        assert_eq!((st[1].entries, st[1].invalidations), (0, 1));
        assert_accounting(&s);
    }

    #[test]
    fn flush_db_drops_only_that_db() {
        let s = store();
        let now = Instant::now();
        let db = |db: u32, key: &str| Variant { db, ..get_var(key) };
        assert!(fill(&s, 0, "a", &db(0, "a"), "a0", now + HOUR));
        assert!(fill(&s, 0, "a", &db(2, "a"), "a2", now + HOUR));
        assert!(fill(&s, 0, "b", &db(2, "b"), "b2", now + HOUR));
        assert!(fill(&s, 1, "c", &db(0, "c"), "c0", now + HOUR));
        // A fill of db 2 in flight across the flush is cancelled; one of db 0
        // is not.
        let t2 = s.begin_fill(b"d").unwrap();
        let t0 = s.begin_fill(b"e").unwrap();

        s.flush_db(2);
        assert_eq!(get(&s, 0, "a", &db(2, "a"), now), None);
        assert_eq!(get(&s, 0, "b", &db(2, "b"), now), None);
        assert_eq!(get(&s, 0, "a", &db(0, "a"), now).as_deref(), Some("a0"));
        assert_eq!(get(&s, 1, "c", &db(0, "c"), now).as_deref(), Some("c0"));
        assert!(!s.finish_fill(t2, 0, db(2, "d"), Bytes::from_static(b"d"), now + HOUR));
        assert!(s.finish_fill(t0, 0, db(0, "e"), Bytes::from_static(b"e"), now + HOUR));
        // Hidden at once, reclaimed when next read (as above) or by the
        // next sweep, which count them as dead, not invalidated: they cannot
        // tell a flushed variant from an expired one without more
        // bookkeeping.
        s.sweep(now);
        let st = s.stats();
        assert_eq!(st[0].entries, 2, "{st:?}");
        assert_accounting(&s);
        // Fills begun after the flush cache normally.
        assert!(fill(&s, 0, "b", &db(2, "b"), "new", now + HOUR));
        assert_eq!(get(&s, 0, "b", &db(2, "b"), now).as_deref(), Some("new"));
        assert!(s.marks.is_empty());
    }

    /// `flush_db` bumps the epoch, then raises the floor. A fill that
    /// finishes in between sees the old floor and inserts; stamped with the
    /// epoch its fill began at, its entry still dies with the floor.
    #[test]
    fn a_fill_finishing_inside_a_db_flush_dies_with_it() {
        let s = store();
        let now = Instant::now();
        let t = s.begin_fill(b"k").unwrap();
        let epoch = s.bump_epoch();
        assert!(s.finish_fill(t, 0, get_var("k"), Bytes::from_static(b"old"), now + HOUR));
        s.db_floors[0].fetch_max(epoch, Ordering::SeqCst);
        assert_eq!(get(&s, 0, "k", &get_var("k"), now), None);
    }

    #[test]
    fn high_dbs_share_a_floor_conservatively() {
        let s = store();
        let now = Instant::now();
        let db = |db: u32| Variant { db, ..get_var("k") };
        assert!(fill(&s, 0, "k", &db(100), "x", now + HOUR));
        assert!(fill(&s, 0, "k", &db(7), "y", now + HOUR));
        s.flush_db(200);
        assert_eq!(get(&s, 0, "k", &db(100), now), None);
        assert_eq!(get(&s, 0, "k", &db(7), now).as_deref(), Some("y"));
    }

    #[test]
    fn flush_all_drops_everything_and_cancels_fills() {
        let s = store();
        let now = Instant::now();
        assert!(fill(&s, 0, "a", &get_var("a"), "a", now + HOUR));
        assert!(fill(&s, 1, "b", &get_var("b"), "b", now + HOUR));
        let t = s.begin_fill(b"c").unwrap();
        s.flush_all();
        assert_eq!(get(&s, 0, "a", &get_var("a"), now), None);
        assert_eq!(get(&s, 1, "b", &get_var("b"), now), None);
        assert!(!s.finish_fill(t, 0, get_var("c"), Bytes::from_static(b"c"), now + HOUR));
        assert_eq!(s.weight(), 0);
        assert_accounting(&s);
        assert!(s.marks.is_empty());
        assert!(fill(&s, 0, "a", &get_var("a"), "a2", now + HOUR));
        assert_eq!(get(&s, 0, "a", &get_var("a"), now).as_deref(), Some("a2"));
    }

    #[test]
    fn lazy_expiry_removes_on_access() {
        let s = store();
        let t0 = Instant::now();
        let v = get_var("k");
        let w = Variant {
            db: 1,
            ..get_var("k")
        };
        assert!(fill(&s, 0, "k", &v, "short", t0 + Duration::from_secs(10)));
        assert!(fill(&s, 0, "k", &w, "long", t0 + HOUR));
        assert_eq!(
            get(&s, 0, "k", &v, t0 + Duration::from_secs(9)).as_deref(),
            Some("short")
        );
        // Expiry is exclusive: at `expires_at` the entry is gone.
        assert_eq!(get(&s, 0, "k", &v, t0 + Duration::from_secs(10)), None);
        assert_eq!(s.stats()[0].entries, 1, "the expired variant was removed");
        assert_eq!(
            get(&s, 0, "k", &w, t0 + Duration::from_secs(11)).as_deref(),
            Some("long")
        );
        assert_eq!(get(&s, 0, "k", &w, t0 + HOUR), None);
        assert_eq!(s.stats()[0].entries, 0);
        assert_eq!(s.weight(), 0);
        assert_accounting(&s);
    }

    #[test]
    fn sweep_drops_expired_entries_and_variants() {
        let s = store();
        let t0 = Instant::now();
        let secs = |n| t0 + Duration::from_secs(n);
        assert!(fill(&s, 0, "a", &get_var("a"), "a", secs(10)));
        assert!(fill(&s, 1, "b", &get_var("b"), "b", secs(20)));
        assert!(fill(&s, 0, "c", &get_var("c"), "c", secs(10)));
        let c1 = Variant {
            db: 1,
            ..get_var("c")
        };
        assert!(fill(&s, 0, "c", &c1, "c1", secs(30)));

        assert_eq!(s.sweep(secs(5)), 0);
        assert_eq!(s.sweep(secs(10)), 2, "a and c's db-0 variant");
        assert_eq!(s.stats()[0].entries, 1);
        assert_eq!(get(&s, 0, "c", &c1, secs(10)).as_deref(), Some("c1"));
        assert_eq!(
            get(&s, 1, "b", &get_var("b"), secs(10)).as_deref(),
            Some("b")
        );
        assert_accounting(&s);
        assert_eq!(s.sweep(secs(100)), 2);
        assert_eq!(s.weight(), 0);
        assert_accounting(&s);
        let st = s.stats();
        assert_eq!(
            (st[0].evictions, st[0].invalidations),
            (0, 0),
            "expiry is neither"
        );
    }

    #[test]
    fn fill_race_invalidate_between_begin_and_finish_is_rejected() {
        let s = store();
        let now = Instant::now();
        let v = get_var("k");
        let token = s.begin_fill(b"k").unwrap();
        assert!(
            !s.invalidate(b"k"),
            "nothing cached yet, but the fill is cancelled"
        );
        assert!(!s.finish_fill(token, 0, v.clone(), Bytes::from_static(b"old"), now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now), None);
        assert!(s.marks.is_empty());
        // begin → finish with nothing in between is accepted.
        let token = s.begin_fill(b"k").unwrap();
        assert!(s.finish_fill(token, 0, v.clone(), Bytes::from_static(b"new"), now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now).as_deref(), Some("new"));
    }

    #[test]
    fn fill_race_two_concurrent_fills_of_one_key() {
        let s = store();
        let now = Instant::now();
        let v = get_var("k");
        let w = Variant {
            db: 1,
            ..get_var("k")
        };

        // Both in flight when the invalidation lands: both rejected.
        let t1 = s.begin_fill(b"k").unwrap();
        let t2 = s.begin_fill(b"k").unwrap();
        s.invalidate(b"k");
        assert!(!s.finish_fill(t1, 0, v.clone(), Bytes::from_static(b"1"), now + HOUR));
        assert!(!s.finish_fill(t2, 0, w.clone(), Bytes::from_static(b"2"), now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now), None);
        assert_eq!(get(&s, 0, "k", &w, now), None);
        assert!(s.marks.is_empty());

        // One finishes before the invalidation, one after: the first is
        // inserted and then dropped by the invalidation, the second rejected.
        let t1 = s.begin_fill(b"k").unwrap();
        let t2 = s.begin_fill(b"k").unwrap();
        assert!(s.finish_fill(t1, 0, v.clone(), Bytes::from_static(b"1"), now + HOUR));
        assert!(s.invalidate(b"k"));
        assert!(!s.finish_fill(t2, 0, w.clone(), Bytes::from_static(b"2"), now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now), None);
        assert_eq!(get(&s, 0, "k", &w, now), None);

        // A fill begun after the invalidation is not confused with an older
        // one: the old token is rejected, the new one accepted.
        let old = s.begin_fill(b"k").unwrap();
        s.invalidate(b"k");
        let new = s.begin_fill(b"k").unwrap();
        assert!(!s.finish_fill(old, 0, v.clone(), Bytes::from_static(b"old"), now + HOUR));
        assert!(s.finish_fill(new, 0, v.clone(), Bytes::from_static(b"new"), now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now).as_deref(), Some("new"));
        assert!(s.marks.is_empty());
    }

    #[test]
    fn dropped_token_releases_its_mark() {
        let s = store();
        let now = Instant::now();
        drop(s.begin_fill(b"k").unwrap());
        assert!(s.marks.is_empty());

        let t1 = s.begin_fill(b"k").unwrap();
        let t2 = s.begin_fill(b"k").unwrap();
        drop(t1);
        assert!(!s.marks.is_empty(), "t2 still fills");
        assert!(s.finish_fill(t2, 0, get_var("k"), Bytes::from_static(b"v"), now + HOUR));
        assert!(s.marks.is_empty());

        // An old token dropped after an invalidation leaves the new fill's
        // mark alone.
        let old = s.begin_fill(b"k").unwrap();
        s.invalidate(b"k");
        let new = s.begin_fill(b"k").unwrap();
        drop(old);
        assert!(s.finish_fill(new, 0, get_var("k"), Bytes::from_static(b"v"), now + HOUR));
        assert!(s.marks.is_empty());

        // Rejected finishes release too.
        let t = s.begin_fill(b"big").unwrap();
        assert!(!s.finish_fill(
            t,
            0,
            get_var("big"),
            Bytes::from(vec![0u8; 100 << 10]),
            now + HOUR
        ));
        let t = s.begin_fill(b"k").unwrap();
        assert!(!s.finish_fill(t, 42, get_var("k"), Bytes::from_static(b"v"), now + HOUR));
        assert!(s.marks.is_empty());

        // A token from another store is refused and released in its own.
        let other = store();
        let t = other.begin_fill(b"k").unwrap();
        assert!(!s.finish_fill(t, 0, get_var("k"), Bytes::from_static(b"v"), now + HOUR));
        assert!(other.marks.is_empty());
    }

    #[test]
    fn suspend_flushes_and_stops_caching_until_resume() {
        let s = store();
        let now = Instant::now();
        let v = get_var("k");
        assert!(fill(&s, 0, "k", &v, "x", now + HOUR));
        let before = s.begin_fill(b"j").unwrap();

        s.suspend(Holder::Tracking);
        assert!(s.is_suspended());
        assert_eq!(get(&s, 0, "k", &v, now), None);
        assert!(s.begin_fill(b"k").is_none());
        assert_eq!(s.weight(), 0);
        assert_accounting(&s);

        s.resume(Holder::Tracking);
        assert!(!s.is_suspended());
        // A fill begun before the suspension is still rejected after it.
        assert!(!s.finish_fill(
            before,
            0,
            get_var("j"),
            Bytes::from_static(b"j"),
            now + HOUR
        ));
        assert_eq!(get(&s, 0, "k", &v, now), None);
        assert!(fill(&s, 0, "k", &v, "y", now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now).as_deref(), Some("y"));
        // Resume without a suspension keeps the cache.
        s.resume(Holder::Bus);
        assert_eq!(get(&s, 0, "k", &v, now).as_deref(), Some("y"));
        assert!(s.marks.is_empty());
    }

    #[test]
    fn the_store_serves_again_only_when_every_holder_resumed() {
        let s = store();
        let now = Instant::now();
        let v = get_var("k");
        s.suspend(Holder::Tracking);
        s.suspend(Holder::Bus);
        s.resume(Holder::Tracking);
        assert!(s.is_suspended(), "the bus still holds it");
        assert!(s.begin_fill(b"k").is_none());
        s.resume(Holder::Bus);
        assert!(!s.is_suspended());
        assert!(fill(&s, 0, "k", &v, "x", now + HOUR));
        assert_eq!(get(&s, 0, "k", &v, now).as_deref(), Some("x"));
    }

    #[test]
    fn invalidate_matching_drops_matching_keys_and_cancels_fills() {
        let s = store();
        let now = Instant::now();
        for k in ["user:1", "user:2", "other"] {
            assert!(fill(&s, 0, k, &get_var(k), "x", now + HOUR));
        }
        let in_flight = s.begin_fill(b"unrelated").unwrap();
        let dropped = s.invalidate_matching(|k| k.starts_with(b"user:"));
        assert_eq!(dropped, 2);
        assert_eq!(get(&s, 0, "user:1", &get_var("user:1"), now), None);
        assert_eq!(get(&s, 0, "user:2", &get_var("user:2"), now), None);
        assert_eq!(
            get(&s, 0, "other", &get_var("other"), now).as_deref(),
            Some("x")
        );
        assert!(!s.finish_fill(
            in_flight,
            0,
            get_var("unrelated"),
            Bytes::from_static(b"v"),
            now + HOUR
        ));
        assert_accounting(&s);
    }

    #[test]
    fn replies_over_max_value_size_are_not_cached() {
        let s = store();
        let now = Instant::now();
        let v = get_var("k");
        let at_limit = Bytes::from(vec![b'x'; 64 << 10]);
        let t = s.begin_fill(b"k").unwrap();
        assert!(s.finish_fill(t, 0, v.clone(), at_limit.clone(), now + HOUR));
        assert_eq!(s.get(0, b"k", &v, now), Some(at_limit));
        s.invalidate(b"k");
        let t = s.begin_fill(b"k").unwrap();
        assert!(!s.finish_fill(
            t,
            0,
            v.clone(),
            Bytes::from(vec![b'x'; (64 << 10) + 1]),
            now + HOUR
        ));
        assert_eq!(s.get(0, b"k", &v, now), None);
    }

    #[test]
    fn per_rule_cap_is_enforced() {
        let s = store();
        let now = Instant::now();
        let cap = 1u64 << 20;
        let reply = vec![b'r'; 200];
        let mut largest = 0;
        for i in 0..20_000 {
            let key = format!("img:{i}");
            let t = s.begin_fill(key.as_bytes()).unwrap();
            s.finish_fill(t, 1, get_var(&key), Bytes::from(reply.clone()), now + HOUR);
            largest = largest.max(s.caches[1].cache.weight());
        }
        let one_entry = 16 + 9 + 21 + 15 + 200 + ENTRY_OVERHEAD;
        assert!(largest <= cap + one_entry, "{largest} > {cap}");
        let st = s.stats();
        assert!(st[1].evictions > 10_000, "{st:?}");
        assert!(st[1].entries > 1000, "{st:?}");
        assert_eq!(st[1].bytes, s.caches[1].cache.weight());
        assert_eq!(st[0].entries, 0, "the shared cache is untouched");
        assert_accounting(&s);
        // The most recent entries are still served.
        let key = "img:19999";
        assert!(s.get(1, key.as_bytes(), &get_var(key), now).is_some());
    }

    #[test]
    fn many_variants_of_one_key_are_bounded() {
        let s = store();
        let now = Instant::now();
        for i in 0..100u32 {
            let v = Variant {
                db: i,
                ..get_var("h")
            };
            assert!(fill(&s, 0, "h", &v, &format!("{i}"), now + HOUR));
        }
        assert_eq!(s.stats()[0].entries, MAX_VARIANTS as u64);
        assert_eq!(s.stats()[0].evictions, 100 - MAX_VARIANTS as u64);
        // The newest survive.
        let newest = Variant {
            db: 99,
            ..get_var("h")
        };
        assert_eq!(get(&s, 0, "h", &newest, now).as_deref(), Some("99"));
        let oldest = Variant {
            db: 0,
            ..get_var("h")
        };
        assert_eq!(get(&s, 0, "h", &oldest, now), None);
        assert_accounting(&s);
    }

    #[test]
    fn rule_caps_beyond_the_global_cap_are_rejected() {
        let err = Store::new(StoreConfig {
            max_memory: 100,
            max_value_size: 10,
            rules: vec![rule("a", Some(60)), rule("b", None), rule("c", Some(50))],
        })
        .unwrap_err();
        assert_eq!(
            err,
            StoreError::RuleCapsExceedGlobal {
                rules: 110,
                global: 100
            }
        );
        assert!(err.to_string().contains("raise [l1] max_memory"), "{err}");
        // Exactly at the cap is fine; the shared cache is then empty and
        // caches nothing.
        let s = Store::new(StoreConfig {
            max_memory: 100 << 10,
            max_value_size: 1 << 10,
            rules: vec![
                rule("a", Some(60 << 10)),
                rule("b", None),
                rule("c", Some(40 << 10)),
            ],
        })
        .unwrap();
        let now = Instant::now();
        assert!(!fill(&s, 1, "k", &get_var("k"), "v", now + HOUR));
        assert!(fill(&s, 0, "k", &get_var("k"), "v", now + HOUR));
        assert!(s.marks.is_empty());
    }

    /// 4 threads race random gets, fills, "writes" (bump the upstream
    /// value, then invalidate) and rare flushes over a few keys. A fill reads the upstream
    /// value after `begin_fill`, as dispatch will. The coherence invariant:
    /// once a write's invalidation has returned, no get serves an older
    /// value. At the end, invalidating every key leaves nothing served,
    /// nothing charged and no marks.
    #[test]
    fn stress_concurrent_get_fill_invalidate() {
        use std::sync::atomic::AtomicU64;
        const KEYS: usize = 16;
        let s = Store::new(StoreConfig {
            max_memory: 64 << 10,
            max_value_size: 1 << 10,
            rules: vec![rule("a", None), rule("b", Some(16 << 10))],
        })
        .unwrap();
        let upstream: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
        let delivered: Vec<AtomicU64> = (0..KEYS).map(|_| AtomicU64::new(0)).collect();
        let now = Instant::now();
        let key = |i: usize| format!("k{i}");
        let rule_of = |i: usize| i % 2;
        let variant = |i: usize, db: u32| Variant {
            db,
            ..get_var(&key(i))
        };
        std::thread::scope(|scope| {
            for t in 0..4u64 {
                let (s, upstream, delivered) = (&s, &upstream, &delivered);
                scope.spawn(move || {
                    let mut rng = t.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
                    for _ in 0..50_000 {
                        rng ^= rng << 13;
                        rng ^= rng >> 7;
                        rng ^= rng << 17;
                        let i = (rng >> 8) as usize % KEYS;
                        let db = (rng >> 20) as u32 % 3;
                        match (rng >> 32) % 1000 {
                            0..=599 => {
                                let floor = delivered[i].load(Ordering::SeqCst);
                                if let Some(b) =
                                    s.get(rule_of(i), key(i).as_bytes(), &variant(i, db), now)
                                {
                                    let seen: u64 =
                                        std::str::from_utf8(&b).unwrap().parse().unwrap();
                                    assert!(
                                        seen >= floor,
                                        "stale: saw {seen}, invalidated up to {floor}"
                                    );
                                }
                            }
                            600..=899 => {
                                let Some(token) = s.begin_fill(key(i).as_bytes()) else {
                                    continue;
                                };
                                let value = upstream[i].load(Ordering::SeqCst);
                                if (rng >> 40) % 8 == 0 {
                                    drop(token);
                                    continue;
                                }
                                let reply = Bytes::from(value.to_string());
                                s.finish_fill(token, rule_of(i), variant(i, db), reply, now + HOUR);
                            }
                            900..=997 => {
                                let v = upstream[i].fetch_add(1, Ordering::SeqCst) + 1;
                                s.invalidate(key(i).as_bytes());
                                delivered[i].fetch_max(v, Ordering::SeqCst);
                            }
                            // FLUSHALL: every key changes, one flush covers them.
                            _ => {
                                let vs: Vec<u64> = upstream
                                    .iter()
                                    .map(|u| u.fetch_add(1, Ordering::SeqCst) + 1)
                                    .collect();
                                s.flush_all();
                                for (d, v) in delivered.iter().zip(vs) {
                                    d.fetch_max(v, Ordering::SeqCst);
                                }
                            }
                        }
                    }
                });
            }
        });
        assert!(s.marks.is_empty(), "every fill released its mark");
        assert_accounting(&s);
        for i in 0..KEYS {
            s.invalidate(key(i).as_bytes());
        }
        for i in 0..KEYS {
            for db in 0..3 {
                assert_eq!(
                    s.get(rule_of(i), key(i).as_bytes(), &variant(i, db), now),
                    None
                );
            }
        }
        assert_eq!(s.weight(), 0);
        let st = s.stats();
        assert!(st.iter().all(|r| r.entries == 0 && r.bytes == 0), "{st:?}");
        assert!(
            st.iter().all(|r| r.hits > 0),
            "the test exercised hits: {st:?}"
        );
    }

    #[test]
    fn for_each_key_visits_live_keys_only_and_stops_when_asked() {
        let s = store();
        let now = Instant::now();
        for (rule, key) in [(0, "user:1"), (0, "user:2"), (1, "img:1")] {
            assert!(fill(
                &s,
                rule,
                key,
                &get_var(key),
                "$1\r\nx\r\n",
                now + HOUR
            ));
        }
        // Expires before `now + 1s`: not listed, though not swept yet.
        assert!(fill(
            &s,
            0,
            "user:old",
            &get_var("user:old"),
            "$1\r\nx\r\n",
            now + Duration::from_millis(10)
        ));
        let later = now + Duration::from_secs(1);
        let mut keys = Vec::new();
        s.for_each_key(later, |k| {
            keys.push(String::from_utf8(k.to_vec()).unwrap());
            true
        });
        keys.sort();
        assert_eq!(keys, ["img:1", "user:1", "user:2"]);

        let mut seen = 0;
        s.for_each_key(later, |_| {
            seen += 1;
            seen < 2
        });
        assert_eq!(seen, 2, "stops at the first false");

        let before = s.stats();
        s.for_each_key(later, |_| true);
        assert_eq!(s.stats(), before, "counts nothing");

        s.suspend(Holder::Bus);
        s.for_each_key(later, |_| panic!("nothing is live while suspended"));
    }

    #[test]
    fn inspect_shows_each_live_variant_with_its_ttl_and_size() {
        let s = store();
        let now = Instant::now();
        let get = get_var("img:1");
        let usage = Variant::from_args(
            2,
            Proto::Resp3,
            &[
                Bytes::from_static(b"MEMORY"),
                Bytes::from_static(b"USAGE"),
                Bytes::from_static(b"img:1"),
            ],
        );
        let range = Variant::from_args(
            0,
            Proto::Resp2,
            &[
                Bytes::from_static(b"getrange"),
                Bytes::from_static(b"img:1"),
                Bytes::from_static(b"0"),
                Bytes::from_static(b"-1"),
            ],
        );
        assert!(fill(&s, 1, "img:1", &get, "$3\r\npng\r\n", now + HOUR));
        assert!(fill(&s, 1, "img:1", &usage, ":72\r\n", now + 2 * HOUR));
        assert!(fill(
            &s,
            1,
            "img:1",
            &range,
            "$3\r\npng\r\n",
            now + Duration::from_millis(5)
        ));
        let at = now + Duration::from_secs(60);
        let info = s.inspect(b"img:1", at).unwrap();
        assert_eq!(info.rule, 1);
        assert_eq!(info.bytes, s.stats()[1].bytes, "the one entry's charge");
        let args = |v: &VariantInfo| {
            v.args
                .iter()
                .map(|a| String::from_utf8(a.to_vec()).unwrap())
                .collect::<Vec<_>>()
        };
        // The expired GETRANGE is left out.
        assert_eq!(info.variants.len(), 2, "{info:?}");
        let (g, u) = (&info.variants[0], &info.variants[1]);
        assert_eq!(args(g), ["get", "img:1"], "the elided key is put back");
        assert_eq!((g.db, g.proto, g.size), (0, Proto::Resp2, 9));
        assert_eq!(g.ttl, HOUR - Duration::from_secs(60));
        assert_eq!(args(u), ["memory", "USAGE", "img:1"]);
        assert_eq!((u.db, u.proto, u.size), (2, Proto::Resp3, 5));
        assert_eq!(u.ttl, 2 * HOUR - Duration::from_secs(60));

        let before = s.stats();
        assert!(s.inspect(b"img:2", at).is_none());
        assert!(s.inspect(b"img:1", now + 3 * HOUR).is_none(), "all expired");
        assert_eq!(s.stats(), before, "counts nothing");
        s.invalidate(b"img:1");
        assert!(s.inspect(b"img:1", at).is_none());
    }
}
