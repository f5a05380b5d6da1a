//! Listeners: accept SMTP connections, run one [`Session`] per connection,
//! classify each finished transaction and append it to the spool. The 250
//! for the final dot is written only after the spool says the message is
//! fsynced; a spool failure answers `452 4.3.1` and nothing is queued.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use poolrelay_config::{Config, Listener, ListenerTlsMode};
use poolrelay_smtp::driver::{self, Handler};
use poolrelay_smtp::inbound::{
    AuthAttempt, AuthVerdict, Security, Session, SessionConfig, Transaction, log_safe,
};
use poolrelay_spool::{Envelope, Recipient, format_id};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::classifier::{Classifier, Facts};
use crate::metric;
use crate::queue::Queue;
use crate::signing::{Arrival, Signing, Stamp};

/// The config and routes sessions use; swapped whole on reload, so a
/// session sees either the old or the new one, never a mix.
pub struct Rules {
    /// The running config.
    pub config: Arc<Config>,
    /// Its routes.
    pub classifier: Classifier,
    /// Its DKIM signers and ARC sealers.
    pub signing: Signing,
}

impl Rules {
    /// The routes and signers of `config`.
    pub fn new(config: Arc<Config>) -> Rules {
        Rules {
            classifier: Classifier::new(&config),
            signing: Signing::new(&config),
            config,
        }
    }
}

/// What every session of every listener shares.
pub struct Inbound {
    /// Current config and routes.
    pub rules: RwLock<Arc<Rules>>,
    /// Where accepted mail goes.
    pub queue: Queue,
    /// Caps concurrent sessions over all listeners (`server.max_sessions`).
    pub sessions: Arc<Semaphore>,
    /// Open sessions per client address (`server.max_sessions_per_client`).
    pub per_client: Arc<Mutex<HashMap<IpAddr, usize>>>,
    /// Becomes true when the relay stops accepting.
    pub stopping: watch::Receiver<bool>,
    /// Memory for message content over all sessions (`server.max_data_memory`).
    pub content: Arc<ContentBudget>,
    /// Failed AUTHs per client address.
    pub auth_failures: crate::auth::Failures,
}

/// Memory held by message content in flight over every session: DATA
/// being received and messages being written to the spool. A session whose
/// content would pass the limit has its message read to the end, dropped
/// and refused with 452 4.3.1, so a crowd of large uploads cannot take the
/// relay's memory. Cost: one atomic per 256 KiB received.
pub struct ContentBudget {
    limit: usize,
    used: AtomicUsize,
}

impl ContentBudget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> ContentBudget {
        ContentBudget {
            limit: usize::try_from(limit).unwrap_or(usize::MAX),
            used: AtomicUsize::new(0),
        }
    }

    /// Bytes charged now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    fn try_take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.limit)
            })
            .is_ok()
    }

    fn give(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// What one session holds of the [`ContentBudget`]; given back on drop.
struct Charge<'a> {
    budget: &'a ContentBudget,
    held: usize,
}

/// Content is charged in steps of this many bytes.
const CHARGE_STEP: usize = 256 * 1024;

impl Charge<'_> {
    /// Covers the session's content; refuses it when the budget is spent.
    fn cover(&mut self, session: &mut Session) {
        let want = session.content_len();
        if want <= self.held {
            return;
        }
        let step = (want - self.held).next_multiple_of(CHARGE_STEP);
        if self.budget.try_take(step) {
            self.held += step;
        } else {
            session.refuse_content(b"452 4.3.1 insufficient system storage, try again later\r\n");
            self.release();
        }
    }

    /// Takes `n` more bytes, or nothing when the budget cannot give them.
    fn take(&mut self, n: usize) -> bool {
        let taken = self.budget.try_take(n);
        if taken {
            self.held += n;
        }
        taken
    }

    fn release(&mut self) {
        self.budget.give(self.held);
        self.held = 0;
    }
}

impl Drop for Charge<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Binds every configured listener, failing with the address on error.
pub async fn bind_all(config: &Config) -> anyhow::Result<Vec<(Listener, TcpListener)>> {
    let mut bound = Vec::new();
    for l in &config.listeners {
        let socket = TcpListener::bind(l.address).await.map_err(|e| {
            anyhow::anyhow!(
                "cannot listen on {} (listener {:?}): {e}",
                l.address,
                l.name
            )
        })?;
        bound.push((l.clone(), socket));
    }
    Ok(bound)
}

impl Inbound {
    /// The current rules.
    pub fn rules(&self) -> Arc<Rules> {
        self.rules.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Counts one more session from `ip` unless it already has `max`.
    fn claim_client_slot(&self, ip: IpAddr, max: usize) -> Option<ClientSlot> {
        let mut map = self.per_client.lock().unwrap_or_else(|e| e.into_inner());
        let open = map.entry(ip).or_insert(0);
        if *open >= max {
            return None;
        }
        *open += 1;
        Some(ClientSlot {
            map: self.per_client.clone(),
            ip,
        })
    }
}

/// One session counted against its client address; uncounted on drop.
struct ClientSlot {
    map: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(open) = map.get_mut(&self.ip) {
            *open -= 1;
            if *open == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Accepts connections until the task is dropped. Once the relay is
/// stopping, new connections get `421 4.3.2` while running sessions finish.
pub async fn serve(inbound: Arc<Inbound>, listener: Listener, socket: TcpListener) {
    let listener = Arc::new(listener);
    loop {
        let accepted = socket.accept().await;
        let (stream, peer) = match accepted {
            // An IPv4 client of a dual-stack listener arrives as
            // ::ffff:a.b.c.d; it is the IPv4 client for every rule.
            Ok((stream, peer)) => (
                stream,
                SocketAddr::new(peer.ip().to_canonical(), peer.port()),
            ),
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %listener.name, "accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let inbound = inbound.clone();
        let listener = listener.clone();
        tokio::spawn(async move {
            let rules = inbound.rules();
            let hostname = rules.config.server.hostname.clone();
            let per_client = rules.config.server.max_sessions_per_client;
            drop(rules);
            if *inbound.stopping.borrow() {
                refuse(
                    stream,
                    &format!("421 4.3.2 {hostname} shutting down, try again later"),
                )
                .await;
                return;
            }
            // Clients allowed to relay (the list server) are exempt, as
            // Postfix exempts $mynetworks from its per-client limits: the
            // cap is for strangers, not for the one host that sends the mail.
            let trusted = listener
                .relay_from
                .iter()
                .any(|net| net.contains(&peer.ip()));
            let client_slot = if trusted {
                None
            } else {
                match inbound.claim_client_slot(peer.ip(), per_client) {
                    Some(slot) => Some(slot),
                    None => {
                        metrics::counter!(metric::SMTP_REJECTIONS.name, "listener" => listener.name.clone(), "reason" => metric::TOO_MANY_SESSIONS_PER_CLIENT).increment(1);
                        refuse(
                            stream,
                            &format!("421 4.7.0 {hostname} too many connections from your address"),
                        )
                        .await;
                        return;
                    }
                }
            };
            let Ok(permit) = inbound.sessions.clone().try_acquire_owned() else {
                metrics::counter!(metric::SMTP_REJECTIONS.name, "listener" => listener.name.clone(), "reason" => metric::TOO_MANY_SESSIONS).increment(1);
                refuse(
                    stream,
                    &format!("421 4.3.2 {hostname} too many connections, try again later"),
                )
                .await;
                return;
            };
            let gauge =
                metrics::gauge!(metric::SMTP_SESSIONS.name, "listener" => listener.name.clone());
            gauge.increment(1.0);
            if let Err(e) = session(&inbound, &listener, stream, peer).await {
                tracing::debug!(listener = %listener.name, client = %peer, "session ended: {e}");
            }
            gauge.decrement(1.0);
            drop(permit);
            drop(client_slot);
        });
    }
}

async fn refuse(mut stream: TcpStream, reply: &str) {
    // A fresh socket's buffer takes one line; the bound is for safety.
    let bye = async {
        let _ = stream.write_all(format!("{reply}\r\n").as_bytes()).await;
        let _ = stream.shutdown().await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(10), bye).await;
}

/// Writes `bytes`, failing with `TimedOut` when the client does not take
/// them within `limit`: a client that never reads cannot hold its session.
/// What a listener's session does with its transactions: classify and
/// queue them, charge their content, count rejections.
struct Queueing<'a> {
    inbound: &'a Inbound,
    listener: &'a Listener,
    peer: SocketAddr,
    charge: Charge<'a>,
}

impl Handler for Queueing<'_> {
    async fn message(&mut self, session: &mut Session, transaction: Transaction) -> Vec<u8> {
        let reply = queue(self.inbound, self.listener, session, transaction).await;
        // The message is in the spool (or refused): its memory is free again.
        self.charge.release();
        reply
    }

    fn after_feed(&mut self, session: &mut Session) {
        self.charge.cover(session);
        if !session.in_transaction() {
            self.charge.release();
        }
        count_rejections(session, &self.listener.name);
    }

    async fn authenticate(&mut self, _session: &Session, attempt: &AuthAttempt) -> AuthVerdict {
        crate::auth::check(
            &self.inbound.auth_failures,
            self.listener.users_file.as_ref(),
            &self.listener.name,
            self.peer.ip(),
            attempt,
        )
        .await
    }

    fn tls_started(&mut self, _session: &Session) {
        metrics::counter!(metric::SMTP_TLS_SESSIONS.name, "listener" => self.listener.name.clone())
            .increment(1);
    }
}

async fn session(
    inbound: &Inbound,
    listener: &Listener,
    stream: TcpStream,
    peer: SocketAddr,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let rules = inbound.rules();
    let server = &rules.config.server;
    // Settings other than the address come from the config in force when
    // the session starts, so a reload's new certificate, users and rules
    // reach the next session; this one keeps what it started with.
    let listener = rules
        .config
        .listeners
        .iter()
        .find(|l| l.address == listener.address)
        .unwrap_or(listener);
    let tls = listener.tls.as_ref().map(|t| driver::Tls {
        server: t.server.clone(),
        implicit: t.mode == ListenerTlsMode::Implicit,
    });
    let relay_allowed = listener
        .relay_from
        .iter()
        .any(|net| net.contains(&peer.ip().to_canonical()));
    let mt_priority_trusted = mt_priority_trusted(listener, peer);
    let (session, banner) = Session::new(
        SessionConfig {
            hostname: server.hostname.clone(),
            max_message_size: listener.max_message_size,
            max_recipients: listener.max_recipients,
            max_line_length: server.max_line_length,
            relay_allowed,
            max_hops: server.max_hops,
            security: Security {
                starttls: tls.as_ref().is_some_and(|t| !t.implicit),
                require_tls: listener.require_tls,
                auth: listener.auth,
                auth_plaintext: listener.auth_plaintext,
            },
            mt_priority: listener.mt_priority,
            mt_priority_trusted,
        },
        peer,
    );
    let bye = format!(
        "421 4.3.2 {} shutting down, try again later\r\n",
        server.hostname
    )
    .into_bytes();
    let mut handler = Queueing {
        inbound,
        listener,
        peer,
        charge: Charge {
            budget: &inbound.content,
            held: 0,
        },
    };
    driver::drive(
        stream,
        session,
        &banner,
        driver::Limits {
            command: server.command_timeout,
            data: server.data_timeout,
        },
        tls.as_ref(),
        &mut handler,
        Some((inbound.stopping.clone(), bye)),
    )
    .await
}

/// Whether a client's MT-PRIORITY values above 0 are honoured, as far as
/// the connection tells: its address is in the listener's
/// `mt_priority_trusted` networks. An authenticated client is trusted
/// too; that is known only inside the session, which adds it in
/// `Session::mt_priority_trusted`.
fn mt_priority_trusted(listener: &Listener, peer: SocketAddr) -> bool {
    let ip = peer.ip().to_canonical();
    listener
        .mt_priority_trusted
        .iter()
        .any(|net| net.contains(&ip))
}

fn count_rejections(session: &mut Session, listener: &str) {
    for r in session.take_rejections() {
        metrics::counter!(metric::SMTP_REJECTIONS.name, "listener" => listener.to_string(), "reason" => r.label()).increment(1);
    }
}

/// Signs `tx.message` of `pool` as the config says (DKIM, then an ARC
/// seal) and puts the headers in front of it, before it is spooled: what
/// is stored is what every attempt sends. Signing runs on the blocking
/// pool (an RSA signature and a body hash take about a millisecond of
/// CPU, a large body more), so sessions on the reactor are never held up.
/// A failed or lost signing keeps the message as received: it is relayed
/// unsigned, logged and counted, never refused.
async fn sign(rules: &Arc<Rules>, budget: &ContentBudget, pool: &str, tx: &mut Transaction) {
    if !rules.signing.may_sign(&rules.config, pool) {
        return;
    }
    // Signing holds a second copy of the message (the signed one is built
    // beside it, and the signer reads the header section as text): charged
    // to `server.max_data_memory` like the first, or the message goes out
    // unsigned rather than the relay going over its memory budget.
    let mut charge = Charge { budget, held: 0 };
    if !charge.take(tx.message.len().saturating_mul(2)) {
        for entry in rules.config.dkim.iter().filter(|d| d.serves(pool)) {
            metrics::counter!(metric::SIGNING_FAILURES.name, "domain" => entry.domain.clone(), "kind" => "dkim")
                .increment(1);
        }
        tracing::warn!(client = %tx.peer, sender = %log_safe(&tx.sender), pool = %pool, "not signed: server.max_data_memory is spent by messages in transit; the message goes out without signatures");
        return;
    }
    // Shared, not moved, so the message survives whatever happens to the task.
    let message = Arc::new(std::mem::take(&mut tx.message));
    // The one place that says what the relay knows of the client.
    let arrival = Arrival {
        client: Some(tx.peer.ip()),
        tls: tx.tls.as_ref().map(|t| t.version.to_string()),
        auth: tx.user.clone(),
    };
    let task = {
        let (rules, message, pool, sender) = (
            rules.clone(),
            message.clone(),
            pool.to_string(),
            tx.sender.clone(),
        );
        tokio::task::spawn_blocking(move || {
            rules
                .signing
                .stamp(&rules.config, &pool, &sender, &message, &arrival)
        })
    };
    let stamp = match task.await {
        Ok(stamp) => stamp,
        Err(e) => Stamp {
            failed: rules
                .config
                .dkim
                .iter()
                .filter(|d| d.serves(pool))
                .map(|d| {
                    (
                        d.domain.clone(),
                        "dkim",
                        format!("signing task failed: {e}"),
                    )
                })
                .collect(),
            ..Stamp::default()
        },
    };
    let message = Arc::try_unwrap(message).unwrap_or_else(|shared| shared.to_vec());
    for domain in &stamp.signed {
        metrics::counter!(metric::SIGNATURES.name, "domain" => domain.clone(), "kind" => "dkim")
            .increment(1);
    }
    if let Some(domain) = &stamp.sealed {
        metrics::counter!(metric::SIGNATURES.name, "domain" => domain.clone(), "kind" => "arc")
            .increment(1);
    }
    for (domain, kind, why) in &stamp.failed {
        metrics::counter!(metric::SIGNING_FAILURES.name, "domain" => domain.clone(), "kind" => *kind)
            .increment(1);
        tracing::warn!(client = %tx.peer, sender = %log_safe(&tx.sender), pool = %pool, domain = %domain, kind = *kind, "signing failed, the message goes out without this signature: {why}");
    }
    if let Some(why) = stamp.arc_skipped {
        tracing::debug!(client = %tx.peer, pool = %pool, "not ARC-sealed: {why}");
    }
    tx.message = if stamp.headers.is_empty() {
        message
    } else {
        let mut signed = Vec::with_capacity(stamp.headers.len() + message.len());
        signed.extend_from_slice(&stamp.headers);
        signed.extend_from_slice(&message);
        signed
    };
}

/// Classifies and spools one transaction; returns the reply to the final dot.
async fn queue(
    inbound: &Inbound,
    listener: &Listener,
    session: &mut Session,
    mut tx: Transaction,
) -> Vec<u8> {
    let recipients: Vec<&str> = tx.recipients.iter().map(|r| r.address.as_str()).collect();
    let rules = inbound.rules();
    let user = tx.user.clone();
    let user = user.as_deref();
    let user_pool = user
        .and_then(|u| rules.config.users.get(u))
        .and_then(|u| u.pool.as_deref());
    let decision = rules.classifier.classify(&Facts {
        listener: &listener.name,
        pinned_pool: listener.pool.as_deref(),
        user,
        user_pool,
        sender: &tx.sender,
        recipients: &recipients,
        message: &tx.message,
        mt_priority: tx.mt_priority.unwrap_or(0),
    });
    sign(&rules, &inbound.content, &decision.pool, &mut tx).await;
    let recipients = tx
        .recipients
        .iter()
        .map(|r| Recipient {
            orcpt: r.orcpt.clone(),
            notify: r.notify,
            ..Recipient::pending(&r.address)
        })
        .collect();
    let mut envelope = Envelope::new(
        &decision.pool,
        &tx.sender,
        recipients,
        tx.message.len() as u64,
        &listener.name,
        &tx.peer.to_string(),
    );
    envelope.route_line = decision.route_line;
    envelope.envid = tx.envid.clone();
    envelope.ret = tx.ret;
    envelope.body_8bit = tx.body_8bit;
    envelope.smtputf8 = tx.smtputf8;
    envelope.mt_priority = tx.mt_priority;
    let size = tx.message.len();
    let rcpt_count = tx.recipients.len();
    match inbound.queue.append(envelope, tx.message).await {
        Ok(id) => {
            let id_text = format_id(id);
            tracing::info!(
                target: "poolrelay::accept",
                queue_id = %id_text,
                client = %tx.peer,
                helo = %log_safe(&tx.helo),
                sender = %log_safe(&tx.sender),
                user = %log_safe(user.unwrap_or_default()),
                tls = %tx.tls.as_ref().map(|t| t.version).unwrap_or("none"),
                recipients = rcpt_count,
                size,
                pool = %decision.pool,
                mt_priority = tx.mt_priority.map(i64::from),
                classified_by = decision.reason,
                route_line = decision.route_line,
                listener = %listener.name,
                "accepted"
            );
            metrics::counter!(metric::RECEIVED_MESSAGES.name, "listener" => listener.name.clone(), "pool" => decision.pool.clone()).increment(1);
            session.queued(&id_text)
        }
        Err(e @ poolrelay_spool::SpoolError::Unavailable(_)) => {
            tracing::error!(client = %tx.peer, sender = %log_safe(&tx.sender), "refused a message because the replicated spool did not acknowledge it: {e}");
            session.queue_unavailable("queue cluster unavailable, try again later")
        }
        Err(e) => {
            tracing::error!(client = %tx.peer, sender = %log_safe(&tx.sender), "refused a message because the spool failed: {e}");
            session.queue_failed("spool write failed, try again later")
        }
    }
}
