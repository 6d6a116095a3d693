//! Exact fixed-point arithmetic for prices, and the one rounding step.
//!
//! Why not `Decimal` all the way: a `Decimal` holds a 96-bit mantissa, and when a product
//! needs more, rust_decimal silently drops low digits. A count times a rate can need more
//! (10^12 tokens times a rate with 17 significant digits), and a silently rounded
//! intermediate followed by the final half-to-even step is a double rounding. So:
//!
//! - at load, every rate (times its multiplier and markup) is converted, exactly or not at
//!   all, into a whole number of **atoms** per unit of usage: 1 atom = 1e-20 USD;
//! - per event, costs are summed in `i128` atoms: exact, and overflow is checked;
//! - [`round_usd_to_units`] rounds the exact sum to internal units once, with
//!   [`money::ROUNDING`] applied by rust_decimal.

use crate::money;
use rust_decimal::Decimal;

/// Decimal places of one atom relative to USD: 1 atom = 1e-20 USD = 1e-12 internal units.
pub(crate) const ATOM_SCALE: u32 = 20;
/// A rate given per 1M of something becomes atoms per single unit at this scale
/// (USD per 1M x 10^14 = USD per unit x 10^20).
pub(crate) const PER_1M_SCALE: u32 = ATOM_SCALE - 6;

/// A non-negative exact decimal `mantissa x 10^-scale`. The `i128` mantissa is wider than
/// `Decimal`'s, so a rate x multiplier x markup product stays exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Exact {
    mantissa: i128,
    scale: u32,
}

impl Exact {
    pub(crate) const ONE: Exact = Exact { mantissa: 1, scale: 0 };

    /// `None` for a negative value: every price quantity is `>= 0`.
    pub(crate) fn from_decimal(d: Decimal) -> Option<Exact> {
        let mantissa = d.mantissa();
        if mantissa < 0 {
            return None;
        }
        Some(Exact { mantissa, scale: d.scale() }.reduced())
    }

    pub(crate) fn from_int(v: i128) -> Exact {
        Exact { mantissa: v, scale: 0 }
    }

    /// The exact product, or `None` when it does not fit 128 bits.
    pub(crate) fn checked_mul(self, other: Exact) -> Option<Exact> {
        let mantissa = self.mantissa.checked_mul(other.mantissa)?;
        let scale = self.scale.checked_add(other.scale)?;
        Some(Exact { mantissa, scale }.reduced())
    }

    pub(crate) fn mantissa(self) -> i128 {
        self.mantissa
    }

    pub(crate) fn scale(self) -> u32 {
        self.scale
    }

    /// The value as a whole number of `10^-scale`, or `None` if that would lose a digit or
    /// overflow. This is the load-time gate: a rate Tally cannot hold exactly is refused.
    pub(crate) fn to_fixed(self, scale: u32) -> Option<i128> {
        if self.scale <= scale {
            let factor = 10i128.checked_pow(scale - self.scale)?;
            return self.mantissa.checked_mul(factor);
        }
        let divisor = 10i128.checked_pow(self.scale - scale)?;
        (self.mantissa % divisor == 0).then_some(self.mantissa / divisor)
    }

    /// For error messages only.
    pub(crate) fn to_plain_string(self) -> String {
        match Decimal::try_from_i128_with_scale(self.mantissa, self.scale) {
            Ok(d) => d.normalize().to_string(),
            Err(_) => format!("{}e-{}", self.mantissa, self.scale),
        }
    }

    /// Strip trailing zeros so repeated products keep small mantissas.
    fn reduced(mut self) -> Exact {
        while self.scale > 0 && self.mantissa % 10 == 0 {
            self.mantissa /= 10;
            self.scale -= 1;
        }
        self
    }
}

/// Round the exact USD amount `mantissa x 10^-scale` (>= 0) to internal units, half to
/// even ([`money::ROUNDING`]): the single rounding an event's cost goes through.
///
/// The amounts here are `i128` atoms (up to ~1.7e38) or `upstream x markup` products with
/// up to 34 decimal places; neither always fits a `Decimal` (96-bit mantissa, 28 places),
/// so they cannot be handed to `money::usd_to_units`. Instead the whole part is split off
/// in `i128`, and rust_decimal rounds only the fractional tail plus the parity of the whole
/// part (all that half-to-even looks at) with `money::ROUNDING`: the same rule, exact for
/// any amount that fits `i64` units. Tests check it agrees with `money::usd_to_units`
/// wherever that applies. `None` when the result does not fit (or for a negative amount).
pub(crate) fn round_usd_to_units(mantissa: i128, scale: u32) -> Option<i64> {
    if mantissa < 0 {
        return None;
    }
    if scale <= money::USD_SCALE {
        let factor = 10i128.checked_pow(money::USD_SCALE - scale)?;
        return i64::try_from(mantissa.checked_mul(factor)?).ok();
    }
    // Digits below one internal unit. Atoms have 12; an upstream cost (scale <= 28) times a
    // markup (<= 6 places, checked at load) has at most 26, so the tail fits a Decimal.
    let places = scale - money::USD_SCALE;
    if places > Decimal::MAX_SCALE {
        return None;
    }
    let divisor = 10i128.pow(places);
    let (whole, rest) = (mantissa / divisor, mantissa % divisor);
    let parity = whole % 2;
    // parity * divisor + rest < 2 * 10^28 < 2^96: always a valid Decimal mantissa.
    let tail = Decimal::try_from_i128_with_scale(parity * divisor + rest, places).ok()?;
    let tail_rounded = i64::try_from(tail.round_dp_with_strategy(0, money::ROUNDING)).ok()?;
    i64::try_from(whole - parity).ok()?.checked_add(tail_rounded)
}

/// Atoms -> internal units, rounded once (see [`round_usd_to_units`]).
pub(crate) fn atoms_to_units(atoms: i128) -> Option<i64> {
    round_usd_to_units(atoms, ATOM_SCALE)
}

/// Exact USD -> internal units, rounded once.
#[cfg(test)]
pub(crate) fn decimal_to_units(usd: Decimal) -> Option<i64> {
    round_usd_to_units(usd.mantissa(), usd.scale())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn dec(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn rounding_matches_money_usd_to_units_on_small_values() {
        for s in ["0", "0.000000005", "0.000000015", "0.000000025", "0.0000000249999", "12.345678905"] {
            assert_eq!(decimal_to_units(dec(s)), money::usd_to_units(dec(s)), "{s}");
        }
    }

    #[test]
    fn rounding_is_exact_beyond_96_bits() {
        // Exactly half a unit on top of an odd whole part: 31 significant digits, more than
        // a Decimal mantissa holds.
        let whole: i64 = 9_000_000_000_000_000_001;
        let m = i128::from(whole) * 10i128.pow(12) + 5 * 10i128.pow(11);
        assert_eq!(round_usd_to_units(m, ATOM_SCALE), Some(whole + 1));
        // One atom less is below the half: down. On an even whole part the half goes down.
        assert_eq!(round_usd_to_units(m - 1, ATOM_SCALE), Some(whole));
        assert_eq!(round_usd_to_units(m - 10i128.pow(12), ATOM_SCALE), Some(whole - 1));
    }

    #[test]
    fn to_fixed_refuses_to_lose_digits() {
        let rate = Exact::from_decimal(dec("0.165")).unwrap();
        assert_eq!(rate.to_fixed(PER_1M_SCALE), Some(16_500_000_000_000));
        let fine = Exact::from_decimal(dec("0.000000000000001")).unwrap();
        assert_eq!(fine.to_fixed(PER_1M_SCALE), None);
        assert_eq!(Exact::from_decimal(dec("-1")), None);
    }

    #[test]
    fn overflow_is_none_not_a_panic() {
        assert_eq!(round_usd_to_units(i128::MAX, 0), None);
        assert_eq!(round_usd_to_units(i128::MAX, ATOM_SCALE), None);
        assert_eq!(round_usd_to_units(-1, 0), None);
    }
}
