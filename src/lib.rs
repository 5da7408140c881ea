//! tierd: a Redis-protocol caching proxy.
//!
//! Clients that speak RESP point at tierd instead of Redis and change nothing
//! else. tierd forwards every command to the upstream Redis, byte for byte, and
//! is the seam where the caching tiers slot in.
//!
//! # Layout
//!
//! Data flows one way, top to bottom:
//!
//! - [`protocol`]: the incremental client request parser (with Redis's limits)
//!   and the upstream reply framer; RESP encoding helpers for tierd's own replies.
//! - [`command`]: classifies a request by name (and, for a few commands, by
//!   arguments) into what the session must do with it. Never allocates.
//! - [`session`]: one task per client. Ordered reply queue for pipelining,
//!   protocol version, db, identity, and the pinned upstream connection.
//! - [`dispatch`]: the one place that decides where a request goes (an L1
//!   hit, a local reply, the shared pool or the client's pinned connection),
//!   and the invalidations that go with writes.
//! - [`cache`]: the L1 tier: rules (Redis-compatible globs), the byte-capped
//!   store with its fill marks and flush epochs. No I/O.
//! - [`admin`]: tierd's answers to operators, `CACHE.*` and its own `INFO`
//!   sections, read from the server's state. No I/O of its own.
//! - [`upstream`]: multiplexed, pipelined connections to Redis, pooled per
//!   protocol version and identity, plus dedicated (pinned) connections.
//!
//! The control plane runs beside them: [`invalidation`] holds the tracking
//! link (Redis `CLIENT TRACKING` reports → L1 invalidations) and reads the
//! `COMMAND` table the classification uses; [`metrics`] keeps the server's
//! Prometheus registry and serves `/metrics`, `/health` and `/ready` over its
//! own small HTTP listener, with an upstream health prober.
//!
//! Around them: [`config`] and [`cli`] (loading and validating `proxy.toml`),
//! [`server`] (accept loop, connection limit, shutdown), [`shutdown`] and
//! [`error`].
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms, clippy::unwrap_used, clippy::panic)]

pub mod admin;
pub mod cache;
pub mod cli;
pub mod command;
pub mod config;
pub mod dispatch;
pub mod error;
pub mod invalidation;
pub mod metrics;
pub mod protocol;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod upstream;
