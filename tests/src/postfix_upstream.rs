//! A throwaway Postfix instance as a real upstream MTA: its own
//! `config_directory`, `queue_directory` and `data_directory` under a
//! temporary directory, smtpd on one loopback port (master.cf), everything
//! relayed to `relayhost = [127.0.0.1]:PORT` (e.g. our sink), its log in a
//! file (`maillog_file`). Started with `postfix -c DIR start`; stopped by
//! SIGTERM to its master's PID (from `queue/pid/master.pid`) on drop.
//!
//! Needs root (the `postfix` command is reserved for the super-user) and the
//! Debian package postfix; without the binaries the test fails saying so.

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::command::run_with_deadline;
use crate::ports::{accepts_tcp, free_addr};
use crate::postfix::POSTFIX_MISSING;
use crate::process::{file_tail, is_root, keep_on_failure, new_tempdir, set_mode};
use crate::wait::{POLL_INTERVAL, poll_until};

/// The `postfix` command.
pub const POSTFIX: &str = "/usr/sbin/postfix";
/// Postfix's master daemon (must exist for `postfix start`).
pub const POSTFIX_MASTER: &str = "/usr/lib/postfix/sbin/master";

/// Options of [`PostfixUpstream::start`].
#[derive(Debug, Clone)]
pub struct PostfixOptions {
    /// Where Postfix relays everything (`relayhost = [ip]:port`).
    pub relayhost: SocketAddr,
    /// `myhostname` (shows in its Received headers).
    pub hostname: String,
    /// `smtpd_tls_cert_file` and `smtpd_tls_key_file`: offer STARTTLS
    /// (`smtpd_tls_security_level = may`).
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Its SMTP client's side towards the relayhost: STARTTLS required
    /// (`smtp_tls_security_level = encrypt`) and AUTH with these credentials
    /// (`smtp_sasl_auth_enable`, Cyrus SASL PLAIN/LOGIN).
    pub relayhost_auth: Option<RelayhostAuth>,
}

/// Credentials the throwaway Postfix gives its relayhost.
#[derive(Debug, Clone)]
pub struct RelayhostAuth {
    /// SASL user name.
    pub username: String,
    /// SASL password.
    pub password: String,
}

impl PostfixOptions {
    /// Relays to `relayhost`, host name `upstream.postfix.test`, no TLS.
    pub fn relaying_to(relayhost: SocketAddr) -> PostfixOptions {
        PostfixOptions {
            relayhost,
            hostname: "upstream.postfix.test".into(),
            tls: None,
            relayhost_auth: None,
        }
    }
}

/// A running throwaway Postfix.
pub struct PostfixUpstream {
    dir: TempDir,
    conf_dir: PathBuf,
    queue_dir: PathBuf,
    log_path: PathBuf,
    addr: SocketAddr,
    master_pid: Option<u32>,
}

fn uid_gid_of(user: &str) -> (u32, u32) {
    let passwd = fs::read_to_string("/etc/passwd").unwrap_or_default();
    for line in passwd.lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() > 3
            && f[0] == user
            && let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse())
        {
            return (u, g);
        }
    }
    panic!("user {user} is not in /etc/passwd: {POSTFIX_MISSING}");
}

fn group_exists(group: &str) -> bool {
    fs::read_to_string("/etc/group")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(':').next() == Some(group))
}

/// master.cf: smtpd on `addr` only, the usual internal services, no chroot.
fn master_cf(addr: SocketAddr) -> String {
    format!(
        "{addr} inet n - n - - smtpd\n\
         pickup    unix  n - n 60    1 pickup\n\
         cleanup   unix  n - n -     0 cleanup\n\
         qmgr      unix  n - n 300   1 qmgr\n\
         tlsmgr    unix  - - n 1000? 1 tlsmgr\n\
         rewrite   unix  - - n -     - trivial-rewrite\n\
         bounce    unix  - - n -     0 bounce\n\
         defer     unix  - - n -     0 bounce\n\
         trace     unix  - - n -     0 bounce\n\
         verify    unix  - - n -     1 verify\n\
         flush     unix  n - n 1000? 0 flush\n\
         proxymap  unix  - - n -     - proxymap\n\
         smtp      unix  - - n -     - smtp\n\
         relay     unix  - - n -     - smtp\n\
         showq     unix  n - n -     - showq\n\
         error     unix  - - n -     - error\n\
         retry     unix  - - n -     - error\n\
         discard   unix  - - n -     - discard\n\
         anvil     unix  - - n -     1 anvil\n\
         scache    unix  - - n -     1 scache\n\
         postlog   unix-dgram n - n - 1 postlogd\n"
    )
}

impl PostfixUpstream {
    /// Writes the instance's config, runs `postfix -c DIR start` and waits
    /// until its smtpd accepts. Panics (the test fails) when Postfix is not
    /// installed or the process is not root.
    pub fn start(opts: PostfixOptions) -> PostfixUpstream {
        for bin in [POSTFIX, POSTFIX_MASTER] {
            if !Path::new(bin).is_file() {
                panic!("{bin} is missing: {POSTFIX_MISSING}");
            }
        }
        if !is_root() {
            panic!(
                "a throwaway Postfix needs root (`postfix start` is reserved for the super-user); \
                 run the tests as root"
            );
        }
        if !group_exists("postdrop") {
            panic!("group postdrop is missing: {POSTFIX_MISSING}");
        }
        let (postfix_uid, postfix_gid) = uid_gid_of("postfix");

        let dir = new_tempdir("poolrelay-postfix-");
        // The postfix user must reach the queue and data directories.
        set_mode(dir.path(), 0o755);
        let conf_dir = dir.path().join("conf");
        let queue_dir = dir.path().join("queue");
        let data_dir = dir.path().join("data");
        for d in [&conf_dir, &queue_dir, &data_dir] {
            fs::create_dir_all(d).unwrap_or_else(|e| panic!("mkdir {}: {e}", d.display()));
            set_mode(d, 0o755);
        }
        std::os::unix::fs::chown(&data_dir, Some(postfix_uid), Some(postfix_gid))
            .unwrap_or_else(|e| panic!("chown postfix {}: {e}", data_dir.display()));
        let log_path = dir.path().join("postfix.log");
        let addr = free_addr();
        let mut main_cf = format!(
            "compatibility_level = 3.6\n\
             queue_directory = {queue}\n\
             data_directory = {data}\n\
             mail_owner = postfix\n\
             setgid_group = postdrop\n\
             inet_interfaces = loopback-only\n\
             inet_protocols = ipv4\n\
             myhostname = {host}\n\
             mydomain = postfix.test\n\
             myorigin = $mydomain\n\
             mydestination =\n\
             relayhost = [{relay_ip}]:{relay_port}\n\
             mynetworks = 127.0.0.0/8\n\
             smtpd_relay_restrictions = permit_mynetworks, reject\n\
             smtpd_recipient_restrictions = permit_mynetworks, reject\n\
             alias_maps =\n\
             alias_database =\n\
             local_recipient_maps =\n\
             smtp_dns_support_level = disabled\n\
             smtp_tls_security_level = none\n\
             maillog_file_prefixes = {dir}\n\
             maillog_file = {log}\n\
             biff = no\n\
             delay_warning_time = 0\n",
            queue = queue_dir.display(),
            data = data_dir.display(),
            host = opts.hostname,
            relay_ip = opts.relayhost.ip(),
            relay_port = opts.relayhost.port(),
            dir = dir.path().display(),
            log = log_path.display(),
        );
        if let Some((cert, key)) = &opts.tls {
            main_cf.push_str(&format!(
                "smtpd_tls_cert_file = {}\n\
                 smtpd_tls_key_file = {}\n\
                 smtpd_tls_security_level = may\n\
                 smtpd_tls_received_header = yes\n\
                 smtpd_tls_loglevel = 1\n",
                cert.display(),
                key.display()
            ));
        } else {
            main_cf.push_str("smtpd_tls_security_level = none\n");
        }
        if let Some(auth) = &opts.relayhost_auth {
            // Cyrus SASL's PLAIN and LOGIN live in libsasl2-modules.
            let plugins = [
                "/usr/lib/x86_64-linux-gnu/sasl2",
                "/usr/lib/aarch64-linux-gnu/sasl2",
            ];
            if !plugins.iter().any(|d| {
                Path::new(d).join("libplain.so.2").exists()
                    || Path::new(d).join("libplain.so").exists()
            }) {
                panic!(
                    "Cyrus SASL's PLAIN plugin is missing: install the Debian package libsasl2-modules (see .ci/run)"
                );
            }
            let passwords = conf_dir.join("sasl_passwd");
            fs::write(
                &passwords,
                format!(
                    "[{}]:{} {}:{}\n",
                    opts.relayhost.ip(),
                    opts.relayhost.port(),
                    auth.username,
                    auth.password
                ),
            )
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", passwords.display()));
            // Later lines win in main.cf: these replace "none" above.
            main_cf.push_str(&format!(
                "smtp_tls_security_level = encrypt\n\
                 smtp_tls_loglevel = 1\n\
                 smtp_sasl_auth_enable = yes\n\
                 smtp_sasl_password_maps = texthash:{}\n\
                 smtp_sasl_security_options = noanonymous\n\
                 smtp_sasl_tls_security_options = noanonymous\n",
                passwords.display()
            ));
        }
        fs::write(conf_dir.join("main.cf"), main_cf)
            .unwrap_or_else(|e| panic!("cannot write main.cf: {e}"));
        fs::write(conf_dir.join("master.cf"), master_cf(addr))
            .unwrap_or_else(|e| panic!("cannot write master.cf: {e}"));

        let mut upstream = PostfixUpstream {
            dir,
            conf_dir,
            queue_dir,
            log_path,
            addr,
            master_pid: None,
        };
        let mut cmd = Command::new(POSTFIX);
        cmd.arg("-c").arg(&upstream.conf_dir).arg("start");
        let out = run_with_deadline(
            cmd,
            &format!("postfix -c {} start", upstream.conf_dir.display()),
            Duration::from_secs(60),
        );
        // The master writes its PID file once it runs; read it even when
        // start failed, so drop can stop whatever did start.
        let pid_file = upstream.queue_dir.join("pid/master.pid");
        poll_until(Duration::from_secs(10), POLL_INTERVAL, || {
            upstream.read_master_pid(&pid_file)
        });
        if !out.status.success() {
            panic!(
                "postfix -c {} start failed: {out}\n{}",
                upstream.conf_dir.display(),
                upstream.logs()
            );
        }
        let end = Instant::now() + Duration::from_secs(30);
        while !accepts_tcp(addr) {
            if Instant::now() >= end {
                panic!(
                    "the throwaway Postfix does not accept on {addr} after 30s\n{}",
                    upstream.logs()
                );
            }
            std::thread::sleep(POLL_INTERVAL);
        }
        if upstream.master_pid.is_none() {
            panic!(
                "the throwaway Postfix runs but {} has no PID\n{}",
                pid_file.display(),
                upstream.logs()
            );
        }
        upstream
    }

    fn read_master_pid(&mut self, pid_file: &Path) -> bool {
        if let Some(pid) = fs::read_to_string(pid_file)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
        {
            self.master_pid = Some(pid);
            return true;
        }
        false
    }

    /// Where its smtpd listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its master's PID.
    pub fn master_pid(&self) -> Option<u32> {
        self.master_pid
    }

    /// Its maillog.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Messages in its queue (incoming, active, deferred, hold, maildrop).
    pub fn queued(&self) -> usize {
        ["incoming", "active", "deferred", "hold", "maildrop"]
            .iter()
            .map(|q| count_files(&self.queue_dir.join(q)))
            .sum()
    }

    /// The tail of its maillog, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- throwaway postfix {} (config {}) maillog (tail) ---\n{}\n",
            self.addr,
            self.conf_dir.display(),
            file_tail(&self.log_path, 40)
        )
    }
}

fn count_files(dir: &Path) -> usize {
    let Ok(rd) = fs::read_dir(dir) else { return 0 };
    rd.filter_map(Result::ok)
        .map(|e| {
            let p = e.path();
            if p.is_dir() { count_files(&p) } else { 1 }
        })
        .sum()
}

/// True while `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            // "pid (comm) S ...": the state follows the last ')'.
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next());
            state != Some("Z")
        }
        Err(_) => false,
    }
}

fn signal(sig: &str, pid: u32) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

impl Drop for PostfixUpstream {
    fn drop(&mut self) {
        if let Some(pid) = self.master_pid.take() {
            // Only signal the PID if it is still Postfix's master.
            let is_master = fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .map(|c| c.contains("master"))
                .unwrap_or(false);
            if is_master {
                // SIGTERM: the master stops its children and exits.
                signal("TERM", pid);
                if !poll_until(Duration::from_secs(10), POLL_INTERVAL, || !alive(pid)) {
                    signal("KILL", pid);
                }
            }
        }
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        keep_on_failure(&mut self.dir, "postfix");
    }
}
