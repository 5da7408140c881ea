//! What `/health` and `/ready` say, and the prober that keeps it fresh.
//!
//! The prober is one task with one upstream connection of its own (named
//! [`PROBE_NAME`] upstream). Every `[metrics] probe_interval` it sends
//! `PING`, timing the round trip, and `INFO memory`, for the share of
//! `maxmemory` in use; it sets the `tierd_upstream_up` gauge from the
//! outcome. A probe that fails or is not answered within the upstream
//! command timeout marks upstream as down, and the connection is replaced
//! with the upstream backoff between attempts.
//!
//! The prober also records, on each probe tick, the counters the rates come
//! from: L1 hits and misses, requests, "upstream unavailable" answers and
//! sampled upstream latency. A report compares the counters as they are at
//! that moment with the last sample that is at least `[metrics] window`
//! old, so its rates cover the window and include traffic up to the request.
//! At most [`WINDOW_SAMPLES`] samples are kept whatever the window.
//!
//! This module reads the session context and the metrics registry; it never
//! touches the cache, and its connection carries nothing but probes.

use std::collections::VecDeque;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use parking_lot::Mutex;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::config::MetricsConfig;
use crate::protocol::{inspect, Proto, ReplyFramer};
use crate::session::Ctx;
use crate::upstream::Timeouts;

/// The prober's client name upstream (`CLIENT LIST`).
pub const PROBE_NAME: &str = "tierd:health";

/// At most this many counter samples are kept: samples closer together than
/// `window / WINDOW_SAMPLES` are skipped, so a long window costs no more
/// memory than a short one.
pub const WINDOW_SAMPLES: u32 = 60;

/// The largest probe reply read (`INFO memory` is about 1.5 KB).
const MAX_PROBE_REPLY: usize = 1 << 20;

const PING: &[u8] = b"*1\r\n$4\r\nPING\r\n";
const INFO_MEMORY: &[u8] = b"*2\r\n$4\r\nINFO\r\n$6\r\nmemory\r\n";

/// The overall verdict of `/health`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Status {
    /// Every check is ok.
    Healthy,
    /// Some check is past its warning level; still served with 200.
    Degraded,
    /// Some check is past its critical level, or upstream does not answer;
    /// served with 503.
    Unhealthy,
}

impl Status {
    /// The JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Healthy => "healthy",
            Status::Degraded => "degraded",
            Status::Unhealthy => "unhealthy",
        }
    }

    /// The HTTP status code `/health` answers with.
    pub fn http_code(self) -> u16 {
        match self {
            Status::Healthy | Status::Degraded => 200,
            Status::Unhealthy => 503,
        }
    }
}

/// One check's verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Level {
    /// Within bounds, or nothing to judge (no value).
    Ok,
    /// Past the warning level.
    Warning,
    /// Past the critical level.
    Critical,
}

impl Level {
    /// The JSON value.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Ok => "ok",
            Level::Warning => "warning",
            Level::Critical => "critical",
        }
    }

    fn status(self) -> Status {
        match self {
            Level::Ok => Status::Healthy,
            Level::Warning => Status::Degraded,
            Level::Critical => Status::Unhealthy,
        }
    }
}

/// What the last probe found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamState {
    /// The last probe was answered.
    pub connected: bool,
    /// Its `PING` round trip.
    pub latency: Option<Duration>,
    /// `used_memory` as a share of `maxmemory` (or of the host's memory);
    /// `None` when upstream does not say.
    pub memory: Option<f64>,
    /// Why the last probe failed; `None` before the first one.
    pub error: Option<String>,
}

/// Monotonic counters the windowed rates are differences of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    /// L1 lookups answered from L1, all rules.
    pub hits: u64,
    /// L1 lookups that went upstream, all rules.
    pub misses: u64,
    /// Requests received.
    pub requests: u64,
    /// Requests answered with "upstream unavailable".
    pub errors: u64,
    /// Upstream latency samples.
    pub latency_count: u64,
    /// Their sum in nanoseconds.
    pub latency_sum_ns: u64,
}

impl Counters {
    /// The counters of `ctx` now.
    pub fn read(ctx: &Ctx) -> Counters {
        let (hits, misses) = ctx.l1.as_ref().map_or((0, 0), |l1| {
            l1.store.stats().iter().fold((0u64, 0u64), |(h, m), r| {
                (h.saturating_add(r.hits), m.saturating_add(r.misses))
            })
        });
        let (latency_count, latency_sum_ns) = ctx.metrics.upstream_latency.totals();
        Counters {
            hits,
            misses,
            requests: ctx.metrics.requests_total(),
            errors: ctx.metrics.upstream_errors_total(),
            latency_count,
            latency_sum_ns,
        }
    }

    /// What happened between `earlier` and `self`.
    pub fn since(self, earlier: Counters) -> Counters {
        Counters {
            hits: self.hits.saturating_sub(earlier.hits),
            misses: self.misses.saturating_sub(earlier.misses),
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency_count: self.latency_count.saturating_sub(earlier.latency_count),
            latency_sum_ns: self.latency_sum_ns.saturating_sub(earlier.latency_sum_ns),
        }
    }
}

/// Health state shared by the prober and the HTTP handlers.
#[derive(Debug)]
pub struct Health {
    config: MetricsConfig,
    /// Sync lock, held only to copy or update the state; never across an
    /// `.await`.
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    upstream: UpstreamState,
    /// Counter samples, oldest first.
    samples: VecDeque<(Instant, Counters)>,
}

impl Health {
    /// Health state judged by `config`'s thresholds; upstream counts as
    /// down until the first probe answers.
    pub fn new(config: &MetricsConfig) -> Health {
        Health {
            config: config.clone(),
            state: Mutex::new(State::default()),
        }
    }

    /// Whether the last probe was answered.
    pub fn upstream_connected(&self) -> bool {
        self.state.lock().upstream.connected
    }

    /// Records the counters as they were at `at`, dropping samples the
    /// window no longer needs: the oldest kept is the newest one at least a
    /// window old.
    pub fn sample(&self, at: Instant, counters: Counters) {
        let window = self.config.window;
        let spacing = window / WINDOW_SAMPLES;
        let mut state = self.state.lock();
        let samples = &mut state.samples;
        while samples
            .get(1)
            .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= window)
        {
            samples.pop_front();
        }
        if samples
            .back()
            .map_or(true, |(t, _)| at.saturating_duration_since(*t) >= spacing)
        {
            samples.push_back((at, counters));
        }
    }

    fn set_upstream(&self, upstream: UpstreamState) {
        self.state.lock().upstream = upstream;
    }

    /// The health of `ctx` now.
    pub fn report(&self, ctx: &Ctx) -> Report {
        let now = Counters::read(ctx);
        let (upstream, base) = {
            let state = self.state.lock();
            let base = state.samples.front().map(|(_, c)| *c).unwrap_or_default();
            (state.upstream.clone(), base)
        };
        evaluate(&self.config, upstream, now.since(base), ctx.l1.is_some())
    }

    /// Why `ctx` is not ready to serve; empty when it is.
    pub fn not_ready(&self, ctx: &Ctx) -> Vec<String> {
        let mut why = Vec::new();
        if ctx.table.generation() == 0 {
            why.push("the command table has not been read from upstream yet".to_owned());
        }
        let upstream = self.state.lock().upstream.clone();
        if !upstream.connected {
            why.push(upstream_down(&upstream));
        }
        why
    }
}

fn upstream_down(upstream: &UpstreamState) -> String {
    match &upstream.error {
        Some(e) => format!("upstream is not answering: {e}"),
        None => "upstream has not been probed yet".to_owned(),
    }
}

/// A check's value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Value {
    /// Whether upstream answers.
    Bool(bool),
    /// A measure; `None` when there was nothing to measure.
    Number(Option<f64>),
}

/// One line of `/health`'s `checks`.
#[derive(Debug, Clone, PartialEq)]
pub struct Check {
    /// `upstream`, `hit_rate`, `error_rate`, `latency` or `memory`.
    pub name: &'static str,
    /// The verdict.
    pub level: Level,
    /// What was measured, in the unit of the thresholds below.
    pub value: Value,
    /// The warning and critical levels, in the value's unit.
    pub thresholds: Option<(f64, f64)>,
    /// Why it is not ok.
    pub reason: Option<String>,
}

/// The `/health` answer.
#[derive(Debug, Clone)]
pub struct Report {
    /// The worst check's verdict.
    pub status: Status,
    /// The last probe's findings.
    pub upstream: UpstreamState,
    /// L1 hit rate over the window; `None` without L1 or lookups.
    pub hit_rate: Option<f64>,
    /// "Upstream unavailable" answers per request over the window; 0
    /// without requests.
    pub error_rate: f64,
    /// Mean sampled upstream command latency over the window, in ms; `None`
    /// without samples.
    pub avg_latency_ms: Option<f64>,
    /// Every check, upstream first.
    pub checks: Vec<Check>,
    config: MetricsConfig,
}

/// Judges `delta` (the counters' movement over the window) and the last
/// probe by `config`'s thresholds.
pub fn evaluate(
    config: &MetricsConfig,
    upstream: UpstreamState,
    delta: Counters,
    has_l1: bool,
) -> Report {
    let lookups = delta.hits.saturating_add(delta.misses);
    let hit_rate = (has_l1 && lookups > 0).then(|| delta.hits as f64 / lookups as f64);
    let error_rate = if delta.requests == 0 {
        0.0
    } else {
        delta.errors as f64 / delta.requests as f64
    };
    let avg_latency_ms = (delta.latency_count > 0)
        .then(|| delta.latency_sum_ns as f64 / delta.latency_count as f64 / 1e6);
    let latency_ms = upstream.latency.map(|d| d.as_secs_f64() * 1e3);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;

    let mut checks = vec![Check {
        name: "upstream",
        level: if upstream.connected {
            Level::Ok
        } else {
            Level::Critical
        },
        value: Value::Bool(upstream.connected),
        thresholds: None,
        reason: (!upstream.connected).then(|| upstream_down(&upstream)),
    }];
    let c = config;
    // Rates over too few samples are reported, not judged.
    let judged_hit_rate = hit_rate.filter(|_| lookups >= c.min_samples);
    let judged_error_rate = (delta.requests >= c.min_samples).then_some(error_rate);
    let measures = [
        (
            "hit_rate",
            judged_hit_rate,
            c.hit_rate_warning.get(),
            c.hit_rate_critical.get(),
            Direction::LowIsBad,
        ),
        (
            "error_rate",
            judged_error_rate,
            c.error_rate_warning.get(),
            c.error_rate_critical.get(),
            Direction::HighIsBad,
        ),
        (
            "latency",
            latency_ms,
            ms(c.latency_warning),
            ms(c.latency_critical),
            Direction::HighIsBad,
        ),
        (
            "memory",
            upstream.memory,
            c.memory_warning.get(),
            c.memory_critical.get(),
            Direction::HighIsBad,
        ),
    ];
    for (name, value, warning, critical, direction) in measures {
        let level = direction.judge(value, warning, critical);
        let reason = value.filter(|_| level != Level::Ok).map(|v| {
            let (limit, which) = match level {
                Level::Critical => (critical, "critical"),
                _ => (warning, "warning"),
            };
            let side = match direction {
                Direction::LowIsBad => "below",
                Direction::HighIsBad => "above",
            };
            let unit = if name == "latency" { " ms" } else { "" };
            format!("{name} {v:.4}{unit} is {side} the {which} level {limit}{unit}")
        });
        checks.push(Check {
            name,
            level,
            value: Value::Number(value),
            thresholds: Some((warning, critical)),
            reason,
        });
    }
    let status = checks
        .iter()
        .map(|c| c.level.status())
        .max()
        .unwrap_or(Status::Healthy);
    Report {
        status,
        upstream,
        hit_rate,
        error_rate,
        avg_latency_ms,
        checks,
        config: config.clone(),
    }
}

#[derive(Debug, Clone, Copy)]
enum Direction {
    LowIsBad,
    HighIsBad,
}

impl Direction {
    /// A missing value is ok: there was nothing to judge.
    fn judge(self, value: Option<f64>, warning: f64, critical: f64) -> Level {
        let Some(v) = value else {
            return Level::Ok;
        };
        let past = |limit: f64| match self {
            Direction::LowIsBad => v < limit,
            Direction::HighIsBad => v > limit,
        };
        if past(critical) {
            Level::Critical
        } else if past(warning) {
            Level::Warning
        } else {
            Level::Ok
        }
    }
}

impl Report {
    /// The HTTP status code: 200 when healthy or degraded, 503 when
    /// unhealthy.
    pub fn http_code(&self) -> u16 {
        self.status.http_code()
    }

    /// The JSON body.
    ///
    /// # Format
    ///
    /// ```text
    /// {"status":"healthy"|"degraded"|"unhealthy",
    ///  "reasons":[string…],
    ///  "upstream":{"connected":bool,"latency_ms":num|null,"memory_percent":num|null,"error":string|null},
    ///  "cache":{"hit_rate":num|null,"error_rate":num,"avg_latency_ms":num|null,"window_seconds":num},
    ///  "thresholds":{"hit_rate_warning":num,"hit_rate_critical":num,"error_rate_warning":num,
    ///                "error_rate_critical":num,"latency_warning_ms":num,"latency_critical_ms":num,
    ///                "memory_warning":num,"memory_critical":num},
    ///  "checks":[{"name":string,"status":"ok"|"warning"|"critical","value":bool|num|null,
    ///             "warning":num,"critical":num}…]}
    /// ```
    pub fn to_json(&self) -> String {
        let c = &self.config;
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let mut out = String::with_capacity(1024);
        out.push('{');
        let _ = write!(out, "\"status\":{}", json_string(self.status.as_str()));
        let reasons: Vec<String> = self
            .checks
            .iter()
            .filter_map(|c| c.reason.as_deref().map(json_string))
            .collect();
        let _ = write!(out, ",\"reasons\":[{}]", reasons.join(","));
        let up = &self.upstream;
        let _ = write!(
            out,
            ",\"upstream\":{{\"connected\":{},\"latency_ms\":{},\"memory_percent\":{},\"error\":{}}}",
            up.connected,
            json_number(up.latency.map(|d| d.as_secs_f64() * 1e3)),
            json_number(up.memory.map(|m| m * 100.0)),
            up.error
                .as_deref()
                .filter(|_| !up.connected)
                .map_or_else(|| "null".to_owned(), json_string),
        );
        let _ = write!(
            out,
            ",\"cache\":{{\"hit_rate\":{},\"error_rate\":{},\"avg_latency_ms\":{},\"window_seconds\":{}}}",
            json_number(self.hit_rate),
            json_number(Some(self.error_rate)),
            json_number(self.avg_latency_ms),
            json_number(Some(c.window.as_secs_f64())),
        );
        let thresholds = [
            ("hit_rate_warning", c.hit_rate_warning.get()),
            ("hit_rate_critical", c.hit_rate_critical.get()),
            ("error_rate_warning", c.error_rate_warning.get()),
            ("error_rate_critical", c.error_rate_critical.get()),
            ("latency_warning_ms", ms(c.latency_warning)),
            ("latency_critical_ms", ms(c.latency_critical)),
            ("memory_warning", c.memory_warning.get()),
            ("memory_critical", c.memory_critical.get()),
        ];
        out.push_str(",\"thresholds\":{");
        for (i, (name, v)) in thresholds.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let _ = write!(out, "{sep}\"{name}\":{}", json_number(Some(*v)));
        }
        out.push_str("},\"checks\":[");
        for (i, check) in self.checks.iter().enumerate() {
            let sep = if i == 0 { "" } else { "," };
            let value = match check.value {
                Value::Bool(b) => b.to_string(),
                Value::Number(n) => json_number(n),
            };
            let _ = write!(
                out,
                "{sep}{{\"name\":{},\"status\":{},\"value\":{value}",
                json_string(check.name),
                json_string(check.level.as_str()),
            );
            if let Some((warning, critical)) = check.thresholds {
                let _ = write!(
                    out,
                    ",\"warning\":{},\"critical\":{}",
                    json_number(Some(warning)),
                    json_number(Some(critical))
                );
            }
            out.push('}');
        }
        out.push_str("]}");
        out
    }
}

/// A JSON number, or `null` for none and for what JSON cannot express
/// (NaN, infinities). Rust's `Display` for `f64` never uses an exponent,
/// so the text is always a valid JSON number.
fn json_number(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        _ => "null".to_owned(),
    }
}

/// A JSON string literal, escaped per RFC 8259.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// `used_memory` as a share of `maxmemory`, or of `total_system_memory`
/// when `maxmemory` is 0 (no limit); `None` when neither is known.
pub fn memory_share(info: &[u8]) -> Option<f64> {
    let text = std::str::from_utf8(info).ok()?;
    let field = |name: &str| -> Option<u64> {
        text.lines().find_map(|line| {
            line.strip_prefix(name)?
                .strip_prefix(':')?
                .trim()
                .parse()
                .ok()
        })
    };
    let used = field("used_memory")?;
    let limit = field("maxmemory")
        .filter(|&m| m > 0)
        .or_else(|| field("total_system_memory").filter(|&m| m > 0))?;
    Some(used as f64 / limit as f64)
}

/// Probes upstream every `probe_interval` until `stop` changes or its
/// sender is dropped, and samples the counters for the windowed rates.
pub async fn run(ctx: Arc<Ctx>, health: Arc<Health>, mut stop: watch::Receiver<()>) {
    let timeouts = ctx.upstream.timeouts();
    // Validation keeps the interval above zero; `interval` would panic on
    // zero from a configuration built in code.
    let period = health.config.probe_interval.max(Duration::from_millis(1));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut link: Option<ProbeConn> = None;
    let mut backoff = timeouts.backoff_min;
    let mut retry_at = Instant::now();
    // Whether the last outcome was logged as up; `None` before the first.
    let mut was_up: Option<bool> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => return,
        }
        health.sample(Instant::now(), Counters::read(&ctx));
        if link.is_none() && Instant::now() < retry_at {
            continue;
        }
        let outcome = tokio::select! {
            outcome = probe(&ctx, &mut link, timeouts) => outcome,
            _ = stop.changed() => return,
        };
        let up = outcome.is_ok();
        ctx.metrics.set_upstream_up(up);
        match outcome {
            Ok((latency, memory)) => {
                backoff = timeouts.backoff_min;
                if was_up != Some(true) {
                    tracing::info!(latency = ?latency, "upstream answering");
                }
                health.set_upstream(UpstreamState {
                    connected: true,
                    latency: Some(latency),
                    memory,
                    error: None,
                });
            }
            Err(error) => {
                link = None;
                retry_at = Instant::now() + backoff;
                backoff = (backoff * 2).min(timeouts.backoff_max);
                if was_up != Some(false) {
                    tracing::warn!(%error, "upstream not answering");
                }
                health.set_upstream(UpstreamState {
                    connected: false,
                    latency: None,
                    memory: None,
                    error: Some(error),
                });
            }
        }
        was_up = Some(up);
    }
}

/// One probe on `link`, connecting first if there is none: the `PING`
/// round trip and the memory share.
async fn probe(
    ctx: &Ctx,
    link: &mut Option<ProbeConn>,
    timeouts: Timeouts,
) -> Result<(Duration, Option<f64>), String> {
    let conn = match link {
        Some(conn) => conn,
        None => link.insert(ProbeConn::connect(ctx, timeouts).await?),
    };
    conn.probe(timeouts).await
}

/// The prober's upstream connection.
struct ProbeConn {
    stream: TcpStream,
    buf: BytesMut,
    framer: ReplyFramer,
}

impl ProbeConn {
    async fn connect(ctx: &Ctx, timeouts: Timeouts) -> Result<ProbeConn, String> {
        let work = async {
            let (stream, _) = ctx
                .upstream
                .control_connection(Proto::Resp2)
                .await
                .map_err(|e| e.to_string())?;
            let mut conn = ProbeConn {
                stream,
                buf: BytesMut::with_capacity(4096),
                framer: ReplyFramer::new(timeouts.max_depth),
            };
            // The name only helps operators reading CLIENT LIST; an ACL
            // that forbids it must not stop the probes.
            let setname = crate::protocol::reply::encode_command(&[
                b"CLIENT",
                b"SETNAME",
                PROBE_NAME.as_bytes(),
            ]);
            conn.call(&setname).await?;
            Ok(conn)
        };
        match tokio::time::timeout(timeouts.connect + timeouts.command, work).await {
            Ok(res) => res,
            Err(_) => Err(format!(
                "no connection within {:?}",
                timeouts.connect + timeouts.command
            )),
        }
    }

    async fn probe(&mut self, timeouts: Timeouts) -> Result<(Duration, Option<f64>), String> {
        let work = async {
            let sent = Instant::now();
            let pong = self.call(PING).await?;
            let latency = sent.elapsed();
            if inspect::is_error(&pong) {
                return Err(format!(
                    "PING answered {}",
                    String::from_utf8_lossy(&pong).trim_end()
                ));
            }
            // An error here (an ACL without INFO) only means the memory
            // share is unknown.
            let info = self.call(INFO_MEMORY).await?;
            let memory = inspect::string_payload(&info).and_then(memory_share);
            Ok((latency, memory))
        };
        match tokio::time::timeout(timeouts.command, work).await {
            Ok(res) => res,
            Err(_) => Err(format!("no reply to PING within {:?}", timeouts.command)),
        }
    }

    /// Sends one command and reads its reply frame.
    async fn call(&mut self, raw: &[u8]) -> Result<Bytes, String> {
        self.stream
            .write_all(raw)
            .await
            .map_err(|e| format!("write: {e}"))?;
        loop {
            match self.framer.frame(&self.buf) {
                Ok(Some(len)) => return Ok(self.buf.split_to(len).freeze()),
                Ok(None) => {}
                Err(e) => return Err(format!("bad reply: {e}")),
            }
            if self.buf.len() > MAX_PROBE_REPLY {
                return Err("reply too large".to_owned());
            }
            self.buf.reserve(4096);
            match self.stream.read_buf(&mut self.buf).await {
                Ok(0) => return Err("connection closed by upstream".to_owned()),
                Ok(_) => {}
                Err(e) => return Err(format!("read: {e}")),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::config::{Config, Fraction};

    fn up(latency_ms: u64, memory: Option<f64>) -> UpstreamState {
        UpstreamState {
            connected: true,
            latency: Some(Duration::from_millis(latency_ms)),
            memory,
            error: None,
        }
    }

    fn traffic(hits: u64, misses: u64, requests: u64, errors: u64) -> Counters {
        Counters {
            hits,
            misses,
            requests,
            errors,
            latency_count: 4,
            latency_sum_ns: 4_000_000,
        }
    }

    fn level(report: &Report, name: &str) -> Level {
        report.checks.iter().find(|c| c.name == name).unwrap().level
    }

    #[test]
    fn a_quiet_connected_upstream_is_healthy() {
        let config = Config::default().metrics;
        let r = evaluate(&config, up(1, Some(0.1)), Counters::default(), true);
        assert_eq!(r.status, Status::Healthy);
        assert_eq!(r.http_code(), 200);
        // No lookups and no requests: nothing to judge.
        assert_eq!(r.hit_rate, None);
        assert_eq!(r.error_rate, 0.0);
        assert_eq!(r.avg_latency_ms, None);
        assert!(r
            .checks
            .iter()
            .all(|c| c.level == Level::Ok && c.reason.is_none()));
    }

    #[test]
    fn rates_over_too_few_samples_are_reported_not_judged() {
        let config = Config::default().metrics;
        // 1 hit in 10 lookups, 5 errors in 10 requests: below min_samples.
        let r = evaluate(&config, up(1, None), traffic(1, 9, 10, 5), true);
        assert_eq!(r.status, Status::Healthy);
        assert_eq!(r.hit_rate, Some(0.1));
        assert_eq!(level(&r, "hit_rate"), Level::Ok);
        assert_eq!(level(&r, "error_rate"), Level::Ok);
        // The same rates over enough samples are critical.
        let r = evaluate(&config, up(1, None), traffic(10, 90, 100, 50), true);
        assert_eq!(level(&r, "hit_rate"), Level::Critical);
        assert_eq!(level(&r, "error_rate"), Level::Critical);
    }

    #[test]
    fn each_measure_degrades_then_fails() {
        let mut config = Config::default().metrics;
        config.min_samples = 0;
        let judge = |up: UpstreamState, c: Counters| evaluate(&config, up, c, true);
        // Hit rate: 0.9 ok, 0.7 warning, 0.5 critical; exactly 0.8 is ok.
        assert_eq!(
            judge(up(1, None), traffic(9, 1, 10, 0)).status,
            Status::Healthy
        );
        assert_eq!(
            judge(up(1, None), traffic(4, 1, 5, 0)).status,
            Status::Healthy
        );
        let r = judge(up(1, None), traffic(7, 3, 10, 0));
        assert_eq!(
            (r.status, level(&r, "hit_rate")),
            (Status::Degraded, Level::Warning)
        );
        let r = judge(up(1, None), traffic(1, 1, 10, 0));
        assert_eq!((r.status, r.http_code()), (Status::Unhealthy, 503));
        // Error rate: 2% warns, 10% is critical.
        let r = judge(up(1, None), traffic(0, 0, 100, 2));
        assert_eq!(level(&r, "error_rate"), Level::Warning);
        assert_eq!(r.error_rate, 0.02);
        let r = judge(up(1, None), traffic(0, 0, 100, 10));
        assert_eq!(level(&r, "error_rate"), Level::Critical);
        // Latency of the PING: 20 ms warns, 60 ms is critical.
        assert_eq!(
            level(&judge(up(20, None), Counters::default()), "latency"),
            Level::Warning
        );
        assert_eq!(
            level(&judge(up(60, None), Counters::default()), "latency"),
            Level::Critical
        );
        // Memory: 85% warns, 96% is critical.
        assert_eq!(
            level(&judge(up(1, Some(0.85)), Counters::default()), "memory"),
            Level::Warning
        );
        let r = judge(up(1, Some(0.96)), Counters::default());
        assert_eq!(level(&r, "memory"), Level::Critical);
        assert_eq!(
            r.checks[4].reason.as_deref(),
            Some("memory 0.9600 is above the critical level 0.95")
        );
    }

    #[test]
    fn a_disconnected_upstream_is_unhealthy_whatever_else() {
        let config = Config::default().metrics;
        let down = UpstreamState {
            connected: false,
            latency: None,
            memory: None,
            error: Some("connect to 127.0.0.1:1: refused".into()),
        };
        let r = evaluate(&config, down, traffic(9, 1, 10, 0), true);
        assert_eq!(r.status, Status::Unhealthy);
        assert_eq!(r.checks[0].value, Value::Bool(false));
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["status"], "unhealthy");
        assert_eq!(json["upstream"]["connected"], false);
        assert_eq!(json["upstream"]["latency_ms"], serde_json::Value::Null);
        assert_eq!(
            json["reasons"][0],
            "upstream is not answering: connect to 127.0.0.1:1: refused"
        );
        // Before the first probe there is no error to quote.
        let r = evaluate(&config, UpstreamState::default(), Counters::default(), true);
        assert_eq!(
            r.checks[0].reason.as_deref(),
            Some("upstream has not been probed yet")
        );
    }

    #[test]
    fn without_l1_the_hit_rate_is_null() {
        let config = Config::default().metrics;
        let r = evaluate(&config, up(1, None), traffic(0, 5, 5, 0), false);
        assert_eq!(r.hit_rate, None);
        assert_eq!(r.status, Status::Healthy);
    }

    #[test]
    fn json_has_every_field() {
        let mut config = Config::default().metrics;
        config.hit_rate_warning = Fraction::new(1.0).unwrap();
        config.min_samples = 0;
        let r = evaluate(&config, up(2, Some(0.25)), traffic(3, 1, 8, 0), true);
        let json: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(json["status"], "degraded");
        assert_eq!(json["upstream"]["connected"], true);
        assert_eq!(json["upstream"]["latency_ms"], 2.0);
        assert_eq!(json["upstream"]["memory_percent"], 25.0);
        assert_eq!(json["upstream"]["error"], serde_json::Value::Null);
        assert_eq!(json["cache"]["hit_rate"], 0.75);
        assert_eq!(json["cache"]["error_rate"], 0.0);
        assert_eq!(json["cache"]["avg_latency_ms"], 1.0);
        assert_eq!(json["cache"]["window_seconds"], 60.0);
        let t = &json["thresholds"];
        assert_eq!(t["hit_rate_warning"], 1.0);
        assert_eq!(t["hit_rate_critical"], 0.6);
        assert_eq!(t["error_rate_warning"], 0.01);
        assert_eq!(t["error_rate_critical"], 0.05);
        assert_eq!(t["latency_warning_ms"], 10.0);
        assert_eq!(t["latency_critical_ms"], 50.0);
        assert_eq!(t["memory_warning"], 0.8);
        assert_eq!(t["memory_critical"], 0.95);
        let names: Vec<&str> = json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            ["upstream", "hit_rate", "error_rate", "latency", "memory"]
        );
        assert_eq!(json["checks"][1]["status"], "warning");
        assert_eq!(json["checks"][1]["value"], 0.75);
        assert_eq!(
            json["reasons"],
            serde_json::json!(["hit_rate 0.7500 is below the warning level 1"])
        );
    }

    #[test]
    fn json_strings_are_escaped_and_odd_numbers_are_null() {
        assert_eq!(
            json_string("a\"b\\c\nd\u{1}é"),
            "\"a\\\"b\\\\c\\nd\\u0001é\""
        );
        assert_eq!(json_number(Some(f64::NAN)), "null");
        assert_eq!(json_number(Some(f64::INFINITY)), "null");
        assert_eq!(json_number(Some(1e-7)), "0.0000001");
        let v: serde_json::Value = serde_json::from_str(&json_number(Some(1e300))).unwrap();
        assert_eq!(v.as_f64(), Some(1e300));
    }

    #[test]
    fn memory_share_prefers_maxmemory() {
        let info = b"# Memory\r\nused_memory:250\r\nused_memory_human:250B\r\n\
                     total_system_memory:10000\r\nmaxmemory:1000\r\n";
        assert_eq!(memory_share(info), Some(0.25));
        let no_max = b"used_memory:250\r\ntotal_system_memory:1000\r\nmaxmemory:0\r\n";
        assert_eq!(memory_share(no_max), Some(0.25));
        assert_eq!(memory_share(b"used_memory:250\r\nmaxmemory:0\r\n"), None);
        assert_eq!(memory_share(b"maxmemory:10\r\n"), None);
        assert_eq!(memory_share(b"\xff"), None);
    }

    #[test]
    fn samples_cover_the_window_and_stay_bounded() {
        let mut config = Config::default().metrics;
        config.window = Duration::from_secs(10);
        let health = Health::new(&config);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let c = |requests| Counters {
            requests,
            ..Counters::default()
        };
        // A sample every 100 ms for a minute, one request each.
        for i in 0..600u64 {
            health.sample(at(i * 100), c(i));
        }
        let state = health.state.lock();
        assert!(
            state.samples.len() <= WINDOW_SAMPLES as usize + 2,
            "{}",
            state.samples.len()
        );
        let (oldest, base) = state.samples[0];
        let newest = at(599 * 100);
        let span = newest.duration_since(oldest);
        // The baseline is at least a window old, and not much more.
        assert!(
            span >= Duration::from_secs(10) && span <= Duration::from_millis(10_300),
            "{span:?}"
        );
        assert_eq!(base.requests, 599 - span.as_millis() as u64 / 100);
    }
}
