-- Daily usage rollup (UTC days): the twin of usage_hourly (0002), with the same keys,
-- measures and dedup reasoning. Fed only by the view 0007 (plus the one-time backfill
-- 0006). Read with sum(...) GROUP BY: unmerged rows of one key coexist.
CREATE TABLE IF NOT EXISTS usage_daily
(
    day                          Date,
    account_id                   String,
    project_id                   String,
    api_key_id                   String,
    provider                     String,
    model                        String,
    modality                     String,
    events                       UInt64,
    errors                       UInt64,
    byok_events                  UInt64,
    free_events                  UInt64,
    input_tokens                 UInt64,
    cached_input_tokens          UInt64,
    cache_write_tokens           UInt64,
    output_tokens                UInt64,
    reasoning_tokens             UInt64,
    images                       UInt64,
    video_seconds                UInt64,
    video_clips                  UInt64,
    characters                   UInt64,
    messages                     UInt64,
    cost_units                   Int64,
    catalog_cost_units           Int64,
    platform_upstream_cost_units Int64,
    byok_upstream_cost_units     Int64,
    free_upstream_cost_units     Int64
)
ENGINE = SummingMergeTree((events, errors, byok_events, free_events, input_tokens,
    cached_input_tokens, cache_write_tokens, output_tokens, reasoning_tokens, images,
    video_seconds, video_clips, characters, messages, cost_units, catalog_cost_units,
    platform_upstream_cost_units, byok_upstream_cost_units, free_upstream_cost_units))
PARTITION BY toYYYYMM(day)
ORDER BY (day, account_id, project_id, api_key_id, provider, model, modality)
