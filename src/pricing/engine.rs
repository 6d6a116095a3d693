//! `Catalog::price`: one event in, one [`Charge`] out. Total: every path returns a charge.

use super::exact::{Exact, atoms_to_units, round_usd_to_units};
use super::rates::{UsageCost, version_at};
use super::{Catalog, Charge, ChargeReason, Entry, ModelMatch};
use crate::event::{BillingMode, Modality, Status, UsageEvent};

/// The amounts `charge` decides between, in internal units.
#[derive(Debug, Clone, Copy)]
struct Amounts {
    catalog: i64,
    /// `upstream x markup` when the floor applies, else 0.
    floor: i64,
    /// `max(catalog, floor)`, before the minimum charge.
    computed: i64,
    /// What the customer pays.
    cost: i64,
    overflow: bool,
}

impl Catalog {
    /// The catalog entry that would price `event`, without pricing it. Order, for the name
    /// the event gives (for `modality = feature` with a `feature`, that name; else the
    /// model): the event provider's entry of that name (`provider/name`, as LiteLLM keys
    /// it), the entry of that name, the same name without a `provider/` prefix, the event
    /// provider's `provider_wide` entry, then `default_model` (a fallback).
    pub fn lookup(&self, event: &UsageEvent) -> Option<ModelMatch<'_>> {
        self.find_entry(event).map(|(index, fallback)| ModelMatch { id: &self.entries[index].id, fallback })
    }

    /// Price one event. Never panics, never fails: see the module doc for the order in
    /// which the free rules apply and how the charged amount is computed.
    pub fn price(&self, event: &UsageEvent) -> Charge {
        let upstream_cost_units = upstream_units(event);
        let found = self.find_entry(event);
        let free = |reason: ChargeReason, model_fallback: bool| Charge {
            cost_units: 0,
            catalog_cost_units: 0,
            upstream_cost_units,
            charged: false,
            reason,
            priced_model: found.map_or_else(String::new, |(i, _)| self.entries[i].id.clone()),
            model_fallback,
            price_version: None,
        };
        let unknown_model = found.is_none_or(|(_, fallback)| fallback);
        if event.status == Status::Error {
            return free(ChargeReason::FailedCall, unknown_model);
        }
        if event.billing_mode == BillingMode::Byok {
            return free(ChargeReason::Byok, unknown_model);
        }
        if self.is_local(event, found.map(|(i, _)| &self.entries[i])) {
            // Self-hosted: no catalog entry is needed, so a missing one is no anomaly.
            return free(ChargeReason::LocalModel, false);
        }
        match found {
            None => free(ChargeReason::UnknownModel, true),
            Some((index, fallback)) => {
                self.charge(&self.entries[index], fallback, event, upstream_cost_units)
            }
        }
    }

    fn find_entry(&self, event: &UsageEvent) -> Option<(usize, bool)> {
        let name = match (event.modality, &event.feature) {
            (Modality::Feature, Some(feature)) => feature.as_str(),
            _ => event.model.as_str(),
        };
        match self.find_named(name, &event.provider) {
            Some(index) => Some((index, false)),
            None => self.default_entry.map(|index| (index, true)),
        }
    }

    /// The entry for `provider` + `name` (LiteLLM's `provider/model` key, or an entry of
    /// that provider named `name`), else the entry named `name` (id or alias, also without
    /// a `provider/` prefix), else `provider`'s `provider_wide` entry; never the default
    /// model. No allocation: this runs for every event.
    pub(super) fn find_named(&self, name: &str, provider: &str) -> Option<usize> {
        self.by_provider_model
            .get(provider)
            .and_then(|models| models.get(name))
            .or_else(|| self.by_name.get(name))
            .or_else(|| name.rsplit_once('/').and_then(|(_, bare)| self.by_name.get(bare)))
            .or_else(|| self.by_provider.get(provider))
            .copied()
    }

    fn is_local(&self, event: &UsageEvent, entry: Option<&Entry>) -> bool {
        entry.is_some_and(|e| e.local) || self.local_providers.contains(&event.provider)
    }

    fn charge(&self, entry: &Entry, fallback: bool, event: &UsageEvent, upstream_cost_units: i64) -> Charge {
        let version = version_at(&entry.versions, event.occurred_at);
        let usage = version.rates.cost(event);
        let amounts = self.amounts(entry, event, &usage);
        Charge {
            cost_units: amounts.cost,
            catalog_cost_units: amounts.catalog,
            upstream_cost_units,
            charged: amounts.cost > 0,
            reason: reason(&usage, &amounts, fallback),
            priced_model: entry.id.clone(),
            model_fallback: fallback,
            price_version: version.effective_from,
        }
    }

    /// Rounding happens once per amount, then `max` and the minimum work on whole units.
    /// Because rounding is monotone, `max(round(a), round(b)) == round(max(a, b))`: the
    /// charged amount has still been rounded exactly once.
    fn amounts(&self, entry: &Entry, event: &UsageEvent, usage: &UsageCost) -> Amounts {
        let catalog = usage.atoms.and_then(atoms_to_units);
        let floor = if self.upstream_floor { floor_units(entry, event) } else { Some(0) };
        let (Some(catalog), Some(floor)) = (catalog, floor) else {
            // Beyond i64 units (~$92 billion): no amount is representable. Charging a
            // saturated i64::MAX would overflow every balance sum downstream, so the event
            // is left uncharged and flagged `cost_overflow` for the dead-letter path.
            return Amounts { catalog: 0, floor: 0, computed: 0, cost: 0, overflow: true };
        };
        let computed = catalog.max(floor);
        let minimum = self.minimum_charge_units;
        let cost = if computed > 0 && computed < minimum { minimum } else { computed };
        Amounts { catalog, floor, computed, cost, overflow: false }
    }
}

fn reason(usage: &UsageCost, a: &Amounts, fallback: bool) -> ChargeReason {
    if a.overflow {
        ChargeReason::CostOverflow
    } else if a.cost == 0 {
        zero_reason(usage)
    } else if fallback {
        ChargeReason::DefaultModelFallback
    } else if a.floor > a.catalog {
        ChargeReason::UpstreamFloor
    } else if a.cost > a.computed {
        ChargeReason::MinimumCharge
    } else {
        ChargeReason::Priced
    }
}

fn zero_reason(usage: &UsageCost) -> ChargeReason {
    if !usage.had_usage {
        ChargeReason::ZeroUsage
    } else if usage.had_unpriced {
        ChargeReason::NoRate
    } else if usage.atoms.is_some_and(|atoms| atoms > 0) {
        ChargeReason::RoundedToZero
    } else {
        ChargeReason::ZeroRate
    }
}

/// `upstream_cost` in units. A negative cost, or one beyond `i64` units, is 0 (both are
/// impossible after `UsageEvent::parse`, which caps upstream costs at 1e9 USD).
fn upstream_units(event: &UsageEvent) -> i64 {
    let Some(upstream) = event.upstream_cost.and_then(Exact::from_decimal) else {
        return 0;
    };
    round_usd_to_units(upstream.mantissa(), upstream.scale()).unwrap_or(0)
}

/// `upstream x markup` in units, rounded once; 0 without an upstream cost; `None` on
/// overflow. The markup has at most 6 places (checked at load), so the product's scale is
/// at most 34 and its rounding exact.
fn floor_units(entry: &Entry, event: &UsageEvent) -> Option<i64> {
    let Some(upstream) = event.upstream_cost.and_then(Exact::from_decimal) else {
        return Some(0);
    };
    let floor = upstream.checked_mul(entry.upstream_markup)?;
    round_usd_to_units(floor.mantissa(), floor.scale())
}
