//! Dashboards, rollups and metrics against the real stack.
//!
//! * `rollups_count_every_event_once_across_a_crash`: the hourly and daily rollups (fed by
//!   materialized views) equal totals computed here from what was produced, and equal the
//!   same aggregation over `usage_log FINAL`, after `tally run` aborted between the
//!   ClickHouse insert and the Postgres COMMIT and was restarted (merges stopped, so no
//!   duplicate could hide). The one-time backfill (migrations 0003 / 0006) is checked too.
//! * `every_dashboard_panel_query_returns_data`: a simulated load through `tally run` on
//!   127.0.0.1:18082 (scraped by the stack's Prometheus); then every panel query of every
//!   dashboard runs: SQL against ClickHouse / Postgres (Grafana macros substituted), PromQL
//!   against Prometheus, each must return rows / series, PromQL also when restricted to this
//!   test's instance. The lag gauge is checked while the writer is held back and after.
//! * `dashboards_and_docker_files_pass_the_offline_checks`: `scripts/check-dashboards` (tsc
//!   against Grafana's published types, compose schema, compose vs `scripts/stack env`).

mod common;

use common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, SimulateOptions};

const CATALOG: &str = "examples/demo.toml";
/// The stack's Prometheus scrapes 127.0.0.1:18080-18082; 18082 is this test file's.
const SCRAPED_HTTP_PORT: u16 = 18082;
const DASHBOARDS: [&str; 3] = ["usage-and-revenue", "quotas-and-balances", "pipeline-health"];

fn prometheus_url() -> String {
    std::env::var("TALLY_PROMETHEUS_URL").unwrap_or_else(|_| "http://127.0.0.1:19090".into())
}

// ------------------------------------------------------------------------- rollups

/// Measure columns of usage_hourly / usage_daily, in migration order.
const MEASURES: [&str; 19] = [
    "events",
    "errors",
    "byok_events",
    "free_events",
    "input_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "output_tokens",
    "reasoning_tokens",
    "images",
    "video_seconds",
    "video_clips",
    "characters",
    "messages",
    "cost_units",
    "catalog_cost_units",
    "platform_upstream_cost_units",
    "byok_upstream_cost_units",
    "free_upstream_cost_units",
];
const KEYS: &str = "account_id, project_id, api_key_id, provider, model, modality";

/// (period start as Unix seconds, account, project, key, provider, model, modality).
type RollupKey = (u32, String, String, String, String, String, String);
type Rollup = BTreeMap<RollupKey, [i128; 19]>;

/// The rollup a period length gives, computed from the produced messages alone.
fn expected_rollup(messages: &[tally::simulate::Message], catalog: &Catalog, period_secs: i64) -> Rollup {
    let mut out = Rollup::new();
    for m in messages {
        let Kind::Valid(e) = &m.kind else { continue };
        let c = catalog.price(e);
        let ts = e.occurred_at.timestamp();
        let key = (
            u32::try_from(ts - ts.rem_euclid(period_secs)).expect("event time fits DateTime"),
            e.account_id.clone(),
            e.project_id.clone().unwrap_or_default(),
            e.api_key_id.clone().unwrap_or_default(),
            e.provider.clone(),
            e.model.clone(),
            e.modality.as_str().to_string(),
        );
        let byok = e.billing_mode.as_str() == "byok";
        let up = i128::from(c.upstream_cost_units);
        let n = &e.counts;
        let row: [i128; 19] = [
            1,
            i128::from(e.status.as_str() == "error"),
            i128::from(c.reason.as_str() == "byok"),
            i128::from(!c.charged),
            n.input_tokens.into(),
            n.cached_input_tokens.into(),
            n.cache_write_tokens.into(),
            n.output_tokens.into(),
            n.reasoning_tokens.into(),
            n.images.into(),
            n.video_seconds.into(),
            n.video_clips.into(),
            n.characters.into(),
            n.messages.into(),
            c.cost_units.into(),
            c.catalog_cost_units.into(),
            if byok { 0 } else { up },
            if byok { up } else { 0 },
            if c.charged { 0 } else { up },
        ];
        let slot = out.entry(key).or_insert([0; 19]);
        for (s, v) in slot.iter_mut().zip(row) {
            *s += v;
        }
    }
    out
}

/// `sum(...) GROUP BY` over a rollup-shaped source: a rollup table, or a SELECT (as a
/// subquery) producing the same columns. Never assumes merged rows.
fn rollup_query(period: &str, source: &str) -> String {
    let sums: Vec<String> = MEASURES.iter().map(|m| format!("sum({m}) AS m_{m}")).collect();
    format!(
        "SELECT toUInt32({period}) AS period, {KEYS}, {} FROM {source} GROUP BY period, {KEYS}",
        sums.join(", ")
    )
}

async fn read_rollup(db: &str, sql: &str) -> Rollup {
    let result = ch_json(db, sql).await.unwrap_or_else(|e| panic!("{e}\n{sql}"));
    let text = |row: &Value, k: &str| row[k].as_str().unwrap_or_else(|| panic!("{k} in {row}")).to_string();
    let int = |row: &Value, k: &str| -> i128 {
        // ClickHouse quotes 64-bit integers in JSON (exact), smaller ones are numbers.
        match &row[k] {
            Value::String(s) => s.parse().unwrap_or_else(|_| panic!("{k} = {s}")),
            v => v.as_i64().map(i128::from).unwrap_or_else(|| panic!("{k} = {v}")),
        }
    };
    let mut out = Rollup::new();
    for row in &result.data {
        let key = (
            u32::try_from(int(row, "period")).expect("u32 period"),
            text(row, "account_id"),
            text(row, "project_id"),
            text(row, "api_key_id"),
            text(row, "provider"),
            text(row, "model"),
            text(row, "modality"),
        );
        let mut values = [0i128; 19];
        for (v, m) in values.iter_mut().zip(MEASURES) {
            *v = int(row, &format!("m_{m}"));
        }
        assert!(out.insert(key, values).is_none(), "GROUP BY gives one row per key");
    }
    out
}

/// The materialized view's own SELECT, run over `usage_log FINAL` (deduplicated rows).
fn view_select_over_final(migration: &str) -> String {
    let select = &migration[migration.find("SELECT").expect("a view has a SELECT")..];
    assert!(select.contains("FROM usage_log\n"), "view reads usage_log");
    format!("({})", select.replace("FROM usage_log\n", "FROM usage_log FINAL\n"))
}

/// Both rollups equal the expectation and the aggregation of `usage_log FINAL`.
async fn assert_rollups(db: &str, hourly: &Rollup, daily: &Rollup) -> (usize, usize) {
    let hourly_view = view_select_over_final(include_str!("../schemas/clickhouse/0004_usage_hourly_mv.sql"));
    let got_hourly = read_rollup(db, &rollup_query("hour", "usage_hourly")).await;
    let got_daily = read_rollup(db, &rollup_query("toDateTime(day, 'UTC')", "usage_daily")).await;
    let final_hourly = read_rollup(db, &rollup_query("hour", &hourly_view)).await;
    assert_eq!(final_hourly, *hourly, "usage_log FINAL holds exactly the produced events");
    assert_rollup_eq("usage_hourly", &got_hourly, hourly);
    assert_rollup_eq("usage_daily", &got_daily, daily);
    (got_hourly.len(), got_daily.len())
}

fn assert_rollup_eq(table: &str, got: &Rollup, want: &Rollup) {
    for (key, w) in want {
        let g = got.get(key).unwrap_or_else(|| panic!("{table}: no row for {key:?}"));
        for ((m, gv), wv) in MEASURES.iter().zip(g).zip(w) {
            assert_eq!(gv, wv, "{table} {key:?}: {m}");
        }
    }
    assert_eq!(got.len(), want.len(), "{table}: no rows beyond the produced events");
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct RawCount {
    rows: u64,
    ids: u64,
}

async fn raw_usage_rows(env: &TestEnv) -> RawCount {
    env.clickhouse()
        .query("SELECT count() AS rows, uniqExact(event_id) AS ids FROM usage_log")
        .fetch_one()
        .await
        .expect("usage_log count")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_count_every_event_once_across_a_crash() {
    // No duplicate messages: the writer's guarantee of one usage_log insert per event
    // covers replays of the same offsets (see the next test for duplicates).
    let env = crash_and_restart(17, 0.0).await;
    assert_backfill(&env.env, &env.hourly, &env.daily).await;
}

/// A duplicate of an event on ANOTHER partition, applied first after the restart, must not
/// re-insert the crashed attempt's row (the writer checks every new event while any
/// partition's send watermark is ahead of its committed offset).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_count_every_event_once_across_a_crash_with_cross_partition_duplicates() {
    crash_and_restart(17, 0.03).await;
}

struct Crashed {
    env: TestEnv,
    hourly: Rollup,
    daily: Rollup,
}

/// Produce traffic, run `tally run` with the abort-after-ClickHouse-insert fault, restart
/// it, and check usage_log and both rollups against the produced traffic.
async fn crash_and_restart(seed: u64, duplicate_share: f64) -> Crashed {
    let env = TestEnv::new(3).await;
    let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");
    let mut generator = Generator::new(SimulateOptions {
        seed,
        partitions: 3,
        duplicate_share,
        malformed_share: 0.01,
        spread_days: 40,
        ..SimulateOptions::default()
    });
    let messages: Vec<_> = (0..6_000).map(|_| generator.next_message()).collect();
    let distinct = messages.iter().filter(|m| matches!(m.kind, Kind::Valid(_))).count() as i64;
    let hourly = expected_rollup(&messages, &catalog, 3_600);
    let daily = expected_rollup(&messages, &catalog, 86_400);
    produce(&env.topic, &messages).await;

    // Stopped merges keep every inserted row visible: a replayed insert would show as an
    // extra usage_log row and as doubled rollup sums (SummingMergeTree would add it anyway).
    // usage_daily is a view over usage_hourly: nothing of its own to merge.
    for table in ["usage_log", "usage_hourly"] {
        env.clickhouse().query(&format!("SYSTEM STOP MERGES {table}")).execute().await.expect("stop merges");
    }
    let fault = [("TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT", "1")];
    let mut run = env.spawn_run_env(CATALOG, 0, &["--batch-events-max", "1000"], &fault);
    assert!(!wait_exit(&mut run, Duration::from_secs(120)).success(), "the fault hook aborts the process");
    let crashed = raw_usage_rows(&env).await;
    let rolled = ch_one_u64(&env.ch_database, "SELECT sum(events) AS n FROM usage_hourly").await;
    assert!(crashed.rows > 0 && rolled == crashed.rows, "the aborted batch reached usage_log and the rollup");
    // Its event ids were claimed (a short transaction of their own), but no debit and
    // no consumer progress was committed.
    assert_eq!(env.count("SELECT count(*) FROM ledger_entries").await, 0, "no debit committed");
    assert_eq!(
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await,
        0,
        "no progress"
    );

    let mut run = env.spawn_run(CATALOG, 0, &["--batch-events-max", "1000"]);
    // Wait for applied offsets, not claims: a claim commits before its batch, so counting
    // claims could stop the run between the two (as tests/pipeline.rs learned).
    let total = messages.len() as i64;
    env.wait_for("all messages applied", Duration::from_secs(300), || async {
        env.count("SELECT COALESCE(sum(next_offset), 0)::bigint FROM consumer_offsets").await == total
    })
    .await;
    assert_eq!(env.count("SELECT count(*) FROM processed_events").await, distinct, "every event claimed");
    terminate(&mut run);
    let after = raw_usage_rows(&env).await;
    assert_eq!((after.rows, after.ids), (distinct as u64, distinct as u64), "one usage row per event");
    let (hours, days) = assert_rollups(&env.ch_database, &hourly, &daily).await;
    println!(
        "rollups after crash + restart: {distinct} events, {} rows inserted before the crash, \
         {hours} hourly and {days} daily keys equal expected and usage_log FINAL",
        crashed.rows
    );
    Crashed { env, hourly, daily }
}

/// A database whose usage_log predates the rollups: migrating it fills them once (from
/// `usage_log FINAL`), and migrating again (every `tally run` start) adds nothing.
async fn assert_backfill(env: &TestEnv, hourly: &Rollup, daily: &Rollup) {
    let old = format!("{}_old", env.ch_database);
    ch_exec("", &format!("CREATE DATABASE {old}")).await;
    ch_exec(&old, include_str!("../schemas/clickhouse/0001_usage_log.sql")).await;
    // The old table has the first version's columns only (later ones are added by migrate).
    let names = ch_json(
        &old,
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = 'usage_log'",
    )
    .await
    .expect("old columns");
    let columns: Vec<&str> = names.data.iter().map(|r| r["name"].as_str().unwrap()).collect();
    let columns = columns.join(", ");
    let copy =
        format!("INSERT INTO usage_log ({columns}) SELECT {columns} FROM {}.usage_log", env.ch_database);
    ch_exec(&old, &copy).await;
    // A duplicate row, as a ReplacingMergeTree may hold before merging: FINAL collapses it.
    ch_exec(&old, &format!("{copy} LIMIT 50")).await;
    for _ in 0..2 {
        tally::analytics::migrate(&CH_URL, &old).await.expect("migrate an old database");
        assert_rollups(&old, hourly, daily).await;
    }
    let added = ch_one_u64(
        &old,
        "SELECT count() FROM system.columns WHERE database = currentDatabase() AND table = 'usage_log'
           AND name IN ('upstream_cost', 'catalog_version', 'price_entry')",
    )
    .await;
    assert_eq!(added, 3, "migrating an old usage_log adds the price columns");
    ch_exec("", &format!("DROP DATABASE {old}")).await;
}

// ------------------------------------------------------------------------- ClickHouse HTTP

struct ChResult {
    meta: Vec<(String, String)>,
    data: Vec<Value>,
}

/// Run `sql` with `db` as the current database (no database name in the SQL), JSON out.
async fn ch_json(db: &str, sql: &str) -> Result<ChResult, String> {
    let response = reqwest::Client::new()
        .post(*CH_URL)
        .query(&[("database", db)])
        .body(format!("{sql}\nFORMAT JSON"))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response.text().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("ClickHouse {status}: {body}"));
    }
    let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
    let meta = v["meta"]
        .as_array()
        .expect("meta")
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c["type"].as_str().unwrap().to_string()))
        .collect();
    Ok(ChResult { meta, data: v["data"].as_array().expect("data").clone() })
}

async fn ch_exec(db: &str, sql: &str) {
    let mut request = reqwest::Client::new().post(*CH_URL).body(sql.to_string());
    if !db.is_empty() {
        request = request.query(&[("database", db)]);
    }
    let response = request.send().await.expect("clickhouse reachable");
    let status = response.status();
    assert!(status.is_success(), "{sql}: {}", response.text().await.unwrap_or_default());
}

async fn ch_one_u64(db: &str, sql: &str) -> u64 {
    let r = ch_json(db, sql).await.expect(sql);
    let v = &r.data[0][&r.meta[0].0];
    v.as_str().and_then(|s| s.parse().ok()).or_else(|| v.as_u64()).expect("a number")
}

// ------------------------------------------------------------------------- macros

/// The time range the tests give every panel (the load spans 40 days).
struct TimeRange {
    from: chrono::DateTime<chrono::Utc>,
    to: chrono::DateTime<chrono::Utc>,
}

impl TimeRange {
    fn around_now() -> TimeRange {
        let now = chrono::Utc::now();
        TimeRange { from: now - chrono::Duration::days(45), to: now + chrono::Duration::hours(1) }
    }
}

/// Replace `name(arg)` everywhere in `sql` with `f(arg)`.
fn replace_calls(sql: &str, name: &str, f: impl Fn(&str) -> String) -> String {
    let mut out = String::new();
    let mut rest = sql;
    while let Some(at) = rest.find(&format!("{name}(")) {
        let open = at + name.len() + 1;
        let close = open + rest[open..].find(')').expect("macro call closes");
        out.push_str(&rest[..at]);
        out.push_str(&f(rest[open..close].trim()));
        rest = &rest[close + 1..];
    }
    out + rest
}

/// grafana-clickhouse-datasource's macros, expanded as its pkg/macros does. The dashboards
/// use only these (dashboards/README.md); anything else left over fails the test.
fn expand_clickhouse(sql: &str, r: &TimeRange, interval_secs: u32) -> String {
    let (from, to) = (r.from.timestamp(), r.to.timestamp());
    let (from_day, to_day) = (r.from.format("%Y-%m-%d"), r.to.format("%Y-%m-%d"));
    let s = replace_calls(sql, "$__timeFilter", |c| {
        format!("{c} >= toDateTime({from}) AND {c} <= toDateTime({to})")
    });
    let s = replace_calls(&s, "$__dateFilter", |c| {
        format!("{c} >= toDate('{from_day}') AND {c} <= toDate('{to_day}')")
    });
    let s = s
        .replace("$__fromTime", &format!("toDateTime({from})"))
        .replace("$__toTime", &format!("toDateTime({to})"))
        .replace("$__interval_s", &interval_secs.to_string());
    assert!(!s.contains('$'), "a macro the tests do not know:\n{s}");
    s
}

/// grafana-postgresql-datasource's `$__timeFilter` (the only macro the dashboards use).
fn expand_postgres(sql: &str, r: &TimeRange) -> String {
    let fmt = |t: &chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%dT%H:%M:%SZ").to_string();
    let s = replace_calls(sql, "$__timeFilter", |c| {
        format!("{c} BETWEEN '{}' AND '{}'", fmt(&r.from), fmt(&r.to))
    });
    assert!(!s.contains('$'), "a macro the tests do not know:\n{s}");
    s
}

fn expand_promql(expr: &str) -> String {
    let s = expr.replace("$__rate_interval", "1m");
    assert!(!s.contains('$'), "a macro the tests do not know: {s}");
    s
}

/// Add `instance="..."` to every selector of a tally metric (and `up`), so a query answers
/// for this test's `tally run` only, not for other instances the stack's Prometheus scrapes.
fn only_instance(expr: &str, instance: &str) -> String {
    let mut out = String::new();
    let chars: Vec<char> = expr.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if !(c.is_ascii_alphabetic() || c == '_')
            || (i > 0 && (chars[i - 1].is_ascii_alphanumeric() || chars[i - 1] == '_'))
        {
            out.push(c);
            i += 1;
            continue;
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let word: String = chars[start..i].iter().collect();
        out.push_str(&word);
        let is_metric = (word.starts_with("tally_") || word == "up") && chars.get(i) != Some(&'(');
        if is_metric {
            if chars.get(i) == Some(&'{') {
                out.push_str(&format!("{{instance=\"{instance}\","));
                i += 1;
            } else {
                out.push_str(&format!("{{instance=\"{instance}\"}}"));
            }
        }
    }
    out
}

// ------------------------------------------------------------------------- panels

struct Panel {
    dashboard: &'static str,
    title: String,
    panel_type: String,
    targets: Vec<Value>,
}

fn panels() -> Vec<Panel> {
    let mut out = Vec::new();
    for name in DASHBOARDS {
        let path = repo().join(format!("dashboards/grafana/{name}.json"));
        let d: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard file")).expect("json");
        for p in d["panels"].as_array().expect("panels") {
            out.push(Panel {
                dashboard: name,
                title: p["title"].as_str().expect("title").to_string(),
                panel_type: p["type"].as_str().expect("type").to_string(),
                targets: p["targets"].as_array().expect("targets").clone(),
            });
        }
    }
    out
}

/// Table names after FROM / JOIN (subqueries skipped).
fn tables_read(sql: &str) -> Vec<String> {
    let words: Vec<&str> = sql.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0].eq_ignore_ascii_case("FROM") || w[0].eq_ignore_ascii_case("JOIN"))
        .map(|w| w[1].trim_end_matches([')', ',']).to_string())
        .filter(|t| !t.starts_with('('))
        .collect()
}

#[test]
fn panel_sql_reads_rollups_and_ledger_tables_without_a_database_name() {
    let mut checked = 0;
    for p in panels() {
        for t in &p.targets {
            let Some(sql) = t["rawSql"].as_str() else { continue };
            let allowed: &[&str] = match t["datasource"]["uid"].as_str() {
                // Dashboards read the rollups, never the per-event log: they stay fast.
                Some("tally-clickhouse") => &["usage_hourly", "usage_daily"],
                Some("tally-postgres") => &["account_balances", "ledger_entries", "burn"],
                other => panic!("{}: unknown SQL datasource {other:?}", p.title),
            };
            for table in tables_read(sql) {
                assert!(allowed.contains(&table.as_str()), "{} / {}: reads {table}", p.dashboard, p.title);
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "found the SQL panels ({checked})");
}

#[test]
fn instance_restriction_rewrites_every_selector() {
    let i = "127.0.0.1:18082";
    assert_eq!(
        only_instance("sum by (le) (rate(tally_x_bucket[1m])) / max(tally_y{a=\"b\"})", i),
        format!(
            "sum by (le) (rate(tally_x_bucket{{instance=\"{i}\"}}[1m])) / max(tally_y{{instance=\"{i}\",a=\"b\"}})"
        )
    );
    assert_eq!(
        only_instance("sum(up{job=\"tally\"})", i),
        format!("sum(up{{instance=\"{i}\",job=\"tally\"}})")
    );
    assert_eq!(
        only_instance("time() - max(tally_t)", i),
        format!("time() - max(tally_t{{instance=\"{i}\"}})")
    );
}

// ------------------------------------------------------------------------- Prometheus

/// Instant query: the result vector (or scalar, as a one-element list).
async fn prom_query(expr: &str) -> Result<Vec<Value>, String> {
    let response = reqwest::Client::new()
        .get(format!("{}/api/v1/query", prometheus_url()))
        .query(&[("query", expr)])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let v: Value = response.json().await.map_err(|e| e.to_string())?;
    if v["status"] != "success" {
        return Err(format!("{expr}: {v}"));
    }
    match v["data"]["resultType"].as_str() {
        Some("vector") | Some("matrix") => Ok(v["data"]["result"].as_array().cloned().unwrap_or_default()),
        Some("scalar") => Ok(vec![v["data"]["result"].clone()]),
        other => Err(format!("{expr}: result type {other:?}")),
    }
}

/// Sum of the values of an instant vector (None while it is empty).
async fn prom_sum(expr: &str) -> Option<f64> {
    let series = prom_query(expr).await.ok()?;
    if series.is_empty() {
        return None;
    }
    Some(
        series
            .iter()
            .map(|s| s["value"][1].as_str().unwrap_or("NaN").parse::<f64>().unwrap_or(f64::NAN))
            .sum(),
    )
}

// ------------------------------------------------------------------------- the load

/// Poll until `probe` gives a value, or panic after `limit` (a liveness bound).
async fn wait_for_value<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = std::time::Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_query_returns_data() {
    let env = TestEnv::new(6).await;
    let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");
    let mut generator =
        Generator::new(SimulateOptions { seed: 23, spread_days: 40, ..SimulateOptions::default() });
    let messages: Vec<_> = (0..20_000).map(|_| generator.next_message()).collect();
    let valid: Vec<_> =
        messages.iter().filter_map(|m| if let Kind::Valid(e) = &m.kind { Some(e) } else { None }).collect();
    let malformed = messages.iter().filter(|m| matches!(m.kind, Kind::Malformed(_))).count() as i64;
    let revenue_units: i64 = valid.iter().map(|e| catalog.price(e).cost_units).sum();

    let mut run = env.spawn_run(CATALOG, SCRAPED_HTTP_PORT, &["--batch-events-max", "2000"]);
    let base = format!("http://127.0.0.1:{SCRAPED_HTTP_PORT}");
    env.wait_for("tally run's HTTP API", Duration::from_secs(60), || async {
        reqwest::get(format!("{base}/healthz")).await.is_ok_and(|r| r.status().is_success())
    })
    .await;
    let instance = format!("127.0.0.1:{SCRAPED_HTTP_PORT}");
    let lag = format!("sum(tally_consumer_lag_messages{{instance=\"{instance}\",topic=\"{}\"}})", env.topic);

    // Hold the writer back (its first batch waits on this lock), so lag must build up.
    let mut blocker = env.pool.begin().await.expect("tx");
    sqlx::query("LOCK TABLE processed_events IN EXCLUSIVE MODE").execute(&mut *blocker).await.expect("lock");
    produce(&env.topic, &messages).await;
    let backlog = wait_for_value("lag to show the held-back backlog", Duration::from_secs(90), || async {
        prom_sum(&lag).await.filter(|v| *v > 0.0)
    })
    .await;
    assert!(backlog <= messages.len() as f64, "lag {backlog} counts produced messages only");
    blocker.commit().await.expect("release the writer");

    let distinct = valid.len() as i64;
    env.wait_for("every event and dead letter", Duration::from_secs(300), || async {
        env.count("SELECT count(*) FROM processed_events").await == distinct
            && env.count("SELECT count(*) FROM dead_letters").await == malformed
    })
    .await;
    env.wait_for("lag back to 0", Duration::from_secs(60), || async { prom_sum(&lag).await == Some(0.0) })
        .await;
    println!(
        "consumer lag: {backlog} messages while the writer was held back (of {}), then 0",
        messages.len()
    );
    for path in ["/healthz", "/v1/accounts/acct-0001/balance", "/v1/accounts/nobody/balance"] {
        let _ = reqwest::get(format!("{base}{path}")).await.expect("http");
    }
    // Prometheus has scraped the final state (and the requests above) once this matches.
    let applied = format!("sum(tally_events_applied_total{{instance=\"{instance}\"}})");
    env.wait_for("Prometheus to scrape the final counters", Duration::from_secs(60), || async {
        prom_sum(&applied).await == Some(distinct as f64)
    })
    .await;
    tokio::time::sleep(Duration::from_secs(5)).await;

    let range = TimeRange::around_now();
    let mut tested = 0;
    for p in panels() {
        for t in &p.targets {
            match t["datasource"]["uid"].as_str() {
                Some("tally-clickhouse") => {
                    check_clickhouse_target(&env, &p, t, &range, revenue_units, distinct).await
                }
                Some("tally-postgres") => check_postgres_target(&env, &p, t, &range).await,
                Some("tally-prometheus") => check_prometheus_target(&p, t, &instance).await,
                other => panic!("{} / {}: unknown datasource {other:?}", p.dashboard, p.title),
            }
            tested += 1;
        }
    }
    println!("{tested} panel queries returned data");
    terminate(&mut run);
}

async fn check_clickhouse_target(
    env: &TestEnv,
    p: &Panel,
    t: &Value,
    r: &TimeRange,
    revenue: i64,
    calls: i64,
) {
    let raw = t["rawSql"].as_str().expect("rawSql");
    let timeseries = t["queryType"] == "timeseries";
    // Hourly buckets and, for long ranges, daily ones ($__interval_s as Grafana rounds it).
    for interval in [3_600, 86_400] {
        let sql = expand_clickhouse(raw, r, interval);
        let result = ch_json(&env.ch_database, &sql)
            .await
            .unwrap_or_else(|e| panic!("{} / {}: {e}", p.dashboard, p.title));
        assert!(!result.data.is_empty(), "{} / {}: no rows\n{sql}", p.dashboard, p.title);
        if timeseries {
            let (name, ty) = &result.meta[0];
            assert!(name == "time" && ty.starts_with("DateTime"), "{}: first column {name} {ty}", p.title);
        }
        println!(
            "clickhouse  {:>5} rows  {} / {} ({}s buckets)",
            result.data.len(),
            p.dashboard,
            p.title,
            interval
        );
        if p.title == "Revenue" {
            let got = result.data[0]["revenue"].as_f64().expect("revenue");
            assert!((got * 1e8 - revenue as f64).abs() < 1.0, "revenue {got} vs {revenue} units");
        }
        if p.title == "Calls and error rate" {
            assert_eq!(result.data[0]["calls"], Value::String(calls.to_string()), "calls");
        }
        if !raw.contains("$__interval_s") {
            break;
        }
    }
}

async fn check_postgres_target(env: &TestEnv, p: &Panel, t: &Value, r: &TimeRange) {
    let sql = expand_postgres(t["rawSql"].as_str().expect("rawSql"), r);
    let rows: Vec<String> = sqlx::query_scalar(&format!("SELECT row_to_json(q)::text FROM ({sql}) q"))
        .fetch_all(&env.pool)
        .await
        .unwrap_or_else(|e| panic!("{} / {}: {e}\n{sql}", p.dashboard, p.title));
    assert!(!rows.is_empty(), "{} / {}: no rows\n{sql}", p.dashboard, p.title);
    if t["format"] == "time_series" {
        let first: Value = serde_json::from_str(&rows[0]).expect("json row");
        assert!(first.get("time").is_some(), "{}: a time series needs a time column", p.title);
    }
    println!("postgres    {:>5} rows  {} / {} ({})", rows.len(), p.dashboard, p.title, p.panel_type);
}

async fn check_prometheus_target(p: &Panel, t: &Value, instance: &str) {
    let expr = expand_promql(t["expr"].as_str().expect("expr"));
    let all = prom_query(&expr).await.unwrap_or_else(|e| panic!("{} / {}: {e}", p.dashboard, p.title));
    assert!(!all.is_empty(), "{} / {}: no series for {expr}", p.dashboard, p.title);
    let mine_expr = only_instance(&expr, instance);
    let mine = prom_query(&mine_expr).await.unwrap_or_else(|e| panic!("{} / {}: {e}", p.dashboard, p.title));
    assert!(
        !mine.is_empty(),
        "{} / {}: no series from this test's tally run: {mine_expr}",
        p.dashboard,
        p.title
    );
    println!("prometheus  {:>5} series {} / {}: {expr}", mine.len(), p.dashboard, p.title);
}

// ------------------------------------------------------------------------- offline checks

#[test]
fn dashboards_and_docker_files_pass_the_offline_checks() {
    let out = Command::new(repo().join("scripts/check-dashboards"))
        .output()
        .expect("scripts/check-dashboards runs");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{text}");
    assert!(out.status.success(), "scripts/check-dashboards failed:\n{text}");
    assert!(text.contains("tsc ok (3 dashboards)"), "every dashboard was type-checked");
}
