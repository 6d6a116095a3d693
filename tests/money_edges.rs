//! Money arithmetic at the `i64` edges (pure: no servers). Tests run with overflow checks
//! (the debug profile, and since 2026-12-05 the release profile too), so any wrap in the
//! code under test is a panic here, not a silently wrong balance.

use proptest::prelude::*;
use tally::money::{self, INPUT_UNITS_MAX, effective_units, exact_units};
use tally::quota::config::{OveragePolicy, Plan};
use tally::quota::decide::{AccountView, decide, soft_ceiling};
use tally::quota::window::{Buckets, HOUR_SECS, Totals};

/// Values that find wraps: the edges, their neighbours, and anything in between.
fn edgy() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(i64::MIN),
        Just(i64::MIN + 1),
        Just(-1i64),
        Just(0i64),
        Just(1i64),
        Just(INPUT_UNITS_MAX),
        Just(i64::MAX - 1),
        Just(i64::MAX),
        any::<i64>(),
    ]
}

fn plan(policy: OveragePolicy, allocation_units: i64) -> Plan {
    Plan {
        name: "p".into(),
        rank: 1,
        allocation_units,
        policy,
        soft_limit_percent: 120,
        self_serve: true,
        models: Default::default(),
    }
}

proptest! {
    #[test]
    fn effective_balance_is_exact_or_clamped_never_wrapped(b in edgy(), r in edgy(), p in edgy()) {
        let exact = i128::from(b) - i128::from(r) - i128::from(p);
        let e = effective_units(b, r, p);
        prop_assert_eq!(i128::from(e), exact.clamp(i128::from(i64::MIN), i128::from(i64::MAX)));
    }

    /// A prepaid account is allowed only when its true (unwrapped) effective balance covers
    /// the estimate: huge holds can never flip an overdrawn account to "allowed".
    #[test]
    fn prepaid_authorize_never_allows_beyond_the_true_effective_balance(
        b in edgy(), r in edgy(), p in edgy(), estimate in edgy(),
    ) {
        let view = AccountView { balance_units: b, reserved_units: r, pending_units: p, ..AccountView::default() };
        let d = decide(&view, None, estimate);
        let exact = i128::from(b) - i128::from(r) - i128::from(p);
        if d.allowed {
            prop_assert!(exact > 0 && exact >= i128::from(estimate.max(0)), "allowed with {exact} for {estimate}");
        }
        prop_assert!(d.overage.overage_amount >= 0);
    }

    #[test]
    fn plan_authorize_and_caps_never_wrap(
        allocation in edgy(), consumed in edgy(), estimate in edgy(), spent in edgy(), cap in edgy(),
        used in any::<u64>(), limit in any::<u64>(), policy in 0..3u8,
    ) {
        let policy = [OveragePolicy::HardLimit, OveragePolicy::SoftLimit, OveragePolicy::Warn][policy as usize];
        let p = plan(policy, allocation);
        let view = AccountView {
            plan: Some(std::borrow::Cow::Borrowed(&p)),
            period_consumed_units: consumed,
            feature_quota: Some((used, limit)),
            spend_caps: vec![("account", spent, cap)],
            ..AccountView::default()
        };
        let d = decide(&view, Some("f"), estimate);
        if d.allowed {
            prop_assert!(used < limit, "a used-up quota is refused");
            prop_assert!(i128::from(spent) + i128::from(estimate.max(0)) <= i128::from(cap), "a cap is never passed");
        }
        prop_assert!(d.overage.overage_amount >= 0);
        let _ = soft_ceiling(allocation, 120);
    }

    /// Buckets saturate instead of wrapping, whatever the increments.
    #[test]
    fn bucket_sums_saturate(increments in proptest::collection::vec((0i64..48, edgy(), edgy()), 1..40)) {
        let mut b = Buckets::default();
        let mut exact: (i128, i128) = (0, 0);
        for (h, events, cost) in &increments {
            b.add(h * HOUR_SECS, Totals { events: *events, cost_units: *cost });
            exact.0 += i128::from(*events);
            exact.1 += i128::from(*cost);
        }
        let t = b.sum(0, 48 * HOUR_SECS);
        let fits = |x: i128| i64::try_from(x).is_ok();
        // Exact whenever the true sum and every partial sum stay in range; otherwise the
        // call must simply not panic (saturation is the documented behaviour).
        if fits(exact.0) && increments.iter().all(|i| i.1.unsigned_abs() < 1 << 50) {
            prop_assert_eq!(i128::from(t.events), exact.0);
        }
    }
}

#[test]
fn money_inputs_above_the_bound_are_refused_at_the_edge() {
    use rust_decimal::Decimal;
    let max = Decimal::from(money::INPUT_USD_MAX);
    assert_eq!(exact_units(max), Ok(INPUT_UNITS_MAX));
    assert_eq!(exact_units(-max), Ok(-INPUT_UNITS_MAX));
    assert!(exact_units(max + Decimal::new(1, 8)).unwrap_err().contains("largest accepted amount"));
    assert!(exact_units(Decimal::from(92_233_720_368i64)).is_err(), "just past i64 units");
}
