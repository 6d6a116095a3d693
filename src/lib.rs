//! Tally: a stream-processing usage aggregator for credit-based billing.
//!
//! # Layout
//! - [`event`]: the usage event (raw wire form and parsed domain value).
//! - [`codec`]: Confluent-framed Avro <-> raw event.
//! - [`money`]: the internal unit (1e-8 USD) and the one rounding rule.
//! - [`pricing`]: catalog (TOML) and the pure price function.
//! - [`pipeline`]: `tally run`: reader (decode, price, batch) -> writer (ledger + usage log).
//! - [`ledger`]: the Postgres ledger (append-only journal, balances, verify).
//! - [`analytics`]: the ClickHouse usage log.
//! - [`rerate`]: `tally rerate`: price stored history again, correct the ledger once.
//! - [`api`]: the HTTP API (axum).
//! - [`payments`]: checkout sessions at Stripe / Polar, subscriptions driving plans.
//! - [`simulate`]: deterministic traffic generator.
//! - [`kafka`], [`config`], [`metrics`], [`cli`], [`commands`]: plumbing.
//!
//! Pure logic (event parsing, codec, pricing, simulate's generator) does no I/O and is
//! tested without servers. Everything that talks to a server is tested against the real
//! one, started by `scripts/stack`.

pub mod analytics;
pub mod api;
pub mod batch;
pub mod cli;
pub mod codec;
pub mod commands;
pub mod config;
pub mod event;
pub mod kafka;
pub mod ledger;
pub mod metrics;
pub mod money;
pub mod payments;
pub mod pipeline;
pub mod pricing;
pub mod quota;
pub mod rerate;
pub mod simulate;
