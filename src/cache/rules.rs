//! Caching rules: which keys go into L1, for how long, under which cap.
//!
//! Rules come from `[[rules]]` in the configuration and are tried in order;
//! the first whose pattern matches a key decides for it, so a narrow
//! `cache = false` rule placed first keeps sensitive keys out of a broad rule
//! after it. This file matches keys to rules, renders a key's tags and
//! derives the tracking prefixes for `BCAST` mode; it does no I/O and holds
//! no cached data.

use std::time::Duration;

use crate::cache::glob::Glob;
use crate::cache::template::TagTemplate;
use crate::config::{
    CompressConfig, RefreshAhead, RuleConfig, StampedeConfig, WarmConfig, WriteStrategy,
};

/// One rule, ready for matching.
#[derive(Debug, Clone)]
pub struct Rule {
    /// The rule's name (stats, metrics, commands).
    pub name: String,
    /// The key pattern.
    pub pattern: Glob,
    /// L1 lifetime of an entry.
    pub ttl: Duration,
    /// Whether matching keys are cached at all.
    pub cache: bool,
    /// Whether nil replies are cached.
    pub negative: bool,
    /// The tags of matching keys, templates over the pattern's captures.
    pub tags: Vec<TagTemplate>,
    /// How matching keys' string values are compressed, if they are.
    pub compress: Option<CompressConfig>,
    /// Leases for reads that find nothing upstream, if any.
    pub stampede: Option<StampedeConfig>,
    /// Background refresh of entries read late in their life, if any.
    pub refresh_ahead: Option<RefreshAhead>,
    /// How long past its ttl an entry may be served while the circuit
    /// breaker is open.
    pub stale_ttl: Option<std::time::Duration>,
    /// What a write of a matching key through tierd does to L1.
    pub write: WriteStrategy,
    /// Warming, if any.
    pub warm: Option<WarmConfig>,
}

/// The rules in match order. A rule's index here is its index in the L1
/// store.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
    /// Whether some rule has tags. Every write asks for its key's tags, and
    /// most configurations have none, so this lets [`Rules::tags_for`]
    /// answer without trying a single pattern.
    any_tags: bool,
    /// Whether some rule compresses, for the same reason.
    any_compress: bool,
}

impl Rules {
    /// The rules of a configuration, in file order.
    pub fn from_config(rules: &[RuleConfig]) -> Rules {
        Rules {
            rules: rules
                .iter()
                .map(|r| Rule {
                    name: r.name.clone(),
                    pattern: r.pattern.clone(),
                    ttl: r.ttl,
                    cache: r.cache,
                    negative: r.negative,
                    tags: r.tags.clone(),
                    compress: r.compress,
                    stampede: r.stampede,
                    refresh_ahead: r.refresh_ahead,
                    stale_ttl: r.stale_ttl,
                    write: r.write,
                    warm: r.warm,
                })
                .collect(),
            any_tags: rules.iter().any(|r| !r.tags.is_empty()),
            any_compress: rules.iter().any(|r| r.compress.is_some()),
        }
    }

    /// The rule that caches `key`: the first rule whose pattern matches,
    /// if that rule caches. `None` when no rule matches or the first match
    /// is a `cache = false` rule.
    pub fn find(&self, key: &[u8]) -> Option<(usize, &Rule)> {
        let (index, rule) = self
            .rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.pattern.matches(key))?;
        rule.cache.then_some((index, rule))
    }

    /// Whether any rule caches anything.
    pub fn any_cached(&self) -> bool {
        self.rules.iter().any(|r| r.cache)
    }

    /// The tags of `key`: those of the first rule whose pattern matches it,
    /// `cache = false` or not (tags are about invalidation in Redis, not
    /// L1), each rendered from that match's captures. Empty when no rule
    /// matches or the first match has no tags, and without allocating when
    /// no rule has tags.
    pub fn tags_for(&self, key: &[u8]) -> Vec<Vec<u8>> {
        if !self.any_tags {
            return Vec::new();
        }
        let Some(rule) = self.rules.iter().find(|r| r.pattern.matches(key)) else {
            return Vec::new();
        };
        if rule.tags.is_empty() {
            return Vec::new();
        }
        // The pattern matched, so this is the same match with its spans.
        let Some(captures) = rule.pattern.captures(key) else {
            return Vec::new();
        };
        rule.tags.iter().map(|t| t.render(&captures)).collect()
    }

    /// Whether any rule has tags.
    pub fn any_tags(&self) -> bool {
        self.any_tags
    }

    /// How `key`'s string values are compressed: the first matching rule's
    /// `compress`, `cache = false` or not. `None` without trying a pattern
    /// when no rule compresses.
    pub fn compress_for(&self, key: &[u8]) -> Option<CompressConfig> {
        if !self.any_compress {
            return None;
        }
        self.rules.iter().find(|r| r.pattern.matches(key))?.compress
    }

    /// Whether any rule compresses.
    pub fn any_compress(&self) -> bool {
        self.any_compress
    }

    /// All rules, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Rule> {
        self.rules.iter()
    }

    /// How many rules there are.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    /// Whether there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// The prefixes `CLIENT TRACKING … BCAST` needs so that every key a
    /// caching rule can match is covered: each caching rule's literal
    /// prefix, minus those another prefix already covers (Redis refuses
    /// overlapping prefixes on one connection). An empty list means every
    /// key: some caching rule starts with a wildcard.
    pub fn bcast_prefixes(&self) -> Vec<Vec<u8>> {
        let mut prefixes: Vec<Vec<u8>> = self
            .rules
            .iter()
            .filter(|r| r.cache)
            .map(|r| r.pattern.literal_prefix())
            .collect();
        if prefixes.iter().any(Vec::is_empty) {
            return Vec::new();
        }
        prefixes.sort();
        prefixes.dedup();
        // Sorted, a prefix comes right before the strings it covers, and
        // the last one kept is the only one that can cover the next.
        let mut kept: Vec<Vec<u8>> = Vec::with_capacity(prefixes.len());
        for p in prefixes {
            if kept.last().is_some_and(|k| p.starts_with(k)) {
                continue;
            }
            kept.push(p);
        }
        kept
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn rule(pattern: &str, cache: bool) -> RuleConfig {
        RuleConfig {
            name: pattern.to_owned(),
            pattern: Glob::new(pattern).unwrap(),
            ttl: if cache {
                Duration::from_secs(60)
            } else {
                Duration::ZERO
            },
            max_memory: None,
            cache,
            negative: true,
            tags: Vec::new(),
            compress: None,
            stampede: None,
            refresh_ahead: None,
            stale_ttl: None,
            write: crate::config::WriteStrategy::Invalidate,
            warm: None,
        }
    }

    fn tagged(pattern: &str, cache: bool, tags: &[&str]) -> RuleConfig {
        let mut r = rule(pattern, cache);
        r.tags = tags
            .iter()
            .map(|t| TagTemplate::new(t, &r.pattern).unwrap())
            .collect();
        r
    }

    #[test]
    fn tags_come_from_the_first_matching_rule() {
        let rules = Rules::from_config(&[
            tagged("secret:{id}", false, &["secret:{id}"]),
            rule("sessions:admin:*", true),
            tagged(
                "sessions:teacher:{teacher}:*",
                true,
                &["teacher:{teacher}", "sessions"],
            ),
            tagged("sessions:*", true, &["sessions"]),
        ]);
        assert!(rules.any_tags());
        assert_eq!(
            rules.tags_for(b"sessions:teacher:12:3:x"),
            vec![b"teacher:12".to_vec(), b"sessions".to_vec()]
        );
        // A cache = false rule still tags its keys.
        assert_eq!(rules.tags_for(b"secret:k"), vec![b"secret:k".to_vec()]);
        // The first match decides, even when it has no tags and a later
        // rule would.
        assert!(rules.tags_for(b"sessions:admin:1").is_empty());
        assert_eq!(rules.tags_for(b"sessions:x"), vec![b"sessions".to_vec()]);
        assert!(rules.tags_for(b"user:1").is_empty());
    }

    #[test]
    fn no_tags_anywhere_means_none() {
        let rules = Rules::from_config(&[rule("*", true), rule("secret:*", false)]);
        assert!(!rules.any_tags());
        let tags = rules.tags_for(b"anything");
        assert!(tags.is_empty());
        assert_eq!(tags.capacity(), 0);
        assert!(!Rules::default().any_tags());
        assert!(Rules::default().tags_for(b"k").is_empty());
    }

    #[test]
    fn first_match_wins_and_cache_false_shields() {
        let rules = Rules::from_config(&[
            rule("secret:*", false),
            rule("user:{id}", true),
            rule("*", true),
        ]);
        assert_eq!(rules.find(b"secret:x"), None);
        assert_eq!(rules.find(b"user:1").map(|(i, _)| i), Some(1));
        assert_eq!(rules.find(b"other").map(|(i, _)| i), Some(2));
    }

    #[test]
    fn no_match_is_none() {
        let rules = Rules::from_config(&[rule("user:*", true)]);
        assert!(rules.find(b"users").is_none());
        assert!(rules.find(b"user:").is_some());
    }

    #[test]
    fn bcast_prefixes_drop_covered_ones() {
        let rules = Rules::from_config(&[
            rule("user:{id}:profile", true),
            rule("user:*", true),
            rule("us?r", true),
            rule("image:{id}:meta", true),
            rule("secret:*", false),
        ]);
        assert_eq!(
            rules.bcast_prefixes(),
            vec![b"image:".to_vec(), b"us".to_vec()]
        );
    }

    #[test]
    fn bcast_prefixes_empty_means_all() {
        let rules = Rules::from_config(&[rule("user:*", true), rule("*:x", true)]);
        assert!(rules.bcast_prefixes().is_empty());
    }

    impl PartialEq for Rule {
        fn eq(&self, other: &Rule) -> bool {
            self.name == other.name
        }
    }
}
