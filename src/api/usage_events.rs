//! `GET /v1/accounts/{id}/usage/events`: the account's calls one by one, newest first, from
//! the ClickHouse usage log (Brievio's usage page). Capability: `Usage`.
//!
//! Filters: the window `[from, to)` (the same rules as `/usage`: default the last 30 days,
//! at most 400), and optionally `model`, `provider`, `modality`, `status`, `api_key_id`,
//! `project_id` (exact matches). `limit` 1..=500 (default 100).
//!
//! Pagination is by key, not offset: `next_cursor` names the last row of the page (its
//! event time and id); pass it as `cursor` for the next, older page (null on the last).
//! Rows logged meanwhile never shift a page. A cursor is opaque (hex) and only valid for
//! the same filters.
//!
//! Each row is read with FINAL (one row per event). `cost_units` is what the call costs now:
//! the cost it was billed plus any re-rating corrections (`billed_cost_units` is the
//! former alone), so this page agrees with `/usage` and the ledger after a re-rate.

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiPath, ApiQuery, path_account_id};
use super::{ApiError, AppState};
use crate::event::{Counts, ID_LEN_MAX, Modality, TEXT_LEN_MAX};
use crate::money::units_to_usd_string;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const PAGE_LIMIT_DEFAULT: u32 = 100;
/// Most rows per page. Also bounds the id list of the corrections lookup (500 ids of at
/// most 128 bytes: well under ClickHouse's `max_query_size`).
pub const PAGE_LIMIT_MAX: u32 = 500;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    from: Option<String>,
    to: Option<String>,
    model: Option<String>,
    provider: Option<String>,
    modality: Option<String>,
    status: Option<String>,
    api_key_id: Option<String>,
    project_id: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
}

/// The filters, checked. Pure: built from the query alone.
#[derive(Debug, Default, PartialEq)]
struct Filters {
    /// (column, value) pairs, in a fixed order.
    equal: Vec<(&'static str, String)>,
    limit: u32,
    /// (event time, event id) of the last row of the previous page.
    after: Option<(u32, String)>,
}

fn filters(q: &EventsQuery) -> Result<Filters, ApiError> {
    let mut f = Filters { limit: q.limit.unwrap_or(PAGE_LIMIT_DEFAULT), ..Filters::default() };
    if f.limit == 0 || f.limit > PAGE_LIMIT_MAX {
        return Err(ApiError::bad_request("invalid_query", format!("limit must be 1..={PAGE_LIMIT_MAX}")));
    }
    let texts = [
        ("model", &q.model, TEXT_LEN_MAX),
        ("provider", &q.provider, TEXT_LEN_MAX),
        ("api_key_id", &q.api_key_id, ID_LEN_MAX),
        ("project_id", &q.project_id, ID_LEN_MAX),
    ];
    for (column, value, max) in texts {
        if let Some(v) = value {
            if v.is_empty() || v.len() > max {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("{column} must be 1..={max} bytes"),
                ));
            }
            f.equal.push((column, v.clone()));
        }
    }
    if let Some(m) = &q.modality {
        let modality: Modality = m.parse().map_err(|e: String| ApiError::bad_request("invalid_query", e))?;
        f.equal.push(("modality", modality.as_str().to_string()));
    }
    if let Some(s) = &q.status {
        if s != "success" && s != "error" {
            return Err(ApiError::bad_request("invalid_query", "status must be success or error"));
        }
        f.equal.push(("status", s.clone()));
    }
    f.after = q.cursor.as_deref().map(decode_cursor).transpose()?;
    Ok(f)
}

fn encode_cursor(occurred_at: u32, event_id: &str) -> String {
    hex::encode(format!("{occurred_at}:{event_id}"))
}

fn decode_cursor(cursor: &str) -> Result<(u32, String), ApiError> {
    let bad = || ApiError::bad_request("invalid_cursor", "cursor is not one this endpoint returned");
    if cursor.len() > 2 * (10 + 1 + ID_LEN_MAX) {
        return Err(bad());
    }
    let text = String::from_utf8(hex::decode(cursor).map_err(|_| bad())?).map_err(|_| bad())?;
    let (secs, id) = text.split_once(':').ok_or_else(bad)?;
    let secs: u32 = secs.parse().map_err(|_| bad())?;
    if id.is_empty() || id.len() > ID_LEN_MAX {
        return Err(bad());
    }
    Ok((secs, id.to_string()))
}

/// One ClickHouse row; field order and types match the SELECT exactly (RowBinary).
#[derive(Debug, clickhouse::Row, Deserialize)]
struct EventRow {
    event_id: String,
    occurred_at: u32,
    provider: String,
    model: String,
    priced_model: String,
    modality: String,
    feature: String,
    status: String,
    http_status: u16,
    api_key_id: String,
    project_id: String,
    user_id: String,
    billing_mode: String,
    charged: u8,
    reason: String,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    images: u64,
    video_seconds: u64,
    video_clips: u64,
    characters: u64,
    messages: u64,
    upstream_cost_units: i64,
    catalog_cost_units: i64,
    cost_units: i64,
    latency_ms: u32,
    catalog_version: String,
    price_entry: String,
}

const EVENT_COLUMNS: &str = "event_id, toUInt32(occurred_at), provider, model, priced_model, modality, \
     feature, status, http_status, api_key_id, project_id, user_id, billing_mode, charged, reason, \
     input_tokens, cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, images, \
     video_seconds, video_clips, characters, messages, upstream_cost_units, catalog_cost_units, \
     cost_units, latency_ms, catalog_version, price_entry";

#[derive(Debug, Serialize)]
pub struct UsageEventView {
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
    pub provider: String,
    pub model: String,
    /// The catalog entry that priced it (empty when none did).
    pub priced_model: String,
    pub modality: String,
    pub feature: String,
    pub status: String,
    pub http_status: u16,
    pub api_key_id: String,
    pub project_id: String,
    pub user_id: String,
    pub billing_mode: String,
    pub charged: bool,
    /// Why it costs what it costs (`priced`, `failed_call`, `byok`, ...).
    pub reason: String,
    /// Every unit the call reported (tokens by class, images, seconds, ...).
    pub units: Counts,
    /// What the call costs now (exact USD string and internal units, 1e-8 USD).
    pub cost: String,
    pub cost_units: i64,
    /// `cost_units` in the catalog's display unit (`display_unit` of the page).
    pub display_cost: crate::pricing::DisplayAmount,
    /// What it was billed when it arrived (differs after a re-rate).
    pub billed_cost_units: i64,
    pub catalog_cost_units: i64,
    pub upstream_cost_units: i64,
    pub latency_ms: u32,
    pub catalog_version: String,
    pub price_entry: String,
}

#[derive(Debug, Serialize)]
pub struct UsageEventPage {
    pub account_id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The catalog's display unit of every `display_cost`.
    pub display_unit: String,
    pub events: Vec<UsageEventView>,
    /// Pass as `cursor` for the next (older) page; null when this page is the last.
    pub next_cursor: Option<String>,
}

pub async fn list(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<EventsQuery>,
) -> Result<Json<UsageEventPage>, ApiError> {
    path_account_id(&id)?;
    let f = filters(&q)?;
    let (from, to) = super::usage::window(q.from.clone(), q.to.clone(), Utc::now())?;
    check_existing(&caller, &state.pool, &id, Capability::Usage).await?;
    let unavailable = |e: clickhouse::error::Error| {
        tracing::error!(error = %e, "usage events query failed");
        ApiError::unavailable("the usage log is unavailable")
    };
    let mut rows = fetch(&state.clickhouse, &id, from, to, &f).await.map_err(unavailable)?;
    let next_cursor = if rows.len() > f.limit as usize {
        rows.truncate(f.limit as usize);
        rows.last().map(|r| encode_cursor(r.occurred_at, &r.event_id))
    } else {
        None
    };
    let deltas = corrections(&state.clickhouse, &id, &rows).await.map_err(unavailable)?;
    let unit = state.catalog.display_unit();
    let events = rows.into_iter().map(|r| view(r, &deltas, unit)).collect();
    let display_unit = unit.unit_name.clone();
    Ok(Json(UsageEventPage { account_id: id, from, to, display_unit, events, next_cursor }))
}

async fn fetch(
    client: &clickhouse::Client,
    account: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    f: &Filters,
) -> Result<Vec<EventRow>, clickhouse::error::Error> {
    let mut sql = format!(
        "SELECT {EVENT_COLUMNS} FROM usage_log FINAL
         WHERE account_id = ? AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')"
    );
    for (column, _) in &f.equal {
        sql.push_str(&format!(" AND {column} = ?"));
    }
    if f.after.is_some() {
        sql.push_str(
            " AND (occurred_at < toDateTime(?, 'UTC') OR (occurred_at = toDateTime(?, 'UTC') AND event_id < ?))",
        );
    }
    sql.push_str(" ORDER BY occurred_at DESC, event_id DESC LIMIT ?");
    // Seconds, as stored: `to` rounds up, like `/usage`.
    let to_secs = to.timestamp() + i64::from(to.timestamp_subsec_nanos() > 0);
    let mut q = client.query(&sql).bind(account).bind(from.timestamp()).bind(to_secs);
    for (_, value) in &f.equal {
        q = q.bind(value);
    }
    if let Some((secs, id)) = &f.after {
        q = q.bind(secs).bind(secs).bind(id);
    }
    q.bind(f.limit + 1).fetch_all().await
}

#[derive(Debug, clickhouse::Row, Deserialize)]
struct DeltaRow {
    event_id: String,
    delta: i64,
}

/// Re-rating differences of the page's events.
async fn corrections(
    client: &clickhouse::Client,
    account: &str,
    rows: &[EventRow],
) -> Result<HashMap<String, i64>, clickhouse::error::Error> {
    if rows.is_empty() {
        return Ok(HashMap::new());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.event_id.as_str()).collect();
    let deltas: Vec<DeltaRow> = client
        .query(
            "SELECT event_id, toInt64(sum(cost_delta_units)) FROM usage_corrections FINAL
             WHERE account_id = ? AND has(?, event_id) GROUP BY event_id",
        )
        .bind(account)
        .bind(ids)
        .fetch_all()
        .await?;
    Ok(deltas.into_iter().map(|d| (d.event_id, d.delta)).collect())
}

fn view(r: EventRow, deltas: &HashMap<String, i64>, unit: &crate::pricing::DisplayUnit) -> UsageEventView {
    let cost_units = r.cost_units.saturating_add(deltas.get(&r.event_id).copied().unwrap_or(0));
    UsageEventView {
        occurred_at: Utc.timestamp_opt(i64::from(r.occurred_at), 0).single().unwrap_or_default(),
        units: Counts {
            input_tokens: r.input_tokens,
            cached_input_tokens: r.cached_input_tokens,
            cache_write_tokens: r.cache_write_tokens,
            output_tokens: r.output_tokens,
            reasoning_tokens: r.reasoning_tokens,
            images: r.images,
            video_seconds: r.video_seconds,
            video_clips: r.video_clips,
            characters: r.characters,
            messages: r.messages,
        },
        cost: units_to_usd_string(cost_units),
        display_cost: unit.amount(cost_units),
        cost_units,
        billed_cost_units: r.cost_units,
        charged: r.charged != 0,
        event_id: r.event_id,
        provider: r.provider,
        model: r.model,
        priced_model: r.priced_model,
        modality: r.modality,
        feature: r.feature,
        status: r.status,
        http_status: r.http_status,
        api_key_id: r.api_key_id,
        project_id: r.project_id,
        user_id: r.user_id,
        billing_mode: r.billing_mode,
        reason: r.reason,
        catalog_cost_units: r.catalog_cost_units,
        upstream_cost_units: r.upstream_cost_units,
        latency_ms: r.latency_ms,
        catalog_version: r.catalog_version,
        price_entry: r.price_entry,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q() -> EventsQuery {
        EventsQuery {
            from: None,
            to: None,
            model: None,
            provider: None,
            modality: None,
            status: None,
            api_key_id: None,
            project_id: None,
            limit: None,
            cursor: None,
        }
    }

    #[test]
    fn cursors_round_trip_and_refuse_garbage() {
        let c = encode_cursor(1_700_000_000, "evt:with:colons");
        assert_eq!(decode_cursor(&c).unwrap(), (1_700_000_000, "evt:with:colons".to_string()));
        for bad in
            ["", "zz", &hex::encode("nocolon"), &hex::encode("x:id"), &hex::encode("1:"), &"ab".repeat(300)]
        {
            assert!(decode_cursor(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn filters_are_checked() {
        assert_eq!(filters(&q()).unwrap().limit, PAGE_LIMIT_DEFAULT);
        assert!(filters(&EventsQuery { limit: Some(0), ..q() }).is_err());
        assert!(filters(&EventsQuery { limit: Some(PAGE_LIMIT_MAX + 1), ..q() }).is_err());
        assert!(filters(&EventsQuery { modality: Some("hologram".into()), ..q() }).is_err());
        assert!(filters(&EventsQuery { status: Some("maybe".into()), ..q() }).is_err());
        assert!(filters(&EventsQuery { model: Some(String::new()), ..q() }).is_err());
        let f = filters(&EventsQuery { model: Some("gpt-5".into()), status: Some("error".into()), ..q() })
            .unwrap();
        assert_eq!(f.equal, [("model", "gpt-5".to_string()), ("status", "error".to_string())]);
    }
}
