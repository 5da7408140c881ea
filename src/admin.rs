//! tierd's answers to operators: the `CACHE.*` commands and tierd's own
//! sections of `INFO`.
//!
//! Everything here is read from what the server already keeps (the
//! configuration, the L1 store's counters and entries, the tracking state,
//! the command table, the live sessions) and encoded the way Redis encodes
//! its own replies: a map is a flat field/value array in RESP2 and a `%` map
//! in RESP3, a rate is a string in RESP2 and a double in RESP3, a flag is an
//! integer in RESP2 and a boolean in RESP3, and `INFO` is one bulk string of
//! `field:value` lines (a `txt` verbatim string in RESP3, as Redis 7 sends
//! it).
//!
//! This module never talks to upstream and never changes the cache or a
//! session. For an `INFO` that needs upstream's sections, dispatch forwards
//! the request as it is and hands the reply to [`append_info`]; only an
//! `INFO` that asks for tierd's sections alone is answered here in full.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use crate::cache::glob::{KeyPattern, MAX_PATTERN_LEN};
use crate::cache::store::EntryInfo;
use crate::config::TrackingMode;
use crate::protocol::parse::string2ll;
use crate::protocol::{reply, Proto, Request};
use crate::session::{Ctx, Session, CLIENT_ID_BASE};

/// `CACHE.KEYS` without `COUNT` returns at most this many keys.
pub const DEFAULT_KEYS_COUNT: usize = 100;

/// The largest `COUNT` `CACHE.KEYS` accepts. The reply is built in one
/// piece on the client's task, so it must stay small; `CACHE.STATS` is the
/// tool for totals.
pub const MAX_KEYS_COUNT: usize = 10_000;

/// The commands, for the unknown-command error.
const COMMANDS: &str = "CACHE.STATS, CACHE.RULES, CACHE.KEYS, CACHE.INSPECT, \
CACHE.INVALIDATE, CACHE.TAG, CACHE.SET, CACHE.TAGS, CACHE.MEMBERS, CACHE.WARM, CACHE.HELP";

/// The `CACHE.*` subcommands that need upstream I/O. Dispatch runs them
/// as jobs on the client's own connection (`dispatch::jobs`); they never
/// reach [`command`].
pub(crate) const JOBS: &[&str] = &["INVALIDATE", "TAG", "SET", "TAGS", "MEMBERS", "WARM"];

/// `CACHE.HELP`'s lines, in the layout of Redis's own `… HELP` replies.
const HELP: &[&str] = &[
    "CACHE.<command> [<arg> [value] [opt] ...]. tierd's cache commands are:",
    "CACHE.STATS [<rule>]",
    "    Per rule, in rule order: hits, misses, hit rate, entries, bytes, evictions,",
    "    invalidations, then coalesced reads, lease grants, waits, wake-ups and",
    "    timeouts, refreshes, and stale serves. With <rule>, that rule only.",
    "CACHE.RULES",
    "    The caching rules in match order: name, pattern, ttl in milliseconds, memory",
    "    cap, whether matching keys (and nil replies) are cached, and the key prefix",
    "    BCAST tracking uses for the rule.",
    "CACHE.KEYS <pattern> [COUNT <count>]",
    "    Keys with replies in L1 that match the Redis glob <pattern>, in no particular",
    "    order: at most <count> of them (default 100, at most 10000).",
    "CACHE.INSPECT <key>",
    "    What L1 holds for <key>: its rule, its size, and per cached reply the command,",
    "    db, protocol, milliseconds left to live and size. Nil when nothing is cached.",
    "CACHE.INVALIDATE TAG <tag> [<tag> ...]",
    "    Deletes every key tagged <tag> from Redis and from every tierd's L1, and the",
    "    tag itself. Returns the number of keys deleted.",
    "CACHE.INVALIDATE PATTERN <pattern> [L1ONLY]",
    "    Deletes every key matching the Redis glob <pattern> (walking the keyspace with",
    "    SCAN) and drops matching keys from every tierd's L1. Returns the number of keys",
    "    deleted. With L1ONLY, Redis is left alone: only L1 is dropped, and the reply is",
    "    the number of keys this tierd had cached.",
    "CACHE.INVALIDATE KEY <key> [<key> ...]",
    "    Deletes the keys from Redis and from every tierd's L1. Returns the number of",
    "    keys deleted.",
    "CACHE.TAG <key> <tag> [<tag> ...]",
    "    Tags an existing <key>. Returns the number of tags it did not have yet (0 when",
    "    the key does not exist).",
    "CACHE.SET <key> <value> [EX <seconds>|PX <milliseconds>] [TAGS <tag> [<tag> ...]]",
    "    SET, and tags <key> with the given tags and its rule's tags in the same",
    "    transaction. Returns SET's reply.",
    "CACHE.TAGS <key>",
    "    The tags of <key>, sorted. Empty when the key does not exist.",
    "CACHE.MEMBERS <tag>",
    "    The existing keys tagged <tag>, sorted.",
    "CACHE.WARM [<rule>]",
    "    Loads keys of <rule> (of every rule with warm, without <rule>) into L1 now:",
    "    first the keys instances recorded as hottest, then keys matching the rule",
    "    (SCAN), up to the rule's warm limit, at [warming] rate. Returns the number of",
    "    keys loaded.",
    "CACHE.HELP",
    "    Prints this help.",
];

/// `CACHE.*`: tierd's own commands, answered from the server's state. The
/// reply is queued in order like any other.
///
/// # Format
///
/// ```text
/// CACHE.STATS [rule]
/// CACHE.RULES
/// CACHE.KEYS pattern [COUNT count]
/// CACHE.INSPECT key
/// CACHE.HELP
/// ```
///
/// The commands that need upstream (`CACHE.INVALIDATE`, `CACHE.TAG`,
/// `CACHE.SET`, `CACHE.TAGS`, `CACHE.MEMBERS`, `CACHE.WARM`) are jobs that dispatch runs
/// on the client's connection; see `dispatch::jobs`.
pub(crate) fn command(s: &mut Session, req: &Request) {
    let name = req.name();
    let sub = name.get(b"CACHE.".len()..).unwrap_or_default();
    // The cache holds replies read as tierd's default identity: a client
    // authenticated as another user (whose ACLs may forbid those keys) must
    // not list or inspect them.
    let reveals_keys = sub.eq_ignore_ascii_case(b"KEYS") || sub.eq_ignore_ascii_case(b"INSPECT");
    if reveals_keys && !s.ctx.upstream.is_default(&s.identity) {
        s.local(error(
            "NOPERM CACHE.KEYS and CACHE.INSPECT are only for clients on tierd's default identity",
        ));
        return;
    }
    let reply = cache_command(&s.ctx, s.state.proto, req);
    s.local(reply);
}

/// At most this much of a client's bytes is echoed in an error, as Redis
/// does (`%.128s`).
const ECHO_MAX: usize = 128;

/// At most [`ECHO_MAX`] bytes of a client's argument, for an error.
pub(crate) fn shown(bytes: &[u8]) -> std::borrow::Cow<'_, str> {
    String::from_utf8_lossy(bytes.get(..ECHO_MAX).unwrap_or(bytes))
}

/// The reply to a `CACHE.*` request from a client speaking `proto`.
fn cache_command(ctx: &Ctx, proto: Proto, req: &Request) -> Bytes {
    let name = req.name();
    let sub = name.get(b"CACHE.".len()..).unwrap_or_default();
    let is = |what: &str| sub.eq_ignore_ascii_case(what.as_bytes());
    if is("STATS") {
        stats(ctx, proto, req)
    } else if is("RULES") {
        rules(ctx, proto, req)
    } else if is("KEYS") {
        keys(ctx, req)
    } else if is("INSPECT") {
        inspect(ctx, proto, req)
    } else if is("HELP") {
        help(req)
    } else if JOBS.iter().any(|j| is(j)) {
        // Not an unknown command: a routing bug, which must not tell the
        // client the command does not exist.
        error("ERR this CACHE command needs an upstream connection here")
    } else {
        let shown = shown(name);
        error(&format!(
            "ERR unknown command '{shown}', tierd's CACHE commands are: {COMMANDS}"
        ))
    }
}

fn error(msg: &str) -> Bytes {
    let mut out = BytesMut::new();
    reply::error(&mut out, msg.as_bytes());
    out.freeze()
}

/// Redis's error for a command called with the wrong number of arguments;
/// `command` is lowercase, as Redis prints it.
pub(crate) fn arity(command: &str) -> Bytes {
    error(&format!(
        "ERR wrong number of arguments for '{command}' command"
    ))
}

fn int(out: &mut BytesMut, v: u64) {
    reply::integer(out, i64::try_from(v).unwrap_or(i64::MAX));
}

/// A flag as Redis's `addReplyBool` sends it: `#t`/`#f` in RESP3, `:1`/`:0`
/// in RESP2.
fn boolean(out: &mut BytesMut, v: bool, proto: Proto) {
    out.extend_from_slice(match (proto, v) {
        (Proto::Resp3, true) => b"#t\r\n",
        (Proto::Resp3, false) => b"#f\r\n",
        (Proto::Resp2, true) => b":1\r\n",
        (Proto::Resp2, false) => b":0\r\n",
    });
}

/// A ratio with four decimals: a bulk string in RESP2, a double in RESP3.
fn rate(out: &mut BytesMut, hits: u64, misses: u64, proto: Proto) {
    let text = rate_text(hits, misses);
    match proto {
        Proto::Resp2 => reply::bulk(out, text.as_bytes()),
        Proto::Resp3 => out.extend_from_slice(format!(",{text}\r\n").as_bytes()),
    }
}

/// `hits / (hits + misses)` with four decimals; `0.0000` before any lookup.
fn rate_text(hits: u64, misses: u64) -> String {
    let lookups = hits.saturating_add(misses);
    let rate = if lookups == 0 {
        0.0
    } else {
        hits as f64 / lookups as f64
    };
    format!("{rate:.4}")
}

/// `CACHE.STATS [rule]`: per rule, hits, misses, hit rate, entries, bytes,
/// evictions and invalidations, then the stampede-protection counters
/// (coalesced reads, lease grants, waits, wake-ups, timeouts, refreshes). One array (RESP2) or map (RESP3) per rule,
/// in an array; with a rule name, that rule's alone.
fn stats(ctx: &Ctx, proto: Proto, req: &Request) -> Bytes {
    if req.args.len() > 2 {
        return arity("cache.stats");
    }
    let rules = ctx
        .l1
        .as_ref()
        .map(|l1| l1.store.stats())
        .unwrap_or_default();
    let rules: Vec<_> = match req.arg(1) {
        None => rules,
        Some(wanted) => {
            let one: Vec<_> = rules
                .into_iter()
                .filter(|r| r.name.as_bytes() == &wanted[..])
                .collect();
            if one.is_empty() {
                return error(&format!("ERR no such rule '{}'", shown(wanted)));
            }
            one
        }
    };
    let mut out = BytesMut::new();
    let one = req.args.len() == 2;
    if !one {
        reply::array_header(&mut out, rules.len());
    }
    for r in &rules {
        reply::map_header(&mut out, 15, proto);
        reply::bulk(&mut out, b"rule");
        reply::bulk(&mut out, r.name.as_bytes());
        for (field, value) in [("hits", r.hits), ("misses", r.misses)] {
            reply::bulk(&mut out, field.as_bytes());
            int(&mut out, value);
        }
        reply::bulk(&mut out, b"hit_rate");
        rate(&mut out, r.hits, r.misses, proto);
        for (field, value) in [
            ("entries", r.entries),
            ("bytes", r.bytes),
            ("evictions", r.evictions),
            ("invalidations", r.invalidations),
            ("coalesced", r.coalesced),
            ("lease_grants", r.lease_grants),
            ("lease_waits", r.lease_waits),
            ("lease_wakeups", r.lease_wakeups),
            ("lease_timeouts", r.lease_timeouts),
            ("refreshes", r.refreshes),
            ("stale_serves", r.stale_serves),
        ] {
            reply::bulk(&mut out, field.as_bytes());
            int(&mut out, value);
        }
    }
    out.freeze()
}

/// `CACHE.RULES`: every rule of the configuration, in match order, as a
/// map (RESP3) or flat array (RESP2): `rule`, `match`, `ttl_ms`,
/// `max_memory` (nil without a cap of its own), `cache`, `negative` and
/// `bcast_prefix` (the literal prefix `BCAST` tracking registers for the
/// rule, empty meaning every key; nil for a `cache = false` rule, which is
/// not tracked).
fn rules(ctx: &Ctx, proto: Proto, req: &Request) -> Bytes {
    if req.args.len() != 1 {
        return arity("cache.rules");
    }
    let rules = &ctx.config.rules;
    let mut out = BytesMut::new();
    reply::array_header(&mut out, rules.len());
    for r in rules {
        reply::map_header(&mut out, 7, proto);
        reply::bulk(&mut out, b"rule");
        reply::bulk(&mut out, r.name.as_bytes());
        reply::bulk(&mut out, b"match");
        reply::bulk(&mut out, r.pattern.pattern().as_bytes());
        reply::bulk(&mut out, b"ttl_ms");
        int(
            &mut out,
            u64::try_from(r.ttl.as_millis()).unwrap_or(u64::MAX),
        );
        reply::bulk(&mut out, b"max_memory");
        match r.max_memory {
            Some(cap) => int(&mut out, cap),
            None => reply::null(&mut out, proto),
        }
        reply::bulk(&mut out, b"cache");
        boolean(&mut out, r.cache, proto);
        reply::bulk(&mut out, b"negative");
        boolean(&mut out, r.negative, proto);
        reply::bulk(&mut out, b"bcast_prefix");
        if r.cache {
            reply::bulk(&mut out, &r.pattern.literal_prefix());
        } else {
            reply::null(&mut out, proto);
        }
    }
    out.freeze()
}

/// Matching work one `CACHE.KEYS` may do (see `keys`): some tens of
/// milliseconds at worst.
const KEYS_WORK_BUDGET: usize = 50_000_000;

/// `CACHE.KEYS pattern [COUNT count]`: up to `count` keys with a live reply
/// in L1 that match `pattern`, an array of bulk strings in no particular
/// order (the same in RESP2 and RESP3, like `KEYS`).
///
/// The walk stops once `count` keys are found, or after a bounded amount of
/// matching work ([`KEYS_WORK_BUDGET`]): over a very large L1, or with a
/// costly pattern, the answer is a sample of the matching keys, not all of
/// them. Patterns longer than 1024 bytes are refused, as rule patterns are.
fn keys(ctx: &Ctx, req: &Request) -> Bytes {
    let Some(pattern) = req.arg(1) else {
        return arity("cache.keys");
    };
    let mut count = DEFAULT_KEYS_COUNT;
    match (req.args.len(), req.arg(2), req.arg(3)) {
        (2, _, _) => {}
        (4, Some(opt), Some(n)) if opt.eq_ignore_ascii_case(b"COUNT") => {
            let Some(n) = string2ll(n) else {
                return error("ERR value is not an integer or out of range");
            };
            count = match usize::try_from(n) {
                Ok(n) if (1..=MAX_KEYS_COUNT).contains(&n) => n,
                _ => return error(&format!("ERR COUNT must be between 1 and {MAX_KEYS_COUNT}")),
            };
        }
        _ => return error("ERR syntax error"),
    }
    if pattern.len() > MAX_PATTERN_LEN {
        return error(&format!(
            "ERR pattern is longer than {MAX_PATTERN_LEN} bytes"
        ));
    }
    let matcher = KeyPattern::new(pattern);
    let mut found: Vec<Bytes> = Vec::new();
    // A bounded amount of matching work per call, estimated as pattern
    // length × key length per key visited (the matcher's worst case): the
    // walk runs on the client's own task and must not hold it, or a
    // worker, for long. Past the budget the keys found so far are the
    // answer.
    let per_key_base = 1;
    let mut budget = KEYS_WORK_BUDGET;
    if let Some(l1) = &ctx.l1 {
        l1.store.for_each_key(Instant::now(), |key| {
            let cost = per_key_base + (pattern.len() + 1) * (key.len() + 1);
            if cost > budget {
                return false;
            }
            budget -= cost;
            if matcher.matches(key) {
                found.push(Bytes::copy_from_slice(key));
            }
            found.len() < count
        });
    }
    let mut out = BytesMut::new();
    reply::array_header(&mut out, found.len());
    for key in &found {
        reply::bulk(&mut out, key);
    }
    out.freeze()
}

/// `CACHE.INSPECT key`: what L1 holds for `key`, or nil. A map (RESP3) or
/// flat array (RESP2) of `key`, `rule`, `bytes` (the entry's charge,
/// overhead included, as `CACHE.STATS` counts it), `tags` (the tags the
/// key's rule gives it; tags added with `CACHE.TAG` live in Redis, where
/// `CACHE.TAGS` reads them) and `variants`: per cached reply, `command` (its
/// arguments, the name lowercased), `db`, `protocol` (2 or 3), `ttl_ms`
/// (left to live), `size` (of the reply, in bytes) and `compressed`
/// (whether L1 keeps that value compressed: a `GET` of a key whose rule has
/// `compress`). Hits are counted per rule
/// (`CACHE.STATS`), not per entry, so none are shown.
fn inspect(ctx: &Ctx, proto: Proto, req: &Request) -> Bytes {
    let (2, Some(key)) = (req.args.len(), req.arg(1)) else {
        return arity("cache.inspect");
    };
    let mut out = BytesMut::new();
    let info = ctx
        .l1
        .as_ref()
        .and_then(|l1| Some((l1, l1.store.inspect(key, Instant::now())?)));
    let Some((l1, info)) = info else {
        reply::null(&mut out, proto);
        return out.freeze();
    };
    let EntryInfo {
        rule,
        bytes,
        variants,
    } = info;
    let rule_name = l1.rules.iter().nth(rule).map(|r| r.name.as_str());
    reply::map_header(&mut out, 5, proto);
    reply::bulk(&mut out, b"key");
    reply::bulk(&mut out, key);
    reply::bulk(&mut out, b"rule");
    match rule_name {
        Some(name) => reply::bulk(&mut out, name.as_bytes()),
        None => reply::null(&mut out, proto),
    }
    reply::bulk(&mut out, b"bytes");
    int(&mut out, bytes);
    reply::bulk(&mut out, b"tags");
    let tags = ctx.rules.tags_for(key);
    reply::array_header(&mut out, tags.len());
    for tag in &tags {
        reply::bulk(&mut out, tag);
    }
    reply::bulk(&mut out, b"variants");
    reply::array_header(&mut out, variants.len());
    for v in &variants {
        reply::map_header(&mut out, 6, proto);
        reply::bulk(&mut out, b"command");
        reply::array_header(&mut out, v.args.len());
        for arg in &v.args {
            reply::bulk(&mut out, arg);
        }
        reply::bulk(&mut out, b"db");
        int(&mut out, u64::from(v.db));
        reply::bulk(&mut out, b"protocol");
        int(&mut out, u64::from(v.proto.as_u8()));
        reply::bulk(&mut out, b"ttl_ms");
        int(
            &mut out,
            u64::try_from(v.ttl.as_millis()).unwrap_or(u64::MAX),
        );
        reply::bulk(&mut out, b"size");
        int(&mut out, v.size as u64);
        reply::bulk(&mut out, b"compressed");
        let compressible = l1
            .rules
            .iter()
            .nth(rule)
            .is_some_and(|r| r.compress.is_some());
        let get = v.args.first().is_some_and(|a| &a[..] == b"get");
        boolean(&mut out, compressible && get && v.framed, proto);
    }
    out.freeze()
}

/// `CACHE.HELP`: an array of status lines, as Redis's `… HELP` replies.
fn help(req: &Request) -> Bytes {
    if req.args.len() != 1 {
        return arity("cache.help");
    }
    let mut out = BytesMut::new();
    reply::array_header(&mut out, HELP.len());
    for line in HELP {
        reply::simple(&mut out, line.as_bytes());
    }
    out.freeze()
}

// ---------------------------------------------------------------------------
// INFO
// ---------------------------------------------------------------------------

/// Which of tierd's own `INFO` sections a request asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Sections {
    /// `# Tierd`: the proxy itself.
    tierd: bool,
    /// `# Cache`: the L1 tier.
    cache: bool,
}

impl Sections {
    fn any(self) -> bool {
        self.tierd || self.cache
    }
}

/// How an `INFO` request is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum InfoPlan {
    /// Only tierd's sections were asked for: answered by [`info_local`],
    /// upstream is not asked.
    Local(Sections),
    /// Upstream answers (the request is forwarded unchanged: Redis ignores
    /// section names it does not know), and [`append_info`] adds these
    /// sections to its reply. Without any, the reply passes through.
    Upstream(Sections),
}

/// Reads `INFO [section ...]` as Redis 7 does, names in any case. tierd's
/// sections are `tierd` and `cache`; like Redis's default sections they are
/// part of `INFO` without arguments, `default`, `all` and `everything`.
pub(crate) fn info_plan(req: &Request) -> InfoPlan {
    let mut sections = Sections::default();
    let mut upstream = req.args.len() < 2;
    if upstream {
        sections = Sections {
            tierd: true,
            cache: true,
        };
    }
    for arg in req.args.iter().skip(1) {
        let is = |what: &[u8]| arg.eq_ignore_ascii_case(what);
        if is(b"tierd") {
            sections.tierd = true;
        } else if is(b"cache") {
            sections.cache = true;
        } else {
            if is(b"default") || is(b"all") || is(b"everything") {
                sections.tierd = true;
                sections.cache = true;
            }
            upstream = true;
        }
    }
    if upstream {
        InfoPlan::Upstream(sections)
    } else {
        InfoPlan::Local(sections)
    }
}

/// The reply to an `INFO` that asks for tierd's sections only: one bulk
/// string in RESP2, a `txt` verbatim string in RESP3.
pub(crate) fn info_local(ctx: &Ctx, proto: Proto, sections: Sections) -> Bytes {
    let text = info_text(ctx, sections);
    let mut out = BytesMut::new();
    match proto {
        Proto::Resp2 => reply::bulk(&mut out, text.as_bytes()),
        Proto::Resp3 => {
            out.put_u8(b'=');
            out.extend_from_slice((text.len() + 4).to_string().as_bytes());
            out.extend_from_slice(b"\r\ntxt:");
            out.extend_from_slice(text.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.freeze()
}

/// Upstream's `INFO` reply (`frame`) with tierd's `sections` appended to its
/// text: after a blank line, as Redis separates its own sections, in the
/// same bulk (`$`) or verbatim (`=`) string, its length recomputed. Errors,
/// and anything that is not one complete string, pass through unchanged.
pub(crate) fn append_info(ctx: &Ctx, sections: Sections, frame: Bytes) -> Bytes {
    if !sections.any() {
        return frame;
    }
    let Some((kind, body)) = string_body(&frame) else {
        return frame;
    };
    // A verbatim string's body starts with its format (`txt:`), which is not
    // part of the text.
    let text = if kind == b'=' {
        body.get(4..).unwrap_or_default()
    } else {
        body
    };
    let ours = info_text(ctx, sections);
    let separator: &[u8] = if text.is_empty() { b"" } else { b"\r\n" };
    let len = body.len() + separator.len() + ours.len();
    let mut out = BytesMut::with_capacity(len + 24);
    out.put_u8(kind);
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
    out.extend_from_slice(separator);
    out.extend_from_slice(ours.as_bytes());
    out.extend_from_slice(b"\r\n");
    out.freeze()
}

/// The type byte and content of a frame that is exactly one bulk (`$`) or
/// verbatim (`=`) string.
fn string_body(frame: &[u8]) -> Option<(u8, &[u8])> {
    let kind = *frame.first()?;
    if kind != b'$' && kind != b'=' {
        return None;
    }
    let cr = frame.iter().position(|&b| b == b'\r')?;
    let len = usize::try_from(string2ll(frame.get(1..cr)?)?).ok()?;
    let start = cr.checked_add(2)?;
    let end = start.checked_add(len)?;
    if frame.len() != end.checked_add(2)? || frame.get(end..)? != b"\r\n" {
        return None;
    }
    if kind == b'=' && len < 4 {
        return None;
    }
    Some((kind, frame.get(start..end)?))
}

/// tierd's sections, each ending in CRLF, separated by a blank line.
fn info_text(ctx: &Ctx, sections: Sections) -> String {
    let mut out = String::new();
    if sections.tierd {
        tierd_section(ctx, &mut out);
    }
    if sections.cache {
        if !out.is_empty() {
            out.push_str("\r\n");
        }
        cache_section(ctx, &mut out);
    }
    out
}

/// Appends one `field:value` line.
fn field(out: &mut String, name: &str, value: impl std::fmt::Display) {
    let _ = write!(out, "{name}:{value}\r\n");
}

/// `# Tierd`. Every field is prefixed `tierd_`, so that clients that fold
/// all of `INFO` into one dictionary (redis-py's `info()`) never lose
/// upstream's fields of the same name (`connected_clients`,
/// `uptime_in_seconds` …).
fn tierd_section(ctx: &Ctx, out: &mut String) {
    out.push_str("# Tierd\r\n");
    field(out, "tierd_version", env!("CARGO_PKG_VERSION"));
    field(
        out,
        "tierd_uptime_in_seconds",
        Instant::now()
            .saturating_duration_since(ctx.started)
            .as_secs(),
    );
    field(out, "tierd_client_id_base", CLIENT_ID_BASE);
    field(out, "tierd_connected_clients", ctx.clients.lock().len());
    field(out, "tierd_threads", ctx.config.threads);
    // Host and port only: the URL's credentials never leave the config.
    let url = &ctx.config.upstream.url;
    let host = if url.host.contains(':') {
        format!("[{}]", url.host)
    } else {
        url.host.clone()
    };
    field(out, "tierd_upstream", format_args!("{host}:{}", url.port));
    field(out, "tierd_upstream_db", url.db);
    let breaker = ctx.upstream.breaker();
    field(out, "tierd_circuit_state", breaker.state().as_str());
    field(out, "tierd_circuit_opens", breaker.opens());
    let mode = ctx.tracking.mode();
    field(out, "tierd_tracking_mode", mode.as_str());
    let live = mode != TrackingMode::Off && ctx.tracking.is_live();
    field(out, "tierd_tracking_live", u8::from(live));
    field(out, "tierd_tracking_links", ctx.tracking.links());
    field(
        out,
        "tierd_tracking_invalidations",
        ctx.tracking.invalidations(),
    );
    let bus = ctx.bus.as_deref();
    field(out, "tierd_bus_enabled", u8::from(bus.is_some()));
    field(
        out,
        "tierd_bus_live",
        u8::from(bus.is_some_and(|b| b.is_up())),
    );
    field(out, "tierd_bus_links", bus.map_or(0, |b| b.links()));
    field(out, "tierd_bus_sent", bus.map_or(0, |b| b.sent()));
    field(out, "tierd_bus_received", bus.map_or(0, |b| b.received()));
    field(out, "tierd_bus_rejected", bus.map_or(0, |b| b.rejected()));
    let writes = &ctx.writes;
    field(out, "tierd_write_behind_queue", writes.depth());
    field(out, "tierd_write_behind_flushed", writes.flushed());
    field(out, "tierd_write_behind_errors", writes.errors());
    let table = ctx.table.get();
    field(out, "tierd_command_table_loaded", u8::from(table.is_some()));
    field(
        out,
        "tierd_command_table_commands",
        table.map_or(0, |t| t.len()),
    );
}

/// `# Cache`: L1 totals, then one `rule_<name>:hits=…,misses=…` line per
/// rule, in rule order. Without L1 (no rule caches) the totals are zero
/// and there are no rule lines.
fn cache_section(ctx: &Ctx, out: &mut String) {
    out.push_str("# Cache\r\n");
    let l1 = ctx.l1.as_deref();
    let stats = l1.map(|l1| l1.store.stats()).unwrap_or_default();
    let sum = |f: fn(&crate::cache::RuleStats) -> u64| {
        stats.iter().map(f).fold(0u64, u64::saturating_add)
    };
    let (hits, misses) = (sum(|r| r.hits), sum(|r| r.misses));
    let used = sum(|r| r.bytes);
    let max = ctx.config.l1.max_memory;
    field(out, "l1_enabled", u8::from(l1.is_some()));
    field(out, "l1_max_memory", max);
    field(out, "l1_max_memory_human", human_bytes(max));
    field(out, "l1_used_memory", used);
    field(out, "l1_used_memory_human", human_bytes(used));
    field(out, "l1_max_value_size", ctx.config.l1.max_value_size);
    field(out, "l1_entries", sum(|r| r.entries));
    field(out, "l1_hits", hits);
    field(out, "l1_misses", misses);
    field(out, "l1_hit_rate", rate_text(hits, misses));
    field(out, "l1_evictions", sum(|r| r.evictions));
    field(out, "l1_invalidations", sum(|r| r.invalidations));
    field(
        out,
        "l1_suspended",
        u8::from(l1.is_some_and(|l1| l1.store.is_suspended())),
    );
    let mut taken = HashSet::new();
    for (index, r) in stats.iter().enumerate() {
        let name = info_name(&r.name, index, &mut taken);
        let _ = write!(
            out,
            "rule_{name}:hits={},misses={},hit_rate={},entries={},bytes={},evictions={},invalidations={}\r\n",
            r.hits,
            r.misses,
            rate_text(r.hits, r.misses),
            r.entries,
            r.bytes,
            r.evictions,
            r.invalidations,
        );
    }
}

/// A rule name as an `INFO` field name: INFO parsers split a line at its
/// first `:` and values at `,` and `=`, so every byte other than a letter,
/// digit, `_`, `-` or `.` becomes `_`. A name that clashes with an earlier
/// one gets `_<rule index>` appended. `CACHE.STATS` shows names exactly.
fn info_name(name: &str, index: usize, taken: &mut HashSet<String>) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.') {
                c
            } else {
                '_'
            }
        })
        .collect();
    while taken.contains(&out) {
        let _ = write!(out, "_{index}");
    }
    taken.insert(out.clone());
    out
}

/// A byte count as Redis's `bytesToHuman` prints it (`used_memory_human`):
/// `512B`, `1.50K`, `512.00M` …
fn human_bytes(n: u64) -> String {
    const UNITS: [(u64, char); 5] = [
        (1 << 10, 'K'),
        (1 << 20, 'M'),
        (1 << 30, 'G'),
        (1 << 40, 'T'),
        (1 << 50, 'P'),
    ];
    if n < 1024 {
        return format!("{n}B");
    }
    for (i, (unit, suffix)) in UNITS.iter().enumerate() {
        let next = UNITS.get(i + 1).map_or(u64::MAX, |u| u.0);
        if n < next || i + 1 == UNITS.len() {
            return format!("{:.2}{suffix}", n as f64 / *unit as f64);
        }
    }
    format!("{n}B")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::cache::glob::redis_match;

    fn req(args: &[&str]) -> Request {
        Request::from_strs(args)
    }

    const BOTH: Sections = Sections {
        tierd: true,
        cache: true,
    };
    const TIERD: Sections = Sections {
        tierd: true,
        cache: false,
    };
    const CACHE: Sections = Sections {
        tierd: false,
        cache: true,
    };

    #[test]
    fn info_plan_follows_redis_section_names() {
        assert_eq!(info_plan(&req(&["INFO"])), InfoPlan::Upstream(BOTH));
        assert_eq!(info_plan(&req(&["info", "TIERD"])), InfoPlan::Local(TIERD));
        assert_eq!(info_plan(&req(&["INFO", "Cache"])), InfoPlan::Local(CACHE));
        assert_eq!(
            info_plan(&req(&["INFO", "tierd", "cache"])),
            InfoPlan::Local(BOTH)
        );
        for all in ["default", "ALL", "everything"] {
            assert_eq!(
                info_plan(&req(&["INFO", all])),
                InfoPlan::Upstream(BOTH),
                "{all}"
            );
        }
        assert_eq!(
            info_plan(&req(&["INFO", "server"])),
            InfoPlan::Upstream(Sections::default())
        );
        assert_eq!(
            info_plan(&req(&["INFO", "server", "cache"])),
            InfoPlan::Upstream(CACHE)
        );
    }

    #[test]
    fn string_body_accepts_exactly_one_string() {
        assert_eq!(string_body(b"$3\r\nabc\r\n"), Some((b'$', &b"abc"[..])));
        assert_eq!(
            string_body(b"=7\r\ntxt:abc\r\n"),
            Some((b'=', &b"txt:abc"[..]))
        );
        assert_eq!(string_body(b"$0\r\n\r\n"), Some((b'$', &b""[..])));
        for bad in [
            &b"$-1\r\n"[..],
            b"-ERR upstream unavailable\r\n",
            b"$3\r\nabcd\r\n",
            b"$4\r\nabc\r\n",
            b"$3\r\nabc\r\n+OK\r\n",
            b"=2\r\ntx\r\n",
            b"*1\r\n$1\r\na\r\n",
            b"",
        ] {
            assert_eq!(string_body(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn info_names_are_safe_and_unique() {
        let mut taken = HashSet::new();
        assert_eq!(info_name("users", 0, &mut taken), "users");
        assert_eq!(info_name("user:{id}", 1, &mut taken), "user__id_");
        assert_eq!(info_name("user__id_", 2, &mut taken), "user__id__2");
        assert_eq!(info_name("a,b=c d\r\n", 3, &mut taken), "a_b_c_d__");
        assert_eq!(info_name("v1.2-x", 4, &mut taken), "v1.2-x");
    }

    #[test]
    fn human_bytes_reads_like_redis() {
        assert_eq!(human_bytes(0), "0B");
        assert_eq!(human_bytes(1023), "1023B");
        assert_eq!(human_bytes(1536), "1.50K");
        assert_eq!(human_bytes(512 << 20), "512.00M");
        assert_eq!(human_bytes(3 << 30), "3.00G");
        assert_eq!(human_bytes(5 << 50), "5.00P");
        assert_eq!(human_bytes(u64::MAX), "16384.00P");
    }

    #[test]
    fn key_pattern_agrees_with_redis_match() {
        let keys: &[&[u8]] = &[b"", b"user:1", b"user:{1}", b"a{b}c", b"\xff", b"h\\llo"];
        for pattern in [
            &b"*"[..],
            b"user:*",
            b"user:{*}",
            b"a{b}c",
            b"[!a]*",
            b"\xff",
            b"h\\\\llo",
            b"?",
        ] {
            let m = KeyPattern::new(pattern);
            for key in keys {
                // `*` is KEYS's match-everything shortcut, the empty key too.
                let want = pattern == b"*" || redis_match(pattern, key, false);
                assert_eq!(m.matches(key), want, "{pattern:?} on {key:?}");
            }
        }
    }
}
