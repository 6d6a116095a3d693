//! Consumer lag per partition: `tally_consumer_lag_messages{group, topic, partition}`.
//!
//! Lag is the partition's high watermark minus the group's *durable* progress, Postgres
//! `consumer_offsets.next_offset`, which is committed with the debits. Kafka's committed
//! offsets are only a hint written after COMMIT and the consumer's fetch position runs
//! ahead of what is applied (prefetch, batches in flight), so neither would be the truth.
//! A partition the group has never applied counts from its low watermark
//! (`auto.offset.reset=earliest`).
//!
//! Progress is per group, not per member, so every instance reports every partition of
//! the topic: lag stays visible while a partition has no owner (a rebalance, a dead
//! member), and dashboards aggregate with `max by (topic, partition)`, never `sum`.
//!
//! tansu on memory storage can report a high watermark below the real end of the log:
//! lag is clamped at 0 rather than published negative, so such a broker under-reports it.
//!
//! A failed sample (broker or Postgres unreachable) counts
//! `tally_kafka_errors_total{stage="lag"}` and keeps the previous values;
//! `tally_consumer_lag_updated_timestamp_seconds` shows how old they are.

use crate::metrics as m;
use rdkafka::consumer::{Consumer, StreamConsumer};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often lag is sampled: a few scrape intervals, cheap for the broker (one metadata
/// request plus one ListOffsets per partition) and for Postgres (one indexed read).
pub const SAMPLE_INTERVAL: Duration = Duration::from_secs(5);
/// Per broker request. The requests of one sample run in parallel, so a sample against an
/// unreachable broker ends after about two of these.
const BROKER_TIMEOUT: Duration = Duration::from_secs(2);

pub struct LagMonitor {
    pub consumer: Arc<StreamConsumer>,
    pub pool: PgPool,
    pub group: String,
    pub topic: String,
}

impl LagMonitor {
    /// Sample every [`SAMPLE_INTERVAL`] until `stop` fires.
    pub async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        // A slow sample (broker timeouts) must not be followed by a burst of catch-up ones.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sampled = tokio::select! {
                _ = stop.cancelled() => return,
                sampled = self.sample() => sampled,
            };
            match sampled {
                Ok(lags) => self.publish(&lags),
                Err(e) => {
                    metrics::counter!(m::KAFKA_ERRORS, "stage" => "lag").increment(1);
                    tracing::debug!(error = %e, "consumer lag not sampled");
                }
            }
        }
    }

    /// Lag of every partition of the topic.
    async fn sample(&self) -> anyhow::Result<BTreeMap<i32, i64>> {
        // Progress is read before the watermarks: progress made in between can only make
        // the lag look larger, never negative.
        let progress: HashMap<i32, i64> = sqlx::query_as::<_, (i32, i64)>(
            "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
        )
        .bind(&self.group)
        .bind(&self.topic)
        .fetch_all(&self.pool)
        .await?
        .into_iter()
        .collect();
        let partitions = {
            let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
            tokio::task::spawn_blocking(move || partitions_of(&consumer, &topic)).await??
        };
        let marks = partitions.into_iter().map(|partition| {
            let (consumer, topic) = (self.consumer.clone(), self.topic.clone());
            tokio::task::spawn_blocking(move || {
                consumer.fetch_watermarks(&topic, partition, BROKER_TIMEOUT).map(|m| (partition, m))
            })
        });
        let mut lags = BTreeMap::new();
        for joined in futures::future::join_all(marks).await {
            let (partition, (low, high)) = joined??;
            lags.insert(partition, lag_messages(low, high, progress.get(&partition).copied()));
        }
        Ok(lags)
    }

    fn publish(&self, lags: &BTreeMap<i32, i64>) {
        for (partition, lag) in lags {
            metrics::gauge!(m::CONSUMER_LAG,
                "group" => self.group.clone(),
                "topic" => self.topic.clone(),
                "partition" => partition.to_string())
            .set(*lag as f64);
        }
        let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
        metrics::gauge!(m::CONSUMER_LAG_UPDATED).set(now);
    }
}

/// Partition ids of `topic` from broker metadata (blocking: run off the async threads).
fn partitions_of(consumer: &StreamConsumer, topic: &str) -> anyhow::Result<Vec<i32>> {
    let metadata = consumer.fetch_metadata(Some(topic), BROKER_TIMEOUT)?;
    let Some(t) = metadata.topics().iter().find(|t| t.name() == topic) else {
        anyhow::bail!("topic {topic} is not in the broker's metadata");
    };
    if let Some(e) = t.error() {
        anyhow::bail!("metadata of topic {topic}: {e:?}");
    }
    Ok(t.partitions().iter().map(|p| p.id()).collect())
}

/// Messages of a partition at or after the group's durable progress. `next_offset` is
/// `None` when the group never applied anything there: everything from `low` is pending.
/// Clamped at 0 (a broker may report a stale, too low high watermark).
pub fn lag_messages(low: i64, high: i64, next_offset: Option<i64>) -> i64 {
    let applied_upto = next_offset.unwrap_or(low).max(low);
    (high - applied_upto).max(0)
}

#[cfg(test)]
mod tests {
    use super::lag_messages;

    #[test]
    fn lag_counts_from_durable_progress_or_the_low_watermark() {
        assert_eq!(lag_messages(0, 100, Some(40)), 60, "pending after next_offset");
        assert_eq!(lag_messages(0, 100, Some(100)), 0, "all applied: next_offset == high");
        assert_eq!(lag_messages(0, 100, None), 100, "never applied: everything is pending");
        assert_eq!(lag_messages(30, 100, None), 70, "retention removed the start of the log");
        assert_eq!(lag_messages(30, 100, Some(10)), 70, "progress below the log start");
    }

    #[test]
    fn a_stale_high_watermark_never_gives_negative_lag() {
        assert_eq!(lag_messages(0, 50, Some(80)), 0);
        assert_eq!(lag_messages(0, 0, None), 0);
    }
}
