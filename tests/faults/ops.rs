//! Moving parts of the harness: `tally run` processes, the stack's servers, the traffic
//! feeder, and progress probes read from Postgres.

use super::book::{Book, Out};
use crate::common::{BROKERS, CH_URL, PG_SERVER_URL, TestEnv, repo};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const CATALOG: &str = "examples/demo.toml";

/// Progress lines go straight to stderr: visible live even when cargo captures output.
pub fn say(msg: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "faults: {}", msg.as_ref());
}

pub fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

// ------------------------------------------------------------------------ tally run

/// One `tally run` child process, its stderr in a log file.
pub struct Tally {
    pub child: Child,
    pub name: String,
    pub group: String,
    pub http_port: u16,
    /// Extra environment (settings) it was started with; a respawn reuses them.
    pub envs: Vec<(String, String)>,
    pub spawned: Instant,
    pub log: PathBuf,
}

pub fn log_dir(env: &TestEnv) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("tally-faults-{}", env.id));
    std::fs::create_dir_all(&dir).expect("log dir");
    dir
}

/// A free loopback port (for the runs whose /metrics the harness reads).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

impl Tally {
    pub fn spawn(env: &TestEnv, name: &str, group: &str, http_port: u16, envs: &[(&str, &str)]) -> Tally {
        let log = log_dir(env).join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_tally"))
            .arg("run")
            .args(["--brokers", *BROKERS, "--database-url", &env.database_url])
            .args(["--clickhouse-url", *CH_URL, "--clickhouse-database", &env.ch_database])
            .args(["--topic", &env.topic, "--dlq-topic", &env.dlq_topic, "--group", group])
            .args(["--config", repo().join(CATALOG).to_str().expect("utf-8 path")])
            .args(["--http-addr", &format!("127.0.0.1:{http_port}")])
            .env("RUST_LOG", "warn")
            .env("RUST_BACKTRACE", "0")
            .envs(envs.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawn tally run");
        let envs = envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        Tally { child, name: name.into(), group: group.into(), http_port, envs, spawned: Instant::now(), log }
    }

    /// A new process with the same group and settings (after this one died).
    pub fn respawn(&self, env: &TestEnv, name: &str) -> Tally {
        let envs: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Tally::spawn(env, name, &self.group, 0, &envs)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("try_wait")
    }

    pub fn kill9(&mut self) {
        crate::common::kill9(&mut self.child);
    }

    /// SIGTERM and wait for a clean exit; the error says what went wrong.
    pub fn terminate(&mut self) -> Result<(), String> {
        if let Some(s) = self.exited() {
            return Err(format!("{} had already exited: {s}", self.name));
        }
        let _ = Command::new("kill").args(["-TERM", &self.pid().to_string()]).status();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(60) {
            if let Some(s) = self.exited() {
                return if s.success() {
                    Ok(())
                } else {
                    Err(format!("{} exited with {s} after SIGTERM", self.name))
                };
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill9();
        Err(format!("{} did not stop within 60 s of SIGTERM", self.name))
    }

    /// For failure messages: the last panic in its log (and the line after it), else the
    /// last lines.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
        let from = match lines.iter().rposition(|l| l.contains("panicked at")) {
            Some(i) => i,
            None => lines.len().saturating_sub(4),
        };
        lines[from..lines.len().min(from + 4)].join("\n    ")
    }

    /// Resident set size, KiB (from /proc).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }

    /// A counter from its /metrics (0 if absent or unreachable).
    pub async fn metric(&self, name: &str) -> f64 {
        let url = format!("http://127.0.0.1:{}/metrics", self.http_port);
        let Ok(resp) = reqwest::get(&url).await else { return 0.0 };
        let body = resp.text().await.unwrap_or_default();
        body.lines()
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Tally {
    fn drop(&mut self) {
        if self.exited().is_none() {
            self.kill9();
        }
    }
}

// ------------------------------------------------------------------------ the stack

/// Run `scripts/stack ARGS` against the same stack the tests use (the inherited
/// TALLY_STACK_DIR / TALLY_STACK_PORT_OFFSET).
pub fn stack(args: &[&str]) {
    let out = Command::new(repo().join("scripts/stack")).args(args).output().expect("scripts/stack runs");
    assert!(
        out.status.success(),
        "scripts/stack {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Refuse to run if the servers the harness would disrupt are not the ones it talks to
/// (e.g. TALLY_STACK_PORT_OFFSET set without `eval "$(scripts/stack env)"`).
pub fn assert_same_stack() {
    let out = Command::new(repo().join("scripts/stack")).arg("env").output().expect("scripts/stack env");
    assert!(out.status.success(), "scripts/stack env failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |var: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("export {var}=")))
            .map(|v| v.trim_matches('\'').to_string())
            .unwrap_or_default()
    };
    let db = get("TALLY_DATABASE_URL");
    let same = get("TALLY_KAFKA_BROKERS") == *BROKERS
        && get("TALLY_CLICKHOUSE_URL") == *CH_URL
        && db.rsplit_once('/').map(|(server, _)| server) == Some(*PG_SERVER_URL);
    assert!(
        same,
        "the harness would disrupt the stack `scripts/stack env` describes ({}, {db}) but connect to \
         {}, {}: run `eval \"$(scripts/stack env)\"` first",
        get("TALLY_KAFKA_BROKERS"),
        *BROKERS,
        *PG_SERVER_URL
    );
}

/// Undo a service disruption even if the scenario panics: the stack is shared.
pub struct Restore(pub &'static [&'static str]);

impl Restore {
    /// Restore now, failing loudly if it does not work (the drop path cannot).
    pub fn now(self) {
        let args = self.0;
        std::mem::forget(self);
        stack(args);
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("scripts/stack")).args(self.0).output();
    }
}

// ------------------------------------------------------------------------ traffic

pub struct FeedStats {
    pub sent: u64,
    pub took: Duration,
}

/// Produce `count` messages from `next` at about `rate` per second (`None`: as fast as
/// the broker takes them), in 100 ms ticks, recording acknowledgements in the book.
/// Messages are generated tick by tick, so a million of them never sit in memory. A
/// failed delivery is sent again (the first attempt may still have landed: the read-back
/// counts the real copies).
pub async fn feed(
    producer: &FutureProducer,
    topic: &str,
    count: usize,
    rate: Option<f64>,
    book: &mut Book,
    next: &mut dyn FnMut(&mut Book) -> Out,
) -> FeedStats {
    let started = Instant::now();
    let per_tick = rate.map_or(5_000, |r| ((r / 10.0).ceil() as usize).max(1));
    let mut sent = 0usize;
    let mut tick = 0u64;
    while sent < count {
        if rate.is_some() {
            tokio::time::sleep_until((started + Duration::from_millis(100 * tick)).into()).await;
        }
        let n = per_tick.min(count - sent);
        let chunk: Vec<Out> = (0..n).map(|_| next(book)).collect();
        send_chunk(producer, topic, &chunk, book).await;
        sent += n;
        tick += 1;
    }
    FeedStats { sent: count as u64, took: started.elapsed() }
}

async fn send_chunk(producer: &FutureProducer, topic: &str, chunk: &[Out], book: &mut Book) {
    let mut pending: Vec<&Out> = chunk.iter().collect();
    while !pending.is_empty() {
        let sends = pending.iter().map(|m| {
            let mut r = FutureRecord::to(topic).key(&m.key).payload(&m.payload);
            if let Some(p) = m.partition {
                r = r.partition(p);
            }
            producer.send(r, Duration::from_secs(120))
        });
        let results = futures::future::join_all(sends).await;
        let mut failed = Vec::new();
        for (m, r) in pending.iter().zip(results) {
            match r {
                Ok(_) => book.acked += 1,
                Err(_) => failed.push(*m),
            }
        }
        if !failed.is_empty() {
            book.resent += failed.len() as u64;
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        pending = failed;
    }
}

/// Produce one message; true once acknowledged (retried until then, for 2 minutes).
pub async fn send_one(producer: &FutureProducer, topic: &str, m: &Out) -> bool {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        let mut r = FutureRecord::to(topic).key(&m.key).payload(&m.payload);
        if let Some(p) = m.partition {
            r = r.partition(p);
        }
        if producer.send(r, Duration::from_secs(60)).await.is_ok() {
            return true;
        }
    }
    false
}

/// Time until `event_id` is applied (in processed_events), polling every 50 ms.
pub async fn wait_billed(env: &TestEnv, event_id: &str, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        let n: Option<(i64,)> = sqlx::query_as("SELECT count(*) FROM processed_events WHERE event_id = $1")
            .bind(event_id)
            .fetch_one(&env.pool)
            .await
            .ok();
        if n.is_some_and(|(n,)| n > 0) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

pub fn producer() -> FutureProducer {
    tally::kafka::producer(&BROKERS).expect("producer")
}

// ------------------------------------------------------------------------ progress

/// The group's stored next offsets (Postgres truth), or `None` while Postgres is away.
pub async fn offsets(env: &TestEnv, group: &str) -> Option<BTreeMap<i32, i64>> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, next_offset FROM consumer_offsets WHERE group_id = $1 AND topic = $2",
    )
    .bind(group)
    .bind(&env.topic)
    .fetch_all(&env.pool)
    .await
    .ok()?;
    Some(rows.into_iter().collect())
}

pub async fn progress(env: &TestEnv, group: &str) -> Option<i64> {
    offsets(env, group).await.map(|o| o.values().sum())
}

/// Time until the group's stored progress passes `from` (a commit happened), polling
/// every 50 ms; `None` if it did not within `limit`.
pub async fn wait_progress(env: &TestEnv, group: &str, from: i64, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if progress(env, group).await.is_some_and(|p| p > from) {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// True once every partition's stored offset reached `ends`.
pub fn consumed(offsets: &BTreeMap<i32, i64>, ends: &BTreeMap<i32, i64>) -> bool {
    ends.iter().all(|(p, end)| offsets.get(p).copied().unwrap_or(0) >= *end)
}

/// Recovery times, printed as max / median.
#[derive(Debug, Default, Clone)]
pub struct Recovery(pub Vec<Duration>);

impl Recovery {
    pub fn push(&mut self, d: Option<Duration>) {
        if let Some(d) = d {
            self.0.push(d);
        }
    }

    pub fn show(&self) -> String {
        let mut v = self.0.clone();
        v.sort();
        match v.len() {
            0 => "-".into(),
            1 => secs(v[0]),
            n => format!("{} max, {} median", secs(v[n - 1]), secs(v[n / 2])),
        }
    }
}
