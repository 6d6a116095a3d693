//! The processing pipeline of `tally run`: source -> transform -> sinks, in two tasks.
//!
//! ```text
//!  Kafka ──► reader (decode, validate, price; build a Batch) ──bounded channel──►
//!            writer: one Postgres transaction per batch:
//!               lock partition offsets ─► drop already-applied offsets ─► dedup event ids
//!               ─► ledger debits + balances ─► ClickHouse insert ─► dead letters to Kafka
//!               ─► advance offsets ─► COMMIT ─► (hint) commit offsets to Kafka
//! ```
//!
//! **Exactly-once.** The effect of a message (ledger debit, dedup record, dead-letter
//! record) and the consumer progress past it become durable in one Postgres transaction.
//! A crash before COMMIT leaves neither; after COMMIT, both. On restart or rebalance the
//! consumer may re-read messages (Kafka's committed offset is only a hint and lags), and
//! the writer drops every message below the partition's stored `next_offset`, under a row
//! lock, so two members briefly owning one partition cannot both apply it. Event ids are a
//! second, independent guard: `processed_events` refuses an id seen before (on any
//! partition, on any day), and a different payload under a known id is dead-lettered as
//! `idempotency_conflict`.
//!
//! **ClickHouse** is written inside the transaction window, before COMMIT. If we crash
//! after the insert and before COMMIT the batch is replayed and inserts identical rows,
//! which `ReplacingMergeTree(account_id, event_id)` collapses: readers use `FINAL`.
//!
//! **Dead letters** are produced (acks=all) before COMMIT: at-least-once on the topic,
//! each carrying its source topic/partition/offset in headers, and exactly-once in the
//! `dead_letters` table.
//!
//! **Backpressure.** If ClickHouse or Postgres fail, the writer retries the same batch
//! with capped backoff; the bounded channel then fills and the reader stops polling. No
//! queue grows without bound.

pub mod lag;
pub mod reader;
pub mod run;
pub mod writer;

// The batch types the stages pass along live in `crate::batch`: the sinks import them
// from there, not from the pipeline that drives them.
