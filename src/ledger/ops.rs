//! Idempotent money operations: top-ups, refunds, additions, adjustments, plan
//! allocations and resets, corrections.
//!
//! Every operation carries an idempotency key. In one transaction it first claims the key
//! in `idempotency_records`: if the key is new, the operation runs and its result is
//! stored with the key; if the key exists with the same payload hash, the stored result is
//! returned unchanged (a replay); with a different payload it fails with
//! [`LedgerError::Conflict`]. Concurrent calls with one key serialize on the key's unique
//! index, so exactly one of them does the work.

use super::{EntryRows, NewEntry, grants, lock_balances, store_balances};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("idempotency key {key} was already used with a different payload")]
    Conflict { key: String },
    #[error("insufficient funds: effective balance {effective_units} units, {requested_units} requested")]
    InsufficientFunds { effective_units: i64, requested_units: i64 },
    #[error("{0} not found")]
    NotFound(String),
    #[error("invalid state: {0}")]
    InvalidState(String),
    #[error("invalid request: {0}")]
    Invalid(String),
    #[error("not allowed: {0}")]
    NotAllowed(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

/// SHA-256 of a payload's JSON (the struct's field order makes it canonical).
pub fn hash_payload<T: Serialize>(payload: &T) -> [u8; 32] {
    let json = serde_json::to_vec(payload).expect("operation payloads serialize");
    Sha256::digest(&json).into()
}

/// Claim `key` for `operation`. `Some(result)` means it was done before: return it.
pub(crate) async fn claim<R: DeserializeOwned>(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    operation: &str,
    hash: &[u8; 32],
) -> Result<Option<R>, LedgerError> {
    if key.is_empty() || key.len() > 200 {
        return Err(LedgerError::Invalid("idempotency key must be 1..=200 bytes".into()));
    }
    let inserted = sqlx::query(
        "INSERT INTO idempotency_records (idempotency_key, operation, payload_hash, result)
         VALUES ($1, $2, $3, 'null'::jsonb) ON CONFLICT DO NOTHING",
    )
    .bind(key)
    .bind(operation)
    .bind(&hash[..])
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if inserted == 1 {
        return Ok(None);
    }
    let (op, stored_hash, result): (String, Vec<u8>, serde_json::Value) = sqlx::query_as(
        "SELECT operation, payload_hash, result FROM idempotency_records WHERE idempotency_key = $1",
    )
    .bind(key)
    .fetch_one(&mut **tx)
    .await?;
    if op != operation || stored_hash[..] != hash[..] {
        return Err(LedgerError::Conflict { key: key.to_string() });
    }
    let saved = serde_json::from_value(result)
        .map_err(|e| LedgerError::InvalidState(format!("stored result of {key} unreadable: {e}")))?;
    Ok(Some(saved))
}

/// Store the result of a claimed key (same transaction as the work).
pub(crate) async fn finish<R: Serialize>(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    result: &R,
) -> Result<(), LedgerError> {
    let json = serde_json::to_value(result).expect("results serialize");
    sqlx::query("UPDATE idempotency_records SET result = $2 WHERE idempotency_key = $1")
        .bind(key)
        .bind(json)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Claim many keys for `operation` in one statement, in key order (so concurrent batches
/// wait on each other in one order). Per key: `Ok(None)` claimed now (do the work, then
/// store its result), `Ok(Some(result))` done before with the same payload,
/// `Err(Conflict)` (named by the ledger key) done before with another payload or operation.
pub(crate) async fn claim_many<R: DeserializeOwned>(
    tx: &mut Transaction<'_, Postgres>,
    operation: &str,
    claims: &[(&str, &[u8; 32])],
) -> Result<HashMap<String, Result<Option<R>, LedgerError>>, LedgerError> {
    let mut claims = claims.to_vec();
    claims.sort_unstable();
    let keys: Vec<&str> = claims.iter().map(|c| c.0).collect();
    let hashes: Vec<&[u8]> = claims.iter().map(|c| &c.1[..]).collect();
    if keys.is_empty() {
        return Ok(HashMap::new());
    }
    let inserted: Vec<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_records (idempotency_key, operation, payload_hash, result)
         SELECT k, $3, h, 'null'::jsonb FROM UNNEST($1::text[], $2::bytea[]) AS u(k, h)
         ORDER BY k
         ON CONFLICT DO NOTHING RETURNING idempotency_key",
    )
    .bind(&keys)
    .bind(&hashes)
    .bind(operation)
    .fetch_all(&mut **tx)
    .await?;
    let mut found: HashMap<String, Result<Option<R>, LedgerError>> =
        inserted.into_iter().map(|k| (k, Ok(None))).collect();
    let seen: Vec<&str> = keys.iter().copied().filter(|k| !found.contains_key(*k)).collect();
    if seen.is_empty() {
        return Ok(found);
    }
    let hash_of: HashMap<&str, &[u8; 32]> = claims.iter().copied().collect();
    let rows: Vec<(String, String, Vec<u8>, serde_json::Value)> = sqlx::query_as(
        "SELECT idempotency_key, operation, payload_hash, result FROM idempotency_records
         WHERE idempotency_key = ANY($1)",
    )
    .bind(&seen)
    .fetch_all(&mut **tx)
    .await?;
    for (key, op, stored_hash, result) in rows {
        let outcome = if op != operation || hash_of.get(key.as_str()).is_none_or(|h| stored_hash[..] != h[..])
        {
            Err(LedgerError::Conflict { key: key.clone() })
        } else {
            serde_json::from_value(result)
                .map(Some)
                .map_err(|e| LedgerError::InvalidState(format!("stored result of {key} unreadable: {e}")))
        };
        found.insert(key, outcome);
    }
    Ok(found)
}

/// A posted journal entry, as returned to callers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Posted {
    pub entry_id: i64,
    pub account_id: String,
    pub kind: String,
    pub amount_units: i64,
    pub balance_after_units: i64,
    /// Grants this entry created (a credit; see `ledger::grants`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grant_ids: Vec<i64>,
}

/// What to post: one entry on one account.
pub(crate) struct Posting<'a> {
    pub account_id: &'a str,
    pub kind: &'static str,
    /// Signed amount, or a function of the current balance (for "set balance to X" and
    /// plan resets, computed under the row lock).
    pub amount: Amount,
    pub idempotency_key: &'a str,
    pub payload_hash: &'a [u8; 32],
    pub description: String,
    pub created_by: Option<&'a str>,
    pub corrects_entry_id: Option<i64>,
    pub metadata: serde_json::Value,
    /// A credit's grants (their units sum to the amount). Empty: one grant of the source
    /// the entry's kind implies, with that source's default terms (no expiry).
    pub grants: Vec<super::grants::CreditPart>,
    /// A debit's grants to burn before the burn order (a payment refund takes back what
    /// that payment bought). Usually empty.
    pub burn_first: Vec<i64>,
}

#[derive(Clone, Copy)]
pub(crate) enum Amount {
    Delta(i64),
    SetBalanceTo(i64),
    /// Lower the balance to this if it is above (a downgrade caps remaining credits);
    /// otherwise a zero entry records that nothing changed.
    CapBalanceAt(i64),
    /// A plan cycle's reset, no rollover: every grant ends, an overdraft is forgiven, and
    /// the balance becomes this as one new allocation grant.
    ResetTo(i64),
}

/// Lock the account's balance, append one entry, update the projection, run the
/// auto-reload check. Inside the caller's transaction.
pub(crate) async fn post(tx: &mut Transaction<'_, Postgres>, p: Posting<'_>) -> Result<Posted, LedgerError> {
    post_at(tx, p, Utc::now()).await
}

/// [`post`] with the entry's `occurred_at` given: a correction dated in the period it
/// corrects (re-rating), rather than when it was recorded (`recorded_at`).
pub(crate) async fn post_at(
    tx: &mut Transaction<'_, Postgres>,
    p: Posting<'_>,
    occurred_at: DateTime<Utc>,
) -> Result<Posted, LedgerError> {
    let mut balances = lock_balances(tx, &[p.account_id]).await?;
    let mut wallets = grants::load_wallets(tx, &balances).await?;
    let before = balances[p.account_id];
    let amount = match p.amount {
        Amount::Delta(d) => d,
        Amount::SetBalanceTo(target) | Amount::ResetTo(target) => target
            .checked_sub(before)
            .ok_or_else(|| LedgerError::Invalid("balance change out of range".into()))?,
        Amount::CapBalanceAt(cap) => cap.saturating_sub(before).min(0),
    };
    let after =
        before.checked_add(amount).ok_or_else(|| LedgerError::Invalid("balance out of range".into()))?;
    balances.insert(p.account_id, after);
    // A credit creates its grants (repaying any overdraft first); a debit burns grants.
    let reset_to = match p.amount {
        Amount::ResetTo(target) => Some(target),
        _ => None,
    };
    // A credit: what it gives back to existing grants (a refund of an entry) or clears (a
    // plan reset), then the new grants of the rest, from `p.grants` or the kind's source.
    let credit = match (reset_to, amount.signum()) {
        // A plan cycle's reset, no rollover: every grant ends (an overdraft is forgiven)
        // and the new allocation is one grant of exactly the target.
        (Some(target), _) => {
            Some((grants::reset(&mut wallets, p.account_id), target, grants::GrantSource::PlanAllocation))
        }
        // A positive correction of an entry refunds it: back into the grants that paid it
        // first (while they can still be spent), the rest as a new grant.
        (None, 1) => {
            let (changes, rest) = match p.corrects_entry_id {
                Some(entry) if p.kind == "correction" && p.grants.is_empty() => {
                    grants::give_back(tx, &mut wallets, p.account_id, entry, amount, Utc::now()).await?
                }
                _ => (grants::GrantChanges::new(), amount),
            };
            Some((changes, rest, grants::GrantSource::for_entry_kind(p.kind)))
        }
        _ => None,
    };
    let (grant_changes, grant_ids) = match (credit, amount.signum()) {
        (Some((mut changes, rest, source)), _) => {
            let parts = if !p.grants.is_empty() {
                p.grants
            } else if rest > 0 {
                let terms = grants::GrantPolicies::default().terms(source, Utc::now());
                vec![grants::CreditPart { terms, units: rest }]
            } else {
                vec![]
            };
            if parts.iter().map(|g| g.units).sum::<i64>() != rest || parts.iter().any(|g| g.units <= 0) {
                return Err(LedgerError::InvalidState("a credit's grants must sum to its amount".into()));
            }
            let (created, ids) = grants::credit(
                tx,
                &mut wallets,
                p.account_id,
                &parts,
                occurred_at,
                &p.description,
                p.created_by,
            )
            .await?;
            changes.extend(created);
            (grants::changes_json(&changes), ids)
        }
        (None, -1) => {
            (grants::debit_from(&mut wallets, p.account_id, &p.burn_first, -amount, occurred_at)?, vec![])
        }
        (None, _) => (None, vec![]),
    };
    assert_eq!(
        wallets[p.account_id].balance_units(),
        after,
        "balance == grants - overdraft after every entry"
    );
    let mut rows = EntryRows::default();
    rows.push(NewEntry {
        account_id: p.account_id,
        kind: p.kind,
        amount_units: amount,
        balance_after_units: after,
        idempotency_key: p.idempotency_key.to_string(),
        payload_hash: p.payload_hash,
        event_id: None,
        occurred_at,
        description: p.description,
        created_by: p.created_by,
        corrects_entry_id: p.corrects_entry_id,
        metadata: p.metadata,
        grant_changes,
    });
    let last = rows.insert(tx).await?;
    let entry_id = last[p.account_id].last_entry_id;
    grants::link_entry(tx, &grant_ids, entry_id).await?;
    grants::store_wallets(tx, &wallets).await?;
    let purchase_at = (p.kind == "topup").then(Utc::now);
    // Only a billed hold is usage; a negative adjustment or a downgrade cap is no deduction.
    let usage_at: HashMap<&str, DateTime<Utc>> = if p.kind == "reservation_settle" {
        HashMap::from([(p.account_id, Utc::now())])
    } else {
        HashMap::new()
    };
    store_balances(tx, &balances, &last, purchase_at, &usage_at).await?;
    super::auto_reload::check(tx, &HashMap::from([(p.account_id, after)])).await?;
    Ok(Posted {
        entry_id,
        account_id: p.account_id.to_string(),
        kind: p.kind.to_string(),
        amount_units: amount,
        balance_after_units: after,
        grant_ids,
    })
}

/// Manual operations an operator or admin performs.
#[derive(Debug, Clone, Serialize)]
pub struct ManualRequest {
    pub account_id: String,
    pub idempotency_key: String,
    pub kind: ManualKind,
    /// Who did it (recorded on the entry).
    pub created_by: String,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "snake_case", tag = "type", content = "units")]
pub enum ManualKind {
    /// Credit (Struere `addition`): positive units.
    Addition(i64),
    /// Refund (Brievio `refund`): positive units.
    Refund(i64),
    /// Correction (Brievio `manual_adjust`, Struere `adjustment`): signed units.
    AdjustBy(i64),
    /// "Set the balance to X" (Struere): the difference is computed under the lock.
    SetBalanceTo(i64),
    /// Plan allocation (BroomVA): credits the period's allocation.
    PlanAllocation(i64),
    /// Period reset without rollover (BroomVA): balance becomes the allocation.
    PlanReset(i64),
    /// Correction of a specific entry: signed units.
    Correction { entry_id: i64, units: i64 },
}

pub async fn manual(pool: &PgPool, req: &ManualRequest) -> Result<Posted, LedgerError> {
    let hash = hash_payload(req);
    let mut tx = pool.begin().await?;
    if let Some(saved) = claim::<Posted>(&mut tx, &req.idempotency_key, "manual", &hash).await? {
        return Ok(saved);
    }
    let (kind, amount, corrects) = match req.kind {
        ManualKind::Addition(u) => ("addition", Amount::Delta(positive(u)?), None),
        ManualKind::Refund(u) => ("refund", Amount::Delta(positive(u)?), None),
        ManualKind::AdjustBy(u) => ("adjustment", Amount::Delta(u), None),
        ManualKind::SetBalanceTo(u) => ("adjustment", Amount::SetBalanceTo(u), None),
        ManualKind::PlanAllocation(u) => ("plan_allocation", Amount::Delta(positive(u)?), None),
        ManualKind::PlanReset(u) => ("plan_reset", Amount::ResetTo(non_negative(u)?), None),
        ManualKind::Correction { entry_id, units } => {
            check_corrected_entry(&mut tx, entry_id, &req.account_id).await?;
            ("correction", Amount::Delta(units), Some(entry_id))
        }
    };
    let posted = post(
        &mut tx,
        Posting {
            account_id: &req.account_id,
            kind,
            amount,
            idempotency_key: &req.idempotency_key,
            payload_hash: &hash,
            description: req.reason.clone(),
            created_by: Some(&req.created_by),
            corrects_entry_id: corrects,
            metadata: serde_json::json!({}),
            grants: vec![],
            burn_first: vec![],
        },
    )
    .await?;
    finish(&mut tx, &req.idempotency_key, &posted).await?;
    tx.commit().await?;
    Ok(posted)
}

fn positive(u: i64) -> Result<i64, LedgerError> {
    if u > 0 { Ok(u) } else { Err(LedgerError::Invalid(format!("amount must be positive, got {u} units"))) }
}

fn non_negative(u: i64) -> Result<i64, LedgerError> {
    if u >= 0 {
        Ok(u)
    } else {
        Err(LedgerError::Invalid(format!("amount must not be negative, got {u} units")))
    }
}

async fn check_corrected_entry(
    tx: &mut Transaction<'_, Postgres>,
    entry_id: i64,
    account_id: &str,
) -> Result<(), LedgerError> {
    let row: Option<(String,)> = sqlx::query_as("SELECT account_id FROM ledger_entries WHERE entry_id = $1")
        .bind(entry_id)
        .fetch_optional(&mut **tx)
        .await?;
    match row {
        None => Err(LedgerError::NotFound(format!("entry {entry_id}"))),
        Some((a,)) if a != account_id => {
            Err(LedgerError::Invalid(format!("entry {entry_id} belongs to another account")))
        }
        Some(_) => Ok(()),
    }
}

/// One page of an account's journal, newest first.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct HistoryEntry {
    pub entry_id: i64,
    pub kind: String,
    pub amount_units: i64,
    pub balance_after_units: i64,
    pub description: String,
    pub event_id: Option<String>,
    pub created_by: Option<String>,
    pub corrects_entry_id: Option<i64>,
    pub occurred_at: DateTime<Utc>,
    pub recorded_at: DateTime<Utc>,
    /// Which credit grants the entry changed: `[[grant_id, delta_units], ...]` (a debit's
    /// burns are negative; a credit's new grants positive); null when none.
    pub grant_changes: Option<sqlx::types::Json<Vec<(i64, i64)>>>,
}

/// Entries with `entry_id < before` (or the newest), at most `limit` (1..=1000).
pub async fn history(
    pool: &PgPool,
    account_id: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<HistoryEntry>, LedgerError> {
    let limit = limit.clamp(1, 1000);
    let rows = sqlx::query_as::<_, HistoryEntry>(
        "SELECT entry_id, kind, amount_units, balance_after_units, description, event_id, created_by,
                corrects_entry_id, occurred_at, recorded_at, grant_changes
         FROM ledger_entries WHERE account_id = $1 AND entry_id < $2
         ORDER BY entry_id DESC LIMIT $3",
    )
    .bind(account_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
