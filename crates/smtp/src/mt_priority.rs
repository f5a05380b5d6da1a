//! MT-PRIORITY (RFC 6710, amended by RFC 6758): the policy a listener
//! advertises, the value syntax, and the `MT-Priority:` header field that
//! carries the value through an upstream without the extension.
//!
//! Pure functions on plain values; the session and the client call them.

use std::fmt;

/// The priority assignment policy advertised after `MT-PRIORITY` in EHLO
/// (RFC 6710). It tells clients how many distinct levels the server
/// tells apart; every value from -9 to 9 is accepted whatever the policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MtPriorityPolicy {
    /// `MIXER`: the levels of X.400/Internet mail gateways (RFC 2156).
    Mixer,
    /// `STANAG4406`: the levels of military messaging (STANAG 4406).
    Stanag4406,
    /// `NSEP`: the levels of National Security / Emergency Preparedness.
    Nsep,
}

impl MtPriorityPolicy {
    /// Every policy, in the order the config error lists them.
    pub const ALL: [MtPriorityPolicy; 3] = [
        MtPriorityPolicy::Mixer,
        MtPriorityPolicy::Stanag4406,
        MtPriorityPolicy::Nsep,
    ];

    /// The name as advertised in EHLO (upper case).
    pub fn as_str(self) -> &'static str {
        match self {
            MtPriorityPolicy::Mixer => "MIXER",
            MtPriorityPolicy::Stanag4406 => "STANAG4406",
            MtPriorityPolicy::Nsep => "NSEP",
        }
    }

    /// The name as written in the config (lower case).
    pub fn config_name(self) -> &'static str {
        match self {
            MtPriorityPolicy::Mixer => "mixer",
            MtPriorityPolicy::Stanag4406 => "stanag4406",
            MtPriorityPolicy::Nsep => "nsep",
        }
    }

    /// A policy by name, any case.
    pub fn from_name(name: &str) -> Option<MtPriorityPolicy> {
        Self::ALL
            .into_iter()
            .find(|p| p.as_str().eq_ignore_ascii_case(name.trim()))
    }
}

impl fmt::Display for MtPriorityPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Lowest priority value (RFC 6710 §3).
pub const MIN: i8 = -9;
/// Highest priority value.
pub const MAX: i8 = 9;

/// The value of `MT-PRIORITY=` (RFC 6710 §3: an optional sign and one
/// digit, -9 to 9); None when malformed or out of range.
pub fn parse_value(raw: &[u8]) -> Option<i8> {
    let (negative, digits) = match raw.split_first() {
        Some((b'-', rest)) => (true, rest),
        Some((b'+', rest)) => (false, rest),
        _ => (false, raw),
    };
    match digits {
        [d @ b'0'..=b'9'] => {
            let v = (d - b'0') as i8;
            Some(if negative { -v } else { v })
        }
        _ => None,
    }
}

/// The name of the header field that carries the priority (RFC 6758 §4).
pub const HEADER: &str = "MT-Priority";

/// The message with every `MT-Priority:` header field removed (any case,
/// continuation lines included) and one `MT-Priority: value` added at the
/// end of the header section, as RFC 6758 §4 asks of a relay whose next
/// hop does not offer the extension. Only the header section is read or
/// changed; the body and every line ending are kept byte for byte.
/// `message` is unstuffed (dot-stuffing happens when it is sent).
pub fn set_header(message: &[u8], value: i8) -> Vec<u8> {
    rewrite(message, Some(value))
}

/// The message with every `MT-Priority:` header field removed, as
/// [`set_header`] removes them, and none added: for a next hop that gets
/// the priority as a parameter, or a message without one, so that a
/// client's own field never reaches a reader that would honour it.
/// Borrowed when there is no such field.
pub fn remove_header(message: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if has_header(message) {
        std::borrow::Cow::Owned(rewrite(message, None))
    } else {
        std::borrow::Cow::Borrowed(message)
    }
}

/// The header section's lines (each with its line ending), up to the
/// empty line before the body; and where the rest starts.
fn header_lines(message: &[u8]) -> (Vec<&[u8]>, usize) {
    let mut lines = Vec::new();
    let mut pos = 0;
    while pos < message.len() {
        let end = message[pos..]
            .iter()
            .position(|&b| b == b'\n')
            .map_or(message.len(), |i| pos + i + 1);
        let line = &message[pos..end];
        if line_content(line).is_empty() {
            // The empty line before the body.
            break;
        }
        lines.push(line);
        pos = end;
    }
    (lines, pos)
}

fn line_content(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\n")
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l))
        .unwrap_or(line)
}

fn has_header(message: &[u8]) -> bool {
    header_lines(message).0.iter().any(|l| {
        let content = line_content(l);
        !matches!(content[0], b' ' | b'\t') && is_field(content, HEADER)
    })
}

fn rewrite(message: &[u8], value: Option<i8>) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + HEADER.len() + 8);
    let (lines, body) = header_lines(message);
    let mut dropping = false;
    for line in lines {
        let content = line_content(line);
        if !matches!(content[0], b' ' | b'\t') {
            dropping = is_field(content, HEADER);
        }
        if !dropping {
            out.extend_from_slice(line);
        }
    }
    if let Some(value) = value {
        if !out.is_empty() && !out.ends_with(b"\n") {
            // A message that is all header and lacks its last line ending.
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(format!("{HEADER}: {value}\r\n").as_bytes());
    }
    out.extend_from_slice(&message[body..]);
    out
}

/// Whether a header line starts field `name` (`Name:` or the obsolete
/// `Name :`), ignoring case. Whitespace around the name is trimmed as the
/// classifier's header parser trims it, so every field a lenient reader
/// would take for `name` is found.
fn is_field(line: &[u8], name: &str) -> bool {
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return false;
    };
    String::from_utf8_lossy(&line[..colon])
        .trim()
        .eq_ignore_ascii_case(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_a_sign_and_one_digit() {
        for (raw, want) in [
            ("0", Some(0)),
            ("6", Some(6)),
            ("+6", Some(6)),
            ("-9", Some(-9)),
            ("9", Some(9)),
            ("-0", Some(0)),
            ("12", None),
            ("-10", None),
            ("06", None),
            ("", None),
            ("-", None),
            ("+", None),
            ("a", None),
            ("5 ", None),
            ("--5", None),
        ] {
            assert_eq!(parse_value(raw.as_bytes()), want, "{raw:?}");
        }
    }

    #[test]
    fn policies_by_name() {
        assert_eq!(
            MtPriorityPolicy::from_name("Stanag4406"),
            Some(MtPriorityPolicy::Stanag4406)
        );
        assert_eq!(
            MtPriorityPolicy::from_name("nsep").map(|p| p.as_str()),
            Some("NSEP")
        );
        assert_eq!(
            MtPriorityPolicy::from_name("mixer ").map(|p| p.config_name()),
            Some("mixer")
        );
        assert_eq!(MtPriorityPolicy::from_name("high"), None);
    }

    fn removed(message: &str) -> String {
        String::from_utf8(remove_header(message.as_bytes()).into_owned()).unwrap()
    }

    #[test]
    fn remove_header_removes_every_field_and_adds_none() {
        let msg = "Received: x\r\nMT-Priority: 9\r\nSubject: a\r\n\
                   mt-priority :\r\n  4\r\n\t(folded)\r\nTo: b\r\n\
                   \r\nMT-Priority: 1\r\n";
        assert_eq!(
            removed(msg),
            "Received: x\r\nSubject: a\r\nTo: b\r\n\r\nMT-Priority: 1\r\n"
        );
        assert_eq!(removed("MT-Priority: 9"), "");
        assert_eq!(removed("MT-Priority: 9\r\n\r\nbody"), "\r\nbody");
        // Nothing to remove: the message itself, not a copy.
        let plain = "X-MT-Priority: 2\r\nSubject: MT-Priority: 4\r\n\r\nMT-Priority: 5\r\n";
        assert!(matches!(
            remove_header(plain.as_bytes()),
            std::borrow::Cow::Borrowed(m) if m == plain.as_bytes()
        ));
        assert!(matches!(
            remove_header(b""),
            std::borrow::Cow::Borrowed(b"")
        ));
    }

    fn rewritten(message: &str, value: i8) -> String {
        String::from_utf8(set_header(message.as_bytes(), value)).unwrap()
    }

    #[test]
    fn adds_the_field_at_the_end_of_the_header() {
        assert_eq!(
            rewritten("Received: x\r\nSubject: hi\r\n\r\nbody\r\n", 6),
            "Received: x\r\nSubject: hi\r\nMT-Priority: 6\r\n\r\nbody\r\n"
        );
        assert_eq!(
            rewritten("Subject: hi\r\n\r\n", -3),
            "Subject: hi\r\nMT-Priority: -3\r\n\r\n"
        );
    }

    #[test]
    fn removes_existing_fields_in_any_case_and_folded() {
        let msg = "Received: x\r\nMT-Priority: 2\r\nSubject: a\r\n\
                   mt-priority :\r\n  4\r\n\t(folded)\r\nTo: b\r\nMT-Priority\x0b: 3\r\n\
                   \r\nMT-Priority: 1\r\n";
        assert_eq!(
            rewritten(msg, 6),
            "Received: x\r\nSubject: a\r\nTo: b\r\nMT-Priority: 6\r\n\r\nMT-Priority: 1\r\n"
        );
    }

    #[test]
    fn keeps_lookalike_fields_and_the_body_byte_for_byte() {
        let msg = "X-MT-Priority: 2\r\nMT-Priority-Old: 3\r\nSubject: MT-Priority: 4\r\n\r\n\
                   .leading dot\r\nMT-Priority: 5\r\n\r\nlast";
        let out = rewritten(msg, 1);
        assert_eq!(
            out,
            "X-MT-Priority: 2\r\nMT-Priority-Old: 3\r\nSubject: MT-Priority: 4\r\n\
             MT-Priority: 1\r\n\r\n.leading dot\r\nMT-Priority: 5\r\n\r\nlast"
        );
    }

    #[test]
    fn a_message_without_body_or_last_line_ending() {
        assert_eq!(
            rewritten("Subject: a\r\n", 0),
            "Subject: a\r\nMT-Priority: 0\r\n"
        );
        assert_eq!(
            rewritten("Subject: a\r\nMT-Priority: 3", 0),
            "Subject: a\r\nMT-Priority: 0\r\n"
        );
        assert_eq!(
            rewritten("Subject: a", 0),
            "Subject: a\r\nMT-Priority: 0\r\n"
        );
        assert_eq!(rewritten("", 0), "MT-Priority: 0\r\n");
        assert_eq!(rewritten("\r\nbody", 2), "MT-Priority: 2\r\n\r\nbody");
    }
}
