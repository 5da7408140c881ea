//! One command at a time on a [`Raw`] connection, for the state and fault
//! tests: encode, send, read the reply within a short limit, compare frames
//! as text so that a failure shows both sides readably.

use std::time::Duration;

use bytes::Bytes;

use super::Raw;

/// How long [`reply`] waits: through tierd, nothing in these tests should
/// take longer, and a failing upstream must produce an error well within it.
pub const REPLY_LIMIT: Duration = Duration::from_secs(2);

/// A frame as text, for assertions and messages.
pub fn text(frame: &[u8]) -> String {
    String::from_utf8_lossy(frame).into_owned()
}

#[track_caller]
pub fn assert_frame(got: &[u8], want: &[u8]) {
    assert_eq!(text(got), text(want));
}

/// One command as a RESP multibulk.
pub fn encode(args: &[&str]) -> Vec<u8> {
    let bytes: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
    tierd::protocol::reply::encode_command(&bytes).to_vec()
}

/// Sends one command without waiting for its reply.
pub async fn send(raw: &mut Raw, args: &[&str]) {
    raw.send(&encode(args)).await;
}

/// Sends one command and returns its reply, which must come within
/// [`REPLY_LIMIT`]: a hang or a closed connection fails the test, naming the
/// command.
pub async fn reply(raw: &mut Raw, args: &[&str]) -> Bytes {
    send(raw, args).await;
    match raw.try_frame(REPLY_LIMIT).await {
        Some(frame) => frame,
        None => {
            panic!("no reply to {args:?} within {REPLY_LIMIT:?} (a hang or a closed connection)")
        }
    }
}
