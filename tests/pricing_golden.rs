//! Golden prices for the five seed catalogs in `examples/`. Every expected amount is
//! worked out by hand in the comment above it, from the seed's own table (or from the
//! example's documented "plausible" rate where the seed gives no number).

use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::str::FromStr;
use tally::event::{UsageEvent, parse_json_line};
use tally::money;
use tally::pricing::{Catalog, Charge, ChargeReason};

const BROKR: &str = include_str!("../examples/brokr.toml");
const REEVE: &str = include_str!("../examples/reeve.toml");
const BRIEVIO: &str = include_str!("../examples/brievio.toml");
const BROOMVA: &str = include_str!("../examples/broomva.toml");
const STRUERE: &str = include_str!("../examples/struere.toml");

fn catalog(text: &str, origin: &str) -> Catalog {
    Catalog::from_toml_str(text, origin).unwrap_or_else(|e| panic!("{e}"))
}

/// A successful chat event on 2025-10-01 with `fields` merged in.
fn event(fields: Value) -> UsageEvent {
    let mut raw = json!({
        "event_id": "golden", "occurred_at": "2025-10-01T12:00:00Z", "account_id": "acct",
        "modality": "chat", "status": "success",
    });
    if let (Some(base), Value::Object(extra)) = (raw.as_object_mut(), fields) {
        base.extend(extra);
    }
    parse_json_line(&raw.to_string()).unwrap_or_else(|e| panic!("bad golden event: {e}"))
}

/// Exact USD ("0.00938") -> internal units.
fn usd(amount: &str) -> i64 {
    let d = Decimal::from_str(amount).unwrap_or_else(|e| panic!("{amount}: {e}"));
    money::usd_to_units(d).unwrap_or_else(|| panic!("{amount} overflows"))
}

/// Price `fields` and check the cost (USD string) and reason.
fn check(c: &Catalog, fields: Value, cost_usd: &str, reason: ChargeReason) -> Charge {
    let charge = c.price(&event(fields.clone()));
    assert_eq!((charge.cost_units, charge.reason), (usd(cost_usd), reason), "{}: {fields}", c.name());
    assert_eq!(charge.charged, charge.cost_units > 0);
    charge
}

// ---- Brokr (000): one price per provider ------------------------------------------------

#[test]
fn brokr_prices_per_provider() {
    let c = catalog(BROKR, "brokr.toml");
    // OpenAI row: 1,000 x $3.13/1M + 500 x $12.50/1M = $0.00313 + $0.00625 = $0.00938
    let charge = check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o", "input_tokens": 1000, "output_tokens": 500}),
        "0.00938",
        ChargeReason::Priced,
    );
    assert_eq!((charge.priced_model.as_str(), charge.model_fallback), ("openai", false));
    // Any OpenAI model gets the row: o3 with the same counts costs the same.
    check(
        &c,
        json!({"provider": "openai", "model": "o3", "input_tokens": 1000, "output_tokens": 500}),
        "0.00938",
        ChargeReason::Priced,
    );
    // Anthropic row: 2,000 x $3.75/1M + 1,000 x $18.75/1M = $0.0075 + $0.01875 = $0.02625
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 2000, "output_tokens": 1000}),
        "0.02625",
        ChargeReason::Priced,
    );
    // Deepseek row, reasoning inside output at the output rate:
    // 1M x $0.35/1M + 1M x $1.43/1M = $1.78
    check(
        &c,
        json!({"provider": "deepseek", "model": "deepseek-reasoner", "input_tokens": 1_000_000, "output_tokens": 1_000_000, "reasoning_tokens": 600_000}),
        "1.78",
        ChargeReason::Priced,
    );
}

#[test]
fn brokr_edges() {
    let c = catalog(BROKR, "brokr.toml");
    // One token: $0.35/1M = $0.00000035 = 35 units; $12.50/1M = $0.0000125 = 1,250 units.
    check(
        &c,
        json!({"provider": "deepseek", "model": "deepseek-chat", "input_tokens": 1}),
        "0.00000035",
        ChargeReason::Priced,
    );
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o", "output_tokens": 1}),
        "0.0000125",
        ChargeReason::Priced,
    );
    // No cache discount in the seed: 1,000 input of which 800 cached = 1,000 x $3.13/1M.
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o", "input_tokens": 1000, "cached_input_tokens": 800}),
        "0.00313",
        ChargeReason::Priced,
    );
    // A provider not in the table: free, flagged.
    let unknown = check(
        &c,
        json!({"provider": "google", "model": "gemini-2.5-pro", "input_tokens": 1000}),
        "0",
        ChargeReason::UnknownModel,
    );
    assert!(unknown.model_fallback);
    // Failed call: logged, free.
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o", "status": "error", "input_tokens": 1000}),
        "0",
        ChargeReason::FailedCall,
    );
    // "Everything else is flat": the plausible per-call features.
    check(
        &c,
        json!({"provider": "brokr", "model": "-", "modality": "feature", "feature": "web_search"}),
        "0.005",
        ChargeReason::Priced,
    );
    check(
        &c,
        json!({"provider": "brokr", "model": "-", "modality": "feature", "feature": "email_send"}),
        "0.001",
        ChargeReason::Priced,
    );
}

// ---- Reeve (001): credits = USD, BYOK free, quota features not credit-metered ----------

#[test]
fn reeve_reproduces_the_seed_deductions() {
    let c = catalog(REEVE, "reeve.toml");
    assert_eq!(c.display_unit().unit_name, "credit");
    assert_eq!(c.display_unit().units_per_display_unit, money::UNITS_PER_USD);
    // Seed: `"amount": 0.05`. claude-haiku-4-5: 10,000 x $1/1M + 8,000 x $5/1M = $0.01 + $0.04
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-haiku-4-5", "input_tokens": 10_000, "output_tokens": 8_000}),
        "0.05",
        ChargeReason::Priced,
    );
    // Seed: `"amount": 0.12`. gpt-4o: 8,000 x $2.50/1M + 10,000 x $10/1M = $0.02 + $0.10
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o", "input_tokens": 8_000, "output_tokens": 10_000}),
        "0.12",
        ChargeReason::Priced,
    );
    // Cache: sonnet, 10,000 input = 1,000 plain + 8,000 read + 1,000 write:
    // 1,000 x $3 + 8,000 x $0.30 + 1,000 x $3.75, per 1M = $0.003 + $0.0024 + $0.00375 = $0.00915
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 10_000, "cached_input_tokens": 8_000, "cache_write_tokens": 1_000}),
        "0.00915",
        ChargeReason::Priced,
    );
}

#[test]
fn reeve_byok_and_features_are_free() {
    let c = catalog(REEVE, "reeve.toml");
    let byok = check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "billing_mode": "byok", "input_tokens": 100_000}),
        "0",
        ChargeReason::Byok,
    );
    assert_eq!((byok.priced_model.as_str(), byok.model_fallback), ("claude-sonnet-4-5", false));
    for feature in
        ["ad_generations", "brand_analyses", "connector_syncs", "dashboard_refreshes", "goal_creations"]
    {
        let charge = check(
            &c,
            json!({"provider": "reeve", "model": "-", "modality": "feature", "feature": feature}),
            "0",
            ChargeReason::ZeroRate,
        );
        assert!(!charge.model_fallback, "{feature}");
    }
}

// ---- Brievio (002): max(catalog, upstream x markup), cache-aware, micro-cents ----------

#[test]
fn brievio_floor_is_cache_aware() {
    let c = catalog(BRIEVIO, "brievio.toml");
    let sonnet = json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 100_000, "cached_input_tokens": 80_000, "output_tokens": 1_000});
    // Catalog: 20,000 x $3 + 80,000 x $0.30 (0.10x) + 1,000 x $15, per 1M
    //        = $0.06 + $0.024 + $0.015 = $0.099. (Without the cache discount: $0.315.)
    // Upstream $0.05 x 1.5 = $0.075 < $0.099: the catalog price stands.
    let mut normal = sonnet.clone();
    normal["upstream_cost"] = json!("0.05");
    check(&c, normal, "0.099", ChargeReason::Priced);
    // Upstream spike: $0.08 x 1.5 = $0.12 > $0.099: the floor wins.
    let mut spike = sonnet;
    spike["upstream_cost"] = json!("0.08");
    let charge = check(&c, spike, "0.12", ChargeReason::UpstreamFloor);
    assert_eq!((charge.catalog_cost_units, charge.upstream_cost_units), (usd("0.099"), usd("0.08")));
}

#[test]
fn brievio_token_rules() {
    let c = catalog(BRIEVIO, "brievio.toml");
    // Cache writes at the plain input rate: 10,000 x $3/1M = $0.03.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 10_000, "cache_write_tokens": 10_000}),
        "0.03",
        ChargeReason::Priced,
    );
    // OpenAI and Gemini reads at 0.20x: 10,000 x $1.25 x 0.2 / 1M = $0.0025 for both.
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-5", "input_tokens": 10_000, "cached_input_tokens": 10_000}),
        "0.0025",
        ChargeReason::Priced,
    );
    check(
        &c,
        json!({"provider": "google", "model": "gemini-2.5-pro", "input_tokens": 10_000, "cached_input_tokens": 10_000}),
        "0.0025",
        ChargeReason::Priced,
    );
    // Reasoning at the output rate: 1,000 output (800 reasoning) x $10/1M = $0.01.
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-5", "output_tokens": 1_000, "reasoning_tokens": 800}),
        "0.01",
        ChargeReason::Priced,
    );
    // Long context, at the threshold: 200,000 x $3/1M + 1,000 x $15/1M = $0.6 + $0.015.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 200_000, "output_tokens": 1_000}),
        "0.615",
        ChargeReason::Priced,
    );
    // One token more and the whole request takes the tier:
    // 200,001 x $6/1M + 1,000 x $22.50/1M = $1.200006 + $0.0225 = $1.222506.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 200_001, "output_tokens": 1_000}),
        "1.222506",
        ChargeReason::Priced,
    );
    // Tier + cache: 300,000 input, 200,000 cached: 100,000 x $6 + 200,000 x $0.60 (0.10x
    // of the tier's $6), per 1M = $0.6 + $0.12 = $0.72.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 300_000, "cached_input_tokens": 200_000}),
        "0.72",
        ChargeReason::Priced,
    );
}

#[test]
fn brievio_minimum_failed_and_rounding() {
    let c = catalog(BRIEVIO, "brievio.toml");
    // 1 token x $0.15/1M = $0.00000015 (15 units) < $0.000001 minimum: billed at the floor.
    let min = check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 1}),
        "0.000001",
        ChargeReason::MinimumCharge,
    );
    assert_eq!(min.catalog_cost_units, 15);
    // Failed call: free, but the upstream cost is still recorded.
    let failed = check(
        &c,
        json!({"provider": "openai", "model": "gpt-5", "status": "error", "input_tokens": 5_000, "upstream_cost": "0.02"}),
        "0",
        ChargeReason::FailedCall,
    );
    assert_eq!(failed.upstream_cost_units, usd("0.02"));
    // Half to even on the floor: 1 output token = $15/1M = 1,500 units; upstream
    // 1,001 units x 1.5 = 1,501.5 -> 1,502 (even); 1,003 x 1.5 = 1,504.5 -> 1,504 (even).
    let one = |upstream: &str| json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "output_tokens": 1, "upstream_cost": upstream});
    check(&c, one("0.00001001"), "0.00001502", ChargeReason::UpstreamFloor);
    check(&c, one("0.00001003"), "0.00001504", ChargeReason::UpstreamFloor);
    // Unknown model, no default: free, flagged.
    check(
        &c,
        json!({"provider": "mistral", "model": "mistral-large", "input_tokens": 10}),
        "0",
        ChargeReason::UnknownModel,
    );
}

#[test]
fn brievio_china_markup_is_1_2() {
    let c = catalog(BRIEVIO, "brievio.toml");
    // deepseek-chat: 1M x $0.28/1M = $0.28; upstream $0.25 x 1.2 = $0.30 > $0.28.
    check(
        &c,
        json!({"provider": "deepseek", "model": "deepseek-chat", "input_tokens": 1_000_000, "upstream_cost": "0.25"}),
        "0.30",
        ChargeReason::UpstreamFloor,
    );
    // kling-2.1 (model-level 1.2): 1 clip at 1080p = $0.45; upstream $0.40 x 1.2 = $0.48.
    // (At the provider's 1.5 it would have been $0.60.)
    check(
        &c,
        json!({"provider": "kuaishou", "model": "kling-2.1", "modality": "video", "video_clips": 1, "resolution": "1080p", "upstream_cost": "0.40"}),
        "0.48",
        ChargeReason::UpstreamFloor,
    );
}

#[test]
fn brievio_media() {
    let c = catalog(BRIEVIO, "brievio.toml");
    let image = |model: &str, n: u64, res: &str| json!({"provider": "openai", "model": model, "modality": "image", "images": n, "resolution": res});
    // 2 x $0.063 = $0.126; an unlisted size bills the highest rate, $0.063.
    check(&c, image("gpt-image-1", 2, "1536x1024"), "0.126", ChargeReason::Priced);
    check(&c, image("gpt-image-1", 1, "1024x1024"), "0.042", ChargeReason::Priced);
    check(&c, image("gpt-image-1", 1, "2048x2048"), "0.063", ChargeReason::Priced);
    // flux: 3 x $0.04. A generation with no delivered image (images = 0) costs nothing.
    check(&c, image("flux-1.1-pro", 3, "1024x1024"), "0.12", ChargeReason::Priced);
    check(&c, image("flux-1.1-pro", 0, "1024x1024"), "0", ChargeReason::ZeroUsage);
    // veo-3-fast per clip: 2 x $1.20 at 720p; "4k" is unlisted -> the `default` $1.20.
    let video = |clips: u64, res: &str| json!({"provider": "google", "model": "veo-3-fast", "modality": "video", "video_clips": clips, "resolution": res});
    check(&c, video(2, "720p"), "2.40", ChargeReason::Priced);
    check(&c, video(1, "4k"), "1.20", ChargeReason::Priced);
    // wan-2.5 per second: 10 s x $0.15 at 1080p = $1.50.
    check(
        &c,
        json!({"provider": "alibaba", "model": "wan-2.5", "modality": "video", "video_seconds": 10, "resolution": "1080p"}),
        "1.50",
        ChargeReason::Priced,
    );
    // tts-1: 2,000 characters x $15/1M = $0.03.
    check(
        &c,
        json!({"provider": "openai", "model": "tts-1", "modality": "audio", "characters": 2_000}),
        "0.03",
        ChargeReason::Priced,
    );
}

#[test]
fn brievio_versions_follow_occurred_at() {
    let c = catalog(BRIEVIO, "brievio.toml");
    let flash = |at: &str| json!({"provider": "google", "model": "gemini-2.5-flash", "occurred_at": at, "input_tokens": 1_000_000, "output_tokens": 1_000_000});
    // Preview prices: $0.15 + $0.60. GA prices from 2025-06-17: $0.30 + $2.50.
    check(&c, flash("2025-05-01T00:00:00Z"), "0.75", ChargeReason::Priced);
    check(&c, flash("2025-06-16T23:59:59Z"), "0.75", ChargeReason::Priced);
    check(&c, flash("2025-06-17T00:00:00Z"), "2.80", ChargeReason::Priced);
    // Before the first version: the earliest version applies.
    check(&c, flash("2024-01-01T00:00:00Z"), "0.75", ChargeReason::Priced);
}

#[test]
fn brievio_display_rounds_to_6_decimals_then_2() {
    // Seed: "Dashboard display rounds to 6 decimals (USD) for small values and 2 decimals
    // once it crosses cents. Internal accounting is exact."
    let c = catalog(BRIEVIO, "brievio.toml");
    let shown = |usd_text: &str| c.display_unit().amount(usd(usd_text)).shown;
    assert_eq!(shown("0.00493812"), "0.004938");
    assert_eq!(shown("0.0099999"), "0.010000");
    assert_eq!(shown("0.099"), "0.10");
    assert_eq!(shown("18.5"), "18.50");
    assert_eq!(c.display_unit().amount(usd("0.00493812")).value, "0.00493812", "and exact beside it");
    assert_eq!(c.minimum_charge_units(), 100);
}

// ---- BroomVA (003): model-tier credits per 10K tokens, 1 credit = 1 cent ----------------

#[test]
fn broomva_tiers() {
    let c = catalog(BROOMVA, "broomva.toml");
    assert_eq!(c.display_unit().units_per_display_unit, money::UNITS_PER_CENT);
    // Medium: 6,000 + 4,000 = 10,000 tokens x 3 credits/10K = 3 credits = $0.03.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 6_000, "output_tokens": 4_000}),
        "0.03",
        ChargeReason::Priced,
    );
    // Small: 12,345 tokens x 1 credit/10K = 1.2345 credits = $0.012345.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-haiku-4-5", "input_tokens": 10_000, "output_tokens": 2_345}),
        "0.012345",
        ChargeReason::Priced,
    );
    // Large: 25,000 tokens x 15 credits/10K = 37.5 credits = $0.375.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-opus-4-1", "input_tokens": 20_000, "output_tokens": 5_000}),
        "0.375",
        ChargeReason::Priced,
    );
    // Reasoning counts as output: o1, 1,000 + 9,000 (8,000 reasoning) = 10,000 x 15 = $0.15.
    check(
        &c,
        json!({"provider": "openai", "model": "o1", "input_tokens": 1_000, "output_tokens": 9_000, "reasoning_tokens": 8_000}),
        "0.15",
        ChargeReason::Priced,
    );
    // Cached tokens count in full (decision): 10,000 cached x 1 credit/10K = $0.01.
    check(
        &c,
        json!({"provider": "openai", "model": "gpt-4o-mini", "input_tokens": 10_000, "cached_input_tokens": 10_000}),
        "0.01",
        ChargeReason::Priced,
    );
    // One token on a small model: 0.0001 credit = $0.000001 = 100 units.
    check(
        &c,
        json!({"provider": "google", "model": "gemini-2.5-flash", "output_tokens": 1}),
        "0.000001",
        ChargeReason::Priced,
    );
    // Aliases: claude-sonnet-4 is medium: 10,000 tokens = $0.03.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4", "input_tokens": 10_000}),
        "0.03",
        ChargeReason::Priced,
    );
}

#[test]
fn broomva_local_community_and_unknown() {
    let c = catalog(BROOMVA, "broomva.toml");
    let local = check(
        &c,
        json!({"provider": "ollama", "model": "llama3.3", "input_tokens": 50_000, "output_tokens": 5_000}),
        "0",
        ChargeReason::LocalModel,
    );
    assert!(!local.model_fallback);
    // Any OpenRouter model is small: 10,000 tokens = 1 credit.
    check(
        &c,
        json!({"provider": "openrouter", "model": "meta-llama/llama-3.3-70b-instruct", "input_tokens": 10_000}),
        "0.01",
        ChargeReason::Priced,
    );
    check(
        &c,
        json!({"provider": "mistral", "model": "mistral-large", "input_tokens": 10_000}),
        "0",
        ChargeReason::UnknownModel,
    );
    // 3 credits shown as credits.
    assert_eq!(money::units_to_coarse(usd("0.03"), c.display_unit().units_per_display_unit), 3);
}

// ---- Struere (004): base rates + 10% markup, default-model fallback, messages -----------

/// The seed's pricing table, verbatim: (model, input per 1M, output per 1M).
const STRUERE_TABLE: [(&str, &str, &str); 36] = [
    ("claude-haiku-4-5", "1.10", "5.50"),
    ("claude-sonnet-4", "3.30", "16.50"),
    ("claude-sonnet-4-5", "3.30", "16.50"),
    ("claude-sonnet-4-6", "3.30", "16.50"),
    ("claude-opus-4", "16.50", "82.50"),
    ("claude-opus-4-5", "5.50", "27.50"),
    ("claude-opus-4-6", "5.50", "27.50"),
    ("gpt-4o-mini", "0.165", "0.66"),
    ("gpt-4o", "2.75", "11.00"),
    ("gpt-4.1-nano", "0.11", "0.44"),
    ("gpt-4.1-mini", "0.44", "1.76"),
    ("gpt-4.1", "2.20", "8.80"),
    ("gpt-5-nano", "0.055", "0.44"),
    ("gpt-5-mini", "0.275", "2.20"),
    ("gpt-5", "1.375", "11.00"),
    ("gpt-5.1", "1.375", "11.00"),
    ("gpt-5.2", "1.925", "15.40"),
    ("o1", "16.50", "66.00"),
    ("o1-mini", "1.21", "4.84"),
    ("o1-pro", "165.00", "660.00"),
    ("o3", "2.20", "8.80"),
    ("o3-mini", "1.21", "4.84"),
    ("o3-pro", "22.00", "88.00"),
    ("o4-mini", "1.21", "4.84"),
    ("gemini-2.0-flash", "0.11", "0.44"),
    ("gemini-2.5-flash", "0.33", "2.75"),
    ("gemini-2.5-pro", "1.375", "11.00"),
    ("grok-3", "3.30", "16.50"),
    ("grok-3-mini", "0.33", "0.55"),
    ("grok-4-0709", "3.30", "16.50"),
    ("grok-4-1-fast", "0.22", "0.55"),
    ("grok-4-1-fast-reasoning", "0.22", "0.55"),
    ("grok-4-1-fast-non-reasoning", "0.22", "0.55"),
    ("grok-4-fast-reasoning", "0.22", "0.55"),
    ("grok-4-fast-non-reasoning", "0.22", "0.55"),
    ("grok-code-fast-1", "0.22", "1.65"),
];

#[test]
fn struere_charges_the_published_table_exactly() {
    let c = catalog(STRUERE, "struere.toml");
    for (model, input, output) in STRUERE_TABLE {
        // 1M tokens cost exactly the published per-1M price (base rate x 1.10).
        check(
            &c,
            json!({"provider": "any", "model": model, "input_tokens": 1_000_000}),
            input,
            ChargeReason::Priced,
        );
        check(
            &c,
            json!({"provider": "any", "model": model, "output_tokens": 1_000_000}),
            output,
            ChargeReason::Priced,
        );
    }
    // The seed's formula: (12,000 x 3.30 + 3,000 x 16.50) / 1,000,000 = $0.0396 + $0.0495
    // = $0.0891 = 89,100 microdollars.
    let charge = check(
        &c,
        json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 12_000, "output_tokens": 3_000}),
        "0.0891",
        ChargeReason::Priced,
    );
    assert_eq!(money::units_to_coarse(charge.cost_units, money::UNITS_PER_MICRODOLLAR), 89_100);
    // All input tokens at the input rate, cached or not: 10,000 x $1.10/1M = $0.011.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-haiku-4-5", "input_tokens": 10_000, "cached_input_tokens": 9_000}),
        "0.011",
        ChargeReason::Priced,
    );
    // OpenRouter-style ids resolve without the prefix.
    check(
        &c,
        json!({"provider": "openrouter", "model": "anthropic/claude-sonnet-4", "input_tokens": 1_000_000}),
        "3.30",
        ChargeReason::Priced,
    );
}

#[test]
fn struere_default_model_fallback() {
    let c = catalog(STRUERE, "struere.toml");
    // Unknown model -> grok-4-1-fast at $0.22 / $0.55: 1M + 1M = $0.77, flagged.
    let charge = check(
        &c,
        json!({"provider": "mistral", "model": "mistral-large", "input_tokens": 1_000_000, "output_tokens": 1_000_000}),
        "0.77",
        ChargeReason::DefaultModelFallback,
    );
    assert_eq!((charge.priced_model.as_str(), charge.model_fallback), ("grok-4-1-fast", true));
    // BYOK (direct or OpenRouter key): no credits consumed.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-opus-4", "billing_mode": "byok", "input_tokens": 1_000_000}),
        "0",
        ChargeReason::Byok,
    );
    // A failed call releases its reservation: nothing is deducted.
    check(
        &c,
        json!({"provider": "anthropic", "model": "claude-opus-4", "status": "error", "input_tokens": 1_000_000}),
        "0",
        ChargeReason::FailedCall,
    );
}

#[test]
fn struere_half_to_even_at_the_smallest_unit() {
    let c = catalog(STRUERE, "struere.toml");
    let input = |model: &str, n: u64| {
        c.price(&event(json!({"provider": "openai", "model": model, "input_tokens": n}))).cost_units
    };
    // gpt-4o-mini: $0.165/1M per token = 16.5 units: 1 token -> 16 (even), 3 -> 49.5 -> 50.
    assert_eq!(input("gpt-4o-mini", 1), 16);
    assert_eq!(input("gpt-4o-mini", 3), 50);
    // gpt-5-nano: $0.055/1M = 5.5 units: 1 token -> 6 (even), 3 -> 16.5 -> 16.
    assert_eq!(input("gpt-5-nano", 1), 6);
    assert_eq!(input("gpt-5-nano", 3), 16);
    // Microdollars follow the same rule: 16 units = 0.16 microdollar -> 0; 50 -> 0.5 -> 0.
    assert_eq!(money::units_to_coarse(50, money::UNITS_PER_MICRODOLLAR), 0);
    assert_eq!(money::units_to_coarse(150, money::UNITS_PER_MICRODOLLAR), 2);
}

#[test]
fn struere_messages() {
    let c = catalog(STRUERE, "struere.toml");
    let whatsapp = |n: u64, category: &str| json!({"provider": "meta", "model": "whatsapp", "modality": "message", "messages": n, "message_category": category});
    check(&c, whatsapp(1, "marketing"), "0.025", ChargeReason::Priced);
    check(&c, whatsapp(3, "utility"), "0.012", ChargeReason::Priced);
    check(&c, whatsapp(2, "service"), "0", ChargeReason::ZeroRate);
    // Unknown category: the highest rate (marketing).
    check(&c, whatsapp(1, "promo"), "0.025", ChargeReason::Priced);
    // Email: 10 x $0.0004 = $0.004.
    check(
        &c,
        json!({"provider": "email", "model": "email", "modality": "email", "messages": 10}),
        "0.004",
        ChargeReason::Priced,
    );
}

#[test]
fn load_reads_a_file_and_names_it_in_errors() {
    let dir = std::env::temp_dir().join(format!("tally-golden-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("{e}"));
    let good = dir.join("brokr.toml");
    std::fs::write(&good, BROKR).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(Catalog::load(&good).map(|c| c.name().to_string()).ok(), Some("brokr".to_string()));
    let bad = dir.join("bad.toml");
    std::fs::write(&bad, BROKR.replace("\"12.50\"", "\"-12.50\"")).unwrap_or_else(|e| panic!("{e}"));
    let message = Catalog::load(&bad).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(
        message.contains("bad.toml")
            && message.contains("output_per_1m_tokens")
            && message.contains("negative"),
        "{message}"
    );
    let missing = Catalog::load(&dir.join("nope.toml")).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(missing.contains("nope.toml"), "{missing}");
    let _ = std::fs::remove_dir_all(&dir);
}
