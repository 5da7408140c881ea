//! Fuzzes the client request parser: arbitrary bytes, fed in chunks.
//!
//! Beyond "never panics", it checks the parser's contract: every call errs,
//! waits, or returns a request that consumed bytes; the outcome does not
//! depend on how the input was split into reads; and every request's `raw`
//! parses back to the same arguments (it is what upstream receives).
//!
//! Run with `cargo +nightly fuzz run request_parser` from the repository root.
#![no_main]

#[path = "common.rs"]
mod common;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tierd::protocol::{ParseError, ParseLimits, Request, RequestParser};

/// Small limits so the fuzzer reaches every limit check with short inputs.
const LIMITS: ParseLimits = ParseLimits {
    max_bulk_len: 4096,
    max_args: 64,
    max_inline_len: 1024,
};

fn outcome(input: &[u8], chunk: usize) -> common::Outcome<Request, ParseError> {
    let mut parser = RequestParser::new(LIMITS);
    common::feed(input, chunk, |buf| {
        let request = parser.parse(buf)?;
        if let Some(request) = &request {
            assert!(!request.args.is_empty(), "empty requests are skipped");
        }
        Ok(request)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((requests, _)) = common::split_invariant(data, outcome) else {
        return;
    };
    for request in &requests {
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
