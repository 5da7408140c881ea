//! The connection-state view of a command: does it change per-connection
//! state on the upstream side (and so need a pinned connection), is it
//! answered by tierd from the session, or is it a plain stateless command?
//!
//! This is deliberately a small hand-kept list of *connection-state* commands
//! (a fixed, documented set in Redis). What a command reads or writes (keys,
//! flags) comes from upstream's `COMMAND` table, not from here.

use crate::protocol::Request;

/// What a request means for the session. Anything not listed is `Plain`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Stateless: may go to any pooled connection.
    Plain,
    /// `SELECT db`.
    Select,
    /// `HELLO [protover [AUTH user pass] [SETNAME name]]`.
    Hello,
    /// `AUTH [user] pass`.
    Auth,
    /// `QUIT`.
    Quit,
    /// `RESET`.
    Reset,
    /// `MULTI`.
    Multi,
    /// `EXEC`.
    Exec,
    /// `DISCARD`.
    Discard,
    /// `WATCH key [key ...]`.
    Watch,
    /// `UNWATCH`.
    Unwatch,
    /// `SUBSCRIBE`, `PSUBSCRIBE`, `SSUBSCRIBE`: the connection becomes a
    /// stream of pushes.
    PubSub,
    /// `UNSUBSCRIBE`, `PUNSUBSCRIBE`, `SUNSUBSCRIBE`: part of the stream
    /// when subscribed; otherwise a no-op Redis still confirms.
    Unsubscribe,
    /// `MONITOR`: the connection becomes a stream of monitor lines.
    Monitor,
    /// A command that may block the connection server-side (`BLPOP`,
    /// `XREAD … BLOCK`, `WAIT` …).
    Blocking,
    /// A `CLIENT` subcommand tierd answers from the session itself.
    Client(ClientSub),
    /// `CLIENT TRACKING`, `CLIENT NO-EVICT`, `CLIENT NO-TOUCH`: state that
    /// lives on the upstream connection, so the client needs its own.
    ClientPinning,
    /// `CLIENT CACHING`, `CLIENT TRACKINGINFO`, `CLIENT GETREDIR`: about
    /// the client's own tracking, which only a client with a dedicated
    /// connection has. (tierd's pooled connections may have tracking on for
    /// L1, which must not show through.)
    ClientCaching,
    /// `CACHE.*`: tierd's own commands.
    Cache,
    /// `INFO [section ...]`: upstream's sections with tierd's own added
    /// (`tierd`, `cache`), which tierd answers alone.
    Info,
    /// Commands that would take over a shared connection (replication).
    Refused(&'static str),
}

/// `CLIENT` subcommands answered by tierd without touching upstream. redis-py
/// and others send `CLIENT SETINFO` on every connect; pinning those clients
/// would defeat the pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientSub {
    /// `CLIENT SETNAME name`.
    SetName,
    /// `CLIENT GETNAME`.
    GetName,
    /// `CLIENT SETINFO LIB-NAME|LIB-VER value`.
    SetInfo,
    /// `CLIENT ID`.
    Id,
    /// `CLIENT REPLY ON|OFF|SKIP`: emulated by the session, which drops the
    /// replies itself, so the shared connection's reply stream stays intact.
    Reply,
    /// `CLIENT KILL ID id [SKIPME yes|no]`: a tierd client id closes that
    /// tierd client.
    Kill,
    /// `CLIENT UNBLOCK id [TIMEOUT|ERROR]`: a tierd client id is translated
    /// to its dedicated connection's upstream id.
    Unblock,
}

impl Kind {
    /// A short, stable name for logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Plain => "plain",
            Kind::Select => "select",
            Kind::Hello => "hello",
            Kind::Auth => "auth",
            Kind::Quit => "quit",
            Kind::Reset => "reset",
            Kind::Multi => "multi",
            Kind::Exec => "exec",
            Kind::Discard => "discard",
            Kind::Watch => "watch",
            Kind::Unwatch => "unwatch",
            Kind::PubSub => "pubsub",
            Kind::Unsubscribe => "unsubscribe",
            Kind::Monitor => "monitor",
            Kind::Blocking => "blocking",
            Kind::Client(_) => "client-local",
            Kind::ClientPinning => "client-pinning",
            Kind::ClientCaching => "client-caching",
            Kind::Cache => "cache",
            Kind::Info => "info",
            Kind::Refused(_) => "refused",
        }
    }
}

fn is(name: &[u8], what: &str) -> bool {
    name.eq_ignore_ascii_case(what.as_bytes())
}

/// Classifies a request. Never fails: unknown commands are `Plain` and get
/// upstream's own error.
pub fn classify(req: &Request) -> Kind {
    let name = req.name();
    if name.len() > 6
        && name
            .get(..6)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"CACHE."))
    {
        return Kind::Cache;
    }
    // Dispatch on length first: the common commands (GET, SET, ...) fall
    // through after one or two comparisons.
    match name.len() {
        4 => {
            if is(name, "AUTH") {
                Kind::Auth
            } else if is(name, "QUIT") {
                Kind::Quit
            } else if is(name, "EXEC") {
                Kind::Exec
            } else if is(name, "INFO") {
                Kind::Info
            } else if is(name, "WAIT") {
                Kind::Blocking
            } else if is(name, "SYNC") {
                Kind::Refused("SYNC")
            } else {
                Kind::Plain
            }
        }
        5 => {
            if is(name, "HELLO") {
                Kind::Hello
            } else if is(name, "RESET") {
                Kind::Reset
            } else if is(name, "MULTI") {
                Kind::Multi
            } else if is(name, "WATCH") {
                Kind::Watch
            } else if is(name, "BLPOP") || is(name, "BRPOP") || is(name, "XREAD") {
                blocking_unless_xread(req)
            } else if is(name, "PSYNC") {
                Kind::Refused("PSYNC")
            } else {
                Kind::Plain
            }
        }
        6 => {
            if is(name, "SELECT") {
                Kind::Select
            } else if is(name, "CLIENT") {
                classify_client(req)
            } else if is(name, "BLMOVE") || is(name, "BLMPOP") || is(name, "BZMPOP") {
                Kind::Blocking
            } else {
                Kind::Plain
            }
        }
        7 => {
            if is(name, "DISCARD") {
                Kind::Discard
            } else if is(name, "UNWATCH") {
                Kind::Unwatch
            } else if is(name, "MONITOR") {
                Kind::Monitor
            } else if is(name, "WAITAOF") {
                Kind::Blocking
            } else {
                Kind::Plain
            }
        }
        8 => {
            if is(name, "BZPOPMIN") || is(name, "BZPOPMAX") {
                Kind::Blocking
            } else {
                Kind::Plain
            }
        }
        9 => {
            if is(name, "SUBSCRIBE") {
                Kind::PubSub
            } else {
                Kind::Plain
            }
        }
        10 => {
            if is(name, "PSUBSCRIBE") || is(name, "SSUBSCRIBE") || is(name, "BRPOPLPUSH") {
                if is(name, "BRPOPLPUSH") {
                    Kind::Blocking
                } else {
                    Kind::PubSub
                }
            } else if is(name, "XREADGROUP") {
                blocking_unless_xread(req)
            } else {
                Kind::Plain
            }
        }
        11 => {
            if is(name, "UNSUBSCRIBE") {
                Kind::Unsubscribe
            } else {
                Kind::Plain
            }
        }
        12 => {
            if is(name, "PUNSUBSCRIBE") || is(name, "SUNSUBSCRIBE") {
                Kind::Unsubscribe
            } else {
                Kind::Plain
            }
        }
        _ => Kind::Plain,
    }
}

/// `XREAD` and `XREADGROUP` block only with a `BLOCK` option, which comes
/// before `STREAMS`; `BLPOP`/`BRPOP` always block. The options are read by
/// position, as Redis does: a group or consumer named `STREAMS` or `BLOCK`
/// must not end the scan early or count as the option.
///
/// # Format
///
/// `XREAD [COUNT count] [BLOCK ms] STREAMS key [key ...] id [id ...]`
/// `XREADGROUP GROUP group consumer [COUNT count] [BLOCK ms] [NOACK] STREAMS key [key ...] id [id ...]`
fn blocking_unless_xread(req: &Request) -> Kind {
    let name = req.name();
    if !(is(name, "XREAD") || is(name, "XREADGROUP")) {
        return Kind::Blocking;
    }
    // Redis's xreadCommand reads the options in any order until STREAMS.
    let argc = req.args.len();
    let mut i = 1;
    while let Some(arg) = req.arg(i) {
        let arg: &[u8] = arg;
        let more = argc - i - 1;
        if is(arg, "BLOCK") && more >= 1 {
            return Kind::Blocking;
        } else if is(arg, "COUNT") && more >= 1 {
            i += 2;
        } else if is(arg, "GROUP") && more >= 2 {
            i += 3;
        } else if is(arg, "NOACK") {
            i += 1;
        } else {
            // STREAMS, or something Redis will reject: either way no block.
            break;
        }
    }
    Kind::Plain
}

fn classify_client(req: &Request) -> Kind {
    let Some(sub) = req.arg(1) else {
        return Kind::Plain;
    };
    let sub: &[u8] = sub;
    if is(sub, "SETNAME") {
        Kind::Client(ClientSub::SetName)
    } else if is(sub, "GETNAME") {
        Kind::Client(ClientSub::GetName)
    } else if is(sub, "SETINFO") {
        Kind::Client(ClientSub::SetInfo)
    } else if is(sub, "ID") {
        Kind::Client(ClientSub::Id)
    } else if is(sub, "REPLY") {
        Kind::Client(ClientSub::Reply)
    } else if is(sub, "KILL") {
        Kind::Client(ClientSub::Kill)
    } else if is(sub, "UNBLOCK") {
        Kind::Client(ClientSub::Unblock)
    } else if is(sub, "TRACKING") || is(sub, "NO-EVICT") || is(sub, "NO-TOUCH") {
        Kind::ClientPinning
    } else if is(sub, "CACHING") || is(sub, "TRACKINGINFO") || is(sub, "GETREDIR") {
        Kind::ClientCaching
    } else {
        Kind::Plain
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn req(args: &[&str]) -> Request {
        Request::from_strs(args)
    }

    #[test]
    fn plain_commands_are_plain() {
        for cmd in [
            &["GET", "k"][..],
            &["set", "k", "v"],
            &["PING"],
            &["NOSUCHCOMMAND"],
        ] {
            assert_eq!(classify(&req(cmd)), Kind::Plain, "{cmd:?}");
        }
    }

    #[test]
    fn state_commands_any_case() {
        assert_eq!(classify(&req(&["select", "1"])), Kind::Select);
        assert_eq!(classify(&req(&["MuLtI"])), Kind::Multi);
        assert_eq!(classify(&req(&["watch", "a"])), Kind::Watch);
        assert_eq!(classify(&req(&["psubscribe", "a*"])), Kind::PubSub);
        assert_eq!(classify(&req(&["sunsubscribe"])), Kind::Unsubscribe);
        assert_eq!(classify(&req(&["monitor"])), Kind::Monitor);
        assert_eq!(classify(&req(&["hello", "3"])), Kind::Hello);
        assert_eq!(classify(&req(&["info"])), Kind::Info);
        assert_eq!(classify(&req(&["INFO", "server", "tierd"])), Kind::Info);
        assert_eq!(classify(&req(&["cache.keys", "*"])), Kind::Cache);
        assert_eq!(classify(&req(&["CACHE."])), Kind::Plain);
        assert_eq!(
            classify(&req(&["psync", "?", "-1"])),
            Kind::Refused("PSYNC")
        );
    }

    #[test]
    fn blocking_commands() {
        for cmd in [
            &["BLPOP", "l", "0"][..],
            &["brpop", "l", "0"],
            &["BLMOVE", "a", "b", "LEFT", "LEFT", "0"],
            &["BRPOPLPUSH", "a", "b", "0"],
            &["BLMPOP", "0", "1", "l", "LEFT"],
            &["BZPOPMIN", "z", "0"],
            &["BZPOPMAX", "z", "0"],
            &["BZMPOP", "0", "1", "z", "MIN"],
            &["WAIT", "1", "0"],
            &["XREAD", "COUNT", "1", "BLOCK", "0", "STREAMS", "s", "$"],
            &[
                "XREADGROUP",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "10",
                "STREAMS",
                "s",
                ">",
            ],
        ] {
            assert_eq!(classify(&req(cmd)), Kind::Blocking, "{cmd:?}");
        }
        // Without BLOCK, XREAD is an ordinary read; a stream named BLOCK
        // after STREAMS does not count.
        assert_eq!(classify(&req(&["XREAD", "STREAMS", "s", "0"])), Kind::Plain);
        assert_eq!(
            classify(&req(&["XREAD", "STREAMS", "BLOCK", "0"])),
            Kind::Plain
        );
        // Group and consumer names are positional, whatever they spell.
        assert_eq!(
            classify(&req(&[
                "XREADGROUP",
                "GROUP",
                "STREAMS",
                "c",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">"
            ])),
            Kind::Blocking
        );
        assert_eq!(
            classify(&req(&[
                "XREADGROUP",
                "GROUP",
                "g",
                "BLOCK",
                "NOACK",
                "STREAMS",
                "s",
                ">"
            ])),
            Kind::Plain
        );
        assert_eq!(
            classify(&req(&["XREAD", "COUNT", "BLOCK", "STREAMS", "s", "0"])),
            Kind::Plain
        );
        // Options come in any order, GROUP included.
        for cmd in [
            &[
                "XREADGROUP",
                "BLOCK",
                "0",
                "GROUP",
                "g",
                "c",
                "STREAMS",
                "s",
                ">",
            ][..],
            &[
                "XREADGROUP",
                "COUNT",
                "1",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "0",
                "STREAMS",
                "s",
                ">",
            ],
            &[
                "XREADGROUP",
                "NOACK",
                "GROUP",
                "g",
                "c",
                "BLOCK",
                "5",
                "STREAMS",
                "s",
                ">",
            ],
        ] {
            assert_eq!(classify(&req(cmd)), Kind::Blocking, "{cmd:?}");
        }
    }

    #[test]
    fn client_subcommands() {
        assert_eq!(
            classify(&req(&["client", "setname", "x"])),
            Kind::Client(ClientSub::SetName)
        );
        assert_eq!(
            classify(&req(&["CLIENT", "ID"])),
            Kind::Client(ClientSub::Id)
        );
        assert_eq!(
            classify(&req(&["CLIENT", "SETINFO", "LIB-NAME", "x"])),
            Kind::Client(ClientSub::SetInfo)
        );
        assert_eq!(
            classify(&req(&["CLIENT", "TRACKING", "on"])),
            Kind::ClientPinning
        );
        assert_eq!(
            classify(&req(&["CLIENT", "no-evict", "on"])),
            Kind::ClientPinning
        );
        assert_eq!(
            classify(&req(&["CLIENT", "CACHING", "yes"])),
            Kind::ClientCaching
        );
        assert_eq!(classify(&req(&["CLIENT", "LIST"])), Kind::Plain);
        assert_eq!(classify(&req(&["CLIENT"])), Kind::Plain);
    }
}
