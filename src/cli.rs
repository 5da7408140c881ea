//! The command line: flags, the `check-config` subcommand, and how flags
//! become config [`Overrides`].
//!
//! This module only describes and parses arguments. It must not read files,
//! validate values or start anything: override values are checked by
//! [`crate::config`] exactly like file values, and `main.rs` acts on the result.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use crate::config::Overrides;

/// `tierd [--config FILE] [--listen ADDR] [--upstream URL] [--log-level LEVEL]
/// [--metrics-listen ADDR] [--print-config]`, or `tierd check-config FILE`.
#[derive(Debug, Parser)]
#[command(
    name = "tierd",
    version,
    about = "A Redis-protocol caching proxy",
    long_about = "A Redis-protocol caching proxy. Point Redis clients at it instead of Redis.\n\n\
                  Without --config, tierd runs on built-in defaults: a proxy.toml in the working \
                  directory is never read implicitly.",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    /// Configuration file (TOML). Without it tierd uses the built-in defaults;
    /// ./proxy.toml is not read unless named here.
    #[arg(short, long, value_name = "FILE")]
    pub config: Option<PathBuf>,

    /// Address to accept clients on, as IP:PORT (replaces `listen`).
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,

    /// Upstream Redis as `redis://[[user]:password@]host[:port][/db]`
    /// (replaces `upstream.url`).
    #[arg(long, value_name = "URL")]
    pub upstream: Option<String>,

    /// Log filter such as "debug" or "tierd=debug,warn" (replaces
    /// `log.level`). RUST_LOG, when set, still wins.
    #[arg(long, value_name = "LEVEL")]
    pub log_level: Option<String>,

    /// Address of the HTTP listener for /metrics, /health and /ready, as
    /// IP:PORT, or "" to turn it off (replaces `metrics.listen`).
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Print the effective configuration (file, flags and defaults) as TOML
    /// and exit without starting.
    #[arg(long)]
    pub print_config: bool,

    /// A subcommand instead of running the proxy.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Subcommands that do something other than run the proxy.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Validate a configuration file and exit: prints "FILE: ok" and exits 0,
    /// or prints the error and exits 1.
    CheckConfig {
        /// The file to check.
        file: PathBuf,
    },
}

impl Cli {
    /// The flags that replace config-file values.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            listen: self.listen.clone(),
            upstream: self.upstream.clone(),
            log_level: self.log_level.clone(),
            metrics_listen: self.metrics_listen.clone(),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn flags_become_overrides() {
        let cli = Cli::try_parse_from([
            "tierd",
            "--config",
            "x.toml",
            "--listen",
            "0.0.0.0:1",
            "--upstream",
            "redis://h",
            "--log-level",
            "debug",
            "--print-config",
        ])
        .unwrap();
        assert_eq!(cli.config, Some(PathBuf::from("x.toml")));
        assert!(cli.print_config);
        let o = cli.overrides();
        assert_eq!(o.listen.as_deref(), Some("0.0.0.0:1"));
        assert_eq!(o.upstream.as_deref(), Some("redis://h"));
        assert_eq!(o.log_level.as_deref(), Some("debug"));
        assert!(cli.command.is_none());
    }

    #[test]
    fn no_flags_means_no_file_and_no_overrides() {
        let cli = Cli::try_parse_from(["tierd"]).unwrap();
        assert_eq!(cli.config, None);
        let o = cli.overrides();
        assert!(o.listen.is_none() && o.upstream.is_none() && o.log_level.is_none());
    }

    #[test]
    fn check_config_takes_a_file() {
        let cli = Cli::try_parse_from(["tierd", "check-config", "p.toml"]).unwrap();
        match cli.command {
            Some(Command::CheckConfig { file }) => assert_eq!(file, PathBuf::from("p.toml")),
            other => panic!("{other:?}"),
        }
        assert!(Cli::try_parse_from(["tierd", "check-config"]).is_err());
        // Flags belong to running the proxy; mixing them in is a usage error.
        assert!(Cli::try_parse_from(["tierd", "--listen", "x", "check-config", "p.toml"]).is_err());
    }
}
