//! `poolrelay spool-load` (hidden): fills a stopped relay's spool directly
//! with the records the listener writes (an envelope per message in its
//! pool's keyspace, the bytes in `bodies`), for benchmarks and tests of a
//! big queue that would take too long to fill over SMTP. Not for service:
//! nothing checks the messages, and the relay must not be running.

use std::path::PathBuf;
use std::time::Instant;

use poolrelay_spool::{Envelope, FjallSpool, QueueId, Recipient, Spool, format_id, now_ms};

/// Arguments of `poolrelay spool-load`.
#[derive(clap::Args)]
pub struct Args {
    /// The spool directory (`server.spool_dir`) of a relay that is not running.
    #[arg(long)]
    spool: PathBuf,
    /// Pool to queue the messages in.
    #[arg(long, default_value = "A")]
    pool: String,
    /// Number of messages.
    #[arg(long)]
    count: u64,
    /// Size of each message in bytes (headers included, at least the headers).
    #[arg(long, default_value_t = 4096)]
    size: usize,
    /// Envelope sender.
    #[arg(long, default_value = "owner-load@lists.test")]
    sender: String,
    /// Envelope recipient.
    #[arg(long, default_value = "member@example.test")]
    recipient: String,
    /// Message-IDs are `<PREFIX-N@load.test>`, N from 0.
    #[arg(long, default_value = "load")]
    id_prefix: String,
    /// Record one failed attempt, the next one due in this many seconds
    /// (a queue that built up while the upstream was down).
    #[arg(long)]
    deferred_for: Option<u64>,
}

/// Appends in flight at once: enough to fill the writer's batches.
const WINDOW: usize = 4096;

/// Loads the messages; prints one JSON line: count, first and last id, seconds.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let spool = FjallSpool::open(&args.spool)?;
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ now_ms();
    let mut first: Option<QueueId> = None;
    let mut last: QueueId = 0;
    let mut n = 0u64;
    while n < args.count {
        let batch = (args.count - n).min(WINDOW as u64);
        let pending: Vec<_> = (n..n + batch)
            .map(|i| {
                let body = message(args, i, &mut rng);
                let mut env = Envelope::new(
                    &args.pool,
                    &args.sender,
                    vec![Recipient::pending(&args.recipient)],
                    body.len() as u64,
                    "load",
                    "127.0.0.1:0",
                );
                if let Some(secs) = args.deferred_for {
                    env.attempts = 1;
                    env.next_attempt_ms = now_ms() + secs * 1000;
                }
                spool.append(env, body)
            })
            .collect();
        for p in pending {
            let id = rt.block_on(p)?;
            first.get_or_insert(id);
            last = last.max(id);
        }
        n += batch;
    }
    println!(
        "{}",
        serde_json::json!({
            "count": n,
            "first": first.map(format_id),
            "last": format_id(last),
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

/// Message `i`: headers with its Message-ID, then random base64 lines
/// (incompressible, like the attachments of real mail) up to `size`.
fn message(args: &Args, i: u64, rng: &mut u64) -> Vec<u8> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut m = format!(
        "From: <{}>\r\nTo: <{}>\r\nSubject: load {i}\r\nMessage-ID: <{}-{i}@load.test>\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n",
        args.sender, args.recipient, args.id_prefix
    )
    .into_bytes();
    let mut column = 0;
    while m.len() + 2 < args.size {
        if column == 76 {
            m.extend_from_slice(b"\r\n");
            column = 0;
            continue;
        }
        // xorshift64: fast, and enough to defeat compression.
        *rng ^= *rng << 13;
        *rng ^= *rng >> 7;
        *rng ^= *rng << 17;
        m.push(ALPHABET[(*rng >> 58) as usize]);
        column += 1;
    }
    m.extend_from_slice(b"\r\n");
    m
}
