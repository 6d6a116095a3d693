//! Deductions reported by gateways (Reeve's `deduct` and `deduct/batch`), written by
//! `ledger::deductions`. Capability: `Gateway` (service tokens, and owners).
//!
//! - `POST /v1/deductions` `{account_id | user_id, amount, idempotency_key, description?}`
//!   -> 200 `{"deduction": ...}` (`replayed: true` when the key was seen with the same
//!   payload); 409 `idempotency_conflict` for the same key with another payload.
//! - `POST /v1/deductions/batch` `{"deductions": [...]}` (1..=1000) -> 200 with one result
//!   per item, in order, all in one transaction. A malformed item refuses the whole batch
//!   (422 naming it); a conflicting key fails its item only.
//!
//! `amount` is USD, a decimal string (`"0.05"`) or a JSON number (`0.05`) read exactly
//! from its text; positive, at most 8 decimals. A deduction may take the balance below
//! zero: the usage already happened (see `ledger::deductions`).

use super::auth::{Caller, Capability, account_not_found};
use super::extract::{ApiJson, ExactDecimal, body_id};
use super::{ApiError, AppState};
use crate::ledger::deductions::{
    self, BATCH_ITEMS_MAX, DEDUCTION_UNITS_MAX, DESCRIPTION_LEN_MAX, Deducted, DeductionRequest,
};
use crate::ledger::ops::LedgerError;
use crate::money::exact_units;
use crate::money::units_to_usd_string;
use axum::Json;
use axum::extract::State;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeductionBody {
    /// Reeve calls it `user_id`.
    #[serde(alias = "user_id")]
    account_id: String,
    amount: ExactDecimal,
    idempotency_key: String,
    description: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchBody {
    deductions: Vec<DeductionBody>,
}

#[derive(Debug, Serialize)]
pub struct DeductionView {
    pub entry_id: i64,
    pub account_id: String,
    pub idempotency_key: String,
    /// The entry's signed amount (negative), USD.
    pub amount: String,
    pub amount_units: i64,
    pub balance_after: String,
    pub balance_after_units: i64,
    /// True when an earlier call with this key recorded it.
    pub replayed: bool,
}

impl DeductionView {
    fn new(d: Deducted, idempotency_key: String) -> DeductionView {
        let e = d.entry;
        DeductionView {
            entry_id: e.entry_id,
            account_id: e.account_id,
            idempotency_key,
            amount: units_to_usd_string(e.amount_units),
            amount_units: e.amount_units,
            balance_after: units_to_usd_string(e.balance_after_units),
            balance_after_units: e.balance_after_units,
            replayed: d.replayed,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct SingleResult {
    pub deduction: DeductionView,
}

#[derive(Debug, Serialize)]
pub struct ItemError {
    pub code: &'static str,
    pub message: String,
}

#[derive(Debug, Serialize)]
pub struct ItemResult {
    pub index: usize,
    /// deducted, replayed or failed.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub deduction: Option<DeductionView>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ItemError>,
}

#[derive(Debug, Serialize)]
pub struct BatchResult {
    pub results: Vec<ItemResult>,
    pub deducted: usize,
    pub replayed: usize,
    pub failed: usize,
}

pub async fn single(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<DeductionBody>,
) -> Result<Json<SingleResult>, ApiError> {
    caller.require(Capability::Gateway)?;
    let req = request(&caller, body, "")?;
    caller.check(&req.account_id, Capability::Gateway)?;
    let key = req.idempotency_key.clone();
    let d = deductions::deduct(&state.pool, &req).await.map_err(super::stripe::ledger_error)?;
    Ok(Json(SingleResult { deduction: DeductionView::new(d, key) }))
}

pub async fn batch(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(body): ApiJson<BatchBody>,
) -> Result<Json<BatchResult>, ApiError> {
    caller.require(Capability::Gateway)?;
    let n = body.deductions.len();
    if n == 0 || n > BATCH_ITEMS_MAX {
        return Err(ApiError::unprocessable(
            "invalid_batch_size",
            format!("a batch holds 1..={BATCH_ITEMS_MAX} deductions, got {n}"),
        ));
    }
    let reqs = body
        .deductions
        .into_iter()
        .enumerate()
        .map(|(i, b)| request(&caller, b, &format!("deductions[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    // Authorization is all or nothing: a batch naming an account the token cannot see is
    // refused whole, before anything is written.
    if let Some(r) = reqs.iter().find(|r| !caller.can_see(&r.account_id)) {
        return Err(account_not_found(&r.account_id));
    }
    let outcomes = deductions::deduct_batch(&state.pool, &reqs).await.map_err(super::stripe::ledger_error)?;
    Ok(Json(summarize(reqs, outcomes)))
}

fn summarize(reqs: Vec<DeductionRequest>, outcomes: Vec<Result<Deducted, LedgerError>>) -> BatchResult {
    let mut out =
        BatchResult { results: Vec::with_capacity(reqs.len()), deducted: 0, replayed: 0, failed: 0 };
    for (index, (req, outcome)) in reqs.into_iter().zip(outcomes).enumerate() {
        let item = match outcome {
            Ok(d) => {
                let status = if d.replayed { "replayed" } else { "deducted" };
                let deduction = Some(DeductionView::new(d, req.idempotency_key));
                ItemResult { index, status, deduction, error: None }
            }
            Err(e) => {
                let api = super::stripe::ledger_error(e);
                let error = Some(ItemError { code: api.code, message: api.message });
                ItemResult { index, status: "failed", deduction: None, error }
            }
        };
        match item.status {
            "deducted" => out.deducted += 1,
            "replayed" => out.replayed += 1,
            _ => out.failed += 1,
        }
        out.results.push(item);
    }
    out
}

/// Parse one body into a ledger request; `at` prefixes field names in errors.
fn request(caller: &Caller, b: DeductionBody, at: &str) -> Result<DeductionRequest, ApiError> {
    body_id(&format!("{at}account_id"), &b.account_id)?;
    body_id(&format!("{at}idempotency_key"), &b.idempotency_key)?;
    let invalid = |m: String| ApiError::unprocessable("invalid_amount", format!("{at}amount: {m}"));
    let units = exact_units(b.amount.0).map_err(invalid)?;
    if units <= 0 || units > DEDUCTION_UNITS_MAX {
        return Err(invalid(format!(
            "must be positive and at most {} USD",
            units_to_usd_string(DEDUCTION_UNITS_MAX)
        )));
    }
    let description = b.description.unwrap_or_default();
    if description.len() > DESCRIPTION_LEN_MAX {
        return Err(ApiError::unprocessable(
            "invalid_description",
            format!("{at}description must be at most {DESCRIPTION_LEN_MAX} bytes"),
        ));
    }
    Ok(DeductionRequest {
        account_id: b.account_id,
        amount_units: units,
        idempotency_key: b.idempotency_key,
        description,
        created_by: Some(caller.token_id().to_string()),
    })
}
