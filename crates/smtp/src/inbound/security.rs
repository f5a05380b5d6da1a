//! STARTTLS (RFC 3207) and AUTH PLAIN / LOGIN (RFC 4954): the policy of
//! when each is offered, accepted or required. The session never touches
//! a socket or a password hash: it asks its driver to start TLS
//! ([`Output::StartTls`]) or to check credentials ([`Output::Authenticate`]),
//! and is told the outcome through [`Session::tls_started`] and
//! [`Session::authenticated`].

use super::*;

/// What a listener offers and requires on top of plain SMTP.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Security {
    /// Offer STARTTLS (the listener has a certificate and is not implicit TLS).
    pub starttls: bool,
    /// Refuse MAIL with `530 5.7.0` until TLS is on.
    pub require_tls: bool,
    /// Whether AUTH is offered, and whether MAIL needs it.
    pub auth: AuthPolicy,
    /// Offer AUTH on a connection without TLS (the password then crosses
    /// the network in the clear).
    pub auth_plaintext: bool,
}

/// The `auth` setting of a listener.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AuthPolicy {
    /// No AUTH: only `relay_from` addresses may relay.
    #[default]
    Off,
    /// AUTH offered; authenticated clients may relay from any address.
    Optional,
    /// MAIL is refused with `530 5.7.0` until the client authenticated.
    Required,
}

/// The TLS a session runs over, for `Received:` and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The IANA name of the cipher suite, e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

/// Credentials a client presented, to be checked by the driver's owner.
/// Debug never shows the password.
#[derive(Clone, PartialEq, Eq)]
pub struct AuthAttempt {
    /// The authentication identity (PLAIN's authcid, LOGIN's user name).
    pub username: String,
    /// The password, as sent.
    pub password: Vec<u8>,
    /// The session already refused these credentials (a malformed PLAIN
    /// response, acting for another identity, a user name or password no
    /// account can have); user name and password are then empty. The owner
    /// checks nothing but counts, delays and limits it like a wrong
    /// password, so such guesses cost what the others cost.
    pub refused: bool,
}

impl AuthAttempt {
    /// An attempt the session refused itself (see [`AuthAttempt::refused`]).
    fn refused() -> AuthAttempt {
        AuthAttempt {
            username: String::new(),
            password: Vec::new(),
            refused: true,
        }
    }
}

impl std::fmt::Debug for AuthAttempt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthAttempt")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("refused", &self.refused)
            .finish()
    }
}

/// The owner's answer to an [`Output::Authenticate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthVerdict {
    /// The credentials are valid: `235 2.7.0`.
    Accepted,
    /// Wrong user name or password: `535 5.7.8`.
    Refused,
    /// Too many failures from this address: `421 4.7.0`, and the session closes.
    TooManyFailures,
}

/// Where a multi-line AUTH exchange stands: the next line is a
/// base64 response, not a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum AuthStep {
    /// `AUTH PLAIN` without an initial response: waiting for it.
    Plain,
    /// `AUTH LOGIN`: waiting for the user name.
    LoginUser,
    /// `AUTH LOGIN`: user name known, waiting for the password.
    LoginPassword(String),
}

/// Longest user name accepted (bytes).
pub const MAX_USERNAME: usize = 255;
/// Longest password accepted (bytes).
pub const MAX_PASSWORD: usize = 1024;

/// Whether AUTH could ever accept `username`: 1 to [`MAX_USERNAME`] bytes,
/// no control character.
pub fn username_acceptable(username: &str) -> bool {
    !username.is_empty()
        && username.len() <= MAX_USERNAME
        && !username.chars().any(char::is_control)
}

/// The reply to credentials that are wrong.
const AUTH_INVALID: &[u8] = b"535 5.7.8 Authentication credentials invalid\r\n";

impl Session {
    /// The user this session authenticated as, if any: the one place to
    /// ask whether the client proved who it is.
    pub fn authenticated_user(&self) -> Option<&str> {
        self.user.as_deref()
    }

    /// The TLS the session runs over, once started.
    pub fn tls(&self) -> Option<&TlsInfo> {
        self.tls.as_ref()
    }

    /// TLS is on (after [`Output::StartTls`], or at once for implicit TLS):
    /// the session starts over as RFC 3207 asks (the client must EHLO
    /// again, and an AUTH identity given before is forgotten, §4.2), and
    /// anything the client sent after STARTTLS, before the handshake, is
    /// dropped: it came in the clear and must never run as a command of the
    /// protected session.
    pub fn tls_started(&mut self, info: TlsInfo) {
        self.tls = Some(info);
        self.pending.clear();
        self.discarding = false;
        self.helo = None;
        self.esmtp = false;
        self.auth_step = None;
        self.user = None;
        self.reset_transaction();
        if matches!(self.state, State::AwaitTls) {
            self.state = State::Command;
        }
    }

    /// The answer to an [`Output::Authenticate`]: returns what to send (and
    /// [`Output::Close`] after too many failures). Feed `&[]` afterwards.
    pub fn authenticated(&mut self, attempt: &AuthAttempt, verdict: AuthVerdict) -> Vec<Output> {
        let mut out = Vec::new();
        if matches!(self.state, State::AwaitAuth) {
            self.state = State::Command;
        }
        let refusal = self.auth_refusal.take();
        // An owner must never accept what the session refused.
        let verdict = match (verdict, refusal) {
            (AuthVerdict::Accepted, Some(_)) => AuthVerdict::Refused,
            (v, _) => v,
        };
        match verdict {
            AuthVerdict::Accepted => {
                self.user = Some(attempt.username.clone());
                push_reply(&mut out, b"235 2.7.0 Authentication successful\r\n");
            }
            AuthVerdict::Refused => {
                let (rejection, reply) = refusal.unwrap_or((
                    Rejection::AuthFailed,
                    b"535 5.7.8 Authentication credentials invalid\r\n",
                ));
                self.refuse(&mut out, rejection, reply);
            }
            AuthVerdict::TooManyFailures => {
                self.note(Rejection::AuthFailed);
                let bye = format!(
                    "421 4.7.0 {} too many authentication failures, closing\r\n",
                    self.config.hostname
                );
                push_reply(&mut out, bye.as_bytes());
                self.close(&mut out);
            }
        }
        out
    }

    /// True when the client may name recipients anywhere: its address is in
    /// `relay_from`, or it authenticated.
    pub(super) fn may_relay(&self) -> bool {
        self.config.relay_allowed || self.user.is_some()
    }

    /// AUTH is advertised and accepted now.
    fn auth_offered(&self) -> bool {
        self.config.security.auth != AuthPolicy::Off
            && (self.tls.is_some() || self.config.security.auth_plaintext)
    }

    /// EHLO keywords for STARTTLS and AUTH, each line `250-...`.
    pub(super) fn security_keywords(&self) -> String {
        let mut keywords = String::new();
        if self.config.security.starttls && self.tls.is_none() {
            keywords.push_str("250-STARTTLS\r\n");
        }
        if self.auth_offered() && self.user.is_none() {
            keywords.push_str("250-AUTH PLAIN LOGIN\r\n");
        }
        keywords
    }

    /// Refuses MAIL that the listener's TLS or AUTH requirement forbids;
    /// returns true when it did.
    pub(super) fn mail_forbidden(&mut self, out: &mut Vec<Output>) -> bool {
        if self.helo.is_none() {
            // The usual 503 comes from MAIL itself.
            return false;
        }
        if self.config.security.require_tls && self.tls.is_none() {
            self.refuse(
                out,
                Rejection::TlsRequired,
                b"530 5.7.0 Must issue a STARTTLS command first\r\n",
            );
            return true;
        }
        if self.config.security.auth == AuthPolicy::Required && self.user.is_none() {
            let reply: &[u8] = if self.auth_offered() {
                b"530 5.7.0 Authentication required\r\n"
            } else {
                b"530 5.7.0 Authentication required; issue STARTTLS, then AUTH\r\n"
            };
            self.refuse(out, Rejection::AuthRequired, reply);
            return true;
        }
        false
    }

    /// Handles STARTTLS and AUTH (and an AUTH continuation line); returns
    /// false when `line` is neither, for the ordinary command parser.
    pub(super) fn security_command(&mut self, line: &[u8], out: &mut Vec<Output>) -> bool {
        if let Some(step) = self.auth_step.take() {
            self.auth_response(step, line, out);
            return true;
        }
        let verb = verb(line);
        if verb.eq_ignore_ascii_case(b"STARTTLS") {
            self.starttls(line, out);
            true
        } else if verb.eq_ignore_ascii_case(b"AUTH") {
            self.auth(line, out);
            true
        } else {
            false
        }
    }

    fn starttls(&mut self, line: &[u8], out: &mut Vec<Output>) {
        if !self.config.security.starttls {
            self.refuse(
                out,
                Rejection::Unimplemented,
                b"502 5.5.1 command not implemented\r\n",
            );
        } else if self.tls.is_some() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 TLS already active\r\n",
            );
        } else if self.user.is_some() {
            // RFC 3207 §4.2: TLS after AUTH would leave the identity
            // vouched for by the clear-text part of the session.
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 STARTTLS not permitted after AUTH\r\n",
            );
        } else if line.len() != b"STARTTLS\r\n".len() {
            self.refuse(
                out,
                Rejection::Syntax,
                b"501 5.5.4 STARTTLS takes no parameters\r\n",
            );
        } else {
            push_reply(out, b"220 2.0.0 Ready to start TLS\r\n");
            // Nothing more is parsed: bytes after this line are dropped by
            // tls_started, whatever happens to the handshake.
            self.state = State::AwaitTls;
            out.push(Output::StartTls);
        }
    }

    fn auth(&mut self, line: &[u8], out: &mut Vec<Output>) {
        let security = self.config.security;
        if security.auth == AuthPolicy::Off {
            self.refuse(
                out,
                Rejection::Unimplemented,
                b"502 5.5.1 command not implemented\r\n",
            );
            return;
        }
        if !self.auth_offered() {
            self.refuse(
                out,
                Rejection::TlsRequired,
                b"538 5.7.11 Encryption required for requested authentication mechanism; issue STARTTLS first\r\n",
            );
            return;
        }
        if !self.esmtp {
            self.refuse(out, Rejection::Sequence, b"503 5.5.1 send EHLO first\r\n");
            return;
        }
        if self.user.is_some() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 already authenticated\r\n",
            );
            return;
        }
        if self.mail.is_some() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"503 5.5.1 AUTH not permitted during a mail transaction\r\n",
            );
            return;
        }
        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
        let mut words = text.split(|b| *b == b' ').filter(|w| !w.is_empty()).skip(1);
        let mechanism = words.next().unwrap_or_default();
        let initial = words.next();
        if words.next().is_some() {
            self.refuse(out, Rejection::Syntax, b"501 5.5.4 AUTH syntax error\r\n");
            return;
        }
        if mechanism.eq_ignore_ascii_case(b"PLAIN") {
            match initial {
                Some(response) => self.auth_response(AuthStep::Plain, response, out),
                None => {
                    self.auth_step = Some(AuthStep::Plain);
                    push_reply(out, b"334 \r\n");
                }
            }
        } else if mechanism.eq_ignore_ascii_case(b"LOGIN") {
            match initial {
                Some(response) => self.auth_response(AuthStep::LoginUser, response, out),
                None => {
                    self.auth_step = Some(AuthStep::LoginUser);
                    push_reply(out, b"334 VXNlcm5hbWU6\r\n");
                }
            }
        } else if mechanism.is_empty() {
            self.refuse(
                out,
                Rejection::Syntax,
                b"501 5.5.4 AUTH needs a mechanism\r\n",
            );
        } else {
            self.refuse(
                out,
                Rejection::Unimplemented,
                b"504 5.5.4 Unrecognized authentication type\r\n",
            );
        }
    }

    /// One base64 response line (or an initial response) of an AUTH exchange.
    fn auth_response(&mut self, step: AuthStep, line: &[u8], out: &mut Vec<Output>) {
        let text = line.strip_suffix(b"\r\n").unwrap_or(line);
        if text == b"*" {
            self.refuse(
                out,
                Rejection::Syntax,
                b"501 5.0.0 Authentication cancelled\r\n",
            );
            return;
        }
        // "=" is an empty initial response (RFC 4954 §4).
        let decoded = if text == b"=" {
            Some(Vec::new())
        } else {
            crate::base64::decode(text)
        };
        let Some(decoded) = decoded else {
            self.refuse(
                out,
                Rejection::Syntax,
                b"501 5.5.2 Cannot decode response\r\n",
            );
            return;
        };
        let attempt = match step {
            AuthStep::Plain => {
                let mut parts = decoded.split(|b| *b == 0);
                let (Some(authzid), Some(authcid), Some(password), None) =
                    (parts.next(), parts.next(), parts.next(), parts.next())
                else {
                    self.refused_attempt(
                        out,
                        Rejection::Syntax,
                        b"501 5.5.2 malformed PLAIN response\r\n",
                    );
                    return;
                };
                // Acting for another identity is not supported.
                if !authzid.is_empty() && authzid != authcid {
                    self.refused_attempt(out, Rejection::AuthFailed, AUTH_INVALID);
                    return;
                }
                (authcid.to_vec(), password.to_vec())
            }
            AuthStep::LoginUser => {
                if decoded.len() > MAX_USERNAME {
                    self.refused_attempt(out, Rejection::AuthFailed, AUTH_INVALID);
                    return;
                }
                self.auth_step = Some(AuthStep::LoginPassword(
                    String::from_utf8_lossy(&decoded).into_owned(),
                ));
                push_reply(out, b"334 UGFzc3dvcmQ6\r\n");
                return;
            }
            AuthStep::LoginPassword(user) => (user.into_bytes(), decoded),
        };
        let (username, password) = attempt;
        let username = match String::from_utf8(username) {
            Ok(u) if username_acceptable(&u) && password.len() <= MAX_PASSWORD => u,
            // Never a valid user: refused, but counted like a wrong password.
            _ => {
                self.refused_attempt(out, Rejection::AuthFailed, AUTH_INVALID);
                return;
            }
        };
        self.state = State::AwaitAuth;
        out.push(Output::Authenticate(AuthAttempt {
            username,
            password,
            refused: false,
        }));
    }

    /// An AUTH the session refuses itself still goes to the owner (as
    /// [`AuthAttempt::refused`]) to be counted, delayed and limited;
    /// `reply` answers it then.
    fn refused_attempt(
        &mut self,
        out: &mut Vec<Output>,
        rejection: Rejection,
        reply: &'static [u8],
    ) {
        self.auth_refusal = Some((rejection, reply));
        self.state = State::AwaitAuth;
        out.push(Output::Authenticate(AuthAttempt::refused()));
    }

    /// The `with` protocol of `Received:` (RFC 3848, RFC 6531).
    pub(super) fn protocol(&self, smtputf8: bool) -> &'static str {
        let tls = self.tls.is_some();
        let auth = self.user.is_some();
        match (self.esmtp, smtputf8, tls, auth) {
            (false, _, _, _) => "SMTP",
            (true, false, false, false) => "ESMTP",
            (true, false, true, false) => "ESMTPS",
            (true, false, false, true) => "ESMTPA",
            (true, false, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }
}

#[cfg(test)]
#[path = "security_tests.rs"]
mod tests;
