//! The tracking link: Redis's `CLIENT TRACKING`, on tierd's own connections.
//!
//! Writers that bypass tierd, scripts, expiry and eviction change keys
//! without tierd seeing a write. Redis reports those changes to clients that
//! asked it to track keys; this task owns the one RESP3 connection those
//! reports arrive on (named [`LINK_NAME`] upstream) and turns each into an
//! L1 invalidation, or a flush for `FLUSHALL`/`FLUSHDB` (whose report has a
//! null key list, the message fred drops).
//!
//! Modes (`[invalidation] tracking`):
//!
//! - `default`: the pooled connections of the default identity, which carry
//!   every cacheable read, run `CLIENT TRACKING ON REDIRECT <link> OPTIN`
//!   (through the upstream setup hook, so a reconnecting connection runs it
//!   in its handshake), and each fill is preceded by `CLIENT CACHING YES`:
//!   Redis remembers exactly the keys tierd cached. A fill is allowed only on
//!   a connection whose setup generation is the live one
//!   ([`Tracking::fill_allowed`]).
//! - `bcast`: the link itself runs `CLIENT TRACKING ON BCAST` with the
//!   rules' literal prefixes; Redis remembers nothing, but reports every
//!   write to a matching key.
//! - `off`: no tracking; only writes through this tierd invalidate.
//!
//! In every mode the task also reads the `COMMAND` table, at start and after
//! every reconnect, since a reconnect may mean a restarted or upgraded
//! server.
//!
//! Lost link, lost trust (DESIGN invariant 5): the moment the link fails,
//! lags (a heartbeat `PING` unanswered for the command timeout) or cannot be
//! set up, L1 is suspended: everything cached is dropped, in-flight fills
//! are cancelled and nothing is cached until tracking is live again on a new
//! link. Reports are never lost silently: Redis's output buffer holds them
//! while the task reads, and if Redis drops the link for overflowing it, that
//! is a lost link.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::link::{Link, Reconnect};
use crate::cache::L1;
use crate::command::{CommandTable, TableCell};
use crate::config::TrackingMode;
use crate::protocol::{inspect, reply, Proto, ReplyFramer};
use crate::upstream::{Conn, Timeouts, Upstream, UpstreamError};

/// The client name of the tracking link upstream (`CLIENT LIST`).
pub const LINK_NAME: &str = "tierd:tracking";

/// The link's name when nothing is tracked (`off`, or no caching rule): it
/// then only keeps the command table fresh.
pub const CONTROL_NAME: &str = "tierd:control";

/// How often the link is probed with `PING`.
const HEARTBEAT: Duration = Duration::from_secs(1);

/// The largest `COMMAND` reply read (Redis 7's is about 200 KB).
const MAX_COMMAND_REPLY: usize = 64 * 1024 * 1024;

/// Shared state between the tracking task and the sessions that fill L1.
#[derive(Debug)]
pub struct Tracking {
    mode: TrackingMode,
    /// The generation of the tracking setup that is live; 0 while none is
    /// (link down or not yet set up). In `default` mode it is the upstream
    /// setup hook's generation, which pooled connections report back.
    ready: AtomicU64,
    /// Counts for `INFO`/metrics.
    links: AtomicU64,
    invalidations: AtomicU64,
    flushes: AtomicU64,
    /// A background re-point of pooled connections is running.
    repointing: AtomicBool,
}

/// Why a link attempt ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream refused {what}: {reply}")]
    Refused { what: &'static str, reply: String },
    #[error("bad COMMAND reply: {0}")]
    Table(#[from] crate::command::TableError),
    #[error("no client id in upstream's HELLO reply")]
    NoId,
    #[error("lagging: PING unanswered for {0:?}")]
    Lagging(Duration),
    #[error("{0}")]
    Io(String),
}

impl From<String> for LinkError {
    fn from(e: String) -> LinkError {
        LinkError::Io(e)
    }
}

impl Tracking {
    /// Tracking state for `mode`; nothing is live until the task says so,
    /// except in `off` mode, where there is nothing to wait for.
    pub fn new(mode: TrackingMode) -> Tracking {
        Tracking {
            mode,
            ready: AtomicU64::new(u64::from(mode == TrackingMode::Off)),
            links: AtomicU64::new(0),
            invalidations: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            repointing: AtomicBool::new(false),
        }
    }

    /// The configured mode.
    pub fn mode(&self) -> TrackingMode {
        self.mode
    }

    /// Whether a reply read on `conn` may be cached now: tracking is live
    /// and, in `default` mode, `conn` runs the live tracking setup, so Redis
    /// will report a change to the key.
    pub fn fill_allowed(&self, conn: &Conn) -> bool {
        let ready = self.ready.load(Ordering::SeqCst);
        match self.mode {
            TrackingMode::Off => true,
            TrackingMode::Bcast => ready != 0,
            TrackingMode::Default => ready != 0 && conn.setup_gen() == ready,
        }
    }

    /// Whether fills must opt in with `CLIENT CACHING YES` first.
    pub fn opt_in(&self) -> bool {
        self.mode == TrackingMode::Default
    }

    /// Whether tracking is live now.
    pub fn is_live(&self) -> bool {
        self.ready.load(Ordering::SeqCst) != 0
    }

    /// Links established since start.
    pub fn links(&self) -> u64 {
        self.links.load(Ordering::Relaxed)
    }

    /// Keys reported changed by upstream.
    pub fn invalidations(&self) -> u64 {
        self.invalidations.load(Ordering::Relaxed)
    }

    /// Flushes reported by upstream.
    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }
}

/// What the tracking task works with.
pub struct Control {
    /// Upstream, for the link, `COMMAND` and the pooled connections.
    pub upstream: Arc<Upstream>,
    /// Where the command table goes.
    pub table: Arc<TableCell>,
    /// The L1 tier; without one (no caching rule) the task only reads the
    /// command table and keeps a heartbeat, and the mode must be `off`.
    pub l1: Option<Arc<L1>>,
    /// State shared with the sessions.
    pub tracking: Arc<Tracking>,
    /// Where reports and link changes are counted.
    pub metrics: Arc<crate::metrics::Metrics>,
}

/// Runs the tracking link until `stop` changes or its sender is dropped:
/// connect, set up, serve, and on any failure suspend L1, back off and
/// start over.
pub async fn run(control: Control, mut stop: watch::Receiver<()>) {
    let timeouts = control.upstream.timeouts();
    if let (TrackingMode::Default, Some(l1)) = (control.tracking.mode, &control.l1) {
        // Redis forgets what it tracked for a connection when the connection
        // goes: from then on a change to a key filled through it is never
        // reported. Which entries those are is not known, so all go.
        let l1 = l1.clone();
        let metrics = control.metrics.clone();
        let restored = l1.clone();
        control.upstream.setup_hook().on_lost(Arc::new(move || {
            l1.store.distrust();
            metrics.flushed(None);
        }));
        control
            .upstream
            .setup_hook()
            .on_restored(Arc::new(move || restored.store.retire_stale()));
    }
    let mut reconnect = Reconnect::new(timeouts);
    loop {
        let started = Instant::now();
        let err = tokio::select! {
            err = link(&control, timeouts) => err,
            _ = stop.changed() => return,
        };
        lose_trust(&control);
        let failures = reconnect.failed(started.elapsed());
        if failures == 1 && control.tracking.mode == TrackingMode::Off {
            tracing::warn!(event = "control_lost", error = %err, "control link lost: reconnecting");
        } else if failures == 1 {
            tracing::warn!(event = "tracking_lost", error = %err, "tracking link lost: L1 flushed and suspended until it is back");
        } else {
            tracing::debug!(error = %err, failures, "tracking link still down");
        }
        if !reconnect.wait(&mut stop).await {
            return;
        }
    }
}

/// Nothing Redis reported can be trusted to have arrived: drop everything
/// and cache nothing until a new link is live.
fn lose_trust(control: &Control) {
    if control.tracking.mode == TrackingMode::Off {
        return;
    }
    control.tracking.ready.store(0, Ordering::SeqCst);
    control.upstream.setup_hook().clear();
    if let Some(l1) = &control.l1 {
        l1.store.suspend(crate::cache::Holder::Tracking);
    }
    control.metrics.flushed(None);
    control.metrics.set_tracking_up(false);
}

/// One link: set up, then serve until it fails. Only returns an error.
async fn link(control: &Control, timeouts: Timeouts) -> LinkError {
    match link_inner(control, timeouts).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn link_inner(
    control: &Control,
    timeouts: Timeouts,
) -> Result<std::convert::Infallible, LinkError> {
    let table = fetch_table(&control.upstream, timeouts).await?;
    control.table.set(table);

    let (stream, hello) = control.upstream.control_connection(Proto::Resp3).await?;
    let id = hello.client_id().ok_or(LinkError::NoId)?;
    let mut link = Link::new(stream, timeouts.max_depth, "tracking link");
    let name = match control.tracking.mode {
        TrackingMode::Off => CONTROL_NAME,
        _ => LINK_NAME,
    };
    link.call(
        control,
        &reply::encode_command(&[b"CLIENT", b"SETNAME", name.as_bytes()]),
        "CLIENT SETNAME",
        timeouts,
    )
    .await?;

    let tracking = &control.tracking;
    let gen = match tracking.mode {
        TrackingMode::Bcast => {
            let prefixes = control
                .l1
                .as_ref()
                .map(|l1| l1.rules.bcast_prefixes())
                .unwrap_or_default();
            let mut args: Vec<&[u8]> = vec![b"CLIENT", b"TRACKING", b"ON", b"BCAST"];
            for p in &prefixes {
                args.push(b"PREFIX");
                args.push(p);
            }
            link.call(
                control,
                &reply::encode_command(&args),
                "CLIENT TRACKING ON BCAST",
                timeouts,
            )
            .await?;
            tracking.links.load(Ordering::Relaxed) + 1
        }
        TrackingMode::Default => {
            let id = id.to_string();
            let command = reply::encode_command(&[
                b"CLIENT",
                b"TRACKING",
                b"ON",
                b"REDIRECT",
                id.as_bytes(),
                b"OPTIN",
            ]);
            let gen = control.upstream.setup_hook().set(command);
            repoint(&control.upstream).await;
            gen
        }
        TrackingMode::Off => 1,
    };
    tracking.links.fetch_add(1, Ordering::Relaxed);
    tracking.ready.store(gen, Ordering::SeqCst);
    if let Some(l1) = &control.l1 {
        l1.store.resume(crate::cache::Holder::Tracking);
    }
    if tracking.mode != TrackingMode::Off {
        control.metrics.set_tracking_up(true);
    }
    if tracking.mode == TrackingMode::Off {
        tracing::info!(
            event = "control_up",
            link = id,
            "control link up (nothing tracked)"
        );
    } else {
        tracing::info!(
            event = "tracking_up",
            mode = tracking.mode.as_str(),
            link = id,
            "tracking link up"
        );
    }

    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = link.next_frame() => {
                let frame = frame?;
                if !link.on_frame(control, &frame) {
                    return Err(LinkError::Io("a reply arrived that tierd did not ask for".into()));
                }
            }
            _ = tick.tick() => {
                if let Some(sent) = link.pings.front() {
                    if sent.elapsed() > timeouts.command {
                        return Err(LinkError::Lagging(timeouts.command));
                    }
                }
                link.send(b"*1\r\n$4\r\nPING\r\n").await?;
                link.pings.push_back(Instant::now());
                if tracking.mode == TrackingMode::Default {
                    heal(control, gen);
                    keep_alive(&control.upstream);
                }
            }
        }
    }
}

/// Reads `COMMAND` on a RESP2 control connection.
async fn fetch_table(upstream: &Upstream, timeouts: Timeouts) -> Result<CommandTable, LinkError> {
    let work = async {
        let (mut stream, _) = upstream.control_connection(Proto::Resp2).await?;
        stream
            .write_all(b"*1\r\n$7\r\nCOMMAND\r\n")
            .await
            .map_err(|e| LinkError::Io(format!("writing COMMAND: {e}")))?;
        let mut buf = BytesMut::with_capacity(256 * 1024);
        let mut framer = ReplyFramer::new(timeouts.max_depth);
        loop {
            if let Some(len) = framer
                .frame(&buf)
                .map_err(|e| LinkError::Io(format!("bad COMMAND reply: {e}")))?
            {
                let frame = buf.split_to(len);
                return Ok(CommandTable::from_command_reply(&frame)?);
            }
            if buf.len() > MAX_COMMAND_REPLY {
                return Err(LinkError::Io("COMMAND reply too large".into()));
            }
            buf.reserve(64 * 1024);
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| LinkError::Io(format!("reading COMMAND: {e}")))?;
            if n == 0 {
                return Err(LinkError::Io("connection closed reading COMMAND".into()));
            }
        }
    };
    match tokio::time::timeout(timeouts.connect + timeouts.command, work).await {
        Ok(res) => res,
        Err(_) => Err(LinkError::Io("COMMAND timed out".into())),
    }
}

/// Points every established pooled connection of the default identity at
/// the link, with the setup hook's current command. Connections that are
/// down run it in their handshake when they connect.
async fn repoint(upstream: &Upstream) {
    let identity = upstream.default_identity();
    for proto in [Proto::Resp2, Proto::Resp3] {
        let Some(pool) = identity.started_pool(proto) else {
            continue;
        };
        for conn in pool.conns() {
            if conn.is_up() && conn.setup_gen() != upstream.setup_hook().current_gen() {
                if let Err(e) = conn.apply_setup().await {
                    tracing::debug!(error = %e, "could not point a pooled connection at the tracking link");
                }
            }
        }
    }
}

/// Re-points, in the background, pooled connections that missed the live
/// setup (a RESP3 pool started later, a connection that reconnected while
/// the hook was changing): until then they serve reads but fill nothing.
/// The task sends whatever the hook holds when it gets to a connection,
/// never a command of its own, so a task that outlives its link cannot
/// point a connection at a dead one.
fn heal(control: &Control, gen: u64) {
    let identity = control.upstream.default_identity();
    let stale = [Proto::Resp2, Proto::Resp3].iter().any(|&proto| {
        identity
            .started_pool(proto)
            .is_some_and(|p| p.conns().iter().any(|c| c.is_up() && c.setup_gen() != gen))
    });
    if !stale || control.tracking.repointing.swap(true, Ordering::SeqCst) {
        return;
    }
    let upstream = control.upstream.clone();
    let tracking = control.tracking.clone();
    tokio::spawn(async move {
        repoint(&upstream).await;
        tracking.repointing.store(false, Ordering::SeqCst);
    });
}

/// Pings the tracked pooled connections, so that a Redis `timeout` never
/// closes an idle one: losing a tracked connection flushes all of L1.
fn keep_alive(upstream: &Upstream) {
    let identity = upstream.default_identity();
    // Nobody reads the replies; the channel only keeps them in order.
    let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
    for proto in [Proto::Resp2, Proto::Resp3] {
        let Some(pool) = identity.started_pool(proto) else {
            continue;
        };
        for conn in pool.conns().iter().filter(|c| c.is_up()) {
            let to = crate::upstream::ReplyTo::Inbox {
                seq: 0,
                inbox: &tx,
                timed: true,
            };
            let _ = conn.send(b"*1\r\n$4\r\nPING\r\n", to);
        }
    }
}

impl Link {
    /// Sends a setup command and waits for its `+OK`, handling any report
    /// that arrives first.
    async fn call(
        &mut self,
        control: &Control,
        raw: &[u8],
        what: &'static str,
        timeouts: Timeouts,
    ) -> Result<(), LinkError> {
        self.send(raw).await?;
        let wait = async {
            loop {
                let frame = self.next_frame().await?;
                if reply::is_push(&frame) {
                    on_push(control, &frame);
                    continue;
                }
                if inspect::is_ok(&frame) {
                    return Ok(());
                }
                return Err(LinkError::Refused {
                    what,
                    reply: String::from_utf8_lossy(&frame).trim_end().to_owned(),
                });
            }
        };
        match tokio::time::timeout(timeouts.command, wait).await {
            Ok(res) => res,
            Err(_) => Err(LinkError::Lagging(timeouts.command)),
        }
    }

    /// Handles a frame while serving: a report, or a heartbeat's reply.
    /// `false` for a reply nothing was waiting for.
    fn on_frame(&mut self, control: &Control, frame: &[u8]) -> bool {
        if reply::is_push(frame) {
            on_push(control, frame);
            return true;
        }
        self.pings.pop_front().is_some()
    }
}

/// Applies one tracking report: `invalidate` with the changed keys, or with
/// null after a flush. Other pushes are ignored.
fn on_push(control: &Control, frame: &[u8]) {
    let Some(els) = inspect::elements(frame, 4) else {
        return;
    };
    let (Some(kind), Some(payload)) = (els.first(), els.get(1)) else {
        return;
    };
    if inspect::string_payload(kind) != Some(b"invalidate") {
        return;
    }
    let Some(l1) = &control.l1 else {
        return;
    };
    let store = &l1.store;
    let tracking = &control.tracking;
    match inspect::elements(payload, 2) {
        Some(keys) => {
            let mut n = 0;
            for key in keys {
                if let Some(key) = inspect::string_payload(key) {
                    store.invalidate(key);
                    n += 1;
                }
            }
            tracking.invalidations.fetch_add(n, Ordering::Relaxed);
            tracing::trace!(event = "invalidated", source = "tracking", keys = n);
            control
                .metrics
                .invalidated(crate::metrics::Source::Tracking, n);
        }
        None => {
            // `_` (or `*-1`): FLUSHALL/FLUSHDB. Redis does not say which db.
            store.flush_all();
            tracking.flushes.fetch_add(1, Ordering::Relaxed);
            tracing::info!(
                event = "invalidated",
                source = "tracking",
                kind = "flush",
                "upstream reported a flush: L1 flushed"
            );
            control
                .metrics
                .flushed(Some(crate::metrics::Source::Tracking));
        }
    }
}
