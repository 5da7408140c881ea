//! What tierd counts, and how it is rendered for Prometheus.
//!
//! Every metric is recorded through the `metrics` facade's handles
//! ([`::metrics::Counter`], [`::metrics::Gauge`], [`::metrics::Histogram`])
//! into a `metrics-exporter-prometheus` recorder that belongs to this server
//! instance, not to the process: tests run several tierds in one process,
//! and each must report only its own traffic. `/metrics` is
//! [`Metrics::render`], served by tierd's own HTTP listener
//! ([`http`]); the exporter's catch-all listener is not used.
//!
//! Hot-path metrics are handles registered once and then bumped with one
//! atomic add (requests per command are registered on first use of each
//! command name and cached). Figures the L1 store already keeps (hits,
//! misses, entries, bytes, evictions per rule) are copied into the registry
//! when `/metrics` is scraped, so the hit path pays nothing for them.
//!
//! Labels come only from bounded sets: rule names from the configuration,
//! command names from upstream's `COMMAND` table (anything else is counted as
//! `other`), and fixed enumerations. Keys never become labels.
//!
//! The catalog of names is [`names`]; `docs/metrics.md` describes each one.

pub mod health;
pub mod http;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ::metrics::{Counter, Gauge, Histogram, Key, Label, Level, Metadata, Recorder, Unit};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use parking_lot::RwLock;

use crate::cache::RuleStats;

/// Metric names. Every name has the `tierd_` prefix; counters end in
/// `_total`, and values are in base units (`_seconds`, `_bytes`).
pub mod names {
    /// Counter, label `command`: requests received, by command name
    /// (lowercase, as upstream's `COMMAND` spells it; `other` for names
    /// upstream does not know).
    pub const REQUESTS: &str = "tierd_requests_total";
    /// Counter, label `rule`: L1 lookups answered from L1.
    pub const L1_HITS: &str = "tierd_l1_hits_total";
    /// Counter, label `rule`: L1 lookups that went upstream.
    pub const L1_MISSES: &str = "tierd_l1_misses_total";
    /// Gauge, label `rule`: replies cached.
    pub const L1_ENTRIES: &str = "tierd_l1_entries";
    /// Gauge, label `rule`: bytes charged for them, overhead included.
    pub const L1_BYTES: &str = "tierd_l1_bytes";
    /// Gauge: `[l1] max_memory`.
    pub const L1_MAX_BYTES: &str = "tierd_l1_max_bytes";
    /// Counter, label `rule`: replies evicted to make room.
    pub const L1_EVICTIONS: &str = "tierd_l1_evictions_total";
    /// Counter, label `rule`: reads answered by joining an identical read
    /// already upstream.
    pub const L1_COALESCED: &str = "tierd_l1_coalesced_total";
    /// Counter, label `rule`: replies served past their ttl while the
    /// circuit breaker was open (`stale_ttl`).
    pub const STALE_SERVES: &str = "tierd_stale_serves_total";
    /// Gauge: 1 while the circuit breaker is open or half-open, else 0.
    pub const CIRCUIT_OPEN: &str = "tierd_circuit_open";
    /// Counter: times the circuit breaker opened.
    pub const CIRCUIT_OPENS: &str = "tierd_circuit_opens_total";
    /// Counter, label `rule`: background refreshes sent (refresh-ahead).
    pub const L1_REFRESHES: &str = "tierd_l1_refreshes_total";
    /// Counter, label `rule`: leases taken, each making a reader the loader.
    pub const LEASE_GRANTS: &str = "tierd_lease_grants_total";
    /// Counter, label `rule`: reads that found nothing and waited for a
    /// loader.
    pub const LEASE_WAITS: &str = "tierd_lease_waits_total";
    /// Counter, label `rule`: waits that ended with the loaded value.
    pub const LEASE_WAKEUPS: &str = "tierd_lease_wakeups_total";
    /// Counter, label `rule`: waits that ran out (`stampede.wait`).
    pub const LEASE_TIMEOUTS: &str = "tierd_lease_timeouts_total";
    /// Counter, label `rule`: warming runs (on start, every `interval`,
    /// `CACHE.WARM`).
    pub const WARM_RUNS: &str = "tierd_warm_runs_total";
    /// Counter, label `rule`: keys loaded into L1 by warming.
    pub const WARM_KEYS: &str = "tierd_warm_keys_total";
    /// Counter, label `source` (`write`, `tracking`, `bus`, `command`):
    /// keys invalidated in L1.
    pub const INVALIDATIONS: &str = "tierd_invalidations_total";
    /// Counter, label `source` (`write`, `tracking`, `bus`, `link_lost`):
    /// times L1 was flushed.
    pub const FLUSHES: &str = "tierd_l1_flushes_total";
    /// Histogram: upstream command latency in seconds, sampled (one request
    /// in [`super::LATENCY_SAMPLE`] per connection).
    pub const UPSTREAM_LATENCY: &str = "tierd_upstream_latency_seconds";
    /// Counter: requests answered with tierd's own "upstream unavailable"
    /// error.
    pub const UPSTREAM_ERRORS: &str = "tierd_upstream_errors_total";
    /// Gauge: 1 while the upstream answers, else 0.
    pub const UPSTREAM_UP: &str = "tierd_upstream_up";
    /// Gauge: 1 while the tracking link is live, else 0.
    pub const TRACKING_UP: &str = "tierd_tracking_up";
    /// Counter: tracking links established.
    pub const TRACKING_LINKS: &str = "tierd_tracking_links_total";
    /// Gauge: 1 while the invalidation bus link is live, else 0.
    pub const BUS_UP: &str = "tierd_bus_up";
    /// Counter: invalidation bus links established.
    pub const BUS_LINKS: &str = "tierd_bus_links_total";
    /// Counter, label `direction` (`sent`, `received`): invalidation bus
    /// messages. Received counts other instances' messages only.
    pub const BUS_MESSAGES: &str = "tierd_bus_messages_total";
    /// Counter, label `reason` (`malformed`, `foreign`): messages on the
    /// bus channel that were ignored.
    pub const BUS_REJECTED: &str = "tierd_bus_rejected_total";
    /// Counter, label `op` (`compress`, `decompress`, `corrupt`): values
    /// tierd compressed on their way to Redis, restored on their way to a
    /// client, or found corrupt.
    pub const COMPRESSION_VALUES: &str = "tierd_compression_values_total";
    /// Counter, label `form` (`plain`, `stored`): bytes of the values tierd
    /// compressed on their way to Redis, before and after; their ratio is
    /// what compression saves.
    pub const COMPRESSION_BYTES: &str = "tierd_compression_bytes_total";
    /// Gauge: writes queued by write-behind and not yet answered by Redis.
    pub const WRITE_BEHIND_QUEUE: &str = "tierd_write_behind_queue";
    /// Counter: queued writes Redis accepted.
    pub const WRITE_BEHIND_FLUSHED: &str = "tierd_write_behind_flushed_total";
    /// Counter: queued writes Redis refused (their clients had been told
    /// `+OK`).
    pub const WRITE_BEHIND_ERRORS: &str = "tierd_write_behind_errors_total";
    /// Gauge: client connections open.
    pub const CLIENTS: &str = "tierd_client_connections";
    /// Counter: client connections accepted.
    pub const CLIENTS_ACCEPTED: &str = "tierd_client_connections_total";
    /// Counter: client connections refused at `max_clients`.
    pub const CLIENTS_REJECTED: &str = "tierd_client_connections_rejected_total";
}

/// One upstream request in this many per connection has its latency
/// recorded: enough for a histogram, without a clock read per request.
pub const LATENCY_SAMPLE: u64 = 16;

/// Histogram buckets for latencies, in seconds: 50 µs to 5 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
];

static METADATA: Metadata<'static> = Metadata::new("tierd", Level::INFO, Some("tierd::metrics"));

/// The command label for names upstream does not know.
const OTHER: &str = "other";

/// This server's metrics.
pub struct Metrics {
    recorder: PrometheusRecorder,
    handle: PrometheusHandle,
    /// Request counters by command name, registered on first use. Sync lock,
    /// read on every request (uncontended), written once per new name.
    requests: RwLock<HashMap<Box<str>, Counter>>,
    /// Totals kept as plain atomics too, for `/health` and `INFO`, which
    /// need them as numbers.
    requests_total: AtomicU64,
    upstream_errors_total: AtomicU64,
    /// Sampled upstream command latency.
    pub upstream_latency: Arc<Latency>,
    upstream_errors: Counter,
    invalidations_write: Counter,
    invalidations_tracking: Counter,
    invalidations_bus: Counter,
    invalidations_command: Counter,
    flushes_bus: Counter,
    bus_up: Gauge,
    bus_links: Counter,
    bus_sent: Counter,
    bus_received: Counter,
    bus_malformed: Counter,
    bus_foreign: Counter,
    compressed: Counter,
    decompressed: Counter,
    corrupt: Counter,
    compressed_plain_bytes: Counter,
    compressed_stored_bytes: Counter,
    flushes_write: Counter,
    flushes_tracking: Counter,
    flushes_link_lost: Counter,
    write_behind_queue: Gauge,
    write_behind_flushed: Counter,
    write_behind_errors: Counter,
    clients: Gauge,
    clients_accepted: Counter,
    clients_rejected: Counter,
    upstream_up: Gauge,
    tracking_up: Gauge,
    tracking_links: Counter,
}

/// A latency histogram that also keeps its running count and sum, which
/// `/health` turns into an average.
#[derive(Debug)]
pub struct Latency {
    histogram: Histogram,
    sum_ns: AtomicU64,
    count: AtomicU64,
}

impl Latency {
    /// Records one latency.
    pub fn record(&self, d: std::time::Duration) {
        self.histogram.record(d.as_secs_f64());
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_ns.fetch_add(ns, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// (samples, total nanoseconds) since start.
    pub fn totals(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.sum_ns.load(Ordering::Relaxed),
        )
    }
}

/// Where an invalidation came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A write through this tierd.
    Write,
    /// Redis's client tracking.
    Tracking,
    /// Another tierd instance, over the invalidation bus.
    Bus,
    /// A `CACHE.INVALIDATE`/`CACHE.SET` command.
    Command,
}

impl Source {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Write => "write",
            Source::Tracking => "tracking",
            Source::Bus => "bus",
            Source::Command => "command",
        }
    }
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Metrics {
    /// A fresh registry with every metric described.
    pub fn new() -> Metrics {
        // The buckets are constant and valid; should the builder still
        // refuse them, histograms render as summaries instead.
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
            .unwrap_or_else(|_| PrometheusBuilder::new())
            .build_recorder();
        let handle = recorder.handle();
        describe(&recorder);
        let counter = |name: &'static str, labels: &[(&'static str, &'static str)]| {
            recorder.register_counter(&key(name, labels), &METADATA)
        };
        let gauge = |name: &'static str| recorder.register_gauge(&key(name, &[]), &METADATA);
        Metrics {
            upstream_latency: Arc::new(Latency {
                histogram: recorder
                    .register_histogram(&key(names::UPSTREAM_LATENCY, &[]), &METADATA),
                sum_ns: AtomicU64::new(0),
                count: AtomicU64::new(0),
            }),
            upstream_errors: counter(names::UPSTREAM_ERRORS, &[]),
            invalidations_write: counter(names::INVALIDATIONS, &[("source", "write")]),
            invalidations_tracking: counter(names::INVALIDATIONS, &[("source", "tracking")]),
            invalidations_bus: counter(names::INVALIDATIONS, &[("source", "bus")]),
            invalidations_command: counter(names::INVALIDATIONS, &[("source", "command")]),
            flushes_bus: counter(names::FLUSHES, &[("source", "bus")]),
            bus_up: gauge(names::BUS_UP),
            bus_links: counter(names::BUS_LINKS, &[]),
            bus_sent: counter(names::BUS_MESSAGES, &[("direction", "sent")]),
            bus_received: counter(names::BUS_MESSAGES, &[("direction", "received")]),
            bus_malformed: counter(names::BUS_REJECTED, &[("reason", "malformed")]),
            bus_foreign: counter(names::BUS_REJECTED, &[("reason", "foreign")]),
            compressed: counter(names::COMPRESSION_VALUES, &[("op", "compress")]),
            decompressed: counter(names::COMPRESSION_VALUES, &[("op", "decompress")]),
            corrupt: counter(names::COMPRESSION_VALUES, &[("op", "corrupt")]),
            compressed_plain_bytes: counter(names::COMPRESSION_BYTES, &[("form", "plain")]),
            compressed_stored_bytes: counter(names::COMPRESSION_BYTES, &[("form", "stored")]),
            flushes_write: counter(names::FLUSHES, &[("source", "write")]),
            flushes_tracking: counter(names::FLUSHES, &[("source", "tracking")]),
            flushes_link_lost: counter(names::FLUSHES, &[("source", "link_lost")]),
            write_behind_queue: gauge(names::WRITE_BEHIND_QUEUE),
            write_behind_flushed: counter(names::WRITE_BEHIND_FLUSHED, &[]),
            write_behind_errors: counter(names::WRITE_BEHIND_ERRORS, &[]),
            clients: gauge(names::CLIENTS),
            clients_accepted: counter(names::CLIENTS_ACCEPTED, &[]),
            clients_rejected: counter(names::CLIENTS_REJECTED, &[]),
            upstream_up: gauge(names::UPSTREAM_UP),
            tracking_up: gauge(names::TRACKING_UP),
            tracking_links: counter(names::TRACKING_LINKS, &[]),
            requests: RwLock::new(HashMap::new()),
            requests_total: AtomicU64::new(0),
            upstream_errors_total: AtomicU64::new(0),
            recorder,
            handle,
        }
    }

    /// The request counter of `command` (a name from the command table, or
    /// `None` for one upstream does not know). Sessions keep the handle of
    /// the command they saw last, so a stream of the same command costs one
    /// atomic add per request.
    pub fn command_counter(&self, command: Option<&str>) -> Counter {
        let name = command.unwrap_or(OTHER);
        if let Some(c) = self.requests.read().get(name) {
            return c.clone();
        }
        let c = self.recorder.register_counter(
            &Key::from_parts(
                names::REQUESTS,
                vec![Label::new("command", name.to_owned())],
            ),
            &METADATA,
        );
        self.requests.write().insert(name.into(), c.clone());
        c
    }

    /// Counts one request in the total (its per-command counter is bumped
    /// by the caller).
    pub fn request(&self) {
        self.requests_total.fetch_add(1, Ordering::Relaxed);
    }

    /// Requests received since start.
    pub fn requests_total(&self) -> u64 {
        self.requests_total.load(Ordering::Relaxed)
    }

    /// Counts a request answered with tierd's "upstream unavailable" error.
    pub fn upstream_error(&self) {
        self.upstream_errors_total.fetch_add(1, Ordering::Relaxed);
        self.upstream_errors.increment(1);
    }

    /// Requests answered with "upstream unavailable" since start.
    pub fn upstream_errors_total(&self) -> u64 {
        self.upstream_errors_total.load(Ordering::Relaxed)
    }

    /// Counts `n` keys invalidated from `source`.
    pub fn invalidated(&self, source: Source, n: u64) {
        match source {
            Source::Write => self.invalidations_write.increment(n),
            Source::Tracking => self.invalidations_tracking.increment(n),
            Source::Bus => self.invalidations_bus.increment(n),
            Source::Command => self.invalidations_command.increment(n),
        }
    }

    /// Counts an L1 flush: by a write (`FLUSHALL` …), by a tracking report,
    /// or because the tracking link was lost (`source` = `None`).
    pub fn flushed(&self, source: Option<Source>) {
        match source {
            Some(Source::Write) => self.flushes_write.increment(1),
            Some(Source::Tracking) => self.flushes_tracking.increment(1),
            Some(Source::Bus) => self.flushes_bus.increment(1),
            // CACHE commands never flush all of L1; count one as a write.
            Some(Source::Command) => self.flushes_write.increment(1),
            None => self.flushes_link_lost.increment(1),
        }
    }

    /// A client connected (`true`) or left.
    pub fn client(&self, connected: bool) {
        if connected {
            self.clients.increment(1.0);
            self.clients_accepted.increment(1);
        } else {
            self.clients.decrement(1.0);
        }
    }

    /// A client was refused at `max_clients`.
    pub fn client_rejected(&self) {
        self.clients_rejected.increment(1);
    }

    /// The write-behind queue's depth.
    pub fn write_behind_queue(&self, depth: usize) {
        self.write_behind_queue.set(depth as f64);
    }

    /// Counts a queued write Redis answered: accepted (`true`) or refused.
    pub fn write_behind_flushed(&self, ok: bool) {
        if ok {
            self.write_behind_flushed.increment(1);
        } else {
            self.write_behind_errors.increment(1);
        }
    }

    /// Whether upstream answers.
    pub fn set_upstream_up(&self, up: bool) {
        self.upstream_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Whether the tracking link is live; `true` also counts a new link.
    pub fn set_tracking_up(&self, up: bool) {
        if up {
            self.tracking_links.increment(1);
        }
        self.tracking_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Whether the invalidation bus link is live; `true` also counts a new
    /// link.
    pub fn set_bus_up(&self, up: bool) {
        if up {
            self.bus_links.increment(1);
        }
        self.bus_up.set(if up { 1.0 } else { 0.0 });
    }

    /// Counts a bus message this instance published.
    pub fn bus_sent(&self) {
        self.bus_sent.increment(1);
    }

    /// Counts a bus message from another instance that was applied.
    pub fn bus_received(&self) {
        self.bus_received.increment(1);
    }

    /// Counts a message on the bus channel that was ignored: `malformed`
    /// (tierd's magic, but unreadable) or foreign (anything else).
    pub fn bus_rejected(&self, malformed: bool) {
        if malformed {
            self.bus_malformed.increment(1);
        } else {
            self.bus_foreign.increment(1);
        }
    }

    /// Counts a value compressed on its way to Redis: `plain` bytes stored
    /// as `stored`.
    pub fn value_compressed(&self, plain: usize, stored: usize) {
        self.compressed.increment(1);
        self.compressed_plain_bytes.increment(plain as u64);
        self.compressed_stored_bytes.increment(stored as u64);
    }

    /// Counts a compressed value restored for a client (`true`), or found
    /// corrupt.
    pub fn value_decompressed(&self, ok: bool) {
        if ok {
            self.decompressed.increment(1);
        } else {
            self.corrupt.increment(1);
        }
    }

    /// The Prometheus text exposition of everything, with the L1 store's
    /// per-rule figures (`rules`) and cap copied in first.
    pub fn render(&self, rules: &[RuleStats], l1_max_bytes: u64) -> String {
        for r in rules {
            let rule = [("rule", r.name.clone())];
            let c = |name| {
                self.recorder
                    .register_counter(&owned_key(name, &rule), &METADATA)
            };
            c(names::L1_HITS).absolute(r.hits);
            c(names::L1_MISSES).absolute(r.misses);
            c(names::L1_EVICTIONS).absolute(r.evictions);
            c(names::L1_COALESCED).absolute(r.coalesced);
            c(names::L1_REFRESHES).absolute(r.refreshes);
            c(names::STALE_SERVES).absolute(r.stale_serves);
            c(names::LEASE_GRANTS).absolute(r.lease_grants);
            c(names::LEASE_WAITS).absolute(r.lease_waits);
            c(names::LEASE_WAKEUPS).absolute(r.lease_wakeups);
            c(names::LEASE_TIMEOUTS).absolute(r.lease_timeouts);
            let g = |name| {
                self.recorder
                    .register_gauge(&owned_key(name, &rule), &METADATA)
            };
            g(names::L1_ENTRIES).set(r.entries as f64);
            g(names::L1_BYTES).set(r.bytes as f64);
        }
        self.recorder
            .register_gauge(&key(names::L1_MAX_BYTES, &[]), &METADATA)
            .set(l1_max_bytes as f64);
        self.handle.render()
    }

    /// Copies the circuit breaker's state in, for the next render.
    pub fn set_circuit(&self, open: bool, opens: u64) {
        self.recorder
            .register_gauge(&key(names::CIRCUIT_OPEN, &[]), &METADATA)
            .set(if open { 1.0 } else { 0.0 });
        self.recorder
            .register_counter(&key(names::CIRCUIT_OPENS, &[]), &METADATA)
            .absolute(opens);
    }

    /// The counters of warming runs and of the keys they loaded for
    /// `rule`, registered now so that they show (at 0) before the first
    /// run. Warming keeps the handles.
    pub fn warm_counters(&self, rule: &str) -> (Counter, Counter) {
        let rule = [("rule", rule.to_owned())];
        let c = |name| {
            self.recorder
                .register_counter(&owned_key(name, &rule), &METADATA)
        };
        (c(names::WARM_RUNS), c(names::WARM_KEYS))
    }

    /// Drains histogram buffers; call it every few seconds.
    pub fn upkeep(&self) {
        self.handle.run_upkeep();
    }
}

fn key(name: &'static str, labels: &[(&'static str, &'static str)]) -> Key {
    let labels: Vec<Label> = labels.iter().map(|&(k, v)| Label::new(k, v)).collect();
    Key::from_parts(name, labels)
}

fn owned_key(name: &'static str, labels: &[(&'static str, String)]) -> Key {
    let labels: Vec<Label> = labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.clone()))
        .collect();
    Key::from_parts(name, labels)
}

/// HELP texts, as Prometheus shows them.
fn describe(r: &PrometheusRecorder) {
    use names::*;
    let counters: &[(&'static str, &'static str)] = &[
        (REQUESTS, "Requests received, by command."),
        (L1_HITS, "L1 lookups answered from L1, by rule."),
        (L1_MISSES, "L1 lookups that went upstream, by rule."),
        (L1_EVICTIONS, "L1 replies evicted to make room, by rule."),
        (
            L1_COALESCED,
            "Reads answered by joining an identical read already upstream, by rule.",
        ),
        (
            L1_REFRESHES,
            "Background refreshes of entries read late in their life, by rule.",
        ),
        (
            STALE_SERVES,
            "Replies served past their ttl while the circuit breaker was open, by rule.",
        ),
        (CIRCUIT_OPENS, "Times the upstream circuit breaker opened."),
        (
            LEASE_GRANTS,
            "Leases taken, each making one reader the loader, by rule.",
        ),
        (
            LEASE_WAITS,
            "Reads that found nothing and waited for a loader, by rule.",
        ),
        (
            LEASE_WAKEUPS,
            "Waits for a loader that ended with the value, by rule.",
        ),
        (LEASE_TIMEOUTS, "Waits for a loader that ran out, by rule."),
        (
            WARM_RUNS,
            "Warming runs (on start, every interval, CACHE.WARM), by rule.",
        ),
        (WARM_KEYS, "Keys loaded into L1 by warming, by rule."),
        (INVALIDATIONS, "Keys invalidated in L1, by source."),
        (FLUSHES, "Times L1 was flushed, by source."),
        (
            UPSTREAM_ERRORS,
            "Requests answered with tierd's upstream-unavailable error.",
        ),
        (TRACKING_LINKS, "Tracking links established."),
        (BUS_LINKS, "Invalidation bus links established."),
        (
            BUS_MESSAGES,
            "Invalidation bus messages, by direction (received: other instances' only).",
        ),
        (
            BUS_REJECTED,
            "Messages on the bus channel ignored, by reason (malformed, foreign).",
        ),
        (
            COMPRESSION_VALUES,
            "Values compressed, restored or found corrupt, by op.",
        ),
        (
            COMPRESSION_BYTES,
            "Bytes of values compressed on their way to Redis, before (plain) and after (stored).",
        ),
        (
            WRITE_BEHIND_FLUSHED,
            "Queued write-behind writes Redis accepted.",
        ),
        (
            WRITE_BEHIND_ERRORS,
            "Queued write-behind writes Redis refused (their clients had been told OK).",
        ),
        (CLIENTS_ACCEPTED, "Client connections accepted."),
        (
            CLIENTS_REJECTED,
            "Client connections refused at max_clients.",
        ),
    ];
    for &(name, help) in counters {
        r.describe_counter(name.into(), None, help.into());
    }
    let gauges: &[(&'static str, Option<Unit>, &'static str)] = &[
        (L1_ENTRIES, None, "Replies cached in L1, by rule."),
        (
            L1_BYTES,
            Some(Unit::Bytes),
            "Bytes charged for L1 entries, overhead included, by rule.",
        ),
        (
            L1_MAX_BYTES,
            Some(Unit::Bytes),
            "The L1 memory cap ([l1] max_memory).",
        ),
        (UPSTREAM_UP, None, "1 while upstream Redis answers, else 0."),
        (
            CIRCUIT_OPEN,
            None,
            "1 while the upstream circuit breaker is open or half-open, else 0.",
        ),
        (
            TRACKING_UP,
            None,
            "1 while the tracking link is live, else 0.",
        ),
        (
            BUS_UP,
            None,
            "1 while the invalidation bus link is live, else 0.",
        ),
        (
            WRITE_BEHIND_QUEUE,
            None,
            "Writes queued by write-behind, not yet answered by Redis.",
        ),
        (CLIENTS, None, "Client connections open."),
    ];
    for &(name, unit, help) in gauges {
        r.describe_gauge(name.into(), unit, help.into());
    }
    r.describe_histogram(
        UPSTREAM_LATENCY.into(),
        Some(Unit::Seconds),
        "Upstream command latency, sampled.".into(),
    );
}

/// Shared handle type.
pub type SharedMetrics = Arc<Metrics>;

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn stats(name: &str, hits: u64) -> RuleStats {
        RuleStats {
            name: name.into(),
            hits,
            misses: 2,
            entries: 3,
            bytes: 400,
            evictions: 5,
            invalidations: 6,
            coalesced: 7,
            lease_grants: 8,
            lease_waits: 9,
            lease_wakeups: 10,
            lease_timeouts: 11,
            refreshes: 12,
            stale_serves: 13,
        }
    }

    #[test]
    fn renders_counters_gauges_and_histograms_with_help() {
        let m = Metrics::new();
        m.command_counter(Some("get")).increment(3);
        m.command_counter(Some("get")).increment(1);
        m.command_counter(None).increment(1);
        m.invalidated(Source::Tracking, 7);
        m.upstream_latency
            .record(std::time::Duration::from_micros(300));
        m.client(true);
        let text = m.render(&[stats("users", 10)], 1 << 20);
        for line in [
            "tierd_requests_total{command=\"get\"} 4",
            "tierd_requests_total{command=\"other\"} 1",
            "tierd_invalidations_total{source=\"tracking\"} 7",
            "tierd_l1_hits_total{rule=\"users\"} 10",
            "tierd_l1_misses_total{rule=\"users\"} 2",
            "tierd_l1_entries{rule=\"users\"} 3",
            "tierd_l1_bytes{rule=\"users\"} 400",
            "tierd_l1_evictions_total{rule=\"users\"} 5",
            "tierd_l1_max_bytes 1048576",
            "tierd_client_connections 1",
            "tierd_upstream_latency_seconds_bucket{le=\"0.0005\"} 1",
            "tierd_upstream_latency_seconds_count 1",
            "# HELP tierd_l1_hits_total L1 lookups answered from L1, by rule.",
            "# TYPE tierd_upstream_latency_seconds histogram",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        // The store's figures are absolute: a second scrape does not add.
        let text = m.render(&[stats("users", 12)], 1 << 20);
        assert!(
            text.contains("tierd_l1_hits_total{rule=\"users\"} 12"),
            "{text}"
        );
        assert_eq!(m.upstream_latency.totals(), (1, 300_000));
    }

    #[test]
    fn two_servers_do_not_share_figures() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.command_counter(Some("set")).increment(1);
        assert!(!b.render(&[], 0).contains("command=\"set\""));
    }

    /// The `(IDENT, "value")` pairs of every `pub const` in `mod names`,
    /// read from this file's source, so that a constant added later is
    /// checked without being listed here.
    fn declared_names() -> Vec<(String, String)> {
        let src = include_str!("mod.rs");
        let start = src.find("\npub mod names {").unwrap();
        let body = &src[start..];
        let body = &body[..body.find("\n}\n").unwrap()];
        body.split(';')
            .filter_map(|item| {
                let item = &item[item.find("pub const ")? + "pub const ".len()..];
                let (ident, rest) = item.split_once(':').unwrap();
                let (ty, value) = rest.split_once('=').unwrap();
                assert_eq!(ty.trim(), "&str", "{ident}: names are &str");
                let value = value.trim();
                assert!(
                    value.len() > 2 && value.starts_with('"') && value.ends_with('"'),
                    "{ident}: not a plain string literal: {value}"
                );
                Some((
                    ident.trim().to_owned(),
                    value[1..value.len() - 1].to_owned(),
                ))
            })
            .collect()
    }

    #[test]
    fn no_metric_name_is_declared_twice() {
        use std::collections::{BTreeMap, BTreeSet};

        let declared = declared_names();
        assert!(declared.len() >= 17, "names found: {declared:?}");
        let mut idents = BTreeSet::new();
        let mut values = BTreeMap::new();
        for (ident, value) in &declared {
            assert!(idents.insert(ident.as_str()), "names::{ident} twice");
            let other = values.insert(value.as_str(), ident.as_str());
            assert!(
                other.is_none(),
                "names::{} and names::{ident} are both {value:?}",
                other.unwrap_or_default()
            );
            assert!(value.starts_with("tierd_"), "names::{ident} = {value:?}");
        }
        // The constants read from the source are the ones compiled.
        for (ident, value) in [
            ("REQUESTS", names::REQUESTS),
            ("UPSTREAM_LATENCY", names::UPSTREAM_LATENCY),
            ("CLIENTS_REJECTED", names::CLIENTS_REJECTED),
        ] {
            assert_eq!(values.get(value), Some(&ident));
        }

        // Every metric touched once, then rendered (twice: the second render
        // re-registers the store's per-rule figures).
        let m = Metrics::new();
        m.request();
        m.command_counter(Some("get")).increment(1);
        m.command_counter(None).increment(1);
        m.upstream_error();
        m.invalidated(Source::Write, 1);
        m.invalidated(Source::Tracking, 1);
        m.flushed(Some(Source::Write));
        m.flushed(Some(Source::Tracking));
        m.flushed(None);
        m.client(true);
        m.client_rejected();
        m.write_behind_queue(3);
        m.write_behind_flushed(true);
        m.write_behind_flushed(false);
        m.set_upstream_up(true);
        m.set_tracking_up(true);
        m.set_circuit(true, 2);
        m.upstream_latency
            .record(std::time::Duration::from_micros(100));
        let (runs, keys) = m.warm_counters("users");
        runs.increment(1);
        keys.increment(3);
        let rules = [stats("users", 1), stats("orders", 2)];
        m.render(&rules, 1 << 20);
        let text = m.render(&rules, 1 << 20);

        let mut types: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut helps: BTreeMap<&str, usize> = BTreeMap::new();
        let mut sampled = BTreeSet::new();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                types.entry(name).or_default().push(kind);
            } else if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap();
                assert!(!help.trim().is_empty(), "empty HELP for {name}");
                *helps.entry(name).or_default() += 1;
            } else {
                assert!(!line.starts_with('#'), "{line}");
                let end = line.find(['{', ' ']).unwrap();
                sampled.insert(&line[..end]);
            }
        }
        let declared: BTreeSet<&str> = values.keys().copied().collect();
        for (name, kinds) in &types {
            assert_eq!(kinds.len(), 1, "{name} has TYPE lines {kinds:?}:\n{text}");
            assert!(
                declared.contains(name),
                "{name} is rendered but not declared in `names`:\n{text}"
            );
            assert_eq!(
                helps.get(name),
                Some(&1),
                "{name} needs exactly one HELP line (see describe()):\n{text}"
            );
            // Prometheus conventions: counters, and only counters, end in
            // `_total`.
            assert_eq!(
                kinds[0] == "counter",
                name.ends_with("_total"),
                "{name} is a {}",
                kinds[0]
            );
        }
        for name in &declared {
            assert!(
                types.contains_key(name),
                "{name} did not render: touch it in this test\n{text}"
            );
        }
        assert_eq!(
            helps.keys().copied().collect::<BTreeSet<_>>(),
            declared,
            "HELP lines"
        );
        // Every sample belongs to a declared family (a histogram's series
        // carry the suffixes `_bucket`, `_sum` and `_count`).
        for sample in sampled {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|suffix| {
                    let base = sample.strip_suffix(suffix)?;
                    (types.get(base)? == &["histogram"]).then_some(base)
                })
                .unwrap_or(sample);
            assert!(
                types.contains_key(family),
                "{sample} has no TYPE line:\n{text}"
            );
        }
    }
}
