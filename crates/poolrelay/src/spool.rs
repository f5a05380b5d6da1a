//! `poolrelay spool export` / `import`: moves a stopped relay's queue to a
//! file and from a file into a spool, over the `Spool` trait (the format and
//! the idempotent import are `poolrelay_spool::transfer`). This module finds
//! the spool the config names, refuses to touch one a relay is using, and
//! prints the summaries.

use std::fs::File;
use std::io::{BufReader, BufWriter, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use poolrelay_config::{Config, SpoolBackend};
use poolrelay_spool::transfer::{self, Summary};
use poolrelay_spool::{FjallSpool, JetStreamOptions, JetStreamSpool, Spool, is_storable_pool_name};

/// `poolrelay spool ...`.
#[derive(clap::Subcommand)]
pub enum SpoolCommand {
    /// Write a stopped relay's queue (envelopes with their recipients'
    /// states and attempts, and the messages) to a file; the spool is not
    /// changed.
    Export {
        /// Config file naming the spool (default: $POOLRELAY_CONFIG, else config/poolrelay.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Export this pool only.
        #[arg(long)]
        pool: Option<String>,
        /// The file to write (it must not exist yet), or `-` for standard output.
        output: PathBuf,
    },
    /// Queue the messages of an export in a stopped relay's spool, keeping
    /// their queue ids: a message already there is skipped, so importing
    /// again (after a failure, or twice) never queues it twice.
    Import {
        /// Config file naming the spool (default: $POOLRELAY_CONFIG, else config/poolrelay.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Only check the whole file and print its summary; write nothing.
        #[arg(long)]
        check: bool,
        /// The export file, or `-` for standard input.
        input: PathBuf,
    },
}

/// Runs the command; the error says what failed and what to do.
pub fn run(command: SpoolCommand) -> anyhow::Result<()> {
    match command {
        SpoolCommand::Export {
            config,
            pool,
            output,
        } => export(&crate::config_path(config), pool.as_deref(), &output),
        SpoolCommand::Import {
            config,
            check,
            input,
        } => import(&crate::config_path(config), &input, check),
    }
}

fn load(path: &Path) -> anyhow::Result<Config> {
    Config::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

/// Refuses when something answers on the config's admin address: a relay
/// running on this spool (the store's own lock is the second check).
fn refuse_if_running(config: &Config) -> anyhow::Result<()> {
    let address = crate::admin_dial_address(config.admin.address);
    if TcpStream::connect_timeout(&address, Duration::from_secs(1)).is_ok() {
        bail!(
            "a relay answers on the admin address {address}: stop it first (SIGTERM, and wait until the process has exited), then run this again"
        );
    }
    Ok(())
}

/// How long a replicated spool may take to connect and show everything
/// the cluster holds before export or import reads it.
const CATCH_UP: Duration = Duration::from_secs(60);

/// The spool the config names (`[spool] backend`), its view current.
/// `existing`: an embedded spool must be there already (an export never
/// creates an empty spool where a typo pointed).
fn open_spool(config: &Config, existing: bool) -> anyhow::Result<Arc<dyn Spool>> {
    let spool: Arc<dyn Spool> = match &config.spool {
        SpoolBackend::Fjall => {
            let dir = &config.server.spool_dir;
            if existing && !dir.is_dir() {
                bail!("there is no spool in {} (server.spool_dir)", dir.display());
            }
            let floor = config.server.spool_min_free;
            let spool = FjallSpool::open_with(dir, Box::new(move |total| floor.bytes_of(total)))
                .with_context(|| {
                    format!(
                        "cannot open the spool in {}; if a relay uses it, stop it first",
                        dir.display()
                    )
                })?;
            Arc::new(spool)
        }
        SpoolBackend::JetStream(js) => Arc::new(
            JetStreamSpool::open(JetStreamOptions {
                servers: js.servers.clone(),
                replicas: js.replicas,
                stream_prefix: js.stream_prefix.clone(),
                ack_timeout: js.ack_timeout,
                credentials_file: js.credentials_file.clone(),
                tls_ca_file: js.tls_ca_file.clone(),
                max_bodies_in_hand: config.server.max_data_memory,
            })
            .context("cannot open the replicated spool")?,
        ),
    };
    spool
        .catch_up(CATCH_UP)
        .context("cannot read the whole spool")?;
    Ok(spool)
}

/// Where the spool is, for the summaries.
fn spool_name(config: &Config) -> String {
    match &config.spool {
        SpoolBackend::Fjall => config.server.spool_dir.display().to_string(),
        SpoolBackend::JetStream(js) => format!(
            "the JetStream spool {} on {}",
            js.stream_prefix,
            js.servers.join(",")
        ),
    }
}

fn export(config_path: &Path, pool: Option<&str>, output: &Path) -> anyhow::Result<()> {
    let config = load(config_path)?;
    if let Some(pool) = pool
        && !is_storable_pool_name(pool)
    {
        bail!("--pool {pool:?}: not a pool name (letters, digits, _ or -, at most 64)");
    }
    refuse_if_running(&config)?;
    let spool = open_spool(&config, true)?;
    let mut pools = spool.pools();
    pools.sort();
    if let Some(pool) = pool
        && !pools.iter().any(|p| p == pool)
    {
        bail!(
            "{} has no pool {pool:?} (it has: {})",
            spool_name(&config),
            pools.join(", ")
        );
    }
    let to_stdout = output == Path::new("-");
    let summary = if to_stdout {
        let stdout = std::io::stdout().lock();
        let (out, summary) = transfer::export(spool.as_ref(), pool, BufWriter::new(stdout))?;
        drop(out);
        summary
    } else {
        write_file(spool.as_ref(), pool, output)?
    };
    let report = format!(
        "{summary}exported {} messages from {} to {}; the spool is unchanged. Import the file with `poolrelay spool import`, compare the two summaries, then delete the old spool.\n",
        summary.total().messages,
        spool_name(&config),
        if to_stdout {
            "standard output".to_string()
        } else {
            output.display().to_string()
        },
    );
    print_report(&report, to_stdout);
    Ok(())
}

/// Exports to a new file (mode 0600: it holds other people's mail),
/// fsynced; a failed export leaves no file behind.
fn write_file(spool: &dyn Spool, pool: Option<&str>, output: &Path) -> anyhow::Result<Summary> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(output)
        .with_context(|| format!("cannot create {}", output.display()))?;
    let written = transfer::export(spool, pool, BufWriter::new(file))
        .map_err(anyhow::Error::from)
        .and_then(|(out, summary)| {
            let file = out.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
            Ok(summary)
        });
    if written.is_err() {
        let _ = std::fs::remove_file(output);
    }
    written.with_context(|| format!("export to {} failed and was removed", output.display()))
}

fn import(config_path: &Path, input: &Path, check: bool) -> anyhow::Result<()> {
    let config = load(config_path)?;
    let from_stdin = input == Path::new("-");
    let reader: Box<dyn std::io::Read> = if from_stdin {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(File::open(input).with_context(|| format!("cannot open {}", input.display()))?)
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let name = if from_stdin {
        "standard input".to_string()
    } else {
        input.display().to_string()
    };
    if check {
        // Checked against an empty spool in memory: nothing is opened.
        let spool = poolrelay_spool::MemorySpool::new();
        let done = rt.block_on(transfer::import(&spool, BufReader::new(reader), false));
        if let Some(e) = done.error {
            bail!(
                "{name}: {e} (after {} good records)",
                done.summary.total().messages
            );
        }
        println!(
            "{}{name}: a complete export, every record checked",
            done.summary
        );
        return Ok(());
    }
    refuse_if_running(&config)?;
    let spool = open_spool(&config, false)?;
    let done = rt.block_on(transfer::import(
        spool.as_ref(),
        BufReader::new(reader),
        true,
    ));
    spool.sync().context("cannot sync the spool")?;
    let counts = format!(
        "{} messages stored, {} already in the spool (skipped)",
        done.stored, done.already_there
    );
    if let Some(e) = done.error {
        bail!(
            "{name}: {e}\nimport stopped: {counts}, every record before that one; nothing after it. \
             Get a good export (export the old spool again) and import it: what is already here is skipped."
        );
    }
    let mut report = format!(
        "{}imported {name} into {}: {counts}\n",
        done.summary,
        spool_name(&config)
    );
    for pool in done.summary.pools.keys() {
        if !config.pools.contains_key(pool) {
            report.push_str(&format!(
                "warning: pool {pool} is not configured; add [pool.{pool}] or move its mail (`poolrelay queue move`) once the relay runs\n"
            ));
        }
    }
    print_report(&report, false);
    Ok(())
}

/// The summary on standard output, or on standard error when the export
/// itself went there.
fn print_report(report: &str, to_stderr: bool) {
    if to_stderr {
        eprint!("{report}");
    } else {
        print!("{report}");
        let _ = std::io::stdout().flush();
    }
}
