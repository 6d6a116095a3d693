//! `tally catalog import --litellm FILE`: LiteLLM's `model_prices_and_context_window.json`
//! -> a Tally catalog (TOML text).
//!
//! Mapping (LiteLLM prices are USD per token/image/second/character; Tally's token and
//! character rates are per 1M, so those are multiplied by 1,000,000, exactly):
//!
//! | LiteLLM key                                   | Tally key                          |
//! |-----------------------------------------------|------------------------------------|
//! | `input_cost_per_token`                        | `input_per_1m_tokens`              |
//! | `output_cost_per_token`                       | `output_per_1m_tokens`             |
//! | `cache_read_input_token_cost`                 | `cache_read_per_1m_tokens`         |
//! | `cache_creation_input_token_cost`             | `cache_write_per_1m_tokens`        |
//! | `output_cost_per_reasoning_token`             | `reasoning_per_1m_tokens`          |
//! | any of the above + `_above_<N>k_tokens`       | `[[...long_context]]`, above N*1000 |
//! | `output_cost_per_image`                       | `per_image`                        |
//! | `output_cost_per_second`                      | `per_second`                       |
//! | `input_cost_per_character`                    | `per_1m_characters`                |
//! | `litellm_provider`                            | `provider` (declared, no markup)   |
//!
//! Other `*cost*` keys are listed in a comment above the model ("not imported").
//!
//! **One bad entry never refuses the file.** Each entry is imported, or skipped with its
//! key and the reason ([`ImportReport`]): no price Tally imports, a value that is not a
//! non-negative number, or a model Tally's own catalog rules refuse (each model is checked
//! on its own before it joins the catalog). `tally catalog import` prints the reasons and a
//! count by reason on stderr and exits non-zero only with `--strict`.
//!
//! **Long-context tiers inherit like LiteLLM.** LiteLLM prices a request above a
//! threshold with `<rate>_above_<N>k_tokens` where the file gives one, and with the base
//! `<rate>` where it does not; a cache rate the file never gives is the base input rate.
//! The importer writes those inherited rates into each tier explicitly. One deliberate
//! difference: Tally refuses a tier that makes a longer prompt cheaper, so a tier rate
//! below the rate under it is raised to that rate (listed as adjusted): for a few Gemini
//! Pro models the cache write above 200k tokens, which LiteLLM prices below the base.
//!
//! **Exactness, and float artifacts.** The file's numbers are JSON floats. Without
//! serde_json's `arbitrary_precision`, a number is held as an `f64`; `Number::to_string()`
//! prints the shortest text that reads back as the same `f64`, which is the text LiteLLM
//! wrote for any price with up to 15 significant digits (every such decimal survives the
//! round trip through `f64`). That text is parsed with `Decimal::from_str_exact` /
//! `from_scientific`, never through f64 arithmetic. A shortest text with 16 or 17
//! significant digits (`1.5000020000000002e-05`) cannot be what a person wrote: it is the
//! artifact of float arithmetic in LiteLLM's own tooling. Such a price is rounded to 15
//! significant digits (half to even: `0.00001500002`), and the report lists it as adjusted.
//!
//! **Names.** Model ids are LiteLLM's keys (`xai/grok-4`, `gemini/gemini-2.5-pro`,
//! `gpt-4o`) and each model declares its `litellm_provider`. Pricing resolves an event's
//! `provider` + `model` to `provider/model` first (see `Catalog::lookup`), the way LiteLLM
//! builds its key, so an event `{provider: "xai", model: "grok-4"}` finds `xai/grok-4`.

use super::Catalog;
use super::CatalogError;
use rust_decimal::Decimal;
use serde_json::{Map, Value};
use std::collections::BTreeSet;
use std::fmt::Write as _;

/// A LiteLLM file that cannot be imported.
#[derive(Debug, thiserror::Error)]
pub enum ImportError {
    #[error("not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the top level must be a JSON object of model name -> prices")]
    NotAnObject,
    /// One entry's problem (internal: such an entry is skipped with this as the reason).
    #[error("`{key}`: {problem}")]
    Invalid { model: String, key: String, problem: String },
    /// The generated catalog failed Tally's own validation (e.g. a price finer than
    /// 1e-20 USD per token, or a long-context tier cheaper than the base rate).
    #[error("the imported catalog is not valid: {0}")]
    Catalog(#[from] CatalogError),
}

/// LiteLLM per-token key -> Tally per-1M-token key, in the order they are printed.
const TOKEN_KEYS: [(&str, &str); 5] = [
    ("input_cost_per_token", "input_per_1m_tokens"),
    ("cache_read_input_token_cost", "cache_read_per_1m_tokens"),
    ("cache_creation_input_token_cost", "cache_write_per_1m_tokens"),
    ("output_cost_per_token", "output_per_1m_tokens"),
    ("output_cost_per_reasoning_token", "reasoning_per_1m_tokens"),
];
/// LiteLLM key -> Tally key, and how many LiteLLM units one Tally unit holds.
const UNIT_KEYS: [(&str, &str, i64); 3] = [
    ("output_cost_per_image", "per_image", 1),
    ("output_cost_per_second", "per_second", 1),
    ("input_cost_per_character", "per_1m_characters", 1_000_000),
];
const PER_MILLION: i64 = 1_000_000;

/// One imported model, ready to print.
#[derive(Debug, Default)]
struct Imported {
    id: String,
    provider: String,
    mode: Option<String>,
    /// `(tally key, value)` of the base version.
    rates: Vec<(&'static str, Decimal)>,
    /// `above_input_tokens -> [(tally key, value)]`, ascending.
    tiers: Vec<(u64, Vec<(&'static str, Decimal)>)>,
    not_imported: Vec<String>,
}

/// What an import did, entry by entry.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ImportReport {
    /// Models in the catalog.
    pub imported: usize,
    /// `(LiteLLM key, reason)` of every entry left out.
    pub skipped: Vec<(String, String)>,
    /// `(LiteLLM key, what was changed)`: float artifacts rounded.
    pub adjusted: Vec<(String, String)>,
}

impl ImportReport {
    /// Skipped entries counted by reason (the reason's text up to the first value, so
    /// like reasons group together), most frequent first.
    pub fn skipped_by_reason(&self) -> Vec<(String, usize)> {
        let mut counts: std::collections::BTreeMap<String, usize> = std::collections::BTreeMap::new();
        for (_, reason) in &self.skipped {
            let kind = reason.split(':').next().unwrap_or(reason).trim().to_string();
            *counts.entry(kind).or_default() += 1;
        }
        let mut v: Vec<(String, usize)> = counts.into_iter().collect();
        v.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        v
    }
}

/// The catalog text and the report.
#[derive(Debug)]
pub struct Import {
    pub toml: String,
    pub report: ImportReport,
}

/// Convert a LiteLLM price file to catalog TOML. Only a file that is not a JSON object is
/// refused; each entry is imported or skipped with its reason (module doc). The result is
/// validated by [`Catalog::from_toml_str`] before it is returned.
pub fn import_litellm(json_text: &str) -> Result<Import, ImportError> {
    let root: Value = serde_json::from_str(json_text)?;
    let Value::Object(models) = root else {
        return Err(ImportError::NotAnObject);
    };
    let mut imported = Vec::new();
    let mut report = ImportReport::default();
    for (name, spec) in &models {
        let fields = match spec {
            Value::Object(fields) if name != "sample_spec" => fields,
            _ => {
                report
                    .skipped
                    .push((name.clone(), "not a model entry: LiteLLM's sample_spec or not an object".into()));
                continue;
            }
        };
        match import_model(name, fields, &mut report.adjusted) {
            Err(e) => report.skipped.push((name.clone(), format!("bad price: {e}"))),
            Ok(model) if model.rates.is_empty() && model.tiers.is_empty() => {
                let mode = model.mode.as_deref().unwrap_or("no mode");
                report.skipped.push((name.clone(), format!("no price Tally imports: mode {mode}")));
            }
            Ok(model) => match check_alone(&model) {
                Err(e) => report.skipped.push((name.clone(), format!("refused by the catalog rules: {e}"))),
                Ok(()) => imported.push(model),
            },
        }
    }
    report.imported = imported.len();
    let text = render(&imported, &report.skipped);
    Catalog::from_toml_str(&text, "litellm import")?;
    Ok(Import { toml: text, report })
}

/// Tally's catalog rules on one model alone, so one model's problem skips that model only.
fn check_alone(model: &Imported) -> Result<(), CatalogError> {
    let mut text = String::from("[catalog]\nname = \"check\"\n");
    let _ = writeln!(text, "[catalog.providers.{}]", key(&model.provider));
    render_model(&mut text, model);
    Catalog::from_toml_str(&text, model.id.as_str()).map(|_| ())
}

fn import_model(
    name: &str,
    fields: &Map<String, Value>,
    adjusted: &mut Vec<(String, String)>,
) -> Result<Imported, ImportError> {
    let mut model = Imported {
        id: name.to_string(),
        provider: match fields.get("litellm_provider") {
            Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
            _ => "unknown".to_string(),
        },
        mode: fields.get("mode").and_then(Value::as_str).map(str::to_string),
        ..Imported::default()
    };
    for (key, value) in fields {
        if !import_field(&mut model, key, value, adjusted)? && key.contains("cost") {
            model.not_imported.push(key.clone());
        }
    }
    model.tiers.sort_by_key(|(above, _)| *above);
    inherit_tier_rates(&mut model, adjusted);
    // serde_json's map is sorted by key; print in the catalog's reading order instead.
    model.rates.sort_by_key(|(tally_key, _)| key_rank(tally_key));
    for (_, rates) in &mut model.tiers {
        rates.sort_by_key(|(tally_key, _)| key_rank(tally_key));
    }
    Ok(model)
}

/// LiteLLM's rates below the first tier, per Tally token key: the base rates the file
/// gives, and for cache reads and writes it does not give, the base input rate (LiteLLM's
/// `input_rate_for_missing_cache_rates`).
fn base_token_rates(model: &Imported) -> Vec<(&'static str, Decimal)> {
    let mut rates: Vec<(&'static str, Decimal)> =
        model.rates.iter().filter(|(k, _)| token_key_is(k)).copied().collect();
    let input = rates.iter().find(|(k, _)| *k == "input_per_1m_tokens").map(|(_, r)| *r);
    for cache in ["cache_read_per_1m_tokens", "cache_write_per_1m_tokens"] {
        if let (Some(input), false) = (input, rates.iter().any(|(k, _)| *k == cache)) {
            rates.push((cache, input));
        }
    }
    rates
}

/// Long-context tiers as LiteLLM prices them: a rate a tier does not give is the rate
/// below it (module doc), written into the tier explicitly, because Tally would derive an
/// unset cache rate from the tier's own input rate. And Tally's rule that a longer prompt
/// never costs less: a tier rate below the rate under it (gemini-2.5-pro's cache write
/// above 200k tokens, 2.5e-07 against the 1.25e-06 input rate LiteLLM uses below) is
/// raised to that rate, and the report says so.
fn inherit_tier_rates(model: &mut Imported, adjusted: &mut Vec<(String, String)>) {
    let mut below = base_token_rates(model);
    for (above, rates) in &mut model.tiers {
        for (key, rate) in rates.iter_mut() {
            if let Some((_, under)) = below.iter().find(|(k, _)| k == key)
                && *rate < *under
            {
                adjusted.push((
                    model.id.clone(),
                    format!("`{key}` above {above} tokens: {rate} raised to {under}, the rate below it"),
                ));
                *rate = *under;
            }
        }
        for (key, under) in &below {
            if !rates.iter().any(|(k, _)| k == key) {
                rates.push((key, *under));
            }
        }
        below = rates.clone();
    }
}

/// Map one LiteLLM field onto `model`; false when it is not a price Tally imports.
fn import_field(
    model: &mut Imported,
    key: &str,
    value: &Value,
    adjusted: &mut Vec<(String, String)>,
) -> Result<bool, ImportError> {
    let mut read = |model: &Imported, key: &str, value: &Value, per: i64| {
        let (rate, note) = price(model, key, value, per)?;
        if let Some(note) = note {
            adjusted.push((model.id.clone(), note));
        }
        Ok::<Decimal, ImportError>(rate)
    };
    if let Some((base, above)) = split_tier_suffix(key) {
        let Some(tally_key) = token_key(base) else {
            return Ok(false);
        };
        let rate = read(model, key, value, PER_MILLION)?;
        match model.tiers.iter_mut().find(|(a, _)| *a == above) {
            Some((_, rates)) => rates.push((tally_key, rate)),
            None => model.tiers.push((above, vec![(tally_key, rate)])),
        }
        return Ok(true);
    }
    if let Some(tally_key) = token_key(key) {
        let rate = read(model, key, value, PER_MILLION)?;
        model.rates.push((tally_key, rate));
        return Ok(true);
    }
    if let Some((_, tally_key, per)) = UNIT_KEYS.iter().find(|(k, _, _)| *k == key) {
        let rate = read(model, key, value, *per)?;
        model.rates.push((tally_key, rate));
        return Ok(true);
    }
    Ok(false)
}

fn key_rank(tally_key: &str) -> usize {
    let order = TOKEN_KEYS.iter().map(|(_, t)| *t).chain(UNIT_KEYS.iter().map(|(_, t, _)| *t));
    order.enumerate().find(|(_, t)| *t == tally_key).map_or(usize::MAX, |(rank, _)| rank)
}

fn token_key_is(tally_key: &str) -> bool {
    TOKEN_KEYS.iter().any(|(_, t)| *t == tally_key)
}

fn token_key(litellm_key: &str) -> Option<&'static str> {
    TOKEN_KEYS.iter().find(|(k, _)| *k == litellm_key).map(|(_, t)| *t)
}

/// `input_cost_per_token_above_200k_tokens` -> `("input_cost_per_token", 200_000)`.
fn split_tier_suffix(key: &str) -> Option<(&str, u64)> {
    let (base, rest) = key.rsplit_once("_above_")?;
    let thousands: u64 = rest.strip_suffix("k_tokens")?.parse().ok()?;
    Some((base, thousands.checked_mul(1000)?))
}

/// Most significant digits a person-written price has (every decimal with this many
/// survives `f64` unchanged; more is a float artifact: module doc).
const SIGNIFICANT_DIGITS_MAX: u32 = 15;

/// A non-negative price parsed exactly from the JSON number's text, times `per` (how many
/// LiteLLM units one Tally unit holds); with a note when a float artifact was rounded.
fn price(
    model: &Imported,
    key: &str,
    value: &Value,
    per: i64,
) -> Result<(Decimal, Option<String>), ImportError> {
    let invalid =
        |problem: String| ImportError::Invalid { model: model.id.clone(), key: key.to_string(), problem };
    let Value::Number(number) = value else {
        return Err(invalid(format!("expected a number, found {value}")));
    };
    let text = number.to_string();
    let parsed = if text.contains(['e', 'E']) {
        Decimal::from_scientific(&text)
    } else {
        Decimal::from_str_exact(&text)
    };
    let d = parsed.map_err(|e| invalid(format!("{text} is not an exact decimal ({e})")))?;
    if d.is_sign_negative() && !d.is_zero() {
        return Err(invalid(format!("{text} is negative")));
    }
    let digits = d.normalize().mantissa().unsigned_abs().to_string().len() as u32;
    let (d, note) = if digits > SIGNIFICANT_DIGITS_MAX {
        let rounded = d
            .round_sf(SIGNIFICANT_DIGITS_MAX)
            .ok_or_else(|| invalid(format!("{text} cannot be rounded")))?
            .normalize();
        (
            rounded,
            Some(format!("`{key}`: {text} read as {rounded} (float artifact: {digits} significant digits)")),
        )
    } else {
        (d, None)
    };
    let scaled = d.checked_mul(Decimal::from(per)).ok_or_else(|| invalid(format!("{text} is too large")))?;
    Ok((scaled.normalize(), note))
}

fn render(models: &[Imported], skipped: &[(String, String)]) -> String {
    let mut out = String::new();
    out.push_str("# Generated by `tally catalog import --litellm` from LiteLLM's\n");
    out.push_str("# model_prices_and_context_window.json. Token and character rates are LiteLLM's\n");
    out.push_str("# per-unit prices x 1,000,000 (exact). No markup: add rate_markup per provider.\n");
    out.push_str("[catalog]\nname = \"litellm-import\"\n");
    for (name, reason) in skipped {
        let _ = writeln!(out, "# skipped {}: {}", quote(name), comment_safe(reason));
    }
    let providers: BTreeSet<&str> = models.iter().map(|m| m.provider.as_str()).collect();
    for provider in providers {
        let _ = writeln!(out, "\n[catalog.providers.{}]", key(provider));
    }
    for model in models {
        render_model(&mut out, model);
    }
    out
}

fn render_model(out: &mut String, model: &Imported) {
    out.push_str("\n[[catalog.models]]\n");
    let _ = writeln!(out, "id = {}", quote(&model.id));
    let _ = writeln!(out, "provider = {}", quote(&model.provider));
    if let Some(mode) = &model.mode {
        let _ = writeln!(out, "# mode: {}", comment_safe(mode));
    }
    if !model.not_imported.is_empty() {
        let _ = writeln!(out, "# not imported: {}", comment_safe(&model.not_imported.join(", ")));
    }
    out.push_str("[[catalog.models.prices]]\n");
    for (tally_key, rate) in &model.rates {
        let _ = writeln!(out, "{tally_key} = \"{rate}\"");
    }
    for (above, rates) in &model.tiers {
        out.push_str("[[catalog.models.prices.long_context]]\n");
        let _ = writeln!(out, "above_input_tokens = {above}");
        for (tally_key, rate) in rates {
            let _ = writeln!(out, "{tally_key} = \"{rate}\"");
        }
    }
}

/// Text that cannot end a TOML comment early or make it invalid.
fn comment_safe(s: &str) -> String {
    s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect()
}

/// A TOML basic string.
fn quote(s: &str) -> String {
    toml::Value::String(s.to_string()).to_string()
}

/// A TOML key: bare when it can be, quoted otherwise.
fn key(s: &str) -> String {
    let bare = !s.is_empty() && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if bare { s.to_string() } else { quote(s) }
}
