//! HTTP API (axum): health, Prometheus metrics, balances, Stripe webhooks.
//!
//! Every error is JSON `{"error": {"code": "...", "message": "..."}}` with a stable code.
//! The OpenAPI description lives in `schemas/openapi.yaml`.

pub mod auth;
pub mod checkout;
pub mod deductions;
mod error;
pub mod extract;
pub mod grants;
pub mod polar;
pub mod quota;
pub mod reservations;
pub mod stripe;
pub mod subscriptions;
pub mod topups;
pub mod transactions;
pub mod usage;
pub mod usage_events;

pub use error::ApiError;

use crate::ledger;
use axum::extract::{MatchedPath, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
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
    /// Polar webhook secret; its webhook answers 503 without it.
    pub polar_webhook_secret: Option<String>,
    /// Verified bearer tokens, trusted for `auth::TOKEN_CACHE_TTL` (see `auth`).
    pub auth: std::sync::Arc<auth::TokenCache>,
    /// The ClickHouse usage log (`GET /v1/accounts/{id}/usage`).
    pub clickhouse: clickhouse::Client,
    /// In-memory quota, limit and balance state (the authorize fast path).
    pub quota: std::sync::Arc<crate::quota::state::QuotaState>,
    pub quota_config: std::sync::Arc<crate::quota::config::QuotaConfig>,
    /// The price catalog (authorize resolves a model's tier for plans that gate models).
    pub catalog: std::sync::Arc<crate::pricing::Catalog>,
    /// The payment providers' APIs (`POST /v1/accounts/{id}/checkout`).
    pub payments: std::sync::Arc<crate::payments::client::Providers>,
    /// Holding authorize's group commit (`ledger::holds`).
    pub holds: std::sync::Arc<crate::ledger::holds::HoldQueue>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics_text))
        .route("/v1/accounts/{id}/balance", get(balance))
        .route("/v1/webhooks/stripe", axum::routing::post(stripe::webhook))
        .route("/v1/webhooks/polar", axum::routing::post(polar::webhook))
        // Authenticated (bearer token, see `auth`); each handler checks its capability.
        .route("/v1/accounts/{id}/transactions", get(transactions::list))
        .route("/v1/accounts/{id}/topups", get(topups::list))
        .route("/v1/accounts/{id}/checkout", post(checkout::create))
        .route("/v1/topups", get(topups::queue))
        .route("/v1/accounts/{id}/grants", get(grants::list).post(grants::create))
        .route("/v1/accounts/{id}/usage", get(usage::get))
        .route("/v1/accounts/{id}/usage/events", get(usage_events::list))
        .route("/v1/reservations", post(reservations::reserve))
        .route("/v1/reservations/{id}/settle", post(reservations::settle))
        .route("/v1/reservations/{id}/release", post(reservations::release))
        .route("/v1/authorizations/{id}/release", post(reservations::release_authorization))
        .route("/v1/deductions", post(deductions::single))
        .route("/v1/deductions/batch", post(deductions::batch))
        .route("/v1/authorize", post(quota::authorize))
        .route("/v1/accounts/{id}/quotas", get(quota::quotas))
        .route("/v1/accounts/{id}/limits", get(quota::get_limits).put(quota::put_limit))
        .route("/v1/accounts/{id}/plan", post(quota::change_plan))
        .route("/v1/accounts/{id}/plan/changes", get(quota::plan_changes))
        .fallback(not_found)
        // axum answers a wrong method with an empty 405: answer it in the JSON error shape.
        .method_not_allowed_fallback(method_not_allowed)
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

/// Balance from the ledger (authoritative, read from Postgres), plus the plan allocation,
/// period consumption, burn rate and projected days remaining from the in-memory state.
async fn balance(
    State(state): State<AppState>,
    caller: auth::Caller,
    extract::ApiPath(id): extract::ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    extract::path_account_id(&id)?;
    caller.check(&id, auth::Capability::Billing)?;
    let view = ledger::balance(&state.pool, &id)
        .await
        .map_err(ApiError::internal)?
        .ok_or_else(|| auth::account_not_found(&id))?;
    let now = chrono::Utc::now();
    let extra =
        state.quota.with_account(&id, |acct| quota::plan_and_burn(&state, acct, view.effective_units, now));
    let mut body = serde_json::to_value(&view).map_err(ApiError::internal)?;
    let unit = state.catalog.display_unit();
    body["display"] = serde_json::json!({
        "unit": unit.unit_name,
        "balance": unit.amount(view.balance_units),
        "effective": unit.amount(view.effective_units),
        "reserved": unit.amount(view.reserved_units),
        "pending": unit.amount(view.pending_units),
    });
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    Ok(Json(body))
}

async fn not_found() -> ApiError {
    ApiError::not_found("route_not_found", "no such route")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        axum::http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed on this route",
    )
}
