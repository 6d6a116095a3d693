//! After a scenario: read back what the broker holds, then compare Postgres, ClickHouse
//! and the dead-letter topic with what the harness produced.
//!
//! Expected outcomes come from the source topic as the broker stores it, classified by the
//! harness's own [`Book`]: a producer retry that landed twice is just another copy of the
//! same payload, and every acknowledged payload must be in the topic (else the broker, not
//! Tally, lost it, which is reported as such).

use super::book::{Book, Class, payload_hash};
use crate::common::{BROKERS, TestEnv};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

/// One message of the source topic.
#[derive(Debug, Clone, Copy)]
pub struct TopicMsg {
    pub partition: i32,
    pub offset: i64,
    pub hash: u64,
}

fn reader(group: String) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", *BROKERS)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "100")
        .create()
        .expect("reader consumer")
}

fn assign_all(c: &BaseConsumer, topic: &str, partitions: i32) {
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::Beginning).expect("tpl");
    }
    c.assign(&tpl).expect("assign");
}

/// Read a whole topic: at least `at_least` messages, then until 2 s pass with nothing new
/// (the broker's reported end offsets are unreliable on memory storage).
pub fn read_topic(topic: &str, partitions: i32, at_least: u64) -> Vec<TopicMsg> {
    let c = reader(format!("faults-readback-{}", uuid::Uuid::new_v4().simple()));
    assign_all(&c, topic, partitions);
    let mut out = Vec::with_capacity(at_least as usize);
    let started = Instant::now();
    let mut quiet = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet = Instant::now();
                let hash = payload_hash(m.payload().unwrap_or(&[]));
                out.push(TopicMsg { partition: m.partition(), offset: m.offset(), hash });
            }
            Some(Err(e)) => panic!("reading {topic} back: {e}"),
            None if out.len() as u64 >= at_least && quiet.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    out
}

/// Next offset to consume per partition, once everything in `msgs` is consumed.
pub fn ends(msgs: &[TopicMsg]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for m in msgs {
        let e = ends.entry(m.partition).or_insert(0);
        *e = (*e).max(m.offset + 1);
    }
    ends
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub code: String,
    pub reason: String,
    pub hash: u64,
}

/// Every dead letter on `dlq_topic`, by source position, and how many copies in total
/// (the topic is at-least-once: a batch retried after its produce succeeded repeats them).
pub fn read_dlq(dlq_topic: &str, at_least: usize) -> (HashMap<(i32, i64), DeadLetter>, usize) {
    let c = reader(format!("faults-dlq-{}", uuid::Uuid::new_v4().simple()));
    assign_all(&c, dlq_topic, 3);
    let mut seen = HashMap::new();
    let mut copies = 0usize;
    let started = Instant::now();
    let mut quiet = Instant::now();
    while started.elapsed() < Duration::from_secs(120) {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                quiet = Instant::now();
                copies += 1;
                let h = header_map(&m);
                let get = |k: &str| h.get(k).cloned().unwrap_or_default();
                let pos = (
                    get("tally.source.partition").parse().unwrap_or(-1),
                    get("tally.source.offset").parse().unwrap_or(-1),
                );
                let hash = payload_hash(m.payload().unwrap_or(&[]));
                seen.insert(pos, DeadLetter { code: get("tally.code"), reason: get("tally.reason"), hash });
            }
            Some(Err(e)) => panic!("reading {dlq_topic}: {e}"),
            None if seen.len() >= at_least && quiet.elapsed() > Duration::from_secs(2) => break,
            None => {}
        }
    }
    (seen, copies)
}

fn header_map<M: Message>(m: &M) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(hs) = m.headers() {
        for h in hs.iter() {
            out.insert(h.key.to_string(), String::from_utf8_lossy(h.value.unwrap_or_default()).into_owned());
        }
    }
    out
}

/// The outcome of one scenario's checks.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Valid events missing from the ledger, the dedup store or ClickHouse; bad messages
    /// missing from the dead-letter topic; absurd events neither billed nor dead-lettered.
    pub lost: u64,
    /// Debits beyond one per charged event (and any debit for an uncharged one).
    pub double_billed: u64,
    /// Distinct source messages on the dead-letter topic.
    pub dead_lettered: usize,
    pub dlq_copies: usize,
    /// `usage_log` rows beyond one per event before merges (FINAL collapses them).
    pub ch_extra_rows: u64,
    pub messages_in_topic: usize,
    pub errors: Vec<String>,
}

impl Verdict {
    fn fail(&mut self, msg: String) {
        self.errors.push(msg);
    }
}

/// What the topic content says Tally must have done.
struct Expected {
    /// Valid events present in the topic (indices into `Book::events`).
    valid: Vec<u32>,
    absurd: Vec<u32>,
    /// Source positions that must be dead-lettered, with the code required (if known).
    dead: HashMap<(i32, i64), (Option<&'static str>, &'static str, u64)>,
}

fn expected(book: &Book, msgs: &[TopicMsg], v: &mut Verdict) -> Expected {
    let mut present: HashSet<u64> = HashSet::with_capacity(book.classes.len());
    let mut valid = HashSet::new();
    let mut absurd = HashSet::new();
    let mut dead = HashMap::new();
    let mut unknown = 0u64;
    for m in msgs {
        present.insert(m.hash);
        match book.classes.get(&m.hash) {
            Some(Class::Valid(i)) => {
                valid.insert(*i);
            }
            Some(Class::Absurd(i)) => {
                absurd.insert(*i);
            }
            Some(Class::Bad { code, what }) => {
                dead.insert((m.partition, m.offset), (*code, *what, m.hash));
            }
            Some(Class::Conflict(_)) => {
                dead.insert((m.partition, m.offset), (Some("idempotency_conflict"), "id conflict", m.hash));
            }
            None => unknown += 1,
        }
    }
    if unknown > 0 {
        v.fail(format!("{unknown} messages in the topic were not produced by the harness"));
    }
    let missing = book.classes.keys().filter(|h| !present.contains(h)).count();
    if missing > 0 {
        v.fail(format!("the BROKER lost {missing} acknowledged payloads (not a Tally fault)"));
    }
    Expected { valid: valid.into_iter().collect(), absurd: absurd.into_iter().collect(), dead }
}

/// Run every check. `auto_created`: the accounts that must have been created on first
/// sight (when the scenario pre-created the others).
pub async fn check(
    env: &TestEnv,
    book: &Book,
    msgs: &[TopicMsg],
    auto_created: Option<&HashSet<String>>,
) -> Verdict {
    let mut v = Verdict { messages_in_topic: msgs.len(), ..Verdict::default() };
    let want = expected(book, msgs, &mut v);
    let absurd_ids: HashSet<&str> =
        want.absurd.iter().map(|i| book.events[*i as usize].id.as_str()).collect();
    let stores = Stores {
        dead_absurd: check_dead_letters(env, &want, &absurd_ids, &mut v).await,
        processed: processed_ids(env).await,
        ledger: ledger_debits(env).await,
        ch: clickhouse_rows(env).await,
    };
    let mut out = Outcome::default();
    check_valid(book, &want, &stores, &mut out, &mut v);
    check_absurd(book, &want, &stores, &mut out, &mut v);
    v.lost += out.lost.len() as u64;
    if !out.lost.is_empty() {
        let sample: Vec<&str> =
            out.lost.iter().take(5).map(|i| book.events[*i as usize].id.as_str()).collect();
        v.fail(format!(
            "{} events lost (missing from processed_events, ledger or usage_log), e.g. {sample:?}",
            out.lost.len()
        ));
    }
    for (id, d) in &stores.ledger {
        let extra = if out.billable.contains(id.as_str()) { d.amounts.len() - 1 } else { d.amounts.len() };
        v.double_billed += extra as u64;
    }
    if v.double_billed > 0 {
        v.fail(format!("{} debits beyond one per charged event", v.double_billed));
    }
    let expected_ids: HashSet<&str> =
        want.valid.iter().chain(&want.absurd).map(|i| book.events[*i as usize].id.as_str()).collect();
    let stray = stores.processed.iter().filter(|id| !expected_ids.contains(id.as_str())).count();
    if stray > 0 {
        v.fail(format!("{stray} event ids accepted that must have been rejected"));
    }
    check_clickhouse(env, &stores.ch, &expected_ids, &stores.dead_absurd, &mut v).await;
    let total: i128 = out.charged.values().map(|s| i128::from(*s)).sum();
    check_balances(env, &out.charged, &book.credited, total, &mut v).await;
    if let Some(accounts) = auto_created {
        check_auto_created(env, accounts, &mut v).await;
    }
    v
}

/// What Tally stored.
struct Stores {
    processed: HashSet<String>,
    ledger: HashMap<String, Debits>,
    /// Raw `usage_log` rows per event id.
    ch: HashMap<String, u64>,
    /// Absurd events that were dead-lettered.
    dead_absurd: HashSet<String>,
}

/// What the checks derived: lost events, and the debits that were due.
#[derive(Default)]
struct Outcome<'b> {
    lost: HashSet<u32>,
    /// Account -> the sum it must have been debited.
    charged: HashMap<&'b str, i64>,
    /// Event ids that must have exactly one debit.
    billable: HashSet<&'b str>,
}

/// Every valid event is in the dedup store and in ClickHouse, and a charged one has its
/// exact debit on the right account.
fn check_valid<'b>(book: &'b Book, want: &Expected, stores: &Stores, out: &mut Outcome<'b>, v: &mut Verdict) {
    for &i in &want.valid {
        let e = &book.events[i as usize];
        let debit = stores.ledger.get(e.id.as_str());
        let billed_ok = e.cost_units == 0 || debit.is_some();
        if !stores.processed.contains(e.id.as_str()) || !billed_ok || !stores.ch.contains_key(e.id.as_str()) {
            out.lost.insert(i);
        }
        if e.cost_units == 0 {
            continue;
        }
        out.billable.insert(e.id.as_str());
        let sum = out.charged.entry(e.account.as_str()).or_default();
        *sum = sum.saturating_add(e.cost_units);
        let wrong = |d: &&Debits| d.amounts.iter().any(|a| *a != e.cost_units) || d.account != e.account;
        if let Some(d) = debit.filter(wrong) {
            v.fail(format!(
                "event {} billed {:?} to {}, expected {} to {}",
                e.id, d.amounts, d.account, e.cost_units, e.account
            ));
        }
    }
}

/// An absurd event is billed at its exact price or dead-lettered: one of the two.
fn check_absurd<'b>(
    book: &'b Book,
    want: &Expected,
    stores: &Stores,
    out: &mut Outcome<'b>,
    v: &mut Verdict,
) {
    let mut wrong: Vec<String> = Vec::new();
    for &i in &want.absurd {
        let e = &book.events[i as usize];
        let dead = stores.dead_absurd.contains(e.id.as_str());
        match (stores.ledger.get(e.id.as_str()), dead) {
            (Some(_), true) => wrong.push(format!("{} both billed and dead-lettered", e.id)),
            (None, false) => {
                out.lost.insert(i);
                wrong.push(format!("{} (cost {}) neither billed nor dead-lettered", e.id, e.cost_units));
            }
            (Some(d), false) if e.overflow || d.amounts != [e.cost_units] => {
                wrong.push(format!(
                    "{} billed {:?}, exact price {} (overflow {})",
                    e.id, d.amounts, e.cost_units, e.overflow
                ));
            }
            (Some(_), false) => {
                out.billable.insert(e.id.as_str());
                let sum = out.charged.entry(e.account.as_str()).or_default();
                *sum = sum.saturating_add(e.cost_units);
            }
            (None, true) => {}
        }
    }
    if !wrong.is_empty() {
        wrong.sort();
        v.fail(format!("{} absurd events mishandled, e.g. {:?}", wrong.len(), &wrong[..wrong.len().min(4)]));
    }
}

async fn processed_ids(env: &TestEnv) -> HashSet<String> {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT event_id FROM processed_events")
        .fetch_all(&env.pool)
        .await
        .expect("processed_events");
    rows.into_iter().map(|(id,)| id).collect()
}

struct Debits {
    account: String,
    amounts: Vec<i64>,
}

async fn ledger_debits(env: &TestEnv) -> HashMap<String, Debits> {
    let rows: Vec<(Option<String>, String, i64)> = sqlx::query_as(
        "SELECT event_id, account_id, -amount_units FROM ledger_entries WHERE kind = 'consume'",
    )
    .fetch_all(&env.pool)
    .await
    .expect("ledger entries");
    let mut out: HashMap<String, Debits> = HashMap::with_capacity(rows.len());
    for (id, account, amount) in rows {
        let id = id.unwrap_or_else(|| "<consume entry without event id>".into());
        out.entry(id).or_insert_with(|| Debits { account, amounts: Vec::new() }).amounts.push(amount);
    }
    out
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct IdCount {
    event_id: String,
    n: u64,
}

/// Raw `usage_log` rows per event id (no FINAL: a replayed insert shows up here).
async fn clickhouse_rows(env: &TestEnv) -> HashMap<String, u64> {
    let rows: Vec<IdCount> = env
        .clickhouse()
        .query("SELECT event_id, count() AS n FROM usage_log GROUP BY event_id")
        .fetch_all()
        .await
        .expect("usage_log ids");
    rows.into_iter().map(|r| (r.event_id, r.n)).collect()
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct FinalCounts {
    rows: u64,
    ids: u64,
}

async fn check_clickhouse(
    env: &TestEnv,
    raw: &HashMap<String, u64>,
    expected_ids: &HashSet<&str>,
    dead: &HashSet<String>,
    v: &mut Verdict,
) {
    v.ch_extra_rows = raw.values().map(|n| n - 1).sum();
    if v.ch_extra_rows > 0 {
        // FINAL hides them, but the rollups fed by materialized views count every insert.
        v.fail(format!("{} usage_log rows beyond one per event (inserted twice)", v.ch_extra_rows));
    }
    let stray = raw.keys().filter(|id| !expected_ids.contains(id.as_str()) || dead.contains(*id)).count();
    if stray > 0 {
        v.fail(format!("{stray} usage_log event ids that must not be there"));
    }
    let f: FinalCounts = env
        .clickhouse()
        .query("SELECT count() AS rows, uniqExact(event_id) AS ids FROM usage_log FINAL")
        .fetch_one()
        .await
        .expect("usage_log FINAL");
    let accepted = raw.keys().filter(|id| expected_ids.contains(id.as_str())).count() as u64;
    if f.rows != f.ids || f.ids != accepted {
        v.fail(format!(
            "usage_log FINAL: {} rows, {} ids; want one row per accepted event ({accepted})",
            f.rows, f.ids
        ));
    }
}

/// Per account: the journal's debits and the balance projection equal the independent
/// sums (credit the scenario granted, minus debits, minus what expired grants wrote off);
/// `ledger verify` passes (it also proves every credit grant from the journal) and agrees
/// on the total.
async fn check_balances(
    env: &TestEnv,
    charged: &HashMap<&str, i64>,
    credited: &HashMap<String, i64>,
    total: i128,
    v: &mut Verdict,
) {
    let journal: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, (-sum(amount_units))::bigint FROM ledger_entries WHERE kind = 'consume' GROUP BY account_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("journal sums");
    let journal: HashMap<String, i64> = journal.into_iter().filter(|(_, s)| *s != 0).collect();
    let want: HashMap<String, i64> = charged.iter().map(|(a, s)| (a.to_string(), *s)).collect();
    let diff = want.iter().filter(|(a, s)| journal.get(*a) != Some(s)).count()
        + journal.keys().filter(|a| !want.contains_key(*a)).count();
    if diff > 0 {
        v.fail(format!("{diff} accounts whose journal debits differ from the expected sums"));
    }
    // Breakage is checked grant by grant by `verify` (remainder == journal deltas) and by
    // the grants scenario (once per grant, never spent after its deadline).
    let breakage: Vec<(String, i64)> = sqlx::query_as(
        "SELECT account_id, (-sum(amount_units))::bigint FROM ledger_entries WHERE kind = 'breakage' GROUP BY account_id",
    )
    .fetch_all(&env.pool)
    .await
    .expect("breakage sums");
    let breakage: HashMap<String, i64> = breakage.into_iter().collect();
    let mut want_balance: HashMap<String, i64> = HashMap::new();
    for (a, s) in &want {
        *want_balance.entry(a.clone()).or_default() -= s;
    }
    for (a, c) in credited {
        *want_balance.entry(a.clone()).or_default() += c;
    }
    for (a, b) in &breakage {
        *want_balance.entry(a.clone()).or_default() -= b;
    }
    want_balance.retain(|_, b| *b != 0);
    let balances: Vec<(String, i64)> =
        sqlx::query_as("SELECT account_id, balance_units FROM account_balances WHERE balance_units <> 0")
            .fetch_all(&env.pool)
            .await
            .expect("balances");
    if balances.into_iter().collect::<HashMap<_, _>>() != want_balance {
        v.fail("account_balances differ from the expected per-account sums".into());
    }
    let granted: i128 = credited.values().map(|c| i128::from(*c)).sum::<i128>()
        - breakage.values().map(|b| i128::from(*b)).sum::<i128>();
    match tally::ledger::verify(&env.pool).await {
        Ok(r) if i128::from(r.total_units) == granted - total => {}
        Ok(r) => v.fail(format!("ledger verify total {} != expected {}", r.total_units, granted - total)),
        Err(e) => v.fail(format!("ledger verify failed: {e}")),
    }
}

/// The dead-letter topic and table hold exactly the bad messages, by source position,
/// each with a code and a reason (and the expected code where it is deterministic).
/// Returns the event ids that were dead-lettered.
async fn check_dead_letters(
    env: &TestEnv,
    want: &Expected,
    absurd_ids: &HashSet<&str>,
    v: &mut Verdict,
) -> HashSet<String> {
    let dlq_topic = env.dlq_topic.clone();
    let n = want.dead.len();
    let (seen, copies) =
        tokio::task::spawn_blocking(move || read_dlq(&dlq_topic, n)).await.expect("dlq reader");
    v.dead_lettered = seen.len();
    v.dlq_copies = copies;
    for (pos, (code, what, hash)) in &want.dead {
        match seen.get(pos) {
            None => {
                v.lost += 1;
                v.fail(format!("bad message {what} at {pos:?} is not on the dead-letter topic"));
            }
            Some(d) if d.code.is_empty() || d.reason.is_empty() => {
                v.fail(format!("dead letter {pos:?} has no code/reason"))
            }
            Some(d) if code.is_some_and(|c| c != d.code) => v.fail(format!(
                "{what} at {pos:?}: code {} ({}), expected {}",
                d.code,
                d.reason,
                code.unwrap_or("")
            )),
            Some(d) if d.code != "idempotency_conflict" && d.hash != *hash => {
                v.fail(format!("dead letter {pos:?} does not carry the original payload"))
            }
            Some(_) => {}
        }
    }
    let rows: Vec<(i32, i64, String, Option<String>)> =
        sqlx::query_as("SELECT source_partition, source_offset, code, event_id FROM dead_letters")
            .fetch_all(&env.pool)
            .await
            .expect("dead_letters");
    let table: HashSet<(i32, i64)> = rows.iter().map(|r| (r.0, r.1)).collect();
    let topic: HashSet<(i32, i64)> = seen.keys().copied().collect();
    if table != topic {
        v.fail(format!("dead_letters table ({}) and topic ({}) differ", table.len(), topic.len()));
    }
    // Extra dead letters are legal only for absurd events (dead-lettering is one of their
    // two allowed outcomes; the caller checks those by event id).
    let mut dead_absurd = HashSet::new();
    for (p, o, code, id) in rows.into_iter().filter(|r| !want.dead.contains_key(&(r.0, r.1))) {
        match id {
            Some(id) if absurd_ids.contains(id.as_str()) => {
                dead_absurd.insert(id);
            }
            id => v.fail(format!("unexpected dead letter at ({p}, {o}): {code}, event {id:?}")),
        }
    }
    dead_absurd
}

async fn check_auto_created(env: &TestEnv, want: &HashSet<String>, v: &mut Verdict) {
    let rows: Vec<(String,)> = sqlx::query_as("SELECT account_id FROM accounts WHERE auto_created")
        .fetch_all(&env.pool)
        .await
        .expect("accounts");
    let got: HashSet<String> = rows.into_iter().map(|(a,)| a).collect();
    if &got != want {
        v.fail(format!("auto-created accounts {got:?}, expected {want:?}"));
    }
}
