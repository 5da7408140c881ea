//! Transparent lz4 compression (issue 6), end to end: one real
//! redis-server and two tierd instances in this process, each on its own
//! thread with its own current-thread runtime (tierd's default
//! `threads = 1`), all on loopback. The data: 10,000 generated JSON
//! documents of 4–64 KB (`benches/support/docs.rs`: pages of user and
//! project records with repeated field names, from a fixed seed), stored
//! twice, as `doc:{i}` under a rule with
//! `compress = { threshold = "1kb", upstream = true }` and as `plain:{i}`
//! under the same rule without `compress`.
//!
//! - **A** (`cache = false` rules): every GET goes to Redis, and a `doc:*`
//!   value is decoded on its way back.
//! - **B** (the same rules with `ttl = "1h"`): GETs are L1 hits once warm;
//!   L1 keeps `doc:*` values compressed and decodes them on every hit.
//!
//! Printed as markdown tables:
//!
//! 0. **Micro** (before any server starts): lz4 compress and decode per
//!    document of about 4, 16 and 64 KB, and an L1 hit of such a document
//!    kept plain or compressed (the real `Store`, plus the steps of tierd's
//!    decode-on-hit: copy, decode, re-frame, copy to the output).
//! 1. **Redis memory**: `used_memory` from `INFO memory`, read from Redis
//!    directly after the 10,000 documents were SET through A, once as
//!    `plain:*` and once as `doc:*` (FLUSHALL and MEMORY PURGE before each,
//!    the empty baseline subtracted).
//! 2. **GET throughput** through A (from Redis) and B (from L1), `plain:*`
//!    against `doc:*`: `COMPRESSION_CONNS` connections on one client
//!    thread, each pipelining `COMPRESSION_PIPELINE` GETs of random keys,
//!    for `COMPRESSION_SECONDS` per run; plain and compressed runs
//!    interleaved, `COMPRESSION_ROUNDS` rounds, medians reported. Thread
//!    CPU time of tierd, Redis and the client per GET; L1 hits counted by
//!    `CACHE.STATS`.
//! 3. **L1 bytes per document**: `CACHE.STATS` `bytes` / `entries` on B for
//!    each rule, all documents resident.
//!
//! Run with `cargo bench --bench compression` (about 80 s plus the build), or
//! `scripts/bench.sh` with `BENCH_SUITES=compression`. Needs `redis-server`
//! on `PATH` (or in `REDIS_SERVER`). Environment, defaults in brackets:
//! `COMPRESSION_DOCS` [10000], `COMPRESSION_SECONDS` per run [3],
//! `COMPRESSION_ROUNDS` [5], `COMPRESSION_CONNS` [16],
//! `COMPRESSION_PIPELINE` [4]. Redis is stopped on the way out, also after
//! a panic. The codec alone, with criterion: `cargo bench --bench
//! compress_codec`.

use std::hint::black_box;
use std::net::SocketAddr;
use std::process::Command;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use tierd::cache::compress::{self, Decoded};
use tierd::config::Config;
use tierd::protocol::inspect;
use tierd::protocol::reply::{self, encode_command};

#[path = "support/docs.rs"]
mod docs;
#[path = "support/servers.rs"]
mod servers;

use servers::{
    benching, env_usize, load_average, read_all, rule_stats, thread_id, Client, Instance, Redis,
    RuleStats,
};

/// tierd's default `l1.max_value_size`, the decoding limit.
const MAX_VALUE: usize = 1 << 20;
/// The compressing rule's threshold, as in the issue's `users` seed.
const THRESHOLD: &str = "1kb";
/// GETs in flight when warming L1.
const READ_WINDOW: usize = 64;

fn main() {
    if !benching() {
        return;
    }
    let n_docs = env_usize("COMPRESSION_DOCS", 10_000).max(100);
    let seconds = env_usize("COMPRESSION_SECONDS", 3).max(1);
    let rounds = env_usize("COMPRESSION_ROUNDS", 5).max(1);
    let conns = env_usize("COMPRESSION_CONNS", 16).max(1);
    let pipeline = env_usize("COMPRESSION_PIPELINE", 4).max(1);
    let started = Instant::now();
    println!(
        "compression bench: {} CPUs; load average at start {}\n",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average(),
    );

    let corpus = docs::corpus(n_docs, docs::Profile::Typical);
    let reference = docs::corpus(n_docs, docs::Profile::HighEntropy);
    print_corpus(&[
        ("typical (stored)", &corpus),
        ("high-entropy (reference)", &reference),
    ]);
    drop(reference);

    let micro = measure_micro(&corpus);
    print_micro(&micro);

    let redis = Redis::start();
    println!(
        "{}; threshold {THRESHOLD}; {n_docs} documents\n",
        redis.version()
    );
    let a = Instance::start(config(&redis, false), "tierd-upstream");
    let b = Instance::start(config(&redis, true), "tierd-l1");
    let mut direct = Client::connect(redis.addr());

    let memory = measure_memory(&mut direct, a.addr, &corpus);
    print_memory(&memory);

    // Both forms in Redis from here on; the memory runs left doc:* loaded.
    load(a.addr, "plain", &corpus);
    check_stored(&mut direct, "plain", &corpus);
    for (instance, name) in [(&a, "A"), (&b, "B")] {
        for prefix in ["plain", "doc"] {
            verify(instance.addr, prefix, &corpus, name);
        }
    }
    let l1 = warm(&b, n_docs);
    let throughput = measure_throughput(
        &redis,
        &a,
        &b,
        &Load {
            docs: n_docs,
            conns,
            pipeline,
            duration: Duration::from_secs(seconds as u64),
        },
        rounds,
    );
    print_throughput(&throughput, micro.last(), conns, pipeline, seconds, rounds);
    print_l1(&l1, &corpus);
    println!(
        "(total run time {:.1} s; load average at end {})",
        started.elapsed().as_secs_f64(),
        load_average()
    );
}

fn mb(bytes: f64) -> String {
    format!("{:.1}", bytes / 1e6)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

// ---------------------------------------------------------------------------
// The corpus
// ---------------------------------------------------------------------------

fn print_corpus(corpora: &[(&str, &Vec<Vec<u8>>)]) {
    println!("### The documents\n");
    println!(
        "Generated JSON (`benches/support/docs.rs`), log-uniform sizes; \"lz4\": the whole \
         corpus's bytes over its framed size (`tierd::cache::compress::compress`, 9-byte \
         header included). Only the typical profile is stored; the high-entropy one (every \
         field uniform) shows how much the ratio depends on the data.\n"
    );
    println!("| profile | docs | MB | min KB | median KB | max KB | lz4 ratio | stored plain (< 10% saved) |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (name, corpus) in corpora {
        let mut sizes: Vec<usize> = corpus.iter().map(Vec::len).collect();
        sizes.sort_unstable();
        let total: usize = sizes.iter().sum();
        let mut framed = 0usize;
        let mut plain = 0usize;
        for d in corpus.iter() {
            match compress::compress(d, MAX_VALUE) {
                Some(f) => framed += f.len(),
                None => {
                    framed += d.len();
                    plain += 1;
                }
            }
        }
        println!(
            "| {name} | {} | {} | {:.1} | {:.1} | {:.1} | {:.2} | {plain} |",
            corpus.len(),
            mb(total as f64),
            sizes[0] as f64 / 1024.0,
            sizes[sizes.len() / 2] as f64 / 1024.0,
            sizes[sizes.len() - 1] as f64 / 1024.0,
            total as f64 / framed as f64,
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// 0. Micro: codec and L1 hit cost per document size
// ---------------------------------------------------------------------------

struct Micro {
    label: String,
    docs: usize,
    mean_len: f64,
    ratio: f64,
    compress_ns: f64,
    decode_ns: f64,
    hit_plain_ns: f64,
    hit_lz4_ns: f64,
}

/// Per document, median of `samples` batches of at least ~25 ms each.
fn time_per_doc(docs: usize, mut batch: impl FnMut()) -> f64 {
    const SAMPLES: usize = 7;
    // Calibrate: how many passes over the docs make ~25 ms.
    let t = Instant::now();
    batch();
    let one = t.elapsed().as_secs_f64().max(1e-7);
    let passes = ((0.025 / one).ceil() as usize).max(1);
    let mut per_doc = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        let t = Instant::now();
        for _ in 0..passes {
            batch();
        }
        per_doc.push(t.elapsed().as_secs_f64() * 1e9 / (passes * docs) as f64);
    }
    median(per_doc)
}

/// The per-size sets (32 documents of about 4, 16 and 64 KB), then the
/// whole corpus the end-to-end runs store: its row is the mean cost per
/// document of the mix the GETs read.
fn measure_micro(corpus: &[Vec<u8>]) -> Vec<Micro> {
    const PER_SIZE: usize = 32;
    let per_size: Vec<(String, Vec<Vec<u8>>)> = [4 * 1024, 16 * 1024, 64 * 1024]
        .into_iter()
        .map(|target| {
            (
                format!("{} KB", target / 1024),
                docs::of_size(PER_SIZE, target),
            )
        })
        .collect();
    let mut sets: Vec<(String, &[Vec<u8>])> = per_size
        .iter()
        .map(|(label, docs)| (label.clone(), docs.as_slice()))
        .collect();
    sets.push((format!("corpus ({} docs, 4–64 KB)", corpus.len()), corpus));
    let mut out = Vec::new();
    for (label, plain) in sets {
        let n = plain.len();
        let framed: Vec<Vec<u8>> = plain
            .iter()
            .map(|d| compress::compress(d, MAX_VALUE).expect("the documents compress"))
            .collect();
        let total: usize = plain.iter().map(Vec::len).sum();
        let framed_total: usize = framed.iter().map(Vec::len).sum();

        let compress_ns = time_per_doc(n, || {
            for d in plain {
                black_box(compress::compress(black_box(d), MAX_VALUE));
            }
        });
        let decode_ns = time_per_doc(n, || {
            for f in &framed {
                let decoded = compress::decode(black_box(f), MAX_VALUE).expect("decodes");
                black_box(decoded.as_bytes().len());
            }
        });

        // An L1 store with the documents as GET replies, plain under rule
        // 0 and compressed under rule 1, as tierd keeps them.
        let now = Instant::now();
        let (store, keys) = docs::doc_store(plain, &framed, MAX_VALUE as u64, now);
        let (plain_keys, lz4_keys): (Vec<_>, Vec<_>) = keys.iter().partition(|k| k.0 == 0);
        // The session's output buffer, reused as tierd reuses it.
        let mut output = BytesMut::with_capacity(128 * 1024);
        let hit_plain_ns = time_per_doc(n, || {
            for (rule, key, variant) in &plain_keys {
                output.clear();
                let hit = store.get_with(*rule, key, &[variant.as_ref()], now, |hit| {
                    output.extend_from_slice(hit.as_ref());
                });
                black_box((hit.is_some(), output.len()));
            }
        });
        // tierd's decode-on-hit (dispatch::compression::l1_hit): the entry
        // is copied out, its bulk payload decoded, re-framed as a bulk
        // reply, and that copied to the output.
        let hit_lz4_ns = time_per_doc(n, || {
            for (rule, key, variant) in &lz4_keys {
                output.clear();
                let hit = store.get_with(*rule, key, &[variant.as_ref()], now, |hit| {
                    let copy = Bytes::copy_from_slice(hit.as_ref());
                    let payload = inspect::string_payload(&copy).expect("a bulk reply");
                    let Ok(Decoded::Compressed(value)) = compress::decode(payload, MAX_VALUE)
                    else {
                        panic!("not a compressed entry");
                    };
                    let mut framed = BytesMut::with_capacity(value.len() + 16);
                    reply::bulk(&mut framed, &value);
                    output.extend_from_slice(&framed.freeze());
                });
                black_box((hit.is_some(), output.len()));
            }
        });
        out.push(Micro {
            label,
            docs: n,
            mean_len: total as f64 / n as f64,
            ratio: total as f64 / framed_total as f64,
            compress_ns,
            decode_ns,
            hit_plain_ns,
            hit_lz4_ns,
        });
    }
    out
}

fn print_micro(rows: &[Micro]) {
    println!("### Codec and L1 hit cost per document (one thread, before the servers start)\n");
    println!(
        "Median over 7 batches of {} documents of each size (typical profile), and of the \
         whole stored corpus, whose row is the mean over the mix the GETs below read. GB/s is \
         of uncompressed bytes. \"L1 hit\": `Store::get_with` plus the copy into the session's \
         output, for an entry kept plain, or kept compressed and decoded as tierd decodes it \
         on a hit (copy out, decode, re-frame, copy).\n",
        rows.first().map_or(0, |r| r.docs)
    );
    println!(
        "| size | mean bytes | lz4 ratio | compress ns/doc | compress GB/s | decode ns/doc | \
         decode GB/s | L1 hit plain ns | L1 hit compressed ns | extra per hit ns |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.2} | {:.0} | {:.0} | {:.0} |",
            r.label,
            r.mean_len,
            r.ratio,
            r.compress_ns,
            r.mean_len / r.compress_ns,
            r.decode_ns,
            r.mean_len / r.decode_ns,
            r.hit_plain_ns,
            r.hit_lz4_ns,
            r.hit_lz4_ns - r.hit_plain_ns,
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// 1. Redis memory
// ---------------------------------------------------------------------------

struct Memory {
    form: &'static str,
    used: i64,
    dataset: i64,
    /// Σ STRLEN of the keys, read from Redis directly: the stored bytes.
    stored: u64,
    keys: i64,
    load: Duration,
}

struct MemoryRun {
    empty_used: i64,
    empty_dataset: i64,
    rows: Vec<Memory>,
    plain_bytes: u64,
}

fn info_field(direct: &mut Client, field: &str) -> i64 {
    let info = direct.cmd(&["INFO", "memory"]);
    let info = String::from_utf8_lossy(&info);
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in INFO memory"))
}

/// `used_memory` and `used_memory_dataset` once they stop moving (Redis
/// shrinks idle clients' query buffers in its cron), after at most ~3 s.
fn settled_memory(direct: &mut Client) -> (i64, i64) {
    let mut last = info_field(direct, "used_memory");
    for _ in 0..12 {
        std::thread::sleep(Duration::from_millis(250));
        let now = info_field(direct, "used_memory");
        if (now - last).abs() <= last / 1000 {
            break;
        }
        last = now;
    }
    (
        info_field(direct, "used_memory"),
        info_field(direct, "used_memory_dataset"),
    )
}

fn empty(direct: &mut Client) -> (i64, i64) {
    direct.ok(&["FLUSHALL"]);
    direct.ok(&["MEMORY", "PURGE"]);
    settled_memory(direct)
}

fn measure_memory(direct: &mut Client, through: SocketAddr, corpus: &[Vec<u8>]) -> MemoryRun {
    let mut rows = Vec::new();
    let mut empties = Vec::new();
    for (form, prefix) in [
        ("plain (rule without compress)", "plain"),
        ("lz4 (compress, upstream = true)", "doc"),
    ] {
        empties.push(empty(direct));
        let load = load(through, prefix, corpus);
        let (used, dataset) = settled_memory(direct);
        let keys = direct.int(&["DBSIZE"]);
        assert_eq!(
            keys as usize,
            corpus.len(),
            "DBSIZE after loading {prefix}:*"
        );
        check_stored(direct, prefix, corpus);
        rows.push(Memory {
            form,
            used,
            dataset,
            stored: strlen_sum(direct, prefix, corpus.len()),
            keys,
            load,
        });
    }
    // One baseline for both: the emptier of the two.
    let (empty_used, empty_dataset) = empties.iter().copied().min().expect("two runs");
    MemoryRun {
        empty_used,
        empty_dataset,
        rows,
        plain_bytes: corpus.iter().map(|d| d.len() as u64).sum(),
    }
}

fn print_memory(m: &MemoryRun) {
    println!(
        "### 1. Redis memory: {} documents SET through tierd\n",
        m.rows[0].keys
    );
    println!(
        "`used_memory` (and `used_memory_dataset`) from `INFO memory` on Redis directly, minus \
         the empty server's ({} and {} bytes; FLUSHALL and MEMORY PURGE before each load). \
         \"stored\": Σ STRLEN read from Redis directly (the documents themselves: {} MB). \
         \"load\": pipelined SETs on one connection through tierd, for reference.\n",
        m.empty_used,
        m.empty_dataset,
        mb(m.plain_bytes as f64),
    );
    println!("| stored as | used_memory MB | per doc bytes | used_memory_dataset MB | stored MB | load s |");
    println!("|---|---:|---:|---:|---:|---:|");
    for r in &m.rows {
        let used = (r.used - m.empty_used) as f64;
        println!(
            "| {} | {} | {:.0} | {} | {} | {:.2} |",
            r.form,
            mb(used),
            used / r.keys as f64,
            mb((r.dataset - m.empty_dataset) as f64),
            mb(r.stored as f64),
            r.load.as_secs_f64(),
        );
    }
    let (p, c) = (&m.rows[0], &m.rows[1]);
    let ratio = (p.used - m.empty_used) as f64 / (c.used - m.empty_used) as f64;
    println!(
        "\n**used_memory plain / compressed: {ratio:.2}× less** (target ≥ 2.5×: {}); \
         used_memory_dataset {:.2}×; stored bytes {:.2}×.\n",
        if ratio >= 2.5 { "met" } else { "missed" },
        (p.dataset - m.empty_dataset) as f64 / (c.dataset - m.empty_dataset) as f64,
        p.stored as f64 / c.stored as f64,
    );
}

/// SETs `{prefix}:{i}` = document `i` through tierd at `addr`, 32 in
/// flight on one connection.
fn load(addr: SocketAddr, prefix: &str, corpus: &[Vec<u8>]) -> Duration {
    const WINDOW: usize = 32;
    let mut client = Client::connect(addr);
    let t = Instant::now();
    for start in (0..corpus.len()).step_by(WINDOW) {
        let end = corpus.len().min(start + WINDOW);
        let mut batch = Vec::new();
        for (i, doc) in corpus.iter().enumerate().take(end).skip(start) {
            let key = format!("{prefix}:{i}");
            batch.extend_from_slice(&encode_command(&[
                b"SET".as_slice(),
                key.as_bytes(),
                doc.as_slice(),
            ]));
        }
        client.send(&batch);
        for _ in start..end {
            let reply = client.frame();
            assert_eq!(reply, b"+OK\r\n", "SET {prefix}:*");
        }
    }
    t.elapsed()
}

/// Σ STRLEN `{prefix}:0..n`, from Redis directly.
fn strlen_sum(direct: &mut Client, prefix: &str, n: usize) -> u64 {
    let mut batch = Vec::new();
    for i in 0..n {
        let key = format!("{prefix}:{i}");
        batch.extend_from_slice(&encode_command(&[b"STRLEN", key.as_bytes()]));
    }
    direct.send(&batch);
    (0..n)
        .map(|_| {
            let reply = direct.frame();
            String::from_utf8_lossy(&reply[1..reply.len() - 2])
                .parse::<u64>()
                .expect("STRLEN")
        })
        .sum()
}

/// Redis itself holds `doc:*` compressed and `plain:*` as written.
fn check_stored(direct: &mut Client, prefix: &str, corpus: &[Vec<u8>]) {
    for i in [0, corpus.len() / 2, corpus.len() - 1] {
        let stored = direct
            .get(&format!("{prefix}:{i}"))
            .unwrap_or_else(|| panic!("{prefix}:{i} not in Redis"));
        if prefix == "doc" {
            assert!(
                stored.starts_with(&compress::MAGIC) && stored.len() < corpus[i].len(),
                "doc:{i} is not stored compressed in Redis: does this tierd compress writes?"
            );
        } else {
            assert!(
                stored == corpus[i],
                "{prefix}:{i} in Redis is not the document"
            );
        }
    }
}

/// Every 50th document, read through tierd, is the document.
fn verify(addr: SocketAddr, prefix: &str, corpus: &[Vec<u8>], instance: &str) {
    let mut client = Client::connect(addr);
    for i in (0..corpus.len()).step_by(50) {
        let got = client.get(&format!("{prefix}:{i}"));
        assert!(
            got.as_deref() == Some(corpus[i].as_slice()),
            "GET {prefix}:{i} through {instance} is not the document ({:?} bytes)",
            got.map(|g| g.len())
        );
    }
}

// ---------------------------------------------------------------------------
// 2. GET throughput
// ---------------------------------------------------------------------------

struct Load {
    docs: usize,
    conns: usize,
    pipeline: usize,
    duration: Duration,
}

#[derive(Clone, Copy)]
struct Run {
    ops: u64,
    bytes: u64,
    elapsed: Duration,
    tierd_cpu: f64,
    redis_cpu: f64,
    client_cpu: f64,
    hits: u64,
    misses: u64,
}

impl Run {
    fn ops_per_s(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }
    fn mb_per_s(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64() / 1e6
    }
    fn us_per_op(&self, cpu_s: f64) -> f64 {
        cpu_s * 1e6 / self.ops.max(1) as f64
    }
}

struct Case {
    source: &'static str,
    form: &'static str,
    runs: Vec<Run>,
}

/// Warms B: every document of both prefixes read twice, the second pass
/// all hits. Returns the L1 statistics of both rules afterwards.
fn warm(b: &Instance, n: usize) -> [(&'static str, RuleStats); 2] {
    let mut client = Client::connect(b.addr);
    for prefix in ["plain", "doc"] {
        read_all(&mut client, prefix, n, READ_WINDOW);
        let before = rule_stats(&mut client, prefix);
        read_all(&mut client, prefix, n, READ_WINDOW);
        let after = rule_stats(&mut client, prefix);
        assert_eq!(
            after.hits - before.hits,
            n as u64,
            "B: the second pass over {prefix}:* was not all L1 hits ({before:?} -> {after:?})"
        );
        assert_eq!(after.entries, n as u64, "B: {prefix}:* entries in L1");
    }
    [
        ("plain", rule_stats(&mut client, "plain")),
        ("doc", rule_stats(&mut client, "doc")),
    ]
}

fn measure_throughput(
    redis: &Redis,
    a: &Instance,
    b: &Instance,
    load: &Load,
    rounds: usize,
) -> Vec<Case> {
    let mut cases = vec![
        Case {
            source: "Redis (through A, cache = false)",
            form: "plain",
            runs: Vec::new(),
        },
        Case {
            source: "Redis (through A, cache = false)",
            form: "lz4",
            runs: Vec::new(),
        },
        Case {
            source: "L1 (through B, warm)",
            form: "plain",
            runs: Vec::new(),
        },
        Case {
            source: "L1 (through B, warm)",
            form: "lz4",
            runs: Vec::new(),
        },
    ];
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("client runtime");
    let client_tid = thread_id();
    let mut stats = Client::connect(b.addr);
    // A short unmeasured run of each: connections, allocator, caches.
    for (instance, prefix) in [(a, "plain"), (a, "doc"), (b, "plain"), (b, "doc")] {
        let short = Load {
            duration: Duration::from_millis(500),
            ..*load
        };
        runtime.block_on(drive(instance.addr, prefix, &short, 0));
    }
    for round in 0..rounds {
        for pair in [0usize, 2] {
            // Alternate which form goes first, so drift hits both alike.
            let order = if round % 2 == 0 {
                [pair, pair + 1]
            } else {
                [pair + 1, pair]
            };
            for i in order {
                let instance = if pair == 0 { a } else { b };
                let prefix = if i % 2 == 0 { "plain" } else { "doc" };
                let before = rule_stats(&mut stats, prefix);
                let cpu0 = (
                    thread_cpu(instance.tid),
                    process_cpu(redis.child.id()),
                    thread_cpu(client_tid),
                );
                let (ops, bytes, elapsed) =
                    runtime.block_on(drive(instance.addr, prefix, load, (round * 4 + i) as u64));
                let cpu1 = (
                    thread_cpu(instance.tid),
                    process_cpu(redis.child.id()),
                    thread_cpu(client_tid),
                );
                let after = rule_stats(&mut stats, prefix);
                cases[i].runs.push(Run {
                    ops,
                    bytes,
                    elapsed,
                    tierd_cpu: cpu1.0 - cpu0.0,
                    redis_cpu: cpu1.1 - cpu0.1,
                    client_cpu: cpu1.2 - cpu0.2,
                    hits: after.hits - before.hits,
                    misses: after.misses - before.misses,
                });
            }
        }
    }
    cases
}

/// `load.conns` connections to `addr`, each sending `load.pipeline` GETs
/// of random `{prefix}:{i}` at a time and reading the replies, until
/// `load.duration` has passed. Returns GETs, value bytes received, time.
async fn drive(addr: SocketAddr, prefix: &str, load: &Load, seed: u64) -> (u64, u64, Duration) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut streams = Vec::with_capacity(load.conns);
    for _ in 0..load.conns {
        let s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.set_nodelay(true).expect("nodelay");
        streams.push(s);
    }
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut tasks = Vec::with_capacity(load.conns);
    for (c, mut stream) in streams.into_iter().enumerate() {
        let prefix = prefix.to_owned();
        let (n, pipeline) = (load.docs as u64, load.pipeline);
        tasks.push(tokio::spawn(async move {
            let mut rng = docs::Rng::new(0x5eed_0000 ^ (seed << 16) ^ c as u64);
            let mut request = Vec::with_capacity(64 * pipeline);
            let mut buf = BytesMut::with_capacity(256 * 1024);
            let (mut ops, mut bytes) = (0u64, 0u64);
            while Instant::now() < deadline {
                request.clear();
                for _ in 0..pipeline {
                    let key = format!("{prefix}:{}", rng.below(n));
                    request.extend_from_slice(&encode_command(&[b"GET", key.as_bytes()]));
                }
                stream.write_all(&request).await.expect("write");
                for _ in 0..pipeline {
                    // `$len\r\n` then len bytes and CRLF.
                    let header_end = loop {
                        if let Some(p) = buf.windows(2).take(24).position(|w| w == b"\r\n") {
                            break p;
                        }
                        if stream.read_buf(&mut buf).await.expect("read") == 0 {
                            panic!("connection closed");
                        }
                    };
                    assert!(
                        buf[0] == b'$',
                        "GET {prefix}:*: {:?}",
                        String::from_utf8_lossy(&buf[..buf.len().min(200)])
                    );
                    let len: i64 = std::str::from_utf8(&buf[1..header_end])
                        .ok()
                        .and_then(|s| s.parse().ok())
                        .expect("bulk length");
                    assert!(len >= 0, "GET {prefix}:*: nil");
                    let total = header_end + 2 + len as usize + 2;
                    while buf.len() < total {
                        buf.reserve(total - buf.len());
                        if stream.read_buf(&mut buf).await.expect("read") == 0 {
                            panic!("connection closed");
                        }
                    }
                    buf.advance(total);
                    ops += 1;
                    bytes += len as u64;
                }
            }
            (ops, bytes)
        }));
    }
    let (mut ops, mut bytes) = (0, 0);
    for t in tasks {
        let (o, b) = t.await.expect("client task");
        ops += o;
        bytes += b;
    }
    (ops, bytes, start.elapsed())
}

fn print_throughput(
    cases: &[Case],
    corpus_micro: Option<&Micro>,
    conns: usize,
    pipeline: usize,
    seconds: usize,
    rounds: usize,
) {
    println!("### 2. GET throughput through tierd, plain against compressed\n");
    println!(
        "{conns} connections on one client thread, each with {pipeline} GETs of random keys in \
         flight, {seconds} s per run; plain and lz4 runs interleaved, {rounds} rounds, medians \
         (ops/s also min–max). MB/s: document bytes delivered to the client. CPU: thread CPU \
         time per GET of the tierd instance's thread, redis-server and the client thread. The L1 \
         hit rate is from CACHE.STATS over the measured runs.\n"
    );
    println!(
        "| source | values | ops/s | min–max | MB/s | CPU µs/GET: tierd | redis | client | L1 hit rate |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|");
    for c in cases {
        let ops: Vec<f64> = c.runs.iter().map(Run::ops_per_s).collect();
        let lo = ops.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ops.iter().copied().fold(0.0, f64::max);
        let hits: u64 = c.runs.iter().map(|r| r.hits).sum();
        let misses: u64 = c.runs.iter().map(|r| r.misses).sum();
        let hit_rate = if c.source.starts_with("L1") {
            format!("{:.4}", hits as f64 / (hits + misses).max(1) as f64)
        } else {
            "–".into()
        };
        println!(
            "| {} | {} | {:.0} | {:.0}–{:.0} | {:.0} | {:.2} | {:.2} | {:.2} | {} |",
            c.source,
            c.form,
            median(ops),
            lo,
            hi,
            median(c.runs.iter().map(Run::mb_per_s).collect()),
            median(c.runs.iter().map(|r| r.us_per_op(r.tierd_cpu)).collect()),
            median(c.runs.iter().map(|r| r.us_per_op(r.redis_cpu)).collect()),
            median(c.runs.iter().map(|r| r.us_per_op(r.client_cpu)).collect()),
            hit_rate,
        );
    }
    println!("\nCompressed / plain (median ops/s; per round in brackets):\n");
    println!(
        "| source | lz4/plain ops/s | per round | tierd CPU µs/GET lz4 − plain | target ≥ 0.9× |"
    );
    println!("|---|---:|---|---:|---|");
    for pair in cases.chunks(2) {
        let (p, c) = (&pair[0], &pair[1]);
        let ratio = median(c.runs.iter().map(Run::ops_per_s).collect())
            / median(p.runs.iter().map(Run::ops_per_s).collect());
        let per_round: Vec<String> = p
            .runs
            .iter()
            .zip(&c.runs)
            .map(|(p, c)| format!("{:.2}", c.ops_per_s() / p.ops_per_s()))
            .collect();
        let cpu = median(c.runs.iter().map(|r| r.us_per_op(r.tierd_cpu)).collect())
            - median(p.runs.iter().map(|r| r.us_per_op(r.tierd_cpu)).collect());
        println!(
            "| {} | {ratio:.2} | {} | {cpu:+.2} | {} |",
            p.source,
            per_round.join(", "),
            if ratio >= 0.9 { "met" } else { "missed" },
        );
    }
    if let Some(m) = corpus_micro {
        println!(
            "\nFor comparison, from the micro table's corpus row (one thread, before the \
             servers started): decoding the mean stored document costs {:.1} µs, and an L1 hit on it \
             costs {:.1} µs more compressed than plain.",
            m.decode_ns / 1e3,
            (m.hit_lz4_ns - m.hit_plain_ns) / 1e3,
        );
    }
    println!();
}

// ---------------------------------------------------------------------------
// 3. L1 bytes per document
// ---------------------------------------------------------------------------

fn print_l1(rules: &[(&str, RuleStats); 2], corpus: &[Vec<u8>]) {
    let mean_doc = corpus.iter().map(Vec::len).sum::<usize>() as f64 / corpus.len() as f64;
    println!("### 3. L1 bytes per document (B, every document resident)\n");
    println!(
        "CACHE.STATS `bytes` / `entries` for each rule: what the store charges per entry \
         (key, reply and bookkeeping). Mean document: {mean_doc:.0} bytes.\n"
    );
    println!("| rule | values | entries | bytes MB | bytes/entry | / mean document |");
    println!("|---|---|---:|---:|---:|---:|");
    for (name, s) in rules {
        let per = s.bytes as f64 / s.entries.max(1) as f64;
        println!(
            "| {name} | {} | {} | {} | {per:.0} | {:.3} |",
            if *name == "doc" { "lz4" } else { "plain" },
            s.entries,
            mb(s.bytes as f64),
            per / mean_doc,
        );
    }
    let per = |s: &RuleStats| s.bytes as f64 / s.entries.max(1) as f64;
    println!(
        "\nL1 bytes per document plain / compressed: **{:.2}×**.\n",
        per(&rules[0].1) / per(&rules[1].1)
    );
}

// ---------------------------------------------------------------------------
// CPU time
// ---------------------------------------------------------------------------

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// utime + stime in seconds from a `/proc/…/stat` file, 0 if unreadable.
fn stat_cpu(path: &str) -> f64 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| {
            // The command name (field 2) may contain spaces: count from ")".
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / clock_ticks())
        })
        .unwrap_or(0.0)
}

fn thread_cpu(tid: u32) -> f64 {
    stat_cpu(&format!("/proc/self/task/{tid}/stat"))
}

fn process_cpu(pid: u32) -> f64 {
    stat_cpu(&format!("/proc/{pid}/stat"))
}

// ---------------------------------------------------------------------------
// tierd's configuration
// ---------------------------------------------------------------------------

/// A's rules (`cache = false`: every GET goes to Redis) or B's (cached
/// for an hour). `doc:*` compresses, `plain:*` does not; nothing else
/// differs. No tracking and no bus: nothing writes while reads are
/// measured.
fn config(redis: &Redis, cached: bool) -> Config {
    let cache = if cached {
        "ttl = \"1h\""
    } else {
        "cache = false"
    };
    let toml = format!(
        r#"
[l1]
max_memory = "1gb"

[invalidation]
tracking = "off"
bus = false

[[rules]]
name = "doc"
match = "doc:*"
{cache}
compress = {{ threshold = "{THRESHOLD}", upstream = true }}

[[rules]]
name = "plain"
match = "plain:*"
{cache}
"#
    );
    redis.tierd_config(&toml)
}
