//! A control-plane socket: one upstream connection that a background task
//! owns outright (the tracking link, the bus links), read frame by frame.
//! No pooling, no reply routing: the task knows what it sent and reads
//! what comes back in order, pushes and pub/sub messages included.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::protocol::ReplyFramer;

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
