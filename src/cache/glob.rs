//! Redis-compatible glob matching for rule patterns.
//!
//! Rules select keys with the same globs users already write for `KEYS` and
//! `SCAN … MATCH`, so the matcher must agree with Redis's `stringmatchlen`
//! (util.c, 7.0) byte for byte, quirks included. No glob crate does: they
//! read `[!a]` as negation, reject reversed ranges and expand `{a,b}`. The
//! quirks this module reproduces on purpose, each checked against a real
//! redis-server by `tests/glob_redis.rs`:
//!
//! - An empty string matches only the empty pattern, so even `*` does not
//!   match the empty key. (`KEYS *` and `SCAN` still return it because they
//!   skip matching when the pattern is exactly `*`; [`Glob::matches`] copies
//!   that shortcut, [`redis_match`] does not.)
//! - Inside `[…]`: `^` first negates; `x-y` is a range and a reversed range
//!   `z-a` is swapped; `\x` is `x`; `]` first closes an empty class, so `[]`
//!   matches nothing and `[^]` any byte. A `-` needs only two bytes after its
//!   start, so in `[a-]` the `]` is the range's end and the class stays open.
//! - Ranges compare C `char`s, which are signed on x86-64: `[a-\xff]` is the
//!   range −1..=97 and does not contain `\xe9`.
//! - With `nocase`, range ends are lowercased after the swap (so `[Z-a]` is
//!   empty) and escaped bytes in a class still compare case-sensitively.
//! - A `[` that is never closed turns the rest of the pattern into its class
//!   and still matches one byte; a lone `[` at the end matches nothing.
//! - A trailing `\` is a literal backslash.
//! - Redis stops recursing at 1000 nested stars, so a pattern with more than
//!   1000 star groups before its last non-star byte never matches.
//!
//! Redis matches by recursive backtracking with a pruning flag. That has a
//! history of denial-of-service bugs (CVE-2022-36021), so tierd compiles the
//! pattern instead: every element other than `*` matches exactly one byte,
//! which makes the pattern a run of fixed-length segments between stars. The
//! first segment is anchored at the start, the last at the end, and each
//! middle segment can be placed at its earliest occurrence: an earlier place
//! only leaves the next star more room. That is O(pattern × key) time,
//! constant extra memory and no recursion, and it finds the same match
//! Redis's search finds first (each star as short as possible, left to
//! right), which is the match [`Glob::captures`] reports.

use std::fmt;

/// Longest rule pattern [`Glob::new`] accepts, in bytes. Rules are written
/// by people; anything longer is a mistake, and the bound keeps the cost of
/// a match small and predictable.
pub const MAX_PATTERN_LEN: usize = 1024;

/// Redis's `nesting` limit in `stringmatchlen`: the recursion for star
/// group 1001 returns "no match" at once.
const MAX_STAR_NESTING: usize = 1000;

/// Why a rule pattern was rejected. Each message names the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GlobError {
    /// The pattern is longer than [`MAX_PATTERN_LEN`].
    #[error("pattern is {len} bytes; the limit is {MAX_PATTERN_LEN}")]
    TooLong {
        /// The pattern's length in bytes.
        len: usize,
    },
    /// `{}` with nothing inside.
    #[error("empty capture `{{}}` at byte {at}: give it a name like `{{id}}`, or write a literal brace as `\\{{`")]
    EmptyCaptureName {
        /// Byte offset of the `{`.
        at: usize,
    },
    /// The same capture name used twice.
    #[error("capture `{{{name}}}` appears twice; capture names must be unique")]
    DuplicateCaptureName {
        /// The repeated name.
        name: String,
    },
    /// A capture name with a byte outside `[A-Za-z0-9_]`.
    #[error("capture name `{name}` at byte {at} may only use letters, digits and `_`; write a literal brace as `\\{{`")]
    InvalidCaptureName {
        /// The name as written.
        name: String,
        /// Byte offset of the `{`.
        at: usize,
    },
    /// A `{` without its `}`, or a `}` without its `{`.
    #[error("unbalanced `{brace}` at byte {at}; write a literal brace as `\\{brace}`")]
    Unbalanced {
        /// The offending brace.
        brace: char,
        /// Its byte offset.
        at: usize,
    },
}

/// Plain Redis `stringmatchlen` over bytes, with no captures: whether
/// `string` matches the glob `pattern`, exactly as Redis 7.0 decides it (see
/// the module docs for the quirks). `nocase` lowercases ASCII letters, as
/// Redis's `tolower` does in the C locale.
///
/// Runs in O(`pattern` × `string`) time whatever the input.
pub fn redis_match(pattern: &[u8], string: &[u8], nocase: bool) -> bool {
    compile_plain(pattern, nocase).run(string, None)
}

/// Compiles a plain Redis glob (no captures).
fn compile_plain(pattern: &[u8], nocase: bool) -> Program {
    let mut program = Program::default();
    let mut i = 0;
    while let Some(&b) = pattern.get(i) {
        i = if b == b'*' {
            program.star(None);
            skip_stars(pattern, i)
        } else {
            compile_atom(pattern, i, nocase, &mut program)
        };
    }
    program.finish(pattern.is_empty());
    program
}

/// A client's glob (`KEYS`, `CACHE.KEYS`, `CACHE.INVALIDATE PATTERN`, a
/// pattern on the invalidation bus), compiled once and matched exactly as
/// Redis's `KEYS` matches it ([`redis_match`]). Compiling costs about 48
/// bytes per pattern byte, so callers cap the pattern's length
/// ([`MAX_PATTERN_LEN`]) before compiling one that a client sent.
#[derive(Clone)]
pub struct KeyPattern {
    program: Program,
}

impl std::fmt::Debug for KeyPattern {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPattern").finish_non_exhaustive()
    }
}

impl KeyPattern {
    /// Compiles `pattern`.
    pub fn new(pattern: &[u8]) -> KeyPattern {
        let mut program = compile_plain(pattern, false);
        // `KEYS *` and `SCAN … MATCH *` skip matching, so `*` takes the
        // empty key too, which `stringmatchlen` alone would not.
        program.match_all = pattern == b"*";
        KeyPattern { program }
    }

    /// Whether `key` matches, as Redis's `KEYS` decides it.
    pub fn matches(&self, key: &[u8]) -> bool {
        self.program.run(key, None)
    }
}

/// A compiled rule pattern: a Redis glob plus tierd's named captures `{name}`.
///
/// Outside a `[…]` class, `{name}` matches like `*` and remembers what it
/// matched; a literal brace is written `\{` or `\}`. Inside a class braces
/// are ordinary bytes, as they are to Redis. Names use `[A-Za-z0-9_]`.
#[derive(Clone)]
pub struct Glob {
    pattern: String,
    redis: String,
    names: Vec<String>,
    program: Program,
}

impl Glob {
    /// Compiles `pattern`.
    ///
    /// # Errors
    ///
    /// [`GlobError::TooLong`] past [`MAX_PATTERN_LEN`] bytes;
    /// [`GlobError::EmptyCaptureName`], [`GlobError::InvalidCaptureName`] or
    /// [`GlobError::DuplicateCaptureName`] for a bad `{name}`; and
    /// [`GlobError::Unbalanced`] for a `{` or `}` that is not part of a
    /// capture (a literal brace must be escaped, `\{`).
    pub fn new(pattern: &str) -> Result<Glob, GlobError> {
        let bytes = pattern.as_bytes();
        if bytes.len() > MAX_PATTERN_LEN {
            return Err(GlobError::TooLong { len: bytes.len() });
        }
        let mut program = Program::default();
        let mut names: Vec<String> = Vec::new();
        let mut redis = String::with_capacity(pattern.len());
        // Start of the pattern text not yet copied into `redis`.
        let mut copied = 0;
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'*' => {
                    program.star(None);
                    i = skip_stars(bytes, i);
                }
                b'{' => {
                    let (name, end) = capture_name(pattern, i)?;
                    if names.iter().any(|n| n == name) {
                        return Err(GlobError::DuplicateCaptureName {
                            name: name.to_owned(),
                        });
                    }
                    program.star(Some(names.len()));
                    names.push(name.to_owned());
                    redis.push_str(pattern.get(copied..i).unwrap_or_default());
                    redis.push('*');
                    copied = end;
                    i = end;
                }
                b'}' => return Err(GlobError::Unbalanced { brace: '}', at: i }),
                _ => i = compile_atom(bytes, i, false, &mut program),
            }
        }
        redis.push_str(pattern.get(copied..).unwrap_or_default());
        program.finish(redis.is_empty());
        // KEYS and SCAN skip matching altogether for exactly `*`, so they
        // return the empty key that stringmatchlen itself would refuse.
        program.match_all = redis == "*";
        Ok(Glob {
            pattern: pattern.to_owned(),
            redis,
            names,
            program,
        })
    }

    /// The capture names, in pattern order.
    pub fn capture_names(&self) -> impl Iterator<Item = &str> {
        self.names.iter().map(String::as_str)
    }

    /// The pattern as written, captures and all.
    pub fn pattern(&self) -> &str {
        &self.pattern
    }

    /// Whether `key` matches (a capture matches like `*`). This is exactly
    /// the set of keys `SCAN … MATCH` [`Glob::redis_pattern`] returns.
    pub fn matches(&self, key: &[u8]) -> bool {
        self.program.run(key, None)
    }

    /// Like [`Glob::matches`], returning the captured bytes by name, in
    /// pattern order. Every wildcard, left to right, takes the shortest span
    /// that still lets the rest of the pattern match (Redis's own search
    /// order), so `sessions:teacher:{teacher}:*` on `sessions:teacher:12:3:x`
    /// captures `12`.
    pub fn captures<'k>(&self, key: &'k [u8]) -> Option<Vec<(&str, &'k [u8])>> {
        let mut spans = Vec::with_capacity(self.program.stars.len());
        if !self.program.run(key, Some(&mut spans)) {
            return None;
        }
        let mut out = Vec::with_capacity(self.names.len());
        for (slot, (start, end)) in self.program.stars.iter().zip(spans) {
            if let Some(name) = slot.and_then(|s| self.names.get(s)) {
                out.push((name.as_str(), key.get(start..end)?));
            }
        }
        Some(out)
    }

    /// The pattern as a plain Redis glob (each capture becomes `*`), e.g.
    /// for `SCAN … MATCH`. Redis selects the same keys as [`Glob::matches`].
    pub fn redis_pattern(&self) -> String {
        self.redis.clone()
    }

    /// The literal bytes every matching key starts with: the pattern up to
    /// its first `*`, `?`, `[` or capture, with `\` escapes resolved. This is
    /// what `CLIENT TRACKING … BCAST PREFIX` needs.
    pub fn literal_prefix(&self) -> Vec<u8> {
        self.program
            .head()
            .iter()
            .map_while(|atom| match atom {
                Atom::Byte(b) => Some(*b),
                Atom::Any | Atom::Set(_) => None,
            })
            .collect()
    }
}

impl fmt::Debug for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Glob").field(&self.pattern).finish()
    }
}

impl fmt::Display for Glob {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.pattern)
    }
}

// Two globs are equal when they were written the same: the compiled program,
// the Redis form and the capture names are all derived from the text. This is
// what lets the validated `Config`, which holds rule patterns, derive `Eq`.
impl PartialEq for Glob {
    fn eq(&self, other: &Self) -> bool {
        self.pattern() == other.pattern()
    }
}

impl Eq for Glob {}

/// Index just past the run of `*` starting at `i`; Redis collapses a run
/// into one star.
fn skip_stars(pattern: &[u8], mut i: usize) -> usize {
    while pattern.get(i) == Some(&b'*') {
        i += 1;
    }
    i
}

/// Parses the capture whose `{` is at `open`; returns its name and the index
/// just past the `}`.
fn capture_name(pattern: &str, open: usize) -> Result<(&str, usize), GlobError> {
    let bytes = pattern.as_bytes();
    let mut i = open + 1;
    loop {
        match bytes.get(i) {
            None | Some(b'{') => {
                return Err(GlobError::Unbalanced {
                    brace: '{',
                    at: open,
                })
            }
            Some(b'}') => break,
            Some(_) => i += 1,
        }
    }
    let name = pattern.get(open + 1..i).unwrap_or_default();
    if name.is_empty() {
        return Err(GlobError::EmptyCaptureName { at: open });
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(GlobError::InvalidCaptureName {
            name: name.to_owned(),
            at: open,
        });
    }
    Ok((name, i + 1))
}

/// Compiles the one-byte element (`?`, `[…]`, `\x` or a literal) starting at
/// `i`, following stringmatchlen's parse exactly, and returns the index just
/// past it. The parse never depends on the string being matched, which is
/// what lets the pattern be compiled once.
fn compile_atom(pattern: &[u8], i: usize, nocase: bool, program: &mut Program) -> usize {
    let (atom, next) = match pattern.get(i) {
        Some(b'?') => (Atom::Any, i + 1),
        Some(b'[') => {
            let (set, next) = compile_class(pattern, i + 1, nocase);
            (Atom::Set(set), next)
        }
        // `\x` is `x`; a trailing `\` is itself.
        Some(b'\\') => match pattern.get(i + 1) {
            Some(&b) => (literal(b, nocase), i + 2),
            None => (literal(b'\\', nocase), i + 1),
        },
        Some(&b) => (literal(b, nocase), i + 1),
        // Unreachable from the callers, which only pass an index in range;
        // consuming the position keeps any loop moving regardless.
        None => return i + 1,
    };
    program.atoms.push(atom);
    next
}

/// Compiles a class whose body starts at `i` (just past the `[`) into the
/// set of bytes it matches; returns the set and the index just past the
/// class. A class that never closes runs to the end of the pattern.
fn compile_class(pattern: &[u8], mut i: usize, nocase: bool) -> (ByteSet, usize) {
    let negate = pattern.get(i) == Some(&b'^');
    if negate {
        i += 1;
    }
    let mut set = ByteSet::default();
    let next = loop {
        let remaining = pattern.len().saturating_sub(i);
        match pattern.get(i) {
            // The order of these tests is Redis's, and it matters: an escape
            // wins over `]`, and a range needs only its three bytes, so
            // `[a-]` takes the `]` as the range's end.
            Some(b'\\') if remaining >= 2 => {
                // Escaped bytes compare case-sensitively even with nocase.
                if let Some(&b) = pattern.get(i + 1) {
                    set.insert(b);
                }
                i += 2;
            }
            Some(b']') => break i + 1,
            None => break i,
            Some(&start) if remaining >= 3 && pattern.get(i + 1) == Some(&b'-') => {
                let end = pattern.get(i + 2).copied().unwrap_or(start);
                set.insert_range(start, end, nocase);
                i += 3;
            }
            Some(&b) => {
                set.union(&literal_set(b, nocase));
                i += 1;
            }
        }
    };
    if negate {
        set.negate();
    }
    (set, next)
}

/// The atom for a literal byte: exact, or both ASCII cases under nocase.
fn literal(b: u8, nocase: bool) -> Atom {
    if nocase && b.is_ascii_alphabetic() {
        Atom::Set(literal_set(b, true))
    } else {
        Atom::Byte(b)
    }
}

fn literal_set(b: u8, nocase: bool) -> ByteSet {
    let mut set = ByteSet::default();
    set.insert(b);
    if nocase {
        set.insert(b.to_ascii_lowercase());
        set.insert(b.to_ascii_uppercase());
    }
    set
}

/// C's `tolower` in the C locale, on a C `char` value.
fn c_tolower(c: i32) -> i32 {
    if (i32::from(b'A')..=i32::from(b'Z')).contains(&c) {
        c + 32
    } else {
        c
    }
}

/// A byte as Redis's ranges see it: a signed `char` on x86-64.
fn c_char(b: u8) -> i32 {
    i32::from(b as i8)
}

/// A set of bytes, one bit each.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct ByteSet {
    low: u128,
    high: u128,
}

impl ByteSet {
    fn insert(&mut self, b: u8) {
        if b < 128 {
            self.low |= 1 << b;
        } else {
            self.high |= 1 << (b - 128);
        }
    }

    fn contains(&self, b: u8) -> bool {
        if b < 128 {
            (self.low >> b) & 1 == 1
        } else {
            (self.high >> (b - 128)) & 1 == 1
        }
    }

    fn union(&mut self, other: &ByteSet) {
        self.low |= other.low;
        self.high |= other.high;
    }

    fn negate(&mut self) {
        self.low = !self.low;
        self.high = !self.high;
    }

    /// Redis's range test: swap reversed ends, then (nocase) lowercase the
    /// ends and the byte, then compare as signed chars.
    fn insert_range(&mut self, start: u8, end: u8, nocase: bool) {
        let (mut lo, mut hi) = (c_char(start), c_char(end));
        if lo > hi {
            std::mem::swap(&mut lo, &mut hi);
        }
        if nocase {
            lo = c_tolower(lo);
            hi = c_tolower(hi);
        }
        for b in 0..=u8::MAX {
            let c = if nocase {
                c_tolower(c_char(b))
            } else {
                c_char(b)
            };
            if (lo..=hi).contains(&c) {
                self.insert(b);
            }
        }
    }
}

impl fmt::Debug for ByteSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let members = (0..=u8::MAX).filter(|&b| self.contains(b));
        f.debug_set().entries(members).finish()
    }
}

/// One pattern element that matches exactly one byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Atom {
    Byte(u8),
    Any,
    Set(ByteSet),
}

impl Atom {
    fn matches(&self, b: u8) -> bool {
        match self {
            Atom::Byte(x) => *x == b,
            Atom::Any => true,
            Atom::Set(set) => set.contains(b),
        }
    }
}

/// A compiled pattern: fixed-length segments of atoms with one star (a plain
/// `*` run or a capture) between each pair of neighbours.
#[derive(Debug, Clone, Default)]
struct Program {
    atoms: Vec<Atom>,
    /// End (in `atoms`) of every segment but the last, which ends at
    /// `atoms.len()`; so there are `seg_ends.len()` stars.
    seg_ends: Vec<usize>,
    /// For each star, the capture slot it fills, if it is a capture.
    stars: Vec<Option<usize>>,
    /// The pattern has no bytes at all (the only one an empty key matches).
    empty_pattern: bool,
    /// More than Redis's nesting limit of star groups precede the last
    /// segment, so Redis never matches.
    too_deep: bool,
    /// The pattern is exactly `*` and matches every key, even the empty one.
    match_all: bool,
}

impl Program {
    fn star(&mut self, capture: Option<usize>) {
        self.seg_ends.push(self.atoms.len());
        self.stars.push(capture);
    }

    fn finish(&mut self, empty_pattern: bool) {
        self.empty_pattern = empty_pattern;
        // A trailing star group returns "match" before recursing, so only
        // the groups before the last segment count towards the limit.
        let trailing = usize::from(self.tail().is_empty() && !self.stars.is_empty());
        self.too_deep = self.stars.len() - trailing > MAX_STAR_NESTING;
    }

    fn segment(&self, k: usize) -> &[Atom] {
        let start = match k.checked_sub(1) {
            Some(prev) => self.seg_ends.get(prev).copied().unwrap_or(0),
            None => 0,
        };
        let end = self.seg_ends.get(k).copied().unwrap_or(self.atoms.len());
        self.atoms.get(start..end).unwrap_or_default()
    }

    fn head(&self) -> &[Atom] {
        self.segment(0)
    }

    fn tail(&self) -> &[Atom] {
        self.segment(self.stars.len())
    }

    /// Matches `s`; with `spans`, pushes each star's `(start, end)` in `s`.
    fn run(&self, s: &[u8], mut spans: Option<&mut Vec<(usize, usize)>>) -> bool {
        if self.match_all {
            if let Some(spans) = spans {
                spans.push((0, s.len()));
            }
            return true;
        }
        if s.is_empty() {
            return self.empty_pattern;
        }
        if self.too_deep {
            return false;
        }
        let head = self.head();
        if self.stars.is_empty() {
            return fits(head, s);
        }
        let tail = self.tail();
        let Some(end) = s.len().checked_sub(tail.len()) else {
            return false;
        };
        if end < head.len()
            || !s.get(..head.len()).is_some_and(|w| fits(head, w))
            || !s.get(end..).is_some_and(|w| fits(tail, w))
        {
            return false;
        }
        let mut pos = head.len();
        for k in 1..self.stars.len() {
            let seg = self.segment(k);
            let Some(last_start) = end.checked_sub(seg.len()) else {
                return false;
            };
            let found =
                (pos..=last_start).find(|&i| s.get(i..i + seg.len()).is_some_and(|w| fits(seg, w)));
            let Some(at) = found else {
                return false;
            };
            if let Some(spans) = spans.as_deref_mut() {
                spans.push((pos, at));
            }
            pos = at + seg.len();
        }
        if let Some(spans) = spans {
            spans.push((pos, end));
        }
        true
    }
}

/// Whether the atoms match `window`, which must be exactly as long.
fn fits(atoms: &[Atom], window: &[u8]) -> bool {
    atoms.len() == window.len() && atoms.iter().zip(window).all(|(a, &b)| a.matches(b))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A direct port of Redis 7.0's recursive `stringmatchlen_impl`,
    /// `skipLongerMatches` and `nesting` included, as the reference. Reads
    /// one past the end see the C string's NUL terminator, as in Redis.
    fn reference(pattern: &[u8], string: &[u8], nocase: bool) -> bool {
        let mut skip_longer = false;
        reference_impl(pattern, string, nocase, &mut skip_longer, 0)
    }

    fn reference_impl(
        pat: &[u8],
        st: &[u8],
        nocase: bool,
        skip_longer: &mut bool,
        nesting: usize,
    ) -> bool {
        if nesting > 1000 {
            return false;
        }
        let p_at = |i: usize| pat.get(i).copied().unwrap_or(0);
        let s_at = |i: usize| st.get(i).copied().unwrap_or(0);
        let lower = |c: u8| i32::from(c.to_ascii_lowercase());
        let (mut p, mut s) = (0usize, 0usize);
        while p < pat.len() && s < st.len() {
            match p_at(p) {
                b'*' => {
                    while p < pat.len() && p_at(p + 1) == b'*' {
                        p += 1;
                    }
                    if pat.len() - p == 1 {
                        return true;
                    }
                    while s < st.len() {
                        if reference_impl(&pat[p + 1..], &st[s..], nocase, skip_longer, nesting + 1)
                        {
                            return true;
                        }
                        if *skip_longer {
                            return false;
                        }
                        s += 1;
                    }
                    *skip_longer = true;
                    return false;
                }
                b'?' => s += 1,
                b'[' => {
                    p += 1;
                    let not = p_at(p) == b'^';
                    if not {
                        p += 1;
                    }
                    let mut matched = false;
                    loop {
                        let remaining = pat.len() - p;
                        if p_at(p) == b'\\' && remaining >= 2 {
                            p += 1;
                            if p_at(p) == s_at(s) {
                                matched = true;
                            }
                        } else if p_at(p) == b']' {
                            break;
                        } else if remaining == 0 {
                            p -= 1;
                            break;
                        } else if remaining >= 3 && p_at(p + 1) == b'-' {
                            let mut start = i32::from(p_at(p) as i8);
                            let mut end = i32::from(p_at(p + 2) as i8);
                            let mut c = i32::from(s_at(s) as i8);
                            if start > end {
                                std::mem::swap(&mut start, &mut end);
                            }
                            if nocase {
                                start = c_tolower(start);
                                end = c_tolower(end);
                                c = c_tolower(c);
                            }
                            p += 2;
                            if (start..=end).contains(&c) {
                                matched = true;
                            }
                        } else if !nocase {
                            if p_at(p) == s_at(s) {
                                matched = true;
                            }
                        } else if lower(p_at(p)) == lower(s_at(s)) {
                            matched = true;
                        }
                        p += 1;
                    }
                    if not {
                        matched = !matched;
                    }
                    if !matched {
                        return false;
                    }
                    s += 1;
                }
                first => {
                    if first == b'\\' && pat.len() - p >= 2 {
                        p += 1;
                    }
                    let equal = if nocase {
                        lower(p_at(p)) == lower(s_at(s))
                    } else {
                        p_at(p) == s_at(s)
                    };
                    if !equal {
                        return false;
                    }
                    s += 1;
                }
            }
            p += 1;
            if s == st.len() {
                while p_at(p) == b'*' {
                    p += 1;
                }
                break;
            }
        }
        p == pat.len() && s == st.len()
    }

    /// Asserts the matcher, and the reference, give `want`.
    #[track_caller]
    fn check(pattern: &[u8], string: &[u8], nocase: bool, want: bool) {
        let show = |b: &[u8]| String::from_utf8_lossy(b).escape_debug().to_string();
        assert_eq!(
            reference(pattern, string, nocase),
            want,
            "reference: {:?} on {:?} (nocase {nocase})",
            show(pattern),
            show(string)
        );
        assert_eq!(
            redis_match(pattern, string, nocase),
            want,
            "redis_match: {:?} on {:?} (nocase {nocase})",
            show(pattern),
            show(string)
        );
    }

    fn yes(pattern: &[u8], string: &[u8]) {
        check(pattern, string, false, true);
    }

    fn no(pattern: &[u8], string: &[u8]) {
        check(pattern, string, false, false);
    }

    #[test]
    fn literals_and_question_marks() {
        yes(b"abc", b"abc");
        no(b"abc", b"abd");
        no(b"abc", b"ab");
        no(b"abc", b"abcd");
        yes(b"", b"");
        no(b"", b"a");
        yes(b"a?c", b"abc");
        no(b"a?c", b"ac");
        yes(b"???", b"x\0y");
        no(b"?", b"");
    }

    #[test]
    fn stars_collapse_and_match_any_run() {
        yes(b"a*", b"a");
        yes(b"a*", b"abc");
        yes(b"*c", b"abc");
        no(b"*c", b"cab");
        yes(b"a***b", b"ab");
        yes(b"a**b", b"axxxb");
        yes(b"*a*b*", b"xaxbx");
        no(b"*a*b*", b"xbxax");
        yes(b"**", b"x");
        yes(b"a*b*c", b"abbbc");
        no(b"a*b*c", b"abbb");
    }

    #[test]
    fn the_empty_string_matches_only_the_empty_pattern() {
        // stringmatchlen's loop needs a byte to look at, so even `*` fails;
        // KEYS * only returns the empty key through its own shortcut.
        no(b"*", b"");
        no(b"**", b"");
        yes(b"", b"");
        // Once at least one byte was consumed, trailing stars are fine.
        yes(b"a*", b"a");
        yes(b"a**", b"a");
    }

    #[test]
    fn classes_negation_and_ranges() {
        yes(b"[abc]", b"b");
        no(b"[abc]", b"d");
        no(b"[abc]", b"ab");
        yes(b"[^abc]", b"d");
        no(b"[^abc]", b"a");
        yes(b"x[a-c]y", b"xby");
        no(b"x[a-c]y", b"xdy");
        // Reversed ranges are swapped, not empty.
        yes(b"[c-a]", b"b");
        yes(b"[c-a]", b"a");
        no(b"[c-a]", b"d");
        yes(b"[^c-a]", b"d");
        yes(b"[--a]", b"-");
        // An escaped `-` is not a range.
        yes(b"[a\\-c]", b"-");
        no(b"[a\\-c]", b"b");
    }

    #[test]
    fn escapes_outside_and_inside_classes() {
        yes(b"\\*", b"*");
        no(b"\\*", b"a");
        yes(b"a\\?", b"a?");
        no(b"a\\?", b"ab");
        yes(b"\\[a]", b"[a]");
        yes(b"\\a", b"a");
        // `[\]]` is a class holding `]`.
        yes(b"[\\]]", b"]");
        no(b"[\\]]", b"\\");
        yes(b"[\\^]", b"^");
        no(b"[\\^]", b"a");
    }

    #[test]
    fn a_trailing_backslash_is_literal() {
        yes(b"a\\", b"a\\");
        no(b"a\\", b"a");
        yes(b"\\", b"\\");
        // In a class too: `[\` holds the backslash.
        yes(b"[\\", b"\\");
        no(b"[\\", b"a");
    }

    #[test]
    fn dash_before_the_closing_bracket_eats_it() {
        // `[a-]` is the range `]`..=`a` (swapped), and the class is still
        // open, so it runs to the end of the pattern.
        yes(b"[a-]", b"a");
        yes(b"[a-]", b"]");
        yes(b"[a-]", b"^");
        yes(b"[a-]", b"`");
        no(b"[a-]", b"-");
        no(b"[a-]", b"b");
        // The `x` after it is a class member, not a second element.
        yes(b"[a-]x", b"x");
        no(b"[a-]x", b"ax");
        // With one byte before the end there is no room for a range.
        yes(b"[a-", b"-");
        yes(b"[a-", b"a");
        no(b"[a-", b"b");
    }

    #[test]
    fn unclosed_and_empty_classes() {
        // An unclosed class takes the rest of the pattern and matches one byte.
        yes(b"[ab", b"a");
        yes(b"[ab*", b"*");
        no(b"[ab*", b"ab");
        no(b"[ab", b"[");
        yes(b"x[ab", b"xb");
        // A lone `[` at the end is an empty class.
        no(b"[", b"[");
        no(b"x[", b"x");
        no(b"x[", b"x[");
        // `[^` at the end is a negated empty class: any one byte.
        yes(b"[^", b"z");
        no(b"[^", b"zz");
        // `]` first closes at once: `[]` matches nothing, `[^]` anything.
        no(b"[]", b"]");
        no(b"[]]", b"]");
        no(b"[]a]", b"a]");
        yes(b"[^]", b"q");
        yes(b"[^]]", b"a]");
        no(b"[^]]", b"a");
    }

    #[test]
    fn nocase_follows_c_tolower() {
        check(b"AbC", b"aBc", true, true);
        check(b"AbC", b"aBc", false, false);
        check(b"[A-C]", b"b", true, true);
        check(b"[a-c]", b"B", true, true);
        check(b"[^A-C]", b"b", true, false);
        // Ends are lowercased after the swap: `Z`..`a` becomes `z`..`a`,
        // an empty range, though without nocase it holds `[\]^_` and more.
        check(b"[Z-a]", b"_", false, true);
        check(b"[Z-a]", b"_", true, false);
        check(b"[Z-a]", b"z", true, false);
        // Escaped class members compare case-sensitively even so.
        check(b"[\\A]", b"a", true, false);
        check(b"[\\A]", b"A", true, true);
        check(b"\\A", b"a", true, true);
        // tolower is ASCII only.
        check(b"\xc9", b"\xe9", true, false);
    }

    #[test]
    fn ranges_compare_signed_chars() {
        // 0xe9 is -23 as a signed char: inside 0xe0..=0xf0 (-32..=-16).
        yes(b"[\xe0-\xf0]", b"\xe9");
        // `a`..0xff is 97..=-1, swapped to -1..=97: it holds 0xff, NUL and
        // `A`, but not 0xe9 and not `b`.
        yes(b"[a-\xff]", b"\xff");
        yes(b"[a-\xff]", b"\0");
        yes(b"[a-\xff]", b"A");
        no(b"[a-\xff]", b"\xe9");
        no(b"[a-\xff]", b"b");
    }

    #[test]
    fn nesting_limit_matches_redis() {
        // 1000 star groups before the last segment still match...
        let mut ok = b"*a".repeat(1000);
        ok.push(b'*');
        let string = b"a".repeat(1000);
        check(&ok, &string, false, true);
        // ...but the recursion for the 1001st returns "no match".
        let deep = b"*a".repeat(1001);
        let string = b"a".repeat(1001);
        check(&deep, &string, false, false);
        // A 1001st group that ends the pattern is fine.
        let mut trailing = b"*a".repeat(1000);
        trailing.extend_from_slice(b"*");
        check(&trailing, &string, false, true);
    }

    #[test]
    fn catastrophic_backtracking_pattern_is_linear_work() {
        // Naive backtracking tries C(100, 30) placements here; this finishes
        // at once. Assert on the answer, never on time.
        let mut pattern = b"*a".repeat(30);
        pattern.extend_from_slice(b"*b");
        let string = b"a".repeat(100);
        assert!(!redis_match(&pattern, &string, false));
        let mut anchored = b"*a".repeat(30);
        anchored.push(b'b');
        assert!(!redis_match(&anchored, &string, false));
        let mut hit = string.clone();
        hit.push(b'b');
        assert!(redis_match(&pattern, &hit, false));
        // A Glob with captures takes the same path.
        let glob = Glob::new(&format!("{}{{x}}b", "*a".repeat(30))).unwrap();
        assert!(!glob.matches(&string));
        let caps = glob.captures(&hit).unwrap();
        assert_eq!(caps, vec![("x", &b"a".repeat(70)[..])]);
    }

    #[test]
    fn captures_take_the_shortest_match() {
        let g = Glob::new("sessions:teacher:{teacher}:*").unwrap();
        assert_eq!(
            g.captures(b"sessions:teacher:12:3:x"),
            Some(vec![("teacher", &b"12"[..])])
        );
        assert_eq!(g.captures(b"sessions:teacher:12"), None);
        assert!(g.matches(b"sessions:teacher::"));
        assert_eq!(
            g.captures(b"sessions:teacher::"),
            Some(vec![("teacher", &b""[..])])
        );

        let g = Glob::new("u:{a}:{b}").unwrap();
        assert_eq!(
            g.captures(b"u:1:2:3"),
            Some(vec![("a", &b"1"[..]), ("b", &b"2:3"[..])])
        );
        assert_eq!(g.captures(b"u:1"), None);

        // The last segment is anchored at the end of the key.
        let g = Glob::new("{x}[0-9]").unwrap();
        assert_eq!(g.captures(b"ab12"), Some(vec![("x", &b"ab1"[..])]));
        let g = Glob::new("{x}[0-9]*").unwrap();
        assert_eq!(g.captures(b"ab12"), Some(vec![("x", &b"ab"[..])]));
        let g = Glob::new("p:{id}?").unwrap();
        assert_eq!(g.captures(b"p:12"), Some(vec![("id", &b"1"[..])]));
    }

    #[test]
    fn captures_next_to_stars() {
        // The leftmost wildcard is shortest first, so a star before a
        // capture takes nothing and a capture before a star takes nothing.
        let g = Glob::new("k:*{id}").unwrap();
        assert_eq!(g.captures(b"k:abc"), Some(vec![("id", &b"abc"[..])]));
        let g = Glob::new("k:{id}*").unwrap();
        assert_eq!(g.captures(b"k:abc"), Some(vec![("id", &b""[..])]));
        let g = Glob::new("{a}{b}").unwrap();
        assert_eq!(
            g.captures(b"xy"),
            Some(vec![("a", &b""[..]), ("b", &b"xy"[..])])
        );
        let g = Glob::new("*:{id}:*").unwrap();
        assert_eq!(g.captures(b"a:b:c:d"), Some(vec![("id", &b"b"[..])]));
        assert_eq!(g.redis_pattern(), "*:*:*");
    }

    #[test]
    fn glob_matches_like_scan_match() {
        // SCAN and KEYS return every key, the empty one too, for exactly `*`.
        let g = Glob::new("*").unwrap();
        assert!(g.matches(b""));
        assert!(g.matches(b"anything"));
        let g = Glob::new("{all}").unwrap();
        assert_eq!(g.redis_pattern(), "*");
        assert_eq!(g.captures(b""), Some(vec![("all", &b""[..])]));
        assert_eq!(g.captures(b"k"), Some(vec![("all", &b"k"[..])]));
        // Any other pattern goes through stringmatchlen, which refuses it.
        assert!(!Glob::new("**").unwrap().matches(b""));
        assert!(!Glob::new("{a}*").unwrap().matches(b""));
        let g = Glob::new("").unwrap();
        assert!(g.matches(b""));
        assert!(!g.matches(b"a"));
    }

    #[test]
    fn glob_keeps_redis_syntax() {
        let g = Glob::new("user:[0-9]?\\*x").unwrap();
        assert!(g.matches(b"user:12*x"));
        assert!(!g.matches(b"user:a2*x"));
        assert!(!g.matches(b"user:12yx"));
        // Braces are literal when escaped, and inside a class.
        let g = Glob::new("a\\{b\\}").unwrap();
        assert!(g.matches(b"a{b}"));
        assert_eq!(g.captures(b"a{b}"), Some(vec![]));
        assert_eq!(g.redis_pattern(), "a\\{b\\}");
        let g = Glob::new("[{}]x").unwrap();
        assert!(g.matches(b"{x"));
        assert!(g.matches(b"}x"));
        assert_eq!(g.redis_pattern(), "[{}]x");
        assert_eq!(g.pattern(), "[{}]x");
        assert_eq!(g.to_string(), "[{}]x");
    }

    #[test]
    fn redis_pattern_turns_captures_into_stars() {
        let g = Glob::new("u:{id}:*").unwrap();
        assert_eq!(g.redis_pattern(), "u:*:*");
        assert_eq!(g.pattern(), "u:{id}:*");
        let g = Glob::new("é:{id}:ü").unwrap();
        assert_eq!(g.redis_pattern(), "é:*:ü");
        assert_eq!(
            g.captures("é:7:ü".as_bytes()),
            Some(vec![("id", &b"7"[..])])
        );
    }

    #[test]
    fn literal_prefix_stops_at_the_first_wildcard() {
        let prefix = |p: &str| Glob::new(p).unwrap().literal_prefix();
        assert_eq!(prefix("user:{id}"), b"user:");
        assert_eq!(prefix("user:*"), b"user:");
        assert_eq!(prefix("ab?"), b"ab");
        assert_eq!(prefix("ab[cd]e"), b"ab");
        assert_eq!(prefix("[ab]c"), b"");
        assert_eq!(prefix("abc"), b"abc");
        assert_eq!(prefix("*"), b"");
        // Escapes are resolved: every key matching `a\*b*` starts `a*b`.
        assert_eq!(prefix("a\\*b*"), b"a*b");
        assert_eq!(prefix("a\\{b\\}:{x}"), b"a{b}:");
        assert_eq!(prefix("a\\"), b"a\\");
    }

    #[test]
    fn bad_patterns_say_what_to_fix() {
        assert_eq!(
            Glob::new("a:{}").unwrap_err(),
            GlobError::EmptyCaptureName { at: 2 }
        );
        assert_eq!(
            Glob::new("{a}:{a}").unwrap_err(),
            GlobError::DuplicateCaptureName { name: "a".into() }
        );
        assert_eq!(
            Glob::new("a:{id").unwrap_err(),
            GlobError::Unbalanced { brace: '{', at: 2 }
        );
        assert_eq!(
            Glob::new("a:id}").unwrap_err(),
            GlobError::Unbalanced { brace: '}', at: 4 }
        );
        assert_eq!(
            Glob::new("{a{b}}").unwrap_err(),
            GlobError::Unbalanced { brace: '{', at: 0 }
        );
        assert_eq!(
            Glob::new("{a:b}").unwrap_err(),
            GlobError::InvalidCaptureName {
                name: "a:b".into(),
                at: 0
            }
        );
        let long = "a".repeat(MAX_PATTERN_LEN + 1);
        assert_eq!(
            Glob::new(&long).unwrap_err(),
            GlobError::TooLong {
                len: MAX_PATTERN_LEN + 1
            }
        );
        assert!(Glob::new(&long[1..]).is_ok());
        let message = Glob::new("x{").unwrap_err().to_string();
        assert!(message.contains("\\{"), "{message}");
    }

    /// One element of the small capture-test patterns.
    enum Token {
        Byte(u8),
        Any,
        Star(Option<String>),
    }

    fn tokens(pattern: &str) -> Vec<Token> {
        let mut out = Vec::new();
        let mut rest = pattern;
        while let Some(c) = rest.chars().next() {
            if c == '{' {
                let close = rest.find('}').unwrap();
                out.push(Token::Star(Some(rest[1..close].to_owned())));
                rest = &rest[close + 1..];
                continue;
            }
            out.push(match c {
                '*' => Token::Star(None),
                '?' => Token::Any,
                _ => Token::Byte(c as u8),
            });
            rest = &rest[1..];
        }
        out
    }

    /// Exhaustive backtracking with every wildcard shortest first, left to
    /// right: the first match it finds defines what `captures` must return.
    fn first_match(ts: &[Token], s: &[u8], out: &mut Vec<(String, Vec<u8>)>) -> bool {
        match ts.split_first() {
            None => s.is_empty(),
            Some((Token::Star(name), rest)) => {
                for k in 0..=s.len() {
                    let mark = out.len();
                    if let Some(name) = name {
                        out.push((name.clone(), s[..k].to_vec()));
                    }
                    if first_match(rest, &s[k..], out) {
                        return true;
                    }
                    out.truncate(mark);
                }
                false
            }
            Some((Token::Byte(b), rest)) => s.first() == Some(b) && first_match(rest, &s[1..], out),
            Some((Token::Any, rest)) => !s.is_empty() && first_match(rest, &s[1..], out),
        }
    }

    fn bytes_from(alphabet: &'static [u8], max: usize) -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(proptest::sample::select(alphabet), 0..=max)
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn agrees_with_redis_reference(
            pattern in bytes_from(b"ab*?[]^-\\", 12),
            string in bytes_from(b"ab", 10),
        ) {
            prop_assert_eq!(
                redis_match(&pattern, &string, false),
                reference(&pattern, &string, false),
                "pattern {:?} string {:?}",
                String::from_utf8_lossy(&pattern),
                String::from_utf8_lossy(&string)
            );
        }

        #[test]
        fn agrees_with_redis_reference_nocase_and_high_bytes(
            pattern in bytes_from(b"aAzZ_*?[]^-\\\xe9\xff", 10),
            string in bytes_from(b"aAzZ_-]\\\xe9\xff", 6),
            nocase: bool,
        ) {
            prop_assert_eq!(
                redis_match(&pattern, &string, nocase),
                reference(&pattern, &string, nocase),
                "pattern {:?} string {:?} nocase {}",
                pattern, string, nocase
            );
        }

        #[test]
        fn glob_agrees_with_its_redis_pattern(
            pattern in "([ab:*?]|\\{[xyz]\\}){0,8}",
            key in bytes_from(b"ab:", 8),
        ) {
            // Duplicate names are rejected; everything else compiles.
            let Ok(glob) = Glob::new(&pattern) else { return Ok(()) };
            let redis = glob.redis_pattern();
            let want = redis == "*" || reference(redis.as_bytes(), &key, false);
            prop_assert_eq!(glob.matches(&key), want);
            prop_assert_eq!(glob.captures(&key).is_some(), want);
        }

        #[test]
        fn captures_are_the_first_match_in_search_order(
            pattern in "([ab:*?]|\\{[xyz]\\}){0,8}",
            key in bytes_from(b"ab:", 8),
        ) {
            let Ok(glob) = Glob::new(&pattern) else { return Ok(()) };
            prop_assume!(!key.is_empty());
            let mut want = Vec::new();
            let found = first_match(&tokens(&pattern), &key, &mut want);
            let got = glob.captures(&key).map(|caps| {
                caps.into_iter()
                    .map(|(name, bytes)| (name.to_owned(), bytes.to_vec()))
                    .collect::<Vec<_>>()
            });
            prop_assert_eq!(got, found.then_some(want));
        }
    }
}
