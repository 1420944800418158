//! Command-line entry point: parse flags, set up logging, run, and turn the outcome into output and an
//! exit code (0 done, 1 environment failure, 2 invalid configuration, 3 `--status`: not in place).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use trellis_proxy_route_manager::{Cli, Outcome, ProcessEnv, run};

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .init();

    match run(&cli, &ProcessEnv) {
        Ok(outcome) => match print(&outcome) {
            Ok(()) => match outcome {
                Outcome::Status {
                    in_place: false, ..
                } => ExitCode::from(3),
                _ => ExitCode::SUCCESS,
            },
            Err(error) => {
                tracing::error!(error = format!("{error:#}"), "cannot write to stdout");
                ExitCode::FAILURE
            }
        },
        Err(error) => {
            tracing::error!(%error, "route manager failed");
            if error.is_config() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn print(outcome: &Outcome) -> anyhow::Result<()> {
    let text = match outcome {
        Outcome::DryRun(text) => text,
        Outcome::Status { report, .. } => report,
        _ => return Ok(()),
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(text.as_bytes())
        .context("writing the report")?;
    stdout.flush().context("flushing stdout")
}
