//! Workers, the I/O shell of delivery: each `[[upstream]]` entry runs
//! `workers` of them. A worker takes the ready message its [`Picker`]
//! chooses among the pools its entry serves (priority first, a share for
//! lower pools), picks the hosts (entry, failover, site fallback unless the
//! pool refuses it; windows, health), runs the SMTP client over a reused connection, hands
//! what happened to [`delivery::decide`] and applies the decision: store or
//! remove the message, queue DSNs, log and count. No delivery policy lives
//! here; it is all in `delivery.rs`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use poolrelay_config::{Config, Upstream};
use poolrelay_smtp::outbound::{
    Client, ClientError, ConnectOptions, OutboundEnvelope, RecipientDsn,
};
use poolrelay_spool::{Envelope, Ret, format_id, now_ms};

use crate::clock::Clock;
use crate::delivery::{self, Attempt, Decision, Next, Policy};
use crate::dsn;
use crate::limits::{Limits, Membership};
use crate::metric;
use crate::queue::Queue;
use crate::scheduler::{Job, Lane, Picker};
use crate::upstream::{Dns, Health};

/// What every worker shares, whatever the config generation.
pub struct Shared {
    /// The spool and the scheduler.
    pub queue: Queue,
    /// Upstream host health.
    pub health: Arc<Health>,
    /// The one DNS resolver, with its cache.
    pub dns: Dns,
    /// The live relays sharing the rate limits.
    pub membership: Membership,
}

/// The workers of one config: replaced as a whole on reload.
pub struct Generation {
    /// The config these workers run.
    pub config: Arc<Config>,
    /// Its rate limits.
    pub limits: Limits,
    /// Its time zone, for windows.
    pub clock: Clock,
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
                metrics::gauge!(metric::UPSTREAM_CONNECTIONS.name, "pool" => pool.clone(), "upstream" => host.to_string())
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
    let config = &generation.config;
    let hosts = Hosts::new(config, &upstream);
    // The first `reserve_workers` workers keep to the urgent pools, so
    // urgent mail never waits for a bulk transaction to finish.
    let mut picker = Picker::new(
        upstream
            .pools
            .iter()
            .map(|p| Lane::new(p, config.priority_of(p), config.lower_priority_share_of(p))),
        index < upstream.reserve_workers,
    );
    // A pool that may not fall back waits while its own hosts are down;
    // their health changes with the clock (probe times), not with events.
    let may_wait_for_own_hosts = !config.defaults.fallback.is_empty()
        && upstream.pools.iter().any(|p| !config.fallback_allowed(p));
    // Windows and rate limits change with the clock, not with events: re-check often.
    let recheck = if generation.limits.any() {
        Duration::from_millis(20)
    } else if upstream.window.is_some() || may_wait_for_own_hosts {
        Duration::from_millis(500)
    } else {
        upstream.idle_timeout
    };
    let in_window = || generation.clock.is_open(upstream.window);
    let eligible = |pool: &str| {
        generation.limits.wait(pool).is_zero()
            && (config.fallback_allowed(pool)
                || hosts
                    .get(in_window(), false)
                    .iter()
                    .any(|h| shared.health.wait(h).is_zero()))
    };
    loop {
        if *stop.borrow() {
            break;
        }
        if shared.queue.spool().is_failed() {
            // Nothing could be recorded: delivering now would deliver again
            // after the recovery. Wait for the spool to come back.
            pause(&mut stop, Duration::from_millis(500)).await;
            continue;
        }
        let any_hosts = hosts.get(in_window(), true);
        if any_hosts.is_empty() {
            // Outside the window with no failover: idle, the mail waits.
            if let Some(c) = conn.take() {
                c.client.quit().await;
            }
            pause(&mut stop, Duration::from_millis(500)).await;
            continue;
        }
        let wait = any_hosts
            .iter()
            .map(|h| shared.health.wait(h))
            .min()
            .unwrap_or_default();
        if !wait.is_zero() {
            // Every host of this entry is down: leave the mail to workers
            // that can deliver it, and come back when a probe is due.
            pause(&mut stop, wait.min(Duration::from_secs(1))).await;
            continue;
        }
        let next =
            shared
                .queue
                .scheduler()
                .next(&mut picker, upstream.idle_timeout, recheck, &eligible);
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
        let job_hosts = hosts.get(in_window(), config.fallback_allowed(&job.pool));
        if job_hosts.is_empty() {
            shared.queue.scheduler().finished(&job);
            shared.queue.requeue(job.id, &job.pool, job.mt_priority);
            continue;
        }
        deliver(&shared, &generation, &upstream, job_hosts, &mut conn, &job).await;
        shared.queue.scheduler().finished(&job);
    }
    if let Some(c) = conn.take() {
        c.client.quit().await;
    }
}

/// The hosts of one entry, by window and by whether the pool may fall back.
struct Hosts {
    /// Indexed by `[in_window][fallback]`.
    lists: [[Vec<String>; 2]; 2],
}

impl Hosts {
    fn new(config: &Config, upstream: &Upstream) -> Hosts {
        let list = |open, fallback| candidate_hosts(config, upstream, open, fallback);
        Hosts {
            lists: [
                [list(false, false), list(false, true)],
                [list(true, false), list(true, true)],
            ],
        }
    }

    fn get(&self, in_window: bool, fallback: bool) -> &[String] {
        &self.lists[usize::from(in_window)][usize::from(fallback)]
    }
}

/// The hosts to try in order: the entry's host, its failover hosts, then the
/// site fallback (when `fallback`, the pool's setting), without repeats.
/// Outside the entry's window the host itself is skipped, and an entry
/// without failover hosts gets none (it idles).
pub(crate) fn candidate_hosts(
    config: &Config,
    upstream: &Upstream,
    in_window: bool,
    fallback: bool,
) -> Vec<String> {
    if !in_window && upstream.failover.is_empty() {
        return Vec::new();
    }
    let mut hosts = Vec::new();
    if in_window {
        hosts.push(upstream.host.clone());
    }
    let site: &[String] = if fallback {
        &config.defaults.fallback
    } else {
        &[]
    };
    for h in upstream.failover.iter().chain(site) {
        if !hosts.contains(h) {
            hosts.push(h.clone());
        }
    }
    hosts
}

/// Delivers one message: load it, attempt it, decide, apply.
async fn deliver(
    shared: &Shared,
    generation: &Generation,
    upstream: &Upstream,
    hosts: &[String],
    conn: &mut Option<Connection>,
    job: &Job,
) {
    let id_text = format_id(job.id);
    if let Some(queue) = shared.queue.spool().shared()
        && !queue.holds(job.id)
    {
        // Its ticket lapsed while it waited here (this relay was cut off
        // from the cluster, or frozen): another relay has it now.
        tracing::warn!(queue_id = %id_text, pool = %job.pool, "not delivered here: this relay no longer holds its ticket");
        return;
    }
    let (envelope, body) = match load(shared, job) {
        Ok(Some(found)) => found,
        Ok(None) => {
            tracing::warn!(queue_id = %id_text, pool = %job.pool, "message vanished from the spool (deleted?)");
            return;
        }
        Err(e) => {
            tracing::error!(queue_id = %id_text, pool = %job.pool, "cannot read from the spool: {e}; retrying in 60s");
            shared
                .queue
                .scheduler()
                .enqueue(job.id, &job.pool, now_ms() + 60_000, job.mt_priority);
            return;
        }
    };
    let pending = envelope.pending_indexes();
    if !pending.is_empty() {
        generation
            .limits
            .charge(&job.pool, envelope.size, pending.len());
    }
    let attempt = if pending.is_empty() {
        // Left over by a crash between the last delivery and the removal.
        Attempt::Answered {
            host: upstream.host.clone(),
            rcpt: Vec::new(),
            data: None,
        }
    } else {
        let outbound = outbound_envelope(&envelope, &pending);
        attempt(shared, generation, upstream, hosts, conn, &outbound, &body).await
    };
    let config = &generation.config;
    let policy = Policy {
        retry: config.retry_for(&job.pool),
        max_age: config.max_age_for(&job.pool),
        delay_warning: config.defaults.delay_warning,
    };
    let decision = delivery::decide(job.id, &envelope, &pending, &attempt, &policy, now_ms());
    apply(shared, generation, job, &envelope, attempt.host(), decision).await;
}

/// The transaction for the pending recipients of `envelope`.
fn outbound_envelope(envelope: &Envelope, pending: &[usize]) -> OutboundEnvelope {
    OutboundEnvelope {
        sender: envelope.sender.clone(),
        recipients: pending
            .iter()
            .map(|&i| envelope.recipients[i].address.clone())
            .collect(),
        body_8bit: envelope.body_8bit,
        smtputf8: envelope.smtputf8,
        envid: envelope.envid.clone(),
        ret_full: envelope.ret().map(|r| r == Ret::Full),
        mt_priority: envelope.mt_priority,
        dsn: pending
            .iter()
            .map(|&i| RecipientDsn {
                notify: envelope.recipients[i].notify,
                orcpt: envelope.recipients[i].orcpt.clone(),
            })
            .collect(),
    }
}

/// Carries out a decision: log, count, queue DSNs, then store, remove or
/// requeue the message.
async fn apply(
    shared: &Shared,
    generation: &Generation,
    job: &Job,
    before: &Envelope,
    host: &str,
    decision: Decision,
) {
    let id_text = format_id(job.id);
    let summary = &decision.summary;
    let age = Duration::from_millis(now_ms().saturating_sub(before.accepted_ms));
    let reply = summary
        .reply
        .as_ref()
        .map(ToString::to_string)
        .unwrap_or_default();
    tracing::info!(
        target: "poolrelay::delivery",
        queue_id = %id_text,
        pool = %job.pool,
        upstream = %host,
        delivered = summary.delivered,
        deferred = summary.deferred,
        bounced = summary.bounced,
        status = summary.outcome.as_str(),
        delay = format_args!("{:.3}", age.as_secs_f64()),
        attempt = summary.attempt,
        reply = %reply,
        "{}",
        if summary.counted {
            "delivery attempt"
        } else {
            "delivery attempt (no host reachable: back in the queue, attempt not counted)"
        }
    );
    record_metrics(&job.pool, host, summary);
    if summary.bounce_dropped {
        tracing::info!(queue_id = %id_text, "bounce of a message from <> dropped (never bounce a bounce)");
    }
    for report in &decision.reports {
        record(generation, &id_text, "a DSN", || {
            dsn::queue_report(
                &shared.queue,
                &generation.config.server.hostname,
                dsn::Subject {
                    id: job.id,
                    original: &decision.envelope,
                    recipients: &report.recipients,
                    action: report.action,
                    remote: host,
                },
            )
        })
        .await;
    }
    match decision.next {
        Next::Remove => {
            let seconds = age.as_secs_f64();
            metrics::histogram!(metric::DELIVERY_SECONDS.name, "pool" => job.pool.clone())
                .record(seconds);
            shared.queue.scheduler().delivered(&job.pool);
            record(
                generation,
                &id_text,
                "the removal of a finished message",
                || shared.queue.remove(job.id, &job.pool),
            )
            .await;
        }
        Next::Requeue => shared.queue.requeue(job.id, &job.pool, job.mt_priority),
        Next::RetryAt(due) => {
            // A deferral that decided nothing about any recipient is a small
            // unsynced attempt record; anything else rewrites the envelope.
            let attempt_only = decision.envelope.attempt_since(before);
            let recorded = record(generation, &id_text, "the attempt", || {
                let spool = shared.queue.spool();
                match &attempt_only {
                    Some(a) => spool.record_attempt(job.id, &job.pool, a.clone()),
                    None => spool.update(job.id, &job.pool, decision.envelope.clone()),
                }
            })
            .await;
            // Not recorded (stopping): the old envelope is on disk and
            // the message is retried as it was.
            if recorded {
                shared
                    .queue
                    .retry_at(job.id, &job.pool, due, job.mt_priority);
            } else {
                shared
                    .queue
                    .put_back(job.id, &job.pool, now_ms() + 60_000, job.mt_priority);
            }
        }
    }
}

/// Sleeps for `d`, or less when the generation is told to stop.
async fn pause(stop: &mut watch::Receiver<bool>, d: Duration) {
    tokio::select! {
        _ = tokio::time::sleep(d) => {}
        _ = stop.changed() => {}
    }
}

/// Writes an outcome, retrying while the spool cannot record it (a full
/// disk, a failed fsync): the worker holds the message meanwhile, so what
/// was delivered is not delivered again. Gives up only when its generation
/// stops; returns whether the write succeeded.
async fn record<F, Fut>(generation: &Generation, id_text: &str, what: &str, write: F) -> bool
where
    F: Fn() -> Fut,
    Fut: Future<Output = Result<(), poolrelay_spool::SpoolError>>,
{
    let mut stop = generation.stop.clone();
    let mut logged = false;
    loop {
        match write().await {
            Ok(()) => {
                if logged {
                    tracing::info!(queue_id = %id_text, "recorded {what} after the spool recovered");
                }
                return true;
            }
            Err(e) => {
                if !logged {
                    tracing::error!(queue_id = %id_text, "cannot record {what} in the spool: {e}; holding the message and retrying every second");
                    logged = true;
                }
                if *stop.borrow() {
                    tracing::warn!(queue_id = %id_text, "stopping before {what} could be recorded; the message stays as it was on disk");
                    return false;
                }
                pause(&mut stop, Duration::from_secs(1)).await;
            }
        }
    }
}

fn record_metrics(pool: &str, host: &str, summary: &delivery::Summary) {
    let pool = pool.to_string();
    if summary.delivered > 0 {
        metrics::counter!(metric::DELIVERED_RECIPIENTS.name, "pool" => pool.clone(), "upstream" => host.to_string()).increment(summary.delivered as u64);
    }
    if summary.deferred > 0 {
        metrics::counter!(metric::DEFERRED_RECIPIENTS.name, "pool" => pool.clone(), "upstream" => host.to_string()).increment(summary.deferred as u64);
    }
    if summary.bounced > 0 {
        metrics::counter!(metric::BOUNCED_RECIPIENTS.name, "pool" => pool)
            .increment(summary.bounced as u64);
    }
}

fn load(shared: &Shared, job: &Job) -> Result<Option<(Envelope, poolrelay_spool::Body)>, String> {
    let spool = shared.queue.spool();
    let envelope = spool
        .envelope(job.id, &job.pool)
        .map_err(|e| e.to_string())?;
    let body = spool.body(job.id).map_err(|e| e.to_string())?;
    Ok(envelope.zip(body))
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
) -> Attempt {
    let mut last_error = String::from("no upstream host available");
    for host in hosts {
        // A cached connection the upstream closed while idle is not a sick
        // host: send once more on a fresh connection before judging it.
        let mut fresh_retry = true;
        loop {
            match try_host(shared, generation, upstream, host, conn, outbound, body).await {
                HostTry::Done(attempt) => return attempt,
                HostTry::StaleConnection(error) if fresh_retry => {
                    tracing::debug!(upstream = %host, "cached connection failed ({error}); reconnecting");
                    fresh_retry = false;
                }
                HostTry::StaleConnection(error) | HostTry::Next(error) => {
                    last_error = error;
                    break;
                }
            }
        }
    }
    no_connection(shared, upstream, hosts, last_error)
}

/// What trying one host gave.
enum HostTry {
    /// An answer about the message: stop here.
    Done(Attempt),
    /// A reused connection broke: worth one fresh connection.
    StaleConnection(String),
    /// This host cannot take it now: try the next one.
    Next(String),
}

// The arguments are the worker's context plus this message and host.
#[allow(clippy::too_many_arguments)]
async fn try_host(
    shared: &Shared,
    generation: &Generation,
    upstream: &Upstream,
    host: &String,
    conn: &mut Option<Connection>,
    outbound: &OutboundEnvelope,
    body: &[u8],
) -> HostTry {
    let reuse = conn
        .as_ref()
        .is_some_and(|c| &c.host == host && c.client.is_usable());
    if !reuse {
        // Skip a down host before touching the open connection: while the
        // primary is down, the failover connection stays in use.
        if !shared.health.claim(host) {
            return HostTry::Next(format!("{host} is down; waiting for its next probe"));
        }
        if let Some(c) = conn.take() {
            c.client.quit().await;
        }
        match open(&shared.dns, generation, upstream, host).await {
            Ok(c) => {
                shared.health.mark_up(host);
                *conn = Some(c);
            }
            Err(failure) => {
                if failure.host_unwell {
                    tracing::warn!(upstream = %host, "{}; marking it down, trying the next host", failure.message);
                    shared.health.mark_down(host, &failure.message);
                } else {
                    tracing::warn!(upstream = %host, "{}; trying the next host", failure.message);
                }
                return HostTry::Next(failure.message);
            }
        }
    }
    let Some(c) = conn.as_mut() else {
        return HostTry::Next(format!("{host}: no connection"));
    };
    let reused = c.messages > 0;
    if reused && let Err(e) = c.client.rset().await {
        *conn = None;
        return HostTry::StaleConnection(format!("{host}: RSET failed: {e}"));
    }
    c.messages += 1;
    // One of our RET=FULL DSNs over the upstream's SIZE goes with the
    // original's headers only, rather than being refused for its size.
    let limit = c.client.capabilities().size.filter(|s| *s > 0);
    let shrunk = match limit {
        Some(limit) if outbound.sender.is_empty() => dsn::shrink_to_headers(body, limit),
        _ => None,
    };
    match c
        .client
        .send(outbound, shrunk.as_deref().unwrap_or(body))
        .await
    {
        Ok(report) => {
            let host = c.host.clone();
            if c.messages >= upstream.max_messages_per_connection
                && let Some(c) = conn.take()
            {
                c.client.quit().await;
            }
            HostTry::Done(Attempt::Answered {
                host,
                rcpt: report.recipients,
                data: report.data,
            })
        }
        Err(e) => {
            let addr = c.addr;
            *conn = None;
            let error = format!("{host} ({addr}): {e}");
            if reused && matches!(e, ClientError::Io(_)) {
                return HostTry::StaleConnection(error);
            }
            if e.marks_host_down() {
                tracing::warn!(upstream = %host, "{error}; marking it down, trying the next host");
                shared.health.mark_down(host, &error);
                return HostTry::Next(error);
            }
            // A whole-transaction rejection (e.g. 4xx/5xx to MAIL) is an answer
            // about this message, not about the host. A refused RSET (sent
            // pipelined before MAIL) is about the connection: try again later.
            if e.is_about_message()
                && let ClientError::Rejected { reply, .. } = e
            {
                return HostTry::Done(Attempt::Refused {
                    host: host.clone(),
                    reply,
                });
            }
            HostTry::Done(no_connection(
                shared,
                upstream,
                std::slice::from_ref(host),
                error,
            ))
        }
    }
}

/// No host took the transaction: whether every host is down now decides
/// whether the attempt counts.
fn no_connection(
    shared: &Shared,
    upstream: &Upstream,
    hosts: &[String],
    reason: String,
) -> Attempt {
    Attempt::NoConnection {
        host: upstream.host.clone(),
        reason,
        every_host_down: hosts.iter().all(|h| !shared.health.wait(h).is_zero()),
    }
}

/// Why no connection could be opened, and whether that says the host is unwell.
struct OpenFailure {
    message: String,
    /// False for our own trouble (bad credentials, unreadable password file).
    host_unwell: bool,
}

async fn open(
    dns: &Dns,
    generation: &Generation,
    upstream: &Upstream,
    host: &str,
) -> Result<Connection, OpenFailure> {
    let config = &generation.config;
    let addrs = dns
        .resolve(host, &config.server.hosts, upstream.mx)
        .await
        .map_err(|message| OpenFailure {
            message,
            host_unwell: true,
        })?;
    let mut last = OpenFailure {
        message: format!("upstream {host} has no address"),
        host_unwell: true,
    };
    for (name, addr) in addrs {
        let mut options = connect_options(upstream, &name);
        let mut result = Client::connect_with(addr, &config.server.hostname, &options).await;
        if let Err(ClientError::Tls(reason)) = &result
            && options.tls == poolrelay_config::TlsMode::Opportunistic
        {
            // Opportunistic TLS promises delivery, not secrecy: a failed
            // handshake is retried once in clear (as Postfix does at `may`),
            // or the host would stay unreachable for ever.
            tracing::warn!(upstream = %host, %addr, "TLS handshake failed ({reason}); retrying in clear, as opportunistic TLS allows");
            options.tls = poolrelay_config::TlsMode::Off;
            result = Client::connect_with(addr, &config.server.hostname, &options).await;
        }
        match result {
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
                    host_unwell: e.marks_host_down(),
                }
            }
        }
    }
    Err(last)
}

/// TLS, AUTH and timeouts for one upstream host, from its `[[upstream]]`
/// entry; `name` is what its certificate must carry.
fn connect_options(upstream: &Upstream, name: &str) -> ConnectOptions {
    let server_name = name.trim_matches(['[', ']']).to_string();
    ConnectOptions {
        tls: upstream.tls,
        verify: upstream.tls_verify,
        server_name,
        ca_file: upstream.tls_ca_file.clone(),
        auth: upstream.auth.clone(),
        timeouts: upstream.timeouts,
    }
}
