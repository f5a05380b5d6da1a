//! End-to-end test harness for poolrelay: the built binary against real SMTP
//! peers, on loopback only.
//!
//! Every process is stopped by its PID when its owner is dropped, and every
//! wait is bounded. When a wait fails, the panic message carries the tail of
//! the logs of the process concerned. The items of the general modules are
//! re-exported here (`use poolrelay_tests::{Relay, Sink, ...}`); the
//! topic modules (`accept_counter`, `admin`, `delivery`, `dkim`, `dns`, `ledger`, `listserv`, `nats`, `operating`,
//! `postfix_upstream`, `priority`, `scripted`) are used by path.

#![warn(missing_docs)]

pub mod accept_counter;
pub mod admin;
pub mod command;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod http;
pub mod ledger;
pub mod listserv;
pub mod mail;
pub mod nats;
pub mod operating;
pub mod ports;
pub mod postfix;
pub mod postfix_upstream;
pub mod priority;
pub mod process;
pub mod prometheus;
pub mod relay;
pub mod scripted;
pub mod secure_listener;
pub mod sink;
pub mod smtp_client;
pub mod wait;

pub use command::{
    CommandOutput, PROMTOOL, poolrelay, promtool, run_with_deadline, run_with_input,
};
pub use http::{HttpResponse, http_get, http_request, percent_encode};
pub use mail::{header_value, message, strip_brackets, unique_id};
pub use ports::{accepts_tcp, free_addr, process_ip};
pub use postfix::{PostfixMessage, PostfixSink, SMTP_SINK, SMTP_SOURCE, smtp_source};
pub use process::{STARTUP_DEADLINE, binary, file_tail, new_tempdir, workspace_root};
pub use prometheus::{Sample, metric_names, metric_sum, parse_metrics};
pub use relay::{Relay, RelaySetup, Sent, toml_str};
pub use sink::{Sink, SinkMessage, SinkOptions, parse_sink_file};
pub use smtp_client::{IO_TIMEOUT, Reply, SmtpClient, SmtpError, data_bytes};
pub use wait::{POLL_INTERVAL, poll_until, wait_until};
