//! Deductions: debits a gateway reports by amount (Reeve's `POST /api/credits/deduct` and
//! its batch form), beside the priced usage events of the pipeline.
//!
//! - Each deduction is a `consume` entry, like a priced usage event: it *is* usage, only
//!   priced by the caller.
//! - **Idempotent per account and key.** The caller's key is scoped to the account (the
//!   ledger key is `deduct:` + SHA-256(account, key)), so two tenants never collide and a
//!   409 never reveals another tenant's key. Same key and payload: the original entry is
//!   returned (`replayed`); same key, other payload: [`LedgerError::Conflict`].
//! - **A deduction may take the balance below zero.** The usage it reports already
//!   happened; refusing it would lose revenue without undoing the call. Gateways that must
//!   not overspend reserve first (`ledger::reservations`) or ask `POST /v1/authorize`.
//! - **Batch**: up to [`BATCH_ITEMS_MAX`] in one transaction, with a result per item (a
//!   conflicting key fails its item only). Keys are claimed in sorted order and balance rows
//!   locked in account-id order, as every other writer does, so concurrent batches cannot
//!   deadlock.

use super::ops::{Amount, LedgerError, Posted, Posting, claim, claim_many, finish, hash_payload, post};
use super::{EntryRows, NewEntry, lock_balances, store_balances};
use chrono::Utc;
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{BTreeSet, HashMap};

/// Most deductions in one batch: one transaction's worth (1,000 entries insert in one
/// statement, as the pipeline's batches do).
pub const BATCH_ITEMS_MAX: usize = 1000;

/// Largest single deduction: $1,000,000. Far above any one call; a bound on what a
/// mistaken or hostile gateway can take in one request.
pub const DEDUCTION_UNITS_MAX: i64 = 1_000_000 * crate::money::UNITS_PER_USD;

/// Longest client idempotency key (as the event's ids).
pub const KEY_LEN_MAX: usize = crate::event::ID_LEN_MAX;

/// Longest description kept on the entry.
pub const DESCRIPTION_LEN_MAX: usize = 500;

const OPERATION: &str = "deduct";

/// One deduction.
#[derive(Debug, Clone)]
pub struct DeductionRequest {
    pub account_id: String,
    /// Positive: how much to take.
    pub amount_units: i64,
    /// The caller's idempotency key, scoped to the account.
    pub idempotency_key: String,
    pub description: String,
    /// Who reported it (the API token id); recorded, not part of the idempotent payload,
    /// so a retry through another token of the same gateway is still a replay.
    pub created_by: Option<String>,
}

/// A deduction's entry, and whether it was recorded by an earlier call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Deducted {
    pub entry: Posted,
    pub replayed: bool,
}

/// What makes two calls with one key the same call.
#[derive(Serialize)]
struct Payload<'a> {
    account_id: &'a str,
    amount_units: i64,
    description: &'a str,
}

impl DeductionRequest {
    fn validate(&self) -> Result<(), LedgerError> {
        let bad = |m: String| Err(LedgerError::Invalid(m));
        if self.account_id.is_empty() || self.account_id.len() > crate::event::ID_LEN_MAX {
            return bad("account id must be 1..=128 bytes".into());
        }
        if self.idempotency_key.is_empty() || self.idempotency_key.len() > KEY_LEN_MAX {
            return bad(format!("idempotency key must be 1..={KEY_LEN_MAX} bytes"));
        }
        if self.amount_units <= 0 || self.amount_units > DEDUCTION_UNITS_MAX {
            return bad(format!(
                "amount must be within 1..={DEDUCTION_UNITS_MAX} units, got {}",
                self.amount_units
            ));
        }
        if self.description.len() > DESCRIPTION_LEN_MAX {
            return bad(format!("description must be at most {DESCRIPTION_LEN_MAX} bytes"));
        }
        Ok(())
    }

    /// The ledger's key: scoped to the account, fixed length (fits the 200-byte column
    /// whatever the lengths of account and key).
    fn ledger_key(&self) -> String {
        let mut h = Sha256::new();
        h.update((self.account_id.len() as u64).to_be_bytes());
        h.update(self.account_id.as_bytes());
        h.update(self.idempotency_key.as_bytes());
        format!("deduct:{}", hex::encode(h.finalize()))
    }

    fn hash(&self) -> [u8; 32] {
        hash_payload(&Payload {
            account_id: &self.account_id,
            amount_units: self.amount_units,
            description: &self.description,
        })
    }

    fn metadata(&self) -> serde_json::Value {
        serde_json::json!({"source": "deduction", "idempotency_key": self.idempotency_key})
    }
}

/// One deduction, idempotent by (account, key).
pub async fn deduct(pool: &PgPool, req: &DeductionRequest) -> Result<Deducted, LedgerError> {
    req.validate()?;
    let key = req.ledger_key();
    let hash = req.hash();
    let mut tx = pool.begin().await?;
    let claimed = claim::<Posted>(&mut tx, &key, OPERATION, &hash).await.map_err(|e| match e {
        // Name the caller's key, not the ledger's hash of it.
        LedgerError::Conflict { .. } => LedgerError::Conflict { key: req.idempotency_key.clone() },
        other => other,
    })?;
    if let Some(saved) = claimed {
        return Ok(Deducted { entry: saved, replayed: true });
    }
    let posted = post(
        &mut tx,
        Posting {
            account_id: &req.account_id,
            kind: "consume",
            amount: Amount::Delta(-req.amount_units),
            idempotency_key: &key,
            payload_hash: &hash,
            description: req.description.clone(),
            created_by: req.created_by.as_deref(),
            corrects_entry_id: None,
            metadata: req.metadata(),
            grants: vec![],
            burn_first: vec![],
        },
    )
    .await?;
    let spend = [(req.account_id.as_str(), req.amount_units)];
    super::counting::count_deductions(&mut tx, &spend, Utc::now()).await?;
    finish(&mut tx, &key, &posted).await?;
    tx.commit().await?;
    Ok(Deducted { entry: posted, replayed: false })
}

/// Where each item of a batch stands while the batch is worked out.
enum Slot {
    Done(Result<Deducted, LedgerError>),
    /// First use of its key in this batch; to be claimed. `key` is the ledger's key.
    Claim {
        key: String,
        hash: [u8; 32],
    },
    /// Same key as item `first` earlier in the batch, same payload: its outcome, replayed.
    SameAs(usize),
}

/// Many deductions in one transaction; one result per item, in order. Fails as a whole
/// only for a database error or a batch over [`BATCH_ITEMS_MAX`].
pub async fn deduct_batch(
    pool: &PgPool,
    reqs: &[DeductionRequest],
) -> Result<Vec<Result<Deducted, LedgerError>>, LedgerError> {
    if reqs.len() > BATCH_ITEMS_MAX {
        return Err(LedgerError::Invalid(format!("at most {BATCH_ITEMS_MAX} deductions per batch")));
    }
    let mut slots = plan(reqs);
    let mut tx = pool.begin().await?;
    let fresh = claim_all(&mut tx, reqs, &mut slots).await?;
    if !fresh.is_empty() {
        let posted = post_all(&mut tx, reqs, &slots, &fresh).await?;
        for (i, p) in fresh.iter().zip(posted) {
            slots[*i] = Slot::Done(Ok(Deducted { entry: p, replayed: false }));
        }
    }
    tx.commit().await?;
    Ok(resolve(slots))
}

/// Validate items and pair up repeated keys inside the batch.
fn plan(reqs: &[DeductionRequest]) -> Vec<Slot> {
    let mut first_of: HashMap<String, (usize, [u8; 32])> = HashMap::new();
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            if let Err(e) = r.validate() {
                return Slot::Done(Err(e));
            }
            let (key, hash) = (r.ledger_key(), r.hash());
            match first_of.get(&key) {
                Some((first, h)) if *h == hash => Slot::SameAs(*first),
                Some(_) => Slot::Done(Err(LedgerError::Conflict { key: r.idempotency_key.clone() })),
                None => {
                    first_of.insert(key.clone(), (i, hash));
                    Slot::Claim { key, hash }
                }
            }
        })
        .collect()
}

/// Claim every new key in one statement (sorted, so concurrent batches wait on each other
/// in one order); settle replays and conflicts. Returns the items to post.
async fn claim_all(
    tx: &mut Transaction<'_, Postgres>,
    reqs: &[DeductionRequest],
    slots: &mut [Slot],
) -> Result<Vec<usize>, LedgerError> {
    let claims: Vec<(&str, &[u8; 32])> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Claim { key, hash } => Some((key.as_str(), hash)),
            _ => None,
        })
        .collect();
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let mut found = claim_many::<Posted>(tx, OPERATION, &claims).await?;
    let mut fresh = Vec::new();
    for (i, slot) in slots.iter_mut().enumerate() {
        let Slot::Claim { key, .. } = slot else { continue };
        let outcome = match found.remove(key.as_str()) {
            Some(Ok(None)) => {
                fresh.push(i);
                continue;
            }
            Some(Ok(Some(entry))) => Ok(Deducted { entry, replayed: true }),
            // Name the caller's key, not the ledger's hash of it.
            Some(Err(LedgerError::Conflict { .. })) => {
                Err(LedgerError::Conflict { key: reqs[i].idempotency_key.clone() })
            }
            Some(Err(e)) => Err(e),
            None => Err(LedgerError::InvalidState(format!("{key} neither claimed nor stored"))),
        };
        *slot = Slot::Done(outcome);
    }
    Ok(fresh)
}

/// Post the claimed items: lock their accounts in id order, append the entries in request
/// order with running balances, update the projection, store each result under its key.
async fn post_all(
    tx: &mut Transaction<'_, Postgres>,
    reqs: &[DeductionRequest],
    slots: &[Slot],
    fresh: &[usize],
) -> Result<Vec<Posted>, LedgerError> {
    let accounts: BTreeSet<&str> = fresh.iter().map(|i| reqs[*i].account_id.as_str()).collect();
    let accounts: Vec<&str> = accounts.into_iter().collect();
    let mut balances = lock_balances(tx, &accounts).await?;
    let mut wallets = super::grants::load_wallets(tx, &balances).await?;
    let now = Utc::now();
    let mut rows = EntryRows::default();
    let mut posted = Vec::with_capacity(fresh.len());
    for &i in fresh {
        let (r, Slot::Claim { key, hash }) = (&reqs[i], &slots[i]) else {
            unreachable!("fresh items are claimed slots");
        };
        let balance = balances.get_mut(r.account_id.as_str()).expect("every fresh account is locked");
        *balance = balance
            .checked_sub(r.amount_units)
            .ok_or_else(|| LedgerError::Invalid("balance out of range".into()))?;
        let grant_changes = if r.amount_units > 0 {
            super::grants::debit(&mut wallets, &r.account_id, r.amount_units, now)?
        } else {
            None
        };
        rows.push(NewEntry {
            account_id: &r.account_id,
            kind: "consume",
            amount_units: -r.amount_units,
            balance_after_units: *balance,
            idempotency_key: key.clone(),
            payload_hash: hash,
            event_id: None,
            occurred_at: now,
            description: r.description.clone(),
            created_by: r.created_by.as_deref(),
            corrects_entry_id: None,
            metadata: r.metadata(),
            grant_changes,
        });
        posted.push(Posted {
            entry_id: 0, // set below from the inserted rows
            account_id: r.account_id.clone(),
            kind: "consume".into(),
            amount_units: -r.amount_units,
            balance_after_units: *balance,
            grant_ids: vec![],
        });
    }
    let last = rows.insert(tx).await?;
    super::grants::store_wallets(tx, &wallets).await?;
    let keys: Vec<String> = fresh.iter().map(|i| reqs[*i].ledger_key()).collect();
    let ids: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT idempotency_key, entry_id FROM ledger_entries WHERE idempotency_key = ANY($1)",
    )
    .bind(&keys)
    .fetch_all(&mut **tx)
    .await?
    .into_iter()
    .collect();
    for (p, key) in posted.iter_mut().zip(&keys) {
        p.entry_id = ids[key];
    }
    let usage_at: HashMap<&str, chrono::DateTime<Utc>> = balances.keys().map(|a| (*a, now)).collect();
    store_balances(tx, &balances, &last, None, &usage_at).await?;
    super::auto_reload::check(tx, &balances).await?;
    let spend: Vec<(&str, i64)> =
        fresh.iter().map(|i| (reqs[*i].account_id.as_str(), reqs[*i].amount_units)).collect();
    super::counting::count_deductions(tx, &spend, now).await?;
    finish_all(tx, &keys, &posted).await?;
    Ok(posted)
}

/// Store every posted result under its key, in one statement.
async fn finish_all(
    tx: &mut Transaction<'_, Postgres>,
    keys: &[String],
    posted: &[Posted],
) -> Result<(), LedgerError> {
    let results: Vec<serde_json::Value> =
        posted.iter().map(|p| serde_json::to_value(p).expect("results serialize")).collect();
    sqlx::query(
        "UPDATE idempotency_records r SET result = u.res
         FROM UNNEST($1::text[], $2::jsonb[]) AS u(k, res) WHERE r.idempotency_key = u.k",
    )
    .bind(keys)
    .bind(&results)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Every slot is settled now except repeats inside the batch: they take their first's
/// outcome, as a replay.
fn resolve(slots: Vec<Slot>) -> Vec<Result<Deducted, LedgerError>> {
    let mut out: Vec<Option<Result<Deducted, LedgerError>>> = Vec::with_capacity(slots.len());
    for slot in slots {
        let outcome = match slot {
            Slot::Done(o) => o,
            Slot::SameAs(first) => match &out[first] {
                Some(Ok(d)) => Ok(Deducted { entry: d.entry.clone(), replayed: true }),
                Some(Err(LedgerError::Conflict { key })) => Err(LedgerError::Conflict { key: key.clone() }),
                Some(Err(e)) => Err(LedgerError::InvalidState(format!("same key as item {first}: {e}"))),
                None => unreachable!("a repeat comes after its first"),
            },
            Slot::Claim { .. } => unreachable!("every claimed slot was posted or settled"),
        };
        out.push(Some(outcome));
    }
    out.into_iter().map(|o| o.expect("filled above")).collect()
}
