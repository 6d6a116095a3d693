//! HTTP API (axum): health, Prometheus metrics, balances, Stripe webhooks.
//!
//! Every error is JSON `{"error": {"code": "...", "message": "..."}}` with a stable code.
//! The OpenAPI description lives in `schemas/openapi.yaml`.

mod error;
pub mod stripe;

pub use error::ApiError;

use crate::ledger;
use axum::extract::{MatchedPath, Path, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use sqlx::PgPool;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub metrics: PrometheusHandle,
    pub ledger_config: std::sync::Arc<crate::ledger::config::LedgerConfig>,
    /// Stripe webhook signing secret; webhooks answer 503 without it.
    pub stripe_webhook_secret: Option<String>,
    /// In-memory quota, limit and balance state (the authorize fast path).
    pub quota: std::sync::Arc<crate::quota::state::QuotaState>,
    pub quota_config: std::sync::Arc<crate::quota::config::QuotaConfig>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/accounts/{id}/balance", get(balance))
        .route("/v1/webhooks/stripe", axum::routing::post(stripe::webhook))
        .fallback(not_found)
        .layer(middleware::from_fn(track))
        .with_state(state)
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    stop: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(async move { stop.cancelled().await }).await
}

/// Count and time requests by route template (never the raw path: ids are unbounded).
async fn track(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(req).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(crate::metrics::HTTP_REQUESTS, "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!(crate::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

async fn healthz(State(state): State<AppState>) -> Response {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => Json(serde_json::json!({"status": "ok"})).into_response(),
        Err(e) => ApiError::unavailable(format!("postgres: {e}")).into_response(),
    }
}

async fn metrics_text(State(state): State<AppState>) -> String {
    state.metrics.render()
}

async fn balance(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<ledger::BalanceView>, ApiError> {
    if id.is_empty() || id.len() > crate::event::ID_LEN_MAX {
        return Err(ApiError::bad_request("invalid_account_id", "account id must be 1..=128 bytes"));
    }
    let view = ledger::balance(&state.pool, &id).await.map_err(ApiError::internal)?;
    view.map(Json).ok_or_else(|| ApiError::not_found("account_not_found", format!("no account {id}")))
}

async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}
