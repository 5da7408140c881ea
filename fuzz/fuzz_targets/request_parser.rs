//! Fuzzes the client request parser: arbitrary bytes, fed in chunks.
//!
//! Beyond "never panics", it checks the parser's contract: every call errs,
//! waits, or returns a request that consumed bytes; the outcome does not
//! depend on how the input was split into reads; and every request's `raw`
//! parses back to the same arguments (it is what upstream receives).
//!
//! Run with `cargo +nightly fuzz run request_parser` from the repository root.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tierd::protocol::{ParseError, ParseLimits, Request, RequestParser};

/// Small limits so the fuzzer reaches every limit check with short inputs.
const LIMITS: ParseLimits = ParseLimits {
    max_bulk_len: 4096,
    max_args: 64,
    max_inline_len: 1024,
};

fn outcome(input: &[u8], chunk: usize) -> (Vec<Request>, Option<ParseError>) {
    let mut parser = RequestParser::new(LIMITS);
    let mut buf = BytesMut::new();
    let mut requests = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match parser.parse(&mut buf) {
                Ok(Some(request)) => {
                    assert!(buf.len() < before, "a request must consume input");
                    assert!(!request.args.is_empty(), "empty requests are skipped");
                    requests.push(request);
                }
                Ok(None) => {
                    assert!(buf.len() <= before);
                    break;
                }
                Err(e) => return (requests, Some(e)),
            }
        }
    }
    (requests, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let chunked = outcome(input, usize::from(seed) + 1);
    let whole = outcome(input, input.len());
    assert_eq!(chunked, whole, "the outcome must not depend on read sizes");

    for request in &whole.0 {
        let mut raw = BytesMut::from(&request.raw[..]);
        let mut parser = RequestParser::new(ParseLimits::default());
        match parser.parse(&mut raw) {
            Ok(Some(again)) => {
                assert_eq!(again.args, request.args);
                assert!(raw.is_empty());
            }
            other => panic!("raw did not reparse: {other:?}"),
        }
    }
});
