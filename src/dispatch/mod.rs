//! The one place that decides where a request goes.
//!
//! Given a classified request and the session's state, the dispatcher
//! answers it locally (tierd's own `HELLO`, `CLIENT ID` …), sends it to the
//! shared pool, or sends it to the client's dedicated connection, and keeps
//! the mirrored connection state in step. The L1 tier slots in here, between
//! classification and upstream.
//!
//! Two ordering rules make pipelining across connections safe:
//!
//! - A session's requests in flight are all on one route. A request for
//!   another route waits ([`Flow::Stall`]) until they have been answered;
//!   otherwise `SET k v` on the pool and `GET k` on a pinned connection could
//!   run in either order.
//! - Requests that change how later requests are routed (`SELECT`, `AUTH`,
//!   `HELLO`, `RESET`) wait for everything in flight, then run to completion
//!   before the next request is looked at.
//!
//! The L1 tier's side of this (lookups, fills, invalidation around writes)
//! is in [`cache`]; the rules' other write strategies (write-through,
//! write-behind) are in [`writes`].
//!
//! This module calls down into `cache`, `upstream` and `protocol`; it never
//! touches sockets of its own.

pub(crate) mod cache;
pub(crate) mod compression;
pub(crate) mod emulate;
pub(crate) mod jobs;
pub(crate) mod stampede;
pub(crate) mod tagging;
pub(crate) mod warm;
pub(crate) mod writes;

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use crate::admin::{InfoPlan, Sections};
use crate::command::{classify, ClientSub, Kind};
use crate::protocol::parse::string2ll;
use crate::protocol::{inspect, reply, Proto, Request};
use crate::session::{ClientRef, Pinned, ReplyMode, Route, Session, Slot, PINNED_CHANNEL};
use crate::upstream::{Conn, Credentials, HelloInfo, Identity, ReplyTo, UpstreamError, Upstreamed};
use compression::Plan;

/// What the session does after a request was dispatched.
pub(crate) enum Flow {
    /// Go on with the next request.
    Continue,
    /// The request cannot be dispatched yet; retry once in-flight requests
    /// have been answered.
    Stall(Request),
    /// Write what is queued, then close the connection.
    Close,
}

/// Requests above this size go to a dedicated connection: on a shared one,
/// a client writing hundreds of megabytes would hold up every other client
/// whose requests queue behind it.
const LARGE_REQUEST: usize = 1024 * 1024;

/// Dispatches one request.
pub(crate) async fn dispatch(s: &mut Session, req: Request) -> Flow {
    // A RESET on a stream is on its way; nothing else may overtake it.
    if s.reset_at.is_some() {
        return Flow::Stall(req);
    }
    let kind = classify(&req);
    // Writes queued by write-behind: a GET of one is answered with its
    // value, other requests that touch one wait until it reached Redis.
    if let Some(flow) = writes::before_dispatch(s, kind, &req).await {
        return flow;
    }

    // In pub/sub or MONITOR mode the client talks to its connection as a
    // stream: everything is passed through, replies arrive as pushes. RESET
    // and QUIT end the stream; their replies are recognised in it.
    if s.pinned.as_ref().is_some_and(|p| p.stream) {
        return match kind {
            // In a stream `+OK` may be any command's reply, so QUIT's cannot
            // be recognised; but Redis closes the connection after it, and
            // that ends the stream in order.
            Kind::Quit => {
                let flow = forward_stream(s, req);
                s.quit_on_stream = true;
                match flow {
                    Flow::Continue => Flow::Close,
                    other => other,
                }
            }
            Kind::Reset => reset_stream(s, &req),
            // A RESP3 subscriber may send any command, but these two would
            // stop its replies from lining up with its requests, which is
            // how tierd knows when a write it sent on the stream has run.
            // (RESP2 subscribers get Redis's own refusal.)
            Kind::Multi | Kind::Client(ClientSub::Reply) if s.state.proto == Proto::Resp3 => {
                let name = if kind == Kind::Multi {
                    "MULTI"
                } else {
                    "CLIENT REPLY"
                };
                s.local(error(&format!(
                    "ERR {name} on a subscribed connection is not supported by tierd"
                )));
                Flow::Continue
            }
            _ => {
                if let Some(refusal) = compression::stream_refusal(&s.ctx, &req) {
                    s.local(refusal);
                    return Flow::Continue;
                }
                cache::before_stream_request(s, kind, &req);
                forward_stream(s, req)
            }
        };
    }

    // Inside MULTI, Redis queues everything except the transaction's own
    // commands, so tierd must not answer anything itself. State commands
    // take effect at EXEC, if EXEC runs them.
    if s.state.multi {
        return match kind {
            Kind::Quit => quit(s),
            Kind::Reset => reset(s, req).await,
            Kind::Exec | Kind::Discard => end_transaction(s, req, kind).await,
            // Executed at once, not queued (and not counted).
            Kind::Multi | Kind::Watch => forward(s, req, Want::Pinned, true).await,
            Kind::PubSub | Kind::Monitor => {
                // After EXEC the connection would be a stream that the
                // session did not see start.
                let name = String::from_utf8_lossy(req.name()).to_uppercase();
                s.local(error(&format!(
                    "ERR {name} inside MULTI is not supported by tierd"
                )));
                s.state.multi_aborted = true;
                Flow::Continue
            }
            Kind::Cache => {
                s.local(error("ERR CACHE commands inside MULTI are not supported"));
                s.state.multi_aborted = true;
                Flow::Continue
            }
            Kind::Client(ClientSub::Reply) => {
                // Redis would stop answering on the connection at EXEC,
                // which a multiplexing proxy cannot follow.
                s.local(error(
                    "ERR CLIENT REPLY inside MULTI is not supported by tierd",
                ));
                s.state.multi_aborted = true;
                Flow::Continue
            }
            // INFO is queued like any other command: its result in EXEC's
            // reply is upstream's alone, without tierd's sections.
            _ => {
                let req = match compression::plan(&s.ctx, &req) {
                    Plan::Pass => req,
                    Plan::Emulate => {
                        s.local(emulate::refused_in_multi(&req));
                        s.state.multi_aborted = true;
                        return Flow::Continue;
                    }
                    Plan::Forward { request, decode } => {
                        if let Some(decode) = decode {
                            s.multi_decodes.push((s.state.queued, decode));
                        }
                        request.unwrap_or(req)
                    }
                };
                if let Some(effect) = queued_effect(kind, &req) {
                    s.state.queued_effects.push((s.state.queued, effect));
                }
                // Invalidated now and again when EXEC's reply arrives.
                if let Some(hook) = cache::before_write(s, &req) {
                    s.multi_hooks.push(hook);
                }
                s.state.queued += 1;
                forward(s, req, Want::Pinned, true).await
            }
        };
    }

    match kind {
        Kind::Plain => {
            // A rewritten request that has to wait is retried as the
            // client sent it: planned again, it would be compressed twice.
            let mut original = None;
            let (req, decode) = match compression::plan(&s.ctx, &req) {
                Plan::Pass => (req, None),
                Plan::Emulate => return emulate::run(s, req).await,
                Plan::Forward {
                    request: Some(rewritten),
                    decode,
                } => {
                    original = Some(req);
                    (rewritten, decode)
                }
                Plan::Forward {
                    request: None,
                    decode,
                } => (req, decode),
            };
            let want = if req.raw.len() > LARGE_REQUEST {
                Want::Pinned
            } else {
                Want::Any
            };
            let req = if want == Want::Any {
                match cache::read(s, req, decode.as_ref()) {
                    Ok(flow) => return flow,
                    Err(req) => req,
                }
            } else {
                req
            };
            let hook = cache::before_write(s, &req);
            let hook = match decode {
                Some(decode) => Some(cache::Hook::Decoded {
                    decode,
                    inner: hook.map(Box::new),
                }),
                None => hook,
            };
            match (forward_write(s, req, want, hook).await, original) {
                (Flow::Stall(_), Some(original)) => Flow::Stall(original),
                (flow, _) => flow,
            }
        }
        Kind::Blocking => {
            let hook = cache::before_write(s, &req);
            forward_hooked(s, req, Want::Pinned, false, hook).await
        }
        Kind::Multi => multi(s, req).await,
        Kind::Exec | Kind::Discard => {
            let flow = forward(s, req, Want::Any, true).await;
            s.state.watching = false;
            flow
        }
        Kind::Watch => {
            let flow = forward(s, req, Want::Pinned, true).await;
            s.state.watching = s.pinned.is_some();
            flow
        }
        Kind::Unwatch => {
            let flow = forward(s, req, Want::Any, true).await;
            s.state.watching = false;
            flow
        }
        Kind::PubSub | Kind::Monitor => {
            if must_wait(s, Some(Route::Pinned)) {
                return Flow::Stall(req);
            }
            if !pin_or_reply(s).await {
                return Flow::Continue;
            }
            if let Some(p) = s.pinned.as_mut() {
                p.stream = true;
                p.conn.set_stream();
            }
            forward_stream(s, req)
        }
        Kind::Unsubscribe => {
            unsubscribed(s, &req);
            Flow::Continue
        }
        Kind::ClientPinning => {
            let req = match redirect_to_upstream(s, req) {
                Ok(req) => req,
                Err(reply) => {
                    s.local(reply);
                    return Flow::Continue;
                }
            };
            let flag = client_flag(&req);
            let flow = forward(s, req, Want::Pinned, true).await;
            if s.pinned.is_some() {
                if let Some((which, on)) = flag {
                    set_flag(s, which, on);
                }
            }
            flow
        }
        Kind::ClientCaching if !s.state.tracking => {
            client_tracking_query(s, &req);
            Flow::Continue
        }
        Kind::ClientCaching => forward(s, req, Want::Any, true).await,
        Kind::Cache if jobs::is_job(&req) => jobs::run(s, req).await,
        Kind::Cache => {
            crate::admin::command(s, &req);
            Flow::Continue
        }
        Kind::Info => match crate::admin::info_plan(&req) {
            InfoPlan::Local(sections) => {
                let reply = crate::admin::info_local(&s.ctx, s.state.proto, sections);
                s.local(reply);
                Flow::Continue
            }
            InfoPlan::Upstream(sections) => {
                let hook = (sections != Sections::default()).then_some(cache::Hook::Info(sections));
                forward_hooked(s, req, Want::Any, true, hook).await
            }
        },
        Kind::Client(sub) => client_local(s, sub, req).await,
        Kind::Select => select(s, req).await,
        Kind::Auth => auth(s, req).await,
        Kind::Hello => hello(s, req).await,
        Kind::Quit => quit(s),
        Kind::Reset => reset(s, req).await,
        Kind::Refused(name) => {
            s.local(error(&format!("ERR {name} is not supported through tierd")));
            Flow::Continue
        }
    }
}

/// A state change queued inside MULTI, applied when EXEC's reply shows the
/// command ran.
#[derive(Debug, Clone)]
pub(crate) enum Effect {
    Select(u32),
    Hello {
        proto: Option<Proto>,
        creds: Option<Credentials>,
        name: Option<Bytes>,
    },
    Auth(Credentials),
    SetName(Bytes),
    /// `CLIENT TRACKING|NO-EVICT|NO-TOUCH on|off`.
    Flag(PinFlag, bool),
}

fn queued_effect(kind: Kind, req: &Request) -> Option<Effect> {
    match kind {
        Kind::Select => select_arg(req).map(Effect::Select),
        Kind::Auth => auth_creds(req).map(Effect::Auth),
        Kind::Hello => parse_hello(req).ok().map(|h| Effect::Hello {
            proto: h.proto,
            creds: h.creds,
            name: h.name,
        }),
        Kind::Client(ClientSub::SetName) if req.args.len() == 3 => {
            req.arg(2).cloned().map(Effect::SetName)
        }
        Kind::ClientPinning => client_flag(req).map(|(which, on)| Effect::Flag(which, on)),
        _ => None,
    }
}

/// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE` from a client that is not
/// subscribed to anything: Redis confirms each channel (or one nil) with a
/// count of 0. Answered here, so the client does not become a stream.
fn unsubscribed(s: &mut Session, req: &Request) {
    let kind = req.name().to_ascii_lowercase();
    let mut out = BytesMut::new();
    let mut confirm = |channel: Option<&[u8]>| {
        match s.state.proto {
            Proto::Resp2 => reply::array_header(&mut out, 3),
            Proto::Resp3 => out.extend_from_slice(b">3\r\n"),
        }
        reply::bulk(&mut out, &kind);
        match channel {
            Some(c) => reply::bulk(&mut out, c),
            None => reply::null(&mut out, s.state.proto),
        }
        reply::integer(&mut out, 0);
    };
    if req.args.len() <= 1 {
        confirm(None);
    } else {
        for channel in req.args.iter().skip(1) {
            confirm(Some(channel));
        }
    }
    s.local(out.freeze());
}

/// RESET on a stream: sent down the stream; its reply, `+RESET` (which no
/// message, MONITOR line or other reply can be), is recognised among the
/// pushes, and the session starts over when it arrives. The reply is never
/// suppressed: RESET also turns CLIENT REPLY back on.
fn reset_stream(s: &mut Session, req: &Request) -> Flow {
    let Some(conn) = s.pinned.as_ref().map(|p| p.conn.clone()) else {
        return Flow::Continue;
    };
    let seq = s.queue.push(Slot::Pending { discard: false });
    let end = b"+RESET\r\n";
    if let Err(e) = conn.send(&req.raw, ReplyTo::StreamEnd { seq, end }) {
        s.queue.complete(seq, e.to_resp());
        return Flow::Close;
    }
    s.inflight += 1;
    s.inflight_route = Some(Route::Pinned);
    s.reset_at = Some(seq);
    Flow::Continue
}

/// Which connection a request wants.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The pool, unless the session's state needs its own connection.
    Any,
    /// The client's dedicated connection (created if needed).
    Pinned,
}

/// Whether the session's mirrored state lives on its dedicated connection.
fn needs_pin(s: &Session) -> bool {
    let st = &s.state;
    st.db != s.ctx.upstream.default_db()
        || st.multi
        || st.watching
        || st.tracking
        || st.no_evict
        || st.no_touch
}

/// Pointer identity of the session's current identity.
fn identity_key(identity: &Arc<Identity>) -> usize {
    Arc::as_ptr(identity) as usize
}

/// The route a request takes, without side effects.
fn choose(s: &Session, want: Want) -> Route {
    if want == Want::Pinned || needs_pin(s) {
        return Route::Pinned;
    }
    let identity = identity_key(&s.identity);
    let proto = s.state.proto;
    match s.inflight_route {
        Some(
            r @ Route::Pool {
                identity: i,
                proto: p,
                ..
            },
        ) if i == identity && p == proto => r,
        _ => Route::Pool {
            identity,
            proto,
            idx: s.identity.pool(proto).pick(),
        },
    }
}

/// Stalls the request when requests are in flight on another route (or on
/// any route, for `route == None`: requests that must run alone).
fn must_wait(s: &Session, route: Option<Route>) -> bool {
    if s.inflight == 0 {
        return false;
    }
    !matches!((route, s.inflight_route), (Some(want), Some(current)) if want == current)
}

/// Makes sure the session has a dedicated connection, reusing its spare
/// when that still fits.
async fn ensure_pinned(s: &mut Session) -> Result<(), UpstreamError> {
    if s.pinned.is_some() {
        return Ok(());
    }
    let identity = identity_key(&s.identity);
    if let Some(spare) = s.spare.take() {
        if spare.identity == identity && spare.proto == s.state.proto && spare.conn.is_up() {
            s.pinned = Some(spare);
            s.note_pinned();
            return Ok(());
        }
    }
    let (tx, rx) = mpsc::channel(PINNED_CHANNEL);
    let conn = s.identity.dedicated(s.state.proto, tx).await?;
    if s.state.db != s.ctx.upstream.default_db() {
        // A reconnect for a client that had selected a db is not possible
        // (the old connection's state is gone), so this only happens for a
        // fresh pin; select the client's db on it.
        let db = s.state.db.to_string();
        let reply =
            request_inline(&conn, &reply::encode_command(&[b"SELECT", db.as_bytes()])).await?;
        if inspect::is_error(&reply) {
            return Err(UpstreamError::Rejected(reply));
        }
    }
    s.pinned = Some(Pinned {
        conn,
        rx,
        identity,
        proto: s.state.proto,
        stream: false,
    });
    s.note_pinned();
    Ok(())
}

/// Sends a request upstream on its route; its reply fills a queue slot.
async fn forward(s: &mut Session, req: Request, want: Want, timed: bool) -> Flow {
    forward_hooked(s, req, want, timed, None).await
}

/// A request that may write: queued when its keys' rule writes behind,
/// sent so that L1 holds what it writes when their rule writes through
/// ([`writes`]), sent with its tags' registration when a rule tags a key
/// it writes ([`tagging`]), else as is.
async fn forward_write(
    s: &mut Session,
    req: Request,
    want: Want,
    hook: Option<cache::Hook>,
) -> Flow {
    if want == Want::Any && writes::queues(s, &req) {
        return writes::enqueue(s, req).await;
    }
    let evals = tagging::registrations(s, &req);
    if let Some(plan) = writes::plan_through(s, &req, want, hook.as_ref()) {
        return writes::send_through(s, req, hook, evals, plan);
    }
    if evals.is_empty() {
        forward_hooked(s, req, want, true, hook).await
    } else {
        tagging::forward(s, req, want, hook, evals).await
    }
}

/// [`forward`], with a hook to run when the reply arrives.
async fn forward_hooked(
    s: &mut Session,
    req: Request,
    want: Want,
    timed: bool,
    hook: Option<cache::Hook>,
) -> Flow {
    let route = choose(s, want);
    if must_wait(s, Some(route)) {
        return Flow::Stall(req);
    }
    let Some(conn) = route_conn(s, route).await else {
        return Flow::Continue;
    };
    send_hooked(s, &conn, route, &req.raw, timed, hook);
    Flow::Continue
}

/// The connection of `route`, pinning the session first if the route is
/// its dedicated connection. `None` when that could not be opened; the
/// client has been answered with the error.
async fn route_conn(s: &mut Session, route: Route) -> Option<Conn> {
    leave_pinned(s, route);
    match route {
        Route::Pinned => {
            if !pin_or_reply(s).await {
                return None;
            }
            s.pinned.as_ref().map(|p| p.conn.clone())
        }
        Route::Pool { proto, idx, .. } => Some(s.identity.pool(proto).conn(idx).clone()),
    }
}

/// A request goes to the pool: a dedicated connection with nothing in
/// flight and no state that needs it is kept as a spare (unless it streams,
/// which only RESET ends).
fn leave_pinned(s: &mut Session, route: Route) {
    if route != Route::Pinned && s.pinned.is_some() {
        if let Some(p) = s.pinned.take() {
            if !p.stream {
                s.spare = Some(p);
            }
        }
        s.note_pinned();
    }
}

/// Sends on `conn` and accounts for the reply, registering `hook` for it;
/// a refused send is answered at once.
fn send_hooked(
    s: &mut Session,
    conn: &Conn,
    route: Route,
    raw: &[u8],
    timed: bool,
    hook: Option<cache::Hook>,
) {
    let seq = s.pending_slot();
    if let Some(hook) = hook {
        cache::register(s, seq, hook);
    }
    let to = match route {
        Route::Pinned => ReplyTo::Owner { seq, timed },
        Route::Pool { .. } => ReplyTo::Inbox {
            seq,
            inbox: &s.inbox,
            timed,
        },
    };
    let sent = conn.send(raw, to);
    account_send(s, route, seq, sent);
}

/// After a request for queue slot `seq` was handed to a connection: it is
/// in flight on `route`, or, refused, answered at once with the error (its
/// hook run on it).
fn account_send(s: &mut Session, route: Route, seq: u64, sent: Result<(), UpstreamError>) {
    match sent {
        Ok(()) => {
            s.inflight += 1;
            s.inflight_route = Some(route);
        }
        Err(e) => {
            s.ctx.metrics.upstream_error();
            let mut frame = e.to_resp();
            if let Some(hook) = s.hooks.remove(&seq) {
                // An error never parks a read: there is always a frame.
                frame = cache::after_reply(s, hook, frame.clone()).unwrap_or(frame);
            }
            s.queue.complete(seq, frame);
        }
    }
}

/// `CLIENT CACHING`, `CLIENT TRACKINGINFO` and `CLIENT GETREDIR` from a
/// client without tracking, answered as Redis answers them for such a
/// client. (Forwarded, they would describe the tracking tierd's own pooled
/// connections have for L1.) Malformed ones go upstream for Redis's exact
/// error, which does not depend on tracking.
fn client_tracking_query(s: &mut Session, req: &Request) {
    let sub = req
        .arg(1)
        .map(|a| a.to_ascii_lowercase())
        .unwrap_or_default();
    let argc = req.args.len();
    let mut out = BytesMut::new();
    match (&sub[..], argc) {
        (b"caching", 3) => reply::error(
            &mut out,
            b"ERR CLIENT CACHING can be called only when the client is in tracking mode with OPTIN or OPTOUT mode enabled",
        ),
        (b"getredir", 2) => reply::integer(&mut out, -1),
        (b"trackinginfo", 2) => {
            reply::map_header(&mut out, 3, s.state.proto);
            reply::bulk(&mut out, b"flags");
            match s.state.proto {
                Proto::Resp2 => reply::array_header(&mut out, 1),
                Proto::Resp3 => out.extend_from_slice(b"~1\r\n"),
            }
            reply::bulk(&mut out, b"off");
            reply::bulk(&mut out, b"redirect");
            reply::integer(&mut out, -1);
            reply::bulk(&mut out, b"prefixes");
            reply::array_header(&mut out, 0);
        }
        _ => {
            let name = String::from_utf8_lossy(&sub).into_owned();
            out.extend_from_slice(&error(&format!(
                "ERR wrong number of arguments for 'client|{name}' command"
            )));
        }
    }
    s.local(out.freeze());
}

/// Pub/sub and MONITOR mode: pass through, no reply slot.
fn forward_stream(s: &mut Session, req: Request) -> Flow {
    let Some(p) = s.pinned.as_ref() else {
        return Flow::Continue;
    };
    if let Err(e) = p.conn.send(&req.raw, ReplyTo::Nobody) {
        s.local(e.to_resp());
        return Flow::Close;
    }
    Flow::Continue
}

/// Sends one request on `conn` and waits for its reply, outside the
/// session's queue. Used by requests that run alone.
async fn request_inline(conn: &Conn, raw: &[u8]) -> Result<Bytes, UpstreamError> {
    conn.request(raw).await
}

fn error(msg: &str) -> Bytes {
    let mut out = BytesMut::new();
    reply::error(&mut out, msg.as_bytes());
    out.freeze()
}

fn simple(msg: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    reply::simple(&mut out, msg);
    out.freeze()
}

const OK: &[u8] = b"+OK\r\n";

fn quit(s: &mut Session) -> Flow {
    s.local(Bytes::from_static(OK));
    Flow::Close
}

/// `RESET` (not streaming): wait for in-flight replies, drop the dedicated
/// connection (Redis discards its MULTI, WATCH, tracking and db with it) and
/// start over as a new client.
async fn reset(s: &mut Session, req: Request) -> Flow {
    if must_wait(s, None) {
        return Flow::Stall(req);
    }
    s.reset_state();
    // RESET's reply is never suppressed: it also turns CLIENT REPLY back on.
    s.local(simple(b"RESET"));
    Flow::Continue
}

/// Makes sure the session has a dedicated connection; on failure the client
/// gets the error as this request's reply and `false` comes back.
async fn pin_or_reply(s: &mut Session) -> bool {
    match ensure_pinned(s).await {
        Ok(()) => true,
        Err(e) => {
            s.local(e.to_resp());
            false
        }
    }
}

/// Runs one request alone on the dedicated connection and returns upstream's
/// reply. Callers have waited for everything in flight.
///
/// The reply comes on the connection's own channel, behind any pushes
/// (tracking invalidations, say) that arrive first. Those are taken off the
/// channel while waiting, so a flood of them can never fill it and stall the
/// reply, and are replayed in order before the reply is queued.
async fn alone(s: &mut Session, raw: &[u8]) -> Result<Bytes, UpstreamError> {
    /// The reply slot of a request that runs alone: outside the queue.
    const ALONE: u64 = u64::MAX;
    let mut arrived = Vec::new();
    let result = match s.pinned.as_mut() {
        None => Err(UpstreamError::unavailable("no dedicated connection")),
        Some(p) => match p.conn.send(
            raw,
            ReplyTo::Owner {
                seq: ALONE,
                timed: true,
            },
        ) {
            Err(e) => Err(e),
            Ok(()) => loop {
                match p.rx.recv().await {
                    Some(Upstreamed::Reply { seq: ALONE, reply }) => break reply,
                    Some(Upstreamed::Closed(e)) => {
                        arrived.push(Upstreamed::Closed(e.clone()));
                        break Err(e);
                    }
                    Some(ev) => arrived.push(ev),
                    None => break Err(UpstreamError::unavailable("connection lost")),
                }
            },
        },
    };
    for ev in arrived {
        s.on_upstream(ev, true);
    }
    result
}

/// `MULTI` runs alone on the dedicated connection, so that the session
/// knows whether a transaction really started (`MULTI extra` or a -NOAUTH
/// does not start one) before it routes the next request.
async fn multi(s: &mut Session, req: Request) -> Flow {
    let reply = match pinned_alone(s, req).await {
        Ok(Some(reply)) => reply,
        Ok(None) => return Flow::Continue,
        Err(req) => return Flow::Stall(req),
    };
    if inspect::is_ok(&reply) {
        s.state.multi = true;
        s.state.multi_aborted = false;
        s.state.queued = 0;
        s.state.queued_effects.clear();
    }
    s.local(reply);
    Flow::Continue
}

/// Runs a request that changes routing alone on the dedicated connection:
/// waits for everything in flight (`Err` gives the request back to stall),
/// pins, and returns upstream's reply for the caller to read state from and
/// queue. `Ok(None)`: the client already got an error reply.
async fn pinned_alone(s: &mut Session, req: Request) -> Result<Option<Bytes>, Request> {
    if must_wait(s, None) {
        return Err(req);
    }
    if !pin_or_reply(s).await {
        return Ok(None);
    }
    match alone(s, &req.raw).await {
        Ok(reply) => Ok(Some(reply)),
        Err(e) => {
            s.local(e.to_resp());
            Ok(None)
        }
    }
}

/// `EXEC` or `DISCARD` inside a transaction. When state commands were
/// queued, EXEC runs alone so that its reply tells which of them ran.
async fn end_transaction(s: &mut Session, req: Request, kind: Kind) -> Flow {
    if kind == Kind::Exec && s.state.multi_aborted {
        // Discard upstream's transaction, answer as Redis does for a
        // transaction with a command rejected while queueing.
        if must_wait(s, None) {
            return Flow::Stall(req);
        }
        let _ = alone(s, &reply::encode_command(&[b"DISCARD"])).await;
        s.local(error(
            "EXECABORT Transaction discarded because of previous errors.",
        ));
        end_multi(s);
        return Flow::Continue;
    }
    if kind != Kind::Exec || s.state.queued_effects.is_empty() {
        if must_wait(s, Some(Route::Pinned)) {
            return Flow::Stall(req);
        }
        let hook = exec_hook(s, kind);
        let flow = forward_hooked(s, req, Want::Pinned, true, hook).await;
        end_multi(s);
        return flow;
    }
    if must_wait(s, None) {
        return Flow::Stall(req);
    }
    let hook = exec_hook(s, kind);
    let result = alone(s, &req.raw).await;
    let decode = match &hook {
        Some(cache::Hook::Decoded { decode, .. }) => Some(decode.clone()),
        _ => None,
    };
    if let Some(hook) = hook {
        cache::run_now(s, hook);
    }
    match result {
        Ok(reply) => {
            let reply = match &decode {
                Some(decode) => compression::decode_reply(&s.ctx, reply, decode),
                None => reply,
            };
            let results = inspect::elements(&reply, s.ctx.config.limits.max_reply_depth)
                .filter(|_| reply.first() == Some(&b'*'))
                .unwrap_or_default();
            let effects = std::mem::take(&mut s.state.queued_effects);
            for (index, effect) in effects {
                if let Some(result) = results.get(index) {
                    if !inspect::is_error(result) {
                        apply(s, effect);
                    }
                }
            }
            s.local(reply);
        }
        Err(e) => s.local(e.to_resp()),
    }
    end_multi(s);
    Flow::Continue
}

/// The invalidations still owed for the writes queued in this transaction:
/// run when EXEC's reply arrives; dropped by DISCARD.
fn exec_hook(s: &mut Session, kind: Kind) -> Option<cache::Hook> {
    let hooks = std::mem::take(&mut s.multi_hooks);
    let decodes = std::mem::take(&mut s.multi_decodes);
    if kind != Kind::Exec {
        return None;
    }
    let inner = (!hooks.is_empty()).then_some(cache::Hook::Many(hooks));
    if decodes.is_empty() {
        return inner;
    }
    // Values read inside the transaction come back in EXEC's array.
    Some(cache::Hook::Decoded {
        decode: compression::Decode::Exec(decodes),
        inner: inner.map(Box::new),
    })
}

/// The transaction is over (EXEC or DISCARD): so is any WATCH.
fn end_multi(s: &mut Session) {
    s.multi_hooks.clear();
    s.multi_decodes.clear();
    s.state.multi = false;
    s.state.watching = false;
    s.state.multi_aborted = false;
    s.state.queued_effects.clear();
}

/// Applies a state change that upstream confirmed on the dedicated
/// connection.
fn apply(s: &mut Session, effect: Effect) {
    match effect {
        Effect::Select(db) => s.state.db = db,
        Effect::Hello { proto, creds, name } => {
            if let Some(proto) = proto {
                s.state.proto = proto;
                if let Some(p) = s.pinned.as_mut() {
                    p.proto = proto;
                }
            }
            if let Some(c) = creds {
                let identity = s.ctx.upstream.identity(c);
                switch_identity(s, identity);
            }
            if let Some(name) = name {
                s.state.name = (!name.is_empty()).then_some(name);
            }
        }
        Effect::Auth(c) => {
            let identity = s.ctx.upstream.identity(c);
            switch_identity(s, identity);
        }
        Effect::SetName(name) => s.state.name = (!name.is_empty()).then_some(name),
        Effect::Flag(which, on) => set_flag(s, which, on),
    }
}

/// The db of a well-formed `SELECT db`, parsed as strictly as Redis does.
fn select_arg(req: &Request) -> Option<u32> {
    if req.args.len() != 2 {
        return None;
    }
    string2ll(req.arg(1)?).and_then(|db| u32::try_from(db).ok())
}

/// `SELECT db`: the current db is answered locally; another db needs a
/// dedicated connection, and a switch back to the default db releases it.
async fn select(s: &mut Session, req: Request) -> Flow {
    let Some(db) = select_arg(&req) else {
        // Malformed: upstream produces the exact error, without side effects.
        return forward(s, req, Want::Any, true).await;
    };
    if db == s.state.db {
        s.local(Bytes::from_static(OK));
        return Flow::Continue;
    }
    // Switching db always needs the dedicated connection: either to go to a
    // non-default db, or to come back from one (then it is already there).
    let reply = match pinned_alone(s, req).await {
        Ok(Some(reply)) => reply,
        Ok(None) => return Flow::Continue,
        Err(req) => return Flow::Stall(req),
    };
    if !inspect::is_error(&reply) {
        s.state.db = db;
    }
    s.local(reply);
    Flow::Continue
}

/// The credentials of a well-formed `AUTH [user] pass`.
fn auth_creds(req: &Request) -> Option<Credentials> {
    match req.args.len() {
        2 => req.arg(1).map(|p| Credentials::new(None, p.clone())),
        3 => match (req.arg(1), req.arg(2)) {
            (Some(u), Some(p)) => Some(Credentials::new(Some(u.clone()), p.clone())),
            _ => None,
        },
        _ => None,
    }
}

/// `AUTH [user] pass`: authenticate the client as itself. On a dedicated
/// connection the command goes there (it authenticates that connection);
/// otherwise it is verified on the identity's own pool, and the client's
/// pooled traffic moves there. Either way upstream sees the client's own
/// bytes, so its reply is exactly Redis's.
async fn auth(s: &mut Session, req: Request) -> Flow {
    let Some(creds) = auth_creds(&req) else {
        return forward(s, req, Want::Any, true).await;
    };
    if must_wait(s, None) {
        return Flow::Stall(req);
    }
    let identity = s.ctx.upstream.identity(creds);
    match verify(s, &identity, &req.raw).await {
        Ok(reply) => {
            if !inspect::is_error(&reply) {
                switch_identity(s, identity);
            }
            s.local(reply);
        }
        Err(e) => s.local(e.to_resp()),
    }
    Flow::Continue
}

/// Runs an `AUTH` command (`raw`) for `identity`: on the dedicated
/// connection when there is one, else on the identity's pool. Returns
/// upstream's reply.
async fn verify(
    s: &mut Session,
    identity: &Arc<Identity>,
    raw: &[u8],
) -> Result<Bytes, UpstreamError> {
    if s.pinned.is_some() {
        return alone(s, raw).await;
    }
    let pool = identity.pool(Proto::Resp2);
    let conn = pool.conn(pool.pick()).clone();
    match request_inline(&conn, raw).await {
        // The identity's connections could not even be set up with these
        // credentials: that *is* upstream's answer to the AUTH.
        Err(UpstreamError::Rejected(raw)) => Ok(raw),
        other => other,
    }
}

fn switch_identity(s: &mut Session, identity: Arc<Identity>) {
    if let Some(p) = s.pinned.as_mut() {
        p.identity = identity_key(&identity);
    }
    s.spare = None;
    s.identity = identity;
}

/// A parsed `HELLO [protover [AUTH user pass] [SETNAME name]]`.
struct HelloArgs {
    proto: Option<Proto>,
    creds: Option<Credentials>,
    name: Option<Bytes>,
}

/// Parses `HELLO` as Redis 7's `helloCommand` does; the error is the reply
/// Redis would give.
fn parse_hello(req: &Request) -> Result<HelloArgs, Bytes> {
    let mut proto = None;
    if let Some(ver) = req.arg(1) {
        proto = match string2ll(ver) {
            None => {
                return Err(error(
                    "ERR Protocol version is not an integer or out of range",
                ))
            }
            Some(2) => Some(Proto::Resp2),
            Some(3) => Some(Proto::Resp3),
            Some(_) => return Err(error("NOPROTO unsupported protocol version")),
        };
    }
    let mut creds = None;
    let mut name: Option<Bytes> = None;
    let mut j = 2;
    while let Some(opt) = req.arg(j) {
        let more = req.args.len() - 1 - j;
        if opt.eq_ignore_ascii_case(b"AUTH") && more >= 2 {
            if let (Some(u), Some(p)) = (req.arg(j + 1), req.arg(j + 2)) {
                creds = Some(Credentials::new(Some(u.clone()), p.clone()));
            }
            j += 3;
        } else if opt.eq_ignore_ascii_case(b"SETNAME") && more >= 1 {
            let n = req.arg(j + 1).cloned().unwrap_or_default();
            if !valid_client_name(&n) {
                return Err(error(NAME_ERROR));
            }
            name = Some(n);
            j += 2;
        } else {
            let opt = String::from_utf8_lossy(opt).into_owned();
            return Err(error(&format!("ERR Syntax error in HELLO option '{opt}'")));
        }
    }
    Ok(HelloArgs { proto, creds, name })
}

/// `HELLO [protover [AUTH user pass] [SETNAME name]]`, following Redis 7's
/// `helloCommand` step by step, including its error texts. The reply is
/// upstream's own HELLO map with tierd's client id.
async fn hello(s: &mut Session, req: Request) -> Flow {
    let args = match parse_hello(&req) {
        Ok(args) => args,
        Err(reply) => {
            s.local(reply);
            return Flow::Continue;
        }
    };
    if must_wait(s, None) {
        return Flow::Stall(req);
    }
    let proto = args.proto.unwrap_or(s.state.proto);

    if s.pinned.is_some() {
        // The dedicated connection carries the client's protocol: let Redis
        // switch it, then answer with tierd's id in its reply.
        match alone(s, &req.raw).await {
            Ok(reply) if inspect::is_error(&reply) => s.local(reply),
            Ok(reply) => {
                let depth = s.ctx.config.limits.max_reply_depth;
                let answer = match HelloInfo::parse(&reply, proto, depth) {
                    Ok(info) => info.reply(proto, s.id),
                    Err(_) => reply,
                };
                apply(
                    s,
                    Effect::Hello {
                        proto: Some(proto),
                        creds: args.creds,
                        name: args.name,
                    },
                );
                s.local(answer);
            }
            Err(e) => s.local(e.to_resp()),
        }
        return Flow::Continue;
    }

    let mut identity = s.identity.clone();
    if let Some(c) = &args.creds {
        let candidate = s.ctx.upstream.identity(c.clone());
        match verify(s, &candidate, &c.auth_command()).await {
            Ok(reply) if inspect::is_error(&reply) => {
                s.local(reply);
                return Flow::Continue;
            }
            Ok(_) => identity = candidate,
            Err(e) => {
                s.local(e.to_resp());
                return Flow::Continue;
            }
        }
    }

    // An identity without credentials against a server that requires a
    // password: Redis answers HELLO with -NOAUTH, and so does tierd, with
    // upstream's own words from the RESP2 connection's handshake.
    let base = identity.pool(Proto::Resp2);
    let base_conn = base.conn(base.pick()).clone();
    if let Err(e) = handshake_done(&base_conn).await {
        s.local(e.to_resp());
        return Flow::Continue;
    }
    if let Some(noauth) = base_conn.noauth() {
        s.local(noauth);
        return Flow::Continue;
    }
    // tierd answers with upstream's own HELLO fields, from a connection of
    // the target pool (waiting for it to connect the first time).
    let pool = identity.pool(proto);
    let conn = pool.conn(pool.pick()).clone();
    if let Err(e) = handshake_done(&conn).await {
        s.local(e.to_resp());
        return Flow::Continue;
    }
    let Some(info) = conn.hello() else {
        s.local(error(
            "ERR upstream unavailable: no HELLO reply from upstream",
        ));
        return Flow::Continue;
    };
    if !Arc::ptr_eq(&identity, &s.identity) {
        switch_identity(s, identity);
    }
    if let Some(name) = args.name {
        s.state.name = (!name.is_empty()).then_some(name);
    }
    s.state.proto = proto;
    s.local(info.reply(proto, s.id));
    Flow::Continue
}

/// Waits until `conn` has completed its setup handshake at least once, by
/// sending a PING through it when it has not.
async fn handshake_done(conn: &Conn) -> Result<(), UpstreamError> {
    if conn.hello().is_some() || conn.noauth().is_some() {
        return Ok(());
    }
    request_inline(conn, &reply::encode_command(&[b"PING"]))
        .await
        .map(|_| ())
}

const NAME_ERROR: &str = "ERR Client names cannot contain spaces, newlines or special characters.";

/// Redis's `validateClientName`: printable ASCII without spaces.
fn valid_client_name(name: &[u8]) -> bool {
    name.iter().all(|&c| (b'!'..=b'~').contains(&c))
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum PinFlag {
    Tracking,
    NoEvict,
    NoTouch,
}

fn set_flag(s: &mut Session, which: PinFlag, on: bool) {
    match which {
        PinFlag::Tracking => s.state.tracking = on,
        PinFlag::NoEvict => s.state.no_evict = on,
        PinFlag::NoTouch => s.state.no_touch = on,
    }
}

/// `CLIENT TRACKING|NO-EVICT|NO-TOUCH on|off`.
fn client_flag(req: &Request) -> Option<(PinFlag, bool)> {
    let sub = req.arg(1)?;
    let which = if sub.eq_ignore_ascii_case(b"TRACKING") {
        PinFlag::Tracking
    } else if sub.eq_ignore_ascii_case(b"NO-EVICT") {
        PinFlag::NoEvict
    } else {
        PinFlag::NoTouch
    };
    let v = req.arg(2)?;
    if v.eq_ignore_ascii_case(b"on") {
        Some((which, true))
    } else if v.eq_ignore_ascii_case(b"off") {
        Some((which, false))
    } else {
        None
    }
}

/// `CLIENT SETNAME|GETNAME|SETINFO|ID|REPLY`, answered from the session.
/// Malformed forms go upstream, which answers with its exact error and no
/// side effect.
async fn client_local(s: &mut Session, sub: ClientSub, req: Request) -> Flow {
    let argc = req.args.len();
    match sub {
        ClientSub::SetName if argc == 3 => {
            let name = req.arg(2).cloned().unwrap_or_default();
            if !valid_client_name(&name) {
                s.local(error(NAME_ERROR));
            } else {
                s.state.name = (!name.is_empty()).then_some(name);
                s.local(Bytes::from_static(OK));
            }
        }
        ClientSub::GetName if argc == 2 => {
            let mut out = BytesMut::new();
            match &s.state.name {
                Some(name) => reply::bulk(&mut out, name),
                None => reply::null(&mut out, s.state.proto),
            }
            s.local(out.freeze());
        }
        ClientSub::Id if argc == 2 => {
            let mut out = BytesMut::new();
            reply::integer(&mut out, i64::try_from(s.id).unwrap_or(i64::MAX));
            s.local(out.freeze());
        }
        ClientSub::SetInfo if argc == 4 => {
            let attr = req.arg(2).cloned().unwrap_or_default();
            let value = req.arg(3).cloned().unwrap_or_default();
            if attr.eq_ignore_ascii_case(b"LIB-NAME") || attr.eq_ignore_ascii_case(b"LIB-VER") {
                if !valid_client_name(&value) && !value.is_empty() {
                    let what = String::from_utf8_lossy(&attr).to_lowercase();
                    s.local(error(&format!(
                        "ERR {what} cannot contain spaces, newlines or special characters."
                    )));
                } else {
                    let slot = if attr.eq_ignore_ascii_case(b"LIB-NAME") {
                        &mut s.state.lib_name
                    } else {
                        &mut s.state.lib_ver
                    };
                    *slot = (!value.is_empty()).then_some(value);
                    s.local(Bytes::from_static(OK));
                }
            } else {
                let attr = String::from_utf8_lossy(&attr).into_owned();
                s.local(error(&format!("ERR Unrecognized option '{attr}'")));
            }
        }
        ClientSub::Reply if argc == 3 => {
            let mode = req.arg(2).cloned().unwrap_or_default();
            if mode.eq_ignore_ascii_case(b"ON") {
                s.state.reply_mode = ReplyMode::On;
                s.local(Bytes::from_static(OK));
            } else if mode.eq_ignore_ascii_case(b"OFF") {
                s.state.reply_mode = ReplyMode::Off;
            } else if mode.eq_ignore_ascii_case(b"SKIP") {
                // SKIP itself gets no reply, nor does the next command.
                if s.state.reply_mode != ReplyMode::Off {
                    s.state.reply_mode = ReplyMode::SkipNext;
                }
            } else {
                s.local(error("ERR syntax error"));
            }
        }
        ClientSub::Kill => match kill_by_tierd_id(s, &req) {
            Some((ClientRef::Live(entry), skipme)) if Arc::ptr_eq(&entry, &s.entry) => {
                if skipme {
                    // SKIPME (on by default) spares the caller.
                    s.local(Bytes::from_static(b":0\r\n"));
                } else {
                    // Redis answers, then closes the connection.
                    s.local(Bytes::from_static(b":1\r\n"));
                    return Flow::Close;
                }
            }
            Some((ClientRef::Live(entry), _)) => {
                entry.kill.notify_one();
                s.local(Bytes::from_static(b":1\r\n"));
            }
            Some(_) => s.local(Bytes::from_static(b":0\r\n")),
            None => return forward(s, req, Want::Any, true).await,
        },
        ClientSub::Unblock if argc == 3 || argc == 4 => {
            let reason_ok = req.arg(3).map_or(true, |r| {
                r.eq_ignore_ascii_case(b"TIMEOUT") || r.eq_ignore_ascii_case(b"ERROR")
            });
            let target = client_arg(s, &req, 2).map(|(_, r)| r);
            match target {
                Some(ClientRef::Live(entry)) if reason_ok => {
                    match entry.upstream_id.load(std::sync::atomic::Ordering::Relaxed) {
                        // No dedicated connection: not blocked, nothing to
                        // unblock, as Redis would say.
                        0 => s.local(Bytes::from_static(b":0\r\n")),
                        up => {
                            let req = with_arg(&req, 2, up.to_string().as_bytes());
                            return forward(s, req, Want::Any, true).await;
                        }
                    }
                }
                Some(ClientRef::Gone) if reason_ok => s.local(Bytes::from_static(b":0\r\n")),
                _ => return forward(s, req, Want::Any, true).await,
            }
        }
        _ => return forward(s, req, Want::Any, true).await,
    }
    Flow::Continue
}

/// `CLIENT KILL ID id [SKIPME yes|no]` (filters in any order) where `id` is
/// a tierd client id: what it refers to and whether SKIPME is on (Redis's
/// default). `None` for everything Redis should answer itself: upstream
/// ids, other filters, the old `addr:port` form, malformed input.
fn kill_by_tierd_id(s: &Session, req: &Request) -> Option<(ClientRef, bool)> {
    if req.args.len() < 4 || req.args.len() % 2 != 0 {
        return None;
    }
    let mut target = None;
    let mut skipme = true;
    let mut i = 2;
    while let (Some(filter), Some(value)) = (req.arg(i), req.arg(i + 1)) {
        if filter.eq_ignore_ascii_case(b"ID") && target.is_none() {
            target = Some(client_arg(s, req, i + 1)?.1);
        } else if filter.eq_ignore_ascii_case(b"SKIPME") && value.eq_ignore_ascii_case(b"yes") {
            skipme = true;
        } else if filter.eq_ignore_ascii_case(b"SKIPME") && value.eq_ignore_ascii_case(b"no") {
            skipme = false;
        } else {
            return None;
        }
        i += 2;
    }
    match target? {
        ClientRef::Upstream => None,
        tierd => Some((tierd, skipme)),
    }
}

/// The client id in argument `i`, and what it refers to.
fn client_arg(s: &Session, req: &Request, i: usize) -> Option<(u64, ClientRef)> {
    let id = u64::try_from(string2ll(req.arg(i)?)?).ok()?;
    Some((id, s.lookup_client(id)))
}

/// The request with argument `i` replaced.
fn with_arg(req: &Request, i: usize, value: &[u8]) -> Request {
    let args: Vec<&[u8]> = req
        .args
        .iter()
        .enumerate()
        .map(|(j, a)| if j == i { value } else { &a[..] })
        .collect();
    Request::from_args(&args)
}

/// `CLIENT TRACKING on REDIRECT id` with a tierd client id: the target's
/// dedicated connection (a subscriber to `__redis__:invalidate`) is what
/// Redis must redirect to. Other ids go to Redis unchanged.
fn redirect_to_upstream(s: &Session, req: Request) -> Result<Request, Bytes> {
    if !req
        .arg(1)
        .is_some_and(|a| a.eq_ignore_ascii_case(b"TRACKING"))
    {
        return Ok(req);
    }
    let Some(at) = req
        .args
        .iter()
        .skip(3)
        .position(|a| a.eq_ignore_ascii_case(b"REDIRECT"))
        .map(|p| p + 4)
    else {
        return Ok(req);
    };
    let no_such = || error("ERR The client ID you want redirect to does not exist");
    match client_arg(s, &req, at).map(|(_, r)| r) {
        Some(ClientRef::Live(entry)) => {
            match entry.upstream_id.load(std::sync::atomic::Ordering::Relaxed) {
                0 => Err(no_such()),
                up => Ok(with_arg(&req, at, up.to_string().as_bytes())),
            }
        }
        Some(ClientRef::Gone) => Err(no_such()),
        _ => Ok(req),
    }
}
