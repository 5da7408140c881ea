//! Transparent value compression: the codec that turns a large string value
//! into a small framed lz4 block and back.
//!
//! This file owns the byte format of a compressed value and the rules for
//! telling one apart from a plain value. It is pure code: no I/O, no config,
//! no knowledge of which keys or commands are compressed (the rules and
//! `dispatch` decide that) and no knowledge of where the bytes live (L1 or
//! Redis store the same frame).
//!
//! # Format
//!
//! ```text
//! offset  size  field
//! 0       4     magic: F5 'T' 'Z' 01 (the last byte is the format version)
//! 4       1     codec: 1 = lz4 block (lz4_flex's block format, not its
//!               frame); 0 = raw (an escaped value, stored as it is)
//! 5       4     original length, u32 little-endian
//! 9       ..    the lz4 block, or for codec 0 the value itself
//! ```
//!
//! [`HEADER_LEN`] is 9. The first byte, `0xF5`, can never appear in UTF-8
//! text, so no JSON, text or number a client stores starts with the magic by
//! accident; binary values can, and the rules below keep them intact. The
//! block format has no checksum and no size of its own, which is what the
//! header adds; the frame format would add a checksum and 7–19 bytes that a
//! cache holding the original length does not need.
//!
//! # Safety rules
//!
//! - [`compress`] frames a value only when the frame (header included) is at
//!   most 90% of the original: compression must save at least 10%, or the
//!   value is stored plain. Values above `max_value_size`, or above `u32`,
//!   are always stored plain.
//! - A plain value that itself starts with [`MAGIC`] is always framed, so
//!   that reading it back can never mistake it for a frame: compressed when
//!   that pays and it is within `max_value_size`, else *raw* (codec 0, the
//!   value as it is behind the header), at any size.
//! - [`decode`] treats anything that does not start with a parseable header
//!   (magic, a known codec, four length bytes) as plain and returns it as
//!   is: a value that merely looks like the start of a frame is data.
//! - Once the header parses, the declared length is checked against
//!   `max_value_size` *before* anything is allocated: lz4_flex's own
//!   `decompress_size_prepended` trusts its prefix and would allocate up to
//!   4 GiB on a lie (DESIGN.md, known traps). The payload is then
//!   decompressed into a buffer of exactly the declared size with the
//!   bounds-checked safe decoder, and must fill it exactly. Anything else is
//!   a [`CorruptValue`], which becomes an error reply, never a panic.
//!
//! Because `max_value_size` is the decoding limit, lowering
//! `l1.max_value_size` makes larger values that were compressed under the
//! old limit unreadable through tierd (each read answers the corrupt-value
//! error) until they are rewritten.

use crate::error::ErrorSource;

/// The four bytes every compressed value starts with; the last one is the
/// format version.
pub const MAGIC: [u8; 4] = *b"\xf5TZ\x01";

/// The format version, the last byte of [`MAGIC`]. A different version is
/// a different magic, so values of a future version read as plain here.
pub const FORMAT_VERSION: u8 = MAGIC[3];

/// Codec byte for lz4_flex's block format.
pub const CODEC_LZ4_BLOCK: u8 = 1;

/// Codec byte for a value stored as it is behind the header: a value that
/// starts with [`MAGIC`] and is not worth (or too large) to compress.
pub const CODEC_RAW: u8 = 0;

/// Bytes before the compressed payload: magic, codec, original length.
pub const HEADER_LEN: usize = MAGIC.len() + 1 + 4;

/// The value as stored, after [`decode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// The stored bytes are the value (no frame, or one that does not parse).
    Plain(&'a [u8]),
    /// The value, decompressed from a frame.
    Compressed(Vec<u8>),
}

impl Decoded<'_> {
    /// The value's bytes, whichever way it was stored.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Decoded::Plain(bytes) => bytes,
            Decoded::Compressed(bytes) => bytes,
        }
    }

    /// Whether the value was stored compressed.
    pub fn is_compressed(&self) -> bool {
        matches!(self, Decoded::Compressed(_))
    }

    /// The value's bytes, owned (copies a plain value).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Decoded::Plain(bytes) => bytes.to_vec(),
            Decoded::Compressed(bytes) => bytes,
        }
    }
}

/// A frame whose header parses but whose payload cannot be the value it
/// declares. The data is at fault, not the client that asked for it: the
/// value in Redis was damaged, truncated or written by something that is not
/// tierd, so retrying does not help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("compressed value is corrupt ({reason})")]
pub struct CorruptValue {
    /// The original length the header declares.
    pub declared_len: u32,
    /// What is wrong with it.
    pub reason: CorruptReason,
}

/// Why a [`CorruptValue`] is corrupt. Its `Display` completes the sentence
/// "compressed value is corrupt (…)".
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptReason {
    /// The declared length is above the decoding limit, so nothing was
    /// allocated or decompressed.
    #[error("its header declares {declared} bytes, above l1.max_value_size of {max}")]
    TooLarge {
        /// The declared original length.
        declared: u32,
        /// The limit it exceeds.
        max: usize,
    },
    /// The payload decompressed to fewer bytes than declared.
    #[error("it decompresses to {actual} bytes but its header declares {declared}")]
    Shorter {
        /// The declared original length.
        declared: u32,
        /// What the payload decompressed to.
        actual: usize,
    },
    /// The payload decompresses to more bytes than declared.
    #[error("it decompresses to more than the {declared} bytes its header declares")]
    Longer {
        /// The declared original length.
        declared: u32,
    },
    /// The payload is not a valid lz4 block; lz4_flex's description.
    #[error("invalid lz4 block: {0}")]
    Malformed(String),
}

impl CorruptValue {
    /// The RESP error text for a client that read this value, without the
    /// leading `-` and trailing CRLF:
    /// `ERR tierd: compressed value is corrupt (…)`.
    pub fn client_error(&self) -> String {
        format!("ERR tierd: {self}")
    }

    /// Who is at fault: the stored data, which came from upstream.
    pub fn error_source(&self) -> ErrorSource {
        ErrorSource::Upstream
    }
}

/// `value` framed and lz4-compressed, or `None` when it should be stored
/// plain: it is longer than `max_value_size` or than `u32::MAX`, or the frame
/// would not save at least 10% (frame, header included, above 90% of the
/// original). A value that starts with [`MAGIC`] is framed even when that
/// saves nothing (see the module's safety rules), so that
/// `decode(&compress(v).unwrap_or(v))` is always `v` for values within
/// `max_value_size`.
///
/// Whether a value is large enough to be worth trying (a rule's
/// `threshold`) is the caller's decision.
pub fn compress(value: &[u8], max_value_size: usize) -> Option<Vec<u8>> {
    let declared = u32::try_from(value.len()).ok()?;
    let escape = value.starts_with(&MAGIC);
    if value.len() > max_value_size {
        return escape.then(|| raw(value, declared));
    }
    // Even an empty payload would not save 10% of a value this short.
    if !escape && !saves_enough(value.len(), HEADER_LEN) {
        return None;
    }
    // lz4_flex's compress_into wants room for the worst case up front.
    let capacity = HEADER_LEN + lz4_flex::block::get_maximum_output_size(value.len());
    let mut framed = Vec::with_capacity(capacity);
    framed.extend_from_slice(&MAGIC);
    framed.push(CODEC_LZ4_BLOCK);
    framed.extend_from_slice(&declared.to_le_bytes());
    framed.resize(capacity, 0);
    let payload_len = lz4_flex::block::compress_into(value, framed.get_mut(HEADER_LEN..)?).ok()?;
    let framed_len = HEADER_LEN + payload_len;
    if !saves_enough(value.len(), framed_len) {
        return escape.then(|| raw(value, declared));
    }
    framed.truncate(framed_len);
    // The worst-case buffer is ~10% larger than the value; a cache entry
    // should not carry that slack.
    framed.shrink_to_fit();
    Some(framed)
}

/// An escaped value behind a raw header.
fn raw(value: &[u8], declared: u32) -> Vec<u8> {
    let mut framed = Vec::with_capacity(HEADER_LEN + value.len());
    framed.extend_from_slice(&MAGIC);
    framed.push(CODEC_RAW);
    framed.extend_from_slice(&declared.to_le_bytes());
    framed.extend_from_slice(value);
    framed
}

/// The value `stored` holds: `Plain(stored)` unless it starts with a header
/// that parses (magic, the lz4 codec, four length bytes), and then the
/// decompressed value. `max_value_size` bounds the declared length, and so
/// the allocation.
///
/// # Errors
///
/// [`CorruptValue`] when the header parses but the declared length is above
/// `max_value_size` (checked before allocating), or the payload is not an
/// lz4 block that decompresses to exactly the declared length.
pub fn decode(stored: &[u8], max_value_size: usize) -> Result<Decoded<'_>, CorruptValue> {
    let mut value = bytes::BytesMut::new();
    if decode_append(stored, max_value_size, &mut value)? {
        Ok(Decoded::Compressed(value.into()))
    } else {
        Ok(Decoded::Plain(stored))
    }
}

/// [`decode`] into a buffer of the caller's: appends the value `stored`
/// holds and returns `true` when it is a frame, leaves `out` as it was and
/// returns `false` when it is plain. The hot path of a reply or an L1 hit
/// builds the reply around it, and need not copy the value again.
///
/// # Errors
///
/// As [`decode`]; `out` is then left as it was.
pub fn decode_append(
    stored: &[u8],
    max_value_size: usize,
    out: &mut bytes::BytesMut,
) -> Result<bool, CorruptValue> {
    let Some((codec, declared, payload)) = parse_header(stored) else {
        return Ok(false);
    };
    let corrupt = |reason| CorruptValue {
        declared_len: declared,
        reason,
    };
    if codec == CODEC_RAW {
        // Nothing to inflate, so no size to fear: the bytes are here.
        return match usize::try_from(declared) {
            Ok(len) if len == payload.len() => {
                out.extend_from_slice(payload);
                Ok(true)
            }
            _ if (declared as usize) < payload.len() => {
                Err(corrupt(CorruptReason::Longer { declared }))
            }
            _ => Err(corrupt(CorruptReason::Shorter {
                declared,
                actual: payload.len(),
            })),
        };
    }
    let len = match usize::try_from(declared) {
        Ok(len) if len <= max_value_size => len,
        _ => {
            return Err(corrupt(CorruptReason::TooLarge {
                declared,
                max: max_value_size,
            }))
        }
    };
    let start = out.len();
    out.resize(start + len, 0);
    let result =
        lz4_flex::block::decompress_into(payload, out.get_mut(start..).unwrap_or_default());
    let err = match result {
        Ok(actual) if actual == len => return Ok(true),
        Ok(actual) => corrupt(CorruptReason::Shorter { declared, actual }),
        Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) => {
            corrupt(CorruptReason::Longer { declared })
        }
        Err(err) => corrupt(CorruptReason::Malformed(err.to_string())),
    };
    out.truncate(start);
    Err(err)
}

/// The original length a frame declares, when `stored` starts with a header
/// that parses; `None` for a plain value. The payload is not checked, so a
/// corrupt frame still reports what its header says.
pub fn original_len(stored: &[u8]) -> Option<usize> {
    parse_header(stored).and_then(|(_, declared, _)| usize::try_from(declared).ok())
}

/// The declared length and the payload, when `stored` starts with a header
/// this version understands.
fn parse_header(stored: &[u8]) -> Option<(u8, u32, &[u8])> {
    let rest = stored.strip_prefix(MAGIC.as_slice())?;
    let (&codec, rest) = rest.split_first()?;
    if codec != CODEC_LZ4_BLOCK && codec != CODEC_RAW {
        return None;
    }
    let (len, payload) = rest.split_first_chunk::<4>()?;
    Some((codec, u32::from_le_bytes(*len), payload))
}

/// The 10% rule: a frame of `framed` bytes is worth storing instead of
/// `original` bytes when it is at most 90% of them. Both are at most about
/// 1.1 × `u32::MAX`, so the products fit a u64.
fn saves_enough(original: usize, framed: usize) -> bool {
    (framed as u64).saturating_mul(10) <= (original as u64).saturating_mul(9)
}

/// Whether a RESP reply is a bulk string whose value starts with
/// [`MAGIC`]: how L1 tells a value it keeps compressed from a plain one
/// (for a compressing rule, a plain value that starts with the magic is
/// always framed, so the two cannot be confused).
pub fn is_framed_bulk(reply: &[u8]) -> bool {
    if reply.first() != Some(&b'$') {
        return false;
    }
    let Some(start) = reply.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    reply
        .get(start + 2..)
        .is_some_and(|payload| payload.starts_with(&MAGIC))
}

#[cfg(test)]
// Tests may unwrap and panic: a failure is the point.
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::{Duration, Instant};

    const MIB: usize = 1 << 20;

    /// Deterministic pseudo-random bytes (xorshift64*), incompressible to
    /// lz4.
    fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut state = seed | 1;
        (0..len)
            .map(|_| {
                state ^= state >> 12;
                state ^= state << 25;
                state ^= state >> 27;
                (state.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
            })
            .collect()
    }

    /// JSON records with repeated field names, like the issue's users and
    /// projects, at least `len` bytes long.
    fn json_like(len: usize) -> Vec<u8> {
        let mut out = String::from("[");
        let mut i = 0u64;
        while out.len() < len {
            out.push_str(&format!(
                "{{\"id\":{i},\"name\":\"user {i}\",\"email\":\"user{i}@example.com\",\
                 \"roles\":[\"teacher\",\"admin\"],\"active\":{},\"score\":{}}},",
                i % 3 == 0,
                i * 7919 % 1000
            ));
            i += 1;
        }
        out.push(']');
        out.into_bytes()
    }

    /// A frame with `declared` as its length and `payload` after it.
    fn frame(declared: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.push(CODEC_LZ4_BLOCK);
        out.extend_from_slice(&declared.to_le_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn round_trip(value: &[u8], max: usize) -> Vec<u8> {
        let stored = compress(value, max).unwrap_or_else(|| value.to_vec());
        decode(&stored, max).unwrap().into_vec()
    }

    #[test]
    fn header_layout() {
        assert_eq!(HEADER_LEN, 9);
        assert_eq!(MAGIC, [0xf5, b'T', b'Z', 1]);
        assert_eq!(FORMAT_VERSION, 1);
        let framed = compress(&json_like(4096), MIB).unwrap();
        assert_eq!(framed[..4], MAGIC);
        assert_eq!(framed[4], CODEC_LZ4_BLOCK);
        let declared = u32::from_le_bytes(framed[5..9].try_into().unwrap());
        assert_eq!(declared as usize, json_like(4096).len());
        assert_eq!(original_len(&framed), Some(json_like(4096).len()));
        // The payload is a plain lz4 block.
        assert_eq!(
            lz4_flex::block::decompress(&framed[HEADER_LEN..], declared as usize).unwrap(),
            json_like(4096)
        );
    }

    #[test]
    fn json_compresses_and_round_trips() {
        for len in [500, 1000, 1024, 4096, 10_000, 65_536, 300_000] {
            let value = json_like(len);
            let framed = compress(&value, MIB).unwrap_or_else(|| panic!("{len}"));
            assert!(framed.len() * 10 <= value.len() * 9, "{len}");
            assert_eq!(framed.capacity(), framed.len());
            let decoded = decode(&framed, MIB).unwrap();
            assert!(decoded.is_compressed());
            assert_eq!(decoded.as_bytes(), value.as_slice());
        }
        // Highly repetitive data: lz4's ratio is bounded near 255:1.
        let zeros = vec![0u8; MIB];
        let framed = compress(&zeros, MIB).unwrap();
        assert!(framed.len() < MIB / 200, "{}", framed.len());
        assert_eq!(decode(&framed, MIB).unwrap().as_bytes(), zeros.as_slice());
    }

    #[test]
    fn incompressible_and_tiny_values_stay_plain() {
        for len in [0, 1, 9, 10, 11, 64, 1000, 4096, 100_000] {
            let value = random_bytes(len, len as u64 + 7);
            assert_eq!(compress(&value, MIB), None, "{len}");
            assert_eq!(decode(&value, MIB).unwrap(), Decoded::Plain(&value[..]));
        }
        // Too short to save 10% even when perfectly repetitive.
        for len in 0..=20 {
            assert_eq!(compress(&vec![b'a'; len], MIB), None, "{len}");
        }
    }

    #[test]
    fn values_above_the_limit_stay_plain() {
        let value = json_like(5000);
        assert!(compress(&value, value.len()).is_some());
        assert_eq!(compress(&value, value.len() - 1), None);
        assert_eq!(compress(&value, 0), None);
    }

    #[test]
    fn many_sizes_and_contents_round_trip() {
        let mut contents: Vec<Vec<u8>> = Vec::new();
        for len in [
            0, 1, 12, 13, 100, 255, 256, 4095, 4096, 65_535, 65_536, 65_537,
        ] {
            contents.push(random_bytes(len, 3));
            contents.push(json_like(len)[..len].to_vec());
            contents.push(vec![0xf5; len]);
            // Half repetitive, half random: near the 10% boundary.
            let mut mixed = json_like(len / 2)[..len / 2].to_vec();
            mixed.extend(random_bytes(len - len / 2, 5));
            contents.push(mixed);
        }
        for value in contents {
            assert_eq!(round_trip(&value, MIB), value, "{}", value.len());
        }
    }

    #[test]
    fn the_ten_percent_rule_at_its_boundary() {
        assert!(saves_enough(100, 90));
        assert!(!saves_enough(100, 91));
        assert!(saves_enough(1000, 900));
        assert!(!saves_enough(1000, 901));
        assert!(saves_enough(11, 9));
        assert!(!saves_enough(9, 9));
        assert!(saves_enough(u32::MAX as usize, 0));

        // Through compress: random bytes followed by zeros, with the random
        // share growing one byte at a time, so the frame grows about one
        // byte per step and crosses 90% of the value exactly.
        let len = 10_000;
        let noise = random_bytes(len, 11);
        let (mut exact, mut one_over) = (false, false);
        for k in 8_000..9_200 {
            let mut value = noise[..k].to_vec();
            value.resize(len, 0);
            let framed_len = HEADER_LEN + lz4_flex::block::compress(&value).len();
            let got = compress(&value, MIB);
            assert_eq!(got.is_some(), framed_len * 10 <= len * 9, "k = {k}");
            if let Some(framed) = &got {
                assert_eq!(framed.len(), framed_len);
            }
            exact |= framed_len == 9_000;
            one_over |= framed_len == 9_001;
        }
        assert!(exact && one_over, "the search did not hit the boundary");
    }

    #[test]
    fn every_truncation_of_a_frame() {
        let value = json_like(3000);
        let framed = compress(&value, MIB).unwrap();
        for cut in 0..framed.len() {
            let stored = &framed[..cut];
            let decoded = decode(stored, MIB);
            if cut < HEADER_LEN {
                // No complete header: the bytes are the value.
                assert_eq!(decoded, Ok(Decoded::Plain(stored)), "cut {cut}");
                assert_eq!(original_len(stored), None);
            } else {
                assert!(decoded.is_err(), "cut {cut}: {decoded:?}");
                assert_eq!(original_len(stored), Some(value.len()));
            }
        }
        assert_eq!(decode(&framed, MIB).unwrap().as_bytes(), value.as_slice());
    }

    #[test]
    fn other_versions_and_codecs_are_plain() {
        let framed = compress(&json_like(2000), MIB).unwrap();
        for (at, byte) in [(0, 0xf4), (1, b't'), (3, 0), (3, 2), (3, 0xff), (4, 2)] {
            let mut stored = framed.clone();
            stored[at] = byte;
            assert_eq!(
                decode(&stored, MIB),
                Ok(Decoded::Plain(&stored[..])),
                "byte {at} = {byte}"
            );
            assert_eq!(original_len(&stored), None);
        }
    }

    #[test]
    fn length_lies_are_corrupt() {
        let value = json_like(2000);
        let framed = compress(&value, MIB).unwrap();
        let payload = &framed[HEADER_LEN..];
        let n = value.len() as u32;

        let err = decode(&frame(n + 1, payload), MIB).unwrap_err();
        assert_eq!(
            err.reason,
            CorruptReason::Shorter {
                declared: n + 1,
                actual: value.len()
            }
        );
        assert_eq!(
            err.client_error(),
            format!(
                "ERR tierd: compressed value is corrupt (it decompresses to {n} bytes but its \
                 header declares {})",
                n + 1
            )
        );
        for declared in [0, 1, n / 2, n - 1] {
            let err = decode(&frame(declared, payload), MIB).unwrap_err();
            assert_eq!(err.declared_len, declared);
            // A short buffer fails either at a literal copy or at a match.
            assert!(
                matches!(
                    err.reason,
                    CorruptReason::Longer { .. } | CorruptReason::Malformed(_)
                ),
                "{declared}: {err}"
            );
        }
        assert!(err_text(&frame(n - 1, payload)).contains("corrupt"));
    }

    fn err_text(stored: &[u8]) -> String {
        decode(stored, MIB).unwrap_err().to_string()
    }

    #[test]
    fn a_huge_declared_length_is_refused_before_allocating() {
        // 4 GiB declared against a 1 MiB limit: allocating first would take
        // seconds and 4 GiB (or abort); the check answers at once.
        let started = Instant::now();
        for _ in 0..1000 {
            let err = decode(&frame(u32::MAX, b"\x00"), MIB).unwrap_err();
            assert_eq!(
                err.reason,
                CorruptReason::TooLarge {
                    declared: u32::MAX,
                    max: MIB
                }
            );
        }
        assert!(started.elapsed() < Duration::from_secs(5));
        assert_eq!(
            err_text(&frame(u32::MAX, b"")),
            "compressed value is corrupt (its header declares 4294967295 bytes, above \
             l1.max_value_size of 1048576)"
        );
        // One byte over the limit is refused, the limit itself is tried.
        let err = decode(&frame(MIB as u32 + 1, b"\x00"), MIB).unwrap_err();
        assert!(matches!(err.reason, CorruptReason::TooLarge { .. }));
        let err = decode(&frame(MIB as u32, b"\x00"), MIB).unwrap_err();
        assert!(matches!(
            err.reason,
            CorruptReason::Shorter { actual: 0, .. }
        ));
        assert_eq!(original_len(&frame(u32::MAX, b"")), Some(u32::MAX as usize));
    }

    #[test]
    fn garbage_payloads_are_corrupt() {
        for payload in [
            &b""[..],
            b"\xff",
            b"\xf0\xff\xff\xff",
            b"\x0f\x01\x00",
            b"\x1fa\x00\x00",
            b"\x10a\xff\xff",
        ] {
            let err = decode(&frame(100, payload), MIB).unwrap_err();
            assert!(err.to_string().starts_with("compressed value is corrupt ("));
            assert_eq!(err.error_source(), ErrorSource::Upstream);
        }
    }

    #[test]
    fn decode_append_agrees_with_decode() {
        let mut out = bytes::BytesMut::from(&b"head"[..]);
        for value in [
            json_like(5000),
            random_bytes(300, 3),
            [&MAGIC[..], b"x"].concat(),
        ] {
            let stored = compress(&value, MIB).unwrap_or_else(|| value.clone());
            let before = out.len();
            let framed = decode_append(&stored, MIB, &mut out).unwrap();
            assert_eq!(framed, stored != value);
            let appended = if framed { &out[before..] } else { &stored[..] };
            assert_eq!(appended, decode(&stored, MIB).unwrap().as_bytes());
            out.truncate(before);
        }
        // A corrupt frame leaves `out` as it was.
        let mut bad = compress(&json_like(5000), MIB).unwrap();
        bad.truncate(bad.len() - 3);
        assert!(decode_append(&bad, MIB, &mut out).is_err());
        assert_eq!(&out[..], b"head");
    }

    #[test]
    fn plain_values_that_start_with_the_magic() {
        // Shorter than a header, or an unknown codec: returned as is.
        for stored in [
            MAGIC.to_vec(),
            [&MAGIC[..], b"\x01\x00"].concat(),
            [&MAGIC[..], b"\x07abcdefgh"].concat(),
        ] {
            assert_eq!(decode(&stored, MIB), Ok(Decoded::Plain(&stored[..])));
        }
        // A plain value that would parse as a frame is always framed when
        // stored, even though that saves nothing, so it reads back intact.
        let inner = compress(&json_like(3000), MIB).unwrap();
        let outer = compress(&inner, MIB).unwrap();
        assert!(outer.len() > inner.len() * 9 / 10);
        assert_eq!(decode(&outer, MIB).unwrap().as_bytes(), inner.as_slice());
        assert_eq!(round_trip(&MAGIC, MIB), MAGIC);
        let magic_and_noise = [&MAGIC[..], &random_bytes(100, 1)].concat();
        assert_eq!(round_trip(&magic_and_noise, MIB), magic_and_noise);
        // Above the limit, or not worth compressing: escaped raw, and read
        // back intact whatever the limit.
        let escaped = compress(&inner, 10).unwrap();
        assert_eq!(escaped[4], CODEC_RAW);
        assert_eq!(decode(&escaped, 10).unwrap().as_bytes(), inner.as_slice());
        assert_eq!(escaped[4], CODEC_RAW);
        let noisy = compress(&magic_and_noise, MIB).unwrap();
        assert_eq!(noisy[4], CODEC_RAW, "random bytes do not compress");
        // A raw frame whose length lies is corrupt, not a misread value.
        let mut liar = escaped.clone();
        liar.push(b'!');
        assert!(decode(&liar, MIB).is_err());
        liar.truncate(escaped.len() - 2);
        assert!(decode(&liar, MIB).is_err());
    }

    fn compressible() -> impl Strategy<Value = Vec<u8>> {
        // Few distinct chunks repeated: always saves 10% at this size.
        (
            prop::collection::vec(prop::collection::vec(any::<u8>(), 1..16), 1..4),
            prop::collection::vec(any::<prop::sample::Index>(), 200..2000),
        )
            .prop_map(|(chunks, picks)| picks.iter().flat_map(|i| i.get(&chunks).clone()).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn prop_round_trip_arbitrary_bytes(value in prop::collection::vec(any::<u8>(), 0..4096)) {
            prop_assert_eq!(round_trip(&value, MIB), value);
        }

        #[test]
        fn prop_round_trip_compressible(value in compressible()) {
            let framed = compress(&value, MIB);
            prop_assert!(framed.is_some());
            let framed = framed.unwrap_or_default();
            prop_assert!(framed.len() * 10 <= value.len() * 9);
            prop_assert_eq!(original_len(&framed), Some(value.len()));
            prop_assert_eq!(decode(&framed, MIB), Ok(Decoded::Compressed(value)));
        }

        #[test]
        fn prop_values_without_the_magic_are_plain(value in prop::collection::vec(any::<u8>(), 0..512)) {
            prop_assume!(!value.starts_with(&MAGIC));
            prop_assert_eq!(decode(&value, MIB), Ok(Decoded::Plain(&value[..])));
            prop_assert_eq!(original_len(&value), None);
        }
    }

    // Fuzzing the header parser (and the lz4 decoder behind it): decode must
    // answer Ok or Err, never panic or over-allocate, whatever follows the
    // magic. Each case names what it fixes, so the random part lands on the
    // field under test.
    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2048))]

        #[test]
        fn fuzz_header_parser_arbitrary_bytes(stored in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&stored, MIB);
            let _ = original_len(&stored);
        }

        #[test]
        fn fuzz_header_parser_after_magic(rest in prop::collection::vec(any::<u8>(), 0..256)) {
            let stored = [&MAGIC[..], &rest].concat();
            check_decode_contract(&stored)?;
        }

        #[test]
        fn fuzz_header_parser_after_magic_and_codec(
            rest in prop::collection::vec(any::<u8>(), 0..256),
            max in 0usize..(1 << 16),
        ) {
            let stored = [&MAGIC[..], &[CODEC_LZ4_BLOCK][..], &rest].concat();
            match decode(&stored, max) {
                Ok(Decoded::Plain(plain)) => prop_assert!(rest.len() < 4 && plain == &stored[..]),
                Ok(Decoded::Compressed(value)) => prop_assert!(value.len() <= max),
                Err(_) => prop_assert!(rest.len() >= 4),
            }
        }

        #[test]
        fn fuzz_header_parser_plausible_length_garbage_payload(
            declared in 0u32..4096,
            payload in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            check_decode_contract(&frame(declared, &payload))?;
        }

        #[test]
        fn fuzz_header_parser_mutated_frames(
            value in compressible(),
            flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
        ) {
            let mut stored = compress(&value, MIB).unwrap_or_default();
            for (at, byte) in &flips {
                let i = at.index(stored.len());
                stored[i] = *byte;
            }
            check_decode_contract(&stored)?;
        }
    }

    /// What decode promises for any input: a plain answer is the input, a
    /// decompressed one has exactly the declared length within the limit.
    fn check_decode_contract(stored: &[u8]) -> Result<(), TestCaseError> {
        match decode(stored, MIB) {
            Ok(Decoded::Plain(plain)) => {
                prop_assert_eq!(plain, stored);
                prop_assert_eq!(original_len(stored), None);
            }
            Ok(Decoded::Compressed(value)) => {
                prop_assert!(value.len() <= MIB);
                prop_assert_eq!(original_len(stored), Some(value.len()));
            }
            Err(err) => {
                prop_assert_eq!(original_len(stored), Some(err.declared_len as usize));
            }
        }
        Ok(())
    }
}
