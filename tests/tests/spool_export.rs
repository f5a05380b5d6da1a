//! `poolrelay spool export` / `import`: a stopped relay's queue moves to a
//! fresh spool through a file (or a pipe) and every message is delivered
//! from there exactly once, with its attempts and retry time kept; the
//! export never changes the old spool; importing twice, or again after a
//! damaged file or a kill -9 stopped an import, never queues a message
//! twice; a damaged or truncated file is refused naming the record; a
//! running relay's spool is refused; a queue goes from the embedded spool
//! to a JetStream cluster and back unchanged, and each side delivers it
//! once.

use std::collections::BTreeSet;
use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use poolrelay_tests::admin::{pool_messages, queue_ok};
use poolrelay_tests::ledger::id_counts;
use poolrelay_tests::nats::NatsCluster;
use poolrelay_tests::{
    CommandOutput, Relay, RelaySetup, Sink, SinkOptions, binary, free_addr, new_tempdir,
    poll_until, poolrelay, run_with_deadline, toml_str,
};

const DEADLINE: Duration = Duration::from_secs(60);
const SENDER: &str = "owner-list@lists.test";
const RCPT: &str = "member@example.test";

/// Pools A (where SMTP mail goes) and B (loaded directly); one upstream; a
/// deferred message waits an hour, so it stays deferred unless flushed.
fn config(s: &RelaySetup, upstream: SocketAddr) -> String {
    format!(
        "{}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n[pool.B]\n\n\
         [[upstream]]\nhost = \"{upstream}\"\n",
        s.head(),
        s.listener("")
    )
}

/// `poolrelay spool ARGS`.
fn spool(args: &[&str]) -> CommandOutput {
    let mut all = vec!["spool"];
    all.extend_from_slice(args);
    poolrelay(&all, DEADLINE)
}

/// `poolrelay spool ARGS`; panics unless it exits 0.
fn spool_ok(args: &[&str]) -> CommandOutput {
    let out = spool(args);
    assert!(out.status.success(), "poolrelay spool {args:?}:\n{out}");
    out
}

/// `poolrelay spool ARGS`; panics unless it exits 1; its stderr.
fn spool_refused(args: &[&str]) -> String {
    let out = spool(args);
    assert_eq!(
        out.status.code(),
        Some(1),
        "poolrelay spool {args:?}:\n{out}"
    );
    out.stderr
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 temporary path")
}

/// SIGTERM and wait for the exit: a graceful stop.
fn stop(relay: &mut Relay) {
    relay.signal("TERM");
    let status = relay.wait_exit(Duration::from_secs(40));
    assert!(
        status.is_some_and(|s| s.success()),
        "the relay did not stop on SIGTERM: {status:?}\n{}",
        relay.logs()
    );
}

/// A relay on an empty spool, stopped: the target of an import, started
/// again with [`Relay::restart`].
fn stopped_target(upstream: SocketAddr) -> Relay {
    let mut target = Relay::start(|s| config(s, upstream));
    stop(&mut target);
    target
}

/// The summary line of `pool` (POOL MESSAGES PENDING BYTES) as numbers.
fn summary_row(text: &str, pool: &str) -> Vec<u64> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|w| w.first() == Some(&pool))
        .unwrap_or_else(|| panic!("no summary line for {pool} in:\n{text}"))[1..]
        .iter()
        .map(|n| {
            n.parse()
                .unwrap_or_else(|e| panic!("{n:?}: {e} in:\n{text}"))
        })
        .collect()
}

/// The Message-IDs of `n` messages loaded with prefix `prefix`.
fn loaded_ids(prefix: &str, n: u64) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}-{i}@load.test")).collect()
}

/// Asserts that the sink got each of `expected` exactly once and nothing else.
fn assert_delivered_once(sink: &Sink, expected: &BTreeSet<String>, relay: &Relay) {
    let counts = id_counts(sink.message_ids());
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "delivered more than once: {twice:?}\n{}",
        relay.logs()
    );
    let got: BTreeSet<String> = counts.into_keys().collect();
    let missing: Vec<_> = expected.difference(&got).collect();
    let extra: Vec<_> = got.difference(expected).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "missing {missing:?}, never sent {extra:?}\n{}",
        relay.logs()
    );
}

#[test]
fn a_queue_moves_to_a_fresh_spool_keeping_attempts_and_is_delivered_once() {
    // The old relay: its upstream answers 451, so pool A's mail is tried
    // once and deferred for an hour; pool B is loaded while it is stopped.
    let refusing = Sink::start_with(SinkOptions {
        reply: Some(451),
        ..SinkOptions::default()
    });
    let mut old = Relay::start(|s| config(s, refusing.addr()));
    let mut expected = BTreeSet::new();
    for i in 0..20 {
        expected.insert(
            old.send_tagged(SENDER, &[RCPT], &format!("moved-{i}"))
                .message_id,
        );
    }
    old.wait_until("20 messages of pool A tried once", DEADLINE, || {
        let listed = pool_messages(&old, "A");
        let all = listed.as_array().cloned().unwrap_or_default();
        all.len() == 20 && all.iter().all(|m| m["attempts"] == 1)
    });
    stop(&mut old);
    old.load_spool("B", 300, "loaded", &[]);
    expected.extend(loaded_ids("loaded", 300));

    let files = new_tempdir("poolrelay-export-");
    let file = files.path().join("queue.export");
    let config = path_str(old.config_path()).to_string();
    let exported = spool_ok(&["export", "-c", &config, path_str(&file)]);
    assert_eq!(
        summary_row(&exported.stdout, "A")[..2],
        [20, 20],
        "{exported}"
    );
    assert_eq!(
        summary_row(&exported.stdout, "B")[..2],
        [300, 300],
        "{exported}"
    );
    assert_eq!(summary_row(&exported.stdout, "total")[0], 320, "{exported}");
    // The old spool is unchanged: exporting again says the same.
    let again = spool_ok(&[
        "export",
        "-c",
        &config,
        path_str(&files.path().join("again")),
    ]);
    assert_eq!(
        summary_row(&again.stdout, "total"),
        summary_row(&exported.stdout, "total")
    );
    // An existing file is never overwritten.
    let error = spool_refused(&["export", "-c", &config, path_str(&file)]);
    assert!(error.contains("cannot create"), "{error}");

    let sink = Sink::start();
    let mut new = stopped_target(sink.addr());
    let target = path_str(new.config_path()).to_string();
    let checked = spool_ok(&["import", "-c", &target, "--check", path_str(&file)]);
    assert!(checked.stdout.contains("every record checked"), "{checked}");
    let imported = spool_ok(&["import", "-c", &target, path_str(&file)]);
    assert!(
        imported
            .stdout
            .contains("320 messages stored, 0 already in the spool"),
        "{imported}"
    );
    assert_eq!(
        summary_row(&imported.stdout, "total"),
        summary_row(&exported.stdout, "total")
    );
    let twice = spool_ok(&["import", "-c", &target, path_str(&file)]);
    assert!(
        twice
            .stdout
            .contains("0 messages stored, 320 already in the spool"),
        "{twice}"
    );

    // Pool B is delivered at once; pool A keeps its attempt and its retry
    // time an hour away, so it waits.
    new.restart();
    sink.wait_for_count(300, DEADLINE);
    let a = pool_messages(&new, "A");
    let a = a.as_array().cloned().unwrap_or_default();
    assert_eq!(a.len(), 20, "{a:?}\n{}", new.logs());
    for m in &a {
        assert_eq!(m["attempts"], 1, "{m}");
        assert!(
            m["next_attempt_in_seconds"].as_f64().unwrap_or(0.0) > 3000.0,
            "still deferred by its old retry time: {m}"
        );
    }
    assert_eq!(
        sink.count(),
        300,
        "deferred mail stays deferred\n{}",
        new.logs()
    );
    queue_ok(&new, &["flush", "--pool", "A"]);
    sink.wait_for_count(320, DEADLINE);
    new.wait_until("the queue to be empty", DEADLINE, || {
        pool_messages(&new, "A")
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert_delivered_once(&sink, &expected, &new);
}

#[test]
fn a_queue_piped_from_a_killed_relay_is_delivered_once() {
    // The upstream is down: the mail waits in the old spool, untried.
    let mut old = Relay::start(|s| config(s, free_addr()));
    let mut expected = BTreeSet::new();
    for i in 0..30 {
        expected.insert(
            old.send_tagged(SENDER, &[RCPT], &format!("killed-{i}"))
                .message_id,
        );
    }
    old.kill9();

    let sink = Sink::start();
    let mut new = stopped_target(sink.addr());
    // Standard output to standard input.
    let mut pipe = Command::new("bash");
    pipe.arg("-c")
        .arg(r#"set -eo pipefail; "$0" spool export -c "$1" - | "$0" spool import -c "$2" -"#)
        .arg(binary())
        .arg(old.config_path())
        .arg(new.config_path());
    let out = run_with_deadline(pipe, "spool export - | spool import -", DEADLINE);
    assert!(out.status.success(), "{out}");
    assert!(out.stdout.contains("30 messages stored"), "{out}");
    assert!(
        out.stderr.contains("exported 30 messages"),
        "the export's summary goes to stderr: {out}"
    );

    new.restart();
    sink.wait_for_count(30, DEADLINE);
    new.wait_until("the queue to be empty", DEADLINE, || {
        pool_messages(&new, "A")
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert_delivered_once(&sink, &expected, &new);
}

#[test]
fn a_running_relays_spool_is_refused() {
    let mut relay = Relay::start(|s| config(s, free_addr()));
    relay.send_tagged(SENDER, &[RCPT], "running");
    let config = path_str(relay.config_path()).to_string();
    let out = new_tempdir("poolrelay-export-");
    let file = out.path().join("x");
    let error = spool_refused(&["export", "-c", &config, path_str(&file)]);
    assert!(error.contains("stop it first"), "{error}");
    assert!(!file.exists(), "nothing written");
    let error = spool_refused(&["import", "-c", &config, "/dev/null"]);
    assert!(error.contains("stop it first"), "{error}");

    // Another config naming the same spool, another admin address: the
    // store's lock refuses it.
    let spool_dir = relay.dir().join("spool");
    let other = out.path().join("other.toml");
    std::fs::write(
        &other,
        format!(
            "[server]\nspool_dir = {}\n[admin]\naddress = \"{}\"\n[[listener]]\naddress = \"{}\"\n",
            toml_str(path_str(&spool_dir)),
            free_addr(),
            free_addr()
        ),
    )
    .expect("write config");
    let error = spool_refused(&["export", "-c", path_str(&other), path_str(&file)]);
    assert!(error.contains("in use by another process"), "{error}");
    assert!(!file.exists(), "nothing written");
    stop(&mut relay);
    // Stopped, the same config exports.
    let exported = spool_ok(&["export", "-c", path_str(&other), path_str(&file)]);
    assert_eq!(summary_row(&exported.stdout, "total")[0], 1, "{exported}");
}

/// Copies `file` to `name` in its directory, changed by `change`.
fn damaged_copy(file: &Path, name: &str, change: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(file).expect("read the export");
    change(&mut bytes);
    let copy = file.with_file_name(name);
    std::fs::write(&copy, bytes).expect("write the copy");
    copy
}

#[test]
fn a_damaged_export_is_refused_naming_the_record_and_a_good_one_completes_the_import() {
    let mut old = Relay::start(|s| config(s, free_addr()));
    stop(&mut old);
    old.load_spool("B", 200, "damaged", &[]);
    let files = new_tempdir("poolrelay-export-");
    let file = files.path().join("queue.export");
    spool_ok(&["export", "-c", path_str(old.config_path()), path_str(&file)]);
    let len = std::fs::metadata(&file).expect("the export").len() as usize;

    let sink = Sink::start();
    let mut new = stopped_target(sink.addr());
    let target = path_str(new.config_path()).to_string();

    let truncated = damaged_copy(&file, "truncated", |b| b.truncate(len / 2));
    let error = spool_refused(&["import", "-c", &target, "--check", path_str(&truncated)]);
    assert!(error.contains("truncated"), "{error}");
    let error = spool_refused(&["import", "-c", &target, path_str(&truncated)]);
    assert!(
        error.contains("truncated") && error.contains("inside record"),
        "{error}"
    );
    let stored_first: u64 = error
        .split("import stopped: ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of stored messages in: {error}"));
    assert!(stored_first > 0 && stored_first < 200, "{error}");

    let flipped = damaged_copy(&file, "flipped", |b| b[len * 3 / 4] ^= 0x20);
    let error = spool_refused(&["import", "-c", &target, path_str(&flipped)]);
    assert!(
        error.contains("record ") && error.contains("checksum") && error.contains("damaged"),
        "{error}"
    );
    let error = spool_refused(&["import", "-c", &target, "/dev/null"]);
    assert!(error.contains("not a poolrelay spool export"), "{error}");

    // The good file completes the queue: what is there already is skipped.
    let imported = spool_ok(&["import", "-c", &target, path_str(&file)]);
    let row = summary_row(&imported.stdout, "total");
    assert_eq!(row[0], 200, "{imported}");
    let stored: u64 = imported
        .stdout
        .lines()
        .find_map(|l| l.split(": ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of stored messages in: {imported}"));
    assert!(stored < 200 && stored + stored_first <= 200, "{imported}");
    assert!(
        imported.stdout.contains("already in the spool"),
        "{imported}"
    );

    new.restart();
    sink.wait_for_count(200, DEADLINE);
    new.wait_until("the queue to be empty", DEADLINE, || {
        pool_messages(&new, "B")
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert_delivered_once(&sink, &loaded_ids("damaged", 200), &new);
}

#[test]
fn a_queue_goes_from_fjall_to_jetstream_and_back_unchanged() {
    let cluster = NatsCluster::start(3);
    let mut old = Relay::start(|s| config(s, free_addr()));
    stop(&mut old);
    // Pool A: tried once, due in an hour; pool B: never tried.
    old.load_spool("A", 40, "deferred", &["--deferred-for", "3600"]);
    old.load_spool("B", 40, "fresh", &[]);
    let mut expected = loaded_ids("deferred", 40);
    expected.extend(loaded_ids("fresh", 40));
    let files = new_tempdir("poolrelay-export-");
    let (to_js, from_js) = (files.path().join("fjall"), files.path().join("jetstream"));
    let first = spool_ok(&[
        "export",
        "-c",
        path_str(old.config_path()),
        path_str(&to_js),
    ]);

    // A relay on the cluster, stopped: its config names the spool.
    let servers = cluster.servers_toml();
    let sink_js = Sink::start();
    let mut on_cluster = Relay::start(|s| {
        format!(
            "{}\n[spool]\nbackend = \"jetstream\"\nservers = {servers}\nack_timeout = \"5s\"\n",
            config(s, sink_js.addr())
        )
    });
    stop(&mut on_cluster);
    let js_config = path_str(on_cluster.config_path()).to_string();
    let imported = spool_ok(&["import", "-c", &js_config, path_str(&to_js)]);
    assert!(
        imported.stdout.contains("80 messages stored, 0 already"),
        "{imported}"
    );
    let twice = spool_ok(&["import", "-c", &js_config, path_str(&to_js)]);
    assert!(
        twice.stdout.contains("0 messages stored, 80 already"),
        "{twice}"
    );
    let second = spool_ok(&["export", "-c", &js_config, path_str(&from_js)]);
    for pool in ["A", "B", "total"] {
        assert_eq!(
            summary_row(&second.stdout, pool),
            summary_row(&first.stdout, pool),
            "pool {pool}: the cluster holds what the file held\n{first}\n{second}"
        );
    }

    // The relay on the cluster delivers what was imported there, each
    // message once (the second import's fresh tickets replaced the first's),
    // and pool A only once flushed.
    on_cluster.restart();
    sink_js.wait_for_count(40, DEADLINE);
    let a = pool_messages(&on_cluster, "A");
    let a = a.as_array().cloned().unwrap_or_default();
    assert!(
        a.len() == 40 && a.iter().all(|m| m["attempts"] == 1),
        "pool A waits on the cluster with its attempt: {a:?}\n{}",
        on_cluster.logs()
    );
    assert_eq!(sink_js.count(), 40, "deferred mail stays deferred");
    queue_ok(&on_cluster, &["flush", "--pool", "A"]);
    sink_js.wait_for_count(80, DEADLINE);
    assert_delivered_once(&sink_js, &expected, &on_cluster);
    stop(&mut on_cluster);

    let sink = Sink::start();
    let mut back = stopped_target(sink.addr());
    let imported = spool_ok(&[
        "import",
        "-c",
        path_str(back.config_path()),
        path_str(&from_js),
    ]);
    assert!(imported.stdout.contains("80 messages stored"), "{imported}");
    back.restart();
    sink.wait_for_count(40, DEADLINE);
    let a = pool_messages(&back, "A");
    let a = a.as_array().cloned().unwrap_or_default();
    assert_eq!(
        a.len(),
        40,
        "pool A waits for its retry time\n{}",
        back.logs()
    );
    assert!(
        a.iter()
            .all(|m| m["attempts"] == 1
                && m["next_attempt_in_seconds"].as_f64().unwrap_or(0.0) > 3000.0),
        "attempts and retry times came back: {a:?}"
    );
    queue_ok(&back, &["flush", "--pool", "A"]);
    sink.wait_for_count(80, DEADLINE);
    back.wait_until("the queue to be empty", DEADLINE, || {
        pool_messages(&back, "A")
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert_delivered_once(&sink, &expected, &back);
}

/// A child process killed (SIGKILL) and reaped on drop, whatever happens.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn an_import_killed_midway_and_run_again_queues_each_message_once() {
    let mut old = Relay::start(|s| config(s, free_addr()));
    stop(&mut old);
    old.load_spool("B", 1000, "resumed", &[]);
    let files = new_tempdir("poolrelay-export-");
    let file = files.path().join("queue.export");
    spool_ok(&["export", "-c", path_str(old.config_path()), path_str(&file)]);
    let bytes = std::fs::read(&file).expect("the export");

    let sink = Sink::start();
    let mut new = stopped_target(sink.addr());
    let target = path_str(new.config_path()).to_string();
    let mut import = Reaped(
        Command::new(binary())
            .args(["spool", "import", "-c", &target, "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start poolrelay spool import"),
    );
    // A pipe holds 64 KiB: once half the file is written, the importer
    // has read all but that much of it.
    let mut stdin = import.0.stdin.take().expect("its stdin");
    stdin
        .write_all(&bytes[..bytes.len() / 2])
        .expect("feed the import");
    // Killed once it wrote what it read to the store and waits for more
    // (its writes stopped growing; the kernel keeps what was written
    // through a kill -9), so the second import finds that part there.
    let pid = import.0.id();
    let mut last = 0;
    let settled = poll_until(DEADLINE, Duration::from_millis(250), || {
        let now = bytes_written(pid);
        let settled = now > 150_000 && now == last;
        last = now;
        settled
    });
    assert!(settled, "the import wrote {last} bytes\n{}", new.logs());
    import.0.kill().expect("kill -9 the import");
    let status = import.0.wait().expect("reap the import");
    assert!(!status.success(), "killed: {status:?}");
    drop(stdin);

    let imported = spool_ok(&["import", "-c", &target, path_str(&file)]);
    assert_eq!(
        summary_row(&imported.stdout, "total")[0],
        1000,
        "{imported}"
    );
    let already: u64 = imported
        .stdout
        .split(" messages stored, ")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count of messages already there in: {imported}"));
    assert!(
        (100..1000).contains(&already),
        "the killed import stored part of the file: {imported}"
    );
    new.restart();
    sink.wait_for_count(1000, DEADLINE);
    new.wait_until("the queue to be empty", DEADLINE, || {
        pool_messages(&new, "B")
            .as_array()
            .is_some_and(Vec::is_empty)
    });
    assert_delivered_once(&sink, &loaded_ids("resumed", 1000), &new);
}

/// Bytes process `pid` wrote so far (`wchar` of /proc/PID/io).
fn bytes_written(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/io"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("wchar:"))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(0)
}
