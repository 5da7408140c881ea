//! Proxy-level errors: who is at fault and whether a retry can help.
//!
//! Module errors (config, parse, upstream) carry their own thiserror enums;
//! this module only gives the shared vocabulary that decides the RESP error
//! text a client sees and, later, the metric label. It does no I/O.

/// Who caused a failure. Decides the error text and the metric label
/// (pingora's `ErrorSource` idea).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSource {
    /// The client sent something wrong (bad framing, bad arguments).
    Client,
    /// Upstream Redis failed, timed out or is unreachable.
    Upstream,
    /// A bug or resource limit inside tierd.
    Internal,
}

impl ErrorSource {
    /// A short, stable name for logs and labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorSource::Client => "client",
            ErrorSource::Upstream => "upstream",
            ErrorSource::Internal => "internal",
        }
    }
}
