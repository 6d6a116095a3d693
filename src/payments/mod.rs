//! Payments in, before and after the money moves.
//!
//! - **Checkout** (`POST /v1/accounts/{id}/checkout`, Reeve, Brokr, Struere): the amount or
//!   pack is checked against the catalog's `[topup]` limits and packs *before* any payment,
//!   then a session is created at the configured provider (Stripe Checkout or Polar) and its
//!   URL returned. The money is credited later, by the provider's signed webhook
//!   (`api::stripe`, `api::polar`), exactly once per payment.
//! - **Subscriptions** (BroomVA): Stripe's `customer.subscription.*` events drive the
//!   account's plan through the plan rules (`quota::store::change_plan`);
//!   `invoice.payment_failed` does what `[subscriptions] on_payment_failed` says.
//!
//! This module is pure (what to ask the provider, what an event means); [`client`] talks
//! to the providers.
//!
//! ```toml
//! [topup]
//! min_usd = "5"
//! max_usd = "1000"
//! default_usd = "25"          # Brokr: `brokr topup` with no amount
//! [[topup.packs]]             # Reeve's credit packs: the price is the credit
//! name = "standard"
//! usd = "25"
//!
//! [checkout]
//! provider = "stripe"         # or "polar"
//! success_url = "https://app.example.com/billing?paid=1"
//! cancel_url = "https://app.example.com/billing"
//! product_name = "Reeve credits"
//! # polar_product_id = "..."  # Polar: the pay-what-you-want product a checkout sells
//!
//! [subscriptions]             # BroomVA
//! free_plan = "free"          # where customer.subscription.deleted takes the account
//! on_payment_failed = "notify" # or "downgrade" (to free_plan at once)
//! [subscriptions.prices]      # Stripe price id -> plan
//! price_pro_monthly = "pro"
//! ```

pub mod client;

use crate::ledger::config::TopupConfig;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;

/// `[checkout]`. Without a provider, checkout answers 503 (the platform takes payments
/// elsewhere and only sends webhooks).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckoutConfig {
    pub provider: Option<Provider>,
    /// Where the provider sends the customer after paying / giving up.
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    /// The line item's name on Stripe's page ("Credits" unless set).
    #[serde(default = "default_product_name")]
    pub product_name: String,
    /// Polar sells a product: a pay-what-you-want product whose price the checkout sets.
    pub polar_product_id: Option<String>,
}

impl Default for CheckoutConfig {
    fn default() -> Self {
        CheckoutConfig {
            provider: None,
            success_url: None,
            cancel_url: None,
            product_name: default_product_name(),
            polar_product_id: None,
        }
    }
}

fn default_product_name() -> String {
    "Credits".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Stripe,
    Polar,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::Polar => "polar",
        }
    }
}

/// `[subscriptions]`: Stripe subscriptions drive plans.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionConfig {
    /// Stripe price id -> plan name.
    #[serde(default)]
    pub prices: BTreeMap<String, String>,
    /// The plan an account falls back to when its subscription ends.
    pub free_plan: Option<String>,
    #[serde(default)]
    pub on_payment_failed: PaymentFailedPolicy,
}

/// What `invoice.payment_failed` does. Stripe retries a failed invoice on its own schedule
/// (Smart Retries) and ends the subscription when it gives up, which arrives as
/// `customer.subscription.deleted` or a status of `canceled` / `unpaid`: so the default
/// only tells someone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailedPolicy {
    /// Count it (`tally_subscription_payments_failed_total`) and log it with the account:
    /// the hook for the owner's notification (BroomVA). The plan stays until Stripe ends it.
    #[default]
    Notify,
    /// Move the account to `free_plan` at once (its allocation with it, by the plan rules).
    Downgrade,
}

impl CheckoutConfig {
    pub fn validate(&self) -> Result<(), String> {
        let Some(provider) = self.provider else { return Ok(()) };
        for (name, url) in [("success_url", &self.success_url), ("cancel_url", &self.cancel_url)] {
            match url {
                Some(u) if u.starts_with("https://") || u.starts_with("http://") => {}
                Some(u) => return Err(format!("checkout.{name} must be an http(s) URL, got {u:?}")),
                None if name == "success_url" => return Err("checkout.success_url is required".into()),
                None => {}
            }
        }
        if provider == Provider::Polar && self.polar_product_id.as_deref().is_none_or(str::is_empty) {
            return Err("checkout: provider \"polar\" needs polar_product_id".into());
        }
        if self.product_name.trim().is_empty() || self.product_name.len() > 200 {
            return Err("checkout.product_name must be 1..=200 bytes".into());
        }
        Ok(())
    }
}

impl SubscriptionConfig {
    /// Every plan named must exist (checked where the plans are known).
    pub fn validate(&self, plan_exists: impl Fn(&str) -> bool) -> Result<(), String> {
        let named = self.prices.values().chain(self.free_plan.as_ref());
        if let Some(missing) = named.into_iter().find(|p| !plan_exists(p)) {
            return Err(format!("subscriptions: no plan {missing:?} in [plans]"));
        }
        if self.on_payment_failed == PaymentFailedPolicy::Downgrade && self.free_plan.is_none() {
            return Err("subscriptions: on_payment_failed = \"downgrade\" needs free_plan".into());
        }
        Ok(())
    }
}

/// What a checkout will charge, decided before any payment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutAmount {
    pub usd: Decimal,
    /// `usd` in cents: what the providers take.
    pub cents: i64,
    /// The pack bought, if one was named.
    pub pack: Option<String>,
    /// (paid, credited) in internal units: what the captured payment will credit, bonus
    /// tiers included (`TopupConfig::credit_for`).
    pub units: (i64, i64),
}

/// Why a checkout is refused before payment (all 422).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckoutError {
    #[error("give amount_usd or pack, not both")]
    AmountAndPack,
    #[error("amount_usd or pack is required (the catalog sets no default amount)")]
    AmountRequired,
    #[error("no pack {0:?}; packs: {1}")]
    UnknownPack(String, String),
    #[error("amount_usd must be positive, in whole cents; got {0}")]
    InvalidAmount(Decimal),
    #[error("{0}")]
    OutOfRange(String),
}

impl CheckoutError {
    pub fn code(&self) -> &'static str {
        match self {
            CheckoutError::AmountAndPack => "amount_and_pack",
            CheckoutError::AmountRequired => "amount_required",
            CheckoutError::UnknownPack(..) => "unknown_pack",
            CheckoutError::InvalidAmount(_) => "invalid_amount",
            CheckoutError::OutOfRange(_) => "amount_out_of_range",
        }
    }
}

/// The amount a checkout charges: the pack's price, the amount asked, or the catalog's
/// default; within `[topup]`'s limits (a pack is the platform's own offer and is not
/// checked against them, but the catalog check refuses packs outside them at load).
pub fn checkout_amount(
    topup: &TopupConfig,
    amount_usd: Option<Decimal>,
    pack: Option<&str>,
) -> Result<CheckoutAmount, CheckoutError> {
    let (usd, pack) = match (amount_usd, pack) {
        (Some(_), Some(_)) => return Err(CheckoutError::AmountAndPack),
        (None, Some(name)) => {
            let p = topup.packs.iter().find(|p| p.name == name).ok_or_else(|| {
                let names: Vec<&str> = topup.packs.iter().map(|p| p.name.as_str()).collect();
                CheckoutError::UnknownPack(
                    name.into(),
                    if names.is_empty() { "none".into() } else { names.join(", ") },
                )
            })?;
            (p.usd, Some(p.name.clone()))
        }
        (Some(usd), None) => (usd, None),
        (None, None) => (topup.default_usd.ok_or(CheckoutError::AmountRequired)?, None),
    };
    let cents = usd * Decimal::from(100);
    if usd <= Decimal::ZERO || !cents.fract().is_zero() {
        return Err(CheckoutError::InvalidAmount(usd));
    }
    let cents = i64::try_from(cents).map_err(|_| CheckoutError::InvalidAmount(usd))?;
    let units = topup.credit_for(usd).map_err(CheckoutError::OutOfRange)?;
    Ok(CheckoutAmount { usd: usd.normalize(), cents, pack, units })
}

/// The form Stripe's `POST /v1/checkout/sessions` takes for a one-off credit purchase.
/// The account travels on the session (`client_reference_id`, `metadata.account_id`), whose
/// `checkout.session.completed` credits `amount_subtotal`. Deliberately *not* on the
/// payment intent: its `payment_intent.succeeded` credits `amount_received`, tax included,
/// and would credit the taxed total if it arrived first (README, "Top-ups and captured
/// money"). The payment intent carries `metadata.tally_checkout = "session"` instead: its
/// event is then acknowledged and left to the session's (`api::stripe`), where a payment
/// intent naming no account would otherwise go to review. A refund finds its order by the
/// payment intent, not the account.
pub fn stripe_session_form(
    cfg: &CheckoutConfig,
    account_id: &str,
    amount: &CheckoutAmount,
) -> Vec<(String, String)> {
    let name = match &amount.pack {
        Some(pack) => format!("{} ({pack})", cfg.product_name),
        None => cfg.product_name.clone(),
    };
    let mut form: Vec<(String, String)> = vec![
        ("mode".into(), "payment".into()),
        ("client_reference_id".into(), account_id.into()),
        ("metadata[account_id]".into(), account_id.into()),
        ("payment_intent_data[metadata][tally_checkout]".into(), CHECKOUT_MARK.into()),
        ("line_items[0][quantity]".into(), "1".into()),
        ("line_items[0][price_data][currency]".into(), "usd".into()),
        ("line_items[0][price_data][unit_amount]".into(), amount.cents.to_string()),
        ("line_items[0][price_data][product_data][name]".into(), name),
    ];
    if let Some(pack) = &amount.pack {
        form.push(("metadata[pack]".into(), pack.clone()));
    }
    if let Some(u) = &cfg.success_url {
        form.push(("success_url".into(), u.clone()));
    }
    if let Some(u) = &cfg.cancel_url {
        form.push(("cancel_url".into(), u.clone()));
    }
    form
}

/// `metadata.tally_checkout` of a payment intent a Tally checkout session created.
pub const CHECKOUT_MARK: &str = "session";

/// The JSON Polar's `POST /v1/checkouts/` takes: the pay-what-you-want product at the
/// amount, the account as the customer's external id and in the metadata (Polar copies a
/// checkout's metadata onto its order, which is what `order.updated` carries).
pub fn polar_checkout_body(
    cfg: &CheckoutConfig,
    account_id: &str,
    amount: &CheckoutAmount,
) -> serde_json::Value {
    serde_json::json!({
        "products": [cfg.polar_product_id.clone().unwrap_or_default()],
        "amount": amount.cents,
        "external_customer_id": account_id,
        "metadata": {"account_id": account_id},
        "success_url": cfg.success_url,
    })
}

/// What a subscription event asks of the account's plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlanAction {
    /// Move the account to this plan (the plan rules decide the credit adjustment).
    ChangeTo(String),
    /// Nothing to do, and why (the webhook's outcome).
    Nothing(&'static str),
}

/// Why a subscription event cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubscriptionError {
    #[error("price {0:?} maps to no plan ([subscriptions.prices])")]
    UnknownPrice(String),
    #[error("the subscription names no price")]
    NoPrice,
    #[error("the subscription ended but [subscriptions] sets no free_plan")]
    NoFreePlan,
}

/// The plan a `customer.subscription.*` event leaves the account on. Stripe statuses:
/// `active` and `trialing` are the plan of the subscription's price; `canceled`, `unpaid`
/// and `incomplete_expired` (and a deleted subscription) end it: the free plan;
/// `incomplete` (first payment not made yet) and `past_due` (Stripe is retrying) change
/// nothing. Pure.
pub fn plan_for_subscription(
    cfg: &SubscriptionConfig,
    deleted: bool,
    status: &str,
    price_id: Option<&str>,
) -> Result<PlanAction, SubscriptionError> {
    let free = || cfg.free_plan.clone().map(PlanAction::ChangeTo).ok_or(SubscriptionError::NoFreePlan);
    if deleted {
        return free();
    }
    match status {
        "active" | "trialing" => {
            let price = price_id.ok_or(SubscriptionError::NoPrice)?;
            cfg.prices
                .get(price)
                .map(|plan| PlanAction::ChangeTo(plan.clone()))
                .ok_or_else(|| SubscriptionError::UnknownPrice(price.into()))
        }
        "canceled" | "unpaid" | "incomplete_expired" => free(),
        "past_due" => Ok(PlanAction::Nothing("past_due")),
        "incomplete" => Ok(PlanAction::Nothing("incomplete")),
        _ => Ok(PlanAction::Nothing("unknown_status")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::config::LedgerConfig;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn cfg(toml: &str) -> LedgerConfig {
        LedgerConfig::from_toml_str(toml, "t.toml").unwrap()
    }

    #[test]
    fn brokr_checks_the_amount_before_payment_and_defaults_to_25() {
        let brokr = cfg(include_str!("../../examples/brokr.toml"));
        let t = &brokr.topup;
        assert_eq!(checkout_amount(t, None, None).unwrap().cents, 2_500, "brokr topup: $25");
        assert_eq!(checkout_amount(t, Some(d("100")), None).unwrap().cents, 10_000);
        assert_eq!(checkout_amount(t, Some(d("4.99")), None).unwrap_err().code(), "amount_out_of_range");
        assert_eq!(checkout_amount(t, Some(d("1000.01")), None).unwrap_err().code(), "amount_out_of_range");
        assert_eq!(checkout_amount(t, Some(d("10.001")), None).unwrap_err().code(), "invalid_amount");
        assert_eq!(checkout_amount(t, Some(d("-5")), None).unwrap_err().code(), "invalid_amount");
        assert_eq!(checkout_amount(t, Some(d("5")), Some("x")).unwrap_err().code(), "amount_and_pack");
    }

    #[test]
    fn reeve_sells_its_three_packs_and_nothing_else_by_name() {
        let reeve = cfg(include_str!("../../examples/reeve.toml"));
        let t = &reeve.topup;
        let standard = checkout_amount(t, None, Some("standard")).unwrap();
        assert_eq!((standard.cents, standard.pack.as_deref()), (2_500, Some("standard")));
        assert_eq!(checkout_amount(t, None, Some("starter")).unwrap().cents, 500);
        assert_eq!(checkout_amount(t, None, Some("power")).unwrap().cents, 10_000);
        let err = checkout_amount(t, None, Some("mega")).unwrap_err();
        assert_eq!(err.code(), "unknown_pack");
        assert!(err.to_string().contains("starter, standard, power"), "{err}");
        assert_eq!(checkout_amount(t, None, None).unwrap_err().code(), "amount_required");
    }

    #[test]
    fn struere_refuses_less_than_a_dollar_before_payment() {
        let struere = cfg(include_str!("../../examples/struere.toml"));
        assert_eq!(
            checkout_amount(&struere.topup, Some(d("0.99")), None).unwrap_err().code(),
            "amount_out_of_range"
        );
        assert_eq!(checkout_amount(&struere.topup, Some(d("1")), None).unwrap().cents, 100);
        let body = polar_checkout_body(
            &struere.checkout,
            "org-1",
            &checkout_amount(&struere.topup, Some(d("1")), None).unwrap(),
        );
        assert_eq!(body["amount"], 100);
        assert_eq!(body["metadata"]["account_id"], "org-1");
    }

    #[test]
    fn the_stripe_form_names_the_account_everywhere_a_later_event_reads_it() {
        let reeve = cfg(include_str!("../../examples/reeve.toml"));
        let amount = checkout_amount(&reeve.topup, None, Some("power")).unwrap();
        let form = stripe_session_form(&reeve.checkout, "acct-7", &amount);
        let get = |k: &str| form.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
        assert_eq!(get("mode"), Some("payment"));
        assert_eq!(get("client_reference_id"), Some("acct-7"));
        assert_eq!(get("metadata[account_id]"), Some("acct-7"));
        assert_eq!(get("payment_intent_data[metadata][account_id]"), None, "tax would be credited");
        assert_eq!(get("payment_intent_data[metadata][tally_checkout]"), Some(CHECKOUT_MARK));
        assert_eq!(get("line_items[0][price_data][unit_amount]"), Some("10000"));
        assert_eq!(get("line_items[0][price_data][currency]"), Some("usd"));
    }

    #[test]
    fn subscription_statuses_map_to_plans() {
        let broomva = cfg(include_str!("../../examples/broomva.toml"));
        let s = &broomva.subscriptions;
        let pro = s.prices.iter().find(|(_, p)| *p == "pro").map(|(k, _)| k.clone()).unwrap();
        let change = |p: &str| Ok(PlanAction::ChangeTo(p.into()));
        assert_eq!(plan_for_subscription(s, false, "active", Some(&pro)), change("pro"));
        assert_eq!(plan_for_subscription(s, false, "trialing", Some(&pro)), change("pro"));
        assert_eq!(plan_for_subscription(s, true, "active", Some(&pro)), change("free"));
        assert_eq!(plan_for_subscription(s, false, "canceled", Some(&pro)), change("free"));
        assert_eq!(plan_for_subscription(s, false, "unpaid", Some(&pro)), change("free"));
        assert_eq!(
            plan_for_subscription(s, false, "past_due", Some(&pro)),
            Ok(PlanAction::Nothing("past_due"))
        );
        assert_eq!(
            plan_for_subscription(s, false, "incomplete", None),
            Ok(PlanAction::Nothing("incomplete"))
        );
        assert_eq!(
            plan_for_subscription(s, false, "active", Some("price_nope")),
            Err(SubscriptionError::UnknownPrice("price_nope".into()))
        );
        assert_eq!(plan_for_subscription(s, false, "active", None), Err(SubscriptionError::NoPrice));
        let none = SubscriptionConfig::default();
        assert_eq!(plan_for_subscription(&none, true, "canceled", None), Err(SubscriptionError::NoFreePlan));
    }

    #[test]
    fn config_mistakes_are_refused_at_load() {
        let bad = |toml: &str| LedgerConfig::from_toml_str(toml, "t.toml").unwrap_err();
        assert!(bad("[checkout]\nprovider = \"stripe\"\n").contains("success_url"));
        assert!(
            bad("[checkout]\nprovider = \"polar\"\nsuccess_url = \"https://x\"\n")
                .contains("polar_product_id")
        );
        assert!(bad("[checkout]\nprovider = \"stripe\"\nsuccess_url = \"javascript:x\"\n").contains("http"));
        assert!(bad("[topup]\nmin_usd = \"5\"\ndefault_usd = \"1\"\n").contains("default_usd"));
        assert!(
            bad("[topup]\nmax_usd = \"50\"\n[[topup.packs]]\nname = \"big\"\nusd = \"100\"\n")
                .contains("big")
        );
        assert!(
            bad("[[topup.packs]]\nname = \"a\"\nusd = \"1\"\n[[topup.packs]]\nname = \"a\"\nusd = \"2\"\n")
                .contains("twice")
        );
        let s = SubscriptionConfig { free_plan: Some("gratis".into()), ..Default::default() };
        assert!(s.validate(|p| p == "free").unwrap_err().contains("gratis"));
    }
}
