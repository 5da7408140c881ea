//! Connection state through tierd: transactions, pub/sub, blocking commands,
//! databases, authentication, RESET/QUIT, client tracking, and that a client
//! who leaves takes its upstream state with it. Redis itself is the
//! reference: where it matters, the same commands run on a direct connection
//! and the reply bytes are compared.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::exchange::{assert_frame, encode, reply, send, text};
use support::probe::{
    bulk, client_field, client_list, direct_raw, info_field, wait_blocked_clients, Deadline,
};
use support::{both, config_for, show, Raw, RedisServer, Tierd};

const SECOND: Duration = Duration::from_secs(1);

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A WATCHed key changed by another client makes EXEC abort; returns every
/// reply (A's and B's) in order.
async fn watch_conflict(a: &mut Raw, b: &mut Raw, key: &str) -> Vec<Bytes> {
    vec![
        reply(a, &["WATCH", key]).await,
        reply(a, &["MULTI"]).await,
        reply(a, &["SET", key, "a"]).await,
        reply(b, &["SET", key, "b"]).await,
        reply(a, &["EXEC"]).await,
        reply(a, &["GET", key]).await,
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_conflict_aborts_exec_with_a_null_array_in_resp2() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut da = direct_raw(&redis, None).await;
    let mut db = direct_raw(&redis, None).await;
    let direct = watch_conflict(&mut da, &mut db, "w:direct").await;

    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    let proxied = watch_conflict(&mut a, &mut b, "w:proxied").await;

    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[2], b"+QUEUED\r\n");
    assert_frame(&proxied[4], b"*-1\r\n");
    assert_frame(&proxied[5], b"$1\r\nb\r\n");
    let mut check = direct_raw(&redis, None).await;
    assert_frame(&check.cmd(&["GET", "w:proxied"]).await, b"$1\r\nb\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_conflict_aborts_exec_with_a_resp3_null() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut da = direct_raw(&redis, None).await;
    let mut db = direct_raw(&redis, None).await;
    assert_eq!(da.cmd(&["HELLO", "3"]).await[0], b'%');
    let direct = watch_conflict(&mut da, &mut db, "w3:direct").await;

    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    assert_eq!(reply(&mut a, &["HELLO", "3"]).await[0], b'%');
    let proxied = watch_conflict(&mut a, &mut b, "w3:proxied").await;

    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[4], b"_\r\n");
    assert_frame(&proxied[5], b"$1\r\nb\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_returns_the_array_of_replies() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["MULTI"],
            &["SET", "tx", "1"],
            &["INCR", "tx"],
            &["GET", "tx"],
            &["EXEC"],
            // A command error while queueing aborts the whole transaction.
            &["MULTI"],
            &["INCR"],
            &["SET", "tx", "2"],
            &["EXEC"],
            &["GET", "tx"],
            // DISCARD drops what was queued.
            &["MULTI"],
            &["SET", "tx", "3"],
            &["DISCARD"],
            &["GET", "tx"],
            &["EXEC"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    let expected: [&[u8]; 5] = [
        b"+OK\r\n",
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"+QUEUED\r\n",
        b"*3\r\n+OK\r\n:2\r\n$1\r\n2\r\n",
    ];
    for (got, want) in proxied.iter().zip(expected) {
        assert_frame(got, want);
    }
    assert!(
        proxied[8].starts_with(b"-EXECABORT"),
        "{}",
        text(&proxied[8])
    );
    assert_frame(&proxied[9], b"$1\r\n2\r\n");
    assert_frame(&proxied[13], b"$1\r\n2\r\n");
}

/// Sends `cmds` in one write and reads one reply per command.
async fn pipeline(raw: &mut Raw, cmds: &[&[&str]]) -> Vec<Bytes> {
    let mut bytes = Vec::new();
    for cmd in cmds {
        bytes.extend(encode(cmd));
    }
    raw.send(&bytes).await;
    let mut replies = Vec::new();
    for cmd in cmds {
        match raw.try_frame(2 * SECOND).await {
            Some(frame) => replies.push(frame),
            None => panic!(
                "no reply to pipelined {cmd:?} within 2 s; got {:?}",
                show(&replies)
            ),
        }
    }
    replies
}

/// State changes in one pipeline: each reply must come from the state the
/// commands before it set up, exactly as on a direct connection.
const STATEFUL_PIPELINE: &[&[&str]] = &[
    &["SET", "pk", "zero"],
    &["SELECT", "1"],
    &["SET", "pk", "one"],
    &["GET", "pk"],
    &["MULTI"],
    &["GET", "pk"],
    &["SELECT", "0"],
    &["GET", "pk"],
    &["EXEC"],
    &["GET", "pk"],
    &["WATCH", "pk"],
    &["GET", "pk"],
    &["UNWATCH"],
    &["BLPOP", "pq", "0.05"],
    &["GET", "pk"],
    &["SELECT", "2"],
    &["GET", "pk"],
    &["SELECT", "0"],
    &["SUBSCRIBE", "pc"],
    &["PING"],
    &["UNSUBSCRIBE", "pc"],
    &["GET", "pk"],
    &["DEL", "pk"],
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_state_changes_match_redis_in_resp2() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut d = direct_raw(&redis, None).await;
    let direct = pipeline(&mut d, STATEFUL_PIPELINE).await;
    let mut t = tierd.raw().await;
    let proxied = pipeline(&mut t, STATEFUL_PIPELINE).await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[8], b"*3\r\n$3\r\none\r\n+OK\r\n$4\r\nzero\r\n");
    assert_frame(&proxied[9], b"$4\r\nzero\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_state_changes_match_redis_in_resp3() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut d = direct_raw(&redis, None).await;
    assert_eq!(d.cmd(&["HELLO", "3"]).await[0], b'%');
    let direct = pipeline(&mut d, STATEFUL_PIPELINE).await;
    let mut t = tierd.raw().await;
    assert_eq!(reply(&mut t, &["HELLO", "3"]).await[0], b'%');
    let proxied = pipeline(&mut t, STATEFUL_PIPELINE).await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[13], b"_\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_multi_does_not_start_a_transaction() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["MULTI", "extra"],
            &["CLIENT", "SETNAME", "n1"],
            &["EXEC"],
            &["CLIENT", "GETNAME"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[3], b"$2\r\nn1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_after_a_multi_rejected_for_noauth_stays_authenticated() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["MULTI"],
            &["AUTH", "s3cret"],
            &["SET", "k", "v"],
            &["EXEC"],
            &["GET", "k"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[0], b"-NOAUTH Authentication required.\r\n");
    assert_frame(&proxied[4], b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscribe_and_publish_across_clients_in_resp2() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    // `d` subscribes directly and is the reference for every frame `t`
    // (subscribed through tierd) receives; `p` publishes through tierd.
    let mut d = direct_raw(&redis, None).await;
    let mut t = tierd.raw().await;
    let mut p = tierd.raw().await;

    for cmd in [&["SUBSCRIBE", "ch", "other"][..], &["PSUBSCRIBE", "news.*"]] {
        send(&mut d, cmd).await;
        send(&mut t, cmd).await;
        // One confirmation per channel or pattern.
        for _ in 1..cmd.len() {
            assert_frame(&t.frame().await, &d.frame().await);
        }
    }
    // (The loop compared them; check one literally too.)
    let mut t2 = tierd.raw().await;
    assert_frame(
        &reply(&mut t2, &["SUBSCRIBE", "solo"]).await,
        b"*3\r\n$9\r\nsubscribe\r\n$4\r\nsolo\r\n:1\r\n",
    );

    assert_frame(&reply(&mut p, &["PUBLISH", "ch", "hello"]).await, b":2\r\n");
    let message = t
        .try_frame(2 * SECOND)
        .await
        .expect("message through tierd");
    assert_frame(
        &message,
        b"*3\r\n$7\r\nmessage\r\n$2\r\nch\r\n$5\r\nhello\r\n",
    );
    assert_frame(&message, &d.frame().await);

    assert_frame(
        &reply(&mut p, &["PUBLISH", "news.uk", "x"]).await,
        b":2\r\n",
    );
    let pmessage = t
        .try_frame(2 * SECOND)
        .await
        .expect("pmessage through tierd");
    assert_frame(
        &pmessage,
        b"*4\r\n$8\r\npmessage\r\n$6\r\nnews.*\r\n$7\r\nnews.uk\r\n$1\r\nx\r\n",
    );
    assert_frame(&pmessage, &d.frame().await);

    // PING and a forbidden command in RESP2 subscribed mode.
    let mut subscribed = Vec::new();
    for cmd in [&["PING"][..], &["PING", "hi"], &["GET", "k"]] {
        let got = reply(&mut t, cmd).await;
        assert_frame(&got, &d.cmd(cmd).await);
        subscribed.push(got);
    }
    assert_frame(&subscribed[0], b"*2\r\n$4\r\npong\r\n$0\r\n\r\n");
    assert_frame(&subscribed[1], b"*2\r\n$4\r\npong\r\n$2\r\nhi\r\n");
    assert!(
        subscribed[2].starts_with(b"-ERR Can't execute 'get'"),
        "{}",
        text(&subscribed[2])
    );

    // UNSUBSCRIBE one channel: its messages stop, the pattern's do not.
    let unsub = reply(&mut t, &["UNSUBSCRIBE", "ch"]).await;
    assert_frame(&unsub, b"*3\r\n$11\r\nunsubscribe\r\n$2\r\nch\r\n:2\r\n");
    assert_frame(&unsub, &d.cmd(&["UNSUBSCRIBE", "ch"]).await);
    assert_frame(&reply(&mut p, &["PUBLISH", "ch", "gone"]).await, b":0\r\n");
    assert_frame(
        &reply(&mut p, &["PUBLISH", "news.fr", "y"]).await,
        b":2\r\n",
    );
    // The next frame is the pattern message: nothing arrived for "ch".
    let next = t
        .try_frame(2 * SECOND)
        .await
        .expect("pmessage after unsubscribe");
    assert_frame(&next, &d.frame().await);
    assert!(
        next.ends_with(b"$7\r\nnews.fr\r\n$1\r\ny\r\n"),
        "{}",
        text(&next)
    );

    // Leaving every channel and pattern ends subscribed mode.
    let unsub_all = reply(&mut t, &["UNSUBSCRIBE"]).await;
    assert_frame(
        &unsub_all,
        b"*3\r\n$11\r\nunsubscribe\r\n$5\r\nother\r\n:1\r\n",
    );
    assert_frame(&unsub_all, &d.cmd(&["UNSUBSCRIBE"]).await);
    let punsub = reply(&mut t, &["PUNSUBSCRIBE"]).await;
    assert_frame(
        &punsub,
        b"*3\r\n$12\r\npunsubscribe\r\n$6\r\nnews.*\r\n:0\r\n",
    );
    assert_frame(&punsub, &d.cmd(&["PUNSUBSCRIBE"]).await);
    assert_frame(&reply(&mut p, &["SET", "k", "v"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut t, &["GET", "k"]).await, b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resp3_subscriber_gets_push_frames_and_can_still_run_commands() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut d = direct_raw(&redis, None).await;
    let mut t = tierd.raw().await;
    let mut p = tierd.raw().await;
    assert_eq!(d.cmd(&["HELLO", "3"]).await[0], b'%');
    assert_eq!(reply(&mut t, &["HELLO", "3"]).await[0], b'%');
    assert_frame(&reply(&mut p, &["SET", "k3", "v"]).await, b"+OK\r\n");

    let sub = reply(&mut t, &["SUBSCRIBE", "ch3"]).await;
    assert_frame(&sub, b">3\r\n$9\r\nsubscribe\r\n$3\r\nch3\r\n:1\r\n");
    assert_frame(&sub, &d.cmd(&["SUBSCRIBE", "ch3"]).await);

    // A regular command in RESP3 subscribed mode.
    let get = reply(&mut t, &["GET", "k3"]).await;
    assert_frame(&get, b"$1\r\nv\r\n");
    assert_frame(&get, &d.cmd(&["GET", "k3"]).await);

    assert_frame(&reply(&mut p, &["PUBLISH", "ch3", "m1"]).await, b":2\r\n");
    let push = t.try_frame(2 * SECOND).await.expect("push through tierd");
    assert_frame(&push, b">3\r\n$7\r\nmessage\r\n$3\r\nch3\r\n$2\r\nm1\r\n");
    assert_frame(&push, &d.frame().await);

    // Interleaved: the message was published before GET was sent, so it
    // arrives first, then GET's reply, then PING's.
    assert_frame(&reply(&mut p, &["PUBLISH", "ch3", "m2"]).await, b":2\r\n");
    send(&mut t, &["GET", "k3"]).await;
    send(&mut t, &["PING"]).await;
    let frames = [t.frame().await, t.frame().await, t.frame().await];
    send(&mut d, &["GET", "k3"]).await;
    send(&mut d, &["PING"]).await;
    let reference = [d.frame().await, d.frame().await, d.frame().await];
    assert_eq!(show(&frames), show(&reference));
    assert_frame(
        &frames[0],
        b">3\r\n$7\r\nmessage\r\n$3\r\nch3\r\n$2\r\nm2\r\n",
    );
    assert_frame(&frames[1], b"$1\r\nv\r\n");
    assert_frame(&frames[2], b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blpop_blocks_one_client_while_others_are_served() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    let mut c = tierd.raw().await;

    send(&mut a, &["BLPOP", "queue", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;

    for i in 0..50 {
        let n = i.to_string();
        assert_frame(&reply(&mut b, &["SET", "bk", &n]).await, b"+OK\r\n");
        assert_frame(&reply(&mut b, &["GET", "bk"]).await, &bulk(&n));
        assert_frame(&reply(&mut c, &["PING"]).await, b"+PONG\r\n");
        assert_frame(
            &reply(&mut c, &["INCR", "ck"]).await,
            format!(":{}\r\n", i + 1).as_bytes(),
        );
    }
    // A client that connects while A is blocked is served too.
    let mut late = tierd.raw().await;
    assert_frame(&reply(&mut late, &["PING"]).await, b"+PONG\r\n");
    // A is still the one blocked client.
    assert_eq!(
        info_field(&mut direct, "clients", "blocked_clients")
            .await
            .as_deref(),
        Some("1")
    );

    assert_frame(&reply(&mut b, &["LPUSH", "queue", "v"]).await, b":1\r\n");
    let popped = a.try_frame(2 * SECOND).await.expect("BLPOP unblocked");
    assert_frame(&popped, b"*2\r\n$5\r\nqueue\r\n$1\r\nv\r\n");
    wait_blocked_clients(&mut direct, 0, 5 * SECOND).await;
    assert_frame(&reply(&mut a, &["PING"]).await, b"+PONG\r\n");
    assert_frame(&reply(&mut a, &["LLEN", "queue"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_is_isolated_between_clients() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut a = tierd.raw().await;
    let mut b = tierd.raw().await;
    let mut direct = direct_raw(&redis, None).await;

    assert_frame(&reply(&mut a, &["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SET", "k", "one"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut b, &["GET", "k"]).await, b"$-1\r\n");
    assert_frame(&reply(&mut a, &["GET", "k"]).await, b"$3\r\none\r\n");
    assert_frame(&direct.cmd(&["GET", "k"]).await, b"$-1\r\n");
    assert_frame(&direct.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&direct.cmd(&["GET", "k"]).await, b"$3\r\none\r\n");

    // Out of range: Redis's exact error, and the client stays on db 1.
    let err = reply(&mut a, &["SELECT", "99"]).await;
    assert_frame(&err, &direct.cmd(&["SELECT", "99"]).await);
    assert_frame(&err, b"-ERR DB index is out of range\r\n");
    assert_frame(&reply(&mut a, &["GET", "k"]).await, b"$3\r\none\r\n");

    // Back to db 0.
    assert_frame(&reply(&mut a, &["SELECT", "0"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["GET", "k"]).await, b"$-1\r\n");
    // And a failed SELECT from db 0 leaves the client on db 0.
    assert_frame(&reply(&mut b, &["SET", "k", "zero"]).await, b"+OK\r\n");
    assert_frame(
        &reply(&mut a, &["SELECT", "99"]).await,
        b"-ERR DB index is out of range\r\n",
    );
    assert_frame(&reply(&mut a, &["GET", "k"]).await, b"$4\r\nzero\r\n");
    // Still isolated: B never moved.
    assert_frame(&reply(&mut b, &["GET", "k"]).await, b"$4\r\nzero\r\n");
}

/// Where `key` lives: the db numbers (0..4) in which it exists.
async fn dbs_holding(direct: &mut Raw, key: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for db in 0..4u32 {
        assert_frame(&direct.cmd(&["SELECT", &db.to_string()]).await, b"+OK\r\n");
        if direct.cmd(&["EXISTS", key]).await.as_ref() == b":1\r\n" {
            found.push(db);
        }
    }
    assert_frame(&direct.cmd(&["SELECT", "0"]).await, b"+OK\r\n");
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_inside_multi_switches_db_only_if_exec_runs_it() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut a = tierd.raw().await;
    let mut other = tierd.raw().await;

    // EXEC runs the SELECT: later commands use db 3.
    assert_frame(&reply(&mut a, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SELECT", "3"]).await, b"+QUEUED\r\n");
    assert_frame(&reply(&mut a, &["EXEC"]).await, b"*1\r\n+OK\r\n");
    assert_frame(&reply(&mut a, &["SET", "m3", "x"]).await, b"+OK\r\n");
    assert_eq!(dbs_holding(&mut direct, "m3").await, [3]);
    assert_frame(&reply(&mut a, &["SELECT", "0"]).await, b"+OK\r\n");

    // EXECABORT: the queued SELECT never ran, the client is still on db 0,
    // so SELECT 1 afterwards really switches.
    assert_frame(&reply(&mut a, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SELECT", "1"]).await, b"+QUEUED\r\n");
    assert!(reply(&mut a, &["INCR"])
        .await
        .starts_with(b"-ERR wrong number"));
    assert!(reply(&mut a, &["EXEC"]).await.starts_with(b"-EXECABORT"));
    assert_frame(&reply(&mut a, &["SET", "m0", "x"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SET", "m1", "x"]).await, b"+OK\r\n");
    assert_eq!(dbs_holding(&mut direct, "m0").await, [0]);
    assert_eq!(dbs_holding(&mut direct, "m1").await, [1]);
    assert_frame(&reply(&mut a, &["SELECT", "0"]).await, b"+OK\r\n");

    // Aborted by WATCH: same.
    assert_frame(&reply(&mut a, &["WATCH", "w"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SELECT", "2"]).await, b"+QUEUED\r\n");
    assert_frame(
        &reply(&mut other, &["SET", "w", "changed"]).await,
        b"+OK\r\n",
    );
    assert_frame(&reply(&mut a, &["EXEC"]).await, b"*-1\r\n");
    assert_frame(&reply(&mut a, &["SET", "w0", "x"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SELECT", "2"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut a, &["SET", "w2", "x"]).await, b"+OK\r\n");
    assert_eq!(dbs_holding(&mut direct, "w0").await, [0]);
    assert_eq!(dbs_holding(&mut direct, "w2").await, [2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_with_a_malformed_index_gets_redis_error_and_changes_nothing() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["SET", "sk", "zero"],
            // Redis reads the index with string2ll: no leading zeros or
            // signs, no spaces, within a long.
            &["SELECT", "00"],
            &["SELECT", "+0"],
            &["SELECT", "1x"],
            &["SELECT", "-1"],
            &["SELECT", "4294967297"],
            &["SELECT"],
            &["GET", "sk"],
            &["SELECT", "1"],
            &["SET", "sk", "one"],
            &["SELECT", "01"],
            &["SELECT", "+1"],
            &["GET", "sk"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(
        &proxied[1],
        b"-ERR value is not an integer or out of range\r\n",
    );
    assert_frame(&proxied[12], b"$3\r\none\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_with_a_malformed_version_gets_redis_error_and_keeps_resp2() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["HELLO", "03"],
            &["HELLO", "+3"],
            &["HELLO", "3.0"],
            &["SET", "hk", "v"],
            // Still RESP2: a null is $-1, not _.
            &["GET", "nokey"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(
        &proxied[0],
        b"-ERR Protocol version is not an integer or out of range\r\n",
    );
    assert_frame(&proxied[4], b"$-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_against_requirepass_gets_redis_replies() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    // tierd's URL carries no password: clients authenticate themselves.
    let tierd = Tierd::start(&redis.url()).await;

    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[
            &["GET", "k"],
            &["AUTH"],
            &["AUTH", "wrong"],
            &["AUTH", "default", "wrong"],
            &["AUTH", "s3cret"],
            &["SET", "k", "v"],
            &["GET", "k"],
        ],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[0], b"-NOAUTH Authentication required.\r\n");
    assert_frame(
        &proxied[2],
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    );
    assert_frame(&proxied[4], b"+OK\r\n");
    assert_frame(&proxied[6], b"$1\r\nv\r\n");

    // Another client is not authenticated by the first one's AUTH.
    let mut other = tierd.raw().await;
    assert_frame(
        &reply(&mut other, &["GET", "k"]).await,
        b"-NOAUTH Authentication required.\r\n",
    );

    // HELLO 3 AUTH on a fresh client.
    let mut h = tierd.raw().await;
    let hello = reply(&mut h, &["HELLO", "3", "AUTH", "default", "s3cret"]).await;
    assert!(hello.starts_with(b"%7\r\n"), "{}", text(&hello));
    assert!(
        contains(&hello, b"$5\r\nproto\r\n:3\r\n"),
        "{}",
        text(&hello)
    );
    assert_frame(&reply(&mut h, &["GET", "k"]).await, b"$1\r\nv\r\n");

    // HELLO with a wrong password: Redis's error, still unauthenticated.
    let mut w = tierd.raw().await;
    let mut dw = direct_raw(&redis, None).await;
    let bad = reply(&mut w, &["HELLO", "3", "AUTH", "default", "nope"]).await;
    assert_frame(
        &bad,
        &dw.cmd(&["HELLO", "3", "AUTH", "default", "nope"]).await,
    );
    assert_frame(
        &bad,
        b"-WRONGPASS invalid username-password pair or user is disabled.\r\n",
    );
    assert_frame(
        &reply(&mut w, &["GET", "k"]).await,
        b"-NOAUTH Authentication required.\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_hello_3_gets_redis_noauth_error() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let tierd = Tierd::start(&redis.url()).await;
    let (direct, proxied) = both(
        &redis,
        &tierd,
        &[&["HELLO", "3"], &["HELLO", "2"], &["PING"]],
    )
    .await;
    assert_eq!(show(&proxied), show(&direct));
    assert!(
        proxied[0].starts_with(b"-NOAUTH HELLO must be called"),
        "{}",
        text(&proxied[0])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acl_user_runs_as_itself_through_tierd() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let tierd = Tierd::start(&redis.url()).await;
    let mut admin = direct_raw(&redis, Some("s3cret")).await;
    assert_frame(
        &admin
            .cmd(&["ACL", "SETUSER", "alice", "on", ">pw", "~a:*", "+@all"])
            .await,
        b"+OK\r\n",
    );

    let script: &[&[&str]] = &[
        &["AUTH", "alice", "pw"],
        &["SET", "a:1", "x"],
        &["SET", "b:1", "x"],
        &["ACL", "WHOAMI"],
        &["AUTH", "alice", "wrong"],
        // A failed AUTH leaves the client as alice.
        &["SET", "b:1", "x"],
        &["AUTH", "default", "s3cret"],
        &["SET", "b:1", "y"],
        &["ACL", "WHOAMI"],
    ];
    let (direct, proxied) = both(&redis, &tierd, script).await;
    assert_eq!(show(&proxied), show(&direct));
    assert_frame(&proxied[0], b"+OK\r\n");
    assert_frame(&proxied[1], b"+OK\r\n");
    assert!(proxied[2].starts_with(b"-NOPERM"), "{}", text(&proxied[2]));
    assert_frame(&proxied[3], b"$5\r\nalice\r\n");
    assert!(proxied[5].starts_with(b"-NOPERM"), "{}", text(&proxied[5]));
    assert_frame(&proxied[7], b"+OK\r\n");
    assert_frame(&proxied[8], b"$7\r\ndefault\r\n");

    // Identity survives moving onto and off a dedicated connection, in
    // both orders (AUTH before SELECT, and AUTH on the dedicated one).
    let script: &[&[&str]] = &[
        &["AUTH", "alice", "pw"],
        &["SELECT", "1"],
        &["SET", "a:2", "x"],
        &["SET", "b:2", "x"],
        &["SELECT", "0"],
        &["SET", "b:2", "x"],
        &["ACL", "WHOAMI"],
    ];
    let (direct, proxied) = both(&redis, &tierd, script).await;
    assert_eq!(show(&proxied), show(&direct));
    assert!(proxied[3].starts_with(b"-NOPERM"), "{}", text(&proxied[3]));
    assert!(proxied[5].starts_with(b"-NOPERM"), "{}", text(&proxied[5]));
    let script: &[&[&str]] = &[
        &["AUTH", "s3cret"],
        &["SELECT", "1"],
        &["AUTH", "alice", "pw"],
        &["SET", "b:3", "x"],
        &["SELECT", "0"],
        &["SET", "b:3", "x"],
        &["SET", "a:3", "x"],
        &["ACL", "WHOAMI"],
    ];
    let (direct, proxied) = both(&redis, &tierd, script).await;
    assert_eq!(show(&proxied), show(&direct));
    assert!(proxied[3].starts_with(b"-NOPERM"), "{}", text(&proxied[3]));
    assert!(proxied[5].starts_with(b"-NOPERM"), "{}", text(&proxied[5]));
    assert_frame(&proxied[7], b"$5\r\nalice\r\n");

    // Another tierd client that authenticated as default is not alice.
    let mut other = tierd.raw().await;
    assert_frame(&reply(&mut other, &["AUTH", "s3cret"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut other, &["SET", "b:2", "z"]).await, b"+OK\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_in_the_upstream_url_serves_clients_without_auth() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let tierd = Tierd::start(&format!("redis://:s3cret@127.0.0.1:{}", redis.port)).await;
    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["SET", "k", "v"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut c, &["GET", "k"]).await, b"$1\r\nv\r\n");
    assert_frame(
        &reply(&mut c, &["ACL", "WHOAMI"]).await,
        b"$7\r\ndefault\r\n",
    );
    // Pinned state and RESP3 work without AUTH too.
    assert_frame(&reply(&mut c, &["SELECT", "2"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut c, &["GET", "k"]).await, b"$-1\r\n");
    let mut r3 = tierd.raw().await;
    assert_eq!(reply(&mut r3, &["HELLO", "3"]).await[0], b'%');
    assert_frame(&reply(&mut r3, &["GET", "k"]).await, b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_leaves_multi_and_returns_to_db_0() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    assert_frame(&direct.cmd(&["SET", "rk", "zero"]).await, b"+OK\r\n");

    let (d, t) = both(
        &redis,
        &tierd,
        &[
            &["SELECT", "1"],
            &["SET", "rk", "one"],
            &["MULTI"],
            &["SET", "rk", "queued"],
            &["RESET"],
            &["GET", "rk"],
            &["EXEC"],
        ],
    )
    .await;
    assert_eq!(show(&t), show(&d));
    assert_frame(&t[4], b"+RESET\r\n");
    // Read from db 0, not queued.
    assert_frame(&t[5], b"$4\r\nzero\r\n");
    assert_frame(&t[6], b"-ERR EXEC without MULTI\r\n");
    assert_frame(&direct.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&direct.cmd(&["GET", "rk"]).await, b"$3\r\none\r\n");

    // RESET also ends subscribed mode: no more messages, commands answered.
    let mut s = tierd.raw().await;
    reply(&mut s, &["SUBSCRIBE", "rc"]).await;
    assert_frame(&reply(&mut s, &["RESET"]).await, b"+RESET\r\n");
    let mut p = tierd.raw().await;
    reply(&mut p, &["PUBLISH", "rc", "x"]).await;
    assert_frame(&reply(&mut s, &["GET", "rk"]).await, b"$4\r\nzero\r\n");
    assert_frame(&reply(&mut s, &["PING"]).await, b"+PONG\r\n");
    // And the subscription is gone upstream.
    let deadline = Deadline::new(5 * SECOND, "no subscribers left on rc");
    while direct.cmd(&["PUBSUB", "NUMSUB", "rc"]).await.as_ref() != b"*2\r\n$2\r\nrc\r\n:0\r\n" {
        deadline.tick().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_replies_ok_and_closes() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut c = tierd.raw().await;
    assert_frame(&reply(&mut c, &["QUIT"]).await, b"+OK\r\n");
    let rest = c
        .read_to_close(2 * SECOND)
        .await
        .expect("connection closed after QUIT");
    assert!(rest.is_empty(), "{}", text(&rest));

    // Pipelined: what comes after QUIT is not executed.
    let mut pipeline = encode(&["PING"]);
    pipeline.extend(encode(&["QUIT"]));
    pipeline.extend(encode(&["SET", "after-quit", "1"]));
    let mut d = direct_raw(&redis, None).await;
    d.send(&pipeline).await;
    let direct = d.read_to_close(2 * SECOND).await.expect("direct closes");
    let mut t = tierd.raw().await;
    t.send(&pipeline).await;
    let proxied = t
        .read_to_close(2 * SECOND)
        .await
        .expect("tierd closes after QUIT");
    assert_frame(&proxied, &direct);
    assert_frame(&proxied, b"+PONG\r\n+OK\r\n");
    let mut check = direct_raw(&redis, None).await;
    assert_frame(&check.cmd(&["EXISTS", "after-quit"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_leaves_no_upstream_state() {
    let redis = RedisServer::start();
    let mut cfg = config_for(&redis.url());
    cfg.upstream.pool_size = 2;
    let tierd = Tierd::start_with(cfg).await;
    let mut direct = direct_raw(&redis, None).await;

    // Baseline: the direct connection and tierd's two pooled ones.
    let mut warm = tierd.raw().await;
    assert_frame(&reply(&mut warm, &["PING"]).await, b"+PONG\r\n");
    let deadline = Deadline::new(5 * SECOND, "tierd's pool connected (3 clients)");
    while client_list(&mut direct).await.len() != 3 {
        deadline.tick().await;
    }
    let baseline = 3;

    let mut sub = tierd.raw().await;
    reply(&mut sub, &["SUBSCRIBE", "leave"]).await;
    let mut psub = tierd.raw().await;
    reply(&mut psub, &["PSUBSCRIBE", "leave.*"]).await;
    let mut blocked = tierd.raw().await;
    send(&mut blocked, &["BLPOP", "leave-q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let mut multi = tierd.raw().await;
    assert_frame(&reply(&mut multi, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(
        &reply(&mut multi, &["SET", "leave-k", "x"]).await,
        b"+QUEUED\r\n",
    );
    let mut watch = tierd.raw().await;
    assert_frame(&reply(&mut watch, &["WATCH", "leave-k"]).await, b"+OK\r\n");
    let mut selected = tierd.raw().await;
    assert_frame(&reply(&mut selected, &["SELECT", "3"]).await, b"+OK\r\n");

    let clients = client_list(&mut direct).await;
    assert_eq!(clients.len(), baseline + 6, "{clients:#?}");

    drop((sub, psub, blocked, multi, watch, selected));

    let deadline = Deadline::new(
        5 * SECOND,
        "upstream connections of departed clients closed",
    );
    loop {
        let clients = client_list(&mut direct).await;
        let stateful = clients.iter().any(|l| {
            client_field(l, "sub") != Some("0")
                || client_field(l, "psub") != Some("0")
                || client_field(l, "multi") != Some("-1")
                || client_field(l, "db") != Some("0")
                || client_field(l, "flags").is_some_and(|f| f.contains('b') || f.contains('x'))
        });
        if clients.len() == baseline && !stateful {
            break;
        }
        deadline.tick().await;
    }
    wait_blocked_clients(&mut direct, 0, 5 * SECOND).await;
    assert_eq!(
        info_field(&mut direct, "stats", "pubsub_channels")
            .await
            .as_deref(),
        Some("0")
    );
    assert_eq!(
        info_field(&mut direct, "stats", "pubsub_patterns")
            .await
            .as_deref(),
        Some("0")
    );
    // The MULTI was never executed.
    assert_frame(&direct.cmd(&["EXISTS", "leave-k"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_tracking_delivers_invalidate_pushes() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut d = direct_raw(&redis, None).await;
    let mut t = tierd.raw().await;
    let mut w = tierd.raw().await;
    assert_frame(&reply(&mut w, &["SET", "tk", "0"]).await, b"+OK\r\n");

    // `d` tracks the same key directly, as the reference.
    assert_eq!(d.cmd(&["HELLO", "3"]).await[0], b'%');
    assert_frame(&d.cmd(&["CLIENT", "TRACKING", "on"]).await, b"+OK\r\n");
    assert_frame(&d.cmd(&["GET", "tk"]).await, b"$1\r\n0\r\n");
    assert_eq!(reply(&mut t, &["HELLO", "3"]).await[0], b'%');
    assert_frame(
        &reply(&mut t, &["CLIENT", "TRACKING", "on"]).await,
        b"+OK\r\n",
    );
    assert_frame(&reply(&mut t, &["GET", "tk"]).await, b"$1\r\n0\r\n");

    assert_frame(&reply(&mut w, &["SET", "tk", "1"]).await, b"+OK\r\n");
    let push = t
        .try_frame(2 * SECOND)
        .await
        .expect("invalidate push through tierd");
    assert_frame(&push, b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\ntk\r\n");
    assert_frame(&push, &d.frame().await);

    // Reading again re-tracks the key; the next write invalidates again.
    assert_frame(&reply(&mut t, &["GET", "tk"]).await, b"$1\r\n1\r\n");
    assert_frame(&reply(&mut w, &["DEL", "tk"]).await, b":1\r\n");
    let push = t
        .try_frame(2 * SECOND)
        .await
        .expect("second invalidate push");
    assert_frame(&push, b">2\r\n$10\r\ninvalidate\r\n*1\r\n$2\r\ntk\r\n");
}
