//! The Postgres ledger: the authority on money.
//!
//! - `ledger_entries` is an append-only journal (a trigger refuses UPDATE, DELETE and
//!   TRUNCATE). Every entry carries an idempotency key, a payload hash and the account's
//!   running `balance_after_units`.
//! - `account_balances` is a projection of the journal, updated in the same transaction
//!   as the entries; [`verify`] recomputes it from the journal alone.
//! - Balance rows are locked in account-id order (`lock_balances`), so concurrent writers
//!   cannot deadlock and `balance_after_units` is a true running balance per account.
//!
//! Amounts are `i64` internal units (see [`crate::money`]).

pub mod auto_reload;
pub mod config;
pub mod counting;
pub mod deductions;
pub mod grants;
pub mod holds;
pub mod ops;
pub mod reservations;
pub mod topup;
pub mod usage;
pub mod verify;

use chrono::{DateTime, Utc};
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

pub use verify::verify;

/// Migrations under `schemas/postgres/`, compiled in.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./schemas/postgres");

/// Connect a pool with every option that matters set explicitly.
pub async fn connect(url: &str, connections_max: u32) -> anyhow::Result<PgPool> {
    let opts = PgConnectOptions::from_str(url)?.application_name("tally");
    let pool = PgPoolOptions::new()
        .max_connections(connections_max)
        .min_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .idle_timeout(Duration::from_secs(300))
        // No ping before every acquire: it was one more round trip per transaction (a
        // holding authorize's profile showed it). A dead connection fails its first
        // statement instead, which every caller already treats as transient and retries.
        .test_before_acquire(false)
        .connect_with(opts)
        .await?;
    Ok(pool)
}

pub async fn migrate(pool: &PgPool) -> anyhow::Result<()> {
    MIGRATOR.run(pool).await?;
    Ok(())
}

/// Make sure the accounts exist (auto-created on first sight: usage is never dropped for
/// an unknown account), then lock their balance rows in id order and read them.
pub(crate) async fn lock_balances<'a>(
    tx: &mut Transaction<'_, Postgres>,
    sorted_accounts: &[&'a str],
) -> Result<HashMap<&'a str, i64>, sqlx::Error> {
    assert!(sorted_accounts.windows(2).all(|w| w[0] < w[1]), "accounts sorted and unique");
    sqlx::query(
        "INSERT INTO accounts (account_id, auto_created) SELECT a, true FROM UNNEST($1::text[]) AS a
         ON CONFLICT DO NOTHING",
    )
    .bind(sorted_accounts)
    .execute(&mut **tx)
    .await?;
    sqlx::query(
        "INSERT INTO account_balances (account_id) SELECT a FROM UNNEST($1::text[]) AS a
         ON CONFLICT DO NOTHING",
    )
    .bind(sorted_accounts)
    .execute(&mut **tx)
    .await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, balance_units FROM account_balances
         WHERE account_id = ANY($1) ORDER BY account_id FOR UPDATE",
    )
    .bind(sorted_accounts)
    .fetch_all(&mut **tx)
    .await?;
    assert_eq!(rows.len(), sorted_accounts.len(), "every balance row exists after the upsert");
    let by_id: HashMap<String, i64> = rows.into_iter().collect();
    Ok(sorted_accounts.iter().map(|a| (*a, by_id[*a])).collect())
}

/// One journal row to insert.
pub(crate) struct NewEntry<'a> {
    pub account_id: &'a str,
    pub kind: &'static str,
    pub amount_units: i64,
    pub balance_after_units: i64,
    pub idempotency_key: String,
    pub payload_hash: &'a [u8; 32],
    pub event_id: Option<&'a str>,
    pub occurred_at: DateTime<Utc>,
    pub description: String,
    pub created_by: Option<&'a str>,
    pub corrects_entry_id: Option<i64>,
    pub metadata: serde_json::Value,
    /// `[[grant_id, delta_units], ...]` (see [`grants`]); `None` when no grant changed.
    pub grant_changes: Option<String>,
}

/// Journal rows inserted together with one statement.
#[derive(Default)]
pub(crate) struct EntryRows<'a> {
    rows: Vec<NewEntry<'a>>,
}

impl<'a> EntryRows<'a> {
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn push(&mut self, e: NewEntry<'a>) {
        self.rows.push(e);
    }

    /// Insert all rows; returns, per account, its highest new entry id and how many entries
    /// it got.
    pub async fn insert(
        self,
        tx: &mut Transaction<'_, Postgres>,
    ) -> Result<HashMap<String, Appended>, sqlx::Error> {
        let r = &self.rows;
        let accounts: Vec<&str> = r.iter().map(|e| e.account_id).collect();
        let kinds: Vec<&str> = r.iter().map(|e| e.kind).collect();
        let amounts: Vec<i64> = r.iter().map(|e| e.amount_units).collect();
        let afters: Vec<i64> = r.iter().map(|e| e.balance_after_units).collect();
        let keys: Vec<&str> = r.iter().map(|e| e.idempotency_key.as_str()).collect();
        let hashes: Vec<&[u8]> = r.iter().map(|e| &e.payload_hash[..]).collect();
        let events: Vec<Option<&str>> = r.iter().map(|e| e.event_id).collect();
        let times: Vec<DateTime<Utc>> = r.iter().map(|e| e.occurred_at).collect();
        let descs: Vec<&str> = r.iter().map(|e| e.description.as_str()).collect();
        let bys: Vec<Option<&str>> = r.iter().map(|e| e.created_by).collect();
        let corrects: Vec<Option<i64>> = r.iter().map(|e| e.corrects_entry_id).collect();
        let metas: Vec<&serde_json::Value> = r.iter().map(|e| &e.metadata).collect();
        let grant_changes: Vec<Option<&str>> = r.iter().map(|e| e.grant_changes.as_deref()).collect();
        // WITH ORDINALITY + ORDER BY keeps entry ids in the order balances were computed,
        // so balance_after_units is continuous in entry_id order.
        let rows: Vec<(String, i64)> = sqlx::query_as(
            "INSERT INTO ledger_entries
               (account_id, kind, amount_units, balance_after_units, idempotency_key,
                payload_hash, event_id, occurred_at, description, created_by, corrects_entry_id,
                metadata, grant_changes)
             SELECT a, k, am, ba, ik, h, e, t, d, cb, ce, md, gc::jsonb
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::bigint[], $5::text[],
                         $6::bytea[], $7::text[], $8::timestamptz[], $9::text[], $10::text[],
                         $11::bigint[], $12::jsonb[], $13::text[])
                  WITH ORDINALITY AS u(a, k, am, ba, ik, h, e, t, d, cb, ce, md, gc, n)
             ORDER BY n
             RETURNING account_id, entry_id",
        )
        .bind(&accounts)
        .bind(&kinds)
        .bind(&amounts)
        .bind(&afters)
        .bind(&keys)
        .bind(&hashes)
        .bind(&events)
        .bind(&times)
        .bind(&descs)
        .bind(&bys)
        .bind(&corrects)
        .bind(&metas)
        .bind(&grant_changes)
        .fetch_all(&mut **tx)
        .await?;
        assert_eq!(rows.len(), self.rows.len(), "every entry row was inserted");
        let mut last: HashMap<String, Appended> = HashMap::new();
        for (account, id) in rows {
            let slot = last.entry(account).or_insert(Appended { last_entry_id: id, entries: 0 });
            slot.last_entry_id = slot.last_entry_id.max(id);
            slot.entries += 1;
        }
        Ok(last)
    }
}

/// What one statement appended to an account's journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Appended {
    pub last_entry_id: i64,
    pub entries: i64,
}

/// Write the projection for the given accounts.
///
/// `usage_at`: per account, the time of the latest *usage* debit in this transaction. It
/// moves `last_deduction_at` forward only (the latest usage debit ever: a usage event's own
/// event time, an API deduction's recording time); top-ups, adjustments, plan changes,
/// downgrade caps and refunds never move it.
pub(crate) async fn store_balances(
    tx: &mut Transaction<'_, Postgres>,
    balances: &HashMap<&str, i64>,
    appended: &HashMap<String, Appended>,
    purchase_at: Option<DateTime<Utc>>,
    usage_at: &HashMap<&str, DateTime<Utc>>,
) -> Result<(), sqlx::Error> {
    let accounts: Vec<&str> = balances.keys().copied().collect();
    let values: Vec<i64> = accounts.iter().map(|a| balances[a]).collect();
    let lasts: Vec<Option<i64>> =
        accounts.iter().map(|a| appended.get(*a).map(|x| x.last_entry_id)).collect();
    let counts: Vec<i64> = accounts.iter().map(|a| appended.get(*a).map_or(0, |x| x.entries)).collect();
    debug_assert!(
        appended.keys().all(|a| balances.contains_key(a.as_str())),
        "every account that got entries has its projection written"
    );
    let usage: Vec<Option<DateTime<Utc>>> = accounts.iter().map(|a| usage_at.get(*a).copied()).collect();
    sqlx::query(
        "UPDATE account_balances b
         SET balance_units = u.v,
             last_entry_id = COALESCE(u.l, b.last_entry_id),
             last_purchase_at = CASE WHEN u.l IS NULL THEN b.last_purchase_at
                                     ELSE COALESCE($4, b.last_purchase_at) END,
             last_deduction_at = GREATEST(b.last_deduction_at, u.d),
             entry_count = b.entry_count + u.c,
             updated_at = clock_timestamp(), changed_xid = pg_current_xact_id()
         FROM UNNEST($1::text[], $2::bigint[], $3::bigint[], $5::timestamptz[], $6::bigint[]) AS u(a, v, l, d, c)
         WHERE b.account_id = u.a",
    )
    .bind(&accounts)
    .bind(&values)
    .bind(&lasts)
    .bind(purchase_at)
    .bind(&usage)
    .bind(&counts)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// An account's balance as the API shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BalanceView {
    pub account_id: String,
    pub currency: String,
    pub balance_units: i64,
    /// Exact USD decimal string of `balance_units`.
    pub balance: String,
    pub display_unit: String,
    pub display_balance: i64,
    /// Held by active reservations.
    pub reserved_units: i64,
    /// Settled reservations waiting for their usage event.
    pub pending_units: i64,
    /// balance - reserved - pending: what a new reservation can use.
    pub effective_units: i64,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub last_deduction_at: Option<DateTime<Utc>>,
    pub entries: i64,
    /// The earliest deadline among the account's live credit grants and what is left on
    /// them (absent: nothing expires).
    pub next_expiry: Option<grants::NextExpiry>,
}

pub async fn balance(pool: &PgPool, account_id: &str) -> Result<Option<BalanceView>, sqlx::Error> {
    type Row =
        (String, String, i64, String, i64, Option<DateTime<Utc>>, Option<DateTime<Utc>>, i64, i64, i64);
    let row: Option<Row> = sqlx::query_as(&format!(
        "SELECT a.account_id, a.currency, COALESCE(b.balance_units, 0), a.display_unit,
                a.display_units_per, b.last_purchase_at, b.last_deduction_at,
                COALESCE(h.reserved, 0), COALESCE(h.pending, 0),
                COALESCE(b.entry_count, 0)
         FROM accounts a LEFT JOIN account_balances b USING (account_id)
         -- From the hold rows (the projection may lag a holding authorize by a moment).
         LEFT JOIN ({}) h USING (account_id)
         WHERE a.account_id = $1",
        reservations::open_holds_sql(Some("ARRAY[$1]"))
    ))
    .bind(account_id)
    .fetch_optional(pool)
    .await?;
    let next_expiry = if row.is_some() { grants::next_expiry(pool, account_id).await? } else { None };
    Ok(row.map(|(account_id, currency, units, display_unit, per, lp, ld, reserved, pending, entries)| {
        BalanceView {
            account_id,
            currency,
            balance_units: units,
            balance: crate::money::units_to_usd_string(units),
            display_unit,
            display_balance: crate::money::units_to_coarse(units, per),
            reserved_units: reserved,
            pending_units: pending,
            effective_units: crate::money::effective_units(units, reserved, pending),
            last_purchase_at: lp,
            last_deduction_at: ld,
            entries,
            next_expiry,
        }
    }))
}
