//! Running out of file descriptors must not stop tierd. The test lowers its
//! own process's soft open-files limit with util-linux's `prlimit` (tierd
//! runs in-process, so it shares the limit), uses up every descriptor, and
//! checks that connected clients are still served, that a client arriving
//! meanwhile waits in the listen backlog rather than being lost, and that it
//! is served within about a second of descriptors coming free.
//!
//! It is the only test in this file on purpose: the limit is per process,
//! and any test running beside it would be starved too. Where `prlimit` or
//! `/proc/self/fd` is missing, it says so and passes without checking.

mod support;

use std::fs::File;
use std::process::Command;
use std::time::Duration;

use support::probe::Deadline;
use support::{Raw, RedisServer, Tierd};

const PONG: &[u8] = b"+PONG\r\n";

/// Sets this process's soft open-files limit (the hard limit is left alone,
/// so the old value can be restored).
fn set_soft_nofile(limit: u64) -> bool {
    Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={limit}:"))
        .status()
        .is_ok_and(|s| s.success())
}

fn open_fds() -> Option<u64> {
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64)
}

fn soft_nofile() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Restores the original soft limit when dropped, even when the test fails.
/// Declared before anything holding descriptors, so that those are closed
/// first and `prlimit` can be spawned.
struct RestoreLimit(u64);

impl Drop for RestoreLimit {
    fn drop(&mut self) {
        if !set_soft_nofile(self.0) {
            eprintln!("could not restore the open-files limit to {}", self.0);
        }
    }
}

async fn ping(raw: &mut Raw, limit: Duration) -> Option<bytes::Bytes> {
    raw.send(b"PING\r\n").await;
    raw.try_frame(limit).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn running_out_of_file_descriptors_delays_clients_but_never_stops_tierd() {
    let (Some(original), Some(_)) = (soft_nofile(), open_fds()) else {
        eprintln!("skipped: no /proc/self/limits or /proc/self/fd");
        return;
    };
    if !set_soft_nofile(original) {
        eprintln!("skipped: `prlimit` (util-linux) is missing or not permitted");
        return;
    }

    let redis = RedisServer::start();
    let tierd = Tierd::start(&redis.url()).await;
    let mut connected = tierd.raw().await;
    assert_eq!(
        ping(&mut connected, Duration::from_secs(5))
            .await
            .as_deref(),
        Some(PONG)
    );

    let restore = RestoreLimit(original);
    let headroom = 40;
    assert!(set_soft_nofile(open_fds().unwrap() + headroom));

    // A few more clients while descriptors last (two each: ours and the one
    // tierd accepted).
    let mut clients = Vec::new();
    for _ in 0..8 {
        let mut c = tierd.raw().await;
        assert_eq!(
            ping(&mut c, Duration::from_secs(5)).await.as_deref(),
            Some(PONG)
        );
        clients.push(c);
    }
    // Then take every descriptor left, and give one back for a last client:
    // tierd's accept for it fails with EMFILE.
    let mut fillers = Vec::new();
    while let Ok(f) = File::open("/dev/null") {
        fillers.push(f);
        assert!(
            fillers.len() < 10_000,
            "the lowered limit did not take effect"
        );
    }
    assert!(!fillers.is_empty(), "no descriptors were left to take");
    fillers.pop();
    let mut waiting = tierd.raw().await;
    waiting.send(b"PING\r\n").await;

    // Seven seconds of failing accepts: long enough that an uncapped
    // exponential backoff would be sleeping for several seconds at a time.
    let shortage = Deadline::new(Duration::from_secs(12), "the shortage to last 7 s");
    let started = tokio::time::Instant::now();
    while started.elapsed() < Duration::from_secs(7) {
        assert!(tierd.is_running(), "tierd stopped while out of descriptors");
        // Clients already connected are served as usual.
        assert_eq!(
            ping(&mut connected, Duration::from_secs(2))
                .await
                .as_deref(),
            Some(PONG)
        );
        shortage.tick().await;
    }
    assert_eq!(
        waiting.try_frame(Duration::ZERO).await,
        None,
        "a client was served although no descriptor was free"
    );

    // The others leave: the waiting client is accepted and answered within
    // about a second (the backoff cap, plus scheduling slack), and new
    // clients are served.
    drop(fillers);
    drop(clients);
    let freed = tokio::time::Instant::now();
    let answer = waiting.try_frame(Duration::from_secs(2)).await;
    assert_eq!(
        answer.as_deref(),
        Some(PONG),
        "the waiting client was not served"
    );
    eprintln!(
        "waiting client served {:?} after descriptors came free",
        freed.elapsed()
    );
    let mut fresh = tierd.raw().await;
    assert_eq!(
        ping(&mut fresh, Duration::from_secs(2)).await.as_deref(),
        Some(PONG)
    );
    assert!(tierd.is_running());

    drop((fresh, waiting, connected));
    drop(restore);
    assert_eq!(soft_nofile(), Some(original));
    tierd.stop().await.unwrap();
}
