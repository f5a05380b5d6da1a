//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz` and the JSON
//! API under `/api/v1` that `poolrelay queue` uses. Handlers only translate
//! HTTP to the engine's `control` calls.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    /// Bearer token for mutating calls; None = loopback clients only.
    pub token: Option<String>,
    /// The config file, re-read on reload.
    pub config_path: PathBuf,
}

type Shared = Arc<Admin>;

/// Reads the token file named in the config, if any.
pub fn read_token(config: &Config) -> anyhow::Result<Option<String>> {
    match &config.admin.token_file {
        None => Ok(None),
        Some(path) => {
            let token = std::fs::read_to_string(path).map_err(|e| {
                anyhow::anyhow!("cannot read admin.token_file {}: {e}", path.display())
            })?;
            let token = token.trim().to_string();
            if token.is_empty() {
                anyhow::bail!("admin.token_file {} is empty", path.display());
            }
            Ok(Some(token))
        }
    }
}

/// Serves the admin API until the listener is dropped.
pub async fn serve(admin: Shared, socket: tokio::net::TcpListener) {
    let mutating = Router::new()
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
        .route("/api/v1/pools", get(pools))
        .route("/api/v1/pools/{pool}/messages", get(messages))
        .route("/api/v1/messages/{id}", get(show))
        .merge(mutating)
        .with_state(admin);
    if let Err(e) = axum::serve(
        socket,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .await
    {
        tracing::error!("admin server stopped: {e}");
    }
}

/// Mutating calls need the bearer token when one is configured, else a loopback client.
async fn authorize(
    State(admin): State<Shared>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    request: Request,
    next: Next,
) -> Response {
    let allowed = match &admin.token {
        Some(token) => headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.trim().as_bytes(), token.as_bytes())),
        None => peer.ip().is_loopback(),
    };
    if allowed {
        next.run(request).await
    } else {
        let why = if admin.token.is_some() {
            "missing or wrong bearer token (see admin.token_file)"
        } else {
            "mutating calls are allowed from loopback only when no admin.token_file is set"
        };
        error(StatusCode::UNAUTHORIZED, why)
    }
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

async fn show(State(admin): State<Shared>, Path(id): Path<String>) -> Response {
    match admin.relay.show_message(&id) {
        Ok(detail) => Json(detail).into_response(),
        Err(e) => control_error(e),
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
    done(admin.relay.flush_message(&id))
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
    match crate::reload(&admin.relay, &admin.config_path).await {
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
