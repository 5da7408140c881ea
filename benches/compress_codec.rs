//! The compression codec alone (criterion): `tierd::cache::compress`'s
//! `compress` and `decode` of generated JSON documents of about 4, 16 and
//! 64 KB (`benches/support/docs.rs`, typical profile), and an L1 hit of
//! such a document kept plain or kept compressed and decoded on the hit as
//! tierd does (copy out, decode, re-frame as a bulk reply, copy to the
//! session's output). Throughput is in uncompressed bytes.
//!
//! Run with `cargo bench --bench compress_codec` (add `-- --quick` for a
//! fast pass). `benches/compression.rs` prints the same per-size costs as
//! a table, next to the end-to-end measurements.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tierd::cache::compress::{self, Decoded};
use tierd::cache::store::{RuleCap, Store, StoreConfig, Variant};
use tierd::protocol::reply;
use tierd::protocol::{inspect, Proto};

#[path = "support/docs.rs"]
mod docs;

const MAX_VALUE: usize = 1 << 20;
const SIZES: [usize; 3] = [4 * 1024, 16 * 1024, 64 * 1024];
/// Documents per size; each iteration takes the next one.
const DOCS: usize = 16;

fn label(size: usize) -> String {
    format!("{}k", size / 1024)
}

fn framed(plain: &[Vec<u8>]) -> Vec<Vec<u8>> {
    plain
        .iter()
        .map(|d| compress::compress(d, MAX_VALUE).expect("the documents compress"))
        .collect()
}

fn mean_len(docs: &[Vec<u8>]) -> u64 {
    (docs.iter().map(Vec::len).sum::<usize>() / docs.len()) as u64
}

fn bench_codec(c: &mut Criterion) {
    let mut group = c.benchmark_group("compress");
    for size in SIZES {
        let plain = docs::of_size(DOCS, size);
        let framed = framed(&plain);
        group.throughput(Throughput::Bytes(mean_len(&plain)));
        let mut i = 0;
        group.bench_function(BenchmarkId::new("compress", label(size)), |b| {
            b.iter(|| {
                i += 1;
                black_box(compress::compress(black_box(&plain[i % DOCS]), MAX_VALUE))
            })
        });
        group.bench_function(BenchmarkId::new("decode", label(size)), |b| {
            b.iter(|| {
                i += 1;
                let d = compress::decode(black_box(&framed[i % DOCS]), MAX_VALUE);
                black_box(d.map(|d| d.as_bytes().len()))
            })
        });
    }
    group.finish();
}

fn bench_l1_hit(c: &mut Criterion) {
    let mut group = c.benchmark_group("l1_hit");
    for size in SIZES {
        let plain = docs::of_size(DOCS, size);
        let framed = framed(&plain);
        let store = Store::new(StoreConfig {
            max_memory: 1 << 30,
            max_value_size: MAX_VALUE as u64,
            rules: ["plain", "doc"]
                .into_iter()
                .map(|name| RuleCap {
                    name: name.into(),
                    max_memory: None,
                })
                .collect(),
        })
        .expect("store");
        let now = Instant::now();
        let expires = now + Duration::from_secs(3600);
        let mut keys: [Vec<(Vec<u8>, Variant)>; 2] = [Vec::new(), Vec::new()];
        for (i, (p, f)) in plain.iter().zip(&framed).enumerate() {
            for (rule, value) in [(0usize, p), (1, f)] {
                let key = format!("{}:{i}", ["plain", "doc"][rule]).into_bytes();
                let variant = Variant::from_args(
                    0,
                    Proto::Resp2,
                    &[Bytes::from_static(b"GET"), Bytes::copy_from_slice(&key)],
                );
                let mut bulk = BytesMut::new();
                reply::bulk(&mut bulk, value);
                let token = store.begin_fill(&key).expect("fill token");
                assert!(store.finish_fill(token, rule, variant.clone(), bulk.freeze(), expires));
                keys[rule].push((key, variant));
            }
        }
        group.throughput(Throughput::Bytes(mean_len(&plain)));
        let mut output = BytesMut::with_capacity(128 * 1024);
        let mut i = 0;
        group.bench_function(BenchmarkId::new("plain", label(size)), |b| {
            b.iter(|| {
                i += 1;
                let (key, variant) = &keys[0][i % DOCS];
                output.clear();
                let hit = store.get_with(0, key, &[variant.as_ref()], now, |hit| {
                    output.extend_from_slice(hit.as_ref())
                });
                black_box((hit.is_some(), output.len()))
            })
        });
        group.bench_function(BenchmarkId::new("compressed", label(size)), |b| {
            b.iter(|| {
                i += 1;
                let (key, variant) = &keys[1][i % DOCS];
                output.clear();
                let hit = store.get_with(1, key, &[variant.as_ref()], now, |hit| {
                    let copy = Bytes::copy_from_slice(hit.as_ref());
                    let payload = inspect::string_payload(&copy).expect("a bulk reply");
                    if let Ok(Decoded::Compressed(value)) = compress::decode(payload, MAX_VALUE) {
                        let mut framed = BytesMut::with_capacity(value.len() + 16);
                        reply::bulk(&mut framed, &value);
                        output.extend_from_slice(&framed.freeze());
                    }
                });
                black_box((hit.is_some(), output.len()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_codec, bench_l1_hit);
criterion_main!(benches);
