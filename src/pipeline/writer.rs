//! Writer task: one batch at a time, Postgres transaction + ClickHouse + dead letters.
//!
//! Errors from the servers are operating errors: the whole batch is retried from a fresh
//! transaction with capped, jittered backoff, forever, while the bounded channel holds the
//! reader back. Only a shutdown request ends the retry loop; the batch is then simply not
//! committed and will be re-read by whoever owns the partition next.

use crate::analytics::{self, UsageRow};
use crate::batch::{Batch, DeadItem, ValidItem};
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
        let (claimed_tx, mut claimed) = mpsc::channel::<(Batch, Claims)>(1);
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
            let started = Instant::now();
            let Some(applied) = self.write_with_retry(&batch, claims).await else {
                claimer.abort();
                anyhow::bail!("aborted with an uncommitted batch of {} messages", batch.items.len());
            };
            m::record_batch(&applied, batch.items.len(), started.elapsed());
            self.hint_offsets(&applied);
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

    /// The first attempt uses the claims made ahead; a retry claims again, because a failed
    /// attempt may have inserted ClickHouse rows for events it claimed fresh (they are then
    /// "reclaimed" and looked up before inserting).
    async fn write_with_retry(&self, batch: &Batch, claims: Claims) -> Option<Applied> {
        let mut delay = RETRY_DELAY_MIN;
        let mut claims = Some(claims);
        loop {
            let attempt = match claims.take() {
                Some(c) => Ok(c),
                None => usage::claim(&self.pool, &self.group, &self.topic, batch)
                    .await
                    .map_err(StageError::at("postgres")),
            };
            match attempt.map(|c| self.write_once(batch, c)) {
                Ok(write) => match write.await {
                    Ok(applied) => return Some(applied),
                    Err(e) => retry_warning(&e, delay),
                },
                Err(e) => retry_warning(&e, delay),
            }
            if !backoff(&self.abort, &mut delay).await {
                return None;
            }
        }
    }

    async fn write_once(&self, batch: &Batch, claims: Claims) -> Result<Applied, StageError> {
        let mut tx = self.pool.begin().await.map_err(StageError::at("postgres"))?;
        let ledger_started = Instant::now();
        let applied = usage::apply_claimed(&mut tx, &self.group, &self.topic, batch, &claims)
            .await
            .map_err(StageError::at("postgres"))?;
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
            return Err(StageError { stage: "clickhouse", error: e.to_string() });
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
            result.map_err(|(e, _)| StageError { stage: "dead_letter", error: e.to_string() })?;
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

/// Claim each batch ahead of the writer (retrying until it succeeds or `abort` fires).
async fn claim_stage(
    pool: PgPool,
    group: String,
    topic: String,
    mut input: mpsc::Receiver<Batch>,
    out: mpsc::Sender<(Batch, Claims)>,
    abort: CancellationToken,
) -> anyhow::Result<()> {
    while let Some(batch) = input.recv().await {
        let mut delay = RETRY_DELAY_MIN;
        let claims = loop {
            match usage::claim(&pool, &group, &topic, &batch).await {
                Ok(c) => break c,
                Err(e) => retry_warning(&StageError { stage: "postgres_claim", error: e.to_string() }, delay),
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

struct StageError {
    stage: &'static str,
    error: String,
}

impl StageError {
    fn at<E: std::fmt::Display>(stage: &'static str) -> impl Fn(E) -> StageError {
        move |e| StageError { stage, error: e.to_string() }
    }
}
