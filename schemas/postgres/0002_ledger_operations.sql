-- Ledger operations beyond usage: top-ups (with bonus tiers), refunds, manual additions and
-- adjustments, plan allocations and resets, corrections, reservations (two-phase holds),
-- idempotent operation results, and the auto-reload outbox.

-- Projection columns for holds: effective balance = balance - reserved - pending.
ALTER TABLE account_balances
    ADD COLUMN reserved_units BIGINT NOT NULL DEFAULT 0 CHECK (reserved_units >= 0),
    ADD COLUMN pending_units  BIGINT NOT NULL DEFAULT 0 CHECK (pending_units >= 0);

-- Auto-reload: when the balance crosses below the threshold, one request is queued in
-- auto_reload_requests (the outbox, published to Kafka by `tally run`) and the account is
-- disarmed until its balance is back at or above the threshold.
ALTER TABLE accounts
    ADD COLUMN auto_reload_threshold_units BIGINT,
    ADD COLUMN auto_reload_amount_units    BIGINT CHECK (auto_reload_amount_units > 0),
    ADD COLUMN auto_reload_armed           BOOLEAN NOT NULL DEFAULT true;

CREATE TABLE auto_reload_requests (
    request_id      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    balance_units   BIGINT NOT NULL,
    threshold_units BIGINT NOT NULL,
    amount_units    BIGINT NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    published_at    TIMESTAMPTZ
);
CREATE INDEX auto_reload_unpublished ON auto_reload_requests (request_id) WHERE published_at IS NULL;

-- Every idempotent operation (top-up, adjustment, reservation, ...) stores its result under
-- its key: the same key and payload returns the stored result; a different payload is a
-- conflict.
CREATE TABLE idempotency_records (
    idempotency_key TEXT PRIMARY KEY CHECK (length(idempotency_key) BETWEEN 1 AND 200),
    operation       TEXT NOT NULL,
    payload_hash    BYTEA NOT NULL CHECK (length(payload_hash) = 32),
    result          JSONB NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Purchases. order_id is the payment's id (Stripe payment intent, Polar order, or an
-- operator's reference): one order credits once, whatever the number of webhooks.
CREATE TABLE topup_orders (
    order_id        TEXT PRIMARY KEY CHECK (length(order_id) BETWEEN 1 AND 200),
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    source          TEXT NOT NULL CHECK (source IN ('stripe', 'operator', 'polar')),
    paid_units      BIGINT NOT NULL CHECK (paid_units > 0),
    credited_units  BIGINT NOT NULL CHECK (credited_units >= paid_units),
    status          TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed')),
    entry_id        BIGINT REFERENCES ledger_entries (entry_id),
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at      TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE INDEX topup_orders_account ON topup_orders (account_id, created_at);

-- Two-phase holds. active: amount held; settling: the gateway reported the actual cost
-- (pending until the usage event arrives); settled / released / expired: closed.
CREATE TABLE reservations (
    reservation_id  TEXT PRIMARY KEY CHECK (length(reservation_id) BETWEEN 1 AND 128),
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    amount_units    BIGINT NOT NULL CHECK (amount_units > 0),
    pending_units   BIGINT NOT NULL DEFAULT 0 CHECK (pending_units >= 0),
    actual_units    BIGINT,
    status          TEXT NOT NULL CHECK (status IN ('active', 'settling', 'settled', 'released', 'expired')),
    expires_at      TIMESTAMPTZ NOT NULL,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    closed_at       TIMESTAMPTZ,
    event_id        TEXT
);
CREATE INDEX reservations_open ON reservations (expires_at) WHERE status IN ('active', 'settling');
CREATE INDEX reservations_account ON reservations (account_id) WHERE status IN ('active', 'settling');
