//! `poolrelay sink`: an SMTP server that accepts everything, for trying a
//! setup and for tests. One line per message on stdout; with `--dir`, one
//! file per message whose first lines are `X-Sink-From:` and `X-Sink-To:`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use poolrelay_smtp::driver::{Handler, Limits, drive};
use poolrelay_smtp::inbound::{Session, SessionConfig, Transaction};
use tokio::net::{TcpListener, TcpStream};

/// Options of `poolrelay sink`.
#[derive(clap::Args)]
pub struct Args {
    /// Address to listen on, e.g. 127.0.0.1:2600.
    #[arg(long)]
    listen: SocketAddr,
    /// Reply code to the final dot (e.g. 451 or 550 to try failures).
    #[arg(long, default_value_t = 250)]
    reply: u16,
    /// Milliseconds to wait before replying to the final dot.
    #[arg(long, default_value_t = 0)]
    delay: u64,
    /// Write each message to this directory as a file.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Host name in the banner.
    #[arg(long, default_value = "sink.localhost")]
    hostname: String,
}

struct State {
    args: Args,
    seq: AtomicU64,
}

/// Runs the sink until killed.
pub async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(dir) = &args.dir {
        std::fs::create_dir_all(dir)
            .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", dir.display()))?;
    }
    let socket = TcpListener::bind(args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    eprintln!("sink listening on {}", args.listen);
    let state = Arc::new(State {
        args,
        seq: AtomicU64::new(0),
    });
    loop {
        let (stream, peer) = match socket.accept().await {
            Ok(a) => a,
            Err(e) => {
                eprintln!("sink: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let _ = serve(state, stream, peer).await;
        });
    }
}

/// The sink's side of a session: accept (or refuse, as told) every message.
struct Accepting(Arc<State>);

impl Handler for Accepting {
    async fn message(&mut self, session: &mut Session, transaction: Transaction) -> Vec<u8> {
        if self.0.args.delay > 0 {
            tokio::time::sleep(Duration::from_millis(self.0.args.delay)).await;
        }
        accept(&self.0, session, &transaction)
    }
}

async fn serve(state: Arc<State>, stream: TcpStream, peer: SocketAddr) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let (session, banner) = Session::new(
        SessionConfig {
            hostname: state.args.hostname.clone(),
            max_message_size: 1 << 30,
            max_recipients: 100_000,
            max_line_length: 4096,
            relay_allowed: true,
            max_hops: usize::MAX,
            security: Default::default(),
            mt_priority: None,
            mt_priority_trusted: false,
        },
        peer,
    );
    let limits = Limits {
        command: Duration::from_secs(300),
        data: Duration::from_secs(180),
    };
    drive(
        stream,
        session,
        &banner,
        limits,
        None,
        &mut Accepting(state),
        None,
    )
    .await
}

fn accept(state: &State, session: &mut Session, tx: &Transaction) -> Vec<u8> {
    let seq = state.seq.fetch_add(1, Ordering::Relaxed);
    let code = state.args.reply;
    if !(200..300).contains(&code) {
        let class = code / 100;
        // Resets the session's transaction; the reply itself is ours.
        let _ = session.queue_failed("refused");
        return format!("{code} {class}.0.0 sink configured to refuse\r\n").into_bytes();
    }
    let recipients: Vec<&str> = tx.recipients.iter().map(|r| r.address.as_str()).collect();
    let subject = header(&tx.message, "subject").unwrap_or_default();
    println!(
        "from=<{}> to={} size={} subject={:?}",
        tx.sender,
        recipients
            .iter()
            .map(|r| format!("<{r}>"))
            .collect::<Vec<_>>()
            .join(","),
        tx.message.len(),
        subject
    );
    if let Some(dir) = &state.args.dir {
        let mut file = format!("X-Sink-From: <{}>\r\n", tx.sender).into_bytes();
        for r in &recipients {
            file.extend_from_slice(format!("X-Sink-To: <{r}>\r\n").as_bytes());
        }
        file.extend_from_slice(&tx.message);
        let name = format!("{}-{seq:08}", std::process::id());
        let tmp = dir.join(format!(".{name}.tmp"));
        let done = dir.join(format!("{name}.eml"));
        // Rename so a reader never sees half a file.
        if let Err(e) = std::fs::write(&tmp, &file).and_then(|()| std::fs::rename(&tmp, &done)) {
            eprintln!("sink: cannot write {}: {e}", done.display());
            return b"451 4.3.0 sink cannot store the message\r\n".to_vec();
        }
    }
    session.queued(&format!("sink{seq}"))
}

/// First value of a header field, unfolded.
fn header(message: &[u8], name: &str) -> Option<String> {
    poolrelay_relay::classifier::parse_headers(message)
        .into_iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}
