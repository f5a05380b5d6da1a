//! The values the outbound client takes and gives: timeouts, envelope,
//! TLS and AUTH settings, the per-recipient report and the error.

use crate::reply::Reply;
use crate::tls::TlsError;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Timeouts per SMTP stage (RFC 5321 §4.5.3.2). Each field is named like
/// its config key without `_timeout`, and like the stage in
/// [`ClientError::Timeout`] (underscore as a space).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// TCP connect, default 30s.
    pub connect: Duration,
    /// 220 greeting, default 5m.
    pub greeting: Duration,
    /// EHLO/HELO reply, default 5m.
    pub ehlo: Duration,
    /// MAIL reply, default 5m.
    pub mail: Duration,
    /// RCPT reply, default 5m.
    pub rcpt: Duration,
    /// DATA 354, default 2m.
    pub data_init: Duration,
    /// Each block of the body written, default 3m.
    pub data_block: Duration,
    /// Reply to the final dot, default 10m.
    pub data_end: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            connect: Duration::from_secs(30),
            greeting: Duration::from_secs(300),
            ehlo: Duration::from_secs(300),
            mail: Duration::from_secs(300),
            rcpt: Duration::from_secs(300),
            data_init: Duration::from_secs(120),
            data_block: Duration::from_secs(180),
            data_end: Duration::from_secs(600),
        }
    }
}

/// The stage names found in [`ClientError::Timeout`] and
/// [`ClientError::Rejected`]. The timed ones read like the config keys
/// (`data_block_timeout` is "data block"), so a log line points at the
/// setting to change.
pub mod stage {
    /// TCP connect.
    pub const CONNECT: &str = "connect";
    /// The 220 greeting.
    pub const GREETING: &str = "greeting";
    /// EHLO.
    pub const EHLO: &str = "ehlo";
    /// HELO, after a refused EHLO.
    pub const HELO: &str = "helo";
    /// STARTTLS.
    pub const STARTTLS: &str = "starttls";
    /// AUTH and its challenges.
    pub const AUTH: &str = "auth";
    /// MAIL (and the pipelined write of MAIL and RCPTs).
    pub const MAIL: &str = "mail";
    /// RCPT.
    pub const RCPT: &str = "rcpt";
    /// DATA, up to its 354.
    pub const DATA_INIT: &str = "data init";
    /// Writing a block of the content.
    pub const DATA_BLOCK: &str = "data block";
    /// The reply to the final dot.
    pub const DATA_END: &str = "data end";
    /// RSET between transactions.
    pub const RSET: &str = "rset";
    /// QUIT.
    pub const QUIT: &str = "quit";
}

/// What to send in one transaction.
#[derive(Debug, Clone, Default)]
pub struct OutboundEnvelope {
    /// Envelope sender; empty = `<>`.
    pub sender: String,
    /// Recipients, in order.
    pub recipients: Vec<String>,
    /// Send BODY=8BITMIME when the upstream offers 8BITMIME.
    pub body_8bit: bool,
    /// Send SMTPUTF8 when offered.
    pub smtputf8: bool,
    /// ENVID (RFC 3461), decoded; sent xtext-encoded on MAIL when the
    /// upstream offers DSN.
    pub envid: Option<String>,
    /// RET: `Some(true)` = FULL, `Some(false)` = HDRS; sent on MAIL when
    /// the upstream offers DSN.
    pub ret_full: Option<bool>,
    /// DSN parameters per recipient, indexed like `recipients`; a missing
    /// entry means none. Sent on RCPT when the upstream offers DSN.
    pub dsn: Vec<RecipientDsn>,
    /// MT-PRIORITY (RFC 6710): sent on MAIL when the upstream offers the
    /// extension, else carried in an `MT-Priority:` header field (RFC 6758
    /// §4). None: the message has no priority and goes as it is.
    pub mt_priority: Option<i8>,
}

/// The DSN parameters (RFC 3461) of one recipient.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecipientDsn {
    /// NOTIFY as smtp-proto's `RCPT_NOTIFY_*` bits; 0 = not given. NEVER
    /// wins over the others.
    pub notify: u64,
    /// ORCPT: the original recipient, `rfc822;addr` as the inbound
    /// [`crate::Recipient`] stores it, or a bare `addr`; decoded (it is
    /// xtext-encoded here).
    pub orcpt: Option<String>,
}

/// How the connection to an upstream uses TLS.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    /// STARTTLS when the EHLO reply lists it, plain otherwise (also when
    /// the upstream answers 4xx/5xx to STARTTLS). Like Postfix's `may`,
    /// the certificate is not verified whatever `verify` says (signatures
    /// are). A failed TLS handshake is [`ClientError::Tls`]: the connection
    /// is gone; the caller marks the host down and may later retry it with
    /// [`TlsMode::Off`] if it wants mail to flow in clear.
    #[default]
    Opportunistic,
    /// STARTTLS or nothing: no STARTTLS offered (or refused) is
    /// [`ClientError::Tls`], a temporary failure, and nothing is sent in
    /// clear. The certificate is verified unless `verify` is false.
    Required,
    /// TLS from the first byte (SMTPS, port 465), then the greeting. The
    /// certificate is verified unless `verify` is false.
    Implicit,
    /// Never TLS, even when offered.
    Off,
}

impl TlsMode {
    /// The config spelling: `opportunistic`, `required`, `implicit` or `off`.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::Opportunistic => "opportunistic",
            TlsMode::Required => "required",
            TlsMode::Implicit => "implicit",
            TlsMode::Off => "off",
        }
    }
}

impl std::fmt::Display for TlsMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Credentials for AUTH PLAIN / LOGIN towards an upstream.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Allow AUTH over an unencrypted session (the password then crosses
    /// the network readable by anyone on the path).
    pub allow_plaintext: bool,
}

// By hand so that logging a config or options never shows the password.
impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

/// Everything [`crate::outbound::Client::connect_with`] needs besides the
/// address. `Default`: opportunistic TLS, verification on, no AUTH.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// TLS use.
    pub tls: TlsMode,
    /// Verify the certificate chain and name (Required and Implicit
    /// only); false accepts any certificate, for private smarthosts.
    pub verify: bool,
    /// Host name for SNI and certificate verification (no port; an IP
    /// literal is allowed). Empty: the peer's IP address.
    pub server_name: String,
    /// Extra trusted roots (PEM), added to Mozilla's (webpki-roots) when
    /// verifying; read at every connect.
    pub ca_file: Option<PathBuf>,
    /// AUTH after (STARTTLS and) EHLO when set.
    pub auth: Option<Credentials>,
    /// Per-stage timeouts; the TLS handshake is bounded by `greeting`,
    /// STARTTLS and AUTH replies by `ehlo`.
    pub timeouts: Timeouts,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            tls: TlsMode::default(),
            verify: true,
            server_name: String::new(),
            ca_file: None,
            auth: None,
            timeouts: Timeouts::default(),
        }
    }
}

/// The outcome of one transaction.
#[derive(Debug, Clone)]
pub struct DeliveryReport {
    /// The reply to each RCPT, in recipient order.
    pub recipients: Vec<Reply>,
    /// The reply to the final dot (or to DATA when it was refused); `None`
    /// when no recipient was accepted so DATA was not sent.
    pub data: Option<Reply>,
}

impl DeliveryReport {
    /// The reply that decides recipient `index`: its RCPT reply when that
    /// was not positive, else the reply to DATA or the final dot (which
    /// covers exactly the accepted recipients).
    pub fn outcome(&self, index: usize) -> Option<&Reply> {
        let rcpt = self.recipients.get(index)?;
        if rcpt.is_positive() {
            self.data.as_ref()
        } else {
            Some(rcpt)
        }
    }
}

/// Why a connection or transaction failed as a whole. Whose fault it was
/// is decided here ([`ClientError::marks_host_down`],
/// [`ClientError::is_about_message`]) so every caller draws the same line.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed (a timeout is [`ClientError::Timeout`] at
    /// [`stage::CONNECT`]).
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// A stage timed out.
    #[error("{stage} timed out")]
    Timeout {
        /// One of the [`stage`] names.
        stage: &'static str,
    },
    /// The upstream answered something that ends the transaction for all
    /// recipients (e.g. 421 at any stage, 5xx/4xx to MAIL or greeting).
    #[error("upstream replied {reply} at {stage}")]
    Rejected {
        /// One of the [`stage`] names.
        stage: &'static str,
        /// The reply.
        reply: Reply,
    },
    /// I/O or protocol error: the connection is unusable.
    #[error("{0}")]
    Io(String),
    /// TLS could not be had: a failed or timed-out handshake, an invalid
    /// certificate, STARTTLS not offered or refused in
    /// [`TlsMode::Required`], an unreadable `ca_file`. A temporary failure
    /// of this host: nothing was sent in clear.
    #[error("TLS: {0}")]
    Tls(String),
    /// AUTH failed or could not be attempted (the reply, or why not).
    /// Even a 5xx here is configuration trouble (wrong password, no AUTH,
    /// no TLS), not a verdict on the message: defer, never bounce.
    #[error("AUTH: {0}")]
    Auth(String),
}

impl ClientError {
    /// Whether the error says the host is unwell, so another host should
    /// be tried and this one rested: connect failures, timeouts, broken
    /// connections, TLS trouble and a 421 at any stage. Bad credentials
    /// are our configuration's fault, and other replies are answers.
    pub fn marks_host_down(&self) -> bool {
        match self {
            ClientError::Connect { .. }
            | ClientError::Timeout { .. }
            | ClientError::Io(_)
            | ClientError::Tls(_) => true,
            ClientError::Auth(_) => false,
            ClientError::Rejected { reply, .. } => reply.code == 421,
        }
    }

    /// Whether the error is the upstream's verdict on this message for
    /// every recipient (a 4xx/5xx to MAIL, say), to be applied to them
    /// like a per-recipient reply. Not a 421 (about the host), not a
    /// refused RSET (about the connection), not a refused greeting or
    /// EHLO (about us or the host).
    pub fn is_about_message(&self) -> bool {
        match self {
            ClientError::Rejected { stage, reply } => {
                reply.code != 421
                    && [
                        stage::MAIL,
                        stage::RCPT,
                        stage::DATA_INIT,
                        stage::DATA_BLOCK,
                        stage::DATA_END,
                    ]
                    .contains(stage)
            }
            _ => false,
        }
    }
}

impl From<TlsError> for ClientError {
    fn from(e: TlsError) -> Self {
        ClientError::Tls(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16) -> Reply {
        Reply {
            code,
            enhanced: None,
            text: "x".into(),
        }
    }

    fn rejected(stage: &'static str, code: u16) -> ClientError {
        ClientError::Rejected {
            stage,
            reply: reply(code),
        }
    }

    #[test]
    fn whose_fault() {
        let addr: SocketAddr = "192.0.2.1:25".parse().unwrap();
        let host_trouble = [
            ClientError::Connect {
                addr,
                reason: "refused".into(),
            },
            ClientError::Timeout {
                stage: stage::DATA_BLOCK,
            },
            ClientError::Io("reset".into()),
            ClientError::Tls("handshake".into()),
            rejected(stage::GREETING, 421),
            rejected(stage::MAIL, 421),
            rejected(stage::DATA_END, 421),
        ];
        for e in &host_trouble {
            assert!(e.marks_host_down(), "{e:?}");
            assert!(!e.is_about_message(), "{e:?}");
        }
        let message_verdicts = [
            rejected(stage::MAIL, 550),
            rejected(stage::MAIL, 452),
            rejected(stage::RCPT, 550),
            rejected(stage::DATA_INIT, 554),
            rejected(stage::DATA_END, 552),
        ];
        for e in &message_verdicts {
            assert!(!e.marks_host_down(), "{e:?}");
            assert!(e.is_about_message(), "{e:?}");
        }
        let neither = [
            ClientError::Auth("535 5.7.8 bad".into()),
            rejected(stage::RSET, 500),
            rejected(stage::GREETING, 554),
            rejected(stage::EHLO, 550),
        ];
        for e in &neither {
            assert!(!e.marks_host_down(), "{e:?}");
            assert!(!e.is_about_message(), "{e:?}");
        }
    }

    #[test]
    fn stage_names_follow_the_config_keys() {
        let e = ClientError::Timeout {
            stage: stage::DATA_END,
        };
        assert_eq!(e.to_string(), "data end timed out");
        assert_eq!(
            rejected(stage::DATA_INIT, 554).to_string(),
            "upstream replied 554 x at data init"
        );
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            username: "user".into(),
            password: "hunter2".into(),
            allow_plaintext: false,
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("user") && !shown.contains("hunter2"),
            "{shown}"
        );
    }

    #[test]
    fn tls_mode_spelling() {
        assert_eq!(TlsMode::default(), TlsMode::Opportunistic);
        assert_eq!(TlsMode::Implicit.to_string(), "implicit");
    }
}
