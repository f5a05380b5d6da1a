//! A `poolrelay run` process with its own config, spool and logs in a
//! temporary directory, and the config text tests build for it.

use std::fs;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::time::Duration;

use tempfile::TempDir;

use crate::command::run_with_deadline;
use crate::http::http_get;
use crate::mail::{message, unique_id};
use crate::ports::free_addr;
use crate::process::{
    LOG_TAIL_LINES, Proc, append_file, binary, file_tail, keep_on_failure, log_files, new_tempdir,
    wait_started,
};
use crate::smtp_client::{Reply, SmtpClient};
use crate::wait::{POLL_INTERVAL, poll_until};

/// A TOML basic string literal for `s` (quotes included).
pub fn toml_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// What a test needs to write a relay config: the temporary directory, the
/// spool directory inside it, the main listener and admin addresses (already
/// allocated), and a way to allocate more listener addresses.
#[derive(Debug)]
pub struct RelaySetup {
    /// The relay's temporary directory (config, spool, logs).
    pub dir: PathBuf,
    /// `<dir>/spool`, to be used as `server.spool_dir`.
    pub spool_dir: PathBuf,
    /// The address of the first `[[listener]]`.
    pub listen: SocketAddr,
    /// The `[admin]` address.
    pub admin: SocketAddr,
    extra_listeners: Vec<SocketAddr>,
}

impl RelaySetup {
    /// Allocates one more listener address; the relay is considered started
    /// only once it accepts on this one too.
    pub fn extra_listener(&mut self) -> SocketAddr {
        let a = free_addr();
        self.extra_listeners.push(a);
        a
    }

    /// `[server]` (hostname `relay.test`, spool in the tempdir) and `[admin]`.
    pub fn head(&self) -> String {
        format!(
            "[server]\nhostname = \"relay.test\"\nspool_dir = {}\n\n[admin]\naddress = \"{}\"\n\n",
            toml_str(&self.spool_dir.to_string_lossy()),
            self.admin
        )
    }

    /// A `[[listener]]` table on `addr` followed by the `extra` key lines.
    pub fn listener_at(&self, addr: SocketAddr, extra: &str) -> String {
        let mut s = format!("[[listener]]\naddress = \"{addr}\"\n");
        if !extra.is_empty() {
            s.push_str(extra.trim_end());
            s.push('\n');
        }
        s.push('\n');
        s
    }

    /// The main `[[listener]]` (on [`RelaySetup::listen`]) with `extra` key lines.
    pub fn listener(&self, extra: &str) -> String {
        self.listener_at(self.listen, extra)
    }

    /// A complete config: head, main listener with `listener_extra`,
    /// `[defaults]` with `list_pool = "A"` and a 1 s retry, pool A, and one
    /// upstream serving every pool.
    pub fn single_upstream(&self, upstream: SocketAddr, listener_extra: &str) -> String {
        format!(
            "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
             [[upstream]]\nhost = \"{upstream}\"\n",
            self.head(),
            self.listener(listener_extra)
        )
    }
}

/// A running `poolrelay run -c FILE`, its config, spool and logs in a
/// temporary directory. Killed (SIGKILL by PID) and reaped on drop.
pub struct Relay {
    dir: TempDir,
    config_path: PathBuf,
    listen: SocketAddr,
    admin: SocketAddr,
    wait_addrs: Vec<SocketAddr>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    proc: Proc,
    starts: u32,
    env: Vec<(String, String)>,
}

impl Relay {
    /// Writes the config that `build` returns (see [`RelaySetup`]) to
    /// `<tmp>/poolrelay.toml`, starts the relay and waits until all its
    /// listeners accept TCP.
    pub fn start(build: impl FnOnce(&mut RelaySetup) -> String) -> Relay {
        let dir = new_tempdir("poolrelay-relay-");
        let mut setup = RelaySetup {
            dir: dir.path().to_path_buf(),
            spool_dir: dir.path().join("spool"),
            listen: free_addr(),
            admin: free_addr(),
            extra_listeners: Vec::new(),
        };
        let text = build(&mut setup);
        let config_path = dir.path().join("poolrelay.toml");
        fs::write(&config_path, &text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", config_path.display()));
        let mut wait_addrs = vec![setup.listen];
        wait_addrs.extend(setup.extra_listeners.iter().copied());
        let mut relay = Relay {
            stdout_path: dir.path().join("relay.stdout.log"),
            stderr_path: dir.path().join("relay.stderr.log"),
            dir,
            config_path,
            listen: setup.listen,
            admin: setup.admin,
            wait_addrs,
            proc: Proc { child: None },
            starts: 0,
            env: Vec::new(),
        };
        relay.spawn();
        relay
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let out = append_file(&self.stdout_path);
        let err = append_file(&self.stderr_path);
        for f in [&out, &err] {
            let _ = writeln!(&*f, "----- [harness] start #{} -----", self.starts);
        }
        let (o, e) = log_files(&out, &err);
        let mut cmd = Command::new(binary());
        cmd.arg("run")
            .arg("-c")
            .arg(&self.config_path)
            .current_dir(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(o)
            .stderr(e);
        self.proc = Proc::spawn(cmd, "poolrelay run");
        let what = format!("poolrelay run -c {}", self.config_path.display());
        let addrs = self.wait_addrs.clone();
        let mut proc = std::mem::replace(&mut self.proc, Proc { child: None });
        wait_started(&mut proc, &addrs, &what, || self.logs());
        self.proc = proc;
    }

    /// The address of the first listener.
    pub fn smtp_addr(&self) -> SocketAddr {
        self.listen
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// The config file.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The temporary directory (config, spool, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The relay's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.proc.pid()
    }

    /// A client connected to the first listener (greeting read).
    pub fn client(&self) -> SmtpClient {
        SmtpClient::connect(self.listen).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the relay at {}: {e}\n{}",
                self.listen,
                self.logs()
            )
        })
    }

    /// Sends one message through the listener at `addr` on a fresh
    /// connection; returns the reply to the final dot. Panics, with the
    /// relay's logs, unless it is 2xx.
    pub fn send_via(&self, addr: SocketAddr, from: &str, rcpts: &[&str], message: &str) -> Reply {
        let mut c = SmtpClient::connect(addr).unwrap_or_else(|e| {
            panic!(
                "cannot connect to the relay at {addr}: {e}\n{}",
                self.logs()
            )
        });
        let r = c.send_mail(from, rcpts, message).unwrap_or_else(|e| {
            panic!(
                "sending <{from}> -> {rcpts:?} via {addr}: {e}\n{}",
                self.logs()
            )
        });
        c.quit();
        r
    }

    /// [`Relay::send_via`] the first listener.
    pub fn send(&self, from: &str, rcpts: &[&str], message: &str) -> Reply {
        self.send_via(self.listen, from, rcpts, message)
    }

    /// `http://<admin address>`, for `poolrelay queue --admin`.
    pub fn admin_url(&self) -> String {
        format!("http://{}", self.admin)
    }

    /// The relay's log (its stderr, where it logs) of every start so far.
    pub fn log_text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.stderr_path).unwrap_or_default()).into_owned()
    }

    /// `GET /metrics` on the admin address; panics, with the logs, unless 200.
    pub fn scrape(&self) -> String {
        let r = http_get(self.admin, "/metrics").unwrap_or_else(|e| {
            panic!(
                "GET http://{}/metrics failed: {e}\n{}",
                self.admin,
                self.logs()
            )
        });
        assert_eq!(
            r.status,
            200,
            "GET /metrics answered {}: {}\n{}",
            r.status,
            r.body,
            self.logs()
        );
        r.body
    }

    /// Sends signal `sig` (a name kill(1) knows: `HUP`, `TERM`, `INT`) to
    /// the relay's PID. Panics when the relay is not running (so a stale PID
    /// is never signalled).
    pub fn signal(&mut self, sig: &str) {
        if let Some(status) = self.proc.exited() {
            panic!(
                "cannot send SIG{sig}: the relay already exited with {status}\n{}",
                self.logs()
            );
        }
        let pid = self
            .proc
            .pid()
            .unwrap_or_else(|| panic!("cannot send SIG{sig}: the relay is not running"));
        let mut cmd = Command::new("kill");
        cmd.arg("-s").arg(sig).arg(pid.to_string());
        let out = run_with_deadline(
            cmd,
            &format!("kill -s {sig} {pid}"),
            Duration::from_secs(10),
        );
        assert!(out.status.success(), "kill -s {sig} {pid}: {out}");
    }

    /// Waits until the relay process exits by itself; its exit status, or
    /// `None` when `deadline` passed first (it is still running then).
    pub fn wait_exit(&mut self, deadline: Duration) -> Option<ExitStatus> {
        let mut status = None;
        poll_until(deadline, POLL_INTERVAL, || {
            status = self.proc.exited();
            status.is_some()
        });
        status
    }

    /// SIGKILL the relay (no chance to clean up) and reap it.
    pub fn kill9(&mut self) {
        self.proc.kill();
    }

    /// Starts the relay again with the same config and spool (after
    /// [`Relay::kill9`]; kills a still-running one first).
    pub fn restart(&mut self) {
        self.proc.kill();
        self.spawn();
    }

    /// Sets an environment variable for the next [`Relay::restart`] and after.
    pub fn set_env(&mut self, name: &str, value: &str) {
        self.env.retain(|(k, _)| k != name);
        self.env.push((name.to_string(), value.to_string()));
    }

    /// Fills the spool of the stopped relay with `count` small messages of
    /// `pool` through `poolrelay spool-load` (the records the listener
    /// writes), Message-IDs `<PREFIX-N@load.test>`; the loader's JSON
    /// summary (`count`, `first`, `last` queue ids). `extra` are more flags.
    pub fn load_spool(
        &self,
        pool: &str,
        count: u64,
        prefix: &str,
        extra: &[&str],
    ) -> serde_json::Value {
        let spool = self.dir.path().join("spool");
        let mut cmd = Command::new(binary());
        cmd.arg("spool-load")
            .arg("--spool")
            .arg(&spool)
            .args([
                "--pool",
                pool,
                "--count",
                &count.to_string(),
                "--size",
                "600",
            ])
            .args(["--id-prefix", prefix])
            .args(extra);
        let out = run_with_deadline(cmd, "poolrelay spool-load", Duration::from_secs(120));
        assert!(out.status.success(), "poolrelay spool-load: {out}");
        serde_json::from_str(out.stdout.trim())
            .unwrap_or_else(|e| panic!("spool-load printed {:?}: {e}", out.stdout))
    }

    /// The tail of the relay's stdout and stderr, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- relay config {} ---\n{}\n--- relay stdout (tail) ---\n{}\n--- relay stderr (tail) ---\n{}\n",
            self.config_path.display(),
            fs::read_to_string(&self.config_path).unwrap_or_default(),
            file_tail(&self.stdout_path, LOG_TAIL_LINES),
            file_tail(&self.stderr_path, LOG_TAIL_LINES)
        )
    }

    /// Like [`wait_until`], with the relay's logs in the panic message.
    pub fn wait_until(&self, what: &str, deadline: Duration, cond: impl FnMut() -> bool) {
        if !poll_until(deadline, POLL_INTERVAL, cond) {
            panic!(
                "timed out after {deadline:?} waiting for {what}\n{}",
                self.logs()
            );
        }
    }
    /// Sends one message from `from` to `rcpts` with a fresh Message-ID
    /// (made from `tag`, also its Subject); panics unless the final dot got
    /// 250 with a queue id.
    pub fn send_tagged(&self, from: &str, rcpts: &[&str], tag: &str) -> Sent {
        let message_id = unique_id(tag);
        let reply = self.send(
            from,
            rcpts,
            &message(&message_id, from, rcpts[0], tag, "test message\n"),
        );
        assert_eq!(reply.code, 250, "final dot for <{from}> got {reply}");
        let queue_id = reply
            .queue_id()
            .unwrap_or_else(|| panic!("no queue id in the relay's reply {reply}"))
            .to_string();
        Sent {
            message_id,
            queue_id,
        }
    }

    /// The config file's current text.
    pub fn config_text(&self) -> String {
        fs::read_to_string(&self.config_path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", self.config_path.display()))
    }

    /// Replaces the config file (the running relay sees it on its next reload).
    pub fn write_config(&self, text: &str) {
        fs::write(&self.config_path, text)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", self.config_path.display()));
    }

    /// Appends `text` to the config file.
    pub fn append_config(&self, text: &str) {
        self.write_config(&format!("{}{text}", self.config_text()));
    }

    /// How many times `needle` occurs in the relay's log.
    pub fn log_count(&self, needle: &str) -> usize {
        self.log_text().matches(needle).count()
    }

    /// Sends `sig` and waits until the relay logged `needle` once more than
    /// before: a signal's effect is known only from the log.
    pub fn signal_and_wait_for_log(&mut self, sig: &str, needle: &str) {
        let before = self.log_count(needle);
        self.signal(sig);
        self.wait_until(
            &format!("the relay to log {needle:?} after SIG{sig}"),
            Duration::from_secs(15),
            || self.log_count(needle) > before,
        );
    }
}

/// A message the relay accepted: its Message-ID (no brackets) and queue id.
#[derive(Debug, Clone)]
pub struct Sent {
    /// The Message-ID, without angle brackets.
    pub message_id: String,
    /// The queue id from `250 ... queued as ID`.
    pub queue_id: String,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.proc.kill();
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "relay");
    }
}
