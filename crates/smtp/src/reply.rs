//! An SMTP reply: code, enhanced status code, text.
//!
//! What an upstream said is stored in the spool as this typed value, so
//! DSNs, logs and the admin API derive their status from it instead of
//! parsing a string again.

use serde::{Deserialize, Serialize};

/// Most bytes of reply text kept (in the spool, logs and DSNs): an
/// upstream that answers with megabytes must not grow our records.
pub const MAX_REPLY_TEXT: usize = 512;

/// A reply as read from or written to the wire.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reply {
    /// Three-digit basic code, e.g. 250.
    pub code: u16,
    /// Enhanced status code (RFC 3463) such as "2.0.0", when present.
    pub enhanced: Option<String>,
    /// Text, lines joined with a space.
    pub text: String,
}

impl Reply {
    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }
    /// 4xx.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }
    /// 5xx.
    pub fn is_permanent(&self) -> bool {
        self.code >= 500
    }

    /// A reply made here rather than read from a peer (no connection, expiry).
    pub fn local(code: u16, enhanced: &str, text: impl Into<String>) -> Reply {
        Reply {
            code,
            enhanced: Some(enhanced.to_string()),
            text: text.into(),
        }
        .sanitized()
    }

    /// The RFC 3463 status this reply stands for: its enhanced code when
    /// it gave one of the right class, else `X.0.0` from its basic code.
    pub fn status(&self) -> String {
        let class = match self.code / 100 {
            2 => '2',
            4 => '4',
            _ => '5',
        };
        match &self.enhanced {
            Some(e) if e.starts_with(class) && is_enhanced(e) => e.clone(),
            _ => format!("{class}.0.0"),
        }
    }

    /// The same reply fit to store, log or quote: control characters
    /// (a bare CR would start a new line in a DSN) become spaces and the
    /// text is cut to [`MAX_REPLY_TEXT`] bytes.
    pub fn sanitized(mut self) -> Reply {
        self.text = clean_text(&self.text);
        if let Some(e) = &self.enhanced
            && !is_enhanced(e)
        {
            self.enhanced = None;
        }
        self
    }
}

/// `text` without control characters, cut to [`MAX_REPLY_TEXT`] bytes on a
/// character boundary.
pub fn clean_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_REPLY_TEXT));
    for c in text.chars() {
        let c = if c.is_control() { ' ' } else { c };
        if out.len() + c.len_utf8() > MAX_REPLY_TEXT {
            break;
        }
        out.push(c);
    }
    out
}

/// `class.subject.detail` with 1–3 digit parts (RFC 3463).
fn is_enhanced(s: &str) -> bool {
    let parts: Vec<&str> = s.split('.').collect();
    parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && parts[1..]
            .iter()
            .all(|p| (1..=3).contains(&p.len()) && p.bytes().all(|b| b.is_ascii_digit()))
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, enhanced: Option<&str>, text: &str) -> Reply {
        Reply {
            code,
            enhanced: enhanced.map(str::to_string),
            text: text.to_string(),
        }
    }

    #[test]
    fn status_comes_from_the_enhanced_code_else_from_the_class() {
        assert_eq!(reply(550, Some("5.1.1"), "no").status(), "5.1.1");
        assert_eq!(reply(451, None, "later").status(), "4.0.0");
        assert_eq!(reply(554, None, "no").status(), "5.0.0");
        assert_eq!(reply(250, None, "ok").status(), "2.0.0");
        // An enhanced code of another class than the basic code is not trusted.
        assert_eq!(reply(450, Some("5.1.1"), "odd").status(), "4.0.0");
    }

    #[test]
    fn sanitized_replies_have_no_control_characters_and_a_bounded_length() {
        let r = reply(550, Some("5.1.1"), "bad\rFinal-Recipient: x\n\x07").sanitized();
        assert!(!r.text.chars().any(char::is_control));
        let long = reply(550, None, &"é".repeat(10_000)).sanitized();
        assert!(long.text.len() <= MAX_REPLY_TEXT);
        assert!(
            reply(550, Some("5.x.1"), "t")
                .sanitized()
                .enhanced
                .is_none()
        );
    }
}
