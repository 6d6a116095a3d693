//! Unit tests: catalog validation, charge reasons, version selection, CLI, import.
//! Per-seed prices are in `tests/pricing_golden.rs`, properties in `tests/pricing_props.rs`.

use super::*;
use crate::event::{UsageEvent, parse_json_line};
use serde_json::{Value, json};

const EXAMPLES: [(&str, &str); 5] = [
    ("brokr.toml", include_str!("../../examples/brokr.toml")),
    ("reeve.toml", include_str!("../../examples/reeve.toml")),
    ("brievio.toml", include_str!("../../examples/brievio.toml")),
    ("broomva.toml", include_str!("../../examples/broomva.toml")),
    ("struere.toml", include_str!("../../examples/struere.toml")),
];

/// A small catalog exercising every rule; tests override parts of it.
const BASE: &str = r#"
[catalog]
name = "unit"
upstream_floor = true
minimum_charge_usd = "0.000001"
default_model = "chat-a"

[catalog.providers.acme]
cache_read_multiplier = "0.1"
upstream_markup = "1.5"
[catalog.providers.ollama]
local = true

[[catalog.models]]
id = "chat-a"
provider = "acme"
aliases = ["chat-a-2025"]
[[catalog.models.prices]]
effective_from = "2025-01-01T00:00:00Z"
input_per_1m_tokens = "1"
output_per_1m_tokens = "2"
[[catalog.models.prices]]
effective_from = 2025-06-01T00:00:00Z
input_per_1m_tokens = "2"
output_per_1m_tokens = "4"
[[catalog.models.prices.long_context]]
above_input_tokens = 1000
input_per_1m_tokens = "3"

[[catalog.models]]
id = "img"
provider = "acme"
[[catalog.models.prices]]
per_image = { "512" = "0.01", "1024" = "0.02" }

[[catalog.models]]
id = "free-feature"
provider = "acme"
[[catalog.models.prices]]
per_call = "0"
"#;

fn catalog(text: &str) -> Catalog {
    match Catalog::from_toml_str(text, "unit.toml") {
        Ok(c) => c,
        Err(e) => panic!("catalog should load: {e}"),
    }
}

fn load_error(text: &str) -> String {
    match Catalog::from_toml_str(text, "unit.toml") {
        Ok(_) => panic!("catalog should be rejected"),
        Err(e) => e.to_string(),
    }
}

/// A valid chat event with `overrides` merged in.
fn event(overrides: Value) -> UsageEvent {
    let mut raw = json!({
        "event_id": "e1", "occurred_at": "2025-07-01T00:00:00Z", "account_id": "a1",
        "provider": "acme", "model": "chat-a", "modality": "chat", "status": "success",
    });
    if let (Some(base), Value::Object(extra)) = (raw.as_object_mut(), overrides) {
        base.extend(extra);
    }
    match parse_json_line(&raw.to_string()) {
        Ok(e) => e,
        Err(e) => panic!("test event should parse: {e}"),
    }
}

#[test]
fn every_example_catalog_loads() {
    for (name, text) in EXAMPLES {
        let c = catalog(text);
        assert!(c.model_ids().count() > 0, "{name}");
    }
}

#[test]
fn catalog_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Catalog>();
}

#[test]
fn display_units_show_each_platforms_amounts() {
    let shown = |c: &Catalog, units: i64| {
        let a = c.display_unit().amount(units);
        (a.value, a.shown)
    };
    let s = |a: &str, b: &str| (a.to_string(), b.to_string());
    // Brievio: USD, 6 decimals below a cent, 2 once past it.
    let brievio = catalog(EXAMPLES[2].1);
    assert_eq!(brievio.display_unit().unit_name, "USD");
    assert_eq!(shown(&brievio, 493_800), s("0.004938", "0.004938"));
    assert_eq!(shown(&brievio, 1_850_000_000), s("18.5", "18.50"));
    assert_eq!(shown(&brievio, 1_234_567_891), s("12.34567891", "12.35"));
    assert_eq!(shown(&brievio, -49_382), s("-0.00049382", "-0.000494"));
    // BroomVA: 1 credit = 1 cent: $18.50 is 1850 credits.
    let broomva = catalog(EXAMPLES[3].1);
    assert_eq!(broomva.display_unit().units_per_display_unit, crate::money::UNITS_PER_CENT);
    assert_eq!(shown(&broomva, 1_850_000_000), s("1850", "1850.00"));
    assert_eq!(shown(&broomva, 250_000), s("0.25", "0.25"));
    // Reeve: 1 credit = $1; Brokr: USD (no [catalog.display]).
    let reeve = catalog(EXAMPLES[1].1);
    assert_eq!(reeve.display_unit().unit_name, "credit");
    assert_eq!(shown(&reeve, 1_850_000_000), s("18.5", "18.50"));
    let brokr = catalog(EXAMPLES[0].1);
    assert_eq!((brokr.display_unit().unit_name.as_str(), shown(&brokr, 5)), ("USD", s("0.00000005", "0.00")));
    // Struere: integer microdollars, half to even.
    let struere = catalog(EXAMPLES[4].1);
    assert_eq!(shown(&struere, 1_850_000_000), s("18500000", "18500000"));
    assert_eq!(shown(&struere, 250), s("2.5", "2"));
    assert_eq!(shown(&struere, 350), s("3.5", "4"));
    // A unit that would not convert exactly is refused at load.
    let bad =
        "[catalog]\nname = \"t\"\n[catalog.display]\nunit_name = \"c\"\nusd_per_unit = \"0.00000003\"\n";
    assert!(Catalog::from_toml_str(bad, "t").unwrap_err().to_string().contains("exactly"));
}

#[test]
fn versions_are_chosen_by_occurred_at() {
    let c = catalog(BASE);
    let at =
        |t: &str| c.price(&event(json!({"occurred_at": t, "input_tokens": 1_000_000}))).catalog_cost_units;
    // Before every version: the earliest applies. 1M tokens is above the 1000-token tier
    // only in the second version, which has the tier.
    assert_eq!(at("2024-01-01T00:00:00Z"), 100_000_000);
    assert_eq!(at("2025-05-31T23:59:59Z"), 100_000_000);
    assert_eq!(at("2025-06-01T00:00:00Z"), 300_000_000);
}

#[test]
fn long_context_tier_starts_strictly_above_the_threshold() {
    let c = catalog(BASE);
    let cost = |n: u64| c.price(&event(json!({"input_tokens": n}))).catalog_cost_units;
    assert_eq!(cost(1000), 1000 * 200); // $2 per 1M = 200 units per token
    assert_eq!(cost(1001), 1001 * 300); // the whole request at $3 per 1M
}

#[test]
fn free_reasons() {
    let c = catalog(BASE);
    let price = |v: Value| c.price(&event(v));
    let failed = price(json!({"status": "error", "input_tokens": 10, "upstream_cost": "0.5"}));
    assert_eq!(
        (failed.reason, failed.cost_units, failed.upstream_cost_units),
        (ChargeReason::FailedCall, 0, 50_000_000)
    );
    assert_eq!(price(json!({"billing_mode": "byok", "input_tokens": 10})).reason, ChargeReason::Byok);
    let local = price(json!({"provider": "ollama", "model": "llama3", "input_tokens": 10}));
    assert_eq!((local.reason, local.model_fallback), (ChargeReason::LocalModel, false));
    assert_eq!(price(json!({})).reason, ChargeReason::ZeroUsage);
    assert_eq!(price(json!({"model": "img", "input_tokens": 5})).reason, ChargeReason::NoRate);
    let feature = price(json!({"modality": "feature", "feature": "free-feature"}));
    assert_eq!((feature.reason, feature.priced_model.as_str()), (ChargeReason::ZeroRate, "free-feature"));
}

#[test]
fn unknown_model_without_default_is_free_and_flagged() {
    let c = catalog(&BASE.replace("default_model = \"chat-a\"", ""));
    let charge = c.price(&event(json!({"model": "mystery", "input_tokens": 10})));
    assert_eq!(charge.reason, ChargeReason::UnknownModel);
    assert!(charge.model_fallback && !charge.charged && charge.priced_model.is_empty());
}

#[test]
fn unknown_model_falls_back_to_the_default() {
    let c = catalog(BASE);
    let charge = c.price(&event(json!({"model": "mystery", "input_tokens": 1000, "output_tokens": 1000})));
    assert_eq!(charge.reason, ChargeReason::DefaultModelFallback);
    assert_eq!((charge.priced_model.as_str(), charge.model_fallback), ("chat-a", true));
    assert_eq!(charge.cost_units, 1000 * 200 + 1000 * 400);
}

#[test]
fn aliases_and_provider_prefixes_resolve() {
    let c = catalog(BASE);
    for model in ["chat-a-2025", "acme/chat-a", "openrouter/acme/chat-a"] {
        let found = c.lookup(&event(json!({"model": model})));
        assert_eq!(found, Some(ModelMatch { id: "chat-a", fallback: false }), "{model}");
    }
}

#[test]
fn upstream_floor_is_cache_aware_and_minimum_applies_last() {
    let c = catalog(BASE);
    // 1000 input of which 900 cached: 100 x 200 + 900 x 20 = 38,000 units.
    let cached = json!({"input_tokens": 1000, "cached_input_tokens": 900});
    assert_eq!(c.price(&event(cached.clone())).cost_units, 38_000);
    let mut with_upstream = cached;
    with_upstream["upstream_cost"] = json!("0.0003"); // x 1.5 = 45,000 units
    let charge = c.price(&event(with_upstream));
    assert_eq!(
        (charge.cost_units, charge.catalog_cost_units, charge.reason),
        (45_000, 38_000, ChargeReason::UpstreamFloor)
    );
    let tiny = c.price(&event(json!({"input_tokens": 1})));
    assert_eq!((tiny.cost_units, tiny.catalog_cost_units, tiny.reason), (200, 200, ChargeReason::Priced));
    let cheaper = c.price(&event(
        json!({"occurred_at": "2025-02-01T00:00:00Z", "cached_input_tokens": 1, "input_tokens": 1}),
    ));
    // 1 cached token at $0.10 per 1M = 10 units, raised to the 100-unit minimum.
    assert_eq!(
        (cheaper.cost_units, cheaper.catalog_cost_units, cheaper.reason),
        (100, 10, ChargeReason::MinimumCharge)
    );
}

#[test]
fn keyed_rates_fall_back_to_default_or_highest() {
    let c = catalog(BASE);
    let cost = |res: Option<&str>| {
        let mut v = json!({"model": "img", "modality": "image", "images": 2});
        if let Some(r) = res {
            v["resolution"] = json!(r);
        }
        c.price(&event(v)).cost_units
    };
    assert_eq!(cost(Some("512")), 2_000_000);
    assert_eq!(cost(Some("1024")), 4_000_000);
    assert_eq!(cost(Some("4k")), 4_000_000);
    assert_eq!(cost(None), 4_000_000);
    let with_default =
        catalog(&BASE.replace(r#""1024" = "0.02" }"#, r#""1024" = "0.02", default = "0.005" }"#));
    let v = json!({"model": "img", "modality": "image", "images": 2, "resolution": "4k"});
    assert_eq!(with_default.price(&event(v)).cost_units, 1_000_000);
}

#[test]
fn absurd_costs_are_flagged_not_charged() {
    let c = catalog(BASE);
    let mut e = event(json!({"model": "img"}));
    e.counts.images = u64::MAX;
    let charge = c.price(&e);
    assert_eq!((charge.reason, charge.cost_units, charge.charged), (ChargeReason::CostOverflow, 0, false));
}

#[test]
fn rounding_to_zero_is_reported() {
    let text = BASE
        .replace("per_call = \"0\"", "per_call = \"0.000000001\"")
        .replace("minimum_charge_usd = \"0.000001\"", "");
    let c = catalog(&text);
    let charge = c.price(&event(json!({"modality": "feature", "feature": "free-feature"})));
    assert_eq!((charge.reason, charge.cost_units), (ChargeReason::RoundedToZero, 0));
}

#[test]
fn validation_errors_name_file_key_and_problem() {
    let cases: [(&str, &str, &str); 12] = [
        (
            "input_per_1m_tokens = \"1\"",
            "input_per_1m_tokens = \"-1\"",
            "prices[0].input_per_1m_tokens`: -1 is negative",
        ),
        ("input_per_1m_tokens = \"1\"", "input_per_1m_tokens = 1.5", "is a TOML float"),
        ("input_per_1m_tokens = \"1\"", "input_per_1m_tokens = \"0.000000000000001\"", "decimal places"),
        (
            "upstream_markup = \"1.5\"",
            "upstream_markup = \"0.9\"",
            "catalog.providers.acme.upstream_markup`: 0.9 is outside [1, 100]",
        ),
        (
            "default_model = \"chat-a\"",
            "default_model = \"nope\"",
            "catalog.default_model`: \"nope\" is not a model",
        ),
        ("id = \"img\"", "id = \"chat-a\"", "duplicate model"),
        ("aliases = [\"chat-a-2025\"]", "aliases = [\"img\"]", "duplicate model"),
        (
            "id = \"img\"\nprovider = \"acme\"",
            "id = \"img\"\nprovider = \"acne\"",
            "provider \"acne\" is not declared",
        ),
        (
            "effective_from = 2025-06-01T00:00:00Z",
            "effective_from = 2025-01-01T00:00:00Z",
            "two versions take effect at",
        ),
        ("effective_from = 2025-06-01T00:00:00Z", "effective_from = 2025-06-01T00:00:00", "not RFC 3339"),
        (
            "above_input_tokens = 1000\ninput_per_1m_tokens = \"3\"",
            "above_input_tokens = 1000\ninput_per_1m_tokens = \"1\"",
            "a longer prompt would cost less",
        ),
        ("per_image = { \"512\" = \"0.01\", \"1024\" = \"0.02\" }", "per_image = {}", "empty table"),
    ];
    for (from, to, expected) in cases {
        assert!(BASE.contains(from), "{from}");
        let message = load_error(&BASE.replacen(from, to, 1));
        assert!(message.starts_with("unit.toml"), "{message}");
        assert!(message.contains(expected), "expected {expected:?} in {message:?}");
    }
}

#[test]
fn structural_errors_give_line_and_key() {
    let message = load_error(&BASE.replace("output_per_1m_tokens = \"2\"", "output_per_1M_tokens = \"2\""));
    assert!(message.starts_with("unit.toml:21:"), "{message}");
    assert!(message.contains("`catalog.models.prices.output_per_1M_tokens`"), "{message}");
    assert!(message.contains("unknown field"), "{message}");
    let message = load_error(&format!("{BASE}\n[catalgo]\nx = 1\n"));
    assert!(message.contains("`catalgo`") && message.contains("unknown field"), "{message}");
}

#[test]
fn foreign_top_level_tables_are_ignored() {
    let mut text = BASE.to_string();
    for table in FOREIGN_TABLES {
        text.push_str(&format!("\n[{table}]\nanything = \"goes\"\n"));
    }
    catalog(&text);
    assert!(load_error("[plans]\nfree = 1\n").contains("missing"));
}

#[test]
fn more_validation_rules() {
    let versionless = BASE
        .replace("effective_from = \"2025-01-01T00:00:00Z\"\n", "")
        .replace("effective_from = 2025-06-01T00:00:00Z\n", "");
    assert!(load_error(&versionless).contains("more than one version without effective_from"));
    let credits = BASE.replace("per_call = \"0\"", "credits_per_10k_tokens = \"1\"");
    assert!(load_error(&credits).contains("needs [catalog.display]"));
    let both = BASE.replace("id = \"img\"", "id = \"img\"\nmodel_tier = \"small\"");
    assert!(load_error(&both).contains("has both `model_tier` and `prices`"));
    let min = BASE.replace("\"0.000001\"", "\"0.000000001\"");
    assert!(load_error(&min).contains("catalog.minimum_charge_usd"));
}

#[test]
fn price_lines_reports_bad_lines_and_continues() {
    let c = catalog(BASE);
    let good = event(json!({"input_tokens": 1000})).to_raw();
    let good = serde_json::to_string(&good).unwrap_or_default();
    let input = format!("{good}\nnot json\n\n{{\"event_id\": \"x\"}}\n{good}\r\n");
    let mut out = Vec::new();
    let summary = cli::price_lines(&c, input.as_bytes(), &mut out, 2);
    assert_eq!(summary.ok(), Some(cli::PriceSummary { priced: 2, errors: 2 }));
    let lines: Vec<Value> =
        String::from_utf8_lossy(&out).lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(lines.len(), 4);
    assert_eq!(lines[0]["cost"], "0.00200000");
    assert_eq!(lines[0]["cost_units"], 200_000);
    assert_eq!(lines[0]["reason"], "priced");
    assert_eq!(lines[1]["line"], 2);
    assert_eq!(lines[2]["line"], 4);
    assert!(lines[2]["error"].as_str().is_some_and(|e| e.contains("occurred_at")));
    assert_eq!(lines[3]["charged"], true);
}

#[test]
fn price_lines_survives_long_and_binary_lines() {
    let c = catalog(BASE);
    let mut input = vec![b'x'; cli::LINE_BYTES_MAX + 10];
    input.extend_from_slice(b"\n\xff\xfe\n");
    let mut out = Vec::new();
    let summary = cli::price_lines(&c, input.as_slice(), &mut out, 2);
    assert_eq!(summary.ok(), Some(cli::PriceSummary { priced: 0, errors: 2 }));
    let text = String::from_utf8_lossy(&out);
    assert!(text.contains("longer than") && text.contains("not UTF-8"), "{text}");
}

#[test]
fn litellm_sample_imports_exactly() {
    let text = match litellm::import_litellm(include_str!("../../examples/litellm_sample.json")) {
        Ok(t) => t.toml,
        Err(e) => panic!("import failed: {e}"),
    };
    let c = catalog(&text);
    assert!(!text.contains("id = \"sample_spec\""));
    assert!(text.contains("# skipped \"omni-moderation-latest\": no price Tally imports"));
    assert!(text.contains("input_cost_per_token_flex"), "unmapped cost keys are listed");
    let sonnet = |n: u64, cached: u64| {
        let e = event(
            json!({"provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": n, "cached_input_tokens": cached}),
        );
        c.price(&e).cost_units
    };
    // 3e-06 per token = 300 units; 3e-07 cached = 30 units; above 200K: 600 and 60.
    assert_eq!(sonnet(200_000, 100_000), 100_000 * 300 + 100_000 * 30);
    assert_eq!(sonnet(200_001, 100_000), 100_001 * 600 + 100_000 * 60);
    let veo = event(
        json!({"model": "vertex_ai/veo-3.0-generate-preview", "modality": "video", "video_seconds": 8}),
    );
    assert_eq!(c.price(&veo).cost_units, 600_000_000); // 8 x $0.75
    let tts = event(json!({"model": "tts-1", "modality": "audio", "characters": 1000}));
    assert_eq!(c.price(&tts).cost_units, 1_500_000); // 1000 x 1.5e-05
    let flash = event(
        json!({"model": "gemini/gemini-2.5-flash-preview-04-17", "output_tokens": 100, "reasoning_tokens": 40}),
    );
    assert_eq!(c.price(&flash).cost_units, 60 * 60 + 40 * 350);
}

#[test]
fn litellm_import_skips_bad_entries_with_reasons_and_keeps_the_rest() {
    use litellm::{ImportError, import_litellm};
    assert!(matches!(import_litellm("[1, 2]"), Err(ImportError::NotAnObject)));
    assert!(matches!(import_litellm("{"), Err(ImportError::Json(_))));
    let file = r#"{
        "good": {"input_cost_per_token": 1e-06, "litellm_provider": "x"},
        "negative": {"input_cost_per_token": -1e-06, "litellm_provider": "x"},
        "text": {"input_cost_per_token": "3e-06"},
        "huge": {"input_cost_per_token": 1e300},
        "cheaper-tier": {"input_cost_per_token": 2e-06, "input_cost_per_token_above_128k_tokens": 1e-06},
        "too-fine": {"input_cost_per_token": 1e-22, "litellm_provider": "x"},
        "embedding": {"mode": "embedding", "litellm_provider": "x"},
        "artifact": {"input_cost_per_token": 1.5000020000000002e-05, "litellm_provider": "x"}
    }"#;
    let import = import_litellm(file).unwrap();
    let reason = |key: &str| {
        import.report.skipped.iter().find(|(k, _)| k == key).map(|(_, r)| r.clone()).unwrap_or_default()
    };
    assert!(reason("negative").contains("is negative"), "{:?}", import.report);
    assert!(reason("text").contains("expected a number"));
    assert!(!reason("huge").is_empty());
    assert!(reason("too-fine").starts_with("refused by the catalog rules"), "{}", reason("too-fine"));
    assert!(reason("embedding").starts_with("no price Tally imports"));
    assert_eq!(import.report.imported, 3, "{:?}", import.report);
    // A float artifact is rounded to 15 significant digits, and said so.
    assert!(import.toml.contains("input_per_1m_tokens = \"15.00002\""), "{}", import.toml);
    // A tier cheaper than the base is raised to the base rate, and said so.
    let adjusted: Vec<&str> = import.report.adjusted.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(adjusted, ["artifact", "cheaper-tier"]);
    let by_reason = import.report.skipped_by_reason();
    assert_eq!(by_reason.iter().map(|(_, n)| n).sum::<usize>(), 5);
    catalog(&import.toml);
}

#[test]
fn litellm_tiers_inherit_missing_rates_from_the_base_like_litellm() {
    // gemini-2.5-pro's shape: the >200k tier names input and output, not cache rates.
    let file = r#"{"gemini/gemini-2.5-pro": {"litellm_provider": "gemini",
        "input_cost_per_token": 1.25e-06, "output_cost_per_token": 1e-05,
        "cache_read_input_token_cost": 1.25e-07, "cache_creation_input_token_cost": 2.5e-07,
        "input_cost_per_token_above_200k_tokens": 2.5e-06, "output_cost_per_token_above_200k_tokens": 1.5e-05}}"#;
    let import = litellm::import_litellm(file).unwrap();
    assert_eq!(import.report.imported, 1, "{:?}", import.report);
    let c = catalog(&import.toml);
    let e = event(json!({"provider": "gemini", "model": "gemini-2.5-pro", "input_tokens": 300_000,
        "cached_input_tokens": 100_000}));
    // Above 200k: input 2.5e-06 (250 units) on 200,000 uncached, cache read at the base 1.25e-07 (12.5).
    let charge = c.price(&e);
    assert_eq!((charge.priced_model.as_str(), charge.model_fallback), ("gemini/gemini-2.5-pro", false));
    assert_eq!(charge.cost_units, 200_000 * 250 + 100_000 * 125 / 10);
}

#[test]
fn the_module_doc_example_is_a_valid_catalog() {
    let doc = include_str!("mod.rs");
    let start = doc.find("//! ```toml\n").map(|i| i + "//! ```toml\n".len()).unwrap_or(0);
    let end = doc[start..].find("//! ```\n").map_or(start, |i| start + i);
    let toml: String = doc[start..end]
        .lines()
        .map(|l| l.strip_prefix("//!").unwrap_or(l).strip_prefix(' ').unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(toml.contains("[[catalog.models]]"), "{toml}");
    let c = catalog(&toml);
    assert_eq!(c.default_model(), Some("claude-sonnet-4-5"));
    assert_eq!(c.display_unit().units_per_display_unit, crate::money::UNITS_PER_CENT);
}
