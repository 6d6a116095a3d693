//! Credit grants against real Postgres: burn order (priority, expiry, age) across purchase,
//! bonus and promotional grants; the event-time rule at a deadline; breakage written once
//! under concurrent expirers and debits; overdraft repaid by the next grant; `ledger
//! verify` proving every grant's remainder from the journal.

mod common;

use chrono::{DateTime, SubsecRound, Utc};
use common::*;
use rust_decimal::Decimal;
use std::time::Duration;
use tally::event::UsageEvent;
use tally::ledger;
use tally::ledger::config::LedgerConfig;
use tally::ledger::deductions::{self, DeductionRequest};
use tally::ledger::grants::{self, GrantRequest, GrantSource};
use tally::ledger::topup::{self, TopupRequest};

const USD: i64 = tally::money::UNITS_PER_USD;

fn promotion(account: &str, key: &str, units: i64, expires_at: Option<DateTime<Utc>>) -> GrantRequest {
    GrantRequest {
        account_id: account.into(),
        idempotency_key: key.into(),
        units,
        source: GrantSource::Promotion,
        priority: None,
        expires_at,
        expires_in_days: None,
        created_by: "ops@example.com".into(),
        reason: "launch promotion".into(),
    }
}

async fn remaining(env: &TestEnv, grant_id: i64) -> i64 {
    sqlx::query_scalar("SELECT remaining_units FROM credit_grants WHERE grant_id = $1")
        .bind(grant_id)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

async fn balance(env: &TestEnv, account: &str) -> i64 {
    ledger::balance(&env.pool, account).await.unwrap().expect("account exists").balance_units
}

async fn changes_of(env: &TestEnv, event_id: &str) -> Vec<(i64, i64)> {
    let json: serde_json::Value =
        sqlx::query_scalar("SELECT grant_changes FROM ledger_entries WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    serde_json::from_value(json).unwrap()
}

fn deduction(account: &str, key: &str, units: i64) -> DeductionRequest {
    DeductionRequest {
        account_id: account.into(),
        amount_units: units,
        idempotency_key: key.into(),
        description: "api call".into(),
        created_by: None,
    }
}

#[tokio::test]
async fn grants_burn_in_order_expire_once_and_repay_the_overdraft() {
    let env = TestEnv::new(1).await;
    let cfg = LedgerConfig::load(&repo().join("examples/brievio.toml")).unwrap();
    let a = "acct-grants";
    // Brievio: $100 buys $110: a purchase grant of 100 and a bonus grant of 10.
    let req = TopupRequest {
        order_id: "ord-1".into(),
        account_id: a.into(),
        paid_usd: Decimal::from(100),
        source: "operator",
    };
    let t = topup::complete(&env.pool, &cfg.topup, &req).await.unwrap();
    let (purchase, bonus) = match t.entry.as_ref().unwrap().grant_ids[..] {
        [p, b] => (p, b),
        ref other => panic!("a purchase with a bonus is two grants, got {other:?}"),
    };
    assert_eq!(
        topup::complete(&env.pool, &cfg.topup, &req).await.unwrap(),
        t,
        "a replay names the same grants"
    );
    assert_eq!((remaining(&env, purchase).await, remaining(&env, bonus).await), (100 * USD, 10 * USD));

    // A $1 promotion with a deadline 3 s away: it burns first (priority 100 < bonus 200).
    let deadline = Utc::now() + chrono::Duration::seconds(3);
    let p =
        grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-1", USD, Some(deadline))).await.unwrap();
    let again =
        grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-1", USD, Some(deadline))).await.unwrap();
    assert_eq!((again.grant_id, again.entry_id), (p.grant_id, p.entry_id), "same key: a replay");
    let other =
        grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-1", 2 * USD, Some(deadline))).await;
    assert!(matches!(other, Err(ledger::ops::LedgerError::Conflict { .. })), "same key, other payload");
    // Without a deadline the catalog's term applies (Brievio: promotions last 30 days).
    let p30 = grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-30", USD, None)).await.unwrap();
    let listed = grants::list(&env.pool, a, None, 10, true).await.unwrap();
    let g30 = listed.iter().find(|g| g.grant_id == p30.grant_id).unwrap();
    let days = (g30.expires_at.unwrap() - g30.created_at).num_days();
    assert_eq!((days, g30.source.as_str()), (30, "promotion"));
    let next = ledger::balance(&env.pool, a).await.unwrap().unwrap().next_expiry.unwrap();
    assert_eq!(
        (next.expires_at, next.units),
        (deadline.trunc_subsecs(6), USD),
        "the next deadline and what is left on it"
    );

    // Usage before the deadline: the promotion with the earliest deadline pays first.
    apply_usage(&env, vec![chat_call("e1", a, None)], 0).await;
    assert_eq!(changes_of(&env, "e1").await, vec![(p.grant_id, -CHAT_UNITS)], "which grant paid this call");
    // Five more: $1.10 spans the rest of the 3-second promotion, then the 30-day one.
    let events: Vec<UsageEvent> = (2..=6).map(|i| chat_call(&format!("e{i}"), a, None)).collect();
    apply_usage(&env, events, 1).await;
    assert_eq!(changes_of(&env, "e5").await, vec![(p.grant_id, -12_000_000), (p30.grant_id, -10_000_000)]);
    assert_eq!((remaining(&env, p.grant_id).await, remaining(&env, p30.grant_id).await), (0, 68_000_000));

    // A second short promotion, left unspent past its deadline.
    let deadline2 = Utc::now() + chrono::Duration::seconds(2);
    let p2 =
        grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-2", USD, Some(deadline2))).await.unwrap();
    tokio::time::sleep((deadline2 - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(100))
        .await;
    // Past its deadline it pays nothing, though its remainder is not written off yet.
    apply_usage(&env, vec![chat_call("e7", a, None)], 6).await;
    assert_eq!(changes_of(&env, "e7").await, vec![(p30.grant_id, -CHAT_UNITS)]);
    assert_eq!(remaining(&env, p2.grant_id).await, USD);
    let before = balance(&env, a).await;
    assert_eq!(grants::expire_due(&env.pool, Utc::now()).await.unwrap(), 1, "one grant had something left");
    assert_eq!(grants::expire_due(&env.pool, Utc::now()).await.unwrap(), 0, "written off once");
    assert_eq!(balance(&env, a).await, before - USD);
    let (kind, amount, key): (String, i64, String) = sqlx::query_as(
        "SELECT e.kind, e.amount_units, e.idempotency_key FROM credit_grants g
         JOIN ledger_entries e ON e.entry_id = g.expired_entry_id WHERE g.grant_id = $1",
    )
    .bind(p2.grant_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((kind.as_str(), amount, key), ("breakage", -USD, format!("breakage:{}", p2.grant_id)));

    // Overdraft: a $200 deduction takes everything left and $90.22 more.
    let d = deductions::deduct(&env.pool, &deduction(a, "big", 200 * USD)).await.unwrap();
    let left_before: i64 = 100 * USD + 10 * USD + 68_000_000 - CHAT_UNITS;
    assert_eq!(d.entry.balance_after_units, left_before - 200 * USD);
    let overdraft = 200 * USD - left_before;
    for g in [purchase, bonus, p30.grant_id] {
        assert_eq!(remaining(&env, g).await, 0, "grant {g} burned");
    }
    // The next purchase repays the overdraft first: a $50 purchase is all repayment.
    let req2 = TopupRequest {
        order_id: "ord-2".into(),
        account_id: a.into(),
        paid_usd: Decimal::from(50),
        source: "operator",
    };
    let t2 = topup::complete(&env.pool, &cfg.topup, &req2).await.unwrap();
    let g2 = t2.entry.unwrap().grant_ids[0];
    assert_eq!(remaining(&env, g2).await, 0);
    let g3 = grants::grant(&env.pool, &cfg.grants, &promotion(a, "promo-3", 100 * USD, None)).await.unwrap();
    let left = 100 * USD - (overdraft - 50 * USD);
    assert_eq!(remaining(&env, g3.grant_id).await, left, "repaid the rest, kept what remained");
    assert_eq!(balance(&env, a).await, left, "balance == sum of the grants' remainders");
    let repaid: (i64, i64) =
        sqlx::query_as("SELECT (SELECT repaid_units FROM credit_grants WHERE grant_id = $1), (SELECT repaid_units FROM credit_grants WHERE grant_id = $2)")
            .bind(g2)
            .bind(g3.grant_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(repaid, (50 * USD, overdraft - 50 * USD));

    let report = ledger::verify(&env.pool).await.unwrap();
    assert_eq!((report.grants, report.overdrawn_accounts), (7, 0));
}

#[tokio::test]
async fn debits_across_a_deadline_with_concurrent_expirers_write_off_once() {
    let env = TestEnv::new(1).await;
    let policies = grants::GrantPolicies::default();
    let a = "acct-race";
    credit(&env, a, 100 * USD).await; // an operator addition: a never-expiring grant
    let deadline = Utc::now() + chrono::Duration::milliseconds(1500);
    let promo =
        grants::grant(&env.pool, &policies, &promotion(a, "promo", 5 * USD, Some(deadline))).await.unwrap();
    let until = tokio::time::Instant::now() + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for e in 0..3 {
        let pool = env.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = 0;
            while tokio::time::Instant::now() < until {
                written += grants::expire_due(&pool, Utc::now()).await.unwrap();
                tokio::time::sleep(Duration::from_millis(20 + e * 7)).await;
            }
            written
        }));
    }
    for w in 0..2 {
        let pool = env.pool.clone();
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while tokio::time::Instant::now() < until {
                let key = format!("d-{w}-{n}");
                deductions::deduct(&pool, &deduction("acct-race", &key, 100_000)).await.unwrap();
                n += 1;
            }
            0
        }));
    }
    let mut written = 0;
    for t in tasks {
        written += t.await.unwrap();
    }
    assert_eq!(written, 1, "the promotion is written off by exactly one expirer");
    let breakages: i64 = sqlx::query_scalar("SELECT count(*) FROM ledger_entries WHERE kind = 'breakage'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(breakages, 1);
    // No debit dated at or after the deadline burned the promotion.
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c
         WHERE e.kind = 'consume' AND (c->>0)::bigint = $1 AND e.occurred_at >= $2",
    )
    .bind(promo.grant_id)
    .bind(deadline)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(late, 0);
    let (debits, count): (i64, i64) = sqlx::query_as(
        "SELECT COALESCE(-sum(amount_units), 0)::bigint, count(*) FROM ledger_entries WHERE kind = 'consume'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(count > 10, "the debits ran across the deadline ({count})");
    let burned_from_promo: i64 = sqlx::query_scalar(
        "SELECT COALESCE(-sum((c->>1)::bigint), 0)::bigint FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c
         WHERE e.kind = 'consume' AND (c->>0)::bigint = $1",
    )
    .bind(promo.grant_id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert!(burned_from_promo > 0, "debits before the deadline burned the promotion first");
    let written_off = 5 * USD - burned_from_promo;
    assert_eq!(
        balance(&env, a).await,
        105 * USD - debits - written_off,
        "every unit is a debit, a write-off or left"
    );
    assert_eq!(remaining(&env, promo.grant_id).await, 0);
    ledger::verify(&env.pool).await.unwrap();
}

#[tokio::test]
async fn a_refund_of_a_call_goes_back_to_the_grants_that_paid_it() {
    use tally::ledger::ops::{self, ManualKind, ManualRequest};
    let env = TestEnv::new(1).await;
    let a = "acct-refund";
    let deadline = Utc::now() + chrono::Duration::hours(1);
    let policies = grants::GrantPolicies::default();
    let promo =
        grants::grant(&env.pool, &policies, &promotion(a, "promo", USD, Some(deadline))).await.unwrap();
    credit(&env, a, 10 * USD).await;
    let base: i64 = sqlx::query_scalar(
        "SELECT grant_id FROM credit_grants WHERE account_id = $1 AND source = 'operator'",
    )
    .bind(a)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    let events: Vec<UsageEvent> = (1..=5).map(|i| chat_call(&format!("r{i}"), a, None)).collect();
    apply_usage(&env, events, 0).await;
    assert_eq!(changes_of(&env, "r5").await, vec![(promo.grant_id, -12_000_000), (base, -10_000_000)]);
    let entry: i64 = sqlx::query_scalar("SELECT entry_id FROM ledger_entries WHERE event_id = 'r5'")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    let refund = |key: &str, units: i64| ManualRequest {
        account_id: a.into(),
        idempotency_key: key.into(),
        kind: ManualKind::Correction { entry_id: entry, units },
        created_by: "support@example.com".into(),
        reason: "failed generation refunded".into(),
    };
    // The call's price back: into the grants that paid it, latest-burned first.
    let posted = ops::manual(&env.pool, &refund("refund-1", CHAT_UNITS)).await.unwrap();
    assert!(posted.grant_ids.is_empty(), "no new grant: {posted:?}");
    let changes: serde_json::Value =
        sqlx::query_scalar("SELECT grant_changes FROM ledger_entries WHERE entry_id = $1")
            .bind(posted.entry_id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!(changes, serde_json::json!([[base, 10_000_000], [promo.grant_id, 12_000_000]]));
    assert_eq!((remaining(&env, base).await, remaining(&env, promo.grant_id).await), (10 * USD, 12_000_000));
    // Refunding the same call again: nothing left to give back, so a new grant.
    let again = ops::manual(&env.pool, &refund("refund-2", USD)).await.unwrap();
    let [new] = again.grant_ids[..] else { panic!("one new grant: {again:?}") };
    let (source, left): (String, i64) =
        sqlx::query_as("SELECT source, remaining_units FROM credit_grants WHERE grant_id = $1")
            .bind(new)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((source.as_str(), left), ("correction", USD));
    assert_eq!(balance(&env, a).await, 11 * USD - 5 * CHAT_UNITS + CHAT_UNITS + USD);
    ledger::verify(&env.pool).await.unwrap();
}

#[tokio::test]
async fn a_plan_reset_ends_every_grant_and_starts_the_new_allocation() {
    use tally::ledger::ops::{self, ManualKind, ManualRequest};
    let env = TestEnv::new(1).await;
    let a = "acct-reset";
    credit(&env, a, 3 * USD).await;
    let promo = grants::grant(&env.pool, &grants::GrantPolicies::default(), &promotion(a, "p", USD, None))
        .await
        .unwrap();
    // Into overdraft first: the reset forgives it (no rollover either way).
    deductions::deduct(&env.pool, &deduction(a, "big", 5 * USD)).await.unwrap();
    assert_eq!(balance(&env, a).await, -USD);
    let req = ManualRequest {
        account_id: a.into(),
        idempotency_key: "cycle-2".into(),
        kind: ManualKind::PlanReset(10 * USD),
        created_by: "plans".into(),
        reason: "cycle 2".into(),
    };
    let posted = ops::manual(&env.pool, &req).await.unwrap();
    assert_eq!((posted.amount_units, posted.balance_after_units), (11 * USD, 10 * USD));
    let [alloc] = posted.grant_ids[..] else { panic!("one allocation grant: {posted:?}") };
    assert_eq!(remaining(&env, alloc).await, 10 * USD);
    assert_eq!(remaining(&env, promo.grant_id).await, 0);
    let live = grants::list(&env.pool, a, None, 10, true).await.unwrap();
    assert_eq!(
        live.iter().map(|g| (g.grant_id, g.source.as_str())).collect::<Vec<_>>(),
        vec![(alloc, "plan_allocation")]
    );
    // With something left at the next reset, it ends too.
    deductions::deduct(&env.pool, &deduction(a, "small", 4 * USD)).await.unwrap();
    let req = ManualRequest { idempotency_key: "cycle-3".into(), ..req };
    let posted = ops::manual(&env.pool, &req).await.unwrap();
    assert_eq!(posted.amount_units, 4 * USD);
    assert_eq!(remaining(&env, alloc).await, 0);
    ledger::verify(&env.pool).await.unwrap();
}
