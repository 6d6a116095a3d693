-- In-memory state follows changes, not rows (ARCHITECTURE.md, "State follows changes").
--
-- Every transaction that changes what `tally run` keeps in memory leaves a trace that an
-- instance can read at a cost proportional to the changes since its last read:
--   * usage buckets: one `state_changes` row per transaction with the bucket increments it
--     added (deltas, applied exactly once per instance by change_id);
--   * balances, plans, spend caps: the changed rows themselves, found by `changed_xid`.
-- Both are read with `xid >= xmin of the previous read's snapshot`: every change that was
-- not visible to that snapshot was made by a transaction whose xid is at least its xmin,
-- whatever the commit order, so no change can be missed.

CREATE TABLE state_changes (
    change_id   BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    -- Bucket increments, one array element per (account, kind, key, hour).
    accounts    TEXT[] NOT NULL,
    kinds       TEXT[] NOT NULL,
    keys        TEXT[] NOT NULL,
    hours       BIGINT[] NOT NULL,
    events      BIGINT[] NOT NULL,
    costs       BIGINT[] NOT NULL,
    -- Folded into usage_hourly (quota::store::fold_changes); unfolded rows are never pruned.
    folded      BOOLEAN NOT NULL DEFAULT false,
    created_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
-- Increments are written once and read a few times: compressing them costs more CPU on
-- the hot path than the disk it saves.
ALTER TABLE state_changes ALTER COLUMN accounts SET STORAGE EXTERNAL,
    ALTER COLUMN kinds SET STORAGE EXTERNAL, ALTER COLUMN keys SET STORAGE EXTERNAL,
    ALTER COLUMN hours SET STORAGE EXTERNAL, ALTER COLUMN events SET STORAGE EXTERNAL,
    ALTER COLUMN costs SET STORAGE EXTERNAL;
CREATE INDEX state_changes_unfolded ON state_changes (change_id) WHERE NOT folded;
CREATE INDEX state_changes_xid ON state_changes (xid);
CREATE INDEX state_changes_created ON state_changes (created_at);

ALTER TABLE account_balances ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX account_balances_changed ON account_balances (changed_xid);
DROP INDEX account_balances_updated;

ALTER TABLE account_plans ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX account_plans_changed ON account_plans (changed_xid);

ALTER TABLE spend_limits ADD COLUMN changed_xid xid8 NOT NULL DEFAULT pg_current_xact_id();
CREATE INDEX spend_limits_changed ON spend_limits (changed_xid);

-- usage_hourly is now written only by the fold, aggregated, off the hot path; it is no
-- longer polled by time: without this index an increment of an existing bucket changes no
-- indexed column and can be a HOT update (no index writes at all).
DROP INDEX usage_hourly_updated;
ALTER TABLE usage_hourly SET (fillfactor = 80);

-- Nothing reads these on the hot path or anywhere else; each cost an index entry per row.
DROP INDEX usage_hourly_hour;
DROP INDEX processed_events_account_time;

-- The dedup store now holds claims made in their own short transaction before the batch
-- (ledger::usage): only reclaimed events can have a ClickHouse row from a crashed attempt,
-- so the per-partition send watermark is no longer needed. (Upgrade: stop the old
-- instances with SIGTERM, which commits or abandons every batch cleanly, then start the
-- new ones.)
DROP TABLE clickhouse_sent;
-- Which consumer group claimed the event (NULL: a row from before claims, always applied).
-- A claim at position P of group G is applied iff G's next_offset for P's partition is
-- past P's offset (offsets advance in the transaction that applies the batch).
ALTER TABLE processed_events ADD COLUMN source_group TEXT;

-- The per-row foreign key from the journal to accounts was a row-level trigger on the
-- hottest insert (about 40% of its cost). The invariant still holds, by construction and
-- by proof: every writer locks the account's balance row (which references accounts)
-- before it appends, and `tally ledger verify` fails on any entry whose account has no
-- balance row. Accounts are never deleted.
ALTER TABLE ledger_entries DROP CONSTRAINT ledger_entries_account_id_fkey;
