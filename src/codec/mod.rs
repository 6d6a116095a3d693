//! Wire codec: Confluent-framed Avro <-> [`RawUsageEvent`].
//!
//! Frame: magic byte `0`, 4-byte big-endian schema id, Avro binary body. The id names the
//! *writer* schema: schema 1 (`schemas/avro/usage_event.v1.avsc`, compiled in, which is also
//! Tally's reader schema), a file of a schema directory, or a Confluent-compatible schema
//! registry ([`schemas`]). Each writer schema is checked against the reader once, when it is
//! first known; its events then decode by field name: fields the writer added are skipped,
//! fields it lacks take the reader's default, `int` promotes to `long` and `bytes` to
//! `string` (the Avro specification's resolution rules for this record).
//!
//! Decoding is strict because a billing pipeline must not guess: the body must be consumed
//! exactly (apache-avro decodes some truncated strings as `Null` instead of failing, so
//! leftover or missing bytes are caught by checking the reader position and field shapes).
//! Every failure carries a short machine-readable `code` (used in the dead-letter header
//! and in metrics labels) and a human reason.

use crate::event::RawUsageEvent;
use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use chrono::{DateTime, SecondsFormat, Utc};
use std::sync::LazyLock;

pub mod schemas;
pub use schemas::Schemas;

/// Schema id of `schemas/avro/usage_event.v1.avsc`.
pub const USAGE_EVENT_V1_ID: u32 = 1;
const USAGE_EVENT_V1: &str = include_str!("../../schemas/avro/usage_event.v1.avsc");
/// Largest frame accepted. A usage event is ~200-600 bytes; 64 KiB bounds the work a
/// single hostile message can cause.
pub const FRAME_BYTES_MAX: usize = 64 * 1024;

/// Tally's reader schema (and writer schema 1).
static SCHEMA_V1: LazyLock<Schema> =
    LazyLock::new(|| Schema::parse_str(USAGE_EVENT_V1).expect("compiled-in schema is valid"));

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {reason}")]
pub struct DecodeError {
    /// Stable, low-cardinality code: `empty`, `too_large`, `bad_magic`, `unknown_schema`,
    /// `incompatible_schema`, `bad_avro`, `truncated`, `trailing_bytes`, `bad_shape`.
    pub code: &'static str,
    pub reason: String,
}

fn err(code: &'static str, reason: impl Into<String>) -> DecodeError {
    DecodeError { code, reason: reason.into() }
}

/// Decode one Confluent-framed Avro message written with the compiled-in schema (tools and
/// tests; the pipeline decodes with its [`Schemas`]).
pub fn decode(frame: &[u8]) -> Result<RawUsageEvent, DecodeError> {
    Schemas::builtin().decode(frame)
}

/// The schema id of a frame, after the header checks.
pub fn frame_schema_id(frame: &[u8]) -> Result<u32, DecodeError> {
    if frame.is_empty() {
        return Err(err("empty", "empty message"));
    }
    if frame.len() > FRAME_BYTES_MAX {
        return Err(err("too_large", format!("{} bytes > {FRAME_BYTES_MAX}", frame.len())));
    }
    if frame[0] != 0 {
        return Err(err("bad_magic", format!("magic byte {} (expected 0)", frame[0])));
    }
    if frame.len() < 5 {
        return Err(err("bad_magic", "frame shorter than its 5-byte header"));
    }
    Ok(u32::from_be_bytes([frame[1], frame[2], frame[3], frame[4]]))
}

/// Decode a frame's body with its writer schema's reader (see [`schemas::Writer`]).
fn decode_body(
    reader: &GenericDatumReader<'static>,
    body: &[u8],
    exact: bool,
) -> Result<RawUsageEvent, DecodeError> {
    let mut body = StrictReader { rest: body, read_past_end: false };
    let value = reader.read_value(&mut body).map_err(|e| err("bad_avro", e.to_string()))?;
    if body.read_past_end {
        return Err(err("truncated", "the record ends before its last field"));
    }
    if !body.rest.is_empty() {
        return Err(err("trailing_bytes", format!("{} bytes left after the record", body.rest.len())));
    }
    from_value(value, exact)
}

/// A slice reader that remembers whether the decoder asked for bytes past the end.
/// apache-avro turns some end-of-input reads into defaults instead of errors; this is how
/// a truncated body is still caught.
struct StrictReader<'a> {
    rest: &'a [u8],
    read_past_end: bool,
}

impl std::io::Read for StrictReader<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.rest.is_empty() && !out.is_empty() {
            self.read_past_end = true;
            return Ok(0);
        }
        let n = self.rest.read(out)?;
        Ok(n)
    }
}

/// Encode a raw event as a Confluent-framed Avro message (schema id 1).
///
/// Used by the simulator and tests. Fields the schema requires but the event lacks are
/// written as empty strings / zero so that even invalid events can be produced on purpose.
pub fn encode(raw: &RawUsageEvent) -> Vec<u8> {
    let writer = GenericDatumWriter::builder(&SCHEMA_V1).build().expect("compiled-in schema resolves");
    let body = writer.write_value_to_vec(to_value(raw)).expect("values built by to_value match the schema");
    let mut frame = Vec::with_capacity(5 + body.len());
    frame.push(0);
    frame.extend_from_slice(&USAGE_EVENT_V1_ID.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// The raw event as a record of the compiled-in schema (the simulator's writer; tests build
/// other writers' records from it).
pub fn to_value(r: &RawUsageEvent) -> Value {
    let s = |v: &Option<String>| Value::String(v.clone().unwrap_or_default());
    let opt = |v: &Option<String>| match v {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(s) => Value::Union(1, Box::new(Value::String(s.clone()))),
    };
    let n = |v: Option<i64>| Value::Long(v.unwrap_or(0));
    let micros = r
        .occurred_at
        .as_deref()
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.timestamp_micros())
        .unwrap_or(0);
    let http = match r.http_status {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(Value::Int(v.clamp(i32::MIN as i64, i32::MAX as i64) as i32))),
    };
    let latency = match r.latency_ms {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(Value::Long(v))),
    };
    let billing = Value::String(r.billing_mode.clone().unwrap_or_else(|| "platform".into()));
    let fields: Vec<(&str, Value)> = vec![
        ("event_id", s(&r.event_id)),
        ("occurred_at", Value::TimestampMicros(micros)),
        ("account_id", s(&r.account_id)),
        ("api_key_id", opt(&r.api_key_id)),
        ("project_id", opt(&r.project_id)),
        ("user_id", opt(&r.user_id)),
        ("provider", s(&r.provider)),
        ("model", s(&r.model)),
        ("modality", s(&r.modality)),
        ("feature", opt(&r.feature)),
        ("status", s(&r.status)),
        ("http_status", http),
        ("input_tokens", n(r.input_tokens)),
        ("cached_input_tokens", n(r.cached_input_tokens)),
        ("cache_write_tokens", n(r.cache_write_tokens)),
        ("output_tokens", n(r.output_tokens)),
        ("reasoning_tokens", n(r.reasoning_tokens)),
        ("images", n(r.images)),
        ("video_seconds", n(r.video_seconds)),
        ("video_clips", n(r.video_clips)),
        ("resolution", opt(&r.resolution)),
        ("characters", n(r.characters)),
        ("messages", n(r.messages)),
        ("message_category", opt(&r.message_category)),
        ("upstream_cost", opt(&r.upstream_cost)),
        ("billing_mode", billing),
        ("reservation_id", opt(&r.reservation_id)),
        ("latency_ms", latency),
        ("request_ip", opt(&r.request_ip)),
        ("user_agent", opt(&r.user_agent)),
    ];
    Value::Record(fields.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
}

/// Map a decoded record onto the raw event, by field name. Required strings that came back
/// as anything but a string (the truncation quirk) are shape errors, not empty values.
/// `exact`: the writer schema is the reader schema, so an unknown field is a shape error;
/// otherwise fields the writer added are skipped (its schema was checked compatible).
fn from_value(value: Value, exact: bool) -> Result<RawUsageEvent, DecodeError> {
    let Value::Record(fields) = value else {
        return Err(err("bad_shape", "top-level value is not a record"));
    };
    let mut r = RawUsageEvent::default();
    for (name, v) in fields {
        let v = match v {
            Value::Union(_, inner) => *inner,
            other => other,
        };
        match name.as_str() {
            "event_id" => r.event_id = Some(string(&name, v)?),
            "occurred_at" => r.occurred_at = Some(timestamp(v)?),
            "account_id" => r.account_id = Some(string(&name, v)?),
            "api_key_id" => r.api_key_id = opt_string(&name, v)?,
            "project_id" => r.project_id = opt_string(&name, v)?,
            "user_id" => r.user_id = opt_string(&name, v)?,
            "provider" => r.provider = Some(string(&name, v)?),
            "model" => r.model = Some(string(&name, v)?),
            "modality" => r.modality = Some(string(&name, v)?),
            "feature" => r.feature = opt_string(&name, v)?,
            "status" => r.status = Some(string(&name, v)?),
            "http_status" => r.http_status = opt_long(&name, v)?,
            "input_tokens" => r.input_tokens = opt_long(&name, v)?,
            "cached_input_tokens" => r.cached_input_tokens = opt_long(&name, v)?,
            "cache_write_tokens" => r.cache_write_tokens = opt_long(&name, v)?,
            "output_tokens" => r.output_tokens = opt_long(&name, v)?,
            "reasoning_tokens" => r.reasoning_tokens = opt_long(&name, v)?,
            "images" => r.images = opt_long(&name, v)?,
            "video_seconds" => r.video_seconds = opt_long(&name, v)?,
            "video_clips" => r.video_clips = opt_long(&name, v)?,
            "resolution" => r.resolution = opt_string(&name, v)?,
            "characters" => r.characters = opt_long(&name, v)?,
            "messages" => r.messages = opt_long(&name, v)?,
            "message_category" => r.message_category = opt_string(&name, v)?,
            "upstream_cost" => r.upstream_cost = opt_string(&name, v)?,
            "billing_mode" => r.billing_mode = Some(string(&name, v)?),
            "reservation_id" => r.reservation_id = opt_string(&name, v)?,
            "latency_ms" => r.latency_ms = opt_long(&name, v)?,
            "request_ip" => r.request_ip = opt_string(&name, v)?,
            "user_agent" => r.user_agent = opt_string(&name, v)?,
            other if exact => return Err(err("bad_shape", format!("unexpected field {other}"))),
            _ => {}
        }
    }
    Ok(r)
}

fn string(name: &str, v: Value) -> Result<String, DecodeError> {
    match v {
        Value::String(s) => Ok(s),
        // Avro promotes bytes to string.
        Value::Bytes(b) => {
            String::from_utf8(b).map_err(|_| err("bad_shape", format!("{name}: bytes that are not UTF-8")))
        }
        other => Err(err("bad_shape", format!("{name}: expected a string, got {other:?}"))),
    }
}

fn opt_string(name: &str, v: Value) -> Result<Option<String>, DecodeError> {
    match v {
        Value::Null => Ok(None),
        other => string(name, other).map(Some),
    }
}

fn opt_long(name: &str, v: Value) -> Result<Option<i64>, DecodeError> {
    match v {
        Value::Null => Ok(None),
        Value::Long(n) => Ok(Some(n)),
        Value::Int(n) => Ok(Some(i64::from(n))),
        other => Err(err("bad_shape", format!("{name}: expected a number, got {other:?}"))),
    }
}

fn timestamp(v: Value) -> Result<String, DecodeError> {
    let micros = match v {
        Value::TimestampMicros(m) | Value::Long(m) => m,
        other => return Err(err("bad_shape", format!("occurred_at: got {other:?}"))),
    };
    let t = DateTime::<Utc>::from_timestamp_micros(micros)
        .ok_or_else(|| err("bad_shape", format!("occurred_at: {micros} us is out of range")))?;
    Ok(t.to_rfc3339_opts(SecondsFormat::AutoSi, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RawUsageEvent {
        RawUsageEvent {
            event_id: Some("evt_42".into()),
            occurred_at: Some("2026-11-01T12:00:00.123456Z".into()),
            account_id: Some("acct_7".into()),
            provider: Some("openai".into()),
            model: Some("gpt-4o".into()),
            modality: Some("chat".into()),
            status: Some("success".into()),
            billing_mode: Some("platform".into()),
            http_status: Some(200),
            input_tokens: Some(1200),
            output_tokens: Some(300),
            upstream_cost: Some("0.0051".into()),
            api_key_id: Some("key_1".into()),
            ..Default::default()
        }
    }

    #[test]
    fn round_trips_through_the_frame() {
        let raw = sample();
        let frame = encode(&raw);
        assert_eq!(&frame[..5], &[0, 0, 0, 0, 1]);
        let parse = |r: RawUsageEvent| crate::event::UsageEvent::parse(r).unwrap();
        assert_eq!(parse(decode(&frame).unwrap()), parse(raw));
    }

    #[test]
    fn rejects_bad_frames_with_codes() {
        let frame = encode(&sample());
        assert_eq!(decode(&[]).unwrap_err().code, "empty");
        assert_eq!(decode(&[1, 0, 0, 0, 1, 2]).unwrap_err().code, "bad_magic");
        assert_eq!(decode(&[0, 0, 0]).unwrap_err().code, "bad_magic");
        let mut other = frame.clone();
        other[4] = 9;
        assert_eq!(decode(&other).unwrap_err().code, "unknown_schema");
        let mut long = frame.clone();
        long.push(0);
        assert_eq!(decode(&long).unwrap_err().code, "trailing_bytes");
        assert_eq!(decode(&vec![0u8; FRAME_BYTES_MAX + 1]).unwrap_err().code, "too_large");
    }

    #[test]
    fn every_truncation_is_an_error_never_an_event() {
        let frame = encode(&sample());
        for cut in 5..frame.len() {
            assert!(
                decode(&frame[..cut]).is_err(),
                "truncated at {cut} of {} decoded: {:?}",
                frame.len(),
                decode(&frame[..cut])
            );
        }
    }

    #[test]
    fn garbage_never_panics() {
        let mut seed: u64 = 0x9e3779b97f4a7c15;
        for len in 0..400usize {
            let mut buf = vec![0u8, 0, 0, 0, 1];
            for _ in 0..len {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                buf.push(seed as u8);
            }
            let _ = decode(&buf);
        }
    }
}
