//! The L1 tier seen from a client: which reads tierd answers from memory,
//! which it must always forward, and what `CACHE.STATS` says about it.
//!
//! A read counts as served from L1 when its rule's `hits` went up by one and
//! Redis's own `INFO commandstats` shows no new call of that command. Every
//! reply is compared byte for byte with the same command sent to Redis
//! directly, in the same protocol version.

mod support;

use std::time::{Duration, Instant};

use bytes::Bytes;
use support::exchange::{assert_frame, encode, text};
use support::l1::{
    all_stats, commandstats, decode, direct, l1_config, must, no_cache_rule, rule, rule_stats,
    upstream_calls, wait_until_caching, L1Probe, Outcome, Resp, RuleStats, HOUR, STATS_FIELDS,
};
use support::probe::bulk;
use support::{Raw, RedisServer, Tierd};
use tierd::config::TrackingMode;

/// Test data for the read tables: one key of every type under `user:`.
const USER_DATA: &[&[&str]] = &[
    &["SET", "user:s", "hello world"],
    &["HSET", "user:h", "f1", "v1", "f2", "v2", "f3", "v3"],
    &["ZADD", "user:z", "1.5", "a", "2", "b", "3.25", "c"],
    // Integers: an intset, whose SMEMBERS order is fixed.
    &["SADD", "user:set", "3", "1", "2"],
    &["RPUSH", "user:l", "a", "b", "c"],
];

/// Cacheable reads over [`USER_DATA`], each with its own L1 entry.
const USER_READS: &[&[&str]] = &[
    &["GET", "user:s"],
    &["STRLEN", "user:s"],
    &["GETRANGE", "user:s", "0", "4"],
    &["GETRANGE", "user:s", "6", "-1"],
    &["EXISTS", "user:s"],
    &["TYPE", "user:h"],
    &["HGET", "user:h", "f1"],
    &["HGET", "user:h", "f2"],
    &["HMGET", "user:h", "f1", "nope", "f3"],
    &["HGETALL", "user:h"],
    &["HLEN", "user:h"],
    &["ZSCORE", "user:z", "a"],
    &["ZSCORE", "user:z", "c"],
    &["ZRANGE", "user:z", "0", "-1", "WITHSCORES"],
    &["ZCARD", "user:z"],
    &["TYPE", "user:z"],
    &["SMEMBERS", "user:set"],
    &["SISMEMBER", "user:set", "2"],
    &["SCARD", "user:set"],
    &["LRANGE", "user:l", "0", "-1"],
    &["LLEN", "user:l"],
];

async fn setup(redis: &RedisServer, cmds: &[&[&str]]) {
    let mut d = direct(redis).await;
    for cmd in cmds {
        must(&mut d, cmd).await;
    }
}

/// tierd with tracking off (only its own writes invalidate, so nothing but
/// what a test does changes L1) and `rules`.
async fn start(redis: &RedisServer, rules: Vec<tierd::config::RuleConfig>) -> Tierd {
    start_config(l1_config(&redis.url(), TrackingMode::Off, rules)).await
}

/// Starts tierd with a first rule of its own, `warmup`, and waits until a
/// `warmup:` key is cached: before tierd has read the upstream's command
/// table it caches nothing. The test's own rules keep clean counters.
async fn start_config(mut config: tierd::config::Config) -> Tierd {
    config.rules.insert(0, rule(WARMUP, "warmup:*", HOUR));
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, WARMUP, "warmup:0").await;
    tierd
}

const WARMUP: &str = "warmup";

/// Reads every entry of `reads` twice through `probe`: the first read must
/// be a miss, the second an L1 hit that Redis never saw, and both must equal
/// the direct reply. Returns a description of every deviation.
async fn second_reads_hit(probe: &mut L1Probe, reads: &[&[&str]]) -> Vec<String> {
    let mut failures = Vec::new();
    for read in reads {
        let cmd = read[0].to_ascii_lowercase();
        let want = probe.reference(read).await;
        let (first, outcome) = probe.read(read).await;
        if first != want {
            failures.push(format!(
                "{read:?} (first read): tierd {:?}, Redis {:?}",
                text(&first),
                text(&want)
            ));
        }
        if outcome != Outcome::Miss {
            failures.push(format!(
                "{read:?} (first read): expected a miss, got {outcome:?}"
            ));
        }
        let calls_before = upstream_calls(&mut probe.direct, &cmd).await;
        let (second, outcome) = probe.read(read).await;
        let calls_after = upstream_calls(&mut probe.direct, &cmd).await;
        if outcome != Outcome::Hit {
            failures.push(format!(
                "{read:?} (second read): expected a hit, got {outcome:?}"
            ));
        }
        if calls_after != calls_before {
            failures.push(format!(
                "{read:?} (second read): Redis ran {cmd} {} more time(s)",
                calls_after - calls_before
            ));
        }
        let want = probe.reference(read).await;
        if second != want {
            failures.push(format!(
                "{read:?} (second read): tierd {:?}, Redis {:?}",
                text(&second),
                text(&want)
            ));
        }
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_are_served_from_l1_byte_exact_in_resp2() {
    let redis = RedisServer::start();
    setup(&redis, USER_DATA).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;

    let failures = second_reads_hit(&mut probe, USER_READS).await;
    assert!(failures.is_empty(), "{failures:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_reads_are_served_from_l1_byte_exact_in_resp3() {
    let redis = RedisServer::start();
    setup(&redis, USER_DATA).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;

    // Fill every entry in RESP2 first: a RESP3 client must still get its
    // own first miss and RESP3 bytes (maps, doubles, sets), never RESP2's.
    let mut resp2 = L1Probe::new(&redis, &tierd, "users").await;
    for read in USER_READS {
        resp2.read(read).await;
    }

    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    probe.resp3().await;
    let failures = second_reads_hit(&mut probe, USER_READS).await;
    assert!(failures.is_empty(), "{failures:#?}");

    // The RESP3 shapes really were exercised.
    let (hgetall, _) = probe.read(&["HGETALL", "user:h"]).await;
    assert_eq!(hgetall[0], b'%', "{}", text(&hgetall));
    let (zscore, _) = probe.read(&["ZSCORE", "user:z", "a"]).await;
    assert_frame(&zscore, b",1.5\r\n");
    let (smembers, _) = probe.read(&["SMEMBERS", "user:set"]).await;
    assert_eq!(smembers[0], b'~', "{}", text(&smembers));

    // And the RESP2 entries are still RESP2.
    let (again, outcome) = resp2.read(&["HGETALL", "user:h"]).await;
    assert_eq!(outcome, Outcome::Hit);
    assert_eq!(again, resp2.reference(&["HGETALL", "user:h"]).await);
}

// ---------------------------------------------------------------------------
// What is never cached
// ---------------------------------------------------------------------------

/// Runs `read` twice through tierd on `raw` and returns how many times Redis
/// ran `cmd` meanwhile, after checking both replies against `direct`.
async fn upstream_calls_for_two_reads(
    raw: &mut Raw,
    direct: &mut Raw,
    read: &[&str],
) -> (u64, Bytes) {
    let cmd = read[0].to_ascii_lowercase();
    let want = direct.cmd(read).await;
    let before = upstream_calls(direct, &cmd).await;
    let first = raw.cmd(read).await;
    let second = raw.cmd(read).await;
    let after = upstream_calls(direct, &cmd).await;
    assert_eq!(text(&first), text(&want), "first {read:?}");
    assert_eq!(text(&second), text(&want), "second {read:?}");
    (after - before, second)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_without_a_matching_rule_are_not_cached() {
    let redis = RedisServer::start();
    setup(&redis, &[&["SET", "other:1", "x"], &["SET", "user:1", "u"]]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "other:1"]).await;
    assert_eq!(calls, 2, "both GETs of a key without a rule go to Redis");
    // The control: the rule's key is cached.
    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "user:1"]).await;
    assert_eq!(calls, 1, "the second GET of a rule's key is an L1 hit");
    let stats = rule_stats(&mut t, "users").await;
    assert_eq!((stats.hits, stats.misses), (1, 1), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_false_rule_keeps_keys_out_even_before_a_broader_rule() {
    let redis = RedisServer::start();
    setup(
        &redis,
        &[&["SET", "secret:1", "s3cret"], &["SET", "plain:1", "p"]],
    )
    .await;
    let tierd = start(
        &redis,
        vec![no_cache_rule("secrets", "secret:*"), rule("all", "*", HOUR)],
    )
    .await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "secret:1"]).await;
    assert_eq!(
        calls, 2,
        "secret:* matches `cache = false` first: never cached"
    );
    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["HGET", "secret:1", "f"]).await;
    assert_eq!(calls, 2);
    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "plain:1"]).await;
    assert_eq!(calls, 1, "the broader rule caches everything else");

    let secrets = rule_stats(&mut t, "secrets").await;
    assert_eq!((secrets.hits, secrets.entries), (0, 0), "{secrets:?}");
    let all = rule_stats(&mut t, "all").await;
    assert_eq!((all.hits, all.entries), (1, 1), "{all:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_and_pttl_are_never_cached() {
    let redis = RedisServer::start();
    setup(&redis, &[&["SET", "user:1", "u"]]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, ttl) = upstream_calls_for_two_reads(&mut t, &mut d, &["TTL", "user:1"]).await;
    assert_eq!(calls, 2, "TTL is time-dependent");
    assert_frame(&ttl, b":-1\r\n");
    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["PTTL", "user:1"]).await;
    assert_eq!(calls, 2, "PTTL is time-dependent");

    // A TTL set behind tierd's back (tracking is off) shows at once.
    must(&mut d, &["EXPIRE", "user:1", "500"]).await;
    let ttl = t.cmd(&["TTL", "user:1"]).await;
    assert!(
        ttl.as_ref() == b":500\r\n" || ttl.as_ref() == b":499\r\n",
        "TTL after EXPIRE 500: {}",
        text(&ttl)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_inside_multi_are_neither_served_from_nor_filling_l1() {
    let redis = RedisServer::start();
    setup(
        &redis,
        &[&["SET", "user:1", "one"], &["SET", "user:2", "two"]],
    )
    .await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;

    // user:1 is cached; user:2 is not.
    probe.read(&["GET", "user:1"]).await;
    assert_eq!(probe.read(&["GET", "user:1"]).await.1, Outcome::Hit);

    let mut m = tierd.raw().await;
    let before = upstream_calls(&mut probe.direct, "get").await;
    assert_frame(&m.cmd(&["MULTI"]).await, b"+OK\r\n");
    // A cached key inside MULTI is queued, not answered from L1.
    assert_frame(&m.cmd(&["GET", "user:1"]).await, b"+QUEUED\r\n");
    assert_frame(&m.cmd(&["GET", "user:2"]).await, b"+QUEUED\r\n");
    assert_frame(&m.cmd(&["GET", "user:2"]).await, b"+QUEUED\r\n");
    assert_frame(
        &m.cmd(&["EXEC"]).await,
        b"*3\r\n$3\r\none\r\n$3\r\ntwo\r\n$3\r\ntwo\r\n",
    );
    let after = upstream_calls(&mut probe.direct, "get").await;
    assert_eq!(after - before, 3, "every GET inside MULTI ran on Redis");

    // The transaction's replies did not fill L1: the next plain read misses.
    let (reply, outcome) = probe.read(&["GET", "user:2"]).await;
    assert_frame(&reply, &bulk("two"));
    assert_eq!(outcome, Outcome::Miss, "MULTI must not fill L1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_select_are_not_cached() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "user:1", "zero"]).await;
    must(&mut d, &["SELECT", "1"]).await;
    must(&mut d, &["SET", "user:1", "one"]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;

    // db 0's value is cached.
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    probe.read(&["GET", "user:1"]).await;
    assert_eq!(probe.read(&["GET", "user:1"]).await.1, Outcome::Hit);

    let mut s = tierd.raw().await;
    assert_frame(&s.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    let (calls, reply) = upstream_calls_for_two_reads(&mut s, &mut d, &["GET", "user:1"]).await;
    assert_frame(&reply, &bulk("one"));
    assert_eq!(calls, 2, "reads in db 1 go to Redis every time");
    // Back in db 0 the client still sees db 0's value.
    assert_frame(&s.cmd(&["SELECT", "0"]).await, b"+OK\r\n");
    assert_frame(&s.cmd(&["GET", "user:1"]).await, &bulk("zero"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_after_auth_as_another_user_are_not_cached() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "user:1", "u"]).await;
    must(
        &mut d,
        &["ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all"],
    )
    .await;
    must(
        &mut d,
        &["ACL", "SETUSER", "bob", "on", ">pw", "~other:*", "+@all"],
    )
    .await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;

    // The default identity caches user:1.
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    probe.read(&["GET", "user:1"]).await;
    assert_eq!(probe.read(&["GET", "user:1"]).await.1, Outcome::Hit);

    // alice may read it, but her reads are her own and go to Redis.
    let mut alice = tierd.raw().await;
    assert_frame(&alice.cmd(&["AUTH", "alice", "pw"]).await, b"+OK\r\n");
    let mut alice_direct = direct(&redis).await;
    must(&mut alice_direct, &["AUTH", "alice", "pw"]).await;
    let (calls, reply) =
        upstream_calls_for_two_reads(&mut alice, &mut alice_direct, &["GET", "user:1"]).await;
    assert_frame(&reply, &bulk("u"));
    assert_eq!(calls, 2, "reads after AUTH as alice are not served from L1");

    // bob may not read it: the cached value must not leak to him.
    let mut bob = tierd.raw().await;
    assert_frame(&bob.cmd(&["AUTH", "bob", "pw"]).await, b"+OK\r\n");
    let mut bob_direct = direct(&redis).await;
    must(&mut bob_direct, &["AUTH", "bob", "pw"]).await;
    let want = bob_direct.cmd(&["GET", "user:1"]).await;
    assert!(want.starts_with(b"-NOPERM"), "{}", text(&want));
    assert_frame(&bob.cmd(&["GET", "user:1"]).await, &want);
    assert_frame(
        &bob.cmd(&["MGET", "user:1"]).await,
        &bob_direct.cmd(&["MGET", "user:1"]).await,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_replies_are_not_cached() {
    let redis = RedisServer::start();
    setup(&redis, &[&["RPUSH", "user:l", "x"]]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, reply) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "user:l"]).await;
    assert!(reply.starts_with(b"-WRONGTYPE"), "{}", text(&reply));
    assert_eq!(calls, 2, "a WRONGTYPE reply is never cached");
    let stats = rule_stats(&mut t, "users").await;
    assert_eq!((stats.hits, stats.entries), (0, 0), "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nil_is_cached_only_when_the_rule_is_negative() {
    let redis = RedisServer::start();
    let mut positive_only = rule("neg", "neg:*", HOUR);
    positive_only.negative = false;
    let tierd = start(&redis, vec![positive_only, rule("pos", "pos:*", HOUR)]).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, reply) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "neg:1"]).await;
    assert_frame(&reply, b"$-1\r\n");
    assert_eq!(calls, 2, "negative = false: nil is not cached");

    let (calls, reply) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "pos:1"]).await;
    assert_frame(&reply, b"$-1\r\n");
    assert_eq!(calls, 1, "negative = true: nil is cached");
    let pos = rule_stats(&mut t, "pos").await;
    assert_eq!((pos.hits, pos.entries), (1, 1), "{pos:?}");

    // The cached nil is still invalidated by a write through tierd.
    assert_frame(&t.cmd(&["SET", "pos:1", "now"]).await, b"+OK\r\n");
    assert_frame(&t.cmd(&["GET", "pos:1"]).await, &bulk("now"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_above_max_value_size_are_not_cached() {
    let redis = RedisServer::start();
    let big = "x".repeat(4096);
    setup(
        &redis,
        &[&["SET", "user:big", &big], &["SET", "user:small", "s"]],
    )
    .await;
    let mut config = l1_config(
        &redis.url(),
        TrackingMode::Off,
        vec![rule("users", "user:*", HOUR)],
    );
    config.l1.max_value_size = 1024;
    let tierd = start_config(config).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let (calls, reply) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "user:big"]).await;
    assert_frame(&reply, &bulk(&big));
    assert_eq!(calls, 2, "a 4 KB reply is above max_value_size = 1024");
    let (calls, _) = upstream_calls_for_two_reads(&mut t, &mut d, &["GET", "user:small"]).await;
    assert_eq!(calls, 1, "a small reply is cached");
}

// ---------------------------------------------------------------------------
// MGET
// ---------------------------------------------------------------------------

async fn mget_is_split_and_byte_exact(resp3: bool) {
    let redis = RedisServer::start();
    setup(
        &redis,
        &[
            &["SET", "c:1", "one"],
            &["SET", "c:2", "two"],
            &["SET", "c:3", "three"],
            &["SET", "n:1", "no rule"],
        ],
    )
    .await;
    let tierd = start(&redis, vec![rule("c", "c:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "c").await;
    if resp3 {
        probe.resp3().await;
    }
    // c:1 is cached, the rest is not.
    probe.read(&["GET", "c:1"]).await;
    assert_eq!(probe.read(&["GET", "c:1"]).await.1, Outcome::Hit);

    // Hits, misses, a key without a rule, duplicates and a missing key.
    let mixed: &[&str] = &[
        "MGET",
        "c:1",
        "c:2",
        "n:1",
        "c:1",
        "c:missing",
        "c:2",
        "c:3",
    ];
    let want = probe.reference(mixed).await;
    let before = commandstats(&mut probe.direct).await;
    let (got, _) = probe.read(mixed).await;
    let after = commandstats(&mut probe.direct).await;
    assert_eq!(text(&got), text(&want), "mixed MGET");
    let calls = |s: &std::collections::HashMap<String, u64>| {
        s.get("mget").copied().unwrap_or(0) + s.get("get").copied().unwrap_or(0)
    };
    assert_eq!(
        calls(&after) - calls(&before),
        1,
        "the misses are fetched in one upstream MGET"
    );

    // All of the rule's keys are cached now: the same MGET again (without
    // the key that has no rule) never reaches Redis.
    let cached: &[&str] = &["MGET", "c:1", "c:2", "c:1", "c:missing", "c:2", "c:3"];
    let want = probe.reference(cached).await;
    let before = commandstats(&mut probe.direct).await;
    let stats_before = probe.stats().await;
    probe.tierd.send(&encode(cached)).await;
    let got = probe.tierd.frame().await;
    let stats_after = probe.stats().await;
    let after = commandstats(&mut probe.direct).await;
    assert_eq!(text(&got), text(&want), "cached MGET");
    assert_eq!(calls(&after) - calls(&before), 0, "no upstream MGET or GET");
    assert_eq!(stats_after.hits - stats_before.hits, 6, "one hit per key");

    // The mixed MGET again: every rule key hits, and only the key without a
    // rule goes upstream, with nothing to cache (a regression: this split
    // once queued its reply slot twice and never answered).
    let want = probe.reference(mixed).await;
    let before = commandstats(&mut probe.direct).await;
    probe.tierd.send(&encode(mixed)).await;
    let got = probe
        .tierd
        .try_frame(Duration::from_secs(5))
        .await
        .expect("the MGET is answered");
    let after = commandstats(&mut probe.direct).await;
    assert_eq!(text(&got), text(&want), "mixed MGET, rule keys cached");
    assert_eq!(
        calls(&after) - calls(&before),
        1,
        "one upstream MGET for n:1"
    );

    // A write through tierd shows in the next MGET.
    assert_frame(&probe.tierd.cmd(&["SET", "c:2", "deux"]).await, b"+OK\r\n");
    let want = probe.reference(cached).await;
    let got = probe.tierd.cmd(cached).await;
    assert_eq!(text(&got), text(&want), "MGET after SET c:2");
    assert!(text(&got).contains("deux"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_is_split_per_key_and_byte_exact_in_resp2() {
    mget_is_split_and_byte_exact(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mget_is_split_per_key_and_byte_exact_in_resp3() {
    mget_is_split_and_byte_exact(true).await;
}

// ---------------------------------------------------------------------------
// Lifetimes
// ---------------------------------------------------------------------------

/// With tracking off nothing tells tierd the key expired: only the PTTL it
/// fetched with the fill can end the entry before the rule's hour.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_never_outlives_the_keys_upstream_ttl() {
    let redis = RedisServer::start();
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;

    must(&mut probe.direct, &["SET", "user:1", "short", "PX", "300"]).await;
    let set_at = Instant::now();
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("short"));
    let (reply, outcome) = probe.read(&["GET", "user:1"]).await;
    assert_eq!(outcome, Outcome::Hit, "the value is cached first");
    assert_frame(&reply, &bulk("short"));

    // Redis expires the key at most 300 ms after the SET was acknowledged.
    let limit = Duration::from_millis(300 + 150);
    loop {
        let started = set_at.elapsed();
        let (reply, _) = probe.read(&["GET", "user:1"]).await;
        if reply.as_ref() == b"$-1\r\n" {
            break;
        }
        assert_frame(&reply, &bulk("short"));
        assert!(
            started < limit,
            "tierd still served the value {started:?} after SET … PX 300"
        );
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // And it stays gone.
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, b"$-1\r\n");
    assert_frame(&probe.reference(&["GET", "user:1"]).await, b"$-1\r\n");
}

/// With tracking off a direct write stays invisible until the rule's ttl
/// ends the entry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_lives_for_the_rules_ttl() {
    let redis = RedisServer::start();
    let ttl = Duration::from_millis(200);
    let tierd = start(&redis, vec![rule("users", "user:*", ttl)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;

    // Every read that completes within the ttl of the fill's start must be
    // the old value. On a loaded machine the window can pass before the
    // stale read is made; then the attempt proves nothing and is repeated.
    for attempt in 0..5 {
        let key = format!("user:{attempt}");
        must(&mut probe.direct, &["SET", &key, "old"]).await;
        let filled_from = Instant::now();
        probe.read(&["GET", &key]).await;
        must(&mut probe.direct, &["SET", &key, "new"]).await;
        let (reply, _) = probe.read(&["GET", &key]).await;
        let read_done = filled_from.elapsed();
        if read_done >= ttl {
            continue;
        }
        assert_frame(&reply, &bulk("old"));

        let limit = ttl + Duration::from_millis(250);
        loop {
            let started = filled_from.elapsed();
            let (reply, _) = probe.read(&["GET", &key]).await;
            if reply.as_ref() == bulk("new").as_ref() {
                break;
            }
            assert_frame(&reply, &bulk("old"));
            assert!(
                started < limit,
                "the entry outlived its 200 ms ttl: still old {started:?} after the fill"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_frame(&probe.read(&["GET", &key]).await.0, &bulk("new"));
        return;
    }
    panic!("5 attempts in a row took longer than the 200 ms ttl to read twice");
}

// ---------------------------------------------------------------------------
// CACHE.STATS
// ---------------------------------------------------------------------------

async fn stats_fixture() -> (RedisServer, Tierd) {
    let redis = RedisServer::start();
    setup(
        &redis,
        &[&["SET", "user:1", "alice"], &["SET", "img:1", "png"]],
    )
    .await;
    let tierd = start(
        &redis,
        vec![
            rule("users", "user:*", HOUR),
            no_cache_rule("secrets", "secret:*"),
            rule("images", "img:*", HOUR),
        ],
    )
    .await;
    // users: 1 miss, 3 hits. images: 1 miss, 1 hit.
    let mut t = tierd.raw().await;
    for _ in 0..4 {
        assert_frame(&t.cmd(&["GET", "user:1"]).await, &bulk("alice"));
    }
    for _ in 0..2 {
        assert_frame(&t.cmd(&["GET", "img:1"]).await, &bulk("png"));
    }
    (redis, tierd)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_reports_every_rule_in_order_in_resp2() {
    let (_redis, tierd) = stats_fixture().await;
    let mut t = tierd.raw().await;

    // The raw shape: an array of flat field/value arrays, hit_rate a bulk.
    let frame = t.cmd(&["CACHE.STATS"]).await;
    let Resp::Array(Some(rules)) = decode(&frame) else {
        panic!("CACHE.STATS: {}", text(&frame));
    };
    assert_eq!(rules.len(), 4, "{}", text(&frame));
    for element in &rules {
        let fields = element.elements().expect("a flat array per rule");
        assert_eq!(fields.len(), 2 * STATS_FIELDS.len());
        assert!(
            matches!(fields[1], Resp::Bulk(Some(_))),
            "rule name: {:?}",
            fields[1]
        );
        assert!(
            matches!(fields[7], Resp::Bulk(Some(_))),
            "hit_rate: {:?}",
            fields[7]
        );
    }

    let stats = all_stats(&mut t).await;
    let names: Vec<&str> = stats.iter().map(|s| s.rule.as_str()).collect();
    assert_eq!(names, [WARMUP, "users", "secrets", "images"]);
    let users = &stats[1];
    assert_eq!(
        (users.hits, users.misses, users.entries),
        (3, 1, 1),
        "{users:?}"
    );
    assert_eq!(users.hit_rate, "0.7500");
    assert!(users.bytes > 0, "{users:?}");
    assert_eq!((users.evictions, users.invalidations), (0, 0), "{users:?}");
    let images = &stats[3];
    assert_eq!(
        (images.hits, images.misses, images.entries),
        (1, 1, 1),
        "{images:?}"
    );
    assert_eq!(images.hit_rate, "0.5000");
    let secrets = &stats[2];
    assert_eq!(
        (secrets.hits, secrets.entries, secrets.bytes),
        (0, 0, 0),
        "{secrets:?}"
    );
    assert_eq!(secrets.hit_rate, "0.0000", "no lookups: a rate of 0");

    // One rule by name is that rule's element alone.
    assert_eq!(rule_stats(&mut t, "images").await, stats[3]);

    // A write through tierd drops the entry and counts it.
    assert_frame(&t.cmd(&["SET", "user:1", "bob"]).await, b"+OK\r\n");
    let users = rule_stats(&mut t, "users").await;
    assert_eq!(users.entries, 0, "{users:?}");
    assert_eq!(users.bytes, 0, "{users:?}");
    assert!(users.invalidations >= 1, "{users:?}");
    assert_eq!(rule_stats(&mut t, "images").await.entries, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_uses_maps_and_doubles_in_resp3() {
    let (_redis, tierd) = stats_fixture().await;
    let mut t = tierd.raw().await;
    assert_eq!(t.cmd(&["HELLO", "3"]).await[0], b'%');

    let frame = t.cmd(&["CACHE.STATS"]).await;
    let Resp::Array(Some(rules)) = decode(&frame) else {
        panic!("CACHE.STATS: {}", text(&frame));
    };
    assert_eq!(rules.len(), 4);
    for element in &rules {
        let Resp::Map(pairs) = element else {
            panic!("a map per rule in RESP3, got {element:?}");
        };
        assert!(
            matches!(pairs[3].1, Resp::Double(_)),
            "hit_rate: {:?}",
            pairs[3].1
        );
    }
    let users = RuleStats::from_resp(&rules[1]);
    assert_eq!(users.rule, "users");
    assert_eq!((users.hits, users.misses), (3, 1));
    assert_eq!(users.hit_rate.parse::<f64>().unwrap(), 0.75);

    let one = t.cmd(&["CACHE.STATS", "images"]).await;
    let images = RuleStats::from_resp(&decode(&one));
    assert_eq!(one[0], b'%', "{}", text(&one));
    assert_eq!(images.hit_rate.parse::<f64>().unwrap(), 0.5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_stats_for_an_unknown_rule_is_an_error() {
    let (_redis, tierd) = stats_fixture().await;
    let mut t = tierd.raw().await;
    assert_frame(
        &t.cmd(&["CACHE.STATS", "nope"]).await,
        b"-ERR no such rule 'nope'\r\n",
    );
    // The connection is still usable.
    assert_eq!(all_stats(&mut t).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rules_max_memory_caps_its_bytes() {
    let redis = RedisServer::start();
    let value = "v".repeat(1000);
    let mut d = direct(&redis).await;
    for i in 0..300 {
        must(&mut d, &["SET", &format!("img:{i}"), &value]).await;
    }
    let cap = 64 * 1024;
    let mut images = rule("images", "img:*", HOUR);
    images.max_memory = Some(cap);
    let tierd = start(&redis, vec![images, rule("users", "user:*", HOUR)]).await;

    let mut t = tierd.raw().await;
    for round in 0..2 {
        for i in 0..300 {
            let reply = t.cmd(&["GET", &format!("img:{i}")]).await;
            assert_eq!(reply.len(), 1000 + 9, "round {round} img:{i}");
        }
    }
    let stats = rule_stats(&mut t, "images").await;
    assert!(
        stats.bytes <= cap,
        "{stats:?} exceeds the rule's cap of {cap}"
    );
    assert!(stats.entries > 0 && stats.entries < 300, "{stats:?}");
    assert!(stats.hits + stats.misses == 600, "{stats:?}");
}

// ---------------------------------------------------------------------------
// Read-your-writes
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipelined_write_is_seen_by_the_next_read_in_the_pipeline() {
    let redis = RedisServer::start();
    setup(&redis, &[&["SET", "user:1", "v0"]]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;
    let mut other = tierd.raw().await;

    for n in 1..=50 {
        let old = format!("v{}", n - 1);
        let new = format!("v{n}");
        // Cached first.
        probe.read(&["GET", "user:1"]).await;
        let (cached, outcome) = probe.read(&["GET", "user:1"]).await;
        assert_eq!(outcome, Outcome::Hit, "round {n}");
        assert_frame(&cached, &bulk(&old));

        let mut pipeline = encode(&["GET", "user:1"]);
        pipeline.extend(encode(&["SET", "user:1", &new]));
        pipeline.extend(encode(&["GET", "user:1"]));
        probe.tierd.send(&pipeline).await;
        assert_frame(&probe.tierd.frame().await, &bulk(&old));
        assert_frame(&probe.tierd.frame().await, b"+OK\r\n");
        assert_frame(&probe.tierd.frame().await, &bulk(&new));
        // Another connection sees it too.
        assert_frame(&other.cmd(&["GET", "user:1"]).await, &bulk(&new));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_write_drops_every_cached_variant_of_the_key() {
    let redis = RedisServer::start();
    setup(&redis, &[&["SET", "user:1", "hello"]]).await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let reads: &[&[&str]] = &[
        &["GET", "user:1"],
        &["STRLEN", "user:1"],
        &["GETRANGE", "user:1", "0", "1"],
        &["EXISTS", "user:1"],
        &["TYPE", "user:1"],
    ];
    let mut r2 = L1Probe::new(&redis, &tierd, "users").await;
    let mut r3 = L1Probe::new(&redis, &tierd, "users").await;
    r3.resp3().await;
    for probe in [&mut r2, &mut r3] {
        for read in reads {
            probe.read(read).await;
            assert_eq!(probe.read(read).await.1, Outcome::Hit, "{read:?}");
        }
    }
    let entries = r2.stats().await.entries;
    assert_eq!(entries, 2 * reads.len() as u64);

    let mut w = tierd.raw().await;
    assert_frame(&w.cmd(&["SET", "user:1", "bye"]).await, b"+OK\r\n");
    assert_eq!(r2.stats().await.entries, 0, "one write drops all variants");
    for probe in [&mut r2, &mut r3] {
        for read in reads {
            let want = probe.reference(read).await;
            let (got, outcome) = probe.read(read).await;
            assert_eq!(text(&got), text(&want), "{read:?}");
            assert_eq!(outcome, Outcome::Miss, "{read:?}");
        }
    }
}

/// Clients that never read from L1 (in MULTI, after WATCH, after AUTH as
/// another user, in another db and back, with CLIENT TRACKING on) still
/// invalidate what they write. Tracking is off: nothing else would.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_clients_still_invalidate_on_their_writes() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "user:1", "v0"]).await;
    must(
        &mut d,
        &["ACL", "SETUSER", "alice", "on", ">pw", "~*", "+@all"],
    )
    .await;
    let tierd = start(&redis, vec![rule("users", "user:*", HOUR)]).await;
    let mut probe = L1Probe::new(&redis, &tierd, "users").await;

    async fn cached(probe: &mut L1Probe, want: &str) {
        probe.read(&["GET", "user:1"]).await;
        let (reply, outcome) = probe.read(&["GET", "user:1"]).await;
        assert_eq!(outcome, Outcome::Hit);
        assert_frame(&reply, &bulk(want));
    }

    // MULTI: the old value is read (and cached) again between the queued
    // SET and EXEC; EXEC's reply must drop it once more.
    cached(&mut probe, "v0").await;
    let mut m = tierd.raw().await;
    assert_frame(&m.cmd(&["MULTI"]).await, b"+OK\r\n");
    assert_frame(&m.cmd(&["SET", "user:1", "v1"]).await, b"+QUEUED\r\n");
    cached(&mut probe, "v0").await;
    assert_frame(&m.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n");
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v1"));

    // WATCH pins the client; its write still invalidates.
    cached(&mut probe, "v1").await;
    let mut w = tierd.raw().await;
    assert_frame(&w.cmd(&["WATCH", "user:1"]).await, b"+OK\r\n");
    assert_frame(&w.cmd(&["SET", "user:1", "v2"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v2"));

    // Another ACL user.
    cached(&mut probe, "v2").await;
    let mut alice = tierd.raw().await;
    assert_frame(&alice.cmd(&["AUTH", "alice", "pw"]).await, b"+OK\r\n");
    assert_frame(&alice.cmd(&["SET", "user:1", "v3"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v3"));

    // A client that went to db 1 and came back to db 0.
    cached(&mut probe, "v3").await;
    let mut s = tierd.raw().await;
    assert_frame(&s.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&s.cmd(&["SELECT", "0"]).await, b"+OK\r\n");
    assert_frame(&s.cmd(&["SET", "user:1", "v4"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v4"));

    // A client with its own CLIENT TRACKING on.
    cached(&mut probe, "v4").await;
    let mut t = tierd.raw().await;
    assert_frame(&t.cmd(&["HELLO", "3"]).await[..1], b"%");
    assert_frame(&t.cmd(&["CLIENT", "TRACKING", "on"]).await, b"+OK\r\n");
    assert_frame(&t.cmd(&["SET", "user:1", "v5"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v5"));

    // A script that declares the key.
    cached(&mut probe, "v5").await;
    let mut e = tierd.raw().await;
    let script = "return redis.call('set', KEYS[1], ARGV[1])";
    assert_frame(
        &e.cmd(&["EVAL", script, "1", "user:1", "v6"]).await,
        b"+OK\r\n",
    );
    assert_frame(&probe.read(&["GET", "user:1"]).await.0, &bulk("v6"));
}
