//! Transparent lz4 compression seen from a client, differentially against a
//! real redis-server.
//!
//! tierd runs with four rules: `c:*` compresses values of at least 64 bytes
//! in Redis and in L1 (`upstream = true`), `l:*` compresses them in L1 only
//! (`upstream = false`), `p:*` compresses nothing, and `warmup:*` exists so
//! that a test can wait until tierd caches. Every command a test sends
//! through tierd is also sent straight to Redis on a *twin* key of the same
//! length (`c:` → `r:`, `l:` → `m:`, `p:` → `q:`), where the values are
//! stored plain. Because the twin names are as long as the originals, the
//! two reply streams must be byte-identical, whatever the command.
//!
//! What Redis really holds is checked with a decoder written here from the
//! documented format (docs/configuration.md, "Compression"), not with
//! tierd's own.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::compression::{
    bulk_of, compress_rule, frame_of, frame_with, HEADER_LEN, MAGIC, THRESHOLD,
};
use support::exchange::text;
use support::l1::{
    decode, direct, l1_config, rule, upstream_calls, wait_until_caching, L1Probe, Outcome, Resp,
    HOUR,
};
use support::probe::Deadline;
use support::{Raw, RedisServer, Tierd};
use tierd::config::TrackingMode;

/// The default `l1.max_value_size`.
const MIB: usize = 1 << 20;
/// The prefix of tierd's corrupt-value error reply.
const CORRUPT: &[u8] = b"-ERR tierd: compressed value is corrupt";

// ---------------------------------------------------------------------------
// Setup
// ---------------------------------------------------------------------------

/// tierd on `redis` with the rules above, once it caches.
async fn start(redis: &RedisServer, tracking: TrackingMode) -> Tierd {
    let rules = vec![
        rule("warmup", "warmup:*", HOUR),
        compress_rule("c", "c:*", true),
        compress_rule("l", "l:*", false),
        rule("p", "p:*", HOUR),
    ];
    let tierd = Tierd::start_with(l1_config(&redis.url(), tracking, rules)).await;
    wait_until_caching(&tierd, "warmup", "warmup:0").await;
    tierd
}

// ---------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------

/// Deterministic pseudo-random bytes (xorshift64*): incompressible.
fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            state ^= state >> 12;
            state ^= state << 25;
            state ^= state >> 27;
            (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// A JSON array of user records with repeated field names, at least `len`
/// bytes long (and no more than one record longer).
fn json_doc(len: usize, seed: u64) -> Vec<u8> {
    let mut out = String::from("[");
    let mut i = seed * 1000;
    while out.len() < len {
        out.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user {i}\",\"email\":\"user{i}@example.com\",\
             \"roles\":[\"teacher\",\"viewer\"],\"active\":{},\"score\":{}}},",
            i % 3 == 0,
            i * 7919 % 1000
        ));
        i += 1;
    }
    out.push(']');
    out.into_bytes()
}

/// `n` bytes of compressible text.
fn repetitive(n: usize) -> Vec<u8> {
    let mut v = b"{\"k\":\"".to_vec();
    v.resize(n - 2, b'a');
    v.extend_from_slice(b"\"}");
    v
}

/// What a stored value holds per the documented format: `Some(plain)` when
/// it is a frame (which must then decode), `None` when it is plain.
fn unframe(stored: &[u8]) -> Option<Vec<u8>> {
    if stored.len() < HEADER_LEN || stored[..4] != MAGIC || stored[4] > 1 {
        return None;
    }
    let len = u32::from_le_bytes(stored[5..9].try_into().unwrap()) as usize;
    if stored[4] == 0 {
        // Codec 0: an escaped value, stored as it is behind the header.
        assert_eq!(
            stored.len() - HEADER_LEN,
            len,
            "raw frame of the wrong length"
        );
        return Some(stored[HEADER_LEN..].to_vec());
    }
    let plain = lz4_flex::block::decompress(&stored[HEADER_LEN..], len)
        .unwrap_or_else(|e| panic!("Redis holds a frame that does not decode: {e}"));
    assert_eq!(plain.len(), len, "frame shorter than its header says");
    Some(plain)
}

/// The value as a client wrote it, from what Redis holds.
fn logical(stored: &[u8]) -> Vec<u8> {
    unframe(stored).unwrap_or_else(|| stored.to_vec())
}

// ---------------------------------------------------------------------------
// The differential runner
// ---------------------------------------------------------------------------

type Cmd = Vec<Vec<u8>>;

/// A command from mixed `&str`, `Vec<u8>` and `&[u8]` arguments.
macro_rules! cmd {
    ($($arg:expr),* $(,)?) => { vec![$(AsRef::<[u8]>::as_ref(&$arg).to_vec()),*] as Cmd };
}

/// The reference twin of a tierd key (same length); any other argument
/// unchanged. Keys in these tests are short and made of `[a-z0-9:_-]`;
/// values never are.
fn twin(arg: &[u8]) -> Vec<u8> {
    let key_like = arg.len() >= 3
        && arg.len() <= 24
        && arg[1] == b':'
        && arg[2..]
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || b"_-:".contains(b));
    let mut out = arg.to_vec();
    if key_like {
        match arg[0] {
            b'c' => out[0] = b'r',
            b'l' => out[0] = b'm',
            b'p' => out[0] = b'q',
            _ => {}
        }
    }
    out
}

fn twin_cmd(cmd: &[Vec<u8>]) -> Cmd {
    cmd.iter().map(|a| twin(a)).collect()
}

/// A RESP multibulk, encoded here.
fn resp(args: &[Vec<u8>]) -> Vec<u8> {
    support::wire::resp(args)
}

/// Bytes for an assertion message: text, cut to 240 characters.
fn show(b: &[u8]) -> String {
    let t = text(b);
    if t.chars().count() > 240 {
        let cut: String = t.chars().take(240).collect();
        format!("{cut:?}… ({} bytes)", b.len())
    } else {
        format!("{t:?}")
    }
}

fn show_cmd(cmd: &[Vec<u8>]) -> String {
    cmd.iter()
        .map(|a| {
            if a.len() > 24 {
                format!("<{} bytes>", a.len())
            } else {
                text(a)
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A client of tierd and a client of Redis that send the same commands, the
/// second on the twin keys.
struct Diff {
    tierd: Raw,
    reference: Raw,
}

impl Diff {
    async fn new(redis: &RedisServer, tierd: &Tierd) -> Diff {
        Diff {
            tierd: tierd.raw().await,
            reference: direct(redis).await,
        }
    }

    /// Both connections in RESP3.
    async fn hello3(&mut self) {
        let t = self.tierd.cmd(&["HELLO", "3"]).await;
        let r = self.reference.cmd(&["HELLO", "3"]).await;
        assert_eq!((t[0], r[0]), (b'%', b'%'), "HELLO 3: {}", show(&t));
    }

    /// Sends `cmds` in one write to tierd and their twins in one write to
    /// Redis; returns (tierd's reply, Redis's reply) per command.
    async fn run(&mut self, cmds: &[Cmd]) -> Vec<(Bytes, Bytes)> {
        let mut to_tierd = Vec::new();
        let mut to_redis = Vec::new();
        for c in cmds {
            to_tierd.extend(resp(c));
            to_redis.extend(resp(&twin_cmd(c)));
        }
        self.tierd.send(&to_tierd).await;
        self.reference.send(&to_redis).await;
        let mut out = Vec::new();
        for _ in cmds {
            let t = self.tierd.frame().await;
            let r = self.reference.frame().await;
            out.push((t, r));
        }
        out
    }

    /// [`Diff::run`], and every reply must be byte-identical.
    async fn same(&mut self, what: &str, cmds: &[Cmd]) -> Vec<Bytes> {
        let replies = self.run(cmds).await;
        let failures: Vec<String> = cmds
            .iter()
            .zip(&replies)
            .filter(|(_, (t, r))| t != r)
            .map(|(c, (t, r))| {
                format!(
                    "{}\n    tierd: {}\n    redis: {}",
                    show_cmd(c),
                    show(t),
                    show(r)
                )
            })
            .collect();
        assert!(
            failures.is_empty(),
            "{what}: {} of {} replies differ:\n{}",
            failures.len(),
            cmds.len(),
            failures.join("\n")
        );
        replies.into_iter().map(|(t, _)| t).collect()
    }
}

fn int_of(frame: &[u8]) -> i64 {
    decode(frame)
        .as_int()
        .unwrap_or_else(|| panic!("expected an integer, got {}", show(frame)))
}

/// `GET key` straight from Redis: what it really holds.
async fn stored(direct: &mut Raw, key: &str) -> Option<Vec<u8>> {
    let reply = direct.cmd(&["GET", key]).await;
    bulk_of(&reply)
}

/// Runs one command (binary arguments) and returns its reply.
async fn call(raw: &mut Raw, args: &[Vec<u8>]) -> Bytes {
    raw.send(&resp(args)).await;
    raw.frame().await
}

// ---------------------------------------------------------------------------
// 1. Every write form, then every read form
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_and_read_form_matches_redis_pipelined_in_resp2_and_resp3() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;

    let small = json_doc(100, 1);
    let mid = json_doc(4096, 2);
    let big = json_doc(64 * 1024, 3);
    let random = random_bytes(4096, 4);
    let magic_json = [&MAGIC[..], &json_doc(300, 5)].concat();
    let magic_short = [&MAGIC[..], b"x"].concat();
    let framed = frame_of(&json_doc(2000, 6));
    let at = repetitive(THRESHOLD);
    let below = repetitive(THRESHOLD - 1);
    assert!(frame_of(&at).len() * 10 <= at.len() * 9, "premise: {at:?}");

    for proto in [2, 3] {
        let mut diff = Diff::new(&redis, &tierd).await;
        if proto == 3 {
            diff.hello3().await;
        }
        let c = |n: &str| format!("c:{proto}{n}");
        let p = |n: &str| format!("p:{proto}{n}");
        let l = |n: &str| format!("l:{proto}{n}");

        let writes: Vec<Cmd> = vec![
            cmd!("SET", c("a"), mid),
            cmd!("SET", c("a"), big, "GET"),
            cmd!("SET", c("b"), small, "EX", "100"),
            cmd!("SET", c("b"), mid, "PX", "100000", "GET"),
            cmd!("SET", c("c"), big, "NX"),
            cmd!("SET", c("c"), small, "NX"),
            cmd!("SET", c("c"), mid, "XX", "GET"),
            cmd!("SET", c("c"), big, "XX", "KEEPTTL"),
            cmd!("SET", c("nx"), big, "XX"),
            cmd!("SET", c("n"), big, "NX", "GET"),
            cmd!("SET", c("n"), random, "KEEPTTL", "GET"),
            cmd!("SETEX", c("d"), "100", big),
            cmd!("PSETEX", c("e"), "100000", random),
            cmd!("SETNX", c("f"), magic_json),
            cmd!("SETNX", c("f"), big),
            cmd!("GETSET", c("f"), mid),
            cmd!("GETSET", c("g"), big),
            cmd!("GETSET", c("g"), magic_short),
            cmd!(
                "MSET",
                c("h"),
                big,
                p("h"),
                big,
                c("i"),
                "",
                c("j"),
                at,
                c("k"),
                below,
                l("h"),
                big,
                c("m"),
                framed,
                l("m"),
                magic_json
            ),
            cmd!("MSETNX", c("o"), mid, c("p"), MAGIC),
            cmd!("MSETNX", c("o"), small, c("q"), small),
        ];
        let mut reads: Vec<Cmd> = Vec::new();
        for k in [
            "a", "b", "c", "nx", "n", "d", "e", "f", "g", "h", "i", "j", "k", "m", "o", "p", "q",
        ] {
            reads.push(cmd!("GET", c(k)));
        }
        reads.extend([
            cmd!("GET", p("h")),
            cmd!("GET", l("h")),
            cmd!("GET", l("m")),
            cmd!(
                "MGET",
                c("a"),
                p("h"),
                c("none"),
                c("i"),
                c("j"),
                c("k"),
                l("h"),
                c("m"),
                c("o"),
                c("p"),
                l("m"),
                c("e")
            ),
            cmd!("MGET", c("none"), p("none")),
        ]);
        // Written and read in one pipeline, then read again (L1 hits now).
        let all: Vec<Cmd> = writes.iter().chain(&reads).cloned().collect();
        diff.same(&format!("RESP{proto} writes then reads"), &all)
            .await;
        diff.same(&format!("RESP{proto} reads again"), &reads).await;

        // The reads that change the key.
        let changing: Vec<Cmd> = vec![
            cmd!("GETEX", c("a"), "EX", "1000"),
            cmd!("GETEX", c("b"), "PERSIST"),
            cmd!("GETEX", c("h")),
            cmd!("GETEX", c("none"), "PX", "5000"),
            cmd!("GETDEL", c("c")),
            cmd!("GETDEL", c("c")),
            cmd!("GETDEL", c("none")),
            cmd!("GETDEL", c("m")),
            cmd!("GET", c("a")),
            cmd!("GET", c("b")),
            cmd!("GET", c("c")),
            cmd!("GET", c("m")),
            cmd!("TTL", c("b")),
            cmd!("EXISTS", c("c"), c("m")),
        ];
        diff.same(&format!("RESP{proto} GETEX/GETDEL"), &changing)
            .await;

        // TTLs agree within a second (the two sides ran a moment apart).
        let ttls: Vec<Cmd> = ["a", "c", "d", "e", "f", "n"]
            .iter()
            .map(|k| cmd!("TTL", c(k)))
            .collect();
        for (cmd, (t, r)) in ttls.iter().zip(diff.run(&ttls).await) {
            let (t, r) = (int_of(&t), int_of(&r));
            assert!(
                (t - r).abs() <= 1,
                "{}: tierd {t}, redis {r}",
                show_cmd(cmd)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 2. What Redis stores
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stores_large_compressible_values_of_upstream_rules_compressed() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    let doc = json_doc(8192, 7);
    let other = json_doc(3000, 8);
    let writes: Vec<Cmd> = vec![
        cmd!("SET", "c:set", doc),
        cmd!("SET", "c:setex", doc, "EX", "100"),
        cmd!("SET", "c:setget", doc, "GET"),
        cmd!("SETEX", "c:setex2", "100", doc),
        cmd!("PSETEX", "c:psetex", "100000", doc),
        cmd!("SETNX", "c:setnx", doc),
        cmd!("GETSET", "c:getset", doc),
        cmd!("MSET", "c:mset1", doc, "p:mset", doc, "c:mset2", doc),
        cmd!("MSETNX", "c:msetnx1", doc, "c:msetnx2", doc),
    ];
    for w in &writes {
        let reply = call(&mut t, w).await;
        assert!(
            !reply.starts_with(b"-"),
            "{}: {}",
            show_cmd(w),
            show(&reply)
        );
    }
    let mut failures = Vec::new();
    for key in [
        "c:set",
        "c:setex",
        "c:setget",
        "c:setex2",
        "c:psetex",
        "c:setnx",
        "c:getset",
        "c:mset1",
        "c:mset2",
        "c:msetnx1",
        "c:msetnx2",
    ] {
        let strlen = int_of(&d.cmd(&["STRLEN", key]).await) as usize;
        let held = stored(&mut d, key).await.unwrap();
        if strlen * 2 >= doc.len() || !held.starts_with(&MAGIC) || held[4] != 1 {
            failures.push(format!(
                "{key}: Redis holds {strlen} bytes starting {}",
                show(&held[..held.len().min(12)])
            ));
        } else if unframe(&held).as_deref() != Some(&doc[..]) {
            failures.push(format!("{key}: the frame does not decode to the value"));
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");

    // Kept plain: other rules, incompressible data, small values, values
    // above max_value_size.
    let random = random_bytes(8192, 9);
    let at = repetitive(THRESHOLD);
    let below = repetitive(THRESHOLD - 1);
    let huge = json_doc(2 * MIB, 10);
    let plain_cases: Vec<(&str, &[u8])> = vec![
        ("l:doc", &doc),
        ("p:doc", &doc),
        ("c:random", &random),
        ("c:below", &below),
        ("c:empty", b""),
        ("c:huge", &huge),
        ("l:magic", &MAGIC),
    ];
    for (key, value) in &plain_cases {
        let reply = call(&mut t, &cmd!("SET", key, value)).await;
        assert_eq!(&reply[..], b"+OK\r\n");
        let held = stored(&mut d, key).await.unwrap();
        assert!(
            held == *value,
            "{key}: Redis should hold the {} plain bytes, holds {}",
            value.len(),
            show(&held)
        );
    }
    // At the threshold, compressed; a value starting with the magic is
    // always framed (here one shorter than the threshold, and one that is
    // itself a valid frame), so that it can never be misread.
    let framed = frame_of(&other);
    let magic_short = [&MAGIC[..], b"x"].concat();
    for (key, value) in [
        ("c:at", &at),
        ("c:framed", &framed),
        ("c:magic", &magic_short),
    ] {
        call(&mut t, &cmd!("SET", key, value)).await;
        let held = stored(&mut d, key).await.unwrap();
        assert_eq!(
            unframe(&held).as_ref(),
            Some(value),
            "{key}: Redis should hold a frame of the value, holds {}",
            show(&held)
        );
    }
    // And every one reads back exactly through tierd.
    for (key, value) in plain_cases.iter().copied().chain([
        ("c:at", &at[..]),
        ("c:framed", &framed[..]),
        ("c:magic", &magic_short[..]),
    ]) {
        let got = bulk_of(&t.cmd(&["GET", key]).await).unwrap();
        assert!(got == value, "GET {key} through tierd: {}", show(&got));
    }
}

// ---------------------------------------------------------------------------
// 3. L1
// ---------------------------------------------------------------------------

/// Reads `key` twice through `probe`: a miss, then an L1 hit that Redis
/// never saw, both equal to `want`.
async fn miss_then_hit(probe: &mut L1Probe, key: &str, want: &Bytes) -> Vec<String> {
    let mut failures = Vec::new();
    let (first, outcome) = probe.read(&["GET", key]).await;
    if outcome != Outcome::Miss {
        failures.push(format!(
            "GET {key} (first): expected a miss, got {outcome:?}"
        ));
    }
    if first != want {
        failures.push(format!("GET {key} (first): {}", show(&first)));
    }
    let before = upstream_calls(&mut probe.direct, "get").await;
    let (second, outcome) = probe.read(&["GET", key]).await;
    let after = upstream_calls(&mut probe.direct, "get").await;
    if outcome != Outcome::Hit {
        failures.push(format!(
            "GET {key} (second): expected a hit, got {outcome:?}"
        ));
    }
    if after != before {
        failures.push(format!("GET {key} (second): Redis ran GET"));
    }
    if second != want {
        failures.push(format!("GET {key} (second): {}", show(&second)));
    }
    failures
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l1_keeps_large_values_compressed_and_hits_are_byte_exact() {
    for tracking in [TrackingMode::Default, TrackingMode::Off] {
        let redis = RedisServer::start();
        let tierd = start(&redis, tracking).await;
        let mut t = tierd.raw().await;
        let mut d = direct(&redis).await;
        let doc = json_doc(64 * 1024, 11);
        let small = json_doc(200, 12);
        let magic_json = [&MAGIC[..], &json_doc(500, 13)].concat();
        let framed = frame_of(&json_doc(3000, 31));
        let setup: Vec<Cmd> = vec![
            cmd!("SET", "c:doc", doc),
            cmd!("SET", "l:doc", doc),
            cmd!("SET", "p:doc", doc),
            cmd!("SET", "c:small", small),
            cmd!("SET", "c:magic", magic_json),
            cmd!("SET", "l:magic", magic_json),
            cmd!("SET", "l:framed", framed),
        ];
        for c in &setup {
            assert_eq!(&call(&mut t, c).await[..], b"+OK\r\n");
            call(&mut d, &twin_cmd(c)).await;
        }

        for proto in [2, 3] {
            let mut failures = Vec::new();
            let mut bytes_per_rule = Vec::new();
            for (rule, key, value) in [
                ("c", "c:doc", &doc),
                ("l", "l:doc", &doc),
                ("p", "p:doc", &doc),
                ("c", "c:small", &small),
                ("c", "c:magic", &magic_json),
                ("l", "l:magic", &magic_json),
                ("l", "l:framed", &framed),
            ] {
                let mut probe = L1Probe::new(&redis, &tierd, rule).await;
                if proto == 3 {
                    probe.resp3().await;
                }
                let want = probe
                    .reference(&["GET", &text(&twin(key.as_bytes()))])
                    .await;
                assert_eq!(bulk_of(&want).as_ref(), Some(value), "reference {key}");
                let before = probe.stats().await.bytes;
                failures.extend(miss_then_hit(&mut probe, key, &want).await);
                let after = probe.stats().await.bytes;
                bytes_per_rule.push((key, after - before));
            }
            assert!(
                failures.is_empty(),
                "{tracking:?} RESP{proto}: {failures:#?}"
            );
            // A 64 KB JSON document costs L1 a fraction of its size where a
            // rule compresses, and at least its size where none does.
            for (key, bytes) in &bytes_per_rule[..3] {
                let ok = if key.starts_with('p') {
                    *bytes >= doc.len() as u64
                } else {
                    *bytes < doc.len() as u64 / 4
                };
                assert!(
                    ok,
                    "{tracking:?} RESP{proto}: {key} ({} bytes plain) costs L1 {bytes} bytes",
                    doc.len()
                );
            }

            // MGET, every key cached: Redis sees no MGET.
            let mut diff = Diff::new(&redis, &tierd).await;
            if proto == 3 {
                diff.hello3().await;
            }
            let mget = cmd!(
                "MGET", "c:doc", "l:doc", "p:doc", "c:small", "c:magic", "l:magic", "l:framed"
            );
            let before = upstream_calls(&mut d, "mget").await;
            let reply = call(&mut diff.tierd, &mget).await;
            let after = upstream_calls(&mut d, "mget").await;
            let want = call(&mut diff.reference, &twin_cmd(&mget)).await;
            assert!(reply == want, "MGET all hits: {}", show(&reply));
            assert_eq!(
                after, before,
                "{tracking:?} RESP{proto}: MGET of hits reached Redis"
            );

            // Partial hit: one uncached compressed key, one missing key.
            let fresh = format!("c:fresh{proto}");
            call(&mut t, &cmd!("SET", fresh, json_doc(5000, 14))).await;
            call(
                &mut d,
                &cmd!("SET", twin(fresh.as_bytes()), json_doc(5000, 14)),
            )
            .await;
            let partial = cmd!("MGET", "c:doc", fresh, "c:none", "l:doc", "c:magic");
            let before = upstream_calls(&mut d, "mget").await;
            let reply = call(&mut diff.tierd, &partial).await;
            let after = upstream_calls(&mut d, "mget").await;
            let want = call(&mut diff.reference, &twin_cmd(&partial)).await;
            assert!(reply == want, "MGET partial hit: {}", show(&reply));
            assert_eq!(after, before + 1, "MGET partial hit: one upstream MGET");
            // Now the fresh key is cached too.
            let again = cmd!("MGET", fresh, "c:doc", "l:magic");
            let before = upstream_calls(&mut d, "mget").await;
            let reply = call(&mut diff.tierd, &again).await;
            let after = upstream_calls(&mut d, "mget").await;
            let want = call(&mut diff.reference, &twin_cmd(&again)).await;
            assert!(reply == want, "MGET after fill: {}", show(&reply));
            assert_eq!(after, before, "MGET after fill reached Redis");
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Transactions
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transactions_decode_values_in_exec_and_refuse_emulated_commands() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let big = json_doc(20_000, 15);
    let mid = json_doc(2000, 16);
    let small = json_doc(100, 17);
    let magic_json = [&MAGIC[..], &json_doc(200, 18)].concat();

    for proto in [2, 3] {
        let mut diff = Diff::new(&redis, &tierd).await;
        if proto == 3 {
            diff.hello3().await;
        }
        let c = |n: &str| format!("c:{proto}{n}");
        let p = |n: &str| format!("p:{proto}{n}");
        diff.same(
            "setup",
            &[
                cmd!("SET", c("old"), mid),
                cmd!("SET", p("plain"), big),
                cmd!("SET", c("gone"), big),
            ],
        )
        .await;
        // Cached before the transaction, so that EXEC's writes must
        // invalidate what L1 holds.
        diff.same("warm", &[cmd!("GET", c("old")), cmd!("GET", c("gone"))])
            .await;
        let tx: Vec<Cmd> = vec![
            cmd!("MULTI"),
            cmd!("SET", c("t1"), big),
            cmd!("GET", c("t1")),
            cmd!("MGET", c("t1"), p("plain"), c("none"), c("old")),
            cmd!("SET", c("old"), small, "GET"),
            cmd!("GETSET", c("t1"), magic_json),
            cmd!("SETEX", c("t2"), "100", big),
            cmd!("MSET", c("t3"), mid, p("t3"), mid),
            cmd!("GETDEL", c("gone")),
            cmd!("GETEX", c("t2"), "PERSIST"),
            cmd!("PING"),
            cmd!("EXEC"),
        ];
        let replies = diff.same(&format!("RESP{proto} MULTI … EXEC"), &tx).await;
        assert!(
            replies[tx.len() - 1].len() > 2 * big.len(),
            "EXEC must carry the plain values: {}",
            show(&replies[tx.len() - 1])
        );
        // Afterwards, reads agree, from L1 or not.
        let after: Vec<Cmd> = vec![
            cmd!("GET", c("t1")),
            cmd!("GET", c("old")),
            cmd!("GET", c("gone")),
            cmd!("MGET", c("t1"), c("t2"), c("t3"), p("t3")),
            cmd!("GET", c("t1")),
            cmd!("GET", c("old")),
        ];
        diff.same("after EXEC", &after).await;

        // An emulated command is refused while queueing, and EXEC then
        // aborts as Redis's does after a queue-time error. The reference's
        // queue-time error is a wrong arity.
        let mut t = tierd.raw().await;
        let mut d = direct(&redis).await;
        if proto == 3 {
            t.cmd(&["HELLO", "3"]).await;
            d.cmd(&["HELLO", "3"]).await;
        }
        assert_eq!(&t.cmd(&["MULTI"]).await[..], b"+OK\r\n");
        assert_eq!(&t.cmd(&["SET", &c("t4"), "x"]).await[..], b"+QUEUED\r\n");
        let refused = t.cmd(&["STRLEN", &c("t1")]).await;
        assert!(
            refused.starts_with(b"-ERR")
                && text(&refused).contains(&c("t1"))
                && text(&refused).contains("MULTI"),
            "STRLEN on a compressed key inside MULTI: {}",
            show(&refused)
        );
        assert_eq!(&t.cmd(&["GET", &c("t1")]).await[..], b"+QUEUED\r\n");
        let exec = t.cmd(&["EXEC"]).await;
        d.cmd(&["MULTI"]).await;
        d.cmd(&["SET", "r:t4", "x"]).await;
        let arity = d.cmd(&["STRLEN"]).await;
        assert!(arity.starts_with(b"-ERR"), "{}", show(&arity));
        let want = d.cmd(&["EXEC"]).await;
        assert!(want.starts_with(b"-EXECABORT"), "{}", show(&want));
        assert_eq!(text(&exec), text(&want), "EXEC after a refused command");
        // Nothing ran, and both connections work on.
        assert_eq!(
            bulk_of(&t.cmd(&["GET", &c("t4")]).await),
            None,
            "the aborted transaction's SET ran"
        );
        let got = t.cmd(&["GET", &c("t1")]).await;
        assert_eq!(bulk_of(&got).as_ref(), Some(&magic_json));
    }
}

// ---------------------------------------------------------------------------
// 5. Emulated commands
// ---------------------------------------------------------------------------

/// PTTL of `key` through tierd and of its twin on Redis: both positive and
/// within 2 s of each other.
async fn same_pttl(diff: &mut Diff, keys: &[&str]) {
    let cmds: Vec<Cmd> = keys.iter().map(|k| cmd!("PTTL", k)).collect();
    for (k, (t, r)) in keys.iter().zip(diff.run(&cmds).await) {
        let (t, r) = (int_of(&t), int_of(&r));
        assert!(
            (t - r).abs() < 2000 && (t > 0) == (r > 0) && (t == -1) == (r == -1),
            "PTTL {k}: tierd {t}, redis {r}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_reads_on_compressed_keys_match_redis() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut d = direct(&redis).await;
    let doc = json_doc(1500, 19);
    let doc2 = json_doc(1200, 20);
    let magic_json = [&MAGIC[..], &json_doc(300, 21)].concat();

    for proto in [2, 3] {
        let mut diff = Diff::new(&redis, &tierd).await;
        if proto == 3 {
            diff.hello3().await;
        }
        let c = |n: &str| format!("c:{proto}{n}");
        let p = |n: &str| format!("p:{proto}{n}");
        diff.same(
            "setup",
            &[
                cmd!("SET", c("e"), doc, "EX", "1000"),
                cmd!("SET", c("e2"), doc2),
                cmd!("SET", c("mg"), magic_json),
                cmd!("SET", c("small"), "hello world"),
                cmd!("SET", p("e3"), doc2),
                cmd!("RPUSH", c("list"), "a", "b"),
            ],
        )
        .await;
        for k in ["e", "e2", "mg"] {
            let held = stored(&mut d, &c(k)).await.unwrap();
            assert!(held.starts_with(&MAGIC), "premise: {} is compressed", c(k));
        }
        let (e, e2, mg) = (c("e"), c("e2"), c("mg"));
        let mut reads: Vec<Cmd> = Vec::new();
        for k in [&e, &mg, &c("small"), &c("none"), &c("list")] {
            reads.extend([
                cmd!("STRLEN", k),
                cmd!("GETRANGE", k, "0", "99"),
                cmd!("GETRANGE", k, "-50", "-1"),
                cmd!("GETRANGE", k, "5000", "6000"),
                cmd!("SUBSTR", k, "10", "20"),
                cmd!("GETBIT", k, "100"),
                cmd!("GETBIT", k, "999999"),
                cmd!("BITCOUNT", k),
                cmd!("BITCOUNT", k, "0", "10"),
                cmd!("BITCOUNT", k, "5", "100", "BIT"),
                cmd!("BITPOS", k, "1"),
                cmd!("BITPOS", k, "0", "5", "-1"),
                cmd!("BITPOS", k, "1", "2", "40", "BIT"),
                cmd!(
                    "BITFIELD_RO",
                    k,
                    "GET",
                    "u8",
                    "0",
                    "GET",
                    "i16",
                    "100",
                    "GET",
                    "u4",
                    "7"
                ),
                cmd!("DUMP", k),
            ]);
        }
        reads.extend([
            cmd!("LCS", e, e2),
            cmd!("LCS", e, e2, "LEN"),
            cmd!("LCS", e, e2, "IDX", "MINMATCHLEN", "8", "WITHMATCHLEN"),
            cmd!("LCS", e, p("e3"), "LEN"),
            cmd!("LCS", p("e3"), e, "IDX"),
            cmd!("LCS", e, c("none")),
            cmd!("LCS", e, c("list")),
            cmd!("GETBIT", e, "-1"),
            cmd!("GETRANGE", e, "x", "1"),
            cmd!("STRLEN", e, "extra"),
            cmd!("GET", e),
        ]);
        diff.same(&format!("RESP{proto} emulated reads"), &reads)
            .await;
        // Again, with the values now in L1.
        diff.same(&format!("RESP{proto} emulated reads again"), &reads)
            .await;
        same_pttl(&mut diff, &[e.as_str()]).await;
        // Nothing was written: Redis still holds the same frames.
        for k in [&e, &e2, &mg] {
            let held = stored(&mut d, k).await.unwrap();
            let want = stored(&mut d, &text(&twin(k.as_bytes()))).await.unwrap();
            assert!(
                logical(&held) == want && held.starts_with(&MAGIC),
                "{k} changed"
            );
        }
        // DUMP gives the plain value's serialization, which RESTOREs plain
        // on any key.
        let dump = bulk_of(&diff.tierd.cmd(&["DUMP", &e]).await).unwrap();
        diff.same(
            "RESTORE of a DUMP",
            &[
                cmd!("RESTORE", c("restored"), "0", dump),
                cmd!("RESTORE", p("restored"), "0", dump),
                cmd!("GET", c("restored")),
                cmd!("GET", p("restored")),
            ],
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulated_writes_on_compressed_keys_match_redis_and_keep_the_ttl() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut d = direct(&redis).await;
    let doc = json_doc(3000, 22);
    // Numbers long enough to be compressed: 60 zeros compress well.
    let float = [&vec![b'0'; 60][..], b"1.25"].concat();
    let zeros = vec![b'0'; THRESHOLD];
    assert_eq!(float.len(), THRESHOLD);

    for proto in [2, 3] {
        let mut diff = Diff::new(&redis, &tierd).await;
        if proto == 3 {
            diff.hello3().await;
        }
        let c = |n: &str| format!("c:{proto}{n}");
        diff.same(
            "setup",
            &[
                cmd!("SET", c("e"), doc, "EX", "1000"),
                cmd!("SET", c("f"), float, "PX", "1000000"),
                cmd!("SET", c("z"), zeros),
                cmd!("SET", c("j"), doc),
                cmd!("SET", c("k"), "41"),
                cmd!("RPUSH", c("list"), "a"),
                // Cache them, so that the emulated writes must invalidate.
                cmd!("GET", c("e")),
                cmd!("GET", c("f")),
                cmd!("GET", c("z")),
            ],
        )
        .await;
        for k in ["e", "f", "z", "j"] {
            let held = stored(&mut d, &c(k)).await.unwrap();
            assert!(held.starts_with(&MAGIC), "premise: {} is compressed", c(k));
        }
        let e = c("e");
        let steps: Vec<Vec<Cmd>> = vec![
            vec![cmd!("SETRANGE", e, "10", "XYZ"), cmd!("GET", e)],
            vec![cmd!("SETRANGE", e, "5000", "far"), cmd!("STRLEN", e)],
            vec![cmd!("SETRANGE", e, "0", ""), cmd!("GET", e)],
            vec![cmd!("SETRANGE", e, "-1", "x"), cmd!("GET", e)],
            vec![cmd!("APPEND", e, ",\"tail\":1"), cmd!("GET", e)],
            vec![cmd!("SETBIT", e, "7", "1"), cmd!("SETBIT", e, "7", "1")],
            vec![cmd!("SETBIT", e, "100000", "1"), cmd!("GET", e)],
            vec![
                cmd!(
                    "BITFIELD", e, "GET", "u8", "0", "SET", "u8", "8", "255", "INCRBY", "i5",
                    "100", "1", "OVERFLOW", "SAT", "INCRBY", "u8", "16", "300"
                ),
                cmd!("GET", e),
            ],
            vec![cmd!("BITFIELD", e, "GET", "u8", "0"), cmd!("GET", e)],
            vec![cmd!("INCR", e), cmd!("INCRBYFLOAT", e, "1")],
            vec![cmd!("INCRBYFLOAT", c("f"), "1"), cmd!("GET", c("f"))],
            vec![cmd!("INCRBYFLOAT", c("f"), "-0.25"), cmd!("GET", c("f"))],
            vec![
                cmd!("INCR", c("z")),
                cmd!("DECR", c("z")),
                cmd!("INCRBY", c("z"), "5"),
                cmd!("DECRBY", c("z"), "5"),
                cmd!("INCRBYFLOAT", c("z"), "1.5"),
                cmd!("GET", c("z")),
            ],
            vec![
                cmd!("INCR", c("j")),
                cmd!("INCRBYFLOAT", c("j"), "1"),
                cmd!("APPEND", c("j"), "!"),
                cmd!("GET", c("j")),
            ],
            vec![
                cmd!("INCR", c("k")),
                cmd!("DECR", c("k")),
                cmd!("INCRBY", c("k"), "10"),
                cmd!("DECRBY", c("k"), "3"),
                cmd!("INCRBYFLOAT", c("k"), "0.5"),
                cmd!("GET", c("k")),
            ],
            vec![
                cmd!("APPEND", c("new1"), "x"),
                cmd!("SETRANGE", c("new2"), "5", "ab"),
                cmd!("SETBIT", c("new3"), "9", "1"),
                cmd!("INCR", c("new4")),
                cmd!("INCRBYFLOAT", c("new5"), "2.5"),
                cmd!("BITFIELD", c("new6"), "SET", "u8", "0", "65"),
                cmd!(
                    "MGET",
                    c("new1"),
                    c("new2"),
                    c("new3"),
                    c("new4"),
                    c("new5"),
                    c("new6")
                ),
            ],
            vec![
                cmd!("APPEND", c("list"), "x"),
                cmd!("SETRANGE", c("list"), "0", "x"),
                cmd!("INCR", c("list")),
                cmd!("SETBIT", c("list"), "1", "1"),
            ],
        ];
        for (i, step) in steps.iter().enumerate() {
            diff.same(&format!("RESP{proto} step {i}"), step).await;
        }
        // The whole sequence pipelined once more, on fresh copies.
        diff.same(
            "copies",
            &[
                cmd!("SET", c("e"), doc, "EX", "1000"),
                cmd!("APPEND", c("e"), "a"),
                cmd!("SETRANGE", c("e"), "1", "bc"),
                cmd!("SETBIT", c("e"), "3", "0"),
                cmd!("INCR", c("e")),
                cmd!("GET", c("e")),
                cmd!("STRLEN", c("e")),
            ],
        )
        .await;
        same_pttl(&mut diff, &[e.as_str(), &c("f"), &c("z")]).await;
        // What Redis holds decodes to the reference's plain value.
        for k in ["e", "f", "z", "j", "k", "new1", "new2", "new6"] {
            let held = stored(&mut d, &c(k)).await;
            let want = stored(&mut d, &text(&twin(c(k).as_bytes()))).await;
            assert_eq!(
                held.as_deref().map(logical),
                want,
                "{} in Redis after the emulated writes",
                c(k)
            );
        }
    }
}

// ---------------------------------------------------------------------------
// 6. Safety
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_that_merely_look_compressed_or_are_corrupt_never_crash_tierd() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut d = direct(&redis).await;
    let mut t = tierd.raw().await;

    // Start with the magic but do not parse: returned as they are.
    let not_frames: Vec<(&str, Vec<u8>)> = vec![
        ("c:g1", [&MAGIC[..], b"garbage, not a codec"].concat()),
        ("c:g2", [&MAGIC[..], b"\x01\x00"].concat()),
        ("c:g3", MAGIC.to_vec()),
        (
            "c:g4",
            [&MAGIC[..], b"\x02", &random_bytes(500, 23)].concat(),
        ),
        (
            "c:g5",
            [&b"\xf5TZ\x02\x01"[..], &[0; 4], &random_bytes(100, 24)].concat(),
        ),
    ];
    for (key, value) in &not_frames {
        call(&mut d, &cmd!("SET", key, value)).await;
    }
    for round in ["upstream", "L1"] {
        for (key, value) in &not_frames {
            let got = t.cmd(&["GET", key]).await;
            assert!(
                bulk_of(&got).as_ref() == Some(value),
                "GET {key} ({round}): {}",
                show(&got)
            );
        }
        let keys: Vec<&str> = not_frames.iter().map(|(k, _)| *k).collect();
        let got = t.cmd(&[&["MGET"][..], &keys].concat()).await;
        let want = d.cmd(&[&["MGET"][..], &keys].concat()).await;
        assert!(got == want, "MGET ({round}): {}", show(&got));
    }
    let strlen = t.cmd(&["STRLEN", "c:g1"]).await;
    assert_eq!(int_of(&strlen), not_frames[0].1.len() as i64);

    // Frames that parse but cannot be the value: an error reply, every
    // time, from Redis or from L1.
    let doc = json_doc(5000, 25);
    let good = frame_of(&doc);
    let corrupt: Vec<(&str, Vec<u8>)> = vec![
        (
            "c:huge",
            frame_with(2 * MIB as u32, &random_bytes(1000, 26)),
        ),
        ("c:max", frame_with(u32::MAX, b"\x00\x00")),
        (
            "c:longer",
            frame_with(doc.len() as u32 + 1, &good[HEADER_LEN..]),
        ),
        (
            "c:shorter",
            frame_with(doc.len() as u32 - 1, &good[HEADER_LEN..]),
        ),
        ("c:truncated", good[..good.len() / 2].to_vec()),
        ("c:noise", frame_with(4000, &random_bytes(800, 27))),
        ("c:empty", frame_with(100, b"")),
    ];
    for (key, value) in &corrupt {
        call(&mut d, &cmd!("SET", key, value)).await;
    }
    let mut failures = Vec::new();
    let mut other = tierd.raw().await;
    call(&mut d, &cmd!("SET", "c:ok", doc)).await;
    for round in ["first", "second"] {
        for (key, _) in &corrupt {
            for read in [
                vec!["GET", key],
                vec!["GETEX", key],
                vec!["STRLEN", key],
                vec!["GETRANGE", key, "0", "3"],
            ] {
                let got = t.cmd(&read).await;
                if !got.starts_with(CORRUPT) {
                    failures.push(format!("{read:?} ({round}): {}", show(&got)));
                }
            }
            let got = t.cmd(&["MGET", "c:ok", key]).await;
            let ok = match decode(&got).elements() {
                Some([Resp::Bulk(Some(v)), Resp::Error(e)]) => {
                    *v == doc && e.starts_with(&text(&CORRUPT[1..]))
                }
                _ => false,
            };
            if !ok {
                failures.push(format!("MGET c:ok {key} ({round}): {}", show(&got)));
            }
        }
        // Other clients, and this one, are served on.
        let got = other.cmd(&["GET", "c:ok"]).await;
        assert_eq!(bulk_of(&got).as_ref(), Some(&doc), "another client");
        assert_eq!(&t.cmd(&["PING"]).await[..], b"+PONG\r\n");
    }
    assert!(tierd.is_running(), "tierd stopped");
    // Writes over a corrupt value just replace it.
    let got = call(&mut t, &cmd!("SET", "c:huge", doc, "GET")).await;
    if !got.starts_with(CORRUPT) {
        failures.push(format!("SET c:huge … GET: {}", show(&got)));
    }
    assert_eq!(
        bulk_of(&t.cmd(&["GET", "c:huge"]).await).as_ref(),
        Some(&doc)
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 7. Coherence and key moves
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_clients_and_key_moves_stay_coherent() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut d = direct(&redis).await;
    let mut diff = Diff::new(&redis, &tierd).await;
    let doc = json_doc(10_000, 28);
    let doc2 = json_doc(10_000, 29);

    // Written through tierd, read directly: the documented compressed form.
    diff.same("write", &[cmd!("SET", "c:w", doc)]).await;
    let held = stored(&mut d, "c:w").await.unwrap();
    assert!(held.len() < doc.len() / 2 && unframe(&held) == Some(doc.clone()));

    // Written directly, plain, on a compressing key: read back plain, and
    // once cached, a direct overwrite reaches tierd's readers (tracking).
    call(&mut d, &cmd!("SET", "c:direct", doc)).await;
    call(&mut d, &cmd!("SET", "r:direct", doc)).await;
    diff.same(
        "direct plain",
        &[cmd!("GET", "c:direct"), cmd!("GET", "c:direct")],
    )
    .await;
    call(&mut d, &cmd!("SET", "c:direct", doc2)).await;
    let deadline = Deadline::new(Duration::from_secs(5), "the direct overwrite of c:direct");
    while bulk_of(&diff.tierd.cmd(&["GET", "c:direct"]).await) != Some(doc2.clone()) {
        deadline.tick().await;
    }

    // DEL, RENAME, COPY between compressing keys.
    diff.same(
        "moves within c:",
        &[
            cmd!("SET", "c:m1", doc),
            cmd!("SET", "c:m2", doc2),
            cmd!("GET", "c:m1"),
            cmd!("GET", "c:m2"),
            cmd!("RENAME", "c:m1", "c:m3"),
            cmd!("GET", "c:m1"),
            cmd!("GET", "c:m3"),
            cmd!("COPY", "c:m3", "c:m4"),
            cmd!("COPY", "c:m2", "c:m3", "REPLACE"),
            cmd!("GET", "c:m3"),
            cmd!("GET", "c:m4"),
            cmd!("RENAMENX", "c:m4", "c:m2"),
            cmd!("DEL", "c:m2"),
            cmd!("GET", "c:m2"),
            cmd!("MGET", "c:m1", "c:m2", "c:m3", "c:m4"),
            cmd!("STRLEN", "c:m4"),
        ],
    )
    .await;
    // A plain key moved onto a compressing one.
    diff.same(
        "p: to c:",
        &[
            cmd!("SET", "p:x1", doc),
            cmd!("RENAME", "p:x1", "c:x1"),
            cmd!("GET", "c:x1"),
            cmd!("STRLEN", "c:x1"),
        ],
    )
    .await;
}

/// A compressed value renamed or copied to a key whose rule does not
/// compress it in Redis (`p:`, or `l:` with `upstream = false`): its reader
/// must still get the value the client wrote, not tierd's frame.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_values_moved_to_other_rules_read_back_plain() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut diff = Diff::new(&redis, &tierd).await;
    let doc = json_doc(10_000, 30);
    let mut failures = Vec::new();
    for (from, to, mv) in [
        ("c:a1", "p:a1", "RENAME"),
        ("c:a2", "p:a2", "COPY"),
        ("c:a3", "l:a3", "RENAME"),
        ("c:a4", "l:a4", "COPY"),
    ] {
        let replies = diff
            .run(&[
                cmd!("SET", from, doc),
                cmd!(mv, from, to),
                cmd!("GET", to),
                cmd!("STRLEN", to),
            ])
            .await;
        for (what, (t, r)) in ["GET", "STRLEN"].iter().zip(&replies[2..]) {
            if t != r {
                failures.push(format!(
                    "{mv} {from} {to}; {what} {to}: tierd {}, redis {}",
                    show(t),
                    show(r)
                ));
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
}

// ---------------------------------------------------------------------------
// 10. CACHE.SET and RESP3 subscribers
// ---------------------------------------------------------------------------

/// `CACHE.SET` stores a value as a `SET` through tierd would: compressed
/// for a compressing rule, and read back exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_set_stores_values_compressed_like_set() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut t = tierd.raw().await;
    let mut direct = direct(&redis).await;
    let doc = json_doc(8_000, 41);
    let reply = call(
        &mut t,
        &[
            b"CACHE.SET".to_vec(),
            b"c:set".to_vec(),
            doc.clone(),
            b"TAGS".to_vec(),
            b"docs".to_vec(),
        ],
    )
    .await;
    assert_eq!(&reply[..], b"+OK\r\n");
    let held = stored(&mut direct, "c:set").await.unwrap();
    assert!(
        held.starts_with(&MAGIC) && held.len() < doc.len() / 2,
        "{}",
        held.len()
    );
    let got = call(&mut t, &[b"GET".to_vec(), b"c:set".to_vec()]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&doc[..]));
    // A value that starts with the magic is framed too, so it reads back.
    let odd = [&MAGIC[..], b"not a frame"].concat();
    call(
        &mut t,
        &[b"CACHE.SET".to_vec(), b"c:odd".to_vec(), odd.clone()],
    )
    .await;
    let got = call(&mut t, &[b"GET".to_vec(), b"c:odd".to_vec()]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&odd[..]));
}

/// A RESP3 subscriber may send any command, but its replies come back as
/// they are: a command on a value compressed in Redis is refused with an
/// error naming the key, and one on other keys still runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscriber_is_refused_commands_on_compressed_values() {
    let redis = RedisServer::start();
    let tierd = start(&redis, TrackingMode::Default).await;
    let mut t = tierd.raw().await;
    let value = json_doc(4_000, 7);
    call(&mut t, &[b"SET".to_vec(), b"c:s".to_vec(), value.clone()]).await;
    let mut sub = tierd.raw().await;
    assert!(sub.cmd(&["HELLO", "3"]).await.starts_with(b"%"));
    assert!(sub.cmd(&["SUBSCRIBE", "ch"]).await.starts_with(b">3\r\n"));
    let refused = sub.cmd(&["GET", "c:s"]).await;
    assert!(
        refused.starts_with(b"-ERR tierd: GET on 'c:s' on a subscribed connection"),
        "{}",
        show(&refused)
    );
    let appended = sub.cmd(&["APPEND", "c:s", "x"]).await;
    assert!(
        appended.starts_with(b"-ERR tierd: APPEND"),
        "{}",
        show(&appended)
    );
    assert_eq!(&sub.cmd(&["SET", "p:s", "v"]).await[..], b"+OK\r\n");
    // The compressed value is untouched.
    let got = call(&mut t, &[b"GET".to_vec(), b"c:s".to_vec()]).await;
    assert_eq!(bulk_of(&got).as_deref(), Some(&value[..]));
}
