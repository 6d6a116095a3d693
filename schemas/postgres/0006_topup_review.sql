-- Captured money is never dropped (issue 11.1). A payment the processor reports as
-- captured but that Tally cannot credit by its rules (amount outside the top-up limits,
-- a currency other than USD, no or an invalid account) is recorded as an order in
-- `needs_review` with the reason, instead of being refused. An operator resolves it once
-- (`tally orders resolve`): `credit` posts the top-up entry (status `succeeded`) or
-- `refund_noted` records that the money was returned outside Tally (no entry).
--
-- What the processor reported is kept as it was, in its own currency and minor unit
-- (`currency`, `amount_minor`): Tally never converts currencies. `paid_units` and
-- `credited_units` are USD internal units and are 0 while an order is in review or when
-- its money was refunded; the account may be unknown (NULL) until an operator names it.

ALTER TABLE topup_orders
    ADD COLUMN currency        TEXT NOT NULL DEFAULT 'usd' CHECK (currency ~ '^[a-z]{3}$'),
    ADD COLUMN amount_minor    BIGINT CHECK (amount_minor > 0),
    ADD COLUMN review_reason   TEXT,
    ADD COLUMN resolution      TEXT CHECK (resolution IN ('credited', 'refund_noted')),
    ADD COLUMN resolved_by     TEXT,
    ADD COLUMN resolution_note TEXT,
    ADD COLUMN resolved_at     TIMESTAMPTZ;

ALTER TABLE topup_orders ALTER COLUMN account_id DROP NOT NULL;
ALTER TABLE topup_orders DROP CONSTRAINT topup_orders_status_check;
ALTER TABLE topup_orders DROP CONSTRAINT topup_orders_paid_units_check;
ALTER TABLE topup_orders ADD CONSTRAINT topup_orders_status_check
    CHECK (status IN ('pending', 'succeeded', 'failed', 'needs_review', 'refund_noted'));
ALTER TABLE topup_orders ADD CONSTRAINT topup_orders_paid_units_check
    CHECK (paid_units > 0 OR status IN ('needs_review', 'refund_noted'));
-- Only an order in review may lack its account; a review always says why.
ALTER TABLE topup_orders ADD CONSTRAINT topup_orders_account_known
    CHECK (account_id IS NOT NULL OR status IN ('needs_review', 'refund_noted'));
ALTER TABLE topup_orders ADD CONSTRAINT topup_orders_review_has_reason
    CHECK (status <> 'needs_review' OR review_reason IS NOT NULL);
-- A resolution is made once, by someone.
ALTER TABLE topup_orders ADD CONSTRAINT topup_orders_resolution_by
    CHECK ((resolution IS NULL) = (resolved_by IS NULL AND resolved_at IS NULL));

-- The operator's queue and the metric read this.
CREATE INDEX topup_orders_needs_review ON topup_orders (created_at) WHERE status = 'needs_review';
