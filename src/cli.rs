//! Command-line interface (clap). Each verb is a thin wrapper over a library function.

use crate::config::{Connections, RunSettings, Topics};
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "tally", version, about = "Usage aggregator for credit-based billing")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume usage events: price, write the usage log and the ledger, serve the API.
    Run(Box<RunSettings>),
    /// Apply Postgres and ClickHouse migrations, and create the topics.
    Migrate(MigrateArgs),
    /// Produce realistic usage traffic (with duplicates and malformed messages).
    Simulate(SimulateArgs),
    /// Price JSON-lines events from stdin with a catalog; one JSON line out per event.
    Price(PriceArgs),
    /// Catalog tools.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Writer schemas of the usage topic: list the known ids, check a schema before a
    /// producer ships it.
    #[command(subcommand)]
    Schema(SchemaCommand),
    /// Ledger tools.
    #[command(subcommand)]
    Ledger(LedgerCommand),
    /// Price the stored events of a time range again under another catalog and correct
    /// the ledger by the difference: one `correction` entry per account and month, exactly
    /// once. Try it with `--dry-run` first.
    Rerate(RerateArgs),
    /// Print one account's balance (JSON).
    Balance(BalanceArgs),
    /// Print an account's ledger entries, newest first (JSON lines).
    History(HistoryArgs),
    /// Credit a purchase (operator top-up), once per order id.
    Topup(TopupArgs),
    /// Top-up orders: list them, and resolve payments that were captured but could not be
    /// credited by the rules (`needs_review`), exactly once.
    #[command(subcommand)]
    Orders(OrdersCommand),
    /// Manual balance change: addition, refund, adjustment (+/- or set-to), plan allocation
    /// or reset, correction of an entry. Records who did it.
    Adjust(AdjustArgs),
    /// Configure an account's auto-reload threshold and amount.
    AutoReload(AutoReloadArgs),
    /// Put an account on a plan (BroomVA: prorated upgrade credit, downgrade cap) or on a
    /// quota tier that is not a credit plan (Reeve's free / pro / enterprise).
    Plan(PlanArgs),
    /// Set or remove a monthly spend cap on an account, a project or an API key.
    Limit(LimitArgs),
    /// Print balances and usage: the demo's closing summary.
    Report(ReportArgs),
    /// API bearer tokens: create (the token is printed once), revoke, list.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Credit grants: list an account's, create a promotional one, write off what expired.
    #[command(subcommand)]
    Grants(GrantsCommand),
}

#[derive(Debug, Subcommand)]
pub enum GrantsCommand {
    /// An account's grants, newest first (JSON lines): remaining, expiry, source, status.
    List {
        account: String,
        /// Only grants with something left that have not expired.
        #[arg(long)]
        live: bool,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
    /// Create a grant (promotion, operator or bonus) with one `addition` entry, once per key.
    Add(GrantsAddArgs),
    /// Write off every grant past its deadline now (`tally run` does it every second).
    Expire {
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
}

#[derive(Debug, Args)]
pub struct GrantsAddArgs {
    pub account: String,
    /// USD amount (exact to 1e-8).
    #[arg(long)]
    pub usd: rust_decimal::Decimal,
    /// promotion, operator or bonus.
    #[arg(long, default_value = "promotion")]
    pub source: String,
    /// Deadline (RFC 3339); default: the catalog's `[grants.<source>]` expiry, or never.
    #[arg(long, conflicts_with = "expires_in_days")]
    pub expires_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Deadline as days from now.
    #[arg(long)]
    pub expires_in_days: Option<u32>,
    /// Burn priority (lower burns first); default: the source's.
    #[arg(long)]
    pub priority: Option<i32>,
    /// Catalog file whose `[grants]` table sets each source's priority and expiry (the
    /// same catalog, default and variable as `tally run`).
    #[arg(long = "config", env = "TALLY_CONFIG", default_value = "examples/demo.toml")]
    pub catalog_path: PathBuf,
    #[command(flatten)]
    pub who: OperatorArgs,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

/// Who does a manual money operation, why, and under which key.
#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Who is doing it (recorded on the entry).
    #[arg(long = "by-user")]
    pub by_user: String,
    /// Why (recorded on the entry).
    #[arg(long)]
    pub reason: String,
    /// Idempotency key (a new one is generated if absent: retry with the printed key).
    #[arg(long)]
    pub idempotency_key: Option<String>,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub connections: Connections,
    #[command(flatten)]
    pub topics: Topics,
    /// Partitions of the usage topic when it is created here.
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
}

#[derive(Debug, Args)]
pub struct SimulateArgs {
    #[arg(long, env = "TALLY_KAFKA_BROKERS", default_value = "127.0.0.1:19092")]
    pub brokers: String,
    #[arg(long, env = "TALLY_TOPIC", default_value = "tally.usage-events")]
    pub topic: String,
    /// Messages to produce.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Messages per second (0 = as fast as the broker takes them).
    #[arg(long, default_value_t = 0)]
    pub rate: u64,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    #[arg(long, default_value_t = 200)]
    pub accounts: u32,
    #[arg(long, default_value_t = 0.02)]
    pub duplicate_share: f64,
    #[arg(long, default_value_t = 0.01)]
    pub malformed_share: f64,
    #[arg(long, default_value_t = 0.05)]
    pub error_share: f64,
    #[arg(long, default_value_t = 0.05)]
    pub byok_share: f64,
    /// Partitions of the topic (for duplicates sent to other partitions).
    #[arg(long, default_value_t = 6)]
    pub partitions: i32,
    /// Price what was produced with this catalog and print the expected ledger total.
    #[arg(long = "config")]
    pub catalog_path: Option<PathBuf>,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
}

#[derive(Debug, Args)]
pub struct PriceArgs {
    /// Catalog TOML.
    #[arg(long = "config")]
    pub catalog_path: PathBuf,
    /// Pricing threads (default: one per core). Output order is input order either way.
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub threads: Option<u16>,
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Convert LiteLLM's model_prices_and_context_window.json to a Tally catalog (stdout).
    /// Each entry is imported or skipped with its reason (stderr, with a count by reason).
    Import {
        #[arg(long)]
        litellm: PathBuf,
        /// Exit 1 when any entry was skipped.
        #[arg(long)]
        strict: bool,
    },
    /// Load and validate a catalog.
    Check {
        #[arg(long = "config")]
        catalog_path: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum SchemaCommand {
    /// Every writer schema id Tally knows: compiled in, from the schema directory, and, with
    /// a registry, every schema it lists (`GET /schemas`) and each id given by `--id`
    /// (`GET /schemas/ids/{id}`). One JSON line per id, with whether Tally can read it.
    List {
        #[command(flatten)]
        sources: crate::config::SchemaSources,
        /// Also ask the registry for these ids (repeatable).
        #[arg(long = "id")]
        ids: Vec<u32>,
    },
    /// Can Tally read events written with this schema (BACKWARD compatibility against its
    /// reader schema)? Prints why not, naming the field; exit code 1 if not.
    Check {
        /// An Avro schema file (`.avsc`).
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum LedgerCommand {
    /// Recompute every balance from the entries; exit non-zero at the first inconsistency.
    Verify {
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
    /// Compare, per account and month of event time, the ledger's usage debits plus
    /// re-rating corrections with the usage log's costs plus its corrections (ClickHouse);
    /// print every difference; exit 3 if there is one.
    ReconcileUsage {
        #[command(flatten)]
        connections: Connections,
        /// Only months from this one (RFC 3339 time; default: all).
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Only months before this time.
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
}

#[derive(Debug, Args)]
pub struct RerateArgs {
    /// The catalog to price with (the corrected one).
    #[arg(long)]
    pub catalog: PathBuf,
    /// Start of the range of event times (RFC 3339, inclusive; whole seconds: event times
    /// are stored in seconds, so fractions are truncated).
    #[arg(long)]
    pub from: chrono::DateTime<chrono::Utc>,
    /// End of the range (RFC 3339, exclusive).
    #[arg(long)]
    pub to: chrono::DateTime<chrono::Utc>,
    /// Only this account.
    #[arg(long)]
    pub account: Option<String>,
    /// Only events of this model (the model the event named, or the catalog entry that
    /// priced it).
    #[arg(long)]
    pub model: Option<String>,
    /// Print what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Who runs it (recorded on the run and every correction entry). Required without
    /// --dry-run.
    #[arg(long, required_unless_present = "dry_run")]
    pub by: Option<String>,
    /// Why (recorded likewise). Required without --dry-run.
    #[arg(long, required_unless_present = "dry_run")]
    pub reason: Option<String>,
    /// Print the report as one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
    /// Hide the progress bar.
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub connections: Connections,
}

#[derive(Debug, Args)]
pub struct BalanceArgs {
    pub account: String,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct HistoryArgs {
    pub account: String,
    /// Entries to print.
    #[arg(long, default_value_t = 50)]
    pub limit: i64,
    /// Only entries older than this entry id (pagination).
    #[arg(long)]
    pub before: Option<i64>,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct TopupArgs {
    pub account: String,
    /// Amount paid, USD (exact decimal, e.g. 25 or 25.50).
    pub amount_usd: rust_decimal::Decimal,
    /// Payment / order reference: the idempotency key (a new one is generated if absent).
    #[arg(long)]
    pub order_id: Option<String>,
    /// Catalog file whose [topup] table sets limits and bonus tiers: the same catalog,
    /// default and variable as `tally run`, so the operator path and the webhook path
    /// always apply the same rules (there is no rule-free top-up).
    #[arg(long = "config", env = "TALLY_CONFIG", default_value = "examples/demo.toml")]
    pub catalog_path: PathBuf,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("change").required(true).multiple(false)))]
pub struct AdjustArgs {
    pub account: String,
    /// Signed USD amount to add (negative to deduct): an `adjustment` entry.
    #[arg(long, group = "change", allow_hyphen_values = true)]
    pub by_usd: Option<rust_decimal::Decimal>,
    /// Set the balance to exactly this USD amount: the difference is computed and recorded.
    #[arg(long, group = "change", allow_hyphen_values = true)]
    pub set_to_usd: Option<rust_decimal::Decimal>,
    /// Credit this USD amount as an `addition`.
    #[arg(long, group = "change")]
    pub add_usd: Option<rust_decimal::Decimal>,
    /// Credit this USD amount as a `refund`.
    #[arg(long, group = "change")]
    pub refund_usd: Option<rust_decimal::Decimal>,
    /// Credit a plan's period allocation (USD) as `plan_allocation`.
    #[arg(long, group = "change")]
    pub plan_allocation_usd: Option<rust_decimal::Decimal>,
    /// Reset the balance to a plan allocation, no rollover (`plan_reset`).
    #[arg(long, group = "change")]
    pub plan_reset_usd: Option<rust_decimal::Decimal>,
    /// Correct the given entry id by `--by-usd`.
    #[arg(long, requires = "by_usd")]
    pub corrects: Option<i64>,
    #[command(flatten)]
    pub who: OperatorArgs,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct AutoReloadArgs {
    pub account: String,
    /// Request a reload when the balance drops below this USD amount.
    #[arg(long, requires = "amount_usd")]
    pub threshold_usd: Option<rust_decimal::Decimal>,
    /// How much to reload, USD.
    #[arg(long, requires = "threshold_usd")]
    pub amount_usd: Option<rust_decimal::Decimal>,
    /// Turn auto-reload off.
    #[arg(long, conflicts_with_all = ["threshold_usd", "amount_usd"])]
    pub off: bool,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct PlanArgs {
    pub account: String,
    pub plan: String,
    /// Custom terms for this account (enterprise, "configured during provisioning"): the
    /// monthly allocation in USD. Operators may assign plans that are not self-serve.
    #[arg(long)]
    pub allocation_usd: Option<rust_decimal::Decimal>,
    /// Custom overage policy (hard_limit | soft_limit | warn; default: the plan's).
    #[arg(long, requires = "allocation_usd")]
    pub overage_policy: Option<String>,
    /// Custom soft-limit ceiling, percent of the allocation (default: the plan's).
    #[arg(long, requires = "allocation_usd")]
    pub soft_limit_percent: Option<u32>,
    /// Catalog file with the [plans] and [quotas] tables.
    #[arg(long = "config", env = "TALLY_CONFIG", default_value = "examples/demo.toml")]
    pub catalog_path: PathBuf,
    /// Who is doing it (recorded in the audit log).
    #[arg(long = "by-user")]
    pub by_user: String,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    pub account: String,
    /// account | project | api_key
    #[arg(long, default_value = "account")]
    pub scope: String,
    /// Project or API key id (not for the account scope).
    #[arg(long, default_value = "")]
    pub id: String,
    /// Monthly cap, USD.
    #[arg(long, required_unless_present = "remove")]
    pub monthly_usd: Option<rust_decimal::Decimal>,
    /// Remove the cap.
    #[arg(long, conflicts_with = "monthly_usd")]
    pub remove: bool,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    #[command(flatten)]
    pub connections: Connections,
    /// Accounts to list.
    #[arg(long, default_value_t = 10)]
    pub top: u32,
}

#[derive(Debug, Subcommand)]
pub enum OrdersCommand {
    /// List orders, newest first (JSON lines): the review queue by default.
    List {
        /// Only orders in this status (pending, succeeded, failed, needs_review, refund_noted);
        /// `all` for every status.
        #[arg(long, default_value = "needs_review")]
        status: String,
        /// Only this account's orders.
        #[arg(long)]
        account: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
    /// Resolve an order in review, once: credit it, or note that it was refunded.
    Resolve(OrdersResolveArgs),
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("resolution").required(true).multiple(false)))]
pub struct OrdersResolveArgs {
    pub order_id: String,
    /// Credit the payment (bonus tiers apply, the limits that flagged it do not).
    #[arg(long, group = "resolution")]
    pub credit: bool,
    /// The money was refunded outside Tally (e.g. in Stripe): nothing is credited.
    #[arg(long, group = "resolution")]
    pub refund_noted: bool,
    /// The account to credit, when the payment named none.
    #[arg(long, requires = "credit")]
    pub account: Option<String>,
    /// The USD amount paid, when the payment was in another currency.
    #[arg(long, requires = "credit")]
    pub usd: Option<rust_decimal::Decimal>,
    /// Who resolves it (recorded on the order and the ledger entry).
    #[arg(long)]
    pub by: String,
    /// Why (recorded on the order).
    #[arg(long)]
    pub note: String,
    /// Catalog whose [topup] bonus tiers apply to a credit.
    #[arg(long = "config", env = "TALLY_CONFIG", default_value = "examples/demo.toml")]
    pub catalog_path: PathBuf,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token and print it once (only its SHA-256 is stored).
    Create(TokenCreateArgs),
    /// Revoke a token by id; a running `tally run` refuses it within 30 s.
    Revoke {
        token_id: String,
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
    /// List tokens (ids, roles, scopes; never the tokens), newest first (JSON lines).
    List {
        /// Only this account's tokens.
        #[arg(long)]
        account: Option<String>,
        #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
        database_url: String,
    },
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("scope").required(true).args(["account", "platform"])))]
pub struct TokenCreateArgs {
    /// The account the token is scoped to (created if Tally has not seen it).
    #[arg(long)]
    pub account: Option<String>,
    /// A platform-wide token: `--role service` (gateways serving every account) or
    /// `--role operator` (the platform's staff).
    #[arg(long)]
    pub platform: bool,
    /// owner (everything of one account), builder (usage, quotas), bankroller (billing,
    /// limits), service (gateways), operator (platform staff: reads, credit grants).
    #[arg(long)]
    pub role: crate::api::auth::Role,
    /// A label to recognise the token by.
    #[arg(long, default_value = "")]
    pub name: String,
    #[arg(long, env = "TALLY_DATABASE_URL", default_value = "postgres://postgres@127.0.0.1:55432/tally")]
    pub database_url: String,
}
