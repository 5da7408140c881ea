//! tierd's HTTP listener: `GET /metrics`, `/health` and `/ready`.
//!
//! A deliberately small HTTP/1.1 server, written here rather than taken
//! from a framework: three read-only endpoints do not need one, and the
//! exporter's own listener answers every path and has no real health check
//! (DESIGN, "Known traps"). Each connection carries one request and is
//! closed after the response (`Connection: close`), so there is no
//! keep-alive state, no pipelining and no request body to read.
//!
//! Hard limits keep one bad client from hurting the others: at most
//! [`MAX_CONNECTIONS`] connections at once, each in its own task; a request
//! head of at most [`MAX_HEAD`] bytes that must arrive within
//! [`HEAD_TIMEOUT`]; a response that must be taken within
//! [`WRITE_TIMEOUT`]. Anything that is not a well-formed HTTP/1.x request
//! head gets a 400 and the connection is closed.
//!
//! | request | answer |
//! |---|---|
//! | `GET /metrics` | 200, Prometheus text format 0.0.4 |
//! | `GET /health` | 200 (healthy, degraded) or 503 (unhealthy), JSON ([`super::health::Report::to_json`]) |
//! | `GET /ready` | 200 once the command table is loaded and upstream answers, else 503 with the reasons |
//! | `HEAD` of any of them | the same status and headers, no body |
//! | another method | 405, with `Allow: GET, HEAD` |
//! | another path | 404 |
//!
//! This module reads the session context, the metrics registry and the
//! health state; it serves nothing else and changes nothing.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::health::Health;
use crate::session::Ctx;

/// The largest request head (request line and headers) accepted.
pub const MAX_HEAD: usize = 8 * 1024;
/// How long a client may take to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a client may take to read the response.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most HTTP connections served at once. Prometheus scrapes with one; the
/// rest is room for health checkers and for slow clients, which time out.
pub const MAX_CONNECTIONS: usize = 64;
/// How often histogram buffers are drained into the registry.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// After the response, how long the connection may stay open while what
/// the client sent beyond the request head is read and dropped. Closing a
/// socket with unread input makes the kernel send RST, and the client may
/// then lose the response it has not read yet.
const LINGER: Duration = Duration::from_secs(1);
/// The most bytes read and dropped while lingering.
const LINGER_BYTES: usize = 64 * 1024;
/// First wait after a failed accept; doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What the handlers read.
struct App {
    ctx: Arc<Ctx>,
    health: Arc<Health>,
}

/// Serves `listener` until `stop` changes or its sender is dropped.
/// Connections already accepted finish on their own, within their
/// timeouts.
pub async fn serve(
    listener: TcpListener,
    ctx: Arc<Ctx>,
    health: Arc<Health>,
    mut stop: watch::Receiver<()>,
) {
    let app = Arc::new(App { ctx, health });
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, _)) => {
                backoff = ACCEPT_BACKOFF_MIN;
                // Always accept: at the limit the connection gets a quick
                // 503 instead of waiting in the backlog, so a few idle
                // sockets can never make a health probe time out.
                let Ok(permit) = limit.clone().try_acquire_owned() else {
                    tokio::spawn(busy(stream));
                    continue;
                };
                let app = app.clone();
                tokio::spawn(async move {
                    handle(stream, &app).await;
                    drop(permit);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = stop.changed() => return,
                }
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Answers a connection over [`MAX_CONNECTIONS`] with `503` without reading
/// its request, within a short timeout.
async fn busy(mut stream: TcpStream) {
    let body = "too many connections to the metrics listener\n";
    let response = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let answer = async {
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await?;
        // Take in what the client sent, briefly: closing with its request
        // unread would reset the connection, and the client could lose the
        // answer.
        let mut sink = [0u8; 1024];
        let mut taken = 0;
        while taken < 8 * 1024 {
            match stream.read(&mut sink).await? {
                0 => break,
                n => taken += n,
            }
        }
        Ok::<(), std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_millis(500), answer).await;
}

/// Drains histogram buffers every [`UPKEEP_INTERVAL`] until `stop` changes
/// or its sender is dropped. Runs whether or not the listener does: the
/// buffers grow until drained.
pub async fn upkeep(ctx: Arc<Ctx>, mut stop: watch::Receiver<()>) {
    let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => ctx.metrics.upkeep(),
            _ = stop.changed() => return,
        }
    }
}

/// One connection: read the head, answer, close.
async fn handle(mut stream: TcpStream, app: &App) {
    let mut buf = vec![0u8; MAX_HEAD];
    let mut head_only = false;
    let response = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut stream, &mut buf)).await
    {
        Err(_) => Response::text(408, "request head not received in time\n"),
        Ok(Err(HeadError::Closed)) => return,
        Ok(Err(HeadError::TooLarge)) => {
            Response::text(431, &format!("request head larger than {MAX_HEAD} bytes\n"))
        }
        Ok(Ok(len)) => match parse_head(buf.get(..len).unwrap_or_default()) {
            Ok(request) => {
                head_only = request.method == Method::Head;
                respond(app, &request)
            }
            Err(why) => Response::text(400, &format!("bad request: {why}\n")),
        },
    };
    let bytes = response.encode(head_only);
    let written = tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(&bytes)).await;
    if !matches!(written, Ok(Ok(()))) {
        return;
    }
    let _ = stream.shutdown().await;
    linger(&mut stream).await;
}

/// Reads and drops input until the client closes, for at most [`LINGER`]
/// and [`LINGER_BYTES`].
async fn linger(stream: &mut TcpStream) {
    let drain = async {
        let mut sink = [0u8; 4096];
        let mut total = 0;
        while total < LINGER_BYTES {
            match stream.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(n) => total += n,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER, drain).await;
}

#[derive(Debug, PartialEq, Eq)]
enum HeadError {
    /// The client closed before sending a whole head.
    Closed,
    /// No end of head within [`MAX_HEAD`] bytes.
    TooLarge,
}

/// Reads until the blank line that ends the head; returns the head's length
/// (with its terminator). Bytes after it stay unread or are ignored.
async fn read_head(stream: &mut TcpStream, buf: &mut [u8]) -> Result<usize, HeadError> {
    let mut len = 0;
    loop {
        let Some(free) = buf.get_mut(len..).filter(|b| !b.is_empty()) else {
            return Err(HeadError::TooLarge);
        };
        let n = match stream.read(free).await {
            Ok(0) | Err(_) => return Err(HeadError::Closed),
            Ok(n) => n,
        };
        // The terminator may straddle reads: search from a little before the
        // new bytes.
        let from = len.saturating_sub(3);
        len += n;
        if let Some(end) = buf.get(from..len).and_then(head_end) {
            return Ok(from + end);
        }
    }
}

/// Where the head ends: after `\r\n\r\n`, or after `\n\n` from clients that
/// end lines with a bare LF (which RFC 9112 lets a server accept).
fn head_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| {
        let rest = bytes.get(i..)?;
        [&b"\r\n\r\n"[..], b"\n\r\n", b"\n\n"]
            .iter()
            .find(|end| rest.starts_with(end))
            .map(|end| i + end.len())
    })
}

/// A request method tierd tells apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    Get,
    Head,
    /// Any other valid method token.
    Other,
}

/// The parts of a request head tierd looks at.
#[derive(Debug, PartialEq, Eq)]
struct Request<'a> {
    method: Method,
    /// The path, without query string.
    path: &'a str,
}

/// Parses a request head.
///
/// # Format
///
/// ```text
/// METHOD SP request-target SP HTTP/1.x CRLF
/// *( field-name ":" field-value CRLF )
/// CRLF
/// ```
///
/// The target is an origin-form path (`/metrics?x=1`) or an absolute URL
/// (`http://host:9121/metrics`). Header fields are checked for shape only.
///
/// # Errors
///
/// What is wrong, for the 400 body.
fn parse_head(head: &[u8]) -> Result<Request<'_>, &'static str> {
    let text = std::str::from_utf8(head).map_err(|_| "the request head is not UTF-8")?;
    // A server should ignore blank lines before the request line.
    let text = text.trim_start_matches(['\r', '\n']);
    let mut lines = text.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().ok_or("no request line")?;
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("the request line must be METHOD SP TARGET SP HTTP/1.1");
    };
    if method.is_empty() || !method.bytes().all(is_token_byte) {
        return Err("invalid method");
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err("only HTTP/1.0 and HTTP/1.1 are served");
    }
    let path = origin_path(target).ok_or("invalid request target")?;
    for line in lines {
        if line.is_empty() {
            break;
        }
        let (name, _) = line.split_once(':').ok_or("a header line has no colon")?;
        if name.is_empty() || !name.bytes().all(is_token_byte) {
            return Err("invalid header name");
        }
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    Ok(Request { method, path })
}

/// The path of a request target, without query or fragment.
fn origin_path(target: &str) -> Option<&str> {
    let target = match target.find("://") {
        // Absolute form: scheme://authority/path.
        Some(at) if at > 0 && target[..at].bytes().all(|b| b.is_ascii_alphabetic()) => {
            let rest = &target[at + 3..];
            rest.find('/').map_or("/", |slash| &rest[slash..])
        }
        _ => target,
    };
    if !target.starts_with('/') || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return None;
    }
    let end = target.find(['?', '#']).unwrap_or(target.len());
    Some(&target[..end])
}

/// RFC 9110 `tchar`.
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Routes a parsed request.
fn respond(app: &App, request: &Request<'_>) -> Response {
    let route = match request.path {
        "/metrics" => Route::Metrics,
        "/health" => Route::Health,
        "/ready" => Route::Ready,
        _ => return Response::text(404, "not found: try /metrics, /health or /ready\n"),
    };
    if request.method == Method::Other {
        return Response {
            allow: true,
            ..Response::text(405, "method not allowed: use GET or HEAD\n")
        };
    }
    match route {
        Route::Metrics => {
            let ctx = &app.ctx;
            let (rules, cap) = match &ctx.l1 {
                Some(l1) => (l1.store.stats(), ctx.config.l1.max_memory),
                None => (Vec::new(), 0),
            };
            let breaker = ctx.upstream.breaker();
            let open = breaker.state() != crate::upstream::BreakerState::Closed;
            ctx.metrics.set_circuit(open, breaker.opens());
            Response {
                status: 200,
                content_type: "text/plain; version=0.0.4; charset=utf-8",
                body: ctx.metrics.render(&rules, cap).into_bytes(),
                allow: false,
            }
        }
        Route::Health => {
            let report = app.health.report(&app.ctx);
            Response {
                status: report.http_code(),
                content_type: "application/json",
                body: report.to_json().into_bytes(),
                allow: false,
            }
        }
        Route::Ready => {
            let why = app.health.not_ready(&app.ctx);
            if why.is_empty() {
                Response::text(200, "ready\n")
            } else {
                Response::text(503, &format!("not ready: {}\n", why.join("; ")))
            }
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Route {
    Metrics,
    Health,
    Ready,
}

/// A response about to be written.
struct Response {
    status: u16,
    content_type: &'static str,
    body: Vec<u8>,
    /// Send `Allow: GET, HEAD` (with a 405).
    allow: bool,
}

impl Response {
    fn text(status: u16, body: &str) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.as_bytes().to_vec(),
            allow: false,
        }
    }

    /// The bytes on the wire. `Content-Length` is the body's even for
    /// `HEAD`, as RFC 9110 asks.
    fn encode(&self, head_only: bool) -> Vec<u8> {
        let mut out = format!(
            "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n\
             Cache-Control: no-store\r\nConnection: close\r\n",
            self.status,
            reason(self.status),
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if self.allow {
            out.extend_from_slice(b"Allow: GET, HEAD\r\n");
        }
        out.extend_from_slice(b"\r\n");
        if !head_only {
            out.extend_from_slice(&self.body);
        }
        out
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn parse(head: &str) -> Result<Request<'_>, &'static str> {
        parse_head(head.as_bytes())
    }

    #[test]
    fn parses_what_scrapers_send() {
        let prometheus = "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:9121\r\n\
                          User-Agent: Prometheus/2.45.0\r\nAccept: text/plain;version=0.0.4;q=1\r\n\
                          X-Prometheus-Scrape-Timeout-Seconds: 10\r\n\r\n";
        assert_eq!(
            parse(prometheus),
            Ok(Request {
                method: Method::Get,
                path: "/metrics"
            })
        );
        assert_eq!(
            parse("HEAD /health HTTP/1.0\n\n").unwrap().method,
            Method::Head
        );
        assert_eq!(
            parse("\r\nGET /ready?verbose=1 HTTP/1.1\r\n\r\n")
                .unwrap()
                .path,
            "/ready"
        );
        assert_eq!(
            parse("GET http://h:9121/health#x HTTP/1.1\r\n\r\n")
                .unwrap()
                .path,
            "/health"
        );
        assert_eq!(parse("GET http://h HTTP/1.1\r\n\r\n").unwrap().path, "/");
        assert_eq!(
            parse("DELETE /metrics HTTP/1.1\r\n\r\n").unwrap().method,
            Method::Other
        );
        assert_eq!(
            parse("get /metrics HTTP/1.1\r\n\r\n").unwrap().method,
            Method::Other
        );
    }

    #[test]
    fn rejects_malformed_heads() {
        for bad in [
            "",
            "\r\n\r\n",
            "GET\r\n\r\n",
            "GET /metrics\r\n\r\n",
            "GET  /metrics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1 extra\r\n\r\n",
            "GET /metrics HTTP/2.0\r\n\r\n",
            "GET /metrics http/1.1\r\n\r\n",
            "G(T /metrics HTTP/1.1\r\n\r\n",
            "GET metrics HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET /met\x01rics HTTP/1.1\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
            "GET /metrics HTTP/1.1\r\n: empty name\r\n\r\n",
            "GET /metrics HTTP/1.1\r\nbad name: x\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        assert!(parse_head(b"GET /\xff HTTP/1.1\r\n\r\n").is_err());
    }

    #[test]
    fn finds_the_end_of_the_head() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\n\r\nbody"), Some(18));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\nbody"), Some(16));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\r\nbody"), Some(17));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
        assert_eq!(head_end(b""), None);
    }

    #[test]
    fn responses_close_and_head_has_no_body() {
        let r = Response::text(503, "not ready\n");
        let full = String::from_utf8(r.encode(false)).unwrap();
        assert!(
            full.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
            "{full}"
        );
        assert!(full.contains("\r\nContent-Length: 10\r\n"), "{full}");
        assert!(full.contains("\r\nConnection: close\r\n"), "{full}");
        assert!(full.ends_with("\r\n\r\nnot ready\n"), "{full}");
        let head = String::from_utf8(r.encode(true)).unwrap();
        assert!(head.ends_with("Connection: close\r\n\r\n"), "{head}");
        assert!(head.contains("\r\nContent-Length: 10\r\n"), "{head}");
        let allow = Response {
            allow: true,
            ..Response::text(405, "x")
        };
        let text = String::from_utf8(allow.encode(false)).unwrap();
        assert!(text.contains("\r\nAllow: GET, HEAD\r\n"), "{text}");
    }
}
