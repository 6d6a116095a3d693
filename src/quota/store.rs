//! Postgres side of quotas and limits: reading the state (buckets, balances, plans,
//! limits and the changelog) for `quota::state`, plans and plan changes, spend limits.
//! Usage is *counted* by the ledger that writes it (`ledger::counting`).

use super::config::{CustomTerms, Cycle, OveragePolicy, Plan};
use super::window::{HOUR_SECS, floor_hour};
use crate::ledger::ops::{Amount, LedgerError, Posted, Posting, claim, finish, hash_payload, post};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};

/// One bucket with absolute totals (restore at start).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BucketRow {
    pub account_id: String,
    pub kind: String,
    pub key: String,
    pub hour: i64,
    pub events: i64,
    pub cost_units: i64,
}

/// One `state_changes` row: bucket increments, as parallel arrays.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ChangeRow {
    pub change_id: i64,
    pub xid: i64,
    pub accounts: Vec<String>,
    pub kinds: Vec<String>,
    pub keys: Vec<String>,
    pub hours: Vec<i64>,
    pub events: Vec<i64>,
    pub costs: Vec<i64>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct BalanceRow {
    pub account_id: String,
    pub balance_units: i64,
    pub reserved_units: i64,
    pub pending_units: i64,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub last_deduction_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, sqlx::FromRow)]
pub struct PlanRow {
    pub account_id: String,
    pub plan: String,
    pub period_anchor: DateTime<Utc>,
    pub custom_allocation_units: Option<i64>,
    pub custom_overage_policy: Option<String>,
    pub custom_soft_limit_percent: Option<i32>,
}

impl PlanRow {
    /// The row's custom terms (all three columns are set together: a CHECK).
    pub fn custom_terms(&self) -> Option<CustomTerms> {
        Some(CustomTerms {
            allocation_units: self.custom_allocation_units?,
            policy: OveragePolicy::parse(self.custom_overage_policy.as_deref()?)?,
            soft_limit_percent: u32::try_from(self.custom_soft_limit_percent?).ok()?,
        })
    }
}

/// Columns of a `PlanRow`.
const PLAN_COLUMNS: &str = "account_id, plan, period_anchor, custom_allocation_units, custom_overage_policy, custom_soft_limit_percent";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct LimitRow {
    pub account_id: String,
    pub scope: String,
    pub scope_id: String,
    pub monthly_limit_units: i64,
}

/// Everything the in-memory state holds, read from one snapshot. With `since_xid`
/// (`Some(xmin of the previous read)`) only what changed since then: bucket changes as
/// increments, the other tables as changed rows; without it, the whole state (buckets as
/// absolute totals from `oldest_hour` on) plus the ids of changes already in it.
#[derive(Debug, Default)]
pub struct StateRead {
    /// xmin of this read's snapshot: the next read asks for changes since it.
    pub xmin: i64,
    pub changes: Vec<ChangeRow>,
    /// (change_id, xid) of changes already counted in `buckets` (full read only).
    pub changes_included: Vec<(i64, i64)>,
    pub balances: Vec<BalanceRow>,
    pub plans: Vec<PlanRow>,
    pub limits: Vec<LimitRow>,
}

/// What a full read streams: a `usage_hourly` row (a bucket's total), then each change not
/// folded into it yet (increments on top).
pub enum Restored {
    Bucket(BucketRow),
    Change(ChangeRow),
}

/// Read the state (or its changes) in one REPEATABLE READ snapshot, so the xmin and the
/// rows agree.
///
/// A full read streams `usage_hourly`, then the changes not folded into it yet, into
/// `on_restore` (millions of rows for a million accounts, and up to a fold interval of
/// changes: never collected into one vector); `StateRead::changes` stays empty.
///
/// An incremental read leaves out the changes in `known` (already counted here, or this
/// process's own, which its writer counts): their arrays are a batch's worth of
/// increments each, and decoding them only to skip them was most of a read's cost.
pub async fn read_state(
    pool: &PgPool,
    since_xid: Option<i64>,
    known: &[i64],
    oldest_hour: DateTime<Utc>,
    mut on_restore: impl FnMut(Restored),
) -> Result<StateRead, sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY").execute(&mut *tx).await?;
    let (xmin,): (i64,) = sqlx::query_as("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
        .fetch_one(&mut *tx)
        .await?;
    // Full read: xid >= 0 selects every row; the changelog is then only listed.
    let since = since_xid.unwrap_or(0);
    let mut read = StateRead { xmin, ..StateRead::default() };
    if since_xid.is_some() {
        read.changes = sqlx::query_as(
            "SELECT change_id, xid::text::bigint AS xid, accounts, kinds, keys, hours, events, costs
             FROM state_changes WHERE xid >= $1::text::xid8 AND change_id <> ALL($2)
             ORDER BY change_id",
        )
        .bind(since.to_string())
        .bind(known)
        .fetch_all(&mut *tx)
        .await?;
    } else {
        let mut rows = sqlx::query_as::<_, BucketRow>(
            "SELECT account_id, kind, key, extract(epoch FROM hour)::bigint AS hour, events, cost_units
             FROM usage_hourly WHERE hour >= $1",
        )
        .bind(oldest_hour)
        .fetch(&mut *tx);
        while let Some(row) = futures::TryStreamExt::try_next(&mut rows).await? {
            on_restore(Restored::Bucket(row));
        }
        drop(rows);
        // Increments not yet folded into usage_hourly count on top of it.
        let mut changes = sqlx::query_as::<_, ChangeRow>(
            "SELECT change_id, xid::text::bigint AS xid, accounts, kinds, keys, hours, events, costs
             FROM state_changes WHERE NOT folded ORDER BY change_id",
        )
        .fetch(&mut *tx);
        while let Some(change) = futures::TryStreamExt::try_next(&mut changes).await? {
            on_restore(Restored::Change(change));
        }
        drop(changes);
        read.changes_included = sqlx::query_as(
            "SELECT change_id, xid::text::bigint FROM state_changes WHERE xid >= $1::text::xid8",
        )
        .bind(xmin.to_string())
        .fetch_all(&mut *tx)
        .await?;
    }
    read.balances = sqlx::query_as(
        "SELECT account_id, balance_units, reserved_units, pending_units, last_purchase_at, last_deduction_at
         FROM account_balances WHERE changed_xid >= $1::text::xid8",
    )
    .bind(since.to_string())
    .fetch_all(&mut *tx)
    .await?;
    read.plans = sqlx::query_as(&format!(
        "SELECT {PLAN_COLUMNS} FROM account_plans WHERE changed_xid >= $1::text::xid8"
    ))
    .bind(since.to_string())
    .fetch_all(&mut *tx)
    .await?;
    read.limits = sqlx::query_as(
        "SELECT account_id, scope, scope_id, monthly_limit_units FROM spend_limits
         WHERE changed_xid >= $1::text::xid8",
    )
    .bind(since.to_string())
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(read)
}

/// Set (or with `None`, remove) a monthly spend cap. Removal is recorded as a cap of
/// i64::MAX rather than a DELETE, so pollers see the change.
pub async fn set_limit(
    pool: &PgPool,
    account_id: &str,
    scope: &str,
    scope_id: &str,
    monthly_limit_units: Option<i64>,
) -> Result<(), LedgerError> {
    if !matches!(scope, "account" | "project" | "api_key") {
        return Err(LedgerError::Invalid(format!("unknown scope {scope}")));
    }
    if scope == "account" && !scope_id.is_empty() {
        return Err(LedgerError::Invalid("the account scope takes no id".into()));
    }
    if scope != "account" && (scope_id.is_empty() || scope_id.len() > 128) {
        return Err(LedgerError::Invalid(format!("{scope} limits need an id of 1..=128 bytes")));
    }
    let units = monthly_limit_units.unwrap_or(i64::MAX);
    if units <= 0 {
        return Err(LedgerError::Invalid("a limit must be positive".into()));
    }
    sqlx::query("INSERT INTO accounts (account_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(account_id)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO spend_limits (account_id, scope, scope_id, monthly_limit_units) VALUES ($1, $2, $3, $4)
         ON CONFLICT (account_id, scope, scope_id)
         DO UPDATE SET monthly_limit_units = $4, updated_at = clock_timestamp(),
                       changed_xid = pg_current_xact_id()",
    )
    .bind(account_id)
    .bind(scope)
    .bind(scope_id)
    .bind(units)
    .execute(pool)
    .await?;
    Ok(())
}

/// The result of a plan change (BroomVA's `changePlan`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanChange {
    pub account_id: String,
    pub old_plan: Option<String>,
    pub new_plan: String,
    /// `upgrade`, `downgrade`, `initial` or `no_change`.
    pub direction: String,
    pub credit_adjustment_units: i64,
    pub entry: Option<Posted>,
}

pub struct PlanChangeRequest<'a> {
    pub account_id: &'a str,
    pub new_plan: &'a super::config::Plan,
    /// The account's current plan with its custom terms ([`plan_of`]).
    pub old_plan: Option<&'a super::config::Plan>,
    /// The account's own terms on the new plan: operators only (enterprise).
    pub custom_terms: Option<CustomTerms>,
    /// An operator (the CLI) may assign plans that are not self-serve; the API may not.
    pub by_operator: bool,
    pub idempotency_key: &'a str,
    pub created_by: &'a str,
    pub now: DateTime<Utc>,
    pub cycle: super::config::Cycle,
}

/// The idempotency key of a plan change whose caller gave none: the account, the change
/// and how many changes the account has had. A retry of the same request (nothing changed
/// in between) gets the same key and replays; the same change made again later (pro -> free
/// -> pro -> free) is a new change, with a new key, and applies.
pub async fn default_plan_key(
    pool: &PgPool,
    account_id: &str,
    current: Option<&str>,
    new_plan: &str,
) -> Result<String, sqlx::Error> {
    let (changes,): (i64,) = sqlx::query_as("SELECT count(*) FROM plan_changes WHERE account_id = $1")
        .bind(account_id)
        .fetch_one(pool)
        .await?;
    Ok(format!("plan:{account_id}:{}:{new_plan}:#{changes}", current.unwrap_or("none")))
}

/// Change plan: upgrades credit the allocation difference prorated over the rest of the
/// period; downgrades cap the balance at the new allocation; same plan is a no-op; a
/// plan that is not self-serve (enterprise) is refused unless an operator assigns it.
/// Custom terms (operators only) replace the plan's allocation, policy and ceiling for this
/// account; changing them on the same plan is an upgrade or a downgrade by allocation.
/// One ledger entry + one audit row.
pub async fn change_plan(pool: &PgPool, req: &PlanChangeRequest<'_>) -> Result<PlanChange, LedgerError> {
    let old = req.old_plan;
    if req.custom_terms.is_some() && !req.by_operator {
        return Err(LedgerError::NotAllowed("custom plan terms are set by an operator".into()));
    }
    if let Some(t) = &req.custom_terms {
        t.validate().map_err(LedgerError::Invalid)?;
    }
    let new = req.new_plan.with_terms(req.custom_terms.as_ref());
    let new = new.as_ref();
    // The request is (account, target plan[, terms]): a retry under the same key replays
    // the first answer even though the account is on the target plan by then.
    let hash = match &req.custom_terms {
        None => hash_payload(&(req.account_id, &new.name)),
        Some(t) => hash_payload(&(req.account_id, &new.name, t)),
    };
    let mut tx = pool.begin().await?;
    if let Some(saved) = claim::<PlanChange>(&mut tx, req.idempotency_key, "plan_change", &hash).await? {
        return Ok(saved);
    }
    if old.is_some_and(|o| o == new) {
        return Ok(PlanChange {
            account_id: req.account_id.into(),
            old_plan: Some(new.name.clone()),
            new_plan: new.name.clone(),
            direction: "no_change".into(),
            credit_adjustment_units: 0,
            entry: None,
        });
    }
    if !new.self_serve && !req.by_operator && old.map(|o| o.rank < new.rank).unwrap_or(true) {
        return Err(LedgerError::NotAllowed(format!(
            "changing to the {} plan needs a conversation with sales",
            new.name
        )));
    }
    let anchor = current_anchor(&mut tx, req.account_id).await?.unwrap_or(req.now);
    let (start, end) = cycle_at(req.cycle, anchor, req.now);
    let upgrade =
        |o: &Plan| new.rank > o.rank || (new.rank == o.rank && new.allocation_units > o.allocation_units);
    let (direction, amount) = match old {
        Some(o) if upgrade(o) => (
            "upgrade",
            // A higher rank with a smaller allocation (enterprise's catalog allocation is a
            // placeholder) credits nothing rather than debiting the customer.
            Amount::Delta(prorate((new.allocation_units - o.allocation_units).max(0), req.now, start, end)),
        ),
        Some(_) => ("downgrade", Amount::CapBalanceAt(new.allocation_units)),
        None => ("initial", Amount::Delta(new.allocation_units)),
    };
    let posted = post(
        &mut tx,
        Posting {
            account_id: req.account_id,
            kind: if direction == "initial" { "plan_allocation" } else { "plan_change" },
            amount,
            idempotency_key: req.idempotency_key,
            payload_hash: &hash,
            description: format!("plan {} -> {}", old.map_or("none", |o| o.name.as_str()), new.name),
            created_by: Some(req.created_by),
            corrects_entry_id: None,
            metadata: serde_json::json!({"old_plan": old.map(|o| &o.name), "new_plan": new.name}),
            grants: vec![],
            burn_first: vec![],
        },
    )
    .await?;
    let terms = req.custom_terms.as_ref();
    // The allocation (initial) or the change posted here stands for the current cycle; the
    // next cycle's allocation is posted at its start (`post_due_cycles`). A change between
    // plans keeps the cycle already recorded.
    sqlx::query(
        "INSERT INTO account_plans (account_id, plan, period_anchor, custom_allocation_units,
             custom_overage_policy, custom_soft_limit_percent, cycle_start, next_cycle_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (account_id) DO UPDATE SET plan = $2, custom_allocation_units = $4,
             custom_overage_policy = $5, custom_soft_limit_percent = $6,
             cycle_start = COALESCE(account_plans.cycle_start, $7),
             next_cycle_at = COALESCE(account_plans.next_cycle_at, $8),
             updated_at = clock_timestamp(), changed_xid = pg_current_xact_id()",
    )
    .bind(req.account_id)
    .bind(&new.name)
    .bind(anchor)
    .bind(terms.map(|t| t.allocation_units))
    .bind(terms.map(|t| t.policy.as_str()))
    .bind(terms.map(|t| t.soft_limit_percent as i32))
    .bind(start)
    .bind(end)
    .execute(&mut *tx)
    .await?;
    if let Some(o) = old {
        sqlx::query(
            "INSERT INTO plan_changes (account_id, old_plan, new_plan, direction, credit_adjustment_units, entry_id, created_by)
             VALUES ($1, $2, $3, $4, $5, $6, $7)",
        )
        .bind(req.account_id)
        .bind(&o.name)
        .bind(&new.name)
        .bind(direction)
        .bind(posted.amount_units)
        .bind(posted.entry_id)
        .bind(req.created_by)
        .execute(&mut *tx)
        .await?;
    }
    let result = PlanChange {
        account_id: req.account_id.into(),
        old_plan: old.map(|o| o.name.clone()),
        new_plan: new.name.clone(),
        direction: direction.into(),
        credit_adjustment_units: posted.amount_units,
        entry: Some(posted),
    };
    finish(&mut tx, req.idempotency_key, &result).await?;
    tx.commit().await?;
    Ok(result)
}

/// The account's plan name (or quota tier), and that plan as the catalog `cfg` defines
/// it with the account's custom terms (None for a tier that is not a catalog plan).
pub async fn plan_of(
    pool: &PgPool,
    cfg: &super::config::QuotaConfig,
    account: &str,
) -> Result<(Option<String>, Option<Plan>), sqlx::Error> {
    let row: Option<PlanRow> =
        sqlx::query_as(&format!("SELECT {PLAN_COLUMNS} FROM account_plans WHERE account_id = $1"))
            .bind(account)
            .fetch_optional(pool)
            .await?;
    let Some(row) = row else {
        return Ok((None, None));
    };
    let plan = effective_plan(cfg, &row);
    Ok((Some(row.plan), plan))
}

/// Put an account on a quota tier that is not a credit plan (Reeve's free / pro /
/// enterprise): no allocation, so no ledger entry; the tier only selects quotas.
/// One upgrade or downgrade, as audited in `plan_changes` (each is also a ledger entry).
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditedPlanChange {
    pub change_id: i64,
    pub old_plan: String,
    pub new_plan: String,
    /// `upgrade` or `downgrade`.
    pub direction: String,
    /// Prorated credit (upgrade) or the cap's reduction (downgrade, negative), 1e-8 USD.
    pub credit_adjustment_units: i64,
    /// The ledger entry that recorded it.
    pub entry_id: i64,
    /// Who changed it (`token:<token id>` through the API, the operator's name from the CLI).
    pub created_by: String,
    pub created_at: DateTime<Utc>,
}

/// An account's plan changes, newest first: those with `change_id < before` (or the
/// newest), at most `limit`.
pub async fn plan_changes(
    pool: &PgPool,
    account_id: &str,
    before: Option<i64>,
    limit: i64,
) -> Result<Vec<AuditedPlanChange>, sqlx::Error> {
    sqlx::query_as(
        "SELECT change_id, old_plan, new_plan, direction, credit_adjustment_units, entry_id, created_by,
                created_at
         FROM plan_changes WHERE account_id = $1 AND change_id < $2
         ORDER BY change_id DESC LIMIT $3",
    )
    .bind(account_id)
    .bind(before.unwrap_or(i64::MAX))
    .bind(limit.clamp(1, 500))
    .fetch_all(pool)
    .await
}

pub async fn set_tier(
    pool: &PgPool,
    account: &str,
    tier: &str,
    now: DateTime<Utc>,
) -> Result<(), sqlx::Error> {
    sqlx::query("INSERT INTO accounts (account_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(account)
        .execute(pool)
        .await?;
    sqlx::query(
        "INSERT INTO account_plans (account_id, plan, period_anchor) VALUES ($1, $2, $3)
         ON CONFLICT (account_id) DO UPDATE SET plan = $2, custom_allocation_units = NULL,
             custom_overage_policy = NULL, custom_soft_limit_percent = NULL,
             cycle_start = NULL, next_cycle_at = NULL,
             updated_at = clock_timestamp(), changed_xid = pg_current_xact_id()",
    )
    .bind(account)
    .bind(tier)
    .bind(now)
    .execute(pool)
    .await?;
    Ok(())
}

async fn current_anchor(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    let row: Option<(DateTime<Utc>,)> =
        sqlx::query_as("SELECT period_anchor FROM account_plans WHERE account_id = $1 FOR UPDATE")
            .bind(account)
            .fetch_optional(&mut **tx)
            .await?;
    Ok(row.map(|r| r.0))
}

/// `diff x remaining / period`, rounded half to even; whole hours, like the buckets.
pub fn prorate(diff_units: i64, now: DateTime<Utc>, start: DateTime<Utc>, end: DateTime<Utc>) -> i64 {
    let total = (end - start).num_seconds().max(1);
    let remaining = (end - now).num_seconds().clamp(0, total);
    let exact = rust_decimal::Decimal::from(diff_units) * rust_decimal::Decimal::from(remaining)
        / rust_decimal::Decimal::from(total);
    i64::try_from(exact.round_dp_with_strategy(0, crate::money::ROUNDING)).unwrap_or(0)
}

/// Oldest bucket the state keeps: 40 days covers the 30-day window and any month.
pub fn retention_start(now: DateTime<Utc>) -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(floor_hour(now) - 40 * 24 * HOUR_SECS, 0).expect("in range")
}

/// Most due accounts handled per call of [`post_due_cycles`] (a limit on every batch).
pub const CYCLES_PER_CALL_MAX: i64 = 500;

/// Post every due account's cycle allocation (issue 11.4, one model of a plan): at the
/// start of each cycle (calendar month, or 30 days from the plan's anchor) the account's
/// balance is set to its plan's allocation, custom terms included, by one `plan_reset`
/// entry keyed `plan_cycle:<account>:<cycle start, Unix seconds>` (no rollover). Exactly
/// once per account per cycle: the row is taken `FOR UPDATE SKIP LOCKED` (another
/// instance posting it is skipped), the key is claimed, and `next_cycle_at` moves to the
/// cycle's end in the same transaction. After downtime spanning boundaries, only the
/// current cycle is posted (a reset sets the balance; the cycles missed would have been
/// overwritten by it). Returns how many cycles were posted.
pub async fn post_due_cycles(
    pool: &PgPool,
    cfg: &super::config::QuotaConfig,
    now: DateTime<Utc>,
) -> Result<usize, LedgerError> {
    let due: Vec<(String,)> = sqlx::query_as(
        "SELECT account_id FROM account_plans WHERE next_cycle_at <= $1 ORDER BY next_cycle_at LIMIT $2",
    )
    .bind(now)
    .bind(CYCLES_PER_CALL_MAX)
    .fetch_all(pool)
    .await?;
    let mut posted = 0;
    for (account,) in &due {
        if post_cycle(pool, cfg, account, now).await? {
            posted += 1;
        }
    }
    Ok(posted)
}

async fn post_cycle(
    pool: &PgPool,
    cfg: &super::config::QuotaConfig,
    account: &str,
    now: DateTime<Utc>,
) -> Result<bool, LedgerError> {
    let mut tx = pool.begin().await?;
    // Lock order as in change_plan: the plan row, then the balance (in `post`).
    let row: Option<PlanRow> = sqlx::query_as(&format!(
        "SELECT {PLAN_COLUMNS} FROM account_plans
         WHERE account_id = $1 AND next_cycle_at <= $2 FOR UPDATE SKIP LOCKED"
    ))
    .bind(account)
    .bind(now)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(false); // posted meanwhile, or being posted by another instance
    };
    let Some(plan) = effective_plan(cfg, &row) else {
        // The plan left the catalog: nothing to allocate until the account gets a plan.
        sqlx::query("UPDATE account_plans SET next_cycle_at = NULL WHERE account_id = $1")
            .bind(account)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        return Ok(false);
    };
    let (start, end) = cycle_at(cfg.cycle, row.period_anchor, now);
    let key = format!("plan_cycle:{account}:{}", start.timestamp());
    // The key names the cycle; the terms may differ between instances' catalogs, never the cycle.
    let hash = hash_payload(&(account, start.timestamp()));
    if claim::<serde_json::Value>(&mut tx, &key, "plan_cycle", &hash).await?.is_none() {
        let posted = post(
            &mut tx,
            Posting {
                account_id: account,
                kind: "plan_reset",
                amount: Amount::ResetTo(plan.allocation_units),
                idempotency_key: &key,
                payload_hash: &hash,
                description: format!(
                    "{} plan allocation, cycle from {}",
                    plan.name,
                    start.format("%Y-%m-%d %H:%M UTC")
                ),
                created_by: None,
                corrects_entry_id: None,
                metadata: serde_json::json!({
                    "plan": plan.name, "cycle_start": start, "cycle_end": end,
                    "allocation_units": plan.allocation_units,
                }),
                grants: vec![],
                burn_first: vec![],
            },
        )
        .await?;
        finish(&mut tx, &key, &posted).await?;
    }
    sqlx::query("UPDATE account_plans SET cycle_start = $2, next_cycle_at = $3 WHERE account_id = $1")
        .bind(account)
        .bind(start)
        .bind(end)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(true)
}

/// Accounts on a catalog plan whose cycle was never recorded (rows from before cycles
/// were posted): their current balance stands for the current cycle, and the next one is
/// posted at its start. Run once at `tally run` start; returns how many were adopted.
pub async fn adopt_plan_cycles(
    pool: &PgPool,
    cfg: &super::config::QuotaConfig,
    now: DateTime<Utc>,
) -> Result<usize, sqlx::Error> {
    let names: Vec<&str> = cfg.plans.keys().map(String::as_str).collect();
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT account_id, period_anchor FROM account_plans WHERE next_cycle_at IS NULL AND plan = ANY($1)",
    )
    .bind(&names)
    .fetch_all(pool)
    .await?;
    for (account, anchor) in &rows {
        let (start, end) = cycle_at(cfg.cycle, *anchor, now);
        sqlx::query(
            "UPDATE account_plans SET cycle_start = $2, next_cycle_at = $3
             WHERE account_id = $1 AND next_cycle_at IS NULL",
        )
        .bind(account)
        .bind(start)
        .bind(end)
        .execute(pool)
        .await?;
    }
    Ok(rows.len())
}

/// The cycle containing `now`: the calendar month, or the 30-day cycle from `anchor`.
pub fn cycle_at(cycle: Cycle, anchor: DateTime<Utc>, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    match cycle {
        Cycle::CalendarMonth => super::window::calendar_month(now),
        Cycle::Anchored30d => super::window::anchored_cycle(anchor, now),
    }
}

/// A plan row's plan as the catalog defines it, with the account's custom terms.
fn effective_plan(cfg: &super::config::QuotaConfig, row: &PlanRow) -> Option<Plan> {
    Some(cfg.plans.get(&row.plan)?.with_terms(row.custom_terms().as_ref()).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proration_credits_the_remaining_share_half_to_even() {
        let t = |s: &str| DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc);
        let (start, end) = (t("2026-11-01T00:00:00Z"), t("2026-12-01T00:00:00Z"));
        assert_eq!(prorate(3_000, t("2026-11-16T00:00:00Z"), start, end), 1_500);
        assert_eq!(prorate(3_000, start, start, end), 3_000);
        assert_eq!(prorate(3_000, end, start, end), 0);
        assert_eq!(prorate(1, t("2026-11-16T00:00:00Z"), start, end), 0); // 0.5 -> 0 (even)
    }
}
