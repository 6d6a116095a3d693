//! Test harness: the real stack (started by `scripts/stack up`, idempotent), and per-test
//! isolation: a fresh Postgres database, ClickHouse database, topics and consumer group.
#![allow(dead_code)]

pub mod providers;
pub mod spec;

use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sqlx::PgPool;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use tally::simulate::Message as SimMessage;

/// Connection settings: the stack's defaults, overridable with the variables
/// `scripts/stack env` prints (so a second, private stack on other ports works too).
fn setting(var: &str, default: &str) -> &'static str {
    Box::leak(std::env::var(var).unwrap_or_else(|_| default.to_string()).into_boxed_str())
}

pub static BROKERS: std::sync::LazyLock<&'static str> =
    std::sync::LazyLock::new(|| setting("TALLY_KAFKA_BROKERS", "127.0.0.1:19092"));
pub static CH_URL: std::sync::LazyLock<&'static str> =
    std::sync::LazyLock::new(|| setting("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:18123"));
/// Postgres server URL without a database name (e.g. `postgres://postgres@127.0.0.1:55432`).
pub static PG_SERVER_URL: std::sync::LazyLock<&'static str> = std::sync::LazyLock::new(|| {
    let url = setting("TALLY_DATABASE_URL", "postgres://postgres@127.0.0.1:55432/tally");
    let (server, _db) = url.rsplit_once('/').expect("a database URL ends with /NAME");
    server
});

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Bring the stack up once per test binary (`scripts/stack up` is idempotent and locked).
pub fn stack() {
    static UP: OnceLock<()> = OnceLock::new();
    UP.get_or_init(|| {
        let status = Command::new(repo().join("scripts/stack"))
            .arg("up")
            .stdout(Stdio::null())
            .status()
            .expect("scripts/stack runs");
        assert!(status.success(), "scripts/stack up failed");
    });
}

/// A `tally run` child that is killed when dropped, so a test that fails (panics) never
/// leaves it running against the next test's servers. Used as a `Child` (it derefs to one).
pub struct RunChild(pub Child);

impl std::ops::Deref for RunChild {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for RunChild {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for RunChild {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A loopback port free right now (for a child's HTTP listener).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Everything one test owns.
pub struct TestEnv {
    pub id: String,
    pub database_url: String,
    pub ch_database: String,
    pub topic: String,
    pub dlq_topic: String,
    pub group: String,
    pub pool: PgPool,
}

impl TestEnv {
    pub async fn new(partitions: i32) -> TestEnv {
        stack();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_string();
        let db = format!("t_{id}");
        let admin = PgPool::connect(&format!("{}/postgres", *PG_SERVER_URL))
            .await
            .expect("postgres admin connection");
        sqlx::query(&format!("CREATE DATABASE {db}")).execute(&admin).await.expect("create database");
        admin.close().await;
        let database_url = format!("{}/{db}", *PG_SERVER_URL);
        let pool = tally::ledger::connect(&database_url, 4).await.expect("test database");
        tally::ledger::migrate(&pool).await.expect("migrations");
        tally::analytics::migrate(&CH_URL, &db).await.expect("clickhouse migrations");
        let topic = format!("test.{id}.events");
        let dlq_topic = format!("test.{id}.dlq");
        tally::kafka::ensure_topics(&BROKERS, &[(&topic, partitions), (&dlq_topic, 3)])
            .await
            .expect("topics");
        TestEnv { group: format!("g-{id}"), ch_database: db, database_url, topic, dlq_topic, id, pool }
    }

    /// `tally run` as a real child process.
    pub fn spawn_run(&self, catalog: &str, http_port: u16, extra: &[&str]) -> RunChild {
        self.spawn_run_env(catalog, http_port, extra, &[])
    }

    pub fn spawn_run_env(
        &self,
        catalog: &str,
        http_port: u16,
        extra: &[&str],
        envs: &[(&str, &str)],
    ) -> RunChild {
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("run")
            .args(["--brokers", *BROKERS, "--database-url", &self.database_url])
            .args(["--clickhouse-url", *CH_URL, "--clickhouse-database", &self.ch_database])
            .args(["--topic", &self.topic, "--dlq-topic", &self.dlq_topic, "--group", &self.group])
            .args(["--config", repo().join(catalog).to_str().expect("utf-8 path")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .args(extra)
            .env("RUST_LOG", "warn")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn tally run");
        RunChild(child)
    }

    pub fn clickhouse(&self) -> clickhouse::Client {
        tally::analytics::client(&CH_URL, &self.ch_database)
    }

    pub async fn count(&self, sql: &str) -> i64 {
        let (n,): (i64,) = sqlx::query_as(sql).fetch_one(&self.pool).await.expect(sql);
        n
    }

    /// Poll until `done` returns true, or panic after `limit` (a liveness bound, not a
    /// performance assertion).
    pub async fn wait_for<F, Fut>(&self, what: &str, limit: Duration, mut done: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let started = Instant::now();
        while !done().await {
            assert!(started.elapsed() < limit, "timed out after {limit:?} waiting for {what}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Read every dead letter currently on the DLQ topic, expecting at least `expected`
    /// distinct source positions. Returns (source partition, offset) -> (code, reason).
    pub fn read_dead_letters(&self, expected: usize) -> HashMap<(i32, i64), (String, String)> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", *BROKERS)
            .set("group.id", format!("dlq-reader-{}", self.id))
            .set("enable.auto.commit", "false")
            .create()
            .expect("dlq consumer");
        let mut tpl = TopicPartitionList::new();
        for p in 0..3 {
            tpl.add_partition_offset(&self.dlq_topic, p, Offset::Beginning).expect("tpl");
        }
        consumer.assign(&tpl).expect("assign");
        let mut seen = HashMap::new();
        let started = Instant::now();
        let mut quiet_since = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    let h = headers(&m);
                    let pos = (
                        h["tally.source.partition"].parse().unwrap(),
                        h["tally.source.offset"].parse().unwrap(),
                    );
                    seen.insert(pos, (h["tally.code"].clone(), h["tally.reason"].clone()));
                }
                Some(Err(e)) => panic!("dlq consume: {e}"),
                None if seen.len() >= expected && quiet_since.elapsed() > Duration::from_secs(2) => break,
                None => {}
            }
        }
        seen
    }
}

fn headers<M: Message>(m: &M) -> HashMap<String, String> {
    use rdkafka::message::Headers;
    let mut out = HashMap::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            out.insert(h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned());
        }
    }
    out
}

/// Produce simulator messages and wait for every acknowledgement.
pub async fn produce(topic: &str, messages: &[SimMessage]) {
    let producer = tally::kafka::producer(&BROKERS).expect("producer");
    for chunk in messages.chunks(20_000) {
        let sends = chunk.iter().map(|m| {
            let mut r = FutureRecord::to(topic).key(&m.key).payload(&m.payload);
            if let Some(p) = m.partition {
                r = r.partition(p);
            }
            producer.send(r, Duration::from_secs(60))
        });
        for result in futures::future::join_all(sends).await {
            result.map_err(|(e, _)| e).expect("produce");
        }
    }
}

/// Stop a child gracefully (SIGTERM) and require a clean exit.
pub fn terminate(child: &mut Child) {
    signal(child, "TERM");
    let status = wait_exit(child, Duration::from_secs(60));
    assert!(status.success(), "tally run exited with {status:?} after SIGTERM");
}

pub fn kill9(child: &mut Child) {
    signal(child, "KILL");
    let _ = wait_exit(child, Duration::from_secs(10));
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill").args([&format!("-{sig}"), &child.id().to_string()]).status().expect("kill");
    assert!(ok.success());
}

pub fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let started = Instant::now();
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        assert!(started.elapsed() < limit, "child did not exit within {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Apply usage events through the pipeline's own batch code (real SQL, no broker), priced
/// with the demo catalog, as partition 0 from `first_offset` on, group "g", topic "t".
pub async fn apply_usage(
    env: &TestEnv,
    events: Vec<tally::event::UsageEvent>,
    first_offset: i64,
) -> tally::ledger::usage::Applied {
    use tally::batch::{Batch, SourcePos};
    use tally::pipeline::reader::Transformer;
    let catalog = tally::pricing::Catalog::load(&repo().join("examples/demo.toml")).expect("catalog");
    let t = Transformer {
        catalog: std::sync::Arc::new(catalog),
        schemas: std::sync::Arc::new(tally::codec::Schemas::new(None)),
        future_skew: chrono::Duration::seconds(300),
        age_max: chrono::Duration::days(400),
        cost_units_max: tally::pipeline::reader::EVENT_COST_UNITS_MAX_DEFAULT,
    };
    let items = events
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let pos = SourcePos { partition: 0, offset: first_offset + i as i64 };
            t.transform(pos, None, &tally::codec::encode(&e.to_raw()), chrono::Utc::now())
        })
        .collect();
    let mut tx = env.pool.begin().await.expect("begin");
    let applied = tally::ledger::usage::apply(&mut tx, "g", "t", &Batch { items }).await.expect("apply");
    tx.commit().await.expect("commit");
    applied
}

/// Credit `units` to `account` (an operator addition, keyed `fund-<account>`: once).
pub async fn credit(env: &TestEnv, account: &str, units: i64) {
    let req = tally::ledger::ops::ManualRequest {
        account_id: account.into(),
        idempotency_key: format!("fund-{account}"),
        kind: tally::ledger::ops::ManualKind::Addition(units),
        created_by: "test".into(),
        reason: "fund".into(),
    };
    tally::ledger::ops::manual(&env.pool, &req).await.expect("credit");
}

/// A chat call on the demo catalog's default model: 1,000,000 input tokens = $0.22.
pub fn chat_call(id: &str, account: &str, reservation: Option<&str>) -> tally::event::UsageEvent {
    tally::event::UsageEvent::parse(tally::event::RawUsageEvent {
        event_id: Some(id.into()),
        occurred_at: Some(chrono::Utc::now().to_rfc3339()),
        account_id: Some(account.into()),
        provider: Some("xai".into()),
        model: Some("grok-4-1-fast".into()),
        modality: Some("chat".into()),
        status: Some("success".into()),
        input_tokens: Some(1_000_000),
        reservation_id: reservation.map(str::to_string),
        ..Default::default()
    })
    .unwrap()
}

pub const CHAT_UNITS: i64 = 22_000_000; // $0.22
