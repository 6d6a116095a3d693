//! One `[[...prices]]` table -> a compiled [`Version`], and the rules on version lists.

use super::CatalogError;
use super::config::{RawLongContext, RawPrice};
use super::exact::{ATOM_SCALE, Exact, PER_1M_SCALE};
use super::rates::{Atoms, Keyed, Rates, TokenRates, Version};
use super::values::Ctx;
use crate::event::COUNT_MAX;

/// What a model's provider (or the model itself) does to its rates, fixed at load.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Adjust {
    pub rate_markup: Exact,
    pub cache_read_multiplier: Exact,
    pub cache_write_multiplier: Exact,
    /// USD value of one display unit, when `[catalog.display]` exists (for credit rates).
    pub usd_per_credit: Option<Exact>,
}

/// Token rates as written: USD per 1M tokens, before multipliers and markup.
#[derive(Debug, Clone, Copy, Default)]
struct TokenInputs {
    input: Option<Exact>,
    output: Option<Exact>,
    cache_read: Option<Exact>,
    cache_write: Option<Exact>,
    reasoning: Option<Exact>,
}

/// Compile and order the versions of one entry (or model tier) at `path`.
pub(crate) fn compile_versions(
    ctx: Ctx,
    path: &str,
    raw: &[RawPrice],
    adjust: &Adjust,
) -> Result<Vec<Version>, CatalogError> {
    if raw.is_empty() {
        return Err(ctx.invalid(path, "empty: at least one price version is needed"));
    }
    let mut versions = raw
        .iter()
        .enumerate()
        .map(|(i, p)| compile_version(ctx, &format!("{path}[{i}]"), p, adjust))
        .collect::<Result<Vec<_>, _>>()?;
    // `None` (in force since forever) sorts first.
    versions.sort_by_key(|v| v.effective_from);
    for pair in versions.windows(2) {
        if pair[0].effective_from == pair[1].effective_from {
            let problem = match pair[0].effective_from {
                None => "more than one version without effective_from".to_string(),
                Some(t) => format!("two versions take effect at {}", t.to_rfc3339()),
            };
            return Err(ctx.invalid(path, problem));
        }
    }
    Ok(versions)
}

fn compile_version(ctx: Ctx, path: &str, p: &RawPrice, adjust: &Adjust) -> Result<Version, CatalogError> {
    let key = |field: &str| format!("{path}.{field}");
    let effective_from = match &p.effective_from {
        Some(v) => Some(ctx.timestamp(&key("effective_from"), v)?),
        None => None,
    };
    let base = token_inputs(ctx, path, p, adjust)?;
    let tokens = token_rates(ctx, path, &base, adjust)?;
    let rates = Rates {
        tokens,
        long_context: long_context(ctx, path, &p.long_context, &base, &tokens, adjust)?,
        per_character: match &p.per_1m_characters {
            Some(v) => Some(unit_rate(ctx, &key("per_1m_characters"), v, adjust, PER_1M_SCALE)?),
            None => None,
        },
        per_image: keyed(ctx, &key("per_image"), p.per_image.as_ref(), adjust)?,
        per_clip: keyed(ctx, &key("per_clip"), p.per_clip.as_ref(), adjust)?,
        per_second: keyed(ctx, &key("per_second"), p.per_second.as_ref(), adjust)?,
        per_message: keyed(ctx, &key("per_message"), p.per_message.as_ref(), adjust)?,
        per_call: match &p.per_call {
            Some(v) => Some(unit_rate(ctx, &key("per_call"), v, adjust, ATOM_SCALE)?),
            None => None,
        },
    };
    if rates == Rates::default() {
        return Err(ctx.invalid(path, "prices nothing: set at least one rate (a rate may be \"0\")"));
    }
    Ok(Version { effective_from, rates })
}

fn token_inputs(ctx: Ctx, path: &str, p: &RawPrice, adjust: &Adjust) -> Result<TokenInputs, CatalogError> {
    let rate = |field: &str, v: &Option<toml::Value>| match v {
        Some(v) => ctx.rate(&format!("{path}.{field}"), v).map(Some),
        None => Ok(None),
    };
    let mut t = TokenInputs {
        input: rate("input_per_1m_tokens", &p.input_per_1m_tokens)?,
        output: rate("output_per_1m_tokens", &p.output_per_1m_tokens)?,
        cache_read: rate("cache_read_per_1m_tokens", &p.cache_read_per_1m_tokens)?,
        cache_write: rate("cache_write_per_1m_tokens", &p.cache_write_per_1m_tokens)?,
        reasoning: rate("reasoning_per_1m_tokens", &p.reasoning_per_1m_tokens)?,
    };
    let Some(value) = &p.credits_per_10k_tokens else {
        return Ok(t);
    };
    let key = format!("{path}.credits_per_10k_tokens");
    if t.input.is_some() || t.output.is_some() {
        return Err(ctx.invalid(key, "set either credits_per_10k_tokens or input/output_per_1m_tokens"));
    }
    let Some(usd_per_credit) = adjust.usd_per_credit else {
        return Err(ctx.invalid(key, "needs [catalog.display] to say what one credit is worth"));
    };
    // credits per 10K tokens x USD per credit x 100 = USD per 1M tokens, input and output.
    let per_1m = ctx
        .rate(&key, value)?
        .checked_mul(usd_per_credit)
        .and_then(|usd| usd.checked_mul(Exact::from_int(100)))
        .ok_or_else(|| ctx.invalid(&key, "overflows"))?;
    t.input = Some(per_1m);
    t.output = Some(per_1m);
    Ok(t)
}

/// Resolve derived rates: cache reads/writes default to input x the provider multiplier,
/// reasoning defaults to the output rate; then apply the markup and convert to atoms.
fn token_rates(ctx: Ctx, path: &str, t: &TokenInputs, adjust: &Adjust) -> Result<TokenRates, CatalogError> {
    let atoms = |field: &str, usd: Option<Exact>, multiplier: Exact| -> Result<Option<Atoms>, CatalogError> {
        let factors = [multiplier, adjust.rate_markup];
        usd.map(|u| ctx.atoms(&format!("{path}.{field}"), u, &factors, PER_1M_SCALE)).transpose()
    };
    let explicit_or_input = |field: &str, explicit: Option<Exact>, multiplier: Exact| match explicit {
        Some(rate) => atoms(field, Some(rate), Exact::ONE),
        None => atoms("input_per_1m_tokens", t.input, multiplier),
    };
    let output = atoms("output_per_1m_tokens", t.output, Exact::ONE)?;
    Ok(TokenRates {
        input: atoms("input_per_1m_tokens", t.input, Exact::ONE)?,
        cache_read: explicit_or_input(
            "cache_read_per_1m_tokens",
            t.cache_read,
            adjust.cache_read_multiplier,
        )?,
        cache_write: explicit_or_input(
            "cache_write_per_1m_tokens",
            t.cache_write,
            adjust.cache_write_multiplier,
        )?,
        output,
        reasoning: match t.reasoning {
            Some(rate) => atoms("reasoning_per_1m_tokens", Some(rate), Exact::ONE)?,
            None => output,
        },
    })
}

/// Long-context tiers: a tier's unset input/output come from the base version; its cache
/// and reasoning rates, when unset, are derived from the tier's own input/output.
fn long_context(
    ctx: Ctx,
    path: &str,
    raw: &[RawLongContext],
    base: &TokenInputs,
    base_rates: &TokenRates,
    adjust: &Adjust,
) -> Result<Vec<(u64, TokenRates)>, CatalogError> {
    let mut tiers = Vec::with_capacity(raw.len());
    for (i, lc) in raw.iter().enumerate() {
        let tier_path = format!("{path}.long_context[{i}]");
        let rate = |field: &str, v: &Option<toml::Value>| match v {
            Some(v) => ctx.rate(&format!("{tier_path}.{field}"), v).map(Some),
            None => Ok(None),
        };
        let own = TokenInputs {
            input: rate("input_per_1m_tokens", &lc.input_per_1m_tokens)?,
            output: rate("output_per_1m_tokens", &lc.output_per_1m_tokens)?,
            cache_read: rate("cache_read_per_1m_tokens", &lc.cache_read_per_1m_tokens)?,
            cache_write: rate("cache_write_per_1m_tokens", &lc.cache_write_per_1m_tokens)?,
            reasoning: rate("reasoning_per_1m_tokens", &lc.reasoning_per_1m_tokens)?,
        };
        let above = u64::try_from(lc.above_input_tokens).ok().filter(|n| (1..=COUNT_MAX as u64).contains(n));
        let Some(above) = above else {
            let problem = format!("must be between 1 and {COUNT_MAX}");
            return Err(ctx.invalid(format!("{tier_path}.above_input_tokens"), problem));
        };
        let inherited =
            TokenInputs { input: own.input.or(base.input), output: own.output.or(base.output), ..own };
        tiers.push((above, token_rates(ctx, &tier_path, &inherited, adjust)?, tier_path));
    }
    tiers.sort_by_key(|(above, _, _)| *above);
    let mut below = (0u64, *base_rates);
    for (above, rates, tier_path) in &tiers {
        if *above == below.0 {
            return Err(ctx.invalid(tier_path, format!("two long-context tiers start above {above} tokens")));
        }
        check_not_cheaper(ctx, tier_path, &below.1, rates)?;
        below = (*above, *rates);
    }
    Ok(tiers.into_iter().map(|(above, rates, _)| (above, rates)).collect())
}

/// A longer prompt must never cost less: every tier rate >= the rate just below it.
fn check_not_cheaper(
    ctx: Ctx,
    path: &str,
    below: &TokenRates,
    tier: &TokenRates,
) -> Result<(), CatalogError> {
    const NAMES: [&str; 5] = ["input", "cache_read", "cache_write", "output", "reasoning"];
    for ((name, below), tier) in NAMES.iter().zip(below.as_array()).zip(tier.as_array()) {
        let cheaper = match (below, tier) {
            (Some(b), Some(t)) => t < b,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if cheaper {
            let problem =
                format!("the {name} rate is lower than below this tier, so a longer prompt would cost less");
            return Err(ctx.invalid(path, problem));
        }
    }
    Ok(())
}

/// A per-unit rate (image, clip, second, message, call; or per 1M characters at
/// `PER_1M_SCALE`) with the markup applied, in atoms.
fn unit_rate(
    ctx: Ctx,
    key: &str,
    value: &toml::Value,
    adjust: &Adjust,
    scale: u32,
) -> Result<Atoms, CatalogError> {
    let usd = ctx.rate(key, value)?;
    ctx.atoms(key, usd, &[adjust.rate_markup], scale)
}

/// `"0.04"` (flat) or `{ "720p" = "0.30", "1080p" = "0.50", default = "0.30" }`.
fn keyed(
    ctx: Ctx,
    key: &str,
    value: Option<&toml::Value>,
    adjust: &Adjust,
) -> Result<Option<Keyed>, CatalogError> {
    let Some(value) = value else {
        return Ok(None);
    };
    let toml::Value::Table(table) = value else {
        return Ok(Some(Keyed::Flat(unit_rate(ctx, key, value, adjust, ATOM_SCALE)?)));
    };
    if table.is_empty() {
        return Err(ctx.invalid(key, "empty table: give a rate, or { KEY = rate, default = rate }"));
    }
    let mut rates: Vec<(String, Atoms)> = Vec::with_capacity(table.len());
    let mut default = None;
    for (name, v) in table {
        let rate = unit_rate(ctx, &format!("{key}.{name}"), v, adjust, ATOM_SCALE)?;
        if name == "default" {
            default = Some(rate);
        } else if rates.iter().any(|(other, _)| other.eq_ignore_ascii_case(name)) {
            return Err(ctx.invalid(format!("{key}.{name}"), "duplicate key (keys match case-insensitively)"));
        } else {
            rates.push((name.clone(), rate));
        }
    }
    let fallback = default.or_else(|| rates.iter().map(|(_, r)| *r).max()).unwrap_or(0);
    Ok(Some(Keyed::ByKey { rates, fallback }))
}
