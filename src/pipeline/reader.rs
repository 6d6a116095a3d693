//! Reader task: Kafka messages -> priced, validated [`Item`]s -> batches.
//!
//! Parse at the edge: after this task nothing sees raw bytes. Anything that cannot become
//! a valid event becomes a [`DeadItem`] with a reason; nothing is dropped.

use crate::batch::{Batch, DeadItem, Item, SourcePos, ValidItem, payload_hash};
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
    /// Writer schemas by id (compiled in, directory, registry).
    pub schemas: Arc<codec::Schemas>,
    pub future_skew: ChronoDuration,
    pub age_max: ChronoDuration,
    /// Largest cost one event may bill, internal units. Beyond it (or when the price does
    /// not fit the unit at all) the event is dead-lettered `cost_out_of_range` for a human
    /// to look at, never billed blindly nor dropped: one call costing more than this is a
    /// gateway bug or an attack, and bounding it keeps every ledger sum far from overflow.
    pub cost_units_max: i64,
}

/// Default per-event cost ceiling: $100,000 (1e13 units). A batch of 50,000 such events
/// still sums to 5e17 units, far below i64::MAX (9.2e18).
pub const EVENT_COST_UNITS_MAX_DEFAULT: i64 = 100_000 * crate::money::UNITS_PER_USD;

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
        let raw = match self.schemas.decode(payload) {
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
        if charge.reason == crate::pricing::ChargeReason::CostOverflow
            || charge.cost_units > self.cost_units_max
        {
            let reason = format!(
                "cost {} USD is above the per-event maximum {} USD ({})",
                crate::money::units_to_usd(charge.cost_units),
                crate::money::units_to_usd(self.cost_units_max),
                charge.reason.as_str()
            );
            return dead("cost_out_of_range", reason, event_id);
        }
        let payload_hash = payload_hash(&event);
        let catalog_version = self.catalog.version_shared();
        Item::Valid(Box::new(ValidItem { pos, event, charge, catalog_version, payload_hash }))
    }
}

/// Messages decoded between two yields to the scheduler (~10 us each: ~0.3 ms).
const YIELD_EVERY: usize = 32;

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
            let payload = msg.payload().unwrap_or(&[]);
            // A schema id seen for the first time is fetched from the registry here; during
            // a registry outage this waits (the batch with it), so nothing is dead-lettered
            // for an outage.
            if !self.transformer.schemas.prepare(payload, &self.shutdown).await {
                return Ok((batch, true));
            }
            let item = self.transformer.transform(pos, msg.key(), payload, Utc::now());
            m::record_item(&item);
            batch.items.push(item);
            *handled += 1;
            // With a backlog, `recv` is always ready and never yields: give the runtime's
            // workers to the HTTP handlers (authorize) every few messages, so a request
            // waits for at most ~YIELD_EVERY messages of decoding, not a whole batch.
            if batch.items.len().is_multiple_of(YIELD_EVERY) {
                tokio::task::yield_now().await;
            }
        }
        Ok((batch, false))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::RawUsageEvent;

    fn transformer() -> Transformer {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
        Transformer {
            catalog: Arc::new(Catalog::load(&path).unwrap()),
            schemas: Arc::new(codec::Schemas::new(None)),
            future_skew: ChronoDuration::seconds(300),
            age_max: ChronoDuration::days(400),
            cost_units_max: EVENT_COST_UNITS_MAX_DEFAULT,
        }
    }

    fn images(n: i64) -> Vec<u8> {
        codec::encode(&RawUsageEvent {
            event_id: Some("e".into()),
            occurred_at: Some(Utc::now().to_rfc3339()),
            account_id: Some("a".into()),
            provider: Some("openai".into()),
            model: Some("gpt-image-1".into()),
            modality: Some("image".into()),
            status: Some("success".into()),
            resolution: Some("720p".into()),
            images: Some(n),
            ..Default::default()
        })
    }

    #[test]
    fn absurd_costs_are_dead_lettered_not_billed() {
        let t = transformer();
        let pos = SourcePos { partition: 0, offset: 0 };
        // 1e12 images x $0.042 = $42 billion: within i64 units, far above the ceiling.
        match t.transform(pos.clone(), None, &images(1_000_000_000_000), Utc::now()) {
            Item::Dead(d) => assert_eq!(d.code, "cost_out_of_range", "{}", d.reason),
            Item::Valid(v) => panic!("billed {}", v.charge.cost_units),
        }
        // 2,000,000 images x $0.042 x 1.10 (openai markup) = $92,400: under the ceiling, billed.
        assert!(matches!(t.transform(pos, None, &images(2_000_000), Utc::now()), Item::Valid(_)));
    }
}
