//! RSS of the L1 store under a stream of distinct keys, against its cap
//! (issue 3: 10M distinct keys into a 1gb cap must keep RSS within 1.3× the
//! cap).
//!
//! Inserts `user:{n}` for n in 0..10M, each with a 100-byte reply read by
//! `GET` over RESP2, into a store whose one rule shares a 1 GiB global cap
//! (`[l1] max_memory = "1gb"`: Redis units, so 2^30 bytes). About 4.3M
//! entries fit, so the second half of the run is steady eviction: what is
//! measured includes quick_cache's tables and ghost list, the packed
//! entries, and whatever the allocator keeps after freeing evicted ones.
//!
//! RSS is `VmRSS` from `/proc/self/status`, read before the store is built
//! and after every million keys; growth is against that baseline. The peak
//! is the largest growth seen at those points, and `VmHWM` (the kernel's
//! high-water mark) is printed too, since the keys are inserted in one go and
//! a transient spike between two samples would show only there.
//!
//! This is its own bench target, not part of `benches/l1.rs`, so that it runs
//! in a fresh process: criterion's buffers and the other measurements would
//! otherwise be in the baseline.
//!
//! Run with `cargo bench --bench l1_rss` (about 10 s and 1.4 GB of memory on
//! the reference machine). `L1_RSS_KEYS` and `L1_RSS_CAP_MB` (MiB) override
//! the key count and the cap. Without `--bench` (`cargo test --benches`) it
//! runs a 200k-key, 16 MiB smoke version so the target stays cheap to test.

use std::time::{Duration, Instant};

use bytes::Bytes;
use tierd::cache::store::{RuleCap, Store, StoreConfig, Variant};
use tierd::protocol::Proto;

const REPLY: [u8; 100] = [b'v'; 100];
const MIB: u64 = 1 << 20;
const TARGET: f64 = 1.3;

/// `VmRSS` and `VmHWM` of this process, in bytes.
fn rss() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kb| kb.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name}={value:?} is not a non-negative integer"),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--list") {
        println!("l1_rss: bench");
        return;
    }
    // As criterion does: `cargo bench` passes --bench; `cargo test --benches`
    // does not, and gets a quick smoke run.
    let bench = args.iter().any(|a| a == "--bench") && !args.iter().any(|a| a == "--test");
    let (default_keys, default_cap_mb) = if bench {
        (10_000_000, 1024)
    } else {
        (200_000, 16)
    };
    let keys = env_u64("L1_RSS_KEYS").unwrap_or(default_keys);
    let cap = env_u64("L1_RSS_CAP_MB").unwrap_or(default_cap_mb) * MIB;
    let step = (keys / 10).max(1);

    let (base, _) = rss();
    let store = match Store::new(StoreConfig {
        max_memory: cap,
        max_value_size: 1 << 20,
        rules: vec![RuleCap {
            name: "users".to_string(),
            max_memory: None,
        }],
    }) {
        Ok(s) => s,
        Err(e) => panic!("{e}"),
    };
    let now = Instant::now();
    let expires = now + Duration::from_secs(3600);
    let reply = Bytes::from_static(&REPLY);
    let get = Bytes::from_static(b"GET");
    let mut key = String::with_capacity(32);
    let mut peak = 0u64;
    let mut inserted = 0u64;
    let started = Instant::now();
    eprintln!(
        "l1_rss: {keys} distinct keys user:{{n}}, {} B replies, cap {} MiB; baseline RSS {:.1} MiB",
        REPLY.len(),
        cap / MIB,
        base as f64 / MIB as f64,
    );
    for n in 0..keys {
        use std::fmt::Write;
        key.clear();
        let _ = write!(key, "user:{n}");
        let variant = Variant::from_args(
            0,
            Proto::Resp2,
            &[get.clone(), Bytes::copy_from_slice(key.as_bytes())],
        );
        if let Some(token) = store.begin_fill(key.as_bytes()) {
            if store.finish_fill(token, 0, variant, reply.clone(), expires) {
                inserted += 1;
            }
        }
        if (n + 1) % step == 0 || n + 1 == keys {
            let grown = rss().0.saturating_sub(base);
            peak = peak.max(grown);
            let st = store.stats();
            let r = st.first();
            eprintln!(
                "l1_rss: {:>9} keys: RSS +{:7.1} MiB = {:.3}x cap; charged {:7.1} MiB, \
                 {} entries, {} evictions",
                n + 1,
                grown as f64 / MIB as f64,
                grown as f64 / cap as f64,
                store.weight() as f64 / MIB as f64,
                r.map_or(0, |r| r.entries),
                r.map_or(0, |r| r.evictions),
            );
        }
    }
    let elapsed = started.elapsed();
    let (end, hwm) = rss();
    let grown = end.saturating_sub(base);
    let entries = store.stats().first().map_or(0, |r| r.entries);
    let ratio = grown as f64 / cap as f64;
    let peak_ratio = peak as f64 / cap as f64;
    let verdict = if ratio.max(peak_ratio) <= TARGET {
        "within"
    } else {
        "OVER"
    };
    // One line to quote.
    println!(
        "l1_rss: {keys} distinct keys into a {} MiB cap: RSS grew {:.1} MiB = {ratio:.3}x the cap \
         (peak sampled {peak_ratio:.3}x, VmHWM {:.3}x); {entries} entries resident, charged \
         {:.1} MiB ({:.1} B/entry), {inserted} fills accepted, {:.0} ns per fill; \
         target <= {TARGET}x: {verdict}",
        cap / MIB,
        grown as f64 / MIB as f64,
        hwm.saturating_sub(base) as f64 / cap as f64,
        store.weight() as f64 / MIB as f64,
        store.weight() as f64 / entries.max(1) as f64,
        elapsed.as_nanos() as f64 / keys.max(1) as f64,
    );
    if !bench {
        // The smoke run checks the bound too, with slack for a tiny cap
        // whose fixed costs (tables, thread-local arenas) weigh more.
        assert!(
            ratio <= 2.0 * TARGET,
            "RSS grew {ratio:.3}x a {} MiB cap",
            cap / MIB
        );
    }
    drop(store);
}
