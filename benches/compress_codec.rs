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
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tierd::cache::compress::{self, Decoded};
use tierd::cache::store::Variant;
use tierd::protocol::inspect;
use tierd::protocol::reply;

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
        let now = Instant::now();
        let (store, docs) = docs::doc_store(&plain, &framed, MAX_VALUE as u64, now);
        let mut keys: [Vec<(Vec<u8>, Variant)>; 2] = [Vec::new(), Vec::new()];
        for (rule, key, variant) in docs {
            keys[rule].push((key, variant));
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
