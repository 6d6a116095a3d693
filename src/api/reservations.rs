//! Reservations over HTTP (`ledger::reservations`): hold an amount before a call, settle
//! it with the actual cost, or release it. Capability: `Gateway`.
//!
//! - `POST /v1/reservations` -> 201, or 402 `insufficient_quota` when the effective
//!   balance (balance - reserved - pending) does not cover the hold. The hold is an
//!   amount, or the worst-case price of the call's shape (`estimate`: model, provider,
//!   counts per iteration, iterations; see `pricing::estimate`); a model the catalog
//!   cannot price is 422 `cannot_estimate`, or the catalog's default hold. Idempotent by
//!   `reservation_id` (generated when absent; send your own to retry safely). Reservation
//!   ids are global: use unique ones (UUIDs).
//! - `POST /v1/reservations/{id}/settle` -> 200 (`settling` until the usage event that
//!   names the reservation arrives: the debit always comes from that event).
//! - `POST /v1/reservations/{id}/release` -> 200 (`released`; repeating it is harmless).
//!
//! A reservation of an account the caller cannot see is 404 `reservation_not_found`, as
//! for one that does not exist.

use super::auth::{Caller, Capability};
use super::extract::{ApiJson, ApiPath, ExactDecimal, body_id};
use super::{ApiError, AppState};
use crate::ledger::ops::LedgerError;
use crate::ledger::reservations::{self, Reservation, ReserveRequest};
use crate::money::exact_units;
use crate::money::units_to_usd_string;
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// Longest hold: 7 days, as the catalog's `reservations.ttl_secs` allows.
pub const TTL_SECS_MAX: u32 = 7 * 86_400;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReserveBody {
    account_id: String,
    reservation_id: Option<String>,
    amount_usd: Option<ExactDecimal>,
    amount_units: Option<i64>,
    /// The call's shape instead of an amount: the hold is its worst case's price.
    estimate: Option<EstimateBody>,
    ttl_secs: Option<u32>,
}

/// A call's shape (counts per iteration; absent counts and iterations come from the
/// catalog's `[reservations.estimate]`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateBody {
    provider: String,
    model: String,
    modality: Option<String>,
    feature: Option<String>,
    input_tokens: Option<i64>,
    output_tokens: Option<i64>,
    images: Option<i64>,
    video_seconds: Option<i64>,
    characters: Option<i64>,
    iterations: Option<i64>,
}

/// How a hold was computed from a shape.
#[derive(Debug, Serialize)]
pub struct EstimateView {
    /// `catalog`: the worst case priced by the catalog; `unpriced_default`: the catalog
    /// cannot price the model and `[reservations.estimate]` holds a default amount.
    pub basis: &'static str,
    /// The catalog entry that priced it (absent for `unpriced_default`).
    pub priced_model: Option<String>,
    pub iterations: i64,
    /// Totals over all iterations.
    pub input_tokens: i64,
    pub output_tokens: i64,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SettleBody {
    actual_usd: Option<ExactDecimal>,
    actual_units: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct ReservationView {
    pub reservation_id: String,
    pub account_id: String,
    /// `reservation` (a hold of an amount) or `authorization` (a holding authorize).
    pub kind: String,
    /// The feature whose quota unit an authorization holds.
    pub feature: Option<String>,
    /// active, settling, settled, released or expired.
    pub status: String,
    pub amount: String,
    pub amount_units: i64,
    /// The reported actual cost while `settling`, waiting for the usage event.
    pub pending_units: i64,
    pub actual_units: Option<i64>,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// How the hold was computed, when the request gave the call's shape.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub estimate: Option<EstimateView>,
}

impl From<Reservation> for ReservationView {
    fn from(r: Reservation) -> ReservationView {
        ReservationView {
            reservation_id: r.reservation_id,
            account_id: r.account_id,
            kind: r.kind,
            feature: r.feature,
            status: r.status,
            amount: units_to_usd_string(r.amount_units),
            amount_units: r.amount_units,
            pending_units: r.pending_units,
            actual_units: r.actual_units,
            expires_at: r.expires_at,
            created_at: r.created_at,
            estimate: None,
        }
    }
}

pub async fn reserve(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<ReserveBody>,
) -> Result<(StatusCode, Json<ReservationView>), ApiError> {
    body_id("account_id", &body.account_id)?;
    caller.check(&body.account_id, Capability::Gateway)?;
    let reservation_id = match body.reservation_id {
        Some(id) => {
            body_id("reservation_id", &id)?;
            id
        }
        None => format!("res_{}", uuid::Uuid::new_v4().simple()),
    };
    let (amount_units, estimate) = match body.estimate {
        Some(shape) if body.amount_usd.is_none() && body.amount_units.is_none() => {
            let (units, view) = estimate_hold(&state, &body.account_id, shape)?;
            (units, Some(view))
        }
        Some(_) => {
            return Err(ApiError::unprocessable(
                "invalid_amount",
                "give amount_usd, amount_units or estimate, only one",
            ));
        }
        None => (one_amount("amount", body.amount_usd, body.amount_units)?, None),
    };
    if amount_units <= 0 {
        return Err(ApiError::unprocessable("invalid_amount", "amount must be positive"));
    }
    let ttl_secs = body.ttl_secs.unwrap_or(state.ledger_config.reservations.ttl_secs);
    if !(1..=TTL_SECS_MAX).contains(&ttl_secs) {
        return Err(ApiError::unprocessable(
            "invalid_ttl",
            format!("ttl_secs must be within 1..={TTL_SECS_MAX}"),
        ));
    }
    // One model of a plan (issue 11.4): a hold may use what authorize would allow.
    let overdraft_units = state.quota.with_account(&body.account_id, |acct| {
        crate::quota::state::plan(&state.quota_config, acct)
            .map_or(0, |p| crate::quota::decide::overdraft_units(&p))
    });
    let req = ReserveRequest {
        account_id: body.account_id,
        reservation_id,
        amount_units,
        ttl_secs,
        overdraft_units,
    };
    let r = reservations::reserve(&state.pool, &req).await.map_err(reservation_error)?;
    Ok((StatusCode::CREATED, Json(ReservationView { estimate, ..r.into() })))
}

/// The hold for a call's shape: the catalog's price of its worst case, or the configured
/// policy when the catalog cannot price the model (never an unreserved call).
fn estimate_hold(
    state: &AppState,
    account_id: &str,
    body: EstimateBody,
) -> Result<(i64, EstimateView), ApiError> {
    use crate::pricing::estimate::{CallShape, Estimate};
    body_id("estimate.provider", &body.provider)?;
    body_id("estimate.model", &body.model)?;
    let defaults = &state.ledger_config.reservations.estimate;
    let shape = CallShape {
        provider: body.provider,
        model: body.model,
        modality: body.modality,
        feature: body.feature,
        input_tokens: body.input_tokens.or(defaults.input_tokens).unwrap_or(0),
        output_tokens: body.output_tokens.or(defaults.output_tokens).unwrap_or(0),
        images: body.images.unwrap_or(0),
        video_seconds: body.video_seconds.unwrap_or(0),
        characters: body.characters.unwrap_or(0),
        iterations: body.iterations.or(defaults.iterations).unwrap_or(1),
    };
    let estimate = state
        .catalog
        .estimate(account_id, &shape, Utc::now())
        .map_err(|e| ApiError::unprocessable("invalid_estimate", e))?;
    let view = |basis, priced_model| EstimateView {
        basis,
        priced_model,
        iterations: shape.iterations,
        input_tokens: shape.input_tokens.saturating_mul(shape.iterations),
        output_tokens: shape.output_tokens.saturating_mul(shape.iterations),
    };
    match estimate {
        Estimate::Priced { units, priced_model } => Ok((units, view("catalog", Some(priced_model)))),
        Estimate::Unpriced => match defaults.unpriced_hold_units() {
            Some(units) => Ok((units, view("unpriced_default", None))),
            None => Err(ApiError::unprocessable(
                "cannot_estimate",
                format!(
                    "the catalog cannot price {}/{}: the call cannot be reserved (the catalog refuses unpriced models)",
                    shape.provider, shape.model
                ),
            )),
        },
        Estimate::Free(reason) => Err(ApiError::unprocessable(
            "nothing_to_reserve",
            format!("the call would not be charged ({}): there is nothing to hold", reason.as_str()),
        )),
    }
}

pub async fn settle(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<SettleBody>,
) -> Result<Json<ReservationView>, ApiError> {
    visible(&state, &caller, &id).await?;
    let actual_units = one_amount("actual", body.actual_usd, body.actual_units)?;
    if actual_units < 0 {
        return Err(ApiError::unprocessable("invalid_amount", "actual cost must not be negative"));
    }
    let r = reservations::settle(&state.pool, &id, actual_units).await.map_err(reservation_error)?;
    Ok(Json(r.into()))
}

pub async fn release(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReservationView>, ApiError> {
    visible(&state, &caller, &id).await?;
    let r = reservations::release(&state.pool, &id).await.map_err(reservation_error)?;
    Ok(Json(r.into()))
}

/// `POST /v1/authorizations/{id}/release`: release a holding authorize's hold early (the
/// call will not happen, or failed before reaching a provider). The same machinery as a
/// reservation; releasing twice returns the released hold.
pub async fn release_authorization(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<ReservationView>, ApiError> {
    let renamed = |e: ApiError| {
        if e.status == StatusCode::NOT_FOUND && e.code == "reservation_not_found" {
            ApiError::not_found("authorization_not_found", format!("no authorization {id}"))
        } else {
            e
        }
    };
    visible(&state, &caller, &id).await.map_err(renamed)?;
    let r = reservations::release(&state.pool, &id).await.map_err(reservation_error).map_err(renamed)?;
    Ok(Json(r.into()))
}

/// The role first (403 says nothing about the reservation), then existence and scope
/// together (one 404 for both).
async fn visible(state: &AppState, caller: &Caller, id: &str) -> Result<(), ApiError> {
    caller.require(Capability::Gateway)?;
    if id.is_empty() || id.len() > super::extract::ID_LEN_MAX {
        return Err(ApiError::bad_request("invalid_reservation_id", "reservation id must be 1..=128 bytes"));
    }
    let found = reservations::get(&state.pool, id).await.map_err(reservation_error)?;
    match found {
        Some(r) if caller.can_see(&r.account_id) => Ok(()),
        _ => Err(not_found(id)),
    }
}

fn not_found(id: &str) -> ApiError {
    ApiError::not_found("reservation_not_found", format!("no reservation {id}"))
}

/// Exactly one of `<name>_usd` (exact decimal) and `<name>_units`, as internal units.
fn one_amount(name: &str, usd: Option<ExactDecimal>, units: Option<i64>) -> Result<i64, ApiError> {
    match (usd, units) {
        (Some(ExactDecimal(d)), None) => {
            exact_units(d).map_err(|e| ApiError::unprocessable("invalid_amount", format!("{name}_usd: {e}")))
        }
        (None, Some(u)) => Ok(u),
        _ => Err(ApiError::unprocessable(
            "invalid_amount",
            format!("give exactly one of {name}_usd and {name}_units"),
        )),
    }
}

pub(super) fn reservation_error(e: LedgerError) -> ApiError {
    match e {
        LedgerError::NotFound(what) => {
            ApiError::not_found("reservation_not_found", format!("{what} not found"))
        }
        other => super::stripe::ledger_error(other),
    }
}
