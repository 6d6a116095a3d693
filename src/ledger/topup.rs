//! Top-ups: purchases credited once per order id, with bonus tiers.
//!
//! An order is created `pending` (async payment methods: ACH, SEPA) or straight away
//! `succeeded`; only the transition to `succeeded` credits the account, in the same
//! transaction, with one `topup` entry keyed `topup:<order_id>`. Whatever the number of
//! webhooks or retries for one payment, it credits once (Struere's `polarOrderId`, Reeve's
//! and Brievio's Stripe webhooks). The same order id with a different account or amount is
//! a conflict, never a silent no-op.

use super::config::TopupConfig;
use super::ops::{Amount, LedgerError, Posted, Posting, hash_payload, post};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;

#[derive(Debug, Clone, Serialize)]
pub struct TopupRequest {
    pub order_id: String,
    pub account_id: String,
    /// What was paid, USD (exact).
    pub paid_usd: rust_decimal::Decimal,
    /// `stripe`, `operator` or `polar`.
    pub source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupResult {
    pub order_id: String,
    pub account_id: String,
    pub status: String,
    pub paid_units: i64,
    pub credited_units: i64,
    /// The entry that credited it (absent while pending or failed).
    pub entry: Option<Posted>,
}

/// Record a payment that has not settled yet (shown as pending). Idempotent.
pub async fn record_pending(
    pool: &PgPool,
    cfg: &TopupConfig,
    req: &TopupRequest,
) -> Result<TopupResult, LedgerError> {
    let (paid, credited) = cfg.credit_for(req.paid_usd).map_err(LedgerError::Invalid)?;
    let mut tx = pool.begin().await?;
    super::lock_balances(&mut tx, &[req.account_id.as_str()]).await?;
    let existing = load_order(&mut tx, &req.order_id).await?;
    if let Some(o) = existing {
        check_same(&o, req, paid)?;
        tx.rollback().await?;
        return Ok(o);
    }
    insert_pending(&mut tx, req, paid, credited).await?;
    tx.commit().await?;
    Ok(TopupResult {
        order_id: req.order_id.clone(),
        account_id: req.account_id.clone(),
        status: "pending".into(),
        paid_units: paid,
        credited_units: credited,
        entry: None,
    })
}

/// The payment succeeded: credit the account once. Idempotent by order id.
pub async fn complete(
    pool: &PgPool,
    cfg: &TopupConfig,
    req: &TopupRequest,
) -> Result<TopupResult, LedgerError> {
    let (paid, credited) = cfg.credit_for(req.paid_usd).map_err(LedgerError::Invalid)?;
    let mut tx = pool.begin().await?;
    // Lock the balance row first (lock order: balance, then order), creating the account.
    super::lock_balances(&mut tx, &[req.account_id.as_str()]).await?;
    let existing = load_order(&mut tx, &req.order_id).await?;
    match &existing {
        Some(o) => {
            check_same(o, req, paid)?;
            match o.status.as_str() {
                "succeeded" => {
                    tx.rollback().await?;
                    return Ok(o.clone());
                }
                "failed" => return Err(LedgerError::InvalidState(format!("order {} failed", req.order_id))),
                _ => {}
            }
        }
        None => insert_pending(&mut tx, req, paid, credited).await?,
    }
    // The order keeps the credit computed when it was first recorded (tiers may change).
    let credited = existing.as_ref().map_or(credited, |o| o.credited_units);
    let key = format!("topup:{}", req.order_id);
    let hash = hash_payload(&(&req.account_id, paid, credited));
    let posted = post(
        &mut tx,
        Posting {
            account_id: &req.account_id,
            kind: "topup",
            amount: Amount::Delta(credited),
            idempotency_key: &key,
            payload_hash: &hash,
            description: format!("top-up {} USD via {}", req.paid_usd, req.source),
            created_by: None,
            corrects_entry_id: None,
            metadata: serde_json::json!({"order_id": req.order_id, "paid_units": paid}),
        },
    )
    .await?;
    sqlx::query(
        "UPDATE topup_orders SET status = 'succeeded', entry_id = $2, updated_at = now() WHERE order_id = $1",
    )
    .bind(&req.order_id)
    .bind(posted.entry_id)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(TopupResult {
        order_id: req.order_id.clone(),
        account_id: req.account_id.clone(),
        status: "succeeded".into(),
        paid_units: paid,
        credited_units: credited,
        entry: Some(posted),
    })
}

/// An async payment failed: the pending order is closed without credit.
pub async fn fail(pool: &PgPool, order_id: &str) -> Result<(), LedgerError> {
    let done = sqlx::query(
        "UPDATE topup_orders SET status = 'failed', updated_at = now() WHERE order_id = $1 AND status = 'pending'",
    )
    .bind(order_id)
    .execute(pool)
    .await?
    .rows_affected();
    if done == 0 {
        let known: Option<(String,)> = sqlx::query_as("SELECT status FROM topup_orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
        return match known {
            Some((s,)) if s == "failed" => Ok(()),
            Some((s,)) => Err(LedgerError::InvalidState(format!("order {order_id} is {s}"))),
            None => Err(LedgerError::NotFound(format!("order {order_id}"))),
        };
    }
    Ok(())
}

/// A new order, pending until its payment succeeds.
async fn insert_pending(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    req: &TopupRequest,
    paid: i64,
    credited: i64,
) -> Result<(), LedgerError> {
    sqlx::query(
        "INSERT INTO topup_orders (order_id, account_id, source, paid_units, credited_units, status)
         VALUES ($1, $2, $3, $4, $5, 'pending')",
    )
    .bind(&req.order_id)
    .bind(&req.account_id)
    .bind(req.source)
    .bind(paid)
    .bind(credited)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

async fn load_order(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    order_id: &str,
) -> Result<Option<TopupResult>, LedgerError> {
    type Row = (String, String, String, i64, i64, Option<i64>);
    let row: Option<Row> = sqlx::query_as(
        "SELECT order_id, account_id, status, paid_units, credited_units, entry_id
         FROM topup_orders WHERE order_id = $1 FOR UPDATE",
    )
    .bind(order_id)
    .fetch_optional(&mut **tx)
    .await?;
    let Some((order_id, account_id, status, paid_units, credited_units, entry_id)) = row else {
        return Ok(None);
    };
    let entry = match entry_id {
        None => None,
        Some(id) => {
            let (kind, amount, after): (String, i64, i64) = sqlx::query_as(
                "SELECT kind, amount_units, balance_after_units FROM ledger_entries WHERE entry_id = $1",
            )
            .bind(id)
            .fetch_one(&mut **tx)
            .await?;
            Some(Posted {
                entry_id: id,
                account_id: account_id.clone(),
                kind,
                amount_units: amount,
                balance_after_units: after,
            })
        }
    };
    Ok(Some(TopupResult { order_id, account_id, status, paid_units, credited_units, entry }))
}

fn check_same(existing: &TopupResult, req: &TopupRequest, paid: i64) -> Result<(), LedgerError> {
    if existing.account_id != req.account_id || existing.paid_units != paid {
        return Err(LedgerError::Conflict { key: format!("topup:{}", req.order_id) });
    }
    Ok(())
}
