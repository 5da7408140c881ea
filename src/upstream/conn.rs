//! One upstream Redis connection: multiplexed, pipelined, framed.
//!
//! Many sessions append raw request bytes to a connection's output buffer and
//! register a [`Waiter`] in the same critical section, so that the order of
//! waiters is the order of requests on the wire. One task per connection
//! writes the buffer out in batches, frames replies (never re-encoding them)
//! and hands each to the waiter at the front of the queue. A watchdog fails
//! the connection when a request gets no reply bytes within the command
//! timeout; since replies are ordered, a stuck request cannot be skipped, so
//! every request on that connection fails and only those.
//!
//! A *pooled* connection is supervised: it reconnects with capped exponential
//! backoff until its last handle is dropped. A *dedicated* connection belongs
//! to one session (MULTI, SUBSCRIBE, blocking commands…); it never reconnects,
//! because the state it carried would be gone, and reports its end to the
//! session instead.
//!
//! This module knows nothing of sessions, commands or the cache.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};

use super::{
    Credentials, Fanout, HelloInfo, Inbox, ReplyTo, Settings, SetupHook, UpstreamError, Upstreamed,
};
use crate::protocol::{inspect, reply, Proto, ReplyFramer};

/// How one request's reply gets back to the session that sent it.
struct Waiter {
    seq: u64,
    /// `None`: the dedicated connection's own channel.
    inbox: Option<Inbox>,
    /// False for blocking commands: `BLPOP k 0` may legitimately wait forever.
    timed: bool,
    /// In stream mode: the frame that answers this request; frames before it
    /// are pushes.
    until: Option<&'static [u8]>,
    /// When it was queued, for one request in `LATENCY_SAMPLE`.
    sent: Option<Instant>,
    /// Others who get the same reply.
    fanout: Option<Arc<Fanout>>,
}

enum Status {
    /// A connect attempt is running. When `queue` is set (the first attempt,
    /// or the first after a working connection was lost), requests wait for
    /// it; otherwise they fail fast.
    Connecting {
        queue: bool,
    },
    Up,
    Down(UpstreamError),
}

/// What the setup handshake learned.
enum Handshake {
    /// Upstream's `HELLO` reply.
    Hello(HelloInfo),
    /// The connection is unauthenticated against a server that requires a
    /// password: upstream's own `-NOAUTH` reply to `HELLO`.
    NoAuth(Bytes),
}

struct State {
    status: Status,
    /// Request bytes not yet handed to the socket.
    out: BytesMut,
    /// One entry per request written (or about to be), in wire order.
    waiters: VecDeque<Waiter>,
    /// Last time reply bytes arrived (or the waiter queue became non-empty).
    last_progress: Instant,
    /// A delivery is waiting for a slow client (dedicated connections): the
    /// watchdog must not blame upstream for that.
    delivering: bool,
    /// Dedicated connections only: frames that answer no waiter are pushes
    /// (pub/sub, MONITOR) rather than a protocol desync.
    stream: bool,
    hello: Option<Arc<HelloInfo>>,
    noauth: Option<Bytes>,
    /// Requests queued, for latency sampling.
    queued: u64,
}

struct Inner {
    settings: Arc<Settings>,
    proto: Proto,
    creds: Option<Credentials>,
    /// Sync lock, never held across `.await`: sessions append and register
    /// waiters under it, the connection task pops waiters under it. Holding it
    /// across the two keeps wire order and waiter order identical.
    state: Mutex<State>,
    wake_writer: Notify,
    /// Where pushes go; `Some` exactly for dedicated connections.
    pushes: Option<mpsc::Sender<Upstreamed>>,
    /// Pooled connections of the default identity: the extra setup command.
    hook: Option<Arc<SetupHook>>,
    /// The hook generation upstream accepted on the current connection (0:
    /// none). Cleared when the connection is lost.
    setup_gen: AtomicU64,
    /// Bumped on every (re)connect, so that a reply to a setup command sent
    /// on an earlier connection is not credited to the current one.
    incarnation: AtomicU64,
}

/// A handle to an upstream connection. Clones share the connection; when the
/// last handle is dropped the connection task ends and the socket closes.
#[derive(Clone)]
pub struct Conn {
    inner: Arc<Inner>,
    _alive: Arc<watch::Sender<()>>,
}

impl Conn {
    /// Starts a supervised, reconnecting connection for a pool. Requests sent
    /// before the first connect attempt finishes wait for it.
    pub(crate) fn pooled(
        settings: Arc<Settings>,
        proto: Proto,
        creds: Option<Credentials>,
        hook: Option<Arc<SetupHook>>,
    ) -> Conn {
        let (alive_tx, alive_rx) = watch::channel(());
        let mut inner = Inner::new(
            settings,
            proto,
            creds,
            None,
            Status::Connecting { queue: true },
        );
        inner.hook = hook;
        let inner = Arc::new(inner);
        tokio::spawn(supervise(inner.clone(), alive_rx));
        Conn {
            inner,
            _alive: Arc::new(alive_tx),
        }
    }

    /// Opens a dedicated connection for one session. Pushes and the end of
    /// the connection are delivered on `pushes`.
    ///
    /// # Errors
    ///
    /// Connect, setup (`HELLO`/`AUTH`/`SELECT`) or timeout failures.
    pub(crate) async fn dedicated(
        settings: Arc<Settings>,
        proto: Proto,
        creds: Option<Credentials>,
        pushes: mpsc::Sender<Upstreamed>,
    ) -> Result<Conn, UpstreamError> {
        if !settings.breaker.allows() {
            return Err(UpstreamError::CircuitOpen);
        }
        let (stream, handshake, _) =
            match connect_and_setup(&settings, proto, creds.as_ref(), None).await {
                Ok(connected) => connected,
                Err(e) => {
                    if matches!(e, UpstreamError::Unavailable(_))
                        && settings.breaker.failure("connect failed")
                    {
                        spawn_probe(settings.clone());
                    }
                    return Err(e);
                }
            };
        let (alive_tx, mut alive_rx) = watch::channel(());
        let inner = Arc::new(Inner::new(
            settings,
            proto,
            creds,
            Some(pushes.clone()),
            Status::Up,
        ));
        inner.state.lock().learn(handshake);
        let task_inner = inner.clone();
        tokio::spawn(async move {
            let err = tokio::select! {
                err = run(&task_inner, stream) => err,
                _ = alive_rx.changed() => return,
            };
            tracing::debug!(error = %err, "dedicated upstream connection ended");
            task_inner.fail_all(err.clone());
            let _ = pushes.send(Upstreamed::Closed(err)).await;
        });
        Ok(Conn {
            inner,
            _alive: Arc::new(alive_tx),
        })
    }

    /// Queues `raw` (one complete request) for writing; its reply goes to
    /// `to`.
    ///
    /// # Errors
    ///
    /// `UpstreamError::Unavailable` at once when the connection is down; it
    /// never waits.
    pub fn send(&self, raw: &[u8], to: ReplyTo<'_>) -> Result<(), UpstreamError> {
        self.send_all(&[(raw, to)])
    }

    /// Queues several requests back to back: no other sender's request can
    /// come between them on the wire (a `CLIENT CACHING YES` must be
    /// followed by the read it is for). Each reply goes to its own `ReplyTo`.
    ///
    /// # Errors
    ///
    /// As [`Conn::send`]; then none of them was queued.
    pub fn send_all(&self, requests: &[(&[u8], ReplyTo<'_>)]) -> Result<(), UpstreamError> {
        // Pooled connections only: a client's dedicated connection that is
        // up carries state (MULTI, WATCH, subscriptions) that a refused
        // request would put out of step with Redis, and its own watchdog
        // already bounds every wait. New ones are refused in `dedicated`.
        if self.inner.pushes.is_none() && !self.inner.settings.breaker.allows() {
            return Err(UpstreamError::CircuitOpen);
        }
        let was_empty;
        {
            let mut st = self.inner.state.lock();
            match &st.status {
                Status::Up | Status::Connecting { queue: true } => {}
                Status::Connecting { queue: false } => {
                    return Err(UpstreamError::unavailable("reconnecting"));
                }
                Status::Down(err) => return Err(err.clone()),
            }
            was_empty = st.out.is_empty();
            for &(raw, to) in requests {
                st.push(raw, to);
            }
        }
        // The writer takes the whole buffer each time it runs, so only the
        // request that makes the buffer non-empty needs to wake it.
        if was_empty {
            self.inner.wake_writer.notify_one();
        }
        Ok(())
    }

    /// Sends one request and waits for its reply, outside any session's
    /// reply queue: for tierd's own requests (`AUTH` checks, `SELECT` on a
    /// fresh dedicated connection, `CACHE.*` jobs). On a shared connection a
    /// push that arrives just before the reply belongs to the request being
    /// answered, so it is tierd's and is dropped; on a dedicated connection
    /// pushes go to the owner's channel as always.
    ///
    /// # Errors
    ///
    /// As [`Conn::send`], and when the connection is lost or times out
    /// before the reply (the watchdog bounds the wait).
    pub async fn request(&self, raw: &[u8]) -> Result<Bytes, UpstreamError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.send(
            raw,
            ReplyTo::Inbox {
                seq: 0,
                inbox: &tx,
                timed: true,
            },
        )?;
        // The waiter holds its own sender: if it were ever dropped without
        // an answer, `recv` must end rather than wait forever.
        drop(tx);
        loop {
            match rx.recv().await {
                Some(Upstreamed::Reply { reply, .. }) => return reply,
                Some(Upstreamed::Push(_)) => continue,
                Some(Upstreamed::Closed(e)) => return Err(e),
                None => return Err(UpstreamError::unavailable("connection lost")),
            }
        }
    }

    /// Sends requests back to back (as [`Conn::send_all`]) and waits for
    /// all their replies, in order, outside any session: for tierd's own
    /// work on pooled connections (a lease attempt, a refresh). One reply
    /// per request; a request the connection lost gets its error.
    ///
    /// # Errors
    ///
    /// As [`Conn::send`]: then nothing was sent.
    pub async fn request_all(
        &self,
        raws: &[&[u8]],
    ) -> Result<Vec<Result<Bytes, UpstreamError>>, UpstreamError> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let requests: Vec<(&[u8], ReplyTo<'_>)> = raws
            .iter()
            .enumerate()
            .map(|(seq, raw)| {
                let to = ReplyTo::Inbox {
                    seq: seq as u64,
                    inbox: &tx,
                    timed: true,
                };
                (*raw, to)
            })
            .collect();
        self.send_all(&requests)?;
        drop(requests);
        drop(tx);
        let mut replies: Vec<Option<Result<Bytes, UpstreamError>>> =
            (0..raws.len()).map(|_| None).collect();
        let mut left = raws.len();
        while left > 0 {
            match rx.recv().await {
                Some(Upstreamed::Reply { seq, reply }) => {
                    if let Some(slot) = usize::try_from(seq).ok().and_then(|i| replies.get_mut(i)) {
                        if slot.is_none() {
                            left -= 1;
                        }
                        *slot = Some(reply);
                    }
                }
                Some(Upstreamed::Push(_)) => {}
                Some(Upstreamed::Closed(_)) | None => break,
            }
        }
        Ok(replies
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(UpstreamError::unavailable("connection lost"))))
            .collect())
    }

    /// From now on, frames that answer no waiter are pushes (dedicated
    /// connections in pub/sub or MONITOR mode).
    pub fn set_stream(&self) {
        self.inner.state.lock().stream = true;
    }

    /// Whether the connection is currently established.
    pub fn is_up(&self) -> bool {
        matches!(self.inner.state.lock().status, Status::Up)
    }

    /// The `HELLO` reply of the current connection, once established.
    pub fn hello(&self) -> Option<Arc<HelloInfo>> {
        self.inner.state.lock().hello.clone()
    }

    /// Upstream's `-NOAUTH` reply to the handshake when this connection is
    /// unauthenticated against a server that requires a password.
    pub fn noauth(&self) -> Option<Bytes> {
        self.inner.state.lock().noauth.clone()
    }

    /// The protocol this connection speaks.
    pub fn proto(&self) -> Proto {
        self.inner.proto
    }

    /// The [`SetupHook`] generation upstream accepted on the current
    /// connection; 0 when none (no hook, not connected, or refused).
    pub fn setup_gen(&self) -> u64 {
        self.inner.setup_gen.load(Ordering::SeqCst)
    }

    /// Runs the setup hook's current command on this established
    /// connection, and records its generation once upstream accepted it, if
    /// it is still the hook's current one and the connection did not
    /// reconnect meanwhile (the handshake of a new connection runs the
    /// current command itself). Returns whether it recorded it. A
    /// connection that is not up is left to its handshake.
    ///
    /// # Errors
    ///
    /// When the connection is lost before the reply.
    pub async fn apply_setup(&self) -> Result<bool, UpstreamError> {
        let Some(hook) = self.inner.hook.as_ref() else {
            return Ok(false);
        };
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (gen, incarnation) = {
            let mut st = self.inner.state.lock();
            let Some((gen, command)) = hook.current() else {
                return Ok(false);
            };
            if !matches!(st.status, Status::Up) {
                return Ok(false);
            }
            let was_empty = st.out.is_empty();
            st.push(
                &command,
                ReplyTo::Inbox {
                    seq: 0,
                    inbox: &tx,
                    timed: true,
                },
            );
            if was_empty {
                self.inner.wake_writer.notify_one();
            }
            (gen, self.inner.incarnation.load(Ordering::SeqCst))
        };
        let reply = match rx.recv().await {
            Some(Upstreamed::Reply { reply, .. }) => reply?,
            _ => return Err(UpstreamError::unavailable("connection lost")),
        };
        if !inspect::is_ok(&reply) {
            tracing::warn!(reply = %String::from_utf8_lossy(&reply).trim_end(), "upstream refused a connection setup command");
            return Ok(false);
        }
        let st = self.inner.state.lock();
        if matches!(st.status, Status::Up)
            && self.inner.incarnation.load(Ordering::SeqCst) == incarnation
            && hook.current_gen() == gen
        {
            self.inner.setup_gen.store(gen, Ordering::SeqCst);
            return Ok(true);
        }
        Ok(false)
    }
}

impl State {
    /// Appends one request and registers who gets its reply, in wire order.
    fn push(&mut self, raw: &[u8], to: ReplyTo<'_>) {
        self.out.extend_from_slice(raw);
        let waiter = match to {
            ReplyTo::Nobody => None,
            ReplyTo::Inbox { seq, inbox, timed } => Some(Waiter {
                seq,
                inbox: Some(inbox.clone()),
                timed,
                until: None,
                sent: None,
                fanout: None,
            }),
            ReplyTo::Shared { seq, inbox, fanout } => Some(Waiter {
                seq,
                inbox: Some(inbox.clone()),
                timed: true,
                until: None,
                sent: None,
                fanout: Some(fanout.clone()),
            }),
            ReplyTo::Owner { seq, timed } => Some(Waiter {
                seq,
                inbox: None,
                timed,
                until: None,
                sent: None,
                fanout: None,
            }),
            ReplyTo::StreamEnd { seq, end } => Some(Waiter {
                seq,
                inbox: None,
                timed: false,
                until: Some(end),
                sent: None,
                fanout: None,
            }),
        };
        if let Some(mut w) = waiter {
            self.queued = self.queued.wrapping_add(1);
            if w.timed && self.queued % crate::metrics::LATENCY_SAMPLE == 0 {
                w.sent = Some(Instant::now());
            }
            if self.waiters.is_empty() {
                self.last_progress = Instant::now();
            }
            self.waiters.push_back(w);
        }
    }

    fn learn(&mut self, handshake: Handshake) {
        match handshake {
            Handshake::Hello(info) => {
                self.hello = Some(Arc::new(info));
                self.noauth = None;
            }
            Handshake::NoAuth(reply) => {
                self.hello = None;
                self.noauth = Some(reply);
            }
        }
    }
}

impl Inner {
    fn new(
        settings: Arc<Settings>,
        proto: Proto,
        creds: Option<Credentials>,
        pushes: Option<mpsc::Sender<Upstreamed>>,
        status: Status,
    ) -> Inner {
        Inner {
            settings,
            proto,
            creds,
            state: Mutex::new(State {
                status,
                out: BytesMut::new(),
                waiters: VecDeque::new(),
                last_progress: Instant::now(),
                delivering: false,
                stream: false,
                hello: None,
                noauth: None,
                queued: 0,
            }),
            wake_writer: Notify::new(),
            pushes,
            hook: None,
            setup_gen: AtomicU64::new(0),
            incarnation: AtomicU64::new(0),
        }
    }

    /// Marks the connection down and fails every request that was on it,
    /// and only those.
    fn fail_all(&self, err: UpstreamError) {
        if self.setup_gen.swap(0, Ordering::SeqCst) != 0 {
            if let Some(hook) = &self.hook {
                hook.lost();
            }
        }
        let waiters = {
            let mut st = self.state.lock();
            st.status = Status::Down(err.clone());
            st.out.clear();
            st.hello = None;
            std::mem::take(&mut st.waiters)
        };
        // Waiters on the owner's channel learn from `Closed`, which the
        // dedicated connection's task sends next.
        for w in waiters {
            if let Some(fanout) = &w.fanout {
                fanout.deliver(&Err(err.clone()));
            }
            if let Some(inbox) = w.inbox {
                let _ = inbox.send(Upstreamed::Reply {
                    seq: w.seq,
                    reply: Err(err.clone()),
                });
            }
        }
    }
}

/// Keeps a pooled connection alive: connect, serve until it breaks, back
/// off, repeat; until the last handle is dropped.
async fn supervise(inner: Arc<Inner>, mut alive: watch::Receiver<()>) {
    let settings = inner.settings.clone();
    let mut backoff = settings.backoff_min;
    let mut queue = true;
    let mut failures: u32 = 0;
    loop {
        inner.state.lock().status = Status::Connecting { queue };
        let setup = inner.hook.as_ref().and_then(|h| h.current());
        let attempt = tokio::select! {
            res = connect_and_setup(&settings, inner.proto, inner.creds.as_ref(), setup) => res,
            _ = alive.changed() => return,
        };
        match attempt {
            Ok((stream, handshake, setup_gen)) => {
                {
                    let mut st = inner.state.lock();
                    inner.incarnation.fetch_add(1, Ordering::SeqCst);
                    inner.setup_gen.store(setup_gen, Ordering::SeqCst);
                    st.status = Status::Up;
                    st.learn(handshake);
                    st.last_progress = Instant::now();
                }
                tracing::info!(event = "upstream_connected", upstream = %settings.addr, proto = inner.proto.as_u8(), "upstream connected");
                if setup_gen != 0 {
                    if let Some(hook) = &inner.hook {
                        hook.restored();
                    }
                }
                backoff = settings.backoff_min;
                failures = 0;
                let err = tokio::select! {
                    err = run(&inner, stream) => err,
                    _ = alive.changed() => return,
                };
                tracing::warn!(event = "upstream_lost", upstream = %settings.addr, error = %err, "upstream connection lost");
                inner.fail_all(err);
                // The next attempt is the first after a working connection:
                // requests may wait for it (a restart is usually quick).
                queue = true;
                continue;
            }
            Err(err) => {
                // Refused setup (a wrong password) is an answer, not an
                // outage.
                if matches!(err, UpstreamError::Unavailable(_))
                    && settings.breaker.failure("connect failed")
                {
                    spawn_probe(settings.clone());
                }
                failures += 1;
                if failures == 1 {
                    tracing::warn!(event = "upstream_unavailable", upstream = %settings.addr, error = %err, "upstream unavailable");
                } else {
                    tracing::debug!(upstream = %settings.addr, error = %err, failures, "upstream still unavailable");
                }
                inner.fail_all(err);
                queue = false;
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = alive.changed() => return,
        }
        backoff = (backoff * 2).min(settings.backoff_max);
    }
}

/// Whether a reply says Redis cannot serve yet (`-LOADING` while it loads
/// its dataset, `-MASTERDOWN`, `-BUSY` running a script): an answer, but
/// no sign the breaker may close.
fn not_ready(frame: &[u8]) -> bool {
    [&b"-LOADING"[..], b"-MASTERDOWN", b"-BUSY "]
        .iter()
        .any(|p| frame.starts_with(p))
}

/// While the breaker is open, checks every reconnect delay whether Redis
/// answers again (a fresh connection, an inline `PING`, any reply that is
/// not [`not_ready`]; `-NOAUTH` counts, the handshake is not the point),
/// and closes it when it does. The breaker's only way back when nothing
/// else reconnects (the failures were dedicated connections', or pooled
/// connections that stayed up).
fn spawn_probe(settings: Arc<Settings>) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    if !settings.breaker.start_probe() {
        return;
    }
    runtime.spawn(async move {
        let mut delay = settings.backoff_min;
        loop {
            probe_until_closed(&settings, &mut delay).await;
            settings.breaker.probe_ended();
            // Opened again just as this probe stopped: go on probing.
            let closed = settings.breaker.state() == super::BreakerState::Closed;
            if closed || !settings.breaker.start_probe() {
                return;
            }
        }
    });
}

/// Probes until the breaker is closed (by this probe or anything else).
async fn probe_until_closed(settings: &Settings, delay: &mut Duration) {
    while settings.breaker.state() != super::BreakerState::Closed {
        tokio::time::sleep(*delay).await;
        *delay = (*delay * 2).min(settings.backoff_max);
        let probe = async {
            let mut stream = TcpStream::connect(settings.addr.as_str()).await.ok()?;
            stream.write_all(b"PING\r\n").await.ok()?;
            let mut buf = BytesMut::with_capacity(256);
            read_frame(&mut stream, &mut buf, settings.max_depth)
                .await
                .ok()
        };
        let answered = tokio::time::timeout(settings.connect_timeout, probe)
            .await
            .ok()
            .flatten();
        if answered.is_some_and(|frame| !not_ready(&frame)) {
            settings.breaker.reconnected();
            return;
        }
    }
}

/// A control-plane connection: the handshake, then the bare socket.
pub(super) async fn control(
    settings: &Settings,
    proto: Proto,
    creds: Option<&Credentials>,
) -> Result<(TcpStream, HelloInfo), UpstreamError> {
    match connect_and_setup(settings, proto, creds, None).await? {
        (stream, Handshake::Hello(info), _) => Ok((stream, info)),
        (_, Handshake::NoAuth(reply), _) => Err(UpstreamError::Rejected(reply)),
    }
}

/// Connects and runs the setup handshake: `HELLO proto [AUTH user pass]`,
/// then `SELECT db` when the URL names one, then the setup hook's command
/// (`setup`: its generation and bytes) if there is one. Returns the
/// generation upstream accepted, 0 if none or refused (the connection is
/// still usable; the caller sees the generation does not match).
async fn connect_and_setup(
    settings: &Settings,
    proto: Proto,
    creds: Option<&Credentials>,
    setup: Option<(u64, Bytes)>,
) -> Result<(TcpStream, Handshake, u64), UpstreamError> {
    let work = async {
        let mut stream = TcpStream::connect(settings.addr.as_str())
            .await
            .map_err(|e| {
                UpstreamError::unavailable(format!("connect to {}: {e}", settings.addr))
            })?;
        let _ = stream.set_nodelay(true);

        let proto_arg = [b'0' + proto.as_u8()];
        let mut hello: Vec<&[u8]> = vec![b"HELLO", &proto_arg];
        if let Some(c) = creds {
            hello.extend_from_slice(&[b"AUTH", c.user_or_default(), &c.pass]);
        }
        let mut req = BytesMut::new();
        req.extend_from_slice(&reply::encode_command(&hello));
        let db = settings.db.to_string();
        if settings.db != 0 {
            req.extend_from_slice(&reply::encode_command(&[b"SELECT", db.as_bytes()]));
        }
        if let Some((_, command)) = &setup {
            req.extend_from_slice(command);
        }
        stream.write_all(&req).await.map_err(io_lost)?;

        let mut buf = BytesMut::with_capacity(4096);
        let hello_reply = read_frame(&mut stream, &mut buf, settings.max_depth).await?;
        let handshake = if inspect::is_error(&hello_reply) {
            // Without credentials against a server that wants them, Redis
            // answers every command with -NOAUTH. A RESP2 connection stays
            // usable so that unauthenticated clients get exactly that error.
            let noauth = hello_reply.starts_with(b"-NOAUTH");
            if !(noauth && creds.is_none() && proto == Proto::Resp2) {
                return Err(UpstreamError::Rejected(hello_reply));
            }
            Handshake::NoAuth(hello_reply)
        } else {
            Handshake::Hello(HelloInfo::parse(&hello_reply, proto, settings.max_depth)?)
        };
        if settings.db != 0 {
            let select_reply = read_frame(&mut stream, &mut buf, settings.max_depth).await?;
            if inspect::is_error(&select_reply) && matches!(handshake, Handshake::Hello(_)) {
                return Err(UpstreamError::Rejected(select_reply));
            }
        }
        let mut setup_gen = 0;
        if let Some((gen, _)) = setup {
            let reply = read_frame(&mut stream, &mut buf, settings.max_depth).await?;
            if inspect::is_ok(&reply) {
                setup_gen = gen;
            } else if matches!(handshake, Handshake::Hello(_)) {
                tracing::warn!(reply = %String::from_utf8_lossy(&reply).trim_end(), "upstream refused the connection setup command");
            }
        }
        if !buf.is_empty() {
            return Err(UpstreamError::unavailable(
                "unexpected data after connection setup",
            ));
        }
        Ok((stream, handshake, setup_gen))
    };
    match tokio::time::timeout(settings.connect_timeout, work).await {
        Ok(res) => res,
        Err(_) => Err(UpstreamError::unavailable(format!(
            "connect to {} timed out after {:?}",
            settings.addr, settings.connect_timeout
        ))),
    }
}

async fn read_frame(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    max_depth: usize,
) -> Result<Bytes, UpstreamError> {
    let mut framer = ReplyFramer::new(max_depth);
    loop {
        match framer.frame(buf) {
            Ok(Some(len)) => return Ok(buf.split_to(len).freeze()),
            Ok(None) => {}
            Err(e) => {
                return Err(UpstreamError::unavailable(format!(
                    "bad reply from upstream: {e}"
                )))
            }
        }
        if stream.read_buf(buf).await.map_err(io_lost)? == 0 {
            return Err(UpstreamError::unavailable("connection closed by upstream"));
        }
    }
}

fn io_lost(e: std::io::Error) -> UpstreamError {
    UpstreamError::unavailable(format!("connection lost: {e}"))
}

/// Serves an established connection until it breaks; returns why.
async fn run(inner: &Inner, stream: TcpStream) -> UpstreamError {
    let (r, w) = stream.into_split();
    tokio::select! {
        err = read_loop(inner, r) => err,
        err = write_loop(inner, w) => err,
        err = watchdog(inner) => err,
    }
}

async fn write_loop(inner: &Inner, mut w: OwnedWriteHalf) -> UpstreamError {
    loop {
        let chunk = {
            let mut st = inner.state.lock();
            if st.out.is_empty() {
                None
            } else {
                Some(st.out.split().freeze())
            }
        };
        match chunk {
            Some(chunk) => {
                if let Err(e) = w.write_all(&chunk).await {
                    return io_lost(e);
                }
            }
            None => {
                inner.wake_writer.notified().await;
                // Let every session made ready by the same I/O event round
                // append its request first: one write (and one read on the
                // Redis side) then carries many requests. tokio runs a
                // yielded task after the I/O driver has been polled.
                tokio::task::yield_now().await;
            }
        }
    }
}

async fn read_loop(inner: &Inner, mut r: OwnedReadHalf) -> UpstreamError {
    const READ_CHUNK: usize = 64 * 1024;
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let mut framer = ReplyFramer::new(inner.settings.max_depth);
    loop {
        loop {
            match framer.frame(&buf) {
                Ok(Some(len)) => {
                    let frame = buf.split_to(len).freeze();
                    if let Err(err) = deliver(inner, frame).await {
                        return err;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    return UpstreamError::unavailable(format!("bad reply from upstream: {e}"))
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        match r.read_buf(&mut buf).await {
            Ok(0) => return UpstreamError::unavailable("connection closed by upstream"),
            Ok(_) => inner.state.lock().last_progress = Instant::now(),
            Err(e) => return io_lost(e),
        }
    }
}

/// Hands one reply frame to whoever is waiting for it.
async fn deliver(inner: &Inner, frame: Bytes) -> Result<(), UpstreamError> {
    let push = reply::is_push(&frame);
    if push && inner.pushes.is_none() && inner.hook.is_some() && is_tracking_push(&frame) {
        // The setup hook turned tracking on for this shared connection; its
        // pushes (a redirect that broke when the tracking link dropped) are
        // tierd's, not the client's whose reply comes next.
        return Ok(());
    }
    if push && inner.pushes.is_none() {
        // On a shared connection a push (e.g. `DEBUG PROTOCOL push`) belongs
        // to the client whose request is being answered: Redis sends it just
        // before that request's reply.
        let front = inner
            .state
            .lock()
            .waiters
            .front()
            .and_then(|w| w.inbox.clone());
        if let Some(inbox) = front {
            let _ = inbox.send(Upstreamed::Push(frame));
        }
        return Ok(());
    }
    let waiter = {
        let mut st = inner.state.lock();
        let until = st.waiters.front().and_then(|w| w.until);
        if push || until.is_some_and(|end| frame.as_ref() != end) {
            None
        } else {
            match st.waiters.pop_front() {
                Some(w) => Some(w),
                None if st.stream => None,
                None => {
                    return Err(UpstreamError::unavailable(
                        "protocol desync: a reply arrived that no request was waiting for",
                    ))
                }
            }
        }
    };
    if let (Some(sent), Some(latency)) = (
        waiter.as_ref().and_then(|w| w.sent),
        inner.settings.latency.as_ref(),
    ) {
        latency.record(sent.elapsed());
    }
    // A reply is a success, except Redis saying it cannot serve yet.
    if waiter.is_some() && !not_ready(&frame) {
        inner.settings.breaker.success();
    }
    if let Some(fanout) = waiter.as_ref().and_then(|w| w.fanout.as_ref()) {
        // Straight from the connection: the sessions that share this reply
        // must not wait on the one that sent it.
        fanout.deliver(&Ok(frame.clone()));
    }
    match (waiter, &inner.pushes) {
        (
            Some(Waiter {
                seq,
                inbox: Some(inbox),
                ..
            }),
            _,
        ) => {
            let _ = inbox.send(Upstreamed::Reply {
                seq,
                reply: Ok(frame),
            });
        }
        (
            Some(Waiter {
                seq, inbox: None, ..
            }),
            Some(own),
        ) => {
            send_own(
                inner,
                own,
                Upstreamed::Reply {
                    seq,
                    reply: Ok(frame),
                },
            )
            .await;
        }
        (Some(Waiter { inbox: None, .. }), None) => {}
        // A session that is gone no longer needs its pushes, and the
        // connection ends with the session's handle anyway.
        (None, Some(pushes)) => {
            send_own(inner, pushes, Upstreamed::Push(frame)).await;
        }
        // Unreachable: pushes on shared connections were handled above.
        (None, None) => {}
    }
    Ok(())
}

/// Whether a push is a client-tracking message (`invalidate`,
/// `tracking-redir-broken`).
fn is_tracking_push(frame: &[u8]) -> bool {
    let Some(els) = inspect::elements(frame, 2) else {
        return false;
    };
    matches!(
        els.first().and_then(|k| inspect::string_payload(k)),
        Some(b"invalidate" | b"tracking-redir-broken")
    )
}

/// Delivers on a dedicated connection's bounded channel. While the channel
/// is full the client is slow, not upstream: the watchdog is told, and the
/// wait does not count against the command timeout.
async fn send_own(inner: &Inner, own: &mpsc::Sender<Upstreamed>, ev: Upstreamed) {
    let ev = match own.try_send(ev) {
        Ok(()) => return,
        Err(mpsc::error::TrySendError::Closed(_)) => return,
        Err(mpsc::error::TrySendError::Full(ev)) => ev,
    };
    inner.state.lock().delivering = true;
    let _ = own.send(ev).await;
    let mut st = inner.state.lock();
    st.delivering = false;
    st.last_progress = Instant::now();
}

/// Fails the connection when the oldest timed request has seen no reply
/// bytes for the command timeout.
async fn watchdog(inner: &Inner) -> UpstreamError {
    let timeout = inner.settings.command_timeout;
    let period = (timeout / 4).clamp(Duration::from_millis(5), Duration::from_millis(250));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let st = inner.state.lock();
        if let Some(front) = st.waiters.front() {
            if front.timed && !st.delivering && st.last_progress.elapsed() > timeout {
                drop(st);
                if inner.settings.breaker.failure("command timeout") {
                    spawn_probe(inner.settings.clone());
                }
                return UpstreamError::unavailable(format!("command timed out after {timeout:?}"));
            }
        }
    }
}
