//! The envelope: everything about a queued message except its bytes.
//! Stored as JSON; fields added later have serde defaults, and records
//! written by older versions (reply as a string, `ret_full`) still load.

use poolrelay_smtp::{Reply, Ret};
use serde::{Deserialize, Deserializer, Serialize};

/// Where one recipient of a queued message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RecipientState {
    /// Not yet delivered: tried on the next attempt.
    Pending,
    /// An upstream accepted it.
    Delivered,
    /// Failed permanently (or expired); a DSN was queued if one was due.
    Bounced,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    /// The address, without angle brackets.
    pub address: String,
    /// DSN ORCPT as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub orcpt: Option<String>,
    /// DSN NOTIFY flags as received (smtp-proto `RCPT_NOTIFY_*` bits, 0 = not given).
    #[serde(default)]
    pub notify: u64,
    /// Where it stands.
    pub state: RecipientState,
    /// The last reply about it (an upstream's, or one made here when no
    /// host answered or the message expired), for logs, the admin API and DSNs.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "reply_or_text"
    )]
    pub last_reply: Option<Reply>,
}

/// Everything about a queued message except its bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    /// The pool the message is queued in.
    pub pool: String,
    /// Envelope sender; empty for the null sender.
    pub sender: String,
    /// Recipients with their states.
    pub recipients: Vec<Recipient>,
    /// When the 250 was sent, Unix ms.
    pub accepted_ms: u64,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Not to be tried before this time, Unix ms (0 = now).
    pub next_attempt_ms: u64,
    /// Message size in bytes.
    pub size: u64,
    /// Name of the listener that accepted it.
    pub listener: String,
    /// Client address that sent it.
    pub client: String,
    /// Line of the route that classified it (0 = no route matched).
    #[serde(default)]
    pub route_line: usize,
    /// DSN ENVID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub envid: Option<String>,
    /// DSN RET as received: what a failure DSN returns (headers when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ret: Option<Ret>,
    /// Records written before `ret` existed said only whether RET=FULL was
    /// asked; read once, never written.
    #[serde(default, rename = "ret_full", skip_serializing)]
    pub legacy_ret_full: bool,
    /// BODY=8BITMIME was given.
    #[serde(default)]
    pub body_8bit: bool,
    /// SMTPUTF8 was given.
    #[serde(default)]
    pub smtputf8: bool,
    /// A "delayed" DSN was sent (at most one per message).
    #[serde(default)]
    pub delay_warned: bool,
    /// MT-PRIORITY (RFC 6710) as honoured by the listener, -9 to 9. None:
    /// the client gave none (and records older than the field); such a
    /// message orders and matches routes as 0, the RFC's default, and is
    /// relayed without a priority. See [`Envelope::mt_priority_or_default`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mt_priority: Option<i8>,
}

/// What a deferral that decided nothing about any recipient changes: the
/// attempt count, the next attempt time and the last replies of recipients
/// still pending. Stored apart from the envelope and without an fsync
/// ([`crate::Spool::record_attempt`]), so a retry step costs a small write,
/// not a rewritten envelope.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptRecord {
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Not to be tried before this time, Unix ms.
    pub next_attempt_ms: u64,
    /// The last reply per pending recipient, by index in the envelope.
    #[serde(default)]
    pub replies: Vec<(usize, Reply)>,
}

impl Recipient {
    /// A recipient still to be delivered, without DSN parameters.
    pub fn pending(address: &str) -> Recipient {
        Recipient {
            address: address.to_string(),
            orcpt: None,
            notify: 0,
            state: RecipientState::Pending,
            last_reply: None,
        }
    }
}

impl Envelope {
    /// A message just accepted in `pool`: no attempt yet, due now, no DSN
    /// parameters; set the optional fields after.
    pub fn new(
        pool: &str,
        sender: &str,
        recipients: Vec<Recipient>,
        size: u64,
        listener: &str,
        client: &str,
    ) -> Envelope {
        Envelope {
            pool: pool.to_string(),
            sender: sender.to_string(),
            recipients,
            accepted_ms: crate::now_ms(),
            attempts: 0,
            next_attempt_ms: 0,
            size,
            listener: listener.to_string(),
            client: client.to_string(),
            route_line: 0,
            envid: None,
            ret: None,
            legacy_ret_full: false,
            body_8bit: false,
            smtputf8: false,
            delay_warned: false,
            mt_priority: None,
        }
    }

    /// Recipients still to be delivered.
    pub fn pending(&self) -> impl Iterator<Item = &Recipient> {
        self.recipients
            .iter()
            .filter(|r| r.state == RecipientState::Pending)
    }

    /// Indexes of the recipients still to be delivered, in RCPT order.
    pub fn pending_indexes(&self) -> Vec<usize> {
        self.recipients
            .iter()
            .enumerate()
            .filter(|(_, r)| r.state == RecipientState::Pending)
            .map(|(i, _)| i)
            .collect()
    }

    /// True when no recipient is pending: the message can leave the spool.
    pub fn is_done(&self) -> bool {
        self.pending().next().is_none()
    }

    /// The MT-PRIORITY the message is ordered and routed by: its own, or 0
    /// when it has none (RFC 6710: absent means the default, 0).
    pub fn mt_priority_or_default(&self) -> i8 {
        self.mt_priority.unwrap_or(0)
    }

    /// The attempt record that turns `before` into `self`, when that is all
    /// that changed (no recipient delivered or bounced, no DSN flag set):
    /// such a change can be stored as an [`AttemptRecord`].
    pub fn attempt_since(&self, before: &Envelope) -> Option<AttemptRecord> {
        let record = AttemptRecord {
            attempts: self.attempts,
            next_attempt_ms: self.next_attempt_ms,
            replies: self
                .recipients
                .iter()
                .enumerate()
                .filter(|(_, r)| r.state == RecipientState::Pending)
                .filter_map(|(i, r)| r.last_reply.clone().map(|reply| (i, reply)))
                .collect(),
        };
        let mut replayed = before.clone();
        replayed.apply_attempt(&record);
        (replayed == *self).then_some(record)
    }

    /// Applies a stored attempt record (newer than the envelope it was
    /// written over; an older one, which cannot normally exist, is ignored).
    pub fn apply_attempt(&mut self, record: &AttemptRecord) {
        if record.attempts < self.attempts {
            return;
        }
        self.attempts = record.attempts;
        self.next_attempt_ms = record.next_attempt_ms;
        for (i, reply) in &record.replies {
            if let Some(r) = self.recipients.get_mut(*i)
                && r.state == RecipientState::Pending
            {
                r.last_reply = Some(reply.clone());
            }
        }
    }

    /// RET, including what records of older versions said.
    pub fn ret(&self) -> Option<Ret> {
        self.ret.or(self.legacy_ret_full.then_some(Ret::Full))
    }
}

/// Reads `last_reply` as a typed reply, or as the "550 5.1.1 text" string
/// older versions stored.
fn reply_or_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Reply>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Typed(Reply),
        Text(String),
    }
    Ok(match Option::<Stored>::deserialize(d)? {
        None => None,
        Some(Stored::Typed(r)) => Some(r),
        Some(Stored::Text(t)) => Some(parse_reply_text(&t)),
    })
}

/// "550 5.1.1 no such user" -> a reply; text without a code becomes a 451.
fn parse_reply_text(text: &str) -> Reply {
    let mut words = text.splitn(2, ' ');
    let first = words.next().unwrap_or_default();
    let rest = words.next().unwrap_or_default();
    let Some(code) = first.parse::<u16>().ok().filter(|c| (200..600).contains(c)) else {
        return Reply {
            code: 451,
            enhanced: None,
            text: text.to_string(),
        }
        .sanitized();
    };
    let (enhanced, text) = match rest.split_once(' ') {
        Some((e, t)) if e.split('.').count() == 3 => (Some(e.to_string()), t.to_string()),
        _ => (None, rest.to_string()),
    };
    Reply {
        code,
        enhanced,
        text,
    }
    .sanitized()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_older_versions_still_load() {
        let old = r#"{"pool":"A","sender":"s@x","recipients":[{"address":"a@x","state":"pending","last_reply":"450 4.2.0 busy"}],
            "accepted_ms":1,"attempts":2,"next_attempt_ms":0,"size":3,"listener":"l","client":"c","ret_full":true}"#;
        let env: Envelope = serde_json::from_str(old).unwrap();
        let reply = env.recipients[0].last_reply.clone().unwrap();
        assert_eq!(
            (reply.code, reply.enhanced.as_deref()),
            (450, Some("4.2.0"))
        );
        assert_eq!(reply.text, "busy");
        assert_eq!(env.ret(), Some(Ret::Full));
        assert_eq!((env.mt_priority, env.mt_priority_or_default()), (None, 0));
        let again: Envelope = serde_json::from_slice(&serde_json::to_vec(&env).unwrap()).unwrap();
        assert_eq!(again.recipients[0].last_reply, Some(reply));
    }

    #[test]
    fn mt_priority_is_stored_only_when_given() {
        let mut env = Envelope::new("A", "s@x", vec![Recipient::pending("a@x")], 1, "l", "c");
        assert!(!serde_json::to_string(&env).unwrap().contains("mt_priority"));
        env.mt_priority = Some(-3);
        let again: Envelope = serde_json::from_slice(&serde_json::to_vec(&env).unwrap()).unwrap();
        assert_eq!(
            (again.mt_priority, again.mt_priority_or_default()),
            (Some(-3), -3)
        );
    }

    #[test]
    fn only_a_deferral_that_decided_nothing_is_an_attempt_record() {
        let mut before = Envelope::new(
            "A",
            "s@x",
            vec![Recipient::pending("a@x"), Recipient::pending("b@x")],
            1,
            "l",
            "c",
        );
        before.recipients[1].state = RecipientState::Delivered;
        let mut after = before.clone();
        after.attempts = 3;
        after.next_attempt_ms = 99;
        after.recipients[0].last_reply = Some(parse_reply_text("451 4.3.0 later"));
        let record = after.attempt_since(&before).expect("an attempt record");
        assert_eq!((record.attempts, record.replies.len()), (3, 1));
        let mut replayed = before.clone();
        replayed.apply_attempt(&record);
        assert_eq!(replayed, after);
        // A recipient's outcome is not an attempt record: the envelope is rewritten.
        let mut bounced = after.clone();
        bounced.recipients[0].state = RecipientState::Bounced;
        assert_eq!(bounced.attempt_since(&before), None);
        let mut warned = after.clone();
        warned.delay_warned = true;
        assert_eq!(warned.attempt_since(&before), None);
        // An older record never takes a newer envelope back.
        let mut newer = after.clone();
        newer.attempts = 5;
        newer.apply_attempt(&record);
        assert_eq!(newer.attempts, 5);
    }

    #[test]
    fn reply_text_without_a_code_becomes_a_transient_reply() {
        let r = parse_reply_text("connect to x: refused");
        assert_eq!(r.code, 451);
        assert_eq!(r.status(), "4.0.0");
    }
}
