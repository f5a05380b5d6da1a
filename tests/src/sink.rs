//! Our own sink, `poolrelay sink`: one `.eml` file per message received.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::mail::{header_value, strip_brackets};
use crate::ports::free_addr;
use crate::process::{
    LOG_TAIL_LINES, Proc, append_file, binary, file_tail, keep_on_failure, log_files, new_tempdir,
    wait_started,
};
use crate::wait::{POLL_INTERVAL, poll_until};

/// Options of [`Sink::start_with`].
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Listen here instead of on a fresh port (e.g. a port allocated up front).
    pub addr: Option<SocketAddr>,
    /// `--reply CODE`: the reply the sink gives to the final dot.
    pub reply: Option<u16>,
    /// `--delay MS`: wait before replying.
    pub delay_ms: Option<u64>,
}

/// A message as `poolrelay sink` stored it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkMessage {
    /// The file it was read from.
    pub file: PathBuf,
    /// Envelope sender, `""` for the null sender.
    pub from: String,
    /// Envelope recipients, in order.
    pub to: Vec<String>,
    /// The message as received (headers and body).
    pub raw: String,
}

impl SinkMessage {
    /// The first header field `name` (case-insensitive), unfolded and trimmed.
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.raw, name)
    }

    /// The Message-ID without angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.header("Message-ID").map(|v| strip_brackets(&v))
    }

    /// The Subject.
    pub fn subject(&self) -> Option<String> {
        self.header("Subject")
    }
}

/// Parses one sink file: `X-Sink-From: <sender>`, one `X-Sink-To: <rcpt>`
/// per recipient, then the raw message.
pub fn parse_sink_file(file: &Path, bytes: &[u8]) -> SinkMessage {
    let text = String::from_utf8_lossy(bytes).into_owned();
    let mut from: Option<String> = None;
    let mut to = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..]
            .find('\n')
            .map(|i| pos + i + 1)
            .unwrap_or(text.len());
        let line = text[pos..end].trim_end_matches(['\r', '\n']);
        if let Some(v) = line.strip_prefix("X-Sink-From:") {
            from = Some(strip_brackets(v));
        } else if let Some(v) = line.strip_prefix("X-Sink-To:") {
            to.push(strip_brackets(v));
        } else {
            break;
        }
        pos = end;
    }
    let from = from.unwrap_or_else(|| {
        panic!(
            "sink file {} does not start with an X-Sink-From line; it starts with: {:?}",
            file.display(),
            &text[..text.len().min(200)]
        )
    });
    SinkMessage {
        file: file.to_path_buf(),
        from,
        to,
        raw: text[pos..].to_string(),
    }
}

/// A running `poolrelay sink --listen ADDR --dir DIR`. Killed by PID on drop.
pub struct Sink {
    dir: TempDir,
    msg_dir: PathBuf,
    addr: SocketAddr,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
}

impl Sink {
    /// A sink on a fresh loopback port, accepting everything.
    pub fn start() -> Sink {
        Sink::start_with(SinkOptions::default())
    }

    /// A sink on `addr` (allocated earlier with [`free_addr`]).
    pub fn start_at(addr: SocketAddr) -> Sink {
        Sink::start_with(SinkOptions {
            addr: Some(addr),
            ..SinkOptions::default()
        })
    }

    /// A sink with options; waits until it accepts TCP.
    pub fn start_with(opts: SinkOptions) -> Sink {
        let dir = new_tempdir("poolrelay-sink-");
        let msg_dir = dir.path().join("messages");
        fs::create_dir_all(&msg_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", msg_dir.display()));
        let addr = opts.addr.unwrap_or_else(free_addr);
        let stdout_path = dir.path().join("sink.stdout.log");
        let stderr_path = dir.path().join("sink.stderr.log");
        let (o, e) = log_files(&append_file(&stdout_path), &append_file(&stderr_path));
        let mut cmd = Command::new(binary());
        cmd.arg("sink")
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--dir")
            .arg(&msg_dir);
        if let Some(code) = opts.reply {
            cmd.arg("--reply").arg(code.to_string());
        }
        if let Some(ms) = opts.delay_ms {
            cmd.arg("--delay").arg(ms.to_string());
        }
        cmd.current_dir(dir.path()).stdout(o).stderr(e);
        let mut sink = Sink {
            proc: Proc::spawn(cmd, "poolrelay sink"),
            dir,
            msg_dir,
            addr,
            stdout_path,
            stderr_path,
        };
        let mut proc = std::mem::replace(&mut sink.proc, Proc { child: None });
        wait_started(
            &mut proc,
            &[addr],
            &format!("poolrelay sink on {addr}"),
            || sink.logs(),
        );
        sink.proc = proc;
        sink
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The directory the `.eml` files land in.
    pub fn dir(&self) -> &Path {
        &self.msg_dir
    }

    fn eml_files(&self) -> Vec<PathBuf> {
        let rd = fs::read_dir(&self.msg_dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", self.msg_dir.display()));
        let mut files: Vec<PathBuf> = rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "eml"))
            .collect();
        files.sort();
        files
    }

    /// Number of complete messages received.
    pub fn count(&self) -> usize {
        self.eml_files().len()
    }

    /// Every message received so far.
    pub fn messages(&self) -> Vec<SinkMessage> {
        self.eml_files()
            .into_iter()
            .map(|p| {
                let bytes =
                    fs::read(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
                parse_sink_file(&p, &bytes)
            })
            .collect()
    }

    /// The Message-IDs of every message received so far (one entry per message).
    pub fn message_ids(&self) -> Vec<String> {
        self.messages()
            .iter()
            .map(|m| {
                m.message_id()
                    .unwrap_or_else(|| format!("(no Message-ID in {})", m.file.display()))
            })
            .collect()
    }

    /// Waits until at least `n` messages arrived; returns them all.
    pub fn wait_for_count(&self, n: usize, deadline: Duration) -> Vec<SinkMessage> {
        if !poll_until(deadline, POLL_INTERVAL, || self.count() >= n) {
            panic!(
                "timed out after {deadline:?} waiting for {n} messages at the sink on {}: it has {}\n{}",
                self.addr,
                self.count(),
                self.logs()
            );
        }
        self.messages()
    }

    /// Waits until a message with this Message-ID arrived; returns it.
    pub fn wait_for_message_id(&self, id: &str, deadline: Duration) -> SinkMessage {
        let mut found = None;
        let ok = poll_until(deadline, POLL_INTERVAL, || {
            found = self
                .messages()
                .into_iter()
                .find(|m| m.message_id().as_deref() == Some(id));
            found.is_some()
        });
        match found {
            Some(m) if ok => m,
            _ => panic!(
                "timed out after {deadline:?} waiting for Message-ID <{id}> at the sink on {}; it has {:?}\n{}",
                self.addr,
                self.message_ids(),
                self.logs()
            ),
        }
    }

    /// The tail of the sink's output.
    pub fn logs(&self) -> String {
        format!(
            "--- sink {} stdout (tail) ---\n{}\n--- sink {} stderr (tail) ---\n{}\n",
            self.addr,
            file_tail(&self.stdout_path, LOG_TAIL_LINES),
            self.addr,
            file_tail(&self.stderr_path, LOG_TAIL_LINES)
        )
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "sink");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sink_file_parsing() {
        let f = Path::new("x.eml");
        let m = parse_sink_file(
            f,
            b"X-Sink-From: <>\r\nX-Sink-To: <a@b>\r\nX-Sink-To: <c@d>\r\nSubject: hi\r\n there\r\nMessage-ID: <id@x>\r\n\r\nbody\r\n",
        );
        assert_eq!(m.from, "");
        assert_eq!(m.to, vec!["a@b".to_string(), "c@d".to_string()]);
        assert_eq!(m.subject().as_deref(), Some("hi there"));
        assert_eq!(m.message_id().as_deref(), Some("id@x"));
    }
}
