//! `POST /v1/accounts/{id}/checkout` `{amount_usd?, pack?, idempotency_key?}` ->
//! `{checkout_url, session_id, provider, amount_usd, pack, credit_usd, display}`: start a
//! credit purchase (`credit_usd`: what it will credit, bonus tiers included; `display`: both
//! in the catalog's credit unit).
//!
//! The amount is decided and checked *before* the customer pays (`payments::checkout_amount`:
//! a pack from `[[topup.packs]]`, the amount asked within `[topup]`'s limits, or the
//! catalog's `default_usd`); a refusal is 422 with the rule's code and no session is
//! created. Then the session is created at the catalog's `[checkout] provider` (Stripe
//! Checkout or Polar) and the customer is sent to its URL. Nothing is credited here: the
//! provider's signed webhook credits the payment once it is captured (`api::stripe`,
//! `api::polar`), exactly once per payment. A provider that refuses or cannot be reached
//! is 502 `payment_provider_error`; checkout not configured is 503. Capability: `Billing`.

use super::auth::{Caller, Capability};
use super::extract::{ApiJson, ApiPath, ExactDecimal, body_id, path_account_id};
use super::{ApiError, AppState};
use crate::payments::client::{CheckoutSession, ProviderError};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutBody {
    amount_usd: Option<ExactDecimal>,
    pack: Option<String>,
    /// A retry with the same key gets the same session from the provider (Stripe), not a
    /// second one.
    idempotency_key: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct CheckoutAnswer {
    #[serde(flatten)]
    session: CheckoutSession,
    provider: &'static str,
    account_id: String,
    /// What the customer will be charged, in USD (a decimal string).
    amount_usd: String,
    pack: Option<String>,
    /// What the payment will credit once captured, bonus tiers included (Brievio: $100
    /// credits $110), USD.
    credit_usd: String,
    /// Both in the catalog's display unit (`[catalog.display]`).
    display: CheckoutDisplay,
}

#[derive(Debug, Serialize)]
struct CheckoutDisplay {
    unit: String,
    amount: crate::pricing::DisplayAmount,
    credit: crate::pricing::DisplayAmount,
}

pub async fn create(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CheckoutBody>,
) -> Result<(StatusCode, Json<CheckoutAnswer>), ApiError> {
    path_account_id(&id)?;
    caller.check(&id, Capability::Billing)?;
    if let Some(key) = &body.idempotency_key {
        body_id("idempotency_key", key)?;
    }
    if body.pack.as_ref().is_some_and(|p| p.is_empty() || p.len() > 64) {
        return Err(ApiError::unprocessable("unknown_pack", "pack must be 1..=64 bytes"));
    }
    let cfg = &state.ledger_config;
    let amount =
        crate::payments::checkout_amount(&cfg.topup, body.amount_usd.map(|d| d.0), body.pack.as_deref())
            .map_err(|e| ApiError::unprocessable(e.code(), e.to_string()))?;
    let (paid_units, credit_units) = amount.units;
    let provider = cfg.checkout.provider.ok_or_else(|| {
        ApiError::unavailable("checkout is not configured: the catalog has no [checkout] provider")
    })?;
    let session = state
        .payments
        .create_checkout(&cfg.checkout, provider, &id, &amount, body.idempotency_key.as_deref())
        .await
        .map_err(|e| match e {
            ProviderError::NotConfigured(..) => ApiError::unavailable(e.to_string()),
            _ => {
                metrics::counter!(crate::metrics::CHECKOUT_ERRORS, "provider" => provider.as_str())
                    .increment(1);
                tracing::warn!(account_id = %id, error = %e, "checkout session not created");
                ApiError::new(StatusCode::BAD_GATEWAY, "payment_provider_error", e.to_string())
            }
        })?;
    metrics::counter!(crate::metrics::CHECKOUTS_CREATED, "provider" => provider.as_str()).increment(1);
    let answer = CheckoutAnswer {
        session,
        provider: provider.as_str(),
        account_id: id,
        amount_usd: amount.usd.to_string(),
        pack: amount.pack,
        credit_usd: crate::money::units_to_usd_string(credit_units),
        display: CheckoutDisplay {
            unit: state.catalog.display_unit().unit_name.clone(),
            amount: state.catalog.display_unit().amount(paid_units),
            credit: state.catalog.display_unit().amount(credit_units),
        },
    };
    Ok((StatusCode::CREATED, Json(answer)))
}
