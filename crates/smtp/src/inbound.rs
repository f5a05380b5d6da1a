//! The inbound SMTP session as a state machine: bytes in, replies and
//! finished transactions out. The tokio code around it only moves bytes.

use std::net::SocketAddr;

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
    /// Whether this client may relay; if not, RCPT gets 554 5.7.1.
    pub relay_allowed: bool,
}

/// The DSN RET parameter (RFC 3461).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The message: our Received: header first, then the content as
    /// received, dot-unstuffed, lines ending in CRLF, without the final dot.
    pub message: Vec<u8>,
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
    /// Close the connection (after writing any reply before it).
    Close,
}

/// One inbound SMTP session.
pub struct Session {
    _private: (),
}

impl Session {
    /// Starts a session; returns it and the 220 banner to send.
    pub fn new(config: SessionConfig, peer: SocketAddr) -> (Session, Vec<u8>) {
        let _ = (config, peer);
        todo!()
    }

    /// Feeds bytes read from the client (may be empty, to resume after a
    /// Message). Consumes all of `input` into the session's buffer and
    /// processes as much as it can.
    pub fn feed(&mut self, input: &[u8]) -> Vec<Output> {
        let _ = input;
        todo!()
    }

    /// The message was queued durably under `queue_id`: returns the 250 reply.
    pub fn queued(&mut self, queue_id: &str) -> Vec<u8> {
        let _ = queue_id;
        todo!()
    }

    /// Queueing failed: returns `452 4.3.1` with `reason`.
    pub fn queue_failed(&mut self, reason: &str) -> Vec<u8> {
        let _ = reason;
        todo!()
    }

    /// True while receiving message content (the caller uses the DATA timeout).
    pub fn in_data(&self) -> bool {
        todo!()
    }

    /// The reply to send when the command or data timeout fires (421 4.4.2).
    pub fn timeout_reply(&self) -> Vec<u8> {
        todo!()
    }
}
