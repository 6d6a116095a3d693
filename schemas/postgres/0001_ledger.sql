-- Tally's authoritative money store. Applied by `tally migrate` (sqlx migrations).
-- Amounts are BIGINT internal units: 1 USD = 100,000,000 units (micro-cents).

-- Accounts (organizations / wallets). Usage for an account Tally has never seen creates
-- the account (auto_created = true) rather than losing the usage: see ARCHITECTURE.md.
CREATE TABLE accounts (
    account_id      TEXT PRIMARY KEY CHECK (length(account_id) BETWEEN 1 AND 128),
    currency        TEXT NOT NULL DEFAULT 'USD',
    -- How balances are shown: unit name and internal units per shown unit.
    display_unit    TEXT NOT NULL DEFAULT 'USD',
    display_units_per BIGINT NOT NULL DEFAULT 100000000 CHECK (display_units_per > 0),
    auto_created    BOOLEAN NOT NULL DEFAULT false,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Append-only journal. Every balance change is one row; rows are never updated or deleted
-- (enforced by the trigger below). balance_after_units stamps the running balance.
CREATE TABLE ledger_entries (
    entry_id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id          TEXT NOT NULL REFERENCES accounts (account_id),
    kind                TEXT NOT NULL CHECK (kind IN (
                            'topup', 'consume', 'refund', 'addition', 'adjustment',
                            'plan_allocation', 'plan_reset', 'correction', 'reservation_settle')),
    amount_units        BIGINT NOT NULL,
    balance_after_units BIGINT NOT NULL,
    -- Idempotency: the same key can never be written twice; payload_hash tells a replay
    -- (same payload: return the original) from a conflict (different payload: error).
    idempotency_key     TEXT NOT NULL UNIQUE CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    payload_hash        BYTEA NOT NULL CHECK (length(payload_hash) = 32),
    event_id            TEXT,
    occurred_at         TIMESTAMPTZ NOT NULL,
    recorded_at         TIMESTAMPTZ NOT NULL DEFAULT now(),
    description         TEXT NOT NULL DEFAULT '',
    created_by          TEXT,
    corrects_entry_id   BIGINT REFERENCES ledger_entries (entry_id),
    metadata            JSONB NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX ledger_entries_account ON ledger_entries (account_id, entry_id);

CREATE FUNCTION ledger_entries_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger_entries is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END;
$$;
CREATE TRIGGER ledger_entries_no_update BEFORE UPDATE OR DELETE ON ledger_entries
    FOR EACH ROW EXECUTE FUNCTION ledger_entries_append_only();
CREATE TRIGGER ledger_entries_no_truncate BEFORE TRUNCATE ON ledger_entries
    FOR EACH STATEMENT EXECUTE FUNCTION ledger_entries_append_only();

-- Balance projection: derivable from ledger_entries alone (`tally ledger verify` proves it).
CREATE TABLE account_balances (
    account_id          TEXT PRIMARY KEY REFERENCES accounts (account_id),
    balance_units       BIGINT NOT NULL DEFAULT 0,
    last_entry_id       BIGINT,
    last_purchase_at    TIMESTAMPTZ,
    last_deduction_at   TIMESTAMPTZ,
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Every valid usage event Tally has accepted, charged or not: the dedup store (kept for
-- at least the 35-day dedup horizon; this table is never pruned automatically).
CREATE TABLE processed_events (
    event_id        TEXT PRIMARY KEY,
    payload_hash    BYTEA NOT NULL CHECK (length(payload_hash) = 32),
    account_id      TEXT NOT NULL,
    cost_units      BIGINT NOT NULL CHECK (cost_units >= 0),
    occurred_at     TIMESTAMPTZ NOT NULL,
    source_topic    TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset   BIGINT NOT NULL,
    processed_at    TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX processed_events_account_time ON processed_events (account_id, occurred_at);

-- Consumer progress, committed in the same transaction as the effects it produced.
-- next_offset is the first offset NOT yet applied. Kafka's own committed offsets are
-- only a hint (and feed lag metrics); this table is the truth.
CREATE TABLE consumer_offsets (
    group_id    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL CHECK (partition >= 0),
    next_offset BIGINT NOT NULL CHECK (next_offset >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (group_id, topic, partition)
);

-- Messages sent to the dead-letter topic, recorded with the offsets that skipped them.
CREATE TABLE dead_letters (
    source_topic     TEXT NOT NULL,
    source_partition INTEGER NOT NULL,
    source_offset    BIGINT NOT NULL,
    code             TEXT NOT NULL,
    reason           TEXT NOT NULL,
    event_id         TEXT,
    recorded_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (source_topic, source_partition, source_offset)
);

-- ClickHouse send watermark: the highest offset (exclusive) per partition whose usage rows
-- may have reached ClickHouse, written (and committed) BEFORE each ClickHouse insert. A
-- batch containing offsets below it may be a replay of an insert whose Postgres commit
-- never happened (crash in between): only then does the writer ask ClickHouse which of
-- the batch's events it already holds, so usage_log gets exactly one row per event and
-- the rollups fed from it never count an event twice.
CREATE TABLE clickhouse_sent (
    group_id    TEXT NOT NULL,
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL CHECK (partition >= 0),
    sent_upto   BIGINT NOT NULL CHECK (sent_upto >= 0),
    PRIMARY KEY (group_id, topic, partition)
);
