//! LiteLLM's real price map (the JSON shipped in the litellm 1.106.2 wheel on PyPI, fetched
//! once and cached by `scripts/litellm-map`, its SHA-256 pinned): `tally catalog import
//! --litellm` takes every entry or skips it with a reason, and every chat model LiteLLM
//! lists (every provider, Anthropic, OpenAI, Gemini, xAI and DeepSeek among them) prices an
//! event that names it the way a gateway does (`provider` + the model without LiteLLM's
//! `provider/` prefix) with the entry LiteLLM would pick, at the map's own rates: no
//! `unknown_model`.

mod common;

use rust_decimal::Decimal;
use serde_json::{Value, json};
use std::process::Command;
use std::str::FromStr;
use tally::event::parse_json_line;
use tally::pricing::{Catalog, ChargeReason};

const PROVIDERS: [&str; 5] = ["anthropic", "openai", "gemini", "xai", "deepseek"];

fn map_text() -> String {
    let out =
        Command::new(common::repo().join("scripts/litellm-map")).output().expect("scripts/litellm-map runs");
    assert!(out.status.success(), "scripts/litellm-map: {}", String::from_utf8_lossy(&out.stderr));
    let path = String::from_utf8(out.stdout).expect("a path").trim().to_string();
    std::fs::read_to_string(&path).expect("the cached map")
}

/// A LiteLLM price read exactly from the JSON number's shortest text (independently of
/// the importer; a float artifact is rounded the importer's documented way below).
fn rate(v: &Value) -> Option<Decimal> {
    let text = v.as_number()?.to_string();
    let d =
        if text.contains(['e', 'E']) { Decimal::from_scientific(&text) } else { Decimal::from_str(&text) };
    d.ok()
}

#[test]
fn the_real_litellm_map_imports_and_prices_every_major_provider() {
    let text = map_text();
    let map: serde_json::Map<String, Value> = serde_json::from_str(&text).expect("the map is JSON");
    let import = tally::pricing::litellm::import_litellm(&text).unwrap_or_else(|e| panic!("import: {e}"));
    let report = &import.report;
    assert_eq!(report.imported + report.skipped.len(), map.len(), "every entry imported or skipped");
    assert!(report.imported > 3_000, "{} imported", report.imported);
    assert!(report.skipped.iter().all(|(key, reason)| !key.is_empty() && !reason.is_empty()));
    let catalog = Catalog::from_toml_str(&import.toml, "litellm 1.106.2").unwrap_or_else(|e| panic!("{e}"));

    // What a gateway sends: the provider, and the model as the provider names it.
    let mut calls = std::collections::BTreeSet::new();
    for (key, spec) in &map {
        let provider = spec.get("litellm_provider").and_then(Value::as_str).unwrap_or("");
        if spec.get("mode").and_then(Value::as_str) == Some("chat") {
            calls.insert((provider, key.strip_prefix(&format!("{provider}/")).unwrap_or(key)));
        }
    }
    let mut priced = 0;
    let mut per_provider: std::collections::BTreeMap<&str, usize> = std::collections::BTreeMap::new();
    let mut failures = Vec::new();
    for (provider, model) in calls {
        // The entry LiteLLM prices such a call with: `provider/model` first, then `model`.
        let key = [format!("{provider}/{model}"), model.to_string()]
            .into_iter()
            .find(|k| map.contains_key(k))
            .expect("one of the two is the entry the call came from");
        let spec = &map[&key];
        let (Some(input), Some(output)) = (
            spec.get("input_cost_per_token").and_then(rate),
            spec.get("output_cost_per_token").and_then(rate),
        ) else {
            continue;
        };
        let line = json!({"event_id": "m", "occurred_at": "2026-10-01T12:00:00Z", "account_id": "a",
            "provider": provider, "model": model, "modality": "chat", "status": "success",
            "input_tokens": 1000, "output_tokens": 500})
        .to_string();
        let event = parse_json_line(&line).expect("a valid event");
        let charge = catalog.price(&event);
        let expected = (input.round_sf(15).unwrap() * Decimal::from(1000)
            + output.round_sf(15).unwrap() * Decimal::from(500))
            * Decimal::from(tally::money::UNITS_PER_USD);
        let off = (Decimal::from(charge.cost_units) - expected).abs();
        if charge.reason == ChargeReason::UnknownModel || charge.priced_model != key || off > Decimal::ONE {
            failures.push(format!(
                "{provider} {model}: priced as {:?} ({:?}), {} units, LiteLLM's rates give {expected}",
                charge.priced_model, charge.reason, charge.cost_units
            ));
        }
        priced += 1;
        *per_provider.entry(provider).or_default() += 1;
    }
    assert!(priced > 2_500, "chat models of every provider: {priced}");
    for provider in PROVIDERS {
        assert!(per_provider.get(provider).copied().unwrap_or(0) >= 5, "{provider}: {per_provider:?}");
    }
    assert!(failures.is_empty(), "{} of {priced} models:\n{}", failures.len(), failures.join("\n"));
}
