//! The `trellis-agent` binary: parse, set up logging, run.

use std::io::Write;

use anyhow::Context;
use clap::Parser;
use trellis_agent::bootstrap::{EnvoySettings, Level, ProcessEnv};
use trellis_agent::config::{BootstrapArgs, Cli, Command, ExportArgs, InitStoreArgs};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(cfg) => {
            init_tracing(&cfg.log_format);
            tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting");
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("trellis-agent")
                .build()
                .context("cannot start the runtime")?;
            rt.block_on(async {
                let bound = trellis_agent::app::build(*cfg).await?;
                bound.wait_termination().await.map_err(anyhow::Error::msg)
            })
        }
        Command::Bootstrap(args) => {
            init_tracing("text");
            bootstrap(args)
        }
        Command::Export(args) => export(args),
        Command::InitStore(args) => init_store(args),
        Command::Envoy(args) => {
            init_tracing("text");
            let code = trellis_agent::entrypoint::run(&args, &ProcessEnv)?;
            std::process::exit(code)
        }
        Command::Health(args) => trellis_agent::probe::health(&args).map_err(anyhow::Error::msg),
        Command::Explain(args) => {
            let text = one_shot()?.block_on(trellis_agent::explain::run(&args))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", text.trim_end())?;
            Ok(())
        }
        Command::Credentials(args) => {
            let json = one_shot()?.block_on(trellis_agent::auth::client::run(&args))?;
            let mut out = std::io::stdout().lock();
            writeln!(out, "{json}")?;
            Ok(())
        }
    }
}

/// A runtime for the one-shot commands that talk to the store.
fn one_shot() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

fn export(args: ExportArgs) -> anyhow::Result<()> {
    use trellis_agent::store::Store;
    let state = one_shot()?.block_on(async {
        Store::connect(&args.data_dir, &args.store, &args.region)
            .await
            .map(|s| s.current())
    })?;
    let doc = trellis_agent::api::export(&state, &args.meshes);
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    Ok(())
}

fn init_store(args: InitStoreArgs) -> anyhow::Result<()> {
    let done = one_shot()?.block_on(trellis_agent::store::init(
        &args.data_dir,
        &args.store,
        &args.region,
    ))?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "{done}")?;
    Ok(())
}

fn bootstrap(args: BootstrapArgs) -> anyhow::Result<()> {
    let settings = EnvoySettings::from_vars(&ProcessEnv)?;
    for note in &settings.notes {
        match note.level {
            Level::Warn => {
                tracing::warn!(variable = %note.var, detail = %note.text, "Envoy variable")
            }
            Level::Info => {
                tracing::info!(variable = %note.var, detail = %note.text, "Envoy variable")
            }
        }
    }
    let doc = serde_json::to_string_pretty(&settings.bootstrap())?;
    match &args.output {
        None => {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{doc}")?;
        }
        Some(path) => std::fs::write(path, doc + "\n")
            .with_context(|| format!("cannot write the bootstrap to {}", path.display()))?,
    }
    if let (Some(envoy), Some(path)) = (&args.exec, &args.output) {
        use std::os::unix::process::CommandExt;
        let err = std::process::Command::new(envoy)
            .args(settings.envoy_args(&path.to_string_lossy()))
            .exec();
        return Err(err).with_context(|| format!("cannot exec Envoy at {}", envoy.display()));
    }
    Ok(())
}

fn init_tracing(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("TRELLIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: a log file or a container's log driver gets plain text.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}
