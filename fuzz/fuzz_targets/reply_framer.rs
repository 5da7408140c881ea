//! Fuzzes the upstream reply framer: arbitrary bytes, fed in chunks.
//!
//! Beyond "never panics", it checks that frames are non-empty, that they tile
//! the input from the start, and that the outcome does not depend on how the
//! input was split into reads.
//!
//! Run with `cargo +nightly fuzz run reply_framer` from the repository root.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tierd::protocol::{FrameError, ReplyFramer};

/// Shallow, so the fuzzer reaches the depth check with short inputs.
const MAX_DEPTH: usize = 8;

fn outcome(input: &[u8], chunk: usize) -> (Vec<usize>, Option<FrameError>) {
    let mut framer = ReplyFramer::new(MAX_DEPTH);
    let mut start = 0;
    let mut end = 0;
    let mut frames = Vec::new();
    while end < input.len() {
        end = (end + chunk.max(1)).min(input.len());
        loop {
            match framer.frame(&input[start..end]) {
                Ok(Some(len)) => {
                    assert!(len > 0 && start + len <= end);
                    frames.push(len);
                    start += len;
                }
                Ok(None) => break,
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, input)) = data.split_first() else {
        return;
    };
    let chunked = outcome(input, usize::from(seed) + 1);
    let whole = outcome(input, input.len());
    assert_eq!(chunked, whole, "the outcome must not depend on read sizes");
});
