//! Commands run to completion with a deadline: `poolrelay` subcommands
//! (check, queue, reload, import-listserv) and `promtool`.

use std::fmt;
use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Duration;

use crate::process::{Proc, append_file, binary, file_tail, log_files, new_tempdir};
use crate::wait::{POLL_INTERVAL, poll_until};

/// The outcome of a finished command ([`run_with_deadline`], `smtp_source`).
#[derive(Debug)]
pub struct CommandOutput {
    /// Exit status.
    pub status: ExitStatus,
    /// Its stdout.
    pub stdout: String,
    /// Its stderr.
    pub stderr: String,
}

impl fmt::Display for CommandOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "exit: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `cmd` (stdin empty, stdout and stderr captured to files) and waits
/// for it; kills it and panics when it runs longer than `deadline`.
pub fn run_with_deadline(cmd: Command, what: &str, deadline: Duration) -> CommandOutput {
    run_command(cmd, Stdio::null(), what, deadline)
}

fn run_command(mut cmd: Command, stdin: Stdio, what: &str, deadline: Duration) -> CommandOutput {
    let dir = new_tempdir("poolrelay-cmd-");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let (o, e) = log_files(&append_file(&out_path), &append_file(&err_path));
    cmd.stdout(o).stderr(e);
    let mut proc = Proc::spawn_with_stdin(cmd, what, stdin);
    let mut status = None;
    let finished = poll_until(deadline, POLL_INTERVAL, || {
        status = proc.exited();
        status.is_some()
    });
    let read = |p: &Path| String::from_utf8_lossy(&fs::read(p).unwrap_or_default()).into_owned();
    match status {
        Some(status) if finished => CommandOutput {
            status,
            stdout: read(&out_path),
            stderr: read(&err_path),
        },
        _ => {
            proc.kill();
            panic!(
                "{what} did not finish within {deadline:?}\n--- stdout (tail) ---\n{}\n--- stderr (tail) ---\n{}",
                file_tail(&out_path, 20),
                file_tail(&err_path, 20)
            );
        }
    }
}

/// Like [`run_with_deadline`], with `input` on the command's stdin.
pub fn run_with_input(cmd: Command, input: &[u8], what: &str, deadline: Duration) -> CommandOutput {
    let dir = new_tempdir("poolrelay-cmd-");
    let in_path = dir.path().join("stdin");
    fs::write(&in_path, input)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", in_path.display()));
    let stdin =
        File::open(&in_path).unwrap_or_else(|e| panic!("cannot open {}: {e}", in_path.display()));
    run_command(cmd, Stdio::from(stdin), what, deadline)
}

/// Where Prometheus's `promtool` is.
pub const PROMTOOL: &str = "/usr/bin/promtool";

/// Runs `promtool ARGS` (with `stdin`, if any) and waits at most `deadline`.
/// Panics (the test fails) when promtool is not installed.
pub fn promtool(args: &[&str], stdin: Option<&[u8]>, deadline: Duration) -> CommandOutput {
    if !Path::new(PROMTOOL).is_file() {
        panic!(
            "{PROMTOOL} is missing: install Debian package prometheus (apt-get install prometheus)"
        );
    }
    let mut cmd = Command::new(PROMTOOL);
    cmd.args(args);
    let what = format!("promtool {}", args.join(" "));
    match stdin {
        Some(input) => run_with_input(cmd, input, &what, deadline),
        None => run_with_deadline(cmd, &what, deadline),
    }
}

/// Runs `poolrelay ARGS` to completion (at most `deadline`).
pub fn poolrelay(args: &[&str], deadline: Duration) -> CommandOutput {
    let mut cmd = Command::new(binary());
    cmd.args(args);
    run_with_deadline(cmd, &format!("poolrelay {}", args.join(" ")), deadline)
}
