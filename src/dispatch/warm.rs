//! Warming: loading keys into L1 before clients ask for them, and the hot
//! sets that tell a starting instance which keys those should be.
//!
//! - **Runs.** A rule with `warm` is warmed when tierd starts (in the
//!   background, while it already serves), every `interval`, and on
//!   `CACHE.WARM`. A run loads up to the rule's `limit` keys: first (with
//!   `hot`) the members of the rule's hot set in Redis, highest score
//!   first, then (with `scan`) the string keys `SCAN … MATCH <rule glob>
//!   TYPE string` finds. Each key is read with `GET` as a fill like any
//!   other ([`super::stampede::fill_also`]: tracked, with its `PTTL`,
//!   cancelled by an invalidation meanwhile), which fills the RESP2 and the
//!   RESP3 variant at once. All runs together load at most `[warming] rate`
//!   keys a second ([`Pace`]), a `SCAN` page counting as
//!   [`SCAN_PAGE_KEYS`] keys.
//! - **Hot sets.** Every instance counts, per rule with `warm` and `hot`, a
//!   sample of its L1 lookups ([`note_read`], one in [`SAMPLE`], on the hit
//!   path: no lock is waited for and nothing is allocated unless the key is
//!   new to the sample; keys above [`MAX_HOT_KEY_LEN`] bytes are not
//!   counted). Every `[warming] hot_interval`, and once more when
//!   it stops, it adds its hottest `hot_keys` keys since the last time to
//!   the sorted set `{prefix}hot:{rule}` in Redis, with scores that decay
//!   over time ([`HOT_SCRIPT`]), trims it to `hot_keys` members and renews
//!   its expiry. Several instances add to the same set; an instance that
//!   starts later, or this one after a restart, warms from it.
//!
//! This module calls into the L1 store and upstream connections through
//! the same fill path as refresh-ahead; it never touches a session.

use std::cell::Cell;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::stampede::{fill_also, Refresh};
use crate::cache::Variant;
use crate::config::{CompressConfig, Config, WarmConfig};
use crate::protocol::{inspect, reply, Proto};
use crate::session::Ctx;
use crate::upstream::{Conn, UpstreamError};

/// One L1 lookup in this many is counted for the hot sets.
pub(crate) const SAMPLE: u64 = 8;

/// A hot set's scores halve every this long: a key read a lot ten minutes
/// ago weighs half as much as one read as much now.
const HOT_HALF_LIFE: Duration = Duration::from_secs(600);

/// A hot set expires this many `hot_interval`s after its last write, and
/// never sooner than [`HOT_EXPIRY_MIN`]: a fleet that stopped for a while
/// still finds it when it starts again.
const HOT_EXPIRY_INTERVALS: u32 = 10;
const HOT_EXPIRY_MIN: Duration = Duration::from_secs(3600);

/// Members per hot-set write script, per `ZREVRANGE` page, and `COUNT` per
/// `SCAN`: each round trip stays short for Redis.
const PAGE: usize = 1000;

/// Most keys loaded at once by one run.
const MAX_BATCH: usize = 64;

/// What one `SCAN` page (`COUNT` [`PAGE`]) costs against `[warming] rate`,
/// in keys: a tenth of its `COUNT`. Redis walks `COUNT` slots of its table
/// for it (matching each key against the glob and checking its type)
/// whatever it returns, roughly a hundred `GET`s' worth of work; charged
/// like that, a run over a sparse keyspace (many pages, few keys of the
/// rule) is held to the rate as one that loads keys is, instead of walking
/// the whole keyspace as fast as Redis answers.
const SCAN_PAGE_KEYS: usize = PAGE / 10;

/// Keys longer than this are not counted for the hot sets: sampling copies
/// each new key, and the counts hold up to `2 × hot_keys` of them. Hot
/// keys are short in practice; a client reading huge key names must not
/// make the sample hold megabytes.
const MAX_HOT_KEY_LEN: usize = 1024;

/// How often a waiting run checks whether L1 caches again.
const READY_POLL: Duration = Duration::from_millis(10);

/// Adds an instance's counts to a hot set. `KEYS[1]` the set; `ARGV[1]`
/// now, in units of the decay's time constant (`t / τ`, τ = half-life /
/// ln 2); `ARGV[2]` members to keep; `ARGV[3]` the set's expiry in ms; then
/// member and count pairs. A score is the natural log of the member's
/// decayed count, `ln Σ cᵢ·e^(tᵢ/τ)`, so adding `c` at `t` is a log-sum-exp
/// and old counts fade without the set ever being rewritten; scores stay
/// small numbers whatever the clock says. Returns the set's size.
const HOT_SCRIPT: &[u8] = b"local t = tonumber(ARGV[1]) \
for i = 4, #ARGV, 2 do \
local x = math.log(tonumber(ARGV[i + 1])) + t \
local old = redis.call('ZSCORE', KEYS[1], ARGV[i]) \
if old then \
local s = tonumber(old) \
local hi, lo = math.max(s, x), math.min(s, x) \
x = hi + math.log(1 + math.exp(lo - hi)) \
end \
redis.call('ZADD', KEYS[1], x, ARGV[i]) \
end \
redis.call('ZREMRANGEBYRANK', KEYS[1], 0, -tonumber(ARGV[2]) - 1) \
redis.call('PEXPIRE', KEYS[1], ARGV[3]) \
return redis.call('ZCARD', KEYS[1])";

/// Warming's shared state, one per server ([`Ctx`]).
pub(crate) struct Warm {
    /// By rule index: the sampled lookups of each rule with `warm` and
    /// `hot` (while `hot_interval` is not zero).
    hot: Vec<Option<HotCounts>>,
    /// By rule index: `tierd_warm_runs_total` and `tierd_warm_keys_total`
    /// of each rule with `warm`.
    counters: Vec<Option<(::metrics::Counter, ::metrics::Counter)>>,
    /// The pace every run shares.
    pace: Pace,
}

impl Warm {
    /// The state for `config`'s rules, their counters registered in
    /// `metrics` (so they show, at 0, before the first run).
    pub(crate) fn new(config: &Config, metrics: &crate::metrics::Metrics) -> Warm {
        let warming = &config.warming;
        let recording = !warming.hot_interval.is_zero();
        Warm {
            hot: config
                .rules
                .iter()
                .map(|r| match r.warm {
                    Some(w) if w.hot && r.cache && recording => {
                        Some(HotCounts::new(warming.hot_keys))
                    }
                    _ => None,
                })
                .collect(),
            counters: config
                .rules
                .iter()
                .map(|r| {
                    r.warm
                        .filter(|_| r.cache)
                        .map(|_| metrics.warm_counters(&r.name))
                })
                .collect(),
            pace: Pace::new(warming.rate),
        }
    }
}

impl std::fmt::Debug for Warm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Warm")
            .field("hot_rules", &self.hot.iter().flatten().count())
            .finish_non_exhaustive()
    }
}

// ---------------------------------------------------------------------------
// Sampling reads for the hot sets
// ---------------------------------------------------------------------------

/// A rule's sampled lookups since its hot set was last written: a count per
/// key, at most `cap` keys. Once full, keys not in it yet are not counted
/// until the next write empties it: under a skewed load the hot keys are
/// the ones that got in first, and the next interval starts afresh.
struct HotCounts {
    /// Sync lock, never held across an `.await`. The read path only ever
    /// `try_lock`s it: a sample that meets the writer (or another reader)
    /// is dropped rather than waited for.
    counts: Mutex<HashMap<Bytes, u32>>,
    cap: usize,
}

impl HotCounts {
    fn new(hot_keys: usize) -> HotCounts {
        HotCounts {
            counts: Mutex::new(HashMap::new()),
            cap: hot_keys.saturating_mul(2).max(256),
        }
    }

    /// Counts one sampled lookup of `key`. Allocates only for a key the
    /// sample has not seen since the last write. Keys longer than
    /// [`MAX_HOT_KEY_LEN`] are not counted.
    #[cold]
    fn note(&self, key: &[u8]) {
        if key.len() > MAX_HOT_KEY_LEN {
            return;
        }
        let Some(mut counts) = self.counts.try_lock() else {
            return;
        };
        if let Some(n) = counts.get_mut(key) {
            *n = n.saturating_add(1);
        } else if counts.len() < self.cap {
            counts.insert(Bytes::copy_from_slice(key), 1);
        }
    }

    /// The `n` most counted keys since the last call, most counted first,
    /// and a fresh count.
    fn take_top(&self, n: usize) -> Vec<(Bytes, u32)> {
        let counts = std::mem::take(&mut *self.counts.lock());
        top(counts, n)
    }
}

/// The `n` entries with the highest counts, highest first (ties by key, so
/// the order is stable).
fn top(counts: HashMap<Bytes, u32>, n: usize) -> Vec<(Bytes, u32)> {
    let mut all: Vec<(Bytes, u32)> = counts.into_iter().collect();
    all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    all.truncate(n);
    all
}

/// Whether this lookup is one of the sampled ones: one in [`SAMPLE`], by a
/// per-thread xorshift (a plain counter would alias with a client that
/// reads its keys round-robin).
#[inline]
fn sampled() -> bool {
    thread_local! {
        static STATE: Cell<u64> = const { Cell::new(0) };
    }
    STATE.with(|state| {
        let mut x = state.get();
        if x == 0 {
            x = seed();
        }
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        state.set(x);
        x % SAMPLE == 0
    })
}

/// A non-zero per-thread seed.
#[cold]
fn seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x7769_6e64);
    h.finish() | 1
}

/// An L1 lookup of `key` for rule `rule` (hit or miss): counted, one in
/// [`SAMPLE`], towards the rule's hot set. Rules without a hot set cost a
/// bounds check.
#[inline]
pub(crate) fn note_read(ctx: &Ctx, rule: usize, key: &[u8]) {
    if let Some(Some(counts)) = ctx.warm.hot.get(rule) {
        if sampled() {
            counts.note(key);
        }
    }
}

// ---------------------------------------------------------------------------
// Pace
// ---------------------------------------------------------------------------

/// `[warming] rate`, shared by every run: each batch reserves its share of
/// the next second and waits for its turn. Unused time is not saved up, so
/// a run that starts after a quiet hour does not burst.
struct Pace {
    per_key: Duration,
    /// Sync lock, held only to reserve.
    next: Mutex<Instant>,
    /// Keys per batch: at most 20 ms worth, so that a batch is never a
    /// noticeable burst, and at most [`MAX_BATCH`].
    batch: usize,
}

impl Pace {
    fn new(rate: usize) -> Pace {
        let rate = rate.max(1);
        Pace {
            per_key: Duration::from_secs(1) / u32::try_from(rate).unwrap_or(u32::MAX),
            next: Mutex::new(Instant::now()),
            batch: (rate / 50).clamp(1, MAX_BATCH),
        }
    }

    /// When a batch of `n` keys reserved now may start.
    fn reserve(&self, n: usize, now: Instant) -> Instant {
        let mut next = self.next.lock();
        let start = (*next).max(now);
        *next = start + self.per_key * u32::try_from(n).unwrap_or(u32::MAX);
        start
    }

    /// Waits until a batch of `n` keys may go.
    async fn wait(&self, n: usize) {
        let at = self.reserve(n, Instant::now());
        tokio::time::sleep_until(at.into()).await;
    }
}

// ---------------------------------------------------------------------------
// Runs
// ---------------------------------------------------------------------------

/// What started a run, for its log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Trigger {
    /// tierd started.
    Startup,
    /// The rule's `interval` came round.
    Interval,
    /// `CACHE.WARM`.
    Command,
}

impl Trigger {
    /// The log field's value.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Trigger::Startup => "startup",
            Trigger::Interval => "interval",
            Trigger::Command => "command",
        }
    }
}

/// Why a run stopped early.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum WarmError {
    /// Upstream could not answer.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Upstream answered a `SCAN` or `ZREVRANGE` with an error (an ACL
    /// refusal, say): the raw error frame.
    #[error("upstream refused {what}: {}", String::from_utf8_lossy(.frame.get(1..).unwrap_or_default()).trim_end())]
    Refused {
        /// The command.
        what: &'static str,
        /// Redis's error.
        frame: Bytes,
    },
    /// Upstream's reply does not have the expected shape.
    #[error("unexpected reply from upstream to {0}")]
    Unexpected(&'static str),
    /// L1 caches nothing right now: the tracking or bus link is down.
    #[error("L1 is suspended until the tracking and bus links are live")]
    Suspended,
}

impl WarmError {
    /// The client's error reply.
    pub(crate) fn to_resp(&self) -> Bytes {
        match self {
            WarmError::Upstream(e) => e.to_resp(),
            WarmError::Refused { frame, .. } => frame.clone(),
            WarmError::Unexpected(what) => super::error(&format!(
                "ERR upstream unavailable: unexpected reply to {what}"
            )),
            WarmError::Suspended => super::error(
                "TRYAGAIN L1 is suspended until the tracking and bus links are live; \
                 nothing can be warmed now",
            ),
        }
    }
}

/// Whether L1 caches now: fills are allowed once the tracking link (in
/// every mode, the link that reads the command table) is live and no link
/// holds the store suspended.
fn ready(ctx: &Ctx) -> bool {
    ctx.l1
        .as_ref()
        .is_some_and(|l1| !l1.store.is_suspended() && ctx.tracking.is_live())
}

/// Waits until L1 caches ([`ready`]).
async fn until_ready(ctx: &Ctx) {
    while !ready(ctx) {
        tokio::time::sleep(READY_POLL).await;
    }
}

/// The hot set of the rule named `rule`.
pub(crate) fn hot_key(prefix: &str, rule: &str) -> Bytes {
    Bytes::from(format!("{prefix}hot:{rule}"))
}

/// What a run needs of its rule.
struct Target {
    index: usize,
    name: String,
    warm: WarmConfig,
    ttl: Duration,
    compress: Option<CompressConfig>,
    /// The rule's pattern as a plain Redis glob, for `SCAN … MATCH`.
    glob: String,
}

impl Target {
    fn of(ctx: &Ctx, index: usize) -> Option<Target> {
        let rule = ctx.l1.as_ref()?.rules.iter().nth(index)?;
        Some(Target {
            index,
            name: rule.name.clone(),
            warm: rule.warm.filter(|_| rule.cache)?,
            ttl: rule.ttl,
            compress: rule.compress,
            glob: rule.pattern.redis_pattern(),
        })
    }
}

/// One run of one rule.
struct Run<'a> {
    ctx: &'a Arc<Ctx>,
    conn: Conn,
    target: &'a Target,
    /// Keys loaded (cached) so far.
    loaded: usize,
    /// Keys tried so far: the hot set and `SCAN` may name the same key.
    seen: HashSet<Bytes>,
}

impl Run<'_> {
    fn room(&self) -> usize {
        self.target.warm.limit.saturating_sub(self.loaded)
    }

    /// Loads the rule's hot set, highest score first, up to the rule's
    /// `limit` members.
    async fn hot(&mut self) -> Result<(), WarmError> {
        let set = hot_key(&self.ctx.config.invalidation.prefix, &self.target.name);
        let limit = self.target.warm.limit;
        let mut start = 0;
        while start < limit && self.room() > 0 {
            let stop = (start + PAGE).min(limit) - 1;
            let (first, last) = (start.to_string(), stop.to_string());
            let request =
                reply::encode_command(&[b"ZREVRANGE", &set, first.as_bytes(), last.as_bytes()]);
            let frame = self.call(&request, "ZREVRANGE").await?;
            let keys = strings(&frame, "ZREVRANGE")?;
            let full = keys.len() == stop + 1 - start;
            self.load(keys).await?;
            if !full {
                break;
            }
            start = stop + 1;
        }
        Ok(())
    }

    /// Loads string keys matching the rule, walking the keyspace with
    /// `SCAN`, until the rule's `limit` is reached or the walk ends. Each
    /// page is paced too, as [`SCAN_PAGE_KEYS`] keys.
    async fn scan(&mut self) -> Result<(), WarmError> {
        let count = PAGE.to_string();
        let mut cursor = Bytes::from_static(b"0");
        while self.room() > 0 {
            self.ctx.warm.pace.wait(SCAN_PAGE_KEYS).await;
            let request = reply::encode_command(&[
                b"SCAN",
                &cursor,
                b"MATCH",
                self.target.glob.as_bytes(),
                b"COUNT",
                count.as_bytes(),
                b"TYPE",
                b"string",
            ]);
            let frame = self.call(&request, "SCAN").await?;
            let (next, keys) = scan_reply(&frame)?;
            self.load(keys).await?;
            if &next[..] == b"0" {
                break;
            }
            cursor = next;
        }
        Ok(())
    }

    async fn call(&self, request: &[u8], what: &'static str) -> Result<Bytes, WarmError> {
        let frame = self.conn.request(request).await?;
        if inspect::is_error(&frame) {
            return Err(WarmError::Refused { what, frame });
        }
        Ok(frame)
    }

    /// Loads those of `keys` that this rule caches and this run has not
    /// tried yet, a paced batch at a time, until the limit is reached.
    async fn load(&mut self, keys: Vec<Bytes>) -> Result<(), WarmError> {
        let Some(l1) = self.ctx.l1.clone() else {
            return Ok(());
        };
        let prefix = self.ctx.config.invalidation.prefix.as_bytes();
        let index = self.target.index;
        let keys: Vec<Bytes> = keys
            .into_iter()
            .filter(|k| {
                // tierd's own keys (leases, tags, hot sets) are not data,
                // and the first matching rule must be this one: a narrower
                // rule before it (`cache = false`, say) wins.
                (prefix.is_empty() || !k.starts_with(prefix))
                    && l1.rules.find(k).is_some_and(|(i, _)| i == index)
                    && self.seen.insert(k.clone())
            })
            .collect();
        let mut keys = keys.into_iter().peekable();
        while keys.peek().is_some() {
            let n = self.room().min(self.ctx.warm.pace.batch);
            if n == 0 {
                break;
            }
            let batch: Vec<Bytes> = keys.by_ref().take(n).collect();
            self.ctx.warm.pace.wait(batch.len()).await;
            if !ready(self.ctx) {
                return Err(WarmError::Suspended);
            }
            let mut fills = JoinSet::new();
            for key in batch {
                let ctx = self.ctx.clone();
                let (job, resp3) = self.job(key);
                fills.spawn(async move { fill_also(&ctx, job, Some(resp3)).await });
            }
            while let Some(done) = fills.join_next().await {
                if matches!(done, Ok(true)) {
                    self.loaded += 1;
                }
            }
        }
        Ok(())
    }

    /// The fill of `GET key` (RESP2), and its RESP3 variant.
    fn job(&self, key: Bytes) -> (Refresh, Variant) {
        let db = self.ctx.upstream.default_db();
        let args = [Bytes::from_static(b"GET"), key.clone()];
        let request = reply::encode_command(&[b"GET", &key]);
        let resp3 = Variant::from_args(db, Proto::Resp3, &args);
        let job = Refresh {
            rule: self.target.index,
            ttl: self.target.ttl,
            // Warming loads values: a key that is gone (a hot key deleted
            // since) is not loaded, whatever the rule's `negative` says.
            negative: false,
            key,
            variant: Variant::from_args(db, Proto::Resp2, &args),
            request,
            compress: self.target.compress,
        };
        (job, resp3)
    }
}

/// An array of strings (a `ZREVRANGE` page, a `SCAN` batch).
fn strings(frame: &[u8], what: &'static str) -> Result<Vec<Bytes>, WarmError> {
    if !matches!(frame.first(), Some(b'*')) {
        return Err(WarmError::Unexpected(what));
    }
    let elements = inspect::elements(frame, 2).ok_or(WarmError::Unexpected(what))?;
    elements
        .into_iter()
        .map(|e| {
            inspect::string_payload(e)
                .map(Bytes::copy_from_slice)
                .ok_or(WarmError::Unexpected(what))
        })
        .collect()
}

/// A `SCAN` reply: the next cursor and the batch.
fn scan_reply(frame: &[u8]) -> Result<(Bytes, Vec<Bytes>), WarmError> {
    let elements = inspect::elements(frame, 3).ok_or(WarmError::Unexpected("SCAN"))?;
    let [cursor, batch] = elements[..] else {
        return Err(WarmError::Unexpected("SCAN"));
    };
    let cursor = inspect::string_payload(cursor).ok_or(WarmError::Unexpected("SCAN"))?;
    Ok((Bytes::copy_from_slice(cursor), strings(batch, "SCAN")?))
}

/// Warms rule `index` once; returns how many keys were loaded. Logs
/// `event="warmed"` and counts the run, also when it stopped early (then
/// with what it had loaded, and a warning with the reason).
///
/// # Errors
///
/// When L1 is suspended, or upstream fails or refuses a `SCAN` or
/// `ZREVRANGE`: the keys loaded until then stay loaded.
pub(crate) async fn warm_rule(
    ctx: &Arc<Ctx>,
    index: usize,
    trigger: Trigger,
) -> Result<u64, WarmError> {
    let Some(target) = Target::of(ctx, index) else {
        return Ok(0);
    };
    if !ready(ctx) {
        return Err(WarmError::Suspended);
    }
    let started = Instant::now();
    let identity = ctx.upstream.default_identity();
    let pool = identity.pool(Proto::Resp2);
    let mut run = Run {
        ctx,
        conn: pool.conn(pool.pick()).clone(),
        target: &target,
        loaded: 0,
        seen: HashSet::new(),
    };
    let mut result = Ok(());
    if target.warm.hot {
        result = run.hot().await;
    }
    if result.is_ok() && target.warm.scan {
        result = run.scan().await;
    }
    let keys = run.loaded as u64;
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    if let Some(Some((runs, loaded))) = ctx.warm.counters.get(index) {
        runs.increment(1);
        loaded.increment(keys);
    }
    tracing::info!(
        event = "warmed",
        rule = %target.name,
        trigger = trigger.as_str(),
        keys,
        duration_ms,
        "rule warmed"
    );
    match result {
        Ok(()) => Ok(keys),
        Err(e) => {
            tracing::warn!(event = "warm_failed", rule = %target.name, trigger = trigger.as_str(), keys, error = %e, "warming stopped early");
            Err(e)
        }
    }
}

/// `CACHE.WARM [rule]`: warms `rule`, or every rule with `warm`, now, and
/// answers with the number of keys loaded.
///
/// # Format
///
/// ```text
/// CACHE.WARM [rule]
/// ```
pub(crate) async fn command(ctx: &Arc<Ctx>, rule: Option<&[u8]>) -> Bytes {
    let rules = ctx.l1.as_ref().map(|l1| &l1.rules);
    let indexes: Vec<usize> = match rule {
        Some(name) => {
            let found = rules.and_then(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .find(|(_, r)| r.name.as_bytes() == name)
            });
            let shown = crate::admin::shown(name);
            match found {
                None => return super::error(&format!("ERR no such rule '{shown}'")),
                Some((_, r)) if r.warm.is_none() || !r.cache => {
                    return super::error(&format!(
                        "ERR rule '{shown}' has no warm setting: give it \
                         warm = {{ on_startup = true, limit = 1000 }} to warm it"
                    ))
                }
                Some((i, _)) => vec![i],
            }
        }
        None => rules
            .map(|rules| {
                rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.cache && r.warm.is_some())
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default(),
    };
    if !indexes.is_empty() && !ready(ctx) {
        return WarmError::Suspended.to_resp();
    }
    let mut total: u64 = 0;
    for index in indexes {
        match warm_rule(ctx, index, Trigger::Command).await {
            Ok(n) => total += n,
            Err(e) => return e.to_resp(),
        }
    }
    let mut out = BytesMut::new();
    reply::integer(&mut out, i64::try_from(total).unwrap_or(i64::MAX));
    out.freeze()
}

// ---------------------------------------------------------------------------
// Background tasks
// ---------------------------------------------------------------------------

/// Starts warming: per rule with `warm`, a task that warms it once L1
/// caches (with `on_startup`) and then every `interval`; and, when some
/// rule records a hot set, the task that writes them every
/// `[warming] hot_interval` and once more when `stop` fires. Everything
/// ends when `stop` fires; the returned hot-set writer ends after its last
/// write, which the server waits for (bounded).
pub(crate) fn start(ctx: &Arc<Ctx>, stop: &watch::Receiver<()>) -> Option<JoinHandle<()>> {
    ctx.l1.as_ref()?;
    for index in 0..ctx.warm.counters.len() {
        let Some(target) = Target::of(ctx, index) else {
            continue;
        };
        let warm = target.warm;
        if !warm.on_startup && warm.interval.is_none() {
            continue;
        }
        let ctx = ctx.clone();
        let mut stop = stop.clone();
        tokio::spawn(async move {
            let work = async {
                if warm.on_startup {
                    until_ready(&ctx).await;
                    let _ = warm_rule(&ctx, index, Trigger::Startup).await;
                }
                let Some(every) = warm.interval else {
                    return;
                };
                let mut tick = tokio::time::interval_at((Instant::now() + every).into(), every);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tick.tick().await;
                    until_ready(&ctx).await;
                    let _ = warm_rule(&ctx, index, Trigger::Interval).await;
                }
            };
            tokio::select! {
                _ = work => {}
                _ = stop.changed() => {}
            }
        });
    }
    if ctx.warm.hot.iter().all(Option::is_none) {
        return None;
    }
    let ctx = ctx.clone();
    let mut stop = stop.clone();
    Some(tokio::spawn(async move {
        let every = ctx.config.warming.hot_interval;
        let mut tick = tokio::time::interval_at((Instant::now() + every).into(), every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => record(&ctx).await,
                _ = stop.changed() => {
                    record(&ctx).await;
                    return;
                }
            }
        }
    }))
}

/// Writes each rule's hottest keys since the last write to its hot set.
async fn record(ctx: &Ctx) {
    let warming = &ctx.config.warming;
    let expiry = (warming.hot_interval * HOT_EXPIRY_INTERVALS).max(HOT_EXPIRY_MIN);
    let expiry_ms = expiry.as_millis().to_string();
    let keep = warming.hot_keys.to_string();
    let tau = HOT_HALF_LIFE.as_secs_f64() / std::f64::consts::LN_2;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    let now = format!("{:.6}", now / tau);
    let rules = ctx.l1.as_ref().map(|l1| &l1.rules);
    let identity = ctx.upstream.default_identity();
    let pool = identity.pool(Proto::Resp2);
    for (index, counts) in ctx.warm.hot.iter().enumerate() {
        let Some(counts) = counts else {
            continue;
        };
        let hottest = counts.take_top(warming.hot_keys);
        if hottest.is_empty() {
            continue;
        }
        let Some(rule) = rules.and_then(|r| r.iter().nth(index)) else {
            continue;
        };
        let set = hot_key(&ctx.config.invalidation.prefix, &rule.name);
        let conn = pool.conn(pool.pick()).clone();
        let mut size = 0;
        let mut failure = None;
        for chunk in hottest.chunks(PAGE) {
            let n: Vec<String> = chunk.iter().map(|(_, c)| c.to_string()).collect();
            let mut args: Vec<&[u8]> = vec![
                b"EVAL",
                HOT_SCRIPT,
                b"1",
                &set,
                now.as_bytes(),
                keep.as_bytes(),
                expiry_ms.as_bytes(),
            ];
            for ((key, _), n) in chunk.iter().zip(&n) {
                args.push(key);
                args.push(n.as_bytes());
            }
            match conn.request(&reply::encode_command(&args)).await {
                Ok(frame) if frame.starts_with(b":") => {
                    size = crate::protocol::parse::string2ll(
                        frame
                            .get(1..frame.len().saturating_sub(2))
                            .unwrap_or_default(),
                    )
                    .unwrap_or_default();
                }
                Ok(frame) => {
                    failure = Some(String::from_utf8_lossy(&frame).trim_end().to_owned());
                    break;
                }
                Err(e) => {
                    failure = Some(e.to_string());
                    break;
                }
            }
        }
        match failure {
            None => {
                tracing::debug!(event = "hot_set_written", rule = %rule.name, keys = hottest.len(), size, "hot set written")
            }
            Some(error) => {
                tracing::warn!(event = "hot_set_failed", rule = %rule.name, error = %error, "writing a hot set failed")
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn sampling_takes_about_one_in_eight() {
        let n = 80_000;
        let hits = (0..n).filter(|_| sampled()).count();
        let want = n / SAMPLE as usize;
        assert!(
            hits > want * 9 / 10 && hits < want * 11 / 10,
            "{hits} of {n} sampled"
        );
    }

    #[test]
    fn a_round_robin_reader_is_sampled_on_every_key() {
        // A counter would sample only every eighth key of 8 read in turn.
        let mut per_key = [0u32; 8];
        for i in 0..8_000 {
            if sampled() {
                per_key[i % 8] += 1;
            }
        }
        assert!(per_key.iter().all(|&n| n > 50), "{per_key:?}");
    }

    #[test]
    fn hot_counts_are_bounded_and_taken_whole() {
        let counts = HotCounts::new(200);
        assert_eq!(counts.cap, 400);
        for _ in 0..5 {
            counts.note(b"hot");
        }
        for i in 0..1000 {
            counts.note(format!("cold:{i}").as_bytes());
        }
        // Full: new keys are no longer counted, known ones still are.
        counts.note(b"hot");
        assert_eq!(counts.counts.lock().len(), 400);
        assert_eq!(counts.counts.lock().get(&b"hot"[..]), Some(&6));
        let top = counts.take_top(3);
        assert_eq!(top[0], (Bytes::from_static(b"hot"), 6));
        assert_eq!(top.len(), 3);
        assert!(counts.counts.lock().is_empty());
        assert!(counts.take_top(3).is_empty());
        // The floor for tiny hot_keys.
        assert_eq!(HotCounts::new(1).cap, 256);
    }

    #[test]
    fn long_keys_are_not_counted() {
        let counts = HotCounts::new(10);
        let long = vec![b'k'; MAX_HOT_KEY_LEN + 1];
        let longest = vec![b'k'; MAX_HOT_KEY_LEN];
        for _ in 0..3 {
            counts.note(&long);
            counts.note(&longest);
        }
        assert_eq!(
            counts.take_top(10),
            [(Bytes::from(longest), 3)],
            "a key up to the limit is counted, a longer one never is"
        );
    }

    #[test]
    fn a_sample_that_meets_the_writer_is_dropped() {
        let counts = HotCounts::new(10);
        let held = counts.counts.lock();
        counts.note(b"k");
        drop(held);
        assert!(counts.counts.lock().is_empty());
    }

    #[test]
    fn top_orders_by_count_then_key() {
        let mut m = HashMap::new();
        for (k, n) in [("b", 3), ("a", 3), ("c", 9), ("d", 1)] {
            m.insert(Bytes::from(k), n);
        }
        let got: Vec<(String, u32)> = top(m, 3)
            .into_iter()
            .map(|(k, n)| (String::from_utf8(k.to_vec()).unwrap(), n))
            .collect();
        assert_eq!(got, [("c".into(), 9), ("a".into(), 3), ("b".into(), 3)]);
    }

    #[test]
    fn pace_spreads_batches_over_the_rate_without_saving_up() {
        let pace = Pace::new(1000);
        assert_eq!(pace.batch, 20);
        let t0 = Instant::now() + Duration::from_secs(1);
        assert_eq!(pace.reserve(20, t0), t0);
        assert_eq!(pace.reserve(20, t0), t0 + Duration::from_millis(20));
        assert_eq!(pace.reserve(10, t0), t0 + Duration::from_millis(40));
        // Idle for a while: the next batch starts now, not in the past.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(pace.reserve(1, later), later);
        assert_eq!(Pace::new(1).batch, 1);
        assert_eq!(Pace::new(1_000_000).batch, MAX_BATCH);
    }

    #[test]
    fn replies_are_read_strictly() {
        let scan = b"*2\r\n$2\r\n17\r\n*2\r\n$1\r\na\r\n$2\r\nbc\r\n";
        let (cursor, keys) = scan_reply(scan).unwrap();
        assert_eq!(&cursor[..], b"17");
        assert_eq!(keys, [Bytes::from("a"), Bytes::from("bc")]);
        assert!(scan_reply(b"*1\r\n$1\r\n0\r\n").is_err());
        assert!(scan_reply(b"-ERR nope\r\n").is_err());
        assert!(strings(b"*0\r\n", "ZREVRANGE").unwrap().is_empty());
        assert!(strings(b":1\r\n", "ZREVRANGE").is_err());
        assert!(strings(b"*1\r\n:1\r\n", "ZREVRANGE").is_err());
    }

    #[test]
    fn hot_sets_live_under_the_prefix() {
        assert_eq!(&hot_key("tierd:", "users")[..], b"tierd:hot:users");
    }

    #[test]
    fn errors_say_what_happened() {
        let refused = WarmError::Refused {
            what: "SCAN",
            frame: Bytes::from_static(b"-NOPERM no\r\n"),
        };
        assert_eq!(&refused.to_resp()[..], b"-NOPERM no\r\n");
        assert_eq!(refused.to_string(), "upstream refused SCAN: NOPERM no");
        assert!(WarmError::Suspended.to_resp().starts_with(b"-TRYAGAIN "));
        assert_eq!(
            &WarmError::Unexpected("SCAN").to_resp()[..],
            b"-ERR upstream unavailable: unexpected reply to SCAN\r\n"
        );
    }
}
