//! Writer task: one batch at a time, Postgres transaction + ClickHouse + dead letters.
//!
//! **Errors are classified.** Transient ones (connection lost, timeout, server restarting,
//! serialization failure, ClickHouse or the broker unavailable) retry the whole batch from a
//! fresh transaction with capped, jittered backoff, while the bounded channel holds the
//! reader back. Only a shutdown request ends that loop; the batch is then simply not
//! committed and will be re-read by whoever owns the partition next.
//!
//! A *refusal* (Postgres rejects the rows themselves: SQLSTATE class 22, data exception, or
//! 23, integrity constraint violation) would fail forever, so the batch is split in halves,
//! each written on its own (in order: per partition, offsets stay increasing), until the
//! refused message is alone; it is dead-lettered with code `refused_by_database` and the
//! database's reason, and the pipeline goes on. A refusal costs O(log batch) extra
//! transactions, and nothing else in the batch is lost or applied twice: every half is
//! claimed and applied by the same exactly-once rules as a batch.

use crate::analytics::{self, UsageRow};
use crate::batch::{Batch, DeadItem, Item, ValidItem};
use crate::ledger::usage::{self, Applied, Claims};
use crate::metrics as m;
use crate::quota::state::QuotaState;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use sqlx::PgPool;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Backoff between retries of a failed batch: 100 ms doubling to 10 s.
const RETRY_DELAY_MIN: Duration = Duration::from_millis(100);
const RETRY_DELAY_MAX: Duration = Duration::from_secs(10);

pub struct Writer {
    pub pool: PgPool,
    pub clickhouse: clickhouse::Client,
    pub producer: FutureProducer,
    pub consumer: Arc<StreamConsumer>,
    pub group: String,
    pub topic: String,
    pub dlq_topic: String,
    pub input: mpsc::Receiver<Batch>,
    /// This instance's in-memory quota state: a committed batch's usage is applied to it
    /// right after COMMIT (see `quota::state`).
    pub state: Arc<QuotaState>,
    /// Hard stop: abandon a batch that keeps failing (set after the graceful drain window).
    pub abort: CancellationToken,
    /// Test-only fault injection (`TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT=1`): abort the
    /// process right after a ClickHouse insert, before the Postgres COMMIT.
    pub fault_abort_after_clickhouse_insert: bool,
}

impl Writer {
    /// Write batches until the reader hangs up (graceful shutdown) or `abort` fires.
    ///
    /// Two stages overlap: a claimer task claims batch N+1's event ids (its own short
    /// transaction, `usage::claim`) while this task applies and commits batch N. Claims
    /// are keyed by source position, so claiming ahead is safe in any order; the channel
    /// between the stages holds one batch (memory: see ARCHITECTURE.md).
    pub async fn run(mut self) -> anyhow::Result<()> {
        let (claimed_tx, mut claimed) = mpsc::channel::<(Batch, Result<Claims, StageError>)>(1);
        let input = std::mem::replace(&mut self.input, mpsc::channel(1).1);
        let claimer = tokio::spawn(claim_stage(
            self.pool.clone(),
            self.group.clone(),
            self.topic.clone(),
            input,
            claimed_tx,
            self.abort.clone(),
        ));
        while let Some((batch, claims)) = claimed.recv().await {
            if !self.write_batch(&batch, Some(claims)).await {
                claimer.abort();
                anyhow::bail!("aborted with an uncommitted batch of {} messages", batch.items.len());
            }
        }
        claimer.await.map_err(|e| anyhow::anyhow!("claimer task: {e}"))??;
        // Final synchronous offset hint so a restart re-reads as little as possible.
        if let Ok(tpl) = self.consumer.assignment()
            && tpl.count() > 0
        {
            let _ = self.consumer.commit_consumer_state(CommitMode::Sync);
        }
        Ok(())
    }

    /// Write one batch until it is committed (true) or `abort` fires (false). `claims`: made
    /// ahead by the claimer, or `None` to claim here.
    async fn write_batch(&self, batch: &Batch, claims: Option<Result<Claims, StageError>>) -> bool {
        let started = Instant::now();
        match self.write_with_retry(batch, claims).await {
            Outcome::Committed(applied) => {
                m::record_batch(&applied, batch.items.len(), started.elapsed());
                self.hint_offsets(&applied);
                true
            }
            Outcome::Refused(e) => self.isolate(batch, e).await,
            Outcome::Aborted => false,
        }
    }

    /// The first attempt uses the claims made ahead; a retry claims again, because a failed
    /// attempt may have inserted ClickHouse rows for events it claimed fresh (they are then
    /// "reclaimed" and looked up before inserting).
    async fn write_with_retry(&self, batch: &Batch, claims: Option<Result<Claims, StageError>>) -> Outcome {
        let mut delay = RETRY_DELAY_MIN;
        let mut claims = claims;
        loop {
            let attempt = match claims.take() {
                Some(c) => c,
                None => usage::claim(&self.pool, &self.group, &self.topic, batch)
                    .await
                    .map_err(StageError::postgres("postgres_claim")),
            };
            let result = match attempt {
                Ok(c) => self.write_once(batch, c).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(applied) => return Outcome::Committed(applied),
                Err(e) if e.refused => return Outcome::Refused(e),
                Err(e) => retry_warning(&e, delay),
            }
            if !backoff(&self.abort, &mut delay).await {
                return Outcome::Aborted;
            }
        }
    }

    /// The database refused something in `batch`: write each half on its own until the
    /// refused message is alone, then dead-letter it (see the module doc).
    fn isolate<'a>(&'a self, batch: &'a Batch, e: StageError) -> futures::future::BoxFuture<'a, bool> {
        Box::pin(async move {
            if let [item] = batch.items.as_slice() {
                return self.dead_letter_refused(item, e).await;
            }
            assert!(batch.items.len() > 1, "an empty batch writes nothing a database could refuse");
            metrics::counter!(m::BATCH_SPLITS).increment(1);
            tracing::warn!(stage = e.stage, error = %e.error, messages = batch.items.len(),
                "the database refused part of a batch; splitting it to isolate the message");
            let (first, second) = batch.items.split_at(batch.items.len() / 2);
            for half in [first, second] {
                if !self.write_batch(&Batch { items: half.to_vec() }, None).await {
                    return false;
                }
            }
            true
        })
    }

    /// Dead-letter the one message the database refused, with the database's reason. If
    /// even that is refused (a dead letter's own fields), it is recorded with the bare
    /// minimum (no event id, the SQLSTATE only); that cannot be refused.
    async fn dead_letter_refused(&self, item: &Item, e: StageError) -> bool {
        let (pos, event_id, payload) = match item {
            Item::Valid(v) => {
                (v.pos.clone(), Some(v.event.event_id.clone()), crate::codec::encode(&v.event.to_raw()))
            }
            Item::Dead(d) => (d.pos.clone(), d.event_id.clone(), d.payload.clone()),
        };
        tracing::error!(partition = pos.partition, offset = pos.offset, event_id = ?event_id, stage = e.stage,
            error = %e.error, "the database refused a message; dead-lettering it");
        metrics::counter!(m::EVENTS_REFUSED).increment(1);
        let mut dead = DeadItem {
            pos,
            code: "refused_by_database",
            reason: format!("{}: {}", e.stage, e.error).replace('\0', "\\0"),
            event_id,
            key: None,
            payload,
        };
        let mut delay = RETRY_DELAY_MIN;
        loop {
            match self.write_refused(&dead).await {
                Ok(applied) => {
                    self.hint_offsets(&applied);
                    return true;
                }
                Err(e) if e.refused && dead.event_id.is_some() => {
                    dead.event_id = None;
                    dead.reason =
                        format!("{}: refused (SQLSTATE {})", e.stage, e.sqlstate.unwrap_or_default());
                    continue;
                }
                Err(e) => retry_warning(&e, delay),
            }
            if !backoff(&self.abort, &mut delay).await {
                return false;
            }
        }
    }

    async fn write_refused(&self, dead: &DeadItem) -> Result<Applied, StageError> {
        let mut tx = self.pool.begin().await.map_err(StageError::postgres("postgres"))?;
        let applied = usage::apply_refused(&mut tx, &self.group, &self.topic, dead.clone())
            .await
            .map_err(StageError::postgres("postgres"))?;
        self.publish_dead(&applied.dead).await?;
        tx.commit().await.map_err(StageError::at("postgres_commit"))?;
        m::record_batch(&applied, 1, Duration::ZERO);
        Ok(applied)
    }

    async fn write_once(&self, batch: &Batch, claims: Claims) -> Result<Applied, StageError> {
        let mut tx = self.pool.begin().await.map_err(StageError::postgres("postgres"))?;
        let ledger_started = Instant::now();
        let applied = usage::apply_claimed(&mut tx, &self.group, &self.topic, batch, &claims)
            .await
            .map_err(StageError::postgres("postgres"))?;
        let change = applied.usage_change;
        if let Some(c) = change {
            self.state.begin_local(c);
        }
        let result = self.finish_transaction(tx, &applied).await;
        match (change, &result) {
            (Some(c), Ok(())) => self.state.finish_local(c, &applied.new_events),
            (Some(c), Err(e)) => self.state.abandon_local(c, e.stage == "postgres_commit").await,
            (None, _) => {}
        }
        result?;
        metrics::histogram!(m::LEDGER_COMMIT_SECONDS).record(ledger_started.elapsed().as_secs_f64());
        Ok(applied)
    }

    /// The side effects that must precede COMMIT (ClickHouse rows, dead letters), then
    /// COMMIT. On any error the transaction is dropped, i.e. rolled back.
    async fn finish_transaction(
        &self,
        tx: sqlx::Transaction<'static, sqlx::Postgres>,
        applied: &Applied,
    ) -> Result<(), StageError> {
        let ch_started = Instant::now();
        let rows = self.rows_not_in_clickhouse(applied).await?;
        if let Err(e) = analytics::insert(&self.clickhouse, &rows).await {
            metrics::counter!(m::CLICKHOUSE_INSERT_ERRORS).increment(1);
            return Err(StageError::transient("clickhouse", e));
        }
        metrics::histogram!(m::CLICKHOUSE_INSERT_SECONDS).record(ch_started.elapsed().as_secs_f64());
        if self.fault_abort_after_clickhouse_insert && !rows.is_empty() {
            // Fault injection for the exactly-once tests: die in the worst place.
            tracing::error!("fault injection: aborting between the ClickHouse insert and COMMIT");
            std::process::abort();
        }
        self.publish_dead(&applied.dead).await?;
        tx.commit().await.map_err(StageError::at("postgres_commit"))
    }

    /// Usage rows of the batch's new events, minus those a crashed earlier attempt already
    /// inserted. Only reclaimed events (claimed by an attempt at the same position that
    /// never committed) can have a row already, so only they are looked up in ClickHouse:
    /// after a clean run that is none, after a crash at most one batch per partition.
    async fn rows_not_in_clickhouse(&self, applied: &Applied) -> Result<Vec<UsageRow>, StageError> {
        let suspects: Vec<&ValidItem> =
            applied.new_events.iter().filter(|v| applied.reclaimed.contains(&v.event.event_id)).collect();
        let present = analytics::existing_event_ids(&self.clickhouse, &suspects)
            .await
            .map_err(StageError::at("clickhouse"))?;
        if !present.is_empty() {
            metrics::counter!(m::CLICKHOUSE_REPLAYED_ROWS_SKIPPED).increment(present.len() as u64);
        }
        let now = chrono::Utc::now();
        Ok(applied
            .new_events
            .iter()
            .filter(|v| !present.contains(&v.event.event_id))
            .map(|v| UsageRow::from_item(v, now))
            .collect())
    }

    /// Produce every dead letter and wait for all acknowledgements.
    async fn publish_dead(&self, dead: &[DeadItem]) -> Result<(), StageError> {
        let sends = dead.iter().map(|d| {
            let partition = d.pos.partition.to_string();
            let offset = d.pos.offset.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "tally.code", value: Some(d.code) })
                .insert(Header { key: "tally.reason", value: Some(d.reason.as_str()) })
                .insert(Header { key: "tally.source.topic", value: Some(self.topic.as_str()) })
                .insert(Header { key: "tally.source.partition", value: Some(partition.as_str()) })
                .insert(Header { key: "tally.source.offset", value: Some(offset.as_str()) });
            let key: &[u8] = d.key.as_deref().unwrap_or(&[]);
            let record = FutureRecord::to(&self.dlq_topic).payload(&d.payload).key(key).headers(headers);
            self.producer.send(record, Duration::from_secs(30))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| StageError::transient("dead_letter", e))?;
        }
        Ok(())
    }

    /// Tell Kafka how far we are (a hint: Postgres holds the truth).
    fn hint_offsets(&self, applied: &Applied) {
        let mut tpl = TopicPartitionList::new();
        for (partition, next) in &applied.next_offsets {
            if tpl.add_partition_offset(&self.topic, *partition, Offset::Offset(*next)).is_err() {
                return;
            }
        }
        if tpl.count() > 0
            && let Err(e) = self.consumer.commit(&tpl, CommitMode::Async)
        {
            metrics::counter!(m::KAFKA_ERRORS, "stage" => "commit_hint").increment(1);
            tracing::debug!(error = %e, "offset hint not committed");
        }
    }
}

/// Claim each batch ahead of the writer (retrying transient errors until it succeeds or
/// `abort` fires; a refusal goes to the writer, which isolates the refused message).
async fn claim_stage(
    pool: PgPool,
    group: String,
    topic: String,
    mut input: mpsc::Receiver<Batch>,
    out: mpsc::Sender<(Batch, Result<Claims, StageError>)>,
    abort: CancellationToken,
) -> anyhow::Result<()> {
    while let Some(batch) = input.recv().await {
        let mut delay = RETRY_DELAY_MIN;
        let claims = loop {
            match usage::claim(&pool, &group, &topic, &batch)
                .await
                .map_err(StageError::postgres("postgres_claim"))
            {
                Ok(c) => break Ok(c),
                Err(e) if e.refused => break Err(e),
                Err(e) => retry_warning(&e, delay),
            }
            if !backoff(&abort, &mut delay).await {
                anyhow::bail!("aborted while claiming a batch of {} messages", batch.items.len());
            }
        };
        if out.send((batch, claims)).await.is_err() {
            anyhow::bail!("writer stopped before the claimer");
        }
    }
    Ok(())
}

fn retry_warning(e: &StageError, delay: Duration) {
    metrics::counter!(m::BATCH_RETRIES, "stage" => e.stage).increment(1);
    tracing::warn!(stage = e.stage, error = %e.error, retry_in_ms = delay.as_millis() as u64, "batch failed; retrying");
}

/// Sleep `delay` plus jitter, then double it (capped). False if `abort` fired first.
async fn backoff(abort: &CancellationToken, delay: &mut Duration) -> bool {
    let jitter = Duration::from_millis(rand::random::<u64>() % (delay.as_millis() as u64 / 2 + 1));
    tokio::select! {
        _ = abort.cancelled() => return false,
        _ = tokio::time::sleep(*delay + jitter) => {}
    }
    *delay = (*delay * 2).min(RETRY_DELAY_MAX);
    true
}

enum Outcome {
    Committed(Applied),
    /// The database refused the batch's rows: retrying them as they are cannot succeed.
    Refused(StageError),
    Aborted,
}

struct StageError {
    stage: &'static str,
    error: String,
    /// The database refused the rows themselves (see the module doc): not retried as is.
    refused: bool,
    sqlstate: Option<String>,
}

impl StageError {
    fn transient(stage: &'static str, e: impl std::fmt::Display) -> StageError {
        StageError { stage, error: e.to_string(), refused: false, sqlstate: None }
    }

    fn at<E: std::fmt::Display>(stage: &'static str) -> impl Fn(E) -> StageError {
        move |e| StageError::transient(stage, e)
    }

    /// A Postgres error, classified: refused iff SQLSTATE class 22 or 23.
    fn postgres(stage: &'static str) -> impl Fn(sqlx::Error) -> StageError {
        move |e| {
            let sqlstate = match &e {
                sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
                _ => None,
            };
            let refused = sqlstate.as_deref().is_some_and(refused_by_database);
            StageError { stage, error: e.to_string(), refused, sqlstate }
        }
    }
}

/// SQLSTATEs that mean "these rows can never be stored": class 22 (data exception: a value
/// out of range, an invalid byte sequence) and 23 (integrity constraint violation: a CHECK,
/// NOT NULL or a trigger raising one). Everything else (class 08 connection, 40
/// serialization/deadlock, 53 resources, 57 operator intervention, ...) is transient, and a
/// bug in our own SQL (class 42) must stall loudly rather than dead-letter the stream.
fn refused_by_database(sqlstate: &str) -> bool {
    sqlstate.starts_with("22") || sqlstate.starts_with("23")
}

#[cfg(test)]
mod tests {
    #[test]
    fn only_data_and_integrity_errors_are_refusals() {
        for code in ["22003", "22021", "22P02", "23502", "23514", "23505"] {
            assert!(super::refused_by_database(code), "{code}");
        }
        for code in ["08006", "40001", "40P01", "53300", "57P01", "55P03", "42601", "42P01", "XX000"] {
            assert!(!super::refused_by_database(code), "{code}");
        }
    }
}
