//! The usage event: one metered call reported by a gateway.
//!
//! Two forms exist:
//! - [`RawUsageEvent`]: what arrives on the wire (JSON lines, or Avro decoded by
//!   [`crate::codec`]). Every field is optional and unchecked.
//! - [`UsageEvent`]: the parsed domain value. Only [`UsageEvent::parse`] builds one, so
//!   everything downstream (pricing, quotas, the ledger) can rely on its invariants:
//!   non-empty ids, known enum values, counts that are not negative, subsets that are not
//!   larger than their totals, an exact decimal upstream cost.
//!
//! Field semantics are documented once, on [`RawUsageEvent`], and mirrored in
//! `schemas/avro/usage_event.v1.avsc`.

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use std::str::FromStr;

/// Longest id we accept (event, account, key, project, user, reservation). Ids are keys in
/// Postgres and ClickHouse; an unbounded id is a way to blow up both.
pub const ID_LEN_MAX: usize = 128;
/// Longest free-text field (model, provider, user agent, ...).
pub const TEXT_LEN_MAX: usize = 512;
/// Largest count accepted for any unit (tokens, images, seconds, ...). 10^12 tokens in one
/// call is far beyond any real model; the cap keeps every price computation far from
/// overflow (10^12 units x $10^4 per unit still fits rust_decimal's 96-bit mantissa).
pub const COUNT_MAX: i64 = 1_000_000_000_000;

/// Why an event was rejected at the edge. The text becomes the dead-letter reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct EventError {
    pub field: &'static str,
    pub problem: String,
}

impl EventError {
    fn new(field: &'static str, problem: impl Into<String>) -> Self {
        Self { field, problem: problem.into() }
    }
}

/// A usage event as it arrives. Field names are the public contract (JSON and Avro).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUsageEvent {
    /// The idempotency key: one per real call. A gateway retrying a report must reuse it.
    pub event_id: Option<String>,
    /// Event time (RFC 3339), when the call completed at the gateway. Windows, months and
    /// price versions are chosen by this time, never by arrival time.
    pub occurred_at: Option<String>,
    /// The paying account (organization / wallet).
    pub account_id: Option<String>,
    /// API key used for the call (per-key spend caps).
    pub api_key_id: Option<String>,
    /// Project / stack (per-project spend caps).
    pub project_id: Option<String>,
    /// End user inside the account (analytics only).
    pub user_id: Option<String>,
    /// Upstream provider (anthropic, openai, google, xai, deepseek, ollama, meta, ...).
    pub provider: Option<String>,
    /// Model id as the gateway called it.
    pub model: Option<String>,
    /// chat | embedding | image | video | audio | message | email | feature
    pub modality: Option<String>,
    /// Product feature for flat per-call pricing and tier quotas (e.g. `ad_generations`).
    pub feature: Option<String>,
    /// success | error. Errors are logged and never charged.
    pub status: Option<String>,
    /// HTTP status the gateway returned.
    pub http_status: Option<i64>,
    /// All prompt tokens, cached ones included.
    pub input_tokens: Option<i64>,
    /// Prompt tokens read from cache: a subset of `input_tokens`.
    pub cached_input_tokens: Option<i64>,
    /// Prompt tokens written to cache: a subset of `input_tokens`.
    pub cache_write_tokens: Option<i64>,
    /// All completion tokens, reasoning included.
    pub output_tokens: Option<i64>,
    /// Reasoning tokens: a subset of `output_tokens`.
    pub reasoning_tokens: Option<i64>,
    /// Images generated and delivered (partial/failed generations are not counted here).
    pub images: Option<i64>,
    /// Seconds of generated video or audio.
    pub video_seconds: Option<i64>,
    /// Video clips generated.
    pub video_clips: Option<i64>,
    /// Resolution tier of generated media (e.g. `720p`, `1080p`, `1024x1024`).
    pub resolution: Option<String>,
    /// Characters processed (TTS, translation).
    pub characters: Option<i64>,
    /// Messages sent (WhatsApp, SMS, email).
    pub messages: Option<i64>,
    /// Message pricing category (WhatsApp: marketing | utility | authentication | service).
    pub message_category: Option<String>,
    /// What the upstream provider charged for this call, USD, decimal string.
    pub upstream_cost: Option<String>,
    /// platform | byok. BYOK calls are logged and never charged.
    pub billing_mode: Option<String>,
    /// Reservation this call settles, if the gateway reserved credits first.
    pub reservation_id: Option<String>,
    /// Gateway-measured latency.
    pub latency_ms: Option<i64>,
    /// Caller IP (usage log only).
    pub request_ip: Option<String>,
    /// Caller user agent (usage log only).
    pub user_agent: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Modality {
    Chat,
    Embedding,
    Image,
    Video,
    Audio,
    Message,
    Email,
    Feature,
}

impl Modality {
    pub const ALL: [Modality; 8] = [
        Modality::Chat,
        Modality::Embedding,
        Modality::Image,
        Modality::Video,
        Modality::Audio,
        Modality::Message,
        Modality::Email,
        Modality::Feature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Modality::Chat => "chat",
            Modality::Embedding => "embedding",
            Modality::Image => "image",
            Modality::Video => "video",
            Modality::Audio => "audio",
            Modality::Message => "message",
            Modality::Email => "email",
            Modality::Feature => "feature",
        }
    }
}

impl FromStr for Modality {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Modality::ALL.into_iter().find(|m| m.as_str() == s).ok_or_else(|| format!("unknown modality {s:?}"))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Success,
    Error,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "success",
            Status::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BillingMode {
    Platform,
    Byok,
}

impl BillingMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingMode::Platform => "platform",
            BillingMode::Byok => "byok",
        }
    }
}

/// Unit counts of one call. All are `>= 0` and `<= COUNT_MAX`; subsets are `<=` totals.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Counts {
    pub input_tokens: u64,
    pub cached_input_tokens: u64,
    pub cache_write_tokens: u64,
    pub output_tokens: u64,
    pub reasoning_tokens: u64,
    pub images: u64,
    pub video_seconds: u64,
    pub video_clips: u64,
    pub characters: u64,
    pub messages: u64,
}

/// A parsed, valid usage event. Build it with [`UsageEvent::parse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageEvent {
    pub event_id: String,
    pub occurred_at: DateTime<Utc>,
    pub account_id: String,
    pub api_key_id: Option<String>,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
    pub provider: String,
    pub model: String,
    pub modality: Modality,
    pub feature: Option<String>,
    pub status: Status,
    pub http_status: Option<u16>,
    pub counts: Counts,
    pub resolution: Option<String>,
    pub message_category: Option<String>,
    /// USD, exact, `>= 0`.
    pub upstream_cost: Option<Decimal>,
    pub billing_mode: BillingMode,
    pub reservation_id: Option<String>,
    pub latency_ms: Option<u32>,
    pub request_ip: Option<String>,
    pub user_agent: Option<String>,
}

fn required_id(field: &'static str, v: Option<String>) -> Result<String, EventError> {
    let v = v.ok_or_else(|| EventError::new(field, "missing"))?;
    check_id(field, v)
}

fn check_id(field: &'static str, v: String) -> Result<String, EventError> {
    if v.is_empty() {
        return Err(EventError::new(field, "empty"));
    }
    if v.len() > ID_LEN_MAX {
        return Err(EventError::new(field, format!("longer than {ID_LEN_MAX} bytes")));
    }
    if v.chars().any(|c| c.is_control()) {
        return Err(EventError::new(field, "contains control characters"));
    }
    Ok(v)
}

fn optional_id(field: &'static str, v: Option<String>) -> Result<Option<String>, EventError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => check_id(field, s).map(Some),
    }
}

fn optional_text(field: &'static str, v: Option<String>) -> Result<Option<String>, EventError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) if s.len() > TEXT_LEN_MAX => {
            Err(EventError::new(field, format!("longer than {TEXT_LEN_MAX} bytes")))
        }
        // Free text may hold any character but NUL, which Postgres text cannot store.
        Some(s) if s.contains('\0') => Err(EventError::new(field, "contains a NUL character")),
        Some(s) => Ok(Some(s)),
    }
}

fn count(field: &'static str, v: Option<i64>) -> Result<u64, EventError> {
    let v = v.unwrap_or(0);
    if v < 0 {
        return Err(EventError::new(field, format!("negative count {v}")));
    }
    if v > COUNT_MAX {
        return Err(EventError::new(field, format!("count {v} above limit {COUNT_MAX}")));
    }
    Ok(v as u64)
}

fn subset(field: &'static str, part: u64, of: &'static str, total: u64) -> Result<(), EventError> {
    if part > total {
        return Err(EventError::new(field, format!("{part} exceeds {of} {total}")));
    }
    Ok(())
}

impl UsageEvent {
    /// Parse a raw event. The only constructor: every invariant is checked here.
    pub fn parse(raw: RawUsageEvent) -> Result<UsageEvent, EventError> {
        let event_id = required_id("event_id", raw.event_id)?;
        let occurred_at = parse_time(raw.occurred_at)?;
        let account_id = required_id("account_id", raw.account_id)?;
        let provider =
            optional_text("provider", raw.provider)?.ok_or_else(|| EventError::new("provider", "missing"))?;
        let model = optional_text("model", raw.model)?.ok_or_else(|| EventError::new("model", "missing"))?;
        let modality = raw
            .modality
            .ok_or_else(|| EventError::new("modality", "missing"))?
            .parse::<Modality>()
            .map_err(|e| EventError::new("modality", e))?;
        let status = match raw.status.as_deref() {
            Some("success") => Status::Success,
            Some("error") => Status::Error,
            Some(other) => return Err(EventError::new("status", format!("unknown status {other:?}"))),
            None => return Err(EventError::new("status", "missing")),
        };
        let billing_mode = match raw.billing_mode.as_deref() {
            None | Some("") | Some("platform") => BillingMode::Platform,
            Some("byok") => BillingMode::Byok,
            Some(other) => {
                return Err(EventError::new("billing_mode", format!("unknown billing mode {other:?}")));
            }
        };
        let http_status = match raw.http_status {
            None => None,
            Some(s) if (100..=599).contains(&s) => Some(s as u16),
            Some(s) => return Err(EventError::new("http_status", format!("{s} is not an HTTP status"))),
        };
        let latency_ms = match raw.latency_ms {
            None => None,
            Some(v) if (0..=i64::from(u32::MAX)).contains(&v) => Some(v as u32),
            Some(v) => return Err(EventError::new("latency_ms", format!("{v} out of range"))),
        };
        let counts = Counts {
            input_tokens: count("input_tokens", raw.input_tokens)?,
            cached_input_tokens: count("cached_input_tokens", raw.cached_input_tokens)?,
            cache_write_tokens: count("cache_write_tokens", raw.cache_write_tokens)?,
            output_tokens: count("output_tokens", raw.output_tokens)?,
            reasoning_tokens: count("reasoning_tokens", raw.reasoning_tokens)?,
            images: count("images", raw.images)?,
            video_seconds: count("video_seconds", raw.video_seconds)?,
            video_clips: count("video_clips", raw.video_clips)?,
            characters: count("characters", raw.characters)?,
            messages: count("messages", raw.messages)?,
        };
        let c = &counts;
        subset("cached_input_tokens", c.cached_input_tokens, "input_tokens", c.input_tokens)?;
        subset("cache_write_tokens", c.cache_write_tokens, "input_tokens", c.input_tokens)?;
        let cache_total = c.cached_input_tokens + c.cache_write_tokens;
        subset("cached_input_tokens + cache_write_tokens", cache_total, "input_tokens", c.input_tokens)?;
        subset("reasoning_tokens", c.reasoning_tokens, "output_tokens", c.output_tokens)?;
        let upstream_cost = match raw.upstream_cost.as_deref() {
            None | Some("") => None,
            Some(s) => Some(parse_usd("upstream_cost", s)?),
        };
        Ok(UsageEvent {
            event_id,
            occurred_at,
            account_id,
            api_key_id: optional_id("api_key_id", raw.api_key_id)?,
            project_id: optional_id("project_id", raw.project_id)?,
            user_id: optional_id("user_id", raw.user_id)?,
            provider,
            model,
            modality,
            feature: optional_text("feature", raw.feature)?,
            status,
            http_status,
            counts,
            resolution: optional_text("resolution", raw.resolution)?,
            message_category: optional_text("message_category", raw.message_category)?,
            upstream_cost,
            billing_mode,
            reservation_id: optional_id("reservation_id", raw.reservation_id)?,
            latency_ms,
            request_ip: optional_text("request_ip", raw.request_ip)?,
            user_agent: optional_text("user_agent", raw.user_agent)?,
        })
    }

    /// Back to the wire form (used by the simulator and tests; `parse(to_raw(e)) == e`).
    pub fn to_raw(&self) -> RawUsageEvent {
        let c = &self.counts;
        let n = |v: u64| if v == 0 { None } else { Some(v as i64) };
        RawUsageEvent {
            event_id: Some(self.event_id.clone()),
            occurred_at: Some(self.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
            account_id: Some(self.account_id.clone()),
            api_key_id: self.api_key_id.clone(),
            project_id: self.project_id.clone(),
            user_id: self.user_id.clone(),
            provider: Some(self.provider.clone()),
            model: Some(self.model.clone()),
            modality: Some(self.modality.as_str().to_string()),
            feature: self.feature.clone(),
            status: Some(self.status.as_str().to_string()),
            http_status: self.http_status.map(i64::from),
            input_tokens: n(c.input_tokens),
            cached_input_tokens: n(c.cached_input_tokens),
            cache_write_tokens: n(c.cache_write_tokens),
            output_tokens: n(c.output_tokens),
            reasoning_tokens: n(c.reasoning_tokens),
            images: n(c.images),
            video_seconds: n(c.video_seconds),
            video_clips: n(c.video_clips),
            resolution: self.resolution.clone(),
            characters: n(c.characters),
            messages: n(c.messages),
            message_category: self.message_category.clone(),
            upstream_cost: self.upstream_cost.map(|d| d.normalize().to_string()),
            billing_mode: Some(self.billing_mode.as_str().to_string()),
            reservation_id: self.reservation_id.clone(),
            latency_ms: self.latency_ms.map(i64::from),
            request_ip: self.request_ip.clone(),
            user_agent: self.user_agent.clone(),
        }
    }
}

/// Parse a JSON line into a valid event.
pub fn parse_json_line(line: &str) -> Result<UsageEvent, EventError> {
    let raw: RawUsageEvent =
        serde_json::from_str(line).map_err(|e| EventError::new("json", e.to_string()))?;
    UsageEvent::parse(raw)
}

fn parse_time(v: Option<String>) -> Result<DateTime<Utc>, EventError> {
    let v = v.ok_or_else(|| EventError::new("occurred_at", "missing"))?;
    // Event time resolution is 1 microsecond (the Avro field is timestamp-micros), so
    // JSON and Avro forms of one event parse to equal values.
    DateTime::parse_from_rfc3339(&v)
        .map(|t| t.with_timezone(&Utc).trunc_subsecs(6))
        .map_err(|e| EventError::new("occurred_at", format!("not RFC 3339 ({e}): {v:?}")))
}

/// Parse a non-negative USD decimal string ("0.0123"). Exponents and signs are refused:
/// money on the wire is plain decimal.
pub fn parse_usd(field: &'static str, s: &str) -> Result<Decimal, EventError> {
    let ok_chars = s.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if !ok_chars || s.is_empty() {
        return Err(EventError::new(field, format!("not a plain non-negative decimal: {s:?}")));
    }
    let d = Decimal::from_str_exact(s).map_err(|e| EventError::new(field, format!("{e}: {s:?}")))?;
    if d > Decimal::from(1_000_000_000i64) {
        return Err(EventError::new(field, format!("{s} USD is above the 1e9 USD limit")));
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
