//! Keeping L1 coherent with writes that do not go through this tierd.
//!
//! The control plane lives here: background tasks that hold their own
//! upstream connections and only ever call into the cache (invalidate,
//! flush, suspend, resume) and the shared command table. Sessions never wait
//! on them; they ask [`Tracking::fill_allowed`] before caching a reply.
//!
//! - [`tracking`]: the tracking link (Redis `CLIENT TRACKING`), which also
//!   reads the `COMMAND` table at start and after every reconnect.
//! - [`bus`]: the invalidation bus between tierd instances (Redis pub/sub).

pub mod bus;
pub(crate) mod link;
pub mod tags;
pub mod tracking;

pub use bus::Bus;
pub use tracking::Tracking;
