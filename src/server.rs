//! The accept loop, the client limit and graceful shutdown.
//!
//! `run` is what both the binary and the tests drive: give it a bound
//! listener, a validated configuration and a future that resolves when it is
//! time to stop. It owns no protocol logic; each accepted client becomes a
//! [`Session`] task. It must not read or write client bytes beyond the one
//! "max number of clients" refusal.
//!
//! Running out of file descriptors must never stop tierd: at startup the
//! client limit is clamped to what the open-files limit allows (as Redis
//! clamps `maxclients`), and accept errors that only mean "not now" are
//! retried for as long as they last.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::time::Instant;

use crate::config::Config;
use crate::session::{Ctx, Session};
use crate::shutdown::Shutdown;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener kept failing, with an error that is not a shortage of
    /// descriptors or memory, for [`ACCEPT_GIVE_UP`].
    #[error("accept failed")]
    Accept(#[source] io::Error),
    /// The metrics listener (`[metrics] listen`) could not be bound.
    #[error(
        "metrics.listen: cannot listen on {addr}: set [metrics] listen to a free address, \
         or to \"\" to turn the metrics listener off"
    )]
    MetricsListen {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why binding failed.
        #[source]
        source: io::Error,
    },
}

/// The reply a client over `max_clients` gets before it is closed.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";

/// Descriptors kept back for everything that is not a client or a pooled
/// upstream connection (the listener, the runtime, logs, a dedicated
/// connection being opened), as Redis's `CONFIG_MIN_RESERVED_FDS`.
const RESERVED_FDS: usize = 32;

/// First wait after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
/// The longest wait between accept attempts. Short, so that clients queued
/// in the kernel's backlog are served within a second of descriptors coming
/// free.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How long accept may fail without a break, with errors other than the
/// transient ones, before [`run`] gives up.
const ACCEPT_GIVE_UP: Duration = Duration::from_secs(60);
/// At most one accept warning per this long: a descriptor shortage makes
/// every attempt fail, and the log must not turn into the next shortage.
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(1);

/// Serves clients on `listener` until `shutdown` resolves, then stops
/// accepting, lets sessions finish their in-flight replies for up to
/// `shutdown_timeout`, and returns. Clients still connected after that are
/// dropped when the caller's runtime ends.
///
/// The metrics listener (`[metrics] listen`) is bound first, and it, the
/// upstream prober and metrics upkeep stop when this function returns, so
/// `/metrics` stays up while sessions drain.
///
/// Once the sessions are done, the invalidation bus publishes what they
/// left, and warming writes its hot sets with what they read, each awaited
/// for at most twice `upstream.command_timeout`.
///
/// # Errors
///
/// [`ServerError::MetricsListen`] when the metrics listener cannot be
/// bound; [`ServerError::Accept`] when accepting keeps failing for about a
/// minute with an error other than running out of descriptors, socket
/// buffers or memory (those are retried for as long as they last).
pub async fn run(
    listener: TcpListener,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let metrics_listener = match config.metrics.listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::MetricsListen { addr, source })?,
        ),
        None => None,
    };
    let ctx = Arc::new(Ctx::new(config.clone()));
    // Dropped when this function returns, which stops the control plane.
    let (control_alive, control_stop) = tokio::sync::watch::channel(());
    let bus = start_control_plane(&ctx, &control_stop);
    // Warming runs beside the clients; its hot-set writer makes one last
    // write when the control plane stops.
    let hot_sets = crate::dispatch::warm::start(&ctx, &control_stop);
    start_metrics(&ctx, metrics_listener, &control_stop);
    // Write-behind's flusher stops with the control plane, after the
    // queue was drained below.
    crate::dispatch::writes::start(&ctx, &control_stop);
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let (shutdown_complete_tx, mut shutdown_complete_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(effective_max_clients(&config)));

    let accepting = accept_loop(
        &listener,
        &ctx,
        &limit,
        &notify_shutdown,
        &shutdown_complete_tx,
    );
    let result = tokio::select! {
        res = accepting => res,
        _ = shutdown => Ok(()),
    };
    drop(listener);
    // Queued write-behind writes go to Redis at once from now on, while
    // the sessions finish, and the queue must be empty before the flusher
    // stops: within the same shutdown timeout.
    let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
    ctx.writes.hurry();
    // Dropping the sender tells every session to stop taking requests; the
    // completion channel closes when the last one has finished.
    drop(notify_shutdown);
    drop(shutdown_complete_tx);
    let drained = tokio::time::timeout(config.shutdown_timeout, shutdown_complete_rx.recv()).await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.shutdown_timeout, "shutdown timeout: closing remaining clients");
    }
    ctx.writes.drain(deadline).await;
    // The bus publishes what the last sessions wrote before it stops; the
    // other tasks just end.
    drop(control_alive);
    if let Some(bus) = bus {
        let _ = tokio::time::timeout(config.upstream.command_timeout * 2, bus).await;
    }
    // The hot sets, with what the last sessions read, for the next start.
    if let Some(hot_sets) = hot_sets {
        let _ = tokio::time::timeout(config.upstream.command_timeout * 2, hot_sets).await;
    }
    tracing::info!("tierd stopped");
    result
}

/// Starts the background tasks: the tracking link, which also reads the
/// command table (metrics and `INFO` need it even without caching rules),
/// and, with L1, the invalidation bus and the periodic expiry sweep.
/// Returns the bus task, which the server waits for when it stops.
fn start_control_plane(
    ctx: &Arc<Ctx>,
    stop: &tokio::sync::watch::Receiver<()>,
) -> Option<tokio::task::JoinHandle<()>> {
    let control = crate::invalidation::tracking::Control {
        upstream: ctx.upstream.clone(),
        table: ctx.table.clone(),
        l1: ctx.l1.clone(),
        tracking: ctx.tracking.clone(),
        metrics: ctx.metrics.clone(),
    };
    tokio::spawn(crate::invalidation::tracking::run(control, stop.clone()));
    let l1 = ctx.l1.clone()?;
    let bus = ctx.bus.as_ref().map(|bus| {
        let control = crate::invalidation::bus::Control {
            upstream: ctx.upstream.clone(),
            l1: l1.clone(),
            bus: bus.clone(),
            metrics: ctx.metrics.clone(),
        };
        tokio::spawn(crate::invalidation::bus::run(control, stop.clone()))
    });
    let interval = ctx.config.l1.sweep_interval;
    let mut stop = stop.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    // A walk over every entry: on a blocking thread, so the
                    // sessions sharing this runtime thread go on meanwhile.
                    let l1 = l1.clone();
                    let _ = tokio::task::spawn_blocking(move || {
                        l1.store.sweep(std::time::Instant::now())
                    })
                    .await;
                }
                _ = stop.changed() => return,
            }
        }
    });
    bus
}

/// Starts metrics upkeep and, with a listener, the HTTP endpoints and the
/// upstream prober behind `/health` and `/ready`. Without a listener there
/// is no prober: nothing would read what it finds, and its connection would
/// only be one more upstream client.
fn start_metrics(
    ctx: &Arc<Ctx>,
    listener: Option<TcpListener>,
    stop: &tokio::sync::watch::Receiver<()>,
) {
    use crate::metrics::{health, http};
    tokio::spawn(http::upkeep(ctx.clone(), stop.clone()));
    let Some(listener) = listener else {
        return;
    };
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(listen = %addr, "metrics listening");
    }
    let health = Arc::new(health::Health::new(&ctx.config.metrics));
    tokio::spawn(health::run(ctx.clone(), health.clone(), stop.clone()));
    tokio::spawn(http::serve(listener, ctx.clone(), health, stop.clone()));
}

async fn accept_loop(
    listener: &TcpListener,
    ctx: &Arc<Ctx>,
    limit: &Arc<Semaphore>,
    notify_shutdown: &broadcast::Sender<()>,
    shutdown_complete: &mpsc::Sender<()>,
) -> Result<(), ServerError> {
    loop {
        let (stream, _) = accept_with_backoff(|| listener.accept()).await?;
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            reject(stream);
            continue;
        };
        let session = Session::new(ctx.clone());
        let shutdown = Shutdown::new(notify_shutdown.subscribe(), shutdown_complete.clone());
        tokio::spawn(async move {
            session.run(stream, shutdown).await;
            drop(permit);
        });
    }
}

/// Runs `accept` until it succeeds, backing off on errors (doubling from
/// [`ACCEPT_BACKOFF_MIN`] to [`ACCEPT_BACKOFF_MAX`]), as mini-redis does.
///
/// A transient error ([`is_transient`]) is retried forever: running out of
/// descriptors is a load condition that ends when clients leave, and a proxy
/// that exits then turns a brownout into an outage. Any other error gives up
/// once errors have followed each other for [`ACCEPT_GIVE_UP`].
async fn accept_with_backoff<T, F, Fut>(mut accept: F) -> Result<T, ServerError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = io::Result<T>>,
{
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let mut failing_since: Option<Instant> = None;
    let mut last_warn: Option<Instant> = None;
    let mut unlogged: u64 = 0;
    loop {
        let e = match accept().await {
            Ok(accepted) => return Ok(accepted),
            Err(e) => e,
        };
        let now = Instant::now();
        let since = *failing_since.get_or_insert(now);
        let transient = is_transient(&e);
        if !transient && now.duration_since(since) >= ACCEPT_GIVE_UP {
            tracing::error!(error = %e, "accept keeps failing; giving up");
            return Err(ServerError::Accept(e));
        }
        if last_warn.map_or(true, |at| now.duration_since(at) >= ACCEPT_WARN_EVERY) {
            tracing::warn!(
                error = %e,
                transient,
                failing_for = ?now.duration_since(since),
                suppressed = unlogged,
                "accept failed; backing off"
            );
            last_warn = Some(now);
            unlogged = 0;
        } else {
            unlogged += 1;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
    }
}

/// `errno` values that mean "not now" on accept: out of descriptors (process
/// or system), socket buffers or memory. EMFILE and ENFILE have the same
/// numbers on every Unix; ENOBUFS does not. ENOMEM, ECONNABORTED,
/// ECONNRESET, EINTR and EAGAIN have an `ErrorKind` of their own.
const EMFILE: i32 = 24;
const ENFILE: i32 = 23;
#[cfg(any(target_os = "linux", target_os = "android"))]
const ENOBUFS: i32 = 105;
#[cfg(not(any(target_os = "linux", target_os = "android")))]
const ENOBUFS: i32 = 55;

/// Whether an accept error is a passing condition rather than a broken
/// listener: resource exhaustion, or a connection that went away before it
/// could be accepted.
fn is_transient(e: &io::Error) -> bool {
    use io::ErrorKind::{ConnectionAborted, ConnectionReset, Interrupted, OutOfMemory, WouldBlock};
    matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | OutOfMemory
    ) || matches!(e.raw_os_error(), Some(EMFILE | ENFILE | ENOBUFS))
}

/// `max_clients`, lowered when the process may not open that many
/// descriptors. Like Redis, tierd keeps [`RESERVED_FDS`] for itself, and it
/// also keeps one per pooled upstream connection of the default identity
/// (both protocol versions). A client with a dedicated upstream connection
/// costs a second descriptor, which this does not reserve: that shortage is
/// what the retrying accept loop absorbs.
fn effective_max_clients(config: &Config) -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").ok();
    let open_files = limits.as_deref().and_then(parse_open_files_limit);
    let max = clamp_max_clients(config.max_clients, open_files, config.upstream.pool_size);
    if let Some(open_files) = open_files.filter(|_| max < config.max_clients) {
        tracing::warn!(
            max_clients = config.max_clients,
            open_files,
            effective = max,
            "max_clients needs more file descriptors than the open-files limit allows; \
             serving at most {max} clients (raise `ulimit -n` or LimitNOFILE to allow more)"
        );
    }
    max
}

/// The client limit for `requested` clients when at most `open_files`
/// descriptors may be open (`None`: unknown or unlimited, no clamp). Always
/// at least 1, as the configuration guarantees.
fn clamp_max_clients(requested: usize, open_files: Option<u64>, pool_size: usize) -> usize {
    let Some(open_files) = open_files else {
        return requested;
    };
    let reserved = RESERVED_FDS + 2 * pool_size;
    let available = usize::try_from(open_files)
        .unwrap_or(usize::MAX)
        .saturating_sub(reserved);
    requested.min(available).max(1)
}

/// The soft "Max open files" limit from the text of `/proc/self/limits`;
/// `None` when the line is missing or malformed, or the limit is unlimited.
///
/// # Format
///
/// ```text
/// Limit                     Soft Limit           Hard Limit           Units
/// Max open files            1024                 524288               files
/// ```
fn parse_open_files_limit(limits: &str) -> Option<u64> {
    limits
        .lines()
        .find_map(|line| line.strip_prefix("Max open files"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Answers a client over the limit and closes it, without spawning anything:
/// a flood of connections must not cost more than the limit allows.
fn reject(stream: TcpStream) {
    tracing::debug!("max number of clients reached");
    let _ = stream.try_write(MAX_CLIENTS_REPLY);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    const LIMITS: &str = "\
Limit                     Soft Limit           Hard Limit           Units     
Max cpu time              unlimited            unlimited            seconds   
Max stack size            8388608              unlimited            bytes     
Max processes             96365                96365                processes 
Max open files            1024                 524288               files     
Max locked memory         8388608              8388608              bytes     
Max realtime timeout      unlimited            unlimited            us        
";

    #[test]
    fn parses_the_soft_open_files_limit() {
        assert_eq!(parse_open_files_limit(LIMITS), Some(1024));
        let unlimited = LIMITS.replace(
            "Max open files            1024 ",
            "Max open files            unlimited ",
        );
        assert_eq!(parse_open_files_limit(&unlimited), None);
        assert_eq!(parse_open_files_limit(""), None);
        assert_eq!(parse_open_files_limit("Max open files\n"), None);
        assert_eq!(
            parse_open_files_limit("Max open files  -1  4 files\n"),
            None
        );
        // "Max open files" must not be confused with a longer limit name.
        assert_eq!(
            parse_open_files_limit("Max processes 7 7 processes\nMax open files 64 64 files\n"),
            Some(64)
        );
    }

    #[test]
    fn this_process_has_an_open_files_limit() {
        if let Ok(text) = std::fs::read_to_string("/proc/self/limits") {
            let limit = parse_open_files_limit(&text);
            assert!(limit.is_some_and(|n| n > 0), "{text}");
        }
    }

    #[test]
    fn max_clients_is_clamped_like_redis_maxclients() {
        // 1024 - 32 reserved - 2 × 2 pooled connections.
        assert_eq!(clamp_max_clients(10_000, Some(1024), 2), 988);
        assert_eq!(clamp_max_clients(500, Some(1024), 2), 500);
        assert_eq!(clamp_max_clients(10_000, None, 2), 10_000);
        assert_eq!(clamp_max_clients(10_000, Some(u64::MAX), 64), 10_000);
        // Too few descriptors for anything: still one client, never zero.
        assert_eq!(clamp_max_clients(10_000, Some(16), 2), 1);
    }

    #[test]
    fn resource_shortages_are_transient() {
        for errno in [EMFILE, ENFILE, ENOBUFS] {
            assert!(
                is_transient(&io::Error::from_raw_os_error(errno)),
                "{errno}"
            );
        }
        for kind in [
            io::ErrorKind::ConnectionAborted,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::Interrupted,
            io::ErrorKind::WouldBlock,
            io::ErrorKind::OutOfMemory,
        ] {
            assert!(is_transient(&io::Error::from(kind)), "{kind:?}");
        }
        assert!(!is_transient(&io::Error::from(io::ErrorKind::InvalidInput)));
        assert!(!is_transient(&io::Error::from(
            io::ErrorKind::PermissionDenied
        )));
    }

    #[test]
    fn the_error_names_its_cause_once() {
        let err = ServerError::Accept(io::Error::from_raw_os_error(EMFILE));
        assert_eq!(err.to_string(), "accept failed");
        let source = std::error::Error::source(&err).map(ToString::to_string);
        assert!(source.is_some_and(|s| s.contains("open files")));
        let err = ServerError::MetricsListen {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], 9121)),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert!(
            err.to_string()
                .starts_with("metrics.listen: cannot listen on 127.0.0.1:9121: "),
            "{err}"
        );
        assert!(std::error::Error::source(&err).is_some());
    }

    /// An accept that fails with `error` until `ok_after` has passed.
    fn failing_until(
        error: fn() -> io::Error,
        ok_after: Duration,
        attempts: &Cell<u32>,
    ) -> impl FnMut() -> std::future::Ready<io::Result<()>> + '_ {
        let start = Instant::now();
        move || {
            attempts.set(attempts.get() + 1);
            std::future::ready(if start.elapsed() >= ok_after {
                Ok(())
            } else {
                Err(error())
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn running_out_of_descriptors_is_retried_for_as_long_as_it_lasts() {
        let attempts = Cell::new(0);
        let start = Instant::now();
        let emfile: fn() -> io::Error = || io::Error::from_raw_os_error(EMFILE);
        let accepted = accept_with_backoff(failing_until(
            emfile,
            300 * Duration::from_secs(1),
            &attempts,
        ))
        .await;
        assert!(accepted.is_ok());
        let took = start.elapsed();
        // Well past the give-up time, and the backoff stays at a second, so
        // a client is accepted within about a second of descriptors coming
        // free.
        assert!(
            took >= Duration::from_secs(300) && took <= Duration::from_secs(302),
            "{took:?}"
        );
        assert!(attempts.get() >= 295, "{}", attempts.get());
    }

    #[tokio::test(start_paused = true)]
    async fn other_errors_give_up_after_a_minute() {
        let attempts = Cell::new(0);
        let start = Instant::now();
        let broken: fn() -> io::Error = || io::Error::from(io::ErrorKind::InvalidInput);
        let accepted = accept_with_backoff(failing_until(broken, Duration::MAX, &attempts)).await;
        assert!(matches!(accepted, Err(ServerError::Accept(_))));
        let took = start.elapsed();
        assert!(
            took >= ACCEPT_GIVE_UP && took <= ACCEPT_GIVE_UP + ACCEPT_BACKOFF_MAX,
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_success_ends_the_failure_streak() {
        // Fails for 50 s, succeeds, then fails for 50 s more: never 60 s in
        // a row, so both accepts succeed.
        for _ in 0..2 {
            let attempts = Cell::new(0);
            let broken: fn() -> io::Error = || io::Error::from(io::ErrorKind::InvalidInput);
            let accepted =
                accept_with_backoff(failing_until(broken, Duration::from_secs(50), &attempts))
                    .await;
            assert!(accepted.is_ok());
        }
    }
}
