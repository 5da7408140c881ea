//! The command table against a real redis-server 7.0: built from its own
//! `COMMAND` reply, and checked key for key against its own
//! `COMMAND GETKEYS`.
#![allow(clippy::unwrap_used, clippy::panic)]

mod support;

use std::collections::BTreeSet;

use bytes::Bytes;
use support::{Raw, RedisServer};
use tierd::command::table::{BeginSearch, Command, CommandTable, FindKeys, Keys, TableError};
use tierd::protocol::{inspect, reply};

/// The raw `COMMAND` reply, and the table built from it.
async fn table(raw: &mut Raw) -> CommandTable {
    raw.send_cmd(&[b"COMMAND"]).await;
    let frame = raw.frame().await;
    CommandTable::from_command_reply(&frame).unwrap()
}

async fn start() -> (RedisServer, Raw, CommandTable) {
    let redis = RedisServer::start();
    let mut raw = Raw::connect(redis.addr()).await;
    let table = table(&mut raw).await;
    (redis, raw, table)
}

fn args(request: &[&str]) -> Vec<Bytes> {
    request
        .iter()
        .map(|w| Bytes::copy_from_slice(w.as_bytes()))
        .collect()
}

/// Every command and subcommand.
fn all(table: &CommandTable) -> Vec<&Command> {
    let mut out = Vec::new();
    for command in table.iter() {
        out.push(command);
        out.extend(command.subcommands.iter());
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// Redis's own answer, `COMMAND GETKEYS <request>`, for many requests in one
/// pipeline: the key names, or the error text.
async fn getkeys(raw: &mut Raw, requests: &[Vec<Bytes>]) -> Vec<Result<Vec<String>, String>> {
    let mut out = Vec::new();
    for request in requests {
        let mut cmd: Vec<&[u8]> = vec![b"COMMAND", b"GETKEYS"];
        cmd.extend(request.iter().map(|a| &a[..]));
        out.extend_from_slice(&reply::encode_command(&cmd));
    }
    raw.send(&out).await;
    let mut answers = Vec::new();
    for _ in requests {
        let frame = raw.frame().await;
        if inspect::is_error(&frame) {
            answers.push(Err(String::from_utf8_lossy(&frame).trim_end().to_string()));
            continue;
        }
        let keys = inspect::elements(&frame, 2)
            .unwrap()
            .into_iter()
            .map(|el| String::from_utf8(inspect::string_payload(el).unwrap().to_vec()).unwrap())
            .collect();
        answers.push(Ok(keys));
    }
    answers
}

/// What tierd says: the key names, or `None` for `Unknown`.
fn ours(table: &CommandTable, request: &[Bytes]) -> Option<Vec<String>> {
    match table.keys(request) {
        Keys::Known(keys) => Some(
            keys.iter()
                .map(|k| {
                    assert_eq!(&request[k.index][..], k.key);
                    String::from_utf8(k.key.to_vec()).unwrap()
                })
                .collect(),
        ),
        Keys::Unknown => None,
    }
}

/// Redis says "no key arguments" for commands whose only specs are
/// `not_key` (shard channels) or that have none; tierd says "no keys".
fn no_keys_error(e: &str) -> bool {
    e.contains("The command has no key arguments")
}

#[tokio::test]
async fn the_table_knows_what_commands_do() {
    let (_redis, _raw, table) = start().await;
    assert!(table.len() > 200, "only {} commands", table.len());

    let get = table.get(b"GET").unwrap();
    assert!(get.is_read_only() && get.is_deterministic() && !get.is_write());
    let set = table.get(b"set").unwrap();
    assert!(set.is_write() && !set.is_read_only());
    for name in ["RANDOMKEY", "SRANDMEMBER", "TIME", "SPOP", "TTL", "PTTL"] {
        assert!(
            !table.get(name.as_bytes()).unwrap().is_deterministic(),
            "{name}"
        );
    }
    // Order-only nondeterminism still caches: any order is a valid reply.
    let smembers = table.get(b"smembers").unwrap();
    assert!(smembers.tips.nondeterministic_output_order && smembers.is_deterministic());

    let config_get = table
        .resolve(&args(&["CONFIG", "GET", "maxmemory"]))
        .unwrap();
    assert_eq!(config_get.name, "config|get");
    assert!(config_get.flags.admin && config_get.flags.noscript);
    assert_eq!(table.resolve(&args(&["config"])).unwrap().name, "config");
    assert!(table.resolve(&args(&["config", "nosuch"])).is_none());
    let cluster_info = table.get(b"cluster").unwrap().subcommand(b"INFO").unwrap();
    assert_eq!(cluster_info.tips.request_policy, None);
    assert!(table
        .get(b"keys")
        .unwrap()
        .tips
        .request_policy
        .as_deref()
        .is_some_and(|p| p == "all_shards"));

    // The commands the L1 issue names as cacheable are all read-only and
    // deterministic according to the server itself.
    for name in [
        "GET",
        "HGET",
        "HMGET",
        "HGETALL",
        "LRANGE",
        "SMEMBERS",
        "SISMEMBER",
        "ZRANGE",
        "ZSCORE",
        "STRLEN",
        "EXISTS",
        "GETRANGE",
        "LLEN",
        "HLEN",
        "SCARD",
        "ZCARD",
        "TYPE",
        "MGET",
    ] {
        let c = table.get(name.as_bytes()).unwrap();
        assert!(c.is_read_only() && c.is_deterministic(), "{name}");
    }
}

/// Requests whose keys tierd must know exactly, compared with Redis's own
/// `COMMAND GETKEYS`. Every command with a movable key spec on 7.0.15 is
/// here (a check below keeps it that way).
const REQUESTS: &[&[&str]] = &[
    &["GET", "k"],
    &["SET", "k", "v"],
    &["SET", "k", "v", "GET"],
    &["set", "k", "v", "EX", "10", "NX"],
    &["GETEX", "k", "EX", "10"],
    &["GETDEL", "k"],
    &["HSET", "h", "f", "v", "f2", "v2"],
    &["MGET", "a", "b", "c"],
    &["EXISTS", "a", "b", "a"],
    &["MSET", "a", "1", "b", "2", "c", "3"],
    &["MSETNX", "a", "1", "b", "2"],
    &["DEL", "a"],
    &["DEL", "a", "b", "c"],
    &["UNLINK", "a", "b"],
    &["TOUCH", "a", "b"],
    &["RENAME", "a", "b"],
    &["RENAMENX", "a", "b"],
    &["COPY", "a", "b"],
    &["COPY", "a", "b", "DB", "1", "REPLACE"],
    &["SMOVE", "s1", "s2", "m"],
    &["LMOVE", "l1", "l2", "LEFT", "RIGHT"],
    &["BLMOVE", "l1", "l2", "LEFT", "RIGHT", "0"],
    &["RPOPLPUSH", "a", "b"],
    &["BRPOPLPUSH", "a", "b", "0"],
    &["BLPOP", "a", "b", "0"],
    &["LMPOP", "2", "a", "b", "LEFT"],
    &["LMPOP", "1", "a", "RIGHT", "COUNT", "2"],
    &["BLMPOP", "0", "2", "a", "b", "LEFT"],
    &["ZMPOP", "1", "a", "MIN"],
    &["BZMPOP", "0", "2", "a", "b", "MAX"],
    &["SORT", "k"],
    &["SORT", "k", "STORE", "d"],
    &["SORT", "k", "BY", "w_*", "GET", "o_*", "STORE", "d"],
    &["SORT_RO", "k"],
    &["ZUNIONSTORE", "d", "2", "a", "b"],
    &["ZUNIONSTORE", "d", "2", "a", "b", "WEIGHTS", "1", "2"],
    &["ZINTERSTORE", "d", "3", "a", "b", "c", "AGGREGATE", "MAX"],
    &["ZDIFFSTORE", "d", "2", "a", "b"],
    &["ZUNION", "2", "a", "b"],
    &["ZINTER", "2", "a", "b", "WITHSCORES"],
    &["ZDIFF", "1", "a"],
    &["ZINTERCARD", "2", "a", "b", "LIMIT", "1"],
    &["SINTERCARD", "2", "a", "b"],
    &["ZRANGESTORE", "d", "s", "0", "-1"],
    &["SUNIONSTORE", "d", "a", "b", "c"],
    &["SINTERSTORE", "d", "a", "b"],
    &["SDIFFSTORE", "d", "a"],
    &["BITOP", "AND", "d", "a", "b", "c"],
    &["BITOP", "NOT", "d", "a"],
    &["BITFIELD", "k", "SET", "u8", "0", "1"],
    &["BITFIELD_RO", "k", "GET", "u8", "0"],
    &["EVAL", "s", "0"],
    &["EVAL", "s", "1", "a"],
    &["EVAL", "s", "2", "a", "b", "x"],
    &["EVAL", "s", "3", "a", "b", "c"],
    &["EVALSHA", "sha", "0"],
    &["EVALSHA", "sha", "2", "a", "b"],
    &["EVAL_RO", "s", "1", "a"],
    &["EVALSHA_RO", "sha", "1", "a", "x"],
    &["FCALL", "f", "0"],
    &["FCALL", "f", "1", "a"],
    &["FCALL", "f", "3", "a", "b", "c", "x", "y"],
    &["FCALL_RO", "f", "2", "a", "b"],
    &["XREAD", "STREAMS", "a", "0"],
    &["XREAD", "COUNT", "2", "STREAMS", "a", "b", "0", "0"],
    &[
        "XREAD", "BLOCK", "0", "STREAMS", "a", "b", "c", "0", "0", "0",
    ],
    &["XREADGROUP", "GROUP", "g", "c", "STREAMS", "a", ">"],
    &[
        "XREADGROUP",
        "GROUP",
        "g",
        "c",
        "COUNT",
        "1",
        "STREAMS",
        "a",
        "b",
        ">",
        ">",
    ],
    &["XADD", "s", "*", "f", "v"],
    &["MIGRATE", "h", "6379", "k", "0", "1000"],
    &["MIGRATE", "h", "6379", "", "0", "1000", "KEYS", "a", "b"],
    &["GEORADIUS", "k", "0", "0", "1", "km"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STORE", "d"],
    &["GEORADIUS", "k", "0", "0", "1", "km", "STOREDIST", "d"],
    &["GEORADIUSBYMEMBER", "k", "m", "1", "km", "STORE", "d"],
    &["GEOSEARCH", "k", "FROMMEMBER", "m", "BYRADIUS", "1", "km"],
    &[
        "GEOSEARCHSTORE",
        "d",
        "s",
        "FROMMEMBER",
        "m",
        "BYRADIUS",
        "1",
        "km",
    ],
    &["OBJECT", "ENCODING", "k"],
    &["MEMORY", "USAGE", "k"],
    &["MEMORY", "USAGE", "k", "SAMPLES", "5"],
    &["LCS", "a", "b"],
    &["PFMERGE", "d", "a", "b"],
    &["PFCOUNT", "a", "b"],
    &["RESTORE", "k", "0", "payload"],
    &["WATCH", "a", "b"],
    &["SPUBLISH", "ch", "m"],
    &["PING", "hello"],
    &["CONFIG", "GET", "maxmemory"],
];

/// The requests tierd answers `Unknown` for on 7.0.15, and why. Redis
/// answers them with a hand-written key finder instead of its key specs.
const UNKNOWN: &[(&str, &str)] = &[
    // BY/GET patterns name keys derived from the sorted data, and STORE may
    // appear anywhere: both specs are `unknown`.
    ("sort", "unknown spec (BY/GET/STORE)"),
    ("sort_ro", "unknown spec (BY/GET)"),
    // The KEYS spec is `incomplete` (a key may be called "KEYS").
    ("migrate", "incomplete KEYS spec"),
];

#[tokio::test]
async fn keys_match_command_getkeys() {
    let (_redis, mut raw, table) = start().await;
    let requests: Vec<Vec<Bytes>> = REQUESTS.iter().map(|r| args(r)).collect();
    let redis = getkeys(&mut raw, &requests).await;

    let mut unknown = BTreeSet::new();
    for ((request, theirs), words) in requests.iter().zip(&redis).zip(REQUESTS) {
        let command = table.resolve(request).unwrap();
        match (ours(&table, request), theirs) {
            (Some(ours), Ok(theirs)) => assert_eq!(&ours, theirs, "{words:?}"),
            (Some(ours), Err(e)) if no_keys_error(e) => {
                assert!(ours.is_empty(), "{words:?}: {ours:?} but Redis: {e}");
            }
            (Some(ours), Err(e)) => panic!("{words:?}: tierd {ours:?}, Redis {e}"),
            (None, _) => {
                // Justified only by a spec that cannot say.
                assert!(
                    command.key_specs.iter().any(|s| !s.is_complete()),
                    "{words:?} is Unknown, but every spec of {} is complete",
                    command.name
                );
                unknown.insert(command.name.clone());
            }
        }
    }
    let expected: BTreeSet<String> = UNKNOWN.iter().map(|(n, _)| n.to_string()).collect();
    assert_eq!(unknown, expected);

    // Coverage: every command whose keys move with its arguments (a keyword
    // or key-count spec, or one that cannot say) is exercised above.
    let exercised: BTreeSet<&str> = requests
        .iter()
        .map(|r| table.resolve(r).unwrap().name.as_str())
        .collect();
    for command in all(&table) {
        let movable = command.key_specs.iter().any(|s| {
            !s.is_complete()
                || !matches!(s.begin_search, BeginSearch::Index(_))
                || !matches!(s.find_keys, FindKeys::Range { .. })
        });
        if movable {
            assert!(
                exercised.contains(command.name.as_str()),
                "{} has movable keys but no request above",
                command.name
            );
        }
    }
}

/// Every command whose keys sit at fixed positions, with a made-up request
/// of the right length, against `COMMAND GETKEYS`.
#[tokio::test]
async fn fixed_position_keys_match_getkeys_for_every_command() {
    let (_redis, mut raw, table) = start().await;
    let mut requests = Vec::new();
    for command in all(&table) {
        let fixed = !command.key_specs.is_empty()
            && command.key_specs.iter().all(|s| {
                s.is_complete()
                    && !s.flags.not_key
                    && matches!(s.begin_search, BeginSearch::Index(_))
                    && matches!(s.find_keys, FindKeys::Range { .. })
            });
        if !fixed {
            continue;
        }
        let argc = if command.arity > 0 {
            command.arity
        } else {
            // Two past the minimum, so that ranges to the end and steps of 2
            // have something to walk.
            -command.arity + 2
        };
        let mut words: Vec<String> = command.name.split('|').map(str::to_string).collect();
        while (words.len() as i64) < argc {
            words.push(format!("a{}", words.len()));
        }
        requests.push(
            words
                .iter()
                .map(|w| Bytes::from(w.clone()))
                .collect::<Vec<_>>(),
        );
    }
    assert!(
        requests.len() > 150,
        "only {} fixed commands",
        requests.len()
    );
    let redis = getkeys(&mut raw, &requests).await;
    for (request, theirs) in requests.iter().zip(&redis) {
        let ours = ours(&table, request).unwrap_or_else(|| panic!("{request:?} is Unknown"));
        assert_eq!(Ok(&ours), theirs.as_ref(), "{request:?}");
    }
}

/// What the flags and the key specs say about reads and writes, and where
/// they disagree on 7.0.15 (each disagreement is named).
#[tokio::test]
async fn flags_and_key_specs_agree_except_where_named() {
    let (_redis, _raw, table) = start().await;
    let commands = all(&table);
    let names = |pred: &dyn Fn(&Command) -> bool| -> BTreeSet<String> {
        commands
            .iter()
            .filter(|c| pred(c))
            .map(|c| c.name.clone())
            .collect()
    };
    let writes_a_key = |c: &Command| {
        c.key_specs
            .iter()
            .any(|s| !s.flags.not_key && s.flags.writes())
    };
    let has_keys = |c: &Command| c.key_specs.iter().any(|s| !s.flags.not_key);
    let set =
        |items: &[&str]| -> BTreeSet<String> { items.iter().map(|s| s.to_string()).collect() };

    for c in &commands {
        if c.flags.write {
            assert!(c.is_write(), "{}", c.name);
        }
        assert!(!(c.flags.write && c.flags.readonly), "{}", c.name);
        assert!(!(c.is_write() && c.is_read_only()), "{}", c.name);
        // Each real key spec says exactly one of RO/RW/OW/RM.
        for s in c.key_specs.iter().filter(|s| !s.flags.not_key) {
            let access = [s.flags.ro, s.flags.rw, s.flags.ow, s.flags.rm];
            assert_eq!(access.iter().filter(|&&f| f).count(), 1, "{}", c.name);
        }
        // `movablekeys` exactly when a spec is not a fixed index and range.
        let movable_spec = c.key_specs.iter().any(|s| {
            !s.is_complete()
                || !matches!(s.begin_search, BeginSearch::Index(_))
                || !matches!(s.find_keys, FindKeys::Range { .. })
        });
        assert_eq!(c.flags.movablekeys, movable_spec, "{}", c.name);
    }

    // PFCOUNT is `readonly`, but rewrites the HLL's cached cardinality (RW):
    // tierd treats it as a write.
    assert_eq!(
        names(&|c: &Command| c.flags.readonly && writes_a_key(c)),
        set(&["pfcount"])
    );
    // XREADGROUP is `write` (it moves the group's pending list), but its key
    // spec says RO: invalidate by the command flag, not the key flag.
    assert_eq!(
        names(&|c: &Command| c.flags.write && has_keys(c) && !writes_a_key(c)),
        set(&["xreadgroup"])
    );
    // Scripts and functions have neither flag but declare their keys RW.
    assert_eq!(
        names(&|c: &Command| !c.flags.write && !c.flags.readonly && writes_a_key(c)),
        set(&["eval", "evalsha", "fcall"])
    );
    // Writes that name no keys: whole-db and function-library changes,
    // which the L1 work must handle by name.
    assert_eq!(
        names(&|c: &Command| c.flags.write && !has_keys(c)),
        set(&[
            "flushall",
            "flushdb",
            "function|delete",
            "function|flush",
            "function|load",
            "function|restore",
            "swapdb",
        ])
    );
    // Every write with keys reports a written key for a real request.
    let del = args(&["DEL", "a", "b"]);
    let keys = table.keys(&del);
    assert!(keys.known().unwrap().iter().all(|k| k.write && !k.read));
}

#[tokio::test]
async fn hostile_key_counts_are_bounded() {
    let (_redis, _raw, table) = start().await;
    for request in [
        &["EVAL", "s", "999999999", "a"][..],
        &["EVAL", "s", "9223372036854775807", "a"],
        &["EVAL", "s", "-9223372036854775808", "a"],
        &["EVAL", "s", "18446744073709551616", "a"],
        &["FCALL", "f", "4294967297", "a"],
        &["ZUNIONSTORE", "d", "2147483648", "a"],
        &["ZUNION", "-1", "a"],
        &["LMPOP", "x", "a", "LEFT"],
        &["XREAD", "STREAMS"],
        &["XREAD", "COUNT", "1", "STREAMS", "a"],
        &[
            "XREADGROUP",
            "GROUP",
            "g",
            "c",
            "STREAMS",
            "STREAMS",
            "STREAMS",
        ],
        &["GEORADIUS", "k", "0", "0", "1", "km", "STORE"],
    ] {
        let request = args(request);
        match table.keys(&request) {
            Keys::Unknown => {}
            Keys::Known(keys) => {
                assert!(keys.len() <= request.len(), "{request:?}");
                for k in keys {
                    assert_eq!(&request[k.index][..], k.key);
                }
            }
        }
    }
    // A 100,000-argument EVAL that declares them all is found in full, and
    // one declaring a single key more is Unknown, not a panic.
    let mut big = args(&["EVAL", "s", "100000"]);
    big.extend((0..100_000).map(|i| Bytes::from(format!("k{i}"))));
    assert_eq!(table.keys(&big).known().unwrap().len(), 100_000);
    big[2] = Bytes::from_static(b"100001");
    assert_eq!(table.keys(&big), Keys::Unknown);
    // A hostile command name is looked up without allocating or matching.
    assert!(table.get(&vec![b'a'; 1 << 20]).is_none());
}

#[tokio::test]
async fn a_resp3_command_reply_is_refused_with_a_reason() {
    let (_redis, mut raw, _table) = start().await;
    raw.send_cmd(&[b"HELLO", b"3"]).await;
    let _hello = raw.frame().await;
    raw.send_cmd(&[b"COMMAND"]).await;
    let frame = raw.frame().await;
    let err = CommandTable::from_command_reply(&frame).unwrap_err();
    assert!(matches!(err, TableError::Decode(_)), "{err}");

    raw.send_cmd(&[b"HELLO", b"2"]).await;
    let _hello = raw.frame().await;
    raw.send_cmd(&[b"COMMAND", b"NOSUCH"]).await;
    let frame = raw.frame().await;
    let err = CommandTable::from_command_reply(&frame).unwrap_err();
    assert!(matches!(err, TableError::Upstream(_)), "{err}");
}
