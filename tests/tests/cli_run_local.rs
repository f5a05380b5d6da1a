//! `make run` (scripts/run-local.sh): the two sinks it starts live exactly
//! as long as the script. Stopping the script with SIGTERM stops the relay
//! and both sinks and frees their ports, so a second run starts cleanly.
//!
//! The script is run with the binary under test (`POOLRELAY_BIN`) and the
//! repository's config/poolrelay.toml (`POOLRELAY_CONFIG`), in a temporary
//! directory so its relative spool lands there. Its ports are fixed by that
//! config; they are read from it, not repeated here.

use std::fs::{self, File};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;

use poolrelay_tests::{
    POLL_INTERVAL, SmtpClient, accepts_tcp, binary, file_tail, message, poll_until, unique_id,
    workspace_root,
};

/// How long the script gets until the relay and both sinks accept TCP.
const STARTUP: Duration = Duration::from_secs(60);
/// The relay's grace period on SIGTERM plus a margin: how long the script
/// gets to exit after its SIGTERM.
const STOP: Duration = Duration::from_secs(40);
/// How long ports and processes get to disappear once the script exited.
const GONE: Duration = Duration::from_secs(10);

/// The addresses config/poolrelay.toml uses.
struct Ports {
    listeners: Vec<SocketAddr>,
    admin: SocketAddr,
    sinks: Vec<SocketAddr>,
}

/// `key = "ADDR"` values of the config, in file order, for one key.
fn quoted_addresses(text: &str, key: &str) -> Vec<SocketAddr> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once('=')?;
            if k.trim() != key {
                return None;
            }
            let v = v.split('#').next()?.trim().trim_matches('"');
            v.parse().ok()
        })
        .collect()
}

fn read_ports(config: &Path) -> Ports {
    let text = fs::read_to_string(config)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", config.display()));
    // `address` is the key of the listeners and of [admin]; the admin one
    // is the address that follows the `[admin]` header.
    let admin_part = text
        .split_once("[admin]")
        .map(|(_, rest)| rest)
        .unwrap_or_else(|| panic!("no [admin] in {}", config.display()));
    let admin = *quoted_addresses(admin_part, "address")
        .first()
        .unwrap_or_else(|| panic!("no admin address in {}", config.display()));
    let listeners: Vec<SocketAddr> = quoted_addresses(&text, "address")
        .into_iter()
        .filter(|a| *a != admin)
        .collect();
    let sinks = quoted_addresses(&text, "host");
    assert!(
        !listeners.is_empty() && sinks.len() == 2,
        "expected listeners and two upstream sinks in {}: listeners {listeners:?}, sinks {sinks:?}",
        config.display()
    );
    Ports {
        listeners,
        admin,
        sinks,
    }
}

/// Whether `addr` can be bound right now (nothing listens there).
fn port_free(addr: SocketAddr) -> bool {
    TcpListener::bind(addr).is_ok()
}

/// PIDs of processes whose command line contains `needle` as consecutive
/// arguments (e.g. `["sink", "--listen", "127.0.0.1:2601"]`).
fn pids_with_args(needle: &[String]) -> Vec<u32> {
    let mut pids = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<String> = raw
            .split(|b| *b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if args.windows(needle.len()).any(|w| w == needle) {
            pids.push(pid);
        }
    }
    pids
}

fn kill_pid(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg("-s")
        .arg(signal)
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// One run of scripts/run-local.sh. On drop, everything it may have left
/// behind (the script, the relay, the sinks) is killed by PID, so a failing
/// test leaves nothing running.
struct RunLocal {
    child: Option<Child>,
    out: PathBuf,
    err: PathBuf,
    config: PathBuf,
    ports: Ports,
}

impl RunLocal {
    fn start(dir: &Path, config: &Path, ports: Ports, run: u32) -> RunLocal {
        let out = dir.join(format!("run{run}.stdout.log"));
        let err = dir.join(format!("run{run}.stderr.log"));
        let file = |p: &Path| File::create(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let child = Command::new("bash")
            .arg(workspace_root().join("scripts/run-local.sh"))
            .env("POOLRELAY_BIN", binary())
            .env("POOLRELAY_CONFIG", config)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(file(&out))
            .stderr(file(&err))
            // Not in the test's process group: signals meant for the script
            // must not reach the test runner, and vice versa.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start scripts/run-local.sh: {e}"));
        RunLocal {
            child: Some(child),
            out,
            err,
            config: config.to_path_buf(),
            ports,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).expect("script running")
    }

    fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn logs(&self) -> String {
        format!(
            "--- run-local.sh stdout (tail) ---\n{}\n--- run-local.sh stderr (tail) ---\n{}\n",
            file_tail(&self.out, 40),
            file_tail(&self.err, 40)
        )
    }

    fn stdout(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.out).unwrap_or_default()).into_owned()
    }

    fn sink_pids(&self) -> Vec<u32> {
        self.ports
            .sinks
            .iter()
            .flat_map(|a| pids_with_args(&["sink".into(), "--listen".into(), a.to_string()]))
            .collect()
    }

    fn relay_pids(&self) -> Vec<u32> {
        pids_with_args(&[
            "run".into(),
            "-c".into(),
            self.config.to_string_lossy().into_owned(),
        ])
    }

    fn all_addrs(&self) -> Vec<SocketAddr> {
        let p = &self.ports;
        let mut all = p.listeners.clone();
        all.push(p.admin);
        all.extend(&p.sinks);
        all
    }

    /// Waits until the relay's listeners, its admin API and both sinks accept.
    fn wait_started(&mut self) {
        for addr in self.all_addrs() {
            let ok = poll_until(STARTUP, POLL_INTERVAL, || {
                accepts_tcp(addr) || self.exited().is_some()
            });
            if let Some(status) = self.exited() {
                panic!(
                    "run-local.sh exited with {status} before {addr} accepted\n{}",
                    self.logs()
                );
            }
            assert!(
                ok,
                "nothing accepts on {addr} {STARTUP:?} after run-local.sh started\n{}",
                self.logs()
            );
        }
    }

    /// SIGTERM to the script alone, then: the script exits, no sink or relay
    /// process of it is left, and every port it used can be bound again.
    fn stop_and_check_clean(&mut self) {
        let pid = self.pid();
        kill_pid(pid, "TERM");
        let exited = poll_until(STOP, POLL_INTERVAL, || self.exited().is_some());
        assert!(
            exited,
            "run-local.sh did not exit within {STOP:?} of its SIGTERM\n{}",
            self.logs()
        );
        let mut left = (Vec::new(), Vec::new());
        let gone = poll_until(GONE, POLL_INTERVAL, || {
            left = (self.sink_pids(), self.relay_pids());
            left.0.is_empty() && left.1.is_empty()
        });
        assert!(
            gone,
            "after run-local.sh exited on SIGTERM, sink processes {:?} and relay processes {:?} \
             are still running\n{}",
            left.0,
            left.1,
            self.logs()
        );
        for addr in self.all_addrs() {
            assert!(
                poll_until(GONE, POLL_INTERVAL, || port_free(addr)),
                "{addr} is still taken after run-local.sh exited\n{}",
                self.logs()
            );
        }
    }
}

impl Drop for RunLocal {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for pid in self.relay_pids().into_iter().chain(self.sink_pids()) {
            kill_pid(pid, "KILL");
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
    }
}

#[test]
fn sigterm_to_run_local_stops_the_sinks_and_a_second_run_works() {
    let config = workspace_root().join("config/poolrelay.toml");
    let ports = read_ports(&config);
    for addr in ports
        .listeners
        .iter()
        .chain([&ports.admin])
        .chain(&ports.sinks)
    {
        assert!(
            port_free(*addr),
            "{addr} (from {}) is taken before the test starts: is a `make run` running?",
            config.display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("poolrelay-run-local-")
        .tempdir()
        .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));

    let mut first = RunLocal::start(dir.path(), &config, read_ports(&config), 1);
    first.wait_started();
    first.stop_and_check_clean();
    drop(first);

    // A second run gets both sinks (the ports are free) and relays mail.
    let mut second = RunLocal::start(dir.path(), &config, ports, 2);
    second.wait_started();
    let listen = second.ports.listeners[0];
    let mut client = SmtpClient::connect(listen)
        .unwrap_or_else(|e| panic!("second run: cannot connect to {listen}: {e}"));
    let id = unique_id("run-local");
    let sender = "owner-emergency@lists.example.org";
    let rcpt = "member@example.test";
    let reply = client
        .send_mail(
            sender,
            &[rcpt],
            &message(&id, sender, rcpt, "second run", "hello"),
        )
        .unwrap_or_else(|e| panic!("second run: sending through {listen}: {e}"));
    client.quit();
    assert_eq!(reply.code, 250, "second run: {reply}");
    // The emergency sink prints one line per message it received.
    let delivered = poll_until(Duration::from_secs(30), POLL_INTERVAL, || {
        second
            .stdout()
            .lines()
            .any(|l| l.contains("emergency") && l.contains(sender))
    });
    assert!(
        delivered,
        "second run: the emergency sink did not print the message from {sender}\n{}",
        second.logs()
    );
    second.stop_and_check_clean();
}
