//! The scenarios that break processes and servers (1-5), and what every scenario shares.
//! Each owns a fresh `TestEnv` (database, ClickHouse database, topics, group), drives
//! simulator traffic while it injects its fault, waits until the group's stored offsets
//! cover the whole topic, stops Tally gracefully and runs every check. The scenarios
//! about the data itself (duplicates, bad input, absurd costs, the self-test) are in
//! `data.rs`.

use super::book::Book;
use super::check::{self, TopicMsg, Verdict};
use super::ops::{
    self, Recovery, Restore, Tally, feed, free_port, offsets, progress, say, secs, stack, wait_progress,
};
use super::traffic::{self, catalog, sim_opts, simulated};
use crate::common::TestEnv;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tally::pricing::Catalog;

const ABORT_HOOK: &str = "TALLY_FAULT_ABORT_AFTER_CLICKHOUSE_INSERT";
pub(crate) const PARTITIONS: i32 = 6;

/// Sizes and durations (see `faults.rs` for the variables and the CI defaults).
#[derive(Debug, Clone)]
pub struct Cfg {
    pub events: usize,
    pub kills: usize,
    pub scenario_events: usize,
    pub ch_outage: Duration,
    pub ch_burst: usize,
    pub broker_pause: Duration,
    pub seed: u64,
    pub wait_limit: Duration,
}

/// One line of the report.
#[derive(Debug, Default)]
pub struct Row {
    pub name: String,
    pub events: u64,
    pub faults: String,
    pub verdict: Verdict,
    pub recovery: Recovery,
    pub notes: Vec<String>,
    pub wall: Duration,
}

impl Row {
    pub fn failed(&self) -> bool {
        self.verdict.lost > 0 || self.verdict.double_billed > 0 || !self.verdict.errors.is_empty()
    }
}

/// What every scenario shares.
pub(crate) struct Scene {
    pub env: TestEnv,
    pub book: Book,
    pub catalog: Arc<Catalog>,
    pub producer: rdkafka::producer::FutureProducer,
    pub errors: Vec<String>,
    crashes: u32,
    pub started: Instant,
}

impl Scene {
    pub async fn new(name: &str) -> Scene {
        let env = TestEnv::new(PARTITIONS).await;
        say(format!("{name}: env {} (logs in {})", env.id, ops::log_dir(&env).display()));
        Scene {
            env,
            book: Book::default(),
            catalog: catalog(),
            producer: ops::producer(),
            errors: Vec::new(),
            crashes: 0,
            started: Instant::now(),
        }
    }

    pub fn spawn(&self, name: &str) -> Tally {
        Tally::spawn(&self.env, name, &self.env.group, 0, &[])
    }

    async fn readback(&self) -> Vec<TopicMsg> {
        let (topic, acked) = (self.env.topic.clone(), self.book.acked);
        tokio::task::spawn_blocking(move || check::read_topic(&topic, PARTITIONS, acked))
            .await
            .expect("read back")
    }

    /// Wait until `group` has applied the whole topic, restarting any run that dies on its
    /// own (a crash: reported, and given up after 3). Returns the read-back topic.
    pub async fn finish(&mut self, runs: &mut [Tally], group: &str, limit: Duration) -> Vec<TopicMsg> {
        let msgs = self.readback().await;
        let ends = check::ends(&msgs);
        let started = Instant::now();
        loop {
            if offsets(&self.env, group).await.is_some_and(|o| ops::consumed(&o, &ends)) {
                return msgs;
            }
            for run in runs.iter_mut() {
                if let Some(status) = run.exited() {
                    self.crashes += 1;
                    self.errors.push(format!("{} crashed ({status}):\n    {}", run.name, run.log_tail()));
                    let name = format!("{}-after-crash-{}", run.name, self.crashes);
                    *run = run.respawn(&self.env, &name);
                }
            }
            if self.crashes >= 3 {
                self.errors.push("crash loop: gave up after 3 crashes".into());
                return msgs;
            }
            if started.elapsed() > limit {
                let o = offsets(&self.env, group).await;
                self.errors
                    .push(format!("not caught up after {}: offsets {o:?}, topic ends {ends:?}", secs(limit)));
                for run in runs.iter() {
                    self.errors.push(format!(
                        "{} is alive but stalled; its log ends:\n    {}",
                        run.name,
                        run.log_tail()
                    ));
                }
                return msgs;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub fn stop(&mut self, runs: &mut [Tally]) {
        for run in runs {
            if let Err(e) = run.terminate() {
                self.errors.push(e);
            }
        }
    }

    pub async fn row(
        mut self,
        name: &str,
        faults: String,
        msgs: &[TopicMsg],
        auto: Option<&HashSet<String>>,
    ) -> Row {
        let mut verdict = check::check(&self.env, &self.book, msgs, auto).await;
        verdict.errors.append(&mut self.errors);
        let mut notes = Vec::new();
        if self.book.resent > 0 {
            notes.push(format!("{} producer sends retried", self.book.resent));
        }
        Row {
            name: name.into(),
            events: self.book.acked,
            faults,
            verdict,
            notes,
            wall: self.started.elapsed(),
            ..Row::default()
        }
    }
}

pub(crate) fn rate(count: usize, window: Duration) -> Option<f64> {
    Some(count as f64 / window.as_secs_f64())
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(t.into()).await;
}

async fn blocking_stack(args: &'static [&'static str]) {
    tokio::task::spawn_blocking(move || stack(args)).await.expect("scripts/stack");
}

// ------------------------------------------------------------------------ 1: kill -9

#[derive(Debug, Clone, Copy)]
enum Death {
    /// kill -9 at a uniformly random moment 0.5-8 s after the process started (may land
    /// during start-up, the group join, a batch, or idle).
    Random,
    /// kill -9 0-1.5 s after this life's first commit: mid-stream, batches in flight.
    AfterCommit,
    /// The life runs with the abort hook: it dies right after a ClickHouse insert, before
    /// the Postgres COMMIT (the worst place).
    Abort,
}

fn death_schedule(kills: usize) -> Vec<Death> {
    let mut s = Vec::new();
    for i in 0..kills {
        s.push(if i % 2 == 0 { Death::Random } else { Death::AfterCommit });
        if i % 4 == 3 {
            s.push(Death::Abort);
        }
    }
    s
}

#[derive(Default)]
struct KillLog {
    kills: usize,
    after_commit: usize,
    aborts: usize,
    recovery: Recovery,
    errors: Vec<String>,
}

pub async fn kills(cfg: &Cfg) -> Row {
    let name = format!("1 kill -9 x{}", cfg.kills);
    let mut sc = Scene::new(&name).await;
    let schedule = death_schedule(cfg.kills);
    let window = Duration::from_secs(5 * schedule.len() as u64).max(Duration::from_secs(10));
    let mut source = simulated(sim_opts(cfg.seed, 0.03, 0.01), sc.catalog.clone());
    let first = sc.spawn("life-0");
    let mut log = KillLog::default();
    let rng = StdRng::seed_from_u64(cfg.seed);
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let (fed, mut run) = tokio::join!(
        feed(producer, &env.topic, cfg.events, rate(cfg.events, window), book, &mut source),
        kill_loop(env, &schedule, first, rng, &mut log),
    );
    say(format!("{name}: produced {} in {}", fed.sent, secs(fed.took)));
    let last = progress(&sc.env, &sc.env.group).await.unwrap_or(0);
    log.recovery.push(wait_progress(&sc.env, &sc.env.group, last, Duration::from_secs(60)).await);
    sc.errors.append(&mut log.errors);
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults = format!(
        "{} kill -9 ({} right after a commit) + {} abort(s) between ClickHouse insert and COMMIT",
        log.kills, log.after_commit, log.aborts
    );
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = log.recovery;
    row
}

async fn kill_loop(
    env: &TestEnv,
    schedule: &[Death],
    first: Tally,
    mut rng: StdRng,
    log: &mut KillLog,
) -> Tally {
    let group = env.group.clone();
    let mut run = first;
    for (i, death) in schedule.iter().enumerate() {
        let life_start = progress(env, &group).await.unwrap_or(0);
        match death {
            Death::Random => {
                sleep_until(run.spawned + Duration::from_millis(rng.gen_range(500..8_000))).await;
            }
            Death::AfterCommit => {
                let took = wait_progress(env, &group, life_start, Duration::from_secs(60)).await;
                log.recovery.push(took);
                if took.is_some() {
                    log.after_commit += 1;
                }
                tokio::time::sleep(Duration::from_millis(rng.gen_range(0..1_500))).await;
            }
            Death::Abort => {
                let started = Instant::now();
                while run.exited().is_none() && started.elapsed() < Duration::from_secs(90) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        match (death, run.exited()) {
            (Death::Abort, Some(_)) => log.aborts += 1,
            (Death::Abort, None) => {
                log.errors.push(format!("{}: the abort hook never fired in 90 s", run.name));
                run.kill9();
            }
            (_, Some(status)) => {
                log.errors.push(format!("{} died on its own ({status}):\n    {}", run.name, run.log_tail()))
            }
            (_, None) => {
                run.kill9();
                log.kills += 1;
            }
        }
        let next = schedule.get(i + 1);
        let envs: &[(&str, &str)] =
            if matches!(next, Some(Death::Abort)) { &[(ABORT_HOOK, "1")] } else { &[] };
        say(format!("  {:?} {}/{} after {}", death, i + 1, schedule.len(), secs(run.spawned.elapsed())));
        run = Tally::spawn(env, &format!("life-{}", i + 1), &group, 0, envs);
    }
    run
}

// ------------------------------------------------------------------------ 2: failover

pub async fn failover(cfg: &Cfg) -> Row {
    let name = "2 two members, one killed".to_string();
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let window = Duration::from_secs(24);
    let mut source = simulated(sim_opts(cfg.seed + 2, 0.03, 0.01), sc.catalog.clone());
    let group = sc.env.group.clone();
    let mut a = Tally::spawn(&sc.env, "member-a", &group, free_port(), &[]);
    let mut b = Tally::spawn(&sc.env, "member-b", &group, free_port(), &[]);
    let mut recovery = Recovery::default();
    let mut notes = Vec::new();
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let (_, errs) = tokio::join!(feed(producer, &env.topic, n, rate(n, window), book, &mut source), async {
        let started = Instant::now();
        let mut errs = Vec::new();
        let applied = "tally_events_applied_total";
        let both = loop {
            let (x, y) = (a.metric(applied).await, b.metric(applied).await);
            if (x > 0.0 && y > 0.0) || started.elapsed() > Duration::from_secs(60) {
                break (x, y);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        notes.push(format!("before the kill: member a applied {}, member b {}", both.0, both.1));
        if both.0 == 0.0 || both.1 == 0.0 {
            errs.push(format!("the two members never both applied events: {both:?}"));
        }
        sleep_until(started + window * 2 / 5).await;
        errs.extend(kill_and_recover(env, &group, &mut a, &mut recovery, "member b").await);
        errs
    });
    sc.errors.extend(errs);
    let msgs = sc.finish(std::slice::from_mut(&mut b), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut b));
    let mut row = sc.row(&name, "kill -9 of one of two members mid-stream".into(), &msgs, None).await;
    row.recovery = recovery;
    row.notes.extend(notes);
    row
}

/// Scale-out under load (issue 17): two members drain, a third joins (a rebalance while
/// batches are in flight and claimed ahead), then one of the first two is killed (-9).
/// 0 lost, 0 double-billed, and every partition moves again within the session timeout.
pub async fn join_then_kill(cfg: &Cfg) -> Row {
    let name = "2b a third member joins, one killed".to_string();
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events * 2;
    let window = Duration::from_secs(30);
    let mut source = simulated(sim_opts(cfg.seed + 22, 0.03, 0.01), sc.catalog.clone());
    let group = sc.env.group.clone();
    let mut a = Tally::spawn(&sc.env, "member-a", &group, free_port(), &[]);
    let b = Tally::spawn(&sc.env, "member-b", &group, free_port(), &[]);
    let mut c = None;
    let mut recovery = Recovery::default();
    let mut notes = Vec::new();
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let (_, errs) = tokio::join!(feed(producer, &env.topic, n, rate(n, window), book, &mut source), async {
        let started = Instant::now();
        let mut errs = Vec::new();
        let applied = "tally_events_applied_total";
        sleep_until(started + window / 5).await;
        let joiner = Tally::spawn(env, "member-c", &group, free_port(), &[]);
        let seated = loop {
            let x = joiner.metric(applied).await;
            if x > 0.0 || started.elapsed() > window {
                break x;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        };
        let before_kill = (a.metric(applied).await, b.metric(applied).await, seated);
        notes.push(format!("before the kill: members a, b, c applied {before_kill:?}"));
        if seated == 0.0 {
            errs.push("the joining member never applied an event under load".into());
        }
        c = Some(joiner);
        errs.extend(kill_and_recover(env, &group, &mut a, &mut recovery, "the others").await);
        errs
    });
    sc.errors.extend(errs);
    let mut rest: Vec<Tally> = std::iter::once(b).chain(c).collect();
    let msgs = sc.finish(&mut rest, &group, cfg.wait_limit).await;
    sc.stop(&mut rest);
    let faults = "a third member joins mid-stream, then kill -9 of one of the first two".to_string();
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = recovery;
    row.notes.extend(notes);
    row
}

/// kill -9 `member` and time until every partition moves again; an error if none did.
async fn kill_and_recover(
    env: &TestEnv,
    group: &str,
    member: &mut Tally,
    recovery: &mut Recovery,
    survivors: &str,
) -> Option<String> {
    let before = offsets(env, group).await.unwrap_or_default();
    member.kill9();
    recovery.push(all_partitions_advance(env, group, &before, Duration::from_secs(90)).await);
    recovery.0.is_empty().then(|| format!("member a's partitions never moved to {survivors}"))
}

/// Time until every partition's stored offset passed its value in `before`.
async fn all_partitions_advance(
    env: &TestEnv,
    group: &str,
    before: &BTreeMap<i32, i64>,
    limit: Duration,
) -> Option<Duration> {
    let started = Instant::now();
    while started.elapsed() < limit {
        if let Some(now) = offsets(env, group).await {
            let moved = (0..PARTITIONS)
                .all(|p| now.get(&p).copied().unwrap_or(0) > before.get(&p).copied().unwrap_or(0));
            if moved {
                return Some(started.elapsed());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

// ------------------------------------------------------------------------ 3: Postgres restart

pub async fn postgres_restart(cfg: &Cfg) -> Row {
    let name = "3 Postgres restarted".to_string();
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let window = Duration::from_secs(24);
    let mut source = simulated(sim_opts(cfg.seed + 3, 0.03, 0.01), sc.catalog.clone());
    let mut run = sc.spawn("run");
    let mut recovery = Recovery::default();
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    tokio::join!(feed(producer, &env.topic, n, rate(n, window), book, &mut source), async {
        let started = Instant::now();
        let restarts: [(u64, &'static [&'static str]); 2] =
            [(6, &["restart", "postgres"]), (14, &["restart", "postgres", "--immediate"])];
        for (at, args) in restarts {
            sleep_until(started + Duration::from_secs(at)).await;
            let before = progress(env, &env.group).await.unwrap_or(0);
            say(format!("  scripts/stack {}", args.join(" ")));
            blocking_stack(args).await;
            recovery.push(wait_progress(env, &env.group, before, Duration::from_secs(120)).await);
        }
    });
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults = "Postgres restart (fast) + restart (immediate: crash, WAL recovery)".to_string();
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = recovery;
    row
}

// ------------------------------------------------------------------------ 4: ClickHouse outage

/// The most `tally run` may grow during the outage, MiB. The pipeline holds at most
/// (batches_in_flight_max 2 + 2) x batch_events_max 5000 = 20,000 decoded events (a few
/// KiB each with their priced rows: ~50 MiB) plus librdkafka's prefetch queue
/// (queued.max.messages.kbytes = 64 MiB): ~115 MiB. 256 MiB leaves room for allocator
/// slack yet fails an unbounded buffer: the burst produced during the full-size outage
/// (400,000 events) would take ~1 GiB decoded.
const RSS_GROWTH_MIB_MAX: u64 = 256;

struct Outage {
    rss_before: u64,
    rss_during: u64,
    applied_during: i64,
    down_for: Duration,
}

/// ClickHouse stopped (port closed) for `ch_outage` while a burst of `ch_burst` events,
/// more than the pipeline may hold, is produced: nothing may commit without its usage
/// rows, memory must stay bounded, and everything lands once ClickHouse is back.
pub async fn clickhouse_outage(cfg: &Cfg) -> Row {
    let name = format!("4 ClickHouse down {}", secs(cfg.ch_outage));
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let mut source = simulated(sim_opts(cfg.seed + 4, 0.03, 0.01), sc.catalog.clone());
    let mut run = sc.spawn("run");
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let lead = Duration::from_secs(8);
    let (_, rss_before) = tokio::join!(
        feed(producer, &env.topic, n / 2, rate(n / 2, lead), book, &mut source),
        sample_rss(&run, Instant::now() + lead),
    );
    say(format!("  scripts/stack stop clickhouse, then a burst of {} events", cfg.ch_burst));
    blocking_stack(&["stop", "clickhouse"]).await;
    let restore = Restore(&["start", "clickhouse"]);
    let down = Instant::now();
    let (_, o) = tokio::join!(feed(producer, &env.topic, cfg.ch_burst, None, book, &mut source), async {
        let rss_early = sample_rss(&run, down + Duration::from_secs(3)).await;
        let applied_at_3s = applied(env).await;
        let rss_late = sample_rss(&run, down + cfg.ch_outage).await;
        let applied_during = applied(env).await - applied_at_3s;
        Outage { rss_before, rss_during: rss_early.max(rss_late), applied_during, down_for: Duration::ZERO }
    });
    let before = progress(env, &env.group).await.unwrap_or(0);
    let o = Outage { down_for: down.elapsed(), ..o };
    say("  scripts/stack start clickhouse");
    tokio::task::spawn_blocking(move || restore.now()).await.expect("start clickhouse");
    let mut recovery = Recovery::default();
    recovery.push(wait_progress(env, &env.group, before, Duration::from_secs(120)).await);
    feed(producer, &env.topic, n - n / 2, rate(n - n / 2, Duration::from_secs(8)), book, &mut source).await;
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    if o.applied_during != 0 {
        sc.errors.push(format!("{} events committed while ClickHouse was down", o.applied_during));
    }
    if o.rss_during > o.rss_before + RSS_GROWTH_MIB_MAX * 1024 {
        sc.errors.push(format!("RSS grew from {} to {} KiB during the outage", o.rss_before, o.rss_during));
    }
    let faults = format!(
        "ClickHouse stopped {} (port closed), {} events produced meanwhile",
        secs(o.down_for),
        cfg.ch_burst
    );
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = recovery;
    row.notes.push(format!(
        "max RSS of tally run: {} MiB before the outage, {} MiB during it (bound: +{RSS_GROWTH_MIB_MAX} MiB); \
         0 events committed during it",
        o.rss_before / 1024,
        o.rss_during / 1024
    ));
    row
}

/// Max RSS (KiB) of `run`, sampled every 100 ms until `until`.
async fn sample_rss(run: &Tally, until: Instant) -> u64 {
    let mut max = 0;
    while Instant::now() < until {
        max = max.max(run.rss_kib().unwrap_or(0));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    max
}

async fn applied(env: &TestEnv) -> i64 {
    env.count("SELECT count(*) FROM processed_events").await
}

// ------------------------------------------------------------------------ 5: broker pause

/// The broker frozen (SIGSTOP) with every client connected, traffic still being sent.
/// Recovery: from SIGCONT until an event produced after it is billed.
pub async fn broker_pause(cfg: &Cfg) -> Row {
    let name = format!("5 broker paused {}", secs(cfg.broker_pause));
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let window = cfg.broker_pause + Duration::from_secs(16);
    let mut source = simulated(sim_opts(cfg.seed + 5, 0.03, 0.01), sc.catalog.clone());
    let marker = sc.book.valid(
        &traffic::chat_event("faults-marker-resume".into(), "acct-0005", chrono::Utc::now()),
        &sc.catalog,
        None,
    );
    let mut run = sc.spawn("run");
    let mut recovery = Recovery::default();
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let (_, marker_acked) =
        tokio::join!(feed(producer, &env.topic, n, rate(n, window), book, &mut source), async {
            sleep_until(run.spawned + Duration::from_secs(6)).await;
            say("  scripts/stack pause kafka");
            blocking_stack(&["pause", "kafka"]).await;
            let restore = Restore(&["resume", "kafka"]);
            tokio::time::sleep(cfg.broker_pause).await;
            say("  scripts/stack resume kafka");
            tokio::task::spawn_blocking(move || restore.now()).await.expect("resume kafka");
            let resumed = Instant::now();
            let acked = ops::send_one(producer, &env.topic, &marker).await;
            recovery.push(
                ops::wait_billed(env, "faults-marker-resume", Duration::from_secs(120))
                    .await
                    .map(|_| resumed.elapsed()),
            );
            acked
        });
    sc.book.acked += u64::from(marker_acked);
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults =
        format!("broker SIGSTOP {} then SIGCONT, producers and Tally connected", secs(cfg.broker_pause));
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = recovery;
    row
}
