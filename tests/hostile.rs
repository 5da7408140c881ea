//! Hostile and broken clients. Each input is sent on its own connection
//! while a second, already connected client keeps working; afterwards that
//! client and a brand new one must still be served. Where Redis itself
//! answers the same bytes, its answer is the reference (the same bytes are
//! sent to a redis-server directly).

mod support;

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use support::wire::{lossy, resp, Outcome, Wire};
use support::{config_for, RedisServer, Tierd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Connects to `addr`, writes `payload` (from its own task, so that a peer
/// that stops reading or closes mid-write cannot stall the test), optionally
/// half-closes, and reads until the peer closes or `limit` passes.
async fn attack(addr: SocketAddr, payload: Vec<u8>, half_close: bool, limit: Duration) -> Outcome {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut rd, mut wr) = stream.into_split();
    // The write half is handed back (not dropped) so that no FIN goes out
    // before the peer has decided to close on its own.
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&payload).await;
        if half_close {
            let _ = wr.shutdown().await;
        }
        wr
    });
    let mut got = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read_buf(&mut got)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(_)) => {}
            Err(_) => break false,
        }
    };
    writer.abort();
    let _ = writer.await;
    Outcome { got, closed }
}

/// A well-behaved client connected before the attack, checking that it is
/// served throughout.
struct Bystander {
    wire: Wire,
    tag: &'static str,
    round: u32,
}

impl Bystander {
    async fn connect(addr: SocketAddr, tag: &'static str) -> Bystander {
        let mut wire = Wire::connect(addr).await;
        wire.expect(b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n").await;
        Bystander {
            wire,
            tag,
            round: 0,
        }
    }

    async fn check(&mut self) {
        self.round += 1;
        let key = format!("bystander:{}", self.tag);
        let value = format!("round-{}", self.round);
        let w = &mut self.wire;
        w.expect(
            &resp::<&[u8]>(&[b"SET", key.as_bytes(), value.as_bytes()]),
            b"+OK\r\n",
        )
        .await;
        let want = format!("${}\r\n{value}\r\n", value.len());
        w.expect(&resp::<&[u8]>(&[b"GET", key.as_bytes()]), want.as_bytes())
            .await;
        w.expect(b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n").await;
    }
}

/// Runs `hostile` while the bystander keeps checking (at least once during
/// it), then checks the bystander and a brand new client afterwards.
async fn under_attack<F>(addr: SocketAddr, by: &mut Bystander, hostile: F) -> Outcome
where
    F: Future<Output = Outcome> + Send + 'static,
{
    let task = tokio::spawn(hostile);
    loop {
        by.check().await;
        if task.is_finished() {
            break;
        }
    }
    let outcome = task.await.unwrap();
    by.check().await;
    let mut fresh = Bystander::connect(addr, "fresh").await;
    fresh.check().await;
    outcome
}

const CLOSE_LIMIT: Duration = Duration::from_secs(5);

/// Sends `payload` to Redis directly and to tierd (under a bystander), and
/// returns both outcomes.
async fn differential(payload: &[u8]) -> (Outcome, Outcome) {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let reference = attack(redis.addr(), payload.to_vec(), false, CLOSE_LIMIT).await;
    let mut by = Bystander::connect(t.addr, "by").await;
    let got = under_attack(
        t.addr,
        &mut by,
        attack(t.addr, payload.to_vec(), false, CLOSE_LIMIT),
    )
    .await;
    (reference, got)
}

/// Asserts that tierd answered exactly `expected`, as Redis does, and
/// closed the connection.
async fn assert_rejected_like_redis(payload: &[u8], expected: &[u8]) {
    let (redis, tierd) = differential(payload).await;
    assert_eq!(
        lossy(&redis.got),
        lossy(expected),
        "reference: Redis's own answer"
    );
    assert!(redis.closed, "reference: Redis closes");
    assert_eq!(lossy(&tierd.got), lossy(&redis.got), "tierd's answer");
    assert!(tierd.closed, "tierd must close the connection");
}

// ---------------------------------------------------------------------------
// Framing errors
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nested_star_one_100k_times_is_a_protocol_error() {
    let payload = b"*1\r\n".repeat(100_000);
    assert_rejected_like_redis(&payload, b"-ERR Protocol error: expected '$', got '*'\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_and_empty_multibulk_counts_are_skipped() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut by = Bystander::connect(t.addr, "by").await;
    for (case, want) in [
        (&b"*-5\r\n*1\r\n$4\r\nPING\r\n"[..], &b"+PONG\r\n"[..]),
        (b"*-5\r\nPING\r\n", b"+PONG\r\n"),
        (b"*0\r\n*-1\r\nPING\r\n", b"+PONG\r\n"),
        (
            b"*-1\r\n*0\r\n*2\r\n$4\r\nECHO\r\n$2\r\nhi\r\n",
            b"$2\r\nhi\r\n",
        ),
    ] {
        for addr in [redis.addr(), t.addr] {
            let mut w = Wire::connect(addr).await;
            w.expect(case, want).await;
            // The connection stays open and in step.
            w.expect(b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$1\r\nv\r\n", b"+OK\r\n")
                .await;
            w.expect(b"GET k\r\n", b"$1\r\nv\r\n").await;
        }
        by.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_length_of_2_pow_60_is_rejected() {
    assert_rejected_like_redis(
        b"*1\r\n$1152921504606846976\r\n",
        b"-ERR Protocol error: invalid bulk length\r\n",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibulk_count_over_one_mebi_is_rejected() {
    // Redis 7.0 itself accepts up to INT_MAX for an authenticated client;
    // tierd's limit is 1,048,576 arguments, with Redis's wording.
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut by = Bystander::connect(t.addr, "by").await;
    let out = under_attack(
        t.addr,
        &mut by,
        attack(t.addr, b"*1048577\r\n".to_vec(), false, CLOSE_LIMIT),
    )
    .await;
    assert_eq!(
        lossy(&out.got),
        "-ERR Protocol error: invalid multibulk length\r\n"
    );
    assert!(out.closed, "tierd must close the connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibulk_count_of_exactly_one_mebi_is_served() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let n = 1_048_576;
    let mut payload = format!("*{n}\r\n$3\r\nDEL\r\n").into_bytes();
    for _ in 1..n {
        payload.extend_from_slice(b"$1\r\na\r\n");
    }
    let mut by = Bystander::connect(t.addr, "by").await;
    for addr in [redis.addr(), t.addr] {
        let mut w = Wire::connect(addr).await;
        w.expect(&payload, b":0\r\n").await;
        w.expect(b"PING\r\n", b"+PONG\r\n").await;
        by.check().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inline_line_over_64_kb_is_rejected() {
    let payload = vec![b'x'; 70_000];
    assert_rejected_like_redis(&payload, b"-ERR Protocol error: too big inline request\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbalanced_quotes_are_rejected_like_redis() {
    assert_rejected_like_redis(
        b"SET \"abc\r\n",
        b"-ERR Protocol error: unbalanced quotes in request\r\n",
    )
    .await;
}

/// The other framing errors Redis reports, each on a fresh connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_framing_errors_match_redis() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut by = Bystander::connect(t.addr, "by").await;
    let mut count_line = b"*".to_vec();
    count_line.extend(std::iter::repeat(b'1').take(70_000));
    let mut bulk_line = b"*1\r\n$".to_vec();
    bulk_line.extend(std::iter::repeat(b'1').take(70_000));
    let cases: Vec<Vec<u8>> = vec![
        b"*abc\r\n".to_vec(),
        b"*3000000000\r\n".to_vec(),
        b"*1\r\n$-1\r\n".to_vec(),
        b"*1\r\n$abc\r\n".to_vec(),
        b"*1\r\n$536870913\r\n".to_vec(),
        b"*1\r\nPING\r\n".to_vec(),
        b"*2\r\n$4\r\nECHO\r\n:1\r\n".to_vec(),
        b"PING \"a\"b\r\n".to_vec(),
        b"ECHO 'it''s'\r\n".to_vec(),
        b"PING\r\nSET \"abc\r\n".to_vec(),
        count_line,
        bulk_line,
    ];
    let mut mismatches = Vec::new();
    for case in cases {
        let reference = attack(redis.addr(), case.clone(), false, CLOSE_LIMIT).await;
        assert!(
            reference.closed,
            "reference for {:?}",
            lossy(&case[..case.len().min(30)])
        );
        let got = attack(t.addr, case.clone(), false, CLOSE_LIMIT).await;
        if got.got != reference.got || !got.closed {
            mismatches.push(format!(
                "{:?}: redis {:?} (closed), tierd {:?} ({})",
                lossy(&case[..case.len().min(30)]),
                lossy(&reference.got),
                lossy(&got.got),
                if got.closed { "closed" } else { "left open" }
            ));
        }
        by.check().await;
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
}

/// xorshift64: a fixed pseudo-random sequence, the same on every run.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Checks that a reply stream is a sequence of one-line error replies, with
/// a protocol error (if any) as the very last thing sent.
fn assert_error_stream(got: &[u8], what: &str) {
    if got.is_empty() {
        return;
    }
    assert!(
        got.ends_with(b"\r\n"),
        "{what}: stream ends mid-line: {:?}",
        lossy(got)
    );
    let body = &got[..got.len() - 2];
    let lines: Vec<&[u8]> = body.split(|&b| b == b'\n').collect();
    for (i, line) in lines.iter().enumerate() {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        assert!(
            line.starts_with(b"-"),
            "{what}: reply {i} is not an error: {:?}",
            lossy(line)
        );
        if line.starts_with(b"-ERR Protocol error") {
            assert_eq!(i, lines.len() - 1, "{what}: replies after a protocol error");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_garbage_hurts_no_one() {
    let redis = RedisServer::start();
    let t = Tierd::start(&redis.url()).await;
    let mut by = Bystander::connect(t.addr, "by").await;
    let blob = garbage(0x9E37_79B9_7F4A_7C15, 64 * 1024);
    // (name, payload, the replies due before the garbage starts)
    let mut cases: Vec<(String, Vec<u8>, &[u8])> =
        vec![("64 KB of garbage".into(), blob.clone(), b"")];
    for (name, prefix, due) in [
        ("multibulk then garbage", &b"*3\r\n"[..], &b""[..]),
        ("bulk header then garbage", b"*2\r\n$4\r\nECHO\r\n$", b""),
        ("inline then garbage", b"PING\r\nECHO ", b"+PONG\r\n"),
    ] {
        let mut payload = prefix.to_vec();
        payload.extend_from_slice(&blob);
        cases.push((name.into(), payload, due));
    }
    for seed in 1..=4u64 {
        cases.push((
            format!("seed {seed}"),
            garbage(seed.wrapping_mul(0x2545_F491_4F6C_DD1D), 64 * 1024),
            b"",
        ));
    }
    for (name, payload, due) in cases {
        // Half-close after the garbage: whatever tierd makes of it, it must
        // answer and close, not wait forever.
        let out = under_attack(t.addr, &mut by, attack(t.addr, payload, true, CLOSE_LIMIT)).await;
        assert!(
            out.closed,
            "{name}: connection not closed after EOF; got {:?}",
            lossy(&out.got)
        );
        assert!(
            out.got.starts_with(due),
            "{name}: expected {:?} first, got {:?}",
            lossy(due),
            lossy(&out.got)
        );
        assert_error_stream(&out.got[due.len()..], &name);
    }
    // tierd is alive and in step for everyone.
    let mut w = Wire::connect(t.addr).await;
    w.expect(b"PING\r\n", b"+PONG\r\n").await;
    by.check().await;
}

// ---------------------------------------------------------------------------
// Limits and timeouts
// ---------------------------------------------------------------------------

/// Polls `cond` every 10 ms until it holds, for up to `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if cond().await {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

const MAX_CLIENTS: &[u8] = b"-ERR max number of clients reached\r\n";

/// Connects and pings: `Ok` when served, `Err(bytes)` with whatever came
/// back before the connection closed.
async fn try_admitted(addr: SocketAddr) -> Result<Wire, Vec<u8>> {
    let mut w = Wire::connect(addr).await;
    w.send(b"PING\r\n").await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        if w.buf.ends_with(b"\r\n") {
            if &w.buf[..] == b"+PONG\r\n" {
                w.buf.clear();
                return Ok(w);
            }
            let out = w.read_to_close(Duration::from_secs(5)).await;
            return Err(out.got);
        }
        match tokio::time::timeout_at(deadline, w.stream.read_buf(&mut w.buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Err(w.buf.to_vec()),
            Ok(Ok(_)) => {}
            Err(_) => panic!("no answer within 5 s: {:?}", lossy(&w.buf)),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_rejects_the_extra_client_until_one_leaves() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis.url());
    cfg.max_clients = 2;
    let t = Tierd::start_with(cfg).await;

    let first = Bystander::connect(t.addr, "first").await;
    let mut second = Bystander::connect(t.addr, "second").await;

    // The third gets Redis's text and is closed.
    let mut third = Wire::connect(t.addr).await;
    let out = third.read_to_close(CLOSE_LIMIT).await;
    assert_eq!(lossy(&out.got), lossy(MAX_CLIENTS));
    assert!(out.closed);
    second.check().await;

    // Once a client leaves, a new one gets in (when tierd notices).
    drop(first);
    let admitted = std::sync::Arc::new(tokio::sync::Mutex::new(None));
    eventually(
        Duration::from_secs(5),
        "a new client to be admitted",
        || {
            let admitted = admitted.clone();
            async move {
                match try_admitted(t.addr).await {
                    Ok(w) => {
                        *admitted.lock().await = Some(w);
                        true
                    }
                    Err(got) => {
                        assert_eq!(lossy(&got), lossy(MAX_CLIENTS), "a refused client's answer");
                        false
                    }
                }
            }
        },
    )
    .await;
    let mut fourth = admitted.lock().await.take().unwrap();
    fourth.expect(b"SET k v\r\n", b"+OK\r\n").await;
    second.check().await;

    // And the limit holds again.
    let got = try_admitted(t.addr)
        .await
        .err()
        .expect("a third client is refused");
    assert_eq!(lossy(&got), lossy(MAX_CLIENTS));
    fourth.expect(b"GET k\r\n", b"$1\r\nv\r\n").await;
}

fn with_idle_timeout(url: &str) -> tierd::config::Config {
    let mut cfg = config_for(url);
    cfg.idle_timeout = Duration::from_millis(300);
    cfg
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_client_is_closed_while_an_active_one_is_not() {
    let redis = RedisServer::start();
    let t = Tierd::start_with(with_idle_timeout(&redis.url())).await;
    let mut active = Wire::connect(t.addr).await;
    active.expect(b"PING\r\n", b"+PONG\r\n").await;

    let started = Instant::now();
    let mut idle = Wire::connect(t.addr).await;
    idle.expect(b"PING\r\n", b"+PONG\r\n").await;
    let watch = tokio::spawn(async move { idle.read_to_close(CLOSE_LIMIT).await });

    // The active client keeps talking, well inside the timeout, until the
    // idle one has been closed.
    let mut tick = tokio::time::interval(Duration::from_millis(50));
    while !watch.is_finished() {
        tick.tick().await;
        active.expect(b"PING\r\n", b"+PONG\r\n").await;
    }
    let out = watch.await.unwrap();
    assert!(out.closed, "the idle client was not closed within 5 s");
    assert!(
        out.got.is_empty(),
        "closed silently, as Redis does: {:?}",
        lossy(&out.got)
    );
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed before the idle timeout passed"
    );
    active
        .expect(b"SET k v\r\nGET k\r\n", b"+OK\r\n$1\r\nv\r\n")
        .await;
}

/// Waits for a client that is known to have been idle for longer than
/// `idle_timeout` since `after`: connect one now and wait for tierd to
/// close it.
async fn wait_out_idle_timeout(addr: SocketAddr) {
    let mut witness = Wire::connect(addr).await;
    witness.expect(b"PING\r\n", b"+PONG\r\n").await;
    let out = witness.read_to_close(CLOSE_LIMIT).await;
    assert!(out.closed, "the idle witness was not closed within 5 s");
}

async fn redis_says(addr: SocketAddr, cmd: &[&[u8]]) -> String {
    let mut w = Wire::connect(addr).await;
    w.send(&resp(cmd)).await;
    w.send(b"ECHO ~end~\r\n").await;
    lossy(&w.until(b"$5\r\n~end~\r\n").await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_client_is_not_closed_by_idle_timeout() {
    let redis = RedisServer::start();
    let t = Tierd::start_with(with_idle_timeout(&redis.url())).await;
    let mut blocked = Wire::connect(t.addr).await;
    blocked.send(b"BLPOP q 10\r\n").await;
    eventually(
        Duration::from_secs(5),
        "BLPOP to block in Redis",
        || async {
            redis_says(redis.addr(), &[b"INFO", b"clients"])
                .await
                .contains("blocked_clients:1\r\n")
        },
    )
    .await;
    // Connected after the BLPOP was read: once it is closed for idling,
    // the blocked client has been quiet for longer than the timeout too.
    wait_out_idle_timeout(t.addr).await;

    assert_eq!(
        redis_says(redis.addr(), &[b"LPUSH", b"q", b"v"]).await,
        ":1\r\n"
    );
    let got = blocked.until(b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n").await;
    assert!(got.is_empty(), "{:?}", lossy(&got));
    // Being answered is activity (Redis counts its writes to the client):
    // the client is not dropped the moment its reply arrives.
    blocked.expect(b"PING\r\n", b"+PONG\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_is_not_closed_by_idle_timeout() {
    let redis = RedisServer::start();
    let t = Tierd::start_with(with_idle_timeout(&redis.url())).await;
    let mut sub = Wire::connect(t.addr).await;
    sub.expect(
        b"SUBSCRIBE ch\r\n",
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    )
    .await;
    wait_out_idle_timeout(t.addr).await;
    assert_eq!(
        redis_says(redis.addr(), &[b"PUBLISH", b"ch", b"hi"]).await,
        ":1\r\n"
    );
    let got = sub
        .until(b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$2\r\nhi\r\n")
        .await;
    assert!(got.is_empty(), "{:?}", lossy(&got));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_buffer_limit_closes_only_the_offender() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis.url());
    cfg.limits.query_buffer_limit = 1024 * 1024;
    let t = Tierd::start_with(cfg).await;
    let mut by = Bystander::connect(t.addr, "by").await;

    let big = vec![b'x'; 2 * 1024 * 1024];
    let payload = resp::<&[u8]>(&[b"SET", b"big", &big]);
    let out = under_attack(t.addr, &mut by, attack(t.addr, payload, false, CLOSE_LIMIT)).await;
    assert!(
        out.closed,
        "the offender was not closed; got {:?}",
        lossy(&out.got)
    );
    let text = lossy(&out.got);
    assert!(
        text.starts_with("-ERR ") && text.ends_with("\r\n") && text.matches("\r\n").count() == 1,
        "one error reply expected, got {text:?}"
    );
    // Nothing of it reached Redis.
    assert_eq!(
        redis_says(redis.addr(), &[b"EXISTS", b"big"]).await,
        ":0\r\n"
    );

    // A request under the limit still goes through.
    let half = vec![b'y'; 512 * 1024];
    let mut w = Wire::connect(t.addr).await;
    w.expect(&resp::<&[u8]>(&[b"SET", b"half", &half]), b"+OK\r\n")
        .await;
    assert_eq!(
        redis_says(redis.addr(), &[b"STRLEN", b"half"]).await,
        format!(":{}\r\n", half.len())
    );
    by.check().await;
}
