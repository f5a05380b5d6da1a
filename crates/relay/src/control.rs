//! The operator's moves on a running relay (the admin API and `poolrelay
//! queue` call these): look at pools and messages, hold and release a pool,
//! flush, delete, move and bounce messages.
//!
//! A message being delivered right now cannot be changed: the call answers
//! [`ControlError::Busy`] and the operator tries again.

use poolrelay_spool::{
    Envelope, QueueId, RecipientState, Reply, SharedQueue, SpoolError, format_id, now_ms, parse_id,
};
use serde::Serialize;

use crate::Running;
use crate::classifier::parse_headers;
use crate::dsn;

/// Why an operator call failed.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// No such message or pool.
    #[error("{0}")]
    NotFound(String),
    /// The message is being delivered right now.
    #[error("{0}")]
    Busy(String),
    /// The request makes no sense (bad id, unknown target pool).
    #[error("{0}")]
    BadRequest(String),
    /// The spool failed.
    #[error("{0}")]
    Spool(#[from] SpoolError),
}

/// One pool in `queue summary`.
#[derive(Debug, Clone, Serialize)]
pub struct PoolSummary {
    /// Pool name.
    pub pool: String,
    /// Description from the config.
    pub description: String,
    /// `priority` from the config (0 for a pool not in it): higher goes first.
    pub priority: i8,
    /// Ready (including in flight).
    pub ready: usize,
    /// Deferred.
    pub deferred: usize,
    /// Being delivered now.
    pub in_flight: usize,
    /// Held.
    pub held: bool,
    /// Age of the oldest queued message, seconds.
    pub oldest_age_seconds: f64,
    /// Messages delivered in the last minute.
    pub delivered_last_minute: u64,
    /// Whether the pool is in the running config (false: left over from an older one).
    pub configured: bool,
    /// Why its ready mail is not moving, when nothing can deliver it now
    /// (held, rate limited, window closed, every host down).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// One message in `queue list`.
#[derive(Debug, Clone, Serialize)]
pub struct MessageSummary {
    /// Queue id.
    pub id: String,
    /// Pool.
    pub pool: String,
    /// Its pool's `priority`: the order in which workers take it.
    pub priority: i8,
    /// Its own MT-PRIORITY (RFC 6710), which orders it within its pool;
    /// absent when the client gave none (ordered as 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mt_priority: Option<i8>,
    /// Envelope sender ("" = null sender).
    pub sender: String,
    /// Recipient count.
    pub recipients: usize,
    /// Pending recipients.
    pub pending: usize,
    /// Delivered recipients.
    pub delivered: usize,
    /// Bounced recipients.
    pub bounced: usize,
    /// Size, bytes.
    pub size: u64,
    /// Seconds since accepted.
    pub age_seconds: f64,
    /// Attempts so far.
    pub attempts: u32,
    /// Seconds until the next attempt (0 = due).
    pub next_attempt_in_seconds: f64,
    /// The last reply seen for a pending recipient.
    pub last_reply: Option<String>,
    /// Why it waits: its retry time, or why its pool cannot deliver now.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// Set when the record cannot be read: why. Listed (so one bad record
    /// does not hide the others) but never acted on in bulk; `queue delete
    /// ID` removes it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<String>,
}

/// One message in `queue show`.
#[derive(Debug, Clone, Serialize)]
pub struct MessageDetail {
    /// The summary.
    #[serde(flatten)]
    pub summary: MessageSummary,
    /// The full envelope.
    pub envelope: Envelope,
    /// Header fields, unfolded, in order.
    pub headers: Vec<(String, String)>,
}

fn summarize(
    id: QueueId,
    env: &Envelope,
    priority: i8,
    pool_waiting: Option<&str>,
) -> MessageSummary {
    let count = |s: RecipientState| env.recipients.iter().filter(|r| r.state == s).count();
    let now = now_ms();
    MessageSummary {
        id: format_id(id),
        pool: env.pool.clone(),
        priority,
        mt_priority: env.mt_priority,
        sender: env.sender.clone(),
        recipients: env.recipients.len(),
        pending: count(RecipientState::Pending),
        delivered: count(RecipientState::Delivered),
        bounced: count(RecipientState::Bounced),
        size: env.size,
        age_seconds: now.saturating_sub(env.accepted_ms) as f64 / 1000.0,
        attempts: env.attempts,
        next_attempt_in_seconds: env.next_attempt_ms.saturating_sub(now) as f64 / 1000.0,
        last_reply: env
            .pending()
            .find_map(|r| r.last_reply.as_ref().map(ToString::to_string)),
        corrupt: None,
        waiting: if env.next_attempt_ms > now {
            Some(format!("retry at {}", format_time(env.next_attempt_ms)))
        } else {
            pool_waiting.map(str::to_string)
        },
    }
}

/// The listing of a record that cannot be read.
fn corrupt_summary(id: QueueId, pool: &str, priority: i8, error: &SpoolError) -> MessageSummary {
    MessageSummary {
        id: format_id(id),
        pool: pool.to_string(),
        priority,
        mt_priority: None,
        sender: String::new(),
        recipients: 0,
        pending: 0,
        delivered: 0,
        bounced: 0,
        size: 0,
        age_seconds: now_ms().saturating_sub(poolrelay_spool::accepted_ms_of(id)) as f64 / 1000.0,
        attempts: 0,
        next_attempt_in_seconds: 0.0,
        last_reply: None,
        waiting: None,
        corrupt: Some(format!(
            "{error}; `poolrelay queue delete {}` removes it",
            format_id(id)
        )),
    }
}

/// A Unix ms time as RFC 3339 UTC, for operators.
fn format_time(ms: u64) -> String {
    jiff::Timestamp::from_millisecond(ms as i64)
        .map(|t| t.round(jiff::Unit::Second).unwrap_or(t).to_string())
        .unwrap_or_else(|_| ms.to_string())
}

/// Parses a queue id from the API path.
pub fn id_from(text: &str) -> Result<QueueId, ControlError> {
    parse_id(text).ok_or_else(|| {
        ControlError::BadRequest(format!("{text:?} is not a queue id (16 hex digits)"))
    })
}

impl Running {
    /// Every pool with its counts: configured pools, plus any left over in the spool.
    pub fn pool_summaries(&self) -> Vec<PoolSummary> {
        let config = self.config();
        let counts = self.counts();
        let mut names: Vec<String> = config.pool_names();
        for name in counts.keys().chain(self.spool().pools().iter()) {
            if !names.contains(name) {
                names.push(name.clone());
            }
        }
        let now = now_ms();
        names
            .into_iter()
            .map(|name| {
                let c = counts.get(&name).copied().unwrap_or_default();
                PoolSummary {
                    description: config
                        .pools
                        .get(&name)
                        .map(|p| p.description.clone())
                        .unwrap_or_default(),
                    configured: config.pools.contains_key(&name),
                    priority: config.priority_of(&name),
                    ready: c.ready,
                    deferred: c.deferred,
                    in_flight: c.in_flight,
                    held: c.held,
                    oldest_age_seconds: c
                        .oldest
                        .map(|id| now.saturating_sub(id >> 16) as f64 / 1000.0)
                        .unwrap_or(0.0),
                    delivered_last_minute: c.delivered_last_minute,
                    waiting: self.waiting(&name),
                    pool: name,
                }
            })
            .collect()
    }

    /// Messages of a pool, oldest first, after `after` (paging).
    pub fn list_messages(
        &self,
        pool: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MessageSummary>, ControlError> {
        let after = after.map(id_from).transpose()?;
        self.known_pool(pool)?;
        let waiting = self.waiting(pool);
        let priority = self.config().priority_of(pool);
        let mut out = Vec::new();
        for (id, env) in self.spool().list(pool, after, limit)? {
            match env {
                Ok(env) => out.push(summarize(id, &env, priority, waiting.as_deref())),
                // One bad record must not hide the others: listed as corrupt.
                Err(e) => out.push(corrupt_summary(id, pool, priority, &e)),
            }
        }
        Ok(out)
    }

    /// One message with its envelope and headers.
    pub fn show_message(&self, id: &str) -> Result<MessageDetail, ControlError> {
        let id = id_from(id)?;
        let envelope = self.find(id)?;
        let headers = self
            .spool()
            .body(id)?
            .map(|b| parse_headers(&b))
            .unwrap_or_default();
        Ok(MessageDetail {
            summary: summarize(
                id,
                &envelope,
                self.config().priority_of(&envelope.pool),
                self.waiting(&envelope.pool).as_deref(),
            ),
            envelope,
            headers,
        })
    }

    fn find(&self, id: QueueId) -> Result<Envelope, ControlError> {
        self.spool()
            .find(id)?
            .ok_or_else(|| ControlError::NotFound(format!("no queued message {}", format_id(id))))
    }

    /// Takes a message out of the scheduler so the operator can change it.
    fn claim(&self, id: QueueId) -> Result<Envelope, ControlError> {
        let envelope = self.find(id)?;
        let due = Some(envelope.next_attempt_ms).filter(|&d| d > 0);
        if !self.scheduler.forget_due(id, &envelope.pool, due) {
            return Err(ControlError::Busy(format!(
                "message {} is being delivered right now; try again in a moment",
                format_id(id)
            )));
        }
        Ok(envelope)
    }

    /// Why ready mail of `pool` cannot move now, or `None` when some
    /// worker can deliver it: the pool is held, rate limited, or every
    /// `[[upstream]]` serving it is outside its window or has every host down.
    pub fn waiting(&self, pool: &str) -> Option<String> {
        if self.scheduler.is_held(pool) {
            return Some("pool held by the operator".to_string());
        }
        let generation = self.generation()?;
        let config = &generation.config;
        let rate = generation.limits.wait(pool);
        if !rate.is_zero() {
            return Some(format!(
                "rate limited: next message in {:.1}s",
                rate.as_secs_f64()
            ));
        }
        let serving: Vec<&poolrelay_config::Upstream> = config
            .upstreams
            .iter()
            .filter(|u| u.pools.is_empty() || u.pools.iter().any(|p| p == pool))
            .collect();
        if serving.is_empty() {
            return Some("no [[upstream]] serves this pool".to_string());
        }
        let mut reasons = Vec::new();
        for u in serving {
            let open = generation.clock.is_open(u.window);
            let hosts =
                crate::worker::candidate_hosts(config, u, open, config.fallback_allowed(pool));
            if hosts.is_empty() {
                let w = u.window.map(|w| w.to_string()).unwrap_or_default();
                reasons.push(format!("window {w} of {} closed", u.host));
                continue;
            }
            let down: Vec<String> = hosts
                .iter()
                .filter_map(|h| {
                    self.health.down_since(h).map(|d| {
                        format!("{h} down since {} ({})", format_time(d.since_ms), d.reason)
                    })
                })
                .collect();
            if down.len() < hosts.len() {
                return None;
            }
            reasons.extend(down);
        }
        Some(reasons.join("; "))
    }

    /// Holds or releases a pool. The hold is recorded in the spool first,
    /// so it survives a restart (like `postsuper -h`).
    pub async fn hold_pool(&self, pool: &str, held: bool) -> Result<(), ControlError> {
        self.known_pool(pool)?;
        self.spool().set_held(pool, held).await?;
        self.scheduler.set_held(pool, held);
        tracing::info!(
            pool,
            held,
            "pool {}",
            if held { "held" } else { "released" }
        );
        Ok(())
    }

    /// Retries every deferred message of a pool now.
    pub fn flush_pool(&self, pool: &str) -> Result<(), ControlError> {
        self.known_pool(pool)?;
        // Deferred mail in the due index up to its last key now comes too.
        let due_last = self.spool().due_last(pool)?;
        self.scheduler.flush(pool, due_last);
        if let Some(shared) = self.spool().shared() {
            // The other relays' deferred mail too: fresh tickets, due now.
            let flushed = shared.flush(pool, None);
            let name = pool.to_string();
            tokio::spawn(async move {
                match flushed.await {
                    Ok(n) => tracing::info!(pool = %name, messages = n, "shared pool flushed"),
                    Err(e) => tracing::error!(pool = %name, "cannot flush the shared pool: {e}"),
                }
            });
        }
        tracing::info!(pool, "pool flushed");
        Ok(())
    }

    fn known_pool(&self, pool: &str) -> Result<(), ControlError> {
        if self.config().pools.contains_key(pool) || self.spool().pools().iter().any(|p| p == pool)
        {
            Ok(())
        } else {
            Err(ControlError::NotFound(format!("no pool {pool:?}")))
        }
    }

    /// A message `claim` found in no scheduler here: on a shared spool
    /// most mail waits in the cluster, not in any relay's scheduler, and
    /// the operator acts on it there (the envelope and the cluster's
    /// queue answered). One in this relay's hands is being delivered:
    /// `busy`, as on fjall.
    fn waiting_in_cluster(
        &self,
        id: QueueId,
        busy: String,
    ) -> Result<(Envelope, &dyn SharedQueue), ControlError> {
        let envelope = self.find(id)?;
        match self.spool().shared() {
            Some(shared) if !shared.holds(id) => Ok((envelope, shared)),
            _ => Err(ControlError::Busy(busy)),
        }
    }

    /// Retries one message now.
    pub async fn flush_message(&self, id: &str) -> Result<(), ControlError> {
        let id = id_from(id)?;
        let envelope = match self.claim(id) {
            Ok(envelope) => envelope,
            Err(ControlError::Busy(busy)) => {
                // A fresh ticket, due now, for mail waiting in the cluster.
                let (envelope, shared) = self.waiting_in_cluster(id, busy)?;
                let flushed = shared.flush(&envelope.pool, Some(id)).await?;
                tracing::info!(queue_id = %format_id(id), pool = %envelope.pool, due_already = flushed == 0, "message flushed (in the shared queue)");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        self.queue
            .requeue(id, &envelope.pool, envelope.mt_priority_or_default());
        tracing::info!(queue_id = %format_id(id), "message flushed");
        Ok(())
    }

    /// Deletes one message, without a DSN. A record that cannot be read
    /// is removed too (it is in no scheduler: recovery skipped it).
    pub async fn delete_message(&self, id: &str) -> Result<(), ControlError> {
        let id = id_from(id)?;
        for pool in self.spool().pools() {
            if let Err(SpoolError::Corrupt { reason, .. }) = self.spool().envelope(id, &pool) {
                self.queue.remove(id, &pool).await?;
                tracing::warn!(queue_id = %format_id(id), pool = %pool, reason = %reason, "corrupt record deleted by the operator");
                return Ok(());
            }
        }
        let envelope = match self.claim(id) {
            Ok(envelope) => envelope,
            Err(ControlError::Busy(busy)) => {
                // Removed in the cluster at the revision this relay saw
                // (its ticket then goes stale).
                let (envelope, _) = self.waiting_in_cluster(id, busy)?;
                self.queue.remove(id, &envelope.pool).await?;
                tracing::info!(queue_id = %format_id(id), pool = %envelope.pool, "message deleted by the operator (in the shared queue)");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        if let Err(e) = self.queue.remove(id, &envelope.pool).await {
            self.scheduler.enqueue(
                id,
                &envelope.pool,
                envelope.next_attempt_ms,
                envelope.mt_priority_or_default(),
            );
            return Err(e.into());
        }
        tracing::info!(queue_id = %format_id(id), pool = %envelope.pool, "message deleted by the operator");
        Ok(())
    }

    /// Moves one message to another pool, ready now.
    pub async fn move_message(&self, id: &str, to: &str) -> Result<(), ControlError> {
        let id = id_from(id)?;
        if !self.config().pools.contains_key(to) {
            return Err(ControlError::BadRequest(format!(
                "no pool {to:?} in the running config"
            )));
        }
        let mut envelope = match self.claim(id) {
            Ok(envelope) => envelope,
            Err(ControlError::Busy(busy)) => {
                // Moved in the cluster (new record and ticket first, then
                // the old key goes).
                let (mut envelope, _) = self.waiting_in_cluster(id, busy)?;
                let from = envelope.pool.clone();
                envelope.pool = to.to_string();
                envelope.next_attempt_ms = 0;
                self.spool().update(id, &from, envelope).await?;
                tracing::info!(queue_id = %format_id(id), from = %from, to, "message moved by the operator (in the shared queue)");
                return Ok(());
            }
            Err(e) => return Err(e),
        };
        let from = envelope.pool.clone();
        envelope.pool = to.to_string();
        envelope.next_attempt_ms = 0;
        self.queue.store(id, &from, envelope, 0).await?;
        tracing::info!(queue_id = %format_id(id), from = %from, to, "message moved by the operator");
        Ok(())
    }

    /// Bounces one message now: a DSN for every pending recipient, then removal.
    pub async fn bounce_message(&self, id: &str) -> Result<(), ControlError> {
        let id = id_from(id)?;
        let envelope = match self.claim(id) {
            Ok(envelope) => envelope,
            Err(ControlError::Busy(busy)) => {
                // The report, then the removal at the revision this relay
                // saw, as for mail in this relay's scheduler.
                let (envelope, _) = self.waiting_in_cluster(id, busy)?;
                return self.bounce_claimed(id, envelope).await;
            }
            Err(e) => return Err(e),
        };
        let (pool, due) = (envelope.pool.clone(), envelope.next_attempt_ms);
        let mt_priority = envelope.mt_priority_or_default();
        let result = self.bounce_claimed(id, envelope).await;
        if result.is_err() {
            // Still on disk as it was: put it back where it stood.
            self.scheduler.enqueue(id, &pool, due, mt_priority);
        }
        result
    }

    async fn bounce_claimed(
        &self,
        id: QueueId,
        mut envelope: Envelope,
    ) -> Result<(), ControlError> {
        let pending = envelope.pending_indexes();
        for r in envelope
            .recipients
            .iter_mut()
            .filter(|r| r.state == RecipientState::Pending)
        {
            r.state = RecipientState::Bounced;
            r.last_reply = Some(Reply::local(
                550,
                "5.0.0",
                "returned to sender by the postmaster",
            ));
        }
        let config = self.config();
        dsn::queue_report(
            &self.queue,
            &config.server.hostname,
            dsn::Subject {
                id,
                original: &envelope,
                recipients: &pending,
                action: dsn::Action::Failed,
                remote: "none",
            },
        )
        .await?;
        self.queue.remove(id, &envelope.pool).await?;
        tracing::info!(queue_id = %format_id(id), pool = %envelope.pool, "message bounced by the operator");
        Ok(())
    }
}
