//! Servers and a blocking RESP client for the end-to-end benches
//! (`benches/bus.rs`, `benches/compression.rs`, `benches/stampede.rs`): a
//! redis-server on a free loopback port, tierd instances in this process
//! (each on its own thread with its own current-thread runtime, as
//! `main.rs` runs it with `threads = 1`), a fleet of them whose links are
//! live, `CACHE.STATS` per rule, and the small helpers the benches share.
//! The servers are stopped on drop, also after a panic.
//!
//! Included with `#[path]` by each bench.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tierd::config::{Config, Overrides, TrackingMode};
use tierd::protocol::reply::encode_command;
use tierd::protocol::{inspect, ReplyFramer};

/// `cargo test --benches` runs the bench binaries too, without `--bench`:
/// nothing to measure there.
pub fn benching() -> bool {
    std::env::args().any(|a| a == "--bench")
}

/// The 1-minute load average: other work on the machine shows in the tails
/// and the spread.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next().map(str::to_owned))
        .unwrap_or_else(|| "unknown".into())
}

pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The calling thread's id (`/proc/thread-self` is `PID/task/TID`).
pub fn thread_id() -> u32 {
    std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A redis-server on a free loopback port, killed on drop (also when the
/// bench panics: the guard unwinds with it).
pub struct Redis {
    port: u16,
    /// The server process (its pid, for its CPU time).
    pub child: Child,
    _dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Redis {
        let port = free_port();
        let dir = tempfile::tempdir().expect("temporary directory");
        let bin = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let child = Command::new(bin)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (or named by REDIS_SERVER)");
        let redis = Redis {
            port,
            child,
            _dir: dir,
        };
        await_pong(redis.addr(), "redis-server");
        redis
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn version(&self) -> String {
        let info = Client::connect(self.addr()).cmd(&["INFO", "server"]);
        let info = String::from_utf8_lossy(&info).into_owned();
        info.lines()
            .find_map(|l| l.strip_prefix("redis_version:"))
            .map_or_else(|| "redis-server".into(), |v| format!("redis-server {v}"))
    }

    /// A tierd configuration from `toml` with the command line's overrides:
    /// listening on a free loopback port, this Redis upstream, no metrics
    /// listener.
    pub fn tierd_config(&self, toml: &str) -> Config {
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".into()),
            upstream: Some(format!("redis://127.0.0.1:{}", self.port)),
            log_level: None,
            metrics_listen: Some(String::new()),
        };
        Config::from_toml_str(toml, &overrides).expect("bench config")
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local address").port()
}

/// Waits (up to 10 s) until the server at `addr` answers PING.
fn await_pong(addr: SocketAddr, who: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut c) = Client::try_connect(addr) {
            if c.cmd(&["PING"]) == b"+PONG\r\n" {
                break;
            }
        }
        assert!(Instant::now() < deadline, "{who} did not answer PING");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One tierd on its own named thread, as `main.rs` runs it with
/// `threads = 1`, answering PING once started; stopped and joined on drop.
pub struct Instance {
    pub addr: SocketAddr,
    /// The thread's id, for its CPU time (the bus bench does not read it).
    #[allow(dead_code)]
    pub tid: u32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Instance {
    pub fn start(config: Config, name: &str) -> Instance {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (bound_tx, bound_rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(async move {
                    let listener = tokio::net::TcpListener::bind(config.listen)
                        .await
                        .expect("bind tierd listener");
                    let addr = listener.local_addr().expect("local address");
                    let _ = bound_tx.send((addr, thread_id()));
                    let shutdown = async move {
                        let _ = stopped.await;
                    };
                    if let Err(e) = tierd::server::run(listener, Arc::new(config), shutdown).await {
                        eprintln!("tierd stopped with an error: {e}");
                    }
                });
            })
            .expect("spawn tierd thread");
        let (addr, tid) = bound_rx
            .recv_timeout(Duration::from_secs(10))
            .expect("tierd did not bind");
        await_pong(addr, &format!("tierd {name}"));
        Instance {
            addr,
            tid,
            stop: Some(stop),
            thread: Some(thread),
        }
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Instances `tierd-a`, `tierd-b`, … in front of one Redis, all from the
/// same configuration, as a fleet shares one `proxy.toml`. Started only
/// once every instance's bus (when `bus = true`) and tracking link (unless
/// `tracking = "off"`) are live: until then an instance caches nothing,
/// and a measurement would start on a fleet that is not yet coherent.
/// Used by the bus and stampede benches.
#[allow(dead_code)]
pub struct Fleet {
    pub addrs: Vec<SocketAddr>,
    _instances: Vec<Instance>,
}

#[allow(dead_code)]
impl Fleet {
    pub fn start(config: &Config, instances: usize) -> Fleet {
        let instances: Vec<Instance> = (0..instances)
            .map(|i| {
                let name = format!("tierd-{}", char::from(b'a' + (i % 26) as u8));
                Instance::start(config.clone(), &name)
            })
            .collect();
        let addrs: Vec<SocketAddr> = instances.iter().map(|i| i.addr).collect();
        let bus = config.invalidation.bus;
        let tracking = config.invalidation.tracking != TrackingMode::Off;
        let deadline = Instant::now() + Duration::from_secs(10);
        for &addr in &addrs {
            let mut client = Client::connect(addr);
            loop {
                let info = client.cmd(&["INFO", "tierd"]);
                let info = String::from_utf8_lossy(&info);
                let live = |field: &str| info.contains(&format!("{field}:1\r\n"));
                if (!bus || live("tierd_bus_live")) && (!tracking || live("tierd_tracking_live")) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "tierd at {addr}: bus (or tracking) not live after 10 s:\n{info}"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        Fleet {
            addrs,
            _instances: instances,
        }
    }

    pub fn client(&self, i: usize) -> Client {
        Client::connect(self.addrs[i])
    }
}

// ---------------------------------------------------------------------------
// A blocking RESP client: one request at a time keeps its overhead low
// ---------------------------------------------------------------------------

pub struct Client {
    stream: TcpStream,
    buf: Vec<u8>,
    framer: ReplyFramer,
}

impl Client {
    fn try_connect(addr: SocketAddr) -> std::io::Result<Client> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(60)))?;
        Ok(Client {
            stream,
            buf: Vec::with_capacity(1 << 16),
            framer: ReplyFramer::new(128),
        })
    }

    pub fn connect(addr: SocketAddr) -> Client {
        Client::try_connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"))
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("write");
    }

    /// The next whole reply frame.
    pub fn frame(&mut self) -> Vec<u8> {
        loop {
            if let Some(len) = self.framer.frame(&self.buf).expect("a RESP reply") {
                return self.buf.drain(..len).collect();
            }
            let mut chunk = [0u8; 16 * 1024];
            let n = self.stream.read(&mut chunk).expect("read");
            assert!(n > 0, "connection closed");
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn cmd(&mut self, args: &[&str]) -> Vec<u8> {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send(&encode_command(&args));
        self.frame()
    }

    pub fn ok(&mut self, args: &[&str]) {
        let reply = self.cmd(args);
        assert_eq!(reply, b"+OK\r\n", "{args:?}");
    }

    pub fn int(&mut self, args: &[&str]) -> i64 {
        let reply = self.cmd(args);
        let text = String::from_utf8_lossy(&reply);
        text.strip_prefix(':')
            .and_then(|t| t.trim_end().parse().ok())
            .unwrap_or_else(|| panic!("{args:?}: expected an integer, got {text:?}"))
    }

    /// `GET key`: the value, or `None` for nil. (The stampede bench reads
    /// with its own asynchronous clients.)
    #[allow(dead_code)]
    pub fn get(&mut self, key: &str) -> Option<Vec<u8>> {
        let reply = self.cmd(&["GET", key]);
        if reply == b"$-1\r\n" {
            return None;
        }
        let payload = inspect::string_payload(&reply).filter(|_| reply.starts_with(b"$"));
        Some(
            payload
                .unwrap_or_else(|| panic!("GET {key}: {:?}", String::from_utf8_lossy(&reply)))
                .to_vec(),
        )
    }
}

/// GETs `{prefix}:0` … `{prefix}:{n-1}` through tierd, `window` in flight.
/// Used by the bus and compression benches.
#[allow(dead_code)]
pub fn read_all(client: &mut Client, prefix: &str, n: usize, window: usize) {
    for start in (0..n).step_by(window) {
        let end = n.min(start + window);
        let mut batch = Vec::new();
        for i in start..end {
            let key = format!("{prefix}:{i}");
            batch.extend_from_slice(&encode_command(&[b"GET", key.as_bytes()]));
        }
        client.send(&batch);
        for _ in start..end {
            let reply = client.frame();
            assert!(reply.starts_with(b"$"), "GET {prefix}:*: {reply:?}");
        }
    }
}

// ---------------------------------------------------------------------------
// CACHE.STATS
// ---------------------------------------------------------------------------

/// The bus and compression benches' view of a rule; the stampede bench
/// reads its own fields with [`rule_counters`].
#[allow(dead_code)]
#[derive(Debug, Clone, Copy)]
pub struct RuleStats {
    pub hits: u64,
    /// Read by the compression bench only.
    #[allow(dead_code)]
    pub misses: u64,
    pub entries: u64,
    /// Read by the compression bench only.
    #[allow(dead_code)]
    pub bytes: u64,
}

/// `CACHE.STATS rule`: a flat array in RESP2, field name then value.
#[allow(dead_code)]
pub fn rule_stats(client: &mut Client, rule: &str) -> RuleStats {
    let [hits, misses, entries, bytes] =
        rule_counters(client, rule, ["hits", "misses", "entries", "bytes"]);
    RuleStats {
        hits,
        misses,
        entries,
        bytes,
    }
}

/// The integer fields `names` of `CACHE.STATS rule`, in that order; panics
/// naming a field the reply lacks.
pub fn rule_counters<const N: usize>(
    client: &mut Client,
    rule: &str,
    names: [&str; N],
) -> [u64; N] {
    let reply = client.cmd(&["CACHE.STATS", rule]);
    names.map(|name| {
        let tag = format!("${}\r\n{name}\r\n:", name.len());
        let at = find(&reply, tag.as_bytes()).unwrap_or_else(|| {
            panic!(
                "no {name} in CACHE.STATS {rule}: {:?}",
                String::from_utf8_lossy(&reply)
            )
        }) + tag.len();
        let digits: Vec<u8> = reply[at..]
            .iter()
            .copied()
            .take_while(u8::is_ascii_digit)
            .collect();
        String::from_utf8_lossy(&digits).parse().unwrap_or(0)
    })
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

// ---------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------

/// Latency percentiles of a set of samples.
#[allow(dead_code)]
pub struct Summary {
    pub n: usize,
    pub p50: Duration,
    pub p90: Duration,
    pub p99: Duration,
    pub max: Duration,
}

#[allow(dead_code)]
impl Summary {
    pub fn of(samples: &[Duration]) -> Summary {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        // Nearest rank: the smallest sample with at least q of them at or
        // below it.
        let at = |q: f64| {
            let rank = (q * sorted.len() as f64).ceil() as usize;
            sorted
                .get(rank.saturating_sub(1))
                .copied()
                .unwrap_or_default()
        };
        Summary {
            n: sorted.len(),
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: sorted.last().copied().unwrap_or_default(),
        }
    }
}
