//! End to end through the real broker, Postgres and ClickHouse: >= 100,000 messages with
//! duplicates (some on other partitions) and malformed ones, `tally run` stopped with
//! SIGTERM and killed with SIGKILL mid-stream, restarted each time. Expected totals are
//! computed here, independently, from exactly what was produced.

mod common;

use common::*;
use std::collections::{HashMap, HashSet};
use std::time::Duration;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, SimulateOptions};

const CATALOG: &str = "examples/demo.toml";
const MESSAGES: usize = 120_000;

struct Expected {
    distinct: HashSet<String>,
    debit_units: i64,
    per_account_units: HashMap<String, i64>,
    malformed: usize,
    duplicates: usize,
}

fn expected(messages: &[tally::simulate::Message], catalog: &Catalog) -> Expected {
    let mut e = Expected {
        distinct: HashSet::new(),
        debit_units: 0,
        per_account_units: HashMap::new(),
        malformed: 0,
        duplicates: 0,
    };
    for m in messages {
        match &m.kind {
            Kind::Valid(ev) => {
                assert!(e.distinct.insert(ev.event_id.clone()), "generator ids are unique");
                let cost = catalog.price(ev).cost_units;
                e.debit_units += cost;
                if cost > 0 {
                    *e.per_account_units.entry(ev.account_id.clone()).or_default() += cost;
                }
            }
            Kind::Duplicate(_) => e.duplicates += 1,
            Kind::Malformed(_) => e.malformed += 1,
        }
    }
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_flow_exactly_once_across_restarts() {
    let env = TestEnv::new(6).await;
    let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");
    let mut generator = Generator::new(SimulateOptions {
        seed: 7,
        duplicate_share: 0.03,
        malformed_share: 0.01,
        ..SimulateOptions::default()
    });
    let messages: Vec<_> = (0..MESSAGES).map(|_| generator.next_message()).collect();
    let want = expected(&messages, &catalog);
    assert!(want.debit_units > 0 && want.malformed > 500 && want.duplicates > 2_000);

    // Half the traffic, then a run that is stopped gracefully part-way.
    let (first, second) = messages.split_at(MESSAGES / 2);
    produce(&env.topic, first).await;
    let mut run = env.spawn_run(CATALOG, 0, &["--batch-events-max", "2000"]);
    let applied = "SELECT count(*) FROM processed_events";
    env.wait_for("a first part to be applied", Duration::from_secs(300), || async {
        env.count(applied).await > 10_000
    })
    .await;
    terminate(&mut run);
    let after_stop = env.count(applied).await;
    assert!((after_stop as usize) < want.distinct.len(), "stopped mid-stream");

    // Restart; produce the rest while it runs; kill -9 it mid-stream; restart again.
    let mut run = env.spawn_run(CATALOG, 0, &["--batch-events-max", "2000"]);
    produce(&env.topic, second).await;
    env.wait_for("more progress", Duration::from_secs(300), || async {
        env.count(applied).await > after_stop + 20_000
    })
    .await;
    kill9(&mut run);
    let mut run = env.spawn_run(CATALOG, 0, &["--batch-events-max", "2000"]);
    let distinct = want.distinct.len() as i64;
    env.wait_for("every event and dead letter", Duration::from_secs(600), || async {
        env.count(applied).await == distinct
            && env.count("SELECT count(*) FROM dead_letters").await == want.malformed as i64
    })
    .await;
    // Everything is in; give the runner a moment to (not) do anything more, then stop it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    terminate(&mut run);

    assert_ledger(&env, &want).await;
    assert_clickhouse(&env, &want).await;
    assert_dead_letters(&env, &want);
    let report = tally::ledger::verify(&env.pool).await.expect("ledger verify passes");
    assert_eq!(report.total_units, -want.debit_units);
}

async fn assert_ledger(env: &TestEnv, want: &Expected) {
    let (debits,): (i64,) = sqlx::query_as(
        "SELECT COALESCE(-sum(amount_units), 0)::bigint FROM ledger_entries WHERE kind = 'consume'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(debits, want.debit_units, "ledger debits equal independently computed prices");
    let per_account: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, -balance_units FROM account_balances WHERE balance_units <> 0")
            .fetch_all(&env.pool)
            .await
            .unwrap();
    let per_account: HashMap<String, i64> = per_account.into_iter().collect();
    assert_eq!(per_account, want.per_account_units, "every account's balance is exact");
    let entries = env.count("SELECT count(DISTINCT event_id) - count(*) FROM ledger_entries").await;
    assert_eq!(entries, 0, "one debit per event id");
    let ids = env.count("SELECT count(*) FROM processed_events").await;
    assert_eq!(ids as usize, want.distinct.len());
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ChCounts {
    rows: u64,
    ids: u64,
    cost_units: i64,
}

async fn assert_clickhouse(env: &TestEnv, want: &Expected) {
    let c: ChCounts = env
        .clickhouse()
        .query(
            "SELECT count() AS rows, uniqExact(event_id) AS ids, toInt64(sum(cost_units)) AS cost_units
             FROM usage_log FINAL",
        )
        .fetch_one()
        .await
        .expect("clickhouse counts");
    assert_eq!(c.rows as usize, want.distinct.len(), "one row per distinct valid event");
    assert_eq!(c.ids as usize, want.distinct.len());
    assert_eq!(c.cost_units, want.debit_units, "usage log cost equals ledger debits");
}

fn assert_dead_letters(env: &TestEnv, want: &Expected) {
    let seen = env.read_dead_letters(want.malformed);
    assert_eq!(seen.len(), want.malformed, "exactly the malformed messages are dead-lettered");
    for (pos, (code, reason)) in &seen {
        assert!(!code.is_empty() && !reason.is_empty(), "dead letter {pos:?} carries a reason");
        assert_ne!(code, "idempotency_conflict", "the simulator never reuses an id with a new payload");
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct RawCount {
    rows: u64,
    ids: u64,
}

async fn raw_rows(env: &TestEnv) -> RawCount {
    env.clickhouse()
        .query("SELECT count() AS rows, uniqExact(event_id) AS ids FROM usage_log")
        .fetch_one()
        .await
        .expect("clickhouse count")
}

/// The worst crash point: after the ClickHouse insert, before the Postgres COMMIT. The
/// replay must not insert those rows again (checked without FINAL: no duplicate at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_between_clickhouse_insert_and_commit_leaves_no_duplicate_rows() {
    let env = TestEnv::new(3).await;
    let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");
    let mut generator = Generator::new(SimulateOptions {
        seed: 11,
        partitions: 3,
        duplicate_share: 0.0,
        malformed_share: 0.0,
        ..SimulateOptions::default()
    });
    let messages: Vec<_> = (0..6_000).map(|_| generator.next_message()).collect();
    let want = expected(&messages, &catalog);
    produce(&env.topic, &messages).await;

    // Merges would collapse duplicates behind our back (ReplacingMergeTree): stop them, so
    // a duplicate insert is visible to the count below.
    env.clickhouse().query("SYSTEM STOP MERGES usage_log").execute().await.expect("stop merges");
    let fault = [("TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT", "1")];
    let mut run = env.spawn_run_env(CATALOG, 0, &["--batch-events-max", "1000"], &fault);
    let status = wait_exit(&mut run, Duration::from_secs(120));
    assert!(!status.success(), "the fault hook aborts the process");
    let before = raw_rows(&env).await;
    assert!(before.rows > 0, "the aborted attempt reached ClickHouse");
    // Its event ids were claimed (a short transaction of their own), but no debit and
    // no consumer progress was committed.
    assert_eq!(env.count("SELECT count(*) FROM ledger_entries").await, 0, "no debit committed");
    assert_eq!(
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await,
        0,
        "no progress"
    );

    let mut run = env.spawn_run(CATALOG, 0, &["--batch-events-max", "1000"]);
    // Applied, not just claimed (a claim commits before its batch): every message is below
    // its partition's committed offset.
    env.wait_for("all events", Duration::from_secs(300), || async {
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await
            == messages.len() as i64
    })
    .await;
    terminate(&mut run);
    let after = raw_rows(&env).await;
    assert_eq!(after.ids as usize, want.distinct.len());
    assert_eq!(after.rows, after.ids, "no event has two rows, even before merges");
    assert_ledger(&env, &want).await;
}
