-- Credit grants (issue 14): every credit is a grant; every debit burns grants in order.
--
-- balance_units = sum(remaining_units of the account's grants) - overdraft, overdraft >= 0
-- (see src/ledger/grants). The journal stays the authority: each entry that changed a
-- grant lists its changes in `grant_changes` ([[grant_id, delta_units], ...]), and
-- `tally ledger verify` proves every grant's remaining_units equals the sum of its
-- journal deltas (plus the opening amount of a legacy grant).
CREATE TABLE credit_grants (
    grant_id        BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    account_id      TEXT NOT NULL REFERENCES accounts (account_id),
    source          TEXT NOT NULL CHECK (source IN (
                        'purchase', 'bonus', 'plan_allocation', 'promotion', 'operator',
                        'refund', 'correction', 'legacy')),
    -- Burn order: lower first, then earliest expiry (never-expiring last), then oldest.
    priority        INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 1000),
    amount_units    BIGINT NOT NULL CHECK (amount_units > 0),
    -- What the grant repaid of the account's overdraft when it was created.
    repaid_units    BIGINT NOT NULL DEFAULT 0 CHECK (repaid_units >= 0 AND repaid_units <= amount_units),
    -- Projection of the journal (like account_balances), updated under the account's
    -- balance lock by every writer.
    remaining_units BIGINT NOT NULL CHECK (remaining_units >= 0 AND remaining_units <= amount_units),
    -- remaining_units = 0, kept by every writer. The indexes filter on this flag, which
    -- changes about once per grant, rather than on remaining_units, which changes with
    -- every batch: so a burn rewrites the row in place (a HOT update, no index entries).
    exhausted       BOOLEAN NOT NULL DEFAULT false CHECK (exhausted = (remaining_units = 0)),
    effective_from  TIMESTAMPTZ NOT NULL,
    expires_at      TIMESTAMPTZ CHECK (expires_at IS NULL OR expires_at > effective_from),
    -- The entry that created it (NULL: a legacy grant, the balance found at migration).
    entry_id        BIGINT REFERENCES ledger_entries (entry_id),
    -- The `breakage` entry that wrote its remainder off at its deadline (once).
    expired_entry_id BIGINT REFERENCES ledger_entries (entry_id),
    description     TEXT NOT NULL DEFAULT '',
    created_by      TEXT,
    created_at      TIMESTAMPTZ NOT NULL DEFAULT now()
) WITH (fillfactor = 80); -- room on each page for those in-place updates
-- The writer loads an account's grants with something left, under its balance lock.
CREATE INDEX credit_grants_live ON credit_grants (account_id) WHERE NOT exhausted;
-- The expiry job finds what is due.
CREATE INDEX credit_grants_due ON credit_grants (expires_at) WHERE expires_at IS NOT NULL AND NOT exhausted;
CREATE INDEX credit_grants_account ON credit_grants (account_id, grant_id);

ALTER TABLE ledger_entries ADD COLUMN grant_changes JSONB;
-- A refund of an entry (a positive correction) finds what earlier refunds of it gave back.
CREATE INDEX ledger_entries_corrects ON ledger_entries (corrects_entry_id) WHERE corrects_entry_id IS NOT NULL;

ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_kind_check;
ALTER TABLE ledger_entries ADD CONSTRAINT ledger_entries_kind_check CHECK (kind IN (
    'topup', 'consume', 'refund', 'addition', 'adjustment', 'plan_allocation', 'plan_reset',
    'plan_change', 'correction', 'reservation_settle', 'breakage', 'payment_refund'));

-- Stripe refunds of a credited payment (`charge.refunded`): the cumulative refunded amount
-- in the processor's minor unit, so each refund takes its credits back exactly once.
ALTER TABLE topup_orders ADD COLUMN refunded_minor BIGINT NOT NULL DEFAULT 0 CHECK (refunded_minor >= 0);

-- Balances found at migration become one never-expiring legacy grant each, so the
-- invariant holds from the first debit on. Negative balances are overdraft.
INSERT INTO credit_grants (account_id, source, priority, amount_units, remaining_units, effective_from,
                           description)
SELECT account_id, 'legacy', 900, balance_units, balance_units, now(), 'balance before credit grants'
FROM account_balances WHERE balance_units > 0;

-- Operators: platform-wide tokens that may create promotional grants (and read billing).
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_role_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_role_check
    CHECK (role IN ('owner', 'builder', 'bankroller', 'service', 'operator'));
ALTER TABLE api_tokens DROP CONSTRAINT api_tokens_check;
ALTER TABLE api_tokens ADD CONSTRAINT api_tokens_scope_check CHECK (
    (role = 'operator' AND account_id IS NULL)
    OR (role <> 'operator' AND (account_id IS NOT NULL OR role = 'service')));
