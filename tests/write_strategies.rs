//! A rule's `write`, against a real redis-server: `"through"` leaves the
//! written value in L1 once Redis acknowledged the write, `"behind"`
//! acknowledges once the write is queued and sends the queue to Redis in
//! batches, keeping writes of a key in order, holding writers back when
//! the queue is full, and draining it when tierd is stopped.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use support::compression::{compress_rule, frame_of, MAGIC};
use support::exchange::text;
use support::l1::{
    decode, direct, l1_config, rule, wait_until_caching, L1Probe, Outcome, Resp, HOUR,
};
use support::probe::Deadline;
use support::resilience::{circuit_state, CIRCUIT_OPEN, UNAVAILABLE};
use support::{free_port, Raw, RedisServer, Tierd};
use tierd::cache::template::TagTemplate;
use tierd::config::{Config, RuleConfig, TrackingMode, WriteBehindConfig, WriteStrategy};

const SECOND: Duration = Duration::from_secs(1);

fn with_write(mut r: RuleConfig, write: WriteStrategy) -> RuleConfig {
    r.write = write;
    r
}

fn bulk(value: &[u8]) -> Bytes {
    let mut out = format!("${}\r\n", value.len()).into_bytes();
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    Bytes::from(out)
}

/// `CACHE.INSPECT key` (asked in RESP2): per cached variant, its command,
/// protocol, ttl_ms and whether L1 keeps it compressed. Empty when nothing
/// is cached.
async fn l1_variants(raw: &mut Raw, key: &str) -> Vec<(Vec<String>, i64, i64, bool)> {
    let v = decode(&raw.cmd(&["CACHE.INSPECT", key]).await);
    if v.is_nil() {
        return Vec::new();
    }
    let top = pairs(&v);
    field(&top, "variants")
        .elements()
        .unwrap()
        .iter()
        .map(|variant| {
            let m = pairs(variant);
            let command = field(&m, "command")
                .elements()
                .unwrap()
                .iter()
                .map(|a| a.as_text().unwrap())
                .collect();
            let int = |name| field(&m, name).as_int().unwrap();
            (
                command,
                int("protocol"),
                int("ttl_ms"),
                int("compressed") == 1,
            )
        })
        .collect()
}

fn pairs(v: &Resp) -> Vec<(String, Resp)> {
    v.elements()
        .unwrap()
        .chunks(2)
        .map(|kv| (kv[0].as_text().unwrap(), kv[1].clone()))
        .collect()
}

fn field<'a>(m: &'a [(String, Resp)], name: &str) -> &'a Resp {
    &m.iter()
        .find(|(k, _)| k == name)
        .unwrap_or_else(|| panic!("no {name} in {m:?}"))
        .1
}

/// The protocols L1 holds `GET key` for.
async fn get_variants(raw: &mut Raw, key: &str) -> Vec<i64> {
    let mut protos: Vec<i64> = l1_variants(raw, key)
        .await
        .into_iter()
        .filter(|(command, ..)| command == &["get".to_owned(), key.to_owned()])
        .map(|(_, proto, ..)| proto)
        .collect();
    protos.sort_unstable();
    protos
}

/// A `# Tierd` field of `INFO tierd` through tierd (answered by tierd
/// alone, also while Redis is frozen).
async fn tierd_info(raw: &mut Raw, name: &str) -> u64 {
    let frame = raw.cmd(&["INFO", "tierd"]).await;
    let text = text(&frame);
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .unwrap_or_else(|| panic!("no {name} in INFO: {text}"))
        .trim()
        .parse()
        .unwrap()
}

async fn wait_info(raw: &mut Raw, name: &str, want: impl Fn(u64) -> bool, what: &str) -> u64 {
    let deadline = Deadline::new(10 * SECOND, what);
    loop {
        let v = tierd_info(raw, name).await;
        if want(v) {
            return v;
        }
        deadline.tick().await;
    }
}

/// Polls Redis directly until `GET key` is `want`.
async fn wait_redis(d: &mut Raw, key: &str, want: &[u8]) {
    let deadline = Deadline::new(10 * SECOND, format!("Redis to hold {key} = {want:?}"));
    while d.cmd(&["GET", key]).await != bulk(want) {
        deadline.tick().await;
    }
}

// ---------------------------------------------------------------------------
// write = "through"
// ---------------------------------------------------------------------------

async fn through_fixture(tracking: TrackingMode, more: Vec<RuleConfig>) -> (RedisServer, Tierd) {
    let redis = RedisServer::start();
    let mut rules = vec![
        with_write(rule("wt", "wt:*", HOUR), WriteStrategy::Through),
        with_write(
            rule("short", "short:*", Duration::from_millis(300)),
            WriteStrategy::Through,
        ),
        rule("plain", "p:*", HOUR),
    ];
    rules.extend(more);
    let tierd = Tierd::start_with(l1_config(&redis.url(), tracking, rules)).await;
    wait_until_caching(&tierd, "wt", "wt:warmup").await;
    (redis, tierd)
}

/// Every supported form, written by a RESP2 or a RESP3 client: the reply is
/// Redis's, and the next `GET` of each written key, in either protocol, is
/// an L1 hit with exactly the bytes Redis gives.
async fn every_form_fills_l1(writer_resp3: bool) {
    let (redis, tierd) = through_fixture(TrackingMode::Default, Vec::new()).await;
    let mut writer = tierd.raw().await;
    if writer_resp3 {
        assert_eq!(writer.cmd(&["HELLO", "3"]).await[0], b'%');
    }
    let nil: &[u8] = if writer_resp3 { b"_\r\n" } else { b"$-1\r\n" };
    // (the write, its reply, what it leaves in each key)
    type Case<'a> = (Vec<&'a str>, &'a [u8], Vec<(&'a str, &'a str)>);
    let writes: Vec<Case<'_>> = vec![
        (
            vec!["SET", "wt:a", "alpha"],
            b"+OK\r\n",
            vec![("wt:a", "alpha")],
        ),
        (
            vec!["set", "wt:b", "beta", "ex", "100"],
            b"+OK\r\n",
            vec![("wt:b", "beta")],
        ),
        (
            vec!["SET", "wt:c", "gamma", "PX", "100000"],
            b"+OK\r\n",
            vec![("wt:c", "gamma")],
        ),
        (
            vec!["SET", "wt:c2", "gamma2", "EXAT", "4000000000"],
            b"+OK\r\n",
            vec![("wt:c2", "gamma2")],
        ),
        (
            vec!["SETEX", "wt:d", "100", "delta"],
            b"+OK\r\n",
            vec![("wt:d", "delta")],
        ),
        (
            vec!["PSETEX", "wt:e", "100000", "epsilon"],
            b"+OK\r\n",
            vec![("wt:e", "epsilon")],
        ),
        (
            vec!["MSET", "wt:f", "1", "wt:g", "2", "wt:f", "3"],
            b"+OK\r\n",
            vec![("wt:f", "3"), ("wt:g", "2")],
        ),
        (
            vec!["SET", "wt:i", "iota", "KEEPTTL"],
            b"+OK\r\n",
            vec![("wt:i", "iota")],
        ),
        (
            vec!["SETNX", "wt:j", "jay"],
            b":1\r\n",
            vec![("wt:j", "jay")],
        ),
        (
            vec!["GETSET", "wt:k", "kappa"],
            nil,
            vec![("wt:k", "kappa")],
        ),
        (
            vec!["MSETNX", "wt:l", "lambda", "wt:m", "mu"],
            b":1\r\n",
            vec![("wt:l", "lambda"), ("wt:m", "mu")],
        ),
        (vec!["SET", "wt:n", "nu", "GET"], nil, vec![("wt:n", "nu")]),
        (
            vec!["SET", "wt:o", "omicron", "NX", "GET"],
            nil,
            vec![("wt:o", "omicron")],
        ),
        (vec!["SET", "wt:p", "", "XX"], nil, vec![]),
    ];
    let mut p2 = L1Probe::new(&redis, &tierd, "wt").await;
    let mut p3 = L1Probe::new(&redis, &tierd, "wt").await;
    p3.resp3().await;
    let mut admin = tierd.raw().await;
    for (args, reply, written) in writes {
        let got = writer.cmd(&args).await;
        assert_eq!(text(&got), text(reply), "{args:?}");
        for (key, value) in written {
            assert_eq!(
                get_variants(&mut admin, key).await,
                [2, 3],
                "{args:?}: L1 holds GET {key} for both protocols"
            );
            for probe in [&mut p2, &mut p3] {
                let (got, outcome) = probe.read(&["GET", key]).await;
                assert_eq!(outcome, Outcome::Hit, "{args:?}: GET {key}");
                assert_eq!(text(&got), text(&bulk(value.as_bytes())), "{args:?}");
                assert_eq!(text(&got), text(&probe.reference(&["GET", key]).await));
            }
        }
    }
    // wt:p was not written (XX on a missing key): nothing was cached.
    assert!(l1_variants(&mut admin, "wt:p").await.is_empty());
    // Expiries: the rule's ttl, or the write's when shorter.
    let ttl = |v: Vec<(Vec<String>, i64, i64, bool)>| v.iter().map(|x| x.2).max().unwrap();
    let a = ttl(l1_variants(&mut admin, "wt:a").await);
    assert!(
        a > 3_500_000 && a <= 3_600_000,
        "wt:a lives the rule's hour: {a}"
    );
    for key in ["wt:b", "wt:c", "wt:d", "wt:e"] {
        let t = ttl(l1_variants(&mut admin, key).await);
        assert!(t > 90_000 && t <= 100_000, "{key} lives its 100 s: {t}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_fills_l1_for_every_set_form() {
    every_form_fills_l1(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_fills_l1_for_every_set_form_written_in_resp3() {
    every_form_fills_l1(true).await;
}

/// Written values live no longer than the write let them, nor than the
/// rule's ttl: once Redis has let the key expire, tierd says nil too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_respects_the_written_expiry() {
    let (redis, tierd) = through_fixture(TrackingMode::Default, Vec::new()).await;
    let mut admin = tierd.raw().await;
    let mut probe = L1Probe::new(&redis, &tierd, "wt").await;
    assert_eq!(
        &probe
            .tierd
            .cmd(&["SET", "wt:x", "brief", "PX", "400"])
            .await[..],
        b"+OK\r\n"
    );
    let variants = l1_variants(&mut admin, "wt:x").await;
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert!(variants.iter().all(|v| v.2 <= 400), "{variants:?}");
    let (got, outcome) = probe.read(&["GET", "wt:x"]).await;
    assert_eq!((got, outcome), (bulk(b"brief"), Outcome::Hit));
    // Until it is gone: whenever Redis already said it was gone, tierd
    // must say nil as well.
    let deadline = Deadline::new(5 * SECOND, "wt:x to expire");
    loop {
        let gone = &probe.direct.cmd(&["PTTL", "wt:x"]).await[..] == b":-2\r\n";
        let got = probe.tierd.cmd(&["GET", "wt:x"]).await;
        if gone {
            assert_eq!(
                &got[..],
                b"$-1\r\n",
                "Redis let wt:x expire; tierd still had it"
            );
        }
        if &got[..] == b"$-1\r\n" {
            break;
        }
        deadline.tick().await;
    }
    // A rule's ttl shorter than the write's expiry wins.
    assert_eq!(
        &admin.cmd(&["SET", "short:x", "v", "EX", "100"]).await[..],
        b"+OK\r\n"
    );
    let variants = l1_variants(&mut admin, "short:x").await;
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert!(variants.iter().all(|v| v.2 <= 300), "{variants:?}");
}

/// Writes that did not write (NX on an existing key, XX on a missing one,
/// a refused command) leave L1 alone, and the key reads as Redis has it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_through_fills_only_what_was_written() {
    let (redis, tierd) = through_fixture(TrackingMode::Default, Vec::new()).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let mut admin = tierd.raw().await;
    // Each key, and a mirror of it outside every rule for Redis's own
    // reply, in the same state.
    for prefix in ["wt:", "mirror:"] {
        d.cmd(&["SET", &format!("{prefix}nx"), "old"]).await;
        d.cmd(&["RPUSH", &format!("{prefix}list"), "x"]).await;
        d.cmd(&["SET", &format!("{prefix}exists"), "old"]).await;
    }
    let cases: [(&[&str], &str); 6] = [
        (&["SET", "wt:nx", "new", "NX"], "wt:nx"),
        (&["SET", "wt:xx", "new", "XX"], "wt:xx"),
        (&["SET", "wt:list", "new", "GET"], "wt:list"),
        (&["SET", "wt:bad", "new", "EX", "0"], "wt:bad"),
        (&["SETNX", "wt:exists", "new"], "wt:exists"),
        (&["SET", "wt:exists", "new", "XX", "NX"], "wt:exists"),
    ];
    for (args, key) in cases {
        let mirror: Vec<String> = args.iter().map(|a| a.replace("wt:", "mirror:")).collect();
        let mirror: Vec<&str> = mirror.iter().map(String::as_str).collect();
        let want = d.cmd(&mirror).await;
        assert_eq!(text(&t.cmd(args).await), text(&want), "{args:?}");
        assert!(
            l1_variants(&mut admin, key).await.is_empty(),
            "{args:?} wrote nothing; L1 must not hold {key}"
        );
        assert_eq!(
            text(&t.cmd(&["GET", key]).await),
            text(&d.cmd(&["GET", key]).await),
            "{args:?}"
        );
    }
}

/// An invalidation of the key that arrives while the write is on its way
/// (here an `L1ONLY` pattern invalidation, as a bus message would be)
/// cancels the write-through: L1 stays empty and the next read goes to
/// Redis. The same write without it fills L1. Tracking is off, so that
/// nothing else can invalidate the key meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_racing_the_write_cancels_the_through_fill() {
    let (redis, tierd) = through_fixture(TrackingMode::Off, Vec::new()).await;
    let mut d = direct(&redis).await;
    let mut admin = tierd.raw().await;
    let mut other = tierd.raw().await;
    let mut probe = L1Probe::new(&redis, &tierd, "wt").await;
    for (key, raced) in [("wt:calm", false), ("wt:raced", true)] {
        d.cmd(&["SET", key, "v0"]).await;
        assert_eq!(probe.read(&["GET", key]).await.0, bulk(b"v0"));
        assert_eq!(get_variants(&mut admin, key).await, [2]);
        // Frozen, Redis holds the write while tierd waits for it.
        redis.pause();
        let mut writer = tierd.raw().await;
        writer.send_cmd(&[b"SET", key.as_bytes(), b"v1"]).await;
        // The write's first invalidation shows it is on its way.
        let deadline = Deadline::new(5 * SECOND, format!("the SET of {key} to be sent"));
        while !get_variants(&mut admin, key).await.is_empty() {
            deadline.tick().await;
        }
        if raced {
            let dropped = other
                .cmd(&["CACHE.INVALIDATE", "PATTERN", key, "L1ONLY"])
                .await;
            assert_eq!(&dropped[..], b":0\r\n");
        }
        redis.resume();
        assert_eq!(&writer.frame().await[..], b"+OK\r\n");
        let (got, outcome) = probe.read(&["GET", key]).await;
        assert_eq!(got, bulk(b"v1"), "{key}");
        if raced {
            assert_eq!(
                outcome,
                Outcome::Miss,
                "the raced write-through was cancelled"
            );
        } else {
            assert_eq!(outcome, Outcome::Hit, "the calm write went through to L1");
        }
    }
}

/// A write of a key L1 already holds. With tracking on, Redis reports the
/// write back to tierd (tracking cannot tell writers apart), and that
/// report usually arrives before the write's reply and cancels the
/// write-through; tierd then reads the key back in the background, so L1
/// soon holds the new value in both protocols (when the report comes
/// later still, it drops the new value and the next read fills it).
/// Without tracking nothing cancels it: the next read is a hit. In no
/// mode is the old value served after the write's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_cached_key_leaves_the_new_value_in_l1() {
    const ROUNDS: usize = 10;
    for tracking in [
        TrackingMode::Default,
        TrackingMode::Bcast,
        TrackingMode::Off,
    ] {
        let (redis, tierd) = through_fixture(tracking, Vec::new()).await;
        let mut probe = L1Probe::new(&redis, &tierd, "wt").await;
        let mut writer = tierd.raw().await;
        let mut admin = tierd.raw().await;
        let mut held = 0;
        for round in 0..ROUNDS {
            let value = format!("v{round}");
            assert_eq!(
                &writer.cmd(&["SET", "wt:hot", &value]).await[..],
                b"+OK\r\n"
            );
            if tracking == TrackingMode::Off {
                let got = probe.read(&["GET", "wt:hot"]).await;
                assert_eq!(got, (bulk(value.as_bytes()), Outcome::Hit), "round {round}");
                continue;
            }
            // Polled, without reading through tierd (a read would fill
            // L1 itself), for a second at most.
            let started = tokio::time::Instant::now();
            while started.elapsed() < SECOND {
                if get_variants(&mut admin, "wt:hot").await == [2, 3] {
                    held += 1;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let got = probe.read(&["GET", "wt:hot"]).await;
            assert_eq!(got.0, bulk(value.as_bytes()), "{tracking:?} round {round}");
        }
        // Measured: 8 to 10 rounds of 10 in both modes. The read-back races
        // Redis's report of the write, so this is not every round.
        if tracking != TrackingMode::Off {
            assert!(
                held >= 3,
                "{tracking:?}: L1 held the new value after only {held} of {ROUNDS} writes"
            );
        }
    }
}

/// Tagged keys written through: the tags are registered with the write,
/// in the same transaction, and the value is in L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tagged_writes_go_through() {
    let mut tagged = with_write(rule("teams", "team:{team}:*", HOUR), WriteStrategy::Through);
    tagged.tags = vec![TagTemplate::new("team:{team}", &tagged.pattern).unwrap()];
    let (redis, tierd) = through_fixture(TrackingMode::Default, vec![tagged]).await;
    let mut t = tierd.raw().await;
    let mut admin = tierd.raw().await;
    let mut probe = L1Probe::new(&redis, &tierd, "teams").await;
    assert_eq!(&t.cmd(&["SET", "team:7:a", "ada"]).await[..], b"+OK\r\n");
    assert_eq!(
        &t.cmd(&["MSET", "team:7:b", "bob", "team:8:c", "cy"]).await[..],
        b"+OK\r\n"
    );
    for (key, value) in [("team:7:a", "ada"), ("team:7:b", "bob"), ("team:8:c", "cy")] {
        assert_eq!(get_variants(&mut admin, key).await, [2, 3], "{key}");
        let (got, outcome) = probe.read(&["GET", key]).await;
        assert_eq!(
            (got, outcome),
            (bulk(value.as_bytes()), Outcome::Hit),
            "{key}"
        );
    }
    let members = decode(&t.cmd(&["CACHE.MEMBERS", "team:7"]).await);
    let mut members: Vec<String> = members
        .elements()
        .unwrap()
        .iter()
        .map(|m| m.as_text().unwrap())
        .collect();
    members.sort();
    assert_eq!(members, ["team:7:a", "team:7:b"]);
    // Invalidating the tag drops the written values from Redis and L1.
    assert_eq!(
        &t.cmd(&["CACHE.INVALIDATE", "TAG", "team:7"]).await[..],
        b":2\r\n"
    );
    assert!(l1_variants(&mut admin, "team:7:a").await.is_empty());
    assert_eq!(&t.cmd(&["GET", "team:7:a"]).await[..], b"$-1\r\n");
}

/// Values of a compressing rule written through: Redis holds them
/// compressed (`upstream = true`) or plain, L1 keeps the large ones
/// compressed either way, and a hit gives back the exact bytes written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_writes_go_through() {
    let rules = vec![
        with_write(compress_rule("zup", "zup:*", true), WriteStrategy::Through),
        with_write(compress_rule("zl1", "zl1:*", false), WriteStrategy::Through),
    ];
    let (redis, tierd) = through_fixture(TrackingMode::Default, rules).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let mut admin = tierd.raw().await;
    let big: Vec<u8> = br#"{"name":"user","email":"user@example.com","active":true},"#
        .iter()
        .copied()
        .cycle()
        .take(8000)
        .collect();
    let big_text = String::from_utf8(big.clone()).unwrap();
    for (rule_name, prefix, upstream) in [("zup", "zup", true), ("zl1", "zl1", false)] {
        let mut probe = L1Probe::new(&redis, &tierd, rule_name).await;
        let key = format!("{prefix}:big");
        let small = format!("{prefix}:small");
        assert_eq!(&t.cmd(&["SET", &key, &big_text]).await[..], b"+OK\r\n");
        assert_eq!(
            &t.cmd(&["MSET", &small, "tiny", &format!("{prefix}:big2"), &big_text])
                .await[..],
            b"+OK\r\n"
        );
        let stored = d.cmd(&["GET", &key]).await;
        assert_eq!(
            stored[stored.iter().position(|&b| b == b'\n').unwrap() + 1..].starts_with(&MAGIC),
            upstream,
            "{key}: Redis holds it compressed only with upstream = true"
        );
        for k in [key.clone(), format!("{prefix}:big2")] {
            let variants = l1_variants(&mut admin, &k).await;
            assert_eq!(variants.len(), 2, "{variants:?}");
            assert!(variants.iter().all(|v| v.3), "{k}: L1 keeps it compressed");
            let (got, outcome) = probe.read(&["GET", &k]).await;
            assert_eq!(outcome, Outcome::Hit, "{k}");
            assert!(got == bulk(&big), "{k}: the hit restores the exact bytes");
        }
        let variants = l1_variants(&mut admin, &small).await;
        assert!(variants.iter().all(|v| !v.3), "{small}: {variants:?}");
        assert_eq!(
            probe.read(&["GET", &small]).await,
            (bulk(b"tiny"), Outcome::Hit)
        );
    }
}

// ---------------------------------------------------------------------------
// write = "behind"
// ---------------------------------------------------------------------------

fn behind_config(redis: &RedisServer, flush: Duration, max_queue: usize) -> Config {
    let mut config = l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            with_write(rule("wb", "wb:*", HOUR), WriteStrategy::Behind),
            rule("plain", "p:*", HOUR),
        ],
    );
    config.write_behind = WriteBehindConfig { flush, max_queue };
    config
}

async fn behind_fixture(flush: Duration, max_queue: usize) -> (RedisServer, Tierd) {
    let redis = RedisServer::start();
    let tierd = Tierd::start_with(behind_config(&redis, flush, max_queue)).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    if flush > SECOND {
        return (redis, tierd);
    }
    // One write through the queue, so that the flusher's connection is up
    // before a test freezes Redis.
    let mut t = tierd.raw().await;
    assert_eq!(&t.cmd(&["SET", "wb:warmup", "1"]).await[..], b"+OK\r\n");
    wait_redis(&mut direct(&redis).await, "wb:warmup", b"1").await;
    (redis, tierd)
}

/// With Redis frozen, a queued write is acknowledged, and reads through
/// tierd see it (RESP2 and RESP3); Redis gets it once it thaws.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_behind_acknowledges_before_redis_has_the_value() {
    let (redis, tierd) = behind_fixture(Duration::from_millis(5), 100).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let mut t3 = tierd.raw().await;
    assert_eq!(t3.cmd(&["HELLO", "3"]).await[0], b'%');
    let mut admin = tierd.raw().await;
    let flushed = tierd_info(&mut admin, "tierd_write_behind_flushed").await;

    redis.pause();
    assert_eq!(&t.cmd(&["SET", "wb:a", "queued-a"]).await[..], b"+OK\r\n");
    assert_eq!(
        &t3.cmd(&["MSET", "wb:b", "queued-b", "wb:c", "queued-c"])
            .await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &t.cmd(&["SETEX", "wb:d", "100", "queued-d"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(tierd_info(&mut admin, "tierd_write_behind_queue").await, 3);
    for (key, value) in [
        ("wb:a", "queued-a"),
        ("wb:b", "queued-b"),
        ("wb:c", "queued-c"),
        ("wb:d", "queued-d"),
    ] {
        assert_eq!(t.cmd(&["GET", key]).await, bulk(value.as_bytes()));
        assert_eq!(t3.cmd(&["GET", key]).await, bulk(value.as_bytes()));
    }
    redis.resume();

    for (key, value) in [
        ("wb:a", "queued-a"),
        ("wb:b", "queued-b"),
        ("wb:c", "queued-c"),
        ("wb:d", "queued-d"),
    ] {
        wait_redis(&mut d, key, value.as_bytes()).await;
    }
    let ttl = decode(&d.cmd(&["TTL", "wb:d"]).await).as_int().unwrap();
    assert!(
        (90..=100).contains(&ttl),
        "SETEX's expiry reached Redis: {ttl}"
    );
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == 0,
        "an empty queue",
    )
    .await;
    assert_eq!(
        tierd_info(&mut admin, "tierd_write_behind_flushed").await,
        flushed + 3
    );
    assert_eq!(tierd_info(&mut admin, "tierd_write_behind_errors").await, 0);
    // Flushed writes are announced like any: L1 holds nothing stale.
    let mut probe = L1Probe::new(&redis, &tierd, "wb").await;
    assert_eq!(
        probe.read(&["GET", "wb:a"]).await,
        (bulk(b"queued-a"), Outcome::Miss)
    );
    assert_eq!(
        probe.read(&["GET", "wb:a"]).await,
        (bulk(b"queued-a"), Outcome::Hit)
    );
}

/// Reads other than GET, and writes that are not queued, wait for the
/// queued writes of their keys: they see them, in order, from any client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_writes_of_a_key_stay_in_order_with_everything_after_them() {
    // Long enough that a request that did not wait would reach Redis first.
    let flush = Duration::from_millis(300);
    let (redis, tierd) = behind_fixture(flush, 100).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let mut other = tierd.raw().await;

    d.cmd(&["SET", "wb:k", "old"]).await;
    assert_eq!(&t.cmd(&["SET", "wb:k", "newvalue"]).await[..], b"+OK\r\n");
    assert_eq!(d.cmd(&["GET", "wb:k"]).await, bulk(b"old"), "still queued");
    assert_eq!(t.cmd(&["GET", "wb:k"]).await, bulk(b"newvalue"));
    assert_eq!(other.cmd(&["GET", "wb:k"]).await, bulk(b"newvalue"));
    // STRLEN waits for the queued write: 8, not old's 3.
    assert_eq!(&other.cmd(&["STRLEN", "wb:k"]).await[..], b":8\r\n");

    // One client's pipeline mixing queued and synchronous writes of a key.
    let pipeline: [&[&str]; 6] = [
        &["SET", "wb:n", "10"],
        &["INCR", "wb:n"],
        &["SET", "wb:n", "5"],
        &["APPEND", "wb:n", "x"],
        &["SET", "wb:n", "7", "EX", "1000"],
        &["GET", "wb:n"],
    ];
    let mut raw = Vec::new();
    for args in pipeline {
        raw.extend_from_slice(&support::exchange::encode(args));
    }
    t.send(&raw).await;
    let mut replies = Vec::new();
    for _ in 0..pipeline.len() {
        replies.push(text(&t.frame().await));
    }
    assert_eq!(
        replies,
        [
            "+OK\r\n",
            ":11\r\n",
            "+OK\r\n",
            ":2\r\n",
            "+OK\r\n",
            "$1\r\n7\r\n"
        ]
    );
    wait_redis(&mut d, "wb:n", b"7").await;

    // Across clients: a write of another client waits for the queued one.
    assert_eq!(&t.cmd(&["SET", "wb:m", "a"]).await[..], b"+OK\r\n");
    assert_eq!(&other.cmd(&["APPEND", "wb:m", "b"]).await[..], b":2\r\n");
    assert_eq!(d.cmd(&["GET", "wb:m"]).await, bulk(b"ab"));
    assert_eq!(&t.cmd(&["SET", "wb:m", "c"]).await[..], b"+OK\r\n");
    assert_eq!(&other.cmd(&["DEL", "wb:m"]).await[..], b":1\r\n");
    assert_eq!(&d.cmd(&["EXISTS", "wb:m"]).await[..], b":0\r\n");
    // Commands whose keys tierd cannot know wait for the whole queue.
    assert_eq!(&t.cmd(&["SET", "wb:s", "scripted"]).await[..], b"+OK\r\n");
    let got = other
        .cmd(&["EVAL", "return redis.call('GET', 'wb:s')", "0"])
        .await;
    assert_eq!(got, bulk(b"scripted"));
    assert_eq!(&t.cmd(&["SET", "wb:z", "1"]).await[..], b"+OK\r\n");
    let size = decode(&other.cmd(&["DBSIZE"]).await).as_int().unwrap();
    assert_eq!(size, decode(&d.cmd(&["DBSIZE"]).await).as_int().unwrap());
    assert_eq!(&d.cmd(&["EXISTS", "wb:z"]).await[..], b":1\r\n");
}

/// Writes that cannot be answered `+OK` before Redis has them, or that do
/// not belong to the queue, go to Redis at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_that_are_not_queued_reach_redis_before_their_reply() {
    // Far longer than the test: anything queued would still be queued.
    let (redis, tierd) = behind_fixture(Duration::from_secs(60), 100).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let cases: [(&[&str], &str, &str); 6] = [
        (&["SET", "wb:nx", "v", "NX"], "wb:nx", "v"),
        (&["SET", "wb:get", "v", "GET"], "wb:get", "v"),
        (
            &["SET", "wb:exat", "v", "EXAT", "4000000000"],
            "wb:exat",
            "v",
        ),
        (&["SETNX", "wb:setnx", "v"], "wb:setnx", "v"),
        (&["MSET", "wb:mixed", "v", "p:mixed", "w"], "wb:mixed", "v"),
        (&["SET", "p:plain", "v"], "p:plain", "v"),
    ];
    for (args, key, value) in cases {
        let reply = t.cmd(args).await;
        assert!(!reply.starts_with(b"-"), "{args:?}: {}", text(&reply));
        assert_eq!(
            d.cmd(&["GET", key]).await,
            bulk(value.as_bytes()),
            "{args:?}"
        );
    }
    // Inside MULTI, and in another db.
    assert_eq!(&t.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&t.cmd(&["SET", "wb:multi", "v"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&t.cmd(&["EXEC"]).await[..], b"*1\r\n+OK\r\n");
    assert_eq!(d.cmd(&["GET", "wb:multi"]).await, bulk(b"v"));
    assert_eq!(&t.cmd(&["SELECT", "1"]).await[..], b"+OK\r\n");
    assert_eq!(&t.cmd(&["SET", "wb:db1", "v"]).await[..], b"+OK\r\n");
    assert_eq!(&d.cmd(&["SELECT", "1"]).await[..], b"+OK\r\n");
    assert_eq!(d.cmd(&["GET", "wb:db1"]).await, bulk(b"v"));
    let mut admin = tierd.raw().await;
    assert_eq!(tierd_info(&mut admin, "tierd_write_behind_queue").await, 0);
}

/// A full queue holds the writer back (its next acknowledgement waits) and
/// loses nothing; other clients go on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_makes_writers_wait_and_loses_nothing() {
    const MAX_QUEUE: usize = 3;
    const WRITES: usize = 10;
    let (redis, tierd) = behind_fixture(Duration::from_millis(5), MAX_QUEUE).await;
    let mut d = direct(&redis).await;
    let mut writer = tierd.raw().await;
    let mut reader = tierd.raw().await;
    let mut admin = tierd.raw().await;

    redis.pause();
    let mut raw = Vec::new();
    for i in 0..WRITES {
        raw.extend_from_slice(&support::exchange::encode(&[
            "SET",
            &format!("wb:bp:{i}"),
            &format!("value-{i}"),
        ]));
    }
    writer.send(&raw).await;
    for i in 0..MAX_QUEUE {
        assert_eq!(&writer.frame().await[..], b"+OK\r\n", "write {i}");
    }
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == MAX_QUEUE as u64,
        "a full queue",
    )
    .await;
    // The writer waits for room: no more acknowledgements while Redis is
    // frozen.
    assert_eq!(writer.try_frame(Duration::from_millis(300)).await, None);
    assert_eq!(
        tierd_info(&mut admin, "tierd_write_behind_queue").await,
        MAX_QUEUE as u64
    );
    // Everyone else is served, and sees what is queued.
    assert_eq!(reader.cmd(&["GET", "wb:bp:0"]).await, bulk(b"value-0"));
    redis.resume();

    for i in MAX_QUEUE..WRITES {
        assert_eq!(&writer.frame().await[..], b"+OK\r\n", "write {i}");
    }
    for i in 0..WRITES {
        wait_redis(
            &mut d,
            &format!("wb:bp:{i}"),
            format!("value-{i}").as_bytes(),
        )
        .await;
    }
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == 0,
        "an empty queue",
    )
    .await;
}

/// With Redis frozen past the command timeout, a request that waits for a
/// queued write fails (it must not reach Redis before the write once Redis
/// thaws) instead of hanging; the write itself is not lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_for_a_queued_write_ends_at_the_command_timeout() {
    let redis = RedisServer::start();
    let mut config = behind_config(&redis, Duration::from_millis(5), 100);
    config.upstream.command_timeout = Duration::from_millis(500);
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    assert_eq!(&t.cmd(&["SET", "wb:warmup", "1"]).await[..], b"+OK\r\n");
    wait_redis(&mut d, "wb:warmup", b"1").await;

    redis.pause();
    assert_eq!(&t.cmd(&["SET", "wb:f", "frozen"]).await[..], b"+OK\r\n");
    let started = tokio::time::Instant::now();
    let got = t.cmd(&["STRLEN", "wb:f"]).await;
    let waited = started.elapsed();
    assert!(
        got.starts_with(b"-ERR upstream unavailable") || got.starts_with(b"-TRYAGAIN"),
        "{}",
        text(&got)
    );
    assert!(waited < 5 * SECOND, "STRLEN waited {waited:?}");
    redis.resume();
    wait_redis(&mut d, "wb:f", b"frozen").await;
    assert_eq!(&t.cmd(&["STRLEN", "wb:f"]).await[..], b":6\r\n");
}

/// Redis refusing a queued write (here: out of memory) cannot reach the
/// client, which was told OK: it is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_flushed_writes_are_counted() {
    let (redis, tierd) = behind_fixture(Duration::from_millis(5), 100).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;
    let mut admin = tierd.raw().await;
    assert_eq!(tierd_info(&mut admin, "tierd_write_behind_errors").await, 0);
    assert_eq!(
        &d.cmd(&["CONFIG", "SET", "maxmemory", "1"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&t.cmd(&["SET", "wb:oom", "v"]).await[..], b"+OK\r\n");
    wait_info(
        &mut admin,
        "tierd_write_behind_errors",
        |v| v == 1,
        "one refused write",
    )
    .await;
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == 0,
        "an empty queue",
    )
    .await;
    assert_eq!(
        &d.cmd(&["CONFIG", "SET", "maxmemory", "0"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&d.cmd(&["EXISTS", "wb:oom"]).await[..], b":0\r\n");
    // Reads no longer wait for it, and see Redis.
    assert_eq!(&t.cmd(&["GET", "wb:oom"]).await[..], b"$-1\r\n");
    assert_eq!(&t.cmd(&["SET", "wb:oom", "w"]).await[..], b"+OK\r\n");
    wait_redis(&mut d, "wb:oom", b"w").await;
}

// ---------------------------------------------------------------------------
// write = "behind" while Redis fails: nothing overtakes a queued write
// ---------------------------------------------------------------------------

/// [`behind_config`] with a circuit breaker that opens on the first
/// failure.
fn behind_breaker_config(
    redis: &RedisServer,
    flush: Duration,
    max_queue: usize,
    command_timeout: Duration,
    reset: Duration,
) -> Config {
    let mut config = behind_config(redis, flush, max_queue);
    config.upstream.command_timeout = command_timeout;
    config.upstream.failure_threshold = 1;
    config.upstream.reset = reset;
    config
}

/// One write through the queue, so that the flusher's connection is up
/// before a test freezes Redis. A request waiting for a queued write has
/// it sent at once, whatever the `flush`.
async fn flusher_up(redis: &RedisServer, tierd: &Tierd) {
    let mut t = tierd.raw().await;
    assert_eq!(&t.cmd(&["SET", "wb:warmup", "1"]).await[..], b"+OK\r\n");
    assert_eq!(&t.cmd(&["STRLEN", "wb:warmup"]).await[..], b":1\r\n");
    assert_eq!(
        direct(redis).await.cmd(&["GET", "wb:warmup"]).await,
        bulk(b"1")
    );
}

/// Freezes Redis and opens the circuit breaker: a read nothing queued is
/// for times out (the breakers of these tests open on one failure).
async fn freeze_and_open_the_breaker(redis: &RedisServer, tierd: &Tierd) {
    redis.pause();
    let mut t = tierd.raw().await;
    let got = t.cmd(&["GET", "p:trip"]).await;
    assert!(got.starts_with(UNAVAILABLE), "{}", text(&got));
    let mut admin = tierd.raw().await;
    let deadline = Deadline::new(10 * SECOND, "the circuit breaker to open");
    while circuit_state(&mut admin).await == "closed" {
        deadline.tick().await;
    }
}

/// While the breaker is open, and then half-open, a request for a key
/// with a queued write is refused (`-TRYAGAIN`) and never sent: sent as
/// the half-open probe, a `DEL` would reach Redis before the `SET` it was
/// acknowledged after, and the key would end up holding the value the
/// client deleted. Once the queued write is in Redis, the `DEL` goes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_key_is_refused_while_the_breaker_is_not_closed() {
    const RESET: Duration = Duration::from_millis(500);
    let redis = RedisServer::start();
    // A long flush: nothing sends the SET before Redis is frozen, and it
    // stays queued throughout the outage.
    let config = behind_breaker_config(&redis, 5 * SECOND, 100, 2 * SECOND, RESET);
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;

    assert_eq!(&t.cmd(&["SET", "wb:2", "v1"]).await[..], b"+OK\r\n");
    freeze_and_open_the_breaker(&redis, &tierd).await;
    // Through the open breaker and past its reset, when any request the
    // breaker lets through is a half-open probe.
    let until = tokio::time::Instant::now() + 3 * RESET;
    let mut resumed = false;
    let mut refused = 0;
    while tokio::time::Instant::now() < until {
        t.send_cmd(&[b"DEL", b"wb:2"]).await;
        let reply = match t.try_frame(Duration::from_millis(500)).await {
            Some(reply) => reply,
            None => {
                // It was sent to the frozen Redis: let Redis answer it, to
                // show what it did.
                redis.resume();
                resumed = true;
                t.frame().await
            }
        };
        assert_eq!(
            text(&reply),
            text(CIRCUIT_OPEN),
            "a DEL of a key with a queued SET, after {refused} refusals, while the breaker was not closed"
        );
        refused += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(!resumed);
    redis.resume();
    wait_redis(&mut d, "wb:2", b"v1").await;
    // Once the SET is in Redis (and the breaker closed) the DEL goes, after it.
    let deadline = Deadline::new(10 * SECOND, "DEL wb:2 to run");
    loop {
        let got = t.cmd(&["DEL", "wb:2"]).await;
        if &got[..] == b":1\r\n" {
            break;
        }
        assert!(
            got.starts_with(b"-TRYAGAIN") || got.starts_with(UNAVAILABLE),
            "{}",
            text(&got)
        );
        deadline.tick().await;
    }
    assert_eq!(&d.cmd(&["EXISTS", "wb:2"]).await[..], b":0\r\n");
    assert_eq!(&t.cmd(&["GET", "wb:2"]).await[..], b"$-1\r\n");
}

/// A transaction queued a `DEL` of a key before another client's `SET` of
/// it was queued by write-behind; `EXEC` comes after that `SET` was
/// acknowledged, so it runs after it: the key is deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_runs_after_the_writes_queued_before_it() {
    // Long enough that an EXEC that did not wait would run first.
    let (redis, tierd) = behind_fixture(2 * SECOND, 100).await;
    let mut d = direct(&redis).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_eq!(&a.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.cmd(&["DEL", "wb:1"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&b.cmd(&["SET", "wb:1", "v1"]).await[..], b"+OK\r\n");
    assert_eq!(&d.cmd(&["EXISTS", "wb:1"]).await[..], b":0\r\n", "queued");
    // Inside MULTI a request of the queued key is only queued in Redis:
    // it does not wait (EXEC does).
    assert_eq!(&a.cmd(&["GET", "wb:1"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&d.cmd(&["EXISTS", "wb:1"]).await[..], b":0\r\n", "queued");
    assert_eq!(
        text(&a.cmd(&["EXEC"]).await),
        "*2\r\n:1\r\n$-1\r\n",
        "the transaction ran after the SET acknowledged before EXEC"
    );
    let mut admin = tierd.raw().await;
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == 0,
        "an empty queue",
    )
    .await;
    assert_eq!(&d.cmd(&["EXISTS", "wb:1"]).await[..], b":0\r\n");
    assert_eq!(&a.cmd(&["GET", "wb:1"]).await[..], b"$-1\r\n");
}

/// When the writes queued before `EXEC` cannot reach Redis (the breaker is
/// open), `EXEC` is refused at once and its transaction discarded, never
/// run; the client is out of `MULTI` and its next transaction runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_is_refused_and_discarded_while_queued_writes_cannot_reach_redis() {
    let redis = RedisServer::start();
    let config = behind_breaker_config(&redis, 60 * SECOND, 100, SECOND, 60 * SECOND);
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    flusher_up(&redis, &tierd).await;
    let mut d = direct(&redis).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_eq!(&a.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.cmd(&["SET", "p:tx", "ran"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&b.cmd(&["SET", "wb:tx", "v"]).await[..], b"+OK\r\n");
    freeze_and_open_the_breaker(&redis, &tierd).await;
    let started = tokio::time::Instant::now();
    assert_eq!(text(&a.cmd(&["EXEC"]).await), text(CIRCUIT_OPEN));
    assert!(started.elapsed() < SECOND, "EXEC failed fast");
    redis.resume();
    wait_redis(&mut d, "wb:tx", b"v").await;
    // Discarded: it never runs, and the client is out of the transaction.
    assert_eq!(&d.cmd(&["EXISTS", "p:tx"]).await[..], b":0\r\n");
    let deadline = Deadline::new(10 * SECOND, "the breaker to let MULTI through");
    loop {
        let got = a.cmd(&["MULTI"]).await;
        if &got[..] == b"+OK\r\n" {
            break;
        }
        assert!(got.starts_with(b"-TRYAGAIN"), "{}", text(&got));
        deadline.tick().await;
    }
    assert_eq!(&a.cmd(&["SET", "p:tx2", "ran"]).await[..], b"+QUEUED\r\n");
    assert_eq!(text(&a.cmd(&["EXEC"]).await), "*1\r\n+OK\r\n");
    assert_eq!(d.cmd(&["GET", "p:tx2"]).await, bulk(b"ran"));
    assert_eq!(&d.cmd(&["EXISTS", "p:tx"]).await[..], b":0\r\n");
}

/// A writer that finds the queue full while Redis does not take the
/// queued writes is not held forever: it gets tierd's upstream-unavailable
/// error after the command timeout, and `-TRYAGAIN` at once while the
/// breaker is open. Its write was not acknowledged and never reaches
/// Redis; the acknowledged ones all do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_waits_for_room_no_longer_than_redis_could_answer() {
    const MAX_QUEUE: usize = 4;
    let redis = RedisServer::start();
    let config = behind_breaker_config(
        &redis,
        Duration::from_millis(5),
        MAX_QUEUE,
        SECOND,
        60 * SECOND,
    );
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    flusher_up(&redis, &tierd).await;
    let mut d = direct(&redis).await;
    let mut writer = tierd.raw().await;
    let mut admin = tierd.raw().await;

    redis.pause();
    for i in 0..MAX_QUEUE {
        let (key, value) = (format!("wb:q:{i}"), format!("v{i}"));
        assert_eq!(&writer.cmd(&["SET", &key, &value]).await[..], b"+OK\r\n");
    }
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == MAX_QUEUE as u64,
        "a full queue",
    )
    .await;
    // The breaker is closed: the writer waits for room, as long as the
    // command timeout (1 s).
    writer.send_cmd(&[b"SET", b"wb:q:late", b"x"]).await;
    let got = writer
        .try_frame(5 * SECOND)
        .await
        .expect("a writer waiting for room in a full queue got no reply within 5 s");
    assert!(
        got.starts_with(UNAVAILABLE) || &got[..] == CIRCUIT_OPEN,
        "{}",
        text(&got)
    );
    // The breaker is open: refused at once.
    freeze_and_open_the_breaker(&redis, &tierd).await;
    writer.send_cmd(&[b"SET", b"wb:q:open", b"x"]).await;
    let got = writer.try_frame(Duration::from_millis(500)).await.expect(
        "a writer finding the queue full while the breaker is open was not refused at once",
    );
    assert_eq!(text(&got), text(CIRCUIT_OPEN));

    redis.resume();
    for i in 0..MAX_QUEUE {
        wait_redis(&mut d, &format!("wb:q:{i}"), format!("v{i}").as_bytes()).await;
    }
    wait_info(
        &mut admin,
        "tierd_write_behind_queue",
        |v| v == 0,
        "an empty queue",
    )
    .await;
    for key in ["wb:q:late", "wb:q:open"] {
        assert_eq!(&d.cmd(&["EXISTS", key]).await[..], b":0\r\n", "{key}");
    }
}

/// A `GET` answered from the queue gives back the value exactly as it was
/// written, even one that happens to be a valid tierd compression frame,
/// unless the key's own rule compresses values in Redis (then the queued
/// value is the compressed one, and is decoded). Another rule compressing
/// changes nothing for the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_value_is_read_back_byte_exact() {
    let redis = RedisServer::start();
    let mut config = l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            with_write(rule("wb", "wb:*", HOUR), WriteStrategy::Behind),
            with_write(compress_rule("zb", "zb:*", true), WriteStrategy::Behind),
            with_write(compress_rule("zl", "zl:*", false), WriteStrategy::Behind),
            compress_rule("zup", "zup:*", true),
        ],
    );
    // Queued for the whole test.
    config.write_behind = WriteBehindConfig {
        flush: 60 * SECOND,
        max_queue: 100,
    };
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "wb", "wb:warmup").await;
    let mut t = tierd.raw().await;
    let mut t3 = tierd.raw().await;
    assert_eq!(t3.cmd(&["HELLO", "3"]).await[0], b'%');

    let plain: Vec<u8> = b"a value that compresses well, ".repeat(20);
    let frame = frame_of(&plain);
    assert!(frame.starts_with(&MAGIC));
    for (key, value, read_back) in [
        // Rules that keep values plain in Redis: exactly as written.
        ("wb:frame", &frame, &frame),
        ("zl:frame", &frame, &frame),
        ("zl:plain", &plain, &plain),
        // A rule compressing in Redis: queued compressed, read back plain.
        ("zb:plain", &plain, &plain),
        ("zb:frame", &frame, &frame),
    ] {
        t.send_cmd(&[b"SET", key.as_bytes(), value]).await;
        assert_eq!(&t.frame().await[..], b"+OK\r\n", "{key}");
        for client in [&mut t, &mut t3] {
            client.send_cmd(&[b"GET", key.as_bytes()]).await;
            let got = client.frame().await;
            assert!(
                got == bulk(read_back),
                "{key}: GET answered from the queue gave {} bytes, not the {} written",
                got.len(),
                bulk(read_back).len()
            );
        }
    }
    let mut admin = tierd.raw().await;
    assert_eq!(tierd_info(&mut admin, "tierd_write_behind_queue").await, 5);
}

// ---------------------------------------------------------------------------
// SIGTERM under write-behind load
// ---------------------------------------------------------------------------

/// The tierd binary with a config file, killed on drop if still running.
struct Proxy {
    child: Child,
    addr: SocketAddr,
    metrics: SocketAddr,
    dir: tempfile::TempDir,
}

impl Proxy {
    async fn start(redis: &RedisServer, flush: &str) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = dir.path().join("tierd.toml");
        std::fs::write(
            &path,
            format!(
                r#"listen = "{addr}"
shutdown_timeout = "10s"

[upstream]
url = "{upstream}"

[metrics]
listen = "{metrics}"

[write_behind]
flush = "{flush}"
max_queue = 50000

[[rules]]
name = "wb"
match = "wb:*"
ttl = "1h"
write = "behind"
"#,
                upstream = redis.url()
            ),
        )
        .unwrap();
        let child = support::spawn_tierd_binary(&path, dir.path());
        let mut proxy = Proxy {
            child,
            addr,
            metrics,
            dir,
        };
        let deadline = Deadline::new(10 * SECOND, "the tierd child to answer PING");
        loop {
            if let Some(status) = proxy.child.try_wait().unwrap() {
                panic!("tierd exited at startup with {status}:\n{}", proxy.log());
            }
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                let mut raw = Raw::connect(addr).await;
                raw.send(b"PING\r\n").await;
                if raw.try_frame(SECOND).await.as_deref() == Some(b"+PONG\r\n") {
                    return proxy;
                }
            }
            deadline.tick().await;
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tierd.log")).unwrap_or_default()
    }

    fn sigterm(&self) {
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success());
    }

    async fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Deadline::new(limit, "tierd to exit after SIGTERM");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            deadline.tick().await;
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// `GET /metrics`, the body.
async fn scrape(addr: SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: tierd\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

fn sample(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in:\n{metrics}"))
        .trim()
        .parse()
        .unwrap()
}

/// Writers pipelining queued writes as fast as tierd takes them; tierd is
/// sent SIGTERM while the queue holds thousands. Every write a client was
/// told OK for is in Redis after tierd exited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_write_behind_load_drains_the_queue_with_zero_loss() {
    const WRITERS: usize = 4;
    const PIPELINE: usize = 50;
    let redis = RedisServer::start();
    // A long flush: at the signal, the queue holds whatever came in
    // during the last half second.
    let mut proxy = Proxy::start(&redis, "500ms").await;
    let acked: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let stop = Arc::new(AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), proxy.addr);
        writers.push(tokio::spawn(async move {
            let mut raw = Raw::connect(addr).await;
            let mut i = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let batch: Vec<(String, String)> = (i..i + PIPELINE)
                    .map(|n| (format!("wb:{w}:{n}"), format!("{n}-{w}-payload")))
                    .collect();
                i += PIPELINE;
                let mut bytes = Vec::new();
                for (k, v) in &batch {
                    bytes.extend_from_slice(&support::exchange::encode(&["SET", k, v]));
                }
                use tokio::io::AsyncWriteExt;
                if raw.stream.write_all(&bytes).await.is_err() {
                    return;
                }
                for kv in batch {
                    match raw.try_frame(10 * SECOND).await {
                        Some(f) if &f[..] == b"+OK\r\n" => acked.lock().unwrap().push(kv),
                        // Refused, closed or cut off by the shutdown: not
                        // acknowledged, so not promised.
                        _ => return,
                    }
                }
            }
        }));
    }
    let mut admin = Raw::connect(proxy.addr).await;
    let deadline = Deadline::new(20 * SECOND, "thousands of acknowledged writes, queued");
    loop {
        let queued = tierd_info(&mut admin, "tierd_write_behind_queue").await;
        if acked.lock().unwrap().len() >= 5000 && queued >= 500 {
            break;
        }
        deadline.tick().await;
    }
    let metrics = scrape(proxy.metrics).await;
    assert!(
        sample(&metrics, "tierd_write_behind_queue") > 0.0,
        "{metrics}"
    );
    assert!(sample(&metrics, "tierd_write_behind_flushed_total") > 0.0);
    assert_eq!(sample(&metrics, "tierd_write_behind_errors_total"), 0.0);

    proxy.sigterm();
    let status = proxy.wait_exit(15 * SECOND).await;
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.await.unwrap();
    }
    let log = proxy.log();
    assert!(status.success(), "tierd exited with {status}:\n{log}");

    let acked = std::mem::take(&mut *acked.lock().unwrap());
    assert!(acked.len() >= 5000);
    let mut d = direct(&redis).await;
    let mut missing = BTreeMap::new();
    for chunk in acked.chunks(500) {
        let mut args = vec!["MGET"];
        args.extend(chunk.iter().map(|(k, _)| k.as_str()));
        let got = decode(&d.cmd(&args).await);
        for ((k, v), got) in chunk.iter().zip(got.elements().unwrap()) {
            if got != &Resp::Bulk(Some(v.clone().into_bytes())) {
                missing.insert(k.clone(), got.clone());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes are not in Redis, e.g. {:?}",
        missing.len(),
        acked.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    assert!(log.contains("write_behind_drained"), "{log}");
    assert!(!log.contains("write_behind_lost"), "{log}");
}
