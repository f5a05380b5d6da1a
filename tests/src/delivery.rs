//! Reading what delivery did: the relay's "delivery attempt" log lines
//! (target `poolrelay::delivery`) and RFC 3464 delivery status
//! notifications (multipart/report; report-type=delivery-status), parsed
//! independently of the relay's own code. Also config text helpers the
//! delivery tests share.

use std::net::SocketAddr;
use std::time::Duration;

use crate::mail::{header_value, strip_brackets};
use crate::relay::{Relay, RelaySetup, toml_str};
use crate::scripted::Scripted;

// ---------------------------------------------------------------------------
// Log lines
// ---------------------------------------------------------------------------

/// Removes ANSI escape sequences (colours of the text log format).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            if chars.peek() == Some(&'[') {
                chars.next();
                // Parameters and intermediates, then one final byte @..~.
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// One "delivery attempt" log line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryAttempt {
    /// Queue id.
    pub queue_id: String,
    /// Pool.
    pub pool: String,
    /// Upstream host.
    pub upstream: String,
    /// Recipients delivered by this attempt.
    pub delivered: usize,
    /// Recipients deferred.
    pub deferred: usize,
    /// Recipients bounced.
    pub bounced: usize,
    /// delivered / deferred / bounced / expired.
    pub status: String,
    /// The upstream's reply (or why none).
    pub reply: String,
    /// Attempt number.
    pub attempt: u32,
    /// The whole line, ANSI removed.
    pub line: String,
}

const FIELDS: &[&str] = &[
    "queue_id",
    "pool",
    "upstream",
    "delivered",
    "deferred",
    "bounced",
    "status",
    "delay",
    "attempt",
    "reply",
];

/// `key=value` fields after the message of a text log line; `reply` may
/// contain spaces (it runs to the next known field or the end).
fn fields(line: &str) -> Vec<(&'static str, String)> {
    let mut found: Vec<(usize, &'static str, usize)> = Vec::new();
    for key in FIELDS {
        let pat = format!(" {key}=");
        if let Some(i) = line.find(&pat) {
            found.push((i, key, i + pat.len()));
        }
    }
    found.sort();
    let mut out = Vec::new();
    for (n, (_, key, start)) in found.iter().enumerate() {
        let end = found.get(n + 1).map_or(line.len(), |next| next.0);
        let mut value = line[*start..end].trim().to_string();
        if value.len() >= 2 && value.starts_with('"') && value.ends_with('"') {
            value = value[1..value.len() - 1].to_string();
        }
        out.push((*key, value));
    }
    out
}

/// Every "delivery attempt" line of a relay log (text format), in order.
pub fn delivery_attempts(log: &str) -> Vec<DeliveryAttempt> {
    let log = strip_ansi(log);
    let mut out = Vec::new();
    for line in log.lines() {
        if !line.contains("poolrelay::delivery") || !line.contains("delivery attempt") {
            continue;
        }
        let f = fields(line);
        let get = |k: &str| {
            f.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.clone())
                .unwrap_or_default()
        };
        let num = |k: &str| get(k).parse::<usize>().unwrap_or(usize::MAX);
        out.push(DeliveryAttempt {
            queue_id: get("queue_id"),
            pool: get("pool"),
            upstream: get("upstream"),
            delivered: num("delivered"),
            deferred: num("deferred"),
            bounced: num("bounced"),
            status: get("status"),
            reply: get("reply"),
            attempt: get("attempt").parse().unwrap_or(0),
            line: line.to_string(),
        });
    }
    out
}

/// The attempts logged for one queue id.
pub fn attempts_for(log: &str, queue_id: &str) -> Vec<DeliveryAttempt> {
    delivery_attempts(log)
        .into_iter()
        .filter(|a| a.queue_id == queue_id)
        .collect()
}

// ---------------------------------------------------------------------------
// DSN (RFC 3464) parsing
// ---------------------------------------------------------------------------

/// One MIME body part.
#[derive(Debug, Clone)]
pub struct MimePart {
    /// Header fields (name as written, value unfolded and trimmed).
    pub headers: Vec<(String, String)>,
    /// The body, CRLF line ends as received.
    pub body: String,
}

impl MimePart {
    /// The first header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The media type of Content-Type, lower case (`text/plain` when absent).
    pub fn media_type(&self) -> String {
        self.header("Content-Type")
            .map(|v| mime_params(v).0)
            .unwrap_or_else(|| "text/plain".into())
    }
}

/// A parsed delivery status notification.
#[derive(Debug, Clone)]
pub struct Dsn {
    /// The top-level media type (`multipart/report`).
    pub media_type: String,
    /// Its `report-type` parameter.
    pub report_type: Option<String>,
    /// Every body part, in order.
    pub parts: Vec<MimePart>,
    /// The per-message fields of the message/delivery-status part.
    pub per_message: Vec<(String, String)>,
    /// The per-recipient field groups.
    pub recipients: Vec<Vec<(String, String)>>,
}

impl Dsn {
    /// The per-recipient group whose Final-Recipient is `rfc822; address`.
    pub fn recipient(&self, address: &str) -> Option<&[(String, String)]> {
        self.recipients
            .iter()
            .find(|g| {
                field(g, "Final-Recipient").is_some_and(|v| {
                    let (ty, addr) = v.split_once(';').unwrap_or(("", v));
                    ty.trim().eq_ignore_ascii_case("rfc822")
                        && addr.trim().eq_ignore_ascii_case(address)
                })
            })
            .map(Vec::as_slice)
    }

    /// Every Final-Recipient address.
    pub fn final_recipients(&self) -> Vec<String> {
        self.recipients
            .iter()
            .filter_map(|g| field(g, "Final-Recipient"))
            .map(|v| v.split_once(';').map_or(v, |(_, a)| a).trim().to_string())
            .collect()
    }
}

/// The value of field `name` (case-insensitive) in a group.
pub fn field<'a>(group: &'a [(String, String)], name: &str) -> Option<&'a str> {
    group
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// `type/subtype; a=b; c="d"` -> (`type/subtype` lower case, params with
/// lower-case names and unquoted values).
pub fn mime_params(value: &str) -> (String, Vec<(String, String)>) {
    let mut pieces = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    for c in value.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                cur.push(c);
            }
            ';' if !quoted => pieces.push(std::mem::take(&mut cur)),
            c => cur.push(c),
        }
    }
    pieces.push(cur);
    let media = pieces[0].trim().to_ascii_lowercase();
    let params = pieces[1..]
        .iter()
        .filter_map(|p| {
            let (k, v) = p.split_once('=')?;
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .unwrap_or(v);
            Some((k.trim().to_ascii_lowercase(), v.to_string()))
        })
        .collect();
    (media, params)
}

/// Header fields (unfolded) and the body of an entity.
fn split_entity(raw: &str) -> (Vec<(String, String)>, String) {
    let mut headers: Vec<(String, String)> = Vec::new();
    let mut rest = raw;
    loop {
        let (line, next) = match rest.find('\n') {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, ""),
        };
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.is_empty() {
            return (headers, next.to_string());
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = headers.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            headers.push((n.trim().to_string(), v.trim().to_string()));
        }
        if next.is_empty() {
            return (headers, String::new());
        }
        rest = next;
    }
}

/// Field groups separated by empty lines (message/delivery-status).
fn field_groups(body: &str) -> Vec<Vec<(String, String)>> {
    let mut groups = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in body.split('\n') {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line.trim().is_empty() {
            if !cur.is_empty() {
                groups.push(std::mem::take(&mut cur));
            }
            continue;
        }
        if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((n, v)) = line.split_once(':') {
            cur.push((n.trim().to_string(), v.trim().to_string()));
        }
    }
    if !cur.is_empty() {
        groups.push(cur);
    }
    groups
}

/// Parses a DSN (the raw message: headers and body). Errors say what is
/// not as RFC 3462/3464 want it.
pub fn parse_dsn(raw: &str) -> Result<Dsn, String> {
    let content_type =
        header_value(raw, "Content-Type").ok_or("no Content-Type header".to_string())?;
    let (media_type, params) = mime_params(&content_type);
    let param = |n: &str| params.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if media_type != "multipart/report" {
        return Err(format!(
            "Content-Type is {content_type:?}, not multipart/report"
        ));
    }
    let boundary = param("boundary").ok_or("multipart/report without a boundary")?;
    let (_, body) = split_entity(raw);
    let delimiter = format!("--{boundary}");
    let mut parts = Vec::new();
    let mut current: Option<String> = None;
    let mut closed = false;
    for line in body.split('\n') {
        let bare = line.strip_suffix('\r').unwrap_or(line);
        if bare.trim_end() == format!("{delimiter}--") {
            if let Some(p) = current.take() {
                parts.push(p);
            }
            closed = true;
            break;
        }
        if bare.trim_end() == delimiter {
            if let Some(p) = current.take() {
                parts.push(p);
            }
            current = Some(String::new());
            continue;
        }
        if let Some(p) = current.as_mut() {
            p.push_str(line);
            p.push('\n');
        }
    }
    if !closed {
        return Err(format!("no closing delimiter {delimiter}--"));
    }
    let parts: Vec<MimePart> = parts
        .iter()
        .map(|p| {
            let (headers, body) = split_entity(p);
            MimePart { headers, body }
        })
        .collect();
    let status = parts
        .iter()
        .find(|p| p.media_type() == "message/delivery-status")
        .ok_or("no message/delivery-status part")?;
    let mut groups = field_groups(&status.body);
    if groups.is_empty() {
        return Err("empty message/delivery-status part".into());
    }
    let per_message = groups.remove(0);
    Ok(Dsn {
        media_type,
        report_type: param("report-type"),
        parts,
        per_message,
        recipients: groups,
    })
}

/// Every header field `name` of `raw` (case-insensitive), unfolded and
/// trimmed, in order (e.g. all `Received:` fields).
pub fn header_values(raw: &str, name: &str) -> Vec<String> {
    let end = raw
        .find("\r\n\r\n")
        .or_else(|| raw.find("\n\n"))
        .unwrap_or(raw.len());
    let (headers, _) = split_entity(&format!("{}\r\n\r\n", &raw[..end]));
    headers
        .into_iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .collect()
}

/// The Message-ID (without angle brackets) of raw message bytes.
pub fn message_id_of(data: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    header_value(&text, "Message-ID").map(|v| strip_brackets(&v))
}

// ---------------------------------------------------------------------------
// Config text helpers
// ---------------------------------------------------------------------------

/// `[server]` (hostname `relay.test`, spool in the tempdir, and a `hosts`
/// map from names to loopback addresses, so certificates can name
/// `mx.test`) and `[admin]`.
pub fn head_with_hosts(setup: &RelaySetup, hosts: &[(&str, SocketAddr)]) -> String {
    let map: Vec<String> = hosts
        .iter()
        .map(|(name, addr)| format!("{} = \"{addr}\"", toml_str(name)))
        .collect();
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = {}\nhosts = {{ {} }}\n\n[admin]\naddress = \"{}\"\n\n",
        toml_str(&setup.spool_dir.to_string_lossy()),
        map.join(", "),
        setup.admin
    )
}

/// Waits (bounded) until the relay logged a deferred attempt for `qid`,
/// then checks that every attempt was deferred, the relay did connect, and
/// the scripted upstream saw no MAIL, RCPT, DATA nor AUTH and no transaction.
pub fn deferred_and_nothing_sent(relay: &Relay, up: &Scripted, qid: &str, what: &str) {
    relay.wait_until(
        &format!("a deferred attempt for {qid} ({what})"),
        Duration::from_secs(20),
        || {
            attempts_for(&relay.log_text(), qid)
                .iter()
                .any(|a| a.status == "deferred")
        },
    );
    let a = attempts_for(&relay.log_text(), qid);
    assert!(
        a.iter()
            .all(|a| a.status == "deferred" && a.delivered == 0 && a.bounced == 0),
        "{what}: every attempt must be deferred, not sent or bounced:\n{}",
        a.iter()
            .map(|a| a.line.clone())
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(
        up.sessions() >= 1,
        "{what}: the relay never connected\n{}",
        relay.logs()
    );
    let sent: Vec<String> = up
        .commands()
        .iter()
        .map(|c| c.line.to_ascii_uppercase())
        .filter(|l| {
            ["MAIL", "RCPT", "DATA", "AUTH"]
                .iter()
                .any(|v| l.starts_with(v))
        })
        .collect();
    assert!(
        sent.is_empty(),
        "{what}: nothing may be sent, but the upstream saw {sent:?}\n{}",
        up.dump()
    );
    assert!(up.transactions().is_empty(), "{}", up.dump());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_lines_parse_with_and_without_colours() {
        let log = "2026-01-01T00:00:00.000Z  INFO \u{1b}[2mpoolrelay::delivery\u{1b}[0m\u{1b}[2m:\u{1b}[0m delivery attempt \
                   \u{1b}[3mqueue_id\u{1b}[0m\u{1b}[2m=\u{1b}[0m0001 \u{1b}[3mpool\u{1b}[0m\u{1b}[2m=\u{1b}[0m- upstream=127.0.0.1:25 \
                   delivered=1 deferred=1 bounced=0 status=deferred delay=0.010 attempt=2 reply=451 4.2.0 later please\n\
                   other line\n";
        let a = delivery_attempts(log);
        assert_eq!(a.len(), 1);
        assert_eq!(a[0].queue_id, "0001");
        assert_eq!(a[0].pool, "-");
        assert_eq!((a[0].delivered, a[0].deferred, a[0].bounced), (1, 1, 0));
        assert_eq!(a[0].status, "deferred");
        assert_eq!(a[0].attempt, 2);
        assert_eq!(a[0].reply, "451 4.2.0 later please");
    }

    #[test]
    fn dsn_parses() {
        let raw = "From: MAILER-DAEMON@relay.test\r\nContent-Type: multipart/report; report-type=delivery-status;\r\n\
                   \tboundary=\"B/relay.test\"\r\n\r\npreamble\r\n--B/relay.test\r\nContent-Type: text/plain\r\n\r\nhuman\r\n\
                   --B/relay.test\r\nContent-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; relay.test\r\n\r\n\
                   Final-Recipient: rfc822; gone@x.test\r\nAction: failed\r\nStatus: 5.1.1\r\n\r\n\
                   --B/relay.test\r\nContent-Type: text/rfc822-headers\r\n\r\nSubject: x\r\n\r\n--B/relay.test--\r\n";
        let d = parse_dsn(raw).unwrap();
        assert_eq!(d.media_type, "multipart/report");
        assert_eq!(d.report_type.as_deref(), Some("delivery-status"));
        assert_eq!(d.parts.len(), 3);
        assert_eq!(
            field(&d.per_message, "reporting-mta"),
            Some("dns; relay.test")
        );
        let r = d.recipient("gone@x.test").unwrap();
        assert_eq!(field(r, "Status"), Some("5.1.1"));
        assert_eq!(d.final_recipients(), vec!["gone@x.test".to_string()]);
        assert!(parse_dsn("Content-Type: text/plain\r\n\r\nx").is_err());
    }
}
