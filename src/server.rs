//! The accept loop, the client limit and graceful shutdown.
//!
//! `run` is what both the binary and the tests drive: give it a bound
//! listener, a validated configuration and a future that resolves when it is
//! time to stop. It owns no protocol logic; each accepted client becomes a
//! [`Session`] task.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{broadcast, mpsc, Semaphore};

use crate::config::Config;
use crate::session::{Ctx, Session};
use crate::shutdown::Shutdown;

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The listener failed in a way that backing off did not cure.
    #[error("accept failed: {0}")]
    Accept(#[source] std::io::Error),
}

/// The reply a client over `max_clients` gets before it is closed.
const MAX_CLIENTS_REPLY: &[u8] = b"-ERR max number of clients reached\r\n";

/// Serves clients on `listener` until `shutdown` resolves, then stops
/// accepting, lets sessions finish their in-flight replies for up to
/// `shutdown_timeout`, and returns.
///
/// # Errors
///
/// Only when accepting keeps failing after backing off.
pub async fn run(
    listener: TcpListener,
    config: Arc<Config>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let ctx = Arc::new(Ctx::new(config.clone()));
    let (notify_shutdown, _) = broadcast::channel::<()>(1);
    let (shutdown_complete_tx, mut shutdown_complete_rx) = mpsc::channel::<()>(1);
    let limit = Arc::new(Semaphore::new(config.max_clients));

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
    // Dropping the sender tells every session to stop taking requests; the
    // completion channel closes when the last one has finished.
    drop(notify_shutdown);
    drop(shutdown_complete_tx);
    let drained = tokio::time::timeout(config.shutdown_timeout, shutdown_complete_rx.recv()).await;
    if drained.is_err() {
        tracing::warn!(timeout = ?config.shutdown_timeout, "shutdown timeout: closing remaining clients");
    }
    tracing::info!("tierd stopped");
    result
}

async fn accept_loop(
    listener: &TcpListener,
    ctx: &Arc<Ctx>,
    limit: &Arc<Semaphore>,
    notify_shutdown: &broadcast::Sender<()>,
    shutdown_complete: &mpsc::Sender<()>,
) -> Result<(), ServerError> {
    loop {
        let stream = accept(listener).await?;
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

/// Accepts with exponential backoff on errors (for example running out of
/// file descriptors), as mini-redis does; gives up after about a minute.
async fn accept(listener: &TcpListener) -> Result<TcpStream, ServerError> {
    let mut backoff = Duration::from_millis(5);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return Ok(stream),
            Err(e) => {
                if backoff > Duration::from_secs(32) {
                    return Err(ServerError::Accept(e));
                }
                tracing::warn!(error = %e, "accept failed; backing off");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
}

/// Answers a client over the limit and closes it, without spawning anything:
/// a flood of connections must not cost more than the limit allows.
fn reject(stream: TcpStream) {
    tracing::debug!("max number of clients reached");
    let _ = stream.try_write(MAX_CLIENTS_REPLY);
}
