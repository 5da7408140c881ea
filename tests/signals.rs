//! Stopping tierd the way an operator does: the real binary, sent SIGTERM or
//! SIGINT while a client waits on a blocked command. tierd must stop
//! accepting at once, still deliver the reply in flight, and exit 0 within
//! its shutdown timeout.

mod support;

use std::io::Read;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use support::exchange::{assert_frame, send, text};
use support::probe::{direct_raw, info_field, wait_blocked_clients, Deadline};
use support::{free_port, Raw, RedisServer};
use tierd::config::DEFAULT_SHUTDOWN_TIMEOUT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

const SECOND: Duration = Duration::from_secs(1);

/// How long the in-flight `BLPOP` blocks: long enough that "stops accepting"
/// is seen while it is still in flight, short enough to keep the test quick.
const BLPOP_TIMEOUT: &str = "2";

/// The `tierd` binary as a child process, killed on drop if it is still
/// running (a failed test must not leave it behind).
struct Proxy {
    child: Child,
    addr: SocketAddr,
}

impl Proxy {
    /// Starts `tierd --listen 127.0.0.1:<free port> --upstream <redis>` and
    /// waits until a PING through it answers.
    async fn start(redis: &RedisServer) -> Proxy {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(env!("CARGO_BIN_EXE_tierd"))
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--upstream")
            .arg(redis.url())
            .arg("--log-level")
            .arg("info")
            // Two of these run at once; the default metrics port fits one.
            .arg("--metrics-listen")
            .arg("")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut proxy = Proxy { child, addr };
        proxy.wait_ready().await;
        proxy
    }

    async fn wait_ready(&mut self) {
        let deadline = Deadline::new(10 * SECOND, "PING through tierd to answer");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("tierd exited at startup with {status}: {}", self.output());
            }
            if ping(self.addr).await {
                return;
            }
            deadline.tick().await;
        }
    }

    /// Sends `sig` (`TERM`, `INT`) with kill(1).
    fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{sig} failed: {status}");
    }

    /// Waits for the process to exit, up to `limit`.
    async fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Deadline::new(limit, "tierd to exit");
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            deadline.tick().await;
        }
    }

    /// What tierd wrote (logs go to stdout, errors to stderr), for failure
    /// messages. Call it once tierd has exited: it reads to end of file.
    fn output(&mut self) -> String {
        let mut out = String::new();
        if let Some(mut stdout) = self.child.stdout.take() {
            let _ = stdout.read_to_string(&mut out);
        }
        if let Some(mut stderr) = self.child.stderr.take() {
            let _ = stderr.read_to_string(&mut out);
        }
        out
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether a PING on a fresh connection to `addr` answers `+PONG` (within
/// a second). A refused connection is simply "not yet".
async fn ping(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut got = Vec::new();
    let read = tokio::time::timeout(SECOND, async {
        while !got.ends_with(b"\r\n") {
            match stream.read_buf(&mut got).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    read.is_ok() && got == b"+PONG\r\n"
}

/// The scenario for one signal: a client blocked in `BLPOP`, the signal,
/// then refusal of new connections while the reply is still in flight, the
/// reply itself, and a clean exit.
async fn stops_gracefully_on(sig: &str) {
    let redis = RedisServer::start();
    let mut proxy = Proxy::start(&redis).await;
    let mut direct = direct_raw(&redis, None).await;

    let mut client = Raw::connect(proxy.addr).await;
    send(&mut client, &["BLPOP", "q", BLPOP_TIMEOUT]).await;
    wait_blocked_clients(&mut direct, 1, 5 * SECOND).await;

    proxy.signal(sig);
    let signalled = Instant::now();

    let deadline = Deadline::new(
        SECOND,
        format!("tierd to refuse new connections after SIG{sig}"),
    );
    loop {
        // Until the listener is closed a connection may still complete (or
        // complete and be reset as the listener closes under it): poll on.
        match tokio::net::TcpStream::connect(proxy.addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => break,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            Err(e) => panic!("connecting after SIG{sig}: {e}"),
            Ok(accepted) => drop(accepted),
        }
        deadline.tick().await;
    }
    if let Some(status) = proxy.child.try_wait().unwrap() {
        panic!(
            "tierd exited with {status} before the in-flight reply after SIG{sig}; output:\n{}",
            proxy.output()
        );
    }
    // Refused while draining, not after: the BLPOP is still blocked.
    assert_eq!(
        info_field(&mut direct, "clients", "blocked_clients")
            .await
            .as_deref(),
        Some("1"),
        "the in-flight BLPOP ended before new connections were refused"
    );

    let got = client
        .try_frame(5 * SECOND)
        .await
        .unwrap_or_else(|| panic!("the in-flight BLPOP got no reply after SIG{sig}"));
    assert_frame(&got, b"*-1\r\n");

    let limit = DEFAULT_SHUTDOWN_TIMEOUT + 5 * SECOND;
    let status = proxy
        .wait_exit(limit.saturating_sub(signalled.elapsed()))
        .await;
    let took = signalled.elapsed();
    assert_eq!(
        status.code(),
        Some(0),
        "tierd exited with {status} after SIG{sig}; output:\n{}",
        proxy.output()
    );
    eprintln!("tierd exited 0 {took:?} after SIG{sig}");

    // And the drained client's connection is closed.
    let rest = client.read_to_close(REPLY_LIMIT_AFTER_EXIT).await;
    assert_eq!(rest.as_deref().map(text), Some(String::new()));
}

/// The process is gone: its sockets are closed already.
const REPLY_LIMIT_AFTER_EXIT: Duration = Duration::from_secs(2);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_finishes_the_blocked_reply_and_exits_0() {
    stops_gracefully_on("TERM").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_accepting_finishes_the_blocked_reply_and_exits_0() {
    stops_gracefully_on("INT").await;
}
