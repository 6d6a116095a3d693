-- How many journal entries each account has, kept in the projection by the writer that
-- appends them (ledger::store_balances, same transaction), so the balance endpoint reads
-- one row instead of counting the account's entries on every request (O(entries): a busy
-- account has millions). `tally ledger verify` proves it against the journal.
ALTER TABLE account_balances ADD COLUMN entry_count BIGINT NOT NULL DEFAULT 0;
UPDATE account_balances b SET entry_count = c.n
FROM (SELECT account_id, count(*) AS n FROM ledger_entries GROUP BY account_id) c
WHERE b.account_id = c.account_id;
