//! What the harness produces: simulator traffic (deterministic from a seed) and
//! hand-made edge cases: malformed, truncated, wrong-schema and out-of-range messages,
//! in-range edges, unknown accounts, id conflicts and absurd costs.

use super::book::{Book, Out};
use chrono::{DateTime, Duration as ChronoDuration, Utc};
use std::sync::Arc;
use tally::event::{BillingMode, Counts, Modality, RawUsageEvent, Status, UsageEvent};
use tally::pricing::Catalog;
use tally::simulate::{Generator, SimulateOptions};

pub fn catalog() -> Arc<Catalog> {
    Arc::new(Catalog::load(&crate::common::repo().join(super::ops::CATALOG)).expect("catalog"))
}

/// Simulator traffic as a message source for `ops::feed`.
pub fn simulated(opts: SimulateOptions, catalog: Arc<Catalog>) -> impl FnMut(&mut Book) -> Out {
    let mut g = Generator::new(opts);
    move |book: &mut Book| book.simulated(g.next_message(), &catalog)
}

/// Options for one traffic stream. Every stream of a scenario needs its own seed: event
/// ids are `evt-<seed>-<serial>`.
pub fn sim_opts(seed: u64, duplicate_share: f64, malformed_share: f64) -> SimulateOptions {
    SimulateOptions { seed, duplicate_share, malformed_share, ..SimulateOptions::default() }
}

/// A plain charged chat event (the template the edge cases start from).
pub fn chat_event(id: String, account: &str, at: DateTime<Utc>) -> UsageEvent {
    UsageEvent {
        event_id: id,
        occurred_at: at,
        account_id: account.into(),
        api_key_id: None,
        project_id: None,
        user_id: None,
        provider: "anthropic".into(),
        model: "claude-sonnet-4-5".into(),
        modality: Modality::Chat,
        feature: None,
        status: Status::Success,
        http_status: Some(200),
        counts: Counts { input_tokens: 1_200, output_tokens: 300, ..Counts::default() },
        resolution: None,
        message_category: None,
        upstream_cost: None,
        billing_mode: BillingMode::Platform,
        reservation_id: None,
        latency_ms: Some(900),
        request_ip: None,
        user_agent: Some("tally-faults".into()),
    }
}

fn now_micros() -> DateTime<Utc> {
    use chrono::SubsecRound;
    Utc::now().trunc_subsecs(6)
}

/// Malformed, truncated, wrong-schema and out-of-range messages, each with the
/// dead-letter code it must get (`None` where several codes are right, e.g. a cut that
/// may land inside a string or between fields).
pub fn bad_messages(book: &mut Book) -> Vec<Out> {
    let now = now_micros();
    let base = chat_event("faults-bad-base".into(), "acct-0001", now);
    let frame = tally::codec::encode(&base.to_raw());
    let mut out = vec![
        book.bad("k", Vec::new(), Some("empty"), "empty payload"),
        book.bad("k", vec![0u8; 70 * 1024], Some("too_large"), "70 KiB payload"),
        book.bad("k", [&[7u8][..], &frame[1..]].concat(), Some("bad_magic"), "magic byte 7"),
        book.bad("k", vec![0, 0, 0, 0, 1], None, "header without body"),
        book.bad("k", [&[0u8, 0, 0, 0, 2][..], &frame[5..]].concat(), Some("unknown_schema"), "schema id 2"),
        book.bad("k", [&frame[..], &[1u8, 2, 3][..]].concat(), Some("trailing_bytes"), "3 trailing bytes"),
        // Valid Avro of another schema ({"id": "hello", "n": 42}) under schema id 1.
        book.bad("k", [&[0u8, 0, 0, 0, 1, 10][..], b"hello", &[84u8][..]].concat(), None, "wrong schema"),
    ];
    for cut in [6, frame.len() / 3, frame.len() / 2, frame.len() - 1] {
        out.push(book.bad("k", frame[..cut].to_vec(), None, "truncated frame"));
    }
    let mut n = 0;
    let mut raw_bad =
        |book: &mut Book, what: &'static str, code: &'static str, f: &dyn Fn(&mut RawUsageEvent)| {
            n += 1;
            let mut raw = chat_event(format!("faults-bad-{n}"), "acct-0002", now).to_raw();
            f(&mut raw);
            out.push(book.bad("acct-0002", tally::codec::encode(&raw), Some(code), what));
        };
    let inv = "invalid_event";
    raw_bad(book, "negative count", inv, &|r| r.output_tokens = Some(-1));
    raw_bad(book, "cached > input", inv, &|r| r.cached_input_tokens = Some(5_000));
    raw_bad(book, "reasoning > output", inv, &|r| r.reasoning_tokens = Some(301));
    raw_bad(book, "count above COUNT_MAX", inv, &|r| r.input_tokens = Some(tally::event::COUNT_MAX + 1));
    raw_bad(book, "unknown status", inv, &|r| r.status = Some("maybe".into()));
    raw_bad(book, "unknown billing mode", inv, &|r| r.billing_mode = Some("free".into()));
    raw_bad(book, "exponent upstream cost", inv, &|r| r.upstream_cost = Some("1e5".into()));
    raw_bad(book, "negative upstream cost", inv, &|r| r.upstream_cost = Some("-0.5".into()));
    raw_bad(book, "empty event id", inv, &|r| r.event_id = Some(String::new()));
    raw_bad(book, "200-byte event id", inv, &|r| r.event_id = Some("x".repeat(200)));
    raw_bad(book, "200-byte account id", inv, &|r| r.account_id = Some("a".repeat(200)));
    raw_bad(book, "http status 999", inv, &|r| r.http_status = Some(999));
    let at = |d: ChronoDuration| Some((now + d).to_rfc3339());
    let oor = "out_of_range";
    raw_bad(book, "1 day in the future", oor, &|r| r.occurred_at = at(ChronoDuration::days(1)));
    raw_bad(book, "30 min in the future", oor, &|r| r.occurred_at = at(ChronoDuration::minutes(30)));
    raw_bad(book, "year 9999", oor, &|r| r.occurred_at = Some("9999-12-31T23:59:59Z".into()));
    raw_bad(book, "401 days old", oor, &|r| r.occurred_at = at(-ChronoDuration::days(401)));
    raw_bad(book, "1970", oor, &|r| r.occurred_at = Some("1970-01-01T00:00:00Z".into()));
    out
}

/// Valid events at the edges of the accepted window, and usage for accounts Tally has
/// never seen (auto-created, billed). Returns the messages and the new accounts.
pub fn edge_events(book: &mut Book, catalog: &Catalog) -> (Vec<Out>, Vec<String>) {
    let now = now_micros();
    let mut out = vec![
        book.valid(
            &chat_event("faults-edge-future".into(), "acct-0003", now + ChronoDuration::seconds(120)),
            catalog,
            None,
        ),
        book.valid(
            &chat_event("faults-edge-old".into(), "acct-0003", now - ChronoDuration::days(399)),
            catalog,
            None,
        ),
    ];
    let accounts: Vec<String> = (0..5).map(|i| format!("acct-never-seen-{i}")).collect();
    for (i, a) in accounts.iter().enumerate() {
        for j in 0..3 {
            let mut e = chat_event(format!("faults-new-{i}-{j}"), a, now - ChronoDuration::minutes(j));
            e.counts.output_tokens += i as u64 * 17 + j as u64;
            out.push(book.valid(&e, catalog, None));
        }
    }
    (out, accounts)
}

/// Same id as an applied event, other content: `idempotency_conflict`.
pub fn conflict_of(book: &mut Book, id: &str, account: &str) -> Out {
    let mut e = chat_event(id.into(), account, now_micros());
    e.counts.output_tokens = 7_777;
    book.conflict(&e)
}

/// `n` video events for one account, each priced just under `cap_usd` (legal counts).
pub fn near_cap_events(book: &mut Book, catalog: &Catalog, cap_usd: i64, n: usize) -> Vec<Out> {
    let now = now_micros();
    let video = |id: String, seconds: u64| {
        let mut e = chat_event(id, "acct-absurd-balance", now);
        e.provider = "google".into();
        e.model = "veo-3".into();
        e.modality = Modality::Video;
        e.resolution = Some("1080p".into());
        e.counts = Counts { video_seconds: seconds, video_clips: 1, ..Counts::default() };
        e
    };
    let per_second = catalog.price(&video("probe".into(), 1_000_000)).cost_units / 1_000_000;
    let cap_units = cap_usd * 100_000_000;
    let seconds = (cap_units / 100 * 99 / per_second) as u64;
    (0..n).map(|i| book.absurd(&video(format!("faults-near-cap-{i}"), seconds), catalog)).collect()
}

/// Legal counts (each <= COUNT_MAX), absurd costs: one whose price does not fit i64 units
/// (priced `cost_overflow`), and pairs near i64::MAX units each, so one account's balance
/// and one batch's debit sum overflow i64.
pub fn absurd_events(book: &mut Book, catalog: &Catalog) -> Vec<Out> {
    let now = now_micros();
    let video = |id: &str, account: &str, seconds: u64| {
        let mut e = chat_event(id.into(), account, now);
        e.provider = "google".into();
        e.model = "veo-3".into();
        e.modality = Modality::Video;
        e.resolution = Some("1080p".into());
        e.counts = Counts { video_seconds: seconds, video_clips: 1, ..Counts::default() };
        e
    };
    // Seconds whose price is ~90% of i64::MAX units: fits once, not twice.
    let per_second = catalog.price(&video("probe", "probe", 1_000_000)).cost_units / 1_000_000;
    let near_max = (i64::MAX / 10 * 9 / per_second) as u64;
    assert!(near_max <= tally::event::COUNT_MAX as u64, "a legal count");
    let events = [
        video("faults-absurd-overflow", "acct-absurd-1", tally::event::COUNT_MAX as u64),
        video("faults-absurd-a1", "acct-absurd-2", near_max),
        video("faults-absurd-a2", "acct-absurd-2", near_max),
        video("faults-absurd-b1", "acct-absurd-3", near_max),
    ];
    events.iter().map(|e| book.absurd(e, catalog)).collect()
}

/// Charged chat events for the accounts `data::refused_rows` makes the database refuse,
/// `n` each; registered as must-dead-letter `refused_by_database` (their payload is what
/// Tally puts on the dead-letter topic: the event as `codec::encode` writes it).
pub fn refused_events(book: &mut Book, accounts: &[&str], n: usize) -> Vec<Out> {
    let now = now_micros();
    let mut out = Vec::new();
    for account in accounts {
        for i in 0..n {
            let e = chat_event(format!("faults-refused-{account}-{i}"), account, now);
            let payload = tally::codec::encode(&e.to_raw());
            out.push(book.bad(account, payload, Some("refused_by_database"), "a row the database refuses"));
        }
    }
    out
}
