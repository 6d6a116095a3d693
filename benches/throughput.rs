//! The throughput bench (`scripts/bench`): prints, from one run on this machine, the raw
//! rates of the components Tally sits on and what `tally run` makes of them. It asserts
//! nothing about speed (the machine is shared and noisy): compare ratios within one run.
//!
//! 1. Preload `BENCH_MESSAGES` (default 1,000,000) simulated messages: `BENCH_ACCOUNTS`
//!    (2,000) accounts, event times over the last 72 h, 3% duplicates, 0.3% malformed.
//! 2. Raw component rates, same machine, same minute:
//!    - broker: a bare consumer group reading the whole topic;
//!    - Postgres, one connection: 1,000-row `INSERT .. ON CONFLICT DO NOTHING` per commit
//!      into a table shaped like the dedup store (and the same on two connections);
//!    - Postgres `COPY` (text) into the same shape;
//!    - ClickHouse: `RowBinary` insert of the usage-log rows.
//! 3. `tally run` draining the preloaded topic (one instance, then two in one group, each
//!    into a fresh database): messages/s from the first commit to the last, CPU seconds
//!    per 1,000 messages, peak RSS. With `BENCH_BASELINE_BIN=/path/to/tally` the same
//!    drain also runs with that binary first, for a before/after ratio in one run.
//!
//! 4. Once more with one instance, and meanwhile `POST /v1/authorize` at a fixed rate
//!    (`BENCH_AUTHORIZE_RPS`, default 10,000 req/s; 0 skips this run; open loop: latency counts from each
//!    request's scheduled time, so a stall is not hidden by the generator waiting): p50/p99.
//!    Then again with *holding* authorize (`"hold": true`, one Postgres transaction each,
//!    `BENCH_HOLD_RPS`, default 5,000 req/s; 0 skips): p50/p99.
//!
//! 5. Memory of the quota state: `BENCH_STATE_ACCOUNTS` (default 1,000,000) accounts, each
//!    with a balance and 3 counters x 4 hourly buckets, written straight into a fresh
//!    database; a `tally run` restores them at start: RSS once it answers.
//!
//! 6. Event to visible balance: one instance on a live topic, simulated traffic produced at
//!    half the one-instance drain rate for `BENCH_LATENCY_SECS` (30; 0 skips), and ten probes
//!    a second (a charged event for a new account): produce -> `GET /v1/accounts/{id}/balance`
//!    shows the debit (polled every 5 ms), p50/p99.
//!
//! Env: `BENCH_MESSAGES`, `BENCH_ACCOUNTS`, `BENCH_RAW_ROWS` (rows per raw Postgres /
//! ClickHouse figure, default 200,000), `BENCH_BASELINE_BIN`, `BENCH_INSTANCES`
//! (default "1,2"), `BENCH_GRANTS` (1, the default: one more drain, with every account
//! holding credit grants first: a promotion that burns first, then a larger grant).
//!
//! `cargo test --all-targets` (the test suite) also runs this binary, without `--bench`
//! and in the debug profile: it then runs a smoke-sized version (20,000 messages, 5,000
//! raw rows) so the bench itself stays tested without taking CI's time. Figures from that
//! run mean nothing.

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::analytics::UsageRow;
use tally::batch::{Item, SourcePos};
use tally::pipeline::reader::Transformer;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, SimulateOptions};

const CATALOG: &str = "examples/demo.toml";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let (messages_default, raw_default) = if measuring { (1_000_000, 200_000) } else { (20_000, 5_000) };
    let messages = env_usize("BENCH_MESSAGES", messages_default);
    let accounts = env_usize("BENCH_ACCOUNTS", 2_000) as u32;
    let raw_rows = env_usize("BENCH_RAW_ROWS", raw_default);
    let env = TestEnv::new(6).await;
    let mut generator = Generator::new(SimulateOptions {
        seed: 7,
        accounts,
        duplicate_share: 0.03,
        malformed_share: 0.003,
        spread_days: 3,
        ..SimulateOptions::default()
    });
    let all: Vec<_> = (0..messages).map(|_| generator.next_message()).collect();
    let distinct = all.iter().filter(|m| matches!(m.kind, Kind::Valid(_))).count() as i64;
    let malformed = all.iter().filter(|m| matches!(m.kind, Kind::Malformed(_))).count() as i64;
    let started = Instant::now();
    produce(&env.topic, &all).await;
    let produce_rate = messages as f64 / started.elapsed().as_secs_f64();
    println!(
        "throughput bench: {messages} messages ({distinct} distinct events, {malformed} malformed), \
         {accounts} accounts, event times over 72 h"
    );
    println!("  produce (acks=all)                        {produce_rate:>10.0} msg/s");

    let consume = bare_consume(&env, messages).await;
    println!("  raw: broker group consume                 {consume:>10.0} msg/s");
    let rows = priced_rows(&all, raw_rows);
    let pg1 = pg_insert_rate(&env, &rows, 1).await;
    println!("  raw: Postgres 1 conn, 1,000-row upserts   {pg1:>10.0} rows/s");
    let pg2 = pg_insert_rate(&env, &rows, 2).await;
    println!("  raw: Postgres 2 conns, 1,000-row upserts  {pg2:>10.0} rows/s");
    let copy = pg_copy_rate(&env, &rows).await;
    println!("  raw: Postgres COPY                        {copy:>10.0} rows/s");
    let ch = clickhouse_rate(&env, &rows).await;
    println!("  raw: ClickHouse RowBinary insert          {ch:>10.0} rows/s");

    let authorize_rps = env_usize("BENCH_AUTHORIZE_RPS", if measuring { 10_000 } else { 500 }) as u64;
    let hold_rps = env_usize("BENCH_HOLD_RPS", if measuring { 5_000 } else { 200 }) as u64;
    println!(
        "  (runs: baseline if BENCH_BASELINE_BIN, tally x{{BENCH_INSTANCES}}, then tally x1 with authorize, then with holding authorize, at a fixed rate)"
    );
    let target = Drain { env: &env, messages: messages as i64, distinct, malformed, accounts };
    let mut runs = Vec::new();
    if let Ok(baseline) = std::env::var("BENCH_BASELINE_BIN") {
        runs.push(("baseline", PathBuf::from(baseline), 1, Load::None));
    }
    let instances = std::env::var("BENCH_INSTANCES").unwrap_or_else(|_| "1,2".into());
    for n in instances.split(',').filter_map(|n| n.trim().parse::<usize>().ok()) {
        runs.push(("tally", PathBuf::from(env!("CARGO_BIN_EXE_tally")), n, Load::None));
    }
    if env_usize("BENCH_GRANTS", 1) == 1 {
        runs.push(("tally + credit grants", PathBuf::from(env!("CARGO_BIN_EXE_tally")), 1, Load::Grants));
    }
    if authorize_rps > 0 {
        runs.push((
            "tally + authorize load",
            PathBuf::from(env!("CARGO_BIN_EXE_tally")),
            1,
            Load::Authorize(authorize_rps),
        ));
    }
    if authorize_rps > 0 && env_usize("BENCH_FLOOR", 1) == 1 {
        runs.push((
            "tally + no-work requests",
            PathBuf::from(env!("CARGO_BIN_EXE_tally")),
            1,
            Load::Floor(authorize_rps),
        ));
    }
    if hold_rps > 0 {
        runs.push((
            "tally + holding authorize",
            PathBuf::from(env!("CARGO_BIN_EXE_tally")),
            1,
            Load::Hold(hold_rps),
        ));
    }
    let state_accounts = env_usize("BENCH_STATE_ACCOUNTS", if measuring { 1_000_000 } else { 1_000 });
    let mut one_instance = None;
    for (i, (label, bin, n, load)) in runs.iter().enumerate() {
        let r = target.run(bin, *n, i, *load).await;
        let name = format!("{label} run x{n}");
        println!(
            "  {name:<41} {:>10.0} msg/s  ({:.1} s; {:.2} CPU-s per 1,000 msg = {:.1} us/msg; peak RSS {} MB)",
            r.rate,
            r.seconds,
            r.cpu_seconds * 1000.0 / messages as f64,
            r.cpu_seconds * 1e6 / messages as f64,
            r.rss_peak_kb / 1024
        );
        println!("    ratio to Postgres 1-conn upsert rate    {:>10.3}", r.rate / pg1);
        if let (Some(a), Load::Authorize(rps) | Load::Hold(rps) | Load::Floor(rps)) = (&r.authorize, load) {
            let what = match load {
                Load::Hold(_) => "holding authorize",
                Load::Floor(_) => "no-work request (404)",
                _ => "authorize",
            };
            println!(
                "    {what} while draining: {:.0} req/s (target {rps}), p50 {} us, p99 {} us, max {} us, statuses {:?}",
                a.rps, a.p50_us, a.p99_us, a.max_us, a.statuses
            );
            if let Some(shares) = &a.server_side {
                let shares: Vec<String> =
                    shares.iter().map(|(le, f)| format!("{:.2}% within {le} s", f * 100.0)).collect();
                println!("    as the server timed them while draining: {}", shares.join(", "));
            }
            if let Some(i) = &r.authorize_idle {
                println!(
                    "    the same load once drained (baseline): {:.0} req/s, p50 {} us, p99 {} us, max {} us",
                    i.rps, i.p50_us, i.p99_us, i.max_us
                );
            }
            if let Some(c) = &r.commit_floor {
                println!(
                    "    one-row durable Postgres commit meanwhile ({:.0}/s, own connection): p50 {} us, p99 {} us, max {} us",
                    c.rps, c.p50_us, c.p99_us, c.max_us
                );
            }
            if let Some((count, calls, ms)) = a.hold_batches {
                println!(
                    "    holds group-committed: {count:.0} transactions, {calls:.1} calls and {ms:.1} ms per transaction"
                );
            }
        }
        if *label == "tally" && *n == 1 {
            one_instance = Some(r.rate);
        } else if let (Some(one), "tally") = (one_instance, *label) {
            println!("    ratio to 1 instance                     {:>10.3}", r.rate / one);
        }
    }
    let latency_secs = env_usize("BENCH_LATENCY_SECS", if measuring { 30 } else { 3 }) as u64;
    if let (Some(one), true) = (one_instance, latency_secs > 0) {
        let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");
        // Half the short drain's rate unless `BENCH_LATENCY_RATE` names another (the drain
        // meets no fold, vacuum or merge: over minutes this box sustains less, see README).
        let (rate, what) = match env_usize("BENCH_LATENCY_RATE", 0) {
            0 => (one / 2.0, "half the x1 rate"),
            r => (r as f64, "BENCH_LATENCY_RATE"),
        };
        let v = visible_latency(&env, &catalog, rate, latency_secs).await;
        println!(
            "  event -> visible balance at {what} ({:.0} msg/s produced for {latency_secs} s): \
             p50 {} ms, p99 {} ms, max {} ms over {} probes ({} not visible within 30 s)",
            v.background_rate, v.p50_ms, v.p99_ms, v.max_ms, v.probes, v.missed
        );
        println!(
            "    of which the probe's own produce: p50 {} ms, p99 {} ms; most messages produced but not yet applied: {}",
            v.produce_p50_ms, v.produce_p99_ms, v.lag_max
        );
    }
    if state_accounts > 0 {
        let (rss_kb, restore_seconds) = state_memory(&env, state_accounts).await;
        println!(
            "  quota state: {state_accounts} accounts (each 3 counters x 4 hours), restored in {restore_seconds:.1} s: RSS {} MB",
            rss_kb / 1024
        );
    }
}

async fn bare_consume(env: &TestEnv, messages: usize) -> f64 {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", *BROKERS)
        .set("group.id", format!("bare-{}", env.id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[env.topic.as_str()]).expect("subscribe");
    let mut started = None;
    for _ in 0..messages {
        let m = consumer.recv().await.expect("recv");
        started.get_or_insert_with(Instant::now);
        std::hint::black_box(&m);
    }
    messages as f64 / started.expect("read at least one").elapsed().as_secs_f64()
}

/// Usage-log rows of the first `n` valid messages (cycled if there are fewer).
fn priced_rows(all: &[tally::simulate::Message], n: usize) -> Vec<UsageRow> {
    let t = Transformer {
        catalog: Arc::new(Catalog::load(&repo().join(CATALOG)).expect("catalog")),
        schemas: std::sync::Arc::new(tally::codec::Schemas::new(None)),
        future_skew: chrono::Duration::seconds(300),
        age_max: chrono::Duration::days(400),
        cost_units_max: tally::pipeline::reader::EVENT_COST_UNITS_MAX_DEFAULT,
    };
    let now = chrono::Utc::now();
    let valid: Vec<UsageRow> = all
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            match t.transform(SourcePos { partition: 0, offset: i as i64 }, None, &m.payload, now) {
                Item::Valid(v) => Some(UsageRow::from_item(&v, now)),
                Item::Dead(_) => None,
            }
        })
        .take(n)
        .collect();
    (0..n)
        .map(|i| {
            let mut r = valid[i % valid.len()].clone();
            r.event_id = format!("raw-{i}-{}", r.event_id);
            r
        })
        .collect()
}

const RAW_TABLE: &str = "CREATE TABLE IF NOT EXISTS bench_rows (
    event_id text PRIMARY KEY, payload_hash bytea NOT NULL, account_id text NOT NULL,
    cost_units bigint NOT NULL, occurred_at timestamptz NOT NULL)";

/// Batched idempotent inserts, 1,000 rows per transaction, on `connections` connections.
async fn pg_insert_rate(env: &TestEnv, rows: &[UsageRow], connections: usize) -> f64 {
    sqlx::query(RAW_TABLE).execute(&env.pool).await.expect("bench table");
    sqlx::query("TRUNCATE bench_rows").execute(&env.pool).await.expect("truncate");
    let started = Instant::now();
    let per = rows.len().div_ceil(connections);
    let tasks = rows.chunks(per).map(|part| {
        let pool = env.pool.clone();
        let part = part.to_vec();
        tokio::spawn(async move {
            let hash = vec![7u8; 32];
            for chunk in part.chunks(1_000) {
                let ids: Vec<&str> = chunk.iter().map(|r| r.event_id.as_str()).collect();
                let accounts: Vec<&str> = chunk.iter().map(|r| r.account_id.as_str()).collect();
                let costs: Vec<i64> = chunk.iter().map(|r| r.cost_units).collect();
                let times: Vec<i64> = chunk.iter().map(|r| i64::from(r.occurred_at)).collect();
                let hashes: Vec<&[u8]> = chunk.iter().map(|_| hash.as_slice()).collect();
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(
                    "INSERT INTO bench_rows SELECT e, h, a, c, to_timestamp(t)
                     FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::bigint[], $5::bigint[]) AS u(e, h, a, c, t)
                     ON CONFLICT DO NOTHING",
                )
                .bind(&ids)
                .bind(&hashes)
                .bind(&accounts)
                .bind(&costs)
                .bind(&times)
                .execute(&mut *tx)
                .await
                .expect("insert");
                tx.commit().await.expect("commit");
            }
        })
    });
    for t in tasks.collect::<Vec<_>>() {
        t.await.expect("insert task");
    }
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

async fn pg_copy_rate(env: &TestEnv, rows: &[UsageRow]) -> f64 {
    use std::fmt::Write;
    sqlx::query(RAW_TABLE).execute(&env.pool).await.expect("bench table");
    sqlx::query("TRUNCATE bench_rows").execute(&env.pool).await.expect("truncate");
    let hash = "07".repeat(32);
    let mut text = String::with_capacity(rows.len() * 160);
    for r in rows {
        let t = chrono::DateTime::from_timestamp(i64::from(r.occurred_at), 0).expect("time");
        writeln!(text, "{}\t\\\\x{hash}\t{}\t{}\t{}", r.event_id, r.account_id, r.cost_units, t.to_rfc3339())
            .expect("write");
    }
    let mut conn = env.pool.acquire().await.expect("connection");
    let started = Instant::now();
    let mut copy = conn.copy_in_raw("COPY bench_rows FROM STDIN").await.expect("copy");
    copy.send(text.as_bytes()).await.expect("copy send");
    let copied = copy.finish().await.expect("copy finish");
    assert_eq!(copied as usize, rows.len(), "every row copied");
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

async fn clickhouse_rate(env: &TestEnv, rows: &[UsageRow]) -> f64 {
    let ch = env.clickhouse();
    ch.query("CREATE TABLE IF NOT EXISTS bench_usage_log AS usage_log").execute().await.expect("table");
    let started = Instant::now();
    for chunk in rows.chunks(50_000) {
        let mut insert = ch.insert::<UsageRow>("bench_usage_log").await.expect("insert");
        for r in chunk {
            insert.write(r).await.expect("write");
        }
        insert.end().await.expect("end");
    }
    rows.len() as f64 / started.elapsed().as_secs_f64()
}

/// The preloaded topic, drained by `tally run` into a fresh database per run.
struct Drain<'a> {
    env: &'a TestEnv,
    messages: i64,
    distinct: i64,
    malformed: i64,
    accounts: u32,
}

/// Load on the API during a drain, at a fixed rate (requests per second).
#[derive(Clone, Copy)]
enum Load {
    None,
    /// `POST /v1/authorize` (answered from memory).
    Authorize(u64),
    /// No API load, but every account holds credit grants before the drain (a $1 promotion
    /// expiring in an hour, then $1,000 that never expires), so each debit burns grants
    /// in order and crosses from one to the next.
    Grants,
    /// `POST /v1/authorize` with `"hold": true`: one Postgres transaction each. Bring-your-own-
    /// key calls without a feature, so every hold is allowed and inserted (a refused one
    /// writes nothing and would flatter the figure); 30-second holds, so expiry runs too.
    Hold(u64),
    /// The floors under both: the same generator at the same rate against a route that does
    /// no work (the router's JSON 404), and a one-row durable Postgres commit 100 times a
    /// second on a connection of its own. What this box gives any request and any durable
    /// write while it ingests; authorize and holds cannot be faster.
    Floor(u64),
}

/// What the load generator calls.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Call {
    Authorize,
    Hold,
    /// An unrouted path with authorize's body: routing, the middleware, a JSON 404.
    NoWork,
}

/// How long the idle authorize baseline runs after a drain.
const IDLE_AUTHORIZE: Duration = Duration::from_secs(5);

struct DrainResult {
    rate: f64,
    seconds: f64,
    cpu_seconds: f64,
    rss_peak_kb: u64,
    authorize: Option<Latency>,
    /// The same load against the same instance once the drain is done: the generator's and
    /// the server's own latency, the baseline of the figure while draining.
    authorize_idle: Option<Latency>,
    /// [`Load::Floor`]: one-row durable commits during the drain.
    commit_floor: Option<Latency>,
}

struct Latency {
    rps: f64,
    p50_us: u128,
    p99_us: u128,
    max_us: u128,
    statuses: std::collections::BTreeMap<u16, usize>,
    /// Holding authorize's group commit, from the instance's `/metrics`: transactions,
    /// mean calls per transaction, mean transaction time in ms.
    hold_batches: Option<(f64, f64, f64)>,
    /// Plain authorize: (bucket upper bound in seconds, share of requests within it), as the
    /// server timed them.
    server_side: Option<Vec<(String, f64)>>,
}

/// (transactions, mean calls per transaction, mean ms per transaction) of holding
/// authorize's group commit, read from an instance's Prometheus text.
async fn hold_batches(base: &str) -> Option<(f64, f64, f64)> {
    let text = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
    let value = |name: &str| -> Option<f64> {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    };
    let count = value("tally_hold_batch_calls_count")?;
    let calls = value("tally_hold_batch_calls_sum")?;
    let seconds = value("tally_hold_batch_duration_seconds_sum")?;
    (count > 0.0).then(|| (count, calls / count, seconds * 1000.0 / count))
}

/// The share of `POST /v1/authorize` requests the server itself answered within 1 ms, 2.5 ms
/// and 5 ms (its own histogram, from routing to the response), read from an instance's
/// Prometheus text: what the client sees beyond that is scheduling and the generator.
async fn authorize_server_side(base: &str) -> Option<Vec<(String, f64)>> {
    let text = reqwest::get(format!("{base}/metrics")).await.ok()?.text().await.ok()?;
    let prefix = "tally_http_request_duration_seconds_bucket{route=\"/v1/authorize\",le=\"";
    let buckets: Vec<(String, f64)> = text
        .lines()
        .filter_map(|l| {
            let (le, count) = l.strip_prefix(prefix)?.split_once("\"} ")?;
            Some((le.to_string(), count.trim().parse().ok()?))
        })
        .collect();
    let total = buckets.iter().find(|(le, _)| le == "+Inf")?.1;
    (total > 0.0).then(|| {
        buckets
            .into_iter()
            .filter(|(le, _)| ["0.001", "0.0025", "0.005"].contains(&le.as_str()))
            .map(|(le, n)| (le, n / total))
            .collect()
    })
}

/// One-row durable commits (autocommit `INSERT`, so one round trip and a WAL flush) 100
/// times a second on a connection of its own until `stop`, each timed from when it was due:
/// the floor of any write that must be durable before its caller hears back.
async fn commit_latency(url: String, stop: tokio_util::sync::CancellationToken) -> Latency {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(&url).await.expect("probe connection");
    sqlx::query("CREATE TABLE IF NOT EXISTS bench_commit_probe (id BIGSERIAL PRIMARY KEY, at TIMESTAMPTZ NOT NULL DEFAULT now())")
        .execute(&mut conn)
        .await
        .expect("probe table");
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut all = Vec::new();
    let mut idle_since = Instant::now();
    loop {
        let due = tokio::select! {
            _ = stop.cancelled() => break,
            t = tick.tick() => t.into_std(),
        };
        // As in `authorize_at_rate`: the timer's own lateness is not the database's.
        let due = if idle_since <= due { Instant::now() } else { due };
        sqlx::query("INSERT INTO bench_commit_probe DEFAULT VALUES")
            .execute(&mut conn)
            .await
            .expect("probe commit");
        all.push(due.elapsed().as_micros());
        idle_since = Instant::now();
    }
    latency_of(all, started, Default::default())
}

/// Percentiles of latencies in microseconds gathered since `started`.
fn latency_of(
    mut all: Vec<u128>,
    started: Instant,
    statuses: std::collections::BTreeMap<u16, usize>,
) -> Latency {
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1))).copied().unwrap_or(0)
    };
    Latency {
        rps: all.len() as f64 / started.elapsed().as_secs_f64(),
        p50_us: pct(0.50),
        p99_us: pct(0.99),
        max_us: all.last().copied().unwrap_or(0),
        statuses,
        hold_batches: None,
        server_side: None,
    }
}

/// Open-loop load: `rps` requests per second over `connections` keep-alive connections
/// until `stop`; each request's latency counts from the moment it was due. Each connection
/// has one request in flight, so `connections` bounds the concurrency a gateway would offer.
async fn authorize_at_rate(
    base: String,
    token: String,
    rps: u64,
    call: Call,
    stop: tokio_util::sync::CancellationToken,
) -> Latency {
    let hold = call == Call::Hold;
    let path = if call == Call::NoWork { "/v1/no-such-route" } else { "/v1/authorize" };
    // Plain authorize answers from memory in well under a millisecond: 16 connections carry
    // 10,000 req/s. A hold waits for a Postgres commit (milliseconds while ingesting), so a
    // gateway at 5,000 holds/s has dozens in flight: 64 by default.
    let connections = if hold { env_usize("BENCH_HOLD_CONNECTIONS", 64) as u64 } else { 16 };
    const CONNECTIONS_MAX: u64 = 1024;
    assert!((1..=CONNECTIONS_MAX).contains(&connections), "BENCH_HOLD_CONNECTIONS within 1..=1024");
    let period = Duration::from_secs_f64(connections as f64 / rps.max(1) as f64);
    let started = Instant::now();
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let (base, token, stop) = (base.clone(), token.clone(), stop.clone());
            tokio::spawn(async move {
                let http = reqwest::Client::builder().pool_max_idle_per_host(1).build().expect("client");
                let mut tick = tokio::time::interval(period);
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                let (mut lat, mut statuses) = (Vec::new(), std::collections::BTreeMap::new());
                let mut idle_since = Instant::now();
                for i in 0u64.. {
                    let due = tokio::select! {
                        _ = stop.cancelled() => break,
                        t = tick.tick() => t,
                    };
                    // tokio's timer fires up to a millisecond after the tick is due. When the
                    // connection was idle by then, that lateness is the generator's: count from
                    // the firing. When the previous answer came after the due time, the server
                    // delayed this request: count from the due time (no coordinated omission).
                    let due = if idle_since <= due.into_std() { Instant::now() } else { due.into_std() };
                    let account = format!("acct-{:04}", (c * 131 + i) % 2000);
                    let body = if hold {
                        serde_json::json!({"account_id": account, "hold": true, "billing_mode": "byok",
                            "estimated_cost_usd": "0.01", "hold_ttl_secs": 30})
                    } else {
                        serde_json::json!({"account_id": account, "feature": "ad_generations",
                            "estimated_cost_usd": "0.01"})
                    };
                    let Ok(r) =
                        http.post(format!("{base}{path}")).bearer_auth(&token).json(&body).send().await
                    else {
                        *statuses.entry(0).or_insert(0) += 1;
                        continue;
                    };
                    *statuses.entry(r.status().as_u16()).or_insert(0) += 1;
                    let _ = r.bytes().await;
                    lat.push(due.elapsed().as_micros());
                    idle_since = Instant::now();
                }
                (lat, statuses)
            })
        })
        .collect();
    let (mut all, mut statuses) = (Vec::new(), std::collections::BTreeMap::new());
    for t in tasks {
        let (lat, st) = t.await.expect("load task");
        all.extend(lat);
        for (k, v) in st {
            *statuses.entry(k).or_insert(0) += v;
        }
    }
    latency_of(all, started, statuses)
}

impl Drain<'_> {
    async fn run(&self, bin: &Path, instances: usize, n: usize, load: Load) -> DrainResult {
        let (db, url) = fresh_database(&format!("{}_d{n}", self.env.ch_database)).await;
        if matches!(load, Load::Grants) {
            fund_with_grants(&url, self.accounts).await;
        }
        let group = format!("{}-d{n}", self.env.group);
        let ports: Vec<u16> = (0..instances).map(|_| free_port()).collect();
        let mut children: Vec<Child> = ports
            .iter()
            .map(|port| spawn_tally(bin, &url, &db, (&self.env.topic, &self.env.dlq_topic), &group, *port))
            .collect();
        // Wait for the schema, then for the first commit: the rate excludes start-up.
        let pool = connect_when_ready(&url).await;
        let consumed = |pool: sqlx::PgPool| async move {
            sqlx::query_as::<_, (Option<i64>,)>("SELECT sum(next_offset)::bigint FROM consumer_offsets")
                .fetch_one(&pool)
                .await
                .map(|r| r.0.unwrap_or(0))
                .unwrap_or(0)
        };
        let (first_at, first_count) = loop {
            let c = consumed(pool.clone()).await;
            if c > 0 {
                break (Instant::now(), c);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        // Authorize at a fixed rate while one instance of the current binary drains.
        let load_stop = tokio_util::sync::CancellationToken::new();
        let rate = match load {
            Load::None | Load::Grants => None,
            Load::Authorize(rps) => Some((rps, Call::Authorize)),
            Load::Hold(rps) => Some((rps, Call::Hold)),
            Load::Floor(rps) => Some((rps, Call::NoWork)),
        };
        let commits = matches!(load, Load::Floor(_))
            .then(|| tokio::spawn(commit_latency(url.clone(), load_stop.clone())));
        let load = rate.map(|(rps, call)| {
            let (pool, stop, base) =
                (pool.clone(), load_stop.clone(), format!("http://127.0.0.1:{}", ports[0]));
            tokio::spawn(async move {
                let token = platform_token(&pool, tally::api::auth::Role::Service).await;
                authorize_at_rate(base, token, rps, call, stop).await
            })
        });
        let mut rss_peak_kb = 0;
        loop {
            rss_peak_kb = rss_peak_kb.max(children.iter().map(|c| rss_kb(c.id())).sum());
            if consumed(pool.clone()).await >= self.messages {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = first_at.elapsed().as_secs_f64();
        load_stop.cancel();
        let mut authorize = match load {
            Some(l) => Some(l.await.expect("authorize load")),
            None => None,
        };
        let commit_floor = match commits {
            Some(c) => Some(c.await.expect("commit probe")),
            None => None,
        };
        if let (Some(a), Some((_, Call::Hold))) = (&mut authorize, rate) {
            a.hold_batches = hold_batches(&format!("http://127.0.0.1:{}", ports[0])).await;
        }
        if let (Some(a), Some((_, Call::Authorize))) = (&mut authorize, rate) {
            a.server_side = authorize_server_side(&format!("http://127.0.0.1:{}", ports[0])).await;
        }
        let authorize_idle = match rate {
            Some((rps, Call::Authorize)) => {
                let (stop, base) =
                    (tokio_util::sync::CancellationToken::new(), format!("http://127.0.0.1:{}", ports[0]));
                let token = platform_token(&pool, tally::api::auth::Role::Service).await;
                let load = tokio::spawn(authorize_at_rate(base, token, rps, Call::Authorize, stop.clone()));
                tokio::time::sleep(IDLE_AUTHORIZE).await;
                stop.cancel();
                Some(load.await.expect("idle authorize load"))
            }
            _ => None,
        };
        let cpu_seconds: f64 = children.iter().map(|c| cpu_seconds(c.id())).sum();
        let rss_peak_kb = rss_peak_kb.max(children.iter().map(|c| hwm_kb(c.id())).max().unwrap_or(0));
        let processed: (i64,) =
            sqlx::query_as("SELECT count(*) FROM processed_events").fetch_one(&pool).await.expect("count");
        let dead: (i64,) =
            sqlx::query_as("SELECT count(*) FROM dead_letters").fetch_one(&pool).await.expect("count");
        assert_eq!((processed.0, dead.0), (self.distinct, self.malformed), "every message accounted for");
        for c in &mut children {
            terminate(c);
        }
        pool.close().await;
        DrainResult {
            rate: (self.messages - first_count) as f64 / seconds,
            seconds,
            cpu_seconds,
            rss_peak_kb,
            authorize,
            authorize_idle,
            commit_floor,
        }
    }
}

/// Migrate the fresh database and give each simulated account two grants (see [`Load::Grants`]).
async fn fund_with_grants(url: &str, accounts: u32) {
    use tally::ledger::grants::{self, GrantPolicies, GrantRequest, GrantSource};
    let pool = tally::ledger::connect(url, 2).await.expect("connect");
    tally::ledger::migrate(&pool).await.expect("migrations");
    let expires = chrono::Utc::now() + chrono::Duration::hours(1);
    for a in 0..accounts {
        let account = format!("acct-{a:04}");
        for (key, usd, source, expires_at) in [
            ("promo", 1, GrantSource::Promotion, Some(expires)),
            ("base", 1_000, GrantSource::Operator, None),
        ] {
            let req = GrantRequest {
                account_id: account.clone(),
                idempotency_key: format!("{key}-{account}"),
                units: usd * tally::money::UNITS_PER_USD,
                source,
                priority: None,
                expires_at,
                expires_in_days: None,
                created_by: "bench".into(),
                reason: "bench".into(),
            };
            grants::grant(&pool, &GrantPolicies::default(), &req).await.expect("grant");
        }
    }
    pool.close().await;
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port()
}

/// A new Postgres database (the same name serves as the ClickHouse database): (name, url).
async fn fresh_database(name: &str) -> (String, String) {
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", *PG_SERVER_URL)).await.expect("admin");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.expect("create database");
    admin.close().await;
    (name.to_string(), format!("{}/{name}", *PG_SERVER_URL))
}

/// Connect once `tally run` has created the schema.
async fn connect_when_ready(url: &str) -> sqlx::PgPool {
    loop {
        if let Ok(p) = tally::ledger::connect(url, 2).await
            && sqlx::query("SELECT 1 FROM consumer_offsets LIMIT 1").execute(&p).await.is_ok()
        {
            return p;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A platform-wide token (no account scope) of `role`.
async fn platform_token(pool: &sqlx::PgPool, role: tally::api::auth::Role) -> String {
    let new = tally::api::auth::NewToken { account_id: None, role, name: "bench".into() };
    tally::api::auth::create_token(pool, &new).await.expect("token").token
}

fn spawn_tally(bin: &Path, url: &str, db: &str, (topic, dlq): (&str, &str), group: &str, port: u16) -> Child {
    Command::new(bin)
        .arg("run")
        .args(["--brokers", *BROKERS, "--database-url", url])
        .args(["--clickhouse-url", *CH_URL, "--clickhouse-database", db])
        .args(["--topic", topic, "--dlq-topic", dlq, "--group", group])
        .args(["--config", repo().join(CATALOG).to_str().expect("utf-8 path")])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn tally run")
}

/// Event to visible balance, p50/p99 over probes, with background traffic at `rate` msg/s.
struct Visibility {
    probes: usize,
    missed: usize,
    p50_ms: u128,
    p99_ms: u128,
    max_ms: u128,
    background_rate: f64,
    /// Where the time goes: the probe's own produce (until the broker acknowledged it),
    /// p50 and p99 in ms; and the most messages produced but not yet applied (committed in
    /// Postgres) seen while producing, sampled every 100 ms: a lag that grows means the
    /// instance does not keep up with the rate here, and latency is queueing.
    produce_p50_ms: u128,
    produce_p99_ms: u128,
    lag_max: i64,
}

/// Phase 6: one instance on a live topic; simulated traffic produced at `rate` msg/s for
/// `secs`, and 10 times a second a probe: a charged event for an account never seen
/// before. Its latency runs from just before the produce call to the first
/// `GET /v1/accounts/{id}/balance` (polled every 5 ms) that shows the debit.
async fn visible_latency(env: &TestEnv, catalog: &Catalog, rate: f64, secs: u64) -> Visibility {
    let id = &env.id;
    let (topic, dlq) = (format!("bench.{id}.live"), format!("bench.{id}.live-dlq"));
    tally::kafka::ensure_topics(&BROKERS, &[(&topic, 6), (&dlq, 3)]).await.expect("topics");
    let (db, url) = fresh_database(&format!("{}_live", env.ch_database)).await;
    let port = free_port();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_tally"));
    let mut child = spawn_tally(&bin, &url, &db, (&topic, &dlq), &format!("{}-live", env.group), port);
    let pool = connect_when_ready(&url).await;
    // Balances are read with each probe account's own owner token (the way a customer
    // reads theirs); the accounts exist with a zero balance before their probe is sent.
    let probes_max = secs as usize * 10 + 1;
    let mut tokens = Vec::with_capacity(probes_max);
    for i in 0..probes_max {
        let new = tally::api::auth::NewToken {
            account_id: Some(format!("probe-{id}-{i}")),
            role: tally::api::auth::Role::Owner,
            name: "bench".into(),
        };
        tokens.push(tally::api::auth::create_token(&pool, &new).await.expect("probe token").token);
    }
    let base = format!("http://127.0.0.1:{port}");
    let producer = Arc::new(tally::kafka::producer(&BROKERS).expect("producer"));
    let mut generator = Generator::new(SimulateOptions {
        seed: 11,
        accounts: 2_000,
        duplicate_share: 0.03,
        malformed_share: 0.003,
        spread_days: 3,
        ..SimulateOptions::default()
    });
    let mut template = None;
    while template.is_none() {
        if let Kind::Valid(e) = generator.next_message().kind
            && catalog.price(&e).cost_units > 0
        {
            template = Some(e);
        }
    }
    let template = template.expect("a charged event");
    let probe = |i: usize| {
        let mut e = template.clone();
        e.event_id = format!("probe-{id}-{i}");
        e.account_id = format!("probe-{id}-{i}");
        e.occurred_at = chrono::Utc::now();
        (e.account_id.clone(), tally::codec::encode(&e.to_raw()))
    };
    let send_probe = |i: usize| {
        let (account, payload) = probe(i);
        let (producer, topic, base, token) =
            (producer.clone(), topic.clone(), base.clone(), tokens[i].clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let started = Instant::now();
            let r = FutureRecord::to(&topic).key(&account).payload(&payload);
            producer.send(r, Duration::from_secs(30)).await.map_err(|(e, _)| e).expect("produce probe");
            let produced = started.elapsed();
            while started.elapsed() < Duration::from_secs(30) {
                let r = http
                    .get(format!("{base}/v1/accounts/{account}/balance"))
                    .bearer_auth(&token)
                    .send()
                    .await;
                if let Ok(r) = r
                    && r.status().is_success()
                    && let Ok(v) = r.json::<serde_json::Value>().await
                    && v["balance_units"].as_i64().is_some_and(|b| b < 0)
                {
                    return Some((started.elapsed(), produced));
                }
                // Every 25 ms: fine enough for a 1 s target. Polling every 5 ms made the
                // probes a load of their own (each a balance read with auth, ~50 probes
                // in flight once a backlog formed: ~10,000 reads/s), which grew the backlog.
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            None
        })
    };
    // Warm-up: the group joins and the first batch commits before anything is timed.
    send_probe(probes_max - 1).await.expect("probe task").expect("the warm-up probe becomes visible");
    let started = Instant::now();
    let (mut probes, mut sent) = (Vec::new(), 0usize);
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    let mut sends = Vec::new();
    // Applied so far (every message before the timed part was applied: the warm-up probe
    // became visible, and nothing else had been produced).
    let applied = |pool: sqlx::PgPool| async move {
        sqlx::query_scalar::<_, Option<i64>>("SELECT sum(next_offset)::bigint FROM consumer_offsets")
            .fetch_one(&pool)
            .await
            .ok()
            .flatten()
            .unwrap_or(0)
    };
    let applied_before = applied(pool.clone()).await;
    let (mut lag_max, mut lag_sampled) = (0i64, Instant::now());
    while started.elapsed() < Duration::from_secs(secs) {
        if lag_sampled.elapsed() >= Duration::from_millis(100) {
            lag_sampled = Instant::now();
            let produced = applied_before + sent as i64 + probes.len() as i64;
            lag_max = lag_max.max(produced - applied(pool.clone()).await);
        }
        tick.tick().await;
        let due = (started.elapsed().as_secs_f64() * rate) as usize;
        let batch: Vec<_> = (sent..due).map(|_| generator.next_message()).collect();
        sent = due;
        let (producer, topic) = (producer.clone(), topic.clone());
        sends.push(tokio::spawn(async move {
            let futures = batch.iter().map(|m| {
                let r = FutureRecord::to(&topic).key(&m.key).payload(&m.payload);
                producer.send(r, Duration::from_secs(60))
            });
            for result in futures::future::join_all(futures).await {
                result.map_err(|(e, _)| e).expect("produce");
            }
        }));
        if probes.len() < ((started.elapsed().as_millis() / 100) as usize).min(probes_max - 1) {
            probes.push(send_probe(probes.len()));
        }
    }
    let background_rate = sent as f64 / started.elapsed().as_secs_f64();
    for s in sends {
        s.await.expect("send task");
    }
    let (mut latencies, mut produce) = (Vec::new(), Vec::new());
    let mut missed = 0;
    for p in probes {
        match p.await.expect("probe task") {
            Some((d, produced)) => {
                latencies.push(d.as_millis());
                produce.push(produced.as_millis());
            }
            None => missed += 1,
        }
    }
    produce.sort_unstable();
    terminate(&mut child);
    pool.close().await;
    latencies.sort_unstable();
    let pct = |q: f64| {
        latencies.get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1))).copied()
    };
    Visibility {
        probes: latencies.len() + missed,
        missed,
        p50_ms: pct(0.5).unwrap_or(0),
        p99_ms: pct(0.99).unwrap_or(0),
        max_ms: latencies.last().copied().unwrap_or(0),
        background_rate,
        produce_p50_ms: produce.get(produce.len() / 2).copied().unwrap_or(0),
        produce_p99_ms: produce
            .get((produce.len() * 99 / 100).min(produce.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0),
        lag_max,
    }
}

fn proc_status_kb(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn rss_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmRSS:")
}

fn hwm_kb(pid: u32) -> u64 {
    proc_status_kb(pid, "VmHWM:")
}

/// utime + stime of a live process, seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12].iter().filter_map(|i| fields.get(*i)?.parse::<f64>().ok()).sum();
    ticks / 100.0 // USER_HZ is 100 on Linux
}

/// Restore `accounts` accounts' state into a fresh `tally run`; its RSS once it answers.
async fn state_memory(env: &TestEnv, accounts: usize) -> (u64, f64) {
    let db = format!("{}_state", env.ch_database);
    let admin = sqlx::PgPool::connect(&format!("{}/postgres", *PG_SERVER_URL)).await.expect("admin");
    sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.expect("create database");
    admin.close().await;
    let url = format!("{}/{db}", *PG_SERVER_URL);
    let pool = tally::ledger::connect(&url, 2).await.expect("state database");
    tally::ledger::migrate(&pool).await.expect("migrations");
    let n = accounts as i64;
    // Ids of their own ('state-'), so the topic this instance also consumes never meets them;
    // zero balances, because a ledger balance is what its grants hold (a balance written
    // here without grants is a state the writer refuses to build on, and retries).
    for sql in [
        "INSERT INTO accounts (account_id) SELECT 'state-' || i FROM generate_series(1, $1) i",
        "INSERT INTO account_balances (account_id, balance_units) SELECT 'state-' || i, 0 FROM generate_series(1, $1) i",
        "INSERT INTO usage_hourly (account_id, kind, key, hour, events, cost_units)
         SELECT 'state-' || i, k.kind, k.key, date_trunc('hour', now()) - h * interval '1 hour', 3, 300
         FROM generate_series(1, $1) i,
              (VALUES ('account', ''), ('api_key', 'key-1'), ('feature', 'ad_generations')) AS k(kind, key),
              generate_series(0, 3) h",
    ] {
        sqlx::query(sql).bind(n).execute(&pool).await.expect("state rows");
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_tally"))
        .arg("run")
        .args(["--brokers", *BROKERS, "--database-url", &url])
        .args(["--clickhouse-url", *CH_URL, "--clickhouse-database", &db])
        .args([
            "--topic",
            &env.topic,
            "--dlq-topic",
            &env.dlq_topic,
            "--group",
            &format!("{}-state", env.group),
        ])
        .args(["--config", repo().join(CATALOG).to_str().expect("utf-8 path")])
        .args(["--http-addr", &format!("127.0.0.1:{port}")])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn tally run");
    let http = reqwest::Client::new();
    let started = Instant::now();
    while http.get(format!("http://127.0.0.1:{port}/healthz")).send().await.is_err() {
        assert!(started.elapsed() < Duration::from_secs(600), "tally run answers after restoring");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let restore_seconds = started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss = rss_kb(child.id());
    terminate(&mut child);
    pool.close().await;
    (rss, restore_seconds)
}
