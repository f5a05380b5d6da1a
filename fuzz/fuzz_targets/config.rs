//! The config parser (`Config::parse`, what `poolrelay check` and the
//! relay run on the config file) on arbitrary UTF-8 text.
//!
//! Promises checked: an error names the file and a line of it (1-based) or
//! 0 for the whole file, with a message; a config that parses has a
//! listener, the default pool, routes and upstreams that name only known
//! pools and lines of the file, and a printable summary.
//!
//! The parser reads `auth.password_file`. So that a generated path never
//! reads a device or a large file, inputs naming any password file but
//! `pw` (a small file in the fuzzer's own working directory) are skipped.
//! The target changes its working directory to a temporary one: give it
//! corpus directories as absolute paths (`make fuzz` does).
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_config::{Config, DEFAULT_POOL};
use std::path::Path;
use std::sync::Once;

fn setup() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let dir =
            std::env::temp_dir().join(format!("poolrelay-fuzz-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        std::fs::write(dir.join("pw"), "secret\n").expect("password file");
        std::env::set_current_dir(&dir).expect("cd");
    });
}

/// Whether every `password_file` anywhere in the document is `pw`.
fn only_safe_files(value: &toml::Value) -> bool {
    match value {
        toml::Value::Table(t) => t.iter().all(|(k, v)| {
            if k == "password_file" {
                v.as_str().is_none_or(|s| s == "pw")
            } else {
                only_safe_files(v)
            }
        }),
        toml::Value::Array(a) => a.iter().all(only_safe_files),
        _ => true,
    }
}

fuzz_target!(|data: &[u8]| {
    // Config::load reads the file as UTF-8: other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(doc) = text.parse::<toml::Value>()
        && !only_safe_files(&doc)
    {
        return;
    }
    setup();
    let path = Path::new("fuzz.toml");
    // A line past the last is allowed for an error at the end of the file.
    let lines = text.lines().count() + 1;
    match Config::parse(text, path) {
        Err(e) => {
            assert_eq!(e.file, path);
            assert!(e.line <= lines, "error on line {} of {lines}: {e}", e.line);
            assert!(!e.message.trim().is_empty());
            let shown = e.to_string();
            assert!(
                shown.starts_with("fuzz.toml:") || shown.starts_with("fuzz.toml: "),
                "{shown}"
            );
        }
        Ok(config) => {
            assert!(!config.listeners.is_empty(), "a config without a listener");
            assert!(config.pools.contains_key(DEFAULT_POOL));
            for route in &config.routes {
                assert!(
                    config.pools.contains_key(&route.pool),
                    "route to unknown pool {:?}",
                    route.pool
                );
                assert!(
                    (1..=lines).contains(&route.line),
                    "route line {}",
                    route.line
                );
            }
            for upstream in &config.upstreams {
                for pool in &upstream.pools {
                    assert!(
                        config.pools.contains_key(pool),
                        "upstream serves unknown pool {pool:?}"
                    );
                }
            }
            assert!(!config.describe().is_empty());
            assert_eq!(config.pool_names().len(), config.pools.len());
        }
    }
});
