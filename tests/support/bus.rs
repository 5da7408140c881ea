//! Helpers for the invalidation bus tests: starting tierd instances that
//! share one Redis and knowing which bus connections are whose, reading
//! tierd's `INFO` fields, polling reads with a delivery bound, and an
//! encoder for bus messages written here from the documented format (so
//! that a hand-built message tests tierd's decoder, not its encoder).

use std::collections::BTreeSet;
use std::time::Duration;

use bytes::Bytes;
use tierd::config::{Config, RuleConfig, TrackingMode};

use super::exchange::text;
use super::l1::{
    clients_named, direct, l1_config, rule, wait_until_caching, L1Probe, Outcome, HOUR,
};
use super::probe::{info_field, Deadline};
use super::{Raw, RedisServer, Tierd};

/// The subscriber connection's name in `CLIENT LIST`.
pub const SUBSCRIBER: &str = "tierd:bus";
/// The publisher connection's name in `CLIENT LIST`.
pub const PUBLISHER: &str = "tierd:bus-pub";
/// The default bus channel.
pub const CHANNEL: &str = "tierd:invalidate";
/// The rule every instance starts with, and whose key it reads until it
/// caches: the test's own rules keep clean counters.
pub const WARMUP: &str = "warmup";

/// Tracking off, so that the bus is the only way an instance learns of
/// another's writes; the bus on (the default); a `warmup` rule first.
pub fn bus_config(upstream: &str, mut rules: Vec<RuleConfig>) -> Config {
    rules.insert(0, rule(WARMUP, "warmup:*", HOUR));
    let mut config = l1_config(upstream, TrackingMode::Off, rules);
    config.invalidation.bus = true;
    config
}

/// A tierd on the bus, with the Redis client ids of its two bus
/// connections.
pub struct Instance {
    pub tierd: Tierd,
    pub subscriber: u64,
    pub publisher: u64,
}

/// The ids of the connections named `name`.
pub async fn ids_named(d: &mut Raw, name: &str) -> BTreeSet<u64> {
    clients_named(d, name).await.into_iter().collect()
}

/// Starts tierd with `config` and waits until it caches (which, with the
/// bus on, needs its subscription to be live). Instances of one test must
/// be started one after the other: the new bus connections that appear
/// meanwhile are taken to be this instance's.
pub async fn start_instance(redis: &RedisServer, config: Config) -> Instance {
    let mut d = direct(redis).await;
    let subs_before = ids_named(&mut d, SUBSCRIBER).await;
    let pubs_before = ids_named(&mut d, PUBLISHER).await;
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, WARMUP, "warmup:0").await;
    let new = |now: BTreeSet<u64>, before: &BTreeSet<u64>, name: &str| -> u64 {
        let new: Vec<u64> = now.difference(before).copied().collect();
        assert_eq!(new.len(), 1, "one new {name} connection: {new:?}");
        new[0]
    };
    let subscriber = new(
        ids_named(&mut d, SUBSCRIBER).await,
        &subs_before,
        SUBSCRIBER,
    );
    let publisher = new(ids_named(&mut d, PUBLISHER).await, &pubs_before, PUBLISHER);
    Instance {
        tierd,
        subscriber,
        publisher,
    }
}

/// One numeric field of tierd's `INFO section` (`tierd` or `cache`), asked
/// through tierd.
pub async fn info_num(raw: &mut Raw, section: &str, field: &str) -> u64 {
    let value = info_field(raw, section, field)
        .await
        .unwrap_or_else(|| panic!("INFO {section} has no {field}"));
    value
        .parse()
        .unwrap_or_else(|_| panic!("INFO {section} {field}:{value} is not a number"))
}

/// An `INFO tierd` field.
pub async fn tierd_info(raw: &mut Raw, field: &str) -> u64 {
    info_num(raw, "tierd", field).await
}

/// Polls `INFO section` until `field` satisfies `ok`, up to `limit`;
/// returns the value seen.
pub async fn wait_info(
    raw: &mut Raw,
    section: &str,
    field: &str,
    limit: Duration,
    ok: impl Fn(u64) -> bool,
) -> u64 {
    let deadline = Deadline::new(limit, format!("INFO {section} {field} to change"));
    loop {
        let v = info_num(raw, section, field).await;
        if ok(v) {
            return v;
        }
        deadline.tick().await;
    }
}

/// Reads `key` through `probe` until a read is an L1 hit (a fill is
/// complete only once its `PTTL` has come back, which may be just after the
/// reply the client saw), failing after 5 s. Returns the hit's reply.
pub async fn cache(probe: &mut L1Probe, key: &str) -> Bytes {
    let deadline = Deadline::new(Duration::from_secs(5), "GET to be an L1 hit");
    loop {
        let (reply, outcome) = probe.read(&["GET", key]).await;
        if outcome == Outcome::Hit {
            return reply;
        }
        deadline.tick().await;
    }
}

/// `PUBLISH channel payload` straight to Redis; returns how many
/// subscribers received it.
pub async fn publish(d: &mut Raw, channel: &str, payload: &[u8]) -> i64 {
    d.send_cmd(&[b"PUBLISH", channel.as_bytes(), payload]).await;
    let reply = d.frame().await;
    let t = text(&reply);
    t.strip_prefix(':')
        .and_then(|n| n.trim_end().parse().ok())
        .unwrap_or_else(|| panic!("PUBLISH answered {t:?}"))
}

// ---------------------------------------------------------------------------
// Messages, version 1, from the format in src/invalidation/bus.rs:
//
//   "TDB" 0x01, sender u64 LE, record+
//   record = 0x01 db count (len bytes){count} | 0x02 db len bytes
//          | 0x03 db | 0x04
//   db, count, len: unsigned LEB128
// ---------------------------------------------------------------------------

/// A bus message under construction.
pub struct Message {
    buf: Vec<u8>,
}

/// Unsigned LEB128.
pub fn leb128(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

impl Message {
    /// The header: magic, version and `sender`.
    pub fn from(sender: u64) -> Message {
        let mut buf = b"TDB\x01".to_vec();
        buf.extend_from_slice(&sender.to_le_bytes());
        Message { buf }
    }

    /// A keys record.
    pub fn keys(mut self, db: u32, keys: &[&[u8]]) -> Message {
        self.buf.push(1);
        leb128(&mut self.buf, db.into());
        leb128(&mut self.buf, keys.len() as u64);
        for k in keys {
            leb128(&mut self.buf, k.len() as u64);
            self.buf.extend_from_slice(k);
        }
        self
    }

    /// A pattern record.
    pub fn pattern(mut self, db: u32, glob: &[u8]) -> Message {
        self.buf.push(2);
        leb128(&mut self.buf, db.into());
        leb128(&mut self.buf, glob.len() as u64);
        self.buf.extend_from_slice(glob);
        self
    }

    /// A "flush one db" record.
    pub fn flush_db(mut self, db: u32) -> Message {
        self.buf.push(3);
        leb128(&mut self.buf, db.into());
        self
    }

    /// Raw bytes, for malformed messages.
    pub fn raw(mut self, bytes: &[u8]) -> Message {
        self.buf.extend_from_slice(bytes);
        self
    }

    pub fn build(self) -> Vec<u8> {
        self.buf
    }
}

/// `n` bytes from a fixed-seed xorshift generator (no crate needed, and the
/// same bytes on every run).
pub fn noise(n: usize, mut seed: u64) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        out.extend_from_slice(&seed.to_le_bytes());
    }
    out.truncate(n);
    out
}
