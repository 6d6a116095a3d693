//! Re-pricing speed (issue 15), in one run on this machine:
//! - the pricing core alone (parsed events in memory, one thread): the ceiling;
//! - `tally price`, the whole process, JSON lines from a file to /dev/null;
//! - `tally rerate --dry-run` over the same events stored in ClickHouse `usage_log`, with
//!   one model's price changed (reads, rebuilds and prices every event of the range).
//!
//! `scripts/bench-rerate` (or `cargo bench --bench rerate`; needs the stack). Knobs:
//! `BENCH_EVENTS` (default 1,000,000), `BENCH_ACCOUNTS` (2,000), `BENCH_KEEP` (keep the
//! input files and print where, for profiling).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;
use tally::event::UsageEvent;
use tally::pricing::Catalog;
use tally::simulate::{Generator, Kind, SimulateOptions};

const CATALOG: &str = "examples/demo.toml";

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() {
    let measuring = std::env::args().any(|a| a == "--bench");
    let n = env_usize("BENCH_EVENTS", if measuring { 1_000_000 } else { 20_000 });
    let accounts = env_usize("BENCH_ACCOUNTS", 2_000) as u32;
    let mut generator = Generator::new(SimulateOptions {
        seed: 11,
        accounts,
        duplicate_share: 0.0,
        malformed_share: 0.0,
        spread_days: 20,
        ..SimulateOptions::default()
    });
    let events: Vec<UsageEvent> = (0..n)
        .map(|_| match generator.next_message().kind {
            Kind::Valid(e) => *e,
            _ => unreachable!("only valid events asked"),
        })
        .collect();
    let catalog = Catalog::load(&repo().join(CATALOG)).expect("catalog");

    // 1. The pricing core.
    let started = Instant::now();
    let mut total = 0i64;
    for e in &events {
        total += catalog.price(std::hint::black_box(e)).cost_units;
    }
    std::hint::black_box(total);
    let core = n as f64 / started.elapsed().as_secs_f64();

    // 2. `tally price`, whole process: one pricing thread, then one per core.
    let dir = std::env::temp_dir().join(format!("tally-bench-rerate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let lines = dir.join("events.jsonl");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&lines).unwrap());
        for e in &events {
            serde_json::to_writer(&mut f, &e.to_raw()).unwrap();
            f.write_all(b"\n").unwrap();
        }
    }
    let price = |threads: Option<&str>| {
        let started = Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(["price", "--config", repo().join(CATALOG).to_str().unwrap()])
            .args(threads.map(|t| vec!["--threads", t]).unwrap_or_default())
            .stdin(std::fs::File::open(&lines).unwrap())
            .stdout(Stdio::null())
            .status()
            .expect("tally price");
        assert!(status.success());
        n as f64 / started.elapsed().as_secs_f64()
    };
    let price_one = price(Some("1"));
    let price_rate = price(None);

    // 3. `tally rerate --dry-run` over the events in ClickHouse.
    let env = TestEnv::new(1).await;
    let now = chrono::Utc::now();
    let version: std::sync::Arc<str> = catalog.version_shared();
    for chunk in events.chunks(100_000) {
        let rows: Vec<tally::analytics::UsageRow> = chunk
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let item = tally::batch::ValidItem {
                    pos: tally::batch::SourcePos { partition: 0, offset: i as i64 },
                    event: e.clone(),
                    charge: catalog.price(e),
                    catalog_version: version.clone(),
                    payload_hash: [0; 32],
                };
                tally::analytics::UsageRow::from_item(&item, now)
            })
            .collect();
        tally::analytics::insert(&env.clickhouse(), &rows).await.expect("load usage_log");
    }
    let text = std::fs::read_to_string(repo().join(CATALOG)).unwrap();
    let changed = dir.join("changed.toml");
    std::fs::write(
        &changed,
        text.replacen("input_per_1m_tokens = \"1.25\"", "input_per_1m_tokens = \"2.50\"", 1),
    )
    .unwrap();
    let (from, to) =
        ((now - chrono::Duration::days(30)).to_rfc3339(), (now + chrono::Duration::days(1)).to_rfc3339());
    // The raw component: ClickHouse streaming the same columns of the same range.
    let started = Instant::now();
    let bytes = env
        .clickhouse()
        .query(&format!(
            "SELECT {} FROM usage_log WHERE occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')",
            tally::rerate::STORED_USAGE_COLUMNS
        ))
        .bind((now - chrono::Duration::days(30)).timestamp())
        .bind((now + chrono::Duration::days(1)).timestamp())
        .fetch_bytes("RowBinary")
        .unwrap()
        .collect()
        .await
        .expect("raw read");
    let ch_rate = n as f64 / started.elapsed().as_secs_f64();
    assert!(bytes.len() > n * 50);
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["rerate", "--dry-run", "--json", "--quiet", "--catalog", changed.to_str().unwrap()])
        .args(["--from", &from, "--to", &to, "--database-url", &env.database_url])
        .args(["--clickhouse-url", *CH_URL, "--clickhouse-database", &env.ch_database])
        .output()
        .expect("tally rerate");
    let secs = started.elapsed().as_secs_f64();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let read = report["events_read"].as_u64().unwrap();
    assert_eq!(read as usize, n, "every event re-priced");
    let rerate_rate = read as f64 / secs;
    if std::env::var_os("BENCH_KEEP").is_some() {
        println!("kept: {} and ClickHouse database {}", dir.display(), env.ch_database);
    } else {
        std::fs::remove_dir_all(&dir).ok();
    }

    println!("re-pricing, {n} events, {accounts} accounts, this machine, one run:");
    println!("  pricing core (in memory, 1 thread)        {core:>12.0} events/s");
    println!(
        "  tally price --threads 1 (JSON lines)      {price_one:>12.0} events/s  ({:.3} x core)",
        price_one / core
    );
    println!(
        "  tally price (one thread per core)         {price_rate:>12.0} events/s  ({:.3} x core, {:.2} x one thread)",
        price_rate / core,
        price_rate / price_one
    );
    println!("  ClickHouse streaming the range's columns  {ch_rate:>12.0} rows/s    (raw component)");
    println!(
        "  tally rerate --dry-run (ClickHouse range)  {rerate_rate:>12.0} events/s  ({:.3} x the ClickHouse read; {} changed, {} not applied)",
        rerate_rate / ch_rate,
        report["total"]["events"],
        report["pending_events"]
    );
}
