//! Request parser and reply framer throughput on pipelined input.
//!
//! Numbers are per element (`Throughput::Elements`), so criterion reports
//! requests or replies per second directly. Run with
//! `cargo bench --bench parse`.

use bytes::BytesMut;
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use tierd::protocol::{reply, ParseLimits, ReplyFramer, Request, RequestParser};

const PIPELINE: usize = 1000;

/// 1,000 pipelined requests, alternating `SET key:NNNN <64 bytes>` and
/// `GET key:NNNN`, as a client library's pipeline would send them.
fn set_get_pipeline() -> Vec<u8> {
    let value = [b'v'; 64];
    let mut input = Vec::new();
    for i in 0..PIPELINE {
        let key = format!("key:{:04}", i / 2);
        let req = if i % 2 == 0 {
            Request::from_args(&[b"SET", key.as_bytes(), &value])
        } else {
            Request::from_args(&[b"GET", key.as_bytes()])
        };
        input.extend_from_slice(&req.raw);
    }
    input
}

fn bench_request_parser(c: &mut Criterion) {
    let input = set_get_pipeline();
    let mut group = c.benchmark_group("request_parser");
    group.throughput(Throughput::Elements(PIPELINE as u64));
    group.bench_function("pipelined_set_get_1000", |b| {
        b.iter(|| {
            let mut parser = RequestParser::new(ParseLimits::default());
            let mut buf = BytesMut::from(&input[..]);
            let mut n = 0;
            while let Ok(Some(req)) = parser.parse(&mut buf) {
                black_box(&req);
                n += 1;
            }
            assert_eq!(n, PIPELINE);
        })
    });
    group.finish();
}

fn frame_all(input: &[u8], expected: usize) {
    let mut framer = ReplyFramer::new(128);
    let mut at = 0;
    let mut n = 0;
    while let Ok(Some(len)) = framer.frame(&input[at..]) {
        at += len;
        n += 1;
    }
    assert_eq!(n, expected);
}

fn bench_reply_framer(c: &mut Criterion) {
    let mut bulks = BytesMut::new();
    for _ in 0..PIPELINE {
        reply::bulk(&mut bulks, &[b'v'; 64]);
    }
    let mut group = c.benchmark_group("reply_framer");
    group.throughput(Throughput::Elements(PIPELINE as u64));
    group.bench_function("pipelined_bulk64_1000", |b| {
        b.iter(|| frame_all(black_box(&bulks), PIPELINE))
    });
    group.finish();

    const ELEMENTS: usize = 10_000;
    let mut array = BytesMut::new();
    reply::array_header(&mut array, ELEMENTS);
    for i in 0..ELEMENTS {
        reply::bulk(&mut array, format!("member:{i}").as_bytes());
    }
    let mut group = c.benchmark_group("reply_framer");
    group.throughput(Throughput::Elements(ELEMENTS as u64));
    group.bench_function("array_10000", |b| {
        b.iter(|| frame_all(black_box(&array), 1))
    });
    group.finish();
}

criterion_group!(benches, bench_request_parser, bench_reply_framer);
criterion_main!(benches);
