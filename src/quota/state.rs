//! In-memory quota and balance state, for answering `authorize` and quota reads without a
//! database round trip.
//!
//! **Source of truth.** Postgres holds the truth: usage buckets are written in the same
//! transaction as the ledger debits of the events they count, balances with every ledger
//! change. Every `tally run` instance keeps a copy of all accounts' state in memory (like
//! Kafka Streams' global tables), so any instance answers for any account.
//!
//! **State follows changes, not rows.** At start the state is restored from one snapshot
//! (`store::read_state` without a cursor). After that the cost of keeping it current is
//! proportional to what changed:
//! - the writer that commits a batch applies that batch's bucket increments to its own
//!   memory right after COMMIT ([`QuotaState::finish_local`]);
//! - every other change arrives through [`QuotaState::refresh`], which reads, in one
//!   REPEATABLE READ snapshot, the `state_changes` rows (bucket increments) and the
//!   balance, plan and cap rows whose xid is at least the xmin of the previous read's
//!   snapshot. A change not visible to that snapshot was made by a transaction that was
//!   running or had not started then, so its xid is >= that xmin, whatever the commit
//!   order: no change is missed. Rows visible before and re-read are either absolute
//!   (balances, plans, caps: re-applying is harmless) or bucket increments, which are
//!   applied once per `change_id` (`Meta::applied` remembers the ids a later read may
//!   still return).
//! - A writer's own change is skipped by the reader while the writer has it in flight
//!   (`Meta::local`), so it is applied exactly once, by whichever comes first.
//! - If a COMMIT's outcome is unknown, or the reads stopped for longer than
//!   `RESTORE_AFTER` (the changelog is pruned after `CHANGES_RETENTION`), the next refresh
//!   restores everything from a snapshot instead of reading changes.
//!
//! Balances, holds, plans and caps in memory are at most one refresh behind Postgres
//! (`REFRESH_INTERVAL` plus commit latency); the balance endpoint reads Postgres itself.
//!
//! **Readers never wait long.** Accounts live in `SHARDS` maps, each behind its own
//! `RwLock`; whoever applies changes takes one shard's write lock at a time, for that
//! shard's share of the change only, so `authorize` stays fast while a batch lands.

use super::config::{CustomTerms, Cycle, Plan, QuotaConfig};
use super::decide::{self, AccountView};
use super::store::{self, StateRead};
use super::window::{self, Buckets, Totals};
use crate::batch::ValidItem;
use crate::ledger::counting::ChangeRef;
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Mutex, RwLock};
use std::time::{Duration, Instant};

pub const REFRESH_INTERVAL: Duration = Duration::from_millis(100);
/// A reader that could not read for this long restores from a snapshot.
const RESTORE_AFTER: Duration = Duration::from_secs(3_600);
/// How long `state_changes` rows are kept (pruned by `tally run`'s housekeeping); well
/// above `RESTORE_AFTER`, so a running reader never misses a pruned change.
pub const CHANGES_RETENTION: chrono::Duration = chrono::Duration::hours(24);

#[derive(Debug, Clone, Default)]
pub struct AccountState {
    pub balance_units: i64,
    pub reserved_units: i64,
    pub pending_units: i64,
    pub last_purchase_at: Option<DateTime<Utc>>,
    pub last_deduction_at: Option<DateTime<Utc>>,
    pub plan: Option<(String, DateTime<Utc>)>,
    /// The account's own terms for its plan (operator-set, enterprise); boxed: rare, and a
    /// million accounts' state must stay small.
    pub custom_terms: Option<Box<CustomTerms>>,
    /// (kind, key) -> hourly buckets; kinds: account, project, api_key, feature.
    pub usage: Counters,
    /// (scope, scope id) -> monthly cap in units.
    pub limits: HashMap<(String, String), i64>,
}

/// An account's usage counters, sorted by (kind, key): a compact vector (one million
/// accounts' state must fit well under 1 GiB), binary-searched by borrowed keys, so a
/// lookup never allocates.
#[derive(Debug, Clone, Default)]
pub struct Counters {
    by_key: Vec<(&'static str, Box<str>, Buckets)>,
}

impl Counters {
    /// The known counter kinds (the `usage_hourly.kind` CHECK constraint).
    fn kind(kind: &str) -> Option<&'static str> {
        ["account", "project", "api_key", "feature"].into_iter().find(|k| *k == kind)
    }

    fn position(&self, kind: &str, key: &str) -> Result<usize, usize> {
        self.by_key.binary_search_by(|(k, ky, _)| (*k, &**ky).cmp(&(kind, key)))
    }

    pub fn get(&self, kind: &str, key: &str) -> Option<&Buckets> {
        self.position(kind, key).ok().map(|i| &self.by_key[i].2)
    }

    /// The counter's buckets, created empty if missing; `None` for an unknown kind.
    pub fn get_or_insert(&mut self, kind: &str, key: &str) -> Option<&mut Buckets> {
        let i = match self.position(kind, key) {
            Ok(i) => i,
            Err(i) => {
                self.by_key.insert(i, (Self::kind(kind)?, key.into(), Buckets::default()));
                i
            }
        };
        Some(&mut self.by_key[i].2)
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_key.is_empty()
    }
}

/// Shards of the account map: a writer applying a batch takes one shard's write lock at a
/// time, so an `authorize` reading another account never waits, and one reading an
/// account of the same shard waits for that shard's share of the batch only.
const SHARDS: usize = 64;

/// Boxed: the maps' slots stay small (a map holds up to twice its length in slots).
type Accounts = HashMap<String, Box<AccountState>>;

/// Which bucket changes are counted here (see the module doc). Held while a change is
/// applied, so deciding and applying are one step; readers never take it.
#[derive(Default)]
struct Meta {
    /// xmin of the snapshot the accounts were restored from: a change with a smaller xid
    /// committed before it and is already counted.
    restored_xmin: i64,
    /// change_id -> xid of bucket changes counted here that a later read may still return
    /// (xid >= the last read's xmin).
    applied: HashMap<i64, i64>,
    /// Changes this process's writer made and will apply itself after COMMIT: change_id ->
    /// xid.
    local: HashMap<i64, i64>,
    /// Every transaction with a smaller xid is counted here (or never counted anything):
    /// the xmin of the last read applied, 0 when unsure (see [`QuotaState::counted`]).
    counted_below: i64,
}

/// Where the next refresh reads from.
#[derive(Default)]
struct Cursor {
    /// xmin of the last read's snapshot; `None`: restore from a snapshot.
    xmin: Option<i64>,
    read_at: Option<Instant>,
}

/// All accounts' state. `std::sync` locks: never held across an await, and writers hold
/// a shard's lock only to apply what was already read, so `authorize` never waits behind
/// a query.
pub struct QuotaState {
    shards: Box<[RwLock<Accounts>]>,
    meta: Mutex<Meta>,
    cursor: tokio::sync::Mutex<Cursor>,
}

impl Default for QuotaState {
    fn default() -> Self {
        QuotaState {
            shards: (0..SHARDS).map(|_| RwLock::new(Accounts::new())).collect(),
            meta: Mutex::new(Meta::default()),
            cursor: tokio::sync::Mutex::new(Cursor::default()),
        }
    }
}

fn shard_of(account_id: &str) -> usize {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    account_id.hash(&mut h);
    (h.finish() % SHARDS as u64) as usize
}

impl QuotaState {
    /// Catch up with Postgres: read what changed since the last read (everything on the
    /// first call, after an unknown commit outcome, or after a long gap).
    pub async fn refresh(&self, pool: &PgPool) -> Result<(), sqlx::Error> {
        let mut cursor = self.cursor.lock().await;
        let since = match (cursor.xmin, cursor.read_at) {
            (Some(x), Some(at)) if at.elapsed() < RESTORE_AFTER => Some(x),
            _ => None,
        };
        let mut fresh: Vec<Accounts> =
            if since.is_none() { (0..SHARDS).map(|_| Accounts::new()).collect() } else { Vec::new() };
        let oldest = store::retention_start(Utc::now());
        // Safe to leave out: each of these is counted by the time it could matter (applied
        // already, or the writer applies it after COMMIT or finds it never committed), which
        // is exactly why `apply_read` would skip it.
        let known: Vec<i64> = if since.is_some() {
            let meta = self.meta.lock().expect("state meta lock");
            meta.local.keys().chain(meta.applied.keys()).copied().collect()
        } else {
            Vec::new()
        };
        let read = store::read_state(pool, since, &known, oldest, |r| match r {
            store::Restored::Bucket(b) => {
                let acct = fresh[shard_of(&b.account_id)].entry(b.account_id).or_default();
                let t = Totals { events: b.events, cost_units: b.cost_units };
                if let Some(buckets) = acct.usage.get_or_insert(&b.kind, &b.key) {
                    buckets.set(b.hour, t);
                }
            }
            // Changes not folded into usage_hourly yet, on top of its totals (all of them
            // are in `applied` too when their xid is at or above the snapshot's xmin).
            store::Restored::Change(c) => for_change_rows(&c, |i| {
                apply_increment(
                    &mut fresh[shard_of(&c.accounts[i])],
                    &c.accounts[i],
                    &c.kinds[i],
                    &c.keys[i],
                    c.hours[i],
                    Totals { events: c.events[i], cost_units: c.costs[i] },
                );
            }),
        })
        .await?;
        let xmin = read.xmin;
        if since.is_some() {
            self.apply_read(read);
        } else {
            self.restore(read, fresh);
        }
        cursor.xmin = Some(xmin);
        cursor.read_at = Some(Instant::now());
        Ok(())
    }

    /// Replace everything with a full read, its buckets and unfolded changes already in
    /// `fresh` (keeping the writer's in-flight changes).
    fn restore(&self, read: StateRead, mut fresh: Vec<Accounts>) {
        assert_eq!(fresh.len(), SHARDS, "a restore fills every shard");
        debug_assert!(read.changes.is_empty(), "a full read streams its changes (applied above)");
        for (shard, rows) in fresh.iter_mut().zip(rows_by_shard(&read)) {
            apply_rows(shard, &read, &rows);
        }
        let mut meta = self.meta.lock().expect("state meta lock");
        meta.restored_xmin = read.xmin;
        meta.counted_below = read.xmin;
        meta.applied = read.changes_included.iter().copied().collect();
        for (lock, accounts) in self.shards.iter().zip(fresh) {
            *lock.write().expect("state lock") = accounts;
        }
    }

    /// Apply an incremental read: new bucket changes once each, changed rows as they are.
    fn apply_read(&self, read: StateRead) {
        let mut meta = self.meta.lock().expect("state meta lock");
        let mut by_shard: Vec<Vec<(usize, usize)>> = vec![Vec::new(); SHARDS];
        for (n, c) in read.changes.iter().enumerate() {
            if meta.local.contains_key(&c.change_id) || meta.applied.contains_key(&c.change_id) {
                continue;
            }
            for_change_rows(c, |i| by_shard[shard_of(&c.accounts[i])].push((n, i)));
            meta.applied.insert(c.change_id, c.xid);
        }
        let rows = rows_by_shard(&read);
        for (s, lock) in self.shards.iter().enumerate() {
            if by_shard[s].is_empty() && rows[s].is_empty() {
                continue;
            }
            let mut shard = lock.write().expect("state lock");
            for (n, i) in &by_shard[s] {
                let c = &read.changes[*n];
                let i = *i;
                let t = Totals { events: c.events[i], cost_units: c.costs[i] };
                apply_increment(&mut shard, &c.accounts[i], &c.kinds[i], &c.keys[i], c.hours[i], t);
            }
            apply_rows(&mut shard, &read, &rows[s]);
        }
        // Reads from now on ask for xid >= read.xmin: older ids can never come back. A
        // restored id the writer still holds stays until the writer has looked at it.
        let Meta { applied, local, counted_below, .. } = &mut *meta;
        applied.retain(|id, xid| *xid >= read.xmin || local.contains_key(id));
        // A transaction below this xmin had finished at the snapshot: its change was in
        // this read or an earlier one (counted), or is the writer's own and still in
        // `local` (counted() checks that first).
        *counted_below = read.xmin;
    }

    /// Whether the usage counted by transaction `xid` (a `state_changes` row with that xid,
    /// if it wrote one) is in this instance's counters. `false` when unsure: a holding
    /// authorize then counts the hold that transaction closed, which can only refuse
    /// earlier, never admit more (see `api::quota`).
    pub fn counted(&self, xid: i64) -> bool {
        let meta = self.meta.lock().expect("state meta lock");
        if meta.local.values().any(|x| *x == xid) {
            return false;
        }
        xid < meta.counted_below || meta.applied.values().any(|x| *x == xid)
    }

    /// Transactions from this xid on may not be counted here: the lower bound of what a
    /// holding authorize must look at.
    pub fn counted_below(&self) -> i64 {
        let meta = self.meta.lock().expect("state meta lock");
        let local_min = meta.local.values().copied().min().unwrap_or(i64::MAX);
        meta.counted_below.min(local_min)
    }

    /// The writer wrote `change` in a transaction it is about to commit: the reader must
    /// leave it to the writer (see the module doc).
    pub fn begin_local(&self, change: ChangeRef) {
        self.meta.lock().expect("state meta lock").local.insert(change.change_id, change.xid);
    }

    /// The writer's transaction with `change` committed: apply its events' usage here,
    /// now, unless a restore already counted it. Straight from the events (the same rule
    /// as `ledger::counting::usage_increments`, without building the aggregate again).
    pub fn finish_local(&self, change: ChangeRef, new_events: &[ValidItem]) {
        let mut meta = self.meta.lock().expect("state meta lock");
        meta.local.remove(&change.change_id);
        if change.xid < meta.restored_xmin || meta.applied.contains_key(&change.change_id) {
            return;
        }
        let mut by_shard: Vec<Vec<&ValidItem>> = vec![Vec::new(); SHARDS];
        for v in new_events {
            by_shard[shard_of(&v.event.account_id)].push(v);
        }
        for (lock, events) in self.shards.iter().zip(by_shard) {
            if events.is_empty() {
                continue;
            }
            let mut shard = lock.write().expect("state lock");
            for v in events {
                let hour = window::floor_hour(v.event.occurred_at);
                let t = Totals { events: 1, cost_units: v.charge.cost_units };
                for (kind, key) in crate::ledger::counting::counters_of(v) {
                    apply_increment(&mut shard, &v.event.account_id, kind, key, hour, t);
                }
            }
        }
        meta.applied.insert(change.change_id, change.xid);
    }

    /// The writer's transaction with `change` did not commit (`committed_maybe`: or we
    /// cannot tell, e.g. the connection died during COMMIT; then the next refresh
    /// restores from a snapshot, which counts the change if it did commit).
    pub async fn abandon_local(&self, change: ChangeRef, committed_maybe: bool) {
        if committed_maybe {
            self.cursor.lock().await.xmin = None;
        }
        let mut meta = self.meta.lock().expect("state meta lock");
        meta.local.remove(&change.change_id);
        if committed_maybe {
            // It may have committed uncounted: nothing is known counted until the restore.
            meta.counted_below = 0;
        }
    }

    pub fn account(&self, account_id: &str) -> Option<AccountState> {
        self.shards[shard_of(account_id)].read().expect("state lock").get(account_id).map(|a| (**a).clone())
    }

    /// Run `f` on the account's state (a default, empty state if unknown) without cloning.
    pub fn with_account<R>(&self, account_id: &str, f: impl FnOnce(&AccountState) -> R) -> R {
        let shard = self.shards[shard_of(account_id)].read().expect("state lock");
        match shard.get(account_id) {
            Some(a) => f(a),
            None => f(&AccountState::default()),
        }
    }

    /// Accounts held in memory (metrics, benches).
    pub fn accounts_len(&self) -> usize {
        self.shards.iter().map(|s| s.read().expect("state lock").len()).sum()
    }
}

fn account_mut<'a>(accounts: &'a mut Accounts, id: &str) -> &'a mut AccountState {
    if !accounts.contains_key(id) {
        accounts.insert(id.to_string(), Box::default());
    }
    accounts.get_mut(id).expect("inserted above")
}

/// Call `f` with each element index of one `state_changes` row (arrays checked parallel).
fn for_change_rows(c: &store::ChangeRow, mut f: impl FnMut(usize)) {
    let n = c.accounts.len();
    let aligned = [c.kinds.len(), c.keys.len(), c.hours.len(), c.events.len(), c.costs.len()];
    assert!(
        aligned.iter().all(|len| *len == n),
        "state_changes arrays are parallel (change {})",
        c.change_id
    );
    (0..n).for_each(&mut f);
}

fn apply_increment(accounts: &mut Accounts, account: &str, kind: &str, key: &str, hour: i64, t: Totals) {
    let acct = account_mut(accounts, account);
    if let Some(buckets) = acct.usage.get_or_insert(kind, key) {
        buckets.add(hour, t);
    }
}

/// Indexes of one shard's balance, plan and cap rows in a read.
#[derive(Debug, Default, Clone)]
struct ShardRows {
    balances: Vec<usize>,
    plans: Vec<usize>,
    limits: Vec<usize>,
}

impl ShardRows {
    fn is_empty(&self) -> bool {
        self.balances.is_empty() && self.plans.is_empty() && self.limits.is_empty()
    }
}

fn rows_by_shard(read: &StateRead) -> Vec<ShardRows> {
    let mut out = vec![ShardRows::default(); SHARDS];
    read.balances.iter().enumerate().for_each(|(i, b)| out[shard_of(&b.account_id)].balances.push(i));
    read.plans.iter().enumerate().for_each(|(i, p)| out[shard_of(&p.account_id)].plans.push(i));
    read.limits.iter().enumerate().for_each(|(i, l)| out[shard_of(&l.account_id)].limits.push(i));
    out
}

/// Balances, plans and caps: rows hold absolute values.
fn apply_rows(accounts: &mut Accounts, read: &StateRead, rows: &ShardRows) {
    for b in rows.balances.iter().map(|i| &read.balances[*i]) {
        let acct = account_mut(accounts, &b.account_id);
        acct.balance_units = b.balance_units;
        acct.reserved_units = b.reserved_units;
        acct.pending_units = b.pending_units;
        acct.last_purchase_at = b.last_purchase_at;
        acct.last_deduction_at = b.last_deduction_at;
    }
    for p in rows.plans.iter().map(|i| &read.plans[*i]) {
        let acct = account_mut(accounts, &p.account_id);
        acct.plan = Some((p.plan.clone(), p.period_anchor));
        acct.custom_terms = p.custom_terms().map(Box::new);
    }
    for l in rows.limits.iter().map(|i| &read.limits[*i]) {
        let acct = account_mut(accounts, &l.account_id);
        acct.limits.insert((l.scope.clone(), l.scope_id.clone()), l.monthly_limit_units);
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
    acct.usage.get(kind, key).map(|b| b.sum(window::floor_hour(from), to.timestamp())).unwrap_or_default()
}

/// The account's plan with its custom terms, if it has a plan the catalog knows.
pub fn plan<'a>(cfg: &'a QuotaConfig, acct: &AccountState) -> Option<Cow<'a, Plan>> {
    let base = acct.plan.as_ref().and_then(|(name, _)| cfg.plans.get(name))?;
    Some(base.with_terms(acct.custom_terms.as_deref()))
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
    let plan = plan(cfg, acct);
    let feature_quota = ask.feature.and_then(|f| {
        let limit = cfg.quota(f, tier(acct))?;
        let (from, to) = window::rolling_window(now);
        let used = acct.usage.get("feature", f).map_or(0, |b| b.sum(from, to).events);
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
    let period_consumed_units = match &plan {
        Some(p) => decide::plan_consumed(
            p,
            crate::money::effective_units(acct.balance_units, acct.reserved_units, acct.pending_units),
        ),
        None => spent(acct, "account", "", start, end).cost_units,
    };
    AccountView {
        balance_units: acct.balance_units,
        reserved_units: acct.reserved_units,
        pending_units: acct.pending_units,
        plan,
        period_consumed_units,
        feature_quota,
        spend_caps,
    }
}
