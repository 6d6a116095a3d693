//! `GET /v1/accounts/{id}/topups?limit=&status=`: the account's top-up orders, newest first, with
//! their status: `pending`, `succeeded`, `failed`, `needs_review` (captured money the
//! rules could not credit, with `review_reason`; an operator resolves it) or
//! `refund_noted`; `status` keeps one of them (the review queue: `needs_review`; payments
//! still settling: `pending`). Capability: `Billing`. A payment that named no account is not any
//! account's: it is in the operators' queue (`GET /v1/topups`, `tally orders list`) and the
//! `tally_topup_orders_needs_review` gauge.

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiPath, ApiQuery, path_account_id};
use super::{ApiError, AppState};
use crate::ledger::topup::{self, TopupResult};
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

/// Orders per answer when `limit` is absent, and the most.
pub const LIMIT_DEFAULT: i64 = 50;
pub const LIMIT_MAX: i64 = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupQuery {
    limit: Option<i64>,
    /// Only orders in this status (e.g. `needs_review`, `pending`).
    status: Option<String>,
}

/// The statuses an order can be in.
pub const STATUSES: [&str; 5] = ["pending", "succeeded", "failed", "needs_review", "refund_noted"];

#[derive(Debug, Serialize)]
pub struct TopupList {
    pub topups: Vec<TopupResult>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<TopupQuery>,
) -> Result<Json<TopupList>, ApiError> {
    path_account_id(&id)?;
    let limit = checked_query(&q)?;
    check_existing(&caller, &state.pool, &id, Capability::Billing).await?;
    let topups = topup::list(&state.pool, Some(&id), q.status.as_deref(), limit)
        .await
        .map_err(super::stripe::ledger_error)?;
    Ok(Json(TopupList { topups }))
}

/// `GET /v1/topups?status=&limit=`: every account's orders, newest first, including
/// captured payments that named no account: the operators' review queue
/// (`status=needs_review`, the default) and payments still settling. Capability:
/// `Operate` (operator tokens).
pub async fn queue(
    State(state): State<AppState>,
    caller: Caller,
    ApiQuery(q): ApiQuery<TopupQuery>,
) -> Result<Json<TopupList>, ApiError> {
    let limit = checked_query(&q)?;
    caller.require(Capability::Operate)?;
    let status = q.status.as_deref().unwrap_or("needs_review");
    let topups =
        topup::list(&state.pool, None, Some(status), limit).await.map_err(super::stripe::ledger_error)?;
    Ok(Json(TopupList { topups }))
}

/// The limit (default [`LIMIT_DEFAULT`]) once the query is known good.
fn checked_query(q: &TopupQuery) -> Result<i64, ApiError> {
    let limit = q.limit.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be within 1..={LIMIT_MAX}")));
    }
    if let Some(status) = q.status.as_deref()
        && !STATUSES.contains(&status)
    {
        let problem = format!("status must be one of {}", STATUSES.join(", "));
        return Err(ApiError::bad_request("invalid_query", problem));
    }
    Ok(limit)
}
