-- Re-rated cost differences into the hourly rollup, in the hour of the original event, so
-- dashboards and the usage API agree with the ledger after a re-rate. Only money moves:
-- counts stay 0 (the event was counted once, when it was logged). Output names and types
-- equal usage_hourly's exactly.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_corrections_mv TO usage_hourly AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    account_id, project_id, api_key_id, provider, model, modality,
    toUInt64(0) AS events,
    toUInt64(0) AS errors,
    toUInt64(0) AS byok_events,
    toUInt64(0) AS free_events,
    toUInt64(0) AS input_tokens,
    toUInt64(0) AS cached_input_tokens,
    toUInt64(0) AS cache_write_tokens,
    toUInt64(0) AS output_tokens,
    toUInt64(0) AS reasoning_tokens,
    toUInt64(0) AS images,
    toUInt64(0) AS video_seconds,
    toUInt64(0) AS video_clips,
    toUInt64(0) AS characters,
    toUInt64(0) AS messages,
    sum(cost_delta_units) AS cost_units,
    sum(catalog_cost_delta_units) AS catalog_cost_units,
    toInt64(0) AS platform_upstream_cost_units,
    toInt64(0) AS byok_upstream_cost_units,
    toInt64(0) AS free_upstream_cost_units
FROM usage_corrections
GROUP BY hour, account_id, project_id, api_key_id, provider, model, modality
