//! The `poolrelay` binary: command line, logging, signals, wiring.

mod admin;
mod dkim;
mod load;
mod passwd;
mod queue;
mod sink;
mod spool;
mod telemetry;

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
    /// Inspect and act on the queue of a running relay (via its admin API).
    Queue {
        #[command(flatten)]
        target: queue::Target,
        #[command(subcommand)]
        command: queue::QueueCommand,
    },
    /// Turn a LISTSERV site.cfg (and list headers) into a poolrelay config on stdout.
    ImportListserv {
        /// LISTSERV's site configuration file.
        site_cfg: PathBuf,
        /// List header files, named LISTNAME.list.
        list_headers: Vec<PathBuf>,
        /// A list header under another file name: --list NAME=FILE (repeatable).
        #[arg(long = "list", value_parser = poolrelay_config::parse_list_arg)]
        lists: Vec<(String, PathBuf)>,
        /// Give every upstream host this port.
        #[arg(long)]
        port: Option<u16>,
        /// Map a host name to an address in server.hosts: --host NAME=IP[:PORT] (repeatable).
        #[arg(long = "host", value_parser = parse_host_arg)]
        hosts: Vec<(String, String)>,
        /// Address of the generated listener (default 127.0.0.1:2525).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Address of the generated admin API (default 127.0.0.1:9025).
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        /// Spool directory of the generated config.
        #[arg(long)]
        spool_dir: Option<PathBuf>,
        /// Only report: warnings, then the resolved pools, workers and routes.
        #[arg(long)]
        check: bool,
    },
    /// Print a users_file line (USER:argon2id hash) for AUTH on a listener;
    /// the password is read from the terminal, or from standard input.
    Passwd {
        /// The user name clients give to AUTH.
        user: String,
    },
    /// DKIM keys: `dkim keygen --domain D --selector S` writes a new key and
    /// prints the DNS TXT record to publish.
    Dkim {
        #[command(subcommand)]
        command: DkimCommand,
    },
    /// Make a running relay re-read its config (same as SIGHUP).
    Reload {
        #[command(flatten)]
        target: queue::Target,
    },
    /// Move a stopped relay's queue to a file and back (between spools or backends).
    Spool {
        #[command(subcommand)]
        command: spool::SpoolCommand,
    },
    /// Fill a stopped relay's spool directly (benchmarks and tests only).
    #[command(hide = true)]
    SpoolLoad(load::Args),
    /// Ask a running relay's /readyz (or /healthz with --live): exit 0 when
    /// it answers 200, 1 otherwise. For container health checks (no shell, no curl).
    Health {
        /// Config file to read admin.address from (default: $POOLRELAY_CONFIG, else config/poolrelay.toml).
        #[arg(short, long)]
        config: Option<PathBuf>,
        /// Admin address HOST:PORT to ask instead of the config's admin.address.
        #[arg(long)]
        admin: Option<String>,
        /// Ask /healthz (the process answers) instead of /readyz (it takes mail).
        #[arg(long)]
        live: bool,
        /// Seconds to wait for the answer.
        #[arg(long, default_value_t = 5)]
        timeout: u64,
    },
}

#[derive(Subcommand)]
enum DkimCommand {
    /// Write a new signing key (mode 600) and print its TXT record and [[dkim]] table.
    Keygen(dkim::KeygenArgs),
}

fn parse_host_arg(arg: &str) -> Result<(String, String), String> {
    let (name, addr) = arg
        .split_once('=')
        .ok_or_else(|| format!("--host {arg:?}: write NAME=IP or NAME=IP:PORT"))?;
    Ok((name.trim().to_string(), addr.trim().to_string()))
}

/// The config file: the one given, else $POOLRELAY_CONFIG, else config/poolrelay.toml.
pub fn config_path(given: Option<PathBuf>) -> PathBuf {
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
            // Spool files, logs written by the relay and anything else it
            // creates: owner only (files 0600, directories 0700).
            // SAFETY: umask only sets the process's file mode mask.
            unsafe { libc::umask(0o077) };
            let path = config_path(config);
            let config = match Config::load(&path) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("{e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime().and_then(|rt| rt.block_on(run(config, path))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("poolrelay: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Queue { target, command } => ExitCode::from(queue::run(&target, command) as u8),
        Command::ImportListserv {
            site_cfg,
            list_headers,
            lists,
            port,
            hosts,
            listen,
            admin,
            spool_dir,
            check,
        } => {
            let options = poolrelay_config::ImportOptions {
                port,
                lists,
                hosts,
                listen,
                admin,
                spool_dir,
            };
            match poolrelay_config::import_listserv(&site_cfg, &list_headers, &options) {
                Ok(import) => {
                    for w in &import.warnings {
                        eprintln!("warning: {w}");
                    }
                    if check {
                        print!("{}", import.config.describe());
                    } else {
                        print!("{}", import.toml);
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Dkim {
            command: DkimCommand::Keygen(args),
        } => match dkim::keygen(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("poolrelay dkim keygen: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Reload { target } => ExitCode::from(queue::reload(&target) as u8),
        Command::Passwd { user } => match passwd::run(&user) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("poolrelay passwd: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Spool { command } => match spool::run(command) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("poolrelay spool: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::SpoolLoad(args) => match load::run(&args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("poolrelay spool-load: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Health {
            config,
            admin,
            live,
            timeout,
        } => {
            let path = if live { "/healthz" } else { "/readyz" };
            let target = admin.unwrap_or_else(|| health_target(&config_path(config)));
            match health(
                &target,
                path,
                std::time::Duration::from_secs(timeout.max(1)),
            ) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(line) => {
                    eprintln!("poolrelay health: {line}");
                    ExitCode::FAILURE
                }
            }
        }
        // SIGTERM and SIGINT end the sink with exit code 0, also as PID 1 of
        // a container (where a signal without a handler is ignored).
        Command::Sink(args) => {
            match runtime().and_then(|rt| rt.block_on(sink_until_signal(args))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("poolrelay sink: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

/// Where `poolrelay health` asks: the config's admin address, with a
/// wildcard (`0.0.0.0`, `::`) replaced by loopback. A config that does not
/// load (being edited, say) does not make a running relay unhealthy: the
/// default 127.0.0.1:9025 is asked then, with a warning.
fn health_target(path: &std::path::Path) -> String {
    match Config::load(path) {
        Ok(config) => admin_dial_address(config.admin.address).to_string(),
        Err(e) => {
            eprintln!("warning: config not used, asking 127.0.0.1:9025: {e}");
            "127.0.0.1:9025".to_string()
        }
    }
}

/// The address a local client dials for a listening address.
fn admin_dial_address(listen: std::net::SocketAddr) -> std::net::SocketAddr {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
    let ip = match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(ip) if ip.is_unspecified() => IpAddr::V6(Ipv6Addr::LOCALHOST),
        ip => ip,
    };
    std::net::SocketAddr::new(ip, listen.port())
}

/// One `GET path` to the admin API at `target` (HOST:PORT); Ok with the
/// status line when it answers 200, Err saying what happened otherwise.
fn health(target: &str, path: &str, timeout: std::time::Duration) -> Result<String, String> {
    use std::io::{Read, Write};
    use std::net::{TcpStream, ToSocketAddrs};
    let addr = target
        .to_socket_addrs()
        .map_err(|e| format!("{target}: {e}"))?
        .next()
        .ok_or_else(|| format!("{target}: no address"))?;
    let mut stream = TcpStream::connect_timeout(&addr, timeout)
        .map_err(|e| format!("cannot reach the admin API at {addr}: {e}"))?;
    let _ = stream.set_read_timeout(Some(timeout));
    let _ = stream.set_write_timeout(Some(timeout));
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let mut raw = Vec::new();
    // A relay that never ends its answer is not healthy; 64 KiB is plenty.
    stream
        .take(64 * 1024)
        .read_to_end(&mut raw)
        .map_err(|e| format!("{addr}{path}: {e}"))?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.lines().next().unwrap_or("").trim();
    let code = status.split_whitespace().nth(1).unwrap_or("");
    let body = body.trim();
    if code == "200" {
        Ok(format!("{addr}{path}: {body}"))
    } else if status.is_empty() {
        Err(format!("{addr}{path}: no answer"))
    } else {
        Err(format!("{addr}{path}: {status}: {body}"))
    }
}

async fn sink_until_signal(args: sink::Args) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        result = sink::run(args) => result,
        _ = term.recv() => Ok(()),
        _ = int.recv() => Ok(()),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

/// How long sessions and deliveries get to finish on SIGTERM.
const GRACE: std::time::Duration = std::time::Duration::from_secs(20);

async fn run(config: Config, path: PathBuf) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    // Handlers first: the listeners and the admin API answer before
    // recovery ends, and a SIGHUP then must reload, not kill the process.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    let metrics = telemetry::install()?;
    telemetry::spawn_upkeep(metrics.clone());
    let token = admin::read_token(&config)?;
    let admin_address = config.admin.address;
    let admin_socket = tokio::net::TcpListener::bind(admin_address)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on the admin address {admin_address}: {e}"))?;
    let relay = std::sync::Arc::new(poolrelay_relay::start(config).await?);
    let admin = std::sync::Arc::new(admin::Admin {
        relay: relay.clone(),
        metrics,
        token: std::sync::RwLock::new(token),
        address: admin_address,
        config_path: path.clone(),
    });
    let admin_task = tokio::spawn(admin::serve(admin.clone(), admin_socket));
    tracing::info!(admin = %admin_address, "poolrelay running");
    loop {
        tokio::select! {
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
            _ = hup.recv() => {
                match reload(&admin).await {
                    Ok(msg) => tracing::info!("SIGHUP: {msg}"),
                    Err(msg) => tracing::error!("SIGHUP: {msg}"),
                }
            }
        }
    }
    // A second signal ends the process at once; what got a 250 is fsynced already.
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: exiting now");
        std::process::exit(130);
    });
    // The admin API stays up during the grace period: /readyz says 503.
    relay.shutdown(GRACE).await;
    admin_task.abort();
    Ok(())
}

/// Re-reads the config file and the admin token file and applies them;
/// the old config and token stay on any error.
pub async fn reload(admin: &admin::Admin) -> Result<String, String> {
    let refused = |e: &dyn std::fmt::Display| format!("reload refused, old config kept: {e}");
    let config = Config::load(&admin.config_path).map_err(|e| refused(&e))?;
    let token = admin::read_token(&config).map_err(|e| refused(&e))?;
    // The admin address is kept until a restart: judge the new token
    // settings against the address in use.
    if token.is_none()
        && !admin.address.ip().to_canonical().is_loopback()
        && !config.admin.allow_unauthenticated
    {
        return Err(refused(&format!(
            "the admin API listens on {}, which is not loopback: keep admin.token_file, or set admin.allow_unauthenticated = true",
            admin.address
        )));
    }
    let message = admin.relay.reload(config).await?;
    if admin.set_token(token) {
        tracing::info!("admin token replaced from admin.token_file");
        return Ok(format!("{message}; admin token replaced"));
    }
    Ok(message)
}

#[cfg(test)]
mod tests {
    use super::admin_dial_address;

    #[test]
    fn health_dials_loopback_for_a_wildcard_admin_address() {
        for (listen, dial) in [
            ("0.0.0.0:9025", "127.0.0.1:9025"),
            ("[::]:9025", "[::1]:9025"),
            ("10.1.2.3:9000", "10.1.2.3:9000"),
            ("127.0.0.1:9025", "127.0.0.1:9025"),
        ] {
            let listen = listen.parse().expect("address");
            assert_eq!(admin_dial_address(listen).to_string(), dial);
        }
    }
}
