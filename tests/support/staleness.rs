//! The monotonic-counter staleness check shared by the coherence and bus
//! suites: writers SET per-key counters that only grow, readers GET and
//! MGET them, and a read that started more than the delivery bound after a
//! write was acknowledged must return that write's counter or a later one.

#![allow(dead_code)]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::exchange::{assert_frame, text};
use super::l1::{decode, Resp};
use super::Raw;

/// Keys `s:0` … `s:{KEYS - 1}`.
pub const KEYS: usize = 50;

/// One acknowledged write: the key got `counter`, acknowledged at `at`.
pub struct Write {
    pub counter: u64,
    pub at: Instant,
}

/// One read: started at `at`, returned `counter` for `key`.
pub struct Read {
    pub key: usize,
    pub at: Instant,
    pub counter: u64,
}

/// The run's length: `var` seconds if set, else 10.
pub fn duration(var: &str) -> Duration {
    let secs = std::env::var(var)
        .ok()
        .map(|s| {
            s.parse::<u64>()
                .unwrap_or_else(|_| panic!("{var} is a number of seconds"))
        })
        .unwrap_or(10);
    Duration::from_secs(secs)
}

/// Every key's write log, starting with the counter 0 set at `Instant::now()`.
pub fn initial_writes() -> Vec<Vec<Write>> {
    (0..KEYS)
        .map(|_| {
            vec![Write {
                counter: 0,
                at: Instant::now(),
            }]
        })
        .collect()
}

/// The counters in a GET or MGET reply.
pub fn counters(reply: &[u8]) -> Result<Vec<u64>, String> {
    let counter = |item: &Resp| match item {
        Resp::Bulk(Some(b)) => std::str::from_utf8(b)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| format!("not a counter: {:?}", text(b))),
        other => Err(format!("unexpected reply {other:?}")),
    };
    match decode(reply) {
        Resp::Array(Some(items)) => items.iter().map(counter).collect(),
        single => Ok(vec![counter(&single)?]),
    }
}

/// Writer `w` of `writers` owns keys `w, w + writers, …` and SETs them in
/// turn through `addr`, each value one past the key's last.
pub async fn writer(
    addr: std::net::SocketAddr,
    w: usize,
    writers: usize,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, Write)> {
    let mut raw = Raw::connect(addr).await;
    let owned: Vec<usize> = (w..KEYS).step_by(writers).collect();
    let mut values = vec![0u64; owned.len()];
    let mut log = Vec::new();
    let mut turn = 0;
    while !stop.load(Ordering::Relaxed) {
        let slot = turn % owned.len();
        turn += 1;
        values[slot] += 1;
        let key = owned[slot];
        let reply = raw
            .cmd(&["SET", &format!("s:{key}"), &values[slot].to_string()])
            .await;
        let at = Instant::now();
        assert_frame(&reply, b"+OK\r\n");
        log.push((
            key,
            Write {
                counter: values[slot],
                at,
            },
        ));
        // Paced so that keys stay cached between writes and most reads are
        // L1 hits: the point is to race invalidations with hits, not to
        // turn tierd into a pass-through.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    log
}

/// Reader `r` walks the keys with its own stride through one tierd; every
/// other read is an `MGET` of three keys, so split MGETs race
/// invalidations too.
pub async fn reader(tierd: std::net::SocketAddr, r: usize, stop: Arc<AtomicBool>) -> Vec<Read> {
    let mut raw = Raw::connect(tierd).await;
    let mut log = Vec::new();
    let mut key = r * 13 % KEYS;
    let step = [7, 11, 13, 17][r % 4];
    let mut mget = false;
    while !stop.load(Ordering::Relaxed) {
        key = (key + step) % KEYS;
        mget = !mget;
        let keys: Vec<usize> = if mget {
            vec![key, (key + 1) % KEYS, (key + 2) % KEYS]
        } else {
            vec![key]
        };
        let names: Vec<String> = keys.iter().map(|k| format!("s:{k}")).collect();
        let mut args = vec![if mget { "MGET" } else { "GET" }];
        args.extend(names.iter().map(String::as_str));
        let at = Instant::now();
        let reply = raw.cmd(&args).await;
        let values = counters(&reply).unwrap_or_else(|e| panic!("reader {r}, {args:?}: {e}"));
        assert_eq!(values.len(), keys.len(), "reader {r}: {args:?}");
        for (key, counter) in keys.into_iter().zip(values) {
            log.push(Read { key, at, counter });
        }
    }
    log
}

/// Lets the run go for `length`, stops the tasks, and collects what they
/// logged: each writer's writes into `writes`, and the readers' reads.
pub async fn finish(
    length: Duration,
    stop: &AtomicBool,
    writes: &mut [Vec<Write>],
    writers: Vec<tokio::task::JoinHandle<Vec<(usize, Write)>>>,
    readers: Vec<tokio::task::JoinHandle<Vec<Read>>>,
) -> Vec<Read> {
    // The length of the run, not a wait for anything.
    tokio::time::sleep(length).await;
    stop.store(true, Ordering::Relaxed);
    for task in writers {
        for (key, write) in task.await.unwrap() {
            writes[key].push(write);
        }
    }
    let mut reads = Vec::new();
    for task in readers {
        reads.extend(task.await.unwrap());
    }
    reads
}

/// The reads that broke the rule: each started more than `delivery` after
/// a write of its key was acknowledged and returned an older counter. Also
/// checks that no read returned a counter no writer wrote.
pub fn violations(writes: &[Vec<Write>], reads: &[Read], delivery: Duration) -> Vec<String> {
    let mut out = Vec::new();
    for read in reads {
        let log = &writes[read.key];
        let known = log.partition_point(|w| w.at + delivery < read.at);
        if known > 0 {
            let floor = &log[known - 1];
            if read.counter < floor.counter {
                out.push(format!(
                    "s:{} read {} but {} was acknowledged {:?} before the read started",
                    read.key,
                    read.counter,
                    floor.counter,
                    read.at - floor.at
                ));
            }
        }
        let newest = log.last().map_or(0, |w| w.counter);
        assert!(
            read.counter <= newest,
            "s:{} read {} but the writer never got past {newest}",
            read.key,
            read.counter
        );
    }
    out
}
