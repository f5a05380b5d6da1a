//! The `poolrelay` binary: command line, logging, signals, wiring.

mod sink;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use poolrelay_config::Config;

/// An SMTP relay with priority lanes.
#[derive(Parser)]
#[command(name = "poolrelay", version, about)]
struct Cli {
    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Serve: accept, queue and deliver mail.
    Run {
        /// Config file (default: $POOLRELAY_CONFIG, else config/poolrelay.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a config; --print shows the resolved pools, workers and routes.
    Check {
        /// Config file (default: $POOLRELAY_CONFIG, else config/poolrelay.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Print the resolved configuration.
        #[arg(long)]
        print: bool,
    },
    /// A tiny SMTP sink for trying a setup: accepts everything, prints a line per message.
    Sink(sink::Args),
}

fn config_path(given: Option<PathBuf>) -> PathBuf {
    given
        .or_else(|| std::env::var_os("POOLRELAY_CONFIG").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("config/poolrelay.toml"))
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::Check { config, print } => {
            let path = config_path(config);
            match Config::load(&path) {
                Ok(config) => {
                    if print {
                        print!("{}", config.describe());
                    } else {
                        println!("{}: ok", path.display());
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Run { config } => {
            let path = config_path(config);
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime().and_then(|rt| rt.block_on(run(config))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("poolrelay: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Sink(args) => match runtime().and_then(|rt| rt.block_on(sink::run(args))) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("poolrelay sink: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

async fn run(config: Config) -> anyhow::Result<()> {
    let running = poolrelay_relay::start(config).await?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
    }
    running.shutdown().await;
    Ok(())
}
