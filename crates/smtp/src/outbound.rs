//! The outbound SMTP client: one connection to an upstream, reused for many
//! messages, reporting the outcome per recipient.

use crate::data::DataEncoder;
use crate::reply::Reply;
use crate::tls::TlsSetup;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::time::timeout;

/// Timeouts per SMTP stage (RFC 5321 §4.5.3.2).
#[derive(Debug, Clone, Copy)]
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

/// Credentials for AUTH PLAIN / LOGIN towards an upstream.
#[derive(Clone)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password.
    pub password: String,
    /// Allow AUTH over an unencrypted session (the password then crosses
    /// the network readable by anyone on the path).
    pub allow_plaintext: bool,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .field("allow_plaintext", &self.allow_plaintext)
            .finish()
    }
}

/// Everything [`Client::connect_with`] needs besides the address.
/// `Default`: opportunistic TLS, verification on, no AUTH.
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

/// Why a connection or transaction failed as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed or timed out.
    #[error("connect to {addr} failed: {reason}")]
    Connect {
        /// Address tried.
        addr: SocketAddr,
        /// Cause.
        reason: String,
    },
    /// A stage timed out.
    #[error("timeout waiting for the {stage} reply")]
    Timeout {
        /// Stage name: greeting, EHLO, HELO, MAIL, RCPT, DATA, body (a
        /// block of content written), dot, RSET.
        stage: &'static str,
    },
    /// The upstream answered something that ends the transaction for all
    /// recipients (e.g. 421 at any stage, 5xx/4xx to MAIL or greeting).
    #[error("upstream replied {reply} at {stage}")]
    Rejected {
        /// Stage name.
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

/// What the upstream offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// EHLO was accepted (false: we fell back to HELO, nothing offered).
    pub esmtp: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870): `Some(limit)`, 0 meaning no fixed limit.
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// AUTH mechanisms offered, upper case.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads the keyword lines of a 250 EHLO reply (the first line, the
    /// server's name, excluded).
    fn parse<'a>(lines: impl Iterator<Item = &'a str>) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        for line in lines {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            match keyword.as_str() {
                "PIPELINING" => caps.pipelining = true,
                "SIZE" => {
                    caps.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                }
                "8BITMIME" => caps.eightbitmime = true,
                "SMTPUTF8" => caps.smtputf8 = true,
                "DSN" => caps.dsn = true,
                "STARTTLS" => caps.starttls = true,
                "ENHANCEDSTATUSCODES" => caps.enhanced_status_codes = true,
                "AUTH" => caps.auth.extend(words.map(|w| w.to_ascii_uppercase())),
                other => {
                    // Old servers write AUTH=LOGIN PLAIN.
                    if let Some(first) = other.strip_prefix("AUTH=") {
                        caps.auth.push(first.to_string());
                        caps.auth.extend(words.map(|w| w.to_ascii_uppercase()));
                    }
                }
            }
        }
        caps.auth.sort();
        caps.auth.dedup();
        caps
    }
}

/// Any byte stream the client can speak SMTP over: plain TCP or TLS.
trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Longest reply line accepted from an upstream; beyond, it is broken.
const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one reply (EHLO replies have a dozen or so).
const MAX_REPLY_LINES: usize = 128;
/// Content is encoded and written in blocks of this many input bytes.
const BLOCK: usize = 64 * 1024;

/// One open connection to an upstream.
pub struct Client {
    io: BufReader<Box<dyn Stream>>,
    peer: SocketAddr,
    timeouts: Timeouts,
    greeting: Reply,
    caps: Capabilities,
    /// TLS negotiated here (implicit or STARTTLS).
    tls: bool,
    /// False once an I/O error, timeout, 421 or protocol error happened:
    /// the SMTP state of the connection is then unknown.
    usable: bool,
    /// An RSET asked for on a PIPELINING connection, not sent yet: it goes
    /// out in the same write as the next MAIL and RCPTs (RFC 2920 allows
    /// RSET in a group), saving a round trip per reused connection.
    rset_pending: bool,
}

impl Client {
    /// Connects (TCP_NODELAY set), reads the greeting, sends EHLO (falling
    /// back to HELO), records the capabilities. Never TLS nor AUTH: the
    /// same as [`Client::connect_with`] with [`TlsMode::Off`].
    pub async fn connect(
        addr: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError> {
        let stream = tcp_connect(addr, timeouts.connect).await?;
        Client::handshake(stream, addr, helo_name, timeouts).await
    }

    /// Connects as [`Client::connect`] does, then applies `options.tls`
    /// (implicit TLS, or STARTTLS followed by a new EHLO whose
    /// capabilities replace the first ones) and, when `options.auth` is
    /// set, authenticates (PLAIN when offered, else LOGIN).
    ///
    /// Errors: [`ClientError::Tls`] when TLS was required or started but
    /// failed (nothing was sent in clear), [`ClientError::Auth`] when AUTH
    /// failed or could not be tried; both are reasons to defer, not to
    /// bounce. The connection is closed (QUIT when possible) on error.
    pub async fn connect_with(
        addr: SocketAddr,
        helo_name: &str,
        options: &ConnectOptions,
    ) -> Result<Client, ClientError> {
        let t = options.timeouts;
        // Set up before connecting: a bad ca_file or name costs no connection.
        let setup = match options.tls {
            TlsMode::Off => None,
            // Opportunistic TLS authenticates nobody (RFC 7435): a
            // self-signed smarthost still gets encryption.
            TlsMode::Opportunistic => Some(TlsSetup::new(false, None, &options.server_name, addr)?),
            TlsMode::Required | TlsMode::Implicit => Some(TlsSetup::new(
                options.verify,
                options.ca_file.as_deref(),
                &options.server_name,
                addr,
            )?),
        };
        let stream = tcp_connect(addr, t.connect).await?;
        let mut client = match (&setup, options.tls) {
            (Some(setup), TlsMode::Implicit) => {
                let stream = setup.wrap(stream, t.greeting).await?;
                Client::open(Box::new(stream), addr, helo_name, t, true).await?
            }
            _ => Client::open(Box::new(stream), addr, helo_name, t, false).await?,
        };
        if let (Some(setup), TlsMode::Opportunistic | TlsMode::Required) = (&setup, options.tls) {
            client = client
                .starttls(setup, options.tls == TlsMode::Required, helo_name)
                .await?;
        }
        if let Some(credentials) = &options.auth
            && let Err(e) = client.authenticate(credentials).await
        {
            client.quit().await;
            return Err(e);
        }
        Ok(client)
    }

    /// Speaks SMTP over an already open stream (e.g. one wrapped in TLS):
    /// reads the greeting, sends EHLO/HELO. `peer` is only for reporting.
    /// [`Client::is_tls`] is false for it whatever the stream is.
    pub async fn handshake<S>(
        stream: S,
        peer: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        Client::open(Box::new(stream), peer, helo_name, timeouts, false).await
    }

    /// Greeting and EHLO/HELO over `stream`.
    async fn open(
        stream: Box<dyn Stream>,
        peer: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
        tls: bool,
    ) -> Result<Client, ClientError> {
        if helo_name.is_empty()
            || helo_name
                .bytes()
                .any(|b| b.is_ascii_whitespace() || b.is_ascii_control())
        {
            return Err(ClientError::Io(format!("invalid HELO name {helo_name:?}")));
        }
        let mut client = Client {
            io: BufReader::new(stream),
            peer,
            timeouts,
            greeting: Reply {
                code: 0,
                enhanced: None,
                text: String::new(),
            },
            caps: Capabilities::default(),
            tls,
            usable: true,
            rset_pending: false,
        };
        let greeting = client.read_reply("greeting", timeouts.greeting).await?;
        if !greeting.is_positive() {
            client.usable = false;
            return Err(ClientError::Rejected {
                stage: "greeting",
                reply: greeting,
            });
        }
        client.greeting = greeting;
        client.hello(helo_name, true).await?;
        Ok(client)
    }

    /// EHLO, recording the capabilities; on a permanent refusal HELO when
    /// `helo_fallback` (then nothing is offered).
    async fn hello(&mut self, helo_name: &str, helo_fallback: bool) -> Result<(), ClientError> {
        let limit = self.timeouts.ehlo;
        self.caps = Capabilities::default();
        let ehlo = format!("EHLO {helo_name}\r\n");
        self.write(ehlo.as_bytes(), "EHLO", limit).await?;
        let (reply, lines) = self.read_reply_lines("EHLO", limit).await?;
        if reply.is_positive() {
            self.caps = Capabilities::parse(lines.iter().skip(1).map(String::as_str));
            return Ok(());
        }
        if !reply.is_permanent() || !helo_fallback {
            // 421, a temporary refusal or nonsense: HELO would fare no better.
            self.usable = false;
            return Err(ClientError::Rejected {
                stage: "EHLO",
                reply,
            });
        }
        let helo = format!("HELO {helo_name}\r\n");
        let reply = self.command(helo.as_bytes(), "HELO", limit).await?;
        if !reply.is_positive() {
            self.usable = false;
            return Err(ClientError::Rejected {
                stage: "HELO",
                reply,
            });
        }
        Ok(())
    }

    /// STARTTLS when offered, then EHLO again. Not offered or refused:
    /// `required` fails with [`ClientError::Tls`] (after QUIT), otherwise
    /// the session goes on in clear.
    async fn starttls(
        mut self,
        setup: &TlsSetup,
        required: bool,
        helo_name: &str,
    ) -> Result<Client, ClientError> {
        if !self.caps.starttls {
            if !required {
                return Ok(self);
            }
            let peer = self.peer;
            self.quit().await;
            return Err(ClientError::Tls(format!(
                "{peer} does not offer STARTTLS and TLS is required; nothing sent"
            )));
        }
        let limit = self.timeouts.ehlo;
        let reply = self.command(b"STARTTLS\r\n", "STARTTLS", limit).await?;
        match reply.code {
            220 => {}
            421 => {
                return Err(ClientError::Rejected {
                    stage: "STARTTLS",
                    reply,
                });
            }
            // RFC 3207 §4: after a refusal the session goes on in clear.
            _ if (reply.is_transient() || reply.is_permanent()) && !required => {
                return Ok(self);
            }
            _ if reply.is_transient() || reply.is_permanent() => {
                self.quit().await;
                return Err(ClientError::Tls(format!(
                    "STARTTLS refused ({reply}) and TLS is required; nothing sent"
                )));
            }
            _ => {
                self.usable = false;
                return Err(ClientError::Tls(format!(
                    "unexpected reply to STARTTLS: {reply}"
                )));
            }
        }
        if !self.io.buffer().is_empty() {
            // Bytes sent after the 220 would be taken as if they had come
            // over TLS (the STARTTLS command injection of CVE-2011-0411).
            self.usable = false;
            return Err(ClientError::Tls(
                "upstream sent data after its 220 to STARTTLS".into(),
            ));
        }
        let stream = self.io.into_inner();
        let stream = setup.wrap(stream, self.timeouts.greeting).await?;
        self.io = BufReader::new(Box::new(stream));
        self.tls = true;
        self.hello(helo_name, false).await?;
        Ok(self)
    }

    /// AUTH PLAIN (preferred) or LOGIN; 235 is success.
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ClientError> {
        if !self.tls && !credentials.allow_plaintext {
            return Err(ClientError::Auth(
                "refusing to send the password in clear: the session is not encrypted \
                 (require TLS, or allow plaintext AUTH for this upstream)"
                    .into(),
            ));
        }
        if self.caps.auth.is_empty() {
            return Err(ClientError::Auth("upstream offers no AUTH".into()));
        }
        let Credentials {
            username, password, ..
        } = credentials;
        if username.contains('\0') || password.contains('\0') {
            return Err(ClientError::Auth(
                "the user name or password contains a NUL character".into(),
            ));
        }
        let limit = self.timeouts.ehlo;
        let offers = |mechanism: &str| self.caps.auth.iter().any(|m| m == mechanism);
        let (plain, login) = (offers("PLAIN"), offers("LOGIN"));
        let reply = if plain {
            let token = base64(format!("\0{username}\0{password}").as_bytes());
            let reply = self
                .command(format!("AUTH PLAIN {token}\r\n").as_bytes(), "AUTH", limit)
                .await?;
            if reply.code == 334 {
                // A server that ignored the initial response asks for it.
                self.command(format!("{token}\r\n").as_bytes(), "AUTH", limit)
                    .await?
            } else {
                reply
            }
        } else if login {
            let mut reply = self.command(b"AUTH LOGIN\r\n", "AUTH", limit).await?;
            for secret in [username, password] {
                if reply.code != 334 {
                    break;
                }
                let line = format!("{}\r\n", base64(secret.as_bytes()));
                reply = self.command(line.as_bytes(), "AUTH", limit).await?;
            }
            reply
        } else {
            return Err(ClientError::Auth(format!(
                "upstream offers AUTH {} but neither PLAIN nor LOGIN",
                self.caps.auth.join(" ")
            )));
        };
        match reply.code {
            235 => Ok(()),
            421 => Err(ClientError::Rejected {
                stage: "AUTH",
                reply,
            }),
            334 => {
                // More challenges than the mechanism has: cancel (RFC 4954).
                let _ = self.command(b"*\r\n", "AUTH", limit).await;
                Err(ClientError::Auth(format!("unexpected challenge {reply}")))
            }
            _ => Err(ClientError::Auth(reply.to_string())),
        }
    }

    /// Whether the session is encrypted (TLS negotiated by this client,
    /// implicit or STARTTLS), for logs.
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    /// Whether the upstream advertised PIPELINING.
    pub fn pipelining(&self) -> bool {
        self.caps.pipelining
    }

    /// Everything the upstream advertised.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// The upstream's 220 greeting, for logs.
    pub fn greeting(&self) -> &Reply {
        &self.greeting
    }

    /// The address connected to.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// False once the connection must not be reused: after an I/O error, a
    /// timeout, a 421, an unexpected reply or a refused RSET.
    pub fn is_usable(&self) -> bool {
        self.usable
    }

    /// Runs one transaction: MAIL, every RCPT (pipelined when offered),
    /// DATA only if a recipient was accepted, the dot-stuffed body.
    /// `message` is unstuffed with CRLF line ends.
    ///
    /// On `Ok` no transaction is left open, so the next `send` may follow
    /// directly (RSET is sent here when the transaction stopped before the
    /// content). `Err(Rejected { stage: "MAIL" })` with a reply other than
    /// 421 also leaves the connection usable; [`Client::is_usable`] tells.
    /// Addresses containing control characters or angle brackets are never
    /// sent: a bad sender fails the transaction with a local 501 5.1.7, a
    /// bad recipient gets a local 501 5.1.3 in the report. An envelope
    /// without recipients sends nothing and returns an empty report.
    pub async fn send(
        &mut self,
        envelope: &OutboundEnvelope,
        message: &[u8],
    ) -> Result<DeliveryReport, ClientError> {
        self.ensure_usable()?;
        let t = self.timeouts;
        if envelope.recipients.is_empty() {
            return Ok(DeliveryReport {
                recipients: Vec::new(),
                data: None,
            });
        }
        if !path_is_safe(&envelope.sender) {
            return Err(ClientError::Rejected {
                stage: "MAIL",
                reply: local_reply("5.1.7", "invalid sender address, not sent"),
            });
        }
        let mail = self.mail_command(envelope, message.len());
        // None: refused locally, never sent.
        let rcpts: Vec<Option<String>> = envelope
            .recipients
            .iter()
            .enumerate()
            .map(|(i, r)| self.rcpt_command(r, envelope.dsn.get(i)))
            .collect();
        let mut results = Vec::with_capacity(rcpts.len());

        if self.caps.pipelining {
            // One write for a pending RSET, MAIL and every RCPT, then the
            // replies in order.
            let rset = std::mem::take(&mut self.rset_pending);
            let mut batch = if rset {
                b"RSET\r\n".to_vec()
            } else {
                Vec::new()
            };
            batch.extend_from_slice(mail.as_bytes());
            for cmd in rcpts.iter().flatten() {
                batch.extend_from_slice(cmd.as_bytes());
            }
            self.write(&batch, "MAIL", t.mail).await?;
            if rset {
                let reply = self.read_reply("RSET", t.mail).await?;
                if !reply.is_positive() {
                    // A server that refuses RSET is in a state we cannot reason about.
                    self.usable = false;
                    return Err(ClientError::Rejected {
                        stage: "RSET",
                        reply,
                    });
                }
            }
            let mail_reply = self.read_reply("MAIL", t.mail).await?;
            self.expect_final(&mail_reply)?;
            if mail_reply.code == 421 {
                return Err(ClientError::Rejected {
                    stage: "MAIL",
                    reply: mail_reply,
                });
            }
            // Read every RCPT reply even after a refused MAIL, so the
            // connection stays in step.
            for cmd in &rcpts {
                let reply = match cmd {
                    None => local_reply("5.1.3", "invalid recipient address, not sent"),
                    Some(_) => match self.rcpt_reply().await {
                        Ok(reply) => reply,
                        // Some servers hang up after refusing MAIL: the
                        // refusal is the news, not the lost connection.
                        Err(_) if !mail_reply.is_positive() => {
                            return Err(ClientError::Rejected {
                                stage: "MAIL",
                                reply: mail_reply,
                            });
                        }
                        Err(e) => return Err(e),
                    },
                };
                results.push(reply);
            }
            if !mail_reply.is_positive() {
                return Err(ClientError::Rejected {
                    stage: "MAIL",
                    reply: mail_reply,
                });
            }
        } else {
            let mail_reply = self.command(mail.as_bytes(), "MAIL", t.mail).await?;
            self.expect_final(&mail_reply)?;
            if !mail_reply.is_positive() {
                return Err(ClientError::Rejected {
                    stage: "MAIL",
                    reply: mail_reply,
                });
            }
            for cmd in &rcpts {
                let reply = match cmd {
                    None => local_reply("5.1.3", "invalid recipient address, not sent"),
                    Some(cmd) => {
                        self.write(cmd.as_bytes(), "RCPT", t.rcpt).await?;
                        self.rcpt_reply().await?
                    }
                };
                results.push(reply);
            }
        }

        if !results.iter().any(Reply::is_positive) {
            // Close the open transaction; a failure here only makes the
            // connection unusable, the per-recipient results stand.
            let _ = self.rset().await;
            return Ok(DeliveryReport {
                recipients: results,
                data: None,
            });
        }

        let reply = self.command(b"DATA\r\n", "DATA", t.data_init).await?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: "DATA",
                reply,
            });
        }
        if reply.code != 354 {
            if !(reply.is_transient() || reply.is_permanent()) {
                // A 2xx here would read as "delivered": never trust it.
                self.usable = false;
                return Err(ClientError::Io(format!(
                    "unexpected reply to DATA: {reply}"
                )));
            }
            let _ = self.rset().await;
            return Ok(DeliveryReport {
                recipients: results,
                data: Some(reply),
            });
        }

        self.write_body(message).await?;
        let reply = self.read_reply("dot", t.data_end).await?;
        self.expect_final(&reply)?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: "dot",
                reply,
            });
        }
        Ok(DeliveryReport {
            recipients: results,
            data: Some(reply),
        })
    }

    /// RSET between transactions on a reused connection.
    pub async fn rset(&mut self) -> Result<(), ClientError> {
        self.ensure_usable()?;
        if self.caps.pipelining {
            self.rset_pending = true;
            return Ok(());
        }
        let reply = self
            .command(b"RSET\r\n", "RSET", self.timeouts.mail)
            .await?;
        if reply.is_positive() {
            return Ok(());
        }
        // A server that refuses RSET is in a state we cannot reason about.
        self.usable = false;
        Err(ClientError::Rejected {
            stage: "RSET",
            reply,
        })
    }

    /// QUIT and close, ignoring errors.
    pub async fn quit(mut self) {
        if self.usable {
            // Short: nothing depends on the answer.
            let limit = self.timeouts.mail.min(Duration::from_secs(10));
            let _ = self.command(b"QUIT\r\n", "QUIT", limit).await;
        }
        let _ = timeout(Duration::from_secs(1), self.io.get_mut().shutdown()).await;
    }

    fn ensure_usable(&self) -> Result<(), ClientError> {
        if self.usable {
            Ok(())
        } else {
            Err(ClientError::Io(format!(
                "connection to {} is no longer usable",
                self.peer
            )))
        }
    }

    fn mail_command(&self, envelope: &OutboundEnvelope, size: usize) -> String {
        let mut cmd = format!("MAIL FROM:<{}>", envelope.sender);
        if envelope.body_8bit && self.caps.eightbitmime {
            cmd.push_str(" BODY=8BITMIME");
        }
        if envelope.smtputf8 && self.caps.smtputf8 {
            cmd.push_str(" SMTPUTF8");
        }
        if self.caps.size.is_some() {
            cmd.push_str(&format!(" SIZE={size}"));
        }
        if self.caps.dsn {
            match envelope.ret_full {
                Some(true) => cmd.push_str(" RET=FULL"),
                Some(false) => cmd.push_str(" RET=HDRS"),
                None => {}
            }
            if let Some(envid) = &envelope.envid {
                cmd.push_str(" ENVID=");
                cmd.push_str(&xtext(envid));
            }
        }
        cmd.push_str("\r\n");
        cmd
    }

    /// `RCPT TO:<address>` with NOTIFY and ORCPT when the upstream offers
    /// DSN; `None` when the address cannot be sent safely.
    fn rcpt_command(&self, address: &str, dsn: Option<&RecipientDsn>) -> Option<String> {
        if !path_is_safe(address) {
            return None;
        }
        let mut cmd = format!("RCPT TO:<{address}>");
        if let (true, Some(dsn)) = (self.caps.dsn, dsn) {
            if let Some(notify) = notify_keywords(dsn.notify) {
                cmd.push_str(" NOTIFY=");
                cmd.push_str(&notify);
            }
            if let Some(orcpt) = &dsn.orcpt {
                // Only rfc822 is forwarded; a bare address is taken as one.
                let original = orcpt
                    .get(..7)
                    .filter(|t| t.eq_ignore_ascii_case("rfc822;"))
                    .map_or(orcpt.as_str(), |_| &orcpt[7..]);
                cmd.push_str(" ORCPT=rfc822;");
                cmd.push_str(&xtext(original));
            }
        }
        cmd.push_str("\r\n");
        Some(cmd)
    }

    async fn rcpt_reply(&mut self) -> Result<Reply, ClientError> {
        let reply = self.read_reply("RCPT", self.timeouts.rcpt).await?;
        self.expect_final(&reply)?;
        if reply.code == 421 {
            return Err(ClientError::Rejected {
                stage: "RCPT",
                reply,
            });
        }
        Ok(reply)
    }

    /// MAIL, RCPT and the dot get 2xx, 4xx or 5xx; anything else means
    /// we and the upstream disagree about where we are.
    fn expect_final(&mut self, reply: &Reply) -> Result<(), ClientError> {
        if reply.is_positive() || reply.is_transient() || reply.is_permanent() {
            Ok(())
        } else {
            self.usable = false;
            Err(ClientError::Io(format!("unexpected reply {reply}")))
        }
    }

    async fn write_body(&mut self, message: &[u8]) -> Result<(), ClientError> {
        let limit = self.timeouts.data_block;
        let mut encoder = DataEncoder::new();
        let mut block = Vec::with_capacity(BLOCK.min(message.len()) * 2 + 8);
        let mut chunks = message.chunks(BLOCK).peekable();
        while let Some(chunk) = chunks.next() {
            encoder.encode(chunk, &mut block);
            if chunks.peek().is_some() {
                self.write(&block, "body", limit).await?;
                block.clear();
            }
        }
        // The last block carries the final dot: one write for small messages.
        encoder.finish(&mut block);
        self.write(&block, "body", limit).await
    }

    async fn command(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        self.write(bytes, stage, limit).await?;
        self.read_reply(stage, limit).await
    }

    async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let io = self.io.get_mut();
        let result = timeout(limit, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.usable = false;
                Err(ClientError::Io(format!("write at {stage}: {e}")))
            }
            Err(_) => {
                self.usable = false;
                Err(ClientError::Timeout { stage })
            }
        }
    }

    async fn read_reply(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        self.read_reply_lines(stage, limit)
            .await
            .map(|(reply, _)| reply)
    }

    async fn read_reply_lines(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<(Reply, Vec<String>), ClientError> {
        let result = match timeout(limit, read_reply(&mut self.io)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { stage }),
        };
        match &result {
            Ok((reply, _)) if reply.code == 421 => self.usable = false,
            Ok(_) => {}
            Err(_) => self.usable = false,
        }
        result
    }
}

/// TCP connect within `limit`, TCP_NODELAY set.
async fn tcp_connect(addr: SocketAddr, limit: Duration) -> Result<TcpStream, ClientError> {
    let stream = match timeout(limit, TcpStream::connect(addr)).await {
        Err(_) => {
            return Err(ClientError::Connect {
                addr,
                reason: format!("timed out after {limit:?}"),
            });
        }
        Ok(Err(e)) => {
            return Err(ClientError::Connect {
                addr,
                reason: e.to_string(),
            });
        }
        Ok(Ok(stream)) => stream,
    };
    // Without it, small pipelined writes wait for delayed ACKs
    // (measured: ~22 msg/s per connection instead of >10k).
    stream.set_nodelay(true).map_err(|e| ClientError::Connect {
        addr,
        reason: format!("TCP_NODELAY: {e}"),
    })?;
    Ok(stream)
}

/// A reply made up here for something never sent, so the caller sees a
/// permanent failure for it instead of an error for the whole connection.
fn local_reply(enhanced: &str, text: &str) -> Reply {
    Reply {
        code: 501,
        enhanced: Some(enhanced.to_string()),
        text: text.to_string(),
    }
}

/// NOTIFY's value for smtp-proto's `RCPT_NOTIFY_*` bits; `None` for 0.
fn notify_keywords(bits: u64) -> Option<String> {
    if bits & smtp_proto::RCPT_NOTIFY_NEVER != 0 {
        return Some("NEVER".into());
    }
    let keywords: Vec<&str> = [
        (smtp_proto::RCPT_NOTIFY_SUCCESS, "SUCCESS"),
        (smtp_proto::RCPT_NOTIFY_FAILURE, "FAILURE"),
        (smtp_proto::RCPT_NOTIFY_DELAY, "DELAY"),
    ]
    .into_iter()
    .filter(|(bit, _)| bits & bit != 0)
    .map(|(_, keyword)| keyword)
    .collect();
    (!keywords.is_empty()).then(|| keywords.join(","))
}

/// xtext (RFC 3461 §4): `!`..=`~` except `+` and `=` as is, every other
/// byte as `+XX` (upper-case hex). Never contains space, CR or LF.
fn xtext(value: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(value.len());
    for &b in value.as_bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(char::from(b));
        } else {
            out.push('+');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648 §4), for AUTH.
fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let mut b = [0u8; 3];
        b[..chunk.len()].copy_from_slice(chunk);
        let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Whether an address can go between angle brackets without changing the
/// command: CR/LF would inject commands, brackets would end the path.
/// Everything else is the upstream's to judge.
fn path_is_safe(address: &str) -> bool {
    !address
        .chars()
        .any(|c| c.is_control() || c == '<' || c == '>')
}

/// Reads one possibly multi-line reply; returns it and the text of each
/// line (enhanced code removed), which EHLO needs.
async fn read_reply<R>(io: &mut R) -> Result<(Reply, Vec<String>), ClientError>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    let mut lines: Vec<String> = Vec::new();
    let mut code = 0;
    let mut enhanced = None;
    let mut raw = Vec::new();
    loop {
        raw.clear();
        read_line(io, &mut raw).await?;
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let parsed = parse_reply_line(line)
            .ok_or_else(|| ClientError::Io(format!("malformed reply line {line:?}")))?;
        if lines.is_empty() {
            code = parsed.code;
            enhanced = parsed.enhanced.map(str::to_string);
        } else if parsed.code != code {
            return Err(ClientError::Io(format!(
                "reply code changed within a reply: {code} then {}",
                parsed.code
            )));
        }
        lines.push(parsed.text.to_string());
        if parsed.last {
            break;
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(ClientError::Io("reply has too many lines".into()));
        }
    }
    let text = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok((
        Reply {
            code,
            enhanced,
            text,
        },
        lines,
    ))
}

/// Reads up to and including LF, refusing lines beyond [`MAX_REPLY_LINE`].
async fn read_line<R>(io: &mut R, line: &mut Vec<u8>) -> Result<(), ClientError>
where
    R: tokio::io::AsyncBufRead + Unpin,
{
    loop {
        let buf = io
            .fill_buf()
            .await
            .map_err(|e| ClientError::Io(format!("read: {e}")))?;
        if buf.is_empty() {
            return Err(ClientError::Io("connection closed by upstream".into()));
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        line.extend_from_slice(&buf[..take]);
        io.consume(take);
        if line.len() > MAX_REPLY_LINE {
            return Err(ClientError::Io("reply line too long".into()));
        }
        if done {
            return Ok(());
        }
    }
}

/// One parsed reply line.
#[derive(Debug, PartialEq, Eq)]
struct ReplyLine<'a> {
    code: u16,
    last: bool,
    enhanced: Option<&'a str>,
    text: &'a str,
}

/// `250-text`, `250 text` or a bare `250`; an RFC 3463 code at the start
/// of the text is split off when its class matches the reply code.
fn parse_reply_line(line: &str) -> Option<ReplyLine<'_>> {
    let bytes = line.as_bytes();
    let digits = bytes.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match bytes.get(3) {
        None => (true, ""),
        Some(b' ') => (true, line.get(4..)?),
        Some(b'-') => (false, line.get(4..)?),
        Some(_) => return None,
    };
    let (enhanced, text) = split_enhanced(text, digits[0]);
    Some(ReplyLine {
        code,
        last,
        enhanced,
        text,
    })
}

/// Splits a leading `class.subject.detail` (RFC 3463) off `text`.
fn split_enhanced(text: &str, class: u8) -> (Option<&str>, &str) {
    let (candidate, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = candidate.split('.');
    let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(s), Some(d), None) => {
            c.as_bytes() == [class]
                && (1..=3).contains(&s.len())
                && (1..=3).contains(&d.len())
                && s.bytes().chain(d.bytes()).all(|b| b.is_ascii_digit())
        }
        _ => false,
    };
    if ok {
        (Some(candidate), rest)
    } else {
        (None, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    };
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
    use std::sync::Arc;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_rustls::TlsAcceptor;

    /// The server side of one scripted conversation, plain or TLS.
    struct Peer {
        io: BufReader<Box<dyn Stream>>,
    }

    impl Peer {
        async fn accept(listener: &TcpListener) -> Peer {
            let (stream, _) = listener.accept().await.unwrap();
            Peer {
                io: BufReader::new(Box::new(stream)),
            }
        }

        /// The server half of a TLS handshake (after 220 to STARTTLS, or
        /// at once for implicit TLS).
        async fn tls(self, acceptor: &TlsAcceptor) -> std::io::Result<Peer> {
            assert!(self.io.buffer().is_empty(), "client spoke before TLS");
            let stream = acceptor.accept(self.io.into_inner()).await?;
            Ok(Peer {
                io: BufReader::new(Box::new(stream)),
            })
        }

        async fn line(&mut self) -> String {
            let mut line = String::new();
            self.io.read_line(&mut line).await.unwrap();
            line
        }

        /// Every line until the client closes (or a read fails); QUIT is
        /// answered.
        async fn rest(&mut self) -> Vec<String> {
            let mut lines = Vec::new();
            loop {
                let mut line = String::new();
                match self.io.read_line(&mut line).await {
                    Ok(0) | Err(_) => return lines,
                    Ok(_) => {
                        if line == "QUIT\r\n" {
                            let _ = self.io.get_mut().write_all(b"221 bye\r\n").await;
                            let _ = self.io.get_mut().flush().await;
                        }
                        lines.push(line);
                    }
                }
            }
        }

        async fn expect(&mut self, prefix: &str) -> String {
            let line = self.line().await;
            assert!(
                line.starts_with(prefix),
                "expected {prefix:?}, got {line:?}"
            );
            assert!(line.ends_with("\r\n"), "{line:?}");
            line
        }

        async fn send(&mut self, text: &str) {
            let io = self.io.get_mut();
            io.write_all(text.as_bytes()).await.unwrap();
            io.flush().await.unwrap();
        }

        /// Reads the content up to and including the final dot line.
        async fn body(&mut self) -> Vec<u8> {
            let mut body = Vec::new();
            loop {
                let mut line = Vec::new();
                self.io.read_until(b'\n', &mut line).await.unwrap();
                body.extend_from_slice(&line);
                if line == b".\r\n" || line.is_empty() {
                    return body;
                }
            }
        }

        async fn greet(&mut self, ehlo: &str) {
            self.send("220 up.test ESMTP\r\n").await;
            self.expect("EHLO relay.test").await;
            self.send(ehlo).await;
        }
    }

    const EHLO_PIPELINING: &str = "250-up.test\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n\
250-8BITMIME\r\n250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN login\r\n250 DSN\r\n";
    const EHLO_PLAIN: &str = "250-up.test\r\n250 8BITMIME\r\n";

    fn quick() -> Timeouts {
        let s = Duration::from_secs(5);
        Timeouts {
            connect: s,
            greeting: s,
            ehlo: s,
            mail: s,
            rcpt: s,
            data_init: s,
            data_block: s,
            data_end: s,
        }
    }

    async fn listener() -> (TcpListener, SocketAddr) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        (listener, addr)
    }

    fn envelope(recipients: &[&str]) -> OutboundEnvelope {
        OutboundEnvelope {
            sender: "owner-list@lists.test".into(),
            recipients: recipients.iter().map(|r| r.to_string()).collect(),
            body_8bit: true,
            smtputf8: false,
            ..OutboundEnvelope::default()
        }
    }

    /// Fails instead of hanging when the client does not pipeline.
    async fn bounded<T>(f: impl std::future::Future<Output = T>) -> T {
        timeout(Duration::from_secs(10), f)
            .await
            .expect("test conversation hung")
    }

    #[tokio::test]
    async fn pipelined_per_recipient_results() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            // Read MAIL and every RCPT before answering anything: a client
            // that waits for the MAIL reply would hang here.
            let mail = p.expect("MAIL FROM:<owner-list@lists.test>").await;
            let rcpts = [
                p.expect("RCPT TO:<a@x.test>").await,
                p.expect("RCPT TO:<b@x.test>").await,
                p.expect("RCPT TO:<c@x.test>").await,
            ];
            p.send(
                "250 2.1.0 Ok\r\n250 2.1.5 Ok\r\n451 4.2.1 try later\r\n\
550-5.1.1 no such\r\n550 5.1.1 user\r\n",
            )
            .await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 Ok: queued as XYZ\r\n").await;
            p.expect("QUIT").await;
            p.send("221 2.0.0 bye\r\n").await;
            (mail, rcpts, body)
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        assert!(client.pipelining());
        let caps = client.capabilities();
        assert_eq!(caps.size, Some(1_000_000));
        assert!(caps.eightbitmime && caps.dsn && caps.enhanced_status_codes);
        assert_eq!(caps.auth, ["LOGIN", "PLAIN"]);
        assert!(!caps.smtputf8 && !caps.starttls);
        let message = b"Subject: t\r\n\r\nhello\r\n";
        let report =
            bounded(client.send(&envelope(&["a@x.test", "b@x.test", "c@x.test"]), message))
                .await
                .unwrap();
        let codes: Vec<u16> = report.recipients.iter().map(|r| r.code).collect();
        assert_eq!(codes, [250, 451, 550]);
        assert_eq!(report.recipients[2].enhanced.as_deref(), Some("5.1.1"));
        assert_eq!(report.recipients[2].text, "no such user");
        let data = report.data.clone().unwrap();
        assert_eq!((data.code, data.enhanced.as_deref()), (250, Some("2.0.0")));
        assert_eq!(data.text, "Ok: queued as XYZ");
        // Only the accepted recipient is covered by the DATA reply.
        let outcomes: Vec<u16> = (0..3).map(|i| report.outcome(i).unwrap().code).collect();
        assert_eq!(outcomes, [250, 451, 550]);
        assert!(client.is_usable());
        bounded(client.quit()).await;
        let (mail, _, body) = server.await.unwrap();
        assert_eq!(
            mail,
            format!(
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME SIZE={}\r\n",
                message.len()
            )
        );
        assert_eq!(body, b"Subject: t\r\n\r\nhello\r\n.\r\n");
    }

    #[tokio::test]
    async fn dot_stuffing_on_the_wire() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PLAIN).await;
            p.expect("MAIL FROM:<> BODY=8BITMIME\r\n").await;
            p.send("250 ok\r\n").await;
            p.expect("RCPT TO:<a@x.test>").await;
            p.send("250 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 ok\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        assert!(!client.pipelining());
        let mut env = envelope(&["a@x.test"]);
        env.sender.clear();
        let report = bounded(client.send(&env, b".hello\r\n..x\r\nline\r\n.\r\nend"))
            .await
            .unwrap();
        let data = report.data.unwrap();
        assert_eq!((data.code, data.enhanced), (250, None));
        let body = server.await.unwrap();
        assert_eq!(body, b"..hello\r\n...x\r\nline\r\n..\r\nend\r\n.\r\n");
    }

    #[tokio::test]
    async fn big_message_in_blocks() {
        let (listener, addr) = listener().await;
        let mut message = Vec::new();
        for i in 0..20_000 {
            message.extend_from_slice(format!(".line {i}\r\n").as_bytes());
        }
        let expect: Vec<u8> = {
            let mut e = Vec::new();
            for i in 0..20_000 {
                e.extend_from_slice(format!("..line {i}\r\n").as_bytes());
            }
            e.extend_from_slice(b".\r\n");
            e
        };
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            p.expect("MAIL").await;
            p.expect("RCPT").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 ok\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let report = bounded(client.send(&envelope(&["a@x.test"]), &message))
            .await
            .unwrap();
        assert_eq!(report.data.unwrap().code, 250);
        assert_eq!(server.await.unwrap(), expect);
    }

    #[tokio::test]
    async fn greeting_421_is_an_error() {
        let (listener, addr) = listener().await;
        tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.send("421 4.3.2 up.test busy\r\n").await;
            let _ = p.line().await;
        });
        let err = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .err()
            .unwrap();
        match err {
            ClientError::Rejected { stage, reply } => {
                assert_eq!(stage, "greeting");
                assert_eq!(reply.code, 421);
                assert_eq!(reply.enhanced.as_deref(), Some("4.3.2"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn greeting_timeout() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 16];
            let _ = s.read(&mut buf).await;
        });
        let t = Timeouts {
            greeting: Duration::from_millis(100),
            ..quick()
        };
        let err = bounded(Client::connect(addr, "relay.test", t))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, ClientError::Timeout { stage: "greeting" }),
            "{err:?}"
        );
        server.abort();
    }

    #[tokio::test]
    async fn connect_refused() {
        let (listener, addr) = listener().await;
        drop(listener);
        let err = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .err()
            .unwrap();
        assert!(matches!(err, ClientError::Connect { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn ehlo_refused_falls_back_to_helo() {
        let (listener, addr) = listener().await;
        tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.send("220 old.test\r\n").await;
            p.expect("EHLO relay.test").await;
            p.send("502 what\r\n").await;
            p.expect("HELO relay.test\r\n").await;
            p.send("250 old.test\r\n").await;
            let _ = p.line().await;
        });
        let client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        assert!(!client.capabilities().esmtp);
        assert!(!client.pipelining());
    }

    #[tokio::test]
    async fn connection_reuse_with_rset() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            // 1: every recipient refused -> the client resets by itself.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<a@x.test>").await;
            p.send("250 2.1.0 ok\r\n550 5.7.1 no\r\n").await;
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            // 2: DATA refused -> report, then RSET.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<b@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("554 5.6.0 no content wanted\r\n").await;
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            // 3: MAIL refused -> error, connection still usable.
            p.expect("MAIL").await;
            p.expect("RCPT TO:<c@x.test>").await;
            p.send("452 4.3.1 full\r\n503 5.5.1 need MAIL\r\n").await;
            // The caller's own RSET, then a good transaction.
            p.expect("RSET\r\n").await;
            p.send("250 2.0.0 ok\r\n").await;
            p.expect("MAIL").await;
            p.expect("RCPT TO:<d@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            let body = p.body().await;
            p.send("250 2.0.0 queued\r\n").await;
            p.expect("QUIT").await;
            p.send("221 2.0.0 bye\r\n").await;
            body
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();

        let r = bounded(client.send(&envelope(&["a@x.test"]), b"m\r\n"))
            .await
            .unwrap();
        assert_eq!(r.recipients[0].code, 550);
        assert!(r.data.is_none());
        assert_eq!(r.outcome(0).unwrap().code, 550);

        let r = bounded(client.send(&envelope(&["b@x.test"]), b"m\r\n"))
            .await
            .unwrap();
        assert_eq!(r.recipients[0].code, 250);
        assert_eq!(r.data.as_ref().unwrap().code, 554);
        assert_eq!(r.outcome(0).unwrap().code, 554);

        let err = bounded(client.send(&envelope(&["c@x.test"]), b"m\r\n"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Rejected { stage: "MAIL", reply } if reply.code == 452),
            "{err:?}"
        );
        assert!(client.is_usable());
        bounded(client.rset()).await.unwrap();

        let r = bounded(client.send(&envelope(&["d@x.test"]), b"last"))
            .await
            .unwrap();
        assert_eq!(r.data.unwrap().code, 250);
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), b"last\r\n.\r\n");
    }

    #[tokio::test]
    async fn rcpt_421_makes_the_connection_unusable() {
        let (listener, addr) = listener().await;
        tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PLAIN).await;
            p.expect("MAIL").await;
            p.send("250 ok\r\n").await;
            p.expect("RCPT").await;
            p.send("421 4.4.2 shutting down\r\n").await;
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let err = bounded(client.send(&envelope(&["a@x.test", "b@x.test"]), b"m"))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(err, ClientError::Rejected { stage: "RCPT", .. }),
            "{err:?}"
        );
        assert!(!client.is_usable());
        assert!(matches!(
            bounded(client.rset()).await,
            Err(ClientError::Io(_))
        ));
    }

    #[tokio::test]
    async fn unsafe_addresses_are_never_sent() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            p.expect("MAIL").await;
            p.expect("RCPT TO:<ok@x.test>").await;
            p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
            p.expect("DATA").await;
            p.send("354 go\r\n").await;
            p.body().await;
            p.send("250 2.0.0 ok\r\n").await;
        });
        let mut client = bounded(Client::connect(addr, "relay.test", quick()))
            .await
            .unwrap();
        let env = envelope(&["evil@x\r\nRCPT TO:<other@y>", "ok@x.test"]);
        let r = bounded(client.send(&env, b"m\r\n")).await.unwrap();
        assert_eq!(r.recipients[0].code, 501);
        assert_eq!(r.recipients[1].code, 250);
        server.await.unwrap();
    }

    #[test]
    fn reply_lines() {
        let p = parse_reply_line("250-2.1.5 Ok").unwrap();
        assert_eq!(
            (p.code, p.last, p.enhanced, p.text),
            (250, false, Some("2.1.5"), "Ok")
        );
        let p = parse_reply_line("550 5.1.1").unwrap();
        assert_eq!((p.enhanced, p.text), (Some("5.1.1"), ""));
        // A code of the wrong class is text.
        let p = parse_reply_line("550 2.0.0 odd").unwrap();
        assert_eq!((p.enhanced, p.text), (None, "2.0.0 odd"));
        let p = parse_reply_line("354").unwrap();
        assert_eq!((p.code, p.last, p.text), (354, true, ""));
        let p = parse_reply_line("250 1.2.3.4 ready").unwrap();
        assert_eq!(p.enhanced, None);
        assert!(parse_reply_line("25").is_none());
        assert!(parse_reply_line("250x").is_none());
        assert!(parse_reply_line("650 no").is_none());
    }

    #[tokio::test]
    async fn multi_line_reply_joined() {
        let mut input: &[u8] = b"451-4.3.0 first\r\n451-4.3.0 second\r\n451 4.3.0 third\r\n";
        let (reply, lines) = read_reply(&mut input).await.unwrap();
        assert_eq!(reply.code, 451);
        assert_eq!(reply.enhanced.as_deref(), Some("4.3.0"));
        assert_eq!(reply.text, "first second third");
        assert_eq!(lines.len(), 3);
        let mut bad: &[u8] = b"250-a\r\n550 b\r\n";
        assert!(read_reply(&mut bad).await.is_err());
        let mut closed: &[u8] = b"250-a\r\n";
        assert!(read_reply(&mut closed).await.is_err());
    }

    // ---- TLS, AUTH, DSN ----

    /// A CA, a leaf certificate for `up.test` signed by it, and a TLS
    /// acceptor serving the leaf.
    struct Pki {
        ca_pem: String,
        acceptor: TlsAcceptor,
    }

    fn pki() -> Pki {
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, "poolrelay test CA");
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, &ca_key);
        let leaf_key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["up.test".to_string()]).unwrap();
        leaf.distinguished_name.push(DnType::CommonName, "up.test");
        let leaf_cert = leaf.signed_by(&leaf_key, &issuer).unwrap();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(leaf_key.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![leaf_cert.der().clone(), ca_cert.der().clone()], key)
        .unwrap();
        Pki {
            ca_pem: ca_cert.pem(),
            acceptor: TlsAcceptor::from(Arc::new(config)),
        }
    }

    /// A PEM file removed when dropped.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            let path = std::env::temp_dir()
                .join(format!("poolrelay-smtp-{}-{name}.pem", std::process::id()));
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn options(tls: TlsMode) -> ConnectOptions {
        ConnectOptions {
            tls,
            verify: true,
            server_name: "up.test".into(),
            ca_file: None,
            auth: None,
            timeouts: quick(),
        }
    }

    fn credentials(allow_plaintext: bool) -> Credentials {
        Credentials {
            username: "user".into(),
            password: "secret".into(),
            allow_plaintext,
        }
    }

    const EHLO_STARTTLS: &str = "250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 STARTTLS\r\n";
    const EHLO_AFTER_TLS: &str =
        "250-up.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 AUTH PLAIN LOGIN\r\n";

    /// Server side of one pipelined transaction with one recipient.
    async fn one_message(p: &mut Peer) -> Vec<u8> {
        p.expect("MAIL FROM:<owner-list@lists.test>").await;
        p.expect("RCPT TO:<a@x.test>").await;
        p.send("250 2.1.0 ok\r\n250 2.1.5 ok\r\n").await;
        p.expect("DATA").await;
        p.send("354 go\r\n").await;
        let body = p.body().await;
        p.send("250 2.0.0 queued\r\n").await;
        body
    }

    #[tokio::test]
    async fn starttls_required_but_not_offered_sends_nothing() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_PIPELINING).await;
            p.rest().await
        });
        let err = bounded(Client::connect_with(
            addr,
            "relay.test",
            &options(TlsMode::Required),
        ))
        .await
        .err()
        .unwrap();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("STARTTLS")),
            "{err:?}"
        );
        let rest = server.await.unwrap();
        assert!(rest.iter().all(|l| l == "QUIT\r\n"), "{rest:?}");
    }

    #[tokio::test]
    async fn starttls_without_verification_delivers_encrypted() {
        let (listener, addr) = listener().await;
        let pki = pki();
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.expect("STARTTLS\r\n").await;
            p.send("220 2.0.0 ready\r\n").await;
            let mut p = p.tls(&pki.acceptor).await.unwrap();
            p.expect("EHLO relay.test\r\n").await;
            p.send(EHLO_AFTER_TLS).await;
            let body = one_message(&mut p).await;
            p.expect("QUIT").await;
            p.send("221 bye\r\n").await;
            body
        });
        let opts = ConnectOptions {
            verify: false,
            server_name: "not-the-cert-name.test".into(),
            ..options(TlsMode::Required)
        };
        let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(client.is_tls());
        // The capabilities are those of the EHLO after STARTTLS.
        assert!(client.pipelining() && !client.capabilities().starttls);
        assert_eq!(client.capabilities().auth, ["LOGIN", "PLAIN"]);
        let report = bounded(client.send(&envelope(&["a@x.test"]), b"secret\r\n"))
            .await
            .unwrap();
        assert_eq!(report.outcome(0).unwrap().code, 250);
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), b"secret\r\n.\r\n");
    }

    #[tokio::test]
    async fn starttls_verified_with_ca_file_then_auth() {
        let (listener, addr) = listener().await;
        let pki = pki();
        let ca = TempFile::new("ca-ok", &pki.ca_pem);
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.expect("STARTTLS\r\n").await;
            p.send("220 2.0.0 ready\r\n").await;
            let mut p = p.tls(&pki.acceptor).await.unwrap();
            p.expect("EHLO relay.test\r\n").await;
            p.send(EHLO_AFTER_TLS).await;
            let auth = p.line().await;
            p.send("235 2.7.0 ok\r\n").await;
            p.expect("QUIT").await;
            p.send("221 bye\r\n").await;
            auth
        });
        let opts = ConnectOptions {
            ca_file: Some(ca.0.clone()),
            // The password may go: the session is encrypted.
            auth: Some(credentials(false)),
            ..options(TlsMode::Required)
        };
        let client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(client.is_tls());
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
    }

    /// Serves one TLS handshake after STARTTLS; what the client then sends.
    async fn starttls_server(listener: TcpListener, pki: Pki) -> Option<Vec<String>> {
        let mut p = Peer::accept(&listener).await;
        p.greet(EHLO_STARTTLS).await;
        p.expect("STARTTLS\r\n").await;
        p.send("220 2.0.0 ready\r\n").await;
        let mut p = p.tls(&pki.acceptor).await.ok()?;
        Some(p.rest().await)
    }

    #[tokio::test]
    async fn verification_fails_without_the_ca() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(starttls_server(listener, pki()));
        let err = bounded(Client::connect_with(
            addr,
            "relay.test",
            &options(TlsMode::Required),
        ))
        .await
        .err()
        .unwrap();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("certificate")),
            "{err:?}"
        );
        assert_eq!(server.await.unwrap(), None);
    }

    #[tokio::test]
    async fn verification_fails_for_another_name() {
        let (listener, addr) = listener().await;
        let pki = pki();
        let ca = TempFile::new("ca-name", &pki.ca_pem);
        let server = tokio::spawn(starttls_server(listener, pki));
        let opts = ConnectOptions {
            ca_file: Some(ca.0.clone()),
            server_name: "other.test".into(),
            ..options(TlsMode::Required)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(matches!(&err, ClientError::Tls(_)), "{err:?}");
        assert_eq!(server.await.unwrap(), None);
    }

    #[tokio::test]
    async fn bad_ca_file_fails_before_connecting() {
        let (listener, addr) = listener().await;
        drop(listener);
        let not_pem = TempFile::new("not-pem", "hello\n");
        for path in [not_pem.0.clone(), PathBuf::from("/nonexistent/ca.pem")] {
            let opts = ConnectOptions {
                ca_file: Some(path),
                ..options(TlsMode::Implicit)
            };
            let err = bounded(Client::connect_with(addr, "relay.test", &opts))
                .await
                .err()
                .unwrap();
            assert!(
                matches!(&err, ClientError::Tls(m) if m.contains("ca_file")),
                "{err:?}"
            );
        }
    }

    #[tokio::test]
    async fn opportunistic_goes_on_in_clear_when_refused_and_skips_verification() {
        let (listener, addr) = listener().await;
        let pki = pki();
        let server = tokio::spawn(async move {
            // 1: STARTTLS refused -> same session, in clear.
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.expect("STARTTLS\r\n").await;
            p.send("454 4.7.0 TLS not available\r\n").await;
            let body = one_message(&mut p).await;
            // 2: offered -> encrypted, the unknown CA notwithstanding.
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.expect("STARTTLS\r\n").await;
            p.send("220 2.0.0 ready\r\n").await;
            let mut p = p.tls(&pki.acceptor).await.unwrap();
            p.expect("EHLO relay.test\r\n").await;
            p.send(EHLO_AFTER_TLS).await;
            p.rest().await;
            body
        });
        let opts = options(TlsMode::Opportunistic);
        let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(!client.is_tls());
        let report = bounded(client.send(&envelope(&["a@x.test"]), b"m\r\n"))
            .await
            .unwrap();
        assert_eq!(report.outcome(0).unwrap().code, 250);
        drop(client);
        let client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(client.is_tls());
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), b"m\r\n.\r\n");
    }

    #[tokio::test]
    async fn off_never_starts_tls() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.rest().await
        });
        let client = bounded(Client::connect_with(
            addr,
            "relay.test",
            &options(TlsMode::Off),
        ))
        .await
        .unwrap();
        assert!(!client.is_tls() && client.capabilities().starttls);
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), ["QUIT\r\n"]);
    }

    #[tokio::test]
    async fn data_after_starttls_220_is_refused() {
        let (listener, addr) = listener().await;
        tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet(EHLO_STARTTLS).await;
            p.expect("STARTTLS\r\n").await;
            p.send("220 2.0.0 ready\r\n250 injected\r\n").await;
            p.rest().await;
        });
        let opts = ConnectOptions {
            verify: false,
            ..options(TlsMode::Required)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Tls(m) if m.contains("after its 220")),
            "{err:?}"
        );
    }

    #[tokio::test]
    async fn implicit_tls_from_the_first_byte() {
        let (listener, addr) = listener().await;
        let pki = pki();
        let ca = TempFile::new("ca-implicit", &pki.ca_pem);
        let server = tokio::spawn(async move {
            let p = Peer::accept(&listener).await;
            let mut p = p.tls(&pki.acceptor).await.unwrap();
            p.greet(EHLO_AFTER_TLS).await;
            let body = one_message(&mut p).await;
            p.expect("QUIT").await;
            p.send("221 bye\r\n").await;
            body
        });
        let opts = ConnectOptions {
            ca_file: Some(ca.0.clone()),
            ..options(TlsMode::Implicit)
        };
        let mut client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(client.is_tls());
        assert_eq!(client.greeting().code, 220);
        let report = bounded(client.send(&envelope(&["a@x.test"]), b"465\r\n"))
            .await
            .unwrap();
        assert_eq!(report.outcome(0).unwrap().code, 250);
        bounded(client.quit()).await;
        assert_eq!(server.await.unwrap(), b"465\r\n.\r\n");
    }

    #[tokio::test]
    async fn auth_plain_on_the_wire() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet("250-up.test\r\n250 AUTH LOGIN PLAIN\r\n").await;
            let auth = p.line().await;
            p.send("235 2.7.0 Authentication successful\r\n").await;
            let rest = p.rest().await;
            (auth, rest)
        });
        let opts = ConnectOptions {
            auth: Some(credentials(true)),
            ..options(TlsMode::Off)
        };
        let client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        bounded(client.quit()).await;
        let (auth, rest) = server.await.unwrap();
        assert_eq!(auth, "AUTH PLAIN AHVzZXIAc2VjcmV0\r\n");
        assert_eq!(rest, ["QUIT\r\n"]);
    }

    #[tokio::test]
    async fn auth_login_on_the_wire() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet("250-up.test\r\n250 AUTH=LOGIN\r\n").await;
            let mut lines = vec![p.line().await];
            p.send("334 VXNlcm5hbWU6\r\n").await;
            lines.push(p.line().await);
            p.send("334 UGFzc3dvcmQ6\r\n").await;
            lines.push(p.line().await);
            p.send("235 2.7.0 ok\r\n").await;
            lines
        });
        let opts = ConnectOptions {
            auth: Some(credentials(true)),
            ..options(TlsMode::Opportunistic)
        };
        let client = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .unwrap();
        assert!(!client.is_tls());
        assert_eq!(
            server.await.unwrap(),
            ["AUTH LOGIN\r\n", "dXNlcg==\r\n", "c2VjcmV0\r\n"]
        );
    }

    #[tokio::test]
    async fn auth_failure_is_an_auth_error() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut p = Peer::accept(&listener).await;
            p.greet("250-up.test\r\n250 AUTH PLAIN\r\n").await;
            p.expect("AUTH PLAIN ").await;
            p.send("535 5.7.8 Authentication credentials invalid\r\n")
                .await;
            p.expect("QUIT").await;
            p.send("221 bye\r\n").await;
        });
        let opts = ConnectOptions {
            auth: Some(credentials(true)),
            ..options(TlsMode::Off)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Auth(m) if m.starts_with("535 5.7.8")),
            "{err:?}"
        );
        server.await.unwrap();
    }

    #[tokio::test]
    async fn auth_refused_in_clear_and_without_offer() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for ehlo in [EHLO_PIPELINING, EHLO_PLAIN] {
                let mut p = Peer::accept(&listener).await;
                p.greet(ehlo).await;
                seen.push(p.rest().await);
            }
            seen
        });
        // 1: AUTH offered, no TLS, plaintext not allowed.
        let opts = ConnectOptions {
            auth: Some(credentials(false)),
            ..options(TlsMode::Opportunistic)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Auth(m) if m.starts_with("refusing to send the password in clear")),
            "{err:?}"
        );
        // 2: plaintext allowed, but no AUTH offered.
        let opts = ConnectOptions {
            auth: Some(credentials(true)),
            ..options(TlsMode::Opportunistic)
        };
        let err = bounded(Client::connect_with(addr, "relay.test", &opts))
            .await
            .err()
            .unwrap();
        assert!(
            matches!(&err, ClientError::Auth(m) if m == "upstream offers no AUTH"),
            "{err:?}"
        );
        // The password never went out: only QUIT followed EHLO.
        assert_eq!(server.await.unwrap(), [["QUIT\r\n"], ["QUIT\r\n"]]);
    }

    #[tokio::test]
    async fn dsn_parameters_only_when_offered() {
        let (listener, addr) = listener().await;
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for ehlo in [EHLO_PIPELINING, EHLO_PLAIN] {
                let mut p = Peer::accept(&listener).await;
                p.greet(ehlo).await;
                let mut lines = vec![p.expect("MAIL").await];
                if ehlo == EHLO_PLAIN {
                    p.send("250 ok\r\n").await;
                }
                for _ in 0..3 {
                    lines.push(p.expect("RCPT").await);
                    if ehlo == EHLO_PLAIN {
                        p.send("250 ok\r\n").await;
                    }
                }
                if ehlo == EHLO_PIPELINING {
                    p.send("250 ok\r\n250 ok\r\n250 ok\r\n250 ok\r\n").await;
                }
                p.expect("DATA").await;
                p.send("354 go\r\n").await;
                p.body().await;
                p.send("250 ok\r\n").await;
                seen.push(lines);
            }
            seen
        });
        let mut env = envelope(&["a@x.test", "b@x.test", "c@x.test"]);
        env.envid = Some("QQ+1= x".into());
        env.ret_full = Some(false);
        env.dsn = vec![
            RecipientDsn {
                notify: smtp_proto::RCPT_NOTIFY_SUCCESS | smtp_proto::RCPT_NOTIFY_FAILURE,
                orcpt: Some("rfc822;o+x@y.test".into()),
            },
            RecipientDsn {
                notify: smtp_proto::RCPT_NOTIFY_NEVER | smtp_proto::RCPT_NOTIFY_DELAY,
                orcpt: Some("bare=é@y.test".into()),
            },
            // c@x.test has no entry.
        ];
        for _ in 0..2 {
            let mut client = bounded(Client::connect(addr, "relay.test", quick()))
                .await
                .unwrap();
            let report = bounded(client.send(&env, b"m\r\n")).await.unwrap();
            assert_eq!(report.outcome(2).unwrap().code, 250);
        }
        let seen = server.await.unwrap();
        assert_eq!(
            seen[0],
            [
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME SIZE=3 RET=HDRS ENVID=QQ+2B1+3D+20x\r\n",
                "RCPT TO:<a@x.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o+2Bx@y.test\r\n",
                "RCPT TO:<b@x.test> NOTIFY=NEVER ORCPT=rfc822;bare+3D+C3+A9@y.test\r\n",
                "RCPT TO:<c@x.test>\r\n",
            ]
        );
        assert_eq!(
            seen[1],
            [
                "MAIL FROM:<owner-list@lists.test> BODY=8BITMIME\r\n",
                "RCPT TO:<a@x.test>\r\n",
                "RCPT TO:<b@x.test>\r\n",
                "RCPT TO:<c@x.test>\r\n",
            ]
        );
    }

    #[test]
    fn base64_vectors() {
        // RFC 4648 §10.
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (input, expected) in cases {
            assert_eq!(base64(input.as_bytes()), expected);
        }
        assert_eq!(
            base64("\0jörg@x.test\0p+ss w=rd".as_bytes()),
            "AGrDtnJnQHgudGVzdABwK3NzIHc9cmQ="
        );
    }

    #[test]
    fn xtext_and_notify() {
        assert_eq!(xtext("a@b.test"), "a@b.test");
        assert_eq!(xtext("+=\r\n ~!"), "+2B+3D+0D+0A+20~!");
        assert_eq!(notify_keywords(0), None);
        assert_eq!(
            notify_keywords(smtp_proto::RCPT_NOTIFY_DELAY | smtp_proto::RCPT_NOTIFY_SUCCESS)
                .as_deref(),
            Some("SUCCESS,DELAY")
        );
        assert_eq!(
            notify_keywords(smtp_proto::RCPT_NOTIFY_NEVER | smtp_proto::RCPT_NOTIFY_FAILURE)
                .as_deref(),
            Some("NEVER")
        );
    }
}
