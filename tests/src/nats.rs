//! A JetStream cluster of real `nats-server` processes on loopback, for the
//! replicated spool's tests and benchmarks.
//!
//! [`NatsCluster::start`] starts `n` servers (each with its own store
//! directory and log in the cluster's temporary directory, routes to all
//! the others) and waits until JetStream has a meta leader. Servers are
//! addressed by index (`0..n`); each can be stopped (SIGTERM), killed
//! (SIGKILL) and restarted with the same name, ports and store. Everything
//! is killed by PID on drop. A missing `nats-server` fails the test saying
//! what to install.

use std::fs;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::command::run_with_deadline;
use crate::http::http_get;
use crate::ports::free_addr;
use crate::process::{LOG_TAIL_LINES, Proc, file_tail, keep_on_failure, new_tempdir, wait_started};
use crate::wait::{POLL_INTERVAL, poll_until};

/// The server binary: `$NATS_SERVER`, else `/usr/sbin/nats-server`, else
/// `nats-server` on the `PATH`.
pub fn nats_server_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("NATS_SERVER").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    let debian = Path::new("/usr/sbin/nats-server");
    if debian.is_file() {
        return debian.to_path_buf();
    }
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nats-server"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!("nats-server is not installed: apt-get install nats-server (or set NATS_SERVER)")
    })
}

/// How long a cluster gets to elect its JetStream meta leader.
pub const LEADER_DEADLINE: Duration = Duration::from_secs(30);

/// One server of a [`NatsCluster`].
struct Server {
    name: String,
    client: SocketAddr,
    monitor: SocketAddr,
    config: PathBuf,
    log: PathBuf,
    proc: Proc,
}

/// A running JetStream cluster; servers are killed by PID on drop.
pub struct NatsCluster {
    dir: TempDir,
    servers: Vec<Server>,
}

impl NatsCluster {
    /// Starts `n` clustered JetStream servers (3 for R3 streams) and waits
    /// until the cluster has a meta leader.
    pub fn start(n: usize) -> NatsCluster {
        let binary = nats_server_binary();
        let dir = new_tempdir("poolrelay-nats-");
        let routes: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect();
        let mut servers = Vec::new();
        for (i, route) in routes.iter().enumerate() {
            let name = format!("n{}", i + 1);
            let client = free_addr();
            let monitor = free_addr();
            let store = dir.path().join(format!("{name}-store"));
            let others: Vec<String> = routes
                .iter()
                .filter(|r| *r != route)
                .map(|r| format!("\"nats-route://{r}\""))
                .collect();
            let config = dir.path().join(format!("{name}.conf"));
            let text = format!(
                "server_name: \"{name}\"\nhost: \"{ip}\"\nport: {port}\nhttp: \"{monitor}\"\n\
                 jetstream {{ store_dir: \"{store}\" }}\n\
                 cluster {{ name: \"poolrelay-test\", listen: \"{route}\", routes: [{others}] }}\n",
                ip = client.ip(),
                port = client.port(),
                store = store.display(),
                others = others.join(", "),
            );
            fs::write(&config, text)
                .unwrap_or_else(|e| panic!("cannot write {}: {e}", config.display()));
            servers.push(Server {
                log: dir.path().join(format!("{name}.log")),
                name,
                client,
                monitor,
                config,
                proc: Proc { child: None },
            });
        }
        let mut cluster = NatsCluster { dir, servers };
        for i in 0..n {
            cluster.spawn(i, &binary);
        }
        cluster.wait_meta_leader(LEADER_DEADLINE);
        cluster
    }

    fn spawn(&mut self, i: usize, binary: &Path) {
        let server = &mut self.servers[i];
        let mut cmd = Command::new(binary);
        cmd.arg("-c")
            .arg(&server.config)
            .arg("-l")
            .arg(&server.log)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        server.proc = Proc::spawn(cmd, "nats-server");
        let what = format!("nats-server {}", server.name);
        let log = server.log.clone();
        wait_started(
            &mut server.proc,
            &[server.client, server.monitor],
            &what,
            || file_tail(&log, LOG_TAIL_LINES),
        );
    }

    /// Number of servers (running or not).
    pub fn len(&self) -> usize {
        self.servers.len()
    }

    /// Whether the cluster has no server at all.
    pub fn is_empty(&self) -> bool {
        self.servers.is_empty()
    }

    /// The client URLs of all servers, `nats://IP:PORT`.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://{}", s.client))
            .collect()
    }

    /// The client URLs as a TOML array, for `[spool] servers = ...`.
    pub fn servers_toml(&self) -> String {
        let quoted: Vec<String> = self.urls().iter().map(|u| format!("\"{u}\"")).collect();
        format!("[{}]", quoted.join(", "))
    }

    /// The server name of index `i` (`n1`, `n2`, ...).
    pub fn name(&self, i: usize) -> &str {
        &self.servers[i].name
    }

    /// The PID of server `i`, when it runs.
    pub fn pid(&self, i: usize) -> Option<u32> {
        self.servers[i].proc.pid()
    }

    /// Stops server `i` gracefully (SIGTERM by PID) and waits until it exited.
    pub fn stop(&mut self, i: usize) {
        let Some(pid) = self.servers[i].proc.pid() else {
            return;
        };
        let mut cmd = Command::new("kill");
        cmd.arg("-s").arg("TERM").arg(pid.to_string());
        run_with_deadline(cmd, &format!("kill -s TERM {pid}"), Duration::from_secs(10));
        let name = self.servers[i].name.clone();
        let proc = &mut self.servers[i].proc;
        if !poll_until(Duration::from_secs(15), POLL_INTERVAL, || {
            proc.exited().is_some()
        }) {
            panic!("nats-server {name} did not exit within 15 s of SIGTERM");
        }
        proc.kill();
    }

    /// Kills server `i` (SIGKILL by PID) and reaps it.
    pub fn kill9(&mut self, i: usize) {
        self.servers[i].proc.kill();
    }

    /// Starts server `i` again with its name, ports and store (kills a
    /// still-running one first).
    pub fn restart(&mut self, i: usize) {
        self.servers[i].proc.kill();
        self.spawn(i, &nats_server_binary());
    }

    /// Publishes `payload` on `subject` through server 0 with the plain
    /// NATS protocol and waits for JetStream's ack (a stream stored it):
    /// writes what no relay would, such as an undecodable envelope. The
    /// stream sequence it got.
    pub fn publish_acked(&self, subject: &str, payload: &[u8]) -> u64 {
        let addr = self.servers[0].client;
        let mut conn = std::net::TcpStream::connect(addr)
            .unwrap_or_else(|e| panic!("connect to nats-server at {addr}: {e}"));
        conn.set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap_or_else(|e| panic!("set a read timeout: {e}"));
        let mut frame = format!(
            "CONNECT {{\"verbose\":false,\"pedantic\":false}}\r\nSUB _INBOX.test 1\r\nPUB {subject} _INBOX.test {}\r\n",
            payload.len()
        )
        .into_bytes();
        frame.extend_from_slice(payload);
        frame.extend_from_slice(b"\r\n");
        conn.write_all(&frame)
            .unwrap_or_else(|e| panic!("publish to {subject}: {e}"));
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&seen).to_string();
            if let Some(at) = text.find("\"seq\":") {
                let rest = text[at + 6..].trim_start();
                let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
                // Only once the number is whole (followed by more JSON).
                if rest.len() > digits.len()
                    && let Ok(seq) = digits.parse()
                {
                    return seq;
                }
            }
            if text.contains("\"error\"") || text.contains("-ERR") {
                panic!("publishing to {subject} failed: {text}");
            }
            match conn.read(&mut buf) {
                Ok(0) => panic!("nats-server closed the connection: {text}"),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
                Err(e) => panic!("no JetStream ack for {subject}: {e}; got {text}"),
            }
        }
    }

    /// `/jsz` of server `i` as JSON (`query` like `"streams=true"`), or
    /// `None` when it does not answer.
    pub fn jsz(&self, i: usize, query: &str) -> Option<serde_json::Value> {
        let response = http_get(self.servers[i].monitor, &format!("/jsz?{query}")).ok()?;
        if response.status != 200 {
            return None;
        }
        serde_json::from_str(&response.body).ok()
    }

    /// The name of the JetStream meta leader as running server `i` sees it.
    fn meta_leader_seen_by(&self, i: usize) -> Option<String> {
        let jsz = self.jsz(i, "")?;
        let leader = jsz.get("meta_cluster")?.get("leader")?.as_str()?;
        (!leader.is_empty()).then(|| leader.to_string())
    }

    /// Waits until every running server sees the same meta leader; panics
    /// with the servers' logs when `deadline` passes first.
    pub fn wait_meta_leader(&self, deadline: Duration) {
        let ok = poll_until(deadline, Duration::from_millis(100), || {
            let seen: Vec<Option<String>> = (0..self.len())
                .filter(|&i| self.pid(i).is_some())
                .map(|i| self.meta_leader_seen_by(i))
                .collect();
            !seen.is_empty() && seen.iter().all(|l| l.is_some() && *l == seen[0])
        });
        if !ok {
            panic!(
                "the JetStream cluster has no meta leader after {deadline:?}\n{}",
                self.logs()
            );
        }
    }

    /// How many messages stream `stream` holds, as its leader reports;
    /// `None` when no running server leads it.
    pub fn stream_messages(&self, stream: &str) -> Option<u64> {
        let leader = self.stream_leader(stream)?;
        let jsz = self.jsz(leader, "accounts=true&streams=true")?;
        let accounts = jsz.get("account_details")?.as_array()?;
        accounts
            .iter()
            .filter_map(|a| a.get("stream_detail")?.as_array())
            .flatten()
            .find(|s| s.get("name").and_then(|n| n.as_str()) == Some(stream))?
            .get("state")?
            .get("messages")?
            .as_u64()
    }

    /// The index of the server leading stream `stream`, from the running
    /// servers' `/jsz?accounts=true&streams=true`; `None` when none leads it.
    pub fn stream_leader(&self, stream: &str) -> Option<usize> {
        for i in (0..self.len()).filter(|&i| self.pid(i).is_some()) {
            let Some(jsz) = self.jsz(i, "accounts=true&streams=true") else {
                continue;
            };
            let accounts = jsz.get("account_details").and_then(|a| a.as_array());
            for account in accounts.into_iter().flatten() {
                let streams = account.get("stream_detail").and_then(|s| s.as_array());
                for s in streams.into_iter().flatten() {
                    if s.get("name").and_then(|n| n.as_str()) != Some(stream) {
                        continue;
                    }
                    let leader = s
                        .get("cluster")
                        .and_then(|c| c.get("leader"))
                        .and_then(|l| l.as_str());
                    if let Some(leader) = leader.filter(|l| !l.is_empty()) {
                        return self.servers.iter().position(|s| s.name == leader);
                    }
                }
            }
        }
        None
    }

    /// The names of the clients connected to server `i` (its `/connz`);
    /// empty when it does not answer.
    pub fn client_names(&self, i: usize) -> Vec<String> {
        let Ok(response) = http_get(self.servers[i].monitor, "/connz") else {
            return Vec::new();
        };
        let Ok(connz) = serde_json::from_str::<serde_json::Value>(&response.body) else {
            return Vec::new();
        };
        let connections = connz.get("connections").and_then(|c| c.as_array());
        connections
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name")?.as_str().map(str::to_string))
            .collect()
    }

    /// The tail of every server's log, for failure messages.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| format!("--- {} ---\n{}", s.name, file_tail(&s.log, LOG_TAIL_LINES)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.proc.kill();
        }
        keep_on_failure(&mut self.dir, "nats cluster");
    }
}
