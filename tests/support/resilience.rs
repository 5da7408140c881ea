//! Helpers for the resilience tests (circuit breaker and stale serving):
//! configurations with fast timeouts, the breaker's state as `INFO tierd`
//! and `/metrics` show it, `CACHE.STATS` read by field name (so that a new
//! field breaks nothing but the check of that field), and a mixed load of
//! clients that log every request they sent, when, how long its reply took
//! and what it was: the tests judge the outage from those logs afterwards.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tierd::config::{Config, RuleConfig, TrackingMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::exchange::{encode, text};
use super::l1::{decode, l1_config, rule, Resp};
use super::probe::Deadline;
use super::{free_port, Raw, Tierd};

/// The reply to anything but a servable read while the breaker is open.
pub const CIRCUIT_OPEN: &[u8] = b"-TRYAGAIN upstream unavailable (circuit open)\r\n";
/// tierd's error for a request that went upstream and failed there (before
/// the breaker opens, and for a half-open probe that fails).
pub const UNAVAILABLE: &[u8] = b"-ERR upstream unavailable: ";

/// What one reply was, for judging a load's log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A bulk string: its payload.
    Value(Bytes),
    /// `$-1`.
    Nil,
    /// `+OK`.
    Ok,
    /// [`CIRCUIT_OPEN`], exactly.
    CircuitOpen,
    /// An [`UNAVAILABLE`] error.
    Unavailable,
    /// Redis's own `-LOADING`, passed through: a restarted Redis answers
    /// it while it reads its data back.
    Loading,
    /// Anything else, as sent.
    Other(Bytes),
}

impl Answer {
    pub fn of(frame: &Bytes) -> Answer {
        if frame.as_ref() == CIRCUIT_OPEN {
            return Answer::CircuitOpen;
        }
        if frame.starts_with(UNAVAILABLE) && frame.ends_with(b"\r\n") {
            return Answer::Unavailable;
        }
        if frame.starts_with(b"-LOADING ") {
            return Answer::Loading;
        }
        if frame.as_ref() == b"+OK\r\n" {
            return Answer::Ok;
        }
        if frame.as_ref() == b"$-1\r\n" {
            return Answer::Nil;
        }
        if let Resp::Bulk(Some(v)) = decode(frame) {
            return Answer::Value(Bytes::from(v));
        }
        Answer::Other(frame.clone())
    }

    pub fn is_error(&self) -> bool {
        matches!(
            self,
            Answer::CircuitOpen | Answer::Unavailable | Answer::Loading
        )
    }
}

// ---------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------

/// A rule for `pattern` whose entries live `ttl` and are kept `stale_ttl`
/// past it, to be served while the breaker is open.
pub fn stale_rule(name: &str, pattern: &str, ttl: Duration, stale_ttl: Duration) -> RuleConfig {
    let mut r = rule(name, pattern, ttl);
    r.stale_ttl = Some(stale_ttl);
    r
}

/// Upstream timings the tests set; see [`fast_config`].
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    pub command_timeout: Duration,
    pub connect_timeout: Duration,
    pub backoff_max: Duration,
    pub failure_threshold: usize,
    pub reset: Duration,
}

impl Default for Timings {
    fn default() -> Timings {
        Timings {
            command_timeout: Duration::from_millis(1000),
            connect_timeout: Duration::from_millis(250),
            backoff_max: Duration::from_millis(100),
            failure_threshold: 3,
            reset: Duration::from_millis(500),
        }
    }
}

/// The default configuration for `upstream` with `rules`, `tracking`, the
/// given timings (reconnects start after 10 ms), and the metrics listener
/// on a free port (returned).
pub fn fast_config(
    upstream: &str,
    tracking: TrackingMode,
    rules: Vec<RuleConfig>,
    t: Timings,
) -> (Config, SocketAddr) {
    let mut config = l1_config(upstream, tracking, rules);
    config.upstream.command_timeout = t.command_timeout;
    config.upstream.connect_timeout = t.connect_timeout;
    config.upstream.backoff_min = Duration::from_millis(10);
    config.upstream.backoff_max = t.backoff_max;
    config.upstream.failure_threshold = t.failure_threshold;
    config.upstream.reset = t.reset;
    let metrics = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.metrics.listen = Some(metrics);
    config.metrics.probe_interval = Duration::from_millis(100);
    (config, metrics)
}

// ---------------------------------------------------------------------------
// What tierd says about itself
// ---------------------------------------------------------------------------

/// `INFO tierd` (answered by tierd itself, so also while Redis is down):
/// its `field:value` lines.
pub async fn info_tierd(raw: &mut Raw) -> Vec<(String, String)> {
    let frame = raw.cmd(&["INFO", "tierd"]).await;
    let body = decode(&frame)
        .as_text()
        .unwrap_or_else(|| panic!("INFO tierd: {}", text(&frame)));
    body.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect()
}

/// The breaker's state in `INFO tierd`: the `circuit_state` field (the
/// spec's name; the `tierd_` prefix every other field of the section has
/// is accepted too). Panics when there is none.
pub async fn circuit_state(raw: &mut Raw) -> String {
    let info = info_tierd(raw).await;
    info.iter()
        .find(|(k, _)| k == "circuit_state" || k == "tierd_circuit_state")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| panic!("no circuit_state in INFO tierd: {info:?}"))
}

/// Polls `INFO tierd` until the breaker is in `state`; returns when that
/// was first seen.
pub async fn wait_circuit(raw: &mut Raw, state: &str, limit: Duration) -> Instant {
    let deadline = Deadline::new(limit, format!("circuit_state:{state}"));
    loop {
        if circuit_state(raw).await == state {
            return Instant::now();
        }
        deadline.tick().await;
    }
}

/// One rule's `CACHE.STATS` element as (field, value) pairs, in order.
pub async fn stats_fields(raw: &mut Raw, rule: &str) -> Vec<(String, Resp)> {
    let frame = raw.cmd(&["CACHE.STATS", rule]).await;
    let element = decode(&frame);
    match element {
        Resp::Map(pairs) => pairs
            .into_iter()
            .map(|(k, v)| (k.as_text().unwrap_or_default(), v))
            .collect(),
        Resp::Array(Some(flat)) => {
            assert!(flat.len() % 2 == 0, "odd CACHE.STATS array: {flat:?}");
            flat.chunks(2)
                .map(|c| (c[0].as_text().unwrap_or_default(), c[1].clone()))
                .collect()
        }
        other => panic!("CACHE.STATS {rule}: {other:?}"),
    }
}

/// One integer field of a rule's `CACHE.STATS`.
pub async fn stat(raw: &mut Raw, rule: &str, field: &str) -> u64 {
    let fields = stats_fields(raw, rule).await;
    let (_, v) = fields
        .iter()
        .find(|(k, _)| k == field)
        .unwrap_or_else(|| panic!("no {field} in CACHE.STATS {rule}: {fields:?}"));
    let n = v
        .as_int()
        .unwrap_or_else(|| panic!("{field} of {rule} is not an integer: {v:?}"));
    u64::try_from(n).unwrap()
}

/// A rule's `stale_serves`, checked to be where the spec puts it: the
/// field right after `refreshes`.
pub async fn stale_serves(raw: &mut Raw, rule: &str) -> u64 {
    let fields = stats_fields(raw, rule).await;
    let names: Vec<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
    let at = names
        .iter()
        .position(|n| *n == "refreshes")
        .unwrap_or_else(|| panic!("no refreshes in CACHE.STATS {rule}: {names:?}"));
    assert_eq!(
        names.get(at + 1).copied(),
        Some("stale_serves"),
        "CACHE.STATS {rule}: stale_serves must follow refreshes: {names:?}"
    );
    let v = &fields[at + 1].1;
    u64::try_from(
        v.as_int()
            .unwrap_or_else(|| panic!("stale_serves is not an integer: {v:?}")),
    )
    .unwrap()
}

/// Reads `GET key` through `tierd` until one read is an L1 hit of `rule`
/// (tierd caches once it has the command table and its tracking link).
pub async fn wait_caching(tierd: &Tierd, rule: &str, key: &str) {
    let mut reader = tierd.raw().await;
    let mut stats = tierd.raw().await;
    let deadline = Deadline::new(
        Duration::from_secs(10),
        format!("GET {key} an L1 hit of {rule}"),
    );
    loop {
        let before = stat(&mut stats, rule, "hits").await;
        reader.cmd(&["GET", key]).await;
        if stat(&mut stats, rule, "hits").await > before {
            return;
        }
        deadline.tick().await;
    }
}

/// One `/metrics` scrape, parsed.
pub struct Metrics {
    pub samples: Vec<prometheus_parse::Sample>,
    pub body: String,
}

impl Metrics {
    /// The value of the sample `name` whose labels are exactly `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        use prometheus_parse::Value;
        self.samples
            .iter()
            .find(|s| {
                s.metric == name
                    && s.labels.len() == labels.len()
                    && labels.iter().all(|&(k, v)| s.labels.get(k) == Some(v))
            })
            .map(|s| match s.value {
                Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
                ref other => panic!("{name}{labels:?}: {other:?}"),
            })
    }

    /// As [`Metrics::value`], panicking (with the body) when absent.
    #[track_caller]
    pub fn must(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.value(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in /metrics:\n{}", self.body))
    }
}

/// `GET /metrics` on tierd's metrics listener (waiting for it to listen).
pub async fn scrape(addr: SocketAddr) -> Metrics {
    let deadline = Deadline::new(Duration::from_secs(10), format!("metrics on {addr}"));
    let mut stream = loop {
        match TcpStream::connect(addr).await {
            Ok(s) => break s,
            Err(_) => deadline.tick().await,
        }
    };
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("/metrics answered within 10 s")
        .unwrap();
    let all = String::from_utf8(raw).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let scrape = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("/metrics does not parse ({e}):\n{body}"));
    Metrics {
        samples: scrape.samples,
        body: body.to_owned(),
    }
}

// ---------------------------------------------------------------------------
// A logged load
// ---------------------------------------------------------------------------

/// What a load client does, one request at a time.
#[derive(Debug, Clone)]
pub enum Job {
    /// `GET` each of `keys` in turn.
    Read { keys: Vec<String> },
    /// `SET {prefix}{n} {prefix}{n}` for n = 1, 2, … (a new key each time,
    /// so an acknowledged write is checked by its key alone).
    Write { prefix: String },
}

/// One request and its reply.
#[derive(Debug, Clone)]
pub struct Op {
    pub started: Instant,
    pub latency: Duration,
    pub key: String,
    /// The value a write sent.
    pub value: Option<String>,
    pub reply: Bytes,
}

impl Op {
    pub fn answer(&self) -> Answer {
        Answer::of(&self.reply)
    }
}

/// One client's progress, readable while it runs.
#[derive(Default)]
pub struct Progress {
    /// Replies that were not errors.
    pub ok: AtomicU64,
    /// Error replies.
    pub errors: AtomicU64,
}

/// A running client: its name, progress and task.
pub struct LoadClient {
    pub name: String,
    pub progress: Arc<Progress>,
    task: tokio::task::JoinHandle<Result<Vec<Op>, String>>,
}

/// Several clients through one tierd, until [`Load::finish`].
pub struct Load {
    pub clients: Vec<LoadClient>,
    stop: Arc<AtomicBool>,
}

impl Load {
    /// Starts one client per job, each on its own connection to `addr`. A
    /// client fails (and stops) when a reply does not come within
    /// `reply_limit`: that is a hang, or a lost reply.
    ///
    /// Each client waits `pace` after each reply: that shapes the load (a
    /// few hundred requests per second per client keeps the logs small and
    /// leaves the two cores to tierd and Redis); it synchronises nothing.
    pub fn start(
        addr: SocketAddr,
        jobs: Vec<(String, Job)>,
        reply_limit: Duration,
        pace: Duration,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = jobs
            .into_iter()
            .map(|(name, job)| {
                let progress = Arc::new(Progress::default());
                let task = tokio::spawn(run_client(
                    addr,
                    name.clone(),
                    job,
                    progress.clone(),
                    stop.clone(),
                    reply_limit,
                    pace,
                ));
                LoadClient {
                    name,
                    progress,
                    task,
                }
            })
            .collect();
        Load { clients, stop }
    }

    /// (ok, errors) per client.
    pub fn snapshot(&self) -> Vec<(u64, u64)> {
        self.clients
            .iter()
            .map(|c| {
                (
                    c.progress.ok.load(Ordering::Relaxed),
                    c.progress.errors.load(Ordering::Relaxed),
                )
            })
            .collect()
    }

    /// Panics when a client has stopped on its own (it found a lost reply).
    pub fn assert_running(&self) {
        for c in &self.clients {
            assert!(
                !c.task.is_finished(),
                "load client {} stopped early (a reply did not come in time)",
                c.name
            );
        }
    }

    /// Waits until every client has `n` more non-error replies than in
    /// `since` (a [`Load::snapshot`]).
    pub async fn wait_ok(&self, since: &[(u64, u64)], n: u64, limit: Duration, what: &str) {
        self.wait_each(since, n, limit, what, |(ok, _)| ok).await;
    }

    /// Waits until every client has `n` more error replies than in `since`.
    pub async fn wait_errors(&self, since: &[(u64, u64)], n: u64, limit: Duration, what: &str) {
        self.wait_each(since, n, limit, what, |(_, errors)| errors)
            .await;
    }

    /// Waits until every client's `count` of its snapshot is `n` past
    /// `since`'s; fails after `limit`, or at once if a client stopped.
    async fn wait_each(
        &self,
        since: &[(u64, u64)],
        n: u64,
        limit: Duration,
        what: &str,
        count: fn((u64, u64)) -> u64,
    ) {
        let deadline = Deadline::new(limit, what.to_owned());
        loop {
            let now = self.snapshot();
            if now
                .iter()
                .zip(since)
                .all(|(a, b)| count(*a) >= count(*b) + n)
            {
                return;
            }
            self.assert_running();
            deadline.tick().await;
        }
    }

    /// Stops every client and returns each one's log, by name.
    pub async fn finish(self) -> Vec<(String, Vec<Op>)> {
        self.stop.store(true, Ordering::Relaxed);
        let mut out = Vec::new();
        for c in self.clients {
            let log = c
                .task
                .await
                .unwrap()
                .unwrap_or_else(|e| panic!("load client {}: {e}", c.name));
            out.push((c.name, log));
        }
        out
    }
}

async fn run_client(
    addr: SocketAddr,
    name: String,
    job: Job,
    progress: Arc<Progress>,
    stop: Arc<AtomicBool>,
    reply_limit: Duration,
    pace: Duration,
) -> Result<Vec<Op>, String> {
    let mut raw = Raw::connect(addr).await;
    let mut log = Vec::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let (key, value, request) = match &job {
            Job::Read { keys } => {
                let key = keys[(n as usize - 1) % keys.len()].clone();
                let request = encode(&["GET", &key]);
                (key, None, request)
            }
            Job::Write { prefix } => {
                let key = format!("{prefix}{n}");
                let request = encode(&["SET", &key, &key]);
                (key.clone(), Some(key), request)
            }
        };
        let started = Instant::now();
        raw.send(&request).await;
        let Some(reply) = raw.try_frame(reply_limit).await else {
            return Err(format!(
                "{name}: no reply to request {n} ({key}) within {reply_limit:?}"
            ));
        };
        let latency = started.elapsed();
        if Answer::of(&reply).is_error() || reply.starts_with(b"-") {
            progress.errors.fetch_add(1, Ordering::Relaxed);
        } else {
            progress.ok.fetch_add(1, Ordering::Relaxed);
        }
        log.push(Op {
            started,
            latency,
            key,
            value,
            reply,
        });
        tokio::time::sleep(pace).await;
    }
    Ok(log)
}

/// The largest latency among `ops`, with the op.
pub fn slowest<'a>(ops: impl IntoIterator<Item = &'a Op>) -> Option<&'a Op> {
    ops.into_iter().max_by_key(|o| o.latency)
}
