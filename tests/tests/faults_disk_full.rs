//! A full disk, for real: the spool lives on a small tmpfs mounted for the
//! test (CI runs as root; without the right to mount, the test fails and
//! says so). The relay must answer 452 4.3.1 rather than 250 while it cannot
//! write, report not-ready, and come back by itself once space returns.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use poolrelay_tests::{
    Relay, Sink, SmtpError, http_get, message, new_tempdir, poll_until, unique_id,
};

const DEADLINE: Duration = Duration::from_secs(20);

/// A tmpfs of `size` mounted on a fresh directory; unmounted on drop.
struct Tmpfs {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = new_tempdir("poolrelay-tmpfs-");
        let path = dir.path().join("fs");
        std::fs::create_dir(&path).expect("create the mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0755"),
                "tmpfs",
            ])
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a {size} tmpfs to fill a disk for real and needs root \
             (CAP_SYS_ADMIN) and the `mount` command: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { _dir: dir, path }
    }

    /// Writes zeros to `name` until the filesystem is full (or `limit` bytes).
    fn fill(&self, name: &str, limit: u64) -> PathBuf {
        let file = self.path.join(name);
        let mut f = File::create(&file).expect("create the filler");
        let chunk = vec![0u8; 64 * 1024];
        let mut written = 0u64;
        while written < limit {
            match f.write(&chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => written += n as u64,
            }
        }
        let _ = f.sync_all();
        file
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.path).status();
    }
}

fn config(
    relay: &poolrelay_tests::RelaySetup,
    spool: &Path,
    upstream: std::net::SocketAddr,
    min_free: &str,
) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{}\"\nspool_min_free = \"{min_free}\"\n\n\
         [admin]\naddress = \"{}\"\n\n{}[defaults]\nlist_pool = \"A\"\nretry = [\"1s\"]\n\n[pool.A]\n\n\
         [[upstream]]\nhost = \"{upstream}\"\n",
        spool.display(),
        relay.admin,
        relay.listener("")
    )
}

/// About `kb` KB of text that does not compress (the spool's journal
/// compresses values, so a repeated letter would fit on a full disk).
fn noise(kb: usize, seed: u64) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut x = seed | 1;
    let mut out = String::with_capacity(kb * 1024);
    for _ in 0..kb * 16 {
        for _ in 0..64 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            out.push(ALPHABET[(x % 64) as usize] as char);
        }
        out.push('\n');
    }
    out
}

/// Sends one message of about `body_kb` KB; the reply to the final dot, or
/// the refusal.
fn try_send(relay: &Relay, tag: &str, body_kb: usize) -> (String, Result<u16, String>) {
    let id = unique_id(tag);
    let seed = id.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    let body = noise(body_kb, seed);
    let msg = message(
        &id,
        "owner-list@lists.test",
        "member@example.test",
        tag,
        &body,
    );
    let mut c = relay.client();
    let result = match c.send_mail("owner-list@lists.test", &["member@example.test"], &msg) {
        Ok(r) => Ok(r.code),
        Err(SmtpError::Rejected { reply, .. }) => Err(format!("{} {}", reply.code, reply.text)),
        Err(e) => Err(e.to_string()),
    };
    c.quit();
    (id, result)
}

fn readyz(relay: &Relay) -> u16 {
    http_get(relay.admin_addr(), "/readyz").map_or(0, |r| r.status)
}

fn delivered_counts(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for m in sink.messages() {
        if let Some(id) = m.message_id() {
            *counts.entry(id).or_insert(0) += 1;
        }
    }
    counts
}

#[test]
fn a_full_disk_answers_452_and_the_relay_recovers_by_itself_when_space_returns() {
    let fs = Tmpfs::mount("24m");
    let sink = Sink::start();
    let spool = fs.path.join("spool");
    let relay = Relay::start(|s| config(s, &spool, sink.addr(), "0"));
    let (before, r) = try_send(&relay, "before-full", 4);
    assert_eq!(r, Ok(250), "{}", relay.logs());
    sink.wait_for_message_id(&before, DEADLINE);

    let filler = fs.fill("filler", u64::MAX);
    // Messages bigger than what is left cannot be written: never a 250.
    let mut refused = 0;
    for i in 0..5 {
        let (_, r) = try_send(&relay, &format!("while-full-{i}"), 512);
        match r {
            Ok(code) => panic!(
                "a message was acknowledged ({code}) on a full disk\n{}",
                relay.logs()
            ),
            Err(reply) => {
                assert!(reply.starts_with("452"), "refusal on a full disk: {reply}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 5);
    assert!(
        poll_until(DEADLINE, Duration::from_millis(50), || readyz(&relay)
            == 503),
        "/readyz should say 503 while the spool cannot be written\n{}",
        relay.logs()
    );

    std::fs::remove_file(&filler).expect("remove the filler");
    // Space is back: within seconds, without a restart, mail is taken again.
    let mut after = None;
    let recovered = poll_until(DEADLINE, Duration::from_millis(200), || {
        let (id, r) = try_send(&relay, "after-full", 4);
        if r == Ok(250) {
            after = Some(id);
            true
        } else {
            false
        }
    });
    assert!(
        recovered,
        "no 250 within {DEADLINE:?} after space returned\n{}",
        relay.logs()
    );
    assert!(
        poll_until(DEADLINE, Duration::from_millis(50), || readyz(&relay)
            == 200),
        "/readyz should be 200 again"
    );
    assert!(
        relay.log_count("spool reopened after a write failure") >= 1,
        "the store failed and must have been reopened in-process\n{}",
        relay.logs()
    );
    let after = after.unwrap_or_default();
    sink.wait_for_message_id(&after, DEADLINE);
    // Nothing refused was delivered, nothing acknowledged twice.
    let counts = delivered_counts(&sink);
    assert_eq!(counts.get(&before), Some(&1), "{counts:?}");
    assert_eq!(counts.get(&after), Some(&1), "{counts:?}");
    assert_eq!(
        counts.len(),
        2,
        "only the two acknowledged messages may arrive: {counts:?}\n{}",
        relay.logs()
    );
}

#[test]
fn below_spool_min_free_new_mail_gets_452_before_anything_is_written() {
    let fs = Tmpfs::mount("32m");
    let sink = Sink::start();
    let spool = fs.path.join("spool");
    let relay = Relay::start(|s| config(s, &spool, sink.addr(), "8MB"));
    let (before, r) = try_send(&relay, "above-floor", 2);
    assert_eq!(r, Ok(250), "{}", relay.logs());
    sink.wait_for_message_id(&before, DEADLINE);

    // Leave about 4 MB free: below the 8 MB floor, yet room to write.
    let filler = fs.fill("filler", 24 << 20);
    let (small, r) = try_send(&relay, "below-floor", 1);
    let refusal = r.expect_err("a message was acknowledged below the floor");
    assert!(refusal.starts_with("452"), "{refusal}");
    assert!(
        poll_until(DEADLINE, Duration::from_millis(50), || readyz(&relay)
            == 503),
        "/readyz should say 503 below the floor"
    );

    std::fs::remove_file(&filler).expect("remove the filler");
    let recovered = poll_until(DEADLINE, Duration::from_millis(200), || {
        readyz(&relay) == 200
    });
    assert!(
        recovered,
        "/readyz still not 200 after space returned\n{}",
        relay.logs()
    );
    let (after, r) = try_send(&relay, "above-floor-again", 1);
    assert_eq!(r, Ok(250), "{}", relay.logs());
    sink.wait_for_message_id(&after, DEADLINE);
    let counts = delivered_counts(&sink);
    assert!(
        !counts.contains_key(&small),
        "the refused message was delivered: {counts:?}"
    );
}
