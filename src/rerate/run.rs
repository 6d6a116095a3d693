//! One `tally rerate` run: read the range from ClickHouse account group by account group
//! and period by period, price every event again, correct each account-period that
//! changed, publish the corrections to ClickHouse.

use super::store::{self, Changed, CorrectionContext, Unpublished};
use super::{Period, Report, STORED_USAGE_COLUMNS, StoredUsage, Tally, stored_event};
use crate::pricing::Catalog;
use anyhow::Context;
use chrono::{DateTime, SubsecRound, Utc};
use indicatif::{ProgressBar, ProgressStyle};
use sqlx::PgPool;
use std::collections::HashSet;

/// Accounts read by one ClickHouse query (a contiguous range of the sorted account ids, so
/// the query reads that key range of `usage_log`'s primary index).
const ACCOUNTS_PER_QUERY_MAX: usize = 256;

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
    let accounts = filter.accounts(ch).await.context("listing the range's accounts in ClickHouse")?;
    let progress = progress_bar(opts.progress, filter.count(ch).await?);
    let cx = CorrectionContext {
        run_id: &run_id,
        catalog_version: &version,
        created_by: opts.created_by.as_deref().unwrap_or(""),
        reason: opts.reason.as_deref().unwrap_or(""),
        fault_abort_after_commits: opts.fault_abort_after_commits,
    };
    let mut tally = Tally::default();
    for period in super::periods(opts.from, opts.to) {
        for group in accounts.chunks(ACCOUNTS_PER_QUERY_MAX) {
            let current = store::current_costs(pool, group, &period).await?;
            let mut cursor = filter.rows(ch, group, &period)?;
            let mut account = AccountPeriod::default();
            while let Some(row) = cursor.next().await.context("reading usage_log")? {
                progress.inc(1);
                if row.account_id != account.id {
                    let done = std::mem::replace(&mut account, AccountPeriod::new(&row.account_id));
                    done.finish(pool, ch, &cx, &period, &mut tally, &mut report).await?;
                }
                account.read(row, &opts.catalog, &current, &mut report);
            }
            account.finish(pool, ch, &cx, &period, &mut tally, &mut report).await?;
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

/// One account's rows of one period, as they stream by.
#[derive(Default)]
struct AccountPeriod {
    id: String,
    last_event: String,
    changed: Vec<Changed>,
}

impl AccountPeriod {
    fn new(id: &str) -> AccountPeriod {
        AccountPeriod { id: id.to_string(), ..AccountPeriod::default() }
    }

    fn read(
        &mut self,
        row: StoredUsage,
        catalog: &Catalog,
        current: &std::collections::HashMap<String, (i64, i64)>,
        report: &mut Report,
    ) {
        // Rows come ordered by event id; a repeat is the same event logged twice by a
        // retried insert (identical rows that ReplacingMergeTree has not merged yet).
        if row.event_id == self.last_event {
            return;
        }
        self.last_event.clone_from(&row.event_id);
        report.events_read += 1;
        if row.reason == crate::pricing::ChargeReason::PaidByHold.as_str() {
            report.paid_by_hold_events += 1;
            return;
        }
        let event = match stored_event(&row) {
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
        let before = current.get(&row.event_id).copied().unwrap_or((row.cost_units, row.catalog_cost_units));
        if after.cost_units != before.0 {
            self.changed.push(Changed { row, before, after });
        }
    }

    /// Correct what changed (only events whose batch committed), publish it, count it.
    async fn finish(
        mut self,
        pool: &PgPool,
        ch: &clickhouse::Client,
        cx: &CorrectionContext<'_>,
        period: &Period,
        tally: &mut Tally,
        report: &mut Report,
    ) -> anyhow::Result<()> {
        if self.changed.is_empty() {
            return Ok(());
        }
        let billed: Vec<(&str, i64)> =
            self.changed.iter().map(|c| (c.row.event_id.as_str(), c.row.cost_units)).collect();
        let applied = store::applied_events(pool, &billed).await?;
        let before = self.changed.len();
        self.changed.retain(|c| applied.contains(&c.row.event_id));
        report.pending_events += (before - self.changed.len()) as u64;
        if self.changed.is_empty() {
            return Ok(());
        }
        for c in &self.changed {
            tally.add(&self.id, &c.row.model, c.before.0, c.after.cost_units);
        }
        if report.dry_run {
            return Ok(());
        }
        store::commit_correction(pool, cx, &self.id, period, &self.changed)
            .await
            .with_context(|| format!("correcting {} for {}", self.id, period.label()))?;
        report.entries_posted += 1;
        if cx.fault_abort_after_commits == Some(report.entries_posted) {
            tracing::error!("fault injection: aborting after a correction's COMMIT, before publishing it");
            std::process::abort();
        }
        let unpublished = Unpublished {
            run_id: cx.run_id.to_string(),
            account_id: self.id.clone(),
            period_from: period.from,
            period_to: period.to,
        };
        publish(pool, ch, &unpublished).await
    }
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

    async fn accounts(&self, ch: &clickhouse::Client) -> Result<Vec<String>, clickhouse::error::Error> {
        let q = ch.query(&format!(
            "SELECT DISTINCT account_id FROM usage_log WHERE {} ORDER BY account_id",
            self.conditions()
        ));
        self.bind(q, self.from, self.to).fetch_all::<String>().await
    }

    async fn count(&self, ch: &clickhouse::Client) -> Result<u64, clickhouse::error::Error> {
        let q = ch.query(&format!("SELECT count() FROM usage_log WHERE {}", self.conditions()));
        self.bind(q, self.from, self.to).fetch_one::<u64>().await
    }

    /// The rows of `accounts` (a contiguous slice of the sorted ids) in `period`, ordered
    /// by account and event id.
    fn rows(
        &self,
        ch: &clickhouse::Client,
        accounts: &[String],
        period: &Period,
    ) -> Result<clickhouse::query::RowCursor<StoredUsage>, clickhouse::error::Error> {
        let (first, last) = (accounts.first().expect("a group"), accounts.last().expect("a group"));
        let q = ch.query(&format!(
            "SELECT {STORED_USAGE_COLUMNS} FROM usage_log
             WHERE {} AND account_id >= ? AND account_id <= ?
             ORDER BY account_id, event_id",
            self.conditions()
        ));
        self.bind(q, period.from.timestamp(), period.to.timestamp())
            .bind(first)
            .bind(last)
            .fetch::<StoredUsage>()
    }
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
