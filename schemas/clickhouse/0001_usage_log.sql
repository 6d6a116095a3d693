-- One row per usage event (charged or not). Applied by `tally migrate`.
-- ReplacingMergeTree on (account_id, event_id): a replay after a crash between the
-- ClickHouse insert and the Postgres commit re-inserts identical rows, which collapse.
-- Read with FINAL (or argMax / LIMIT 1 BY) for exact counts. SQL valid on 18.16 and current.
CREATE TABLE IF NOT EXISTS usage_log
(
    event_id            String,
    occurred_at         DateTime('UTC'),
    ingested_at         DateTime('UTC'),
    account_id          String,
    api_key_id          String,
    project_id          String,
    user_id             String,
    provider            String,
    model               String,
    priced_model        String,
    model_fallback      UInt8,
    modality            String,
    feature             String,
    status              String,
    http_status         UInt16,
    input_tokens        UInt64,
    cached_input_tokens UInt64,
    cache_write_tokens  UInt64,
    output_tokens       UInt64,
    reasoning_tokens    UInt64,
    images              UInt64,
    video_seconds       UInt64,
    video_clips         UInt64,
    resolution          String,
    characters          UInt64,
    messages            UInt64,
    message_category    String,
    billing_mode        String,
    reservation_id      String,
    upstream_cost_units Int64,
    catalog_cost_units  Int64,
    cost_units          Int64,
    charged             UInt8,
    reason              String,
    latency_ms          UInt32,
    request_ip          String,
    user_agent          String,
    source_partition    Int32,
    source_offset       Int64
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (account_id, event_id)
