//! Holding authorize, group-committed: concurrent holding calls share one Postgres
//! transaction instead of taking one each.
//!
//! A hold must be decided under its account's holds lock (the `accounts` row, see
//! `reservations`), so that two calls never both see the same free room. One transaction
//! per call made that lock the cost: ~10 round trips and a commit per call, ~700 holds/s
//! here while ingest ran beside it. Here the calls that arrive while a transaction runs
//! wait in a bounded queue and go together into the next one:
//!
//! ```text
//!  handler ─► lane (by account) ─► [queue ≤ QUEUE_HOLDS_MAX] ─► batch ≤ BATCH_HOLDS_MAX
//!    claim keys (sorted) ─► lock accounts (sorted) ─► read balances + holds (1 statement)
//!    ─► decide each call in arrival order, each seeing the holds allowed before it
//!    ─► insert the allowed holds ─► projections + answers + refused claims (1 statement)
//!    ─► COMMIT ─► reply each
//! ```
//!
//! - **Same guarantee as one call per transaction.** Every call is decided under its
//!   account's lock, on the rows read under it, plus the holds this batch allowed before it
//!   (appended to the account's view as they are allowed). A refusal stores nothing (its key
//!   claim is deleted in the same transaction), so the same call may pass later.
//! - **No deadlock.** Keys are claimed, then accounts locked, each in sorted order, as every
//!   other writer does (keys first, then accounts, then balance rows).
//! - **Lanes by account.** Calls for one account always go to the same lane, so an
//!   instance's lanes never wait on each other's locks; two lanes keep two transactions in
//!   flight (one builds while the other waits on the database).
//! - **A reused reservation id** (the id of an existing reservation) fails its call with a
//!   conflict; the batch is then decided again without it, so the others' decisions never
//!   count a hold that was not inserted.

use super::ops::{LedgerError, claim_many, hash_payload};
use super::reservations::{COLUMNS, Reservation, holds_out_of_range, lock_holds, projection_update_sql};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgPool, Postgres, Transaction};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::OnceLock;
use tokio::sync::{mpsc, oneshot};

/// Most calls in one transaction. Bounds the transaction's statements (arrays of this
/// length) and the time a call waits behind the others in its batch.
pub const BATCH_HOLDS_MAX: usize = 256;

/// Calls waiting per lane. When full, handlers wait to enqueue (backpressure to the
/// gateway instead of unbounded memory).
pub const QUEUE_HOLDS_MAX: usize = 4096;

/// Transactions in flight per instance.
pub const LANES: usize = 2;

/// The idempotency records' operation name for a holding authorize.
const OPERATION: &str = "authorize";

/// A holding authorize (`POST /v1/authorize` with `"hold": true`): what to hold if the
/// decision allows it.
#[derive(Debug, Clone, Serialize)]
pub struct HoldRequest {
    pub account_id: String,
    /// Also the reservation id the usage event names (`reservation_id`) to settle it.
    pub authorization_id: String,
    /// The estimated cost held against the balance (0: a quota-only or BYOK call).
    pub amount_units: i64,
    /// The feature whose quota unit is held (one unit per call).
    pub feature: Option<String>,
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    #[serde(skip)]
    pub expires_at: DateTime<Utc>,
}

impl HoldRequest {
    fn validate(&self) -> Result<(), LedgerError> {
        if !(0..=crate::money::INPUT_UNITS_MAX).contains(&self.amount_units) {
            return Err(LedgerError::Invalid(format!(
                "the estimate must be between 0 and {} USD",
                crate::money::INPUT_USD_MAX
            )));
        }
        if self.authorization_id.is_empty() || self.authorization_id.len() > 128 {
            return Err(LedgerError::Invalid("authorization id must be 1..=128 bytes".into()));
        }
        Ok(())
    }

    fn key(&self) -> String {
        format!("authorize:{}", self.authorization_id)
    }

    /// The hold as the calls decided after it in the same batch count it.
    fn as_held(&self) -> HeldRow {
        HeldRow {
            feature: self.feature.clone(),
            quota_units: i32::from(self.feature.is_some()),
            project_id: self.project_id.clone(),
            api_key_id: self.api_key_id.clone(),
            money_units: self.amount_units,
            closed_xid: None,
        }
    }
}

/// What a holding authorize decides on, read in one snapshot under the account's holds lock.
#[derive(Debug, Clone)]
pub struct Locked {
    pub balance_units: i64,
    pub reserved_units: i64,
    pub pending_units: i64,
    /// The account's open holds, and those closed into usage (settled by their event, or
    /// billed at their deadline) since `counted_from_xid`.
    pub holds: Vec<HeldRow>,
}

/// One hold as a holding authorize counts it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct HeldRow {
    pub feature: Option<String>,
    pub quota_units: i32,
    pub project_id: Option<String>,
    pub api_key_id: Option<String>,
    /// The money it stands for now: the amount while active, the reported cost while
    /// settling, the debit once closed into usage.
    pub money_units: i64,
    /// `None` while open; the closing transaction's xid once closed into usage (its usage
    /// may not be in an instance's counters yet: see migration 0009).
    pub closed_xid: Option<i64>,
}

/// How a holding authorize ended. The decision is the caller's, stored as JSON with the
/// hold so that a repeated request gets the same answer.
#[derive(Debug, Clone)]
pub enum HoldOutcome {
    /// Allowed and held (or the same request was held before: the same answer).
    Held { reservation: Reservation, decision: serde_json::Value },
    /// Refused: nothing held, nothing stored (the same request may pass later).
    Refused(serde_json::Value),
}

/// Judges one call on its account's locked state: (allowed, the decision to answer with).
/// A pure function of the view: a batch decided again (see the module doc) calls it again.
pub type Decide = Box<dyn Fn(&Locked) -> (bool, serde_json::Value) + Send>;

/// One holding call.
pub struct HoldCall {
    pub req: HoldRequest,
    /// Holds closed into usage by a transaction at or after this xid are read too; `decide`
    /// counts those the caller's counters do not include yet.
    pub counted_from_xid: i64,
    pub decide: Decide,
}

type Reply = oneshot::Sender<Result<HoldOutcome, LedgerError>>;

/// The group-commit queue of one instance: `LANES` tasks, started on first use (on the
/// runtime that serves the API), ended when the last clone of the queue is dropped.
pub struct HoldQueue {
    pool: PgPool,
    lanes: OnceLock<Vec<mpsc::Sender<(HoldCall, Reply)>>>,
}

impl HoldQueue {
    pub fn new(pool: PgPool) -> Self {
        Self { pool, lanes: OnceLock::new() }
    }

    /// Check and hold atomically (see the module doc). Idempotent by authorization id: a
    /// repeated request returns the first answer and holds nothing more.
    pub async fn hold(&self, call: HoldCall) -> Result<HoldOutcome, LedgerError> {
        let lanes = self.lanes.get_or_init(|| {
            (0..LANES)
                .map(|_| {
                    let (tx, rx) = mpsc::channel(QUEUE_HOLDS_MAX);
                    tokio::spawn(run_lane(self.pool.clone(), rx));
                    tx
                })
                .collect()
        });
        let lane = &lanes[lane_of(&call.req.account_id)];
        let (reply, answer) = oneshot::channel();
        let stopped = || LedgerError::InvalidState("the holds queue stopped".into());
        lane.send((call, reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The lane of an account: stable within a process (calls of one account share a lane).
fn lane_of(account_id: &str) -> usize {
    use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
    let h = BuildHasherDefault::<DefaultHasher>::default().hash_one(account_id);
    (h % LANES as u64) as usize
}

async fn run_lane(pool: PgPool, mut rx: mpsc::Receiver<(HoldCall, Reply)>) {
    let mut batch = Vec::with_capacity(BATCH_HOLDS_MAX);
    while rx.recv_many(&mut batch, BATCH_HOLDS_MAX).await > 0 {
        debug_assert!(batch.len() <= BATCH_HOLDS_MAX);
        let started = std::time::Instant::now();
        let (calls, replies): (Vec<HoldCall>, Vec<Reply>) = batch.drain(..).unzip();
        metrics::histogram!(crate::metrics::HOLD_BATCH_CALLS).record(calls.len() as f64);
        match hold_batch(&pool, calls).await {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    // The caller may have gone (client disconnected): its answer is stored.
                    let _ = reply.send(outcome);
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "holding batch failed; its calls get the error");
                for reply in replies {
                    let _ = reply.send(Err(LedgerError::Db(sqlx::Error::Io(std::io::Error::other(
                        format!("holding batch: {e}"),
                    )))));
                }
            }
        }
        metrics::histogram!(crate::metrics::HOLD_BATCH_SECONDS).record(started.elapsed().as_secs_f64());
    }
}

/// Where each call of a batch stands while the batch is worked out. The plan has `Claim`,
/// `SameAs` and failed calls (`Done(Err)`); each transaction's round turns every `Claim`
/// into `Decide` (claimed now) or `Done` (answered before, or a conflict).
enum Slot {
    Done(Result<HoldOutcome, LedgerError>),
    /// First use of its key in this batch, to be claimed and decided.
    Claim {
        key: String,
        hash: [u8; 32],
    },
    /// Claimed in this round's transaction: to decide.
    Decide {
        key: String,
    },
    /// Same key and payload as call `first` earlier in the batch: its answer.
    SameAs(usize),
}

/// Decide and hold a batch of calls in one transaction; one result per call, in order.
/// Fails as a whole only for a database error.
pub async fn hold_batch(
    pool: &PgPool,
    calls: Vec<HoldCall>,
) -> Result<Vec<Result<HoldOutcome, LedgerError>>, LedgerError> {
    assert!(calls.len() <= BATCH_HOLDS_MAX, "a holds batch is at most {BATCH_HOLDS_MAX} calls");
    let counted_from_xid = calls.iter().map(|c| c.counted_from_xid).min().unwrap_or(0);
    let (reqs, decides): (Vec<HoldRequest>, Vec<Decide>) =
        calls.into_iter().map(|c| (c.req, c.decide)).unzip();
    let mut slots = plan(&reqs);
    // A reused reservation id is found only at insert; the batch is then decided again in
    // a fresh transaction without that call. Each round fails at least one call, so this
    // ends (within `BATCH_HOLDS_MAX` rounds; one in practice).
    loop {
        let mut tx = pool.begin().await?;
        let mut round = claim_all(&mut tx, &reqs, &slots).await?;
        let to_decide: Vec<usize> =
            (0..round.len()).filter(|i| matches!(round[*i], Slot::Decide { .. })).collect();
        if to_decide.is_empty() {
            tx.commit().await?;
            return Ok(resolve(round));
        }
        let accounts: BTreeSet<&str> = to_decide.iter().map(|i| reqs[*i].account_id.as_str()).collect();
        let accounts: Vec<&str> = accounts.into_iter().collect();
        lock_holds(&mut tx, &accounts).await?;
        let mut locked = read_locked(&mut tx, &accounts, counted_from_xid).await?;
        // Decide in arrival order; each allowed hold counts for the calls after it.
        let mut allowed: Vec<(usize, serde_json::Value)> = Vec::new();
        let mut refused_keys: Vec<String> = Vec::new();
        for &i in &to_decide {
            let req = &reqs[i];
            let view = locked.get_mut(req.account_id.as_str()).expect("every account of the batch was read");
            let key = slot_key(&round[i]).to_string();
            let Some(reserved) = view.reserved_units.checked_add(req.amount_units) else {
                round[i] = Slot::Done(Err(holds_out_of_range()));
                refused_keys.push(key);
                continue;
            };
            let (ok, decision) = decides[i](view);
            if ok {
                view.reserved_units = reserved;
                view.holds.push(req.as_held());
                allowed.push((i, decision));
            } else {
                round[i] = Slot::Done(Ok(HoldOutcome::Refused(decision)));
                refused_keys.push(key);
            }
        }
        let mut inserted = insert_holds(&mut tx, &reqs, &allowed).await?;
        if inserted.len() < allowed.len() {
            // The id is already a reservation's (its own key space): the client reused an
            // id. Fail those calls and decide the rest again (this transaction rolls back).
            for (i, _) in &allowed {
                if !inserted.contains_key(&reqs[*i].authorization_id) {
                    slots[*i] =
                        Slot::Done(Err(LedgerError::Conflict { key: reqs[*i].authorization_id.clone() }));
                }
            }
            tx.rollback().await?;
            continue;
        }
        let held: BTreeSet<&str> = allowed.iter().map(|(i, _)| reqs[*i].account_id.as_str()).collect();
        let held: Vec<&str> = held.into_iter().collect();
        let mut keys = Vec::with_capacity(allowed.len());
        let mut answers = Vec::with_capacity(allowed.len());
        for (i, decision) in allowed {
            let reservation = inserted
                .remove(&reqs[i].authorization_id)
                .expect("checked above: every allowed hold inserted");
            keys.push(slot_key(&round[i]).to_string());
            answers.push(serde_json::to_value((&reservation, &decision)).expect("a hold serializes"));
            round[i] = Slot::Done(Ok(HoldOutcome::Held { reservation, decision }));
        }
        finish(&mut tx, &held, &keys, &answers, &refused_keys).await?;
        tx.commit().await?;
        return Ok(resolve(round));
    }
}

fn slot_key(slot: &Slot) -> &str {
    match slot {
        Slot::Claim { key, .. } | Slot::Decide { key } => key,
        _ => unreachable!("only claimed calls have a key to store"),
    }
}

/// Validate the calls and pair up repeated keys inside the batch.
fn plan(reqs: &[HoldRequest]) -> Vec<Slot> {
    let mut first_of: HashMap<String, (usize, [u8; 32])> = HashMap::new();
    reqs.iter()
        .enumerate()
        .map(|(i, r)| {
            if let Err(e) = r.validate() {
                return Slot::Done(Err(e));
            }
            let (key, hash) = (r.key(), hash_payload(r));
            match first_of.get(&key) {
                Some((first, h)) if *h == hash => Slot::SameAs(*first),
                Some(_) => Slot::Done(Err(LedgerError::Conflict { key: r.authorization_id.clone() })),
                None => {
                    first_of.insert(key.clone(), (i, hash));
                    Slot::Claim { key, hash }
                }
            }
        })
        .collect()
}

/// Claim every new key in one statement (sorted, so concurrent batches wait on each other
/// in one order). Keys claimed before: the same payload gets the stored answer, another
/// payload a conflict. Returns this round's slots: `Decide` for the keys now claimed.
async fn claim_all(
    tx: &mut Transaction<'_, Postgres>,
    reqs: &[HoldRequest],
    slots: &[Slot],
) -> Result<Vec<Slot>, LedgerError> {
    let claims: Vec<(&str, &[u8; 32])> = slots
        .iter()
        .filter_map(|s| match s {
            Slot::Claim { key, hash } => Some((key.as_str(), hash)),
            _ => None,
        })
        .collect();
    let mut found = claim_many::<(Reservation, serde_json::Value)>(tx, OPERATION, &claims).await?;
    Ok(slots
        .iter()
        .zip(reqs)
        .map(|(s, req)| match s {
            Slot::Claim { key, .. } => match found.remove(key) {
                Some(Ok(None)) => Slot::Decide { key: key.clone() },
                Some(Ok(Some((reservation, decision)))) => {
                    Slot::Done(Ok(HoldOutcome::Held { reservation, decision }))
                }
                Some(Err(LedgerError::Conflict { .. })) => {
                    Slot::Done(Err(LedgerError::Conflict { key: req.authorization_id.clone() }))
                }
                Some(Err(e)) => Slot::Done(Err(e)),
                None => {
                    Slot::Done(Err(LedgerError::InvalidState(format!("{key} neither claimed nor stored"))))
                }
            },
            Slot::Done(Ok(o)) => Slot::Done(Ok(o.clone())),
            Slot::Done(Err(e)) => Slot::Done(Err(again(e))),
            Slot::SameAs(first) => Slot::SameAs(*first),
            Slot::Decide { .. } => unreachable!("slots between rounds are never Decide"),
        })
        .collect())
}

/// One row of [`read_locked`]: an account's balance, with one of its holds (none: `None`).
#[derive(sqlx::FromRow)]
struct LockedRow {
    account_id: String,
    balance_units: i64,
    /// `active` or `settling` while open; the closed statuses for holds closed into usage.
    status: Option<String>,
    #[sqlx(flatten)]
    hold: HeldRowOpt,
}

#[derive(sqlx::FromRow)]
struct HeldRowOpt {
    feature: Option<String>,
    quota_units: Option<i32>,
    project_id: Option<String>,
    api_key_id: Option<String>,
    money_units: Option<i64>,
    closed_xid: Option<i64>,
}

/// Each account's balance and holds, under its lock, in one statement (one snapshot, so
/// the balance and the holds agree). No balance row lock: ingest holds those for a whole
/// batch; a batch still in flight is simply not visible yet, as if its events came a
/// moment later (its debits are usage that already happened; it closes holds and counts
/// their usage in one transaction, see `closed_xid`). Expired holds no longer count (the
/// housekeeping marks them). Each account's holds are read through its own index lookup
/// (`LATERAL`): with `account_id = ANY(...)` over the whole table the planner may scan
/// every open hold of every account.
async fn read_locked(
    tx: &mut Transaction<'_, Postgres>,
    accounts: &[&str],
    counted_from_xid: i64,
) -> Result<BTreeMap<String, Locked>, LedgerError> {
    let rows: Vec<LockedRow> = sqlx::query_as(
        "SELECT l.account_id, COALESCE(b.balance_units, 0) AS balance_units, h.status, h.feature,
                h.quota_units, h.project_id, h.api_key_id, h.money_units, h.closed_xid
         FROM UNNEST($1::text[]) AS l(account_id)
         LEFT JOIN account_balances b USING (account_id)
         LEFT JOIN LATERAL (
             SELECT status, feature, quota_units, project_id, api_key_id,
                    CASE status WHEN 'active' THEN amount_units ELSE pending_units END AS money_units,
                    NULL::bigint AS closed_xid
             FROM reservations r
             WHERE r.account_id = l.account_id AND r.status IN ('active', 'settling')
               AND (r.status = 'settling' OR r.expires_at > now())
             UNION ALL
             SELECT status, feature, quota_units, project_id, api_key_id, COALESCE(actual_units, 0),
                    closed_xid::text::bigint
             FROM reservations r
             WHERE r.account_id = l.account_id AND r.closed_xid >= $2::text::xid8
               AND r.status NOT IN ('active', 'settling')
         ) h ON true",
    )
    .bind(accounts)
    .bind(counted_from_xid.max(0).to_string())
    .fetch_all(&mut **tx)
    .await?;
    // Sums as i128, clamped to the ledger's range (as `open_holds_sql` does in SQL).
    let mut sums: BTreeMap<String, (i64, i128, i128, Vec<HeldRow>)> = BTreeMap::new();
    for row in rows {
        let entry = sums.entry(row.account_id).or_insert_with(|| (row.balance_units, 0, 0, Vec::new()));
        let (Some(status), Some(money_units)) = (row.status, row.hold.money_units) else {
            continue; // the account has no holds
        };
        let h = row.hold;
        if h.closed_xid.is_none() {
            match status.as_str() {
                "active" => entry.1 += i128::from(money_units),
                _ => entry.2 += i128::from(money_units),
            }
        }
        entry.3.push(HeldRow {
            feature: h.feature,
            quota_units: h.quota_units.unwrap_or(0),
            project_id: h.project_id,
            api_key_id: h.api_key_id,
            money_units,
            closed_xid: h.closed_xid,
        });
    }
    let clamp = |v: i128| i64::try_from(v).unwrap_or(i64::MAX);
    Ok(sums
        .into_iter()
        .map(|(a, (balance_units, reserved, pending, holds))| {
            (
                a,
                Locked {
                    balance_units,
                    reserved_units: clamp(reserved),
                    pending_units: clamp(pending),
                    holds,
                },
            )
        })
        .collect())
}

/// Insert the allowed holds; returns those inserted by reservation id (an id that is
/// already a reservation's is left out).
async fn insert_holds(
    tx: &mut Transaction<'_, Postgres>,
    reqs: &[HoldRequest],
    allowed: &[(usize, serde_json::Value)],
) -> Result<HashMap<String, Reservation>, LedgerError> {
    if allowed.is_empty() {
        return Ok(HashMap::new());
    }
    let rows: Vec<&HoldRequest> = allowed.iter().map(|(i, _)| &reqs[*i]).collect();
    let inserted: Vec<Reservation> = sqlx::query_as(&format!(
        "INSERT INTO reservations (reservation_id, account_id, kind, feature, quota_units, project_id,
                                   api_key_id, amount_units, status, expires_at)
         SELECT id, acct, 'authorization', f, q, p, k, amt, 'active', exp
         FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int4[], $5::text[], $6::text[], $7::int8[],
                     $8::timestamptz[]) AS u(id, acct, f, q, p, k, amt, exp)
         ON CONFLICT (reservation_id) DO NOTHING
         RETURNING {COLUMNS}"
    ))
    .bind(rows.iter().map(|r| r.authorization_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.account_id.as_str()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.feature.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| i32::from(r.feature.is_some())).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.project_id.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.api_key_id.as_deref()).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.amount_units).collect::<Vec<_>>())
    .bind(rows.iter().map(|r| r.expires_at).collect::<Vec<_>>())
    .fetch_all(&mut **tx)
    .await?;
    Ok(inserted.into_iter().map(|r| (r.reservation_id.clone(), r)).collect())
}

/// The batch's last statement, one round trip: bring the projection of the accounts that
/// got holds up to date, store each held call's answer under its key, and drop the claims
/// of refused calls (a refusal is not stored: the same call may pass later).
///
/// The projection (balance endpoint, every instance's memory) follows in this transaction
/// for accounts no ingest batch holds (never waiting: `SKIP LOCKED`), else at the next
/// housekeeping reconcile or when a batch settles the account's holds. It reads the holds
/// this transaction inserted: an earlier statement's rows are in this statement's snapshot.
async fn finish(
    tx: &mut Transaction<'_, Postgres>,
    held_accounts: &[&str],
    keys: &[String],
    answers: &[serde_json::Value],
    refused_keys: &[String],
) -> Result<(), LedgerError> {
    debug_assert_eq!(keys.len(), answers.len());
    let (stored, dropped): (i64, i64) = sqlx::query_as(&format!(
        "WITH projection AS ({}),
              answers AS (
                  UPDATE idempotency_records r SET result = u.res
                  FROM UNNEST($2::text[], $3::jsonb[]) AS u(k, res) WHERE r.idempotency_key = u.k
                  RETURNING 1),
              refused AS (DELETE FROM idempotency_records WHERE idempotency_key = ANY($4) RETURNING 1)
         SELECT (SELECT count(*) FROM answers), (SELECT count(*) FROM refused)",
        projection_update_sql(true)
    ))
    .bind(held_accounts)
    .bind(keys)
    .bind(answers)
    .bind(refused_keys)
    .fetch_one(&mut **tx)
    .await?;
    // Every key was claimed by this transaction: each must be found exactly once.
    if (stored, dropped) != (keys.len() as i64, refused_keys.len() as i64) {
        return Err(LedgerError::InvalidState(format!(
            "a holds batch stored {stored} of {} answers and dropped {dropped} of {} refused claims",
            keys.len(),
            refused_keys.len()
        )));
    }
    Ok(())
}

/// The same failure again, for a repeat of a call that failed (errors are not `Clone`:
/// a database error is not a call's own failure and is passed on as its text).
fn again(e: &LedgerError) -> LedgerError {
    match e {
        LedgerError::Conflict { key } => LedgerError::Conflict { key: key.clone() },
        LedgerError::Invalid(m) => LedgerError::Invalid(m.clone()),
        other => LedgerError::InvalidState(format!("same call as before: {other}")),
    }
}

/// Every call is settled now except repeats inside the batch: they take their first's
/// answer, as a replay.
fn resolve(slots: Vec<Slot>) -> Vec<Result<HoldOutcome, LedgerError>> {
    let mut out: Vec<Result<HoldOutcome, LedgerError>> = Vec::with_capacity(slots.len());
    for slot in slots {
        let outcome = match slot {
            Slot::Done(o) => o,
            Slot::SameAs(first) => match &out[first] {
                Ok(o) => Ok(o.clone()),
                Err(e) => Err(again(e)),
            },
            Slot::Claim { .. } | Slot::Decide { .. } => unreachable!("every claimed call was decided"),
        };
        out.push(outcome);
    }
    out
}
