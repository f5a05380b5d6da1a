//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz` and the JSON
//! API under `/api/v1` that `poolrelay queue` uses. Handlers only translate
//! HTTP to the engine's `control` calls.
//!
//! Access to `/api/v1`: a request a browser sent for another site (an
//! `Origin` other than the admin address) is refused with 403. With
//! `admin.token_file` set, every call needs `Authorization: Bearer TOKEN`.
//! Without it, the `Host` header must name the admin address (or
//! localhost) so a page whose name was rebound to 127.0.0.1 gets 403, and
//! calls that change something are taken from loopback clients only.
//! `/metrics`, `/healthz` and `/readyz` are open.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use axum::extract::connect_info::Connected;
use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::IncomingStream;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use poolrelay_config::Config;
use poolrelay_relay::Running;
use poolrelay_relay::control::ControlError;
use serde::Deserialize;

/// State of the admin server.
pub struct Admin {
    /// The relay.
    pub relay: Arc<Running>,
    /// The Prometheus renderer.
    pub metrics: PrometheusHandle,
    /// Bearer token every `/api/v1` call needs; None = no token (loopback
    /// clients only for calls that change something). Replaced on reload.
    pub token: RwLock<Option<String>>,
    /// The address the admin server listens on (fixed until a restart).
    pub address: SocketAddr,
    /// The config file, re-read on reload.
    pub config_path: PathBuf,
}

impl Admin {
    /// The token in force.
    pub fn token(&self) -> Option<String> {
        self.token.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `token` in force; true when it differs from the one before.
    pub fn set_token(&self, token: Option<String>) -> bool {
        let mut current = self.token.write().unwrap_or_else(|e| e.into_inner());
        let changed = *current != token;
        *current = token;
        changed
    }
}

type Shared = Arc<Admin>;

/// Reads the token file named in the config, if any; refuses a file that
/// group or others can read.
pub fn read_token(config: &Config) -> anyhow::Result<Option<String>> {
    match &config.admin.token_file {
        None => Ok(None),
        Some(path) => {
            let token = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read admin.token_file {}: {e}", path.display())
            })?;
            poolrelay_config::check_private_file("admin.token_file", path)
                .map_err(|e| anyhow::anyhow!(e))?;
            let token = token.trim().to_string();
            if token.is_empty() {
                anyhow::bail!("admin.token_file {} is empty", path.display());
            }
            Ok(Some(token))
        }
    }
}

/// Both ends of an admin connection.
#[derive(Clone, Copy, Debug)]
struct Conn {
    peer: SocketAddr,
    /// The address the client connected to (an interface's address when
    /// the admin server listens on a wildcard).
    local: Option<SocketAddr>,
}

impl Connected<IncomingStream<'_, tokio::net::TcpListener>> for Conn {
    fn connect_info(stream: IncomingStream<'_, tokio::net::TcpListener>) -> Conn {
        Conn {
            peer: *stream.remote_addr(),
            local: stream.io().local_addr().ok(),
        }
    }
}

/// Serves the admin API until the listener is dropped.
pub async fn serve(admin: Shared, socket: tokio::net::TcpListener) {
    let api = Router::new()
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/pools/{pool}/messages", get(messages))
        .route("/api/v1/messages/{id}", get(show))
        .route("/api/v1/pools/{pool}/hold", post(hold))
        .route("/api/v1/pools/{pool}/release", post(release))
        .route("/api/v1/pools/{pool}/flush", post(flush_pool))
        .route("/api/v1/pools/{pool}/delete-all", post(delete_all))
        .route("/api/v1/messages/{id}/flush", post(flush_message))
        .route("/api/v1/messages/{id}/delete", post(delete_message))
        .route("/api/v1/messages/{id}/move", post(move_message))
        .route("/api/v1/messages/{id}/bounce", post(bounce_message))
        .route("/api/v1/reload", post(reload))
        .route_layer(middleware::from_fn_with_state(admin.clone(), authorize));
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .merge(api)
        .with_state(admin);
    if let Err(e) = axum::serve(socket, app.into_make_service_with_connect_info::<Conn>()).await {
        tracing::error!("admin server stopped: {e}");
    }
}

/// The access rules of `/api/v1` (see the module documentation).
async fn authorize(
    State(admin): State<Shared>,
    ConnectInfo(conn): ConnectInfo<Conn>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let local = |authority: &str| is_local_authority(authority, admin.address, conn.local);
    if let Some(origin) = headers.get("origin") {
        let same = origin
            .to_str()
            .ok()
            .and_then(|o| o.strip_prefix("http://"))
            .is_some_and(local);
        if !same {
            return error(
                StatusCode::FORBIDDEN,
                "requests from web pages of other sites are refused (Origin is not the admin address)",
            );
        }
    }
    if let Some(token) = admin.token() {
        let given = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if !given.is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())) {
            return error(
                StatusCode::UNAUTHORIZED,
                "missing or wrong bearer token (see admin.token_file)",
            );
        }
        return next.run(request).await;
    }
    let host = headers
        .get("host")
        .map(|h| h.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| request.uri().authority().map(|a| a.to_string()));
    if !host.as_deref().is_some_and(local) {
        return error(
            StatusCode::FORBIDDEN,
            "the Host header does not name the admin address; use http://127.0.0.1:PORT or http://localhost:PORT (or set admin.token_file)",
        );
    }
    let reads = matches!(*request.method(), Method::GET | Method::HEAD);
    if !reads && !conn.peer.ip().to_canonical().is_loopback() {
        return error(
            StatusCode::UNAUTHORIZED,
            "calls that change something are allowed from loopback only when no admin.token_file is set",
        );
    }
    next.run(request).await
}

/// Whether `authority` (`host:port` of a Host or Origin header) names this
/// admin server: its address, the address the client connected to,
/// 127.0.0.1, [::1] or localhost, with the admin port.
fn is_local_authority(authority: &str, admin: SocketAddr, local: Option<SocketAddr>) -> bool {
    let Some((host, port)) = authority.rsplit_once(':') else {
        return false;
    };
    let port_ok = port
        .parse::<u16>()
        .is_ok_and(|p| p == admin.port() || local.is_some_and(|l| l.port() == p));
    if !port_ok {
        return false;
    }
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    let Ok(ip) = host.parse::<IpAddr>() else {
        return false;
    };
    let ip = ip.to_canonical();
    [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
        admin.ip().to_canonical(),
    ]
    .into_iter()
    .chain(local.map(|l| l.ip().to_canonical()))
    .any(|known| known == ip)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

fn control_error(e: ControlError) -> Response {
    let status = match &e {
        ControlError::NotFound(_) => StatusCode::NOT_FOUND,
        ControlError::Busy(_) => StatusCode::CONFLICT,
        ControlError::BadRequest(_) => StatusCode::BAD_REQUEST,
        ControlError::Spool(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    error(status, &e.to_string())
}

fn done(result: Result<(), ControlError>) -> Response {
    match result {
        Ok(()) => Json(serde_json::json!({ "ok": true })).into_response(),
        Err(e) => control_error(e),
    }
}

async fn metrics(State(admin): State<Shared>) -> Response {
    crate::telemetry::refresh(&admin.relay);
    (
        [("content-type", "text/plain; version=0.0.4")],
        admin.metrics.render(),
    )
        .into_response()
}

async fn readyz(State(admin): State<Shared>) -> Response {
    if admin.relay.ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: spool not writable, or shutting down\n",
        )
            .into_response()
    }
}

async fn pools(State(admin): State<Shared>) -> Response {
    Json(admin.relay.pool_summaries()).into_response()
}

#[derive(Deserialize)]
struct Page {
    after: Option<String>,
    limit: Option<usize>,
}

async fn messages(
    State(admin): State<Shared>,
    Path(pool): Path<String>,
    Query(page): Query<Page>,
) -> Response {
    let limit = page.limit.unwrap_or(100).min(10_000);
    match admin
        .relay
        .list_messages(&pool, page.after.as_deref(), limit)
    {
        Ok(list) => Json(list).into_response(),
        Err(e) => control_error(e),
    }
}

/// Reading the body is blocking I/O (a disk read, or a fetch from the
/// replicated spool's cluster): off the runtime's threads.
async fn show(State(admin): State<Shared>, Path(id): Path<String>) -> Response {
    let relay = admin.relay.clone();
    match tokio::task::spawn_blocking(move || relay.show_message(&id)).await {
        Ok(Ok(detail)) => Json(detail).into_response(),
        Ok(Err(e)) => control_error(e),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            &format!("reading the message failed: {e}"),
        ),
    }
}

async fn hold(State(admin): State<Shared>, Path(pool): Path<String>) -> Response {
    done(admin.relay.hold_pool(&pool, true).await)
}

async fn release(State(admin): State<Shared>, Path(pool): Path<String>) -> Response {
    done(admin.relay.hold_pool(&pool, false).await)
}

async fn flush_pool(State(admin): State<Shared>, Path(pool): Path<String>) -> Response {
    done(admin.relay.flush_pool(&pool))
}

/// Deletes every message of a pool it can. Messages being delivered cannot
/// be deleted: when any are left the answer is 409, like a single Busy
/// delete, with both counts, so a script cannot take a partial delete for
/// a complete one.
async fn delete_all(State(admin): State<Shared>, Path(pool): Path<String>) -> Response {
    let mut deleted = 0usize;
    // By id: the loop lists the pool again after each pass, and a message
    // still busy then must not be counted twice.
    let mut busy = std::collections::BTreeSet::new();
    // Corrupt records are skipped and reported: only `queue delete ID`
    // removes one, so a bad record is never deleted unseen.
    let mut corrupt = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = match admin.relay.list_messages(&pool, after.as_deref(), 1000) {
            Ok(p) => p,
            Err(e) => return control_error(e),
        };
        after = page.last().map(|m| m.id.clone());
        for m in &page {
            if m.corrupt.is_some() {
                corrupt.push(m.id.clone());
                continue;
            }
            match admin.relay.delete_message(&m.id).await {
                Ok(()) => {
                    deleted += 1;
                    busy.remove(&m.id);
                }
                Err(ControlError::Busy(_)) => {
                    busy.insert(m.id.clone());
                }
                // Delivered (or deleted by someone else) since the listing: gone anyway.
                Err(ControlError::NotFound(_)) => {}
                Err(e) => return control_error(e),
            }
        }
        if page.is_empty() {
            break;
        }
    }
    if !corrupt.is_empty() {
        tracing::warn!(pool, corrupt = ?corrupt, "delete-all skipped corrupt records; `poolrelay queue delete ID` removes one");
    }
    let busy = busy.len();
    if busy == 0 {
        return Json(
            serde_json::json!({ "ok": true, "deleted": deleted, "busy": 0, "corrupt": corrupt }),
        )
        .into_response();
    }
    let message = format!(
        "deleted {deleted} messages of pool {pool}; {busy} not deleted: being delivered right now, try again in a moment"
    );
    tracing::warn!(
        pool,
        deleted,
        busy,
        "delete-all: {busy} messages being delivered were not deleted"
    );
    (
        StatusCode::CONFLICT,
        Json(serde_json::json!({ "error": message, "deleted": deleted, "busy": busy, "corrupt": corrupt })),
    )
        .into_response()
}

async fn flush_message(State(admin): State<Shared>, Path(id): Path<String>) -> Response {
    done(admin.relay.flush_message(&id).await)
}

async fn delete_message(State(admin): State<Shared>, Path(id): Path<String>) -> Response {
    done(admin.relay.delete_message(&id).await)
}

#[derive(Deserialize)]
struct MoveTo {
    to: String,
}

async fn move_message(
    State(admin): State<Shared>,
    Path(id): Path<String>,
    Query(to): Query<MoveTo>,
) -> Response {
    done(admin.relay.move_message(&id, &to.to).await)
}

async fn bounce_message(State(admin): State<Shared>, Path(id): Path<String>) -> Response {
    done(admin.relay.bounce_message(&id).await)
}

/// Logged here as SIGHUP reloads are in `main`: the relay's log must show
/// every config change and every refusal, not only the caller's terminal.
async fn reload(State(admin): State<Shared>) -> Response {
    match crate::reload(&admin).await {
        Ok(msg) => {
            tracing::info!("reload via the admin API: {msg}");
            Json(serde_json::json!({ "ok": true, "message": msg })).into_response()
        }
        Err(msg) => {
            tracing::error!("reload via the admin API: {msg}");
            error(StatusCode::UNPROCESSABLE_ENTITY, &msg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_authorities() {
        let admin: SocketAddr = "127.0.0.1:9025".parse().unwrap();
        let wild: SocketAddr = "0.0.0.0:9025".parse().unwrap();
        let via: Option<SocketAddr> = Some("192.0.2.7:9025".parse().unwrap());
        for ok in [
            "127.0.0.1:9025",
            "localhost:9025",
            "LOCALHOST:9025",
            "[::1]:9025",
            "[::ffff:127.0.0.1]:9025",
        ] {
            assert!(is_local_authority(ok, admin, None), "{ok}");
        }
        assert!(is_local_authority("192.0.2.7:9025", wild, via));
        for bad in [
            "evil.example:9025",
            "127.0.0.1",
            "127.0.0.1:80",
            "localhost",
            "[::1]",
            "192.0.2.8:9025",
            "",
            "null",
            ":9025",
        ] {
            assert!(!is_local_authority(bad, wild, via), "{bad}");
        }
    }
}
