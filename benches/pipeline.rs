//! Sustained pipeline throughput against the real stack: `cargo bench --bench pipeline`.
//!
//! Prints figures, asserts nothing about speed (the machine is shared and noisy). Both
//! numbers come from the same run, on the same topic:
//! - baseline: a bare rdkafka consumer reading every message and doing nothing else;
//! - tally: `tally run` (release build) from start until every event and dead letter is
//!   committed to Postgres and ClickHouse.
//!
//! Env: `BENCH_MESSAGES` (default 200000), `BENCH_BATCH_EVENTS_MAX` (default 5000).

#[path = "../tests/common/mod.rs"]
mod common;

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use std::time::{Duration, Instant};
use tally::simulate::{Generator, Kind, SimulateOptions};

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

async fn bare_consume(env: &TestEnv, messages: usize) -> Duration {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", *BROKERS)
        .set("group.id", format!("bare-{}", env.id))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("session.timeout.ms", "6000")
        .set("heartbeat.interval.ms", "1000")
        .create()
        .expect("consumer");
    consumer.subscribe(&[env.topic.as_str()]).expect("subscribe");
    let mut started = None;
    let mut seen = 0usize;
    while seen < messages {
        let m = consumer.recv().await.expect("recv");
        started.get_or_insert_with(Instant::now);
        std::hint::black_box(&m);
        seen += 1;
    }
    started.expect("read at least one").elapsed()
}

#[tokio::main]
async fn main() {
    let messages = env_usize("BENCH_MESSAGES", 200_000);
    let batch = env_usize("BENCH_BATCH_EVENTS_MAX", 5_000).to_string();
    let env = TestEnv::new(6).await;
    let mut generator = Generator::new(SimulateOptions { seed: 99, ..SimulateOptions::default() });
    let all: Vec<_> = (0..messages).map(|_| generator.next_message()).collect();
    let distinct = all.iter().filter(|m| matches!(m.kind, Kind::Valid(_))).count() as i64;
    let malformed = all.iter().filter(|m| matches!(m.kind, Kind::Malformed(_))).count() as i64;
    let produce_started = Instant::now();
    produce(&env.topic, &all).await;
    let produce_took = produce_started.elapsed();

    let bare = bare_consume(&env, messages).await;

    let started = Instant::now();
    let mut run = env.spawn_run("examples/demo.toml", 0, &["--batch-events-max", &batch]);
    env.wait_for("every message committed", Duration::from_secs(1800), || async {
        env.count("SELECT count(*) FROM processed_events").await == distinct
            && env.count("SELECT count(*) FROM dead_letters").await == malformed
    })
    .await;
    let took = started.elapsed();
    terminate(&mut run);

    let rate = |d: Duration| messages as f64 / d.as_secs_f64();
    println!(
        "pipeline bench: {messages} messages ({distinct} distinct events, {malformed} malformed), batch {batch}"
    );
    println!(
        "  produce (acks=all)              {:>10.0} msg/s  ({:.2} s)",
        rate(produce_took),
        produce_took.as_secs_f64()
    );
    println!("  baseline: bare consume          {:>10.0} msg/s  ({:.2} s)", rate(bare), bare.as_secs_f64());
    println!(
        "  tally run end to end            {:>10.0} msg/s  ({:.2} s, incl. startup and group join)",
        rate(took),
        took.as_secs_f64()
    );
    println!("  ratio tally / bare consume      {:>10.3}", bare.as_secs_f64() / took.as_secs_f64());
}
