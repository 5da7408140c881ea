//! Tags: named groups of keys kept in Redis, so that one command can drop
//! every key of a group from Redis and from every tierd's L1.
//!
//! A tag `t` is a *sidecar* set, `{prefix}tag:{t}`, whose members are the
//! tagged keys; each tagged key has a *reverse index*, `{prefix}keytags:{key}`,
//! the set of its tags. Both live next to the data, in the client's db, so
//! they follow `SELECT`, `FLUSHDB` and the client's ACLs.
//!
//! Keys expire and get deleted behind the sidecars' backs, so the sets are
//! kept honest lazily rather than exactly:
//!
//! - a sidecar lives as long as its longest-lived member (it is extended on
//!   every registration, never shortened), and the reverse index exactly as
//!   long as its key;
//! - every registration prunes a small random sample of the sidecar, and
//!   every listing ([`members`], [`tags_of`]) removes what it finds dead.
//!
//! Every operation is bounded per round trip (at most [`BATCH`] keys, one
//! script over a fixed number of keys), so invalidating a tag of 100k keys
//! is many short steps: it never holds Redis, and so other clients, for
//! long. Scripts are sent with `EVAL` (not `EVALSHA`): the connection may be
//! a client's own, and the script cache may be flushed at any time.
//!
//! This module only talks to Redis through a [`Conn`] it is given; it knows
//! nothing of sessions, L1 or the bus. Callers announce what was removed
//! (the `on_batch` callbacks). Replies may be RESP2 or RESP3: the
//! connection may be a client's RESP3 dedicated one.

use std::collections::HashSet;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::protocol::inspect::{self, integer};
use crate::protocol::reply;
use crate::upstream::{Conn, ReplyTo, UpstreamError, Upstreamed};

/// Most keys one round trip touches (`SPOP`, `SCAN`/`SSCAN` `COUNT`,
/// `UNLINK`, one pruning script).
pub const BATCH: usize = 1000;

/// The replies read here are flat arrays (or a `SCAN` pair of a cursor and
/// an array).
const DEPTH: usize = 4;

/// Why a tag operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TagError {
    /// Upstream could not answer (unreachable, lost, timed out).
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Upstream answered with an error (an ACL refusal, a sidecar name
    /// taken by a key of another type …): the raw error frame.
    #[error("upstream refused: {}", String::from_utf8_lossy(.0.get(1..).unwrap_or_default()).trim_end())]
    Refused(Bytes),
    /// Upstream's reply to this command does not have the expected shape.
    #[error("unexpected reply from upstream to {0}")]
    Unexpected(&'static str),
}

impl TagError {
    /// Who is at fault: upstream, whether it refused or failed.
    pub fn source(&self) -> crate::error::ErrorSource {
        crate::error::ErrorSource::Upstream
    }

    /// The RESP error reply a client gets: Redis's own error when it
    /// refused, tierd's `-ERR upstream unavailable: …` otherwise.
    pub fn to_resp(&self) -> Bytes {
        match self {
            TagError::Upstream(e) => e.to_resp(),
            TagError::Refused(frame) => frame.clone(),
            TagError::Unexpected(what) => {
                let mut out = BytesMut::new();
                reply::error(
                    &mut out,
                    format!("ERR upstream unavailable: unexpected reply to {what}").as_bytes(),
                );
                out.freeze()
            }
        }
    }
}

/// Whether `key` carries `tag` by its reverse index, the record of truth:
/// a sidecar may still list a key that was deleted (and maybe re-created)
/// since, but a key's reverse index goes with it. Prepended to the scripts
/// that need it.
const TAGGED: &str = r"
local function tagged(prefix, key, tag)
  local rev = prefix .. 'keytags:' .. key
  return redis.call('TYPE', rev).ok == 'set' and redis.call('SISMEMBER', rev, tag) == 1
end
";

/// `KEYS[1]` the key, `KEYS[2]` its reverse index, `KEYS[3..]` the
/// sidecars; `ARGV[1]` the prefix, `ARGV[i - 1]` the tag of sidecar
/// `KEYS[i]`. See [`register_command`].
const REGISTER: &str = r"
local key, rev, prefix = KEYS[1], KEYS[2], ARGV[1]
local pttl = redis.call('PTTL', key)
-- The key's absolute expiry (Redis 7+), so that what follows it expires
-- at exactly the same millisecond; PTTL and PEXPIRE may read the clock a
-- millisecond apart. Older Redis: relative, as close as it gets.
local at = redis.pcall('PEXPIRETIME', key)
if type(at) ~= 'number' then at = nil end
local function expire_with_key(k)
  if at then redis.call('PEXPIREAT', k, at) else redis.call('PEXPIRE', k, pttl) end
end
if pttl == -2 then
  for i = 3, #KEYS do redis.call('SREM', KEYS[i], key) end
  if redis.call('TYPE', rev).ok == 'set' then
    for _, t in ipairs(redis.call('SMEMBERS', rev)) do
      redis.call('SREM', prefix .. 'tag:' .. t, key)
    end
  end
  redis.call('DEL', rev)
  return 0
end
local added = 0
for i = 3, #KEYS do
  local side, tag = KEYS[i], ARGV[i - 1]
  local sttl = redis.call('PTTL', side)
  added = added + redis.call('SADD', side, key)
  if pttl == -1 then
    redis.call('PERSIST', side)
  elseif sttl == -2 or (sttl >= 0 and sttl < pttl) then
    expire_with_key(side)
  end
  redis.call('SADD', rev, tag)
  local sample = redis.call('SRANDMEMBER', side, 2)
  for _, m in ipairs(sample) do
    if redis.call('EXISTS', m) == 0 or not tagged(prefix, m, tag) then
      redis.call('SREM', side, m)
    end
  end
end
-- Tags given earlier (CACHE.TAG) must cover the key's new expiry too.
if redis.call('TYPE', rev).ok == 'set' then
  for _, t in ipairs(redis.call('SMEMBERS', rev)) do
    local side = prefix .. 'tag:' .. t
    if redis.call('SISMEMBER', side, key) == 1 then
      local sttl = redis.call('PTTL', side)
      if pttl == -1 then
        redis.call('PERSIST', side)
      elseif sttl >= 0 and sttl < pttl then
        expire_with_key(side)
      end
    end
  end
end
if pttl == -1 then
  redis.call('PERSIST', rev)
else
  expire_with_key(rev)
end
return added
";

/// `KEYS[1]` the sidecar of tag `ARGV[2]` (`ARGV[1]` the prefix): pops up
/// to `ARGV[3]` members and deletes those that carry the tag, with their
/// bookkeeping (their reverse index, and their place in their other tags).
/// Returns how many keys were deleted, then the members popped. One script,
/// so that a failure cannot pop members without deleting them.
const DRAIN_TAG: &str = r"
local prefix, tag, removed = ARGV[1], ARGV[2], 0
local members = redis.call('SPOP', KEYS[1], tonumber(ARGV[3]))
for _, key in ipairs(members) do
  if tagged(prefix, key, tag) then
    removed = removed + redis.call('UNLINK', key)
    local rev = prefix .. 'keytags:' .. key
    for _, t in ipairs(redis.call('SMEMBERS', rev)) do
      if t ~= tag then redis.call('SREM', prefix .. 'tag:' .. t, key) end
    end
    redis.call('UNLINK', rev)
  end
end
table.insert(members, 1, removed)
return members
";

/// `KEYS` keys a write may have removed (`ARGV[1]` the prefix): those that
/// are gone lose their tags (their reverse index, and their place in the
/// sidecars it names). See [`forget_command`].
const FORGET: &str = r"
local prefix = ARGV[1]
for _, key in ipairs(KEYS) do
  local rev = prefix .. 'keytags:' .. key
  if redis.call('EXISTS', key) == 0 and redis.call('TYPE', rev).ok == 'set' then
    for _, t in ipairs(redis.call('SMEMBERS', rev)) do
      redis.call('SREM', prefix .. 'tag:' .. t, key)
    end
    redis.call('UNLINK', rev)
  end
end
return 0
";

/// `KEYS` keys to delete (`ARGV[1]` the prefix): unlinks them and their
/// tag bookkeeping; returns how many keys existed.
const DROP_KEYS: &str = r"
local prefix, removed = ARGV[1], 0
for _, key in ipairs(KEYS) do
  removed = removed + redis.call('UNLINK', key)
  local rev = prefix .. 'keytags:' .. key
  if redis.call('TYPE', rev).ok == 'set' then
    for _, t in ipairs(redis.call('SMEMBERS', rev)) do
      redis.call('SREM', prefix .. 'tag:' .. t, key)
    end
    redis.call('UNLINK', rev)
  end
end
return removed
";

/// `KEYS[1]` the sidecar of tag `ARGV[2]` (`ARGV[1]` the prefix),
/// `KEYS[2..]` members read from it: returns those that exist and carry the
/// tag, removes the others from the sidecar.
const LIVE_MEMBERS: &str = r"
local prefix, tag, out = ARGV[1], ARGV[2], {}
for i = 2, #KEYS do
  local m = KEYS[i]
  if redis.call('EXISTS', m) == 1 and tagged(prefix, m, tag) then
    out[#out + 1] = m
  else
    redis.call('SREM', KEYS[1], m)
  end
end
return out
";

/// `KEYS[1]` a key, `KEYS[2]` its reverse index: whether the key exists;
/// when it does not, the reverse index goes too.
const KEY_EXISTS: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return 1 end
redis.call('DEL', KEYS[2])
return 0
";

/// `KEYS[1]` a reverse index, `KEYS[2]` its key, `KEYS[3..]` sidecars,
/// `ARGV[i]` the tag of sidecar `KEYS[i + 2]`: returns the tags whose
/// sidecar still holds the key, removes the others from the reverse index.
const LIVE_TAGS: &str = r"
local out = {}
for i = 3, #KEYS do
  if redis.call('SISMEMBER', KEYS[i], KEYS[2]) == 1 then
    out[#out + 1] = ARGV[i - 2]
  else
    redis.call('SREM', KEYS[1], ARGV[i - 2])
  end
end
return out
";

/// The sidecar of tag `tag`: `{prefix}tag:{tag}`.
pub fn sidecar(prefix: &[u8], tag: &[u8]) -> Vec<u8> {
    [prefix, b"tag:", tag].concat()
}

/// The reverse index of `key`: `{prefix}keytags:{key}`.
pub fn reverse_index(prefix: &[u8], key: &[u8]) -> Vec<u8> {
    [prefix, b"keytags:", key].concat()
}

/// `EVAL script numkeys keys… args…`, encoded; the script is `parts`
/// joined (a shared function such as [`TAGGED`], then the body).
fn eval(parts: &[&str], keys: &[&[u8]], args: &[&[u8]]) -> Bytes {
    let script = parts.concat();
    let numkeys = keys.len().to_string();
    let mut argv: Vec<&[u8]> = Vec::with_capacity(3 + keys.len() + args.len());
    argv.extend_from_slice(&[b"EVAL", script.as_bytes(), numkeys.as_bytes()]);
    argv.extend_from_slice(keys);
    argv.extend_from_slice(args);
    reply::encode_command(&argv)
}

/// The command that registers `key` under `tags` (duplicates ignored):
/// an `EVAL` of a script that, atomically,
///
/// - when the key does not exist, drops it from those sidecars and from
///   every sidecar its reverse index names, deletes the reverse index, and
///   returns 0 (so a write that deletes a key, wrapped like any tagged
///   write, takes its tags with it);
/// - otherwise adds it to each sidecar, extends each sidecar's expiry to
///   cover the key (no expiry if the key has none; a sidecar without one
///   keeps none), and does the same for the sidecars of the tags the key
///   already had (given with `CACHE.TAG`, say), records the tags in the
///   key's reverse index, which gets the key's exact expiry, and prunes two
///   random members of each sidecar that no longer exist or no longer
///   carry the tag;
/// - returns how many sidecars the key was newly added to.
///
/// It reads the key's TTL when it runs, so it belongs *after* the write it
/// tags; it works inside `MULTI`, where it sees the write's effect.
pub fn register_command(prefix: &[u8], key: &[u8], tags: &[Vec<u8>]) -> Bytes {
    let mut seen = HashSet::with_capacity(tags.len());
    let tags: Vec<&[u8]> = tags
        .iter()
        .map(Vec::as_slice)
        .filter(|t| seen.insert(*t))
        .collect();
    let sidecars: Vec<Vec<u8>> = tags.iter().map(|t| sidecar(prefix, t)).collect();
    let rev = reverse_index(prefix, key);
    let mut keys: Vec<&[u8]> = Vec::with_capacity(2 + sidecars.len());
    keys.push(key);
    keys.push(&rev);
    keys.extend(sidecars.iter().map(Vec::as_slice));
    let mut args: Vec<&[u8]> = Vec::with_capacity(1 + tags.len());
    args.push(prefix);
    args.extend(tags);
    eval(&[TAGGED, REGISTER], &keys, &args)
}

/// The command that makes keys a write removed (`DEL k1 k2 …`) lose their
/// tags: one `EVAL` for all of them, which leaves the keys that still exist
/// alone. It belongs *after* the write, inside the same `MULTI`.
pub fn forget_command(prefix: &[u8], keys: &[&[u8]]) -> Bytes {
    eval(&[FORGET], keys, &[prefix])
}

/// Sends `requests` back to back on `conn` (nothing from other senders
/// comes between them) and returns their replies in order.
///
/// # Errors
///
/// When the connection cannot take them, or is lost or times out before
/// every reply arrived.
pub async fn pipeline(conn: &Conn, requests: &[Bytes]) -> Result<Vec<Bytes>, UpstreamError> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let batch: Vec<(&[u8], ReplyTo<'_>)> = requests
        .iter()
        .zip(0u64..)
        .map(|(raw, seq)| {
            (
                &raw[..],
                ReplyTo::Inbox {
                    seq,
                    inbox: &tx,
                    timed: true,
                },
            )
        })
        .collect();
    conn.send_all(&batch)?;
    drop(batch);
    // Each waiter holds its own sender; with ours gone, a waiter dropped
    // without an answer ends the wait instead of hanging it.
    drop(tx);
    let mut replies = Vec::with_capacity(requests.len());
    while replies.len() < requests.len() {
        match rx.recv().await {
            Some(Upstreamed::Reply { reply, .. }) => replies.push(reply?),
            // A push on a shared connection just before a reply belongs to
            // that request: tierd's own, dropped.
            Some(Upstreamed::Push(_)) => {}
            Some(Upstreamed::Closed(e)) => return Err(e),
            None => return Err(UpstreamError::unavailable("connection lost")),
        }
    }
    Ok(replies)
}

/// One request whose error reply is a [`TagError::Refused`].
async fn call(conn: &Conn, raw: &[u8]) -> Result<Bytes, TagError> {
    let frame = conn.request(raw).await?;
    refused(frame)
}

fn refused(frame: Bytes) -> Result<Bytes, TagError> {
    if inspect::is_error(&frame) {
        return Err(TagError::Refused(frame));
    }
    Ok(frame)
}

/// A non-negative integer reply.
fn count(frame: &[u8], what: &'static str) -> Result<u64, TagError> {
    integer(frame)
        .and_then(|n| u64::try_from(n).ok())
        .ok_or(TagError::Unexpected(what))
}

/// An array (or RESP3 set) of strings.
fn strings(frame: &[u8], what: &'static str) -> Result<Vec<Bytes>, TagError> {
    if !matches!(frame.first(), Some(b'*' | b'~')) {
        return Err(TagError::Unexpected(what));
    }
    let els = inspect::elements(frame, DEPTH).ok_or(TagError::Unexpected(what))?;
    els.into_iter()
        .map(|e| {
            inspect::string_payload(e)
                .map(Bytes::copy_from_slice)
                .ok_or(TagError::Unexpected(what))
        })
        .collect()
}

/// A `SCAN`-family reply: the next cursor and the batch.
fn scan_reply(frame: &[u8], what: &'static str) -> Result<(Bytes, Vec<Bytes>), TagError> {
    let els = inspect::elements(frame, DEPTH).ok_or(TagError::Unexpected(what))?;
    let [cursor, batch] = els[..] else {
        return Err(TagError::Unexpected(what));
    };
    let cursor = inspect::string_payload(cursor).ok_or(TagError::Unexpected(what))?;
    Ok((Bytes::copy_from_slice(cursor), strings(batch, what)?))
}

/// `UNLINK`s `keys` and their tag bookkeeping, [`BATCH`] per script;
/// how many keys existed.
async fn unlink(conn: &Conn, prefix: &[u8], keys: &[Bytes]) -> Result<u64, TagError> {
    let mut removed = 0;
    for chunk in keys.chunks(BATCH) {
        let keys: Vec<&[u8]> = chunk.iter().map(|k| &k[..]).collect();
        let frame = call(conn, &eval(&[DROP_KEYS], &keys, &[prefix])).await?;
        removed += count(&frame, "the key drop script")?;
    }
    Ok(removed)
}

/// Deletes every key tagged `tag`; returns how many keys were removed.
/// `on_batch` sees each batch of keys once it is gone (for the caller to
/// drop them from L1 everywhere).
///
/// The sidecar is drained [`BATCH`] members at a time (one script pops
/// them and deletes those that still carry the tag by their reverse index,
/// with their bookkeeping), at most as many members as it
/// had at the start: keys tagged while this runs may or may not go, but a
/// stream of new ones cannot keep it going forever. What a failure leaves
/// is still in the sidecar, so running the command again finishes the job.
///
/// # Errors
///
/// When upstream fails or refuses a step; the batches already announced
/// are gone.
pub async fn invalidate_tag(
    conn: &Conn,
    prefix: &[u8],
    tag: &[u8],
    mut on_batch: impl FnMut(&[Bytes]),
) -> Result<u64, TagError> {
    let side = sidecar(prefix, tag);
    let scard = call(conn, &reply::encode_command(&[b"SCARD", &side])).await?;
    let mut left = count(&scard, "SCARD")?;
    let mut removed = 0;
    while left > 0 {
        let n = left.min(BATCH as u64).to_string();
        let frame = call(
            conn,
            &eval(&[TAGGED, DRAIN_TAG], &[&side], &[prefix, tag, n.as_bytes()]),
        )
        .await?;
        let what = "the tag drain script";
        let els = inspect::elements(&frame, DEPTH).ok_or(TagError::Unexpected(what))?;
        let (first, rest) = els.split_first().ok_or(TagError::Unexpected(what))?;
        removed += count(first, what)?;
        let members: Vec<Bytes> = rest
            .iter()
            .map(|m| inspect::string_payload(m).map(Bytes::copy_from_slice))
            .collect::<Option<_>>()
            .ok_or(TagError::Unexpected(what))?;
        if members.is_empty() {
            break;
        }
        left = left.saturating_sub(members.len() as u64);
        on_batch(&members);
    }
    Ok(removed)
}

/// Deletes every key matching the Redis glob `glob`, walking the keyspace
/// with `SCAN … MATCH glob COUNT 1000` (never `KEYS`) and unlinking each
/// batch; returns how many keys were removed. `on_batch` sees each batch
/// once it is gone.
///
/// Like `SCAN`, it removes every key that matched throughout the walk;
/// keys created meanwhile may or may not be.
///
/// # Errors
///
/// When upstream fails or refuses a step; the batches already announced
/// are gone.
pub async fn invalidate_pattern(
    conn: &Conn,
    prefix: &[u8],
    glob: &[u8],
    mut on_batch: impl FnMut(&[Bytes]),
) -> Result<u64, TagError> {
    let batch = BATCH.to_string();
    let mut cursor = Bytes::from_static(b"0");
    let mut removed = 0;
    loop {
        let scan =
            reply::encode_command(&[b"SCAN", &cursor, b"MATCH", glob, b"COUNT", batch.as_bytes()]);
        let (next, keys) = scan_reply(&call(conn, &scan).await?, "SCAN")?;
        if !keys.is_empty() {
            removed += unlink(conn, prefix, &keys).await?;
            on_batch(&keys);
        }
        if &next[..] == b"0" {
            return Ok(removed);
        }
        cursor = next;
    }
}

/// Deletes `keys` (`UNLINK`, [`BATCH`] at a time); returns how many
/// existed.
///
/// # Errors
///
/// When upstream fails or refuses a batch; earlier batches are gone.
pub async fn invalidate_keys(conn: &Conn, prefix: &[u8], keys: &[Bytes]) -> Result<u64, TagError> {
    unlink(conn, prefix, keys).await
}

/// Tags an existing `key` with `tags` ([`register_command`]); returns how
/// many of the tags it did not have yet, 0 when the key does not exist.
///
/// # Errors
///
/// When upstream fails or refuses the script.
pub async fn tag_key(
    conn: &Conn,
    prefix: &[u8],
    key: &[u8],
    tags: &[Vec<u8>],
) -> Result<u64, TagError> {
    let frame = call(conn, &register_command(prefix, key, tags)).await?;
    count(&frame, "the tag registration script")
}

/// Writes `set` (a complete `SET key value …` request) and registers `key`
/// under `tags` in one transaction: `MULTI`, `SET …`, the registration,
/// `EXEC`, sent back to back. Returns the reply `SET` got, as the client
/// would have: its error when Redis refused it while queueing, else its
/// element of `EXEC`'s reply. Without tags it is the plain `SET`.
///
/// # Errors
///
/// When upstream fails, refuses the registration while queueing (the
/// transaction is then discarded, nothing was written), or the reply does
/// not have the expected shape. A registration that fails when it runs
/// (after the write) is logged, not an error: the write happened.
pub async fn set_tagged(
    conn: &Conn,
    prefix: &[u8],
    set: Bytes,
    key: &[u8],
    tags: &[Vec<u8>],
) -> Result<Bytes, TagError> {
    if tags.is_empty() {
        return Ok(conn.request(&set).await?);
    }
    let replies = pipeline(
        conn,
        &[
            reply::encode_command(&[b"MULTI"]),
            set,
            register_command(prefix, key, tags),
            reply::encode_command(&[b"EXEC"]),
        ],
    )
    .await?;
    let [multi, set_queued, register_queued, exec] = &replies[..] else {
        return Err(TagError::Unexpected("MULTI"));
    };
    refused(multi.clone())?;
    if inspect::is_error(set_queued) {
        return Ok(set_queued.clone());
    }
    refused(register_queued.clone())?;
    // EXEC's own error (EXECABORT …) cannot happen when both commands were
    // queued, but is still Redis's word.
    let exec = refused(exec.clone())?;
    let results = inspect::elements(&exec, DEPTH)
        .filter(|_| exec.first() == Some(&b'*'))
        .ok_or(TagError::Unexpected("EXEC"))?;
    let [set_reply, register_reply] = results[..] else {
        return Err(TagError::Unexpected("EXEC"));
    };
    if inspect::is_error(register_reply) {
        tracing::warn!(
            event = "tag_register_failed",
            reply = %String::from_utf8_lossy(register_reply).trim_end(),
            "registering a key's tags failed after its write"
        );
    }
    Ok(Bytes::copy_from_slice(set_reply))
}

/// The keys tagged `tag` that still exist, sorted. Members found dead are
/// removed from the sidecar on the way ([`BATCH`] per step: `SSCAN`, then
/// one script that keeps the live ones).
///
/// # Errors
///
/// When upstream fails or refuses a step.
pub async fn members(conn: &Conn, prefix: &[u8], tag: &[u8]) -> Result<Vec<Bytes>, TagError> {
    let side = sidecar(prefix, tag);
    sscan_checked(conn, &side, "the member check script", |chunk| {
        let mut keys: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 1);
        keys.push(&side);
        keys.extend(chunk.iter().map(|k| &k[..]));
        eval(&[TAGGED, LIVE_MEMBERS], &keys, &[prefix, tag])
    })
    .await
}

/// Walks the set `set` with `SSCAN` ([`BATCH`] per step) and sends, for each
/// chunk of members, the script `check` builds, which answers the members
/// to keep (and prunes the others); returns those, sorted and without the
/// repeats `SSCAN` may give.
async fn sscan_checked(
    conn: &Conn,
    set: &[u8],
    what: &'static str,
    check: impl Fn(&[Bytes]) -> Bytes,
) -> Result<Vec<Bytes>, TagError> {
    let batch = BATCH.to_string();
    let mut cursor = Bytes::from_static(b"0");
    let mut out = Vec::new();
    loop {
        let sscan = reply::encode_command(&[b"SSCAN", set, &cursor, b"COUNT", batch.as_bytes()]);
        let (next, found) = scan_reply(&call(conn, &sscan).await?, "SSCAN")?;
        // `COUNT` is a hint: a large batch is checked in several scripts.
        for chunk in found.chunks(BATCH) {
            let kept = call(conn, &check(chunk)).await?;
            out.extend(strings(&kept, what)?);
        }
        if &next[..] == b"0" {
            break;
        }
        cursor = next;
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The tags of `key` whose sidecars still hold it, sorted; tags found
/// stale are removed from its reverse index on the way. Empty when the key
/// does not exist (its reverse index is then deleted).
///
/// # Errors
///
/// When upstream fails or refuses a step.
pub async fn tags_of(conn: &Conn, prefix: &[u8], key: &[u8]) -> Result<Vec<Bytes>, TagError> {
    let rev = reverse_index(prefix, key);
    let exists = call(conn, &eval(&[KEY_EXISTS], &[key, &rev], &[])).await?;
    if count(&exists, "the key check script")? == 0 {
        return Ok(Vec::new());
    }
    sscan_checked(conn, &rev, "the tag check script", |chunk| {
        let sidecars: Vec<Vec<u8>> = chunk.iter().map(|t| sidecar(prefix, t)).collect();
        let mut keys: Vec<&[u8]> = Vec::with_capacity(chunk.len() + 2);
        keys.push(&rev);
        keys.push(key);
        keys.extend(sidecars.iter().map(Vec::as_slice));
        let args: Vec<&[u8]> = chunk.iter().map(|t| &t[..]).collect();
        eval(&[LIVE_TAGS], &keys, &args)
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::protocol::parse::{ParseLimits, RequestParser};

    /// The arguments of an encoded command, as Redis would read them.
    fn args(raw: &Bytes) -> Vec<Vec<u8>> {
        let mut parser = RequestParser::new(ParseLimits::default());
        let mut buf = BytesMut::from(&raw[..]);
        let req = parser.parse(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        req.args.iter().map(|a| a.to_vec()).collect()
    }

    #[test]
    fn sidecar_and_reverse_index_names() {
        assert_eq!(sidecar(b"tierd:", b"user:1"), b"tierd:tag:user:1");
        assert_eq!(reverse_index(b"tierd:", b"k"), b"tierd:keytags:k");
    }

    #[test]
    fn register_declares_key_index_and_sidecars_once_per_tag() {
        let tags = vec![b"a".to_vec(), b"b b".to_vec(), b"a".to_vec()];
        let got = args(&register_command(b"p:", b"k\r\n", &tags));
        assert_eq!(got[0], b"EVAL");
        assert_eq!(got[1], [TAGGED, REGISTER].concat().as_bytes());
        assert_eq!(got[2], b"4");
        assert_eq!(
            &got[3..],
            &[
                b"k\r\n".to_vec(),
                b"p:keytags:k\r\n".to_vec(),
                b"p:tag:a".to_vec(),
                b"p:tag:b b".to_vec(),
                b"p:".to_vec(),
                b"a".to_vec(),
                b"b b".to_vec(),
            ]
        );
        let none = args(&register_command(b"p:", b"k", &[]));
        assert_eq!(none[2], b"2");
        assert_eq!(none.len(), 6);
    }

    #[test]
    fn reply_helpers_read_resp2_and_resp3() {
        assert_eq!(integer(b":42\r\n"), Some(42));
        assert_eq!(integer(b"$2\r\n42\r\n"), None);
        assert!(matches!(
            count(b":-1\r\n", "x"),
            Err(TagError::Unexpected("x"))
        ));
        let two = vec![Bytes::from_static(b"a"), Bytes::from_static(b"")];
        assert_eq!(strings(b"*2\r\n$1\r\na\r\n$0\r\n\r\n", "x").unwrap(), two);
        assert_eq!(strings(b"~2\r\n$1\r\na\r\n$0\r\n\r\n", "x").unwrap(), two);
        assert!(strings(b"*1\r\n:1\r\n", "x").is_err());
        assert!(strings(b"%1\r\n$1\r\na\r\n$1\r\nb\r\n", "x").is_err());
        let (cursor, keys) = scan_reply(b"*2\r\n$3\r\n170\r\n*1\r\n$1\r\nk\r\n", "x").unwrap();
        assert_eq!(&cursor[..], b"170");
        assert_eq!(keys, vec![Bytes::from_static(b"k")]);
        assert!(scan_reply(b"*1\r\n$1\r\n0\r\n", "x").is_err());
    }

    #[test]
    fn errors_become_replies() {
        let refused = TagError::Refused(Bytes::from_static(b"-NOPERM no\r\n"));
        assert_eq!(&refused.to_resp()[..], b"-NOPERM no\r\n");
        assert_eq!(refused.to_string(), "upstream refused: NOPERM no");
        let down = TagError::Upstream(UpstreamError::unavailable("gone"));
        assert_eq!(&down.to_resp()[..], b"-ERR upstream unavailable: gone\r\n");
        assert!(TagError::Unexpected("SCAN")
            .to_resp()
            .starts_with(b"-ERR upstream unavailable: unexpected reply to SCAN"));
    }
}
