//! What flows from the source to the sinks: consumed messages after decoding and pricing
//! (`Item`: valid or dead), grouped into a `Batch`, and the canonical payload hash that
//! tells a replay from an id conflict. The pipeline builds these; the ledger, ClickHouse
//! and dead-letter sinks consume them.

use crate::event::UsageEvent;
use crate::pricing::Charge;

/// Where a message came from.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SourcePos {
    pub partition: i32,
    pub offset: i64,
}

/// One consumed message after decoding and pricing.
#[derive(Debug, Clone)]
pub enum Item {
    Valid(Box<ValidItem>),
    Dead(DeadItem),
}

#[derive(Debug, Clone)]
pub struct ValidItem {
    pub pos: SourcePos,
    pub event: UsageEvent,
    pub charge: Charge,
    /// Version of the catalog that priced it (`pricing::catalog_version`).
    pub catalog_version: std::sync::Arc<str>,
    /// SHA-256 of the event's canonical JSON: tells a replay from an id conflict.
    pub payload_hash: [u8; 32],
}

/// A message that goes to the dead-letter topic, with why.
#[derive(Debug, Clone)]
pub struct DeadItem {
    pub pos: SourcePos,
    /// Stable low-cardinality code (`bad_avro`, `invalid_event`, `out_of_range`,
    /// `idempotency_conflict`, ...).
    pub code: &'static str,
    pub reason: String,
    pub event_id: Option<String>,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

impl Item {
    pub fn pos(&self) -> &SourcePos {
        match self {
            Item::Valid(v) => &v.pos,
            Item::Dead(d) => &d.pos,
        }
    }
}

/// Messages read together, in the order received (per partition: offset order).
#[derive(Debug, Default)]
pub struct Batch {
    pub items: Vec<Item>,
}

/// Canonical hash of an event: SHA-256 over its JSON form (field order is fixed by the
/// struct definition, so equal events hash equally): the same bytes as
/// `serde_json::to_vec`. The JSON goes into a per-thread buffer that is reused, then the
/// hasher sees it in one piece (fed write by write, SHA-256 spent more time copying
/// small pieces into its block buffer than hashing).
pub fn payload_hash(event: &UsageEvent) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    use std::cell::RefCell;
    /// A buffer that grew past this (an event with huge strings) is not kept.
    const KEEP_BYTES_MAX: usize = 16 * 1024;
    thread_local! {
        static JSON: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
    }
    JSON.with(|cell| {
        let mut buf = cell.borrow_mut();
        buf.clear();
        serde_json::to_writer(&mut *buf, event).expect("a UsageEvent always serializes");
        let hash: [u8; 32] = Sha256::digest(&buf[..]).into();
        if buf.capacity() > KEEP_BYTES_MAX {
            *buf = Vec::with_capacity(1024);
        }
        hash
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn hash_equals_the_hash_of_the_json_bytes() {
        use sha2::{Digest, Sha256};
        let raw = crate::event::RawUsageEvent {
            event_id: Some("e-1".into()),
            occurred_at: Some("2026-11-01T00:00:00Z".into()),
            account_id: Some("a \"quoted\" é".into()),
            provider: Some("openai".into()),
            model: Some("gpt-4o".into()),
            modality: Some("chat".into()),
            status: Some("success".into()),
            input_tokens: Some(10),
            ..Default::default()
        };
        let e = crate::event::UsageEvent::parse(raw).expect("valid");
        let want: [u8; 32] = Sha256::digest(serde_json::to_vec(&e).unwrap()).into();
        assert_eq!(super::payload_hash(&e), want, "stored hashes of earlier events stay comparable");
    }
}
