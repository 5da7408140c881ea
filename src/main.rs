//! The `tierd` binary. It does four things: parse the command line, load the
//! configuration, set up tracing, and run [`tierd::server::run`] until SIGTERM
//! or SIGINT. Everything else lives in the library so tests drive the same
//! code; this file owns only process concerns (exit codes, stdout/stderr, the
//! runtime, and reading `RUST_LOG`).

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use tierd::cli::{Cli, Command};
use tierd::config::{Config, ConfigError, LogConfig, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::CheckConfig { file }) = &cli.command {
        return check_config(file);
    }
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tierd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// `tierd check-config FILE`: the file alone, no flags, defaults for the rest.
fn check_config(file: &Path) -> ExitCode {
    match Config::load(Some(file), &Overrides::default()) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("{}", describe(Some(file), &err));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let path = cli.config.as_deref();
    let config = Config::load(path, &cli.overrides())
        .map_err(|err| anyhow::anyhow!(describe(path, &err)))?;
    if cli.print_config {
        print!("{}", config.to_toml());
        return Ok(());
    }
    init_tracing(&config.log)?;

    // One thread: tokio's current-thread scheduler, which measured clearly
    // faster than the work-stealing one on the 2-core reference machine
    // (docs/benchmarks.md). More threads: the work-stealing scheduler.
    let mut builder = if config.threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(config.threads);
        b
    };
    let rt = builder
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.listen))?;
        tracing::info!(listen = %config.listen, upstream = %config.upstream.url, "tierd listening");
        tierd::server::run(listener, Arc::new(config), tierd::shutdown::signal()).await?;
        Ok(())
    })
}

/// Prefixes a config error with the file it came from. An I/O error already
/// names its path, and errors without a file came from flags or defaults.
fn describe(path: Option<&Path>, err: &ConfigError) -> String {
    match (path, err) {
        (Some(path), ConfigError::Parse { .. } | ConfigError::Invalid { .. }) => {
            format!("{}: {err}", path.display())
        }
        _ => err.to_string(),
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `log.level` so an
/// operator can turn up one module without editing the file; a malformed
/// `RUST_LOG` is an error rather than silently ignored, because ignoring it
/// would hide exactly the logs someone asked for.
fn init_tracing(log: &LogConfig) -> anyhow::Result<()> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(directives) if !directives.trim().is_empty() => EnvFilter::try_new(&directives)
            .with_context(|| format!("RUST_LOG={directives:?} is not a valid log filter"))?,
        _ => EnvFilter::try_new(&log.level)
            .with_context(|| format!("log.level {:?} is not a valid log filter", log.level))?,
    };
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    let installed = match log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    installed.map_err(|err| anyhow::anyhow!("cannot install the log subscriber: {err}"))
}
