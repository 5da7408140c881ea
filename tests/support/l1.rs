//! Helpers for the L1 and coherence tests: rule and config builders, a small
//! RESP decoder written here (so that assertions do not depend on tierd's own
//! reply code), readers for `CACHE.STATS` and Redis's `INFO commandstats`,
//! and [`L1Probe`], which reads through tierd and says whether the read was
//! an L1 hit or a miss by comparing the rule's counters before and after.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tierd::cache::glob::Glob;
use tierd::config::{Config, RuleConfig, TrackingMode};

use super::exchange::text;
use super::probe::{all_clients, client_field};
use super::{config_for, Raw, RedisServer, Tierd};

pub const HOUR: Duration = Duration::from_secs(3600);

/// A caching rule: `cache = true`, `negative = true` (the file default), no
/// cap of its own, no stampede protection and no refresh-ahead.
pub fn rule(name: &str, pattern: &str, ttl: Duration) -> RuleConfig {
    RuleConfig {
        name: name.to_owned(),
        pattern: Glob::new(pattern).unwrap(),
        ttl,
        max_memory: None,
        cache: true,
        negative: true,
        tags: Vec::new(),
        compress: None,
        stampede: None,
        refresh_ahead: None,
        stale_ttl: None,
        write: tierd::config::WriteStrategy::Invalidate,
        warm: None,
    }
}

/// A `cache = false` rule, which keeps matching keys out of L1.
pub fn no_cache_rule(name: &str, pattern: &str) -> RuleConfig {
    RuleConfig {
        name: name.to_owned(),
        pattern: Glob::new(pattern).unwrap(),
        ttl: Duration::ZERO,
        max_memory: None,
        cache: false,
        negative: false,
        tags: Vec::new(),
        compress: None,
        stampede: None,
        refresh_ahead: None,
        stale_ttl: None,
        write: tierd::config::WriteStrategy::Invalidate,
        warm: None,
    }
}

/// The default configuration for `upstream`, with `tracking` and `rules`.
pub fn l1_config(upstream: &str, tracking: TrackingMode, rules: Vec<RuleConfig>) -> Config {
    let mut config = config_for(upstream);
    config.invalidation.tracking = tracking;
    config.rules = rules;
    config
}

// ---------------------------------------------------------------------------
// RESP decoding
// ---------------------------------------------------------------------------

/// A decoded RESP2/RESP3 reply.
#[derive(Debug, Clone, PartialEq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Int(i64),
    /// `$-1` is `Bulk(None)`.
    Bulk(Option<Vec<u8>>),
    /// `*-1` is `Array(None)`.
    Array(Option<Vec<Resp>>),
    /// RESP3 `_`.
    Null,
    /// RESP3 `,`: the text as sent, to compare exactly.
    Double(String),
    Bool(bool),
    BigNumber(String),
    Verbatim(Vec<u8>),
    Map(Vec<(Resp, Resp)>),
    Set(Vec<Resp>),
    Push(Vec<Resp>),
}

impl Resp {
    pub fn as_text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) | Resp::Double(s) | Resp::BigNumber(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) | Resp::Verbatim(b) => Some(String::from_utf8_lossy(b).into()),
            Resp::Int(i) => Some(i.to_string()),
            _ => None,
        }
    }

    pub fn as_int(&self) -> Option<i64> {
        match self {
            Resp::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn elements(&self) -> Option<&[Resp]> {
        match self {
            Resp::Array(Some(v)) | Resp::Set(v) | Resp::Push(v) => Some(v),
            _ => None,
        }
    }

    pub fn is_nil(&self) -> bool {
        matches!(self, Resp::Null | Resp::Bulk(None) | Resp::Array(None))
    }
}

/// Decodes one complete frame; panics (naming the frame) when it is not one.
pub fn decode(frame: &[u8]) -> Resp {
    let (value, used) = decode_at(frame, 0)
        .unwrap_or_else(|| panic!("not a complete RESP frame: {:?}", text(frame)));
    assert_eq!(
        used,
        frame.len(),
        "trailing bytes after a RESP frame: {:?}",
        text(frame)
    );
    value
}

fn line(buf: &[u8], at: usize) -> Option<(&[u8], usize)> {
    let rest = buf.get(at..)?;
    let end = rest.windows(2).position(|w| w == b"\r\n")?;
    Some((&rest[..end], at + end + 2))
}

fn number(bytes: &[u8]) -> Option<i64> {
    std::str::from_utf8(bytes).ok()?.parse().ok()
}

fn decode_at(buf: &[u8], at: usize) -> Option<(Resp, usize)> {
    let kind = *buf.get(at)?;
    let (head, next) = line(buf, at + 1)?;
    let head_text = || String::from_utf8_lossy(head).into_owned();
    let aggregate = |n: i64, mut at: usize| -> Option<(Vec<Resp>, usize)> {
        let mut out = Vec::new();
        for _ in 0..n {
            let (v, n) = decode_at(buf, at)?;
            out.push(v);
            at = n;
        }
        Some((out, at))
    };
    let blob = |len: i64| -> Option<(Vec<u8>, usize)> {
        let len = usize::try_from(len).ok()?;
        let body = buf.get(next..next + len)?;
        (buf.get(next + len..next + len + 2)? == b"\r\n").then(|| (body.to_vec(), next + len + 2))
    };
    Some(match kind {
        b'+' => (Resp::Simple(head_text()), next),
        b'-' => (Resp::Error(head_text()), next),
        b':' => (Resp::Int(number(head)?), next),
        b'_' => (Resp::Null, next),
        b',' => (Resp::Double(head_text()), next),
        b'#' => (Resp::Bool(head == b"t"), next),
        b'(' => (Resp::BigNumber(head_text()), next),
        b'$' => match number(head)? {
            -1 => (Resp::Bulk(None), next),
            n => {
                let (b, end) = blob(n)?;
                (Resp::Bulk(Some(b)), end)
            }
        },
        b'=' => {
            let (b, end) = blob(number(head)?)?;
            (Resp::Verbatim(b.get(4..)?.to_vec()), end)
        }
        b'!' => {
            let (b, end) = blob(number(head)?)?;
            (Resp::Error(String::from_utf8_lossy(&b).into()), end)
        }
        b'*' => match number(head)? {
            -1 => (Resp::Array(None), next),
            n => {
                let (v, end) = aggregate(n, next)?;
                (Resp::Array(Some(v)), end)
            }
        },
        b'~' => {
            let (v, end) = aggregate(number(head)?, next)?;
            (Resp::Set(v), end)
        }
        b'>' => {
            let (v, end) = aggregate(number(head)?, next)?;
            (Resp::Push(v), end)
        }
        b'%' => {
            let (v, end) = aggregate(2 * number(head)?, next)?;
            let mut pairs = Vec::new();
            let mut it = v.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                pairs.push((k, v));
            }
            (Resp::Map(pairs), end)
        }
        b'|' => {
            // An attribute precedes the real reply; skip it.
            let (_, end) = aggregate(2 * number(head)?, next)?;
            decode_at(buf, end)?
        }
        _ => return None,
    })
}

// ---------------------------------------------------------------------------
// CACHE.STATS
// ---------------------------------------------------------------------------

/// The field names of one rule's `CACHE.STATS` element, in order.
pub const STATS_FIELDS: [&str; 15] = [
    "rule",
    "hits",
    "misses",
    "hit_rate",
    "entries",
    "bytes",
    "evictions",
    "invalidations",
    "coalesced",
    "lease_grants",
    "lease_waits",
    "lease_wakeups",
    "lease_timeouts",
    "refreshes",
    "stale_serves",
];

/// One rule's `CACHE.STATS` element.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleStats {
    pub rule: String,
    pub hits: u64,
    pub misses: u64,
    /// As sent: a bulk string such as `0.7500` in RESP2, a double in RESP3.
    pub hit_rate: String,
    pub entries: u64,
    pub bytes: u64,
    pub evictions: u64,
    pub invalidations: u64,
    /// Reads answered by joining an identical read already in flight.
    pub coalesced: u64,
    /// Leases taken: reads whose client was made the loader.
    pub lease_grants: u64,
    /// Reads that waited for another client's load.
    pub lease_waits: u64,
    /// Waits that ended with the loaded value.
    pub lease_wakeups: u64,
    /// Waits that ended at the rule's `wait`.
    pub lease_timeouts: u64,
    /// Background refresh-ahead reads sent upstream.
    pub refreshes: u64,
    pub stale_serves: u64,
}

impl RuleStats {
    /// Parses one element: a flat field/value array (RESP2) or a map
    /// (RESP3). Panics when a field is missing, misplaced or mistyped.
    pub fn from_resp(element: &Resp) -> RuleStats {
        let pairs: Vec<(Resp, Resp)> = match element {
            Resp::Map(pairs) => pairs.clone(),
            Resp::Array(Some(flat)) => {
                assert!(flat.len() % 2 == 0, "odd field/value array: {element:?}");
                flat.chunks(2)
                    .map(|c| (c[0].clone(), c[1].clone()))
                    .collect()
            }
            other => panic!("a CACHE.STATS element must be an array or a map, got {other:?}"),
        };
        let names: Vec<String> = pairs
            .iter()
            .map(|(k, _)| k.as_text().unwrap_or_default())
            .collect();
        assert_eq!(names, STATS_FIELDS, "CACHE.STATS fields in {element:?}");
        let int = |i: usize| -> u64 {
            let v = pairs[i].1.as_int().unwrap_or_else(|| {
                panic!(
                    "{} must be an integer, got {:?}",
                    STATS_FIELDS[i], pairs[i].1
                )
            });
            u64::try_from(v).unwrap()
        };
        RuleStats {
            rule: pairs[0].1.as_text().unwrap(),
            hits: int(1),
            misses: int(2),
            hit_rate: pairs[3].1.as_text().unwrap(),
            entries: int(4),
            bytes: int(5),
            evictions: int(6),
            invalidations: int(7),
            coalesced: int(8),
            lease_grants: int(9),
            lease_waits: int(10),
            lease_wakeups: int(11),
            lease_timeouts: int(12),
            refreshes: int(13),
            stale_serves: int(14),
        }
    }
}

/// `CACHE.STATS` on `raw`, one entry per rule.
pub async fn all_stats(raw: &mut Raw) -> Vec<RuleStats> {
    let frame = raw.cmd(&["CACHE.STATS"]).await;
    match decode(&frame) {
        Resp::Array(Some(rules)) => rules.iter().map(RuleStats::from_resp).collect(),
        other => panic!("CACHE.STATS must answer an array, got {other:?}"),
    }
}

/// `CACHE.STATS <rule>` on `raw`.
pub async fn rule_stats(raw: &mut Raw, rule: &str) -> RuleStats {
    let frame = raw.cmd(&["CACHE.STATS", rule]).await;
    RuleStats::from_resp(&decode(&frame))
}

// ---------------------------------------------------------------------------
// Redis's side
// ---------------------------------------------------------------------------

/// Redis's own count of calls per command (`calls + rejected_calls` from
/// `INFO commandstats`), keyed by lowercase name (`get`, `xinfo|groups`).
pub async fn commandstats(direct: &mut Raw) -> HashMap<String, u64> {
    let reply = direct.cmd(&["INFO", "commandstats"]).await;
    // A bulk string in RESP2, a verbatim string in RESP3.
    let info = decode(&reply)
        .as_text()
        .unwrap_or_else(|| panic!("INFO commandstats: {}", text(&reply)));
    let mut out = HashMap::new();
    for l in info.lines() {
        let Some(rest) = l.strip_prefix("cmdstat_") else {
            continue;
        };
        let Some((name, fields)) = rest.split_once(':') else {
            continue;
        };
        let mut calls = 0;
        for kv in fields.split(',') {
            if let Some(("calls" | "rejected_calls", v)) = kv.split_once('=') {
                calls += v.trim().parse::<u64>().unwrap();
            }
        }
        out.insert(name.to_owned(), calls);
    }
    out
}

/// How many times Redis ran `cmd` (lowercase), 0 if never.
pub async fn upstream_calls(direct: &mut Raw, cmd: &str) -> u64 {
    commandstats(direct).await.get(cmd).copied().unwrap_or(0)
}

/// The Redis client ids of connections named `name` (`CLIENT LIST`).
pub async fn clients_named(direct: &mut Raw, name: &str) -> Vec<u64> {
    all_clients(direct)
        .await
        .iter()
        .filter(|l| client_field(l, "name") == Some(name))
        .map(|l| client_field(l, "id").unwrap().parse().unwrap())
        .collect()
}

/// A direct raw connection to `redis`.
pub async fn direct(redis: &RedisServer) -> Raw {
    Raw::connect(redis.addr()).await
}

/// Runs `args` directly and asserts the reply is not an error.
pub async fn must(raw: &mut Raw, args: &[&str]) -> Bytes {
    let reply = raw.cmd(args).await;
    assert!(
        !reply.starts_with(b"-"),
        "{args:?} failed on Redis: {}",
        text(&reply)
    );
    reply
}

// ---------------------------------------------------------------------------
// Reads that know whether they hit
// ---------------------------------------------------------------------------

/// What one read through tierd did to its rule's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// `hits` went up by one.
    Hit,
    /// `misses` went up by one.
    Miss,
    /// Neither moved: the read was not an L1 lookup.
    Uncounted,
    /// Something else moved (several lookups, or another client's).
    Other { hits: u64, misses: u64 },
}

/// A reader through tierd with a second connection for `CACHE.STATS` and a
/// direct connection to Redis for the reference reply.
pub struct L1Probe {
    pub tierd: Raw,
    pub stats: Raw,
    pub direct: Raw,
    pub rule: String,
}

impl L1Probe {
    pub async fn new(redis: &RedisServer, tierd: &Tierd, rule: &str) -> L1Probe {
        L1Probe {
            tierd: tierd.raw().await,
            stats: tierd.raw().await,
            direct: direct(redis).await,
            rule: rule.to_owned(),
        }
    }

    /// Switches the tierd reader and the direct connection to RESP3.
    pub async fn resp3(&mut self) {
        let t = self.tierd.cmd(&["HELLO", "3"]).await;
        let d = self.direct.cmd(&["HELLO", "3"]).await;
        assert_eq!((t[0], d[0]), (b'%', b'%'), "HELLO 3: {}", text(&t));
    }

    pub async fn stats(&mut self) -> RuleStats {
        rule_stats(&mut self.stats, &self.rule).await
    }

    /// Reads `args` through tierd; says whether it was a hit.
    pub async fn read(&mut self, args: &[&str]) -> (Bytes, Outcome) {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.read_bytes(&args).await
    }

    pub async fn read_bytes(&mut self, args: &[&[u8]]) -> (Bytes, Outcome) {
        let before = self.stats().await;
        self.tierd.send_cmd(args).await;
        let reply = self.tierd.frame().await;
        let after = self.stats().await;
        let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
        let outcome = match (hits, misses) {
            (1, 0) => Outcome::Hit,
            (0, 1) => Outcome::Miss,
            (0, 0) => Outcome::Uncounted,
            (hits, misses) => Outcome::Other { hits, misses },
        };
        (reply, outcome)
    }

    /// The same command on Redis directly.
    pub async fn reference(&mut self, args: &[&str]) -> Bytes {
        self.direct.cmd(args).await
    }
}

/// Reads `key` (GET) through `tierd` until one read is an L1 hit of
/// `rule`: tierd caches only once it has read the upstream's command table
/// and, with tracking on, once its tracking link is up. Fails after 10 s.
pub async fn wait_until_caching(tierd: &Tierd, rule: &str, key: &str) {
    let mut reader = tierd.raw().await;
    let mut stats = tierd.raw().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let before = rule_stats(&mut stats, rule).await.hits;
        reader.cmd(&["GET", key]).await;
        if rule_stats(&mut stats, rule).await.hits > before {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "tierd did not start caching GET {key} within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Reads `key` through `probe` until the reply is `want`; fails if a read
/// that started more than `limit` after `since` still returned something
/// else. Returns how long after `since` the first good read started.
pub async fn poll_until(
    probe: &mut L1Probe,
    key: &str,
    want: &[u8],
    since: Instant,
    limit: Duration,
) -> Duration {
    loop {
        let started = since.elapsed();
        let (got, outcome) = probe.read(&["GET", key]).await;
        if got.as_ref() == want {
            return started;
        }
        assert!(
            started <= limit,
            "GET {key} through tierd still {:?} ({outcome:?}) {started:?} later; wanted {:?}",
            text(&got),
            text(want)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}
