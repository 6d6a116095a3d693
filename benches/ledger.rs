//! Batched debit commits vs single-row commits, same run, real Postgres:
//! `cargo bench --bench ledger`. Prints figures; asserts nothing about speed.
//!
//! - batched: the pipeline's own `ledger::usage::apply` (dedup rows, journal entries with
//!   running balances, projection, offsets) committing `BENCH_BATCH` debits per transaction;
//! - single: one idempotent debit per transaction (`ledger::ops::manual`, one entry, one
//!   idempotency record), the way a naive per-call deduction endpoint would write.
//!
//! Env: `BENCH_DEBITS` (default 20000), `BENCH_BATCH` (default 1000), `BENCH_ACCOUNTS` (200).

#[path = "../tests/common/mod.rs"]
mod common;

use chrono::Utc;
use common::*;
use std::sync::Arc;
use std::time::Instant;
use tally::batch::{Batch, SourcePos};
use tally::event::{RawUsageEvent, UsageEvent};
use tally::ledger::ops::{ManualKind, ManualRequest};
use tally::pipeline::reader::Transformer;
use tally::pricing::Catalog;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn event(i: usize, accounts: usize) -> UsageEvent {
    UsageEvent::parse(RawUsageEvent {
        event_id: Some(format!("bench-{i}")),
        occurred_at: Some(Utc::now().to_rfc3339()),
        account_id: Some(format!("acct-{}", i % accounts)),
        provider: Some("xai".into()),
        model: Some("grok-4-1-fast".into()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: Some(1_000 + i as i64 % 5_000),
        output_tokens: Some(100),
        ..Default::default()
    })
    .expect("valid event")
}

#[tokio::main]
async fn main() {
    let debits = env_usize("BENCH_DEBITS", 20_000);
    let batch = env_usize("BENCH_BATCH", 1_000);
    let accounts = env_usize("BENCH_ACCOUNTS", 200);
    let env = TestEnv::new(1).await;
    let catalog = Catalog::load(&repo().join("examples/demo.toml")).expect("catalog");
    let t = Transformer {
        catalog: Arc::new(catalog),
        schemas: std::sync::Arc::new(tally::codec::Schemas::new(None)),
        future_skew: chrono::Duration::seconds(300),
        age_max: chrono::Duration::days(400),
        cost_units_max: tally::pipeline::reader::EVENT_COST_UNITS_MAX_DEFAULT,
    };
    let now = Utc::now();
    let items: Vec<_> = (0..debits)
        .map(|i| {
            let pos = SourcePos { partition: 0, offset: i as i64 };
            t.transform(pos, None, &tally::codec::encode(&event(i, accounts).to_raw()), now)
        })
        .collect();

    let started = Instant::now();
    for chunk in items.chunks(batch) {
        let mut tx = env.pool.begin().await.expect("begin");
        tally::ledger::usage::apply(&mut tx, "bench", "bench", &Batch { items: chunk.to_vec() })
            .await
            .expect("apply");
        tx.commit().await.expect("commit");
    }
    let batched = started.elapsed();

    let single_n = debits.min(5_000);
    let started = Instant::now();
    for i in 0..single_n {
        let req = ManualRequest {
            account_id: format!("acct-{}", i % accounts),
            idempotency_key: format!("single-{i}"),
            kind: ManualKind::AdjustBy(-1_000),
            created_by: "bench".into(),
            reason: "bench".into(),
        };
        tally::ledger::ops::manual(&env.pool, &req).await.expect("debit");
    }
    let single = started.elapsed();
    tally::ledger::verify(&env.pool).await.expect("ledger verifies after the bench");

    let b = debits as f64 / batched.as_secs_f64();
    let s = single_n as f64 / single.as_secs_f64();
    println!("ledger bench ({accounts} accounts, fsync on)");
    println!(
        "  batched apply, {batch}/tx     {b:>10.0} debits/s  ({debits} in {:.2} s)",
        batched.as_secs_f64()
    );
    println!(
        "  single-row tx                {s:>10.0} debits/s  ({single_n} in {:.2} s)",
        single.as_secs_f64()
    );
    println!("  ratio batched / single       {:>10.1}x", b / s);
}
