//! The outbound SMTP client: one connection to an upstream, reused for many
//! messages, reporting the outcome per recipient.
//!
//! [`Client::connect_with`] opens a session (TLS and AUTH as
//! [`ConnectOptions`] say), [`Client::send`] runs one transaction and
//! returns a [`DeliveryReport`], and a [`ClientError`] says whether the
//! host or the message is to blame.

mod connect;
#[cfg(test)]
mod testing;
mod transaction;
mod types;
pub(crate) mod wire;

pub use connect::Client;
pub use types::{
    ClientError, ConnectOptions, Credentials, DeliveryReport, OutboundEnvelope, RecipientDsn,
    Timeouts, TlsMode, stage,
};
pub use wire::Capabilities;
