//! rdkafka clients with every option that matters set explicitly (TIGER_STYLE: no
//! reliance on library defaults for behaviour we depend on).

use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::StreamConsumer;
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::producer::FutureProducer;

/// A consumer for the usage topic.
///
/// Offsets are never auto-committed: Tally's progress lives in Postgres, committed with
/// the debits (see `ledger::usage`). We commit to Kafka afterwards only as a hint for
/// restarts and for lag metrics.
pub fn consumer(brokers: &str, group: &str, session_timeout_ms: u32) -> anyhow::Result<StreamConsumer> {
    let heartbeat_ms = (session_timeout_ms / 6).max(500);
    let c: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", heartbeat_ms.to_string())
        // Writers may block on a ClickHouse outage (backpressure); keep the member in the
        // group for up to 10 minutes of not polling.
        .set("max.poll.interval.ms", "600000")
        .set("fetch.wait.max.ms", "100")
        // Bound the prefetch queue (ARCHITECTURE.md, Memory): 16 MiB is ~80,000 messages
        // of ~200 B, several batches ahead of the writer; the 64 MiB default only grows RSS.
        .set("queued.max.messages.kbytes", "16384")
        .set("queued.min.messages", "20000")
        .set("partition.assignment.strategy", "range")
        .set("client.id", format!("tally-{group}"))
        .create()?;
    Ok(c)
}

/// A producer that waits for full acknowledgement (dead letters, simulator traffic).
pub fn producer(brokers: &str) -> anyhow::Result<FutureProducer> {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("acks", "all")
        .set("message.timeout.ms", "60000")
        .set("queue.buffering.max.ms", "5")
        .set("queue.buffering.max.messages", "200000")
        .set("batch.num.messages", "10000")
        .set("compression.type", "none")
        .create()?;
    Ok(p)
}

/// Create topics if missing (already existing is fine).
pub async fn ensure_topics(brokers: &str, topics: &[(&str, i32)]) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create()?;
    let new: Vec<NewTopic> =
        topics.iter().map(|(name, parts)| NewTopic::new(name, *parts, TopicReplication::Fixed(1))).collect();
    let results = admin.create_topics(&new, &AdminOptions::new()).await?;
    for r in results {
        match r {
            Ok(_) => {}
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((name, code)) => anyhow::bail!("creating topic {name}: {code}"),
        }
    }
    Ok(())
}
