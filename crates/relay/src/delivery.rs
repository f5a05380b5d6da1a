//! The delivery decision, sans I/O: given a message's envelope, what one
//! attempt produced, the pool's policy and the time, what happens next.
//!
//! [`decide`] is a pure function, shaped like `smtp::inbound::Session`: the
//! worker (the I/O shell) takes a job, runs the SMTP client, hands the
//! result here and applies the [`Decision`]: store the envelope or remove
//! it, queue the DSNs it names, log and count what it says. Every rule of
//! README "Delivery semantics" lives here and is unit-tested on plain values:
//!
//! - per recipient: 2xx delivered, 4xx stays pending, 5xx bounced; the
//!   reply to DATA (or the final dot) decides every recipient whose RCPT
//!   was accepted;
//! - a partly delivered message is retried for the pending recipients only,
//!   on the pool's `retry` schedule (the last step repeats, ±10% jitter);
//! - recipients refused with `4.5.3` (too many recipients) after others of
//!   the same transaction went through are sent again at once;
//! - past `max_age` the pending recipients bounce with `4.4.7`;
//! - one "delayed" DSN at most, after `delay_warning`;
//! - an attempt that found every host down says nothing about the message:
//!   it is not counted and nothing is written;
//! - mail from `<>` is never bounced.

use std::time::Duration;

use poolrelay_smtp::Reply;
use poolrelay_spool::{Envelope, QueueId, RecipientState};

/// What a DSN reports about its recipients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Failed permanently or expired: "Action: failed".
    Failed,
    /// Still being tried after `delay_warning`: "Action: delayed".
    Delayed,
}

/// The pool's delivery policy, borrowed from the config (built per
/// message, so it copies nothing).
#[derive(Debug, Clone, Copy)]
pub struct Policy<'a> {
    /// `retry`: the wait before attempt n+1 is step n; the last step repeats.
    pub retry: &'a [Duration],
    /// `max_age`: pending recipients older than this bounce with 4.4.7.
    pub max_age: Duration,
    /// `delay_warning`: send one "delayed" DSN once a message is this old.
    pub delay_warning: Option<Duration>,
}

/// What one delivery attempt produced.
#[derive(Debug, Clone)]
pub enum Attempt {
    /// An upstream took the transaction and answered it.
    Answered {
        /// The host that answered ("host:port").
        host: String,
        /// The reply to each RCPT, in the order of the recipients attempted.
        rcpt: Vec<Reply>,
        /// The reply to DATA or to the final dot; `None` when no RCPT was
        /// accepted, so DATA was not sent.
        data: Option<Reply>,
    },
    /// An upstream refused the whole transaction (a reply to MAIL, say):
    /// the reply applies to every recipient attempted.
    Refused {
        /// The host that refused.
        host: String,
        /// Its reply.
        reply: Reply,
    },
    /// No host took the transaction.
    NoConnection {
        /// The host the attempt was for (the `[[upstream]]` entry's), for logs.
        host: String,
        /// Why, for the envelope, the log and a DSN.
        reason: String,
        /// True when every host was down (or skipped as down): the attempt
        /// says nothing about the message.
        every_host_down: bool,
    },
}

impl Attempt {
    /// The host named in logs and metrics.
    pub fn host(&self) -> &str {
        match self {
            Attempt::Answered { host, .. }
            | Attempt::Refused { host, .. }
            | Attempt::NoConnection { host, .. } => host,
        }
    }
}

/// Where a message goes after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// No recipient is pending: remove the message from the spool.
    Remove,
    /// Store the new envelope; try again at this time (Unix ms; now or
    /// earlier means at once).
    RetryAt(u64),
    /// Nothing was learned (every host down): back in the queue as ready,
    /// for workers whose hosts are up, without writing anything.
    Requeue,
}

/// The outcome of an attempt, one word across recipient states, the log's
/// `status` field and metric names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Every recipient is done and at least one was delivered, none bounced now.
    Delivered,
    /// Some recipients wait for a later attempt.
    Deferred,
    /// Recipients bounced (permanent failure) and none is pending.
    Bounced,
    /// The message passed `max_age`: its pending recipients bounced with 4.4.7.
    Expired,
}

impl Outcome {
    /// The word in logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Deferred => "deferred",
            Outcome::Bounced => "bounced",
            Outcome::Expired => "expired",
        }
    }
}

/// A DSN that is due: what kind and about which recipients (indexes into
/// the decision's envelope, whose replies the DSN quotes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// Failed or delayed.
    pub action: Action,
    /// Recipient indexes.
    pub recipients: Vec<usize>,
}

/// What to log and count for an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The outcome word.
    pub outcome: Outcome,
    /// Recipients delivered by this attempt.
    pub delivered: usize,
    /// Recipients of this attempt still pending.
    pub deferred: usize,
    /// Recipients bounced by this attempt (including expired ones).
    pub bounced: usize,
    /// The attempt number, as stored (an uncounted attempt keeps the old number).
    pub attempt: u32,
    /// False when the attempt did not count (every host down).
    pub counted: bool,
    /// The reply worth logging: one on a recipient still pending, else
    /// any of this attempt.
    pub reply: Option<Reply>,
    /// A failure DSN was due but the sender is `<>`: dropped, never sent.
    pub bounce_dropped: bool,
}

/// Everything the worker applies after an attempt.
#[derive(Debug, Clone)]
pub struct Decision {
    /// The envelope to store (or the last state of a removed message, for DSNs).
    pub envelope: Envelope,
    /// Where the message goes.
    pub next: Next,
    /// The DSNs to queue, in order.
    pub reports: Vec<Report>,
    /// What to log and count.
    pub summary: Summary,
}

/// Decides the outcome of one attempt at delivering `envelope` (queue id
/// `id`) to the recipients at `attempted` (indexes into its recipients, in
/// the order they were sent), at time `now` (Unix ms).
pub fn decide(
    id: QueueId,
    envelope: &Envelope,
    attempted: &[usize],
    attempt: &Attempt,
    policy: &Policy<'_>,
    now: u64,
) -> Decision {
    let mut env = envelope.clone();
    let age = Duration::from_millis(now.saturating_sub(env.accepted_ms));
    if let Attempt::NoConnection {
        every_host_down: true,
        ..
    } = attempt
        && age < policy.max_age
    {
        return Decision {
            summary: Summary {
                outcome: Outcome::Deferred,
                delivered: 0,
                deferred: attempted.len(),
                bounced: 0,
                attempt: env.attempts,
                counted: false,
                reply: Some(no_connection_reply(attempt)),
                bounce_dropped: false,
            },
            envelope: env,
            next: Next::Requeue,
            reports: Vec::new(),
        };
    }
    env.attempts += 1;
    let (mut delivered, mut bounced) = (0, 0);
    let mut too_many = 0;
    for (k, &i) in attempted.iter().enumerate() {
        let Some(reply) = reply_for(attempt, k) else {
            continue;
        };
        let Some(rcpt) = env.recipients.get_mut(i) else {
            continue;
        };
        if rcpt.state != RecipientState::Pending {
            continue;
        }
        if reply.is_positive() {
            rcpt.state = RecipientState::Delivered;
            delivered += 1;
        } else if reply.is_permanent() {
            rcpt.state = RecipientState::Bounced;
            bounced += 1;
        } else if reply.status() == "4.5.3" {
            too_many += 1;
        }
        rcpt.last_reply = Some(reply);
    }
    let mut expired = 0;
    if !env.is_done() && age >= policy.max_age {
        for r in env
            .recipients
            .iter_mut()
            .filter(|r| r.state == RecipientState::Pending)
        {
            let last = r
                .last_reply
                .as_ref()
                .map_or_else(|| "none".to_string(), Reply::to_string);
            r.state = RecipientState::Bounced;
            r.last_reply = Some(Reply::local(
                451,
                "4.4.7",
                format!(
                    "message expired after {}s in the queue; last reply: {last}",
                    age.as_secs()
                ),
            ));
            expired += 1;
        }
    }
    // Bounced by this attempt (5xx or expiry): those were pending before it.
    let bounced_now: Vec<usize> = (0..env.recipients.len())
        .filter(|&i| {
            env.recipients[i].state == RecipientState::Bounced
                && envelope.recipients[i].state == RecipientState::Pending
        })
        .collect();
    let mut reports = Vec::new();
    let null_sender = env.sender.is_empty();
    if !bounced_now.is_empty() && !null_sender {
        reports.push(Report {
            action: Action::Failed,
            recipients: bounced_now.clone(),
        });
    }
    if let Some(warn_after) = policy.delay_warning
        && !env.delay_warned
        && !env.is_done()
        && age >= warn_after
    {
        env.delay_warned = true;
        if !null_sender {
            reports.push(Report {
                action: Action::Delayed,
                recipients: env.pending_indexes(),
            });
        }
    }
    let pending_after = env.pending_indexes();
    let next = if pending_after.is_empty() {
        Next::Remove
    } else if too_many == pending_after.len() && delivered + bounced > 0 {
        // The upstream took part of a long recipient list: the rest goes
        // in a new transaction now, not after a retry step.
        env.attempts -= 1;
        Next::RetryAt(now)
    } else {
        Next::RetryAt(now + retry_delay(policy, env.attempts, id))
    };
    if let Next::RetryAt(due) = next {
        env.next_attempt_ms = due;
    }
    let deferred = attempted
        .iter()
        .filter(|&&i| {
            env.recipients
                .get(i)
                .is_some_and(|r| r.state == RecipientState::Pending)
        })
        .count();
    let outcome = if expired > 0 {
        Outcome::Expired
    } else if deferred > 0 || !pending_after.is_empty() {
        Outcome::Deferred
    } else if bounced > 0 {
        Outcome::Bounced
    } else {
        Outcome::Delivered
    };
    let reply = env
        .pending()
        .chain(attempted.iter().filter_map(|&i| env.recipients.get(i)))
        .find_map(|r| r.last_reply.clone());
    Decision {
        summary: Summary {
            outcome,
            delivered,
            deferred,
            bounced: bounced + expired,
            attempt: env.attempts,
            counted: true,
            reply,
            bounce_dropped: null_sender && !bounced_now.is_empty(),
        },
        envelope: env,
        next,
        reports,
    }
}

/// The reply that decides the `k`-th recipient attempted.
fn reply_for(attempt: &Attempt, k: usize) -> Option<Reply> {
    match attempt {
        Attempt::Answered { rcpt, data, .. } => {
            let r = rcpt.get(k)?;
            if r.is_positive() {
                // Accepted at RCPT: the DATA reply decides. No DATA reply
                // after an accepted RCPT cannot happen; treat it as transient.
                Some(data.clone().unwrap_or_else(|| {
                    Reply::local(451, "4.4.2", "no reply to DATA after an accepted RCPT")
                }))
            } else {
                Some(r.clone())
            }
        }
        Attempt::Refused { reply, .. } => Some(reply.clone()),
        Attempt::NoConnection { .. } => Some(no_connection_reply(attempt)),
    }
    .map(Reply::sanitized)
}

/// What a recipient records when no host took the transaction (RFC 3463
/// 4.4.1: no answer from host).
fn no_connection_reply(attempt: &Attempt) -> Reply {
    let reason = match attempt {
        Attempt::NoConnection { reason, .. } => reason.as_str(),
        _ => "no connection",
    };
    Reply::local(451, "4.4.1", reason)
}

/// The wait before the next attempt after `attempts` attempts: the pool's
/// schedule step (the last step repeats), ±10% so retries of a burst
/// spread out. The jitter is derived from the queue id, so it is the same
/// for the same message and attempt (testable, no global RNG).
pub fn retry_delay(policy: &Policy<'_>, attempts: u32, id: QueueId) -> u64 {
    let step = policy
        .retry
        .get((attempts as usize).saturating_sub(1))
        .or(policy.retry.last())
        .copied()
        .unwrap_or(Duration::from_secs(60));
    let ms = step.as_millis() as u64;
    let spread = ms / 5 + 1;
    let mix = (id ^ u64::from(attempts).wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_mul(0xBF58_476D_1CE4_E5B9);
    ms - ms / 10 + (mix >> 32) % spread
}

#[cfg(test)]
mod tests;
