//! `/metrics` read the way Prometheus reads it: scraped over real HTTP from a
//! tierd with a caching rule in front of a real redis-server, and parsed by
//! a Prometheus text-format parser (`prometheus-parse`), not by string
//! matching. The test drives an exact amount of traffic between two scrapes
//! and checks that every counter it touches moves by exactly that much, and
//! that nothing else is counted as a request (scrapes, the test's own setup
//! before the first scrape).

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use prometheus_parse::{LineInfo, Sample, Scrape, Value};
use support::l1::{direct, l1_config, must, rule, wait_until_caching, HOUR};
use support::probe::Deadline;
use support::{free_port, Raw, Tierd};
use tierd::config::TrackingMode;
use tierd::metrics::{names, LATENCY_SAMPLE};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECOND: Duration = Duration::from_secs(1);

/// One `/metrics` body, parsed.
struct Metrics {
    samples: Vec<Sample>,
    body: String,
}

impl Metrics {
    fn parse(body: String) -> Metrics {
        // prometheus-parse skips lines it does not understand; refuse them
        // here, so that a malformed line fails the test instead of
        // vanishing.
        for line in body.lines() {
            assert!(
                !matches!(LineInfo::parse(line), LineInfo::Ignored),
                "a line the Prometheus parser does not understand: {line:?}\n{body}"
            );
        }
        let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
            .unwrap_or_else(|e| panic!("not a Prometheus text exposition ({e}):\n{body}"));
        for s in &scrape.samples {
            assert!(
                s.metric.starts_with("tierd_"),
                "a metric without the tierd_ prefix: {}",
                s.metric
            );
            assert!(
                scrape.docs.contains_key(base_name(&s.metric)),
                "no HELP for {}:\n{body}",
                s.metric
            );
        }
        Metrics {
            samples: scrape.samples,
            body,
        }
    }

    /// The sample of `name` whose labels are exactly `labels`.
    fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<&Sample> {
        self.samples.iter().find(|s| {
            s.metric == name
                && s.labels.len() == labels.len()
                && labels.iter().all(|&(k, v)| s.labels.get(k) == Some(v))
        })
    }

    /// A counter's value; `None` when the series is absent.
    fn counter(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels).map(|s| match s.value {
            Value::Counter(v) => v,
            ref other => panic!("{name}{labels:?} is not a counter: {other:?}"),
        })
    }

    fn gauge(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.find(name, labels).map(|s| match s.value {
            Value::Gauge(v) => v,
            ref other => panic!("{name}{labels:?} is not a gauge: {other:?}"),
        })
    }

    /// Every `tierd_requests_total` series, by command label.
    fn requests(&self) -> BTreeMap<String, f64> {
        self.samples
            .iter()
            .filter(|s| s.metric == names::REQUESTS)
            .map(|s| {
                let command = s
                    .labels
                    .get("command")
                    .unwrap_or_else(|| panic!("{} without a command label", names::REQUESTS));
                let Value::Counter(v) = s.value else {
                    panic!("{} is not a counter: {:?}", names::REQUESTS, s.value)
                };
                (command.to_owned(), v)
            })
            .collect()
    }

    /// The upstream latency histogram, checked for consistency: buckets in
    /// increasing order, cumulative, the last one `+Inf`, and `_count`
    /// equal to it. `None` before the histogram has been rendered at all.
    fn latency(&self) -> Option<Histogram> {
        let name = names::UPSTREAM_LATENCY;
        let sample = self.find(name, &[])?;
        let Value::Histogram(buckets) = &sample.value else {
            panic!("{name} is not a histogram: {:?}", sample.value)
        };
        assert!(!buckets.is_empty(), "{name} has no buckets:\n{}", self.body);
        for pair in buckets.windows(2) {
            assert!(
                pair[0].less_than < pair[1].less_than,
                "{name} buckets out of order: {buckets:?}"
            );
            assert!(
                pair[0].count <= pair[1].count,
                "{name} buckets are not cumulative: {buckets:?}"
            );
        }
        let last = buckets.last().unwrap();
        assert_eq!(
            last.less_than,
            f64::INFINITY,
            "{name}'s last bucket is le=\"+Inf\": {buckets:?}"
        );
        // prometheus-parse leaves `_count` and `_sum` untyped.
        let untyped = |suffix: &str| {
            let full = format!("{name}{suffix}");
            match self.find(&full, &[]).map(|s| &s.value) {
                Some(Value::Untyped(v)) => *v,
                other => panic!("{full}: {other:?}\n{}", self.body),
            }
        };
        let count = untyped("_count");
        let sum = untyped("_sum");
        assert_eq!(count, last.count, "{name}_count is the +Inf bucket");
        assert!(sum >= 0.0, "{name}_sum {sum}");
        if count == 0.0 {
            assert_eq!(sum, 0.0, "{name}_sum without samples");
        }
        Some(Histogram {
            buckets: buckets.iter().map(|b| (b.less_than, b.count)).collect(),
            count,
            sum,
        })
    }
}

/// What the upstream latency histogram showed at one scrape.
#[derive(Debug, Default)]
struct Histogram {
    /// (upper bound, cumulative count).
    buckets: Vec<(f64, f64)>,
    count: f64,
    sum: f64,
}

impl Histogram {
    /// How much it moved since `before`, checking that no bucket went
    /// down and that the bounds stayed the same.
    fn since(&self, before: &Histogram) -> (f64, f64) {
        if !before.buckets.is_empty() {
            let bounds = |h: &Histogram| h.buckets.iter().map(|b| b.0).collect::<Vec<_>>();
            assert_eq!(bounds(self), bounds(before), "bucket bounds changed");
            for (now, then) in self.buckets.iter().zip(&before.buckets) {
                assert!(now.1 >= then.1, "a bucket went down: {then:?} -> {now:?}");
            }
        }
        assert!(self.sum >= before.sum);
        (self.count - before.count, self.sum - before.sum)
    }
}

/// A histogram's family name for its `_bucket`, `_sum` and `_count`
/// samples; any other name as is.
fn base_name(metric: &str) -> &str {
    let latency = names::UPSTREAM_LATENCY;
    match metric.strip_prefix(latency) {
        Some("" | "_bucket" | "_sum" | "_count") => latency,
        _ => metric,
    }
}

/// `GET /metrics` over a fresh HTTP/1.1 connection, read until tierd closes
/// it; the body parsed.
async fn scrape(addr: SocketAddr) -> Metrics {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /metrics HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(10 * SECOND, stream.read_to_end(&mut raw))
        .await
        .expect("/metrics was not answered within 10 s")
        .unwrap();
    let text = String::from_utf8(raw).expect("/metrics is UTF-8");
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {text:?}"));
    assert!(head.starts_with("HTTP/1.1 200 "), "{head}\n\n{body}");
    let length = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().unwrap())
        })
        .unwrap_or_else(|| panic!("no Content-Length in {head}"));
    assert_eq!(length, body.len(), "Content-Length");
    Metrics::parse(body.to_owned())
}

/// Waits until the metrics listener accepts connections (`run` binds it in
/// its own task).
async fn wait_listening(addr: SocketAddr) {
    let deadline = Deadline::new(10 * SECOND, format!("metrics listener on {addr}"));
    while TcpStream::connect(addr).await.is_err() {
        deadline.tick().await;
    }
}

/// Scrapes until the `users` rule holds `n` entries: a fill has completed.
async fn wait_entries(addr: SocketAddr, n: u32) {
    let deadline = Deadline::new(10 * SECOND, format!("{n} entries in rule users"));
    while scrape(addr)
        .await
        .gauge(names::L1_ENTRIES, &[("rule", "users")])
        != Some(n.into())
    {
        deadline.tick().await;
    }
}

#[track_caller]
fn assert_frame(got: &[u8], want: &[u8]) {
    assert_eq!(
        String::from_utf8_lossy(got),
        String::from_utf8_lossy(want),
        "reply"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parsed_counters_move_exactly_with_the_traffic() {
    let redis = support::RedisServer::start();
    let mut d = direct(&redis).await;
    for (k, v) in [("user:0", "warm"), ("user:1", "alice"), ("user:2", "bob")] {
        must(&mut d, &["SET", k, v]).await;
    }
    let mut config = l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![rule("users", "user:*", HOUR)],
    );
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
    config.metrics.listen = Some(addr);
    // One pooled upstream connection: every LATENCY_SAMPLE-th request on it
    // is timed, so the second phase knows how many samples to expect.
    config.upstream.pool_size = 1;
    let tierd = Tierd::start_with(config).await;
    wait_listening(addr).await;
    // Reads user:0 (only) until tierd caches: the command table is loaded
    // and the tracking link is up.
    wait_until_caching(&tierd, "users", "user:0").await;

    // The connection for the traffic is open, and its session counted,
    // before the first scrape: its PING has been answered.
    let mut t = tierd.raw().await;
    assert_frame(&t.cmd(&["PING"]).await, b"+PONG\r\n");

    let before = scrape(addr).await;
    let users = [("rule", "users")];
    let write = [("source", "write")];
    assert!(
        before.counter(names::L1_HITS, &users).unwrap() >= 1.0,
        "the warm-up hit"
    );
    assert_eq!(before.gauge(names::L1_ENTRIES, &users), Some(1.0), "user:0");

    // user:1: one miss, then seven hits. A fill completes when its PTTL
    // reply arrives, which may be just after the client has its reply: the
    // test waits on /metrics (scrapes are not requests) for the entry.
    assert_frame(&t.cmd(&["GET", "user:1"]).await, b"$5\r\nalice\r\n");
    wait_entries(addr, 2).await;
    for _ in 0..7 {
        assert_frame(&t.cmd(&["GET", "user:1"]).await, b"$5\r\nalice\r\n");
    }
    // Three writes of one key each, none of them cached or read before.
    for i in 1..=3 {
        let key = format!("user:w{i}");
        assert_frame(&t.cmd(&["SET", &key, "x"]).await, b"+OK\r\n");
    }
    // user:1 hits both times; user:2 misses, then hits.
    let mget = b"*2\r\n$5\r\nalice\r\n$3\r\nbob\r\n";
    assert_frame(&t.cmd(&["MGET", "user:1", "user:2"]).await, mget);
    wait_entries(addr, 3).await;
    assert_frame(&t.cmd(&["MGET", "user:1", "user:2"]).await, mget);
    // One new client connection, which sends one command nobody knows.
    let mut u = Raw::connect(tierd.addr).await;
    let unknown = u.cmd(&["TIERD.NOSUCHCOMMAND", "a"]).await;
    assert!(
        unknown.starts_with(b"-ERR unknown command"),
        "{}",
        String::from_utf8_lossy(&unknown)
    );

    let after = scrape(addr).await;
    let delta_counter = |name: &str, labels: &[(&str, &str)]| {
        after
            .counter(name, labels)
            .unwrap_or_else(|| panic!("no {name}{labels:?} in:\n{}", after.body))
            - before.counter(name, labels).unwrap_or(0.0)
    };

    // Requests by command, and nothing else: the setup before the first
    // scrape is not in the difference, and scrapes are not requests.
    let (was, now) = (before.requests(), after.requests());
    let moved: BTreeMap<&str, f64> = now
        .iter()
        .map(|(c, v)| (c.as_str(), v - was.get(c).copied().unwrap_or(0.0)))
        .filter(|&(_, d)| d != 0.0)
        .collect();
    assert_eq!(
        moved,
        BTreeMap::from([("get", 8.0), ("mget", 2.0), ("other", 1.0), ("set", 3.0)]),
        "requests by command since the first scrape"
    );
    assert!(
        was.keys().all(|c| now.contains_key(c)),
        "a command series disappeared: {was:?} -> {now:?}"
    );

    // L1, by rule: copied from the store at each scrape.
    assert_eq!(delta_counter(names::L1_HITS, &users), 7.0 + 1.0 + 2.0);
    assert_eq!(delta_counter(names::L1_MISSES, &users), 1.0 + 1.0);
    assert_eq!(delta_counter(names::L1_EVICTIONS, &users), 0.0);
    assert_eq!(
        after.gauge(names::L1_ENTRIES, &users),
        Some(3.0),
        "user:0, user:1, user:2"
    );
    assert!(
        after.gauge(names::L1_BYTES, &users).unwrap()
            > before.gauge(names::L1_BYTES, &users).unwrap()
    );

    // One invalidation per key written; the unknown command (refused by
    // Redis) flushed nothing.
    assert_eq!(delta_counter(names::INVALIDATIONS, &write), 3.0);
    assert_eq!(
        after.counter(names::FLUSHES, &write).unwrap_or(0.0)
            - before.counter(names::FLUSHES, &write).unwrap_or(0.0),
        0.0
    );

    assert_eq!(delta_counter(names::CLIENTS_ACCEPTED, &[]), 1.0);
    assert_eq!(delta_counter(names::CLIENTS_REJECTED, &[]), 0.0);
    assert_eq!(delta_counter(names::UPSTREAM_ERRORS, &[]), 0.0);

    let latency_before = before.latency().unwrap_or_default();
    let latency_after = after.latency().expect("the latency histogram");
    latency_after.since(&latency_before);

    // Second phase: 32 reads of a key no rule caches, all on the one pooled
    // upstream connection, so at least 32 / LATENCY_SAMPLE are timed.
    const READS: u64 = 32;
    for _ in 0..READS {
        assert_frame(&t.cmd(&["GET", "plain:1"]).await, b"$-1\r\n");
    }
    let last = scrape(addr).await;
    let (was, now) = (after.requests(), last.requests());
    let moved: BTreeMap<&str, f64> = now
        .iter()
        .map(|(c, v)| (c.as_str(), v - was.get(c).copied().unwrap_or(0.0)))
        .filter(|&(_, d)| d != 0.0)
        .collect();
    assert_eq!(moved, BTreeMap::from([("get", READS as f64)]));
    let users_hits = |m: &Metrics| m.counter(names::L1_HITS, &users).unwrap();
    assert_eq!(
        users_hits(&last),
        users_hits(&after),
        "plain:1 is no rule's"
    );
    let latency_last = last.latency().expect("the latency histogram");
    let (samples, seconds) = latency_last.since(&latency_after);
    assert!(
        samples >= (READS / LATENCY_SAMPLE) as f64,
        "{samples} latency samples for {READS} upstream reads:\n{}",
        last.body
    );
    assert!(seconds > 0.0, "{samples} samples took {seconds} s in all");
    assert!(
        seconds / samples < 1.0,
        "an average upstream latency of {} s on loopback",
        seconds / samples
    );

    // Every family rendered has exactly one TYPE line.
    let mut types = BTreeSet::new();
    for line in last.body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let name = rest.split(' ').next().unwrap();
            assert!(types.insert(name.to_owned()), "two TYPE lines for {name}");
        }
    }
    for name in [
        names::REQUESTS,
        names::L1_HITS,
        names::L1_MISSES,
        names::INVALIDATIONS,
        names::CLIENTS_ACCEPTED,
        names::UPSTREAM_LATENCY,
    ] {
        assert!(types.contains(name), "no TYPE line for {name}");
    }
}
