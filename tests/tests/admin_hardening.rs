//! The admin API's protections (README.md, "Operating"): with a token every
//! `/api/v1` call needs it; reads of unknown or malformed names get 4xx and
//! create nothing; cross-site and rebound requests get 403; a non-loopback
//! admin address needs a token; secret files must be private, the relay's
//! own files are, and a changed token file takes effect on reload;
//! `::ffff:127.0.0.1` is loopback.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use poolrelay_tests::admin::{api_json, pool_entry};
use poolrelay_tests::operating::COMMAND;
use poolrelay_tests::{
    HttpResponse, Relay, RelaySetup, free_addr, http_request, new_tempdir, percent_encode,
    poolrelay, toml_str,
};

const TOKEN: &str = "s3cret-hardening-token";
const SENDER: &str = "owner-lista@lists.test";

/// Writes `text` to `path` with `mode`.
fn write_mode(path: &Path, text: &str, mode: u32) {
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
}

/// Pool A served by an upstream nobody listens on (retry in 1 h), so mail
/// stays queued; `admin_extra` lines go into `[admin]`.
fn config(s: &RelaySetup, admin_extra: &str) -> String {
    let upstream = free_addr();
    let head = s.head().replacen(
        &format!("[admin]\naddress = \"{}\"\n", s.admin),
        &format!("[admin]\naddress = \"{}\"\n{admin_extra}", s.admin),
        1,
    );
    format!(
        "{head}{}[defaults]\nlist_pool = \"A\"\nretry = [\"1h\"]\n\n[pool.A]\n\n\
         [[upstream]]\nhost = \"{upstream}\"\n",
        s.listener("")
    )
}

/// `[admin] token_file` with [`TOKEN`] in `<dir>/admin.token` (mode 0600).
fn token_line(s: &RelaySetup) -> String {
    let path = s.dir.join("admin.token");
    write_mode(&path, &format!("{TOKEN}\n"), 0o600);
    format!("token_file = {}\n", toml_str(&path.to_string_lossy()))
}

fn call(relay: &Relay, method: &str, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    http_request(relay.admin_addr(), method, path, headers)
        .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", relay.logs()))
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn held(relay: &Relay, auth: &[(&str, &str)]) -> bool {
    let r = call(relay, "GET", "/api/v1/pools", auth);
    assert_eq!(r.status, 200, "GET /api/v1/pools: {r}");
    let pools: serde_json::Value = serde_json::from_str(&r.body).expect("JSON");
    pool_entry(&pools, "A")["held"] == true
}

fn check(config: &Path) -> poolrelay_tests::CommandOutput {
    poolrelay(&["check", "-c", &config.to_string_lossy()], COMMAND)
}

// 1. Reads need the token; reads create nothing; odd names get 4xx.

#[test]
fn with_a_token_every_api_call_needs_it_reads_included() {
    let relay = Relay::start(|s| config(s, &token_line(s)));
    let auth = bearer(TOKEN);
    let with = [("Authorization", auth.as_str())];
    let r = call(&relay, "POST", "/api/v1/pools/A/hold", &with);
    assert_eq!(r.status, 200, "hold with the token: {r}");
    let sent = relay.send_tagged(SENDER, &["member@example.test"], "secret-subject");

    for path in [
        "/api/v1/pools".to_string(),
        "/api/v1/pools/A/messages".to_string(),
        format!("/api/v1/messages/{}", sent.queue_id),
    ] {
        for headers in [
            &[][..],
            &[("Authorization", "Bearer wrong-token")][..],
            &[("Authorization", TOKEN)][..],
        ] {
            let r = call(&relay, "GET", &path, headers);
            assert_eq!(r.status, 401, "GET {path} with {headers:?}: {r}");
            assert!(
                !r.body.contains(SENDER) && !r.body.contains("secret-subject"),
                "GET {path} without the token leaked the message: {r}"
            );
        }
        let r = call(&relay, "GET", &path, &with);
        assert_eq!(r.status, 200, "GET {path} with the token: {r}");
    }
    let r = call(
        &relay,
        "GET",
        &format!("/api/v1/messages/{}", sent.queue_id),
        &with,
    );
    assert!(
        r.body.contains(SENDER) && r.body.contains("secret-subject"),
        "{r}"
    );
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = call(&relay, "GET", path, &[]);
        assert_eq!(r.status, 200, "GET {path} stays open: {r}");
    }

    // The CLI: refused without the token, works with the config's token_file.
    let url = relay.admin_url();
    let out = poolrelay(&["queue", "summary", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "summary without a token:\n{out}"
    );
    assert!(out.stderr.contains("401"), "{out}");
    let config = relay.config_path().to_string_lossy().into_owned();
    let out = poolrelay(&["queue", "show", &sent.queue_id, "-c", &config], COMMAND);
    assert!(out.status.success(), "queue show -c CONFIG:\n{out}");
    assert!(out.stdout.contains(SENDER), "{out}");
}

#[test]
fn unknown_or_malformed_pools_and_ids_get_4xx_and_create_nothing() {
    let relay = Relay::start(|s| config(s, ""));
    let long = "Q".repeat(252);
    let long_hex = "0".repeat(252);
    let pools = [
        "NOPE".to_string(),
        long.clone(),
        percent_encode(&"ä".repeat(126)),
        "%00".into(),
        "%FF%FE".into(),
        "a%2Fb".into(),
        "..".into(),
        "%20".into(),
        "env.A".into(),
        "x".repeat(5000),
    ];
    for pool in &pools {
        let r = call(
            &relay,
            "GET",
            &format!("/api/v1/pools/{pool}/messages"),
            &[],
        );
        assert!(
            (400..500).contains(&r.status),
            "GET messages of pool {pool:.40}...: {r}"
        );
        for action in ["hold", "release", "flush", "delete-all"] {
            let path = format!("/api/v1/pools/{pool}/{action}");
            let r = call(&relay, "POST", &path, &[]);
            assert!((400..500).contains(&r.status), "POST {path:.60}...: {r}");
        }
    }
    let r = call(&relay, "GET", "/api/v1/pools/NOPE/messages", &[]);
    assert_eq!(r.status, 404, "{r}");
    let r = call(
        &relay,
        "GET",
        &format!("/api/v1/pools/{long}/messages"),
        &[],
    );
    assert_eq!(r.status, 404, "{r}");

    let ids = [
        "0000000000000000".to_string(),
        long_hex.clone(),
        long.clone(),
        "zz".into(),
        "%00".into(),
        "%FF".into(),
        "-1".into(),
        "x".repeat(5000),
    ];
    for id in &ids {
        let r = call(&relay, "GET", &format!("/api/v1/messages/{id}"), &[]);
        assert!((400..500).contains(&r.status), "GET message {id:.40}: {r}");
        for action in ["flush", "delete", "bounce", "move?to=A"] {
            let path = format!("/api/v1/messages/{id}/{action}");
            let r = call(&relay, "POST", &path, &[]);
            assert!((400..500).contains(&r.status), "POST {path:.60}: {r}");
        }
    }
    let sent = relay.send_tagged(SENDER, &["member@example.test"], "move-me");
    for to in [long.as_str(), "NOPE", "%00"] {
        let path = format!("/api/v1/messages/{}/move?to={to}", sent.queue_id);
        let r = call(&relay, "POST", &path, &[]);
        assert!((400..500).contains(&r.status), "POST {path:.80}: {r}");
    }

    // Nothing was created: the pools and the metric labels are the configured ones.
    let pools = api_json(&relay, "/api/v1/pools");
    let names: Vec<&str> = pools
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|p| p["pool"].as_str())
        .collect();
    assert_eq!(names, ["A", "-"], "{pools:#}");
    let metrics = relay.scrape();
    for line in metrics.lines().filter(|l| l.contains("pool=\"")) {
        assert!(
            line.contains("pool=\"A\"") || line.contains("pool=\"-\""),
            "a metric label for a pool nobody configured: {line}"
        );
    }
    let r = call(&relay, "GET", "/healthz", &[]);
    assert_eq!(r.status, 200, "the relay survived: {r}");
    assert!(!relay.log_text().contains("panicked"), "{}", relay.logs());
}

// 2. Cross-site requests and rebound host names.

#[test]
fn a_cross_site_post_or_a_rebound_host_name_is_refused_with_403() {
    let relay = Relay::start(|s| config(s, ""));
    let admin = relay.admin_addr();
    let port = admin.port();

    let r = call(
        &relay,
        "POST",
        "/api/v1/pools/A/hold",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 403, "a cross-site POST: {r}");
    assert!(!held(&relay, &[]), "a cross-site POST held the pool");
    for origin in [
        "null",
        "https://evil.example",
        &format!("http://evil.example:{port}"),
    ] {
        let r = call(
            &relay,
            "POST",
            "/api/v1/pools/A/hold",
            &[("Origin", origin)],
        );
        assert_eq!(r.status, 403, "Origin {origin}: {r}");
    }
    let r = call(
        &relay,
        "GET",
        "/api/v1/pools",
        &[("Origin", "http://evil.example")],
    );
    assert_eq!(r.status, 403, "a cross-site read: {r}");

    // DNS rebinding: evil.example resolving to the admin address.
    let rebound = format!("evil.example:{port}");
    let raw = |method: &str, path: &str, host: &str| {
        // http_request sends its own Host first; a second one would be a
        // malformed request, so send this one by hand.
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(admin).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )
        .expect("write");
        let mut out = String::new();
        let _ = stream.read_to_string(&mut out);
        out.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok())
            .unwrap_or(0)
    };
    assert_eq!(raw("GET", "/api/v1/pools", &rebound), 403, "rebound read");
    assert_eq!(
        raw("POST", "/api/v1/pools/A/hold", &rebound),
        403,
        "rebound POST"
    );
    assert!(!held(&relay, &[]), "a rebound POST held the pool");
    assert_eq!(
        raw("GET", "/api/v1/pools", "127.0.0.1:1"),
        403,
        "wrong port"
    );
    // Prometheus and health checks are not concerned.
    assert_eq!(raw("GET", "/metrics", &rebound), 200);
    assert_eq!(raw("GET", "/healthz", &rebound), 200);

    // The admin address itself, and the local names, are fine.
    for host in [
        admin.to_string(),
        format!("localhost:{port}"),
        format!("127.0.0.1:{port}"),
        format!("[::1]:{port}"),
    ] {
        assert_eq!(raw("GET", "/api/v1/pools", &host), 200, "Host {host}");
    }
    let same = format!("http://{admin}");
    let r = call(&relay, "POST", "/api/v1/pools/A/hold", &[("Origin", &same)]);
    assert_eq!(r.status, 200, "Origin {same}: {r}");
    assert!(held(&relay, &[]));
}

// 3. A non-loopback admin address needs a token.

#[test]
fn a_non_loopback_admin_address_without_a_token_refuses_to_start() {
    let dir = new_tempdir("poolrelay-admin-open-");
    let path = dir.path().join("poolrelay.toml");
    let listen = free_addr();
    let port = free_addr().port();
    let spool = dir.path().join("spool");
    let base = format!(
        "[server]\nspool_dir = {}\n\n[[listener]]\naddress = \"{listen}\"\n\n[admin]\naddress = \"0.0.0.0:{port}\"\n",
        toml_str(&spool.to_string_lossy())
    );
    fs::write(&path, &base).expect("write the config");
    let out = check(&path);
    assert!(
        !out.status.success(),
        "an open admin API passed the check:\n{out}"
    );
    assert!(
        out.stderr.contains(":8:")
            && out.stderr.contains("not loopback")
            && out.stderr.contains("token_file")
            && out.stderr.contains("allow_unauthenticated = true"),
        "the error names the line and what to do:\n{out}"
    );
    let out = poolrelay(&["run", "-c", &path.to_string_lossy()], COMMAND);
    assert!(!out.status.success(), "run started anyway:\n{out}");
    assert!(out.stderr.contains("not loopback"), "{out}");

    fs::write(&path, format!("{base}allow_unauthenticated = true\n")).expect("write");
    let out = check(&path);
    assert!(out.status.success(), "allow_unauthenticated = true:\n{out}");
    let out = poolrelay(
        &["check", "--print", "-c", &path.to_string_lossy()],
        COMMAND,
    );
    assert!(
        out.stdout.contains("allow_unauthenticated true"),
        "check --print shows it:\n{out}"
    );

    let token = dir.path().join("admin.token");
    write_mode(&token, "t\n", 0o600);
    fs::write(
        &path,
        format!(
            "{base}token_file = {}\n",
            toml_str(&token.to_string_lossy())
        ),
    )
    .expect("write");
    let out = check(&path);
    assert!(out.status.success(), "with a token file:\n{out}");
}

// 4. Secret files, the relay's own files, the token on reload.

#[test]
fn secret_files_readable_by_group_or_others_are_refused_with_the_chmod_to_run() {
    let dir = new_tempdir("poolrelay-secrets-");
    let path = dir.path().join("poolrelay.toml");
    let token = dir.path().join("admin.token");
    let password = dir.path().join("upstream.password");
    write_mode(&token, "t0ken\n", 0o644);
    write_mode(&password, "pw\n", 0o640);
    let listen = free_addr();
    let admin = free_addr();
    let text = format!(
        "[server]\nspool_dir = {}\n\n[[listener]]\naddress = \"{listen}\"\n\n\
         [admin]\naddress = \"{admin}\"\ntoken_file = {}\n\n\
         [[upstream]]\nhost = \"smart.test:25\"\ntls = \"required\"\n\
         auth = {{ username = \"u\", password_file = {} }}\n",
        toml_str(&dir.path().join("spool").to_string_lossy()),
        toml_str(&token.to_string_lossy()),
        toml_str(&password.to_string_lossy())
    );
    fs::write(&path, &text).expect("write the config");
    let expect = |file: &PathBuf, line: &str, mode: &str| {
        let out = check(&path);
        assert!(
            !out.status.success(),
            "{} mode {mode} passed:\n{out}",
            file.display()
        );
        let chmod = format!("chmod 600 {}", file.display());
        assert!(
            out.stderr.contains(line) && out.stderr.contains(mode) && out.stderr.contains(&chmod),
            "the error names the line, the file and `{chmod}`:\n{out}"
        );
        let out = poolrelay(&["run", "-c", &path.to_string_lossy()], COMMAND);
        assert!(!out.status.success(), "run started anyway:\n{out}");
        assert!(out.stderr.contains(&chmod), "{out}");
    };
    expect(&token, ":9:", "0644");
    fs::set_permissions(&token, fs::Permissions::from_mode(0o600)).expect("chmod");
    expect(&password, ":14:", "0640");
    fs::set_permissions(&password, fs::Permissions::from_mode(0o600)).expect("chmod");
    let out = check(&path);
    assert!(out.status.success(), "both private:\n{out}");
}

/// Every file and directory under `dir` whose mode lets group or others in.
fn open_to_others(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let entry = entry.expect("dir entry");
            let meta = fs::symlink_metadata(entry.path()).expect("metadata");
            if meta.is_symlink() {
                continue;
            }
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                found.push(format!("{} {mode:o}", entry.path().display()));
            }
            if meta.is_dir() {
                todo.push(entry.path());
            }
        }
    }
    found
}

#[test]
fn the_relay_creates_its_files_for_its_owner_only() {
    let relay = Relay::start(|s| config(s, ""));
    relay.send_tagged(SENDER, &["member@example.test"], "mode-check");
    let r = call(&relay, "POST", "/api/v1/pools/A/hold", &[]);
    assert_eq!(r.status, 200, "{r}");
    let spool = relay.dir().join("spool");
    let meta = fs::metadata(&spool).expect("the spool exists");
    assert_eq!(meta.permissions().mode() & 0o777, 0o700);
    let open = open_to_others(&spool);
    assert!(
        open.is_empty(),
        "the relay created files group or others can read:\n{}",
        open.join("\n")
    );
}

#[test]
fn a_changed_token_file_takes_effect_on_sighup_and_on_poolrelay_reload() {
    let mut relay = Relay::start(|s| config(s, &token_line(s)));
    let token_file = relay.dir().join("admin.token");
    let status = |relay: &Relay, token: &str| {
        let auth = bearer(token);
        call(relay, "GET", "/api/v1/pools", &[("Authorization", &auth)]).status
    };
    assert_eq!(status(&relay, TOKEN), 200);

    // SIGHUP.
    fs::write(&token_file, "second-token\n").expect("rewrite the token");
    assert_eq!(
        fs::metadata(&token_file)
            .expect("meta")
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    relay.signal("HUP");
    relay.wait_until(
        "the new token to be accepted after SIGHUP",
        Duration::from_secs(15),
        || status(&relay, "second-token") == 200,
    );
    assert_eq!(status(&relay, TOKEN), 401, "the old token still works");

    // `poolrelay reload`, authenticated with the token in force.
    let in_force = relay.dir().join("in-force.token");
    write_mode(&in_force, "second-token\n", 0o600);
    fs::write(&token_file, "third-token\n").expect("rewrite the token");
    let url = relay.admin_url();
    let out = poolrelay(
        &[
            "reload",
            "--admin",
            &url,
            "--token-file",
            &in_force.to_string_lossy(),
        ],
        COMMAND,
    );
    assert!(
        out.status.success(),
        "poolrelay reload:\n{out}\n{}",
        relay.logs()
    );
    assert_eq!(status(&relay, "third-token"), 200, "{}", relay.logs());
    assert_eq!(status(&relay, "second-token"), 401);

    // A token file made readable by others is refused; the token in force stays.
    fs::set_permissions(&token_file, fs::Permissions::from_mode(0o644)).expect("chmod");
    relay.signal_and_wait_for_log("HUP", "reload refused");
    assert!(relay.log_text().contains("chmod 600"), "{}", relay.logs());
    assert_eq!(status(&relay, "third-token"), 200);
}

// 5. IPv4-mapped loopback.

#[test]
fn an_ipv4_mapped_loopback_client_counts_as_loopback() {
    let relay = Relay::start(|s| {
        let mapped = format!("[::ffff:{}]:{}", s.admin.ip(), s.admin.port());
        config(s, "").replacen(
            &format!("address = \"{}\"", s.admin),
            &format!("address = \"{mapped}\""),
            1,
        )
    });
    assert!(
        relay.config_text().contains("[::ffff:127."),
        "{}",
        relay.config_text()
    );
    // The admin socket is IPv6: this IPv4 client is seen as ::ffff:127.0.0.1.
    let r = call(&relay, "POST", "/api/v1/pools/A/hold", &[]);
    assert_eq!(
        r.status,
        200,
        "a loopback client refused: {r}\n{}",
        relay.logs()
    );
    assert!(held(&relay, &[]));
}
