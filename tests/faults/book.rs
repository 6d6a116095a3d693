//! The harness's own bookkeeping: what was produced, and therefore what Tally must end up
//! with. Nothing here reads Tally's state or reuses its decoding: a message's fate is
//! decided when the harness builds it (valid event, must-dead-letter, id conflict, ...).
//! The one shared oracle is `Catalog::price`, whose arithmetic has its own golden and
//! property tests; the faults harness checks that the pipeline applies each price once.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use tally::event::UsageEvent;
use tally::pricing::{Catalog, ChargeReason};
use tally::simulate::{Kind, Message};

/// Identity of a payload: 64-bit SipHash of its bytes (fixed keys, so stable in a run).
/// 10^6 payloads collide with probability ~3e-8; `Book::register` catches it anyway.
pub fn payload_hash(payload: &[u8]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    payload.hash(&mut h);
    h.finish()
}

/// What one distinct payload is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A valid, in-range event (`Book::events[i]`). Every copy of these bytes (gateway
    /// retry, duplicate on another partition, replay) must be billed once in total.
    Valid(u32),
    /// Must be dead-lettered. `code`: the `tally.code` it must carry, when deterministic.
    Bad { code: Option<&'static str>, what: &'static str },
    /// A valid event reusing the id of `Book::events[i]` with another payload, produced
    /// after the original was applied: must be dead-lettered as `idempotency_conflict`.
    Conflict(u32),
    /// Legal counts, absurd cost (`Book::events[i]`): must be either billed at its exact
    /// price or dead-lettered; never both, never neither, and never crash the pipeline.
    /// A cost that does not fit i64 units (`overflow`) has no exact price: dead-letter only.
    Absurd(u32),
}

#[derive(Debug, Clone)]
pub struct EventRec {
    pub id: String,
    pub account: String,
    pub cost_units: i64,
    /// `Catalog::price` said `cost_overflow`: not representable, so never billable.
    pub overflow: bool,
}

/// A message ready to produce.
#[derive(Debug, Clone)]
pub struct Out {
    pub key: Vec<u8>,
    pub payload: Vec<u8>,
    pub partition: Option<i32>,
}

#[derive(Default)]
pub struct Book {
    pub classes: HashMap<u64, Class>,
    pub events: Vec<EventRec>,
    /// Event id -> the index of its first (winning) payload.
    pub ids: HashMap<String, u32>,
    /// Messages acknowledged by the broker (copies included).
    pub acked: u64,
    /// Sends retried after a failed delivery report (the first may still have landed).
    pub resent: u64,
    /// Credit the scenario put on accounts outside the topic (credit grants), by account.
    pub credited: HashMap<String, i64>,
}

impl Book {
    /// Record a payload's class; the same bytes always have the same class.
    fn register(&mut self, payload: &[u8], class: Class) {
        let h = payload_hash(payload);
        let merged = match (self.classes.get(&h), class) {
            (None, _) => class,
            // Equal bytes made two ways (a random cut may equal a hand-made frame): any
            // of the expected codes is right.
            (Some(Class::Bad { code: a, what }), Class::Bad { code: b, .. }) => {
                Class::Bad { code: if *a == b { b } else { None }, what }
            }
            (Some(old), _) => {
                assert_eq!(*old, class, "payload registered twice with different classes (hash collision?)");
                class
            }
        };
        self.classes.insert(h, merged);
    }

    fn push_event(&mut self, e: &UsageEvent, catalog: &Catalog) -> u32 {
        let charge = catalog.price(e);
        let idx = u32::try_from(self.events.len()).expect("fewer than 2^32 events");
        self.events.push(EventRec {
            id: e.event_id.clone(),
            account: e.account_id.clone(),
            cost_units: charge.cost_units,
            overflow: charge.reason == ChargeReason::CostOverflow,
        });
        idx
    }

    /// A valid event, encoded as the simulator encodes it. Repeats of the same event
    /// produce the same bytes and map to the same record.
    pub fn valid(&mut self, e: &UsageEvent, catalog: &Catalog, partition: Option<i32>) -> Out {
        let payload = tally::codec::encode(&e.to_raw());
        let h = payload_hash(&payload);
        if !self.classes.contains_key(&h) {
            assert!(
                !self.ids.contains_key(&e.event_id),
                "harness reused id {} with a new payload",
                e.event_id
            );
            let idx = self.push_event(e, catalog);
            self.ids.insert(e.event_id.clone(), idx);
            self.register(&payload, Class::Valid(idx));
        }
        Out { key: e.account_id.clone().into_bytes(), payload, partition }
    }

    /// A simulator message: valid, duplicate (same bytes as its original) or malformed.
    pub fn simulated(&mut self, m: Message, catalog: &Catalog) -> Out {
        match &m.kind {
            Kind::Valid(e) => {
                let out = self.valid(e, catalog, m.partition);
                assert_eq!(out.payload, m.payload, "the simulator encodes as codec::encode");
            }
            Kind::Duplicate(e) => {
                let h = payload_hash(&m.payload);
                assert!(
                    matches!(self.classes.get(&h), Some(Class::Valid(_))),
                    "duplicate of a produced event {}",
                    e.event_id
                );
            }
            Kind::Malformed(what) => {
                self.register(&m.payload, Class::Bad { code: simulator_code(what), what })
            }
        }
        Out { key: m.key.into_bytes(), payload: m.payload, partition: m.partition }
    }

    pub fn bad(
        &mut self,
        key: &str,
        payload: Vec<u8>,
        code: Option<&'static str>,
        what: &'static str,
    ) -> Out {
        self.register(&payload, Class::Bad { code, what });
        Out { key: key.as_bytes().to_vec(), payload, partition: None }
    }

    /// `e` reuses the id of an event produced (and applied) earlier, with other content.
    pub fn conflict(&mut self, e: &UsageEvent) -> Out {
        let original = self.ids[&e.event_id];
        let payload = tally::codec::encode(&e.to_raw());
        self.register(&payload, Class::Conflict(original));
        Out { key: e.account_id.clone().into_bytes(), payload, partition: None }
    }

    pub fn absurd(&mut self, e: &UsageEvent, catalog: &Catalog) -> Out {
        let payload = tally::codec::encode(&e.to_raw());
        assert!(!self.ids.contains_key(&e.event_id));
        let idx = self.push_event(e, catalog);
        self.ids.insert(e.event_id.clone(), idx);
        self.register(&payload, Class::Absurd(idx));
        Out { key: e.account_id.clone().into_bytes(), payload, partition: None }
    }
}

/// The code each simulator malformation must get, where it is deterministic. Random
/// garbage and random truncation points can fail in several ways (bad magic, unknown
/// schema, truncated, bad Avro): any code with a reason is accepted for those.
fn simulator_code(what: &str) -> Option<&'static str> {
    match what {
        "unknown_schema" => Some("unknown_schema"),
        "negative_count" | "missing_account" | "unknown_modality" => Some("invalid_event"),
        "far_future" => Some("out_of_range"),
        _ => None,
    }
}
