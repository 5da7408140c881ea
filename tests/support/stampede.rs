//! Helpers for the stampede-protection tests: rules with `stampede` and
//! `refresh_ahead`, the lease key tierd keeps in Redis, `CACHE.STATS`
//! counters summed over instances, a herd of clients on their own
//! connections released together by a barrier, Redis-side counters, the
//! open-files limit, and tierd as a child process for the tests that need
//! more descriptors than one process may hold.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tierd::config::{OnTimeout, RefreshAhead, RuleConfig, StampedeConfig};
use tokio::sync::{mpsc, oneshot, Barrier};
use tokio::task::JoinHandle;

use super::exchange::{encode, text};
use super::l1::{commandstats, rule, rule_stats, RuleStats, HOUR};
use super::probe::Deadline;
use super::{free_port, Raw};

/// The default `[invalidation] prefix`.
pub const PREFIX: &str = "tierd:";

/// A caching rule (`ttl`, negative caching on, as in the file default) with
/// `stampede = { lease, wait, on_timeout }`.
pub fn stampede_rule(
    name: &str,
    pattern: &str,
    ttl: Duration,
    lease: Duration,
    wait: Duration,
    on_timeout: OnTimeout,
) -> RuleConfig {
    let mut r = rule(name, pattern, ttl);
    r.stampede = Some(StampedeConfig {
        lease,
        wait,
        on_timeout,
    });
    r
}

/// [`stampede_rule`] named `name` on `name:*` keys, cached for an hour.
pub fn lease_rule(
    name: &str,
    lease: Duration,
    wait: Duration,
    on_timeout: OnTimeout,
) -> RuleConfig {
    stampede_rule(name, &format!("{name}:*"), HOUR, lease, wait, on_timeout)
}

/// [`lease_rule`] with the lease most tests use: 30 s, so that it never
/// runs out under a test, and waits of 10 s ending in nil.
pub fn long_lease_rule(name: &str) -> RuleConfig {
    lease_rule(
        name,
        Duration::from_secs(30),
        Duration::from_secs(10),
        OnTimeout::Nil,
    )
}

/// A caching rule with `refresh_ahead` (or none, for controls).
pub fn refresh_rule(
    name: &str,
    pattern: &str,
    ttl: Duration,
    refresh: Option<RefreshAhead>,
) -> RuleConfig {
    let mut r = rule(name, pattern, ttl);
    r.refresh_ahead = refresh;
    r
}

/// The key of `key`'s lease under the default prefix.
pub fn lease_key(key: &str) -> String {
    format!("{PREFIX}lease:{key}")
}

/// Whether `frame` is a nil reply: RESP2 `$-1`/`*-1` or RESP3 `_`.
pub fn is_nil(frame: &[u8]) -> bool {
    matches!(frame, b"$-1\r\n" | b"*-1\r\n" | b"_\r\n")
}

/// `GET key` on a direct connection: the bytes, or `None` for nil.
pub async fn direct_get(direct: &mut Raw, key: &str) -> Option<Vec<u8>> {
    let frame = direct.cmd(&["GET", key]).await;
    if is_nil(&frame) {
        return None;
    }
    assert_eq!(frame[0], b'$', "GET {key} directly: {}", text(&frame));
    let start = frame.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    Some(frame[start..frame.len() - 2].to_vec())
}

/// The token stored in `key`'s lease right now (directly in Redis), `None`
/// when there is no lease.
pub async fn lease_token(direct: &mut Raw, key: &str) -> Option<Vec<u8>> {
    direct_get(direct, &lease_key(key)).await
}

/// Polls Redis until `key`'s lease is gone; fails after `limit`.
pub async fn wait_lease_gone(direct: &mut Raw, key: &str, limit: Duration) {
    let deadline = Deadline::new(limit, format!("{} to be deleted", lease_key(key)));
    loop {
        let exists = direct.cmd(&["EXISTS", &lease_key(key)]).await;
        if exists.as_ref() == b":0\r\n" {
            return;
        }
        deadline.tick().await;
    }
}

/// Every call Redis counted (`INFO commandstats`), `INFO` itself excepted
/// (the tests ask it): how much work a stretch of a test cost upstream.
pub async fn upstream_total(direct: &mut Raw) -> u64 {
    commandstats(direct)
        .await
        .iter()
        .filter(|(name, _)| name.as_str() != "info")
        .map(|(_, calls)| calls)
        .sum()
}

/// One numeric field of Redis's `INFO section`, asked directly.
pub async fn redis_info(direct: &mut Raw, section: &str, field: &str) -> u64 {
    let value = super::probe::info_field(direct, section, field)
        .await
        .unwrap_or_else(|| panic!("Redis INFO {section} has no {field}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("Redis INFO {section} {field}:{value} is not a number"))
}

// ---------------------------------------------------------------------------
// CACHE.STATS over several instances
// ---------------------------------------------------------------------------

/// The counters of one rule, summed over instances.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub hits: u64,
    pub misses: u64,
    pub coalesced: u64,
    pub lease_grants: u64,
    pub lease_waits: u64,
    pub lease_wakeups: u64,
    pub lease_timeouts: u64,
    pub refreshes: u64,
}

impl Counters {
    pub fn of(s: &RuleStats) -> Counters {
        Counters {
            hits: s.hits,
            misses: s.misses,
            coalesced: s.coalesced,
            lease_grants: s.lease_grants,
            lease_waits: s.lease_waits,
            lease_wakeups: s.lease_wakeups,
            lease_timeouts: s.lease_timeouts,
            refreshes: s.refreshes,
        }
    }

    fn add(mut self, o: Counters) -> Counters {
        self.hits += o.hits;
        self.misses += o.misses;
        self.coalesced += o.coalesced;
        self.lease_grants += o.lease_grants;
        self.lease_waits += o.lease_waits;
        self.lease_wakeups += o.lease_wakeups;
        self.lease_timeouts += o.lease_timeouts;
        self.refreshes += o.refreshes;
        self
    }

    /// What happened between `before` and `self` (counters only grow).
    pub fn since(self, before: Counters) -> Counters {
        let d = |a: u64, b: u64| {
            a.checked_sub(b)
                .unwrap_or_else(|| panic!("a CACHE.STATS counter went down: {b} -> {a}"))
        };
        Counters {
            hits: d(self.hits, before.hits),
            misses: d(self.misses, before.misses),
            coalesced: d(self.coalesced, before.coalesced),
            lease_grants: d(self.lease_grants, before.lease_grants),
            lease_waits: d(self.lease_waits, before.lease_waits),
            lease_wakeups: d(self.lease_wakeups, before.lease_wakeups),
            lease_timeouts: d(self.lease_timeouts, before.lease_timeouts),
            refreshes: d(self.refreshes, before.refreshes),
        }
    }
}

/// `CACHE.STATS rule` on one connection, as counters.
pub async fn counters(raw: &mut Raw, rule: &str) -> Counters {
    Counters::of(&rule_stats(raw, rule).await)
}

/// `CACHE.STATS rule` on every instance (one stats connection each),
/// summed.
pub async fn sum_counters(stats: &mut [Raw], rule: &str) -> Counters {
    let mut total = Counters::default();
    for raw in stats.iter_mut() {
        total = total.add(counters(raw, rule).await);
    }
    total
}

/// Waits (up to 5 s) until the summed `lease_waits` are `n` past
/// `before`'s: that many reads are parked behind a lease.
pub async fn wait_parked(
    stats: &mut [Raw],
    rule: &str,
    before: &Counters,
    n: u64,
    what: &str,
) -> Counters {
    wait_counters(stats, rule, Duration::from_secs(5), what, |c| {
        c.lease_waits - before.lease_waits >= n
    })
    .await
}

/// Polls the summed counters until `ok` holds; fails after `limit` with
/// the last counters seen.
pub async fn wait_counters(
    stats: &mut [Raw],
    rule: &str,
    limit: Duration,
    what: &str,
    ok: impl Fn(&Counters) -> bool,
) -> Counters {
    let started = tokio::time::Instant::now();
    loop {
        let c = sum_counters(stats, rule).await;
        if ok(&c) {
            return c;
        }
        assert!(
            started.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}; CACHE.STATS {rule} (summed): {c:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------
// A herd of clients
// ---------------------------------------------------------------------------

/// One client of a herd.
#[derive(Debug, Clone, Copy)]
pub struct Member {
    /// Which tierd it talks to (an index into the addresses given).
    pub instance: usize,
    /// Whether it switches to RESP3 (`HELLO 3`) first.
    pub resp3: bool,
}

impl Member {
    /// `n` RESP2 clients spread over `instances` tierds in turn.
    pub fn round_robin(n: usize, instances: usize) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                instance: i % instances,
                resp3: false,
            })
            .collect()
    }
}

/// What a client that got nil (a loader) is told to do.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// "Load" for `load`, then `SET key value` through its own connection.
    Load { value: String, load: Duration },
    /// Never write; keep the connection open.
    Idle,
    /// Never write; close the connection at once (a loader that died).
    Close,
}

/// A client's read arriving at the test, with its reply.
#[derive(Debug)]
pub struct Arrival {
    pub client: usize,
    pub instance: usize,
    /// The read's reply; `None` when nothing came within the limit.
    pub reply: Option<Bytes>,
    /// When the reply arrived.
    pub at: Instant,
    /// For a nil reply: where to send the loader's [`Verdict`].
    pub verdict: Option<oneshot::Sender<Verdict>>,
}

/// How one client ended.
pub struct End {
    pub client: usize,
    pub instance: usize,
    pub reply: Option<Bytes>,
    pub at: Instant,
    /// The loader's `SET` reply, when it was told to load.
    pub set_reply: Option<Bytes>,
    /// The connection, kept open until the test drops it.
    pub raw: Option<Raw>,
}

/// A herd: every member on its own connection, all connected and (for
/// RESP3 members) switched before any reads, then released together.
pub struct Herd {
    pub arrivals: mpsc::UnboundedReceiver<Arrival>,
    tasks: Vec<JoinHandle<End>>,
    barrier: Arc<Barrier>,
    /// When [`Herd::release`] let the reads go.
    pub released: Option<Instant>,
}

impl Herd {
    /// Connects every member to `addrs[member.instance]`; each will send
    /// `GET key` once released and wait up to `limit` for the reply.
    pub async fn connect(
        addrs: &[SocketAddr],
        members: &[Member],
        key: &str,
        limit: Duration,
    ) -> Herd {
        let barrier = Arc::new(Barrier::new(members.len() + 1));
        let (tx, arrivals) = mpsc::unbounded_channel();
        let connected = Arc::new(Barrier::new(members.len() + 1));
        let mut tasks = Vec::new();
        for (client, m) in members.iter().copied().enumerate() {
            let addr = addrs[m.instance];
            let barrier = barrier.clone();
            let connected = connected.clone();
            let tx = tx.clone();
            let key = key.to_owned();
            tasks.push(tokio::spawn(async move {
                let mut raw = Raw::connect(addr).await;
                if m.resp3 {
                    let hello = raw.cmd(&["HELLO", "3"]).await;
                    assert_eq!(hello[0], b'%', "HELLO 3: {}", text(&hello));
                }
                connected.wait().await;
                barrier.wait().await;
                raw.send(&encode(&["GET", &key])).await;
                let reply = raw.try_frame(limit).await;
                let at = Instant::now();
                let nil = reply.as_deref().is_some_and(is_nil);
                let (verdict_tx, verdict_rx) = if nil {
                    let (a, b) = oneshot::channel();
                    (Some(a), Some(b))
                } else {
                    (None, None)
                };
                let _ = tx.send(Arrival {
                    client,
                    instance: m.instance,
                    reply: reply.clone(),
                    at,
                    verdict: verdict_tx,
                });
                let mut set_reply = None;
                let mut raw = Some(raw);
                if let Some(rx) = verdict_rx {
                    match rx.await {
                        Ok(Verdict::Load { value, load }) => {
                            // The loader's database read: a real delay, not
                            // a stand-in for synchronisation.
                            tokio::time::sleep(load).await;
                            let conn = raw.as_mut().unwrap();
                            conn.send(&encode(&["SET", &key, &value])).await;
                            set_reply = conn.try_frame(limit).await;
                        }
                        Ok(Verdict::Close) => raw = None,
                        Ok(Verdict::Idle) | Err(_) => {}
                    }
                }
                End {
                    client,
                    instance: m.instance,
                    reply,
                    at,
                    set_reply,
                    raw,
                }
            }));
        }
        connected.wait().await;
        Herd {
            arrivals,
            tasks,
            barrier,
            released: None,
        }
    }

    /// Lets every member send its read at once.
    pub async fn release(&mut self) {
        self.barrier.wait().await;
        self.released = Some(Instant::now());
    }

    /// The next arrival, within `limit`.
    pub async fn next(&mut self, limit: Duration) -> Arrival {
        tokio::time::timeout(limit, self.arrivals.recv())
            .await
            .unwrap_or_else(|_| panic!("no client's read ended within {limit:?}"))
            .expect("a herd member's task failed")
    }

    /// Waits for every member to end.
    pub async fn join(self) -> Vec<End> {
        let mut out = Vec::new();
        for t in self.tasks {
            out.push(t.await.expect("a herd member's task panicked"));
        }
        out
    }
}

// ---------------------------------------------------------------------------
// Open files
// ---------------------------------------------------------------------------

/// This process's (soft, hard) open-files limits.
pub fn nofile_limits() -> (u64, u64) {
    let text = std::fs::read_to_string("/proc/self/limits").expect("/proc/self/limits");
    let line = text
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let mut fields = line.split_whitespace().skip(3);
    let mut next = || -> u64 {
        let f = fields.next().unwrap();
        if f == "unlimited" {
            u64::MAX
        } else {
            f.parse().unwrap()
        }
    };
    (next(), next())
}

/// Makes sure this process (and the children it starts from now on) may
/// open `needed` files, raising the soft limit to the hard one with
/// util-linux's `prlimit` when it is lower. Fails with the fix when the
/// hard limit itself is too low.
pub fn ensure_nofile(needed: u64) {
    let (soft, hard) = nofile_limits();
    if soft >= needed {
        return;
    }
    assert!(
        hard >= needed,
        "this test needs {needed} open files, but the hard limit (ulimit -Hn) is {hard}: \
         raise it (e.g. in /etc/security/limits.conf, or `ulimit -n {needed}` as root) \
         and run again"
    );
    let raised = Command::new("prlimit")
        .arg("--pid")
        .arg(std::process::id().to_string())
        .arg(format!("--nofile={hard}:"))
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        raised && nofile_limits().0 >= needed,
        "this test needs {needed} open files and the soft limit is {soft}; `prlimit` could \
         not raise it to the hard limit {hard}: run `ulimit -n {hard}` before cargo test"
    );
}

// ---------------------------------------------------------------------------
// tierd as a child process
// ---------------------------------------------------------------------------

/// The `tierd` binary running as a child process with a config file,
/// killed on drop. Its log goes to a file in its own directory.
pub struct ChildTierd {
    child: Child,
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl ChildTierd {
    /// Writes `listen = <free port>` followed by `toml` to a file, starts
    /// `tierd --config FILE`, and waits until PING answers.
    pub async fn start(toml: &str) -> ChildTierd {
        let dir = tempfile::tempdir().unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let path = dir.path().join("tierd.toml");
        std::fs::write(&path, format!("listen = \"{addr}\"\n{toml}")).unwrap();
        let child = super::spawn_tierd_binary(&path, dir.path());
        let mut me = ChildTierd { child, addr, dir };
        let deadline = Deadline::new(Duration::from_secs(10), "the tierd child to answer PING");
        loop {
            if let Some(status) = me.child.try_wait().unwrap() {
                panic!("tierd exited at startup with {status}:\n{}", me.log());
            }
            if let Ok(mut raw) = tokio::net::TcpStream::connect(addr).await.map(|s| Raw {
                stream: s,
                buf: Default::default(),
            }) {
                raw.send(b"PING\r\n").await;
                if raw.try_frame(Duration::from_secs(1)).await.as_deref() == Some(b"+PONG\r\n") {
                    return me;
                }
            }
            deadline.tick().await;
        }
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("tierd.log")
    }

    /// What tierd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ChildTierd {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Reads `GET key` on fresh connections to `addr` until a read is an L1
/// hit of `rule` (tierd caches nothing before it has read the upstream's
/// command table). Fails after 10 s.
pub async fn wait_caching_at(addr: SocketAddr, rule: &str, key: &str) {
    let mut reader = Raw::connect(addr).await;
    let mut stats = Raw::connect(addr).await;
    let deadline = Deadline::new(Duration::from_secs(10), format!("{addr} to cache {key}"));
    loop {
        let before = rule_stats(&mut stats, rule).await.hits;
        reader.cmd(&["GET", key]).await;
        if rule_stats(&mut stats, rule).await.hits > before {
            return;
        }
        deadline.tick().await;
    }
}
