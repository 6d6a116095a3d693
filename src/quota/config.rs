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
    /// Which models the plan may call (see [`ModelGate`]); all three absent = every model.
    #[serde(default)]
    allowed_providers: Vec<String>,
    #[serde(default)]
    allowed_models: Vec<String>,
    #[serde(default)]
    allowed_model_tiers: Vec<String>,
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
    /// The models its accounts may call (BroomVA Free: community models only).
    pub models: ModelGate,
}

/// Which models a plan allows. Empty = every model. Otherwise a model is allowed when any
/// rule matches: its provider is listed, its name is listed (`prefix*` matches by prefix,
/// e.g. `meta-llama/*`), or the catalog prices it by a listed model tier. Authorize
/// enforces it when the call names its model; usage that already happened is billed
/// whatever the model (it cannot be refused after the fact).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelGate {
    pub providers: Vec<String>,
    pub models: Vec<String>,
    pub tiers: Vec<String>,
}

impl ModelGate {
    pub fn is_open(&self) -> bool {
        self.providers.is_empty() && self.models.is_empty() && self.tiers.is_empty()
    }

    /// `tier`: the catalog tier that prices the model, if any. Pure.
    pub fn allows(&self, provider: Option<&str>, model: &str, tier: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let named = |rule: &String| match rule.strip_suffix('*') {
            Some(prefix) => model.starts_with(prefix),
            None => rule == model,
        };
        provider.is_some_and(|p| self.providers.iter().any(|r| r == p))
            || self.models.iter().any(named)
            || tier.is_some_and(|t| self.tiers.iter().any(|r| r == t))
    }

    /// What it allows, for a refusal's message.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        for (what, list) in
            [("providers", &self.providers), ("models", &self.models), ("model tiers", &self.tiers)]
        {
            if !list.is_empty() {
                parts.push(format!("{what} {}", list.join(", ")));
            }
        }
        parts.join("; ")
    }
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
            let lists = [&p.allowed_providers, &p.allowed_models, &p.allowed_model_tiers];
            if lists.iter().any(|l| l.iter().any(|v| v.trim().is_empty() || v.len() > 512)) {
                return Err(format!("{origin}: plans.{name}: allowed_* entries must be 1..=512 bytes"));
            }
            let plan = Plan {
                name: name.clone(),
                rank: p.rank,
                allocation_units,
                policy: p.overage_policy,
                soft_limit_percent: soft,
                self_serve: p.self_serve,
                models: ModelGate {
                    providers: p.allowed_providers,
                    models: p.allowed_models,
                    tiers: p.allowed_model_tiers,
                },
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

    /// Every model tier a plan allows must exist in the catalog (a misspelt tier would
    /// silently refuse every model of it).
    pub fn check_against(&self, catalog: &crate::pricing::Catalog) -> Result<(), String> {
        for plan in self.plans.values() {
            if let Some(t) = plan.models.tiers.iter().find(|t| !catalog.has_tier(t)) {
                return Err(format!(
                    "{}: plans.{}.allowed_model_tiers: no [catalog.model_tiers.{t}]",
                    catalog.origin(),
                    plan.name
                ));
            }
        }
        Ok(())
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
mod gate_tests {
    use super::ModelGate;

    #[test]
    fn a_gate_allows_by_provider_name_prefix_or_tier() {
        assert!(ModelGate::default().allows(None, "anything", None), "no rules: every model");
        let g = ModelGate {
            providers: vec!["ollama".into()],
            models: vec!["meta-llama/*".into(), "mistral-small".into()],
            tiers: vec!["small".into()],
        };
        assert!(g.allows(Some("ollama"), "llama3", None));
        assert!(g.allows(Some("openrouter"), "meta-llama/llama-3-8b", None));
        assert!(g.allows(None, "mistral-small", None));
        assert!(!g.allows(None, "mistral-small-2", None), "exact unless it ends in *");
        assert!(g.allows(Some("google"), "gemini-2.5-flash", Some("small")));
        assert!(!g.allows(Some("anthropic"), "claude-sonnet-4-5", Some("medium")));
        assert!(!g.allows(None, "claude-sonnet-4-5", None));
        assert_eq!(g.describe(), "providers ollama; models meta-llama/*, mistral-small; model tiers small");
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
