//! `tally ledger verify`: prove balances are derivable from the journal alone.
//!
//! Checks, per account, walking entries in `entry_id` order:
//! 1. `balance_after_units` of each entry = previous balance_after + amount
//!    (the first entry starts from 0);
//! 2. the projection `account_balances.balance_units` = sum of amounts = last balance_after;
//! 3. no projection exists without entries unless it is 0, and each projection's
//!    `entry_count` is the number of the account's entries (the balance endpoint shows it);
//! 4. every credit grant's `remaining_units` = the sum of its journal `grant_changes`
//!    (plus a legacy grant's opening amount), and no account's grants hold less than its
//!    balance (the overdraft is never negative): see `ledger::grants`;
//! 5. usage entries (the pipeline's, which carry an `event_id`) are unique per event and
//!    each event is in the dedup store: their keys have no unique index of their own
//!    (Postgres migration 0012), so this check stands in for one.
//!
//! Streams the journal (never loads it whole) and stops at the first inconsistency.

use futures::TryStreamExt;
use sqlx::PgPool;
use std::collections::HashMap;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    pub accounts: u64,
    pub entries: u64,
    pub total_units: i64,
    pub grants: u64,
    /// Accounts whose grants hold more than their balance (usage on credit, repaid by the
    /// next grant).
    pub overdrawn_accounts: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("entry {entry_id} of account {account_id}: balance_after_units {found}, expected {expected}")]
    BrokenChain { account_id: String, entry_id: i64, expected: i64, found: i64 },
    #[error("account {account_id}: projection balance {projection}, journal says {journal}")]
    ProjectionMismatch { account_id: String, projection: i64, journal: i64 },
    #[error("account {account_id}: projection counts {projection} entries, the journal has {journal}")]
    EntryCountMismatch { account_id: String, projection: i64, journal: i64 },
    #[error("event {event_id}: {problem}")]
    UsageEntry { event_id: String, problem: &'static str },
    #[error("credit grants: {0}")]
    Grants(String),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
}

pub async fn verify(pool: &PgPool) -> Result<VerifyReport, VerifyError> {
    let mut running: HashMap<String, i64> = HashMap::new();
    let mut counts: HashMap<String, i64> = HashMap::new();
    let mut entries: u64 = 0;
    let mut rows = sqlx::query_as::<_, (i64, String, i64, i64)>(
        "SELECT entry_id, account_id, amount_units, balance_after_units
         FROM ledger_entries ORDER BY entry_id",
    )
    .fetch(pool);
    while let Some((entry_id, account_id, amount, after)) = rows.try_next().await? {
        let prev = running.get(&account_id).copied().unwrap_or(0);
        let expected = prev.checked_add(amount).unwrap_or(i64::MIN);
        if after != expected {
            return Err(VerifyError::BrokenChain { account_id, entry_id, expected, found: after });
        }
        *counts.entry(account_id.clone()).or_insert(0) += 1;
        running.insert(account_id, after);
        entries += 1;
    }
    drop(rows);
    let projections: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT account_id, balance_units, entry_count FROM account_balances ORDER BY account_id",
    )
    .fetch_all(pool)
    .await?;
    let mut accounts = 0u64;
    let mut count_mismatch = None;
    for (account_id, projection, entry_count) in projections {
        let journal = running.get(&account_id).copied().unwrap_or(0);
        if journal != projection {
            return Err(VerifyError::ProjectionMismatch { account_id, projection, journal });
        }
        let journal_count = counts.get(&account_id).copied().unwrap_or(0);
        if journal_count != entry_count && count_mismatch.is_none() {
            count_mismatch = Some(VerifyError::EntryCountMismatch {
                account_id,
                projection: entry_count,
                journal: journal_count,
            });
        }
        accounts += 1;
    }
    // An account with entries but no projection row is also a mismatch.
    for (account_id, journal) in &running {
        let exists: Option<(i64,)> =
            sqlx::query_as("SELECT balance_units FROM account_balances WHERE account_id = $1")
                .bind(account_id)
                .fetch_optional(pool)
                .await?;
        if exists.is_none() {
            return Err(VerifyError::ProjectionMismatch {
                account_id: account_id.clone(),
                projection: 0,
                journal: *journal,
            });
        }
    }
    verify_usage_entries(pool).await?;
    // After the usage check: an entry planted by hand is reported as what it is (a second
    // usage entry for one event) rather than as the count it also breaks.
    if let Some(e) = count_mismatch {
        return Err(e);
    }
    // Saturating: a sum of many extreme balances must not panic the check itself.
    let total_units = running.values().fold(0i64, |acc, b| acc.saturating_add(*b));
    let g = super::grants::verify_grants(pool).await.map_err(VerifyError::Grants)?;
    Ok(VerifyReport {
        accounts,
        entries,
        total_units,
        grants: g.grants,
        overdrawn_accounts: g.overdrawn_accounts,
    })
}

/// Check 5: at most one usage entry per event, and its event claimed in the dedup store.
async fn verify_usage_entries(pool: &PgPool) -> Result<(), VerifyError> {
    let twice: Option<(String,)> = sqlx::query_as(
        "SELECT event_id FROM ledger_entries WHERE event_id IS NOT NULL
         GROUP BY event_id HAVING count(*) > 1 LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    if let Some((event_id,)) = twice {
        return Err(VerifyError::UsageEntry { event_id, problem: "more than one usage entry" });
    }
    let unclaimed: Option<(String,)> = sqlx::query_as(
        "SELECT e.event_id FROM ledger_entries e
         WHERE e.event_id IS NOT NULL
           AND NOT EXISTS (SELECT 1 FROM processed_events p WHERE p.event_id = e.event_id)
         LIMIT 1",
    )
    .fetch_optional(pool)
    .await?;
    if let Some((event_id,)) = unclaimed {
        return Err(VerifyError::UsageEntry {
            event_id,
            problem: "usage entry without a claim in processed_events",
        });
    }
    Ok(())
}
