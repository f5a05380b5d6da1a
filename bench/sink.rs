//! bench-sink: the benchmark's upstream SMTP server. Standard library only,
//! built by `bench/run.py` with plain `rustc -O` (no Cargo, no crates).
//!
//! It accepts every message and records, per message, the wall-clock time at
//! which its final dot arrived, as one line of the log file:
//!
//! ```text
//! <unix seconds, µs precision> <recipients> <bytes> <X-Bench-Id or ->
//! ```
//!
//! `--delay MS` holds each 250 for at least MS milliseconds and `--max-rate R`
//! spaces the 250s of all connections at least 1/R s apart: together they make
//! the "slow smarthost" of the emergency-lane benchmark (200 ms, ≤ 50 msg/s);
//! `--delay 50` alone is the smarthost whose workers pools share in the
//! shared-worker scenario. The arrival time is taken at the dot, before the
//! hold, so a latency measured to it excludes the message's own transaction.
//!
//! One thread per connection, blocking I/O, replies flushed only when no
//! pipelined input is waiting: it is far faster than the relays it measures
//! (run.py's `baseline` row drives it straight from smtp-source).

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

struct Shared {
    log: Mutex<BufWriter<std::fs::File>>,
    count: AtomicU64,
    delay: Duration,
    /// Minimum spacing of 250 replies over all connections (zero: none).
    spacing: Duration,
    next_slot: Mutex<Instant>,
}

fn main() {
    let mut listen = String::from("127.0.0.1:2600");
    let mut log_path = String::from("sink.log");
    let mut delay_ms = 0u64;
    let mut max_rate = 0f64;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| usage(&a));
        match a.as_str() {
            "--listen" => listen = value(),
            "--log" => log_path = value(),
            "--delay" => delay_ms = value().parse().unwrap_or_else(|_| usage("--delay")),
            "--max-rate" => max_rate = value().parse().unwrap_or_else(|_| usage("--max-rate")),
            _ => usage(&a),
        }
    }
    let file = std::fs::File::create(&log_path)
        .unwrap_or_else(|e| fail(&format!("cannot create {log_path}: {e}")));
    let socket =
        TcpListener::bind(&listen).unwrap_or_else(|e| fail(&format!("cannot listen on {listen}: {e}")));
    let shared = Arc::new(Shared {
        log: Mutex::new(BufWriter::with_capacity(1 << 16, file)),
        count: AtomicU64::new(0),
        delay: Duration::from_millis(delay_ms),
        spacing: if max_rate > 0.0 {
            Duration::from_secs_f64(1.0 / max_rate)
        } else {
            Duration::ZERO
        },
        next_slot: Mutex::new(Instant::now()),
    });
    // The log is flushed every 20 ms, so the harness sees arrivals promptly;
    // the timestamps themselves are taken at arrival, not at flush.
    let flusher = shared.clone();
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(20));
        if let Ok(mut log) = flusher.log.lock() {
            let _ = log.flush();
        }
    });
    eprintln!("bench-sink listening on {listen}, log {log_path}, delay {delay_ms} ms, max rate {max_rate}/s");
    for stream in socket.incoming() {
        let Ok(stream) = stream else { continue };
        let shared = shared.clone();
        std::thread::spawn(move || {
            let _ = serve(&shared, stream);
        });
    }
}

fn usage(arg: &str) -> ! {
    fail(&format!(
        "bad argument {arg}\nusage: bench-sink --listen ADDR --log FILE [--delay MS] [--max-rate MSG_PER_S]"
    ))
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-sink: {msg}");
    std::process::exit(2)
}

fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn serve(shared: &Shared, stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut reader = BufReader::with_capacity(1 << 16, stream.try_clone()?);
    let mut writer = BufWriter::with_capacity(1 << 14, stream);
    writer.write_all(b"220 bench-sink ESMTP\r\n")?;
    writer.flush()?;
    let mut line = Vec::with_capacity(1024);
    let mut recipients = 0u32;
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        let verb: Vec<u8> = line.iter().take(4).map(u8::to_ascii_uppercase).collect();
        match &verb[..] {
            b"EHLO" => writer.write_all(
                b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 209715200\r\n250 ENHANCEDSTATUSCODES\r\n",
            )?,
            b"HELO" => writer.write_all(b"250 bench-sink\r\n")?,
            b"MAIL" => {
                recipients = 0;
                writer.write_all(b"250 2.1.0 Ok\r\n")?
            }
            b"RCPT" => {
                recipients += 1;
                writer.write_all(b"250 2.1.5 Ok\r\n")?
            }
            b"DATA" => {
                writer.write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")?;
                writer.flush()?;
                let (bytes, id) = read_data(&mut reader, &mut line)?;
                let arrived = now_unix();
                let started = Instant::now();
                record(shared, arrived, recipients, bytes, &id);
                hold(shared, started);
                recipients = 0;
                writer.write_all(b"250 2.0.0 Ok: queued\r\n")?;
            }
            b"RSET" => {
                recipients = 0;
                writer.write_all(b"250 2.0.0 Ok\r\n")?
            }
            b"NOOP" => writer.write_all(b"250 2.0.0 Ok\r\n")?,
            b"QUIT" => {
                writer.write_all(b"221 2.0.0 Bye\r\n")?;
                writer.flush()?;
                return Ok(());
            }
            _ => writer.write_all(b"502 5.5.2 Command not implemented\r\n")?,
        }
        // Pipelining: answer a batch of commands with one write.
        if reader.buffer().is_empty() {
            writer.flush()?;
        }
    }
}

/// Reads message content up to CRLF.CRLF; returns its size and the value of
/// the first `X-Bench-Id:` header ("-" when absent).
fn read_data(
    reader: &mut BufReader<TcpStream>,
    line: &mut Vec<u8>,
) -> std::io::Result<(usize, String)> {
    let mut bytes = 0usize;
    let mut in_header = true;
    let mut id = String::from("-");
    loop {
        line.clear();
        if reader.read_until(b'\n', line)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line.as_slice() == b".\r\n" || line.as_slice() == b".\n" {
            return Ok((bytes, id));
        }
        bytes += line.len();
        if in_header {
            if line.as_slice() == b"\r\n" || line.as_slice() == b"\n" {
                in_header = false;
            } else if line.len() > 12 && line[..12].eq_ignore_ascii_case(b"x-bench-id: ") {
                id = String::from_utf8_lossy(&line[12..]).trim().to_string();
            }
        }
    }
}

fn record(shared: &Shared, arrived: f64, recipients: u32, bytes: usize, id: &str) {
    if let Ok(mut log) = shared.log.lock() {
        let _ = writeln!(log, "{arrived:.6} {recipients} {bytes} {id}");
    }
    shared.count.fetch_add(1, Ordering::Relaxed);
}

/// Holds the 250: at least `delay` after arrival, and at least `spacing`
/// after the previous 250 of any connection.
fn hold(shared: &Shared, arrived: Instant) {
    let mut until = arrived + shared.delay;
    if !shared.spacing.is_zero() {
        if let Ok(mut next) = shared.next_slot.lock() {
            until = until.max(*next);
            *next = until + shared.spacing;
        }
    }
    let now = Instant::now();
    if until > now {
        std::thread::sleep(until - now);
    }
}
