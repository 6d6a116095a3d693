//! Usage counting, written by the ledger in the same transaction as the debits it counts:
//! per-event counters (account spend, project, API key, feature quota) in hourly buckets,
//! appended as one `state_changes` row per transaction; `fold_changes` later aggregates
//! them into `usage_hourly`. `quota::state` reads both; the quota side never writes usage.
//!
//! **Hourly buckets.** An event at time `t` counts in the bucket keyed `floor_hour(t)`,
//! the hour's start in UTC epoch seconds (see `quota::window` for the windows over them).

use crate::batch::ValidItem;
use crate::event::Status;
use chrono::{DateTime, Utc};
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::BTreeMap;

pub const HOUR_SECS: i64 = 3_600;

/// The bucket an instant counts in: its hour's start, epoch seconds.
pub fn floor_hour(t: DateTime<Utc>) -> i64 {
    t.timestamp().div_euclid(HOUR_SECS) * HOUR_SECS
}

type BucketKey<'a> = (&'a str, &'static str, &'a str, i64);

/// Bucket increments keyed by (account, kind, key, hour start in epoch seconds), each
/// (events, cost units). A `BTreeMap` so rows are upserted in key order: concurrent
/// writers lock bucket rows in the same order and cannot deadlock.
pub type Increments<'a> = BTreeMap<BucketKey<'a>, (i64, i64)>;

/// One `state_changes` row: its id and the xid of the transaction that wrote it (see
/// `quota::state` for how instances read them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChangeRef {
    pub change_id: i64,
    pub xid: i64,
}

/// The counters one event adds to, as (kind, key): the counting rule, in one place.
/// `account` (spend and events), `project/<id>`, `api_key/<id>` (spend), and
/// `feature/<name>` for successful calls only (failed calls consume no quota).
pub fn counters_of(v: &ValidItem) -> impl Iterator<Item = (&'static str, &str)> {
    let e = &v.event;
    let feature = match (&e.feature, e.status) {
        (Some(f), Status::Success) => Some(("feature", f.as_str())),
        _ => None,
    };
    std::iter::once(("account", ""))
        .chain(e.project_id.as_deref().map(|p| ("project", p)))
        .chain(e.api_key_id.as_deref().map(|k| ("api_key", k)))
        .chain(feature)
}

/// What a batch's new events add to the hourly buckets. Pure.
pub fn usage_increments(new_events: &[ValidItem]) -> Increments<'_> {
    let mut buckets = Increments::new();
    for v in new_events {
        let at = (v.event.account_id.as_str(), floor_hour(v.event.occurred_at), v.charge.cost_units);
        for (kind, key) in counters_of(v) {
            add(&mut buckets, at, kind, key);
        }
    }
    buckets
}

/// Record the batch's new events' bucket increments as one `state_changes` row, in the
/// same transaction as the debits (so a replayed event, which is not new, is never counted
/// twice). Returns that row, `None` if nothing was counted. The increments reach
/// `usage_hourly` later, aggregated, through [`fold_changes`].
pub(crate) async fn count_usage(
    tx: &mut Transaction<'_, Postgres>,
    new_events: &[ValidItem],
) -> Result<Option<ChangeRef>, sqlx::Error> {
    record(tx, &usage_increments(new_events)).await
}

/// Append bucket increments to the changelog that every instance reads.
async fn record(
    tx: &mut Transaction<'_, Postgres>,
    buckets: &Increments<'_>,
) -> Result<Option<ChangeRef>, sqlx::Error> {
    if buckets.is_empty() {
        return Ok(None);
    }
    let accounts: Vec<&str> = buckets.keys().map(|k| k.0).collect();
    let kinds: Vec<&str> = buckets.keys().map(|k| k.1).collect();
    let keys: Vec<&str> = buckets.keys().map(|k| k.2).collect();
    let hours: Vec<i64> = buckets.keys().map(|k| k.3).collect();
    let events: Vec<i64> = buckets.values().map(|v| v.0).collect();
    let costs: Vec<i64> = buckets.values().map(|v| v.1).collect();
    let (change_id, xid): (i64, i64) = sqlx::query_as(
        "INSERT INTO state_changes (accounts, kinds, keys, hours, events, costs)
         VALUES ($1, $2, $3, $4, $5, $6)
         RETURNING change_id, xid::text::bigint",
    )
    .bind(&accounts)
    .bind(&kinds)
    .bind(&keys)
    .bind(&hours)
    .bind(&events)
    .bind(&costs)
    .fetch_one(&mut **tx)
    .await?;
    Ok(Some(ChangeRef { change_id, xid }))
}

/// Changes folded per transaction by [`fold_changes`]: a fold interval's worth for a few
/// instances (one change per batch, 4 batches/s each at the least), so that one fold
/// aggregates the whole interval and upserts each bucket once: folding it in slices would
/// upsert the buckets every slice touches, again per slice. The aggregation streams the
/// increments and keeps one entry per distinct bucket.
pub const FOLD_CHANGES_MAX: i64 = 5_000;

/// Fold unfolded `state_changes` into `usage_hourly`, aggregated (many increments of one
/// bucket become one upsert), and mark them folded, in one transaction: any snapshot sees
/// each change either unfolded or counted in `usage_hourly`, never both (the restore reads
/// both). One instance folds at a time (a transaction-level advisory lock); the others
/// skip. Off the hot path: `tally run`'s housekeeping calls it every 5 minutes. Returns
/// how many changes were folded.
pub async fn fold_changes(pool: &PgPool) -> Result<u64, sqlx::Error> {
    /// Advisory lock key of the fold ("tally fold" in ASCII).
    const FOLD_LOCK: i64 = 0x7461_6c6c_7966_6f6c;
    let mut tx = pool.begin().await?;
    let (locked,): (bool,) =
        sqlx::query_as("SELECT pg_try_advisory_xact_lock($1)").bind(FOLD_LOCK).fetch_one(&mut *tx).await?;
    if !locked {
        return Ok(0);
    }
    let ids: Vec<(i64,)> =
        sqlx::query_as("SELECT change_id FROM state_changes WHERE NOT folded ORDER BY change_id LIMIT $1")
            .bind(FOLD_CHANGES_MAX)
            .fetch_all(&mut *tx)
            .await?;
    if ids.is_empty() {
        return Ok(0);
    }
    let ids: Vec<i64> = ids.into_iter().map(|(id,)| id).collect();
    // One statement aggregates up to millions of increments: let the hash aggregate and
    // the sort stay in memory (the 4 MB default spills to disk at a few hundred thousand).
    sqlx::query("SET LOCAL work_mem = '128MB'").execute(&mut *tx).await?;
    // Key order: the fold is the only writer of usage_hourly, and sorted upserts keep it
    // that way cheap to reason about (no lock-order cycles whoever else comes along).
    sqlx::query(
        "INSERT INTO usage_hourly AS h (account_id, kind, key, hour, events, cost_units)
         SELECT u.a, u.k, u.ky, to_timestamp(u.hr), sum(u.ev), sum(u.co)
         FROM state_changes c,
              UNNEST(c.accounts, c.kinds, c.keys, c.hours, c.events, c.costs) AS u(a, k, ky, hr, ev, co)
         WHERE c.change_id = ANY($1)
         GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4
         ON CONFLICT (account_id, kind, key, hour) DO UPDATE
         SET events = h.events + EXCLUDED.events, cost_units = h.cost_units + EXCLUDED.cost_units,
             updated_at = clock_timestamp()",
    )
    .bind(&ids)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE state_changes SET folded = true WHERE change_id = ANY($1)")
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(ids.len() as u64)
}

/// Deductions reported through the API (Reeve) are spend too: add them to the account's
/// bucket of the hour they were recorded, in the deduction's transaction, so spend caps
/// and plan consumption see them. They name no project, key or feature.
pub(crate) async fn count_deductions(
    tx: &mut Transaction<'_, Postgres>,
    deductions: &[(&str, i64)],
    at: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    let mut buckets = Increments::new();
    for (account, units) in deductions {
        add(&mut buckets, (account, floor_hour(at), *units), "account", "");
    }
    record(tx, &buckets).await.map(|_| ())
}

/// One event into one bucket: (account, hour, cost) x (kind, key).
fn add<'a>(
    buckets: &mut Increments<'a>,
    (account, hour, cost): (&'a str, i64, i64),
    kind: &'static str,
    key: &'a str,
) {
    let slot = buckets.entry((account, kind, key, hour)).or_default();
    slot.0 += 1;
    slot.1 += cost;
}

/// Delete folded changelog rows older than `before` (never an unfolded one). Instances that were not able to read for
/// longer than the retention restore the whole state instead (see `quota::state`).
pub async fn prune_changes(pool: &PgPool, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let done = sqlx::query("DELETE FROM state_changes WHERE folded AND created_at < $1")
        .bind(before)
        .execute(pool)
        .await?;
    Ok(done.rows_affected())
}
