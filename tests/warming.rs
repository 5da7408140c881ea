//! Warming (issue 7): rules with `warm` load keys into L1 when tierd
//! starts, while it already serves, every `interval`, and on `CACHE.WARM`;
//! instances record their hottest keys in Redis (`{prefix}hot:{rule}`), and
//! a starting instance warms from them.
//!
//! Real redis-server processes and in-process tierds on loopback. Waits
//! poll a condition with a deadline ([`Deadline`]); nothing sleeps in place
//! of synchronisation.
//!
//! A warmed key fills two L1 replies, the RESP2 and the RESP3 reply of
//! `GET`, and `CACHE.STATS` counts replies: `entries` is twice the keys.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::l1::{
    decode, direct, l1_config, no_cache_rule, rule, rule_stats, upstream_calls, Resp, HOUR,
};
use support::l1::{L1Probe, Outcome};
use support::probe::Deadline;
use support::{free_port, RedisServer, Tierd};
use tierd::config::{Config, RuleConfig, TrackingMode, WarmConfig};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SECOND: Duration = Duration::from_secs(1);

fn warm(on_startup: bool, limit: usize, hot: bool, scan: bool) -> WarmConfig {
    WarmConfig {
        on_startup,
        interval: None,
        limit,
        hot,
        scan,
    }
}

/// A caching rule (ttl 1h) that warms.
fn warm_rule(name: &str, pattern: &str, w: WarmConfig) -> RuleConfig {
    let mut r = rule(name, pattern, HOUR);
    r.warm = Some(w);
    r
}

fn config(redis: &RedisServer, rules: Vec<RuleConfig>) -> Config {
    l1_config(&redis.url(), TrackingMode::Default, rules)
}

/// `SET {prefix}{i} v{i}` for `i` in `range`, straight into Redis,
/// pipelined.
async fn fill_redis(redis: &RedisServer, prefix: &str, range: std::ops::Range<usize>) {
    let mut raw = direct(redis).await;
    for chunk in range.collect::<Vec<_>>().chunks(1000) {
        let mut batch = Vec::new();
        for i in chunk {
            let (key, value) = (format!("{prefix}{i}"), format!("v{i}"));
            batch.extend_from_slice(&tierd::protocol::reply::encode_command(&[
                b"SET",
                key.as_bytes(),
                value.as_bytes(),
            ]));
        }
        raw.send(&batch).await;
        for _ in chunk {
            assert_eq!(&raw.frame().await[..], b"+OK\r\n");
        }
    }
}

fn bulk(s: &str) -> Vec<u8> {
    format!("${}\r\n{s}\r\n", s.len()).into_bytes()
}

fn text(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame).into_owned()
}

fn int(frame: &[u8]) -> i64 {
    match decode(frame) {
        Resp::Int(n) => n,
        other => panic!("expected an integer, got {other:?} ({})", text(frame)),
    }
}

/// Waits until `rule`'s `entries` reaches `want`; returns when it did.
async fn until_entries(tierd: &Tierd, rule: &str, want: u64, limit: Duration) -> Instant {
    let mut stats = tierd.raw().await;
    let deadline = Deadline::new(limit, format!("CACHE.STATS {rule} entries = {want}"));
    loop {
        let entries = rule_stats(&mut stats, rule).await.entries;
        assert!(
            entries <= want,
            "{rule}: {entries} entries, more than {want}"
        );
        if entries == want {
            return Instant::now();
        }
        deadline.tick().await;
    }
}

/// Waits until tierd caches (its tracking and bus links are live): a key
/// of `rule` read twice is a hit the second time.
async fn until_caching(redis: &RedisServer, tierd: &Tierd, rule: &str, key: &str) {
    let mut probe = L1Probe::new(redis, tierd, rule).await;
    let deadline = Deadline::new(10 * SECOND, format!("tierd caching GET {key}"));
    loop {
        probe.read(&["GET", key]).await;
        if probe.read(&["GET", key]).await.1 == Outcome::Hit {
            return;
        }
        deadline.tick().await;
    }
}

async fn zrevrange(redis: &RedisServer, key: &str) -> Vec<String> {
    let mut raw = direct(redis).await;
    let frame = raw.cmd(&["ZREVRANGE", key, "0", "-1"]).await;
    decode(&frame)
        .elements()
        .unwrap_or_else(|| panic!("ZREVRANGE {key}: {}", text(&frame)))
        .iter()
        .map(|e| e.as_text().unwrap())
        .collect()
}

/// The value of `series` (exactly as rendered) on tierd's `/metrics`.
async fn metric(addr: SocketAddr, series: &str) -> Option<f64> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(10 * SECOND, stream.read_to_end(&mut raw))
        .await
        .expect("/metrics did not answer within 10 s")
        .unwrap();
    let body = String::from_utf8_lossy(&raw).into_owned();
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

// ---------------------------------------------------------------------------
// On startup
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_warming_fills_l1_while_clients_are_already_served() {
    const KEYS: usize = 20_000;
    const RATE: usize = 5_000;
    let redis = RedisServer::start();
    fill_redis(&redis, "user:", 0..KEYS).await;
    let mut cfg = config(
        &redis,
        vec![
            warm_rule("users", "user:{id}", warm(true, KEYS, true, true)),
            rule("other", "other:*", HOUR),
        ],
    );
    cfg.warming.rate = RATE;
    let metrics_addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    cfg.metrics.listen = Some(metrics_addr);
    let started = Instant::now();
    let tierd = Tierd::start_with(cfg).await;

    // A client that reads and writes from the first moment, and checks
    // every reply, until warming is done.
    let mut client = tierd.raw().await;
    let mut stats = tierd.raw().await;
    let mut first_reply = None;
    let mut served_during_warming = 0usize;
    let deadline = Deadline::new(120 * SECOND, "warming 20,000 keys");
    let mut i = 0usize;
    loop {
        let k = (i * 7919) % KEYS;
        let got = client.cmd(&["GET", &format!("user:{k}")]).await;
        assert_eq!(got, bulk(&format!("v{k}")), "GET user:{k}");
        let (key, value) = (format!("other:{i}"), format!("w{i}"));
        assert_eq!(&client.cmd(&["SET", &key, &value]).await[..], b"+OK\r\n");
        assert_eq!(client.cmd(&["GET", &key]).await, bulk(&value));
        first_reply.get_or_insert_with(Instant::now);
        i += 1;
        if i % 20 != 0 {
            continue;
        }
        let entries = rule_stats(&mut stats, "users").await.entries;
        if entries >= 2 * KEYS as u64 {
            break;
        }
        served_during_warming = i;
        deadline.tick().await;
    }
    let done = until_entries(&tierd, "users", 2 * KEYS as u64, 10 * SECOND).await;
    let first_reply = first_reply.unwrap();
    assert!(
        served_during_warming >= 100,
        "only {served_during_warming} rounds were served while warming"
    );
    assert!(
        first_reply < done,
        "the first reply came only after warming was done"
    );
    // Paced at [warming] rate: 20,000 keys at 5,000 a second take 4 s.
    let took = done - started;
    assert!(
        took >= Duration::from_secs(3),
        "20,000 keys warmed in {took:?}, faster than [warming] rate allows"
    );

    // Every key is now an L1 hit, in RESP2 and in RESP3.
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    for k in [0, 1, 9_999, 19_999] {
        let (got, outcome) = probe.read(&["GET", &format!("user:{k}")]).await;
        assert_eq!(
            (got, outcome),
            (bulk(&format!("v{k}")).into(), Outcome::Hit)
        );
    }
    probe.resp3().await;
    for k in [2, 12_345] {
        let (got, outcome) = probe.read(&["GET", &format!("user:{k}")]).await;
        assert_eq!(
            (got, outcome),
            (bulk(&format!("v{k}")).into(), Outcome::Hit)
        );
    }

    // Counted once, with the keys it loaded.
    let runs = "tierd_warm_runs_total{rule=\"users\"}";
    let keys = "tierd_warm_keys_total{rule=\"users\"}";
    assert_eq!(metric(metrics_addr, runs).await, Some(1.0));
    assert_eq!(metric(metrics_addr, keys).await, Some(KEYS as f64));
    assert_eq!(
        metric(metrics_addr, "tierd_warm_runs_total{rule=\"other\"}").await,
        None,
        "a rule without warm has no warming counters"
    );
}

// ---------------------------------------------------------------------------
// CACHE.WARM
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_warm_loads_what_its_rule_caches_and_counts_it() {
    let redis = RedisServer::start();
    fill_redis(&redis, "user:", 0..100).await;
    fill_redis(&redis, "user:secret:", 0..10).await;
    fill_redis(&redis, "plain:", 0..10).await;
    let mut d = direct(&redis).await;
    // Not strings: SCAN's TYPE string leaves them out.
    assert_eq!(int(&d.cmd(&["HSET", "user:h", "f", "v"]).await), 1);
    assert_eq!(int(&d.cmd(&["RPUSH", "user:l", "x"]).await), 1);
    let tierd = Tierd::start_with(config(
        &redis,
        vec![
            no_cache_rule("secrets", "user:secret:*"),
            warm_rule("users", "user:{id}", warm(false, 1000, true, true)),
            rule("plain", "plain:*", HOUR),
        ],
    ))
    .await;
    until_caching(&redis, &tierd, "plain", "plain:0").await;
    let mut t = tierd.raw().await;

    // The 100 string keys of the rule: not the hash, the list, nor the
    // keys an earlier `cache = false` rule claims.
    assert_eq!(int(&t.cmd(&["CACHE.WARM", "users"]).await), 100);
    assert_eq!(rule_stats(&mut t, "users").await.entries, 200);
    // Without a rule: every rule with warm (here the one).
    assert_eq!(int(&t.cmd(&["cache.warm"]).await), 100);
    assert_eq!(rule_stats(&mut t, "users").await.entries, 200);

    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    let (got, outcome) = probe.read(&["GET", "user:42"]).await;
    assert_eq!((got, outcome), (bulk("v42").into(), Outcome::Hit));
    let (_, outcome) = probe.read(&["HGETALL", "user:h"]).await;
    assert_eq!(outcome, Outcome::Miss, "the hash was not warmed");
    // Warming loads as a fill does: a write through tierd still wins.
    assert_eq!(&t.cmd(&["SET", "user:42", "new"]).await[..], b"+OK\r\n");
    assert_eq!(probe.read(&["GET", "user:42"]).await.0, bulk("new"));

    // Errors.
    assert_eq!(
        text(&t.cmd(&["CACHE.WARM", "nope"]).await),
        "-ERR no such rule 'nope'\r\n"
    );
    let plain = text(&t.cmd(&["CACHE.WARM", "plain"]).await);
    assert!(
        plain.starts_with("-ERR rule 'plain' has no warm setting"),
        "{plain}"
    );
    assert_eq!(
        text(&t.cmd(&["CACHE.WARM", "users", "x"]).await),
        "-ERR wrong number of arguments for 'cache.warm' command\r\n"
    );
    assert_eq!(&t.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(
        text(&t.cmd(&["CACHE.WARM"]).await),
        "-ERR CACHE commands inside MULTI are not supported\r\n"
    );
    assert_eq!(
        text(&t.cmd(&["EXEC"]).await),
        "-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    let help = text(&t.cmd(&["CACHE.HELP"]).await);
    assert!(help.contains("+CACHE.WARM [<rule>]\r\n"), "{help}");

    // Another identity may not warm the default identity's L1.
    assert_eq!(
        &d.cmd(&["ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all"])
            .await[..],
        b"+OK\r\n"
    );
    let mut alice = tierd.raw().await;
    assert_eq!(&alice.cmd(&["AUTH", "alice", "pw"]).await[..], b"+OK\r\n");
    let refused = text(&alice.cmd(&["CACHE.WARM", "users"]).await);
    assert!(refused.starts_with("-NOPERM "), "{refused}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_warm_without_rules_to_warm_or_without_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start_with(config(&redis, vec![rule("plain", "plain:*", HOUR)])).await;
    until_caching(&redis, &tierd, "plain", "plain:0").await;
    let mut t = tierd.raw().await;
    // Nothing warms: nothing is loaded.
    assert_eq!(int(&t.cmd(&["CACHE.WARM"]).await), 0);

    // Without a caching rule there is no L1 at all.
    let bare = Tierd::start_with(config(&redis, vec![])).await;
    let mut b = bare.raw().await;
    assert_eq!(int(&b.cmd(&["CACHE.WARM"]).await), 0);
    assert_eq!(
        text(&b.cmd(&["CACHE.WARM", "plain"]).await),
        "-ERR no such rule 'plain'\r\n"
    );

    // Redis gone: an error, at once or after the command timeout, never a
    // hang and never a count.
    let mut redis = redis;
    let warmed = Tierd::start_with(config(
        &redis,
        vec![warm_rule("users", "user:*", warm(false, 10, true, true))],
    ))
    .await;
    until_caching(&redis, &warmed, "users", "user:0").await;
    let mut w = warmed.raw().await;
    assert_eq!(int(&w.cmd(&["CACHE.WARM", "users"]).await), 0);
    redis.kill();
    w.send_cmd(&[b"CACHE.WARM", b"users"]).await;
    let reply = w
        .try_frame(30 * SECOND)
        .await
        .expect("CACHE.WARM with Redis down did not answer within 30 s");
    assert!(reply.starts_with(b"-"), "{}", text(&reply));
}

// ---------------------------------------------------------------------------
// Limits and switches
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_scan_hot_and_on_startup_are_respected() {
    let redis = RedisServer::start();
    fill_redis(&redis, "a:", 0..100).await;
    fill_redis(&redis, "b:", 0..100).await;
    fill_redis(&redis, "c:", 0..5).await;
    fill_redis(&redis, "d:", 0..400).await;
    // A hot set for `b` that names keys of b (some), and one key that is
    // not b's (skipped: another rule matches it).
    let mut d = direct(&redis).await;
    for (score, key) in [("30", "b:7"), ("20", "b:3"), ("10", "a:1"), ("5", "b:99")] {
        assert_eq!(int(&d.cmd(&["ZADD", "tierd:hot:b", score, key]).await), 1);
    }
    let mut cfg = config(
        &redis,
        vec![
            // Scan only, at most 30 keys.
            warm_rule("a", "a:*", warm(false, 30, false, true)),
            // Hot set only: its three keys of b, highest first.
            warm_rule("b", "b:*", warm(false, 1000, true, false)),
            // Not on startup.
            warm_rule("c", "c:*", warm(false, 100, true, true)),
            // On startup, slowly: a yardstick for c.
            warm_rule("d", "d:*", warm(true, 400, false, true)),
        ],
    );
    cfg.warming.rate = 2000;
    let tierd = Tierd::start_with(cfg).await;
    until_entries(&tierd, "d", 800, 30 * SECOND).await;
    let mut t = tierd.raw().await;
    // d's startup run (0.2 s of pace) is done; c, which would have run
    // beside it, did not.
    assert_eq!(rule_stats(&mut t, "c").await.entries, 0);

    assert_eq!(int(&t.cmd(&["CACHE.WARM", "a"]).await), 30);
    assert_eq!(rule_stats(&mut t, "a").await.entries, 60);
    assert_eq!(int(&t.cmd(&["CACHE.WARM", "b"]).await), 3);
    assert_eq!(rule_stats(&mut t, "b").await.entries, 6);
    let mut probe = L1Probe::new(&redis, &tierd, "b").await;
    for (key, want) in [
        ("b:7", Outcome::Hit),
        ("b:99", Outcome::Hit),
        ("b:8", Outcome::Miss),
    ] {
        assert_eq!(probe.read(&["GET", key]).await.1, want, "{key}");
    }
    // A hot key that is gone: nothing to load, nothing counted (warming
    // never caches a nil).
    assert_eq!(int(&d.cmd(&["DEL", "b:3"]).await), 1);
    assert_eq!(int(&t.cmd(&["CACHE.WARM", "b"]).await), 2);
    assert_eq!(int(&t.cmd(&["CACHE.WARM", "c"]).await), 5);
}

/// `SCAN` pages are paced too, each as 100 keys (a tenth of its `COUNT`):
/// a rule whose keys are few in a large keyspace walks it at
/// `[warming] rate`, not as fast as Redis answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scan_pages_of_a_sparse_keyspace_are_paced() {
    const RATE: usize = 1_000;
    // What one page costs at RATE: 100 keys' worth.
    const PAGE_COST: Duration = Duration::from_millis(100);
    let redis = RedisServer::start();
    fill_redis(&redis, "other:", 0..10_000).await;
    fill_redis(&redis, "sparse:", 0..3).await;
    let mut cfg = config(
        &redis,
        vec![
            warm_rule("sparse", "sparse:*", warm(false, 1000, false, true)),
            rule("plain", "plain:*", HOUR),
        ],
    );
    cfg.warming.rate = RATE;
    let tierd = Tierd::start_with(cfg).await;
    until_caching(&redis, &tierd, "plain", "plain:0").await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let scans = upstream_calls(&mut d, "scan").await;
    let started = Instant::now();
    assert_eq!(int(&t.cmd(&["CACHE.WARM", "sparse"]).await), 3);
    let took = started.elapsed();
    let pages = upstream_calls(&mut d, "scan").await - scans;
    assert!(pages >= 8, "only {pages} SCAN pages over 10,000 keys");
    // The first page goes at once, each later one a page's cost after the
    // one before it.
    let floor = PAGE_COST * u32::try_from(pages - 1).unwrap();
    assert!(
        took >= floor * 9 / 10,
        "{pages} SCAN pages in {took:?}: faster than [warming] rate allows ({floor:?})"
    );
}

// ---------------------------------------------------------------------------
// Hot sets
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_hot_set_of_a_stopped_instance_warms_the_next_one() {
    let redis = RedisServer::start();
    fill_redis(&redis, "item:", 0..1000).await;
    let rules = || {
        vec![
            // Hot set only: what B loads is what A recorded.
            warm_rule("items", "item:{id}", warm(true, 1000, true, false)),
            rule("probe", "probe:*", HOUR),
        ]
    };
    let mut cfg = config(&redis, rules());
    cfg.warming.hot_keys = 100;
    // Only the write on shutdown.
    cfg.warming.hot_interval = HOUR;
    let a = Tierd::start_with(cfg.clone()).await;
    until_caching(&redis, &a, "probe", "probe:0").await;

    // 50 hot keys, read 200 times each (about 25 samples each); 500 others
    // read once.
    let hot: Vec<String> = (0..50).map(|i| format!("item:{}", i * 3)).collect();
    let mut reader = a.raw().await;
    let mut batch = Vec::new();
    for _ in 0..200 {
        for key in &hot {
            batch.extend_from_slice(&tierd::protocol::reply::encode_command(&[
                b"GET",
                key.as_bytes(),
            ]));
        }
    }
    for i in 500..1000 {
        let key = format!("item:{i}");
        batch.extend_from_slice(&tierd::protocol::reply::encode_command(&[
            b"GET",
            key.as_bytes(),
        ]));
    }
    reader.send(&batch).await;
    for _ in 0..(200 * hot.len() + 500) {
        assert!(reader.frame().await.starts_with(b"$"));
    }
    drop(reader);
    let mut d = direct(&redis).await;
    assert_eq!(int(&d.cmd(&["EXISTS", "tierd:hot:items"]).await), 0);
    a.stop().await.unwrap();

    // A wrote its hottest keys when it stopped: the hot ones first, at most
    // hot_keys in all, with an expiry.
    let set = zrevrange(&redis, "tierd:hot:items").await;
    assert!(set.len() > 50 && set.len() <= 100, "{} members", set.len());
    let top: HashSet<&String> = set[..50].iter().collect();
    assert_eq!(top, hot.iter().collect::<HashSet<_>>());
    // Ten hot_intervals (10 h here), at least an hour.
    let pttl = int(&d.cmd(&["PTTL", "tierd:hot:items"]).await);
    assert!(pttl > 35_000_000 && pttl <= 36_000_000, "PTTL {pttl}");

    // A fresh instance starts from it: its first reads of the hot keys are
    // hits, and it loaded nothing else (scan is off).
    let b = Tierd::start_with(cfg).await;
    until_entries(&b, "items", 2 * set.len() as u64, 30 * SECOND).await;
    let mut probe = L1Probe::new(&redis, &b, "items").await;
    let before = probe.stats().await;
    assert_eq!((before.hits, before.misses), (0, 0));
    for key in &hot {
        let (got, outcome) = probe.read(&["GET", key]).await;
        let i: usize = key["item:".len()..].parse().unwrap();
        assert_eq!(
            (got, outcome),
            (bulk(&format!("v{i}")).into(), Outcome::Hit)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_sets_are_written_every_hot_interval_and_trimmed() {
    let redis = RedisServer::start();
    fill_redis(&redis, "k:", 0..40).await;
    let mut cfg = config(
        &redis,
        vec![warm_rule("ks", "k:*", warm(false, 100, true, true))],
    );
    cfg.warming.hot_keys = 10;
    cfg.warming.hot_interval = Duration::from_millis(200);
    let tierd = Tierd::start_with(cfg).await;
    until_caching(&redis, &tierd, "ks", "k:39").await;
    let hot: Vec<String> = (0..10).map(|i| format!("k:{i}")).collect();
    let mut reader = tierd.raw().await;
    let deadline = Deadline::new(30 * SECOND, "a hot set of the 10 hot keys");
    loop {
        // Hot keys 50 times each per round, the others once.
        for _ in 0..50 {
            for key in &hot {
                reader.cmd(&["GET", key]).await;
            }
        }
        for i in 10..40 {
            reader.cmd(&["GET", &format!("k:{i}")]).await;
        }
        let set = zrevrange(&redis, "tierd:hot:ks").await;
        if !set.is_empty() {
            assert!(set.len() <= 10, "trimmed to hot_keys: {set:?}");
            if set.iter().collect::<HashSet<_>>() == hot.iter().collect::<HashSet<_>>() {
                break;
            }
        }
        deadline.tick().await;
    }
    // Written while tierd runs, with the hour's minimum expiry.
    let mut d = direct(&redis).await;
    let pttl = int(&d.cmd(&["PTTL", "tierd:hot:ks"]).await);
    assert!(pttl > 3_000_000 && pttl <= 3_600_000, "PTTL {pttl}");
    assert!(tierd.is_running());
}

// ---------------------------------------------------------------------------
// Interval
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_interval_warms_again_with_what_redis_holds_now() {
    let redis = RedisServer::start();
    fill_redis(&redis, "r:", 0..20).await;
    let mut w = warm(false, 1000, false, true);
    w.interval = Some(Duration::from_millis(300));
    let tierd = Tierd::start_with(config(&redis, vec![warm_rule("rs", "r:*", w)])).await;
    // Not on startup, but the first interval loads them.
    until_entries(&tierd, "rs", 40, 30 * SECOND).await;
    // New keys and a changed one, written straight into Redis: tracking
    // drops the changed one, and the next runs load both.
    fill_redis(&redis, "r:", 20..30).await;
    let mut d = direct(&redis).await;
    assert_eq!(&d.cmd(&["SET", "r:5", "changed"]).await[..], b"+OK\r\n");
    until_entries(&tierd, "rs", 60, 30 * SECOND).await;
    let mut probe = L1Probe::new(&redis, &tierd, "rs").await;
    let (got, outcome) = probe.read(&["GET", "r:5"]).await;
    assert_eq!((got, outcome), (bulk("changed").into(), Outcome::Hit));
    let (got, outcome) = probe.read(&["GET", "r:25"]).await;
    assert_eq!((got, outcome), (bulk("v25").into(), Outcome::Hit));
}
