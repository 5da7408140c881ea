//! The string commands tierd emulates on compressed keys, differentially
//! against Redis on the plain value.
//!
//! A rule compresses `c:*` in Redis (threshold 64 bytes). Each scenario
//! stores a value compressed under a `c:` key (the framed bytes, written
//! directly to Redis) and the same value plain under a `p:` key (no rule),
//! runs a command through tierd on the first and directly on the second,
//! and wants byte-identical replies, in RESP2 and RESP3, errors included.
//! After a write, the `c:` key must decode to what Redis computed on the
//! `p:` key, with its TTL kept, and no temporary copy may be left behind.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::exchange::text;
use support::l1::{l1_config, rule, wait_until_caching};
use support::{Raw, RedisServer, Tierd};
use tierd::cache::compress::{self, Decoded, MAGIC};
use tierd::config::{CompressConfig, TrackingMode};

const MAX: usize = 1 << 20;

async fn start(redis: &RedisServer) -> Tierd {
    let mut compressed = rule("compressed", "c:*", Duration::from_secs(3600));
    compressed.compress = Some(CompressConfig {
        threshold: 64,
        upstream: true,
    });
    Tierd::start_with(l1_config(&redis.url(), TrackingMode::Off, vec![compressed])).await
}

/// A JSON document of about `len` bytes with repeated field names: lz4
/// halves it easily.
fn json(len: usize) -> Vec<u8> {
    let mut out = String::from("[");
    let mut i = 0;
    while out.len() < len {
        out.push_str(&format!(
            "{{\"id\":{i},\"name\":\"user {i}\",\"role\":\"teacher\",\"active\":true}},"
        ));
        i += 1;
    }
    out.push(']');
    out.into_bytes()
}

fn framed(value: &[u8]) -> Vec<u8> {
    let f = compress::compress(value, MAX).expect("the test value compresses");
    assert!(f.starts_with(&MAGIC));
    f
}

async fn cmd(raw: &mut Raw, args: &[&[u8]]) -> Bytes {
    raw.send_cmd(args).await;
    raw.frame().await
}

fn bulk_payload(frame: &[u8]) -> Option<Vec<u8>> {
    tierd::protocol::inspect::string_payload(frame)
        .filter(|_| frame.first() == Some(&b'$'))
        .map(<[u8]>::to_vec)
}

/// One scenario's connections: `t` through tierd, `d` directly to Redis
/// (both in the same protocol), `admin` directly, RESP2, for setup and
/// checks.
struct Bench {
    t: Raw,
    d: Raw,
    admin: Raw,
}

impl Bench {
    async fn new(redis: &RedisServer, tierd: &Tierd, resp3: bool) -> Bench {
        let mut b = Bench {
            t: tierd.raw().await,
            d: Raw::connect(redis.addr()).await,
            admin: Raw::connect(redis.addr()).await,
        };
        if resp3 {
            for c in [&mut b.t, &mut b.d] {
                let r = c.cmd(&["HELLO", "3"]).await;
                assert_eq!(r[0], b'%', "{}", text(&r));
            }
        }
        b
    }

    /// `c:{name}` holds `value` compressed and `p:{name}` holds it plain,
    /// both with the same TTL.
    async fn put(&mut self, name: &str, value: &[u8]) {
        let c = format!("c:{name}");
        let p = format!("p:{name}");
        let stored = compress::compress(value, MAX).unwrap_or_else(|| value.to_vec());
        for (k, v) in [(&c, &stored[..]), (&p, value)] {
            let r = cmd(
                &mut self.admin,
                &[b"SET", k.as_bytes(), v, b"PX", b"600000"],
            )
            .await;
            assert_eq!(&r[..], b"+OK\r\n");
        }
    }

    /// Runs `args` (with `{k}`, `{k2}` standing for the keys `name`,
    /// `name2`) through tierd on the `c:` keys and directly on the `p:`
    /// keys, and wants the same bytes. Returns the reply.
    async fn same(&mut self, args: &[&[u8]], names: &[&str]) -> Bytes {
        let subst = |prefix: &str| -> Vec<Vec<u8>> {
            args.iter()
                .map(|a| match *a {
                    b"{k}" => format!("{prefix}{}", names[0]).into_bytes(),
                    b"{k2}" => format!("{prefix}{}", names[1]).into_bytes(),
                    other => other.to_vec(),
                })
                .collect()
        };
        let via: Vec<Vec<u8>> = subst("c:");
        let plain: Vec<Vec<u8>> = subst("p:");
        let via_refs: Vec<&[u8]> = via.iter().map(|a| &a[..]).collect();
        let plain_refs: Vec<&[u8]> = plain.iter().map(|a| &a[..]).collect();
        let got = cmd(&mut self.t, &via_refs).await;
        let want = cmd(&mut self.d, &plain_refs).await;
        assert_eq!(
            text(&got),
            text(&want),
            "{:?}",
            String::from_utf8_lossy(&args.join(&b' '))
        );
        got
    }

    /// The value of `c:{name}` as a client would read it: decoded.
    async fn decoded(&mut self, name: &str) -> Option<Vec<u8>> {
        let r = cmd(&mut self.admin, &[b"GET", format!("c:{name}").as_bytes()]).await;
        let stored = bulk_payload(&r)?;
        Some(compress::decode(&stored, MAX).unwrap().into_vec())
    }

    async fn raw_value(&mut self, key: &str) -> Option<Vec<u8>> {
        let r = cmd(&mut self.admin, &[b"GET", key.as_bytes()]).await;
        bulk_payload(&r)
    }

    /// `c:{name}` decodes to what `p:{name}` holds, and both still expire.
    async fn check_value(&mut self, name: &str) {
        let plain = self.raw_value(&format!("p:{name}")).await;
        assert_eq!(self.decoded(name).await, plain, "value of c:{name}");
        for k in [format!("c:{name}"), format!("p:{name}")] {
            let r = cmd(&mut self.admin, &[b"PTTL", k.as_bytes()]).await;
            let ttl: i64 = text(&r)[1..].trim().parse().unwrap();
            let exists = plain.is_some();
            assert!(!exists || ttl > 0, "TTL of {k} kept: {ttl}");
        }
    }

    async fn no_temporaries(&mut self) {
        let r = cmd(&mut self.admin, &[b"KEYS", b"tierd:tmp:*"]).await;
        assert_eq!(text(&r), "*0\r\n", "temporary copies left behind");
    }
}

/// Every emulated read, on a compressed value, in `resp3` or not.
async fn reads(redis: &RedisServer, tierd: &Tierd, resp3: bool) {
    let mut b = Bench::new(redis, tierd, resp3).await;
    let doc = json(600);
    b.put("r", &doc).await;
    b.put("r2", &json(400)).await;
    let cases: &[&[&[u8]]] = &[
        &[b"STRLEN", b"{k}"],
        &[b"strlen", b"{k}", b"extra"],
        &[b"GETRANGE", b"{k}", b"0", b"-1"],
        &[b"GETRANGE", b"{k}", b"10", b"40"],
        &[b"GETRANGE", b"{k}", b"-20", b"-5"],
        &[b"GETRANGE", b"{k}", b"5000", b"6000"],
        &[b"GETRANGE", b"{k}", b"0"],
        &[b"GETRANGE", b"{k}", b"a", b"1"],
        &[b"SUBSTR", b"{k}", b"3", b"17"],
        &[b"GETBIT", b"{k}", b"9"],
        &[b"GETBIT", b"{k}", b"100000"],
        &[b"GETBIT", b"{k}", b"-1"],
        &[b"BITCOUNT", b"{k}"],
        &[b"BITCOUNT", b"{k}", b"1", b"20"],
        &[b"BITCOUNT", b"{k}", b"5", b"300", b"BIT"],
        &[b"BITCOUNT", b"{k}", b"1", b"2", b"BYTE"],
        &[b"BITCOUNT", b"{k}", b"1"],
        &[b"BITCOUNT", b"{k}", b"1", b"2", b"WORD"],
        &[b"BITPOS", b"{k}", b"1"],
        &[b"BITPOS", b"{k}", b"0", b"3"],
        &[b"BITPOS", b"{k}", b"1", b"2", b"-1", b"BYTE"],
        &[b"BITPOS", b"{k}", b"0", b"7", b"90", b"BIT"],
        &[b"BITPOS", b"{k}", b"2"],
        &[
            b"BITFIELD_RO",
            b"{k}",
            b"GET",
            b"u8",
            b"0",
            b"GET",
            b"i16",
            b"#3",
        ],
        &[b"BITFIELD_RO", b"{k}", b"GET", b"u99", b"0"],
        &[b"BITFIELD_RO", b"{k}", b"SET", b"u8", b"0", b"1"],
        &[b"DUMP", b"{k}"],
    ];
    for case in cases {
        b.same(case, &["r"]).await;
    }
    let lcs: &[&[&[u8]]] = &[
        &[b"LCS", b"{k}", b"{k2}"],
        &[b"LCS", b"{k}", b"{k2}", b"LEN"],
        &[b"LCS", b"{k}", b"{k2}", b"IDX"],
        &[
            b"LCS",
            b"{k}",
            b"{k2}",
            b"IDX",
            b"MINMATCHLEN",
            b"8",
            b"WITHMATCHLEN",
        ],
        &[b"LCS", b"{k}", b"{k2}", b"IDX", b"LEN"],
        &[b"LCS", b"{k}", b"{k2}", b"BOGUS"],
    ];
    for case in lcs {
        b.same(case, &["r", "r2"]).await;
        b.same(case, &["r", "r"]).await;
        b.same(case, &["r", "missing"]).await;
    }
    // One compressed key, the other plain (no rule): through tierd
    // `LCS c:r p:r2` against `LCS p:r p:r2` directly.
    let got = cmd(
        &mut b.t,
        &[b"LCS", b"c:r", b"p:r2", b"IDX", b"WITHMATCHLEN"],
    )
    .await;
    let want = cmd(
        &mut b.d,
        &[b"LCS", b"p:r", b"p:r2", b"IDX", b"WITHMATCHLEN"],
    )
    .await;
    assert_eq!(text(&got), text(&want));
    // Reads change nothing.
    b.check_value("r").await;
    assert!(b.raw_value("c:r").await.unwrap().starts_with(&MAGIC));
    b.no_temporaries().await;
}

#[tokio::test]
async fn reads_answer_as_redis_does_on_the_plain_value() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    reads(&redis, &tierd, false).await;
    reads(&redis, &tierd, true).await;
}

/// Every emulated write, each on a fresh compressed value.
async fn writes(redis: &RedisServer, tierd: &Tierd, resp3: bool) {
    let mut b = Bench::new(redis, tierd, resp3).await;
    let doc = json(600);
    let cases: &[&[&[u8]]] = &[
        &[b"APPEND", b"{k}", b"tail"],
        &[b"SETRANGE", b"{k}", b"5", b"XYZ"],
        &[b"SETRANGE", b"{k}", b"2000", b"far"],
        &[b"SETRANGE", b"{k}", b"0", b""],
        &[b"SETRANGE", b"{k}", b"536870912", b"x"],
        &[b"SETRANGE", b"{k}", b"-1", b"x"],
        &[b"SETBIT", b"{k}", b"7", b"1"],
        &[b"SETBIT", b"{k}", b"1", b"1"],
        &[b"SETBIT", b"{k}", b"100000", b"1"],
        &[b"SETBIT", b"{k}", b"7", b"2"],
        &[
            b"BITFIELD",
            b"{k}",
            b"SET",
            b"u8",
            b"0",
            b"65",
            b"GET",
            b"u8",
            b"0",
        ],
        &[b"BITFIELD", b"{k}", b"INCRBY", b"u8", b"0", b"200"],
        &[
            b"BITFIELD",
            b"{k}",
            b"OVERFLOW",
            b"FAIL",
            b"INCRBY",
            b"u8",
            b"0",
            b"200",
        ],
        &[
            b"BITFIELD",
            b"{k}",
            b"OVERFLOW",
            b"SAT",
            b"INCRBY",
            b"i8",
            b"#1",
            b"-300",
        ],
        &[b"BITFIELD", b"{k}", b"GET", b"u8", b"0"],
        &[b"BITFIELD", b"{k}", b"INCRBY", b"u65", b"0", b"1"],
        &[b"INCR", b"{k}"],
        &[b"DECR", b"{k}"],
        &[b"INCRBY", b"{k}", b"5"],
        &[b"DECRBY", b"{k}", b"x"],
        &[b"INCRBYFLOAT", b"{k}", b"1.5"],
        &[b"APPEND", b"{k}"],
    ];
    for case in cases {
        b.put("w", &doc).await;
        b.same(case, &["w"]).await;
        b.check_value("w").await;
    }
    // Numbers stored compressed: long zero-padded ones are valid floats but
    // not integers, and the result is short enough to be stored plain.
    let mut number = vec![b'0'; 80];
    number.extend_from_slice(b"1.25");
    for case in [
        &[&b"INCRBYFLOAT"[..], b"{k}", b"2"][..],
        &[b"INCR", b"{k}"],
        &[b"INCRBYFLOAT", b"{k}", b"1e400"],
    ] {
        b.put("n", &number).await;
        assert!(b.raw_value("c:n").await.unwrap().starts_with(&MAGIC));
        b.same(case, &["n"]).await;
        b.check_value("n").await;
    }
    b.put("n", &number).await;
    b.same(&[b"INCRBYFLOAT", b"{k}", b"1"], &["n"]).await;
    assert_eq!(b.raw_value("c:n").await.unwrap(), b"2.25", "stored plain");
    // A value that grows stays compressed; one that was plain (missing,
    // small) is left to Redis and stays plain.
    b.put("g", &doc).await;
    let big = json(2000);
    b.same(&[b"APPEND", b"{k}", &big], &["g"]).await;
    let stored = b.raw_value("c:g").await.unwrap();
    assert!(stored.starts_with(&MAGIC) && stored.len() < 1500);
    b.check_value("g").await;
    for name in ["missing1", "missing2"] {
        for k in [format!("c:{name}"), format!("p:{name}")] {
            cmd(&mut b.admin, &[b"DEL", k.as_bytes()]).await;
        }
    }
    b.same(&[b"INCR", b"{k}"], &["missing1"]).await;
    b.same(&[b"SETRANGE", b"{k}", b"3", b"abc"], &["missing2"])
        .await;
    b.same(&[b"APPEND", b"{k}", b"more"], &["missing2"]).await;
    assert_eq!(b.raw_value("c:missing2").await.unwrap(), b"\0\0\0abcmore");
    b.put("small", b"12").await;
    b.same(&[b"INCRBY", b"{k}", b"40"], &["small"]).await;
    b.same(&[b"APPEND", b"{k}", b"x"], &["small"]).await;
    b.same(&[b"INCR", b"{k}"], &["small"]).await;
    assert_eq!(b.raw_value("c:small").await.unwrap(), b"52x");
    // Not a string: Redis's own error.
    for k in ["c:list", "p:list"] {
        cmd(&mut b.admin, &[b"DEL", k.as_bytes()]).await;
        cmd(&mut b.admin, &[b"RPUSH", k.as_bytes(), b"a"]).await;
    }
    b.same(&[b"APPEND", b"{k}", b"x"], &["list"]).await;
    b.same(&[b"STRLEN", b"{k}"], &["list"]).await;
    b.same(&[b"GETRANGE", b"{k}", b"0", b"1"], &["list"]).await;
    b.same(&[b"LCS", b"{k}", b"{k2}"], &["list", "g"]).await;
    b.no_temporaries().await;
}

#[tokio::test]
async fn writes_store_what_redis_computes_on_the_plain_value() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    writes(&redis, &tierd, false).await;
    writes(&redis, &tierd, true).await;
}

#[tokio::test]
async fn corrupt_values_are_errors_naming_the_key() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut admin = Raw::connect(redis.addr()).await;
    let mut t = tierd.raw().await;
    let mut bad = framed(&json(300));
    let len = bad.len();
    bad.truncate(len - 10);
    cmd(&mut admin, &[b"SET", b"c:bad", &bad]).await;
    for args in [
        &[&b"STRLEN"[..], b"c:bad"][..],
        &[b"GETRANGE", b"c:bad", b"0", b"3"],
        &[b"APPEND", b"c:bad", b"x"],
        &[b"INCR", b"c:bad"],
        &[b"LCS", b"c:ok", b"c:bad"],
    ] {
        let r = text(&cmd(&mut t, args).await);
        assert!(
            r.starts_with("-ERR tierd: compressed value is corrupt (") && r.contains("'c:bad'"),
            "{r}"
        );
    }
    // Nothing was written, and the connection goes on.
    let after = cmd(&mut admin, &[b"GET", b"c:bad"]).await;
    assert_eq!(bulk_payload(&after).unwrap(), bad);
    assert_eq!(&t.cmd(&["PING"]).await[..], b"+PONG\r\n");
    // A value that only starts with the magic is data.
    let mut odd = MAGIC.to_vec();
    odd.extend_from_slice(b"\x09zz");
    cmd(&mut admin, &[b"SET", b"c:odd", &odd]).await;
    assert_eq!(&cmd(&mut t, &[b"STRLEN", b"c:odd"]).await[..], b":7\r\n");
}

#[tokio::test]
async fn transactions_watch_and_dbs() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut admin = Raw::connect(redis.addr()).await;
    let doc = json(500);
    let stored = framed(&doc);

    // Queued inside MULTI: refused, and the transaction with it.
    let mut t = tierd.raw().await;
    cmd(&mut admin, &[b"SET", b"c:m", &stored]).await;
    assert_eq!(&t.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    let r = text(&t.cmd(&["STRLEN", "c:m"]).await);
    assert_eq!(
        r,
        "-ERR tierd: STRLEN on 'c:m' inside MULTI is not supported: its rule compresses values\r\n"
    );
    assert!(text(&t.cmd(&["EXEC"]).await).starts_with("-EXECABORT"));

    // A client WATCHing the key it then modifies: its EXEC fails, as it
    // would on Redis; reads while watching work and do not end the watch.
    let mut d = Raw::connect(redis.addr()).await;
    cmd(&mut admin, &[b"SET", b"p:m", &doc]).await;
    for (c, k) in [(&mut t, "c:m"), (&mut d, "p:m")] {
        assert_eq!(&c.cmd(&["WATCH", k]).await[..], b"+OK\r\n");
        assert_eq!(
            text(&c.cmd(&["STRLEN", k]).await),
            format!(":{}\r\n", doc.len())
        );
        assert_eq!(
            text(&c.cmd(&["APPEND", k, "!"]).await),
            format!(":{}\r\n", doc.len() + 1)
        );
        assert_eq!(&c.cmd(&["MULTI"]).await[..], b"+OK\r\n");
        assert_eq!(&c.cmd(&["GET", "x"]).await[..], b"+QUEUED\r\n");
        assert_eq!(&c.cmd(&["EXEC"]).await[..], b"*-1\r\n", "{k}");
    }
    // Watching another key: the emulated write does not disturb the watch.
    assert_eq!(&t.cmd(&["WATCH", "c:other"]).await[..], b"+OK\r\n");
    t.cmd(&["APPEND", "c:m", "?"]).await;
    assert_eq!(&t.cmd(&["MULTI"]).await[..], b"+OK\r\n");
    t.cmd(&["GET", "x"]).await;
    assert_eq!(&t.cmd(&["EXEC"]).await[..], b"*1\r\n$-1\r\n");
    let mut want = doc.clone();
    want.extend_from_slice(b"!?");
    let now = cmd(&mut admin, &[b"GET", b"c:m"]).await;
    let now = bulk_payload(&now).unwrap();
    assert_eq!(compress::decode(&now, MAX).unwrap().as_bytes(), &want[..]);

    // In another db, on the client's db.
    assert_eq!(&t.cmd(&["SELECT", "3"]).await[..], b"+OK\r\n");
    cmd(&mut admin, &[b"SELECT", b"3"]).await;
    cmd(&mut admin, &[b"SET", b"c:db", &stored]).await;
    assert_eq!(
        text(&t.cmd(&["APPEND", "c:db", "x"]).await),
        format!(":{}\r\n", doc.len() + 1)
    );
    let tail = String::from_utf8_lossy(&doc[doc.len() - 2..]).into_owned();
    assert_eq!(
        text(&t.cmd(&["GETRANGE", "c:db", "-3", "-1"]).await),
        format!("$3\r\n{tail}x\r\n")
    );
    let now = cmd(&mut admin, &[b"GET", b"c:db"]).await;
    let decoded = compress::decode(&bulk_payload(&now).unwrap(), MAX)
        .unwrap()
        .into_vec();
    assert_eq!(decoded.len(), doc.len() + 1);
    cmd(&mut admin, &[b"SELECT", b"0"]).await;
    assert_eq!(
        text(&cmd(&mut admin, &[b"EXISTS", b"c:db"]).await),
        ":0\r\n"
    );
}

#[tokio::test]
async fn concurrent_appends_are_not_lost() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut admin = Raw::connect(redis.addr()).await;
    let doc = json(500);
    cmd(&mut admin, &[b"SET", b"c:hot", &framed(&doc)]).await;
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut t = tierd.raw().await;
        tasks.push(tokio::spawn(async move {
            let mut done = 0usize;
            for _ in 0..25 {
                let r = text(&t.cmd(&["APPEND", "c:hot", "x"]).await);
                if r.starts_with(':') {
                    done += 1;
                } else {
                    assert!(r.contains("too much contention"), "{r}");
                }
            }
            done
        }));
    }
    let mut done = 0;
    for t in tasks {
        done += t.await.unwrap();
    }
    assert!(done >= 90, "{done} of 100 appends went through");
    let now = cmd(&mut admin, &[b"GET", b"c:hot"]).await;
    let stored = bulk_payload(&now).unwrap();
    assert!(stored.starts_with(&MAGIC));
    match compress::decode(&stored, MAX).unwrap() {
        Decoded::Compressed(v) => assert_eq!(v.len(), doc.len() + done),
        Decoded::Plain(_) => panic!("stored plain"),
    }
}

#[tokio::test]
async fn emulated_writes_invalidate_l1() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    wait_until_caching(&tierd, "compressed", "c:warm").await;
    let mut admin = Raw::connect(redis.addr()).await;
    let mut t = tierd.raw().await;
    let doc = json(500);
    cmd(&mut admin, &[b"SET", b"c:l1", &framed(&doc)]).await;
    for _ in 0..2 {
        let got = cmd(&mut t, &[b"GET", b"c:l1"]).await;
        assert_eq!(bulk_payload(&got).unwrap(), doc);
    }
    assert_eq!(
        text(&t.cmd(&["APPEND", "c:l1", "!"]).await),
        format!(":{}\r\n", doc.len() + 1)
    );
    let got = cmd(&mut t, &[b"GET", b"c:l1"]).await;
    let mut want = doc.clone();
    want.push(b'!');
    assert_eq!(bulk_payload(&got).unwrap(), want);
}
