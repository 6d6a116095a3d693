//! Auto-reload (Brokr): when an account's balance crosses below its threshold, queue one
//! `auto_reload_requested` request, once per crossing.
//!
//! The request row is written in the same transaction as the balance change that crossed
//! (so it exists exactly once per crossing) and the account is disarmed; it is re-armed
//! when the balance is back at or above the threshold. `tally run` publishes queued
//! requests to the `tally.auto-reload` topic ([`publish_pending`]): at-least-once on the
//! topic, each message keyed by its `request_id` so a consumer can drop repeats.

use rdkafka::producer::{FutureProducer, FutureRecord};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;
use std::time::Duration;

/// Check the new balances of accounts whose balance rows the caller holds locked.
pub(crate) async fn check(
    tx: &mut Transaction<'_, Postgres>,
    balances_after: &HashMap<&str, i64>,
) -> Result<(), sqlx::Error> {
    let accounts: Vec<&str> = balances_after.keys().copied().collect();
    let configured: Vec<(String, i64, i64, bool)> = sqlx::query_as(
        "SELECT account_id, auto_reload_threshold_units, auto_reload_amount_units, auto_reload_armed
         FROM accounts WHERE account_id = ANY($1) AND auto_reload_threshold_units IS NOT NULL
           AND auto_reload_amount_units IS NOT NULL",
    )
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    for (account, threshold, amount, armed) in configured {
        let balance = balances_after[account.as_str()];
        if armed && balance < threshold {
            sqlx::query(
                "INSERT INTO auto_reload_requests (account_id, balance_units, threshold_units, amount_units)
                 VALUES ($1, $2, $3, $4)",
            )
            .bind(&account)
            .bind(balance)
            .bind(threshold)
            .bind(amount)
            .execute(&mut **tx)
            .await?;
            set_armed(tx, &account, false).await?;
        } else if !armed && balance >= threshold {
            set_armed(tx, &account, true).await?;
        }
    }
    Ok(())
}

async fn set_armed(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
    armed: bool,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE accounts SET auto_reload_armed = $2 WHERE account_id = $1")
        .bind(account)
        .bind(armed)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Configure (or, with `None`, remove) an account's auto-reload. Arms it.
pub async fn configure(
    pool: &PgPool,
    account_id: &str,
    threshold_and_amount_units: Option<(i64, i64)>,
) -> Result<(), sqlx::Error> {
    let (threshold, amount) = threshold_and_amount_units.unzip();
    sqlx::query(
        "INSERT INTO accounts (account_id, auto_reload_threshold_units, auto_reload_amount_units)
         VALUES ($1, $2, $3)
         ON CONFLICT (account_id) DO UPDATE SET auto_reload_threshold_units = $2,
             auto_reload_amount_units = $3, auto_reload_armed = true",
    )
    .bind(account_id)
    .bind(threshold)
    .bind(amount)
    .execute(pool)
    .await?;
    Ok(())
}

/// Most requests published per call: bounds one transaction's work.
const PUBLISH_BATCH_MAX: i64 = 100;

/// Publish queued requests; returns how many. Rows are marked published only after the
/// broker acknowledged them.
pub async fn publish_pending(pool: &PgPool, producer: &FutureProducer, topic: &str) -> anyhow::Result<usize> {
    let mut tx = pool.begin().await?;
    type Row = (i64, String, i64, i64, i64, chrono::DateTime<chrono::Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT request_id, account_id, balance_units, threshold_units, amount_units, created_at
         FROM auto_reload_requests WHERE published_at IS NULL
         ORDER BY request_id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(PUBLISH_BATCH_MAX)
    .fetch_all(&mut *tx)
    .await?;
    for (id, account, balance, threshold, amount, created_at) in &rows {
        let body = serde_json::json!({
            "type": "auto_reload_requested",
            "request_id": id,
            "account_id": account,
            "balance_units": balance,
            "threshold_units": threshold,
            "amount_units": amount,
            "created_at": created_at,
        })
        .to_string();
        let key = id.to_string();
        producer
            .send(FutureRecord::to(topic).key(&key).payload(&body), Duration::from_secs(30))
            .await
            .map_err(|(e, _)| anyhow::anyhow!("publishing auto-reload request {id}: {e}"))?;
    }
    let ids: Vec<i64> = rows.iter().map(|r| r.0).collect();
    sqlx::query("UPDATE auto_reload_requests SET published_at = now() WHERE request_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(rows.len())
}
