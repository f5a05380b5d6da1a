//! The outbound client's reply reader and EHLO parser on arbitrary bytes
//! from an upstream (through `poolrelay_smtp::fuzzing`, which runs the
//! client's own private functions).
//!
//! Promises checked: a reply read has a code from 200 to 599 and an
//! enhanced code only of its own class; its text holds no line break
//! (lines are joined with a space); the sanitized form we store has no
//! control characters and at most 512 bytes of text; each reply consumed
//! whole lines; the capabilities of any EHLO reply are well-formed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_smtp::fuzzing::{parse_ehlo, parse_replies};
use poolrelay_smtp::reply::MAX_REPLY_TEXT;

fuzz_target!(|input: &[u8]| {
    let replies = parse_replies(input);
    let mut consumed = 0;
    for (i, (result, raw)) in replies.iter().enumerate() {
        let last = i + 1 == replies.len();
        match result {
            Ok(reply) => {
                assert!((200..600).contains(&reply.code), "{reply:?}");
                let class = char::from(b'0' + (reply.code / 100) as u8);
                if let Some(e) = &reply.enhanced {
                    assert!(
                        e.starts_with(class),
                        "enhanced code of another class: {reply:?}"
                    );
                    assert_eq!(reply.status(), *e);
                }
                assert!(
                    !reply.text.contains('\n'),
                    "line break in reply text {reply:?}"
                );
                assert!(raw.ends_with(b"\n"), "a reply ends with its line end");
                let stored = reply.clone().sanitized();
                assert_eq!(stored.code, reply.code);
                assert!(stored.text.len() <= MAX_REPLY_TEXT);
                assert!(!stored.text.chars().any(char::is_control), "{stored:?}");
                let shown = stored.to_string();
                assert!(!shown.contains(['\r', '\n']), "{shown:?}");
                check_caps(raw);
            }
            Err(_) => assert!(last, "reading goes on after an error"),
        }
        // Lines longer than the reader keeps are cut: raw is never more
        // than the input it came from.
        consumed += raw.len();
    }
    assert!(consumed <= input.len() + 2 * replies.len());
    check_caps(input);
});

fn check_caps(raw: &[u8]) {
    let caps = parse_ehlo(raw);
    assert!(caps.esmtp);
    assert!(
        caps.auth.windows(2).all(|w| w[0] < w[1]),
        "auth not sorted or repeated: {:?}",
        caps.auth
    );
    for m in &caps.auth {
        assert!(
            !m.is_empty()
                && m.bytes().all(|b| b.is_ascii_uppercase()
                    || b.is_ascii_digit()
                    || b == b'-'
                    || b == b'_'),
            "{m:?}"
        );
    }
}
