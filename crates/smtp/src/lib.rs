//! The SMTP wire: the inbound session state machine and DATA framing
//! (sans-IO, fed bytes, returning replies and finished transactions), and
//! the outbound client that reports a result per recipient.
//!
//! This crate knows SMTP, never pools or queues.

pub mod data;
pub mod inbound;
pub mod outbound;
pub mod reply;

pub use inbound::{Output, Session, SessionConfig, Transaction};
pub use outbound::{Client, ClientError, DeliveryReport, OutboundEnvelope};
pub use reply::Reply;
