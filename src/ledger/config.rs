//! Ledger settings that live in the catalog file, beside `[catalog]`:
//!
//! ```toml
//! [topup]
//! min_usd = "5"          # Brokr: $5 - $1,000
//! max_usd = "1000"
//! [[topup.bonus]]        # Brievio: $100 -> $110, $1,000 -> $1,250, $5,000 -> $7,000
//! from_usd = "100"
//! bonus_percent = "10"
//!
//! [reservations]
//! ttl_secs = 900            # holds expire so none can leak
//! hold_on_authorize = false # true: POST /v1/authorize holds unless asked "hold": false
//!
//! [grants.promotion]        # credit grants (see `ledger::grants`): per source,
//! priority = 100            # burn order (lower first) and expiry; absent: defaults,
//! expires_after_days = 30   # nothing expires
//! ```
//!
//! Every table is optional; absent means no limits, no bonus, 15-minute holds, credits
//! that never expire.

use crate::money::{self, exact_units};
use rust_decimal::Decimal;
use serde::Deserialize;
use std::path::Path;

#[derive(Debug, Clone, Default, Deserialize)]
pub struct LedgerConfig {
    #[serde(default)]
    pub topup: TopupConfig,
    #[serde(default)]
    pub reservations: ReservationConfig,
    /// `[grants.<source>]`: burn priority and expiry per grant source.
    #[serde(default)]
    pub grants: crate::ledger::grants::GrantPolicies,
    /// `[checkout]`: where `POST /v1/accounts/{id}/checkout` sends the customer to pay.
    #[serde(default)]
    pub checkout: crate::payments::CheckoutConfig,
    /// `[subscriptions]`: Stripe subscriptions driving plans.
    #[serde(default)]
    pub subscriptions: crate::payments::SubscriptionConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopupConfig {
    pub min_usd: Option<Decimal>,
    pub max_usd: Option<Decimal>,
    /// What a checkout without an amount or pack charges (Brokr: $25).
    pub default_usd: Option<Decimal>,
    /// `[[topup.packs]]`: fixed offers a checkout may name (Reeve: starter, standard, power).
    #[serde(default)]
    pub packs: Vec<Pack>,
    #[serde(default)]
    pub bonus: Vec<BonusTier>,
    /// The terms of the grants a purchase creates (a copy of the file's `[grants]`, so
    /// the top-up paths that take this table see them).
    #[serde(skip)]
    pub grants: crate::ledger::grants::GrantPolicies,
}

/// A credit pack: its price in USD (the credit, before any bonus tier).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pack {
    pub name: String,
    pub usd: Decimal,
}

/// A purchase of at least `from_usd` is credited `bonus_percent` more. The highest tier
/// reached applies (not cumulative).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BonusTier {
    pub from_usd: Decimal,
    pub bonus_percent: Decimal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReservationConfig {
    #[serde(default = "default_ttl_secs")]
    pub ttl_secs: u32,
    /// `POST /v1/authorize` holds by default (a request may still say `"hold": false`).
    #[serde(default)]
    pub hold_on_authorize: bool,
    /// `[reservations.estimate]`: holds computed from a call's shape.
    #[serde(default)]
    pub estimate: EstimateConfig,
}

/// `[reservations.estimate]`: what `POST /v1/reservations` assumes when a request gives
/// the call's shape (`estimate`) but not every count, and what it does when the catalog
/// cannot price the model.
///
/// ```toml
/// [reservations.estimate]
/// input_tokens = 10000     # Struere: per iteration...
/// output_tokens = 40960
/// iterations = 10          # ...times the agent's LLM loop
/// unpriced = "refuse"      # or "hold" with unpriced_hold_usd = "5"
/// ```
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EstimateConfig {
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub iterations: Option<i64>,
    #[serde(default)]
    pub unpriced: UnpricedPolicy,
    pub unpriced_hold_usd: Option<Decimal>,
}

/// A model the catalog cannot price: never an unreserved call.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UnpricedPolicy {
    /// 422 `cannot_estimate`: the gateway must not make the call.
    #[default]
    Refuse,
    /// Hold `unpriced_hold_usd`.
    Hold,
}

impl EstimateConfig {
    /// The configured default hold for a model the catalog cannot price, in units.
    pub fn unpriced_hold_units(&self) -> Option<i64> {
        match self.unpriced {
            UnpricedPolicy::Refuse => None,
            UnpricedPolicy::Hold => self.unpriced_hold_usd.and_then(|usd| exact_units(usd).ok()),
        }
    }
}

/// 15 minutes: longer than any single agent run Struere describes (10 LLM iterations).
const fn default_ttl_secs() -> u32 {
    900
}

impl Default for ReservationConfig {
    fn default() -> Self {
        ReservationConfig {
            ttl_secs: default_ttl_secs(),
            hold_on_authorize: false,
            estimate: EstimateConfig::default(),
        }
    }
}

/// Only the tables this module owns; everything else in the file is someone else's.
#[derive(Deserialize)]
struct File {
    #[serde(default)]
    topup: TopupConfig,
    #[serde(default)]
    reservations: ReservationConfig,
    #[serde(default)]
    grants: crate::ledger::grants::GrantPolicies,
    #[serde(default)]
    checkout: crate::payments::CheckoutConfig,
    #[serde(default)]
    subscriptions: crate::payments::SubscriptionConfig,
}

impl LedgerConfig {
    pub fn from_toml_str(text: &str, origin: &str) -> Result<LedgerConfig, String> {
        let file: File = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        let mut topup = file.topup;
        topup.grants = file.grants.clone();
        let cfg = LedgerConfig {
            topup,
            reservations: file.reservations,
            grants: file.grants,
            checkout: file.checkout,
            subscriptions: file.subscriptions,
        };
        cfg.validate().map_err(|e| format!("{origin}: {e}"))?;
        Ok(cfg)
    }

    pub fn load(path: &Path) -> Result<LedgerConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    fn validate(&self) -> Result<(), String> {
        let t = &self.topup;
        if let (Some(min), Some(max)) = (t.min_usd, t.max_usd)
            && min > max
        {
            return Err(format!("topup.min_usd {min} is above topup.max_usd {max}"));
        }
        for (i, b) in t.bonus.iter().enumerate() {
            if b.from_usd <= Decimal::ZERO
                || b.bonus_percent < Decimal::ZERO
                || b.bonus_percent > Decimal::from(1000)
            {
                return Err(format!(
                    "topup.bonus[{i}]: from_usd must be > 0 and bonus_percent within 0..=1000"
                ));
            }
        }
        // The amounts a checkout may charge without being asked must themselves pass.
        if let Some(usd) = t.default_usd {
            crate::payments::checkout_amount(t, Some(usd), None)
                .map_err(|e| format!("topup.default_usd {usd}: {e}"))?;
        }
        for (i, p) in t.packs.iter().enumerate() {
            if p.name.is_empty() || p.name.len() > 64 || t.packs[..i].iter().any(|q| q.name == p.name) {
                return Err(format!(
                    "topup.packs[{i}]: name {:?} must be 1..=64 bytes, not given twice",
                    p.name
                ));
            }
            crate::payments::checkout_amount(t, Some(p.usd), None)
                .map_err(|e| format!("topup.packs[{i}] {:?}: {e}", p.name))?;
        }
        self.checkout.validate()?;
        self.grants.validate()?;
        let e = &self.reservations.estimate;
        let counts = [("input_tokens", e.input_tokens), ("output_tokens", e.output_tokens)];
        if let Some((name, _)) =
            counts.iter().find(|(_, v)| v.is_some_and(|n| !(0..=crate::event::COUNT_MAX).contains(&n)))
        {
            return Err(format!(
                "reservations.estimate.{name} must be within 0..={}",
                crate::event::COUNT_MAX
            ));
        }
        if e.iterations.is_some_and(|n| !(1..=crate::pricing::estimate::ITERATIONS_MAX).contains(&n)) {
            return Err(format!(
                "reservations.estimate.iterations must be within 1..={}",
                crate::pricing::estimate::ITERATIONS_MAX
            ));
        }
        match (e.unpriced, e.unpriced_hold_usd) {
            (UnpricedPolicy::Hold, Some(usd)) if usd > Decimal::ZERO && exact_units(usd).is_ok() => {}
            (UnpricedPolicy::Hold, _) => {
                return Err(
                    "reservations.estimate: unpriced = \"hold\" needs a positive unpriced_hold_usd".into()
                );
            }
            (UnpricedPolicy::Refuse, Some(_)) => {
                return Err("reservations.estimate.unpriced_hold_usd needs unpriced = \"hold\"".into());
            }
            (UnpricedPolicy::Refuse, None) => {}
        }
        if self.reservations.ttl_secs == 0 || self.reservations.ttl_secs > 7 * 86_400 {
            return Err("reservations.ttl_secs must be within 1..=604800".into());
        }
        Ok(())
    }
}

impl TopupConfig {
    /// Check a purchase amount and return (paid, credited) in internal units.
    pub fn credit_for(&self, paid_usd: Decimal) -> Result<(i64, i64), String> {
        if paid_usd <= Decimal::ZERO {
            return Err(format!("top-up amount must be positive, got {paid_usd}"));
        }
        if let Some(min) = self.min_usd.filter(|m| paid_usd < *m) {
            return Err(format!("top-up amount {paid_usd} USD is below the minimum {min} USD"));
        }
        if let Some(max) = self.max_usd.filter(|m| paid_usd > *m) {
            return Err(format!("top-up amount {paid_usd} USD is above the maximum {max} USD"));
        }
        self.credit_with_bonus(paid_usd)
    }

    /// (paid, credited) in internal units with the bonus tiers but without the limits:
    /// an operator crediting a reviewed payment (`tally orders resolve --credit`) accepts
    /// an amount the limits refused, yet the customer still gets the catalog's bonus.
    pub fn credit_with_bonus(&self, paid_usd: Decimal) -> Result<(i64, i64), String> {
        if paid_usd <= Decimal::ZERO {
            return Err(format!("top-up amount must be positive, got {paid_usd}"));
        }
        let paid = exact_units(paid_usd)?;
        let percent = self
            .bonus
            .iter()
            .filter(|b| paid_usd >= b.from_usd)
            .map(|b| b.bonus_percent)
            .max()
            .unwrap_or(Decimal::ZERO);
        let bonus_usd = paid_usd * percent / Decimal::from(100);
        let bonus = money::usd_to_units(bonus_usd).ok_or("bonus out of range")?;
        Ok((paid, paid.checked_add(bonus).ok_or("credit out of range")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    #[test]
    fn holding_authorize_is_off_unless_the_catalog_turns_it_on() {
        let off = LedgerConfig::from_toml_str("[catalog]\nname = \"x\"\n", "t.toml").unwrap();
        assert!(!off.reservations.hold_on_authorize);
        let reeve =
            LedgerConfig::from_toml_str(include_str!("../../examples/reeve.toml"), "reeve.toml").unwrap();
        assert!(reeve.reservations.hold_on_authorize, "Reeve gates on quotas: it holds by default");
        assert_eq!(reeve.reservations.ttl_secs, 900);
    }

    fn brievio() -> TopupConfig {
        let text = r#"
            [catalog]
            name = "x"
            [[topup.bonus]]
            from_usd = "100"
            bonus_percent = "10"
            [[topup.bonus]]
            from_usd = "1000"
            bonus_percent = "25"
            [[topup.bonus]]
            from_usd = "5000"
            bonus_percent = "40"
        "#;
        LedgerConfig::from_toml_str(text, "t.toml").unwrap().topup
    }

    #[test]
    fn brievio_bonus_tiers_match_the_seed_table() {
        let t = brievio();
        let usd = |u: i64| money::units_to_usd(u);
        assert_eq!(t.credit_for(d("10")).map(|(_, c)| usd(c)), Ok(d("10")));
        assert_eq!(t.credit_for(d("100")).map(|(_, c)| usd(c)), Ok(d("110")));
        assert_eq!(t.credit_for(d("1000")).map(|(_, c)| usd(c)), Ok(d("1250")));
        assert_eq!(t.credit_for(d("5000")).map(|(_, c)| usd(c)), Ok(d("7000")));
        assert_eq!(t.credit_for(d("99.99")).map(|(_, c)| usd(c)), Ok(d("99.99")));
    }

    #[test]
    fn limits_and_precision_are_enforced() {
        let t = TopupConfig {
            min_usd: Some(d("5")),
            max_usd: Some(d("1000")),
            bonus: vec![],
            ..Default::default()
        };
        assert!(t.credit_for(d("4.99")).unwrap_err().contains("below the minimum"));
        assert!(t.credit_for(d("1000.01")).unwrap_err().contains("above the maximum"));
        assert!(t.credit_for(d("0")).is_err());
        assert!(t.credit_for(d("5.000000001")).unwrap_err().contains("finer"));
        assert_eq!(t.credit_for(d("25")), Ok((2_500_000_000, 2_500_000_000)));
    }

    #[test]
    fn bad_tables_are_refused_with_the_file_name() {
        let err =
            LedgerConfig::from_toml_str("[topup]\nmin_usd = \"9\"\nmax_usd = \"1\"\n", "f.toml").unwrap_err();
        assert!(err.starts_with("f.toml") && err.contains("min_usd"));
        let err = LedgerConfig::from_toml_str("[topup]\ncolour = 1\n", "f.toml").unwrap_err();
        assert!(err.contains("colour"));
    }
}
