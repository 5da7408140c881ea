//! Test harness: real `redis-server` processes on free loopback ports, tierd
//! running in-process on `127.0.0.1:0`, and a raw RESP client that compares
//! bytes. Readiness is always awaited by PING, never by sleeping.
#![allow(dead_code)]

/// Several tierds on one invalidation bus: instances, INFO, messages.
pub mod bus;
/// The documented format of compressed values, for the compression suites.
pub mod compression;
/// One command at a time on a [`Raw`] connection, with a reply limit.
pub mod exchange;
pub mod l1;
/// Polling and Redis-side probes for the state and fault tests.
pub mod probe;
/// Circuit breaker and stale serving: fast-timeout configs, the breaker's
/// state, a logged mixed load.
pub mod resilience;
/// A throttled relay between tierd and Redis.
pub mod slow_link;
/// The monotonic-counter staleness check.
pub mod staleness;
/// Stampede protection: leases, herds, counters, tierd as a child process.
pub mod stampede;
/// A byte-level connection and request encoder independent of tierd.
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tierd::config::{Config, Overrides};
use tierd::protocol::ReplyFramer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A real redis-server on a free loopback port, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_with(&[])
    }

    /// Starts with extra arguments, e.g. `["--requirepass", "s3cret"]`.
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            child: None,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            dir: tempfile::tempdir().unwrap(),
        };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(redis_server_bin());
        cmd.arg("--port")
            .arg(self.port.to_string())
            .arg("--bind")
            .arg("127.0.0.1")
            .arg("--save")
            .arg("")
            .arg("--appendonly")
            .arg("no")
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        self.child = Some(
            cmd.spawn()
                .expect("redis-server must be installed (scripts/test.sh installs it)"),
        );
        let password = self.password();
        wait_for_ping(self.port, password.as_deref());
    }

    fn password(&self) -> Option<String> {
        self.extra
            .iter()
            .position(|a| a == "--requirepass")
            .and_then(|i| self.extra.get(i + 1).cloned())
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts again on the same port (after [`RedisServer::kill`]).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// SIGSTOP / SIGCONT: the process stays, but stops answering.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, sig: &str) {
        if let Some(child) = &self.child {
            let _ = Command::new("kill")
                .arg(sig)
                .arg(child.id().to_string())
                .status();
        }
    }

    /// A synchronous redis-rs connection straight to this server (not
    /// through tierd), for setting up and checking state.
    pub fn direct(&self) -> redis::Connection {
        let client = redis::Client::open(self.url()).unwrap();
        client.get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(child) = &self.child {
            // Resume first, in case a test paused it.
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(child.id().to_string())
                .status();
        }
        self.kill();
    }
}

fn redis_server_bin() -> PathBuf {
    std::env::var_os("REDIS_SERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| "redis-server".into())
}

/// Polls PING (over a raw socket) until the server answers, up to 10 s.
pub fn wait_for_ping(port: u16, password: Option<&str>) {
    use std::io::{Read, Write};
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
            let mut req = Vec::new();
            if let Some(pass) = password {
                req.extend_from_slice(format!("AUTH {pass}\r\n").as_bytes());
            }
            req.extend_from_slice(b"PING\r\n");
            if s.write_all(&req).is_ok() {
                let mut buf = [0u8; 64];
                let mut got = Vec::new();
                while let Ok(n) = s.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if got.ends_with(b"+PONG\r\n") {
                        return;
                    }
                    if got.starts_with(b"-LOADING") {
                        break;
                    }
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server on {port} did not answer PING"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// tierd running in-process in the test's runtime.
pub struct Tierd {
    pub addr: SocketAddr,
    pub config: Arc<Config>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<Result<(), tierd::server::ServerError>>>,
}

/// The default configuration pointed at `upstream`, listening on a free port,
/// with the metrics listener off: many tierds run in one test process, and
/// they would all want the default metrics port (tests/metrics_http.rs turns
/// it on where it is tested).
pub fn config_for(upstream: &str) -> Config {
    let overrides = Overrides {
        listen: Some("127.0.0.1:0".into()),
        upstream: Some(upstream.into()),
        log_level: None,
        metrics_listen: Some(String::new()),
    };
    Config::from_toml_str("", &overrides).unwrap()
}

impl Tierd {
    pub async fn start(upstream: &str) -> Tierd {
        Tierd::start_with(config_for(upstream)).await
    }

    pub async fn start_with(config: Config) -> Tierd {
        init_tracing();
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = Arc::new(config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(tierd::server::run(listener, config.clone(), async move {
            let _ = stopped.await;
        }));
        Tierd {
            addr,
            config,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }

    /// An async redis-rs connection through tierd.
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub async fn raw(&self) -> Raw {
        Raw::connect(self.addr).await
    }

    /// Whether `run` is still serving (it has not returned, nor panicked).
    pub fn is_running(&self) -> bool {
        self.task.as_ref().is_some_and(|t| !t.is_finished())
    }

    /// Signals shutdown and waits for `run` to return.
    pub async fn stop(mut self) -> Result<(), tierd::server::ServerError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.unwrap(),
            None => Ok(()),
        }
    }
}

impl Drop for Tierd {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A raw RESP connection: send bytes, read whole reply frames.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Sends one command as a RESP multibulk.
    pub async fn send_cmd(&mut self, args: &[&[u8]]) {
        let raw = tierd::protocol::reply::encode_command(args);
        self.send(&raw).await;
    }

    /// Reads one complete reply frame (10 s limit).
    pub async fn frame(&mut self) -> Bytes {
        self.try_frame(Duration::from_secs(10))
            .await
            .expect("no reply frame within the limit")
    }

    /// Reads one frame, or `None` when the connection closed or `limit`
    /// passed first.
    pub async fn try_frame(&mut self, limit: Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let mut framer = ReplyFramer::new(1024);
            if let Some(len) = framer.frame(&self.buf).unwrap() {
                return Some(self.buf.split_to(len).freeze());
            }
            let read = tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await;
            match read {
                Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Sends a command and returns its reply frame.
    pub async fn cmd(&mut self, args: &[&str]) -> Bytes {
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.send_cmd(&args).await;
        self.frame().await
    }

    /// Reads until the peer closes; returns everything that arrived.
    pub async fn read_to_close(&mut self, limit: Duration) -> Option<Bytes> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => return Some(self.buf.split().freeze()),
                Ok(Ok(_)) => {}
                Err(_) => return None,
            }
        }
    }
}

/// Sends the same commands to Redis directly and through tierd, one after
/// the other on one connection each, and returns both reply streams.
pub async fn both(
    redis: &RedisServer,
    tierd: &Tierd,
    cmds: &[&[&str]],
) -> (Vec<Bytes>, Vec<Bytes>) {
    let mut direct = Raw::connect(redis.addr()).await;
    let mut proxied = tierd.raw().await;
    let mut a = Vec::new();
    let mut b = Vec::new();
    for cmd in cmds {
        a.push(direct.cmd(cmd).await);
        b.push(proxied.cmd(cmd).await);
    }
    (a, b)
}

pub fn show(frames: &[Bytes]) -> Vec<String> {
    frames
        .iter()
        .map(|f| String::from_utf8_lossy(f).into_owned())
        .collect()
}

/// Starts the built tierd binary with `--config path`, its output going to
/// `dir/tierd.log` (`RUST_LOG` unset, so the file's log level applies).
pub fn spawn_tierd_binary(path: &std::path::Path, dir: &std::path::Path) -> std::process::Child {
    let log = std::fs::File::create(dir.join("tierd.log")).unwrap();
    std::process::Command::new(env!("CARGO_BIN_EXE_tierd"))
        .arg("--config")
        .arg(path)
        .env_remove("RUST_LOG")
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap()
}
