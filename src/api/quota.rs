//! Quota, limit and plan endpoints: `POST /v1/authorize` (the gateway's fast path),
//! `GET /v1/accounts/{id}/quotas`, `GET|PUT /v1/accounts/{id}/limits`,
//! `POST /v1/accounts/{id}/plan`, and the plan and burn-rate part of the balance.
//!
//! Authorize and quota reads are answered from the in-memory [`QuotaState`] (no database
//! round trip); see `quota::state` for how it is kept current across instances. A
//! *holding* authorize (`"hold": true`) is one Postgres transaction under the account's
//! lock instead, so concurrent calls can never be over-admitted (ARCHITECTURE.md,
//! "Holding authorize").

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiJson, ApiPath, ApiQuery};
use super::{ApiError, AppState};
use crate::ledger::holds::{Decide, HoldCall, HoldOutcome, HoldRequest};
use crate::money;
use crate::quota::decide;
use crate::quota::state::{self, AccountState, Ask};
use crate::quota::{store, window};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Duration, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorizeRequest {
    pub account_id: String,
    pub api_key_id: Option<String>,
    pub project_id: Option<String>,
    pub feature: Option<String>,
    /// The model the call will use: checked against the plan's allowed models, if the
    /// plan restricts them (`model_not_allowed`).
    pub model: Option<String>,
    /// The model's provider (plans may allow models by provider).
    pub provider: Option<String>,
    /// Estimated cost, USD decimal string (exact), or `estimated_cost_units`.
    pub estimated_cost_usd: Option<String>,
    pub estimated_cost_units: Option<i64>,
    /// `platform` (default) or `byok`: a bring-your-own-key call is checked against quotas
    /// and caps only, never the wallet (see `decide::decide_for`).
    #[serde(default)]
    pub billing_mode: Option<crate::event::BillingMode>,
    /// Check *and hold* what the call will consume (one unit of the feature's quota, the
    /// estimate against the balance and the spend caps), atomically: concurrent calls can
    /// never be over-admitted. Default: the catalog's `[reservations] hold_on_authorize`.
    pub hold: Option<bool>,
    /// With a hold: the id the usage event names in `reservation_id` to settle it (and the
    /// idempotency key of this request). Generated when absent.
    pub authorization_id: Option<String>,
    /// With a hold: how long it lives unless settled or released (default: the catalog's
    /// `[reservations] ttl_secs`).
    pub hold_ttl_secs: Option<u32>,
}

#[derive(Debug, Serialize)]
struct AuthorizeResponse {
    allowed: bool,
    message: String,
    overage: serde_json::Value,
}

/// An OverageResult with its amount also in the catalog's display unit (BroomVA: credits).
fn overage_view(state: &AppState, mut overage: serde_json::Value) -> serde_json::Value {
    let unit = state.catalog.display_unit();
    let units = overage["overage_amount"].as_i64().unwrap_or(0);
    if let Some(o) = overage.as_object_mut() {
        o.insert("display_unit".into(), serde_json::json!(unit.unit_name));
        o.insert("overage_amount_display".into(), serde_json::json!(unit.amount(units)));
    }
    overage
}

fn check_id(field: &str, v: &str) -> Result<(), ApiError> {
    super::extract::body_id(field, v)
}

/// A plan may restrict the models its accounts call (BroomVA Free: community models only):
/// a call naming a model the account's plan does not allow is refused, 403
/// `model_not_allowed`, whether or not it would hold.
fn check_model(state: &AppState, req: &AuthorizeRequest) -> Result<(), ApiError> {
    for (field, v) in [("model", &req.model), ("provider", &req.provider)] {
        if v.as_ref().is_some_and(|v| v.is_empty() || v.len() > crate::event::TEXT_LEN_MAX) {
            let problem = format!("{field} must be 1..={} bytes", crate::event::TEXT_LEN_MAX);
            return Err(ApiError::unprocessable("invalid_request", problem));
        }
    }
    let Some(model) = req.model.as_deref() else { return Ok(()) };
    let cfg = &state.quota_config;
    let plan_name =
        state.quota.with_account(&req.account_id, |acct| acct.plan.as_ref().map(|(p, _)| p.clone()));
    let Some(plan) = plan_name.and_then(|name| cfg.plans.get(&name)) else { return Ok(()) };
    let provider = req.provider.as_deref();
    let tier = state.catalog.model_tier(provider.unwrap_or(""), model);
    if plan.models.allows(provider, model, tier) {
        return Ok(());
    }
    Err(ApiError::new(
        StatusCode::FORBIDDEN,
        "model_not_allowed",
        format!(
            "plan {} does not allow model {model}{}: it allows {}",
            plan.name,
            provider.map(|p| format!(" of provider {p}")).unwrap_or_default(),
            plan.models.describe()
        ),
    ))
}

fn estimate_units(req: &AuthorizeRequest) -> Result<i64, ApiError> {
    match (&req.estimated_cost_usd, req.estimated_cost_units) {
        (Some(_), Some(_)) => {
            Err(ApiError::unprocessable("invalid_request", "give estimated_cost_usd or _units, not both"))
        }
        (Some(usd), None) => {
            let d = crate::event::parse_usd("estimated_cost_usd", usd)
                .map_err(|e| ApiError::unprocessable("invalid_request", e.to_string()))?;
            money::usd_to_units(d)
                .ok_or_else(|| ApiError::unprocessable("invalid_request", "estimate out of range"))
        }
        (None, Some(u)) if u >= 0 => Ok(u),
        (None, Some(_)) => {
            Err(ApiError::unprocessable("invalid_request", "estimated_cost_units must not be negative"))
        }
        (None, None) => Ok(0),
    }
}

pub async fn authorize(
    State(state): State<AppState>,
    caller: Caller,
    ApiJson(req): ApiJson<AuthorizeRequest>,
) -> Result<Response, ApiError> {
    check_id("account_id", &req.account_id)?;
    for (field, v) in
        [("api_key_id", &req.api_key_id), ("project_id", &req.project_id), ("feature", &req.feature)]
    {
        if let Some(v) = v {
            check_id(field, v)?;
        }
    }
    caller.check(&req.account_id, Capability::Gateway)?;
    check_model(&state, &req)?;
    let estimate = estimate_units(&req)?;
    if req.hold.unwrap_or(state.ledger_config.reservations.hold_on_authorize) {
        return authorize_holding(&state, req, estimate).await;
    }
    if req.authorization_id.is_some() || req.hold_ttl_secs.is_some() {
        return Err(ApiError::unprocessable(
            "invalid_request",
            "authorization_id and hold_ttl_secs go with \"hold\": true",
        ));
    }
    let ask = Ask {
        api_key_id: req.api_key_id.as_deref(),
        project_id: req.project_id.as_deref(),
        feature: req.feature.as_deref(),
    };
    let cfg = &state.quota_config;
    let now = Utc::now();
    let d = state.quota.with_account(&req.account_id, |acct| {
        let mode = req.billing_mode.unwrap_or(crate::event::BillingMode::Platform);
        decide::decide_for(&state::view(cfg, acct, &ask, now), ask.feature, estimate, mode)
    });
    if d.allowed {
        let overage = overage_view(&state, serde_json::to_value(&d.overage).expect("serializes"));
        let body = AuthorizeResponse { allowed: true, message: d.message, overage };
        return Ok(Json(body).into_response());
    }
    let status = StatusCode::from_u16(d.status).unwrap_or(StatusCode::PAYMENT_REQUIRED);
    let body = serde_json::json!({
        "allowed": false,
        "error": {"code": d.code.unwrap_or("refused"), "message": d.message},
        "overage": overage_view(&state, serde_json::to_value(&d.overage).expect("serializes")),
    });
    Ok((status, Json(body)).into_response())
}

/// Holding authorize (issue 16): decide and hold in a Postgres transaction under the
/// account's holds lock, the one authority per account whichever instance answers
/// (concurrent calls share a transaction: `ledger::holds`).
/// The balance, reserved and pending amounts come from one snapshot of the rows; the
/// feature's window usage and the period's spend come from this instance's counters, plus
/// every open hold, plus every hold already closed into usage that those counters do not
/// include yet (`QuotaState::counted`): a call is counted as a hold or as usage, never as
/// neither. The non-holding path stays in memory.
async fn authorize_holding(
    state: &AppState,
    req: AuthorizeRequest,
    estimate: i64,
) -> Result<Response, ApiError> {
    let authorization_id = match req.authorization_id {
        Some(id) => {
            check_id("authorization_id", &id)?;
            id
        }
        None => format!("auth_{}", uuid::Uuid::new_v4().simple()),
    };
    let ttl_secs = req.hold_ttl_secs.unwrap_or(state.ledger_config.reservations.ttl_secs);
    if !(1..=super::reservations::TTL_SECS_MAX).contains(&ttl_secs) {
        return Err(ApiError::unprocessable(
            "invalid_ttl",
            format!("hold_ttl_secs must be within 1..={}", super::reservations::TTL_SECS_MAX),
        ));
    }
    let mode = req.billing_mode.unwrap_or(crate::event::BillingMode::Platform);
    // A bring-your-own-key call costs nothing here: it holds its quota unit only.
    let held_units = match mode {
        crate::event::BillingMode::Platform => estimate,
        crate::event::BillingMode::Byok => 0,
    };
    let now = Utc::now();
    let hold = HoldRequest {
        account_id: req.account_id.clone(),
        authorization_id,
        amount_units: held_units,
        feature: req.feature.clone(),
        project_id: req.project_id.clone(),
        api_key_id: req.api_key_id.clone(),
        expires_at: now + Duration::seconds(i64::from(ttl_secs)),
    };
    let (quota, cfg) = (state.quota.clone(), state.quota_config.clone());
    let counted_from_xid = quota.counted_below();
    let decide: Decide = Box::new(move |locked| {
        let ask = Ask {
            api_key_id: req.api_key_id.as_deref(),
            project_id: req.project_id.as_deref(),
            feature: req.feature.as_deref(),
        };
        let held = decide::held_totals(&locked.holds, ask.feature, ask.project_id, ask.api_key_id, |xid| {
            quota.counted(xid)
        });
        let d = quota.with_account(&req.account_id, |acct| {
            let mut view = state::view(&cfg, acct, &ask, now);
            let balance = (locked.balance_units, locked.reserved_units, locked.pending_units);
            decide::with_holds(&mut view, balance, &held);
            decide::decide_for(&view, ask.feature, estimate, mode)
        });
        // Stored with the hold as JSON, so that a repeated request gets the same answer.
        (d.allowed, serde_json::to_value(&d).expect("a decision serializes"))
    });
    let outcome = state
        .holds
        .hold(HoldCall { req: hold, counted_from_xid, decide })
        .await
        .map_err(super::reservations::reservation_error)?;
    Ok(match outcome {
        HoldOutcome::Held { reservation, decision } => {
            let body = serde_json::json!({
                "allowed": true,
                "message": decision["message"],
                "overage": overage_view(state, decision["overage"].clone()),
                "authorization_id": reservation.reservation_id,
                "hold_expires_at": reservation.expires_at,
                "held_units": reservation.amount_units,
            });
            Json(body).into_response()
        }
        HoldOutcome::Refused(decision) => {
            let status = decision["status"].as_u64().and_then(|s| StatusCode::from_u16(s as u16).ok());
            let body = serde_json::json!({
                "allowed": false,
                "error": {"code": decision["code"], "message": decision["message"]},
                "overage": overage_view(state, decision["overage"].clone()),
            });
            (status.unwrap_or(StatusCode::PAYMENT_REQUIRED), Json(body)).into_response()
        }
    })
}

#[derive(Debug, Serialize)]
struct FeatureUsage {
    used: i64,
    limit: Option<u64>,
    remaining: Option<u64>,
}

pub async fn quotas(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::extract::path_account_id(&id)?;
    // Builders read quotas; so do gateways, which gate calls on them (Reeve's tier gate).
    caller
        .check(&id, Capability::Usage)
        .or_else(|e| caller.check(&id, Capability::Gateway).map_err(|_| e))?;
    let now = Utc::now();
    let (from, to) = window::rolling_window(now);
    let cfg = &state.quota_config;
    let body = state.quota.with_account(&id, |acct| {
        let tier = state::tier(acct).to_string();
        let mut usage = serde_json::Map::new();
        for feature in cfg.quotas.keys() {
            let used = acct.usage.get("feature", feature).map_or(0, |b| b.sum(from, to).events);
            let limit = cfg.quota(feature, &tier);
            let remaining = limit.map(|l| l.saturating_sub(u64::try_from(used).unwrap_or(0)));
            let v = serde_json::to_value(FeatureUsage { used, limit, remaining }).expect("serializes");
            usage.insert(feature.clone(), v);
        }
        serde_json::json!({
            "account_id": id,
            "tier": tier,
            "usage": usage,
            "period_start": ts(from),
            "period_end": ts(to),
        })
    });
    Ok(Json(body))
}

fn ts(epoch_secs: i64) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(epoch_secs, 0).expect("in range")
}

/// Plan allocation and burn-rate fields of the balance response.
pub fn plan_and_burn(
    state: &AppState,
    acct: &AccountState,
    effective_units: i64,
    now: DateTime<Utc>,
) -> serde_json::Value {
    let cfg = &state.quota_config;
    let unit = state.catalog.display_unit();
    let (start, end) = state::period(cfg, acct, now);
    let consumed = state::spent(acct, "account", "", start, end).cost_units;
    let week =
        state::spent(acct, "account", "", now - Duration::days(7), now + Duration::hours(1)).cost_units;
    let daily_burn = Decimal::from(week) / Decimal::from(7);
    let plan = state::plan(cfg, acct);
    // One model (issue 11.4): a plan's remaining credits are the effective ledger balance.
    let remaining = effective_units;
    let projected_days = (daily_burn > Decimal::ZERO).then(|| {
        (Decimal::from(remaining.max(0)) / daily_burn).round_dp_with_strategy(1, money::ROUNDING).to_string()
    });
    let plan_json = plan.map(|p| {
        let used = crate::quota::decide::plan_consumed(&p, effective_units);
        let percent = if p.allocation_units > 0 {
            (Decimal::from(used) * Decimal::from(100) / Decimal::from(p.allocation_units))
                .round_dp_with_strategy(2, money::ROUNDING)
                .to_string()
        } else {
            "0".into()
        };
        serde_json::json!({
            "plan": p.name,
            "policy": p.policy.as_str(),
            "allocated_units": p.allocation_units,
            "consumed_units": used,
            "remaining_units": remaining,
            "usage_percent": percent,
            "display": {
                "allocated": unit.amount(p.allocation_units),
                "consumed": unit.amount(used),
                "remaining": unit.amount(remaining),
            },
        })
    });
    serde_json::json!({
        "plan": plan_json,
        "period_start": start,
        "period_end": end,
        "period_consumed_units": consumed,
        "daily_burn_units": daily_burn.round_dp_with_strategy(0, money::ROUNDING).to_string(),
        "projected_days_remaining": projected_days,
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitRequest {
    /// `account`, `project` or `api_key`.
    pub scope: String,
    #[serde(default)]
    pub scope_id: String,
    /// Monthly cap, USD decimal string; `null` removes the cap.
    pub monthly_limit_usd: Option<String>,
}

pub async fn put_limit(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<LimitRequest>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::extract::path_account_id(&id)?;
    caller.check(&id, Capability::Billing)?;
    let units = match &req.monthly_limit_usd {
        None => None,
        Some(s) => {
            let d = crate::event::parse_usd("monthly_limit_usd", s)
                .map_err(|e| ApiError::unprocessable("invalid_request", e.to_string()))?;
            Some(crate::money::exact_units(d).map_err(|e| ApiError::unprocessable("invalid_request", e))?)
        }
    };
    store::set_limit(&state.pool, &id, &req.scope, &req.scope_id, units)
        .await
        .map_err(super::stripe::ledger_error)?;
    state.quota.refresh(&state.pool).await.map_err(ApiError::internal)?;
    get_limits(State(state), caller, ApiPath(id)).await
}

pub async fn get_limits(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::extract::path_account_id(&id)?;
    caller.check(&id, Capability::Billing)?;
    let now = Utc::now();
    let cfg = &state.quota_config;
    let unit = state.catalog.display_unit();
    let limits = state.quota.with_account(&id, |acct| {
        let (start, end) = state::period(cfg, acct, now);
        let mut out: Vec<serde_json::Value> = acct
            .limits
            .iter()
            .filter(|(_, cap)| **cap < i64::MAX)
            .map(|((scope, scope_id), cap)| {
                let spent = state::spent(acct, scope, scope_id, start, end).cost_units;
                let remaining = cap.saturating_sub(spent);
                serde_json::json!({"scope": scope, "scope_id": scope_id, "monthly_limit_units": cap,
                    "spent_units": spent, "remaining_units": remaining,
                    "period_start": start, "period_end": end,
                    "display": {"monthly_limit": unit.amount(*cap), "spent": unit.amount(spent),
                                "remaining": unit.amount(remaining)}})
            })
            .collect();
        out.sort_by_key(|a| a.to_string());
        out
    });
    Ok(Json(serde_json::json!({"account_id": id, "display_unit": unit.unit_name, "limits": limits})))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanRequest {
    pub plan: String,
    pub idempotency_key: Option<String>,
}

pub async fn change_plan(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiJson(req): ApiJson<PlanRequest>,
) -> Result<Json<store::PlanChange>, ApiError> {
    super::extract::path_account_id(&id)?;
    caller.check(&id, Capability::Billing)?;
    let cfg = &state.quota_config;
    let new = cfg
        .plans
        .get(&req.plan)
        .ok_or_else(|| ApiError::unprocessable("unknown_plan", format!("no plan {}", req.plan)))?;
    let (current, old) = store::plan_of(&state.pool, cfg, &id).await.map_err(ApiError::internal)?;
    let key = match req.idempotency_key {
        Some(k) => k,
        None => store::default_plan_key(&state.pool, &id, current.as_deref(), &new.name)
            .await
            .map_err(ApiError::internal)?,
    };
    let change = store::change_plan(
        &state.pool,
        &store::PlanChangeRequest {
            account_id: &id,
            new_plan: new,
            old_plan: old.as_ref(),
            // Customers never set their own terms nor pick a plan that is not self-serve.
            custom_terms: None,
            by_operator: false,
            idempotency_key: &key,
            created_by: &format!("token:{}", caller.token_id()),
            now: Utc::now(),
            cycle: cfg.cycle,
        },
    )
    .await
    .map_err(super::stripe::ledger_error)?;
    state.quota.refresh(&state.pool).await.map_err(ApiError::internal)?;
    Ok(Json(change))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanChangesQuery {
    limit: Option<i64>,
    before: Option<i64>,
}

/// `GET /v1/accounts/{id}/plan/changes?limit=&before=`: the plan-change audit log, newest
/// first (who, when, from and to, the prorated credit and its ledger entry). Capability:
/// `Billing`. `next_before` pages to older changes (null on the last page).
pub async fn plan_changes(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<PlanChangesQuery>,
) -> Result<Json<serde_json::Value>, ApiError> {
    super::extract::path_account_id(&id)?;
    let limit = q.limit.unwrap_or(50);
    if !(1..=500).contains(&limit) || q.before.is_some_and(|b| b < 1) {
        return Err(ApiError::bad_request("invalid_query", "limit must be within 1..=500 and before >= 1"));
    }
    check_existing(&caller, &state.pool, &id, Capability::Billing).await?;
    let changes = store::plan_changes(&state.pool, &id, q.before, limit).await.map_err(ApiError::internal)?;
    let next_before = (changes.len() as i64 == limit).then(|| changes.last().map(|c| c.change_id)).flatten();
    Ok(Json(serde_json::json!({"account_id": id, "changes": changes, "next_before": next_before})))
}
