//! Burn-down of one account's credit grants: pure logic, no I/O.
//!
//! An account's money is its grants' remainders minus its overdraft:
//!
//! `balance_units = sum(remaining_units of its grants) - overdraft_units`, `overdraft_units >= 0`.
//!
//! - A **debit** (usage, deduction, billed hold, negative adjustment) burns the grants that
//!   may pay it in burn order ([`burn_order`]): lowest priority number first, then
//!   earliest expiry (grants that never expire last), then oldest (lowest grant id). What
//!   no grant can pay goes to the overdraft: usage that happened is always billed.
//! - A **credit** (purchase, promotion, refund, ...) creates a grant; it repays the
//!   overdraft first, so the grant starts with `amount - repaid`.
//! - **Event-time rule:** a grant pays only for debits that occurred strictly before its
//!   `expires_at`. A grant past its deadline keeps its remainder until the expiry job
//!   writes it off (`breakage`), but no debit dated at or after the deadline touches it.
//!
//! The wallet records every grant whose remainder it changed, so the caller writes back
//! exactly those rows, and returns per debit the `(grant_id, delta)` list the journal
//! entry stores (negative deltas: burned).

use chrono::{DateTime, Utc};
use std::collections::BTreeMap;
use std::fmt::Write;

/// A grant with something left, as the writer loads it under the account's balance lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveGrant {
    pub grant_id: i64,
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
    pub remaining_units: i64,
}

/// The burn order key: priority, then earliest expiry (never-expiring last), then oldest.
pub fn burn_order(g: &LiveGrant) -> (i32, bool, Option<DateTime<Utc>>, i64) {
    (g.priority, g.expires_at.is_none(), g.expires_at, g.grant_id)
}

/// The journal's record of one entry's effect on grants: `(grant_id, delta_units)`.
pub type GrantChanges = Vec<(i64, i64)>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WalletError {
    #[error(
        "account {account_id}: grants hold {grants_units} units but the balance is {balance_units} (overdraft would be negative)"
    )]
    Inconsistent { account_id: String, grants_units: i64, balance_units: i64 },
    #[error("amount out of range")]
    OutOfRange,
}

/// One account's grants and overdraft, changed in memory, written back by the caller.
#[derive(Debug, Clone)]
pub struct Wallet {
    /// In burn order. Grants burned to 0 stay (their rows must be written back).
    grants: Vec<LiveGrant>,
    overdraft_units: i64,
    /// grant id -> new remaining, for every grant this wallet changed.
    changed: BTreeMap<i64, i64>,
}

impl Wallet {
    /// `grants`: every grant of the account with `remaining_units > 0`, any order;
    /// `balance_units`: the account's balance under the same lock.
    pub fn new(
        account_id: &str,
        mut grants: Vec<LiveGrant>,
        balance_units: i64,
    ) -> Result<Self, WalletError> {
        let total = grants.iter().try_fold(0i64, |acc, g| {
            assert!(g.remaining_units > 0, "only grants with something left are loaded");
            acc.checked_add(g.remaining_units)
        });
        let total = total.ok_or(WalletError::OutOfRange)?;
        let overdraft_units = total.checked_sub(balance_units).ok_or(WalletError::OutOfRange)?;
        if overdraft_units < 0 {
            return Err(WalletError::Inconsistent {
                account_id: account_id.to_string(),
                grants_units: total,
                balance_units,
            });
        }
        grants.sort_by_key(burn_order);
        Ok(Self { grants, overdraft_units, changed: BTreeMap::new() })
    }

    pub fn overdraft_units(&self) -> i64 {
        self.overdraft_units
    }

    /// Sum of the remainders (spendable or not yet written off).
    pub fn grants_units(&self) -> i64 {
        self.grants.iter().map(|g| g.remaining_units).sum()
    }

    pub fn balance_units(&self) -> i64 {
        self.grants_units() - self.overdraft_units
    }

    /// Burn `amount_units` (> 0) for a debit that occurred at `at`. Returns the burned
    /// grants (negative deltas); the rest went to the overdraft.
    pub fn debit(&mut self, amount_units: i64, at: DateTime<Utc>) -> Result<GrantChanges, WalletError> {
        self.debit_from(&[], amount_units, at)
    }

    /// [`Wallet::debit`], burning the grants `first` before the burn order (a payment's
    /// refund takes back the credit that payment bought).
    pub fn debit_from(
        &mut self,
        first: &[i64],
        amount_units: i64,
        at: DateTime<Utc>,
    ) -> Result<GrantChanges, WalletError> {
        assert!(amount_units > 0, "a debit is positive, got {amount_units}");
        let mut left = amount_units;
        let mut changes = GrantChanges::new();
        // Usually `first` is empty: no allocation, and the burn order as it is.
        let preferred: Vec<usize> =
            first.iter().filter_map(|id| self.grants.iter().position(|g| g.grant_id == *id)).collect();
        let rest = (0..self.grants.len()).filter(|i| !preferred.contains(i));
        for i in preferred.iter().copied().chain(rest) {
            let g = &mut self.grants[i];
            if left == 0 {
                break;
            }
            if g.remaining_units == 0 || g.expires_at.is_some_and(|deadline| at >= deadline) {
                continue;
            }
            let take = left.min(g.remaining_units);
            g.remaining_units -= take;
            left -= take;
            self.changed.insert(g.grant_id, g.remaining_units);
            changes.push((g.grant_id, -take));
        }
        self.overdraft_units = self.overdraft_units.checked_add(left).ok_or(WalletError::OutOfRange)?;
        Ok(changes)
    }

    /// Credit a new grant of `amount_units` (> 0): the overdraft is repaid first. Returns
    /// the grant's starting remainder (`amount - repaid`), which may be 0. The caller has
    /// inserted the grant's row; the wallet only tracks it if something is left.
    pub fn credit(&mut self, grant: LiveGrantSpec, amount_units: i64) -> i64 {
        assert!(amount_units > 0, "a credit is positive, got {amount_units}");
        let repaid = amount_units.min(self.overdraft_units);
        self.overdraft_units -= repaid;
        let remaining_units = amount_units - repaid;
        if remaining_units > 0 {
            let g = LiveGrant {
                grant_id: grant.grant_id,
                priority: grant.priority,
                expires_at: grant.expires_at,
                remaining_units,
            };
            let at = self.grants.partition_point(|x| burn_order(x) < burn_order(&g));
            self.grants.insert(at, g);
        }
        remaining_units
    }

    /// A credit that refunds a debit: the overdraft is repaid first, then each grant that
    /// paid the debit gets back what it paid (`paid`: the grants with what they paid net of
    /// earlier refunds, in the debit's burn order), latest-burned first, never above its
    /// amount, and only while it can still be spent at `at` (before its deadline, not
    /// written off). Returns the grants credited (positive deltas) and what is left over,
    /// which the caller credits as a new grant.
    pub fn give_back(
        &mut self,
        paid: &[PaidGrant],
        amount_units: i64,
        at: DateTime<Utc>,
    ) -> (GrantChanges, i64) {
        assert!(amount_units > 0, "a refund is positive, got {amount_units}");
        let repaid = amount_units.min(self.overdraft_units);
        self.overdraft_units -= repaid;
        let mut left = amount_units - repaid;
        let mut changes = GrantChanges::new();
        for p in paid.iter().rev() {
            if left == 0 {
                break;
            }
            if p.written_off || p.grant.expires_at.is_some_and(|deadline| at >= deadline) {
                continue;
            }
            let current = self
                .grants
                .iter()
                .find(|g| g.grant_id == p.grant.grant_id)
                .map_or(p.grant.remaining_units, |g| g.remaining_units);
            let room = p.amount_units - current;
            let back = left.min(p.paid_units).min(room);
            if back <= 0 {
                continue;
            }
            left -= back;
            let remaining_units = current + back;
            match self.grants.iter_mut().find(|g| g.grant_id == p.grant.grant_id) {
                Some(g) => g.remaining_units = remaining_units,
                None => {
                    let g = LiveGrant { remaining_units, ..p.grant.clone() };
                    let at = self.grants.partition_point(|x| burn_order(x) < burn_order(&g));
                    self.grants.insert(at, g);
                }
            }
            self.changed.insert(p.grant.grant_id, remaining_units);
            changes.push((p.grant.grant_id, back));
        }
        (changes, left)
    }

    /// End everything the account holds (a plan cycle's reset, no rollover): every grant's
    /// remainder to 0 and the overdraft forgiven. Returns the grants' changes (negative);
    /// the caller then credits the new cycle's grant.
    pub fn reset(&mut self) -> GrantChanges {
        let mut changes = GrantChanges::new();
        for g in self.grants.iter_mut().filter(|g| g.remaining_units > 0) {
            changes.push((g.grant_id, -g.remaining_units));
            g.remaining_units = 0;
            self.changed.insert(g.grant_id, 0);
        }
        self.overdraft_units = 0;
        changes
    }

    /// Write off what is left of `grant_id` (its deadline passed). Returns the units
    /// written off (0 if nothing was left).
    pub fn expire(&mut self, grant_id: i64) -> i64 {
        let Some(g) = self.grants.iter_mut().find(|g| g.grant_id == grant_id) else { return 0 };
        let left = g.remaining_units;
        if left > 0 {
            g.remaining_units = 0;
            self.changed.insert(grant_id, 0);
        }
        left
    }

    /// Grants whose remainder changed: (grant id, new remaining), by grant id.
    pub fn changed(&self) -> impl Iterator<Item = (i64, i64)> + '_ {
        self.changed.iter().map(|(id, r)| (*id, *r))
    }
}

/// A grant that paid a debit, as a refund of that debit sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PaidGrant {
    /// The grant now (`remaining_units` as stored; it may be 0).
    pub grant: LiveGrant,
    pub amount_units: i64,
    /// What it paid of the debit, net of earlier refunds of the same debit.
    pub paid_units: i64,
    /// Its remainder was written off at its deadline (`breakage`).
    pub written_off: bool,
}

/// A new grant's burn-order fields (its row exists; its id is known).
#[derive(Debug, Clone, Copy)]
pub struct LiveGrantSpec {
    pub grant_id: i64,
    pub priority: i32,
    pub expires_at: Option<DateTime<Utc>>,
}

/// The journal column's text: `[[grant_id, delta], ...]`, or `None` when no grant changed.
pub fn changes_json(changes: &[(i64, i64)]) -> Option<String> {
    if changes.is_empty() {
        return None;
    }
    let mut s = String::with_capacity(2 + changes.len() * 24);
    s.push('[');
    for (i, (id, delta)) in changes.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        write!(s, "[{id},{delta}]").expect("writing to a String cannot fail");
    }
    s.push(']');
    Some(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0).unwrap()
    }

    fn g(id: i64, priority: i32, expires: Option<i64>, remaining: i64) -> LiveGrant {
        LiveGrant { grant_id: id, priority, expires_at: expires.map(t), remaining_units: remaining }
    }

    #[test]
    fn burns_by_priority_then_expiry_then_age() {
        let grants = vec![
            g(1, 50, None, 100),      // purchase, oldest
            g(2, 10, Some(500), 100), // promotion, expires later
            g(3, 10, Some(100), 100), // promotion, expires first
            g(4, 50, None, 100),      // purchase, newer
        ];
        let mut w = Wallet::new("a", grants, 400).unwrap();
        assert_eq!(w.debit(250, t(0)).unwrap(), vec![(3, -100), (2, -100), (1, -50)]);
        assert_eq!(w.debit(100, t(0)).unwrap(), vec![(1, -50), (4, -50)]);
        assert_eq!(w.balance_units(), 50);
        assert_eq!(w.changed().collect::<Vec<_>>(), vec![(1, 0), (2, 0), (3, 0), (4, 50)]);
    }

    #[test]
    fn one_debit_spans_grants_and_the_overdraft() {
        let mut w = Wallet::new("a", vec![g(1, 10, None, 30)], 30).unwrap();
        assert_eq!(w.debit(100, t(0)).unwrap(), vec![(1, -30)]);
        assert_eq!((w.overdraft_units(), w.balance_units()), (70, -70));
        // The next grant repays the overdraft first.
        let spec = LiveGrantSpec { grant_id: 2, priority: 50, expires_at: None };
        assert_eq!(w.credit(spec, 50), 0);
        assert_eq!((w.overdraft_units(), w.balance_units()), (20, -20));
        let spec = LiveGrantSpec { grant_id: 3, priority: 50, expires_at: None };
        assert_eq!(w.credit(spec, 50), 30);
        assert_eq!((w.overdraft_units(), w.balance_units()), (0, 30));
    }

    #[test]
    fn a_grant_pays_only_for_what_occurred_before_its_deadline() {
        let mut w = Wallet::new("a", vec![g(1, 10, Some(100), 50), g(2, 50, None, 50)], 100).unwrap();
        assert_eq!(w.debit(10, t(99)).unwrap(), vec![(1, -10)]);
        // At the deadline exactly, and after it, grant 1 no longer pays.
        assert_eq!(w.debit(10, t(100)).unwrap(), vec![(2, -10)]);
        assert_eq!(w.debit(50, t(101)).unwrap(), vec![(2, -40)]);
        assert_eq!(w.overdraft_units(), 10);
        // Its remainder is written off once; a second expiry finds nothing.
        assert_eq!(w.expire(1), 40);
        assert_eq!(w.expire(1), 0);
        assert_eq!(w.balance_units(), -10);
    }

    #[test]
    fn a_refund_goes_back_to_the_grants_that_paid_while_they_can_be_spent() {
        // Grant 1 (promotion, deadline t(100)) and grant 2 paid a debit of 80: 50 + 30.
        let mut w = Wallet::new("a", vec![g(2, 50, None, 20)], 20).unwrap();
        let paid = |id: i64, expires: Option<i64>, remaining: i64, amount: i64, paid_units: i64| PaidGrant {
            grant: g(id, if id == 1 { 10 } else { 50 }, expires, remaining),
            amount_units: amount,
            paid_units,
            written_off: false,
        };
        let both = [paid(1, Some(100), 0, 50, 50), paid(2, None, 20, 50, 30)];
        // Latest-burned first: grant 2 gets its 30 back, then grant 1 gets 10 of its 50.
        let (changes, rest) = w.give_back(&both, 40, t(0));
        assert_eq!((changes, rest), (vec![(2, 30), (1, 10)], 0));
        assert_eq!(w.balance_units(), 60);
        // More than was paid: the excess is left for a new grant.
        let both = [paid(1, Some(100), 10, 50, 40), paid(2, None, 50, 50, 0)];
        let (changes, rest) = w.give_back(&both, 100, t(0));
        assert_eq!((changes, rest), (vec![(1, 40)], 60));
        // After its deadline a grant takes nothing back.
        let mut w = Wallet::new("a", vec![], 0).unwrap();
        let (changes, rest) = w.give_back(&[paid(1, Some(100), 0, 50, 50)], 20, t(100));
        assert_eq!((changes, rest), (vec![], 20));
        // An overdraft is repaid first.
        let mut w = Wallet::new("a", vec![], -15).unwrap();
        let (changes, rest) = w.give_back(&[paid(2, None, 0, 50, 50)], 20, t(0));
        assert_eq!((changes, rest, w.overdraft_units()), (vec![(2, 5)], 0, 0));
    }

    #[test]
    fn a_reset_ends_every_grant_and_the_overdraft() {
        let mut w = Wallet::new("a", vec![g(1, 300, None, 30), g(2, 700, None, 5)], 35).unwrap();
        assert_eq!(w.reset(), vec![(1, -30), (2, -5)]);
        assert_eq!((w.balance_units(), w.overdraft_units()), (0, 0));
        let mut w = Wallet::new("a", vec![], -40).unwrap();
        assert_eq!((w.reset(), w.balance_units()), (vec![], 0), "an overdraft is forgiven");
        let spec = LiveGrantSpec { grant_id: 3, priority: 300, expires_at: None };
        assert_eq!(w.credit(spec, 100), 100, "the new allocation starts whole");
    }

    #[test]
    fn a_debit_can_burn_named_grants_first() {
        let mut w = Wallet::new("a", vec![g(1, 10, None, 50), g(2, 700, None, 100)], 150).unwrap();
        assert_eq!(w.debit_from(&[2], 120, t(0)).unwrap(), vec![(2, -100), (1, -20)]);
        assert_eq!(
            w.debit_from(&[2, 9], 40, t(0)).unwrap(),
            vec![(1, -30)],
            "spent or unknown: the burn order"
        );
        assert_eq!(w.overdraft_units(), 10);
    }

    #[test]
    fn inconsistent_state_is_refused_not_guessed() {
        assert!(matches!(
            Wallet::new("a", vec![g(1, 10, None, 5)], 6),
            Err(WalletError::Inconsistent { .. })
        ));
    }

    #[test]
    fn changes_render_as_json_pairs() {
        assert_eq!(changes_json(&[]), None);
        assert_eq!(changes_json(&[(7, -5), (9, 12)]).unwrap(), "[[7,-5],[9,12]]");
        let parsed: Vec<(i64, i64)> = serde_json::from_str(&changes_json(&[(1, i64::MIN)]).unwrap()).unwrap();
        assert_eq!(parsed, vec![(1, i64::MIN)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Debit { units: i64, at: i64 },
        Credit { units: i64, priority: i32, expires: Option<i64> },
        Expire { nth: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (1i64..5_000, 0i64..1_000).prop_map(|(units, at)| Op::Debit { units, at }),
            3 => (1i64..5_000, 0i32..4, proptest::option::of(0i64..1_000))
                .prop_map(|(units, priority, expires)| Op::Credit { units, priority, expires }),
            1 => (0usize..8).prop_map(|nth| Op::Expire { nth }),
        ]
    }

    proptest! {
        /// Balance == grants - overdraft after every step; no grant negative; every debit
        /// burns in burn order (a grant is touched only when every eligible grant before it
        /// is exhausted); the returned changes account for every unit.
        #[test]
        fn burn_down_invariants(ops in proptest::collection::vec(op(), 1..60)) {
            let mut w = Wallet::new("a", vec![], 0).unwrap();
            let mut balance = 0i64;
            let mut next_id = 1i64;
            let mut ids = Vec::new();
            for op in ops {
                match op {
                    Op::Debit { units, at } => {
                        let before = w.grants.clone();
                        let changes = w.debit(units, t(at)).unwrap();
                        let burned: i64 = changes.iter().map(|(_, d)| -d).sum();
                        prop_assert!(burned <= units);
                        balance -= units;
                        // Burn order: every eligible grant ahead of the last one touched is empty now.
                        if let Some((last, _)) = changes.last() {
                            let eligible = |g: &LiveGrant| g.expires_at.is_none_or(|d| t(at) < d);
                            for b in before.iter().take_while(|b| b.grant_id != *last).filter(|b| eligible(b)) {
                                let now = w.grants.iter().find(|x| x.grant_id == b.grant_id).unwrap();
                                prop_assert_eq!(now.remaining_units, 0);
                            }
                        }
                        if burned < units {
                            // Overdraft only once every eligible grant is empty.
                            prop_assert!(w.grants.iter().all(|g| g.remaining_units == 0
                                || g.expires_at.is_some_and(|d| t(at) >= d)));
                        }
                    }
                    Op::Credit { units, priority, expires } => {
                        let spec = LiveGrantSpec { grant_id: next_id, priority, expires_at: expires.map(t) };
                        ids.push(next_id);
                        next_id += 1;
                        let left = w.credit(spec, units);
                        prop_assert!((0..=units).contains(&left));
                        balance += units;
                    }
                    Op::Expire { nth } => {
                        if let Some(id) = ids.get(nth) {
                            balance -= w.expire(*id);
                        }
                    }
                }
                prop_assert!(w.grants.iter().all(|g| g.remaining_units >= 0));
                prop_assert!(w.overdraft_units() >= 0);
                prop_assert_eq!(w.balance_units(), balance);
                let mut sorted = w.grants.clone();
                sorted.sort_by_key(burn_order);
                prop_assert_eq!(&sorted, &w.grants);
            }
        }
    }
}
