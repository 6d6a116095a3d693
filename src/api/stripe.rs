//! `POST /v1/webhooks/stripe`: credit top-ups from Stripe, exactly once.
//!
//! Signature (Stripe's scheme): header `Stripe-Signature: t=<unix secs>,v1=<hex>[,v1=...]`,
//! `v1 = HMAC-SHA256(secret, "<t>.<raw body>")`. A timestamp further than the tolerance
//! (300 s, Stripe's default) from now is refused, so a captured request cannot be
//! replayed later; a replay within the window is harmless because crediting is idempotent
//! by payment id.
//!
//! Events handled (anything else is acknowledged and ignored):
//! - `payment_intent.succeeded`: credit `amount_received` cents for `metadata.account_id`;
//!   a payment intent of a Tally checkout session (`metadata.tally_checkout`) is left to
//!   the session's event (`settled_by_checkout`);
//! - `checkout.session.completed`: `payment_status = paid` credits `amount_subtotal`;
//!   `unpaid` (async methods: ACH, SEPA) records the order as pending;
//! - `checkout.session.async_payment_succeeded` / `..._failed`: settle / fail the order;
//! - `charge.refunded`: take back the credits the refunded part of the payment bought
//!   (`payment_refund` entry, once per cumulative `amount_refunded`; see
//!   `topup::refund_payment`);
//! - `customer.subscription.created|updated|deleted`, `invoice.payment_failed`: plans
//!   driven by subscriptions (BroomVA), see `api::subscriptions`.
//!
//! **Which amount is the credit.** A checkout session's `amount_subtotal`: the price of the
//! credits before tax and discounts. `amount_total` includes tax, which is owed to a tax
//! authority, not the customer's to spend; a discount lowers what was paid, not what was
//! bought. Sessions without `amount_subtotal` fall back to `amount_total`. A payment
//! intent created directly (no Checkout, so no tax) credits `amount_received`.
//!
//! The order id is the payment intent id, so a checkout's `checkout.session.completed`
//! and its `payment_intent.succeeded` credit once between them: the first event recorded
//! stands and the other is acknowledged (`already_recorded`).
//!
//! **Captured money is never refused.** A payment that succeeded but cannot be credited by
//! the rules (outside the top-up limits, not USD, no or an invalid account) is recorded as
//! an order in `needs_review` with the reason and answered 200 `needs_review`, so Stripe
//! stops retrying and an operator resolves it (`tally orders`). Only an event that does
//! not say which payment or how much (no id, no amount) is refused with 422.

use super::{ApiError, AppState};
use crate::ledger::ops::LedgerError;
use crate::ledger::topup::{self, CapturedPayment, TopupRequest};
use crate::metrics as m;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use hmac::{Hmac, Mac};
use rust_decimal::Decimal;
use serde::Deserialize;
use sha2::Sha256;

/// Stripe's default tolerance.
pub const TOLERANCE_SECS: i64 = 300;

#[derive(Debug, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    Stale,
    Mismatch,
}

/// Verify a `Stripe-Signature` header against the raw body. Pure: `now_secs` is passed in.
pub fn verify_signature(
    header: Option<&str>,
    body: &[u8],
    secret: &str,
    now_secs: i64,
    tolerance_secs: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for part in header.split(',') {
        match part.trim().split_once('=') {
            Some(("t", v)) => timestamp = Some(v.parse().map_err(|_| SignatureError::Malformed)?),
            Some(("v1", v)) => signatures.push(hex::decode(v).map_err(|_| SignatureError::Malformed)?),
            _ => {}
        }
    }
    let t = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    if (now_secs - t).abs() > tolerance_secs {
        return Err(SignatureError::Stale);
    }
    for sig in signatures {
        let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
        mac.update(t.to_string().as_bytes());
        mac.update(b".");
        mac.update(body);
        // verify_slice compares in constant time.
        if mac.verify_slice(&sig).is_ok() {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// Sign like Stripe does (tests and the demo use it).
pub fn sign(body: &[u8], secret: &str, t: i64) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

#[derive(Debug, Deserialize)]
struct Event {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: String,
    /// Unix seconds.
    created: Option<i64>,
    data: EventData,
}

#[derive(Debug, Deserialize)]
struct EventData {
    object: serde_json::Value,
}

pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = state.stripe_webhook_secret.as_deref().ok_or_else(|| {
        ApiError::unavailable("stripe webhooks are not configured (TALLY_STRIPE_WEBHOOK_SECRET)")
    })?;
    let header = headers.get("stripe-signature").and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    verify_signature(header, &body, secret, now, TOLERANCE_SECS).map_err(|e| match e {
        SignatureError::Stale => {
            ApiError::bad_request("stale_signature", "signature timestamp outside tolerance")
        }
        _ => ApiError::bad_request("invalid_signature", "Stripe-Signature does not verify"),
    })?;
    let event: Event = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_body", format!("not a Stripe event: {e}")))?;
    let outcome = handle(&state, &event).await?;
    Ok(Json(serde_json::json!({"received": true, "outcome": outcome})))
}

async fn handle(state: &AppState, event: &Event) -> Result<&'static str, ApiError> {
    let obj = &event.data.object;
    let cfg = &state.ledger_config.topup;
    match event.kind.as_str() {
        "payment_intent.succeeded" => {
            let from_checkout = obj.pointer("/metadata/tally_checkout").and_then(|v| v.as_str())
                == Some(crate::payments::CHECKOUT_MARK);
            if from_checkout && obj.pointer("/metadata/account_id").is_none() {
                // A Tally checkout's payment: its checkout.session.completed credits the
                // subtotal; crediting here would take the taxed total or, with no account,
                // send captured money to review.
                return Ok("settled_by_checkout");
            }
            let p = payment(obj, "id", &["amount_received"])?;
            captured(state, &p).await
        }
        "checkout.session.completed" | "checkout.session.async_payment_succeeded" => {
            let p = payment(obj, "payment_intent", &["amount_subtotal", "amount_total"])?;
            let paid = obj.get("payment_status").and_then(|v| v.as_str()) == Some("paid");
            if paid || event.kind.ends_with("async_payment_succeeded") {
                captured(state, &p).await
            } else {
                // Not captured yet: refusing costs the customer nothing (no money moved).
                topup::record_pending(&state.pool, cfg, &request(&p)?).await.map_err(ledger_error)?;
                Ok("pending")
            }
        }
        "checkout.session.async_payment_failed" => {
            let p = payment(obj, "payment_intent", &["amount_subtotal", "amount_total"])?;
            topup::fail(&state.pool, &p.order_id).await.map_err(ledger_error)?;
            Ok("failed")
        }
        "charge.refunded" => refunded(state, obj).await,
        "customer.subscription.created"
        | "customer.subscription.updated"
        | "customer.subscription.deleted" => {
            super::subscriptions::subscription_event(state, &meta(event)?, obj).await
        }
        "invoice.payment_failed" => super::subscriptions::payment_failed(state, &meta(event)?, obj).await,
        _ => Ok("ignored"),
    }
}

/// The id and creation time a subscription event must carry (idempotency and order).
fn meta(event: &Event) -> Result<super::subscriptions::EventMeta<'_>, ApiError> {
    let id = event
        .id
        .as_deref()
        .filter(|id| !id.is_empty() && id.len() <= 255)
        .ok_or_else(|| ApiError::unprocessable("missing_event_id", "the event has no id"))?;
    let created = event
        .created
        .and_then(|t| chrono::DateTime::from_timestamp(t, 0))
        .ok_or_else(|| ApiError::unprocessable("missing_created", "the event has no valid created time"))?;
    Ok(super::subscriptions::EventMeta { id, kind: &event.kind, created })
}

/// `charge.refunded`: the charge's payment intent and its cumulative `amount_refunded`.
async fn refunded(state: &AppState, obj: &serde_json::Value) -> Result<&'static str, ApiError> {
    let order_id = obj
        .get("payment_intent")
        .and_then(|v| v.as_str())
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .ok_or_else(|| ApiError::unprocessable("missing_payment_id", "payment_intent is missing"))?;
    let total = obj
        .get("amount_refunded")
        .and_then(|v| v.as_i64())
        .filter(|c| *c > 0)
        .ok_or_else(|| ApiError::unprocessable("missing_amount", "amount_refunded is missing"))?;
    use topup::RefundOutcome as R;
    Ok(match topup::refund_payment(&state.pool, order_id, total).await.map_err(ledger_error)? {
        R::Debited(_) => "refund_debited",
        R::AlreadyRecorded => "already_recorded",
        R::NotCredited => "refund_noted",
        R::UnknownPayment => {
            tracing::warn!(order_id, "refund of a payment Tally never credited");
            "unknown_payment"
        }
    })
}

/// Money the processor captured: credited, or recorded for review; never refused.
pub(super) async fn captured(state: &AppState, p: &CapturedPayment) -> Result<&'static str, ApiError> {
    let known = topup::find(&state.pool, &p.order_id).await.map_err(ledger_error)?;
    let before = known.as_ref().map(|o| o.status.clone());
    let order =
        topup::record_captured(&state.pool, &state.ledger_config.topup, p).await.map_err(ledger_error)?;
    Ok(match (before.as_deref(), order.status.as_str()) {
        (Some(b), now) if b == now => "already_recorded",
        (_, "succeeded") => "credited",
        (_, "needs_review") => {
            metrics::counter!(m::TOPUP_NEEDS_REVIEW).increment(1);
            tracing::warn!(order_id = %order.order_id, reason = ?order.review_reason, "captured payment needs review");
            "needs_review"
        }
        (_, "refund_noted") => "already_recorded",
        _ => "already_recorded",
    })
}

/// Parse what a Stripe object says about a payment: the order id and the amount must be
/// there (422 otherwise); account and currency are checked by the ledger's rules.
fn payment(
    obj: &serde_json::Value,
    id_field: &str,
    amount_fields: &[&str],
) -> Result<CapturedPayment, ApiError> {
    let text = |f: &str| obj.get(f).and_then(|v| v.as_str()).map(str::to_string);
    let order_id = text(id_field)
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .ok_or_else(|| ApiError::unprocessable("missing_payment_id", format!("{id_field} is missing")))?;
    let account_id = obj
        .get("metadata")
        .and_then(|m| m.get("account_id"))
        .and_then(|v| v.as_str())
        .map(str::to_string)
        .or_else(|| text("client_reference_id"));
    let amount_minor = amount_fields
        .iter()
        .find_map(|f| obj.get(*f).and_then(|v| v.as_i64()))
        .filter(|c| *c > 0)
        .ok_or_else(|| {
            ApiError::unprocessable("missing_amount", format!("{} is missing", amount_fields[0]))
        })?;
    let currency = obj.get("currency").and_then(|v| v.as_str()).unwrap_or("usd").to_ascii_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ApiError::unprocessable("invalid_currency", format!("currency {currency:?}")));
    }
    Ok(CapturedPayment { order_id, account_id, currency, amount_minor, source: "stripe" })
}

/// A payment not captured yet must pass the rules now (422 otherwise).
fn request(p: &CapturedPayment) -> Result<TopupRequest, ApiError> {
    if p.account_id.is_none() {
        return Err(ApiError::unprocessable("missing_account", "metadata.account_id is missing"));
    }
    if p.currency != "usd" {
        return Err(ApiError::unprocessable("unsupported_currency", format!("currency {}", p.currency)));
    }
    if p.account_id.as_ref().is_some_and(|a| a.is_empty() || a.len() > crate::event::ID_LEN_MAX) {
        return Err(ApiError::unprocessable("invalid_account_id", "account id must be 1..=128 bytes"));
    }
    Ok(TopupRequest {
        order_id: p.order_id.clone(),
        account_id: p.account_id.clone().unwrap_or_default(),
        paid_usd: Decimal::new(p.amount_minor, 2),
        source: "stripe",
    })
}

pub(crate) fn ledger_error(e: LedgerError) -> ApiError {
    use axum::http::StatusCode;
    match e {
        LedgerError::Conflict { key } => ApiError::new(
            StatusCode::CONFLICT,
            "idempotency_conflict",
            format!("{key} reused with a different payload"),
        ),
        LedgerError::InsufficientFunds { .. } => {
            ApiError::new(StatusCode::PAYMENT_REQUIRED, "insufficient_quota", e.to_string())
        }
        LedgerError::NotFound(what) => ApiError::not_found("not_found", format!("{what} not found")),
        LedgerError::InvalidState(m) => ApiError::new(StatusCode::CONFLICT, "invalid_state", m),
        LedgerError::Invalid(m) => ApiError::unprocessable("invalid_request", m),
        LedgerError::NotAllowed(m) => ApiError::new(StatusCode::FORBIDDEN, "plan_change_not_allowed", m),
        LedgerError::Db(e) => ApiError::internal(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test";

    #[test]
    fn a_good_signature_verifies() {
        let body = br#"{"type":"x"}"#;
        let header = sign(body, SECRET, 1_000);
        assert_eq!(verify_signature(Some(&header), body, SECRET, 1_100, 300), Ok(()));
    }

    #[test]
    fn bad_stale_missing_and_malformed_signatures_are_refused() {
        let body = br#"{"type":"x"}"#;
        let header = sign(body, SECRET, 1_000);
        assert_eq!(verify_signature(Some(&header), b"{}", SECRET, 1_000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&header), body, "other", 1_000, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify_signature(Some(&header), body, SECRET, 1_301, 300), Err(SignatureError::Stale));
        assert_eq!(verify_signature(None, body, SECRET, 1_000, 300), Err(SignatureError::Missing));
        assert_eq!(
            verify_signature(Some("t=abc,v1=00"), body, SECRET, 1_000, 300),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_signature(Some("t=1000"), body, SECRET, 1_000, 300),
            Err(SignatureError::Malformed)
        );
        assert_eq!(
            verify_signature(Some("t=1000,v1=zz"), body, SECRET, 1_000, 300),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn any_of_several_v1_signatures_may_match() {
        let body = b"{}";
        let good = sign(body, SECRET, 50);
        let v1 = good.split_once(",v1=").unwrap().1;
        let header = format!("t=50,v1={},v1={v1}", "00".repeat(32));
        assert_eq!(verify_signature(Some(&header), body, SECRET, 50, 300), Ok(()));
    }
}
