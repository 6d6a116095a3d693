//! ClickHouse usage log: one row per accepted usage event (charged or not).
//!
//! Rows are inserted with `RowBinary` (`with_validation(false)`: ClickHouse 18.16 lacks
//! `RowBinaryWithNamesAndTypes`), so field order and widths here must equal the columns
//! of `schemas/clickhouse/0001_usage_log.sql` exactly; a test checks it against the
//! server. Dedup: see that file and `pipeline`.

use crate::batch::ValidItem;
use clickhouse::Client;
use serde::Serialize;

/// ClickHouse DDL, applied in order by [`migrate`]; each file is one statement.
/// Order matters: a rollup's backfill runs before its view exists (see 0003).
/// (0005-0007 made `usage_daily` a table fed by a second materialized view; 0008 makes it a
/// view over `usage_hourly`, and [`migrate`] drops the old table first.)
const MIGRATIONS: [(&str, &str); 7] = [
    ("0001_usage_log", include_str!("../schemas/clickhouse/0001_usage_log.sql")),
    ("0002_usage_hourly", include_str!("../schemas/clickhouse/0002_usage_hourly.sql")),
    ("0003_usage_hourly_backfill", include_str!("../schemas/clickhouse/0003_usage_hourly_backfill.sql")),
    ("0004_usage_hourly_mv", include_str!("../schemas/clickhouse/0004_usage_hourly_mv.sql")),
    ("0008_usage_daily_view", include_str!("../schemas/clickhouse/0008_usage_daily_view.sql")),
    ("0009_usage_corrections", include_str!("../schemas/clickhouse/0009_usage_corrections.sql")),
    ("0010_usage_corrections_mv", include_str!("../schemas/clickhouse/0010_usage_corrections_mv.sql")),
];

/// Columns added to existing tables after they were created, in order (they are appended,
/// so [`UsageRow`]'s field order stays the table's column order). ClickHouse 18.16 has no
/// `ADD COLUMN IF NOT EXISTS`, so [`migrate`] adds each one that `system.columns` lacks.
/// - `upstream_cost`: the event's upstream cost as its exact decimal (`upstream_cost_units`
///   is rounded to 1e-8 USD); re-rating needs the exact value for the upstream floor.
/// - `catalog_version`, `price_entry`: which catalog and which price version priced the
///   event (`pricing::catalog_version`, `Charge::price_entry`), so "what would this have
///   cost under catalog X" is answerable from the stored row alone.
const ADDED_COLUMNS: [(&str, &str, &str); 3] = [
    ("usage_log", "upstream_cost", "String DEFAULT ''"),
    ("usage_log", "catalog_version", "String DEFAULT ''"),
    ("usage_log", "price_entry", "String DEFAULT ''"),
];

pub fn client(url: &str, database: &str) -> Client {
    Client::default().with_url(url).with_database(database).with_validation(false)
}

/// Create the database (if missing) and the tables.
pub async fn migrate(url: &str, database: &str) -> anyhow::Result<()> {
    assert!(database.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "plain database name");
    Client::default()
        .with_url(url)
        .query(&format!("CREATE DATABASE IF NOT EXISTS {database}"))
        .execute()
        .await?;
    let c = client(url, database);
    // A database from before 0008 has usage_daily as a table fed by usage_daily_mv: every
    // insert into usage_log paid for it. Drop both (the view rebuilds the days from the
    // hours, which hold the same events); only while it is not already the view.
    let engine: Vec<String> = c
        .query("SELECT engine FROM system.tables WHERE database = currentDatabase() AND name = 'usage_daily'")
        .fetch_all()
        .await?;
    if engine.iter().any(|e| e != "View") {
        c.query("DROP TABLE IF EXISTS usage_daily_mv").execute().await?;
        c.query("DROP TABLE IF EXISTS usage_daily").execute().await?;
    }
    for (name, sql) in MIGRATIONS {
        c.query(sql).execute().await.map_err(|e| anyhow::anyhow!("clickhouse migration {name}: {e}"))?;
    }
    for (table, column, definition) in ADDED_COLUMNS {
        if has_column(&c, table, column).await? {
            continue;
        }
        let added = c.query(&format!("ALTER TABLE {table} ADD COLUMN {column} {definition}")).execute().await;
        // Two instances starting together both find it missing; the second ALTER fails
        // because the first one added it, which is the outcome both wanted.
        if let Err(e) = added
            && !has_column(&c, table, column).await?
        {
            anyhow::bail!("clickhouse: adding {table}.{column}: {e}");
        }
    }
    Ok(())
}

async fn has_column(c: &Client, table: &str, column: &str) -> Result<bool, clickhouse::error::Error> {
    let present: Vec<String> = c
        .query(
            "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = ? AND name = ?",
        )
        .bind(table)
        .bind(column)
        .fetch_all()
        .await?;
    Ok(!present.is_empty())
}

#[derive(Debug, Clone, clickhouse::Row, Serialize)]
pub struct UsageRow {
    pub event_id: String,
    pub occurred_at: u32,
    pub ingested_at: u32,
    pub account_id: String,
    pub api_key_id: String,
    pub project_id: String,
    pub user_id: String,
    pub provider: String,
    pub model: String,
    pub priced_model: String,
    pub model_fallback: u8,
    pub modality: String,
    pub feature: String,
    pub status: String,
    pub http_status: u16,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub images: u64,
    pub video_seconds: u64,
    pub video_clips: u64,
    pub resolution: String,
    pub characters: u64,
    pub messages: u64,
    pub message_category: String,
    pub billing_mode: String,
    pub reservation_id: String,
    pub upstream_cost_units: i64,
    pub catalog_cost_units: i64,
    pub cost_units: i64,
    pub charged: u8,
    pub reason: String,
    pub latency_ms: u32,
    pub request_ip: String,
    pub user_agent: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub upstream_cost: String,
    pub catalog_version: String,
    pub price_entry: String,
}

/// DateTime('UTC') holds seconds in u32: clamp (events outside are dead-lettered earlier).
fn epoch_secs(t: chrono::DateTime<chrono::Utc>) -> u32 {
    u32::try_from(t.timestamp().max(0)).unwrap_or(u32::MAX)
}

impl UsageRow {
    pub fn from_item(v: &ValidItem, ingested_at: chrono::DateTime<chrono::Utc>) -> UsageRow {
        let e = &v.event;
        let c = &e.counts;
        let s = |o: &Option<String>| o.clone().unwrap_or_default();
        UsageRow {
            event_id: e.event_id.clone(),
            occurred_at: epoch_secs(e.occurred_at),
            ingested_at: epoch_secs(ingested_at),
            account_id: e.account_id.clone(),
            api_key_id: s(&e.api_key_id),
            project_id: s(&e.project_id),
            user_id: s(&e.user_id),
            provider: e.provider.clone(),
            model: e.model.clone(),
            priced_model: v.charge.priced_model.clone(),
            model_fallback: u8::from(v.charge.model_fallback),
            modality: e.modality.as_str().to_string(),
            feature: s(&e.feature),
            status: e.status.as_str().to_string(),
            http_status: e.http_status.unwrap_or(0),
            input_tokens: c.input_tokens,
            cached_input_tokens: c.cached_input_tokens,
            cache_write_tokens: c.cache_write_tokens,
            output_tokens: c.output_tokens,
            reasoning_tokens: c.reasoning_tokens,
            images: c.images,
            video_seconds: c.video_seconds,
            video_clips: c.video_clips,
            resolution: s(&e.resolution),
            characters: c.characters,
            messages: c.messages,
            message_category: s(&e.message_category),
            billing_mode: e.billing_mode.as_str().to_string(),
            reservation_id: s(&e.reservation_id),
            upstream_cost_units: v.charge.upstream_cost_units,
            catalog_cost_units: v.charge.catalog_cost_units,
            cost_units: v.charge.cost_units,
            charged: u8::from(v.charge.charged),
            reason: v.charge.reason.as_str().to_string(),
            latency_ms: e.latency_ms.unwrap_or(0),
            request_ip: s(&e.request_ip),
            user_agent: s(&e.user_agent),
            source_partition: v.pos.partition,
            source_offset: v.pos.offset,
            upstream_cost: e.upstream_cost.map(|d| d.normalize().to_string()).unwrap_or_default(),
            catalog_version: v.catalog_version.to_string(),
            price_entry: v.charge.price_entry(),
        }
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct EventIdRow {
    event_id: String,
}

/// Largest IN-list text one existence query carries. ClickHouse refuses query text beyond
/// `max_query_size` (262,144 bytes by default, 18.16 and current alike); ids and accounts
/// are sent as literals, so the suspects are split into chunks whose literals stay well
/// under it whatever the id length or batch size.
pub const EXISTENCE_QUERY_LITERAL_BYTES_MAX: usize = 64 * 1024;

/// Which of these events already have a row. Only used on the rare replay path (see
/// `ledger::usage`: reclaimed events), so a scan bounded by event time is acceptable.
/// One query per chunk of at most [`EXISTENCE_QUERY_LITERAL_BYTES_MAX`] bytes of literals.
pub async fn existing_event_ids(
    client: &Client,
    items: &[&ValidItem],
) -> Result<std::collections::HashSet<String>, clickhouse::error::Error> {
    let mut present = std::collections::HashSet::new();
    for chunk in literal_chunks(items, EXISTENCE_QUERY_LITERAL_BYTES_MAX) {
        present.extend(existing_in_chunk(client, chunk).await?);
    }
    Ok(present)
}

/// Split `items` into consecutive chunks whose quoted id + account literals (plus
/// separators) add up to at most `bytes_max`; an item larger than that alone is its own
/// chunk (ids are at most 128 bytes, far below the limit).
fn literal_chunks<'a, 'b>(items: &'a [&'b ValidItem], bytes_max: usize) -> Vec<&'a [&'b ValidItem]> {
    let mut chunks = Vec::new();
    let (mut start, mut bytes) = (0usize, 0usize);
    for (i, v) in items.iter().enumerate() {
        // Worst case every byte is escaped (x2), plus quotes and a comma for each literal.
        let cost = 2 * (v.event.event_id.len() + v.event.account_id.len()) + 6;
        if i > start && bytes + cost > bytes_max {
            chunks.push(&items[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += cost;
    }
    if start < items.len() {
        chunks.push(&items[start..]);
    }
    chunks
}

async fn existing_in_chunk(
    client: &Client,
    items: &[&ValidItem],
) -> Result<Vec<String>, clickhouse::error::Error> {
    let ids: Vec<&str> = items.iter().map(|v| v.event.event_id.as_str()).collect();
    let mut accounts: Vec<&str> = items.iter().map(|v| v.event.account_id.as_str()).collect();
    accounts.sort_unstable();
    accounts.dedup();
    let from = items.iter().map(|v| epoch_secs(v.event.occurred_at)).min().unwrap_or(0);
    let to = items.iter().map(|v| epoch_secs(v.event.occurred_at)).max().unwrap_or(0);
    let rows: Vec<EventIdRow> = client
        .query(
            "SELECT DISTINCT event_id FROM usage_log
             WHERE occurred_at >= toDateTime(?, 'UTC') AND occurred_at <= toDateTime(?, 'UTC')
               AND has(?, account_id) AND has(?, event_id)",
        )
        .bind(from)
        .bind(to)
        .bind(accounts)
        .bind(ids)
        .fetch_all()
        .await?;
    Ok(rows.into_iter().map(|r| r.event_id).collect())
}

/// Insert rows in one request. All or nothing from our side: on error the caller retries
/// the whole batch (duplicates from a partial insert collapse by event id).
pub async fn insert(client: &Client, rows: &[UsageRow]) -> Result<(), clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(());
    }
    let mut insert = client.insert::<UsageRow>("usage_log").await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await
}
