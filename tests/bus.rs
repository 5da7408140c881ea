//! The invalidation bus, seen from users running several tierds on one
//! Redis with `tracking = "off"`, where the bus is the only way an instance
//! learns of the others' writes.
//!
//! - A long run writes through one instance and reads through two others,
//!   and checks that no read returned a value older than one acknowledged
//!   50 ms before it started, while most reads were L1 hits; a control
//!   shows that without the bus the same setup serves stale values.
//! - L1 caches nothing until the bus subscription is live (a Redis ACL
//!   that refuses the channel keeps it suspended).
//! - Killing either bus connection flushes that instance's L1, which then
//!   serves from upstream until the bus is back, and nothing published
//!   meanwhile is lost.
//! - Garbage on the channel is counted and ignored whole; a message built
//!   here from the documented format is applied.
//! - Flushes, `CACHE.INVALIDATE` (keys, tags, patterns, `L1ONLY`) reach the
//!   other instances; an instance ignores its own messages; with the bus
//!   off there are no bus connections.

mod support;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use support::bus::{
    bus_config, cache, ids_named, info_num, noise, publish, start_instance, tierd_info, wait_info,
    Instance, Message, CHANNEL, PUBLISHER, SUBSCRIBER,
};
use support::exchange::{assert_frame, text};
use support::l1::{
    decode, direct, must, poll_until, rule, rule_stats, L1Probe, Outcome, Resp, HOUR,
};
use support::probe::bulk;
use support::{staleness, Raw, RedisServer, Tierd};

/// How soon a write through one tierd must be visible through another.
const DELIVERY: Duration = Duration::from_millis(50);
/// How long a lost bus link may take to be noticed and re-established.
const RECONNECT: Duration = Duration::from_secs(5);
/// A sender id no tierd draws (well, with odds of 2^-64).
const FOREIGN: u64 = 0x5eed_f00d_0bad_cafe;

/// `n` instances on `redis`, each with `rules`, started one by one.
async fn instances(
    redis: &RedisServer,
    n: usize,
    rules: &[tierd::config::RuleConfig],
) -> Vec<Instance> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start_instance(redis, bus_config(&redis.url(), rules.to_vec())).await);
    }
    out
}

// ---------------------------------------------------------------------------
// The staleness run
// ---------------------------------------------------------------------------

const WRITERS: usize = 3;
const READERS_PER_INSTANCE: usize = 2;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_without_tracking_stay_fresh_through_the_bus() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    for key in 0..staleness::KEYS {
        must(&mut d, &["SET", &format!("s:{key}"), "0"]).await;
    }
    let all = instances(&redis, 3, &[rule("s", "s:*", HOUR)]).await;
    let (a, readers_on) = (&all[0], &all[1..]);
    let mut writes = staleness::initial_writes();
    let mut stats = Vec::new();
    for inst in readers_on {
        let mut raw = inst.tierd.raw().await;
        let before = rule_stats(&mut raw, "s").await;
        stats.push((raw, before));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let writer_tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(staleness::writer(a.tierd.addr, w, WRITERS, stop.clone())))
        .collect();
    let mut reader_tasks = Vec::new();
    for (i, inst) in readers_on.iter().enumerate() {
        for r in 0..READERS_PER_INSTANCE {
            let n = i * READERS_PER_INSTANCE + r;
            reader_tasks.push(tokio::spawn(staleness::reader(
                inst.tierd.addr,
                n,
                stop.clone(),
            )));
        }
    }
    let reads = staleness::finish(
        staleness::duration("TIERD_BUS_STALENESS_SECS"),
        &stop,
        &mut writes,
        writer_tasks,
        reader_tasks,
    )
    .await;
    let write_count: usize = writes.iter().map(|w| w.len() - 1).sum();

    let violations = staleness::violations(&writes, &reads, DELIVERY);

    let mut rates = Vec::new();
    for (name, (raw, before)) in ["B", "C"].iter().zip(stats.iter_mut()) {
        let after = rule_stats(raw, "s").await;
        let (hits, misses) = (after.hits - before.hits, after.misses - before.misses);
        rates.push((*name, hits, misses));
    }
    let mut b_info = readers_on[0].tierd.raw().await;
    let received = tierd_info(&mut b_info, "tierd_bus_received").await;
    eprintln!(
        "bus staleness run: {write_count} writes through A, {} reads through B and C, \
         L1 (hits, misses): {rates:?}, {received} bus messages received by B, {} violations",
        reads.len(),
        violations.len()
    );
    assert!(
        violations.is_empty(),
        "{} stale reads of {} (first 20):\n{}",
        violations.len(),
        reads.len(),
        violations[..violations.len().min(20)].join("\n")
    );
    assert!(
        write_count >= 1000,
        "only {write_count} writes: the run proves little"
    );
    for (name, hits, misses) in rates {
        assert!(
            hits >= 2000 && hits >= misses,
            "{name}: only {hits} L1 hits against {misses} misses: the run did not exercise the cache"
        );
    }
    assert!(received > 0, "B received nothing over the bus");
}

// ---------------------------------------------------------------------------
// The control: without the bus
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_bus_another_instance_serves_stale_values() {
    // The same scenario twice: a key cached on B, then written through A.
    async fn scenario(bus: bool) -> (Vec<bytes::Bytes>, Vec<Outcome>) {
        let redis = RedisServer::start();
        let mut config = bus_config(&redis.url(), vec![rule("k", "k:*", HOUR)]);
        config.invalidation.bus = bus;
        let a = Tierd::start_with(config.clone()).await;
        let b = Tierd::start_with(config).await;
        support::l1::wait_until_caching(&a, support::bus::WARMUP, "warmup:0").await;
        support::l1::wait_until_caching(&b, support::bus::WARMUP, "warmup:0").await;
        let mut on_a = L1Probe::new(&redis, &a, "k").await;
        let mut on_b = L1Probe::new(&redis, &b, "k").await;
        must(&mut on_a.direct, &["SET", "k:1", "old"]).await;
        assert_frame(&cache(&mut on_b, "k:1").await, &bulk("old"));
        assert_frame(&on_a.tierd.cmd(&["SET", "k:1", "new"]).await, b"+OK\r\n");
        let written = Instant::now();
        assert_frame(&on_a.reference(&["GET", "k:1"]).await, &bulk("new"));
        // Every read through B for four times the delivery bound.
        let mut replies = Vec::new();
        let mut outcomes = Vec::new();
        while written.elapsed() < DELIVERY * 4 {
            let (reply, outcome) = on_b.read(&["GET", "k:1"]).await;
            replies.push(reply);
            outcomes.push(outcome);
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (replies, outcomes)
    }

    let (with_bus, _) = scenario(true).await;
    let late: Vec<_> = with_bus
        .iter()
        .skip_while(|r| r.as_ref() != bulk("new").as_ref())
        .collect();
    assert!(
        !late.is_empty() && late.iter().all(|r| r.as_ref() == bulk("new").as_ref()),
        "with the bus, B must switch to the new value and stay there: {:?}",
        with_bus.iter().map(|r| text(r)).collect::<Vec<_>>()
    );

    let (without, outcomes) = scenario(false).await;
    assert!(
        without.iter().all(|r| r.as_ref() == bulk("old").as_ref()),
        "without the bus (and without tracking) B has no way to learn of A's write, \
         so it keeps serving the old value: {:?}",
        without.iter().map(|r| text(r)).collect::<Vec<_>>()
    );
    assert!(
        outcomes.iter().all(|o| *o == Outcome::Hit),
        "the stale value comes from B's L1: {outcomes:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_bus_off_there_are_no_bus_connections() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    let mut off = bus_config(&redis.url(), vec![rule("k", "k:*", HOUR)]);
    off.invalidation.bus = false;
    let off = Tierd::start_with(off).await;
    // Caching starts without the bus: L1 is not left waiting for it.
    support::l1::wait_until_caching(&off, support::bus::WARMUP, "warmup:0").await;
    // The bus runs only when a rule caches something.
    let mut no_rules =
        support::l1::l1_config(&redis.url(), tierd::config::TrackingMode::Off, vec![]);
    no_rules.invalidation.bus = true;
    let no_rules = Tierd::start_with(no_rules).await;
    let mut raw = no_rules.raw().await;
    wait_info(
        &mut raw,
        "tierd",
        "tierd_command_table_loaded",
        RECONNECT,
        |v| v == 1,
    )
    .await;
    assert_frame(&raw.cmd(&["SET", "k:1", "v"]).await, b"+OK\r\n");

    assert_eq!(
        ids_named(&mut d, SUBSCRIBER).await.len(),
        0,
        "no {SUBSCRIBER}"
    );
    assert_eq!(
        ids_named(&mut d, PUBLISHER).await.len(),
        0,
        "no {PUBLISHER}"
    );
    for (name, t) in [("bus = false", &off), ("no caching rule", &no_rules)] {
        let mut raw = t.raw().await;
        for field in [
            "tierd_bus_enabled",
            "tierd_bus_live",
            "tierd_bus_links",
            "tierd_bus_sent",
        ] {
            assert_eq!(tierd_info(&mut raw, field).await, 0, "{name}: {field}");
        }
    }
    // Redis agrees: nobody is subscribed to the bus channel.
    let reply = d.cmd(&["PUBSUB", "NUMSUB", CHANNEL]).await;
    assert_eq!(
        decode(&reply),
        Resp::Array(Some(vec![
            Resp::Bulk(Some(CHANNEL.as_bytes().to_vec())),
            Resp::Int(0)
        ]))
    );

    // The same Redis with an instance on the bus: one of each, enabled.
    let on = instances(&redis, 1, &[rule("k", "k:*", HOUR)]).await;
    let mut raw = on[0].tierd.raw().await;
    assert_eq!(tierd_info(&mut raw, "tierd_bus_enabled").await, 1);
    assert_eq!(tierd_info(&mut raw, "tierd_bus_live").await, 1);
    assert_eq!(ids_named(&mut d, SUBSCRIBER).await.len(), 1);
    assert_eq!(ids_named(&mut d, PUBLISHER).await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_cached_until_the_bus_subscription_is_live() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    // A user that may do everything but subscribe to the bus channel.
    must(
        &mut d,
        &[
            "ACL",
            "SETUSER",
            "tierd",
            "on",
            ">s3cret",
            "~*",
            "resetchannels",
            "&other",
            "+@all",
        ],
    )
    .await;
    let url = format!("redis://tierd:s3cret@127.0.0.1:{}", redis.port);
    let tierd = Tierd::start_with(bus_config(&url, vec![rule("w", "w:*", HOUR)])).await;
    let mut probe = L1Probe::new(&redis, &tierd, "w").await;
    let mut info = tierd.raw().await;
    must(&mut d, &["SET", "w:1", "v0"]).await;
    // Refused subscriptions, seen by Redis: tierd keeps trying.
    let deadline = support::probe::Deadline::new(RECONNECT, "a refused SUBSCRIBE in ACL LOG");
    loop {
        let log = d.cmd(&["ACL", "LOG"]).await;
        if text(&log).contains(CHANNEL) {
            break;
        }
        deadline.tick().await;
    }
    assert_eq!(tierd_info(&mut info, "tierd_bus_live").await, 0);
    assert_eq!(info_num(&mut info, "cache", "l1_suspended").await, 1);
    for _ in 0..5 {
        let (reply, outcome) = probe.read(&["GET", "w:1"]).await;
        assert_frame(&reply, &bulk("v0"));
        assert_ne!(outcome, Outcome::Hit, "cached before the bus was live");
    }
    assert_eq!(probe.stats().await.entries, 0);

    // Allowed: tierd subscribes on its next attempt and starts caching.
    must(&mut d, &["ACL", "SETUSER", "tierd", &format!("&{CHANNEL}")]).await;
    wait_info(&mut info, "tierd", "tierd_bus_live", RECONNECT, |v| v == 1).await;
    assert_eq!(tierd_info(&mut info, "tierd_bus_links").await, 1);
    assert_eq!(info_num(&mut info, "cache", "l1_suspended").await, 0);
    assert_frame(&cache(&mut probe, "w:1").await, &bulk("v0"));
}

// ---------------------------------------------------------------------------
// Losing a bus connection
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_bus_subscription_flushes_l1_until_it_is_back() {
    let redis = RedisServer::start();
    let rules = vec![rule("b", "b:*", HOUR)];
    let a = start_instance(&redis, bus_config(&redis.url(), rules.clone())).await;
    // B waits a while before reconnecting, so that the outage is long
    // enough to look at.
    let mut config = bus_config(&redis.url(), rules);
    config.upstream.backoff_min = Duration::from_secs(1);
    let b = start_instance(&redis, config).await;
    let mut d = direct(&redis).await;
    let mut on_a = L1Probe::new(&redis, &a.tierd, "b").await;
    let mut on_b = L1Probe::new(&redis, &b.tierd, "b").await;
    let mut b_info = b.tierd.raw().await;
    for key in ["b:1", "b:2", "b:3"] {
        must(&mut d, &["SET", key, "v0"]).await;
        cache(&mut on_b, key).await;
    }
    let links = tierd_info(&mut b_info, "tierd_bus_links").await;
    assert_eq!(links, 1);

    assert_frame(
        &d.cmd(&["CLIENT", "KILL", "ID", &b.subscriber.to_string()])
            .await,
        b":1\r\n",
    );
    // Published while B is not subscribed: B never sees this message.
    assert_frame(&on_a.tierd.cmd(&["SET", "b:1", "v1"]).await, b"+OK\r\n");

    wait_info(&mut b_info, "cache", "l1_suspended", RECONNECT, |v| v == 1).await;
    assert_eq!(tierd_info(&mut b_info, "tierd_bus_live").await, 0);
    assert_eq!(
        info_num(&mut b_info, "cache", "l1_entries").await,
        0,
        "B's L1 was flushed"
    );
    // B serves upstream's values and caches nothing meanwhile.
    for _ in 0..3 {
        let (reply, outcome) = on_b.read(&["GET", "b:1"]).await;
        assert_frame(&reply, &bulk("v1"));
        assert_ne!(
            outcome,
            Outcome::Hit,
            "nothing is cached while the bus is down"
        );
        let (reply, outcome) = on_b.read(&["GET", "b:2"]).await;
        assert_frame(&reply, &bulk("v0"));
        assert_ne!(
            outcome,
            Outcome::Hit,
            "nothing is cached while the bus is down"
        );
    }

    // Back: a new subscription, and caching again.
    wait_info(&mut b_info, "tierd", "tierd_bus_links", RECONNECT, |v| {
        v > links
    })
    .await;
    assert_eq!(tierd_info(&mut b_info, "tierd_bus_live").await, 1);
    let subs = ids_named(&mut d, SUBSCRIBER).await;
    assert_eq!(subs.len(), 2, "A's and B's new subscription: {subs:?}");
    assert!(!subs.contains(&b.subscriber), "the killed one is gone");
    assert_eq!(info_num(&mut b_info, "cache", "l1_suspended").await, 0);
    assert_frame(&cache(&mut on_b, "b:1").await, &bulk("v1"));
    assert_frame(&cache(&mut on_b, "b:2").await, &bulk("v0"));

    // And the bus works again, both ways.
    assert_frame(&on_a.tierd.cmd(&["SET", "b:2", "v2"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_b, "b:2", &bulk("v2"), written, DELIVERY).await;
    cache(&mut on_a, "b:3").await;
    assert_frame(&on_b.tierd.cmd(&["SET", "b:3", "v3"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_a, "b:3", &bulk("v3"), written, DELIVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_bus_publisher_loses_no_invalidation() {
    let redis = RedisServer::start();
    let all = instances(&redis, 2, &[rule("p", "p:*", HOUR)]).await;
    let (a, b) = (&all[0], &all[1]);
    let mut d = direct(&redis).await;
    let mut on_a = L1Probe::new(&redis, &a.tierd, "p").await;
    let mut on_b = L1Probe::new(&redis, &b.tierd, "p").await;
    let mut a_info = a.tierd.raw().await;
    let mut b_info = b.tierd.raw().await;
    for key in ["p:1", "p:2"] {
        must(&mut d, &["SET", key, "v0"]).await;
        cache(&mut on_b, key).await;
        cache(&mut on_a, key).await;
    }

    // A's publisher dies, and A writes at once: whether A publishes into
    // the dead connection or notices first, the invalidation must reach B
    // once A's bus is back. B's own link is fine, so nothing else will
    // flush B.
    assert_frame(
        &d.cmd(&["CLIENT", "KILL", "ID", &a.publisher.to_string()])
            .await,
        b":1\r\n",
    );
    assert_frame(&on_a.tierd.cmd(&["SET", "p:1", "v1"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_b, "p:1", &bulk("v1"), written, RECONNECT).await;
    let (reply, outcome) = on_b.read(&["GET", "p:2"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_eq!(
        outcome,
        Outcome::Hit,
        "B's L1 was not flushed: its own link is fine"
    );
    wait_info(&mut a_info, "tierd", "tierd_bus_links", RECONNECT, |v| {
        v >= 2
    })
    .await;
    let pubs = ids_named(&mut d, PUBLISHER).await;
    assert_eq!(pubs.len(), 2, "{pubs:?}");
    assert!(!pubs.contains(&a.publisher));

    // B's publisher dies: B cannot tell the others about its writes, so it
    // loses trust too (L1 flushed) until both connections are back.
    let links = tierd_info(&mut b_info, "tierd_bus_links").await;
    assert_frame(
        &d.cmd(&["CLIENT", "KILL", "ID", &b.publisher.to_string()])
            .await,
        b":1\r\n",
    );
    wait_info(&mut b_info, "tierd", "tierd_bus_links", RECONNECT, |v| {
        v > links
    })
    .await;
    let (reply, outcome) = on_b.read(&["GET", "p:2"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_ne!(
        outcome,
        Outcome::Hit,
        "B's L1 was flushed when its publisher died"
    );
    assert_frame(&cache(&mut on_b, "p:2").await, &bulk("v0"));
    let subs = ids_named(&mut d, SUBSCRIBER).await;
    assert_eq!(subs.len(), 2, "{subs:?}");
    assert!(
        !subs.contains(&b.subscriber),
        "B set up both connections again"
    );

    // And the bus works again.
    cache(&mut on_a, "p:2").await;
    assert_frame(&on_b.tierd.cmd(&["SET", "p:2", "v2"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_a, "p:2", &bulk("v2"), written, DELIVERY).await;
    assert_frame(&on_a.tierd.cmd(&["SET", "p:2", "v3"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_b, "p:2", &bulk("v3"), written, DELIVERY).await;
}

// ---------------------------------------------------------------------------
// What is on the channel
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_channel_is_counted_and_ignored() {
    let redis = RedisServer::start();
    let all = instances(&redis, 2, &[rule("g", "g:*", HOUR)]).await;
    let (a, b) = (&all[0], &all[1]);
    let mut d = direct(&redis).await;
    let mut on_b = L1Probe::new(&redis, &b.tierd, "g").await;
    let mut infos = [a.tierd.raw().await, b.tierd.raw().await];
    let long_key = format!("g:{}", "x".repeat(200));
    let keys = ["g:1", "g:2", "g:3", long_key.as_str()];
    for key in keys {
        must(&mut d, &["SET", key, "v0"]).await;
        cache(&mut on_b, key).await;
    }
    let mut before = Vec::new();
    for raw in &mut infos {
        before.push((
            tierd_info(raw, "tierd_bus_rejected").await,
            tierd_info(raw, "tierd_bus_received").await,
        ));
    }

    let header = Message::from(FOREIGN).build();
    let mut random = noise(4096, 0x1234_5678);
    random[0] = b'x';
    let mut huge_liar = Message::from(FOREIGN).raw(&[1, 0, 1]).build();
    support::bus::leb128(&mut huge_liar, 2 << 20);
    huge_liar.extend_from_slice(&vec![b'g'; 1 << 20]);
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("random bytes", random),
        ("empty", Vec::new()),
        ("text", b"hello from somebody else".to_vec()),
        ("magic only", b"TDB\x01".to_vec()),
        ("half a sender id", b"TDB\x01\x01\x02\x03".to_vec()),
        ("header without records", header.clone()),
        (
            "another version",
            Message::from(FOREIGN)
                .keys(0, &[b"g:1"])
                .build()
                .into_iter()
                .enumerate()
                .map(|(i, b)| if i == 3 { 2 } else { b })
                .collect(),
        ),
        (
            // A complete record for g:1, then a truncated one for g:2: all
            // or nothing, so g:1 must stay cached too.
            "truncated after a good record",
            {
                let mut m = Message::from(FOREIGN)
                    .keys(0, &[b"g:1"])
                    .keys(0, &[b"g:2"])
                    .build();
                m.pop();
                m
            },
        ),
        (
            "a key count of 2^32 - 1",
            Message::from(FOREIGN)
                .raw(&[1, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 3])
                .raw(b"g:1")
                .build(),
        ),
        (
            "a key count of 2 with one key",
            Message::from(FOREIGN)
                .raw(&[1, 0, 2, 3])
                .raw(b"g:1")
                .build(),
        ),
        (
            "a key count of 0",
            Message::from(FOREIGN).raw(&[1, 0, 0]).build(),
        ),
        (
            "a varint longer than 32 bits",
            Message::from(FOREIGN)
                .raw(&[3, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01])
                .build(),
        ),
        (
            "an unknown record kind",
            Message::from(FOREIGN).keys(0, &[b"g:1"]).raw(&[9]).build(),
        ),
        (
            "trailing bytes",
            Message::from(FOREIGN).keys(0, &[b"g:1"]).raw(&[1]).build(),
        ),
        ("a 1 MB key of a 2 MB declared length", huge_liar),
        ("1 MB of noise after the magic", {
            let mut m = b"TDB\x01".to_vec();
            m.extend_from_slice(&noise(1 << 20, 99));
            m
        }),
    ];
    for (what, payload) in &garbage {
        assert_eq!(
            publish(&mut d, CHANNEL, payload).await,
            2,
            "{what}: both instances are subscribed"
        );
    }
    let n = garbage.len() as u64;
    for (raw, (rejected, received)) in infos.iter_mut().zip(&before) {
        wait_info(raw, "tierd", "tierd_bus_rejected", RECONNECT, |v| {
            v >= rejected + n
        })
        .await;
        assert_eq!(tierd_info(raw, "tierd_bus_rejected").await, rejected + n);
        assert_eq!(tierd_info(raw, "tierd_bus_received").await, *received);
        assert_eq!(
            tierd_info(raw, "tierd_bus_live").await,
            1,
            "the link stayed up"
        );
    }
    assert!(a.tierd.is_running() && b.tierd.is_running());
    // L1 kept everything.
    for key in keys {
        let (reply, outcome) = on_b.read(&["GET", key]).await;
        assert_frame(&reply, &bulk("v0"));
        assert_eq!(outcome, Outcome::Hit, "{key} stays cached");
    }

    // A well-formed message built here from the documented format is
    // applied: Redis changes behind B's back (no tracking), and only the
    // message can tell B.
    for key in keys {
        must(&mut d, &["SET", key, "v1"]).await;
    }
    let (reply, _) = on_b.read(&["GET", "g:1"]).await;
    assert_frame(&reply, &bulk("v0"));
    let keys_msg = Message::from(FOREIGN)
        .keys(0, &[b"g:1", long_key.as_bytes()])
        .build();
    assert_eq!(publish(&mut d, CHANNEL, &keys_msg).await, 2);
    let sent = Instant::now();
    poll_until(&mut on_b, "g:1", &bulk("v1"), sent, DELIVERY).await;
    poll_until(&mut on_b, &long_key, &bulk("v1"), sent, DELIVERY).await;
    let (reply, outcome) = on_b.read(&["GET", "g:2"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_eq!(outcome, Outcome::Hit, "only the named keys were dropped");
    // A pattern record and a flush record.
    let pattern_msg = Message::from(FOREIGN).pattern(0, b"g:[2]").build();
    assert_eq!(publish(&mut d, CHANNEL, &pattern_msg).await, 2);
    let sent = Instant::now();
    poll_until(&mut on_b, "g:2", &bulk("v1"), sent, DELIVERY).await;
    let (reply, outcome) = on_b.read(&["GET", "g:3"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_eq!(outcome, Outcome::Hit, "g:3 does not match g:[2]");
    let flush_msg = Message::from(FOREIGN).flush_db(0).build();
    assert_eq!(publish(&mut d, CHANNEL, &flush_msg).await, 2);
    let sent = Instant::now();
    poll_until(&mut on_b, "g:3", &bulk("v1"), sent, DELIVERY).await;
    for (raw, (rejected, received)) in infos.iter_mut().zip(&before) {
        wait_info(raw, "tierd", "tierd_bus_received", RECONNECT, |v| {
            v >= received + 3
        })
        .await;
        assert_eq!(tierd_info(raw, "tierd_bus_rejected").await, rejected + n);
    }

    // And writes through A still reach B.
    cache(&mut on_b, "g:1").await;
    let mut on_a = a.tierd.raw().await;
    assert_frame(&on_a.cmd(&["SET", "g:1", "v2"]).await, b"+OK\r\n");
    let written = Instant::now();
    poll_until(&mut on_b, "g:1", &bulk("v2"), written, DELIVERY).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_ignores_its_own_messages() {
    let redis = RedisServer::start();
    let all = instances(&redis, 2, &[rule("o", "o:*", HOUR)]).await;
    let (a, b) = (&all[0], &all[1]);
    let mut d = direct(&redis).await;
    let mut on_a = L1Probe::new(&redis, &a.tierd, "o").await;
    let mut a_info = a.tierd.raw().await;
    let mut b_info = b.tierd.raw().await;
    let a_received = tierd_info(&mut a_info, "tierd_bus_received").await;
    let a_sent = tierd_info(&mut a_info, "tierd_bus_sent").await;
    let b_received = tierd_info(&mut b_info, "tierd_bus_received").await;

    assert_frame(&on_a.tierd.cmd(&["SET", "o:1", "v1"]).await, b"+OK\r\n");
    // A caches its own write's result at once; its own message coming back
    // must not drop it.
    assert_frame(&cache(&mut on_a, "o:1").await, &bulk("v1"));
    wait_info(&mut b_info, "tierd", "tierd_bus_received", RECONNECT, |v| {
        v > b_received
    })
    .await;
    assert!(tierd_info(&mut a_info, "tierd_bus_sent").await > a_sent);
    // Redis delivers a channel's messages in order: once A has received a
    // message published after its own, it has seen its own too.
    let marker = Message::from(FOREIGN).keys(0, &[b"o:unrelated"]).build();
    assert_eq!(publish(&mut d, CHANNEL, &marker).await, 2);
    wait_info(&mut a_info, "tierd", "tierd_bus_received", RECONNECT, |v| {
        v > a_received
    })
    .await;
    assert_eq!(
        tierd_info(&mut a_info, "tierd_bus_received").await,
        a_received + 1,
        "A received only the foreign marker, not its own message"
    );
    wait_info(&mut b_info, "tierd", "tierd_bus_received", RECONNECT, |v| {
        v >= b_received + 2
    })
    .await;
    assert_eq!(tierd_info(&mut a_info, "tierd_bus_rejected").await, 0);
    let (reply, outcome) = on_a.read(&["GET", "o:1"]).await;
    assert_frame(&reply, &bulk("v1"));
    assert_eq!(
        outcome,
        Outcome::Hit,
        "A's own message did not drop its entry"
    );
}

// ---------------------------------------------------------------------------
// Flushes and CACHE.INVALIDATE
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushes_through_one_instance_empty_the_others() {
    let redis = RedisServer::start();
    let all = instances(&redis, 2, &[rule("f", "f:*", HOUR)]).await;
    let (a, b) = (&all[0], &all[1]);
    let mut on_b = L1Probe::new(&redis, &b.tierd, "f").await;
    let mut on_a = a.tierd.raw().await;
    let mut b_info = b.tierd.raw().await;
    let keys = ["f:1", "f:2", "f:3"];
    // Every write goes through A (with tracking off, B would not learn of
    // a direct one); B sees it, then caches it.
    async fn put(on_a: &mut Raw, on_b: &mut L1Probe, key: &str, value: &str) {
        assert_frame(&on_a.cmd(&["SET", key, value]).await, b"+OK\r\n");
        poll_until(on_b, key, &bulk(value), Instant::now(), DELIVERY).await;
        assert_frame(&cache(on_b, key).await, &bulk(value));
    }

    for flush in [&["FLUSHDB"][..], &["FLUSHALL"][..]] {
        for key in keys {
            put(&mut on_a, &mut on_b, key, "v0").await;
        }
        assert_frame(&on_a.cmd(flush).await, b"+OK\r\n");
        let flushed = Instant::now();
        for key in keys {
            poll_until(&mut on_b, key, b"$-1\r\n", flushed, DELIVERY).await;
        }
    }

    // SWAPDB 0 1: B's db 0 entries must go.
    assert_frame(&on_a.cmd(&["SELECT", "1"]).await, b"+OK\r\n");
    assert_frame(&on_a.cmd(&["SET", "f:1", "from db 1"]).await, b"+OK\r\n");
    assert_frame(&on_a.cmd(&["SELECT", "0"]).await, b"+OK\r\n");
    for key in keys {
        put(&mut on_a, &mut on_b, key, "v0").await;
    }
    assert_frame(&on_a.cmd(&["SWAPDB", "0", "1"]).await, b"+OK\r\n");
    let swapped = Instant::now();
    poll_until(&mut on_b, "f:1", &bulk("from db 1"), swapped, DELIVERY).await;
    poll_until(&mut on_b, "f:2", b"$-1\r\n", swapped, DELIVERY).await;

    // A FLUSHDB of another db leaves B's db 0 entries alone.
    for key in keys {
        put(&mut on_a, &mut on_b, key, "v1").await;
    }
    let received = tierd_info(&mut b_info, "tierd_bus_received").await;
    assert_frame(&on_a.cmd(&["SELECT", "2"]).await, b"+OK\r\n");
    assert_frame(&on_a.cmd(&["FLUSHDB"]).await, b"+OK\r\n");
    wait_info(&mut b_info, "tierd", "tierd_bus_received", RECONNECT, |v| {
        v > received
    })
    .await;
    for key in keys {
        let (reply, outcome) = on_b.read(&["GET", key]).await;
        assert_frame(&reply, &bulk("v1"));
        assert_eq!(outcome, Outcome::Hit, "{key}: db 2 was flushed, not db 0");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_l1only_pattern_drops_matching_entries_everywhere_and_keeps_redis() {
    let redis = RedisServer::start();
    let rules = [rule("user", "user:*", HOUR), rule("other", "other:*", HOUR)];
    let all = instances(&redis, 3, &rules).await;
    let mut d = direct(&redis).await;
    let keys = ["user:1", "user:2", "user:3", "other:1"];
    for key in keys {
        must(&mut d, &["SET", key, &format!("{key}-v")]).await;
    }
    let mut probes = Vec::new();
    for inst in &all {
        let mut users = L1Probe::new(&redis, &inst.tierd, "user").await;
        let mut others = L1Probe::new(&redis, &inst.tierd, "other").await;
        for key in &keys[..3] {
            cache(&mut users, key).await;
        }
        cache(&mut others, "other:1").await;
        assert_eq!(users.stats().await.entries, 3);
        probes.push((users, others));
    }

    let mut on_a = all[0].tierd.raw().await;
    let reply = on_a
        .cmd(&["CACHE.INVALIDATE", "PATTERN", "user:*", "L1ONLY"])
        .await;
    let sent = Instant::now();
    assert_frame(&reply, b":3\r\n");
    assert_eq!(
        probes[0].0.stats().await.entries,
        0,
        "A dropped its own entries before answering"
    );
    for (i, (users, _)) in probes.iter_mut().enumerate().skip(1) {
        loop {
            let started = sent.elapsed();
            if users.stats().await.entries == 0 {
                break;
            }
            assert!(
                started <= DELIVERY,
                "instance {i} still holds user:* entries {started:?} later"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_frame(
        &d.cmd(&["EXISTS", "user:1", "user:2", "user:3"]).await,
        b":3\r\n",
    );
    for (i, (users, others)) in probes.iter_mut().enumerate() {
        for key in &keys[..3] {
            let (reply, outcome) = users.read(&["GET", key]).await;
            assert_frame(&reply, &bulk(&format!("{key}-v")));
            assert_eq!(outcome, Outcome::Miss, "instance {i}: {key} was dropped");
        }
        let (reply, outcome) = others.read(&["GET", "other:1"]).await;
        assert_frame(&reply, &bulk("other:1-v"));
        assert_eq!(outcome, Outcome::Hit, "instance {i}: other:1 stays cached");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_invalidate_through_one_instance_reaches_the_others() {
    let redis = RedisServer::start();
    let all = instances(&redis, 2, &[rule("c", "c:*", HOUR)]).await;
    let (a, b) = (&all[0], &all[1]);
    let mut d = direct(&redis).await;
    let mut on_b = L1Probe::new(&redis, &b.tierd, "c").await;
    let mut on_a = a.tierd.raw().await;
    for key in ["c:k1", "c:k2", "c:p:1", "c:p:2"] {
        must(&mut d, &["SET", key, "v0"]).await;
    }
    // Tagged through A, so that A knows the tag's members.
    let tagged = on_a
        .cmd(&["CACHE.SET", "c:t:1", "v0", "TAGS", "colour"])
        .await;
    assert_frame(&tagged, b"+OK\r\n");
    for key in ["c:k1", "c:k2", "c:p:1", "c:p:2", "c:t:1"] {
        assert_frame(&cache(&mut on_b, key).await, &bulk("v0"));
    }

    let reply = on_a.cmd(&["CACHE.INVALIDATE", "KEY", "c:k1"]).await;
    let sent = Instant::now();
    assert_frame(&reply, b":1\r\n");
    poll_until(&mut on_b, "c:k1", b"$-1\r\n", sent, DELIVERY).await;

    let reply = on_a.cmd(&["CACHE.INVALIDATE", "PATTERN", "c:p:*"]).await;
    let sent = Instant::now();
    assert_frame(&reply, b":2\r\n");
    poll_until(&mut on_b, "c:p:1", b"$-1\r\n", sent, DELIVERY).await;
    poll_until(&mut on_b, "c:p:2", b"$-1\r\n", sent, DELIVERY).await;

    let reply = on_a.cmd(&["CACHE.INVALIDATE", "TAG", "colour"]).await;
    let sent = Instant::now();
    assert_frame(&reply, b":1\r\n");
    poll_until(&mut on_b, "c:t:1", b"$-1\r\n", sent, DELIVERY).await;

    let (reply, outcome) = on_b.read(&["GET", "c:k2"]).await;
    assert_frame(&reply, &bulk("v0"));
    assert_eq!(outcome, Outcome::Hit, "c:k2 was not invalidated");
}
