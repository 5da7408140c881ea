//! The string commands that would otherwise run on compressed bytes.
//!
//! A rule with `compress = { upstream = true }` makes Redis hold a framed
//! lz4 block ([`crate::cache::compress`]) where the client wrote a large
//! string. [`super::compression`] turns the writes that store a whole value
//! and the reads that return one into their compressed forms. Every other
//! string command on such a key (`STRLEN`, `GETRANGE`, `APPEND`, `INCR`,
//! `LCS`, `DUMP` …, the list is [`COMMANDS`]) is emulated here, so that the
//! client gets exactly the reply Redis would give on the plain value.
//!
//! tierd does not re-implement the commands: Redis computes every reply
//! itself, on a private copy of the plain value. A copy is a temporary key
//! `{invalidation.prefix}tmp:{process}:{n}`, written with a 60 s expiry (so
//! that a crash never leaves one behind for good) and deleted at once; the
//! client's command runs on it with the key argument replaced, in the
//! client's protocol, on a pooled connection of the client's own identity
//! (so its ACLs apply, and the copies must be within them).
//!
//! - **Reads** (`STRLEN`, `GETRANGE`, `SUBSTR`, `GETBIT`, `BITCOUNT`,
//!   `BITPOS`, `BITFIELD_RO`, `LCS`, `DUMP`) run on the client's usual
//!   connection as `MULTI`, `GET key`, the client's request, `EXEC`, sent
//!   back to back. When the value is not compressed (missing, plain, not a
//!   string) the client's reply is its request's own element of `EXEC`'s
//!   reply: one round trip, byte for byte Redis's. When it is compressed,
//!   the value `GET` returned is decoded and the request runs again on a
//!   copy. Both replies come from one value the key really held, so the
//!   answer is one Redis could have given. `STRLEN` is answered from the
//!   decoded length without a copy. `LCS` copies both of its keys (the copy
//!   of a missing key stays missing).
//! - **Read-modify-writes** (`SETRANGE`, `APPEND`, `SETBIT`, `BITFIELD`,
//!   `INCR`, `DECR`, `INCRBY`, `DECRBY`, `INCRBYFLOAT`) are an optimistic
//!   transaction on a connection of the client's identity and db:
//!   `WATCH key`, `GET key`. A compressed value is decoded, the command runs
//!   on a copy, and the copy's new value is read back and written as
//!   `MULTI`, `SET key <value> KEEPTTL`, `EXEC`: compressed again when it is
//!   at least the rule's threshold (and compression saves 10%), else plain.
//!   A value that is not compressed gets the client's request as is, inside
//!   `MULTI`/`EXEC` under the same `WATCH`, so that a concurrent write
//!   cannot slip a compressed value under it. An `EXEC` that `WATCH`
//!   aborted starts over, at most [`MAX_ATTEMPTS`] times. The reply is
//!   Redis's: the copy's (its errors too, such as `INCR` on a value that is
//!   not a number or an out-of-range `SETRANGE` offset, which then write
//!   nothing) or the request's element of `EXEC`'s reply. A command that
//!   leaves the value as it was writes nothing. The key's TTL is kept; L1
//!   and the other instances are told, as for any write, and the rule's tags
//!   are registered in the same transaction.
//!
//!   The transaction runs on the client's dedicated connection (opened if
//!   needed, kept as for any pinned request), so the client's db, tracking
//!   and ACL apply. A client that is `WATCH`ing keys gets a fresh dedicated
//!   connection for it instead, since tierd's `EXEC` would end the client's
//!   watch; the write then touches the key like the client's own write
//!   would, failing the client's `EXEC` if it watches that key.
//!
//! What differs from Redis on the plain value:
//!
//! - Inside the client's `MULTI` these commands are refused
//!   ([`refused_in_multi`]): Redis would run them on the compressed bytes at
//!   `EXEC`, and tierd cannot look at the value in between.
//! - A read from a client that is `WATCH`ing keys cannot use `MULTI` on its
//!   connection: `GET` and the request are then two steps, and a concurrent
//!   write that turns a plain value into a compressed one between them can
//!   make the request run on the compressed bytes.
//! - An emulated write is a `SET`: keyspace notifications say `set`, not
//!   `append` or `incrby` (the key's LFU counter is kept, as for any
//!   overwrite).
//! - A plain value that `APPEND`, `SETRANGE` and the like grow past the
//!   threshold stays plain; only whole-value writes compress.
//! - `DUMP` serializes the plain value, so `RESTORE` through or around tierd
//!   stores it plain.
//! - Scripts (`EVAL`, `FCALL`) and clients that bypass tierd see the
//!   compressed bytes, as for every command on such a key.
//! - Corrupt compressed data answers
//!   `-ERR tierd: compressed value is corrupt (…) in key '…'`.

use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::cache::{announce_keys, invalidate_local};
use super::jobs::drive;
use super::{choose, error, Flow, Want};
use crate::admin::shown;
use crate::cache::compress::{self, CorruptValue, Decoded, MAGIC};
use crate::cache::rules::Rules;
use crate::config::CompressConfig;
use crate::invalidation::tags::pipeline;
use crate::protocol::{inspect, reply, Request};
use crate::session::{Ctx, Route, Session, PINNED_CHANNEL};
use crate::upstream::{Conn, UpstreamError, Upstreamed};

/// How long a temporary copy may outlive a tierd that died before deleting
/// it, in milliseconds.
const TEMP_TTL_MS: &[u8] = b"60000";

/// Optimistic attempts of a read-modify-write whose `EXEC` keeps being
/// aborted by concurrent writes, before the client gets an error.
const MAX_ATTEMPTS: usize = 16;

/// Before attempt `n` of an optimistic write: nothing for the first, then
/// a growing pause with jitter, so that writers contending for one key
/// spread out instead of aborting each other in step.
async fn backoff(n: usize) {
    if n == 0 {
        return;
    }
    let jitter = std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
        % 200;
    let micros = 100 * (1u64 << n.min(6)) + jitter;
    tokio::time::sleep(std::time::Duration::from_micros(micros)).await;
}

/// Whether a command only reads its keys or reads, modifies and writes one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    /// `RENAME`, `RENAMENX`, `COPY` from a key compressed in Redis to one
    /// that is not: the destination must get the plain value.
    Move,
    /// A command that puts a value into a compressing key without tierd
    /// seeing it (`RESTORE`, or a move from a key that does not compress):
    /// a value that would start with the magic is escaped.
    Escape,
}

/// A command emulated on compressed keys: where its keys are, and what it
/// does with them.
#[derive(Debug, PartialEq, Eq)]
struct Spec {
    name: &'static str,
    /// Argument positions of its keys; every position holds a string key.
    keys: &'static [usize],
    access: Access,
}

const KEY: &[usize] = &[1];

const fn read(name: &'static str) -> Spec {
    Spec {
        name,
        keys: KEY,
        access: Access::Read,
    }
}

const fn write(name: &'static str) -> Spec {
    Spec {
        name,
        keys: KEY,
        access: Access::Write,
    }
}

/// Every command emulated here.
const COMMANDS: &[Spec] = &[
    read("STRLEN"),
    read("GETRANGE"),
    read("SUBSTR"),
    read("GETBIT"),
    read("BITCOUNT"),
    read("BITPOS"),
    read("BITFIELD_RO"),
    Spec {
        name: "LCS",
        keys: &[1, 2],
        access: Access::Read,
    },
    read("DUMP"),
    write("SETRANGE"),
    write("APPEND"),
    write("SETBIT"),
    write("BITFIELD"),
    write("INCR"),
    write("DECR"),
    write("INCRBY"),
    write("DECRBY"),
    write("INCRBYFLOAT"),
    Spec {
        name: "RENAME",
        keys: &[1, 2],
        access: Access::Move,
    },
    Spec {
        name: "RENAMENX",
        keys: &[1, 2],
        access: Access::Move,
    },
    Spec {
        name: "COPY",
        keys: &[1, 2],
        access: Access::Move,
    },
    Spec {
        name: "RESTORE",
        keys: KEY,
        access: Access::Escape,
    },
];

/// A move into a compressing key from one that does not compress: run
/// like a `RESTORE`, escaping the destination.
const ESCAPE_DESTINATION: Spec = Spec {
    name: "",
    keys: &[2],
    access: Access::Escape,
};

/// The emulated command `req` is, if it is one.
fn spec(req: &Request) -> Option<&'static Spec> {
    let name = req.name();
    COMMANDS
        .iter()
        .find(|c| name.eq_ignore_ascii_case(c.name.as_bytes()))
}

/// How `key`'s values are compressed in Redis, if they are.
fn compresses(rules: &Rules, key: &[u8]) -> Option<CompressConfig> {
    rules.compress_for(key).filter(|c| c.upstream)
}

/// Whether `req` is a command [`run`] handles: one of [`COMMANDS`] with all
/// its key arguments present, one of which (either, for `LCS`) a rule
/// compresses in Redis. Without such a rule it answers before looking at
/// the command's name.
pub(crate) fn wants(ctx: &Ctx, req: &Request) -> bool {
    wanted(&ctx.rules, req).is_some()
}

fn wanted(rules: &Rules, req: &Request) -> Option<&'static Spec> {
    if !rules.any_compress() {
        return None;
    }
    let spec = spec(req)?;
    if spec.access == Access::Move {
        // Between keys that compress alike, the stored bytes stay right.
        let (src, dst) = (req.arg(1)?, req.arg(2)?);
        return match (compresses(rules, src), compresses(rules, dst)) {
            (Some(_), None) => Some(spec),
            (None, Some(_)) => Some(&ESCAPE_DESTINATION),
            _ => None,
        };
    }
    let mut any = false;
    for &i in spec.keys {
        any |= compresses(rules, req.arg(i)?).is_some();
    }
    any.then_some(spec)
}

/// The error a client gets for an emulated command queued inside its
/// `MULTI`: Redis would run it on the compressed bytes at `EXEC`.
pub(crate) fn refused_in_multi(req: &Request) -> Bytes {
    let name = String::from_utf8_lossy(req.name()).to_uppercase();
    let on = match (req.arg(1), req.arg(2)) {
        (Some(a), Some(b)) if spec(req).is_some_and(|s| s.keys.len() == 2) => {
            format!("'{}' and '{}'", shown(a), shown(b))
        }
        (Some(a), _) => format!("'{}'", shown(a)),
        (None, _) => "a key".to_owned(),
    };
    error(&format!(
        "ERR tierd: {name} on {on} inside MULTI is not supported: its rule compresses values"
    ))
}

/// Runs an emulated command ([`wants`]) for the client, alone on its
/// session, and queues its reply.
pub(crate) async fn run(s: &mut Session, req: Request) -> Flow {
    if s.state.multi {
        s.local(refused_in_multi(&req));
        s.state.multi_aborted = true;
        return Flow::Continue;
    }
    let Some(spec) = wanted(&s.ctx.rules, &req).or_else(|| spec(&req)) else {
        s.local(error(&format!(
            "ERR tierd: '{}' is not emulated on compressed keys",
            shown(req.name())
        )));
        return Flow::Continue;
    };
    if s.inflight > 0 {
        return Flow::Stall(req);
    }
    match spec.access {
        Access::Read => run_read(s, req, spec).await,
        Access::Write => run_write(s, req, spec).await,
        Access::Move => run_move(s, req).await,
        Access::Escape => run_escaped(s, req, spec.keys.first().copied().unwrap_or(1)).await,
    }
}

/// Sends `request` with the tag registrations `evals` in one transaction
/// (`MULTI`, the request, the registrations, `EXEC`), or alone without any;
/// returns the request's own reply. `None`: a `WATCH` on the connection
/// aborted the transaction.
async fn with_registrations(
    conn: &Conn,
    ctx: &Ctx,
    request: Bytes,
    evals: &[Bytes],
) -> Result<Option<Bytes>, UpstreamError> {
    if evals.is_empty() {
        return conn.request(&request).await.map(Some);
    }
    let mut batch = Vec::with_capacity(evals.len() + 3);
    batch.push(command(&[b"MULTI"]));
    batch.push(request);
    batch.extend(evals.iter().cloned());
    batch.push(command(&[b"EXEC"]));
    let queued = batch.len() - 2;
    Ok(
        match transaction(&pipeline(conn, &batch).await?, queued, ctx) {
            Txn::Ran(results) => Some(results.into_iter().next().unwrap_or_default()),
            Txn::Refused(reply) => Some(reply),
            Txn::Aborted => None,
        },
    )
}

/// Awaits `work` on `route`'s connection (taking its pushes meanwhile, then
/// handing them to the session first, as they came on the wire), announces
/// `keys` if it wrote any, and queues the reply.
async fn answer<F>(s: &mut Session, route: Route, work: F, keys: &[Bytes]) -> Flow
where
    F: std::future::Future<Output = Result<Bytes, UpstreamError>>,
{
    let pushes = match route {
        Route::Pinned => s.pinned.as_mut().map(|p| &mut p.rx),
        Route::Pool { .. } => None,
    };
    let (result, arrived) = drive(pushes, work).await;
    for ev in arrived {
        s.on_upstream(ev, true);
    }
    let ctx = s.ctx.clone();
    if !keys.is_empty() {
        announce_keys(&ctx, s.state.db, keys);
    }
    s.local(result.unwrap_or_else(|e| {
        ctx.metrics.upstream_error();
        e.to_resp()
    }));
    Flow::Continue
}

/// Lua shared by the scripts that may leave a plain value starting with
/// the magic: `escape(key, magic)` puts such a value behind a raw header
/// (codec 0), keeping its TTL, so that it reads back as written. A macro,
/// so that each script is one literal built at compile time.
macro_rules! lua_escape {
    () => {
        r"
local function escape(key, magic)
  if redis.pcall('GETRANGE', key, 0, 3) == magic then
    local v = redis.call('GET', key)
    local n = #v
    local len = string.char(n % 256, math.floor(n / 256) % 256,
      math.floor(n / 65536) % 256, math.floor(n / 16777216) % 256)
    redis.call('SET', key, magic .. string.char(0) .. len .. v, 'KEEPTTL')
  end
end
"
    };
}

/// `KEYS[1]` the key, `ARGV[1]` the magic, `ARGV[2..]` the client's
/// request: runs it, then escapes the key's new value behind a raw header
/// (codec 0) if it starts with the magic, so that it reads back as written.
const ESCAPE_AFTER: &str = concat!(
    lua_escape!(),
    r"
local key, magic = KEYS[1], ARGV[1]
local r = redis.pcall(unpack(ARGV, 2))
if type(r) == 'table' and r.err then return r end
-- Only a command that wrote (RESTORE's and RENAME's OK, COPY's and
-- RENAMENX's 1) put a value there.
if not ((type(r) == 'table' and r.ok) or r == 1) then return r end
if string.upper(ARGV[2]) == 'COPY' then
  for i = 5, #ARGV - 1 do
    if string.upper(ARGV[i]) == 'DB' then redis.call('SELECT', ARGV[i + 1]) end
  end
end
escape(key, magic)
return r
"
);

/// A command that puts a value into the compressing key `req.arg(at)`
/// ([`Access::Escape`]), run by [`ESCAPE_AFTER`] in one step, with the
/// key's rule tags registered in the same transaction.
async fn run_escaped(s: &mut Session, req: Request, at: usize) -> Flow {
    let Some(key) = req.arg(at).cloned() else {
        return Flow::Continue;
    };
    let route = choose(s, Want::Any);
    let Some(conn) = super::route_conn(s, route).await else {
        return Flow::Continue;
    };
    let ctx = s.ctx.clone();
    let keys: Vec<Bytes> = req.args.get(1..=at).unwrap_or_default().to_vec();
    let evals = super::tagging::registrations(s, &req);
    let mut args: Vec<&[u8]> = vec![b"EVAL", ESCAPE_AFTER.as_bytes(), b"1", &key, &MAGIC];
    args.extend(req.args.iter().map(|a| &a[..]));
    let script = command(&args);
    invalidate_local(&ctx, &keys);
    let work = async {
        Ok(with_registrations(&conn, &ctx, script, &evals)
            .await?
            .unwrap_or_else(|| error("ERR tierd: EXEC aborted without a WATCH")))
    };
    answer(s, route, work, &keys).await
}

/// `KEYS[1]` the source, `KEYS[2]` the destination; `ARGV[1]` the source's
/// stored (compressed) value as tierd read it, `ARGV[2]` the plain value,
/// `ARGV[3]` the command, `ARGV[4..]` its options. Runs the command if the
/// source still holds what tierd read, then gives the destination the
/// plain value (in the db of `COPY … DB n`), keeping the TTL it got.
const MOVE_PLAIN: &str = r"
local src, dst = KEYS[1], KEYS[2]
if redis.pcall('GET', src) ~= ARGV[1] then return {err = 'TIERD_CHANGED'} end
local opts = {}
for i = 4, #ARGV do opts[#opts + 1] = ARGV[i] end
local r = redis.pcall(ARGV[3], src, dst, unpack(opts))
if type(r) == 'table' and r.err then return r end
if (type(r) == 'table' and r.ok == 'OK') or r == 1 then
  for i = 1, #opts - 1 do
    if string.upper(opts[i]) == 'DB' then redis.call('SELECT', opts[i + 1]) end
  end
  redis.call('SET', dst, ARGV[2], 'KEEPTTL')
end
return r
";

/// `RENAME`/`RENAMENX`/`COPY src dst …` from a key compressed in Redis to
/// one whose rule does not compress there: run by [`MOVE_PLAIN`], so the
/// destination holds the plain value its rule expects. The reply is the
/// command's own. A source that is not compressed (or not a string) gets
/// the request as it is.
async fn run_move(s: &mut Session, req: Request) -> Flow {
    let (Some(src), Some(dst)) = (req.arg(1).cloned(), req.arg(2).cloned()) else {
        return Flow::Continue;
    };
    let route = choose(s, Want::Any);
    let Some(conn) = super::route_conn(s, route).await else {
        return Flow::Continue;
    };
    let ctx = s.ctx.clone();
    let keys = [src.clone(), dst.clone()];
    // The destination's rule tags, as a plain move through tierd gets them.
    let evals = super::tagging::registrations(s, &req);
    invalidate_local(&ctx, &keys);
    let work = async {
        for attempt in 0..MAX_ATTEMPTS {
            backoff(attempt).await;
            let got = conn.request(&command(&[b"GET", &src])).await?;
            let script = match Stored::of(&got, max_value_size(&ctx)) {
                Stored::Corrupt(e) => return Ok(corrupt(&src, &e)),
                Stored::Compressed(plain) => {
                    let raw = inspect::string_payload(&got).unwrap_or_default();
                    let mut args: Vec<&[u8]> = vec![
                        b"EVAL",
                        MOVE_PLAIN.as_bytes(),
                        b"2",
                        &src,
                        &dst,
                        raw,
                        &plain,
                        req.name(),
                    ];
                    args.extend(req.args.iter().skip(3).map(|a| &a[..]));
                    command(&args)
                }
                // Not compressed (or not a string): the request as it is.
                _ => req.raw.clone(),
            };
            let Some(reply) = with_registrations(&conn, &ctx, script, &evals).await? else {
                continue;
            };
            if !reply.starts_with(b"-TIERD_CHANGED") {
                return Ok(reply);
            }
        }
        Ok::<Bytes, UpstreamError>(error(&format!(
            "ERR tierd: too much contention on compressed key '{}'",
            shown(&src)
        )))
    };
    answer(s, route, work, &keys).await
}

async fn run_read(s: &mut Session, req: Request, spec: &'static Spec) -> Flow {
    let route = choose(s, Want::Any);
    let Some(conn) = super::route_conn(s, route).await else {
        return Flow::Continue;
    };
    let scratch = scratch_conn(s);
    let ctx = s.ctx.clone();
    // The client's WATCH lives on its connection, and an EXEC there would
    // end it.
    let atomic = !s.state.watching;
    let work = read_value(&ctx, &conn, &scratch, &req, spec, atomic);
    answer(s, route, work, &[]).await
}

async fn run_write(s: &mut Session, req: Request, spec: &'static Spec) -> Flow {
    let Some(key) = req.arg(1).cloned() else {
        // `wants` never lets one through; Redis has the words for it.
        return run_read(s, req, spec).await;
    };
    let ctx = s.ctx.clone();
    let job = Modify {
        ctx: &ctx,
        scratch: scratch_conn(s),
        db: s.state.db,
        threshold: compresses(&ctx.rules, &key).map(|c| c.threshold),
        evals: super::tagging::registrations(s, &req),
        req: &req,
        key,
    };
    let result = if s.state.watching {
        match private_conn(s).await {
            Ok((conn, mut rx)) => drive(Some(&mut rx), job.run(&conn)).await.0,
            Err(e) => Err(e),
        }
    } else {
        let Some(conn) = super::route_conn(s, Route::Pinned).await else {
            return Flow::Continue;
        };
        let pushes = s.pinned.as_mut().map(|p| &mut p.rx);
        let (result, arrived) = drive(pushes, job.run(&conn)).await;
        for ev in arrived {
            s.on_upstream(ev, true);
        }
        result
    };
    s.local(result.unwrap_or_else(|e| {
        ctx.metrics.upstream_error();
        e.to_resp()
    }));
    Flow::Continue
}

/// A pooled connection of the client's identity and protocol, for the
/// temporary copies: off the client's own connection, whose tracking would
/// otherwise announce them.
fn scratch_conn(s: &Session) -> Conn {
    let pool = s.identity.pool(s.state.proto);
    pool.conn(pool.pick()).clone()
}

/// A new dedicated connection of the client's identity, protocol and db,
/// with the channel its pushes arrive on.
async fn private_conn(s: &Session) -> Result<(Conn, mpsc::Receiver<Upstreamed>), UpstreamError> {
    let (tx, rx) = mpsc::channel(PINNED_CHANNEL);
    let conn = s.identity.dedicated(s.state.proto, tx).await?;
    if s.state.db != s.ctx.upstream.default_db() {
        let db = s.state.db.to_string();
        let reply = conn
            .request(&reply::encode_command(&[b"SELECT", db.as_bytes()]))
            .await?;
        if inspect::is_error(&reply) {
            return Err(UpstreamError::Rejected(reply));
        }
    }
    Ok((conn, rx))
}

/// What a key holds, from its `GET` reply.
#[derive(Debug, PartialEq, Eq)]
enum Stored {
    Missing,
    /// Not compressed: the value as stored.
    Plain(Bytes),
    /// Compressed: the decoded value.
    Compressed(Bytes),
    /// `GET` failed (not a string, no permission …): the command's own
    /// reply will say why.
    Unreadable,
    Corrupt(CorruptValue),
}

impl Stored {
    fn of(frame: &Bytes, max_value_size: usize) -> Stored {
        if inspect::is_error(frame) {
            return Stored::Unreadable;
        }
        let Some(payload) = inspect::string_payload(frame).filter(|_| frame.first() == Some(&b'$'))
        else {
            // `$-1` and RESP3's `_`; anything else is not a GET reply.
            return match &frame[..] {
                b"$-1\r\n" | b"_\r\n" => Stored::Missing,
                _ => Stored::Unreadable,
            };
        };
        match compress::decode(payload, max_value_size) {
            Ok(Decoded::Plain(_)) => Stored::Plain(frame.slice_ref(payload)),
            Ok(Decoded::Compressed(value)) => Stored::Compressed(Bytes::from(value)),
            Err(e) => Stored::Corrupt(e),
        }
    }

    /// The value a copy must hold; `None` for a missing key.
    fn value(&self) -> Option<Bytes> {
        match self {
            Stored::Plain(v) | Stored::Compressed(v) => Some(v.clone()),
            _ => None,
        }
    }
}

/// The decoding limit ([`compress::decode`]).
fn max_value_size(ctx: &Ctx) -> usize {
    usize::try_from(ctx.config.l1.max_value_size).unwrap_or(usize::MAX)
}

fn corrupt(key: &[u8], e: &CorruptValue) -> Bytes {
    error(&format!("{} in key '{}'", e.client_error(), shown(key)))
}

fn command(args: &[&[u8]]) -> Bytes {
    reply::encode_command(args)
}

/// `GETRANGE key 0 8`: the header's worth of a value.
fn probe(key: &[u8]) -> Bytes {
    command(&[b"GETRANGE", key, b"0", b"8"])
}

/// Whether a [`probe`]'s reply is the start of a frame (a header that
/// parses), so that the whole value must be read and decoded.
fn is_frame_probe(reply: &[u8]) -> bool {
    reply.first() == Some(&b'$')
        && inspect::string_payload(reply).is_some_and(|p| compress::original_len(p).is_some())
}

/// `KEYS[1]` the key, `ARGV[1]` the magic, `ARGV[2..]` the client's
/// request. Runs the request in one step unless the value is a frame
/// (then `-TIERD_COMPRESSED`, and the write is emulated), and escapes a
/// result that would start with the magic behind a raw header (codec 0)
/// so that it reads back as written.
const PLAIN_WRITE: &str = concat!(
    lua_escape!(),
    r"
local key, magic = KEYS[1], ARGV[1]
if redis.pcall('GETRANGE', key, 0, 3) == magic then return {err = 'TIERD_COMPRESSED'} end
local r = redis.pcall(unpack(ARGV, 2))
if type(r) == 'table' and r.err then return r end
escape(key, magic)
return r
"
);

/// `KEYS[1]` the key, `ARGV[1]` the magic: escapes the key's value behind a
/// raw header if it starts with the magic (after a write tierd ran as the
/// client sent it, inside the same transaction).
const ESCAPE_KEY: &str = concat!(
    lua_escape!(),
    r"
local key, magic = KEYS[1], ARGV[1]
escape(key, magic)
return 0
"
);

/// Writes whose replies a script passes on byte for byte (integers and
/// bulk strings), which [`PLAIN_WRITE`] can run on a plain value.
fn scriptable(name: &[u8]) -> bool {
    [
        &b"INCR"[..],
        b"DECR",
        b"INCRBY",
        b"DECRBY",
        b"INCRBYFLOAT",
        b"APPEND",
        b"SETRANGE",
        b"SETBIT",
    ]
    .iter()
    .any(|n| name.eq_ignore_ascii_case(n))
}

/// A read: see the module's documentation.
async fn read_value(
    ctx: &Ctx,
    conn: &Conn,
    scratch: &Conn,
    req: &Request,
    spec: &Spec,
    atomic: bool,
) -> Result<Bytes, UpstreamError> {
    let max = max_value_size(ctx);
    let keys: Vec<&Bytes> = spec.keys.iter().filter_map(|&i| req.arg(i)).collect();
    let gets: Vec<Bytes> = keys.iter().map(|k| command(&[b"GET", k])).collect();
    // Only a frame needs the value: the first bytes say whether it is one,
    // so a large plain value is not fetched for nothing.
    let probes: Vec<Bytes> = keys.iter().map(|k| probe(k)).collect();
    let (values, answer) = if atomic {
        let mut batch = Vec::with_capacity(probes.len() + 3);
        batch.push(command(&[b"MULTI"]));
        batch.extend(probes);
        batch.push(req.raw.clone());
        batch.push(command(&[b"EXEC"]));
        let n = batch.len() - 2;
        match transaction(&pipeline(conn, &batch).await?, n, ctx) {
            Txn::Ran(mut results) => {
                let answer = results.pop();
                (results, answer)
            }
            Txn::Refused(reply) => return Ok(reply),
            // Nothing on this connection is watched.
            Txn::Aborted => return Ok(error("ERR tierd: EXEC aborted without a WATCH")),
        }
    } else {
        (pipeline(conn, &probes).await?, None)
    };
    let unreadable = values.iter().any(|v| inspect::is_error(v));
    if unreadable || !values.iter().any(|v| is_frame_probe(v)) {
        return match answer {
            Some(answer) => Ok(answer),
            None => conn.request(&req.raw).await,
        };
    }
    let values = pipeline(conn, &gets).await?;
    let stored: Vec<Stored> = values.iter().map(|v| Stored::of(v, max)).collect();
    let compressed = stored.iter().any(|s| matches!(s, Stored::Compressed(_)));
    let unreadable = stored.iter().any(|s| matches!(s, Stored::Unreadable));
    let broken = spec.keys.iter().zip(&stored).find_map(|(&i, s)| match s {
        Stored::Corrupt(e) => Some(corrupt(req.arg(i).map_or(&b""[..], |k| k), e)),
        _ => None,
    });
    if unreadable || (!compressed && broken.is_none()) {
        // Rewritten since the probe: the answer computed on the frame is
        // stale, so the request runs again, on what is there now.
        return conn.request(&req.raw).await;
    }
    if let Some(broken) = broken {
        return Ok(broken);
    }
    if spec.name == "STRLEN" && req.args.len() == 2 {
        let len = stored
            .first()
            .and_then(Stored::value)
            .map_or(0, |v| v.len());
        let mut out = BytesMut::new();
        reply::integer(&mut out, i64::try_from(len).unwrap_or(i64::MAX));
        return Ok(out.freeze());
    }
    let values: Vec<Option<Bytes>> = stored.iter().map(Stored::value).collect();
    let done = on_copies(ctx, scratch, req, spec.keys, &values, false).await?;
    Ok(done.reply)
}

/// What the client's command did on the copies.
struct Computed {
    /// Its reply (or the error that kept it from running).
    reply: Bytes,
    /// The first copy's value afterwards, when asked for and the command
    /// did not fail.
    value: Option<Bytes>,
}

/// Runs `req` with its key arguments (at `positions`) replaced by temporary
/// copies holding `values` (`None`: the copy is left missing), on `scratch`,
/// and deletes the copies: `SET` each, the command, `GET` the first when
/// `read_back`, `DEL`, back to back.
async fn on_copies(
    ctx: &Ctx,
    scratch: &Conn,
    req: &Request,
    positions: &[usize],
    values: &[Option<Bytes>],
    read_back: bool,
) -> Result<Computed, UpstreamError> {
    let mut temps: Vec<Bytes> = Vec::with_capacity(positions.len());
    let mut batch = Vec::with_capacity(positions.len() + 3);
    for (n, &pos) in positions.iter().enumerate() {
        // The same key twice (`LCS k k`) is one copy.
        let earlier = positions[..n]
            .iter()
            .position(|&p| req.arg(p) == req.arg(pos))
            .and_then(|e| temps.get(e).cloned());
        if let Some(temp) = earlier {
            temps.push(temp);
            continue;
        }
        let temp = temp_key(ctx);
        if let Some(Some(value)) = values.get(n) {
            batch.push(command(&[b"SET", &temp, value, b"PX", TEMP_TTL_MS]));
        }
        temps.push(temp);
    }
    let sets = batch.len();
    batch.push(substitute(req, positions, &temps));
    if read_back {
        if let Some(first) = temps.first() {
            batch.push(command(&[b"GET", first]));
        }
    }
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    for t in &temps {
        if !del.contains(&&t[..]) {
            del.push(t);
        }
    }
    batch.push(command(&del));
    let replies = pipeline(scratch, &batch).await?;
    if let Some(failed) = replies.iter().take(sets).find(|r| inspect::is_error(r)) {
        return Ok(Computed {
            reply: failed.clone(),
            value: None,
        });
    }
    let reply = replies.get(sets).cloned().unwrap_or_default();
    if !read_back || inspect::is_error(&reply) {
        return Ok(Computed { reply, value: None });
    }
    let got = replies.get(sets + 1).cloned().unwrap_or_default();
    match inspect::string_payload(&got).filter(|_| got.first() == Some(&b'$')) {
        Some(v) => Ok(Computed {
            value: Some(got.slice_ref(v)),
            reply,
        }),
        None => Ok(Computed {
            reply: error(&format!(
                "ERR tierd: the temporary copy of '{}' was gone before it could be read back; nothing was written",
                shown(req.arg(1).map_or(&b""[..], |k| k))
            )),
            value: None,
        }),
    }
}

/// `req` with the arguments at `positions` replaced by `temps`, in order.
fn substitute(req: &Request, positions: &[usize], temps: &[Bytes]) -> Bytes {
    let args: Vec<&[u8]> = req
        .args
        .iter()
        .enumerate()
        .map(|(i, arg)| {
            positions
                .iter()
                .position(|&p| p == i)
                .and_then(|n| temps.get(n))
                .map_or(&arg[..], |t| &t[..])
        })
        .collect();
    command(&args)
}

/// A key name no other copy, of this process or another tierd, uses.
fn temp_key(ctx: &Ctx) -> Bytes {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    static RUN: OnceLock<u64> = OnceLock::new();
    let run = RUN.get_or_init(|| {
        // RandomState is seeded from the OS once per process.
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u32(std::process::id());
        h.finish()
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let prefix = &ctx.config.invalidation.prefix;
    Bytes::from(format!("{prefix}tmp:{run:016x}:{n}"))
}

/// How `value` is stored: compressed when it reaches the rule's threshold
/// and compression pays, and always when it starts with [`MAGIC`] (else a
/// later read would take it for a frame); plain otherwise.
fn stored_form(value: Bytes, threshold: Option<u64>, max_value_size: usize) -> Bytes {
    let large = threshold.is_some_and(|t| u64::try_from(value.len()).map_or(true, |n| n >= t));
    if large || value.starts_with(&MAGIC) {
        if let Some(framed) = compress::compress(&value, max_value_size) {
            return Bytes::from(framed);
        }
    }
    value
}

/// How a `MULTI` … `EXEC` batch went.
#[derive(Debug, PartialEq, Eq)]
enum Txn {
    /// `EXEC`'s elements, one per queued command.
    Ran(Vec<Bytes>),
    /// A watched key changed: nothing ran.
    Aborted,
    /// Redis refused `MULTI`, a queued command (its error, as the client
    /// would have got it) or `EXEC`: nothing ran.
    Refused(Bytes),
}

/// Reads the replies to `MULTI`, `queued` commands and `EXEC`.
fn transaction(replies: &[Bytes], queued: usize, ctx: &Ctx) -> Txn {
    transaction_at(replies, queued, ctx.config.limits.max_reply_depth)
}

fn transaction_at(replies: &[Bytes], queued: usize, depth: usize) -> Txn {
    let unexpected = || Txn::Refused(error("ERR tierd: unexpected reply to MULTI/EXEC"));
    let (Some(multi), Some(exec)) = (replies.first(), replies.last()) else {
        return unexpected();
    };
    if replies.len() != queued + 2 {
        return unexpected();
    }
    if inspect::is_error(multi) {
        return Txn::Refused(multi.clone());
    }
    let queued_replies = replies.get(1..replies.len() - 1).unwrap_or_default();
    if let Some(refused) = queued_replies.iter().find(|r| inspect::is_error(r)) {
        return Txn::Refused(refused.clone());
    }
    if inspect::is_error(exec) {
        return Txn::Refused(exec.clone());
    }
    if &exec[..] == b"*-1\r\n" || &exec[..] == b"_\r\n" {
        return Txn::Aborted;
    }
    match inspect::elements(exec, depth) {
        Some(els) if exec.first() == Some(&b'*') && els.len() == queued => {
            Txn::Ran(els.into_iter().map(|e| exec.slice_ref(e)).collect())
        }
        _ => unexpected(),
    }
}

/// One read-modify-write: see the module's documentation.
struct Modify<'a> {
    ctx: &'a Ctx,
    /// Where the copies live.
    scratch: Conn,
    db: u32,
    /// The rule's threshold (`None`: no rule compresses the key any more).
    threshold: Option<u64>,
    /// The rule's tag registrations, queued after the write.
    evals: Vec<Bytes>,
    req: &'a Request,
    key: Bytes,
}

impl Modify<'_> {
    /// Runs on `conn`, a connection of the client's own. After a failure
    /// its `WATCH` is dropped, so that it cannot fail a later `EXEC` of the
    /// client's there.
    async fn run(&self, conn: &Conn) -> Result<Bytes, UpstreamError> {
        let result = self.attempts(conn).await;
        if result.is_err() && conn.is_up() {
            let _ = conn.request(&command(&[b"UNWATCH"])).await;
        }
        result
    }

    async fn attempts(&self, conn: &Conn) -> Result<Bytes, UpstreamError> {
        let max = max_value_size(self.ctx);
        let keys = [self.key.clone()];
        if scriptable(self.req.name()) {
            // A plain value (a counter, say) takes one atomic step, with no
            // WATCH to lose under contention (and the rule's tags in the
            // same transaction).
            let mut args: Vec<&[u8]> =
                vec![b"EVAL", PLAIN_WRITE.as_bytes(), b"1", &self.key, &MAGIC];
            args.extend(self.req.args.iter().map(|a| &a[..]));
            let script = command(&args);
            invalidate_local(self.ctx, &keys);
            let reply = with_registrations(conn, self.ctx, script, &self.evals)
                .await
                .map(|r| r.unwrap_or_else(|| error("ERR tierd: EXEC aborted without a WATCH")));
            announce_keys(self.ctx, self.db, &keys);
            let reply = reply?;
            if !reply.starts_with(b"-TIERD_COMPRESSED") {
                return Ok(reply);
            }
        }
        let unwatch = || async { conn.request(&command(&[b"UNWATCH"])).await.map(|_| ()) };
        for attempt in 0..MAX_ATTEMPTS {
            backoff(attempt).await;
            let replies =
                pipeline(conn, &[command(&[b"WATCH", &self.key]), probe(&self.key)]).await?;
            let (Some(watched), Some(probed)) = (replies.first(), replies.get(1)) else {
                return Err(UpstreamError::unavailable("no reply to WATCH and GETRANGE"));
            };
            if inspect::is_error(watched) {
                return Ok(watched.clone());
            }
            // Under the WATCH, the whole value only for a frame.
            let got = if is_frame_probe(probed) {
                &conn.request(&command(&[b"GET", &self.key])).await?
            } else {
                probed
            };
            // The request to send, and the reply the client gets if it
            // runs (`None`: its own).
            let (write, emulated) = match Stored::of(got, max) {
                Stored::Corrupt(e) => {
                    unwatch().await?;
                    return Ok(corrupt(&self.key, &e));
                }
                Stored::Compressed(plain) => {
                    let done = on_copies(
                        self.ctx,
                        &self.scratch,
                        self.req,
                        KEY,
                        &[Some(plain.clone())],
                        true,
                    )
                    .await?;
                    let Some(value) = done.value.filter(|v| *v != plain) else {
                        // Failed, or left the value as it was.
                        unwatch().await?;
                        return Ok(done.reply);
                    };
                    let value = stored_form(value, self.threshold, max);
                    let set = command(&[b"SET", &self.key, &value, b"KEEPTTL"]);
                    (set, Some(done.reply))
                }
                _ => (self.req.raw.clone(), None),
            };
            let mut batch = Vec::with_capacity(self.evals.len() + 4);
            batch.push(command(&[b"MULTI"]));
            batch.push(write);
            if emulated.is_none() {
                // A plain value the client's own command (BITFIELD, say)
                // left starting with the magic is escaped in the same
                // transaction. (An emulated write stores a proper frame.)
                batch.push(command(&[
                    b"EVAL",
                    ESCAPE_KEY.as_bytes(),
                    b"1",
                    &self.key,
                    &MAGIC,
                ]));
            }
            batch.extend(self.evals.iter().cloned());
            batch.push(command(&[b"EXEC"]));
            invalidate_local(self.ctx, &keys);
            let queued = batch.len() - 2;
            let replies = pipeline(conn, &batch).await;
            let txn = match replies {
                Ok(replies) => transaction(&replies, queued, self.ctx),
                Err(e) => {
                    // It may have run.
                    announce_keys(self.ctx, self.db, &keys);
                    return Err(e);
                }
            };
            match txn {
                Txn::Aborted => continue,
                Txn::Refused(reply) => return Ok(reply),
                Txn::Ran(results) => {
                    announce_keys(self.ctx, self.db, &keys);
                    let first = results.into_iter().next().unwrap_or_default();
                    if let Some(failed) = results_error(&emulated, &first) {
                        return Ok(failed);
                    }
                    return Ok(emulated.unwrap_or(first));
                }
            }
        }
        Ok(error(&format!(
            "ERR tierd: too much contention on compressed key '{}'",
            shown(&self.key)
        )))
    }
}

/// The emulated write's `SET` failed when it ran (`-OOM`, say): the
/// client's command did not happen, and that error is its reply.
fn results_error(emulated: &Option<Bytes>, first: &Bytes) -> Option<Bytes> {
    (emulated.is_some() && inspect::is_error(first)).then(|| first.clone())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::cache::glob::Glob;
    use crate::config::RuleConfig;
    use std::time::Duration;

    fn rules(compress: &[(&str, Option<CompressConfig>)]) -> Rules {
        let configs: Vec<RuleConfig> = compress
            .iter()
            .map(|(pattern, compress)| RuleConfig {
                name: (*pattern).to_owned(),
                pattern: Glob::new(pattern).unwrap(),
                ttl: Duration::from_secs(60),
                max_memory: None,
                cache: true,
                negative: true,
                tags: Vec::new(),
                compress: *compress,
                stampede: None,
                refresh_ahead: None,
                stale_ttl: None,
                write: crate::config::WriteStrategy::Invalidate,
                warm: None,
            })
            .collect();
        Rules::from_config(&configs)
    }

    const UP: Option<CompressConfig> = Some(CompressConfig {
        threshold: 64,
        upstream: true,
    });
    const L1_ONLY: Option<CompressConfig> = Some(CompressConfig {
        threshold: 64,
        upstream: false,
    });

    fn wants_in(rules: &Rules, args: &[&str]) -> Option<&'static str> {
        wanted(rules, &Request::from_strs(args)).map(|s| s.name)
    }

    #[test]
    fn wants_commands_on_keys_compressed_upstream() {
        let r = rules(&[("c:*", UP), ("l:*", L1_ONLY), ("p:*", None)]);
        for (args, want) in [
            (&["strlen", "c:1"][..], Some("STRLEN")),
            (&["GetRange", "c:1", "0", "-1"], Some("GETRANGE")),
            (&["SUBSTR", "c:1", "0", "1"], Some("SUBSTR")),
            (
                &["bitfield_ro", "c:1", "GET", "u8", "0"],
                Some("BITFIELD_RO"),
            ),
            (&["DUMP", "c:1"], Some("DUMP")),
            (&["incrbyfloat", "c:1", "1.5"], Some("INCRBYFLOAT")),
            (&["APPEND", "c:1", "x"], Some("APPEND")),
            (&["setbit", "c:1", "7", "1"], Some("SETBIT")),
            // Either key of LCS.
            (&["LCS", "c:1", "p:1"], Some("LCS")),
            (&["LCS", "p:1", "c:1", "LEN"], Some("LCS")),
            (&["LCS", "p:1", "p:2"], None),
            // Not upstream, no rule, or no compress.
            (&["STRLEN", "l:1"], None),
            (&["STRLEN", "x"], None),
            (&["STRLEN", "p:1"], None),
            // Commands handled elsewhere or not string commands.
            (&["GET", "c:1"], None),
            (&["SET", "c:1", "v"], None),
            (&["HGET", "c:1", "f"], None),
            (&["STRLENX", "c:1"], None),
            // Missing key arguments: Redis answers the arity error.
            (&["STRLEN"], None),
            (&["LCS", "c:1"], None),
        ] {
            assert_eq!(wants_in(&r, args), want, "{args:?}");
        }
        // Without a compressing rule nothing is looked at.
        let none = rules(&[("c:*", None)]);
        assert!(!none.any_compress());
        assert_eq!(wants_in(&none, &["STRLEN", "c:1"]), None);
    }

    #[test]
    fn every_command_is_listed_once_with_its_access() {
        let reads = [
            "STRLEN",
            "GETRANGE",
            "SUBSTR",
            "GETBIT",
            "BITCOUNT",
            "BITPOS",
            "BITFIELD_RO",
            "LCS",
            "DUMP",
        ];
        let writes = [
            "SETRANGE",
            "APPEND",
            "SETBIT",
            "BITFIELD",
            "INCR",
            "DECR",
            "INCRBY",
            "DECRBY",
            "INCRBYFLOAT",
        ];
        let moves = ["RENAME", "RENAMENX", "COPY"];
        assert_eq!(COMMANDS.len(), reads.len() + writes.len() + moves.len() + 1);
        let restore = spec(&Request::from_strs(&["RESTORE", "k", "0", "x"])).unwrap();
        assert_eq!(restore.access, Access::Escape);
        for name in moves {
            let s = spec(&Request::from_strs(&[name, "a", "b"])).unwrap();
            assert_eq!((s.access, s.keys), (Access::Move, &[1, 2][..]), "{name}");
        }
        for name in reads {
            let s = spec(&Request::from_strs(&[&name.to_lowercase(), "k"])).unwrap();
            assert_eq!(s.access, Access::Read, "{name}");
        }
        for name in writes {
            let s = spec(&Request::from_strs(&[name, "k"])).unwrap();
            assert_eq!((s.access, s.keys), (Access::Write, KEY), "{name}");
        }
    }

    fn substituted(args: &[&str]) -> Vec<String> {
        let req = Request::from_strs(args);
        let spec = spec(&req).unwrap();
        let temps: Vec<Bytes> = (0..spec.keys.len())
            .map(|n| Bytes::from(format!("T{n}")))
            .collect();
        let raw = substitute(&req, spec.keys, &temps);
        let parsed = crate::protocol::parse::RequestParser::new(Default::default())
            .parse(&mut BytesMut::from(&raw[..]))
            .unwrap()
            .unwrap();
        parsed
            .args
            .iter()
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect()
    }

    #[test]
    fn key_arguments_are_replaced_by_the_copies() {
        for (args, want) in [
            (
                &["GETRANGE", "c:1", "0", "-1"][..],
                &["GETRANGE", "T0", "0", "-1"][..],
            ),
            (&["strlen", "c:1"], &["strlen", "T0"]),
            (
                &["BITCOUNT", "c:1", "1", "5", "BIT"],
                &["BITCOUNT", "T0", "1", "5", "BIT"],
            ),
            (&["BITPOS", "c:1", "1", "2"], &["BITPOS", "T0", "1", "2"]),
            (
                &["BITFIELD", "c:1", "INCRBY", "u8", "0", "c:1"],
                &["BITFIELD", "T0", "INCRBY", "u8", "0", "c:1"],
            ),
            (
                &[
                    "LCS",
                    "c:1",
                    "c:2",
                    "IDX",
                    "MINMATCHLEN",
                    "4",
                    "WITHMATCHLEN",
                ],
                &["LCS", "T0", "T1", "IDX", "MINMATCHLEN", "4", "WITHMATCHLEN"],
            ),
            (
                &["SETRANGE", "c:1", "10", "xy"],
                &["SETRANGE", "T0", "10", "xy"],
            ),
            (
                &["INCRBYFLOAT", "c:1", "-2.5"],
                &["INCRBYFLOAT", "T0", "-2.5"],
            ),
            (&["DUMP", "c:1"], &["DUMP", "T0"]),
        ] {
            assert_eq!(substituted(args), want, "{args:?}");
        }
    }

    #[test]
    fn refusal_inside_multi_names_command_and_keys() {
        let text = |args: &[&str]| {
            String::from_utf8(refused_in_multi(&Request::from_strs(args)).to_vec()).unwrap()
        };
        assert_eq!(
            text(&["strlen", "k"]),
            "-ERR tierd: STRLEN on 'k' inside MULTI is not supported: its rule compresses values\r\n"
        );
        assert_eq!(
            text(&["lcs", "a", "b", "LEN"]),
            "-ERR tierd: LCS on 'a' and 'b' inside MULTI is not supported: its rule compresses values\r\n"
        );
        // A key with CR LF cannot break the reply's framing.
        assert_eq!(text(&["APPEND", "a\r\nb", "x"]).matches("\r\n").count(), 1);
    }

    fn bulk(v: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        reply::bulk(&mut out, v);
        out.freeze()
    }

    #[test]
    fn stored_values_by_get_reply() {
        let max = 1 << 20;
        let plain = b"hello world".repeat(20);
        let framed = compress::compress(&plain, max).unwrap();
        assert_eq!(
            Stored::of(&bulk(&framed), max),
            Stored::Compressed(Bytes::from(plain.clone()))
        );
        assert_eq!(
            Stored::of(&bulk(&plain), max),
            Stored::Plain(Bytes::from(plain.clone()))
        );
        assert_eq!(
            Stored::of(&Bytes::from_static(b"$-1\r\n"), max),
            Stored::Missing
        );
        assert_eq!(
            Stored::of(&Bytes::from_static(b"_\r\n"), max),
            Stored::Missing
        );
        assert_eq!(
            Stored::of(
                &Bytes::from_static(
                    b"-WRONGTYPE Operation against a key holding the wrong kind of value\r\n"
                ),
                max
            ),
            Stored::Unreadable
        );
        assert_eq!(
            Stored::of(&Bytes::from_static(b":1\r\n"), max),
            Stored::Unreadable
        );
        // A header that lies about the size is corrupt, not an allocation.
        let mut lie = framed.clone();
        lie[5..9].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(Stored::of(&bulk(&lie), max), Stored::Corrupt(_)));
        // Only the magic is data.
        assert_eq!(
            Stored::of(&bulk(&MAGIC), max),
            Stored::Plain(Bytes::copy_from_slice(&MAGIC))
        );
    }

    #[test]
    fn new_values_compress_from_the_threshold_or_when_they_look_framed() {
        let max = 1 << 20;
        let big = Bytes::from(b"abcdefgh".repeat(16));
        let stored = stored_form(big.clone(), Some(64), max);
        assert!(stored.starts_with(&MAGIC));
        assert_eq!(compress::decode(&stored, max).unwrap().as_bytes(), &big[..]);
        // Below the threshold, or no rule: plain.
        assert_eq!(stored_form(big.clone(), Some(1000), max), big);
        assert_eq!(stored_form(big.clone(), None, max), big);
        // Incompressible: plain.
        let short = Bytes::from_static(b"0123456789abcdefghijklmnopqrstuvwxyz");
        assert_eq!(stored_form(short.clone(), Some(4), max), short);
        // Starts with the magic: always framed, so that it reads back as is.
        let mut odd = MAGIC.to_vec();
        odd.extend_from_slice(b"\x01abc");
        let stored = stored_form(Bytes::from(odd.clone()), Some(1000), max);
        assert_ne!(&stored[..], &odd[..]);
        assert_eq!(compress::decode(&stored, max).unwrap().as_bytes(), &odd[..]);
    }

    fn frames(list: &[&'static [u8]]) -> Vec<Bytes> {
        list.iter().map(|f| Bytes::from_static(f)).collect()
    }

    #[test]
    fn transaction_outcomes() {
        let ran = frames(&[
            b"+OK\r\n",
            b"+QUEUED\r\n",
            b"+QUEUED\r\n",
            b"*2\r\n:5\r\n$1\r\nx\r\n",
        ]);
        assert_eq!(
            transaction_at(&ran, 2, 8),
            Txn::Ran(frames(&[b":5\r\n", b"$1\r\nx\r\n"]))
        );
        for nil in [&b"*-1\r\n"[..], b"_\r\n"] {
            let aborted = vec![
                Bytes::from_static(b"+OK\r\n"),
                Bytes::from_static(b"+QUEUED\r\n"),
                Bytes::copy_from_slice(nil),
            ];
            assert_eq!(transaction_at(&aborted, 1, 8), Txn::Aborted);
        }
        let arity = &b"-ERR wrong number of arguments for 'getrange' command\r\n"[..];
        let refused = frames(&[
            b"+OK\r\n",
            b"+QUEUED\r\n",
            arity,
            b"-EXECABORT Transaction discarded because of previous errors.\r\n",
        ]);
        assert_eq!(
            transaction_at(&refused, 2, 8),
            Txn::Refused(Bytes::from_static(arity))
        );
        let noauth = &b"-NOAUTH Authentication required.\r\n"[..];
        assert_eq!(
            transaction_at(&frames(&[noauth, noauth, noauth]), 1, 8),
            Txn::Refused(Bytes::from_static(noauth))
        );
        // Runtime errors are elements, as the client would get them.
        let wrongtype = frames(&[
            b"+OK\r\n",
            b"+QUEUED\r\n",
            b"*1\r\n-WRONGTYPE Operation against a key holding the wrong kind of value\r\n",
        ]);
        assert!(
            matches!(transaction_at(&wrongtype, 1, 8), Txn::Ran(r) if r[0].starts_with(b"-WRONGTYPE"))
        );
        // Counts that do not add up are not trusted.
        assert!(matches!(transaction_at(&ran, 1, 8), Txn::Refused(_)));
        assert!(matches!(transaction_at(&[], 0, 8), Txn::Refused(_)));
    }

    #[test]
    fn set_errors_replace_the_emulated_reply() {
        let oom = Bytes::from_static(b"-OOM command not allowed\r\n");
        let ok = Bytes::from_static(b"+OK\r\n");
        let reply = Some(Bytes::from_static(b":3\r\n"));
        assert_eq!(results_error(&reply, &oom), Some(oom.clone()));
        assert_eq!(results_error(&reply, &ok), None);
        assert_eq!(results_error(&None, &oom), None);
    }
}
