//! The L1 store: lookup, fill and invalidation cost (criterion), plus two
//! measurements that are not timings and are printed once before the timed
//! benches run:
//!
//! - **memory**: bytes of process RSS per entry beyond its key and reply
//!   (200k entries, read from `/proc/self/statm`), next to the weight the
//!   store charges for them; and the RSS of a 100 MB-capped store after
//!   three times its capacity has gone through it, against the cap.
//! - **hit ratio** under Zipf(0.99) over 1M keys, 100 MB cap, 100-byte
//!   replies, next to the best any policy could do (the most popular keys
//!   that fit).
//!
//! Timed: `l1/get_hit` (and a hot-set and a miss variant, and
//! `l1/get_hit_in_place`, the copy-out form the proxy uses), `l1/fill` (a
//! put that replaces a cached key's reply), `l1/fill_new_evicting` (a put
//! of a new key into a full store, which evicts) and `l1/invalidate`.
//!
//! Run with `cargo bench --bench l1` (add `-- --quick` for a fast pass).
//! The measurements are skipped when criterion runs in test mode. The RSS of
//! 10M distinct keys against a 1 GiB cap is `benches/l1_rss.rs`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, Criterion, Throughput};
use tierd::cache::store::{RuleCap, Store, StoreConfig, Variant};
use tierd::protocol::Proto;

const KEYS: usize = 10_000;
const REPLY: [u8; 100] = [b'v'; 100];

fn store(max_memory: u64) -> Store {
    let cfg = StoreConfig {
        max_memory,
        max_value_size: 1 << 20,
        rules: vec![RuleCap {
            name: "bench".to_string(),
            max_memory: None,
        }],
    };
    match Store::new(cfg) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    }
}

fn key(i: usize) -> Vec<u8> {
    format!("key:{i:08}").into_bytes()
}

fn get_variant(key: &[u8]) -> Variant {
    Variant::from_args(
        0,
        Proto::Resp2,
        &[Bytes::from_static(b"GET"), Bytes::copy_from_slice(key)],
    )
}

fn fill(s: &Store, key: &[u8], variant: &Variant, reply: Bytes, expires: Instant) -> bool {
    match s.begin_fill(key) {
        Some(token) => s.finish_fill(token, 0, variant.clone(), reply, expires),
        None => false,
    }
}

fn filled(n: usize) -> (Store, Vec<(Vec<u8>, Variant)>, Instant) {
    let s = store(1 << 30);
    let now = Instant::now();
    let keys: Vec<_> = (0..n)
        .map(|i| {
            let k = key(i);
            let v = get_variant(&k);
            (k, v)
        })
        .collect();
    for (k, v) in &keys {
        assert!(fill(
            &s,
            k,
            v,
            Bytes::from_static(&REPLY),
            now + Duration::from_secs(3600)
        ));
    }
    (s, keys, now)
}

fn bench_get(c: &mut Criterion) {
    let (s, keys, now) = filled(KEYS);
    let mut group = c.benchmark_group("l1");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    // Round-robin over all 10k keys: each lookup's hash-table slot, slab slot
    // and entry are in L3, not L1/L2, as in a large cache.
    group.bench_function("get_hit", |b| {
        b.iter(|| {
            let (k, v) = &keys[i % KEYS];
            i += 1;
            black_box(s.get(0, black_box(k), v, now))
        })
    });
    // The proxy's own hit path: the reply is copied out in place (here into
    // a reused buffer, as the session copies it into its output) instead of
    // being handed back as a `Bytes`, which allocates.
    let mut out = Vec::with_capacity(256);
    group.bench_function("get_hit_in_place", |b| {
        b.iter(|| {
            let (k, v) = &keys[i % KEYS];
            i += 1;
            out.clear();
            let hit = s.get_with(0, black_box(k), &[v.as_ref()], now, |hit| {
                out.extend_from_slice(hit.as_ref())
            });
            black_box((hit.is_some(), out.len()))
        })
    });
    // A hot set of 1k keys, whose entries stay in the core's caches.
    group.bench_function("get_hit_1k", |b| {
        b.iter(|| {
            let (k, v) = &keys[i % 1000];
            i += 1;
            black_box(s.get(0, black_box(k), v, now))
        })
    });
    let misses: Vec<_> = (KEYS..2 * KEYS)
        .map(|i| {
            let k = key(i);
            let v = get_variant(&k);
            (k, v)
        })
        .collect();
    group.bench_function("get_miss", |b| {
        b.iter(|| {
            let (k, v) = &misses[i % KEYS];
            i += 1;
            black_box(s.get(0, black_box(k), v, now))
        })
    });
    group.finish();
}

fn bench_fill(c: &mut Criterion) {
    let (s, keys, now) = filled(KEYS);
    let expires = now + Duration::from_secs(3600);
    let reply = Bytes::from_static(&REPLY);
    let mut group = c.benchmark_group("l1");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    // begin + finish, replacing the key's reply (the steady state of a
    // refreshed key); includes building the packed entry.
    group.bench_function("fill", |b| {
        b.iter(|| {
            let (k, v) = &keys[i % KEYS];
            i += 1;
            black_box(fill(&s, k, v, reply.clone(), expires))
        })
    });
    group.finish();
}

/// The put of a miss: a key the store does not hold, into a store that is
/// full, so every insert also evicts. 1M prepared keys cycle through a 10 MB
/// store (~42k entries), so a key is long gone when it comes round again.
fn bench_fill_new(c: &mut Criterion) {
    const NEW_KEYS: usize = 1_000_000;
    let s = store(10 << 20);
    let now = Instant::now();
    let expires = now + Duration::from_secs(3600);
    let reply = Bytes::from_static(&REPLY);
    let keys: Vec<_> = (0..NEW_KEYS)
        .map(|i| {
            let k = key(i);
            let v = get_variant(&k);
            (k, v)
        })
        .collect();
    // Fill it to capacity first, untimed.
    for (k, v) in &keys[..100_000] {
        fill(&s, k, v, reply.clone(), expires);
    }
    let mut i = 100_000;
    let mut group = c.benchmark_group("l1");
    group.throughput(Throughput::Elements(1));
    group.bench_function("fill_new_evicting", |b| {
        b.iter(|| {
            let (k, v) = &keys[i % NEW_KEYS];
            i += 1;
            black_box(fill(&s, k, v, reply.clone(), expires))
        })
    });
    group.finish();
}

fn bench_invalidate(c: &mut Criterion) {
    let (s, keys, now) = filled(KEYS);
    let expires = now + Duration::from_secs(3600);
    let reply = Bytes::from_static(&REPLY);
    let mut group = c.benchmark_group("l1");
    group.throughput(Throughput::Elements(1));
    // Only the invalidations are timed; each batch of keys is refilled
    // untimed first, so every invalidation drops a cached entry.
    group.bench_function("invalidate", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            let mut left = iters as usize;
            while left > 0 {
                let n = left.min(KEYS);
                for (k, v) in &keys[..n] {
                    fill(&s, k, v, reply.clone(), expires);
                }
                let start = Instant::now();
                for (k, _) in &keys[..n] {
                    black_box(s.invalidate(k));
                }
                total += start.elapsed();
                left -= n;
            }
            total
        })
    });
    group.finish();
}

/// Resident set size of this process, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Bytes per entry beyond key and reply, and RSS against the cap once the
/// store is full and evicting.
fn measure_memory() {
    const N: usize = 200_000;
    let before = rss();
    let s = store(1 << 30);
    let now = Instant::now();
    let expires = now + Duration::from_secs(3600);
    for i in 0..N {
        let k = key(i);
        let v = get_variant(&k);
        fill(&s, &k, &v, Bytes::from_static(&REPLY), expires);
    }
    let after = rss();
    let key_len = key(0).len() as f64;
    let request_len = get_variant(&key(0)).request.len() as f64;
    let per_entry = (after - before) as f64 / N as f64;
    let charged = s.weight() as f64 / N as f64;
    eprintln!(
        "l1/memory: {N} entries, key {key_len} B, reply {} B, GET request {request_len} B: \
         RSS {per_entry:.1} B/entry = key + reply + {:.1} B overhead \
         ({:.1} B beyond key + request + reply); store charges {charged:.1} B/entry",
        REPLY.len(),
        per_entry - key_len - REPLY.len() as f64,
        per_entry - key_len - request_len - REPLY.len() as f64,
    );
    let started = Instant::now();
    let swept = s.sweep(now);
    let per = started.elapsed().as_nanos() as f64 / N as f64;
    eprintln!("l1/sweep: {per:.1} ns per entry scanned ({swept} expired)");
    drop(s);

    // A 100 MB store after 3x its capacity of distinct keys: evictions,
    // ghosts and allocator fragmentation included.
    const CAP: u64 = 100 << 20;
    let before = rss();
    let s = store(CAP);
    let n = 3 * CAP as usize / 250;
    for i in 0..n {
        let k = key(i);
        let v = get_variant(&k);
        fill(&s, &k, &v, Bytes::from_static(&REPLY), expires);
    }
    let grown = rss().saturating_sub(before);
    eprintln!(
        "l1/memory: 100 MB cap after {n} distinct keys: RSS grew {:.1} MB = {:.2}x the cap \
         (charged weight {:.1} MB, {} entries)",
        grown as f64 / 1e6,
        grown as f64 / CAP as f64,
        s.weight() as f64 / 1e6,
        s.stats().first().map_or(0, |r| r.entries),
    );
}

/// Zipf(s) over `n` ranks by inverse CDF: exact, and 8 MB for 1M keys.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: usize, s: f64) -> Zipf {
        let mut cdf = Vec::with_capacity(n);
        let mut sum = 0.0;
        for rank in 1..=n {
            sum += 1.0 / (rank as f64).powf(s);
            cdf.push(sum);
        }
        for p in &mut cdf {
            *p /= sum;
        }
        Zipf { cdf }
    }

    /// The rank (0 = most popular) for a uniform `u` in [0, 1).
    fn sample(&self, u: f64) -> usize {
        self.cdf
            .partition_point(|&p| p <= u)
            .min(self.cdf.len() - 1)
    }

    /// Probability mass of the `k` most popular ranks.
    fn top(&self, k: usize) -> f64 {
        match k {
            0 => 0.0,
            k => self.cdf[k.min(self.cdf.len()) - 1],
        }
    }
}

/// xorshift64*: fast, deterministic, good enough for workload generation.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn measure_hit_ratio() {
    const N: usize = 1_000_000;
    const WARM: usize = 2_000_000;
    const MEASURE: usize = 4_000_000;
    let zipf = Zipf::new(N, 0.99);
    let s = store(100 << 20);
    let now = Instant::now();
    let expires = now + Duration::from_secs(3600);
    let mut rng = Rng(0x853c_49e6_748f_ea9b);
    let mut hits = 0usize;
    let started = Instant::now();
    for op in 0..WARM + MEASURE {
        let k = key(zipf.sample(rng.next_f64()));
        let v = get_variant(&k);
        if s.get(0, &k, &v, now).is_some() {
            if op >= WARM {
                hits += 1;
            }
        } else {
            fill(&s, &k, &v, Bytes::from_static(&REPLY), expires);
        }
    }
    let elapsed = started.elapsed();
    let entries = s.stats().first().map_or(0, |r| r.entries) as usize;
    eprintln!(
        "l1/hit_ratio: Zipf(0.99) over {N} keys, 100 MB cap, {} B replies: hit ratio {:.4} \
         over {MEASURE} requests after {WARM} warming; {entries} entries resident; \
         the {entries} most popular keys would give {:.4} ({:.0} ns per request incl. key formatting)",
        REPLY.len(),
        hits as f64 / MEASURE as f64,
        zipf.top(entries),
        elapsed.as_nanos() as f64 / (WARM + MEASURE) as f64,
    );
}

criterion_group!(
    benches,
    bench_get,
    bench_fill,
    bench_fill_new,
    bench_invalidate
);

fn main() {
    // Test mode runs each bench once; skip the multi-second measurements
    // there. As criterion decides it: `cargo bench` passes --bench,
    // `cargo test --benches` does not, and --test or --list wins over it.
    let args: Vec<String> = std::env::args().collect();
    let has = |flag: &str| args.iter().any(|a| a == flag);
    if has("--bench") && !has("--test") && !has("--list") {
        measure_memory();
        measure_hit_ratio();
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
