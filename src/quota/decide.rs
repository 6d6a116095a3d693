//! The authorize decision. Pure: everything it needs is passed in.
//!
//! Checks, in order (the first that blocks decides the answer):
//! 1. **Tier quota** (Reeve): calls of the feature in the rolling window + 1 > limit
//!    -> 429 `quota_exceeded`.
//! 2. **Spend limits** (Brokr per account and per project, Brievio per API key): spend in
//!    the current period + estimate > cap -> 429 `spend_limit_exceeded`.
//! 3. **Plan or prepaid balance**, which also yields the [`OverageResult`]:
//!    - `hard_limit`: blocked when the allocation is used up, i.e. remaining <= 0 or
//!      consumed + estimate > allocation -> 402 `credits_exhausted`;
//!    - `soft_limit`: allowed up to `soft_limit_percent` (120%) of the allocation, with a
//!      warning once over it; consumed + estimate > ceiling -> 402 `credits_exhausted`;
//!    - `warn`: never blocked; overage reported;
//!    - no plan (prepaid wallet, Brievio): effective balance (balance - reserved - pending)
//!      <= 0, or < estimate -> 402 `insufficient_quota`.
//!
//! "Exactly at" a limit is allowed; one unit over is blocked. Usage that already happened
//! is never refused here: this only decides what the gateway is told next.

use super::config::{OveragePolicy, Plan};
use crate::event::BillingMode;
use crate::money;
use rust_decimal::Decimal;
use serde::Serialize;

/// BroomVA's OverageResult, with amounts in internal units and as USD.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OverageResult {
    pub in_overage: bool,
    /// How far consumption (including this request's estimate) goes past the allocation;
    /// 0 when not in overage. Internal units.
    pub overage_amount: i64,
    /// `hard_limit`, `soft_limit`, `warn`, or `prepaid` (no plan).
    pub policy: &'static str,
    pub blocked: bool,
    pub message: String,
}

/// What the decision needs to know about the account, all amounts in internal units.
#[derive(Debug, Clone, Default)]
pub struct AccountView<'a> {
    pub balance_units: i64,
    pub reserved_units: i64,
    pub pending_units: i64,
    /// The account's plan with its custom terms (owned only when it has custom terms).
    pub plan: Option<std::borrow::Cow<'a, Plan>>,
    /// With a plan: the allocation minus the effective balance (what the plan's credits
    /// lost this cycle, by the ledger: [`plan_consumed`]). Unused without a plan.
    pub period_consumed_units: i64,
    /// (used in window, limit) for the requested feature, when it is gated for the tier.
    pub feature_quota: Option<(u64, u64)>,
    /// (scope name, spent this period, cap) for every cap that applies.
    pub spend_caps: Vec<(&'static str, i64, i64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// 200, 402 or 429.
    pub status: u16,
    /// Stable error code when refused.
    pub code: Option<&'static str>,
    pub message: String,
    pub overage: OverageResult,
}

pub fn decide(account: &AccountView<'_>, feature: Option<&str>, estimate_units: i64) -> Decision {
    decide_for(account, feature, estimate_units, BillingMode::Platform)
}

/// [`decide`] for a call of the given billing mode. A bring-your-own-key call is paid by the
/// customer's own provider account: it is checked against the tier quota and the spend caps
/// (with a zero estimate: it costs nothing here), never against the wallet or the plan
/// allocation (Reeve, Struere), so an account with no credits can still make BYOK calls.
pub fn decide_for(
    account: &AccountView<'_>,
    feature: Option<&str>,
    estimate_units: i64,
    mode: BillingMode,
) -> Decision {
    let (estimate, overage) = match mode {
        BillingMode::Platform => {
            let estimate = estimate_units.max(0);
            (estimate, overage(account, estimate))
        }
        BillingMode::Byok => (
            0,
            OverageResult {
                in_overage: false,
                overage_amount: 0,
                policy: "byok",
                blocked: false,
                message: "ok (bring your own key: not charged)".into(),
            },
        ),
    };
    if let (Some(feature), Some((used, limit))) = (feature, account.feature_quota)
        && used >= limit
    {
        let msg = format!("quota for {feature} is used up: {used} of {limit} calls in the last 30 days");
        return refuse(429, "quota_exceeded", msg, overage);
    }
    for (scope, spent, cap) in &account.spend_caps {
        // In i128: a saturated sum would equal a cap of i64::MAX and pass it.
        if i128::from(*spent) + i128::from(estimate) > i128::from(*cap) {
            let msg = format!(
                "{scope} monthly spend limit reached: {} of {} USD spent, {} USD requested",
                money::units_to_usd(*spent),
                money::units_to_usd(*cap),
                money::units_to_usd(estimate)
            );
            return refuse(429, "spend_limit_exceeded", msg, overage);
        }
    }
    if overage.blocked {
        let code = if account.plan.is_some() { "credits_exhausted" } else { "insufficient_quota" };
        let msg = overage.message.clone();
        return refuse(402, code, msg, overage);
    }
    Decision { allowed: true, status: 200, code: None, message: overage.message.clone(), overage }
}

fn refuse(status: u16, code: &'static str, message: String, overage: OverageResult) -> Decision {
    Decision { allowed: false, status, code: Some(code), message, overage }
}

fn overage(a: &AccountView<'_>, estimate: i64) -> OverageResult {
    let Some(plan) = a.plan.as_deref() else {
        let effective = money::effective_units(a.balance_units, a.reserved_units, a.pending_units);
        let blocked = effective <= 0 || effective < estimate;
        let message = if blocked {
            format!(
                "insufficient balance: {} USD available, {} USD requested",
                money::units_to_usd(effective),
                money::units_to_usd(estimate)
            )
        } else {
            "ok".to_string()
        };
        let overage_amount = (estimate - effective.max(0)).max(0);
        return OverageResult { in_overage: false, overage_amount, policy: "prepaid", blocked, message };
    };
    let allocation = plan.allocation_units;
    // Comparisons in i128 (exact); only the reported amount is clamped to i64.
    let projected = i128::from(a.period_consumed_units) + i128::from(estimate);
    let over = (projected - i128::from(allocation)).max(0);
    let overage_amount = i64::try_from(over).unwrap_or(i64::MAX);
    let in_overage = over > 0;
    let (blocked, message) = match plan.policy {
        OveragePolicy::HardLimit => {
            let blocked = a.period_consumed_units >= allocation || projected > i128::from(allocation);
            (
                blocked,
                if blocked {
                    format!("{} plan credits are exhausted; upgrade or wait for the next period", plan.name)
                } else {
                    "ok".into()
                },
            )
        }
        OveragePolicy::SoftLimit => {
            let ceiling = soft_ceiling(allocation, plan.soft_limit_percent);
            let blocked = projected > i128::from(ceiling);
            let message = if blocked {
                format!(
                    "{} plan soft limit of {}% reached; upgrade or wait for the next period",
                    plan.name, plan.soft_limit_percent
                )
            } else if in_overage {
                format!(
                    "warning: over the {} plan allocation, allowed up to {}%",
                    plan.name, plan.soft_limit_percent
                )
            } else {
                "ok".into()
            };
            (blocked, message)
        }
        OveragePolicy::Warn => {
            let message = if in_overage {
                format!(
                    "warning: over the {} plan allocation; overage is billed at the end of the period",
                    plan.name
                )
            } else {
                "ok".into()
            };
            (false, message)
        }
    };
    OverageResult { in_overage, overage_amount, policy: plan.policy.as_str(), blocked, message }
}

/// One model of a plan (issue 11.4): a plan account's credits are its ledger balance, set
/// to the allocation at each cycle start (`store::post_due_cycles`), raised by prorated
/// upgrades and capped by downgrades. What the cycle consumed is what the effective
/// balance (holds and pending settles included) lost against the allocation, so authorize,
/// reservations and the balance endpoint all read the ledger's number. Exact in i128,
/// clamped to i64.
pub fn plan_consumed(plan: &Plan, effective_units: i64) -> i64 {
    let consumed = i128::from(plan.allocation_units) - i128::from(effective_units);
    i64::try_from(consumed).unwrap_or(if consumed < 0 { i64::MIN } else { i64::MAX })
}

/// How far below zero a plan account's effective balance may go: the same limits as
/// [`decide`] (a plan's credits are its balance, [`plan_consumed`]).
pub fn overdraft_units(plan: &Plan) -> i64 {
    match plan.policy {
        OveragePolicy::HardLimit => 0,
        OveragePolicy::SoftLimit => soft_ceiling(plan.allocation_units, plan.soft_limit_percent)
            .saturating_sub(plan.allocation_units)
            .max(0),
        OveragePolicy::Warn => i64::MAX,
    }
}

/// allocation x percent / 100, rounded half to even (the one rounding rule).
pub fn soft_ceiling(allocation_units: i64, percent: u32) -> i64 {
    let exact = Decimal::from(allocation_units) * Decimal::from(percent) / Decimal::from(100);
    i64::try_from(exact.round_dp_with_strategy(0, money::ROUNDING)).unwrap_or(i64::MAX)
}

/// What an account's holds add, for a holding authorize: quota units of the requested
/// feature, and money per spend-cap scope.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeldTotals {
    pub feature_units: u64,
    pub account_units: i64,
    pub project_units: i64,
    pub api_key_units: i64,
}

/// Sum the holds that count for a call of `feature` / `project_id` / `api_key_id`: every
/// open hold, and every hold closed into usage whose closing transaction `counted` says
/// the counters do not include yet (so each call is counted once: as a hold or as usage).
pub fn held_totals(
    holds: &[crate::ledger::holds::HeldRow],
    feature: Option<&str>,
    project_id: Option<&str>,
    api_key_id: Option<&str>,
    counted: impl Fn(i64) -> bool,
) -> HeldTotals {
    let mut t = HeldTotals::default();
    for h in holds.iter().filter(|h| h.closed_xid.is_none_or(|x| !counted(x))) {
        if feature.is_some() && h.feature.as_deref() == feature {
            t.feature_units = t.feature_units.saturating_add(u64::try_from(h.quota_units).unwrap_or(0));
        }
        t.account_units = t.account_units.saturating_add(h.money_units);
        if project_id.is_some() && h.project_id.as_deref() == project_id {
            t.project_units = t.project_units.saturating_add(h.money_units);
        }
        if api_key_id.is_some() && h.api_key_id.as_deref() == api_key_id {
            t.api_key_units = t.api_key_units.saturating_add(h.money_units);
        }
    }
    t
}

/// The view a holding authorize decides on: the balance and holds read under the
/// account's lock replace the in-memory ones (so the wallet and the plan's consumption are
/// exact), and what is held counts as used against the feature quota and the spend caps.
pub fn with_holds(view: &mut AccountView<'_>, balance: (i64, i64, i64), held: &HeldTotals) {
    (view.balance_units, view.reserved_units, view.pending_units) = balance;
    if let Some(p) = view.plan.as_deref() {
        let effective = money::effective_units(view.balance_units, view.reserved_units, view.pending_units);
        view.period_consumed_units = plan_consumed(p, effective);
    }
    if let Some((used, limit)) = view.feature_quota {
        view.feature_quota = Some((used.saturating_add(held.feature_units), limit));
    }
    for (scope, spent, _) in &mut view.spend_caps {
        let add = match *scope {
            "account" => held.account_units,
            "project" => held.project_units,
            "api key" => held.api_key_units,
            other => unreachable!("spend cap scope {other} is one of account, project, api key"),
        };
        *spent = spent.saturating_add(add);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(policy: OveragePolicy, allocation_units: i64) -> Plan {
        Plan {
            name: "p".into(),
            rank: 1,
            allocation_units,
            policy,
            soft_limit_percent: 120,
            self_serve: true,
            models: Default::default(),
        }
    }

    fn with_plan(p: &Plan, consumed: i64) -> AccountView<'_> {
        AccountView {
            plan: Some(std::borrow::Cow::Borrowed(p)),
            period_consumed_units: consumed,
            ..Default::default()
        }
    }

    #[test]
    fn byok_skips_the_wallet_but_not_quotas_or_caps() {
        let broke = AccountView { feature_quota: Some((3, 10)), ..AccountView::default() };
        assert_eq!(decide(&broke, Some("f"), 100).code, Some("insufficient_quota"));
        let d = decide_for(&broke, Some("f"), 100, BillingMode::Byok);
        assert!(d.allowed && d.overage.policy == "byok", "{d:?}");
        let used_up = AccountView { feature_quota: Some((10, 10)), ..AccountView::default() };
        assert_eq!(decide_for(&used_up, Some("f"), 0, BillingMode::Byok).code, Some("quota_exceeded"));
        let over_cap = AccountView { spend_caps: vec![("account", 101, 100)], ..AccountView::default() };
        assert_eq!(decide_for(&over_cap, None, 0, BillingMode::Byok).code, Some("spend_limit_exceeded"));
        let at_cap = AccountView { spend_caps: vec![("account", 100, 100)], ..AccountView::default() };
        assert!(decide_for(&at_cap, None, 50, BillingMode::Byok).allowed, "a BYOK estimate costs nothing");
    }

    #[test]
    fn hard_limit_allows_exactly_the_allocation_and_blocks_one_unit_over() {
        let p = plan(OveragePolicy::HardLimit, 1_000);
        assert!(decide(&with_plan(&p, 900), None, 100).allowed);
        let d = decide(&with_plan(&p, 900), None, 101);
        assert_eq!((d.allowed, d.status, d.code), (false, 402, Some("credits_exhausted")));
        assert_eq!((d.overage.overage_amount, d.overage.policy, d.overage.blocked), (1, "hard_limit", true));
        assert!(!decide(&with_plan(&p, 1_000), None, 0).allowed, "blocked at zero remaining");
    }

    #[test]
    fn soft_limit_warns_past_the_allocation_and_blocks_past_120_percent() {
        let p = plan(OveragePolicy::SoftLimit, 1_000);
        let d = decide(&with_plan(&p, 1_100), None, 100);
        assert!(d.allowed && d.overage.in_overage && d.message.starts_with("warning"));
        assert_eq!(d.overage.overage_amount, 200);
        let d = decide(&with_plan(&p, 1_100), None, 101);
        assert_eq!((d.allowed, d.code), (false, Some("credits_exhausted")));
        assert_eq!(soft_ceiling(1_001, 120), 1_201); // 1201.2 -> 1201
        assert_eq!(soft_ceiling(5, 150), 8); // 7.5 -> 8 (half to even)
    }

    #[test]
    fn warn_never_blocks_but_reports_overage() {
        let p = plan(OveragePolicy::Warn, 1_000);
        let d = decide(&with_plan(&p, 5_000), None, 10);
        assert!(d.allowed && d.overage.in_overage && !d.overage.blocked);
        assert_eq!((d.overage.overage_amount, d.overage.policy), (4_010, "warn"));
    }

    #[test]
    fn prepaid_is_refused_at_zero_and_below_the_estimate() {
        let a = |balance, reserved| AccountView {
            balance_units: balance,
            reserved_units: reserved,
            ..Default::default()
        };
        assert!(decide(&a(100, 0), None, 100).allowed);
        let d = decide(&a(100, 0), None, 101);
        assert_eq!((d.status, d.code, d.overage.policy), (402, Some("insufficient_quota"), "prepaid"));
        assert!(!decide(&a(0, 0), None, 0).allowed);
        assert!(!decide(&a(100, 60), None, 41).allowed, "holds count against the balance");
    }

    fn held(
        feature: Option<&str>,
        project: Option<&str>,
        money: i64,
        closed: Option<i64>,
    ) -> crate::ledger::holds::HeldRow {
        crate::ledger::holds::HeldRow {
            feature: feature.map(str::to_string),
            quota_units: i32::from(feature.is_some()),
            project_id: project.map(str::to_string),
            api_key_id: None,
            money_units: money,
            closed_xid: closed,
        }
    }

    #[test]
    fn a_closed_hold_counts_until_the_counters_include_its_usage() {
        let holds = [
            held(Some("f"), Some("p1"), 3, None),
            held(Some("f"), None, 5, Some(100)),
            held(Some("g"), Some("p1"), 7, Some(200)),
        ];
        // Counters include everything below 150: the hold closed by xid 100 is usage now.
        let t = held_totals(&holds, Some("f"), Some("p1"), None, |x| x < 150);
        assert_eq!(
            t,
            HeldTotals { feature_units: 1, account_units: 10, project_units: 10, api_key_units: 0 }
        );
        // Unsure about everything: every hold counts (refuse earlier, never admit more).
        let t = held_totals(&holds, Some("f"), Some("p1"), None, |_| false);
        assert_eq!(
            t,
            HeldTotals { feature_units: 2, account_units: 15, project_units: 10, api_key_units: 0 }
        );
    }

    #[test]
    fn held_units_count_against_the_quota_caps_and_wallet_exactly_at_and_one_over() {
        let mut v = AccountView {
            feature_quota: Some((7, 10)),
            spend_caps: vec![("account", 40, 100), ("project", 0, 50)],
            ..Default::default()
        };
        let held = HeldTotals { feature_units: 2, account_units: 30, project_units: 20, api_key_units: 0 };
        with_holds(&mut v, (100, 30, 0), &held);
        assert_eq!(v.feature_quota, Some((9, 10)));
        // The 10th unit is allowed (9 used or held + 1 = 10), estimate 30: caps 70+30 = 100
        // (exactly at), project 20+30 = 50 (exactly at), wallet 100-30 = 70 >= 30.
        assert!(decide(&v, Some("f"), 30).allowed);
        assert_eq!(decide(&v, Some("f"), 31).code, Some("spend_limit_exceeded"));
        with_holds(&mut v, (100, 30, 0), &HeldTotals { feature_units: 3, ..held });
        assert_eq!(decide(&v, Some("f"), 0).code, Some("quota_exceeded"));
        let mut w = AccountView::default();
        with_holds(&mut w, (100, 97, 0), &HeldTotals::default());
        assert!(decide(&w, None, 3).allowed);
        assert_eq!(decide(&w, None, 4).code, Some("insufficient_quota"));
    }

    #[test]
    fn quotas_and_spend_caps_come_first_with_429() {
        let ok_balance = AccountView { balance_units: 1_000_000, ..Default::default() };
        let q = AccountView { feature_quota: Some((99, 100)), ..ok_balance.clone() };
        assert!(decide(&q, Some("ad_generations"), 0).allowed, "the 100th call is allowed");
        let q = AccountView { feature_quota: Some((100, 100)), ..ok_balance.clone() };
        let d = decide(&q, Some("ad_generations"), 0);
        assert_eq!((d.status, d.code), (429, Some("quota_exceeded")));
        let c = AccountView { spend_caps: vec![("api key", 900, 1_000)], ..ok_balance.clone() };
        assert!(decide(&c, None, 100).allowed);
        let d = decide(&c, None, 101);
        assert_eq!((d.status, d.code), (429, Some("spend_limit_exceeded")));
    }
}
