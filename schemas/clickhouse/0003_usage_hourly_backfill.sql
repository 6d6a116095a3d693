-- One-time backfill of usage_hourly from usage rows logged before the rollup existed (a
-- database created by an older Tally). Migrations run at every start, so this runs every
-- time but inserts only while usage_hourly is empty; it runs BEFORE the view (0004) exists, so
-- no event is counted by both. Upgrade with writers stopped: an event logged by another
-- running instance between this statement and 0004 would be missing from the rollup.
-- Keep the SELECT identical to 0004's (tests/dashboards.rs checks both against usage_log).
INSERT INTO usage_hourly
(hour, account_id, project_id, api_key_id, provider, model, modality, events, errors,
    byok_events, free_events, input_tokens, cached_input_tokens, cache_write_tokens,
    output_tokens, reasoning_tokens, images, video_seconds, video_clips, characters,
    messages, cost_units, catalog_cost_units, platform_upstream_cost_units,
    byok_upstream_cost_units, free_upstream_cost_units)
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
FROM usage_log FINAL
WHERE (SELECT count() FROM usage_hourly) = 0
GROUP BY hour, account_id, project_id, api_key_id, provider, model, modality
