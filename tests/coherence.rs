//! L1 coherence against a real redis-server: whoever writes, a reader
//! through tierd stops seeing the old value. Writes through tierd invalidate
//! on their own (tested with tracking off, so nothing else can help);
//! writes straight to Redis, expiry, eviction and FLUSHALL reach L1 through
//! CLIENT TRACKING within 50 ms, in default and in BCAST mode; losing the
//! tracking link flushes L1; a write through one tierd reaches another; and
//! a long mixed run records every read and write and checks that no read
//! returned a value older than one acknowledged more than 50 ms before it
//! started.
//!
//! The write-command table is checked against the server's own `COMMAND`:
//! a write command with keys that has neither a case nor an entry in the
//! commented skip list fails the suite, so a new command cannot escape.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::exchange::{assert_frame, encode, text};
use support::l1::{
    clients_named, decode, direct, l1_config, must, poll_until, rule, wait_until_caching, L1Probe,
    Outcome, Resp, HOUR,
};
use support::probe::{bulk, bulk_text};
use support::{staleness, Raw, RedisServer, Tierd};
use tierd::config::TrackingMode;

/// How soon a write that bypassed tierd must be visible through it.
const DELIVERY: Duration = Duration::from_millis(50);
/// tierd's tracking connection, as `CLIENT LIST` names it.
const TRACKING_NAME: &str = "tierd:tracking";

// ---------------------------------------------------------------------------
// The write-command table
// ---------------------------------------------------------------------------

/// One concrete invocation of a write command.
///
/// Commands are written as words separated by spaces (a `'quoted string'`
/// is one word). `{a}`, `{b}` and `{c}` become keys private to the case,
/// all under `w:` (the rule's prefix); `{dump:b}` becomes the `DUMP` of
/// `{b}` taken just before the write; `{sha}` the SHA1 of [`SET_SCRIPT`].
struct Case {
    /// The name `COMMAND` uses (`set`, `xgroup|create`).
    cmd: &'static str,
    /// Run directly on Redis first; none may fail.
    setup: &'static [&'static str],
    /// The write.
    write: &'static str,
    /// Cacheable reads whose replies the write changes, cached before it.
    probes: &'static [&'static str],
}

const fn case(
    cmd: &'static str,
    setup: &'static [&'static str],
    write: &'static str,
    probes: &'static [&'static str],
) -> Case {
    Case {
        cmd,
        setup,
        write,
        probes,
    }
}

/// A script that writes its declared key, for EVAL and EVALSHA.
const SET_SCRIPT: &str = "return redis.call('set', KEYS[1], ARGV[1])";
/// A function library with a write, for FCALL.
const LIBRARY: &str = "#!lua name=tierdtest\n\
    redis.register_function('tierd_set', function(keys, args) \
    return redis.call('set', keys[1], args[1]) end)";

/// Commands whose writes change only a key's TTL: no cacheable read shows
/// the change, so the test checks only that tierd dropped the entries.
const TTL_ONLY: &[&str] = &["expire", "pexpire", "persist", "getex"];

/// Write commands (from `COMMAND`) that these tests do not run.
const SKIPPED: &[&str] = &[
    // Moves keys to another server: needs a second redis-server as target,
    // and afterwards the key is simply gone here, as after DEL (covered).
    "migrate",
    // RESTORE for cluster slot migration; refused outside the ASKING flow
    // of a cluster. RESTORE itself is covered.
    "restore-asking",
];

/// Write commands that `COMMAND` does not flag `write` (their writes are
/// in the script) but whose declared keys tierd must invalidate.
const SCRIPT_COMMANDS: &[&str] = &["eval", "evalsha", "fcall"];

const STR: &[&str] = &["GET {a}", "STRLEN {a}"];
const LIST_AB: &[&str] = &["LRANGE {a} 0 -1", "LRANGE {b} 0 -1"];
// Two-key pops where the first key is missing: a missing list is probed
// with LINDEX, whose nil reply L1 can cache (an empty array from LRANGE of
// a missing key is not cached).
const B_AFTER_MISSING_A: &[&str] = &["LINDEX {a} 0", "LRANGE {b} 0 -1"];
const A_AFTER_MISSING_B: &[&str] = &["LRANGE {a} 0 -1", "LINDEX {b} 0"];
const ZSET: &[&str] = &["ZRANGE {a} 0 -1 WITHSCORES", "ZCARD {a}"];
const STREAM: &[&str] = &["XRANGE {a} - +", "XLEN {a}", "XINFO STREAM {a}"];
const GROUPS: &[&str] = &["XINFO GROUPS {a}", "XLEN {a}"];
/// A stream with two entries, a group `g` and one entry pending for `c1`.
const WITH_GROUP: &[&str] = &[
    "XADD {a} 1-1 f v",
    "XADD {a} 2-1 f w",
    "XGROUP CREATE {a} g 0",
    "XREADGROUP GROUP g c1 COUNT 1 STREAMS {a} >",
];
const GEO: &[&str] = &[
    "GEOADD {a} 13.361389 38.115556 Palermo 15.087269 37.502669 Catania",
    "ZADD {b} 1 old",
];

const CASES: &[Case] = &[
    // Strings.
    case("set", &["SET {a} old"], "SET {a} new", STR),
    case("setnx", &[], "SETNX {a} new", &["GET {a}"]),
    case("setex", &["SET {a} old"], "SETEX {a} 1000 new", STR),
    case("psetex", &["SET {a} old"], "PSETEX {a} 1000000 new", STR),
    case("setrange", &["SET {a} old"], "SETRANGE {a} 1 XY", STR),
    case("append", &["SET {a} old"], "APPEND {a} er", STR),
    case("getset", &["SET {a} old"], "GETSET {a} new", STR),
    case("getdel", &["SET {a} old"], "GETDEL {a}", STR),
    case("getex", &["SET {a} old"], "GETEX {a} PX 100000", STR),
    case("incr", &["SET {a} 10"], "INCR {a}", STR),
    case("incrby", &["SET {a} 10"], "INCRBY {a} 5", STR),
    case("incrbyfloat", &["SET {a} 10"], "INCRBYFLOAT {a} 1.5", STR),
    case("decr", &["SET {a} 10"], "DECR {a}", STR),
    case("decrby", &["SET {a} 10"], "DECRBY {a} 5", STR),
    case("setbit", &["SET {a} old"], "SETBIT {a} 0 1", STR),
    case("bitfield", &["SET {a} old"], "BITFIELD {a} SET u8 0 255", STR),
    case(
        "bitop",
        &["SET {a} abc", "SET {b} xyz", "SET {c} old"],
        "BITOP AND {c} {a} {b}",
        &["GET {c}", "GET {a}"],
    ),
    case(
        "mset",
        &["SET {a} old", "SET {b} old"],
        "MSET {a} 1 {b} 2",
        &["GET {a}", "GET {b}"],
    ),
    case("msetnx", &[], "MSETNX {a} 1 {b} 2", &["GET {a}", "GET {b}"]),
    // Keyspace.
    case(
        "del",
        &["SET {a} old", "HSET {b} f v"],
        "DEL {a} {b}",
        &["GET {a}", "HGETALL {b}"],
    ),
    case(
        "unlink",
        &["RPUSH {a} x", "SADD {b} m"],
        "UNLINK {a} {b}",
        &["LRANGE {a} 0 -1", "SMEMBERS {b}"],
    ),
    case(
        "rename",
        &["SET {a} src", "SET {b} old"],
        "RENAME {a} {b}",
        &["GET {a}", "GET {b}"],
    ),
    case(
        "renamenx",
        &["HSET {a} f v"],
        "RENAMENX {a} {b}",
        &["HGETALL {a}", "HGET {b} f"],
    ),
    case(
        "copy",
        &["SET {a} src", "SET {b} old"],
        "COPY {a} {b} REPLACE",
        &["GET {b}", "GET {a}"],
    ),
    case("move", &["SET {a} old"], "MOVE {a} 1", STR),
    case("expire", &["SET {a} old"], "EXPIRE {a} 100", STR),
    case("pexpire", &["SET {a} old"], "PEXPIRE {a} 100000", STR),
    // A time in the past deletes the key.
    case("expireat", &["SET {a} old"], "EXPIREAT {a} 1", STR),
    case("pexpireat", &["SET {a} old"], "PEXPIREAT {a} 1", STR),
    case("persist", &["SET {a} old EX 1000"], "PERSIST {a}", STR),
    case(
        "restore",
        &["SET {a} old", "SET {b} restored"],
        "RESTORE {a} 0 {dump:b} REPLACE",
        STR,
    ),
    // Hashes.
    case("hset", &["HSET {a} f1 v1 f2 v2"], "HSET {a} f1 new", &["HGETALL {a}", "HGET {a} f1"]),
    case(
        "hmset",
        &["HSET {a} f1 v1 f2 v2"],
        "HMSET {a} f1 new f3 v3",
        &["HGETALL {a}", "HLEN {a}"],
    ),
    case("hsetnx", &["HSET {a} f1 v1"], "HSETNX {a} f3 v3", &["HGETALL {a}", "HGET {a} f3"]),
    case("hdel", &["HSET {a} f1 v1 f2 v2"], "HDEL {a} f1", &["HGETALL {a}", "HGET {a} f1"]),
    case("hincrby", &["HSET {a} n 1"], "HINCRBY {a} n 5", &["HGETALL {a}", "HGET {a} n"]),
    case(
        "hincrbyfloat",
        &["HSET {a} n 1"],
        "HINCRBYFLOAT {a} n 1.5",
        &["HGETALL {a}", "HMGET {a} n x"],
    ),
    // Lists.
    case("lpush", &["RPUSH {a} x y"], "LPUSH {a} new", &["LRANGE {a} 0 -1", "LLEN {a}"]),
    case("rpush", &["RPUSH {a} x y"], "RPUSH {a} new", &["LRANGE {a} 0 -1", "LLEN {a}"]),
    case("lpushx", &["RPUSH {a} x y"], "LPUSHX {a} new", &["LRANGE {a} 0 -1"]),
    case("rpushx", &["RPUSH {a} x y"], "RPUSHX {a} new", &["LRANGE {a} 0 -1"]),
    case("lpop", &["RPUSH {a} x y"], "LPOP {a}", &["LRANGE {a} 0 -1", "LLEN {a}"]),
    case("rpop", &["RPUSH {a} x y"], "RPOP {a}", &["LRANGE {a} 0 -1", "LLEN {a}"]),
    case("lset", &["RPUSH {a} x y"], "LSET {a} 0 new", &["LRANGE {a} 0 -1"]),
    case("lrem", &["RPUSH {a} x y x"], "LREM {a} 0 x", &["LRANGE {a} 0 -1"]),
    case("ltrim", &["RPUSH {a} x y z"], "LTRIM {a} 1 -1", &["LRANGE {a} 0 -1"]),
    case(
        "linsert",
        &["RPUSH {a} x y z"],
        "LINSERT {a} BEFORE y new",
        &["LRANGE {a} 0 -1", "LLEN {a}"],
    ),
    case("lmove", &["RPUSH {a} x y", "RPUSH {b} p"], "LMOVE {a} {b} LEFT RIGHT", LIST_AB),
    case("rpoplpush", &["RPUSH {a} x y", "RPUSH {b} p"], "RPOPLPUSH {a} {b}", LIST_AB),
    case("lmpop", &["RPUSH {b} x y z"], "LMPOP 2 {a} {b} LEFT COUNT 2", B_AFTER_MISSING_A),
    case("blpop", &["RPUSH {a} x y"], "BLPOP {b} {a} 0", A_AFTER_MISSING_B),
    case("brpop", &["RPUSH {a} x y"], "BRPOP {b} {a} 0", A_AFTER_MISSING_B),
    case(
        "blmove",
        &["RPUSH {a} x y", "RPUSH {b} p"],
        "BLMOVE {a} {b} LEFT RIGHT 0",
        LIST_AB,
    ),
    case("brpoplpush", &["RPUSH {a} x y", "RPUSH {b} p"], "BRPOPLPUSH {a} {b} 0", LIST_AB),
    case("blmpop", &["RPUSH {b} x y"], "BLMPOP 0 2 {a} {b} RIGHT", B_AFTER_MISSING_A),
    case(
        "sort",
        &["RPUSH {a} 3 1 2", "RPUSH {b} old"],
        "SORT {a} STORE {b}",
        &["LRANGE {b} 0 -1"],
    ),
    // Sets.
    case(
        "sadd",
        &["SADD {a} m1"],
        "SADD {a} m2",
        &["SMEMBERS {a}", "SCARD {a}", "SISMEMBER {a} m2"],
    ),
    case("srem", &["SADD {a} m1 m2"], "SREM {a} m1", &["SMEMBERS {a}", "SCARD {a}"]),
    case("spop", &["SADD {a} m1 m2"], "SPOP {a}", &["SMEMBERS {a}", "SCARD {a}"]),
    case(
        "smove",
        &["SADD {a} m1 m2", "SADD {b} m3"],
        "SMOVE {a} {b} m1",
        &["SMEMBERS {a}", "SMEMBERS {b}", "SISMEMBER {b} m1"],
    ),
    case(
        "sunionstore",
        &["SADD {a} 1 2", "SADD {b} 3", "SADD {c} old"],
        "SUNIONSTORE {c} {a} {b}",
        &["SMEMBERS {c}"],
    ),
    case(
        "sinterstore",
        &["SADD {a} 1 2", "SADD {b} 2 3", "SADD {c} old"],
        "SINTERSTORE {c} {a} {b}",
        &["SMEMBERS {c}"],
    ),
    case(
        "sdiffstore",
        &["SADD {a} 1 2", "SADD {b} 2 3", "SADD {c} old"],
        "SDIFFSTORE {c} {a} {b}",
        &["SMEMBERS {c}"],
    ),
    // Sorted sets.
    case("zadd", &["ZADD {a} 1 m1"], "ZADD {a} 2 m2", ZSET),
    case("zincrby", &["ZADD {a} 1 m1"], "ZINCRBY {a} 5 m1", &["ZSCORE {a} m1", "ZRANGE {a} 0 -1 WITHSCORES"]),
    case("zrem", &["ZADD {a} 1 m1 2 m2"], "ZREM {a} m1", ZSET),
    case("zpopmin", &["ZADD {a} 1 m1 2 m2"], "ZPOPMIN {a}", ZSET),
    case("zpopmax", &["ZADD {a} 1 m1 2 m2"], "ZPOPMAX {a}", ZSET),
    case("bzpopmin", &["ZADD {a} 1 m1 2 m2"], "BZPOPMIN {a} 0", ZSET),
    case("bzpopmax", &["ZADD {a} 1 m1 2 m2"], "BZPOPMAX {a} 0", ZSET),
    case("zmpop", &["ZADD {a} 1 m1 2 m2"], "ZMPOP 1 {a} MAX", ZSET),
    case("bzmpop", &["ZADD {a} 1 m1 2 m2"], "BZMPOP 0 1 {a} MIN", ZSET),
    case("zremrangebyrank", &["ZADD {a} 1 m1 2 m2"], "ZREMRANGEBYRANK {a} 0 0", ZSET),
    case("zremrangebyscore", &["ZADD {a} 1 m1 2 m2"], "ZREMRANGEBYSCORE {a} 2 2", ZSET),
    case("zremrangebylex", &["ZADD {a} 0 a 0 b 0 c"], "ZREMRANGEBYLEX {a} [a [b", ZSET),
    case(
        "zrangestore",
        &["ZADD {a} 1 m1 2 m2", "ZADD {c} 1 old"],
        "ZRANGESTORE {c} {a} 0 0",
        &["ZRANGE {c} 0 -1 WITHSCORES"],
    ),
    case(
        "zunionstore",
        &["ZADD {a} 1 m1", "ZADD {b} 2 m2", "ZADD {c} 1 old"],
        "ZUNIONSTORE {c} 2 {a} {b}",
        &["ZRANGE {c} 0 -1 WITHSCORES"],
    ),
    case(
        "zinterstore",
        &["ZADD {a} 1 m1 2 m2", "ZADD {b} 2 m2", "ZADD {c} 1 old"],
        "ZINTERSTORE {c} 2 {a} {b}",
        &["ZRANGE {c} 0 -1 WITHSCORES"],
    ),
    case(
        "zdiffstore",
        &["ZADD {a} 1 m1 2 m2", "ZADD {b} 2 m2", "ZADD {c} 1 old"],
        "ZDIFFSTORE {c} 2 {a} {b}",
        &["ZRANGE {c} 0 -1 WITHSCORES"],
    ),
    // Geo (sorted sets underneath).
    case(
        "geoadd",
        &["GEOADD {a} 13.361389 38.115556 Palermo"],
        "GEOADD {a} 15.087269 37.502669 Catania",
        ZSET,
    ),
    case(
        "georadius",
        GEO,
        "GEORADIUS {a} 15 37 200 km STORE {b}",
        &["ZRANGE {b} 0 -1 WITHSCORES"],
    ),
    case(
        "georadiusbymember",
        GEO,
        "GEORADIUSBYMEMBER {a} Palermo 200 km STOREDIST {b}",
        &["ZRANGE {b} 0 -1 WITHSCORES"],
    ),
    case(
        "geosearchstore",
        GEO,
        "GEOSEARCHSTORE {b} {a} FROMLONLAT 15 37 BYRADIUS 200 km",
        &["ZRANGE {b} 0 -1 WITHSCORES"],
    ),
    // HyperLogLog, read as the string underneath: PFCOUNT may rewrite the
    // cached cardinality, so its key spec is read-write and it is no
    // cacheable read.
    case("pfadd", &["PFADD {a} x"], "PFADD {a} y z", &["GET {a}"]),
    case(
        "pfmerge",
        &["PFADD {a} x", "PFADD {b} y z", "PFADD {c} q"],
        "PFMERGE {c} {a} {b}",
        &["GET {c}"],
    ),
    // Rewrites the sparse encoding as dense: the bytes GET sees change.
    case("pfdebug", &["PFADD {a} x y z"], "PFDEBUG TODENSE {a}", &["GET {a}"]),
    // Streams.
    case("xadd", &["XADD {a} 1-1 f v"], "XADD {a} 2-1 f w", STREAM),
    case("xdel", &["XADD {a} 1-1 f v", "XADD {a} 2-1 f w"], "XDEL {a} 1-1", STREAM),
    case("xtrim", &["XADD {a} 1-1 f v", "XADD {a} 2-1 f w"], "XTRIM {a} MAXLEN 1", STREAM),
    case("xsetid", &["XADD {a} 1-1 f v"], "XSETID {a} 99-0", STREAM),
    case("xgroup|create", &["XADD {a} 1-1 f v"], "XGROUP CREATE {a} g2 $", GROUPS),
    case("xgroup|createconsumer", WITH_GROUP, "XGROUP CREATECONSUMER {a} g c9", GROUPS),
    case("xgroup|delconsumer", WITH_GROUP, "XGROUP DELCONSUMER {a} g c1", GROUPS),
    case("xgroup|destroy", WITH_GROUP, "XGROUP DESTROY {a} g", GROUPS),
    case("xgroup|setid", WITH_GROUP, "XGROUP SETID {a} g 0", GROUPS),
    case("xreadgroup", WITH_GROUP, "XREADGROUP GROUP g c1 COUNT 1 STREAMS {a} >", GROUPS),
    case("xack", WITH_GROUP, "XACK {a} g 1-1", GROUPS),
    case("xclaim", WITH_GROUP, "XCLAIM {a} g c2 0 1-1", GROUPS),
    case("xautoclaim", WITH_GROUP, "XAUTOCLAIM {a} g c2 0 0-0", GROUPS),
    // Scripts and functions: the keys they declare.
    case("eval", &["SET {a} old"], "EVAL 'return redis.call(\"set\", KEYS[1], ARGV[1])' 1 {a} new", STR),
    case(
        "eval",
        &["SET {a} old", "SET {b} old"],
        "EVAL 'redis.call(\"set\", KEYS[1], ARGV[1]); return redis.call(\"del\", KEYS[2])' 2 {a} {b} new",
        &["GET {a}", "GET {b}"],
    ),
    case("evalsha", &["SET {a} old"], "EVALSHA {sha} 1 {a} new", STR),
    case("fcall", &["SET {a} old"], "FCALL tierd_set 1 {a} new", STR),
];

/// Splits a command into words; `'…'` is one word.
fn words(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s.trim_start();
    while !rest.is_empty() {
        if let Some(quoted) = rest.strip_prefix('\'') {
            let end = quoted.find('\'').expect("unterminated quote");
            out.push(quoted[..end].to_owned());
            rest = quoted[end + 1..].trim_start();
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            out.push(rest[..end].to_owned());
            rest = rest[end..].trim_start();
        }
    }
    out
}

/// The keys of case number `i`.
fn keys(i: usize) -> HashMap<&'static str, String> {
    ["a", "b", "c"]
        .into_iter()
        .map(|k| (k, format!("w:{i}:{k}")))
        .collect()
}

/// Expands one template command into arguments. Whole-word `{dump:x}` and
/// `{sha}` come from `extra`.
fn expand(
    template: &str,
    keys: &HashMap<&'static str, String>,
    extra: &HashMap<String, Vec<u8>>,
) -> Vec<Vec<u8>> {
    words(template)
        .into_iter()
        .map(|w| {
            if let Some(bytes) = extra.get(&w) {
                return bytes.clone();
            }
            let mut w = w;
            for (k, key) in keys {
                w = w.replace(&format!("{{{k}}}"), key);
            }
            w.into_bytes()
        })
        .collect()
}

async fn run(raw: &mut Raw, args: &[Vec<u8>]) -> Bytes {
    let args: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
    raw.send_cmd(&args).await;
    raw.frame().await
}

fn show_args(args: &[Vec<u8>]) -> String {
    args.iter()
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Loads the script and the function library the script cases call.
async fn load_scripts(d: &mut Raw) -> Vec<u8> {
    let reply = must(d, &["FUNCTION", "LOAD", "REPLACE", LIBRARY]).await;
    assert_frame(&reply, &bulk("tierdtest"));
    let sha = must(d, &["SCRIPT", "LOAD", SET_SCRIPT]).await;
    bulk_text(&sha).into_bytes()
}

/// Where each case's write goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Via {
    /// Through tierd: only tierd's own invalidation can keep L1 right.
    Tierd,
    /// Straight to Redis: only CLIENT TRACKING can.
    Direct,
}

/// Reads that tierd may decline to cache (the probe then proves nothing
/// about invalidation, but must still read right). Redis 7.0 sends no
/// tracking invalidation for consumer-group changes (XGROUP *, XREADGROUP,
/// XACK, XCLAIM, XAUTOCLAIM) or XSETID, so XINFO replies cannot be kept
/// coherent with writers that bypass tierd, and not caching them is a fix.
const MAY_BE_UNCACHED: &[&str] = &["XINFO"];

/// Cases not run with a direct writer, because Redis 7.0 sends no tracking
/// invalidation for them and no cacheable read could avoid the staleness.
const NOT_SIGNALLED: &[&str] = &[
    // A debugging command: it rewrites the HyperLogLog's encoding (the bytes
    // GET returns) without telling tracking clients.
    "pfdebug",
];

/// A reply as text for messages, cut to a readable length.
fn short(reply: &[u8]) -> String {
    let t = text(reply);
    if t.len() <= 300 {
        return format!("{t:?}");
    }
    let cut = (0..=300)
        .rev()
        .find(|&i| t.is_char_boundary(i))
        .unwrap_or(0);
    format!("{:?}… ({} bytes)", &t[..cut], reply.len())
}

/// One probe of a case: its arguments, and whether the write must have
/// dropped it from L1 (its reply changed, or the write changed the TTL).
struct Probe {
    args: Vec<Vec<u8>>,
    must_miss: bool,
}

impl Probe {
    fn refs(&self) -> Vec<&[u8]> {
        self.args.iter().map(|a| a.as_slice()).collect()
    }
}

/// Runs every case of [`CASES`] and returns one line per deviation.
async fn run_cases(redis: &RedisServer, tierd: &Tierd, via: Via) -> Vec<String> {
    let mut probe = L1Probe::new(redis, tierd, "w").await;
    let mut setup_conn = direct(redis).await;
    let mut writer = match via {
        Via::Tierd => tierd.raw().await,
        Via::Direct => direct(redis).await,
    };
    let sha = load_scripts(&mut setup_conn).await;
    let mut failures = Vec::new();

    for (i, case) in CASES.iter().enumerate() {
        if via == Via::Direct && NOT_SIGNALLED.contains(&case.cmd) {
            continue;
        }
        let keys = keys(i);
        let mut extra = HashMap::from([("{sha}".to_owned(), sha.clone())]);
        let name = format!("#{i} {} ({})", case.cmd, case.write);
        for cmd in case.setup {
            let args = expand(cmd, &keys, &extra);
            let reply = run(&mut setup_conn, &args).await;
            assert!(
                reply[0] != b'-',
                "{name}: setup {} failed: {}",
                show_args(&args),
                text(&reply)
            );
        }
        for k in ["a", "b", "c"] {
            let dump = setup_conn.cmd(&["DUMP", &keys[k]]).await;
            if dump[0] == b'$' && dump.as_ref() != b"$-1\r\n" {
                let start = dump.iter().position(|&b| b == b'\n').unwrap() + 1;
                extra.insert(
                    format!("{{dump:{k}}}"),
                    dump[start..dump.len() - 2].to_vec(),
                );
            }
        }
        let mut probes: Vec<Probe> = case
            .probes
            .iter()
            .map(|p| Probe {
                args: expand(p, &keys, &extra),
                must_miss: false,
            })
            .collect();

        // Cache every probe: the second read must be an L1 hit.
        let mut before = Vec::new();
        for p in &probes {
            probe.read_bytes(&p.refs()).await;
            let (cached, outcome) = probe.read_bytes(&p.refs()).await;
            let optional = MAY_BE_UNCACHED
                .iter()
                .any(|c| p.args[0].eq_ignore_ascii_case(c.as_bytes()));
            if outcome != Outcome::Hit && !(optional && outcome == Outcome::Uncounted) {
                failures.push(format!(
                    "{name}: probe {} was not cached before the write ({outcome:?})",
                    show_args(&p.args)
                ));
            }
            let want = run(&mut probe.direct, &p.args).await;
            if cached != want {
                failures.push(format!(
                    "{name}: probe {} before the write: tierd {}, Redis {}",
                    show_args(&p.args),
                    short(&cached),
                    short(&want)
                ));
            }
            before.push(want);
        }

        let write = expand(case.write, &keys, &extra);
        let reply = run(&mut writer, &write).await;
        let acked = Instant::now();
        assert!(
            reply[0] != b'-',
            "{name}: the write itself failed ({via:?}): {}",
            text(&reply)
        );

        // The template must change something its probes can see.
        let ttl_only = TTL_ONLY.contains(&case.cmd);
        let mut changed = false;
        for (p, before) in probes.iter_mut().zip(&before) {
            let after = run(&mut probe.direct, &p.args).await;
            p.must_miss = ttl_only || after != before;
            changed |= after != before;
        }
        if !changed && !ttl_only {
            failures.push(format!(
                "{name}: the template changes nothing its probes read; fix the table"
            ));
        }

        let limit = match via {
            // tierd invalidated before it answered the write: at once.
            Via::Tierd => Duration::ZERO,
            Via::Direct => DELIVERY,
        };
        if let Err(e) = converges(&mut probe, &probes, acked, limit).await {
            failures.push(format!("{name}: {e}"));
        }
    }
    failures
}

/// Reads every probe through tierd, every 1 ms, until each one equals
/// Redis's reply and each that must has been an L1 miss since `acked`; fails
/// once a round starts more than `limit` after `acked` (with `limit` zero,
/// the first round must pass).
async fn converges(
    probe: &mut L1Probe,
    probes: &[Probe],
    acked: Instant,
    limit: Duration,
) -> Result<(), String> {
    let mut missed = vec![false; probes.len()];
    loop {
        let started = acked.elapsed();
        let mut stale = Vec::new();
        for (i, p) in probes.iter().enumerate() {
            let (got, outcome) = probe.read_bytes(&p.refs()).await;
            // Uncounted: not an L1 lookup at all (a command tierd does not
            // cache, such as XINFO), so also answered by Redis.
            if matches!(outcome, Outcome::Miss | Outcome::Uncounted) {
                missed[i] = true;
            }
            let want = run(&mut probe.direct, &p.args).await;
            if got != want || (p.must_miss && !missed[i]) {
                stale.push(format!(
                    "{} through tierd {} ({outcome:?}), Redis {}",
                    show_args(&p.args),
                    short(&got),
                    short(&want)
                ));
            }
        }
        if stale.is_empty() {
            return Ok(());
        }
        if started >= limit {
            return Err(format!(
                "still served from L1 {started:?} after the write was acknowledged: {stale:?}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Every command from `COMMAND` flagged `write` that has key specs,
/// subcommands included (`xgroup|create`), plus the set of all names.
async fn write_commands(redis: &RedisServer) -> (BTreeSet<String>, BTreeSet<String>) {
    let mut d = direct(redis).await;
    let frame = d.cmd(&["COMMAND"]).await;
    let Resp::Array(Some(commands)) = decode(&frame) else {
        panic!("COMMAND: {}", text(&frame));
    };
    let mut writes = BTreeSet::new();
    let mut all = BTreeSet::new();
    let mut stack: Vec<Resp> = commands;
    while let Some(cmd) = stack.pop() {
        let fields = cmd.elements().expect("a COMMAND entry is an array");
        let name = fields[0].as_text().unwrap().to_ascii_lowercase();
        let flags: Vec<String> = fields[2]
            .elements()
            .unwrap()
            .iter()
            .filter_map(Resp::as_text)
            .collect();
        let has_keys = fields
            .get(8)
            .and_then(Resp::elements)
            .is_some_and(|specs| !specs.is_empty());
        if flags.iter().any(|f| f == "write") && has_keys {
            writes.insert(name.clone());
        }
        all.insert(name);
        if let Some(subs) = fields.get(9).and_then(Resp::elements) {
            stack.extend(subs.iter().cloned());
        }
    }
    (writes, all)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_write_table_covers_every_write_command_of_the_server() {
    let redis = RedisServer::start();
    let (writes, all) = write_commands(&redis).await;
    assert!(
        writes.len() > 80,
        "COMMAND listed only {} write commands",
        writes.len()
    );
    let covered: BTreeSet<&str> = CASES.iter().map(|c| c.cmd).collect();

    let missing: Vec<&String> = writes
        .iter()
        .filter(|w| !covered.contains(w.as_str()) && !SKIPPED.contains(&w.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "write commands with keys that have no case in CASES (add one, or add \
         them to SKIPPED with the reason): {missing:?}"
    );
    let unknown: Vec<&&str> = covered.iter().filter(|c| !all.contains(**c)).collect();
    assert!(
        unknown.is_empty(),
        "cases for commands this server lacks: {unknown:?}"
    );
    let not_writes: Vec<&&str> = covered
        .iter()
        .filter(|c| !writes.contains(**c) && !SCRIPT_COMMANDS.contains(c))
        .collect();
    assert!(
        not_writes.is_empty(),
        "cases for commands that are not writes: {not_writes:?}"
    );
    for skipped in SKIPPED {
        assert!(
            writes.contains(*skipped),
            "SKIPPED names a non-write: {skipped}"
        );
        assert!(
            !covered.contains(skipped),
            "{skipped} is both skipped and covered"
        );
    }
    for script in SCRIPT_COMMANDS {
        assert!(covered.contains(script), "no case for {script}");
    }
}

async fn coherence_fixture(tracking: TrackingMode) -> (RedisServer, Tierd) {
    let redis = RedisServer::start();
    let tierd = Tierd::start_with(l1_config(
        &redis.url(),
        tracking,
        vec![rule("w", "w:*", HOUR)],
    ))
    .await;
    wait_until_caching(&tierd, "w", "w:warm").await;
    (redis, tierd)
}

/// Runs the whole write table with `mode` tracking, the writes going `via`,
/// and fails listing every deviation.
async fn check_cases(mode: TrackingMode, via: Via) {
    let (redis, tierd) = coherence_fixture(mode).await;
    let failures = run_cases(&redis, &tierd, via).await;
    assert!(
        failures.is_empty(),
        "{} deviations:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_command_through_tierd_invalidates_its_keys() {
    check_cases(TrackingMode::Off, Via::Tierd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_direct_write_reaches_l1_within_50ms_with_default_tracking() {
    check_cases(TrackingMode::Default, Via::Direct).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_direct_write_reaches_l1_within_50ms_with_bcast_tracking() {
    check_cases(TrackingMode::Bcast, Via::Direct).await;
}

// ---------------------------------------------------------------------------
// Expiry, eviction, flushes
// ---------------------------------------------------------------------------

async fn cache(probe: &mut L1Probe, key: &str) {
    probe.read(&["GET", key]).await;
    let (_, outcome) = probe.read(&["GET", key]).await;
    assert_eq!(outcome, Outcome::Hit, "GET {key} is cached");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_expiry_reaches_l1() {
    let (redis, tierd) = coherence_fixture(TrackingMode::Default).await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    must(&mut probe.direct, &["SET", "w:e", "v"]).await;
    cache(&mut probe, "w:e").await;

    must(&mut probe.direct, &["PEXPIRE", "w:e", "300"]).await;
    let expire_at = Instant::now() + Duration::from_millis(300);
    poll_until(&mut probe, "w:e", b"$-1\r\n", expire_at, DELIVERY).await;
    assert_frame(&probe.reference(&["EXISTS", "w:e"]).await, b":0\r\n");
    assert_frame(&probe.read(&["GET", "w:e"]).await.0, b"$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_maxmemory_eviction_reaches_l1() {
    let redis =
        RedisServer::start_with(&["--maxmemory", "2mb", "--maxmemory-policy", "allkeys-lru"]);
    let tierd = Tierd::start_with(l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![rule("w", "w:*", HOUR)],
    ))
    .await;
    wait_until_caching(&tierd, "w", "w:warm").await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    must(&mut probe.direct, &["SET", "w:victim", "v"]).await;
    cache(&mut probe, "w:victim").await;

    // Fill Redis directly with newer keys until LRU evicts the victim.
    let mut filler = direct(&redis).await;
    let value = "f".repeat(1000);
    let mut evicted_at = None;
    for batch in 0..2000 {
        let mut pipeline = Vec::new();
        for i in 0..50 {
            pipeline.extend(encode(&["SET", &format!("fill:{batch}:{i}"), &value]));
        }
        filler.send(&pipeline).await;
        for _ in 0..50 {
            let reply = filler.frame().await;
            assert_frame(&reply, b"+OK\r\n");
        }
        if filler.cmd(&["EXISTS", "w:victim"]).await.as_ref() == b":0\r\n" {
            evicted_at = Some(Instant::now());
            break;
        }
    }
    let evicted_at = evicted_at.expect("Redis never evicted w:victim");
    poll_until(&mut probe, "w:victim", b"$-1\r\n", evicted_at, DELIVERY).await;
}

async fn flushall_from_a_direct_client_empties_l1(tracking: TrackingMode) {
    let (redis, tierd) = coherence_fixture(tracking).await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    for key in ["w:1", "w:2"] {
        must(&mut probe.direct, &["SET", key, "v"]).await;
        cache(&mut probe, key).await;
    }
    must(&mut probe.direct, &["FLUSHALL"]).await;
    let flushed = Instant::now();
    poll_until(&mut probe, "w:1", b"$-1\r\n", flushed, DELIVERY).await;
    poll_until(&mut probe, "w:2", b"$-1\r\n", flushed, DELIVERY).await;

    // FLUSHDB from a direct client too.
    must(&mut probe.direct, &["SET", "w:3", "v"]).await;
    cache(&mut probe, "w:3").await;
    must(&mut probe.direct, &["FLUSHDB"]).await;
    let flushed = Instant::now();
    poll_until(&mut probe, "w:3", b"$-1\r\n", flushed, DELIVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_from_a_direct_client_empties_l1_with_default_tracking() {
    flushall_from_a_direct_client_empties_l1(TrackingMode::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_from_a_direct_client_empties_l1_with_bcast_tracking() {
    flushall_from_a_direct_client_empties_l1(TrackingMode::Bcast).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushdb_and_swapdb_through_tierd_flush_exactly_the_right_db() {
    let (redis, tierd) = coherence_fixture(TrackingMode::Off).await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "w:k", "zero"]).await;
    must(&mut d, &["SELECT", "1"]).await;
    must(&mut d, &["SET", "w:k", "one"]).await;
    cache(&mut probe, "w:k").await;

    // SWAPDB of two other dbs leaves db 0's entries alone.
    let mut t = tierd.raw().await;
    assert_frame(&t.cmd(&["SWAPDB", "2", "3"]).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "w:k"]).await;
    assert_frame(&reply, &bulk("zero"));
    assert_eq!(outcome, Outcome::Hit, "SWAPDB 2 3 does not touch db 0");

    // SWAPDB 0 1: db 0 now holds what db 1 held.
    assert_frame(&t.cmd(&["SWAPDB", "0", "1"]).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "w:k"]).await;
    assert_frame(&reply, &bulk("one"));
    assert_eq!(outcome, Outcome::Miss);
    cache(&mut probe, "w:k").await;

    // FLUSHDB from a client in db 1 leaves db 0's entries alone.
    let mut in_db1 = tierd.raw().await;
    assert_frame(&in_db1.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&in_db1.cmd(&["FLUSHDB"]).await, b"+OK\r\n");
    let (reply, outcome) = probe.read(&["GET", "w:k"]).await;
    assert_frame(&reply, &bulk("one"));
    assert_eq!(outcome, Outcome::Hit, "FLUSHDB in db 1 does not touch db 0");

    // FLUSHDB in db 0 empties it.
    assert_frame(&t.cmd(&["FLUSHDB"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "w:k"]).await.0, b"$-1\r\n");

    // FLUSHALL through tierd too.
    must(&mut probe.direct, &["SET", "w:k", "again"]).await;
    let (reply, _) = probe.read(&["GET", "w:k"]).await;
    assert_frame(&reply, b"$-1\r\n");
    assert_frame(&t.cmd(&["SET", "w:k", "again"]).await, b"+OK\r\n");
    cache(&mut probe, "w:k").await;
    assert_frame(&t.cmd(&["FLUSHALL"]).await, b"+OK\r\n");
    assert_frame(&probe.read(&["GET", "w:k"]).await.0, b"$-1\r\n");
}

// ---------------------------------------------------------------------------
// Losing the tracking link
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_tracking_connection_flushes_l1_and_caching_resumes() {
    let (redis, tierd) = coherence_fixture(TrackingMode::Default).await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    let mut d = direct(&redis).await;
    for key in ["w:k", "w:other"] {
        must(&mut d, &["SET", key, "v0"]).await;
        cache(&mut probe, key).await;
    }
    let ids = clients_named(&mut d, TRACKING_NAME).await;
    assert_eq!(ids.len(), 1, "one {TRACKING_NAME} connection: {ids:?}");
    let old_id = ids[0];

    assert_frame(
        &d.cmd(&["CLIENT", "KILL", "ID", &old_id.to_string()]).await,
        b":1\r\n",
    );
    // Nothing can tell tierd about this write but the lost link itself.
    must(&mut d, &["SET", "w:k", "v1"]).await;
    let (reply, _) = probe.read(&["GET", "w:k"]).await;
    assert_frame(&reply, &bulk("v1"));
    // L1 was flushed as a whole, not just the key that changed.
    let (reply, outcome) = probe.read(&["GET", "w:other"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_ne!(outcome, Outcome::Hit, "w:other must have been flushed");

    // Until caching resumes, every direct write shows at once; after, within
    // the delivery bound. Caching must resume on a new tracking connection.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut n = 1;
    let resumed = loop {
        n += 1;
        let value = format!("v{n}");
        must(&mut d, &["SET", "w:k", &value]).await;
        let written = Instant::now();
        poll_until(&mut probe, "w:k", bulk(&value).as_ref(), written, DELIVERY).await;
        let (reply, outcome) = probe.read(&["GET", "w:k"]).await;
        if outcome == Outcome::Hit {
            assert_frame(&reply, &bulk(&value));
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(
        resumed,
        "tierd did not cache again within 10 s of losing the tracking link"
    );
    let ids = clients_named(&mut d, TRACKING_NAME).await;
    assert_eq!(
        ids.len(),
        1,
        "one {TRACKING_NAME} connection again: {ids:?}"
    );
    assert_ne!(ids[0], old_id, "a new tracking connection");

    // Tracking works again: a direct write reaches the cached entry.
    must(&mut d, &["SET", "w:k", "after"]).await;
    let written = Instant::now();
    poll_until(&mut probe, "w:k", bulk("after").as_ref(), written, DELIVERY).await;
    cache(&mut probe, "w:other").await;
    must(&mut d, &["SET", "w:other", "after"]).await;
    let written = Instant::now();
    poll_until(
        &mut probe,
        "w:other",
        bulk("after").as_ref(),
        written,
        DELIVERY,
    )
    .await;
}

// ---------------------------------------------------------------------------
// Two tierds
// ---------------------------------------------------------------------------

/// A write through one tierd is, to another, a write that bypassed it.
async fn a_write_through_one_tierd_reaches_another(tracking: TrackingMode) {
    let redis = RedisServer::start();
    let config = || l1_config(&redis.url(), tracking, vec![rule("w", "w:*", HOUR)]);
    let a = Tierd::start_with(config()).await;
    let b = Tierd::start_with(config()).await;
    wait_until_caching(&a, "w", "w:warm").await;
    wait_until_caching(&b, "w", "w:warm").await;
    let mut on_a = L1Probe::new(&redis, &a, "w").await;
    let mut on_b = L1Probe::new(&redis, &b, "w").await;

    for n in 1..=20 {
        let old = format!("v{}", n - 1);
        let new = format!("v{n}");
        if n == 1 {
            must(&mut on_a.direct, &["SET", "w:k", &old]).await;
        }
        cache(&mut on_a, "w:k").await;
        cache(&mut on_b, "w:k").await;
        assert_frame(&on_a.tierd.cmd(&["SET", "w:k", &new]).await, b"+OK\r\n");
        let written = Instant::now();
        // The writer's own tierd: at once.
        assert_frame(&on_a.read(&["GET", "w:k"]).await.0, &bulk(&new));
        // The other one: within the delivery bound.
        poll_until(&mut on_b, "w:k", bulk(&new).as_ref(), written, DELIVERY).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_tierd_reaches_another_with_default_tracking() {
    a_write_through_one_tierd_reaches_another(TrackingMode::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_through_one_tierd_reaches_another_with_bcast_tracking() {
    a_write_through_one_tierd_reaches_another(TrackingMode::Bcast).await;
}

// ---------------------------------------------------------------------------
// The staleness run
// ---------------------------------------------------------------------------

const WRITERS: usize = 4;
const READERS: usize = 4;

async fn staleness_run(tracking: TrackingMode) {
    let redis = RedisServer::start();
    let tierd = Tierd::start_with(l1_config(
        &redis.url(),
        tracking,
        vec![rule("s", "s:*", HOUR)],
    ))
    .await;
    wait_until_caching(&tierd, "s", "s:warm").await;
    let mut probe = L1Probe::new(&redis, &tierd, "s").await;
    let mut d = direct(&redis).await;
    for key in 0..staleness::KEYS {
        must(&mut d, &["SET", &format!("s:{key}"), "0"]).await;
    }
    let mut writes = staleness::initial_writes();
    let before = probe.stats().await;

    let stop = Arc::new(AtomicBool::new(false));
    let writer_tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(staleness::writer(redis.addr(), w, WRITERS, stop.clone())))
        .collect();
    let reader_tasks: Vec<_> = (0..READERS)
        .map(|r| tokio::spawn(staleness::reader(tierd.addr, r, stop.clone())))
        .collect();
    let reads = staleness::finish(
        staleness::duration("TIERD_STALENESS_SECS"),
        &stop,
        &mut writes,
        writer_tasks,
        reader_tasks,
    )
    .await;
    let after = probe.stats().await;
    let hits = after.hits - before.hits;
    let write_count: usize = writes.iter().map(|w| w.len() - 1).sum();

    // A read that started more than DELIVERY after a write was acknowledged
    // must return that write's counter or a later one.
    let violations = staleness::violations(&writes, &reads, DELIVERY);
    eprintln!(
        "staleness run ({}): {write_count} writes, {} reads, {hits} L1 hits, {} violations",
        tracking.as_str(),
        reads.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} stale reads of {} (first 20):\n{}",
        violations.len(),
        reads.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    assert!(
        write_count > 1000,
        "only {write_count} writes: the run proves little"
    );
    assert!(
        hits >= 1000 && hits * 4 >= reads.len() as u64,
        "only {hits} of {} reads were L1 hits: the run did not exercise the cache",
        reads.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_run_with_default_tracking() {
    staleness_run(TrackingMode::Default).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_run_with_bcast_tracking() {
    staleness_run(TrackingMode::Bcast).await;
}
