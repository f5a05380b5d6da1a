//! The SMTP wire: the inbound session state machine and DATA framing
//! (sans-IO, fed bytes, returning replies and finished transactions), and
//! the outbound client that reports a result per recipient.
//!
//! This crate knows SMTP, never pools or queues.

#![warn(missing_docs)]

pub mod base64;
pub mod data;
pub mod date;
pub mod driver;
#[doc(hidden)]
pub mod fuzzing;
pub mod inbound;
pub mod mt_priority;
pub mod outbound;
pub mod reply;
mod tls;
pub use tls::ServerTls;

pub use data::{DataDecoder, DataEncoder, DataError, DataStatus};
pub use inbound::{Output, Recipient, Rejection, Ret, Session, SessionConfig, Transaction};
pub use mt_priority::MtPriorityPolicy;
pub use outbound::{
    Capabilities, Client, ClientError, ConnectOptions, Credentials, DeliveryReport,
    OutboundEnvelope, RecipientDsn, Timeouts, TlsMode,
};
pub use reply::Reply;
