-- Holding authorize (issue 16): `POST /v1/authorize` with `"hold": true` checks and holds,
-- atomically under the account's balance row lock, what the call will consume: one unit of
-- the feature's quota and the estimated cost. One hold machinery with reservations: a
-- reservation is a hold of an amount, an authorization a hold of quota units plus an
-- estimate (which may be zero). Both are settled by the usage event that names them
-- (`reservation_id`), released, or expired.
ALTER TABLE reservations
    ADD COLUMN kind        TEXT NOT NULL DEFAULT 'reservation'
                           CHECK (kind IN ('reservation', 'authorization')),
    ADD COLUMN feature     TEXT,
    ADD COLUMN quota_units INTEGER NOT NULL DEFAULT 0 CHECK (quota_units >= 0),
    ADD COLUMN project_id  TEXT,
    ADD COLUMN api_key_id  TEXT,
    -- The transaction that closed the hold *into usage* (settled by its event, or billed at
    -- its deadline). That transaction also counted the usage (`state_changes`); until an
    -- instance's in-memory counters include it, a holding authorize there still counts the
    -- closed hold, so the unit is never counted zero times (see ARCHITECTURE.md).
    ADD COLUMN closed_xid  xid8;

-- An authorization may hold no money (a quota-only call, a bring-your-own-key call).
ALTER TABLE reservations DROP CONSTRAINT reservations_amount_units_check;
ALTER TABLE reservations ADD CONSTRAINT reservations_amount_units_check
    CHECK (amount_units > 0 OR (kind = 'authorization' AND amount_units >= 0));

CREATE INDEX reservations_closed ON reservations (account_id, closed_xid) WHERE closed_xid IS NOT NULL;
