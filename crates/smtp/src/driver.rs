//! The one tokio loop around an inbound [`Session`], shared by the relay's
//! listeners and `poolrelay sink`: read with the command or DATA timeout,
//! feed the session, write its replies with a timeout, hand finished
//! transactions to a [`Handler`], stop parsing while replies are unwritten
//! (the session pauses after [`crate::inbound::MAX_UNWRITTEN_REPLIES`]),
//! and tell an idle session `421` when the owner is stopping. It runs the
//! TLS handshake when the session asks for it (STARTTLS) or before the
//! banner (implicit TLS), and hands AUTH credentials to the [`Handler`].
//! The policy is in the session; this only moves bytes.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;

use crate::inbound::{AuthAttempt, AuthVerdict, Output, Session, Transaction};
use crate::tls::ServerTls;

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

    /// Checks credentials the client presented with AUTH. Delays belong
    /// here (awaited, so other sessions go on). Default: refuse.
    fn authenticate(
        &mut self,
        _session: &Session,
        _attempt: &AuthAttempt,
    ) -> impl Future<Output = AuthVerdict> + Send {
        async { AuthVerdict::Refused }
    }

    /// TLS is on for this session (after [`Session::tls_started`]).
    fn tls_started(&mut self, _session: &Session) {}
}

/// How the listener does TLS.
#[derive(Clone)]
pub struct Tls {
    /// The certificate and key to serve.
    pub server: ServerTls,
    /// Handshake at once, before the banner (port-465 style), instead of
    /// on STARTTLS.
    pub implicit: bool,
}

/// The client connection: plain until a handshake turns it into TLS.
enum Conn<S> {
    Plain(S),
    Tls(Box<tokio_rustls::server::TlsStream<S>>),
    /// Only while a handshake holds the stream.
    Upgrading,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for Conn<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for Conn<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Tls(s) => Pin::new(s).poll_write(cx, buf),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s).poll_flush(cx),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Upgrading => Poll::Ready(Err(upgrading())),
        }
    }
}

fn upgrading() -> std::io::Error {
    std::io::Error::other("TLS handshake failed earlier")
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Runs the server handshake; on failure the connection is unusable.
    async fn upgrade(
        &mut self,
        tls: &ServerTls,
        limit: Duration,
    ) -> std::io::Result<crate::inbound::TlsInfo> {
        let Conn::Plain(stream) = std::mem::replace(self, Conn::Upgrading) else {
            return Err(std::io::Error::other("TLS is already on"));
        };
        let (stream, info) = tls.accept(stream, limit).await?;
        *self = Conn::Tls(Box::new(stream));
        Ok(info)
    }
}

/// How long the driver waits for the client.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Between commands, and for a reply write to be taken by the client.
    pub command: Duration,
    /// Between blocks of message content.
    pub data: Duration,
}

/// Drives `session` over `stream` until the client leaves, a timeout, or
/// `stopping` turns true while no transaction is open (the session is then
/// told `bye`). `banner` is written first (after the handshake, for
/// implicit TLS). `tls`: the certificate for STARTTLS or implicit TLS.
#[allow(clippy::too_many_arguments)]
pub async fn drive<S, H>(
    stream: S,
    mut session: Session,
    banner: &[u8],
    limits: Limits,
    tls: Option<&Tls>,
    handler: &mut H,
    mut stopping: Option<(watch::Receiver<bool>, Vec<u8>)>,
) -> std::io::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
    H: Handler,
{
    let write_limit = limits.command;
    let mut conn = Conn::Plain(stream);
    if let Some(tls) = tls.filter(|t| t.implicit) {
        let info = conn.upgrade(&tls.server, write_limit).await?;
        session.tls_started(info);
        handler.tls_started(&session);
    }
    // Reads and writes take turns, so one stream serves both (no split:
    // STARTTLS needs the whole stream for its handshake).
    write(&mut conn, banner, write_limit).await?;
    let mut buf = vec![0u8; 64 * 1024];
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    loop {
        if let Some((rx, bye)) = &stopping
            && *rx.borrow()
            && !session.in_transaction()
        {
            // Shutting down: an idle session is told so rather than held open.
            write(&mut conn, bye, write_limit).await?;
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
                    r = tokio::time::timeout(limit, conn.read(&mut buf)) => r,
                    _ = rx.changed(), if !*rx.borrow() => continue,
                }
            }
            None => tokio::time::timeout(limit, conn.read(&mut buf)).await,
        };
        let n = match read {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                write(&mut conn, &session.timeout_reply(), write_limit).await?;
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
                let mut queue = std::collections::VecDeque::from(outputs);
                while let Some(output) = queue.pop_front() {
                    match output {
                        Output::Reply(bytes) => out.extend_from_slice(&bytes),
                        Output::Message(tx) => {
                            let reply = handler.message(&mut session, *tx).await;
                            out.extend_from_slice(&reply);
                            resume = true;
                        }
                        Output::StartTls => {
                            let Some(tls) = tls else {
                                // The session offers STARTTLS only with a
                                // certificate; without one, end cleanly.
                                return Err(std::io::Error::other(
                                    "STARTTLS without a certificate",
                                ));
                            };
                            write(&mut conn, &out, write_limit).await?;
                            out.clear();
                            let info = conn.upgrade(&tls.server, write_limit).await?;
                            session.tls_started(info);
                            handler.tls_started(&session);
                            resume = true;
                        }
                        Output::Authenticate(attempt) => {
                            let verdict = handler.authenticate(&session, &attempt).await;
                            queue.extend(session.authenticated(&attempt, verdict));
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
                write(&mut conn, &out, write_limit).await?;
                out.clear();
            }
            if close {
                let _ = tokio::time::timeout(write_limit, conn.shutdown()).await;
                return Ok(());
            }
            if !session.paused() {
                break;
            }
        }
    }
}

/// Writes `bytes`, giving up after `limit`: a client that never reads its
/// replies loses its session instead of holding a slot for ever. Flushed,
/// so TLS records rustls still holds reach the client before we read again.
async fn write<W: AsyncWrite + Unpin>(
    writer: &mut W,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let all = async {
        writer.write_all(bytes).await?;
        writer.flush().await
    };
    match tokio::time::timeout(limit, all).await {
        Ok(result) => result,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client did not read its replies",
        )),
    }
}
