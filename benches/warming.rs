//! Warming (issue 7), end to end: how fast a restarted tierd is warm. One
//! real redis-server holding `WARMING_KEYS` keys (100,000), and tierd
//! instances in this process, each on its own thread with its own
//! current-thread runtime (tierd's default `threads = 1`), on loopback, with
//! tracking and the bus on (the defaults).
//!
//! **The workload** is `GET` of a key drawn from a Zipf(0.99) distribution
//! over the keys (key `key:{r}` has rank `r`), offered at a steady
//! `WARMING_RPS` (5,000 requests a second) by two client threads, each with
//! its own connection, pipelining batches of 20.
//!
//! **The hot set.** First an instance runs the same workload flat out for
//! `WARMING_PRIME_SECS` (30 s), recording its hottest keys every second
//! (`[warming] hot_interval = "1s"`, `hot_keys = WARMING_LIMIT`), as a
//! long-running instance of the fleet would; then it stops, and its
//! shutdown writes the hot set once more.
//!
//! **Three cases**, one after the other, each a fresh instance started
//! while the workload waits, with a rule for `key:*` (`ttl = "1h"`) that
//! differs only in `warm`:
//!
//! - **hot-set warming**: `warm = { limit = WARMING_LIMIT, hot = true,
//!   scan = false }`: the instance loads the hot set on startup;
//! - **pattern warming**: `warm = { limit = WARMING_LIMIT, hot = false,
//!   scan = true }`: the first `WARMING_LIMIT` keys `SCAN` finds, in hash
//!   order, so about that share of the keys, whatever their rank;
//! - **no warming**: L1 fills from the workload's own misses.
//!
//! `[warming] rate = WARMING_RATE` (20,000 keys a second). The clock starts
//! when the instance answers `PING`, and the workload starts then. Every
//! second the bench reads the rule's `hits` and `misses` from `CACHE.STATS`;
//! the hit rate of second `k` is the share of the L1 lookups in `(k-1, k]`
//! that hit. Printed as a markdown table at 1, 2, 5, 10, 30 and 60 s (those
//! within `WARMING_SECS`, 60), with the mean over the first 10 s and the
//! first second at 80% or more. **Target: ≥ 80% within 10 s with hot-set
//! warming.**
//!
//! Run with `cargo bench --bench warming` (about 4 minutes plus the build:
//! the prime, three cases of `WARMING_SECS`, and loading the keys), or
//! `scripts/bench.sh` with `BENCH_SUITES=warming`. For a quick look,
//! `WARMING_SECS=10 WARMING_PRIME_SECS=5`. Needs `redis-server` on `PATH`
//! (or in `REDIS_SERVER`). Environment, defaults in brackets:
//! `WARMING_KEYS` [100000], `WARMING_RPS` [5000], `WARMING_SECS` [60],
//! `WARMING_PRIME_SECS` [30], `WARMING_LIMIT` [20000] (the rules' `limit`
//! and `hot_keys`), `WARMING_RATE` [20000], `WARMING_VALUE_SIZE` bytes
//! [100]. The servers are stopped on the way out, also after a panic.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierd::config::Config;
use tierd::protocol::reply::encode_command;

#[path = "support/servers.rs"]
mod servers;

use servers::{benching, env_usize, load_average, rule_counters, Client, Instance, Redis};

/// The rule's name in `CACHE.STATS`.
const RULE: &str = "zipf";
/// The Zipf exponent.
const EXPONENT: f64 = 0.99;
/// Client threads offering the workload.
const THREADS: usize = 2;
/// GETs per pipelined batch.
const BATCH: usize = 20;
/// The hit rate the target asks for, and by when.
const TARGET: f64 = 0.80;
const TARGET_BY: usize = 10;
/// The seconds the table shows.
const MARKS: [usize; 6] = [1, 2, 5, 10, 30, 60];

#[derive(Clone, Copy, PartialEq, Eq)]
enum Case {
    Hot,
    Pattern,
    None,
}

impl Case {
    fn name(self) -> &'static str {
        match self {
            Case::Hot => "hot-set warming",
            Case::Pattern => "pattern warming",
            Case::None => "no warming",
        }
    }

    /// The rule's `warm`, if any.
    fn warm(self, limit: usize) -> String {
        match self {
            Case::Hot => {
                format!("warm = {{ on_startup = true, limit = {limit}, hot = true, scan = false }}")
            }
            Case::Pattern => {
                format!("warm = {{ on_startup = true, limit = {limit}, hot = false, scan = true }}")
            }
            Case::None => String::new(),
        }
    }
}

struct Settings {
    keys: usize,
    rps: usize,
    secs: usize,
    prime_secs: usize,
    limit: usize,
    rate: usize,
    value_size: usize,
}

fn main() {
    if !benching() {
        return;
    }
    let s = Settings {
        keys: env_usize("WARMING_KEYS", 100_000).max(1),
        rps: env_usize("WARMING_RPS", 5_000).max(1),
        secs: env_usize("WARMING_SECS", 60).max(1),
        prime_secs: env_usize("WARMING_PRIME_SECS", 30).max(1),
        limit: env_usize("WARMING_LIMIT", 20_000).clamp(1, 100_000),
        rate: env_usize("WARMING_RATE", 20_000).clamp(1, 1_000_000),
        value_size: env_usize("WARMING_VALUE_SIZE", 100),
    };
    let started = Instant::now();
    let redis = Redis::start();
    println!(
        "warming bench: {}; {} keys of {} bytes; GET of Zipf({EXPONENT}) ranks at {} requests/s \
         ({THREADS} client threads, batches of {BATCH}); limit = hot_keys = {}; \
         [warming] rate = {}; hot set primed by {} s of the workload flat out; {} CPUs; load \
         average at start {}\n",
        redis.version(),
        s.keys,
        s.value_size,
        s.rps,
        s.limit,
        s.rate,
        s.prime_secs,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );
    load_keys(&redis, &s);
    let zipf = Arc::new(Zipf::new(s.keys, EXPONENT));

    // The hot set: an instance under the workload, then stopped.
    let primed = {
        let instance = Instance::start(config(&redis, &s, Case::Hot, "1s"), "tierd-prime");
        await_caching(&instance);
        let stats = Workload::run(&instance, &zipf, Duration::from_secs(s.prime_secs as u64));
        drop(instance);
        stats
    };
    let mut direct = Client::connect(redis.addr());
    let hot_set = direct.int(&["ZCARD", &format!("tierd:hot:{RULE}")]);
    let hot_mass = hot_set_mass(&mut direct, &zipf);
    println!(
        "prime: {} GETs in {} s; hot set tierd:hot:{RULE}: {hot_set} keys, holding {:.1}% of \
         the workload's reads (the best {hot_set} keys hold {:.1}%)\n",
        primed,
        s.prime_secs,
        hot_mass * 100.0,
        zipf.mass(usize::try_from(hot_set).unwrap_or(0)) * 100.0,
    );

    let results: Vec<(Case, Vec<Second>)> = [Case::Hot, Case::Pattern, Case::None]
        .into_iter()
        .map(|case| (case, measure(&redis, &s, &zipf, case)))
        .collect();
    print_table(&results, &s);
    println!(
        "\n(total run time {:.1} s; load average at end {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// The file every instance reads, with the command line's overrides.
fn config(redis: &Redis, s: &Settings, case: Case, hot_interval: &str) -> Config {
    let toml = format!(
        r#"
[warming]
rate = {rate}
hot_interval = "{hot_interval}"
hot_keys = {limit}

[[rules]]
name = "{RULE}"
match = "key:*"
ttl = "1h"
{warm}
"#,
        rate = s.rate,
        limit = s.limit,
        warm = case.warm(s.limit),
    );
    redis.tierd_config(&toml)
}

/// `SET key:{i}` for every key, straight into Redis, pipelined.
fn load_keys(redis: &Redis, s: &Settings) {
    let mut client = Client::connect(redis.addr());
    client.ok(&["FLUSHALL"]);
    let value = vec![b'v'; s.value_size];
    for start in (0..s.keys).step_by(1000) {
        let end = s.keys.min(start + 1000);
        let mut batch = Vec::new();
        for i in start..end {
            let key = format!("key:{i}");
            batch.extend_from_slice(&encode_command(&[b"SET", key.as_bytes(), &value]));
        }
        client.send(&batch);
        for _ in start..end {
            assert_eq!(client.frame(), b"+OK\r\n");
        }
    }
}

/// Waits until the instance caches: its links are live (10 s at most).
fn await_caching(instance: &Instance) {
    let mut client = Client::connect(instance.addr);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let info = client.cmd(&["INFO", "tierd"]);
        let info = String::from_utf8_lossy(&info);
        if info.contains("tierd_bus_live:1\r\n") && info.contains("tierd_tracking_live:1\r\n") {
            return;
        }
        assert!(Instant::now() < deadline, "tierd links not live: {info}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The share of the workload's reads that the hot set's keys receive.
fn hot_set_mass(direct: &mut Client, zipf: &Zipf) -> f64 {
    let reply = direct.cmd(&["ZRANGE", &format!("tierd:hot:{RULE}"), "0", "-1"]);
    let text = String::from_utf8_lossy(&reply);
    text.split("\r\n")
        .filter_map(|l| l.strip_prefix("key:")?.parse::<usize>().ok())
        .map(|rank| zipf.p(rank))
        .sum()
}

// ---------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------

/// One second of a case.
#[derive(Clone, Copy, Default)]
struct Second {
    hits: u64,
    misses: u64,
    entries: u64,
}

impl Second {
    fn rate(self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 {
            0.0
        } else {
            self.hits as f64 / lookups as f64
        }
    }
}

/// Starts a fresh instance for `case` and measures each second's hit rate
/// under the workload, from the moment it answers `PING`.
fn measure(redis: &Redis, s: &Settings, zipf: &Arc<Zipf>, case: Case) -> Vec<Second> {
    let instance = Instance::start(config(redis, s, case, "10s"), "tierd-measured");
    let t0 = Instant::now();
    let duration = Duration::from_secs(s.secs as u64);
    let stop = Arc::new(AtomicBool::new(false));
    let load = {
        let (addr, zipf, stop) = (instance.addr, zipf.clone(), stop.clone());
        let rps = s.rps;
        std::thread::spawn(move || Workload::offered(addr, &zipf, rps, t0, &stop))
    };
    let mut stats = Client::connect(instance.addr);
    let mut seconds = Vec::with_capacity(s.secs);
    let mut last = [0u64; 2];
    for k in 1..=s.secs {
        let at = t0 + Duration::from_secs(k as u64);
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let [hits, misses, entries] =
            rule_counters(&mut stats, RULE, ["hits", "misses", "entries"]);
        seconds.push(Second {
            hits: hits - last[0],
            misses: misses - last[1],
            entries,
        });
        last = [hits, misses];
    }
    stop.store(true, Ordering::SeqCst);
    let _ = load.join();
    assert!(t0.elapsed() >= duration);
    drop(instance);
    seconds
}

// ---------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------

struct Workload;

impl Workload {
    /// Flat out on `THREADS` connections for `duration`; the GETs sent.
    fn run(instance: &Instance, zipf: &Arc<Zipf>, duration: Duration) -> u64 {
        let stop = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (addr, zipf, stop) = (instance.addr, zipf.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut client = Client::connect(addr);
                    let mut rng = Rng::new(t as u64 + 1);
                    let mut sent = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        batch(&mut client, &zipf, &mut rng);
                        sent += BATCH as u64;
                    }
                    sent
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::SeqCst);
        threads.into_iter().map(|t| t.join().unwrap_or(0)).sum()
    }

    /// `rps` GETs a second, spread over `THREADS` connections, from `t0`
    /// until `stop`.
    fn offered(
        addr: std::net::SocketAddr,
        zipf: &Arc<Zipf>,
        rps: usize,
        t0: Instant,
        stop: &Arc<AtomicBool>,
    ) {
        let threads: Vec<_> = (0..THREADS)
            .map(|t| {
                let (zipf, stop) = (zipf.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut client = Client::connect(addr);
                    let mut rng = Rng::new(1000 + t as u64);
                    // Each thread's batches, evenly spaced.
                    let every = Duration::from_secs_f64((BATCH * THREADS) as f64 / rps as f64);
                    let mut n = 0u32;
                    while !stop.load(Ordering::Relaxed) {
                        let at = t0 + every * n;
                        if let Some(wait) = at.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        batch(&mut client, &zipf, &mut rng);
                        n += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
    }
}

/// One pipelined batch of GETs; checks every reply is the value.
fn batch(client: &mut Client, zipf: &Zipf, rng: &mut Rng) {
    let mut out = Vec::with_capacity(BATCH * 32);
    for _ in 0..BATCH {
        let key = format!("key:{}", zipf.sample(rng));
        out.extend_from_slice(&encode_command(&[b"GET", key.as_bytes()]));
    }
    client.send(&out);
    for _ in 0..BATCH {
        let reply = client.frame();
        assert!(
            reply.starts_with(b"$"),
            "GET: {:?}",
            String::from_utf8_lossy(&reply)
        );
    }
}

/// Zipf(s) over ranks 0..n: rank r is drawn with probability
/// (r+1)^-s / H(n, s).
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let weights: Vec<f64> = (1..=n).map(|r| (r as f64).powf(-s)).collect();
        let total: f64 = weights.iter().sum();
        let mut acc = 0.0;
        let cdf = weights
            .iter()
            .map(|w| {
                acc += w / total;
                acc
            })
            .collect();
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.uniform();
        self.cdf.partition_point(|&c| c < u).min(self.cdf.len() - 1)
    }

    /// The probability of rank `r`.
    fn p(&self, r: usize) -> f64 {
        match r {
            0 => self.cdf.first().copied().unwrap_or(0.0),
            r if r < self.cdf.len() => self.cdf[r] - self.cdf[r - 1],
            _ => 0.0,
        }
    }

    /// The share of reads the best `n` ranks receive.
    fn mass(&self, n: usize) -> f64 {
        match n {
            0 => 0.0,
            n => self.cdf[n.min(self.cdf.len()) - 1],
        }
    }
}

/// xorshift64*: enough randomness for a workload, and reproducible.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    fn uniform(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---------------------------------------------------------------------------
// Output
// ---------------------------------------------------------------------------

fn print_table(results: &[(Case, Vec<Second>)], s: &Settings) {
    let marks: Vec<usize> = MARKS.iter().copied().filter(|&m| m <= s.secs).collect();
    println!(
        "### Hit rate after a restart: Zipf({EXPONENT}) over {} keys at {} GET/s\n",
        s.keys, s.rps
    );
    println!(
        "Hit rate of L1 lookups during second k after the instance answered PING \
         (CACHE.STATS hits and misses); mean over the first {} s; L1 entries (RESP2 and RESP3 \
         replies) at 1 s and at the end.\n",
        TARGET_BY.min(s.secs)
    );
    let header: Vec<String> = marks.iter().map(|m| format!("{m} s")).collect();
    println!(
        "| case | {} | mean 1-{} s | first s ≥ {:.0}% | entries at 1 s | entries at end |",
        header.join(" | "),
        TARGET_BY.min(s.secs),
        TARGET * 100.0
    );
    println!("|---|{}---:|---:|---:|---:|", "---:|".repeat(marks.len()));
    for (case, seconds) in results {
        let cells: Vec<String> = marks
            .iter()
            .map(|&m| percent(seconds[m - 1].rate()))
            .collect();
        let early = &seconds[..TARGET_BY.min(seconds.len())];
        let (hits, lookups) = early
            .iter()
            .fold((0, 0), |(h, l), s| (h + s.hits, l + s.hits + s.misses));
        let mean = if lookups == 0 {
            0.0
        } else {
            hits as f64 / lookups as f64
        };
        let first =
            first_at(seconds, TARGET).map_or_else(|| "never".to_owned(), |k| format!("{k} s"));
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            case.name(),
            cells.join(" | "),
            percent(mean),
            first,
            seconds[0].entries,
            seconds.last().map_or(0, |s| s.entries),
        );
    }
    let hot = results.iter().find(|(c, _)| *c == Case::Hot);
    let verdict = match hot.and_then(|(_, seconds)| first_at(seconds, TARGET)) {
        Some(k) if k <= TARGET_BY => format!("met (second {k})"),
        Some(k) => format!("missed (first at second {k})"),
        None => "missed (never)".to_owned(),
    };
    println!(
        "\nTarget: ≥ {:.0}% within {TARGET_BY} s with hot-set warming: {verdict}",
        TARGET * 100.0
    );
}

/// The first second (1-based) whose hit rate is at least `target`.
fn first_at(seconds: &[Second], target: f64) -> Option<usize> {
    seconds
        .iter()
        .position(|s| s.rate() >= target)
        .map(|i| i + 1)
}

fn percent(rate: f64) -> String {
    format!("{:.1}%", rate * 100.0)
}
