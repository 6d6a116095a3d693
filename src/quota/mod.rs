//! Quotas, spend limits and plan overage: the windowed processor's decisions.
//!
//! - [`window`]: hourly buckets, the rolling 30-day window, calendar months and anchored
//!   30-day cycles (pure).
//! - [`config`]: `[plans]`, `[quotas]`, `[limits]` from the catalog file (pure).
//! - [`decide`]: the authorize decision and BroomVA's OverageResult (pure).
//! - [`store`]: Postgres: usage buckets written with the ledger batch, plans, plan changes,
//!   spend limits.
//! - [`state`]: the in-memory copy every instance keeps current for the fast path.

pub mod config;
pub mod decide;
pub mod state;
pub mod store;
pub mod window;
