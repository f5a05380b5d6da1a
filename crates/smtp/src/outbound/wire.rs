//! Bytes to and from the upstream: writes and reply reads under the stage
//! timeouts, reply line parsing, and the EHLO capabilities.

use super::connect::Client;
use super::types::ClientError;
use crate::reply::Reply;
use smtp_proto::response::generate::BitToString;
use smtp_proto::{
    EXT_8BIT_MIME, EXT_AUTH, EXT_DSN, EXT_ENHANCED_STATUS_CODES, EXT_MT_PRIORITY, EXT_PIPELINING,
    EXT_SIZE, EXT_SMTP_UTF8, EXT_START_TLS, EhloResponse,
};
use std::time::Duration;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::timeout;

/// Any byte stream the client can speak SMTP over: plain TCP or TLS.
pub(super) trait Stream: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Stream for T {}

/// Longest reply line kept from an upstream; the rest of a longer line is
/// read and dropped (what we store of a reply is cut to 512 bytes anyway).
const MAX_REPLY_LINE: usize = 4096;
/// Longest reply line read at all: beyond, the upstream is broken.
const MAX_REPLY_LINE_READ: usize = 1 << 20;
/// Most lines in one reply (EHLO replies have a dozen or so).
const MAX_REPLY_LINES: usize = 128;

/// What the upstream offered in its EHLO reply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// EHLO was accepted (false: we fell back to HELO, nothing offered).
    pub esmtp: bool,
    /// PIPELINING (RFC 2920).
    pub pipelining: bool,
    /// SIZE (RFC 1870): `Some(limit)`, 0 meaning no fixed limit.
    pub size: Option<u64>,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// DSN (RFC 3461).
    pub dsn: bool,
    /// STARTTLS (RFC 3207).
    pub starttls: bool,
    /// ENHANCEDSTATUSCODES (RFC 2034).
    pub enhanced_status_codes: bool,
    /// MT-PRIORITY (RFC 6710), whatever its policy.
    pub mt_priority: bool,
    /// AUTH mechanisms offered, upper case, sorted. Only those smtp-proto
    /// knows (the registered ones, XOAUTH2 and the like); others are
    /// dropped, which costs nothing as only PLAIN and LOGIN are used.
    pub auth: Vec<String>,
}

impl Capabilities {
    /// Reads a whole positive EHLO reply, as received (CRLF included),
    /// with smtp-proto's parser (which also takes the old `AUTH=LOGIN`).
    /// A reply it cannot parse offers nothing: the session then goes on
    /// without extensions, which every server must accept, rather than
    /// guess at pipelining or STARTTLS.
    pub(crate) fn from_ehlo(raw: &[u8]) -> Capabilities {
        let mut caps = Capabilities {
            esmtp: true,
            ..Capabilities::default()
        };
        let Ok(ehlo) = EhloResponse::parse(&mut raw.iter()) else {
            return caps;
        };
        let has = |ext| ehlo.capabilities & ext != 0;
        caps.pipelining = has(EXT_PIPELINING);
        caps.size = has(EXT_SIZE).then_some(ehlo.size as u64);
        caps.eightbitmime = has(EXT_8BIT_MIME);
        caps.smtputf8 = has(EXT_SMTP_UTF8);
        caps.dsn = has(EXT_DSN);
        caps.starttls = has(EXT_START_TLS);
        caps.enhanced_status_codes = has(EXT_ENHANCED_STATUS_CODES);
        caps.mt_priority = has(EXT_MT_PRIORITY);
        if has(EXT_AUTH) {
            caps.auth = (0..64)
                .map(|bit| 1u64 << bit)
                .filter(|m| ehlo.auth_mechanisms & m != 0)
                .map(|m| m.to_mechanism())
                .filter(|name| !name.is_empty())
                .map(str::to_string)
                .collect();
            caps.auth.sort();
        }
        caps
    }
}

impl Client {
    /// Writes `bytes` and reads the reply, both within `limit`.
    pub(super) async fn command(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        self.write(bytes, stage, limit).await?;
        self.read_reply(stage, limit).await
    }

    /// Writes and flushes `bytes` within `limit`; any failure makes the
    /// connection unusable, as how much went out is unknown.
    pub(super) async fn write(
        &mut self,
        bytes: &[u8],
        stage: &'static str,
        limit: Duration,
    ) -> Result<(), ClientError> {
        let io = self.io.get_mut();
        let result = timeout(limit, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await;
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => {
                self.usable = false;
                Err(ClientError::Io(format!("write at {stage}: {e}")))
            }
            Err(_) => {
                self.usable = false;
                Err(ClientError::Timeout { stage })
            }
        }
    }

    /// Reads one reply within `limit`.
    pub(super) async fn read_reply(
        &mut self,
        stage: &'static str,
        limit: Duration,
    ) -> Result<Reply, ClientError> {
        self.read_reply_keeping(stage, limit, None).await
    }

    /// Reads one reply within `limit`, also appending its raw lines to
    /// `raw` when given (EHLO's capabilities are parsed from them).
    pub(super) async fn read_reply_keeping(
        &mut self,
        stage: &'static str,
        limit: Duration,
        raw: Option<&mut Vec<u8>>,
    ) -> Result<Reply, ClientError> {
        let result = match timeout(limit, read_reply(&mut self.io, raw)).await {
            Ok(result) => result,
            Err(_) => Err(ClientError::Timeout { stage }),
        };
        match &result {
            // After 421 the server closes: nothing more can be sent.
            Ok(reply) if reply.code == 421 => self.usable = false,
            Ok(_) => {}
            Err(_) => self.usable = false,
        }
        result
    }
}

/// Reads one possibly multi-line reply, its lines' text joined with a
/// space; appends the raw lines to `raw` when given.
///
/// Hand-written rather than smtp-proto's `ResponseReceiver`, which takes
/// the code of the first line whatever the later ones say, takes an
/// enhanced code of another class than the reply's (`550 2.0.0`) as the
/// status, and has no per-line limit: here a server that changes its code
/// mid-reply is a protocol error, a wrong-class enhanced code is text,
/// and lines and line counts are bounded.
pub(crate) async fn read_reply<R>(
    io: &mut R,
    mut raw: Option<&mut Vec<u8>>,
) -> Result<Reply, ClientError>
where
    R: AsyncBufRead + Unpin,
{
    let mut lines: Vec<String> = Vec::new();
    let mut code = 0;
    let mut enhanced = None;
    let mut bytes = Vec::new();
    loop {
        bytes.clear();
        read_line(io, &mut bytes).await?;
        if let Some(raw) = raw.as_deref_mut() {
            raw.extend_from_slice(&bytes);
        }
        let line = String::from_utf8_lossy(&bytes);
        let line = line.trim_end_matches(['\r', '\n']);
        let parsed = parse_reply_line(line)
            .ok_or_else(|| ClientError::Io(format!("malformed reply line {line:?}")))?;
        if lines.is_empty() {
            code = parsed.code;
            enhanced = parsed.enhanced.map(str::to_string);
        } else if parsed.code != code {
            return Err(ClientError::Io(format!(
                "reply code changed within a reply: {code} then {}",
                parsed.code
            )));
        }
        lines.push(parsed.text.to_string());
        if parsed.last {
            break;
        }
        if lines.len() >= MAX_REPLY_LINES {
            return Err(ClientError::Io("reply has too many lines".into()));
        }
    }
    let text = lines
        .iter()
        .map(String::as_str)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    Ok(Reply {
        code,
        enhanced,
        text,
    })
}

/// Reads up to and including LF, keeping at most [`MAX_REPLY_LINE`] bytes
/// (the kept part ends in CRLF) and refusing lines beyond
/// [`MAX_REPLY_LINE_READ`]: a huge reply costs reading it, never storing it.
async fn read_line<R>(io: &mut R, line: &mut Vec<u8>) -> Result<(), ClientError>
where
    R: AsyncBufRead + Unpin,
{
    let mut seen = 0usize;
    let mut cut = false;
    loop {
        let buf = io
            .fill_buf()
            .await
            .map_err(|e| ClientError::Io(format!("read: {e}")))?;
        if buf.is_empty() {
            return Err(ClientError::Io("connection closed by upstream".into()));
        }
        let (take, done) = match memchr::memchr(b'\n', buf) {
            Some(i) => (i + 1, true),
            None => (buf.len(), false),
        };
        let room = MAX_REPLY_LINE.saturating_sub(line.len());
        if take <= room && !cut {
            line.extend_from_slice(&buf[..take]);
        } else {
            line.extend_from_slice(&buf[..room.min(take)]);
            cut = true;
        }
        seen += take;
        io.consume(take);
        if seen > MAX_REPLY_LINE_READ {
            return Err(ClientError::Io("reply line over 1 MiB".into()));
        }
        if done {
            if cut {
                while line.last().is_some_and(|b| *b == b'\r' || *b == b'\n') {
                    line.pop();
                }
                line.extend_from_slice(b"\r\n");
            }
            return Ok(());
        }
    }
}

/// One parsed reply line.
#[derive(Debug, PartialEq, Eq)]
struct ReplyLine<'a> {
    code: u16,
    last: bool,
    enhanced: Option<&'a str>,
    text: &'a str,
}

/// `250-text`, `250 text` or a bare `250`; an RFC 3463 code at the start
/// of the text is split off when its class matches the reply code.
fn parse_reply_line(line: &str) -> Option<ReplyLine<'_>> {
    let bytes = line.as_bytes();
    let digits = bytes.get(..3)?;
    if !digits.iter().all(u8::is_ascii_digit) || !(b'2'..=b'5').contains(&digits[0]) {
        return None;
    }
    let code = digits
        .iter()
        .fold(0u16, |acc, d| acc * 10 + u16::from(d - b'0'));
    let (last, text) = match bytes.get(3) {
        None => (true, ""),
        Some(b' ') => (true, line.get(4..)?),
        Some(b'-') => (false, line.get(4..)?),
        Some(_) => return None,
    };
    let (enhanced, text) = split_enhanced(text, digits[0]);
    Some(ReplyLine {
        code,
        last,
        enhanced,
        text,
    })
}

/// Splits a leading `class.subject.detail` (RFC 3463) off `text`.
fn split_enhanced(text: &str, class: u8) -> (Option<&str>, &str) {
    let (candidate, rest) = text.split_once(' ').unwrap_or((text, ""));
    let mut parts = candidate.split('.');
    let ok = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(c), Some(s), Some(d), None) => {
            // RFC 3463 classes are 2, 4 and 5 only: a 3xx reply has none.
            c.as_bytes() == [class]
                && matches!(class, b'2' | b'4' | b'5')
                && (1..=3).contains(&s.len())
                && (1..=3).contains(&d.len())
                && s.bytes().chain(d.bytes()).all(|b| b.is_ascii_digit())
        }
        _ => false,
    };
    if ok {
        (Some(candidate), rest)
    } else {
        (None, text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reply_lines() {
        let p = parse_reply_line("250-2.1.5 Ok").unwrap();
        assert_eq!(
            (p.code, p.last, p.enhanced, p.text),
            (250, false, Some("2.1.5"), "Ok")
        );
        let p = parse_reply_line("550 5.1.1").unwrap();
        assert_eq!((p.enhanced, p.text), (Some("5.1.1"), ""));
        // A code of the wrong class is text.
        let p = parse_reply_line("550 2.0.0 odd").unwrap();
        assert_eq!((p.enhanced, p.text), (None, "2.0.0 odd"));
        // Class 3 is no RFC 3463 class: a 3xx reply has no enhanced code
        // (its status would otherwise disagree with the stored code).
        let p = parse_reply_line("307 3.1.40 odd").unwrap();
        assert_eq!((p.enhanced, p.text), (None, "3.1.40 odd"));
        let p = parse_reply_line("354").unwrap();
        assert_eq!((p.code, p.last, p.text), (354, true, ""));
        let p = parse_reply_line("250 1.2.3.4 ready").unwrap();
        assert_eq!(p.enhanced, None);
        assert!(parse_reply_line("25").is_none());
        assert!(parse_reply_line("250x").is_none());
        assert!(parse_reply_line("650 no").is_none());
    }

    #[tokio::test]
    async fn a_huge_reply_line_is_cut_and_the_stream_stays_in_step() {
        let mut text = b"550 5.1.1 ".to_vec();
        text.extend(std::iter::repeat_n(b'x', 500_000));
        text.extend_from_slice(b"\r\n250 2.0.0 next\r\n");
        let mut input: &[u8] = &text;
        let reply = read_reply(&mut input, None).await.unwrap();
        assert_eq!(
            (reply.code, reply.enhanced.as_deref()),
            (550, Some("5.1.1"))
        );
        assert!(reply.text.len() <= MAX_REPLY_LINE, "{}", reply.text.len());
        let next = read_reply(&mut input, None).await.unwrap();
        assert_eq!((next.code, next.text.as_str()), (250, "next"));
        let endless = vec![b'x'; MAX_REPLY_LINE_READ + 10];
        let mut input: &[u8] = &endless;
        assert!(read_reply(&mut input, None).await.is_err());
    }

    #[tokio::test]
    async fn multi_line_reply_joined() {
        let text = b"451-4.3.0 first\r\n451-4.3.0 second\r\n451 4.3.0 third\r\n";
        let mut input: &[u8] = text;
        let mut raw = Vec::new();
        let reply = read_reply(&mut input, Some(&mut raw)).await.unwrap();
        assert_eq!(reply.code, 451);
        assert_eq!(reply.enhanced.as_deref(), Some("4.3.0"));
        assert_eq!(reply.text, "first second third");
        assert_eq!(raw, text);
        let mut bad: &[u8] = b"250-a\r\n550 b\r\n";
        assert!(read_reply(&mut bad, None).await.is_err());
        let mut closed: &[u8] = b"250-a\r\n";
        assert!(read_reply(&mut closed, None).await.is_err());
    }

    #[test]
    fn ehlo_capabilities() {
        let caps = Capabilities::from_ehlo(
            b"250-up.test says hi\r\n250-PIPELINING\r\n250-SIZE 1000000\r\n250-8BITMIME\r\n\
250-ENHANCEDSTATUSCODES\r\n250-AUTH PLAIN login\r\n250-X-UNKNOWN a b\r\n\
250-MT-PRIORITY STANAG4406\r\n250 DSN\r\n",
        );
        assert_eq!(
            caps,
            Capabilities {
                esmtp: true,
                pipelining: true,
                size: Some(1_000_000),
                eightbitmime: true,
                smtputf8: false,
                dsn: true,
                starttls: false,
                enhanced_status_codes: true,
                mt_priority: true,
                auth: vec!["LOGIN".into(), "PLAIN".into()],
            }
        );
        // Old servers write AUTH=; SIZE without a limit is 0.
        let caps = Capabilities::from_ehlo(
            b"250-up.test\r\n250-AUTH=LOGIN\r\n250-SIZE\r\n250-smtputf8\r\n250 STARTTLS\r\n",
        );
        assert_eq!(caps.auth, ["LOGIN"]);
        assert_eq!(caps.size, Some(0));
        assert!(caps.smtputf8 && caps.starttls && !caps.pipelining && !caps.mt_priority);
        // MT-PRIORITY without a policy name is the extension too (MIXER).
        assert!(Capabilities::from_ehlo(b"250-up.test\r\n250 MT-PRIORITY\r\n").mt_priority);
        // Only a greeting line: ESMTP, nothing offered.
        let caps = Capabilities::from_ehlo(b"250 up.test\r\n");
        assert_eq!(
            caps,
            Capabilities {
                esmtp: true,
                ..Capabilities::default()
            }
        );
    }
}
