//! The `CACHE.*` commands that do upstream I/O: invalidation by tag,
//! pattern or key, tagging, tagged writes, tag listings, and warming.
//!
//! Each is a *job*: it runs alone on the client's session, after the
//! client's requests in flight have been answered, and the session waits
//! for it before looking at the next request. It runs on the connection the
//! client's next request would use (its dedicated one when its state needs
//! it, e.g. another db; else a pooled one of its identity and protocol), so
//! it sees the client's db and Redis applies the client's ACLs. The Redis
//! side is in [`crate::invalidation::tags`]; here the commands are parsed,
//! L1 and the other instances are told what went away, and the outcome is
//! logged and counted. `CACHE.WARM` is the exception: it fills L1, which
//! holds the default identity's view of the default db, so it runs on
//! tierd's own connections ([`super::warm`]), for default-identity clients
//! only.

use std::future::Future;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::cache::{announce_keys, announce_pattern, invalidate_local};
use super::{choose, error, Flow, Want};
use crate::admin::{arity, shown};
use crate::cache::glob::MAX_PATTERN_LEN;
use crate::invalidation::tags::{self, TagError};
use crate::metrics::Source;
use crate::protocol::parse::string2ll;
use crate::protocol::{reply, Request};
use crate::session::{Ctx, Route, Session};
use crate::upstream::{Conn, Upstreamed};

/// Whether `req` (a `CACHE.*` command) is one of the jobs run here rather
/// than an answer from tierd's own state ([`crate::admin::command`]).
pub(crate) fn is_job(req: &Request) -> bool {
    let sub = req.name().get(b"CACHE.".len()..).unwrap_or_default();
    crate::admin::JOBS
        .iter()
        .any(|j| sub.eq_ignore_ascii_case(j.as_bytes()))
}

/// A parsed job.
#[derive(Debug, PartialEq, Eq)]
enum Job {
    /// `CACHE.INVALIDATE TAG tag [tag ...]`
    Tags(Vec<Bytes>),
    /// `CACHE.INVALIDATE PATTERN glob [L1ONLY]`
    Pattern { glob: Bytes, l1_only: bool },
    /// `CACHE.INVALIDATE KEY key [key ...]`
    Keys(Vec<Bytes>),
    /// `CACHE.TAG key tag [tag ...]`
    Tag { key: Bytes, tags: Vec<Bytes> },
    /// `CACHE.SET key value [EX seconds|PX milliseconds] [TAGS tag [tag ...]]`:
    /// `set` is the `SET` request to send.
    Set {
        key: Bytes,
        set: Bytes,
        tags: Vec<Bytes>,
    },
    /// `CACHE.TAGS key`
    TagsOf(Bytes),
    /// `CACHE.MEMBERS tag`
    Members(Bytes),
    /// `CACHE.WARM [rule]`
    Warm(Option<Bytes>),
}

/// Parses a job; the error is the client's reply.
fn parse(req: &Request) -> Result<Job, Bytes> {
    let sub = req.name().get(b"CACHE.".len()..).unwrap_or_default();
    let is = |what: &[u8]| sub.eq_ignore_ascii_case(what);
    let argc = req.args.len();
    let rest = |from: usize| req.args.get(from..).unwrap_or_default().to_vec();
    if is(b"INVALIDATE") {
        let (Some(kind), Some(first)) = (req.arg(1), req.arg(2)) else {
            return Err(arity("cache.invalidate"));
        };
        if kind.eq_ignore_ascii_case(b"TAG") {
            Ok(Job::Tags(rest(2)))
        } else if kind.eq_ignore_ascii_case(b"KEY") {
            Ok(Job::Keys(rest(2)))
        } else if kind.eq_ignore_ascii_case(b"PATTERN") {
            let l1_only = match req.arg(3) {
                None => false,
                Some(opt) if argc == 4 && opt.eq_ignore_ascii_case(b"L1ONLY") => true,
                Some(_) => return Err(error("ERR syntax error")),
            };
            if first.len() > MAX_PATTERN_LEN {
                return Err(error(&format!(
                    "ERR pattern is longer than {MAX_PATTERN_LEN} bytes"
                )));
            }
            Ok(Job::Pattern {
                glob: first.clone(),
                l1_only,
            })
        } else {
            Err(error(&format!(
                "ERR unknown CACHE.INVALIDATE kind '{}', expected TAG, PATTERN or KEY",
                shown(kind)
            )))
        }
    } else if is(b"TAG") {
        match (req.arg(1), argc) {
            (Some(key), 3..) => Ok(Job::Tag {
                key: key.clone(),
                tags: rest(2),
            }),
            _ => Err(arity("cache.tag")),
        }
    } else if is(b"SET") {
        parse_set(req)
    } else if is(b"TAGS") {
        match (req.arg(1), argc) {
            (Some(key), 2) => Ok(Job::TagsOf(key.clone())),
            _ => Err(arity("cache.tags")),
        }
    } else if is(b"MEMBERS") {
        match (req.arg(1), argc) {
            (Some(tag), 2) => Ok(Job::Members(tag.clone())),
            _ => Err(arity("cache.members")),
        }
    } else if is(b"WARM") {
        match argc {
            1 | 2 => Ok(Job::Warm(req.arg(1).cloned())),
            _ => Err(arity("cache.warm")),
        }
    } else {
        Err(error(&format!(
            "ERR unknown command '{}'",
            shown(req.name())
        )))
    }
}

/// `CACHE.SET key value [EX seconds|PX milliseconds] [TAGS tag [tag ...]]`,
/// checked as Redis's `SET` checks its options, so that a bad expiry is
/// refused before anything is sent.
fn parse_set(req: &Request) -> Result<Job, Bytes> {
    let (Some(key), Some(value)) = (req.arg(1), req.arg(2)) else {
        return Err(arity("cache.set"));
    };
    let mut expire: Option<(&[u8], &Bytes)> = None;
    let mut tags = Vec::new();
    let mut i = 3;
    while let Some(opt) = req.arg(i) {
        let unit: &[u8] = if opt.eq_ignore_ascii_case(b"EX") {
            b"EX"
        } else if opt.eq_ignore_ascii_case(b"PX") {
            b"PX"
        } else if opt.eq_ignore_ascii_case(b"TAGS") {
            tags = req.args.get(i + 1..).unwrap_or_default().to_vec();
            if tags.is_empty() {
                return Err(error("ERR TAGS needs at least one tag"));
            }
            break;
        } else {
            return Err(error("ERR syntax error"));
        };
        let Some(n) = req.arg(i + 1).filter(|_| expire.is_none()) else {
            return Err(error("ERR syntax error"));
        };
        // Redis's own checks (`parseExtendedStringArgumentsOrReply`).
        let Some(v) = string2ll(n) else {
            return Err(error("ERR value is not an integer or out of range"));
        };
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let ms = if unit == b"EX" {
            v.checked_mul(1000)
        } else {
            Some(v)
        };
        if v <= 0 || ms.and_then(|ms| ms.checked_add(now_ms)).is_none() {
            return Err(error("ERR invalid expire time in 'cache.set' command"));
        }
        expire = Some((unit, n));
        i += 2;
    }
    let mut set: Vec<&[u8]> = vec![b"SET", key, value];
    if let Some((unit, n)) = expire {
        set.extend_from_slice(&[unit, n]);
    }
    Ok(Job::Set {
        key: key.clone(),
        set: reply::encode_command(&set),
        tags,
    })
}

/// Runs a `CACHE.*` job ([`is_job`]) for the client and queues its reply.
///
/// # Format
///
/// ```text
/// CACHE.INVALIDATE TAG tag [tag ...]
/// CACHE.INVALIDATE PATTERN pattern [L1ONLY]
/// CACHE.INVALIDATE KEY key [key ...]
/// CACHE.TAG key tag [tag ...]
/// CACHE.SET key value [EX seconds|PX milliseconds] [TAGS tag [tag ...]]
/// CACHE.TAGS key
/// CACHE.MEMBERS tag
/// CACHE.WARM [rule]
/// ```
pub(crate) async fn run(s: &mut Session, req: Request) -> Flow {
    let job = match parse(&req) {
        Ok(job) => job,
        Err(reply) => {
            s.local(reply);
            return Flow::Continue;
        }
    };
    if s.inflight > 0 {
        return Flow::Stall(req);
    }
    if let Job::Pattern {
        glob,
        l1_only: true,
    } = &job
    {
        // Its count says how many cached keys match: like CACHE.KEYS, only
        // for the default identity, whose view L1 holds.
        if !s.ctx.upstream.is_default(&s.identity) {
            s.local(error(
                "NOPERM CACHE.INVALIDATE PATTERN … L1ONLY is only for clients on tierd's default identity",
            ));
            return Flow::Continue;
        }
        // Redis is not involved: no connection needed.
        let started = Instant::now();
        let dropped = announce_pattern(&s.ctx, s.state.db, glob).await;
        let target = Target::Pattern {
            glob,
            l1_only: true,
        };
        invalidated(&s.ctx, target, dropped, started);
        s.local(integer(dropped));
        return Flow::Continue;
    }
    if let Job::Warm(rule) = &job {
        // Warming fills L1, which holds the default identity's view, with
        // that identity's reads; its count says how many keys matched.
        if !s.ctx.upstream.is_default(&s.identity) {
            s.local(error(
                "NOPERM CACHE.WARM is only for clients on tierd's default identity",
            ));
            return Flow::Continue;
        }
        // tierd's own connections, not the client's: nothing to route.
        let reply = super::warm::command(&s.ctx, rule.as_deref()).await;
        s.local(reply);
        return Flow::Continue;
    }
    if matches!(job, Job::Set { .. }) && s.state.watching {
        // Its MULTI/EXEC would end the client's WATCH on the same
        // connection, and with it the client's optimistic lock.
        s.local(error("ERR CACHE.SET while WATCHing keys is not supported"));
        return Flow::Continue;
    }
    let route = choose(s, Want::Any);
    let Some(conn) = super::route_conn(s, route).await else {
        return Flow::Continue;
    };
    let ctx = s.ctx.clone();
    let db = s.state.db;
    let pushes = match route {
        Route::Pinned => s.pinned.as_mut().map(|p| &mut p.rx),
        Route::Pool { .. } => None,
    };
    let (reply, arrived) = drive(pushes, perform(&ctx, &conn, db, job)).await;
    // What the dedicated connection delivered meanwhile (tracking pushes,
    // its end) comes before the job's reply, as it did on the wire.
    for ev in arrived {
        s.on_upstream(ev, true);
    }
    s.local(reply);
    Flow::Continue
}

/// Awaits `work`. On a dedicated connection, its channel is drained
/// meanwhile and what arrived is handed back: a client tracking the keys a
/// job deletes gets a push per key, and a full channel would hold up the
/// connection, and with it the job's own replies, for good.
pub(super) async fn drive<F: Future>(
    pushes: Option<&mut mpsc::Receiver<Upstreamed>>,
    work: F,
) -> (F::Output, Vec<Upstreamed>) {
    let mut arrived = Vec::new();
    let Some(rx) = pushes else {
        return (work.await, arrived);
    };
    tokio::pin!(work);
    let mut open = true;
    loop {
        tokio::select! {
            out = &mut work => return (out, arrived),
            ev = rx.recv(), if open => match ev {
                Some(ev) => arrived.push(ev),
                None => open = false,
            },
        }
    }
}

fn integer(n: u64) -> Bytes {
    let mut out = BytesMut::new();
    reply::integer(&mut out, i64::try_from(n).unwrap_or(i64::MAX));
    out.freeze()
}

fn strings(items: &[Bytes]) -> Bytes {
    let mut out = BytesMut::new();
    reply::array_header(&mut out, items.len());
    for item in items {
        reply::bulk(&mut out, item);
    }
    out.freeze()
}

/// What an invalidation was asked to remove, for its log line.
#[derive(Clone, Copy)]
enum Target<'a> {
    Tag(&'a [u8]),
    Pattern { glob: &'a [u8], l1_only: bool },
    Keys,
}

/// Logs and counts one invalidation that removed `keys` keys.
fn invalidated(ctx: &Ctx, target: Target<'_>, keys: u64, started: Instant) {
    ctx.metrics.invalidated(Source::Command, keys);
    let duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    match target {
        Target::Tag(tag) => tracing::info!(
            event = "invalidated",
            source = "command",
            kind = "tag",
            tag = %shown(tag),
            keys,
            duration_ms,
            "tag invalidated"
        ),
        Target::Pattern { glob, l1_only } => tracing::info!(
            event = "invalidated",
            source = "command",
            kind = "pattern",
            pattern = %shown(glob),
            l1_only,
            keys,
            duration_ms,
            "pattern invalidated"
        ),
        Target::Keys => tracing::info!(
            event = "invalidated",
            source = "command",
            kind = "key",
            keys,
            duration_ms,
            "keys invalidated"
        ),
    }
}

/// Logs an invalidation that upstream failed or refused part way.
fn failed(target: Target<'_>, e: &TagError) {
    let (kind, what): (&str, &[u8]) = match target {
        Target::Tag(tag) => ("tag", tag),
        Target::Pattern { glob, .. } => ("pattern", glob),
        Target::Keys => ("key", b""),
    };
    tracing::warn!(
        event = "invalidation_failed",
        source = "command",
        kind,
        target = %shown(what),
        error = %e,
        "invalidation failed"
    );
}

/// Does the Redis side of `job` on `conn` (in `db`) and tells L1 and the
/// other instances what went; returns the client's reply.
async fn perform(ctx: &Ctx, conn: &Conn, db: u32, job: Job) -> Bytes {
    let prefix = ctx.config.invalidation.prefix.as_bytes();
    match job {
        Job::Tags(tag_list) => {
            let mut total = 0;
            for tag in &tag_list {
                let started = Instant::now();
                let announce = |batch: &[Bytes]| announce_keys(ctx, db, batch);
                match tags::invalidate_tag(conn, prefix, tag, announce).await {
                    Ok(n) => {
                        total += n;
                        invalidated(ctx, Target::Tag(tag), n, started);
                    }
                    Err(e) => {
                        failed(Target::Tag(tag), &e);
                        return e.to_resp();
                    }
                }
            }
            integer(total)
        }
        Job::Pattern { glob, .. } => {
            let started = Instant::now();
            let target = Target::Pattern {
                glob: &glob,
                l1_only: false,
            };
            let drop_here = |batch: &[Bytes]| invalidate_local(ctx, batch);
            let result = tags::invalidate_pattern(conn, prefix, &glob, drop_here).await;
            // Also after a failure: whatever went is announced.
            announce_pattern(ctx, db, &glob).await;
            match result {
                Ok(n) => {
                    invalidated(ctx, target, n, started);
                    integer(n)
                }
                Err(e) => {
                    failed(target, &e);
                    e.to_resp()
                }
            }
        }
        Job::Keys(keys) => {
            let started = Instant::now();
            invalidate_local(ctx, &keys);
            let result = tags::invalidate_keys(conn, prefix, &keys).await;
            announce_keys(ctx, db, &keys);
            match result {
                Ok(n) => {
                    invalidated(ctx, Target::Keys, n, started);
                    integer(n)
                }
                Err(e) => {
                    failed(Target::Keys, &e);
                    e.to_resp()
                }
            }
        }
        Job::Tag { key, tags: list } => {
            let list: Vec<Vec<u8>> = list.iter().map(|t| t.to_vec()).collect();
            match tags::tag_key(conn, prefix, &key, &list).await {
                Ok(n) => integer(n),
                Err(e) => e.to_resp(),
            }
        }
        Job::Set {
            key,
            set,
            tags: list,
        } => {
            let mut all: Vec<Vec<u8>> = list.iter().map(|t| t.to_vec()).collect();
            all.extend(ctx.rules.tags_for(&key));
            let keys = [key];
            invalidate_local(ctx, &keys);
            // The value is stored as a SET through tierd would store it.
            let set = super::compression::stored_set(ctx, set);
            let result = tags::set_tagged(conn, prefix, set, &keys[0], &all).await;
            announce_keys(ctx, db, &keys);
            ctx.metrics.invalidated(Source::Command, 1);
            result.unwrap_or_else(|e| e.to_resp())
        }
        Job::TagsOf(key) => match tags::tags_of(conn, prefix, &key).await {
            Ok(list) => strings(&list),
            Err(e) => e.to_resp(),
        },
        Job::Members(tag) => match tags::members(conn, prefix, &tag).await {
            Ok(list) => strings(&list),
            Err(e) => e.to_resp(),
        },
        // Run in `run`, without the client's connection: never here.
        Job::Warm(_) => error("ERR CACHE.WARM runs on tierd's own connections"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn job(args: &[&str]) -> Result<Job, String> {
        parse(&Request::from_strs(args)).map_err(|e| String::from_utf8_lossy(&e).into_owned())
    }

    fn b(v: &[&str]) -> Vec<Bytes> {
        v.iter()
            .map(|s| Bytes::copy_from_slice(s.as_bytes()))
            .collect()
    }

    #[test]
    fn routes_only_the_six_jobs() {
        for name in [
            "cache.invalidate",
            "CACHE.TAG",
            "Cache.Set",
            "cache.tags",
            "cache.members",
            "Cache.Warm",
        ] {
            assert!(is_job(&Request::from_strs(&[name, "x"])), "{name}");
        }
        for name in [
            "cache.stats",
            "cache.keys",
            "cache.help",
            "cache.tagz",
            "cache.",
        ] {
            assert!(!is_job(&Request::from_strs(&[name])), "{name}");
        }
    }

    #[test]
    fn invalidate_forms() {
        assert_eq!(
            job(&["cache.invalidate", "tag", "a", "b"]),
            Ok(Job::Tags(b(&["a", "b"])))
        );
        assert_eq!(
            job(&["CACHE.INVALIDATE", "KEY", "k"]),
            Ok(Job::Keys(b(&["k"])))
        );
        assert_eq!(
            job(&["cache.invalidate", "pattern", "user:*"]),
            Ok(Job::Pattern {
                glob: Bytes::from_static(b"user:*"),
                l1_only: false
            })
        );
        assert_eq!(
            job(&["cache.invalidate", "PATTERN", "user:*", "l1only"]),
            Ok(Job::Pattern {
                glob: Bytes::from_static(b"user:*"),
                l1_only: true
            })
        );
        let arity = "-ERR wrong number of arguments for 'cache.invalidate' command\r\n";
        assert_eq!(job(&["cache.invalidate"]).unwrap_err(), arity);
        assert_eq!(job(&["cache.invalidate", "tag"]).unwrap_err(), arity);
        assert_eq!(
            job(&["cache.invalidate", "pattern", "*", "l2only"]).unwrap_err(),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            job(&["cache.invalidate", "pattern", "*", "L1ONLY", "x"]).unwrap_err(),
            "-ERR syntax error\r\n"
        );
        assert_eq!(
            job(&["cache.invalidate", "prefix", "x"]).unwrap_err(),
            "-ERR unknown CACHE.INVALIDATE kind 'prefix', expected TAG, PATTERN or KEY\r\n"
        );
        let long = "*".repeat(MAX_PATTERN_LEN + 1);
        assert!(job(&["cache.invalidate", "pattern", &long])
            .unwrap_err()
            .starts_with("-ERR pattern is longer than"));
    }

    #[test]
    fn other_forms_and_arity() {
        assert_eq!(
            job(&["cache.tag", "k", "a", "b"]),
            Ok(Job::Tag {
                key: Bytes::from_static(b"k"),
                tags: b(&["a", "b"])
            })
        );
        assert_eq!(
            job(&["cache.tags", "k"]),
            Ok(Job::TagsOf(Bytes::from_static(b"k")))
        );
        assert_eq!(
            job(&["cache.members", "t"]),
            Ok(Job::Members(Bytes::from_static(b"t")))
        );
        assert_eq!(job(&["cache.warm"]), Ok(Job::Warm(None)));
        assert_eq!(
            job(&["CACHE.WARM", "users"]),
            Ok(Job::Warm(Some(Bytes::from_static(b"users"))))
        );
        for (args, name) in [
            (&["cache.tag", "k"][..], "cache.tag"),
            (&["cache.tags"][..], "cache.tags"),
            (&["cache.tags", "a", "b"][..], "cache.tags"),
            (&["cache.members"][..], "cache.members"),
            (&["cache.set", "k"][..], "cache.set"),
            (&["cache.warm", "a", "b"][..], "cache.warm"),
        ] {
            assert_eq!(
                job(args).unwrap_err(),
                format!("-ERR wrong number of arguments for '{name}' command\r\n")
            );
        }
    }

    fn set(args: &[&str]) -> Result<(Vec<String>, Vec<Bytes>), String> {
        match job(args)? {
            Job::Set { set, tags, .. } => {
                let req = crate::protocol::parse::RequestParser::new(Default::default())
                    .parse(&mut BytesMut::from(&set[..]))
                    .unwrap()
                    .unwrap();
                let sent = req
                    .args
                    .iter()
                    .map(|a| String::from_utf8_lossy(a).into_owned())
                    .collect();
                Ok((sent, tags))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn set_options() {
        assert_eq!(
            set(&["cache.set", "k", "v"]),
            Ok((vec!["SET".into(), "k".into(), "v".into()], vec![]))
        );
        assert_eq!(
            set(&["cache.set", "k", "v", "ex", "10", "TAGS", "a", "b"]),
            Ok((
                vec![
                    "SET".into(),
                    "k".into(),
                    "v".into(),
                    "EX".into(),
                    "10".into()
                ],
                b(&["a", "b"])
            ))
        );
        assert_eq!(
            set(&["cache.set", "k", "v", "PX", "1500"]).unwrap().0,
            ["SET", "k", "v", "PX", "1500"]
        );
        // TAGS takes the rest, even words that look like options.
        assert_eq!(
            set(&["cache.set", "k", "v", "tags", "EX", "1"]).unwrap().1,
            b(&["EX", "1"])
        );
        let syntax = "-ERR syntax error\r\n";
        assert_eq!(set(&["cache.set", "k", "v", "EX"]).unwrap_err(), syntax);
        assert_eq!(
            set(&["cache.set", "k", "v", "EX", "1", "PX", "1"]).unwrap_err(),
            syntax
        );
        assert_eq!(set(&["cache.set", "k", "v", "NX"]).unwrap_err(), syntax);
        assert_eq!(
            set(&["cache.set", "k", "v", "TAGS"]).unwrap_err(),
            "-ERR TAGS needs at least one tag\r\n"
        );
        assert_eq!(
            set(&["cache.set", "k", "v", "EX", "ten"]).unwrap_err(),
            "-ERR value is not an integer or out of range\r\n"
        );
        for bad in ["0", "-5", "9223372036854775807"] {
            assert_eq!(
                set(&["cache.set", "k", "v", "EX", bad]).unwrap_err(),
                "-ERR invalid expire time in 'cache.set' command\r\n",
                "{bad}"
            );
        }
        assert!(set(&["cache.set", "k", "v", "PX", "9223372036854775807"]).is_err());
        assert!(set(&["cache.set", "k", "v", "EX", "9223372036854775"]).is_err());
        assert!(set(&["cache.set", "k", "v", "EX", "100000000000"]).is_ok());
    }
}
