//! The header parser the classifier matches `header = { ... }` routes with,
//! on arbitrary message bytes, and the classifier itself on them.
//!
//! Promises checked: parsed names and values hold no LF (and no CR when
//! the message has CRLF line endings only, as every queued one does), names
//! no colon and no surrounding blanks; parsing stops at the first empty line
//! (what follows never changes the result); every value matches itself and
//! "*" as a glob, case-insensitively.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_config::Config;
use poolrelay_relay::classifier::{Classifier, Facts, glob_match, parse_headers};
use std::path::Path;
use std::sync::OnceLock;

const ROUTES: &str = r#"
[[listener]]
address = "127.0.0.1:2525"

[pool.A]
[pool.B]

[[upstream]]
host = "127.0.0.1:2601"

[[route]]
pool = "B"
header = { name = "Sender", value = "*emergency*@*" }

[[route]]
pool = "A"
header = { name = "List-Id", value = "*<*.lists.example.org>*" }
"#;

fn classifier() -> &'static Classifier {
    static C: OnceLock<Classifier> = OnceLock::new();
    C.get_or_init(|| {
        Classifier::new(&Config::parse(ROUTES, Path::new("routes.toml")).expect("valid routes"))
    })
}

fuzz_target!(|message: &[u8]| {
    let fields = parse_headers(message);
    // What the session queues has CRLF line endings only; then no field
    // keeps a CR either.
    let crlf_only = message.iter().enumerate().all(|(i, &b)| match b {
        b'\r' => message.get(i + 1) == Some(&b'\n'),
        b'\n' => i > 0 && message[i - 1] == b'\r',
        _ => true,
    });
    for (name, value) in &fields {
        assert!(
            !name.contains('\n') && !value.contains('\n'),
            "{name:?}: {value:?}"
        );
        if crlf_only {
            assert!(
                !name.contains('\r') && !value.contains('\r'),
                "{name:?}: {value:?}"
            );
        }
        assert!(!name.contains(':'), "{name:?}");
        assert_eq!(name.trim(), name);
        for text in [name, value] {
            assert!(glob_match(text, text), "{text:?} does not match itself");
            assert!(
                glob_match(&text.to_ascii_uppercase(), text),
                "{text:?} is case-sensitive"
            );
            assert!(glob_match("*", text));
        }
    }
    // The header section ends at the first empty line: nothing after it counts.
    let mut extended = message.to_vec();
    extended.extend_from_slice(b"\r\n\r\nX-After: body\r\n");
    assert_eq!(
        fields,
        parse_headers(&extended),
        "what follows the end of the message changed its header"
    );

    // The first line as a glob pattern against every value: bounded work, no panic.
    let pattern =
        String::from_utf8_lossy(message.split(|&b| b == b'\n').next().unwrap_or_default());
    for (_, value) in fields.iter().take(16) {
        let _ = glob_match(&pattern, value);
    }
    let decision = classifier().classify(&Facts {
        listener: "127.0.0.1:2525",
        pinned_pool: None,
        user: None,
        user_pool: None,
        sender: "owner-list@lists.example.org",
        recipients: &["a@example.org"],
        message,
        mt_priority: 0,
    });
    assert!(["A", "B"].contains(&decision.pool.as_str()), "{decision:?}");

    // The MT-Priority rewrite (RFC 6758 §4): the header as the classifier
    // reads it holds exactly one field, with the value; the body is kept.
    let value = (message.len() % 19) as i8 - 9;
    let rewritten = poolrelay_smtp::mt_priority::set_header(message, value);
    let found: Vec<String> = parse_headers(&rewritten)
        .into_iter()
        .filter(|(name, _)| name.eq_ignore_ascii_case("MT-Priority"))
        .map(|(_, v)| v)
        .collect();
    assert_eq!(found, [value.to_string()], "MT-Priority fields after the rewrite");
    // The body starts at the first empty line (LF or CRLF), if any.
    let mut body_start = message.len();
    let mut pos = 0;
    for line in message.split_inclusive(|&b| b == b'\n') {
        if line == b"\n" || line == b"\r\n" {
            body_start = pos;
            break;
        }
        pos += line.len();
    }
    assert!(
        rewritten.ends_with(&message[body_start..]),
        "the rewrite changed the body"
    );
});
