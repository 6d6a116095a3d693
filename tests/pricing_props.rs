//! Properties of the pricing engine:
//! - the price is monotone in every count (adding usage never lowers it), for every cost
//!   that fits `i64` units (beyond, the event is flagged `cost_overflow` and not charged);
//! - splitting an event's counts across two events changes the total by at most one
//!   rounding step per event (entries without long-context tiers, per-call fees, a minimum
//!   charge or the upstream floor: those are deliberately not additive);
//! - the one rounding step is `money::usd_to_units`'s rule;
//! - nothing panics: any event, any catalog text, any LiteLLM text, any input bytes.

use chrono::{DateTime, TimeZone, Utc};
use proptest::prelude::*;
use proptest::sample::Index;
use rust_decimal::Decimal;
use std::sync::LazyLock;
use tally::event::{BillingMode, Counts, Modality, RawUsageEvent, Status, UsageEvent};
use tally::money;
use tally::pricing::{Catalog, ChargeReason, cli, litellm};

const EXAMPLE_TEXTS: [&str; 5] = [
    include_str!("../examples/brokr.toml"),
    include_str!("../examples/reeve.toml"),
    include_str!("../examples/brievio.toml"),
    include_str!("../examples/broomva.toml"),
    include_str!("../examples/struere.toml"),
];

static EXAMPLES: LazyLock<Vec<Catalog>> = LazyLock::new(|| {
    EXAMPLE_TEXTS
        .iter()
        .enumerate()
        .map(|(i, text)| {
            Catalog::from_toml_str(text, &format!("example {i}")).unwrap_or_else(|e| panic!("{e}"))
        })
        .collect()
});

const PROVIDERS: [&str; 8] =
    ["openai", "anthropic", "deepseek", "google", "ollama", "openrouter", "meta", "acme"];
const RESOLUTIONS: [Option<&str>; 6] =
    [None, Some("720p"), Some("1080p"), Some("1024x1024"), Some("1536x1024"), Some("4k")];
const CATEGORIES: [Option<&str>; 5] =
    [None, Some("marketing"), Some("utility"), Some("service"), Some("promo")];
const DATES: [(i32, u32); 4] = [(2024, 1), (2025, 5), (2025, 7), (2026, 1)];

/// Usage as disjoint parts, so any part can grow or be split and the event stays valid.
#[derive(Debug, Clone, Copy, Default)]
struct Usage {
    uncached: u64,
    cached: u64,
    cache_write: u64,
    text_output: u64,
    reasoning: u64,
    images: u64,
    clips: u64,
    seconds: u64,
    characters: u64,
    messages: u64,
}

impl Usage {
    const PARTS: usize = 10;

    fn part_mut(&mut self, index: usize) -> &mut u64 {
        match index % Self::PARTS {
            0 => &mut self.uncached,
            1 => &mut self.cached,
            2 => &mut self.cache_write,
            3 => &mut self.text_output,
            4 => &mut self.reasoning,
            5 => &mut self.images,
            6 => &mut self.clips,
            7 => &mut self.seconds,
            8 => &mut self.characters,
            _ => &mut self.messages,
        }
    }

    fn counts(&self) -> Counts {
        Counts {
            input_tokens: self.uncached + self.cached + self.cache_write,
            cached_input_tokens: self.cached,
            cache_write_tokens: self.cache_write,
            output_tokens: self.text_output + self.reasoning,
            reasoning_tokens: self.reasoning,
            images: self.images,
            video_seconds: self.seconds,
            video_clips: self.clips,
            characters: self.characters,
            messages: self.messages,
        }
    }
}

fn usage() -> impl Strategy<Value = Usage> {
    let tokens = 0u64..400_000;
    let units = 0u64..50;
    (
        (tokens.clone(), tokens.clone(), tokens.clone(), tokens.clone(), tokens),
        (units.clone(), units.clone(), units.clone(), 0u64..100_000, units),
    )
        .prop_map(
            |(
                (uncached, cached, cache_write, text_output, reasoning),
                (images, clips, seconds, characters, messages),
            )| {
                Usage {
                    uncached,
                    cached,
                    cache_write,
                    text_output,
                    reasoning,
                    images,
                    clips,
                    seconds,
                    characters,
                    messages,
                }
            },
        )
}

/// Everything about an event except its usage.
#[derive(Debug, Clone)]
struct Shape {
    provider: &'static str,
    model: String,
    resolution: Option<&'static str>,
    category: Option<&'static str>,
    occurred_at: DateTime<Utc>,
    upstream_units: Option<i64>,
}

/// Random choices for a [`Shape`], drawn by proptest.
#[derive(Debug, Clone)]
struct Picks {
    model: Index,
    unknown: bool,
    provider: Index,
    resolution: Index,
    category: Index,
    date: Index,
}

fn picks() -> impl Strategy<Value = Picks> {
    (
        any::<Index>(),
        prop::bool::weighted(0.1),
        any::<Index>(),
        any::<Index>(),
        any::<Index>(),
        any::<Index>(),
    )
        .prop_map(|(model, unknown, provider, resolution, category, date)| Picks {
            model,
            unknown,
            provider,
            resolution,
            category,
            date,
        })
}

fn shape(catalog: &Catalog, p: &Picks, upstream_units: Option<i64>) -> Shape {
    let ids: Vec<&str> = catalog.model_ids().collect();
    let (year, month) = DATES[p.date.index(DATES.len())];
    Shape {
        provider: PROVIDERS[p.provider.index(PROVIDERS.len())],
        model: if p.unknown {
            "not-in-any-catalog".to_string()
        } else {
            ids[p.model.index(ids.len())].to_string()
        },
        resolution: RESOLUTIONS[p.resolution.index(RESOLUTIONS.len())],
        category: CATEGORIES[p.category.index(CATEGORIES.len())],
        occurred_at: Utc.with_ymd_and_hms(year, month, 15, 12, 0, 0).single().unwrap_or_default(),
        upstream_units,
    }
}

fn fixed_time() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 10, 1, 0, 0, 0).single().unwrap_or_default()
}

fn event(shape: &Shape, usage: &Usage) -> UsageEvent {
    let c = usage.counts();
    let n = |v: u64| Some(v as i64);
    let raw = RawUsageEvent {
        event_id: Some("prop".into()),
        occurred_at: Some(shape.occurred_at.to_rfc3339()),
        account_id: Some("acct".into()),
        provider: Some(shape.provider.into()),
        model: Some(shape.model.clone()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: n(c.input_tokens),
        cached_input_tokens: n(c.cached_input_tokens),
        cache_write_tokens: n(c.cache_write_tokens),
        output_tokens: n(c.output_tokens),
        reasoning_tokens: n(c.reasoning_tokens),
        images: n(c.images),
        video_seconds: n(c.video_seconds),
        video_clips: n(c.video_clips),
        characters: n(c.characters),
        messages: n(c.messages),
        resolution: shape.resolution.map(str::to_string),
        message_category: shape.category.map(str::to_string),
        upstream_cost: shape.upstream_units.map(money::units_to_usd_string),
        ..RawUsageEvent::default()
    };
    UsageEvent::parse(raw).unwrap_or_else(|e| panic!("generated event is invalid: {e}"))
}

/// A catalog with random exact rates, no tiers, no per-call fee, no minimum, no floor.
fn random_catalog() -> impl Strategy<Value = String> {
    let rate = (0u64..=1_000_000, 0u32..=6).prop_map(|(m, s)| Decimal::new(m as i64, s).to_string());
    let factor = (100u64..=300).prop_map(|m| Decimal::new(m as i64, 2).to_string());
    let multiplier = (0u64..=100).prop_map(|m| Decimal::new(m as i64, 2).to_string());
    (prop::collection::vec(rate, 11), factor, multiplier, any::<bool>()).prop_map(
        |(r, markup, read, explicit)| {
            let cache = if explicit {
                format!("cache_read_per_1m_tokens = \"{}\"\nreasoning_per_1m_tokens = \"{}\"", r[2], r[3])
            } else {
                String::new()
            };
            format!(
                r#"[catalog]
[catalog.providers.p]
rate_markup = "{markup}"
cache_read_multiplier = "{read}"
cache_write_multiplier = "1.25"
[[catalog.models]]
id = "m"
provider = "p"
[[catalog.models.prices]]
input_per_1m_tokens = "{}"
output_per_1m_tokens = "{}"
{cache}
per_1m_characters = "{}"
per_image = "{}"
per_clip = {{ "720p" = "{}", "1080p" = "{}" }}
per_second = "{}"
per_message = {{ marketing = "{}", utility = "{}", default = "{}" }}
"#,
                r[0], r[1], r[4], r[5], r[6], r[7], r[8], r[9], r[10], r[0]
            )
        },
    )
}

fn split(whole: &Usage, fractions: &[u16; Usage::PARTS]) -> (Usage, Usage) {
    let (mut a, mut b) = (*whole, *whole);
    for (i, f) in fractions.iter().enumerate() {
        let total = *a.part_mut(i);
        let first = total * u64::from(*f % 1001) / 1000;
        *a.part_mut(i) = first;
        *b.part_mut(i) = total - first;
    }
    (a, b)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn price_is_monotone_in_every_count(
        which in 0usize..5, picks in picks(), upstream in prop::option::of(0i64..10_000_000),
        base in usage(), part in 0usize..Usage::PARTS, extra in 1u64..300_000,
    ) {
        let catalog = &EXAMPLES[which];
        let shape = shape(catalog, &picks, upstream);
        let mut more = base;
        *more.part_mut(part) += extra;
        let (before, after) = (catalog.price(&event(&shape, &base)), catalog.price(&event(&shape, &more)));
        prop_assert!(before.cost_units <= after.cost_units, "{} {:?}: {} > {} after adding {extra} to part {part}", catalog.name(), shape, before.cost_units, after.cost_units);
    }

    #[test]
    fn splitting_random_catalog_events_moves_the_total_by_at_most_one_unit(
        text in random_catalog(), whole in usage(), fractions in any::<[u16; Usage::PARTS]>(),
        res in any::<Index>(), cat in any::<Index>(),
    ) {
        let catalog = Catalog::from_toml_str(&text, "random.toml").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let shape = Shape {
            provider: "p",
            model: "m".into(),
            resolution: RESOLUTIONS[res.index(RESOLUTIONS.len())],
            category: CATEGORIES[cat.index(CATEGORIES.len())],
            occurred_at: fixed_time(),
            upstream_units: None,
        };
        let (a, b) = split(&whole, &fractions);
        let price = |u: &Usage| catalog.price(&event(&shape, u)).cost_units;
        let (total, parts) = (price(&whole), price(&a) + price(&b));
        // Each of the three prices is within half a unit of its exact value, and the exact
        // values add up: |difference| <= 1.5, and it is an integer.
        prop_assert!((total - parts).abs() <= 1, "{total} vs {parts}\n{text}");
    }

    #[test]
    fn splitting_example_events_moves_the_total_by_at_most_one_unit_per_event(
        which in prop::sample::select(vec![0usize, 1, 3, 4]), picks in picks(),
        whole in usage(), fractions in any::<[u16; Usage::PARTS]>(),
    ) {
        let catalog = &EXAMPLES[which];
        prop_assert_eq!(catalog.minimum_charge_units(), 0);
        // An unknown model is priced by the default model or not at all: both additive.
        let shape = shape(catalog, &picks, None);
        prop_assume!(!catalog.has_long_context(&shape.model) && !catalog.has_per_call_fee(&shape.model));
        let (a, b) = split(&whole, &fractions);
        let price = |u: &Usage| catalog.price(&event(&shape, u)).cost_units;
        // As above: at most one unit, within the "one step per event" the contract allows.
        prop_assert!((price(&whole) - price(&a) - price(&b)).abs() <= 1);
    }

    #[test]
    fn the_single_rounding_is_money_usd_to_units(mantissa in 0i64..1_000_000_000_000, scale in 6u32..=18, markup in 100i64..=250) {
        // A flat fee (< $1M) with up to 18 decimals times a markup: the charge must equal
        // money::usd_to_units of the exact product (half to even, once).
        let fee = Decimal::new(mantissa, scale);
        let markup = Decimal::new(markup, 2);
        let text = format!("[catalog]\n[catalog.providers.p]\nrate_markup = \"{markup}\"\n[[catalog.models]]\nid = \"f\"\nprovider = \"p\"\n[[catalog.models.prices]]\nper_call = \"{fee}\"\n");
        let catalog = Catalog::from_toml_str(&text, "fee.toml").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let shape = Shape { provider: "p", model: "f".into(), resolution: None, category: None, occurred_at: fixed_time(), upstream_units: None };
        let expected = money::usd_to_units(fee * markup).unwrap_or(i64::MAX);
        prop_assert_eq!(catalog.price(&event(&shape, &Usage::default())).cost_units, expected);
    }

    #[test]
    fn the_upstream_floor_rounds_like_money_usd_to_units(
        units in 0i64..1_000_000_000_000, places in 0u32..=4, markup in 100i64..=250,
    ) {
        // upstream (up to 12 decimals) x markup, rounded once, half to even.
        let upstream = Decimal::new(units, 8 + places);
        let markup = Decimal::new(markup, 2);
        let text = format!("[catalog]\nupstream_floor = true\n[catalog.providers.p]\nupstream_markup = \"{markup}\"\n[[catalog.models]]\nid = \"m\"\nprovider = \"p\"\n[[catalog.models.prices]]\nper_call = \"0\"\n");
        let catalog = Catalog::from_toml_str(&text, "floor.toml").map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut event = event(&Shape { provider: "p", model: "m".into(), resolution: None, category: None, occurred_at: fixed_time(), upstream_units: None }, &Usage::default());
        event.upstream_cost = Some(upstream);
        let expected = money::usd_to_units(upstream * markup).unwrap_or(i64::MAX);
        prop_assert_eq!(catalog.price(&event).cost_units, expected);
    }

    #[test]
    fn any_event_prices_without_panic_and_consistently(
        which in 0usize..5, counts in any::<[u64; 10]>(), small in any::<bool>(), text in prop::collection::vec(".{0,12}", 4),
        known in any::<Index>(), use_known in any::<bool>(), status in any::<bool>(), byok in any::<bool>(),
        modality in any::<Index>(), upstream in prop::option::of((any::<u32>(), any::<u32>(), any::<u32>(), any::<bool>(), 0u32..=28)),
        seconds in any::<i64>(),
    ) {
        let catalog = &EXAMPLES[which];
        let ids: Vec<&str> = catalog.model_ids().collect();
        // Direct construction skips `parse`, so invariants may be broken on purpose.
        let c: Vec<u64> = counts.iter().map(|v| if small { v % 1_000_000 } else { *v }).collect();
        let event = UsageEvent {
            event_id: "x".into(),
            occurred_at: Utc.timestamp_opt(seconds % 8_000_000_000, 0).single().unwrap_or_default(),
            account_id: "a".into(), api_key_id: None, project_id: None, user_id: None,
            provider: if use_known { PROVIDERS[known.index(PROVIDERS.len())].to_string() } else { text[0].clone() },
            model: if use_known { ids[known.index(ids.len())].to_string() } else { text[1].clone() },
            modality: Modality::ALL[modality.index(Modality::ALL.len())],
            feature: Some(if use_known { ids[known.index(ids.len())].to_string() } else { text[1].clone() }),
            status: if status { Status::Success } else { Status::Error },
            http_status: None,
            counts: Counts {
                input_tokens: c[0], cached_input_tokens: c[1], cache_write_tokens: c[2], output_tokens: c[3],
                reasoning_tokens: c[4], images: c[5], video_seconds: c[6], video_clips: c[7], characters: c[8], messages: c[9],
            },
            resolution: Some(text[2].clone()),
            message_category: Some(text[3].clone()),
            upstream_cost: upstream.map(|(lo, mid, hi, neg, scale)| Decimal::from_parts(lo, mid, hi, neg, scale)),
            billing_mode: if byok { BillingMode::Byok } else { BillingMode::Platform },
            reservation_id: None, latency_ms: None, request_ip: None, user_agent: None,
        };
        let charge = catalog.price(&event);
        prop_assert!(charge.cost_units >= 0 && charge.catalog_cost_units >= 0 && charge.upstream_cost_units >= 0);
        prop_assert_eq!(charge.charged, charge.cost_units > 0);
        let charged_reason = matches!(charge.reason, ChargeReason::Priced | ChargeReason::DefaultModelFallback | ChargeReason::UpstreamFloor | ChargeReason::MinimumCharge);
        prop_assert_eq!(charged_reason, charge.charged, "{:?}", charge);
        if !status {
            prop_assert_eq!(charge.reason, ChargeReason::FailedCall);
        }
    }

    #[test]
    fn any_catalog_text_loads_or_errors_without_panic(which in 0usize..5, edits in prop::collection::vec((any::<Index>(), any::<u8>()), 0..8), junk in ".{0,200}") {
        let _ = Catalog::from_toml_str(&junk, "junk.toml");
        let mut bytes = EXAMPLE_TEXTS[which].as_bytes().to_vec();
        for (at, byte) in edits {
            let i = at.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(mutated) = String::from_utf8(bytes)
            && let Err(e) = Catalog::from_toml_str(&mutated, "mutated.toml")
        {
            prop_assert!(e.to_string().starts_with("mutated.toml"), "{}", e);
        }
    }

    #[test]
    fn any_litellm_text_imports_or_errors_without_panic(junk in ".{0,200}", value in any::<f64>(), key in prop::sample::select(vec![
        "input_cost_per_token", "output_cost_per_image", "output_cost_per_second", "input_cost_per_character",
        "input_cost_per_token_above_200k_tokens", "output_cost_per_token_above_0k_tokens", "cache_read_input_token_cost",
    ])) {
        let _ = litellm::import_litellm(&junk);
        let json = format!("{{\"m\": {{\"{key}\": {value:e}, \"litellm_provider\": \"p\"}}}}");
        if let Ok(import) = litellm::import_litellm(&json) {
            prop_assert!(Catalog::from_toml_str(&import.toml, "import").is_ok());
            prop_assert_eq!(import.report.imported + import.report.skipped.len(), 1);
        }
    }

    #[test]
    fn any_input_bytes_are_priced_or_reported(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        let mut out = Vec::new();
        let summary = cli::price_lines(&EXAMPLES[2], bytes.as_slice(), &mut out, 1 + bytes.len() % 3);
        prop_assert!(summary.is_ok());
        let written = String::from_utf8_lossy(&out).lines().count() as u64;
        let summary = summary.unwrap_or_default();
        prop_assert_eq!(written, summary.priced + summary.errors);
    }
}

#[test]
fn example_catalogs_have_what_the_split_property_assumes() {
    // The split property skips Brievio (it has a minimum charge and the floor).
    assert!(EXAMPLES[2].minimum_charge_units() > 0 && EXAMPLES[2].upstream_floor());
    assert!(EXAMPLES[2].has_long_context("claude-sonnet-4-5"));
    assert!(EXAMPLE_TEXTS.len() == EXAMPLES.len());
}
