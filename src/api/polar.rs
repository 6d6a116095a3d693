//! `POST /v1/webhooks/polar`: credit Polar orders (Struere), exactly once per order id.
//!
//! Signature (Polar follows Standard Webhooks): headers `webhook-id`, `webhook-timestamp`
//! (Unix seconds) and `webhook-signature` (`v1,<base64>`, space-separated when several),
//! `base64(HMAC-SHA256(key, "<id>.<timestamp>.<raw body>"))`. The key is the secret's
//! UTF-8 bytes (what Polar's SDK does with the secret it shows), or, for a `whsec_<base64>`
//! secret, the decoded bytes (the Standard Webhooks form). A timestamp more than 300 s from
//! now is refused; a replay within it is harmless (crediting is idempotent by order id).
//!
//! Events: `order.paid`, and `order.updated` / `order.created` with `status = "paid"`,
//! credit the order's `subtotal_amount` (cents, before tax and discounts, as for Stripe
//! Checkout; `amount` when absent) to `metadata.account_id` (or `customer.external_id`),
//! converted exactly (1 cent = 10,000 microdollars = 1,000,000 internal units), once per
//! order id (`topup:<order_id>`). As for Stripe, captured money is never refused: an
//! amount below the catalog's minimum purchase ($1 for Struere), another currency or no
//! account is recorded for review. Anything else is acknowledged and ignored.

use super::{ApiError, AppState};
use crate::ledger::topup::CapturedPayment;
use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Standard Webhooks' tolerance.
pub const TOLERANCE_SECS: i64 = 300;

/// The HMAC key of a Polar secret (see the module doc).
fn key(secret: &str) -> Vec<u8> {
    match secret.strip_prefix("whsec_").map(|b| B64.decode(b)) {
        Some(Ok(bytes)) => bytes,
        _ => secret.as_bytes().to_vec(),
    }
}

/// `v1,<base64>` for `body` (tests and tools sign with it).
pub fn sign(id: &str, timestamp: i64, body: &[u8], secret: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", B64.encode(mac.finalize().into_bytes()))
}

/// Verify the three headers against the raw body. Pure: `now_secs` is passed in.
pub fn verify(
    id: Option<&str>,
    timestamp: Option<&str>,
    signatures: Option<&str>,
    body: &[u8],
    secret: &str,
    now_secs: i64,
) -> Result<(), &'static str> {
    let (Some(id), Some(ts), Some(sigs)) = (id, timestamp, signatures) else {
        return Err("webhook-id, webhook-timestamp and webhook-signature are required");
    };
    let ts: i64 = ts.trim().parse().map_err(|_| "webhook-timestamp is not a number")?;
    if (now_secs - ts).abs() > TOLERANCE_SECS {
        return Err("webhook-timestamp outside tolerance");
    }
    for sig in sigs.split_whitespace() {
        let Some(b64) = sig.strip_prefix("v1,") else { continue };
        let Ok(given) = B64.decode(b64) else { continue };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key(secret)).expect("HMAC takes any key length");
        mac.update(format!("{id}.{ts}.").as_bytes());
        mac.update(body);
        if mac.verify_slice(&given).is_ok() {
            return Ok(());
        }
    }
    Err("webhook-signature does not verify")
}

pub async fn webhook(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<serde_json::Value>, ApiError> {
    let secret = state.polar_webhook_secret.as_deref().ok_or_else(|| {
        ApiError::unavailable("polar webhooks are not configured (TALLY_POLAR_WEBHOOK_SECRET)")
    })?;
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = chrono::Utc::now().timestamp();
    verify(
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        &body,
        secret,
        now,
    )
    .map_err(|why| ApiError::bad_request("invalid_signature", why))?;
    let event: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request("malformed_body", format!("not a Polar event: {e}")))?;
    let kind = event.get("type").and_then(|v| v.as_str()).unwrap_or("");
    let order = event.get("data").cloned().unwrap_or_default();
    let paid = order.get("status").and_then(|v| v.as_str()) == Some("paid");
    let outcome = match kind {
        "order.paid" => captured(&state, &order).await?,
        "order.updated" | "order.created" if paid => captured(&state, &order).await?,
        _ => "ignored",
    };
    Ok(Json(serde_json::json!({"received": true, "outcome": outcome})))
}

async fn captured(state: &AppState, order: &serde_json::Value) -> Result<&'static str, ApiError> {
    let text = |v: Option<&serde_json::Value>| v.and_then(|v| v.as_str()).map(str::to_string);
    let order_id = text(order.get("id"))
        .filter(|id| !id.is_empty() && id.len() <= 200)
        .ok_or_else(|| ApiError::unprocessable("missing_payment_id", "data.id is missing"))?;
    let account_id = text(order.get("metadata").and_then(|m| m.get("account_id")))
        .or_else(|| text(order.get("customer").and_then(|c| c.get("external_id"))));
    let amount_minor = ["subtotal_amount", "amount"]
        .iter()
        .find_map(|f| order.get(*f).and_then(|v| v.as_i64()))
        .filter(|c| *c > 0)
        .ok_or_else(|| ApiError::unprocessable("missing_amount", "data.subtotal_amount is missing"))?;
    let currency = text(order.get("currency")).unwrap_or_else(|| "usd".into()).to_ascii_lowercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_lowercase()) {
        return Err(ApiError::unprocessable("invalid_currency", format!("currency {currency:?}")));
    }
    let p = CapturedPayment { order_id, account_id, currency, amount_minor, source: "polar" };
    super::stripe::captured(state, &p).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_verify_like_standard_webhooks() {
        let body = br#"{"type":"order.paid"}"#;
        let now = 1_800_000_000;
        let sig = sign("msg_1", now, body, "polar_secret");
        assert!(verify(Some("msg_1"), Some(&now.to_string()), Some(&sig), body, "polar_secret", now).is_ok());
        // Several signatures (a rotation): one good one is enough.
        let both = format!("v1,AAAA {sig}");
        assert!(
            verify(Some("msg_1"), Some(&now.to_string()), Some(&both), body, "polar_secret", now).is_ok()
        );
        let bad = |id, body: &[u8], secret, at: i64| {
            verify(Some(id), Some(&now.to_string()), Some(&sig), body, secret, at)
        };
        assert!(bad("msg_2", body, "polar_secret", now).is_err(), "another id");
        assert!(bad("msg_1", b"{}", "polar_secret", now).is_err(), "another body");
        assert!(bad("msg_1", body, "other", now).is_err(), "another secret");
        assert!(bad("msg_1", body, "polar_secret", now + 301).is_err(), "stale");
        assert!(verify(None, Some("1"), Some(&sig), body, "polar_secret", now).is_err());
        // A whsec_ secret is the base64 of the key.
        let whsec = format!("whsec_{}", B64.encode(b"raw key"));
        let sig = sign("m", now, body, &whsec);
        assert_eq!(sig, sign("m", now, body, "raw key"));
    }
}
