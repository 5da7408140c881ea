//! tierd seen from redis-cli: `INFO` with tierd's own sections, and the
//! `CACHE.*` commands, each in RESP2 and RESP3, against a real redis-server.
//!
//! Replies are decoded by the tests' own RESP decoder (`support::l1`), which
//! refuses a frame whose length is off by a byte, and compared with what
//! Redis itself says where Redis is the reference (`INFO`'s own sections,
//! `KEYS` for globs, commandstats for what reached upstream).

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use support::exchange::{assert_frame, text};
use support::l1::{
    all_stats, decode, direct, l1_config, must, no_cache_rule, rule, rule_stats, upstream_calls,
    wait_until_caching, Resp, HOUR,
};
use support::{Raw, RedisServer, Tierd};
use tierd::config::{RuleConfig, TrackingMode};

const WARMUP: &str = "warmup";

/// The rules every test here runs with: `warmup` (to wait on), `users`,
/// a `cache = false` rule `secrets`, and `images` with a cap of its own.
fn rules() -> Vec<RuleConfig> {
    let mut images = rule("images", "img:{id}", Duration::from_secs(120));
    images.max_memory = Some(1 << 20);
    let mut users = rule("users", "user:*", HOUR);
    users.negative = false;
    vec![
        rule(WARMUP, "warmup:*", HOUR),
        users,
        no_cache_rule("secrets", "secret:*"),
        images,
    ]
}

/// tierd in front of `redis` (at `url`, which may carry a password) with
/// [`rules`], once it caches.
async fn start(url: &str, tracking: TrackingMode) -> Tierd {
    let tierd = Tierd::start_with(l1_config(url, tracking, rules())).await;
    wait_until_caching(&tierd, WARMUP, "warmup:0").await;
    tierd
}

async fn fixture() -> (RedisServer, Tierd) {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    for i in 1..=5 {
        must(&mut d, &["SET", &format!("user:{i}"), &format!("name{i}")]).await;
    }
    must(&mut d, &["SET", "img:1", "png"]).await;
    must(&mut d, &["SET", "secret:1", "hush"]).await;
    // So that Redis's KEYS, the reference for globs, knows every cached key.
    must(&mut d, &["SET", "warmup:0", "w"]).await;
    let tierd = start(&redis.url(), TrackingMode::Off).await;
    (redis, tierd)
}

async fn resp3(raw: &mut Raw) {
    let hello = raw.cmd(&["HELLO", "3"]).await;
    assert_eq!(hello[0], b'%', "HELLO 3: {}", text(&hello));
}

/// A map's pairs: a RESP3 map, or a RESP2 flat field/value array.
fn pairs(v: &Resp) -> Vec<(String, Resp)> {
    let pairs: Vec<(Resp, Resp)> = match v {
        Resp::Map(p) => p.clone(),
        Resp::Array(Some(flat)) => {
            assert!(flat.len() % 2 == 0, "odd field/value array: {v:?}");
            flat.chunks(2)
                .map(|c| (c[0].clone(), c[1].clone()))
                .collect()
        }
        other => panic!("expected a map or a flat array, got {other:?}"),
    };
    pairs
        .into_iter()
        .map(|(k, v)| {
            assert!(matches!(k, Resp::Bulk(Some(_))), "field name {k:?}");
            (k.as_text().unwrap(), v)
        })
        .collect()
}

/// A map in the encoding `resp3` calls for, as (field, value) pairs.
#[track_caller]
fn map_of(v: &Resp, resp3: bool) -> Vec<(String, Resp)> {
    assert_eq!(
        matches!(v, Resp::Map(_)),
        resp3,
        "a map in RESP3, a flat array in RESP2: {v:?}"
    );
    pairs(v)
}

fn names(pairs: &[(String, Resp)]) -> Vec<&str> {
    pairs.iter().map(|(k, _)| k.as_str()).collect()
}

fn get<'a>(pairs: &'a [(String, Resp)], field: &str) -> &'a Resp {
    &pairs
        .iter()
        .find(|(k, _)| k == field)
        .unwrap_or_else(|| panic!("no field {field} in {pairs:?}"))
        .1
}

/// A flag: `:1`/`:0` in RESP2, `#t`/`#f` in RESP3.
#[track_caller]
fn flag(v: &Resp, resp3: bool) -> bool {
    match (v, resp3) {
        (Resp::Bool(b), true) => *b,
        (Resp::Int(i @ (0 | 1)), false) => *i == 1,
        _ => panic!(
            "not a flag in {}: {v:?}",
            if resp3 { "RESP3" } else { "RESP2" }
        ),
    }
}

// ---------------------------------------------------------------------------
// INFO
// ---------------------------------------------------------------------------

/// `INFO`'s text split into sections, checking the layout Redis uses: every
/// line ends in CRLF, a section is `# Name` and then `field:value` lines,
/// sections are separated by exactly one blank line, and nothing follows
/// the last line.
#[track_caller]
fn sections(info: &str) -> Vec<(String, Vec<(String, String)>)> {
    let mut out: Vec<(String, Vec<(String, String)>)> = Vec::new();
    if info.is_empty() {
        return out;
    }
    assert!(info.ends_with("\r\n"), "INFO ends with CRLF: {info:?}");
    assert!(!info.ends_with("\r\n\r\n"), "no blank line at the end");
    let body = &info[..info.len() - 2];
    for (i, section) in body.split("\r\n\r\n").enumerate() {
        let mut lines = section.split("\r\n");
        let head = lines.next().unwrap();
        let name = head
            .strip_prefix("# ")
            .unwrap_or_else(|| panic!("section {i} starts with {head:?}"));
        let mut fields = Vec::new();
        for line in lines {
            assert!(!line.contains('\n') && !line.contains('\r'), "{line:?}");
            let (k, v) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("not a field:value line in # {name}: {line:?}"));
            assert!(!k.is_empty(), "{line:?}");
            fields.push((k.to_owned(), v.to_owned()));
        }
        out.push((name.to_owned(), fields));
    }
    out
}

/// The text of an `INFO` reply: a bulk string in RESP2, a `txt` verbatim
/// string in RESP3, as Redis 7 sends them.
#[track_caller]
fn info_text(frame: &[u8], resp3: bool) -> String {
    let want = if resp3 { b'=' } else { b'$' };
    assert_eq!(frame[0], want, "INFO reply type: {}", text(frame));
    if resp3 {
        let start = frame.iter().position(|&b| b == b'\n').unwrap() + 1;
        assert_eq!(&frame[start..start + 4], b"txt:", "{}", text(frame));
    }
    // The decoder checks the declared length against the bytes.
    decode(frame).as_text().unwrap()
}

fn section_names(s: &[(String, Vec<(String, String)>)]) -> Vec<&str> {
    s.iter().map(|(n, _)| n.as_str()).collect()
}

fn fields_of<'a>(
    s: &'a [(String, Vec<(String, String)>)],
    name: &str,
) -> HashMap<&'a str, &'a str> {
    s.iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no # {name} in {:?}", section_names(s)))
        .1
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect()
}

async fn info_through_tierd_adds_tierd_and_cache_sections(resp3_mode: bool) {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}", redis.port);
    must(
        &mut support::probe::direct_raw(&redis, Some("s3cret")).await,
        &["SET", "user:1", "alice"],
    )
    .await;
    let tierd = start(&url, TrackingMode::Default).await;
    let mut t = tierd.raw().await;
    let mut d = support::probe::direct_raw(&redis, Some("s3cret")).await;
    if resp3_mode {
        resp3(&mut t).await;
        resp3(&mut d).await;
    }
    // users: a miss, then a hit.
    for _ in 0..2 {
        t.cmd(&["GET", "user:1"]).await;
    }

    let frame = t.cmd(&["INFO"]).await;
    let info = info_text(&frame, resp3_mode);
    let direct_info = info_text(&d.cmd(&["INFO"]).await, resp3_mode);
    let ours = sections(&info);
    let theirs = sections(&direct_info);
    let mut want = section_names(&theirs);
    want.extend(["Tierd", "Cache"]);
    assert_eq!(
        section_names(&ours),
        want,
        "upstream's sections, then tierd's"
    );
    for (name, fields) in &theirs {
        let mine = fields_of(&ours, name);
        let keys: BTreeSet<&str> = fields.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(
            mine.keys().copied().collect::<BTreeSet<_>>(),
            keys,
            "# {name} has upstream's fields"
        );
    }
    assert!(
        !info.contains("s3cret"),
        "the upstream password must never show"
    );

    let tierd_fields = fields_of(&ours, "Tierd");
    assert_eq!(
        tierd_fields.keys().copied().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "tierd_version",
            "tierd_uptime_in_seconds",
            "tierd_client_id_base",
            "tierd_connected_clients",
            "tierd_threads",
            "tierd_upstream",
            "tierd_upstream_db",
            "tierd_circuit_state",
            "tierd_circuit_opens",
            "tierd_tracking_mode",
            "tierd_tracking_live",
            "tierd_tracking_links",
            "tierd_bus_enabled",
            "tierd_bus_live",
            "tierd_bus_links",
            "tierd_bus_sent",
            "tierd_bus_received",
            "tierd_bus_rejected",
            "tierd_write_behind_queue",
            "tierd_write_behind_flushed",
            "tierd_write_behind_errors",
            "tierd_tracking_invalidations",
            "tierd_command_table_loaded",
            "tierd_command_table_commands",
        ])
    );
    assert_eq!(tierd_fields["tierd_version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(
        tierd_fields["tierd_upstream"],
        format!("127.0.0.1:{}", redis.port)
    );
    assert_eq!(
        tierd_fields["tierd_client_id_base"],
        (1u64 << 40).to_string()
    );
    assert_eq!(tierd_fields["tierd_tracking_mode"], "default");
    assert_eq!(tierd_fields["tierd_tracking_live"], "1");
    assert_eq!(tierd_fields["tierd_command_table_loaded"], "1");
    let commands: usize = tierd_fields["tierd_command_table_commands"]
        .parse()
        .unwrap();
    assert!(commands > 200, "Redis 7 has over 200 commands: {commands}");
    let clients: usize = tierd_fields["tierd_connected_clients"].parse().unwrap();
    assert!(clients >= 1, "this client at least: {clients}");
    tierd_fields["tierd_uptime_in_seconds"]
        .parse::<u64>()
        .unwrap();

    let cache = fields_of(&ours, "Cache");
    assert_eq!(cache["l1_enabled"], "1");
    assert_eq!(
        cache["l1_max_memory"],
        tierd.config.l1.max_memory.to_string()
    );
    assert_eq!(cache["l1_max_memory_human"], "512.00M");
    let mut stats_conn = tierd.raw().await;
    let stats = all_stats(&mut stats_conn).await;
    let users = stats.iter().find(|r| r.rule == "users").unwrap();
    assert_eq!((users.hits, users.misses), (1, 1));
    assert_eq!(
        cache["rule_users"],
        format!(
            "hits=1,misses=1,hit_rate=0.5000,entries=1,bytes={},evictions=0,invalidations=0",
            users.bytes
        )
    );
    // Rule names become safe field names.
    assert!(cache.contains_key("rule_secrets") && cache.contains_key("rule_images"));
    let total = |f: fn(&support::l1::RuleStats) -> u64| stats.iter().map(f).sum::<u64>();
    assert_eq!(cache["l1_hits"], total(|r| r.hits).to_string());
    assert_eq!(cache["l1_misses"], total(|r| r.misses).to_string());
    assert_eq!(cache["l1_entries"], total(|r| r.entries).to_string());
    assert_eq!(cache["l1_used_memory"], total(|r| r.bytes).to_string());
    assert_eq!(cache["l1_suspended"], "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_through_tierd_adds_tierd_and_cache_sections_in_resp2() {
    info_through_tierd_adds_tierd_and_cache_sections(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_through_tierd_adds_tierd_and_cache_sections_in_resp3() {
    info_through_tierd_adds_tierd_and_cache_sections(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_tierd_is_answered_by_tierd_alone() {
    let (redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;

    // Each look at commandstats is itself one INFO call.
    let before = upstream_calls(&mut d, "info").await;
    for resp3_mode in [false, true] {
        if resp3_mode {
            resp3(&mut t).await;
        }
        for (args, want) in [
            (&["INFO", "tierd"][..], &["Tierd"][..]),
            (&["INFO", "TIERD"], &["Tierd"]),
            (&["info", "Cache"], &["Cache"]),
            (&["INFO", "tierd", "cache"], &["Tierd", "Cache"]),
            (&["INFO", "cache", "tierd"], &["Tierd", "Cache"]),
        ] {
            let info = info_text(&t.cmd(args).await, resp3_mode);
            assert_eq!(section_names(&sections(&info)), want, "{args:?}");
        }
    }
    let after = upstream_calls(&mut d, "info").await;
    assert_eq!(after - before, 1, "no INFO reached Redis but our own probe");

    // Any other section goes upstream, which ignores names it does not
    // know; tierd's sections come after upstream's.
    let info = info_text(&t.cmd(&["INFO", "server", "cache"]).await, true);
    assert_eq!(section_names(&sections(&info)), ["Server", "Cache"]);
    let info = info_text(&t.cmd(&["INFO", "keyspace"]).await, true);
    assert_eq!(section_names(&sections(&info)), ["Keyspace"]);
    assert_eq!(upstream_calls(&mut d, "info").await - after, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_default_all_and_everything_include_tierds_sections() {
    let (redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    for which in ["default", "ALL", "everything"] {
        let ours = sections(&info_text(&t.cmd(&["INFO", which]).await, false));
        let theirs = sections(&info_text(&d.cmd(&["INFO", which]).await, false));
        let mut want = section_names(&theirs);
        want.extend(["Tierd", "Cache"]);
        assert_eq!(section_names(&ours), want, "INFO {which}");
    }
    // A section nobody has: Redis's empty string, nothing added.
    assert_frame(&t.cmd(&["INFO", "nosuch"]).await, b"$0\r\n\r\n");
    resp3(&mut t).await;
    assert_frame(&t.cmd(&["INFO", "nosuch"]).await, b"=4\r\ntxt:\r\n");
    // Only tierd's: no separator before them.
    let info = info_text(&t.cmd(&["INFO", "nosuch", "tierd"]).await, true);
    assert!(info.starts_with("# Tierd\r\n"), "{info:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_parses_with_a_client_librarys_info_parser() {
    let (_redis, tierd) = fixture().await;
    let mut c = tierd.client().await;
    let info: redis::InfoDict = redis::cmd("INFO").query_async(&mut c).await.unwrap();
    assert!(info.get::<String>("redis_version").is_some());
    assert_eq!(
        info.get::<String>("tierd_version").as_deref(),
        Some(env!("CARGO_PKG_VERSION"))
    );
    assert_eq!(info.get::<u64>("tierd_tracking_live"), Some(0));
    assert_eq!(
        info.get::<String>("tierd_tracking_mode").as_deref(),
        Some("off")
    );
    // Upstream's own fields are not shadowed by tierd's.
    let clients: u64 = info.get("connected_clients").unwrap();
    assert!(clients >= 1);
    assert!(info.get::<String>("rule_users").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_inside_multi_is_queued_and_answered_by_upstream() {
    let (_redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    assert_frame(&t.cmd(&["MULTI"]).await, b"+OK\r\n");
    assert_frame(&t.cmd(&["INFO", "server"]).await, b"+QUEUED\r\n");
    let exec = decode(&t.cmd(&["EXEC"]).await);
    let results = exec.elements().unwrap();
    let info = results[0].as_text().unwrap();
    assert_eq!(section_names(&sections(&info)), ["Server"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_with_upstream_down_is_upstreams_error_and_info_tierd_still_answers() {
    let (mut redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    redis.kill();
    let frame = t.cmd(&["INFO"]).await;
    assert_eq!(frame[0], b'-', "an error: {}", text(&frame));
    assert!(!text(&frame).contains("Tierd"), "{}", text(&frame));
    let info = info_text(&t.cmd(&["INFO", "tierd"]).await, false);
    let s = sections(&info);
    assert_eq!(section_names(&s), ["Tierd"]);
}

// ---------------------------------------------------------------------------
// CACHE.RULES
// ---------------------------------------------------------------------------

async fn cache_rules(resp3_mode: bool) {
    let (_redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    if resp3_mode {
        resp3(&mut t).await;
    }
    let frame = t.cmd(&["CACHE.RULES"]).await;
    let Resp::Array(Some(rules)) = decode(&frame) else {
        panic!("CACHE.RULES: {}", text(&frame));
    };
    let rules: Vec<_> = rules.iter().map(|r| map_of(r, resp3_mode)).collect();
    for r in &rules {
        assert_eq!(
            names(r),
            [
                "rule",
                "match",
                "ttl_ms",
                "max_memory",
                "cache",
                "negative",
                "bcast_prefix"
            ]
        );
    }
    let rule_names: Vec<String> = rules
        .iter()
        .map(|r| get(r, "rule").as_text().unwrap())
        .collect();
    assert_eq!(rule_names, [WARMUP, "users", "secrets", "images"]);

    let users = &rules[1];
    assert_eq!(get(users, "match").as_text().unwrap(), "user:*");
    assert_eq!(get(users, "ttl_ms"), &Resp::Int(3_600_000));
    assert!(get(users, "max_memory").is_nil());
    assert!(flag(get(users, "cache"), resp3_mode));
    assert!(!flag(get(users, "negative"), resp3_mode));
    assert_eq!(get(users, "bcast_prefix").as_text().unwrap(), "user:");

    let secrets = &rules[2];
    assert!(!flag(get(secrets, "cache"), resp3_mode));
    assert!(get(secrets, "bcast_prefix").is_nil(), "not tracked");
    assert_eq!(get(secrets, "ttl_ms"), &Resp::Int(0));

    let images = &rules[3];
    assert_eq!(get(images, "match").as_text().unwrap(), "img:{id}");
    assert_eq!(get(images, "ttl_ms"), &Resp::Int(120_000));
    assert_eq!(get(images, "max_memory"), &Resp::Int(1 << 20));
    assert!(flag(get(images, "negative"), resp3_mode));
    assert_eq!(get(images, "bcast_prefix").as_text().unwrap(), "img:");

    assert_frame(
        &t.cmd(&["CACHE.RULES", "users"]).await,
        b"-ERR wrong number of arguments for 'cache.rules' command\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_rules_lists_every_rule_in_match_order_in_resp2() {
    cache_rules(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_rules_lists_every_rule_in_match_order_in_resp3() {
    cache_rules(true).await;
}

// ---------------------------------------------------------------------------
// CACHE.KEYS
// ---------------------------------------------------------------------------

/// `CACHE.KEYS args…`, sorted.
async fn cached_keys(t: &mut Raw, args: &[&str]) -> Vec<String> {
    let mut cmd = vec!["CACHE.KEYS"];
    cmd.extend_from_slice(args);
    let frame = t.cmd(&cmd).await;
    let Resp::Array(Some(keys)) = decode(&frame) else {
        panic!("{cmd:?}: an array, got {}", text(&frame));
    };
    let mut keys: Vec<String> = keys
        .iter()
        .map(|k| match k {
            Resp::Bulk(Some(b)) => String::from_utf8(b.clone()).unwrap(),
            other => panic!("a key is a bulk string: {other:?}"),
        })
        .collect();
    keys.sort();
    keys
}

async fn cache_keys(resp3_mode: bool) {
    let (redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    if resp3_mode {
        resp3(&mut t).await;
    }
    for key in ["user:1", "user:2", "user:3", "user:4", "img:1", "secret:1"] {
        t.cmd(&["GET", key]).await;
    }
    // A nil reply under `negative = false` is not cached.
    t.cmd(&["GET", "user:none"]).await;

    assert_eq!(
        cached_keys(&mut t, &["user:*"]).await,
        ["user:1", "user:2", "user:3", "user:4"]
    );
    assert_eq!(
        cached_keys(&mut t, &["*"]).await,
        ["img:1", "user:1", "user:2", "user:3", "user:4", "warmup:0"]
    );
    // COUNT caps the reply.
    let two = cached_keys(&mut t, &["user:*", "count", "2"]).await;
    assert_eq!(two.len(), 2, "{two:?}");
    assert!(two.iter().all(|k| k.starts_with("user:")), "{two:?}");
    assert_eq!(cached_keys(&mut t, &["*", "COUNT", "10000"]).await.len(), 6);

    // The same globs as Redis's KEYS, over what is cached.
    let cached: BTreeSet<String> = cached_keys(&mut t, &["*"]).await.into_iter().collect();
    let mut d = direct(&redis).await;
    for pattern in [
        "user:[12]",
        "user:[^12]",
        "user:?",
        "*:1",
        "user:[2-3]",
        "img:{1}",
        "[a-z]*:*",
        "\\u*",
        "nothing*",
    ] {
        let Resp::Array(Some(all)) = decode(&d.cmd(&["KEYS", pattern]).await) else {
            panic!("KEYS {pattern}");
        };
        let want: Vec<String> = all
            .iter()
            .map(|k| k.as_text().unwrap())
            .filter(|k| cached.contains(k))
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(cached_keys(&mut t, &[pattern]).await, want, "{pattern}");
    }

    // A write drops the key from L1, and from the list.
    assert_frame(&t.cmd(&["SET", "user:1", "x"]).await, b"+OK\r\n");
    assert_eq!(
        cached_keys(&mut t, &["user:*"]).await,
        ["user:2", "user:3", "user:4"]
    );

    for (args, err) in [
        (
            &["CACHE.KEYS"][..],
            "-ERR wrong number of arguments for 'cache.keys' command",
        ),
        (&["CACHE.KEYS", "*", "COUNT"], "-ERR syntax error"),
        (&["CACHE.KEYS", "*", "LIMIT", "5"], "-ERR syntax error"),
        (&["CACHE.KEYS", "*", "COUNT", "5", "x"], "-ERR syntax error"),
        (
            &["CACHE.KEYS", "*", "COUNT", "many"],
            "-ERR value is not an integer or out of range",
        ),
        (
            &["CACHE.KEYS", "*", "COUNT", "0"],
            "-ERR COUNT must be between 1 and 10000",
        ),
        (
            &["CACHE.KEYS", "*", "COUNT", "10001"],
            "-ERR COUNT must be between 1 and 10000",
        ),
    ] {
        assert_frame(&t.cmd(args).await, format!("{err}\r\n").as_bytes());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keys_finds_cached_keys_by_glob_in_resp2() {
    cache_keys(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keys_finds_cached_keys_by_glob_in_resp3() {
    cache_keys(true).await;
}

// ---------------------------------------------------------------------------
// CACHE.INSPECT
// ---------------------------------------------------------------------------

/// `CACHE.INSPECT key` decoded; `None` for nil.
async fn inspect(t: &mut Raw, key: &str, resp3_mode: bool) -> Option<Vec<(String, Resp)>> {
    let frame = t.cmd(&["CACHE.INSPECT", key]).await;
    let v = decode(&frame);
    if v.is_nil() {
        let nil: &[u8] = if resp3_mode { b"_\r\n" } else { b"$-1\r\n" };
        assert_frame(&frame, nil);
        return None;
    }
    let top = map_of(&v, resp3_mode);
    assert_eq!(names(&top), ["key", "rule", "bytes", "tags", "variants"]);
    Some(top)
}

fn variants(top: &[(String, Resp)], resp3_mode: bool) -> Vec<Vec<(String, Resp)>> {
    get(top, "variants")
        .elements()
        .unwrap()
        .iter()
        .map(|v| {
            let v = map_of(v, resp3_mode);
            assert_eq!(
                names(&v),
                ["command", "db", "protocol", "ttl_ms", "size", "compressed"]
            );
            v
        })
        .collect()
}

fn command_of(v: &[(String, Resp)]) -> Vec<String> {
    get(v, "command")
        .elements()
        .unwrap()
        .iter()
        .map(|a| a.as_text().unwrap())
        .collect()
}

fn int_of(v: &[(String, Resp)], field: &str) -> i64 {
    get(v, field)
        .as_int()
        .unwrap_or_else(|| panic!("{field} is an integer: {v:?}"))
}

async fn cache_inspect(resp3_mode: bool) {
    let (redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    let mut d = direct(&redis).await;
    // Two variants over RESP2, one over RESP3.
    let get2 = t.cmd(&["GET", "user:1"]).await;
    let range = t.cmd(&["GETRANGE", "user:1", "0", "1"]).await;
    let mut t3 = tierd.raw().await;
    resp3(&mut t3).await;
    let get3 = t3.cmd(&["get", "user:1"]).await;
    if resp3_mode {
        resp3(&mut t).await;
    }

    let top = inspect(&mut t, "user:1", resp3_mode).await.unwrap();
    assert_eq!(get(&top, "key").as_text().unwrap(), "user:1");
    assert_eq!(get(&top, "rule").as_text().unwrap(), "users");
    assert_eq!(
        int_of(&top, "bytes") as u64,
        rule_stats(&mut stats_conn(&tierd).await, "users")
            .await
            .bytes,
        "the entry is all the rule holds"
    );
    assert_eq!(get(&top, "tags").elements().unwrap().len(), 0);
    let vs = variants(&top, resp3_mode);
    assert_eq!(vs.len(), 3, "{vs:?}");
    let commands: Vec<Vec<String>> = vs.iter().map(|v| command_of(v)).collect();
    assert_eq!(
        commands,
        [
            vec!["get", "user:1"],
            vec!["getrange", "user:1", "0", "1"],
            vec!["get", "user:1"],
        ]
    );
    let protocols: Vec<i64> = vs.iter().map(|v| int_of(v, "protocol")).collect();
    assert_eq!(protocols, [2, 2, 3]);
    let sizes: Vec<i64> = vs.iter().map(|v| int_of(v, "size")).collect();
    assert_eq!(
        sizes,
        [get2.len() as i64, range.len() as i64, get3.len() as i64]
    );
    for v in &vs {
        assert_eq!(int_of(v, "db"), 0);
        assert!(!flag(get(v, "compressed"), resp3_mode));
        let ttl = int_of(v, "ttl_ms");
        assert!(
            (3_500_000..=3_600_000).contains(&ttl),
            "the rule's hour: {ttl}"
        );
    }

    // The TTL left goes down, and follows the key's own upstream TTL.
    must(&mut d, &["SET", "img:1", "gif", "PX", "5000"]).await;
    t.cmd(&["GET", "img:1"]).await;
    let first = inspect(&mut t, "img:1", resp3_mode).await.unwrap();
    assert_eq!(get(&first, "rule").as_text().unwrap(), "images");
    let ttl1 = int_of(&variants(&first, resp3_mode)[0], "ttl_ms");
    assert!((1..=5000).contains(&ttl1), "capped by PTTL: {ttl1}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    let again = inspect(&mut t, "img:1", resp3_mode).await.unwrap();
    let ttl2 = int_of(&variants(&again, resp3_mode)[0], "ttl_ms");
    assert!(ttl2 <= ttl1 - 50, "{ttl1} ms, then {ttl2} ms 50 ms later");

    // Nothing cached: nil. Inspecting counts no hit or miss.
    let before = rule_stats(&mut stats_conn(&tierd).await, "users").await;
    assert!(inspect(&mut t, "user:2", resp3_mode).await.is_none());
    assert!(inspect(&mut t, "secret:1", resp3_mode).await.is_none());
    assert!(inspect(&mut t, "nokey", resp3_mode).await.is_none());
    inspect(&mut t, "user:1", resp3_mode).await.unwrap();
    let after = rule_stats(&mut stats_conn(&tierd).await, "users").await;
    assert_eq!((after.hits, after.misses), (before.hits, before.misses));

    // Invalidated: gone.
    assert_frame(&t.cmd(&["DEL", "user:1"]).await, b":1\r\n");
    assert!(inspect(&mut t, "user:1", resp3_mode).await.is_none());

    for args in [&["CACHE.INSPECT"][..], &["CACHE.INSPECT", "a", "b"]] {
        assert_frame(
            &t.cmd(args).await,
            b"-ERR wrong number of arguments for 'cache.inspect' command\r\n",
        );
    }
}

/// A fresh connection for `CACHE.STATS`.
async fn stats_conn(tierd: &Tierd) -> Raw {
    tierd.raw().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_inspect_shows_rule_variants_and_ttl_in_resp2() {
    cache_inspect(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_inspect_shows_rule_variants_and_ttl_in_resp3() {
    cache_inspect(true).await;
}

// ---------------------------------------------------------------------------
// CACHE.HELP, errors, MULTI
// ---------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_help_lists_every_command_as_status_lines() {
    let (_redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    for resp3_mode in [false, true] {
        if resp3_mode {
            resp3(&mut t).await;
        }
        let frame = t.cmd(&["cache.help"]).await;
        let Resp::Array(Some(lines)) = decode(&frame) else {
            panic!("CACHE.HELP: {}", text(&frame));
        };
        let lines: Vec<String> = lines
            .iter()
            .map(|l| match l {
                Resp::Simple(s) => s.clone(),
                other => panic!("a status line: {other:?}"),
            })
            .collect();
        assert!(lines[0].starts_with("CACHE.<command>"), "{lines:?}");
        for command in [
            "CACHE.STATS [<rule>]",
            "CACHE.RULES",
            "CACHE.KEYS <pattern> [COUNT <count>]",
            "CACHE.INSPECT <key>",
            "CACHE.WARM [<rule>]",
            "CACHE.HELP",
        ] {
            assert!(lines.iter().any(|l| l == command), "{command} in {lines:?}");
        }
    }
    assert_frame(
        &t.cmd(&["CACHE.HELP", "me"]).await,
        b"-ERR wrong number of arguments for 'cache.help' command\r\n",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_cache_commands_and_cache_commands_in_multi_are_errors() {
    let (_redis, tierd) = fixture().await;
    let mut t = tierd.raw().await;
    assert_frame(
        &t.cmd(&["CACHE.NOPE", "x"]).await,
        b"-ERR unknown command 'CACHE.NOPE', tierd's CACHE commands are: \
          CACHE.STATS, CACHE.RULES, CACHE.KEYS, CACHE.INSPECT, CACHE.INVALIDATE, CACHE.TAG, \
          CACHE.SET, CACHE.TAGS, CACHE.MEMBERS, CACHE.WARM, CACHE.HELP\r\n",
    );
    assert_frame(
        &t.cmd(&["CACHE.STATS", "users", "x"]).await,
        b"-ERR wrong number of arguments for 'cache.stats' command\r\n",
    );

    assert_frame(&t.cmd(&["MULTI"]).await, b"+OK\r\n");
    for cmd in [
        &["CACHE.STATS"][..],
        &["CACHE.RULES"],
        &["CACHE.KEYS", "*"],
        &["CACHE.INSPECT", "user:1"],
        &["CACHE.HELP"],
    ] {
        assert_frame(
            &t.cmd(cmd).await,
            b"-ERR CACHE commands inside MULTI are not supported\r\n",
        );
    }
    assert_frame(
        &t.cmd(&["EXEC"]).await,
        b"-EXECABORT Transaction discarded because of previous errors.\r\n",
    );
    // Out of the transaction, they answer again.
    assert_eq!(all_stats(&mut t).await.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_commands_answer_without_l1() {
    let redis = RedisServer::start();
    // Only a cache = false rule: no L1 at all.
    let tierd = Tierd::start_with(l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![no_cache_rule("secrets", "secret:*")],
    ))
    .await;
    let mut t = tierd.raw().await;
    assert_frame(&t.cmd(&["CACHE.STATS"]).await, b"*0\r\n");
    assert_frame(&t.cmd(&["CACHE.KEYS", "*"]).await, b"*0\r\n");
    assert_frame(&t.cmd(&["CACHE.INSPECT", "k"]).await, b"$-1\r\n");
    let Resp::Array(Some(rules)) = decode(&t.cmd(&["CACHE.RULES"]).await) else {
        panic!("CACHE.RULES");
    };
    assert_eq!(rules.len(), 1);
    let info = info_text(&t.cmd(&["INFO", "tierd", "cache"]).await, false);
    let s = sections(&info);
    let tierd_fields = fields_of(&s, "Tierd");
    assert_eq!(
        tierd_fields["tierd_tracking_mode"], "off",
        "nothing to track"
    );
    let cache = fields_of(&s, "Cache");
    assert_eq!(cache["l1_enabled"], "0");
    assert_eq!(cache["l1_entries"], "0");
    assert!(!cache.keys().any(|k| k.starts_with("rule_")), "{cache:?}");
}

/// `CACHE.KEYS` and `CACHE.INSPECT` show what tierd read as its default
/// identity: a client authenticated as another user (whose ACLs may forbid
/// those keys) is refused; and a pattern longer than a rule pattern may be is
/// refused before any work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_keys_and_inspect_are_refused_to_other_users_and_long_patterns() {
    let (redis, tierd) = fixture().await;
    let mut d = Raw::connect(redis.addr()).await;
    assert_frame(
        &d.cmd(&["ACL", "SETUSER", "bob", "on", ">pw", "~other:*", "+@all"])
            .await,
        b"+OK\r\n",
    );
    let mut bob = tierd.raw().await;
    assert_frame(&bob.cmd(&["AUTH", "bob", "pw"]).await, b"+OK\r\n");
    for cmd in [&["CACHE.KEYS", "*"][..], &["CACHE.INSPECT", "user:1"]] {
        let reply = bob.cmd(cmd).await;
        assert!(
            reply.starts_with(b"-NOPERM "),
            "{cmd:?} as bob: {}",
            text(&reply)
        );
    }
    // The default identity may.
    let mut c = tierd.raw().await;
    assert_eq!(c.cmd(&["CACHE.KEYS", "*"]).await[0], b'*');

    let long = "?".repeat(1025);
    assert_frame(
        &c.cmd(&["CACHE.KEYS", &long]).await,
        b"-ERR pattern is longer than 1024 bytes\r\n",
    );
    let ok = "?".repeat(1024);
    assert_eq!(c.cmd(&["CACHE.KEYS", &ok]).await[0], b'*');
    // An unknown rule name is echoed at most 128 bytes long.
    let name = "r".repeat(10_000);
    let reply = c.cmd(&["CACHE.STATS", &name]).await;
    assert!(reply.len() < 200, "{} bytes", reply.len());
}
