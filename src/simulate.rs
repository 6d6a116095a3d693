//! `tally simulate`: realistic gateway traffic, deterministic from a seed.
//!
//! [`Generator`] is pure (no I/O): the same seed gives the same messages, so tests compute
//! expected totals from exactly what was produced. The CLI wraps it with a producer, a
//! rate limit and a progress bar.

use crate::codec;
use crate::event::{BillingMode, Counts, Modality, Status, UsageEvent};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;

/// (provider, model, modality). Includes models no catalog lists, to exercise fallback.
const MODELS: &[(&str, &str, Modality)] = &[
    ("anthropic", "claude-sonnet-4-5", Modality::Chat),
    ("anthropic", "claude-haiku-4-5", Modality::Chat),
    ("anthropic", "claude-opus-4-6", Modality::Chat),
    ("openai", "gpt-4o", Modality::Chat),
    ("openai", "gpt-4o-mini", Modality::Chat),
    ("openai", "gpt-5", Modality::Chat),
    ("openai", "o3", Modality::Chat),
    ("openai", "text-embedding-3-small", Modality::Embedding),
    ("google", "gemini-2.5-pro", Modality::Chat),
    ("google", "gemini-2.5-flash", Modality::Chat),
    ("xai", "grok-4-1-fast", Modality::Chat),
    ("deepseek", "deepseek-chat", Modality::Chat),
    ("openai", "gpt-image-1", Modality::Image),
    ("google", "veo-3", Modality::Video),
    ("openai", "tts-1", Modality::Audio),
    ("meta", "whatsapp", Modality::Message),
    ("platform", "email", Modality::Email),
    ("platform", "ad_generations", Modality::Feature),
    ("acme", "mystery-model-9000", Modality::Chat),
    ("ollama", "llama3.1:8b", Modality::Chat),
];
const CATEGORIES: &[&str] = &["marketing", "utility", "authentication", "service"];
const RESOLUTIONS: &[&str] = &["480p", "720p", "1080p"];

#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub seed: u64,
    pub accounts: u32,
    /// Share of messages that repeat an earlier event id with the same payload (0..=1).
    pub duplicate_share: f64,
    /// Share of messages that are malformed in one of several ways (0..=1).
    pub malformed_share: f64,
    /// Share of valid events that fail (status error: logged, free).
    pub error_share: f64,
    /// Share of valid events that are BYOK (logged, free).
    pub byok_share: f64,
    /// Event times are spread over this many days before `now`.
    pub spread_days: u32,
    pub now: DateTime<Utc>,
    pub partitions: i32,
}

impl Default for SimulateOptions {
    fn default() -> Self {
        SimulateOptions {
            seed: 42,
            accounts: 200,
            duplicate_share: 0.02,
            malformed_share: 0.01,
            error_share: 0.05,
            byok_share: 0.05,
            spread_days: 3,
            now: Utc::now(),
            partitions: 6,
        }
    }
}

/// What one produced message is, for the test's independent bookkeeping.
#[derive(Debug, Clone)]
pub enum Kind {
    Valid(Box<UsageEvent>),
    Duplicate(Box<UsageEvent>),
    Malformed(&'static str),
}

#[derive(Debug, Clone)]
pub struct Message {
    pub key: String,
    pub payload: Vec<u8>,
    /// Explicit partition (used for duplicates sent to a different partition than the
    /// original); `None` lets the producer hash the key.
    pub partition: Option<i32>,
    pub kind: Kind,
}

pub struct Generator {
    opts: SimulateOptions,
    rng: StdRng,
    sent: Vec<UsageEvent>,
    serial: u64,
}

/// How many earlier events are remembered as duplicate candidates.
const DUPLICATE_MEMORY_MAX: usize = 10_000;

impl Generator {
    pub fn new(mut opts: SimulateOptions) -> Generator {
        assert!(opts.accounts > 0 && opts.partitions > 0);
        // Event times travel with microsecond resolution (see event::parse_time).
        opts.now = opts.now.trunc_subsecs(6);
        let rng = StdRng::seed_from_u64(opts.seed);
        Generator { opts, rng, sent: Vec::new(), serial: 0 }
    }

    pub fn next_message(&mut self) -> Message {
        let roll: f64 = self.rng.r#gen();
        if roll < self.opts.malformed_share {
            return self.malformed();
        }
        if roll < self.opts.malformed_share + self.opts.duplicate_share && !self.sent.is_empty() {
            let e = self.sent[self.rng.gen_range(0..self.sent.len())].clone();
            // Half of the duplicates go to a random partition: cross-partition dedup.
            let partition = self.rng.gen_bool(0.5).then(|| self.rng.gen_range(0..self.opts.partitions));
            return Message {
                key: e.account_id.clone(),
                payload: codec::encode(&e.to_raw()),
                partition,
                kind: Kind::Duplicate(Box::new(e)),
            };
        }
        let e = self.valid_event();
        if self.sent.len() < DUPLICATE_MEMORY_MAX {
            self.sent.push(e.clone());
        } else {
            let i = self.rng.gen_range(0..DUPLICATE_MEMORY_MAX);
            self.sent[i] = e.clone();
        }
        Message {
            key: e.account_id.clone(),
            payload: codec::encode(&e.to_raw()),
            partition: None,
            kind: Kind::Valid(Box::new(e)),
        }
    }

    fn valid_event(&mut self) -> UsageEvent {
        self.serial += 1;
        let r = &mut self.rng;
        let (provider, model, modality) = MODELS[r.gen_range(0..MODELS.len())];
        let account = r.gen_range(0..self.opts.accounts);
        let secs = r.gen_range(0..i64::from(self.opts.spread_days.max(1)) * 86_400);
        let status = if r.gen_bool(self.opts.error_share) { Status::Error } else { Status::Success };
        let byok = r.gen_bool(self.opts.byok_share);
        let counts = counts_for(r, modality);
        let upstream = upstream_cost(r, &counts);
        UsageEvent {
            event_id: format!("evt-{}-{}", self.opts.seed, self.serial),
            occurred_at: self.opts.now - Duration::seconds(secs),
            account_id: format!("acct-{account:04}"),
            api_key_id: Some(format!("key-{account:04}-{}", r.gen_range(0..3))),
            project_id: Some(format!("proj-{account:04}-{}", r.gen_range(0..2))),
            user_id: Some(format!("user-{}", r.gen_range(0..5000))),
            provider: provider.to_string(),
            model: model.to_string(),
            modality,
            feature: (modality == Modality::Feature).then(|| model.to_string()),
            status,
            http_status: Some(if status == Status::Error { 500 } else { 200 }),
            counts,
            resolution: (modality == Modality::Video || modality == Modality::Image)
                .then(|| RESOLUTIONS[r.gen_range(0..RESOLUTIONS.len())].to_string()),
            message_category: (modality == Modality::Message)
                .then(|| CATEGORIES[r.gen_range(0..CATEGORIES.len())].to_string()),
            upstream_cost: upstream,
            billing_mode: if byok { BillingMode::Byok } else { BillingMode::Platform },
            reservation_id: None,
            latency_ms: Some(r.gen_range(50..8000)),
            request_ip: Some(format!("10.0.{}.{}", r.gen_range(0..255), r.gen_range(1..255))),
            user_agent: Some("tally-simulate/1".into()),
        }
    }

    fn malformed(&mut self) -> Message {
        let mut raw = self.valid_event().to_raw();
        let key = raw.account_id.clone().unwrap_or_default();
        let (what, payload): (&'static str, Vec<u8>) = match self.rng.gen_range(0..7) {
            0 => ("garbage", (0..40).map(|_| self.rng.r#gen::<u8>()).collect()),
            1 => {
                let f = codec::encode(&raw);
                let cut = self.rng.gen_range(5..f.len());
                ("truncated", f[..cut].to_vec())
            }
            2 => {
                let mut f = codec::encode(&raw);
                f[4] = 99;
                ("unknown_schema", f)
            }
            3 => {
                raw.output_tokens = Some(-5);
                ("negative_count", codec::encode(&raw))
            }
            4 => {
                raw.occurred_at = Some((self.opts.now + Duration::days(365)).to_rfc3339());
                ("far_future", codec::encode(&raw))
            }
            5 => {
                raw.account_id = Some(String::new());
                ("missing_account", codec::encode(&raw))
            }
            _ => {
                raw.modality = Some("hologram".into());
                ("unknown_modality", codec::encode(&raw))
            }
        };
        Message { key, payload, partition: None, kind: Kind::Malformed(what) }
    }
}

fn counts_for(r: &mut StdRng, modality: Modality) -> Counts {
    let mut c = Counts::default();
    match modality {
        Modality::Chat | Modality::Embedding => {
            c.input_tokens = r.gen_range(10..50_000);
            c.cached_input_tokens = if r.gen_bool(0.3) { r.gen_range(0..=c.input_tokens / 2) } else { 0 };
            c.cache_write_tokens = if r.gen_bool(0.1) { r.gen_range(0..=c.input_tokens / 4) } else { 0 };
            if modality == Modality::Chat {
                c.output_tokens = r.gen_range(1..4_000);
                c.reasoning_tokens = if r.gen_bool(0.2) { r.gen_range(0..=c.output_tokens) } else { 0 };
            }
        }
        Modality::Image => c.images = r.gen_range(1..5),
        Modality::Video => {
            c.video_clips = 1;
            c.video_seconds = r.gen_range(4..12);
        }
        Modality::Audio => c.characters = r.gen_range(20..5_000),
        Modality::Message | Modality::Email => c.messages = r.gen_range(1..4),
        Modality::Feature => {}
    }
    c
}

/// A plausible upstream cost: a few hundred micro-dollars, exact decimal.
fn upstream_cost(r: &mut StdRng, c: &Counts) -> Option<Decimal> {
    let tokens = c.input_tokens + c.output_tokens;
    if tokens == 0 && c.images == 0 && c.video_seconds == 0 {
        return None;
    }
    let micros = tokens * r.gen_range(1..4) + c.images * 40_000 + c.video_seconds * 100_000;
    Some(Decimal::new(micros as i64, 6))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_traffic_and_kinds_decode_as_labelled() {
        let opts = SimulateOptions { malformed_share: 0.2, duplicate_share: 0.2, ..Default::default() };
        let mut a = Generator::new(opts.clone());
        let mut b = Generator::new(opts);
        let (mut valid, mut dup, mut bad) = (0, 0, 0);
        for _ in 0..2_000 {
            let (m1, m2) = (a.next_message(), b.next_message());
            assert_eq!(m1.payload, m2.payload);
            let decoded = codec::decode(&m1.payload).ok().map(UsageEvent::parse);
            match m1.kind {
                Kind::Valid(e) => {
                    assert_eq!(decoded, Some(Ok(*e)));
                    valid += 1;
                }
                Kind::Duplicate(e) => {
                    assert_eq!(decoded, Some(Ok(*e)));
                    dup += 1;
                }
                Kind::Malformed(what) => {
                    bad += 1;
                    let ok = matches!(decoded, Some(Ok(ref e)) if e.occurred_at <= Utc::now() + Duration::hours(1));
                    assert!(!ok, "{what} decoded as a valid, in-range event");
                }
            }
        }
        assert!(valid > 1_000 && bad > 200 && dup > 200, "valid {valid}, dup {dup}, malformed {bad}");
    }

    /// The demo catalog prices everything the simulator sends: only the deliberately
    /// unknown model falls back, and every modality has charged events.
    #[test]
    fn demo_catalog_covers_the_simulated_traffic() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/demo.toml");
        let catalog = crate::pricing::Catalog::load(&path).unwrap();
        let mut g = Generator::new(SimulateOptions {
            malformed_share: 0.0,
            duplicate_share: 0.0,
            ..Default::default()
        });
        let mut charged = std::collections::HashSet::new();
        for _ in 0..20_000 {
            let Kind::Valid(e) = g.next_message().kind else { unreachable!() };
            let c = catalog.price(&e);
            if e.provider != "ollama" {
                // (local providers have no catalog entries: they are free by provider)
                assert_eq!(
                    c.model_fallback,
                    e.model == "mystery-model-9000",
                    "{} {}",
                    e.model,
                    c.reason.as_str()
                );
            }
            if c.charged {
                charged.insert(e.modality);
            }
        }
        assert_eq!(charged.len(), Modality::ALL.len(), "charged modalities: {charged:?}");
    }
}
