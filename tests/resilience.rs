//! The circuit breaker and stale serving, against real redis-server
//! processes that are killed, restarted and frozen (SIGSTOP) while clients
//! keep going.
//!
//! What a user is promised (issue 7): while Redis is down or frozen, tierd
//! stays up; reads of rules with `stale_ttl` are answered from L1, past
//! their ttl; everything else gets `-TRYAGAIN upstream unavailable (circuit
//! open)` at once, never a hang; stale serves are counted; when Redis is
//! back tierd recovers within a second, without waiting for `reset`; and
//! no write the client saw acknowledged is lost. Stale entries are never
//! served while the breaker is closed, and an entry a write invalidated is
//! never served stale.
//!
//! The load tests log every request (start, latency, reply) and judge the
//! outage from the logs afterwards, against the instants the test recorded
//! (kill, breaker seen open, restart). Controls show that the checks can
//! fail: a rule without `stale_ttl`, a key never read, an entry past its
//! `stale_ttl` all get `TRYAGAIN`, not a value.

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use support::exchange::{assert_frame, reply, text};
use support::l1::{clients_named, direct, must, rule, HOUR};
use support::probe::{bulk, Deadline};
use support::resilience::{
    circuit_state, fast_config, info_tierd, scrape, slowest, stale_rule, stale_serves, stat,
    wait_caching, wait_circuit, Answer, Job, Load, Op, Timings, CIRCUIT_OPEN,
};
use support::{Raw, RedisServer, Tierd};
use tierd::config::TrackingMode;

const SECOND: Duration = Duration::from_secs(1);

const fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// How long a reply refused by an open breaker may take: "at once", on a
/// loaded two-core machine.
const FAIL_FAST: Duration = ms(150);
/// Slack on top of the command timeout for any reply while Redis fails.
const MARGIN: Duration = ms(500);
/// How soon after Redis is back every client must be served again.
const RECOVERY: Duration = SECOND;

const STALE_SERVES: &str = "tierd_stale_serves_total";
const CIRCUIT_OPEN_GAUGE: &str = "tierd_circuit_open";
const CIRCUIT_OPENS: &str = "tierd_circuit_opens_total";

/// Sends one command and times its reply (2 s limit).
async fn timed(raw: &mut Raw, args: &[&str]) -> (Bytes, Duration) {
    let started = Instant::now();
    let got = reply(raw, args).await;
    (got, started.elapsed())
}

/// Sends `args` (a request that goes upstream) on `raw` until `INFO tierd`
/// shows the breaker open. Every reply on the way must be an upstream
/// error. Returns when it was seen open.
async fn drive_open(raw: &mut Raw, admin: &mut Raw, args: &[&str]) -> Instant {
    let deadline = Deadline::new(10 * SECOND, "the breaker open after Redis went away");
    loop {
        let got = reply(raw, args).await;
        assert!(
            Answer::of(&got).is_error(),
            "{args:?} with Redis down: {}",
            text(&got)
        );
        if got.as_ref() == CIRCUIT_OPEN && circuit_state(admin).await == "open" {
            return Instant::now();
        }
        deadline.tick().await;
    }
}

/// `INFO tierd`'s count of tracking invalidations received.
async fn tracking_invalidations(admin: &mut Raw) -> u64 {
    info_field(admin, "tierd_tracking_invalidations").await
}

async fn info_field(admin: &mut Raw, field: &str) -> u64 {
    let info = info_tierd(admin).await;
    info.iter()
        .find(|(k, _)| k == field)
        .unwrap_or_else(|| panic!("no {field} in INFO tierd: {info:?}"))
        .1
        .parse()
        .unwrap()
}

fn show_op(op: &Op, t0: Instant) -> String {
    format!(
        "{} at {:?} (+{:?}): {}",
        op.key,
        op.started.saturating_duration_since(t0),
        op.latency,
        text(&op.reply).trim_end()
    )
}

/// The value seeded for `key`.
fn seeded(key: &str) -> String {
    format!("{key}=v1")
}

/// A tierd on `redis` with `tracking`, `t` and one rule `stale` (`s:*`,
/// `ttl`, then served stale for an hour); its metrics address, and a
/// connection for `INFO` and `CACHE.STATS`.
async fn stale_tierd(
    redis: &RedisServer,
    tracking: TrackingMode,
    ttl: Duration,
    t: Timings,
) -> (Tierd, SocketAddr, Raw) {
    let (config, metrics) = fast_config(
        &redis.url(),
        tracking,
        vec![stale_rule("stale", "s:*", ttl, HOUR)],
        t,
    );
    let tierd = Tierd::start_with(config).await;
    let admin = tierd.raw().await;
    (tierd, metrics, admin)
}

/// A tierd under a mixed load's keys: see [`mixed`].
struct Mixed {
    tierd: Tierd,
    metrics: SocketAddr,
    /// A connection for `INFO` and `CACHE.STATS`.
    admin: Raw,
    stale_keys: Vec<String>,
    fresh_keys: Vec<String>,
}

/// A tierd on `redis` with `t`, a rule `stale` (`s:*`, `ttl`, then served
/// stale for an hour) and a rule `fresh` (`f:*`, `ttl`); `keys` keys of
/// each seeded in Redis, and both rules caching.
async fn mixed(redis: &RedisServer, keys: usize, ttl: Duration, t: Timings) -> Mixed {
    let (config, metrics) = fast_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            stale_rule("stale", "s:*", ttl, HOUR),
            rule("fresh", "f:*", ttl),
        ],
        t,
    );
    let tierd = Tierd::start_with(config).await;
    let admin = tierd.raw().await;
    let stale_keys: Vec<String> = (0..keys).map(|i| format!("s:{i}")).collect();
    let fresh_keys: Vec<String> = (0..keys).map(|i| format!("f:{i}")).collect();
    let mut d = direct(redis).await;
    for k in stale_keys.iter().chain(&fresh_keys) {
        must(&mut d, &["SET", k, &seeded(k)]).await;
    }
    drop(d);
    wait_caching(&tierd, "stale", "s:0").await;
    wait_caching(&tierd, "fresh", "f:0").await;
    Mixed {
        tierd,
        metrics,
        admin,
        stale_keys,
        fresh_keys,
    }
}

// ---------------------------------------------------------------------------
// 1. Kill and restart under a mixed load
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_and_restarted_under_mixed_load() {
    const KEYS: usize = 8;
    const OUTAGE: Duration = Duration::from_secs(3);
    let t0 = Instant::now();
    let ttl = ms(300);
    let t = Timings {
        command_timeout: SECOND,
        connect_timeout: ms(250),
        backoff_max: ms(100),
        failure_threshold: 3,
        reset: ms(500),
    };
    // AOF with fsync on every write: what Redis acknowledged survives the
    // SIGKILL, so the ack log can be checked against the restarted server.
    let mut redis = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let Mixed {
        tierd,
        metrics,
        mut admin,
        stale_keys,
        fresh_keys,
    } = mixed(&redis, KEYS, ttl, t).await;

    let mut reversed = stale_keys.clone();
    reversed.reverse();
    let load = Load::start(
        tierd.addr,
        vec![
            (
                "stale-1".into(),
                Job::Read {
                    keys: stale_keys.clone(),
                },
            ),
            ("stale-2".into(), Job::Read { keys: reversed }),
            (
                "fresh".into(),
                Job::Read {
                    keys: fresh_keys.clone(),
                },
            ),
            (
                "writer-1".into(),
                Job::Write {
                    prefix: "w:1:".into(),
                },
            ),
            (
                "writer-2".into(),
                Job::Write {
                    prefix: "w:2:".into(),
                },
            ),
        ],
        5 * SECOND,
        ms(2),
    );
    let zero = load.snapshot();
    load.wait_ok(
        &zero,
        20,
        10 * SECOND,
        "every client served before the kill",
    )
    .await;
    let serves_before = stale_serves(&mut admin, "stale").await;

    let kill_started = Instant::now();
    redis.kill_in_place();
    let killed = Instant::now();

    // The outage: tierd stays up, the breaker opens, and /metrics says so
    // for as long as Redis is down.
    let mut first_open: Option<Instant> = None;
    let mut states = std::collections::BTreeMap::<String, u32>::new();
    let mut gauge_while_open = Vec::new();
    while killed.elapsed() < OUTAGE {
        assert!(tierd.is_running(), "tierd stopped during the outage");
        load.assert_running();
        let state = circuit_state(&mut admin).await;
        *states.entry(state.clone()).or_default() += 1;
        if state == "open" && first_open.is_none() {
            first_open = Some(Instant::now());
        }
        if first_open.is_some() && gauge_while_open.len() < 10 {
            let m = scrape(metrics).await;
            gauge_while_open.push(m.must(CIRCUIT_OPEN_GAUGE, &[]));
        }
        // Sampling rate of the watch, not synchronisation.
        tokio::time::sleep(ms(20)).await;
    }
    let first_open = first_open
        .unwrap_or_else(|| panic!("the breaker never showed open in {OUTAGE:?}: {states:?}"));
    // Still down: a brand-new client connects and is refused quickly.
    let mut newcomer = tierd.raw().await;
    let (got, took) = timed(&mut newcomer, &["SET", "newcomer", "1"]).await;
    assert!(Answer::of(&got).is_error(), "{}", text(&got));
    assert!(took <= FAIL_FAST + t.connect_timeout, "{took:?}");

    // Requests from here on may meet the restarted Redis: the outage, as
    // the logs are judged, ends here; recovery counts from `ready`.
    let restarting = Instant::now();
    redis.restart_in_place();
    let ready = Instant::now();
    // Recovery: a write succeeds and the breaker is closed.
    let mut probe = tierd.raw().await;
    let deadline = Deadline::new(10 * SECOND, "recovery after the restart");
    let recovered = loop {
        let got = reply(&mut probe, &["SET", "probe", "1"]).await;
        if got.as_ref() == b"+OK\r\n" && circuit_state(&mut admin).await == "closed" {
            break Instant::now();
        }
        assert!(
            Answer::of(&got).is_error() || got.as_ref() == b"+OK\r\n",
            "{}",
            text(&got)
        );
        deadline.tick().await;
    };
    let recovery = recovered - ready;
    // Let the load run on past the recovery bound, then stop it.
    let after = load.snapshot();
    load.wait_ok(
        &after,
        20,
        10 * SECOND,
        "every client served after the restart",
    )
    .await;
    let deadline = Deadline::new(10 * SECOND, "the load running past the recovery bound");
    while ready.elapsed() < RECOVERY + ms(500) {
        deadline.tick().await;
    }
    assert!(tierd.is_running());
    let logs = load.finish().await;

    // ---- Judge the logs. ----
    let bound = t.command_timeout + MARGIN;
    let mut report = Vec::new();
    let mut acked: Vec<String> = Vec::new();
    let mut stale_values = 0u64;
    let mut stale_window = (0u64, 0u64); // (values, errors) after first open
    let mut fast_max = Duration::ZERO;
    for (name, ops) in &logs {
        assert!(!ops.is_empty(), "{name} sent nothing");
        let slow = slowest(ops).unwrap();
        assert!(
            slow.latency <= bound,
            "{name}: a reply took {:?} (bound {bound:?}): {}",
            slow.latency,
            show_op(slow, t0)
        );
        let mut circuit_open = 0;
        for op in ops {
            let answer = op.answer();
            let ended = op.started + op.latency;
            if answer.is_error() {
                assert!(
                    ended >= kill_started,
                    "{name}: an error before the kill: {}",
                    show_op(op, t0)
                );
                assert!(
                    op.started <= ready + RECOVERY,
                    "{name}: an error more than {RECOVERY:?} after the restart \
                     (recovery measured {recovery:?}): {}",
                    show_op(op, t0)
                );
            }
            if answer == Answer::CircuitOpen {
                circuit_open += 1;
                fast_max = fast_max.max(op.latency);
                assert!(
                    op.latency <= FAIL_FAST,
                    "{name}: a circuit-open refusal took {:?}: {}",
                    op.latency,
                    show_op(op, t0)
                );
            }
            let outage = op.started >= killed + ttl && op.started < restarting;
            match (name.as_str(), &answer) {
                ("stale-1" | "stale-2" | "fresh", Answer::Value(v)) => {
                    assert_eq!(
                        text(v),
                        seeded(&op.key),
                        "{name}: a wrong value: {}",
                        show_op(op, t0)
                    );
                    if name == "fresh" {
                        assert!(
                            !outage,
                            "fresh (no stale_ttl) was served a value past its ttl \
                             while Redis was down: {}",
                            show_op(op, t0)
                        );
                    } else if outage {
                        stale_values += 1;
                    }
                }
                (_, Answer::Ok) if name.starts_with("writer") => {
                    acked.push(op.key.clone());
                }
                (_, a) if a.is_error() => {}
                _ => panic!("{name}: an unexpected reply: {}", show_op(op, t0)),
            }
            if name.starts_with("stale") && op.started >= first_open && op.started < restarting {
                if answer.is_error() {
                    stale_window.1 += 1;
                } else {
                    stale_window.0 += 1;
                }
            }
        }
        if !name.starts_with("stale") {
            assert!(
                circuit_open > 0,
                "{name} never got {:?} during a {OUTAGE:?} outage",
                text(CIRCUIT_OPEN)
            );
        }
        report.push(format!(
            "{name}: {} requests, slowest {:?}, {circuit_open} circuit-open refusals",
            ops.len(),
            slow.latency
        ));
    }
    assert!(stale_values > 0, "no stale serve during the outage");
    let (served, refused) = stale_window;
    assert!(
        served * 2 >= served + refused,
        "stale-rule reads while the breaker was open: {served} served, {refused} refused"
    );

    // Every acknowledged write is in the restarted Redis.
    let mut d = direct(&redis).await;
    let mut missing = Vec::new();
    for chunk in acked.chunks(500) {
        let mut args = vec!["MGET"];
        args.extend(chunk.iter().map(String::as_str));
        let got = support::l1::decode(&d.cmd(&args).await);
        let values = got.elements().unwrap().to_vec();
        for (key, v) in chunk.iter().zip(values) {
            if v.as_text().as_deref() != Some(key.as_str()) {
                missing.push(format!("{key} = {v:?}"));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged writes missing after the restart, e.g. {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );

    // Counted: CACHE.STATS and /metrics agree, and cover what the clients saw.
    let serves = stale_serves(&mut admin, "stale").await;
    assert!(
        serves - serves_before >= stale_values,
        "stale_serves went {serves_before} -> {serves}, but clients saw {stale_values} \
         values past ttl while Redis was down"
    );
    assert_eq!(stale_serves(&mut admin, "fresh").await, 0);
    let m = scrape(metrics).await;
    assert_eq!(m.must(STALE_SERVES, &[("rule", "stale")]), serves as f64);
    assert_eq!(
        m.value(STALE_SERVES, &[("rule", "fresh")]).unwrap_or(0.0),
        0.0
    );
    assert!(
        gauge_while_open.iter().all(|g| *g == 1.0) && !gauge_while_open.is_empty(),
        "{CIRCUIT_OPEN_GAUGE} while Redis was down: {gauge_while_open:?}"
    );
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 0.0);
    assert!(m.must(CIRCUIT_OPENS, &[]) >= 1.0);
    assert_eq!(circuit_state(&mut admin).await, "closed");
    assert!(tierd.is_running());

    println!(
        "kill+restart: breaker seen open {:?} after the kill; states sampled {states:?}; \
         recovery {recovery:?} after Redis answered PING; {stale_values} stale values \
         ({served} served / {refused} refused while open); slowest refusal {fast_max:?}; \
         {} acknowledged writes all present; stale_serves {}; opens {}; total {:?}\n  {}",
        first_open - killed,
        acked.len(),
        serves - serves_before,
        m.must(CIRCUIT_OPENS, &[]),
        t0.elapsed(),
        report.join("\n  ")
    );
    assert!(
        recovery <= RECOVERY,
        "full recovery took {recovery:?} after the restart (bound {RECOVERY:?})"
    );
}

// ---------------------------------------------------------------------------
// 2. Frozen upstream (SIGSTOP)
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_upstream_opens_the_breaker_and_nothing_hangs() {
    const KEYS: usize = 4;
    const HOLD: Duration = Duration::from_millis(1500);
    let t0 = Instant::now();
    let ttl = ms(200);
    // A reset longer than the freeze: once open, the breaker stays open
    // until Redis answers again, so every refusal must be immediate.
    let t = Timings {
        command_timeout: ms(800),
        connect_timeout: ms(200),
        backoff_max: ms(100),
        failure_threshold: 3,
        reset: 30 * SECOND,
    };
    let redis = RedisServer::start();
    let Mixed {
        tierd,
        metrics,
        mut admin,
        stale_keys,
        fresh_keys,
    } = mixed(&redis, KEYS, ttl, t).await;

    let load = Load::start(
        tierd.addr,
        vec![
            (
                "stale".into(),
                Job::Read {
                    keys: stale_keys.clone(),
                },
            ),
            (
                "fresh".into(),
                Job::Read {
                    keys: fresh_keys.clone(),
                },
            ),
            (
                "writer".into(),
                Job::Write {
                    prefix: "w:".into(),
                },
            ),
        ],
        5 * SECOND,
        ms(2),
    );
    let zero = load.snapshot();
    load.wait_ok(&zero, 20, 10 * SECOND, "every client served before SIGSTOP")
        .await;
    let serves_before = stale_serves(&mut admin, "stale").await;

    redis.pause();
    let paused = Instant::now();
    let opened = wait_circuit(&mut admin, "open", 10 * SECOND).await;
    let m = scrape(metrics).await;
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 1.0, "while open");
    assert!(m.must(CIRCUIT_OPENS, &[]) >= 1.0);
    // Frozen, with a long reset: it stays open (a TCP connect to a stopped
    // process succeeds, but nothing answers: that is no reconnect).
    let mut states = std::collections::BTreeMap::<String, u32>::new();
    while opened.elapsed() < HOLD {
        assert!(tierd.is_running());
        load.assert_running();
        *states.entry(circuit_state(&mut admin).await).or_default() += 1;
        tokio::time::sleep(ms(20)).await;
    }
    // New clients are refused at once too.
    let mut newcomer = tierd.raw().await;
    let (got, took) = timed(&mut newcomer, &["INCR", "counter"]).await;
    assert_frame(&got, CIRCUIT_OPEN);
    assert!(took <= FAIL_FAST, "INCR refused after {took:?}");

    // Redis runs again before `resume` returns: the window judged as
    // frozen ends here, recovery counts from `resumed`.
    let resuming = Instant::now();
    redis.resume();
    let resumed = Instant::now();
    let closed = wait_circuit(&mut admin, "closed", 10 * SECOND).await;
    let recovery = closed - resumed;
    let after = load.snapshot();
    load.wait_ok(&after, 20, 10 * SECOND, "every client served after SIGCONT")
        .await;
    let logs = load.finish().await;

    let bound = t.command_timeout + MARGIN;
    let mut timeouts = 0;
    let mut stale_values = 0u64;
    let mut report = Vec::new();
    for (name, ops) in &logs {
        let slow = slowest(ops).unwrap();
        assert!(
            slow.latency <= bound,
            "{name}: a reply took {:?} with Redis frozen (bound {bound:?}): {}",
            slow.latency,
            show_op(slow, t0)
        );
        let mut refused_max = Duration::ZERO;
        for op in ops {
            let answer = op.answer();
            if answer == Answer::Unavailable {
                timeouts += 1;
            }
            match &answer {
                Answer::Value(v) => assert_eq!(text(v), seeded(&op.key), "{}", show_op(op, t0)),
                Answer::Ok if name == "writer" => {}
                a if a.is_error() => {}
                _ => panic!("{name}: an unexpected reply: {}", show_op(op, t0)),
            }
            let open = op.started >= opened && op.started < resuming;
            if !open {
                continue;
            }
            match name.as_str() {
                "stale" => {
                    assert!(
                        matches!(answer, Answer::Value(_)),
                        "a stale-rule read while the breaker was open was not served: {}",
                        show_op(op, t0)
                    );
                    stale_values += 1;
                }
                _ => {
                    assert_eq!(
                        answer,
                        Answer::CircuitOpen,
                        "{name} while the breaker was open: {} (paused at {:?}, \
                         seen open at {:?}, resumed at {:?})",
                        show_op(op, t0),
                        paused - t0,
                        opened - t0,
                        resuming - t0
                    );
                    refused_max = refused_max.max(op.latency);
                    assert!(
                        op.latency <= FAIL_FAST,
                        "{name}: refused after {:?} (command_timeout {:?}): {}",
                        op.latency,
                        t.command_timeout,
                        show_op(op, t0)
                    );
                }
            }
            if op.started > closed + ms(100) {
                assert!(
                    !answer.is_error(),
                    "{name} after recovery: {}",
                    show_op(op, t0)
                );
            }
        }
        // The watchdog checks every command_timeout / 4 (at most 250 ms),
        // so a timeout may be noticed that much late: reported, within
        // MARGIN.
        let over = ops.iter().filter(|o| o.latency > t.command_timeout).count();
        report.push(format!(
            "{name}: {} requests, slowest {:?}, {over} past command_timeout, \
             slowest refusal while open {refused_max:?}",
            ops.len(),
            slow.latency
        ));
    }
    assert!(stale_values > 0);
    let serves = stale_serves(&mut admin, "stale").await;
    assert!(
        serves - serves_before >= stale_values,
        "{serves_before} -> {serves} < {stale_values}"
    );
    let m = scrape(metrics).await;
    assert_eq!(m.must(STALE_SERVES, &[("rule", "stale")]), serves as f64);
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 0.0);
    println!(
        "SIGSTOP: breaker open {:?} after the freeze; states while frozen {states:?}; \
         {timeouts} upstream errors before it opened; {stale_values} stale serves while \
         open; closed {recovery:?} after SIGCONT; total {:?}\n  {}",
        opened - paused,
        t0.elapsed(),
        report.join("\n  ")
    );
    assert_eq!(
        states.keys().map(String::as_str).collect::<Vec<_>>(),
        ["open"],
        "the breaker while Redis stayed frozen (reset {:?})",
        t.reset
    );
    assert!(recovery <= RECOVERY, "closed {recovery:?} after SIGCONT");
}

// ---------------------------------------------------------------------------
// 3. Half-open probing
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_successful_reconnect_closes_the_breaker_without_waiting_for_reset() {
    let t = Timings {
        reset: 60 * SECOND,
        failure_threshold: 2,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (config, metrics) = fast_config(&redis.url(), TrackingMode::Default, vec![], t);
    let tierd = Tierd::start_with(config).await;
    let mut admin = tierd.raw().await;
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SET", "k", "v1"]).await, b"+OK\r\n");
    assert_eq!(circuit_state(&mut admin).await, "closed");

    redis.kill_in_place();
    drive_open(&mut c, &mut admin, &["SET", "k", "v2"]).await;
    // With a 60 s reset and nothing to reconnect to, it stays open and
    // every request is refused at once.
    let held = Instant::now();
    while held.elapsed() < ms(500) {
        let (got, took) = timed(&mut c, &["SET", "k", "v3"]).await;
        assert_frame(&got, CIRCUIT_OPEN);
        assert!(took <= FAIL_FAST, "refused after {took:?}");
        assert_eq!(circuit_state(&mut admin).await, "open");
        tokio::time::sleep(ms(20)).await;
    }
    let m = scrape(metrics).await;
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 1.0);
    let opens = m.must(CIRCUIT_OPENS, &[]);
    assert!(opens >= 1.0);

    redis.restart_in_place();
    let ready = Instant::now();
    let deadline = Deadline::new(10 * SECOND, "a write through tierd after the restart");
    loop {
        let got = reply(&mut c, &["SET", "k", "v4"]).await;
        if got.as_ref() == b"+OK\r\n" {
            break;
        }
        assert!(Answer::of(&got).is_error(), "{}", text(&got));
        deadline.tick().await;
    }
    let recovery = ready.elapsed();
    assert_eq!(circuit_state(&mut admin).await, "closed");
    let m = scrape(metrics).await;
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 0.0);
    let mut d = direct(&redis).await;
    assert_frame(&d.cmd(&["GET", "k"]).await, &bulk("v4"));
    println!(
        "half-open: served {recovery:?} after Redis answered PING (reset {:?}); opens {opens}",
        t.reset
    );
    assert!(recovery <= RECOVERY, "recovery took {recovery:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_reset_one_probe_goes_through_and_its_failure_reopens() {
    let t = Timings {
        reset: ms(300),
        failure_threshold: 1,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (config, metrics) = fast_config(&redis.url(), TrackingMode::Default, vec![], t);
    let tierd = Tierd::start_with(config).await;
    let mut admin = tierd.raw().await;
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["PING"]).await, b"+PONG\r\n");

    let killed = Instant::now();
    redis.kill_in_place();
    let opened = drive_open(&mut c, &mut admin, &["PING"]).await;
    let opens = scrape(metrics).await.must(CIRCUIT_OPENS, &[]);
    // Refused until reset has passed; then a request goes upstream as a
    // probe and fails there (Redis is still down), which opens it again.
    let deadline = Deadline::new(5 * SECOND, "a probe let through after reset");
    let probed = loop {
        let (got, took) = timed(&mut c, &["PING"]).await;
        assert!(took <= t.command_timeout, "PING took {took:?}");
        match Answer::of(&got) {
            Answer::CircuitOpen => assert!(took <= FAIL_FAST, "refused after {took:?}"),
            Answer::Unavailable => break Instant::now(),
            _ => panic!("PING with Redis down: {}", text(&got)),
        }
        deadline.tick().await;
    };
    // It opened after the kill, so no probe may come before kill + reset.
    assert!(
        probed - killed >= t.reset,
        "a request went upstream {:?} after the kill (reset {:?})",
        probed - killed,
        t.reset
    );
    wait_circuit(&mut admin, "open", 2 * SECOND).await;
    let reopened = scrape(metrics).await.must(CIRCUIT_OPENS, &[]);
    assert!(reopened > opens, "{CIRCUIT_OPENS} {opens} -> {reopened}");
    let (got, took) = timed(&mut c, &["PING"]).await;
    assert_frame(&got, CIRCUIT_OPEN);
    assert!(took <= FAIL_FAST);
    println!(
        "reset: probe after {:?}; opens {opens} -> {reopened}",
        probed - opened
    );
}

// ---------------------------------------------------------------------------
// 4. Stale entries only while open; invalidated entries never
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_entry_past_its_ttl_goes_upstream_while_the_breaker_is_closed() {
    let ttl = SECOND;
    let redis = RedisServer::start();
    // No tracking: nothing tells tierd about the direct write, so only the
    // ttl separates the old value from the new one.
    let (tierd, metrics, mut admin) =
        stale_tierd(&redis, TrackingMode::Off, ttl, Timings::default()).await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "s:k", "v1"]).await;
    wait_caching(&tierd, "stale", "s:k").await;
    // The entry was filled before this instant, so it is past its ttl from
    // `filled + ttl` on.
    let filled = Instant::now();
    must(&mut d, &["SET", "s:k", "v2"]).await;

    let mut c = tierd.raw().await;
    let hits = stat(&mut admin, "stale", "hits").await;
    let got = reply(&mut c, &["GET", "s:k"]).await;
    assert!(filled.elapsed() < ttl, "the control read came too late");
    assert_frame(&got, &bulk("v1"));
    assert_eq!(
        stat(&mut admin, "stale", "hits").await,
        hits + 1,
        "control: the old value is in L1"
    );

    let deadline = Deadline::new(ttl + 5 * SECOND, "the new value after the ttl");
    loop {
        let started = Instant::now();
        let got = reply(&mut c, &["GET", "s:k"]).await;
        if got == bulk("v2") {
            break;
        }
        assert!(
            started < filled + ttl,
            "GET s:k {:?} after the fill (ttl {ttl:?}, breaker {}) answered {}",
            started - filled,
            circuit_state(&mut admin).await,
            text(&got)
        );
        assert_frame(&got, &bulk("v1"));
        deadline.tick().await;
    }
    assert_eq!(circuit_state(&mut admin).await, "closed");
    assert_eq!(stale_serves(&mut admin, "stale").await, 0);
    assert_eq!(
        scrape(metrics)
            .await
            .must(STALE_SERVES, &[("rule", "stale")]),
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_kept_after_a_lost_tracking_link_are_not_served_while_closed() {
    let redis = RedisServer::start();
    let (tierd, _, mut admin) =
        stale_tierd(&redis, TrackingMode::Default, HOUR, Timings::default()).await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "s:k", "v1"]).await;
    must(&mut d, &["SET", "s:other", "o1"]).await;
    wait_caching(&tierd, "stale", "s:k").await;
    wait_caching(&tierd, "stale", "s:other").await;

    let links = info_field(&mut admin, "tierd_tracking_links").await;
    let ids = clients_named(&mut d, "tierd:tracking").await;
    assert_eq!(ids.len(), 1, "one tracking connection: {ids:?}");
    assert_frame(
        &d.cmd(&["CLIENT", "KILL", "ID", &ids[0].to_string()]).await,
        b":1\r\n",
    );
    // Nothing can tell tierd about this write but the lost link itself.
    must(&mut d, &["SET", "s:k", "v2"]).await;
    // Wait until tierd has handled the loss (it has linked again).
    let deadline = Deadline::new(10 * SECOND, "a new tracking link");
    while info_field(&mut admin, "tierd_tracking_links").await <= links {
        deadline.tick().await;
    }

    let mut c = tierd.raw().await;
    let (hits, misses) = (
        stat(&mut admin, "stale", "hits").await,
        stat(&mut admin, "stale", "misses").await,
    );
    assert_frame(&reply(&mut c, &["GET", "s:k"]).await, &bulk("v2"));
    assert_frame(&reply(&mut c, &["GET", "s:other"]).await, &bulk("o1"));
    assert_eq!(
        (
            stat(&mut admin, "stale", "hits").await - hits,
            stat(&mut admin, "stale", "misses").await - misses
        ),
        (0, 2),
        "entries kept through a lost link are stale-only: both reads go upstream"
    );
    assert_eq!(circuit_state(&mut admin).await, "closed");
    assert_eq!(stale_serves(&mut admin, "stale").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidated_entries_are_not_served_during_a_later_outage() {
    let ttl = ms(100);
    let t = Timings {
        reset: 30 * SECOND,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (tierd, metrics, mut admin) = stale_tierd(&redis, TrackingMode::Default, ttl, t).await;
    let mut d = direct(&redis).await;
    for (k, v) in [("s:kept", "k1"), ("s:written", "w1"), ("s:bypassed", "b1")] {
        must(&mut d, &["SET", k, v]).await;
        wait_caching(&tierd, "stale", k).await;
    }
    let filled = Instant::now();

    // A write that bypasses tierd: Redis's tracking reports it.
    let invalidations = tracking_invalidations(&mut admin).await;
    must(&mut d, &["SET", "s:bypassed", "b2"]).await;
    let deadline = Deadline::new(5 * SECOND, "the tracking report of s:bypassed");
    while tracking_invalidations(&mut admin).await <= invalidations {
        deadline.tick().await;
    }
    // A write through tierd: invalidated before the +OK.
    let mut c = tierd.raw().await;
    assert_frame(
        &reply(&mut c, &["SET", "s:written", "w2"]).await,
        b"+OK\r\n",
    );

    redis.kill_in_place();
    let mut driver = tierd.raw().await;
    drive_open(&mut driver, &mut admin, &["PING"]).await;
    let deadline = Deadline::new(5 * SECOND, "the entries past their ttl");
    while filled.elapsed() <= ttl {
        deadline.tick().await;
    }
    let serves = stale_serves(&mut admin, "stale").await;
    // Control: the entry nothing invalidated is served stale.
    assert_frame(&reply(&mut c, &["GET", "s:kept"]).await, &bulk("k1"));
    assert_eq!(stale_serves(&mut admin, "stale").await, serves + 1);
    // The invalidated ones are gone, not kept.
    assert_frame(&reply(&mut c, &["GET", "s:written"]).await, CIRCUIT_OPEN);
    assert_frame(&reply(&mut c, &["GET", "s:bypassed"]).await, CIRCUIT_OPEN);
    assert_frame(&reply(&mut c, &["GET", "s:kept"]).await, &bulk("k1"));
    assert_eq!(stale_serves(&mut admin, "stale").await, serves + 2);
    assert_eq!(
        scrape(metrics)
            .await
            .must(STALE_SERVES, &[("rule", "stale")]),
        (serves + 2) as f64
    );
}

// ---------------------------------------------------------------------------
// 5. Controls: what is not served stale
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn during_an_outage_only_entries_within_stale_ttl_are_served() {
    let ttl = ms(100);
    let brief = ms(1500);
    let t = Timings {
        reset: 30 * SECOND,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (config, metrics) = fast_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            stale_rule("stale", "s:*", ttl, HOUR),
            stale_rule("brief", "b:*", ttl, brief),
            rule("fresh", "f:*", ttl),
        ],
        t,
    );
    let tierd = Tierd::start_with(config).await;
    let mut admin = tierd.raw().await;
    let mut d = direct(&redis).await;
    for k in ["s:k", "s:never", "b:k", "f:k", "o:k"] {
        must(&mut d, &["SET", k, &seeded(k)]).await;
    }
    wait_caching(&tierd, "stale", "s:k").await;
    wait_caching(&tierd, "fresh", "f:k").await;
    // b:k is filled after this instant: it is servable at least until
    // `brief_from + ttl + brief`.
    let brief_from = Instant::now();
    wait_caching(&tierd, "brief", "b:k").await;
    let brief_filled = Instant::now();
    // RESP3 variant of s:k, filled too.
    let mut c3 = tierd.raw().await;
    let hello = c3.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%', "{}", text(&hello));
    for _ in 0..2 {
        assert_frame(
            &reply(&mut c3, &["GET", "s:k"]).await,
            &bulk(&seeded("s:k")),
        );
    }

    redis.kill_in_place();
    let mut driver = tierd.raw().await;
    drive_open(&mut driver, &mut admin, &["PING"]).await;
    let deadline = Deadline::new(5 * SECOND, "the entries past their ttl");
    while brief_filled.elapsed() <= ttl {
        deadline.tick().await;
    }

    let mut c = tierd.raw().await;
    let (got, took) = timed(&mut c, &["GET", "s:k"]).await;
    assert_frame(&got, &bulk(&seeded("s:k")));
    assert!(took <= FAIL_FAST, "a stale serve took {took:?}");
    assert_frame(
        &reply(&mut c3, &["GET", "s:k"]).await,
        &bulk(&seeded("s:k")),
    );
    let (got, _) = timed(&mut c, &["GET", "b:k"]).await;
    assert!(
        brief_from.elapsed() < ttl + brief,
        "the outage started too late to see b:k within its stale_ttl"
    );
    assert_frame(&got, &bulk(&seeded("b:k")));

    // A rule without stale_ttl, a key never read, a key without a rule, and
    // anything that is not a cacheable read: refused at once.
    for args in [
        &["GET", "f:k"][..],
        &["GET", "s:never"],
        &["GET", "o:k"],
        &["SET", "o:k", "x"],
        &["SET", "s:k", "x"],
        &["INCR", "o:n"],
        &["PING"],
        &["MULTI"],
    ] {
        let (got, took) = timed(&mut c, args).await;
        assert_eq!(text(&got), text(CIRCUIT_OPEN), "{args:?}");
        assert!(took <= FAIL_FAST, "{args:?} refused after {took:?}");
    }
    // tierd's own commands still answer.
    let mut fresh_admin = tierd.raw().await;
    assert_eq!(circuit_state(&mut fresh_admin).await, "open");
    assert_eq!(stale_serves(&mut fresh_admin, "fresh").await, 0);

    // Past ttl + stale_ttl the brief entry is gone; the other one is not.
    let deadline = Deadline::new(5 * SECOND, "b:k past its stale_ttl");
    while brief_filled.elapsed() <= ttl + brief + ms(50) {
        deadline.tick().await;
    }
    assert_frame(&reply(&mut c, &["GET", "b:k"]).await, CIRCUIT_OPEN);
    let s_k = reply(&mut c, &["GET", "s:k"]).await;
    // (The SET s:k above was refused; whether it dropped the entry is the
    // write path's business, but a value served must be the old one.)
    assert!(
        s_k == bulk(&seeded("s:k")) || s_k.as_ref() == CIRCUIT_OPEN,
        "{}",
        text(&s_k)
    );

    let stale = stale_serves(&mut admin, "stale").await;
    let brief_serves = stale_serves(&mut admin, "brief").await;
    assert!(stale >= 2, "stale_serves of stale: {stale}");
    assert_eq!(brief_serves, 1);
    let m = scrape(metrics).await;
    assert_eq!(m.must(STALE_SERVES, &[("rule", "stale")]), stale as f64);
    assert_eq!(m.must(STALE_SERVES, &[("rule", "brief")]), 1.0);
    assert_eq!(
        m.value(STALE_SERVES, &[("rule", "fresh")]).unwrap_or(0.0),
        0.0
    );
    assert_eq!(m.must(CIRCUIT_OPEN_GAUGE, &[]), 1.0);
}

/// Design invariant 3 ("no stale forever"): an entry dies with its key's
/// remaining upstream TTL. A key Redis itself has expired (a session, a
/// lock) is not one to serve stale; the spec is silent on it, so this test
/// states the conservative reading.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_past_its_own_redis_expiry_is_not_served_stale() {
    let ttl = ms(100);
    let t = Timings {
        reset: 30 * SECOND,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (tierd, _, mut admin) = stale_tierd(&redis, TrackingMode::Default, ttl, t).await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "s:plain", "p"]).await;
    wait_caching(&tierd, "stale", "s:plain").await;
    let set = Instant::now();
    must(&mut d, &["SET", "s:session", "token", "PX", "400"]).await;
    wait_caching(&tierd, "stale", "s:session").await;

    redis.kill_in_place();
    let mut driver = tierd.raw().await;
    drive_open(&mut driver, &mut admin, &["PING"]).await;
    let deadline = Deadline::new(5 * SECOND, "s:session past its PX");
    while set.elapsed() <= ms(450) {
        deadline.tick().await;
    }
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["GET", "s:plain"]).await, &bulk("p"));
    assert_frame(&reply(&mut c, &["GET", "s:session"]).await, CIRCUIT_OPEN);
}

/// Entries of a `stale_ttl` rule survive the lost tracking link of an
/// outage as stale-only; once Redis is back they must go, even within
/// their ttl: a Redis restarted empty answers nil, and so must tierd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_kept_through_an_outage_are_dropped_when_redis_is_back() {
    let t = Timings {
        reset: 30 * SECOND,
        ..Timings::default()
    };
    let mut redis = RedisServer::start();
    let (tierd, _, mut admin) = stale_tierd(&redis, TrackingMode::Default, HOUR, t).await;
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "s:k", "v1"]).await;
    wait_caching(&tierd, "stale", "s:k").await;

    redis.kill_in_place();
    let mut c = tierd.raw().await;
    drive_open(&mut c, &mut admin, &["PING"]).await;
    assert_frame(&reply(&mut c, &["GET", "s:k"]).await, &bulk("v1"));

    // Restarted without persistence: s:k is gone.
    redis.restart_in_place();
    let deadline = Deadline::new(10 * SECOND, "a write through tierd after the restart");
    loop {
        let got = reply(&mut c, &["SET", "o:x", "1"]).await;
        if got.as_ref() == b"+OK\r\n" {
            break;
        }
        assert!(Answer::of(&got).is_error(), "{}", text(&got));
        deadline.tick().await;
    }
    assert_eq!(circuit_state(&mut admin).await, "closed");
    for _ in 0..3 {
        assert_frame(&reply(&mut c, &["GET", "s:k"]).await, b"$-1\r\n");
    }
}

/// A connection Redis drops while it keeps answering (`CLIENT KILL`, its
/// `timeout`) is not a failure: tierd reconnects at once and nothing is
/// refused, even with `failure_threshold = 1`. (Redis going away is: the
/// reconnect fails, see the kill tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_connection_that_reconnects_is_not_a_failure() {
    let t = Timings {
        failure_threshold: 1,
        reset: 60 * SECOND,
        ..Timings::default()
    };
    let redis = RedisServer::start();
    let (config, metrics) = fast_config(&redis.url(), TrackingMode::Default, vec![], t);
    let tierd = Tierd::start_with(config).await;
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SET", "k", "v"]).await, b"+OK\r\n");
    assert_eq!(scrape(metrics).await.must(CIRCUIT_OPENS, &[]), 0.0);

    let mut d = direct(&redis).await;
    let killed = d
        .cmd(&["CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes"])
        .await;
    assert!(
        killed.starts_with(b":") && killed.as_ref() != b":0\r\n",
        "{}",
        text(&killed)
    );
    // Served again, on new connections.
    let deadline = Deadline::new(10 * SECOND, "GET k answered again");
    while reply(&mut c, &["GET", "k"]).await != bulk("v") {
        deadline.tick().await;
    }
    let mut admin = tierd.raw().await;
    wait_circuit(&mut admin, "closed", 5 * SECOND).await;
    let opens = scrape(metrics).await.must(CIRCUIT_OPENS, &[]);
    assert_eq!(
        opens, 0.0,
        "Redis dropped tierd's connections but kept answering: {CIRCUIT_OPENS} must stay 0"
    );
}
