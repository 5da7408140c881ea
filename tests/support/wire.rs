//! A raw connection that reads bytes without interpreting them, for tests
//! that must not trust tierd's own reply framer, and a RESP request encoder
//! written out here for the same reason.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bytes as text, for assertion messages.
pub fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A command's RESP multibulk encoding, written out here rather than taken
/// from tierd, so that requests do not depend on the code under test.
pub fn resp<A: AsRef<[u8]>>(args: &[A]) -> Vec<u8> {
    let mut out = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        let arg = arg.as_ref();
        out.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.extend_from_slice(arg);
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// `HELLO`'s map carries the connection's id, which tierd answers with its
/// own client id. Everything else must match, so blank only the number.
pub fn mask_hello_id(reply: &[u8]) -> Vec<u8> {
    let key = b"$2\r\nid\r\n:";
    let Some(at) = reply.windows(key.len()).position(|w| w == key) else {
        return reply.to_vec();
    };
    let start = at + key.len();
    let end = start
        + reply[start..]
            .iter()
            .position(|&b| b == b'\r')
            .expect("id line ends");
    let mut out = reply[..start].to_vec();
    out.extend_from_slice(b"<id>");
    out.extend_from_slice(&reply[end..]);
    out
}

/// What a connection saw before it closed or a time limit passed.
#[derive(Debug)]
pub struct Outcome {
    pub got: Vec<u8>,
    pub closed: bool,
}

/// A raw connection that reads bytes without interpreting them.
pub struct Wire {
    pub stream: TcpStream,
    pub buf: BytesMut,
}

impl Wire {
    pub async fn connect(addr: SocketAddr) -> Wire {
        Wire {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Reads until what arrived ends with `end` (10 s limit); returns what
    /// came before it.
    pub async fn until(&mut self, end: &[u8]) -> Vec<u8> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            if self.buf.ends_with(end) {
                let all = self.buf.split();
                return all[..all.len() - end.len()].to_vec();
            }
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) => panic!(
                    "connection closed while waiting for {:?}; got {:?}",
                    lossy(end),
                    lossy(&self.buf)
                ),
                Ok(Err(e)) => panic!("read failed while waiting for {:?}: {e}", lossy(end)),
                Err(_) => panic!(
                    "no {:?} within 10 s; got {} bytes, ending {:?}",
                    lossy(end),
                    self.buf.len(),
                    lossy(&self.buf[self.buf.len().saturating_sub(300)..])
                ),
                Ok(Ok(_)) => {}
            }
        }
    }

    /// Sends `bytes` and asserts that exactly `expected` comes back.
    pub async fn expect(&mut self, bytes: &[u8], expected: &[u8]) {
        self.send(bytes).await;
        let got = self.until(expected).await;
        assert!(
            got.is_empty(),
            "unexpected bytes before {:?}: {:?}",
            lossy(expected),
            lossy(&got)
        );
    }

    /// Reads until the peer closes (or resets) the connection, or `limit`
    /// passes. Returns what arrived and whether the connection closed.
    pub async fn read_to_close(&mut self, limit: Duration) -> Outcome {
        let deadline = tokio::time::Instant::now() + limit;
        let closed = loop {
            match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => break true,
                Ok(Ok(_)) => {}
                Err(_) => break false,
            }
        };
        Outcome {
            got: self.buf.split().to_vec(),
            closed,
        }
    }
}
