//! Credit grants (see `ledger::grants`).
//!
//! - `GET /v1/accounts/{id}/grants?live=&before=&limit=`: the account's grants, newest
//!   first, with what is left, the deadline and the source; `live=true` keeps those with
//!   something left that have not expired; `before` is the previous page's last
//!   `grant_id`. Capability: `Billing`.
//! - `POST /v1/accounts/{id}/grants` `{amount, source?, expires_at?, expires_in_days?,
//!   priority?, reason, idempotency_key}`: an operator creates a promotional (or
//!   `operator`, or `bonus`) grant, once per key; the catalog's `[grants.<source>]` gives
//!   the priority and expiry the request leaves out. Capability: `Operate` (operator
//!   tokens only: an account's own owner cannot grant itself credit).

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiJson, ApiPath, ApiQuery, ExactDecimal, body_id, path_account_id};
use super::{ApiError, AppState};
use crate::ledger::grants::{self, GrantSource, GrantView, Granted};
use crate::money::{exact_units, units_to_usd_string};
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Grants per answer when `limit` is absent, and the most.
pub const LIMIT_DEFAULT: i64 = 50;
pub const LIMIT_MAX: i64 = 500;
/// Longest reason recorded on the entry.
pub const REASON_LEN_MAX: usize = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantsQuery {
    live: Option<bool>,
    before: Option<i64>,
    limit: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct GrantItem {
    #[serde(flatten)]
    pub grant: GrantView,
    pub amount: String,
    pub remaining: String,
}

#[derive(Debug, Serialize)]
pub struct GrantList {
    pub grants: Vec<GrantItem>,
    /// Pass as `before` for the next page (absent on the last page).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_before: Option<i64>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<GrantsQuery>,
) -> Result<Json<GrantList>, ApiError> {
    path_account_id(&id)?;
    let limit = q.limit.unwrap_or(LIMIT_DEFAULT);
    if !(1..=LIMIT_MAX).contains(&limit) {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be within 1..={LIMIT_MAX}")));
    }
    if q.before.is_some_and(|b| b <= 0) {
        return Err(ApiError::bad_request("invalid_query", "before must be a positive grant id"));
    }
    check_existing(&caller, &state.pool, &id, Capability::Billing).await?;
    let rows = grants::list(&state.pool, &id, q.before, limit, q.live.unwrap_or(false))
        .await
        .map_err(ApiError::internal)?;
    let next_before = (rows.len() as i64 == limit).then(|| rows.last().map(|g| g.grant_id)).flatten();
    let grants = rows
        .into_iter()
        .map(|g| GrantItem {
            amount: units_to_usd_string(g.amount_units),
            remaining: units_to_usd_string(g.remaining_units),
            grant: g,
        })
        .collect();
    Ok(Json(GrantList { grants, next_before }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantBody {
    /// USD, positive, at most 8 decimals.
    amount: ExactDecimal,
    /// promotion (default), operator or bonus.
    source: Option<GrantSource>,
    expires_at: Option<DateTime<Utc>>,
    expires_in_days: Option<u32>,
    priority: Option<i32>,
    reason: String,
    idempotency_key: String,
}

#[derive(Debug, Serialize)]
pub struct GrantCreated {
    pub grant_id: i64,
    pub entry_id: i64,
    pub balance_after: String,
    pub balance_after_units: i64,
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<GrantBody>,
) -> Result<Json<GrantCreated>, ApiError> {
    path_account_id(&id)?;
    caller.require(Capability::Operate)?;
    body_id("idempotency_key", &body.idempotency_key)?;
    let invalid = |m: String| ApiError::unprocessable("invalid_request", m);
    let units = exact_units(body.amount.0).map_err(invalid)?;
    if units <= 0 {
        return Err(invalid("amount must be positive".into()));
    }
    if body.reason.is_empty() || body.reason.len() > REASON_LEN_MAX {
        return Err(invalid(format!("reason must be 1..={REASON_LEN_MAX} bytes")));
    }
    check_existing(&caller, &state.pool, &id, Capability::Operate).await?;
    let req = grants::GrantRequest {
        account_id: id,
        idempotency_key: body.idempotency_key,
        units,
        source: body.source.unwrap_or(GrantSource::Promotion),
        priority: body.priority,
        expires_at: body.expires_at,
        expires_in_days: body.expires_in_days,
        created_by: caller.token_id().to_string(),
        reason: body.reason,
    };
    let Granted { grant_id, entry_id, balance_after_units } =
        grants::grant(&state.pool, &state.ledger_config.grants, &req)
            .await
            .map_err(super::stripe::ledger_error)?;
    Ok(Json(GrantCreated {
        grant_id,
        entry_id,
        balance_after: units_to_usd_string(balance_after_units),
        balance_after_units,
    }))
}
