//! The `tierd` binary's command line, run as a user would run it: exit codes,
//! what goes to stdout and stderr, and flags overriding the file.

use std::io::Write;
use std::process::{Command, Output};

use tempfile::NamedTempFile;

fn tierd(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tierd"))
        .args(args)
        .env_remove("RUST_LOG")
        .output()
        .expect("run tierd")
}

fn config_file(text: &str) -> NamedTempFile {
    let mut file = tempfile::Builder::new()
        .suffix(".toml")
        .tempfile()
        .expect("temp file");
    file.write_all(text.as_bytes()).expect("write config");
    file
}

fn path(file: &NamedTempFile) -> &str {
    file.path().to_str().expect("utf-8 temp path")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_accepts_a_good_file() {
    let file = config_file("listen = \"127.0.0.1:7777\"\n[upstream]\npool_size = 4\n");
    let out = tierd(&["check-config", path(&file)]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    assert_eq!(stdout(&out).trim(), format!("{}: ok", path(&file)));
}

#[test]
fn check_config_accepts_the_shipped_proxy_toml() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml");
    let out = tierd(&["check-config", shipped]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
}

#[test]
fn check_config_rejects_an_unknown_field_by_name() {
    let file = config_file("[upstream]\nurl = \"redis://127.0.0.1\"\npoolsize = 4\n");
    let out = tierd(&["check-config", path(&file)]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("poolsize"), "{err}");
    assert!(err.contains(path(&file)), "{err}");
    assert!(stdout(&out).is_empty());
}

#[test]
fn check_config_rejects_a_bad_duration_by_field() {
    let file = config_file("[upstream]\ncommand_timeout = \"5 parsecs\"\n");
    let out = tierd(&["check-config", path(&file)]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("upstream.command_timeout"), "{err}");
    assert!(err.contains("parsecs"), "{err}");
}

#[test]
fn check_config_fails_on_a_missing_file() {
    let out = tierd(&["check-config", "/nonexistent/tierd.toml"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("/nonexistent/tierd.toml"));
}

#[test]
fn print_config_shows_the_listen_override() {
    let file = config_file("listen = \"127.0.0.1:7000\"\n[log]\nlevel = \"warn\"\n");
    let out = tierd(&[
        "--config",
        path(&file),
        "--listen",
        "0.0.0.0:7001",
        "--print-config",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("listen = \"0.0.0.0:7001\""), "{text}");
    assert!(!text.contains("7000"), "{text}");
    // Values from the file that no flag overrides stay.
    assert!(text.contains("level = \"warn\""), "{text}");
}

#[test]
fn print_config_output_is_a_valid_config_file() {
    let out = tierd(&[
        "--upstream",
        "redis://:secret@127.0.0.1:6390/2",
        "--print-config",
    ]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = stdout(&out);
    assert!(!text.contains("secret"), "password leaked: {text}");
    assert!(text.contains("redis://:***@127.0.0.1:6390/2"), "{text}");
    let file = config_file(&text);
    let out = tierd(&["check-config", path(&file)]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
}

#[test]
fn a_bad_flag_value_is_named_like_a_bad_file_value() {
    let out = tierd(&["--listen", "localhost", "--print-config"]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains("--listen"), "{err}");
    assert!(stdout(&out).is_empty());

    let out = tierd(&["--upstream", "rediss://cache:6379", "--print-config"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("TLS upstreams are not supported yet"));
}

#[test]
fn an_address_in_use_is_reported_by_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("local addr").to_string();
    let out = tierd(&["--listen", &addr, "--metrics-listen", ""]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(err.contains(&addr), "{err}");
}
