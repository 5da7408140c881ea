//! Upstream failures and lifecycle: Redis down at start, killed and restarted
//! under traffic, stopped (SIGSTOP) past the command timeout, connections
//! killed from the Redis side, graceful shutdown with requests in flight, and
//! clients that vanish mid-pipeline. tierd must answer with errors rather
//! than hang, recover without a restart, and never let one failure spill
//! onto requests that were not involved.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::exchange::{assert_frame, encode, reply, send, text};
use support::probe::{bulk, client_field, client_list, direct_raw, wait_blocked_clients, Deadline};
use support::{config_for, free_port, Raw, RedisServer, Tierd};

const SECOND: Duration = Duration::from_secs(1);
const UNAVAILABLE: &[u8] = b"-ERR upstream unavailable: ";

#[track_caller]
fn assert_unavailable(got: &[u8]) {
    // Once failures open the circuit breaker, the error says so.
    let open = got == b"-TRYAGAIN upstream unavailable (circuit open)\r\n";
    assert!(
        open || (got.starts_with(UNAVAILABLE) && got.ends_with(b"\r\n")),
        "expected an upstream-unavailable error, got {:?}",
        text(got)
    );
}

/// Sends `args` every poll until the reply is `want`; every reply on the way
/// must be `want` or an upstream-unavailable error.
async fn until_reply(raw: &mut Raw, args: &[&str], want: &[u8], limit: Duration) {
    let deadline = Deadline::new(limit, format!("{args:?} answered {:?}", text(want)));
    loop {
        let got = reply(raw, args).await;
        if got == want {
            return;
        }
        assert_unavailable(&got);
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_at_start_answers_errors_then_recovers() {
    let port = free_port();
    let tierd = Tierd::start(&format!("redis://127.0.0.1:{port}")).await;

    let mut c = tierd.raw().await;
    assert_unavailable(&reply(&mut c, &["PING"]).await);
    assert_unavailable(&reply(&mut c, &["GET", "k"]).await);
    // Commands that need a dedicated connection fail just as fast.
    let mut b = tierd.raw().await;
    assert_unavailable(&reply(&mut b, &["BLPOP", "q", "0"]).await);
    let mut m = tierd.raw().await;
    assert_unavailable(&reply(&mut m, &["MULTI"]).await);
    let mut s = tierd.raw().await;
    assert_unavailable(&reply(&mut s, &["SUBSCRIBE", "ch"]).await);

    // Redis comes up on that port: the same client recovers, no restart.
    let redis = tokio::task::block_in_place(|| RedisServer::start_on(port, &[]));
    until_reply(&mut c, &["PING"], b"+PONG\r\n", 10 * SECOND).await;
    assert_frame(&reply(&mut c, &["SET", "k", "v"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut c, &["GET", "k"]).await, b"$1\r\nv\r\n");

    // Dedicated connections work again too.
    let mut fresh = tierd.raw().await;
    assert_frame(&reply(&mut fresh, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut fresh, &["GET", "k"]).await, b"+QUEUED\r\n");
    assert_frame(&reply(&mut fresh, &["EXEC"]).await, b"*1\r\n$1\r\nv\r\n");
    let mut direct = direct_raw(&redis, None).await;
    assert_frame(&direct.cmd(&["GET", "k"]).await, b"$1\r\nv\r\n");
}

/// Counters one traffic client shares with the test.
#[derive(Default)]
struct Tally {
    /// SET+GET rounds that fully succeeded.
    ok: AtomicU64,
    /// Replies that were upstream-unavailable errors.
    errors: AtomicU64,
}

/// One client's traffic: `SET key i-n` and `GET key`, pipelined, until
/// `stop`. Returns a description of the first wrong reply.
async fn traffic(
    addr: std::net::SocketAddr,
    i: usize,
    tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
) -> Result<u64, String> {
    let mut raw = Raw::connect(addr).await;
    let key = format!("traffic:{i}");
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        n += 1;
        let value = format!("{i}-{n}");
        let mut pipeline = encode(&["SET", &key, &value]);
        pipeline.extend(encode(&["GET", &key]));
        raw.send(&pipeline).await;
        let set = raw
            .try_frame(3 * SECOND)
            .await
            .ok_or_else(|| format!("client {i}: no SET reply within 3 s (round {n})"))?;
        let get = raw
            .try_frame(3 * SECOND)
            .await
            .ok_or_else(|| format!("client {i}: no GET reply within 3 s (round {n})"))?;

        let set_ok = if set.as_ref() == b"+OK\r\n" {
            true
        } else if set.starts_with(UNAVAILABLE) {
            false
        } else {
            return Err(format!("client {i} round {n}: SET got {:?}", text(&set)));
        };
        if get.starts_with(UNAVAILABLE) {
            tally.errors.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if !set_ok {
            tally.errors.fetch_add(1, Ordering::Relaxed);
        }
        if get == bulk(&value) {
            if set_ok {
                tally.ok.fetch_add(1, Ordering::Relaxed);
            }
            continue;
        }
        if set_ok {
            // Acknowledged, then read on the same connection right after.
            return Err(format!(
                "client {i} round {n}: SET {value} was acknowledged but GET got {:?}",
                text(&get)
            ));
        }
        // The SET failed: GET may see the key lost by the restart or an
        // earlier value of this client's, but nothing else.
        let earlier = (1..n).any(|m| get == bulk(&format!("{i}-{m}")));
        if get.as_ref() != b"$-1\r\n" && !earlier {
            return Err(format!(
                "client {i} round {n}: GET after failed SET got {:?}",
                text(&get)
            ));
        }
    }
    Ok(n)
}

fn snapshot(tallies: &[Arc<Tally>], f: impl Fn(&Tally) -> &AtomicU64) -> Vec<u64> {
    tallies
        .iter()
        .map(|t| f(t).load(Ordering::Relaxed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_and_restarted_under_traffic() {
    const CLIENTS: usize = 4;
    let mut redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let tallies: Vec<Arc<Tally>> = (0..CLIENTS).map(|_| Arc::new(Tally::default())).collect();
    let tasks: Vec<_> = tallies
        .iter()
        .enumerate()
        .map(|(i, t)| tokio::spawn(traffic(tierd.addr, i, t.clone(), stop.clone())))
        .collect();

    let progressed =
        |base: &[u64], now: &[u64], by: u64| base.iter().zip(now).all(|(b, n)| *n >= b + by);
    let zero = vec![0; CLIENTS];
    let deadline = Deadline::new(5 * SECOND, "every client served before the kill");
    while !progressed(&zero, &snapshot(&tallies, |t| &t.ok), 20) {
        deadline.tick().await;
    }

    redis.kill_in_place();
    let errors_before = snapshot(&tallies, |t| &t.errors);
    let deadline = Deadline::new(
        5 * SECOND,
        "every client got upstream errors after the kill",
    );
    while !progressed(&errors_before, &snapshot(&tallies, |t| &t.errors), 1) {
        assert!(
            !tasks.iter().any(|t| t.is_finished()),
            "a traffic client stopped early"
        );
        deadline.tick().await;
    }
    // tierd itself is up: a new client connects and gets an error reply.
    let mut probe = tierd.raw().await;
    assert_unavailable(&reply(&mut probe, &["PING"]).await);

    redis.restart_in_place();
    let ok_before = snapshot(&tallies, |t| &t.ok);
    let deadline = Deadline::new(10 * SECOND, "every client recovered after the restart");
    while !progressed(&ok_before, &snapshot(&tallies, |t| &t.ok), 20) {
        assert!(
            !tasks.iter().any(|t| t.is_finished()),
            "a traffic client stopped early"
        );
        deadline.tick().await;
    }

    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let rounds = task.await.unwrap().unwrap_or_else(|e| panic!("{e}"));
        assert!(rounds > 40);
    }
    until_reply(&mut probe, &["PING"], b"+PONG\r\n", 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_fails_requests_to_a_stopped_upstream() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis.url());
    cfg.upstream.command_timeout = Duration::from_millis(500);
    let tierd = Tierd::start_with(cfg).await;
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SET", "k", "v"]).await, b"+OK\r\n");

    redis.pause();
    // `reply` allows 2 s: the 500 ms timeout must turn into an error.
    assert_unavailable(&reply(&mut c, &["GET", "k"]).await);
    // Still stopped: later requests and new dedicated connections fail too.
    assert_unavailable(&reply(&mut c, &["GET", "k"]).await);
    let mut m = tierd.raw().await;
    assert_unavailable(&reply(&mut m, &["MULTI"]).await);

    redis.resume();
    until_reply(&mut c, &["GET", "k"], b"$1\r\nv\r\n", 10 * SECOND).await;
    until_reply(&mut m, &["PING"], b"+PONG\r\n", 5 * SECOND).await;
    assert_frame(&reply(&mut m, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut m, &["EXEC"]).await, b"*0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_recover_after_redis_kills_every_pooled_connection() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_frame(&reply(&mut a, &["SET", "ka", "1"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut b, &["SET", "kb", "1"]).await, b"+OK\r\n");

    let mut direct = direct_raw(&redis, None).await;
    let killed = direct.cmd(&["CLIENT", "KILL", "TYPE", "normal"]).await;
    assert!(
        killed.starts_with(b":") && killed.as_ref() != b":0\r\n",
        "{}",
        text(&killed)
    );

    // Each reply on the way is either right or an upstream error, and both
    // clients end up served, on the connections they already had.
    until_reply(&mut a, &["GET", "ka"], b"$1\r\n1\r\n", 10 * SECOND).await;
    until_reply(&mut b, &["GET", "kb"], b"$1\r\n1\r\n", 10 * SECOND).await;
    assert_frame(&reply(&mut a, &["INCR", "ka"]).await, b":2\r\n");
    assert_frame(&reply(&mut b, &["INCR", "kb"]).await, b":2\r\n");
}

/// The id (on Redis) of the one connection blocked (or paused) in `cmd`.
async fn upstream_id_running(direct: &mut Raw, cmd: &str) -> String {
    let clients = client_list(direct).await;
    let mut ids = clients
        .iter()
        .filter(|l| client_field(l, "cmd") == Some(cmd))
        .filter(|l| client_field(l, "flags").is_some_and(|f| f.contains('b')))
        .filter_map(|l| client_field(l, "id"));
    let id = ids
        .next()
        .unwrap_or_else(|| panic!("no client running {cmd}: {clients:#?}"));
    assert!(
        ids.next().is_none(),
        "more than one client running {cmd}: {clients:#?}"
    );
    id.to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_dedicated_connection_fails_only_its_own_client() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_frame(&reply(&mut b, &["SET", "kb", "1"]).await, b"+OK\r\n");

    send(&mut a, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let id = upstream_id_running(&mut direct, "blpop").await;
    assert_frame(&direct.cmd(&["CLIENT", "KILL", "ID", &id]).await, b":1\r\n");

    // A's upstream state is gone: it gets an error or its connection is
    // closed (as a direct client's would be), promptly.
    match a.try_frame(2 * SECOND).await {
        Some(frame) => assert_unavailable(&frame),
        None => {
            let rest = a.read_to_close(SECOND).await;
            assert!(
                rest.is_some_and(|r| r.is_empty()),
                "BLPOP client neither answered nor closed"
            );
        }
    }
    // B, on the pool, never noticed.
    for i in 2..50 {
        assert_frame(
            &reply(&mut b, &["INCR", "kb"]).await,
            format!(":{i}\r\n").as_bytes(),
        );
    }
    let mut fresh = tierd.raw().await;
    assert_frame(&reply(&mut fresh, &["GET", "kb"]).await, b"$2\r\n49\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_pool_connections_do_not_disturb_a_blocked_client() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let own_id = client_id(&mut direct).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_frame(&reply(&mut b, &["PING"]).await, b"+PONG\r\n");

    send(&mut a, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let blocked_id = upstream_id_running(&mut direct, "blpop").await;

    // Kill every other connection: tierd's pool.
    let mut killed = 0;
    for line in client_list(&mut direct).await {
        let id = client_field(&line, "id").unwrap().to_owned();
        if id != own_id && id != blocked_id {
            assert_frame(&direct.cmd(&["CLIENT", "KILL", "ID", &id]).await, b":1\r\n");
            killed += 1;
        }
    }
    assert!(killed >= 1, "tierd had no pooled connections to kill");

    until_reply(&mut b, &["PING"], b"+PONG\r\n", 10 * SECOND).await;
    // A is still blocked, on the same upstream connection.
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    assert_eq!(upstream_id_running(&mut direct, "blpop").await, blocked_id);
    assert_frame(&reply(&mut b, &["LPUSH", "q", "v"]).await, b":1\r\n");
    let popped = a.try_frame(2 * SECOND).await.expect("BLPOP answered");
    assert_frame(&popped, b"*2\r\n$1\r\nq\r\n$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_pool_connection_fails_only_the_request_on_it() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis.url());
    cfg.upstream.pool_size = 2;
    let tierd = Tierd::start_with(cfg).await;
    let mut direct = direct_raw(&redis, None).await;
    let own_id = client_id(&mut direct).await;
    let mut x = tierd.raw().await;
    let mut y = tierd.raw().await;
    assert_frame(&reply(&mut x, &["PING"]).await, b"+PONG\r\n");
    let deadline = Deadline::new(5 * SECOND, "both pooled connections up");
    while client_list(&mut direct).await.len() != 3 {
        deadline.tick().await;
    }

    // With writes paused, X's SET stays in flight on one pooled connection.
    // Dropping the *other* one must not fail it.
    assert_frame(
        &direct.cmd(&["CLIENT", "PAUSE", "10000", "WRITE"]).await,
        b"+OK\r\n",
    );
    send(&mut x, &["SET", "kx", "1"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let x_conn = upstream_id_running(&mut direct, "set").await;
    let others: Vec<String> = client_list(&mut direct)
        .await
        .iter()
        .filter_map(|l| client_field(l, "id"))
        .filter(|id| *id != own_id && *id != x_conn)
        .map(str::to_owned)
        .collect();
    assert_eq!(others.len(), 1, "{others:?}");
    assert_frame(
        &direct.cmd(&["CLIENT", "KILL", "ID", &others[0]]).await,
        b":1\r\n",
    );
    assert_frame(&direct.cmd(&["CLIENT", "UNPAUSE"]).await, b"+OK\r\n");
    assert_frame(
        &x.try_frame(2 * SECOND).await.expect("X's SET answered"),
        b"+OK\r\n",
    );

    // Dropping the connection X's request is on fails that request, at once.
    assert_frame(
        &direct.cmd(&["CLIENT", "PAUSE", "10000", "WRITE"]).await,
        b"+OK\r\n",
    );
    send(&mut x, &["SET", "kx", "2"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let x_conn = upstream_id_running(&mut direct, "set").await;
    assert_frame(
        &direct.cmd(&["CLIENT", "KILL", "ID", &x_conn]).await,
        b":1\r\n",
    );
    let failed = x
        .try_frame(2 * SECOND)
        .await
        .expect("X's SET failed, not hung");
    assert_unavailable(&failed);
    assert_frame(&direct.cmd(&["CLIENT", "UNPAUSE"]).await, b"+OK\r\n");
    assert_frame(&direct.cmd(&["GET", "kx"]).await, b"$1\r\n1\r\n");

    // Both clients carry on.
    until_reply(&mut x, &["GET", "kx"], b"$1\r\n1\r\n", 10 * SECOND).await;
    until_reply(&mut y, &["GET", "kx"], b"$1\r\n1\r\n", 10 * SECOND).await;
}

async fn client_id(direct: &mut Raw) -> String {
    let id = direct.cmd(&["CLIENT", "ID"]).await;
    text(&id).trim_start_matches(':').trim_end().to_owned()
}

/// A Lua script that keeps Redis busy for about 300 ms and returns "done".
const BUSY_SCRIPT: &str = "local s = redis.call('TIME') local t0 = s[1] * 1000000 + s[2] \
     while true do local n = redis.call('TIME') \
     if n[1] * 1000000 + n[2] - t0 > 300000 then return 'done' end end";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_a_request_in_flight() {
    // With a 10 ms busy threshold, other clients get -BUSY while the script
    // runs: that is how the test knows the request is in flight.
    let redis = RedisServer::start_with(&["--busy-reply-threshold", "10"]);
    let tierd = Tierd::start(&redis.url()).await;
    let addr = tierd.addr;
    let mut direct = direct_raw(&redis, None).await;
    let mut a = tierd.raw().await;
    assert_frame(&reply(&mut a, &["PING"]).await, b"+PONG\r\n");
    // A client with nothing in flight is simply closed.
    let mut idle = tierd.raw().await;
    assert_frame(&reply(&mut idle, &["PING"]).await, b"+PONG\r\n");

    send(&mut a, &["EVAL", BUSY_SCRIPT, "0"]).await;
    let deadline = Deadline::new(5 * SECOND, "the script running on Redis");
    while !direct.cmd(&["PING"]).await.starts_with(b"-BUSY") {
        deadline.tick().await;
    }

    let stopped = tokio::time::timeout(10 * SECOND, tierd.stop())
        .await
        .expect("stop() returned");
    assert!(stopped.is_ok(), "{stopped:?}");
    let done = a
        .try_frame(2 * SECOND)
        .await
        .expect("in-flight reply written before closing");
    assert_frame(&done, b"$4\r\ndone\r\n");
    let rest = a
        .read_to_close(2 * SECOND)
        .await
        .expect("client closed after its reply");
    assert!(rest.is_empty(), "{}", text(&rest));
    let rest = idle
        .read_to_close(2 * SECOND)
        .await
        .expect("idle client closed");
    assert!(rest.is_empty(), "{}", text(&rest));
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "tierd still accepts connections after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_answers_a_blocked_command_that_times_out() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let addr = tierd.addr;
    let mut direct = direct_raw(&redis, None).await;
    let mut a = tierd.raw().await;

    send(&mut a, &["BLPOP", "q", "1"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let stopped = tokio::time::timeout(10 * SECOND, tierd.stop())
        .await
        .expect("stop() returned");
    assert!(stopped.is_ok(), "{stopped:?}");
    let reply = a
        .try_frame(3 * SECOND)
        .await
        .expect("BLPOP reply written before closing");
    assert_frame(&reply, b"*-1\r\n");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "tierd still accepts connections after stop"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_vanishing_mid_pipeline_does_not_affect_others() {
    const OTHERS: u64 = 1000;
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut y = tierd.raw().await;

    // X pipelines thousands of commands, ends with half a request, and
    // resets its connection without reading a single reply.
    let mut x = tierd.raw().await;
    let mut pipeline = Vec::new();
    for _ in 0..5000 {
        pipeline.extend(encode(&["INCR", "cx"]));
    }
    pipeline.extend_from_slice(b"*3\r\n$3\r\nSET\r\n$2\r\ncx");
    let vanish = tokio::spawn(async move {
        x.send(&pipeline).await;
        // A zero linger resets the connection on drop (it never blocks).
        #[allow(deprecated)]
        x.stream.set_linger(Some(Duration::ZERO)).unwrap();
        drop(x);
    });

    // Meanwhile Y's own pipeline is answered in order.
    let mut ours = Vec::new();
    for _ in 0..OTHERS {
        ours.extend(encode(&["INCR", "cy"]));
    }
    y.send(&ours).await;
    for i in 1..=OTHERS {
        let got = y
            .try_frame(5 * SECOND)
            .await
            .expect("Y's pipeline answered");
        assert_frame(&got, format!(":{i}\r\n").as_bytes());
    }
    vanish.await.unwrap();

    assert_frame(
        &reply(&mut y, &["INCR", "cy"]).await,
        format!(":{}\r\n", OTHERS + 1).as_bytes(),
    );
    let mut z = tierd.raw().await;
    assert_frame(&reply(&mut z, &["PING"]).await, b"+PONG\r\n");
    let cx = reply(&mut z, &["GET", "cx"]).await;
    let n: u64 = if cx.as_ref() == b"$-1\r\n" {
        0
    } else {
        support::probe::bulk_text(&cx).parse().unwrap()
    };
    assert!(n <= 5000, "cx = {n}");
    // The half request never ran: cx is still a counter.
    assert!(reply(&mut z, &["INCR", "cx"]).await.starts_with(b":"));
}
