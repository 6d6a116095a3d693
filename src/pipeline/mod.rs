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

/// Lower the calling thread's scheduling priority by `nice` (0: leave it). Called on every
/// thread of `tally run`'s main runtime (the pipeline, its blocking pool); the HTTP API's
/// runtime is built from the main thread, which keeps the process's priority, so under a
/// saturated CPU the scheduler runs an authorize request ahead of ingest work. Linux keeps
/// the nice value per thread; elsewhere, or if refused, this logs and changes nothing.
pub fn lower_thread_priority(nice: i32) {
    if nice == 0 {
        return;
    }
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain syscalls on the calling thread; no memory is shared with them.
        let result = unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            let current = libc::getpriority(libc::PRIO_PROCESS, tid);
            libc::setpriority(libc::PRIO_PROCESS, tid, current.saturating_add(nice).min(19))
        };
        if result != 0 {
            tracing::warn!(error = %std::io::Error::last_os_error(), nice, "lowering a pipeline thread's priority");
        }
    }
}

#[cfg(test)]
mod tests {
    /// The nice value applies to the calling thread only: the thread that spawned it (the
    /// HTTP runtime's builder, in `tally run`) keeps its priority.
    #[cfg(target_os = "linux")]
    #[test]
    fn lowering_priority_affects_the_calling_thread_only() {
        fn nice_of_this_thread() -> i32 {
            // SAFETY: plain syscalls on the calling thread.
            unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::syscall(libc::SYS_gettid) as libc::id_t) }
        }
        let before = nice_of_this_thread();
        let lowered = std::thread::spawn(|| {
            let start = nice_of_this_thread();
            super::lower_thread_priority(5);
            (start, nice_of_this_thread())
        })
        .join()
        .expect("thread");
        assert_eq!(lowered, (before, (before + 5).min(19)));
        assert_eq!(nice_of_this_thread(), before, "the spawning thread keeps its priority");
    }
}
