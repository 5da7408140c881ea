//! Regressions from the reviews of the L1 tier, one scenario each: a pooled
//! connection that loses its tracking, read-only scripts, a huge split
//! `MGET`, writes from a RESP3 subscriber, `FLUSHDB` queued after a `SELECT`
//! inside `MULTI`, `CLIENT TRACKING` queued inside `MULTI`, and `FLUSHDB` of
//! another db; then, from the second review, expiry judged after a dispatch
//! that waited, a pipeline of hits of a large value, `MULTI` and
//! `CLIENT REPLY` from a RESP3 subscriber, a RESP3 subscriber's write held
//! by `CLIENT PAUSE`, and a hit behind a blocking read.
//!
//! As in `tests/l1.rs`, a read counts as an L1 hit when its rule's `hits`
//! went up (`CACHE.STATS`); Redis's `INFO commandstats` says what reached
//! Redis. Every test starts its own redis-server and tierd.

mod support;

use std::time::{Duration, Instant};

use support::exchange::{assert_frame, encode, reply, text, REPLY_LIMIT};
use support::l1::{
    decode, direct, l1_config, must, rule, rule_stats, upstream_calls, wait_until_caching, L1Probe,
    Outcome, Resp, HOUR,
};
use support::probe::{bulk, client_field, client_list, wait_blocked_clients, Deadline};
use support::{Raw, RedisServer, Tierd};
use tierd::config::{RuleConfig, TrackingMode};

/// The rule every test caches under.
const RULE: &str = "k";
/// How soon a write that bypassed tierd must be visible through it.
const DELIVERY: Duration = Duration::from_millis(50);
/// tierd's tracking connection, as `CLIENT LIST` names it.
const TRACKING_NAME: &str = "tierd:tracking";
/// A rule of its own for waiting until tierd caches, so that the test's
/// rule keeps clean counters.
const WARMUP: &str = "warmup";

fn k_rule() -> RuleConfig {
    rule(RULE, "k:*", HOUR)
}

/// tierd with `tracking`, the `k:*` rule and a warm-up rule, once it caches
/// (it caches nothing before it has read the upstream's command table and,
/// with tracking on, set up its tracking link).
async fn start(redis: &RedisServer, tracking: TrackingMode) -> Tierd {
    let config = l1_config(
        &redis.url(),
        tracking,
        vec![rule(WARMUP, "warmup:*", HOUR), k_rule()],
    );
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, WARMUP, "warmup:0").await;
    tierd
}

/// Reads `GET key` twice through `probe`: the second read must be an L1 hit
/// returning `want`.
async fn cache(probe: &mut L1Probe, key: &str, want: &str) {
    probe.read(&["GET", key]).await;
    let (reply, outcome) = probe.read(&["GET", key]).await;
    assert_eq!(outcome, Outcome::Hit, "GET {key} is cached");
    assert_frame(&reply, &bulk(want));
}

/// Reads `GET k:1` until it is an L1 hit (within 5 s), each read returning
/// `want`.
async fn until_hit(probe: &mut L1Probe, want: &str, what: &str) {
    let deadline = Deadline::new(Duration::from_secs(5), what);
    loop {
        let (reply, outcome) = probe.read(&["GET", "k:1"]).await;
        assert_frame(&reply, &bulk(want));
        if outcome == Outcome::Hit {
            return;
        }
        deadline.tick().await;
    }
}

/// A Redis with `k:1 = old`, a tierd without tracking (so only its own
/// invalidations can save a test) with `GET k:1` cached, a probe, and a
/// direct connection.
async fn k1_cached_without_tracking() -> (RedisServer, Tierd, L1Probe, Raw) {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "k:1", "old"]).await;
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    cache(&mut probe, "k:1", "old").await;
    (redis, tierd, probe, d)
}

/// Reads `GET key` through `probe` every millisecond until the reply is
/// `want`; fails once a read that started more than `limit` after `since`
/// still got something else.
async fn poll_until(probe: &mut L1Probe, key: &str, want: &[u8], since: Instant, limit: Duration) {
    loop {
        let started = since.elapsed();
        let (got, outcome) = probe.read(&["GET", key]).await;
        if got.as_ref() == want {
            return;
        }
        assert!(
            started <= limit,
            "GET {key} through tierd still {:?} ({outcome:?}) {started:?} after the write; \
             wanted {:?}",
            text(&got),
            text(want)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

// ---------------------------------------------------------------------------
// 1. A pooled connection that reconnects has lost its tracking
// ---------------------------------------------------------------------------

/// Redis forgets the keys it tracked for a connection when the connection
/// goes: a change to a key filled through it is never reported. tierd must
/// flush L1 when such a pooled connection is lost, and cache again once
/// the new connection tracks.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_a_tracking_pooled_connection_flushes_l1_and_caching_resumes() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "k:1", "old"]).await;
    cache(&mut probe, "k:1", "old").await;

    // tierd's pooled connections with tracking (not its tracking link).
    let pooled: Vec<String> = client_list(&mut d)
        .await
        .iter()
        .filter(|l| client_field(l, "flags").is_some_and(|f| f.contains('t')))
        .filter(|l| client_field(l, "name") != Some(TRACKING_NAME))
        .map(|l| client_field(l, "id").unwrap().to_owned())
        .collect();
    assert!(
        !pooled.is_empty(),
        "no tracking pooled connection in CLIENT LIST: {:#?}",
        client_list(&mut d).await
    );
    for id in &pooled {
        assert_frame(&d.cmd(&["CLIENT", "KILL", "ID", id]).await, b":1\r\n");
    }

    // Nothing but the lost connection can tell tierd about this write.
    must(&mut d, &["SET", "k:1", "new"]).await;
    let written = Instant::now();
    poll_until(&mut probe, "k:1", &bulk("new"), written, DELIVERY).await;

    // Caching resumes on the reconnected connections.
    until_hit(&mut probe, "new", "GET k:1 to be an L1 hit again").await;
    // And the new connection tracks: a direct write reaches the entry.
    must(&mut d, &["SET", "k:1", "newer"]).await;
    let written = Instant::now();
    poll_until(&mut probe, "k:1", &bulk("newer"), written, DELIVERY).await;
}

// ---------------------------------------------------------------------------
// 2. Read-only scripts are never cached
// ---------------------------------------------------------------------------

/// A read-only function reading a key it did not declare.
const RO_LIBRARY: &str = "#!lua name=tierdro\n\
    redis.register_function{function_name='ro_get', \
    callback=function(keys, args) return redis.call('get', args[1]) end, \
    flags={'no-writes'}}";

/// Runs `script` (which declares `k:1` and reads `other`) through tierd:
/// two reads are two upstream calls and no L1 lookup, and a direct write to
/// `other` shows at once (tracking is off: nothing else could help).
async fn read_only_script_is_never_cached(script: &[&str], cmdstat: &str) {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "k:1", "declared"]).await;
    must(&mut d, &["SET", "other", "old"]).await;
    must(&mut d, &["FUNCTION", "LOAD", RO_LIBRARY]).await;
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;

    let calls_before = upstream_calls(&mut d, cmdstat).await;
    let stats_before = probe.stats().await;
    for n in 1..=2 {
        let (reply, outcome) = probe.read(script).await;
        assert_frame(&reply, &bulk("old"));
        assert_eq!(outcome, Outcome::Uncounted, "{script:?} (read {n})");
    }
    let stats_after = probe.stats().await;
    let calls_after = upstream_calls(&mut d, cmdstat).await;
    assert_eq!(
        stats_after.hits, stats_before.hits,
        "{script:?} served from L1"
    );
    assert_eq!(stats_after.entries, 0, "{script:?} cached: {stats_after:?}");
    assert_eq!(
        calls_after - calls_before,
        2,
        "both {script:?} must run on Redis"
    );

    must(&mut d, &["SET", "other", "new"]).await;
    let (reply, _) = probe.read(script).await;
    assert_frame(&reply, &bulk("new"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eval_ro_with_a_declared_key_is_never_cached() {
    read_only_script_is_never_cached(
        &[
            "EVAL_RO",
            "return redis.call('get', ARGV[1])",
            "1",
            "k:1",
            "other",
        ],
        "eval_ro",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fcall_ro_with_a_declared_key_is_never_cached() {
    read_only_script_is_never_cached(&["FCALL_RO", "ro_get", "1", "k:1", "other"], "fcall_ro")
        .await;
}

// ---------------------------------------------------------------------------
// 3. A huge split MGET
// ---------------------------------------------------------------------------

/// How many keys one split `MGET` fills at most.
const FILL_CAP: u64 = 1024;

/// Reads the rule's `entries` until two reads in a row agree (fills finish
/// asynchronously, after the reply) and returns it.
async fn settled_entries(raw: &mut Raw, at_least: u64) -> u64 {
    let deadline = Deadline::new(
        Duration::from_secs(10),
        format!("at least {at_least} entries, then a stable count"),
    );
    let mut last = None;
    loop {
        let entries = rule_stats(raw, RULE).await.entries;
        if entries >= at_least && last == Some(entries) {
            return entries;
        }
        last = Some(entries);
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_split_mget_of_thousands_of_keys_is_prompt_exact_and_fills_at_most_1024() {
    const KEYS: usize = 3000;
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let mut mset: Vec<String> = vec!["MSET".into()];
    for i in 0..KEYS {
        mset.push(format!("k:{i}"));
        mset.push(format!("value-{i}"));
    }
    let mset: Vec<&str> = mset.iter().map(String::as_str).collect();
    must(&mut d, &mset).await;
    let tierd = start(&redis, TrackingMode::Off).await;

    let mut mget: Vec<String> = vec!["MGET".into()];
    mget.extend((0..KEYS).map(|i| format!("k:{i}")));
    let mget: Vec<&str> = mget.iter().map(String::as_str).collect();
    let want = d.cmd(&mget).await;

    let mut t = tierd.raw().await;
    let mut stats = tierd.raw().await;
    t.send(&encode(&mget)).await;
    let started = Instant::now();
    let got = t
        .try_frame(Duration::from_secs(5))
        .await
        .expect("an MGET of 3000 keys answered within 5 s");
    let took = started.elapsed();
    assert!(got == want, "MGET through tierd differs from Redis's reply");

    let entries = settled_entries(&mut stats, FILL_CAP).await;
    assert_eq!(
        entries, FILL_CAP,
        "one MGET fills at most {FILL_CAP} keys (the reply took {took:?})"
    );

    // Again: the cached keys are hits, the rest go upstream; same bytes.
    let hits_before = rule_stats(&mut stats, RULE).await.hits;
    t.send(&encode(&mget)).await;
    let got = t
        .try_frame(Duration::from_secs(5))
        .await
        .expect("the second MGET answered within 5 s");
    assert!(
        got == want,
        "second MGET through tierd differs from Redis's"
    );
    let hits = rule_stats(&mut stats, RULE).await.hits - hits_before;
    assert_eq!(hits, FILL_CAP, "one hit per cached key");
}

// ---------------------------------------------------------------------------
// 4. A write from a RESP3 subscriber
// ---------------------------------------------------------------------------

/// In RESP3 a subscribed client may send any command; its writes must
/// invalidate like any other client's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_from_a_resp3_subscriber_invalidates_l1() {
    let (_redis, tierd, mut probe, _d) = k1_cached_without_tracking().await;

    let mut sub = resp3_subscriber(&tierd).await;
    sub.send(&encode(&["SET", "k:1", "new"])).await;
    assert_frame(&next_reply(&mut sub).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "k:1"]).await;
    assert_frame(&reply, &bulk("new"));
    assert_eq!(outcome, Outcome::Miss);
}

// ---------------------------------------------------------------------------
// 5. FLUSHDB after a SELECT queued in MULTI
// ---------------------------------------------------------------------------

/// `SELECT 5`, then `MULTI`, `SELECT 0`, `FLUSHDB`, `EXEC`: the FLUSHDB
/// runs in db 0, whose entries must go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_after_a_select_queued_in_multi_flushes_the_db_it_ran_in() {
    let (_redis, tierd, mut probe, _d) = k1_cached_without_tracking().await;

    let mut m = tierd.raw().await;
    assert_frame(&m.cmd(&["SELECT", "5"]).await, b"+OK\r\n");
    assert_frame(&m.cmd(&["MULTI"]).await, b"+OK\r\n");
    assert_frame(&m.cmd(&["SELECT", "0"]).await, b"+QUEUED\r\n");
    assert_frame(&m.cmd(&["FLUSHDB"]).await, b"+QUEUED\r\n");
    assert_frame(&m.cmd(&["EXEC"]).await, b"*2\r\n+OK\r\n+OK\r\n");
    assert_frame(&probe.reference(&["EXISTS", "k:1"]).await, b":0\r\n");

    let (reply, outcome) = probe.read(&["GET", "k:1"]).await;
    assert_frame(&reply, b"$-1\r\n");
    assert_eq!(
        outcome,
        Outcome::Miss,
        "db 0's entry must have been flushed"
    );
}

// ---------------------------------------------------------------------------
// 6. CLIENT TRACKING queued in MULTI
// ---------------------------------------------------------------------------

/// `CLIENT TRACKING ON` inside `MULTI` turns tracking on once `EXEC` ran:
/// `CLIENT TRACKINGINFO` must be Redis's answer, and the client's reads no
/// longer come from L1 (Redis must see them to track them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_on_queued_in_multi_takes_effect_after_exec() {
    let (_redis, tierd, mut probe, mut d) = k1_cached_without_tracking().await;

    let mut c = tierd.raw().await;
    assert_frame(&c.cmd(&["MULTI"]).await, b"+OK\r\n");
    assert_frame(&c.cmd(&["CLIENT", "TRACKING", "ON"]).await, b"+QUEUED\r\n");
    assert_frame(&c.cmd(&["EXEC"]).await, b"*1\r\n+OK\r\n");

    let info = c.cmd(&["CLIENT", "TRACKINGINFO"]).await;
    let fields = match decode(&info) {
        Resp::Array(Some(flat)) => flat,
        other => panic!("CLIENT TRACKINGINFO: {other:?}"),
    };
    let flags = fields
        .chunks(2)
        .find(|kv| kv[0].as_text().as_deref() == Some("flags"))
        .and_then(|kv| kv[1].elements().map(<[Resp]>::to_vec))
        .unwrap_or_else(|| panic!("no flags in CLIENT TRACKINGINFO: {}", text(&info)));
    let flags: Vec<String> = flags.iter().filter_map(Resp::as_text).collect();
    assert!(
        flags.iter().any(|f| f == "on"),
        "CLIENT TRACKINGINFO after EXEC: {}",
        text(&info)
    );

    let hits_before = probe.stats().await.hits;
    let calls_before = upstream_calls(&mut d, "get").await;
    assert_frame(&c.cmd(&["GET", "k:1"]).await, &bulk("old"));
    assert_eq!(
        probe.stats().await.hits,
        hits_before,
        "a tracking client's GET was served from L1"
    );
    assert_eq!(upstream_calls(&mut d, "get").await - calls_before, 1);
}

// ---------------------------------------------------------------------------
// 7. FLUSHDB of another db
// ---------------------------------------------------------------------------

/// `FLUSHDB` in db 3 leaves db 0's entries cached; `FLUSHDB` in db 0
/// drops them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_of_another_db_keeps_db_0_cached_and_flushdb_of_db_0_does_not() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    for key in ["k:1", "k:2", "k:3"] {
        must(&mut d, &["SET", key, "zero"]).await;
    }
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    for key in ["k:1", "k:2", "k:3"] {
        cache(&mut probe, key, "zero").await;
    }

    let mut other = tierd.raw().await;
    assert_frame(&other.cmd(&["SELECT", "3"]).await, b"+OK\r\n");
    assert_frame(&other.cmd(&["FLUSHDB"]).await, b"+OK\r\n");
    for key in ["k:1", "k:2", "k:3"] {
        let (reply, outcome) = probe.read(&["GET", key]).await;
        assert_frame(&reply, &bulk("zero"));
        assert_eq!(outcome, Outcome::Hit, "FLUSHDB in db 3 dropped {key}");
    }
    assert_eq!(probe.stats().await.entries, 3);

    assert_frame(&probe.tierd.cmd(&["FLUSHDB"]).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "k:1"]).await;
    assert_frame(&reply, b"$-1\r\n");
    assert_eq!(outcome, Outcome::Miss, "FLUSHDB in db 0 kept k:1");
}

// ---------------------------------------------------------------------------
// Second review
// ---------------------------------------------------------------------------

/// A RESP3 connection through tierd subscribed to `ch`.
async fn resp3_subscriber(tierd: &Tierd) -> Raw {
    let mut sub = tierd.raw().await;
    assert_eq!(sub.cmd(&["HELLO", "3"]).await[0], b'%');
    let confirmed = sub.cmd(&["SUBSCRIBE", "ch"]).await;
    assert!(
        confirmed.starts_with(b">3\r\n$9\r\nsubscribe\r\n"),
        "SUBSCRIBE: {}",
        text(&confirmed)
    );
    sub
}

/// The next frame on `raw` that is not a push, within [`REPLY_LIMIT`].
async fn next_reply(raw: &mut Raw) -> bytes::Bytes {
    loop {
        let frame = raw
            .try_frame(REPLY_LIMIT)
            .await
            .unwrap_or_else(|| panic!("no reply within {REPLY_LIMIT:?}"));
        if frame.first() != Some(&b'>') {
            return frame;
        }
    }
}

/// Several commands as one write.
fn batch(cmds: &[&[&str]]) -> Vec<u8> {
    cmds.iter().flat_map(|c| encode(c)).collect()
}

// ---------------------------------------------------------------------------
// 8. Expiry judged after a dispatch that waited
// ---------------------------------------------------------------------------

/// A busy-loop of 700 ms inside Redis.
const SPIN_700_MS: &str = "local t=redis.call('TIME'); local s=t[1]*1000000+t[2]; \
    repeat local n=redis.call('TIME') until (n[1]*1000000+n[2])-s > 700000 return 1";

/// A transaction that queued a state command (`CLIENT SETNAME`) runs
/// alone: tierd waits for `EXEC`'s reply before dispatching what follows
/// it in the same read. The `GET` after it must judge the entry's expiry
/// (`PX 400`) by the time of its lookup, not by the time the read arrived.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hit_after_a_dispatch_that_waited_judges_expiry_at_its_own_time() {
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let mut d = direct(&redis).await;
    // Redis keeps the key until it is read: only the entry's own deadline
    // can keep its value out.
    must(&mut d, &["DEBUG", "SET-ACTIVE-EXPIRE", "0"]).await;
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    must(&mut d, &["SET", "k:1", "v", "PX", "400"]).await;
    cache(&mut probe, "k:1", "v").await;

    let mut t = tierd.raw().await;
    t.send(&batch(&[
        &["MULTI"],
        &["CLIENT", "SETNAME", "x"],
        &["EVAL", SPIN_700_MS, "0"],
        &["EXEC"],
        &["GET", "k:1"],
    ]))
    .await;
    for want in [
        &b"+OK\r\n"[..],
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"*2\r\n+OK\r\n:1\r\n",
    ] {
        assert_frame(&t.frame().await, want);
    }
    assert_frame(&t.frame().await, b"$-1\r\n");
    assert_frame(&probe.reference(&["EXISTS", "k:1"]).await, b":0\r\n");
}

// ---------------------------------------------------------------------------
// 9. A pipeline of hits of a large value
// ---------------------------------------------------------------------------

/// One field of this process's `/proc/self/status` (`VmHWM`, `VmRSS`), in
/// bytes.
fn vm_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"));
    kb.trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .unwrap()
        * 1024
}

/// tierd runs in this process: its peak memory is the process's. 1500
/// pipelined `GET`s of a 900 KB cached value are 1.3 GB of replies; tierd
/// must write them from the entry as it goes, not copy them all first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_of_hits_of_a_large_value_does_not_multiply_it_in_memory() {
    const PIPELINED: usize = 1500;
    const LIMIT: u64 = 200 << 20;
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let value: String = (0..900 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    must(&mut d, &["SET", "k:big", &value]).await;
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    cache(&mut probe, "k:big", &value).await;
    let want = bulk(&value);
    drop(value);

    // Resets VmHWM to the current RSS (Linux 4.0+); without it the
    // growth is measured from an earlier peak, which only makes it smaller.
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let peak_before = vm_bytes("VmHWM");
    let hits_before = probe.stats().await.hits;
    let mut t = tierd.raw().await;
    t.send(&b"GET k:big\r\n".repeat(PIPELINED)).await;
    for n in 0..PIPELINED {
        let got = t.frame().await;
        assert!(
            got == want,
            "reply {n} of {PIPELINED}: {} bytes, not the value",
            got.len()
        );
    }
    let grown = vm_bytes("VmHWM").saturating_sub(peak_before);
    assert_eq!(
        probe.stats().await.hits - hits_before,
        PIPELINED as u64,
        "every GET was an L1 hit"
    );
    assert!(
        grown < LIMIT,
        "peak memory grew by {} MB over {PIPELINED} hits of {} KB (limit {} MB)",
        grown >> 20,
        want.len() >> 10,
        LIMIT >> 20
    );
}

// ---------------------------------------------------------------------------
// 10. MULTI and CLIENT REPLY from a RESP3 subscriber
// ---------------------------------------------------------------------------

/// Both would stop a RESP3 subscriber's replies from lining up with its
/// requests (how tierd knows when a write sent on the stream ran): tierd
/// refuses them, and the connection goes on as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_and_client_reply_from_a_resp3_subscriber_are_refused() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let tierd = start(&redis, TrackingMode::Off).await;
    let mut sub = resp3_subscriber(&tierd).await;

    const UNSUPPORTED: &str = " on a subscribed connection is not supported by tierd\r\n";
    let refused = reply(&mut sub, &["CLIENT", "REPLY", "SKIP"]).await;
    assert!(
        refused.starts_with(b"-ERR CLIENT") && text(&refused).ends_with(UNSUPPORTED),
        "CLIENT REPLY SKIP: {}",
        text(&refused)
    );
    // Had SKIP reached Redis, MULTI's reply would be dropped; had MULTI,
    // PING would be queued.
    assert_frame(
        &reply(&mut sub, &["MULTI"]).await,
        format!("-ERR MULTI{UNSUPPORTED}").as_bytes(),
    );
    // Redis 7.0 answers PING from a RESP3 subscriber with +PONG.
    assert_frame(&reply(&mut sub, &["PING"]).await, b"+PONG\r\n");
    assert_frame(&must(&mut d, &["PUBLISH", "ch", "hi"]).await, b":1\r\n");
    assert_frame(
        &sub.try_frame(REPLY_LIMIT).await.expect("the message"),
        b">3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n",
    );
}

// ---------------------------------------------------------------------------
// 11. A RESP3 subscriber's write held by CLIENT PAUSE
// ---------------------------------------------------------------------------

/// With tracking off, `k:1 = old` cached: a RESP3 subscriber sends
/// `SET k:1 new` (after `before`, whose replies are `before_replies`), which
/// `CLIENT PAUSE WRITE` holds in Redis. Another client reads `k:1` through
/// tierd meanwhile (reads are not paused) and caches `old` again; the
/// write's reply must invalidate it.
async fn a_held_subscriber_write_invalidates_on_its_reply(before: &[&[&str]], replies: &[&[u8]]) {
    let (_redis, tierd, mut probe, mut d) = k1_cached_without_tracking().await;
    let mut sub = resp3_subscriber(&tierd).await;
    must(&mut d, &["CLIENT", "PAUSE", "10000", "WRITE"]).await;

    let mut cmds = before.to_vec();
    cmds.push(&["SET", "k:1", "new"]);
    sub.send(&batch(&cmds)).await;
    for want in replies {
        assert_frame(&next_reply(&mut sub).await, want);
    }
    wait_blocked_clients(&mut d, 1, Duration::from_secs(5)).await;

    until_hit(
        &mut probe,
        "old",
        "GET k:1 to be an L1 hit of old while the SET is held",
    )
    .await;

    must(&mut d, &["CLIENT", "UNPAUSE"]).await;
    assert_frame(&next_reply(&mut sub).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "k:1"]).await;
    assert_frame(&reply, &bulk("new"));
    assert_eq!(outcome, Outcome::Miss);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_write_from_a_resp3_subscriber_invalidates_when_it_runs() {
    a_held_subscriber_write_invalidates_on_its_reply(&[], &[]).await;
}

/// `SUBSCRIBE` without channels gets an error reply, not a push: it must
/// take its own place in line, not the `SET`'s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscribe_without_channels_does_not_take_a_held_writes_place() {
    a_held_subscriber_write_invalidates_on_its_reply(
        &[&["SUBSCRIBE"]],
        &[b"-ERR wrong number of arguments for 'subscribe' command\r\n"],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 12. A hit behind a blocking read
// ---------------------------------------------------------------------------

/// Redis runs a `GET` pipelined after a blocking `XREAD` once the `XREAD`
/// has returned: an L1 hit at once would answer with the value from
/// before, even though its reply waits its turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_pipelined_behind_a_blocking_read_is_not_answered_from_before_it() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "k:1", "old"]).await;
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut probe = L1Probe::new(&redis, &tierd, RULE).await;
    cache(&mut probe, "k:1", "old").await;

    let mut t = tierd.raw().await;
    t.send(&batch(&[
        &["XREAD", "BLOCK", "10000", "STREAMS", "s", "$"],
        &["GET", "k:1"],
    ]))
    .await;
    wait_blocked_clients(&mut d, 1, Duration::from_secs(5)).await;
    must(&mut d, &["SET", "k:1", "new"]).await;
    must(&mut d, &["XADD", "s", "*", "f", "v"]).await;

    let xread = t.try_frame(REPLY_LIMIT).await.expect("XREAD's reply");
    assert!(
        xread.starts_with(b"*1\r\n*2\r\n$1\r\ns\r\n"),
        "XREAD: {}",
        text(&xread)
    );
    let got = t.try_frame(REPLY_LIMIT).await.expect("GET's reply");
    assert_frame(&got, &bulk("new"));
}
