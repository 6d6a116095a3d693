//! Exactly-once under faults: a harness that proves no usage event is lost or billed twice
//! on the real stack (tansu broker, Postgres, ClickHouse) while it injects, one scenario
//! each: (1) kill -9 of `tally run` at random moments, (2) a member of a two-member group
//! killed, (3) Postgres restarted (fast and crash), (4) ClickHouse down, (5) the broker
//! paused, (6) duplicates days apart (emulated: see `data::duplicates`), (7) bad input
//! and unknown accounts, (7b) absurd but legal costs, (7c) a balance driven past i64, (7d) rows
//! the database refuses (a constraint raised by a trigger), (8) credit grants expiring while
//! processes are killed. Scenario 0 first proves the checks
//! are not vacuous (it tampers with the stores and requires every check to notice).
//!
//! After every scenario it checks, against totals computed from what it produced: ledger
//! debits per account, one `usage_log` row per distinct valid event, exactly the bad
//! messages on the dead-letter topic (with reasons), and `ledger verify`. It prints a table
//! and exits non-zero on any loss, double debit or failed check.
//!
//! It disrupts the servers, so it never runs with other tests: `Cargo.toml` marks it
//! `test = false` and `scripts/test` runs it last (`cargo test --locked --test faults`);
//! `scripts/faults` runs it at full size. Develop against a private stack:
//!
//! ```sh
//! export TALLY_STACK_DIR=/work/faults-stack TALLY_STACK_PORT_OFFSET=1000
//! scripts/stack up && eval "$(scripts/stack env)" && cargo test --test faults
//! ```
//!
//! What is real and what is emulated:
//! - real: SIGKILL (`kill -9`) and SIGABRT of `tally run` processes, a Postgres restart
//!   (`pg_ctl -m fast`) and crash (`-m immediate`, WAL recovery), ClickHouse stopped (port
//!   closed), the broker frozen with SIGSTOP/SIGCONT (memory storage: a broker restart
//!   would lose the topics), group failover, a member joining under load (a rebalance
//!   with batches in flight and claimed ahead), malformed bytes on the wire;
//! - emulated: the passage of days between an event and its duplicate. The events are
//!   really 40-43 days old (event time), and once applied their dedup rows
//!   (`processed_events.processed_at`) are moved back to that time; `ledger_entries` are
//!   never touched (append-only). Dedup holds across a restart, other partitions and a
//!   full replay under a new consumer group;
//! - scaled down in CI: the ClickHouse outage (15 s; a minute in `scripts/faults`), the
//!   broker pause (15 s; 30 s), sizes and kill counts.
//!
//! Knobs (CI-sized defaults): FAULTS_EVENTS (messages of the kill scenario, 30000),
//! FAULTS_KILLS (kill -9 count, 6; plus one abort at the ClickHouse/COMMIT gap per 4),
//! FAULTS_SCENARIO_EVENTS (messages of each other scenario, 8000), FAULTS_CH_OUTAGE_SECS
//! (15), FAULTS_CH_BURST (events produced during that outage, 40000),
//! FAULTS_BROKER_PAUSE_SECS (15), FAULTS_SEED (42), FAULTS_WAIT_SECS (catch-up bound
//! per phase, 300), FAULTS_SCENARIOS (e.g. "1,4,7b"; default all), FAULTS_REPORT (also
//! write the table to this file).

#[path = "common/mod.rs"]
mod common;

#[path = "faults/book.rs"]
mod book;
#[path = "faults/check.rs"]
mod check;
#[path = "faults/data.rs"]
mod data;
#[path = "faults/grants.rs"]
mod grants;
#[path = "faults/ops.rs"]
mod ops;
#[path = "faults/scenarios.rs"]
mod scenarios;
#[path = "faults/traffic.rs"]
mod traffic;

use scenarios::{Cfg, Row};
use std::time::{Duration, Instant};

const ALL: [&str; 13] = ["0", "1", "2", "2b", "3", "4", "5", "6", "7", "7b", "7c", "7d", "8"];

fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("{name}={v} is not valid")),
        Err(_) => default,
    }
}

fn config() -> (Cfg, Vec<String>) {
    let cfg = Cfg {
        events: var("FAULTS_EVENTS", 30_000),
        kills: var("FAULTS_KILLS", 6),
        scenario_events: var("FAULTS_SCENARIO_EVENTS", 8_000),
        ch_outage: Duration::from_secs(var("FAULTS_CH_OUTAGE_SECS", 15)),
        ch_burst: var("FAULTS_CH_BURST", 40_000),
        broker_pause: Duration::from_secs(var("FAULTS_BROKER_PAUSE_SECS", 15)),
        seed: var("FAULTS_SEED", 42),
        wait_limit: Duration::from_secs(var("FAULTS_WAIT_SECS", 300)),
    };
    let wanted: String = var("FAULTS_SCENARIOS", ALL.join(","));
    let list: Vec<String> =
        wanted.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
    for s in &list {
        assert!(ALL.contains(&s.as_str()), "FAULTS_SCENARIOS: unknown scenario {s:?} (known: {ALL:?})");
    }
    (cfg, list)
}

async fn run(cfg: &Cfg, list: &[String]) -> Vec<Row> {
    common::stack();
    ops::assert_same_stack();
    let mut rows = Vec::new();
    for s in list {
        let row = match s.as_str() {
            "0" => data::self_test(cfg).await,
            "1" => scenarios::kills(cfg).await,
            "2" => scenarios::failover(cfg).await,
            "2b" => scenarios::join_then_kill(cfg).await,
            "3" => scenarios::postgres_restart(cfg).await,
            "4" => scenarios::clickhouse_outage(cfg).await,
            "5" => scenarios::broker_pause(cfg).await,
            "6" => data::duplicates(cfg).await,
            "7" => data::bad_input(cfg).await,
            "7b" => data::absurd(cfg).await,
            "7c" => data::balance_overflow(cfg).await,
            "7d" => data::refused_rows(cfg).await,
            "8" => grants::expiring_grants(cfg).await,
            _ => unreachable!("checked in config()"),
        };
        ops::say(format!(
            "{}: {} in {}",
            row.name,
            if row.failed() { "FAILED" } else { "ok" },
            ops::secs(row.wall)
        ));
        rows.push(row);
    }
    rows
}

fn table(rows: &[Row], cfg: &Cfg, wall: Duration) -> String {
    let mut t = String::new();
    t.push_str("| scenario | events | faults injected | lost | double-billed | dead-lettered | recovery time | wall |\n");
    t.push_str("|---|---:|---|---:|---:|---:|---|---:|\n");
    for r in rows {
        let v = &r.verdict;
        t.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.name,
            r.events,
            r.faults,
            v.lost,
            v.double_billed,
            v.dead_lettered,
            r.recovery.show(),
            ops::secs(r.wall)
        ));
    }
    t.push_str(&format!("\nTotal wall time {} ({cfg:?})\n", ops::secs(wall)));
    for r in rows {
        let v = &r.verdict;
        t.push_str(&format!(
            "\n{}: {} messages in the topic, {} dead-letter copies on the topic, {} usage_log rows inserted \
             twice\n",
            r.name, v.messages_in_topic, v.dlq_copies, v.ch_extra_rows
        ));
        for n in &r.notes {
            t.push_str(&format!("  note: {n}\n"));
        }
        for e in &v.errors {
            t.push_str(&format!("  FAIL: {e}\n"));
        }
    }
    t
}

fn main() {
    let (cfg, list) = config();
    let started = Instant::now();
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let rows = rt.block_on(run(&cfg, &list));
    let report = table(&rows, &cfg, started.elapsed());
    ops::say(format!("report\n\n{report}"));
    if let Ok(path) = std::env::var("FAULTS_REPORT") {
        std::fs::write(&path, &report).unwrap_or_else(|e| panic!("writing {path}: {e}"));
    }
    let failed: Vec<&str> = rows.iter().filter(|r| r.failed()).map(|r| r.name.as_str()).collect();
    if !failed.is_empty() {
        ops::say(format!("FAILED: {failed:?}"));
        std::process::exit(1);
    }
}
