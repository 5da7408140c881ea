//! Stampede protection seen from Redis users: many clients missing one key
//! at once, on one tierd or several sharing one Redis.
//!
//! - **Coalescing.** Identical reads that miss L1 together cost Redis one
//!   read (counted by Redis itself, `INFO commandstats`); with
//!   `[l1] coalesce = false` the same herd costs one read per client. A
//!   read never shares a reply with a read in another protocol, nor with
//!   one sent before its key was written.
//! - **Leases.** With `stampede` on a rule, exactly one client across every
//!   instance gets the nil (the loader); the others wait inside tierd and
//!   get the value the loader writes, whether through the same tierd,
//!   another one (the bus), or straight to Redis (tracking). A loader that
//!   never writes, or disconnects, loses its lease after `lease`, and
//!   exactly one new loader is elected. Waiting ends at `wait` with nil or
//!   `-TRYAGAIN`. The loader's write deletes its lease, and only its own
//!   (compare-and-delete): other clients' writes, and a late loader's, must
//!   leave the current holder's lease alone. 10,000 waiters are parked at
//!   once without costing Redis a connection each.
//! - **Refresh-ahead.** A hot key read continuously keeps a 100% hit rate
//!   across many TTLs (fixed ratio, and XFetch) while changes made directly
//!   in Redis still show up; without refresh-ahead the same loop misses
//!   once per TTL.
//! - **Seeing it.** `CACHE.STATS` (RESP2 and RESP3) and `/metrics` count
//!   grants, waits, wake-ups, timeouts, coalesced reads and refreshes, and
//!   every wait ends as a wake-up or a timeout.
//!
//! The tests run one at a time ([`SERIAL`]): several of them load the two
//! cores with hundreds or thousands of connections, and the refresh-ahead
//! runs need their TTL's slack not to be eaten by a neighbour. Where a test
//! must wait for tierd to have taken in requests before Redis may answer,
//! it stops Redis (SIGSTOP) and polls `CACHE.STATS`, which tierd answers
//! itself.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::bus::{bus_config, start_instance, Instance};
use support::exchange::{assert_frame, encode, text};
use support::l1::{
    commandstats, direct, l1_config, must, rule, rule_stats, upstream_calls, wait_until_caching,
    HOUR,
};
use support::probe::{bulk, Deadline};
use support::stampede::{
    counters, direct_get, ensure_nofile, is_nil, lease_key, lease_rule, lease_token,
    long_lease_rule, redis_info, refresh_rule, stampede_rule, sum_counters, upstream_total,
    wait_caching_at, wait_counters, wait_lease_gone, wait_parked, ChildTierd, Counters, Herd,
    Member, Verdict,
};
use support::{free_port, Raw, RedisServer, Tierd};
use tierd::config::{Config, OnTimeout, RefreshAhead, RuleConfig, TrackingMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// One test at a time (see the module docs). A tokio mutex, so that holding
/// it across `.await` is sound.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const SECOND: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);
const WARMUP: &str = "warmup";

/// `n` tierds on `redis` and on the bus (tracking off, so that the bus is
/// how one instance hears of a write through another), each with a warm-up
/// rule and `rules`, started one by one and caching.
async fn instances(redis: &RedisServer, n: usize, rules: &[RuleConfig]) -> Vec<Instance> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_instance(redis, bus_config(&redis.url(), rules.to_vec())).await);
    }
    out
}

/// One tierd with `config` plus a warm-up rule first, once it caches.
async fn start(mut config: Config) -> Tierd {
    config.rules.insert(0, rule(WARMUP, "warmup:*", HOUR));
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, WARMUP, "warmup:0").await;
    tierd
}

/// A config for one tierd on `redis` with `tracking`, the bus off and
/// `rules`.
fn single(redis: &RedisServer, tracking: TrackingMode, rules: Vec<RuleConfig>) -> Config {
    let mut config = l1_config(&redis.url(), tracking, rules);
    config.invalidation.bus = false;
    config
}

/// [`start`] of [`single`].
async fn start_single(
    redis: &RedisServer,
    tracking: TrackingMode,
    rules: Vec<RuleConfig>,
) -> Tierd {
    start(single(redis, tracking, rules)).await
}

/// A client of `tierd` that reads `key` and is made its loader (nil).
async fn take_lease(tierd: &Tierd, key: &str) -> Raw {
    let mut loader = tierd.raw().await;
    get_nil(&mut loader, key).await;
    loader
}

/// One `CACHE.STATS` connection per address.
async fn stats_conns(addrs: &[SocketAddr]) -> Vec<Raw> {
    let mut out = Vec::new();
    for a in addrs {
        out.push(Raw::connect(*a).await);
    }
    out
}

/// [`instances`], their addresses, a `CACHE.STATS` connection to each, and
/// a connection straight to Redis.
struct Fleet {
    all: Vec<Instance>,
    addrs: Vec<SocketAddr>,
    stats: Vec<Raw>,
    d: Raw,
}

async fn fleet(redis: &RedisServer, n: usize, rules: &[RuleConfig]) -> Fleet {
    let all = instances(redis, n, rules).await;
    let addrs: Vec<SocketAddr> = all.iter().map(|i| i.tierd.addr).collect();
    let stats = stats_conns(&addrs).await;
    let d = direct(redis).await;
    Fleet {
        all,
        addrs,
        stats,
        d,
    }
}

/// Sends `GET key` on `raw` and returns its reply (within `limit`) and how
/// long it took.
async fn timed_get(raw: &mut Raw, key: &str, limit: Duration) -> (Option<Bytes>, Duration) {
    let started = Instant::now();
    raw.send(&encode(&["GET", key])).await;
    let reply = raw.try_frame(limit).await;
    (reply, started.elapsed())
}

/// Reads `GET key` on `raw` and asserts it answers nil at once (the
/// loader's reply).
async fn get_nil(raw: &mut Raw, key: &str) {
    let reply = raw.cmd(&["GET", key]).await;
    assert!(
        is_nil(&reply),
        "GET {key} should make this client the loader (nil), got {:?}",
        text(&reply)
    );
}

/// The text of an optional reply, for messages.
fn show(reply: &Option<Bytes>) -> String {
    match reply {
        Some(r) => text(r),
        None => "<no reply>".into(),
    }
}

/// The value of `p`-th percentile of `xs` (sorted here).
fn percentile(xs: &mut [Duration], p: f64) -> Duration {
    if xs.is_empty() {
        return Duration::ZERO;
    }
    xs.sort_unstable();
    let i = ((xs.len() as f64 - 1.0) * p).round() as usize;
    xs[i]
}

/// Sends `GET key` on each connection of `waiters` from a task of its own,
/// and returns the tasks' (reply, time taken).
fn spawn_reads(
    waiters: Vec<Raw>,
    key: &str,
    limit: Duration,
) -> Vec<tokio::task::JoinHandle<(Raw, Option<Bytes>, Duration)>> {
    waiters
        .into_iter()
        .map(|mut raw| {
            let key = key.to_owned();
            tokio::spawn(async move {
                let (reply, took) = timed_get(&mut raw, &key, limit).await;
                (raw, reply, took)
            })
        })
        .collect()
}

// ---------------------------------------------------------------------------
// The herd
// ---------------------------------------------------------------------------

const HERD: usize = 600;
const HERD_KEY: &str = "herd:product:42";
/// How long the loader's "database read" takes.
const LOAD: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_600_on_three_instances_makes_exactly_one_loader() {
    let _serial = SERIAL.lock().await;
    // Each client's socket and the one tierd accepted for it.
    ensure_nofile(2 * HERD as u64 + 256);
    let redis = RedisServer::start();
    let rules = [lease_rule("herd", 10 * SECOND, 5 * SECOND, OnTimeout::Nil)];
    let Fleet {
        all: _all,
        addrs,
        mut stats,
        mut d,
    } = fleet(&redis, 3, &rules).await;
    let before = sum_counters(&mut stats, "herd").await;
    let members = Member::round_robin(HERD, 3);
    let mut herd = Herd::connect(&addrs, &members, HERD_KEY, 15 * SECOND).await;
    let upstream_before = commandstats(&mut d).await;
    herd.release().await;
    let released = herd.released.unwrap();

    let value = "loaded-from-the-database";
    let mut nils = Vec::new();
    let mut wrong = Vec::new();
    let mut per_instance = [0usize; 3];
    let mut loader_set_at = None;
    for _ in 0..HERD {
        let mut a = herd.next(20 * SECOND).await;
        match a.reply.as_deref() {
            Some(r) if is_nil(r) => {
                let verdict = if nils.is_empty() {
                    // The loader. Its lease is in Redis, and the others wait
                    // inside tierd: Redis has no blocked client and no
                    // connection per waiter.
                    let token = lease_token(&mut d, HERD_KEY).await;
                    assert!(token.is_some(), "the loader got nil but holds no lease");
                    assert_eq!(redis_info(&mut d, "clients", "blocked_clients").await, 0);
                    let connected = redis_info(&mut d, "clients", "connected_clients").await;
                    assert!(
                        connected < 100,
                        "{connected} connections to Redis while {HERD} clients read through 3 tierds"
                    );
                    loader_set_at = Some(Instant::now() + LOAD);
                    Verdict::Load {
                        value: value.into(),
                        load: LOAD,
                    }
                } else {
                    Verdict::Idle
                };
                nils.push((a.client, a.instance, a.at - released));
                let _ = a.verdict.take().unwrap().send(verdict);
            }
            Some(r) if r == bulk(value).as_ref() => per_instance[a.instance] += 1,
            _ => wrong.push(format!("client {}: {}", a.client, show(&a.reply))),
        }
    }
    let ends = herd.join().await;

    assert_eq!(
        nils.len(),
        1,
        "exactly one client of {HERD} must get the miss; these did (client, instance, after): {nils:?}"
    );
    assert!(
        wrong.is_empty(),
        "replies that are neither nil nor the value: {wrong:?}"
    );
    let loader = nils[0].0;
    let loader_end = ends.iter().find(|e| e.client == loader).unwrap();
    assert_frame(
        loader_end.set_reply.as_deref().unwrap_or(b"<none>"),
        b"+OK\r\n",
    );
    assert_eq!(
        per_instance.iter().sum::<usize>(),
        HERD - 1,
        "{per_instance:?}"
    );
    for (i, n) in per_instance.iter().enumerate() {
        let expected = HERD / 3 - usize::from(nils[0].1 == i);
        assert_eq!(*n, expected, "instance {i} served the value to {n} clients");
    }

    wait_lease_gone(&mut d, HERD_KEY, 5 * SECOND).await;
    assert_eq!(
        direct_get(&mut d, HERD_KEY).await.as_deref(),
        Some(value.as_bytes())
    );

    let c = sum_counters(&mut stats, "herd").await.since(before);
    assert_eq!(c.lease_grants, 1, "one lease over three instances: {c:?}");
    assert_eq!(c.lease_timeouts, 0, "{c:?}");
    assert!(
        c.lease_wakeups >= 1 && c.lease_wakeups < HERD as u64,
        "the waiters were woken by the load: {c:?}"
    );

    // How long the waiters waited past the loader's write, for the report.
    let set_at = loader_set_at.unwrap();
    let mut after_set: Vec<Duration> = ends
        .iter()
        .filter(|e| e.client != loader)
        .map(|e| e.at.saturating_duration_since(set_at))
        .collect();
    let upstream_after = commandstats(&mut d).await;
    let mut deltas: Vec<(String, u64)> = upstream_after
        .iter()
        .map(|(k, v)| (k.clone(), v - upstream_before.get(k).copied().unwrap_or(0)))
        .filter(|(k, v)| *v > 0 && k != "info")
        .collect();
    deltas.sort();
    // Redis hardly saw the herd: without protection it would have run
    // one GET per client.
    let gets = deltas
        .iter()
        .find(|(k, _)| k == "get")
        .map_or(0, |(_, v)| *v);
    assert!(
        gets <= HERD as u64 / 10,
        "Redis ran GET {gets} times for a herd of {HERD}: {deltas:?}"
    );
    eprintln!(
        "herd: loader was client {loader} on instance {}, nil after {:?}; waiters answered \
         p50 {:?} / p99 {:?} / max {:?} after the load ended; counters {c:?}; \
         Redis calls during the herd: {deltas:?}",
        nils[0].1,
        nils[0].2,
        percentile(&mut after_set, 0.5),
        percentile(&mut after_set, 0.99),
        percentile(&mut after_set, 1.0),
    );
    drop(ends);
}

// ---------------------------------------------------------------------------
// A loader that never writes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_never_writes_loses_its_lease_and_exactly_one_new_loader_is_elected() {
    let _serial = SERIAL.lock().await;
    const CLIENTS: usize = 90;
    const LEASE: Duration = Duration::from_secs(1);
    let key = "slow:report";
    ensure_nofile(2 * CLIENTS as u64 + 256);
    let redis = RedisServer::start();
    let rules = [lease_rule("slow", LEASE, 5 * SECOND, OnTimeout::Nil)];
    let Fleet {
        all: _all,
        addrs,
        mut stats,
        mut d,
    } = fleet(&redis, 3, &rules).await;
    let before = sum_counters(&mut stats, "slow").await;
    let members = Member::round_robin(CLIENTS, 3);
    let mut herd = Herd::connect(&addrs, &members, key, 15 * SECOND).await;
    herd.release().await;

    let value = "finally";
    let mut nils: Vec<(usize, usize, Instant, Vec<u8>)> = Vec::new();
    let mut values = 0;
    let mut wrong = Vec::new();
    for _ in 0..CLIENTS {
        let mut a = herd.next(20 * SECOND).await;
        match a.reply.as_deref() {
            Some(r) if is_nil(r) => {
                let token = lease_token(&mut d, key)
                    .await
                    .unwrap_or_else(|| panic!("client {} got nil but there is no lease", a.client));
                let verdict = match nils.len() {
                    // The first loader stalls with its connection open.
                    0 => Verdict::Idle,
                    // The second: elected only once the first lease is gone.
                    1 => {
                        let (_, _, first_at, first_token) = &nils[0];
                        assert_ne!(
                            &token, first_token,
                            "the new loader got nil under the first loader's lease"
                        );
                        let gap = a.at - *first_at;
                        assert!(
                            gap >= LEASE / 2,
                            "a new loader was elected {gap:?} after the first, under a {LEASE:?} lease"
                        );
                        Verdict::Load {
                            value: value.into(),
                            load: LOAD,
                        }
                    }
                    _ => Verdict::Idle,
                };
                nils.push((a.client, a.instance, a.at, token));
                let _ = a.verdict.take().unwrap().send(verdict);
            }
            Some(r) if r == bulk(value).as_ref() => values += 1,
            _ => wrong.push(format!("client {}: {}", a.client, show(&a.reply))),
        }
    }
    let ends = herd.join().await;
    let who: Vec<(usize, usize)> = nils.iter().map(|(c, i, _, _)| (*c, *i)).collect();
    assert_eq!(
        nils.len(),
        2,
        "exactly two loaders (the stalled one, then one after its lease): (client, instance) {who:?}"
    );
    assert!(wrong.is_empty(), "{wrong:?}");
    assert_eq!(values, CLIENTS - 2);
    let second = ends.iter().find(|e| e.client == nils[1].0).unwrap();
    assert_frame(second.set_reply.as_deref().unwrap_or(b"<none>"), b"+OK\r\n");
    wait_lease_gone(&mut d, key, 5 * SECOND).await;

    let c = sum_counters(&mut stats, "slow").await.since(before);
    assert_eq!(c.lease_grants, 2, "{c:?}");
    assert_eq!(c.lease_timeouts, 0, "{c:?}");
    assert!(
        c.lease_wakeups >= 1 && c.lease_wakeups <= CLIENTS as u64 - 2,
        "{c:?}"
    );
    eprintln!(
        "loader never writes: second loader elected {:?} after the first; counters {c:?}",
        nils[1].2 - nils[0].2
    );
}

// ---------------------------------------------------------------------------
// Waiting in vain
// ---------------------------------------------------------------------------

const WAITERS: usize = 20;
const WAIT: Duration = Duration::from_secs(1);

/// One tierd with a stampede rule (`wait` = [`WAIT`], a long lease); a
/// loader takes the lease and never writes, and [`WAITERS`] clients read.
/// Returns each waiter's reply and time taken, the rule's counters over
/// the waits, and how many commands Redis ran while they waited.
async fn wait_in_vain(
    on_timeout: OnTimeout,
    key: &str,
) -> (Vec<(Option<Bytes>, Duration)>, Counters, u64) {
    let redis = RedisServer::start();
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("vain", 30 * SECOND, WAIT, on_timeout)],
    )
    .await;
    let mut d = direct(&redis).await;
    let mut stats = tierd.raw().await;
    let loader = take_lease(&tierd, key).await;
    let before = counters(&mut stats, "vain").await;
    assert_eq!(before.lease_grants, 1, "{before:?}");

    let mut waiters = Vec::new();
    for _ in 0..WAITERS {
        waiters.push(tierd.raw().await);
    }
    let tasks = spawn_reads(waiters, key, WAIT + 10 * SECOND);
    // Every read is parked; from here until they time out, Redis should
    // hear next to nothing: waiting is tierd's business, not a poll of
    // Redis per waiter.
    let mut stats = [stats];
    wait_parked(
        &mut stats,
        "vain",
        &before,
        WAITERS as u64,
        "every waiter to be parked",
    )
    .await;
    let upstream_before = upstream_total(&mut d).await;
    let mut out = Vec::new();
    for t in tasks {
        let (_raw, reply, took) = t.await.unwrap();
        out.push((reply, took));
    }
    let upstream_during = upstream_total(&mut d).await - upstream_before;
    let c = counters(&mut stats[0], "vain").await.since(before);
    // The lease is still the loader's.
    assert!(lease_token(&mut d, key).await.is_some());
    drop(loader);
    (out, c, upstream_during)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_whose_loader_never_writes_get_nil_after_wait() {
    let _serial = SERIAL.lock().await;
    let (replies, c, upstream) = wait_in_vain(OnTimeout::Nil, "vain:nil").await;
    for (reply, took) in &replies {
        assert_eq!(show(reply), "$-1\r\n");
        assert!(
            *took >= WAIT,
            "a waiter gave up after {took:?}, before wait = {WAIT:?}"
        );
    }
    assert_eq!(c.lease_waits, WAITERS as u64, "{c:?}");
    assert_eq!(c.lease_timeouts, WAITERS as u64, "{c:?}");
    assert_eq!((c.lease_wakeups, c.lease_grants), (0, 0), "{c:?}");
    assert!(
        upstream <= 2 * WAITERS as u64 + 10,
        "Redis ran {upstream} commands while {WAITERS} clients waited {WAIT:?}: waiters poll Redis"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiters_get_tryagain_after_wait_with_on_timeout_error() {
    let _serial = SERIAL.lock().await;
    let key = "vain:error";
    let (replies, c, upstream) = wait_in_vain(OnTimeout::Error, key).await;
    let prefix = format!("-TRYAGAIN tierd: {key} is still being loaded by another client (waited ");
    for (reply, took) in &replies {
        let t = show(reply);
        let waited = t
            .strip_prefix(&prefix)
            .and_then(|rest| rest.strip_suffix(" ms)\r\n"))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or_else(|| panic!("expected {prefix:?}<n> ms)\\r\\n, got {t:?}"));
        assert!(
            waited >= WAIT.as_millis() as u64,
            "the error says it waited {waited} ms, less than wait = {WAIT:?}"
        );
        assert!(*took >= WAIT, "a waiter gave up after {took:?}");
    }
    assert_eq!(c.lease_timeouts, WAITERS as u64, "{c:?}");
    assert_eq!(c.lease_wakeups, 0, "{c:?}");
    assert!(
        upstream <= 2 * WAITERS as u64 + 10,
        "{upstream} commands upstream"
    );
}

// ---------------------------------------------------------------------------
// Coalescing
// ---------------------------------------------------------------------------

const COALESCED: usize = 50;

/// One tierd (tracking default, the bus off) with `coalesce`; a key in
/// Redis; [`COALESCED`] clients send the same `GET` of it while Redis is
/// stopped (SIGSTOP), so that every one of them reaches tierd before the
/// first upstream read can be answered. Returns how many `GET`s Redis ran
/// and the rule's counters.
async fn coalescing_run(coalesce: bool) -> (u64, Counters) {
    let redis = RedisServer::start();
    let key = "co:item:7";
    let value = "coalesced value";
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", key, value]).await;
    let mut config = single(
        &redis,
        TrackingMode::Default,
        vec![rule("co", "co:*", HOUR)],
    );
    config.l1.coalesce = coalesce;
    let tierd = start(config).await;
    let mut stats = [tierd.raw().await];
    let mut readers = Vec::new();
    for _ in 0..COALESCED {
        readers.push(tierd.raw().await);
    }
    let before = counters(&mut stats[0], "co").await;
    let gets_before = upstream_calls(&mut d, "get").await;

    redis.pause();
    for r in readers.iter_mut() {
        r.send(&encode(&["GET", key])).await;
    }
    // Every read has reached tierd (CACHE.STATS is answered by tierd
    // itself) before Redis runs anything.
    let n = COALESCED as u64;
    if coalesce {
        wait_counters(
            &mut stats,
            "co",
            5 * SECOND,
            "N-1 reads to join the first",
            |c| c.coalesced - before.coalesced == n - 1,
        )
        .await;
    } else {
        wait_counters(&mut stats, "co", 5 * SECOND, "every read to miss", |c| {
            c.misses - before.misses == n
        })
        .await;
    }
    redis.resume();

    for (i, r) in readers.iter_mut().enumerate() {
        let reply = r.try_frame(5 * SECOND).await;
        assert_eq!(show(&reply), text(&bulk(value)), "reader {i}");
    }
    let gets = upstream_calls(&mut d, "get").await - gets_before;
    let c = counters(&mut stats[0], "co").await.since(before);
    // And the reply was cached (a fill completes when its PTTL comes back,
    // just after the reply): reads turn into hits.
    let mut again = tierd.raw().await;
    let deadline = Deadline::new(2 * SECOND, "a read after the herd to be an L1 hit");
    loop {
        let hits = counters(&mut stats[0], "co").await.hits;
        assert_frame(&again.cmd(&["GET", key]).await, &bulk(value));
        if counters(&mut stats[0], "co").await.hits > hits {
            break;
        }
        deadline.tick().await;
    }
    (gets, c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_concurrent_misses_cost_redis_one_read() {
    let _serial = SERIAL.lock().await;
    let (gets, c) = coalescing_run(true).await;
    assert_eq!(
        gets, 1,
        "Redis ran GET {gets} times for {COALESCED} identical reads"
    );
    assert_eq!(c.coalesced, COALESCED as u64 - 1, "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_coalescing_each_concurrent_miss_reads_redis() {
    let _serial = SERIAL.lock().await;
    let (gets, c) = coalescing_run(false).await;
    assert_eq!(
        gets, COALESCED as u64,
        "the control must show one GET per reader"
    );
    assert_eq!(c.coalesced, 0, "{c:?}");
}

// ---------------------------------------------------------------------------
// Refresh-ahead
// ---------------------------------------------------------------------------

/// The hot key's rule ttl. The refresh has `(1 - ratio) * TTL` to come
/// back before the entry expires.
const TTL: Duration = Duration::from_millis(600);
/// How long the hot key is read: ten TTLs.
const RUN: Duration = Duration::from_millis(6000);
/// When the direct writer changes the value, from the start of the run.
/// Off the multiples of the refresh period, so that a change is not
/// picked up by a refresh that was due at that very moment anyway.
const CHANGES: [Duration; 3] = [
    Duration::from_millis(1370),
    Duration::from_millis(3130),
    Duration::from_millis(4890),
];
/// How soon a change made directly in Redis must show through tierd.
const SEEN_WITHIN: Duration = Duration::from_millis(1200);

struct HotRun {
    reads: u64,
    c: Counters,
    /// How long after each direct write its value was first read.
    seen_after: Vec<Duration>,
}

/// tierd with tracking and the bus off (so that nothing but expiry and
/// refreshes renews an entry) and a rule of [`TTL`] with `refresh`; one
/// client reads a hot key back to back for [`RUN`] while a client of Redis
/// changes it at [`CHANGES`]. Every value read must be the latest written
/// or, for at most [`SEEN_WITHIN`] after a change, the one before it.
async fn hot_key_run(refresh: Option<RefreshAhead>) -> HotRun {
    let redis = RedisServer::start();
    let key = "hot:home";
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", key, "v0"]).await;
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![refresh_rule("hot", "hot:*", TTL, refresh)],
    )
    .await;
    let mut reader = tierd.raw().await;
    let mut stats = tierd.raw().await;
    // The first read fills the entry.
    assert_frame(&reader.cmd(&["GET", key]).await, &bulk("v0"));
    let before = counters(&mut stats, "hot").await;
    assert_eq!(before.misses, 1, "{before:?}");

    let started = Instant::now();
    let mut current = 0u32;
    let mut changed_at = started;
    let mut seen = true;
    let mut seen_after = Vec::new();
    let mut reads = 0;
    while started.elapsed() < RUN {
        if let Some(&at) = CHANGES.get(current as usize) {
            if started.elapsed() >= at {
                current += 1;
                must(&mut d, &["SET", key, &format!("v{current}")]).await;
                changed_at = Instant::now();
                seen = false;
            }
        }
        let read_at = Instant::now();
        let got = reader.cmd(&["GET", key]).await;
        reads += 1;
        if got == bulk(&format!("v{current}")) {
            if !seen {
                seen = true;
                seen_after.push(read_at - changed_at);
            }
        } else {
            let stale_for = read_at - changed_at;
            assert!(
                current > 0
                    && got == bulk(&format!("v{}", current - 1))
                    && stale_for <= SEEN_WITHIN,
                "read {reads}: got {:?} {stale_for:?} after v{current} was written directly",
                text(&got)
            );
        }
    }
    let c = counters(&mut stats, "hot").await.since(before);
    eprintln!(
        "hot key with {refresh:?}: {reads} reads over {RUN:?} (ttl {TTL:?}), {c:?}, \
         changes seen after {seen_after:?}"
    );
    HotRun {
        reads,
        c,
        seen_after,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refresh_ahead_keeps_a_hot_key_at_100_percent_hits_while_changes_show() {
    let _serial = SERIAL.lock().await;
    let run = hot_key_run(Some(RefreshAhead::Ratio(0.5))).await;
    assert_eq!(
        run.c.misses, 0,
        "a hot key missed across {RUN:?}: {:?}",
        run.c
    );
    assert_eq!(run.c.hits, run.reads, "{:?}", run.c);
    assert!(
        run.c.refreshes >= 5,
        "only {} refreshes over ten TTLs: {:?}",
        run.c.refreshes,
        run.c
    );
    assert_eq!(
        run.seen_after.len(),
        CHANGES.len(),
        "not every change was seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xfetch_refresh_keeps_a_hot_key_at_100_percent_hits() {
    let _serial = SERIAL.lock().await;
    // XFetch refreshes when `now - delta * beta * ln(rand) >= expiry`,
    // `delta` being the upstream read's time: a millisecond or so on
    // loopback, so beta scales that up to a share of the TTL. With 100 a
    // run here refreshed about 15 times in ten TTLs, some 200 ms before
    // expiry; far larger betas refresh on almost every hit.
    let run = hot_key_run(Some(RefreshAhead::XFetch { beta: 100.0 })).await;
    assert_eq!(
        run.c.misses, 0,
        "a hot key missed across {RUN:?}: {:?}",
        run.c
    );
    assert_eq!(run.c.hits, run.reads, "{:?}", run.c);
    assert!(run.c.refreshes >= 5, "{:?}", run.c);
    assert_eq!(
        run.seen_after.len(),
        CHANGES.len(),
        "not every change was seen"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_refresh_ahead_a_hot_key_misses_every_ttl() {
    let _serial = SERIAL.lock().await;
    let run = hot_key_run(None).await;
    // The control for the two tests above: the same loop, entries expire.
    assert!(
        run.c.misses >= 5,
        "without refresh-ahead a hot key should miss about once per TTL: {:?}",
        run.c
    );
    assert_eq!(run.c.refreshes, 0, "{:?}", run.c);
}

// ---------------------------------------------------------------------------
// 10,000 waiters
// ---------------------------------------------------------------------------

const MANY: usize = 10_000;
const MANY_KEYS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_waiters_are_parked_and_all_get_the_value() {
    let _serial = SERIAL.lock().await;
    // This process holds every client socket, and tierd (a child process,
    // which inherits the limit) the accepted ones.
    ensure_nofile((MANY + MANY_KEYS) as u64 + 512);
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let tierd = ChildTierd::start(&format!(
        "max_clients = {}\n\
         [upstream]\nurl = \"{}\"\n\
         [log]\nlevel = \"warn\"\n\
         [metrics]\nlisten = \"\"\n\
         [invalidation]\ntracking = \"off\"\n\
         [[rules]]\nname = \"warmup\"\nmatch = \"warmup:*\"\nttl = \"1h\"\n\
         [[rules]]\nname = \"many\"\nmatch = \"many:*\"\nttl = \"1h\"\n\
         stampede = {{ lease = \"60s\", wait = \"25s\" }}\n",
        MANY + MANY_KEYS + 100,
        redis.url()
    ))
    .await;
    wait_caching_at(tierd.addr, WARMUP, "warmup:0").await;
    let mut stats = [Raw::connect(tierd.addr).await];

    let key = |k: usize| format!("many:{k}");
    let mut loaders = Vec::new();
    for k in 0..MANY_KEYS {
        let mut raw = Raw::connect(tierd.addr).await;
        get_nil(&mut raw, &key(k)).await;
        loaders.push(raw);
    }
    let before = counters(&mut stats[0], "many").await;
    assert_eq!(before.lease_grants, MANY_KEYS as u64, "{before:?}");
    let mut waiters = Vec::with_capacity(MANY);
    for _ in 0..MANY {
        waiters.push(Raw::connect(tierd.addr).await);
    }
    for (i, w) in waiters.iter_mut().enumerate() {
        w.send(&encode(&["GET", &key(i % MANY_KEYS)])).await;
    }
    let parked = wait_counters(
        &mut stats,
        "many",
        20 * SECOND,
        "10,000 parked waiters",
        |c| c.lease_waits - before.lease_waits >= MANY as u64,
    )
    .await
    .since(before);
    assert_eq!(parked.lease_grants, 0, "{parked:?}");
    assert_eq!(parked.lease_waits, MANY as u64, "{parked:?}");
    // No upstream connection per waiter, and nobody blocked in Redis.
    let connected = redis_info(&mut d, "clients", "connected_clients").await;
    assert!(
        connected < 50,
        "{connected} connections to Redis with {MANY} waiters"
    );
    assert_eq!(redis_info(&mut d, "clients", "blocked_clients").await, 0);

    for (k, l) in loaders.iter_mut().enumerate() {
        assert_frame(
            &l.cmd(&["SET", &key(k), &format!("value {k}")]).await,
            b"+OK\r\n",
        );
    }
    let mut wrong = Vec::new();
    for (i, w) in waiters.iter_mut().enumerate() {
        let got = w.try_frame(10 * SECOND).await;
        let want = bulk(&format!("value {}", i % MANY_KEYS));
        if got.as_ref() != Some(&want) {
            wrong.push(format!("waiter {i}: {}", show(&got)));
            if wrong.len() > 20 {
                break;
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "waiters without their value (first 20): {wrong:?}\ntierd's log:\n{}",
        tierd.log()
    );
    let c = counters(&mut stats[0], "many").await.since(before);
    assert_eq!(c.lease_wakeups, MANY as u64, "{c:?}");
    assert_eq!(c.lease_timeouts, 0, "{c:?}");
    for k in 0..MANY_KEYS {
        wait_lease_gone(&mut d, &key(k), 5 * SECOND).await;
    }
    drop(waiters);
}

// ---------------------------------------------------------------------------
// Lease release
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loaders_write_deletes_its_lease() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "rel:1";
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("rel", 30 * SECOND, 5 * SECOND, OnTimeout::Nil)],
    )
    .await;
    let mut d = direct(&redis).await;
    let mut loader = take_lease(&tierd, key).await;
    // SET tierd:lease:{key} <token> NX PX <lease>
    let token = lease_token(&mut d, key).await.expect("a lease in Redis");
    assert!(!token.is_empty());
    let pttl: i64 = text(&d.cmd(&["PTTL", &lease_key(key)]).await)
        .trim_start_matches(':')
        .trim_end()
        .parse()
        .unwrap();
    assert!(
        pttl > 0 && pttl <= 30_000,
        "the lease should expire within its 30 s, PTTL is {pttl}"
    );
    assert_frame(&loader.cmd(&["SET", key, "loaded"]).await, b"+OK\r\n");
    wait_lease_gone(&mut d, key, 2 * SECOND).await;
    // The value is served, and the next reader is not made a loader.
    let mut reader = tierd.raw().await;
    assert_frame(&reader.cmd(&["GET", key]).await, &bulk("loaded"));
    assert_eq!(counters(&mut reader, "rel").await.lease_grants, 1);
}

/// Reads `key`'s lease token for `window` after a write that must not
/// delete it; says how it changed, if it did. (A negative property: any
/// release tierd sends follows the write's reply at once, so a window far
/// longer than a loopback round trip would see it.)
async fn lease_kept(d: &mut Raw, key: &str, token: &[u8], window: Duration) -> Result<(), String> {
    let started = Instant::now();
    let mut changed = Ok(());
    // The whole window, even after a change: callers rely on its length.
    while started.elapsed() < window {
        let now = lease_token(d, key).await;
        if changed.is_ok() && now.as_deref() != Some(token) {
            let pttl = text(&d.cmd(&["PTTL", &lease_key(key)]).await);
            changed = Err(format!(
                "{:?} after the write the lease was {} (PTTL {:?})",
                started.elapsed(),
                if now.is_none() { "deleted" } else { "replaced" },
                pttl.trim_end()
            ));
        }
        tokio::time::sleep(10 * MS).await;
    }
    changed
}

async fn lease_stays(d: &mut Raw, key: &str, token: &[u8], window: Duration) {
    if let Err(e) = lease_kept(d, key, token, window).await {
        panic!("another client's write must not release the lease: {e}");
    }
}

/// A loader on instance 0 holds the lease of `key`, and another client,
/// through instance `writer_on`, sends `write` to the key meanwhile. The
/// lease is the loader's until the loader writes (compare-and-delete on
/// its token): it must stay. When `write` leaves the key missing (a `DEL`,
/// an application dropping its cache entry), a reader arriving next must
/// wait for the loader rather than be made a second loader.
async fn someone_else_writes(writer_on: usize, write: &[&str]) {
    let redis = RedisServer::start();
    let rules = [long_lease_rule("cas")];
    let all = instances(&redis, 2, &rules).await;
    let mut d = direct(&redis).await;
    let key = write[1];
    let mut loader = take_lease(&all[0].tierd, key).await;
    let token = lease_token(&mut d, key).await.expect("a lease");

    let mut other = all[writer_on].tierd.raw().await;
    let reply = other.cmd(write).await;
    assert!(!reply.starts_with(b"-"), "{write:?}: {}", text(&reply));
    let kept = lease_kept(&mut d, key, &token, SECOND).await;

    // With the key missing, the next reader must wait for the loader: a
    // second loader answers nil at once (a second database load).
    let missing = direct_get(&mut d, key).await.is_none();
    let mut reader = None;
    let mut second_loader = None;
    if missing {
        let mut r = all[0].tierd.raw().await;
        r.send(&encode(&["GET", key])).await;
        match r.try_frame(SECOND).await {
            None => reader = Some(r),
            Some(frame) => second_loader = Some(text(&frame)),
        }
    }
    assert!(
        kept.is_ok() && second_loader.is_none(),
        "{write:?} by a client that is not the loader, through {}: lease: {kept:?}; \
         the next reader {}",
        if writer_on == 0 {
            "the loader's tierd"
        } else {
            "another tierd"
        },
        match (&second_loader, missing) {
            (Some(f), _) => format!("was made a second loader (got {f:?} at once)"),
            (None, true) => "waited for the loader".into(),
            (None, false) => "found the value written".into(),
        }
    );

    // The loader's own write deletes the lease, and wakes the reader.
    assert_frame(&loader.cmd(&["SET", key, "loaded"]).await, b"+OK\r\n");
    wait_lease_gone(&mut d, key, 2 * SECOND).await;
    if let Some(mut r) = reader {
        assert_frame(&r.frame().await, &bulk("loaded"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_another_tierd_leaves_the_loaders_lease_alone() {
    let _serial = SERIAL.lock().await;
    someone_else_writes(1, &["SET", "cas:1", "from-elsewhere"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_through_another_tierd_does_not_elect_a_second_loader() {
    let _serial = SERIAL.lock().await;
    someone_else_writes(1, &["DEL", "cas:2"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_by_another_client_of_the_loaders_tierd_leaves_the_lease_alone() {
    let _serial = SERIAL.lock().await;
    someone_else_writes(0, &["SET", "cas:3", "from-a-neighbour"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_del_by_another_client_of_the_loaders_tierd_does_not_elect_a_second_loader() {
    let _serial = SERIAL.lock().await;
    someone_else_writes(0, &["DEL", "cas:4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_write_through_another_tierd_does_not_elect_a_second_loader() {
    let _serial = SERIAL.lock().await;
    // A placeholder that expires while the loader is still loading.
    someone_else_writes(1, &["SET", "cas:5", "placeholder", "PX", "100"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_lived_write_by_another_client_of_the_loaders_tierd_does_not_elect_a_second_loader()
{
    let _serial = SERIAL.lock().await;
    someone_else_writes(0, &["SET", "cas:6", "placeholder", "PX", "100"]).await;
}

/// A takes the lease on instance 0 and stalls past it; C, on instance
/// `c_on`, is the next reader and the new loader; then A's late write
/// arrives. A's release compares A's token, so C's lease must stay.
async fn late_loader(c_on: usize, key: &str) {
    let redis = RedisServer::start();
    // Long enough that C's lease outlives the window checked below.
    let lease = 2 * SECOND;
    let rules = [lease_rule("late", lease, 5 * SECOND, OnTimeout::Nil)];
    let all = instances(&redis, 2, &rules).await;
    let mut d = direct(&redis).await;

    let mut a = take_lease(&all[0].tierd, key).await;
    let token_a = lease_token(&mut d, key).await.expect("A's lease");
    wait_lease_gone(&mut d, key, 5 * SECOND).await;

    let mut c = take_lease(&all[c_on].tierd, key).await;
    let token_c = lease_token(&mut d, key).await.expect("C's lease");
    assert_ne!(token_a, token_c);

    assert_frame(&a.cmd(&["SET", key, "late"]).await, b"+OK\r\n");
    lease_stays(&mut d, key, &token_c, lease / 2).await;

    assert_frame(&c.cmd(&["SET", key, "fresh"]).await, b"+OK\r\n");
    wait_lease_gone(&mut d, key, 2 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_loader_does_not_delete_its_successors_lease_on_another_tierd() {
    let _serial = SERIAL.lock().await;
    late_loader(1, "late:1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_loader_does_not_delete_its_successors_lease_on_the_same_tierd() {
    let _serial = SERIAL.lock().await;
    late_loader(0, "late:2").await;
}

// ---------------------------------------------------------------------------
// What else a Redis user meets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_loader_gets_null_and_waiters_of_both_protocols_get_the_value() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "r3:1";
    let rules = [long_lease_rule("r3")];
    let all = instances(&redis, 2, &rules).await;
    let mut loader = all[0].tierd.raw().await;
    let hello = loader.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%');
    assert_frame(&loader.cmd(&["GET", key]).await, b"_\r\n");

    let w2 = all[1].tierd.raw().await;
    let mut w3 = all[1].tierd.raw().await;
    let h = w3.cmd(&["HELLO", "3"]).await;
    assert_eq!(h[0], b'%');
    let mut stats = stats_conns(&[all[0].tierd.addr, all[1].tierd.addr]).await;
    let before = sum_counters(&mut stats, "r3").await;
    let tasks = spawn_reads(vec![w2, w3], key, 10 * SECOND);
    wait_parked(&mut stats, "r3", &before, 2, "both waiters to be parked").await;
    assert_frame(&loader.cmd(&["SET", key, "three"]).await, b"+OK\r\n");
    for t in tasks {
        let (_raw, reply, _) = t.await.unwrap();
        // A bulk string in both protocols.
        assert_eq!(show(&reply), text(&bulk("three")));
    }
    let mut later = Raw::connect(all[1].tierd.addr).await;
    assert_frame(&later.cmd(&["GET", key]).await, &bulk("three"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_that_disconnects_is_replaced_after_the_lease() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "dead:1";
    let lease = Duration::from_millis(800);
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("dead", lease, 10 * SECOND, OnTimeout::Nil)],
    )
    .await;
    let mut d = direct(&redis).await;
    let a = take_lease(&tierd, key).await;
    let died = Instant::now();
    drop(a);

    // B and C wait; once the lease expires one of them becomes the loader.
    let b = tierd.raw().await;
    let c = tierd.raw().await;
    let mut tasks = spawn_reads(vec![b, c], key, 10 * SECOND);
    let mut stats = [tierd.raw().await];
    // The first to finish is the new loader (nil), and the other waits on.
    let first = loop {
        if let Some(i) = tasks.iter().position(|t| t.is_finished()) {
            break tasks.remove(i);
        }
        assert!(
            died.elapsed() < 8 * SECOND,
            "no new loader within 8 s of a {lease:?} lease"
        );
        tokio::time::sleep(10 * MS).await;
    };
    let (mut new_loader, reply, _) = first.await.unwrap();
    assert!(
        is_nil(reply.as_deref().unwrap_or(b"")),
        "the new loader got {}",
        show(&reply)
    );
    assert!(
        lease_token(&mut d, key).await.is_some(),
        "the new loader holds no lease"
    );
    assert_frame(&new_loader.cmd(&["SET", key, "revived"]).await, b"+OK\r\n");
    let (_, reply, _) = tasks.remove(0).await.unwrap();
    assert_eq!(show(&reply), text(&bulk("revived")));
    let s = counters(&mut stats[0], "dead").await;
    assert_eq!(s.lease_grants, 2, "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_pipelined_behind_a_waiting_read_wait_too() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "pipe:1";
    let tierd = start_single(&redis, TrackingMode::Off, vec![long_lease_rule("pipe")]).await;
    let mut loader = take_lease(&tierd, key).await;
    let mut w = tierd.raw().await;
    // A client that pipelines (GET, then PING) is a reader like any other:
    // its GET waits for the loader, and the PING's reply queues behind it.
    let mut pipeline = encode(&["GET", key]);
    pipeline.extend_from_slice(&encode(&["PING"]));
    w.send(&pipeline).await;
    if let Some(early) = w.try_frame(SECOND).await {
        panic!(
            "the pipelined GET was answered {:?} while another client loads the key \
             (a nil here makes a second loader)",
            text(&early)
        );
    }
    assert_frame(&loader.cmd(&["SET", key, "v"]).await, b"+OK\r\n");
    assert_frame(&w.frame().await, &bulk("v"));
    assert_frame(&w.frame().await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_straight_to_redis_wakes_the_waiters_through_tracking() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "trk:1";
    let tierd = start_single(&redis, TrackingMode::Default, vec![long_lease_rule("trk")]).await;
    let mut d = direct(&redis).await;
    let _loader = take_lease(&tierd, key).await;
    let mut stats = [tierd.raw().await];
    let before = counters(&mut stats[0], "trk").await;
    let waiters = vec![tierd.raw().await, tierd.raw().await, tierd.raw().await];
    let tasks = spawn_reads(waiters, key, 10 * SECOND);
    wait_parked(&mut stats, "trk", &before, 3, "the waiters to be parked").await;
    // The loader writes to Redis directly, not through tierd.
    must(&mut d, &["SET", key, "bypass"]).await;
    for t in tasks {
        let (_, reply, took) = t.await.unwrap();
        assert_eq!(show(&reply), text(&bulk("bypass")), "after {took:?}");
    }
    let c = counters(&mut stats[0], "trk").await.since(before);
    assert_eq!((c.lease_wakeups, c.lease_timeouts), (3, 0), "{c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_stampede_every_reader_gets_nil_and_no_lease_is_taken() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "plain:1";
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![
            // A stampede rule on other keys: leases stay on their keys.
            long_lease_rule("other"),
            rule("plain", "plain:*", HOUR),
        ],
    )
    .await;
    let mut d = direct(&redis).await;
    let mut readers = Vec::new();
    for _ in 0..5 {
        readers.push(tierd.raw().await);
    }
    for t in spawn_reads(readers, key, 5 * SECOND) {
        let (_, reply, _) = t.await.unwrap();
        assert_eq!(show(&reply), "$-1\r\n", "a plain rule answers nil at once");
    }
    let keys = d.cmd(&["KEYS", "tierd:lease:*"]).await;
    assert_frame(&keys, b"*0\r\n");
    let mut stats = tierd.raw().await;
    let s = counters(&mut stats, "plain").await;
    assert_eq!((s.lease_grants, s.lease_waits), (0, 0), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_key_lives_under_the_configured_prefix() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let mut config = single(&redis, TrackingMode::Off, vec![long_lease_rule("pfx")]);
    config.invalidation.prefix = "myapp:".into();
    let tierd = start(config).await;
    let mut d = direct(&redis).await;
    let mut loader = take_lease(&tierd, "pfx:1").await;
    assert_frame(&d.cmd(&["EXISTS", "myapp:lease:pfx:1"]).await, b":1\r\n");
    assert_frame(&d.cmd(&["EXISTS", "tierd:lease:pfx:1"]).await, b":0\r\n");
    assert_frame(&loader.cmd(&["SET", "pfx:1", "x"]).await, b"+OK\r\n");
    let deadline = Deadline::new(2 * SECOND, "myapp:lease:pfx:1 to be deleted");
    while d.cmd(&["EXISTS", "myapp:lease:pfx:1"]).await.as_ref() != b":0\r\n" {
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nil_is_never_cached_for_a_stampede_rule() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "neg:1";
    // Negative caching on (the rule() default), tracking and the bus off:
    // if the loader's nil were cached, nothing would ever drop it.
    let r = lease_rule(
        "neg",
        Duration::from_millis(300),
        10 * SECOND,
        OnTimeout::Nil,
    );
    assert!(r.negative);
    let tierd = start_single(&redis, TrackingMode::Off, vec![r]).await;
    let mut d = direct(&redis).await;
    let _loader = take_lease(&tierd, key).await;
    wait_lease_gone(&mut d, key, 5 * SECOND).await;
    // The value arrives behind tierd's back.
    must(&mut d, &["SET", key, "arrived"]).await;
    let mut reader = tierd.raw().await;
    assert_frame(&reader.cmd(&["GET", key]).await, &bulk("arrived"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_and_metrics_show_the_new_counters() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "met:1";
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let mut config = single(
        &redis,
        TrackingMode::Off,
        vec![stampede_rule(
            "metered",
            "met:*",
            HOUR,
            30 * SECOND,
            SECOND,
            OnTimeout::Nil,
        )],
    );
    config.metrics.listen = Some(metrics);
    let tierd = start(config).await;
    let scrape_before = scrape(metrics).await;
    let mut loader = take_lease(&tierd, key).await;
    // One waiter that times out, one that is woken.
    let mut w = tierd.raw().await;
    let (reply, _) = timed_get(&mut w, key, 5 * SECOND).await;
    assert_eq!(show(&reply), "$-1\r\n");
    let mut stats = [tierd.raw().await];
    let parked = counters(&mut stats[0], "metered").await;
    let tasks = spawn_reads(vec![tierd.raw().await], key, 5 * SECOND);
    wait_parked(&mut stats, "metered", &parked, 1, "the second waiter").await;
    assert_frame(&loader.cmd(&["SET", key, "m"]).await, b"+OK\r\n");
    for t in tasks {
        assert_eq!(show(&t.await.unwrap().1), text(&bulk("m")));
    }

    // Three reads found nothing and waited: one was made the loader, one
    // was woken with the value, one ran out of `wait`. Every wait ends one
    // of those three ways: waits = grants + wakeups + timeouts.
    let want = [1, 3, 1, 1, 0, 0];
    // RESP3: a map with the fields in order (RuleStats checks the names).
    let mut r3 = tierd.raw().await;
    assert_eq!(r3.cmd(&["HELLO", "3"]).await[0], b'%');
    let s = rule_stats(&mut r3, "metered").await;
    let stats = [
        s.lease_grants,
        s.lease_waits,
        s.lease_wakeups,
        s.lease_timeouts,
        s.coalesced,
        s.refreshes,
    ];
    let scrape_after = scrape(metrics).await;
    let names = [
        "tierd_lease_grants_total",
        "tierd_lease_waits_total",
        "tierd_lease_wakeups_total",
        "tierd_lease_timeouts_total",
        "tierd_l1_coalesced_total",
        "tierd_l1_refreshes_total",
    ];
    let exported: Vec<u64> = names
        .iter()
        .map(|name| {
            let after = sample(&scrape_after, name, "metered").unwrap_or_else(|| {
                panic!("/metrics has no {name}{{rule=\"metered\"}}:\n{scrape_after}")
            });
            (after - sample(&scrape_before, name, "metered").unwrap_or(0.0)) as u64
        })
        .collect();
    assert!(
        stats == want && exported == want,
        "(grants, waits, wakeups, timeouts, coalesced, refreshes): wanted {want:?}, \
         CACHE.STATS says {stats:?}, /metrics says {exported:?}"
    );
}

/// `GET /metrics` on `addr`: the body (polling until the listener accepts).
async fn scrape(addr: SocketAddr) -> String {
    let deadline = Deadline::new(10 * SECOND, format!("metrics listener on {addr}"));
    let mut stream = loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) => deadline.tick().await,
        }
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(10 * SECOND, stream.read_to_end(&mut raw))
        .await
        .expect("/metrics within 10 s")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
    body.to_owned()
}

/// The value of `name{rule="<rule>"}` in a scrape.
fn sample(body: &str, name: &str, rule: &str) -> Option<f64> {
    let label = format!("rule=\"{rule}\"");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .find(|l| l.starts_with(&format!("{name}{{")) && l.contains(&label))
        .and_then(|l| l.rsplit(' ').next())
        .map(|v| v.parse().unwrap())
}

#[test]
fn the_config_rejects_stampede_and_refresh_ahead_where_they_cannot_work() {
    let load = |toml: &str| {
        Config::from_toml_str(
            toml,
            &tierd::config::Overrides {
                listen: None,
                upstream: None,
                log_level: None,
                metrics_listen: None,
            },
        )
    };
    let ok = load(
        "[l1]\ncoalesce = false\n\
         [[rules]]\nname = \"a\"\nmatch = \"a:*\"\nttl = \"1m\"\n\
         stampede = { lease = \"5s\", wait = \"2s\", on_timeout = \"error\" }\n\
         refresh_ahead = 0.8\n\
         [[rules]]\nname = \"b\"\nmatch = \"b:*\"\nttl = \"1m\"\n\
         refresh_ahead = { beta = 2.5 }\n",
    )
    .unwrap();
    assert!(!ok.l1.coalesce);
    let a = ok.rules[0].stampede.unwrap();
    assert_eq!(
        (a.lease, a.wait, a.on_timeout),
        (5 * SECOND, 2 * SECOND, OnTimeout::Error)
    );
    assert_eq!(ok.rules[0].refresh_ahead, Some(RefreshAhead::Ratio(0.8)));
    assert_eq!(
        ok.rules[1].refresh_ahead,
        Some(RefreshAhead::XFetch { beta: 2.5 })
    );
    assert!(load("").unwrap().l1.coalesce, "coalescing is on by default");
    let d =
        load("[[rules]]\nname = \"a\"\nmatch = \"a:*\"\nttl = \"1m\"\nstampede = {}\n").unwrap();
    let st = d.rules[0].stampede.unwrap();
    assert_eq!(
        (st.lease, st.wait, st.on_timeout),
        (5 * SECOND, 2 * SECOND, OnTimeout::Nil)
    );

    // A rule `a` with these lines after its name and pattern; the error
    // must name the field.
    for (lines, field) in [
        ("cache = false\nstampede = { lease = \"5s\" }", "stampede"),
        ("cache = false\nrefresh_ahead = 0.5", "refresh_ahead"),
        ("ttl = \"1m\"\nrefresh_ahead = 1.0", "refresh_ahead"),
        ("ttl = \"1m\"\nrefresh_ahead = 0", "refresh_ahead"),
        (
            "ttl = \"1m\"\nrefresh_ahead = { beta = 0 }",
            "refresh_ahead",
        ),
        (
            "ttl = \"1m\"\nstampede = { on_timeout = \"wait\" }",
            "on_timeout",
        ),
        ("ttl = \"1m\"\nstampede = { lease = \"0s\" }", "lease"),
        ("ttl = \"1m\"\nstampede = { wait = \"0s\" }", "wait"),
    ] {
        let toml = &format!("[[rules]]\nname = \"a\"\nmatch = \"a:*\"\n{lines}\n");
        let err = load(toml).expect_err(toml).to_string();
        assert!(
            err.contains(field),
            "{toml:?}: the error should name {field}: {err}"
        );
    }
}

// ---------------------------------------------------------------------------
// More of what a Redis user meets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_waiter_that_times_out_gets_resp3_null() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "t3:1";
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("t3", 30 * SECOND, 300 * MS, OnTimeout::Nil)],
    )
    .await;
    let _loader = take_lease(&tierd, key).await;
    let mut w = tierd.raw().await;
    assert_eq!(w.cmd(&["HELLO", "3"]).await[0], b'%');
    let (reply, took) = timed_get(&mut w, key, 5 * SECOND).await;
    assert_eq!(show(&reply), "_\r\n");
    assert!(took >= 300 * MS, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_loaders_own_second_read_does_not_wait_for_itself() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "self:1";
    let tierd = start_single(&redis, TrackingMode::Off, vec![long_lease_rule("self")]).await;
    let mut loader = take_lease(&tierd, key).await;
    // A loader checking again before it loads (read-through code often
    // does) must not be parked behind its own lease for `wait`.
    let (reply, took) = timed_get(&mut loader, key, 5 * SECOND).await;
    assert_eq!(show(&reply), "$-1\r\n", "after {took:?}");
    // Others still wait for it.
    let mut stats = [tierd.raw().await];
    let before = counters(&mut stats[0], "self").await;
    let tasks = spawn_reads(vec![tierd.raw().await], key, 10 * SECOND);
    wait_parked(&mut stats, "self", &before, 1, "another reader to wait").await;
    assert_frame(&loader.cmd(&["SET", key, "mine"]).await, b"+OK\r\n");
    for t in tasks {
        assert_eq!(show(&t.await.unwrap().1), text(&bulk("mine")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_that_disconnects_is_never_made_the_loader() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "gone:1";
    let lease = Duration::from_millis(800);
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("gone", lease, 10 * SECOND, OnTimeout::Nil)],
    )
    .await;
    let mut stats = [tierd.raw().await];
    // A loads and stalls; B waits, then leaves; C waits.
    let a = take_lease(&tierd, key).await;
    let before = counters(&mut stats[0], "gone").await;
    let mut b = tierd.raw().await;
    b.send(&encode(&["GET", key])).await;
    wait_parked(&mut stats, "gone", &before, 1, "B to wait").await;
    drop(b);
    let tasks = spawn_reads(vec![tierd.raw().await], key, 10 * SECOND);
    // When A's lease runs out, C (the only client still waiting) is the
    // new loader: one more grant, not one for B's closed connection
    // followed by another lease of waiting.
    let (mut c, reply, took) = tasks.into_iter().next().unwrap().await.unwrap();
    assert!(
        is_nil(reply.as_deref().unwrap_or(b"")),
        "C got {} after {took:?}",
        show(&reply)
    );
    let s = counters(&mut stats[0], "gone").await.since(before);
    assert_eq!(s.lease_grants, 1, "{s:?}");
    assert_frame(&c.cmd(&["SET", key, "c"]).await, b"+OK\r\n");
    drop(a);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_writing_in_a_transaction_wakes_every_instance_and_releases_its_lease() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "tx:1";
    let rules = [long_lease_rule("tx")];
    let Fleet {
        all,
        mut stats,
        mut d,
        ..
    } = fleet(&redis, 2, &rules).await;
    let mut loader = take_lease(&all[0].tierd, key).await;
    let before = sum_counters(&mut stats, "tx").await;
    let tasks = spawn_reads(
        vec![all[0].tierd.raw().await, all[1].tierd.raw().await],
        key,
        10 * SECOND,
    );
    wait_parked(&mut stats, "tx", &before, 2, "both waiters to be parked").await;
    // SET and EXPIRE together, as applications that load with a TTL do.
    assert_frame(&loader.cmd(&["MULTI"]).await, b"+OK\r\n");
    assert_frame(&loader.cmd(&["SET", key, "tx-value"]).await, b"+QUEUED\r\n");
    assert_frame(&loader.cmd(&["EXPIRE", key, "600"]).await, b"+QUEUED\r\n");
    assert_frame(&loader.cmd(&["EXEC"]).await, b"*2\r\n+OK\r\n:1\r\n");
    for t in tasks {
        let (_, reply, took) = t.await.unwrap();
        assert_eq!(show(&reply), text(&bulk("tx-value")), "after {took:?}");
    }
    wait_lease_gone(&mut d, key, 2 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_hash_is_loaded_once_too() {
    let _serial = SERIAL.lock().await;
    // Any cacheable single-key read that answers nil takes the lease: here
    // HGET of a hash that does not exist yet.
    let redis = RedisServer::start();
    let key = "h:user:9";
    let tierd = start_single(&redis, TrackingMode::Off, vec![long_lease_rule("h")]).await;
    let mut d = direct(&redis).await;
    let mut loader = tierd.raw().await;
    assert_frame(&loader.cmd(&["HGET", key, "name"]).await, b"$-1\r\n");
    assert!(
        lease_token(&mut d, key).await.is_some(),
        "no lease for HGET"
    );
    let mut stats = [tierd.raw().await];
    let before = counters(&mut stats[0], "h").await;
    let mut waiters = Vec::new();
    for _ in 0..3 {
        let mut w = tierd.raw().await;
        w.send(&encode(&["HGET", key, "name"])).await;
        waiters.push(w);
    }
    wait_parked(&mut stats, "h", &before, 3, "the HGETs to wait").await;
    assert_frame(
        &loader
            .cmd(&["HSET", key, "name", "Ada", "lang", "en"])
            .await,
        b":2\r\n",
    );
    for w in waiters.iter_mut() {
        assert_frame(&w.frame().await, &bulk("Ada"));
    }
    wait_lease_gone(&mut d, key, 2 * SECOND).await;
    // A missing field of an existing hash is an answer, not a load.
    let mut r = tierd.raw().await;
    assert_frame(&r.cmd(&["HGET", key, "age"]).await, b"$-1\r\n");
    assert_eq!(lease_token(&mut d, key).await, None);
}

/// While Redis is stopped, A's `GET key` is in flight (the leader); then,
/// if `write`, W writes the key through tierd, pipelined with a read of it;
/// then X sends the same `GET key`. Returns how many reads joined A's
/// (`coalesced`), and W's two replies.
async fn join_after_write(write: bool) -> (u64, Vec<Bytes>) {
    let redis = RedisServer::start();
    let key = "ryw:1";
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", key, "old"]).await;
    let tierd = start_single(&redis, TrackingMode::Off, vec![rule("ryw", "ryw:*", HOUR)]).await;
    let mut stats = [tierd.raw().await];
    // An L1 entry of the key (STRLEN's), whose invalidation shows in
    // CACHE.STATS when W's write reaches tierd.
    let mut r = tierd.raw().await;
    for _ in 0..2 {
        assert_frame(&r.cmd(&["STRLEN", key]).await, b":3\r\n");
    }
    let mut a = tierd.raw().await;
    let mut w = tierd.raw().await;
    let mut x = tierd.raw().await;
    let before = counters(&mut stats[0], "ryw").await;
    let invalidations = rule_stats(&mut stats[0], "ryw").await.invalidations;

    redis.pause();
    a.send(&encode(&["GET", key])).await;
    wait_counters(
        &mut stats,
        "ryw",
        5 * SECOND,
        "A's read to be in flight",
        |c| c.misses > before.misses,
    )
    .await;
    if write {
        let mut pipeline = encode(&["SET", key, "new"]);
        pipeline.extend_from_slice(&encode(&["GET", key]));
        w.send(&pipeline).await;
        // tierd invalidates the key before it forwards the write.
        let deadline = Deadline::new(5 * SECOND, "W's write to invalidate the key in L1");
        while rule_stats(&mut stats[0], "ryw").await.invalidations == invalidations {
            deadline.tick().await;
        }
    }
    x.send(&encode(&["GET", key])).await;
    let looked_up = wait_counters(&mut stats, "ryw", 5 * SECOND, "X's read", |c| {
        c.misses - before.misses >= 2
    })
    .await;
    redis.resume();
    let mut w_replies = Vec::new();
    if write {
        w_replies.push(w.frame().await);
        w_replies.push(w.frame().await);
    }
    for (name, c) in [("A", &mut a), ("X", &mut x)] {
        let got = c.frame().await;
        assert!(
            got == bulk("old") || got == bulk("new"),
            "{name}: {}",
            text(&got)
        );
    }
    (looked_up.since(before).coalesced, w_replies)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_never_joins_one_sent_before_a_write_of_its_key() {
    let _serial = SERIAL.lock().await;
    let (coalesced, w) = join_after_write(true).await;
    assert_eq!(
        coalesced, 0,
        "X shared a read that was sent before the key was written"
    );
    // And W reads its own write.
    assert_frame(&w[0], b"+OK\r\n");
    assert_frame(&w[1], &bulk("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_write_the_same_read_joins() {
    let _serial = SERIAL.lock().await;
    // The control for the test above: the same steps, no write.
    let (coalesced, _) = join_after_write(false).await;
    assert_eq!(coalesced, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coalescing_never_shares_a_reply_across_protocols() {
    let _serial = SERIAL.lock().await;
    // A RESP3 client must get a map, a RESP2 client a flat array: reads of
    // the same key in different protocols are different reads.
    let redis = RedisServer::start();
    let key = "proto:h";
    let mut d = direct(&redis).await;
    must(&mut d, &["HSET", key, "f1", "v1", "f2", "v2"]).await;
    let want2 = d.cmd(&["HGETALL", key]).await;
    let mut d3 = direct(&redis).await;
    assert_eq!(d3.cmd(&["HELLO", "3"]).await[0], b'%');
    let want3 = d3.cmd(&["HGETALL", key]).await;
    assert_ne!(want2, want3);
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![rule("proto", "proto:*", HOUR)],
    )
    .await;
    let mut stats = [tierd.raw().await];
    let mut r2a = tierd.raw().await;
    let mut r2b = tierd.raw().await;
    let mut r3 = tierd.raw().await;
    assert_eq!(r3.cmd(&["HELLO", "3"]).await[0], b'%');
    let before = counters(&mut stats[0], "proto").await;

    // One at a time, each in tierd before the next is sent.
    redis.pause();
    for (n, r) in [&mut r2a, &mut r3, &mut r2b].into_iter().enumerate() {
        r.send(&encode(&["HGETALL", key])).await;
        wait_counters(
            &mut stats,
            "proto",
            5 * SECOND,
            "the read to reach tierd",
            |c| c.misses - before.misses > n as u64,
        )
        .await;
    }
    redis.resume();
    assert_frame(&r2a.frame().await, &want2);
    assert_frame(&r2b.frame().await, &want2);
    assert_frame(&r3.frame().await, &want3);
    let c = counters(&mut stats[0], "proto").await.since(before);
    assert_eq!(c.coalesced, 1, "the second RESP2 read only: {c:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tryagain_error_for_a_key_with_line_breaks_is_one_frame() {
    let _serial = SERIAL.lock().await;
    let redis = RedisServer::start();
    let key = "brk:a\r\nb";
    let tierd = start_single(
        &redis,
        TrackingMode::Off,
        vec![lease_rule("brk", 30 * SECOND, 200 * MS, OnTimeout::Error)],
    )
    .await;
    let _loader = take_lease(&tierd, key).await;
    let mut w = tierd.raw().await;
    let err = text(&w.cmd(&["GET", key]).await);
    assert!(
        err.starts_with(
            "-TRYAGAIN tierd: brk:a  b is still being loaded by another client (waited "
        ),
        "{err:?}"
    );
    // Nothing more than that one line came: the next reply is PING's.
    assert_frame(&w.cmd(&["PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reads_on_one_multiplexed_connection_all_wait_for_the_loader() {
    let _serial = SERIAL.lock().await;
    // Client libraries that multiplex (redis-rs here; ioredis, Lettuce and
    // StackExchange.Redis do the same) pipeline the concurrent requests of
    // many application tasks on one connection. Each of those reads is a
    // reader of the key like any other: none may get the loader's nil.
    const TASKS: usize = 20;
    let redis = RedisServer::start();
    let key = "mux:1";
    let tierd = start_single(&redis, TrackingMode::Off, vec![long_lease_rule("mux")]).await;
    let mut loader = take_lease(&tierd, key).await;
    let mut stats = [tierd.raw().await];
    let before = counters(&mut stats[0], "mux").await;
    let conn = tierd.client().await;

    // Redis stopped, so that every read is in tierd before any upstream
    // reply comes back.
    redis.pause();
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let mut c = conn.clone();
            let key = key.to_owned();
            tokio::spawn(async move {
                redis::cmd("GET")
                    .arg(&key)
                    .query_async::<Option<String>>(&mut c)
                    .await
            })
        })
        .collect();
    wait_counters(
        &mut stats,
        "mux",
        5 * SECOND,
        "every read to reach tierd",
        |c| c.misses - before.misses >= TASKS as u64,
    )
    .await;
    redis.resume();
    // A read answered before the loader writes can only be a nil: give
    // such answers a second to show (none should).
    let _ = tokio::time::timeout(SECOND, async {
        while !tasks.iter().all(|t| t.is_finished()) {
            tokio::time::sleep(10 * MS).await;
        }
    })
    .await;
    let early: Vec<usize> = tasks
        .iter()
        .enumerate()
        .filter(|(_, t)| t.is_finished())
        .map(|(i, _)| i)
        .collect();
    assert_frame(&loader.cmd(&["SET", key, "muxed"]).await, b"+OK\r\n");
    let mut nils = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Some(v)) => assert_eq!(v, "muxed"),
            Ok(None) => nils += 1,
            Err(e) => panic!("GET through the multiplexed connection failed: {e}"),
        }
    }
    assert_eq!(
        nils, 0,
        "{nils} of {TASKS} concurrent reads on one multiplexed connection got nil while \
         another client was loading the key (answered before the load: tasks {early:?})"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loader_reading_a_key_another_client_is_loading_waits_for_it() {
    let _serial = SERIAL.lock().await;
    // Loading one object often reads others through the same cache: the
    // loader of dep:a reads dep:b, which another client is loading.
    let redis = RedisServer::start();
    let tierd = start_single(&redis, TrackingMode::Off, vec![long_lease_rule("dep")]).await;
    let mut loader_b = take_lease(&tierd, "dep:b").await;
    let mut loader_a = take_lease(&tierd, "dep:a").await;
    loader_a.send(&encode(&["GET", "dep:b"])).await;
    if let Some(early) = loader_a.try_frame(SECOND).await {
        panic!(
            "the loader of dep:a got {:?} for dep:b at once, while another client loads it: \
             a second loader of dep:b",
            text(&early)
        );
    }
    assert_frame(&loader_b.cmd(&["SET", "dep:b", "b"]).await, b"+OK\r\n");
    assert_frame(&loader_a.frame().await, &bulk("b"));
    assert_frame(&loader_a.cmd(&["SET", "dep:a", "a"]).await, b"+OK\r\n");
}
