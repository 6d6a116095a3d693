//! The scenarios about the data itself: duplicates days apart (6), bad input and unknown
//! accounts (7), absurd costs (7b, 7c), and the harness self-test (0).

use super::book::{Book, Out};
use super::check;
use super::ops::{Recovery, Tally, feed, progress, wait_progress};
use super::scenarios::{Cfg, PARTITIONS, Row, Scene, rate};
use super::traffic::{self, sim_opts, simulated};
use crate::common::TestEnv;
use std::collections::HashSet;
use std::time::Duration;

// ------------------------------------------------------------------------ 6: duplicates

/// Emulated: the passage of 40 days. Phase A's events really are 40-43 days old (event
/// time, accepted: the window is 400 days); after they are applied, Tally is killed and
/// `processed_events.processed_at` is moved back to their event time (ledger_entries are
/// append-only and never touched). A new process then receives copies of them on other
/// partitions, among fresh traffic with its own duplicates, and finally a redeploy under a
/// new consumer group re-reads the entire topic: only the event-id store stands between
/// those copies and a second debit.
pub async fn duplicates(cfg: &Cfg) -> Row {
    let name = "6 duplicates, 40 days apart".to_string();
    let mut sc = Scene::new(&name).await;
    let n = cfg.scenario_events;
    let old = tally::simulate::SimulateOptions {
        now: chrono::Utc::now() - chrono::Duration::days(40),
        ..sim_opts(cfg.seed + 6, 0.10, 0.0)
    };
    let mut kept: Vec<Out> = Vec::new();
    let mut phase_a = simulated(old, sc.catalog.clone());
    let mut keep = |book: &mut Book| {
        let out = phase_a(book);
        if kept.len() < 2_000 && kept.len() * 4 < n {
            kept.push(out.clone());
        }
        out
    };
    let mut run = sc.spawn("phase-a");
    feed(&sc.producer, &sc.env.topic, n / 2, None, &mut sc.book, &mut keep).await;
    let group = sc.env.group.clone();
    sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    run.kill9();
    let aged = age_dedup_store(&sc.env).await;
    let resend = resend_elsewhere(&sc.env, kept).await;
    let mut recovery = Recovery::default();
    let restart_from = progress(&sc.env, &group).await.unwrap_or(0);
    let mut run = sc.spawn("phase-c");
    let mut phase_c = simulated(sim_opts(cfg.seed + 60, 0.05, 0.01), sc.catalog.clone());
    let mut it = resend.clone().into_iter();
    let mut mixed = |book: &mut Book| it.next().unwrap_or_else(|| phase_c(book));
    let (env, book, producer) = (&sc.env, &mut sc.book, &sc.producer);
    let (_, restarted) = tokio::join!(
        feed(
            producer,
            &env.topic,
            resend.len() + n / 2,
            rate(n / 2, Duration::from_secs(8)),
            book,
            &mut mixed
        ),
        wait_progress(env, &group, restart_from, Duration::from_secs(120)),
    );
    recovery.push(restarted);
    sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let redeploy = format!("{group}-redeploy");
    let mut run = Tally::spawn(&sc.env, "redeploy", &redeploy, 0, &[]);
    recovery.push(wait_progress(&sc.env, &redeploy, 0, Duration::from_secs(120)).await);
    let msgs = sc.finish(std::slice::from_mut(&mut run), &redeploy, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults = format!(
        "10% dups (half cross-partition), {aged} ids aged 40 days + kill -9, {} resent on other partitions, \
         full replay under a new group",
        resend.len()
    );
    let mut row = sc.row(&name, faults, &msgs, None).await;
    row.recovery = recovery;
    row
}

/// Backdate the dedup store to the events' own time (40+ days ago). Returns rows aged.
async fn age_dedup_store(env: &TestEnv) -> u64 {
    sqlx::query("UPDATE processed_events SET processed_at = occurred_at + interval '1 minute'")
        .execute(&env.pool)
        .await
        .expect("age processed_events")
        .rows_affected()
}

/// The kept messages again, each on a partition other than the one it was applied from.
async fn resend_elsewhere(env: &TestEnv, kept: Vec<Out>) -> Vec<Out> {
    let rows: Vec<(String, i32)> = sqlx::query_as("SELECT event_id, source_partition FROM processed_events")
        .fetch_all(&env.pool)
        .await
        .expect("source partitions");
    let from: std::collections::HashMap<String, i32> = rows.into_iter().collect();
    kept.into_iter()
        .filter_map(|mut m| {
            let raw = tally::codec::decode(&m.payload).ok()?;
            let p = *from.get(raw.event_id.as_deref()?)?;
            m.partition = Some((p + 1 + (m.payload.len() as i32 % (PARTITIONS - 1))) % PARTITIONS);
            Some(m)
        })
        .collect()
}

// ------------------------------------------------------------------------ 7: bad input

pub async fn bad_input(cfg: &Cfg) -> Row {
    let name = "7 malformed + out-of-range".to_string();
    let mut sc = Scene::new(&name).await;
    // The simulator's accounts exist; only acct-never-seen-* must be auto-created.
    sqlx::query("INSERT INTO accounts (account_id) SELECT 'acct-' || lpad(i::text, 4, '0') FROM generate_series(0, 199) AS i")
        .execute(&sc.env.pool)
        .await
        .expect("accounts");
    let mut specials = traffic::bad_messages(&mut sc.book);
    let bad_count = specials.len();
    let (edges, new_accounts) = traffic::edge_events(&mut sc.book, &sc.catalog);
    specials.extend(edges.iter().cloned());
    let n = cfg.scenario_events.max(specials.len() * 10);
    let every = n / specials.len();
    let mut sim = simulated(sim_opts(cfg.seed + 7, 0.03, 0.05), sc.catalog.clone());
    let mut queue = specials.clone().into_iter();
    let mut i = 0usize;
    let mut mixed = |book: &mut Book| {
        i += 1;
        if i.is_multiple_of(every) { queue.next().unwrap_or_else(|| sim(book)) } else { sim(book) }
    };
    let mut run = sc.spawn("phase-1");
    feed(&sc.producer, &sc.env.topic, n, None, &mut sc.book, &mut mixed).await;
    let group = sc.env.group.clone();
    sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    // Phase 2, after phase 1 is applied: id conflicts and exact repeats.
    let charged: Vec<(String, String)> = sc
        .book
        .events
        .iter()
        .filter(|e| e.cost_units > 0 && e.id.starts_with("evt-"))
        .take(20)
        .map(|e| (e.id.clone(), e.account.clone()))
        .collect();
    let mut late: Vec<Out> =
        charged.iter().map(|(id, a)| traffic::conflict_of(&mut sc.book, id, a)).collect();
    late.extend(edges);
    let count = late.len();
    let mut it = late.into_iter();
    feed(&sc.producer, &sc.env.topic, count, None, &mut sc.book, &mut |_| it.next().expect("counted")).await;
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults = format!(
        "{bad_count} hand-made bad messages + 5% simulator malformations, 2 window-edge events, {} events of {} \
         unknown accounts (pre-created: the simulator's 200), {} id conflicts",
        specials.len() - bad_count - 2,
        new_accounts.len(),
        charged.len()
    );
    let auto: HashSet<String> = new_accounts.into_iter().collect();
    sc.row(&name, faults, &msgs, Some(&auto)).await
}

/// Absurd but legal counts: a cost beyond i64 units, and costs near i64::MAX whose sum
/// overflows a balance and a batch total. Tally must dead-letter or bill each exactly,
/// and keep running.
pub async fn absurd(cfg: &Cfg) -> Row {
    let name = "7b absurd costs".to_string();
    let mut sc = Scene::new(&name).await;
    let specials = traffic::absurd_events(&mut sc.book, &sc.catalog);
    let count = specials.len() + 2_000;
    let mut it = specials.into_iter();
    let mut sim = simulated(sim_opts(cfg.seed + 70, 0.0, 0.0), sc.catalog.clone());
    let mut run = sc.spawn("run");
    feed(&sc.producer, &sc.env.topic, count, None, &mut sc.book, &mut |b| {
        it.next().unwrap_or_else(|| sim(b))
    })
    .await;
    let group = sc.env.group.clone();
    let msgs =
        sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit.min(Duration::from_secs(45))).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults =
        "1 event priced beyond i64 units, 3 near i64::MAX (2 on one account), then 2,000 normal".to_string();
    sc.row(&name, faults, &msgs, None).await
}

/// The largest per-event cost an operator may configure (`--event-cost-usd-max`, at most
/// $1e9), and 100 events just below it for one account: their sum passes i64::MAX units
/// after ~93. Each must be billed exactly or dead-lettered, and Tally must keep running
/// (the 20 normal events behind them must be billed).
pub async fn balance_overflow(cfg: &Cfg) -> Row {
    let name = "7c balance beyond i64".to_string();
    let mut sc = Scene::new(&name).await;
    let cap_usd = 1_000_000_000i64;
    let mut specials = traffic::near_cap_events(&mut sc.book, &sc.catalog, cap_usd, 100);
    let mut sim = simulated(sim_opts(cfg.seed + 71, 0.0, 0.0), sc.catalog.clone());
    specials.extend((0..20).map(|_| sim(&mut sc.book)));
    let count = specials.len();
    let mut it = specials.into_iter();
    let cap = cap_usd.to_string();
    let mut run = Tally::spawn(&sc.env, "run", &sc.env.group, 0, &[("TALLY_EVENT_COST_USD_MAX", &cap)]);
    feed(&sc.producer, &sc.env.topic, count, None, &mut sc.book, &mut |_| it.next().expect("counted")).await;
    let group = sc.env.group.clone();
    let msgs =
        sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit.min(Duration::from_secs(45))).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults =
        format!("--event-cost-usd-max {cap_usd}; 100 events of ~0.99x that on one account, then 20 normal");
    sc.row(&name, faults, &msgs, None).await
}

// ------------------------------------------------------------------------ 7d: refused rows

/// Accounts whose rows the database refuses in scenario 7d: at the claim (the dedup store)
/// and at the debit (the ledger), the two places a batch's rows are written.
const REFUSED_AT_CLAIM: &str = "acct-frozen-claim";
const REFUSED_AT_DEBIT: &str = "acct-frozen-debit";

/// A row the database refuses, whatever Tally's own validation thought of it: an
/// operator's constraint, installed as triggers that raise `check_violation` (SQLSTATE
/// 23514) for two accounts, one on `processed_events` (refused while claiming) and one on
/// `ledger_entries` (refused while debiting). Each of their events must be dead-lettered
/// `refused_by_database` on its own, with its original payload; everything around it is
/// applied exactly once, and the pipeline never stalls (before the fix it retried the batch
/// forever).
pub async fn refused_rows(cfg: &Cfg) -> Row {
    let name = "7d rows the database refuses".to_string();
    let mut sc = Scene::new(&name).await;
    let refuse = [
        "CREATE FUNCTION faults_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
           IF NEW.account_id = TG_ARGV[0] THEN
             RAISE EXCEPTION 'account % is frozen (operator constraint)', NEW.account_id
               USING ERRCODE = 'check_violation';
           END IF;
           RETURN NEW;
         END $$",
        "CREATE TRIGGER faults_refuse_claim BEFORE INSERT ON processed_events
         FOR EACH ROW EXECUTE FUNCTION faults_refuse('acct-frozen-claim')",
        "CREATE TRIGGER faults_refuse_debit BEFORE INSERT ON ledger_entries
         FOR EACH ROW EXECUTE FUNCTION faults_refuse('acct-frozen-debit')",
    ];
    for sql in refuse {
        sqlx::query(sql).execute(&sc.env.pool).await.unwrap_or_else(|e| panic!("7d {sql}: {e}"));
    }
    let specials = traffic::refused_events(&mut sc.book, &[REFUSED_AT_CLAIM, REFUSED_AT_DEBIT], 4);
    let refused = specials.len();
    let n = cfg.scenario_events.max(refused * 10);
    let every = n / refused;
    let mut sim = simulated(sim_opts(cfg.seed + 72, 0.03, 0.01), sc.catalog.clone());
    let mut queue = specials.into_iter();
    let mut i = 0usize;
    let mut mixed = |book: &mut Book| {
        i += 1;
        if i.is_multiple_of(every) { queue.next().unwrap_or_else(|| sim(book)) } else { sim(book) }
    };
    let mut run = sc.spawn("run");
    feed(&sc.producer, &sc.env.topic, n, None, &mut sc.book, &mut mixed).await;
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let faults = format!(
        "{refused} events the database refuses (check_violation triggers: half at the claim, half at the \
         debit) among {n} messages with 3% dups and 1% malformed"
    );
    sc.row(&name, faults, &msgs, None).await
}

// ------------------------------------------------------------------------ 0: self-test

/// The checks must not be vacuous: after a clean run, tamper with each store the way a
/// bug would (drop a dedup row, append a second debit, insert a usage row twice, lose a
/// dead-letter record) and require every check to notice. The table shows the clean
/// run; the note lists what the tampered re-check caught.
pub async fn self_test(cfg: &Cfg) -> Row {
    let name = "0 harness self-test".to_string();
    let mut sc = Scene::new(&name).await;
    let mut sim = simulated(sim_opts(cfg.seed + 100, 0.03, 0.02), sc.catalog.clone());
    let mut run = sc.spawn("run");
    feed(&sc.producer, &sc.env.topic, 2_000, None, &mut sc.book, &mut sim).await;
    let group = sc.env.group.clone();
    let msgs = sc.finish(std::slice::from_mut(&mut run), &group, cfg.wait_limit).await;
    sc.stop(std::slice::from_mut(&mut run));
    let clean = check::check(&sc.env, &sc.book, &msgs, None).await;
    tamper(&sc.env).await;
    let t = check::check(&sc.env, &sc.book, &msgs, None).await;
    let caught = |what: &str| t.errors.iter().any(|e| e.contains(what));
    let detections = [
        ("a dedup row dropped -> lost", t.lost >= 1),
        ("a second debit -> double-billed", t.double_billed >= 1),
        ("a second debit -> ledger verify fails", caught("ledger verify failed")),
        ("a usage row inserted twice", t.ch_extra_rows >= 1),
        ("a dead-letter record lost", caught("dead_letters table")),
    ];
    for (what, ok) in &detections {
        if !ok {
            sc.errors.push(format!("self-test: the checks missed {what}: {:?}", t.errors));
        }
    }
    let found: Vec<&str> = detections.iter().filter(|(_, ok)| *ok).map(|(w, _)| *w).collect();
    let mut verdict = clean;
    verdict.errors.append(&mut sc.errors);
    Row {
        name,
        events: sc.book.acked,
        faults: "none; then 4 tamperings of the stores, each must be detected".into(),
        verdict,
        notes: vec![format!("detected after tampering: {}", found.join("; "))],
        wall: sc.started.elapsed(),
        ..Row::default()
    }
}

async fn tamper(env: &TestEnv) {
    let statements = [
        "DELETE FROM processed_events WHERE event_id = (SELECT min(event_id) FROM processed_events)",
        "INSERT INTO ledger_entries (account_id, kind, amount_units, balance_after_units, idempotency_key,
                                     payload_hash, event_id, occurred_at)
         SELECT account_id, kind, amount_units, balance_after_units, 'selftest:' || idempotency_key,
                payload_hash, event_id, occurred_at
         FROM ledger_entries WHERE kind = 'consume' ORDER BY entry_id LIMIT 1",
        "DELETE FROM dead_letters WHERE ctid = (SELECT min(ctid) FROM dead_letters)",
    ];
    for sql in statements {
        sqlx::query(sql).execute(&env.pool).await.unwrap_or_else(|e| panic!("self-test {sql}: {e}"));
    }
    env.clickhouse()
        .query("INSERT INTO usage_log SELECT * FROM usage_log LIMIT 1")
        .execute()
        .await
        .expect("self-test: duplicate a usage row");
}
