//! Connections to upstream Redis: raw request bytes out, raw reply bytes back.
//!
//! Stateless commands share a small pool of multiplexed, pipelined
//! connections, one pool per protocol version (RESP2 and RESP3 replies differ
//! on the wire) and per *identity*: every client is authenticated as itself,
//! so a client that ran `AUTH alice …` is served by connections authenticated
//! as alice, never by tierd's own. Clients whose state needs a connection of
//! their own (MULTI, SUBSCRIBE, blocking commands, a non-default db) get a
//! dedicated one.
//!
//! This module knows nothing of sessions, commands or the cache: it moves
//! frames and reports failures.

mod breaker;
mod conn;
mod pool;

use std::collections::HashMap;
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::sync::mpsc;

pub use breaker::{Breaker, BreakerState};
pub use conn::Conn;
pub use pool::Pool;

use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::Config;
use crate::protocol::{inspect, reply, Proto};

/// What a connection tells a session.
#[derive(Debug)]
pub enum Upstreamed {
    /// The reply to the session's request number `seq`.
    Reply {
        /// The session's sequence number for the request.
        seq: u64,
        /// The raw reply frame, or why there is none.
        reply: Result<Bytes, UpstreamError>,
    },
    /// A frame that answers no request: a RESP3 push, a pub/sub message or a
    /// MONITOR line (dedicated connections only).
    Push(Bytes),
    /// The session's dedicated connection ended.
    Closed(UpstreamError),
}

/// Where a pooled connection delivers a session's replies. Unbounded: a
/// pooled connection must never wait on one slow client (that would stall
/// every client sharing it), and the session bounds what it has in flight.
/// Dedicated connections deliver on their own bounded channel instead, so a
/// slow subscriber pushes back on Redis, whose output-buffer limits then
/// apply as they would to a direct client.
pub type Inbox = mpsc::UnboundedSender<Upstreamed>;

/// Who gets the reply to a request sent with [`Conn::send`].
#[derive(Debug, Clone, Copy)]
pub enum ReplyTo<'a> {
    /// No reply is expected (pub/sub and MONITOR stream mode).
    Nobody,
    /// Reply number `seq`, delivered to `inbox`.
    Inbox {
        /// The session's sequence number for the request.
        seq: u64,
        /// Where to deliver it.
        inbox: &'a Inbox,
        /// False for blocking commands, which may legitimately wait forever.
        timed: bool,
    },
    /// As `Inbox`, and the same reply goes to everyone who joined
    /// `fanout` by the time it arrives (reads that share one upstream
    /// request), straight from the connection.
    Shared {
        /// The session's sequence number for the request.
        seq: u64,
        /// Where to deliver it.
        inbox: &'a Inbox,
        /// Who else gets it.
        fanout: &'a Arc<Fanout>,
    },
    /// Reply number `seq` on a dedicated connection's own channel, in order
    /// with its pushes.
    Owner {
        /// The session's sequence number for the request.
        seq: u64,
        /// False for blocking commands.
        timed: bool,
    },
    /// On a dedicated connection in stream mode (pub/sub, MONITOR): frames
    /// stay pushes until one equals `end` (`+RESET\r\n`, which no message,
    /// MONITOR line or other reply can be), which answers `seq`.
    StreamEnd {
        /// The session's sequence number for the request.
        seq: u64,
        /// The exact frame that answers it.
        end: &'static [u8],
    },
}

/// More recipients for one reply ([`ReplyTo::Shared`]): each gets it on
/// its own inbox under its own sequence number. Open until the reply (or
/// the error that replaces it) has been handed out; joining then fails.
#[derive(Debug, Default)]
pub struct Fanout {
    /// `None` once handed out.
    recipients: parking_lot::Mutex<Option<Vec<(Inbox, u64)>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl Fanout {
    /// A fanout open for joining.
    pub fn new() -> Fanout {
        Fanout {
            recipients: parking_lot::Mutex::new(Some(Vec::new())),
            closed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Adds a recipient while the fanout is open; `seq` is asked for only
    /// then (under the fanout's lock, so the reply cannot slip past).
    /// Returns its sequence number, or `None` once the reply went out.
    pub fn join(&self, inbox: &Inbox, seq: impl FnOnce() -> u64) -> Option<u64> {
        let mut recipients = self.recipients.lock();
        let list = recipients.as_mut()?;
        let seq = seq();
        list.push((inbox.clone(), seq));
        Some(seq)
    }

    /// Whether the reply has not gone out yet.
    pub fn is_open(&self) -> bool {
        !self.closed.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Hands `reply` to every recipient; later calls do nothing.
    pub fn deliver(&self, reply: &Result<Bytes, UpstreamError>) {
        let Some(recipients) = self.recipients.lock().take() else {
            return;
        };
        self.closed
            .store(true, std::sync::atomic::Ordering::Release);
        for (inbox, seq) in recipients {
            let _ = inbox.send(Upstreamed::Reply {
                seq,
                reply: reply.clone(),
            });
        }
    }
}

/// Why upstream could not answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum UpstreamError {
    /// Unreachable, lost, timed out or misbehaving.
    #[error("upstream unavailable: {0}")]
    Unavailable(Arc<str>),
    /// Upstream refused tierd's connection setup (`HELLO`/`AUTH`/`SELECT`)
    /// with this raw error reply, e.g. `-WRONGPASS …`.
    #[error("upstream rejected the connection: {}", String::from_utf8_lossy(.0).trim_end())]
    Rejected(Bytes),
    /// The circuit breaker is open: not sent.
    #[error("upstream unavailable (circuit open)")]
    CircuitOpen,
}

impl UpstreamError {
    pub(crate) fn unavailable(reason: impl Into<String>) -> UpstreamError {
        UpstreamError::Unavailable(Arc::from(reason.into()))
    }

    /// Who is at fault: always upstream (unreachable, slow, or refusing
    /// tierd's own setup).
    pub fn source(&self) -> crate::error::ErrorSource {
        crate::error::ErrorSource::Upstream
    }

    /// The RESP error reply a client gets for this failure.
    pub fn to_resp(&self) -> Bytes {
        let msg = match self {
            UpstreamError::Unavailable(reason) => format!("ERR upstream unavailable: {reason}"),
            UpstreamError::Rejected(raw) => {
                let text = String::from_utf8_lossy(raw.get(1..).unwrap_or_default());
                format!(
                    "ERR upstream unavailable: connection setup rejected: {}",
                    text.trim_end()
                )
            }
            UpstreamError::CircuitOpen => "TRYAGAIN upstream unavailable (circuit open)".into(),
        };
        let mut out = BytesMut::new();
        // Reply text must stay on one line.
        reply::error(&mut out, msg.replace(['\r', '\n'], " ").as_bytes());
        out.freeze()
    }
}

/// Credentials a client authenticated with (`AUTH [user] pass`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Credentials {
    /// `None` is Redis's `default` user.
    pub user: Option<Bytes>,
    /// The password.
    pub pass: Bytes,
}

impl Credentials {
    /// Normalised so that `AUTH pass` and `AUTH default pass` are one identity.
    pub fn new(user: Option<Bytes>, pass: Bytes) -> Credentials {
        let user = user.filter(|u| u.as_ref() != b"default");
        Credentials { user, pass }
    }

    fn user_or_default(&self) -> &[u8] {
        self.user.as_deref().unwrap_or(b"default")
    }

    /// The `AUTH` command for these credentials.
    pub fn auth_command(&self) -> Bytes {
        reply::encode_command(&[b"AUTH", self.user_or_default(), &self.pass])
    }
}

/// Upstream's `HELLO` reply, kept as raw key/value frames so that tierd can
/// answer a client's `HELLO` byte-for-byte like Redis (with its own client id).
#[derive(Debug, Clone)]
pub struct HelloInfo {
    /// Raw (key, value) element frames, in upstream's order.
    pub pairs: Vec<(Bytes, Bytes)>,
}

impl HelloInfo {
    /// Reads a `HELLO` reply frame.
    ///
    /// # Errors
    ///
    /// When the frame is not a HELLO map of the expected shape.
    pub fn parse(frame: &[u8], proto: Proto, max_depth: usize) -> Result<HelloInfo, UpstreamError> {
        let bad = || UpstreamError::unavailable("unexpected HELLO reply from upstream");
        let els = inspect::elements(frame, max_depth).ok_or_else(bad)?;
        let expected = if proto == Proto::Resp3 { b'%' } else { b'*' };
        if frame.first() != Some(&expected) || els.len() % 2 != 0 {
            return Err(bad());
        }
        let pairs = els
            .chunks_exact(2)
            .map(|kv| (Bytes::copy_from_slice(kv[0]), Bytes::copy_from_slice(kv[1])))
            .collect();
        Ok(HelloInfo { pairs })
    }

    /// Upstream's client id for the connection that received this reply.
    pub fn client_id(&self) -> Option<u64> {
        let (_, v) = self
            .pairs
            .iter()
            .find(|(k, _)| inspect::string_payload(k) == Some(b"id"))?;
        u64::try_from(inspect::integer(v)?).ok()
    }

    /// Encodes the `HELLO` reply a client with this protocol and id gets.
    pub fn reply(&self, proto: Proto, client_id: u64) -> Bytes {
        let mut out = BytesMut::new();
        reply::map_header(&mut out, self.pairs.len(), proto);
        for (k, v) in &self.pairs {
            out.extend_from_slice(k);
            match inspect::string_payload(k) {
                Some(b"proto") => reply::integer(&mut out, i64::from(proto.as_u8())),
                Some(b"id") => {
                    reply::integer(&mut out, i64::try_from(client_id).unwrap_or(i64::MAX))
                }
                _ => out.extend_from_slice(v),
            }
        }
        out.freeze()
    }
}

/// One extra command that every pooled connection of the default identity
/// runs right after its handshake, and again whenever the command changes:
/// the control plane uses it to point each connection's `CLIENT TRACKING`
/// at its tracking link. Each version of the command has a generation
/// number; a connection remembers the generation upstream last accepted
/// ([`Conn::setup_gen`]), so a caller can tell whether a connection runs the
/// current version. Generation 0 means "none".
///
/// This module runs the command and reports the outcome; what it means is
/// the caller's business.
#[derive(Default)]
pub struct SetupHook {
    /// The current (generation, command). Sync lock, held only to copy it.
    current: Mutex<Option<(u64, Bytes)>>,
    next_gen: AtomicU64,
    /// Called when a connection that had run the command is lost: whatever
    /// the command made Redis keep for that connection is gone with it.
    /// Sync lock, held only to clone the callback.
    on_lost: Mutex<Option<LostCallback>>,
    /// Called when a connection has run the command again after a loss.
    on_restored: Mutex<Option<LostCallback>>,
}

/// What [`SetupHook::on_lost`] runs.
pub type LostCallback = Arc<dyn Fn() + Send + Sync>;

impl std::fmt::Debug for SetupHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetupHook")
            .field("current", &self.current.lock())
            .finish_non_exhaustive()
    }
}

impl SetupHook {
    /// Installs `command` as the new version and returns its generation.
    pub fn set(&self, command: Bytes) -> u64 {
        let gen = self.next_gen.fetch_add(1, Ordering::SeqCst) + 1;
        *self.current.lock() = Some((gen, command));
        gen
    }

    /// Removes the command: connections made from now on run none.
    pub fn clear(&self) {
        *self.current.lock() = None;
    }

    /// The current version, if any.
    pub fn current(&self) -> Option<(u64, Bytes)> {
        self.current.lock().clone()
    }

    /// The current generation, 0 if none.
    pub fn current_gen(&self) -> u64 {
        self.current.lock().as_ref().map_or(0, |(gen, _)| *gen)
    }

    /// Sets what runs when a connection that had run the command is lost.
    /// It runs on that connection's task, synchronously, before the
    /// connection's pending requests are failed.
    pub fn on_lost(&self, callback: LostCallback) {
        *self.on_lost.lock() = Some(callback);
    }

    fn lost(&self) {
        let callback = self.on_lost.lock().clone();
        if let Some(callback) = callback {
            callback();
        }
    }

    /// Sets what runs when a pooled connection is set up again after it
    /// was lost (on its task, synchronously).
    pub fn on_restored(&self, callback: LostCallback) {
        *self.on_restored.lock() = Some(callback);
    }

    fn restored(&self) {
        let callback = self.on_restored.lock().clone();
        if let Some(callback) = callback {
            callback();
        }
    }
}

/// Connection settings shared by every upstream connection.
#[derive(Debug)]
pub(crate) struct Settings {
    pub addr: String,
    pub db: u32,
    pub pool_size: usize,
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    pub max_depth: usize,
    /// Where sampled request latencies go.
    pub latency: Option<Arc<crate::metrics::Latency>>,
    /// The node's circuit breaker, shared by all its connections.
    pub breaker: Arc<Breaker>,
}

/// The pools and dedicated connections of one identity.
pub struct Identity {
    settings: Arc<Settings>,
    creds: Option<Credentials>,
    pools: [OnceLock<Pool>; 2],
    /// The default identity's pooled connections run this after their
    /// handshake; other identities have none.
    hook: Option<Arc<SetupHook>>,
}

impl Identity {
    /// The shared pool for `proto`, started on first use.
    pub fn pool(&self, proto: Proto) -> &Pool {
        self.pools[proto.index()].get_or_init(|| {
            Pool::new(
                self.settings.clone(),
                proto,
                self.creds.clone(),
                self.hook.clone(),
            )
        })
    }

    /// The pool for `proto` if it has been started.
    pub fn started_pool(&self, proto: Proto) -> Option<&Pool> {
        self.pools[proto.index()].get()
    }

    /// Opens a connection for one session's exclusive use.
    ///
    /// # Errors
    ///
    /// When upstream cannot be reached or refuses the setup.
    pub async fn dedicated(
        &self,
        proto: Proto,
        pushes: mpsc::Sender<Upstreamed>,
    ) -> Result<Conn, UpstreamError> {
        Conn::dedicated(self.settings.clone(), proto, self.creds.clone(), pushes).await
    }

    /// The credentials this identity authenticates with (`None`: the
    /// connection is not authenticated at all).
    pub fn credentials(&self) -> Option<&Credentials> {
        self.creds.as_ref()
    }
}

/// Upstream timing settings, for control-plane tasks that keep their own
/// connections.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// `upstream.connect_timeout`.
    pub connect: Duration,
    /// `upstream.command_timeout`.
    pub command: Duration,
    /// `upstream.backoff_min`.
    pub backoff_min: Duration,
    /// `upstream.backoff_max`.
    pub backoff_max: Duration,
    /// `limits.max_reply_depth`.
    pub max_depth: usize,
}

/// Everything upstream: the default identity (from the URL) and the
/// identities clients authenticated as.
pub struct Upstream {
    settings: Arc<Settings>,
    default: Arc<Identity>,
    hook: Arc<SetupHook>,
    /// Identities in use by some session; an entry dies with its last user.
    /// Sync lock, held only to look up or insert.
    others: Mutex<HashMap<Credentials, Weak<Identity>>>,
}

impl Upstream {
    /// Builds the upstream side from the configuration and starts the
    /// default RESP2 pool, so that tierd connects (and logs) at start.
    pub fn new(config: &Config, latency: Option<Arc<crate::metrics::Latency>>) -> Upstream {
        let url = &config.upstream.url;
        let host = if url.host.contains(':') && !url.host.starts_with('[') {
            format!("[{}]", url.host)
        } else {
            url.host.clone()
        };
        let settings = Arc::new(Settings {
            addr: format!("{host}:{}", url.port),
            db: url.db,
            pool_size: config.upstream.pool_size,
            connect_timeout: config.upstream.connect_timeout,
            command_timeout: config.upstream.command_timeout,
            backoff_min: config.upstream.backoff_min,
            backoff_max: config.upstream.backoff_max,
            max_depth: config.limits.max_reply_depth,
            latency,
            breaker: Arc::new(Breaker::new(
                config.upstream.failure_threshold,
                config.upstream.reset,
            )),
        });
        let creds = url.password.as_ref().map(|pass| {
            Credentials::new(
                url.username
                    .as_ref()
                    .map(|u| Bytes::from(u.clone().into_bytes())),
                Bytes::from(pass.clone().into_bytes()),
            )
        });
        let hook = Arc::new(SetupHook::default());
        let default = Arc::new(Identity {
            settings: settings.clone(),
            creds,
            pools: [OnceLock::new(), OnceLock::new()],
            hook: Some(hook.clone()),
        });
        default.pool(Proto::Resp2);
        Upstream {
            settings,
            default,
            hook,
            others: Mutex::new(HashMap::new()),
        }
    }

    /// The upstream node's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.settings.breaker
    }

    /// The setup hook of the default identity's pooled connections.
    pub fn setup_hook(&self) -> &Arc<SetupHook> {
        &self.hook
    }

    /// Opens a connection of the default identity for a control-plane task
    /// (the tracking link, reading `COMMAND`): connected, authenticated and
    /// past the `HELLO` handshake, then handed over as a plain socket with
    /// upstream's `HELLO` reply. It is not pooled, supervised or timed.
    ///
    /// # Errors
    ///
    /// Connect, setup or timeout failures, as for any connection.
    pub async fn control_connection(
        &self,
        proto: Proto,
    ) -> Result<(tokio::net::TcpStream, HelloInfo), UpstreamError> {
        conn::control(&self.settings, proto, self.default.creds.as_ref()).await
    }

    /// Settings the control plane needs: command timeout, reconnect backoff
    /// and the reply depth cap.
    pub fn timeouts(&self) -> Timeouts {
        Timeouts {
            connect: self.settings.connect_timeout,
            command: self.settings.command_timeout,
            backoff_min: self.settings.backoff_min,
            backoff_max: self.settings.backoff_max,
            max_depth: self.settings.max_depth,
        }
    }

    /// The identity from the upstream URL, used by clients that never
    /// authenticate.
    pub fn default_identity(&self) -> Arc<Identity> {
        self.default.clone()
    }

    /// Whether `identity` is the default identity (the URL's credentials).
    pub fn is_default(&self, identity: &Arc<Identity>) -> bool {
        Arc::ptr_eq(identity, &self.default)
    }

    /// The identity for these credentials, shared by every session
    /// authenticated the same way.
    pub fn identity(&self, creds: Credentials) -> Arc<Identity> {
        if self.default.creds.as_ref() == Some(&creds) {
            return self.default.clone();
        }
        let mut others = self.others.lock();
        if let Some(id) = others.get(&creds).and_then(Weak::upgrade) {
            return id;
        }
        others.retain(|_, w| w.strong_count() > 0);
        let id = Arc::new(Identity {
            settings: self.settings.clone(),
            creds: Some(creds.clone()),
            pools: [OnceLock::new(), OnceLock::new()],
            hook: None,
        });
        others.insert(creds, Arc::downgrade(&id));
        id
    }

    /// The db number clients start in (the URL's path).
    pub fn default_db(&self) -> u32 {
        self.settings.db
    }
}
