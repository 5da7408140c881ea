//! Byte-exact passthrough: what a client gets through tierd is what it would
//! get from Redis directly. Most tests here are differential: the same bytes
//! go to a redis-server directly and to tierd (in front of a second,
//! identically prepared redis-server), and the reply streams must be equal.
//! Real clients (`redis-cli`, `redis-benchmark`) are run against tierd too.

mod support;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::Duration;

use support::wire::{lossy, mask_hello_id, resp, Wire};
use support::{both, show, RedisServer, Tierd};
use tokio::io::AsyncWriteExt;

// ---------------------------------------------------------------------------
// Wire helpers
// ---------------------------------------------------------------------------

/// Builds one command from anything byte-like: `c!("SET", "k", b"v\r\n")`.
macro_rules! c {
    ($($arg:expr),+ $(,)?) => {
        vec![$(AsRef::<[u8]>::as_ref(&$arg).to_vec()),+]
    };
}

/// [`resp`] for one owned command.
fn one(args: Vec<Vec<u8>>) -> Vec<u8> {
    resp(&args)
}

fn resp_all(cmds: &[Vec<Vec<u8>>]) -> Vec<u8> {
    cmds.iter().flat_map(|c| resp(c)).collect()
}

/// An `ECHO` request that ends step `n`, and the reply that marks its end.
/// Reading up to the marker's reply collects everything the step produced,
/// however many frames that is (none, for suppressed replies).
fn marker(n: usize) -> (Vec<u8>, Vec<u8>) {
    let tag = format!("~end-of-step-{n}~");
    let req = one(c!("ECHO", tag));
    let rep = format!("${}\r\n{tag}\r\n", tag.len()).into_bytes();
    (req, rep)
}

/// One connection straight to Redis and one through tierd, fed the same
/// bytes.
struct Pair {
    direct: Wire,
    proxied: Wire,
    step: usize,
}

impl Pair {
    async fn new(direct: SocketAddr, proxied: SocketAddr) -> Pair {
        Pair {
            direct: Wire::connect(direct).await,
            proxied: Wire::connect(proxied).await,
            step: 0,
        }
    }

    /// Sends `bytes` (followed by an end marker) on both connections and
    /// returns everything each one answered before the marker.
    async fn exchange(&mut self, bytes: &[u8]) -> (Vec<u8>, Vec<u8>) {
        self.step += 1;
        let (req, rep) = marker(self.step);
        let mut payload = bytes.to_vec();
        payload.extend_from_slice(&req);
        self.direct.send(&payload).await;
        self.proxied.send(&payload).await;
        let direct = self.direct.until(&rep).await;
        let proxied = self.proxied.until(&rep).await;
        (direct, proxied)
    }

    /// Sends one command on both; asserts the replies are byte-identical
    /// and returns the reply.
    async fn same(&mut self, args: Vec<Vec<u8>>) -> Vec<u8> {
        let (d, p) = self.exchange(&resp(&args)).await;
        assert_eq!(
            lossy(&p),
            lossy(&d),
            "reply to {:?} through tierd differs from Redis",
            args.iter().map(|a| lossy(a)).collect::<Vec<_>>()
        );
        d
    }
}

/// Two identically configured servers: `a` is talked to directly, `b` sits
/// behind tierd. Side effects then happen once on each, so stateful
/// commands (INCR, LPUSH) give the same answers on both paths.
async fn twin_servers() -> (RedisServer, RedisServer, Tierd) {
    let args = ["--enable-debug-command", "yes"];
    let a = RedisServer::start_with(&args);
    let b = RedisServer::start_with(&args);
    let t = Tierd::start(&b.url()).await;
    (a, b, t)
}

// ---------------------------------------------------------------------------
// Pipelining
// ---------------------------------------------------------------------------

/// A small deterministic generator (xorshift64), so that the pipeline is the
/// same on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn mixed_pipeline(n: usize) -> Vec<Vec<Vec<u8>>> {
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    let mut cmds = Vec::with_capacity(n);
    for i in 0..n {
        let k = format!("k{}", rng.below(20));
        let l = format!("l{}", rng.below(5));
        let h = format!("h{}", rng.below(5));
        let cnt = format!("n{}", rng.below(5));
        let cmd = match rng.below(16) {
            0 => c!("SET", k, format!("v{i}")),
            1 => c!("GET", k),
            2 => c!("INCR", cnt),
            3 => c!("LPUSH", l, format!("e{i}")),
            4 => c!("LRANGE", l, "0", "-1"),
            5 => c!("HSET", h, format!("f{}", rng.below(7)), i.to_string()),
            6 => c!("HGETALL", h),
            7 => c!("DEL", k, "nosuch"),
            8 => c!(format!("NOSUCHCMD{}", rng.below(3)), k),
            9 => c!("GET"),
            10 => c!("SET", k),
            11 => c!("INCR", l),
            12 => c!("MGET", k, "nosuch", format!("k{}", rng.below(20))),
            13 => c!("SET", k, format!("bin\r\n\0{i}\r\n")),
            14 => c!("SADD", "s", rng.below(50).to_string()),
            _ => c!("ECHO", format!("echo-{i}")),
        };
        cmds.push(cmd);
    }
    cmds
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_of_1000_mixed_commands_is_answered_in_order_like_redis() {
    let (a, _b, t) = twin_servers().await;
    let cmds = mixed_pipeline(1000);
    let mut p = Pair::new(a.addr(), t.addr).await;
    // One write carrying all 1,000 commands (and the end marker).
    let (direct, proxied) = p.exchange(&resp_all(&cmds)).await;

    // Sanity on the reference: 1,000 replies, some of each kind.
    let text = lossy(&direct);
    assert!(text.contains("-ERR unknown command 'NOSUCHCMD"), "{text}");
    assert!(text.contains("-ERR wrong number of arguments for 'get' command"));
    assert!(text.contains("-WRONGTYPE"));
    if proxied != direct {
        let at = proxied
            .iter()
            .zip(&direct)
            .position(|(x, y)| x != y)
            .unwrap_or(proxied.len().min(direct.len()));
        let from = at.saturating_sub(200);
        panic!(
            "pipelined replies differ at byte {at} (direct {} bytes, tierd {} bytes)\n\
             direct: {:?}\n tierd: {:?}",
            direct.len(),
            proxied.len(),
            lossy(&direct[from..(at + 200).min(direct.len())]),
            lossy(&proxied[from..(at + 200).min(proxied.len())]),
        );
    }

    // The order is really the request order: the echoes come out ascending.
    let echoes: Vec<usize> = text
        .split("\r\n")
        .filter_map(|l| l.strip_prefix("echo-"))
        .map(|n| n.parse().unwrap())
        .collect();
    assert!(echoes.len() > 30, "generator produced echoes");
    assert!(echoes.windows(2).all(|w| w[0] < w[1]), "{echoes:?}");
}

// ---------------------------------------------------------------------------
// Differential corpus
// ---------------------------------------------------------------------------

/// Commands covering every reply type, in both protocols: simple strings,
/// errors, integers, bulk strings, nulls (bulk and array), nested arrays,
/// maps, sets, doubles, big numbers, verbatim strings, booleans, attributes,
/// empty aggregates and binary-safe values.
fn corpus() -> Vec<Vec<Vec<u8>>> {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    vec![
        // Simple strings, bulk strings, nulls.
        c!("PING"),
        c!("PING", "hello"),
        c!("ECHO", ""),
        c!("SET", "str", "v1"),
        c!("GET", "str"),
        c!("TYPE", "str"),
        c!("GET", "nosuch"),
        c!("MGET", "str", "nosuch"),
        // Binary-safe keys and values: CR, LF and NUL inside.
        c!("SET", b"bin\r\nkey\0", b"a\r\nb\0c\xff\r\n"),
        c!("GET", b"bin\r\nkey\0"),
        c!("STRLEN", b"bin\r\nkey\0"),
        c!("APPEND", b"bin\r\nkey\0", b"\0\0\r\n"),
        c!("GETRANGE", b"bin\r\nkey\0", "0", "-1"),
        c!("SET", "big", big),
        c!("GET", "big"),
        // Integers and errors.
        c!("INCR", "counter"),
        c!("INCRBY", "counter", "41"),
        c!("DECR", "counter"),
        c!("INCR", "str"),
        c!("INCRBYFLOAT", "fl", "1.5"),
        c!("INCRBYFLOAT", "fl", "0.1"),
        c!("EXISTS", "str", "nosuch", "counter"),
        c!("NOSUCHCMD", "a", "b"),
        c!("GET"),
        c!("SET", "k"),
        c!("EXEC"),
        c!("DISCARD"),
        c!("SELECT", "99"),
        c!("SELECT", "0"),
        c!("CLIENT", "NOSUCHSUB"),
        c!("OBJECT", "FREQ", "str"),
        // Lists: arrays, empty arrays, null arrays.
        c!("LPUSH", "list", "a", "b", "c"),
        c!("LRANGE", "list", "0", "-1"),
        c!("LRANGE", "nosuch", "0", "-1"),
        c!("LPOP", "nosuch", "1"),
        c!("LPOP", "list", "2"),
        c!("LPOS", "list", "zzz"),
        c!("LPUSH", "str", "x"),
        c!("OBJECT", "ENCODING", "list"),
        // Hashes: maps in RESP3, arrays with nulls.
        c!("HSET", "h", "f1", "v1", "f2", "v2", "f3", b"\r\n"),
        c!("HGETALL", "h"),
        c!("HGETALL", "nosuch"),
        c!("HMGET", "h", "f1", "nope", "f2"),
        c!("HRANDFIELD", "nosuch"),
        // Sets (an intset, so both servers order it the same).
        c!("SADD", "nums", "3", "1", "2"),
        c!("SMEMBERS", "nums"),
        c!("SMEMBERS", "nosuch"),
        c!("SISMEMBER", "nums", "1"),
        c!("SMISMEMBER", "nums", "1", "9"),
        // Sorted sets: doubles, infinities, pairs.
        c!("ZADD", "z", "1.5", "a", "2", "b", "inf", "c", "-inf", "d"),
        c!("ZSCORE", "z", "a"),
        c!("ZSCORE", "z", "c"),
        c!("ZSCORE", "z", "nosuch"),
        c!("ZINCRBY", "z", "0.25", "a"),
        c!("ZRANGE", "z", "0", "-1", "WITHSCORES"),
        c!("ZMSCORE", "z", "a", "nosuch", "d"),
        c!("ZPOPMIN", "nosuch"),
        // Streams: nested arrays, null for a missing stream, maps.
        c!("XADD", "s", "1-1", "f", "v"),
        c!("XADD", "s", "2-1", "a", "b", "c", b"d\r\n"),
        c!("XRANGE", "s", "-", "+"),
        c!("XREAD", "COUNT", "10", "STREAMS", "s", "0"),
        c!("XREAD", "COUNT", "1", "STREAMS", "nosuch", "0"),
        c!("XINFO", "STREAM", "s"),
        c!("SCAN", "0", "MATCH", "none*", "COUNT", "100000"),
        // Server introspection with fixed answers.
        c!("COMMAND", "INFO", "get"),
        c!("COMMAND", "DOCS", "get"),
        c!("CONFIG", "GET", "maxmemory-policy"),
        c!("CLIENT", "GETNAME"),
        c!("PUBLISH", "chan", "msg"),
        // Scripts: nested tables, error and status replies, RESP3 types.
        c!("EVAL", "return {1,{2,{3,'x'}},'y',{}}", "0"),
        c!("EVAL", "return redis.error_reply('MYERR custom')", "0"),
        c!("EVAL", "return redis.status_reply('FINE')", "0"),
        c!("EVAL", "return 3.99", "0"),
        c!(
            "EVAL",
            "redis.setresp(3); return redis.call('HGETALL', KEYS[1])",
            "1",
            "h"
        ),
        c!("EVAL", "redis.setresp(3); return {double=3.5}", "0"),
        c!("EVAL", "redis.setresp(3); return true", "0"),
        c!("EVAL", "redis.setresp(3); return false", "0"),
        // Every RESP3 type Redis can emit, by name.
        c!("DEBUG", "PROTOCOL", "string"),
        c!("DEBUG", "PROTOCOL", "integer"),
        c!("DEBUG", "PROTOCOL", "double"),
        c!("DEBUG", "PROTOCOL", "bignum"),
        c!("DEBUG", "PROTOCOL", "null"),
        c!("DEBUG", "PROTOCOL", "array"),
        c!("DEBUG", "PROTOCOL", "set"),
        c!("DEBUG", "PROTOCOL", "map"),
        c!("DEBUG", "PROTOCOL", "attrib"),
        c!("DEBUG", "PROTOCOL", "verbatim"),
        c!("DEBUG", "PROTOCOL", "true"),
        c!("DEBUG", "PROTOCOL", "false"),
        c!("PING"),
    ]
}

/// Runs the corpus one command at a time and returns every mismatch, and
/// Redis's own replies.
async fn run_corpus(p: &mut Pair) -> (Vec<String>, Vec<Vec<u8>>) {
    let mut mismatches = Vec::new();
    let mut replies = Vec::new();
    for cmd in corpus() {
        let (d, t) = p.exchange(&resp(&cmd)).await;
        if d != t {
            let name: Vec<String> = cmd.iter().map(|a| lossy(&a[..a.len().min(40)])).collect();
            mismatches.push(format!(
                "{name:?}\n    redis: {:?}\n    tierd: {:?}",
                lossy(&d[..d.len().min(400)]),
                lossy(&t[..t.len().min(400)])
            ));
        }
        replies.push(d);
    }
    (mismatches, replies)
}

/// Asserts the corpus really produced each of these reply prefixes (so a
/// server that refused, say, DEBUG would not make the comparison hollow).
fn assert_covers(replies: &[Vec<u8>], prefixes: &[&str]) {
    for prefix in prefixes {
        assert!(
            replies.iter().any(|r| r.starts_with(prefix.as_bytes())),
            "no reply starting with {prefix:?} in the corpus"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp2_corpus_matches_redis_byte_for_byte() {
    let (a, _b, t) = twin_servers().await;
    let mut p = Pair::new(a.addr(), t.addr).await;
    let (mismatches, replies) = run_corpus(&mut p).await;
    assert!(
        mismatches.is_empty(),
        "{} replies differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_covers(
        &replies,
        &[
            "+",
            "-",
            ":",
            "$",
            "$-1\r\n",
            "*",
            "*0\r\n",
            "*-1\r\n",
            "*4\r\n:1\r\n*2\r\n:2\r\n*2",
        ],
    );
    // The connection is still in step afterwards.
    assert_eq!(p.same(c!("PING")).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_corpus_matches_redis_byte_for_byte() {
    let (a, _b, t) = twin_servers().await;
    let mut p = Pair::new(a.addr(), t.addr).await;
    let (d, h) = p.exchange(&one(c!("HELLO", "3"))).await;
    assert!(d.starts_with(b"%7\r\n"), "{}", lossy(&d));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));
    let (mismatches, replies) = run_corpus(&mut p).await;
    assert!(
        mismatches.is_empty(),
        "{} replies differ:\n{}",
        mismatches.len(),
        mismatches.join("\n")
    );
    assert_covers(
        &replies,
        &[
            "+", "-", ":", "$", "*", "_", "%", "%0\r\n", "~", "~0\r\n", ",", ",inf", "(", "=",
            "#t", "#f", "|",
        ],
    );
    assert_eq!(p.same(c!("PING")).await, b"+PONG\r\n");
}

/// Redis emits a push frame, then the command's reply, on an ordinary RESP3
/// connection for `DEBUG PROTOCOL push`; a direct client sees both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_push_on_an_ordinary_connection_reaches_the_client() {
    let (a, _b, t) = twin_servers().await;
    let mut p = Pair::new(a.addr(), t.addr).await;
    p.exchange(&one(c!("HELLO", "3"))).await;
    let reply = p.same(c!("DEBUG", "PROTOCOL", "push")).await;
    assert!(reply.starts_with(b">2\r\n"), "{}", lossy(&reply));
    assert_eq!(p.same(c!("PING")).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// HELLO and CLIENT
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_replies_match_redis() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut p = Pair::new(redis.addr(), t.addr).await;

    // HELLO 3: a 7-entry map with proto 3 and Redis's own server/version.
    let (d, h) = p.exchange(&one(c!("HELLO", "3"))).await;
    assert!(h.starts_with(b"%7\r\n"), "{}", lossy(&h));
    assert!(contains(&h, b"$5\r\nproto\r\n:3\r\n"), "{}", lossy(&h));
    assert!(contains(&h, b"$2\r\nid\r\n:"), "{}", lossy(&h));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));

    // HELLO with no version: the current protocol's map.
    let (d, h) = p.exchange(&one(c!("HELLO"))).await;
    assert!(h.starts_with(b"%7\r\n"), "{}", lossy(&h));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));

    // Errors leave the protocol as it was, with Redis's exact texts.
    assert_eq!(
        p.same(c!("HELLO", "4")).await,
        b"-NOPROTO unsupported protocol version\r\n"
    );
    assert_eq!(
        p.same(c!("HELLO", "abc")).await,
        b"-ERR Protocol version is not an integer or out of range\r\n"
    );
    assert_eq!(
        p.same(c!("HELLO", "3", "SETNAME", "bad name")).await,
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
    let err = p.same(c!("HELLO", "3", "FOO")).await;
    assert!(
        err.starts_with(b"-ERR Syntax error in HELLO option"),
        "{}",
        lossy(&err)
    );
    let err = p.same(c!("HELLO", "3", "SETNAME")).await;
    assert!(err.starts_with(b"-ERR"), "{}", lossy(&err));
    let err = p
        .same(c!("HELLO", "3", "AUTH", "nosuchuser", "wrong"))
        .await;
    assert!(err.starts_with(b"-WRONGPASS"), "{}", lossy(&err));
    // Without requirepass the default user takes any password.
    let (d, h) = p
        .exchange(&one(c!("HELLO", "3", "AUTH", "default", "any")))
        .await;
    assert!(h.starts_with(b"%7\r\n"), "{}", lossy(&h));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));
    // Still RESP3: a null is `_`.
    assert_eq!(p.same(c!("GET", "nosuch")).await, b"_\r\n");

    // HELLO 2: back to a flat array and RESP2 nulls.
    let (d, h) = p.exchange(&one(c!("HELLO", "2"))).await;
    assert!(h.starts_with(b"*14\r\n"), "{}", lossy(&h));
    assert!(contains(&h, b"$5\r\nproto\r\n:2\r\n"), "{}", lossy(&h));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));
    assert_eq!(p.same(c!("GET", "nosuch")).await, b"$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_getname_follows_hello_setname_like_redis() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut p = Pair::new(redis.addr(), t.addr).await;

    assert_eq!(p.same(c!("CLIENT", "GETNAME")).await, b"$-1\r\n");
    p.exchange(&one(c!("HELLO", "3"))).await;
    assert_eq!(p.same(c!("CLIENT", "GETNAME")).await, b"_\r\n");
    let (d, h) = p.exchange(&one(c!("HELLO", "3", "SETNAME", "foo"))).await;
    assert!(h.starts_with(b"%7\r\n"), "{}", lossy(&h));
    assert_eq!(lossy(&mask_hello_id(&h)), lossy(&mask_hello_id(&d)));
    assert_eq!(p.same(c!("CLIENT", "GETNAME")).await, b"$3\r\nfoo\r\n");
    p.exchange(&one(c!("HELLO", "2"))).await;
    assert_eq!(p.same(c!("CLIENT", "GETNAME")).await, b"$3\r\nfoo\r\n");
    // An empty name clears it, as in Redis.
    assert_eq!(p.same(c!("CLIENT", "SETNAME", "")).await, b"+OK\r\n");
    assert_eq!(p.same(c!("CLIENT", "GETNAME")).await, b"$-1\r\n");
    assert_eq!(
        p.same(c!("CLIENT", "SETNAME", "bad name")).await,
        b"-ERR Client names cannot contain spaces, newlines or special characters.\r\n"
    );
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn integer(frame: &[u8]) -> i64 {
    let text = lossy(frame);
    text.strip_prefix(':')
        .and_then(|t| t.strip_suffix("\r\n"))
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("not an integer reply: {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_and_name_belong_to_each_client() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut one = t.raw().await;
    let mut two = t.raw().await;

    let id1 = integer(&one.cmd(&["CLIENT", "ID"]).await);
    let id2 = integer(&two.cmd(&["CLIENT", "ID"]).await);
    assert_ne!(id1, id2, "two clients share a CLIENT ID");
    assert!(id1 > 0 && id2 > 0);
    assert_eq!(integer(&one.cmd(&["CLIENT", "ID"]).await), id1, "stable");

    assert_eq!(
        &one.cmd(&["CLIENT", "SETNAME", "alice"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &one.cmd(&["CLIENT", "GETNAME"]).await[..],
        b"$5\r\nalice\r\n"
    );
    assert_eq!(&two.cmd(&["CLIENT", "GETNAME"]).await[..], b"$-1\r\n");
    assert_eq!(
        &two.cmd(&["CLIENT", "SETNAME", "bob"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &one.cmd(&["CLIENT", "GETNAME"]).await[..],
        b"$5\r\nalice\r\n"
    );
    assert_eq!(&two.cmd(&["CLIENT", "GETNAME"]).await[..], b"$3\r\nbob\r\n");

    assert_eq!(
        &one.cmd(&["CLIENT", "SETINFO", "LIB-NAME", "x"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &one.cmd(&["CLIENT", "SETINFO", "LIB-VER", "1.2.3"]).await[..],
        b"+OK\r\n"
    );
    // The client is still served normally afterwards.
    assert_eq!(&one.cmd(&["SET", "k", "v"]).await[..], b"+OK\r\n");
    assert_eq!(&two.cmd(&["GET", "k"]).await[..], b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_skip_on_behave_like_redis() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut p = Pair::new(redis.addr(), t.addr).await;
    let script = resp_all(&[
        c!("CLIENT", "REPLY", "SKIP"),
        c!("SET", "a", "1"),
        c!("GET", "a"),
        c!("CLIENT", "REPLY", "OFF"),
        c!("SET", "b", "2"),
        c!("GET", "b"),
        c!("NOSUCHCMD"),
        c!("CLIENT", "REPLY", "SKIP"),
        c!("GET", "a"),
        c!("CLIENT", "REPLY", "ON"),
        c!("GET", "b"),
        c!("CLIENT", "REPLY", "SKIP"),
        c!("CLIENT", "REPLY", "ON"),
        c!("GET", "a"),
        c!("CLIENT", "REPLY", "SKIP"),
        c!("CLIENT", "REPLY", "SKIP"),
        c!("PING"),
        c!("CLIENT", "REPLY", "SKIP"),
        c!("NOSUCHCMD"),
        c!("CLIENT", "REPLY", "FOO"),
        c!("ECHO", "last"),
    ]);
    let (d, h) = p.exchange(&script).await;
    assert_eq!(lossy(&h), lossy(&d));
    assert_eq!(
        lossy(&d),
        "$1\r\n1\r\n+OK\r\n$1\r\n2\r\n+OK\r\n$1\r\n1\r\n-ERR syntax error\r\n$4\r\nlast\r\n"
    );
    // Same script again, one command per round trip where a reply is due.
    let mut direct = support::Raw::connect(redis.addr()).await;
    let mut proxied = t.raw().await;
    for raw in [&mut direct, &mut proxied] {
        raw.send(&resp_all(&[
            c!("CLIENT", "REPLY", "SKIP"),
            c!("SET", "a", "3"),
        ]))
        .await;
        assert_eq!(&raw.cmd(&["GET", "a"]).await[..], b"$1\r\n3\r\n");
    }
}

// ---------------------------------------------------------------------------
// Big values, inline commands
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn value_of_64_mb_round_trips() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    const LEN: usize = 64 * 1024 * 1024;
    let mut rng = Rng(0x0064_6464);
    let mut value = Vec::with_capacity(LEN);
    while value.len() < LEN {
        value.extend_from_slice(&rng.next().to_le_bytes());
    }
    value.truncate(LEN);

    let mut w = Wire::connect(t.addr).await;
    w.expect(&one(c!("SET", "huge", &value)), b"+OK\r\n").await;
    w.send(&one(c!("GET", "huge"))).await;
    let (req, rep) = marker(1);
    w.send(&req).await;
    let got = w.until(&rep).await;
    let header = format!("${LEN}\r\n");
    assert_eq!(got.len(), header.len() + LEN + 2, "reply length");
    assert_eq!(&got[..header.len()], header.as_bytes());
    assert!(
        got[header.len()..header.len() + LEN] == value[..],
        "content differs"
    );
    assert_eq!(&got[header.len() + LEN..], b"\r\n");

    // Redis has exactly the value too.
    let mut d = Wire::connect(redis.addr()).await;
    d.expect(&one(c!("STRLEN", "huge")), format!(":{LEN}\r\n").as_bytes())
        .await;
    // And the proxy still serves small requests on the same connection.
    w.expect(&one(c!("PING")), b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_commands_over_a_raw_socket() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;

    // The plain telnet case, exact bytes.
    let mut w = Wire::connect(t.addr).await;
    w.expect(b"PING\r\n", b"+PONG\r\n").await;
    w.expect(b"SET k \"hello world\"\r\n", b"+OK\r\n").await;
    w.expect(b"GET k\r\n", b"$11\r\nhello world\r\n").await;
    w.expect(b"PING\n", b"+PONG\r\n").await;
    // A command split across writes.
    w.send(b"PI").await;
    w.stream.flush().await.unwrap();
    w.expect(b"NG\r\n", b"+PONG\r\n").await;

    // And the same as Redis for the less common forms.
    let mut p = Pair::new(redis.addr(), t.addr).await;
    let cases: &[&[u8]] = &[
        b"PING\r\n",
        b"PING\n",
        b"ping hi\r\n",
        b"SET k \"hello world\"\r\nGET k\r\n",
        b"ECHO \"a\\x41\\n\\tb\\\"c\"\r\n",
        b"ECHO 'single \"quoted\"'\r\n",
        b"ECHO    spaced     out   \r\n",
        b"\r\n\r\n   \r\nPING\r\n",
        b"PING\r\n*1\r\n$4\r\nPING\r\nPING\n",
        b"NOSUCHCMD a b\r\n",
        b"GET\r\n",
        b"SET\tk\tv\r\nGET k\r\n",
    ];
    for case in cases {
        let (d, h) = p.exchange(case).await;
        assert!(!d.is_empty(), "Redis answered {:?}", lossy(case));
        assert_eq!(lossy(&h), lossy(&d), "inline {:?}", lossy(case));
    }
}

// ---------------------------------------------------------------------------
// Real clients
// ---------------------------------------------------------------------------

async fn run(program: &str, args: &[String], stdin: Option<Vec<u8>>) -> std::process::Output {
    let mut child = tokio::process::Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("{program} must be installed: {e}"));
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        pipe.write_all(&input).await.unwrap();
        drop(pipe);
    }
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{program} {args:?} did not finish within 20 s"))
        .unwrap()
}

fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_works_through_tierd() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let port = t.addr.port().to_string();
    let cli = |rest: &[&str]| {
        let mut a = args(&["-h", "127.0.0.1", "-p", &port]);
        a.extend(args(rest));
        a
    };

    let out = run("redis-cli", &cli(&["SET", "cli:k", "hello world"]), None).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(lossy(&out.stdout), "OK\n");
    let out = run("redis-cli", &cli(&["GET", "cli:k"]), None).await;
    assert_eq!(lossy(&out.stdout), "hello world\n");
    let out = run("redis-cli", &cli(&["-3", "HSET", "cli:h", "f", "v"]), None).await;
    assert_eq!(lossy(&out.stdout), "1\n", "{out:?}");
    // Reads print the same as against Redis directly, in both protocols.
    let direct_port = redis.port.to_string();
    for read in [
        &["GET", "cli:k"][..],
        &["-3", "HGETALL", "cli:h"],
        &["HGETALL", "cli:h"],
        &["-3", "GET", "nosuch"],
        &["--no-raw", "HGETALL", "cli:h"],
    ] {
        let through = run("redis-cli", &cli(read), None).await;
        let mut direct_args = args(&["-h", "127.0.0.1", "-p", &direct_port]);
        direct_args.extend(args(read));
        let direct = run("redis-cli", &direct_args, None).await;
        assert!(!direct.stdout.is_empty(), "{read:?}");
        assert_eq!(lossy(&through.stdout), lossy(&direct.stdout), "{read:?}");
    }

    // --pipe: mass insertion, then redis-cli's own ECHO round trip.
    let n = 500;
    let input: Vec<u8> = (0..n)
        .flat_map(|i| one(c!("SET", format!("pipe:{i}"), i.to_string())))
        .collect();
    let out = run("redis-cli", &cli(&["--pipe"]), Some(input)).await;
    assert!(out.status.success(), "{out:?}");
    let text = lossy(&out.stdout);
    assert!(text.contains(&format!("errors: 0, replies: {n}")), "{text}");

    let mut d = redis.direct();
    let got: Option<String> = redis::cmd("GET").arg("pipe:499").query(&mut d).unwrap();
    assert_eq!(got.as_deref(), Some("499"));
    let got: Option<String> = redis::cmd("GET").arg("cli:k").query(&mut d).unwrap();
    assert_eq!(got.as_deref(), Some("hello world"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_benchmark_works_through_tierd() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let port = t.addr.port().to_string();
    let out = run(
        "redis-benchmark",
        &args(&[
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-t",
            "set,get",
            "-n",
            "2000",
            "-c",
            "10",
            "-q",
        ]),
        None,
    )
    .await;
    assert!(out.status.success(), "{out:?}");
    let text = lossy(&out.stdout);
    let lines: Vec<&str> = text.split(['\r', '\n']).map(str::trim).collect();
    for test in ["SET: ", "GET: "] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(test) && l.contains("requests per second")),
            "no {test:?} result line in {text:?}"
        );
    }
    assert!(!lossy(&out.stderr).contains("rror"), "{out:?}");

    // The keys redis-benchmark wrote went to Redis.
    let mut d = redis.direct();
    let exists: i64 = redis::cmd("EXISTS")
        .arg("key:__rand_int__")
        .query(&mut d)
        .unwrap();
    assert_eq!(exists, 1);
    let len: i64 = redis::cmd("STRLEN")
        .arg("key:__rand_int__")
        .query(&mut d)
        .unwrap();
    assert_eq!(len, 3, "redis-benchmark's default 3-byte value");
}

// ---------------------------------------------------------------------------
// The harness's own differential helper, on the simplest commands
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_commands_match_redis_via_both() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let (d, h) = both(
        &redis,
        &t,
        &[
            &["SET", "x", "1"],
            &["GET", "x"],
            &["GET", "nosuch"],
            &["PING"],
            &["NOSUCHCMD", "x"],
        ],
    )
    .await;
    assert_eq!(show(&h), show(&d));
}
