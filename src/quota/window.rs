//! Time windows and periods, by event time, at hourly resolution. Pure.
//!
//! **Buckets.** Usage is counted in hourly buckets keyed by the hour's start (UTC epoch
//! seconds, a multiple of 3600). An event at time `t` is in bucket `floor_hour(t)`.
//!
//! **Rolling window** (tier quotas): the current hour's bucket and the 719 before it, i.e.
//! 30 days of buckets, `[floor_hour(now) - 719 h, floor_hour(now) + 1 h)`. An event stops
//! counting when its bucket leaves the window: at the latest 30 days after its hour
//! started, so an event 30 days + 1 hour old never counts (and one 29 days 23 hours old
//! always does).
//!
//! **Periods** (spend limits, plan allocations): calendar months reset on the 1st at
//! 00:00 UTC; or 30-day cycles from an anchor (BroomVA's subscription date), with the
//! anchor rounded down to its hour so periods align with buckets.

use chrono::{DateTime, Datelike, Duration, TimeZone, Utc};

pub use crate::ledger::counting::{HOUR_SECS, floor_hour};
/// 30 days of hourly buckets.
pub const WINDOW_HOURS: i64 = 720;
/// Hours of buckets a counter keeps in memory behind its newest one: 40 days covers the
/// rolling window, any calendar month and any 30-day cycle.
pub const SPAN_HOURS_MAX: i64 = 40 * 24;

/// `[start, end)` of the rolling window at `now`, as bucket keys.
pub fn rolling_window(now: DateTime<Utc>) -> (i64, i64) {
    let current = floor_hour(now);
    (current - (WINDOW_HOURS - 1) * HOUR_SECS, current + HOUR_SECS)
}

/// `[start, end)` of the calendar month (UTC) containing `now`.
pub fn calendar_month(now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let start = Utc.with_ymd_and_hms(now.year(), now.month(), 1, 0, 0, 0).single().expect("the 1st exists");
    let (y, m) = if now.month() == 12 { (now.year() + 1, 1) } else { (now.year(), now.month() + 1) };
    let end = Utc.with_ymd_and_hms(y, m, 1, 0, 0, 0).single().expect("the 1st exists");
    (start, end)
}

/// `[start, end)` of the 30-day cycle anchored at `anchor` that contains `now`.
pub fn anchored_cycle(anchor: DateTime<Utc>, now: DateTime<Utc>) -> (DateTime<Utc>, DateTime<Utc>) {
    let anchor = DateTime::<Utc>::from_timestamp(floor_hour(anchor), 0).expect("in range");
    let cycle = Duration::days(30);
    let k = (now - anchor).num_seconds().div_euclid(cycle.num_seconds());
    let start = anchor + cycle * (k as i32);
    (start, start + cycle)
}

/// Counts of one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub events: i64,
    pub cost_units: i64,
}

/// Hourly buckets of one counter (an account's spend, a feature's calls, ...): a vector
/// sorted by hour. Most counters hold a few buckets and new ones arrive at the end, so a
/// sorted vector costs a fraction of a tree's memory (one million accounts' state must
/// fit well under 1 GiB) and inserts are appends.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Buckets {
    by_hour: Vec<(i64, Totals)>,
}

impl Buckets {
    /// The slot of `hour`, created (zero) if missing.
    fn slot(&mut self, hour: i64) -> &mut Totals {
        debug_assert_eq!(hour.rem_euclid(HOUR_SECS), 0, "bucket keys are hour starts");
        let i = match self.by_hour.binary_search_by_key(&hour, |(h, _)| *h) {
            Ok(i) => i,
            Err(i) => {
                self.by_hour.insert(i, (hour, Totals::default()));
                i
            }
        };
        &mut self.by_hour[i].1
    }

    /// Set a bucket to absolute totals (what Postgres holds: re-applying is harmless).
    pub fn set(&mut self, hour: i64, totals: Totals) {
        *self.slot(hour) = totals;
    }

    /// Add increments to a bucket (a change another transaction made).
    pub fn add(&mut self, hour: i64, totals: Totals) {
        let slot = self.slot(hour);
        slot.events = slot.events.saturating_add(totals.events);
        slot.cost_units = slot.cost_units.saturating_add(totals.cost_units);
        // Bound memory without a clock: keep at most `SPAN_HOURS_MAX` behind the newest
        // bucket (every window and period reads less than that).
        let newest = self.by_hour.last().map_or(hour, |(h, _)| *h);
        if self.by_hour.first().is_some_and(|(h, _)| *h < newest - SPAN_HOURS_MAX * HOUR_SECS) {
            self.prune(newest - SPAN_HOURS_MAX * HOUR_SECS);
        }
    }

    /// Sum of buckets with `from <= hour < to`.
    pub fn sum(&self, from: i64, to: i64) -> Totals {
        let start = self.by_hour.partition_point(|(h, _)| *h < from);
        self.by_hour[start..].iter().take_while(|(h, _)| *h < to).fold(Totals::default(), |acc, (_, t)| {
            Totals {
                events: acc.events.saturating_add(t.events),
                cost_units: acc.cost_units.saturating_add(t.cost_units),
            }
        })
    }

    /// Drop buckets older than `before` (bounds memory: callers keep ~40 days).
    pub fn prune(&mut self, before: i64) {
        let keep_from = self.by_hour.partition_point(|(h, _)| *h < before);
        self.by_hour.drain(..keep_from);
    }

    pub fn len(&self) -> usize {
        self.by_hour.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_hour.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn an_event_30_days_and_an_hour_old_no_longer_counts() {
        let now = t("2026-11-23T10:20:00Z");
        let (from, to) = rolling_window(now);
        let mut b = Buckets::default();
        let old = now - Duration::days(30) - Duration::hours(1);
        let young = now - Duration::days(29) - Duration::hours(23);
        b.set(floor_hour(old), Totals { events: 1, cost_units: 0 });
        b.set(floor_hour(young), Totals { events: 10, cost_units: 0 });
        b.set(floor_hour(now), Totals { events: 100, cost_units: 0 });
        assert_eq!(b.sum(from, to).events, 110);
        assert_eq!((to - from) / HOUR_SECS, WINDOW_HOURS);
    }

    #[test]
    fn calendar_months_reset_on_the_first_utc() {
        assert_eq!(
            calendar_month(t("2026-12-31T23:59:59Z")),
            (t("2026-12-01T00:00:00Z"), t("2027-01-01T00:00:00Z"))
        );
        assert_eq!(calendar_month(t("2027-01-01T00:00:00Z")).0, t("2027-01-01T00:00:00Z"));
        assert_eq!(calendar_month(t("2028-02-15T00:00:00Z")).1, t("2028-03-01T00:00:00Z"));
    }

    #[test]
    fn anchored_cycles_are_30_days_from_the_subscription_hour() {
        let anchor = t("2026-10-01T09:45:00Z");
        assert_eq!(anchored_cycle(anchor, t("2026-10-20T00:00:00Z")).0, t("2026-10-01T09:00:00Z"));
        let (s, e) = anchored_cycle(anchor, t("2026-11-23T00:00:00Z"));
        assert_eq!((s, e), (t("2026-10-31T09:00:00Z"), t("2026-11-30T09:00:00Z")));
        assert_eq!(anchored_cycle(anchor, t("2026-10-31T09:00:00Z")).0, t("2026-10-31T09:00:00Z"));
    }

    #[test]
    fn prune_keeps_recent_buckets() {
        let mut b = Buckets::default();
        for h in 0..10 {
            b.set(h * HOUR_SECS, Totals { events: 1, cost_units: 1 });
        }
        b.prune(5 * HOUR_SECS);
        assert_eq!((b.len(), b.sum(0, 100 * HOUR_SECS).events), (5, 5));
    }
}
