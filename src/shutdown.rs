//! Shutdown signalling, after mini-redis: the server drops a broadcast sender
//! to tell every task to stop, and waits on an mpsc that closes when the last
//! task holding a clone of its sender ends.
//!
//! This module owns only the signalling; what "stopping" means is up to each
//! task (sessions finish their in-flight replies first).

use tokio::sync::{broadcast, mpsc};

/// Listens for the shutdown broadcast. Cheap to hold; one per task.
#[derive(Debug)]
pub struct Shutdown {
    is_shutdown: bool,
    notify: broadcast::Receiver<()>,
    /// Held only so that the server's `mpsc::Receiver` closes once every task
    /// holding a `Shutdown` has ended.
    _done: mpsc::Sender<()>,
}

impl Shutdown {
    /// Wraps a receiver of the server's shutdown broadcast.
    pub fn new(notify: broadcast::Receiver<()>, done: mpsc::Sender<()>) -> Shutdown {
        Shutdown {
            is_shutdown: false,
            notify,
            _done: done,
        }
    }

    /// Whether the shutdown signal has been received.
    pub fn is_shutdown(&self) -> bool {
        self.is_shutdown
    }

    /// Resolves once shutdown is signalled (immediately if it already was).
    pub async fn recv(&mut self) {
        if self.is_shutdown {
            return;
        }
        // Either a message or a closed channel means "stop": the sender is
        // dropped, never sent to, but both outcomes are treated the same.
        let _ = self.notify.recv().await;
        self.is_shutdown = true;
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C).
pub async fn signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
    tracing::info!("shutdown signal received");
}
