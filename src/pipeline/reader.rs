//! Reader task: Kafka messages -> priced, validated [`Item`]s -> batches.
//!
//! Parse at the edge: after this task nothing sees raw bytes. Anything that cannot become
//! a valid event becomes a [`DeadItem`] with a reason; nothing is dropped.

use super::{Batch, DeadItem, Item, SourcePos, ValidItem, payload_hash};
use crate::codec;
use crate::event::UsageEvent;
use crate::metrics as m;
use crate::pricing::Catalog;
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use rdkafka::Message;
use rdkafka::consumer::StreamConsumer;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Turns one message's bytes into an item. Pure apart from the clock value passed in.
pub struct Transformer {
    pub catalog: Arc<Catalog>,
    pub future_skew: ChronoDuration,
    pub age_max: ChronoDuration,
}

impl Transformer {
    pub fn transform(&self, pos: SourcePos, key: Option<&[u8]>, payload: &[u8], now: DateTime<Utc>) -> Item {
        let dead = |code: &'static str, reason: String, event_id: Option<String>| {
            Item::Dead(DeadItem {
                pos: pos.clone(),
                code,
                reason,
                event_id,
                key: key.map(<[u8]>::to_vec),
                payload: payload.to_vec(),
            })
        };
        let raw = match codec::decode(payload) {
            Ok(raw) => raw,
            Err(e) => return dead(e.code, e.reason, None),
        };
        let event_id = raw.event_id.clone();
        let event = match UsageEvent::parse(raw) {
            Ok(e) => e,
            Err(e) => return dead("invalid_event", e.to_string(), event_id),
        };
        if event.occurred_at > now + self.future_skew {
            let reason = format!("occurred_at {} is in the future", event.occurred_at);
            return dead("out_of_range", reason, event_id);
        }
        if event.occurred_at < now - self.age_max {
            let reason = format!("occurred_at {} is older than the accepted window", event.occurred_at);
            return dead("out_of_range", reason, event_id);
        }
        let charge = self.catalog.price(&event);
        let payload_hash = payload_hash(&event);
        Item::Valid(Box::new(ValidItem { pos, event, charge, payload_hash }))
    }
}

pub struct Reader {
    pub consumer: Arc<StreamConsumer>,
    pub transformer: Transformer,
    pub batch_events_max: usize,
    pub batch_wait: Duration,
    pub out: mpsc::Sender<Batch>,
    pub shutdown: CancellationToken,
    /// Stop after this many messages (0 = never). Lets tests stop mid-stream precisely.
    pub exit_after_messages: u64,
}

impl Reader {
    /// Read until shutdown; the last partial batch is still sent. Dropping `out` at the
    /// end tells the writer to drain and stop.
    pub async fn run(self) -> anyhow::Result<()> {
        let mut handled: u64 = 0;
        loop {
            let (batch, stop) = self.fill_batch(&mut handled).await?;
            if !batch.items.is_empty() && self.out.send(batch).await.is_err() {
                anyhow::bail!("writer stopped before the reader");
            }
            if stop {
                return Ok(());
            }
        }
    }

    async fn fill_batch(&self, handled: &mut u64) -> anyhow::Result<(Batch, bool)> {
        let mut batch = Batch { items: Vec::with_capacity(self.batch_events_max.min(8192)) };
        let deadline = tokio::time::sleep(self.batch_wait);
        tokio::pin!(deadline);
        while batch.items.len() < self.batch_events_max {
            if self.exit_after_messages > 0 && *handled >= self.exit_after_messages {
                self.shutdown.cancel();
            }
            let msg = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok((batch, true)),
                _ = &mut deadline => return Ok((batch, false)),
                msg = self.consumer.recv() => msg,
            };
            let msg = match msg {
                Ok(msg) => msg,
                Err(e) => {
                    // Broker hiccups are operating errors: count, back off, keep going.
                    metrics::counter!(m::KAFKA_ERRORS, "stage" => "consume").increment(1);
                    tracing::warn!(error = %e, "kafka consume error");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            };
            let pos = SourcePos { partition: msg.partition(), offset: msg.offset() };
            let item = self.transformer.transform(pos, msg.key(), msg.payload().unwrap_or(&[]), Utc::now());
            m::record_item(&item);
            batch.items.push(item);
            *handled += 1;
        }
        Ok((batch, false))
    }
}
