//! The invalidation bus (issue 4), end to end: one real redis-server and
//! three tierd instances A, B and C, each in this process on its own thread
//! with its own current-thread runtime (tierd's default `threads = 1`), all
//! on loopback. Every instance caches `bench:*`, `x:*` and `y:*` for an hour.
//! Three measurements, printed as markdown tables:
//!
//! 1. **Propagation latency**: B and C hold `bench:{i % 100}` in L1, a `SET`
//!    of a new value goes through A, and from the moment A's `+OK` is read
//!    the client polls B (even rounds) or C (odd rounds) with `GET` until it
//!    returns the new value. With `tracking = "off"` only the bus can tell B
//!    and C; the same rounds are repeated with `tracking = "default"`, where
//!    Redis's own invalidation push races the bus. Round trips taken in the
//!    same rounds are printed too: an L1 hit (what a stale poll costs, the
//!    resolution of the measurement), a GET forwarded to Redis (about what
//!    the last poll, a miss, costs) and the SET.
//! 2. **Pattern invalidation**: `CACHE.INVALIDATE PATTERN pat:*` through A
//!    with 100,000 matching and 50,000 other keys in Redis: keys per second,
//!    and the latency of L1 hits through A and B measured by two other
//!    clients just before and during it.
//! 3. **L1-only pattern drop**: `CACHE.INVALIDATE PATTERN x:* L1ONLY`
//!    through B while B's and C's L1 each hold 100,000 `x:*` and 50,000
//!    `y:*` entries: how long B takes to answer, when C (told by the bus)
//!    no longer holds any `x:*` entry, and the latency of other clients' L1
//!    hits on B and C meanwhile (each instance's one event loop does its
//!    walk).
//!
//! Run with `cargo bench --bench bus` (about 30 s), or `scripts/bench.sh`
//! with `BENCH_SUITES=bus`. Needs `redis-server` on `PATH` (or in
//! `REDIS_SERVER`). `BUS_ROUNDS` changes the propagation rounds per mode
//! [2000] and `BUS_REPEAT` the runs of measurements 2 and 3 [3]. The servers
//! are stopped on the way out, also after a panic.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tierd::config::Config;
use tierd::protocol::reply::encode_command;

#[path = "support/servers.rs"]
mod servers;

use servers::{
    benching, env_usize, load_average, read_all, rule_stats, Client, Fleet, Redis, Summary,
};

/// Keys the propagation rounds cycle through.
const PROPAGATION_KEYS: usize = 100;
/// A poll that has not seen the new value after this long counts as lost.
const POLL_LIMIT: Duration = Duration::from_secs(2);
/// Keys matching the invalidated pattern, and keys that do not.
const MATCHING: usize = 100_000;
const OTHERS: usize = 50_000;
/// How long the probe clients run before an invalidation starts.
const BASELINE: Duration = Duration::from_millis(500);
/// The L1-hit key the probe clients read.
const PROBE_KEY: &str = "bench:probe";
/// GETs in flight when filling L1.
const READ_WINDOW: usize = 1000;

fn main() {
    if !benching() {
        return;
    }
    let rounds = env_usize("BUS_ROUNDS", 2000);
    let repeat = env_usize("BUS_REPEAT", 3).max(1);
    let started = Instant::now();
    let redis = Redis::start();
    println!(
        "bus bench: {}; 3 tierd instances in this process, one current-thread runtime each; \
         {} CPUs; load average at start {}\n",
        redis.version(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );

    let mut propagation = Vec::new();
    let (pattern_runs, pattern_probes, l1_runs, l1_probes) = {
        let fleet = Fleet::start(&config(&redis, "off"), 3);
        propagation.extend(measure_propagation(&fleet, rounds, "off"));
        let (pattern_runs, pattern_probes) = measure_pattern(&redis, &fleet, repeat);
        let (l1_runs, l1_probes) = measure_l1_only(&redis, &fleet, repeat);
        (pattern_runs, pattern_probes, l1_runs, l1_probes)
    };
    {
        let mut direct = Client::connect(redis.addr());
        direct.ok(&["FLUSHALL"]);
        let fleet = Fleet::start(&config(&redis, "default"), 3);
        propagation.extend(measure_propagation(&fleet, rounds, "default"));
    }

    print_propagation(&propagation);
    print_pattern(&pattern_runs, &pattern_probes);
    print_l1_only(&l1_runs, &l1_probes);
    println!(
        "(total run time {:.1} s; load average at end {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

// ---------------------------------------------------------------------------
// 1. Propagation latency
// ---------------------------------------------------------------------------

/// One tracking mode's propagation rounds, per polled instance.
struct Propagation {
    mode: &'static str,
    polled: &'static str,
    latencies: Vec<Duration>,
    /// Rounds whose poll did not see the new value within [`POLL_LIMIT`].
    lost: usize,
    /// GETs that still returned the old value, over all rounds.
    stale_polls: usize,
    /// Round trips taken in the same rounds, for the resolution table: the
    /// polled instance's second warming GET (an L1 hit, as a stale poll
    /// is), a GET it forwards to Redis (as the last poll, a miss, is), and
    /// the SET through A.
    hit_rtt: Vec<Duration>,
    forwarded_rtt: Vec<Duration>,
    set_rtt: Vec<Duration>,
}

fn measure_propagation(fleet: &Fleet, rounds: usize, mode: &'static str) -> Vec<Propagation> {
    let mut a = fleet.client(0);
    let mut b = fleet.client(1);
    let mut c = fleet.client(2);

    // The second GET of a key must be an L1 hit, or the rounds below would
    // measure nothing but Redis.
    for (name, client) in [("B", &mut b), ("C", &mut c)] {
        let before = rule_stats(client, "bench");
        client.get("bench:0");
        client.get("bench:0");
        let after = rule_stats(client, "bench");
        assert!(
            after.hits > before.hits,
            "{name}: the second GET of bench:0 was not an L1 hit ({before:?} -> {after:?})"
        );
    }
    a.ok(&["SET", PROBE_KEY, "probe"]);
    // No rule matches `nocache:*`: every GET of it is forwarded to Redis.
    a.ok(&["SET", "nocache:probe", "probe"]);

    let before = [rule_stats(&mut b, "bench"), rule_stats(&mut c, "bench")];
    let mut out: Vec<Propagation> = ["B", "C"]
        .into_iter()
        .map(|polled| Propagation {
            mode,
            polled,
            latencies: Vec::with_capacity(rounds / 2 + 1),
            lost: 0,
            stale_polls: 0,
            hit_rtt: Vec::with_capacity(rounds / 2 + 1),
            forwarded_rtt: Vec::with_capacity(rounds / 2 + 1),
            set_rtt: Vec::with_capacity(rounds / 2 + 1),
        })
        .collect();
    let timed = |f: &mut dyn FnMut()| {
        let t = Instant::now();
        f();
        t.elapsed()
    };
    for i in 0..rounds {
        let key = format!("bench:{}", i % PROPAGATION_KEYS);
        let value = format!("v{i}");
        let (polled, other, result) = if i % 2 == 0 {
            (&mut b, &mut c, &mut out[0])
        } else {
            (&mut c, &mut b, &mut out[1])
        };
        // Cached in both B and C: a miss fills, the second read hits.
        other.get(&key);
        other.get(&key);
        polled.get(&key);
        result.hit_rtt.push(timed(&mut || {
            polled.get(&key);
        }));
        result.forwarded_rtt.push(timed(&mut || {
            polled.get("nocache:probe");
        }));
        result
            .set_rtt
            .push(timed(&mut || a.ok(&["SET", &key, &value])));
        let t0 = Instant::now();
        loop {
            let got = polled.get(&key);
            if got.as_deref() == Some(value.as_bytes()) {
                result.latencies.push(t0.elapsed());
                break;
            }
            result.stale_polls += 1;
            if t0.elapsed() > POLL_LIMIT {
                result.lost += 1;
                break;
            }
        }
    }
    let after = [rule_stats(&mut b, "bench"), rule_stats(&mut c, "bench")];
    for (i, name) in ["B", "C"].into_iter().enumerate() {
        // Per round: two warming GETs, of which at least the second hits.
        let hits = after[i].hits - before[i].hits;
        assert!(
            hits as usize >= rounds,
            "{name}: only {hits} L1 hits in {rounds} rounds; the warming GETs did not hit"
        );
    }
    out
}

fn print_propagation(results: &[Propagation]) {
    println!("### Propagation: SET through A, then GET through B or C until the new value\n");
    println!(
        "A SET's reply read at t0; t1 when a GET through the polled instance returns the new value. \
         Even rounds poll B, odd rounds C; both hold the key in L1 before the SET.\n"
    );
    println!(
        "| tracking | polled | rounds | p50 µs | p90 µs | p99 µs | max µs | stale polls/round | lost |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let s = Summary::of(&r.latencies);
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            r.mode,
            r.polled,
            s.n + r.lost,
            us(s.p50),
            us(s.p90),
            us(s.p99),
            us(s.max),
            r.stale_polls as f64 / (s.n + r.lost).max(1) as f64,
            r.lost,
        );
    }
    println!(
        "\nResolution: round trips taken in the same rounds, one of each per round. A stale poll \
         costs an L1 hit; the last poll is a miss, which costs about a forwarded GET.\n"
    );
    println!(
        "| tracking | polled | L1 hit p50 µs | p99 µs | forwarded GET p50 µs | p99 µs | SET through A p50 µs | p99 µs |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let (h, f, w) = (
            Summary::of(&r.hit_rtt),
            Summary::of(&r.forwarded_rtt),
            Summary::of(&r.set_rtt),
        );
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.mode,
            r.polled,
            us(h.p50),
            us(h.p99),
            us(f.p50),
            us(f.p99),
            us(w.p50),
            us(w.p99),
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// 2. Pattern invalidation through A
// ---------------------------------------------------------------------------

struct PatternRun {
    removed: i64,
    dbsize_before: i64,
    dbsize_after: i64,
    elapsed: Duration,
}

/// Probe samples of one instance, before and during the invalidations.
struct Probes {
    instance: &'static str,
    baseline: Vec<Duration>,
    during: Vec<Duration>,
}

fn measure_pattern(redis: &Redis, fleet: &Fleet, repeat: usize) -> (Vec<PatternRun>, Vec<Probes>) {
    let mut direct = Client::connect(redis.addr());
    let mut a = fleet.client(0);
    let mut probes = vec![Probes::new("A (runs the invalidation)"), Probes::new("B")];
    let mut runs = Vec::new();
    for _ in 0..repeat {
        load(&mut direct, "pat", MATCHING);
        load(&mut direct, "other", OTHERS);
        let dbsize_before = direct.int(&["DBSIZE"]);
        let probing = [Probe::start(fleet.addrs[0]), Probe::start(fleet.addrs[1])];
        std::thread::sleep(BASELINE);
        let t = Instant::now();
        let removed = a.int(&["CACHE.INVALIDATE", "PATTERN", "pat:*"]);
        let elapsed = t.elapsed();
        let end = Instant::now();
        for (probe, into) in probing.into_iter().zip(&mut probes) {
            into.add(probe.stop(), t, end);
        }
        let dbsize_after = direct.int(&["DBSIZE"]);
        assert_eq!(
            removed, MATCHING as i64,
            "CACHE.INVALIDATE PATTERN pat:* reply"
        );
        assert_eq!(
            dbsize_before - dbsize_after,
            MATCHING as i64,
            "DBSIZE did not drop by the keys removed"
        );
        runs.push(PatternRun {
            removed,
            dbsize_before,
            dbsize_after,
            elapsed,
        });
        // The others go too, so every run starts from the same keyspace.
        delete_matching(&mut direct, "other:*");
    }
    (runs, probes)
}

fn print_pattern(runs: &[PatternRun], probes: &[Probes]) {
    println!(
        "### CACHE.INVALIDATE PATTERN pat:* through A ({MATCHING} matching keys among {} in Redis)\n",
        MATCHING + OTHERS
    );
    println!("| run | removed | DBSIZE before → after | time ms | keys/s |");
    println!("|---:|---:|---|---:|---:|");
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {} | {} → {} | {:.1} | {:.0} |",
            i + 1,
            r.removed,
            r.dbsize_before,
            r.dbsize_after,
            r.elapsed.as_secs_f64() * 1e3,
            r.removed as f64 / r.elapsed.as_secs_f64(),
        );
    }
    print_probes(
        probes,
        "the invalidation",
        "from sending it until its reply was read",
    );
}

// ---------------------------------------------------------------------------
// 3. L1-only pattern drop on B
// ---------------------------------------------------------------------------

struct L1Run {
    entries_before: u64,
    other_entries: u64,
    dropped: i64,
    elapsed: Duration,
    /// From the command's start until C's L1 no longer held an `x:*` entry.
    c_done: Duration,
}

fn measure_l1_only(redis: &Redis, fleet: &Fleet, repeat: usize) -> (Vec<L1Run>, Vec<Probes>) {
    let mut direct = Client::connect(redis.addr());
    load(&mut direct, "x", MATCHING);
    load(&mut direct, "y", OTHERS);
    let mut b = fleet.client(1);
    let mut c = fleet.client(2);
    let mut probes = vec![
        Probes::new("B (runs the drop)"),
        Probes::new("C (drops on the bus message)"),
    ];
    let mut runs = Vec::new();
    for _ in 0..repeat {
        for client in [&mut b, &mut c] {
            read_all(client, "x", MATCHING, READ_WINDOW);
            read_all(client, "y", OTHERS, READ_WINDOW);
            assert_eq!(
                rule_stats(client, "x").entries,
                MATCHING as u64,
                "x:* entries in L1"
            );
        }
        let entries_before = rule_stats(&mut b, "x").entries;
        let other_entries = rule_stats(&mut b, "y").entries;
        let probing = [Probe::start(fleet.addrs[1]), Probe::start(fleet.addrs[2])];
        std::thread::sleep(BASELINE);
        let t = Instant::now();
        let dropped = b.int(&["CACHE.INVALIDATE", "PATTERN", "x:*", "L1ONLY"]);
        let elapsed = t.elapsed();
        let b_end = Instant::now();
        // C hears of it on the bus; its answer to CACHE.STATS waits for
        // the walk, since both run on C's one event loop.
        while rule_stats(&mut c, "x").entries > 0 {
            assert!(t.elapsed() < POLL_LIMIT, "C still holds x:* entries");
        }
        let c_done = t.elapsed();
        let ends = [b_end, Instant::now()];
        for ((probe, into), end) in probing.into_iter().zip(&mut probes).zip(ends) {
            into.add(probe.stop(), t, end);
        }
        assert_eq!(
            dropped, MATCHING as i64,
            "CACHE.INVALIDATE PATTERN x:* L1ONLY reply"
        );
        for client in [&mut b, &mut c] {
            assert_eq!(rule_stats(client, "x").entries, 0, "x:* entries left in L1");
            assert_eq!(
                rule_stats(client, "y").entries,
                other_entries,
                "y:* entries dropped by the x:* pattern"
            );
        }
        runs.push(L1Run {
            entries_before,
            other_entries,
            dropped,
            elapsed,
            c_done,
        });
    }
    (runs, probes)
}

fn print_l1_only(runs: &[L1Run], probes: &[Probes]) {
    println!(
        "### CACHE.INVALIDATE PATTERN x:* L1ONLY through B (L1 only, Redis untouched; \
         C holds the same entries and drops them on the bus message)\n"
    );
    println!(
        "| run | B's L1: x:* + other entries | dropped | B's reply ms | entries dropped/s | C done ms |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for (i, r) in runs.iter().enumerate() {
        println!(
            "| {} | {} + {} | {} | {:.1} | {:.0} | {:.1} |",
            i + 1,
            r.entries_before,
            r.other_entries,
            r.dropped,
            r.elapsed.as_secs_f64() * 1e3,
            r.dropped as f64 / r.elapsed.as_secs_f64(),
            r.c_done.as_secs_f64() * 1e3,
        );
    }
    print_probes(
        probes,
        "the drop",
        "from sending it until B replied (B), or until C held no x:* entry (C)",
    );
}

// ---------------------------------------------------------------------------
// Probes: L1 hits in a loop on another connection
// ---------------------------------------------------------------------------

impl Probes {
    fn new(instance: &'static str) -> Probes {
        Probes {
            instance,
            baseline: Vec::new(),
            during: Vec::new(),
        }
    }

    /// Files each sample by when it started: before `start`, or between
    /// `start` and `end`. Later samples are dropped.
    fn add(&mut self, samples: Vec<(Instant, Duration)>, start: Instant, end: Instant) {
        for (at, took) in samples {
            if at < start {
                self.baseline.push(took);
            } else if at <= end {
                self.during.push(took);
            }
        }
    }
}

fn print_probes(probes: &[Probes], what: &str, during: &str) {
    println!(
        "\nL1 hits of `GET {PROBE_KEY}` by other clients (one per instance), all runs; \
         \"before\": the {} ms before {what}; \"during\": {during}:\n",
        BASELINE.as_millis()
    );
    println!("| through | window | GETs | p50 µs | p99 µs | max µs |");
    println!("|---|---|---:|---:|---:|---:|");
    for p in probes {
        for (window, samples) in [("before", &p.baseline), ("during", &p.during)] {
            let s = Summary::of(samples);
            println!(
                "| {} | {window} | {} | {} | {} | {} |",
                p.instance,
                s.n,
                us(s.p50),
                us(s.p99),
                us(s.max)
            );
        }
    }
    println!();
}

/// A thread reading [`PROBE_KEY`] through one instance as fast as it can.
struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, Duration)>>,
}

impl Probe {
    fn start(addr: SocketAddr) -> Probe {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let mut client = Client::connect(addr);
        // The first read may fill; from then on each one is an L1 hit.
        client.get(PROBE_KEY);
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::with_capacity(1 << 16);
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                client.get(PROBE_KEY);
                samples.push((t, t.elapsed()));
            }
            samples
        });
        Probe { stop, thread }
    }

    fn stop(self) -> Vec<(Instant, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().expect("probe thread panicked")
    }
}

// ---------------------------------------------------------------------------
// Keyspace helpers
// ---------------------------------------------------------------------------

/// `{prefix}:0` … `{prefix}:{n-1}`, 10-byte values, by pipelined MSETs.
fn load(direct: &mut Client, prefix: &str, n: usize) {
    const PER_MSET: usize = 1000;
    let mut pending = 0;
    for start in (0..n).step_by(PER_MSET) {
        let pairs: Vec<String> = (start..n.min(start + PER_MSET))
            .flat_map(|i| [format!("{prefix}:{i}"), format!("{i:010}")])
            .collect();
        let mut args: Vec<&[u8]> = vec![b"MSET"];
        args.extend(pairs.iter().map(|p| p.as_bytes()));
        direct.send(&encode_command(&args));
        pending += 1;
    }
    for _ in 0..pending {
        let reply = direct.frame();
        assert_eq!(reply, b"+OK\r\n", "MSET");
    }
}

/// Deletes `glob` from Redis directly (SCAN + UNLINK), between runs.
fn delete_matching(direct: &mut Client, glob: &str) {
    direct.int(&[
        "EVAL",
        "local n = 0 local c = '0' repeat local r = redis.call('SCAN', c, 'MATCH', ARGV[1], \
         'COUNT', 1000) c = r[1] for _, k in ipairs(r[2]) do n = n + redis.call('UNLINK', k) end \
         until c == '0' return n",
        "0",
        glob,
    ]);
}

// ---------------------------------------------------------------------------
// The fleet: A, B and C on one Redis, with their buses live
// ---------------------------------------------------------------------------

/// The file a fleet instance would read, with the command line's overrides.
fn config(redis: &Redis, tracking: &str) -> Config {
    let toml = format!(
        r#"
[invalidation]
tracking = "{tracking}"
bus = true

[[rules]]
name = "bench"
match = "bench:*"
ttl = "1h"

[[rules]]
name = "x"
match = "x:*"
ttl = "1h"

[[rules]]
name = "y"
match = "y:*"
ttl = "1h"
"#
    );
    redis.tierd_config(&toml)
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

fn us(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1e6)
}
