//! Metric names and the Prometheus recorder.
//!
//! Names follow `tally_<what>_<unit>[_total]`. Labels are low-cardinality only (`code`,
//! `stage`, `route`, `status`; `group`, `topic`, `partition` for consumer lag): never
//! account ids, keys or models.

use crate::batch::Item;
use crate::ledger::usage::Applied;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use std::time::Duration;

pub const EVENTS_CONSUMED: &str = "tally_events_consumed_total";
pub const EVENTS_PRICED: &str = "tally_events_priced_total";
pub const EVENTS_APPLIED: &str = "tally_events_applied_total";
pub const EVENTS_DUPLICATE: &str = "tally_events_duplicate_total";
pub const EVENTS_DEAD_LETTERED: &str = "tally_events_dead_lettered_total";
pub const LEDGER_DEBITED_UNITS: &str = "tally_ledger_debited_units_total";
pub const BATCH_SECONDS: &str = "tally_batch_duration_seconds";
pub const BATCH_EVENTS: &str = "tally_batch_events";
pub const BATCH_RETRIES: &str = "tally_batch_retries_total";
/// Batches split in halves to isolate a message the database refused.
pub const BATCH_SPLITS: &str = "tally_batch_splits_total";
/// Messages the database refused, dead-lettered as `refused_by_database`: alert on any.
pub const EVENTS_REFUSED: &str = "tally_events_refused_total";
pub const LEDGER_COMMIT_SECONDS: &str = "tally_ledger_commit_duration_seconds";
pub const CLICKHOUSE_INSERT_SECONDS: &str = "tally_clickhouse_insert_duration_seconds";
pub const CLICKHOUSE_INSERT_ERRORS: &str = "tally_clickhouse_insert_errors_total";
pub const CLICKHOUSE_REPLAYED_ROWS_SKIPPED: &str = "tally_clickhouse_replayed_rows_skipped_total";
pub const KAFKA_ERRORS: &str = "tally_kafka_errors_total";
pub const HTTP_REQUESTS: &str = "tally_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "tally_http_request_duration_seconds";
/// Failed requests to the schema registry (each retried: the batch waits).
pub const SCHEMA_REGISTRY_ERRORS: &str = "tally_schema_registry_errors_total";
/// Holds (reservations, holding authorizations) that expired with nothing reported: a
/// gateway that holds and never settles or releases (leak detection), by `kind`.
pub const HOLDS_EXPIRED: &str = "tally_holds_expired_total";
/// Holding authorize calls decided per transaction (group commit, `ledger::holds`).
pub const HOLD_BATCH_CALLS: &str = "tally_hold_batch_calls";
/// Time of one holding authorize transaction, queue to reply.
pub const HOLD_BATCH_SECONDS: &str = "tally_hold_batch_duration_seconds";
/// Credit grants whose remainder was written off at their deadline (`breakage` entries).
pub const GRANTS_EXPIRED: &str = "tally_grants_expired_total";
/// Units written off by grant expiry (1e-8 USD).
pub const GRANTS_EXPIRED_UNITS: &str = "tally_grants_expired_units_total";
/// Captured payments recorded in `needs_review` (the rules could not credit them).
pub const TOPUP_NEEDS_REVIEW: &str = "tally_topup_needs_review_total";
/// Checkout sessions created at the payment provider, by `provider`.
pub const CHECKOUTS_CREATED: &str = "tally_checkouts_created_total";
/// Checkout sessions the provider refused or could not be asked for, by `provider`.
pub const CHECKOUT_ERRORS: &str = "tally_checkout_errors_total";
/// Stripe subscription events that changed an account's plan, by `event`.
pub const SUBSCRIPTION_PLAN_CHANGES: &str = "tally_subscription_plan_changes_total";
/// `invoice.payment_failed` for a subscription (the owner's notification hook: alert on it).
pub const SUBSCRIPTION_PAYMENTS_FAILED: &str = "tally_subscription_payments_failed_total";
/// Gauge: top-up orders waiting for an operator (`tally orders resolve`): alert on > 0.
pub const TOPUP_ORDERS_NEEDS_REVIEW: &str = "tally_topup_orders_needs_review";
/// Gauge: age of the oldest order waiting for an operator, seconds (0 when none).
pub const TOPUP_REVIEW_OLDEST_SECONDS: &str = "tally_topup_review_oldest_age_seconds";
/// Gauge `{group, topic, partition}`: messages on the partition past the group's durable
/// progress (Postgres `consumer_offsets`), see `pipeline::lag`.
pub const CONSUMER_LAG: &str = "tally_consumer_lag_messages";
/// Gauge: when the lag gauges were last refreshed (Unix seconds); stale means no lag data.
pub const CONSUMER_LAG_UPDATED: &str = "tally_consumer_lag_updated_timestamp_seconds";

/// Install the global recorder (once per process) and return the handle `/metrics` renders.
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(
            Matcher::Full(BATCH_EVENTS.into()),
            &[1.0, 10.0, 100.0, 1000.0, 5000.0, 20000.0],
        )?
        .set_buckets_for_metric(Matcher::Full(HOLD_BATCH_CALLS.into()), &[1.0, 4.0, 16.0, 64.0, 256.0])?
        .install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_histogram};
    describe_counter!(EVENTS_CONSUMED, "Messages read from the usage topic");
    describe_counter!(SCHEMA_REGISTRY_ERRORS, "Failed schema registry requests (retried; the batch waits)");
    describe_counter!(HOLDS_EXPIRED, "Holds that expired with nothing reported (leak detection), by kind");
    describe_counter!(GRANTS_EXPIRED, "Credit grants written off at their deadline (breakage entries)");
    describe_counter!(GRANTS_EXPIRED_UNITS, "Units written off by grant expiry (1e-8 USD)");
    describe_counter!(EVENTS_PRICED, "Valid events priced");
    describe_counter!(EVENTS_APPLIED, "Events committed for the first time (ledger + usage log)");
    describe_counter!(EVENTS_DUPLICATE, "Events skipped as exact duplicates of an applied event id");
    describe_counter!(EVENTS_DEAD_LETTERED, "Messages committed to the dead-letter topic, by code");
    describe_counter!(LEDGER_DEBITED_UNITS, "Debits committed, internal units (1e-8 USD)");
    describe_histogram!(BATCH_SECONDS, "Batch write time: Postgres + ClickHouse + dead letters");
    describe_histogram!(BATCH_EVENTS, "Messages per batch");
    describe_histogram!(HOLD_BATCH_CALLS, "Holding authorize calls decided per transaction");
    describe_histogram!(HOLD_BATCH_SECONDS, "Holding authorize transaction time per batch of calls");
    describe_counter!(BATCH_RETRIES, "Batch write attempts that failed and were retried, by stage");
    describe_counter!(BATCH_SPLITS, "Batches split in halves to isolate a message the database refused");
    describe_counter!(EVENTS_REFUSED, "Messages the database refused, dead-lettered as refused_by_database");
    describe_histogram!(LEDGER_COMMIT_SECONDS, "Postgres transaction time per batch");
    describe_histogram!(CLICKHOUSE_INSERT_SECONDS, "ClickHouse insert time per batch");
    describe_counter!(CLICKHOUSE_INSERT_ERRORS, "Failed ClickHouse inserts");
    describe_counter!(
        CLICKHOUSE_REPLAYED_ROWS_SKIPPED,
        "Usage rows not re-inserted because a crashed attempt had already inserted them"
    );
    describe_counter!(KAFKA_ERRORS, "Kafka client errors, by stage");
    describe_counter!(HTTP_REQUESTS, "HTTP requests, by route and status");
    describe_histogram!(HTTP_REQUEST_SECONDS, "HTTP request latency, by route");
    metrics::describe_gauge!(CONSUMER_LAG, "Messages not yet durably applied, by group, topic and partition");
    describe_counter!(
        TOPUP_NEEDS_REVIEW,
        "Captured payments recorded for operator review instead of credited"
    );
    describe_counter!(CHECKOUTS_CREATED, "Checkout sessions created at the payment provider, by provider");
    describe_counter!(CHECKOUT_ERRORS, "Checkout sessions the provider refused or could not be asked for");
    describe_counter!(SUBSCRIPTION_PLAN_CHANGES, "Plan changes driven by Stripe subscription events");
    describe_counter!(
        SUBSCRIPTION_PAYMENTS_FAILED,
        "Failed subscription invoice payments (notify the owner)"
    );
    metrics::describe_gauge!(TOPUP_ORDERS_NEEDS_REVIEW, "Top-up orders waiting for an operator");
    metrics::describe_gauge!(
        TOPUP_REVIEW_OLDEST_SECONDS,
        "Age of the oldest top-up order waiting for an operator"
    );
    metrics::describe_gauge!(CONSUMER_LAG_UPDATED, "Unix time of the last consumer lag refresh");
    // An error counter that is absent until the first error cannot be told from a missing
    // exporter: publish it at 0 so dashboards and alerts see a series from the start.
    metrics::counter!(CLICKHOUSE_INSERT_ERRORS).absolute(0);
}

/// Per message, at the reader.
pub fn record_item(item: &Item) {
    metrics::counter!(EVENTS_CONSUMED).increment(1);
    if matches!(item, Item::Valid(_)) {
        metrics::counter!(EVENTS_PRICED).increment(1);
    }
}

/// Per committed batch, at the writer.
pub fn record_batch(applied: &Applied, messages: usize, took: Duration) {
    metrics::counter!(EVENTS_APPLIED).increment(applied.new_events.len() as u64);
    metrics::counter!(EVENTS_DUPLICATE).increment(applied.duplicates);
    for d in &applied.dead {
        metrics::counter!(EVENTS_DEAD_LETTERED, "code" => d.code).increment(1);
    }
    metrics::counter!(LEDGER_DEBITED_UNITS).increment(applied.debited_units.max(0) as u64);
    metrics::histogram!(BATCH_SECONDS).record(took.as_secs_f64());
    metrics::histogram!(BATCH_EVENTS).record(messages as f64);
}
