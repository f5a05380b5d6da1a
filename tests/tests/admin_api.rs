//! The admin API's access rules and health endpoints (README.md,
//! "Operating"): every /api/v1 call needs the token when a token file is
//! set, /metrics and health need none; /healthz and /readyz.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use poolrelay_tests::admin::pool_entry;
use poolrelay_tests::operating::{COMMAND, two_pools};
use poolrelay_tests::{Relay, Sink, http_get, http_request, poolrelay, toml_str};

// Admin token, health

#[test]
fn mutating_api_calls_need_the_token_when_a_token_file_is_set() {
    let sink_a = Sink::start();
    let sink_b = Sink::start();
    let token = "s3cret-operating-token";
    let relay = Relay::start(|s| {
        let token_file = s.dir.join("admin.token");
        fs::write(&token_file, format!("{token}\n")).unwrap_or_else(|e| panic!("token: {e}"));
        fs::set_permissions(&token_file, fs::Permissions::from_mode(0o600))
            .unwrap_or_else(|e| panic!("chmod token: {e}"));
        let text = two_pools(s, sink_a.addr(), sink_b.addr(), "1s", "");
        text.replacen(
            &format!("[admin]\naddress = \"{}\"\n", s.admin),
            &format!(
                "[admin]\naddress = \"{}\"\ntoken_file = {}\n",
                s.admin,
                toml_str(&token_file.to_string_lossy())
            ),
            1,
        )
    });
    let admin = relay.admin_addr();
    let bearer = format!("Bearer {token}");
    let call = |method: &str, path: &str, auth: Option<&str>| {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        http_request(admin, method, path, &headers)
            .unwrap_or_else(|e| panic!("{method} {path}: {e}\n{}", relay.logs()))
    };

    for path in [
        "/api/v1/pools/A/hold",
        "/api/v1/pools/A/release",
        "/api/v1/pools/A/flush",
        "/api/v1/pools/A/delete-all",
        "/api/v1/messages/0000000000000000/delete",
        "/api/v1/messages/0000000000000000/bounce",
        "/api/v1/messages/0000000000000000/move?to=B",
        "/api/v1/reload",
    ] {
        let r = call("POST", path, None);
        assert_eq!(r.status, 401, "POST {path} without a token: {r}");
        let r = call("POST", path, Some("Bearer wrong-token"));
        assert_eq!(r.status, 401, "POST {path} with a wrong token: {r}");
    }
    let pools_json = || {
        let r = call("GET", "/api/v1/pools", Some(&bearer));
        assert_eq!(r.status, 200, "GET /api/v1/pools with the token: {r}");
        serde_json::from_str::<serde_json::Value>(&r.body).expect("JSON")
    };
    let pools = pools_json();
    assert_eq!(
        pool_entry(&pools, "A")["held"],
        false,
        "a refused hold held the pool"
    );

    let r = call("POST", "/api/v1/pools/A/hold", Some(&bearer));
    assert_eq!(r.status, 200, "POST hold with the token: {r}");
    let pools = pools_json();
    assert_eq!(pool_entry(&pools, "A")["held"], true, "{pools:#}");
    let r = call("POST", "/api/v1/pools/A/release", Some(&bearer));
    assert_eq!(r.status, 200, "POST release with the token: {r}");

    // Reading the API needs the token too; metrics and health do not.
    for path in ["/api/v1/pools", "/api/v1/pools/A/messages"] {
        let r = call("GET", path, None);
        assert_eq!(r.status, 401, "GET {path} without a token: {r}");
        let r = call("GET", path, Some(&bearer));
        assert_eq!(r.status, 200, "GET {path} with the token: {r}");
    }
    for path in ["/metrics", "/healthz", "/readyz"] {
        let r = call("GET", path, None);
        assert_eq!(r.status, 200, "GET {path} without a token: {r}");
    }

    // The CLI: refused without the token, works with --token-file or with
    // the config's admin.token_file.
    let url = relay.admin_url();
    let out = poolrelay(&["queue", "hold", "--pool", "B", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "queue hold without a token:\n{out}"
    );
    assert!(
        out.stderr.contains("401"),
        "queue hold without a token:\n{out}"
    );
    let token_file = relay.dir().join("admin.token");
    let out = poolrelay(
        &[
            "queue",
            "hold",
            "--pool",
            "B",
            "--admin",
            &url,
            "--token-file",
            &token_file.to_string_lossy(),
        ],
        COMMAND,
    );
    assert!(out.status.success(), "queue hold --token-file:\n{out}");
    let config = relay.config_path().to_string_lossy().into_owned();
    let out = poolrelay(&["queue", "release", "--pool", "B", "-c", &config], COMMAND);
    assert!(out.status.success(), "queue release -c CONFIG:\n{out}");
    let pools = pools_json();
    assert_eq!(pool_entry(&pools, "B")["held"], false, "{pools:#}");
    let out = poolrelay(&["queue", "summary", "--admin", &url], COMMAND);
    assert_eq!(
        out.status.code(),
        Some(1),
        "queue summary without a token:\n{out}"
    );
    let out = poolrelay(&["queue", "summary", "-c", &config], COMMAND);
    assert!(out.status.success(), "queue summary -c CONFIG:\n{out}");
}

#[test]
fn healthz_and_readyz_answer_200_while_running() {
    let sink = Sink::start();
    let relay = Relay::start(|s| s.single_upstream(sink.addr(), ""));
    for path in ["/healthz", "/readyz"] {
        let r = http_get(relay.admin_addr(), path)
            .unwrap_or_else(|e| panic!("GET {path}: {e}\n{}", relay.logs()));
        assert_eq!(r.status, 200, "GET {path}: {r}\n{}", relay.logs());
    }
    let r = http_get(relay.admin_addr(), "/no-such-page")
        .unwrap_or_else(|e| panic!("GET /no-such-page: {e}"));
    assert_eq!(r.status, 404, "{r}");
}
