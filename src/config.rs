//! Configuration: `proxy.toml` plus command-line overrides, turned into one
//! validated [`Config`].
//!
//! Loading has two steps, as in sozu. First the file is deserialized into a raw
//! `FileConfig` in which every value is an `Option`, so "absent" is still
//! visible. Then command-line [`Overrides`] replace file values, and validation
//! resolves every default and checks every value, producing a [`Config`] with no
//! `Option` left for defaulted values. Overrides go in *before* validation so that
//! a bad `--listen` is reported exactly like a bad `listen`. Every validation
//! error names its field (a dotted path such as `upstream.pool_size`, or the
//! flag) and says how to fix it; a `[[rules]]` field is named by the rule's
//! 0-based position, as in `rules[2].ttl`. This module owns the config types
//! and the parsing of durations, sizes and upstream URLs, and compiles rule
//! patterns and tag templates with [`crate::cache::glob`] and
//! [`crate::cache::template`], which are pure code. It must not open
//! sockets, read environment variables or install logging: it turns text into
//! values, and `main.rs` decides what to do with them (including what
//! `RUST_LOG` means).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::cache::glob::Glob;
use crate::cache::template::TagTemplate;

const KB: usize = 1024;
const MB: usize = 1024 * KB;
const GB: usize = 1024 * MB;

// ---------------------------------------------------------------------------
// Validated configuration
// ---------------------------------------------------------------------------

/// Default client listen address: loopback only, next to Redis's own 6379, so
/// a fresh install exposes nothing to the network.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 6380);
/// Default `threads`: one event-loop thread. tierd is bound by system calls
/// and wake-ups, not by its own CPU, and one thread measured faster than a
/// work-stealing pool on the 2-core reference machine (docs/benchmarks.md).
/// A file value of 0 means one worker thread per core.
pub const DEFAULT_THREADS: usize = 1;
/// Largest accepted `threads`. Far beyond any useful value; a larger number is
/// almost certainly a typo, and each thread costs a stack.
pub const MAX_THREADS: usize = 1024;
/// Default `max_clients`, Redis's own `maxclients` default.
pub const DEFAULT_MAX_CLIENTS: usize = 10_000;
/// Default `idle_timeout`: zero, which turns idle disconnection off (Redis's
/// `timeout 0`).
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::ZERO;
/// Default `shutdown_timeout`: how long in-flight replies may take to drain
/// after SIGTERM before connections are dropped.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest duration accepted anywhere (36500 days). Larger values are typos,
/// and they would overflow `Instant + Duration` arithmetic in the tasks that use
/// them.
pub const MAX_DURATION: Duration = Duration::from_secs(36_500 * 86_400);

/// The validated configuration: every default resolved, every value checked.
///
/// Build it with [`Config::load`] or [`Config::from_toml_str`]; the fields are
/// public so that tests can also construct or adjust one directly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// Address clients connect to (`listen`). Port 0 picks a free port.
    pub listen: SocketAddr,
    /// Tokio worker threads (`threads`). A file value of 0 is resolved to the
    /// number of cores during validation, so this is always at least 1.
    pub threads: usize,
    /// Most clients connected at once (`max_clients`); at least 1.
    pub max_clients: usize,
    /// Close a client connection idle for this long (`idle_timeout`). Zero
    /// means never.
    pub idle_timeout: Duration,
    /// How long shutdown waits for in-flight requests (`shutdown_timeout`).
    pub shutdown_timeout: Duration,
    /// The `[upstream]` section.
    pub upstream: UpstreamConfig,
    /// The `[limits]` section.
    pub limits: Limits,
    /// The `[log]` section.
    pub log: LogConfig,
    /// The `[l1]` section.
    pub l1: L1Config,
    /// The `[invalidation]` section.
    pub invalidation: InvalidationConfig,
    /// The `[metrics]` section.
    pub metrics: MetricsConfig,
    /// The `[write_behind]` section.
    pub write_behind: WriteBehindConfig,
    /// The `[warming]` section.
    pub warming: WarmingConfig,
    /// The `[[rules]]` entries, in file order: the first rule whose pattern
    /// matches a key decides how that key is cached. A key that matches no
    /// rule is not cached. Empty by default.
    pub rules: Vec<RuleConfig>,
}

/// Default `upstream.url`.
pub const DEFAULT_UPSTREAM_URL: &str = "redis://127.0.0.1:6379";
/// Host of [`DEFAULT_UPSTREAM_URL`].
pub const DEFAULT_UPSTREAM_HOST: &str = "127.0.0.1";
/// Port used when an upstream URL names none: Redis's default port.
pub const DEFAULT_UPSTREAM_PORT: u16 = 6379;
/// Default `upstream.pool_size`. Two multiplexed connections keep one busy
/// socket from serializing every client while costing Redis almost nothing.
pub const DEFAULT_POOL_SIZE: usize = 2;
/// Accepted `upstream.pool_size` values. Each connection is pipelined, so past
/// a few dozen more connections only add upstream load.
pub const POOL_SIZE_RANGE: RangeInclusive<usize> = 1..=64;
/// Default `upstream.connect_timeout`.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Default `upstream.command_timeout`.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Default `upstream.backoff_min`.
pub const DEFAULT_BACKOFF_MIN: Duration = Duration::from_millis(50);
/// Default `upstream.backoff_max`.
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Default `upstream.failure_threshold`: three failures in a row (timeouts,
/// connects that fail or time out) open the circuit breaker.
pub const DEFAULT_FAILURE_THRESHOLD: usize = 3;
/// Accepted `upstream.failure_threshold` values.
pub const FAILURE_THRESHOLD_RANGE: RangeInclusive<usize> = 1..=1000;
/// Default `upstream.reset`: how long an open breaker fails fast before it
/// lets requests through again as probes.
pub const DEFAULT_BREAKER_RESET: Duration = Duration::from_secs(30);
/// Default `write_behind.flush`.
pub const DEFAULT_WRITE_BEHIND_FLUSH: Duration = Duration::from_millis(5);
/// Default `write_behind.max_queue`.
pub const DEFAULT_WRITE_BEHIND_QUEUE: usize = 10_000;
/// Accepted `write_behind.max_queue` values.
pub const WRITE_BEHIND_QUEUE_RANGE: RangeInclusive<usize> = 1..=1_000_000;
/// Default `warming.rate`, keys per second over all warming.
pub const DEFAULT_WARMING_RATE: usize = 5_000;
/// Accepted `warming.rate` values.
pub const WARMING_RATE_RANGE: RangeInclusive<usize> = 1..=1_000_000;
/// Default `warming.hot_interval`.
pub const DEFAULT_HOT_INTERVAL: Duration = Duration::from_secs(10);
/// Default `warming.hot_keys`.
pub const DEFAULT_HOT_KEYS: usize = 1_000;
/// Accepted `warming.hot_keys` values.
pub const HOT_KEYS_RANGE: RangeInclusive<usize> = 1..=100_000;
/// Default `rules[N].warm.limit`.
pub const DEFAULT_WARM_LIMIT: usize = 1_000;
/// Accepted `rules[N].warm.limit` values.
pub const WARM_LIMIT_RANGE: RangeInclusive<usize> = 1..=1_000_000;

/// The `[upstream]` section: where Redis is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The upstream Redis (`upstream.url`).
    pub url: UpstreamUrl,
    /// Multiplexed connections per protocol version and per authenticated
    /// identity (`upstream.pool_size`),
    /// within [`POOL_SIZE_RANGE`].
    pub pool_size: usize,
    /// Give up on a TCP connect (and handshake) after this long; never zero.
    pub connect_timeout: Duration,
    /// When a request sees no reply bytes for this long, its connection fails
    /// (every request on it gets the error) and reconnects; blocking commands
    /// and pub/sub are exempt. Never zero.
    pub command_timeout: Duration,
    /// First reconnect delay after a lost connection; never zero.
    pub backoff_min: Duration,
    /// Cap of the doubling reconnect delay; at least `backoff_min`.
    pub backoff_max: Duration,
    /// Consecutive failures (command timeouts, connects that fail or time out)
    /// that open the circuit breaker (`upstream.failure_threshold`); within
    /// [`FAILURE_THRESHOLD_RANGE`].
    pub failure_threshold: usize,
    /// How long an open breaker fails fast before it lets requests through
    /// as probes (`upstream.reset`); never zero. A successful reconnect
    /// ends it sooner.
    pub reset: Duration,
}

/// The `[write_behind]` section: the queue of rules with
/// `write = "behind"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteBehindConfig {
    /// Queued writes go to Redis within this long (`write_behind.flush`),
    /// in pipelined batches; never zero.
    pub flush: Duration,
    /// Most writes queued at once (`write_behind.max_queue`); a full queue
    /// holds further writes back until it drains. Within
    /// [`WRITE_BEHIND_QUEUE_RANGE`]. A crash loses at most this many.
    pub max_queue: usize,
}

impl Default for WriteBehindConfig {
    fn default() -> WriteBehindConfig {
        WriteBehindConfig {
            flush: DEFAULT_WRITE_BEHIND_FLUSH,
            max_queue: DEFAULT_WRITE_BEHIND_QUEUE,
        }
    }
}

/// The `[warming]` section: how fast rules with `warm` are warmed, and the
/// hot sets instances record for each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmingConfig {
    /// Most keys loaded per second, over all warming (`warming.rate`);
    /// within [`WARMING_RATE_RANGE`].
    pub rate: usize,
    /// How often each instance records its hottest keys per warmed rule in
    /// Redis (`warming.hot_interval`); zero records none.
    pub hot_interval: Duration,
    /// Most keys recorded per rule (`warming.hot_keys`); within
    /// [`HOT_KEYS_RANGE`].
    pub hot_keys: usize,
}

impl Default for WarmingConfig {
    fn default() -> WarmingConfig {
        WarmingConfig {
            rate: DEFAULT_WARMING_RATE,
            hot_interval: DEFAULT_HOT_INTERVAL,
            hot_keys: DEFAULT_HOT_KEYS,
        }
    }
}

/// An upstream Redis address, parsed from a `redis://` URL.
///
/// `Display` prints the URL back with the password replaced by `***`, and
/// `Debug` redacts it the same way, so neither can leak it into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamUrl {
    /// Host name or IP address, without brackets even for IPv6 (`::1`), so it
    /// can go straight into `TcpStream::connect((host, port))`.
    pub host: String,
    /// TCP port; [`DEFAULT_UPSTREAM_PORT`] when the URL names none.
    pub port: u16,
    /// ACL user for `AUTH user pass`, percent-decoded. Only set together with
    /// a password.
    pub username: Option<String>,
    /// Password for `AUTH`, percent-decoded.
    pub password: Option<String>,
    /// Database to `SELECT`, from the URL path (`/3`); 0 when absent.
    pub db: u32,
}

/// Default `limits.proto_max_bulk_len`, Redis's `proto-max-bulk-len`.
pub const DEFAULT_PROTO_MAX_BULK_LEN: usize = 512 * MB;
/// Default `limits.max_args`: Redis's cap on arguments per request.
pub const DEFAULT_MAX_ARGS: usize = 1024 * 1024;
/// Default `limits.max_inline_len`, Redis's `PROTO_INLINE_MAX_SIZE`.
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * KB;
/// Default `limits.query_buffer_limit`, Redis's `client-query-buffer-limit`.
pub const DEFAULT_QUERY_BUFFER_LIMIT: usize = GB;
/// Default `limits.max_reply_depth`. Real replies nest a few levels; 128 is
/// generous and still far from overflowing a worker stack.
pub const DEFAULT_MAX_REPLY_DEPTH: usize = 128;
/// Accepted `limits.max_reply_depth` values. The reply framer recurses, so the
/// ceiling keeps a hostile or broken upstream from exhausting a stack.
pub const MAX_REPLY_DEPTH_RANGE: RangeInclusive<usize> = 1..=1024;

/// The `[limits]` section: hard caps on what clients and upstream may send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest bulk string in a client request, in bytes.
    pub proto_max_bulk_len: usize,
    /// Most arguments in one client request.
    pub max_args: usize,
    /// Longest inline (non-RESP) command line, in bytes.
    pub max_inline_len: usize,
    /// Most unparsed bytes buffered per client; at least `max_inline_len` and
    /// `proto_max_bulk_len`.
    pub query_buffer_limit: usize,
    /// Deepest nesting accepted when framing upstream replies, within
    /// [`MAX_REPLY_DEPTH_RANGE`].
    pub max_reply_depth: usize,
}

/// Default `log.level`.
pub const DEFAULT_LOG_LEVEL: &str = "info";
/// Default `log.format`.
pub const DEFAULT_LOG_FORMAT: LogFormat = LogFormat::Text;

/// The `[log]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    /// A `tracing` `EnvFilter` directive string (`info`, `tierd=debug,warn`).
    /// Already checked to parse. `RUST_LOG`, when set, wins over it at startup.
    pub level: String,
    /// Output format.
    pub format: LogFormat,
}

/// Log output format (`log.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (`"text"`).
    Text,
    /// One JSON object per line (`"json"`), for log shippers.
    Json,
}

impl LogFormat {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            LogFormat::Text => "text",
            LogFormat::Json => "json",
        }
    }
}

/// Default `l1.max_memory`: room for a useful working set without surprising
/// anyone who runs tierd next to Redis on the same host.
pub const DEFAULT_L1_MAX_MEMORY: u64 = 512 * MB as u64;
/// Smallest accepted `l1.max_memory`. Below it the store's per-entry
/// overhead and its sharding leave too little room to cache anything useful,
/// and a smaller value is almost always a missing unit (`1024` is bytes).
pub const MIN_L1_MAX_MEMORY: u64 = MB as u64;
/// Default `l1.max_value_size`. Larger replies are rare, evict many small
/// entries at once and are cheap to fetch relative to their size.
pub const DEFAULT_L1_MAX_VALUE_SIZE: u64 = MB as u64;
/// Default `l1.sweep_interval`. Expired entries are never served (each
/// lookup checks the deadline); the sweep only gives their memory back.
pub const DEFAULT_L1_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Default `l1.coalesce`: identical reads that miss L1 at the same time
/// share one upstream request.
pub const DEFAULT_L1_COALESCE: bool = true;

/// The `[l1]` section: the in-process tier as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct L1Config {
    /// Global byte cap of the L1 store (`l1.max_memory`), including the caps
    /// rules reserve with their own `max_memory`; at least
    /// [`MIN_L1_MAX_MEMORY`].
    pub max_memory: u64,
    /// Replies longer than this many bytes are not cached
    /// (`l1.max_value_size`); above 0 and at most `max_memory`.
    pub max_value_size: u64,
    /// How often expired entries are swept out (`l1.sweep_interval`); never
    /// zero.
    pub sweep_interval: Duration,
    /// Whether identical cacheable reads that miss L1 while one of them is
    /// already upstream wait for that one's reply instead of sending their
    /// own (`l1.coalesce`).
    pub coalesce: bool,
}

/// Default `invalidation.tracking`.
pub const DEFAULT_TRACKING: TrackingMode = TrackingMode::Default;
/// Default `invalidation.bus`: on, because instances of a fleet share one
/// `proxy.toml`, and one that stays off the bus serves what the others
/// invalidated.
pub const DEFAULT_BUS: bool = true;
/// Default `invalidation.channel`.
pub const DEFAULT_BUS_CHANNEL: &str = "tierd:invalidate";
/// Default `invalidation.prefix`.
pub const DEFAULT_KEY_PREFIX: &str = "tierd:";
/// Longest accepted `invalidation.channel` and `invalidation.prefix`, in
/// bytes. The channel names every bus message and the prefix starts every
/// key tierd writes, so a longer one only costs bandwidth and memory.
pub const MAX_BUS_NAME_LEN: usize = 256;

/// The `[invalidation]` section: how L1 learns about writes, and how
/// instances tell each other about theirs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidationConfig {
    /// How Redis's CLIENT TRACKING is used (`invalidation.tracking`).
    pub tracking: TrackingMode,
    /// Whether this instance joins the invalidation bus
    /// (`invalidation.bus`): it subscribes to `channel`, publishes what it
    /// invalidates (keys written through it, tag, pattern and key
    /// invalidations, flushes) once and batched, and applies what the others
    /// publish. The bus runs only when some rule caches something.
    pub bus: bool,
    /// The pub/sub channel of the bus (`invalidation.channel`): not empty,
    /// at most [`MAX_BUS_NAME_LEN`] bytes, no control characters.
    pub channel: String,
    /// The prefix of the keys tierd keeps in Redis for itself
    /// (`invalidation.prefix`), such as tag sets `{prefix}tag:{tag}` and the
    /// reverse index `{prefix}keytags:{key}`: not empty, at most
    /// [`MAX_BUS_NAME_LEN`] bytes.
    pub prefix: String,
}

/// How tierd asks Redis to report writes it did not make itself
/// (`invalidation.tracking`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackingMode {
    /// Default-mode tracking with `OPTIN` on the pooled connections,
    /// redirected to one tracking connection (`"default"`). Redis remembers
    /// only the keys tierd cached, up to its `tracking-table-max-keys`; past
    /// that it sends invalidations for keys that did not change.
    Default,
    /// Broadcast tracking with each rule's literal prefix (`"bcast"`). It
    /// costs Redis no memory, but every write to a matching key sends an
    /// invalidation to every tierd, cached or not.
    Bcast,
    /// No tracking (`"off"`): only writes through this tierd invalidate.
    /// Writes that bypass it leave L1 stale for up to the rule's `ttl`.
    Off,
}

impl TrackingMode {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            TrackingMode::Default => "default",
            TrackingMode::Bcast => "bcast",
            TrackingMode::Off => "off",
        }
    }
}

/// Default `metrics.listen`: loopback only, like [`DEFAULT_LISTEN`], so a
/// fresh install exposes nothing; port 9121 as the issue that introduced
/// the listener named it.
pub const DEFAULT_METRICS_LISTEN: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9121);
/// Default `metrics.hit_rate_warning`: an L1 hit rate below 80% degrades
/// `/health`.
pub const DEFAULT_HIT_RATE_WARNING: Fraction = Fraction(0.80);
/// Default `metrics.hit_rate_critical`: below 60% is unhealthy.
pub const DEFAULT_HIT_RATE_CRITICAL: Fraction = Fraction(0.60);
/// Default `metrics.error_rate_warning`: more than 1% of requests answered
/// with "upstream unavailable" degrades `/health`.
pub const DEFAULT_ERROR_RATE_WARNING: Fraction = Fraction(0.01);
/// Default `metrics.error_rate_critical`: above 5% is unhealthy.
pub const DEFAULT_ERROR_RATE_CRITICAL: Fraction = Fraction(0.05);
/// Default `metrics.latency_warning`: an upstream `PING` slower than 10 ms
/// degrades `/health`.
pub const DEFAULT_LATENCY_WARNING: Duration = Duration::from_millis(10);
/// Default `metrics.latency_critical`: slower than 50 ms is unhealthy.
pub const DEFAULT_LATENCY_CRITICAL: Duration = Duration::from_millis(50);
/// Default `metrics.memory_warning`: upstream memory above 80% of its
/// `maxmemory` degrades `/health`.
pub const DEFAULT_MEMORY_WARNING: Fraction = Fraction(0.80);
/// Default `metrics.memory_critical`: above 95% is unhealthy.
pub const DEFAULT_MEMORY_CRITICAL: Fraction = Fraction(0.95);
/// Default `metrics.probe_interval`: how often upstream is probed.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// Default `metrics.window`: the span the rates in `/health` cover.
pub const DEFAULT_HEALTH_WINDOW: Duration = Duration::from_secs(60);
/// Default `metrics.min_samples`: fewer L1 lookups (or requests) than this
/// in the window, and the hit rate (or error rate) is reported but not
/// judged.
pub const DEFAULT_MIN_SAMPLES: u64 = 100;

/// The `[metrics]` section: the HTTP listener for `/metrics`, `/health` and
/// `/ready`, and the thresholds `/health` judges by. Each measure has a
/// warning level (the status becomes `degraded`) and a critical one
/// (`unhealthy`); for the hit rate lower is worse, for the others higher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsConfig {
    /// Where the HTTP listener binds (`metrics.listen`); `None` when the file
    /// sets `""`, which turns the listener and the upstream prober off.
    /// Port 0 picks a free port.
    pub listen: Option<SocketAddr>,
    /// L1 hit rate below which `/health` warns; at least
    /// `hit_rate_critical`.
    pub hit_rate_warning: Fraction,
    /// L1 hit rate below which `/health` is critical.
    pub hit_rate_critical: Fraction,
    /// Share of requests answered with "upstream unavailable" above which
    /// `/health` warns; at most `error_rate_critical`.
    pub error_rate_warning: Fraction,
    /// The same share above which `/health` is critical.
    pub error_rate_critical: Fraction,
    /// Upstream `PING` round trip above which `/health` warns; never zero,
    /// at most `latency_critical`.
    pub latency_warning: Duration,
    /// Round trip above which `/health` is critical; never zero.
    pub latency_critical: Duration,
    /// Upstream memory use (of `maxmemory`, or of the host's memory when
    /// Redis has no `maxmemory`) above which `/health` warns; at most
    /// `memory_critical`.
    pub memory_warning: Fraction,
    /// Memory use above which `/health` is critical.
    pub memory_critical: Fraction,
    /// How often the prober sends `PING` and `INFO memory` upstream; never
    /// zero.
    pub probe_interval: Duration,
    /// The span the hit rate, error rate and average latency in `/health`
    /// are computed over; at least `probe_interval`.
    pub window: Duration,
    /// The hit rate is judged only over at least this many L1 lookups in the
    /// window, and the error rate over at least this many requests: a cold
    /// or quiet tierd is not unhealthy for two misses out of three.
    pub min_samples: u64,
}

/// A number from 0 to 1 inclusive: a rate or a share. Never NaN, which is
/// what makes it [`Eq`] (and so lets [`Config`] stay comparable).
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fraction(f64);

impl Eq for Fraction {}

impl Fraction {
    /// `value` if it lies in 0..=1; `None` otherwise, and for NaN.
    pub fn new(value: f64) -> Option<Fraction> {
        (0.0..=1.0).contains(&value).then_some(Fraction(value))
    }

    /// The value, from 0 to 1.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl fmt::Display for Fraction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Most `[[rules]]` entries accepted. A cache entry names its rule in 16
/// bits (the store's `MAX_RULES`); far fewer is already hard to read.
pub const MAX_RULES: usize = u16::MAX as usize;
/// Default `rules[N].cache`.
pub const DEFAULT_RULE_CACHE: bool = true;
/// Default `rules[N].negative`: a nil reply ("no such key") is as worth
/// caching as a value, and invalidation covers keys that come into being.
pub const DEFAULT_RULE_NEGATIVE: bool = true;
/// Most `tags` on one rule. Every tagged write updates one Redis set per
/// tag, so a long list multiplies the cost of writes; real rules need a few.
pub const MAX_RULE_TAGS: usize = 32;
/// Default `rules[N].compress.upstream`: compressed values are stored
/// compressed in Redis too, which is where the memory and network savings
/// are.
pub const DEFAULT_COMPRESS_UPSTREAM: bool = true;
/// Default `rules[N].stampede.lease`: how long a loader may take before
/// another reader is made loader in its place.
pub const DEFAULT_STAMPEDE_LEASE: Duration = Duration::from_secs(5);
/// Default `rules[N].stampede.wait`: how long a reader waits for a loader.
pub const DEFAULT_STAMPEDE_WAIT: Duration = Duration::from_secs(2);

/// One `[[rules]]` entry, in file order (first match wins). Validation
/// errors name a rule by its 0-based position in the file: `rules[0].ttl` is
/// the `ttl` of the first `[[rules]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleConfig {
    /// The rule's name (`name`), for metrics labels and `CACHE.STATS`.
    /// Defaults to the pattern as written; unique across rules.
    pub name: String,
    /// The keys the rule covers (`match` in the file): a Redis glob with
    /// `{name}` captures.
    pub pattern: Glob,
    /// How long an entry may live in L1 (`ttl`). An entry also never outlives
    /// its key's remaining upstream TTL. Above zero when `cache` is true;
    /// `Duration::ZERO` for a rule with `cache = false`.
    pub ttl: Duration,
    /// The rule's own byte cap (`max_memory`), reserved out of
    /// [`L1Config::max_memory`]; `None` shares what the capped rules leave.
    /// Above 0, and all rules' caps add up to at most `l1.max_memory`.
    pub max_memory: Option<u64>,
    /// Whether matching keys are cached at all (`cache`). `false` keeps them
    /// out of L1, for sensitive keys; such a rule has no `ttl`, no
    /// `max_memory` and `negative` false.
    pub cache: bool,
    /// Whether nil replies for matching keys are cached (`negative`). Always
    /// false when `cache` is false.
    pub negative: bool,
    /// The tags of matching keys (`tags`), templates over the pattern's
    /// captures; at most [`MAX_RULE_TAGS`]. Tags are about invalidating in
    /// Redis, not about L1, so a `cache = false` rule may have them too.
    pub tags: Vec<TagTemplate>,
    /// Transparent lz4 compression of matching keys' string values
    /// (`compress`); `None` compresses nothing. A `cache = false` rule may
    /// compress in Redis, but never has `upstream = false`.
    pub compress: Option<CompressConfig>,
    /// Stampede protection with Redis-held leases (`stampede`); `None`
    /// answers a nil read at once, as Redis does.
    pub stampede: Option<StampedeConfig>,
    /// Background refresh of entries read late in their life
    /// (`refresh_ahead`); `None` lets them expire.
    pub refresh_ahead: Option<RefreshAhead>,
    /// How long past its ttl an entry is kept, to be served while the
    /// circuit breaker is open (`stale_ttl`); `None` keeps nothing past it.
    pub stale_ttl: Option<Duration>,
    /// What a write of a matching key through tierd does to L1 (`write`).
    pub write: WriteStrategy,
    /// Loading matching keys into L1 ahead of reads (`warm`); `None` warms
    /// nothing.
    pub warm: Option<WarmConfig>,
}

/// A rule's `write`: what a write of a matching key through tierd does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteStrategy {
    /// `"invalidate"` (the default): drops the key from L1.
    Invalidate,
    /// `"through"`: once Redis acknowledged it, L1 holds the written value.
    Through,
    /// `"behind"`: acknowledged once queued; the queue flushes to Redis
    /// within `[write_behind] flush`. A crash loses what is queued.
    Behind,
}

impl WriteStrategy {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            WriteStrategy::Invalidate => "invalidate",
            WriteStrategy::Through => "through",
            WriteStrategy::Behind => "behind",
        }
    }
}

/// A rule's `warm = { on_startup = true, interval = "30m", limit = 1000 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WarmConfig {
    /// Warm when tierd starts (`on_startup`, default true), while it
    /// already serves.
    pub on_startup: bool,
    /// Warm again this often (`interval`); `None` never does.
    pub interval: Option<Duration>,
    /// Most keys one warming loads for the rule (`limit`); within
    /// [`WARM_LIMIT_RANGE`].
    pub limit: usize,
    /// Load the keys instances recorded as hottest first (`hot`, default
    /// true).
    pub hot: bool,
    /// Then keys matching the rule, found with `SCAN` (`scan`, default
    /// true).
    pub scan: bool,
}

/// A rule's `stampede = { lease = "5s", wait = "2s", on_timeout = "nil" }`:
/// when a read of a matching key finds nothing upstream, one reader (across
/// every tierd instance) gets the nil and a lease on the key in Redis, and
/// is expected to load the value and write it; the others wait inside tierd
/// for that write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StampedeConfig {
    /// How long the lease lives in Redis (`lease`): if its holder never
    /// writes the key, the next reader after this becomes the loader.
    /// Above zero.
    pub lease: Duration,
    /// How long a reader waits for the loader's write (`wait`). Above zero.
    pub wait: Duration,
    /// What a reader gets when `wait` runs out (`on_timeout`).
    pub on_timeout: OnTimeout,
}

/// What a reader that waited `stampede.wait` for a loader in vain gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnTimeout {
    /// The nil its read got (`"nil"`, the default): it may load itself.
    Nil,
    /// A `-TRYAGAIN` error (`"error"`).
    Error,
}

impl OnTimeout {
    /// The name used in the configuration file.
    pub fn as_str(self) -> &'static str {
        match self {
            OnTimeout::Nil => "nil",
            OnTimeout::Error => "error",
        }
    }
}

/// A rule's `refresh_ahead`: when an L1 hit comes late in its entry's life,
/// the reply is refreshed from upstream in the background while the entry
/// keeps being served.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RefreshAhead {
    /// `refresh_ahead = 0.8`: a hit after this fraction of the entry's life
    /// refreshes it. Strictly between 0 and 1.
    Ratio(f64),
    /// `refresh_ahead = { beta = 1.0 }`: probabilistic early refresh
    /// (XFetch, Vattani et al. 2015): a hit refreshes when
    /// `now - delta * beta * ln(rand) >= expiry`, `delta` being how long
    /// the entry's upstream read took. Above zero; larger refreshes earlier.
    XFetch {
        /// How eagerly to refresh.
        beta: f64,
    },
}

// Validation admits only finite numbers, for which equality is total.
impl Eq for RefreshAhead {}

/// A rule's `compress = { threshold = "1kb", upstream = true }`: string
/// values of matching keys are stored lz4-compressed behind a small header
/// (see [`crate::cache::compress`]) when that saves at least 10%, and
/// restored on the way out, so clients see exactly what they wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CompressConfig {
    /// Values of at least this many bytes are compressed (`threshold`);
    /// above 0 and at most [`L1Config::max_value_size`], above which values
    /// are always stored plain.
    pub threshold: u64,
    /// Whether values are stored compressed in Redis too (`upstream`,
    /// default [`DEFAULT_COMPRESS_UPSTREAM`]). `false` compresses only the
    /// L1 copy: Redis keeps the plain bytes, so clients and scripts that
    /// bypass tierd see them as written.
    pub upstream: bool,
}

/// Values given on the command line. Each one replaces the matching file value
/// before validation.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    /// `--listen`, replaces `listen`.
    pub listen: Option<String>,
    /// `--upstream`, replaces `upstream.url`.
    pub upstream: Option<String>,
    /// `--log-level`, replaces `log.level`.
    pub log_level: Option<String>,
    /// `--metrics-listen`, replaces `metrics.listen` (`""` turns the
    /// listener off).
    pub metrics_listen: Option<String>,
}

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        /// The file that was asked for.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the wrong
    /// type. The message is toml's, with line, column and the offending key.
    #[error("{message}")]
    Parse {
        /// toml's error text, including line and column.
        message: String,
    },
    /// A value is well-formed but not acceptable.
    #[error("{field}: {message}")]
    Invalid {
        /// Dotted path of the field (`upstream.pool_size`), or the
        /// command-line flag (`--listen`) when the value came from one.
        field: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

impl ConfigError {
    /// The field an [`ConfigError::Invalid`] error names, if it is one.
    pub fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { field, .. } => Some(field),
            ConfigError::Io { .. } | ConfigError::Parse { .. } => None,
        }
    }
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.to_owned(),
        message: message.into(),
    }
}

impl Default for Config {
    /// The configuration an empty file gives.
    fn default() -> Config {
        Config {
            listen: DEFAULT_LISTEN,
            threads: resolve_threads(DEFAULT_THREADS),
            max_clients: DEFAULT_MAX_CLIENTS,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            shutdown_timeout: DEFAULT_SHUTDOWN_TIMEOUT,
            upstream: UpstreamConfig::default(),
            limits: Limits::default(),
            log: LogConfig::default(),
            l1: L1Config::default(),
            invalidation: InvalidationConfig::default(),
            metrics: MetricsConfig::default(),
            write_behind: WriteBehindConfig::default(),
            warming: WarmingConfig::default(),
            rules: Vec::new(),
        }
    }
}

impl Default for UpstreamConfig {
    fn default() -> UpstreamConfig {
        UpstreamConfig {
            url: UpstreamUrl::default(),
            pool_size: DEFAULT_POOL_SIZE,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            command_timeout: DEFAULT_COMMAND_TIMEOUT,
            backoff_min: DEFAULT_BACKOFF_MIN,
            backoff_max: DEFAULT_BACKOFF_MAX,
            failure_threshold: DEFAULT_FAILURE_THRESHOLD,
            reset: DEFAULT_BREAKER_RESET,
        }
    }
}

impl Default for UpstreamUrl {
    /// [`DEFAULT_UPSTREAM_URL`].
    fn default() -> UpstreamUrl {
        UpstreamUrl {
            host: DEFAULT_UPSTREAM_HOST.to_owned(),
            port: DEFAULT_UPSTREAM_PORT,
            username: None,
            password: None,
            db: 0,
        }
    }
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            proto_max_bulk_len: DEFAULT_PROTO_MAX_BULK_LEN,
            max_args: DEFAULT_MAX_ARGS,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
            query_buffer_limit: DEFAULT_QUERY_BUFFER_LIMIT,
            max_reply_depth: DEFAULT_MAX_REPLY_DEPTH,
        }
    }
}

impl Default for LogConfig {
    fn default() -> LogConfig {
        LogConfig {
            level: DEFAULT_LOG_LEVEL.to_owned(),
            format: DEFAULT_LOG_FORMAT,
        }
    }
}

impl Default for L1Config {
    fn default() -> L1Config {
        L1Config {
            max_memory: DEFAULT_L1_MAX_MEMORY,
            max_value_size: DEFAULT_L1_MAX_VALUE_SIZE,
            sweep_interval: DEFAULT_L1_SWEEP_INTERVAL,
            coalesce: DEFAULT_L1_COALESCE,
        }
    }
}

impl Default for InvalidationConfig {
    fn default() -> InvalidationConfig {
        InvalidationConfig {
            tracking: DEFAULT_TRACKING,
            bus: DEFAULT_BUS,
            channel: DEFAULT_BUS_CHANNEL.to_owned(),
            prefix: DEFAULT_KEY_PREFIX.to_owned(),
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> MetricsConfig {
        MetricsConfig {
            listen: Some(DEFAULT_METRICS_LISTEN),
            hit_rate_warning: DEFAULT_HIT_RATE_WARNING,
            hit_rate_critical: DEFAULT_HIT_RATE_CRITICAL,
            error_rate_warning: DEFAULT_ERROR_RATE_WARNING,
            error_rate_critical: DEFAULT_ERROR_RATE_CRITICAL,
            latency_warning: DEFAULT_LATENCY_WARNING,
            latency_critical: DEFAULT_LATENCY_CRITICAL,
            memory_warning: DEFAULT_MEMORY_WARNING,
            memory_critical: DEFAULT_MEMORY_CRITICAL,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            window: DEFAULT_HEALTH_WINDOW,
            min_samples: DEFAULT_MIN_SAMPLES,
        }
    }
}

impl Config {
    /// Parses and validates a TOML document, with `overrides` applied on top.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Parse`] for invalid TOML, unknown keys and wrongly typed
    /// values; [`ConfigError::Invalid`] naming the field for values that are
    /// out of range or malformed.
    pub fn from_toml_str(text: &str, overrides: &Overrides) -> Result<Config, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|err| ConfigError::Parse {
            // toml's Display already carries line, column and a caret excerpt;
            // trim the trailing newline so callers can prefix a path cleanly.
            message: err.to_string().trim_end().to_owned(),
        })?;
        file.validate(overrides)
    }

    /// Reads and validates the file at `path`, with `overrides` applied on top.
    /// `None` means no file: the defaults, exactly as an empty file gives them.
    /// A `proxy.toml` in the working directory is never picked up implicitly.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Io`] when the file cannot be read, and everything
    /// [`Config::from_toml_str`] returns.
    pub fn load(path: Option<&Path>, overrides: &Overrides) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        Config::from_toml_str(&text, overrides)
    }

    /// The effective configuration as a TOML document that
    /// [`Config::from_toml_str`] accepts again. `threads` shows the resolved
    /// count, and the upstream password, if any, is shown as `***` (a comment at
    /// the top says so), so the output is safe to paste into a bug report.
    /// Every `[[rules]]` entry is written with its resolved name and all its
    /// fields, except those a `cache = false` rule may not have, and a
    /// `max_memory`, `tags` or `compress` the rule does not set.
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        out.push_str(
            "# Effective tierd configuration: the file, command-line overrides and\n\
             # defaults combined. `threads` is the resolved worker count.\n\
             # The upstream password, if any, is replaced by \"***\": put the real\n\
             # one back before using this as a config file.\n\n",
        );
        let duration = |d: Duration| toml_string(&format_duration(d));
        let size = |bytes: u64| toml_string(&format_size(bytes));
        // usize is at most 64 bits on every platform tierd builds for.
        let usize_size = |bytes: usize| size(bytes as u64);
        // toml's float encoder always writes a decimal point, so 1 reads
        // back as the float 1.0.
        let fraction = |f: Fraction| toml::Value::Float(f.get()).to_string();
        let (up, lim, inv, m) = (
            &self.upstream,
            &self.limits,
            &self.invalidation,
            &self.metrics,
        );
        let sections = [
            (
                None,
                vec![
                    ("listen", toml_string(&self.listen.to_string())),
                    ("threads", self.threads.to_string()),
                    ("max_clients", self.max_clients.to_string()),
                    ("idle_timeout", duration(self.idle_timeout)),
                    ("shutdown_timeout", duration(self.shutdown_timeout)),
                ],
            ),
            (
                Some("[upstream]"),
                vec![
                    ("url", toml_string(&up.url.to_string())),
                    ("pool_size", up.pool_size.to_string()),
                    ("connect_timeout", duration(up.connect_timeout)),
                    ("command_timeout", duration(up.command_timeout)),
                    ("backoff_min", duration(up.backoff_min)),
                    ("backoff_max", duration(up.backoff_max)),
                    ("failure_threshold", up.failure_threshold.to_string()),
                    ("reset", duration(up.reset)),
                ],
            ),
            (
                Some("[limits]"),
                vec![
                    ("proto_max_bulk_len", usize_size(lim.proto_max_bulk_len)),
                    ("max_args", lim.max_args.to_string()),
                    ("max_inline_len", usize_size(lim.max_inline_len)),
                    ("query_buffer_limit", usize_size(lim.query_buffer_limit)),
                    ("max_reply_depth", lim.max_reply_depth.to_string()),
                ],
            ),
            (
                Some("[log]"),
                vec![
                    ("level", toml_string(&self.log.level)),
                    ("format", toml_string(self.log.format.as_str())),
                ],
            ),
            (
                Some("[l1]"),
                vec![
                    ("max_memory", size(self.l1.max_memory)),
                    ("max_value_size", size(self.l1.max_value_size)),
                    ("sweep_interval", duration(self.l1.sweep_interval)),
                    ("coalesce", self.l1.coalesce.to_string()),
                ],
            ),
            (
                Some("[invalidation]"),
                vec![
                    ("tracking", toml_string(inv.tracking.as_str())),
                    ("bus", inv.bus.to_string()),
                    ("channel", toml_string(&inv.channel)),
                    ("prefix", toml_string(&inv.prefix)),
                ],
            ),
            (
                Some("[write_behind]"),
                vec![
                    ("flush", duration(self.write_behind.flush)),
                    ("max_queue", self.write_behind.max_queue.to_string()),
                ],
            ),
            (
                Some("[warming]"),
                vec![
                    ("rate", self.warming.rate.to_string()),
                    ("hot_interval", duration(self.warming.hot_interval)),
                    ("hot_keys", self.warming.hot_keys.to_string()),
                ],
            ),
            (
                Some("[metrics]"),
                vec![
                    (
                        "listen",
                        toml_string(&m.listen.map(|a| a.to_string()).unwrap_or_default()),
                    ),
                    ("hit_rate_warning", fraction(m.hit_rate_warning)),
                    ("hit_rate_critical", fraction(m.hit_rate_critical)),
                    ("error_rate_warning", fraction(m.error_rate_warning)),
                    ("error_rate_critical", fraction(m.error_rate_critical)),
                    ("latency_warning", duration(m.latency_warning)),
                    ("latency_critical", duration(m.latency_critical)),
                    ("memory_warning", fraction(m.memory_warning)),
                    ("memory_critical", fraction(m.memory_critical)),
                    ("probe_interval", duration(m.probe_interval)),
                    ("window", duration(m.window)),
                    ("min_samples", m.min_samples.to_string()),
                ],
            ),
        ];
        let rules = self.rules.iter().map(|rule| {
            let mut entries = vec![
                ("name", toml_string(&rule.name)),
                ("match", toml_string(rule.pattern.pattern())),
            ];
            if !rule.tags.is_empty() {
                let tags: Vec<String> = rule.tags.iter().map(|t| toml_string(t.text())).collect();
                entries.push(("tags", format!("[{}]", tags.join(", "))));
            }
            // A rule that caches nothing may not set ttl, max_memory or
            // negative (validation rejects them), so printing them would
            // not read back.
            if rule.cache {
                entries.push(("ttl", duration(rule.ttl)));
                if let Some(cap) = rule.max_memory {
                    entries.push(("max_memory", size(cap)));
                }
            }
            entries.push(("cache", rule.cache.to_string()));
            if rule.cache {
                entries.push(("negative", rule.negative.to_string()));
            }
            if let Some(c) = rule.compress {
                entries.push((
                    "compress",
                    format!(
                        "{{ threshold = {}, upstream = {} }}",
                        size(c.threshold),
                        c.upstream
                    ),
                ));
            }
            if let Some(st) = rule.stampede {
                entries.push((
                    "stampede",
                    format!(
                        "{{ lease = {}, wait = {}, on_timeout = {} }}",
                        duration(st.lease),
                        duration(st.wait),
                        toml_string(st.on_timeout.as_str())
                    ),
                ));
            }
            if rule.cache {
                entries.push(("write", toml_string(rule.write.as_str())));
            }
            if let Some(stale) = rule.stale_ttl {
                entries.push(("stale_ttl", duration(stale)));
            }
            if let Some(w) = rule.warm {
                let interval = w
                    .interval
                    .map(|i| format!(", interval = {}", duration(i)))
                    .unwrap_or_default();
                entries.push((
                    "warm",
                    format!(
                        "{{ on_startup = {}{interval}, limit = {}, hot = {}, scan = {} }}",
                        w.on_startup, w.limit, w.hot, w.scan
                    ),
                ));
            }
            match rule.refresh_ahead {
                Some(RefreshAhead::Ratio(r)) => {
                    entries.push(("refresh_ahead", toml::Value::Float(r).to_string()));
                }
                Some(RefreshAhead::XFetch { beta }) => entries.push((
                    "refresh_ahead",
                    format!("{{ beta = {} }}", toml::Value::Float(beta)),
                )),
                None => {}
            }
            (Some("[[rules]]"), entries)
        });
        for (header, entries) in sections.into_iter().chain(rules) {
            if let Some(header) = header {
                out.push_str(&format!("\n{header}\n"));
            }
            for (key, value) in entries {
                out.push_str(&format!("{key} = {value}\n"));
            }
        }
        out
    }

    /// The client request parser's limits, taken from `[limits]`.
    pub fn parse_limits(&self) -> crate::protocol::ParseLimits {
        crate::protocol::ParseLimits {
            max_bulk_len: self.limits.proto_max_bulk_len,
            max_args: self.limits.max_args,
            max_inline_len: self.limits.max_inline_len,
        }
    }
}

// ---------------------------------------------------------------------------
// Raw file form
// ---------------------------------------------------------------------------

// The raw file form. Every value is optional so validation can tell absent from
// set and fill defaults in one place. Numbers are read as i64 (TOML's integer
// type) rather than usize so that a negative value gets a named validation error
// instead of serde's bare "invalid value" message.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    threads: Option<i64>,
    max_clients: Option<i64>,
    idle_timeout: Option<Scalar>,
    shutdown_timeout: Option<Scalar>,
    #[serde(default)]
    upstream: FileUpstream,
    #[serde(default)]
    limits: FileLimits,
    #[serde(default)]
    log: FileLog,
    #[serde(default)]
    l1: FileL1,
    #[serde(default)]
    invalidation: FileInvalidation,
    #[serde(default)]
    metrics: FileMetrics,
    #[serde(default)]
    write_behind: FileWriteBehind,
    #[serde(default)]
    warming: FileWarming,
    #[serde(default)]
    rules: Vec<FileRule>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWriteBehind {
    flush: Option<Scalar>,
    max_queue: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWarming {
    rate: Option<i64>,
    hot_interval: Option<Scalar>,
    hot_keys: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileWarm {
    on_startup: Option<bool>,
    interval: Option<Scalar>,
    limit: Option<i64>,
    hot: Option<bool>,
    scan: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileUpstream {
    url: Option<String>,
    pool_size: Option<i64>,
    connect_timeout: Option<Scalar>,
    command_timeout: Option<Scalar>,
    backoff_min: Option<Scalar>,
    backoff_max: Option<Scalar>,
    failure_threshold: Option<i64>,
    reset: Option<Scalar>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLimits {
    proto_max_bulk_len: Option<Scalar>,
    max_args: Option<i64>,
    max_inline_len: Option<Scalar>,
    query_buffer_limit: Option<Scalar>,
    max_reply_depth: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileLog {
    level: Option<String>,
    format: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileL1 {
    max_memory: Option<Scalar>,
    max_value_size: Option<Scalar>,
    sweep_interval: Option<Scalar>,
    coalesce: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileInvalidation {
    tracking: Option<String>,
    bus: Option<bool>,
    channel: Option<String>,
    prefix: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileMetrics {
    listen: Option<String>,
    // Fractions are TOML floats; serde also takes an integer (0 or 1) for
    // them.
    hit_rate_warning: Option<f64>,
    hit_rate_critical: Option<f64>,
    error_rate_warning: Option<f64>,
    error_rate_critical: Option<f64>,
    latency_warning: Option<Scalar>,
    latency_critical: Option<Scalar>,
    memory_warning: Option<f64>,
    memory_critical: Option<f64>,
    probe_interval: Option<Scalar>,
    window: Option<Scalar>,
    min_samples: Option<i64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileRule {
    name: Option<String>,
    #[serde(rename = "match")]
    pattern: Option<String>,
    ttl: Option<Scalar>,
    max_memory: Option<Scalar>,
    cache: Option<bool>,
    negative: Option<bool>,
    tags: Option<Vec<String>>,
    compress: Option<FileCompress>,
    stampede: Option<FileStampede>,
    refresh_ahead: Option<FileRefresh>,
    stale_ttl: Option<Scalar>,
    write: Option<String>,
    warm: Option<FileWarm>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileStampede {
    lease: Option<Scalar>,
    wait: Option<Scalar>,
    on_timeout: Option<String>,
}

/// `refresh_ahead = 0.8` or `refresh_ahead = { beta = 1.0 }`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum FileRefresh {
    Ratio(f64),
    XFetch(FileXFetch),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileXFetch {
    beta: f64,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileCompress {
    threshold: Option<Scalar>,
    upstream: Option<bool>,
}

/// A duration or size as written: a string with a unit, or a bare integer
/// (seconds or bytes). Kept raw until validation so that errors can name the
/// field by its full dotted path, which serde's errors cannot.
#[derive(Debug, Clone)]
enum Scalar {
    Int(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Scalar, D::Error> {
        struct ScalarVisitor;

        impl Visitor<'_> for ScalarVisitor {
            type Value = Scalar;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string with a unit such as \"30s\" or \"64kb\", or an integer")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar::Int(v))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                i64::try_from(v)
                    .map(Scalar::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar::Text(v.to_owned()))
            }
        }

        deserializer.deserialize_any(ScalarVisitor)
    }
}

// ---------------------------------------------------------------------------
// Validation
// ---------------------------------------------------------------------------

/// A value and the name to blame if it is bad: the file's dotted path, or the
/// flag when an override supplied it.
fn pick<T>(
    file: Option<T>,
    field: &'static str,
    flag: &'static str,
    over: Option<T>,
) -> (Option<T>, &'static str) {
    match over {
        Some(v) => (Some(v), flag),
        None => (file, field),
    }
}

impl FileConfig {
    fn validate(self, overrides: &Overrides) -> Result<Config, ConfigError> {
        let (listen, listen_field) =
            pick(self.listen, "listen", "--listen", overrides.listen.clone());
        let listen = match listen {
            None => DEFAULT_LISTEN,
            Some(text) => parse_listen(&text).map_err(|msg| invalid(listen_field, msg))?,
        };

        let threads = count("threads", self.threads, DEFAULT_THREADS)?;
        if threads > MAX_THREADS {
            return Err(invalid(
                "threads",
                format!("{threads} worker threads is too many: use at most {MAX_THREADS}, or 0 for one per core"),
            ));
        }

        let max_clients = count("max_clients", self.max_clients, DEFAULT_MAX_CLIENTS)?;
        if max_clients == 0 {
            return Err(invalid(
                "max_clients",
                "must be at least 1 (0 would refuse every client)",
            ));
        }

        let idle_timeout = duration("idle_timeout", self.idle_timeout, DEFAULT_IDLE_TIMEOUT)?;
        let shutdown_timeout = duration(
            "shutdown_timeout",
            self.shutdown_timeout,
            DEFAULT_SHUTDOWN_TIMEOUT,
        )?;

        // Sections in the order they appear in proxy.toml, so that of two
        // bad values the one nearer the top is reported.
        let upstream = self.upstream.validate(overrides)?;
        let limits = self.limits.validate()?;
        let log = self.log.validate(overrides)?;
        let l1 = self.l1.validate()?;
        let invalidation = self.invalidation.validate()?;
        let metrics = self.metrics.validate(overrides)?;
        let write_behind = self.write_behind.validate()?;
        let warming = self.warming.validate()?;
        let rules = validate_rules(self.rules, &l1)?;

        Ok(Config {
            listen,
            threads: resolve_threads(threads),
            max_clients,
            idle_timeout,
            shutdown_timeout,
            upstream,
            limits,
            log,
            l1,
            invalidation,
            metrics,
            write_behind,
            warming,
            rules,
        })
    }
}

impl FileWriteBehind {
    fn validate(self) -> Result<WriteBehindConfig, ConfigError> {
        let flush = duration("write_behind.flush", self.flush, DEFAULT_WRITE_BEHIND_FLUSH)?;
        non_zero("write_behind.flush", flush)?;
        let max_queue = count(
            "write_behind.max_queue",
            self.max_queue,
            DEFAULT_WRITE_BEHIND_QUEUE,
        )?;
        in_range(
            "write_behind.max_queue",
            max_queue,
            &WRITE_BEHIND_QUEUE_RANGE,
        )?;
        Ok(WriteBehindConfig { flush, max_queue })
    }
}

impl FileWarming {
    fn validate(self) -> Result<WarmingConfig, ConfigError> {
        let rate = count("warming.rate", self.rate, DEFAULT_WARMING_RATE)?;
        in_range("warming.rate", rate, &WARMING_RATE_RANGE)?;
        let hot_interval = duration(
            "warming.hot_interval",
            self.hot_interval,
            DEFAULT_HOT_INTERVAL,
        )?;
        let hot_keys = count("warming.hot_keys", self.hot_keys, DEFAULT_HOT_KEYS)?;
        in_range("warming.hot_keys", hot_keys, &HOT_KEYS_RANGE)?;
        Ok(WarmingConfig {
            rate,
            hot_interval,
            hot_keys,
        })
    }
}

impl FileWarm {
    /// The `warm` of `rules[index]`.
    fn validate(self, index: usize) -> Result<WarmConfig, ConfigError> {
        let field = |name: &str| format!("rules[{index}].warm.{name}");
        let interval_field = field("interval");
        let interval = match self.interval {
            None => None,
            raw => {
                let interval = duration(&interval_field, raw, Duration::ZERO)?;
                non_zero(&interval_field, interval)?;
                Some(interval)
            }
        };
        let limit_field = field("limit");
        let limit = count(&limit_field, self.limit, DEFAULT_WARM_LIMIT)?;
        in_range(&limit_field, limit, &WARM_LIMIT_RANGE)?;
        let hot = self.hot.unwrap_or(true);
        let scan = self.scan.unwrap_or(true);
        if !hot && !scan {
            return Err(invalid(
                &field("scan"),
                "and hot are both false, so warming would load nothing: set hot = true (the \
                 keys instances read most), scan = true (keys matching the rule), or both",
            ));
        }
        Ok(WarmConfig {
            on_startup: self.on_startup.unwrap_or(true),
            interval,
            limit,
            hot,
            scan,
        })
    }
}

impl FileUpstream {
    fn validate(self, overrides: &Overrides) -> Result<UpstreamConfig, ConfigError> {
        let (url, url_field) = pick(
            self.url,
            "upstream.url",
            "--upstream",
            overrides.upstream.clone(),
        );
        let url = match url {
            None => UpstreamUrl::default(),
            Some(text) => parse_url(&text).map_err(|msg| invalid(url_field, msg))?,
        };

        let pool_size = count("upstream.pool_size", self.pool_size, DEFAULT_POOL_SIZE)?;
        in_range("upstream.pool_size", pool_size, &POOL_SIZE_RANGE)?;

        let connect_timeout = duration(
            "upstream.connect_timeout",
            self.connect_timeout,
            DEFAULT_CONNECT_TIMEOUT,
        )?;
        non_zero("upstream.connect_timeout", connect_timeout)?;
        let command_timeout = duration(
            "upstream.command_timeout",
            self.command_timeout,
            DEFAULT_COMMAND_TIMEOUT,
        )?;
        non_zero("upstream.command_timeout", command_timeout)?;
        // A zero start would stay zero under doubling and turn reconnecting
        // into a busy loop against a Redis that is already in trouble.
        let backoff_min = duration(
            "upstream.backoff_min",
            self.backoff_min,
            DEFAULT_BACKOFF_MIN,
        )?;
        non_zero("upstream.backoff_min", backoff_min)?;
        let backoff_max = duration(
            "upstream.backoff_max",
            self.backoff_max,
            DEFAULT_BACKOFF_MAX,
        )?;
        if backoff_max < backoff_min {
            return Err(invalid(
                "upstream.backoff_max",
                format!(
                    "{} is less than upstream.backoff_min ({}): raise backoff_max or lower backoff_min",
                    format_duration(backoff_max),
                    format_duration(backoff_min)
                ),
            ));
        }

        let failure_threshold = count(
            "upstream.failure_threshold",
            self.failure_threshold,
            DEFAULT_FAILURE_THRESHOLD,
        )?;
        in_range(
            "upstream.failure_threshold",
            failure_threshold,
            &FAILURE_THRESHOLD_RANGE,
        )?;
        let reset = duration("upstream.reset", self.reset, DEFAULT_BREAKER_RESET)?;
        non_zero("upstream.reset", reset)?;

        Ok(UpstreamConfig {
            url,
            pool_size,
            connect_timeout,
            command_timeout,
            backoff_min,
            backoff_max,
            failure_threshold,
            reset,
        })
    }
}

impl FileLimits {
    fn validate(self) -> Result<Limits, ConfigError> {
        let proto_max_bulk_len = size(
            "limits.proto_max_bulk_len",
            self.proto_max_bulk_len,
            DEFAULT_PROTO_MAX_BULK_LEN,
        )?;
        at_least_one("limits.proto_max_bulk_len", proto_max_bulk_len)?;
        let max_args = count("limits.max_args", self.max_args, DEFAULT_MAX_ARGS)?;
        at_least_one("limits.max_args", max_args)?;
        let max_inline_len = size(
            "limits.max_inline_len",
            self.max_inline_len,
            DEFAULT_MAX_INLINE_LEN,
        )?;
        at_least_one("limits.max_inline_len", max_inline_len)?;
        let query_buffer_limit = size(
            "limits.query_buffer_limit",
            self.query_buffer_limit,
            DEFAULT_QUERY_BUFFER_LIMIT,
        )?;
        // The query buffer holds a whole request before it is parsed, so it
        // must fit the largest inline line and the largest bulk argument, or
        // requests the other limits allow could never complete.
        for (other, value) in [
            ("limits.max_inline_len", max_inline_len),
            ("limits.proto_max_bulk_len", proto_max_bulk_len),
        ] {
            if query_buffer_limit < value {
                return Err(invalid(
                    "limits.query_buffer_limit",
                    format!(
                        "{} is smaller than {other} ({}): raise query_buffer_limit or lower {other}",
                        format_size(query_buffer_limit as u64),
                        format_size(value as u64)
                    ),
                ));
            }
        }
        let max_reply_depth = count(
            "limits.max_reply_depth",
            self.max_reply_depth,
            DEFAULT_MAX_REPLY_DEPTH,
        )?;
        in_range(
            "limits.max_reply_depth",
            max_reply_depth,
            &MAX_REPLY_DEPTH_RANGE,
        )?;

        Ok(Limits {
            proto_max_bulk_len,
            max_args,
            max_inline_len,
            query_buffer_limit,
            max_reply_depth,
        })
    }
}

impl FileLog {
    fn validate(self, overrides: &Overrides) -> Result<LogConfig, ConfigError> {
        let (level, level_field) = pick(
            self.level,
            "log.level",
            "--log-level",
            overrides.log_level.clone(),
        );
        let level = level.unwrap_or_else(|| DEFAULT_LOG_LEVEL.to_owned());
        // An empty filter parses but silences everything, which is never what
        // someone who wrote the key meant.
        if level.trim().is_empty() {
            return Err(invalid(
                level_field,
                "is empty: use a level such as \"info\" or \"tierd=debug,warn\"",
            ));
        }
        if let Err(err) = tracing_subscriber::EnvFilter::try_new(&level) {
            return Err(invalid(
                level_field,
                format!(
                    "{level:?} is not a valid log filter ({err}): use trace, debug, info, warn, error or \
                     directives such as \"tierd=debug,warn\""
                ),
            ));
        }

        let format = match self.format.as_deref() {
            None => DEFAULT_LOG_FORMAT,
            Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(invalid(
                    "log.format",
                    format!("unknown format {other:?}: use \"text\" or \"json\""),
                ));
            }
        };
        Ok(LogConfig { level, format })
    }
}

impl FileL1 {
    fn validate(self) -> Result<L1Config, ConfigError> {
        let max_memory = size_u64("l1.max_memory", self.max_memory, DEFAULT_L1_MAX_MEMORY)?;
        if max_memory < MIN_L1_MAX_MEMORY {
            return Err(invalid(
                "l1.max_memory",
                format!(
                    "{} is too small: use at least {} (a bare integer means bytes; write e.g. \"256mb\")",
                    format_size(max_memory),
                    format_size(MIN_L1_MAX_MEMORY)
                ),
            ));
        }
        let max_value_size = size_u64(
            "l1.max_value_size",
            self.max_value_size,
            DEFAULT_L1_MAX_VALUE_SIZE,
        )?;
        if max_value_size == 0 {
            return Err(invalid(
                "l1.max_value_size",
                "must be greater than zero (0 would cache nothing): use e.g. \"1mb\"; to keep \
                 some keys out of L1, give them a rule with cache = false",
            ));
        }
        if max_value_size > max_memory {
            return Err(invalid(
                "l1.max_value_size",
                format!(
                    "{} is larger than l1.max_memory ({}): lower max_value_size or raise l1.max_memory",
                    format_size(max_value_size),
                    format_size(max_memory)
                ),
            ));
        }
        let sweep_interval = duration(
            "l1.sweep_interval",
            self.sweep_interval,
            DEFAULT_L1_SWEEP_INTERVAL,
        )?;
        non_zero("l1.sweep_interval", sweep_interval)?;
        Ok(L1Config {
            max_memory,
            max_value_size,
            sweep_interval,
            coalesce: self.coalesce.unwrap_or(DEFAULT_L1_COALESCE),
        })
    }
}

impl FileInvalidation {
    fn validate(self) -> Result<InvalidationConfig, ConfigError> {
        let tracking = match self.tracking.as_deref() {
            None => DEFAULT_TRACKING,
            Some("default") => TrackingMode::Default,
            Some("bcast") => TrackingMode::Bcast,
            Some("off") => TrackingMode::Off,
            Some(other) => {
                return Err(invalid(
                    "invalidation.tracking",
                    format!("unknown mode {other:?}: use \"default\", \"bcast\" or \"off\""),
                ));
            }
        };
        let channel = bus_name(
            "invalidation.channel",
            self.channel,
            DEFAULT_BUS_CHANNEL,
            "the pub/sub channel instances share",
        )?;
        if let Some(c) = channel.chars().find(|c| c.is_control()) {
            return Err(invalid(
                "invalidation.channel",
                format!(
                    "{channel:?} contains the control character {c:?}, which is easy to \
                     mistype and hard to see in logs: use printable text, e.g. \
                     \"{DEFAULT_BUS_CHANNEL}\""
                ),
            ));
        }
        let prefix = bus_name(
            "invalidation.prefix",
            self.prefix,
            DEFAULT_KEY_PREFIX,
            "the start of the keys tierd keeps in Redis",
        )?;
        Ok(InvalidationConfig {
            tracking,
            bus: self.bus.unwrap_or(DEFAULT_BUS),
            channel,
            prefix,
        })
    }
}

/// `invalidation.channel` or `invalidation.prefix`: `default` when absent,
/// otherwise not empty and at most [`MAX_BUS_NAME_LEN`] bytes. `what` says
/// what the value is for, in the error.
fn bus_name(
    field: &str,
    raw: Option<String>,
    default: &str,
    what: &str,
) -> Result<String, ConfigError> {
    let value = raw.unwrap_or_else(|| default.to_owned());
    if value.is_empty() {
        return Err(invalid(
            field,
            format!(
                "is empty: it is {what}; remove the line to use \"{default}\", or name another"
            ),
        ));
    }
    if value.len() > MAX_BUS_NAME_LEN {
        return Err(invalid(
            field,
            format!(
                "is {} bytes long: it is {what}, so keep it to at most {MAX_BUS_NAME_LEN}, \
                 e.g. \"{default}\"",
                value.len()
            ),
        ));
    }
    Ok(value)
}

impl FileMetrics {
    fn validate(self, overrides: &Overrides) -> Result<MetricsConfig, ConfigError> {
        let (listen, listen_field) = pick(
            self.listen,
            "metrics.listen",
            "--metrics-listen",
            overrides.metrics_listen.clone(),
        );
        let listen = match listen.as_deref().map(str::trim) {
            None => Some(DEFAULT_METRICS_LISTEN),
            Some("") => None,
            Some(text) => Some(text.parse().map_err(|_| {
                invalid(
                    listen_field,
                    format!(
                        "{text:?} is not an IP:PORT address: write e.g. \"127.0.0.1:9121\" or \
                         \"0.0.0.0:9121\" (host names are not resolved), or \"\" to turn the \
                         metrics listener off"
                    ),
                )
            })?),
        };

        let hit_rate_warning = fraction(
            "metrics.hit_rate_warning",
            self.hit_rate_warning,
            DEFAULT_HIT_RATE_WARNING,
        )?;
        let hit_rate_critical = fraction(
            "metrics.hit_rate_critical",
            self.hit_rate_critical,
            DEFAULT_HIT_RATE_CRITICAL,
        )?;
        // A low hit rate is the bad direction: critical sits below warning.
        if hit_rate_critical > hit_rate_warning {
            return Err(invalid(
                "metrics.hit_rate_critical",
                format!(
                    "{hit_rate_critical} is above metrics.hit_rate_warning ({hit_rate_warning}): \
                     a hit rate is critical below hit_rate_critical and a warning below \
                     hit_rate_warning, so lower hit_rate_critical or raise hit_rate_warning"
                ),
            ));
        }
        let error_rate_warning = fraction(
            "metrics.error_rate_warning",
            self.error_rate_warning,
            DEFAULT_ERROR_RATE_WARNING,
        )?;
        let error_rate_critical = fraction(
            "metrics.error_rate_critical",
            self.error_rate_critical,
            DEFAULT_ERROR_RATE_CRITICAL,
        )?;
        above_warning(
            "metrics.error_rate_critical",
            error_rate_critical,
            "metrics.error_rate_warning",
            error_rate_warning,
            |f| f.to_string(),
        )?;
        let latency_warning = duration(
            "metrics.latency_warning",
            self.latency_warning,
            DEFAULT_LATENCY_WARNING,
        )?;
        non_zero("metrics.latency_warning", latency_warning)?;
        let latency_critical = duration(
            "metrics.latency_critical",
            self.latency_critical,
            DEFAULT_LATENCY_CRITICAL,
        )?;
        non_zero("metrics.latency_critical", latency_critical)?;
        above_warning(
            "metrics.latency_critical",
            latency_critical,
            "metrics.latency_warning",
            latency_warning,
            format_duration,
        )?;
        let memory_warning = fraction(
            "metrics.memory_warning",
            self.memory_warning,
            DEFAULT_MEMORY_WARNING,
        )?;
        let memory_critical = fraction(
            "metrics.memory_critical",
            self.memory_critical,
            DEFAULT_MEMORY_CRITICAL,
        )?;
        above_warning(
            "metrics.memory_critical",
            memory_critical,
            "metrics.memory_warning",
            memory_warning,
            |f| f.to_string(),
        )?;

        let probe_interval = duration(
            "metrics.probe_interval",
            self.probe_interval,
            DEFAULT_PROBE_INTERVAL,
        )?;
        non_zero("metrics.probe_interval", probe_interval)?;
        let window = duration("metrics.window", self.window, DEFAULT_HEALTH_WINDOW)?;
        non_zero("metrics.window", window)?;
        // Rates are differences between samples taken at each probe: a
        // window shorter than one probe would hold no difference at all.
        if window < probe_interval {
            return Err(invalid(
                "metrics.window",
                format!(
                    "{} is shorter than metrics.probe_interval ({}): rates are measured between \
                     probes, so raise window or lower probe_interval",
                    format_duration(window),
                    format_duration(probe_interval)
                ),
            ));
        }

        let min_samples = count(
            "metrics.min_samples",
            self.min_samples,
            DEFAULT_MIN_SAMPLES as usize,
        )? as u64;

        Ok(MetricsConfig {
            min_samples,
            listen,
            hit_rate_warning,
            hit_rate_critical,
            error_rate_warning,
            error_rate_critical,
            latency_warning,
            latency_critical,
            memory_warning,
            memory_critical,
            probe_interval,
            window,
        })
    }
}

/// A fraction from 0 to 1, or `default` when absent.
fn fraction(field: &str, raw: Option<f64>, default: Fraction) -> Result<Fraction, ConfigError> {
    match raw {
        None => Ok(default),
        Some(v) => Fraction::new(v).ok_or_else(|| {
            let hint = if v > 1.0 && v <= 100.0 {
                format!(" ({v}% is {})", v / 100.0)
            } else {
                String::new()
            };
            invalid(
                field,
                format!("{v} is not between 0 and 1: write a fraction, e.g. 0.8 for 80%{hint}"),
            )
        }),
    }
}

/// Checks that a critical level where higher is worse is at least its
/// warning level.
fn above_warning<T: PartialOrd + Copy>(
    critical_field: &str,
    critical: T,
    warning_field: &str,
    warning: T,
    show: impl Fn(T) -> String,
) -> Result<(), ConfigError> {
    if critical >= warning {
        return Ok(());
    }
    let (short_c, short_w) = (
        critical_field.trim_start_matches("metrics."),
        warning_field.trim_start_matches("metrics."),
    );
    Err(invalid(
        critical_field,
        format!(
            "{} is below {warning_field} ({}): a value is a warning above {short_w} and \
             critical above {short_c}, so raise {short_c} or lower {short_w}",
            show(critical),
            show(warning)
        ),
    ))
}

fn validate_rules(raw: Vec<FileRule>, l1: &L1Config) -> Result<Vec<RuleConfig>, ConfigError> {
    if raw.len() > MAX_RULES {
        return Err(invalid(
            "rules",
            format!(
                "{} rules is too many: use at most {MAX_RULES} (merge rules with a broader match)",
                raw.len()
            ),
        ));
    }
    let mut rules: Vec<RuleConfig> = Vec::with_capacity(raw.len());
    for (index, file) in raw.into_iter().enumerate() {
        let rule = file.validate(index, l1)?;
        // Names label metrics and CACHE.STATS rows, so two rules with one
        // name would merge their figures. Quadratic, but MAX_RULES bounds it
        // and real files have dozens of rules.
        if let Some(first) = rules.iter().position(|r| r.name == rule.name) {
            return Err(invalid(
                &format!("rules[{index}].name"),
                format!(
                    "{:?} is already the name of rules[{first}]: rule names must be unique \
                     (a rule without a name is named after its match pattern), so set a \
                     different name on one of them",
                    rule.name
                ),
            ));
        }
        rules.push(rule);
    }
    // The store carves each capped rule's cache out of the global cap, so
    // the caps must fit in it; the uncapped rules share what is left.
    let capped: Vec<u64> = rules.iter().filter_map(|r| r.max_memory).collect();
    let reserved = capped
        .iter()
        .fold(0u64, |sum, cap| sum.saturating_add(*cap));
    if reserved > l1.max_memory {
        return Err(invalid(
            "l1.max_memory",
            format!(
                "{} is less than the {} that the {} rules with a max_memory reserve in total: \
                 raise l1.max_memory or lower the rules' max_memory",
                format_size(l1.max_memory),
                format_size(reserved),
                capped.len()
            ),
        ));
    }
    Ok(rules)
}

impl FileRule {
    fn validate(self, index: usize, l1: &L1Config) -> Result<RuleConfig, ConfigError> {
        let field = |name: &str| format!("rules[{index}].{name}");
        let text = self.pattern.ok_or_else(|| {
            invalid(
                &field("match"),
                "is required: give the keys this rule covers as a Redis glob, e.g. \
                 match = \"user:{id}\"",
            )
        })?;
        if text.is_empty() {
            return Err(invalid(
                &field("match"),
                "is empty, which matches only the empty key: write a glob such as \"user:*\", or \
                 \"*\" for every key",
            ));
        }
        let pattern = Glob::new(&text)
            .map_err(|err| invalid(&field("match"), format!("invalid pattern {text:?}: {err}")))?;
        let name = match self.name {
            None => text,
            Some(name) if name.trim().is_empty() => {
                return Err(invalid(
                    &field("name"),
                    "is empty: give the rule a name for metrics and CACHE.STATS, or remove name \
                     to use the match pattern",
                ));
            }
            Some(name) => name,
        };
        let tags = rule_tags(index, self.tags.unwrap_or_default(), &pattern)?;
        let cache = self.cache.unwrap_or(DEFAULT_RULE_CACHE);
        let compress = self
            .compress
            .map(|raw| raw.validate(index, cache, l1))
            .transpose()?;
        let stampede = self.stampede.map(|raw| raw.validate(index)).transpose()?;
        let refresh_ahead = self
            .refresh_ahead
            .map(|raw| raw.validate(index))
            .transpose()?;
        let stale_field = field("stale_ttl");
        let stale_ttl = match self.stale_ttl {
            None => None,
            raw => {
                let stale = duration(&stale_field, raw, Duration::ZERO)?;
                non_zero(&stale_field, stale)?;
                Some(stale)
            }
        };
        let write = match self.write.as_deref() {
            None | Some("invalidate") => WriteStrategy::Invalidate,
            Some("through") => WriteStrategy::Through,
            Some("behind") => WriteStrategy::Behind,
            Some(other) => {
                return Err(invalid(
                    &field("write"),
                    format!(
                        "unknown strategy {other:?}: use \"invalidate\" (the default), \"through\" \
                         or \"behind\""
                    ),
                ));
            }
        };
        let warm = self.warm.map(|raw| raw.validate(index)).transpose()?;

        if !cache {
            // These only shape what a rule caches; on a rule that caches
            // nothing they are a sign the author meant something else.
            let set = [
                ("ttl", self.ttl.is_some()),
                ("max_memory", self.max_memory.is_some()),
                ("negative", self.negative.is_some()),
                ("stampede", stampede.is_some()),
                ("refresh_ahead", refresh_ahead.is_some()),
                ("stale_ttl", stale_ttl.is_some()),
                ("write", write != WriteStrategy::Invalidate),
                ("warm", warm.is_some()),
            ];
            if let Some((key, _)) = set.into_iter().find(|(_, is_set)| *is_set) {
                return Err(invalid(
                    &field(key),
                    format!("a rule with cache = false caches nothing: remove {key}"),
                ));
            }
            return Ok(RuleConfig {
                name,
                pattern,
                ttl: Duration::ZERO,
                max_memory: None,
                cache,
                negative: false,
                tags,
                compress,
                stampede: None,
                refresh_ahead: None,
                stale_ttl: None,
                write,
                warm: None,
            });
        }

        let ttl_field = field("ttl");
        let ttl = match self.ttl {
            None => {
                return Err(invalid(
                    &ttl_field,
                    "is required: how long an entry may stay in L1, e.g. ttl = \"5m\" \
                     (or cache = false to keep these keys out of L1)",
                ));
            }
            raw => duration(&ttl_field, raw, Duration::ZERO)?,
        };
        if ttl.is_zero() {
            return Err(invalid(
                &ttl_field,
                "must be greater than zero, or nothing would ever be served from L1: use e.g. \
                 \"30s\", or cache = false to keep these keys out of L1",
            ));
        }

        let cap_field = field("max_memory");
        let max_memory = self
            .max_memory
            .map(|raw| byte_count(&cap_field, raw))
            .transpose()?;
        if max_memory == Some(0) {
            return Err(invalid(
                &cap_field,
                "must be greater than zero: use e.g. \"64mb\", or remove max_memory to share \
                 l1.max_memory with the other rules",
            ));
        }

        Ok(RuleConfig {
            name,
            pattern,
            ttl,
            max_memory,
            cache,
            negative: self.negative.unwrap_or(DEFAULT_RULE_NEGATIVE),
            tags,
            compress,
            stampede,
            refresh_ahead,
            stale_ttl,
            write,
            warm,
        })
    }
}

impl FileCompress {
    /// The `compress` of `rules[index]`, a rule with `cache` as given.
    fn validate(
        self,
        index: usize,
        cache: bool,
        l1: &L1Config,
    ) -> Result<CompressConfig, ConfigError> {
        let field = |name: &str| format!("rules[{index}].compress.{name}");
        let threshold_field = field("threshold");
        let threshold = match self.threshold {
            None => {
                return Err(invalid(
                    &threshold_field,
                    "is required: the size from which values are compressed, e.g. \
                     compress = { threshold = \"1kb\" }",
                ));
            }
            Some(raw) => byte_count(&threshold_field, raw)?,
        };
        if threshold == 0 {
            return Err(invalid(
                &threshold_field,
                "must be greater than zero: use e.g. \"1kb\" (small values rarely shrink by \
                 the 10% compression must save), or remove compress",
            ));
        }
        if threshold > l1.max_value_size {
            return Err(invalid(
                &threshold_field,
                format!(
                    "{} is above l1.max_value_size ({}): larger values are always stored plain, \
                     so this rule would compress nothing: lower threshold or raise \
                     l1.max_value_size",
                    format_size(threshold),
                    format_size(l1.max_value_size)
                ),
            ));
        }
        let upstream = self.upstream.unwrap_or(DEFAULT_COMPRESS_UPSTREAM);
        if !cache && !upstream {
            return Err(invalid(
                &field("upstream"),
                "false compresses values only in L1, and a rule with cache = false keeps them \
                 out of L1, so it would do nothing: set upstream = true to compress them in \
                 Redis, or remove compress",
            ));
        }
        Ok(CompressConfig {
            threshold,
            upstream,
        })
    }
}

impl FileStampede {
    /// The `stampede` of `rules[index]`.
    fn validate(self, index: usize) -> Result<StampedeConfig, ConfigError> {
        let field = |name: &str| format!("rules[{index}].stampede.{name}");
        let lease_field = field("lease");
        let lease = duration(&lease_field, self.lease, DEFAULT_STAMPEDE_LEASE)?;
        if lease < Duration::from_millis(1) {
            return Err(invalid(
                &lease_field,
                "must be at least 1ms: how long a loader may take before another reader \
                 loads in its place, e.g. lease = \"5s\"",
            ));
        }
        let wait_field = field("wait");
        let wait = duration(&wait_field, self.wait, DEFAULT_STAMPEDE_WAIT)?;
        if wait < Duration::from_millis(1) {
            return Err(invalid(
                &wait_field,
                "must be at least 1ms: how long a reader waits for the loader, e.g. \
                 wait = \"2s\"",
            ));
        }
        let on_timeout = match self.on_timeout.as_deref() {
            None | Some("nil") => OnTimeout::Nil,
            Some("error") => OnTimeout::Error,
            Some(other) => {
                return Err(invalid(
                    &field("on_timeout"),
                    format!("unknown value {other:?}: use \"nil\" or \"error\""),
                ));
            }
        };
        Ok(StampedeConfig {
            lease,
            wait,
            on_timeout,
        })
    }
}

impl FileRefresh {
    /// The `refresh_ahead` of `rules[index]`.
    fn validate(self, index: usize) -> Result<RefreshAhead, ConfigError> {
        match self {
            FileRefresh::Ratio(ratio) => {
                if !(ratio > 0.0 && ratio < 1.0) {
                    return Err(invalid(
                        &format!("rules[{index}].refresh_ahead"),
                        format!(
                            "{ratio} is not strictly between 0 and 1: write the fraction of an \
                             entry's life after which a hit refreshes it, e.g. 0.8, or \
                             {{ beta = 1.0 }} for probabilistic early refresh"
                        ),
                    ));
                }
                Ok(RefreshAhead::Ratio(ratio))
            }
            FileRefresh::XFetch(FileXFetch { beta }) => {
                if !(beta.is_finite() && beta > 0.0 && beta <= 1000.0) {
                    return Err(invalid(
                        &format!("rules[{index}].refresh_ahead.beta"),
                        format!(
                            "{beta} must be above 0 and at most 1000: 1.0 is the usual choice, \
                             larger refreshes earlier"
                        ),
                    ));
                }
                Ok(RefreshAhead::XFetch { beta })
            }
        }
    }
}

/// Compiles the `tags` of `rules[index]` against its pattern.
fn rule_tags(
    index: usize,
    raw: Vec<String>,
    pattern: &Glob,
) -> Result<Vec<TagTemplate>, ConfigError> {
    if raw.len() > MAX_RULE_TAGS {
        return Err(invalid(
            &format!("rules[{index}].tags"),
            format!(
                "{} tags is too many: use at most {MAX_RULE_TAGS} (each one costs every write to \
                 a matching key a Redis set update)",
                raw.len()
            ),
        ));
    }
    raw.iter()
        .enumerate()
        .map(|(n, text)| {
            TagTemplate::new(text, pattern).map_err(|err| {
                invalid(
                    &format!("rules[{index}].tags[{n}]"),
                    format!("tag {text:?}: {err}"),
                )
            })
        })
        .collect()
}

fn resolve_threads(threads: usize) -> usize {
    if threads != 0 {
        return threads;
    }
    // If the core count is unknowable (restricted /proc, exotic platform),
    // one worker still runs correctly; it is only slower.
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

fn parse_listen(text: &str) -> Result<SocketAddr, String> {
    text.trim().parse().map_err(|_| {
        format!(
            "{text:?} is not an IP:PORT address: write e.g. \"127.0.0.1:6380\", \"0.0.0.0:6380\" or \
             \"[::1]:6380\" (host names are not resolved)"
        )
    })
}

fn count(field: &str, raw: Option<i64>, default: usize) -> Result<usize, ConfigError> {
    match raw {
        None => Ok(default),
        Some(v) => usize::try_from(v).map_err(|_| {
            if v < 0 {
                invalid(field, format!("must not be negative (got {v})"))
            } else {
                invalid(field, format!("{v} is too large for this platform"))
            }
        }),
    }
}

fn in_range(field: &str, value: usize, range: &RangeInclusive<usize>) -> Result<(), ConfigError> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "must be between {} and {} (got {value})",
                range.start(),
                range.end()
            ),
        ))
    }
}

fn at_least_one(field: &str, value: usize) -> Result<(), ConfigError> {
    if value == 0 {
        Err(invalid(
            field,
            "must be at least 1 byte or item (0 would reject every request)",
        ))
    } else {
        Ok(())
    }
}

fn non_zero(field: &str, value: Duration) -> Result<(), ConfigError> {
    if value.is_zero() {
        Err(invalid(
            field,
            "must be greater than zero: use e.g. \"500ms\" or \"1s\"",
        ))
    } else {
        Ok(())
    }
}

fn duration(field: &str, raw: Option<Scalar>, default: Duration) -> Result<Duration, ConfigError> {
    match raw {
        None => Ok(default),
        Some(Scalar::Int(secs)) => {
            let secs = u64::try_from(secs)
                .map_err(|_| invalid(field, format!("must not be negative (got {secs})")))?;
            let value = Duration::from_secs(secs);
            if value > MAX_DURATION {
                return Err(invalid(
                    field,
                    format!("{secs} seconds is too large (the limit is 36500d)"),
                ));
            }
            Ok(value)
        }
        Some(Scalar::Text(text)) => parse_duration(&text).map_err(|msg| invalid(field, msg)),
    }
}

/// A size in bytes as written: a bare integer or a string with a unit.
fn byte_count(field: &str, raw: Scalar) -> Result<u64, ConfigError> {
    match raw {
        Scalar::Int(v) => {
            u64::try_from(v).map_err(|_| invalid(field, format!("must not be negative (got {v})")))
        }
        Scalar::Text(text) => parse_size(&text).map_err(|msg| invalid(field, msg)),
    }
}

/// A byte size that is counted, not allocated at once, so it need not fit
/// the address space.
fn size_u64(field: &str, raw: Option<Scalar>, default: u64) -> Result<u64, ConfigError> {
    raw.map_or(Ok(default), |raw| byte_count(field, raw))
}

fn size(field: &str, raw: Option<Scalar>, default: usize) -> Result<usize, ConfigError> {
    let bytes = match raw {
        None => return Ok(default),
        Some(raw) => byte_count(field, raw)?,
    };
    usize::try_from(bytes).map_err(|_| {
        invalid(
            field,
            format!("{bytes} bytes is too large for this platform"),
        )
    })
}

// ---------------------------------------------------------------------------
// Durations and sizes
// ---------------------------------------------------------------------------

/// Splits `"30s"` into `("30", "s")`, allowing spaces before the unit.
fn split_number(text: &str) -> (&str, &str) {
    let end = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(end);
    (digits, unit.trim_start())
}

/// Parses a duration: a whole number and a unit, `ms`, `s`, `m`, `h` or `d`
/// (`"500ms"`, `"30s"`, `"30m"`, `"1h"`, `"2d"`), or a bare `"0"`. In a TOML file
/// a bare integer also works and means seconds; that case is handled by the
/// loader, not here.
///
/// # Errors
///
/// A message, ready to follow a field name, for a missing or unknown unit, a
/// negative or fractional number, or a value above [`MAX_DURATION`].
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let (digits, unit) = split_number(text);
    if digits.is_empty() {
        if text.starts_with('-') {
            return Err(format!(
                "invalid duration {s:?}: durations cannot be negative"
            ));
        }
        return Err(format!(
            "invalid duration {s:?}: expected a whole number and a unit (ms, s, m, h or d), as in \"30s\""
        ));
    }
    let too_large = || format!("invalid duration {s:?}: too large (the limit is 36500d)");
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let secs_per_unit: u64 = match unit {
        "ms" => {
            let value = Duration::from_millis(n);
            return if value > MAX_DURATION {
                Err(too_large())
            } else {
                Ok(value)
            };
        }
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "" if n == 0 => return Ok(Duration::ZERO),
        "" => {
            return Err(format!(
                "invalid duration {s:?}: missing unit: write \"{n}s\" for seconds or \"{n}ms\" for milliseconds"
            ));
        }
        u if u.starts_with('.') => {
            return Err(format!(
                "invalid duration {s:?}: fractions are not supported: use a smaller unit, as in \"1500ms\""
            ));
        }
        other => {
            return Err(format!(
                "invalid duration {s:?}: unknown unit {other:?}: use ms, s, m, h or d"
            ));
        }
    };
    let value = n
        .checked_mul(secs_per_unit)
        .map(Duration::from_secs)
        .ok_or_else(too_large)?;
    if value > MAX_DURATION {
        return Err(too_large());
    }
    Ok(value)
}

/// Parses a byte size: a whole number with an optional unit, case-insensitive,
/// exactly as Redis's own config reads sizes: `b` (or none) for bytes; `kb`,
/// `mb`, `gb` for binary units (1024, 1024², 1024³); `k`, `m`, `g` for decimal
/// ones (1000, 1000², 1000³). Examples: `"512mb"`, `"64KB"`, `"10b"`, `"1024"`.
///
/// # Errors
///
/// A message, ready to follow a field name, for an unknown unit, a negative or
/// fractional number, or a value that overflows `u64`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let text = s.trim();
    let (digits, unit) = split_number(text);
    if digits.is_empty() {
        if text.starts_with('-') {
            return Err(format!("invalid size {s:?}: sizes cannot be negative"));
        }
        return Err(format!(
            "invalid size {s:?}: expected a whole number and an optional unit (b, kb, mb, gb), as in \"64kb\""
        ));
    }
    let too_large = || format!("invalid size {s:?}: too large");
    let n: u64 = digits.parse().map_err(|_| too_large())?;
    let multiplier: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1 << 10,
        "mb" => 1 << 20,
        "gb" => 1 << 30,
        "k" => 1_000,
        "m" => 1_000_000,
        "g" => 1_000_000_000,
        u if u.starts_with('.') => {
            return Err(format!("invalid size {s:?}: fractions are not supported: use a smaller unit, as in \"1536kb\""));
        }
        _ => {
            return Err(format!(
                "invalid size {s:?}: unknown unit {unit:?}: use b, kb, mb or gb"
            ));
        }
    };
    n.checked_mul(multiplier).ok_or_else(too_large)
}

/// Formats a duration in the largest unit that represents it exactly, so that
/// [`parse_duration`] reads back the same value.
fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    if d.subsec_nanos() != 0 {
        // Files cannot express sub-millisecond parts; such a value can only
        // come from code. Round up so a tiny timeout never prints as "0".
        let ms = d.as_nanos().div_ceil(1_000_000);
        return format!("{ms}ms");
    }
    let secs = d.as_secs();
    for (unit, per) in [("d", 86_400), ("h", 3600), ("m", 60)] {
        if secs % per == 0 {
            return format!("{}{unit}", secs / per);
        }
    }
    format!("{secs}s")
}

/// Formats a size in the largest binary unit that represents it exactly.
fn format_size(bytes: u64) -> String {
    for (unit, per) in [("gb", GB as u64), ("mb", MB as u64), ("kb", KB as u64)] {
        if bytes != 0 && bytes % per == 0 {
            return format!("{}{unit}", bytes / per);
        }
    }
    format!("{bytes}b")
}

/// A TOML basic string with escaping, via toml's own encoder.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

// ---------------------------------------------------------------------------
// Upstream URL
// ---------------------------------------------------------------------------

impl UpstreamUrl {
    /// Parses a `redis://[[user]:password@]host[:port][/db]` URL. IPv6 hosts go
    /// in brackets (`redis://[::1]:6379`); user and password are percent-decoded.
    ///
    /// # Errors
    ///
    /// [`ConfigError::Invalid`] with field `upstream.url` for any other scheme
    /// (`rediss://` and `redis-cluster://` get messages of their own), a missing
    /// host, port 0, a database that is not a number, query strings or
    /// fragments, and a user name without a password.
    pub fn parse(s: &str) -> Result<UpstreamUrl, ConfigError> {
        parse_url(s).map_err(|msg| invalid("upstream.url", msg))
    }
}

const URL_FORM: &str = "redis://[[user]:password@]host[:port][/db]";

fn parse_url(s: &str) -> Result<UpstreamUrl, String> {
    let text = s.trim();
    // Messages below never echo the URL text: it may carry a password, and
    // errors end up in terminals and logs.
    let url = url::Url::parse(text).map_err(|err| {
        format!("not a URL ({err}): write {URL_FORM}, e.g. \"redis://127.0.0.1:6379\"")
    })?;
    match url.scheme() {
        "redis" => {}
        "rediss" => return Err("TLS upstreams are not supported yet".to_owned()),
        "redis-cluster" => {
            return Err(
                "Redis Cluster upstreams are not supported yet (use a redis:// URL of one node)"
                    .to_owned(),
            );
        }
        other => {
            return Err(format!(
                "unsupported scheme \"{other}://\": write {URL_FORM}"
            ))
        }
    }
    let host = match url.host() {
        Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
        Some(url::Host::Ipv4(ip)) => ip.to_string(),
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        _ => return Err(format!("the URL has no host: write {URL_FORM}")),
    };
    let port = url.port().unwrap_or(DEFAULT_UPSTREAM_PORT);
    if port == 0 {
        return Err(
            "port 0 is not a port Redis can listen on: name the real one, e.g. 6379".to_owned(),
        );
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "the URL has a query string or fragment, which tierd does not read: write {URL_FORM}"
        ));
    }
    let db = match url.path().trim_start_matches('/') {
        "" => 0,
        path => path.parse::<u32>().map_err(|_| {
            format!("the database in the URL path must be a number, as in redis://host:6379/3 (got {path:?})")
        })?,
    };
    let username = Some(percent_decode(url.username(), "user name")?).filter(|u| !u.is_empty());
    let password = match url.password() {
        Some(p) => Some(percent_decode(p, "password")?).filter(|p| !p.is_empty()),
        None => None,
    };
    if username.is_some() && password.is_none() {
        // AUTH needs a password; a lone user name is almost always a URL
        // whose password was lost, so say so rather than connect as default.
        return Err("the URL has a user name but no password: write redis://user:password@host, or drop the user".to_owned());
    }
    Ok(UpstreamUrl {
        host,
        port,
        username,
        password,
        db,
    })
}

fn percent_decode(s: &str, what: &str) -> Result<String, String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 3;
                    continue;
                }
                None => {
                    return Err(format!(
                        "the {what} has a bad percent-escape: write %XX with two hex digits"
                    ))
                }
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8(out)
        .map_err(|_| format!("the {what} is not valid UTF-8 once percent-decoded"))
}

/// Percent-encodes everything outside RFC 3986's unreserved set, which is
/// always safe inside the userinfo part of a URL.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl fmt::Display for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("redis://")?;
        if self.username.is_some() || self.password.is_some() {
            if let Some(user) = &self.username {
                f.write_str(&percent_encode(user))?;
            }
            if self.password.is_some() {
                f.write_str(":***")?;
            }
            f.write_str("@")?;
        }
        if self.host.contains(':') {
            write!(f, "[{}]", self.host)?;
        } else {
            f.write_str(&self.host)?;
        }
        write!(f, ":{}", self.port)?;
        if self.db != 0 {
            write!(f, "/{}", self.db)?;
        }
        Ok(())
    }
}

impl fmt::Debug for UpstreamUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamUrl")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("db", &self.db)
            .finish()
    }
}

// ---------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------

#[cfg(test)]
// Tests may unwrap and panic: a failure is the point.
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_str(text, &Overrides::default())
    }

    fn field_of(text: &str) -> String {
        match load(text) {
            Err(ConfigError::Invalid { field, message }) => {
                assert!(
                    message.len() > 10,
                    "message too terse for {text:?}: {message}"
                );
                field
            }
            other => panic!("expected an Invalid error for {text:?}, got {other:?}"),
        }
    }

    #[test]
    fn shipped_proxy_toml_equals_defaults() {
        let shipped = load(include_str!("../proxy.toml")).unwrap();
        assert_eq!(shipped, Config::default());
        assert_eq!(load("").unwrap(), Config::default());
    }

    #[test]
    fn shipped_proxy_toml_lists_every_option() {
        // to_toml writes every option, so its key set is the full set.
        fn keys(table: &toml::Table, prefix: &str, out: &mut Vec<String>) {
            for (k, v) in table {
                let path = format!("{prefix}{k}");
                match v {
                    toml::Value::Table(t) => keys(t, &format!("{path}."), out),
                    _ => out.push(path),
                }
            }
        }
        let mut shipped = Vec::new();
        keys(
            &include_str!("../proxy.toml").parse().unwrap(),
            "",
            &mut shipped,
        );
        let mut all = Vec::new();
        keys(&Config::default().to_toml().parse().unwrap(), "", &mut all);
        shipped.sort();
        all.sort();
        assert_eq!(shipped, all);

        // There are no rules by default, so rules are shown by the commented
        // example instead: between them its rules use every rule option.
        let rule_keys = |config: &toml::Table| -> Vec<String> {
            let mut out: Vec<String> = config["rules"]
                .as_array()
                .unwrap()
                .iter()
                .flat_map(|rule| rule.as_table().unwrap().keys().cloned())
                .collect();
            out.sort();
            out.dedup();
            out
        };
        let mut full = Config::default();
        full.rules.push(RuleConfig {
            name: "n".into(),
            pattern: Glob::new("k:*").unwrap(),
            ttl: Duration::from_secs(1),
            max_memory: Some(1 << 20),
            cache: true,
            negative: true,
            tags: vec![TagTemplate::new("t", &Glob::new("k:*").unwrap()).unwrap()],
            compress: Some(CompressConfig {
                threshold: 1024,
                upstream: true,
            }),
            stampede: Some(StampedeConfig {
                lease: Duration::from_secs(5),
                wait: Duration::from_secs(2),
                on_timeout: OnTimeout::Nil,
            }),
            refresh_ahead: Some(RefreshAhead::Ratio(0.8)),
            stale_ttl: Some(Duration::from_secs(60)),
            write: WriteStrategy::Through,
            warm: Some(WarmConfig {
                on_startup: true,
                interval: Some(Duration::from_secs(60)),
                limit: 10,
                hot: true,
                scan: true,
            }),
        });
        let example = uncommented_example();
        assert_eq!(
            rule_keys(&example.parse().unwrap()),
            rule_keys(&full.to_toml().parse().unwrap())
        );
    }

    /// proxy.toml with its example rules uncommented: the lines between the
    /// two markers lose their leading "# ".
    fn uncommented_example() -> String {
        let shipped = include_str!("../proxy.toml");
        let begin = "# --- example rules: begin ---";
        let end = "# --- example rules: end ---";
        assert_eq!(shipped.matches(begin).count(), 1);
        assert_eq!(shipped.matches(end).count(), 1);
        let mut inside = false;
        let mut out = String::new();
        for line in shipped.lines() {
            if line == end {
                inside = false;
            }
            let line = if inside {
                assert!(line == "#" || line.starts_with("# "), "{line:?}");
                line.strip_prefix('#').unwrap().trim_start_matches(' ')
            } else {
                line
            };
            out.push_str(line);
            out.push('\n');
            if line == begin {
                inside = true;
            }
        }
        out
    }

    #[test]
    fn shipped_example_rules_validate() {
        let c = load(&uncommented_example()).unwrap();
        let summary: Vec<_> = c
            .rules
            .iter()
            .map(|r| {
                (
                    r.name.as_str(),
                    r.pattern.pattern(),
                    r.ttl.as_secs(),
                    r.max_memory.map(|m| m >> 20),
                    r.cache,
                    r.negative,
                )
            })
            .collect();
        assert_eq!(
            summary,
            [
                ("secret:*", "secret:*", 0, None, false, false),
                ("users", "user:{id}", 3600, None, true, true),
                (
                    "project-stats",
                    "project:{id}:stats",
                    1800,
                    None,
                    true,
                    true
                ),
                ("image-meta", "image:{id}:meta", 7200, Some(100), true, true),
                ("segmentation", "seg:{id}:*", 86_400, Some(200), true, true),
                ("sessions", "session:{id}", 86_400, None, true, true),
                (
                    "teacher-sessions",
                    "sessions:teacher:{teacher}:*",
                    3600,
                    None,
                    true,
                    true
                ),
                ("search", "search:*", 60, None, true, false),
            ]
        );
        let tagged: Vec<(&str, Vec<&str>)> = c
            .rules
            .iter()
            .filter(|r| !r.tags.is_empty())
            .map(|r| (r.name.as_str(), r.tags.iter().map(|t| t.text()).collect()))
            .collect();
        assert_eq!(
            tagged,
            [("teacher-sessions", vec!["teacher:{teacher}", "sessions"])]
        );
        // The issue's seed thresholds, compressed in Redis too (the default).
        let compressed: Vec<(&str, u64, bool)> = c
            .rules
            .iter()
            .filter_map(|r| {
                r.compress
                    .map(|z| (r.name.as_str(), z.threshold, z.upstream))
            })
            .collect();
        assert_eq!(
            compressed,
            [
                ("users", 1024, true),
                ("project-stats", 2048, true),
                ("image-meta", 2048, true),
                ("segmentation", 5120, true),
            ]
        );
        // Everything outside the example is still the defaults.
        assert_eq!(
            Config {
                rules: Vec::new(),
                ..c
            },
            Config::default()
        );
    }

    #[test]
    fn defaults() {
        let c = Config::default();
        assert_eq!(c.listen, "127.0.0.1:6380".parse().unwrap());
        assert!(c.threads >= 1);
        assert_eq!(c.max_clients, 10_000);
        assert_eq!(c.idle_timeout, Duration::ZERO);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(
            c.upstream.url,
            UpstreamUrl::parse(DEFAULT_UPSTREAM_URL).unwrap()
        );
        assert_eq!(c.upstream.pool_size, 2);
        assert_eq!(c.upstream.connect_timeout, Duration::from_secs(1));
        assert_eq!(c.upstream.command_timeout, Duration::from_secs(5));
        assert_eq!(c.upstream.backoff_min, Duration::from_millis(50));
        assert_eq!(c.upstream.backoff_max, Duration::from_secs(2));
        assert_eq!(c.limits.proto_max_bulk_len, 512 * 1024 * 1024);
        assert_eq!(c.limits.max_args, 1_048_576);
        assert_eq!(c.limits.max_inline_len, 64 * 1024);
        assert_eq!(c.limits.query_buffer_limit, 1024 * 1024 * 1024);
        assert_eq!(c.limits.max_reply_depth, 128);
        assert_eq!(c.log.level, "info");
        assert_eq!(c.log.format, LogFormat::Text);
        assert_eq!(c.l1.max_memory, 512 << 20);
        assert_eq!(c.l1.max_value_size, 1 << 20);
        assert_eq!(c.l1.sweep_interval, Duration::from_secs(1));
        assert_eq!(c.invalidation.tracking, TrackingMode::Default);
        assert!(c.invalidation.bus);
        assert_eq!(c.invalidation.channel, "tierd:invalidate");
        assert_eq!(c.invalidation.prefix, "tierd:");
        assert!(c.rules.is_empty());
        let p = c.parse_limits();
        assert_eq!(
            (p.max_bulk_len, p.max_args, p.max_inline_len),
            (512 << 20, 1 << 20, 64 << 10)
        );
    }

    #[test]
    fn threads_zero_means_cores_and_explicit_is_kept() {
        let cores = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        assert_eq!(load("threads = 0").unwrap().threads, cores);
        assert_eq!(load("threads = 3").unwrap().threads, 3);
    }

    #[test]
    fn unknown_fields_are_rejected_by_name() {
        for (text, name) in [
            ("bogus = 1", "bogus"),
            ("[upstream]\npool = 3", "pool"),
            ("[limits]\nmax_bulk = 3", "max_bulk"),
            ("[log]\nlevle = \"info\"", "levle"),
            ("[nosuch]\nx = 1", "nosuch"),
            ("[l1]\nmax_mem = \"1gb\"", "max_mem"),
            ("[invalidation]\nmode = \"off\"", "mode"),
            ("[[rules]]\nmatch = \"a\"\nttl = 1\nttll = 2", "ttll"),
            ("[[rules]]\npattern = \"a\"", "pattern"),
        ] {
            let err = load(text).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{text}: {err:?}");
            let msg = err.to_string();
            assert!(msg.contains(&format!("`{name}`")), "{text}: {msg}");
            assert!(msg.contains("line"), "{text}: {msg}");
        }
    }

    #[test]
    fn wrong_types_are_parse_errors_with_position() {
        let msg = load("[upstream]\npool_size = \"two\"")
            .unwrap_err()
            .to_string();
        assert!(msg.contains("line 2"), "{msg}");
        let msg = load("idle_timeout = true").unwrap_err().to_string();
        assert!(msg.contains("\"30s\""), "{msg}");
    }

    #[test]
    fn every_validation_error_names_its_field() {
        let cases = [
            ("listen = \"localhost\"", "listen"),
            ("listen = \"1.2.3.4\"", "listen"),
            ("threads = -1", "threads"),
            ("threads = 100000", "threads"),
            ("max_clients = 0", "max_clients"),
            ("max_clients = -5", "max_clients"),
            ("idle_timeout = \"5 parsecs\"", "idle_timeout"),
            ("idle_timeout = -1", "idle_timeout"),
            ("shutdown_timeout = \"-1s\"", "shutdown_timeout"),
            ("[upstream]\nurl = \"http://x\"", "upstream.url"),
            ("[upstream]\npool_size = 0", "upstream.pool_size"),
            ("[upstream]\npool_size = 65", "upstream.pool_size"),
            (
                "[upstream]\nconnect_timeout = \"0s\"",
                "upstream.connect_timeout",
            ),
            (
                "[upstream]\ncommand_timeout = 0",
                "upstream.command_timeout",
            ),
            (
                "[upstream]\ncommand_timeout = \"fast\"",
                "upstream.command_timeout",
            ),
            ("[upstream]\nbackoff_min = \"0ms\"", "upstream.backoff_min"),
            ("[upstream]\nbackoff_max = \"10ms\"", "upstream.backoff_max"),
            ("[upstream]\nbackoff_min = \"3s\"", "upstream.backoff_max"),
            (
                "[limits]\nproto_max_bulk_len = \"12 parsecs\"",
                "limits.proto_max_bulk_len",
            ),
            (
                "[limits]\nproto_max_bulk_len = 0",
                "limits.proto_max_bulk_len",
            ),
            (
                "[limits]\nproto_max_bulk_len = \"2gb\"",
                "limits.query_buffer_limit",
            ),
            ("[limits]\nmax_args = 0", "limits.max_args"),
            ("[limits]\nmax_args = -3", "limits.max_args"),
            ("[limits]\nmax_inline_len = \"0b\"", "limits.max_inline_len"),
            ("[limits]\nmax_inline_len = -1", "limits.max_inline_len"),
            (
                "[limits]\nquery_buffer_limit = \"1kb\"",
                "limits.query_buffer_limit",
            ),
            (
                "[limits]\nquery_buffer_limit = \"99999999999999gb\"",
                "limits.query_buffer_limit",
            ),
            ("[limits]\nmax_reply_depth = 0", "limits.max_reply_depth"),
            ("[limits]\nmax_reply_depth = 1025", "limits.max_reply_depth"),
            ("[log]\nlevel = \"\"", "log.level"),
            ("[log]\nlevel = \"tierd=loud\"", "log.level"),
            ("[log]\nformat = \"xml\"", "log.format"),
            ("[l1]\nmax_memory = \"1kb\"", "l1.max_memory"),
            ("[l1]\nmax_memory = -1", "l1.max_memory"),
            ("[l1]\nmax_memory = \"lots\"", "l1.max_memory"),
            ("[l1]\nmax_value_size = 0", "l1.max_value_size"),
            ("[l1]\nmax_value_size = \"1gb\"", "l1.max_value_size"),
            ("[l1]\nsweep_interval = 0", "l1.sweep_interval"),
            ("[l1]\nsweep_interval = \"1.5s\"", "l1.sweep_interval"),
            ("[invalidation]\ntracking = \"on\"", "invalidation.tracking"),
            ("[invalidation]\nchannel = \"\"", "invalidation.channel"),
            (
                "[invalidation]\nchannel = \"a\\nb\"",
                "invalidation.channel",
            ),
            ("[invalidation]\nprefix = \"\"", "invalidation.prefix"),
            (
                "[[rules]]\nmatch = \"a:{id}\"\nttl = 1\ntags = [\"a\", \"{ix}\"]",
                "rules[0].tags[1]",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\ntags = [\"\"]",
                "rules[0].tags[0]",
            ),
            ("[[rules]]\nttl = \"1m\"", "rules[0].match"),
            ("[[rules]]\nmatch = \"\"\nttl = 1", "rules[0].match"),
            ("[[rules]]\nmatch = \"user:{id\"\nttl = 1", "rules[0].match"),
            ("[[rules]]\nmatch = \"a\"", "rules[0].ttl"),
            ("[[rules]]\nmatch = \"a\"\nttl = 0", "rules[0].ttl"),
            ("[[rules]]\nmatch = \"a\"\nttl = \"-1s\"", "rules[0].ttl"),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\nmax_memory = 0",
                "rules[0].max_memory",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nname = \" \"\nttl = 1",
                "rules[0].name",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nttl = \"1m\"",
                "rules[0].ttl",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nmax_memory = \"1mb\"",
                "rules[0].max_memory",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nnegative = false",
                "rules[0].negative",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\n[[rules]]\nmatch = \"b\"",
                "rules[1].ttl",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\n[[rules]]\nmatch = \"a\"\nttl = 2",
                "rules[1].name",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\nmax_memory = \"600mb\"",
                "l1.max_memory",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\ncompress = { upstream = true }",
                "rules[0].compress.threshold",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\ncompress = { threshold = \"2mb\" }",
                "rules[0].compress.threshold",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\n\
                 compress = { threshold = 1, upstream = false }",
                "rules[0].compress.upstream",
            ),
        ];
        for (text, field) in cases {
            assert_eq!(field_of(text), field, "{text}");
            let shown = load(text).unwrap_err().to_string();
            assert!(shown.starts_with(&format!("{field}: ")), "{shown}");
        }
    }

    fn message_of(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn l1_and_invalidation_accept_valid_values() {
        let c = load(
            "[l1]\nmax_memory = \"1mb\"\nmax_value_size = \"1mb\"\nsweep_interval = \"250ms\"\n\
             [invalidation]\ntracking = \"bcast\"",
        )
        .unwrap();
        assert_eq!(
            c.l1,
            L1Config {
                max_memory: 1 << 20,
                max_value_size: 1 << 20,
                sweep_interval: Duration::from_millis(250),
                coalesce: true,
            }
        );
        assert_eq!(c.invalidation.tracking, TrackingMode::Bcast);
        // Sizes are counted, not allocated, so they may exceed usize on
        // 32-bit targets; any u64 that parses is kept exactly.
        assert_eq!(
            load("[l1]\nmax_memory = \"4096gb\"").unwrap().l1.max_memory,
            4096 << 30
        );
        for mode in [
            TrackingMode::Default,
            TrackingMode::Bcast,
            TrackingMode::Off,
        ] {
            let text = format!("[invalidation]\ntracking = \"{}\"", mode.as_str());
            assert_eq!(load(&text).unwrap().invalidation.tracking, mode);
        }
    }

    #[test]
    fn l1_errors_say_how_to_fix() {
        let msg = message_of("[l1]\nmax_memory = 1024");
        assert!(msg.contains("1kb is too small: use at least 1mb"), "{msg}");
        let msg = message_of("[l1]\nmax_value_size = \"1gb\"");
        assert!(
            msg.contains("1gb is larger than l1.max_memory (512mb)"),
            "{msg}"
        );
        let msg = message_of("[l1]\nmax_value_size = \"0mb\"");
        assert!(msg.contains("greater than zero"), "{msg}");
        let msg = message_of("[invalidation]\ntracking = \"Bcast\"");
        assert_eq!(
            msg,
            "invalidation.tracking: unknown mode \"Bcast\": use \"default\", \"bcast\" or \"off\""
        );
    }

    #[test]
    fn invalidation_bus_options() {
        let c = load("[invalidation]\nbus = false\nchannel = \"app:inv\"\nprefix = \"app:tierd:\"")
            .unwrap();
        assert_eq!(
            c.invalidation,
            InvalidationConfig {
                tracking: TrackingMode::Default,
                bus: false,
                channel: "app:inv".into(),
                prefix: "app:tierd:".into(),
            }
        );
        let longest = "c".repeat(MAX_BUS_NAME_LEN);
        let c = load(&format!(
            "[invalidation]\nchannel = \"{longest}\"\nprefix = \"{longest}\""
        ))
        .unwrap();
        assert_eq!(c.invalidation.channel.len(), 256);
        assert_eq!(c.invalidation.prefix.len(), 256);
        // Channels are binary-safe in Redis, so anything printable goes.
        load("[invalidation]\nchannel = \"inv é ☃\"").unwrap();

        assert_eq!(
            message_of("[invalidation]\nchannel = \"\""),
            "invalidation.channel: is empty: it is the pub/sub channel instances share; remove \
             the line to use \"tierd:invalidate\", or name another"
        );
        assert_eq!(
            message_of("[invalidation]\nprefix = \"\""),
            "invalidation.prefix: is empty: it is the start of the keys tierd keeps in Redis; \
             remove the line to use \"tierd:\", or name another"
        );
        let msg = message_of(&format!("[invalidation]\nchannel = \"{longest}x\""));
        assert!(
            msg.starts_with("invalidation.channel: is 257 bytes long"),
            "{msg}"
        );
        assert!(msg.contains("at most 256"), "{msg}");
        let msg = message_of(&format!("[invalidation]\nprefix = \"{longest}x\""));
        assert!(
            msg.starts_with("invalidation.prefix: is 257 bytes long"),
            "{msg}"
        );
        let msg = message_of("[invalidation]\nchannel = \"inv\\t\"");
        assert!(
            msg.starts_with(
                "invalidation.channel: \"inv\\t\" contains the control character '\\t'"
            ),
            "{msg}"
        );
        assert!(matches!(
            load("[invalidation]\nbus = \"yes\""),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn rule_tags_compile_against_the_pattern() {
        let c = load(
            "[[rules]]\nmatch = \"secret:{id}\"\ncache = false\ntags = [\"secrets\"]\n\
             [[rules]]\nmatch = \"sessions:teacher:{teacher}:*\"\nttl = \"1h\"\n\
             tags = [\"teacher:{teacher}\", \"sessions\", '\\{lit\\}']\n\
             [[rules]]\nmatch = \"user:*\"\nttl = 1\ntags = []",
        )
        .unwrap();
        let texts = |i: usize| -> Vec<&str> { c.rules[i].tags.iter().map(|t| t.text()).collect() };
        assert_eq!(texts(0), ["secrets"]);
        assert_eq!(texts(1), ["teacher:{teacher}", "sessions", "\\{lit\\}"]);
        assert!(texts(2).is_empty());
        let rule = &c.rules[1];
        let captures = rule.pattern.captures(b"sessions:teacher:12:3").unwrap();
        let rendered: Vec<Vec<u8>> = rule.tags.iter().map(|t| t.render(&captures)).collect();
        assert_eq!(
            rendered,
            [
                b"teacher:12".to_vec(),
                b"sessions".to_vec(),
                b"{lit}".to_vec()
            ]
        );
        // Without tags, a rule has none.
        assert!(load("[[rules]]\nmatch = \"a\"\nttl = 1").unwrap().rules[0]
            .tags
            .is_empty());
    }

    #[test]
    fn rule_tag_errors_name_the_rule_the_tag_and_the_captures() {
        let cases = [
            (
                "[[rules]]\nmatch = \"sessions:teacher:{teacher}:*\"\nttl = 1\n\
                 tags = [\"sessions\", \"teacher:{teachr}\"]",
                "rules[0].tags[1]: tag \"teacher:{teachr}\": `{teachr}` is not a capture of \
                 match \"sessions:teacher:{teacher}:*\": use one of `{teacher}`",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\n[[rules]]\nmatch = \"b:*\"\nttl = 1\n\
                 tags = [\"{id}\"]",
                "rules[1].tags[0]: tag \"{id}\": `{id}` is not a capture of match \"b:*\": it \
                 has no captures",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\ntags = [\"\"]",
                "rules[0].tags[0]: tag \"\": a tag cannot be empty",
            ),
            (
                "[[rules]]\nmatch = \"a:{id}\"\nttl = 1\ntags = [\"t:{id\"]",
                "rules[0].tags[0]: tag \"t:{id\": unterminated `{` at byte 2",
            ),
            (
                "[[rules]]\nmatch = \"a:{id}\"\nttl = 1\ntags = [\"t:id}\"]",
                "rules[0].tags[0]: tag \"t:id}\": unbalanced `}` at byte 4",
            ),
            (
                "[[rules]]\nmatch = \"a:{id}\"\nttl = 1\ntags = [\"t:{}\"]",
                "rules[0].tags[0]: tag \"t:{}\": empty capture",
            ),
        ];
        for (text, want) in cases {
            let msg = message_of(text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
        }

        let tags = |n: usize| {
            let list: Vec<String> = (0..n).map(|i| format!("\"t{i}\"")).collect();
            format!(
                "[[rules]]\nmatch = \"a\"\nttl = 1\ntags = [{}]",
                list.join(", ")
            )
        };
        assert_eq!(load(&tags(MAX_RULE_TAGS)).unwrap().rules[0].tags.len(), 32);
        let msg = message_of(&tags(MAX_RULE_TAGS + 1));
        assert!(
            msg.starts_with("rules[0].tags: 33 tags is too many: use at most 32"),
            "{msg}"
        );
        assert!(matches!(
            load("[[rules]]\nmatch = \"a\"\nttl = 1\ntags = \"t\""),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn rules_keep_file_order_and_resolve_defaults() {
        let c = load(
            "[[rules]]\nmatch = \"secret:*\"\ncache = false\n\
             [[rules]]\nname = \"users\"\nmatch = 'user:{id}:\\*'\nttl = \"1h\"\n\
             [[rules]]\nmatch = \"search:*\"\nttl = 60\nmax_memory = \"8mb\"\nnegative = false\n\
             [[rules]]\nmatch = \"*\"\nttl = \"500ms\"\ncache = true",
        )
        .unwrap();
        let secret = &c.rules[0];
        assert_eq!(secret.name, "secret:*");
        assert_eq!(secret.pattern, Glob::new("secret:*").unwrap());
        assert_eq!(secret.ttl, Duration::ZERO);
        assert_eq!(secret.max_memory, None);
        assert!(!secret.cache && !secret.negative);

        let users = &c.rules[1];
        assert_eq!(users.name, "users");
        assert_eq!(users.pattern.pattern(), "user:{id}:\\*");
        assert!(users.pattern.matches(b"user:42:*"));
        assert!(!users.pattern.matches(b"user:42:x"));
        assert_eq!(users.ttl, Duration::from_secs(3600));
        assert_eq!(users.max_memory, None);
        assert!(users.cache && users.negative);

        let search = &c.rules[2];
        assert_eq!(search.name, "search:*");
        assert_eq!(search.ttl, Duration::from_secs(60));
        assert_eq!(search.max_memory, Some(8 << 20));
        assert!(search.cache && !search.negative);

        assert_eq!(c.rules[3].name, "*");
        assert_eq!(c.rules[3].ttl, Duration::from_millis(500));
    }

    #[test]
    fn rule_errors_say_how_to_fix() {
        let cases = [
            ("[[rules]]\nttl = \"1m\"", "rules[0].match: is required"),
            (
                "[[rules]]\nmatch = \"user:{id\"\nttl = 1",
                "rules[0].match: invalid pattern \"user:{id\": unbalanced `{` at byte 5",
            ),
            (
                "[[rules]]\nmatch = \"a:{}\"\nttl = 1",
                "rules[0].match: invalid pattern \"a:{}\": empty capture",
            ),
            (
                "[[rules]]\nmatch = \"a\"",
                "rules[0].ttl: is required: how long an entry may stay in L1",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = \"0s\"",
                "rules[0].ttl: must be greater than zero",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nttl = \"1m\"",
                "rules[0].ttl: a rule with cache = false caches nothing: remove ttl",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nmax_memory = 1",
                "rules[0].max_memory: a rule with cache = false caches nothing: remove max_memory",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nnegative = true",
                "rules[0].negative: a rule with cache = false caches nothing: remove negative",
            ),
            (
                "[[rules]]\nmatch = \"a\"\nttl = 1\nmax_memory = \"0kb\"",
                "rules[0].max_memory: must be greater than zero",
            ),
        ];
        for (text, want) in cases {
            let msg = message_of(text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
        }
    }

    #[test]
    fn rule_compress_options() {
        let c = load(
            "[l1]\nmax_value_size = \"4mb\"\n\
             [[rules]]\nmatch = \"a\"\nttl = 1\ncompress = { threshold = \"1kb\" }\n\
             [[rules]]\nmatch = \"b\"\nttl = 1\ncompress = { threshold = 300, upstream = false }\n\
             [[rules]]\nmatch = \"c\"\ncache = false\ncompress = { threshold = \"4mb\", upstream = true }\n\
             [[rules]]\nmatch = \"d\"\nttl = 1\n\
             [[rules]]\nmatch = \"e\"\nttl = 1\n[rules.compress]\nthreshold = \"2k\"\n",
        )
        .unwrap();
        let got: Vec<_> = c.rules.iter().map(|r| r.compress).collect();
        let z = |threshold, upstream| {
            Some(CompressConfig {
                threshold,
                upstream,
            })
        };
        assert_eq!(
            got,
            [
                z(1024, true),
                z(300, false),
                z(4 << 20, true),
                None,
                z(2000, true)
            ]
        );
        // The threshold may equal the default max_value_size.
        let c =
            load("[[rules]]\nmatch = \"a\"\nttl = 1\ncompress = { threshold = \"1mb\" }").unwrap();
        assert_eq!(c.rules[0].compress, z(1 << 20, true));
    }

    #[test]
    fn rule_stampede_and_refresh_options() {
        let c = load(
            "[l1]\ncoalesce = false\n\
             [[rules]]\nmatch = \"a\"\nttl = 1\nstampede = { lease = \"3s\", wait = \"250ms\", on_timeout = \"error\" }\n\
             [[rules]]\nmatch = \"b\"\nttl = 1\nstampede = {}\nrefresh_ahead = 0.75\n\
             [[rules]]\nmatch = \"c\"\nttl = 1\nrefresh_ahead = { beta = 2.5 }\n",
        )
        .unwrap();
        assert!(!c.l1.coalesce);
        assert_eq!(
            c.rules[0].stampede,
            Some(StampedeConfig {
                lease: Duration::from_secs(3),
                wait: Duration::from_millis(250),
                on_timeout: OnTimeout::Error,
            })
        );
        assert_eq!(
            c.rules[1].stampede,
            Some(StampedeConfig {
                lease: DEFAULT_STAMPEDE_LEASE,
                wait: DEFAULT_STAMPEDE_WAIT,
                on_timeout: OnTimeout::Nil,
            })
        );
        assert_eq!(c.rules[1].refresh_ahead, Some(RefreshAhead::Ratio(0.75)));
        assert_eq!(
            c.rules[2].refresh_ahead,
            Some(RefreshAhead::XFetch { beta: 2.5 })
        );
        assert_eq!(c.rules[2].stampede, None);
        assert!(load("").unwrap().l1.coalesce);
        // What to_toml writes reads back the same.
        let again = load(&c.to_toml()).unwrap();
        assert_eq!(again.rules, c.rules);
        assert_eq!(again.l1, c.l1);
    }

    #[test]
    fn rule_stampede_and_refresh_errors_say_how_to_fix() {
        let rule = "[[rules]]\nmatch = \"a\"\nttl = 1\n";
        for (text, wanted) in [
            (
                format!("{rule}stampede = {{ lease = 0 }}"),
                "rules[0].stampede.lease: must be at least 1ms",
            ),
            (
                format!("{rule}stampede = {{ wait = \"0ms\" }}"),
                "rules[0].stampede.wait: must be at least 1ms",
            ),
            (
                format!("{rule}stampede = {{ on_timeout = \"wait\" }}"),
                "rules[0].stampede.on_timeout: unknown value \"wait\": use \"nil\" or \"error\"",
            ),
            (
                format!("{rule}refresh_ahead = 1.0"),
                "rules[0].refresh_ahead: 1 is not strictly between 0 and 1",
            ),
            (
                format!("{rule}refresh_ahead = 0.0"),
                "rules[0].refresh_ahead: 0 is not strictly between 0 and 1",
            ),
            (
                format!("{rule}refresh_ahead = {{ beta = 0.0 }}"),
                "rules[0].refresh_ahead.beta: 0 must be above 0",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nstampede = {}".to_owned(),
                "rules[0].stampede: a rule with cache = false caches nothing: remove stampede",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\nrefresh_ahead = 0.5".to_owned(),
                "rules[0].refresh_ahead: a rule with cache = false caches nothing",
            ),
        ] {
            let message = message_of(&text);
            assert!(
                message.contains(wanted),
                "{text:?}: {message:?} should contain {wanted:?}"
            );
        }
        assert!(load(&format!("{rule}stampede = {{ leese = 1 }}")).is_err());
        assert!(load(&format!("{rule}refresh_ahead = \"0.8\"")).is_err());
    }

    #[test]
    fn rule_compress_errors_say_how_to_fix() {
        let rule = "[[rules]]\nmatch = \"a\"\nttl = 1\n";
        let cases = [
            (
                format!("{rule}compress = {{}}"),
                "rules[0].compress.threshold: is required: the size from which values are \
                 compressed, e.g. compress = { threshold = \"1kb\" }",
            ),
            (
                format!("{rule}compress = {{ upstream = true }}"),
                "rules[0].compress.threshold: is required",
            ),
            (
                format!("{rule}compress = {{ threshold = 0 }}"),
                "rules[0].compress.threshold: must be greater than zero",
            ),
            (
                format!("{rule}compress = {{ threshold = \"0kb\" }}"),
                "rules[0].compress.threshold: must be greater than zero",
            ),
            (
                format!("{rule}compress = {{ threshold = -1 }}"),
                "rules[0].compress.threshold: must not be negative (got -1)",
            ),
            (
                format!("{rule}compress = {{ threshold = \"1 parsec\" }}"),
                "rules[0].compress.threshold: invalid size \"1 parsec\"",
            ),
            (
                format!("{rule}compress = {{ threshold = \"2mb\" }}"),
                "rules[0].compress.threshold: 2mb is above l1.max_value_size (1mb): larger \
                 values are always stored plain, so this rule would compress nothing: lower \
                 threshold or raise l1.max_value_size",
            ),
            (
                "[[rules]]\nmatch = \"a\"\ncache = false\n\
                 compress = { threshold = \"1kb\", upstream = false }"
                    .to_owned(),
                "rules[0].compress.upstream: false compresses values only in L1, and a rule \
                 with cache = false keeps them out of L1, so it would do nothing: set upstream \
                 = true to compress them in Redis, or remove compress",
            ),
            (
                format!(
                    "[[rules]]\nmatch = \"z\"\nttl = 1\n{rule}compress = {{ threshold = 1048577 }}"
                ),
                "rules[1].compress.threshold: 1048577b is above l1.max_value_size (1mb)",
            ),
        ];
        for (text, want) in cases {
            let msg = message_of(&text);
            assert!(msg.starts_with(want), "{text:?}: {msg}");
        }
        // Unknown keys and wrong types are parse errors that name the key.
        for bad in [
            "compress = { threshold = \"1kb\", level = 9 }",
            "compress = { threshold = \"1kb\", upstream = \"yes\" }",
            "compress = true",
            "compress = \"1kb\"",
        ] {
            let err = load(&format!("{rule}{bad}")).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{bad}: {err}");
        }
        let err = load(&format!("{rule}compress = {{ threshold = 1, level = 9 }}")).unwrap_err();
        assert!(err.to_string().contains("level"), "{err}");
    }

    #[test]
    fn duplicate_rule_names_name_both_rules() {
        // Explicit names.
        let msg = message_of(
            "[[rules]]\nname = \"x\"\nmatch = \"a\"\nttl = 1\n\
             [[rules]]\nmatch = \"b\"\nttl = 1\n\
             [[rules]]\nname = \"x\"\nmatch = \"c\"\nttl = 1",
        );
        assert!(
            msg.starts_with("rules[2].name: \"x\" is already the name of rules[0]"),
            "{msg}"
        );
        // A default name (the pattern) clashing with an explicit one.
        let msg = message_of(
            "[[rules]]\nname = \"b:*\"\nmatch = \"a\"\nttl = 1\n\
             [[rules]]\nmatch = \"b:*\"\ncache = false",
        );
        assert!(
            msg.starts_with("rules[1].name: \"b:*\" is already the name of rules[0]"),
            "{msg}"
        );
        assert!(msg.contains("named after its match pattern"), "{msg}");
        // The same pattern twice with different names is allowed (the second
        // never matches, but that is for a linter, not a load error).
        load(
            "[[rules]]\nname = \"one\"\nmatch = \"a\"\nttl = 1\n\
             [[rules]]\nname = \"two\"\nmatch = \"a\"\nttl = 1",
        )
        .unwrap();
    }

    #[test]
    fn rule_caps_must_fit_the_global_cap() {
        let rules = "[[rules]]\nmatch = \"a\"\nttl = 1\nmax_memory = \"100mb\"\n\
                     [[rules]]\nmatch = \"b\"\nttl = 1\n\
                     [[rules]]\nmatch = \"c\"\nttl = 1\nmax_memory = \"200mb\"\n";
        assert_eq!(
            message_of(&format!("[l1]\nmax_memory = \"256mb\"\n{rules}")),
            "l1.max_memory: 256mb is less than the 300mb that the 2 rules with a max_memory \
             reserve in total: raise l1.max_memory or lower the rules' max_memory"
        );
        let c = load(&format!("[l1]\nmax_memory = \"300mb\"\n{rules}")).unwrap();
        assert_eq!(c.rules[0].max_memory, Some(100 << 20));
        assert_eq!(c.rules[1].max_memory, None);
        // Sums that would overflow u64 are still caught.
        let huge = "[[rules]]\nmatch = \"a\"\nttl = 1\nmax_memory = \"16000000000gb\"\n\
                    [[rules]]\nmatch = \"b\"\nttl = 1\nmax_memory = \"16000000000gb\"\n";
        assert_eq!(field_of(huge), "l1.max_memory");
    }

    #[test]
    fn too_many_rules_is_an_error() {
        let l1 = L1Config::default();
        let rules = |n: usize| {
            (0..n)
                .map(|i| FileRule {
                    pattern: Some(format!("k{i}")),
                    cache: Some(false),
                    ..FileRule::default()
                })
                .collect::<Vec<_>>()
        };
        let err = validate_rules(rules(MAX_RULES + 1), &l1).unwrap_err();
        assert_eq!(err.field(), Some("rules"));
        assert!(err.to_string().contains("at most 65535"), "{err}");
        assert_eq!(validate_rules(rules(3), &l1).unwrap().len(), 3);
    }

    #[test]
    fn limits_accept_valid_combinations() {
        let c = load("[limits]\nproto_max_bulk_len = \"1mb\"\nmax_inline_len = 100\nquery_buffer_limit = \"2mb\"")
            .unwrap();
        assert_eq!(c.limits.proto_max_bulk_len, 1 << 20);
        assert_eq!(c.limits.max_inline_len, 100);
        assert_eq!(c.limits.query_buffer_limit, 2 << 20);
        assert_eq!(c.parse_limits().max_inline_len, 100);
    }

    #[test]
    fn durations() {
        let ok = [
            ("0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", Duration::from_millis(500)),
            ("30s", Duration::from_secs(30)),
            ("30m", Duration::from_secs(1800)),
            ("1h", Duration::from_secs(3600)),
            ("2d", Duration::from_secs(172_800)),
            (" 10 s ", Duration::from_secs(10)),
            ("36500d", MAX_DURATION),
        ];
        for (text, want) in ok {
            assert_eq!(parse_duration(text), Ok(want), "{text:?}");
        }
        let bad = [
            ("5 parsecs", "unknown unit"),
            ("-1s", "negative"),
            ("30", "missing unit"),
            ("1.5s", "fractions"),
            ("", "expected"),
            ("s", "expected"),
            ("10S", "unknown unit"),
            ("99999999999999999999999s", "too large"),
            ("18446744073709551615d", "too large"),
            ("36501d", "too large"),
            ("18446744073709551615ms", "too large"),
        ];
        for (text, want) in bad {
            let err = parse_duration(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn durations_in_toml_accept_integers_as_seconds() {
        let c = load("idle_timeout = 30\nshutdown_timeout = \"1m\"").unwrap();
        assert_eq!(c.idle_timeout, Duration::from_secs(30));
        assert_eq!(c.shutdown_timeout, Duration::from_secs(60));
        assert_eq!(
            field_of("idle_timeout = 9223372036854775807"),
            "idle_timeout"
        );
    }

    #[test]
    fn sizes() {
        let ok = [
            ("1024", 1024),
            ("10b", 10),
            ("1kb", 1024),
            ("100mb", 100 << 20),
            ("512MB", 512 << 20),
            ("1gb", 1 << 30),
            ("1Gb", 1 << 30),
            ("1k", 1000),
            ("2m", 2_000_000),
            ("1g", 1_000_000_000),
            (" 64 kb ", 64 << 10),
        ];
        for (text, want) in ok {
            assert_eq!(parse_size(text), Ok(want), "{text:?}");
        }
        let bad = [
            ("5 parsecs", "unknown unit"),
            ("1tb", "unknown unit"),
            ("-1kb", "negative"),
            ("1.5mb", "fractions"),
            ("", "expected"),
            ("mb", "expected"),
            ("99999999999999999999999", "too large"),
            ("18446744073709551615gb", "too large"),
        ];
        for (text, want) in bad {
            let err = parse_size(text).unwrap_err();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn sizes_in_toml_accept_integers_as_bytes() {
        let c = load("[limits]\nmax_inline_len = 4096").unwrap();
        assert_eq!(c.limits.max_inline_len, 4096);
    }

    fn url(s: &str) -> UpstreamUrl {
        UpstreamUrl::parse(s).unwrap()
    }

    fn url_err(s: &str) -> String {
        let err = UpstreamUrl::parse(s).unwrap_err();
        assert_eq!(err.field(), Some("upstream.url"));
        err.to_string()
    }

    #[test]
    fn url_forms() {
        assert_eq!(url("redis://127.0.0.1:6379"), UpstreamUrl::default());
        assert_eq!(url("redis://127.0.0.1"), UpstreamUrl::default());

        let u = url("redis://alice:s3cret@cache.internal:7000/3");
        assert_eq!(u.host, "cache.internal");
        assert_eq!(u.port, 7000);
        assert_eq!(u.username.as_deref(), Some("alice"));
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.db, 3);

        let u = url("redis://:s3cret@localhost");
        assert_eq!((u.host.as_str(), u.port), ("localhost", 6379));
        assert_eq!(u.username, None);
        assert_eq!(u.password.as_deref(), Some("s3cret"));
        assert_eq!(u.db, 0);

        let u = url("redis://[::1]:6390/2");
        assert_eq!((u.host.as_str(), u.port, u.db), ("::1", 6390, 2));

        let u = url("redis://us%40er:p%3Aa%2Fss%20w%C3%B6rd@h/");
        assert_eq!(u.username.as_deref(), Some("us@er"));
        assert_eq!(u.password.as_deref(), Some("p:a/ss wörd"));
        assert_eq!(u.db, 0);

        assert_eq!(url("REDIS://h:1").port, 1);
    }

    #[test]
    fn url_errors() {
        assert!(url_err("rediss://h:6379").contains("TLS upstreams are not supported yet"));
        assert!(url_err("redis-cluster://h:7000").contains(
            "Redis Cluster upstreams are not supported yet (use a redis:// URL of one node)"
        ));
        for bad in ["http://h:6379", "unix:///tmp/redis.sock", "localhost:6379"] {
            let msg = url_err(bad);
            assert!(
                msg.contains("redis://[[user]:password@]host[:port][/db]"),
                "{bad}: {msg}"
            );
        }
        assert!(url_err("127.0.0.1:6379").contains("not a URL"));
        assert!(url_err("redis://h/abc").contains("\"abc\""));
        assert!(url_err("redis://h/99999999999").contains("must be a number"));
        assert!(url_err("redis://h:0").contains("port 0"));
        assert!(url_err("redis://h:99999").contains("not a URL"));
        assert!(url_err("redis://").contains("no host"));
        assert!(url_err("redis://h?db=2").contains("query"));
        assert!(url_err("redis://u:%ZZ@h").contains("percent-escape"));
        let msg = url_err("redis://alice@h");
        assert!(msg.contains("no password"), "{msg}");
    }

    #[test]
    fn url_errors_never_echo_the_password() {
        for bad in [
            "redis://:hunter2@h:0",
            "redis://:hunter2@h:99999",
            "redis://:hunter2@h/abc",
            "redis://:hunter2@h?x=1",
            "redis://:hunter2@",
            "redis://:hunter2%ZZ@h",
            "rediss://:hunter2@h",
            "ftp://:hunter2@h",
        ] {
            let msg = url_err(bad);
            assert!(!msg.contains("hunter2"), "{bad}: {msg}");
        }
    }

    #[test]
    fn url_display_and_debug_hide_the_password() {
        let u = url("redis://alice:s3cret@[::1]:7000/3");
        assert_eq!(u.to_string(), "redis://alice:***@[::1]:7000/3");
        assert!(!format!("{u:?}").contains("s3cret"));
        assert!(!format!(
            "{:?}",
            load("[upstream]\nurl = \"redis://:s3cret@h\"").unwrap()
        )
        .contains("s3cret"));
        assert_eq!(url("redis://:pw@h").to_string(), "redis://:***@h:6379");
        assert_eq!(url("redis://h").to_string(), "redis://h:6379");
        // Display of a password-less URL parses back to the same value.
        let u = url("redis://h%40x:6379/1");
        assert_eq!(url(&u.to_string()), u);
    }

    #[test]
    fn overrides_win_over_file() {
        let file =
            "listen = \"0.0.0.0:7000\"\n[upstream]\nurl = \"redis://a:1\"\n[log]\nlevel = \"warn\"";
        let overrides = Overrides {
            listen: Some("127.0.0.1:7001".into()),
            upstream: Some("redis://b:2/5".into()),
            log_level: Some("tierd=debug".into()),
            metrics_listen: Some("".into()),
        };
        let c = Config::from_toml_str(file, &overrides).unwrap();
        assert_eq!(c.listen, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(
            (
                c.upstream.url.host.as_str(),
                c.upstream.url.port,
                c.upstream.url.db
            ),
            ("b", 2, 5)
        );
        assert_eq!(c.log.level, "tierd=debug");
        // Without overrides the file values stand.
        let c = Config::from_toml_str(file, &Overrides::default()).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7000".parse().unwrap());
        assert_eq!(c.log.level, "warn");
    }

    #[test]
    fn bad_overrides_name_the_flag() {
        let cases = [
            (
                Overrides {
                    listen: Some("nope".into()),
                    ..Overrides::default()
                },
                "--listen",
            ),
            (
                Overrides {
                    upstream: Some("rediss://h".into()),
                    ..Overrides::default()
                },
                "--upstream",
            ),
            (
                Overrides {
                    log_level: Some("=".into()),
                    ..Overrides::default()
                },
                "--log-level",
            ),
        ];
        for (overrides, flag) in cases {
            // The file value is fine; the override is what's wrong.
            let err = Config::from_toml_str("listen = \"127.0.0.1:1\"", &overrides).unwrap_err();
            assert_eq!(err.field(), Some(flag), "{err}");
        }
    }

    #[test]
    fn to_toml_round_trips() {
        let text = "listen = \"[::1]:0\"\nthreads = 3\nmax_clients = 7\nidle_timeout = \"90s\"\n\
                    shutdown_timeout = 0\n[upstream]\nurl = \"redis://us%22er@h:1/9\"\n\
                    pool_size = 64\nconnect_timeout = \"1500ms\"\ncommand_timeout = \"2h\"\n\
                    backoff_min = \"1ms\"\nbackoff_max = \"1d\"\n[limits]\nproto_max_bulk_len = 1000\n\
                    max_args = 3\nmax_inline_len = \"1k\"\nquery_buffer_limit = \"3mb\"\n\
                    max_reply_depth = 1024\n[log]\nlevel = \"tierd[conn{id=\\\"x\\\"}]=debug,info\"\nformat = \"json\"";
        // The user name without a password is rejected, so give it one and
        // compare without: the password is the one thing to_toml redacts.
        let with_pw = text.replace("us%22er@", "us%22er:pw@");
        let original = load(&with_pw).unwrap();
        let again = load(&original.to_toml()).unwrap();
        assert_eq!(again.upstream.url.password.as_deref(), Some("***"));
        let mut expected = original.clone();
        expected.upstream.url.password = Some("***".into());
        assert_eq!(again, expected);

        // And a config with no password comes back identical.
        let plain = load(&with_pw.replace("us%22er:pw@", "")).unwrap();
        assert_eq!(load(&plain.to_toml()).unwrap(), plain);
        assert_eq!(
            load(&Config::default().to_toml()).unwrap(),
            Config::default()
        );
        assert!(plain.to_toml().starts_with('#'));
    }

    #[test]
    fn to_toml_round_trips_l1_invalidation_and_rules() {
        let text = "[l1]\nmax_memory = \"1gb\"\nmax_value_size = \"1000\"\nsweep_interval = \"1500ms\"\n\
                    [invalidation]\ntracking = \"off\"\nbus = false\nchannel = \"inv \\\"x\\\"\"\n\
                    prefix = \"t\\u00e9:\"\n\
                    [[rules]]\nmatch = \"secret:{id}\"\ncache = false\ntags = [\"s:{id}\"]\n\
                    [[rules]]\nname = \"users \\\"v2\\\"\"\nmatch = 'user:{id}:\\{x\\}[a-z]?'\nttl = \"1h\"\n\
                    tags = ['u:\\{{id}\\}', \"users\"]\n\
                    [[rules]]\nname = \"seg\"\nmatch = \"seg:{id}:*\"\nttl = \"1d\"\nmax_memory = \"200mb\"\n\
                    [[rules]]\nmatch = \"search:*\"\nttl = 90\nnegative = false\n\
                    [[rules]]\nmatch = \"z1\"\nttl = 1\ncompress = { threshold = 1000 }\n\
                    [[rules]]\nmatch = \"z2\"\ncache = false\ncompress = { threshold = \"1k\" }\n\
                    [[rules]]\nmatch = \"z3\"\nttl = 1\ncompress = { threshold = \"512b\", upstream = false }\n";
        let original = load(text).unwrap();
        assert_eq!(original.rules.len(), 7);
        assert_eq!(original.rules[1].name, "users \"v2\"");
        let printed = original.to_toml();
        assert_eq!(load(&printed).unwrap(), original, "{printed}");
        // Every rule is printed with its resolved name and all its fields,
        // bar the ones a cache = false rule may not have.
        assert!(printed.contains(
            "\n[[rules]]\nname = \"secret:{id}\"\nmatch = \"secret:{id}\"\ntags = [\"s:{id}\"]\n\
             cache = false\n\n[[rules]]"
        ));
        // toml writes a string with backslashes as a literal string.
        assert!(printed.contains("\ntags = ['u:\\{{id}\\}', \"users\"]\nttl = \"1h\"\n"));
        assert!(printed.contains(
            "\n[[rules]]\nname = \"seg\"\nmatch = \"seg:{id}:*\"\nttl = \"1d\"\n\
             max_memory = \"200mb\"\ncache = true\nnegative = true\n"
        ));
        assert!(printed.contains("\n[l1]\nmax_memory = \"1gb\"\nmax_value_size = \"1000b\"\n"));
        assert!(printed.contains(
            "\n[invalidation]\ntracking = \"off\"\nbus = false\nchannel = 'inv \"x\"'\n\
             prefix = \"té:\"\n"
        ));
        assert_eq!(original.rules[1].tags[0].text(), "u:\\{{id}\\}");
        assert!(printed.contains(
            "\nmatch = \"z1\"\nttl = \"1s\"\ncache = true\nnegative = true\n\
             compress = { threshold = \"1000b\", upstream = true }\n"
        ));
        assert!(printed.contains(
            "\nmatch = \"z2\"\ncache = false\ncompress = { threshold = \"1000b\", upstream = true }\n"
        ));
        assert!(printed.contains("compress = { threshold = \"512b\", upstream = false }\n"));
    }

    #[test]
    fn metrics_defaults() {
        let m = Config::default().metrics;
        assert_eq!(m.listen, Some("127.0.0.1:9121".parse().unwrap()));
        let fractions = [
            m.hit_rate_warning,
            m.hit_rate_critical,
            m.error_rate_warning,
            m.error_rate_critical,
            m.memory_warning,
            m.memory_critical,
        ]
        .map(Fraction::get);
        assert_eq!(fractions, [0.80, 0.60, 0.01, 0.05, 0.80, 0.95]);
        assert_eq!(m.latency_warning, Duration::from_millis(10));
        assert_eq!(m.latency_critical, Duration::from_millis(50));
        assert_eq!(m.probe_interval, Duration::from_secs(1));
        assert_eq!(m.window, Duration::from_secs(60));
        assert_eq!(load("[metrics]").unwrap().metrics, m);
    }

    #[test]
    fn metrics_listen_can_be_turned_off_or_pick_a_port() {
        let c = load("[metrics]\nlisten = \"\"").unwrap();
        assert_eq!(c.metrics.listen, None);
        let c = load("[metrics]\nlisten = \"[::1]:0\"").unwrap();
        assert_eq!(c.metrics.listen, Some("[::1]:0".parse().unwrap()));
        let msg = message_of("[metrics]\nlisten = \"localhost:9121\"");
        assert!(
            msg.starts_with("metrics.listen: \"localhost:9121\""),
            "{msg}"
        );
        assert!(
            msg.contains("\"\" to turn the metrics listener off"),
            "{msg}"
        );
    }

    #[test]
    fn metrics_thresholds_are_fractions() {
        let c =
            load("[metrics]\nhit_rate_warning = 1\nhit_rate_critical = 0\nmemory_critical = 1.0")
                .unwrap();
        assert_eq!(c.metrics.hit_rate_warning.get(), 1.0);
        assert_eq!(c.metrics.hit_rate_critical.get(), 0.0);
        assert_eq!(c.metrics.memory_critical.get(), 1.0);
        for key in [
            "hit_rate_warning",
            "hit_rate_critical",
            "error_rate_warning",
            "error_rate_critical",
            "memory_warning",
            "memory_critical",
        ] {
            assert_eq!(
                field_of(&format!("[metrics]\n{key} = -0.1")),
                format!("metrics.{key}")
            );
            assert_eq!(
                field_of(&format!("[metrics]\n{key} = nan")),
                format!("metrics.{key}")
            );
        }
        // A percentage where a fraction belongs gets the conversion spelled
        // out.
        assert_eq!(
            message_of("[metrics]\nmemory_warning = 80"),
            "metrics.memory_warning: 80 is not between 0 and 1: write a fraction, e.g. 0.8 \
             for 80% (80% is 0.8)"
        );
        assert!(matches!(
            load("[metrics]\nhit_rate_warning = \"80%\""),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn metrics_warning_and_critical_are_ordered() {
        assert_eq!(
            message_of("[metrics]\nhit_rate_warning = 0.5\nhit_rate_critical = 0.7"),
            "metrics.hit_rate_critical: 0.7 is above metrics.hit_rate_warning (0.5): a hit rate \
             is critical below hit_rate_critical and a warning below hit_rate_warning, so lower \
             hit_rate_critical or raise hit_rate_warning"
        );
        assert_eq!(
            message_of("[metrics]\nerror_rate_warning = 0.1"),
            "metrics.error_rate_critical: 0.05 is below metrics.error_rate_warning (0.1): a \
             value is a warning above error_rate_warning and critical above \
             error_rate_critical, so raise error_rate_critical or lower error_rate_warning"
        );
        assert_eq!(
            field_of("[metrics]\nmemory_warning = 0.99"),
            "metrics.memory_critical"
        );
        let msg = message_of("[metrics]\nlatency_warning = \"1s\"");
        assert!(
            msg.starts_with("metrics.latency_critical: 50ms is below metrics.latency_warning (1s)"),
            "{msg}"
        );
        // Equal levels are allowed: the warning then never shows.
        let c = load(
            "[metrics]\nhit_rate_warning = 0.6\nerror_rate_warning = 0.05\n\
             latency_warning = \"50ms\"\nmemory_warning = 0.95",
        )
        .unwrap();
        assert_eq!(c.metrics.hit_rate_warning, c.metrics.hit_rate_critical);
        assert_eq!(c.metrics.latency_warning, c.metrics.latency_critical);
    }

    #[test]
    fn metrics_durations_are_positive_and_the_window_holds_a_probe() {
        for key in [
            "latency_warning",
            "latency_critical",
            "probe_interval",
            "window",
        ] {
            let msg = message_of(&format!("[metrics]\n{key} = 0"));
            assert!(msg.starts_with(&format!("metrics.{key}: ")), "{msg}");
        }
        assert_eq!(
            message_of("[metrics]\nprobe_interval = \"2m\""),
            "metrics.window: 1m is shorter than metrics.probe_interval (2m): rates are \
             measured between probes, so raise window or lower probe_interval"
        );
        let c = load("[metrics]\nprobe_interval = \"250ms\"\nwindow = \"250ms\"").unwrap();
        assert_eq!(c.metrics.window, Duration::from_millis(250));
    }

    #[test]
    fn to_toml_round_trips_metrics() {
        let text = "[metrics]\nlisten = \"\"\nhit_rate_warning = 1\nhit_rate_critical = 0.125\n\
                    error_rate_warning = 0\nerror_rate_critical = 0.3\nlatency_warning = \"1ms\"\n\
                    latency_critical = \"2s\"\nmemory_warning = 0.5\nmemory_critical = 1\n\
                    probe_interval = \"100ms\"\nwindow = \"5m\"\n";
        let original = load(text).unwrap();
        let printed = original.to_toml();
        assert_eq!(load(&printed).unwrap(), original, "{printed}");
        assert!(printed.contains(
            "\n[metrics]\nlisten = \"\"\nhit_rate_warning = 1.0\nhit_rate_critical = 0.125\n"
        ));
        let c = load("[metrics]\nlisten = \"0.0.0.0:0\"").unwrap();
        assert_eq!(load(&c.to_toml()).unwrap(), c);
    }

    #[test]
    fn format_helpers_are_exact() {
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_nanos(1)), "1ms");
        assert_eq!(format_size(0), "0b");
        assert_eq!(format_size(1000), "1000b");
        assert_eq!(format_size(3 << 20), "3mb");
    }
}
