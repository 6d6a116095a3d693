//! Applying a batch of consumed messages to the ledger, in two transactions.
//!
//! 1. [`claim`], a short transaction of its own: every valid event id of the batch is
//!    claimed in the dedup store (`processed_events`) by its source position, or found
//!    there (a replay, a duplicate from another partition, or an id conflict). COMMIT.
//! 2. [`apply_claimed`], in the caller's transaction: lock the batch's partition offsets,
//!    drop what is below them, then debit, count and dead-letter exactly the events this
//!    position owns. The caller performs the side effects that must precede COMMIT
//!    (ClickHouse insert, dead-letter produce) using the returned [`Applied`], then commits.
//!
//! Why two: a claim blocks every other transaction that claims the same id until it
//! commits. Claims committed on their own hold that lock for a few milliseconds, so two
//! instances that see the same event on two partitions (a gateway retry) no longer wait
//! for each other's ClickHouse insert. A claim without its debit (a crash between the two)
//! is harmless: the claimed position is re-read by its partition's owner (its offset was
//! never advanced), finds its own claim ("reclaimed") and applies it; a copy on another
//! partition finds someone else's claim and is a duplicate. See `pipeline` for the rest.

use crate::batch::{Batch, DeadItem, Item, ValidItem};
use chrono::{DateTime, Utc};
use sqlx::{PgConnection, Postgres, Transaction};
use std::collections::{BTreeMap, HashMap, HashSet};

/// What a batch did, for the side effects and the metrics.
#[derive(Debug, Default)]
pub struct Applied {
    /// Events applied for the first time: these go to ClickHouse.
    pub new_events: Vec<ValidItem>,
    /// Ids among `new_events` claimed by an earlier attempt that did not commit: only
    /// these may already have a ClickHouse row (inserted before that attempt died).
    pub reclaimed: HashSet<String>,
    /// Dead letters to publish (decode failures and id conflicts).
    pub dead: Vec<DeadItem>,
    /// Same id, same payload, already applied (replays, gateway retries).
    pub duplicates: u64,
    /// Messages below the partition's stored offset (already applied by someone).
    pub skipped_applied: u64,
    /// Sum of new debits, internal units.
    pub debited_units: i64,
    /// Reservations closed by this batch's events.
    pub reservations_settled: u64,
    /// The partitions' stored next offsets as found under the lock (before this batch).
    pub stored_offsets: HashMap<i32, i64>,
    /// Offsets to hint to Kafka after COMMIT: partition -> next offset.
    pub next_offsets: BTreeMap<i32, i64>,
    /// The `state_changes` row with this batch's bucket increments (none if no new
    /// event): the writer applies it to its own memory after COMMIT.
    pub usage_change: Option<super::counting::ChangeRef>,
}

/// What the dedup store says about one message of a batch (by batch index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// Not a valid event (dead-lettered by the reader).
    Invalid,
    /// This position holds the id's claim: new, or claimed by an earlier attempt at the
    /// same position that never committed (`reclaimed`).
    Own { reclaimed: bool },
    /// Claimed by another position (or earlier in this batch) with the same payload.
    Duplicate,
    /// Claimed by another position (or earlier in this batch) with another payload.
    Conflict,
}

/// The claims of one batch, index for index.
#[derive(Debug, Default)]
pub struct Claims {
    pub by_item: Vec<Claim>,
}

/// Claim the batch's event ids in their own transaction (see the module doc).
pub async fn claim(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<Claims, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let claims = claim_in(&mut tx, group, topic, batch).await?;
    tx.commit().await?;
    Ok(claims)
}

/// Claim and apply in one transaction (tests, benches, tools: no concurrency concerns).
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<Applied, sqlx::Error> {
    let claims = claim_in(tx, group, topic, batch).await?;
    apply_claimed(tx, group, topic, batch, &claims).await
}

/// Apply `batch` from `topic` for consumer group `group`, given its claims. Runs inside `tx`.
pub async fn apply_claimed(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    batch: &Batch,
    claims: &Claims,
) -> Result<Applied, sqlx::Error> {
    assert_eq!(claims.by_item.len(), batch.items.len(), "one claim per message");
    let stored = lock_offsets(tx, group, topic, batch).await?;
    let mut applied = Applied::default();
    let mut new_events = sort_by_claim(batch, claims, &stored, &mut applied);
    let refused = post_debits(tx, &mut new_events, &mut applied).await?;
    if !refused.is_empty() {
        reject_unbillable(tx, &mut new_events, &refused, &mut applied).await?;
    }
    applied.usage_change = super::counting::count_usage(tx, &new_events).await?;
    record_dead_letters(tx, topic, &applied.dead).await?;
    advance_offsets(tx, group, topic, batch, &stored, &mut applied).await?;
    applied.new_events = new_events;
    applied.stored_offsets = stored;
    Ok(applied)
}

/// Dead-letter one message the database refused (see `pipeline::writer`), on its own.
/// If it is still to be applied (at or above its partition's offset), the claim an earlier
/// attempt of its batch made for it at this position is released in the same transaction,
/// so a copy replayed from the dead-letter topic once the cause is fixed is new, not a
/// duplicate. Below the offset it was settled by whoever advanced it: nothing changes.
pub async fn apply_refused(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    dead: DeadItem,
) -> Result<Applied, sqlx::Error> {
    let (pos, event_id) = (dead.pos.clone(), dead.event_id.clone());
    let batch = Batch { items: vec![Item::Dead(dead)] };
    let applied = apply_claimed(tx, group, topic, &batch, &Claims { by_item: vec![Claim::Invalid] }).await?;
    if let (Some(id), false) = (event_id, applied.dead.is_empty()) {
        sqlx::query(
            "DELETE FROM processed_events
             WHERE event_id = $1 AND source_topic = $2 AND source_partition = $3 AND source_offset = $4
               AND source_group = $5",
        )
        .bind(id)
        .bind(topic)
        .bind(pos.partition)
        .bind(pos.offset)
        .bind(group)
        .execute(&mut **tx)
        .await?;
    }
    Ok(applied)
}

/// Lock this batch's partition rows (creating them at 0) and read their next offsets.
async fn lock_offsets(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let mut partitions: Vec<i32> = batch.items.iter().map(|i| i.pos().partition).collect();
    partitions.sort_unstable();
    partitions.dedup();
    sqlx::query(
        "INSERT INTO consumer_offsets (group_id, topic, partition, next_offset)
         SELECT $1, $2, p, 0 FROM UNNEST($3::int[]) AS p
         ON CONFLICT DO NOTHING",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .execute(&mut **tx)
    .await?;
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets
         WHERE group_id = $1 AND topic = $2 AND partition = ANY($3)
         ORDER BY partition FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(&partitions)
    .fetch_all(&mut **tx)
    .await?;
    assert_eq!(rows.len(), partitions.len(), "every partition row exists after the upsert");
    Ok(rows.into_iter().collect())
}

/// Messages at or above their partition's stored offset, by claim: own claims become the
/// batch's new events (batch order), the rest duplicates or dead letters.
fn sort_by_claim(
    batch: &Batch,
    claims: &Claims,
    stored: &HashMap<i32, i64>,
    applied: &mut Applied,
) -> Vec<ValidItem> {
    let mut new_events = Vec::with_capacity(batch.items.len());
    for (item, claim) in batch.items.iter().zip(&claims.by_item) {
        let pos = item.pos();
        if pos.offset < stored[&pos.partition] {
            applied.skipped_applied += 1;
            continue;
        }
        match (item, *claim) {
            (Item::Dead(d), _) => applied.dead.push(d.clone()),
            (Item::Valid(v), Claim::Own { reclaimed }) => {
                if reclaimed {
                    applied.reclaimed.insert(v.event.event_id.clone());
                }
                new_events.push((**v).clone());
            }
            (Item::Valid(_), Claim::Duplicate) => applied.duplicates += 1,
            (Item::Valid(v), Claim::Conflict) => applied.dead.push(conflict(v)),
            (Item::Valid(v), Claim::Invalid) => unreachable!("a valid item {} is claimed", v.event.event_id),
        }
    }
    new_events
}

/// Within the batch the first occurrence of an id is the one that tries to claim it.
/// Returns the first occurrences and the repeats (batch indexes). Repeats are classified
/// against whoever holds the claim afterwards, not against the first occurrence: the first
/// may be a re-read copy below its partition's offset (dropped later), while a repeat is
/// the very message that holds the claim.
fn first_occurrences(batch: &Batch) -> (Vec<usize>, Vec<usize>) {
    let mut seen: HashSet<&str> = HashSet::with_capacity(batch.items.len());
    let (mut firsts, mut repeats) = (Vec::with_capacity(batch.items.len()), Vec::new());
    for (i, item) in batch.items.iter().enumerate() {
        let Item::Valid(v) = item else { continue };
        if seen.insert(v.event.event_id.as_str()) {
            firsts.push(i);
        } else {
            repeats.push(i);
        }
    }
    (firsts, repeats)
}

fn conflict(v: &ValidItem) -> DeadItem {
    DeadItem {
        pos: v.pos.clone(),
        code: "idempotency_conflict",
        reason: format!("event_id {} was already used with a different payload", v.event.event_id),
        event_id: Some(v.event.event_id.clone()),
        key: None,
        payload: crate::codec::encode(&v.event.to_raw()),
    }
}

/// Claim the batch's first occurrences in the dedup store; classify those already there.
async fn claim_in(
    conn: &mut PgConnection,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<Claims, sqlx::Error> {
    let mut by_item = vec![Claim::Invalid; batch.items.len()];
    let (mut firsts, repeats) = first_occurrences(batch);
    if firsts.is_empty() {
        return Ok(Claims { by_item });
    }
    let valid = |i: usize| match &batch.items[i] {
        Item::Valid(v) => &**v,
        Item::Dead(_) => unreachable!("first occurrences are valid items"),
    };
    // Claim in event-id order: two instances claiming the same ids (a duplicate on
    // another partition) then wait for each other in one order and never deadlock.
    firsts.sort_unstable_by(|a, b| valid(*a).event.event_id.cmp(&valid(*b).event.event_id));
    let items: Vec<&ValidItem> = firsts.iter().map(|i| valid(*i)).collect();
    let ids: Vec<&str> = items.iter().map(|v| v.event.event_id.as_str()).collect();
    let hashes: Vec<&[u8]> = items.iter().map(|v| &v.payload_hash[..]).collect();
    let accounts: Vec<&str> = items.iter().map(|v| v.event.account_id.as_str()).collect();
    let costs: Vec<i64> = items.iter().map(|v| v.charge.cost_units).collect();
    let times: Vec<DateTime<Utc>> = items.iter().map(|v| v.event.occurred_at).collect();
    let parts: Vec<i32> = items.iter().map(|v| v.pos.partition).collect();
    let offsets: Vec<i64> = items.iter().map(|v| v.pos.offset).collect();
    let versions: Vec<&str> = items.iter().map(|v| &*v.catalog_version).collect();
    let entries: Vec<String> = items.iter().map(|v| v.charge.price_entry()).collect();
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO processed_events
           (event_id, payload_hash, account_id, cost_units, occurred_at,
            source_topic, source_partition, source_offset, source_group, catalog_version, price_entry)
         SELECT e, h, a, c, t, $8, p, o, $9, v, pe
         FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::bigint[], $5::timestamptz[],
                     $6::int[], $7::bigint[], $10::text[], $11::text[])
              WITH ORDINALITY AS u(e, h, a, c, t, p, o, v, pe, n)
         ORDER BY n
         ON CONFLICT (event_id) DO NOTHING
         RETURNING event_id",
    )
    .bind(&ids)
    .bind(&hashes)
    .bind(&accounts)
    .bind(&costs)
    .bind(&times)
    .bind(&parts)
    .bind(&offsets)
    .bind(topic)
    .bind(group)
    .bind(&versions)
    .bind(&entries)
    .fetch_all(&mut *conn)
    .await?;
    let new_ids: HashSet<String> = inserted.into_iter().map(|(id,)| id).collect();
    let known: Vec<&str> = ids.iter().copied().filter(|id| !new_ids.contains(*id)).collect();
    let stored = known_claims(conn, &known).await?;
    if known.iter().any(|id| !stored.contains_key(*id)) {
        // A claim we collided with was deleted in between (another instance refused that
        // event as `balance_out_of_range`): roll back; the claimer retries the batch.
        return Err(sqlx::Error::RowNotFound);
    }
    // Who holds each id's claim now: a fresh claim of this batch, or a stored one.
    let fresh: HashMap<&str, &ValidItem> = items
        .iter()
        .filter(|v| new_ids.contains(&v.event.event_id))
        .map(|v| (v.event.event_id.as_str(), *v))
        .collect();
    let mut owned: HashSet<(i32, i64)> = HashSet::new();
    let mut taken_over: Vec<(&str, &str)> = Vec::new();
    let mut classify = |i: usize| -> Claim {
        let v = valid(i);
        let id = v.event.event_id.as_str();
        let at = (v.pos.partition, v.pos.offset);
        let (hash, own_position, holder_group, applied): (&[u8], bool, Option<&str>, bool) =
            match fresh.get(id) {
                Some(f) => (&f.payload_hash[..], (f.pos.partition, f.pos.offset) == at, Some(group), false),
                None => {
                    let c = &stored[id]; // checked above: every known id has its row
                    (&c.hash[..], c.position() == (topic, at.0, at.1), c.group.as_deref(), c.applied)
                }
            };
        match (own_position && owned.insert(at), holder_group) {
            // This very message holds the claim: claimed now, or by an attempt of this
            // group that never committed (reclaimed).
            (true, Some(g)) if g == group => Claim::Own { reclaimed: !fresh.contains_key(id) },
            // This very message, claimed by another consumer group (a redeploy under a new
            // group re-reads the topic) that never applied it (killed before its batch
            // committed): take the claim over. Applied by it: a duplicate.
            (true, _) if !applied => {
                taken_over.push((id, holder_group.unwrap_or("")));
                Claim::Own { reclaimed: true }
            }
            // Another copy (or this message twice in one batch): the claim's own position
            // is (or will be) applied by its group.
            _ if hash == &v.payload_hash[..] => Claim::Duplicate,
            _ => Claim::Conflict,
        }
    };
    for i in firsts.iter().chain(&repeats) {
        by_item[*i] = classify(*i);
    }
    take_over(conn, group, &taken_over).await?;
    Ok(Claims { by_item })
}

/// A claim found in the dedup store.
struct StoredClaim {
    hash: Vec<u8>,
    /// Consumer group that claimed it (`None`: written before claims existed, when the
    /// dedup row and the debit were one transaction, so it is applied).
    group: Option<String>,
    topic: String,
    partition: i32,
    offset: i64,
    /// Its group's stored offset is past it: the batch that claimed it committed.
    applied: bool,
}

impl StoredClaim {
    fn position(&self) -> (&str, i32, i64) {
        (self.topic.as_str(), self.partition, self.offset)
    }
}

/// Move claims of messages that another group claimed and never applied to `group`.
async fn take_over(conn: &mut PgConnection, group: &str, ids: &[(&str, &str)]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    let (events, previous): (Vec<&str>, Vec<&str>) = ids.iter().copied().unzip();
    sqlx::query(
        "UPDATE processed_events p SET source_group = $1
         FROM UNNEST($2::text[], $3::text[]) AS u(e, g)
         WHERE p.event_id = u.e AND COALESCE(p.source_group, '') = u.g",
    )
    .bind(group)
    .bind(&events)
    .bind(&previous)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// Ids already in the dedup store: hash, claiming group and position, applied or not.
async fn known_claims(
    conn: &mut PgConnection,
    ids: &[&str],
) -> Result<HashMap<String, StoredClaim>, sqlx::Error> {
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    type Row = (String, Vec<u8>, Option<String>, String, i32, i64, bool);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT p.event_id, p.payload_hash, p.source_group, p.source_topic, p.source_partition,
                p.source_offset, (p.source_group IS NULL OR COALESCE(o.next_offset > p.source_offset, false))
         FROM processed_events p
         LEFT JOIN consumer_offsets o
           ON o.group_id = p.source_group AND o.topic = p.source_topic AND o.partition = p.source_partition
         WHERE p.event_id = ANY($1)",
    )
    .bind(ids)
    .fetch_all(&mut *conn)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, hash, group, topic, partition, offset, applied)| {
            (id, StoredClaim { hash, group, topic, partition, offset, applied })
        })
        .collect())
}

/// One `consume` entry per charged new event, with running `balance_after_units`; close
/// the reservations the events name; queue auto-reload requests for accounts that crossed.
///
/// Returns the ids of events whose debit would take the balance beyond the `i64` unit
/// range: those are not billed here but dead-lettered by the caller (`balance_out_of_range`),
/// so one absurd account can never stall the pipeline.
async fn post_debits(
    tx: &mut Transaction<'_, Postgres>,
    new_events: &mut [ValidItem],
    applied: &mut Applied,
) -> Result<HashSet<String>, sqlx::Error> {
    let mut refused = HashSet::new();
    let mut touched_accounts: Vec<&str> = new_events
        .iter()
        .filter(|v| v.charge.cost_units > 0 || v.event.reservation_id.is_some())
        .map(|v| v.event.account_id.as_str())
        .collect();
    if touched_accounts.is_empty() {
        return Ok(refused);
    }
    touched_accounts.sort_unstable();
    touched_accounts.dedup();
    // Owned (one per account, not per event): `new_events` is updated below under the locks.
    let accounts: Vec<String> = touched_accounts.into_iter().map(str::to_owned).collect();
    let sorted: Vec<&str> = accounts.iter().map(String::as_str).collect();
    let mut balances = super::lock_balances(tx, &sorted).await?;
    let mut wallets = super::grants::load_wallets(tx, &balances).await?;
    // Under those locks: events whose hold was already billed at its deadline.
    mark_paid_by_hold(tx, new_events).await?;
    let touched: Vec<&ValidItem> =
        new_events.iter().filter(|v| v.charge.cost_units > 0 || v.event.reservation_id.is_some()).collect();
    let mut rows = super::EntryRows::default();
    for v in touched.iter().filter(|v| v.charge.cost_units > 0) {
        let bal = balances.get_mut(v.event.account_id.as_str()).expect("locked above");
        let amount = -v.charge.cost_units;
        let Some(after) = bal.checked_add(amount) else {
            refused.insert(v.event.event_id.clone());
            continue;
        };
        *bal = after;
        applied.debited_units = applied.debited_units.saturating_add(v.charge.cost_units);
        // Event-time rule: grants past their deadline at the event's time do not pay.
        let grant_changes = super::grants::debit(
            &mut wallets,
            &v.event.account_id,
            v.charge.cost_units,
            v.event.occurred_at,
        )?;
        rows.push(super::NewEntry {
            account_id: &v.event.account_id,
            kind: "consume",
            amount_units: amount,
            balance_after_units: *bal,
            idempotency_key: format!("usage:{}", v.event.event_id),
            payload_hash: &v.payload_hash,
            event_id: Some(&v.event.event_id),
            occurred_at: v.event.occurred_at,
            description: format!("{} {}", v.event.provider, v.charge.priced_model),
            created_by: None,
            corrects_entry_id: None,
            metadata: serde_json::json!({}),
            grant_changes,
        });
    }
    let last_ids = if rows.is_empty() { HashMap::new() } else { rows.insert(tx).await? };
    super::grants::store_wallets(tx, &wallets).await?;
    let settlements: Vec<(&str, &str, i64, &str)> = touched
        .iter()
        .filter(|v| !refused.contains(&v.event.event_id))
        .filter_map(|v| {
            let e = &v.event;
            e.reservation_id
                .as_deref()
                .map(|r| (r, e.account_id.as_str(), v.charge.cost_units, e.event_id.as_str()))
        })
        .collect();
    applied.reservations_settled += super::reservations::settle_from_events(tx, &settlements).await?;
    // last_deduction_at: the event time of the account's latest billed usage.
    let mut usage_at: HashMap<&str, DateTime<Utc>> = HashMap::new();
    for v in touched.iter().filter(|v| v.charge.cost_units > 0 && !refused.contains(&v.event.event_id)) {
        let at = usage_at.entry(v.event.account_id.as_str()).or_insert(v.event.occurred_at);
        *at = (*at).max(v.event.occurred_at);
    }
    super::store_balances(tx, &balances, &last_ids, None, &usage_at).await?;
    super::auto_reload::check(tx, &balances).await?;
    Ok(refused)
}

/// Events whose hold was billed at its deadline before they arrived (see
/// `ledger::reservations`): recorded with charge 0, reason `paid_by_hold`. Under the
/// balance locks `post_debits` holds.
async fn mark_paid_by_hold(
    tx: &mut Transaction<'_, Postgres>,
    new_events: &mut [ValidItem],
) -> Result<(), sqlx::Error> {
    let with_hold: Vec<(&str, &str)> = new_events
        .iter()
        .filter_map(|v| v.event.reservation_id.as_deref().map(|r| (r, v.event.account_id.as_str())))
        .collect();
    let paid = super::reservations::billed_at_deadline(tx, &with_hold).await?;
    if paid.is_empty() {
        return Ok(());
    }
    for v in new_events.iter_mut() {
        if v.event.reservation_id.as_ref().is_some_and(|r| paid.contains(r)) {
            v.charge.cost_units = 0;
            v.charge.charged = false;
            v.charge.reason = crate::pricing::ChargeReason::PaidByHold;
        }
    }
    Ok(())
}

/// Events that could not be billed (balance beyond the unit range): out of the dedup store
/// and the usage log, into the dead letters, so a human decides and nothing is lost.
async fn reject_unbillable(
    tx: &mut Transaction<'_, Postgres>,
    new_events: &mut Vec<ValidItem>,
    refused: &HashSet<String>,
    applied: &mut Applied,
) -> Result<(), sqlx::Error> {
    let ids: Vec<&str> = refused.iter().map(String::as_str).collect();
    sqlx::query("DELETE FROM processed_events WHERE event_id = ANY($1)")
        .bind(&ids)
        .execute(&mut **tx)
        .await?;
    for v in new_events.iter().filter(|v| refused.contains(&v.event.event_id)) {
        applied.dead.push(DeadItem {
            pos: v.pos.clone(),
            code: "balance_out_of_range",
            reason: format!(
                "debiting {} USD would take account {} beyond the ledger's range",
                crate::money::units_to_usd(v.charge.cost_units),
                v.event.account_id
            ),
            event_id: Some(v.event.event_id.clone()),
            key: None,
            payload: crate::codec::encode(&v.event.to_raw()),
        });
    }
    new_events.retain(|v| !refused.contains(&v.event.event_id));
    Ok(())
}

async fn record_dead_letters(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    dead: &[DeadItem],
) -> Result<(), sqlx::Error> {
    if dead.is_empty() {
        return Ok(());
    }
    let parts: Vec<i32> = dead.iter().map(|d| d.pos.partition).collect();
    let offsets: Vec<i64> = dead.iter().map(|d| d.pos.offset).collect();
    let codes: Vec<&str> = dead.iter().map(|d| d.code).collect();
    let reasons: Vec<&str> = dead.iter().map(|d| d.reason.as_str()).collect();
    let ids: Vec<Option<&str>> = dead.iter().map(|d| d.event_id.as_deref()).collect();
    sqlx::query(
        "INSERT INTO dead_letters (source_topic, source_partition, source_offset, code, reason, event_id)
         SELECT $1, p, o, c, r, e FROM UNNEST($2::int[], $3::bigint[], $4::text[], $5::text[], $6::text[])
              AS u(p, o, c, r, e)
         ON CONFLICT DO NOTHING",
    )
    .bind(topic)
    .bind(&parts)
    .bind(&offsets)
    .bind(&codes)
    .bind(&reasons)
    .bind(&ids)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// next_offset = max(stored, highest offset in the batch + 1), per partition.
async fn advance_offsets(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    batch: &Batch,
    stored: &HashMap<i32, i64>,
    applied: &mut Applied,
) -> Result<(), sqlx::Error> {
    let mut next: BTreeMap<i32, i64> = stored.iter().map(|(p, o)| (*p, *o)).collect();
    for item in &batch.items {
        let pos = item.pos();
        let n = next.get_mut(&pos.partition).expect("every partition was locked");
        *n = (*n).max(pos.offset + 1);
    }
    let parts: Vec<i32> = next.keys().copied().collect();
    let offsets: Vec<i64> = next.values().copied().collect();
    sqlx::query(
        "UPDATE consumer_offsets c SET next_offset = u.o, updated_at = now()
         FROM UNNEST($3::int[], $4::bigint[]) AS u(p, o)
         WHERE c.group_id = $1 AND c.topic = $2 AND c.partition = u.p",
    )
    .bind(group)
    .bind(topic)
    .bind(&parts)
    .bind(&offsets)
    .execute(&mut **tx)
    .await?;
    applied.next_offsets = next;
    Ok(())
}
