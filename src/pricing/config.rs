//! The catalog file as written: serde structs mirroring the TOML, nothing checked yet.
//!
//! Every struct denies unknown keys, so a typo is an error instead of a silently ignored
//! price. Money, multipliers and timestamps are kept as raw `toml::Value`s here and
//! converted in `compile.rs`, where the error can name the full key path (a serde error
//! only knows the line). Money must be a decimal *string* or an integer: a TOML float is
//! binary and would not be exact, so it is refused there with a hint.

use serde::Deserialize;
use std::collections::BTreeMap;

/// Top-level tables owned by other modules. They may live in the same file; pricing only
/// checks that no *other* top-level name appears (a misspelt `[catalgo]` is an error).
pub const FOREIGN_TABLES: [&str; 10] = [
    "account",
    "plans",
    "quotas",
    "limits",
    "topup",
    "auto_reload",
    "reservations",
    "grants",
    "checkout",
    "subscriptions",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFile {
    pub catalog: Option<RawCatalog>,
    // Owned by other modules (see FOREIGN_TABLES): accepted, never read here.
    #[allow(dead_code)]
    pub account: Option<toml::Value>,
    #[allow(dead_code)]
    pub plans: Option<toml::Value>,
    #[allow(dead_code)]
    pub quotas: Option<toml::Value>,
    #[allow(dead_code)]
    pub limits: Option<toml::Value>,
    #[allow(dead_code)]
    pub topup: Option<toml::Value>,
    #[allow(dead_code)]
    pub auto_reload: Option<toml::Value>,
    #[allow(dead_code)]
    pub reservations: Option<toml::Value>,
    #[allow(dead_code)]
    pub grants: Option<toml::Value>,
    #[allow(dead_code)]
    pub checkout: Option<toml::Value>,
    #[allow(dead_code)]
    pub subscriptions: Option<toml::Value>,
}

/// `[catalog]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCatalog {
    /// Free text shown in errors and by `tally price`.
    pub name: Option<String>,
    /// Entry that prices events whose model is not in the catalog (flagged on the charge).
    pub default_model: Option<String>,
    /// Enable `cost = max(catalog cost, upstream cost x upstream_markup)`.
    #[serde(default)]
    pub upstream_floor: bool,
    /// Charged events cost at least this much (USD decimal string, whole internal units).
    pub minimum_charge_usd: Option<toml::Value>,
    pub display: Option<RawDisplay>,
    #[serde(default)]
    pub providers: BTreeMap<String, RawProvider>,
    /// Shared rate cards (BroomVA's model tiers), referenced by `model_tier` on a model.
    #[serde(default)]
    pub model_tiers: BTreeMap<String, RawModelTier>,
    #[serde(default)]
    pub models: Vec<RawModel>,
}

/// `[catalog.display]`: the unit balances are shown in (credits).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDisplay {
    pub unit_name: String,
    /// USD value of one display unit, e.g. "0.01" for 1 credit = 1 cent.
    pub usd_per_unit: toml::Value,
    /// Decimals shown (default 2).
    pub decimals: Option<u32>,
    /// Decimals shown for amounts below `small_below` display units (Brievio: 6 below a
    /// cent, 2 above).
    pub small_decimals: Option<u32>,
    pub small_below: Option<toml::Value>,
}

/// `[catalog.providers.NAME]`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawProvider {
    /// Self-hosted (Ollama): every call through it is free, whatever the model.
    #[serde(default)]
    pub local: bool,
    /// Multiplies every catalog rate of the provider's models (Struere's 10%: "1.10").
    pub rate_markup: Option<toml::Value>,
    /// Multiplies the upstream cost in the floor rule (Brievio's 1.5 and 1.2).
    pub upstream_markup: Option<toml::Value>,
    /// Cache-read rate = input rate x this, unless a version sets the rate (default 1).
    pub cache_read_multiplier: Option<toml::Value>,
    /// Cache-write rate = input rate x this, unless a version sets the rate (default 1).
    pub cache_write_multiplier: Option<toml::Value>,
}

/// `[catalog.model_tiers.NAME]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModelTier {
    pub prices: Vec<RawPrice>,
}

/// `[[catalog.models]]`: a model, or a flat-priced feature.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawModel {
    pub id: String,
    pub provider: String,
    /// Other names the gateway may report for the same prices.
    #[serde(default)]
    pub aliases: Vec<String>,
    /// Price any model of `provider` that has no entry of its own (Brokr prices per provider).
    #[serde(default)]
    pub provider_wide: bool,
    /// Use the rate card `[catalog.model_tiers.NAME]` instead of `prices`.
    pub model_tier: Option<String>,
    /// Override the provider's markups for this model (Brievio's China-provider models).
    pub rate_markup: Option<toml::Value>,
    pub upstream_markup: Option<toml::Value>,
    #[serde(default)]
    pub prices: Vec<RawPrice>,
}

/// `[[catalog.models.prices]]`: one price version. Every rate is USD unless named otherwise.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPrice {
    /// RFC 3339 (string or TOML offset date-time). Omitted = in force since forever.
    pub effective_from: Option<toml::Value>,
    pub input_per_1m_tokens: Option<toml::Value>,
    pub output_per_1m_tokens: Option<toml::Value>,
    pub cache_read_per_1m_tokens: Option<toml::Value>,
    pub cache_write_per_1m_tokens: Option<toml::Value>,
    pub reasoning_per_1m_tokens: Option<toml::Value>,
    /// Display units (credits) per 10K tokens, input and output alike (BroomVA).
    pub credits_per_10k_tokens: Option<toml::Value>,
    pub per_1m_characters: Option<toml::Value>,
    /// Flat ("0.04") or keyed by resolution ({ "720p" = "0.30", default = "0.30" }).
    pub per_image: Option<toml::Value>,
    /// Per video clip, flat or keyed by resolution.
    pub per_clip: Option<toml::Value>,
    /// Per second of generated video/audio, flat or keyed by resolution.
    pub per_second: Option<toml::Value>,
    /// Per message, flat or keyed by message category.
    pub per_message: Option<toml::Value>,
    /// Flat fee per successful call.
    pub per_call: Option<toml::Value>,
    #[serde(default)]
    pub long_context: Vec<RawLongContext>,
}

/// `[[catalog.models.prices.long_context]]`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawLongContext {
    /// The tier applies when the prompt has strictly more tokens than this.
    pub above_input_tokens: i64,
    pub input_per_1m_tokens: Option<toml::Value>,
    pub output_per_1m_tokens: Option<toml::Value>,
    pub cache_read_per_1m_tokens: Option<toml::Value>,
    pub cache_write_per_1m_tokens: Option<toml::Value>,
    pub reasoning_per_1m_tokens: Option<toml::Value>,
}
