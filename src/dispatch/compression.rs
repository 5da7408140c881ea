//! Transparent compression of large string values, on the way in and out.
//!
//! A rule with `compress = { threshold, upstream = true }` has its keys'
//! string values stored in Redis compressed ([`crate::cache::compress`]:
//! a small header, then an lz4 block) when that saves at least 10%. Clients
//! never see it:
//!
//! - **Writes** that set whole values (`SET`, `SETEX`, `PSETEX`, `SETNX`,
//!   `GETSET`, `MSET`, `MSETNX`) are rewritten before they are forwarded:
//!   each value of at least `threshold` bytes (or that happens to start
//!   with the header's magic, so that reading it back is never ambiguous)
//!   is replaced by its compressed form.
//! - **Replies that carry values** (`GET`, `GETDEL`, `GETEX`, `GETSET`,
//!   `SET … GET`, `MGET`, and those inside `EXEC`) are decoded before the
//!   client gets them ([`Decode`]). A value that starts with the magic but
//!   does not parse is returned as it is; one that parses but is corrupt
//!   (or declares more than `l1.max_value_size`) is an error reply.
//! - **Every other string command** on such a key is emulated
//!   ([`super::emulate`]): Redis runs it on the plain value, in a temporary
//!   key.
//!
//! With `upstream = false` Redis keeps plain values and nothing here
//! applies; only L1 stores the large ones compressed (see
//! [`l1_form`]). This module decides and transforms; it does no I/O.

use bytes::{Bytes, BytesMut};

use crate::cache::compress::{self, Decoded, MAGIC};
use crate::config::CompressConfig;
use crate::protocol::{inspect, reply, Request};
use crate::session::Ctx;

/// Which parts of a reply hold values to decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decode {
    /// The reply is one bulk string (or nil).
    Bulk,
    /// An array: the elements whose flag is set (an `MGET`'s compressed
    /// keys).
    Elements(Vec<bool>),
    /// `EXEC`'s array: element `i` decoded as given.
    Exec(Vec<(usize, Decode)>),
}

/// What to do with a request on account of compression.
#[derive(Debug)]
pub(crate) enum Plan {
    /// Nothing: no value of a compressing rule is involved.
    Pass,
    /// Forward it, rewritten (values compressed) if `request` is set, and
    /// decode its reply if `decode` is.
    Forward {
        request: Option<Request>,
        decode: Option<Decode>,
    },
    /// Run it on the plain value ([`super::emulate`]).
    Emulate,
}

/// The rule's compression of `key`, when it applies to Redis.
fn upstream(ctx: &Ctx, key: &[u8]) -> Option<CompressConfig> {
    ctx.rules.compress_for(key).filter(|c| c.upstream)
}

/// What `req` needs. Cheap when no rule compresses. Values it compresses
/// are counted in the metrics.
pub(crate) fn plan(ctx: &Ctx, req: &Request) -> Plan {
    plan_counted(ctx, req, true)
}

fn plan_counted(ctx: &Ctx, req: &Request, count: bool) -> Plan {
    if !ctx.rules.any_compress() || req.args.len() < 2 {
        return Plan::Pass;
    }
    let name = req.name();
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    let key_compressed = |i: usize| req.arg(i).and_then(|k| upstream(ctx, k));
    let max = ctx.config.l1.max_value_size;
    if is(b"GET") || is(b"GETDEL") || is(b"GETEX") {
        return match key_compressed(1) {
            Some(_) => Plan::Forward {
                request: None,
                decode: Some(Decode::Bulk),
            },
            None => Plan::Pass,
        };
    }
    if is(b"MGET") {
        let flags: Vec<bool> = req.args[1..]
            .iter()
            .map(|k| upstream(ctx, k).is_some())
            .collect();
        if !flags.iter().any(|&f| f) {
            return Plan::Pass;
        }
        return Plan::Forward {
            request: None,
            decode: Some(Decode::Elements(flags)),
        };
    }
    // (key index, value index, reply carries the old value)
    let single = if is(b"SET") {
        let get = req.args[3.min(req.args.len())..]
            .iter()
            .any(|a| a.eq_ignore_ascii_case(b"GET"));
        Some((1, 2, get))
    } else if is(b"SETNX") {
        Some((1, 2, false))
    } else if is(b"GETSET") {
        Some((1, 2, true))
    } else if is(b"SETEX") || is(b"PSETEX") {
        Some((1, 3, false))
    } else {
        None
    };
    if let Some((k, v, get)) = single {
        let Some(c) = key_compressed(k) else {
            return Plan::Pass;
        };
        let request = req
            .arg(v)
            .and_then(|value| counted(ctx, count, value, compressed_value(&c, value, max)))
            .map(|framed| replace_args(req, &[(v, framed)]));
        return Plan::Forward {
            request,
            decode: get.then_some(Decode::Bulk),
        };
    }
    if is(b"MSET") || is(b"MSETNX") {
        let mut replaced = Vec::new();
        let mut i = 1;
        while let (Some(key), Some(value)) = (req.arg(i), req.arg(i + 1)) {
            if let Some(c) = upstream(ctx, key) {
                if let Some(framed) = counted(ctx, count, value, compressed_value(&c, value, max)) {
                    replaced.push((i + 1, framed));
                }
            }
            i += 2;
        }
        if replaced.is_empty() {
            return Plan::Pass;
        }
        return Plan::Forward {
            request: Some(replace_args(req, &replaced)),
            decode: None,
        };
    }
    if super::emulate::wants(ctx, req) {
        return Plan::Emulate;
    }
    Plan::Pass
}

/// A `SET key value …` request (encoded) as tierd forwards it: with the
/// value compressed when the key's rule says so (for `CACHE.SET`).
pub(crate) fn stored_set(ctx: &Ctx, set: Bytes) -> Bytes {
    let mut parser = crate::protocol::RequestParser::new(ctx.parse_limits.clone());
    let mut buf = BytesMut::from(&set[..]);
    let Ok(Some(req)) = parser.parse(&mut buf) else {
        return set;
    };
    match plan(ctx, &req) {
        Plan::Forward {
            request: Some(rewritten),
            ..
        } => rewritten.raw,
        _ => set,
    }
}

/// The error for `req` on a RESP3 subscriber's stream when it touches a
/// value compressed in Redis: stream replies reach the client as they
/// come, undecoded, and string commands there would run on the compressed
/// bytes, so tierd refuses them. `None` for anything else.
pub(crate) fn stream_refusal(ctx: &Ctx, req: &Request) -> Option<Bytes> {
    if matches!(plan_counted(ctx, req, false), Plan::Pass) {
        return None;
    }
    let name = String::from_utf8_lossy(req.name()).to_uppercase();
    let key = req
        .arg(1)
        .map(|k| crate::admin::shown(k).into_owned())
        .unwrap_or_default();
    let mut out = BytesMut::new();
    reply::error(
        &mut out,
        format!("ERR tierd: {name} on '{key}' on a subscribed connection is not supported: its rule compresses values").as_bytes(),
    );
    Some(out.freeze())
}

/// The value as it is stored: compressed when it is at least the
/// threshold (or starts with the magic, which must not be read back as a
/// header) and compressing pays. `None` keeps it plain.
fn compressed_value(c: &CompressConfig, value: &[u8], max: u64) -> Option<Vec<u8>> {
    if (value.len() as u64) < c.threshold && !value.starts_with(&MAGIC) {
        return None;
    }
    compress::compress(value, usize::try_from(max).unwrap_or(usize::MAX))
}

/// Counts a value compressed on its way to Redis.
fn counted(ctx: &Ctx, count: bool, plain: &[u8], framed: Option<Vec<u8>>) -> Option<Vec<u8>> {
    if let (true, Some(f)) = (count, &framed) {
        ctx.metrics.value_compressed(plain.len(), f.len());
    }
    framed
}

/// `req` with some arguments replaced.
fn replace_args(req: &Request, replaced: &[(usize, Vec<u8>)]) -> Request {
    let args: Vec<&[u8]> = req
        .args
        .iter()
        .enumerate()
        .map(|(i, a)| {
            replaced
                .iter()
                .find(|(j, _)| *j == i)
                .map_or(&a[..], |(_, v)| &v[..])
        })
        .collect();
    Request::from_args(&args)
}

/// The client's reply, with the values `decode` names restored.
pub(crate) fn decode_reply(ctx: &Ctx, frame: Bytes, decode: &Decode) -> Bytes {
    if !frame.windows(MAGIC.len()).any(|w| w == MAGIC) {
        // Nothing compressed in it (the common case for small values).
        return frame;
    }
    let max = usize::try_from(ctx.config.l1.max_value_size).unwrap_or(usize::MAX);
    let depth = ctx.config.limits.max_reply_depth;
    decode_frame(frame, decode, max, depth, Some(&ctx.metrics))
}

fn decode_frame(
    frame: Bytes,
    decode: &Decode,
    max: usize,
    depth: usize,
    metrics: Option<&crate::metrics::Metrics>,
) -> Bytes {
    match decode {
        Decode::Bulk => decode_bulk(frame, max, metrics),
        Decode::Elements(flags) => rebuild(
            frame,
            depth,
            |i| {
                flags
                    .get(i)
                    .copied()
                    .unwrap_or(false)
                    .then_some(&Decode::Bulk)
            },
            max,
            metrics,
        ),
        Decode::Exec(specs) => rebuild(
            frame,
            depth,
            |i| specs.iter().find(|(j, _)| *j == i).map(|(_, d)| d),
            max,
            metrics,
        ),
    }
}

/// An array reply with some elements decoded; anything else unchanged.
fn rebuild<'d>(
    frame: Bytes,
    depth: usize,
    spec: impl Fn(usize) -> Option<&'d Decode>,
    max: usize,
    metrics: Option<&crate::metrics::Metrics>,
) -> Bytes {
    if frame.first() != Some(&b'*') {
        return frame;
    }
    let Some(elements) = inspect::elements(&frame, depth) else {
        return frame;
    };
    let mut out = BytesMut::with_capacity(frame.len() * 2);
    reply::array_header(&mut out, elements.len());
    for (i, el) in elements.iter().enumerate() {
        let el = frame.slice_ref(el);
        match spec(i) {
            Some(d) => out.extend_from_slice(&decode_frame(el, d, max, depth, metrics)),
            None => out.extend_from_slice(&el),
        }
    }
    out.freeze()
}

/// A bulk string reply with its value decoded, if it is compressed: the
/// value is inflated straight into the reply being built.
fn decode_bulk(frame: Bytes, max: usize, metrics: Option<&crate::metrics::Metrics>) -> Bytes {
    match decode_bulk_ref(&frame, max, metrics) {
        Some(decoded) => decoded,
        None => frame,
    }
}

/// [`decode_bulk`] on borrowed bytes: `None` when the reply is not a
/// compressed bulk string (the caller keeps it as it is).
fn decode_bulk_ref(
    frame: &[u8],
    max: usize,
    metrics: Option<&crate::metrics::Metrics>,
) -> Option<Bytes> {
    let payload = bulk_payload(frame)?;
    let len = compress::original_len(payload)?;
    let mut out = BytesMut::with_capacity(len.min(max) + 24);
    let mut head = itoa::Buffer::new();
    out.extend_from_slice(b"$");
    out.extend_from_slice(head.format(len).as_bytes());
    out.extend_from_slice(b"\r\n");
    match compress::decode_append(payload, max, &mut out) {
        Ok(true) => {
            if let Some(m) = metrics {
                m.value_decompressed(true);
            }
            out.extend_from_slice(b"\r\n");
            Some(out.freeze())
        }
        Ok(false) => None,
        Err(e) => {
            if let Some(m) = metrics {
                m.value_decompressed(false);
            }
            tracing::warn!(event = "corrupt_value", error = %e, "a compressed value in Redis does not decode");
            let mut out = BytesMut::new();
            reply::error(&mut out, e.client_error().as_bytes());
            Some(out.freeze())
        }
    }
}

/// The payload of a `$len\r\n…\r\n` frame.
fn bulk_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.first() != Some(&b'$') {
        return None;
    }
    inspect::string_payload(frame)
}

/// The form of a `GET`-like reply L1 keeps for a compressing rule: a value
/// of at least `threshold` bytes is kept compressed (if that pays), so that
/// large values cost L1 less; a reply already compressed by Redis is kept
/// as it is. Hits go through [`l1_hit`].
pub(crate) fn l1_form(c: &CompressConfig, reply: Bytes, max: u64) -> Bytes {
    let Some(payload) = bulk_payload(&reply) else {
        return reply;
    };
    let max_usize = usize::try_from(max).unwrap_or(usize::MAX);
    if c.upstream && payload.starts_with(&MAGIC) {
        // What Redis holds: compressed by tierd, or a plain value that
        // merely starts with the magic (tierd compresses those on write, so
        // that can only come from a writer that bypassed it). A value that
        // decodes, or whose header parses but whose data is corrupt, is
        // kept as it is, so that every hit decodes it as the miss did
        // (to the value, or to the error); only one that does not parse
        // as a header at all is a plain value, framed below.
        if !matches!(compress::decode(payload, max_usize), Ok(Decoded::Plain(_))) {
            return reply;
        }
    }
    match compressed_value(c, payload, max) {
        Some(framed) => {
            let mut out = BytesMut::with_capacity(framed.len() + 16);
            reply::bulk(&mut out, &framed);
            out.freeze()
        }
        None => reply,
    }
}

/// Whether an L1 reply must be decoded before a client gets it (it is a
/// bulk string whose value starts with the magic).
pub(crate) fn l1_compressed(reply: &[u8]) -> bool {
    compress::is_framed_bulk(reply)
}

/// A client's reply from an L1 entry [`l1_compressed`] says is compressed.
pub(crate) fn l1_hit(ctx: &Ctx, reply: &[u8]) -> Bytes {
    let max = usize::try_from(ctx.config.l1.max_value_size).unwrap_or(usize::MAX);
    decode_bulk_ref(reply, max, Some(&ctx.metrics)).unwrap_or_else(|| Bytes::copy_from_slice(reply))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn bulk(v: &[u8]) -> Bytes {
        let mut out = BytesMut::new();
        reply::bulk(&mut out, v);
        out.freeze()
    }

    fn json(n: usize) -> Vec<u8> {
        let mut v = Vec::new();
        while v.len() < n {
            v.extend_from_slice(br#"{"name":"user","email":"user@example.com","active":true},"#);
        }
        v
    }

    const C: CompressConfig = CompressConfig {
        threshold: 100,
        upstream: true,
    };

    #[test]
    fn bulk_replies_decode_to_the_plain_value() {
        let plain = json(5000);
        let framed = compress::compress(&plain, 1 << 20).unwrap();
        assert_eq!(decode_bulk(bulk(&framed), 1 << 20, None), bulk(&plain));
        // Plain values, nils and other replies pass.
        for frame in [
            bulk(b"hello"),
            Bytes::from_static(b"$-1\r\n"),
            Bytes::from_static(b"_\r\n"),
            Bytes::from_static(b":1\r\n"),
        ] {
            assert_eq!(decode_bulk(frame.clone(), 1 << 20, None), frame);
        }
        // Magic but not a header: as is.
        let odd = [&MAGIC[..], b"x"].concat();
        assert_eq!(decode_bulk(bulk(&odd), 1 << 20, None), bulk(&odd));
        // A header declaring more than allowed: an error, not an allocation.
        let err = decode_bulk(bulk(&framed), 100, None);
        assert!(
            err.starts_with(b"-ERR tierd: compressed value is corrupt"),
            "{err:?}"
        );
    }

    #[test]
    fn arrays_decode_only_the_flagged_elements() {
        let plain = json(3000);
        let framed = compress::compress(&plain, 1 << 20).unwrap();
        let mut arr = BytesMut::new();
        reply::array_header(&mut arr, 3);
        arr.extend_from_slice(&bulk(&framed));
        arr.extend_from_slice(&bulk(&framed));
        arr.extend_from_slice(b"$-1\r\n");
        let got = decode_frame(
            arr.freeze(),
            &Decode::Elements(vec![true, false, true]),
            1 << 20,
            8,
            None,
        );
        let mut want = BytesMut::new();
        reply::array_header(&mut want, 3);
        want.extend_from_slice(&bulk(&plain));
        want.extend_from_slice(&bulk(&framed));
        want.extend_from_slice(b"$-1\r\n");
        assert_eq!(got, want.freeze());
    }

    #[test]
    fn l1_keeps_large_values_compressed_and_hits_restore_them() {
        let plain = json(4000);
        let stored = l1_form(&C, bulk(&plain), 1 << 20);
        assert!(stored.len() < plain.len() / 2);
        assert!(l1_compressed(&stored));
        // Already compressed by Redis: kept as is.
        let framed = compress::compress(&plain, 1 << 20).unwrap();
        assert_eq!(l1_form(&C, bulk(&framed), 1 << 20), bulk(&framed));
        // Small values stay plain; a small value starting with the magic is
        // framed so that the hit cannot misread it.
        assert_eq!(l1_form(&C, bulk(b"small"), 1 << 20), bulk(b"small"));
        let odd = [&MAGIC[..], b"x"].concat();
        let kept = l1_form(&C, bulk(&odd), 1 << 20);
        assert_eq!(decode_bulk(kept, 1 << 20, None), bulk(&odd));
        // upstream = false: a Redis value that parses as a frame is still
        // the client's plain bytes, framed again for L1.
        let l1_only = CompressConfig {
            upstream: false,
            ..C
        };
        let again = l1_form(&l1_only, bulk(&framed), 1 << 20);
        assert_eq!(decode_bulk(again, 1 << 20, None), bulk(&framed));
    }

    #[test]
    fn values_are_compressed_from_the_threshold() {
        let max = 1 << 20;
        assert!(compressed_value(&C, &json(200)[..99], max).is_none());
        assert!(compressed_value(&C, &json(200)[..100], max).is_some());
        assert!(compressed_value(&C, &[&MAGIC[..], b"x"].concat(), max).is_some());
    }

    #[test]
    fn replaced_arguments_keep_the_others() {
        let req = Request::from_strs(&["SET", "k", "v", "EX", "10"]);
        let out = replace_args(&req, &[(2, b"framed".to_vec())]);
        let args: Vec<&[u8]> = out.args.iter().map(|a| &a[..]).collect();
        assert_eq!(args, [&b"SET"[..], b"k", b"framed", b"EX", b"10"]);
    }
}
