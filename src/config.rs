//! Connection and pipeline settings shared by the commands.
//!
//! Every setting is a flag with an environment fallback (`TALLY_*`), so the stack script's
//! `scripts/stack env` output configures every command. Units are in the names.

use clap::Args;
use std::time::Duration;

/// Where the servers are.
#[derive(Debug, Clone, Args)]
pub struct Connections {
    /// Kafka bootstrap servers. Use 127.0.0.1, never localhost (tansu listens on IPv4 only).
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    /// Postgres URL of the ledger database.
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
    /// ClickHouse HTTP URL.
    #[arg(long, env = "TALLY_CLICKHOUSE_URL", default_value = "http://127.0.0.1:18123")]
    pub clickhouse_url: String,
    /// ClickHouse database holding `usage_log`.
    #[arg(long, env = "TALLY_CLICKHOUSE_DATABASE", default_value = "tally")]
    pub clickhouse_database: String,
}

/// Topics.
#[derive(Debug, Clone, Args)]
pub struct Topics {
    /// Topic of usage events (Confluent-framed Avro).
    #[arg(long, env = "TALLY_TOPIC", default_value = "tally.usage-events")]
    pub topic: String,
    /// Dead-letter topic: undecodable or invalid events, with the reason in headers.
    #[arg(long, env = "TALLY_DLQ_TOPIC", default_value = "tally.usage-events.dlq")]
    pub dlq_topic: String,
}

/// Where writer schemas other than the compiled-in one come from (see `codec::schemas`).
#[derive(Debug, Clone, Default, Args)]
pub struct SchemaSources {
    /// Directory of `*.avsc` writer schemas, each carrying its id as `"tally.schema_id": N`.
    #[arg(long, env = "TALLY_SCHEMA_DIR")]
    pub schema_dir: Option<std::path::PathBuf>,
    /// Confluent-compatible schema registry (`GET /schemas/ids/{id}`), asked for ids not
    /// compiled in or in the directory.
    #[arg(long, env = "TALLY_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
}

impl SchemaSources {
    /// The compiled-in schema, the directory's files, and the registry to ask.
    pub fn load(&self) -> anyhow::Result<crate::codec::Schemas> {
        let schemas = crate::codec::Schemas::new(self.schema_registry_url.as_deref());
        if let Some(dir) = &self.schema_dir {
            schemas.load_dir(dir).map_err(|e| anyhow::anyhow!("schema directory: {e}"))?;
        }
        Ok(schemas)
    }
}

/// Settings of `tally run`.
#[derive(Debug, Clone, Args)]
pub struct RunSettings {
    #[command(flatten)]
    pub connections: Connections,
    #[command(flatten)]
    pub topics: Topics,
    #[command(flatten)]
    pub schemas: SchemaSources,
    /// Consumer group. Progress is stored per group in Postgres.
    #[arg(long, env = "TALLY_GROUP", default_value = "tally")]
    pub group: String,
    /// Pricing catalog (TOML). See examples/.
    #[arg(long = "config", env = "TALLY_CONFIG", default_value = "examples/demo.toml")]
    pub catalog_path: std::path::PathBuf,
    /// HTTP API listen address (health, metrics, balances).
    #[arg(long, env = "TALLY_HTTP_ADDR", default_value = "127.0.0.1:18080")]
    pub http_addr: String,
    /// Most events in one batch (one Postgres transaction, one ClickHouse insert).
    #[arg(long, env = "TALLY_BATCH_EVENTS_MAX", default_value_t = 5_000)]
    pub batch_events_max: usize,
    /// Longest a batch waits to fill before it is written anyway.
    #[arg(long, env = "TALLY_BATCH_WAIT_MS", default_value_t = 250)]
    pub batch_wait_ms: u64,
    /// Batches decoded and waiting for the writer. Bounds memory: at most
    /// (batches_in_flight_max + 2) x batch_events_max events are held at once.
    #[arg(long, env = "TALLY_BATCHES_IN_FLIGHT_MAX", default_value_t = 2)]
    pub batches_in_flight_max: usize,
    /// Kafka session timeout. tansu needs about half of it to seat a new member.
    #[arg(long, env = "TALLY_SESSION_TIMEOUT_MS", default_value_t = 6_000)]
    pub session_timeout_ms: u32,
    /// Events stamped further than this in the future are dead-lettered (`out_of_range`).
    #[arg(long, env = "TALLY_FUTURE_SKEW_SECS_MAX", default_value_t = 300)]
    pub future_skew_secs_max: u32,
    /// Events older than this are dead-lettered (`out_of_range`).
    #[arg(long, env = "TALLY_EVENT_AGE_DAYS_MAX", default_value_t = 400)]
    pub event_age_days_max: u32,
    /// Largest cost one event may bill, USD; costlier events are dead-lettered
    /// (`cost_out_of_range`).
    #[arg(long, env = "TALLY_EVENT_COST_USD_MAX", default_value = "100000")]
    pub event_cost_usd_max: rust_decimal::Decimal,
    /// Postgres pool size.
    #[arg(long, env = "TALLY_PG_CONNECTIONS_MAX", default_value_t = 8)]
    pub pg_connections_max: u32,
    /// Topic of `auto_reload_requested` events.
    #[arg(long, env = "TALLY_AUTO_RELOAD_TOPIC", default_value = "tally.auto-reload")]
    pub auto_reload_topic: String,
    /// Stripe webhook signing secret (enables `POST /v1/webhooks/stripe`). Never logged.
    #[arg(long, env = "TALLY_STRIPE_WEBHOOK_SECRET", hide_env_values = true)]
    pub stripe_webhook_secret: Option<String>,
    /// Polar webhook secret (enables `POST /v1/webhooks/polar`). Never logged.
    #[arg(long, env = "TALLY_POLAR_WEBHOOK_SECRET", hide_env_values = true)]
    pub polar_webhook_secret: Option<String>,
    /// Threads of the HTTP API's own runtime (0: share the pipeline's). Its own threads
    /// let the OS scheduler interleave authorize with decoding and row building, so a
    /// request never waits for a pipeline task to yield (see ARCHITECTURE, "Memory").
    #[arg(long, env = "TALLY_HTTP_THREADS", default_value_t = 2)]
    pub http_threads: usize,
    /// Nice value added to the pipeline's threads (decoding, pricing, row building, the
    /// writer), 0-19; the HTTP API's threads keep the process's own. A higher value lets
    /// the OS scheduler run an authorize request before the next chunk of ingest work
    /// (see ARCHITECTURE, "Capacity model").
    #[arg(long, env = "TALLY_PIPELINE_NICE", default_value_t = 10, value_parser = clap::value_parser!(i32).range(0..=19))]
    pub pipeline_nice: i32,
    /// Stripe secret key: `POST /v1/accounts/{id}/checkout` creates Stripe Checkout
    /// sessions with it. Never logged.
    #[arg(long, env = "TALLY_STRIPE_SECRET_KEY", hide_env_values = true)]
    pub stripe_secret_key: Option<String>,
    /// Stripe's API (a proxy, or a local Stripe-compatible server in tests).
    #[arg(long, env = "TALLY_STRIPE_API_BASE", default_value = "https://api.stripe.com")]
    pub stripe_api_base: String,
    /// Polar organization access token: checkout creates Polar checkouts with it.
    #[arg(long, env = "TALLY_POLAR_ACCESS_TOKEN", hide_env_values = true)]
    pub polar_access_token: Option<String>,
    /// Polar's API (`https://sandbox-api.polar.sh` for its sandbox).
    #[arg(long, env = "TALLY_POLAR_API_BASE", default_value = "https://api.polar.sh")]
    pub polar_api_base: String,
    /// Stop once this many messages were handled (0 = run until SIGTERM/SIGINT). For tests.
    #[arg(long, default_value_t = 0)]
    pub exit_after_messages: u64,
}

impl RunSettings {
    /// Cross-field rules (checked before anything connects).
    pub fn validate(&self) -> Result<(), String> {
        if self.http_threads > 64 {
            return Err("http_threads must be within 0..=64".into());
        }
        if self.batch_events_max == 0 || self.batch_events_max > 50_000 {
            return Err("batch_events_max must be within 1..=50000".into());
        }
        if self.batches_in_flight_max == 0 || self.batches_in_flight_max > 64 {
            return Err("batches_in_flight_max must be within 1..=64".into());
        }
        if self.batch_wait_ms == 0 || self.batch_wait_ms > 60_000 {
            return Err("batch_wait_ms must be within 1..=60000".into());
        }
        // A batch that waits longer than the session timeout would get us evicted.
        if u64::from(self.session_timeout_ms) <= self.batch_wait_ms {
            return Err("session_timeout_ms must exceed batch_wait_ms".into());
        }
        Ok(())
    }

    pub fn event_cost_units_max(&self) -> anyhow::Result<i64> {
        let units = crate::money::usd_to_units(self.event_cost_usd_max)
            .filter(|u| *u > 0 && *u <= 1_000_000_000 * crate::money::UNITS_PER_USD)
            .ok_or_else(|| anyhow::anyhow!("event_cost_usd_max must be within (0, 1e9] USD"))?;
        Ok(units)
    }

    pub fn batch_wait(&self) -> Duration {
        Duration::from_millis(self.batch_wait_ms)
    }
}
