//! tierd's client ids in the commands that name another client: `CLIENT ID`,
//! `CLIENT KILL ID`, `CLIENT UNBLOCK` and `CLIENT TRACKING … REDIRECT`. A
//! client only ever sees tierd's ids, so these commands must reach the tierd
//! client it named, as they would reach a Redis client directly. Redis is the
//! reference for every error text: the same bytes go to a direct connection
//! and the replies are compared.

mod support;

use std::time::Duration;

use bytes::Bytes;
use support::exchange::{assert_frame, encode, reply, send, text, REPLY_LIMIT};
use support::probe::{direct_raw, info_field, wait_blocked_clients};
use support::{Raw, RedisServer, Tierd};

const SECOND: Duration = Duration::from_secs(1);

/// The first id tierd hands out: tierd's ids live above every id Redis
/// counts up to, so that an id names one kind of client or the other.
const TIERD_IDS_FROM: u64 = 1 << 40;

/// What Redis sends a RESP2 subscriber of `__redis__:invalidate` when key
/// `k`, read by a client redirecting its tracking there, is written.
const INVALIDATE_K: &[u8] =
    b"*3\r\n$7\r\nmessage\r\n$20\r\n__redis__:invalidate\r\n*1\r\n$1\r\nk\r\n";

/// The value of an integer reply (`:n\r\n`).
fn integer(frame: &[u8]) -> i64 {
    assert!(
        frame.first() == Some(&b':') && frame.ends_with(b"\r\n"),
        "expected an integer, got {:?}",
        text(frame)
    );
    text(&frame[1..frame.len() - 2]).parse().unwrap()
}

/// The connection's `CLIENT ID`, as an argument for the commands that take it.
async fn client_id(raw: &mut Raw) -> String {
    let id = integer(&reply(raw, &["CLIENT", "ID"]).await);
    assert!(id > 0, "CLIENT ID {id}");
    id.to_string()
}

/// Reads the next reply frame of a client that is waiting for one (a
/// blocked client being unblocked, a subscriber being sent a message).
async fn next_frame(raw: &mut Raw, what: &str) -> Bytes {
    raw.try_frame(REPLY_LIMIT)
        .await
        .unwrap_or_else(|| panic!("{what}: nothing within {REPLY_LIMIT:?}"))
}

/// The id of a tierd client that has come and gone, returned once tierd has
/// certainly forgotten it. The client blocks in `BLPOP` and hangs up; tierd
/// drops a session (and with it its id) before the session's dedicated
/// connection, so once Redis no longer counts the client as blocked, the id
/// names nobody. Needs Redis to have no other blocked client.
async fn departed_client(tierd: &Tierd, direct: &mut Raw) -> String {
    let mut client = tierd.raw().await;
    let id = client_id(&mut client).await;
    send(&mut client, &["BLPOP", "departed", "0"]).await;
    wait_blocked_clients(direct, 1, 5 * SECOND).await;
    drop(client);
    wait_blocked_clients(direct, 0, 5 * SECOND).await;
    id
}

/// Redis's `blocked_clients` count right now, as `INFO clients` shows it.
/// Two clients straight to Redis: one blocked in `BLPOP q 0` (with its
/// upstream id), one free to act on it.
async fn blocked_directly(redis: &RedisServer, direct: &mut Raw) -> (Raw, Raw, String) {
    let mut blocked = direct_raw(redis, None).await;
    let other = direct_raw(redis, None).await;
    let id = client_id(&mut blocked).await;
    send(&mut blocked, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(direct, 1, 5 * SECOND).await;
    (blocked, other, id)
}

async fn blocked_clients(direct: &mut Raw) -> String {
    info_field(direct, "clients", "blocked_clients")
        .await
        .expect("INFO clients has blocked_clients")
}

// ---------------------------------------------------------------------------
// CLIENT ID
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_id_is_in_tierd_range_and_differs_for_every_client() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut clients = Vec::new();
    for _ in 0..3 {
        clients.push(tierd.raw().await);
    }
    let mut ids = Vec::new();
    for client in &mut clients {
        let id = client_id(client).await;
        let n: u64 = id.parse().unwrap();
        assert!(n >= TIERD_IDS_FROM, "CLIENT ID {n} is below tierd's range");
        assert!(!ids.contains(&id), "CLIENT ID {id} handed out twice");
        ids.push(id);
    }

    // The id belongs to the client, not to the upstream connection serving it:
    // it stays the same once the client has a dedicated connection.
    let first = &mut clients[0];
    assert_frame(&reply(first, &["SELECT", "1"]).await, b"+OK\r\n");
    assert_eq!(
        client_id(first).await,
        ids[0],
        "CLIENT ID changed when pinned"
    );
    assert_eq!(client_id(&mut clients[1]).await, ids[1]);

    // A client that leaves does not hand its id on.
    let mut leaving = clients.pop().unwrap();
    send(&mut leaving, &["QUIT"]).await;
    let quit = leaving.read_to_close(REPLY_LIMIT).await;
    assert_eq!(quit.as_deref(), Some(&b"+OK\r\n"[..]), "QUIT");
    let mut next = tierd.raw().await;
    let id = client_id(&mut next).await;
    assert!(!ids.contains(&id), "CLIENT ID {id} reused: {ids:?}");
}

// ---------------------------------------------------------------------------
// CLIENT KILL ID
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_of_another_tierd_client_closes_that_client_only() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut killer = tierd.raw().await;
    let mut victim = tierd.raw().await;
    let mut bystander = tierd.raw().await;
    let victim_id = client_id(&mut victim).await;
    assert_frame(&reply(&mut bystander, &["PING"]).await, b"+PONG\r\n");

    assert_frame(
        &reply(&mut killer, &["CLIENT", "KILL", "ID", &victim_id]).await,
        b":1\r\n",
    );
    // As from Redis, the killed client is closed without a word.
    let got = victim
        .read_to_close(REPLY_LIMIT)
        .await
        .expect("the killed client's connection is still open");
    assert_frame(&got, b"");

    assert_frame(&reply(&mut killer, &["PING"]).await, b"+PONG\r\n");
    assert_frame(&reply(&mut bystander, &["PING"]).await, b"+PONG\r\n");
    // Killed once is gone: a second kill finds nobody.
    assert_frame(
        &reply(&mut killer, &["CLIENT", "KILL", "ID", &victim_id]).await,
        b":0\r\n",
    );
}

/// The same kill with Redis's default filter spelled out (`SKIPME yes`,
/// which does not concern another client): Redis kills the other client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_of_another_tierd_client_with_skipme_yes_kills_it_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut killer = direct_raw(&redis, None).await;
    let mut victim = direct_raw(&redis, None).await;
    let victim_id = client_id(&mut victim).await;
    let want = reply(
        &mut killer,
        &["CLIENT", "KILL", "ID", &victim_id, "SKIPME", "yes"],
    )
    .await;
    assert_frame(&want, b":1\r\n");
    let closed = victim.read_to_close(REPLY_LIMIT).await;
    assert_eq!(closed.as_deref(), Some(&b""[..]), "Redis's victim");

    let mut killer = tierd.raw().await;
    let mut victim = tierd.raw().await;
    let victim_id = client_id(&mut victim).await;
    let got = reply(
        &mut killer,
        &["CLIENT", "KILL", "ID", &victim_id, "SKIPME", "yes"],
    )
    .await;
    assert_eq!(text(&got), text(&want), "CLIENT KILL ID <other> SKIPME yes");
    let closed = victim.read_to_close(REPLY_LIMIT).await;
    assert_eq!(
        closed.as_deref(),
        Some(&b""[..]),
        "tierd's victim is still connected"
    );
}

/// A client that names itself in `CLIENT KILL ID id [filters…]`, followed in
/// the same write by `PING` and `QUIT`: everything it hears until the server
/// closes the connection. (QUIT makes the connection close either way, so a
/// client that was not killed shows as its PONG and OK.)
async fn kill_self(raw: &mut Raw, filters: &[&str]) -> String {
    let id = client_id(raw).await;
    let mut kill = vec!["CLIENT", "KILL", "ID", id.as_str()];
    kill.extend_from_slice(filters);
    let mut bytes = encode(&kill);
    bytes.extend(encode(&["PING"]));
    bytes.extend(encode(&["QUIT"]));
    raw.send(&bytes).await;
    let got = raw
        .read_to_close(REPLY_LIMIT)
        .await
        .unwrap_or_else(|| panic!("{kill:?} PING QUIT: the connection stayed open"));
    text(&got)
}

/// `CLIENT KILL ID <own id>`: Redis's SKIPME filter defaults to yes, so the
/// caller is not killed (`:0`) and goes on; `SKIPME no` kills it (`:1`, then
/// the connection closes and nothing after it runs). tierd's id must behave
/// the same way in both forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_of_itself_answers_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;

    let mut wrong = Vec::new();
    for filters in [&[][..], &["SKIPME", "yes"][..], &["SKIPME", "no"][..]] {
        let mut direct = direct_raw(&redis, None).await;
        let want = kill_self(&mut direct, filters).await;
        let mut client = tierd.raw().await;
        let got = kill_self(&mut client, filters).await;
        if got != want {
            wrong.push(format!("{filters:?}: Redis {want:?}, tierd {got:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "CLIENT KILL ID <own id> [filters] PING QUIT:\n{}",
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_of_a_departed_tierd_client_answers_0() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let gone = departed_client(&tierd, &mut direct).await;

    let mut client = tierd.raw().await;
    assert_frame(
        &reply(&mut client, &["CLIENT", "KILL", "ID", &gone]).await,
        b":0\r\n",
    );
    assert_frame(&reply(&mut client, &["PING"]).await, b"+PONG\r\n");
}

/// A kill reaches a blocked client too, and takes its upstream block with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_of_a_blocked_tierd_client_closes_it_and_ends_its_block() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut killer = tierd.raw().await;
    let mut victim = tierd.raw().await;
    let victim_id = client_id(&mut victim).await;
    send(&mut victim, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;

    assert_frame(
        &reply(&mut killer, &["CLIENT", "KILL", "ID", &victim_id]).await,
        b":1\r\n",
    );
    let got = victim
        .read_to_close(REPLY_LIMIT)
        .await
        .expect("the killed client's connection is still open");
    assert_frame(&got, b"");
    wait_blocked_clients(&mut direct, 0, 5 * SECOND).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_id_with_a_malformed_id_gets_redis_exact_error() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut client = tierd.raw().await;
    for bad in ["abc", "0", "-1"] {
        let cmd = ["CLIENT", "KILL", "ID", bad];
        let want = reply(&mut direct, &cmd).await;
        assert!(want.starts_with(b"-ERR "), "Redis: {:?}", text(&want));
        let got = reply(&mut client, &cmd).await;
        assert_eq!(text(&got), text(&want), "CLIENT KILL ID {bad}");
    }
    assert_frame(&reply(&mut client, &["PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// CLIENT UNBLOCK
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_ends_a_blocked_tierd_clients_blpop_with_a_null_array() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let mut blocked = tierd.raw().await;
    let mut other = tierd.raw().await;
    let blocked_id = client_id(&mut blocked).await;
    send(&mut blocked, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;

    assert_frame(
        &reply(&mut other, &["CLIENT", "UNBLOCK", &blocked_id]).await,
        b":1\r\n",
    );
    let got = next_frame(&mut blocked, "the unblocked client's BLPOP reply").await;
    assert_frame(&got, b"*-1\r\n");
    assert_eq!(blocked_clients(&mut direct).await, "0");
    assert_frame(&reply(&mut blocked, &["PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_error_gives_a_blocked_tierd_client_redis_unblocked_error() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;

    // Redis directly: what the unblocker and the blocked client get.
    let (mut blocked, mut other, id) = blocked_directly(&redis, &mut direct).await;
    let want_ack = reply(&mut other, &["CLIENT", "UNBLOCK", &id, "ERROR"]).await;
    let want = next_frame(&mut blocked, "Redis's unblocked client").await;
    assert_frame(&want_ack, b":1\r\n");
    assert!(want.starts_with(b"-UNBLOCKED "), "Redis: {:?}", text(&want));
    wait_blocked_clients(&mut direct, 0, 5 * SECOND).await;

    // The same through tierd, with tierd's id.
    let mut blocked = tierd.raw().await;
    let mut other = tierd.raw().await;
    let id = client_id(&mut blocked).await;
    send(&mut blocked, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let ack = reply(&mut other, &["CLIENT", "UNBLOCK", &id, "ERROR"]).await;
    assert_eq!(text(&ack), text(&want_ack), "the unblocker's reply");
    let got = next_frame(&mut blocked, "the unblocked client's BLPOP reply").await;
    assert_eq!(text(&got), text(&want), "the unblocked client's reply");
    assert_frame(&reply(&mut blocked, &["PING"]).await, b"+PONG\r\n");
}

/// Nobody to unblock: a client that never had a dedicated connection, one
/// whose `BLPOP` was answered at once (it keeps its dedicated connection), a
/// subscriber, and a client that has left. Redis answers 0 for each, with
/// any reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_of_a_tierd_client_that_is_not_blocked_answers_0() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let gone = departed_client(&tierd, &mut direct).await;

    let mut idle = tierd.raw().await;
    let idle_id = client_id(&mut idle).await;

    let mut served = tierd.raw().await;
    let served_id = client_id(&mut served).await;
    assert_frame(&reply(&mut direct, &["RPUSH", "q", "x"]).await, b":1\r\n");
    assert_frame(
        &reply(&mut served, &["BLPOP", "q", "0"]).await,
        b"*2\r\n$1\r\nq\r\n$1\r\nx\r\n",
    );

    let mut subscriber = tierd.raw().await;
    let subscriber_id = client_id(&mut subscriber).await;
    assert_frame(
        &reply(&mut subscriber, &["SUBSCRIBE", "ch"]).await,
        b"*3\r\n$9\r\nsubscribe\r\n$2\r\nch\r\n:1\r\n",
    );

    let mut asker = tierd.raw().await;
    for (who, id) in [
        ("never pinned", &idle_id),
        ("BLPOP answered", &served_id),
        ("subscriber", &subscriber_id),
        ("departed", &gone),
    ] {
        for reason in [None, Some("TIMEOUT"), Some("ERROR")] {
            let mut cmd = vec!["CLIENT", "UNBLOCK", id.as_str()];
            cmd.extend(reason);
            let got = reply(&mut asker, &cmd).await;
            assert_eq!(text(&got), ":0\r\n", "{who}: {cmd:?}");
        }
    }

    assert_frame(&reply(&mut idle, &["PING"]).await, b"+PONG\r\n");
    assert_frame(&reply(&mut served, &["PING"]).await, b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_with_reason_foo_gets_redis_exact_error_and_unblocks_nobody() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;

    // Redis directly.
    let (mut blocked, mut other, id) = blocked_directly(&redis, &mut direct).await;
    let want = reply(&mut other, &["CLIENT", "UNBLOCK", &id, "FOO"]).await;
    assert!(want.starts_with(b"-ERR "), "Redis: {:?}", text(&want));
    assert_eq!(blocked_clients(&mut direct).await, "1");
    assert_frame(
        &reply(&mut other, &["CLIENT", "UNBLOCK", &id]).await,
        b":1\r\n",
    );
    assert_frame(
        &next_frame(&mut blocked, "Redis's client").await,
        b"*-1\r\n",
    );
    wait_blocked_clients(&mut direct, 0, 5 * SECOND).await;

    // Through tierd, with tierd's id.
    let mut blocked = tierd.raw().await;
    let mut other = tierd.raw().await;
    let id = client_id(&mut blocked).await;
    send(&mut blocked, &["BLPOP", "q", "0"]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;
    let got = reply(&mut other, &["CLIENT", "UNBLOCK", &id, "FOO"]).await;
    assert_eq!(text(&got), text(&want), "CLIENT UNBLOCK <id> FOO");
    // Still blocked: the first thing it hears is the real unblock's reply.
    assert_eq!(blocked_clients(&mut direct).await, "1");
    assert_frame(
        &reply(&mut other, &["CLIENT", "UNBLOCK", &id]).await,
        b":1\r\n",
    );
    assert_frame(
        &next_frame(&mut blocked, "the unblocked client's BLPOP reply").await,
        b"*-1\r\n",
    );
}

// ---------------------------------------------------------------------------
// CLIENT TRACKING … REDIRECT
// ---------------------------------------------------------------------------

/// RESP2 client-side caching, the two-connection way: S subscribes to
/// `__redis__:invalidate`, T turns tracking on with `REDIRECT <S's id>`, and
/// a write by anyone to a key T read reaches S as a pub/sub message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_a_tierd_subscriber_delivers_invalidations_in_resp2() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut writer = direct_raw(&redis, None).await;
    assert_frame(&reply(&mut writer, &["SET", "k", "v0"]).await, b"+OK\r\n");

    let mut s = tierd.raw().await;
    let s_id = client_id(&mut s).await;
    assert_frame(
        &reply(&mut s, &["SUBSCRIBE", "__redis__:invalidate"]).await,
        b"*3\r\n$9\r\nsubscribe\r\n$20\r\n__redis__:invalidate\r\n:1\r\n",
    );

    let mut t = tierd.raw().await;
    assert_frame(
        &reply(&mut t, &["CLIENT", "TRACKING", "on", "REDIRECT", &s_id]).await,
        b"+OK\r\n",
    );
    assert_frame(&reply(&mut t, &["GET", "k"]).await, b"$2\r\nv0\r\n");

    assert_frame(&reply(&mut writer, &["SET", "k", "v"]).await, b"+OK\r\n");
    let got = next_frame(&mut s, "the invalidation for k").await;
    assert_frame(&got, INVALIDATE_K);

    // T goes on being served (and tracked) as usual.
    assert_frame(&reply(&mut t, &["GET", "k"]).await, b"$1\r\nv\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_a_departed_tierd_client_is_refused_like_redis() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;
    let gone = departed_client(&tierd, &mut direct).await;

    // Redis, asked to redirect to an id it does not have (tierd's ids are
    // far above any id it has handed out).
    let cmd = ["CLIENT", "TRACKING", "on", "REDIRECT", gone.as_str()];
    let want = reply(&mut direct, &cmd).await;
    assert_frame(
        &want,
        b"-ERR The client ID you want redirect to does not exist\r\n",
    );

    let mut t = tierd.raw().await;
    let got = reply(&mut t, &cmd).await;
    assert_eq!(text(&got), text(&want));
    assert_frame(&reply(&mut t, &["PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// A refused command inside MULTI
// ---------------------------------------------------------------------------

/// `CLIENT REPLY` inside MULTI is refused by tierd. Like any command refused
/// while queueing, it dooms the transaction: EXEC aborts with Redis's
/// EXECABORT, nothing queued runs, and the client is out of MULTI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reply_off_inside_multi_aborts_exec_and_the_connection_goes_on() {
    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut direct = direct_raw(&redis, None).await;

    // Redis's answer to EXEC after a command was refused while queueing.
    assert_frame(&reply(&mut direct, &["MULTI"]).await, b"+OK\r\n");
    let refused = reply(&mut direct, &["NOSUCHCOMMAND"]).await;
    assert!(refused.starts_with(b"-ERR "), "{:?}", text(&refused));
    assert_frame(
        &reply(&mut direct, &["SET", "k", "1"]).await,
        b"+QUEUED\r\n",
    );
    let want_exec = reply(&mut direct, &["EXEC"]).await;
    assert_frame(
        &want_exec,
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    );
    assert_frame(&reply(&mut direct, &["EXISTS", "k"]).await, b":0\r\n");

    let mut client = tierd.raw().await;
    assert_frame(&reply(&mut client, &["MULTI"]).await, b"+OK\r\n");
    assert_frame(
        &reply(&mut client, &["CLIENT", "REPLY", "OFF"]).await,
        b"-ERR CLIENT REPLY inside MULTI is not supported by tierd\r\n",
    );
    assert_frame(
        &reply(&mut client, &["SET", "k", "1"]).await,
        b"+QUEUED\r\n",
    );
    let exec = reply(&mut client, &["EXEC"]).await;
    assert_eq!(text(&exec), text(&want_exec), "EXEC");
    assert_frame(&reply(&mut direct, &["EXISTS", "k"]).await, b":0\r\n");

    assert_frame(&reply(&mut client, &["PING"]).await, b"+PONG\r\n");
    assert_frame(&reply(&mut client, &["SET", "k", "2"]).await, b"+OK\r\n");
    assert_frame(&reply(&mut direct, &["GET", "k"]).await, b"$1\r\n2\r\n");
}
