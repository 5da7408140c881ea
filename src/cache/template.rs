//! Tag templates: the `tags` of a `[[rules]]` entry, filled from the key.
//!
//! A rule such as `match = "sessions:teacher:{teacher}:*"` with
//! `tags = ["teacher:{teacher}"]` tags the key `sessions:teacher:12:3` with
//! `teacher:12`. A template is checked against its rule's pattern once, when
//! the configuration loads, and compiled into literal and capture segments,
//! so that rendering one for a key is a copy of bytes with no parsing and no
//! failure. This module only turns text and captures into tag bytes; what a
//! tag means in Redis (sidecar sets, invalidation) belongs to the
//! invalidation code, and matching keys belongs to [`crate::cache::glob`].
//!
//! The syntax: `{name}` is replaced by what the rule's capture `{name}`
//! matched; `\{`, `\}` and `\\` are a literal `{`, `}` and `\`; any other
//! byte, a lone `\` included, is itself.

use crate::cache::glob::Glob;

/// Why a tag template was refused. Each message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// The template is the empty string.
    #[error("a tag cannot be empty: write e.g. \"teacher:{{teacher}}\" or remove it")]
    Empty,
    /// A `{` with no `}` after it (or another `{` before one).
    #[error("unterminated `{{` at byte {at}: close it as in `{{id}}`, or write a literal brace as `\\{{`")]
    Unterminated {
        /// Byte offset of the `{`.
        at: usize,
    },
    /// A `}` that closes nothing.
    #[error("unbalanced `}}` at byte {at}: write a literal brace as `\\}}`")]
    Unbalanced {
        /// Byte offset of the `}`.
        at: usize,
    },
    /// `{}` with nothing inside.
    #[error("empty capture `{{}}` at byte {at}: name one of the rule's captures, or write a literal brace as `\\{{`")]
    EmptyCapture {
        /// Byte offset of the `{`.
        at: usize,
    },
    /// `{name}` where the rule's pattern has no capture of that name.
    #[error("`{{{name}}}` is not a capture of match {pattern:?}: {}", available_captures(.available))]
    UnknownCapture {
        /// The name as written in the template.
        name: String,
        /// The rule's pattern as written.
        pattern: String,
        /// The capture names the pattern does have, in pattern order.
        available: Vec<String>,
    },
}

/// The end of an [`TemplateError::UnknownCapture`] message: what the tag may
/// use instead.
fn available_captures(names: &[String]) -> String {
    if names.is_empty() {
        return "it has no captures, so the tag can only be literal text (add a capture such as \
                `{id}` to match)"
            .to_owned();
    }
    let list: Vec<String> = names.iter().map(|n| format!("`{{{n}}}`")).collect();
    format!("use one of {}", list.join(", "))
}

/// One piece of a compiled template.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// Bytes copied as they are, escapes already resolved.
    Literal(Vec<u8>),
    /// What the named capture matched.
    Capture(String),
}

/// A tag template, checked against its rule's pattern and compiled.
///
/// Two templates are equal when they were written the same, which is what
/// lets the validated configuration that holds them derive `Eq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagTemplate {
    text: String,
    segments: Vec<Segment>,
    /// The bytes of the literal segments, to size a rendered tag in one
    /// allocation.
    literal_len: usize,
}

impl TagTemplate {
    /// Compiles `text`, checking every `{name}` against the captures of
    /// `pattern`, the pattern of the rule the tag belongs to.
    ///
    /// # Errors
    ///
    /// [`TemplateError::Empty`] for `""`; [`TemplateError::Unterminated`],
    /// [`TemplateError::Unbalanced`] or [`TemplateError::EmptyCapture`] for a
    /// malformed brace; [`TemplateError::UnknownCapture`] for a name that is
    /// not one of `pattern`'s captures.
    pub fn new(text: &str, pattern: &Glob) -> Result<TagTemplate, TemplateError> {
        if text.is_empty() {
            return Err(TemplateError::Empty);
        }
        let captures = capture_names(pattern);
        let bytes = text.as_bytes();
        let mut segments = Vec::new();
        let mut literal = Vec::new();
        let mut i = 0;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'\\' => match bytes.get(i + 1) {
                    Some(&next @ (b'{' | b'}' | b'\\')) => {
                        literal.push(next);
                        i += 2;
                    }
                    _ => {
                        literal.push(b'\\');
                        i += 1;
                    }
                },
                b'{' => {
                    let close = bytes
                        .get(i + 1..)
                        .and_then(|rest| rest.iter().position(|&c| c == b'{' || c == b'}'))
                        .map(|offset| i + 1 + offset)
                        .filter(|&end| bytes.get(end) == Some(&b'}'))
                        .ok_or(TemplateError::Unterminated { at: i })?;
                    let name = text.get(i + 1..close).unwrap_or_default();
                    if name.is_empty() {
                        return Err(TemplateError::EmptyCapture { at: i });
                    }
                    if !captures.contains(&name) {
                        return Err(TemplateError::UnknownCapture {
                            name: name.to_owned(),
                            pattern: pattern.pattern().to_owned(),
                            available: captures.iter().map(|&n| n.to_owned()).collect(),
                        });
                    }
                    if !literal.is_empty() {
                        segments.push(Segment::Literal(std::mem::take(&mut literal)));
                    }
                    segments.push(Segment::Capture(name.to_owned()));
                    i = close + 1;
                }
                b'}' => return Err(TemplateError::Unbalanced { at: i }),
                _ => {
                    literal.push(b);
                    i += 1;
                }
            }
        }
        if !literal.is_empty() {
            segments.push(Segment::Literal(literal));
        }
        let literal_len = segments
            .iter()
            .map(|s| match s {
                Segment::Literal(bytes) => bytes.len(),
                Segment::Capture(_) => 0,
            })
            .sum();
        Ok(TagTemplate {
            text: text.to_owned(),
            segments,
            literal_len,
        })
    }

    /// The tag for one key: the template with each `{name}` replaced by the
    /// bytes the capture matched. `captures` is what [`Glob::captures`]
    /// returned for the key on the rule's pattern; a name missing from it
    /// (which only a caller passing another pattern's captures can cause)
    /// renders as nothing.
    pub fn render(&self, captures: &[(&str, &[u8])]) -> Vec<u8> {
        let capture = |name: &str| {
            captures
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(&[][..], |(_, bytes)| *bytes)
        };
        let captured: usize = self
            .segments
            .iter()
            .map(|s| match s {
                Segment::Literal(_) => 0,
                Segment::Capture(name) => capture(name).len(),
            })
            .sum();
        let mut out = Vec::with_capacity(self.literal_len + captured);
        for segment in &self.segments {
            match segment {
                Segment::Literal(bytes) => out.extend_from_slice(bytes),
                Segment::Capture(name) => out.extend_from_slice(capture(name)),
            }
        }
        out
    }

    /// The template as written in the configuration, escapes included.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The capture names of `pattern`, in pattern order.
fn capture_names(pattern: &Glob) -> Vec<&str> {
    pattern.capture_names().collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn template(text: &str, pattern: &str) -> Result<TagTemplate, TemplateError> {
        TagTemplate::new(text, &Glob::new(pattern).unwrap())
    }

    /// Renders `text` for `key`, which must match `pattern`.
    fn render(text: &str, pattern: &str, key: &str) -> String {
        let glob = Glob::new(pattern).unwrap();
        let captures = glob.captures(key.as_bytes()).unwrap();
        let tag = TagTemplate::new(text, &glob).unwrap().render(&captures);
        String::from_utf8(tag).unwrap()
    }

    #[test]
    fn captures_are_filled_from_the_key() {
        let p = "sessions:teacher:{teacher}:*";
        assert_eq!(
            render("teacher:{teacher}", p, "sessions:teacher:12:3:x"),
            "teacher:12"
        );
        assert_eq!(render("sessions", p, "sessions:teacher:12:3"), "sessions");
        assert_eq!(
            render("{b}/{a}/{b}", "x:{a}:{b}", "x:one:two"),
            "two/one/two"
        );
        assert_eq!(render("{id}", "user:{id}", "user:"), "");
        assert_eq!(render("u{id}", "user:{id}", "user:ü"), "uü");
    }

    #[test]
    fn escapes_are_literal_braces_and_backslashes() {
        assert_eq!(render("\\{x\\}", "k:{id}", "k:1"), "{x}");
        assert_eq!(render("\\{{id}\\}", "k:{id}", "k:1"), "{1}");
        assert_eq!(render("a\\\\{id}", "k:{id}", "k:1"), "a\\1");
        // Any other backslash is itself.
        assert_eq!(render("a\\b\\", "k:{id}", "k:1"), "a\\b\\");
        assert_eq!(template("\\{x\\}", "k").unwrap().text(), "\\{x\\}");
    }

    #[test]
    fn captures_are_found_past_classes_and_escapes() {
        // A brace inside a class or after a backslash is not a capture in
        // the pattern, so it cannot be one in a tag either.
        let p = "a[{]\\{{id}\\}:[x{]{rest}";
        assert_eq!(capture_names(&Glob::new(p).unwrap()), ["id", "rest"]);
        assert_eq!(render("{id}-{rest}", p, "a{{7}:{tail"), "7-tail");
        assert_eq!(
            capture_names(&Glob::new("*:{a}*{b_2}").unwrap()),
            ["a", "b_2"]
        );
        assert!(capture_names(&Glob::new("plain:*").unwrap()).is_empty());
    }

    #[test]
    fn malformed_templates_are_refused() {
        assert_eq!(template("", "k:{id}"), Err(TemplateError::Empty));
        assert_eq!(
            template("t:{id", "k:{id}"),
            Err(TemplateError::Unterminated { at: 2 })
        );
        assert_eq!(
            template("t:{i{id}", "k:{id}"),
            Err(TemplateError::Unterminated { at: 2 })
        );
        assert_eq!(
            template("t:id}", "k:{id}"),
            Err(TemplateError::Unbalanced { at: 4 })
        );
        assert_eq!(
            template("t:{}", "k:{id}"),
            Err(TemplateError::EmptyCapture { at: 2 })
        );
    }

    #[test]
    fn unknown_captures_name_the_ones_available() {
        let err = template("teacher:{teachr}", "sessions:teacher:{teacher}:{id}").unwrap_err();
        assert_eq!(
            err.to_string(),
            "`{teachr}` is not a capture of match \"sessions:teacher:{teacher}:{id}\": use one \
             of `{teacher}`, `{id}`"
        );
        let err = template("{id}", "sessions:*").unwrap_err();
        assert!(err.to_string().contains("it has no captures"), "{err}");
        // A brace that is literal in the pattern is no capture.
        assert!(matches!(
            template("{id}", "k:\\{id\\}"),
            Err(TemplateError::UnknownCapture { .. })
        ));
    }

    #[test]
    fn render_sizes_and_missing_captures() {
        let glob = Glob::new("k:{id}").unwrap();
        let tag = TagTemplate::new("t:{id}:x", &glob).unwrap();
        let out = tag.render(&[("id", b"42")]);
        assert_eq!(out, b"t:42:x");
        assert_eq!(tag.render(&[]), b"t::x");
    }
}
