//! Workers: each `[[upstream]]` entry runs `workers` of them. A worker takes
//! the oldest ready message of the pools its entry serves, delivers the
//! pending recipients over a reused connection, and records the outcome per
//! recipient: 2xx done, 4xx deferred on the pool's retry schedule, 5xx bounced.
//! A message leaves the spool only when no recipient is pending.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use poolrelay_config::{Config, Upstream};
use poolrelay_smtp::Reply;
use poolrelay_smtp::outbound::{Client, ClientError, OutboundEnvelope, Timeouts};
use poolrelay_spool::{Envelope, FjallSpool, QueueId, RecipientState, Spool, format_id, now_ms};

use crate::dsn;
use crate::scheduler::{Job, Scheduler};
use crate::upstream::{Health, resolve};

/// What every worker shares.
pub struct Shared {
    /// The running config.
    pub config: Arc<Config>,
    /// The spool.
    pub spool: FjallSpool,
    /// The in-memory index.
    pub scheduler: Arc<Scheduler>,
    /// Upstream host health.
    pub health: Arc<Health>,
}

/// An open connection and where it goes.
struct Connection {
    client: Client,
    host: String,
    addr: SocketAddr,
    messages: usize,
}

/// One worker's loop; runs until the task is aborted.
pub async fn run(shared: Arc<Shared>, upstream: Upstream, index: usize) {
    let mut conn: Option<Connection> = None;
    let hosts = candidate_hosts(&shared.config, &upstream);
    loop {
        let Some(job) = shared
            .scheduler
            .next(&upstream.pools, upstream.idle_timeout)
            .await
        else {
            if let Some(c) = conn.take() {
                tracing::debug!(upstream = %c.host, worker = index, "closing idle connection");
                c.client.quit().await;
            }
            continue;
        };
        deliver(&shared, &upstream, &hosts, &mut conn, &job).await;
        shared.scheduler.finished(&job);
    }
}

/// The hosts to try in order: the entry's host, its failover hosts, then the
/// site fallback, without repeats.
fn candidate_hosts(config: &Config, upstream: &Upstream) -> Vec<String> {
    let mut hosts = vec![upstream.host.clone()];
    for h in upstream.failover.iter().chain(&config.defaults.fallback) {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    hosts
}

/// Outcome of one attempt over one connection.
enum Attempt {
    /// The upstream answered the transaction (per-recipient replies applied).
    Answered { host: String },
    /// No host could take it; the reason for the log and the envelope.
    NoHost(String),
}

async fn deliver(
    shared: &Shared,
    upstream: &Upstream,
    hosts: &[String],
    conn: &mut Option<Connection>,
    job: &Job,
) {
    let id_text = format_id(job.id);
    let (mut envelope, body) = match load(shared, job) {
        Ok(Some(found)) => found,
        Ok(None) => {
            tracing::warn!(queue_id = %id_text, pool = %job.pool, "message vanished from the spool (deleted?)");
            return;
        }
        Err(e) => {
            tracing::error!(queue_id = %id_text, pool = %job.pool, "cannot read from the spool: {e}; retrying in 60s");
            shared
                .scheduler
                .enqueue(job.id, &job.pool, now_ms() + 60_000);
            return;
        }
    };
    let pending: Vec<usize> = envelope
        .recipients
        .iter()
        .enumerate()
        .filter(|(_, r)| r.state == RecipientState::Pending)
        .map(|(i, _)| i)
        .collect();
    if pending.is_empty() {
        finish(shared, job, &envelope).await;
        return;
    }
    let outbound = OutboundEnvelope {
        sender: envelope.sender.clone(),
        recipients: pending
            .iter()
            .map(|&i| envelope.recipients[i].address.clone())
            .collect(),
        body_8bit: envelope.body_8bit,
        smtputf8: envelope.smtputf8,
    };
    envelope.attempts += 1;
    let mut counts = Counts::default();
    let attempt = attempt(
        shared,
        upstream,
        hosts,
        conn,
        &outbound,
        &body,
        &mut |i, reply| {
            let rcpt = &mut envelope.recipients[pending[i]];
            rcpt.last_reply = Some(reply.to_string());
            if reply.is_positive() {
                rcpt.state = RecipientState::Delivered;
                counts.done += 1;
            } else if reply.is_permanent() {
                rcpt.state = RecipientState::Bounced;
                counts.bounced += 1;
            } else {
                counts.deferred += 1;
            }
        },
    )
    .await;
    let (host, last_reply) = match &attempt {
        Attempt::Answered { host } => (host.clone(), summary_reply(&envelope)),
        Attempt::NoHost(reason) => {
            for &i in &pending {
                envelope.recipients[i].last_reply = Some(reason.clone());
            }
            counts.deferred = pending.len();
            (upstream.host.clone(), reason.clone())
        }
    };
    let delay = now_ms().saturating_sub(envelope.accepted_ms) as f64 / 1000.0;
    let expired = !envelope.is_done()
        && Duration::from_millis(now_ms().saturating_sub(envelope.accepted_ms))
            >= shared.config.max_age_for(&job.pool);
    if expired {
        for r in envelope
            .recipients
            .iter_mut()
            .filter(|r| r.state == RecipientState::Pending)
        {
            r.state = RecipientState::Bounced;
            r.last_reply = Some(format!(
                "4.4.7 message expired after {:.0}s in the queue; last reply: {}",
                delay,
                r.last_reply.as_deref().unwrap_or("none")
            ));
            counts.bounced += 1;
            counts.deferred = counts.deferred.saturating_sub(1);
        }
    }
    let status = if expired {
        "expired"
    } else if counts.deferred > 0 {
        "deferred"
    } else if counts.bounced > 0 {
        "bounced"
    } else {
        "sent"
    };
    tracing::info!(
        target: "poolrelay::delivery",
        queue_id = %id_text,
        pool = %job.pool,
        upstream = %host,
        done = counts.done,
        deferred = counts.deferred,
        bounced = counts.bounced,
        status,
        delay = format_args!("{delay:.3}"),
        attempt = envelope.attempts,
        reply = %last_reply,
        "delivery attempt"
    );
    if counts.bounced > 0 {
        bounce(shared, job.id, &envelope, &host).await;
    }
    if envelope.is_done() {
        finish(shared, job, &envelope).await;
    } else {
        let due = next_attempt(&shared.config, &job.pool, envelope.attempts);
        envelope.next_attempt_ms = due;
        if let Err(e) = shared.spool.update(job.id, &job.pool, envelope).await {
            // The old envelope is still on disk: at worst some recipients get it twice.
            tracing::error!(queue_id = %id_text, "cannot record the attempt in the spool: {e}");
        }
        shared.scheduler.enqueue(job.id, &job.pool, due);
    }
}

#[derive(Default)]
struct Counts {
    done: usize,
    deferred: usize,
    bounced: usize,
}

/// The reply worth logging: the last one seen on a recipient still pending,
/// else on any recipient.
fn summary_reply(envelope: &Envelope) -> String {
    envelope
        .pending()
        .chain(envelope.recipients.iter())
        .find_map(|r| r.last_reply.clone())
        .unwrap_or_default()
}

fn load(shared: &Shared, job: &Job) -> Result<Option<(Envelope, poolrelay_spool::Body)>, String> {
    let envelope = shared
        .spool
        .envelope(job.id, &job.pool)
        .map_err(|e| e.to_string())?;
    let body = shared.spool.body(job.id).map_err(|e| e.to_string())?;
    Ok(envelope.zip(body))
}

async fn finish(shared: &Shared, job: &Job, _envelope: &Envelope) {
    if let Err(e) = shared.spool.remove(job.id, &job.pool).await {
        tracing::error!(queue_id = %format_id(job.id), "cannot remove a delivered message from the spool: {e}; it may be sent again after a restart");
    }
}

/// Queues a DSN for the recipients that just bounced, unless the sender is `<>`.
async fn bounce(shared: &Shared, id: QueueId, envelope: &Envelope, remote: &str) {
    if envelope.sender.is_empty() {
        tracing::info!(queue_id = %format_id(id), "bounce of a message from <> dropped (never bounce a bounce)");
        return;
    }
    let body = match shared.spool.body(id) {
        Ok(Some(b)) => b,
        _ => return,
    };
    let Some((dsn_envelope, dsn_message)) =
        dsn::failure(&shared.config.server.hostname, id, envelope, remote, &body)
    else {
        return;
    };
    match shared.spool.append(dsn_envelope, dsn_message).await {
        Ok(dsn_id) => {
            tracing::info!(queue_id = %format_id(id), dsn = %format_id(dsn_id), to = %envelope.sender, "DSN queued in pool -");
            shared
                .scheduler
                .enqueue(dsn_id, poolrelay_config::DEFAULT_POOL, 0);
        }
        Err(e) => tracing::error!(queue_id = %format_id(id), "cannot queue the DSN: {e}"),
    }
}

/// When to try again: the pool's schedule step for this attempt (the last
/// step repeats), with ±10% jitter so retries of a burst spread out.
fn next_attempt(config: &Config, pool: &str, attempts: u32) -> u64 {
    let schedule = config.retry_for(pool);
    let step = schedule
        .get((attempts as usize).saturating_sub(1))
        .or(schedule.last())
        .copied()
        .unwrap_or(Duration::from_secs(60));
    let ms = step.as_millis() as u64;
    let jitter = (now_ms() ^ (attempts as u64).wrapping_mul(0x9E37_79B9)) % (ms / 5 + 1);
    now_ms() + ms - ms / 10 + jitter
}

async fn attempt(
    shared: &Shared,
    upstream: &Upstream,
    hosts: &[String],
    conn: &mut Option<Connection>,
    outbound: &OutboundEnvelope,
    body: &[u8],
    apply: &mut (dyn FnMut(usize, &Reply) + Send),
) -> Attempt {
    let mut last_error = String::from("no upstream host available");
    for host in hosts {
        let reuse = conn.as_ref().is_some_and(|c| &c.host == host);
        if !reuse {
            if let Some(c) = conn.take() {
                c.client.quit().await;
            }
            if !shared.health.claim(host) {
                last_error = format!("{host} is down; waiting for its next probe");
                continue;
            }
            match open(shared, upstream, host).await {
                Ok(c) => {
                    shared.health.mark_up(host);
                    *conn = Some(c);
                }
                Err(e) => {
                    tracing::warn!(upstream = %host, "{e}; trying the next host");
                    shared.health.mark_down(host);
                    last_error = e;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        if c.messages > 0
            && let Err(e) = c.client.rset().await
        {
            tracing::debug!(upstream = %host, "RSET failed ({e}); reconnecting");
            *conn = None;
            match open(shared, upstream, host).await {
                Ok(fresh) => *conn = Some(fresh),
                Err(e) => {
                    shared.health.mark_down(host);
                    last_error = e;
                    continue;
                }
            }
        }
        let Some(c) = conn.as_mut() else { continue };
        c.messages += 1;
        match c.client.send(outbound, body).await {
            Ok(report) => {
                for i in 0..report.recipients.len() {
                    // A reply to DATA applies to every recipient it covered.
                    if let Some(reply) = report.outcome(i) {
                        apply(i, reply);
                    }
                }
                let host = c.host.clone();
                if c.messages >= upstream.max_messages_per_connection {
                    if let Some(c) = conn.take() {
                        c.client.quit().await;
                    }
                }
                return Attempt::Answered { host };
            }
            Err(e) => {
                let addr = c.addr;
                *conn = None;
                last_error = format!("{host} ({addr}): {e}");
                if marks_down(&e) {
                    tracing::warn!(upstream = %host, "{last_error}; marking it down, trying the next host");
                    shared.health.mark_down(host);
                    continue;
                }
                // A whole-transaction rejection (e.g. 4xx/5xx to MAIL) is an answer
                // about this message, not about the host.
                if let ClientError::Rejected { reply, .. } = &e {
                    for i in 0..outbound.recipients.len() {
                        apply(i, reply);
                    }
                    return Attempt::Answered { host: host.clone() };
                }
                return Attempt::NoHost(last_error);
            }
        }
    }
    Attempt::NoHost(last_error)
}

/// Connection-level failures say the host is unwell: connect errors,
/// timeouts, broken connections and 421.
fn marks_down(e: &ClientError) -> bool {
    match e {
        ClientError::Connect { .. } | ClientError::Timeout { .. } | ClientError::Io(_) => true,
        ClientError::Rejected { reply, .. } => reply.code == 421,
    }
}

async fn open(shared: &Shared, upstream: &Upstream, host: &str) -> Result<Connection, String> {
    let addrs = resolve(host, &shared.config.server.hosts).await?;
    let timeouts = Timeouts {
        connect: upstream.connect_timeout,
        ..Timeouts::default()
    };
    let mut last = String::new();
    for addr in addrs {
        match Client::connect(addr, &shared.config.server.hostname, timeouts).await {
            Ok(client) => {
                return Ok(Connection {
                    client,
                    host: host.to_string(),
                    addr,
                    messages: 0,
                });
            }
            Err(e) => last = format!("upstream {host} ({addr}): {e}"),
        }
    }
    Err(last)
}
