//! Quotas, spend limits, plans and overage against real Postgres: counters written with
//! the ledger batch, the in-memory state restored from Postgres, every policy and limit at
//! its boundary, window roll-over, month reset, plan changes.

mod common;

use chrono::{DateTime, Duration, Utc};
use common::*;
use tally::event::{RawUsageEvent, UsageEvent};
use tally::ledger;
use tally::quota::config::QuotaConfig;
use tally::quota::decide::{self, Decision};
use tally::quota::state::{self, Ask, QuotaState};
use tally::quota::store::{self, PlanChangeRequest};

const USD: i64 = tally::money::UNITS_PER_USD;

fn feature_call(id: &str, account: &str, feature: &str, at: DateTime<Utc>) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(at.to_rfc3339()),
        account_id: Some(account.into()),
        provider: Some("platform".into()),
        model: Some(feature.into()),
        modality: Some("feature".into()),
        feature: Some(feature.into()),
        status: Some("success".into()),
        ..Default::default()
    })
    .unwrap()
}

/// A default-model chat call: `millions` x $0.22, on an API key and a project.
fn spend(id: &str, account: &str, millions: i64, at: DateTime<Utc>) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(at.to_rfc3339()),
        account_id: Some(account.into()),
        api_key_id: Some("key-1".into()),
        project_id: Some("stack-1".into()),
        provider: Some("xai".into()),
        model: Some("grok-4-1-fast".into()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: Some(millions * 1_000_000),
        ..Default::default()
    })
    .unwrap()
}

fn config(name: &str) -> QuotaConfig {
    QuotaConfig::load(&repo().join("examples").join(name)).unwrap()
}

async fn fund(env: &TestEnv, account: &str) {
    let req = ledger::topup::TopupRequest {
        order_id: format!("fund-{account}"),
        account_id: account.into(),
        paid_usd: rust_decimal::Decimal::from(100),
        source: "operator",
    };
    ledger::topup::complete(&env.pool, &Default::default(), &req).await.unwrap();
}

async fn decide_now(
    pool: &sqlx::PgPool,
    cfg: &QuotaConfig,
    account: &str,
    feature: Option<&str>,
    estimate: i64,
) -> Decision {
    let s = QuotaState::default();
    s.refresh(pool).await.unwrap();
    let ask = Ask { api_key_id: Some("key-1"), project_id: Some("stack-1"), feature };
    s.with_account(account, |a| decide::decide(&state::view(cfg, a, &ask, Utc::now()), feature, estimate))
}

#[tokio::test]
async fn reeve_quota_counts_a_rolling_30_day_window_and_survives_restart() {
    let env = TestEnv::new(1).await;
    let cfg = config("reeve.toml");
    let a = "acct-reeve";
    // Funded, so only the quota decides (demo prices a feature call at $0.02).
    fund(&env, a).await;
    fund(&env, "acct-reeve-2").await;
    let now = Utc::now();
    // 9 calls now, 1 call 29 days 23 hours ago (counts), 5 calls 30 days + 1 hour ago (do not).
    let mut events: Vec<UsageEvent> =
        (0..9).map(|i| feature_call(&format!("n{i}"), a, "ad_generations", now)).collect();
    events.push(feature_call("young", a, "ad_generations", now - Duration::days(29) - Duration::hours(23)));
    events.extend((0..5).map(|i| {
        feature_call(&format!("old{i}"), a, "ad_generations", now - Duration::days(30) - Duration::hours(1))
    }));
    // Failed calls do not consume quota.
    let mut failed = feature_call("failed", a, "ad_generations", now);
    failed.status = tally::event::Status::Error;
    events.push(failed);
    apply_usage(&env, events.clone(), 0).await;
    // Free tier: 10 calls. 10 used -> the 11th is refused with 429.
    let d = decide_now(&env.pool, &cfg, a, Some("ad_generations"), 0).await;
    assert_eq!((d.allowed, d.status, d.code), (false, 429, Some("quota_exceeded")), "{}", d.message);
    // A replay of the same events changes nothing (exact after replays).
    apply_usage(&env, events, 100).await;
    let s = QuotaState::default();
    s.refresh(&env.pool).await.unwrap();
    let (from, to) = tally::quota::window::rolling_window(Utc::now());
    let used = s.with_account(a, |acct| {
        acct.usage.get("feature", "ad_generations").expect("the feature counter").sum(from, to).events
    });
    assert_eq!(used, 10);
    // Pro tier: 100 calls -> allowed; another feature is still under its free limit.
    store::set_tier(&env.pool, a, "pro", Utc::now()).await.unwrap();
    assert!(decide_now(&env.pool, &cfg, a, Some("ad_generations"), 0).await.allowed);
    store::set_tier(&env.pool, a, "free", Utc::now()).await.unwrap();
    assert!(decide_now(&env.pool, &cfg, a, Some("brand_analyses"), 0).await.allowed);
    // Exactly at the limit: 9 used of 10 -> allowed (the 10th call).
    let b = "acct-reeve-2";
    let nine: Vec<_> = (0..9).map(|i| feature_call(&format!("b{i}"), b, "ad_generations", now)).collect();
    apply_usage(&env, nine, 200).await;
    assert!(decide_now(&env.pool, &cfg, b, Some("ad_generations"), 0).await.allowed);
    store::set_tier(&env.pool, b, "enterprise", Utc::now()).await.unwrap();
    assert!(
        decide_now(&env.pool, &cfg, b, Some("ad_generations"), 0).await.allowed,
        "enterprise is unlimited"
    );
}

/// Issue 16: a window roll-over while a hold is open. The hold counts until it is settled,
/// released or expired, whatever the hour; usage leaves the window with its hour.
#[tokio::test]
async fn an_open_hold_keeps_counting_while_old_usage_rolls_out_of_the_window() {
    let env = TestEnv::new(1).await;
    let cfg = config("reeve.toml");
    let a = "acct-roll";
    fund(&env, a).await;
    let now = Utc::now();
    // 8 calls now and 1 call in the oldest hour of the window (720 hours, the current one
    // included): it leaves the window within the next hour.
    let oldest_hour = tally::quota::window::rolling_window(now).0;
    let leaving = DateTime::from_timestamp(oldest_hour + 60, 0).unwrap();
    let mut events: Vec<_> =
        (0..8).map(|i| feature_call(&format!("r{i}"), a, "ad_generations", now)).collect();
    events.push(feature_call("leaving", a, "ad_generations", leaving));
    apply_usage(&env, events, 0).await;
    let s = QuotaState::default();
    s.refresh(&env.pool).await.unwrap();
    let ask = Ask { api_key_id: None, project_id: None, feature: Some("ad_generations") };
    let one_held = decide::HeldTotals { feature_units: 1, ..Default::default() };
    let decide_at = |t: DateTime<Utc>, held: &decide::HeldTotals| {
        s.with_account(a, |acct| {
            let mut view = state::view(&cfg, acct, &ask, t);
            let balance = (view.balance_units, view.reserved_units, view.pending_units);
            decide::with_holds(&mut view, balance, held);
            decide::decide(&view, Some("ad_generations"), 0)
        })
    };
    // Now: 9 used + 1 held = the free tier's 10: the next call is refused.
    assert_eq!(decide_at(now, &one_held).code, Some("quota_exceeded"));
    assert!(decide_at(now, &decide::HeldTotals::default()).allowed, "without the hold: the 10th call");
    // An hour later the old call has rolled out; the open hold still counts: 8 + 1 + 1.
    let later = now + Duration::hours(1);
    assert!(decide_at(later, &one_held).allowed, "the 10th call, the hold counted");
    let two_held = decide::HeldTotals { feature_units: 2, ..Default::default() };
    assert_eq!(decide_at(later, &two_held).code, Some("quota_exceeded"), "one over");
}

#[tokio::test]
async fn spend_limits_per_account_project_and_key_reset_on_the_first() {
    let env = TestEnv::new(1).await;
    let cfg = config("demo.toml");
    let a = "acct-caps";
    fund(&env, a).await;
    let now = Utc::now();
    let (month_start, _) = tally::quota::window::calendar_month(now);
    // Last month's spend ($2.20) does not count; this month's $0.66 does.
    let last_month = month_start - Duration::hours(2);
    let mut events: Vec<_> = (0..10).map(|i| spend(&format!("old{i}"), a, 1, last_month)).collect();
    events.extend((0..3).map(|i| spend(&format!("new{i}"), a, 1, now)));
    apply_usage(&env, events, 0).await;
    // A $1.00 cap on the API key: 0.66 spent + 0.34 estimate is exactly at it.
    store::set_limit(&env.pool, a, "api_key", "key-1", Some(USD)).await.unwrap();
    let at = decide_now(&env.pool, &cfg, a, None, 34_000_000).await;
    assert!(at.allowed, "{}", at.message);
    let over = decide_now(&env.pool, &cfg, a, None, 34_000_001).await;
    assert_eq!((over.status, over.code), (429, Some("spend_limit_exceeded")));
    assert!(over.message.contains("api key"));
    // Project cap below this month's spend; then removed; then an account cap.
    store::set_limit(&env.pool, a, "project", "stack-1", Some(66_000_000)).await.unwrap();
    assert!(decide_now(&env.pool, &cfg, a, None, 0).await.allowed, "exactly at the project cap");
    assert!(!decide_now(&env.pool, &cfg, a, None, 1).await.allowed);
    store::set_limit(&env.pool, a, "project", "stack-1", None).await.unwrap();
    store::set_limit(&env.pool, a, "api_key", "key-1", None).await.unwrap();
    assert!(decide_now(&env.pool, &cfg, a, None, 1).await.allowed, "removed caps no longer apply");
    store::set_limit(&env.pool, a, "account", "", Some(70_000_000)).await.unwrap();
    let d = decide_now(&env.pool, &cfg, a, None, 5_000_000).await;
    assert!(!d.allowed && d.message.starts_with("account"));
    assert!(store::set_limit(&env.pool, a, "planet", "x", Some(1)).await.is_err());
    // API deductions (Reeve) are spend too: a $0.05 deduction counts against the caps.
    let b = "acct-deduct";
    fund(&env, b).await;
    store::set_limit(&env.pool, b, "account", "", Some(10_000_000)).await.unwrap();
    let deduction = ledger::deductions::DeductionRequest {
        account_id: b.into(),
        amount_units: 5_000_000,
        idempotency_key: "d1".into(),
        description: "llm call".into(),
        created_by: None,
    };
    ledger::deductions::deduct(&env.pool, &deduction).await.unwrap();
    ledger::deductions::deduct(&env.pool, &deduction).await.unwrap(); // a replay: counted once
    assert!(decide_now(&env.pool, &cfg, b, None, 5_000_000).await.allowed, "exactly at the $0.10 cap");
    assert_eq!(decide_now(&env.pool, &cfg, b, None, 5_000_001).await.code, Some("spend_limit_exceeded"));
}

async fn change(
    env: &TestEnv,
    cfg: &QuotaConfig,
    a: &str,
    to: &str,
    key: &str,
) -> Result<store::PlanChange, ledger::ops::LedgerError> {
    let (_, current) = store::plan_of(&env.pool, cfg, a).await.unwrap();
    store::change_plan(
        &env.pool,
        &PlanChangeRequest {
            account_id: a,
            new_plan: &cfg.plans[to],
            old_plan: current.as_ref(),
            custom_terms: None,
            by_operator: false,
            idempotency_key: key,
            created_by: "owner@example.com",
            now: Utc::now(),
            cycle: cfg.cycle,
        },
    )
    .await
}

#[tokio::test]
async fn broomva_policies_at_their_boundaries() {
    let env = TestEnv::new(1).await;
    let cfg = config("broomva.toml");
    let now = Utc::now();
    // free: $0.50 hard limit. 2 x $0.22 consumed = $0.44: $0.06 left exactly.
    change(&env, &cfg, "acct-free", "free", "p1").await.unwrap();
    apply_usage(&env, vec![spend("f1", "acct-free", 1, now), spend("f2", "acct-free", 1, now)], 0).await;
    assert!(decide_now(&env.pool, &cfg, "acct-free", None, 6_000_000).await.allowed);
    let d = decide_now(&env.pool, &cfg, "acct-free", None, 6_000_001).await;
    assert_eq!(
        (d.status, d.code, d.overage.policy, d.overage.blocked),
        (402, Some("credits_exhausted"), "hard_limit", true)
    );
    assert_eq!(d.overage.overage_amount, 1);
    // pro: $50 soft limit to $60. 250 x $0.22 = $55: in overage, allowed to exactly $60.
    change(&env, &cfg, "acct-pro", "pro", "p2").await.unwrap();
    apply_usage(&env, vec![spend("p", "acct-pro", 250, now)], 10).await;
    let d = decide_now(&env.pool, &cfg, "acct-pro", None, 5 * USD).await;
    assert!(d.allowed && d.overage.in_overage && d.message.starts_with("warning"), "{}", d.message);
    assert_eq!(d.overage.overage_amount, 10 * USD);
    let d = decide_now(&env.pool, &cfg, "acct-pro", None, 5 * USD + 1).await;
    assert_eq!((d.code, d.overage.policy), (Some("credits_exhausted"), "soft_limit"));
    // team: warn, never blocked.
    change(&env, &cfg, "acct-team", "team", "p3").await.unwrap();
    apply_usage(&env, vec![spend("t", "acct-team", 1_000, now)], 20).await;
    let d = decide_now(&env.pool, &cfg, "acct-team", None, USD).await;
    assert!(d.allowed && d.overage.in_overage && !d.overage.blocked);
    assert_eq!((d.overage.policy, d.overage.overage_amount), ("warn", 21 * USD));
    // prepaid (no plan): refused at zero with insufficient_quota.
    apply_usage(&env, vec![spend("z", "acct-prepaid", 1, now)], 30).await;
    let d = decide_now(&env.pool, &cfg, "acct-prepaid", None, 0).await;
    assert_eq!((d.status, d.code, d.overage.policy), (402, Some("insufficient_quota"), "prepaid"));
}

#[tokio::test]
async fn plan_changes_prorate_cap_noop_and_refuse_enterprise() {
    let env = TestEnv::new(1).await;
    let cfg = config("broomva.toml");
    let a = "acct-plans";
    let first = change(&env, &cfg, a, "free", "c1").await.unwrap();
    assert_eq!((first.direction.as_str(), first.credit_adjustment_units), ("initial", 50_000_000));
    // Upgrade free -> pro at the start of a fresh cycle: nearly the whole $49.50 difference.
    let up = change(&env, &cfg, a, "pro", "c2").await.unwrap();
    assert_eq!(up.direction, "upgrade");
    let diff = 4_950_000_000i64;
    assert!(
        up.credit_adjustment_units <= diff && up.credit_adjustment_units > diff * 99 / 100,
        "{}",
        up.credit_adjustment_units
    );
    let again = change(&env, &cfg, a, "pro", "c3").await.unwrap();
    assert_eq!((again.direction.as_str(), again.entry), ("no_change", None));
    // Replaying the upgrade's key returns the original result.
    let replay = store::change_plan(
        &env.pool,
        &PlanChangeRequest {
            account_id: a,
            new_plan: &cfg.plans["pro"],
            old_plan: Some(&cfg.plans["free"]),
            custom_terms: None,
            by_operator: false,
            idempotency_key: "c2",
            created_by: "owner@example.com",
            now: Utc::now(),
            cycle: cfg.cycle,
        },
    )
    .await
    .unwrap();
    assert_eq!(replay, up);
    let refused = change(&env, &cfg, a, "enterprise", "c4").await;
    assert!(matches!(refused, Err(ledger::ops::LedgerError::NotAllowed(_))));
    // Downgrade pro -> free caps the balance at $0.50.
    let down = change(&env, &cfg, a, "free", "c5").await.unwrap();
    assert_eq!(down.direction, "downgrade");
    let b = ledger::balance(&env.pool, a).await.unwrap().unwrap();
    assert_eq!(b.balance_units, 50_000_000);
    assert_eq!(
        down.credit_adjustment_units, -up.credit_adjustment_units,
        "back from 0.50 + upgrade credit to 0.50"
    );
    let audit: Vec<(String, String, String, i64)> = sqlx::query_as(
        "SELECT old_plan, new_plan, direction, credit_adjustment_units FROM plan_changes ORDER BY change_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(audit.len(), 2);
    assert_eq!((audit[0].0.as_str(), audit[0].1.as_str(), audit[0].2.as_str()), ("free", "pro", "upgrade"));
    assert_eq!((audit[1].2.as_str(), audit[1].3), ("downgrade", down.credit_adjustment_units));
    ledger::verify(&env.pool).await.unwrap();
}

/// Issue 11.6: an operator puts an account on enterprise with its own allocation and
/// ceiling (BroomVA: "configured during provisioning ... custom ceilings"); customers still
/// cannot self-upgrade to it, nor set terms; authorize decides by the account's terms.
#[tokio::test]
async fn operators_assign_enterprise_with_custom_terms() {
    use tally::quota::config::{CustomTerms, OveragePolicy};
    let env = TestEnv::new(1).await;
    let cfg = config("broomva.toml");
    let a = "acct-ent";
    change(&env, &cfg, a, "team", "e1").await.unwrap();
    let terms = CustomTerms {
        allocation_units: 300 * USD,
        policy: OveragePolicy::SoftLimit,
        soft_limit_percent: 150,
    };
    let operator = |key: &'static str, terms: Option<CustomTerms>, by_operator: bool| {
        let env = &env;
        let cfg = &cfg;
        async move {
            let (_, old) = store::plan_of(&env.pool, cfg, a).await.unwrap();
            store::change_plan(
                &env.pool,
                &PlanChangeRequest {
                    account_id: a,
                    new_plan: &cfg.plans["enterprise"],
                    old_plan: old.as_ref(),
                    custom_terms: terms,
                    by_operator,
                    idempotency_key: key,
                    created_by: "sales@example.com",
                    now: Utc::now(),
                    cycle: cfg.cycle,
                },
            )
            .await
        }
    };
    // A customer can neither pick enterprise nor give itself terms.
    assert!(matches!(
        change(&env, &cfg, a, "enterprise", "e2").await,
        Err(ledger::ops::LedgerError::NotAllowed(_))
    ));
    assert!(matches!(operator("e3", Some(terms), false).await, Err(ledger::ops::LedgerError::NotAllowed(_))));
    let bad = CustomTerms { soft_limit_percent: 99, ..terms };
    assert!(matches!(operator("e4", Some(bad), true).await, Err(ledger::ops::LedgerError::Invalid(_))));

    // The operator can: team ($200) -> enterprise ($300 custom) is an upgrade, credited the
    // prorated allocation difference.
    let up = operator("e5", Some(terms), true).await.unwrap();
    assert_eq!(up.new_plan, "enterprise");
    let replay = operator("e5", Some(terms), true).await.unwrap();
    assert_eq!(replay, up, "a retry replays");
    assert_eq!(up.direction, "upgrade");
    assert!(up.credit_adjustment_units > 0 && up.credit_adjustment_units <= 100 * USD);
    let other = CustomTerms { allocation_units: 400 * USD, ..terms };
    assert!(
        matches!(operator("e5", Some(other), true).await, Err(ledger::ops::LedgerError::Conflict { .. })),
        "the same key with other terms is a conflict"
    );
    let (_, now_on) = store::plan_of(&env.pool, &cfg, a).await.unwrap();
    let now_on = now_on.unwrap();
    assert_eq!(
        (now_on.allocation_units, now_on.policy, now_on.soft_limit_percent),
        (300 * USD, OveragePolicy::SoftLimit, 150)
    );

    // Authorize reads the account's terms on its balance (team's $200 + the prorated
    // upgrade - $330 spent): the 150% ceiling lets it go $150 below zero, no further.
    apply_usage(&env, vec![spend("ent", a, 1_500, Utc::now())], 0).await;
    let balance = ledger::balance(&env.pool, a).await.unwrap().unwrap().balance_units;
    assert!(balance < 0, "{balance}");
    let d = decide_now(&env.pool, &cfg, a, None, balance + 150 * USD).await;
    assert!(d.allowed && d.overage.in_overage, "{d:?}");
    assert_eq!((d.overage.policy, d.overage.overage_amount), ("soft_limit", 150 * USD));
    let d = decide_now(&env.pool, &cfg, a, None, balance + 150 * USD + 1).await;
    assert_eq!((d.status, d.code), (402, Some("credits_exhausted")));

    // New terms on the same plan: a larger allocation is an upgrade (prorated credit).
    let raised = operator("e6", Some(other), true).await.unwrap();
    assert_eq!(raised.direction, "upgrade");
    assert!(raised.credit_adjustment_units > 0 && raised.credit_adjustment_units <= 100 * USD);
    let same = operator("e7", Some(other), true).await.unwrap();
    assert_eq!(same.direction, "no_change");
    // A customer may still leave enterprise (a downgrade): the custom terms go with it.
    let down = change(&env, &cfg, a, "pro", "e8").await.unwrap();
    assert_eq!(down.direction, "downgrade");
    let (name, plan) = store::plan_of(&env.pool, &cfg, a).await.unwrap();
    assert_eq!((name.as_deref(), plan.as_ref()), (Some("pro"), Some(&cfg.plans["pro"])));
    ledger::verify(&env.pool).await.unwrap();
}

/// Issue 11.4, one model of a plan: the allocation is posted at each cycle start exactly
/// once per account (two instances, a restart across boundaries), no rollover; authorize,
/// reservations and the ledger balance agree, through an upgrade and a downgrade.
#[tokio::test]
async fn plan_cycles_post_the_allocation_once_per_cycle_and_everything_reads_the_balance() {
    use tally::ledger::reservations::{self, ReserveRequest};
    let env = TestEnv::new(1).await;
    let cfg = config("broomva.toml"); // anchored 30-day cycles
    let a = "acct-cycles";
    let balance = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move { ledger::balance(&pool, a).await.unwrap().unwrap().balance_units }
    };
    let next_cycle = |env: &TestEnv| {
        let pool = env.pool.clone();
        async move {
            let (t,): (DateTime<Utc>,) =
                sqlx::query_as("SELECT next_cycle_at FROM account_plans WHERE account_id = $1")
                    .bind(a)
                    .fetch_one(&pool)
                    .await
                    .unwrap();
            t
        }
    };
    change(&env, &cfg, a, "pro", "k1").await.unwrap();
    assert_eq!(balance(&env).await, 50 * USD, "the first cycle's allocation");
    apply_usage(&env, vec![spend("c1", a, 100, Utc::now())], 0).await; // $22
    assert_eq!(balance(&env).await, 28 * USD);
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, Utc::now()).await.unwrap(), 0, "not due yet");

    // Cycle 2: reset to the allocation ($22 spent, $28 left: nothing rolls over).
    let t1 = next_cycle(&env).await;
    assert!(t1 > Utc::now() + Duration::days(29), "{t1}");
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, t1).await.unwrap(), 1);
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, t1).await.unwrap(), 0, "once per cycle");
    assert_eq!(balance(&env).await, 50 * USD);
    assert_eq!(next_cycle(&env).await, t1 + Duration::days(30));

    // Cycle 3 with two instances at once: still exactly one entry.
    apply_usage(&env, vec![spend("c2", a, 300, Utc::now())], 1).await; // $66: $16 in overage
    assert_eq!(balance(&env).await, -16 * USD);
    let t2 = next_cycle(&env).await;
    let (x, y) = tokio::join!(
        store::post_due_cycles(&env.pool, &cfg, t2 + Duration::seconds(1)),
        store::post_due_cycles(&env.pool, &cfg, t2 + Duration::seconds(1))
    );
    assert_eq!(x.unwrap() + y.unwrap(), 1);
    assert_eq!(balance(&env).await, 50 * USD, "an overage does not carry into the next cycle");

    // Down across two boundaries: the current cycle is posted once, on restart.
    let t3 = next_cycle(&env).await;
    let late = t3 + Duration::days(35);
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, late).await.unwrap(), 1);
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, late).await.unwrap(), 0);
    assert_eq!(next_cycle(&env).await, t3 + Duration::days(60));
    let resets = env
        .count(&format!(
            "SELECT count(*) FROM ledger_entries WHERE account_id = '{a}' AND kind = 'plan_reset'"
        ))
        .await;
    assert_eq!(resets, 3, "cycles 2, 3 and the one after the downtime");

    // Authorize reads the balance: pro is soft 120%, so $50 + $10 may be used.
    let d = decide_now(&env.pool, &cfg, a, None, 60 * USD).await;
    assert!(d.allowed && d.overage.in_overage, "{d:?}");
    let d = decide_now(&env.pool, &cfg, a, None, 60 * USD + 1).await;
    assert_eq!(d.code, Some("credits_exhausted"));
    // ...and so does a hold, with the same overdraft.
    let pro = &cfg.plans["pro"];
    let hold = |id: &str, units: i64| ReserveRequest {
        account_id: a.into(),
        reservation_id: id.into(),
        amount_units: units,
        ttl_secs: 60,
        overdraft_units: tally::quota::decide::overdraft_units(pro),
    };
    assert!(reservations::reserve(&env.pool, &hold("h-over", 60 * USD + 1)).await.is_err());
    reservations::reserve(&env.pool, &hold("h-ok", 60 * USD)).await.unwrap();
    let d = decide_now(&env.pool, &cfg, a, None, 1).await;
    assert_eq!(d.code, Some("credits_exhausted"), "the hold used everything authorize allows");
    reservations::release(&env.pool, "h-ok").await.unwrap();

    // Downgrade to free (hard $0.50): the balance is capped, authorize follows it.
    change(&env, &cfg, a, "free", "k2").await.unwrap();
    assert_eq!(balance(&env).await, USD / 2);
    assert!(decide_now(&env.pool, &cfg, a, None, USD / 2).await.allowed);
    assert!(!decide_now(&env.pool, &cfg, a, None, USD / 2 + 1).await.allowed);
    // Upgrade back mid-cycle: the prorated difference is credited and usable at once.
    change(&env, &cfg, a, "pro", "k3").await.unwrap();
    let b = balance(&env).await;
    assert!(b > USD / 2 && b <= 50 * USD, "{b}");
    assert!(decide_now(&env.pool, &cfg, a, None, b + 10 * USD).await.allowed);
    // The cycle is the account's: the next allocation is still posted once, at its start.
    let t4 = next_cycle(&env).await;
    assert_eq!(store::post_due_cycles(&env.pool, &cfg, t4).await.unwrap(), 1);
    assert_eq!(balance(&env).await, 50 * USD);
    ledger::verify(&env.pool).await.unwrap();
}

/// A restart restores `usage_hourly` (folded changes) and streams the unfolded changes on
/// top: the same totals before a fold, after it, and with changes on both sides of it,
/// including in the same bucket.
#[tokio::test]
async fn a_restore_adds_unfolded_changes_to_folded_buckets_exactly_once() {
    let env = TestEnv::new(1).await;
    let a = "acct-fold";
    fund(&env, a).await;
    let now = Utc::now();
    let restored_count = || async {
        let s = QuotaState::default();
        s.refresh(&env.pool).await.unwrap();
        let (from, to) = tally::quota::window::rolling_window(Utc::now());
        s.with_account(a, |acct| {
            acct.usage.get("feature", "ad_generations").map_or(0, |b| b.sum(from, to).events)
        })
    };
    let calls = |prefix: &str, n: usize, at: DateTime<Utc>| -> Vec<UsageEvent> {
        (0..n).map(|i| feature_call(&format!("{prefix}{i}"), a, "ad_generations", at)).collect()
    };
    apply_usage(&env, calls("first", 3, now), 0).await;
    apply_usage(&env, calls("older", 2, now - Duration::hours(5)), 10).await;
    assert_eq!(restored_count().await, 5, "unfolded only");
    assert!(ledger::counting::fold_changes(&env.pool).await.unwrap() >= 2);
    assert_eq!(restored_count().await, 5, "folded only");
    // More in a folded bucket (now) and in a new one; the fold has nothing to redo.
    apply_usage(&env, calls("second", 4, now), 20).await;
    apply_usage(&env, calls("newer", 1, now - Duration::hours(2)), 30).await;
    assert_eq!(restored_count().await, 10, "folded plus unfolded, each counted once");
    assert!(ledger::counting::fold_changes(&env.pool).await.unwrap() >= 2);
    assert_eq!(ledger::counting::fold_changes(&env.pool).await.unwrap(), 0, "nothing folds twice");
    assert_eq!(restored_count().await, 10);
    let folded: i64 = sqlx::query_scalar(
        "SELECT sum(events)::bigint FROM usage_hourly WHERE account_id = $1 AND kind = 'feature'",
    )
    .bind(a)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(folded, 10);
}
