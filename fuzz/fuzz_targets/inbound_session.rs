//! The inbound session on arbitrary client bytes, driven the way
//! `crates/relay/src/listener.rs` drives it: feed what was read, write the
//! replies, queue each message and resume with `feed(&[])`, stop at Close.
//!
//! Promises checked: what we write is well-formed SMTP replies whatever the
//! client sent; a queued transaction has a sender and recipients that
//! cannot break the MAIL and RCPT commands they are sent on in (no CR, LF
//! or NUL; the HELO name, ENVID and ORCPT are only written sanitized or
//! xtext-encoded), 1 to
//! max_recipients recipients, and content with only CRLF line endings
//! within max_message_size; and the outcome does not depend on how the
//! bytes were split into reads. STARTTLS and AUTH are on for some inputs:
//! AUTH is answered from the password (only "pw" is right), and a STARTTLS
//! ends the run (real TLS would follow; what was pipelined behind it is
//! dropped by the session).
#![no_main]

use libfuzzer_sys::fuzz_target;
use poolrelay_smtp::inbound::{
    AuthPolicy, AuthVerdict, Output, Security, Session, SessionConfig, TlsInfo, Transaction,
};
use std::net::SocketAddr;

const MAX_MESSAGE_SIZE: u64 = 2000;
const MAX_RECIPIENTS: usize = 3;
const MAX_LINE_LENGTH: usize = 128;

/// What the client saw and what was queued.
#[derive(Debug, PartialEq)]
struct Seen {
    written: Vec<u8>,
    /// Each transaction with the date of our Received: header blanked.
    queued: Vec<Transaction>,
    closed: bool,
}

fn run(
    input: &[u8],
    chunks: &[usize],
    relay_allowed: bool,
    fail_every: usize,
    security: Security,
) -> Seen {
    let config = SessionConfig {
        hostname: "relay.fuzz".into(),
        max_message_size: MAX_MESSAGE_SIZE,
        max_recipients: MAX_RECIPIENTS,
        max_line_length: MAX_LINE_LENGTH,
        relay_allowed,
        max_hops: 50,
        security,
        // On, so the fuzzer reaches the MT-PRIORITY checks too.
        mt_priority: Some(poolrelay_smtp::MtPriorityPolicy::Mixer),
        mt_priority_trusted: relay_allowed,
    };
    let peer = SocketAddr::from(([192, 0, 2, 7], 40000));
    let (mut session, banner) = Session::new(config, peer);
    let mut seen = Seen {
        written: banner,
        queued: Vec::new(),
        closed: false,
    };
    let mut pos = 0;
    let mut k = 0;
    while pos < input.len() {
        let end = (pos + chunks[k % chunks.len()].max(1)).min(input.len());
        k += 1;
        // As the listener: one read, its outputs, resumed after each queued message.
        let mut outputs = session.feed(&input[pos..end]);
        pos = end;
        let _ = session.take_rejections();
        let mut close = false;
        let mut tls = false;
        loop {
            let mut resume = false;
            let mut extra = Vec::new();
            for output in outputs {
                assert!(!seen.closed, "output after Close: {output:?}");
                match output {
                    Output::Reply(bytes) => {
                        assert!(!bytes.is_empty(), "empty reply");
                        seen.written.extend_from_slice(&bytes);
                    }
                    Output::Message(tx) => {
                        let tx = check_transaction(*tx);
                        seen.queued.push(tx);
                        let n = seen.queued.len();
                        let reply = if fail_every > 0 && n.is_multiple_of(fail_every) {
                            session.queue_failed("spool write failed, try again later")
                        } else {
                            session.queued(&format!("Q{n}"))
                        };
                        seen.written.extend_from_slice(&reply);
                        resume = true;
                    }
                    Output::StartTls => {
                        session.tls_started(TlsInfo {
                            version: "TLSv1.3",
                            cipher: "TLS13_AES_128_GCM_SHA256".into(),
                        });
                        tls = true;
                    }
                    Output::Authenticate(attempt) => {
                        let verdict = if attempt.password == b"pw" {
                            AuthVerdict::Accepted
                        } else if attempt.password == b"stop" {
                            AuthVerdict::TooManyFailures
                        } else {
                            AuthVerdict::Refused
                        };
                        extra.extend(session.authenticated(&attempt, verdict));
                        resume = true;
                    }
                    Output::Close => {
                        close = true;
                    }
                }
            }
            if close {
                seen.closed = true;
            }
            if !resume || close || tls {
                break;
            }
            outputs = extra;
            outputs.extend(session.feed(&[]));
            let _ = session.take_rejections();
        }
        if tls {
            break;
        }
        if close {
            assert!(session.is_closed());
            break;
        }
    }
    check_replies(&seen.written);
    seen
}

/// Everything written is a sequence of complete reply lines: three digits
/// from 2xx to 5xx, then space, hyphen or the line end, CRLF-terminated,
/// with no other CR or LF; a multi-line reply keeps its code.
fn check_replies(written: &[u8]) {
    assert!(
        written.ends_with(b"\r\n"),
        "written data ends mid-line: {written:?}"
    );
    let mut open: Option<&[u8]> = None;
    for line in written.split_inclusive(|&b| b == b'\n') {
        let line = line
            .strip_suffix(b"\r\n")
            .unwrap_or_else(|| panic!("bare LF in reply {written:?}"));
        assert!(!line.contains(&b'\r'), "bare CR in reply line {line:?}");
        let code = line
            .get(..3)
            .unwrap_or_else(|| panic!("short reply line {line:?}"));
        assert!(
            code.iter().all(u8::is_ascii_digit) && (b'2'..=b'5').contains(&code[0]),
            "{line:?}"
        );
        if let Some(open) = open {
            assert_eq!(open, code, "code changed within a reply");
        }
        match line.get(3) {
            Some(b'-') => open = Some(code),
            None | Some(b' ') => open = None,
            Some(_) => panic!("bad reply line {line:?}"),
        }
        assert!(
            line.len() <= 510,
            "reply line over the SMTP limit of 512 bytes with CRLF"
        );
    }
    assert!(open.is_none(), "unfinished multi-line reply");
}

fn no_line_breaks(what: &str, text: &str) {
    assert!(
        !text.contains(['\r', '\n', '\0']),
        "{what} {text:?} could break a line"
    );
}

/// Checks one transaction; returns it with the Received: date blanked (the
/// clock may tick between two runs).
fn check_transaction(mut tx: Transaction) -> Transaction {
    assert!(!tx.recipients.is_empty() && tx.recipients.len() <= MAX_RECIPIENTS);
    no_line_breaks("sender", &tx.sender);
    for r in &tx.recipients {
        assert!(!r.address.is_empty(), "empty recipient");
        no_line_breaks("recipient", &r.address);
    }
    if let Some(p) = tx.mt_priority {
        assert!((-9..=9).contains(&p), "MT-PRIORITY {p} out of range");
    }
    if !tx.smtputf8 {
        assert!(tx.sender.is_ascii(), "non-ASCII sender without SMTPUTF8");
        assert!(tx.recipients.iter().all(|r| r.address.is_ascii()));
    }
    // Our Received: header: its first line, then continuation lines.
    let m = &tx.message;
    let mut header_end = 0;
    loop {
        let eol = m[header_end..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("header line")
            + header_end
            + 2;
        header_end = eol;
        if m.get(header_end) != Some(&b'\t') {
            break;
        }
    }
    assert!(
        m.starts_with(b"Received: from "),
        "no Received: header first"
    );
    let header = &m[..header_end];
    let date = header
        .iter()
        .rposition(|&b| b == b';')
        .expect("Received: has a date");
    let content = &m[header_end..];
    assert!(
        content.len() as u64 <= MAX_MESSAGE_SIZE,
        "content over the limit"
    );
    for whole in [header, content] {
        for (i, &b) in whole.iter().enumerate() {
            match b {
                b'\r' => assert_eq!(whole.get(i + 1), Some(&b'\n'), "bare CR in the message"),
                b'\n' => assert!(i > 0 && whole[i - 1] == b'\r', "bare LF in the message"),
                _ => {}
            }
        }
    }
    assert!(content.is_empty() || content.ends_with(b"\r\n"));
    let mut blanked = header[..date].to_vec();
    blanked.extend_from_slice(content);
    tx.message = blanked;
    tx
}

/// FNV-1a: split points and options that depend on the input, so the
/// corpus stays a plain SMTP conversation.
fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

fuzz_target!(|input: &[u8]| {
    let h = hash(input);
    let relay_allowed = h & 0x7 != 0;
    let fail_every = ((h >> 3) & 0x3) as usize;
    let chunks: Vec<usize> = (0..6)
        .map(|i| ((h >> (8 + i * 8)) & 0x3f) as usize)
        .collect();
    let security = Security {
        starttls: (h >> 56) & 1 != 0,
        require_tls: (h >> 57) & 1 != 0,
        auth: match (h >> 58) & 0x3 {
            0 => AuthPolicy::Off,
            1 | 2 => AuthPolicy::Optional,
            _ => AuthPolicy::Required,
        },
        auth_plaintext: (h >> 60) & 1 != 0,
    };
    let whole = run(input, &[usize::MAX], relay_allowed, fail_every, security);
    let split = run(input, &chunks, relay_allowed, fail_every, security);
    assert_eq!(
        whole, split,
        "the outcome depends on how the input was split ({chunks:?})"
    );
    if input.len() <= 512 {
        let bytewise = run(input, &[1], relay_allowed, fail_every, security);
        assert_eq!(whole, bytewise, "byte by byte differs");
    }
});
