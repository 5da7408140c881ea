//! `INFO` through tierd as redis-py reads it: `Redis.info()` parses the reply
//! into a dict, turning `field:value` lines into numbers, strings, or (for
//! `a=1,b=2` values) nested dicts. tierd's `# Tierd` and `# Cache` sections
//! must come out of that parser as cleanly as upstream's own.
//!
//! The test runs a real redis-server, tierd with caching rules in front of
//! it, and `python3 -c` with redis-py against tierd; the script prints what
//! redis-py parsed as JSON, and the assertions are made here. redis-py is
//! Debian's `python3-redis`, which scripts/test.sh installs: without it the
//! test fails (it does not skip).

mod support;

use std::process::Stdio;
use std::time::Duration;

use serde_json::{Map, Value};
use support::l1::{direct, l1_config, must, rule, wait_until_caching, HOUR};
use support::{RedisServer, Tierd};
use tierd::config::TrackingMode;

/// Reads `INFO` through tierd at `sys.argv[1]` with redis-py, and prints
/// what it parsed as one JSON object. `resp3` is `null` when the installed
/// redis-py has no `protocol=3` (before redis-py 5).
const SCRIPT: &str = r#"
import inspect, json, sys
import redis

port = int(sys.argv[1])

def read(**kw):
    r = redis.Redis(host="127.0.0.1", port=port, socket_timeout=10, **kw)
    out = {"all": r.info(), "tierd": r.info("tierd"), "cache": r.info("cache")}
    r.close()
    return out

out = {"redis_py": redis.__version__, "resp2": read(), "resp3": None}
if "protocol" in inspect.signature(redis.Redis.__init__).parameters:
    out["resp3"] = read(protocol=3)
print(json.dumps(out))
"#;

/// Where the interpreter is looked for: `$TIERD_TEST_PYTHON` if set, then
/// `python3` on `PATH`, then Debian's own (which `python3-redis` installs
/// into, and which a pyenv or venv `python3` earlier on `PATH` does not
/// see).
fn interpreters() -> Vec<String> {
    let mut out: Vec<String> = std::env::var("TIERD_TEST_PYTHON").into_iter().collect();
    out.extend(["python3".to_owned(), "/usr/bin/python3".to_owned()]);
    out
}

/// The first interpreter that imports redis-py; fails the test, naming the
/// fix, when there is none.
async fn python_with_redis_py() -> String {
    let mut tried = Vec::new();
    for python in interpreters() {
        let run = tokio::process::Command::new(&python)
            .args(["-c", "import redis"])
            .stdin(Stdio::null())
            .output()
            .await;
        match run {
            Ok(out) if out.status.success() => return python,
            Ok(out) => tried.push(format!(
                "{python}: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("exited with an error")
            )),
            Err(e) => tried.push(format!("{python}: {e}")),
        }
    }
    panic!(
        "this test needs python3 with redis-py, and none was found:\n  {}\n\
         scripts/test.sh installs it (apt-get install python3-redis, Debian's \
         redis-py for /usr/bin/python3); or point TIERD_TEST_PYTHON at a python3 \
         that can `import redis`",
        tried.join("\n  ")
    );
}

/// Runs [`SCRIPT`] against tierd; what redis-py parsed.
async fn redis_py_info(tierd: &Tierd) -> Value {
    let python = python_with_redis_py().await;
    let run = tokio::process::Command::new(&python)
        .args(["-c", SCRIPT, &tierd.addr.port().to_string()])
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .expect("redis-py did not finish within 60 s")
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{python} with redis-py failed ({}):\n{}\n{stdout}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[track_caller]
fn object<'a>(v: &'a Value, what: &str) -> &'a Map<String, Value> {
    v.as_object()
        .unwrap_or_else(|| panic!("{what} is not a dict: {v:#}"))
}

#[track_caller]
fn field<'a>(info: &'a Map<String, Value>, name: &str) -> &'a Value {
    info.get(name).unwrap_or_else(|| {
        panic!(
            "redis-py's info() has no {name}: {:?}",
            info.keys().collect::<Vec<_>>()
        )
    })
}

#[track_caller]
fn int(info: &Map<String, Value>, name: &str) -> u64 {
    let v = field(info, name);
    v.as_u64()
        .unwrap_or_else(|| panic!("{name} parsed as {v}, not an integer"))
}

#[track_caller]
fn string<'a>(info: &'a Map<String, Value>, name: &str) -> &'a str {
    let v = field(info, name);
    v.as_str()
        .unwrap_or_else(|| panic!("{name} parsed as {v}, not a string"))
}

/// A `rule_<name>` entry, which redis-py parses into a dict.
#[track_caller]
fn rule_entry(info: &Map<String, Value>, rule: &str) -> Map<String, Value> {
    let name = format!("rule_{rule}");
    let entry = object(field(info, &name), &name).clone();
    let keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    let mut want = vec![
        "bytes",
        "entries",
        "evictions",
        "hit_rate",
        "hits",
        "invalidations",
        "misses",
    ];
    want.sort_unstable();
    let mut got = keys.clone();
    got.sort_unstable();
    assert_eq!(got, want, "{name}'s fields");
    for k in [
        "hits",
        "misses",
        "entries",
        "bytes",
        "evictions",
        "invalidations",
    ] {
        int(&entry, k);
    }
    // `0.5000`: a float to redis-py.
    assert!(
        entry["hit_rate"].is_f64(),
        "{name}.hit_rate: {}",
        entry["hit_rate"]
    );
    entry
}

/// What one protocol's `info()`, `info("tierd")` and `info("cache")`
/// parsed to.
#[track_caller]
fn check(parsed: &Value, proto: &str, redis_port: u16) {
    let all = object(&parsed["all"], &format!("{proto} info()"));
    // Every line became a field: no `__raw__` list of lines without a colon.
    assert!(
        !all.contains_key("__raw__"),
        "{proto}: {:?}",
        all["__raw__"]
    );

    // Upstream's fields, untouched.
    let version = string(all, "redis_version");
    assert!(
        version.split('.').all(|p| p.parse::<u32>().is_ok()),
        "{version}"
    );
    assert!(
        int(all, "connected_clients") >= 1,
        "{proto}: this client at least"
    );
    int(all, "uptime_in_seconds");
    assert_eq!(int(all, "tcp_port"), u64::from(redis_port));

    // # Tierd
    assert_eq!(string(all, "tierd_version"), env!("CARGO_PKG_VERSION"));
    assert_eq!(
        string(all, "tierd_upstream"),
        format!("127.0.0.1:{redis_port}")
    );
    assert_eq!(string(all, "tierd_tracking_mode"), "default");
    for name in [
        "tierd_uptime_in_seconds",
        "tierd_connected_clients",
        "tierd_tracking_live",
        "tierd_command_table_loaded",
        "tierd_command_table_commands",
    ] {
        int(all, name);
    }
    assert!(int(all, "tierd_connected_clients") >= 1);

    // # Cache: user:1 was read twice, a miss and then a hit.
    assert_eq!(int(all, "l1_enabled"), 1);
    assert!(int(all, "l1_hits") >= 1, "the warm-up's hit and user:1's");
    int(all, "l1_misses");
    int(all, "l1_entries");
    int(all, "l1_used_memory");
    int(all, "l1_max_memory");
    let users = rule_entry(all, "users");
    assert_eq!(
        (users["hits"].as_u64(), users["misses"].as_u64()),
        (Some(1), Some(1))
    );
    assert_eq!(users["hit_rate"].as_f64(), Some(0.5));
    assert_eq!(users["entries"].as_u64(), Some(1));
    rule_entry(all, "warmup");

    // info("tierd") and info("cache"): tierd's sections alone.
    let tierd = object(&parsed["tierd"], &format!("{proto} info(\"tierd\")"));
    assert!(!tierd.contains_key("__raw__"));
    assert_eq!(string(tierd, "tierd_version"), env!("CARGO_PKG_VERSION"));
    assert!(
        tierd.keys().all(|k| k.starts_with("tierd_")),
        "{proto} info(\"tierd\"): {:?}",
        tierd.keys().collect::<Vec<_>>()
    );
    let cache = object(&parsed["cache"], &format!("{proto} info(\"cache\")"));
    assert!(!cache.contains_key("__raw__"));
    assert!(!cache.contains_key("redis_version") && !cache.contains_key("tierd_version"));
    assert_eq!(int(cache, "l1_hits"), int(all, "l1_hits"));
    assert_eq!(rule_entry(cache, "users"), users);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_parses_with_redis_py() {
    let redis = RedisServer::start();
    let mut d = direct(&redis).await;
    must(&mut d, &["SET", "user:1", "alice"]).await;
    let config = l1_config(
        &redis.url(),
        TrackingMode::Default,
        vec![
            rule("warmup", "warmup:*", HOUR),
            rule("users", "user:*", HOUR),
        ],
    );
    let tierd = Tierd::start_with(config).await;
    wait_until_caching(&tierd, "warmup", "warmup:0").await;
    let mut t = tierd.raw().await;
    for _ in 0..2 {
        t.cmd(&["GET", "user:1"]).await;
    }

    let parsed = redis_py_info(&tierd).await;
    check(&parsed["resp2"], "RESP2", redis.port);
    if parsed["resp3"].is_null() {
        eprintln!(
            "redis-py {} has no protocol=3: INFO read over RESP2 only",
            parsed["redis_py"]
        );
    } else {
        check(&parsed["resp3"], "RESP3", redis.port);
    }
}
