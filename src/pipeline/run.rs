//! `tally run`: wiring and graceful shutdown.
//!
//! Shutdown (SIGTERM / SIGINT): the reader stops polling and hands its partial batch to
//! the writer; the writer commits everything it was given, hints offsets to Kafka and
//! returns; then the consumer leaves the group and the HTTP server stops. If draining takes
//! longer than `DRAIN_TIMEOUT`, the writer abandons its uncommitted batch (nothing is lost:
//! Postgres never saw it, so it is re-read on restart).

use super::reader::{Reader, Transformer};
use super::writer::Writer;
use crate::config::RunSettings;
use crate::pricing::Catalog;
use crate::{analytics, api, kafka, ledger};
use anyhow::Context;
use rdkafka::consumer::Consumer;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often `state_changes` are folded into `usage_hourly` (`fold_and_prune`). A fold
/// costs about one upsert per distinct bucket it touches, and with event times spread over
/// days nearly every bucket is touched in any interval: measured with the bench's traffic
/// (72 h spread, 2,000 accounts, 13,000 msg/s), a fold every 30 s took ~16 s of a Postgres
/// core each time (635,000 buckets from 1.2M increments). Every 5 minutes that work is
/// done a tenth as often. The unfolded rest is what a restarting instance streams on top
/// of `usage_hourly` (about this long of changes, applied as they are read).
const FOLD_INTERVAL: Duration = Duration::from_secs(300);
/// How often `state_changes` rows past their retention are deleted.
const CHANGES_PRUNE_INTERVAL: Duration = Duration::from_secs(300);

pub async fn run(
    settings: RunSettings,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
) -> anyhow::Result<()> {
    settings.validate().map_err(|e| anyhow::anyhow!("invalid settings: {e}"))?;
    let catalog = Arc::new(Catalog::load(&settings.catalog_path).map_err(|e| anyhow::anyhow!("{e}"))?);
    let ledger_config =
        ledger::config::LedgerConfig::load(&settings.catalog_path).map_err(|e| anyhow::anyhow!(e))?;
    let quota_config =
        crate::quota::config::QuotaConfig::load(&settings.catalog_path).map_err(|e| anyhow::anyhow!(e))?;
    quota_config.check_against(&catalog).map_err(|e| anyhow::anyhow!(e))?;
    ledger_config
        .subscriptions
        .validate(|plan| quota_config.plans.contains_key(plan))
        .map_err(|e| anyhow::anyhow!("{}: {e}", settings.catalog_path.display()))?;
    let c = &settings.connections;
    let pool = ledger::connect(&c.database_url, settings.pg_connections_max)
        .await
        .context("connecting to Postgres")?;
    ledger::migrate(&pool).await.context("Postgres migrations")?;
    analytics::migrate(&c.clickhouse_url, &c.clickhouse_database).await.context("ClickHouse migrations")?;
    // Every event this process prices names this catalog version: store its text first.
    crate::rerate::store::register_catalog(&pool, &catalog)
        .await
        .context("registering the catalog version")?;
    let consumer = Arc::new(kafka::consumer(&c.brokers, &settings.group, settings.session_timeout_ms)?);
    consumer.subscribe(&[settings.topics.topic.as_str()])?;

    // Restore the windowed state from Postgres before answering anything.
    let quota_state = Arc::new(crate::quota::state::QuotaState::default());
    quota_state.refresh(&pool).await.context("restoring quota state")?;
    let shutdown = CancellationToken::new();
    let abort = CancellationToken::new();
    spawn_signal_handler(shutdown.clone(), abort.clone());

    let listener = std::net::TcpListener::bind(&settings.http_addr)
        .with_context(|| format!("binding {}", settings.http_addr))?;
    listener.set_nonblocking(true).context("HTTP listener")?;
    tracing::info!(addr = %settings.http_addr, "http listening");
    let http_state = api::AppState {
        pool: pool.clone(),
        metrics,
        ledger_config: Arc::new(ledger_config),
        stripe_webhook_secret: settings.stripe_webhook_secret.clone(),
        polar_webhook_secret: settings.polar_webhook_secret.clone(),
        auth: Arc::new(api::auth::TokenCache::new(pool.clone(), api::auth::TOKEN_CACHE_TTL)),
        clickhouse: analytics::client(&c.clickhouse_url, &c.clickhouse_database),
        quota: quota_state.clone(),
        quota_config: Arc::new(quota_config),
        catalog: catalog.clone(),
        payments: Arc::new(
            crate::payments::client::Providers::new(
                settings.stripe_secret_key.clone().map(|secret| crate::payments::client::ProviderAccount {
                    base_url: settings.stripe_api_base.clone(),
                    secret,
                }),
                settings.polar_access_token.clone().map(|secret| crate::payments::client::ProviderAccount {
                    base_url: settings.polar_api_base.clone(),
                    secret,
                }),
            )
            .context("payment providers' HTTP client")?,
        ),
        holds: Arc::new(crate::ledger::holds::HoldQueue::new(pool.clone())),
    };
    // Plan rows from before cycles were posted keep their balance for the current cycle.
    let adopted = crate::quota::store::adopt_plan_cycles(&pool, &http_state.quota_config, chrono::Utc::now())
        .await
        .context("recording plan cycles")?;
    if adopted > 0 {
        tracing::info!(accounts = adopted, "plan cycles recorded; next allocations at their cycle start");
    }
    let producer = kafka::producer(&c.brokers)?;
    let refresher = tokio::spawn(refresh_quota_state(quota_state.clone(), pool.clone(), shutdown.clone()));
    let housekeeping = tokio::spawn(housekeeping(
        pool.clone(),
        http_state.quota_config.clone(),
        producer.clone(),
        settings.auto_reload_topic.clone(),
        shutdown.clone(),
    ));
    let fold = tokio::spawn(fold_and_prune(pool.clone(), shutdown.clone()));
    let http_stop = CancellationToken::new();
    let http_runtime = http_runtime(settings.http_threads)?;
    let http = match &http_runtime {
        Some(rt) => {
            let _in = rt.enter();
            let listener = tokio::net::TcpListener::from_std(listener).context("HTTP listener")?;
            rt.spawn(api::serve(listener, http_state, http_stop.clone()))
        }
        None => {
            let listener = tokio::net::TcpListener::from_std(listener).context("HTTP listener")?;
            tokio::spawn(api::serve(listener, http_state, http_stop.clone()))
        }
    };

    let (tx, rx) = mpsc::channel(settings.batches_in_flight_max);
    let reader = Reader {
        consumer: consumer.clone(),
        transformer: Transformer {
            catalog,
            schemas: Arc::new(settings.schemas.load()?),
            future_skew: chrono::Duration::seconds(i64::from(settings.future_skew_secs_max)),
            age_max: chrono::Duration::days(i64::from(settings.event_age_days_max)),
            cost_units_max: settings.event_cost_units_max()?,
        },
        batch_events_max: settings.batch_events_max,
        batch_wait: settings.batch_wait(),
        out: tx,
        shutdown: shutdown.clone(),
        exit_after_messages: settings.exit_after_messages,
    };
    let writer = Writer {
        pool: pool.clone(),
        clickhouse: analytics::client(&c.clickhouse_url, &c.clickhouse_database),
        producer,
        consumer: consumer.clone(),
        group: settings.group.clone(),
        topic: settings.topics.topic.clone(),
        dlq_topic: settings.topics.dlq_topic.clone(),
        input: rx,
        state: quota_state.clone(),
        abort: abort.clone(),
        fault_abort_after_clickhouse_insert: std::env::var("TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT")
            .is_ok_and(|v| v == "1"),
    };
    tracing::info!(group = %settings.group, topic = %settings.topics.topic, "tally run started");
    let mut reader = tokio::spawn(reader.run());
    let mut writer = tokio::spawn(writer.run());
    let lag = super::lag::LagMonitor {
        consumer: consumer.clone(),
        pool: pool.clone(),
        group: settings.group.clone(),
        topic: settings.topics.topic.clone(),
    };
    let lag = tokio::spawn(lag.run(shutdown.clone()));
    // Normally the reader stops first (shutdown) and the writer drains what it was given.
    // If the writer dies first (an error or a panic), stop everything and exit non-zero so
    // a supervisor restarts us: a live process without a writer would keep its partitions
    // and commit nothing.
    let (reader_result, writer_result) = tokio::select! {
        r = &mut reader => (r, writer.await),
        w = &mut writer => {
            tracing::error!("writer stopped: shutting down");
            shutdown.cancel();
            abort.cancel();
            (reader.await, w)
        }
    };
    let reader_result = reader_result.context("reader task")?;
    let writer_result = writer_result.context("writer task")?;
    lag.abort();
    consumer.unsubscribe();
    http_stop.cancel();
    let _ = http.await;
    if let Some(rt) = http_runtime {
        rt.shutdown_background();
    }
    let _ = housekeeping.await;
    let _ = fold.await;
    let _ = refresher.await;
    pool.close().await;
    reader_result.context("reader")?;
    writer_result.context("writer")?;
    tracing::info!("tally run stopped cleanly");
    Ok(())
}

/// The HTTP API's own runtime (`None`: share the pipeline's). Authorize answers from memory
/// in microseconds, but on a shared runtime a request can wait for a pipeline task (decoding,
/// row building) to reach its next yield point; on threads of its own the OS scheduler
/// preempts for it. The Postgres pool and the ClickHouse client stay on the main runtime's
/// I/O driver, which is alive for as long as this one.
fn http_runtime(threads: usize) -> anyhow::Result<Option<tokio::runtime::Runtime>> {
    if threads == 0 {
        return Ok(None);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("tally-http")
        .enable_all()
        .build()
        .context("HTTP runtime")?;
    Ok(Some(rt))
}

/// Keep the in-memory quota state current (see `quota::state` for the design).
async fn refresh_quota_state(
    state: Arc<crate::quota::state::QuotaState>,
    pool: sqlx::PgPool,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(crate::quota::state::REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.refresh(&pool).await {
            tracing::warn!(error = %e, "refreshing quota state");
        }
    }
}

/// How often the top-up review gauges are refreshed (one indexed count).
const REVIEW_GAUGE_INTERVAL: Duration = Duration::from_secs(15);

/// Periodic work beside the pipeline, every second: expire overdue reservations (so holds
/// never leak) and credit grants past their deadline, post plan cycles, publish queued
/// auto-reload requests. Errors are logged and retried next tick.
async fn housekeeping(
    pool: sqlx::PgPool,
    quota_config: Arc<crate::quota::config::QuotaConfig>,
    producer: rdkafka::producer::FutureProducer,
    auto_reload_topic: String,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // In the past, so the gauges are set on the first tick.
    let mut last_review_gauge =
        std::time::Instant::now().checked_sub(REVIEW_GAUGE_INTERVAL).unwrap_or_else(std::time::Instant::now);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = ledger::reservations::expire_due(&pool).await {
            tracing::warn!(error = %e, "expiring reservations");
        }
        // Credit grants past their deadline: their remainder written off, once (any instance).
        if let Err(e) = ledger::grants::expire_due(&pool, chrono::Utc::now()).await {
            tracing::warn!(error = %e, "expiring credit grants");
        }
        // Holding authorize adds holds without the balance lock: bring the projection along.
        if let Err(e) = ledger::reservations::reconcile_projections(&pool).await {
            tracing::warn!(error = %e, "reconciling hold projections");
        }
        // Each plan account's allocation at its cycle start, exactly once (any instance).
        if let Err(e) = crate::quota::store::post_due_cycles(&pool, &quota_config, chrono::Utc::now()).await {
            tracing::warn!(error = %e, "posting plan cycle allocations");
        }
        if let Err(e) = ledger::auto_reload::publish_pending(&pool, &producer, &auto_reload_topic).await {
            tracing::warn!(error = %e, "publishing auto-reload requests");
        }
        if last_review_gauge.elapsed() >= REVIEW_GAUGE_INTERVAL {
            last_review_gauge = std::time::Instant::now();
            match ledger::topup::review_backlog(&pool).await {
                Ok((orders, oldest_secs)) => {
                    metrics::gauge!(crate::metrics::TOPUP_ORDERS_NEEDS_REVIEW).set(orders as f64);
                    metrics::gauge!(crate::metrics::TOPUP_REVIEW_OLDEST_SECONDS).set(oldest_secs as f64);
                }
                Err(e) => tracing::warn!(error = %e, "counting top-up orders in review"),
            }
        }
    }
}

/// Fold `state_changes` into `usage_hourly` every [`FOLD_INTERVAL`] and prune old changes.
/// Its own task: a fold can take seconds under load, and hold expiry, plan cycles and
/// auto-reload requests must not wait behind it.
async fn fold_and_prune(pool: sqlx::PgPool, stop: CancellationToken) {
    let mut tick = tokio::time::interval(FOLD_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await; // the first tick is immediate: fold one interval after start
    let mut last_prune = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        // Fold until caught up (each call folds at most FOLD_CHANGES_MAX changes).
        while !stop.is_cancelled() {
            match crate::ledger::counting::fold_changes(&pool).await {
                Ok(n) if n as i64 == crate::ledger::counting::FOLD_CHANGES_MAX => continue,
                Ok(_) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "folding state changes");
                    break;
                }
            }
        }
        if last_prune.elapsed() >= CHANGES_PRUNE_INTERVAL {
            let before = chrono::Utc::now() - crate::quota::state::CHANGES_RETENTION;
            match crate::ledger::counting::prune_changes(&pool, before).await {
                Ok(_) => last_prune = std::time::Instant::now(),
                Err(e) => tracing::warn!(error = %e, "pruning state changes"),
            }
        }
    }
}

/// First signal: graceful stop. After `DRAIN_TIMEOUT` (or a second signal): abort retries.
fn spawn_signal_handler(shutdown: CancellationToken, abort: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = shutdown.cancelled() => {},
        }
        tracing::info!("shutdown requested: draining");
        shutdown.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = tokio::signal::ctrl_c() => {},
            _ = tokio::time::sleep(DRAIN_TIMEOUT) => {},
        }
        abort.cancel();
    });
}
