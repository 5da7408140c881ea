//! Stampede protection (issue 5), end to end: one real redis-server and
//! three tierd instances in this process, each on its own thread with its
//! own current-thread runtime (tierd's default `threads = 1`), all on
//! loopback, with the invalidation bus and tracking on (the defaults).
//!
//! **The herd, repeated for `STAMPEDE_KEYS` keys in a row.** 50 clients per
//! instance (150 in all) wait at a barrier, then all read the same cold key
//! with `GET` at once. A client that receives nil is a database load: it
//! sleeps the load time (`STAMPEDE_LOAD_MS`, 20 ms) as a database query
//! would, then `SET`s the key through its own tierd. A client that receives
//! the value is done. When every client is done, the next key starts.
//!
//! Two modes, one after the other in the same run, on the same fleet:
//!
//! - **leases on**: keys `on:{i}`, whose rule has
//!   `stampede = { lease = "5s", wait = "2s" }`. Exactly one client per key
//!   should get the nil, and the others should wait inside tierd until its
//!   `SET` and then get the value: **target 1.0 loads per key, and p99 wait
//!   ≤ load time + 20 ms**.
//! - **leases off**: keys `off:{i}`, the same rule without `stampede`.
//!   Concurrent reads on one instance are still coalesced into one upstream
//!   `GET`, but every client gets the nil, so loads per key are the herd
//!   size: the comparison.
//!
//! Measured per key: the loads (nil replies; a waiter that times out gets
//! nil too and counts), and every client's wait, from sending its `GET`
//! until it has the value: the `GET`'s reply for a client that got the
//! value, the `SET`'s reply for a loader (so a loader's wait includes the
//! load time, as the waiters' does). Printed as markdown tables: the
//! summary with the targets, the waits by role, the `CACHE.STATS` counters
//! of each mode's rule summed over the instances, and the commands Redis
//! served per key (`INFO commandstats`, reset before each mode) with the
//! lease keys left in Redis afterwards.
//!
//! The clients run as tasks on one current-thread runtime on one thread,
//! each with its own connection, so 150 clients cost one core at most and
//! leave the other to Redis and the tierds. Before each mode,
//! `STAMPEDE_WARMUP` keys run unmeasured (connections, allocator).
//!
//! Run with `cargo bench --bench stampede` (about a minute plus the build),
//! or `scripts/bench.sh` with `BENCH_SUITES=stampede`. Needs `redis-server`
//! on `PATH` (or in `REDIS_SERVER`). Environment, defaults in brackets:
//! `STAMPEDE_KEYS` per mode [1000], `STAMPEDE_INSTANCES` [3],
//! `STAMPEDE_CLIENTS` per instance [50], `STAMPEDE_LOAD_MS` [20],
//! `STAMPEDE_WARMUP` keys per mode [10], `STAMPEDE_TRACKING` [default]
//! (`off` leaves the bus as the only wake-up across instances). The servers
//! are stopped on the way out, also after a panic.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tierd::config::Config;
use tierd::protocol::reply::encode_command;
use tierd::protocol::{inspect, ReplyFramer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::sync::Barrier;
use tokio::task::JoinSet;

#[path = "support/servers.rs"]
mod servers;

use servers::{benching, env_usize, load_average, rule_counters, Client, Fleet, Redis, Summary};

/// The leased rule's `stampede` setting.
const LEASE: &str = "5s";
const WAIT: &str = "2s";
/// The wait target's allowance above the load time.
const WAIT_ALLOWANCE: Duration = Duration::from_millis(20);
/// A request with no reply after this long stops the bench: far above
/// `wait` and `lease`, so only a hang gets there.
const REQUEST_LIMIT: Duration = Duration::from_secs(15);
/// `[invalidation] prefix`, the default: leases are `{prefix}lease:{key}`.
const LEASE_PREFIX: &str = "tierd:lease:";
/// The `CACHE.STATS` counters of stampede protection, in table order.
const COUNTERS: [&str; 5] = [
    "coalesced",
    "lease_grants",
    "lease_waits",
    "lease_wakeups",
    "lease_timeouts",
];

#[derive(Clone, Copy)]
struct Mode {
    name: &'static str,
    /// The rule's name in `CACHE.STATS`.
    rule: &'static str,
    /// Keys are `{prefix}:{i}`; the rule matches `{prefix}:*`.
    prefix: &'static str,
    leases: bool,
}

const MODES: [Mode; 2] = [
    Mode {
        name: "leases on",
        rule: "leases-on",
        prefix: "on",
        leases: true,
    },
    Mode {
        name: "leases off",
        rule: "leases-off",
        prefix: "off",
        leases: false,
    },
];

struct Settings {
    keys: usize,
    instances: usize,
    clients: usize,
    load: Duration,
    warmup: usize,
    tracking: String,
}

impl Settings {
    fn herd(&self) -> usize {
        self.instances * self.clients
    }
}

fn main() {
    if !benching() {
        return;
    }
    let settings = Settings {
        keys: env_usize("STAMPEDE_KEYS", 1000).max(1),
        instances: env_usize("STAMPEDE_INSTANCES", 3).clamp(1, 26),
        clients: env_usize("STAMPEDE_CLIENTS", 50).max(1),
        load: Duration::from_millis(env_usize("STAMPEDE_LOAD_MS", 20) as u64),
        warmup: env_usize("STAMPEDE_WARMUP", 10),
        tracking: std::env::var("STAMPEDE_TRACKING").unwrap_or_else(|_| "default".into()),
    };
    let started = Instant::now();
    let redis = Redis::start();
    let fleet = Fleet::start(&config(&redis, &settings.tracking), settings.instances);
    println!(
        "stampede bench: {}; {} tierd instances in this process, one current-thread runtime \
         each; tracking = \"{}\", bus on; herd {} clients ({} per instance) on one client \
         thread; load time {} ms; lease {LEASE}, wait {WAIT}; {} CPUs; load average at start {}\n",
        redis.version(),
        settings.instances,
        settings.tracking,
        settings.herd(),
        settings.clients,
        ms(settings.load),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let results: Vec<ModeResult> = MODES
        .iter()
        .map(|&mode| run_mode(&rt, &redis, &fleet, mode, &settings))
        .collect();

    print_summary(&results, &settings);
    print_roles(&results);
    print_counters(&results, &settings);
    print_redis(&results);
    println!(
        "(total run time {:.1} s; load average at end {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

/// The file every instance reads, with the command line's overrides.
fn config(redis: &Redis, tracking: &str) -> Config {
    let toml = format!(
        r#"
[invalidation]
tracking = "{tracking}"
bus = true

[[rules]]
name = "{on}"
match = "{on_prefix}:*"
ttl = "1h"
stampede = {{ lease = "{LEASE}", wait = "{WAIT}" }}

[[rules]]
name = "{off}"
match = "{off_prefix}:*"
ttl = "1h"
"#,
        on = MODES[0].rule,
        on_prefix = MODES[0].prefix,
        off = MODES[1].rule,
        off_prefix = MODES[1].prefix,
    );
    redis.tierd_config(&toml)
}

// ---------------------------------------------------------------------------
// One mode: warm-up, the measured keys, the counters around them
// ---------------------------------------------------------------------------

struct ModeResult {
    mode: Mode,
    keys: usize,
    herd: usize,
    /// Every client's outcome for every measured key.
    outcomes: Vec<Outcome>,
    elapsed: Duration,
    /// `CACHE.STATS` [`COUNTERS`] of the mode's rule over the measured keys,
    /// summed over the instances.
    counters: [u64; COUNTERS.len()],
    /// `INFO commandstats` calls over the measured keys, by command.
    commands: BTreeMap<String, u64>,
    /// `{prefix}lease:*` keys of this mode still in Redis once done, and how
    /// long after the last key it was counted.
    leases_left: usize,
    leases_checked_after: Duration,
}

fn run_mode(rt: &Runtime, redis: &Redis, fleet: &Fleet, mode: Mode, s: &Settings) -> ModeResult {
    let mut direct = Client::connect(redis.addr());
    if s.warmup > 0 {
        herd(rt, fleet, s, &format!("{}:warm", mode.prefix), s.warmup);
    }
    let before = counters(fleet, mode.rule);
    direct.ok(&["CONFIG", "RESETSTAT"]);
    let t = Instant::now();
    let outcomes = herd(rt, fleet, s, mode.prefix, s.keys);
    let elapsed = t.elapsed();
    let commands = commandstats(&mut direct);
    let done = Instant::now();
    // A lease is released right after the loader's SET reply: give the
    // last one a moment before counting what is left.
    let pattern = format!("{LEASE_PREFIX}{}:*", mode.prefix);
    let mut leases_left = count_keys(&mut direct, &pattern);
    while leases_left > 0 && done.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(10));
        leases_left = count_keys(&mut direct, &pattern);
    }
    let leases_checked_after = done.elapsed();
    let after = counters(fleet, mode.rule);
    let mut delta = [0; COUNTERS.len()];
    for (d, (a, b)) in delta.iter_mut().zip(after.iter().zip(before)) {
        *d = a - b;
    }
    ModeResult {
        mode,
        keys: s.keys,
        herd: s.herd(),
        outcomes,
        elapsed,
        counters: delta,
        commands,
        leases_left,
        leases_checked_after,
    }
}

/// [`COUNTERS`] of `rule`, summed over the fleet.
fn counters(fleet: &Fleet, rule: &str) -> [u64; COUNTERS.len()] {
    let mut sum = [0; COUNTERS.len()];
    for i in 0..fleet.addrs.len() {
        let got = rule_counters(&mut fleet.client(i), rule, COUNTERS);
        for (s, g) in sum.iter_mut().zip(got) {
            *s += g;
        }
    }
    sum
}

/// Calls per command from Redis's `INFO commandstats`
/// (`cmdstat_get:calls=12,usec=…`).
fn commandstats(direct: &mut Client) -> BTreeMap<String, u64> {
    let info = direct.cmd(&["INFO", "commandstats"]);
    let info = String::from_utf8_lossy(&info);
    info.lines()
        .filter_map(|line| {
            let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .strip_prefix("calls=")?
                .split(',')
                .next()?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// Keys matching `pattern` in Redis (a small keyspace: `KEYS` is fine).
fn count_keys(direct: &mut Client, pattern: &str) -> usize {
    direct.int(&["EVAL", "return #redis.call('KEYS', ARGV[1])", "0", pattern]) as usize
}

// ---------------------------------------------------------------------------
// The herd
// ---------------------------------------------------------------------------

/// One client's read of one key.
struct Outcome {
    key: usize,
    /// Whether the client got nil, and so loaded and SET the key.
    loaded: bool,
    /// From sending the GET until its reply was read.
    read: Duration,
    /// From sending the GET until the client had the value: the GET's
    /// reply, or for a loader the SET's.
    wait: Duration,
}

/// Runs the herd on `{prefix}:0` … `{prefix}:{keys-1}`, one key after
/// another; every client's outcomes.
fn herd(rt: &Runtime, fleet: &Fleet, s: &Settings, prefix: &str, keys: usize) -> Vec<Outcome> {
    rt.block_on(async {
        let n = s.herd();
        let barrier = Arc::new(Barrier::new(n));
        let mut tasks = JoinSet::new();
        for c in 0..n {
            // Round robin, so the GETs of one key alternate between the
            // instances as they go out.
            let addr = fleet.addrs[c % fleet.addrs.len()];
            tasks.spawn(herd_client(
                addr,
                barrier.clone(),
                prefix.to_owned(),
                keys,
                s.load,
            ));
        }
        let mut all = Vec::with_capacity(n * keys);
        // In completion order: a client that panics ends the bench at once
        // instead of leaving the others at the barrier.
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok(outcomes) => all.extend(outcomes),
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("herd client: {e}"),
            }
        }
        all
    })
}

async fn herd_client(
    addr: SocketAddr,
    barrier: Arc<Barrier>,
    prefix: String,
    keys: usize,
    load: Duration,
) -> Vec<Outcome> {
    let mut conn = Conn::connect(addr).await;
    let mut out = Vec::with_capacity(keys);
    for key in 0..keys {
        let name = format!("{prefix}:{key}");
        let value = format!("loaded {name}");
        let get = encode_command(&[b"GET", name.as_bytes()]);
        let set = encode_command(&[b"SET", name.as_bytes(), value.as_bytes()]);
        barrier.wait().await;
        let t0 = Instant::now();
        let reply = conn.request(&get, &name).await;
        let read = t0.elapsed();
        let loaded = if reply == b"$-1\r\n" {
            tokio::time::sleep(load).await;
            let reply = conn.request(&set, &name).await;
            assert_eq!(
                reply,
                b"+OK\r\n",
                "SET {name} through {addr}: {:?}",
                String::from_utf8_lossy(&reply)
            );
            true
        } else {
            let got = inspect::string_payload(&reply).filter(|_| reply.starts_with(b"$"));
            assert_eq!(
                got,
                Some(value.as_bytes()),
                "GET {name} through {addr}: {:?}",
                String::from_utf8_lossy(&reply)
            );
            false
        };
        out.push(Outcome {
            key,
            loaded,
            read,
            wait: t0.elapsed(),
        });
    }
    out
}

/// One client connection, one request at a time.
struct Conn {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
    framer: ReplyFramer,
}

impl Conn {
    async fn connect(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect(addr)
            .await
            .unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_nodelay(true).expect("TCP_NODELAY");
        Conn {
            stream,
            addr,
            buf: Vec::with_capacity(4096),
            framer: ReplyFramer::new(8),
        }
    }

    /// Sends `request` and returns its reply frame; panics (naming `key`)
    /// when none comes within [`REQUEST_LIMIT`].
    async fn request(&mut self, request: &[u8], key: &str) -> Vec<u8> {
        match tokio::time::timeout(REQUEST_LIMIT, self.exchange(request)).await {
            Ok(reply) => reply,
            Err(_) => panic!(
                "{key} through {}: no reply within {} s",
                self.addr,
                REQUEST_LIMIT.as_secs()
            ),
        }
    }

    async fn exchange(&mut self, request: &[u8]) -> Vec<u8> {
        self.stream.write_all(request).await.expect("write");
        loop {
            if let Some(len) = self.framer.frame(&self.buf).expect("a RESP reply") {
                return self.buf.drain(..len).collect();
            }
            let n = self.stream.read_buf(&mut self.buf).await.expect("read");
            assert!(n > 0, "{}: connection closed", self.addr);
        }
    }
}

// ---------------------------------------------------------------------------
// Report
// ---------------------------------------------------------------------------

impl ModeResult {
    /// Loads of each measured key.
    fn loads(&self) -> Vec<usize> {
        let mut loads = vec![0; self.keys];
        for o in self.outcomes.iter().filter(|o| o.loaded) {
            loads[o.key] += 1;
        }
        loads
    }
}

fn print_summary(results: &[ModeResult], s: &Settings) {
    let limit = s.load + WAIT_ALLOWANCE;
    println!(
        "### Stampede: {} keys in a row, each read by the whole herd at once\n",
        s.keys
    );
    println!(
        "loads: clients that got nil and SET the key after {} ms. wait: from sending the GET \
         until the client had the value (a loader: until its SET's reply).\n",
        ms(s.load)
    );
    println!(
        "| mode | keys | herd | loads/key mean | loads/key max | wait p50 ms | p99 ms | max ms | target |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in results {
        let loads = r.loads();
        let mean = loads.iter().sum::<usize>() as f64 / loads.len().max(1) as f64;
        let max = loads.iter().copied().max().unwrap_or(0);
        let waits: Vec<Duration> = r.outcomes.iter().map(|o| o.wait).collect();
        let w = Summary::of(&waits);
        let target = if r.mode.leases {
            let exact = loads.iter().all(|&l| l == 1);
            let fast = w.p99 <= limit;
            let verdict = match (exact, fast) {
                (true, true) => "met".to_owned(),
                (false, true) => "missed (loads)".to_owned(),
                (true, false) => "missed (p99)".to_owned(),
                (false, false) => "missed (loads, p99)".to_owned(),
            };
            format!("loads/key = 1.0, p99 ≤ {} ms: {verdict}", ms(limit))
        } else {
            format!("≈ herd ({}), for comparison", r.herd)
        };
        println!(
            "| {} | {} | {} | {:.2} | {} | {} | {} | {} | {} |",
            r.mode.name,
            r.keys,
            r.herd,
            mean,
            max,
            ms(w.p50),
            ms(w.p99),
            ms(w.max),
            target
        );
    }
    println!("\nKeys by their number of loads, and the time each mode took:\n");
    for r in results {
        let mut histogram: BTreeMap<usize, usize> = BTreeMap::new();
        for l in r.loads() {
            *histogram.entry(l).or_default() += 1;
        }
        let text: Vec<String> = histogram
            .iter()
            .map(|(loads, keys)| format!("{keys} keys with {loads} loads"))
            .collect();
        println!(
            "- {}: {}; {:.1} s, {:.1} ms per key",
            r.mode.name,
            text.join(", "),
            r.elapsed.as_secs_f64(),
            r.elapsed.as_secs_f64() * 1e3 / r.keys as f64
        );
    }
    println!();
}

fn print_roles(results: &[ModeResult]) {
    println!(
        "Waits by role, all keys. read: from sending the GET until its reply (for a loader, \
         the nil).\n"
    );
    println!("| mode | role | reads | read p50 ms | read p99 ms | wait p50 ms | wait p99 ms | wait max ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in results {
        for (role, loaded) in [
            ("loader (got nil)", true),
            ("waiter (got the value)", false),
        ] {
            let (reads, waits): (Vec<Duration>, Vec<Duration>) = r
                .outcomes
                .iter()
                .filter(|o| o.loaded == loaded)
                .map(|o| (o.read, o.wait))
                .unzip();
            if reads.is_empty() {
                continue;
            }
            let (rd, w) = (Summary::of(&reads), Summary::of(&waits));
            println!(
                "| {} | {role} | {} | {} | {} | {} | {} | {} |",
                r.mode.name,
                rd.n,
                ms(rd.p50),
                ms(rd.p99),
                ms(w.p50),
                ms(w.p99),
                ms(w.max)
            );
        }
    }
    println!();
}

fn print_counters(results: &[ModeResult], s: &Settings) {
    println!(
        "CACHE.STATS of each mode's rule over the measured keys, summed over the {} instances \
         (reads: the herd's GETs):\n",
        s.instances
    );
    println!("| mode | reads | {} |", COUNTERS.join(" | "));
    println!("|---|---:|{}", "---:|".repeat(COUNTERS.len()));
    for r in results {
        let cells: Vec<String> = r.counters.iter().map(u64::to_string).collect();
        println!(
            "| {} | {} | {} |",
            r.mode.name,
            r.outcomes.len(),
            cells.join(" | ")
        );
    }
    println!();
}

fn print_redis(results: &[ModeResult]) {
    println!(
        "Redis: commands served per key (INFO commandstats, reset before each mode; includes \
         the bus's and tracking's), and lease keys left afterwards:\n"
    );
    println!("| mode | commands/key | by command (calls/key) | lease keys left |");
    println!("|---|---:|---|---:|");
    for r in results {
        let keys = r.keys as f64;
        let total: u64 = r.commands.values().sum();
        let mut by: Vec<(&String, &u64)> = r.commands.iter().collect();
        by.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
        let text: Vec<String> = by
            .iter()
            .map(|(name, calls)| format!("{name} {:.2}", **calls as f64 / keys))
            .collect();
        println!(
            "| {} | {:.2} | {} | {} (after {} ms) |",
            r.mode.name,
            total as f64 / keys,
            text.join(", "),
            r.leases_left,
            r.leases_checked_after.as_millis()
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}
