//! tierd's glob matcher against the real thing: a redis-server holds a fixed
//! set of awkward keys, and for a few thousand generated patterns `KEYS
//! pattern` must return exactly the keys `redis_match` accepts. The patterns
//! lean on the corners where glob dialects differ: classes, negation,
//! reversed ranges, escapes inside and outside classes, unclosed brackets, a
//! trailing backslash, bytes above 0x7f and the empty key.

mod support;

use std::collections::BTreeSet;

use support::RedisServer;
use tierd::cache::glob::{redis_match, Glob};

/// Bytes keys are made of: the glob's own syntax, mixed case, and one byte
/// above 0x7f (Redis compares range ends as signed chars).
const KEY_BYTES: &[u8] = b"abcABC-[]\\*?^\xe9";
/// Bytes raw patterns are made of.
const PATTERN_BYTES: &[u8] = b"abcAB-[]\\*?^\xe9";
const KEYS: usize = 300;
const PATTERNS: usize = 2000;

/// xorshift64*: a fixed seed gives the same keys and patterns every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick(&mut self, from: &[u8]) -> u8 {
        from[self.below(from.len())]
    }
}

fn show(bytes: &[u8]) -> String {
    bytes
        .iter()
        .flat_map(|&b| std::ascii::escape_default(b))
        .map(char::from)
        .collect()
}

fn keys(rng: &mut Rng) -> Vec<Vec<u8>> {
    let mut keys = BTreeSet::new();
    // The empty key: stringmatchlen refuses it even for `**`, but `KEYS *`
    // returns it through its own shortcut.
    keys.insert(Vec::new());
    while keys.len() < KEYS {
        let len = 1 + rng.below(5);
        keys.insert((0..len).map(|_| rng.pick(KEY_BYTES)).collect());
    }
    keys.into_iter().collect()
}

/// A literal byte, escaped when the glob would read it as syntax (and now
/// and then when it would not, since `\a` is just `a`).
fn push_literal(rng: &mut Rng, out: &mut Vec<u8>, b: u8) {
    if b"*?[\\".contains(&b) || rng.chance(10) {
        out.push(b'\\');
    }
    out.push(b);
}

/// A `[…]` class; `open_end` may leave it unclosed (it is the last element).
fn push_class(rng: &mut Rng, out: &mut Vec<u8>, around: Option<u8>, open_end: bool) {
    out.push(b'[');
    if rng.chance(30) {
        out.push(b'^');
    }
    if let Some(b) = around {
        // Make sure a class built around a key byte can hold it.
        match rng.below(3) {
            0 => out.push(b),
            1 => out.extend_from_slice(&[b'\\', b]),
            _ => out.extend_from_slice(&[b.saturating_sub(1), b'-', b.saturating_add(1)]),
        }
    }
    for _ in 0..rng.below(3) {
        match rng.below(6) {
            0 | 1 => out.push(rng.pick(KEY_BYTES)),
            2 => out.extend_from_slice(&[b'\\', rng.pick(KEY_BYTES)]),
            // A range, as often reversed as not, with any ends at all.
            3 | 4 => {
                let (lo, hi) = (rng.pick(KEY_BYTES), rng.pick(KEY_BYTES));
                out.extend_from_slice(&[lo, b'-', hi]);
            }
            // `x-` right before the closing `]`: the `]` becomes the end.
            _ => out.extend_from_slice(&[rng.pick(KEY_BYTES), b'-']),
        }
    }
    if !(open_end && rng.chance(30)) {
        out.push(b']');
    }
}

/// A pattern from glob elements.
fn structured(rng: &mut Rng) -> Vec<u8> {
    let mut out = Vec::new();
    let elements = 1 + rng.below(5);
    for n in 0..elements {
        let last = n + 1 == elements;
        match rng.below(10) {
            0..=2 => {
                let b = rng.pick(KEY_BYTES);
                push_literal(rng, &mut out, b);
            }
            3 => out.push(b'?'),
            4 => out.extend_from_slice(if rng.chance(20) { b"**" } else { b"*" }),
            5..=7 => push_class(rng, &mut out, None, last),
            8 if last => out.push(b'\\'),
            _ => out.push(rng.pick(PATTERN_BYTES)),
        }
    }
    out
}

/// A pattern made from a key, so that a good share of patterns match
/// something: each byte kept, replaced by `?`, `*` or a class, or dropped.
fn from_key(rng: &mut Rng, key: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if rng.chance(15) {
        out.push(b'*');
    }
    for (n, &b) in key.iter().enumerate() {
        let last = n + 1 == key.len();
        match rng.below(20) {
            0..=9 => push_literal(rng, &mut out, b),
            10..=12 => out.push(b'?'),
            13 | 14 => out.push(b'*'),
            15..=18 => push_class(rng, &mut out, Some(b), last),
            _ => {}
        }
    }
    if rng.chance(15) {
        out.push(b'*');
    }
    out
}

fn patterns(rng: &mut Rng, keys: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut patterns = vec![b"*".to_vec(), b"**".to_vec(), Vec::new()];
    while patterns.len() < PATTERNS {
        let pattern = match rng.below(3) {
            0 => {
                let len = rng.below(8);
                (0..len).map(|_| rng.pick(PATTERN_BYTES)).collect()
            }
            1 => structured(rng),
            _ => {
                let key = &keys[rng.below(keys.len())];
                from_key(rng, key)
            }
        };
        patterns.push(pattern);
    }
    patterns
}

/// What KEYS returns for `pattern`: everything for exactly `*` (KEYS skips
/// matching then), otherwise the keys stringmatchlen accepts.
fn expected(pattern: &[u8], keys: &[Vec<u8>]) -> BTreeSet<Vec<u8>> {
    keys.iter()
        .filter(|k| pattern == b"*" || redis_match(pattern, k, false))
        .cloned()
        .collect()
}

fn insert_keys(con: &mut redis::Connection, keys: &[Vec<u8>]) {
    let mut pipe = redis::pipe();
    for key in keys {
        pipe.cmd("SET").arg(&key[..]).arg(1).ignore();
    }
    pipe.query::<()>(con).unwrap();
    let size: usize = redis::cmd("DBSIZE").query(con).unwrap();
    assert_eq!(size, keys.len());
}

/// `KEYS pattern` for every pattern, pipelined in batches.
fn keys_replies(con: &mut redis::Connection, patterns: &[Vec<u8>]) -> Vec<BTreeSet<Vec<u8>>> {
    let mut replies = Vec::with_capacity(patterns.len());
    for batch in patterns.chunks(250) {
        let mut pipe = redis::pipe();
        for pattern in batch {
            pipe.cmd("KEYS").arg(&pattern[..]);
        }
        let got: Vec<Vec<Vec<u8>>> = pipe.query(con).unwrap();
        replies.extend(got.into_iter().map(|keys| keys.into_iter().collect()));
    }
    replies
}

#[test]
fn redis_match_agrees_with_keys_on_generated_patterns() {
    let redis = RedisServer::start();
    let mut con = redis.direct();
    let mut rng = Rng(0x7431_6572_645f_676c);
    let keys = keys(&mut rng);
    insert_keys(&mut con, &keys);
    let patterns = patterns(&mut rng, &keys);
    let replies = keys_replies(&mut con, &patterns);

    let mut mismatches = Vec::new();
    let mut matching = 0;
    for (pattern, got) in patterns.iter().zip(&replies) {
        let want = expected(pattern, &keys);
        if !got.is_empty() {
            matching += 1;
        }
        if *got != want {
            let extra: Vec<String> = got.difference(&want).map(|k| show(k)).collect();
            let missing: Vec<String> = want.difference(got).map(|k| show(k)).collect();
            mismatches.push(format!(
                "KEYS {:?}: Redis also returns {extra:?}; Redis does not return {missing:?}",
                show(pattern)
            ));
        }
    }
    eprintln!(
        "{} patterns over {} keys; {matching} match at least one key",
        patterns.len(),
        keys.len()
    );
    assert!(
        mismatches.is_empty(),
        "{} of {} patterns disagree with Redis:\n{}",
        mismatches.len(),
        patterns.len(),
        mismatches[..mismatches.len().min(20)].join("\n")
    );
    // Guard against a generator that only ever makes patterns matching
    // nothing, which would agree with Redis trivially.
    assert!(
        matching * 3 > patterns.len(),
        "only {matching} patterns match anything"
    );
}

#[test]
fn rule_globs_select_what_scan_match_selects() {
    let redis = RedisServer::start();
    let mut con = redis.direct();
    let keys: Vec<Vec<u8>> = [
        &b""[..],
        b"sessions:teacher:12:3:x",
        b"sessions:teacher:7:1",
        b"sessions:teacher:7",
        b"sessions:student:7:1",
        b"user:1",
        b"user:42",
        b"user:{42}",
        b"user:",
        b"a{b}",
        b"a{b}c",
        b"img:9:meta",
        b"img:9:seg:1",
        b"img::meta",
    ]
    .iter()
    .map(|k| k.to_vec())
    .collect();
    insert_keys(&mut con, &keys);

    let rules = [
        "sessions:teacher:{teacher}:*",
        "user:{id}",
        "user:\\{{id}\\}",
        "a\\{b\\}*",
        "img:{id}:*",
        "img:{id}:meta",
        "{all}",
        "*",
        "**",
        "*:{last}",
    ];
    for rule in rules {
        let glob = Glob::new(rule).unwrap();
        let pattern = glob.redis_pattern();
        let got: BTreeSet<Vec<u8>> = redis::cmd("KEYS")
            .arg(&pattern)
            .query::<Vec<Vec<u8>>>(&mut con)
            .unwrap()
            .into_iter()
            .collect();
        let want: BTreeSet<Vec<u8>> = keys.iter().filter(|k| glob.matches(k)).cloned().collect();
        let shown = |set: &BTreeSet<Vec<u8>>| set.iter().map(|k| show(k)).collect::<Vec<_>>();
        assert_eq!(
            shown(&got),
            shown(&want),
            "rule {rule:?} (KEYS {pattern:?})"
        );
        for key in &want {
            assert!(glob.captures(key).is_some(), "rule {rule:?} on {key:?}");
        }
    }

    let glob = Glob::new("sessions:teacher:{teacher}:*").unwrap();
    assert_eq!(
        glob.captures(b"sessions:teacher:12:3:x"),
        Some(vec![("teacher", &b"12"[..])])
    );
    let glob = Glob::new("user:\\{{id}\\}").unwrap();
    assert_eq!(glob.redis_pattern(), "user:\\{*\\}");
    assert_eq!(glob.captures(b"user:{42}"), Some(vec![("id", &b"42"[..])]));
    assert_eq!(glob.literal_prefix(), b"user:{");
}
