//! The Postgres side of re-rating: catalog versions, runs, the events' current costs, and
//! one account-period's correction in one transaction.

use super::Period;
use crate::event::UsageEvent;
use crate::ledger::ops::{Amount, LedgerError, Posting, hash_payload, post_at};
use crate::pricing::{Catalog, Charge};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};

/// Key of the session advisory lock one run holds: one re-rate at a time, so the "cost
/// now" a run reads cannot change under it (another run is the only writer of it).
pub const RERATE_LOCK_KEY: i64 = 0x7461_6c6c_7972_7274; // "tallyrrt"

/// Ids per statement when asking about events (bounded statement size).
const IDS_PER_STATEMENT_MAX: usize = 10_000;

/// Store a catalog's text under its version (once).
pub async fn register_catalog(pool: &PgPool, catalog: &Catalog) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO catalog_versions (catalog_version, name, origin, catalog_text)
         VALUES ($1, $2, $3, $4) ON CONFLICT (catalog_version) DO NOTHING",
    )
    .bind(catalog.version())
    .bind(catalog.name())
    .bind(catalog.origin())
    .bind(catalog.text())
    .execute(pool)
    .await?;
    Ok(())
}

/// What a run was asked, recorded before it changes anything.
pub struct RunRecord<'a> {
    pub run_id: &'a str,
    pub catalog_version: &'a str,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub account: Option<&'a str>,
    pub model: Option<&'a str>,
    pub created_by: &'a str,
    pub reason: &'a str,
}

pub async fn start_run(pool: &PgPool, r: &RunRecord<'_>) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO rerate_runs (run_id, catalog_version, period_from, period_to, account_id, model,
                                  created_by, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(r.run_id)
    .bind(r.catalog_version)
    .bind(r.from)
    .bind(r.to)
    .bind(r.account)
    .bind(r.model)
    .bind(r.created_by)
    .bind(r.reason)
    .execute(pool)
    .await?;
    Ok(())
}

pub async fn finish_run(pool: &PgPool, run_id: &str, total: &super::Totals) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rerate_runs SET finished_at = now(), events_affected = $2, old_cost_units = $3,
                                new_cost_units = $4
         WHERE run_id = $1",
    )
    .bind(run_id)
    .bind(i64::try_from(total.events).unwrap_or(i64::MAX))
    .bind(total.old_cost_units)
    .bind(total.new_cost_units)
    .execute(pool)
    .await?;
    Ok(())
}

/// The cost now (after earlier re-rates) of the corrected events of `accounts` in
/// `period`: event id -> (cost, catalog cost). Events absent cost what they were billed.
pub async fn current_costs(
    pool: &PgPool,
    accounts: &[&str],
    period: &Period,
) -> Result<HashMap<String, (i64, i64)>, sqlx::Error> {
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT DISTINCT ON (event_id) event_id, cost_after_units, catalog_cost_after_units
         FROM usage_corrections
         WHERE account_id = ANY($1) AND occurred_at >= $2 AND occurred_at < $3
         ORDER BY event_id, seq DESC",
    )
    .bind(accounts)
    .bind(period.from)
    .bind(period.to)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().map(|(id, cost, catalog)| (id, (cost, catalog))).collect())
}

/// Which of these events have been applied (their batch committed: the claim's group has
/// moved its partition's `next_offset` past them) and were billed at `billed_units` (the
/// usage log's cost; a mismatch would mean the two stores disagree, and is left alone).
pub async fn applied_events(pool: &PgPool, events: &[(&str, i64)]) -> Result<HashSet<String>, sqlx::Error> {
    let mut applied = HashSet::with_capacity(events.len());
    for chunk in events.chunks(IDS_PER_STATEMENT_MAX) {
        let ids: Vec<&str> = chunk.iter().map(|(id, _)| *id).collect();
        let billed: Vec<i64> = chunk.iter().map(|(_, c)| *c).collect();
        let rows: Vec<(String,)> = sqlx::query_as(
            "SELECT pe.event_id
             FROM UNNEST($1::text[], $2::bigint[]) AS u(e, c)
             JOIN processed_events pe ON pe.event_id = u.e AND pe.cost_units = u.c
             JOIN consumer_offsets co ON co.group_id = pe.source_group AND co.topic = pe.source_topic
                                     AND co.partition = pe.source_partition
             WHERE pe.source_offset < co.next_offset",
        )
        .bind(&ids)
        .bind(&billed)
        .fetch_all(pool)
        .await?;
        applied.extend(rows.into_iter().map(|(id,)| id));
    }
    Ok(applied)
}

/// One event whose cost changes.
pub struct Changed {
    /// The event as rebuilt from its row (ids, dimensions, units).
    pub event: UsageEvent,
    /// The catalog version that first priced it.
    pub catalog_version: String,
    /// What the usage log says it was billed (checked against the dedup store).
    pub billed_units: i64,
    /// (cost, catalog cost) now, before this run.
    pub before: (i64, i64),
    pub after: Charge,
}

/// Who corrects, with what, why.
pub struct CorrectionContext<'a> {
    pub run_id: &'a str,
    pub catalog_version: &'a str,
    pub created_by: &'a str,
    pub reason: &'a str,
    /// See [`super::RerateOptions::fault_abort_after_commits`].
    pub fault_abort_after_commits: Option<u64>,
}

/// Write one account-period's correction: the per-event rows, one `correction` entry of
/// `old - new` (a credit when the price fell), and its `rerate_corrections` row, in one
/// transaction. Returns the entry id. The key `rerate:<run>:<account>:<YYYY-MM>` makes a
/// retry of the same run and period a no-op rather than a second entry.
pub async fn commit_correction(
    pool: &PgPool,
    cx: &CorrectionContext<'_>,
    account: &str,
    period: &Period,
    changed: &[Changed],
) -> Result<i64, LedgerError> {
    assert!(!changed.is_empty(), "only an account-period with changes is corrected");
    let old: i64 = changed.iter().map(|c| c.before.0).sum();
    let new: i64 = changed.iter().map(|c| c.after.cost_units).sum();
    let mut versions_before: Vec<&str> = changed.iter().map(|c| c.catalog_version.as_str()).collect();
    versions_before.sort_unstable();
    versions_before.dedup();
    let key = format!("rerate:{}:{}:{}", cx.run_id, account, period.label());
    let payload = serde_json::json!({
        "run_id": cx.run_id, "account_id": account,
        "period_from": period.from, "period_to": period.to,
        "events": changed.len(), "old_cost_units": old, "new_cost_units": new,
        "catalog_version": cx.catalog_version, "catalog_versions_before": versions_before,
    });
    let hash = hash_payload(&payload);
    let mut tx = pool.begin().await?;
    let mut rows = CorrectionRows::default();
    for c in changed {
        rows.push(c);
    }
    rows.insert(&mut tx, cx.run_id).await?;
    let posted = post_at(
        &mut tx,
        Posting {
            account_id: account,
            kind: "correction",
            amount: Amount::Delta(old - new),
            idempotency_key: &key,
            payload_hash: &hash,
            description: cx.reason.to_string(),
            created_by: Some(cx.created_by),
            corrects_entry_id: None,
            metadata: payload,
            grants: vec![],
            burn_first: vec![],
        },
        period.from,
    )
    .await?;
    sqlx::query(
        "INSERT INTO rerate_corrections (run_id, account_id, period_from, period_to, entry_id, events,
                                         old_cost_units, new_cost_units)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
    )
    .bind(cx.run_id)
    .bind(account)
    .bind(period.from)
    .bind(period.to)
    .bind(posted.entry_id)
    .bind(i64::try_from(changed.len()).unwrap_or(i64::MAX))
    .bind(old)
    .bind(new)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(posted.entry_id)
}

/// Column arrays for one `INSERT ... UNNEST` of per-event correction rows.
#[derive(Default)]
struct CorrectionRows<'a> {
    event: Vec<&'a str>,
    account: Vec<&'a str>,
    occurred: Vec<DateTime<Utc>>,
    project: Vec<&'a str>,
    api_key: Vec<&'a str>,
    provider: Vec<&'a str>,
    model: Vec<&'a str>,
    modality: Vec<&'a str>,
    cost_before: Vec<i64>,
    cost_after: Vec<i64>,
    catalog_before: Vec<i64>,
    catalog_after: Vec<i64>,
    price_entry: Vec<String>,
}

impl<'a> CorrectionRows<'a> {
    fn push(&mut self, c: &'a Changed) {
        let e = &c.event;
        self.event.push(&e.event_id);
        self.account.push(&e.account_id);
        self.occurred.push(e.occurred_at);
        self.project.push(e.project_id.as_deref().unwrap_or(""));
        self.api_key.push(e.api_key_id.as_deref().unwrap_or(""));
        self.provider.push(&e.provider);
        self.model.push(&e.model);
        self.modality.push(e.modality.as_str());
        self.cost_before.push(c.before.0);
        self.cost_after.push(c.after.cost_units);
        self.catalog_before.push(c.before.1);
        self.catalog_after.push(c.after.catalog_cost_units);
        self.price_entry.push(c.after.price_entry());
    }

    async fn insert(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
        run_id: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO usage_corrections
               (run_id, event_id, account_id, occurred_at, project_id, api_key_id, provider, model,
                modality, cost_before_units, cost_after_units, catalog_cost_before_units,
                catalog_cost_after_units, price_entry)
             SELECT $1, e, a, t, p, k, pr, m, mo, cb, ca, kb, ka, pe
             FROM UNNEST($2::text[], $3::text[], $4::timestamptz[], $5::text[], $6::text[], $7::text[],
                         $8::text[], $9::text[], $10::bigint[], $11::bigint[], $12::bigint[],
                         $13::bigint[], $14::text[])
                  AS u(e, a, t, p, k, pr, m, mo, cb, ca, kb, ka, pe)",
        )
        .bind(run_id)
        .bind(&self.event)
        .bind(&self.account)
        .bind(&self.occurred)
        .bind(&self.project)
        .bind(&self.api_key)
        .bind(&self.provider)
        .bind(&self.model)
        .bind(&self.modality)
        .bind(&self.cost_before)
        .bind(&self.cost_after)
        .bind(&self.catalog_before)
        .bind(&self.catalog_after)
        .bind(&self.price_entry)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }
}

/// A committed account-period correction whose rows may not be in ClickHouse yet.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Unpublished {
    pub run_id: String,
    pub account_id: String,
    pub period_from: DateTime<Utc>,
    pub period_to: DateTime<Utc>,
}

pub async fn unpublished(pool: &PgPool) -> Result<Vec<Unpublished>, sqlx::Error> {
    sqlx::query_as(
        "SELECT run_id, account_id, period_from, period_to FROM rerate_corrections
         WHERE published_at IS NULL ORDER BY run_id, account_id, period_from",
    )
    .fetch_all(pool)
    .await
}

/// One per-event correction row as ClickHouse stores it (`usage_corrections`, column
/// order).
#[derive(Debug, Clone, clickhouse::Row, serde::Serialize)]
pub struct PublishedRow {
    pub run_id: String,
    pub event_id: String,
    pub occurred_at: u32,
    pub account_id: String,
    pub project_id: String,
    pub api_key_id: String,
    pub provider: String,
    pub model: String,
    pub modality: String,
    pub cost_before_units: i64,
    pub cost_after_units: i64,
    pub cost_delta_units: i64,
    pub catalog_cost_delta_units: i64,
    pub catalog_version: String,
    pub price_entry: String,
    pub corrected_at: u32,
}

#[derive(sqlx::FromRow)]
struct StoredCorrection {
    run_id: String,
    event_id: String,
    occurred_at: DateTime<Utc>,
    account_id: String,
    project_id: String,
    api_key_id: String,
    provider: String,
    model: String,
    modality: String,
    cost_before_units: i64,
    cost_after_units: i64,
    catalog_cost_before_units: i64,
    catalog_cost_after_units: i64,
    catalog_version: String,
    price_entry: String,
    started_at: DateTime<Utc>,
}

/// DateTime('UTC') seconds (times here come from usage_log rows, so they fit).
fn epoch_secs(t: DateTime<Utc>) -> u32 {
    u32::try_from(t.timestamp()).unwrap_or(0)
}

/// The rows of one account-period correction, for ClickHouse.
pub async fn correction_rows(pool: &PgPool, u: &Unpublished) -> Result<Vec<PublishedRow>, sqlx::Error> {
    let rows: Vec<StoredCorrection> = sqlx::query_as(
        "SELECT c.run_id, c.event_id, c.occurred_at, c.account_id, c.project_id, c.api_key_id,
                c.provider, c.model, c.modality, c.cost_before_units, c.cost_after_units,
                c.catalog_cost_before_units, c.catalog_cost_after_units, r.catalog_version,
                c.price_entry, r.started_at
         FROM usage_corrections c JOIN rerate_runs r USING (run_id)
         WHERE c.run_id = $1 AND c.account_id = $2 AND c.occurred_at >= $3 AND c.occurred_at < $4
         ORDER BY c.event_id",
    )
    .bind(&u.run_id)
    .bind(&u.account_id)
    .bind(u.period_from)
    .bind(u.period_to)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|c| PublishedRow {
            cost_delta_units: c.cost_after_units - c.cost_before_units,
            catalog_cost_delta_units: c.catalog_cost_after_units - c.catalog_cost_before_units,
            occurred_at: epoch_secs(c.occurred_at),
            corrected_at: epoch_secs(c.started_at),
            run_id: c.run_id,
            event_id: c.event_id,
            account_id: c.account_id,
            project_id: c.project_id,
            api_key_id: c.api_key_id,
            provider: c.provider,
            model: c.model,
            modality: c.modality,
            cost_before_units: c.cost_before_units,
            cost_after_units: c.cost_after_units,
            catalog_version: c.catalog_version,
            price_entry: c.price_entry,
        })
        .collect())
}

pub async fn mark_published(pool: &PgPool, u: &Unpublished) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE rerate_corrections SET published_at = now()
         WHERE run_id = $1 AND account_id = $2 AND period_from = $3",
    )
    .bind(&u.run_id)
    .bind(&u.account_id)
    .bind(u.period_from)
    .execute(pool)
    .await?;
    Ok(())
}
