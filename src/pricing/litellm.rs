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
//! Other `*cost*` keys are listed in a comment above the model ("not imported"); entries
//! with no mapped price, and the `sample_spec` entry, are skipped with a comment.
//!
//! Exactness: the file's numbers are JSON floats. Without serde_json's
//! `arbitrary_precision`, a number is held as an `f64`; `Number::to_string()` prints the
//! shortest text that reads back as the same `f64`, which is the text LiteLLM wrote for any
//! price with up to 15 significant digits. That text is parsed with
//! `Decimal::from_str_exact` / `from_scientific`, never through f64 arithmetic.

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
    #[error("model {model:?}: `{key}`: {problem}")]
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

/// Convert a LiteLLM price file to catalog TOML. The result is validated by
/// [`Catalog::from_toml_str`] before it is returned.
pub fn import_litellm(json_text: &str) -> Result<String, ImportError> {
    let root: Value = serde_json::from_str(json_text)?;
    let Value::Object(models) = root else {
        return Err(ImportError::NotAnObject);
    };
    let mut imported = Vec::new();
    let mut skipped = Vec::new();
    for (name, spec) in &models {
        match spec {
            Value::Object(fields) if name != "sample_spec" => {
                let model = import_model(name, fields)?;
                if model.rates.is_empty() && model.tiers.is_empty() {
                    skipped.push(name.clone());
                } else {
                    imported.push(model);
                }
            }
            _ => skipped.push(name.clone()),
        }
    }
    let text = render(&imported, &skipped);
    Catalog::from_toml_str(&text, "litellm import")?;
    Ok(text)
}

fn import_model(name: &str, fields: &Map<String, Value>) -> Result<Imported, ImportError> {
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
        if !import_field(&mut model, key, value)? && key.contains("cost") {
            model.not_imported.push(key.clone());
        }
    }
    model.tiers.sort_by_key(|(above, _)| *above);
    // serde_json's map is sorted by key; print in the catalog's reading order instead.
    model.rates.sort_by_key(|(tally_key, _)| key_rank(tally_key));
    for (_, rates) in &mut model.tiers {
        rates.sort_by_key(|(tally_key, _)| key_rank(tally_key));
    }
    Ok(model)
}

/// Map one LiteLLM field onto `model`; false when it is not a price Tally imports.
fn import_field(model: &mut Imported, key: &str, value: &Value) -> Result<bool, ImportError> {
    if let Some((base, above)) = split_tier_suffix(key) {
        let Some(tally_key) = token_key(base) else {
            return Ok(false);
        };
        let rate = price(model, key, value, PER_MILLION)?;
        match model.tiers.iter_mut().find(|(a, _)| *a == above) {
            Some((_, rates)) => rates.push((tally_key, rate)),
            None => model.tiers.push((above, vec![(tally_key, rate)])),
        }
        return Ok(true);
    }
    if let Some(tally_key) = token_key(key) {
        let rate = price(model, key, value, PER_MILLION)?;
        model.rates.push((tally_key, rate));
        return Ok(true);
    }
    if let Some((_, tally_key, per)) = UNIT_KEYS.iter().find(|(k, _, _)| *k == key) {
        let rate = price(model, key, value, *per)?;
        model.rates.push((tally_key, rate));
        return Ok(true);
    }
    Ok(false)
}

fn key_rank(tally_key: &str) -> usize {
    let order = TOKEN_KEYS.iter().map(|(_, t)| *t).chain(UNIT_KEYS.iter().map(|(_, t, _)| *t));
    order.enumerate().find(|(_, t)| *t == tally_key).map_or(usize::MAX, |(rank, _)| rank)
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

/// A non-negative price parsed exactly from the JSON number's text, times `per` (how many
/// LiteLLM units one Tally unit holds).
fn price(model: &Imported, key: &str, value: &Value, per: i64) -> Result<Decimal, ImportError> {
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
    let scaled = d.checked_mul(Decimal::from(per)).ok_or_else(|| invalid(format!("{text} is too large")))?;
    Ok(scaled.normalize())
}

fn render(models: &[Imported], skipped: &[String]) -> String {
    let mut out = String::new();
    out.push_str("# Generated by `tally catalog import --litellm` from LiteLLM's\n");
    out.push_str("# model_prices_and_context_window.json. Token and character rates are LiteLLM's\n");
    out.push_str("# per-unit prices x 1,000,000 (exact). No markup: add rate_markup per provider.\n");
    out.push_str("[catalog]\nname = \"litellm-import\"\n");
    for name in skipped {
        let _ = writeln!(out, "# skipped {}: no price Tally imports", quote(name));
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
