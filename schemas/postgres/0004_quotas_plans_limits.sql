-- Windowed usage counters, plans, plan changes and spend limits (issue: quotas and limits).

-- Hourly usage buckets by event time, written in the same transaction as the ledger
-- debits of the events they count (so they are exact after replays). kind/key:
--   account/''        spend and events of the account
--   project/<id>      spend of a project (Brokr stacks)
--   api_key/<id>      spend of an API key (Brievio monthly_spend_cap)
--   feature/<name>    successful calls of a gated feature (Reeve tier quotas)
-- updated_at uses clock_timestamp() so other instances can poll for changes.
CREATE TABLE usage_hourly (
    account_id  TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('account', 'project', 'api_key', 'feature')),
    key         TEXT NOT NULL,
    hour        TIMESTAMPTZ NOT NULL,
    events      BIGINT NOT NULL CHECK (events >= 0),
    cost_units  BIGINT NOT NULL CHECK (cost_units >= 0),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, kind, key, hour)
);
CREATE INDEX usage_hourly_updated ON usage_hourly (updated_at);
CREATE INDEX usage_hourly_hour ON usage_hourly (hour);

CREATE INDEX account_balances_updated ON account_balances (updated_at);

-- The plan an account is on (its quota tier too) and the anchor of its 30-day cycles.
CREATE TABLE account_plans (
    account_id    TEXT PRIMARY KEY REFERENCES accounts (account_id),
    plan          TEXT NOT NULL,
    period_anchor TIMESTAMPTZ NOT NULL,
    updated_at    TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp()
);

-- Audit of plan changes: each is also one ledger entry (kind plan_change).
CREATE TABLE plan_changes (
    change_id               BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id              TEXT NOT NULL REFERENCES accounts (account_id),
    old_plan                TEXT NOT NULL,
    new_plan                TEXT NOT NULL,
    direction               TEXT NOT NULL CHECK (direction IN ('upgrade', 'downgrade')),
    credit_adjustment_units BIGINT NOT NULL,
    entry_id                BIGINT NOT NULL REFERENCES ledger_entries (entry_id),
    created_by              TEXT NOT NULL,
    created_at              TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Monthly spend caps. scope_id is '' for the account-wide cap.
CREATE TABLE spend_limits (
    account_id          TEXT NOT NULL REFERENCES accounts (account_id),
    scope               TEXT NOT NULL CHECK (scope IN ('account', 'project', 'api_key')),
    scope_id            TEXT NOT NULL DEFAULT '',
    monthly_limit_units BIGINT NOT NULL CHECK (monthly_limit_units > 0),
    updated_at          TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (account_id, scope, scope_id)
);

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN (
    'topup', 'consume', 'refund', 'addition', 'adjustment', 'plan_allocation', 'plan_reset',
    'plan_change', 'correction', 'reservation_settle'));
