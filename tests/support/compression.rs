//! The documented frame format of compressed values, written out here
//! independently of tierd's codec, and the rule the compression suites use.

use tierd::config::{CompressConfig, RuleConfig};

use super::l1::{decode, rule, Resp, HOUR};

/// The documented magic bytes: `F5 'T' 'Z'` and the format version.
pub const MAGIC: [u8; 4] = *b"\xf5TZ\x01";
/// The documented header: magic, codec byte, u32 LE original length.
pub const HEADER_LEN: usize = 9;
/// The compressing rules' threshold.
pub const THRESHOLD: usize = 64;

/// A caching rule that compresses values of at least [`THRESHOLD`] bytes,
/// in Redis too when `upstream`.
pub fn compress_rule(name: &str, pattern: &str, upstream: bool) -> RuleConfig {
    let mut r = rule(name, pattern, HOUR);
    r.compress = Some(CompressConfig {
        threshold: THRESHOLD as u64,
        upstream,
    });
    r
}

/// A frame in the documented format around `payload`, declaring `declared`.
pub fn frame_with(declared: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = MAGIC.to_vec();
    out.push(1);
    out.extend_from_slice(&declared.to_le_bytes());
    out.extend_from_slice(payload);
    out
}

/// A valid frame of `plain`, built here with lz4_flex's block API.
pub fn frame_of(plain: &[u8]) -> Vec<u8> {
    frame_with(plain.len() as u32, &lz4_flex::block::compress(plain))
}

/// The bulk payload of a reply (RESP2 or RESP3); `None` for a nil.
pub fn bulk_of(frame: &[u8]) -> Option<Vec<u8>> {
    match decode(frame) {
        Resp::Bulk(b) => b,
        Resp::Null => None,
        other => panic!("expected a bulk string, got {other:?}"),
    }
}
