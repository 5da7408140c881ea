//! Tags and the `CACHE.*` invalidation commands against a real Redis: what
//! a client sees through tierd, and what Redis holds afterwards (data keys,
//! sidecars `tierd:tag:*`, reverse indexes `tierd:keytags:*`).

mod support;

use support::exchange::assert_frame;
use support::l1::{decode, direct, l1_config, must, rule, wait_until_caching, Resp, HOUR};
use support::{Raw, RedisServer, Tierd};
use tierd::cache::template::TagTemplate;
use tierd::config::TrackingMode;

/// tierd with tracking off, so that only tierd's own invalidations (and
/// never Redis's) keep L1 honest, and rules:
/// - `user:{id}` cached for an hour and tagged `user:{id}` and `users`;
/// - `item:*` cached for an hour, without tags;
/// - `warmup:*`, to know when tierd has its command table.
async fn start(redis: &RedisServer) -> Tierd {
    let mut users = rule("users", "user:{id}", HOUR);
    users.tags = ["user:{id}", "users"]
        .iter()
        .map(|t| TagTemplate::new(t, &users.pattern).unwrap())
        .collect();
    let rules = vec![
        rule("warmup", "warmup:*", HOUR),
        users,
        rule("items", "item:*", HOUR),
    ];
    let tierd = Tierd::start_with(l1_config(&redis.url(), TrackingMode::Off, rules)).await;
    wait_until_caching(&tierd, "warmup", "warmup:0").await;
    tierd
}

fn strings(frame: &[u8]) -> Vec<String> {
    match decode(frame) {
        Resp::Array(Some(items)) | Resp::Set(items) => items
            .iter()
            .map(|i| i.as_text().unwrap_or_else(|| panic!("a string: {i:?}")))
            .collect(),
        other => panic!("an array: {other:?}"),
    }
}

fn int(frame: &[u8]) -> i64 {
    decode(frame)
        .as_int()
        .unwrap_or_else(|| panic!("an integer: {}", String::from_utf8_lossy(frame)))
}

async fn sorted_members(d: &mut Raw, set: &str) -> Vec<String> {
    let mut m = strings(&d.cmd(&["SMEMBERS", set]).await);
    m.sort();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_set_tags_the_key_and_its_sidecars_follow_its_ttl() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    assert_frame(
        &t.cmd(&[
            "CACHE.SET",
            "user:1",
            "ann",
            "EX",
            "100",
            "TAGS",
            "team:a",
            "vip",
        ])
        .await,
        b"+OK\r\n",
    );
    assert_frame(&d.cmd(&["GET", "user:1"]).await, b"$3\r\nann\r\n");
    let ttl = int(&d.cmd(&["PTTL", "user:1"]).await);
    assert!((90_000..=100_000).contains(&ttl), "{ttl}");
    // The explicit tags and the rule's.
    let tags = ["team:a", "user:1", "users", "vip"];
    assert_eq!(sorted_members(&mut d, "tierd:keytags:user:1").await, tags);
    assert_eq!(strings(&t.cmd(&["CACHE.TAGS", "user:1"]).await), tags);
    for tag in tags {
        let side = format!("tierd:tag:{tag}");
        assert_eq!(sorted_members(&mut d, &side).await, ["user:1"]);
        let side_ttl = int(&d.cmd(&["PTTL", &side]).await);
        assert!((90_000..=100_000).contains(&side_ttl), "{side}: {side_ttl}");
    }
    let rev_ttl = int(&d.cmd(&["PTTL", "tierd:keytags:user:1"]).await);
    assert!((90_000..=100_000).contains(&rev_ttl), "{rev_ttl}");

    // A longer-lived member extends the sidecar; one without a TTL makes it
    // permanent; a shorter one never shortens it.
    assert_frame(
        &t.cmd(&["CACHE.SET", "user:2", "bob", "PX", "500000", "TAGS", "vip"])
            .await,
        b"+OK\r\n",
    );
    let vip_ttl = int(&d.cmd(&["PTTL", "tierd:tag:vip"]).await);
    assert!(vip_ttl > 400_000, "{vip_ttl}");
    assert_frame(
        &t.cmd(&["CACHE.SET", "user:3", "cy", "EX", "5", "TAGS", "vip"])
            .await,
        b"+OK\r\n",
    );
    assert!(int(&d.cmd(&["PTTL", "tierd:tag:vip"]).await) > 400_000);
    assert_frame(
        &t.cmd(&["CACHE.SET", "user:4", "dee", "TAGS", "vip"]).await,
        b"+OK\r\n",
    );
    assert_frame(&d.cmd(&["PTTL", "tierd:tag:vip"]).await, b":-1\r\n");
    assert_frame(&d.cmd(&["PTTL", "tierd:keytags:user:4"]).await, b":-1\r\n");

    // Listings skip (and prune) members that are gone.
    must(&mut d, &["DEL", "user:3"]).await;
    assert_eq!(
        strings(&t.cmd(&["CACHE.MEMBERS", "vip"]).await),
        ["user:1", "user:2", "user:4"]
    );
    assert_eq!(
        sorted_members(&mut d, "tierd:tag:vip").await,
        ["user:1", "user:2", "user:4"]
    );
    assert_eq!(
        strings(&t.cmd(&["CACHE.TAGS", "user:3"]).await),
        Vec::<String>::new()
    );
    assert_frame(&d.cmd(&["EXISTS", "tierd:keytags:user:3"]).await, b":0\r\n");

    // CACHE.TAG on an existing key; on a missing one it does nothing.
    assert_frame(
        &t.cmd(&["CACHE.TAG", "user:2", "vip", "late"]).await,
        b":1\r\n",
    );
    assert_eq!(
        strings(&t.cmd(&["CACHE.TAGS", "user:2"]).await),
        ["late", "user:2", "users", "vip"]
    );
    assert_frame(&t.cmd(&["CACHE.TAG", "nope", "late"]).await, b":0\r\n");
    assert_frame(
        &d.cmd(&["SISMEMBER", "tierd:tag:late", "nope"]).await,
        b":0\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_tag_deletes_its_keys_everywhere_and_drops_them_from_l1() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    // More members than one batch.
    for i in 0..2500 {
        let key = format!("item:{i}");
        let frame = t.cmd(&["CACHE.SET", &key, "v", "TAGS", "big"]).await;
        assert_frame(&frame, b"+OK\r\n");
    }
    must(&mut d, &["SET", "other", "x"]).await;
    // item:7 is read into L1, then changed behind tierd's back (tracking is
    // off): only tierd's invalidation can drop the cached reply.
    assert_frame(&t.cmd(&["GET", "item:7"]).await, b"$1\r\nv\r\n");
    assert!(!decode(&t.cmd(&["CACHE.INSPECT", "item:7"]).await).is_nil());
    must(&mut d, &["SET", "item:7", "changed"]).await;
    assert_frame(&t.cmd(&["GET", "item:7"]).await, b"$1\r\nv\r\n");

    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "TAG", "big", "none"]).await,
        b":2500\r\n",
    );
    // Data, sidecar, snapshot and reverse indexes are all gone.
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":1\r\n");
    assert_frame(&d.cmd(&["EXISTS", "other"]).await, b":1\r\n");
    assert!(decode(&t.cmd(&["CACHE.INSPECT", "item:7"]).await).is_nil());
    assert_frame(&t.cmd(&["GET", "item:7"]).await, b"$-1\r\n");
    assert_frame(&t.cmd(&["CACHE.INVALIDATE", "TAG", "big"]).await, b":0\r\n");

    // Rule tags: invalidating `users` deletes every user; the per-user
    // sidecars still list them until read, and are pruned then.
    for key in ["user:1", "user:2"] {
        assert_frame(&t.cmd(&["CACHE.SET", key, "v"]).await, b"+OK\r\n");
    }
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "TAG", "users"]).await,
        b":2\r\n",
    );
    assert_frame(&d.cmd(&["EXISTS", "user:1", "user:2"]).await, b":0\r\n");
    assert_eq!(
        strings(&t.cmd(&["CACHE.MEMBERS", "user:1"]).await),
        Vec::<String>::new()
    );
    assert_frame(&d.cmd(&["EXISTS", "tierd:tag:user:1"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalidating_a_pattern_or_keys_deletes_them_and_drops_them_from_l1() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    for i in 0..2100 {
        must(&mut d, &["SET", &format!("user:{i}"), "v"]).await;
    }
    must(&mut d, &["SET", "keep:1", "v"]).await;
    assert_frame(&t.cmd(&["GET", "user:5"]).await, b"$1\r\nv\r\n");
    assert!(!decode(&t.cmd(&["CACHE.INSPECT", "user:5"]).await).is_nil());

    // L1ONLY leaves Redis alone: one key was cached here.
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "PATTERN", "user:*", "L1ONLY"])
            .await,
        b":1\r\n",
    );
    assert!(decode(&t.cmd(&["CACHE.INSPECT", "user:5"]).await).is_nil());
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":2101\r\n");

    assert_frame(&t.cmd(&["GET", "user:5"]).await, b"$1\r\nv\r\n");
    must(&mut d, &["SET", "user:5", "changed"]).await;
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "PATTERN", "user:*"]).await,
        b":2100\r\n",
    );
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":1\r\n");
    assert_frame(&t.cmd(&["GET", "user:5"]).await, b"$-1\r\n");

    must(&mut d, &["SET", "user:1", "v"]).await;
    assert_frame(&t.cmd(&["GET", "user:1"]).await, b"$1\r\nv\r\n");
    must(&mut d, &["SET", "user:1", "changed"]).await;
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "KEY", "user:1", "keep:1", "nope"])
            .await,
        b":2\r\n",
    );
    assert_frame(&t.cmd(&["GET", "user:1"]).await, b"$-1\r\n");
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":0\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_run_in_the_clients_db_and_protocol_and_report_errors() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    // A non-default db runs on the client's own connection.
    assert_frame(&t.cmd(&["SELECT", "3"]).await, b"+OK\r\n");
    assert_frame(
        &t.cmd(&["CACHE.SET", "k", "v", "TAGS", "t"]).await,
        b"+OK\r\n",
    );
    assert_frame(&d.cmd(&["EXISTS", "k"]).await, b":0\r\n");
    assert_frame(&d.cmd(&["SELECT", "3"]).await, b"+OK\r\n");
    assert_eq!(sorted_members(&mut d, "tierd:tag:t").await, ["k"]);
    assert_eq!(strings(&t.cmd(&["CACHE.MEMBERS", "t"]).await), ["k"]);
    assert_frame(&t.cmd(&["CACHE.INVALIDATE", "TAG", "t"]).await, b":1\r\n");
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":0\r\n");
    assert_frame(&t.cmd(&["SELECT", "0"]).await, b"+OK\r\n");
    assert_frame(&d.cmd(&["SELECT", "0"]).await, b"+OK\r\n");

    // RESP3.
    let hello = t.cmd(&["HELLO", "3"]).await;
    assert!(
        hello.starts_with(b"%"),
        "{}",
        String::from_utf8_lossy(&hello)
    );
    assert_frame(
        &t.cmd(&["CACHE.SET", "k3", "v", "TAGS", "t3"]).await,
        b"+OK\r\n",
    );
    assert_eq!(strings(&t.cmd(&["CACHE.TAGS", "k3"]).await), ["t3"]);
    assert_eq!(strings(&t.cmd(&["CACHE.MEMBERS", "t3"]).await), ["k3"]);
    assert_frame(&t.cmd(&["CACHE.INVALIDATE", "TAG", "t3"]).await, b":1\r\n");
    assert_frame(&t.cmd(&["HELLO", "2"]).await.slice(..1), b"*");

    // Errors: the client's, and Redis's own.
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "TAG"]).await,
        b"-ERR wrong number of arguments for 'cache.invalidate' command\r\n",
    );
    assert_frame(
        &t.cmd(&["CACHE.INVALIDATE", "PREFIX", "x"]).await,
        b"-ERR unknown CACHE.INVALIDATE kind 'PREFIX', expected TAG, PATTERN or KEY\r\n",
    );
    assert_frame(
        &t.cmd(&["CACHE.SET", "k", "v", "EX", "0"]).await,
        b"-ERR invalid expire time in 'cache.set' command\r\n",
    );
    assert_frame(
        &t.cmd(&["CACHE.SET", "k", "v", "TAGS"]).await,
        b"-ERR TAGS needs at least one tag\r\n",
    );
    must(&mut d, &["SET", "tierd:tag:taken", "a string"]).await;
    let wrong = t.cmd(&["CACHE.SET", "k", "v", "TAGS", "taken"]).await;
    // The write happened; the tag could not be registered (logged).
    assert_frame(&wrong, b"+OK\r\n");
    let wrong = t.cmd(&["CACHE.MEMBERS", "taken"]).await;
    assert!(
        wrong.starts_with(b"-WRONGTYPE"),
        "{}",
        String::from_utf8_lossy(&wrong)
    );
    // An ACL refusal is Redis's own reply, and the session goes on.
    must(
        &mut d,
        &[
            "ACL", "SETUSER", "ro", "on", ">pw", "~*", "+@read", "+auth", "+hello",
        ],
    )
    .await;
    assert_frame(&t.cmd(&["AUTH", "ro", "pw"]).await, b"+OK\r\n");
    let refused = t.cmd(&["CACHE.INVALIDATE", "KEY", "k"]).await;
    assert!(
        refused.starts_with(b"-NOPERM"),
        "{}",
        String::from_utf8_lossy(&refused)
    );
    assert_frame(&t.cmd(&["GET", "k"]).await, b"$1\r\nv\r\n");
}

/// A RESP3 client tracking 3000 keys gets an invalidation push per key its
/// own `CACHE.INVALIDATE` deletes (Redis sends them after each `UNLINK`'s
/// reply): more than its dedicated connection's channel holds while the
/// job waits for Redis. The job must still finish,
/// and the pushes still reach the client, before its reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_on_a_tracking_connection_does_not_stall_on_its_pushes() {
    let redis = RedisServer::start();
    let tierd = start(&redis).await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    for i in 0..3000 {
        must(&mut d, &["SET", &format!("item:{i}"), "v"]).await;
    }
    assert!(t.cmd(&["HELLO", "3"]).await.starts_with(b"%"));
    assert_frame(&t.cmd(&["CLIENT", "TRACKING", "on"]).await, b"+OK\r\n");
    for i in 0..3000 {
        assert_frame(&t.cmd(&["GET", &format!("item:{i}")]).await, b"$1\r\nv\r\n");
    }
    t.send_cmd(&[b"CACHE.INVALIDATE", b"PATTERN", b"item:*"])
        .await;
    let mut pushes = 0;
    loop {
        let frame = t
            .try_frame(std::time::Duration::from_secs(20))
            .await
            .expect("CACHE.INVALIDATE answered within 20 s");
        if frame.starts_with(b">") {
            pushes += 1;
            continue;
        }
        assert_frame(&frame, b":3000\r\n");
        break;
    }
    assert!(pushes > 0, "the invalidation pushes reach the client first");
    assert_frame(&d.cmd(&["DBSIZE"]).await, b":0\r\n");
}
