-- Re-rating (`tally rerate`): one row per corrected event per run. Postgres is the
-- authority (usage_corrections there, committed with the ledger's correction entry);
-- these rows are published after that COMMIT, and a publication interrupted by a crash
-- is completed by the next `tally rerate`, which first looks up the rows already here
-- (so each row is inserted once and the rollup below counts it once).
-- The usage_log row of an event keeps its original price; its cost now is
-- usage_log.cost_units + sum(cost_delta_units) of its rows here (the usage API and the
-- hourly rollup do this sum). Money: Int64 internal units (1e-8 USD).
CREATE TABLE IF NOT EXISTS usage_corrections
(
    run_id                   String,
    event_id                 String,
    occurred_at              DateTime('UTC'),
    account_id               String,
    project_id               String,
    api_key_id               String,
    provider                 String,
    model                    String,
    modality                 String,
    cost_before_units        Int64,
    cost_after_units         Int64,
    cost_delta_units         Int64,
    catalog_cost_delta_units Int64,
    catalog_version          String,
    price_entry              String,
    corrected_at             DateTime('UTC')
)
ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (account_id, event_id, run_id)
