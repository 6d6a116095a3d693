//! The payment providers' HTTP APIs: create a checkout session.
//!
//! Base URLs are settings (`TALLY_STRIPE_API_BASE`, `TALLY_POLAR_API_BASE`) so a staging
//! proxy, or the tests' local servers speaking the same protocol, can stand in for
//! `api.stripe.com` and `api.polar.sh`. Credentials come from the environment only
//! (`TALLY_STRIPE_SECRET_KEY`, `TALLY_POLAR_ACCESS_TOKEN`) and are never logged.

use super::{CheckoutAmount, CheckoutConfig, Provider};
use std::time::Duration;

/// One provider account: where its API is and the credential it takes.
#[derive(Clone)]
pub struct ProviderAccount {
    pub base_url: String,
    pub secret: String,
}

impl std::fmt::Debug for ProviderAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProviderAccount").field("base_url", &self.base_url).finish_non_exhaustive()
    }
}

/// The provider accounts `tally run` was given, and one HTTP client for them.
#[derive(Debug, Clone, Default)]
pub struct Providers {
    http: reqwest::Client,
    pub stripe: Option<ProviderAccount>,
    pub polar: Option<ProviderAccount>,
}

/// What the customer is sent to.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct CheckoutSession {
    pub session_id: String,
    pub checkout_url: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("{0} checkout is not configured ({1} is not set)")]
    NotConfigured(&'static str, &'static str),
    #[error("{provider} refused the checkout (HTTP {status}): {message}")]
    Refused { provider: &'static str, status: u16, message: String },
    #[error("{provider} could not be reached: {message}")]
    Unreachable { provider: &'static str, message: String },
}

/// A provider that does not answer within this is treated as down (the customer retries).
const PROVIDER_TIMEOUT: Duration = Duration::from_secs(15);

impl Providers {
    pub fn new(
        stripe: Option<ProviderAccount>,
        polar: Option<ProviderAccount>,
    ) -> reqwest::Result<Providers> {
        let http = reqwest::Client::builder().timeout(PROVIDER_TIMEOUT).build()?;
        Ok(Providers { http, stripe, polar })
    }

    /// Create the session. `idempotency_key`: the caller's, passed to Stripe as its
    /// `Idempotency-Key` (a retried request returns the same session, not a second one).
    pub async fn create_checkout(
        &self,
        cfg: &CheckoutConfig,
        provider: Provider,
        account_id: &str,
        amount: &CheckoutAmount,
        idempotency_key: Option<&str>,
    ) -> Result<CheckoutSession, ProviderError> {
        match provider {
            Provider::Stripe => {
                let acct = self
                    .stripe
                    .as_ref()
                    .ok_or(ProviderError::NotConfigured("stripe", "TALLY_STRIPE_SECRET_KEY"))?;
                let url = format!("{}/v1/checkout/sessions", acct.base_url.trim_end_matches('/'));
                let mut req = self
                    .http
                    .post(url)
                    .bearer_auth(&acct.secret)
                    .form(&super::stripe_session_form(cfg, account_id, amount));
                if let Some(key) = idempotency_key {
                    req = req.header("Idempotency-Key", format!("tally-checkout:{account_id}:{key}"));
                }
                send("stripe", req).await
            }
            Provider::Polar => {
                let acct = self
                    .polar
                    .as_ref()
                    .ok_or(ProviderError::NotConfigured("polar", "TALLY_POLAR_ACCESS_TOKEN"))?;
                let url = format!("{}/v1/checkouts/", acct.base_url.trim_end_matches('/'));
                let req = self
                    .http
                    .post(url)
                    .bearer_auth(&acct.secret)
                    .json(&super::polar_checkout_body(cfg, account_id, amount));
                send("polar", req).await
            }
        }
    }
}

/// Both providers answer a created session with `{"id": ..., "url": ...}`; errors carry a
/// message (`error.message` at Stripe, `detail` at Polar).
async fn send(
    provider: &'static str,
    req: reqwest::RequestBuilder,
) -> Result<CheckoutSession, ProviderError> {
    let unreachable = |e: reqwest::Error| ProviderError::Unreachable { provider, message: e.to_string() };
    let resp = req.send().await.map_err(unreachable)?;
    let status = resp.status().as_u16();
    let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
    let text = |v: &serde_json::Value| v.as_str().filter(|s| !s.is_empty()).map(str::to_string);
    if !(200..300).contains(&status) {
        let message = text(&body["error"]["message"])
            .or_else(|| text(&body["detail"]))
            .or_else(|| body["detail"].as_array().map(|d| serde_json::Value::Array(d.clone()).to_string()))
            .unwrap_or_else(|| "no message".into());
        return Err(ProviderError::Refused { provider, status, message });
    }
    match (text(&body["id"]), text(&body["url"])) {
        (Some(session_id), Some(checkout_url)) => Ok(CheckoutSession { session_id, checkout_url }),
        _ => Err(ProviderError::Refused { provider, status, message: "the answer has no id or url".into() }),
    }
}
