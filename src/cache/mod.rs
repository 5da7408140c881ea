//! The L1 tier: tierd's in-process cache of read replies and the rules that
//! decide what goes into it.
//!
//! Everything here is synchronous and does no I/O. The cache knows nothing
//! of sockets, sessions or the upstream: `dispatch` asks it questions and
//! hands it replies, and the background tasks (tracking, bus, warming) call
//! into it to invalidate or fill. Keeping it that way is what lets the store
//! and the rule matcher be tested and benchmarked without a server.

pub mod glob;
pub mod store;
