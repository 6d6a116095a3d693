//! Re-rating (`tally rerate`): price the stored events of a time range again under another
//! catalog, and correct the ledger by the difference, exactly once, with a dry run first.
//!
//! # Design (see ARCHITECTURE.md, "Re-rating")
//! - Every usage row knows its price: ClickHouse `usage_log` and the dedup store
//!   (`processed_events`) record the catalog version and the price entry, and `usage_log`
//!   keeps every unit and the exact upstream cost, so an event can be priced again from its
//!   stored row alone ([`stored_event`]).
//! - An event's cost *now* is its latest `usage_corrections` row's `cost_after_units`
//!   (Postgres), else the cost it was billed at. A run compares the new price with that,
//!   so running the same re-rate twice changes nothing, and a second re-rate of the same
//!   range corrects only what remains.
//! - Per account and period (calendar month, UTC, clipped to the range): one Postgres
//!   transaction writes the per-event rows, one `correction` ledger entry (dated at the
//!   period's start, keyed `rerate:<run>:<account>:<period>`, carrying the run, the period,
//!   who ran it, why and the catalog versions) and a `rerate_corrections` row. Only events
//!   whose batch has committed are corrected (a claimed but unapplied event waits for the
//!   next run).
//! - After that COMMIT the per-event rows are published to ClickHouse `usage_corrections`,
//!   whose materialized view adds the differences to `usage_hourly`; a publication
//!   interrupted by a crash is completed by the next run, which first looks up what is
//!   already there (each row inserted once, so the rollup counts it once).
//! - One run at a time (a Postgres advisory lock): a killed run holds nothing, and its
//!   restart corrects only what the killed one did not commit.
//!
//! This module holds the pure parts: rebuilding an event from its row, the periods, and
//! the totals; [`store`] is the Postgres side and [`run`] the orchestration.

pub mod reconcile;
pub mod run;
pub mod store;

use crate::event::{BillingMode, Counts, Modality, Status, UsageEvent};
use chrono::{DateTime, Datelike, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub use run::{RerateOptions, rerate};

/// The columns of `usage_log` that price an event, in [`STORED_USAGE_COLUMNS`] order (the
/// RowBinary reader maps by position). Text borrows the cursor's buffer: a row that does
/// not change allocates only what pricing needs.
#[derive(Debug, Clone, clickhouse::Row, Deserialize)]
pub struct StoredUsage<'a> {
    pub event_id: &'a str,
    pub occurred_at: u32,
    pub account_id: &'a str,
    pub api_key_id: &'a str,
    pub project_id: &'a str,
    pub provider: &'a str,
    pub model: &'a str,
    pub modality: &'a str,
    pub feature: &'a str,
    pub status: &'a str,
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub images: u64,
    pub video_seconds: u64,
    pub video_clips: u64,
    pub characters: u64,
    pub messages: u64,
    pub resolution: &'a str,
    pub message_category: &'a str,
    pub billing_mode: &'a str,
    pub upstream_cost_units: i64,
    pub upstream_cost: &'a str,
    pub catalog_cost_units: i64,
    pub cost_units: i64,
    pub catalog_version: &'a str,
    pub reason: &'a str,
}

/// The SELECT list matching [`StoredUsage`].
pub const STORED_USAGE_COLUMNS: &str = "event_id, toUInt32(occurred_at), account_id, api_key_id, project_id, \
     provider, model, modality, feature, status, input_tokens, cached_input_tokens, \
     cache_write_tokens, output_tokens, reasoning_tokens, images, video_seconds, video_clips, \
     characters, messages, resolution, message_category, billing_mode, upstream_cost_units, \
     upstream_cost, catalog_cost_units, cost_units, catalog_version, reason";

/// The event a stored row was priced from. Rows are Tally's own (validated at the edge),
/// so a failure here means the row was not written by Tally: reported, never guessed.
///
/// Event time is stored in whole seconds; a catalog whose `effective_from` has fractions
/// of a second could price an event of that very second differently (documented).
/// Upstream cost: the exact decimal when stored (`upstream_cost`), else the rounded units
/// (rows written before the exact column existed, exact for costs of at most 8 places).
pub fn stored_event(row: &StoredUsage<'_>) -> Result<UsageEvent, String> {
    let text = |s: &str| if s.is_empty() { None } else { Some(s.to_string()) };
    let occurred_at = Utc
        .timestamp_opt(i64::from(row.occurred_at), 0)
        .single()
        .ok_or_else(|| format!("occurred_at {} out of range", row.occurred_at))?;
    let modality: Modality = row.modality.parse()?;
    let status = match row.status {
        "success" => Status::Success,
        "error" => Status::Error,
        other => return Err(format!("unknown status {other:?}")),
    };
    let billing_mode = match row.billing_mode {
        "platform" => BillingMode::Platform,
        "byok" => BillingMode::Byok,
        other => return Err(format!("unknown billing_mode {other:?}")),
    };
    let upstream_cost = if !row.upstream_cost.is_empty() {
        Some(Decimal::from_str_exact(row.upstream_cost).map_err(|e| format!("upstream_cost: {e}"))?)
    } else if row.upstream_cost_units != 0 {
        Some(crate::money::units_to_usd(row.upstream_cost_units))
    } else {
        None
    };
    Ok(UsageEvent {
        event_id: row.event_id.to_string(),
        occurred_at,
        account_id: row.account_id.to_string(),
        api_key_id: text(row.api_key_id),
        project_id: text(row.project_id),
        user_id: None,
        provider: row.provider.to_string(),
        model: row.model.to_string(),
        modality,
        feature: text(row.feature),
        status,
        http_status: None,
        counts: Counts {
            input_tokens: row.input_tokens,
            cached_input_tokens: row.cached_input_tokens,
            cache_write_tokens: row.cache_write_tokens,
            output_tokens: row.output_tokens,
            reasoning_tokens: row.reasoning_tokens,
            images: row.images,
            video_seconds: row.video_seconds,
            video_clips: row.video_clips,
            characters: row.characters,
            messages: row.messages,
        },
        resolution: text(row.resolution),
        message_category: text(row.message_category),
        upstream_cost,
        billing_mode,
        reservation_id: None,
        latency_ms: None,
        request_ip: None,
        user_agent: None,
    })
}

/// A correction period: `[from, to)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
}

impl Period {
    /// `YYYY-MM` of the period's month (its idempotency-key part).
    pub fn label(&self) -> String {
        format!("{:04}-{:02}", self.from.year(), self.from.month())
    }
}

/// The calendar months (UTC) that `[from, to)` touches, each clipped to the range.
/// Empty when `from >= to`.
pub fn periods(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Period> {
    let mut out = Vec::new();
    let mut start = from;
    while start < to {
        let (y, m) = (start.year(), start.month());
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        let next_month = Utc.with_ymd_and_hms(ny, nm, 1, 0, 0, 0).single().expect("first of a month exists");
        let end = next_month.min(to);
        out.push(Period { from: start, to: end });
        start = end;
    }
    out
}

/// Old and new cost of a set of events, internal units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Totals {
    pub events: u64,
    pub old_cost_units: i64,
    pub new_cost_units: i64,
}

impl Totals {
    pub fn add(&mut self, old: i64, new: i64) {
        self.events += 1;
        self.old_cost_units = self
            .old_cost_units
            .checked_add(old)
            .expect("sums of i64 costs fit: inputs are capped at 1e9 USD");
        self.new_cost_units = self
            .new_cost_units
            .checked_add(new)
            .expect("sums of i64 costs fit: inputs are capped at 1e9 USD");
    }

    pub fn merge(&mut self, other: &Totals) {
        self.events += other.events;
        self.old_cost_units += other.old_cost_units;
        self.new_cost_units += other.new_cost_units;
    }

    /// `new - old`: positive = the customer owes more (a debit).
    pub fn difference_units(&self) -> i64 {
        self.new_cost_units - self.old_cost_units
    }
}

/// What a run found (and, unless a dry run, corrected).
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub run_id: Option<String>,
    pub dry_run: bool,
    pub catalog_version: String,
    /// Events of the range read and priced again.
    pub events_read: u64,
    /// Per account: the events whose cost changes.
    pub accounts: Vec<(String, Totals)>,
    pub total: Totals,
    /// Models (the event's model) by absolute difference, largest first, at most 10.
    pub top_models: Vec<(String, Totals)>,
    /// Changed events not corrected because their batch has not committed yet (in flight,
    /// or a crashed instance's, which its partition's owner will apply): the next run
    /// takes them.
    pub pending_events: u64,
    /// Events billed by their hold's amount at its deadline (`paid_by_hold`): that debit
    /// was the hold's, not a price, so they are not re-rated.
    pub paid_by_hold_events: u64,
    /// Rows that could not be priced again, with the first reason (not Tally's rows).
    pub unreadable_rows: u64,
    pub first_unreadable: Option<String>,
    /// Ledger entries written.
    pub entries_posted: u64,
}

/// Accumulates a run's [`Report`].
#[derive(Debug, Default)]
pub struct Tally {
    by_account: HashMap<String, Totals>,
    by_model: HashMap<String, Totals>,
}

impl Tally {
    pub fn add(&mut self, account: &str, model: &str, old: i64, new: i64) {
        self.by_account.entry(account.to_string()).or_default().add(old, new);
        self.by_model.entry(model.to_string()).or_default().add(old, new);
    }

    /// Write the totals into `report`: accounts sorted by id, models by |difference|.
    pub fn finish(self, report: &mut Report) {
        let mut accounts: Vec<(String, Totals)> = self.by_account.into_iter().collect();
        accounts.sort_by(|a, b| a.0.cmp(&b.0));
        report.total = Totals::default();
        for (_, t) in &accounts {
            report.total.merge(t);
        }
        report.accounts = accounts;
        let mut models: Vec<(String, Totals)> = self.by_model.into_iter().collect();
        models.sort_by(|a, b| {
            b.1.difference_units()
                .unsigned_abs()
                .cmp(&a.1.difference_units().unsigned_abs())
                .then(a.0.cmp(&b.0))
        });
        models.truncate(10);
        report.top_models = models;
    }
}

/// The report as text: per account, the total, the top models. Amounts in USD.
pub fn render(report: &Report) -> String {
    use std::fmt::Write;
    let usd = crate::money::units_to_usd_string;
    let mut out = String::new();
    let run =
        report.run_id.as_deref().map_or("dry run (nothing written)".to_string(), |id| format!("run {id}"));
    let _ = writeln!(out, "re-rate: {run}, catalog version {}", report.catalog_version);
    let _ = writeln!(
        out,
        "events read {}, changed {}, pending (not yet committed, left for the next run) {}, \
         paid by hold (not re-rated) {}, unreadable {}, ledger entries posted {}",
        report.events_read,
        report.total.events,
        report.pending_events,
        report.paid_by_hold_events,
        report.unreadable_rows,
        report.entries_posted
    );
    if let Some(why) = &report.first_unreadable {
        let _ = writeln!(out, "first unreadable row: {why}");
    }
    let line = |out: &mut String, name: &str, t: &Totals| {
        let _ = writeln!(
            out,
            "{name:<40} {:>9} {:>22} {:>22} {:>22}",
            t.events,
            usd(t.old_cost_units),
            usd(t.new_cost_units),
            usd(t.difference_units())
        );
    };
    let _ = writeln!(
        out,
        "{:<40} {:>9} {:>22} {:>22} {:>22}",
        "account", "events", "old USD", "new USD", "difference USD"
    );
    for (account, t) in &report.accounts {
        line(&mut out, account, t);
    }
    line(&mut out, "TOTAL", &report.total);
    let _ = writeln!(out, "top models by difference:");
    for (model, t) in &report.top_models {
        line(&mut out, model, t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn periods_are_months_clipped_to_the_range() {
        let p = periods(t("2026-01-15T10:00:00Z"), t("2026-03-02T00:00:00Z"));
        let labels: Vec<String> = p.iter().map(Period::label).collect();
        assert_eq!(labels, ["2026-01", "2026-02", "2026-03"]);
        assert_eq!(p[0].from, t("2026-01-15T10:00:00Z"));
        assert_eq!(p[0].to, t("2026-02-01T00:00:00Z"));
        assert_eq!(p[2].to, t("2026-03-02T00:00:00Z"));
        assert!(periods(t("2026-12-31T00:00:00Z"), t("2027-01-01T00:00:00Z")).len() == 1);
        assert!(periods(t("2026-01-01T00:00:00Z"), t("2026-01-01T00:00:00Z")).is_empty());
        // Contiguous, no gaps.
        for w in p.windows(2) {
            assert_eq!(w[0].to, w[1].from);
        }
    }

    #[test]
    fn a_stored_row_prices_like_the_event_it_came_from() {
        let catalog = crate::pricing::Catalog::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/examples/demo.toml"
        )))
        .unwrap();
        let mut g = crate::simulate::Generator::new(crate::simulate::SimulateOptions {
            malformed_share: 0.0,
            duplicate_share: 0.0,
            ..Default::default()
        });
        let mut checked = 0;
        for _ in 0..2_000 {
            let crate::simulate::Kind::Valid(event) = g.next_message().kind else { unreachable!() };
            let charge = catalog.price(&event);
            let c = &event.counts;
            let (api_key, project) =
                (event.api_key_id.clone().unwrap_or_default(), event.project_id.clone().unwrap_or_default());
            let (feature, resolution) =
                (event.feature.clone().unwrap_or_default(), event.resolution.clone().unwrap_or_default());
            let category = event.message_category.clone().unwrap_or_default();
            let upstream = event.upstream_cost.map(|d| d.normalize().to_string()).unwrap_or_default();
            let row = StoredUsage {
                event_id: &event.event_id,
                occurred_at: u32::try_from(event.occurred_at.timestamp()).unwrap(),
                account_id: &event.account_id,
                api_key_id: &api_key,
                project_id: &project,
                provider: &event.provider,
                model: &event.model,
                modality: event.modality.as_str(),
                feature: &feature,
                status: event.status.as_str(),
                input_tokens: c.input_tokens,
                cached_input_tokens: c.cached_input_tokens,
                cache_write_tokens: c.cache_write_tokens,
                output_tokens: c.output_tokens,
                reasoning_tokens: c.reasoning_tokens,
                images: c.images,
                video_seconds: c.video_seconds,
                video_clips: c.video_clips,
                characters: c.characters,
                messages: c.messages,
                resolution: &resolution,
                message_category: &category,
                billing_mode: event.billing_mode.as_str(),
                upstream_cost_units: charge.upstream_cost_units,
                upstream_cost: &upstream,
                catalog_cost_units: charge.catalog_cost_units,
                cost_units: charge.cost_units,
                catalog_version: catalog.version(),
                reason: charge.reason.as_str(),
            };
            let again = catalog.price(&stored_event(&row).unwrap());
            assert_eq!(again.cost_units, charge.cost_units, "{event:?}");
            assert_eq!(again.catalog_cost_units, charge.catalog_cost_units);
            checked += 1;
        }
        assert_eq!(checked, 2_000);
    }

    #[test]
    fn totals_rank_models_by_absolute_difference() {
        let mut tally = Tally::default();
        tally.add("a", "m1", 100, 150);
        tally.add("a", "m2", 100, 0);
        tally.add("b", "m1", 10, 10);
        let mut report = Report::default();
        tally.finish(&mut report);
        assert_eq!(report.total, Totals { events: 3, old_cost_units: 210, new_cost_units: 160 });
        assert_eq!(report.top_models[0].0, "m2");
        assert_eq!(report.accounts[0].1.difference_units(), -50);
    }
}
