//! The inbound SMTP session as a state machine: bytes in, replies and
//! finished transactions out. The tokio code around it only moves bytes.

use crate::data::{DataDecoder, DataError, DataStatus};
use crate::date::unix_secs;
use crate::mt_priority::MtPriorityPolicy;
use smtp_proto::{Error as ProtoError, Request};
use std::net::{IpAddr, SocketAddr};
use std::time::SystemTime;

/// Kept here too: callers import it from this module.
pub use crate::date::rfc5322_date;

mod envelope;
mod security;
mod syntax;
use security::AuthStep;
pub use security::{
    AuthAttempt, AuthPolicy, AuthVerdict, MAX_PASSWORD, MAX_USERNAME, Security, TlsInfo,
    username_acceptable,
};
pub use syntax::log_safe;
use syntax::*;

/// Limits and identity for one inbound session.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Our host name, for the banner, EHLO and the Received: header.
    pub hostname: String,
    /// Largest message accepted, bytes (SIZE= at MAIL, and during DATA).
    pub max_message_size: u64,
    /// Most recipients per envelope (beyond: 452 4.5.3).
    pub max_recipients: usize,
    /// Longest command line, CRLF included (beyond: 500 5.5.2).
    pub max_line_length: usize,
    /// Whether this client's address may relay; if not, RCPT gets 554 5.7.1
    /// unless the session authenticated.
    pub relay_allowed: bool,
    /// Most `Received:` fields a message may arrive with (beyond: 554 5.4.6).
    pub max_hops: usize,
    /// STARTTLS and AUTH: what is offered and required.
    pub security: Security,
    /// MT-PRIORITY (RFC 6710): the policy advertised in EHLO. None: the
    /// extension is off and `MT-PRIORITY=` gets 555 like any unknown parameter.
    pub mt_priority: Option<MtPriorityPolicy>,
    /// Whether this client is trusted with MT-PRIORITY values above 0
    /// (the listener's `mt_priority_trusted` networks); the session adds
    /// what it learns itself in [`Session::mt_priority_trusted`].
    pub mt_priority_trusted: bool,
}

/// The DSN RET parameter (RFC 3461): how much of the message a failure
/// DSN returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Ret {
    /// RET=FULL.
    Full,
    /// RET=HDRS.
    Headers,
}

/// One accepted recipient with its DSN parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipient {
    /// The address without angle brackets.
    pub address: String,
    /// ORCPT, as given (e.g. "rfc822;a@b").
    pub orcpt: Option<String>,
    /// NOTIFY flags, smtp-proto's RCPT_NOTIFY_* bits (0 = not given).
    pub notify: u64,
}

/// A complete transaction after the final dot, ready to be queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transaction {
    /// HELO/EHLO name the client gave.
    pub helo: String,
    /// The client's address.
    pub peer: SocketAddr,
    /// Envelope sender without brackets; empty for the null sender `<>`.
    pub sender: String,
    /// Recipients in RCPT order.
    pub recipients: Vec<Recipient>,
    /// ENVID, when given.
    pub envid: Option<String>,
    /// RET, when given.
    pub ret: Option<Ret>,
    /// BODY=8BITMIME was given.
    pub body_8bit: bool,
    /// SMTPUTF8 was given.
    pub smtputf8: bool,
    /// MT-PRIORITY as honoured (-9 to 9): a value above 0 from a client not
    /// trusted with it is already lowered to 0. None: not given.
    pub mt_priority: Option<i8>,
    /// The message: our Received: header first, then the content as
    /// received, dot-unstuffed, lines ending in CRLF, without the final dot.
    pub message: Vec<u8>,
    /// The user the session authenticated as (see [`Session::authenticated_user`]).
    pub user: Option<String>,
    /// The TLS the message came over.
    pub tls: Option<TlsInfo>,
}

/// What the session asks the caller to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Write these bytes (one or more complete replies) to the client.
    Reply(Vec<u8>),
    /// A transaction is complete: queue it, then call
    /// [`Session::queued`] or [`Session::queue_failed`] and write the reply
    /// they return. The session processes no further input until then.
    Message(Box<Transaction>),
    /// Write the replies before this, then run the TLS server handshake
    /// and call [`Session::tls_started`] (or close when it fails). The
    /// session processes no further input until then.
    StartTls,
    /// Check these credentials, then call [`Session::authenticated`] and
    /// handle what it returns. The session processes no further input
    /// until then.
    Authenticate(AuthAttempt),
    /// Close the connection (after writing any reply before it).
    Close,
}

/// After this many refused commands the session is closed with 421 4.7.0,
/// so a confused or hostile client cannot keep a slot forever.
pub const MAX_ERRORS: u32 = 20;

/// After this many junk commands (NOOP, RSET, EHLO, HELO, VRFY, HELP,
/// unknown) without a message queued, the next one gets 421 4.7.0 and the
/// session is closed (Postfix's smtpd_junk_command_limit).
pub const MAX_JUNK_COMMANDS: u32 = 100;

/// Once one [`Session::feed`] has produced this many bytes of replies, it
/// stops parsing until the caller wrote them and called `feed(&[])`.
pub const MAX_UNWRITTEN_REPLIES: usize = 16 * 1024;

/// At most this many rejections are kept for [`Session::take_rejections`]
/// when the caller does not collect them.
const MAX_KEPT_REJECTIONS: usize = 256;

/// Why the session refused something, for metrics and logs
/// (`poolrelay_smtp_rejections_total{reason}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Unparseable command or parameter (500/501/555).
    Syntax,
    /// Command out of sequence (503).
    Sequence,
    /// Command we do not implement (502/504).
    Unimplemented,
    /// Command line over the limit, or ended by a bare LF (500 5.5.2).
    LineTooLong,
    /// Malformed or empty address (501 5.1.x, 553 5.6.7).
    BadAddress,
    /// RCPT from a client that may not relay (554 5.7.1).
    RelayDenied,
    /// RCPT beyond max_recipients (452 4.5.3).
    TooManyRecipients,
    /// SIZE= or content over the limit (552 5.3.4).
    MessageTooLarge,
    /// Bare CR or LF in the content: possible SMTP smuggling (554 5.6.0).
    BareLineEnding,
    /// The session was closed after [`MAX_ERRORS`] errors (421 4.7.0).
    TooManyErrors,
    /// The session was closed after [`MAX_JUNK_COMMANDS`] (421 4.7.0).
    TooManyJunkCommands,
    /// More `Received:` fields than `max_hops`: a mail loop (554 5.4.6).
    TooManyHops,
    /// The relay's memory for message content in flight was used up
    /// (452 4.3.1): the message was read to its end and dropped.
    InsufficientStorage,
    /// MAIL before STARTTLS on a listener that requires TLS (530 5.7.0),
    /// or AUTH before TLS (538 5.7.11).
    TlsRequired,
    /// MAIL before AUTH on a listener that requires it (530 5.7.0).
    AuthRequired,
    /// Wrong credentials (535 5.7.8), or too many of them (421 4.7.0).
    AuthFailed,
}

impl Rejection {
    /// Every reason, for exporting each counter at 0 before the first event.
    pub const ALL: [Rejection; 16] = [
        Rejection::Syntax,
        Rejection::Sequence,
        Rejection::Unimplemented,
        Rejection::LineTooLong,
        Rejection::BadAddress,
        Rejection::RelayDenied,
        Rejection::TooManyRecipients,
        Rejection::MessageTooLarge,
        Rejection::BareLineEnding,
        Rejection::TooManyErrors,
        Rejection::TooManyJunkCommands,
        Rejection::TooManyHops,
        Rejection::InsufficientStorage,
        Rejection::TlsRequired,
        Rejection::AuthRequired,
        Rejection::AuthFailed,
    ];

    /// A stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Rejection::Syntax => "syntax",
            Rejection::Sequence => "sequence",
            Rejection::Unimplemented => "unimplemented",
            Rejection::LineTooLong => "line_too_long",
            Rejection::BadAddress => "bad_address",
            Rejection::RelayDenied => "relay_denied",
            Rejection::TooManyRecipients => "too_many_recipients",
            Rejection::MessageTooLarge => "message_too_large",
            Rejection::BareLineEnding => "bare_line_ending",
            Rejection::TooManyErrors => "too_many_errors",
            Rejection::TooManyJunkCommands => "too_many_junk_commands",
            Rejection::TooManyHops => "too_many_hops",
            Rejection::InsufficientStorage => "insufficient_storage",
            Rejection::TlsRequired => "tls_required",
            Rejection::AuthRequired => "auth_required",
            Rejection::AuthFailed => "auth_failed",
        }
    }
}

/// The envelope sender and its parameters, from MAIL until the
/// transaction ends.
#[derive(Debug, Clone)]
struct MailState {
    sender: String,
    envid: Option<String>,
    ret: Option<Ret>,
    body_8bit: bool,
    smtputf8: bool,
    mt_priority: Option<i8>,
}

#[derive(Debug)]
enum State {
    /// Reading command lines.
    Command,
    /// Reading message content after 354.
    Data(DataDecoder),
    /// A transaction was handed out; waiting for queued()/queue_failed().
    AwaitQueue,
    /// STARTTLS was accepted; waiting for tls_started().
    AwaitTls,
    /// Credentials were handed out; waiting for authenticated().
    AwaitAuth,
    /// QUIT or a fatal error: input is dropped.
    Closed,
}

/// One inbound SMTP session.
pub struct Session {
    config: SessionConfig,
    peer: SocketAddr,
    /// Bytes received but not yet processed (a partial line, or input
    /// after a finished message while the caller queues it).
    pending: Vec<u8>,
    state: State,
    /// Discarding the rest of an over-long line up to its LF.
    discarding: bool,
    helo: Option<String>,
    esmtp: bool,
    mail: Option<MailState>,
    recipients: Vec<Recipient>,
    /// The message being received: Received: header, then content.
    message: Vec<u8>,
    /// Length of our Received: header at the start of `message`.
    header_len: usize,
    errors: u32,
    /// Junk commands since the session started or a message was queued.
    junk: u32,
    /// The last feed stopped at [`MAX_UNWRITTEN_REPLIES`].
    paused: bool,
    /// The content of the current message is being dropped; this reply
    /// answers its final dot (see [`Session::refuse_content`]).
    content_refused: Option<&'static [u8]>,
    rejections: Vec<Rejection>,
    /// Set once TLS is on.
    tls: Option<TlsInfo>,
    /// Set once AUTH succeeded.
    user: Option<String>,
    /// An AUTH exchange waiting for the client's next response line.
    auth_step: Option<AuthStep>,
    /// The reply to an AUTH the session refused itself, once its owner
    /// counted and delayed it (see [`AuthAttempt::refused`]).
    auth_refusal: Option<(Rejection, &'static [u8])>,
}

impl Session {
    /// Starts a session; returns it and the 220 banner to send.
    pub fn new(config: SessionConfig, peer: SocketAddr) -> (Session, Vec<u8>) {
        let banner = format!("220 {} ESMTP poolrelay\r\n", config.hostname).into_bytes();
        let session = Session {
            config,
            peer,
            pending: Vec::new(),
            state: State::Command,
            discarding: false,
            helo: None,
            esmtp: false,
            mail: None,
            recipients: Vec::new(),
            message: Vec::new(),
            header_len: 0,
            errors: 0,
            junk: 0,
            paused: false,
            content_refused: None,
            rejections: Vec::new(),
            tls: None,
            user: None,
            auth_step: None,
            auth_refusal: None,
        };
        (session, banner)
    }

    /// Feeds bytes read from the client (may be empty, to resume after a
    /// Message). Consumes all of `input` into the session's buffer and
    /// processes as much as it can.
    ///
    /// Replies to consecutive commands are coalesced into one
    /// [`Output::Reply`] so that a pipelined batch costs one write. After an
    /// [`Output::Message`] nothing more is processed (input is kept) until
    /// [`Session::queued`] or [`Session::queue_failed`], then `feed(&[])`.
    /// After [`Output::Close`] all input is dropped.
    ///
    /// Once the replies of one call reach [`MAX_UNWRITTEN_REPLIES`] bytes,
    /// parsing stops (input is kept) and [`Session::paused`] is true: write
    /// the replies, then call `feed(&[])` before reading more.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Output> {
        self.paused = false;
        let mut out = Vec::new();
        if self.pending.is_empty() {
            // Common case: no leftover, so process the caller's bytes in
            // place and keep only what could not be used yet.
            let used = self.process(input, &mut out);
            if let Some(rest) = input.get(used..) {
                self.pending.extend_from_slice(rest);
            }
        } else {
            let mut buf = std::mem::take(&mut self.pending);
            buf.extend_from_slice(input);
            let used = self.process(&buf, &mut out);
            buf.drain(..used.min(buf.len()));
            self.pending = buf;
        }
        out
    }

    /// The message was queued durably under `queue_id`: returns the 250 reply.
    pub fn queued(&mut self, queue_id: &str) -> Vec<u8> {
        self.end_await();
        format!("250 2.0.0 Ok: queued as {}\r\n", printable(queue_id)).into_bytes()
    }

    /// Queueing failed: returns `452 4.3.1` with `reason`.
    pub fn queue_failed(&mut self, reason: &str) -> Vec<u8> {
        self.end_await();
        format!("452 4.3.1 {}\r\n", printable(reason)).into_bytes()
    }

    /// The reply to the final dot when a replicated queue could not take
    /// the message now (no quorum): `451 4.3.0`, try again later.
    pub fn queue_unavailable(&mut self, reason: &str) -> Vec<u8> {
        self.end_await();
        format!("451 4.3.0 {}\r\n", printable(reason)).into_bytes()
    }

    /// True when the last [`Session::feed`] stopped because its replies
    /// reached [`MAX_UNWRITTEN_REPLIES`]: write them, then `feed(&[])`.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Bytes of message content held for the current transaction (0 outside
    /// DATA): what the caller charges against its memory budget.
    pub fn content_len(&self) -> usize {
        match self.state {
            State::Data(_) | State::AwaitQueue => self.message.len(),
            _ => 0,
        }
    }

    /// Drops the content received so far and keeps nothing more of this
    /// message: it is read to its final dot and answered with `reply`
    /// (e.g. `452 4.3.1` when the relay's memory budget is used up).
    pub fn refuse_content(&mut self, reply: &'static [u8]) {
        if matches!(self.state, State::Data(_)) {
            self.content_refused = Some(reply);
            self.message = Vec::new();
        }
    }

    /// True while receiving message content (the caller uses the DATA timeout).
    pub fn in_data(&self) -> bool {
        matches!(self.state, State::Data(_))
    }

    /// The reply to send when the command or data timeout fires (421 4.4.2).
    pub fn timeout_reply(&self) -> Vec<u8> {
        format!("421 4.4.2 {} timeout, closing\r\n", self.config.hostname).into_bytes()
    }

    /// True from MAIL until the transaction ends (queued, refused or RSET):
    /// a stopping server lets such a session finish before closing it.
    pub fn in_transaction(&self) -> bool {
        self.mail.is_some() || !matches!(self.state, State::Command | State::Closed)
    }

    /// True after QUIT or too many errors: the caller closes the connection.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// The HELO/EHLO name, once given.
    pub fn helo(&self) -> Option<&str> {
        self.helo.as_deref()
    }

    /// Rejections since the last call, oldest first, for metrics (at most
    /// a few hundred are kept if never collected).
    pub fn take_rejections(&mut self) -> Vec<Rejection> {
        std::mem::take(&mut self.rejections)
    }

    fn end_await(&mut self) {
        if matches!(self.state, State::AwaitQueue) {
            self.state = State::Command;
        }
        self.junk = 0;
        self.reset_transaction();
    }

    fn reset_transaction(&mut self) {
        self.mail = None;
        self.recipients.clear();
        self.message = Vec::new();
    }

    /// Processes `input`; returns how many bytes were used.
    fn process(&mut self, input: &[u8], out: &mut Vec<Output>) -> usize {
        let mut pos = 0;
        loop {
            let rest = input.get(pos..).unwrap_or_default();
            match &mut self.state {
                State::Closed => return input.len(),
                State::AwaitQueue | State::AwaitTls | State::AwaitAuth => return pos,
                State::Data(decoder) => {
                    let (used, status) = decoder.feed(rest, &mut self.message);
                    pos += used;
                    if self.content_refused.is_some() {
                        // Keep reading to the dot, keep nothing.
                        self.message.clear();
                    }
                    match status {
                        DataStatus::More => return pos,
                        DataStatus::Done(result) => self.finish_data(result, out),
                    }
                }
                State::Command => {
                    if rest.is_empty() {
                        return pos;
                    }
                    if reply_bytes(out) >= MAX_UNWRITTEN_REPLIES {
                        // Let the caller write before more is parsed, so a
                        // client that never reads cannot pile replies up.
                        self.paused = true;
                        return pos;
                    }
                    let lf = memchr::memchr(b'\n', rest);
                    if self.discarding {
                        match lf {
                            Some(i) => {
                                self.discarding = false;
                                pos += i + 1;
                                continue;
                            }
                            None => return input.len(),
                        }
                    }
                    let Some(i) = lf else {
                        if rest.len() > self.config.max_line_length {
                            // Reply now and drop the line as it arrives, so
                            // an endless line costs no memory.
                            self.discarding = true;
                            self.refuse(
                                out,
                                Rejection::LineTooLong,
                                b"500 5.5.2 line too long\r\n",
                            );
                            return input.len();
                        }
                        return pos;
                    };
                    let line = &rest[..=i];
                    pos += i + 1;
                    if line.len() > self.config.max_line_length {
                        self.refuse(out, Rejection::LineTooLong, b"500 5.5.2 line too long\r\n");
                    } else if !line.ends_with(b"\r\n") {
                        self.refuse(
                            out,
                            Rejection::LineTooLong,
                            b"500 5.5.2 command line must end with CRLF\r\n",
                        );
                    } else {
                        self.command(line, out);
                    }
                }
            }
        }
    }

    fn finish_data(&mut self, result: Result<(), DataError>, out: &mut Vec<Output>) {
        if let Some(reply) = self.content_refused.take()
            && result.is_ok()
        {
            self.state = State::Command;
            self.reset_transaction();
            self.refuse(out, Rejection::InsufficientStorage, reply);
            return;
        }
        match result {
            Ok(()) => {
                let Some(mail) = self.mail.take() else {
                    // Unreachable by construction (DATA needs MAIL); refuse
                    // rather than invent an envelope.
                    self.state = State::Command;
                    self.reset_transaction();
                    push_reply(out, b"451 4.3.0 internal error: no envelope\r\n");
                    return;
                };
                let hops = count_received(self.message.get(self.header_len..).unwrap_or_default());
                if hops > self.config.max_hops {
                    self.state = State::Command;
                    self.reset_transaction();
                    self.refuse(out, Rejection::TooManyHops, b"554 5.4.6 too many hops\r\n");
                    return;
                }
                let transaction = Transaction {
                    helo: self.helo.clone().unwrap_or_default(),
                    peer: self.peer,
                    sender: mail.sender,
                    recipients: std::mem::take(&mut self.recipients),
                    envid: mail.envid,
                    ret: mail.ret,
                    body_8bit: mail.body_8bit,
                    smtputf8: mail.smtputf8,
                    mt_priority: mail.mt_priority,
                    message: std::mem::take(&mut self.message),
                    user: self.user.clone(),
                    tls: self.tls.clone(),
                };
                self.reset_transaction();
                self.state = State::AwaitQueue;
                out.push(Output::Message(Box::new(transaction)));
            }
            Err(error) => {
                self.state = State::Command;
                self.reset_transaction();
                let reason = match error {
                    DataError::BareLineEnding => Rejection::BareLineEnding,
                    DataError::TooLarge => Rejection::MessageTooLarge,
                };
                self.refuse(out, reason, error.reply());
            }
        }
    }

    /// Sends a refusal, counts it, and closes the session after too many.
    fn refuse(&mut self, out: &mut Vec<Output>, reason: Rejection, reply: &[u8]) {
        push_reply(out, reply);
        self.note(reason);
        // Over-limit recipients and sizes are normal client behaviour (it
        // retries the rest later), not a sign of a broken peer.
        if !matches!(
            reason,
            Rejection::TooManyRecipients
                | Rejection::MessageTooLarge
                | Rejection::TooManyHops
                | Rejection::InsufficientStorage
        ) {
            self.errors += 1;
        }
        if self.errors >= MAX_ERRORS && !matches!(self.state, State::Closed) {
            let bye = format!(
                "421 4.7.0 {} too many errors, closing\r\n",
                self.config.hostname
            );
            push_reply(out, bye.as_bytes());
            self.note(Rejection::TooManyErrors);
            self.close(out);
        }
    }

    fn note(&mut self, reason: Rejection) {
        if self.rejections.len() < MAX_KEPT_REJECTIONS {
            self.rejections.push(reason);
        }
    }

    fn close(&mut self, out: &mut Vec<Output>) {
        self.state = State::Closed;
        self.reset_transaction();
        out.push(Output::Close);
    }

    fn command(&mut self, line: &[u8], out: &mut Vec<Output>) {
        if self.security_command(line, out) {
            return;
        }
        let verb = verb(line);
        if verb.eq_ignore_ascii_case(b"BDAT") {
            // CHUNKING is not offered, so the client's chunk follows with
            // no way to know its end: its bytes must never be read as
            // commands. Refuse and close, keeping the stream in sync.
            self.note(Rejection::Unimplemented);
            let reply = format!(
                "502 5.5.1 BDAT not offered\r\n421 4.7.0 {} closing, BDAT without CHUNKING\r\n",
                self.config.hostname
            );
            push_reply(out, reply.as_bytes());
            self.close(out);
            return;
        }
        if is_junk(verb) {
            if self.junk >= MAX_JUNK_COMMANDS {
                let bye = format!(
                    "421 4.7.0 {} too many junk commands, closing\r\n",
                    self.config.hostname
                );
                push_reply(out, bye.as_bytes());
                self.note(Rejection::TooManyJunkCommands);
                self.close(out);
                return;
            }
            self.junk += 1;
        }
        let mut bytes = line.iter();
        let request = match Request::parse(&mut bytes) {
            Ok(request) => request,
            Err(ProtoError::InvalidParameter {
                param: "MT-PRIORITY",
            }) if self.config.mt_priority.is_none() => {
                // smtp-proto knows the parameter; a listener that does not
                // offer it answers as for any parameter it does not know.
                self.refuse(
                    out,
                    Rejection::Syntax,
                    b"555 5.5.4 unsupported parameter MT-PRIORITY\r\n",
                );
                return;
            }
            Err(ProtoError::UnsupportedParameter { param })
                if self.config.mt_priority.is_some()
                    && param.eq_ignore_ascii_case("MT-PRIORITY") =>
            {
                // The keyword without `=value`.
                self.refuse(
                    out,
                    Rejection::Syntax,
                    b"501 5.5.4 invalid MT-PRIORITY parameter, write -9 to 9\r\n",
                );
                return;
            }
            Err(error) => {
                let (reason, reply) = parse_error_reply(&error);
                self.refuse(out, reason, reply.as_bytes());
                return;
            }
        };
        match request {
            Request::Ehlo { host } => {
                self.helo = Some(host.into_owned());
                self.esmtp = true;
                self.reset_transaction();
                let reply = self.ehlo_reply();
                push_reply(out, reply.as_bytes());
            }
            Request::Helo { host } => {
                self.helo = Some(host.into_owned());
                self.esmtp = false;
                self.reset_transaction();
                let reply = format!("250 {}\r\n", self.config.hostname);
                push_reply(out, reply.as_bytes());
            }
            Request::Mail { from } => {
                if !self.mail_forbidden(out) {
                    self.mail_from(from, line, out)
                }
            }
            Request::Rcpt { to } => self.rcpt_to(to, line, out),
            Request::Data => self.data(out),
            Request::Rset => {
                self.reset_transaction();
                push_reply(out, b"250 2.0.0 Ok\r\n");
            }
            Request::Noop { .. } => push_reply(out, b"250 2.0.0 Ok\r\n"),
            Request::Quit => {
                let reply = format!("221 2.0.0 {} closing\r\n", self.config.hostname);
                push_reply(out, reply.as_bytes());
                self.close(out);
            }
            Request::Vrfy { .. } => push_reply(
                out,
                b"252 2.5.0 Cannot VRFY user, but will accept message and attempt delivery\r\n",
            ),
            Request::Help { .. } => {
                push_reply(out, b"214 2.0.0 poolrelay: see RFC 5321\r\n");
            }
            Request::Lhlo { .. } => {
                self.refuse(
                    out,
                    Rejection::Syntax,
                    b"500 5.5.1 command unrecognized\r\n",
                );
            }
            // Not offered in EHLO: BDAT, EXPN, ETRN, ATRN, BURL (STARTTLS
            // and AUTH are handled before parsing, in security.rs).
            _ => self.refuse(
                out,
                Rejection::Unimplemented,
                b"502 5.5.1 command not implemented\r\n",
            ),
        }
    }

    fn ehlo_reply(&self) -> String {
        let mt_priority = self
            .config
            .mt_priority
            .map(|policy| format!("250-MT-PRIORITY {policy}\r\n"))
            .unwrap_or_default();
        format!(
            "250-{}\r\n250-PIPELINING\r\n250-SIZE {}\r\n250-8BITMIME\r\n\
             250-ENHANCEDSTATUSCODES\r\n250-SMTPUTF8\r\n{}{mt_priority}250 DSN\r\n",
            self.config.hostname,
            self.config.max_message_size,
            self.security_keywords()
        )
    }

    /// Whether this client's MT-PRIORITY values above 0 are honoured
    /// (RFC 6710 lets a server lower others). The one place trust is
    /// decided: a client in the listener's `mt_priority_trusted` networks,
    /// or an authenticated one (AUTH happens mid-connection, so only the
    /// session knows).
    pub fn mt_priority_trusted(&self) -> bool {
        self.config.mt_priority_trusted || self.authenticated_user().is_some()
    }

    fn data(&mut self, out: &mut Vec<Output>) {
        if self.mail.is_none() {
            self.refuse(out, Rejection::Sequence, b"503 5.5.1 need MAIL command\r\n");
            return;
        }
        if self.recipients.is_empty() {
            self.refuse(
                out,
                Rejection::Sequence,
                b"554 5.5.1 no valid recipients\r\n",
            );
            return;
        }
        // The header goes in first so the content is never copied again.
        self.message = self.received_header(SystemTime::now());
        self.header_len = self.message.len();
        self.state = State::Data(DataDecoder::new(self.config.max_message_size));
        push_reply(out, b"354 End data with <CR><LF>.<CR><LF>\r\n");
    }

    /// Our trace header (RFC 5321 §4.4), protocol name per RFC 3848/6531.
    fn received_header(&self, now: SystemTime) -> Vec<u8> {
        let helo = self.helo.as_deref().map(header_safe).unwrap_or_default();
        let ip = match self.peer.ip() {
            IpAddr::V4(v4) => format!("[{v4}]"),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => format!("[{v4}]"),
                None => format!("[IPv6:{v6}]"),
            },
        };
        let smtputf8 = self.mail.as_ref().is_some_and(|m| m.smtputf8);
        let protocol = self.protocol(smtputf8);
        let tls = match &self.tls {
            Some(t) => format!(
                "\r\n\t(using {} with cipher {})",
                t.version,
                header_safe(&t.cipher)
            ),
            None => String::new(),
        };
        let mut header = format!(
            "Received: from {helo} ({ip}){tls}\r\n\tby {} (poolrelay) with {protocol}",
            header_safe(&self.config.hostname)
        );
        if let [only] = self.recipients.as_slice() {
            header.push_str(&format!("\r\n\tfor <{}>", header_safe(&only.address)));
        }
        header.push_str(&format!("; {}\r\n", rfc5322_date(unix_secs(now))));
        header.into_bytes()
    }
}

/// Bytes of replies in `out`.
fn reply_bytes(out: &[Output]) -> usize {
    out.iter()
        .map(|o| match o {
            Output::Reply(bytes) => bytes.len(),
            _ => 0,
        })
        .sum()
}

/// Appends a reply to the last [`Output::Reply`], or starts one.
fn push_reply(out: &mut Vec<Output>, reply: &[u8]) {
    if let Some(Output::Reply(bytes)) = out.last_mut() {
        bytes.extend_from_slice(reply);
    } else {
        out.push(Output::Reply(reply.to_vec()));
    }
}

fn parse_error_reply(error: &ProtoError) -> (Rejection, String) {
    match error {
        ProtoError::UnknownCommand => (
            Rejection::Syntax,
            "500 5.5.1 command unrecognized\r\n".into(),
        ),
        ProtoError::InvalidSenderAddress => (
            Rejection::BadAddress,
            "501 5.1.7 bad sender address syntax\r\n".into(),
        ),
        ProtoError::InvalidRecipientAddress => (
            Rejection::BadAddress,
            "501 5.1.3 bad recipient address syntax\r\n".into(),
        ),
        ProtoError::SyntaxError { syntax } => {
            (Rejection::Syntax, format!("501 5.5.4 syntax: {syntax}\r\n"))
        }
        ProtoError::InvalidParameter { param } => (
            Rejection::Syntax,
            format!("501 5.5.4 invalid {param} parameter\r\n"),
        ),
        ProtoError::UnsupportedParameter { param } => (
            Rejection::Syntax,
            format!("555 5.5.4 unsupported parameter {}\r\n", printable(param)),
        ),
        _ => (Rejection::Syntax, "501 5.5.4 syntax error\r\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> SessionConfig {
        SessionConfig {
            hostname: "relay.test".into(),
            max_message_size: 1000,
            max_recipients: 3,
            max_line_length: 100,
            relay_allowed: true,
            max_hops: 50,
            security: Security::default(),
            mt_priority: None,
            mt_priority_trusted: false,
        }
    }

    fn peer() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 40000))
    }

    /// Everything the client would see, and every transaction queued.
    #[derive(Default)]
    struct Seen {
        replies: String,
        messages: Vec<Transaction>,
        closed: bool,
    }

    /// Drives a session like the listener would: writes replies, queues
    /// messages as "Q1", "Q2"…, resumes with feed(&[]).
    fn drive(session: &mut Session, outputs: Vec<Output>, seen: &mut Seen) {
        let mut pending = outputs;
        while !pending.is_empty() {
            let mut resumed = Vec::new();
            for output in pending {
                match output {
                    Output::Reply(bytes) => seen.replies.push_str(&String::from_utf8_lossy(&bytes)),
                    Output::Message(t) => {
                        seen.messages.push(*t);
                        let id = format!("Q{}", seen.messages.len());
                        let reply = session.queued(&id);
                        seen.replies.push_str(&String::from_utf8_lossy(&reply));
                        resumed = session.feed(&[]);
                    }
                    Output::Close => seen.closed = true,
                    Output::StartTls | Output::Authenticate(_) => {
                        panic!("no STARTTLS or AUTH in these tests")
                    }
                }
            }
            pending = resumed;
        }
    }

    fn run_with(config: SessionConfig, input: &[u8], byte_by_byte: bool) -> Seen {
        let (mut session, banner) = Session::new(config, peer());
        let mut seen = Seen {
            replies: String::from_utf8_lossy(&banner).into_owned(),
            ..Seen::default()
        };
        if byte_by_byte {
            for b in input {
                let out = session.feed(std::slice::from_ref(b));
                drive(&mut session, out, &mut seen);
            }
        } else {
            let out = session.feed(input);
            drive(&mut session, out, &mut seen);
        }
        seen
    }

    fn run(input: &[u8]) -> Seen {
        run_with(config(), input, false)
    }

    /// Reply codes (with enhanced code when present) in order.
    fn codes(replies: &str) -> Vec<String> {
        replies
            .split("\r\n")
            .filter(|l| l.len() >= 4 && &l[3..4] == " ")
            .map(|l| {
                let mut parts = l.splitn(3, ' ');
                let code = parts.next().unwrap_or_default();
                match parts.next() {
                    Some(e) if e.chars().next().is_some_and(|c| c.is_ascii_digit()) => {
                        format!("{code} {e}")
                    }
                    _ => code.to_string(),
                }
            })
            .collect()
    }

    fn content(t: &Transaction) -> &[u8] {
        // Skip our Received: header (its continuation lines start with a tab).
        let mut pos = 0;
        let m = &t.message;
        loop {
            let eol = m[pos..].windows(2).position(|w| w == b"\r\n").unwrap() + pos + 2;
            pos = eol;
            if m.get(pos) != Some(&b'\t') {
                return &m[pos..];
            }
        }
    }

    const TXN: &[u8] = b"EHLO client.test\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\n\
RCPT TO:<z@y.test>\r\nDATA\r\nSubject: hi\r\n\r\nbody\r\n.\r\nQUIT\r\n";

    #[test]
    fn pipelined_transaction_in_one_buffer() {
        let (mut session, banner) = Session::new(config(), peer());
        assert_eq!(banner, b"220 relay.test ESMTP poolrelay\r\n");
        let out = session.feed(TXN);
        // One coalesced reply for the pipelined commands, then the message;
        // QUIT waits until the message is queued.
        assert_eq!(out.len(), 2, "{out:?}");
        let Output::Reply(replies) = &out[0] else {
            panic!("{out:?}")
        };
        let replies = String::from_utf8_lossy(replies);
        assert!(replies.starts_with("250-relay.test\r\n250-PIPELINING\r\n250-SIZE 1000\r\n"));
        for cap in ["8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8"] {
            assert!(replies.contains(&format!("250-{cap}\r\n")), "{replies}");
        }
        assert!(replies.contains("250 DSN\r\n"));
        assert_eq!(
            codes(&replies),
            ["250", "250 2.1.0", "250 2.1.5", "250 2.1.5", "354"]
        );
        let Output::Message(t) = &out[1] else {
            panic!("{out:?}")
        };
        assert_eq!(t.helo, "client.test");
        assert_eq!(t.sender, "a@b.test");
        let rcpts: Vec<_> = t.recipients.iter().map(|r| r.address.as_str()).collect();
        assert_eq!(rcpts, ["x@y.test", "z@y.test"]);
        assert_eq!(content(t), b"Subject: hi\r\n\r\nbody\r\n");
        assert!(!session.in_data());
        assert!(session.feed(b"").is_empty(), "waits for queued()");
        assert_eq!(session.queued("ABC"), b"250 2.0.0 Ok: queued as ABC\r\n");
        let out = session.feed(&[]);
        assert_eq!(
            out,
            [
                Output::Reply(b"221 2.0.0 relay.test closing\r\n".to_vec()),
                Output::Close
            ]
        );
        assert!(session.is_closed());
    }

    #[test]
    fn refused_content_is_read_to_the_dot_kept_nowhere_and_answered_452() {
        fn replies(out: &[Output]) -> Vec<u8> {
            out.iter()
                .filter_map(|o| match o {
                    Output::Reply(b) => Some(b.clone()),
                    _ => None,
                })
                .flatten()
                .collect()
        }
        let (mut s, _) = Session::new(config(), peer());
        let out = s.feed(b"EHLO c\r\nMAIL FROM:<a@x.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n");
        assert!(String::from_utf8_lossy(&replies(&out)).contains("354"));
        s.feed(b"Subject: big\r\n\r\nline one\r\n");
        assert!(s.content_len() > 0);
        s.refuse_content(b"452 4.3.1 insufficient system storage\r\n");
        assert_eq!(s.content_len(), 0);
        let out = s.feed(b"line two\r\nline three\r\n");
        assert_eq!(s.content_len(), 0, "nothing more is kept");
        assert!(replies(&out).is_empty());
        let out = s.feed(b".\r\nNOOP\r\n");
        let text = String::from_utf8_lossy(&replies(&out)).into_owned();
        assert!(text.starts_with("452 4.3.1"), "{text}");
        assert!(text.contains("250"), "the session goes on: {text}");
        assert!(!out.iter().any(|o| matches!(o, Output::Message(_))));
        assert_eq!(s.take_rejections(), vec![Rejection::InsufficientStorage]);
    }

    #[test]
    fn nothing_is_processed_while_a_message_waits() {
        let (mut session, _) = Session::new(config(), peer());
        let out = session.feed(TXN);
        assert!(matches!(out.last(), Some(Output::Message(_))));
        assert!(session.feed(b"NOOP\r\n").is_empty());
        assert_eq!(
            session.queue_failed("disk full"),
            b"452 4.3.1 disk full\r\n"
        );
        let out = session.feed(&[]);
        assert_eq!(
            out,
            [
                Output::Reply(b"221 2.0.0 relay.test closing\r\n".to_vec()),
                Output::Close
            ]
        );
    }

    #[test]
    fn byte_by_byte_matches_one_buffer() {
        let whole = run(TXN);
        let bytes = run_with(config(), TXN, true);
        assert_eq!(whole.replies, bytes.replies);
        assert_eq!(whole.messages.len(), 1);
        assert_eq!(bytes.messages.len(), 1);
        assert_eq!(content(&whole.messages[0]), content(&bytes.messages[0]));
        assert!(whole.closed && bytes.closed);
    }

    #[test]
    fn random_chunks_match_one_buffer() {
        let mut input = Vec::new();
        for _ in 0..3 {
            input.extend_from_slice(
                b"MAIL FROM:<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n..a\r\nb\r\n.\r\nNOOP\r\n",
            );
        }
        let mut full = b"EHLO c\r\n".to_vec();
        full.extend_from_slice(&input);
        let expect = run(&full);
        assert_eq!(expect.messages.len(), 3);
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for _ in 0..200 {
            let (mut session, banner) = Session::new(config(), peer());
            let mut seen = Seen {
                replies: String::from_utf8_lossy(&banner).into_owned(),
                ..Seen::default()
            };
            let mut pos = 0;
            while pos < full.len() {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let n = 1 + (seed % 9) as usize;
                let end = (pos + n).min(full.len());
                let out = session.feed(&full[pos..end]);
                drive(&mut session, out, &mut seen);
                pos = end;
            }
            assert_eq!(seen.replies, expect.replies);
            assert_eq!(seen.messages.len(), 3);
            for t in &seen.messages {
                assert_eq!(content(t), b".a\r\nb\r\n");
            }
        }
    }

    #[test]
    fn null_sender_and_parameters_are_kept() {
        let seen = run(
            b"EHLO c\r\nMAIL FROM:<> BODY=8BITMIME SMTPUTF8 RET=HDRS ENVID=QQ+2B1\r\n\
RCPT TO:<x@y.test> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;o@y.test\r\nDATA\r\nx\r\n.\r\n",
        );
        assert_eq!(
            codes(&seen.replies)[2..],
            ["250 2.1.0", "250 2.1.5", "354", "250 2.0.0"]
        );
        let t = &seen.messages[0];
        assert_eq!(t.sender, "");
        assert!(t.body_8bit && t.smtputf8);
        assert_eq!(t.ret, Some(Ret::Headers));
        assert_eq!(t.envid.as_deref(), Some("QQ+1"));
        let r = &t.recipients[0];
        assert_eq!(r.orcpt.as_deref(), Some("rfc822;o@y.test"));
        assert_eq!(
            r.notify,
            smtp_proto::RCPT_NOTIFY_SUCCESS | smtp_proto::RCPT_NOTIFY_FAILURE
        );
        assert!(t.message.starts_with(b"Received: from c ([127.0.0.1])\r\n\tby relay.test (poolrelay) with UTF8SMTP\r\n\tfor <x@y.test>; "));
    }

    #[test]
    fn received_header_format() {
        let seen =
            run(b"HELO c(x)\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nRCPT TO:<z@y>\r\nDATA\r\n.\r\n");
        let t = &seen.messages[0];
        let text = String::from_utf8_lossy(&t.message);
        let (head, date) = text.split_once("; ").unwrap();
        assert_eq!(
            head,
            "Received: from c?x? ([127.0.0.1])\r\n\tby relay.test (poolrelay) with SMTP"
        );
        assert!(date.ends_with(" +0000\r\n"), "{date}");
        assert_eq!(content(t), b"");
    }

    #[test]
    fn ipv6_peer_in_received() {
        let (mut s, _) = Session::new(config(), "[2001:db8::1]:25".parse().unwrap());
        let mut seen = Seen::default();
        let out = s.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n");
        drive(&mut s, out, &mut seen);
        assert!(
            seen.messages[0]
                .message
                .starts_with(b"Received: from c ([IPv6:2001:db8::1])")
        );
    }

    #[test]
    fn size_limit_at_mail_and_in_data() {
        let seen = run(
            b"EHLO c\r\nMAIL FROM:<a@b> SIZE=1001\r\nMAIL FROM:<a@b> SIZE=1000\r\n\
RCPT TO:<x@y>\r\nDATA\r\n",
        );
        assert_eq!(
            codes(&seen.replies)[2..],
            ["552 5.3.4", "250 2.1.0", "250 2.1.5", "354"]
        );
        let mut big = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n".to_vec();
        for _ in 0..30 {
            big.extend_from_slice(&[b'x'; 48]);
            big.extend_from_slice(b"\r\n");
        }
        big.extend_from_slice(b".\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nsmall\r\n.\r\n");
        for bytewise in [false, true] {
            let seen = run_with(config(), &big, bytewise);
            assert_eq!(
                codes(&seen.replies)[2..],
                [
                    "250 2.1.0",
                    "250 2.1.5",
                    "354",
                    "552 5.3.4",
                    "250 2.1.0",
                    "250 2.1.5",
                    "354",
                    "250 2.0.0"
                ]
            );
            assert_eq!(seen.messages.len(), 1);
            assert_eq!(content(&seen.messages[0]), b"small\r\n");
        }
    }

    #[test]
    fn max_recipients() {
        let seen = run(
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<1@y>\r\nRCPT TO:<2@y>\r\n\
RCPT TO:<3@y>\r\nRCPT TO:<4@y>\r\nDATA\r\n.\r\n",
        );
        assert_eq!(
            codes(&seen.replies)[2..],
            [
                "250 2.1.0",
                "250 2.1.5",
                "250 2.1.5",
                "250 2.1.5",
                "452 4.5.3",
                "354",
                "250 2.0.0"
            ]
        );
        assert_eq!(seen.messages[0].recipients.len(), 3);
    }

    #[test]
    fn relay_denied() {
        let config = SessionConfig {
            relay_allowed: false,
            ..config()
        };
        let seen = run_with(
            config,
            b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n",
            false,
        );
        assert!(
            seen.replies
                .contains("554 5.7.1 <x@y.test>: relay access denied\r\n")
        );
        assert_eq!(codes(&seen.replies).last().unwrap(), "554 5.5.1");
        assert!(seen.messages.is_empty());
    }

    #[test]
    fn line_too_long() {
        let mut input = b"EHLO c\r\nNOOP ".to_vec();
        input.extend_from_slice(&[b'x'; 200]);
        input.extend_from_slice(b"\r\nNOOP\r\n");
        for bytewise in [false, true] {
            let seen = run_with(config(), &input, bytewise);
            assert_eq!(codes(&seen.replies)[2..], ["500 5.5.2", "250 2.0.0"]);
        }
        // Exactly at the limit (CRLF included) is fine.
        let mut input = b"NOOP ".to_vec();
        input.extend_from_slice(&[b'x'; 93]);
        input.extend_from_slice(b"\r\n");
        assert_eq!(input.len(), 100);
        assert_eq!(codes(&run(&input).replies)[1..], ["250 2.0.0"]);
    }

    #[test]
    fn bare_lf_command_line() {
        let seen = run(b"NOOP\nNOOP\r\n");
        assert_eq!(codes(&seen.replies)[1..], ["500 5.5.2", "250 2.0.0"]);
    }

    #[test]
    fn smuggling_attempts_are_refused_and_the_session_stays_in_sync() {
        for fake in [&b"\n.\n"[..], b"\n.\r\n", b"\r\n.\n", b"\r.\r", b"\r.\r\n"] {
            let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nfirst".to_vec();
            input.extend_from_slice(fake);
            input.extend_from_slice(
                b"MAIL FROM:<evil@x>\r\nRCPT TO:<victim@y>\r\nDATA\r\nsmuggled\r\n.\r\n",
            );
            input.extend_from_slice(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\ngood\r\n.\r\n");
            for bytewise in [false, true] {
                let seen = run_with(config(), &input, bytewise);
                assert_eq!(
                    codes(&seen.replies)[2..],
                    [
                        "250 2.1.0",
                        "250 2.1.5",
                        "354",
                        "554 5.6.0",
                        "250 2.1.0",
                        "250 2.1.5",
                        "354",
                        "250 2.0.0"
                    ],
                    "{fake:?}"
                );
                assert_eq!(seen.messages.len(), 1, "{fake:?}");
                assert_eq!(seen.messages[0].sender, "a@b");
                assert_eq!(content(&seen.messages[0]), b"good\r\n");
            }
        }
    }

    #[test]
    fn dot_unstuffing() {
        let seen =
            run(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n..\r\n...x\r\n.y\r\n.\r\n");
        assert_eq!(content(&seen.messages[0]), b".\r\n..x\r\ny\r\n");
    }

    #[test]
    fn sequence_errors() {
        let seen = run(
            b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\nHELO c\r\nDATA\r\n\
MAIL FROM:<a@b>\r\nMAIL FROM:<a@b>\r\nDATA\r\nRCPT TO:<>\r\nRSET\r\nRCPT TO:<x@y>\r\n",
        );
        assert_eq!(
            codes(&seen.replies)[1..],
            [
                "503 5.5.1",
                "503 5.5.1",
                "503 5.5.1",
                "250",
                "503 5.5.1",
                "250 2.1.0",
                "503 5.5.1",
                "554 5.5.1",
                "501 5.1.3",
                "250 2.0.0",
                "503 5.5.1"
            ]
        );
    }

    #[test]
    fn other_commands() {
        let seen = run(
            b"EHLO c\r\nVRFY x\r\nHELP\r\nNOOP\r\nSTARTTLS\r\nAUTH PLAIN\r\nETRN x\r\n\
EXPN x\r\nFOO\r\nMAIL TO:<x>\r\nMAIL FROM:<a@b> FOO=1\r\nQUIT\r\nNOOP\r\n",
        );
        assert_eq!(
            codes(&seen.replies)[2..],
            [
                "252 2.5.0",
                "214 2.0.0",
                "250 2.0.0",
                "502 5.5.1",
                "502 5.5.1",
                "502 5.5.1",
                "502 5.5.1",
                "500 5.5.1",
                "501 5.5.4",
                "555 5.5.4",
                "221 2.0.0"
            ]
        );
        assert!(seen.closed);
    }

    #[test]
    fn too_many_errors_closes() {
        let mut input = Vec::new();
        for _ in 0..25 {
            input.extend_from_slice(b"FOO\r\n");
        }
        let (mut session, _) = Session::new(config(), peer());
        let out = session.feed(&input);
        assert_eq!(out.last(), Some(&Output::Close));
        let Output::Reply(r) = &out[0] else { panic!() };
        let r = String::from_utf8_lossy(r);
        assert_eq!(codes(&r).len(), MAX_ERRORS as usize + 1);
        assert!(r.ends_with("421 4.7.0 relay.test too many errors, closing\r\n"));
        assert!(
            session
                .take_rejections()
                .contains(&Rejection::TooManyErrors)
        );
        assert!(session.feed(b"NOOP\r\n").is_empty());
    }

    #[test]
    fn non_ascii_needs_smtputf8() {
        let seen = run(
            "EHLO c\r\nMAIL FROM:<ä@b>\r\nMAIL FROM:<ä@b> SMTPUTF8\r\nRCPT TO:<ö@y>\r\n".as_bytes(),
        );
        assert_eq!(
            codes(&seen.replies)[2..],
            ["553 5.6.7", "250 2.1.0", "250 2.1.5"]
        );
    }

    #[test]
    fn timeout_and_state() {
        let (mut session, _) = Session::new(config(), peer());
        assert_eq!(
            session.timeout_reply(),
            b"421 4.4.2 relay.test timeout, closing\r\n"
        );
        session.feed(b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\npartial");
        assert!(session.in_data());
        assert_eq!(session.helo(), Some("c"));
    }

    #[test]
    fn postmaster_is_not_the_null_sender() {
        let seen =
            run(b"EHLO c\r\nMAIL FROM:<postmaster>\r\nMAIL FROM: <>\r\nRCPT TO:<Postmaster>\r\n");
        assert_eq!(
            codes(&seen.replies)[2..],
            ["501 5.1.7", "250 2.1.0", "550 5.1.1"]
        );
    }

    #[test]
    fn ehlo_resets_the_transaction() {
        let seen = run(b"EHLO c\r\nMAIL FROM:<a@b>\r\nEHLO d\r\nRCPT TO:<x@y>\r\n");
        assert_eq!(codes(&seen.replies).last().unwrap(), "503 5.5.1");
    }

    #[test]
    fn bdat_is_refused_and_its_chunk_never_runs_as_commands() {
        for verb in ["BDAT 40 LAST", "bdat 40", "BDAT x"] {
            let input = format!(
                "EHLO c\r\nMAIL FROM:<a@b>\r\n{verb}\r\nRCPT TO:<x@y>\r\nDATA\r\nhi\r\n.\r\n"
            );
            for bytewise in [false, true] {
                let seen = run_with(config(), input.as_bytes(), bytewise);
                assert_eq!(
                    codes(&seen.replies)[2..],
                    ["250 2.1.0", "502 5.5.1", "421 4.7.0"],
                    "{verb}"
                );
                assert!(seen.closed && seen.messages.is_empty(), "{verb}");
            }
        }
    }

    #[test]
    fn junk_commands_are_limited_and_a_queued_message_resets_the_count() {
        let mut input = Vec::new();
        for i in 0..MAX_JUNK_COMMANDS {
            input.extend_from_slice(if i % 2 == 0 { b"NOOP\r\n" } else { b"RSET\r\n" });
        }
        input.extend_from_slice(b"NOOP\r\nNOOP\r\n");
        let (mut session, _) = Session::new(config(), peer());
        let out = session.feed(&input);
        let Output::Reply(r) = &out[0] else {
            panic!("{out:?}")
        };
        let r = String::from_utf8_lossy(r);
        assert_eq!(codes(&r).len(), MAX_JUNK_COMMANDS as usize + 1);
        assert!(r.ends_with("421 4.7.0 relay.test too many junk commands, closing\r\n"));
        assert_eq!(out.last(), Some(&Output::Close));
        assert!(
            session
                .take_rejections()
                .contains(&Rejection::TooManyJunkCommands)
        );

        // A client that moves mail between its RSETs is never cut off.
        let mut input = b"EHLO c\r\n".to_vec();
        for _ in 0..3 {
            for _ in 0..MAX_JUNK_COMMANDS - 2 {
                input.extend_from_slice(b"RSET\r\n");
            }
            input.extend_from_slice(b"MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n");
        }
        let seen = run(&input);
        assert_eq!(seen.messages.len(), 3);
        assert!(!seen.closed);
    }

    #[test]
    fn replies_are_bounded_per_feed_until_written() {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\n".to_vec();
        for _ in 0..2000 {
            input.extend_from_slice(b"RCPT TO:<x@y>\r\n");
        }
        let (mut session, _) = Session::new(config(), peer());
        let mut out = session.feed(&input);
        let mut replies = String::new();
        let mut feeds = 0;
        loop {
            let bytes = reply_bytes(&out);
            assert!(bytes < MAX_UNWRITTEN_REPLIES + 512, "{bytes}");
            for o in &out {
                if let Output::Reply(r) = o {
                    replies.push_str(&String::from_utf8_lossy(r));
                }
            }
            feeds += 1;
            if !session.paused() {
                break;
            }
            out = session.feed(&[]);
        }
        assert!(feeds > 2, "{feeds}");
        let codes = codes(&replies);
        assert_eq!(codes.len(), 2002);
        assert_eq!(codes.iter().filter(|c| *c == "452 4.5.3").count(), 1997);
    }

    fn with_received(n: usize) -> Vec<u8> {
        let mut input = b"EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n".to_vec();
        for i in 0..n {
            let name = ["Received", "received", "RECEIVED "][i % 3];
            input.extend_from_slice(format!("{name}: from h{i}\r\n\tby h;\r\n").as_bytes());
        }
        input.extend_from_slice(b"Subject: s\r\n\r\nReceived: in the body\r\n.\r\n");
        input
    }

    #[test]
    fn more_received_fields_than_max_hops_is_a_loop() {
        let config = SessionConfig {
            max_message_size: 100_000,
            max_hops: 5,
            ..config()
        };
        let seen = run_with(config.clone(), &with_received(5), false);
        assert_eq!(codes(&seen.replies).last().unwrap(), "250 2.0.0");
        assert_eq!(seen.messages.len(), 1);
        let (mut session, _) = Session::new(config.clone(), peer());
        let out = session.feed(&with_received(6));
        let Output::Reply(r) = &out[0] else {
            panic!("{out:?}")
        };
        assert!(String::from_utf8_lossy(r).ends_with("554 5.4.6 too many hops\r\n"));
        assert_eq!(out.len(), 1, "nothing queued: {out:?}");
        assert_eq!(session.take_rejections(), [Rejection::TooManyHops]);
        assert!(!session.in_transaction());
        assert_eq!(count_received(b"Subject: x\r\n\r\nReceived: y\r\n"), 0);
        assert_eq!(count_received(b"not a header\r\nReceived: y\r\n"), 0);
    }

    #[test]
    fn envid_and_orcpt_must_be_xtext_without_control_characters() {
        for (params, code) in [
            ("ENVID=a+0Db", "501 5.5.4"),
            ("ENVID=a+1B[31m", "501 5.5.4"),
            ("ENVID=a+ZZ", "501 5.5.4"),
            ("ENVID=a+2", "501 5.5.4"),
            ("ENVID=a=b", "501 5.5.4"),
            ("ENVID=+C3", "501 5.5.4"),
            ("ENVID=ok+2Bx", "250 2.1.0"),
        ] {
            let seen = run(format!("EHLO c\r\nMAIL FROM:<a@b> {params}\r\n").as_bytes());
            assert_eq!(codes(&seen.replies)[2..], [code], "{params}");
        }
        for (params, code) in [
            ("ORCPT=rfc822;a+0A@b", "501 5.5.4"),
            ("ORCPT=rfc822;a+00@b", "501 5.5.4"),
            ("ORCPT=rfc822;a+7F@b", "501 5.5.4"),
            ("ORCPT=rfc822;a+G0@b", "501 5.5.4"),
            ("ORCPT=rfc822;a@b", "250 2.1.5"),
        ] {
            let seen =
                run(format!("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<x@y> {params}\r\n").as_bytes());
            assert_eq!(codes(&seen.replies)[3..], [code], "{params}");
        }
        let seen = run(
            b"EHLO c\r\nMAIL FROM:<a@b> ENVID=+C3+B6+2B\r\nRCPT TO:<x@y> ORCPT=rfc822;G+20o+2B@y\r\n\
DATA\r\n.\r\n",
        );
        let t = &seen.messages[0];
        assert_eq!(t.envid.as_deref(), Some("\u{f6}+"));
        assert_eq!(t.recipients[0].orcpt.as_deref(), Some("rfc822;G o+@y"));
    }

    fn rcpt_of(path: &str) -> (String, Vec<Transaction>) {
        let seen = run(
            format!("EHLO c\r\nMAIL FROM:<a@b>\r\nRCPT TO:<{path}>\r\nDATA\r\n.\r\n").as_bytes(),
        );
        (codes(&seen.replies)[3].clone(), seen.messages)
    }

    #[test]
    fn quoted_local_parts_are_kept_quoted() {
        for (path, stored) in [
            ("\"john doe\"@x.test", "\"john doe\"@x.test"),
            ("\"a@evil\"@x.test", "\"a@evil\"@x.test"),
            ("\"john\"@x.test", "john@x.test"),
            ("\"a\\\"b\"@x.test", "\"a\\\"b\"@x.test"),
            ("\"a\\\\b\"@x.test", "\"a\\\\b\"@x.test"),
            ("\"a\\b\"@x.test", "ab@x.test"),
            ("\"x>y\"@x.test", "\"x>y\"@x.test"),
            ("@r1.test,@r2.test:u@x.test", "u@x.test"),
        ] {
            let (code, messages) = rcpt_of(path);
            assert_eq!(code, "250 2.1.5", "{path}");
            assert_eq!(messages[0].recipients[0].address, stored, "{path}");
        }
        let seen = run(b"EHLO c\r\nMAIL FROM:<\"a b\"@x.test>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n");
        assert_eq!(seen.messages[0].sender, "\"a b\"@x.test");
    }

    #[test]
    fn control_characters_and_bad_paths_are_refused() {
        for path in [
            "\"a\x1bb\"@x.test",
            "\"a\rb\"@x.test",
            "\"a\tb\"@x.test",
            "\"a\\\x01\"@x.test",
            "\"a\"b@x.test",
            "\"a\u{85}b\"@x.test",
            "a@x\u{85}.test",
        ] {
            let (code, messages) = rcpt_of(path);
            assert!(
                code.starts_with("501 5.1.3") || code.starts_with("553"),
                "{path:?}: {code}"
            );
            assert!(messages.is_empty(), "{path:?}");
            let seen = run(format!("EHLO c\r\nMAIL FROM:<{path}> SMTPUTF8\r\n").as_bytes());
            assert_eq!(codes(&seen.replies)[2], "501 5.1.7", "{path:?}");
        }
    }

    #[test]
    fn log_safe_escapes_control_characters() {
        assert!(matches!(
            log_safe("a@b.test"),
            std::borrow::Cow::Borrowed("a@b.test")
        ));
        assert_eq!(log_safe("a\r\nb\x1b[2J\\"), "a\\r\\nb\\u{1b}[2J\\\\");
        assert_eq!(log_safe("x\u{85}"), "x\\u{85}");
    }

    fn mt_config(trusted: bool) -> SessionConfig {
        SessionConfig {
            mt_priority: Some(MtPriorityPolicy::Stanag4406),
            mt_priority_trusted: trusted,
            ..config()
        }
    }

    #[test]
    fn mt_priority_is_advertised_only_when_on() {
        let seen = run_with(mt_config(true), b"EHLO c\r\n", false);
        assert!(
            seen.replies.contains("250-MT-PRIORITY STANAG4406\r\n"),
            "{}",
            seen.replies
        );
        let seen = run(b"EHLO c\r\n");
        assert!(!seen.replies.contains("MT-PRIORITY"), "{}", seen.replies);
    }

    #[test]
    fn mt_priority_values_are_checked_and_kept() {
        for (param, code) in [
            ("MT-PRIORITY=6", "250 2.1.0"),
            ("MT-PRIORITY=-9", "250 2.1.0"),
            ("MT-PRIORITY=+3", "250 2.1.0"),
            ("mt-priority=0", "250 2.1.0"),
            ("MT-PRIORITY=12", "501 5.5.4"),
            ("MT-PRIORITY=-10", "501 5.5.4"),
            ("MT-PRIORITY=x", "501 5.5.4"),
            ("MT-PRIORITY=", "501 5.5.4"),
            ("MT-PRIORITY", "501 5.5.4"),
            ("MT-PRIORITY=06", "501 5.5.4"),
            ("MT-PRIORITY=1 MT-PRIORITY=1", "501 5.5.4"),
            ("MT-PRIORITY=1 SIZE=10 MT-PRIORITY=2", "501 5.5.4"),
        ] {
            let seen = run_with(
                mt_config(true),
                format!("EHLO c\r\nMAIL FROM:<a@b> {param}\r\n").as_bytes(),
                false,
            );
            assert_eq!(codes(&seen.replies)[2..], [code], "{param}");
        }
        let seen = run_with(
            mt_config(true),
            b"EHLO c\r\nMAIL FROM:<a@b> MT-PRIORITY=-4\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n\
MAIL FROM:<a@b>\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n",
            false,
        );
        let got: Vec<Option<i8>> = seen.messages.iter().map(|t| t.mt_priority).collect();
        assert_eq!(got, [Some(-4), None]);
    }

    #[test]
    fn mt_priority_when_off_is_an_unknown_parameter() {
        for param in [
            "MT-PRIORITY=6",
            "MT-PRIORITY=x",
            "MT-PRIORITY=12",
            "MT-PRIORITY",
        ] {
            let seen = run(format!("EHLO c\r\nMAIL FROM:<a@b> {param}\r\n").as_bytes());
            assert_eq!(codes(&seen.replies)[2..], ["555 5.5.4"], "{param}");
        }
    }

    #[test]
    fn an_untrusted_clients_raise_is_lowered_to_zero() {
        let input = b"EHLO c\r\nMAIL FROM:<a@b> MT-PRIORITY=6\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n\
MAIL FROM:<a@b> MT-PRIORITY=-2\r\nRCPT TO:<x@y>\r\nDATA\r\n.\r\n";
        let seen = run_with(mt_config(false), input, false);
        let got: Vec<Option<i8>> = seen.messages.iter().map(|t| t.mt_priority).collect();
        assert_eq!(got, [Some(0), Some(-2)]);
        let seen = run_with(mt_config(true), input, false);
        let got: Vec<Option<i8>> = seen.messages.iter().map(|t| t.mt_priority).collect();
        assert_eq!(got, [Some(6), Some(-2)]);
    }
}
