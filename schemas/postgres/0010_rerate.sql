-- Re-rating (issue 15): every priced event knows its price, and `tally rerate` corrects
-- history exactly once. See ARCHITECTURE.md, "Re-rating".

-- Every catalog that priced events or re-rated them, by version (the first 16 hex digits
-- of the SHA-256 of its text), with its text: what priced an event can always be read back.
CREATE TABLE catalog_versions (
    catalog_version TEXT PRIMARY KEY CHECK (catalog_version ~ '^[0-9a-f]{16}$'),
    name            TEXT NOT NULL,
    origin          TEXT NOT NULL,
    catalog_text    TEXT NOT NULL,
    first_seen_at   TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- The dedup store records the price of each event: catalog version and price entry
-- (`model` or `model@effective_from`). NULL for events stored before this migration.
ALTER TABLE processed_events
    ADD COLUMN catalog_version TEXT,
    ADD COLUMN price_entry     TEXT;

-- One row per `tally rerate` run that changed (or could have changed) the ledger.
CREATE TABLE rerate_runs (
    run_id          TEXT PRIMARY KEY CHECK (length(run_id) BETWEEN 1 AND 64),
    catalog_version TEXT NOT NULL REFERENCES catalog_versions (catalog_version),
    period_from     TIMESTAMPTZ NOT NULL,
    period_to       TIMESTAMPTZ NOT NULL CHECK (period_to > period_from),
    account_id      TEXT,
    model           TEXT,
    created_by      TEXT NOT NULL CHECK (length(created_by) BETWEEN 1 AND 200),
    reason          TEXT NOT NULL CHECK (length(reason) BETWEEN 1 AND 2000),
    started_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at     TIMESTAMPTZ,
    events_affected BIGINT,
    old_cost_units  BIGINT,
    new_cost_units  BIGINT
);

-- One per run, account and period (calendar month, UTC, clipped to the run's range): the
-- ledger correction entry, and whether its per-event rows reached ClickHouse.
CREATE TABLE rerate_corrections (
    run_id          TEXT NOT NULL REFERENCES rerate_runs (run_id),
    account_id      TEXT NOT NULL,
    period_from     TIMESTAMPTZ NOT NULL,
    period_to       TIMESTAMPTZ NOT NULL,
    entry_id        BIGINT NOT NULL REFERENCES ledger_entries (entry_id),
    events          BIGINT NOT NULL CHECK (events > 0),
    old_cost_units  BIGINT NOT NULL,
    new_cost_units  BIGINT NOT NULL,
    published_at    TIMESTAMPTZ,
    PRIMARY KEY (run_id, account_id, period_from)
);
CREATE INDEX rerate_corrections_unpublished ON rerate_corrections (run_id) WHERE published_at IS NULL;

-- Per corrected event: its cost before and after, committed with the correction entry.
-- An event's cost now is the cost_after_units of its latest row (highest seq), else
-- processed_events.cost_units.
CREATE TABLE usage_corrections (
    seq                      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id                   TEXT NOT NULL REFERENCES rerate_runs (run_id),
    event_id                 TEXT NOT NULL,
    account_id               TEXT NOT NULL,
    occurred_at              TIMESTAMPTZ NOT NULL,
    project_id               TEXT NOT NULL,
    api_key_id               TEXT NOT NULL,
    provider                 TEXT NOT NULL,
    model                    TEXT NOT NULL,
    modality                 TEXT NOT NULL,
    cost_before_units        BIGINT NOT NULL CHECK (cost_before_units >= 0),
    cost_after_units         BIGINT NOT NULL CHECK (cost_after_units >= 0),
    catalog_cost_before_units BIGINT NOT NULL,
    catalog_cost_after_units BIGINT NOT NULL,
    price_entry              TEXT NOT NULL,
    UNIQUE (event_id, run_id)
);
CREATE INDEX usage_corrections_account ON usage_corrections (account_id, occurred_at);
CREATE INDEX usage_corrections_run ON usage_corrections (run_id, account_id, occurred_at);
