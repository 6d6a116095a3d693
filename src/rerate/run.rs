//! One `tally rerate` run: read the range from ClickHouse by groups of consecutive
//! accounts (bounded by their event count), price every event again, then correct each
//! account-period that changed and publish the corrections to ClickHouse.

use super::store::{self, Changed, CorrectionContext, Unpublished};
use super::{Period, Report, STORED_USAGE_COLUMNS, StoredUsage, Tally, stored_event};
use crate::pricing::Catalog;
use anyhow::Context;
use chrono::{DateTime, SubsecRound, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};

#[derive(Clone)]
pub struct RerateOptions {
    pub catalog: Catalog,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub account: Option<String>,
    pub model: Option<String>,
    pub dry_run: bool,
    /// Who runs it and why: required unless `dry_run`.
    pub created_by: Option<String>,
    pub reason: Option<String>,
    pub progress: bool,
    /// Test-only fault injection (`TALLY_FAULT_RERATE_ABORT_AFTER_COMMITS=N`): abort the
    /// process right after the N-th correction commits, before its ClickHouse rows are
    /// published, as a crash there would.
    pub fault_abort_after_commits: Option<u64>,
}

/// Run a re-rate. With `dry_run` nothing is written anywhere.
pub async fn rerate(pool: &PgPool, ch: &clickhouse::Client, opts: &RerateOptions) -> anyhow::Result<Report> {
    // Event times are stored in whole seconds: so are the bounds (fractions truncated).
    let opts =
        &RerateOptions { from: opts.from.trunc_subsecs(0), to: opts.to.trunc_subsecs(0), ..opts.clone() };
    anyhow::ensure!(opts.from < opts.to, "--from must be before --to");
    let version = opts.catalog.version().to_string();
    let mut report = Report { dry_run: opts.dry_run, catalog_version: version.clone(), ..Report::default() };
    // Held for the whole run: the lock is the connection's, released if the process dies.
    let mut lock_conn = None;
    let mut run_id = String::new();
    if !opts.dry_run {
        let (Some(by), Some(reason)) = (opts.created_by.as_deref(), opts.reason.as_deref()) else {
            anyhow::bail!("a re-rate that changes the ledger needs --by and --reason");
        };
        let mut conn = pool.acquire().await?;
        let (locked,): (bool,) = sqlx::query_as("SELECT pg_try_advisory_lock($1)")
            .bind(store::RERATE_LOCK_KEY)
            .fetch_one(&mut *conn)
            .await?;
        anyhow::ensure!(locked, "another tally rerate is running; wait for it to finish");
        lock_conn = Some(conn);
        publish_pending(pool, ch).await.context("completing an earlier run's ClickHouse rows")?;
        store::register_catalog(pool, &opts.catalog).await?;
        run_id = uuid::Uuid::new_v4().simple().to_string();
        store::start_run(
            pool,
            &store::RunRecord {
                run_id: &run_id,
                catalog_version: &version,
                from: opts.from,
                to: opts.to,
                account: opts.account.as_deref(),
                model: opts.model.as_deref(),
                created_by: by,
                reason,
            },
        )
        .await?;
        report.run_id = Some(run_id.clone());
    }
    let filter = Filter::new(opts);
    let counts =
        filter.accounts(ch).await.context("counting the range's events per account in ClickHouse")?;
    let progress = progress_bar(opts.progress, counts.iter().map(|a| a.events).sum());
    let cx = CorrectionContext {
        run_id: &run_id,
        catalog_version: &version,
        created_by: opts.created_by.as_deref().unwrap_or(""),
        reason: opts.reason.as_deref().unwrap_or(""),
        fault_abort_after_commits: opts.fault_abort_after_commits,
    };
    let periods = super::periods(opts.from, opts.to);
    let whole = Period { from: opts.from, to: opts.to };
    let mut tally = Tally::default();
    for group in groups(&counts) {
        let accounts: Vec<&str> = group.iter().map(|a| a.account_id.as_str()).collect();
        let current = store::current_costs(pool, &accounts, &whole).await?;
        let mut found = Found::default();
        let mut cursor = filter.rows(ch, &accounts)?;
        while let Some(row) = cursor.next().await.context("reading usage_log")? {
            progress.inc(1);
            found.read(&row, &opts.catalog, &current, &periods, &mut report);
        }
        // Account by account, period by period: one correction each.
        let mut changed: Vec<((String, usize), Vec<Changed>)> = found.changed.into_iter().collect();
        changed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        for ((account, period), events) in changed {
            correct(pool, ch, &cx, &account, &periods[period], events, &mut tally, &mut report).await?;
        }
    }
    progress.finish_and_clear();
    tally.finish(&mut report);
    if !opts.dry_run {
        store::finish_run(pool, &run_id, &report.total).await?;
    }
    drop(lock_conn);
    Ok(report)
}

/// Events of one account group read per query at most (whole accounts: an account with
/// more is a group of its own). Bounds memory: what is kept is the group's changed
/// events (about 200 bytes each) and its earlier corrections.
const GROUP_EVENTS_MAX: u64 = 250_000;

/// Contiguous runs of the sorted accounts with at most [`GROUP_EVENTS_MAX`] events each.
fn groups(counts: &[AccountEvents]) -> Vec<&[AccountEvents]> {
    let mut out = Vec::new();
    let (mut start, mut events) = (0usize, 0u64);
    for (i, a) in counts.iter().enumerate() {
        if i > start && events + a.events > GROUP_EVENTS_MAX {
            out.push(&counts[start..i]);
            (start, events) = (i, 0);
        }
        events += a.events;
    }
    if start < counts.len() {
        out.push(&counts[start..]);
    }
    out
}

/// What one group's rows changed, by account and period (an index into the run's periods).
#[derive(Default)]
struct Found {
    changed: HashMap<(String, usize), Vec<Changed>>,
    /// Ids already taken: a row can repeat (an insert retried before ClickHouse merged
    /// the copies), and rows arrive in no particular order.
    seen: HashSet<String>,
}

impl Found {
    fn read(
        &mut self,
        row: &StoredUsage<'_>,
        catalog: &Catalog,
        current: &HashMap<String, (i64, i64)>,
        periods: &[Period],
        report: &mut Report,
    ) {
        report.events_read += 1;
        if row.reason == crate::pricing::ChargeReason::PaidByHold.as_str() {
            report.paid_by_hold_events += 1;
            return;
        }
        let event = match stored_event(row) {
            Ok(e) => e,
            Err(why) => {
                report.unreadable_rows += 1;
                report.first_unreadable.get_or_insert_with(|| format!("{}: {why}", row.event_id));
                return;
            }
        };
        let after = catalog.price(&event);
        if after.reason == crate::pricing::ChargeReason::CostOverflow {
            report.unreadable_rows += 1;
            report.first_unreadable.get_or_insert_with(|| format!("{}: cost_overflow", row.event_id));
            return;
        }
        let before = current.get(row.event_id).copied().unwrap_or((row.cost_units, row.catalog_cost_units));
        if after.cost_units == before.0 || !self.seen.insert(row.event_id.to_string()) {
            return;
        }
        // The periods tile the range and the query kept the event inside it.
        let period = periods.partition_point(|p| p.to <= event.occurred_at);
        debug_assert!(period < periods.len(), "an event of the range is in one of its periods");
        let key = (event.account_id.clone(), period.min(periods.len() - 1));
        self.changed.entry(key).or_default().push(Changed {
            event,
            catalog_version: row.catalog_version.to_string(),
            billed_units: row.cost_units,
            before,
            after,
        });
    }
}

/// Correct one account-period (only events whose batch committed), publish it, count it.
#[allow(clippy::too_many_arguments)]
async fn correct(
    pool: &PgPool,
    ch: &clickhouse::Client,
    cx: &CorrectionContext<'_>,
    account: &str,
    period: &Period,
    mut changed: Vec<Changed>,
    tally: &mut Tally,
    report: &mut Report,
) -> anyhow::Result<()> {
    let billed: Vec<(&str, i64)> =
        changed.iter().map(|c| (c.event.event_id.as_str(), c.billed_units)).collect();
    let applied = store::applied_events(pool, &billed).await?;
    let before = changed.len();
    changed.retain(|c| applied.contains(&c.event.event_id));
    report.pending_events += (before - changed.len()) as u64;
    if changed.is_empty() {
        return Ok(());
    }
    for c in &changed {
        tally.add(account, &c.event.model, c.before.0, c.after.cost_units);
    }
    if report.dry_run {
        return Ok(());
    }
    store::commit_correction(pool, cx, account, period, &changed)
        .await
        .with_context(|| format!("correcting {account} for {}", period.label()))?;
    report.entries_posted += 1;
    if cx.fault_abort_after_commits == Some(report.entries_posted) {
        tracing::error!("fault injection: aborting after a correction's COMMIT, before publishing it");
        std::process::abort();
    }
    let unpublished = Unpublished {
        run_id: cx.run_id.to_string(),
        account_id: account.to_string(),
        period_from: period.from,
        period_to: period.to,
    };
    publish(pool, ch, &unpublished).await
}

/// Publish every committed correction whose ClickHouse rows may be missing (a run killed
/// between its COMMIT and the end of its insert).
pub async fn publish_pending(pool: &PgPool, ch: &clickhouse::Client) -> anyhow::Result<()> {
    for u in store::unpublished(pool).await? {
        publish(pool, ch, &u).await?;
    }
    Ok(())
}

/// Insert one account-period's correction rows that ClickHouse does not have yet, then
/// mark them published. Looking first makes a repeat insert nothing, so the hourly
/// rollup counts each row once.
async fn publish(pool: &PgPool, ch: &clickhouse::Client, u: &Unpublished) -> anyhow::Result<()> {
    let rows = store::correction_rows(pool, u).await?;
    let present: HashSet<String> = ch
        .query(
            "SELECT DISTINCT event_id FROM usage_corrections
             WHERE account_id = ? AND run_id = ?
               AND occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')",
        )
        .bind(&u.account_id)
        .bind(&u.run_id)
        .bind(u.period_from.timestamp())
        .bind(u.period_to.timestamp())
        .fetch_all::<String>()
        .await
        .context("looking up published corrections")?
        .into_iter()
        .collect();
    let missing: Vec<&store::PublishedRow> = rows.iter().filter(|r| !present.contains(&r.event_id)).collect();
    if !missing.is_empty() {
        let mut insert = ch.insert::<store::PublishedRow>("usage_corrections").await?;
        for row in missing {
            insert.write(row).await?;
        }
        insert.end().await.context("inserting usage_corrections")?;
    }
    store::mark_published(pool, u).await?;
    Ok(())
}

/// The range and filters, as ClickHouse conditions.
struct Filter {
    from: i64,
    to: i64,
    account: Option<String>,
    model: Option<String>,
}

impl Filter {
    fn new(opts: &RerateOptions) -> Filter {
        Filter {
            from: opts.from.timestamp(),
            to: opts.to.timestamp(),
            account: opts.account.clone(),
            model: opts.model.clone(),
        }
    }

    /// `WHERE` conditions after the time range; binds follow in [`Filter::bind`] order.
    fn conditions(&self) -> String {
        let mut sql =
            String::from("occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')");
        if self.account.is_some() {
            sql.push_str(" AND account_id = ?");
        }
        if self.model.is_some() {
            sql.push_str(" AND (model = ? OR priced_model = ?)");
        }
        sql
    }

    fn bind(&self, mut q: clickhouse::query::Query, from: i64, to: i64) -> clickhouse::query::Query {
        q = q.bind(from).bind(to);
        if let Some(a) = &self.account {
            q = q.bind(a);
        }
        if let Some(m) = &self.model {
            q = q.bind(m).bind(m);
        }
        q
    }

    /// Every account with events in the range, sorted, with how many.
    async fn accounts(
        &self,
        ch: &clickhouse::Client,
    ) -> Result<Vec<AccountEvents>, clickhouse::error::Error> {
        let q = ch.query(&format!(
            "SELECT account_id, count() FROM usage_log WHERE {} GROUP BY account_id ORDER BY account_id",
            self.conditions()
        ));
        self.bind(q, self.from, self.to).fetch_all::<AccountEvents>().await
    }

    /// The range's rows of `accounts` (a contiguous slice of the sorted ids: a key range of
    /// the primary index). No ORDER BY: ClickHouse streams the parts as they are (a sort
    /// tripled its cost), and [`Found`] groups by account and period.
    fn rows(
        &self,
        ch: &clickhouse::Client,
        accounts: &[&str],
    ) -> Result<clickhouse::query::RowCursor<StoredUsage<'static>>, clickhouse::error::Error> {
        let (first, last) = (accounts.first().expect("a group"), accounts.last().expect("a group"));
        let q = ch.query(&format!(
            "SELECT {STORED_USAGE_COLUMNS} FROM usage_log WHERE {} AND account_id >= ? AND account_id <= ?",
            self.conditions()
        ));
        self.bind(q, self.from, self.to).bind(first).bind(last).fetch::<StoredUsage<'static>>()
    }
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct AccountEvents {
    account_id: String,
    events: u64,
}

fn progress_bar(show: bool, total: u64) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events ({per_sec}, eta {eta})")
            .expect("a valid template"),
    );
    bar
}
