//! Entry points for the fuzz targets in `fuzz/` (not part of the API).
//!
//! The outbound reply and EHLO parsers are private to the client; these
//! functions run them on bytes the fuzzer makes, exactly as the client runs
//! them on what an upstream sends.

use crate::outbound::{Capabilities, ClientError};
use crate::reply::Reply;
use std::future::Future;
use std::task::{Context, Poll, Waker};

/// Reads replies from `input` one after another, as the client reads them
/// from an upstream, until the input is used up or a read fails (the error
/// is then the last element). Each reply comes with the raw lines it was
/// read from (what EHLO's capabilities are parsed from).
pub fn parse_replies(mut input: &[u8]) -> Vec<(Result<Reply, ClientError>, Vec<u8>)> {
    let mut replies = Vec::new();
    while !input.is_empty() {
        let mut raw = Vec::new();
        let read = crate::outbound::wire::read_reply(&mut input, Some(&mut raw));
        // A byte slice never waits, so the read is done at its first poll.
        let result = match std::pin::pin!(read).poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(result) => result,
            Poll::Pending => Err(ClientError::Io("reading a byte slice waited".into())),
        };
        let failed = result.is_err();
        replies.push((result, raw));
        if failed {
            break;
        }
    }
    replies
}

/// The capabilities the client takes from a positive EHLO reply received
/// as `raw` (its lines, CRLF included).
pub fn parse_ehlo(raw: &[u8]) -> Capabilities {
    Capabilities::from_ehlo(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_are_read_in_turn_until_the_input_ends() {
        let replies = parse_replies(b"220 up.test ready\r\n250-up.test\r\n250 DSN\r\n451");
        assert_eq!(replies.len(), 3);
        let first = replies[0].0.as_ref().unwrap();
        assert_eq!((first.code, first.text.as_str()), (220, "up.test ready"));
        assert_eq!(replies[1].1, b"250-up.test\r\n250 DSN\r\n");
        assert!(parse_ehlo(&replies[1].1).dsn);
        // The last reply has no line end: the upstream closed mid-line.
        assert!(replies[2].0.is_err());
    }
}
