//! The one tokio loop around an inbound [`Session`], shared by the relay's
//! listeners and `poolrelay sink`: read with the command or DATA timeout,
//! feed the session, write its replies with a timeout, hand finished
//! transactions to a [`Handler`], stop parsing while replies are unwritten
//! (the session pauses after [`crate::inbound::MAX_UNWRITTEN_REPLIES`]),
//! and tell an idle session `421` when the owner is stopping. The policy is
//! in the session; this only moves bytes.

use std::future::Future;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;

use crate::inbound::{Output, Session, Transaction};

/// What the owner of a session does with what it produces.
pub trait Handler: Send {
    /// A finished transaction: store it, then return the reply to its
    /// final dot (from [`Session::queued`] or [`Session::queue_failed`]).
    fn message(
        &mut self,
        session: &mut Session,
        transaction: Transaction,
    ) -> impl Future<Output = Vec<u8>> + Send;

    /// Called after every feed, e.g. to charge the content the session
    /// holds or to count its rejections.
    fn after_feed(&mut self, _session: &mut Session) {}
}

/// How long the driver waits for the client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Between commands, and for a reply write to be taken by the client.
    pub command: Duration,
    /// Between blocks of message content.
    pub data: Duration,
}

/// Drives `session` over `reader`/`writer` until the client leaves, a
/// timeout, or `stopping` turns true while no transaction is open (the
/// session is then told `bye`). `banner` is written first.
pub async fn drive<R, W, H>(
    mut reader: R,
    mut writer: W,
    mut session: Session,
    banner: &[u8],
    limits: Limits,
    handler: &mut H,
    mut stopping: Option<(watch::Receiver<bool>, Vec<u8>)>,
) -> std::io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    H: Handler,
{
    let write_limit = limits.command;
    write(&mut writer, banner, write_limit).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if let Some((rx, bye)) = &stopping
            && *rx.borrow()
            && !session.in_transaction()
        {
            // Shutting down: an idle session is told so rather than held open.
            write(&mut writer, bye, write_limit).await?;
            return Ok(());
        }
        let limit = if session.in_data() {
            limits.data
        } else {
            limits.command
        };
        let read = match &mut stopping {
            Some((rx, _)) => {
                tokio::select! {
                    r = tokio::time::timeout(limit, reader.read(&mut buf)) => r,
                    _ = rx.changed(), if !*rx.borrow() => continue,
                }
            }
            None => tokio::time::timeout(limit, reader.read(&mut buf)).await,
        };
        let n = match read {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                write(&mut writer, &session.timeout_reply(), write_limit).await?;
                return Ok(());
            }
        };
        let mut input = &buf[..n];
        // The session parses a bounded amount of replies per feed; it is
        // fed again only once they were written, so nothing piles up here
        // for a client that sends without reading.
        loop {
            let mut outputs = session.feed(input);
            input = &[];
            handler.after_feed(&mut session);
            let mut close = false;
            loop {
                let mut resume = false;
                for output in outputs {
                    match output {
                        Output::Reply(bytes) => out.extend_from_slice(&bytes),
                        Output::Message(tx) => {
                            let reply = handler.message(&mut session, *tx).await;
                            out.extend_from_slice(&reply);
                            resume = true;
                        }
                        Output::Close => close = true,
                    }
                }
                if !resume || close {
                    break;
                }
                outputs = session.feed(&[]);
                handler.after_feed(&mut session);
            }
            if !out.is_empty() {
                write(&mut writer, &out, write_limit).await?;
                out.clear();
            }
            if close {
                let _ = tokio::time::timeout(write_limit, writer.shutdown()).await;
                return Ok(());
            }
            if !session.paused() {
                break;
            }
        }
    }
}

/// Writes `bytes`, giving up after `limit`: a client that never reads its
/// replies loses its session instead of holding a slot for ever.
async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    match tokio::time::timeout(limit, writer.write_all(bytes)).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its replies",
        )),
    }
}
