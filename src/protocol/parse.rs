//! The incremental client request parser, with Redis's input limits.
//!
//! This file owns turning the bytes a client sends into [`Request`]s: RESP
//! multibulk arrays of bulk strings and inline (telnet-style) lines, exactly as
//! Redis 7.0's `processMultibulkBuffer` and `processInlineBuffer` accept them,
//! with the same error texts. It knows nothing about commands, sockets or
//! replies: the session decides what to do with a request or an error (reply
//! `-ERR <message>` and close, as Redis does).
//!
//! The parser is resumable. When a request is incomplete it records how far it
//! got (the offsets of the arguments already read, where the newline search
//! stopped, how many bytes the current bulk still needs), so that the next call
//! on the grown buffer continues from there. A 1M-argument request arriving in
//! 4 KB reads, or a 512 MB bulk arriving in 64 KB reads, is therefore scanned
//! once in total rather than once per read. Requests have depth 1 by
//! construction: an element that is not a `$` bulk is an error, so nested
//! arrays are rejected at once and nothing ever recurses. Nothing is allocated
//! in proportion to a declared length.
//!
//! Where tierd is stricter than Redis, it is because the raw request bytes are
//! forwarded to a multiplexed upstream connection shared by many clients:
//! tierd and the upstream must never disagree on where a request ends, or one
//! client could smuggle bytes into another's request. So:
//!
//! - a header line's `\r` must be followed by `\n` (Redis assumes it is and
//!   skips it), else the header's "invalid ... length" error;
//! - a bulk's data must be followed by `\r\n` (Redis skips any two bytes), else
//!   `Protocol error: expected CRLF after bulk data`;
//! - an inline line containing a NUL byte is rejected at once with
//!   `Protocol error: NUL byte in inline request` (Redis's `strchr` stops at the
//!   NUL, so Redis never completes such a line and only errors once 64 KiB are
//!   buffered);
//! - line-length limits are applied to the line itself, so the outcome never
//!   depends on how the bytes were split into reads (Redis checks the size of
//!   whatever happens to be buffered when no line end has arrived yet).

use std::borrow::Cow;
use std::ops::Range;

use bytes::{Buf, Bytes, BytesMut};

use super::reply;

/// Default [`ParseLimits::max_bulk_len`]: Redis's `proto-max-bulk-len`, 512 MiB.
pub const DEFAULT_MAX_BULK_LEN: usize = 512 * 1024 * 1024;
/// Default [`ParseLimits::max_args`]: 1M arguments per request.
pub const DEFAULT_MAX_ARGS: usize = 1024 * 1024;
/// Default [`ParseLimits::max_inline_len`]: Redis's `PROTO_INLINE_MAX_SIZE`, 64 KiB.
pub const DEFAULT_MAX_INLINE_LEN: usize = 64 * 1024;

/// Longest `*<n>` or `$<len>` header line accepted. Redis uses
/// `PROTO_INLINE_MAX_SIZE` here too, independently of any configuration.
const MAX_HEADER_LINE: usize = 64 * 1024;

/// Redis allocates `argv` for at most this many arguments up front, however
/// many the header declares, and grows it as they arrive. Doing the same keeps
/// a lying `*1048576\r\n` from costing megabytes before any argument is sent.
const MAX_PREALLOC_ARGS: usize = 1024;

/// The hard limits a client request must respect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseLimits {
    /// Largest accepted bulk argument, in bytes (Redis's `proto-max-bulk-len`).
    pub max_bulk_len: usize,
    /// Largest accepted multibulk argument count.
    pub max_args: usize,
    /// Longest accepted inline request line, in bytes, excluding its final
    /// `\n` (a `\r` before it counts, as in Redis).
    pub max_inline_len: usize,
}

impl Default for ParseLimits {
    fn default() -> Self {
        ParseLimits {
            max_bulk_len: DEFAULT_MAX_BULK_LEN,
            max_args: DEFAULT_MAX_ARGS,
            max_inline_len: DEFAULT_MAX_INLINE_LEN,
        }
    }
}

/// One complete client request.
///
/// `raw` and `args` share the allocation of the connection's read buffer they
/// were split from, so holding any of them keeps that whole allocation alive.
/// Copy (`Bytes::copy_from_slice`) what must outlive the request, such as a
/// value stored in a cache.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The request as RESP: the client's exact bytes for a multibulk request,
    /// or the equivalent multibulk encoding for an inline one, so that upstream
    /// always receives RESP.
    pub raw: Bytes,
    /// The arguments, command name first; each is a zero-copy slice of `raw`.
    pub args: Vec<Bytes>,
}

impl Request {
    /// The command name as sent (any case), or `b""` if there are no arguments.
    pub fn name(&self) -> &[u8] {
        self.args.first().map_or(&b""[..], |a| a.as_ref())
    }

    /// The `i`-th argument (0 is the command name), if present.
    pub fn arg(&self, i: usize) -> Option<&Bytes> {
        self.args.get(i)
    }

    /// [`Request::from_args`] for text arguments (tests and tierd's own
    /// commands).
    pub fn from_strs(args: &[&str]) -> Request {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        Request::from_args(&args)
    }

    /// Builds a request from arguments, encoding them as a RESP multibulk of
    /// bulk strings. Used for tierd's own upstream commands and for inline
    /// requests.
    pub fn from_args(args: &[&[u8]]) -> Request {
        let size: usize = args.iter().map(|a| a.len() + 16).sum::<usize>() + 16;
        let mut out = BytesMut::with_capacity(size);
        reply::array_header(&mut out, args.len());
        let mut ranges = Vec::with_capacity(args.len());
        for a in args {
            reply::bulk(&mut out, a);
            // `bulk` ends with the data and then "\r\n".
            let end = out.len().saturating_sub(2);
            ranges.push(end.saturating_sub(a.len())..end);
        }
        let raw = out.freeze();
        let args = ranges.into_iter().map(|r| raw.slice(r)).collect();
        Request { raw, args }
    }
}

/// Which rule a malformed request broke; bounded, so usable as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ParseErrorKind {
    /// `*<n>` where n is not an integer or exceeds [`ParseLimits::max_args`].
    InvalidMultibulkLength,
    /// A `*<n>` line longer than 64 KiB.
    MultibulkCountTooBig,
    /// An array element that is not a `$` bulk string.
    ExpectedBulk,
    /// `$<len>` where len is not an integer, is negative, or exceeds
    /// [`ParseLimits::max_bulk_len`].
    InvalidBulkLength,
    /// A `$<len>` line longer than 64 KiB.
    BulkCountTooBig,
    /// Bulk data not followed by `\r\n` (tierd is stricter than Redis here).
    MissingBulkCrlf,
    /// An inline line longer than [`ParseLimits::max_inline_len`].
    InlineTooBig,
    /// An inline line with an unterminated quote or a quote followed by a
    /// non-space.
    UnbalancedQuotes,
    /// An inline line containing a NUL byte (which Redis never completes).
    InlineNul,
}

impl ParseErrorKind {
    /// A short stable name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            ParseErrorKind::InvalidMultibulkLength => "invalid_multibulk_length",
            ParseErrorKind::MultibulkCountTooBig => "multibulk_count_too_big",
            ParseErrorKind::ExpectedBulk => "expected_bulk",
            ParseErrorKind::InvalidBulkLength => "invalid_bulk_length",
            ParseErrorKind::BulkCountTooBig => "bulk_count_too_big",
            ParseErrorKind::MissingBulkCrlf => "missing_bulk_crlf",
            ParseErrorKind::InlineTooBig => "inline_too_big",
            ParseErrorKind::UnbalancedQuotes => "unbalanced_quotes",
            ParseErrorKind::InlineNul => "inline_nul",
        }
    }
}

/// A client sent bytes that are not a valid request. The connection cannot be
/// resynchronised: reply `-ERR <message>` and close it, as Redis does.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ParseError {
    kind: ParseErrorKind,
    message: Cow<'static, str>,
}

impl ParseError {
    /// Who is at fault: the client that sent the bytes.
    pub fn source(&self) -> crate::error::ErrorSource {
        crate::error::ErrorSource::Client
    }

    fn new(kind: ParseErrorKind) -> Self {
        let message = match kind {
            ParseErrorKind::InvalidMultibulkLength => "Protocol error: invalid multibulk length",
            ParseErrorKind::MultibulkCountTooBig => "Protocol error: too big mbulk count string",
            // Built by `expected_bulk`; this text is never shown.
            ParseErrorKind::ExpectedBulk => "Protocol error: expected '$'",
            ParseErrorKind::InvalidBulkLength => "Protocol error: invalid bulk length",
            ParseErrorKind::BulkCountTooBig => "Protocol error: too big bulk count string",
            ParseErrorKind::MissingBulkCrlf => "Protocol error: expected CRLF after bulk data",
            ParseErrorKind::InlineTooBig => "Protocol error: too big inline request",
            ParseErrorKind::UnbalancedQuotes => "Protocol error: unbalanced quotes in request",
            ParseErrorKind::InlineNul => "Protocol error: NUL byte in inline request",
        };
        ParseError {
            kind,
            message: Cow::Borrowed(message),
        }
    }

    /// Redis formats the offending byte with `%c` and then maps `\r` and `\n`
    /// to spaces so the error line stays one line. A `&str` cannot carry the
    /// raw byte when it is NUL or not ASCII, so those are written as `\xHH`.
    fn expected_bulk(got: u8) -> Self {
        let mut message = String::from("Protocol error: expected '$', got '");
        match got {
            b'\r' | b'\n' => message.push(' '),
            0x01..=0x7f => message.push(char::from(got)),
            _ => {
                const HEX: &[u8; 16] = b"0123456789abcdef";
                message.push_str("\\x");
                message.push(char::from(HEX[usize::from(got >> 4)]));
                message.push(char::from(HEX[usize::from(got & 0x0f)]));
            }
        }
        message.push('\'');
        ParseError {
            kind: ParseErrorKind::ExpectedBulk,
            message: Cow::Owned(message),
        }
    }

    /// The error text without Redis's `ERR ` code, e.g.
    /// `Protocol error: invalid bulk length`.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Which rule was broken.
    pub fn kind(&self) -> ParseErrorKind {
        self.kind
    }
}

/// Where the parser is inside the request at the front of the buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Between requests: the next byte decides multibulk or inline.
    Start,
    /// Reading the `*<n>\r\n` line.
    MultibulkHeader,
    /// Reading a `$<len>\r\n` line.
    BulkHeader,
    /// Waiting for `len` data bytes plus `\r\n`.
    BulkData { len: usize },
    /// Reading an inline line up to `\n`.
    Inline,
}

/// Incremental request parser for one client connection.
///
/// Feed it the connection's input buffer after every read; it returns each
/// complete request in turn. Between calls that return `Ok(None)` the caller
/// may only append to the buffer, since the parser remembers offsets into it.
#[derive(Debug)]
pub struct RequestParser {
    limits: ParseLimits,
    state: State,
    /// Offset in the buffer of the next unread byte of the current request.
    pos: usize,
    /// Offset where the search for the current line's end resumes, so a long
    /// line arriving in pieces is scanned once.
    scan: usize,
    /// Array elements still to read.
    remaining: usize,
    /// Offsets of the arguments read so far; reused across requests.
    args: Vec<Range<usize>>,
    /// Buffer length at the last call, for [`RequestParser::wanted`].
    seen: usize,
}

impl RequestParser {
    /// A parser enforcing `limits`.
    pub fn new(limits: ParseLimits) -> Self {
        RequestParser {
            limits,
            state: State::Start,
            pos: 0,
            scan: 0,
            remaining: 0,
            args: Vec::new(),
            seen: 0,
        }
    }

    /// Parses one complete request from the front of `buf`, consuming exactly
    /// its bytes (`split_to` + `freeze`, zero copy).
    ///
    /// `Ok(None)` means more bytes are needed: the partial request stays in
    /// `buf` and the parser keeps its place, so the next call resumes without
    /// rescanning. Empty requests that Redis skips without a reply (`*0`, `*-1`
    /// and blank inline lines) are removed from the front of `buf` even then.
    ///
    /// # Errors
    ///
    /// A [`ParseError`] with Redis's text when the input breaks the protocol
    /// or a limit. The connection cannot continue: the parser is reset, but
    /// what is left in `buf` no longer starts at a request boundary.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ParseError> {
        if buf.len() < self.seen || buf.len() < self.pos || buf.len() < self.scan {
            // The caller replaced the buffer instead of appending to it. Start
            // the request over rather than index out of bounds.
            self.reset();
        }
        let result = self.step(buf);
        self.seen = buf.len();
        if !matches!(result, Ok(None)) {
            self.reset();
        }
        result
    }

    /// How many more bytes the current partial request needs at least, as of
    /// the last call, so the caller can reserve; 0 between requests.
    ///
    /// Inside a bulk this is the rest of its declared length, which the client
    /// has not necessarily sent: cap what you reserve.
    pub fn wanted(&self) -> usize {
        match self.state {
            State::Start => 0,
            State::MultibulkHeader | State::BulkHeader | State::Inline => 1,
            State::BulkData { len } => self
                .pos
                .saturating_add(len)
                .saturating_add(2)
                .saturating_sub(self.seen),
        }
    }

    fn reset(&mut self) {
        self.state = State::Start;
        self.pos = 0;
        self.scan = 0;
        self.remaining = 0;
        self.seen = 0;
        if self.args.capacity() > MAX_PREALLOC_ARGS {
            // One huge request must not pin megabytes for the connection's life.
            self.args = Vec::new();
        } else {
            self.args.clear();
        }
    }

    /// Drops `n` bytes of an empty request that Redis skips silently.
    fn skip(&mut self, buf: &mut BytesMut, n: usize) {
        buf.advance(n.min(buf.len()));
        self.reset();
    }

    fn step(&mut self, buf: &mut BytesMut) -> Result<Option<Request>, ParseError> {
        loop {
            match self.state {
                State::Start => match buf.first() {
                    None => return Ok(None),
                    Some(b'*') => {
                        self.state = State::MultibulkHeader;
                        self.scan = 1;
                    }
                    Some(_) => {
                        self.state = State::Inline;
                        self.scan = 0;
                    }
                },
                State::MultibulkHeader => {
                    let Some(cr) = self.find_line_end(
                        buf,
                        ParseErrorKind::MultibulkCountTooBig,
                        ParseErrorKind::InvalidMultibulkLength,
                    )?
                    else {
                        return Ok(None);
                    };
                    let n = buf
                        .get(self.pos + 1..cr)
                        .and_then(string2ll)
                        .ok_or_else(|| ParseError::new(ParseErrorKind::InvalidMultibulkLength))?;
                    let next = cr + 2;
                    if n <= 0 {
                        self.skip(buf, next);
                        continue;
                    }
                    let n = usize::try_from(n)
                        .ok()
                        .filter(|&n| n <= self.limits.max_args)
                        .ok_or_else(|| ParseError::new(ParseErrorKind::InvalidMultibulkLength))?;
                    self.remaining = n;
                    self.args.reserve(n.min(MAX_PREALLOC_ARGS));
                    self.pos = next;
                    self.scan = next;
                    self.state = State::BulkHeader;
                }
                State::BulkHeader => {
                    let Some(cr) = self.find_line_end(
                        buf,
                        ParseErrorKind::BulkCountTooBig,
                        ParseErrorKind::InvalidBulkLength,
                    )?
                    else {
                        return Ok(None);
                    };
                    // Like Redis, the '$' is checked only once the whole line
                    // is in, so an over-long line reports its length first.
                    match buf.get(self.pos) {
                        Some(b'$') => {}
                        Some(&got) => return Err(ParseError::expected_bulk(got)),
                        None => return Ok(None),
                    }
                    let len = buf
                        .get(self.pos + 1..cr)
                        .and_then(string2ll)
                        .and_then(|l| usize::try_from(l).ok())
                        .filter(|&l| l <= self.limits.max_bulk_len)
                        .ok_or_else(|| ParseError::new(ParseErrorKind::InvalidBulkLength))?;
                    self.pos = cr + 2;
                    self.state = State::BulkData { len };
                }
                State::BulkData { len } => {
                    let end = self
                        .pos
                        .checked_add(len)
                        .ok_or_else(|| ParseError::new(ParseErrorKind::InvalidBulkLength))?;
                    let Some(trailer) = buf.get(end..end.saturating_add(2)) else {
                        return Ok(None);
                    };
                    if trailer != b"\r\n" {
                        return Err(ParseError::new(ParseErrorKind::MissingBulkCrlf));
                    }
                    self.args.push(self.pos..end);
                    self.pos = end + 2;
                    self.scan = self.pos;
                    self.remaining = self.remaining.saturating_sub(1);
                    if self.remaining > 0 {
                        self.state = State::BulkHeader;
                        continue;
                    }
                    let raw = buf.split_to(self.pos).freeze();
                    let args = self.args.drain(..).map(|r| raw.slice(r)).collect();
                    return Ok(Some(Request { raw, args }));
                }
                State::Inline => match self.inline(buf)? {
                    Inline::Incomplete => return Ok(None),
                    Inline::Blank(n) => self.skip(buf, n),
                    Inline::Request(req, n) => {
                        buf.advance(n.min(buf.len()));
                        return Ok(Some(req));
                    }
                },
            }
        }
    }

    /// Finds the `\r\n` ending the header line that starts at `self.pos`.
    /// Returns the offset of the `\r`, or `None` (with `scan` advanced) if the
    /// line is not complete yet.
    fn find_line_end(
        &mut self,
        buf: &[u8],
        too_big: ParseErrorKind,
        invalid: ParseErrorKind,
    ) -> Result<Option<usize>, ParseError> {
        let from = self.scan.max(self.pos);
        let found = buf
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\r'))
            .map(|i| from + i);
        let Some(cr) = found else {
            self.scan = buf.len();
            if buf.len().saturating_sub(self.pos) > MAX_HEADER_LINE {
                return Err(ParseError::new(too_big));
            }
            return Ok(None);
        };
        if cr - self.pos > MAX_HEADER_LINE {
            return Err(ParseError::new(too_big));
        }
        match buf.get(cr + 1) {
            None => {
                self.scan = cr;
                Ok(None)
            }
            Some(b'\n') => Ok(Some(cr)),
            Some(_) => Err(ParseError::new(invalid)),
        }
    }

    fn inline(&mut self, buf: &[u8]) -> Result<Inline, ParseError> {
        let max = self.limits.max_inline_len;
        let from = self.scan.max(self.pos);
        let found = buf
            .get(from..)
            .and_then(|rest| rest.iter().position(|&b| b == b'\n' || b == 0))
            .map(|i| from + i);
        let Some(nl) = found else {
            self.scan = buf.len();
            if buf.len().saturating_sub(self.pos) > max {
                return Err(ParseError::new(ParseErrorKind::InlineTooBig));
            }
            return Ok(Inline::Incomplete);
        };
        if nl - self.pos > max {
            return Err(ParseError::new(ParseErrorKind::InlineTooBig));
        }
        let mut line = buf.get(self.pos..nl).unwrap_or_default();
        match buf.get(nl) {
            Some(b'\n') => {}
            _ => return Err(ParseError::new(ParseErrorKind::InlineNul)),
        }
        if let Some(stripped) = line.strip_suffix(b"\r") {
            line = stripped;
        }
        let consumed = nl + 1;
        let mut scratch = Vec::with_capacity(line.len());
        let mut ranges = Vec::new();
        split_args(line, &mut scratch, &mut ranges)
            .map_err(|()| ParseError::new(ParseErrorKind::UnbalancedQuotes))?;
        if ranges.is_empty() {
            return Ok(Inline::Blank(consumed));
        }
        let args: Vec<&[u8]> = ranges
            .iter()
            .map(|r| scratch.get(r.clone()).unwrap_or_default())
            .collect();
        Ok(Inline::Request(Request::from_args(&args), consumed))
    }
}

impl Default for RequestParser {
    fn default() -> Self {
        RequestParser::new(ParseLimits::default())
    }
}

/// Outcome of looking for one inline line.
enum Inline {
    Incomplete,
    /// A line with no arguments, `n` bytes long with its newline.
    Blank(usize),
    /// A request and the number of input bytes its line took.
    Request(Request, usize),
}

/// Redis's `string2ll`: an optional `-`, then `0` alone or digits without a
/// leading zero, fitting in an i64. No `+`, no spaces, no `-0`.
pub fn string2ll(s: &[u8]) -> Option<i64> {
    // LONG_STR_SIZE in Redis: anything this long cannot be a valid i64.
    if s.is_empty() || s.len() >= 21 {
        return None;
    }
    if s == b"0" {
        return Some(0);
    }
    let (negative, digits) = match s.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, s),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    let mut v: u64 = 0;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    if negative {
        // -(2^63) is the one value whose magnitude does not fit in i64.
        0i64.checked_sub_unsigned(v)
    } else {
        i64::try_from(v).ok()
    }
}

/// C's `isspace` in the "C" locale, which `sdssplitargs` uses between tokens
/// and after a closing quote.
fn is_c_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

fn hex_value(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Redis's `sdssplitargs`, appending each argument's bytes to `out` and its
/// range to `ranges`. `line` holds no NUL (the caller rejects those), so
/// reading past its end as 0 gives exactly the C string's terminator
/// semantics that the lookaheads below rely on.
///
/// Quirks kept on purpose: a quote may open mid-token (`a"b c"` is `ab c`);
/// an unquoted token ends only at space, tab, CR or LF, while `\v` and `\f`
/// separate tokens but are kept inside one; an unknown escape in double quotes
/// yields the escaped byte itself.
fn split_args(line: &[u8], out: &mut Vec<u8>, ranges: &mut Vec<Range<usize>>) -> Result<(), ()> {
    let at = |i: usize| line.get(i).copied().unwrap_or(0);
    let mut p = 0;
    loop {
        while at(p) != 0 && is_c_space(at(p)) {
            p += 1;
        }
        if at(p) == 0 {
            return Ok(());
        }
        let start = out.len();
        let (mut in_double, mut in_single, mut done) = (false, false, false);
        while !done {
            let c = at(p);
            if in_double {
                let hex = (at(p + 1) == b'x')
                    .then(|| hex_value(at(p + 2)).zip(hex_value(at(p + 3))))
                    .flatten();
                match (c, hex) {
                    (b'\\', Some((hi, lo))) => {
                        out.push(hi * 16 + lo);
                        p += 3;
                    }
                    (b'\\', None) if at(p + 1) != 0 => {
                        p += 1;
                        out.push(match at(p) {
                            b'n' => b'\n',
                            b'r' => b'\r',
                            b't' => b'\t',
                            b'b' => 0x08,
                            b'a' => 0x07,
                            other => other,
                        });
                    }
                    (b'"', _) => {
                        if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                            return Err(());
                        }
                        done = true;
                    }
                    (0, _) => return Err(()),
                    _ => out.push(c),
                }
            } else if in_single {
                match c {
                    b'\\' if at(p + 1) == b'\'' => {
                        p += 1;
                        out.push(b'\'');
                    }
                    b'\'' => {
                        if at(p + 1) != 0 && !is_c_space(at(p + 1)) {
                            return Err(());
                        }
                        done = true;
                    }
                    0 => return Err(()),
                    _ => out.push(c),
                }
            } else {
                match c {
                    b' ' | b'\n' | b'\r' | b'\t' | 0 => done = true,
                    b'"' => in_double = true,
                    b'\'' => in_single = true,
                    _ => out.push(c),
                }
            }
            if at(p) != 0 {
                p += 1;
            }
        }
        ranges.push(start..out.len());
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn parser() -> RequestParser {
        RequestParser::new(ParseLimits::default())
    }

    /// Parses everything in `input` at once; stops at the first None.
    fn parse_all(input: &[u8]) -> Result<Vec<Vec<Vec<u8>>>, String> {
        let mut p = parser();
        let mut buf = BytesMut::from(input);
        let mut out = Vec::new();
        loop {
            match p.parse(&mut buf) {
                Ok(Some(r)) => out.push(r.args.iter().map(|a| a.to_vec()).collect()),
                Ok(None) => return Ok(out),
                Err(e) => return Err(e.message().to_string()),
            }
        }
    }

    fn err_of(input: &[u8]) -> String {
        parse_all(input).unwrap_err()
    }

    fn one(input: &[u8]) -> Vec<Vec<u8>> {
        let mut all = parse_all(input).unwrap();
        assert_eq!(all.len(), 1, "{all:?}");
        all.remove(0)
    }

    fn strs(args: &[&str]) -> Vec<Vec<u8>> {
        args.iter().map(|a| a.as_bytes().to_vec()).collect()
    }

    /// Feeds `input` in the given chunk sizes (cycled), collecting requests.
    fn parse_chunked(input: &[u8], chunks: &[usize]) -> Result<Vec<Request>, ParseError> {
        let mut p = parser();
        let mut buf = BytesMut::new();
        let mut out = Vec::new();
        let mut fed = 0;
        let mut i = 0;
        while fed < input.len() {
            let n = chunks
                .get(i % chunks.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            let n = n.min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            i += 1;
            while let Some(r) = p.parse(&mut buf)? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Everything a parser with small limits makes of `input` fed in the
    /// given chunk sizes: the requests, then the error if there was one.
    /// Checks on the way that every call either errs, makes progress or waits.
    fn outcome(input: &[u8], chunks: &[usize]) -> (Vec<Request>, Option<ParseError>) {
        let limits = ParseLimits {
            max_bulk_len: 64,
            max_args: 16,
            max_inline_len: 128,
        };
        let mut p = RequestParser::new(limits);
        let mut buf = BytesMut::new();
        let mut reqs = Vec::new();
        let mut fed = 0;
        let mut i = 0;
        while fed < input.len() {
            let n = chunks[i % chunks.len()].max(1).min(input.len() - fed);
            buf.extend_from_slice(&input[fed..fed + n]);
            fed += n;
            i += 1;
            loop {
                let before = buf.len();
                match p.parse(&mut buf) {
                    Err(e) => return (reqs, Some(e)),
                    Ok(None) => {
                        assert!(buf.len() <= before);
                        break;
                    }
                    Ok(Some(r)) => {
                        assert!(buf.len() < before, "a request must consume bytes");
                        assert!(!r.args.is_empty());
                        reqs.push(r);
                    }
                }
            }
        }
        (reqs, None)
    }

    #[test]
    fn multibulk_request_is_zero_copy_and_exact() {
        let input = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*1\r\n$4\r\nPING\r\n";
        let mut p = parser();
        let mut buf = BytesMut::from(&input[..]);
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n");
        assert_eq!(r.name(), b"GET");
        assert_eq!(r.arg(1).unwrap().as_ref(), b"key");
        assert!(r.arg(2).is_none());
        let raw_range = r.raw.as_ptr_range();
        for a in &r.args {
            assert!(raw_range.contains(&a.as_ptr()), "arg is not a slice of raw");
        }
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(r.name(), b"PING");
        assert!(p.parse(&mut buf).unwrap().is_none());
        assert!(buf.is_empty());
    }

    #[test]
    fn binary_and_empty_bulks() {
        assert_eq!(
            one(b"*3\r\n$3\r\nSET\r\n$0\r\n\r\n$4\r\n\r\n\0\xff\r\n"),
            vec![b"SET".to_vec(), vec![], b"\r\n\0\xff".to_vec()]
        );
    }

    #[test]
    fn incomplete_leaves_buffer_untouched() {
        let mut p = parser();
        let mut buf = BytesMut::from(&b"*2\r\n$3\r\nGET\r\n$3\r\nke"[..]);
        assert!(p.parse(&mut buf).unwrap().is_none());
        assert_eq!(buf.len(), 19);
        assert_eq!(p.wanted(), 3);
        buf.extend_from_slice(b"y\r\n");
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().args.len(), 2);
        assert_eq!(p.wanted(), 0);
    }

    #[test]
    fn error_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"*abc\r\n", "Protocol error: invalid multibulk length"),
            (b"*1048577\r\n", "Protocol error: invalid multibulk length"),
            (b"*-0\r\n", "Protocol error: invalid multibulk length"),
            (b"*01\r\n", "Protocol error: invalid multibulk length"),
            (b"*+1\r\n", "Protocol error: invalid multibulk length"),
            (b"*\r\n", "Protocol error: invalid multibulk length"),
            (
                b"*99999999999999999999\r\n",
                "Protocol error: invalid multibulk length",
            ),
            (b"*1\rX", "Protocol error: invalid multibulk length"),
            (b"*1\r\n:1\r\n", "Protocol error: expected '$', got ':'"),
            (b"*1\r\n\r\n", "Protocol error: expected '$', got ' '"),
            (
                b"*1\r\n\x80\r\n",
                "Protocol error: expected '$', got '\\x80'",
            ),
            (b"*1\r\n$abc\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$-1\r\n", "Protocol error: invalid bulk length"),
            (b"*1\r\n$\r\n", "Protocol error: invalid bulk length"),
            (
                b"*1\r\n$536870913\r\n",
                "Protocol error: invalid bulk length",
            ),
            (
                b"*1\r\n$1152921504606846976\r\n",
                "Protocol error: invalid bulk length",
            ),
            (b"*1\r\n$3\rX", "Protocol error: invalid bulk length"),
            (
                b"*1\r\n$3\r\nGETXY",
                "Protocol error: expected CRLF after bulk data",
            ),
            (b"\"abc\n", "Protocol error: unbalanced quotes in request"),
            (
                b"GET \"a\"b\n",
                "Protocol error: unbalanced quotes in request",
            ),
            (
                b"GET 'a'b\n",
                "Protocol error: unbalanced quotes in request",
            ),
            (
                b"GET 'abc\r\n",
                "Protocol error: unbalanced quotes in request",
            ),
            (
                b"GET a\0b\r\n",
                "Protocol error: NUL byte in inline request",
            ),
        ];
        for (input, want) in cases {
            assert_eq!(
                &err_of(input),
                want,
                "input {:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn display_is_the_message_and_kind_is_exposed() {
        let e = parse_chunked(b"*1\r\n$x\r\n", &[100]).unwrap_err();
        assert_eq!(e.to_string(), "Protocol error: invalid bulk length");
        assert_eq!(e.kind(), ParseErrorKind::InvalidBulkLength);
        assert_eq!(e.kind().as_str(), "invalid_bulk_length");
    }

    #[test]
    fn too_big_header_lines() {
        let mut long = b"*".to_vec();
        long.resize(1 + MAX_HEADER_LINE, b'1');
        assert_eq!(err_of(&long), "Protocol error: too big mbulk count string");
        // Exactly at the limit without a line end: still waiting.
        assert_eq!(parse_all(&long[..MAX_HEADER_LINE]).unwrap().len(), 0);
        // The same line arriving whole with its CRLF gets the same error.
        let mut whole = long.clone();
        whole.extend_from_slice(b"\r\n");
        assert_eq!(err_of(&whole), "Protocol error: too big mbulk count string");

        let mut bulk = b"*1\r\n$".to_vec();
        bulk.resize(5 + MAX_HEADER_LINE, b'1');
        assert_eq!(err_of(&bulk), "Protocol error: too big bulk count string");
        // Longer than i64 but under the cap: a plain invalid length, as in Redis.
        assert_eq!(
            err_of(b"*1\r\n$123456789012345678901234567890\r\n"),
            "Protocol error: invalid bulk length"
        );
    }

    #[test]
    fn too_big_inline() {
        let long = vec![b'a'; DEFAULT_MAX_INLINE_LEN + 1];
        assert_eq!(err_of(&long), "Protocol error: too big inline request");
        let mut whole = long.clone();
        whole.push(b'\n');
        assert_eq!(err_of(&whole), "Protocol error: too big inline request");
        let mut at_limit = vec![b'a'; DEFAULT_MAX_INLINE_LEN];
        assert!(parse_all(&at_limit).unwrap().is_empty());
        at_limit.push(b'\n');
        assert_eq!(one(&at_limit)[0].len(), DEFAULT_MAX_INLINE_LEN);
    }

    #[test]
    fn nonpositive_multibulk_counts_are_skipped() {
        assert_eq!(
            parse_all(b"*0\r\n*-1\r\n*-5\r\n*1\r\n$4\r\nPING\r\n").unwrap(),
            vec![strs(&["PING"])]
        );
        // Skipped even when the next request is still incomplete.
        let mut p = parser();
        let mut buf = BytesMut::from(&b"*-5\r\n*1\r\n$4\r\nPI"[..]);
        assert!(p.parse(&mut buf).unwrap().is_none());
        assert_eq!(&buf[..], b"*1\r\n$4\r\nPI");
        buf.extend_from_slice(b"NG\r\n");
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*1\r\n$4\r\nPING\r\n");
    }

    #[test]
    fn nested_arrays_fail_at_depth_one() {
        let input = b"*1\r\n".repeat(100_000);
        assert_eq!(err_of(&input), "Protocol error: expected '$', got '*'");
        // Also when arriving a few bytes at a time.
        let e = parse_chunked(&input, &[3, 5, 7]).unwrap_err();
        assert_eq!(e.message(), "Protocol error: expected '$', got '*'");
    }

    #[test]
    fn huge_counts_are_rejected_without_allocating() {
        assert_eq!(
            err_of(b"*1\r\n$1152921504606846976\r\n"),
            "Protocol error: invalid bulk length"
        );
        assert_eq!(
            err_of(b"*1152921504606846976\r\n"),
            "Protocol error: invalid multibulk length"
        );
        // A declared-but-unsent large count only preallocates a little.
        let mut p = parser();
        let mut buf = BytesMut::from(&b"*1048576\r\n"[..]);
        assert!(p.parse(&mut buf).unwrap().is_none());
        assert!(p.args.capacity() <= MAX_PREALLOC_ARGS);
    }

    #[test]
    fn a_huge_request_does_not_pin_memory_afterwards() {
        let args: Vec<&[u8]> = vec![b"x"; 5000];
        let mut buf = BytesMut::from(&Request::from_args(&args).raw[..]);
        let mut p = parser();
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().args.len(), 5000);
        assert!(p.args.capacity() <= MAX_PREALLOC_ARGS);
    }

    #[test]
    fn limits_are_configurable() {
        let mut p = RequestParser::new(ParseLimits {
            max_bulk_len: 3,
            max_args: 2,
            max_inline_len: 4,
        });
        let mut b = BytesMut::from(&b"*1\r\n$3\r\nabc\r\n"[..]);
        assert!(p.parse(&mut b).unwrap().is_some());
        let mut b = BytesMut::from(&b"*1\r\n$4\r\n"[..]);
        assert_eq!(
            p.parse(&mut b).unwrap_err().kind(),
            ParseErrorKind::InvalidBulkLength
        );
        let mut p = RequestParser::new(ParseLimits {
            max_bulk_len: 3,
            max_args: 2,
            max_inline_len: 4,
        });
        let mut b = BytesMut::from(&b"*3\r\n"[..]);
        assert_eq!(
            p.parse(&mut b).unwrap_err().kind(),
            ParseErrorKind::InvalidMultibulkLength
        );
        let mut p = RequestParser::new(ParseLimits {
            max_bulk_len: 3,
            max_args: 2,
            max_inline_len: 4,
        });
        let mut b = BytesMut::from(&b"abcde"[..]);
        assert_eq!(
            p.parse(&mut b).unwrap_err().kind(),
            ParseErrorKind::InlineTooBig
        );
    }

    #[test]
    fn inline_requests() {
        assert_eq!(one(b"PING\r\n"), strs(&["PING"]));
        assert_eq!(one(b"PING\n"), strs(&["PING"]));
        assert_eq!(one(b"  set  k   v \t\r\n"), strs(&["set", "k", "v"]));
        assert_eq!(
            parse_all(b"\r\n\n   \r\nPING\n").unwrap(),
            vec![strs(&["PING"])]
        );
        assert_eq!(one(b"SET k \"a b\"\n"), strs(&["SET", "k", "a b"]));
        assert_eq!(
            one(b"SET k \"\\n\\r\\t\\b\\a\\\\\\\"\\q\"\n"),
            vec![
                b"SET".to_vec(),
                b"k".to_vec(),
                b"\n\r\t\x08\x07\\\"q".to_vec()
            ]
        );
        assert_eq!(
            one(b"SET k \"\\x41\\x7a\\xff\\x4g\"\n")[2],
            b"Az\xffx4g".to_vec()
        );
        assert_eq!(
            one(b"SET k 'it\\'s \\n'\n"),
            strs(&["SET", "k", "it's \\n"])
        );
        assert_eq!(one(b"SET k ''\n"), strs(&["SET", "k", ""]));
        assert_eq!(one(b"\"\"\n"), strs(&[""]));
        assert_eq!(one(b"a\"b c\"\n"), strs(&["ab c"]));
        assert_eq!(one(b"a\x0bb\n"), vec![b"a\x0bb".to_vec()]);
        assert_eq!(one(b"\x0ba b\n"), strs(&["a", "b"]));
        assert_eq!(one(b"a\rb\r\n"), strs(&["a", "b"]));
        assert_eq!(one(b"\"a\"\tb\n"), strs(&["a", "b"]));
    }

    #[test]
    fn inline_raw_is_resp() {
        let mut p = parser();
        let mut buf = BytesMut::from(&b"SET k \"v v\"\r\nGET k\n"[..]);
        let r = p.parse(&mut buf).unwrap().unwrap();
        assert_eq!(&r.raw[..], b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$3\r\nv v\r\n");
        let raw_range = r.raw.as_ptr_range();
        assert!(r.args.iter().all(|a| raw_range.contains(&a.as_ptr())));
        assert_eq!(p.parse(&mut buf).unwrap().unwrap().name(), b"GET");
        assert!(buf.is_empty());
    }

    #[test]
    fn from_args_encodes_multibulk() {
        let r = Request::from_args(&[b"GET", b"k\r\n"]);
        assert_eq!(&r.raw[..], b"*2\r\n$3\r\nGET\r\n$3\r\nk\r\n\r\n");
        assert_eq!(
            r.args,
            vec![Bytes::from_static(b"GET"), Bytes::from_static(b"k\r\n")]
        );
        assert_eq!(Request::from_args(&[]).name(), b"");
        assert_eq!(&Request::from_args(&[]).raw[..], b"*0\r\n");
    }

    #[test]
    fn string2ll_matches_redis() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"-0",
            b"00",
            b"01",
            b"+1",
            b" 1",
            b"1 ",
            b"9223372036854775808",
            b"1a",
        ] {
            assert_eq!(string2ll(bad), None, "{:?}", bad);
        }
    }

    #[test]
    fn every_split_point_gives_the_same_requests() {
        let input: &[u8] = b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n*0\r\nPING\r\n\r\n*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\na\r\nbc\r\nSET \"x y\" 'z'\n";
        let whole = parse_chunked(input, &[input.len()]).unwrap();
        assert_eq!(whole.len(), 4);
        for a in 1..input.len() {
            for b in a..input.len() {
                let mut p = parser();
                let mut buf = BytesMut::new();
                let mut got = Vec::new();
                for piece in [&input[..a], &input[a..b], &input[b..]] {
                    buf.extend_from_slice(piece);
                    while let Some(r) = p.parse(&mut buf).unwrap() {
                        got.push(r);
                    }
                }
                assert_eq!(got, whole, "split at {a}, {b}");
            }
        }
    }

    #[test]
    fn large_requests_in_small_chunks_are_linear() {
        // 1M arguments in 4 KB reads: each byte is scanned a bounded number
        // of times, so this finishes quickly even in debug builds.
        let n = 1_048_576;
        let mut input = format!("*{n}\r\n").into_bytes();
        for _ in 0..n {
            input.extend_from_slice(b"$1\r\nx\r\n");
        }
        let reqs = parse_chunked(&input, &[4096]).unwrap();
        assert_eq!(reqs.len(), 1);
        assert_eq!(reqs[0].args.len(), n);

        // A 64 MB bulk in 64 KB reads: a constant-time check per read.
        let len = 64 * 1024 * 1024;
        let mut input = format!("*1\r\n${len}\r\n").into_bytes();
        input.resize(input.len() + len, b'v');
        input.extend_from_slice(b"\r\n");
        let mut p = parser();
        let mut buf = BytesMut::new();
        let mut got = None;
        for chunk in input.chunks(64 * 1024) {
            buf.extend_from_slice(chunk);
            if let Some(r) = p.parse(&mut buf).unwrap() {
                got = Some(r);
            } else {
                assert!(p.wanted() > 0);
            }
        }
        assert_eq!(got.unwrap().args[0].len(), len);
    }

    fn arg_strategy() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..20),
            proptest::collection::vec(
                prop_oneof![Just(b'\r'), Just(b'\n'), Just(b'*'), Just(b'$')],
                0..6
            ),
        ]
    }

    /// A request in one of the encodings clients use, with the arguments it
    /// should parse to (None for the silently skipped forms).
    fn encoded_request() -> impl Strategy<Value = (Vec<u8>, Option<Vec<Vec<u8>>>)> {
        prop_oneof![
            8 => proptest::collection::vec(arg_strategy(), 1..6).prop_map(|args| {
                let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
                (Request::from_args(&refs).raw.to_vec(), Some(args))
            }),
            2 => proptest::collection::vec("[a-zA-Z0-9:_]{1,8}", 1..5).prop_map(|words| {
                let line = format!("{}\r\n", words.join(" "));
                (line.into_bytes(), Some(words.into_iter().map(String::into_bytes).collect()))
            }),
            1 => prop_oneof![Just(&b"*0\r\n"[..]), Just(&b"*-1\r\n"[..]), Just(&b"\r\n"[..]), Just(&b"  \n"[..])]
                .prop_map(|s| (s.to_vec(), None)),
        ]
    }

    proptest! {
        #[test]
        fn pipelines_parse_identically_in_any_chunking(
            reqs in proptest::collection::vec(encoded_request(), 1..12),
            chunks in proptest::collection::vec(1usize..40, 1..20),
        ) {
            let input: Vec<u8> = reqs.iter().flat_map(|(bytes, _)| bytes.clone()).collect();
            let want: Vec<Vec<Vec<u8>>> = reqs.iter().filter_map(|(_, args)| args.clone()).collect();
            let got = parse_chunked(&input, &chunks).unwrap();
            let got_args: Vec<Vec<Vec<u8>>> =
                got.iter().map(|r| r.args.iter().map(|a| a.to_vec()).collect()).collect();
            prop_assert_eq!(&got_args, &want);
            let whole = parse_chunked(&input, &[input.len()]).unwrap();
            prop_assert_eq!(got, whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_ignore_chunking(
            data in proptest::collection::vec(any::<u8>(), 0..512),
            chunks in proptest::collection::vec(1usize..64, 1..8),
        ) {
            let whole = outcome(&data, &[data.len()]);
            prop_assert_eq!(outcome(&data, &chunks), whole);
        }

        #[test]
        fn resp_like_garbage_never_panics_and_ignores_chunking(
            data in proptest::collection::vec(
                prop_oneof![
                    3 => proptest::sample::select(b"*$\r\n-0123 \"'\\x".to_vec()),
                    1 => any::<u8>(),
                ],
                0..256,
            ),
            star in any::<bool>(),
            chunks in proptest::collection::vec(1usize..16, 1..8),
        ) {
            let mut input = if star { b"*".to_vec() } else { Vec::new() };
            input.extend_from_slice(&data);
            let whole = outcome(&input, &[input.len()]);
            prop_assert_eq!(outcome(&input, &chunks), whole);
        }
    }
}
