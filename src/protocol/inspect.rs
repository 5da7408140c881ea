//! Reading inside a framed reply without re-encoding it.
//!
//! tierd interprets a handful of upstream replies itself (the `HELLO` map at
//! connection setup, `+OK` of `SELECT`/`AUTH`). These helpers walk a complete
//! frame and hand back raw sub-frames, so that whatever tierd passes on stays
//! byte-exact.

use super::ReplyFramer;

/// The raw element frames of a complete top-level aggregate (`*`, `%`, `~`,
/// `>`). A map yields keys and values alternately. `None` if `frame` is not a
/// well-formed aggregate.
pub fn elements(frame: &[u8], max_depth: usize) -> Option<Vec<&[u8]>> {
    let kind = *frame.first()?;
    let line_end = find_crlf(frame)?;
    let count: i64 = std::str::from_utf8(frame.get(1..line_end)?)
        .ok()?
        .parse()
        .ok()?;
    let count = match kind {
        b'*' | b'~' | b'>' => count,
        b'%' => count.checked_mul(2)?,
        _ => return None,
    };
    let mut out = Vec::with_capacity(usize::try_from(count).ok()?.min(1024));
    let mut pos = line_end + 2;
    for _ in 0..count {
        let rest = frame.get(pos..)?;
        let len = ReplyFramer::new(max_depth).frame(rest).ok()??;
        out.push(rest.get(..len)?);
        pos += len;
    }
    Some(out)
}

/// The payload of a bulk string frame (`$3\r\nfoo\r\n` → `foo`), or of a
/// simple string (`+OK\r\n` → `OK`). `None` for anything else.
pub fn string_payload(frame: &[u8]) -> Option<&[u8]> {
    let line_end = find_crlf(frame)?;
    match frame.first()? {
        b'+' => frame.get(1..line_end),
        b'$' => {
            let len: usize = std::str::from_utf8(frame.get(1..line_end)?)
                .ok()?
                .parse()
                .ok()?;
            frame.get(line_end + 2..line_end + 2 + len)
        }
        _ => None,
    }
}

/// Whether a frame is an error reply (`-…` or RESP3 blob error `!…`).
pub fn is_error(frame: &[u8]) -> bool {
    matches!(frame.first(), Some(b'-') | Some(b'!'))
}

/// The value of an integer reply, `:n\r\n`.
pub fn integer(frame: &[u8]) -> Option<i64> {
    super::parse::string2ll(frame.strip_prefix(b":")?.strip_suffix(b"\r\n")?)
}

/// Whether a frame is exactly `+OK\r\n`.
pub fn is_ok(frame: &[u8]) -> bool {
    frame == b"+OK\r\n"
}

fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    #[test]
    fn elements_of_map_and_array() {
        let map = b"%2\r\n$6\r\nserver\r\n$5\r\nredis\r\n$5\r\nproto\r\n:3\r\n";
        let els = elements(map, 8).unwrap();
        assert_eq!(els.len(), 4);
        assert_eq!(els[1], b"$5\r\nredis\r\n");
        assert_eq!(els[3], b":3\r\n");
        let arr = b"*2\r\n*1\r\n:1\r\n$-1\r\n";
        assert_eq!(
            elements(arr, 8).unwrap(),
            vec![&b"*1\r\n:1\r\n"[..], b"$-1\r\n"]
        );
        assert!(elements(b"*2\r\n:1\r\n", 8).is_none(), "truncated");
        assert!(elements(b"+OK\r\n", 8).is_none());
    }

    #[test]
    fn payloads() {
        assert_eq!(string_payload(b"$3\r\nfoo\r\n"), Some(&b"foo"[..]));
        assert_eq!(string_payload(b"+OK\r\n"), Some(&b"OK"[..]));
        assert_eq!(string_payload(b"$9\r\nfoo\r\n"), None);
        assert_eq!(string_payload(b":1\r\n"), None);
        assert!(is_error(b"-ERR x\r\n"));
        assert!(is_ok(b"+OK\r\n"));
    }
}
