//! One task per client connection.
//!
//! The session owns everything about one client: the input buffer and
//! parser, the ordered reply queue that makes pipelining work, the
//! connection state Redis would keep for this client (protocol version, db,
//! name, identity, MULTI/WATCH, subscriptions), and the client's dedicated
//! upstream connection while that state needs one.
//!
//! Replies are written in request order, in batches: the session dispatches
//! every complete request it has read, then collects every reply that has
//! arrived, and only then writes. It never flushes per reply.
//!
//! Where a request goes is decided in [`crate::dispatch`]; this module is the
//! I/O loop and the queue. It must not interpret commands beyond what the
//! dispatcher tells it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::cache::{Holder, Rules, L1};
use crate::command::{CommandTable, TableCell};
use crate::config::Config;
use crate::dispatch::cache::{Hook, PendingFill, SIDE};
use crate::dispatch::Flow;
use crate::invalidation::{Bus, Tracking};
use crate::protocol::{reply, ParseLimits, Proto, Request, RequestParser};
use crate::shutdown::Shutdown;
use crate::upstream::{Conn, Identity, Inbox, Upstream, Upstreamed};

/// At most this many replies may be outstanding before the session stops
/// dispatching (and then reading): a client that pipelines without reading
/// cannot make tierd buffer without bound.
const MAX_PENDING_REPLIES: usize = 16 * 1024;

/// The session stops dispatching once this much output waits (replies
/// answered from L1 go straight to the output, outside the reply queue's
/// count) and writes it first: a pipeline of reads of a big cached value
/// must not make tierd hold all of their replies at once.
const OUT_BUDGET: usize = 4 * 1024 * 1024;

/// The session keeps reading while its unparsed input is below this, even
/// when it cannot dispatch yet, so that it notices a client that hangs up
/// while blocked. Beyond it, input is read only to complete a request.
const READ_AHEAD: usize = 4 * 1024 * 1024;

/// Capacity of a dedicated connection's channel. A full channel pushes back
/// on upstream, so Redis's own output-buffer limits apply to a slow
/// subscriber.
pub(crate) const PINNED_CHANNEL: usize = 1024;

/// What other sessions may do to a session: `CLIENT KILL ID` closes it,
/// `CLIENT UNBLOCK` and `CLIENT TRACKING … REDIRECT` need the upstream id of
/// its dedicated connection.
#[derive(Default)]
pub(crate) struct ClientEntry {
    /// Upstream's id for the session's dedicated connection; 0 when it has
    /// none.
    pub(crate) upstream_id: AtomicU64,
    pub(crate) kill: tokio::sync::Notify,
}

/// tierd's client ids start here, far above any id Redis hands out (Redis
/// counts up from 1), so that an id names either a tierd client or an
/// upstream one, never both.
pub const CLIENT_ID_BASE: u64 = 1 << 40;

/// What a client id in a `CLIENT` command refers to.
pub(crate) enum ClientRef {
    Live(Arc<ClientEntry>),
    Gone,
    Upstream,
}

/// What every session shares.
pub struct Ctx {
    /// The validated configuration.
    pub config: Arc<Config>,
    /// Upstream pools and identities.
    pub upstream: Arc<Upstream>,
    /// The L1 tier; `None` when no rule caches anything.
    pub l1: Option<Arc<L1>>,
    /// The command table read from upstream.
    pub table: Arc<TableCell>,
    /// Whether upstream tracking is live, for fills.
    pub tracking: Arc<Tracking>,
    /// The invalidation bus to other tierd instances; `None` when `bus` is
    /// off or there is no L1 to keep coherent.
    pub bus: Option<Arc<Bus>>,
    /// The rules, also without L1 (tags do not need it).
    pub rules: Arc<Rules>,
    /// This server's metrics.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// When the server started (`INFO`'s uptime).
    pub started: std::time::Instant,
    /// Request parser limits, from the configuration.
    pub parse_limits: ParseLimits,
    /// Coalesced reads, leases and refreshes in flight.
    pub(crate) stampede: Arc<crate::dispatch::stampede::Stampede>,
    /// The rules' write strategies and the write-behind queue.
    pub(crate) writes: crate::dispatch::writes::Writes,
    /// Warming: the hot-set samples and the shared pace.
    pub(crate) warm: crate::dispatch::warm::Warm,
    next_client_id: AtomicU64,
    /// Live sessions by tierd client id. Sync lock, held only to look up,
    /// insert or remove.
    pub(crate) clients: parking_lot::Mutex<std::collections::HashMap<u64, Arc<ClientEntry>>>,
}

impl Ctx {
    /// Builds the shared context (and starts the default upstream pool).
    pub fn new(config: Arc<Config>) -> Ctx {
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let upstream = Arc::new(Upstream::new(
            &config,
            Some(metrics.upstream_latency.clone()),
        ));
        let l1 = match L1::new(&config) {
            Ok(l1) => l1.map(Arc::new),
            Err(e) => {
                // Config validation checks the same limits; this would be a
                // bug, and serving without L1 beats not serving.
                tracing::error!(error = %e, "L1 tier disabled");
                None
            }
        };
        let bus = match &l1 {
            Some(l1) if config.invalidation.bus => {
                // Nothing is cached before the bus is subscribed: messages
                // sent before that would be missed.
                l1.store.suspend(Holder::Bus);
                Some(Arc::new(Bus::new(&config.invalidation.channel)))
            }
            _ => None,
        };
        let warm = crate::dispatch::warm::Warm::new(&config, &metrics);
        Ctx {
            parse_limits: config.parse_limits(),
            stampede: Arc::default(),
            writes: crate::dispatch::writes::Writes::new(&config, metrics.clone()),
            warm,
            bus,
            rules: Arc::new(Rules::from_config(&config.rules)),
            // Without L1 there is nothing to track for.
            tracking: Arc::new(Tracking::new(if l1.is_some() {
                config.invalidation.tracking
            } else {
                crate::config::TrackingMode::Off
            })),
            metrics,
            started: std::time::Instant::now(),
            l1,
            table: Arc::new(TableCell::default()),
            config,
            upstream,
            next_client_id: AtomicU64::new(CLIENT_ID_BASE),
            clients: parking_lot::Mutex::new(std::collections::HashMap::new()),
        }
    }
}

/// One entry of the reply queue, in request order.
pub(crate) enum Slot {
    /// Waiting for upstream. `discard` is set under `CLIENT REPLY OFF|SKIP`.
    Pending { discard: bool },
    /// Ready to write.
    Ready(Bytes),
    /// Nothing to write (the reply was suppressed, or it arrives as a push).
    Skip,
}

/// The ordered reply queue: slot `i` holds the reply to request
/// `base + i`.
#[derive(Default)]
pub(crate) struct ReplyQueue {
    base: u64,
    slots: VecDeque<Slot>,
}

impl ReplyQueue {
    /// The sequence number the next slot gets.
    pub(crate) fn next_seq(&self) -> u64 {
        self.base + self.slots.len() as u64
    }

    pub(crate) fn push(&mut self, slot: Slot) -> u64 {
        let seq = self.next_seq();
        self.slots.push_back(slot);
        seq
    }

    pub(crate) fn len(&self) -> usize {
        self.slots.len()
    }

    /// Fills a pending slot. Returns false for an unknown or filled slot.
    pub(crate) fn complete(&mut self, seq: u64, frame: Bytes) -> bool {
        let Some(idx) = seq.checked_sub(self.base) else {
            return false;
        };
        let Some(slot) = usize::try_from(idx)
            .ok()
            .and_then(|i| self.slots.get_mut(i))
        else {
            return false;
        };
        match slot {
            Slot::Pending { discard } => {
                *slot = if *discard {
                    Slot::Skip
                } else {
                    Slot::Ready(frame)
                };
                true
            }
            _ => false,
        }
    }

    /// Whether slot `seq` is pending with its reply to be discarded
    /// (`CLIENT REPLY OFF|SKIP`).
    pub(crate) fn discards(&self, seq: u64) -> bool {
        seq.checked_sub(self.base)
            .and_then(|i| usize::try_from(i).ok())
            .and_then(|i| self.slots.get(i))
            .is_some_and(|slot| matches!(slot, Slot::Pending { discard: true }))
    }

    /// Moves the ready prefix of the queue into `out`.
    fn drain_ready(&mut self, out: &mut OutBuf) {
        while let Some(front) = self.slots.front() {
            match front {
                Slot::Pending { .. } => break,
                Slot::Ready(_) | Slot::Skip => {
                    if let Some(Slot::Ready(bytes)) = self.slots.pop_front() {
                        out.push(bytes);
                    }
                    self.base += 1;
                }
            }
        }
    }
}

/// Gives a session's scratch buffer back for the next lookup, unless one
/// huge key grew it: an idle session must not keep that memory.
pub(crate) fn keep_scratch(slot: &mut Vec<u8>, scratch: Vec<u8>) {
    const KEEP: usize = 64 * 1024;
    if scratch.capacity() <= KEEP {
        *slot = scratch;
    }
}

/// Whether the next reply is dropped under `CLIENT REPLY OFF|SKIP`.
fn take_discard(mode: &mut ReplyMode) -> bool {
    match *mode {
        ReplyMode::On => false,
        ReplyMode::Off => true,
        ReplyMode::SkipNext => {
            *mode = ReplyMode::On;
            true
        }
    }
}

/// A reply tierd produced, queued in order, honouring `CLIENT REPLY`: copied
/// straight to the output when nothing is queued before it (an L1 hit with
/// nothing in flight, the common case), else queued as a copy.
pub(crate) fn answer(
    queue: &mut ReplyQueue,
    out: &mut OutBuf,
    mode: &mut ReplyMode,
    reply: &[u8],
    shared: impl FnOnce() -> Bytes,
) {
    if take_discard(mode) {
        queue.push(Slot::Skip);
        return;
    }
    // A large reply is written from the cache entry itself (`shared`), never
    // copied: a pipeline of GETs of a big value must not multiply it.
    let large = reply.len() > OutBuf::COPY_MAX;
    if queue.len() == 0 {
        // Every earlier reply is already in `out`: order is kept. The slot
        // is still counted, as `local` would.
        queue.base += 1;
        if large {
            out.push(shared());
        } else {
            out.push_slice(reply);
        }
    } else if large {
        queue.push(Slot::Ready(shared()));
    } else {
        queue.push(Slot::Ready(Bytes::copy_from_slice(reply)));
    }
}

/// Output waiting to be written to the client: small replies are copied
/// into one buffer, large ones are written from their own allocation.
#[derive(Default)]
pub(crate) struct OutBuf {
    chunks: Vec<Bytes>,
    small: BytesMut,
    /// Bytes in `chunks` (not counting `small`).
    chunked: usize,
}

impl OutBuf {
    const COPY_MAX: usize = 16 * 1024;

    pub(crate) fn push_slice(&mut self, bytes: &[u8]) {
        if bytes.len() <= Self::COPY_MAX {
            self.small.extend_from_slice(bytes);
        } else {
            self.push(Bytes::copy_from_slice(bytes));
        }
    }

    pub(crate) fn push(&mut self, bytes: Bytes) {
        if bytes.len() <= Self::COPY_MAX {
            self.small.extend_from_slice(&bytes);
        } else {
            self.seal();
            self.chunked += bytes.len();
            self.chunks.push(bytes);
        }
    }

    fn seal(&mut self) {
        if !self.small.is_empty() {
            let small = self.small.split().freeze();
            self.chunked += small.len();
            self.chunks.push(small);
        }
    }

    fn is_empty(&self) -> bool {
        self.chunks.is_empty() && self.small.is_empty()
    }

    /// Bytes waiting to be written.
    pub(crate) fn len(&self) -> usize {
        self.chunked + self.small.len()
    }

    async fn write_to(&mut self, w: &mut OwnedWriteHalf) -> std::io::Result<()> {
        if self.chunks.is_empty() {
            // The common case: one buffer of small replies.
            w.write_all(&self.small).await?;
            self.small.clear();
            return Ok(());
        }
        self.seal();
        for chunk in self.chunks.drain(..) {
            w.write_all(&chunk).await?;
        }
        self.chunked = 0;
        Ok(())
    }
}

/// `CLIENT REPLY` mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ReplyMode {
    On,
    Off,
    SkipNext,
}

/// The client's dedicated upstream connection.
pub(crate) struct Pinned {
    pub(crate) conn: Conn,
    pub(crate) rx: mpsc::Receiver<Upstreamed>,
    /// Which identity it is authenticated as (pointer identity), and which
    /// protocol it speaks: a spare is reused only when both still match.
    pub(crate) identity: usize,
    pub(crate) proto: Proto,
    /// In pub/sub or MONITOR mode: every frame is passed through in order
    /// and no request expects a reply of its own.
    pub(crate) stream: bool,
}

/// Where the requests currently in flight went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    /// A pooled connection: identity pointer, protocol, connection number.
    Pool {
        identity: usize,
        proto: Proto,
        idx: usize,
    },
    /// The dedicated connection.
    Pinned,
}

/// Connection state Redis keeps per client, mirrored by the session.
pub(crate) struct ClientState {
    pub(crate) proto: Proto,
    pub(crate) db: u32,
    pub(crate) name: Option<Bytes>,
    pub(crate) lib_name: Option<Bytes>,
    pub(crate) lib_ver: Option<Bytes>,
    pub(crate) multi: bool,
    pub(crate) watching: bool,
    pub(crate) tracking: bool,
    pub(crate) no_evict: bool,
    pub(crate) no_touch: bool,
    pub(crate) reply_mode: ReplyMode,
    /// Commands queued since MULTI (those Redis answers `+QUEUED`).
    pub(crate) queued: usize,
    /// tierd refused a command inside this MULTI: like a command Redis
    /// rejects while queueing, that makes EXEC fail with -EXECABORT.
    pub(crate) multi_aborted: bool,
    /// State commands queued inside MULTI (their position, their effect):
    /// each takes effect only if EXEC runs it successfully.
    pub(crate) queued_effects: Vec<(usize, crate::dispatch::Effect)>,
}

impl ClientState {
    fn new(default_db: u32) -> ClientState {
        ClientState {
            proto: Proto::Resp2,
            db: default_db,
            name: None,
            lib_name: None,
            lib_ver: None,
            multi: false,
            watching: false,
            tracking: false,
            no_evict: false,
            no_touch: false,
            reply_mode: ReplyMode::On,
            queued: 0,
            multi_aborted: false,
            queued_effects: Vec::new(),
        }
    }
}

/// One client.
pub struct Session {
    pub(crate) id: u64,
    pub(crate) ctx: Arc<Ctx>,
    pub(crate) state: ClientState,
    pub(crate) identity: Arc<Identity>,
    pub(crate) pinned: Option<Pinned>,
    /// A dedicated connection kept after the state that needed it ended
    /// (typically after a blocking command), so that a client looping on
    /// `BLPOP` does not reconnect every time.
    pub(crate) spare: Option<Pinned>,
    pub(crate) queue: ReplyQueue,
    pub(crate) inbox: Inbox,
    inbox_rx: mpsc::UnboundedReceiver<Upstreamed>,
    /// Route and count of requests sent upstream whose replies are pending.
    pub(crate) inflight_route: Option<Route>,
    pub(crate) inflight: usize,
    /// A parsed request that cannot be dispatched until in-flight requests
    /// on another route have been answered.
    stalled: Option<Request>,
    /// Close once everything queued so far has been written.
    closing: bool,
    /// A RESET sent down a stream (pub/sub, MONITOR): when its reply (this
    /// slot) arrives, the session starts over.
    pub(crate) reset_at: Option<u64>,
    /// A QUIT sent down a stream: the session closes when upstream closes
    /// the dedicated connection after its `+OK`, so that everything before it
    /// reaches the client first.
    pub(crate) quit_on_stream: bool,
    pub(crate) out: OutBuf,
    /// The time at the start of this pass over the client's input: one
    /// clock read per batch of pipelined requests, not one per L1 lookup.
    pub(crate) now: std::time::Instant,
    /// Reused for encoding L1 lookups and assembling split replies, so a
    /// hit allocates nothing.
    pub(crate) scratch: Vec<u8>,
    /// This session's entry in `Ctx::clients`.
    pub(crate) entry: Arc<ClientEntry>,
    /// The command table this session classifies with, and its generation
    /// in [`Ctx::table`].
    pub(crate) table: Option<Arc<CommandTable>>,
    pub(crate) table_gen: u64,
    /// What to do when the reply to request `seq` arrives (L1 fills,
    /// invalidation after a write), by queue sequence number.
    pub(crate) hooks: std::collections::HashMap<u64, Hook>,
    /// L1 fills waiting for their `PTTL` replies, by fill id.
    pub(crate) fills: std::collections::HashMap<u64, PendingFill>,
    pub(crate) next_fill: u64,
    /// Errors Redis gave when queuing a tagged write (see
    /// `dispatch::tagging`), by side-request id, until its `EXEC` reply
    /// arrives.
    pub(crate) queued_errors: std::collections::HashMap<u64, Bytes>,
    /// Writes sent and not yet answered: while there are any, this session
    /// reads around L1, so that a reply cached by another client just
    /// before the write ran cannot answer this client's next read.
    pub(crate) writes_in_flight: usize,
    /// Writes queued inside the current MULTI: their second invalidation
    /// runs when EXEC's reply arrives.
    pub(crate) multi_hooks: Vec<Hook>,
    /// The request counter of the command this session saw last: (table
    /// generation, the name as the client spelled it, the counter).
    last_command: Option<(u64, Bytes, ::metrics::Counter)>,
    /// Requests sent on a RESP3 pub/sub stream, oldest first, each with its
    /// write's hook if it is one: replies there are not matched by sequence
    /// number.
    pub(crate) stream_hooks: VecDeque<Option<Hook>>,
    /// Replies still to come on a stream before L1 is flushed (and the
    /// flush published): what [`Session::stream_hooks`] collapses into when
    /// it overflows. 0 when nothing is pending.
    pub(crate) stream_flush_after: usize,
    /// Replies inside the open transaction that carry compressed values:
    /// (index in `EXEC`'s array, what to decode).
    pub(crate) multi_decodes: Vec<(usize, crate::dispatch::compression::Decode)>,
    /// Reads waiting for another client to load their key
    /// (`dispatch::stampede`), by queue sequence number.
    pub(crate) parked: std::collections::HashMap<u64, crate::dispatch::stampede::Parked>,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ctx.clients.lock().remove(&self.id);
        self.ctx.metrics.client(false);
        // Writes still in flight run without the session: their
        // announcements must not go with it. A RESP3 stream's writes wait
        // on the dedicated connection, which closes with the session.
        crate::dispatch::cache::stream_lost(self);
        if !self.hooks.is_empty() {
            let (_, closed) = mpsc::unbounded_channel();
            let inbox = std::mem::replace(&mut self.inbox_rx, closed);
            crate::dispatch::cache::orphaned(
                self.ctx.clone(),
                self.state.db,
                std::mem::take(&mut self.hooks),
                inbox,
            );
        }
    }
}

impl Session {
    /// Creates the session for a freshly accepted client.
    pub fn new(ctx: Arc<Ctx>) -> Session {
        let (tx, rx) = mpsc::unbounded_channel();
        let id = ctx.next_client_id.fetch_add(1, Ordering::Relaxed);
        let entry = Arc::new(ClientEntry::default());
        ctx.clients.lock().insert(id, entry.clone());
        ctx.metrics.client(true);
        Session {
            entry,
            id,
            state: ClientState::new(ctx.upstream.default_db()),
            identity: ctx.upstream.default_identity(),
            ctx,
            pinned: None,
            spare: None,
            queue: ReplyQueue::default(),
            inbox: tx,
            inbox_rx: rx,
            inflight_route: None,
            inflight: 0,
            stalled: None,
            closing: false,
            reset_at: None,
            quit_on_stream: false,
            out: OutBuf::default(),
            now: std::time::Instant::now(),
            scratch: Vec::new(),
            table: None,
            table_gen: 0,
            hooks: std::collections::HashMap::new(),
            fills: std::collections::HashMap::new(),
            next_fill: 0,
            queued_errors: std::collections::HashMap::new(),
            writes_in_flight: 0,
            multi_hooks: Vec::new(),
            stream_hooks: VecDeque::new(),
            stream_flush_after: 0,
            multi_decodes: Vec::new(),
            parked: std::collections::HashMap::new(),
            last_command: None,
        }
    }

    /// Counts a request by command for `/metrics`.
    fn count_request(&mut self, req: &Request) {
        self.ctx.metrics.request();
        let name = req.name();
        if let Some((gen, cached, counter)) = &self.last_command {
            if *gen == self.table_gen && cached[..] == *name {
                counter.increment(1);
                return;
            }
        }
        self.refresh_table();
        // Until the table is read nothing is known (`other`); a name the
        // table does not know is `other` too.
        let known = self
            .table
            .as_deref()
            .and_then(|t| t.get(name))
            .map(|c| c.name.as_str());
        let counter = self.ctx.metrics.command_counter(known);
        counter.increment(1);
        // Only names the table knows are remembered: a client sending a huge
        // unknown name must not leave a copy of it in its session.
        if known.is_some() {
            self.last_command = Some((self.table_gen, Bytes::copy_from_slice(name), counter));
        }
    }

    /// Picks up the command table the control plane read last, if it is
    /// newer than this session's.
    pub(crate) fn refresh_table(&mut self) {
        let gen = self.ctx.table.generation();
        if gen != self.table_gen {
            self.table = self.ctx.table.get();
            self.table_gen = gen;
        }
    }

    /// The current command table.
    pub(crate) fn command_table(&mut self) -> Option<Arc<CommandTable>> {
        self.refresh_table();
        self.table.clone()
    }

    /// What `id` names: a live tierd client, a tierd client that is gone, or
    /// (below [`CLIENT_ID_BASE`]) an upstream client.
    pub(crate) fn lookup_client(&self, id: u64) -> ClientRef {
        if id < CLIENT_ID_BASE {
            return ClientRef::Upstream;
        }
        match self.ctx.clients.lock().get(&id) {
            Some(entry) => ClientRef::Live(entry.clone()),
            None => ClientRef::Gone,
        }
    }

    /// Resets the state Redis's `RESET` resets.
    pub(crate) fn reset_state(&mut self) {
        self.state = ClientState::new(self.ctx.upstream.default_db());
        self.identity = self.ctx.upstream.default_identity();
        self.pinned = None;
        self.spare = None;
        self.multi_hooks.clear();
        self.multi_decodes.clear();
        self.stream_hooks.clear();
        self.stream_flush_after = 0;
        self.note_pinned();
    }

    /// Publishes the upstream id of the dedicated connection (or 0) for
    /// other sessions' `CLIENT UNBLOCK` and `CLIENT TRACKING … REDIRECT`.
    pub(crate) fn note_pinned(&self) {
        let id = self
            .pinned
            .as_ref()
            .and_then(|p| p.conn.hello())
            .and_then(|h| h.client_id())
            .unwrap_or(0);
        self.entry.upstream_id.store(id, Ordering::Relaxed);
    }

    /// Queues a reply tierd produced itself, honouring `CLIENT REPLY`.
    pub(crate) fn local(&mut self, bytes: Bytes) {
        let slot = if self.take_discard() {
            Slot::Skip
        } else {
            Slot::Ready(bytes)
        };
        self.queue.push(slot);
    }

    /// Queues a slot for a reply upstream will send, honouring `CLIENT REPLY`.
    pub(crate) fn pending_slot(&mut self) -> u64 {
        let discard = self.take_discard();
        self.queue.push(Slot::Pending { discard })
    }

    fn take_discard(&mut self) -> bool {
        take_discard(&mut self.state.reply_mode)
    }

    /// Serves the client until it disconnects, sends `QUIT`, breaks the
    /// protocol, idles out, or shutdown is signalled (then in-flight replies
    /// are still written).
    pub async fn run(mut self, stream: TcpStream, mut shutdown: Shutdown) {
        let _ = stream.set_nodelay(true);
        let (mut rd, mut wr) = stream.into_split();
        let mut parser = RequestParser::new(self.ctx.parse_limits.clone());
        let mut rbuf = BytesMut::with_capacity(16 * 1024);
        let idle_timeout = self.ctx.config.idle_timeout;
        let query_limit = self.ctx.config.limits.query_buffer_limit;
        // The client hung up (eof) or tierd is shutting down (draining):
        // either way no new requests are read. A client that hung up is not
        // waited for when it is blocked; a shutdown waits, up to the
        // server's shutdown timeout.
        let mut eof = false;
        let mut draining = false;
        let mut idle = Box::pin(tokio::time::sleep_until(idle_deadline(idle_timeout)));
        // Long-lived futures, created once: re-creating them on every pass
        // of the loop would register and unregister a waiter each time.
        let entry = self.entry.clone();
        let mut killed = std::pin::pin!(entry.kill.notified());
        let mut stop = std::pin::pin!(shutdown.recv());

        loop {
            // Dispatch whatever complete requests we have, as far as the
            // pipeline rules allow.
            let mut need_input = false;
            while !self.closing
                && self.queue.len() < MAX_PENDING_REPLIES
                && self.out.len() < OUT_BUDGET
            {
                let req = match self.stalled.take() {
                    Some(req) => req,
                    None => match parser.parse(&mut rbuf) {
                        Ok(Some(req)) => {
                            self.count_request(&req);
                            req
                        }
                        Ok(None) => {
                            need_input = true;
                            break;
                        }
                        Err(e) => {
                            tracing::debug!(client = self.id, source = e.source().as_str(), error = %e, "protocol error");
                            let mut msg = BytesMut::new();
                            reply::error(&mut msg, format!("ERR {}", e.message()).as_bytes());
                            self.queue.push(Slot::Ready(msg.freeze()));
                            self.closing = true;
                            break;
                        }
                    },
                };
                // Per request: a dispatch may wait (a MULTI run alone, a
                // connect), and an L1 lookup must not judge expiry by a
                // time from before that.
                self.now = std::time::Instant::now();
                match crate::dispatch::dispatch(&mut self, req).await {
                    Flow::Continue => {}
                    Flow::Stall(req) => {
                        self.stalled = Some(req);
                        break;
                    }
                    Flow::Close => self.closing = true,
                }
            }

            // Stopped for the output budget, not for lack of input: dispatch
            // the rest once this output is written.
            let budget_hit = self.out.len() >= OUT_BUDGET;

            // Collect every reply that has already arrived, then write once.
            while let Ok(ev) = self.inbox_rx.try_recv() {
                self.on_upstream(ev, false);
            }
            while let Some(ev) = self.pinned.as_mut().and_then(|p| p.rx.try_recv().ok()) {
                self.on_upstream(ev, true);
            }
            self.queue.drain_ready(&mut self.out);
            if !self.out.is_empty() {
                // A client that does not read must still be killable.
                let written = tokio::select! {
                    res = self.out.write_to(&mut wr) => res,
                    _ = &mut killed => {
                        tracing::debug!(client = self.id, "killed by CLIENT KILL");
                        return;
                    }
                };
                if let Err(e) = written {
                    tracing::debug!(client = self.id, error = %e, "client write failed");
                    return;
                }
                // Like Redis, replies count as activity for the idle timeout.
                if !idle_timeout.is_zero() {
                    idle.as_mut()
                        .reset(tokio::time::Instant::now() + idle_timeout);
                }
            }
            if self.closing
                && self.queue.len() == 0
                && !(self.quit_on_stream && self.pinned.is_some())
            {
                let _ = wr.shutdown().await;
                return;
            }
            // Collecting replies may have released a stalled request: retry
            // it now rather than wait for an event that may never come.
            if self.stalled.is_some() && self.inflight == 0 && !self.closing && !draining {
                continue;
            }
            if budget_hit && !self.closing && !draining {
                continue;
            }
            let all_done = self.stalled.is_none() && self.queue.len() == 0;
            if draining && all_done {
                let _ = wr.shutdown().await;
                return;
            }
            // Answer what the client sent before hanging up, unless it is
            // waiting on something that may never come.
            if eof && ((all_done && need_input) || self.abandon_on_close()) {
                return;
            }

            let can_read = !eof
                && !draining
                && !self.closing
                && (rbuf.len() < READ_AHEAD || parser.wanted() > 0)
                && (need_input
                    || self.stalled.is_some()
                    || self.queue.len() >= MAX_PENDING_REPLIES);
            let idle_armed = !idle_timeout.is_zero() && self.idle_timeout_applies();
            let pinned_rx = self.pinned.as_mut().map(|p| &mut p.rx);
            tokio::select! {
                ev = self.inbox_rx.recv() => {
                    if let Some(ev) = ev {
                        self.on_upstream(ev, false);
                    }
                }
                Some(ev) = recv_opt(pinned_rx) => self.on_upstream(ev, true),
                res = read_more(&mut rd, &mut rbuf, parser.wanted()), if can_read => match res {
                    Ok(0) => eof = true,
                    Ok(_) => {
                        if rbuf.len() > query_limit {
                            tracing::debug!(client = self.id, "query buffer limit exceeded");
                            let mut msg = BytesMut::new();
                            reply::error(&mut msg, b"ERR Protocol error: query buffer limit exceeded");
                            self.queue.push(Slot::Ready(msg.freeze()));
                            self.closing = true;
                            rbuf.clear();
                        }
                        if !idle_timeout.is_zero() {
                            idle.as_mut().reset(tokio::time::Instant::now() + idle_timeout);
                        }
                    }
                    Err(e) => {
                        tracing::debug!(client = self.id, error = %e, "client read failed");
                        return;
                    }
                },
                _ = &mut killed => {
                    tracing::debug!(client = self.id, "killed by CLIENT KILL");
                    return;
                }
                _ = &mut idle, if idle_armed => {
                    tracing::debug!(client = self.id, "idle timeout");
                    return;
                }
                _ = &mut stop, if !draining => {
                    // Stop taking new requests; finish what is in flight.
                    draining = true;
                    rbuf.clear();
                    self.stalled = None;
                }
            }
        }
    }

    /// Whether pending replies are worth waiting for when the client is
    /// going away: not for a blocked command or a push stream, which would
    /// otherwise keep upstream state alive for a client that left.
    fn abandon_on_close(&self) -> bool {
        self.pinned.as_ref().is_some_and(|p| p.stream)
            || self.blocking_in_flight()
            || !self.parked.is_empty()
    }

    fn blocking_in_flight(&self) -> bool {
        self.inflight > 0 && self.inflight_route == Some(Route::Pinned) && !self.state.multi
    }

    /// Redis does not time out subscribers or blocked clients.
    fn idle_timeout_applies(&self) -> bool {
        self.inflight == 0 && !self.pinned.as_ref().is_some_and(|p| p.stream)
    }

    pub(crate) fn on_upstream(&mut self, ev: Upstreamed, from_pinned: bool) {
        match ev {
            Upstreamed::Reply { seq, reply } => {
                if seq & SIDE != 0 {
                    crate::dispatch::cache::side_reply(self, seq, reply);
                    return;
                }
                if reply.is_err() {
                    self.ctx.metrics.upstream_error();
                }
                let mut frame = reply.unwrap_or_else(|e| e.to_resp());
                if !self.hooks.is_empty() {
                    if let Some(hook) = self.hooks.remove(&seq) {
                        match crate::dispatch::cache::after_reply(self, hook, frame) {
                            Some(reply) => frame = reply,
                            // Waiting for a loader: answered later.
                            None => return,
                        }
                    }
                }
                if !self.parked.is_empty() {
                    self.parked.remove(&seq);
                }
                if self.queue.complete(seq, frame) {
                    self.inflight = self.inflight.saturating_sub(1);
                    if self.inflight == 0 {
                        self.inflight_route = None;
                    }
                    if self.reset_at == Some(seq) {
                        self.reset_at = None;
                        self.reset_state();
                    }
                }
            }
            Upstreamed::Push(frame) => {
                if from_pinned && (!self.stream_hooks.is_empty() || self.stream_flush_after > 0) {
                    crate::dispatch::cache::stream_reply(self, &frame);
                }
                // Everything still pending was sent after whatever produced
                // this push, so the push goes right after the ready prefix.
                self.queue.drain_ready(&mut self.out);
                self.out.push(frame);
            }
            Upstreamed::Closed(err) if from_pinned => {
                // The client's upstream state is gone; so is the client's
                // connection, as it would be talking to Redis directly.
                tracing::debug!(client = self.id, source = err.source().as_str(), error = %err, "dedicated upstream connection lost");
                let resp = err.to_resp();
                let pending: Vec<u64> = (self.queue.base..self.queue.next_seq()).collect();
                for seq in &pending {
                    if let Some(hook) = self.hooks.remove(seq) {
                        // The write may or may not have run: invalidate as
                        // if it had.
                        crate::dispatch::cache::after_reply(self, hook, resp.clone());
                    }
                }
                crate::dispatch::cache::stream_lost(self);
                self.parked.clear();
                for seq in pending {
                    if self.queue.complete(seq, resp.clone()) {
                        self.inflight = self.inflight.saturating_sub(1);
                    }
                }
                self.inflight = 0;
                self.inflight_route = None;
                self.reset_at = None;
                self.pinned = None;
                self.note_pinned();
                self.closing = true;
            }
            Upstreamed::Closed(_) => {}
        }
    }
}

fn idle_deadline(idle: Duration) -> tokio::time::Instant {
    let far = Duration::from_secs(86_400 * 365);
    tokio::time::Instant::now() + if idle.is_zero() { far } else { idle }
}

async fn recv_opt(rx: Option<&mut mpsc::Receiver<Upstreamed>>) -> Option<Upstreamed> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn read_more(
    rd: &mut tokio::net::tcp::OwnedReadHalf,
    buf: &mut BytesMut,
    wanted: usize,
) -> std::io::Result<usize> {
    // Reserve for a large bulk in one step (bounded, so a lying length
    // cannot make us allocate what never arrives).
    const CHUNK: usize = 16 * 1024;
    let want = wanted.clamp(CHUNK, 8 * 1024 * 1024);
    if buf.capacity() - buf.len() < CHUNK {
        buf.reserve(want);
    }
    rd.read_buf(buf).await
}
