//! The syntax of what a client sends: command verbs, paths and mailboxes
//! (quoted local parts kept valid), ESMTP parameters, xtext, and the
//! escaping of client text before it goes into a reply, a header or a log.

use std::borrow::Cow;

/// Whether the path after `FROM:`/`TO:` is literally `<>`.
pub(super) fn empty_path(line: &[u8]) -> bool {
    let Some(colon) = memchr::memchr(b':', line) else {
        return false;
    };
    let rest = line.get(colon + 1..).unwrap_or_default();
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    rest.get(start..).is_some_and(|r| r.starts_with(b"<>"))
}

/// The command verb: the line up to the first space or CR.
pub(super) fn verb(line: &[u8]) -> &[u8] {
    let end = line
        .iter()
        .position(|&b| matches!(b, b' ' | b'\r' | b'\n'))
        .unwrap_or(line.len());
    &line[..end]
}

/// Commands that move no mail: a client repeating them forever holds a
/// session slot for nothing (unknown verbs count too).
pub(super) fn is_junk(verb: &[u8]) -> bool {
    const MAIL: [&[u8]; 5] = [b"MAIL", b"RCPT", b"DATA", b"QUIT", b"BDAT"];
    !MAIL.iter().any(|v| verb.eq_ignore_ascii_case(v))
}

/// Splits a MAIL/RCPT line into the text inside the path's angle brackets
/// (quoted strings may hold `>`) and the parameters after it. Empty
/// slices when there is no bracketed path.
pub(super) fn split_path(line: &[u8]) -> (&[u8], &[u8]) {
    let Some(colon) = memchr::memchr(b':', line) else {
        return (&[], &[]);
    };
    let rest = &line[colon + 1..];
    let start = rest.iter().position(|&b| b != b' ').unwrap_or(rest.len());
    let Some(rest) = rest[start..].strip_prefix(b"<") else {
        return (&[], &[]);
    };
    let mut quoted = false;
    let mut i = 0;
    while let Some(&b) = rest.get(i) {
        match b {
            b'\\' if quoted => i += 1,
            b'"' => quoted = !quoted,
            b'>' if !quoted => return (&rest[..i], &rest[i + 1..]),
            _ => {}
        }
        i += 1;
    }
    (&[], &[])
}

/// `KEY=VALUE` parameters after a path (a key alone has an empty value).
pub(super) fn parameters(params: &[u8]) -> impl Iterator<Item = (&[u8], &[u8])> {
    params
        .split(|&b| b == b' ')
        .map(|p| p.strip_suffix(b"\r\n").unwrap_or(p))
        .filter(|p| !p.is_empty())
        .map(|p| match memchr::memchr(b'=', p) {
            Some(eq) => (&p[..eq], &p[eq + 1..]),
            None => (p, &p[p.len()..]),
        })
}

/// Decodes RFC 3461 xtext; `None` when it is not xtext, empty, not UTF-8
/// or holds control characters once decoded.
pub(super) fn xtext_decode(raw: &[u8]) -> Option<String> {
    let mut bytes = Vec::with_capacity(raw.len());
    let mut i = 0;
    while let Some(&b) = raw.get(i) {
        match b {
            b'+' => {
                let hex = std::str::from_utf8(raw.get(i + 1..i + 3)?).ok()?;
                if !hex.bytes().all(|h| h.is_ascii_hexdigit()) {
                    return None;
                }
                bytes.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'!'..=b'~' if b != b'=' => {
                bytes.push(b);
                i += 1;
            }
            _ => return None,
        }
    }
    let text = String::from_utf8(bytes).ok()?;
    (!text.is_empty() && !text.chars().any(char::is_control)).then_some(text)
}

/// `atext` of RFC 5322, plus any non-ASCII character (RFC 6531).
pub(super) fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric()
        || "!#$%&'*+-/=?^_`{|}~".contains(c)
        || (!c.is_ascii() && !c.is_control())
}

/// A local part that needs no quotes: atoms of atext joined by single dots.
pub(super) fn is_dot_string(local: &str) -> bool {
    !local.is_empty()
        && local
            .split('.')
            .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Parses the mailbox inside a path's brackets (an RFC 5321 source route
/// is dropped) into the form the envelope keeps and the client writes as
/// `<...>`: the local part unquoted when it can be, else quoted with `"`
/// and `\` escaped. `None` for anything else, control characters included.
pub(super) fn mailbox(path: &[u8]) -> Option<String> {
    let mut text = std::str::from_utf8(path).ok()?;
    if text.starts_with('@') {
        text = &text[text.find(':')? + 1..];
    }
    let (local, domain) = if let Some(quoted) = text.strip_prefix('"') {
        let mut local = String::new();
        let mut chars = quoted.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '"' => break i,
                '\\' => {
                    let (_, escaped) = chars.next()?;
                    if escaped.is_control() || escaped == '\t' {
                        return None;
                    }
                    local.push(escaped);
                }
                c if c.is_control() => return None,
                c => local.push(c),
            }
        };
        (local, quoted[end + 1..].strip_prefix('@')?)
    } else {
        let (local, domain) = text.split_once('@')?;
        if !is_dot_string(local) {
            return None;
        }
        (local.to_string(), domain)
    };
    let domain_ok = if let Some(literal) = domain.strip_prefix('[') {
        literal.strip_suffix(']').is_some_and(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_graphic() && !matches!(b, b'[' | b']' | b'\\'))
        })
    } else {
        is_dot_string(domain)
    };
    if local.is_empty() || !domain_ok {
        return None;
    }
    if is_dot_string(&local) {
        return Some(format!("{local}@{domain}"));
    }
    let mut quoted = String::with_capacity(local.len() + 3 + domain.len());
    quoted.push('"');
    for c in local.chars() {
        if matches!(c, '"' | '\\') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push_str("\"@");
    quoted.push_str(domain);
    Some(quoted)
}

/// How many `Received:` fields the header section of `message` holds.
pub(super) fn count_received(message: &[u8]) -> usize {
    let mut count = 0;
    for line in message.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.starts_with(b" ") || line.starts_with(b"\t") {
            continue;
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            // The empty line, or a line that is no header field: the body.
            break;
        };
        let name = line[..colon].trim_ascii_end();
        if name.is_empty() || !name.iter().all(|b| b.is_ascii_graphic()) {
            break;
        }
        if name.eq_ignore_ascii_case(b"Received") {
            count += 1;
        }
    }
    count
}

/// Client-supplied text for a log line: control characters and `\`
/// escaped (`\r`, `\u{1b}`, `\\`), so a client cannot forge lines or
/// send terminal escapes. Borrowed when nothing needs escaping.
pub fn log_safe(text: &str) -> Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() || c == '\\') {
        return Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if c.is_control() || c == '\\' {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    Cow::Owned(out)
}

/// Client-supplied text echoed in a reply: no control characters, so it
/// can never end the reply line early.
pub(super) fn printable(text: &str) -> String {
    text.chars()
        .take(256)
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

/// Client-supplied text in our Received: header: printable ASCII without
/// the characters that would change its structure (comments, `;`).
pub(super) fn header_safe(text: &str) -> String {
    text.chars()
        .take(256)
        .map(|c| {
            if c.is_ascii_graphic() && !matches!(c, '(' | ')' | ';' | '\\' | '<' | '>') {
                c
            } else {
                '?'
            }
        })
        .collect()
}
