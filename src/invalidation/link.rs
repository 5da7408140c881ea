//! A control-plane socket: one upstream connection that a background task
//! owns outright (the tracking link, the bus links), read frame by frame.
//! No pooling, no reply routing: the task knows what it sent and reads
//! what comes back in order, pushes and pub/sub messages included.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::ReplyFramer;
use crate::upstream::Timeouts;

/// The socket, its unread input and the heartbeats it waits for.
pub(crate) struct Link {
    stream: TcpStream,
    buf: BytesMut,
    framer: ReplyFramer,
    /// What the link is, for error messages (`tracking link`, `bus link`).
    what: &'static str,
    /// When each unanswered heartbeat `PING` was sent.
    pub(crate) pings: VecDeque<Instant>,
}

impl Link {
    pub(crate) fn new(stream: TcpStream, max_depth: usize, what: &'static str) -> Link {
        Link {
            stream,
            buf: BytesMut::with_capacity(16 * 1024),
            framer: ReplyFramer::new(max_depth),
            what,
            pings: VecDeque::new(),
        }
    }

    /// Writes `raw` whole.
    ///
    /// # Errors
    ///
    /// The socket's error, described.
    pub(crate) async fn send(&mut self, raw: &[u8]) -> Result<(), String> {
        self.stream
            .write_all(raw)
            .await
            .map_err(|e| format!("{} write: {e}", self.what))
    }

    /// The next complete frame. Cancel-safe: bytes read before a
    /// cancellation stay buffered for the next call.
    ///
    /// # Errors
    ///
    /// A closed or failed socket, or bytes that are not RESP.
    pub(crate) async fn next_frame(&mut self) -> Result<Bytes, String> {
        loop {
            match self.framer.frame(&self.buf) {
                Ok(Some(len)) => return Ok(self.buf.split_to(len).freeze()),
                Ok(None) => {}
                Err(e) => return Err(format!("bad frame on {}: {e}", self.what)),
            }
            if self.buf.capacity() - self.buf.len() < 4096 {
                self.buf.reserve(16 * 1024);
            }
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err(format!("{} closed by upstream", self.what)),
                Ok(_) => {}
                Err(e) => return Err(format!("{} read: {e}", self.what)),
            }
        }
    }
}

/// The reconnect schedule of a control link: exponential backoff from
/// `backoff_min` to `backoff_max`, started over once a link has lived
/// longer than `backoff_max` (its failure is a new one, not a repeat).
pub(crate) struct Reconnect {
    min: Duration,
    max: Duration,
    next: Duration,
    failures: u32,
}

impl Reconnect {
    pub(crate) fn new(timeouts: Timeouts) -> Reconnect {
        Reconnect {
            min: timeouts.backoff_min,
            max: timeouts.backoff_max,
            next: timeouts.backoff_min,
            failures: 0,
        }
    }

    /// A link that lived `lived` failed; returns how many links in a row
    /// have failed (1: a new failure, worth a warning).
    pub(crate) fn failed(&mut self, lived: Duration) -> u32 {
        if lived > self.max {
            self.next = self.min;
            self.failures = 0;
        }
        self.failures += 1;
        self.failures
    }

    /// Waits out the backoff; `false` if `stop` fired first.
    pub(crate) async fn wait(&mut self, stop: &mut tokio::sync::watch::Receiver<()>) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(self.next) => {}
            _ = stop.changed() => return false,
        }
        self.next = (self.next * 2).min(self.max);
        true
    }
}
