//! Stripe subscriptions drive plans (BroomVA): the `customer.subscription.*` and
//! `invoice.payment_failed` events of `POST /v1/webhooks/stripe` (signature checked there).
//!
//! - **Which account:** the subscription's `metadata.account_id` (the platform sets it when
//!   it creates the subscription; an invoice carries it in `subscription_details`). An
//!   event without one is 422 `missing_account` (Stripe keeps retrying it, visibly).
//! - **Which plan:** `payments::plan_for_subscription`: the price through
//!   `[subscriptions.prices]` while `active` / `trialing`; `[subscriptions] free_plan` when
//!   the subscription is deleted, `canceled`, `unpaid` or `incomplete_expired`; nothing
//!   while `incomplete` or `past_due`. A price the catalog does not map is acknowledged as
//!   `unknown_price` and logged (fix the catalog, then resend the event from Stripe).
//! - **How:** the ordinary plan change with its rules (`quota::store::change_plan`:
//!   upgrades credit the prorated difference, downgrades cap the balance, same plan is a
//!   no-op), applied as an operator would: what Stripe bills is the contract, so a price
//!   mapped to a plan that is not self-serve (enterprise, sold by sales) applies too.
//! - **Once, and in order:** the plan change is keyed by the Stripe event id (a redelivery
//!   replays it); `subscription_state` keeps, per account, the subscription deciding its
//!   plan and the newest event applied. An event created before that one is acknowledged
//!   as `stale_event`; the end of a subscription that is no longer the account's current
//!   one (replaced by a newer subscription) is `not_current_subscription`.
//! - **`invoice.payment_failed`:** `[subscriptions] on_payment_failed`: `notify` (default)
//!   counts `tally_subscription_payments_failed_total` and logs the account, the hook for
//!   the owner's notification; the plan stays until Stripe ends the subscription.
//!   `downgrade` moves the account to `free_plan` at once.

use super::{ApiError, AppState};
use crate::metrics as m;
use crate::payments::{self, PaymentFailedPolicy, PlanAction};
use crate::quota::store;
use chrono::{DateTime, Utc};

/// A Stripe event's identity: what makes applying it idempotent and ordered.
pub struct EventMeta<'a> {
    pub id: &'a str,
    pub kind: &'a str,
    pub created: DateTime<Utc>,
}

/// `customer.subscription.created|updated|deleted`.
pub async fn subscription_event(
    state: &AppState,
    event: &EventMeta<'_>,
    obj: &serde_json::Value,
) -> Result<&'static str, ApiError> {
    let account = account_of(obj.get("metadata"))?;
    let subscription = text(obj.get("id"))
        .ok_or_else(|| ApiError::unprocessable("missing_subscription", "the subscription has no id"))?;
    let status = text(obj.get("status")).unwrap_or("unknown");
    let price = obj.pointer("/items/data/0/price/id").and_then(|v| v.as_str());
    let deleted = event.kind == "customer.subscription.deleted";
    let action =
        match payments::plan_for_subscription(&state.ledger_config.subscriptions, deleted, status, price) {
            Ok(a) => a,
            Err(payments::SubscriptionError::UnknownPrice(p)) => {
                tracing::warn!(account_id = account, price = %p, event_id = event.id,
                "subscription price maps to no plan ([subscriptions.prices]); acknowledged, nothing changed");
                return Ok("unknown_price");
            }
            Err(e) => return Err(ApiError::unprocessable("cannot_apply_subscription", e.to_string())),
        };
    let ends = deleted || matches!(status, "canceled" | "unpaid" | "incomplete_expired");
    apply(state, event, account, subscription, status, action, ends).await
}

/// `invoice.payment_failed` of a subscription invoice.
pub async fn payment_failed(
    state: &AppState,
    event: &EventMeta<'_>,
    obj: &serde_json::Value,
) -> Result<&'static str, ApiError> {
    let details = obj
        .get("subscription_details")
        .or_else(|| obj.pointer("/parent/subscription_details"))
        .and_then(|d| d.get("metadata"));
    let account = account_of(details.or_else(|| obj.get("metadata")))?;
    let cfg = &state.ledger_config.subscriptions;
    metrics::counter!(m::SUBSCRIPTION_PAYMENTS_FAILED).increment(1);
    tracing::warn!(account_id = account, event_id = event.id, policy = ?cfg.on_payment_failed,
        "a subscription payment failed");
    match (cfg.on_payment_failed, &cfg.free_plan) {
        (PaymentFailedPolicy::Downgrade, Some(free)) => {
            let subscription = text(obj.get("subscription"))
                .or_else(|| text(obj.pointer("/parent/subscription_details/subscription")))
                .unwrap_or("unknown");
            let action = PlanAction::ChangeTo(free.clone());
            apply(state, event, account, subscription, "payment_failed", action, false).await
        }
        _ => Ok("payment_failed_noted"),
    }
}

/// Apply `action` for the account under its `subscription_state` row lock, unless the
/// event is older than the newest one applied or ends a subscription that is no longer
/// the account's current one.
async fn apply(
    state: &AppState,
    event: &EventMeta<'_>,
    account: &str,
    subscription: &str,
    status: &str,
    action: PlanAction,
    ends: bool,
) -> Result<&'static str, ApiError> {
    let mut tx = state.pool.begin().await.map_err(ApiError::internal)?;
    // Serializes this account's subscription events, the first ones (no row to lock yet)
    // included: Stripe may deliver two at once.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('subscription:' || $1, 0))")
        .bind(account)
        .execute(&mut *tx)
        .await
        .map_err(ApiError::internal)?;
    let current: Option<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT subscription_id, last_event_id, last_event_at FROM subscription_state
         WHERE account_id = $1 FOR UPDATE",
    )
    .bind(account)
    .fetch_optional(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    if let Some((current_sub, last_id, last_at)) = &current {
        if last_id != event.id && *last_at > event.created {
            return Ok("stale_event");
        }
        if ends && current_sub != subscription {
            return Ok("not_current_subscription");
        }
    }
    let (outcome, plan) = match &action {
        PlanAction::Nothing(why) => (*why, None),
        PlanAction::ChangeTo(plan) => (change_plan(state, event, account, plan).await?, Some(plan.as_str())),
    };
    sqlx::query(
        "INSERT INTO subscription_state (account_id, subscription_id, status, plan, last_event_id, last_event_at)
         VALUES ($1, $2, $3, $4, $5, $6)
         ON CONFLICT (account_id) DO UPDATE SET subscription_id = $2, status = $3, plan = $4,
             last_event_id = $5, last_event_at = $6, updated_at = now()",
    )
    .bind(account)
    .bind(subscription)
    .bind(status)
    .bind(plan)
    .bind(event.id)
    .bind(event.created)
    .execute(&mut *tx)
    .await
    .map_err(ApiError::internal)?;
    tx.commit().await.map_err(ApiError::internal)?;
    Ok(outcome)
}

async fn change_plan(
    state: &AppState,
    event: &EventMeta<'_>,
    account: &str,
    plan: &str,
) -> Result<&'static str, ApiError> {
    let cfg = &state.quota_config;
    let new = cfg.plans.get(plan).ok_or_else(|| {
        // Checked at start (`SubscriptionConfig::validate`); a catalog edited since is a 500.
        ApiError::internal(format!("[subscriptions] names plan {plan:?}, which [plans] lacks"))
    })?;
    let (_, old) = store::plan_of(&state.pool, cfg, account).await.map_err(ApiError::internal)?;
    let by = format!("stripe:{}", event.id);
    let change = store::change_plan(
        &state.pool,
        &store::PlanChangeRequest {
            account_id: account,
            new_plan: new,
            old_plan: old.as_ref(),
            custom_terms: None,
            by_operator: true,
            idempotency_key: &by,
            created_by: &by,
            now: Utc::now(),
            cycle: cfg.cycle,
        },
    )
    .await
    .map_err(super::stripe::ledger_error)?;
    state.quota.refresh(&state.pool).await.map_err(ApiError::internal)?;
    if change.direction == "no_change" {
        return Ok("plan_unchanged");
    }
    metrics::counter!(m::SUBSCRIPTION_PLAN_CHANGES, "event" => event.kind.to_string()).increment(1);
    Ok(match change.direction.as_str() {
        "upgrade" => "plan_upgraded",
        "downgrade" => "plan_downgraded",
        _ => "plan_set",
    })
}

fn text(v: Option<&serde_json::Value>) -> Option<&str> {
    v.and_then(|v| v.as_str()).filter(|s| !s.is_empty() && s.len() <= 255)
}

fn account_of(metadata: Option<&serde_json::Value>) -> Result<&str, ApiError> {
    let account = text(metadata.and_then(|m| m.get("account_id")))
        .ok_or_else(|| ApiError::unprocessable("missing_account", "metadata.account_id is missing"))?;
    super::extract::body_id("metadata.account_id", account)?;
    Ok(account)
}
