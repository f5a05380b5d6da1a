//! Postfix's independent test programs: `smtp-sink` as an upstream that
//! dumps every transaction, and `smtp-source` as a bulk client.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use tempfile::TempDir;

use crate::command::{CommandOutput, run_with_deadline};
use crate::mail::{header_value, strip_brackets};
use crate::ports::free_addr;
use crate::process::{
    Proc, append_file, file_tail, is_root, keep_on_failure, log_files, new_tempdir, set_mode,
    wait_started,
};
use crate::wait::poll_until;

/// Where Postfix's test programs are.
pub const SMTP_SINK: &str = "/usr/sbin/smtp-sink";
/// Where Postfix's test programs are.
pub const SMTP_SOURCE: &str = "/usr/sbin/smtp-source";
/// What to do when a Postfix program is missing.
pub(crate) const POSTFIX_MISSING: &str = "install Debian package postfix (apt-get install postfix)";

fn postfix_tool(path: &str) -> PathBuf {
    let p = PathBuf::from(path);
    if !p.is_file() {
        panic!("{path} is missing: {POSTFIX_MISSING}");
    }
    p
}

/// An unprivileged user for `smtp-sink -u` when running as root.
fn unprivileged_user() -> &'static str {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for user in ["nobody", "postfix"] {
        if passwd.lines().any(|l| l.split(':').next() == Some(user)) {
            return user;
        }
    }
    panic!(
        "running as root, smtp-sink needs -u USER, and neither nobody nor postfix exists in /etc/passwd"
    );
}

/// A message as Postfix's `smtp-sink -d` dumped it.
#[derive(Debug, Clone)]
pub struct PostfixMessage {
    /// The dump file.
    pub file: PathBuf,
    /// `X-Mail-Args:` (the MAIL FROM arguments, e.g. `<a@b> SIZE=123`).
    pub mail_args: String,
    /// `X-Rcpt-Args:` lines, in order.
    pub rcpt_args: Vec<String>,
    /// Everything after smtp-sink's own headers (its three-line `Received:` included).
    pub raw: String,
}

impl PostfixMessage {
    /// The first header field `name` of the message proper (case-insensitive).
    pub fn header(&self, name: &str) -> Option<String> {
        header_value(&self.raw, name)
    }

    /// The Message-ID without angle brackets.
    pub fn message_id(&self) -> Option<String> {
        self.header("Message-ID").map(|v| strip_brackets(&v))
    }
}

pub(crate) fn parse_postfix_dump(file: &Path, text: &str) -> PostfixMessage {
    let mut mail_args = String::new();
    let mut rcpt_args = Vec::new();
    let mut pos = 0;
    while pos < text.len() {
        let end = text[pos..]
            .find('\n')
            .map(|i| pos + i + 1)
            .unwrap_or(text.len());
        let line = text[pos..end].trim_end_matches(['\r', '\n']);
        if let Some(v) = line.strip_prefix("X-Mail-Args:") {
            mail_args = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("X-Rcpt-Args:") {
            rcpt_args.push(v.trim().to_string());
        } else if !line.starts_with("X-Client-") && !line.starts_with("X-Helo-Args:") {
            break;
        }
        pos = end;
    }
    // smtp-sink's own Received: header: "Received: ..." plus two folded lines.
    let mut rest = &text[pos..];
    if rest.starts_with("Received:") {
        let mut cut = rest.find('\n').map(|i| i + 1).unwrap_or(rest.len());
        while rest[cut..].starts_with([' ', '\t']) {
            cut = rest[cut..]
                .find('\n')
                .map(|i| cut + i + 1)
                .unwrap_or(rest.len());
        }
        rest = &rest[cut..];
    }
    PostfixMessage {
        file: file.to_path_buf(),
        mail_args,
        rcpt_args,
        raw: rest.to_string(),
    }
}

/// Postfix's `smtp-sink`, an independent SMTP server, dumping every
/// transaction to its own file (`-d DIR/%M%S.` plus a random suffix).
///
/// As root, smtp-sink requires `-u USER` and writes its dumps as that user,
/// so the dump directory is made world-writable (and its parent traversable).
/// smtp-sink writes a dump file while the transaction is in progress, so a
/// message counts as received only once its `Message-ID` header can be read.
pub struct PostfixSink {
    dir: TempDir,
    dump_dir: PathBuf,
    addr: SocketAddr,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
    /// file -> Message-ID, for files already seen complete.
    seen: Mutex<BTreeMap<PathBuf, String>>,
}

impl PostfixSink {
    /// Starts `/usr/sbin/smtp-sink` on a fresh loopback port and waits until
    /// it accepts. Panics (the test fails) when Postfix is not installed.
    pub fn start() -> PostfixSink {
        let bin = postfix_tool(SMTP_SINK);
        let dir = new_tempdir("poolrelay-smtp-sink-");
        set_mode(dir.path(), 0o755);
        let dump_dir = dir.path().join("dump");
        fs::create_dir_all(&dump_dir)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", dump_dir.display()));
        set_mode(&dump_dir, 0o777);
        let addr = free_addr();
        let stdout_path = dir.path().join("smtp-sink.stdout.log");
        let stderr_path = dir.path().join("smtp-sink.stderr.log");
        let (o, e) = log_files(&append_file(&stdout_path), &append_file(&stderr_path));
        let mut cmd = Command::new(bin);
        if is_root() {
            cmd.arg("-u").arg(unprivileged_user());
        }
        cmd.arg("-d")
            .arg(format!("{}/%M%S.", dump_dir.display()))
            .arg(format!("{addr}"))
            .arg("1000")
            .current_dir(dir.path())
            .stdout(o)
            .stderr(e);
        let mut sink = PostfixSink {
            proc: Proc::spawn(cmd, "smtp-sink"),
            dir,
            dump_dir,
            addr,
            stdout_path,
            stderr_path,
            seen: Mutex::new(BTreeMap::new()),
        };
        let mut proc = std::mem::replace(&mut sink.proc, Proc { child: None });
        wait_started(&mut proc, &[addr], &format!("smtp-sink on {addr}"), || {
            sink.logs()
        });
        sink.proc = proc;
        sink
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn dump_files(&self) -> Vec<PathBuf> {
        let rd = fs::read_dir(&self.dump_dir)
            .unwrap_or_else(|e| panic!("cannot list {}: {e}", self.dump_dir.display()));
        let mut v: Vec<PathBuf> = rd.filter_map(|e| e.ok().map(|e| e.path())).collect();
        v.sort();
        v
    }

    /// Every dumped message whose headers are complete.
    pub fn messages(&self) -> Vec<PostfixMessage> {
        self.dump_files()
            .into_iter()
            .filter_map(|p| {
                let bytes = fs::read(&p).ok()?;
                let text = String::from_utf8_lossy(&bytes);
                let m = parse_postfix_dump(&p, &text);
                m.message_id().is_some().then_some(m)
            })
            .collect()
    }

    /// Message-IDs received so far, one entry per dump file whose headers are
    /// complete (files already seen are not read again).
    pub fn message_ids(&self) -> Vec<String> {
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        for p in self.dump_files() {
            if seen.contains_key(&p) {
                continue;
            }
            if let Ok(bytes) = fs::read(&p) {
                let text = String::from_utf8_lossy(&bytes);
                if let Some(id) = parse_postfix_dump(&p, &text).message_id() {
                    seen.insert(p, id);
                }
            }
        }
        seen.values().cloned().collect()
    }

    /// Waits (checking every 200 ms) until `n` distinct Message-IDs arrived;
    /// returns every Message-ID received (duplicates included).
    pub fn wait_for_distinct(&self, n: usize, deadline: Duration) -> Vec<String> {
        let distinct = |ids: &[String]| ids.iter().collect::<BTreeSet<_>>().len();
        if !poll_until(deadline, Duration::from_millis(200), || {
            distinct(&self.message_ids()) >= n
        }) {
            let ids = self.message_ids();
            panic!(
                "timed out after {deadline:?} waiting for {n} distinct messages at smtp-sink on {}: \
                 it has {} files, {} distinct Message-IDs\n{}",
                self.addr,
                ids.len(),
                distinct(&ids),
                self.logs()
            );
        }
        self.message_ids()
    }

    /// Waits until every dump file holds a complete message (smtp-sink
    /// creates the file when the transaction starts); returns the Message-ID
    /// of every file, duplicates included.
    pub fn wait_for_complete_dumps(&self, deadline: Duration) -> Vec<String> {
        if !poll_until(deadline, Duration::from_millis(200), || {
            self.message_ids().len() == self.dump_files().len()
        }) {
            panic!(
                "timed out after {deadline:?} waiting for smtp-sink on {} to finish its dumps: \
                 {} files, {} complete\n{}",
                self.addr,
                self.dump_files().len(),
                self.message_ids().len(),
                self.logs()
            );
        }
        self.message_ids()
    }

    /// The tail of smtp-sink's output.
    pub fn logs(&self) -> String {
        format!(
            "--- smtp-sink {} stdout (tail) ---\n{}\n--- smtp-sink stderr (tail) ---\n{}\n",
            self.addr,
            file_tail(&self.stdout_path, 20),
            file_tail(&self.stderr_path, 20)
        )
    }
}

impl Drop for PostfixSink {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "smtp-sink");
    }
}

/// Runs `/usr/sbin/smtp-source ARGS TARGET` (e.g. `["-s", "10",
/// "-m", "2000", "-f", "a@b", "-t", "c@d"]`) and waits for it to finish;
/// kills it and panics when it takes longer than `deadline`. Panics (the
/// test fails) when Postfix is not installed.
pub fn smtp_source(args: &[&str], target: SocketAddr, deadline: Duration) -> CommandOutput {
    let bin = postfix_tool(SMTP_SOURCE);
    let mut cmd = Command::new(bin);
    cmd.args(args).arg(target.to_string());
    run_with_deadline(
        cmd,
        &format!("smtp-source {} {target}", args.join(" ")),
        deadline,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postfix_dump_parsing() {
        let text = "X-Client-Addr: 127.0.0.1\nX-Client-Proto: ESMTP\nX-Helo-Args: relay.test\n\
                    X-Mail-Args: <a@b> SIZE=12\nX-Rcpt-Args: <c@d>\nReceived: from relay.test ([127.0.0.1])\n\
                    \tby smtp-sink (smtp-sink) with ESMTP id 1234;\n\tSat, 28 Nov 2026 13:52:18 +0000 (UTC)\n\
                    Received: by relay.test\nMessage-Id: <1.2.3@vm>\n\nLa de da\n\n";
        let m = parse_postfix_dump(Path::new("d"), text);
        assert_eq!(m.mail_args, "<a@b> SIZE=12");
        assert_eq!(m.rcpt_args, vec!["<c@d>".to_string()]);
        assert_eq!(m.message_id().as_deref(), Some("1.2.3@vm"));
        assert!(m.raw.starts_with("Received: by relay.test"), "{:?}", m.raw);
    }
}
