//! Pricing throughput (events/s) against a baseline of the same loop doing only the
//! catalog lookup, so the difference is the cost of pricing itself.
//!
//! `cargo bench --bench pricing` (add `-- --quick` for a short run).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use tally::event::{UsageEvent, parse_json_line};
use tally::pricing::Catalog;

const BRIEVIO: &str = include_str!("../examples/brievio.toml");
const STRUERE: &str = include_str!("../examples/struere.toml");

/// Event shapes seen in production, cycled to make a batch: plain chat, cached chat,
/// long context, reasoning, upstream floor, media, failures, BYOK, unknown models.
const SHAPES: [&str; 12] = [
    r#""provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 3200, "output_tokens": 410"#,
    r#""provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 52000, "cached_input_tokens": 48000, "output_tokens": 900, "upstream_cost": "0.0213""#,
    r#""provider": "anthropic", "model": "claude-sonnet-4-5", "input_tokens": 240000, "cached_input_tokens": 200000, "output_tokens": 2000"#,
    r#""provider": "openai", "model": "gpt-5", "input_tokens": 1800, "output_tokens": 5200, "reasoning_tokens": 4100"#,
    r#""provider": "openai", "model": "gpt-4o-mini", "input_tokens": 12, "output_tokens": 3"#,
    r#""provider": "deepseek", "model": "deepseek-chat", "input_tokens": 9000, "output_tokens": 700, "upstream_cost": "0.0049""#,
    r#""provider": "google", "model": "gemini-2.5-flash", "input_tokens": 4000, "output_tokens": 300"#,
    r#""provider": "openai", "model": "gpt-image-1", "modality": "image", "images": 2, "resolution": "1024x1536""#,
    r#""provider": "kuaishou", "model": "kling-2.1", "modality": "video", "video_clips": 1, "resolution": "1080p", "upstream_cost": "0.38""#,
    r#""provider": "openai", "model": "gpt-5", "status": "error", "input_tokens": 1000"#,
    r#""provider": "anthropic", "model": "claude-haiku-4-5", "billing_mode": "byok", "input_tokens": 800"#,
    r#""provider": "mistral", "model": "mistral-large", "input_tokens": 500, "output_tokens": 50"#,
];

const BATCH_EVENTS: usize = 1024;

fn events() -> Vec<UsageEvent> {
    (0..BATCH_EVENTS)
        .map(|i| {
            let shape = SHAPES[i % SHAPES.len()];
            // Defaults only where the shape does not say otherwise (JSON keys must be unique).
            let modality = if shape.contains("modality") { "" } else { r#""modality": "chat","# };
            let status = if shape.contains("status") { "" } else { r#""status": "success","# };
            let line = format!(
                r#"{{"event_id": "e{i}", "occurred_at": "2025-10-01T12:00:00Z", "account_id": "a{}", {modality} {status} {shape}}}"#,
                i % 7
            );
            parse_json_line(&line).unwrap_or_else(|e| panic!("bench event {i}: {e}"))
        })
        .collect()
}

fn bench_catalog(c: &mut Criterion, name: &str, text: &str) {
    let catalog = Catalog::from_toml_str(text, name).unwrap_or_else(|e| panic!("{e}"));
    let events = events();
    let mut group = c.benchmark_group(name);
    group.throughput(Throughput::Elements(events.len() as u64));
    group.bench_function("lookup_only", |b| {
        b.iter(|| {
            let mut found = 0usize;
            for event in &events {
                found += usize::from(catalog.lookup(black_box(event)).is_some());
            }
            black_box(found)
        })
    });
    group.bench_function("price", |b| {
        b.iter(|| {
            let mut total_units = 0i64;
            for event in &events {
                total_units = total_units.saturating_add(catalog.price(black_box(event)).cost_units);
            }
            black_box(total_units)
        })
    });
    group.finish();
}

fn pricing(c: &mut Criterion) {
    bench_catalog(c, "brievio", BRIEVIO);
    // Struere: a larger table and a default model, so unknown models are priced too.
    bench_catalog(c, "struere", STRUERE);
}

criterion_group!(benches, pricing);
criterion_main!(benches);
