//! Plans, tier quotas and spend-limit settings, from the catalog file's `[plans]`,
//! `[quotas]` and `[limits]` tables (pricing owns `[catalog]`, the ledger `[topup]`).
//!
//! ```toml
//! [limits]
//! cycle = "calendar_month"        # or "anchored_30d" (BroomVA: 30-day cycles from the plan's start)
//!
//! [plans.free]                    # BroomVA
//! rank = 0
//! allocation_usd = "0.50"
//! overage_policy = "hard_limit"   # hard_limit | soft_limit | warn
//! [plans.pro]
//! rank = 1
//! allocation_usd = "50"
//! overage_policy = "soft_limit"
//! soft_limit_percent = 120
//! [plans.enterprise]
//! rank = 3
//! allocation_usd = "0"
//! overage_policy = "warn"
//! self_serve = false              # upgrading to it programmatically is refused
//!
//! [quotas.ad_generations]         # Reeve: per feature, per tier; absent tier = unlimited
//! free = 10
//! pro = 100
//! ```

use crate::money::exact_units;
use rust_decimal::Decimal;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OveragePolicy {
    HardLimit,
    SoftLimit,
    Warn,
}

impl OveragePolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            OveragePolicy::HardLimit => "hard_limit",
            OveragePolicy::SoftLimit => "soft_limit",
            OveragePolicy::Warn => "warn",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cycle {
    /// Calendar months, reset on the 1st at 00:00 UTC (Brokr, Brievio).
    #[default]
    CalendarMonth,
    /// 30-day cycles from the plan's anchor (BroomVA's subscription date).
    #[serde(rename = "anchored_30d")]
    Anchored30d,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanFile {
    rank: u32,
    allocation_usd: Decimal,
    overage_policy: OveragePolicy,
    soft_limit_percent: Option<u32>,
    #[serde(default = "yes")]
    self_serve: bool,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub name: String,
    /// Orders plans: a higher rank is an upgrade.
    pub rank: u32,
    pub allocation_units: i64,
    pub policy: OveragePolicy,
    /// Soft-limit ceiling in percent of the allocation (120 = BroomVA's 120%).
    pub soft_limit_percent: u32,
    /// False: changing to this plan through the API or CLI is refused (enterprise).
    pub self_serve: bool,
}

/// An account's own terms for its plan, set by an operator only (BroomVA's enterprise:
/// "custom credit allocation ... custom ceilings"). They replace the catalog's allocation,
/// overage policy and soft-limit ceiling for that one account; name and rank stay the plan's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct CustomTerms {
    pub allocation_units: i64,
    pub policy: OveragePolicy,
    pub soft_limit_percent: u32,
}

impl CustomTerms {
    /// The same bounds as the catalog's plans.
    pub fn validate(&self) -> Result<(), String> {
        if self.allocation_units < 0 {
            return Err("a custom allocation must not be negative".into());
        }
        if !(100..=1000).contains(&self.soft_limit_percent) {
            return Err("a custom soft-limit ceiling must be within 100..=1000 percent".into());
        }
        Ok(())
    }
}

impl Plan {
    /// This plan with an account's custom terms, if it has any (borrowed otherwise).
    pub fn with_terms(&self, terms: Option<&CustomTerms>) -> std::borrow::Cow<'_, Plan> {
        match terms {
            None => std::borrow::Cow::Borrowed(self),
            Some(t) => std::borrow::Cow::Owned(Plan {
                allocation_units: t.allocation_units,
                policy: t.policy,
                soft_limit_percent: t.soft_limit_percent,
                ..self.clone()
            }),
        }
    }
}

impl OveragePolicy {
    pub fn parse(text: &str) -> Option<OveragePolicy> {
        [OveragePolicy::HardLimit, OveragePolicy::SoftLimit, OveragePolicy::Warn]
            .into_iter()
            .find(|p| p.as_str() == text)
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LimitsFile {
    #[serde(default)]
    cycle: Cycle,
}

#[derive(Deserialize)]
struct File {
    #[serde(default)]
    plans: BTreeMap<String, PlanFile>,
    /// feature -> tier -> limit (calls per rolling window).
    #[serde(default)]
    quotas: BTreeMap<String, BTreeMap<String, u64>>,
    #[serde(default)]
    limits: LimitsFile,
}

/// Everything the quota and limit decisions need from configuration.
#[derive(Debug, Clone, Default)]
pub struct QuotaConfig {
    pub plans: BTreeMap<String, Plan>,
    /// feature -> tier -> calls allowed per rolling window; a tier absent = unlimited.
    pub quotas: BTreeMap<String, BTreeMap<String, u64>>,
    pub cycle: Cycle,
}

impl QuotaConfig {
    pub fn from_toml_str(text: &str, origin: &str) -> Result<QuotaConfig, String> {
        let file: File = toml::from_str(text).map_err(|e| format!("{origin}: {e}"))?;
        let mut plans = BTreeMap::new();
        for (name, p) in file.plans {
            let allocation_units = exact_units(p.allocation_usd)
                .map_err(|e| format!("{origin}: plans.{name}.allocation_usd: {e}"))?;
            if allocation_units < 0 {
                return Err(format!("{origin}: plans.{name}.allocation_usd must not be negative"));
            }
            let soft = p.soft_limit_percent.unwrap_or(120);
            if !(100..=1000).contains(&soft) {
                return Err(format!("{origin}: plans.{name}.soft_limit_percent must be within 100..=1000"));
            }
            let plan = Plan {
                name: name.clone(),
                rank: p.rank,
                allocation_units,
                policy: p.overage_policy,
                soft_limit_percent: soft,
                self_serve: p.self_serve,
            };
            plans.insert(name, plan);
        }
        let mut ranks: Vec<u32> = plans.values().map(|p| p.rank).collect();
        ranks.sort_unstable();
        if ranks.windows(2).any(|w| w[0] == w[1]) {
            return Err(format!("{origin}: two plans share a rank; ranks order upgrades"));
        }
        Ok(QuotaConfig { plans, quotas: file.quotas, cycle: file.limits.cycle })
    }

    pub fn load(path: &Path) -> Result<QuotaConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::from_toml_str(&text, &path.display().to_string())
    }

    /// Calls of `feature` allowed per window for `tier`; `None` = unlimited (or ungated).
    pub fn quota(&self, feature: &str, tier: &str) -> Option<u64> {
        self.quotas.get(feature).and_then(|tiers| tiers.get(tier)).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BROOMVA: &str = r#"
        [plans.free]
        rank = 0
        allocation_usd = "0.50"
        overage_policy = "hard_limit"
        [plans.pro]
        rank = 1
        allocation_usd = "50"
        overage_policy = "soft_limit"
        [plans.enterprise]
        rank = 3
        allocation_usd = "0"
        overage_policy = "warn"
        self_serve = false
        [quotas.ad_generations]
        free = 10
        pro = 100
        [limits]
        cycle = "anchored_30d"
    "#;

    #[test]
    fn reads_plans_quotas_and_cycle() {
        let c = QuotaConfig::from_toml_str(BROOMVA, "b.toml").unwrap();
        assert_eq!(c.plans["free"].allocation_units, 50_000_000);
        assert_eq!(c.plans["pro"].soft_limit_percent, 120);
        assert!(!c.plans["enterprise"].self_serve);
        assert_eq!(c.quota("ad_generations", "pro"), Some(100));
        assert_eq!(c.quota("ad_generations", "enterprise"), None);
        assert_eq!(c.quota("other", "free"), None);
        assert_eq!(c.cycle, Cycle::Anchored30d);
    }

    #[test]
    fn refuses_bad_plans_naming_the_key() {
        let dup = "[plans.a]\nrank=1\nallocation_usd=\"1\"\noverage_policy=\"warn\"\n[plans.b]\nrank=1\nallocation_usd=\"1\"\noverage_policy=\"warn\"\n";
        assert!(QuotaConfig::from_toml_str(dup, "f.toml").unwrap_err().contains("rank"));
        let bad = "[plans.a]\nrank=1\nallocation_usd=\"1\"\noverage_policy=\"sometimes\"\n";
        assert!(QuotaConfig::from_toml_str(bad, "f.toml").unwrap_err().starts_with("f.toml"));
    }
}
