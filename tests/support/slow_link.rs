//! A throttled TCP relay: a slow network link between tierd and Redis, for
//! tests where queueing behind large requests must show up as time.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Relays every connection to `upstream`, passing requests (towards
/// `upstream`) at most `bytes_per_sec` per connection, and replies at full
/// speed. Stops accepting when dropped; relayed connections end when either
/// side closes.
pub struct SlowLink {
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl SlowLink {
    pub async fn start(upstream: SocketAddr, bytes_per_sec: u64) -> SlowLink {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, upstream, bytes_per_sec));
            }
        });
        SlowLink { addr, task }
    }

    pub fn url(&self) -> String {
        format!("redis://{}", self.addr)
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay(client: TcpStream, upstream: SocketAddr, bytes_per_sec: u64) {
    const CHUNK: usize = 64 * 1024;
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut client_rd, mut client_wr) = client.into_split();
    let (mut server_rd, mut server_wr) = server.into_split();
    let requests = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let n = match client_rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if server_wr.write_all(&buf[..n]).await.is_err() {
                break;
            }
            let pause = Duration::from_secs_f64(n as f64 / bytes_per_sec as f64);
            tokio::time::sleep(pause).await;
        }
        let _ = server_wr.shutdown().await;
    };
    let replies = async {
        let _ = tokio::io::copy(&mut server_rd, &mut client_wr).await;
        let _ = client_wr.shutdown().await;
    };
    tokio::join!(requests, replies);
}
