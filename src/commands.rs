//! What each CLI verb does.

use crate::cli::{
    CatalogCommand, Command, LedgerCommand, MigrateArgs, ReportArgs, SchemaCommand, SimulateArgs,
};
use crate::pricing::Catalog;
use crate::simulate::{Generator, Kind, SimulateOptions};
use crate::{analytics, kafka, ledger, money, pipeline};
use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::producer::FutureRecord;
use std::collections::HashSet;
use std::io::Write;
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub async fn dispatch(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Run(settings) => {
            let handle = crate::metrics::install()?;
            pipeline::run::run(*settings, handle).await?;
        }
        Command::Migrate(args) => migrate(args).await?,
        Command::Simulate(args) => simulate(args).await?,
        Command::Price(args) => {
            let catalog = load_catalog(&args.catalog_path)?;
            let stdin = std::io::stdin().lock();
            let stdout = std::io::stdout().lock();
            let threads = args.threads.map_or_else(crate::pricing::cli::default_threads, usize::from);
            let summary = crate::pricing::cli::price_lines(&catalog, stdin, stdout, threads)?;
            if summary.errors > 0 {
                eprintln!("{} priced, {} bad lines", summary.priced, summary.errors);
                return Ok(ExitCode::from(2));
            }
        }
        Command::Catalog(CatalogCommand::Import { litellm, strict }) => {
            let text = std::fs::read_to_string(&litellm)
                .with_context(|| format!("reading {}", litellm.display()))?;
            let import =
                crate::pricing::litellm::import_litellm(&text).map_err(|e| anyhow::anyhow!("{e}"))?;
            std::io::stdout().write_all(import.toml.as_bytes())?;
            let r = &import.report;
            for (key, reason) in &r.skipped {
                eprintln!("skipped {key}: {reason}");
            }
            for (key, note) in &r.adjusted {
                eprintln!("adjusted {key}: {note}");
            }
            eprintln!(
                "imported {} models, skipped {}, adjusted {} prices",
                r.imported,
                r.skipped.len(),
                r.adjusted.len()
            );
            for (reason, n) in r.skipped_by_reason() {
                eprintln!("  {n:>5} skipped: {reason}");
            }
            if strict && !r.skipped.is_empty() {
                return Ok(ExitCode::from(1));
            }
        }
        Command::Catalog(CatalogCommand::Check { catalog_path }) => {
            load_catalog(&catalog_path)?;
            let ledger_cfg =
                ledger::config::LedgerConfig::load(&catalog_path).map_err(|e| anyhow::anyhow!(e))?;
            let quotas =
                crate::quota::config::QuotaConfig::load(&catalog_path).map_err(|e| anyhow::anyhow!(e))?;
            quotas.check_against(&load_catalog(&catalog_path)?).map_err(|e| anyhow::anyhow!(e))?;
            ledger_cfg
                .subscriptions
                .validate(|plan| quotas.plans.contains_key(plan))
                .map_err(|e| anyhow::anyhow!("{}: {e}", catalog_path.display()))?;
            println!("{}: ok", catalog_path.display());
        }
        Command::Schema(SchemaCommand::List { sources, ids }) => {
            let schemas = sources.load()?;
            if sources.schema_registry_url.is_some() {
                // Every id the registry lists; one that cannot list still answers by id.
                if let Err(e) = schemas.load_registry_listing().await {
                    eprintln!("schema registry listing unavailable ({e}); listing the ids asked with --id");
                }
            }
            let stop = tokio_util::sync::CancellationToken::new();
            for id in ids {
                // A 5-byte header is all `prepare` reads: the id.
                let mut frame = vec![0u8];
                frame.extend_from_slice(&id.to_be_bytes());
                let asked = schemas.prepare(&frame, &stop);
                tokio::time::timeout(std::time::Duration::from_secs(30), asked)
                    .await
                    .with_context(|| format!("the schema registry did not answer for id {id}"))?;
            }
            for (id, source, summary, incompatible) in schemas.list() {
                let line = serde_json::json!({
                    "id": id, "source": source, "schema": summary,
                    "readable": incompatible.is_none(), "reason": incompatible,
                });
                println!("{line}");
            }
        }
        Command::Schema(SchemaCommand::Check { file }) => {
            let text =
                std::fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
            let schema = apache_avro::Schema::parse_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: not an Avro schema: {e}", file.display()))?;
            match crate::codec::schemas::check(&schema) {
                Ok(()) => println!("{}: ok, Tally can read events written with this schema", file.display()),
                Err(why) => {
                    println!("{}: INCOMPATIBLE: {why}", file.display());
                    return Ok(ExitCode::from(1));
                }
            }
        }
        Command::Ledger(LedgerCommand::Verify { database_url }) => {
            let pool = ledger::connect(&database_url, 2).await?;
            match ledger::verify(&pool).await {
                Ok(report) => println!("{}", serde_json::to_string(&report)?),
                Err(e) => {
                    eprintln!("ledger verify FAILED: {e}");
                    return Ok(ExitCode::from(3));
                }
            }
        }
        Command::Rerate(args) => return rerate(args).await,
        Command::Ledger(LedgerCommand::ReconcileUsage { connections, from, to }) => {
            let pool = ledger::connect(&connections.database_url, 2).await?;
            let ch = analytics::client(&connections.clickhouse_url, &connections.clickhouse_database);
            let differences = crate::rerate::reconcile::reconcile(&pool, &ch, from, to).await?;
            for d in &differences {
                println!("{}", serde_json::to_string(d)?);
            }
            if !differences.is_empty() {
                eprintln!("reconcile-usage: {} account-months differ", differences.len());
                return Ok(ExitCode::from(3));
            }
            eprintln!("reconcile-usage: the ledger and the usage log agree");
        }
        Command::Balance(args) => {
            let pool = ledger::connect(&args.database_url, 2).await?;
            match ledger::balance(&pool, &args.account).await? {
                Some(view) => println!("{}", serde_json::to_string_pretty(&view)?),
                None => {
                    eprintln!("no account {}", args.account);
                    return Ok(ExitCode::from(4));
                }
            }
        }
        Command::Report(args) => report(args).await?,
        Command::Token(cmd) => return token(cmd).await,
        Command::History(args) => {
            let pool = ledger::connect(&args.database_url, 2).await?;
            for e in ledger::ops::history(&pool, &args.account, args.before, args.limit).await? {
                println!("{}", serde_json::to_string(&e)?);
            }
        }
        Command::Topup(args) => topup(args).await?,
        Command::Orders(cmd) => orders(cmd).await?,
        Command::Grants(cmd) => grants(cmd).await?,
        Command::Plan(args) => plan(args).await?,
        Command::Limit(args) => {
            let pool = ledger::connect(&args.database_url, 2).await?;
            let units = args.monthly_usd.map(usd_units).transpose()?;
            crate::quota::store::set_limit(&pool, &args.account, &args.scope, &args.id, units).await?;
            println!(
                "limit {} {} {:?}: {}",
                args.account,
                args.scope,
                args.id,
                args.monthly_usd.map_or("removed".into(), |u| format!("{u} USD/month"))
            );
        }
        Command::Adjust(args) => adjust(args).await?,
        Command::AutoReload(args) => {
            let pool = ledger::connect(&args.database_url, 2).await?;
            let setting = match (args.off, args.threshold_usd, args.amount_usd) {
                (true, _, _) => None,
                (false, Some(t), Some(a)) => Some((usd_units(t)?, usd_units(a)?)),
                _ => anyhow::bail!("give --threshold-usd and --amount-usd, or --off"),
            };
            ledger::auto_reload::configure(&pool, &args.account, setting).await?;
            println!("auto-reload for {}: {setting:?}", args.account);
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn rerate(args: crate::cli::RerateArgs) -> anyhow::Result<ExitCode> {
    let catalog = load_catalog(&args.catalog)?;
    let c = &args.connections;
    let pool = ledger::connect(&c.database_url, 4).await?;
    let ch = analytics::client(&c.clickhouse_url, &c.clickhouse_database);
    let opts = crate::rerate::RerateOptions {
        catalog,
        from: args.from,
        to: args.to,
        account: args.account.clone(),
        model: args.model.clone(),
        dry_run: args.dry_run,
        created_by: args.by.clone(),
        reason: args.reason.clone(),
        progress: !args.quiet && std::io::IsTerminal::is_terminal(&std::io::stderr()),
        fault_abort_after_commits: std::env::var("TALLY_FAULT_RERATE_ABORT_AFTER_COMMITS")
            .ok()
            .and_then(|v| v.parse().ok()),
    };
    let report = crate::rerate::rerate(&pool, &ch, &opts).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", crate::rerate::render(&report));
    }
    if report.unreadable_rows > 0 {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

fn usd_units(usd: rust_decimal::Decimal) -> anyhow::Result<i64> {
    money::exact_units(usd).map_err(|e| anyhow::anyhow!(e))
}

async fn plan(args: crate::cli::PlanArgs) -> anyhow::Result<()> {
    use crate::quota::{config::QuotaConfig, store};
    let cfg = QuotaConfig::load(&args.catalog_path).map_err(|e| anyhow::anyhow!(e))?;
    let pool = ledger::connect(&args.database_url, 2).await?;
    let now = chrono::Utc::now();
    let Some(new) = cfg.plans.get(&args.plan) else {
        let is_tier =
            cfg.quotas.values().any(|tiers| tiers.contains_key(&args.plan)) || args.plan == "enterprise";
        anyhow::ensure!(
            is_tier,
            "{} is neither a plan nor a quota tier of {}",
            args.plan,
            args.catalog_path.display()
        );
        anyhow::ensure!(
            args.allocation_usd.is_none(),
            "{} is a quota tier, not a credit plan: it takes no custom terms",
            args.plan
        );
        store::set_tier(&pool, &args.account, &args.plan, now).await?;
        println!("{} is on tier {}", args.account, args.plan);
        return Ok(());
    };
    let custom_terms = match args.allocation_usd {
        None => None,
        Some(usd) => Some(crate::quota::config::CustomTerms {
            allocation_units: usd_units(usd)?,
            policy: match args.overage_policy.as_deref() {
                None => new.policy,
                Some(p) => crate::quota::config::OveragePolicy::parse(p).ok_or_else(|| {
                    anyhow::anyhow!("--overage-policy must be hard_limit, soft_limit or warn")
                })?,
            },
            soft_limit_percent: args.soft_limit_percent.unwrap_or(new.soft_limit_percent),
        }),
    };
    let (current, old) = store::plan_of(&pool, &cfg, &args.account).await?;
    let key = format!(
        "plan:{}:{}:{}:{}",
        args.account,
        current.as_deref().unwrap_or("none"),
        new.name,
        now.timestamp()
    );
    let req = store::PlanChangeRequest {
        account_id: &args.account,
        new_plan: new,
        old_plan: old.as_ref(),
        custom_terms,
        by_operator: true,
        idempotency_key: &key,
        created_by: &args.by_user,
        now,
        cycle: cfg.cycle,
    };
    let change = store::change_plan(&pool, &req).await?;
    println!("{}", serde_json::to_string_pretty(&change)?);
    Ok(())
}

async fn topup(args: crate::cli::TopupArgs) -> anyhow::Result<()> {
    let cfg = ledger::config::LedgerConfig::load(&args.catalog_path).map_err(|e| anyhow::anyhow!(e))?;
    let pool = ledger::connect(&args.database_url, 2).await?;
    let order_id = args.order_id.unwrap_or_else(|| format!("op-{}", uuid::Uuid::new_v4()));
    let req = ledger::topup::TopupRequest {
        order_id,
        account_id: args.account,
        paid_usd: args.amount_usd,
        source: "operator",
    };
    let result = ledger::topup::complete(&pool, &cfg.topup, &req).await?;
    println!("{}", serde_json::to_string_pretty(&result)?);
    Ok(())
}

async fn orders(cmd: crate::cli::OrdersCommand) -> anyhow::Result<()> {
    use crate::cli::OrdersCommand;
    use ledger::topup::{self, Resolution};
    match cmd {
        OrdersCommand::List { status, account, limit, database_url } => {
            let pool = ledger::connect(&database_url, 2).await?;
            let status = (status != "all").then_some(status);
            for o in topup::list(&pool, account.as_deref(), status.as_deref(), limit).await? {
                println!("{}", serde_json::to_string(&o)?);
            }
        }
        OrdersCommand::Resolve(args) => {
            let cfg =
                ledger::config::LedgerConfig::load(&args.catalog_path).map_err(|e| anyhow::anyhow!(e))?;
            let pool = ledger::connect(&args.database_url, 2).await?;
            let resolution = if args.credit {
                Resolution::Credit { account_id: args.account, usd: args.usd }
            } else {
                Resolution::RefundNoted
            };
            let order =
                topup::resolve(&pool, &cfg.topup, &args.order_id, &resolution, &args.by, &args.note).await?;
            println!("{}", serde_json::to_string_pretty(&order)?);
        }
    }
    Ok(())
}

async fn adjust(args: crate::cli::AdjustArgs) -> anyhow::Result<()> {
    use ledger::ops::ManualKind as K;
    let kind = match (args.by_usd, args.set_to_usd, args.add_usd, args.refund_usd) {
        (Some(by), ..) => match args.corrects {
            Some(entry_id) => K::Correction { entry_id, units: usd_units(by)? },
            None => K::AdjustBy(usd_units(by)?),
        },
        (_, Some(to), ..) => K::SetBalanceTo(usd_units(to)?),
        (_, _, Some(add), _) => K::Addition(usd_units(add)?),
        (_, _, _, Some(refund)) => K::Refund(usd_units(refund)?),
        _ => match (args.plan_allocation_usd, args.plan_reset_usd) {
            (Some(a), _) => K::PlanAllocation(usd_units(a)?),
            (_, Some(r)) => K::PlanReset(usd_units(r)?),
            _ => anyhow::bail!("nothing to do"),
        },
    };
    let key = args.who.idempotency_key.unwrap_or_else(|| format!("manual-{}", uuid::Uuid::new_v4()));
    let pool = ledger::connect(&args.database_url, 2).await?;
    let req = ledger::ops::ManualRequest {
        account_id: args.account,
        idempotency_key: key.clone(),
        kind,
        created_by: args.who.by_user,
        reason: args.who.reason,
    };
    let posted = ledger::ops::manual(&pool, &req).await?;
    println!("{}", serde_json::json!({"idempotency_key": key, "entry": posted}));
    Ok(())
}

async fn grants(cmd: crate::cli::GrantsCommand) -> anyhow::Result<()> {
    use crate::cli::GrantsCommand as G;
    use ledger::grants;
    match cmd {
        G::List { account, live, limit, database_url } => {
            let pool = ledger::connect(&database_url, 2).await?;
            for g in grants::list(&pool, &account, None, limit, live).await? {
                println!("{}", serde_json::to_string(&g)?);
            }
        }
        G::Add(args) => {
            let source: grants::GrantSource = serde_json::from_value(serde_json::json!(args.source))
                .map_err(|_| anyhow::anyhow!("--source must be promotion, operator or bonus"))?;
            let policies = ledger::config::LedgerConfig::load(&args.catalog_path)
                .map_err(|e| anyhow::anyhow!(e))?
                .grants;
            let key = args.who.idempotency_key.unwrap_or_else(|| format!("grant-{}", uuid::Uuid::new_v4()));
            let pool = ledger::connect(&args.database_url, 2).await?;
            let req = grants::GrantRequest {
                account_id: args.account,
                idempotency_key: key.clone(),
                units: usd_units(args.usd)?,
                source,
                priority: args.priority,
                expires_at: args.expires_at,
                expires_in_days: args.expires_in_days,
                created_by: args.who.by_user,
                reason: args.who.reason,
            };
            let granted = grants::grant(&pool, &policies, &req).await?;
            println!("{}", serde_json::json!({"idempotency_key": key, "grant": granted}));
        }
        G::Expire { database_url } => {
            let pool = ledger::connect(&database_url, 2).await?;
            let n = grants::expire_due(&pool, chrono::Utc::now()).await?;
            println!("{}", serde_json::json!({"expired_grants": n}));
        }
    }
    Ok(())
}

fn load_catalog(path: &std::path::Path) -> anyhow::Result<Catalog> {
    Catalog::load(path).map_err(|e| anyhow::anyhow!("{e}"))
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<()> {
    let c = &args.connections;
    let pool = ledger::connect(&c.database_url, 2).await.context("connecting to Postgres")?;
    ledger::migrate(&pool).await.context("Postgres migrations")?;
    analytics::migrate(&c.clickhouse_url, &c.clickhouse_database).await.context("ClickHouse migrations")?;
    let topics = [(args.topics.topic.as_str(), args.partitions), (args.topics.dlq_topic.as_str(), 3)];
    kafka::ensure_topics(&c.brokers, &topics).await.context("creating topics")?;
    println!("migrations applied; topics {} and {} ready", args.topics.topic, args.topics.dlq_topic);
    Ok(())
}

async fn simulate(args: SimulateArgs) -> anyhow::Result<()> {
    let catalog = args.catalog_path.as_deref().map(load_catalog).transpose()?;
    let producer = kafka::producer(&args.brokers)?;
    let mut generator = Generator::new(SimulateOptions {
        seed: args.seed,
        accounts: args.accounts,
        duplicate_share: args.duplicate_share,
        malformed_share: args.malformed_share,
        error_share: args.error_share,
        byok_share: args.byok_share,
        partitions: args.partitions,
        ..SimulateOptions::default()
    });
    let bar = if args.quiet { ProgressBar::hidden() } else { ProgressBar::new(args.count) };
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} msgs {per_sec} eta {eta}")?);
    let started = Instant::now();
    let mut tally = SimTally::default();
    // At most this many sends in flight: bounds memory while keeping the producer busy.
    const IN_FLIGHT_MAX: usize = 10_000;
    let mut in_flight = futures::stream::FuturesUnordered::new();
    use futures::StreamExt;
    for i in 0..args.count {
        if args.rate > 0 {
            let due = Duration::from_secs_f64(i as f64 / args.rate as f64);
            if let Some(wait) = due.checked_sub(started.elapsed()) {
                tokio::time::sleep(wait).await;
            }
        }
        let msg = generator.next_message();
        tally.count(&msg, catalog.as_ref());
        let producer = producer.clone();
        let topic = args.topic.clone();
        in_flight.push(async move {
            let mut record = FutureRecord::to(&topic).key(&msg.key).payload(&msg.payload);
            if let Some(p) = msg.partition {
                record = record.partition(p);
            }
            producer.send(record, Duration::from_secs(60)).await.map_err(|(e, _)| e)
        });
        while in_flight.len() >= IN_FLIGHT_MAX {
            if let Some(r) = in_flight.next().await {
                r.context("producing")?;
            }
        }
        bar.inc(1);
    }
    while let Some(r) = in_flight.next().await {
        r.context("producing")?;
    }
    bar.finish_and_clear();
    tally.print(args.count, started.elapsed(), catalog.is_some());
    Ok(())
}

/// The simulator's own count of what it produced: the expected outcome.
#[derive(Default)]
struct SimTally {
    distinct: HashSet<String>,
    duplicates: u64,
    malformed: u64,
    expected_debit_units: i64,
}

impl SimTally {
    fn count(&mut self, msg: &crate::simulate::Message, catalog: Option<&Catalog>) {
        match &msg.kind {
            Kind::Valid(e) => {
                if self.distinct.insert(e.event_id.clone())
                    && let Some(c) = catalog
                {
                    self.expected_debit_units += c.price(e).cost_units;
                }
            }
            Kind::Duplicate(_) => self.duplicates += 1,
            Kind::Malformed(_) => self.malformed += 1,
        }
    }

    fn print(&self, count: u64, took: Duration, priced: bool) {
        let rate = count as f64 / took.as_secs_f64().max(1e-9);
        println!(
            "produced {count} messages in {:.1}s ({rate:.0}/s): {} distinct events, {} duplicates, {} malformed",
            took.as_secs_f64(),
            self.distinct.len(),
            self.duplicates,
            self.malformed
        );
        if priced {
            println!(
                "expected ledger debits: {} USD ({} units)",
                money::units_to_usd_string(self.expected_debit_units),
                self.expected_debit_units
            );
        }
    }
}

async fn report(args: ReportArgs) -> anyhow::Result<()> {
    let c = &args.connections;
    let pool = ledger::connect(&c.database_url, 2).await?;
    let (accounts, entries, debits): (i64, i64, Option<i64>) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM accounts), count(*), -sum(amount_units)::bigint
         FROM ledger_entries WHERE kind = 'consume'",
    )
    .fetch_one(&pool)
    .await?;
    let (events, dead): (i64, i64) =
        sqlx::query_as("SELECT (SELECT count(*) FROM processed_events), (SELECT count(*) FROM dead_letters)")
            .fetch_one(&pool)
            .await?;
    println!("== ledger (Postgres)");
    println!(
        "accounts {accounts}, events applied {events}, debit entries {entries}, dead letters {dead}, total debits {} USD",
        money::units_to_usd_string(debits.unwrap_or(0))
    );
    let top: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, balance_units FROM account_balances ORDER BY balance_units ASC, account_id LIMIT $1",
    )
    .bind(i64::from(args.top))
    .fetch_all(&pool)
    .await?;
    println!("{:<14} {:>18}", "account", "balance USD");
    for (account, units) in top {
        println!("{account:<14} {:>18}", money::units_to_usd_string(units));
    }
    usage_report(c).await
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct UsageLine {
    modality: String,
    events: u64,
    charged: u64,
    tokens: u64,
    cost_units: i64,
}

async fn usage_report(c: &crate::config::Connections) -> anyhow::Result<()> {
    let client = analytics::client(&c.clickhouse_url, &c.clickhouse_database);
    let lines: Vec<UsageLine> = client
        .query(
            // Re-rating corrections move cost only (see api::usage for the alias rule).
            "SELECT modality, toUInt64(sum(ev)) AS events, toUInt64(sum(ch)) AS charged,
                    toUInt64(sum(tk)) AS tokens, toInt64(sum(co)) AS cost_units
             FROM (
                 SELECT modality, count() AS ev, toUInt64(sum(charged)) AS ch,
                        toUInt64(sum(input_tokens + output_tokens)) AS tk, toInt64(sum(cost_units)) AS co
                 FROM usage_log FINAL GROUP BY modality
                 UNION ALL
                 SELECT modality, toUInt64(0) AS ev, toUInt64(0) AS ch, toUInt64(0) AS tk,
                        toInt64(sum(cost_delta_units)) AS co
                 FROM usage_corrections FINAL GROUP BY modality
             )
             GROUP BY modality ORDER BY cost_units DESC",
        )
        .fetch_all()
        .await?;
    println!("== usage (ClickHouse, FINAL)");
    println!("{:<10} {:>9} {:>9} {:>14} {:>16}", "modality", "events", "charged", "tokens", "cost USD");
    for l in lines {
        println!(
            "{:<10} {:>9} {:>9} {:>14} {:>16}",
            l.modality,
            l.events,
            l.charged,
            l.tokens,
            money::units_to_usd_string(l.cost_units)
        );
    }
    Ok(())
}

/// `tally token ...`. The created token goes to stdout once, with its id; nothing else
/// ever prints it.
async fn token(cmd: crate::cli::TokenCommand) -> anyhow::Result<ExitCode> {
    use crate::api::auth;
    use crate::cli::TokenCommand;
    match cmd {
        TokenCommand::Create(args) => {
            let pool = ledger::connect(&args.database_url, 2).await?;
            let req = auth::NewToken { account_id: args.account, role: args.role, name: args.name };
            let created = auth::create_token(&pool, &req).await?;
            println!("{}", serde_json::to_string_pretty(&created)?);
            eprintln!(
                "store the token now: it is not shown again (revoke with `tally token revoke {}`)",
                created.token_id
            );
        }
        TokenCommand::Revoke { token_id, database_url } => {
            let pool = ledger::connect(&database_url, 2).await?;
            if !auth::revoke_token(&pool, &token_id).await? {
                eprintln!("no live token {token_id}");
                return Ok(ExitCode::from(4));
            }
            println!(
                "revoked {token_id}; a running server refuses it within {} s",
                auth::TOKEN_CACHE_TTL.as_secs()
            );
        }
        TokenCommand::List { account, database_url } => {
            let pool = ledger::connect(&database_url, 2).await?;
            for t in auth::list_tokens(&pool, account.as_deref()).await? {
                println!("{}", serde_json::to_string(&t)?);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
