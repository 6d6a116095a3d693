//! In-memory quota and balance state, for answering `authorize` and quota reads without a
//! database round trip.
//!
//! **Source of truth and freshness.** Postgres holds the truth: usage buckets are written in
//! the same transaction as the ledger debits of the events they count, balances with every
//! ledger change. Every `tally run` instance keeps a full copy of all accounts' state in
//! memory and refreshes it every `REFRESH_INTERVAL` by reading the rows changed since its
//! last refresh (`updated_at >= last - OVERLAP`). So an instance answers correctly for
//! every account, whichever instance consumed the partition (the multi-instance design:
//! each instance materializes everything, like Kafka Streams' global tables, with Postgres
//! as the changelog). Staleness is bounded by the refresh interval plus commit latency;
//! rows carry absolute totals, so re-reading the overlap is harmless. The overlap (60 s)
//! covers transactions that stamped `updated_at` before committing; a full reload every
//! `FULL_RELOAD_INTERVAL` is the safety net. On start, the state is restored from
//! Postgres (the last 40 days of buckets), never rebuilt by hand.

use super::config::{Cycle, QuotaConfig};
use super::decide::AccountView;
use super::store;
use super::window::{self, Buckets, Totals};
use chrono::{DateTime, Duration, Utc};
use sqlx::PgPool;
use std::collections::HashMap;
use std::sync::RwLock;

pub const REFRESH_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);
const OVERLAP: Duration = Duration::seconds(60);
const FULL_RELOAD_INTERVAL: Duration = Duration::minutes(5);

#[derive(Debug, Clone, Default)]
pub struct AccountState {
    pub balance_units: i64,
    pub reserved_units: i64,
    pub pending_units: i64,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub last_deduction_at: Option<DateTime<Utc>>,
    pub plan: Option<(String, DateTime<Utc>)>,
    /// (kind, key) -> hourly buckets; kinds: account, project, api_key, feature.
    pub usage: HashMap<(String, String), Buckets>,
    /// (scope, scope id) -> monthly cap in units.
    pub limits: HashMap<(String, String), i64>,
}

#[derive(Default)]
struct Inner {
    accounts: HashMap<String, AccountState>,
    /// Start of the last successful refresh (the next one reads changes since it).
    refreshed_from: Option<DateTime<Utc>>,
    last_full: Option<DateTime<Utc>>,
}

/// All accounts' state. `std::sync::RwLock`: readers never hold it across an await.
#[derive(Default)]
pub struct QuotaState {
    inner: RwLock<Inner>,
}

impl QuotaState {
    /// Read changes from Postgres into memory (everything on the first call and every
    /// `FULL_RELOAD_INTERVAL`).
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let started = Utc::now();
        let (since, full) = {
            let inner = self.inner.read().expect("state lock");
            match (inner.refreshed_from, inner.last_full) {
                (Some(from), Some(full)) if started - full < FULL_RELOAD_INTERVAL => (from - OVERLAP, false),
                _ => (DateTime::<Utc>::UNIX_EPOCH, true),
            }
        };
        let oldest = store::retention_start(started);
        let buckets = store::buckets_since(pool, since, oldest).await?;
        let balances = store::balances_since(pool, since).await?;
        let plans = store::plans_since(pool, since).await?;
        let limits = store::limits_since(pool, since).await?;
        let mut inner = self.inner.write().expect("state lock");
        for b in buckets {
            let acct = inner.accounts.entry(b.account_id).or_default();
            let t = Totals { events: b.events, cost_units: b.cost_units };
            acct.usage.entry((b.kind, b.key)).or_default().set(b.hour.timestamp(), t);
        }
        for b in balances {
            let acct = inner.accounts.entry(b.account_id).or_default();
            acct.balance_units = b.balance_units;
            acct.reserved_units = b.reserved_units;
            acct.pending_units = b.pending_units;
            acct.last_purchase_at = b.last_purchase_at;
            acct.last_deduction_at = b.last_deduction_at;
        }
        for p in plans {
            inner.accounts.entry(p.account_id).or_default().plan = Some((p.plan, p.period_anchor));
        }
        for l in limits {
            let acct = inner.accounts.entry(l.account_id).or_default();
            acct.limits.insert((l.scope, l.scope_id), l.monthly_limit_units);
        }
        if full {
            let cutoff = oldest.timestamp();
            for acct in inner.accounts.values_mut() {
                acct.usage.values_mut().for_each(|b| b.prune(cutoff));
                acct.usage.retain(|_, b| !b.is_empty());
            }
            inner.last_full = Some(started);
        }
        inner.refreshed_from = Some(started);
        Ok(())
    }

    pub fn account(&self, account_id: &str) -> Option<AccountState> {
        self.inner.read().expect("state lock").accounts.get(account_id).cloned()
    }

    /// Run `f` on the account's state (a default, empty state if unknown) without cloning.
    pub fn with_account<R>(&self, account_id: &str, f: impl FnOnce(&AccountState) -> R) -> R {
        let inner = self.inner.read().expect("state lock");
        match inner.accounts.get(account_id) {
            Some(a) => f(a),
            None => f(&AccountState::default()),
        }
    }
}

/// The current period of an account: its plan's cycle, or the calendar month.
pub fn period(cfg: &QuotaConfig, acct: &AccountState, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    match (cfg.cycle, &acct.plan) {
        (Cycle::Anchored30d, Some((_, anchor))) => window::anchored_cycle(*anchor, now),
        _ => window::calendar_month(now),
    }
}

/// Spend of one counter in `[from, to)`.
pub fn spent(acct: &AccountState, kind: &str, key: &str, from: DateTime<Utc>, to: DateTime<Utc>) -> Totals {
    acct.usage
        .get(&(kind.to_string(), key.to_string()))
        .map(|b| b.sum(window::floor_hour(from), to.timestamp()))
        .unwrap_or_default()
}

/// The tier used for quotas: the plan name, or `free` without a plan.
pub fn tier(acct: &AccountState) -> &str {
    acct.plan.as_ref().map_or("free", |(p, _)| p.as_str())
}

/// What an authorize request is about.
pub struct Ask<'a> {
    pub api_key_id: Option<&'a str>,
    pub project_id: Option<&'a str>,
    pub feature: Option<&'a str>,
}

/// Build the pure decision's view of an account at `now`.
pub fn view<'c>(
    cfg: &'c QuotaConfig,
    acct: &AccountState,
    ask: &Ask<'_>,
    now: DateTime<Utc>,
) -> AccountView<'c> {
    let (start, end) = period(cfg, acct, now);
    let plan = acct.plan.as_ref().and_then(|(name, _)| cfg.plans.get(name));
    let feature_quota = ask.feature.and_then(|f| {
        let limit = cfg.quota(f, tier(acct))?;
        let (from, to) = window::rolling_window(now);
        let used =
            acct.usage.get(&("feature".to_string(), f.to_string())).map_or(0, |b| b.sum(from, to).events);
        Some((u64::try_from(used).unwrap_or(0), limit))
    });
    let mut spend_caps = Vec::new();
    let mut cap = |scope: &'static str, kind: &str, id: &str| {
        if let Some(limit) = acct.limits.get(&(kind.to_string(), id.to_string())).copied()
            && limit < i64::MAX
        {
            spend_caps.push((scope, spent(acct, kind, id, start, end).cost_units, limit));
        }
    };
    cap("account", "account", "");
    if let Some(p) = ask.project_id {
        cap("project", "project", p);
    }
    if let Some(k) = ask.api_key_id {
        cap("api key", "api_key", k);
    }
    AccountView {
        balance_units: acct.balance_units,
        reserved_units: acct.reserved_units,
        pending_units: acct.pending_units,
        plan,
        period_consumed_units: spent(acct, "account", "", start, end).cost_units,
        feature_quota,
        spend_caps,
    }
}
