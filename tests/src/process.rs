//! The binary under test and the plumbing every spawned process shares:
//! temporary directories, log files, start-up waits, and killing by PID.

use std::fs::{self, File, OpenOptions};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::ports::accepts_tcp;
use crate::wait::POLL_INTERVAL;

/// How long a spawned process gets to start accepting TCP connections.
pub const STARTUP_DEADLINE: Duration = Duration::from_secs(20);
/// Lines of a log shown when something fails.
pub(crate) const LOG_TAIL_LINES: usize = 60;

/// The `poolrelay` binary under test: `$POOLRELAY_BIN`, else
/// `$CARGO_TARGET_DIR/debug/poolrelay`, else `<workspace>/target/debug/poolrelay`.
/// Panics when it does not exist.
pub fn binary() -> PathBuf {
    let path = match (
        std::env::var_os("POOLRELAY_BIN"),
        std::env::var_os("CARGO_TARGET_DIR"),
    ) {
        (Some(p), _) if !p.is_empty() => PathBuf::from(p),
        (_, Some(t)) if !t.is_empty() => PathBuf::from(t).join("debug/poolrelay"),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/poolrelay"),
    };
    if !path.is_file() {
        panic!(
            "the poolrelay binary is not at {}; build it first: cargo build -p poolrelay \
             (or point POOLRELAY_BIN at it)",
            path.display()
        );
    }
    path
}

/// The workspace root (where `deploy/`, `crates/` and `tests/` are).
pub fn workspace_root() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    p.canonicalize().unwrap_or(p)
}

/// The last `n` lines of a file, or a note saying why it cannot be read.
pub fn file_tail(path: &Path, n: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let lines: Vec<&str> = text.lines().collect();
            let start = lines.len().saturating_sub(n);
            if lines.is_empty() {
                format!("({} is empty)", path.display())
            } else {
                lines[start..].join("\n")
            }
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

pub(crate) fn is_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    // /proc/self belongs to the effective uid of this process.
    fs::metadata("/proc/self")
        .map(|m| m.uid() == 0)
        .unwrap_or(false)
}

pub(crate) fn set_mode(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}

/// A temporary directory named `PREFIX...`, removed when dropped.
pub fn new_tempdir(prefix: &str) -> TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"))
}

/// On a failing test, keep the temporary directory (spool, logs, messages)
/// for inspection; also when `POOLRELAY_TEST_KEEP` is set.
pub(crate) fn keep_on_failure(dir: &mut TempDir, what: &str) {
    if std::thread::panicking() || std::env::var_os("POOLRELAY_TEST_KEEP").is_some() {
        dir.disable_cleanup(true);
        eprintln!(
            "[harness] kept the {what} directory {}",
            dir.path().display()
        );
    }
}

/// A child process that is killed (SIGKILL, by its PID) and reaped on drop.
pub(crate) struct Proc {
    pub(crate) child: Option<Child>,
}

impl Proc {
    pub(crate) fn spawn(cmd: Command, what: &str) -> Proc {
        Proc::spawn_with_stdin(cmd, what, Stdio::null())
    }

    pub(crate) fn spawn_with_stdin(mut cmd: Command, what: &str, stdin: Stdio) -> Proc {
        cmd.stdin(stdin);
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {what} ({cmd:?}): {e}"));
        Proc { child: Some(child) }
    }

    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` when the process has exited.
    pub(crate) fn exited(&mut self) -> Option<ExitStatus> {
        match self.child.as_mut() {
            Some(c) => c.try_wait().ok().flatten(),
            None => None,
        }
    }

    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Child::kill sends SIGKILL to this child's PID only.
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Starts `what` and waits until every address in `addrs` accepts TCP.
/// Panics with `logs()` when it exits or the deadline passes first.
pub(crate) fn wait_started(
    proc: &mut Proc,
    addrs: &[SocketAddr],
    what: &str,
    logs: impl Fn() -> String,
) {
    let end = Instant::now() + STARTUP_DEADLINE;
    for &addr in addrs {
        loop {
            if let Some(status) = proc.exited() {
                panic!(
                    "{what} exited with {status} before accepting on {addr}\n{}",
                    logs()
                );
            }
            if accepts_tcp(addr) {
                break;
            }
            if Instant::now() >= end {
                panic!(
                    "{what} did not accept TCP on {addr} within {STARTUP_DEADLINE:?}\n{}",
                    logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
    }
}

pub(crate) fn log_files(out: &File, err: &File) -> (Stdio, Stdio) {
    let o = out
        .try_clone()
        .unwrap_or_else(|e| panic!("dup log file: {e}"));
    let e = err
        .try_clone()
        .unwrap_or_else(|e| panic!("dup log file: {e}"));
    (Stdio::from(o), Stdio::from(e))
}

pub(crate) fn append_file(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}
