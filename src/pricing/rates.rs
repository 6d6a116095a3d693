//! Compiled rates and the cost of one event's usage under them.
//!
//! Every rate here is a whole number of atoms (1e-20 USD) per single unit of usage, with
//! multipliers and markups already applied at load. `None` means "this catalog entry has
//! no rate for that usage" (as opposed to a rate of zero): such usage costs nothing and is
//! reported as `no_rate` if nothing else was priced.

use crate::event::{Counts, UsageEvent};
use chrono::{DateTime, Utc};

/// Atoms (1e-20 USD) per one token / image / clip / second / character / message / call.
pub(crate) type Atoms = i128;

/// Per-token rates of one context tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct TokenRates {
    pub input: Option<Atoms>,
    pub cache_read: Option<Atoms>,
    pub cache_write: Option<Atoms>,
    pub output: Option<Atoms>,
    pub reasoning: Option<Atoms>,
}

impl TokenRates {
    /// The rates as an array, for field-by-field comparisons at load.
    pub fn as_array(&self) -> [Option<Atoms>; 5] {
        [self.input, self.cache_read, self.cache_write, self.output, self.reasoning]
    }
}

/// A rate that is either flat or depends on a key of the event (resolution, category).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Keyed {
    Flat(Atoms),
    /// Keys match case-insensitively. `fallback` prices a missing or unlisted key: the
    /// `default` entry if the table has one, else the table's highest rate (an unknown
    /// tier is never under-billed).
    ByKey {
        rates: Vec<(String, Atoms)>,
        fallback: Atoms,
    },
}

impl Keyed {
    pub fn rate_for(&self, key: Option<&str>) -> Atoms {
        match self {
            Keyed::Flat(rate) => *rate,
            Keyed::ByKey { rates, fallback } => key
                .and_then(|k| rates.iter().find(|(name, _)| name.eq_ignore_ascii_case(k)))
                .map_or(*fallback, |(_, rate)| *rate),
        }
    }
}

/// Everything one price version charges for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Rates {
    pub tokens: TokenRates,
    /// `(above_input_tokens, rates)`, ascending thresholds.
    pub long_context: Vec<(u64, TokenRates)>,
    pub per_character: Option<Atoms>,
    pub per_image: Option<Keyed>,
    pub per_clip: Option<Keyed>,
    pub per_second: Option<Keyed>,
    pub per_message: Option<Keyed>,
    pub per_call: Option<Atoms>,
}

/// One price version: `rates` are in force from `effective_from` (None = since forever).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Version {
    pub effective_from: Option<DateTime<Utc>>,
    pub rates: Rates,
}

/// The version in force at `at`: the latest whose `effective_from <= at`. An event older
/// than every version is priced by the earliest one (documented in the module doc).
/// `versions` is sorted ascending with `None` first, and never empty (checked at load).
pub(crate) fn version_at(versions: &[Version], at: DateTime<Utc>) -> &Version {
    let in_force = versions.partition_point(|v| v.effective_from.is_none_or(|from| from <= at));
    &versions[in_force.saturating_sub(1)]
}

/// The exact catalog cost of one event, before the floor, rounding and minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct UsageCost {
    /// `None` when the sum overflowed `i128` (an absurd event, priced as `cost_overflow`).
    pub atoms: Option<Atoms>,
    /// Some usage was present (a non-zero count, or a call on an entry with `per_call`).
    pub had_usage: bool,
    /// Some non-zero count had no rate in this entry.
    pub had_unpriced: bool,
}

impl UsageCost {
    fn new() -> Self {
        UsageCost { atoms: Some(0), had_usage: false, had_unpriced: false }
    }

    fn add(&mut self, count: u64, rate: Option<Atoms>) {
        if count == 0 {
            return;
        }
        self.had_usage = true;
        let Some(rate) = rate else {
            self.had_unpriced = true;
            return;
        };
        let term = rate.checked_mul(i128::from(count));
        self.atoms = self.atoms.zip(term).and_then(|(sum, term)| sum.checked_add(term));
    }
}

impl Rates {
    /// Long-context selection: the tier with the highest threshold strictly below the
    /// prompt size (all input tokens, cached included) prices the whole request.
    pub fn tokens_for_prompt(&self, input_tokens: u64) -> &TokenRates {
        self.long_context
            .iter()
            .rev()
            .find(|(above, _)| input_tokens > *above)
            .map_or(&self.tokens, |(_, rates)| rates)
    }

    /// Catalog cost of `event`'s usage. Counts are taken as given; subsets larger than
    /// their totals (impossible after `UsageEvent::parse`) saturate to zero, never panic.
    pub fn cost(&self, event: &UsageEvent) -> UsageCost {
        let c: &Counts = &event.counts;
        let mut cost = UsageCost::new();
        self.add_tokens(c, &mut cost);
        cost.add(c.characters, self.per_character);
        let resolution = event.resolution.as_deref();
        cost.add(c.images, keyed(&self.per_image, resolution));
        cost.add(c.video_clips, keyed(&self.per_clip, resolution));
        cost.add(c.video_seconds, keyed(&self.per_second, resolution));
        cost.add(c.messages, keyed(&self.per_message, event.message_category.as_deref()));
        if let Some(fee) = self.per_call {
            // A flat-priced entry charges once per successful call, with or without counts.
            cost.add(1, Some(fee));
        }
        cost
    }

    /// Cache reads and writes are carved out of `input_tokens`, reasoning out of
    /// `output_tokens`; each part is billed once, at its own rate.
    fn add_tokens(&self, c: &Counts, cost: &mut UsageCost) {
        let t = self.tokens_for_prompt(c.input_tokens);
        let cached = c.cached_input_tokens.min(c.input_tokens);
        let cache_write = c.cache_write_tokens.min(c.input_tokens - cached);
        let uncached = c.input_tokens - cached - cache_write;
        let reasoning = c.reasoning_tokens.min(c.output_tokens);
        cost.add(uncached, t.input);
        cost.add(cached, t.cache_read);
        cost.add(cache_write, t.cache_write);
        cost.add(c.output_tokens - reasoning, t.output);
        cost.add(reasoning, t.reasoning);
    }
}

fn keyed(rate: &Option<Keyed>, key: Option<&str>) -> Option<Atoms> {
    rate.as_ref().map(|r| r.rate_for(key))
}
