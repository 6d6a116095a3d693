-- Feeds usage_hourly (0002) from every insert into usage_log. Output names and types equal
-- the target's exactly (count() and sum(UInt64) are UInt64, sum(Int64) is Int64): a push
-- that fails is not atomic (usage_log keeps the rows), so the types must never mismatch.
CREATE MATERIALIZED VIEW IF NOT EXISTS usage_hourly_mv TO usage_hourly AS
SELECT
    toStartOfHour(occurred_at) AS hour,
    account_id, project_id, api_key_id, provider, model, modality,
    count() AS events,
    sum(toUInt64(status = 'error')) AS errors,
    sum(toUInt64(reason = 'byok')) AS byok_events,
    sum(toUInt64(charged = 0)) AS free_events,
    sum(input_tokens) AS input_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    sum(cache_write_tokens) AS cache_write_tokens,
    sum(output_tokens) AS output_tokens,
    sum(reasoning_tokens) AS reasoning_tokens,
    sum(images) AS images,
    sum(video_seconds) AS video_seconds,
    sum(video_clips) AS video_clips,
    sum(characters) AS characters,
    sum(messages) AS messages,
    sum(cost_units) AS cost_units,
    sum(catalog_cost_units) AS catalog_cost_units,
    sum(if(billing_mode = 'byok', toInt64(0), upstream_cost_units)) AS platform_upstream_cost_units,
    sum(if(billing_mode = 'byok', upstream_cost_units, toInt64(0))) AS byok_upstream_cost_units,
    sum(if(charged = 0, upstream_cost_units, toInt64(0))) AS free_upstream_cost_units
FROM usage_log
GROUP BY hour, account_id, project_id, api_key_id, provider, model, modality
