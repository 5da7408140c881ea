//! Regression tests from an independent review of transparent compression
//! (issue 6, commit 05577bd). Each test runs a real redis-server and tierd
//! and failed on the bug it names before its fix; expected values come from Redis on the
//! plain value or from the documented frame format, never from tierd's own
//! code.
//!
//! tierd runs with a `c:*` rule that compresses values of at least 64 bytes
//! in Redis (`upstream = true`) and a `p:*` rule without compression.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::compression::{bulk_of, compress_rule, frame_of, frame_with, HEADER_LEN, MAGIC};
use support::exchange::text;
use support::l1::{direct, l1_config, rule, wait_until_caching, HOUR};
use support::probe::{info_field, wait_blocked_clients};
use support::{Raw, RedisServer, Tierd};
use tierd::config::{Config, TrackingMode};

fn config(redis: &RedisServer) -> Config {
    l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            rule("warmup", "warmup:*", HOUR),
            compress_rule("c", "c:*", true),
            compress_rule("l", "l:*", false),
            rule("p", "p:*", HOUR),
        ],
    )
}

async fn start_with(config: Config) -> Tierd {
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "warmup", "warmup:0").await;
    tierd
}

async fn start(redis: &RedisServer) -> Tierd {
    start_with(config(redis)).await
}

/// A JSON array of user records (compresses well), at least `len` bytes.
fn json_doc(len: usize, seed: u64) -> Vec<u8> {
    let mut out = String::from("[");
    let mut i = seed * 1000;
    while out.len() < len {
        out.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user {i}\",\"email\":\"user{i}@example.com\",\
             \"roles\":[\"teacher\",\"viewer\"],\"active\":{}}},",
            i % 3 == 0
        ));
        i += 1;
    }
    out.push(']');
    out.into_bytes()
}

/// Decodes one documented frame; `None` when `stored` is not a frame.
fn unframe(stored: &[u8]) -> Option<Vec<u8>> {
    if stored.len() < HEADER_LEN || stored[..4] != MAGIC || stored[4] != 1 {
        return None;
    }
    let len = u32::from_le_bytes(stored[5..9].try_into().unwrap()) as usize;
    lz4_flex::block::decompress(&stored[HEADER_LEN..], len).ok()
}

fn resp(args: &[&[u8]]) -> Vec<u8> {
    support::wire::resp(args)
}

async fn call(raw: &mut Raw, args: &[&[u8]]) -> Bytes {
    raw.send(&resp(args)).await;
    raw.frame().await
}

/// Bytes for an assertion message, cut short.
fn show(b: &[u8]) -> String {
    let t = text(b);
    if t.chars().count() > 160 {
        let cut: String = t.chars().take(160).collect();
        format!("{cut:?}… ({} bytes)", b.len())
    } else {
        format!("{t:?}")
    }
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------
// 1. A rewritten write that stalls is compressed a second time
// ---------------------------------------------------------------------------

/// A pipelined `SET` of a large value behind a request on the client's
/// dedicated connection (here a `BLPOP`) stalls until that reply arrives
/// and is then dispatched again. The stalled request is the already
/// rewritten one (its value is a frame), and the second dispatch frames the
/// frame: Redis ends up holding a frame of a frame, and `GET` returns the
/// inner frame's bytes instead of the value the client wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_set_is_not_compressed_twice() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut admin = direct(&redis).await;
    let doc = json_doc(4096, 1);

    let mut t = tierd.raw().await;
    for (what, write) in [
        ("SET", resp(&[b"SET", b"c:stalled", &doc])),
        ("MSET", resp(&[b"MSET", b"c:stalled2", &doc, b"p:x", b"1"])),
    ] {
        let mut pipeline = resp(&[b"BLPOP", b"p:list", b"0"]);
        pipeline.extend(write);
        t.send(&pipeline).await;
        // The BLPOP is blocked in Redis, so the write behind it has stalled.
        wait_blocked_clients(&mut admin, 1, Duration::from_secs(10)).await;
        call(&mut admin, &[b"RPUSH", b"p:list", b"x"]).await;
        let blpop = t.frame().await;
        assert!(blpop.starts_with(b"*2\r\n"), "BLPOP: {}", show(&blpop));
        let ok = t.frame().await;
        assert_eq!(&ok[..], b"+OK\r\n", "{what}: {}", show(&ok));
    }

    let mut failures = Vec::new();
    for key in ["c:stalled", "c:stalled2"] {
        let got = bulk_of(&call(&mut t, &[b"GET", key.as_bytes()]).await);
        if got.as_deref() != Some(&doc[..]) {
            failures.push(format!(
                "GET {key} through tierd: {}",
                show(&got.unwrap_or_default())
            ));
        }
        let held = bulk_of(&call(&mut admin, &[b"GET", key.as_bytes()]).await).unwrap();
        let once = unframe(&held).unwrap_or_default();
        if once != doc {
            failures.push(format!(
                "{key}: Redis holds a frame that decodes to {} (a frame again: {})",
                show(&once),
                once.starts_with(&MAGIC)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 2. Values that start with the magic reach a compressing key unescaped
// ---------------------------------------------------------------------------

/// `SET` frames a value that starts with the magic so that reading it back
/// can never mistake it for a frame. The emulated read-modify-writes on a
/// key that is plain (or missing) run the client's command as it is, so an
/// `APPEND` or `SETRANGE` that writes such bytes leaves them raw in Redis,
/// and every later `GET` decodes the client's bytes as a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appended_bytes_that_look_like_a_frame_read_back_as_written() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    // A client's binary value that happens to be a valid frame (say, a blob
    // it compressed itself with the same library).
    let value = frame_of(&json_doc(2000, 2));

    let mut failures = Vec::new();
    for (key, twin, write) in [
        ("c:append", "q:append", &b"APPEND"[..]),
        ("c:setrange", "q:setrange", b"SETRANGE"),
    ] {
        let args = |k: &str| -> Vec<Vec<u8>> {
            if write == b"APPEND" {
                vec![write.to_vec(), k.as_bytes().to_vec(), value.clone()]
            } else {
                vec![
                    write.to_vec(),
                    k.as_bytes().to_vec(),
                    b"0".to_vec(),
                    value.clone(),
                ]
            }
        };
        let a = args(key);
        let b = args(twin);
        let a: Vec<&[u8]> = a.iter().map(|x| &x[..]).collect();
        let b: Vec<&[u8]> = b.iter().map(|x| &x[..]).collect();
        let got = call(&mut t, &a).await;
        let want = call(&mut d, &b).await;
        if got != want {
            failures.push(format!(
                "{key}: write replied {} (Redis {})",
                show(&got),
                show(&want)
            ));
        }
        let got = call(&mut t, &[b"GET", key.as_bytes()]).await;
        let want = call(&mut d, &[b"GET", twin.as_bytes()]).await;
        assert_eq!(bulk_of(&want).as_deref(), Some(&value[..]), "premise");
        if got != want {
            failures.push(format!(
                "GET {key} after {}: tierd {} but Redis on the plain value {}",
                text(write),
                show(&got),
                show(&want)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// The same through the key moves that are not emulated (`RENAME`/`COPY`
/// from a key no rule compresses into one that does), `RESTORE` and
/// tierd's own `CACHE.SET` (which sends a plain `SET`): the
/// destination holds the client's magic-prefixed bytes raw, and `GET` on it
/// decodes them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frame_like_values_moved_or_restored_into_a_compressing_key_read_back_as_written() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let value = frame_of(&json_doc(2000, 3));

    let mut failures = Vec::new();
    // Stored through tierd under keys whose rule does not compress.
    for key in ["p:src1", "p:src2", "p:src3"] {
        let ok = call(&mut t, &[b"SET", key.as_bytes(), &value]).await;
        assert_eq!(&ok[..], b"+OK\r\n");
    }
    let dump = call(&mut t, &[b"DUMP", b"p:src3"]).await;
    let payload = bulk_of(&dump).unwrap();
    for (what, args) in [
        ("RENAME", vec![&b"RENAME"[..], b"p:src1", b"c:renamed"]),
        ("COPY", vec![&b"COPY"[..], b"p:src2", b"c:copied"]),
        (
            "RESTORE",
            vec![&b"RESTORE"[..], b"c:restored", b"0", &payload],
        ),
        // tierd's own SET extension.
        ("CACHE.SET", vec![&b"CACHE.SET"[..], b"c:cacheset", &value]),
    ] {
        let reply = call(&mut t, &args).await;
        assert!(!reply.starts_with(b"-"), "{what}: {}", show(&reply));
    }
    for key in ["c:renamed", "c:copied", "c:restored", "c:cacheset"] {
        let got = call(&mut t, &[b"GET", key.as_bytes()]).await;
        if got[..] != bulk(&value)[..] {
            failures.push(format!(
                "GET {key}: tierd {} but the client stored {} bytes starting with the magic",
                show(&got),
                value.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A value above `l1.max_value_size` is stored plain even when it starts
/// with the magic (compress() refuses it), so a `GET` of exactly what the
/// client wrote answers the corrupt-value error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_magic_prefixed_value_above_max_value_size_reads_back_as_written() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    config.l1.max_value_size = 4096;
    let tierd = start_with(config).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    // Starts with a header that parses (magic, codec 1, a length) but is
    // the client's data: 5000 bytes of it.
    let mut value = frame_with(u32::MAX, b"");
    value.extend(std::iter::repeat(b'x').take(5000));

    let ok = call(&mut t, &[b"SET", b"c:big", &value]).await;
    assert_eq!(&ok[..], b"+OK\r\n");
    call(&mut d, &[b"SET", b"q:big", &value]).await;
    let mut failures = Vec::new();
    for (what, args_t, args_d) in [
        (
            "GET",
            vec![&b"GET"[..], b"c:big"],
            vec![&b"GET"[..], b"q:big"],
        ),
        (
            "STRLEN",
            vec![&b"STRLEN"[..], b"c:big"],
            vec![&b"STRLEN"[..], b"q:big"],
        ),
        (
            "APPEND",
            vec![&b"APPEND"[..], b"c:big", b"y"],
            vec![&b"APPEND"[..], b"q:big", b"y"],
        ),
    ] {
        let got = call(&mut t, &args_t).await;
        let want = call(&mut d, &args_d).await;
        if got != want {
            failures.push(format!(
                "{what}: tierd {} but Redis {}",
                show(&got),
                show(&want)
            ));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 3. A RESP3 subscriber bypasses compression
// ---------------------------------------------------------------------------

/// RESP3 lets a subscribed client send any command. On the stream, tierd
/// forwards requests without its compression plan: `GET` returns the
/// stored frame, `STRLEN` its length. Either Redis's reply on the plain
/// value or a clear error naming the key (the rule for what cannot
/// be emulated) is acceptable; the compressed bytes are not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscriber_reads_compressed_values_as_written() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let doc = json_doc(4096, 4);
    let mut writer = tierd.raw().await;
    let ok = call(&mut writer, &[b"SET", b"c:sub", &doc]).await;
    assert_eq!(&ok[..], b"+OK\r\n");

    let mut t = tierd.raw().await;
    let hello = t.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%');
    let sub = t.cmd(&["SUBSCRIBE", "news"]).await;
    assert!(sub.starts_with(b">3\r\n"), "SUBSCRIBE: {}", show(&sub));

    let refused = |got: &[u8]| got.starts_with(b"-ERR") && text(got).contains("c:sub");
    let mut failures = Vec::new();
    let got = t.cmd(&["GET", "c:sub"]).await;
    if got[..] != bulk(&doc)[..] && !refused(&got) {
        failures.push(format!("GET on the stream: {}", show(&got)));
    }
    let got = t.cmd(&["STRLEN", "c:sub"]).await;
    let want = format!(":{}\r\n", doc.len());
    if got[..] != *want.as_bytes() && !refused(&got) {
        failures.push(format!(
            "STRLEN on the stream: {} (want {want:?})",
            show(&got)
        ));
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 4. Emulated read-modify-writes give up under contention
// ---------------------------------------------------------------------------

/// `INCR` on a key of a compressing rule is emulated as an optimistic
/// `WATCH`/`GET`/`MULTI`/`INCR`/`EXEC`, even when the value is a plain
/// number that can never be compressed, and gives up after 16 aborted
/// attempts with "too much contention". Redis never fails an `INCR` for
/// contention: a counter that many clients bump (a page-view counter under
/// a rule that compresses the page documents) loses increments.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_incr_on_a_compressing_rule_never_fails() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    const CLIENTS: usize = 48;
    const EACH: usize = 40;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let mut t = tierd.raw().await;
        tasks.push(tokio::spawn(async move {
            let mut errors = Vec::new();
            for _ in 0..EACH {
                let got = t.cmd(&["INCR", "c:counter"]).await;
                if !got.starts_with(b":") {
                    errors.push(text(&got));
                }
            }
            errors
        }));
    }
    let mut errors = Vec::new();
    for task in tasks {
        errors.extend(task.await.unwrap());
    }
    let mut d = direct(&redis).await;
    let total = d.cmd(&["GET", "c:counter"]).await;
    let want = (CLIENTS * EACH).to_string();
    assert!(
        errors.is_empty() && bulk_of(&total).as_deref() == Some(want.as_bytes()),
        "{} of {} INCRs failed (first: {:?}); the counter is {} (want {want})",
        errors.len(),
        CLIENTS * EACH,
        errors.first(),
        show(&total)
    );
}

// ---------------------------------------------------------------------------
// 5. Emulated key moves skip the destination's tags
// ---------------------------------------------------------------------------

/// `RENAME`/`COPY` from a compressing key to a tagged rule's key run as a
/// script that does not register the destination's rule tags, which a
/// plain `RENAME` through tierd does. `CACHE.INVALIDATE TAG` then misses
/// the key: it stays in Redis and in every L1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_moved_out_of_a_compressing_rule_get_the_destination_rule_tags() {
    let redis = RedisServer::start();
    let mut config = config(&redis);
    let mut tagged = rule("t", "t:*", HOUR);
    tagged.tags = vec![tierd::cache::template::TagTemplate::new("grp", &tagged.pattern).unwrap()];
    config.rules.insert(0, tagged);
    let tierd = start_with(config).await;
    let mut t = tierd.raw().await;
    let doc = json_doc(4096, 6);

    for key in ["c:a", "c:b", "p:a"] {
        let ok = call(&mut t, &[b"SET", key.as_bytes(), &doc]).await;
        assert_eq!(&ok[..], b"+OK\r\n");
    }
    for args in [
        ["RENAME", "c:a", "t:renamed"],
        ["COPY", "c:b", "t:copied"],
        // The reference: a move that is not emulated.
        ["RENAME", "p:a", "t:plain"],
    ] {
        let reply = t.cmd(&args).await;
        assert!(!reply.starts_with(b"-"), "{args:?}: {}", show(&reply));
    }
    // Cached in L1 too.
    for key in ["t:renamed", "t:copied", "t:plain"] {
        let got = t.cmd(&["GET", key]).await;
        assert_eq!(bulk_of(&got).as_deref(), Some(&doc[..]), "GET {key}");
    }
    let dropped = t.cmd(&["CACHE.INVALIDATE", "TAG", "grp"]).await;
    let mut d = direct(&redis).await;
    let mut failures = Vec::new();
    for key in ["t:renamed", "t:copied", "t:plain"] {
        let exists = d.cmd(&["EXISTS", key]).await;
        if &exists[..] != b":0\r\n" {
            failures.push(format!("{key} survived CACHE.INVALIDATE TAG grp in Redis"));
        }
        let got = t.cmd(&["GET", key]).await;
        if bulk_of(&got).is_some() {
            failures.push(format!("{key} is still served through tierd"));
        }
    }
    assert!(
        failures.is_empty(),
        "CACHE.INVALIDATE TAG grp dropped {}: {failures:#?}",
        show(&dropped)
    );
}

// ---------------------------------------------------------------------------
// 6. Emulation fetches whole plain values
// ---------------------------------------------------------------------------

/// Every emulated command starts with a `GET` of the whole value, even when
/// the value is plain and the command reads one bit. A compressing rule
/// over a large bitmap (or any value above `max_value_size`, which is
/// never compressed) turns each `GETBIT`/`SETBIT` into a transfer of the
/// whole value from Redis to tierd, buffered in tierd's memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn getbit_on_a_large_plain_value_does_not_fetch_the_whole_value() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    // An 8 MiB bitmap, plain in Redis (above max_value_size: never
    // compressed).
    call(&mut d, &[b"SETBIT", b"c:bitmap", b"67108863", b"1"]).await;
    let before: u64 = info_field(&mut d, "stats", "total_net_output_bytes")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let got = call(&mut t, &[b"GETBIT", b"c:bitmap", b"67108863"]).await;
    assert_eq!(&got[..], b":1\r\n");
    let got = call(&mut t, &[b"SETBIT", b"c:bitmap", b"7", b"1"]).await;
    assert_eq!(&got[..], b":0\r\n");
    let after: u64 = info_field(&mut d, "stats", "total_net_output_bytes")
        .await
        .unwrap()
        .parse()
        .unwrap();
    let sent = after - before;
    assert!(
        sent < 1 << 20,
        "Redis sent {sent} bytes to answer one GETBIT and one SETBIT on a plain 8 MiB value"
    );
}

/// A move into a compressing key that does not happen (`COPY` without
/// `REPLACE` onto an existing key, `RENAMENX`) leaves the destination as it
/// was: the escape applies only to a value the command wrote. (Found while
/// documenting: the escape wrapped the existing compressed value.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_move_that_does_not_happen_leaves_the_compressed_destination_alone() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let doc = json_doc(4_000, 3);
    let odd = [&MAGIC[..], b"looks like a frame"].concat();
    call(&mut t, &[b"SET", b"c:dst", &doc]).await;
    call(&mut t, &[b"SET", b"p:src", &odd]).await;
    assert_eq!(
        show(&call(&mut t, &[b"COPY", b"p:src", b"c:dst"]).await),
        show(b":0\r\n")
    );
    assert_eq!(
        show(&call(&mut t, &[b"RENAMENX", b"p:src", b"c:dst"]).await),
        show(b":0\r\n")
    );
    let got = call(&mut t, &[b"GET", b"c:dst"]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&doc[..]), "{}", show(&got));
    // The move that happens escapes the value that looks like a frame.
    call(&mut t, &[b"COPY", b"p:src", b"c:dst", b"REPLACE"]).await;
    let got = call(&mut t, &[b"GET", b"c:dst"]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&odd[..]), "{}", show(&got));
}

/// Under a compressing rule with tags, writes on plain values still take
/// the one-step script (no contention errors) and still escape a result
/// that would look like a frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_under_a_tagged_compressing_rule_escape_and_never_contend() {
    let redis = RedisServer::start();
    let mut tagged = compress_rule("t", "t:*", true);
    tagged.tags = vec![tierd::cache::template::TagTemplate::new("grp", &tagged.pattern).unwrap()];
    let mut cfg = config(&redis);
    cfg.rules.push(tagged);
    let tierd = start_with(cfg).await;
    let mut t = tierd.raw().await;
    let frame_like = frame_of(&json_doc(2_000, 5));
    call(&mut t, &[b"APPEND", b"t:a", &frame_like]).await;
    let got = call(&mut t, &[b"GET", b"t:a"]).await;
    assert_eq!(
        bulk_of(&got).as_deref(),
        Some(&frame_like[..]),
        "{}",
        show(&got)
    );
    let tags = call(&mut t, &[b"CACHE.TAGS", b"t:a"]).await;
    assert!(show(&tags).contains("grp"), "{}", show(&tags));

    let addr = tierd.addr;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut failed = Vec::new();
            for _ in 0..20 {
                let r = c.cmd(&["INCR", "t:counter"]).await;
                if !r.starts_with(b":") {
                    failed.push(text(&r));
                }
            }
            failed
        }));
    }
    let mut failed = Vec::new();
    for c in clients {
        failed.extend(c.await.unwrap());
    }
    assert!(failed.is_empty(), "{failed:?}");
    let got = call(&mut t, &[b"GET", b"t:counter"]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&b"320"[..]));
}
