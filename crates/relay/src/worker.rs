//! Workers: each `[[upstream]]` entry runs `workers` of them. A worker takes
//! the oldest ready message of the pools its entry serves, delivers the
//! pending recipients over a reused connection, and records the outcome per
//! recipient: 2xx done, 4xx deferred on the pool's retry schedule, 5xx bounced.
//! A message leaves the spool only when no recipient is pending.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use poolrelay_config::{Config, TlsMode, Upstream};
use poolrelay_smtp::Reply;
use poolrelay_smtp::outbound::{
    Client, ClientError, ConnectOptions, Credentials, OutboundEnvelope, RecipientDsn, Timeouts,
    TlsMode as SmtpTls,
};
use poolrelay_spool::{Envelope, FjallSpool, RecipientState, Spool, format_id, now_ms};

use crate::dsn;
use crate::limits::Limits;
use crate::scheduler::{Job, Scheduler};
use crate::upstream::{Health, resolve};

/// What every worker shares, whatever the config generation.
pub struct Shared {
    /// The spool.
    pub spool: FjallSpool,
    /// The in-memory index.
    pub scheduler: Arc<Scheduler>,
    /// Upstream host health.
    pub health: Arc<Health>,
}

/// The workers of one config: replaced as a whole on reload.
pub struct Generation {
    /// The config these workers run.
    pub config: Arc<Config>,
    /// Its rate limits.
    pub limits: Limits,
    /// Becomes true when these workers must finish their message and stop.
    pub stop: watch::Receiver<bool>,
}

/// An open connection and where it goes.
struct Connection {
    client: Client,
    host: String,
    addr: SocketAddr,
    messages: usize,
    _counted: Counted,
}

/// Keeps `poolrelay_upstream_connections` right however a connection ends.
/// A connection counts once for each pool its workers serve: it is a
/// connection available to each of them.
struct Counted(Vec<metrics::Gauge>);

impl Counted {
    fn new(pools: &[String], host: &str) -> Counted {
        let gauges: Vec<metrics::Gauge> = pools
            .iter()
            .map(|pool| {
                metrics::gauge!("poolrelay_upstream_connections", "pool" => pool.clone(), "upstream" => host.to_string())
            })
            .collect();
        for g in &gauges {
            g.increment(1.0);
        }
        Counted(gauges)
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        for g in &self.0 {
            g.decrement(1.0);
        }
    }
}

/// One worker's loop; returns when its generation is told to stop, after
/// finishing the message in hand.
pub async fn run(
    shared: Arc<Shared>,
    generation: Arc<Generation>,
    upstream: Upstream,
    index: usize,
) {
    let mut conn: Option<Connection> = None;
    let mut stop = generation.stop.clone();
    let all_hosts = candidate_hosts(&generation.config, &upstream, true);
    let off_window_hosts = candidate_hosts(&generation.config, &upstream, false);
    // Windows and rate limits change with the clock, not with events: re-check often.
    let recheck = if generation.limits.any() {
        Duration::from_millis(20)
    } else if upstream.window.is_some() {
        Duration::from_millis(500)
    } else {
        upstream.idle_timeout
    };
    let eligible = |pool: &str| generation.limits.wait(pool).is_zero();
    loop {
        if *stop.borrow() {
            break;
        }
        let in_window = |u: &Upstream| u.window.is_none_or(|w| w.contains(local_minute_of_day()));
        let hosts = if in_window(&upstream) {
            &all_hosts
        } else {
            &off_window_hosts
        };
        if hosts.is_empty() {
            // Outside the window with no failover: idle, the mail waits.
            if let Some(c) = conn.take() {
                c.client.quit().await;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let wait = hosts
            .iter()
            .map(|h| shared.health.wait(h))
            .min()
            .unwrap_or_default();
        if !wait.is_zero() {
            // Every host of this entry is down: leave the mail to workers
            // that can deliver it, and come back when a probe is due.
            tokio::select! {
                _ = tokio::time::sleep(wait.min(Duration::from_secs(1))) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let next =
            shared
                .scheduler
                .next(&upstream.pools, upstream.idle_timeout, recheck, &eligible);
        let job = tokio::select! {
            job = next => job,
            _ = stop.changed() => None,
        };
        let Some(job) = job else {
            if let Some(c) = conn.take() {
                tracing::debug!(upstream = %c.host, worker = index, "closing idle connection");
                c.client.quit().await;
            }
            continue;
        };
        // The wait for a job can outlast a window edge: decide the hosts
        // again now, so an edge takes effect for the very next message.
        let hosts = if in_window(&upstream) {
            &all_hosts
        } else {
            &off_window_hosts
        };
        if hosts.is_empty() {
            shared.scheduler.finished(&job);
            shared.scheduler.enqueue(job.id, &job.pool, 0);
            continue;
        }
        deliver(&shared, &generation, &upstream, hosts, &mut conn, &job).await;
        shared.scheduler.finished(&job);
    }
    if let Some(c) = conn.take() {
        c.client.quit().await;
    }
}

/// Minute of the day in local time (`TZ`, which `server.timezone` sets), for windows.
fn local_minute_of_day() -> u16 {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes only into the tm we own; both pointers are valid.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let ok = unsafe { !libc::localtime_r(&now, &mut tm).is_null() };
    if !ok {
        return ((now / 60) % 1440) as u16;
    }
    (tm.tm_hour * 60 + tm.tm_min) as u16
}

/// The hosts to try in order: the entry's host, its failover hosts, then the
/// site fallback, without repeats. Outside the entry's window the host itself
/// is skipped, and an entry without failover hosts gets none (it idles).
fn candidate_hosts(config: &Config, upstream: &Upstream, in_window: bool) -> Vec<String> {
    if !in_window && upstream.failover.is_empty() {
        return Vec::new();
    }
    let mut hosts = Vec::new();
    if in_window {
        hosts.push(upstream.host.clone());
    }
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
    generation: &Generation,
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
    let pending = envelope.pending_indexes();
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
        envid: envelope.envid.clone(),
        ret_full: envelope.ret_full.then_some(true),
        dsn: pending
            .iter()
            .map(|&i| RecipientDsn {
                notify: envelope.recipients[i].notify,
                orcpt: envelope.recipients[i].orcpt.clone(),
            })
            .collect(),
    };
    envelope.attempts += 1;
    generation
        .limits
        .charge(&job.pool, envelope.size, pending.len());
    let mut counts = Counts::default();
    let attempt = attempt(
        shared,
        generation,
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
            let age = Duration::from_millis(now_ms().saturating_sub(envelope.accepted_ms));
            let all_down = hosts.iter().all(|h| !shared.health.wait(h).is_zero());
            if all_down && age < generation.config.max_age_for(&job.pool) {
                // Every host of this entry is down: that says nothing about the
                // message. It goes back as ready, without spending an attempt,
                // for workers whose hosts are up; this entry's workers idle
                // until a probe is due (see `run`).
                let pending_count = pending.len();
                tracing::info!(
                    target: "poolrelay::delivery",
                    queue_id = %id_text,
                    pool = %job.pool,
                    upstream = %upstream.host,
                    done = 0,
                    deferred = pending_count,
                    bounced = 0,
                    status = "deferred",
                    delay = format_args!("{:.3}", age.as_secs_f64()),
                    attempt = envelope.attempts - 1,
                    reply = %reason,
                    "delivery attempt (no host reachable: back in the queue, attempt not counted)"
                );
                metrics::counter!("poolrelay_deferred_recipients_total", "pool" => job.pool.clone(), "upstream" => upstream.host.clone()).increment(pending_count as u64);
                shared.scheduler.enqueue(job.id, &job.pool, 0);
                return;
            }
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
            >= generation.config.max_age_for(&job.pool);
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
    record_metrics(&job.pool, &host, &counts);
    let hostname = &generation.config.server.hostname;
    let bounced_now: Vec<usize> = pending
        .iter()
        .copied()
        .filter(|&i| envelope.recipients[i].state == RecipientState::Bounced)
        .collect();
    if !bounced_now.is_empty() {
        dsn::queue_report(
            &shared.spool,
            &shared.scheduler,
            hostname,
            dsn::Subject {
                id: job.id,
                original: &envelope,
                recipients: &bounced_now,
                action: dsn::Action::Failed,
                remote: &host,
            },
        )
        .await;
    }
    if let Some(warn_after) = generation.config.defaults.delay_warning
        && !envelope.delay_warned
        && !envelope.is_done()
        && Duration::from_millis(now_ms().saturating_sub(envelope.accepted_ms)) >= warn_after
    {
        let still: Vec<usize> = pending
            .iter()
            .copied()
            .filter(|&i| envelope.recipients[i].state == RecipientState::Pending)
            .collect();
        dsn::queue_report(
            &shared.spool,
            &shared.scheduler,
            hostname,
            dsn::Subject {
                id: job.id,
                original: &envelope,
                recipients: &still,
                action: dsn::Action::Delayed,
                remote: &host,
            },
        )
        .await;
        envelope.delay_warned = true;
    }
    if envelope.is_done() {
        finish(shared, job, &envelope).await;
    } else {
        let due = next_attempt(&generation.config, &job.pool, envelope.attempts);
        envelope.next_attempt_ms = due;
        if let Err(e) = shared.spool.update(job.id, &job.pool, envelope).await {
            // The old envelope is still on disk: at worst some recipients get it twice.
            tracing::error!(queue_id = %id_text, "cannot record the attempt in the spool: {e}");
        }
        shared.scheduler.enqueue(job.id, &job.pool, due);
    }
}

fn record_metrics(pool: &str, host: &str, counts: &Counts) {
    let pool = pool.to_string();
    if counts.done > 0 {
        metrics::counter!("poolrelay_delivered_recipients_total", "pool" => pool.clone(), "upstream" => host.to_string()).increment(counts.done as u64);
    }
    if counts.deferred > 0 {
        metrics::counter!("poolrelay_deferred_recipients_total", "pool" => pool.clone(), "upstream" => host.to_string()).increment(counts.deferred as u64);
    }
    if counts.bounced > 0 {
        metrics::counter!("poolrelay_bounced_recipients_total", "pool" => pool)
            .increment(counts.bounced as u64);
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

async fn finish(shared: &Shared, job: &Job, envelope: &Envelope) {
    let seconds = now_ms().saturating_sub(envelope.accepted_ms) as f64 / 1000.0;
    metrics::histogram!("poolrelay_delivery_seconds", "pool" => job.pool.clone()).record(seconds);
    shared.scheduler.delivered(&job.pool);
    if let Err(e) = shared.spool.remove(job.id, &job.pool).await {
        tracing::error!(queue_id = %format_id(job.id), "cannot remove a delivered message from the spool: {e}; it may be sent again after a restart");
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

// The arguments are the worker's context plus this message; bundling them
// would only move the list elsewhere.
#[allow(clippy::too_many_arguments)]
async fn attempt(
    shared: &Shared,
    generation: &Generation,
    upstream: &Upstream,
    hosts: &[String],
    conn: &mut Option<Connection>,
    outbound: &OutboundEnvelope,
    body: &[u8],
    apply: &mut (dyn FnMut(usize, &Reply) + Send),
) -> Attempt {
    let mut last_error = String::from("no upstream host available");
    for host in hosts {
        let reuse = conn
            .as_ref()
            .is_some_and(|c| &c.host == host && c.client.is_usable());
        if !reuse {
            // Skip a down host before touching the open connection: while the
            // primary is down, the failover connection stays in use.
            if !shared.health.claim(host) {
                last_error = format!("{host} is down; waiting for its next probe");
                continue;
            }
            if let Some(c) = conn.take() {
                c.client.quit().await;
            }
            match open(generation, upstream, host).await {
                Ok(c) => {
                    shared.health.mark_up(host);
                    *conn = Some(c);
                }
                Err(failure) => {
                    if failure.host_unwell {
                        tracing::warn!(upstream = %host, "{}; marking it down, trying the next host", failure.message);
                        shared.health.mark_down(host);
                    } else {
                        tracing::warn!(upstream = %host, "{}; trying the next host", failure.message);
                    }
                    last_error = failure.message;
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
            match open(generation, upstream, host).await {
                Ok(fresh) => *conn = Some(fresh),
                Err(failure) => {
                    if failure.host_unwell {
                        shared.health.mark_down(host);
                    }
                    last_error = failure.message;
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
                if c.messages >= upstream.max_messages_per_connection
                    && let Some(c) = conn.take()
                {
                    c.client.quit().await;
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
                // about this message, not about the host. A refused RSET (sent
                // pipelined before MAIL) is about the connection: try again later.
                if let ClientError::Rejected { reply, stage } = &e
                    && *stage != "RSET"
                {
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
        ClientError::Connect { .. }
        | ClientError::Timeout { .. }
        | ClientError::Io(_)
        | ClientError::Tls(_) => true,
        // Bad credentials are our configuration's fault, not the host's health.
        ClientError::Auth(_) => false,
        ClientError::Rejected { reply, .. } => reply.code == 421,
    }
}

/// Why no connection could be opened, and whether that says the host is unwell.
struct OpenFailure {
    message: String,
    /// False for our own trouble (bad credentials, unreadable password file).
    host_unwell: bool,
}

async fn open(
    generation: &Generation,
    upstream: &Upstream,
    host: &str,
) -> Result<Connection, OpenFailure> {
    let config = &generation.config;
    let addrs = resolve(host, &config.server.hosts, upstream.mx)
        .await
        .map_err(|message| OpenFailure {
            message,
            host_unwell: true,
        })?;
    let options = connect_options(upstream, host).map_err(|message| OpenFailure {
        message,
        host_unwell: false,
    })?;
    let mut last = OpenFailure {
        message: format!("upstream {host} has no address"),
        host_unwell: true,
    };
    for addr in addrs {
        match Client::connect_with(addr, &config.server.hostname, &options).await {
            Ok(client) => {
                tracing::debug!(upstream = %host, %addr, tls = client.is_tls(), "connected");
                return Ok(Connection {
                    client,
                    host: host.to_string(),
                    addr,
                    messages: 0,
                    _counted: Counted::new(&upstream.pools, host),
                });
            }
            Err(e) => {
                last = OpenFailure {
                    message: format!("upstream {host} ({addr}): {e}"),
                    host_unwell: marks_down(&e),
                }
            }
        }
    }
    Err(last)
}

/// TLS, AUTH and timeouts for one upstream host, from its `[[upstream]]` entry.
fn connect_options(upstream: &Upstream, host: &str) -> Result<ConnectOptions, String> {
    let t = upstream.timeouts;
    let auth = match &upstream.auth {
        Some(a) => {
            let password = std::fs::read_to_string(&a.password_file).map_err(|e| {
                format!(
                    "cannot read auth.password_file {} for upstream {host}: {e}",
                    a.password_file.display()
                )
            })?;
            Some(Credentials {
                username: a.username.clone(),
                password: password.trim_end_matches(['\r', '\n']).to_string(),
                allow_plaintext: upstream.auth_plaintext,
            })
        }
        None => None,
    };
    let server_name = host
        .rsplit_once(':')
        .map_or(host, |(name, _)| name)
        .trim_matches(['[', ']'])
        .to_string();
    Ok(ConnectOptions {
        tls: match upstream.tls {
            TlsMode::Opportunistic => SmtpTls::Opportunistic,
            TlsMode::Required => SmtpTls::Required,
            TlsMode::Implicit => SmtpTls::Implicit,
            TlsMode::Off => SmtpTls::Off,
        },
        verify: upstream.tls_verify,
        server_name,
        ca_file: upstream.tls_ca_file.clone(),
        auth,
        timeouts: Timeouts {
            connect: upstream.connect_timeout,
            greeting: t.greeting,
            ehlo: t.ehlo,
            mail: t.mail,
            rcpt: t.rcpt,
            data_init: t.data_init,
            data_block: t.data_block,
            data_end: t.data_end,
        },
    })
}
