//! tierd's HTTP endpoints as an operator meets them: Prometheus scraping
//! `/metrics`, a load balancer asking `/ready`, a monitor reading `/health`,
//! all over real HTTP against a real redis-server, including while that
//! server is down. Also what a broken or hostile HTTP client gets, and that
//! it does not stop the next scrape.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use support::l1::{l1_config, rule, rule_stats, wait_until_caching, HOUR};
use support::probe::{all_clients, client_field, direct_raw, Deadline};
use support::{config_for, free_port, RedisServer, Tierd};
use tierd::config::{Config, Fraction, TrackingMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECOND: Duration = Duration::from_secs(1);

/// `config` with the metrics listener on a free port, probing often so the
/// tests see upstream changes quickly.
fn with_metrics(mut config: Config) -> (Config, SocketAddr) {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.metrics.listen = Some(addr);
    config.metrics.probe_interval = Duration::from_millis(100);
    (config, addr)
}

/// One rule, `users` for `user:*`, cached for an hour.
fn users_config(redis: &RedisServer) -> Config {
    l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![rule("users", "user:*", HOUR)],
    )
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Response {
    status: u16,
    /// Header lines, names lowercased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends `request` as is and reads until the server closes (10 s limit).
async fn exchange(addr: SocketAddr, request: &[u8]) -> Response {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(10 * SECOND, stream.read_to_end(&mut raw))
        .await
        .expect("the server did not close the connection within 10 s")
        .unwrap();
    parse_response(&raw)
}

fn parse_response(raw: &[u8]) -> Response {
    let text = String::from_utf8(raw.to_vec()).unwrap();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(parts.next(), Some("HTTP/1.1"), "{status_line}");
    let status = parts.next().unwrap().parse().unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_ascii_lowercase(), v.trim().to_owned())
        })
        .collect();
    Response {
        status,
        headers,
        body: body.to_owned(),
    }
}

async fn get(addr: SocketAddr, path: &str) -> Response {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: */*\r\n\r\n");
    exchange(addr, request.as_bytes()).await
}

/// Waits until the metrics listener accepts connections: `run` binds it
/// in its own task.
async fn wait_listening(addr: SocketAddr) {
    let deadline = Deadline::new(10 * SECOND, format!("metrics listener on {addr}"));
    while TcpStream::connect(addr).await.is_err() {
        deadline.tick().await;
    }
}

/// Polls `path` until `done` holds for the response; returns it.
async fn poll(
    addr: SocketAddr,
    path: &str,
    what: &str,
    done: impl Fn(&Response) -> bool,
) -> Response {
    let deadline = Deadline::new(15 * SECOND, what);
    loop {
        let r = get(addr, path).await;
        if done(&r) {
            return r;
        }
        deadline.tick().await;
    }
}

/// The value of the sample `series` (name and labels exactly as rendered,
/// e.g. `tierd_l1_hits_total{rule="users"}`) in a text exposition.
fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition.lines().find_map(|line| {
        let rest = line.strip_prefix(series)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

async fn gets(tierd: &Tierd, key: &str, n: usize) {
    let mut raw = tierd.raw().await;
    for _ in 0..n {
        raw.cmd(&["GET", key]).await;
    }
}

/// Reads the cached `user:1` until the `users` rule's hit rate since start
/// is at least `rate`; returns the rule's figures then.
async fn hit_until(tierd: &Tierd, rate: f64) -> support::l1::RuleStats {
    let mut admin = tierd.raw().await;
    loop {
        let stats = rule_stats(&mut admin, "users").await;
        if stats.hits as f64 >= rate * (stats.hits + stats.misses) as f64 {
            return stats;
        }
        gets(tierd, "user:1", 10).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_scraped_over_http_and_move_with_the_traffic() {
    let redis = RedisServer::start();
    let (config, addr) = with_metrics(users_config(&redis));
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    wait_until_caching(&tierd, "users", "user:1").await;

    let before = get(addr, "/metrics").await;
    assert_eq!(before.status, 200, "{}", before.body);
    assert_eq!(
        before.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    assert_eq!(before.header("connection"), Some("close"));
    assert_eq!(
        before.header("content-length"),
        Some(before.body.len().to_string().as_str())
    );

    // Four more hits on the cached key, one miss on a new key.
    gets(&tierd, "user:1", 4).await;
    gets(&tierd, "user:2", 1).await;

    let after = get(addr, "/metrics").await;
    let text = &after.body;
    let delta = |series: &str| {
        sample(text, series).unwrap_or_else(|| panic!("no {series} in:\n{text}"))
            - sample(&before.body, series).unwrap_or(0.0)
    };
    assert_eq!(delta("tierd_l1_hits_total{rule=\"users\"}"), 4.0);
    assert_eq!(delta("tierd_l1_misses_total{rule=\"users\"}"), 1.0);
    // The exposition agrees with CACHE.STATS.
    let mut admin = tierd.raw().await;
    let stats = rule_stats(&mut admin, "users").await;
    assert_eq!(
        sample(text, "tierd_l1_hits_total{rule=\"users\"}"),
        Some(stats.hits as f64)
    );
    assert_eq!(
        sample(text, "tierd_l1_entries{rule=\"users\"}"),
        Some(stats.entries as f64)
    );
    // gets() opened two connections since the first scrape.
    assert_eq!(delta("tierd_client_connections_total"), 2.0);
    // Requests by command: exactly the five GETs; scrapes are not requests.
    assert_eq!(delta("tierd_requests_total{command=\"get\"}"), 5.0);
    for (name, kind) in [
        ("tierd_l1_hits_total", "counter"),
        ("tierd_l1_misses_total", "counter"),
        ("tierd_l1_bytes", "gauge"),
        ("tierd_client_connections_total", "counter"),
        ("tierd_upstream_up", "gauge"),
    ] {
        assert!(
            text.contains(&format!("\n# TYPE {name} {kind}\n")),
            "no TYPE line for {name}:\n{text}"
        );
        assert!(
            text.contains(&format!("\n# HELP {name} "))
                || text.starts_with(&format!("# HELP {name} ")),
            "no HELP line for {name}:\n{text}"
        );
    }
    // The prober has answered by now (the scrape above came after caching,
    // which needs upstream).
    let up = poll(addr, "/metrics", "tierd_upstream_up 1", |r| {
        sample(&r.body, "tierd_upstream_up") == Some(1.0)
    })
    .await;
    assert_eq!(up.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_healthy_and_says_why() {
    let redis = RedisServer::start();
    let (config, addr) = with_metrics(users_config(&redis));
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    wait_until_caching(&tierd, "users", "user:1").await;
    // Enough hits to be well above the 80% warning level.
    let stats = hit_until(&tierd, 0.9).await;

    // Polled: a PING slower than 10 ms on a busy machine degrades it for a
    // moment.
    let r = poll(addr, "/health", "a healthy /health", |r| {
        r.status == 200 && r.json()["status"] == "healthy"
    })
    .await;
    assert_eq!(r.header("content-type"), Some("application/json"));
    let h = r.json();
    assert_eq!(h["status"], "healthy", "{h:#}");
    assert_eq!(h["reasons"], serde_json::json!([]), "{h:#}");
    let up = &h["upstream"];
    assert_eq!(up["connected"], true, "{h:#}");
    let latency = up["latency_ms"].as_f64().unwrap();
    assert!((0.0..1000.0).contains(&latency), "{h:#}");
    // redis-server runs without maxmemory, so this is a share of the host.
    let memory = up["memory_percent"].as_f64().unwrap();
    assert!(memory > 0.0 && memory < 100.0, "{h:#}");
    // Every lookup since start is inside the 60 s window.
    let expected = stats.hits as f64 / (stats.hits + stats.misses) as f64;
    let hit_rate = h["cache"]["hit_rate"].as_f64().unwrap();
    assert!(
        (hit_rate - expected).abs() < 1e-9,
        "{hit_rate} vs {expected}: {h:#}"
    );
    assert_eq!(h["cache"]["error_rate"], 0.0);
    assert!(h["cache"]["avg_latency_ms"].is_null() || h["cache"]["avg_latency_ms"].is_f64());
    assert_eq!(h["cache"]["window_seconds"], 60.0);
    let thresholds: Vec<(&str, f64)> = h["thresholds"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_f64().unwrap()))
        .collect();
    assert_eq!(
        thresholds,
        [
            ("error_rate_critical", 0.05),
            ("error_rate_warning", 0.01),
            ("hit_rate_critical", 0.6),
            ("hit_rate_warning", 0.8),
            ("latency_critical_ms", 50.0),
            ("latency_warning_ms", 10.0),
            ("memory_critical", 0.95),
            ("memory_warning", 0.8),
        ]
    );
    let checks = h["checks"].as_array().unwrap();
    let names: Vec<&str> = checks.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        ["upstream", "hit_rate", "error_rate", "latency", "memory"]
    );
    assert!(checks.iter().all(|c| c["status"] == "ok"), "{h:#}");
    // Fewer lookups than min_samples (100): measured, but not judged.
    assert!(h["cache"]["hit_rate"].is_number(), "{h:#}");
    assert!(checks[1]["value"].is_null(), "{h:#}");

    // The prober shows up in CLIENT LIST under its own name.
    let mut direct = direct_raw(&redis, None).await;
    let names: Vec<String> = all_clients(&mut direct)
        .await
        .iter()
        .filter_map(|l| client_field(l, "name").map(str::to_owned))
        .collect();
    assert!(names.iter().any(|n| n == "tierd:health"), "{names:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholds_decide_degraded_and_unhealthy() {
    let redis = RedisServer::start();
    // Any miss at all is below a 100% warning level: degraded, still 200.
    let (mut config, addr) = with_metrics(users_config(&redis));
    config.metrics.hit_rate_warning = Fraction::new(1.0).unwrap();
    // Judge the few lookups this test makes.
    config.metrics.min_samples = 0;
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    wait_until_caching(&tierd, "users", "user:1").await;
    // Above the default critical level (60%), below 100%.
    hit_until(&tierd, 0.7).await;
    let r = poll(addr, "/health", "a degraded /health", |r| {
        r.status == 200 && r.json()["status"] == "degraded"
    })
    .await;
    let h = r.json();
    assert_eq!(h["checks"][1]["name"], "hit_rate");
    assert_eq!(h["checks"][1]["status"], "warning", "{h:#}");
    let reason = h["reasons"][0].as_str().unwrap();
    assert!(reason.starts_with("hit_rate 0."), "{reason}");
    assert!(reason.ends_with("is below the warning level 1"), "{reason}");
    tierd.stop().await.unwrap();

    // At a 100% critical level the same traffic is unhealthy: 503.
    let (mut config, addr) = with_metrics(users_config(&redis));
    config.metrics.hit_rate_warning = Fraction::new(1.0).unwrap();
    // Judge the few lookups this test makes.
    config.metrics.min_samples = 0;
    config.metrics.hit_rate_critical = Fraction::new(1.0).unwrap();
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    wait_until_caching(&tierd, "users", "user:1").await;
    let r = poll(addr, "/health", "an unhealthy /health", |r| r.status == 503).await;
    let h = r.json();
    assert_eq!(h["status"], "unhealthy", "{h:#}");
    assert_eq!(h["upstream"]["connected"], true, "{h:#}");
    assert_eq!(h["checks"][1]["status"], "critical", "{h:#}");
    assert_eq!(h["thresholds"]["hit_rate_critical"], 1.0);
    // Ready is about serving, not about the hit rate.
    assert_eq!(get(addr, "/ready").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_upstream_turns_health_to_503_until_it_is_back() {
    let mut redis = RedisServer::start();
    let (config, addr) = with_metrics(config_for(&redis.url()));
    let _tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    let r = poll(addr, "/health", "a healthy /health", |r| {
        r.status == 200 && r.json()["status"] == "healthy"
    })
    .await;
    // No caching rule: no hit rate to judge.
    assert!(r.json()["cache"]["hit_rate"].is_null());
    poll(addr, "/ready", "/ready 200", |r| r.status == 200).await;

    redis.kill_in_place();
    let r = poll(addr, "/health", "/health 503 after the kill", |r| {
        r.status == 503
    })
    .await;
    let h = r.json();
    assert_eq!(h["status"], "unhealthy", "{h:#}");
    assert_eq!(h["upstream"]["connected"], false, "{h:#}");
    assert!(h["upstream"]["latency_ms"].is_null(), "{h:#}");
    assert!(h["upstream"]["memory_percent"].is_null(), "{h:#}");
    assert_eq!(h["checks"][0]["name"], "upstream");
    assert_eq!(h["checks"][0]["status"], "critical");
    assert_eq!(h["checks"][0]["value"], false);
    let reason = h["reasons"][0].as_str().unwrap();
    assert!(
        reason.starts_with("upstream is not answering: "),
        "{reason}"
    );
    let ready = get(addr, "/ready").await;
    assert_eq!(ready.status, 503);
    assert!(
        ready
            .body
            .starts_with("not ready: upstream is not answering"),
        "{}",
        ready.body
    );
    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200, "/metrics must not depend on upstream");
    assert_eq!(sample(&metrics.body, "tierd_upstream_up"), Some(0.0));

    redis.restart_in_place();
    let r = poll(addr, "/health", "/health 200 after the restart", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(r.json()["upstream"]["connected"], true);
    poll(addr, "/ready", "/ready 200 after the restart", |r| {
        r.status == 200
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_waits_for_upstream_and_the_command_table() {
    let port = free_port();
    let (config, addr) = with_metrics(config_for(&format!("redis://127.0.0.1:{port}")));
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    let r = get(addr, "/ready").await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert!(
        r.body
            .contains("the command table has not been read from upstream yet"),
        "{}",
        r.body
    );
    assert!(r.body.contains("upstream"), "{}", r.body);
    assert_eq!(get(addr, "/health").await.status, 503);

    let _redis = tokio::task::block_in_place(|| RedisServer::start_on(port, &[]));
    let r = poll(addr, "/ready", "/ready 200 once Redis is up", |r| {
        r.status == 200
    })
    .await;
    assert_eq!(r.body, "ready\n");
    assert!(tierd.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_clear_answers() {
    let redis = RedisServer::start();
    let (config, addr) = with_metrics(config_for(&redis.url()));
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;

    let r = get(addr, "/nope").await;
    assert_eq!(r.status, 404);
    assert!(r.body.contains("/metrics"), "{}", r.body);

    let r = exchange(
        addr,
        b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc",
    )
    .await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));

    // HEAD: the headers of a GET, no body.
    let r = exchange(addr, b"HEAD /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "{}", r.body);
    assert!(
        r.header("content-length")
            .unwrap()
            .parse::<usize>()
            .unwrap()
            > 0
    );

    let r = exchange(addr, b"HEAD /nope HTTP/1.1\r\n\r\n").await;
    assert_eq!((r.status, r.body.as_str()), (404, ""));

    for garbage in [
        &b"HELLO\r\n\r\n"[..],
        b"GET /metrics HTTP/2.0\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n",
        b"*1\r\n$4\r\nPING\r\n\r\n",
        b"GET /\xff\xfe HTTP/1.1\r\n\r\n",
        b"\0\0\0\0\r\n\r\n",
    ] {
        let r = exchange(addr, garbage).await;
        assert_eq!(
            r.status,
            400,
            "{:?}: {}",
            String::from_utf8_lossy(garbage),
            r.body
        );
        assert!(r.body.starts_with("bad request: "), "{}", r.body);
    }

    // A head over 8 KiB.
    let mut big = b"GET /metrics HTTP/1.1\r\n".to_vec();
    big.extend(
        std::iter::repeat(b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaa\r\n")
            .take(400)
            .flatten(),
    );
    big.extend_from_slice(b"\r\n");
    let r = exchange(addr, &big).await;
    assert_eq!(r.status, 431);

    // Clients that hang up at once, or mid-head.
    drop(TcpStream::connect(addr).await.unwrap());
    let mut half = TcpStream::connect(addr).await.unwrap();
    half.write_all(b"GET /met").await.unwrap();
    drop(half);

    assert_eq!(get(addr, "/metrics").await.status, 200);
    assert!(tierd.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_client_does_not_block_a_scrape() {
    let redis = RedisServer::start();
    let (config, addr) = with_metrics(config_for(&redis.url()));
    let _tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;

    // Ten clients that send half a request and then nothing.
    let mut slow = Vec::new();
    for _ in 0..10 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        slow.push(s);
    }
    // A scrape still gets its answer well before their head timeout.
    let started = tokio::time::Instant::now();
    let r = tokio::time::timeout(3 * SECOND, get(addr, "/metrics"))
        .await
        .expect("a scrape waited behind slow clients");
    assert_eq!(r.status, 200);
    assert!(started.elapsed() < 3 * SECOND);

    // The slow ones are told off and closed once the head timeout passes.
    let mut raw = Vec::new();
    tokio::time::timeout(10 * SECOND, slow[0].read_to_end(&mut raw))
        .await
        .expect("a slow client was never closed")
        .unwrap();
    assert_eq!(parse_response(&raw).status, 408);
}

/// Idle sockets filling every connection slot must not make a probe wait
/// for one: past the limit a connection is answered 503 at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_answers_503_instead_of_making_probes_wait() {
    let redis = RedisServer::start();
    let (config, addr) = with_metrics(config_for(&redis.url()));
    let _tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;

    let mut idle = Vec::new();
    for _ in 0..tierd::metrics::http::MAX_CONNECTIONS {
        idle.push(TcpStream::connect(addr).await.unwrap());
    }
    // Each idle socket holds a slot until its head timeout; this one is
    // over the limit. (Before, it waited in the backlog for a slot and then
    // got 200.)
    let r = get(addr, "/health").await;
    assert_eq!(r.status, 503, "{r:?}");
    assert!(r.body.contains("too many connections"), "{r:?}");
    drop(idle);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_metrics_port_stops_startup_with_a_clear_error() {
    let redis = RedisServer::start();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut config = config_for(&redis.url());
    config.metrics.listen = Some(taken.local_addr().unwrap());
    let tierd = Tierd::start_with(config).await;
    let err = tierd.stop().await.unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.starts_with(&format!(
            "metrics.listen: cannot listen on {}",
            taken.local_addr().unwrap()
        )),
        "{msg}"
    );
    assert!(std::error::Error::source(&err).is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_listener_there_is_no_prober() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut raw = tierd.raw().await;
    assert_eq!(&raw.cmd(&["PING"]).await[..], b"+PONG\r\n");
    let mut direct = direct_raw(&redis, None).await;
    // A prober would start with the control link and connect at once.
    let deadline = Deadline::new(10 * SECOND, "tierd's control link in CLIENT LIST");
    let lines = loop {
        let lines = all_clients(&mut direct).await;
        if lines.iter().any(|l| {
            client_field(l, "name") == Some("tierd:tracking")
                || client_field(l, "name") == Some("tierd:control")
        }) {
            break lines;
        }
        deadline.tick().await;
    };
    assert!(
        !lines
            .iter()
            .any(|l| client_field(l, "name") == Some("tierd:health")),
        "{lines:#?}"
    );
}
