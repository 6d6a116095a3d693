//! Scenario 8: credit grants expiring while `tally run` is killed. Fifty of the simulator's
//! accounts hold a never-expiring grant and a promotion whose deadline falls inside the
//! traffic window (staggered), so deadlines pass while batches burn grants, while a
//! process dies mid-batch, and while no process runs at all. Beyond every shared check
//! (balances now include the credit and what expired): every promotion past its deadline
//! has nothing left, was written off at most once (its `breakage` entry, if any, is the
//! one its row names), and no debit dated at or after a deadline burned that grant.

use super::ops::{Tally, feed, say, secs};
use super::scenarios::{Cfg, Row, Scene, rate};
use super::traffic::{sim_opts, simulated};
use chrono::Utc;
use std::time::Duration;
use tally::ledger::grants::{self, GrantPolicies, GrantRequest, GrantSource};

const ACCOUNTS: usize = 50;
const USD: i64 = tally::money::UNITS_PER_USD;

pub async fn expiring_grants(cfg: &Cfg) -> Row {
    let name = "8 grants expiring under kill -9".to_string();
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let window = Duration::from_secs(20);
    let t0 = Utc::now();
    for i in 0..ACCOUNTS {
        let account = format!("acct-{i:04}");
        let deadline = t0 + chrono::Duration::milliseconds(2_000 + 300 * i as i64);
        for (key, units, source, expires_at) in [
            ("base", 2 * USD, GrantSource::Operator, None),
            ("promo", USD / 2, GrantSource::Promotion, Some(deadline)),
        ] {
            let req = GrantRequest {
                account_id: account.clone(),
                idempotency_key: format!("{key}-{account}"),
                units,
                source,
                priority: None,
                expires_at,
                expires_in_days: None,
                created_by: "faults".into(),
                reason: "scenario 8".into(),
            };
            grants::grant(&sc.env.pool, &GrantPolicies::default(), &req).await.expect("grant");
            *sc.book.credited.entry(account.clone()).or_default() += units;
        }
    }
    let mut source = simulated(sim_opts(cfg.seed + 80, 0.02, 0.0), sc.catalog.clone());
    let group = sc.env.group.clone();
    let first = sc.spawn("life-0");
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let kills = async {
        let mut run = first;
        for k in 1..=3 {
            tokio::time::sleep(Duration::from_millis(4_500)).await;
            run.kill9();
            // Down for a while: some deadlines pass with no process running.
            tokio::time::sleep(Duration::from_millis(1_500)).await;
            run = Tally::spawn(env, &format!("life-{k}"), &group, 0, &[]);
        }
        run
    };
    let (fed, mut run) =
        tokio::join!(feed(producer, &env.topic, n, rate(n, window), book, &mut source), kills);
    say(format!("{name}: produced {} in {}", fed.sent, secs(fed.took)));
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    // The last deadline is ~17 s after the start; the live process writes it off within a
    // second or so of it.
    let started = std::time::Instant::now();
    while due_left(&sc).await > 0 && started.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sc.stop(std::slice::from_mut(&mut run));
    check_grants(&mut sc).await;
    let faults = format!(
        "{ACCOUNTS} promotions expiring over 17 s; 3 kill -9 with 1.5 s down each; {} credit granted",
        tally::money::units_to_usd_string(sc.book.credited.values().sum())
    );
    sc.row(&name, faults, &msgs, None).await
}

/// Grants past their deadline with something left.
async fn due_left(sc: &Scene) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM credit_grants WHERE expires_at <= now() AND remaining_units > 0")
        .fetch_one(&sc.env.pool)
        .await
        .expect("due grants")
}

async fn check_grants(sc: &mut Scene) {
    let pool = &sc.env.pool;
    let left = due_left(sc).await;
    if left > 0 {
        sc.errors.push(format!("{left} grants past their deadline still hold credit"));
    }
    let (promos, expired): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE expires_at <= now()) FROM credit_grants WHERE source = 'promotion'",
    )
    .fetch_one(pool)
    .await
    .expect("promotions");
    if (promos, expired) != (ACCOUNTS as i64, ACCOUNTS as i64) {
        sc.errors.push(format!("{expired} of {promos} promotions expired, expected all {ACCOUNTS}"));
    }
    // At most one write-off per grant, and it is the one the grant names.
    let stray: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e
         LEFT JOIN credit_grants g ON g.expired_entry_id = e.entry_id
         WHERE e.kind = 'breakage' AND (g.grant_id IS NULL OR e.idempotency_key <> 'breakage:' || g.grant_id)",
    )
    .fetch_one(pool)
    .await
    .expect("breakage entries");
    if stray > 0 {
        sc.errors.push(format!("{stray} breakage entries that no grant names as its write-off"));
    }
    let late: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c, credit_grants g
         WHERE e.kind = 'consume' AND g.grant_id = (c->>0)::bigint AND g.expires_at IS NOT NULL
           AND e.occurred_at >= g.expires_at",
    )
    .fetch_one(pool)
    .await
    .expect("late burns");
    if late > 0 {
        sc.errors.push(format!("{late} debits dated at or after a grant's deadline burned it"));
    }
    let (burned, written_off): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(DISTINCT (c->>0)::bigint) FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c,
                        credit_grants g
                 WHERE e.kind = 'consume' AND g.grant_id = (c->>0)::bigint AND g.source = 'promotion'),
                (SELECT count(*) FROM ledger_entries WHERE kind = 'breakage')",
    )
    .fetch_one(pool)
    .await
    .expect("promotion use");
    say(format!("  promotions: {burned} burned by usage, {written_off} written off at their deadline"));
    if burned == 0 || written_off == 0 {
        sc.errors.push(format!(
            "the scenario did not exercise both paths ({burned} promotions burned, {written_off} written off)"
        ));
    }
}
