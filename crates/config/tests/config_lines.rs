//! Every config error names a real line: the line of the offending key, or
//! of its section when the key is missing (README.md, "Configuration").

use std::path::Path;

use poolrelay_config::{Config, ConfigError};

const LISTENER: &str = "[[listener]]\naddress = \"127.0.0.1:2525\"\n";

#[track_caller]
fn error(text: &str) -> ConfigError {
    match Config::parse(text, Path::new("t.toml")) {
        Ok(_) => panic!("accepted:\n{text}"),
        Err(e) => e,
    }
}

#[track_caller]
fn error_at(text: &str, line: usize, needle: &str) {
    let e = error(text);
    assert_eq!(e.line, line, "{e}\n{text}");
    assert!(e.message.contains(needle), "{e}");
    assert!(
        e.to_string().starts_with(&format!("t.toml:{line}: ")),
        "{e}"
    );
}

#[test]
fn spelled_out_durations_are_errors_with_the_short_form() {
    error_at(
        &format!("{LISTENER}[defaults]\nmax_age = \"5 days\"\n"),
        4,
        "defaults.max_age: \"5 days\" is not a duration; write \"5d\"",
    );
    error_at(
        &format!("{LISTENER}[defaults]\nretry = [\"1m\",\n  \"2 hours\"]\n"),
        5,
        "write \"2h\"",
    );
    error_at(
        &format!("pool.B.max_age = \"5 days\"\n{LISTENER}"),
        1,
        "pool.B.max_age: \"5 days\" is not a duration; write \"5d\"",
    );
    error_at(
        &format!("{LISTENER}[[upstream]]\nhost = \"mx\"\nconnect_timeout = \"30 sec\"\n"),
        5,
        "write \"30s\"",
    );
    assert!(
        Config::parse(
            &format!("{LISTENER}[defaults]\nmax_age = \"5d\"\n"),
            Path::new("t")
        )
        .is_ok()
    );
    assert!(
        Config::parse(
            &format!("{LISTENER}[defaults]\nmax_age = 3600\n"),
            Path::new("t")
        )
        .is_ok()
    );
}

#[test]
fn missing_keys_name_their_section() {
    error_at(
        &format!("{LISTENER}[[upstream]]\nworkers = 2\n"),
        3,
        "missing key `host`",
    );
    error_at(
        &format!("{LISTENER}[[listener]]\n"),
        3,
        "missing key `address`",
    );
    error_at(
        &format!("{LISTENER}[[route]]\npool = \"-\"\n[route.header]\nname = \"Sender\"\n"),
        5,
        "missing key `value`",
    );
}

#[test]
fn keys_of_nested_and_dotted_tables_name_their_line() {
    error_at(
        &format!(
            "{LISTENER}[[upstream]]\nhost = \"mx\"\n[upstream.auth]\nusername = \"u\"\npassword_file = \"p\"\nbogus = 1\n"
        ),
        8,
        "unknown key `bogus`",
    );
    error_at(
        &format!("\n\npool.B.bogus = 1\n{LISTENER}"),
        3,
        "unknown key `bogus`",
    );
    error_at(
        &format!("pool.\"a b\" = {{}}\n{LISTENER}"),
        1,
        "pool name \"a b\"",
    );
}

#[test]
fn a_missing_listener_section_names_the_end_of_the_file() {
    error_at(
        "[server]\nhostname = \"relay.example.org\"\n\n",
        2,
        "no [[listener]]",
    );
    error_at("", 1, "no [[listener]]");
}
