//! Reservations: two-phase holds against the effective balance (Struere's flow,
//! TigerBeetle's pending transfers).
//!
//! ```text
//!  reserve ──► active (amount held) ──settle(actual)──► settling (actual pending) ──event──► settled
//!                 │  └──────────────── usage event with reservation_id ─────────────────► settled
//!                 ├── release / failed usage event ──► released        settling ──ttl──► settled
//!                 └── ttl passes while active ──► expired                (debit of the settled amount)
//! ```
//!
//! `effective balance = balance - reserved - pending`. **A settle ends in exactly one
//! debit**: whichever comes first of the usage event carrying the reservation id (debits
//! the event's own price, and closes the hold) or the hold's deadline (debits the settled
//! amount, entry kind `reservation_settle`, key `reservation:{id}:deadline`); the other finds
//! it done: a settle after the event returns the settled reservation, and an event after
//! the deadline is recorded with charge 0 (`ChargeReason::PaidByHold`), so usage counters and
//! the usage log do not count the money twice. Both paths decide under the account's
//! balance row lock, so two instances (or the pipeline and the expiry task) cannot both
//! debit. A hold that was never settled and never used expires with no debit (no usage
//! was reported).
//! Operations that add a hold (reserve, holding authorize) first take the account's holds
//! lock (its `accounts` row), so concurrent ones serialize on the account and can never
//! overdraw it; state changes that debit or close holds lock the balance row, then the
//! reservation row. `reserved_units` / `pending_units` on the balance row are a projection
//! of the open hold rows ([`open_holds_sql`], [`write_projections`]).

use super::ops::{LedgerError, claim, finish, hash_payload};
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Postgres, Transaction};

/// The columns of a [`Reservation`], for `SELECT` and `RETURNING`.
pub(super) const COLUMNS: &str = "reservation_id, account_id, kind, feature, amount_units, pending_units, actual_units, \
                       status, expires_at, created_at";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, sqlx::FromRow)]
pub struct Reservation {
    pub reservation_id: String,
    pub account_id: String,
    /// `reservation` (a hold of an amount) or `authorization` (a holding authorize: one
    /// unit of a feature's quota plus an estimate, which may be zero).
    pub kind: String,
    /// The feature whose quota unit an authorization holds.
    pub feature: Option<String>,
    pub amount_units: i64,
    pub pending_units: i64,
    pub actual_units: Option<i64>,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReserveRequest {
    pub account_id: String,
    pub reservation_id: String,
    pub amount_units: i64,
    pub ttl_secs: u32,
    /// How far below zero the effective balance may go with this hold: 0 for a prepaid
    /// wallet or a hard-limit plan, the soft ceiling over the allocation for a soft-limit
    /// plan, i64::MAX for a warn plan (`quota::decide::overdraft_units`): the same rule as
    /// authorize, on the same balance.
    pub overdraft_units: i64,
}

/// Hold `amount_units` if the effective balance (plus the plan's overdraft) covers it. Idempotent by reservation id:
/// repeating the same request returns the same reservation.
pub async fn reserve(pool: &PgPool, req: &ReserveRequest) -> Result<Reservation, LedgerError> {
    if req.amount_units <= 0 || req.amount_units > crate::money::INPUT_UNITS_MAX {
        return Err(LedgerError::Invalid(format!(
            "amount must be positive and at most {} USD",
            crate::money::INPUT_USD_MAX
        )));
    }
    if req.reservation_id.is_empty() || req.reservation_id.len() > 128 {
        return Err(LedgerError::Invalid("reservation id must be 1..=128 bytes".into()));
    }
    let key = format!("reserve:{}", req.reservation_id);
    let hash = hash_payload(&(&req.account_id, req.amount_units));
    let mut tx = pool.begin().await?;
    if let Some(saved) = claim::<Reservation>(&mut tx, &key, "reserve", &hash).await? {
        return Ok(saved);
    }
    // Holds are added under the account's holds lock (shared with holding authorize), then
    // the balance lock (expiry may bill a settled hold).
    lock_holds(&mut tx, &[&req.account_id]).await?;
    let balance = lock_projection(&mut tx, &req.account_id).await?;
    let expired = expire_for_account(&mut tx, &req.account_id).await?;
    let (reserved, pending) = open_sums(&mut tx, &req.account_id).await?;
    let effective = crate::money::effective_units(balance, reserved, pending);
    if i128::from(effective) + i128::from(req.overdraft_units.max(0)) < i128::from(req.amount_units) {
        // Not stored under the key: after a top-up the same request may succeed.
        return Err(LedgerError::InsufficientFunds {
            effective_units: effective,
            requested_units: req.amount_units,
        });
    }
    let expires_at = Utc::now() + Duration::seconds(i64::from(req.ttl_secs));
    let r: Reservation = sqlx::query_as(&format!(
        "INSERT INTO reservations (reservation_id, account_id, amount_units, status, expires_at)
         VALUES ($1, $2, $3, 'active', $4)
         RETURNING {COLUMNS}"
    ))
    .bind(&req.reservation_id)
    .bind(&req.account_id)
    .bind(req.amount_units)
    .bind(expires_at)
    .fetch_one(&mut *tx)
    .await?;
    reserved.checked_add(req.amount_units).ok_or_else(holds_out_of_range)?;
    write_projections(&mut tx, &[&req.account_id], false).await?;
    finish(&mut tx, &key, &r).await?;
    tx.commit().await?;
    expired.record();
    Ok(r)
}

/// Take the *holds lock* of each account: its `accounts` row `FOR NO KEY UPDATE`, in
/// account-id order. Every operation that adds a hold (reserve, holding authorize) takes
/// it first, so two of them never both see the same free room. Ingest never takes it (it
/// locks balance rows), so a holding authorize does not wait behind a batch (see
/// ARCHITECTURE.md). An account seen for the first time is created, then locked: one more
/// round trip, once per account. (Locking the existing rows first and the new ones after
/// cannot deadlock: a new row's inserter holds it from its insert on, and takes no other
/// lock after.)
pub(super) async fn lock_holds(
    tx: &mut Transaction<'_, Postgres>,
    accounts: &[&str],
) -> Result<(), LedgerError> {
    debug_assert!(accounts.is_sorted(), "accounts are locked in id order");
    let lock =
        "SELECT account_id FROM accounts WHERE account_id = ANY($1) ORDER BY account_id FOR NO KEY UPDATE";
    let found: Vec<String> = sqlx::query_scalar(lock).bind(accounts).fetch_all(&mut **tx).await?;
    if found.len() == accounts.len() {
        return Ok(());
    }
    let found: std::collections::BTreeSet<&str> = found.iter().map(String::as_str).collect();
    let new: Vec<&str> = accounts.iter().copied().filter(|a| !found.contains(a)).collect();
    sqlx::query(
        "INSERT INTO accounts (account_id) SELECT a FROM UNNEST($1::text[]) AS u(a) ORDER BY a
         ON CONFLICT DO NOTHING",
    )
    .bind(&new)
    .execute(&mut **tx)
    .await?;
    // Created by another transaction meanwhile (ON CONFLICT waited for it): lock it too.
    sqlx::query(lock).bind(&new).fetch_all(&mut **tx).await?;
    Ok(())
}

/// The sums of an account's open holds (`reserved`, `pending`), over hold rows: the one
/// definition every reader and every projection write uses.
const OPEN_SUMS: &str = "LEAST(COALESCE(sum(amount_units) FILTER (WHERE status = 'active'), 0),
                               9223372036854775807)::bigint AS reserved,
                         LEAST(COALESCE(sum(pending_units) FILTER (WHERE status = 'settling'), 0),
                               9223372036854775807)::bigint AS pending";

/// Per account, (`reserved`, `pending`) of its open holds. `accounts`: an SQL expression of
/// type `text[]` that limits it, or `None` for every account. With a list, each account's
/// holds are summed through its own index lookup (`LATERAL`): `account_id = ANY(...)` over
/// the whole table lets the planner scan every open hold of every account, which it did
/// under load (measured: 30-150 ms per statement for 60 accounts while ingesting).
pub(crate) fn open_holds_sql(accounts: Option<&str>) -> String {
    match accounts {
        Some(list) => format!(
            "SELECT l.account_id, h.reserved, h.pending FROM UNNEST(({list})::text[]) AS l(account_id)
             CROSS JOIN LATERAL (SELECT {OPEN_SUMS} FROM reservations
                                 WHERE account_id = l.account_id AND status IN ('active', 'settling')) h"
        ),
        None => format!(
            "SELECT account_id, {OPEN_SUMS}
             FROM reservations WHERE status IN ('active', 'settling') GROUP BY account_id"
        ),
    }
}

/// (reserved, pending) of the account's open holds, from the rows themselves (the
/// projection in `account_balances` may lag a holding authorize by a moment).
async fn open_sums(tx: &mut Transaction<'_, Postgres>, account: &str) -> Result<(i64, i64), LedgerError> {
    let (r, p): (i64, i64) = sqlx::query_as(&format!(
        "SELECT COALESCE(max(h.reserved), 0)::bigint, COALESCE(max(h.pending), 0)::bigint
         FROM ({}) h",
        open_holds_sql(Some("ARRAY[$1]"))
    ))
    .bind(account)
    .fetch_one(&mut **tx)
    .await?;
    Ok((r, p))
}

/// Set the `reserved_units` / `pending_units` projection of `accounts` from their hold rows
/// (only rows that differ are written). The caller holds the balance rows' locks, or, with
/// `skip_locked`, rows another transaction holds are left alone (never waiting). Returns
/// how many rows it wrote.
pub(crate) async fn write_projections(
    tx: &mut Transaction<'_, Postgres>,
    accounts: &[&str],
    skip_locked: bool,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(&projection_update_sql(skip_locked))
        .bind(accounts)
        .execute(&mut **tx)
        .await?
        .rows_affected())
}

/// The statement of [`write_projections`], accounts in `$1` (a holding batch runs it
/// inside a larger statement).
pub(crate) fn projection_update_sql(skip_locked: bool) -> String {
    let free = if skip_locked {
        " AND b.account_id IN (SELECT account_id FROM account_balances WHERE account_id = ANY($1)
                               FOR UPDATE SKIP LOCKED)"
    } else {
        ""
    };
    format!(
        "UPDATE account_balances b
         SET reserved_units = COALESCE(h.reserved, 0), pending_units = COALESCE(h.pending, 0),
             updated_at = clock_timestamp(), changed_xid = pg_current_xact_id()
         FROM UNNEST($1::text[]) AS l(account_id) LEFT JOIN ({}) h USING (account_id)
         WHERE b.account_id = l.account_id
           AND (b.reserved_units, b.pending_units) IS DISTINCT FROM (COALESCE(h.reserved, 0), COALESCE(h.pending, 0)){free}",
        open_holds_sql(Some("$1"))
    )
}

/// Bring the projection up to date with the open holds for every account whose
/// projection differs (a holding authorize adds holds without waiting for the balance
/// lock, see [`hold`]); `tally run`'s housekeeping calls it every second. Never waits: a
/// row a batch holds is left to the next reconcile (a batch that settles an account's holds
/// rewrites its row itself). Returns how many rows it updated.
pub async fn reconcile_projections(pool: &PgPool) -> Result<u64, LedgerError> {
    let candidates: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT b.account_id FROM account_balances b LEFT JOIN ({}) h USING (account_id)
         WHERE (b.reserved_units, b.pending_units) IS DISTINCT FROM (COALESCE(h.reserved, 0), COALESCE(h.pending, 0))
         ORDER BY b.account_id LIMIT 10000",
        open_holds_sql(None)
    ))
    .fetch_all(pool)
    .await?;
    if candidates.is_empty() {
        return Ok(0);
    }
    let accounts: Vec<&str> = candidates.iter().map(String::as_str).collect();
    let mut tx = pool.begin().await?;
    let updated = write_projections(&mut tx, &accounts, true).await?;
    tx.commit().await?;
    Ok(updated)
}

/// Release a hold (the call failed). Releasing a closed reservation is an invalid state,
/// except releasing twice, which returns the released reservation.
pub async fn release(pool: &PgPool, reservation_id: &str) -> Result<Reservation, LedgerError> {
    transition(pool, reservation_id, Transition::Release).await
}

/// The gateway reports the actual cost: the hold becomes a pending debit until the usage
/// event (which carries the reservation id) is applied. `actual_units` may exceed the hold.
pub async fn settle(
    pool: &PgPool,
    reservation_id: &str,
    actual_units: i64,
) -> Result<Reservation, LedgerError> {
    if !(0..=crate::money::INPUT_UNITS_MAX).contains(&actual_units) {
        return Err(LedgerError::Invalid(format!(
            "actual cost must be between 0 and {} USD",
            crate::money::INPUT_USD_MAX
        )));
    }
    transition(pool, reservation_id, Transition::Settle(actual_units)).await
}

#[derive(Clone, Copy)]
enum Transition {
    Release,
    Settle(i64),
}

async fn transition(pool: &PgPool, reservation_id: &str, t: Transition) -> Result<Reservation, LedgerError> {
    let account: Option<(String,)> =
        sqlx::query_as("SELECT account_id FROM reservations WHERE reservation_id = $1")
            .bind(reservation_id)
            .fetch_optional(pool)
            .await?;
    let (account,) = account.ok_or_else(|| LedgerError::NotFound(format!("reservation {reservation_id}")))?;
    let mut tx = pool.begin().await?;
    lock_projection(&mut tx, &account).await?;
    let expired = expire_for_account(&mut tx, &account).await?;
    let r = fetch_locked(&mut tx, reservation_id).await?;
    let (status, new_pending) = match (t, r.status.as_str()) {
        (Transition::Release, "active" | "settling") => ("released", 0),
        (Transition::Release, "released") => return Ok(r),
        (Transition::Settle(a), "active") => ("settling", a),
        (Transition::Settle(a), "settling") if a == r.pending_units => return Ok(r),
        // The usage event (or the deadline) already billed it: done, nothing more to debit.
        (Transition::Settle(_), "settled") => return Ok(r),
        (_, other) => {
            return Err(LedgerError::InvalidState(format!("reservation {reservation_id} is {other}")));
        }
    };
    let closed = status == "released";
    let r: Reservation = sqlx::query_as(&format!(
        "UPDATE reservations SET status = $2, pending_units = $3,
             actual_units = CASE WHEN $2 = 'settling' THEN $3 ELSE actual_units END,
             closed_at = CASE WHEN $4 THEN now() ELSE closed_at END
         WHERE reservation_id = $1
         RETURNING {COLUMNS}"
    ))
    .bind(reservation_id)
    .bind(status)
    .bind(new_pending)
    .bind(closed)
    .fetch_one(&mut *tx)
    .await?;
    write_projections(&mut tx, &[&account], false).await?;
    tx.commit().await?;
    expired.record();
    Ok(r)
}

/// A hold that would take the account's held total beyond `i64`: refused (422), never wrapped.
pub(super) fn holds_out_of_range() -> LedgerError {
    LedgerError::Invalid("the account's holds would exceed the ledger's range".into())
}

pub async fn get(pool: &PgPool, reservation_id: &str) -> Result<Option<Reservation>, LedgerError> {
    Ok(sqlx::query_as(&format!("SELECT {COLUMNS} FROM reservations WHERE reservation_id = $1"))
        .bind(reservation_id)
        .fetch_optional(pool)
        .await?)
}

async fn fetch_locked(tx: &mut Transaction<'_, Postgres>, id: &str) -> Result<Reservation, LedgerError> {
    sqlx::query_as(&format!("SELECT {COLUMNS} FROM reservations WHERE reservation_id = $1 FOR UPDATE"))
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?
        .ok_or_else(|| LedgerError::NotFound(format!("reservation {id}")))
}

/// Lock the account's balance row (creating the account if needed) and read its balance.
async fn lock_projection(tx: &mut Transaction<'_, Postgres>, account: &str) -> Result<i64, LedgerError> {
    let locked = super::lock_balances(tx, &[account]).await?;
    Ok(locked[account])
}

/// Close the account's overdue holds (caller holds the balance row lock) and rewrite its
/// hold projection; returns what expired. An active hold expires (no usage reported: nothing to bill); a
/// settling one is billed its settled amount and becomes settled (see the module doc).
async fn expire_for_account(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
) -> Result<Expired, LedgerError> {
    let expired: Vec<(String,)> = sqlx::query_as(
        "UPDATE reservations SET status = 'expired', closed_at = now()
         WHERE account_id = $1 AND status = 'active' AND expires_at <= now()
         RETURNING kind",
    )
    .bind(account)
    .fetch_all(&mut **tx)
    .await?;
    let billed: Vec<(String, i64)> = sqlx::query_as(
        "UPDATE reservations SET status = 'settled', actual_units = pending_units, pending_units = 0,
                closed_at = now(), closed_xid = pg_current_xact_id()
         WHERE account_id = $1 AND status = 'settling' AND expires_at <= now()
         RETURNING reservation_id, actual_units",
    )
    .bind(account)
    .fetch_all(&mut **tx)
    .await?;
    let mut gone = Expired::default();
    for (kind,) in &expired {
        match kind.as_str() {
            "authorization" => gone.authorizations += 1,
            _ => gone.reservations += 1,
        }
    }
    if expired.is_empty() && billed.is_empty() {
        return Ok(gone);
    }
    let mut spend = Vec::new();
    for (id, units) in &billed {
        if *units > 0 {
            bill_at_deadline(tx, account, id, *units).await?;
            spend.push((account, *units));
        }
    }
    // Spend caps and plan consumption see the billed holds like API deductions.
    super::counting::count_deductions(tx, &spend, Utc::now()).await?;
    write_projections(tx, &[account], false).await?;
    Ok(gone)
}

/// Holds that expired with nothing reported (no usage event, no settle): leak detection.
/// Counted in `tally_holds_expired_total{kind}` once the expiring transaction commits.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Expired {
    pub reservations: u64,
    pub authorizations: u64,
}

impl Expired {
    /// Call after COMMIT.
    fn record(self) {
        if self.reservations > 0 {
            metrics::counter!(crate::metrics::HOLDS_EXPIRED, "kind" => "reservation")
                .increment(self.reservations);
        }
        if self.authorizations > 0 {
            metrics::counter!(crate::metrics::HOLDS_EXPIRED, "kind" => "authorization")
                .increment(self.authorizations);
        }
    }
}

/// The debit of a settled hold whose usage event did not arrive by its deadline.
async fn bill_at_deadline(
    tx: &mut Transaction<'_, Postgres>,
    account: &str,
    reservation_id: &str,
    units: i64,
) -> Result<(), LedgerError> {
    let key = format!("reservation:{reservation_id}:deadline");
    let hash = hash_payload(&(reservation_id, units));
    super::ops::post(
        tx,
        super::ops::Posting {
            account_id: account,
            kind: "reservation_settle",
            amount: super::ops::Amount::Delta(-units),
            idempotency_key: &key,
            payload_hash: &hash,
            description: format!("reservation {reservation_id} settled at its deadline (no usage event)"),
            created_by: None,
            corrects_entry_id: None,
            metadata: serde_json::json!({"reservation_id": reservation_id}),
            grants: vec![],
            burn_first: vec![],
        },
    )
    .await?;
    Ok(())
}

/// Events among `events` (reservation id, account id) whose hold was already billed at its
/// deadline (settled with no event): they are recorded but not charged again. Call under
/// the accounts' balance row locks (the expiry takes the same lock first).
pub(crate) async fn billed_at_deadline(
    tx: &mut Transaction<'_, Postgres>,
    events: &[(&str, &str)],
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    if events.is_empty() {
        return Ok(Default::default());
    }
    let ids: Vec<&str> = events.iter().map(|e| e.0).collect();
    let accounts: Vec<&str> = events.iter().map(|e| e.1).collect();
    let rows: Vec<(String,)> = sqlx::query_as(
        "SELECT r.reservation_id FROM reservations r
         JOIN UNNEST($1::text[], $2::text[]) AS u(id, a) ON r.reservation_id = u.id AND r.account_id = u.a
         WHERE r.status = 'settled' AND r.event_id IS NULL",
    )
    .bind(&ids)
    .bind(&accounts)
    .fetch_all(&mut **tx)
    .await?;
    Ok(rows.into_iter().map(|(id,)| id).collect())
}

/// Expire every overdue hold (called periodically by `tally run`); returns how many.
pub async fn expire_due(pool: &PgPool) -> Result<usize, LedgerError> {
    let accounts: Vec<(String,)> = sqlx::query_as(
        "SELECT DISTINCT account_id FROM reservations
         WHERE status IN ('active', 'settling') AND expires_at <= now() LIMIT 1000",
    )
    .fetch_all(pool)
    .await?;
    for (account,) in &accounts {
        let mut tx = pool.begin().await?;
        lock_projection(&mut tx, account).await?;
        let expired = expire_for_account(&mut tx, account).await?;
        tx.commit().await?;
        expired.record();
    }
    Ok(accounts.len())
}

/// Close the reservations named by applied usage events (pipeline, inside its batch
/// transaction, after it locked the accounts' balance rows). Returns how many closed.
pub(crate) async fn settle_from_events(
    tx: &mut Transaction<'_, Postgres>,
    settlements: &[(&str, &str, i64, &str)], // (reservation_id, account_id, cost_units, event_id)
) -> Result<u64, sqlx::Error> {
    if settlements.is_empty() {
        return Ok(0);
    }
    let ids: Vec<&str> = settlements.iter().map(|s| s.0).collect();
    let accounts: Vec<&str> = settlements.iter().map(|s| s.1).collect();
    let costs: Vec<i64> = settlements.iter().map(|s| s.2).collect();
    let events: Vec<&str> = settlements.iter().map(|s| s.3).collect();
    // Only a reservation of the same account is settled by an event: an event cannot
    // close another account's hold.
    let closed: Vec<(String,)> = sqlx::query_as(
        "UPDATE reservations r SET status = 'settled', actual_units = u.c, pending_units = 0,
                closed_at = now(), event_id = u.e, closed_xid = pg_current_xact_id()
         FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[]) AS u(id, a, c, e)
         WHERE r.reservation_id = u.id AND r.account_id = u.a AND r.status IN ('active', 'settling')
         RETURNING r.account_id",
    )
    .bind(&ids)
    .bind(&accounts)
    .bind(&costs)
    .bind(&events)
    .fetch_all(&mut **tx)
    .await?;
    let mut touched: Vec<&str> = closed.iter().map(|(a,)| a.as_str()).collect();
    touched.sort_unstable();
    touched.dedup();
    write_projections(tx, &touched, false).await?;
    Ok(closed.len() as u64)
}
