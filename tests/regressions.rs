//! Regressions from the first and second reviews, one scenario each. Redis is the
//! reference: wherever the same bytes can go to a redis-server directly, they
//! do, and tierd must answer exactly as it did (HELLO's connection id aside,
//! since tierd answers with its own client id).

mod support;

use std::time::Duration;

use support::exchange::{assert_frame, encode, reply, send, text};
use support::probe::{client_field, client_list, direct_raw, wait_blocked_clients, Deadline};
use support::slow_link::SlowLink;
use support::wire::{lossy, mask_hello_id, resp, Wire};
use support::{config_for, Raw, RedisServer, Tierd};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

/// Sends `bytes` in one write straight to Redis and through tierd, and reads
/// each side until what arrived ends with `end`. Returns both streams with
/// HELLO's id masked, `end` included, as text.
async fn differential(
    redis: &RedisServer,
    tierd: &Tierd,
    bytes: &[u8],
    end: &[u8],
) -> (String, String) {
    let mut direct = Wire::connect(redis.addr()).await;
    let mut proxied = Wire::connect(tierd.addr).await;
    direct.send(bytes).await;
    proxied.send(bytes).await;
    let mut d = direct.until(end).await;
    let mut p = proxied.until(end).await;
    d.extend_from_slice(end);
    p.extend_from_slice(end);
    (lossy(&mask_hello_id(&d)), lossy(&mask_hello_id(&p)))
}

/// Sends `bytes` in one write straight to Redis and through tierd, and reads
/// each side until the server closes the connection (5 s limit). Returns
/// what each side got, and asserts both closed.
async fn differential_to_close(
    redis: &RedisServer,
    tierd: &Tierd,
    bytes: &[u8],
) -> (String, String) {
    let mut direct = Wire::connect(redis.addr()).await;
    let mut proxied = Wire::connect(tierd.addr).await;
    direct.send(bytes).await;
    proxied.send(bytes).await;
    let d = direct.read_to_close(5 * SECOND).await;
    let p = proxied.read_to_close(5 * SECOND).await;
    assert!(d.closed, "Redis did not close: {:?}", lossy(&d.got));
    assert!(p.closed, "tierd did not close: {:?}", lossy(&p.got));
    (lossy(&d.got), lossy(&p.got))
}

/// The `id` field of a HELLO reply (RESP2 array or RESP3 map).
fn hello_id(reply: &[u8]) -> i64 {
    let key = b"$2\r\nid\r\n:";
    let at = reply
        .windows(key.len())
        .position(|w| w == key)
        .unwrap_or_else(|| panic!("no id in HELLO reply {:?}", text(reply)))
        + key.len();
    let len = reply[at..].iter().position(|&b| b == b'\r').unwrap();
    std::str::from_utf8(&reply[at..at + len])
        .unwrap()
        .parse()
        .unwrap()
}

/// The value of an integer reply (`:n\r\n`).
fn integer(frame: &[u8]) -> i64 {
    assert!(
        frame.first() == Some(&b':'),
        "expected an integer, got {:?}",
        text(frame)
    );
    text(&frame[1..frame.len() - 2]).parse().unwrap()
}

fn bulk_of(value: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", value.len()).into_bytes();
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
    out
}

// ---------------------------------------------------------------------------
// 1. RESET ends a subscription in order, in one pipelined write
// ---------------------------------------------------------------------------

const SUBSCRIBED_CH: &str = "*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_get_subscribe_reset_ping_in_one_write_answers_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let bytes = b"SELECT 1\r\nGET k\r\nSUBSCRIBE ch\r\nRESET\r\nPING\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, b"+PONG\r\n").await;
    assert_eq!(
        direct,
        format!("+OK\r\n$-1\r\n{SUBSCRIBED_CH}+RESET\r\n+PONG\r\n")
    );
    assert_eq!(proxied, direct);

    let bytes = b"SUBSCRIBE ch\r\nRESET\r\nPING\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, b"+PONG\r\n").await;
    assert_eq!(direct, format!("{SUBSCRIBED_CH}+RESET\r\n+PONG\r\n"));
    assert_eq!(proxied, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_get_subscribe_reset_ping_in_one_write_answers_like_redis_in_resp3() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    // RESET returns the connection to RESP2, so PING's answer is +PONG.
    let bytes = b"HELLO 3\r\nSELECT 1\r\nGET k\r\nSUBSCRIBE ch\r\nRESET\r\nPING\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, b"+PONG\r\n").await;
    assert!(
        direct.ends_with(
            "+OK\r\n_\r\n>3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n+RESET\r\n+PONG\r\n"
        ),
        "{direct}"
    );
    assert_eq!(proxied, direct);

    let bytes = b"HELLO 3\r\nSUBSCRIBE ch\r\nRESET\r\nPING\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, b"+PONG\r\n").await;
    assert_eq!(proxied, direct);
}

// ---------------------------------------------------------------------------
// 2. A slow reader on a pinned connection is not timed out
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_reader_on_a_pinned_connection_gets_every_reply() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis.url());
    config.upstream.command_timeout = SECOND;
    let tierd = Tierd::start_with(config).await;

    let value = vec![b'x'; 20 * 1024];
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SELECT", "1"]).await, b"+OK\r\n");
    c.send(&resp::<&[u8]>(&[b"SET", b"big", &value])).await;
    assert_frame(&c.frame().await, b"+OK\r\n");

    // 3,000 × 20 KB of replies, unread for three command timeouts: tierd
    // must wait for the client, not blame upstream.
    let n = 3000;
    let pipeline: Vec<u8> = (0..n).flat_map(|_| encode(&["GET", "big"])).collect();
    c.send(&pipeline).await;
    tokio::time::sleep(3 * SECOND).await;

    let want = bulk_of(&value);
    for i in 0..n {
        let got = c.frame().await;
        assert!(
            got[..] == want[..],
            "reply {i} of {n} is not the value: {:?}",
            text(&got[..got.len().min(200)])
        );
    }
    assert_frame(&reply(&mut c, &["PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// 3. XREADGROUP with a group named STREAMS is a blocking command
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xreadgroup_with_a_group_named_streams_blocks_only_its_client() {
    // The group's name is also the keyword that starts the key list.
    xreadgroup_blocks_only_its_client(
        "STREAMS",
        &[
            "XREADGROUP",
            "GROUP",
            "STREAMS",
            "c",
            "BLOCK",
            "0",
            "STREAMS",
            "s",
            ">",
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 4. A pinned session answers a long pipeline
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_session_answers_2000_pipelined_gets_in_order() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let n = 2000;

    let mut direct = direct_raw(&redis, None).await;
    assert_frame(&direct.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    let pairs: Vec<String> = (0..n)
        .flat_map(|i| [format!("k{i}"), format!("v{i}")])
        .collect();
    let mut mset = vec!["MSET"];
    mset.extend(pairs.iter().map(String::as_str));
    assert_frame(&direct.cmd(&mset).await, b"+OK\r\n");

    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SELECT", "1"]).await, b"+OK\r\n");
    let pipeline: Vec<u8> = (0..n)
        .flat_map(|i| encode(&["GET", &format!("k{i}")]))
        .collect();
    c.send(&pipeline).await;
    for i in 0..n {
        assert_frame(&c.frame().await, &bulk_of(format!("v{i}").as_bytes()));
    }
}

// ---------------------------------------------------------------------------
// 5. QUIT behind a blocked command or a subscription
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_after_a_timed_out_blpop_answers_both_then_closes() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = differential_to_close(&redis, &tierd, b"BLPOP nol 1\r\nQUIT\r\n").await;
    assert_eq!(direct, "*-1\r\n+OK\r\n");
    assert_eq!(proxied, direct);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_while_subscribed_answers_ok_then_closes() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) =
        differential_to_close(&redis, &tierd, b"SUBSCRIBE ch\r\nQUIT\r\n").await;
    assert_eq!(direct, format!("{SUBSCRIBED_CH}+OK\r\n"));
    assert_eq!(proxied, direct);
}

// ---------------------------------------------------------------------------
// 6. State commands inside MULTI
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_3_inside_multi_switches_to_resp3_at_exec() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    assert_frame(&direct.cmd(&["HSET", "h", "f", "v"]).await, b":1\r\n");

    let bytes = b"MULTI\r\nHELLO 3\r\nEXEC\r\nHGETALL h\r\n";
    let end = b"%1\r\n$1\r\nf\r\n$1\r\nv\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, end).await;
    assert!(
        direct.starts_with("+OK\r\n+QUEUED\r\n*1\r\n%7\r\n"),
        "{direct}"
    );
    assert_eq!(proxied, direct);
}

/// `CLIENT REPLY OFF` inside MULTI makes Redis send EXEC's array header and
/// then nothing (the element is suppressed), so its reply stream is not
/// well-formed RESP until `CLIENT REPLY ON`: exactly
/// `+OK +QUEUED *1` and then `+OK` (taken as the array's element) `+PONG`.
/// A proxy that frames replies cannot reproduce a half frame. What matters is
/// that tierd neither hangs nor times out: either it matches Redis, or it
/// refuses the command with an error and the connection stays usable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_inside_multi_does_not_hang() {
    let redis = RedisServer::start();
    let mut config = config_for(&redis.url());
    config.upstream.command_timeout = 2 * SECOND;
    let tierd = Tierd::start_with(config).await;

    let bytes = b"MULTI\r\nCLIENT REPLY OFF\r\nEXEC\r\nCLIENT REPLY ON\r\nPING\r\n";
    let mut direct = Wire::connect(redis.addr()).await;
    direct.send(bytes).await;
    assert_eq!(
        lossy(&direct.until(b"+PONG\r\n").await),
        "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n"
    );

    // Well within the command timeout: a hang would show as a timeout error
    // or no PONG at all (Wire::until fails after 10 s).
    let mut proxied = Wire::connect(tierd.addr).await;
    let start = Instant::now();
    proxied.send(bytes).await;
    let got = lossy(&proxied.until(b"+PONG\r\n").await);
    let took = start.elapsed();
    assert!(took < 2 * SECOND, "tierd took {took:?}: {got:?}");
    if got != "+OK\r\n+QUEUED\r\n*1\r\n+OK\r\n" {
        assert!(got.starts_with("+OK\r\n-ERR "), "no clear error: {got:?}");
        assert!(
            got.contains("CLIENT REPLY"),
            "the error does not say why: {got:?}"
        );
        assert!(!got.contains("timed out"), "{got:?}");
    }
    // And replies are on afterwards.
    proxied.expect(b"ECHO hi\r\n", b"$2\r\nhi\r\n").await;
}

// ---------------------------------------------------------------------------
// 7. UNSUBSCRIBE / PUNSUBSCRIBE when not subscribed
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_without_subscriptions_answers_like_redis_and_leaves_no_stream_mode() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut d = direct_raw(&redis, None).await;
    d.send(b"UNSUBSCRIBE\r\n").await;
    let want = d.frame().await;
    assert_frame(&want, b"*3\r\n$11\r\nunsubscribe\r\n$-1\r\n:0\r\n");

    let mut t = tierd.raw().await;
    let id = integer(&reply(&mut t, &["CLIENT", "ID"]).await);
    t.send(b"UNSUBSCRIBE\r\n").await;
    assert_frame(&t.frame().await, &want);
    // Still tierd's own client, answered by tierd: not a pass-through stream.
    assert_eq!(integer(&reply(&mut t, &["CLIENT", "ID"]).await), id);
    assert_frame(&reply(&mut t, &["SET", "u", "1"]).await, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_without_subscriptions_answers_like_redis_in_resp3() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut d = direct_raw(&redis, None).await;
    assert_eq!(d.cmd(&["HELLO", "3"]).await[0], b'%');
    d.send(b"UNSUBSCRIBE\r\n").await;
    let want = d.frame().await;
    assert_frame(&want, b">3\r\n$11\r\nunsubscribe\r\n_\r\n:0\r\n");

    let mut t = tierd.raw().await;
    let id = hello_id(&reply(&mut t, &["HELLO", "3"]).await);
    t.send(b"UNSUBSCRIBE\r\n").await;
    assert_frame(&t.frame().await, &want);
    assert_eq!(integer(&reply(&mut t, &["CLIENT", "ID"]).await), id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn punsubscribe_two_patterns_without_subscriptions_answers_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = differential(
        &redis,
        &tierd,
        b"PUNSUBSCRIBE a b\r\nPING\r\n",
        b"+PONG\r\n",
    )
    .await;
    assert_eq!(
        direct,
        "*3\r\n$12\r\npunsubscribe\r\n$1\r\na\r\n:0\r\n\
         *3\r\n$12\r\npunsubscribe\r\n$1\r\nb\r\n:0\r\n+PONG\r\n"
    );
    assert_eq!(proxied, direct);
}

// ---------------------------------------------------------------------------
// 8. AUTH without a configured password
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_against_a_server_without_a_password_gets_redis_exact_error() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) =
        differential(&redis, &tierd, b"AUTH foo\r\nPING\r\n", b"+PONG\r\n").await;
    assert!(
        direct.starts_with(
            "-ERR AUTH <password> called without any password configured for the default user."
        ),
        "{direct}"
    );
    assert_eq!(proxied, direct);
}

// ---------------------------------------------------------------------------
// 9. HELLO on a pinned session carries tierd's client id
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_while_pinned_reports_the_id_client_id_returns() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    for version in ["2", "3"] {
        let mut c = tierd.raw().await;
        let before = integer(&reply(&mut c, &["CLIENT", "ID"]).await);
        assert_frame(&reply(&mut c, &["SELECT", "1"]).await, b"+OK\r\n");
        let hello = reply(&mut c, &["HELLO", version]).await;
        let after = integer(&reply(&mut c, &["CLIENT", "ID"]).await);
        assert_eq!(
            hello_id(&hello),
            after,
            "HELLO {version}: {:?}",
            text(&hello)
        );
        assert_eq!(after, before, "HELLO {version} changed CLIENT ID");
    }
}

// ---------------------------------------------------------------------------
// 10. Large requests do not hold up other clients
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_sets_from_one_client_do_not_hold_up_another_clients_pings() {
    let redis = RedisServer::start();
    // A 20 MB/s link to Redis, so that each SET takes 400 ms on the wire,
    // and one pooled connection, which the PINGs would share with the SETs
    // if large requests were pooled.
    let link = SlowLink::start(redis.addr(), 20_000_000).await;
    let mut config = config_for(&link.url());
    config.upstream.pool_size = 1;
    let tierd = Tierd::start_with(config).await;
    const SETS: usize = 10;

    let mut pinger = tierd.raw().await;
    assert_frame(&reply(&mut pinger, &["PING"]).await, b"+PONG\r\n");

    let addr = tierd.addr;
    let writer = tokio::spawn(async move {
        let value = vec![b'v'; 8 * 1024 * 1024];
        let mut pipeline = Vec::with_capacity(SETS * (value.len() + 64));
        for i in 0..SETS {
            pipeline.extend(resp::<&[u8]>(&[
                b"SET",
                format!("big{i}").as_bytes(),
                &value,
            ]));
        }
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut rd, mut wr) = stream.into_split();
        // Write from a task of its own and read the replies meanwhile, as a
        // pipelining client does.
        let write = tokio::spawn(async move {
            wr.write_all(&pipeline).await.unwrap();
            wr
        });
        let want = b"+OK\r\n".repeat(SETS);
        let mut got = Vec::new();
        while got.len() < want.len() {
            let read = tokio::time::timeout(60 * SECOND, rd.read_buf(&mut got)).await;
            let n = read.expect("SET replies within 60 s").unwrap();
            assert!(n > 0, "closed after {:?}", lossy(&got));
        }
        assert_eq!(lossy(&got), lossy(&want));
        drop(write.await.unwrap());
    });

    let mut latencies = Vec::new();
    while !writer.is_finished() {
        let start = Instant::now();
        send(&mut pinger, &["PING"]).await;
        let pong = pinger.try_frame(10 * SECOND).await;
        latencies.push(start.elapsed());
        assert_eq!(pong.as_deref(), Some(&b"+PONG\r\n"[..]));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    writer.await.unwrap();
    let max = latencies.iter().max().copied().unwrap_or_default();
    eprintln!(
        "{} PINGs while {SETS} × 8 MB SETs went through; slowest {max:?}",
        latencies.len()
    );
    assert!(
        latencies.len() >= 3,
        "the SETs went through too fast to measure"
    );
    assert!(max < Duration::from_millis(500), "a PING took {max:?}");
}

// ===========================================================================
// Second review
// ===========================================================================

/// What a RESP3 client hears when it subscribes to `ch` (a push).
const SUBSCRIBED_CH_RESP3: &[u8] = b">3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n";

// ---------------------------------------------------------------------------
// 11. QUIT on a RESP3 subscription waits for what is ahead of it
// ---------------------------------------------------------------------------

/// In RESP3 a subscriber may run any command, so `+OK` on the stream is not
/// necessarily QUIT's: SET's `+OK` and BLPOP's `_` (after its 1 s timeout)
/// come first, then QUIT's `+OK`, then Redis closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_on_a_resp3_subscription_behind_set_and_blpop_answers_all_then_closes() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = Wire::connect(redis.addr()).await;
    let mut proxied = Wire::connect(tierd.addr).await;

    let setup = [resp(&["HELLO", "3"]), resp(&["SUBSCRIBE", "ch"])].concat();
    direct.send(&setup).await;
    proxied.send(&setup).await;
    let d = direct.until(SUBSCRIBED_CH_RESP3).await;
    let p = proxied.until(SUBSCRIBED_CH_RESP3).await;
    assert!(d.starts_with(b"%7\r\n"), "{:?}", lossy(&d));
    assert_eq!(lossy(&mask_hello_id(&p)), lossy(&mask_hello_id(&d)));

    let tail = [
        resp(&["SET", "k", "v"]),
        resp(&["BLPOP", "nolist", "1"]),
        resp(&["QUIT"]),
    ]
    .concat();
    let start = Instant::now();
    direct.send(&tail).await;
    proxied.send(&tail).await;
    let d = direct.read_to_close(5 * SECOND).await;
    let p = proxied.read_to_close(5 * SECOND).await;
    assert!(d.closed, "Redis did not close: {:?}", lossy(&d.got));
    assert_eq!(lossy(&d.got), "+OK\r\n_\r\n+OK\r\n");
    assert!(p.closed, "tierd did not close: {:?}", lossy(&p.got));
    assert_eq!(lossy(&p.got), lossy(&d.got));
    // BLPOP timed out before either side closed.
    assert!(
        start.elapsed() >= SECOND,
        "closed after {:?}",
        start.elapsed()
    );
}

/// The same, everything in one write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_on_a_resp3_subscription_behind_set_and_blpop_in_one_write_answers_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let bytes = b"HELLO 3\r\nSUBSCRIBE ch\r\nSET k v\r\nBLPOP nolist 1\r\nQUIT\r\n";
    let (direct, proxied) = differential_to_close(&redis, &tierd, bytes).await;
    let direct = lossy(&mask_hello_id(direct.as_bytes()));
    let proxied = lossy(&mask_hello_id(proxied.as_bytes()));
    assert!(
        direct.ends_with(&format!(
            "{}+OK\r\n_\r\n+OK\r\n",
            lossy(SUBSCRIBED_CH_RESP3)
        )),
        "{direct}"
    );
    assert_eq!(proxied, direct);
}

// ---------------------------------------------------------------------------
// 12. XREADGROUP takes its options in any order
// ---------------------------------------------------------------------------

/// `request` (an `XREADGROUP … BLOCK 0 … STREAMS s >` for `group` of
/// stream `s`) sent through tierd must block on a connection of its own:
/// other clients are answered at once, the command timeout does not apply,
/// and an XADD unblocks it with the entry.
async fn xreadgroup_blocks_only_its_client(group: &str, request: &[&str]) {
    let redis = RedisServer::start();
    let mut config = config_for(&redis.url());
    config.upstream.command_timeout = 3 * SECOND;
    let tierd = Tierd::start_with(config).await;
    let mut direct = direct_raw(&redis, None).await;
    assert_frame(
        &direct
            .cmd(&["XGROUP", "CREATE", "s", group, "$", "MKSTREAM"])
            .await,
        b"+OK\r\n",
    );

    let mut blocked = tierd.raw().await;
    send(&mut blocked, request).await;
    let sent = Instant::now();
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;

    // Four other clients are served at once, not behind the blocked read.
    let pings = (0..4).map(|_| {
        let addr = tierd.addr;
        tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let start = Instant::now();
            send(&mut c, &["PING"]).await;
            let pong = c.try_frame(5 * SECOND).await;
            (pong, start.elapsed())
        })
    });
    for ping in pings {
        let (pong, took) = ping.await.unwrap();
        assert_eq!(
            pong.as_deref().map(text),
            Some("+PONG\r\n".to_owned()),
            "PING while {request:?} blocked"
        );
        assert!(
            took < SECOND,
            "PING took {took:?} while {request:?} blocked"
        );
    }

    // Blocking commands are exempt from the command timeout.
    let past_timeout = (sent + 3 * SECOND + SECOND / 2).saturating_duration_since(Instant::now());
    let early = blocked.try_frame(past_timeout).await;
    assert!(
        early.is_none(),
        "{request:?} answered before any XADD: {:?}",
        early.map(|f| text(&f))
    );

    let id = direct.cmd(&["XADD", "s", "*", "f", "v"]).await;
    let id = support::probe::bulk_text(&id);
    let got = blocked
        .try_frame(2 * SECOND)
        .await
        .unwrap_or_else(|| panic!("XADD did not unblock {request:?}"));
    let want = format!(
        "*1\r\n*2\r\n$1\r\ns\r\n*1\r\n*2\r\n${}\r\n{id}\r\n*2\r\n$1\r\nf\r\n$1\r\nv\r\n",
        id.len()
    );
    assert_eq!(text(&got), want);
    assert_frame(&reply(&mut blocked, &["PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xreadgroup_with_block_before_group_blocks_only_its_client() {
    xreadgroup_blocks_only_its_client(
        "g",
        &[
            "XREADGROUP",
            "BLOCK",
            "0",
            "GROUP",
            "g",
            "c",
            "STREAMS",
            "s",
            ">",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xreadgroup_with_count_before_group_and_block_after_blocks_only_its_client() {
    xreadgroup_blocks_only_its_client(
        "g",
        &[
            "XREADGROUP",
            "COUNT",
            "1",
            "GROUP",
            "g",
            "c",
            "BLOCK",
            "0",
            "STREAMS",
            "s",
            ">",
        ],
    )
    .await;
}

// ---------------------------------------------------------------------------
// 13. A request that runs alone on a pinned connection behind a flood of
//     pushes
// ---------------------------------------------------------------------------

/// The key of a RESP3 tracking invalidation push for one key, or `None` for
/// any other frame.
fn invalidated_key(frame: &[u8]) -> Option<String> {
    let head = b">2\r\n$10\r\ninvalidate\r\n*1\r\n$";
    let rest = frame.strip_prefix(&head[..])?;
    let eol = rest.windows(2).position(|w| w == b"\r\n")?;
    let len: usize = text(&rest[..eol]).parse().ok()?;
    let key = rest.get(eol + 2..eol + 2 + len)?;
    (rest.len() == eol + 2 + len + 2).then(|| text(key))
}

/// EXEC of a transaction that holds `CLIENT SETNAME` runs alone on the
/// dedicated connection. Here 1,500 invalidation pushes (more than the
/// dedicated connection's channel holds) arrive after EXEC was sent and
/// before its reply: the client must get every push and EXEC's reply, and the
/// name must take effect.
///
/// The order on Redis's side is made certain with `CLIENT PAUSE WRITE`
/// (`DEBUG SLEEP` would need a sleep to know it had started, since Redis
/// answers nobody while it sleeps): the writer's 1,500 SETs are postponed
/// with all of them read, then the EXEC (whose transaction writes, so it is
/// postponed too), and `CLIENT UNPAUSE` runs them in that order: every push
/// goes out before EXEC's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_running_alone_behind_1500_invalidation_pushes_gets_them_all_and_its_reply() {
    const N: usize = 1500;
    let redis = RedisServer::start();
    let mut config = config_for(&redis.url());
    config.upstream.command_timeout = 3 * SECOND;
    let tierd = Tierd::start_with(config).await;
    let mut direct = direct_raw(&redis, None).await;

    let mut a = tierd.raw().await;
    assert_eq!(reply(&mut a, &["HELLO", "3"]).await[0], b'%');
    assert_frame(
        &reply(&mut a, &["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n",
    );
    let gets: Vec<u8> = (0..N)
        .flat_map(|i| encode(&["GET", &format!("k{i}")]))
        .collect();
    a.send(&gets).await;
    for i in 0..N {
        let got = a.frame().await;
        assert!(&got[..] == b"_\r\n", "GET k{i}: {:?}", text(&got));
    }
    assert_frame(&reply(&mut a, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(
        &reply(&mut a, &["CLIENT", "SETNAME", "x"]).await,
        b"+QUEUED\r\n",
    );
    assert_frame(&reply(&mut a, &["SET", "w", "1"]).await, b"+QUEUED\r\n");

    assert_frame(
        &direct.cmd(&["CLIENT", "PAUSE", "10000", "WRITE"]).await,
        b"+OK\r\n",
    );
    let mut writer = direct_raw(&redis, None).await;
    let sets: Vec<u8> = (0..N)
        .flat_map(|i| encode(&["SET", &format!("k{i}"), "v"]))
        .collect();
    writer.send(&sets).await;
    // Postponed at its first SET, with every other one in its query buffer.
    let rest = format!("qbuf={}", sets.len() - encode(&["SET", "k0", "v"]).len());
    let deadline = Deadline::new(5 * SECOND, format!("the writer postponed with {rest}"));
    loop {
        let list = client_list(&mut direct).await;
        let postponed = list.iter().any(|l| {
            client_field(l, "cmd") == Some("set")
                && client_field(l, "flags").is_some_and(|f| f.contains('b'))
                && l.split(' ').any(|kv| kv == rest)
        });
        if postponed {
            break;
        }
        deadline.tick().await;
    }
    send(&mut a, &["EXEC"]).await;
    // The writer and the EXEC.
    wait_blocked_clients(&mut direct, 2, 5 * SECOND).await;
    assert_frame(&direct.cmd(&["CLIENT", "UNPAUSE"]).await, b"+OK\r\n");

    let mut keys = std::collections::HashSet::new();
    let mut exec = None;
    let mut pushes_before_exec = 0;
    let deadline = Instant::now() + 5 * SECOND;
    while keys.len() < N || exec.is_none() {
        let limit = deadline.saturating_duration_since(Instant::now());
        let Some(frame) = a.try_frame(limit).await else {
            panic!(
                "after {} of {N} invalidations, EXEC's reply {}: nothing more within 5 s",
                keys.len(),
                if exec.is_some() { "seen" } else { "not seen" }
            );
        };
        if let Some(key) = invalidated_key(&frame) {
            assert!(keys.insert(key.clone()), "{key} invalidated twice");
            if exec.is_none() {
                pushes_before_exec += 1;
            }
        } else {
            assert!(exec.is_none(), "unexpected frame {:?}", text(&frame));
            exec = Some(frame);
        }
    }
    assert_frame(&exec.unwrap(), b"*2\r\n+OK\r\n+OK\r\n");
    let missing: Vec<usize> = (0..N)
        .filter(|i| !keys.contains(&format!("k{i}")))
        .collect();
    assert!(missing.is_empty(), "not invalidated: {missing:?}");
    // Redis sent them all first; tierd keeps that order.
    assert_eq!(pushes_before_exec, N, "pushes ahead of EXEC's reply");
    // The queued CLIENT SETNAME took effect.
    assert_frame(&reply(&mut a, &["CLIENT", "GETNAME"]).await, b"$1\r\nx\r\n");
    assert_frame(&reply(&mut a, &["PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// 14. CLIENT KILL reaches a client that does not read
// ---------------------------------------------------------------------------

/// The most a TCP socket's send buffer can grow to on this machine, without
/// `SO_SNDBUF` (autotuning) or with it.
fn kernel_send_buffer_max() -> usize {
    let field = |path: &str, n: usize| -> Option<usize> {
        std::fs::read_to_string(path)
            .ok()?
            .split_whitespace()
            .nth(n)?
            .parse()
            .ok()
    };
    let tcp = field("/proc/sys/net/ipv4/tcp_wmem", 2).unwrap_or(4 << 20);
    let core = field("/proc/sys/net/core/wmem_max", 0).unwrap_or(0);
    tcp.max(2 * core)
}

/// A client that pipelines GETs of a value larger than every kernel buffer
/// between tierd and it, and reads nothing: once the first byte of the first
/// reply has reached its socket, tierd is inside a write that cannot finish.
/// CLIENT KILL must still close it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_closes_a_client_that_does_not_read() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let value = vec![b'x'; 2 * kernel_send_buffer_max() + (1 << 20)];
    direct.send(&resp::<&[u8]>(&[b"SET", b"big", &value])).await;
    assert_frame(&direct.frame().await, b"+OK\r\n");

    // A small receive buffer, fixed before connecting, so that the kernel
    // does not grow it to take the replies in.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut a = Wire {
        stream: socket.connect(tierd.addr).await.unwrap(),
        buf: bytes::BytesMut::new(),
    };
    a.send(&resp(&["CLIENT", "ID"])).await;
    let id = lossy(&a.until(b"\r\n").await);
    let id = id
        .strip_prefix(':')
        .expect("CLIENT ID is an integer")
        .to_owned();
    const GETS: usize = 4;
    let gets: Vec<u8> = (0..GETS).flat_map(|_| resp(&["GET", "big"])).collect();
    a.send(&gets).await;

    // The first reply has started to arrive (peek does not read it).
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(5 * SECOND, a.stream.peek(&mut first)).await;
    assert!(
        matches!(peeked, Ok(Ok(1))),
        "no reply started within 5 s: {peeked:?}"
    );
    assert_eq!(first[0], b'$');

    let mut other = tierd.raw().await;
    assert_frame(&reply(&mut other, &["PING"]).await, b"+PONG\r\n");
    assert_frame(
        &reply(&mut other, &["CLIENT", "KILL", "ID", &id]).await,
        b":1\r\n",
    );
    // Without the client reading a byte, tierd lets it go: a later kill
    // finds nobody.
    let deadline = Deadline::new(3 * SECOND, format!("CLIENT KILL ID {id} to answer :0"));
    loop {
        let again = reply(&mut other, &["CLIENT", "KILL", "ID", &id]).await;
        if &again[..] == b":0\r\n" {
            break;
        }
        assert_frame(&again, b":1\r\n");
        deadline.tick().await;
    }
    assert_frame(&reply(&mut other, &["PING"]).await, b"+PONG\r\n");

    // Reading now, the client gets what was already on its way, then EOF.
    let outcome = a.read_to_close(5 * SECOND).await;
    assert!(
        outcome.closed,
        "still open after {} bytes",
        outcome.got.len()
    );
    let one = bulk_of(&value);
    assert!(
        outcome.got.len() < GETS * one.len(),
        "every reply arrived ({} bytes): the client was not cut off",
        outcome.got.len()
    );
    let offset = outcome
        .got
        .iter()
        .enumerate()
        .position(|(i, &b)| b != one[i % one.len()]);
    assert_eq!(offset, None, "what arrived is not the replies' bytes");
}

// ---------------------------------------------------------------------------
// 15. RESET's reply on a stream under CLIENT REPLY OFF
// ---------------------------------------------------------------------------

/// RESET turns `CLIENT REPLY` back on and is answered even when it was off;
/// the subscribe confirmation is sent regardless too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_on_a_subscription_under_client_reply_off_answers_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let bytes = b"CLIENT REPLY OFF\r\nSUBSCRIBE ch\r\nRESET\r\nPING\r\n";
    let (direct, proxied) = differential(&redis, &tierd, bytes, b"+PONG\r\n").await;
    assert_eq!(direct, format!("{SUBSCRIBED_CH}+RESET\r\n+PONG\r\n"));
    assert_eq!(proxied, direct);

    // Step by step, as a client waiting for each answer sends it.
    let mut direct = Wire::connect(redis.addr()).await;
    let mut proxied = Wire::connect(tierd.addr).await;
    let steps: [(Vec<u8>, &[u8]); 3] = [
        (
            [
                resp(&["CLIENT", "REPLY", "OFF"]),
                resp(&["SUBSCRIBE", "ch"]),
            ]
            .concat(),
            SUBSCRIBED_CH.as_bytes(),
        ),
        (resp(&["RESET"]), b"+RESET\r\n"),
        (resp(&["PING"]), b"+PONG\r\n"),
    ];
    for (bytes, end) in steps {
        direct.send(&bytes).await;
        let d = direct.until(end).await;
        assert!(
            d.is_empty(),
            "Redis: {:?} before {:?}",
            lossy(&d),
            lossy(end)
        );
        proxied.send(&bytes).await;
        let p = proxied.until(end).await;
        assert!(
            p.is_empty(),
            "tierd: {:?} before {:?}",
            lossy(&p),
            lossy(end)
        );
    }
}
