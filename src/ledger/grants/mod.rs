//! Credit grants: every credit is a grant, every debit burns grants in order, and what is
//! left of a grant at its deadline is written off once (`breakage`).
//!
//! - The burn-down itself is pure: [`wallet`].
//! - Every writer that changes a balance (usage batches, API deductions, `ops::post_at`)
//!   already holds the account's `account_balances` row lock; under it, it loads the
//!   account's grants with something left ([`load_wallets`]), burns or credits in memory,
//!   stores the journal entry with its `grant_changes` and writes back the changed grant
//!   rows ([`store_wallets`]). No grant row is ever changed without that lock, so grant
//!   remainders, the balance and the journal move together or not at all.
//! - [`expire_due`] (every second in `tally run`, or `tally grants expire`) writes off
//!   what is past its deadline: one `breakage` entry per grant, key `breakage:<grant_id>`,
//!   under the balance lock, so two instances, a restart or a concurrent debit can never
//!   write a grant off twice or spend it after its write-off.
//! - `tally ledger verify` proves each grant's remainder equals the sum of its journal
//!   deltas ([`verify_grants`]).

pub mod wallet;

use super::ops::LedgerError;
use crate::ledger::{EntryRows, NewEntry};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;
pub use wallet::{GrantChanges, LiveGrant, LiveGrantSpec, PaidGrant, Wallet, WalletError, changes_json};

/// Where a grant's credit came from. Each source has a default burn priority (lower burns
/// first) that the catalog's `[grants.<source>]` may override, with an expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantSource {
    Promotion,
    Bonus,
    PlanAllocation,
    Operator,
    Correction,
    Refund,
    Purchase,
    Legacy,
}

impl GrantSource {
    pub const fn as_str(self) -> &'static str {
        match self {
            GrantSource::Promotion => "promotion",
            GrantSource::Bonus => "bonus",
            GrantSource::PlanAllocation => "plan_allocation",
            GrantSource::Operator => "operator",
            GrantSource::Correction => "correction",
            GrantSource::Refund => "refund",
            GrantSource::Purchase => "purchase",
            GrantSource::Legacy => "legacy",
        }
    }

    /// Free credits burn before paid ones: what can expire is used first, what the
    /// customer paid for is kept longest.
    pub const fn default_priority(self) -> i32 {
        match self {
            GrantSource::Promotion => 100,
            GrantSource::Bonus => 200,
            GrantSource::PlanAllocation => 300,
            GrantSource::Operator => 400,
            GrantSource::Correction => 500,
            GrantSource::Refund => 600,
            GrantSource::Purchase => 700,
            GrantSource::Legacy => 900,
        }
    }

    /// The source of a credit posted as a journal entry of `kind`.
    pub fn for_entry_kind(kind: &str) -> GrantSource {
        match kind {
            "topup" => GrantSource::Purchase,
            "refund" => GrantSource::Refund,
            "plan_allocation" | "plan_reset" | "plan_change" => GrantSource::PlanAllocation,
            "correction" | "consume" | "reservation_settle" => GrantSource::Correction,
            _ => GrantSource::Operator, // addition, adjustment
        }
    }
}

/// A new grant's terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrantTerms {
    pub source: GrantSource,
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
}

/// Priority bounds (the table's CHECK).
pub const PRIORITY_MAX: i32 = 1000;
/// Longest expiry a policy may set (10 years).
pub const EXPIRES_AFTER_DAYS_MAX: u32 = 3650;

/// `[grants.<source>]` in the catalog file.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourcePolicy {
    pub priority: Option<i32>,
    /// The grant expires this many days after it is created (absent: never).
    pub expires_after_days: Option<u32>,
}

/// `[grants]`: per-source burn priority and expiry. Absent: the defaults of
/// [`GrantSource::default_priority`], nothing expires (Reeve and Brievio: paid credits
/// never expire).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantPolicies {
    #[serde(default)]
    pub purchase: SourcePolicy,
    #[serde(default)]
    pub bonus: SourcePolicy,
    #[serde(default)]
    pub plan_allocation: SourcePolicy,
    #[serde(default)]
    pub promotion: SourcePolicy,
    #[serde(default)]
    pub operator: SourcePolicy,
    #[serde(default)]
    pub refund: SourcePolicy,
    #[serde(default)]
    pub correction: SourcePolicy,
}

impl GrantPolicies {
    fn policy(&self, source: GrantSource) -> Option<&SourcePolicy> {
        match source {
            GrantSource::Purchase => Some(&self.purchase),
            GrantSource::Bonus => Some(&self.bonus),
            GrantSource::PlanAllocation => Some(&self.plan_allocation),
            GrantSource::Promotion => Some(&self.promotion),
            GrantSource::Operator => Some(&self.operator),
            GrantSource::Refund => Some(&self.refund),
            GrantSource::Correction => Some(&self.correction),
            GrantSource::Legacy => None,
        }
    }

    /// The terms of a grant of `source` created at `now`.
    pub fn terms(&self, source: GrantSource, now: DateTime<Utc>) -> GrantTerms {
        let p = self.policy(source);
        GrantTerms {
            source,
            priority: p.and_then(|p| p.priority).unwrap_or(source.default_priority()),
            expires_at: p.and_then(|p| p.expires_after_days).map(|d| now + Duration::days(i64::from(d))),
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        let all = [
            GrantSource::Purchase,
            GrantSource::Bonus,
            GrantSource::PlanAllocation,
            GrantSource::Promotion,
            GrantSource::Operator,
            GrantSource::Refund,
            GrantSource::Correction,
        ];
        for s in all {
            let p = self.policy(s).expect("every source but legacy has a policy");
            if p.priority.is_some_and(|x| !(0..=PRIORITY_MAX).contains(&x)) {
                return Err(format!("grants.{}.priority must be within 0..={PRIORITY_MAX}", s.as_str()));
            }
            if p.expires_after_days.is_some_and(|d| d == 0 || d > EXPIRES_AFTER_DAYS_MAX) {
                return Err(format!(
                    "grants.{}.expires_after_days must be within 1..={EXPIRES_AFTER_DAYS_MAX}",
                    s.as_str()
                ));
            }
        }
        Ok(())
    }
}

fn corrupt(e: WalletError) -> sqlx::Error {
    sqlx::Error::Protocol(format!("credit grants: {e}"))
}

/// Load the wallets of accounts whose balance rows the caller has locked (`balances`:
/// account -> balance under that lock).
pub(crate) async fn load_wallets(
    tx: &mut Transaction<'_, Postgres>,
    balances: &HashMap<&str, i64>,
) -> Result<HashMap<String, Wallet>, sqlx::Error> {
    let accounts: Vec<&str> = balances.keys().copied().collect();
    type Row = (String, i64, i32, Option<DateTime<Utc>>, i64);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT account_id, grant_id, priority, expires_at, remaining_units FROM credit_grants
         WHERE account_id = ANY($1) AND NOT exhausted",
    )
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    let mut by_account: HashMap<&str, Vec<LiveGrant>> = HashMap::with_capacity(accounts.len());
    for (account, grant_id, priority, expires_at, remaining_units) in &rows {
        let Some((key, _)) = balances.get_key_value(account.as_str()) else { continue };
        by_account.entry(*key).or_default().push(LiveGrant {
            grant_id: *grant_id,
            priority: *priority,
            expires_at: *expires_at,
            remaining_units: *remaining_units,
        });
    }
    let mut wallets = HashMap::with_capacity(accounts.len());
    for (account, balance) in balances {
        let grants = by_account.remove(account).unwrap_or_default();
        wallets.insert(account.to_string(), Wallet::new(account, grants, *balance).map_err(corrupt)?);
    }
    Ok(wallets)
}

/// Write back the remainders the wallets changed (one statement).
pub(crate) async fn store_wallets(
    tx: &mut Transaction<'_, Postgres>,
    wallets: &HashMap<String, Wallet>,
) -> Result<(), sqlx::Error> {
    let (ids, remaining): (Vec<i64>, Vec<i64>) = wallets.values().flat_map(|w| w.changed()).unzip();
    if ids.is_empty() {
        return Ok(());
    }
    sqlx::query(
        "UPDATE credit_grants g SET remaining_units = u.r, exhausted = (u.r = 0)
         FROM UNNEST($1::bigint[], $2::bigint[]) AS u(id, r) WHERE g.grant_id = u.id",
    )
    .bind(&ids)
    .bind(&remaining)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A debit of `units` (> 0) at `at` on a loaded wallet: the entry's `grant_changes`.
pub(crate) fn debit(
    wallets: &mut HashMap<String, Wallet>,
    account: &str,
    units: i64,
    at: DateTime<Utc>,
) -> Result<Option<String>, sqlx::Error> {
    debit_from(wallets, account, &[], units, at)
}

/// [`debit`], burning the grants `first` before the burn order.
pub(crate) fn debit_from(
    wallets: &mut HashMap<String, Wallet>,
    account: &str,
    first: &[i64],
    units: i64,
    at: DateTime<Utc>,
) -> Result<Option<String>, sqlx::Error> {
    let w = wallets.get_mut(account).expect("the account's wallet was loaded under its lock");
    let changes = w.debit_from(first, units, at).map_err(corrupt)?;
    Ok(changes_json(&changes))
}

/// A plan cycle's reset on a loaded wallet: every grant ended, the overdraft forgiven.
pub(crate) fn reset(wallets: &mut HashMap<String, Wallet>, account: &str) -> GrantChanges {
    wallets.get_mut(account).expect("the account's wallet was loaded under its lock").reset()
}

/// One part of a credit: `units` of a grant with `terms`.
#[derive(Debug, Clone)]
pub struct CreditPart {
    pub terms: GrantTerms,
    pub units: i64,
}

/// A refund of debit entry `entry_id` (a positive correction of it): the overdraft first,
/// then back into the grants that paid it while they can still be spent at `at` (see
/// [`Wallet::give_back`]). Returns those grants' changes and what is left for a new grant.
pub(crate) async fn give_back(
    tx: &mut Transaction<'_, Postgres>,
    wallets: &mut HashMap<String, Wallet>,
    account: &str,
    entry_id: i64,
    units: i64,
    at: DateTime<Utc>,
) -> Result<(GrantChanges, i64), sqlx::Error> {
    type Row = (i64, i32, Option<DateTime<Utc>>, i64, i64, i64, bool);
    // What each grant paid of the entry, net of what earlier refunds of it gave back, in
    // the order the debit burned them.
    let rows: Vec<Row> = sqlx::query_as(
        "WITH paid AS (
             SELECT (x.c->>0)::bigint AS grant_id, -(x.c->>1)::bigint AS units, x.n
             FROM ledger_entries e, jsonb_array_elements(e.grant_changes) WITH ORDINALITY AS x(c, n)
             WHERE e.entry_id = $1 AND e.account_id = $2 AND (x.c->>1)::bigint < 0),
         back AS (
             SELECT (c->>0)::bigint AS grant_id, sum((c->>1)::bigint) AS units
             FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c
             WHERE e.corrects_entry_id = $1 AND (c->>1)::bigint > 0 GROUP BY 1)
         SELECT g.grant_id, g.priority, g.expires_at, g.remaining_units, g.amount_units,
                (p.units - COALESCE(b.units, 0))::bigint, g.expired_entry_id IS NOT NULL
         FROM paid p JOIN credit_grants g USING (grant_id) LEFT JOIN back b USING (grant_id)
         ORDER BY p.n",
    )
    .bind(entry_id)
    .bind(account)
    .fetch_all(&mut **tx)
    .await?;
    let paid: Vec<wallet::PaidGrant> = rows
        .into_iter()
        .map(|(grant_id, priority, expires_at, remaining_units, amount_units, paid_units, written_off)| {
            wallet::PaidGrant {
                grant: LiveGrant { grant_id, priority, expires_at, remaining_units },
                amount_units,
                paid_units,
                written_off,
            }
        })
        .collect();
    let w = wallets.get_mut(account).expect("the account's wallet was loaded under its lock");
    Ok(w.give_back(&paid, units, at))
}

/// Create the grants of a credit on a loaded wallet (rows inserted, entry id set later by
/// [`link_entry`]); returns the new grants' changes (what each starts with) and their ids.
pub(crate) async fn credit(
    tx: &mut Transaction<'_, Postgres>,
    wallets: &mut HashMap<String, Wallet>,
    account: &str,
    parts: &[CreditPart],
    effective_from: DateTime<Utc>,
    description: &str,
    created_by: Option<&str>,
) -> Result<(GrantChanges, Vec<i64>), sqlx::Error> {
    let w = wallets.get_mut(account).expect("the account's wallet was loaded under its lock");
    let mut changes = GrantChanges::new();
    let mut ids = Vec::with_capacity(parts.len());
    for part in parts {
        assert!(part.units > 0, "a grant is positive");
        let repaid = part.units.min(w.overdraft_units());
        let expires_at = part.terms.expires_at.filter(|e| *e > effective_from);
        let grant_id: i64 = sqlx::query_scalar(
            "INSERT INTO credit_grants (account_id, source, priority, amount_units, repaid_units,
                                        remaining_units, exhausted, effective_from, expires_at, description,
                                        created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $6 = 0, $7, $8, $9, $10) RETURNING grant_id",
        )
        .bind(account)
        .bind(part.terms.source.as_str())
        .bind(part.terms.priority)
        .bind(part.units)
        .bind(repaid)
        .bind(part.units - repaid)
        .bind(effective_from)
        .bind(expires_at)
        .bind(description)
        .bind(created_by)
        .fetch_one(&mut **tx)
        .await?;
        let spec = LiveGrantSpec { grant_id, priority: part.terms.priority, expires_at };
        let remaining = w.credit(spec, part.units);
        assert_eq!(remaining, part.units - repaid, "the row and the wallet agree");
        changes.push((grant_id, remaining));
        ids.push(grant_id);
    }
    Ok((changes, ids))
}

/// Point new grants at the entry that created them.
pub(crate) async fn link_entry(
    tx: &mut Transaction<'_, Postgres>,
    grant_ids: &[i64],
    entry_id: i64,
) -> Result<(), sqlx::Error> {
    if grant_ids.is_empty() {
        return Ok(());
    }
    sqlx::query("UPDATE credit_grants SET entry_id = $2 WHERE grant_id = ANY($1)")
        .bind(grant_ids)
        .bind(entry_id)
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Most grants written off per transaction by [`expire_due`].
pub const EXPIRE_BATCH_MAX: i64 = 500;

/// Write off the remainder of every grant whose deadline is at or before `now`: one
/// `breakage` entry per grant (key `breakage:<grant_id>`), in transactions of at most
/// [`EXPIRE_BATCH_MAX`] grants. Safe to run from several instances at once: each grant is
/// re-read under its account's balance lock, so the second finds nothing left. Returns
/// the number of grants written off.
pub async fn expire_due(pool: &PgPool, now: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let mut total = 0u64;
    loop {
        // Candidates without locks (lock order is always balance row first).
        let due: Vec<(String,)> = sqlx::query_as(
            "SELECT DISTINCT account_id FROM (
                 SELECT account_id FROM credit_grants
                 WHERE expires_at IS NOT NULL AND expires_at <= $1 AND NOT exhausted
                 ORDER BY expires_at LIMIT $2) d",
        )
        .bind(now)
        .bind(EXPIRE_BATCH_MAX)
        .fetch_all(pool)
        .await?;
        if due.is_empty() {
            return Ok(total);
        }
        let mut accounts: Vec<&str> = due.iter().map(|(a,)| a.as_str()).collect();
        accounts.sort_unstable();
        let mut tx = pool.begin().await?;
        let written = expire_accounts(&mut tx, &accounts, now).await?;
        tx.commit().await?;
        total += written.0;
        metrics::counter!(crate::metrics::GRANTS_EXPIRED).increment(written.0);
        metrics::counter!(crate::metrics::GRANTS_EXPIRED_UNITS).increment(written.1.unsigned_abs());
        if written.0 == 0 {
            // Everyone else got there first (another instance): nothing left to do now.
            return Ok(total);
        }
    }
}

async fn expire_accounts(
    tx: &mut Transaction<'_, Postgres>,
    sorted_accounts: &[&str],
    now: DateTime<Utc>,
) -> Result<(u64, i64), sqlx::Error> {
    let mut balances = super::lock_balances(tx, sorted_accounts).await?;
    let due: Vec<(String, i64, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT account_id, grant_id, remaining_units, expires_at FROM credit_grants
         WHERE account_id = ANY($1) AND expires_at IS NOT NULL AND expires_at <= $2 AND NOT exhausted
         ORDER BY account_id, expires_at, grant_id",
    )
    .bind(sorted_accounts)
    .bind(now)
    .fetch_all(&mut **tx)
    .await?;
    if due.is_empty() {
        return Ok((0, 0));
    }
    let mut wallets = load_wallets(tx, &balances).await?;
    let mut rows = EntryRows::default();
    let keys: Vec<String> = due.iter().map(|(_, id, _, _)| format!("breakage:{id}")).collect();
    let hashes: Vec<[u8; 32]> =
        due.iter().map(|(a, id, units, at)| super::ops::hash_payload(&(a, id, units, at))).collect();
    let mut expired_ids = Vec::with_capacity(due.len());
    let mut expired_units = 0i64;
    for (i, (account, grant_id, _, expires_at)) in due.iter().enumerate() {
        let w = wallets.get_mut(account).expect("loaded above");
        let units = w.expire(*grant_id);
        assert!(units > 0, "a due grant has something left under the lock");
        expired_units = expired_units.saturating_add(units);
        let bal = balances.get_mut(account.as_str()).expect("locked above");
        *bal -= units;
        assert_eq!(*bal, w.balance_units(), "balance == grants - overdraft");
        expired_ids.push(*grant_id);
        rows.push(NewEntry {
            account_id: account,
            kind: "breakage",
            amount_units: -units,
            balance_after_units: *bal,
            idempotency_key: keys[i].clone(),
            payload_hash: &hashes[i],
            event_id: None,
            occurred_at: *expires_at,
            description: format!("grant {grant_id} expired"),
            created_by: None,
            corrects_entry_id: None,
            metadata: serde_json::json!({"grant_id": grant_id}),
            grant_changes: changes_json(&[(*grant_id, -units)]),
        });
    }
    let last = rows.insert(tx).await?;
    store_wallets(tx, &wallets).await?;
    sqlx::query(
        "UPDATE credit_grants g SET expired_entry_id = e.entry_id
         FROM ledger_entries e
         WHERE g.grant_id = ANY($1) AND e.idempotency_key = 'breakage:' || g.grant_id::text",
    )
    .bind(&expired_ids)
    .execute(&mut **tx)
    .await?;
    super::store_balances(tx, &balances, &last, None, &HashMap::new()).await?;
    Ok((expired_ids.len() as u64, expired_units))
}

/// A grant as the API and CLI show it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct GrantView {
    pub grant_id: i64,
    pub source: String,
    pub priority: i32,
    pub amount_units: i64,
    pub repaid_units: i64,
    pub remaining_units: i64,
    pub effective_from: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    /// `active`, `used` (nothing left), or `expired` (past its deadline).
    pub status: String,
    pub entry_id: Option<i64>,
    pub expired_entry_id: Option<i64>,
    pub description: String,
    pub created_by: Option<String>,
    pub created_at: DateTime<Utc>,
}

const VIEW_COLUMNS: &str = "grant_id, source, priority, amount_units, repaid_units, remaining_units,
    effective_from, expires_at,
    CASE WHEN expires_at IS NOT NULL AND expires_at <= now() THEN 'expired'
         WHEN remaining_units = 0 THEN 'used' ELSE 'active' END AS status,
    entry_id, expired_entry_id, description, created_by, created_at";

/// An account's grants, newest first, `grant_id < before`, at most `limit` (1..=1000);
/// `live_only`: only those with something left that have not expired.
pub async fn list(
    pool: &PgPool,
    account_id: &str,
    before: Option<i64>,
    limit: i64,
    live_only: bool,
) -> Result<Vec<GrantView>, sqlx::Error> {
    let live = if live_only {
        " AND remaining_units > 0 AND (expires_at IS NULL OR expires_at > now())"
    } else {
        ""
    };
    sqlx::query_as::<_, GrantView>(&format!(
        "SELECT {VIEW_COLUMNS} FROM credit_grants
         WHERE account_id = $1 AND grant_id < $2{live} ORDER BY grant_id DESC LIMIT $3"
    ))
    .bind(account_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit.clamp(1, 1000))
    .fetch_all(pool)
    .await
}

/// What expires next on an account: the earliest deadline among live grants and how
/// much is left on the grants with that deadline.
#[derive(Debug, Clone, Serialize)]
pub struct NextExpiry {
    pub expires_at: DateTime<Utc>,
    pub units: i64,
    pub usd: String,
}

pub async fn next_expiry(pool: &PgPool, account_id: &str) -> Result<Option<NextExpiry>, sqlx::Error> {
    let row: Option<(DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT expires_at, sum(remaining_units)::bigint FROM credit_grants
         WHERE account_id = $1 AND remaining_units > 0 AND expires_at > now()
         GROUP BY expires_at ORDER BY expires_at LIMIT 1",
    )
    .bind(account_id)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(expires_at, units)| NextExpiry {
        expires_at,
        units,
        usd: crate::money::units_to_usd_string(units),
    }))
}

/// A promotional (or operator, or bonus) grant an operator creates.
#[derive(Debug, Clone, Serialize)]
pub struct GrantRequest {
    pub account_id: String,
    pub idempotency_key: String,
    pub units: i64,
    pub source: GrantSource,
    pub priority: Option<i32>,
    /// The deadline; or `expires_in_days` from when the grant is created; or neither: the
    /// catalog's term for the source. (As given: a retry with the same key is a replay.)
    pub expires_at: Option<DateTime<Utc>>,
    pub expires_in_days: Option<u32>,
    pub created_by: String,
    pub reason: String,
}

/// The created grant and its entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Granted {
    pub grant_id: i64,
    pub entry_id: i64,
    pub balance_after_units: i64,
}

/// Create a grant (one `addition` entry), idempotent by key like every operation.
pub async fn grant(
    pool: &PgPool,
    policies: &GrantPolicies,
    req: &GrantRequest,
) -> Result<Granted, LedgerError> {
    if req.units <= 0 {
        return Err(LedgerError::Invalid(format!("amount must be positive, got {} units", req.units)));
    }
    if !matches!(req.source, GrantSource::Promotion | GrantSource::Operator | GrantSource::Bonus) {
        return Err(LedgerError::Invalid("source must be promotion, operator or bonus".into()));
    }
    if req.priority.is_some_and(|p| !(0..=PRIORITY_MAX).contains(&p)) {
        return Err(LedgerError::Invalid(format!("priority must be within 0..={PRIORITY_MAX}")));
    }
    if req.expires_at.is_some() && req.expires_in_days.is_some() {
        return Err(LedgerError::Invalid("give expires_at or expires_in_days, not both".into()));
    }
    if req.expires_in_days.is_some_and(|d| d == 0 || d > EXPIRES_AFTER_DAYS_MAX) {
        return Err(LedgerError::Invalid(format!(
            "expires_in_days must be within 1..={EXPIRES_AFTER_DAYS_MAX}"
        )));
    }
    let hash = super::ops::hash_payload(req);
    let mut tx = pool.begin().await?;
    if let Some(saved) = super::ops::claim::<Granted>(&mut tx, &req.idempotency_key, "grant", &hash).await? {
        return Ok(saved);
    }
    // After the claim: a replay returns what was granted even once the deadline passed.
    let now = Utc::now();
    if req.expires_at.is_some_and(|e| e <= now) {
        return Err(LedgerError::Invalid("expires_at must be in the future".into()));
    }
    let mut terms = policies.terms(req.source, now);
    if let Some(p) = req.priority {
        terms.priority = p;
    }
    if let Some(at) =
        req.expires_at.or_else(|| req.expires_in_days.map(|d| now + Duration::days(i64::from(d))))
    {
        terms.expires_at = Some(at);
    }
    let posted = super::ops::post(
        &mut tx,
        super::ops::Posting {
            account_id: &req.account_id,
            kind: "addition",
            amount: super::ops::Amount::Delta(req.units),
            idempotency_key: &req.idempotency_key,
            payload_hash: &hash,
            description: req.reason.clone(),
            created_by: Some(&req.created_by),
            corrects_entry_id: None,
            metadata: serde_json::json!({"grant_source": req.source.as_str()}),
            grants: vec![CreditPart { terms, units: req.units }],
            burn_first: vec![],
        },
    )
    .await?;
    let granted = Granted {
        grant_id: posted.grant_ids[0],
        entry_id: posted.entry_id,
        balance_after_units: posted.balance_after_units,
    };
    super::ops::finish(&mut tx, &req.idempotency_key, &granted).await?;
    tx.commit().await?;
    Ok(granted)
}

/// `tally ledger verify`'s grant checks: every grant's remainder equals the sum of its
/// journal deltas (plus the opening amount of a legacy grant) and lies within
/// 0..=amount; per account the grants hold at least the balance (overdraft >= 0).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GrantsReport {
    pub grants: u64,
    pub overdrawn_accounts: u64,
}

pub async fn verify_grants(pool: &PgPool) -> Result<GrantsReport, String> {
    let bad: Vec<(i64, i64, i64)> = sqlx::query_as(
        "WITH deltas AS (
             SELECT (c->>0)::bigint AS grant_id, sum((c->>1)::bigint)::bigint AS units
             FROM ledger_entries e, jsonb_array_elements(e.grant_changes) c
             WHERE e.grant_changes IS NOT NULL GROUP BY 1)
         SELECT g.grant_id, g.remaining_units,
                (CASE WHEN g.entry_id IS NULL AND g.source = 'legacy' THEN g.amount_units ELSE 0 END
                 + COALESCE(d.units, 0))::bigint
         FROM credit_grants g FULL JOIN deltas d USING (grant_id)
         WHERE g.grant_id IS NULL OR d.grant_id IS NULL AND g.source <> 'legacy'
            OR g.remaining_units <> (CASE WHEN g.entry_id IS NULL AND g.source = 'legacy'
                                          THEN g.amount_units ELSE 0 END + COALESCE(d.units, 0))
         LIMIT 10",
    )
    .fetch_all(pool)
    .await
    .map_err(|e| format!("database: {e}"))?;
    if let Some((id, found, expected)) = bad.first() {
        return Err(format!("grant {id}: remaining_units {found}, the journal says {expected}"));
    }
    let negative: Option<(String, i64, i64)> = sqlx::query_as(
        "SELECT b.account_id, b.balance_units, COALESCE(g.units, 0)::bigint
         FROM account_balances b
         LEFT JOIN (SELECT account_id, sum(remaining_units) AS units FROM credit_grants
                    WHERE remaining_units > 0 GROUP BY account_id) g USING (account_id)
         WHERE COALESCE(g.units, 0) < b.balance_units LIMIT 1",
    )
    .fetch_optional(pool)
    .await
    .map_err(|e| format!("database: {e}"))?;
    if let Some((account, balance, grants)) = negative {
        return Err(format!("account {account}: balance {balance} units but its grants hold only {grants}"));
    }
    let (grants, overdrawn): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM credit_grants),
                (SELECT count(*) FROM account_balances b WHERE b.balance_units <
                    (SELECT COALESCE(sum(remaining_units), 0) FROM credit_grants g WHERE g.account_id = b.account_id))",
    )
    .fetch_one(pool)
    .await
    .map_err(|e| format!("database: {e}"))?;
    Ok(GrantsReport { grants: grants as u64, overdrawn_accounts: overdrawn as u64 })
}
