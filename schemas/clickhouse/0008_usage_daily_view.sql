-- Daily usage (UTC days) as a plain view over usage_hourly: the sums of the day's hours,
-- same keys and measures as usage_hourly (0002). It replaced a second SummingMergeTree
-- table fed by its own materialized view on usage_log (0005-0007, removed): measured on
-- 4,600-row inserts, each materialized view cost about as much ClickHouse CPU per row as
-- the usage_log insert itself (`ARCHITECTURE.md`, capacity model), while a day is exactly
-- the sum of its 24 hours. Dashboards read it like the table it was (sum(...) GROUP BY).
-- `analytics::migrate` drops the old table and its view before creating this one.
CREATE VIEW IF NOT EXISTS usage_daily AS
SELECT
    toDate(hour) AS day,
    account_id, project_id, api_key_id, provider, model, modality,
    sum(events) AS events,
    sum(errors) AS errors,
    sum(byok_events) AS byok_events,
    sum(free_events) AS free_events,
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
    sum(platform_upstream_cost_units) AS platform_upstream_cost_units,
    sum(byok_upstream_cost_units) AS byok_upstream_cost_units,
    sum(free_upstream_cost_units) AS free_upstream_cost_units
FROM usage_hourly
GROUP BY day, account_id, project_id, api_key_id, provider, model, modality
