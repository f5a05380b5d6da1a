//! Test messages and reading their header fields.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// A name unique within this test run and across runs: `PREFIX.N.PID.NANOS@tests.poolrelay`.
/// Used for Message-IDs (without angle brackets).
pub fn unique_id(prefix: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{prefix}.{n}.{}.{nanos:x}@tests.poolrelay",
        std::process::id()
    )
}

/// A small RFC 5322 message with CRLF line endings. `message_id` is given
/// without angle brackets.
pub fn message(message_id: &str, from: &str, to: &str, subject: &str, body: &str) -> String {
    let mut m = format!(
        "From: <{from}>\r\nTo: <{to}>\r\nSubject: {subject}\r\nMessage-ID: <{message_id}>\r\n\
         Date: Thu, 01 Jan 2026 00:00:00 +0000\r\n\r\n"
    );
    for line in body.lines() {
        m.push_str(line);
        m.push_str("\r\n");
    }
    m
}

/// The first header field `name` of `raw` (case-insensitive), unfolded and trimmed.
pub fn header_value(raw: &str, name: &str) -> Option<String> {
    let mut found: Option<String> = None;
    for line in raw.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            break; // end of the header section
        }
        if line.starts_with([' ', '\t']) {
            if let Some(v) = found.as_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
            continue;
        }
        if found.is_some() {
            break;
        }
        if let Some((n, v)) = line.split_once(':')
            && n.trim().eq_ignore_ascii_case(name)
        {
            found = Some(v.trim().to_string());
        }
    }
    found
}

/// `<x>` -> `x`.
pub fn strip_brackets(s: &str) -> String {
    let s = s.trim();
    s.strip_prefix('<')
        .and_then(|s| s.strip_suffix('>'))
        .unwrap_or(s)
        .to_string()
}
