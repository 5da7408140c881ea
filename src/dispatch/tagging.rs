//! Rule-derived tags, registered atomically with the write that earns them.
//!
//! A rule with `tags = ["teacher:{teacher}"]` tags every key it matches
//! that a client writes through tierd. The client sends `SET k v` and
//! changes nothing; tierd sends, back to back on one connection,
//!
//! ```text
//! MULTI
//! SET k v                 the client's request, byte for byte
//! EVAL <register> …       one per written key with tags (invalidation::tags)
//! EXEC
//! ```
//!
//! so the sidecar sets change in the same transaction as the data, and the
//! client's reply is the write's own reply, taken from `EXEC`'s array (or
//! the error Redis gave when queuing it). The replies to `MULTI` and to the
//! queued commands are side requests (sequence numbers with
//! [`super::cache::SIDE`] set) and never reach the client.
//!
//! With any tagged rule configured, removals (`DEL`, `UNLINK`) are wrapped
//! too, whatever the key's rule: the registration of a key that is gone
//! drops the tags it carried, `CACHE.TAG`'s included.
//!
//! Not wrapped, and so not tagged: writes of clients on another identity
//! (the sidecars may be outside their ACL, and a refused `EVAL` would abort
//! their write), writes inside the client's own `MULTI` or while it
//! `WATCH`es (tierd's `EXEC` would end the client's watch), and blocking
//! commands (which do not block inside `MULTI`). `CACHE.TAG` tags any key
//! explicitly.

use bytes::Bytes;

use super::cache::{register, Hook, SIDE, SIDE_INDEX_BITS, TAG_DROP_INDEX, TAG_QUEUED_INDEX};
use super::{choose, must_wait, Flow, Want};
use crate::command::Keys;
use crate::protocol::{inspect, Request};
use crate::session::{Route, Session};
use crate::upstream::ReplyTo;

/// The `EVAL`s that register the tags of the keys `req` writes, if any
/// rule gives them tags and the session may have them registered.
pub(super) fn registrations(s: &mut Session, req: &Request) -> Vec<Bytes> {
    if !s.ctx.rules.any_tags()
        || !s.ctx.upstream.is_default(&s.identity)
        || s.state.multi
        || s.state.watching
    {
        return Vec::new();
    }
    let Some(table) = s.command_table() else {
        return Vec::new();
    };
    let Some(command) = table.resolve(&req.args) else {
        return Vec::new();
    };
    if !command.is_write() {
        return Vec::new();
    }
    let Keys::Known(keys) = command.keys(&req.args) else {
        return Vec::new();
    };
    let prefix = s.ctx.config.invalidation.prefix.as_bytes();
    let mut evals = Vec::new();
    let mut removed = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for k in keys.iter().filter(|k| k.write) {
        if !seen.insert(k.key) {
            continue;
        }
        let tags = s.ctx.rules.tags_for(k.key);
        if !tags.is_empty() {
            evals.push(crate::invalidation::tags::register_command(
                prefix, k.key, &tags,
            ));
        } else if k.flags.rm {
            // A key removed (`DEL`, `UNLINK`) may carry tags given with
            // `CACHE.TAG` whatever its rule: they go with it.
            removed.push(k.key);
        }
    }
    if !removed.is_empty() {
        evals.push(crate::invalidation::tags::forget_command(prefix, &removed));
    }
    evals
}

/// Sends the write `req` wrapped in `MULTI`/`EXEC` with `evals`; `hook` is
/// the write's own hook (invalidation), run on the write's reply.
pub(super) async fn forward(
    s: &mut Session,
    req: Request,
    want: Want,
    hook: Option<Hook>,
    evals: Vec<Bytes>,
) -> Flow {
    let route = choose(s, want);
    if must_wait(s, Some(route)) {
        return Flow::Stall(req);
    }
    let Some(conn) = super::route_conn(s, route).await else {
        return Flow::Continue;
    };
    let id = s.next_fill;
    s.next_fill += 1;
    let seq = s.pending_slot();
    register(
        s,
        seq,
        Hook::Tagged {
            id,
            write: hook.map(Box::new),
        },
    );
    let side = |index: u64| SIDE | (id << SIDE_INDEX_BITS) | index;
    let to = |seq: u64| match route {
        Route::Pinned => ReplyTo::Owner { seq, timed: true },
        Route::Pool { .. } => ReplyTo::Inbox {
            seq,
            inbox: &s.inbox,
            timed: true,
        },
    };
    let mut requests: Vec<(&[u8], ReplyTo<'_>)> = Vec::with_capacity(evals.len() + 3);
    requests.push((b"*1\r\n$5\r\nMULTI\r\n", to(side(TAG_DROP_INDEX))));
    requests.push((&req.raw, to(side(TAG_QUEUED_INDEX))));
    for eval in &evals {
        requests.push((eval, to(side(TAG_DROP_INDEX))));
    }
    requests.push((b"*1\r\n$4\r\nEXEC\r\n", to(seq)));
    let sent = conn.send_all(&requests);
    drop(requests);
    super::account_send(s, route, seq, sent);
    Flow::Continue
}

/// The client's reply from `EXEC`'s: the write's element, or the error
/// Redis gave when queuing the write (then `EXEC` answers `-EXECABORT`).
pub(crate) fn write_reply(s: &mut Session, id: u64, exec: Bytes) -> Bytes {
    if let Some(queued) = s.queued_errors.remove(&id) {
        return queued;
    }
    if inspect::is_error(&exec) {
        if exec.starts_with(b"-EXECABORT") {
            // The write queued fine, so tierd's own EVAL was refused (an
            // ACL without EVAL, say): nothing ran.
            return super::error(
                "ERR tierd could not register this write's tags (upstream refused EVAL inside MULTI); the write did not run",
            );
        }
        return exec;
    }
    let depth = s.ctx.config.limits.max_reply_depth;
    match inspect::elements(&exec, depth) {
        Some(els) if exec.first() == Some(&b'*') => {
            if let Some(failed) = els.iter().skip(1).find(|r| inspect::is_error(r)) {
                // The write ran; only its tags are missing.
                tracing::warn!(
                    event = "tag_register_failed",
                    reply = %String::from_utf8_lossy(failed).trim_end(),
                    "registering a key's tags failed after its write"
                );
            }
            match els.first() {
                Some(first) => exec.slice_ref(first),
                None => super::error("ERR upstream sent an empty EXEC reply"),
            }
        }
        _ => super::error("ERR upstream sent an unexpected reply to EXEC"),
    }
}
