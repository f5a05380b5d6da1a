//! The outbound SMTP client: one connection to an upstream, reused for many
//! messages, reporting the outcome per recipient.

use crate::reply::Reply;
use std::net::SocketAddr;
use std::time::Duration;

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
#[derive(Debug, Clone)]
pub struct OutboundEnvelope {
    /// Envelope sender; empty = `<>`.
    pub sender: String,
    /// Recipients, in order.
    pub recipients: Vec<String>,
    /// Send BODY=8BITMIME when the upstream offers 8BITMIME.
    pub body_8bit: bool,
    /// Send SMTPUTF8 when offered.
    pub smtputf8: bool,
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
        /// Stage name: greeting, EHLO, MAIL, RCPT, DATA, dot.
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
}

/// One open connection to an upstream.
pub struct Client {
    _private: (),
}

impl Client {
    /// Connects (TCP_NODELAY set), reads the greeting, sends EHLO (falling
    /// back to HELO), records the capabilities.
    pub async fn connect(
        addr: SocketAddr,
        helo_name: &str,
        timeouts: Timeouts,
    ) -> Result<Client, ClientError> {
        let _ = (addr, helo_name, timeouts);
        todo!()
    }

    /// Whether the upstream advertised PIPELINING.
    pub fn pipelining(&self) -> bool {
        todo!()
    }

    /// Runs one transaction: MAIL, every RCPT (pipelined when offered),
    /// DATA only if a recipient was accepted, the dot-stuffed body.
    /// `message` is unstuffed with CRLF line ends.
    pub async fn send(
        &mut self,
        envelope: &OutboundEnvelope,
        message: &[u8],
    ) -> Result<DeliveryReport, ClientError> {
        let _ = (envelope, message);
        todo!()
    }

    /// RSET between transactions on a reused connection.
    pub async fn rset(&mut self) -> Result<(), ClientError> {
        todo!()
    }

    /// QUIT and close, ignoring errors.
    pub async fn quit(self) {}
}
