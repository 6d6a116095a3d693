//! The ledger against real Postgres: every entry type, idempotency (replay and conflict),
//! purchases credited once, concurrent reservations, hold expiry, settlement by usage
//! events, Stripe webhooks, auto-reload once per crossing, and `ledger verify` catching a
//! planted error.

mod common;

use chrono::Utc;
use common::*;
use rust_decimal::Decimal;
use std::str::FromStr;
use std::time::Duration;
use tally::event::UsageEvent;
use tally::ledger;
use tally::ledger::config::{LedgerConfig, TopupConfig};
use tally::ledger::ops::{self, LedgerError, ManualKind, ManualRequest};
use tally::ledger::reservations::{self, ReserveRequest};
use tally::ledger::topup::{self, TopupRequest};

const USD: i64 = tally::money::UNITS_PER_USD;

fn d(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn manual(account: &str, key: &str, kind: ManualKind) -> ManualRequest {
    ManualRequest {
        account_id: account.into(),
        idempotency_key: key.into(),
        kind,
        created_by: "ops@example.com".into(),
        reason: "test".into(),
    }
}

async fn balance(env: &TestEnv, account: &str) -> ledger::BalanceView {
    ledger::balance(&env.pool, account).await.unwrap().expect("account exists")
}

fn topup_req(order: &str, account: &str, usd: &str) -> TopupRequest {
    TopupRequest { order_id: order.into(), account_id: account.into(), paid_usd: d(usd), source: "operator" }
}

#[tokio::test]
async fn every_entry_type_stamps_balance_after_and_verifies() {
    let env = TestEnv::new(1).await;
    let brievio = LedgerConfig::load(&repo().join("examples/brievio.toml")).unwrap().topup;
    let a = "acct-types";
    let t = topup::complete(&env.pool, &brievio, &topup_req("ord-1", a, "100")).await.unwrap();
    assert_eq!(t.credited_units, 110 * USD, "Brievio: $100 -> $110");
    let e = t.entry.unwrap();
    assert_eq!((e.kind.as_str(), e.balance_after_units), ("topup", 110 * USD));

    let applied = apply_usage(&env, vec![chat_call("e1", a, None)], 0).await;
    assert_eq!(applied.debited_units, CHAT_UNITS);
    let steps = [
        (ManualKind::Refund(5 * USD), "refund", 115 * USD - CHAT_UNITS),
        (ManualKind::Addition(USD), "addition", 116 * USD - CHAT_UNITS),
        (ManualKind::AdjustBy(-6 * USD), "adjustment", 110 * USD - CHAT_UNITS),
        (ManualKind::SetBalanceTo(50 * USD), "adjustment", 50 * USD),
        (ManualKind::PlanAllocation(20 * USD), "plan_allocation", 70 * USD),
        (ManualKind::PlanReset(50 * USD), "plan_reset", 50 * USD),
    ];
    for (i, (kind, name, after)) in steps.into_iter().enumerate() {
        let p = ops::manual(&env.pool, &manual(a, &format!("k{i}"), kind)).await.unwrap();
        assert_eq!((p.kind.as_str(), p.balance_after_units), (name, after), "step {i}");
    }
    let set = ops::history(&env.pool, a, None, 100).await.unwrap();
    let target = set.iter().find(|h| h.kind == "topup").unwrap().entry_id;
    let c = ManualKind::Correction { entry_id: target, units: -USD };
    let p = ops::manual(&env.pool, &manual(a, "corr", c)).await.unwrap();
    assert_eq!((p.kind.as_str(), p.balance_after_units), ("correction", 49 * USD));
    let h = ops::history(&env.pool, a, None, 1).await.unwrap();
    assert_eq!((h[0].corrects_entry_id, h[0].created_by.as_deref()), (Some(target), Some("ops@example.com")));
    let b = balance(&env, a).await;
    assert_eq!(b.balance_units, 49 * USD);
    assert!(b.last_purchase_at.is_some() && b.last_deduction_at.is_some());
    let report = ledger::verify(&env.pool).await.unwrap();
    assert_eq!((report.entries, report.total_units), (9, 49 * USD));
    // The balance endpoint's entry count is the projection's, kept by every writer above,
    // and `verify` proves it against the journal.
    assert_eq!(b.entries, 9, "every entry type's entry is counted");
    sqlx::query("UPDATE account_balances SET entry_count = entry_count - 1 WHERE account_id = $1")
        .bind(a)
        .execute(&env.pool)
        .await
        .unwrap();
    let err = ledger::verify(&env.pool).await.unwrap_err().to_string();
    assert!(err.contains(a) && err.contains("counts 8 entries, the journal has 9"), "{err}");
}

#[tokio::test]
async fn idempotency_replays_and_conflicts() {
    let env = TestEnv::new(1).await;
    let a = "acct-idem";
    let req = manual(a, "same-key", ManualKind::Addition(3 * USD));
    let first = ops::manual(&env.pool, &req).await.unwrap();
    let again = ops::manual(&env.pool, &req).await.unwrap();
    assert_eq!(first, again, "the same key and payload returns the original result");
    assert_eq!(balance(&env, a).await.balance_units, 3 * USD, "and credits once");
    let other = manual(a, "same-key", ManualKind::Addition(4 * USD));
    assert!(matches!(ops::manual(&env.pool, &other).await, Err(LedgerError::Conflict { .. })));

    // Purchases: one order id credits once; the same id with another amount is a conflict.
    let cfg = TopupConfig::default();
    let r1 = topup::complete(&env.pool, &cfg, &topup_req("polar-7", a, "25")).await.unwrap();
    let r2 = topup::complete(&env.pool, &cfg, &topup_req("polar-7", a, "25")).await.unwrap();
    assert_eq!(r1, r2);
    assert_eq!(balance(&env, a).await.balance_units, 28 * USD);
    let bad = topup::complete(&env.pool, &cfg, &topup_req("polar-7", a, "26")).await;
    assert!(matches!(bad, Err(LedgerError::Conflict { .. })));
    // Concurrent duplicates of one purchase still credit once.
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let pool = env.pool.clone();
            tokio::spawn(async move {
                topup::complete(&pool, &TopupConfig::default(), &topup_req("stripe-dup", "acct-idem", "10"))
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(balance(&env, a).await.balance_units, 38 * USD);
    // Usage replay: the same events again change nothing.
    let events = vec![chat_call("u1", a, None), chat_call("u2", a, None)];
    apply_usage(&env, events.clone(), 0).await;
    let replay = apply_usage(&env, events, 100).await;
    assert_eq!((replay.duplicates, replay.debited_units), (2, 0));
    assert_eq!(balance(&env, a).await.balance_units, 38 * USD - 2 * CHAT_UNITS);
    ledger::verify(&env.pool).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_reservations_never_overdraw() {
    let env = TestEnv::new(1).await;
    let a = "acct-race";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o", a, "1")).await.unwrap();
    // $1.00 balance, 250 concurrent holds of $0.03: exactly 33 may succeed.
    let tasks: Vec<_> = (0..250)
        .map(|i| {
            let pool = env.pool.clone();
            tokio::spawn(async move {
                let req = ReserveRequest {
                    account_id: "acct-race".into(),
                    reservation_id: format!("r{i}"),
                    amount_units: 3_000_000,
                    ttl_secs: 600,
                    overdraft_units: 0,
                };
                reservations::reserve(&pool, &req).await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(LedgerError::InsufficientFunds { .. }) => refused += 1,
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert_eq!((ok, refused), (33, 217));
    let b = balance(&env, a).await;
    assert_eq!((b.reserved_units, b.effective_units), (99_000_000, 1_000_000));
    let open = env.count("SELECT count(*) FROM reservations WHERE status = 'active'").await;
    assert_eq!(open, 33);
}

#[tokio::test]
async fn holds_expire_settle_by_event_and_release() {
    let env = TestEnv::new(1).await;
    let a = "acct-holds";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o", a, "10")).await.unwrap();
    let reserve = |id: &str, units: i64, ttl: u32| ReserveRequest {
        account_id: a.into(),
        reservation_id: id.into(),
        amount_units: units,
        ttl_secs: ttl,
        overdraft_units: 0,
    };
    // Expiry: a 1-second hold disappears by itself.
    reservations::reserve(&env.pool, &reserve("short", 9 * USD, 1)).await.unwrap();
    assert!(reservations::reserve(&env.pool, &reserve("blocked", 2 * USD, 60)).await.is_err());
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(reservations::expire_due(&env.pool).await.unwrap(), 1);
    assert_eq!(reservations::get(&env.pool, "short").await.unwrap().unwrap().status, "expired");
    assert_eq!(balance(&env, a).await.reserved_units, 0);

    // Settle via API, then the usage event closes it and is the only debit.
    reservations::reserve(&env.pool, &reserve("r1", 5 * USD, 60)).await.unwrap();
    let s = reservations::settle(&env.pool, "r1", CHAT_UNITS).await.unwrap();
    assert_eq!(s.status, "settling");
    let b = balance(&env, a).await;
    assert_eq!((b.reserved_units, b.pending_units), (0, CHAT_UNITS));
    apply_usage(&env, vec![chat_call("ev-r1", a, Some("r1"))], 0).await;
    let r1 = reservations::get(&env.pool, "r1").await.unwrap().unwrap();
    assert_eq!((r1.status.as_str(), r1.actual_units), ("settled", Some(CHAT_UNITS)));
    let b = balance(&env, a).await;
    assert_eq!((b.balance_units, b.pending_units, b.reserved_units), (10 * USD - CHAT_UNITS, 0, 0));

    // An event settles an active hold directly (actual cost below the estimate).
    reservations::reserve(&env.pool, &reserve("r2", 3 * USD, 60)).await.unwrap();
    apply_usage(&env, vec![chat_call("ev-r2", a, Some("r2"))], 1).await;
    assert_eq!(reservations::get(&env.pool, "r2").await.unwrap().unwrap().status, "settled");
    // Release on failure; releasing twice is harmless; settling a released hold is refused.
    reservations::reserve(&env.pool, &reserve("r3", USD, 60)).await.unwrap();
    assert_eq!(reservations::release(&env.pool, "r3").await.unwrap().status, "released");
    assert_eq!(reservations::release(&env.pool, "r3").await.unwrap().status, "released");
    assert!(matches!(reservations::settle(&env.pool, "r3", 1).await, Err(LedgerError::InvalidState(_))));
    let b = balance(&env, a).await;
    assert_eq!((b.reserved_units, b.pending_units, b.balance_units), (0, 0, 10 * USD - 2 * CHAT_UNITS));
    ledger::verify(&env.pool).await.unwrap();
}

#[tokio::test]
async fn auto_reload_is_requested_once_per_crossing() {
    let env = TestEnv::new(1).await;
    let a = "acct-reload";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o1", a, "1")).await.unwrap();
    ledger::auto_reload::configure(&env.pool, a, Some((USD / 2, 25 * USD))).await.unwrap();
    let requests = || env.count("SELECT count(*) FROM auto_reload_requests");
    // $1.00 -> 0.78 -> 0.56: above the $0.50 threshold, nothing.
    apply_usage(&env, vec![chat_call("c1", a, None), chat_call("c2", a, None)], 0).await;
    assert_eq!(requests().await, 0);
    // -> 0.34 crosses; -> 0.12 and -> -0.10 stay below: still one request.
    apply_usage(&env, vec![chat_call("c3", a, None)], 2).await;
    apply_usage(&env, vec![chat_call("c4", a, None), chat_call("c5", a, None)], 3).await;
    assert_eq!(requests().await, 1);
    // Reloaded above the threshold (re-armed), then crossing again: a second request.
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o2", a, "1")).await.unwrap();
    apply_usage(&env, (6..10).map(|i| chat_call(&format!("c{i}"), a, None)).collect(), 5).await;
    assert_eq!(requests().await, 2);
    // Published to Kafka exactly as queued.
    let producer = tally::kafka::producer(&BROKERS).unwrap();
    let topic = format!("{}.reload", env.topic);
    tally::kafka::ensure_topics(&BROKERS, &[(&topic, 1)]).await.unwrap();
    assert_eq!(ledger::auto_reload::publish_pending(&env.pool, &producer, &topic).await.unwrap(), 2);
    assert_eq!(ledger::auto_reload::publish_pending(&env.pool, &producer, &topic).await.unwrap(), 0);
}

#[tokio::test]
async fn the_journal_is_append_only_and_verify_catches_a_planted_error() {
    let env = TestEnv::new(1).await;
    let a = "acct-verify";
    for i in 0..5 {
        ops::manual(&env.pool, &manual(a, &format!("k{i}"), ManualKind::Addition(USD))).await.unwrap();
    }
    let upd = sqlx::query("UPDATE ledger_entries SET amount_units = 0").execute(&env.pool).await;
    assert!(upd.unwrap_err().to_string().contains("append-only"));
    let del = sqlx::query("DELETE FROM ledger_entries").execute(&env.pool).await;
    assert!(del.unwrap_err().to_string().contains("append-only"));
    ledger::verify(&env.pool).await.unwrap();
    // A superuser bypasses the guard and corrupts the third entry.
    let (third,): (i64,) =
        sqlx::query_as("SELECT entry_id FROM ledger_entries ORDER BY entry_id OFFSET 2 LIMIT 1")
            .fetch_one(&env.pool)
            .await
            .unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    sqlx::query("SET LOCAL session_replication_role = replica").execute(&mut *tx).await.unwrap();
    sqlx::query(
        "UPDATE ledger_entries SET balance_after_units = balance_after_units + 1 WHERE entry_id = $1",
    )
    .bind(third)
    .execute(&mut *tx)
    .await
    .unwrap();
    tx.commit().await.unwrap();
    let err = ledger::verify(&env.pool).await.unwrap_err().to_string();
    assert!(err.contains(&format!("entry {third} ")), "{err}");
    // The CLI names it too and exits non-zero.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["ledger", "verify", "--database-url", &env.database_url])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("entry {third} ")));
}

#[tokio::test]
async fn operator_cli_topup_adjust_history_balance() {
    let env = TestEnv::new(1).await;
    let tally = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &env.database_url)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let brokr = repo().join("examples/brokr.toml");
    let brokr = brokr.to_str().unwrap();
    let (code, out, _) = tally(&["topup", "acct-cli", "25", "--order-id", "ord-9", "--config", brokr]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"credited_units\": 2500000000"), "{out}");
    // Same order again: credited once.
    assert_eq!(tally(&["topup", "acct-cli", "25", "--order-id", "ord-9", "--config", brokr]).0, Some(0));
    // Brokr's $5 - $1,000 range is enforced with a clear error.
    let (code, _, err) = tally(&["topup", "acct-cli", "1001", "--config", brokr]);
    assert_eq!(code, Some(1));
    assert!(err.contains("above the maximum 1000 USD"), "{err}");
    // The catalog comes from TALLY_CONFIG like `tally run`'s: Brievio's $100 top-up gets
    // its 10% bonus from the operator path too (there is no rule-free top-up).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["topup", "acct-bonus", "100", "--order-id", "ord-b"])
        .env("TALLY_DATABASE_URL", &env.database_url)
        .env("TALLY_CONFIG", repo().join("examples/brievio.toml"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("\"credited_units\": 11000000000"),
        "{stdout} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let adjust = ["adjust", "acct-cli", "--set-to-usd", "7.5", "--by-user", "alice", "--reason", "promo"];
    let (code, out, _) = tally(&adjust);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("\"amount_units\":-1750000000") && out.contains("\"balance_after_units\":750000000"),
        "{out}"
    );
    let neg = ["adjust", "acct-cli", "--by-usd", "-0.5", "--by-user", "alice", "--reason", "incident"];
    assert_eq!(tally(&neg).0, Some(0));
    let (_, out, _) = tally(&["balance", "acct-cli"]);
    assert!(out.contains("\"balance\": \"7.00000000\""), "{out}");
    let (_, out, _) = tally(&["history", "acct-cli", "--limit", "2"]);
    let lines: Vec<serde_json::Value> = out.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    assert_eq!(
        (lines[0]["kind"].as_str(), lines[0]["created_by"].as_str()),
        (Some("adjustment"), Some("alice"))
    );
    assert_eq!(lines[1]["description"], "promo");
    let (code, _, err) = tally(&["adjust", "acct-cli", "--by-user", "alice", "--reason", "x"]);
    assert_eq!(code, Some(2), "clap refuses an adjustment without an amount: {err}");
}

/// One batch of usage messages at explicit (partition, offset) positions, priced with the
/// demo catalog, as the reader would hand it to the writer.
fn batch_at(messages: &[(&UsageEvent, i32, i64)]) -> tally::batch::Batch {
    use tally::batch::SourcePos;
    use tally::pipeline::reader::Transformer;
    let t = Transformer {
        catalog: std::sync::Arc::new(
            tally::pricing::Catalog::load(&repo().join("examples/demo.toml")).unwrap(),
        ),
        schemas: std::sync::Arc::new(tally::codec::Schemas::new(None)),
        future_skew: chrono::Duration::seconds(300),
        age_max: chrono::Duration::days(400),
        cost_units_max: tally::pipeline::reader::EVENT_COST_UNITS_MAX_DEFAULT,
    };
    let items = messages
        .iter()
        .map(|(e, partition, offset)| {
            let pos = SourcePos { partition: *partition, offset: *offset };
            t.transform(pos, None, &tally::codec::encode(&e.to_raw()), Utc::now())
        })
        .collect();
    tally::batch::Batch { items }
}

async fn write_claimed(env: &TestEnv, batch: &tally::batch::Batch) -> ledger::usage::Applied {
    let claims = ledger::usage::claim(&env.pool, "g", "t", batch).await.unwrap();
    let mut tx = env.pool.begin().await.unwrap();
    let applied = ledger::usage::apply_claimed(&mut tx, "g", "t", batch, &claims).await.unwrap();
    tx.commit().await.unwrap();
    applied
}

/// A claim whose batch never committed belongs to its message, whatever else the batch
/// that finally applies it holds. Here: the original is claimed and the process dies
/// before COMMIT; a gateway retry on another partition is applied as a duplicate; after
/// the restart one batch holds both the re-read retry (below its partition's offset: it
/// comes first in the batch) and the original. The original must be billed, once.
#[tokio::test]
async fn a_claimed_event_is_billed_even_behind_its_rereadable_duplicate() {
    let env = TestEnv::new(1).await;
    let x = chat_call("evt-x", "acct-x", None);
    // The original at partition 1, offset 10: claimed, never committed (a crash).
    let original = batch_at(&[(&x, 1, 10)]);
    ledger::usage::claim(&env.pool, "g", "t", &original).await.unwrap();
    // The retry at partition 2, offset 7: a duplicate of the claim; partition 2 moves on.
    let applied = write_claimed(&env, &batch_at(&[(&x, 2, 7)])).await;
    assert_eq!((applied.new_events.len(), applied.duplicates), (0, 1));
    // Restart: the retry is re-read (its Kafka offset hint lagged) in front of the original.
    let applied = write_claimed(&env, &batch_at(&[(&x, 2, 7), (&x, 1, 10)])).await;
    assert_eq!(applied.skipped_applied, 1, "the retry is below partition 2's offset");
    assert_eq!(applied.new_events.len(), 1, "the original is applied");
    assert!(applied.reclaimed.contains("evt-x"), "as its own earlier claim");
    // And never twice, however often it is read again.
    let applied = write_claimed(&env, &batch_at(&[(&x, 1, 10), (&x, 2, 7), (&x, 3, 1)])).await;
    assert_eq!((applied.new_events.len(), applied.skipped_applied, applied.duplicates), (0, 2, 1));
    let debits = env.count("SELECT count(*) FROM ledger_entries WHERE event_id = 'evt-x'").await;
    assert_eq!(debits, 1, "billed exactly once");
    ledger::verify(&env.pool).await.expect("ledger verify passes");
}

/// `ledger verify` proves each usage event billed at most once in the journal and each
/// billed event present in the dedup store. A second usage row for a billed event, planted
/// by hand (zero amount, so every balance chain stays intact and only this check can see
/// it), is caught.
#[tokio::test]
async fn verify_catches_a_second_usage_entry_for_one_event() {
    let env = TestEnv::new(1).await;
    let x = chat_call("evt-twice", "acct-twice", None);
    assert_eq!(write_claimed(&env, &batch_at(&[(&x, 0, 1)])).await.new_events.len(), 1);
    ledger::verify(&env.pool).await.expect("ledger verify passes");
    sqlx::query(
        "INSERT INTO ledger_entries (account_id, kind, amount_units, balance_after_units,
                                     idempotency_key, payload_hash, event_id, occurred_at)
         SELECT account_id, kind, 0, balance_after_units, 'planted:' || idempotency_key, payload_hash,
                event_id, occurred_at
         FROM ledger_entries WHERE event_id = 'evt-twice'",
    )
    .execute(&env.pool)
    .await
    .unwrap();
    let err = ledger::verify(&env.pool).await.unwrap_err().to_string();
    assert!(err.contains("evt-twice") && err.contains("more than one usage entry"), "{err}");
    // And a billed event whose claim is gone from the dedup store (a replay would bill it
    // again), in a fresh database.
    let env = TestEnv::new(1).await;
    assert_eq!(write_claimed(&env, &batch_at(&[(&x, 0, 1)])).await.new_events.len(), 1);
    sqlx::query("DELETE FROM processed_events WHERE event_id = 'evt-twice'")
        .execute(&env.pool)
        .await
        .unwrap();
    let err = ledger::verify(&env.pool).await.unwrap_err().to_string();
    assert!(err.contains("evt-twice") && err.contains("without a claim"), "{err}");
}

/// Money inputs are bounded at the edge: a settle of i64::MAX used to be accepted and wrap
/// the account's pending total (and with it the effective balance authorize reads).
#[tokio::test]
async fn hold_amounts_beyond_the_input_bound_are_refused_not_wrapped() {
    let env = TestEnv::new(1).await;
    let a = "acct-edges";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o", a, "10")).await.unwrap();
    let req = |id: &str, units: i64| ReserveRequest {
        account_id: a.into(),
        reservation_id: id.into(),
        amount_units: units,
        ttl_secs: 60,
        overdraft_units: 0,
    };
    let too_big = tally::money::INPUT_UNITS_MAX + 1;
    assert!(matches!(
        reservations::reserve(&env.pool, &req("big", too_big)).await,
        Err(LedgerError::Invalid(_))
    ));
    reservations::reserve(&env.pool, &req("r", USD)).await.unwrap();
    for actual in [i64::MAX, too_big] {
        let refused = reservations::settle(&env.pool, "r", actual).await;
        assert!(matches!(refused, Err(LedgerError::Invalid(_))), "settle {actual}: {refused:?}");
    }
    // The largest accepted settle: pending is exact, the effective balance goes negative
    // and stays negative (it used to wrap at i64::MAX).
    let s = reservations::settle(&env.pool, "r", tally::money::INPUT_UNITS_MAX).await.unwrap();
    assert_eq!(s.pending_units, tally::money::INPUT_UNITS_MAX);
    let b = balance(&env, a).await;
    assert_eq!(b.effective_units, 10 * USD - tally::money::INPUT_UNITS_MAX);
    ledger::verify(&env.pool).await.unwrap();
}

/// `last_deduction_at` is the event time of the latest billed usage: an older event does
/// not move it back, and a negative adjustment is no deduction (it used to move it, to the
/// processing time).
#[tokio::test]
async fn last_deduction_at_is_the_latest_usage_event_time() {
    let env = TestEnv::new(1).await;
    let a = "acct-ld";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o", a, "10")).await.unwrap();
    assert_eq!(balance(&env, a).await.last_deduction_at, None, "a top-up is no deduction");
    let at = |hours_ago: i64| {
        use chrono::SubsecRound;
        (Utc::now() - chrono::Duration::hours(hours_ago)).trunc_subsecs(6)
    };
    let (newer, older) = (at(2), at(5));
    let mut e1 = chat_call("ld-1", a, None);
    e1.occurred_at = newer;
    apply_usage(&env, vec![e1], 0).await;
    assert_eq!(balance(&env, a).await.last_deduction_at, Some(newer));
    let mut e2 = chat_call("ld-2", a, None);
    e2.occurred_at = older;
    apply_usage(&env, vec![e2], 1).await;
    assert_eq!(balance(&env, a).await.last_deduction_at, Some(newer), "an older event does not move it back");
    ops::manual(&env.pool, &manual(a, "adj-ld", ManualKind::AdjustBy(-USD))).await.unwrap();
    assert_eq!(balance(&env, a).await.last_deduction_at, Some(newer), "an adjustment is no deduction");
}

/// A settle ends in exactly one debit, whatever the order: the usage event or the hold's
/// deadline, whichever comes first; the other finds it done. Before this, a settled hold
/// whose event never came expired with no debit at all (money used, never billed).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_settle_ends_in_exactly_one_debit_in_every_order() {
    let env = TestEnv::new(1).await;
    let a = "acct-settle";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o", a, "10")).await.unwrap();
    let reserve = |id: &str, ttl: u32| ReserveRequest {
        account_id: a.into(),
        reservation_id: id.into(),
        amount_units: USD,
        ttl_secs: ttl,
        overdraft_units: 0,
    };
    let debits = |id: &'static str| {
        let pool = env.pool.clone();
        async move {
            let rows: Vec<(String, i64)> = sqlx::query_as(
                "SELECT kind, amount_units FROM ledger_entries
                 WHERE idempotency_key = 'reservation:' || $1 || ':deadline'
                    OR (kind = 'consume' AND event_id = 'ev-' || $1)",
            )
            .bind(id)
            .fetch_all(&pool)
            .await
            .unwrap();
            rows
        }
    };
    let half = USD / 2;
    // Settle, and no event: the deadline bills the settled amount, once.
    reservations::reserve(&env.pool, &reserve("a", 1)).await.unwrap();
    reservations::settle(&env.pool, "a", half).await.unwrap();
    // Event then settle: the event bills its own price; the settle finds it done.
    reservations::reserve(&env.pool, &reserve("c", 60)).await.unwrap();
    apply_usage(&env, vec![chat_call("ev-c", a, Some("c"))], 0).await;
    let c = reservations::settle(&env.pool, "c", 1).await.unwrap();
    assert_eq!((c.status.as_str(), c.actual_units), ("settled", Some(CHAT_UNITS)));
    // Event and no settle: the deadline finds it done. Release: never billed.
    reservations::reserve(&env.pool, &reserve("d", 1)).await.unwrap();
    apply_usage(&env, vec![chat_call("ev-d", a, Some("d"))], 1).await;
    reservations::reserve(&env.pool, &reserve("e", 1)).await.unwrap();
    reservations::release(&env.pool, "e").await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    reservations::expire_due(&env.pool).await.unwrap();
    reservations::expire_due(&env.pool).await.unwrap();
    assert_eq!(debits("a").await, [("reservation_settle".to_string(), -half)]);
    assert_eq!(reservations::get(&env.pool, "a").await.unwrap().unwrap().status, "settled");
    // Settle, deadline, then the event arrives late: recorded, not billed again.
    let late = apply_usage(&env, vec![chat_call("ev-a", a, Some("a"))], 2).await;
    assert_eq!(late.new_events.len(), 1);
    assert_eq!(late.new_events[0].charge.cost_units, 0);
    assert_eq!(late.new_events[0].charge.reason.as_str(), "paid_by_hold");
    assert_eq!(debits("a").await.len(), 1, "the late event is not billed again");
    assert_eq!(debits("c").await, [("consume".to_string(), -CHAT_UNITS)]);
    assert_eq!(debits("d").await, [("consume".to_string(), -CHAT_UNITS)]);
    assert_eq!(reservations::get(&env.pool, "e").await.unwrap().unwrap().status, "released");
    let b = balance(&env, a).await;
    assert_eq!(
        (b.balance_units, b.reserved_units, b.pending_units),
        (10 * USD - half - 2 * CHAT_UNITS, 0, 0)
    );

    // Two instances race the deadline against the event: exactly one debit, never zero.
    for (round, id) in ["f", "g", "h", "i"].into_iter().enumerate() {
        reservations::reserve(&env.pool, &reserve(id, 1)).await.unwrap();
        reservations::settle(&env.pool, id, half).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1_100)).await;
        let other = tally::ledger::connect(&env.database_url, 2).await.unwrap();
        let (p1, p2) = (env.pool.clone(), other.clone());
        let expire1 = tokio::spawn(async move { reservations::expire_due(&p1).await.unwrap() });
        let expire2 = tokio::spawn(async move { reservations::expire_due(&p2).await.unwrap() });
        apply_usage(&env, vec![chat_call(&format!("ev-{id}"), a, Some(id))], 3 + round as i64).await;
        expire1.await.unwrap();
        expire2.await.unwrap();
        let d = debits(id).await;
        let nonzero: Vec<_> = d.iter().filter(|(_, units)| *units != 0).collect();
        assert_eq!(nonzero.len(), 1, "{id}: exactly one debit, got {d:?}");
    }
    ledger::verify(&env.pool).await.unwrap();
}

/// Issue 11.1 and 11.6 from the operator's side: the review queue and its resolution, and
/// an enterprise assignment with custom terms, through the CLI.
#[tokio::test]
async fn operator_cli_resolves_reviews_and_assigns_enterprise() {
    let env = TestEnv::new(1).await;
    let tally = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
            .args(args)
            .env("TALLY_DATABASE_URL", &env.database_url)
            .env("TALLY_CONFIG", repo().join("examples/broomva.toml"))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // A captured payment in euros: recorded for review, listed in the queue.
    let eur = tally::ledger::topup::CapturedPayment {
        order_id: "pi_cli".into(),
        account_id: Some("acct-op".into()),
        currency: "eur".into(),
        amount_minor: 2_000,
        source: "stripe",
    };
    tally::ledger::topup::record_captured(&env.pool, &Default::default(), &eur).await.unwrap();
    let (code, out, _) = tally(&["orders", "list"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("\"order_id\":\"pi_cli\"") && out.contains("\"status\":\"needs_review\""), "{out}");
    // A credit needs who, why and (for euros) the USD amount.
    let (code, _, err) = tally(&["orders", "resolve", "pi_cli", "--credit", "--by", "ops", "--note", "fx"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("--usd"), "{err}");
    let credit =
        ["orders", "resolve", "pi_cli", "--credit", "--usd", "21.80", "--by", "ops", "--note", "fx 1.09"];
    let (code, out, err) = tally(&credit);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("\"resolution\": \"credited\"") && out.contains("\"status\": \"succeeded\""),
        "{out}"
    );
    assert_eq!(tally(&credit).0, Some(0), "the same resolution again returns the order");
    let (code, _, _) =
        tally(&["orders", "resolve", "pi_cli", "--refund-noted", "--by", "ops", "--note", "x"]);
    assert_eq!(code, Some(1), "another resolution is refused");
    assert_eq!(ledger::balance(&env.pool, "acct-op").await.unwrap().unwrap().balance_units, 2_180_000_000);
    assert_eq!(tally(&["orders", "list"]).1.trim(), "", "the queue is empty");

    // Enterprise with custom terms: an operator may; the terms are stored and read back.
    let assign = [
        "plan",
        "acct-op",
        "enterprise",
        "--by-user",
        "sales",
        "--allocation-usd",
        "5000",
        "--overage-policy",
        "soft_limit",
        "--soft-limit-percent",
        "150",
    ];
    let (code, out, err) = tally(&assign);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("\"new_plan\": \"enterprise\""), "{out}");
    let cfg = tally::quota::config::QuotaConfig::load(&repo().join("examples/broomva.toml")).unwrap();
    let (_, plan) = tally::quota::store::plan_of(&env.pool, &cfg, "acct-op").await.unwrap();
    let plan = plan.unwrap();
    assert_eq!((plan.allocation_units, plan.soft_limit_percent), (5_000 * USD, 150));
    let (code, _, err) =
        tally(&["plan", "acct-op", "enterprise", "--by-user", "s", "--overage-policy", "warn"]);
    assert_ne!(code, Some(0), "terms without an allocation are refused: {err}");
    ledger::verify(&env.pool).await.unwrap();
}

/// Holding authorize's group commit (`ledger::holds`): one transaction decides a batch in
/// arrival order, each call seeing the holds allowed before it; a repeat in the batch gets
/// its first's answer, a changed payload a conflict, a reused reservation id a conflict that
/// leaves the others' decisions exact; a refusal stores nothing, so it passes after a top-up.
#[tokio::test]
async fn a_batch_of_holds_decides_in_order_and_isolates_each_calls_failure() {
    use tally::ledger::holds::{self, HoldCall, HoldOutcome, HoldRequest, Locked};
    let env = TestEnv::new(1).await;
    let a = "acct-batch";
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o1", a, "1")).await.unwrap();
    let taken = ReserveRequest {
        account_id: a.into(),
        reservation_id: "taken".into(),
        amount_units: USD / 100,
        ttl_secs: 600,
        overdraft_units: 0,
    };
    reservations::reserve(&env.pool, &taken).await.unwrap();
    // Allowed while the effective balance covers the amount; the answer names what it saw.
    let call = |account: &str, id: &str, cents: i64| {
        let amount_units = cents * USD / 100;
        HoldCall {
            req: HoldRequest {
                account_id: account.into(),
                authorization_id: id.into(),
                amount_units,
                feature: Some("chat".into()),
                project_id: None,
                api_key_id: None,
                expires_at: Utc::now() + chrono::Duration::seconds(600),
            },
            counted_from_xid: 0,
            decide: Box::new(move |l: &Locked| {
                let effective =
                    tally::money::effective_units(l.balance_units, l.reserved_units, l.pending_units);
                (
                    effective >= amount_units,
                    serde_json::json!({"effective": effective, "holds": l.holds.len()}),
                )
            }),
        }
    };
    let out = holds::hold_batch(
        &env.pool,
        vec![
            call(a, "a1", 50),
            call(a, "taken", 1),
            call(a, "a2", 40),
            call(a, "a1", 50),
            call(a, "a1", 7),
            call(a, "a3", 10),
            call(a, "", 1),
            call("acct-batch-2", "b1", 0),
        ],
    )
    .await
    .unwrap();
    let held = |o: &Result<HoldOutcome, LedgerError>| match o {
        Ok(HoldOutcome::Held { reservation, decision }) => (reservation.clone(), decision.clone()),
        other => panic!("expected a hold, got {other:?}"),
    };
    // $1 - $0.01 (taken) = 99 cents; a1 sees no batch hold, a2 sees a1's.
    let (r1, d1) = held(&out[0]);
    assert_eq!(
        (r1.reservation_id.as_str(), r1.amount_units, r1.status.as_str()),
        ("a1", 50 * USD / 100, "active")
    );
    assert_eq!(d1, serde_json::json!({"effective": 99 * USD / 100, "holds": 1}));
    assert!(matches!(&out[1], Err(LedgerError::Conflict { key }) if key == "taken"), "{:?}", out[1]);
    let (_, d2) = held(&out[2]);
    assert_eq!(d2, serde_json::json!({"effective": 49 * USD / 100, "holds": 2}));
    assert_eq!(held(&out[3]).0, r1, "a repeat in the batch gets its first's answer");
    assert!(matches!(&out[4], Err(LedgerError::Conflict { key }) if key == "a1"), "{:?}", out[4]);
    match &out[5] {
        Ok(HoldOutcome::Refused(d)) => {
            assert_eq!(d, &serde_json::json!({"effective": 9 * USD / 100, "holds": 3}))
        }
        other => panic!("a3 must be refused: {other:?}"),
    }
    assert!(matches!(&out[6], Err(LedgerError::Invalid(_))), "{:?}", out[6]);
    assert_eq!(held(&out[7]).0.account_id, "acct-batch-2");
    let b = balance(&env, a).await;
    assert_eq!((b.reserved_units, b.effective_units), (91 * USD / 100, 9 * USD / 100));
    let refused_claims =
        env.count("SELECT count(*) FROM idempotency_records WHERE idempotency_key = 'authorize:a3'").await;
    assert_eq!(refused_claims, 0, "a refusal stores nothing");

    // After a top-up the refused call passes; the held ones replay their first answer.
    topup::complete(&env.pool, &TopupConfig::default(), &topup_req("o2", a, "1")).await.unwrap();
    let again = holds::hold_batch(&env.pool, vec![call(a, "a3", 10), call(a, "a1", 50)]).await.unwrap();
    assert_eq!(held(&again[0]).1, serde_json::json!({"effective": 109 * USD / 100, "holds": 3}));
    assert_eq!(held(&again[1]), (r1, d1), "the stored answer, not a second hold");
    let open = env
        .count("SELECT count(*) FROM reservations WHERE account_id = 'acct-batch' AND status = 'active'")
        .await;
    assert_eq!(open, 4, "taken, a1, a2, a3");
    ledger::verify(&env.pool).await.unwrap();
}
