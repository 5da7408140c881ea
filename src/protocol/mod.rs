//! RESP on the wire: the client request parser and the upstream reply framer.
//!
//! This module knows bytes and frames, nothing about commands. Requests are
//! parsed by a small hand-written incremental parser with Redis's limits
//! (redis-protocol 6 has none and recurses without bound). Upstream replies are
//! only *framed*, never re-encoded, so that clients get Redis's exact bytes.

pub mod inspect;
pub mod parse;
pub mod reply;

pub use parse::{ParseError, ParseLimits, Request, RequestParser};
pub use reply::{FrameError, ReplyFramer};

/// The RESP protocol version a client (or an upstream connection) speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    /// RESP2, the default for every new connection.
    Resp2,
    /// RESP3, after `HELLO 3`.
    Resp3,
}

impl Proto {
    /// The number `HELLO` uses for this version.
    pub fn as_u8(self) -> u8 {
        match self {
            Proto::Resp2 => 2,
            Proto::Resp3 => 3,
        }
    }

    /// Index into per-protocol arrays (`[T; 2]`).
    pub fn index(self) -> usize {
        match self {
            Proto::Resp2 => 0,
            Proto::Resp3 => 1,
        }
    }
}
