//! Fuzzes the upstream reply framer: arbitrary bytes, fed in chunks.
//!
//! Beyond "never panics", it checks that frames are non-empty, that they tile
//! the input from the start, and that the outcome does not depend on how the
//! input was split into reads.
//!
//! Run with `cargo +nightly fuzz run reply_framer` from the repository root.
#![no_main]

#[path = "common.rs"]
mod common;

use libfuzzer_sys::fuzz_target;
use tierd::protocol::{FrameError, ReplyFramer};

/// Shallow, so the fuzzer reaches the depth check with short inputs.
const MAX_DEPTH: usize = 8;

/// The length of every frame, in order; frames tile the input because each
/// one is cut off the front of the buffer.
fn outcome(input: &[u8], chunk: usize) -> common::Outcome<usize, FrameError> {
    let mut framer = ReplyFramer::new(MAX_DEPTH);
    common::feed(input, chunk, |buf| {
        let len = framer.frame(buf)?;
        if let Some(len) = len {
            assert!(len > 0 && len <= buf.len());
            let _ = buf.split_to(len);
        }
        Ok(len)
    })
}

fuzz_target!(|data: &[u8]| {
    common::split_invariant(data, outcome);
});
