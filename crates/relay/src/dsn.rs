//! Delivery status notifications (RFC 3464): a multipart/report from `<>`
//! to the envelope sender, queued in pool `-`. Never built for a message
//! whose sender is `<>` (the caller checks), so bounces cannot loop.

use poolrelay_config::DEFAULT_POOL;
use poolrelay_smtp::inbound::rfc5322_date;
use poolrelay_smtp::reply::clean_text;
use poolrelay_spool::{Envelope, QueueId, Recipient, Ret, SpoolError, format_id, now_ms};

pub use crate::delivery::Action;
use crate::queue::Queue;

/// What one DSN is about.
pub struct Subject<'a> {
    /// The original message's queue id.
    pub id: QueueId,
    /// Its envelope, with the recipients' final replies.
    pub original: &'a Envelope,
    /// Indexes into `original.recipients` to report.
    pub recipients: &'a [usize],
    /// Failed or delayed.
    pub action: Action,
    /// The upstream that answered, for Remote-MTA.
    pub remote: &'a str,
}

/// Queues a DSN in pool `-`, unless the sender is `<>` (logged and
/// dropped: never bounce a bounce) or no recipient wants one. An error
/// means the DSN could not be stored: the caller keeps the original and
/// tries again, so a bounce is never lost.
pub async fn queue_report(
    queue: &Queue,
    hostname: &str,
    subject: Subject<'_>,
) -> Result<(), SpoolError> {
    let Subject {
        id,
        original,
        recipients,
        action,
        remote,
    } = subject;
    let id_text = format_id(id);
    if original.sender.is_empty() {
        tracing::info!(queue_id = %id_text, "bounce of a message from <> dropped (never bounce a bounce)");
        return Ok(());
    }
    let Some(body) = queue.spool().body(id)? else {
        return Ok(());
    };
    let Some((envelope, message)) =
        report(action, hostname, id, original, recipients, remote, &body)
    else {
        return Ok(());
    };
    let dsn_id = queue.append(envelope, message).await?;
    tracing::info!(queue_id = %id_text, dsn = %format_id(dsn_id), to = %original.sender, "DSN queued in pool -");
    Ok(())
}

/// The `listener` of DSNs made here: they are outcomes of mail already
/// accepted, so the spool stores them even below its free-space floor.
pub const DSN_LISTENER: &str = poolrelay_spool::OUTCOME_LISTENER;

/// RCPT NOTIFY=NEVER (smtp-proto's bit).
const NOTIFY_NEVER: u64 = 1 << 3;
/// RCPT NOTIFY=FAILURE.
const NOTIFY_FAILURE: u64 = 1 << 1;
/// RCPT NOTIFY=DELAY.
const NOTIFY_DELAY: u64 = 1 << 2;

/// Whether a recipient asked for (or by default gets) this kind of DSN
/// (RFC 3461 §4.1: without NOTIFY, failures are reported and delays may be).
fn wants(r: &Recipient, action: Action) -> bool {
    if r.notify == 0 {
        return true;
    }
    let bit = match action {
        Action::Failed => NOTIFY_FAILURE,
        Action::Delayed => NOTIFY_DELAY,
    };
    r.notify & NOTIFY_NEVER == 0 && r.notify & bit != 0
}

/// Builds the DSN about `recipients` (indexes into `original.recipients`;
/// each one's `last_reply` is what the report says). Returns None when no
/// recipient wants one or the sender is `<>`.
pub fn report(
    action: Action,
    hostname: &str,
    id: QueueId,
    original: &Envelope,
    recipients: &[usize],
    remote: &str,
    message: &[u8],
) -> Option<(Envelope, Vec<u8>)> {
    let failed: Vec<&Recipient> = recipients
        .iter()
        .filter_map(|&i| original.recipients.get(i))
        .filter(|r| wants(r, action))
        .collect();
    let (subject, summary, action_word) = match action {
        Action::Failed => (
            "Undelivered Mail Returned to Sender",
            "Your message could not be delivered to one or more recipients.",
            "failed",
        ),
        Action::Delayed => (
            "Delayed Mail (still being retried)",
            "Your message has not been delivered yet to one or more recipients.\r\nThe mail system will keep trying; no action is needed from you.",
            "delayed",
        ),
    };
    if failed.is_empty() || original.sender.is_empty() {
        return None;
    }
    let boundary = format!("{}/{}", format_id(id), hostname);
    let date = rfc5322_date(now_ms() / 1000);
    let mut out = String::new();
    out.push_str(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>\r\n\
         To: <{sender}>\r\n\
         Subject: {subject}\r\n\
         Date: {date}\r\n\
         Message-ID: <{id}.{now}.dsn@{hostname}>\r\n\
         Auto-Submitted: auto-replied\r\n\
         MIME-Version: 1.0\r\n\
         Content-Type: multipart/report; report-type=delivery-status;\r\n\
         \tboundary=\"{boundary}\"\r\n\r\n\
         This is a MIME-encapsulated message.\r\n\r\n\
         --{boundary}\r\n\
         Content-Description: Notification\r\n\
         Content-Type: text/plain; charset=utf-8\r\n\r\n\
         This is the mail system at host {hostname}.\r\n\r\n\
         {summary}\r\n\r\n",
        sender = original.sender,
        id = format_id(id),
        now = now_ms(),
    ));
    for r in &failed {
        let reply = r
            .last_reply
            .as_ref()
            .map_or_else(|| "failed".to_string(), ToString::to_string);
        out.push_str(&format!(
            "<{}>: {}\r\n",
            clean_text(&r.address),
            clean_text(&reply)
        ));
    }
    out.push_str(&format!(
        "\r\n--{boundary}\r\n\
         Content-Description: Delivery report\r\n\
         Content-Type: message/delivery-status\r\n\r\n\
         Reporting-MTA: dns; {hostname}\r\n\
         X-Poolrelay-Queue-ID: {id}\r\n",
        id = format_id(id)
    ));
    if let Some(envid) = &original.envid {
        // xtext (RFC 3464 §2.2.1): a CR LF in ENVID cannot start a field.
        out.push_str(&format!("Original-Envelope-Id: {}\r\n", xtext(envid)));
    }
    out.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.accepted_ms / 1000)
    ));
    for r in &failed {
        out.push_str(&format!(
            "\r\nFinal-Recipient: rfc822; {}\r\n",
            clean_text(&r.address)
        ));
        if let Some(orcpt) = &r.orcpt {
            let (kind, address) = orcpt.split_once(';').unwrap_or(("rfc822", orcpt));
            out.push_str(&format!(
                "Original-Recipient: {}; {}\r\n",
                xtext(kind.trim()),
                xtext(address.trim())
            ));
        }
        let (status, diagnostic) = match &r.last_reply {
            Some(reply) => (reply.status(), reply.to_string()),
            None if action == Action::Delayed => ("4.0.0".to_string(), String::new()),
            None => ("5.0.0".to_string(), String::new()),
        };
        out.push_str(&format!(
            "Action: {action_word}\r\nStatus: {status}\r\nRemote-MTA: dns; {}\r\n",
            clean_text(remote)
        ));
        if !diagnostic.is_empty() {
            out.push_str(&fold(&format!("Diagnostic-Code: smtp; {diagnostic}")));
        }
    }
    let (content_type, attached) = if original.ret() == Some(Ret::Full) {
        ("message/rfc822", message)
    } else {
        ("text/rfc822-headers", header_section(message))
    };
    out.push_str(&format!(
        "\r\n--{boundary}\r\nContent-Description: Undelivered message\r\nContent-Type: {content_type}\r\n\r\n"
    ));
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(attached);
    if !bytes.ends_with(b"\r\n") {
        bytes.extend_from_slice(b"\r\n");
    }
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    let mut envelope = Envelope::new(
        DEFAULT_POOL,
        "",
        vec![Recipient::pending(&original.sender)],
        bytes.len() as u64,
        DSN_LISTENER,
        "local",
    );
    envelope.body_8bit = true;
    Some((envelope, bytes))
}

/// The same DSN returning only the original's headers, when it returned
/// the whole message (RET=FULL) and is larger than `limit` bytes (an
/// upstream's SIZE): better the headers than a DSN refused for its size.
/// `None` when it is no larger, or is not a DSN of ours with a returned
/// message.
pub fn shrink_to_headers(dsn: &[u8], limit: u64) -> Option<Vec<u8>> {
    if (dsn.len() as u64) <= limit {
        return None;
    }
    const PART: &[u8] =
        b"Content-Description: Undelivered message\r\nContent-Type: message/rfc822\r\n\r\n";
    let start = memchr::memmem::find(dsn, PART)? + PART.len();
    // The closing delimiter: the last "\r\n--" line of the report.
    let end = memchr::memmem::rfind(&dsn[start..], b"\r\n--")? + start;
    let original = &dsn[start..end];
    let mut out = Vec::with_capacity(start + 4096);
    out.extend_from_slice(&dsn[..start - PART.len()]);
    out.extend_from_slice(
        b"Content-Description: Undelivered message headers (the whole message exceeded the size limit)\r\nContent-Type: text/rfc822-headers\r\n\r\n",
    );
    out.extend_from_slice(header_section(original));
    if !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(&dsn[end..]);
    Some(out)
}

/// xtext (RFC 3461 §4): `+XX` for `+`, `=`, controls and anything outside
/// printable ASCII, so a value can never add a line or a field.
pub fn xtext(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (b'!'..=b'~').contains(&b) && b != b'+' && b != b'=' {
            out.push(b as char);
        } else {
            out.push_str(&format!("+{b:02X}"));
        }
    }
    out
}

/// One field, folded at spaces so no line exceeds 78 characters where
/// possible and none ever exceeds 998 (RFC 5322 §2.1.1), ending in CRLF.
fn fold(field: &str) -> String {
    let mut out = String::new();
    let mut line = String::new();
    for word in field.split(' ') {
        if !line.is_empty() && line.len() + 1 + word.len() > 78 {
            out.push_str(&line);
            out.push_str("\r\n");
            line = String::from(" ");
        } else if !line.is_empty() {
            line.push(' ');
        }
        let mut word = word;
        while line.len() + word.len() > 990 {
            let cut = (990 - line.len()).max(1);
            let cut = (0..=cut)
                .rev()
                .find(|&i| word.is_char_boundary(i))
                .unwrap_or(0);
            line.push_str(&word[..cut]);
            out.push_str(&line);
            out.push_str("\r\n");
            line = String::from(" ");
            word = &word[cut..];
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push_str("\r\n");
    out
}

/// The header section of a message, through its empty line.
fn header_section(message: &[u8]) -> &[u8] {
    match message.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => &message[..end + 2],
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use poolrelay_spool::RecipientState;

    fn envelope(sender: &str, notify: u64) -> Envelope {
        let ok = Recipient {
            notify,
            state: RecipientState::Delivered,
            last_reply: Some(reply(250, "2.0.0", "ok")),
            ..Recipient::pending("ok@x.test")
        };
        let gone = Recipient {
            orcpt: Some("rfc822;gone@x.test".into()),
            notify,
            state: RecipientState::Bounced,
            last_reply: Some(reply(550, "5.1.1", "no such user")),
            ..Recipient::pending("gone@x.test")
        };
        let mut env = Envelope::new("A", sender, vec![ok, gone], 10, "l", "c");
        env.attempts = 1;
        env.envid = Some("ENV1".into());
        env
    }

    #[test]
    fn failure_dsn_reports_only_bounced_recipients_with_their_status() {
        let msg = b"Subject: hello\r\nMessage-ID: <1@x>\r\n\r\nsecret body\r\n";
        let (env, bytes) = report(
            Action::Failed,
            "relay.test",
            42,
            &envelope("owner-l@x.test", 0),
            &[1],
            "up.test",
            msg,
        )
        .unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert_eq!(env.sender, "");
        assert_eq!(env.pool, "-");
        assert_eq!(env.recipients[0].address, "owner-l@x.test");
        assert!(text.contains("Content-Type: multipart/report; report-type=delivery-status;"));
        assert!(text.contains("Final-Recipient: rfc822; gone@x.test"));
        assert!(!text.contains("Final-Recipient: rfc822; ok@x.test"));
        assert!(text.contains("Status: 5.1.1"));
        assert!(text.contains("Original-Envelope-Id: ENV1"));
        assert!(text.contains("Subject: hello"));
        assert!(
            !text.contains("secret body"),
            "RET=HDRS by default: headers only"
        );
    }

    #[test]
    fn notify_never_and_null_sender_get_no_dsn() {
        let never = envelope("a@b", NOTIFY_NEVER);
        assert!(report(Action::Failed, "h", 1, &never, &[1], "u", b"").is_none());
        assert!(report(Action::Failed, "h", 1, &envelope("", 0), &[1], "u", b"").is_none());
        let failure_only = envelope("a@b", NOTIFY_FAILURE);
        assert!(report(Action::Delayed, "h", 1, &failure_only, &[1], "u", b"").is_none());
        let (_, delayed) = report(
            Action::Delayed,
            "h",
            1,
            &envelope("a@b", NOTIFY_DELAY),
            &[1],
            "u",
            b"",
        )
        .unwrap();
        assert!(
            String::from_utf8(delayed)
                .unwrap()
                .contains("Action: delayed")
        );
    }

    fn reply(code: u16, enhanced: &str, text: &str) -> poolrelay_smtp::Reply {
        poolrelay_smtp::Reply {
            code,
            enhanced: Some(enhanced.into()),
            text: text.into(),
        }
    }

    fn text_of(env: &Envelope, action: Action) -> String {
        let (_, bytes) = report(
            action,
            "h",
            1,
            env,
            &[1],
            "u",
            b"Subject: s\r\n\r\nbody\r\n",
        )
        .unwrap();
        String::from_utf8(bytes).unwrap()
    }

    #[test]
    fn status_comes_from_the_upstream_enhanced_code_else_from_its_class() {
        let mut env = envelope("a@b", 0);
        assert!(text_of(&env, Action::Failed).contains("Status: 5.1.1"));
        env.recipients[1].last_reply = Some(poolrelay_smtp::Reply {
            code: 554,
            enhanced: None,
            text: "no".into(),
        });
        assert!(text_of(&env, Action::Failed).contains("Status: 5.0.0"));
        env.recipients[1].last_reply = Some(reply(451, "4.4.7", "message expired"));
        assert!(text_of(&env, Action::Failed).contains("Status: 4.4.7"));
        env.recipients[1].last_reply = Some(poolrelay_smtp::Reply {
            code: 451,
            enhanced: None,
            text: "later".into(),
        });
        assert!(text_of(&env, Action::Delayed).contains("Status: 4.0.0"));
    }

    #[test]
    fn envid_and_orcpt_cannot_add_fields_to_the_report() {
        let mut env = envelope("a@b", 0);
        env.envid = Some("abc\r\nFinal-Recipient: rfc822; forged@x".into());
        env.recipients[1].orcpt = Some("rfc822;x@y\r\nAction: delivered".into());
        let text = text_of(&env, Action::Failed);
        let fields = |name: &str| text.split("\r\n").filter(|l| l.starts_with(name)).count();
        assert_eq!(fields("Final-Recipient:"), 1, "{text}");
        assert_eq!(fields("Action:"), 1, "{text}");
        assert!(!text.contains("\r\nAction: delivered"));
        assert!(
            text.contains("Original-Envelope-Id: abc+0D+0AFinal-Recipient:+20rfc822;+20forged@x")
        );
    }

    #[test]
    fn ret_hdrs_and_no_ret_attach_headers_and_ret_full_the_whole_message() {
        let mut env = envelope("a@b", 0);
        for (ret, body_expected) in [
            (None, false),
            (Some(Ret::Headers), false),
            (Some(Ret::Full), true),
        ] {
            env.ret = ret;
            let text = text_of(&env, Action::Failed);
            assert_eq!(text.contains("\r\nbody\r\n"), body_expected, "{ret:?}");
            let kind = if body_expected {
                "message/rfc822"
            } else {
                "text/rfc822-headers"
            };
            assert!(text.contains(kind), "{ret:?}");
        }
        env.legacy_ret_full = true;
        env.ret = None;
        assert!(text_of(&env, Action::Failed).contains("message/rfc822"));
    }

    #[test]
    fn long_diagnostics_are_folded_under_998_characters() {
        let mut env = envelope("a@b", 0);
        env.recipients[1].last_reply = Some(reply(550, "5.1.1", &"x".repeat(3000)));
        let text = text_of(&env, Action::Failed);
        assert!(text.split("\r\n").all(|l| l.len() <= 998));
        let folded = fold(&format!("Diagnostic-Code: smtp; {}", "word ".repeat(100)));
        assert!(folded.split("\r\n").all(|l| l.len() <= 78));
    }

    #[test]
    fn a_ret_full_dsn_over_the_upstream_size_returns_headers_only() {
        let mut env = envelope("a@b", 0);
        env.ret = Some(Ret::Full);
        let original = format!(
            "Subject: big\r\nX-Mark: 1\r\n\r\n{}\r\n",
            "z".repeat(10_000)
        );
        let (_, dsn) =
            report(Action::Failed, "h", 1, &env, &[1], "u", original.as_bytes()).unwrap();
        assert!(
            shrink_to_headers(&dsn, dsn.len() as u64).is_none(),
            "fits: unchanged"
        );
        let small = shrink_to_headers(&dsn, 5_000).expect("shrunk");
        let text = String::from_utf8(small).unwrap();
        assert!(text.len() < 5_000, "{}", text.len());
        assert!(text.contains("Content-Type: text/rfc822-headers"), "{text}");
        assert!(
            text.contains("X-Mark: 1") && !text.contains("zzzz"),
            "{text}"
        );
        assert!(text.contains("Status: 5.1.1"), "the report itself is kept");
        assert!(
            text.trim_end().ends_with("--"),
            "closing delimiter kept: {text}"
        );
        env.ret = None;
        let (_, hdrs) =
            report(Action::Failed, "h", 1, &env, &[1], "u", original.as_bytes()).unwrap();
        assert!(
            shrink_to_headers(&hdrs, 10).is_none(),
            "already headers only"
        );
    }

    #[test]
    fn xtext_encodes_plus_equals_space_and_controls() {
        assert_eq!(xtext("a+b=c d\r"), "a+2Bb+3Dc+20d+0D");
        assert_eq!(xtext("plain@x.test"), "plain@x.test");
    }
}
