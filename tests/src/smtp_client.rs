//! A small blocking SMTP client with timeouts, able to bind its local
//! address (e.g. 127.0.0.2) and to write raw bytes, for tests that speak
//! SMTP to the relay themselves.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

/// Read/write timeout of [`SmtpClient`] sockets (and of [`crate::http`]'s).
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One SMTP reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The three-digit code.
    pub code: u16,
    /// The text of every line after the code, joined with `\n`.
    pub text: String,
}

impl Reply {
    /// The enhanced status code (`5.7.1`) at the start of the text, if any.
    pub fn enhanced(&self) -> Option<&str> {
        let first = self.text.split_whitespace().next()?;
        let parts: Vec<&str> = first.split('.').collect();
        (parts.len() == 3
            && parts
                .iter()
                .all(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit())))
        .then_some(first)
    }

    /// 2xx.
    pub fn is_positive(&self) -> bool {
        (200..300).contains(&self.code)
    }

    /// The queue id of a `250 2.0.0 Ok: queued as ID` reply.
    pub fn queue_id(&self) -> Option<&str> {
        let i = self.text.find("queued as ")?;
        self.text[i + "queued as ".len()..]
            .split_whitespace()
            .next()
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.code, self.text.replace('\n', " / "))
    }
}

/// Why [`SmtpClient::send_mail`] did not get its 250.
#[derive(Debug)]
pub enum SmtpError {
    /// The connection failed (closed, reset, timed out).
    Io {
        /// The command or stage.
        stage: String,
        /// The error.
        error: io::Error,
    },
    /// The server answered with an unexpected code.
    Rejected {
        /// The command or stage (`MAIL`, `RCPT <x>`, `DATA`, `final dot`).
        stage: String,
        /// Its reply.
        reply: Reply,
    },
}

impl fmt::Display for SmtpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmtpError::Io { stage, error } => write!(f, "I/O error at {stage}: {error}"),
            SmtpError::Rejected { stage, reply } => write!(f, "{stage} got {reply}"),
        }
    }
}

impl std::error::Error for SmtpError {}

/// The wire form of a message for DATA: line endings made CRLF, lines
/// starting with `.` dot-stuffed, and the terminating `.` line appended.
pub fn data_bytes(message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(message.len() + 16);
    let body = message
        .strip_suffix('\n')
        .map(|m| m.strip_suffix('\r').unwrap_or(m))
        .unwrap_or(message);
    if !body.is_empty() {
        for line in body.split('\n') {
            let line = line.strip_suffix('\r').unwrap_or(line);
            if line.starts_with('.') {
                out.push(b'.');
            }
            out.extend_from_slice(line.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
    }
    out.extend_from_slice(b".\r\n");
    out
}

/// A blocking SMTP client with 10 s read and write timeouts.
pub struct SmtpClient {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
    /// The server's greeting.
    pub greeting: Reply,
    greeted: bool,
}

impl SmtpClient {
    /// Connects to `addr` and reads the greeting.
    pub fn connect(addr: SocketAddr) -> io::Result<SmtpClient> {
        let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
        SmtpClient::from_stream(stream)
    }

    /// Connects to `addr` from `local` (e.g. 127.0.0.2: the whole of
    /// 127.0.0.0/8 is on the loopback interface) and reads the greeting.
    pub fn connect_from(local: IpAddr, addr: SocketAddr) -> io::Result<SmtpClient> {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        socket.connect_timeout(&addr.into(), IO_TIMEOUT)?;
        SmtpClient::from_stream(socket.into())
    }

    fn from_stream(stream: TcpStream) -> io::Result<SmtpClient> {
        stream.set_read_timeout(Some(IO_TIMEOUT))?;
        stream.set_write_timeout(Some(IO_TIMEOUT))?;
        stream.set_nodelay(true)?;
        let writer = stream.try_clone()?;
        let mut reader = BufReader::new(stream);
        let greeting = read_reply_from(&mut reader)?;
        Ok(SmtpClient {
            reader,
            writer,
            greeting,
            greeted: false,
        })
    }

    /// The local address of the connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.writer.local_addr()
    }

    /// Writes raw bytes, as they are (no CRLF added, no dot-stuffing).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.writer.write_all(bytes)?;
        self.writer.flush()
    }

    /// Reads one (possibly multi-line) reply.
    pub fn read_reply(&mut self) -> io::Result<Reply> {
        read_reply_from(&mut self.reader)
    }

    /// Sends `line` + CRLF and reads the reply.
    pub fn try_cmd(&mut self, line: &str) -> io::Result<Reply> {
        self.write_bytes(format!("{line}\r\n").as_bytes())?;
        self.read_reply()
    }

    /// Sends `line` + CRLF and reads the reply; panics on I/O errors.
    pub fn cmd(&mut self, line: &str) -> Reply {
        self.try_cmd(line)
            .unwrap_or_else(|e| panic!("SMTP command {line:?}: no reply: {e}"))
    }

    /// `EHLO client.test`; panics unless 250.
    pub fn ehlo(&mut self) -> Reply {
        let r = self.cmd("EHLO client.test");
        assert_eq!(r.code, 250, "EHLO got {r}");
        self.greeted = true;
        r
    }

    /// One whole transaction: EHLO (once per connection), MAIL FROM, RCPT TO
    /// for each recipient, DATA, the message (see [`data_bytes`]). Returns
    /// the reply to the final dot when it is 2xx (e.g. `250 2.0.0 Ok: queued
    /// as ID`). On a rejected MAIL or RCPT the transaction is RSET so the
    /// connection can be reused.
    pub fn send_mail(
        &mut self,
        from: &str,
        rcpts: &[&str],
        message: &str,
    ) -> Result<Reply, SmtpError> {
        self.send_mail_with(from, rcpts, message, |_| {})
    }

    /// Like [`SmtpClient::send_mail`], calling `before_data(message)` right
    /// before the message bytes are written (after the 354): from then on
    /// the message may be queued even if no reply is seen.
    pub fn send_mail_with(
        &mut self,
        from: &str,
        rcpts: &[&str],
        message: &str,
        before_data: impl FnOnce(&str),
    ) -> Result<Reply, SmtpError> {
        let io = |stage: &str| {
            let stage = stage.to_string();
            move |error| SmtpError::Io { stage, error }
        };
        if !self.greeted {
            let r = self.try_cmd("EHLO client.test").map_err(io("EHLO"))?;
            if r.code != 250 {
                return Err(SmtpError::Rejected {
                    stage: "EHLO".into(),
                    reply: r,
                });
            }
            self.greeted = true;
        }
        let r = self
            .try_cmd(&format!("MAIL FROM:<{from}>"))
            .map_err(io("MAIL"))?;
        if !r.is_positive() {
            return Err(SmtpError::Rejected {
                stage: "MAIL".into(),
                reply: r,
            });
        }
        for rcpt in rcpts {
            let r = self
                .try_cmd(&format!("RCPT TO:<{rcpt}>"))
                .map_err(io("RCPT"))?;
            if !r.is_positive() {
                let _ = self.try_cmd("RSET");
                return Err(SmtpError::Rejected {
                    stage: format!("RCPT <{rcpt}>"),
                    reply: r,
                });
            }
        }
        let r = self.try_cmd("DATA").map_err(io("DATA"))?;
        if r.code != 354 {
            return Err(SmtpError::Rejected {
                stage: "DATA".into(),
                reply: r,
            });
        }
        before_data(message);
        self.write_bytes(&data_bytes(message))
            .map_err(io("message data"))?;
        let r = self.read_reply().map_err(io("final dot"))?;
        if !r.is_positive() {
            return Err(SmtpError::Rejected {
                stage: "final dot".into(),
                reply: r,
            });
        }
        Ok(r)
    }

    /// `QUIT`, ignoring errors.
    pub fn quit(mut self) {
        let _ = self.try_cmd("QUIT");
    }
}

fn read_reply_from(reader: &mut impl BufRead) -> io::Result<Reply> {
    let mut code = None;
    let mut lines = Vec::new();
    loop {
        let mut raw = Vec::new();
        let n = reader.by_ref().take(4096).read_until(b'\n', &mut raw)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("connection closed by the server (reply so far: {lines:?})"),
            ));
        }
        let line = String::from_utf8_lossy(&raw);
        let line = line.trim_end_matches(['\r', '\n']);
        let bad = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("malformed SMTP reply line {line:?}"),
            )
        };
        let c: u16 = line.get(..3).and_then(|c| c.parse().ok()).ok_or_else(bad)?;
        if code.is_some_and(|prev| prev != c) {
            return Err(bad());
        }
        code = Some(c);
        let sep = line.as_bytes().get(3).copied();
        lines.push(line.get(4..).unwrap_or("").to_string());
        match sep {
            Some(b'-') => continue,
            None | Some(b' ') => break,
            Some(_) => return Err(bad()),
        }
    }
    Ok(Reply {
        code: code.unwrap_or(0),
        text: lines.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_parsing_and_enhanced_codes() {
        let mut r = io::Cursor::new(
            b"250-relay.test\r\n250-SIZE 100\r\n250 2.0.0 Ok: queued as ABC123\r\n".to_vec(),
        );
        let reply = read_reply_from(&mut r).expect("reply");
        assert_eq!(reply.code, 250);
        assert_eq!(reply.queue_id(), Some("ABC123"));
        let r2 = Reply {
            code: 554,
            text: "5.7.1 Relay access denied".into(),
        };
        assert_eq!(r2.enhanced(), Some("5.7.1"));
        let r3 = Reply {
            code: 250,
            text: "Ok".into(),
        };
        assert_eq!(r3.enhanced(), None);
    }

    #[test]
    fn data_bytes_stuffs_dots_and_uses_crlf() {
        assert_eq!(
            data_bytes("a\n.b\r\nc\n"),
            b"a\r\n..b\r\nc\r\n.\r\n".to_vec()
        );
        assert_eq!(data_bytes(""), b".\r\n".to_vec());
    }
}
