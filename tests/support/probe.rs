//! Probing helpers for state and fault tests: polling a condition with a
//! deadline, reading Redis's own view of its clients (`CLIENT LIST`,
//! `INFO clients`), and starting a redis-server on a chosen port.

use std::time::Duration;

use bytes::Bytes;

use super::{Raw, RedisServer};

/// A deadline for polling a condition: call [`Deadline::tick`] after each
/// failed check. It waits 20 ms (the polling rate, not a stand-in for
/// synchronisation) and panics naming the condition once the deadline has
/// passed.
///
/// ```ignore
/// let deadline = Deadline::new(Duration::from_secs(5), "blocked_clients:1");
/// while !condition().await {
///     deadline.tick().await;
/// }
/// ```
pub struct Deadline {
    at: tokio::time::Instant,
    limit: Duration,
    what: String,
}

impl Deadline {
    pub fn new(limit: Duration, what: impl Into<String>) -> Deadline {
        Deadline {
            at: tokio::time::Instant::now() + limit,
            limit,
            what: what.into(),
        }
    }

    pub async fn tick(&self) {
        assert!(
            tokio::time::Instant::now() < self.at,
            "timed out after {:?} waiting for: {}",
            self.limit,
            self.what
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The payload of a RESP2 bulk string reply (`$n\r\n…\r\n`) as text.
pub fn bulk_text(frame: &[u8]) -> String {
    assert!(
        frame.first() == Some(&b'$'),
        "expected a bulk string, got {:?}",
        String::from_utf8_lossy(frame)
    );
    let start = frame.windows(2).position(|w| w == b"\r\n").unwrap() + 2;
    String::from_utf8_lossy(&frame[start..frame.len() - 2]).into_owned()
}

/// Encodes a RESP2 bulk string, for building expected replies.
pub fn bulk(s: &str) -> Bytes {
    Bytes::from(format!("${}\r\n{}\r\n", s.len(), s))
}

/// A raw RESP2 connection straight to `redis` (not through tierd),
/// authenticated with `password` when given.
pub async fn direct_raw(redis: &RedisServer, password: Option<&str>) -> Raw {
    let mut raw = Raw::connect(redis.addr()).await;
    if let Some(pass) = password {
        let reply = raw.cmd(&["AUTH", pass]).await;
        assert_eq!(&reply[..], b"+OK\r\n");
    }
    raw
}

/// `CLIENT LIST` on a direct connection, one entry per client line.
/// The data path's clients: tierd's own control connections (`tierd:control`
/// or `tierd:tracking`, which reads the command table and tracking reports,
/// and the invalidation bus's `tierd:bus` and `tierd:bus-pub`) are left
/// out, so that tests count what clients cause.
pub async fn client_list(direct: &mut Raw) -> Vec<String> {
    all_clients(direct)
        .await
        .into_iter()
        .filter(|l| {
            !matches!(
                client_field(l, "name"),
                Some("tierd:control" | "tierd:tracking" | "tierd:bus" | "tierd:bus-pub")
            )
        })
        .collect()
}

/// Every line of `CLIENT LIST`, tierd's control connection included.
pub async fn all_clients(direct: &mut Raw) -> Vec<String> {
    let reply = direct.cmd(&["CLIENT", "LIST"]).await;
    bulk_text(&reply)
        .lines()
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One `field=value` of a `CLIENT LIST` line.
pub fn client_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    line.split(' ').find_map(|kv| {
        kv.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

/// One `field:value` of `INFO section` on a direct connection.
pub async fn info_field(direct: &mut Raw, section: &str, field: &str) -> Option<String> {
    let reply = direct.cmd(&["INFO", section]).await;
    bulk_text(&reply).lines().find_map(|l| {
        l.strip_prefix(field)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().to_owned())
    })
}

/// Waits until Redis reports exactly `n` blocked clients.
pub async fn wait_blocked_clients(direct: &mut Raw, n: usize, limit: Duration) {
    let want = n.to_string();
    let deadline = Deadline::new(limit, format!("blocked_clients:{n}"));
    while info_field(direct, "clients", "blocked_clients")
        .await
        .as_deref()
        != Some(want.as_str())
    {
        deadline.tick().await;
    }
}

impl RedisServer {
    /// Starts a redis-server on a chosen `port` (e.g. one tierd already
    /// points at, with nothing listening yet).
    pub fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port,
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        server.spawn();
        server
    }

    /// Like [`RedisServer::kill`], but safe to call from a multi-threaded
    /// tokio test without stalling its other tasks.
    pub fn kill_in_place(&mut self) {
        tokio::task::block_in_place(|| self.kill());
    }

    /// Like [`RedisServer::restart`] (which waits for PING synchronously),
    /// for multi-threaded tokio tests.
    pub fn restart_in_place(&mut self) {
        tokio::task::block_in_place(|| self.restart());
    }
}
