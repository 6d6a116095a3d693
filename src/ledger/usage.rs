//! Applying a batch of consumed messages to the ledger, inside one transaction.
//!
//! The caller opens the transaction, calls [`apply`], performs the side effects that must
//! precede COMMIT (ClickHouse insert, dead-letter produce) using the returned
//! [`Applied`], then commits. See `pipeline` for why this order is exactly-once.

use crate::pipeline::{Batch, DeadItem, Item, ValidItem};
use chrono::{DateTime, Utc};
use sqlx::{Postgres, Transaction};
use std::collections::{BTreeMap, HashMap, HashSet, hash_map::Entry};

/// What a batch did, for the side effects and the metrics.
#[derive(Debug, Default)]
pub struct Applied {
    /// Events applied for the first time: these go to ClickHouse.
    pub new_events: Vec<ValidItem>,
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
}

/// Apply `batch` from `topic` for consumer group `group`. Runs inside `tx`.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<Applied, sqlx::Error> {
    let stored = lock_offsets(tx, group, topic, batch).await?;
    let mut applied = Applied::default();
    let fresh = drop_applied(batch, &stored, &mut applied);
    let candidates = dedup_in_batch(fresh, &mut applied);
    let mut new_events = insert_processed(tx, topic, candidates, &mut applied).await?;
    let refused = post_debits(tx, &new_events, &mut applied).await?;
    if !refused.is_empty() {
        reject_unbillable(tx, &mut new_events, &refused, &mut applied).await?;
    }
    crate::quota::store::count_usage(tx, &new_events).await?;
    record_dead_letters(tx, topic, &applied.dead).await?;
    advance_offsets(tx, group, topic, batch, &stored, &mut applied).await?;
    applied.new_events = new_events;
    applied.stored_offsets = stored;
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

/// Keep only messages at or above their partition's stored offset.
fn drop_applied<'b>(batch: &'b Batch, stored: &HashMap<i32, i64>, applied: &mut Applied) -> Vec<&'b Item> {
    let mut fresh = Vec::with_capacity(batch.items.len());
    for item in &batch.items {
        let pos = item.pos();
        if pos.offset < stored[&pos.partition] {
            applied.skipped_applied += 1;
        } else {
            fresh.push(item);
        }
    }
    fresh
}

/// Within the batch: first occurrence of an id wins; an identical repeat is a duplicate,
/// a different payload under the same id is a conflict (dead-lettered).
fn dedup_in_batch<'b>(fresh: Vec<&'b Item>, applied: &mut Applied) -> Vec<&'b ValidItem> {
    let mut seen: HashMap<&str, [u8; 32]> = HashMap::with_capacity(fresh.len());
    let mut out = Vec::with_capacity(fresh.len());
    for item in fresh {
        match item {
            Item::Dead(d) => applied.dead.push(d.clone()),
            Item::Valid(v) => match seen.entry(v.event.event_id.as_str()) {
                Entry::Vacant(e) => {
                    e.insert(v.payload_hash);
                    out.push(&**v);
                }
                Entry::Occupied(e) if *e.get() == v.payload_hash => applied.duplicates += 1,
                Entry::Occupied(_) => applied.dead.push(conflict(v)),
            },
        }
    }
    out
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

/// Insert into the dedup store; return the items that were not there before.
async fn insert_processed(
    tx: &mut Transaction<'_, Postgres>,
    topic: &str,
    candidates: Vec<&ValidItem>,
    applied: &mut Applied,
) -> Result<Vec<ValidItem>, sqlx::Error> {
    if candidates.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<&str> = candidates.iter().map(|v| v.event.event_id.as_str()).collect();
    let hashes: Vec<&[u8]> = candidates.iter().map(|v| &v.payload_hash[..]).collect();
    let accounts: Vec<&str> = candidates.iter().map(|v| v.event.account_id.as_str()).collect();
    let costs: Vec<i64> = candidates.iter().map(|v| v.charge.cost_units).collect();
    let times: Vec<DateTime<Utc>> = candidates.iter().map(|v| v.event.occurred_at).collect();
    let parts: Vec<i32> = candidates.iter().map(|v| v.pos.partition).collect();
    let offsets: Vec<i64> = candidates.iter().map(|v| v.pos.offset).collect();
    let inserted: Vec<(String,)> = sqlx::query_as(
        "INSERT INTO processed_events
           (event_id, payload_hash, account_id, cost_units, occurred_at,
            source_topic, source_partition, source_offset)
         SELECT e, h, a, c, t, $8, p, o
         FROM UNNEST($1::text[], $2::bytea[], $3::text[], $4::bigint[], $5::timestamptz[],
                     $6::int[], $7::bigint[]) AS u(e, h, a, c, t, p, o)
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
    .fetch_all(&mut **tx)
    .await?;
    let new_ids: std::collections::HashSet<String> = inserted.into_iter().map(|(id,)| id).collect();
    let known: Vec<&ValidItem> =
        candidates.iter().copied().filter(|v| !new_ids.contains(&v.event.event_id)).collect();
    classify_known(tx, known, applied).await?;
    Ok(candidates.into_iter().filter(|v| new_ids.contains(&v.event.event_id)).cloned().collect())
}

/// Ids seen in an earlier batch: a replay if the payload matches, else a conflict.
async fn classify_known(
    tx: &mut Transaction<'_, Postgres>,
    known: Vec<&ValidItem>,
    applied: &mut Applied,
) -> Result<(), sqlx::Error> {
    if known.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = known.iter().map(|v| v.event.event_id.as_str()).collect();
    let rows: Vec<(String, Vec<u8>)> =
        sqlx::query_as("SELECT event_id, payload_hash FROM processed_events WHERE event_id = ANY($1)")
            .bind(&ids)
            .fetch_all(&mut **tx)
            .await?;
    let hashes: HashMap<String, Vec<u8>> = rows.into_iter().collect();
    for v in known {
        match hashes.get(&v.event.event_id) {
            Some(h) if h[..] == v.payload_hash[..] => applied.duplicates += 1,
            Some(_) => applied.dead.push(conflict(v)),
            None => unreachable!("ON CONFLICT skipped {} so the row exists", v.event.event_id),
        }
    }
    Ok(())
}

/// One `consume` entry per charged new event, with running `balance_after_units`; close
/// the reservations the events name; queue auto-reload requests for accounts that crossed.
///
/// Returns the ids of events whose debit would take the balance beyond the `i64` unit
/// range: those are not billed here but dead-lettered by the caller (`balance_out_of_range`),
/// so one absurd account can never stall the pipeline.
async fn post_debits(
    tx: &mut Transaction<'_, Postgres>,
    new_events: &[ValidItem],
    applied: &mut Applied,
) -> Result<HashSet<String>, sqlx::Error> {
    let mut refused = HashSet::new();
    let touched: Vec<&ValidItem> =
        new_events.iter().filter(|v| v.charge.cost_units > 0 || v.event.reservation_id.is_some()).collect();
    if touched.is_empty() {
        return Ok(refused);
    }
    let mut accounts: Vec<&str> = touched.iter().map(|v| v.event.account_id.as_str()).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let mut balances = super::lock_balances(tx, &accounts).await?;
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
        });
    }
    let last_ids = if rows.is_empty() { HashMap::new() } else { rows.insert(tx).await? };
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
    let deducted = (!last_ids.is_empty()).then(Utc::now);
    super::store_balances(tx, &balances, &last_ids, None, deducted).await?;
    super::auto_reload::check(tx, &balances).await?;
    Ok(refused)
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

/// May ClickHouse hold rows of events Postgres has not committed? True while some
/// partition's send watermark is ahead of its committed offset: a crashed (or, with several
/// instances, an in-flight) attempt may have inserted rows for any event id, and a
/// duplicate of such an event can arrive on *another* partition. `sent_before` are this
/// batch's partitions' watermarks before it raised them; `stored` their committed offsets.
pub async fn clickhouse_may_hold_uncommitted(
    tx: &mut Transaction<'_, Postgres>,
    group: &str,
    topic: &str,
    sent_before: &HashMap<i32, i64>,
    stored: &HashMap<i32, i64>,
) -> Result<bool, sqlx::Error> {
    if sent_before.iter().any(|(p, sent)| *sent > stored.get(p).copied().unwrap_or(0)) {
        return Ok(true);
    }
    let mine: Vec<i32> = sent_before.keys().copied().chain(stored.keys().copied()).collect();
    let (others,): (bool,) = sqlx::query_as(
        "SELECT EXISTS (SELECT 1 FROM clickhouse_sent s
             LEFT JOIN consumer_offsets o USING (group_id, topic, partition)
             WHERE s.group_id = $1 AND s.topic = $2 AND NOT (s.partition = ANY($3))
               AND s.sent_upto > COALESCE(o.next_offset, 0))",
    )
    .bind(group)
    .bind(topic)
    .bind(&mine)
    .fetch_one(&mut **tx)
    .await?;
    Ok(others)
}

/// Raise the ClickHouse send watermark of the batch's partitions to past its last offset,
/// in its own committed transaction (it must be durable before the insert), and return
/// the previous watermarks. Offsets below a previous watermark may already be in
/// ClickHouse from an attempt whose Postgres commit never happened.
pub async fn mark_clickhouse_sent(
    pool: &sqlx::PgPool,
    group: &str,
    topic: &str,
    batch: &Batch,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let mut upto: BTreeMap<i32, i64> = BTreeMap::new();
    for item in &batch.items {
        let pos = item.pos();
        let e = upto.entry(pos.partition).or_insert(0);
        *e = (*e).max(pos.offset + 1);
    }
    let parts: Vec<i32> = upto.keys().copied().collect();
    let offsets: Vec<i64> = upto.values().copied().collect();
    let mut tx = pool.begin().await?;
    let prior: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, sent_upto FROM clickhouse_sent
         WHERE group_id = $1 AND topic = $2 AND partition = ANY($3) ORDER BY partition FOR UPDATE",
    )
    .bind(group)
    .bind(topic)
    .bind(&parts)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO clickhouse_sent (group_id, topic, partition, sent_upto)
         SELECT $1, $2, p, o FROM UNNEST($3::int[], $4::bigint[]) AS u(p, o)
         ON CONFLICT (group_id, topic, partition)
         DO UPDATE SET sent_upto = GREATEST(clickhouse_sent.sent_upto, EXCLUDED.sent_upto)",
    )
    .bind(group)
    .bind(topic)
    .bind(&parts)
    .bind(&offsets)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(prior.into_iter().collect())
}
