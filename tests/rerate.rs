//! `tally rerate` against the real stack: events go through `tally run` (broker, Postgres,
//! ClickHouse), then the binary re-prices them under a changed catalog. Expected amounts
//! are computed here, independently, by pricing what was produced with both catalogs.

mod common;

use common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, Message, SimulateOptions};

const CATALOG: &str = "examples/demo.toml";

/// The demo catalog with gpt-5's input rate set to `rate` (USD per 1M tokens).
fn gpt5_input_at(env: &TestEnv, rate: &str) -> PathBuf {
    let text = std::fs::read_to_string(repo().join(CATALOG)).expect("demo catalog");
    let at = text.find("id = \"gpt-5\"").expect("gpt-5 entry");
    let old = "input_per_1m_tokens = \"1.25\"";
    let rel = text[at..].find(old).expect("gpt-5 input rate");
    let mut changed = text.clone();
    changed.replace_range(at + rel..at + rel + old.len(), &format!("input_per_1m_tokens = \"{rate}\""));
    let path = std::env::temp_dir().join(format!("rerate-{}-{rate}.toml", env.id));
    std::fs::write(&path, changed).expect("write catalog");
    path
}

fn traffic(seed: u64, accounts: u32, n: usize) -> Vec<Message> {
    let mut g = Generator::new(SimulateOptions {
        seed,
        accounts,
        duplicate_share: 0.02,
        malformed_share: 0.0,
        spread_days: 40, // crosses at least one month boundary: several periods
        partitions: 3,
        ..SimulateOptions::default()
    });
    (0..n).map(|_| g.next_message()).collect()
}

/// Per account: what its events cost under `catalog`.
fn costs(messages: &[Message], catalog: &Catalog) -> HashMap<String, i64> {
    let mut out: HashMap<String, i64> = HashMap::new();
    for m in messages {
        if let Kind::Valid(e) = &m.kind {
            *out.entry(e.account_id.clone()).or_default() += catalog.price(e).cost_units;
        }
    }
    out
}

/// (events whose cost differs, old total, new total) between two catalogs.
fn changed(messages: &[Message], old: &Catalog, new: &Catalog, account: Option<&str>) -> (u64, i64, i64) {
    let mut t = (0u64, 0i64, 0i64);
    for m in messages {
        if let Kind::Valid(e) = &m.kind {
            if account.is_some_and(|a| a != e.account_id) {
                continue;
            }
            let (o, n) = (old.price(e).cost_units, new.price(e).cost_units);
            if o != n {
                t = (t.0 + 1, t.1 + o, t.2 + n);
            }
        }
    }
    t
}

fn range() -> (String, String) {
    let now = chrono::Utc::now();
    ((now - chrono::Duration::days(60)).to_rfc3339(), (now + chrono::Duration::days(1)).to_rfc3339())
}

/// The binary with this test's Postgres (and, unless `ledger verify`, ClickHouse).
fn tally(env: &TestEnv, args: &[&str], envs: &[(&str, &str)]) -> std::process::Output {
    let ch: &[&str] = if args[..2] == ["ledger", "verify"] {
        &[]
    } else {
        &["--clickhouse-url", *CH_URL, "--clickhouse-database", &env.ch_database]
    };
    Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(args)
        .args(["--database-url", &env.database_url])
        .args(ch)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied())
        .output()
        .expect("tally runs")
}

/// `tally rerate --json`; the report.
fn rerate(env: &TestEnv, catalog: &std::path::Path, extra: &[&str]) -> Value {
    let (from, to) = range();
    let mut args = vec!["rerate", "--catalog", catalog.to_str().unwrap(), "--from", &from, "--to", &to];
    args.extend_from_slice(&["--json", "--quiet"]);
    args.extend_from_slice(extra);
    let out = tally(env, &args, &[]);
    assert!(out.status.success(), "rerate failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("a JSON report")
}

fn totals(report: &Value) -> (u64, i64, i64) {
    let t = &report["total"];
    (
        t["events"].as_u64().unwrap(),
        t["old_cost_units"].as_i64().unwrap(),
        t["new_cost_units"].as_i64().unwrap(),
    )
}

async fn all_applied(env: &TestEnv, produced: usize) {
    env.wait_for("every message applied", Duration::from_secs(600), || async {
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await
            == produced as i64
    })
    .await;
}

/// Each account's usage debits plus re-rating corrections equal what its events cost
/// under `want`; the journal proves itself; the usage log agrees with the ledger.
async fn assert_billed_at(env: &TestEnv, want: &HashMap<String, i64>) {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, (-sum(amount_units))::bigint FROM ledger_entries
         WHERE kind IN ('consume', 'correction') GROUP BY account_id",
    )
    .fetch_all(&env.pool)
    .await
    .unwrap();
    let got: HashMap<String, i64> = rows.into_iter().collect();
    for (account, units) in want {
        assert_eq!(got.get(account).copied().unwrap_or(0), *units, "account {account}");
    }
    assert_eq!(got.values().sum::<i64>(), want.values().sum::<i64>());
    let verify = tally(env, &["ledger", "verify"], &[]);
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stderr));
    let reconcile = tally(env, &["ledger", "reconcile-usage"], &[]);
    assert!(
        reconcile.status.success(),
        "ledger and usage log differ: {}{}",
        String::from_utf8_lossy(&reconcile.stdout),
        String::from_utf8_lossy(&reconcile.stderr)
    );
    // The rollup dashboards read follows too, and no correction row was published twice.
    let ch = env.clickhouse();
    let hourly: i64 =
        ch.query("SELECT toInt64(sum(cost_units)) FROM usage_hourly").fetch_one().await.unwrap();
    assert_eq!(hourly, want.values().sum::<i64>(), "usage_hourly cost");
    let (rows, distinct): (u64, u64) = ch
        .query("SELECT count(), uniqExact(event_id, run_id) FROM usage_corrections")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(rows, distinct, "a correction row was inserted twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rerate_corrects_a_changed_price_exactly_once() {
    let env = TestEnv::new(3).await;
    let messages = traffic(15, 40, 100_000);
    produce(&env.topic, &messages).await;
    let mut run = env.spawn_run(CATALOG, 0, &[]);
    all_applied(&env, messages.len()).await;
    terminate(&mut run);

    let demo = Catalog::load(&repo().join(CATALOG)).unwrap();
    let (b_path, c_path) = (gpt5_input_at(&env, "2.50"), gpt5_input_at(&env, "0.625"));
    let (b, c) = (Catalog::load(&b_path).unwrap(), Catalog::load(&c_path).unwrap());
    let expected = changed(&messages, &demo, &b, None);
    assert!(expected.0 > 1_000, "the changed model has traffic: {expected:?}");
    let entries = env.count("SELECT count(*) FROM ledger_entries").await;

    // A dry run reports the difference and writes nothing.
    let dry = rerate(&env, &b_path, &["--dry-run"]);
    assert_eq!(totals(&dry), expected);
    assert!(dry["run_id"].is_null());
    assert_eq!(env.count("SELECT count(*) FROM ledger_entries").await, entries);
    assert_eq!(env.count("SELECT count(*) FROM rerate_runs").await, 0);
    assert_eq!(dry["top_models"][0][0], "gpt-5");
    let one = "acct-0007";
    let dry_one = rerate(&env, &b_path, &["--dry-run", "--account", one]);
    assert_eq!(totals(&dry_one), changed(&messages, &demo, &b, Some(one)));

    // The real run: one correction per account and month, the exact difference.
    let real =
        rerate(&env, &b_path, &["--by", "ops@example.com", "--reason", "gpt-5 input was under-priced"]);
    assert_eq!(totals(&real), expected);
    assert_eq!(real["pending_events"], 0);
    let corrections = env.count("SELECT count(*) FROM ledger_entries WHERE kind = 'correction'").await;
    assert_eq!(corrections, real["entries_posted"].as_i64().unwrap());
    assert_eq!(
        corrections,
        env.count("SELECT count(DISTINCT (account_id, period_from))::bigint FROM rerate_corrections").await,
        "one entry per account and period"
    );
    assert!(corrections > 40, "40 accounts over more than one month: {corrections}");
    assert_eq!(
        env.count(
            "SELECT COALESCE(sum(amount_units), 0)::bigint FROM ledger_entries WHERE kind = 'correction'"
        )
        .await,
        expected.1 - expected.2
    );
    let (by, reason, period_ok): (String, String, bool) = sqlx::query_as(
        "SELECT created_by, description,
                (metadata->>'period_from')::timestamptz = occurred_at
                AND metadata->>'catalog_version' = $1
         FROM ledger_entries WHERE kind = 'correction' LIMIT 1",
    )
    .bind(b.version())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (by.as_str(), reason.as_str(), period_ok),
        ("ops@example.com", "gpt-5 input was under-priced", true)
    );
    assert_billed_at(&env, &costs(&messages, &b)).await;

    // The same re-rate again changes nothing.
    let again = rerate(&env, &b_path, &["--by", "ops@example.com", "--reason", "again"]);
    assert_eq!(totals(&again), (0, 0, 0));
    assert_eq!(again["entries_posted"], 0);
    assert_eq!(env.count("SELECT count(*) FROM ledger_entries WHERE kind = 'correction'").await, corrections);

    // A second correction of the same range corrects only what remains.
    let second = rerate(&env, &c_path, &["--by", "ops@example.com", "--reason", "the real rate"]);
    let remaining = changed(&messages, &b, &c, None);
    assert_eq!(totals(&second), remaining);
    assert_billed_at(&env, &costs(&messages, &c)).await;
    // Every event knows which catalog priced it, in both stores.
    let (unversioned_pg,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM processed_events WHERE catalog_version IS DISTINCT FROM $1 OR price_entry IS NULL",
    )
    .bind(demo.version())
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(unversioned_pg, 0);
    let unversioned: u64 = env
        .clickhouse()
        .query("SELECT count() FROM usage_log WHERE catalog_version != ?")
        .bind(demo.version())
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(unversioned, 0);

    // The usage API shows the corrected cost too.
    let port = free_port();
    let mut api = env.spawn_run(CATALOG, port, &[]);
    let owner = tally::api::auth::NewToken {
        account_id: Some(one.into()),
        role: tally::api::auth::Role::Owner,
        name: "t".into(),
    };
    let token = tally::api::auth::create_token(&env.pool, &owner).await.unwrap().token;
    let http = reqwest::Client::new();
    let now = chrono::Utc::now();
    let secs = |t: chrono::DateTime<chrono::Utc>| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let url = format!(
        "http://127.0.0.1:{port}/v1/accounts/{one}/usage?from={}&to={}",
        secs(now - chrono::Duration::days(60)),
        secs(now + chrono::Duration::days(1))
    );
    // The child needs a moment to listen: retry a bounded number of times (a liveness
    // bound on attempts, not a timing assertion).
    let mut usage = Value::Null;
    for _ in 0..240 {
        if let Ok(r) = http.get(&url).bearer_auth(&token).send().await
            && r.status().is_success()
        {
            usage = r.json().await.unwrap();
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(!usage.is_null(), "the usage API never answered in 240 attempts");
    terminate(&mut api);
    assert_eq!(usage["totals"]["cost_units"].as_i64().unwrap(), costs(&messages, &c)[one]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_rerate_completes_without_double_corrections_while_ingesting() {
    let env = TestEnv::new(3).await;
    let first = traffic(16, 300, 20_000);
    produce(&env.topic, &first).await;
    let mut run = env.spawn_run(CATALOG, 0, &[]);
    all_applied(&env, first.len()).await;
    let new_path = gpt5_input_at(&env, "2.50");
    let new = Catalog::load(&new_path).unwrap();
    let (from, to) = range();
    let args = [
        "rerate",
        "--catalog",
        new_path.to_str().unwrap(),
        "--from",
        &from,
        "--to",
        &to,
        "--by",
        "ops",
        "--reason",
        "fix",
        "--quiet",
    ];

    // Killed right after its 5th correction committed, before publishing it.
    let crashed = tally(&env, &args, &[("TALLY_FAULT_RERATE_ABORT_AFTER_COMMITS", "5")]);
    assert!(!crashed.status.success(), "the fault hook aborts the process");
    assert_eq!(env.count("SELECT count(*) FROM rerate_corrections").await, 5);
    assert_eq!(env.count("SELECT count(*) FROM rerate_corrections WHERE published_at IS NULL").await, 1);

    // Restarted while more traffic of the same range arrives (priced by the old catalog).
    let second = traffic(17, 300, 5_000);
    let producing = {
        let topic = env.topic.clone();
        let second = second.clone();
        tokio::spawn(async move { produce(&topic, &second).await })
    };
    let resumed = tally(&env, &args, &[]);
    assert!(resumed.status.success(), "{}", String::from_utf8_lossy(&resumed.stderr));
    producing.await.unwrap();
    all_applied(&env, first.len() + second.len()).await;
    assert_eq!(env.count("SELECT count(*) FROM rerate_corrections WHERE published_at IS NULL").await, 0);
    // The events that arrived during or after it are corrected by the next run.
    let last = tally(&env, &args, &[]);
    assert!(last.status.success(), "{}", String::from_utf8_lossy(&last.stderr));
    terminate(&mut run);

    let all: Vec<Message> = first.iter().chain(second.iter()).cloned().collect();
    assert_billed_at(&env, &costs(&all, &new)).await;
    // No account-period of one run was corrected twice.
    assert_eq!(
        env.count("SELECT count(*) FROM (SELECT run_id, account_id, period_from FROM rerate_corrections GROUP BY 1, 2, 3 HAVING count(*) > 1) d").await,
        0
    );
    // Each event corrected at most once per run, and only as far as the new price.
    assert_eq!(
        env.count("SELECT count(*) FROM (SELECT event_id FROM usage_corrections GROUP BY event_id, run_id HAVING count(*) > 1) d").await,
        0
    );
}
