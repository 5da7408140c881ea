//! The L1 tier: tierd's in-process cache of read replies and the rules that
//! decide what goes into it.
//!
//! Everything here is synchronous and does no I/O. The cache knows nothing
//! of sockets, sessions or the upstream: `dispatch` asks it questions and
//! hands it replies, and the background tasks (tracking, bus, warming) call
//! into it to invalidate or fill. Keeping it that way is what lets the store
//! and the rule matcher be tested and benchmarked without a server.

pub mod compress;
pub mod glob;
pub mod rules;
pub mod store;
pub mod template;
pub mod watch;

pub use rules::{Rule, Rules};
pub use store::{
    Event, FillMark, FillToken, Holder, ReplySlice, RuleStats, Store, StoreError, Timing, Variant,
};

use crate::config::Config;

/// The L1 tier as the rest of tierd sees it: the rules and the store they
/// index into (rule `i` is store rule `i`).
#[derive(Debug)]
pub struct L1 {
    /// Cached replies.
    pub store: Store,
    /// Which keys are cached, and how.
    pub rules: Rules,
}

impl L1 {
    /// The L1 tier for a configuration, or `None` when no rule caches
    /// anything (then tierd is a plain proxy and skips every lookup).
    ///
    /// # Errors
    ///
    /// The store's own validation (caps, rule count), which config
    /// validation already checks.
    pub fn new(config: &Config) -> Result<Option<L1>, StoreError> {
        let rules = Rules::from_config(&config.rules);
        if !rules.any_cached() {
            return Ok(None);
        }
        let store = Store::new(store::StoreConfig {
            max_memory: config.l1.max_memory,
            max_value_size: config.l1.max_value_size,
            rules: config
                .rules
                .iter()
                .map(|r| store::RuleCap {
                    name: r.name.clone(),
                    max_memory: r.max_memory,
                })
                .collect(),
        })?;
        let mut store = store;
        for (i, r) in config.rules.iter().enumerate() {
            if let Some(stale) = r.stale_ttl.filter(|_| r.cache) {
                store.set_stale_ttl(i, stale);
            }
        }
        Ok(Some(L1 { store, rules }))
    }
}
