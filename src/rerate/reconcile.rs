//! `tally ledger reconcile-usage`: the ledger and the usage log must agree on what usage
//! cost, per account and month of event time.
//!
//! Ledger side (Postgres): minus the `consume` entries (each dated at its event's time),
//! minus the re-rating `correction` entries (keyed `rerate:...`, dated at the start of the
//! period they correct). Usage side (ClickHouse): `usage_log` costs (FINAL: one row per
//! event) plus `usage_corrections` deltas. Events billed by a hold at its deadline cost 0
//! in the log and their debit is a `reservation_settle` entry: neither side counts them.

use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::collections::BTreeMap;

/// One account-month where the two sides differ (internal units).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Difference {
    pub account_id: String,
    /// `YYYYMM` of event time, UTC.
    pub month: u32,
    pub ledger_units: i64,
    pub usage_log_units: i64,
}

#[derive(clickhouse::Row, serde::Deserialize)]
struct MonthSum {
    account_id: String,
    month: u32,
    units: i64,
}

pub async fn reconcile(
    pool: &PgPool,
    ch: &clickhouse::Client,
    from: Option<DateTime<Utc>>,
    to: Option<DateTime<Utc>>,
) -> anyhow::Result<Vec<Difference>> {
    let from = from.unwrap_or(DateTime::<Utc>::UNIX_EPOCH);
    let to = to.unwrap_or_else(|| Utc::now() + chrono::Duration::days(3650));
    let ledger: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT account_id, to_char(occurred_at AT TIME ZONE 'UTC', 'YYYYMM')::int AS month,
                (-sum(amount_units))::bigint
         FROM ledger_entries
         WHERE (kind = 'consume' OR (kind = 'correction' AND idempotency_key LIKE 'rerate:%'))
           AND occurred_at >= $1 AND occurred_at < $2
         GROUP BY 1, 2",
    )
    .bind(from)
    .bind(to)
    .fetch_all(pool)
    .await?;
    let mut sides: BTreeMap<(String, u32), (i64, i64)> = BTreeMap::new();
    for (account, month, units) in ledger {
        sides.entry((account, u32::try_from(month).unwrap_or(0))).or_default().0 += units;
    }
    for (table, column) in [("usage_log", "cost_units"), ("usage_corrections", "cost_delta_units")] {
        let rows: Vec<MonthSum> = ch
            .query(&format!(
                "SELECT account_id, toUInt32(toYYYYMM(occurred_at)) AS month, toInt64(sum({column})) AS units
                 FROM {table} FINAL
                 WHERE occurred_at >= toDateTime(?, 'UTC') AND occurred_at < toDateTime(?, 'UTC')
                 GROUP BY account_id, month"
            ))
            .bind(from.timestamp().max(0))
            .bind(to.timestamp().min(i64::from(u32::MAX)))
            .fetch_all()
            .await?;
        for r in rows {
            sides.entry((r.account_id, r.month)).or_default().1 += r.units;
        }
    }
    Ok(sides
        .into_iter()
        .filter(|(_, (ledger, log))| ledger != log)
        .map(|((account_id, month), (ledger_units, usage_log_units))| Difference {
            account_id,
            month,
            ledger_units,
            usage_log_units,
        })
        .collect())
}
