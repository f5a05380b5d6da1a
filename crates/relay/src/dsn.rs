//! Delivery status notifications (RFC 3464): a multipart/report from `<>`
//! to the envelope sender, queued in pool `-`. Never built for a message
//! whose sender is `<>` (the caller checks), so bounces cannot loop.

use poolrelay_config::DEFAULT_POOL;
use poolrelay_smtp::inbound::rfc5322_date;
use poolrelay_spool::{
    Envelope, FjallSpool, QueueId, Recipient, RecipientState, Spool, format_id, now_ms,
};

use crate::scheduler::Scheduler;

/// What a DSN reports about its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Failed permanently or expired: "Action: failed".
    Failed,
    /// Still trying after `delay_warning`: "Action: delayed".
    Delayed,
}

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
/// dropped: never bounce a bounce).
pub async fn queue_report(
    spool: &FjallSpool,
    scheduler: &Scheduler,
    hostname: &str,
    subject: Subject<'_>,
) {
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
        return;
    }
    let body = match spool.body(id) {
        Ok(Some(b)) => b,
        Ok(None) => return,
        Err(e) => {
            tracing::error!(queue_id = %id_text, "cannot read the message for its DSN: {e}");
            return;
        }
    };
    let Some((envelope, message)) =
        report(action, hostname, id, original, recipients, remote, &body)
    else {
        return;
    };
    match spool.append(envelope, message).await {
        Ok(dsn_id) => {
            tracing::info!(queue_id = %id_text, dsn = %format_id(dsn_id), to = %original.sender, "DSN queued in pool -");
            scheduler.enqueue(dsn_id, DEFAULT_POOL, 0);
        }
        Err(e) => tracing::error!(queue_id = %id_text, "cannot queue the DSN: {e}"),
    }
}

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
        out.push_str(&format!(
            "<{}>: {}\r\n",
            r.address,
            r.last_reply.as_deref().unwrap_or("failed")
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
        out.push_str(&format!("Original-Envelope-Id: {envid}\r\n"));
    }
    out.push_str(&format!(
        "Arrival-Date: {}\r\n",
        rfc5322_date(original.accepted_ms / 1000)
    ));
    for r in &failed {
        let reply = r.last_reply.as_deref().unwrap_or("");
        out.push_str(&format!("\r\nFinal-Recipient: rfc822; {}\r\n", r.address));
        if let Some(orcpt) = &r.orcpt {
            out.push_str(&format!("Original-Recipient: {orcpt}\r\n"));
        }
        out.push_str(&format!(
            "Action: {action_word}\r\nStatus: {}\r\nRemote-MTA: dns; {}\r\nDiagnostic-Code: smtp; {}\r\n",
            status_of(reply),
            remote,
            one_line(reply)
        ));
    }
    let (content_type, attached) = if original.ret_full {
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
    let envelope = Envelope {
        pool: DEFAULT_POOL.to_string(),
        sender: String::new(),
        recipients: vec![Recipient {
            address: original.sender.clone(),
            orcpt: None,
            notify: 0,
            state: RecipientState::Pending,
            last_reply: None,
        }],
        accepted_ms: now_ms(),
        attempts: 0,
        next_attempt_ms: 0,
        size: bytes.len() as u64,
        listener: "dsn".to_string(),
        client: "local".to_string(),
        route_line: 0,
        envid: None,
        ret_full: false,
        body_8bit: true,
        smtputf8: false,
        delay_warned: false,
    };
    Some((envelope, bytes))
}

/// The enhanced status code in a reply text ("550 5.1.1 no such user" ->
/// "5.1.1"), else derived from the basic code.
fn status_of(reply: &str) -> String {
    for word in reply.split_whitespace().take(3) {
        let parts: Vec<&str> = word.split('.').collect();
        if parts.len() == 3
            && matches!(parts[0], "2" | "4" | "5")
            && parts[1..]
                .iter()
                .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
        {
            // An expiry keeps its 4.4.7: "failed" with a transient code is how
            // Postfix reports it too, and what the operator greps for.
            return word.to_string();
        }
    }
    "5.0.0".to_string()
}

fn one_line(text: &str) -> String {
    text.replace(['\r', '\n'], " ")
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

    fn envelope(sender: &str, notify: u64) -> Envelope {
        Envelope {
            pool: "A".into(),
            sender: sender.into(),
            recipients: vec![
                Recipient {
                    address: "ok@x.test".into(),
                    orcpt: None,
                    notify,
                    state: RecipientState::Delivered,
                    last_reply: Some("250 2.0.0 ok".into()),
                },
                Recipient {
                    address: "gone@x.test".into(),
                    orcpt: Some("rfc822;gone@x.test".into()),
                    notify,
                    state: RecipientState::Bounced,
                    last_reply: Some("550 5.1.1 no such user".into()),
                },
            ],
            accepted_ms: now_ms(),
            attempts: 1,
            next_attempt_ms: 0,
            size: 10,
            listener: "l".into(),
            client: "c".into(),
            route_line: 0,
            envid: Some("ENV1".into()),
            ret_full: false,
            body_8bit: false,
            smtputf8: false,
            delay_warned: false,
        }
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

    #[test]
    fn expiry_keeps_its_4_4_7_status() {
        assert_eq!(status_of("4.4.7 message expired"), "4.4.7");
        assert_eq!(status_of("550 5.1.1 x"), "5.1.1");
        assert_eq!(status_of("550 no"), "5.0.0");
    }
}
