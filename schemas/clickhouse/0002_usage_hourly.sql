-- Hourly usage rollup per account, project, API key, provider, model and modality.
-- Fed only by the materialized view 0004 (plus the one-time backfill 0003), never written
-- directly. SummingMergeTree: rows with equal keys are summed when parts merge, so a key
-- can have several unmerged rows at any time: read with sum(...) GROUP BY, never assume
-- one row per key and never use FINAL-less point lookups.
--
-- Dedup: the writer inserts each event into usage_log exactly once, even across a crash
-- between the ClickHouse insert and the Postgres commit (send watermark in Postgres, see
-- pipeline::writer), so the view sees each event once and nothing is counted twice. A
-- ReplacingMergeTree collapse in usage_log would NOT propagate here: the rollup relies on
-- the writer never inserting an event twice (tests/dashboards.rs proves it after a crash).
--
-- Measure names differ from usage_log's column names where a source column feeds several
-- measures: ClickHouse 18.16 substitutes a SELECT alias for a column of the same name
-- everywhere in the query (`sum(x) AS x` used inside another sum is refused).
-- Money is Int64 internal units (1e-8 USD), as in usage_log.
CREATE TABLE IF NOT EXISTS usage_hourly
(
    hour                         DateTime('UTC'),
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
PARTITION BY toYYYYMM(hour)
ORDER BY (hour, account_id, project_id, api_key_id, provider, model, modality)
