//! Regressions from the review of the invalidation bus, tags and patterns
//! (issue 4), one scenario each. Every test runs real processes: its own
//! redis-server, and tierd instances on the bus with `tracking = "off"`, so
//! that the bus is the only way an instance learns of another's writes.
//!
//! 1. A write whose client is killed while Redis holds it is never
//!    announced on the bus: the other instances serve the old value for
//!    good.
//! 2. A RESP3 subscriber's write still waiting to run when 1024 more
//!    requests follow it: its hook is cleared and a flush published at
//!    once, before the write runs, and nothing announces it when it does.
//! 3. One write of more keys than the publisher's unacknowledged window
//!    (4096 messages): the messages are taken from the outbox and dropped.
//! 4. A well-formed bus message carrying a multi-megabyte glob costs a
//!    receiving tierd about a gigabyte (and a core for minutes): the glob's
//!    length is not checked on receipt, and it is compiled once per L1 key.
//! 5. A sidecar's expiry is not extended when its member's expiry is
//!    extended through tierd: the tag loses the key while the key lives.

mod support;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::bus::{bus_config, cache, publish, start_instance, Instance, Message, CHANNEL};
use support::exchange::{assert_frame, text};
use support::l1::{
    decode, direct, l1_config, must, poll_until, rule, rule_stats, wait_until_caching, L1Probe,
    Outcome, HOUR,
};
use support::probe::{bulk, client_field, client_list, wait_blocked_clients, Deadline};
use support::{free_port, Raw, RedisServer, Tierd};
use tierd::config::{RuleConfig, TrackingMode};

/// How long a lost bus link may take to be noticed and re-established, and
/// so the most a write through one instance may take to reach another.
const RECONNECT: Duration = Duration::from_secs(5);
/// A sender id no tierd draws.
const FOREIGN: u64 = 0x5eed_f00d_0bad_cafe;

fn s_rule() -> RuleConfig {
    rule("s", "s:*", HOUR)
}

/// `:n\r\n` as a string.
fn integer_text(frame: &[u8]) -> String {
    let t = text(frame);
    t.strip_prefix(':')
        .map(|n| n.trim_end().to_owned())
        .unwrap_or_else(|| panic!("an integer reply: {t:?}"))
}

/// Two instances on the bus, A and B, with `s:1` and `s:2` set to `old`
/// and cached on B (read through `probe`); and a direct connection.
async fn two_instances_caching_s(redis: &RedisServer) -> (Raw, Instance, Instance, L1Probe) {
    let mut d = direct(redis).await;
    must(&mut d, &["SET", "s:1", "old"]).await;
    must(&mut d, &["SET", "s:2", "old"]).await;
    let a = start_instance(redis, bus_config(&redis.url(), vec![s_rule()])).await;
    let b = start_instance(redis, bus_config(&redis.url(), vec![s_rule()])).await;
    let mut probe = L1Probe::new(redis, &b.tierd, "s").await;
    cache(&mut probe, "s:1").await;
    cache(&mut probe, "s:2").await;
    (d, a, b, probe)
}

/// Writes `SET key value` through `via` (another instance than the
/// reader's) and waits until `probe` (on the reader) returns it: from then
/// on the reader has applied every message the writer published before.
async fn barrier(via: &mut Raw, probe: &mut L1Probe, key: &str, value: &str) {
    let since = Instant::now();
    assert_frame(&via.cmd(&["SET", key, value]).await, b"+OK\r\n");
    poll_until(probe, key, &bulk(value), since, RECONNECT).await;
}

// ---------------------------------------------------------------------------
// 1. A write whose client is killed before its reply
// ---------------------------------------------------------------------------

/// The hook that announces a write on the bus runs when the write's reply
/// reaches the client's session. A client killed (or whose socket resets)
/// while its write is in flight takes the hook with it, yet the write was
/// already sent on a pooled connection and runs: the other instances never
/// hear of it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_whose_client_is_killed_before_its_reply_still_reaches_the_other_instances() {
    let redis = RedisServer::start();
    let (mut d, a, _b, mut probe) = two_instances_caching_s(&redis).await;

    let mut victim = a.tierd.raw().await;
    let victim_id = integer_text(&victim.cmd(&["CLIENT", "ID"]).await);
    must(&mut d, &["CLIENT", "PAUSE", "10000", "WRITE"]).await;
    victim.send_cmd(&[b"SET", b"s:1", b"new"]).await;
    // The SET has reached Redis, which holds it.
    wait_blocked_clients(&mut d, 1, Duration::from_secs(5)).await;
    let mut other = a.tierd.raw().await;
    assert_frame(
        &other.cmd(&["CLIENT", "KILL", "ID", &victim_id]).await,
        b":1\r\n",
    );
    assert!(
        victim.read_to_close(Duration::from_secs(5)).await.is_some(),
        "the killed client is closed"
    );
    must(&mut d, &["CLIENT", "UNPAUSE"]).await;
    // The write ran.
    let deadline = Deadline::new(Duration::from_secs(5), "SET s:1 new to run in Redis");
    while d.cmd(&["GET", "s:1"]).await != bulk("new") {
        deadline.tick().await;
    }

    // A later write through A: once B has it, B has applied everything A
    // published before.
    barrier(&mut other, &mut probe, "s:2", "new").await;
    let (got, outcome) = probe.read(&["GET", "s:1"]).await;
    assert_eq!(
        text(&got),
        text(&bulk("new")),
        "B still serves ({outcome:?}) the value a write through A replaced: the write ran \
         in Redis but was never announced on the bus"
    );
}

// ---------------------------------------------------------------------------
// 2. A RESP3 subscriber's write behind 1024 more requests
// ---------------------------------------------------------------------------

/// A RESP3 subscriber's requests wait for their replies in `stream_hooks`;
/// at 1024 the list collapses into a count of replies to wait for, after
/// which L1 is flushed and the flush published. (Found by review: the list
/// used to be cleared and the flush published at once, so a write among
/// them that had not run yet, here held behind a `BLPOP` on the same
/// connection, ran after every instance flushed, and nothing announced it.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resp3_subscriber_write_behind_1024_requests_still_reaches_the_other_instances() {
    let redis = RedisServer::start();
    let (mut d, a, _b, mut probe) = two_instances_caching_s(&redis).await;

    let mut sub = a.tierd.raw().await;
    let hello = sub.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%', "HELLO 3: {}", text(&hello));
    let confirmed = sub.cmd(&["SUBSCRIBE", "ch"]).await;
    assert!(confirmed.starts_with(b">3\r\n"), "{}", text(&confirmed));

    // BLPOP holds the connection in Redis; the SET and the PINGs wait
    // behind it, unanswered.
    const PINGS: usize = 1024;
    let encode = tierd::protocol::reply::encode_command;
    let mut batch = encode(&[b"BLPOP", b"list", b"0"]).to_vec();
    let set = encode(&[b"SET", b"s:1", b"new"]);
    let ping = encode(&[b"PING"]);
    batch.extend_from_slice(&set);
    for _ in 0..PINGS {
        batch.extend_from_slice(&ping);
    }
    sub.send(&batch).await;
    wait_blocked_clients(&mut d, 1, Duration::from_secs(5)).await;
    let want = set.len() + PINGS * ping.len();
    let deadline = Deadline::new(Duration::from_secs(5), "the SET and PINGs to reach Redis");
    loop {
        let queued: usize = client_list(&mut d)
            .await
            .iter()
            .filter(|l| client_field(l, "sub") == Some("1"))
            .filter_map(|l| client_field(l, "qbuf")?.parse::<usize>().ok())
            .sum();
        if queued >= want {
            break;
        }
        deadline.tick().await;
    }

    // The SET has not run: B serves the old value, and caches it.
    let deadline = Deadline::new(RECONNECT, "B to serve s:1 from L1");
    loop {
        let (got, outcome) = probe.read(&["GET", "s:1"]).await;
        assert_frame(&got, &bulk("old"));
        if outcome == Outcome::Hit {
            break;
        }
        deadline.tick().await;
    }

    must(&mut d, &["LPUSH", "list", "x"]).await;
    let blpop = sub.frame().await;
    assert!(blpop.starts_with(b"*2\r\n"), "BLPOP: {}", text(&blpop));
    assert_frame(&sub.frame().await, b"+OK\r\n");
    for _ in 0..PINGS {
        assert_frame(&sub.frame().await, b"+PONG\r\n");
    }
    assert_frame(&d.cmd(&["GET", "s:1"]).await, &bulk("new"));

    let mut other = a.tierd.raw().await;
    barrier(&mut other, &mut probe, "s:2", "new").await;
    let (got, outcome) = probe.read(&["GET", "s:1"]).await;
    assert_eq!(
        text(&got),
        text(&bulk("new")),
        "B still serves ({outcome:?}) the value a RESP3 subscriber's write through A \
         replaced: its hook was cleared (and a flush published) before it ran, and nothing \
         announced it once it did"
    );
}

// ---------------------------------------------------------------------------
// 3. More messages in one go than the unacknowledged window
// ---------------------------------------------------------------------------

/// `publish` refuses a batch that would take the unacknowledged messages
/// past 4096 (a "lagging" link) after the batch was taken from the outbox,
/// and before it is remembered for resending: the new link resends nothing
/// of it. One `DEL` of 4097 cached keys whose names are too long for two to
/// share a 64 KB message produces such a batch; so does any backlog of
/// 4096 messages that Redis has not acknowledged yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_of_more_keys_than_the_unacked_window_still_reaches_the_other_instances() {
    // Without a pub/sub output limit, so that a fixed tierd's 135 MB of
    // messages cannot get a subscriber disconnected (which would flush it
    // and pass this test for another reason).
    let redis = RedisServer::start_with(&["--client-output-buffer-limit", "pubsub 0 0 0"]);
    let mut d = direct(&redis).await;
    const KEYS: usize = 4097;
    let pad = "x".repeat(33_000);
    let keys: Vec<String> = (0..KEYS).map(|i| format!("s:{i}:{pad}")).collect();
    must(&mut d, &["SET", &keys[0], "old"]).await;
    must(&mut d, &["SET", "s:probe", "old"]).await;
    let a = start_instance(&redis, bus_config(&redis.url(), vec![s_rule()])).await;
    let b = start_instance(&redis, bus_config(&redis.url(), vec![s_rule()])).await;
    let mut probe = L1Probe::new(&redis, &b.tierd, "s").await;
    cache(&mut probe, &keys[0]).await;
    cache(&mut probe, "s:probe").await;

    let mut writer = a.tierd.raw().await;
    let mut del: Vec<&[u8]> = vec![b"DEL"];
    del.extend(keys.iter().map(|k| k.as_bytes()));
    writer.send_cmd(&del).await;
    assert_frame(&writer.frame().await, b":1\r\n");
    assert_frame(&d.cmd(&["EXISTS", &keys[0]]).await, b":0\r\n");

    barrier(&mut writer, &mut probe, "s:probe", "new").await;
    let (got, outcome) = probe.read(&["GET", &keys[0]]).await;
    assert_eq!(
        text(&got),
        "$-1\r\n",
        "B still serves ({outcome:?}) a key deleted through A: the DEL's 4097 bus messages \
         were refused as lagging after being taken from the outbox, and never resent"
    );
}

// ---------------------------------------------------------------------------
// 4. A multi-megabyte glob on the bus
// ---------------------------------------------------------------------------

/// The `tierd` binary as a child process with `config`, killed on drop.
struct Process {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Process {
    async fn start(mut config: tierd::config::Config) -> Process {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        config.listen = addr;
        config.metrics.listen = None;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("proxy.toml");
        std::fs::write(&path, config.to_toml()).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_tierd"))
            .arg("--config")
            .arg(&path)
            .arg("--log-level")
            .arg("warn")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut process = Process {
            child,
            addr,
            _dir: dir,
        };
        process.wait_caching().await;
        process
    }

    /// Reads `warmup:0` until it is an L1 hit: the bus is subscribed.
    async fn wait_caching(&mut self) {
        let deadline = Deadline::new(Duration::from_secs(10), "the tierd process to cache");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tierd exited at startup with {status}");
            }
            if let Ok(stream) = tokio::net::TcpStream::connect(self.addr).await {
                drop(stream);
                let mut reader = Raw::connect(self.addr).await;
                let mut stats = Raw::connect(self.addr).await;
                let before = rule_stats(&mut stats, "warmup").await.hits;
                reader.cmd(&["GET", "warmup:0"]).await;
                if rule_stats(&mut stats, "warmup").await.hits > before {
                    return;
                }
            }
            deadline.tick().await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Peak resident memory of process `pid` (`VmHWM`), in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse().ok())
        .expect("VmHWM in /proc/<pid>/status");
    kb * 1024
}

/// Senders never publish a glob longer than 1024 bytes (`CACHE.INVALIDATE
/// PATTERN` refuses it), but receivers accept any length and hand it to
/// `KeyPattern::new`, which leaves a long glob uncompiled; `redis_match`
/// then compiles it again for every key in L1, into 48 bytes per pattern
/// byte, on a blocking thread per pattern record. One 16 MB message costs
/// a receiving instance about 1 GB (and a core for as long as the walk
/// takes: over five minutes with 1000 keys in a debug build); a few of them,
/// published by anything that can reach Redis, take it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_huge_glob_on_the_bus_does_not_blow_up_a_receiving_instance() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "s:t", "old"]).await;
    let b = Process::start(bus_config(&redis.url(), vec![s_rule()])).await;
    let pid = b.child.id();

    // B caches one key of its own (and the warm-up key).
    let mut reader = Raw::connect(b.addr).await;
    let mut stats = Raw::connect(b.addr).await;
    reader.cmd(&["GET", "s:t"]).await;
    let deadline = Deadline::new(Duration::from_secs(5), "B to cache s:t");
    while rule_stats(&mut stats, "s").await.entries < 1 {
        deadline.tick().await;
    }
    let before = peak_rss(pid);

    // Two well-formed messages from a foreign sender, each one 16 MB glob
    // that matches nothing (well under Redis's 32 MB pub/sub buffer limit).
    let glob = vec![b'x'; 16 << 20];
    let message = Message::from(FOREIGN).pattern(0, &glob).build();
    for _ in 0..2 {
        assert_eq!(publish(&mut d, CHANNEL, &message).await, 1, "B receives it");
    }

    const BUDGET: u64 = 1 << 30;
    let watched = Instant::now();
    while watched.elapsed() < RECONNECT {
        let grown = peak_rss(pid).saturating_sub(before);
        assert!(
            grown < BUDGET,
            "B's peak memory grew by {} MB within {:?} of two 16 MB bus messages: each \
             16 MB glob is compiled into 48 bytes per byte, once per cached key",
            grown >> 20,
            watched.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And B still answers.
    assert_frame(&reader.cmd(&["PING"]).await, b"+PONG\r\n");
}

// ---------------------------------------------------------------------------
// 5. A sidecar outlived by its member
// ---------------------------------------------------------------------------

/// The issue: a sidecar's "expiry is extended to cover its longest-lived
/// member". A key whose rule has tags is registered on every write
/// through tierd, `PEXPIRE` included; the registration must extend the
/// sidecars of the tags the key got explicitly (`CACHE.SET … TAGS`) as
/// well, or the tag expires while the key lives. (Found by review: a key
/// tagged with `CACHE.SET` lost its tag after its first expiry.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn extending_a_tagged_keys_expiry_through_tierd_keeps_it_in_its_tag() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let mut tagged = rule("e", "e:*", HOUR);
    tagged.tags = vec![tierd::cache::template::TagTemplate::new("e", &tagged.pattern).unwrap()];
    let tierd = Tierd::start_with(l1_config(
        &redis.url(),
        TrackingMode::Off,
        vec![rule("warmup", "warmup:*", HOUR), tagged],
    ))
    .await;
    wait_until_caching(&tierd, "warmup", "warmup:0").await;
    let mut t = tierd.raw().await;

    assert_frame(
        &t.cmd(&["CACHE.SET", "e:1", "v", "PX", "300", "TAGS", "t"])
            .await,
        b"+OK\r\n",
    );
    // The application keeps the key for an hour, through tierd.
    assert_frame(&t.cmd(&["PEXPIRE", "e:1", "3600000"]).await, b":1\r\n");
    // The sidecar now covers the key's hour, not the 300 ms it started
    // with.
    let pttl = d.cmd(&["PTTL", "tierd:tag:t"]).await;
    let pttl: i64 = text(&pttl).trim_start_matches(':').trim().parse().unwrap();
    assert!(pttl > 3_000_000, "tierd:tag:t expires in {pttl} ms");
    assert_frame(&d.cmd(&["EXISTS", "e:1"]).await, b":1\r\n");

    let members = t.cmd(&["CACHE.MEMBERS", "t"]).await;
    let removed = t.cmd(&["CACHE.INVALIDATE", "TAG", "t"]).await;
    assert_eq!(
        (text(&removed), decode(&members)),
        (":1\r\n".to_owned(), decode(b"*1\r\n$3\r\ne:1\r\n")),
        "e:1 lives for an hour and is tagged t: the tag must reach it"
    );
    assert_frame(&d.cmd(&["EXISTS", "e:1"]).await, b":0\r\n");
}
