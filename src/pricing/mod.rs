//! Pricing: turn a [`UsageEvent`](crate::event::UsageEvent) into a [`Charge`], for every
//! billing model of the five seeds, exactly, with one rounding rule. Pure logic: the only
//! I/O is [`Catalog::load`] reading the catalog file. `tally price` ([`cli::price_lines`])
//! and `tally run` use it; `tally catalog import --litellm` ([`litellm::import_litellm`])
//! writes catalogs for it.
//!
//! # Layout
//! - `config.rs`: the TOML schema as serde structs (unknown keys denied).
//! - `values.rs`, `versions.rs`, `compile.rs`: validation; rates are compiled once into
//!   exact integers.
//! - `exact.rs`: atoms (1e-20 USD), exact products, and the single rounding step.
//! - `rates.rs`: compiled rates and the exact cost of an event's usage.
//! - `engine.rs`: [`Catalog::price`] and [`Catalog::lookup`].
//! - `cli.rs`, `litellm.rs`: the two commands.
//!
//! # Catalog format
//! Pricing owns the top-level `[catalog]` table. A file may also hold tables of other
//! modules ([`FOREIGN_TABLES`]: `account`, `plans`, `quotas`, `limits`, `topup`, `grants`,
//! `auto_reload`, `reservations`), which pricing ignores; any other top-level name is an
//! error, so a misspelt `[catalgo]` is caught. Inside `[catalog]` every unknown key is an
//! error. **Money is a decimal string** (`"3.30"`) or an integer; a TOML float is refused
//! because it is binary and inexact. Rates are USD unless the key says credits.
//!
//! ```toml
//! [catalog]
//! name = "example"
//! default_model = "claude-sonnet-4-5" # optional: prices unknown models (flagged)
//! upstream_floor = true              # optional: cost = max(catalog, upstream x markup)
//! minimum_charge_usd = "0.000001"    # optional: whole internal units (1e-8 USD)
//!
//! [catalog.display]                  # optional (default: USD)
//! unit_name = "credit"
//! usd_per_unit = "0.01"              # 1 credit = 1 cent -> 1,000,000 units per credit
//!
//! [catalog.providers.anthropic]      # every provider used by a model must be declared
//! rate_markup = "1.10"               # multiplies every catalog rate (default 1)
//! upstream_markup = "1.5"            # multiplies upstream cost in the floor (default 1)
//! cache_read_multiplier = "0.10"     # cache-read rate = input rate x this (default 1)
//! cache_write_multiplier = "1"       # cache-write rate = input rate x this (default 1)
//! [catalog.providers.ollama]
//! local = true                       # every call through it is free
//!
//! [catalog.model_tiers.small]        # a shared rate card (BroomVA's model tiers)
//! [[catalog.model_tiers.small.prices]]
//! credits_per_10k_tokens = "1"       # input and output alike; needs [catalog.display]
//!
//! [[catalog.models]]
//! id = "claude-sonnet-4-5"           # the name events use (ids and aliases are unique)
//! provider = "anthropic"
//! aliases = ["claude-sonnet-4-5-20250929"]
//! upstream_markup = "1.2"            # optional per-model override (also rate_markup)
//! # provider_wide = true             # price every model of `provider` with no own entry
//! # model_tier = "small"             # instead of `prices`
//! [[catalog.models.prices]]          # one table per price version
//! effective_from = "2025-01-01T00:00:00Z"   # RFC 3339; omit = in force since forever
//! input_per_1m_tokens = "3"
//! output_per_1m_tokens = "15"
//! cache_read_per_1m_tokens = "0.30"  # optional: else input x cache_read_multiplier
//! cache_write_per_1m_tokens = "3.75" # optional: else input x cache_write_multiplier
//! reasoning_per_1m_tokens = "15"     # optional: else the output rate
//! per_1m_characters = "15"
//! per_image = "0.04"                 # flat, or keyed by the event's `resolution`:
//! per_clip = { "720p" = "0.30", "1080p" = "0.50", default = "0.30" }
//! per_second = "0.10"                # per second of generated video/audio (keyable)
//! per_message = { marketing = "0.025", utility = "0.004" }  # keyed by message_category
//! per_call = "0.005"                 # flat fee per successful call (features)
//! [[catalog.models.prices.long_context]]
//! above_input_tokens = 200000        # strictly more prompt tokens -> these rates
//! input_per_1m_tokens = "6"
//! output_per_1m_tokens = "22.50"
//! ```
//!
//! # Money and the rounding rule
//! Output amounts are `i64` internal units, 1 unit = 1e-8 USD ([`crate::money`]).
//! Computation never uses floats and never rounds on the way:
//! - at load, each rate is multiplied by its cache multiplier and markup and converted,
//!   **exactly or not at all**, into whole *atoms* (1e-20 USD) per unit of usage. A rate
//!   finer than that (more than 14 decimals per 1M tokens, 20 per image) is refused;
//! - per event, `count x rate` terms are summed exactly in `i128` atoms;
//! - the exact sum is rounded **once** to internal units, **half to even**
//!   ([`money::ROUNDING`](crate::money::ROUNDING), the rule of [`crate::money`]). The
//!   upstream floor `upstream x markup` is computed exactly from the event's decimal and
//!   rounded once the same way. Because rounding is monotone, `max(round(a), round(b))`
//!   equals `round(max(a, b))`: the charged amount has been rounded exactly once.
//!   (These exact amounts are `i128`s that may not fit a `Decimal`, so `exact.rs` splits
//!   off the whole part and lets rust_decimal round only the fraction with
//!   `money::ROUNDING`; property tests check the result equals `money::usd_to_units`.)
//! - the minimum charge applies last, to whole units: a charged event (rounded cost > 0)
//!   below `minimum_charge_usd` pays the minimum; an event whose cost rounds to 0 stays 0.
//! - conversions to coarser units (microdollars, cents, credits) go through
//!   `money::units_to_coarse`, half to even, from the exact internal amount.
//!
//! # How an event is priced
//! The first rule that applies decides (`reason` in brackets):
//! 1. `status = error`: free [`failed_call`]. Still logged; `upstream_cost_units` is set.
//! 2. `billing_mode = byok`: free [`byok`].
//! 3. The event's provider, or the matched entry's provider, is `local`: free
//!    [`local_model`], never flagged as a fallback.
//! 4. No entry matches and there is no `default_model`: free [`unknown_model`] with
//!    `model_fallback = true`. The pipeline never loses an event over a catalog gap.
//! 5. Otherwise: catalog cost (below) -> rounded; if `upstream_floor`, the upstream cost
//!    x `upstream_markup` -> rounded; `cost = max` of the two; then the minimum charge.
//!    Reason, first match: [`cost_overflow`] (the cost does not fit `i64` units, over
//!    ~$92 billion: not charged, since a saturated amount would overflow every balance
//!    sum downstream; dead-letter it), then if the cost is 0:
//!    [`zero_usage`] (nothing to price), [`no_rate`] (usage the entry has no rate for),
//!    [`rounded_to_zero`] (under half a unit), [`zero_rate`] (priced at a rate of 0);
//!    if charged: [`default_model_fallback`], [`upstream_floor`] (the floor exceeded the
//!    catalog cost), [`minimum_charge`], else [`priced`].
//!
//! `catalog_cost_units` is the rounded catalog cost (0 for free reasons 1-4),
//! `upstream_cost_units` the event's upstream cost in units (always, 0 if absent).
//!
//! # Token arithmetic
//! Cached and cache-write tokens are subsets of `input_tokens`, reasoning a subset of
//! `output_tokens`; each token is billed once:
//! ```text
//! uncached = input - cached - cache_write
//! cost = uncached x input_rate + cached x cache_read_rate + cache_write x cache_write_rate
//!      + (output - reasoning) x output_rate + reasoning x reasoning_rate
//! ```
//! - `cache_read_rate` = `cache_read_per_1m_tokens` if set, else input rate x the
//!   provider's `cache_read_multiplier` (default 1: no discount unless configured). Same
//!   for cache writes. The upstream floor compares against this cache-discounted cost.
//! - `reasoning_rate` = `reasoning_per_1m_tokens` if set, else the output rate.
//! - Long context: the tier with the highest `above_input_tokens` strictly below
//!   `input_tokens` (all prompt tokens, cached included) prices the **whole** request. A
//!   tier's unset input/output rates come from the base version; its unset cache and
//!   reasoning rates are derived from the tier's own input/output. A tier may not be
//!   cheaper than the rates below it (so a longer prompt never costs less).
//! - `credits_per_10k_tokens = c` sets input and output rates to `c x usd_per_unit x 100`
//!   USD per 1M tokens. Cached tokens count in full unless the provider sets a
//!   `cache_read_multiplier` (BroomVA's seed names no discount).
//! - `rate_markup` multiplies every catalog rate of the entry (tokens, images, calls...).
//!
//! # Per-unit rates
//! `images x per_image`, `video_clips x per_clip`, `video_seconds x per_second`,
//! `characters x per_1m_characters / 1M`, `messages x per_message`, plus `per_call` once
//! per successful call. Every count the event carries is priced, whatever its modality.
//! A keyed rate picks the event's `resolution` (messages: `message_category`), case
//! insensitively; a missing or unlisted key takes the `default` entry, or, without one,
//! the table's highest rate (an unknown tier is never under-billed). Failed or partial
//! image generations are not counted by the gateway, and failed calls are free anyway.
//!
//! # Versions
//! Each entry (or model tier) has one or more `prices` versions. An event is priced by
//! the latest version with `effective_from <= occurred_at`. An event older than every
//! version is priced by the **earliest** version rather than dropped. At most one version
//! may omit `effective_from` (it then applies since forever); two versions may not share
//! a timestamp. To version a whole catalog, give every entry a version with the same
//! `effective_from`. Markups and multipliers are not versioned.
//!
//! # Model lookup ([`Catalog::lookup`])
//! The name looked up is the event's `feature` when `modality = feature` and a feature is
//! set (flat per-call features), else its `model`. In order: an entry id or alias equal
//! to the name; the name without a `provider/` prefix (`anthropic/claude-sonnet-4` ->
//! `claude-sonnet-4`, for OpenRouter-style names); the `provider_wide` entry of the
//! event's provider; `default_model` (`model_fallback = true`). `priced_model` is the
//! matched entry's id, empty when nothing matched.
//!
//! # Validation
//! [`Catalog::from_toml_str`] refuses, naming the file, the key path and the problem, e.g.
//! ``brievio.toml: `catalog.models["gpt-5"].prices[0].input_per_1m_tokens`: -1 is negative``
//! (shape errors also give line and column), any of: unknown keys or top-level
//! tables, floats for money, negative rates or rates above $1,000,000, rates finer than
//! an atom, markups outside [1, 100] (below 1 the platform would undercut its own
//! price; above 100 is almost surely a percentage), cache multipliers outside [0, 10],
//! markups/multipliers with more than 6 decimals, duplicate ids or aliases, two
//! `provider_wide` entries for one provider, undeclared providers, a `default_model` or
//! `model_tier` that does not exist, an entry with both or neither of `prices` and
//! `model_tier`, a version that prices nothing, duplicate or offset-less `effective_from`,
//! long-context tiers that are duplicated or cheaper than below, credits without
//! `[catalog.display]`, and a minimum charge or display unit that is not whole units.
//!
//! # How each seed maps (`examples/*.toml`)
//! - **Brokr** (000): one `provider_wide` entry per row of its per-provider table
//!   (deepseek $0.35/$1.43, openai $3.13/$12.50, anthropic $3.75/$18.75), exactly as
//!   published; flat features as `per_call` entries.
//! - **Reeve** (001): credits of $1 (`[catalog.display]`); BYOK is `billing_mode = byok`;
//!   quota-gated features are `per_call = "0"` entries (`zero_rate`); the seed has no
//!   token prices, so list prices are used (they reproduce its 0.05 and 0.12 examples).
//! - **Brievio** (002): `upstream_floor = true`, `upstream_markup` 1.5 (1.2 for China
//!   providers and per model), `cache_read_multiplier` 0.10 Claude / 0.20 OpenAI and
//!   Gemini, cache writes at 1x, reasoning at the output rate, per-image and per-clip
//!   (keyed by resolution) rates, `minimum_charge_usd = "0.000001"`, 1 credit = $0.005.
//! - **BroomVA** (003): three `model_tiers` at 1/3/15 `credits_per_10k_tokens`, 1 credit
//!   = 1 cent, `ollama` is `local`.
//! - **Struere** (004): base rates with `rate_markup = "1.10"` per LLM provider (base x
//!   1.10 equals each published price exactly), `default_model = "grok-4-1-fast"`,
//!   WhatsApp `per_message` keyed by Meta category, email per message. Microdollars are
//!   100 internal units.
//!
//! [`failed_call`]: ChargeReason::FailedCall
//! [`byok`]: ChargeReason::Byok
//! [`local_model`]: ChargeReason::LocalModel
//! [`unknown_model`]: ChargeReason::UnknownModel
//! [`cost_overflow`]: ChargeReason::CostOverflow
//! [`zero_usage`]: ChargeReason::ZeroUsage
//! [`no_rate`]: ChargeReason::NoRate
//! [`rounded_to_zero`]: ChargeReason::RoundedToZero
//! [`zero_rate`]: ChargeReason::ZeroRate
//! [`default_model_fallback`]: ChargeReason::DefaultModelFallback
//! [`upstream_floor`]: ChargeReason::UpstreamFloor
//! [`minimum_charge`]: ChargeReason::MinimumCharge
//! [`priced`]: ChargeReason::Priced

mod compile;
mod config;
mod engine;
mod exact;
mod rates;
mod values;
mod versions;

pub mod cli;
pub mod estimate;
pub mod litellm;

#[cfg(test)]
mod tests;

pub use config::FOREIGN_TABLES;
use rates::Version;
use std::collections::HashMap;
use std::path::Path;

/// A loaded, validated price catalog. Immutable after load; `Send + Sync`, so one instance
/// can be shared by every pipeline task behind an `Arc`.
#[derive(Debug, Clone)]
pub struct Catalog {
    origin: String,
    /// [`catalog_version`] of the file's text: names this catalog in every priced row.
    version: std::sync::Arc<str>,
    /// The file's text, stored with the version (`catalog_versions`) so that what priced
    /// an event can always be read back.
    text: String,
    name: String,
    entries: Vec<Entry>,
    /// Entry index by id and by alias.
    by_name: HashMap<String, usize>,
    /// Entry index of the `provider_wide` entry of a provider.
    by_provider: HashMap<String, usize>,
    /// Entry index by provider, then model name, the way LiteLLM keys its map: an id
    /// `xai/grok-4` is `xai` -> `grok-4`; an id without a prefix is its declared provider ->
    /// the id. An event's `provider` + `model` is looked up here first.
    by_provider_model: HashMap<String, HashMap<String, usize>>,
    local_providers: Vec<String>,
    /// Every `[catalog.model_tiers.NAME]`.
    tier_names: Vec<String>,
    default_entry: Option<usize>,
    upstream_floor: bool,
    minimum_charge_units: i64,
    display: DisplayUnit,
}

/// One priced catalog entry (a model or a flat-priced feature), compiled.
#[derive(Debug, Clone)]
struct Entry {
    id: String,
    /// The entry's provider is `local = true`.
    local: bool,
    /// Upstream markup as an exact decimal (at most 6 places, checked at load).
    upstream_markup: exact::Exact,
    /// Sorted by `effective_from`, `None` first; never empty.
    versions: Vec<Version>,
    /// The `model_tier` it is priced by, if any (plans may allow models by tier).
    tier: Option<String>,
}

/// The unit amounts are shown in: USD by default, the platform's credit where a seed uses
/// one (`[catalog.display]`), with the platform's decimals.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DisplayUnit {
    /// e.g. `"credit"`, `"USD"`, `"microdollar"`.
    pub unit_name: String,
    /// Internal units (1e-8 USD) in one display unit: 1_000_000 for a 1-cent credit. Always
    /// 2^a x 5^b (checked at load), so every amount has an exact finite decimal value.
    pub units_per_display_unit: i64,
    /// Decimals shown.
    pub decimals: u32,
    /// Below this many internal units (absolute), show `small_decimals` instead.
    pub small: Option<(i64, u32)>,
}

/// One amount in the display unit.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DisplayAmount {
    /// The exact value in display units (no rounding: `"1850"`, `"0.000123"`).
    pub value: String,
    /// As the platform shows it: the one rounding rule (half to even) at the unit's
    /// decimals (`"1850.00"`, `"$0.000123"` is `"0.000123"`).
    pub shown: String,
}

impl DisplayUnit {
    pub const USD: fn() -> DisplayUnit = || DisplayUnit {
        unit_name: "USD".into(),
        units_per_display_unit: crate::money::UNITS_PER_USD,
        decimals: 2,
        small: None,
    };

    /// `units` (1e-8 USD) in this unit: exact, and as shown.
    pub fn amount(&self, units: i64) -> DisplayAmount {
        use rust_decimal::Decimal;
        let exact = Decimal::from(units) / Decimal::from(self.units_per_display_unit);
        let decimals = match self.small {
            Some((below, small_decimals)) if units.unsigned_abs() < below.unsigned_abs() => small_decimals,
            _ => self.decimals,
        };
        let mut shown = exact.round_dp_with_strategy(decimals, crate::money::ROUNDING);
        shown.rescale(decimals);
        DisplayAmount { value: exact.normalize().to_string(), shown: shown.to_string() }
    }
}

/// A catalog entry matched to an event, without pricing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelMatch<'a> {
    /// The catalog entry's id.
    pub id: &'a str,
    /// True when the catalog's `default_model` stood in for an unknown model.
    pub fallback: bool,
}

/// The price of one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Charge {
    /// What the customer pays, internal units (>= 0); 0 when not charged.
    pub cost_units: i64,
    /// Catalog cost before the max() rule (0 if free).
    pub catalog_cost_units: i64,
    /// `event.upstream_cost` converted to units (0 if absent), whatever the outcome.
    pub upstream_cost_units: i64,
    /// `cost_units > 0`.
    pub charged: bool,
    pub reason: ChargeReason,
    /// The catalog entry actually used (the default model on fallback); empty when none.
    pub priced_model: String,
    /// True when the event's model was not in the catalog (priced by the default model,
    /// or not at all: `unknown_model`).
    pub model_fallback: bool,
    /// `effective_from` of the price version used (`None`: a free rule decided, or the
    /// version in force since forever). With `priced_model` it names the price entry.
    pub price_version: Option<chrono::DateTime<chrono::Utc>>,
}

impl Charge {
    /// The price entry that priced the event, as stored with it: `model` or
    /// `model@<effective_from RFC 3339>`; empty when no entry priced it.
    pub fn price_entry(&self) -> String {
        match self.price_version {
            Some(from) => {
                format!("{}@{}", self.priced_model, from.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true))
            }
            None => self.priced_model.clone(),
        }
    }
}

/// A catalog's version: the first 16 hex digits of the SHA-256 of its file text. Two
/// files with the same text are the same version wherever they are loaded.
pub fn catalog_version(text: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(text.as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

/// Why an event costs what it costs. Free reasons first, then the charged ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChargeReason {
    /// `status = error`: logged, never charged.
    FailedCall,
    /// `billing_mode = byok`: the customer's own key paid the provider.
    Byok,
    /// The provider is `local` (self-hosted, e.g. Ollama).
    LocalModel,
    /// No entry for the model and no `default_model`: free, flagged for review.
    UnknownModel,
    /// Success, but no usage at all (every count zero, no per-call fee).
    ZeroUsage,
    /// Usage present but the entry has no rate for any of it (a catalog gap).
    NoRate,
    /// Usage priced at a rate of zero (a free feature or model).
    ZeroRate,
    /// A positive exact cost below half an internal unit (1e-8 USD) rounded to zero.
    RoundedToZero,
    /// The cost does not fit `i64` units (over ~$92 billion: an absurd event). Nothing
    /// representable can be charged, so it is not charged; dead-letter it for review.
    CostOverflow,
    /// Charged at catalog price.
    Priced,
    /// Charged, and the model was priced by the catalog's default model.
    DefaultModelFallback,
    /// Charged `upstream x markup`, which exceeded the catalog cost.
    UpstreamFloor,
    /// Charged the catalog's minimum charge, which exceeded the computed cost.
    MinimumCharge,
    /// Set by the ledger, not the catalog: the event's reservation was settled and its
    /// deadline passed before the event arrived, so the settled amount was billed then
    /// (`ledger::reservations`); the event itself is recorded but not charged again.
    PaidByHold,
}

impl ChargeReason {
    pub const ALL: [ChargeReason; 14] = [
        ChargeReason::FailedCall,
        ChargeReason::Byok,
        ChargeReason::LocalModel,
        ChargeReason::UnknownModel,
        ChargeReason::ZeroUsage,
        ChargeReason::NoRate,
        ChargeReason::ZeroRate,
        ChargeReason::RoundedToZero,
        ChargeReason::CostOverflow,
        ChargeReason::Priced,
        ChargeReason::DefaultModelFallback,
        ChargeReason::UpstreamFloor,
        ChargeReason::MinimumCharge,
        ChargeReason::PaidByHold,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            ChargeReason::FailedCall => "failed_call",
            ChargeReason::Byok => "byok",
            ChargeReason::LocalModel => "local_model",
            ChargeReason::UnknownModel => "unknown_model",
            ChargeReason::ZeroUsage => "zero_usage",
            ChargeReason::NoRate => "no_rate",
            ChargeReason::ZeroRate => "zero_rate",
            ChargeReason::RoundedToZero => "rounded_to_zero",
            ChargeReason::Priced => "priced",
            ChargeReason::DefaultModelFallback => "default_model_fallback",
            ChargeReason::UpstreamFloor => "upstream_floor",
            ChargeReason::MinimumCharge => "minimum_charge",
            ChargeReason::PaidByHold => "paid_by_hold",
            ChargeReason::CostOverflow => "cost_overflow",
        }
    }
}

impl std::fmt::Display for ChargeReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A catalog that cannot be loaded. Every variant names the file (`origin`).
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{origin}: cannot read the catalog: {source}")]
    Io {
        origin: String,
        #[source]
        source: std::io::Error,
    },
    /// The TOML does not parse, or its shape is wrong (unknown key, wrong type).
    #[error("{origin}:{line}:{column}: `{key}`: {problem}")]
    Syntax { origin: String, line: usize, column: usize, key: String, problem: String },
    /// Parsed, but a value breaks a rule (negative rate, duplicate model, ...).
    #[error("{origin}: `{key}`: {problem}")]
    Invalid { origin: String, key: String, problem: String },
}

impl Catalog {
    /// Parse and validate a catalog. `origin` names the file in errors.
    pub fn from_toml_str(text: &str, origin: &str) -> Result<Catalog, CatalogError> {
        compile::compile(text, origin)
    }

    /// Read and validate a catalog file.
    pub fn load(path: &Path) -> Result<Catalog, CatalogError> {
        let origin = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogError::Io { origin: origin.clone(), source })?;
        Catalog::from_toml_str(&text, &origin)
    }

    /// The `origin` given at load (the file name).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// This catalog's [`catalog_version`].
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The same, shared: every priced item carries it without copying the text.
    pub fn version_shared(&self) -> std::sync::Arc<str> {
        self.version.clone()
    }

    /// The text it was compiled from.
    pub fn text(&self) -> &str {
        &self.text
    }

    /// `[catalog] name`, or the origin when the file gives none.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Every entry id, in file order.
    pub fn model_ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| e.id.as_str())
    }

    /// The `default_model`, if the catalog has one.
    pub fn default_model(&self) -> Option<&str> {
        self.default_entry.map(|i| self.entries[i].id.as_str())
    }

    /// True when some version of entry `id` has long-context tiers.
    pub fn has_long_context(&self, id: &str) -> bool {
        self.entry_by_id(id).is_some_and(|e| e.versions.iter().any(|v| !v.rates.long_context.is_empty()))
    }

    /// True when some version of entry `id` charges a flat per-call fee.
    pub fn has_per_call_fee(&self, id: &str) -> bool {
        self.entry_by_id(id).is_some_and(|e| e.versions.iter().any(|v| v.rates.per_call.is_some()))
    }

    /// The minimum charge in internal units (0 when the catalog sets none).
    pub fn minimum_charge_units(&self) -> i64 {
        self.minimum_charge_units
    }

    /// Whether `cost = max(catalog, upstream x markup)` is enabled.
    pub fn upstream_floor(&self) -> bool {
        self.upstream_floor
    }

    /// The unit to show balances in (`[catalog.display]`, USD when absent).
    pub fn display_unit(&self) -> &DisplayUnit {
        &self.display
    }

    /// The model tier of the entry that prices `model` called through `provider` (the
    /// lookup of [`Catalog::lookup`] without the default-model fallback: an unknown model
    /// has no tier).
    pub fn model_tier(&self, provider: &str, model: &str) -> Option<&str> {
        self.find_named(model, provider).and_then(|i| self.entries[i].tier.as_deref())
    }

    /// True when the catalog defines `[catalog.model_tiers.NAME]`.
    pub fn has_tier(&self, name: &str) -> bool {
        self.tier_names.iter().any(|t| t == name)
    }

    fn entry_by_id(&self, id: &str) -> Option<&Entry> {
        self.by_name.get(id).map(|&index| &self.entries[index])
    }
}
