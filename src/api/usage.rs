//! `GET /v1/accounts/{id}/usage?from=&to=`: what the account used, from the ClickHouse
//! usage log (`usage_log FINAL`, one row per event, so replays never count twice), with
//! the cost differences of re-rating (`usage_corrections`) added to the events' groups.
//! Capability: `Usage`.
//!
//! The window is `[from, to)`, RFC 3339 (`Z` or a percent-encoded `+hh:mm`); default the
//! last 30 days; at most 400 days (the accepted event age), so one request scans a
//! bounded range. Totals, and the same totals by model, provider, modality and UTC day:
//! events (charged or not), charged events, tokens by class, cost as an exact USD string
//! and in internal units. Failed and BYOK calls count as events at zero cost.

use super::auth::{Caller, Capability, check_existing};
use super::extract::{ApiPath, ApiQuery, path_account_id};
use super::{ApiError, AppState};
use crate::money::units_to_usd_string;
use crate::pricing::DisplayUnit;
use axum::Json;
use axum::extract::State;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const WINDOW_DAYS_DEFAULT: i64 = 30;
pub const WINDOW_DAYS_MAX: i64 = 400;
/// Most (day, provider, model, modality) groups read for one answer: 400 days of 250
/// models. Beyond it the answer would be partial, so it is refused instead.
const GROUPS_MAX: u64 = 100_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowQuery {
    from: Option<String>,
    to: Option<String>,
}

/// One ClickHouse result row; field order and types match the SELECT exactly (RowBinary).
#[derive(Debug, clickhouse::Row, Deserialize)]
struct GroupRow {
    day: String,
    provider: String,
    model: String,
    modality: String,
    events: u64,
    charged_events: u64,
    input_tokens: u64,
    cached_input_tokens: u64,
    cache_write_tokens: u64,
    output_tokens: u64,
    reasoning_tokens: u64,
    cost_units: i64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    events: u64,
    charged_events: u64,
    input: u64,
    cached_input: u64,
    cache_write: u64,
    output: u64,
    reasoning: u64,
    cost_units: i64,
}

impl Totals {
    fn add(&mut self, r: &GroupRow) {
        // Saturating: sums of u64 counters cannot realistically overflow, and a saturated
        // counter is a visible oddity where a wrapped one would be a silent lie.
        self.events = self.events.saturating_add(r.events);
        self.charged_events = self.charged_events.saturating_add(r.charged_events);
        self.input = self.input.saturating_add(r.input_tokens);
        self.cached_input = self.cached_input.saturating_add(r.cached_input_tokens);
        self.cache_write = self.cache_write.saturating_add(r.cache_write_tokens);
        self.output = self.output.saturating_add(r.output_tokens);
        self.reasoning = self.reasoning.saturating_add(r.reasoning_tokens);
        self.cost_units = self.cost_units.saturating_add(r.cost_units);
    }

    fn view(&self, unit: &DisplayUnit) -> TotalsView {
        TotalsView {
            events: self.events,
            charged_events: self.charged_events,
            tokens: Tokens {
                input: self.input,
                cached_input: self.cached_input,
                cache_write: self.cache_write,
                output: self.output,
                reasoning: self.reasoning,
            },
            cost: units_to_usd_string(self.cost_units),
            cost_units: self.cost_units,
            display_cost: unit.amount(self.cost_units),
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Tokens {
    /// All prompt tokens (cached and cache writes included).
    pub input: u64,
    pub cached_input: u64,
    pub cache_write: u64,
    /// All completion tokens (reasoning included).
    pub output: u64,
    pub reasoning: u64,
}

#[derive(Debug, Serialize)]
pub struct TotalsView {
    pub events: u64,
    pub charged_events: u64,
    pub tokens: Tokens,
    pub cost: String,
    pub cost_units: i64,
    /// The cost in the catalog's display unit (`display_unit` of the answer).
    pub display_cost: crate::pricing::DisplayAmount,
}

#[derive(Debug, Serialize)]
pub struct Group {
    /// The model, provider, modality or day (YYYY-MM-DD, UTC) of this line.
    pub key: String,
    #[serde(flatten)]
    pub totals: TotalsView,
}

#[derive(Debug, Serialize)]
pub struct UsageView {
    pub account_id: String,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// The catalog's display unit (`credit`, `USD`, ...) of every `display_cost`.
    pub display_unit: String,
    pub totals: TotalsView,
    pub by_model: Vec<Group>,
    pub by_provider: Vec<Group>,
    pub by_modality: Vec<Group>,
    pub by_day: Vec<Group>,
}

pub async fn get(
    State(state): State<AppState>,
    caller: Caller,
    ApiPath(id): ApiPath<String>,
    ApiQuery(q): ApiQuery<WindowQuery>,
) -> Result<Json<UsageView>, ApiError> {
    path_account_id(&id)?;
    let (from, to) = window(q.from, q.to, Utc::now())?;
    check_existing(&caller, &state.pool, &id, Capability::Usage).await?;
    let rows = fetch(&state.clickhouse, &id, from, to).await?;
    Ok(Json(summarize(id, from, to, &rows, state.catalog.display_unit())))
}

/// Parse and bound the window (also `/usage/events`'). Pure: `now` is passed in.
pub(super) fn window(
    from: Option<String>,
    to: Option<String>,
    now: DateTime<Utc>,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let parse = |name: &str, v: Option<String>| -> Result<Option<DateTime<Utc>>, ApiError> {
        v.map(|s| {
            DateTime::parse_from_rfc3339(&s).map(|t| t.with_timezone(&Utc)).map_err(|e| {
                ApiError::bad_request("invalid_query", format!("{name} is not an RFC 3339 time ({e})"))
            })
        })
        .transpose()
    };
    let to = parse("to", to)?.unwrap_or(now);
    let from = parse("from", from)?.unwrap_or(to - Duration::days(WINDOW_DAYS_DEFAULT));
    if from >= to {
        return Err(ApiError::bad_request("invalid_range", "from must be before to"));
    }
    if to - from > Duration::days(WINDOW_DAYS_MAX) {
        return Err(ApiError::bad_request(
            "invalid_range",
            format!("the window is at most {WINDOW_DAYS_MAX} days"),
        ));
    }
    // usage_log.occurred_at is DateTime (u32 seconds): 1970 to 2106.
    if from.timestamp() < 0 || u32::try_from(to.timestamp()).is_err() {
        return Err(ApiError::bad_request("invalid_range", "times must be within 1970..2106"));
    }
    Ok((from, to))
}

async fn fetch(
    client: &clickhouse::Client,
    account: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<GroupRow>, ApiError> {
    // Seconds, as the column stores them: `from` rounds down (an event in that second is
    // inside), `to` rounds up (one at exactly `to` stays outside a whole-second window).
    let from_secs = from.timestamp();
    let to_secs = to.timestamp() + i64::from(to.timestamp_subsec_nanos() > 0);
    let rows: Vec<GroupRow> = client
        .query(
            // The log's rows (FINAL: one per event) plus re-rating corrections, which move
            // only cost (`usage_corrections`, one row per event and run). Inner aliases
            // differ from column names: ClickHouse 18.16 substitutes an alias for a
            // column of the same name everywhere in the query.
            "SELECT day, provider, model, modality,
                    toUInt64(sum(ev)) AS events, toUInt64(sum(ch)) AS charged_events,
                    toUInt64(sum(it)) AS input_tokens, toUInt64(sum(ct)) AS cached_input_tokens,
                    toUInt64(sum(wt)) AS cache_write_tokens, toUInt64(sum(ot)) AS output_tokens,
                    toUInt64(sum(rt)) AS reasoning_tokens, toInt64(sum(co)) AS cost_units
             FROM (
                 SELECT toString(toDate(occurred_at)) AS day, provider, model, modality,
                        toUInt64(count()) AS ev, toUInt64(sum(charged)) AS ch,
                        toUInt64(sum(input_tokens)) AS it, toUInt64(sum(cached_input_tokens)) AS ct,
                        toUInt64(sum(cache_write_tokens)) AS wt, toUInt64(sum(output_tokens)) AS ot,
                        toUInt64(sum(reasoning_tokens)) AS rt, toInt64(sum(cost_units)) AS co
                 FROM usage_log FINAL
                 WHERE account_id = ? AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')
                 GROUP BY day, provider, model, modality
                 UNION ALL
                 SELECT toString(toDate(occurred_at)) AS day, provider, model, modality,
                        toUInt64(0) AS ev, toUInt64(0) AS ch, toUInt64(0) AS it, toUInt64(0) AS ct,
                        toUInt64(0) AS wt, toUInt64(0) AS ot, toUInt64(0) AS rt,
                        toInt64(sum(cost_delta_units)) AS co
                 FROM usage_corrections FINAL
                 WHERE account_id = ? AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')
                 GROUP BY day, provider, model, modality
             )
             GROUP BY day, provider, model, modality
             ORDER BY day, provider, model, modality
             LIMIT ?",
        )
        .bind(account)
        .bind(from_secs)
        .bind(to_secs)
        .bind(account)
        .bind(from_secs)
        .bind(to_secs)
        .bind(GROUPS_MAX + 1)
        .fetch_all()
        .await
        .map_err(|e| {
            tracing::error!(error = %e, "usage query failed");
            ApiError::unavailable("the usage log is unavailable")
        })?;
    if rows.len() as u64 > GROUPS_MAX {
        return Err(ApiError::unprocessable("too_many_groups", "narrow the window: too many usage groups"));
    }
    Ok(rows)
}

fn summarize(
    account_id: String,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    rows: &[GroupRow],
    unit: &DisplayUnit,
) -> UsageView {
    let mut totals = Totals::default();
    let mut by: [BTreeMap<&str, Totals>; 4] = Default::default();
    for r in rows {
        totals.add(r);
        for (map, key) in by.iter_mut().zip([&r.model, &r.provider, &r.modality, &r.day]) {
            map.entry(key.as_str()).or_default().add(r);
        }
    }
    let [by_model, by_provider, by_modality, by_day] =
        by.map(|m| m.into_iter().map(|(k, t)| Group { key: k.to_string(), totals: t.view(unit) }).collect());
    let display_unit = unit.unit_name.clone();
    UsageView {
        account_id,
        from,
        to,
        display_unit,
        totals: totals.view(unit),
        by_model,
        by_provider,
        by_modality,
        by_day,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(from: Option<&str>, to: Option<&str>) -> (Option<String>, Option<String>) {
        (from.map(str::to_string), to.map(str::to_string))
    }

    fn window(
        q: (Option<String>, Option<String>),
        now: DateTime<Utc>,
    ) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
        super::window(q.0, q.1, now)
    }

    #[test]
    fn windows_default_and_bounds() {
        let now = DateTime::parse_from_rfc3339("2026-06-01T00:00:00Z").unwrap().with_timezone(&Utc);
        let (from, to) = window(q(None, None), now).unwrap();
        assert_eq!((to, to - from), (now, Duration::days(30)));
        let (from, _) = window(q(Some("2026-05-31T00:00:00+02:00"), None), now).unwrap();
        assert_eq!(from.to_rfc3339(), "2026-05-30T22:00:00+00:00");
        assert!(window(q(Some("yesterday"), None), now).is_err());
        assert!(window(q(Some("2026-06-02T00:00:00Z"), None), now).is_err(), "from after to");
        assert!(window(q(Some("2025-01-01T00:00:00Z"), None), now).is_err(), "over 400 days");
        assert!(window(q(Some("1969-12-31T00:00:00Z"), Some("1970-01-02T00:00:00Z")), now).is_err());
    }

    #[test]
    fn groups_add_up() {
        let row = |day: &str, model: &str, cost: i64| GroupRow {
            day: day.into(),
            provider: "p".into(),
            model: model.into(),
            modality: "chat".into(),
            events: 2,
            charged_events: 1,
            input_tokens: 10,
            cached_input_tokens: 1,
            cache_write_tokens: 0,
            output_tokens: 5,
            reasoning_tokens: 0,
            cost_units: cost,
        };
        let rows = [row("2026-05-01", "a", 100), row("2026-05-02", "a", 50), row("2026-05-02", "b", 1)];
        let now = Utc::now();
        let v = summarize("acct".into(), now, now, &rows, &(DisplayUnit::USD)());
        assert_eq!((v.totals.events, v.totals.cost_units, v.totals.cost.as_str()), (6, 151, "0.00000151"));
        assert_eq!(v.by_model.iter().map(|g| g.totals.cost_units).collect::<Vec<_>>(), [150, 1]);
        assert_eq!(v.by_day.iter().map(|g| g.key.as_str()).collect::<Vec<_>>(), ["2026-05-01", "2026-05-02"]);
        assert_eq!((v.by_provider.len(), v.by_modality[0].totals.tokens.input), (1, 30));
    }
}
