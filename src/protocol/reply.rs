//! Upstream reply framing, and the encoders for replies tierd writes itself.
//!
//! This file owns finding where one RESP2/RESP3 reply ends in the bytes an
//! upstream connection returns, so that the reply can be handed to its client
//! byte for byte. It never decodes or re-encodes a reply: that would lose RESP3
//! map and set order, round doubles through f64 and merge `*-1` with `$-1`.
//! It also owns the small encoders for the replies tierd produces on its own
//! (errors, CACHE.* and INFO output, tierd's own upstream commands). It knows
//! nothing about commands, sessions or sockets.
//!
//! The framer is resumable and iterative. It keeps an explicit stack of the
//! elements each open aggregate still owes, capped at `max_depth`, and its
//! place in the buffer, so a 1M-element array arriving in 64 KB reads is
//! scanned once, and no nesting can grow the call stack. Upstream is trusted
//! for sizes (a bulk may declare anything up to `i64::MAX`), but nothing is
//! allocated in proportion to a declared length or count.

use bytes::{BufMut, Bytes, BytesMut};

use super::parse::Request;
use super::Proto;

/// Longest header or simple line accepted. Redis's own replies never come
/// near it; a longer line means the stream is not RESP. (A Lua script can
/// return a status or error string longer than this; such a reply is refused.)
const MAX_LINE: usize = 64 * 1024;

/// The upstream sent bytes that are not a RESP reply. The connection cannot be
/// resynchronised and must be closed; every request waiting on it fails.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The first byte of a frame is not a RESP2/RESP3 type byte.
    #[error("invalid RESP type byte 0x{0:02x}")]
    InvalidType(u8),
    /// A length or count is not a non-negative decimal i64 (or `-1` for a
    /// RESP2 null `$`/`*`). Streamed RESP3 strings (`$?`) are not supported:
    /// Redis never sends them.
    #[error("invalid length in RESP {0:?} header")]
    BadLength(char),
    /// Aggregates nested deeper than the framer's `max_depth`.
    #[error("RESP reply nested deeper than {0} levels")]
    DepthExceeded(usize),
    /// A line longer than 64 KiB without CRLF.
    #[error("RESP line longer than {MAX_LINE} bytes")]
    LineTooLong,
    /// A `\r` not followed by `\n`, or bulk data not followed by CRLF.
    #[error("expected CRLF in RESP reply")]
    MissingCrlf,
}

/// Where the framer is inside the current frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// The next byte starts an element (a type byte).
    Element,
    /// Reading the line of the element of type `kind` that starts at `pos`.
    Line { kind: u8 },
    /// Waiting for the bulk data that ends at `end` and its CRLF.
    BulkData { end: usize },
}

/// Finds where one upstream reply frame ends, resumably.
#[derive(Debug)]
pub struct ReplyFramer {
    max_depth: usize,
    /// Elements still owed by each open aggregate, innermost last. `u64`
    /// because a map of `i64::MAX` pairs owes twice that, plus one after an
    /// attribute.
    stack: Vec<u64>,
    /// Offset of the next unread element (or line start) in the frame.
    pos: usize,
    /// Where the search for the current line's `\r` resumes.
    scan: usize,
    state: State,
}

impl ReplyFramer {
    /// A framer that accepts aggregates nested at most `max_depth` deep (a
    /// flat array is depth 1; an attribute counts as a level).
    pub fn new(max_depth: usize) -> Self {
        ReplyFramer {
            max_depth,
            stack: Vec::new(),
            pos: 0,
            scan: 0,
            state: State::Element,
        }
    }

    /// If `buf` starts with a complete RESP2/RESP3 reply frame, returns
    /// `Some(len)` of that frame; `Ok(None)` if it is not complete yet.
    ///
    /// Between calls that return `Ok(None)` the caller may only append to the
    /// buffer: the framer resumes where it stopped instead of rescanning.
    /// After `Some` it is reset for the next frame, which starts at `len`
    /// (the caller splits it off).
    ///
    /// # Errors
    ///
    /// A [`FrameError`] if the bytes are not RESP or nest deeper than
    /// `max_depth`. The framer is then reset, but the stream is lost.
    pub fn frame(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        if buf.len() < self.pos || buf.len() < self.scan {
            // The caller replaced the buffer instead of appending to it; start
            // the frame over rather than index out of bounds.
            self.reset();
        }
        let result = self.step(buf);
        if !matches!(result, Ok(None)) {
            self.reset();
        }
        result
    }

    fn reset(&mut self) {
        self.stack.clear();
        self.pos = 0;
        self.scan = 0;
        self.state = State::Element;
    }

    fn step(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        loop {
            match self.state {
                State::Element => {
                    let Some(&kind) = buf.get(self.pos) else {
                        return Ok(None);
                    };
                    if !matches!(
                        kind,
                        b'+' | b'-'
                            | b':'
                            | b','
                            | b'('
                            | b'#'
                            | b'_'
                            | b'$'
                            | b'='
                            | b'!'
                            | b'*'
                            | b'~'
                            | b'>'
                            | b'%'
                            | b'|'
                    ) {
                        return Err(FrameError::InvalidType(kind));
                    }
                    self.scan = self.pos + 1;
                    self.state = State::Line { kind };
                }
                State::Line { kind } => {
                    let Some(cr) = self.find_cr(buf)? else {
                        return Ok(None);
                    };
                    let body = buf.get(self.pos + 1..cr).unwrap_or_default();
                    let next = cr + 2;
                    match kind {
                        b'$' | b'=' | b'!' => match parse_len(body, kind == b'$') {
                            Some(-1) => {
                                self.pos = next;
                                if let Some(len) = self.element_done() {
                                    return Ok(Some(len));
                                }
                            }
                            Some(len) => {
                                let end = u64::try_from(len)
                                    .ok()
                                    .and_then(|l| usize::try_from(l).ok())
                                    .and_then(|l| next.checked_add(l))
                                    .ok_or(FrameError::BadLength(char::from(kind)))?;
                                self.pos = next;
                                self.state = State::BulkData { end };
                            }
                            None => return Err(FrameError::BadLength(char::from(kind))),
                        },
                        b'*' | b'~' | b'>' | b'%' | b'|' => {
                            let n = parse_len(body, kind == b'*')
                                .ok_or(FrameError::BadLength(char::from(kind)))?;
                            self.pos = next;
                            // Each `%` pair is two elements; an attribute is a
                            // map followed by the reply it annotates, which
                            // stands in the parent's place.
                            let owed = match (kind, u64::try_from(n)) {
                                (_, Err(_)) => 0,
                                (b'%', Ok(n)) => n * 2,
                                (b'|', Ok(n)) => n * 2 + 1,
                                (_, Ok(n)) => n,
                            };
                            if owed == 0 {
                                if let Some(len) = self.element_done() {
                                    return Ok(Some(len));
                                }
                            } else {
                                if self.stack.len() >= self.max_depth {
                                    return Err(FrameError::DepthExceeded(self.max_depth));
                                }
                                self.stack.push(owed);
                                self.state = State::Element;
                            }
                        }
                        _ => {
                            self.pos = next;
                            if let Some(len) = self.element_done() {
                                return Ok(Some(len));
                            }
                        }
                    }
                }
                State::BulkData { end } => {
                    let Some(trailer) = buf.get(end..end.saturating_add(2)) else {
                        return Ok(None);
                    };
                    if trailer != b"\r\n" {
                        return Err(FrameError::MissingCrlf);
                    }
                    self.pos = end + 2;
                    if let Some(len) = self.element_done() {
                        return Ok(Some(len));
                    }
                }
            }
        }
    }

    /// Finds the `\r` of the CRLF ending the line that starts at `pos`, or
    /// `None` (remembering how far it looked) if the line is incomplete.
    fn find_cr(&mut self, buf: &[u8]) -> Result<Option<usize>, FrameError> {
        let from = self.scan.max(self.pos + 1);
        let found = buf
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\r'))
            .map(|i| from + i);
        let Some(cr) = found else {
            self.scan = buf.len();
            if buf.len().saturating_sub(self.pos) > MAX_LINE {
                return Err(FrameError::LineTooLong);
            }
            return Ok(None);
        };
        if cr - self.pos > MAX_LINE {
            return Err(FrameError::LineTooLong);
        }
        match buf.get(cr + 1) {
            None => {
                self.scan = cr;
                Ok(None)
            }
            Some(b'\n') => Ok(Some(cr)),
            Some(_) => Err(FrameError::MissingCrlf),
        }
    }

    /// Records that the element ending at `pos` is complete, closing every
    /// aggregate it completes. Returns the frame length once the outermost
    /// element is done.
    fn element_done(&mut self) -> Option<usize> {
        self.state = State::Element;
        while let Some(owed) = self.stack.last_mut() {
            *owed -= 1;
            if *owed > 0 {
                return None;
            }
            self.stack.pop();
        }
        Some(self.pos)
    }
}

/// A RESP length or count: a non-negative decimal that fits in an i64, or
/// `-1` where `null_ok` (RESP2's `$-1` and `*-1`).
fn parse_len(s: &[u8], null_ok: bool) -> Option<i64> {
    if s == b"-1" {
        return null_ok.then_some(-1);
    }
    if s.is_empty() || s.len() > 19 {
        return None;
    }
    let mut v: i64 = 0;
    for &d in s {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(i64::from(d - b'0'))?;
    }
    Some(v)
}

/// Whether a complete frame is an out-of-band RESP3 push (`>`), such as a
/// tracking invalidation or a pub/sub message, rather than a command reply.
pub fn is_push(frame: &[u8]) -> bool {
    frame.first() == Some(&b'>')
}

fn crlf(out: &mut BytesMut) {
    out.put_slice(b"\r\n");
}

/// Writes a line, mapping CR and LF to spaces as Redis does for error
/// replies: these texts can echo client input, and a raw newline would split
/// the reply and desynchronise the client.
fn line(out: &mut BytesMut, kind: u8, s: &[u8]) {
    out.reserve(s.len() + 3);
    out.put_u8(kind);
    if s.iter().any(|&b| b == b'\r' || b == b'\n') {
        out.extend(
            s.iter()
                .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
        );
    } else {
        out.put_slice(s);
    }
    crlf(out);
}

fn header(out: &mut BytesMut, kind: u8, n: usize) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    out.reserve(digits.len() + 3);
    out.put_u8(kind);
    out.put_slice(digits);
    crlf(out);
}

/// Appends a simple string, `+s\r\n`. CR and LF in `s` become spaces.
pub fn simple(out: &mut BytesMut, s: &[u8]) {
    line(out, b'+', s);
}

/// Appends an error, `-msg\r\n`; `msg` includes the code, e.g.
/// `b"ERR unknown command"`. CR and LF in `msg` become spaces.
pub fn error(out: &mut BytesMut, msg: &[u8]) {
    line(out, b'-', msg);
}

/// Appends an integer, `:v\r\n`.
pub fn integer(out: &mut BytesMut, v: i64) {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(v).as_bytes();
    out.reserve(digits.len() + 3);
    out.put_u8(b':');
    out.put_slice(digits);
    crlf(out);
}

/// Appends a bulk string, `$len\r\nv\r\n`.
pub fn bulk(out: &mut BytesMut, v: &[u8]) {
    out.reserve(v.len() + 24);
    header(out, b'$', v.len());
    out.put_slice(v);
    crlf(out);
}

/// Appends a null: `$-1\r\n` in RESP2, `_\r\n` in RESP3.
pub fn null(out: &mut BytesMut, proto: Proto) {
    out.put_slice(match proto {
        Proto::Resp2 => b"$-1\r\n",
        Proto::Resp3 => b"_\r\n",
    });
}

/// Appends an array header, `*n\r\n`; the caller writes the `n` elements.
pub fn array_header(out: &mut BytesMut, n: usize) {
    header(out, b'*', n);
}

/// Appends a map header: `%pairs\r\n` in RESP3, or a flat array of
/// `2 * pairs` elements in RESP2, as Redis does. The caller writes the
/// key/value pairs.
pub fn map_header(out: &mut BytesMut, pairs: usize, proto: Proto) {
    match proto {
        Proto::Resp2 => header(out, b'*', pairs.saturating_mul(2)),
        Proto::Resp3 => header(out, b'%', pairs),
    }
}

/// Encodes a command as a RESP multibulk of bulk strings, the form Redis
/// expects from clients.
pub fn encode_command(args: &[&[u8]]) -> Bytes {
    Request::from_args(args).raw
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Frames everything in `input`, returning each frame's length.
    fn frames(input: &[u8], max_depth: usize) -> Result<Vec<usize>, FrameError> {
        let mut f = ReplyFramer::new(max_depth);
        let mut at = 0;
        let mut out = Vec::new();
        while let Some(n) = f.frame(&input[at..])? {
            out.push(n);
            at += n;
        }
        Ok(out)
    }

    /// Feeds `input` in the given chunk sizes (cycled) into a growing buffer
    /// from which complete frames are split off, like the upstream reader.
    fn frames_chunked(
        input: &[u8],
        chunks: &[usize],
        max_depth: usize,
    ) -> Result<Vec<Vec<u8>>, FrameError> {
        let mut f = ReplyFramer::new(max_depth);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut i = 0;
        while fed < input.len() {
            let n = chunks[i % chunks.len()].max(1).min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            i += 1;
            while let Some(len) = f.frame(&buf)? {
                out.push(buf.drain(..len).collect());
            }
        }
        Ok(out)
    }

    /// The frames (depth cap 3) found in `input` fed in the given chunk
    /// sizes, then the error if there was one.
    fn outcome(input: &[u8], chunks: &[usize]) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut f = ReplyFramer::new(3);
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut i = 0;
        while fed < input.len() {
            let n = chunks[i % chunks.len()].max(1).min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            i += 1;
            loop {
                match f.frame(&buf) {
                    Ok(Some(len)) => out.push(buf.drain(..len).collect()),
                    Ok(None) => break,
                    Err(e) => return (out, Some(e)),
                }
            }
        }
        (out, None)
    }

    const EVERY_TYPE: &[&[u8]] = &[
        b"+OK\r\n",
        b"-ERR wrong\r\n",
        b":-42\r\n",
        b",3.14\r\n",
        b",inf\r\n",
        b"(3492890328409238509324850943850943825024385\r\n",
        b"#t\r\n",
        b"_\r\n",
        b"$5\r\nhe\r\no\r\n",
        b"$0\r\n\r\n",
        b"$-1\r\n",
        b"=15\r\ntxt:Some string\r\n",
        b"!21\r\nSYNTAX invalid syntax\r\n",
        b"*-1\r\n",
        b"*0\r\n",
        b"*2\r\n$3\r\nfoo\r\n:1\r\n",
        b"~2\r\n+a\r\n+b\r\n",
        b">3\r\n$10\r\ninvalidate\r\n*1\r\n$1\r\nk\r\n_\r\n",
        b"%2\r\n+first\r\n:1\r\n+second\r\n*1\r\n:2\r\n",
        b"%0\r\n",
        b"|1\r\n+key-popularity\r\n%1\r\n$1\r\na\r\n,0.19\r\n*2\r\n:2\r\n:3\r\n",
        b"*2\r\n|1\r\n+ttl\r\n:3600\r\n+v\r\n:7\r\n",
        b"|0\r\n:1\r\n",
    ];

    #[test]
    fn every_type_frames_whole() {
        for frame in EVERY_TYPE {
            assert_eq!(
                frames(frame, 8).unwrap(),
                vec![frame.len()],
                "{:?}",
                String::from_utf8_lossy(frame)
            );
        }
        let all: Vec<u8> = EVERY_TYPE.concat();
        assert_eq!(
            frames(&all, 8).unwrap(),
            EVERY_TYPE.iter().map(|f| f.len()).collect::<Vec<_>>()
        );
    }

    #[test]
    fn incomplete_at_every_split_point() {
        for frame in EVERY_TYPE {
            for cut in 0..frame.len() {
                let mut f = ReplyFramer::new(8);
                assert_eq!(
                    f.frame(&frame[..cut]).unwrap(),
                    None,
                    "{frame:?} cut at {cut}"
                );
                assert_eq!(
                    f.frame(frame).unwrap(),
                    Some(frame.len()),
                    "{frame:?} cut at {cut}"
                );
                // Fresh framer, only the full frame: same answer.
                assert_eq!(ReplyFramer::new(8).frame(&frame[..cut]).unwrap(), None);
            }
        }
    }

    #[test]
    fn trailing_bytes_belong_to_the_next_frame() {
        let mut f = ReplyFramer::new(8);
        assert_eq!(f.frame(b"+OK\r\n:1\r\n").unwrap(), Some(5));
        assert_eq!(f.frame(b":1\r\n*1").unwrap(), Some(4));
    }

    #[test]
    fn depth_is_capped_without_recursion() {
        assert_eq!(frames(b"*1\r\n*1\r\n:1\r\n", 2).unwrap(), vec![12]);
        assert_eq!(
            frames(b"*1\r\n*1\r\n*1\r\n:1\r\n", 2),
            Err(FrameError::DepthExceeded(2))
        );
        assert_eq!(
            frames(b"|1\r\n+a\r\n+b\r\n:1\r\n", 0),
            Err(FrameError::DepthExceeded(0))
        );
        assert_eq!(frames(b":1\r\n", 0).unwrap(), vec![4]);
        // Empty aggregates open no level.
        assert_eq!(frames(b"*1\r\n*0\r\n", 1).unwrap(), vec![8]);
        let deep = b"*1\r\n".repeat(100_000);
        assert_eq!(frames(&deep, 1000), Err(FrameError::DepthExceeded(1000)));
        let mut ok = b"*1\r\n".repeat(100_000);
        ok.extend_from_slice(b"_\r\n");
        assert_eq!(frames(&ok, 100_000).unwrap(), vec![ok.len()]);
    }

    #[test]
    fn errors() {
        assert_eq!(frames(b"?x\r\n", 8), Err(FrameError::InvalidType(b'?')));
        assert_eq!(frames(b"\r\n", 8), Err(FrameError::InvalidType(b'\r')));
        for bad in [
            &b"$-2\r\n"[..],
            b"$x\r\n",
            b"$\r\n",
            b"$?\r\n",
            b"=-1\r\n",
            b"!-1\r\n",
            b"~-1\r\n",
            b">-1\r\n",
            b"%-1\r\n",
            b"|-1\r\n",
            b"*-2\r\n",
            b"*1 \r\n",
            b"$9223372036854775808\r\n",
            b"*99999999999999999999\r\n",
        ] {
            assert!(
                matches!(frames(bad, 8), Err(FrameError::BadLength(_))),
                "{bad:?}"
            );
        }
        assert_eq!(frames(b"+OK\rX", 8), Err(FrameError::MissingCrlf));
        assert_eq!(frames(b"$2\r\nabcd", 8), Err(FrameError::MissingCrlf));
        let mut long = b"+".to_vec();
        long.resize(MAX_LINE + 1, b'a');
        assert_eq!(frames(&long, 8), Err(FrameError::LineTooLong));
        long.extend_from_slice(b"\r\n");
        assert_eq!(frames(&long, 8), Err(FrameError::LineTooLong));
        let mut at_limit = b"+".to_vec();
        at_limit.resize(MAX_LINE, b'a');
        at_limit.extend_from_slice(b"\r\n");
        assert_eq!(frames(&at_limit, 8).unwrap(), vec![at_limit.len()]);
    }

    #[test]
    fn huge_declared_lengths_allocate_nothing() {
        let mut f = ReplyFramer::new(8);
        assert_eq!(f.frame(b"$9223372036854775807\r\nabc").unwrap(), None);
        let mut f = ReplyFramer::new(8);
        assert_eq!(
            f.frame(b"%9223372036854775807\r\n|9223372036854775807\r\n:1\r\n")
                .unwrap(),
            None
        );
        assert!(f.stack.capacity() < 64);
    }

    #[test]
    fn big_array_in_small_chunks_is_linear() {
        let n = 1_000_000;
        let mut input = format!("*{n}\r\n").into_bytes();
        for i in 0..n {
            input.extend_from_slice(format!(":{i}\r\n").as_bytes());
        }
        let got = frames_chunked(&input, &[64 * 1024], 8).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].len(), input.len());
    }

    #[test]
    fn is_push_checks_the_type() {
        assert!(is_push(b">2\r\n+message\r\n+x\r\n"));
        assert!(!is_push(b"*2\r\n"));
        assert!(!is_push(b""));
    }

    #[test]
    fn encoders() {
        let mut out = BytesMut::new();
        simple(&mut out, b"OK");
        error(&mut out, b"ERR bad\r\nthing");
        integer(&mut out, -7);
        integer(&mut out, i64::MIN);
        bulk(&mut out, b"a\r\nb");
        bulk(&mut out, b"");
        null(&mut out, Proto::Resp2);
        null(&mut out, Proto::Resp3);
        array_header(&mut out, 3);
        map_header(&mut out, 2, Proto::Resp2);
        map_header(&mut out, 2, Proto::Resp3);
        assert_eq!(
            &out[..],
            &b"+OK\r\n-ERR bad  thing\r\n:-7\r\n:-9223372036854775808\r\n$4\r\na\r\nb\r\n$0\r\n\r\n$-1\r\n_\r\n*3\r\n*4\r\n%2\r\n"[..]
        );
        assert_eq!(
            &encode_command(&[b"GET", b"k"])[..],
            b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"
        );
        // The trailing headers open aggregates that are never filled.
        assert_eq!(frames(&out, 8).unwrap().len(), 8);
    }

    /// A RESP2/RESP3 value, for generating valid nested frames.
    #[derive(Debug, Clone)]
    enum Value {
        Simple(String),
        Error(String),
        Int(i64),
        Double(String),
        Big(String),
        Bool(bool),
        Null,
        Bulk(Vec<u8>),
        NullBulk,
        NullArray,
        Verbatim(Vec<u8>),
        BlobError(Vec<u8>),
        Array(u8, Vec<Value>),
        Map(Vec<(Value, Value)>),
        Attr(Vec<(Value, Value)>, Box<Value>),
    }

    impl Value {
        fn encode(&self, out: &mut Vec<u8>) {
            let len = |out: &mut Vec<u8>, kind: u8, b: &[u8]| {
                out.extend_from_slice(format!("{}{}\r\n", char::from(kind), b.len()).as_bytes());
                out.extend_from_slice(b);
                out.extend_from_slice(b"\r\n");
            };
            match self {
                Value::Simple(s) => out.extend_from_slice(format!("+{s}\r\n").as_bytes()),
                Value::Error(s) => out.extend_from_slice(format!("-{s}\r\n").as_bytes()),
                Value::Int(i) => out.extend_from_slice(format!(":{i}\r\n").as_bytes()),
                Value::Double(s) => out.extend_from_slice(format!(",{s}\r\n").as_bytes()),
                Value::Big(s) => out.extend_from_slice(format!("({s}\r\n").as_bytes()),
                Value::Bool(b) => out.extend_from_slice(if *b { b"#t\r\n" } else { b"#f\r\n" }),
                Value::Null => out.extend_from_slice(b"_\r\n"),
                Value::Bulk(b) => len(out, b'$', b),
                Value::NullBulk => out.extend_from_slice(b"$-1\r\n"),
                Value::NullArray => out.extend_from_slice(b"*-1\r\n"),
                Value::Verbatim(b) => len(out, b'=', b),
                Value::BlobError(b) => len(out, b'!', b),
                Value::Array(kind, items) => {
                    out.extend_from_slice(
                        format!("{}{}\r\n", char::from(*kind), items.len()).as_bytes(),
                    );
                    items.iter().for_each(|v| v.encode(out));
                }
                Value::Map(pairs) => {
                    out.extend_from_slice(format!("%{}\r\n", pairs.len()).as_bytes());
                    pairs.iter().for_each(|(k, v)| {
                        k.encode(out);
                        v.encode(out);
                    });
                }
                Value::Attr(pairs, reply) => {
                    out.extend_from_slice(format!("|{}\r\n", pairs.len()).as_bytes());
                    pairs.iter().for_each(|(k, v)| {
                        k.encode(out);
                        v.encode(out);
                    });
                    reply.encode(out);
                }
            }
        }
    }

    fn value() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            "[a-zA-Z0-9 ]{0,12}".prop_map(Value::Simple),
            "ERR [a-z ]{0,12}".prop_map(Value::Error),
            any::<i64>().prop_map(Value::Int),
            any::<f64>().prop_map(|d| Value::Double(d.to_string())),
            "-?[1-9][0-9]{0,40}".prop_map(Value::Big),
            any::<bool>().prop_map(Value::Bool),
            Just(Value::Null),
            proptest::collection::vec(any::<u8>(), 0..40).prop_map(Value::Bulk),
            Just(Value::NullBulk),
            Just(Value::NullArray),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::Verbatim),
            proptest::collection::vec(any::<u8>(), 0..20).prop_map(Value::BlobError),
        ];
        leaf.prop_recursive(6, 64, 6, |inner| {
            prop_oneof![
                (
                    prop_oneof![Just(b'*'), Just(b'~'), Just(b'>')],
                    proptest::collection::vec(inner.clone(), 0..6)
                )
                    .prop_map(|(k, items)| Value::Array(k, items)),
                proptest::collection::vec((inner.clone(), inner.clone()), 0..4)
                    .prop_map(Value::Map),
                (
                    proptest::collection::vec((inner.clone(), inner.clone()), 0..3),
                    inner
                )
                    .prop_map(|(pairs, reply)| Value::Attr(pairs, Box::new(reply))),
            ]
        })
    }

    proptest! {
        #[test]
        fn nested_frames_frame_identically_in_any_chunking(
            values in proptest::collection::vec(value(), 1..6),
            chunks in proptest::collection::vec(1usize..48, 1..16),
        ) {
            let encoded: Vec<Vec<u8>> = values.iter().map(|v| {
                let mut out = Vec::new();
                v.encode(&mut out);
                out
            }).collect();
            let input = encoded.concat();
            prop_assert_eq!(frames_chunked(&input, &chunks, 64).unwrap(), encoded.clone());
            prop_assert_eq!(
                frames(&input, 64).unwrap(),
                encoded.iter().map(Vec::len).collect::<Vec<_>>()
            );
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_ignore_chunking(
            data in proptest::collection::vec(any::<u8>(), 0..512),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let whole = outcome(&data, &[data.len()]);
            prop_assert!(whole.0.iter().all(|f| !f.is_empty()));
            prop_assert_eq!(outcome(&data, &chunks), whole);
        }

        #[test]
        fn resp_like_garbage_never_panics_and_ignores_chunking(
            data in proptest::collection::vec(
                prop_oneof![
                    3 => proptest::sample::select(b"*$%|>~=!\r\n-0123+_".to_vec()),
                    1 => any::<u8>(),
                ],
                0..256,
            ),
            chunks in proptest::collection::vec(1usize..16, 1..8),
        ) {
            let whole = outcome(&data, &[data.len()]);
            prop_assert_eq!(outcome(&data, &chunks), whole);
        }
    }
}
