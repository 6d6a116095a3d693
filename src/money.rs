//! Money: one internal integer unit, one rounding rule.
//!
//! **Unit.** Every amount Tally stores or moves is an `i64` count of *micro-cents*:
//! 1 USD = 100,000,000 units (1e-8 USD), Brievio's `micro_cents`. It divides every
//! coarser unit the seeds use: microdollars (Struere, 100 units), cents and BroomVA
//! credits (1,000,000 units), Brievio credits of $0.005 (500,000 units). `i64` holds
//! +-92 billion USD, far beyond any wallet.
//!
//! **Rounding rule (the only one).** Prices are computed exactly in `rust_decimal`
//! and rounded *once per event* to the internal unit, and every conversion to a coarser
//! unit (microdollars, cents, credits) rounds the same way: **half to even** (banker's
//! rounding, `MidpointNearestEven`). It is unbiased over many events, so a platform
//! neither gains nor loses systematically from rounding. Nothing is ever rounded twice
//! in a row: coarser values are always derived from the exact internal integer.

use rust_decimal::{Decimal, RoundingStrategy};

/// Internal units per US dollar.
pub const UNITS_PER_USD: i64 = 100_000_000;
/// Internal units per microdollar (Struere).
pub const UNITS_PER_MICRODOLLAR: i64 = 100;
/// Internal units per cent (and per BroomVA credit).
pub const UNITS_PER_CENT: i64 = 1_000_000;

/// The rounding strategy named by the module doc. Use this, never another.
pub const ROUNDING: RoundingStrategy = RoundingStrategy::MidpointNearestEven;

/// Decimal digits of the internal unit relative to USD (1e-8).
pub const USD_SCALE: u32 = 8;

/// Exact USD -> internal units, rounding half to even. `None` if it does not fit `i64`.
pub fn usd_to_units(usd: Decimal) -> Option<i64> {
    let units = usd.checked_mul(Decimal::from(UNITS_PER_USD))?.round_dp_with_strategy(0, ROUNDING);
    i64::try_from(units).ok()
}

/// Internal units -> exact USD (no rounding happens: the unit is a power of ten).
pub fn units_to_usd(units: i64) -> Decimal {
    Decimal::new(units, USD_SCALE)
}

/// The largest amount any single money input may carry (an API amount, a hold, a settle,
/// a cap, a top-up, a plan allocation): 1,000,000,000 USD. Far beyond any real call or
/// wallet, and small enough that sums of a few million of them stay inside `i64` (9.2e18
/// units), so arithmetic on inputs that passed this bound cannot wrap.
pub const INPUT_USD_MAX: i64 = 1_000_000_000;
pub const INPUT_UNITS_MAX: i64 = INPUT_USD_MAX * UNITS_PER_USD;

/// USD -> units, refusing amounts finer than the unit (money in must be exact) and
/// magnitudes above [`INPUT_USD_MAX`]. Every money input passes through here at the edge.
pub fn exact_units(usd: Decimal) -> Result<i64, String> {
    let units = usd_to_units(usd).ok_or_else(|| format!("{usd} USD is out of range"))?;
    if units_to_usd(units) != usd {
        return Err(format!("{usd} USD is finer than the ledger unit (1e-8 USD)"));
    }
    if units.unsigned_abs() > INPUT_UNITS_MAX as u64 {
        return Err(format!("{usd} USD is above the largest accepted amount ({INPUT_USD_MAX} USD)"));
    }
    Ok(units)
}

/// `balance - reserved - pending`, computed without overflow and clamped to the `i64`
/// range (a clamp can only make an effective balance look *smaller* than a wrapped one
/// would: never turn an overdrawn account positive).
pub fn effective_units(balance: i64, reserved: i64, pending: i64) -> i64 {
    let e = i128::from(balance) - i128::from(reserved) - i128::from(pending);
    e.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

/// Internal units as a plain USD decimal string with all 8 places, e.g. `"0.00012300"`.
pub fn units_to_usd_string(units: i64) -> String {
    // Integer formatting: the same text as `units_to_usd(units).to_string()` (a test
    // checks it), without building a Decimal per line of `tally price` output.
    const PER_USD: u64 = UNITS_PER_USD as u64;
    let sign = if units < 0 { "-" } else { "" };
    let abs = units.unsigned_abs();
    format!("{sign}{}.{:08}", abs / PER_USD, abs % PER_USD)
}

/// Internal units -> a coarser unit of `units_per` internal units each, half to even.
pub fn units_to_coarse(units: i64, units_per: i64) -> i64 {
    assert!(units_per > 0, "a unit size must be positive");
    let q = Decimal::from(units) / Decimal::from(units_per);
    // |q| <= |units|, so the conversion back to i64 cannot fail.
    i64::try_from(q.round_dp_with_strategy(0, ROUNDING)).expect("quotient fits i64")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    #[test]
    fn usd_strings_match_the_decimal_text() {
        for units in [0, 1, -1, 99_999_999, 100_000_000, -100_000_001, 1_850_000_000, i64::MAX, i64::MIN] {
            assert_eq!(units_to_usd_string(units), units_to_usd(units).to_string(), "{units}");
        }
    }

    #[test]
    fn usd_round_trip_is_exact() {
        let d = Decimal::from_str("12.34567891").unwrap();
        assert_eq!(usd_to_units(d), Some(1_234_567_891));
        assert_eq!(units_to_usd_string(1_234_567_891), "12.34567891");
    }

    #[test]
    fn half_to_even_on_the_internal_unit() {
        assert_eq!(usd_to_units(Decimal::from_str("0.000000005").unwrap()), Some(0));
        assert_eq!(usd_to_units(Decimal::from_str("0.000000015").unwrap()), Some(2));
        assert_eq!(usd_to_units(Decimal::from_str("0.0000000151").unwrap()), Some(2));
        assert_eq!(usd_to_units(Decimal::from_str("0.0000000149").unwrap()), Some(1));
    }

    #[test]
    fn coarse_units_round_half_to_even() {
        assert_eq!(units_to_coarse(150, UNITS_PER_MICRODOLLAR), 2);
        assert_eq!(units_to_coarse(250, UNITS_PER_MICRODOLLAR), 2);
        assert_eq!(units_to_coarse(-250, UNITS_PER_MICRODOLLAR), -2);
        assert_eq!(units_to_coarse(2_500_001, UNITS_PER_CENT), 3);
    }

    #[test]
    fn overflow_is_refused_not_wrapped() {
        assert_eq!(usd_to_units(Decimal::from(1_000_000_000_000i64)), None);
        assert_eq!(usd_to_units(Decimal::from_str("1e21").unwrap()), None);
        assert_eq!(usd_to_units(Decimal::MAX), None);
    }
}
