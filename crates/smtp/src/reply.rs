//! An SMTP reply: code, enhanced status code, text.

/// A reply as read from or written to the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
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
}

impl std::fmt::Display for Reply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.enhanced {
            Some(e) => write!(f, "{} {} {}", self.code, e, self.text),
            None => write!(f, "{} {}", self.code, self.text),
        }
    }
}
