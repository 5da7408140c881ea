//! The harness both targets share: feed the input to an incremental decoder
//! in chunks, as reads would deliver it, and check that how the input was
//! split does not change the outcome.
//!
//! Included by each target with `#[path = "common.rs"] mod common;` (it is
//! not a target of its own).

use std::fmt::Debug;

use bytes::BytesMut;

/// Everything `next` decoded, in order, and the error that stopped it, if
/// any.
pub type Outcome<T, E> = (Vec<T>, Option<E>);

/// Feeds `input` to `next` `chunk` bytes at a time (at least one), calling it
/// until it needs more input after every chunk. `next` takes one item off the
/// front of the buffer, returns `Ok(None)` when the buffer holds no complete
/// item, and must consume input exactly when it returns an item.
pub fn feed<T, E>(
    input: &[u8],
    chunk: usize,
    mut next: impl FnMut(&mut BytesMut) -> Result<Option<T>, E>,
) -> Outcome<T, E> {
    let mut buf = BytesMut::new();
    let mut items = Vec::new();
    for piece in input.chunks(chunk.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            let before = buf.len();
            match next(&mut buf) {
                Ok(Some(item)) => {
                    assert!(buf.len() < before, "an item must consume input");
                    items.push(item);
                }
                Ok(None) => {
                    assert!(buf.len() <= before, "waiting must not add input");
                    break;
                }
                Err(e) => return (items, Some(e)),
            }
        }
    }
    (items, None)
}

/// Splits the fuzzer's `data` into a chunk size (its first byte, plus one)
/// and the input, runs `outcome` on the input fed in chunks of that size and
/// in one piece, asserts that both agree, and returns the one-piece outcome.
/// `None` for empty data.
pub fn split_invariant<T: PartialEq + Debug>(
    data: &[u8],
    outcome: impl Fn(&[u8], usize) -> T,
) -> Option<T> {
    let (&seed, input) = data.split_first()?;
    let chunked = outcome(input, usize::from(seed) + 1);
    let whole = outcome(input, input.len());
    assert_eq!(chunked, whole, "the outcome must not depend on read sizes");
    Some(whole)
}
