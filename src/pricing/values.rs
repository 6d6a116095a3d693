//! Load-time conversion of raw TOML values into checked, exact quantities, with errors
//! that name the file and the key path.

use super::CatalogError;
use super::exact::Exact;
use super::rates::Atoms;
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

/// Largest rate accepted, USD per unit of its quantity (per 1M tokens, per image, ...).
/// Real rates are below $1,000; the cap catches unit mistakes and keeps every
/// `count x rate` within `i128` atoms (10^12 x 10^6 USD x 10^20 atoms < 1.7 x 10^38).
pub(crate) const RATE_USD_MAX: i64 = 1_000_000;
/// Markups live in [1, 100]: below 1 the platform would sell under its own price (use a
/// lower rate instead), above 100 it is almost surely a percent written as a factor.
pub(crate) const MARKUP_MAX: i64 = 100;
/// Cache multipliers live in [0, 10] (Anthropic's write surcharge is 1.25x or 2x).
pub(crate) const MULTIPLIER_MAX: i64 = 10;
/// Decimal places allowed in a markup or multiplier. Bounds the scale of
/// `upstream x markup` (<= 28 + 6) so its rounding stays exact (see `exact.rs`).
pub(crate) const FACTOR_PLACES_MAX: u32 = 6;

/// Builds errors for one catalog file.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ctx<'a> {
    pub origin: &'a str,
}

impl Ctx<'_> {
    pub fn invalid(&self, key: impl Into<String>, problem: impl Into<String>) -> CatalogError {
        CatalogError::Invalid { origin: self.origin.to_string(), key: key.into(), problem: problem.into() }
    }

    /// A decimal from a string ("3.30") or an integer. Floats are refused: a binary
    /// float cannot hold most prices exactly.
    pub fn decimal(&self, key: &str, value: &toml::Value) -> Result<Decimal, CatalogError> {
        match value {
            toml::Value::String(s) => Decimal::from_str_exact(s.trim())
                .map_err(|e| self.invalid(key, format!("{s:?} is not a plain decimal number ({e})"))),
            toml::Value::Integer(i) => Ok(Decimal::from(*i)),
            toml::Value::Float(f) => Err(self.invalid(
                key,
                format!("{f} is a TOML float, which is binary and inexact; write it as a string: \"{f}\""),
            )),
            other => {
                Err(self.invalid(key, format!("expected a decimal string, found a {}", other.type_str())))
            }
        }
    }

    /// A decimal in `[min, max]`, as an exact value.
    pub fn bounded(&self, key: &str, value: &toml::Value, min: i64, max: i64) -> Result<Exact, CatalogError> {
        let d = self.decimal(key, value)?;
        if d.is_sign_negative() && !d.is_zero() {
            return Err(self.invalid(key, format!("{d} is negative")));
        }
        if d < Decimal::from(min) || d > Decimal::from(max) {
            return Err(self.invalid(key, format!("{d} is outside [{min}, {max}]")));
        }
        Exact::from_decimal(d).ok_or_else(|| self.invalid(key, format!("{d} is negative")))
    }

    /// A USD rate: `0 <= rate <= RATE_USD_MAX`.
    pub fn rate(&self, key: &str, value: &toml::Value) -> Result<Exact, CatalogError> {
        self.bounded(key, value, 0, RATE_USD_MAX)
    }

    pub fn markup(&self, key: &str, value: &toml::Value) -> Result<Exact, CatalogError> {
        self.factor(key, value, 1, MARKUP_MAX)
    }

    pub fn multiplier(&self, key: &str, value: &toml::Value) -> Result<Exact, CatalogError> {
        self.factor(key, value, 0, MULTIPLIER_MAX)
    }

    fn factor(&self, key: &str, value: &toml::Value, min: i64, max: i64) -> Result<Exact, CatalogError> {
        let factor = self.bounded(key, value, min, max)?;
        if factor.scale() > FACTOR_PLACES_MAX {
            let problem = format!("more than {FACTOR_PLACES_MAX} decimal places");
            return Err(self.invalid(key, problem));
        }
        Ok(factor)
    }

    /// `usd x factors` as whole atoms at `scale` (see `exact.rs`), refusing to round.
    pub fn atoms(&self, key: &str, usd: Exact, factors: &[Exact], scale: u32) -> Result<Atoms, CatalogError> {
        let product = factors.iter().try_fold(usd, |acc, f| acc.checked_mul(*f));
        let Some(product) = product else {
            return Err(self.invalid(key, "rate x multiplier x markup overflows"));
        };
        // `scale` is the number of decimal places an atom has in the rate's own quantity
        // (14 per 1M tokens, 20 per image, ...).
        product.to_fixed(scale).ok_or_else(|| {
            let value = product.to_plain_string();
            self.invalid(
                key,
                format!(
                    "{value} USD (after multipliers and markup) has more than {scale} decimal places; \
                     rates are kept exact to 1e-20 USD per unit and are never rounded"
                ),
            )
        })
    }

    /// A timestamp with an offset, as an RFC 3339 string or a TOML offset date-time.
    pub fn timestamp(&self, key: &str, value: &toml::Value) -> Result<DateTime<Utc>, CatalogError> {
        let text = match value {
            toml::Value::String(s) => s.clone(),
            toml::Value::Datetime(d) => d.to_string(),
            other => {
                let problem = format!("expected an RFC 3339 timestamp, found a {}", other.type_str());
                return Err(self.invalid(key, problem));
            }
        };
        DateTime::parse_from_rfc3339(&text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| self.invalid(key, format!("{text:?} is not RFC 3339 with a UTC offset ({e})")))
    }
}

/// Turn a TOML/serde error into a `Syntax` error naming line, column and the key at fault.
/// serde only reports a byte span; the key is recovered from the text: the nearest table
/// header above the span plus the key on the span's line.
pub(crate) fn syntax_error(text: &str, origin: &str, error: &toml::de::Error) -> CatalogError {
    let start = error.span().map_or(0, |s| s.start);
    let before = text.get(..start).unwrap_or(text);
    let line_index = before.matches('\n').count();
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    CatalogError::Syntax {
        origin: origin.to_string(),
        line: line_index + 1,
        column,
        key: key_at_line(text, line_index),
        problem: error.message().trim().to_string(),
    }
}

fn key_at_line(text: &str, line_index: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let last = line_index.min(lines.len().saturating_sub(1));
    let Some(line) = lines.get(last).map(|l| l.trim()) else {
        return String::from("(document)");
    };
    let header = lines[..=last]
        .iter()
        .rev()
        .map(|l| l.trim())
        .find(|l| l.starts_with('['))
        .map(|l| l.trim_matches(|c| c == '[' || c == ']').trim());
    let own = if line.starts_with('[') { None } else { line.split('=').next().map(str::trim) };
    match (header, own) {
        (Some(h), Some(k)) if !k.is_empty() => format!("{h}.{k}"),
        (Some(h), _) => h.to_string(),
        (None, Some(k)) if !k.is_empty() => k.to_string(),
        _ => String::from("(document)"),
    }
}
