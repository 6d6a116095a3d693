//! Top-ups: purchases credited once per order id, with bonus tiers.
//!
//! An order is created `pending` (async payment methods: ACH, SEPA) or straight away
//! `succeeded`; only the transition to `succeeded` credits the account, in the same
//! transaction, with one `topup` entry keyed `topup:<order_id>`. Whatever the number of
//! webhooks or retries for one payment, it credits once (Struere's `polarOrderId`, Reeve's
//! and Brievio's Stripe webhooks). The same order id with a different account or amount is
//! a conflict, never a silent no-op.
//!
//! **Captured money is never dropped.** A payment processor reports money it has already
//! captured; if Tally cannot credit it by the catalog's rules (an amount outside the
//! top-up limits, a currency other than USD, no or an invalid account), the payment is
//! recorded as an order in `needs_review` with the reason ([`record_captured`]), counted
//! by `tally_topup_needs_review_total` and shown by `tally_topup_orders_needs_review`,
//! and an operator resolves it exactly once ([`resolve`]: credit, or note a refund made
//! outside Tally). For a processor's payment the first record stands: another event of
//! the same payment (a checkout session and its payment intent) is acknowledged, never
//! compared (the amounts legitimately differ by tax), unless it names another account.

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

/// A payment a processor reports as captured, as it reported it (parsed at the edge,
/// not yet checked against the rules).
#[derive(Debug, Clone)]
pub struct CapturedPayment {
    pub order_id: String,
    /// Absent when the payment names no account.
    pub account_id: Option<String>,
    /// ISO 4217 code, lower case.
    pub currency: String,
    /// In the currency's minor unit (cents for USD), > 0.
    pub amount_minor: i64,
    pub source: &'static str,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TopupResult {
    pub order_id: String,
    /// Absent only for an order in review whose payment named no usable account.
    pub account_id: Option<String>,
    /// `pending`, `succeeded`, `failed`, `needs_review` or `refund_noted`.
    pub status: String,
    pub paid_units: i64,
    pub credited_units: i64,
    /// What the processor reported, in its currency's minor unit (absent for operator
    /// top-ups, which are entered in USD).
    pub currency: String,
    pub amount_minor: Option<i64>,
    /// Why the order waits for an operator (set while `needs_review`, kept afterwards).
    pub review_reason: Option<String>,
    /// `credited` or `refund_noted` once an operator resolved a review.
    pub resolution: Option<String>,
    pub resolved_by: Option<String>,
    pub resolution_note: Option<String>,
    /// The entry that credited it (absent while pending, failed or in review).
    pub entry: Option<Posted>,
}

/// What an operator decides for an order in review.
#[derive(Debug, Clone)]
pub enum Resolution {
    /// Credit it: to the order's account, or to `account_id` when the payment named none;
    /// `usd` is the USD amount paid (required when the payment was in another currency;
    /// default: the payment's USD amount). Bonus tiers apply, limits do not.
    Credit { account_id: Option<String>, usd: Option<rust_decimal::Decimal> },
    /// The money was refunded outside Tally (e.g. in Stripe's dashboard): nothing is credited.
    RefundNoted,
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
    Ok(new_result(req, "pending", paid, credited, None))
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
    let credited = match &existing {
        Some(o) if o.status == "needs_review" && o.account_id.is_none() => {
            // A payment recorded before anything named its account (a checkout's payment
            // intent ahead of its session): this request names it, so the rules decide now.
            sqlx::query(
                "UPDATE topup_orders SET account_id = $2, paid_units = $3, credited_units = $4,
                 status = 'pending', updated_at = now() WHERE order_id = $1",
            )
            .bind(&req.order_id)
            .bind(&req.account_id)
            .bind(paid)
            .bind(credited)
            .execute(&mut *tx)
            .await?;
            credited
        }
        Some(o) => {
            match o.status.as_str() {
                "succeeded" | "needs_review" | "refund_noted" => {
                    if o.account_id.as_deref() != Some(req.account_id.as_str()) {
                        return Err(LedgerError::Conflict { key: format!("topup:{}", req.order_id) });
                    }
                    // An operator's order id is theirs: another amount under it is a
                    // conflict. A processor's payment: the first record stands (module doc).
                    if o.status == "succeeded" && req.source == "operator" {
                        check_same(o, req, paid)?;
                    }
                    tx.rollback().await?;
                    return Ok(o.clone());
                }
                "failed" => return Err(LedgerError::InvalidState(format!("order {} failed", req.order_id))),
                _ => check_same(o, req, paid)?,
            }
            // The order keeps the credit computed when it was first recorded (tiers may change).
            o.credited_units
        }
        None => {
            insert_pending(&mut tx, req, paid, credited).await?;
            credited
        }
    };
    let via = format!("top-up {} USD via {}", req.paid_usd, req.source);
    let posted =
        credit_order(&mut tx, &cfg.grants, &req.order_id, &req.account_id, (paid, credited), via, None)
            .await?;
    tx.commit().await?;
    Ok(new_result(req, "succeeded", paid, credited, Some(posted)))
}

/// Why a captured payment cannot be credited by the rules: `Err(reason)`, or the request
/// that credits it.
pub fn check_captured(cfg: &TopupConfig, p: &CapturedPayment) -> Result<TopupRequest, String> {
    let account_id = match &p.account_id {
        None => return Err("missing_account: the payment names no account".into()),
        Some(a) if a.is_empty() || a.len() > crate::event::ID_LEN_MAX => {
            return Err(format!(
                "invalid_account: account id must be 1..={} bytes",
                crate::event::ID_LEN_MAX
            ));
        }
        Some(a) => a.clone(),
    };
    if p.currency != "usd" {
        return Err(format!("unsupported_currency: {} (Tally credits USD only)", p.currency));
    }
    let paid_usd = rust_decimal::Decimal::new(p.amount_minor, 2);
    cfg.credit_for(paid_usd).map_err(|e| format!("outside_topup_rules: {e}"))?;
    Ok(TopupRequest { order_id: p.order_id.clone(), account_id, paid_usd, source: p.source })
}

/// A processor reports money as captured: credit it by the rules, or record it in
/// `needs_review` with the reason. Never refuses the payment itself. Idempotent by order id.
pub async fn record_captured(
    pool: &PgPool,
    cfg: &TopupConfig,
    p: &CapturedPayment,
) -> Result<TopupResult, LedgerError> {
    assert!(p.amount_minor > 0, "the edge refuses non-positive amounts");
    let reason = match check_captured(cfg, p) {
        Ok(req) => return complete(pool, cfg, &req).await,
        Err(reason) => reason,
    };
    // An account is recorded if its id is usable (the order references it).
    let account = p.account_id.as_deref().filter(|a| !a.is_empty() && a.len() <= crate::event::ID_LEN_MAX);
    let mut tx = pool.begin().await?;
    if let Some(a) = account {
        super::lock_balances(&mut tx, &[a]).await?;
    }
    if let Some(o) = load_order(&mut tx, &p.order_id).await? {
        if let (Some(a), Some(b)) = (account, o.account_id.as_deref())
            && a != b
        {
            return Err(LedgerError::Conflict { key: format!("topup:{}", p.order_id) });
        }
        tx.rollback().await?;
        return Ok(o);
    }
    sqlx::query(
        "INSERT INTO topup_orders (order_id, account_id, source, paid_units, credited_units, status,
             currency, amount_minor, review_reason)
         VALUES ($1, $2, $3, 0, 0, 'needs_review', $4, $5, $6)",
    )
    .bind(&p.order_id)
    .bind(account)
    .bind(p.source)
    .bind(&p.currency)
    .bind(p.amount_minor)
    .bind(&reason)
    .execute(&mut *tx)
    .await?;
    let recorded = load_order(&mut tx, &p.order_id).await?.expect("inserted in this transaction");
    tx.commit().await?;
    Ok(recorded)
}

/// An operator resolves an order in review, exactly once: repeating the same resolution
/// returns the order as it is; a different one, or an order not in review, is refused.
pub async fn resolve(
    pool: &PgPool,
    cfg: &TopupConfig,
    order_id: &str,
    resolution: &Resolution,
    by: &str,
    note: &str,
) -> Result<TopupResult, LedgerError> {
    if by.trim().is_empty() || note.trim().is_empty() {
        return Err(LedgerError::Invalid("a resolution needs who (--by) and why (--note)".into()));
    }
    // Lock order is balance, then order: find the account first, then lock both and recheck.
    let peek: Option<(Option<String>,)> =
        sqlx::query_as("SELECT account_id FROM topup_orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(pool)
            .await?;
    let Some((order_account,)) = peek else {
        return Err(LedgerError::NotFound(format!("order {order_id}")));
    };
    let account = match (resolution, &order_account) {
        (Resolution::Credit { account_id: Some(named), .. }, Some(known)) if named != known => {
            return Err(LedgerError::Invalid(format!(
                "order {order_id} belongs to account {known}, not {named}"
            )));
        }
        (Resolution::Credit { account_id, .. }, known) => known.clone().or_else(|| account_id.clone()),
        (Resolution::RefundNoted, known) => known.clone(),
    };
    if let Some(a) = &account
        && (a.is_empty() || a.len() > crate::event::ID_LEN_MAX)
    {
        return Err(LedgerError::Invalid(format!(
            "account id must be 1..={} bytes",
            crate::event::ID_LEN_MAX
        )));
    }
    let mut tx = pool.begin().await?;
    if let Some(a) = &account {
        super::lock_balances(&mut tx, &[a.as_str()]).await?;
    }
    let o = load_order(&mut tx, order_id).await?.expect("orders are never deleted");
    if o.account_id != order_account {
        return Err(LedgerError::InvalidState(format!(
            "order {order_id} changed while resolving; try again"
        )));
    }
    let wanted = match resolution {
        Resolution::Credit { .. } => "credited",
        Resolution::RefundNoted => "refund_noted",
    };
    if o.status != "needs_review" {
        tx.rollback().await?;
        return match o.resolution.as_deref() {
            Some(done) if done == wanted => Ok(o),
            _ => {
                Err(LedgerError::InvalidState(format!("order {order_id} is {}, not needs_review", o.status)))
            }
        };
    }
    match resolution {
        Resolution::RefundNoted => {
            sqlx::query(
                "UPDATE topup_orders SET status = 'refund_noted', resolution = 'refund_noted',
                 resolved_by = $2, resolution_note = $3, resolved_at = now(), updated_at = now()
                 WHERE order_id = $1",
            )
            .bind(order_id)
            .bind(by)
            .bind(note)
            .execute(&mut *tx)
            .await?;
        }
        Resolution::Credit { usd, .. } => {
            let Some(account) = &account else {
                return Err(LedgerError::Invalid(format!(
                    "order {order_id} names no account: give the account to credit (--account)"
                )));
            };
            let paid_usd = match (usd, o.currency.as_str(), o.amount_minor) {
                (Some(usd), ..) => *usd,
                (None, "usd", Some(cents)) => rust_decimal::Decimal::new(cents, 2),
                (None, currency, _) => {
                    return Err(LedgerError::Invalid(format!(
                        "order {order_id} was paid in {currency}: give the USD amount to credit (--usd)"
                    )));
                }
            };
            let (paid, credited) = cfg.credit_with_bonus(paid_usd).map_err(LedgerError::Invalid)?;
            // The amounts first: an order leaves review only with what it paid (CHECK).
            sqlx::query(
                "UPDATE topup_orders SET account_id = $2, paid_units = $3, credited_units = $4,
                 resolution = 'credited', resolved_by = $5, resolution_note = $6, resolved_at = now()
                 WHERE order_id = $1",
            )
            .bind(order_id)
            .bind(account)
            .bind(paid)
            .bind(credited)
            .bind(by)
            .bind(note)
            .execute(&mut *tx)
            .await?;
            let via = format!("top-up {paid_usd} USD via operator review of a {} payment", o.currency);
            credit_order(&mut tx, &cfg.grants, order_id, account, (paid, credited), via, Some(by)).await?;
        }
    }
    let resolved = load_order(&mut tx, order_id).await?.expect("orders are never deleted");
    tx.commit().await?;
    Ok(resolved)
}

/// Orders, newest first: one account's (`account_id`), or the operator's review queue
/// (`status = needs_review` across accounts). At most `limit` (1..=500).
pub async fn list(
    pool: &PgPool,
    account_id: Option<&str>,
    status: Option<&str>,
    limit: i64,
) -> Result<Vec<TopupResult>, LedgerError> {
    let rows: Vec<OrderRow> = sqlx::query_as(&format!(
        "{ORDER_SELECT} WHERE ($1::text IS NULL OR o.account_id = $1) AND ($2::text IS NULL OR o.status = $2)
         ORDER BY o.created_at DESC, o.order_id LIMIT $3"
    ))
    .bind(account_id)
    .bind(status)
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(TopupResult::from).collect())
}

/// One order, as it is now.
pub async fn find(pool: &PgPool, order_id: &str) -> Result<Option<TopupResult>, LedgerError> {
    let row: Option<OrderRow> = sqlx::query_as(&format!("{ORDER_SELECT} WHERE o.order_id = $1"))
        .bind(order_id)
        .fetch_optional(pool)
        .await?;
    Ok(row.map(TopupResult::from))
}

/// Orders waiting for an operator: (count, age of the oldest in seconds). For the gauges.
pub async fn review_backlog(pool: &PgPool) -> Result<(i64, i64), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at))::bigint, 0)
         FROM topup_orders WHERE status = 'needs_review'",
    )
    .fetch_one(pool)
    .await
}

/// Post the order's `topup` entry (key `topup:<order_id>`) and mark it succeeded. The
/// credit becomes a `purchase` grant of what was paid, plus a `bonus` grant of the tier's
/// bonus, each with the catalog's `[grants]` terms.
async fn credit_order(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    policies: &super::grants::GrantPolicies,
    order_id: &str,
    account_id: &str,
    (paid, credited): (i64, i64),
    description: String,
    created_by: Option<&str>,
) -> Result<Posted, LedgerError> {
    let key = format!("topup:{order_id}");
    let hash = hash_payload(&(account_id, paid, credited));
    let posted = post(
        tx,
        Posting {
            account_id,
            kind: "topup",
            amount: Amount::Delta(credited),
            idempotency_key: &key,
            payload_hash: &hash,
            description,
            created_by,
            corrects_entry_id: None,
            metadata: serde_json::json!({"order_id": order_id, "paid_units": paid}),
            grants: topup_grants(policies, paid, credited),
            burn_first: vec![],
        },
    )
    .await?;
    sqlx::query(
        "UPDATE topup_orders SET status = 'succeeded', entry_id = $2, updated_at = now() WHERE order_id = $1",
    )
    .bind(order_id)
    .bind(posted.entry_id)
    .execute(&mut **tx)
    .await?;
    Ok(posted)
}

/// What a processor's refund of a payment did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundOutcome {
    /// No order with that payment id, or one that names no account: nothing was credited.
    UnknownPayment,
    /// The order was never credited (pending, failed, in review): the refunded amount is
    /// recorded on it; nothing to take back.
    NotCredited,
    /// This cumulative refund (or a larger one) was taken back already.
    AlreadyRecorded,
    /// The credits the refunded part bought were debited (`payment_refund`).
    Debited(Posted),
}

/// A processor refunded `refunded_minor_total` (cumulative, in the payment's minor unit:
/// Stripe's `amount_refunded`) of payment `order_id`. The credits that part bought (the
/// same share of the credit, bonus included) are debited once, from that payment's grants
/// first, even into overdraft (the customer may have spent them). Redeliveries and
/// out-of-order events change nothing: only the cumulative total past what was already
/// taken back counts, and the amount is `round(credited x total / paid)` minus what the
/// earlier refunds took, so partial refunds add up to exactly one rounding.
pub async fn refund_payment(
    pool: &PgPool,
    order_id: &str,
    refunded_minor_total: i64,
) -> Result<RefundOutcome, LedgerError> {
    if refunded_minor_total <= 0 {
        return Err(LedgerError::Invalid("a refunded amount is positive".into()));
    }
    let mut tx = pool.begin().await?;
    let account: Option<(Option<String>,)> =
        sqlx::query_as("SELECT account_id FROM topup_orders WHERE order_id = $1")
            .bind(order_id)
            .fetch_optional(&mut *tx)
            .await?;
    let Some((Some(account),)) = account else {
        return Ok(RefundOutcome::UnknownPayment);
    };
    // Lock order: the balance row first, as every writer.
    super::lock_balances(&mut tx, &[account.as_str()]).await?;
    let o = load_order(&mut tx, order_id)
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("top-up order {order_id}")))?;
    let before: i64 = sqlx::query_scalar("SELECT refunded_minor FROM topup_orders WHERE order_id = $1")
        .bind(order_id)
        .fetch_one(&mut *tx)
        .await?;
    let paid_minor = o.paid_units / crate::money::UNITS_PER_CENT;
    if o.status != "succeeded" || paid_minor <= 0 || o.currency != "usd" {
        sqlx::query("UPDATE topup_orders SET refunded_minor = GREATEST(refunded_minor, $2), updated_at = now() WHERE order_id = $1")
            .bind(order_id)
            .bind(refunded_minor_total)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(RefundOutcome::NotCredited);
    }
    let total = refunded_minor_total.min(paid_minor);
    if total <= before {
        return Ok(RefundOutcome::AlreadyRecorded);
    }
    let share = |minor: i64| -> Result<i64, LedgerError> {
        use rust_decimal::Decimal;
        let units = Decimal::from(o.credited_units) * Decimal::from(minor) / Decimal::from(paid_minor);
        i64::try_from(units.round_dp_with_strategy(0, crate::money::ROUNDING))
            .map_err(|_| LedgerError::Invalid("refund out of range".into()))
    };
    let debit = share(total)? - share(before)?;
    let grant_ids: Vec<i64> =
        sqlx::query_scalar("SELECT grant_id FROM credit_grants WHERE entry_id = $1 ORDER BY grant_id")
            .bind(o.entry.as_ref().map(|e| e.entry_id))
            .fetch_all(&mut *tx)
            .await?;
    let key = format!("payment_refund:{order_id}:{total}");
    let hash = hash_payload(&(order_id, total, debit));
    let posted = post(
        &mut tx,
        Posting {
            account_id: &account,
            kind: "payment_refund",
            amount: Amount::Delta(-debit),
            idempotency_key: &key,
            payload_hash: &hash,
            description: format!(
                "payment {order_id} refunded: {} USD of {} USD",
                crate::money::units_to_usd((total - before) * crate::money::UNITS_PER_CENT),
                crate::money::units_to_usd(o.paid_units)
            ),
            created_by: None,
            corrects_entry_id: o.entry.as_ref().map(|e| e.entry_id),
            metadata: serde_json::json!({"order_id": order_id, "refunded_minor": total}),
            grants: vec![],
            burn_first: grant_ids,
        },
    )
    .await?;
    sqlx::query("UPDATE topup_orders SET refunded_minor = $2, updated_at = now() WHERE order_id = $1")
        .bind(order_id)
        .bind(total)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(RefundOutcome::Debited(posted))
}

fn topup_grants(
    policies: &super::grants::GrantPolicies,
    paid: i64,
    credited: i64,
) -> Vec<super::grants::CreditPart> {
    use super::grants::{CreditPart, GrantSource};
    let now = chrono::Utc::now();
    let bonus = credited - paid;
    let mut parts = Vec::with_capacity(2);
    // A paid amount of 0 cannot reach here (credit_for refuses it); keep the parts positive.
    if paid > 0 {
        parts.push(CreditPart { terms: policies.terms(GrantSource::Purchase, now), units: paid });
    }
    if bonus > 0 {
        parts.push(CreditPart { terms: policies.terms(GrantSource::Bonus, now), units: bonus });
    }
    parts
}

/// An order fails when its async payment fails; one in review stays for the operator.
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

fn new_result(
    req: &TopupRequest,
    status: &str,
    paid: i64,
    credited: i64,
    entry: Option<Posted>,
) -> TopupResult {
    TopupResult {
        order_id: req.order_id.clone(),
        account_id: Some(req.account_id.clone()),
        status: status.into(),
        paid_units: paid,
        credited_units: credited,
        currency: "usd".into(),
        amount_minor: None,
        review_reason: None,
        resolution: None,
        resolved_by: None,
        resolution_note: None,
        entry,
    }
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

/// An order with its credit entry, locked for the rest of the transaction.
async fn load_order(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    order_id: &str,
) -> Result<Option<TopupResult>, LedgerError> {
    let row: Option<OrderRow> =
        sqlx::query_as(&format!("{ORDER_SELECT} WHERE o.order_id = $1 FOR UPDATE OF o"))
            .bind(order_id)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(TopupResult::from))
}

/// An order and the entry that credited it, in one read.
const ORDER_SELECT: &str = "SELECT o.order_id, o.account_id, o.status, o.paid_units, o.credited_units,
        o.entry_id, o.currency, o.amount_minor, o.review_reason, o.resolution, o.resolved_by,
        o.resolution_note, e.kind AS entry_kind, e.amount_units AS entry_amount_units,
        e.balance_after_units AS entry_balance_after_units,
        ARRAY(SELECT g.grant_id FROM credit_grants g WHERE g.entry_id = o.entry_id ORDER BY g.grant_id)
            AS entry_grant_ids
    FROM topup_orders o LEFT JOIN ledger_entries e ON e.entry_id = o.entry_id";

#[derive(sqlx::FromRow)]
struct OrderRow {
    order_id: String,
    account_id: Option<String>,
    status: String,
    paid_units: i64,
    credited_units: i64,
    entry_id: Option<i64>,
    currency: String,
    amount_minor: Option<i64>,
    review_reason: Option<String>,
    resolution: Option<String>,
    resolved_by: Option<String>,
    resolution_note: Option<String>,
    entry_kind: Option<String>,
    entry_amount_units: Option<i64>,
    entry_balance_after_units: Option<i64>,
    entry_grant_ids: Vec<i64>,
}

impl From<OrderRow> for TopupResult {
    fn from(r: OrderRow) -> TopupResult {
        let entry = match (
            r.entry_id,
            &r.account_id,
            r.entry_kind,
            r.entry_amount_units,
            r.entry_balance_after_units,
        ) {
            (Some(entry_id), Some(account), Some(kind), Some(amount_units), Some(balance_after_units)) => {
                Some(Posted {
                    entry_id,
                    account_id: account.clone(),
                    kind,
                    amount_units,
                    balance_after_units,
                    grant_ids: r.entry_grant_ids,
                })
            }
            _ => None,
        };
        TopupResult {
            order_id: r.order_id,
            account_id: r.account_id,
            status: r.status,
            paid_units: r.paid_units,
            credited_units: r.credited_units,
            currency: r.currency,
            amount_minor: r.amount_minor,
            review_reason: r.review_reason,
            resolution: r.resolution,
            resolved_by: r.resolved_by,
            resolution_note: r.resolution_note,
            entry,
        }
    }
}

fn check_same(existing: &TopupResult, req: &TopupRequest, paid: i64) -> Result<(), LedgerError> {
    if existing.account_id.as_deref() != Some(req.account_id.as_str()) || existing.paid_units != paid {
        return Err(LedgerError::Conflict { key: format!("topup:{}", req.order_id) });
    }
    Ok(())
}
