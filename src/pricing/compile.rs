//! Raw catalog -> validated [`Catalog`]. Every rule a catalog must satisfy is checked here,
//! once, so pricing itself has nothing left to fail on.

use super::config::{RawCatalog, RawDisplay, RawFile, RawModel, RawProvider};
use super::exact::Exact;
use super::values::{Ctx, syntax_error};
use super::versions::{Adjust, compile_versions};
use super::{Catalog, CatalogError, DisplayUnit, Entry};
use crate::money;
use std::collections::{BTreeMap, HashMap};

/// Load-time view of a provider: its markups and cache multipliers, checked.
#[derive(Debug, Clone, Copy)]
struct ProviderRules {
    local: bool,
    rate_markup: Exact,
    upstream_markup: Exact,
    cache_read_multiplier: Exact,
    cache_write_multiplier: Exact,
}

pub(crate) fn compile(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
    let raw: RawFile = toml::from_str(text).map_err(|e| syntax_error(text, origin, &e))?;
    let ctx = Ctx { origin };
    let Some(cat) = raw.catalog else {
        return Err(ctx.invalid("catalog", "missing: pricing keys live under a top-level [catalog] table"));
    };
    let display = compile_display(ctx, cat.display.as_ref())?;
    let usd_per_credit = cat.display.as_ref().map(|_| usd_per_display_unit(&display));
    let providers = compile_providers(ctx, &cat.providers)?;
    let mut entries = Vec::with_capacity(cat.models.len());
    for (index, model) in cat.models.iter().enumerate() {
        entries.push(compile_entry(ctx, &cat, &providers, usd_per_credit, index, model)?);
    }
    let by_name = index_names(ctx, &cat.models)?;
    let by_provider = index_provider_wide(ctx, &cat.models)?;
    let by_provider_model = index_provider_models(&cat.models);
    let default_entry = match &cat.default_model {
        None => None,
        Some(id) => Some(*by_name.get(id.as_str()).ok_or_else(|| {
            ctx.invalid("catalog.default_model", format!("{id:?} is not a model of this catalog"))
        })?),
    };
    Ok(Catalog {
        origin: origin.to_string(),
        version: super::catalog_version(text).into(),
        text: text.to_string(),
        name: cat.name.clone().unwrap_or_else(|| origin.to_string()),
        entries,
        by_name,
        by_provider,
        by_provider_model,
        local_providers: providers.iter().filter(|(_, p)| p.local).map(|(n, _)| n.clone()).collect(),
        tier_names: cat.model_tiers.keys().cloned().collect(),
        default_entry,
        upstream_floor: cat.upstream_floor,
        minimum_charge_units: minimum_charge(ctx, &cat)?,
        display,
    })
}

fn compile_display(ctx: Ctx, raw: Option<&RawDisplay>) -> Result<DisplayUnit, CatalogError> {
    let Some(raw) = raw else {
        return Ok((DisplayUnit::USD)());
    };
    if raw.unit_name.trim().is_empty() {
        return Err(ctx.invalid("catalog.display.unit_name", "empty"));
    }
    let key = "catalog.display.usd_per_unit";
    let usd = ctx.rate(key, &raw.usd_per_unit)?;
    let units = usd.to_fixed(money::USD_SCALE).and_then(|u| i64::try_from(u).ok());
    let units = match units {
        Some(units) if units > 0 => units,
        _ => return Err(ctx.invalid(key, "must be a positive whole number of internal units (1e-8 USD)")),
    };
    // units / (2^a x 5^b) always has a finite decimal expansion: exact display values.
    let mut rest = units;
    for p in [2, 5] {
        while rest % p == 0 {
            rest /= p;
        }
    }
    if rest != 1 {
        return Err(ctx.invalid(key, "must be a power-of-ten fraction of a cent's kind (2^a x 5^b internal units) so that amounts convert exactly"));
    }
    let decimals = raw.decimals.unwrap_or(2);
    if decimals > 8 {
        return Err(ctx.invalid("catalog.display.decimals", "must be within 0..=8"));
    }
    let small = match (&raw.small_below, raw.small_decimals) {
        (None, None) => None,
        (Some(below), Some(small_decimals)) if small_decimals <= 12 => {
            let key = "catalog.display.small_below";
            let below_units = ctx
                .rate(key, below)?
                .checked_mul(Exact::from_int(i128::from(units)))
                .and_then(|u| u.to_fixed(0))
                .and_then(|u| i64::try_from(u).ok())
                .filter(|u| *u > 0)
                .ok_or_else(|| ctx.invalid(key, "must be a positive amount of display units"))?;
            Some((below_units, small_decimals))
        }
        _ => {
            return Err(ctx.invalid(
                "catalog.display.small_decimals",
                "small_decimals (0..=12) and small_below go together",
            ));
        }
    };
    Ok(DisplayUnit { unit_name: raw.unit_name.clone(), units_per_display_unit: units, decimals, small })
}

fn usd_per_display_unit(display: &DisplayUnit) -> Exact {
    let units = Exact::from_int(i128::from(display.units_per_display_unit));
    let usd_per_unit = Exact::from_decimal(money::units_to_usd(1)).unwrap_or(Exact::ONE);
    // units x 1e-8 cannot overflow: both are small.
    units.checked_mul(usd_per_unit).unwrap_or(Exact::ONE)
}

fn compile_providers(
    ctx: Ctx,
    raw: &BTreeMap<String, RawProvider>,
) -> Result<BTreeMap<String, ProviderRules>, CatalogError> {
    let mut out = BTreeMap::new();
    for (name, p) in raw {
        let key = |field: &str| format!("catalog.providers.{name}.{field}");
        let opt = |field: &str, v: &Option<toml::Value>, markup: bool| -> Result<Exact, CatalogError> {
            match v {
                None => Ok(Exact::ONE),
                Some(v) if markup => ctx.markup(&key(field), v),
                Some(v) => ctx.multiplier(&key(field), v),
            }
        };
        if name.trim().is_empty() {
            return Err(ctx.invalid("catalog.providers", "a provider name is empty"));
        }
        let rules = ProviderRules {
            local: p.local,
            rate_markup: opt("rate_markup", &p.rate_markup, true)?,
            upstream_markup: opt("upstream_markup", &p.upstream_markup, true)?,
            cache_read_multiplier: opt("cache_read_multiplier", &p.cache_read_multiplier, false)?,
            cache_write_multiplier: opt("cache_write_multiplier", &p.cache_write_multiplier, false)?,
        };
        out.insert(name.clone(), rules);
    }
    Ok(out)
}

/// `catalog.models["gpt-4o"]`, or the index when the id is empty.
pub(crate) fn model_path(index: usize, id: &str) -> String {
    if id.is_empty() { format!("catalog.models[{index}]") } else { format!("catalog.models[{id:?}]") }
}

fn compile_entry(
    ctx: Ctx,
    cat: &RawCatalog,
    providers: &BTreeMap<String, ProviderRules>,
    usd_per_credit: Option<Exact>,
    index: usize,
    m: &RawModel,
) -> Result<Entry, CatalogError> {
    let path = model_path(index, &m.id);
    if m.id.trim().is_empty() {
        return Err(ctx.invalid(format!("{path}.id"), "empty"));
    }
    let provider = providers.get(&m.provider).ok_or_else(|| {
        let problem = format!("provider {:?} is not declared under [catalog.providers]", m.provider);
        ctx.invalid(format!("{path}.provider"), problem)
    })?;
    let rate_markup = match &m.rate_markup {
        Some(v) => ctx.markup(&format!("{path}.rate_markup"), v)?,
        None => provider.rate_markup,
    };
    let upstream_markup = match &m.upstream_markup {
        Some(v) => ctx.markup(&format!("{path}.upstream_markup"), v)?,
        None => provider.upstream_markup,
    };
    let adjust = Adjust {
        rate_markup,
        cache_read_multiplier: provider.cache_read_multiplier,
        cache_write_multiplier: provider.cache_write_multiplier,
        usd_per_credit,
    };
    let versions = match (&m.model_tier, m.prices.is_empty()) {
        (Some(_), false) => {
            return Err(ctx.invalid(&path, "has both `model_tier` and `prices`; keep one"));
        }
        (None, true) => {
            return Err(ctx.invalid(&path, "has no prices: add [[catalog.models.prices]] or a model_tier"));
        }
        (None, false) => compile_versions(ctx, &format!("{path}.prices"), &m.prices, &adjust)?,
        (Some(tier), true) => {
            let raw_tier = cat.model_tiers.get(tier).ok_or_else(|| {
                let problem = format!("no [catalog.model_tiers.{tier}] table");
                ctx.invalid(format!("{path}.model_tier"), problem)
            })?;
            let tier_path = format!("catalog.model_tiers.{tier}.prices");
            compile_versions(ctx, &tier_path, &raw_tier.prices, &adjust)?
        }
    };
    Ok(Entry {
        id: m.id.clone(),
        local: provider.local,
        upstream_markup,
        versions,
        tier: m.model_tier.clone(),
    })
}

/// Provider -> model name -> entry (see `Catalog::by_provider_model`). As LiteLLM looks
/// up `provider/model` before `model`, a name written `provider/model` claims its pair
/// first; then each entry's declared provider claims its names. The first claim of a pair
/// keeps it: the pairs are a lookup aid, ids and aliases stay the names that must be unique.
fn index_provider_models(models: &[RawModel]) -> HashMap<String, HashMap<String, usize>> {
    let mut map: HashMap<String, HashMap<String, usize>> = HashMap::new();
    let names =
        |m: &RawModel| -> Vec<String> { std::iter::once(&m.id).chain(m.aliases.iter()).cloned().collect() };
    for (index, m) in models.iter().enumerate() {
        for name in names(m) {
            if let Some((provider, model)) = name.split_once('/') {
                map.entry(provider.to_string()).or_default().entry(model.to_string()).or_insert(index);
            }
        }
    }
    for (index, m) in models.iter().enumerate() {
        for name in names(m) {
            map.entry(m.provider.clone()).or_default().entry(name).or_insert(index);
        }
    }
    map
}

/// Ids and aliases share one namespace: a name must price one thing only.
fn index_names(ctx: Ctx, models: &[RawModel]) -> Result<HashMap<String, usize>, CatalogError> {
    let mut by_name: HashMap<String, usize> = HashMap::new();
    for (index, m) in models.iter().enumerate() {
        let names = std::iter::once(&m.id).chain(m.aliases.iter());
        for (n, name) in names.enumerate() {
            let key = if n == 0 {
                format!("{}.id", model_path(index, &m.id))
            } else {
                format!("{}.aliases[{}]", model_path(index, &m.id), n - 1)
            };
            if name.trim().is_empty() {
                return Err(ctx.invalid(key, "empty"));
            }
            if let Some(&other) = by_name.get(name.as_str()) {
                let problem = format!(
                    "duplicate model: {name:?} already names catalog.models[{other}] (models counted from 0)"
                );
                return Err(ctx.invalid(key, problem));
            }
            by_name.insert(name.clone(), index);
        }
    }
    Ok(by_name)
}

fn index_provider_wide(ctx: Ctx, models: &[RawModel]) -> Result<HashMap<String, usize>, CatalogError> {
    let mut by_provider: HashMap<String, usize> = HashMap::new();
    for (index, m) in models.iter().enumerate().filter(|(_, m)| m.provider_wide) {
        if let Some(&other) = by_provider.get(&m.provider) {
            let key = format!("{}.provider_wide", model_path(index, &m.id));
            let problem = format!(
                "provider {:?} already has a provider-wide entry: {}",
                m.provider,
                model_path(other, &models[other].id)
            );
            return Err(ctx.invalid(key, problem));
        }
        by_provider.insert(m.provider.clone(), index);
    }
    Ok(by_provider)
}

fn minimum_charge(ctx: Ctx, cat: &RawCatalog) -> Result<i64, CatalogError> {
    let Some(value) = &cat.minimum_charge_usd else {
        return Ok(0);
    };
    let key = "catalog.minimum_charge_usd";
    let usd = ctx.rate(key, value)?;
    usd.to_fixed(money::USD_SCALE)
        .and_then(|u| i64::try_from(u).ok())
        .ok_or_else(|| ctx.invalid(key, "must be a whole number of internal units (1e-8 USD)"))
}
