//! The invalidation bus: tierd instances telling each other what to drop,
//! over Redis pub/sub.
//!
//! Every instance with an L1 tier subscribes to one channel (`[invalidation]
//! channel`). Whatever an instance decides to invalidate is published there
//! once: the keys of writes that went through it (after upstream answered
//! them), `CACHE.INVALIDATE` tags, patterns and keys, and flushes. The
//! others apply it to their own L1. With `tracking = "off"` this is the
//! only way instances learn of each other's writes; with tracking on it also
//! carries what Redis cannot report (an `L1ONLY` pattern drops nothing in
//! Redis).
//!
//! Sessions never wait on the bus: [`Bus::publish_keys`] and friends add to
//! an outbox under a short lock and wake the task. The task drains the
//! outbox whenever it wakes, so messages batch themselves under load (up to
//! [`MAX_KEYS_PER_MESSAGE`] keys each) and go out at once when idle.
//!
//! Lost link, lost trust (DESIGN invariant 5): the task owns two
//! connections, a subscriber ([`LINK_NAME`]) and a publisher
//! ([`PUBLISHER_NAME`]). If either fails, lags (a heartbeat `PING` or a
//! `PUBLISH` unanswered for the command timeout) or cannot be set up, L1 is
//! flushed and suspended until both are back: messages published meanwhile
//! were never seen. Messages this instance published that upstream had not
//! acknowledged are sent again on the new link (an invalidation applied
//! twice is harmless), and the outbox keeps what was queued.
//!
//! # Message format (version 1)
//!
//! ```text
//! "TDB" 0x01               magic and version
//! sender: u64 LE           the publishing instance's random id
//! record*                  at least one
//!
//! record = 0x01 db count (len bytes){count}   keys
//!        | 0x02 db len bytes                   a Redis glob
//!        | 0x03 db                             flush one db
//!        | 0x04                                flush every db
//! db, count, len: unsigned LEB128, at most 32 bits
//! ```
//!
//! A message that does not start with the magic is foreign; one that does
//! but does not parse to its last byte is malformed. Both are counted and
//! ignored whole, never half-applied.

use std::collections::VecDeque;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{watch, Notify};

use super::link::{Link, Reconnect};
use crate::cache::glob::{KeyPattern, MAX_PATTERN_LEN};
use crate::cache::{Holder, L1};
use crate::metrics::{Metrics, Source};
use crate::protocol::{inspect, reply, Proto};
use crate::upstream::{Timeouts, Upstream, UpstreamError};

/// The subscriber connection's client name upstream (`CLIENT LIST`).
pub const LINK_NAME: &str = "tierd:bus";

/// The publisher connection's client name upstream.
pub const PUBLISHER_NAME: &str = "tierd:bus-pub";

/// The first bytes of every message: magic and format version.
pub const MAGIC: &[u8; 4] = b"TDB\x01";

/// Most keys in one message.
pub const MAX_KEYS_PER_MESSAGE: usize = 512;

/// A message is closed once it holds this many bytes (one larger key still
/// goes in a message of its own).
const MAX_MESSAGE_BYTES: usize = 64 * 1024;

/// Most keys the outbox holds while the link is down or slow. Past it the
/// queued records collapse into one "flush every db": cheaper than
/// remembering, and still correct.
const MAX_OUTBOX_KEYS: usize = 64 * 1024;

/// Most published messages awaiting upstream's acknowledgement. A link
/// that falls this far behind is lagging.
const MAX_UNACKED: usize = 4096;

/// How often the subscriber is probed with `PING`.
const HEARTBEAT: Duration = Duration::from_secs(1);

const KEYS: u8 = 1;
const PATTERN: u8 = 2;
const FLUSH_DB: u8 = 3;
const FLUSH_ALL: u8 = 4;

/// One thing to invalidate, as read from a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record<'a> {
    /// These keys changed in `db`.
    Keys {
        /// The db the keys were written in.
        db: u32,
        /// The keys.
        keys: Vec<&'a [u8]>,
    },
    /// Every key matching the Redis glob in `db`.
    Pattern {
        /// The db.
        db: u32,
        /// The glob, as `KEYS` reads it.
        glob: &'a [u8],
    },
    /// Everything in `db`.
    FlushDb(u32),
    /// Everything.
    FlushAll,
}

/// Why a message on the channel was ignored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejected {
    /// Not tierd's magic and version.
    Foreign,
    /// tierd's magic, but not a well-formed message.
    Malformed,
}

impl Rejected {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejected::Foreign => "foreign",
            Rejected::Malformed => "malformed",
        }
    }
}

/// A decoded message: who sent it and what to drop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message<'a> {
    /// The sending instance's id.
    pub sender: u64,
    /// At least one record.
    pub records: Vec<Record<'a>>,
}

/// Reads a message, all or nothing.
///
/// # Errors
///
/// [`Rejected::Foreign`] without the magic, [`Rejected::Malformed`] for
/// anything that does not parse to the last byte.
pub fn decode(msg: &[u8]) -> Result<Message<'_>, Rejected> {
    let rest = msg.strip_prefix(MAGIC).ok_or(Rejected::Foreign)?;
    let mut r = Reader { rest };
    let sender = r.u64().ok_or(Rejected::Malformed)?;
    let mut records = Vec::new();
    while !r.rest.is_empty() {
        records.push(r.record().ok_or(Rejected::Malformed)?);
    }
    if records.is_empty() {
        return Err(Rejected::Malformed);
    }
    Ok(Message { sender, records })
}

/// A cursor over a message. Every length is checked against what is left
/// before anything is taken, so a lying count cannot make it allocate.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn u64(&mut self) -> Option<u64> {
        let (head, rest) = self.rest.split_first_chunk::<8>()?;
        self.rest = rest;
        Some(u64::from_le_bytes(*head))
    }

    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.rest.split_first()?;
        self.rest = rest;
        Some(b)
    }

    /// Unsigned LEB128, at most 32 bits (5 bytes).
    fn varint(&mut self) -> Option<u32> {
        let mut value: u64 = 0;
        for shift in (0..35).step_by(7) {
            let b = self.byte()?;
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return u32::try_from(value).ok();
            }
        }
        None
    }

    fn bytes(&mut self) -> Option<&'a [u8]> {
        let len = self.varint()? as usize;
        if len > self.rest.len() {
            return None;
        }
        let (head, rest) = self.rest.split_at(len);
        self.rest = rest;
        Some(head)
    }

    fn record(&mut self) -> Option<Record<'a>> {
        match self.byte()? {
            KEYS => {
                let db = self.varint()?;
                let count = self.varint()? as usize;
                // Each key takes at least its one-byte length.
                if count == 0 || count > self.rest.len() {
                    return None;
                }
                let mut keys = Vec::with_capacity(count);
                for _ in 0..count {
                    keys.push(self.bytes()?);
                }
                Some(Record::Keys { db, keys })
            }
            PATTERN => {
                let db = self.varint()?;
                let glob = self.bytes()?;
                // What `CACHE.INVALIDATE PATTERN` accepts: compiling a
                // glob costs memory in proportion to its length.
                if glob.len() > MAX_PATTERN_LEN {
                    return None;
                }
                Some(Record::Pattern { db, glob })
            }
            FLUSH_DB => Some(Record::FlushDb(self.varint()?)),
            FLUSH_ALL => Some(Record::FlushAll),
            _ => None,
        }
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    while v >= 0x80 {
        out.push((v as u8 & 0x7f) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Keys and globs come from RESP requests, whose bulk length tierd caps
    // far below 4 GiB.
    put_varint(out, u32::try_from(b.len()).unwrap_or(u32::MAX));
    out.extend_from_slice(b);
}

/// Something queued for publishing.
#[derive(Debug, Clone)]
enum Queued {
    Keys { db: u32, keys: Vec<Bytes> },
    Pattern { db: u32, glob: Bytes },
    FlushDb(u32),
    FlushAll,
}

/// Encodes `queued` as messages from `sender`: records in order, a new
/// message whenever one holds [`MAX_KEYS_PER_MESSAGE`] keys or
/// [`MAX_MESSAGE_BYTES`] bytes.
fn encode(sender: u64, queued: &[Queued]) -> Vec<Bytes> {
    let mut out = Vec::new();
    let mut batch = Batch::new(sender);
    for q in queued {
        match q {
            Queued::Keys { db, keys } => {
                for chunk in keys.chunks(MAX_KEYS_PER_MESSAGE) {
                    let mut start = 0;
                    while start < chunk.len() {
                        let room = MAX_KEYS_PER_MESSAGE - batch.keys;
                        let next = chunk.get(start).map_or(0, |k| k.len() + 5);
                        let overflows = batch.buf.len() + next > MAX_MESSAGE_BYTES;
                        if room == 0 || batch.full() || (overflows && !batch.is_empty()) {
                            out.push(batch.finish(sender));
                            continue;
                        }
                        // Keys that fit the byte budget (at least one).
                        let mut end = start;
                        let mut bytes = batch.buf.len();
                        while end < chunk.len() && end - start < room {
                            let len = chunk.get(end).map_or(0, |k| k.len() + 5);
                            if end > start && bytes + len > MAX_MESSAGE_BYTES {
                                break;
                            }
                            bytes += len;
                            end += 1;
                        }
                        let keys = chunk.get(start..end).unwrap_or_default();
                        batch.buf.push(KEYS);
                        put_varint(&mut batch.buf, *db);
                        put_varint(&mut batch.buf, keys.len() as u32);
                        for k in keys {
                            put_bytes(&mut batch.buf, k);
                        }
                        batch.keys += keys.len();
                        start = end;
                    }
                }
            }
            Queued::Pattern { db, glob } => {
                if batch.full() {
                    out.push(batch.finish(sender));
                }
                batch.buf.push(PATTERN);
                put_varint(&mut batch.buf, *db);
                put_bytes(&mut batch.buf, glob);
                batch.keys += 1;
            }
            Queued::FlushDb(db) => {
                batch.buf.push(FLUSH_DB);
                put_varint(&mut batch.buf, *db);
            }
            Queued::FlushAll => batch.buf.push(FLUSH_ALL),
        }
    }
    if !batch.is_empty() {
        out.push(batch.finish(sender));
    }
    out
}

/// A message being built.
struct Batch {
    buf: Vec<u8>,
    keys: usize,
}

impl Batch {
    fn new(sender: u64) -> Batch {
        let mut buf = Vec::with_capacity(256);
        buf.extend_from_slice(MAGIC);
        buf.extend_from_slice(&sender.to_le_bytes());
        Batch { buf, keys: 0 }
    }

    fn is_empty(&self) -> bool {
        self.buf.len() == MAGIC.len() + 8
    }

    fn full(&self) -> bool {
        self.keys >= MAX_KEYS_PER_MESSAGE || self.buf.len() >= MAX_MESSAGE_BYTES
    }

    fn finish(&mut self, sender: u64) -> Bytes {
        Bytes::from(std::mem::replace(self, Batch::new(sender)).buf)
    }
}

/// What waits to be published.
#[derive(Debug, Default)]
struct Outbox {
    queued: Vec<Queued>,
    keys: usize,
}

/// The bus as sessions see it: where to publish, and whether it is live.
#[derive(Debug)]
pub struct Bus {
    id: u64,
    channel: Bytes,
    /// Sync lock, held only to push or take records, never across I/O.
    outbox: parking_lot::Mutex<Outbox>,
    wake: Notify,
    up: AtomicBool,
    /// Counts for `INFO`.
    links: AtomicU64,
    sent: AtomicU64,
    received: AtomicU64,
    rejected: AtomicU64,
    /// Pattern walks running or waiting for a blocking thread.
    walks: std::sync::atomic::AtomicUsize,
}

impl Bus {
    /// A bus on `channel` with a fresh random instance id.
    pub fn new(channel: &str) -> Bus {
        // Seeded from the OS's randomness (std's per-process hash keys):
        // two instances drawing the same 64-bit id is not a worry.
        let id = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Bus {
            id,
            channel: Bytes::copy_from_slice(channel.as_bytes()),
            outbox: parking_lot::Mutex::new(Outbox::default()),
            wake: Notify::new(),
            up: AtomicBool::new(false),
            links: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            rejected: AtomicU64::new(0),
            walks: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// This instance's id on the bus.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The channel.
    pub fn channel(&self) -> &[u8] {
        &self.channel
    }

    /// Whether both bus connections are live.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Links established since start.
    pub fn links(&self) -> u64 {
        self.links.load(Ordering::Relaxed)
    }

    /// Messages published since start.
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Other instances' messages applied since start.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// Messages on the channel ignored since start.
    pub fn rejected(&self) -> u64 {
        self.rejected.load(Ordering::Relaxed)
    }

    /// Tells every other instance that `keys` changed in `db`.
    pub fn publish_keys(&self, db: u32, keys: &[Bytes]) {
        if keys.is_empty() {
            return;
        }
        self.queue(keys.len(), || Queued::Keys {
            db,
            keys: keys.to_vec(),
        });
    }

    /// Tells every other instance to drop keys matching `glob` in `db`.
    pub fn publish_pattern(&self, db: u32, glob: &[u8]) {
        self.queue(1, || Queued::Pattern {
            db,
            glob: Bytes::copy_from_slice(glob),
        });
    }

    /// Tells every other instance to flush `db`, or everything.
    pub fn publish_flush(&self, db: Option<u32>) {
        self.queue(0, || match db {
            Some(db) => Queued::FlushDb(db),
            None => Queued::FlushAll,
        });
    }

    fn queue(&self, keys: usize, record: impl FnOnce() -> Queued) {
        {
            let mut outbox = self.outbox.lock();
            if matches!(outbox.queued.last(), Some(Queued::FlushAll)) && outbox.queued.len() == 1 {
                // Already collapsed: everything goes anyway.
            } else if outbox.keys + keys > MAX_OUTBOX_KEYS {
                outbox.queued.clear();
                outbox.queued.push(Queued::FlushAll);
                outbox.keys = 0;
            } else {
                outbox.queued.push(record());
                outbox.keys += keys;
            }
        }
        self.wake.notify_one();
    }

    fn take(&self) -> Vec<Queued> {
        let mut outbox = self.outbox.lock();
        outbox.keys = 0;
        std::mem::take(&mut outbox.queued)
    }
}

/// What the bus task works with.
pub struct Control {
    /// Upstream, for the two connections.
    pub upstream: Arc<Upstream>,
    /// The tier that messages invalidate.
    pub l1: Arc<L1>,
    /// State shared with the sessions.
    pub bus: Arc<Bus>,
    /// Where messages and link changes are counted.
    pub metrics: Arc<Metrics>,
}

/// What this instance publishes and Redis has not acknowledged, across
/// links: messages waiting for the window (`backlog`) and messages sent
/// (`unacked`, with heartbeat `PING`s as `None`), so that a lost link loses
/// nothing and a burst never outgrows the window.
#[derive(Debug, Default)]
struct Outgoing {
    unacked: VecDeque<(Instant, Option<Bytes>)>,
    backlog: VecDeque<Bytes>,
    backlog_bytes: usize,
}

impl Outgoing {
    /// Queues `messages` behind the backlog. A backlog past
    /// [`MAX_BACKLOG_BYTES`] (a link down for long under heavy writes)
    /// collapses into one "flush every db".
    fn queue(&mut self, sender: u64, messages: Vec<Bytes>) {
        for m in messages {
            self.backlog_bytes += m.len();
            self.backlog.push_back(m);
        }
        if self.backlog_bytes > MAX_BACKLOG_BYTES {
            self.backlog.clear();
            self.backlog.extend(encode(sender, &[Queued::FlushAll]));
            self.backlog_bytes = self.backlog.iter().map(Bytes::len).sum();
        }
    }

    /// After a reconnect: what the last link sent without an answer goes
    /// first, then the backlog.
    fn requeue_unacked(&mut self) {
        let resend: Vec<Bytes> = self.unacked.drain(..).filter_map(|(_, m)| m).collect();
        for m in resend.into_iter().rev() {
            self.backlog_bytes += m.len();
            self.backlog.push_front(m);
        }
    }

    fn is_empty(&self) -> bool {
        self.unacked.is_empty() && self.backlog.is_empty()
    }
}

/// Most bytes of messages waiting for the window.
const MAX_BACKLOG_BYTES: usize = 64 * 1024 * 1024;

/// Why a link attempt ended.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    #[error("upstream refused {what}: {reply}")]
    Refused { what: &'static str, reply: String },
    #[error("lagging: {0} unanswered for {1:?}")]
    Lagging(&'static str, Duration),
    #[error("{0}")]
    Io(String),
    #[error("stopped")]
    Stopped,
}

impl From<String> for LinkError {
    fn from(e: String) -> LinkError {
        LinkError::Io(e)
    }
}

/// Runs the bus until `stop` changes or its sender is dropped: connect,
/// subscribe, serve, and on any failure flush and suspend L1, back off and
/// start over. L1 must already be suspended for [`Holder::Bus`] when this
/// starts: nothing is cached before the first subscription is live.
pub async fn run(control: Control, mut stop: watch::Receiver<()>) {
    let timeouts = control.upstream.timeouts();
    let mut reconnect = Reconnect::new(timeouts);
    let mut out = Outgoing::default();
    loop {
        let started = Instant::now();
        let err = link(&control, timeouts, &mut out, &mut stop).await;
        if matches!(err, LinkError::Stopped) {
            return;
        }
        lose_trust(&control);
        if reconnect.failed(started.elapsed()) == 1 {
            tracing::warn!(event = "bus_lost", error = %err, "invalidation bus link lost: L1 flushed and suspended until it is back");
        } else {
            tracing::debug!(error = %err, "invalidation bus link still down");
        }
        if !reconnect.wait(&mut stop).await {
            return;
        }
    }
}

/// Messages from other instances may have been missed: drop everything and
/// cache nothing until the bus is live again.
fn lose_trust(control: &Control) {
    control.bus.up.store(false, Ordering::SeqCst);
    control.l1.store.suspend(Holder::Bus);
    control.metrics.flushed(None);
    control.metrics.set_bus_up(false);
}

/// One link: set up, then serve until it fails or `stop` fires. Only
/// returns an error ([`LinkError::Stopped`] for a stop).
async fn link(
    control: &Control,
    timeouts: Timeouts,
    out: &mut Outgoing,
    stop: &mut watch::Receiver<()>,
) -> LinkError {
    let mut publisher = None;
    let served = tokio::select! {
        res = link_inner(control, timeouts, out, &mut publisher) => res,
        _ = stop.changed() => Err(LinkError::Stopped),
    };
    let err = match served {
        Ok(never) => match never {},
        Err(e) => e,
    };
    if let (LinkError::Stopped, Some(publisher)) = (&err, publisher.as_mut()) {
        // The last writes of draining sessions: publish them before going.
        let last = async {
            out.queue(control.bus.id, encode(control.bus.id, &control.bus.take()));
            while !out.is_empty() {
                publish(control, publisher, out).await?;
                publisher.next_frame().await?;
                out.unacked.pop_front();
            }
            Ok::<(), LinkError>(())
        };
        if let Err(e) | Ok(Err(e)) = tokio::time::timeout(timeouts.command, last)
            .await
            .map_err(|_| LinkError::Lagging("PUBLISH", timeouts.command))
        {
            tracing::warn!(error = %e, "could not publish the last invalidations before stopping");
        }
    }
    err
}

async fn link_inner(
    control: &Control,
    timeouts: Timeouts,
    out: &mut Outgoing,
    publisher_slot: &mut Option<Link>,
) -> Result<std::convert::Infallible, LinkError> {
    let bus = &control.bus;
    let (stream, _) = control.upstream.control_connection(Proto::Resp2).await?;
    let publisher = publisher_slot.insert(Link::new(stream, timeouts.max_depth, "bus publisher"));
    setname(publisher, PUBLISHER_NAME, timeouts).await?;
    let (stream, _) = control.upstream.control_connection(Proto::Resp2).await?;
    let mut subscriber = Link::new(stream, timeouts.max_depth, "bus link");
    setname(&mut subscriber, LINK_NAME, timeouts).await?;
    subscriber
        .send(&reply::encode_command(&[b"SUBSCRIBE", bus.channel()]))
        .await?;
    let confirmed = async {
        let frame = subscriber.next_frame().await?;
        let els = inspect::elements(&frame, 2).unwrap_or_default();
        if els.first().and_then(|k| inspect::string_payload(k)) == Some(b"subscribe") {
            Ok(())
        } else {
            Err(LinkError::Refused {
                what: "SUBSCRIBE",
                reply: String::from_utf8_lossy(&frame).trim_end().to_owned(),
            })
        }
    };
    match tokio::time::timeout(timeouts.command, confirmed).await {
        Ok(res) => res?,
        Err(_) => return Err(LinkError::Lagging("SUBSCRIBE", timeouts.command)),
    }

    // Subscribed: from here on every message is seen, so what L1 caches
    // from now can be trusted. Then resend what the last link may have
    // lost on its way out.
    control.l1.store.resume(Holder::Bus);
    bus.up.store(true, Ordering::SeqCst);
    bus.links.fetch_add(1, Ordering::Relaxed);
    control.metrics.set_bus_up(true);
    tracing::info!(event = "bus_up", channel = %String::from_utf8_lossy(bus.channel()), id = bus.id, "invalidation bus link up");
    out.requeue_unacked();
    publish(control, publisher, out).await?;

    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            frame = subscriber.next_frame() => {
                let frame = frame?;
                on_frame(control, &mut subscriber, &frame, timeouts.max_depth);
            }
            frame = publisher.next_frame() => {
                let frame = frame?;
                if inspect::is_error(&frame) {
                    return Err(LinkError::Refused {
                        what: "PUBLISH",
                        reply: String::from_utf8_lossy(&frame).trim_end().to_owned(),
                    });
                }
                if out.unacked.pop_front().is_none() {
                    return Err(LinkError::Io("a reply arrived on the bus publisher that tierd did not ask for".into()));
                }
                publish(control, publisher, out).await?;
            }
            _ = bus.wake.notified() => {
                out.queue(bus.id, encode(bus.id, &bus.take()));
                publish(control, publisher, out).await?;
            }
            _ = tick.tick() => {
                let late = |sent: Option<&Instant>| sent.is_some_and(|t| t.elapsed() > timeouts.command);
                if late(subscriber.pings.front()) {
                    return Err(LinkError::Lagging("PING", timeouts.command));
                }
                if late(out.unacked.front().map(|(t, _)| t)) {
                    return Err(LinkError::Lagging("PUBLISH", timeouts.command));
                }
                subscriber.send(b"*1\r\n$4\r\nPING\r\n").await?;
                subscriber.pings.push_back(Instant::now());
                // The publisher too: a Redis `timeout` must not close an
                // idle one, which would flush L1.
                publisher.send(b"*1\r\n$4\r\nPING\r\n").await?;
                out.unacked.push_back((Instant::now(), None));
            }
        }
    }
}

/// Names a bus connection upstream and waits for the `+OK`.
async fn setname(link: &mut Link, name: &str, timeouts: Timeouts) -> Result<(), LinkError> {
    link.send(&reply::encode_command(&[
        b"CLIENT",
        b"SETNAME",
        name.as_bytes(),
    ]))
    .await?;
    match tokio::time::timeout(timeouts.command, link.next_frame()).await {
        Ok(Ok(frame)) if inspect::is_ok(&frame) => Ok(()),
        Ok(Ok(frame)) => Err(LinkError::Refused {
            what: "CLIENT SETNAME",
            reply: String::from_utf8_lossy(&frame).trim_end().to_owned(),
        }),
        Ok(Err(e)) => Err(e.into()),
        Err(_) => Err(LinkError::Lagging("CLIENT SETNAME", timeouts.command)),
    }
}

/// Publishes as much of the backlog as the window takes, in one write;
/// each message then waits in `unacked` for its reply.
async fn publish(
    control: &Control,
    publisher: &mut Link,
    out: &mut Outgoing,
) -> Result<(), LinkError> {
    let room = MAX_UNACKED.saturating_sub(out.unacked.len());
    let n = room.min(out.backlog.len());
    if n == 0 {
        return Ok(());
    }
    let channel = control.bus.channel();
    let mut wire = Vec::new();
    // Moved to `unacked` before the write: if it fails halfway, the next
    // link sends them all again.
    let now = Instant::now();
    for m in out.backlog.drain(..n) {
        out.backlog_bytes -= m.len();
        wire.extend_from_slice(&reply::encode_command(&[b"PUBLISH", channel, &m]));
        out.unacked.push_back((now, Some(m)));
    }
    publisher.send(&wire).await?;
    control.bus.sent.fetch_add(n as u64, Ordering::Relaxed);
    for _ in 0..n {
        control.metrics.bus_sent();
    }
    Ok(())
}

/// A frame on the subscriber: a message, a heartbeat's `pong`, or a
/// subscription confirmation.
fn on_frame(control: &Control, subscriber: &mut Link, frame: &[u8], max_depth: usize) {
    let els = inspect::elements(frame, max_depth.min(2)).unwrap_or_default();
    let kind = els.first().and_then(|k| inspect::string_payload(k));
    match kind {
        Some(b"message") => {
            if let Some(payload) = els.get(2).and_then(|p| inspect::string_payload(p)) {
                on_message(control, payload);
            }
        }
        Some(b"pong") => {
            subscriber.pings.pop_front();
        }
        _ => {}
    }
}

/// [`crate::cache::Store::invalidate_matching`] for a Redis glob, on a
/// blocking thread: the walk visits every entry (some 200 ms for 150k),
/// which must not hold up the sessions sharing this runtime thread.
/// Returns how many keys had a reply cached. Each glob is compiled once.
pub(crate) async fn drop_matching(l1: Arc<L1>, globs: Vec<Vec<u8>>) -> u64 {
    let walk = tokio::task::spawn_blocking(move || {
        let patterns: Vec<KeyPattern> = globs.iter().map(|g| KeyPattern::new(g)).collect();
        l1.store
            .invalidate_matching(|k| patterns.iter().any(|p| p.matches(k)))
    });
    // The walk cannot panic short of a bug; a lost count is then all that
    // is lost, since the fills were cancelled first.
    walk.await.unwrap_or(0)
}

/// Applies one message from the channel.
fn on_message(control: &Control, payload: &[u8]) {
    let bus = &control.bus;
    let msg = match decode(payload) {
        Ok(msg) => msg,
        Err(why) => {
            bus.rejected.fetch_add(1, Ordering::Relaxed);
            control.metrics.bus_rejected(why == Rejected::Malformed);
            tracing::debug!(
                event = "bus_rejected",
                reason = why.as_str(),
                bytes = payload.len(),
                "ignored a message on the bus channel"
            );
            return;
        }
    };
    if msg.sender == bus.id {
        // Our own, already applied when it was published.
        return;
    }
    bus.received.fetch_add(1, Ordering::Relaxed);
    control.metrics.bus_received();
    let store = &control.l1.store;
    let mut globs = Vec::new();
    for record in msg.records {
        match record {
            Record::Keys { keys, .. } => {
                // Like tracking, keys are dropped in every db: cheaper than
                // tracking dbs per key, and never wrong.
                for key in &keys {
                    store.invalidate(key);
                }
                control.metrics.invalidated(Source::Bus, keys.len() as u64);
                tracing::trace!(event = "invalidated", source = "bus", keys = keys.len());
            }
            Record::Pattern { glob, .. } => globs.push(glob.to_vec()),
            Record::FlushDb(db) => {
                store.flush_db(db);
                control.metrics.flushed(Some(Source::Bus));
                tracing::info!(
                    event = "invalidated",
                    source = "bus",
                    kind = "flush",
                    db,
                    "another instance flushed a db"
                );
            }
            Record::FlushAll => {
                store.flush_all();
                control.metrics.flushed(Some(Source::Bus));
                tracing::info!(
                    event = "invalidated",
                    source = "bus",
                    kind = "flush",
                    "another instance flushed everything"
                );
            }
        }
    }
    if !globs.is_empty() {
        drop_patterns(control, globs);
    }
}

/// Most pattern walks running or queued at once, and most patterns one
/// walk matches; past either, a flush is cheaper, and just as correct.
const MAX_WALKS: usize = 4;
const MAX_WALK_PATTERNS: usize = 64;

/// Drops the L1 keys matching any of `globs`, beside the bus (which goes on
/// reading: what it applies meanwhile does not depend on the walk).
fn drop_patterns(control: &Control, globs: Vec<Vec<u8>>) {
    let bus = control.bus.clone();
    if globs.len() > MAX_WALK_PATTERNS || bus.walks.fetch_add(1, Ordering::SeqCst) >= MAX_WALKS {
        if globs.len() <= MAX_WALK_PATTERNS {
            bus.walks.fetch_sub(1, Ordering::SeqCst);
        }
        control.l1.store.flush_all();
        control.metrics.flushed(Some(Source::Bus));
        tracing::info!(
            event = "invalidated",
            source = "bus",
            kind = "flush",
            patterns = globs.len(),
            "too many patterns from other instances at once: L1 flushed instead"
        );
        return;
    }
    let (l1, metrics) = (control.l1.clone(), control.metrics.clone());
    tokio::spawn(async move {
        let started = Instant::now();
        let shown: Vec<String> = globs
            .iter()
            .map(|g| crate::admin::shown(g).into_owned())
            .collect();
        let n = drop_matching(l1, globs).await;
        bus.walks.fetch_sub(1, Ordering::SeqCst);
        metrics.invalidated(Source::Bus, n);
        tracing::info!(
            event = "invalidated",
            source = "bus",
            kind = "pattern",
            pattern = ?shown,
            keys = n,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "dropped L1 keys matching patterns from another instance"
        );
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn keys(db: u32, ks: &[&str]) -> Queued {
        Queued::Keys {
            db,
            keys: ks
                .iter()
                .map(|k| Bytes::copy_from_slice(k.as_bytes()))
                .collect(),
        }
    }

    #[test]
    fn round_trip_of_every_record_kind() {
        let queued = vec![
            keys(0, &["user:1", "user:2"]),
            Queued::Pattern {
                db: 3,
                glob: Bytes::from_static(b"user:*"),
            },
            Queued::FlushDb(300),
            Queued::FlushAll,
            keys(70_000, &[""]),
        ];
        let msgs = encode(42, &queued);
        assert_eq!(msgs.len(), 1);
        let msg = decode(&msgs[0]).unwrap();
        assert_eq!(msg.sender, 42);
        assert_eq!(
            msg.records,
            vec![
                Record::Keys {
                    db: 0,
                    keys: vec![b"user:1", b"user:2"]
                },
                Record::Pattern {
                    db: 3,
                    glob: b"user:*"
                },
                Record::FlushDb(300),
                Record::FlushAll,
                Record::Keys {
                    db: 70_000,
                    keys: vec![b""]
                },
            ]
        );
    }

    #[test]
    fn messages_split_at_the_key_and_byte_limits() {
        let many: Vec<String> = (0..1300).map(|i| format!("k{i}")).collect();
        let refs: Vec<&str> = many.iter().map(String::as_str).collect();
        let msgs = encode(1, &[keys(0, &refs)]);
        assert_eq!(msgs.len(), 3);
        let mut seen = Vec::new();
        for m in &msgs {
            let msg = decode(m).unwrap();
            let mut n = 0;
            for r in msg.records {
                if let Record::Keys { keys, .. } = r {
                    n += keys.len();
                    seen.extend(keys.iter().map(|k| k.to_vec()));
                }
            }
            assert!(n <= MAX_KEYS_PER_MESSAGE);
        }
        let expected: Vec<Vec<u8>> = many.iter().map(|k| k.as_bytes().to_vec()).collect();
        assert_eq!(seen, expected, "every key once, in order");

        let big = "x".repeat(40 * 1024);
        let msgs = encode(1, &[keys(0, &[&big, &big, &big])]);
        assert_eq!(msgs.len(), 3, "one 40 KB key per 64 KB message");
        for m in &msgs {
            assert!(m.len() < MAX_MESSAGE_BYTES + 64);
        }
    }

    #[test]
    fn foreign_and_malformed_messages_are_told_apart() {
        assert_eq!(decode(b"hello"), Err(Rejected::Foreign));
        assert_eq!(decode(b""), Err(Rejected::Foreign));
        assert_eq!(decode(b"TDB\x02........\x04"), Err(Rejected::Foreign));
        let good = encode(7, &[keys(0, &["a"])]).remove(0);
        assert!(decode(&good).is_ok());
        // Every strict prefix past the magic is malformed, never a panic.
        for len in MAGIC.len()..good.len() {
            assert_eq!(decode(&good[..len]), Err(Rejected::Malformed), "len {len}");
        }
        // Trailing garbage, an unknown record kind, no records.
        let mut trailing = good.to_vec();
        trailing.push(9);
        assert_eq!(decode(&trailing), Err(Rejected::Malformed));
        let header = &good[..MAGIC.len() + 8];
        assert_eq!(decode(header), Err(Rejected::Malformed));
        // A count far beyond the bytes left is refused before allocating.
        let mut liar = header.to_vec();
        liar.extend_from_slice(&[KEYS, 0, 0xff, 0xff, 0xff, 0xff, 0x0f]);
        assert_eq!(decode(&liar), Err(Rejected::Malformed));
        // A varint longer than 32 bits.
        let mut long = header.to_vec();
        long.extend_from_slice(&[FLUSH_DB, 0xff, 0xff, 0xff, 0xff, 0x7f]);
        assert_eq!(decode(&long), Err(Rejected::Malformed));
    }

    #[test]
    fn the_outbox_collapses_into_one_flush_when_full() {
        let bus = Bus::new("c");
        let chunk: Vec<Bytes> = (0..1024)
            .map(|i| Bytes::from(format!("k{i}").into_bytes()))
            .collect();
        for _ in 0..(MAX_OUTBOX_KEYS / 1024) {
            bus.publish_keys(0, &chunk);
        }
        assert!(matches!(bus.take().first(), Some(Queued::Keys { .. })));
        for _ in 0..(MAX_OUTBOX_KEYS / 1024 + 1) {
            bus.publish_keys(0, &chunk);
        }
        bus.publish_pattern(0, b"x*");
        let taken = bus.take();
        assert!(matches!(taken.as_slice(), [Queued::FlushAll]), "{taken:?}");
    }

    mod prop {
        use super::super::*;
        use proptest::prelude::*;

        proptest! {
            /// The decoder never panics and never accepts trailing bytes.
            #[test]
            fn decode_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
                let mut msg = MAGIC.to_vec();
                msg.extend_from_slice(&bytes);
                let _ = decode(&msg);
                let _ = decode(&bytes);
            }

            #[test]
            fn keys_round_trip(
                db in any::<u32>(),
                keys in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..40), 1..600),
            ) {
                let queued = Queued::Keys {
                    db,
                    keys: keys.iter().map(|k| Bytes::copy_from_slice(k)).collect(),
                };
                let mut seen = Vec::new();
                for m in encode(9, &[queued]) {
                    let msg = decode(&m).unwrap();
                    prop_assert_eq!(msg.sender, 9);
                    for r in msg.records {
                        match r {
                            Record::Keys { db: d, keys } => {
                                prop_assert_eq!(d, db);
                                seen.extend(keys.iter().map(|k| k.to_vec()));
                            }
                            other => prop_assert!(false, "unexpected {:?}", other),
                        }
                    }
                }
                prop_assert_eq!(seen, keys);
            }
        }
    }
}
