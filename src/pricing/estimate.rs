//! What a call will cost at most, before it is made: the hold of a reservation that gives
//! the call's shape instead of an amount (`POST /v1/reservations` with `estimate`).
//!
//! The shape (model, provider, tokens and media units per iteration, iterations) becomes a
//! successful usage event whose counts are the per-iteration maxima times the iterations,
//! priced by the same catalog and rules as the real event will be. So the hold is exactly
//! what the worst case would be billed: Struere's estimate, 10,000 input + 40,960 output
//! tokens x 10 iterations, is the catalog's price of one event of 100,000 input and
//! 409,600 output tokens. Pure: no I/O.

use super::{Catalog, ChargeReason};
use crate::event::{COUNT_MAX, RawUsageEvent, UsageEvent};
use chrono::{DateTime, Utc};

/// Most iterations one estimate may multiply by.
pub const ITERATIONS_MAX: i64 = 1_000;

/// The shape of a call a gateway is about to make. Counts are per iteration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CallShape {
    pub provider: String,
    pub model: String,
    /// chat (default), image, video, audio, feature, ...: as in a usage event.
    pub modality: Option<String>,
    pub feature: Option<String>,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub images: i64,
    pub video_seconds: i64,
    pub characters: i64,
    pub iterations: i64,
}

/// What the catalog says the call costs at most.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Estimate {
    /// The worst case's price, units (> 0), and the entry that priced it.
    Priced { units: i64, priced_model: String },
    /// The call would not be charged (a local model, a zero rate): nothing to hold.
    Free(ChargeReason),
    /// The catalog cannot price this model (no entry, no default model).
    Unpriced,
}

impl Catalog {
    /// Price the worst case of `shape` as an event at `at`. Errors name what is wrong with
    /// the shape (a count out of range, an unknown modality).
    pub fn estimate(
        &self,
        account_id: &str,
        shape: &CallShape,
        at: DateTime<Utc>,
    ) -> Result<Estimate, String> {
        if !(1..=ITERATIONS_MAX).contains(&shape.iterations) {
            return Err(format!("iterations must be within 1..={ITERATIONS_MAX}"));
        }
        let total = |field: &str, per_iteration: i64| -> Result<Option<i64>, String> {
            if per_iteration < 0 {
                return Err(format!("{field} must not be negative"));
            }
            match per_iteration.checked_mul(shape.iterations).filter(|n| *n <= COUNT_MAX) {
                Some(0) => Ok(None),
                Some(n) => Ok(Some(n)),
                None => Err(format!("{field} x iterations is above {COUNT_MAX}")),
            }
        };
        let raw = RawUsageEvent {
            event_id: Some("estimate".into()),
            occurred_at: Some(at.to_rfc3339()),
            account_id: Some(account_id.to_string()),
            provider: Some(shape.provider.clone()),
            model: Some(shape.model.clone()),
            modality: Some(shape.modality.clone().unwrap_or_else(|| "chat".into())),
            feature: shape.feature.clone(),
            status: Some("success".into()),
            input_tokens: total("input_tokens", shape.input_tokens)?,
            output_tokens: total("output_tokens", shape.output_tokens)?,
            images: total("images", shape.images)?,
            video_seconds: total("video_seconds", shape.video_seconds)?,
            characters: total("characters", shape.characters)?,
            ..RawUsageEvent::default()
        };
        let event = UsageEvent::parse(raw).map_err(|e| e.to_string())?;
        let charge = self.price(&event);
        Ok(match charge.reason {
            ChargeReason::UnknownModel => Estimate::Unpriced,
            _ if charge.cost_units > 0 => {
                Estimate::Priced { units: charge.cost_units, priced_model: charge.priced_model }
            }
            reason => Estimate::Free(reason),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn struere() -> Catalog {
        Catalog::from_toml_str(include_str!("../../examples/struere.toml"), "struere.toml").unwrap()
    }

    fn shape(model: &str) -> CallShape {
        CallShape {
            provider: "anthropic".into(),
            model: model.into(),
            input_tokens: 10_000,
            output_tokens: 40_960,
            iterations: 10,
            ..CallShape::default()
        }
    }

    #[test]
    fn struere_worst_case_is_ten_iterations_of_the_maximum() {
        // claude-sonnet-4-5 at $3 / $15 per 1M with Struere's 10% markup: 100,000 input x
        // $3.30/M = $0.33, 409,600 output x $16.50/M = $6.7584; $7.0884 in all.
        let e = struere().estimate("a", &shape("claude-sonnet-4-5"), Utc::now()).unwrap();
        assert_eq!(e, Estimate::Priced { units: 708_840_000, priced_model: "claude-sonnet-4-5".into() });
    }

    #[test]
    fn bad_shapes_are_refused_with_the_reason() {
        let c = struere();
        let err = |s: CallShape| c.estimate("a", &s, Utc::now()).unwrap_err();
        assert!(err(CallShape { iterations: 0, ..shape("x") }).contains("iterations"));
        assert!(err(CallShape { input_tokens: -1, ..shape("x") }).contains("negative"));
        assert!(err(CallShape { output_tokens: COUNT_MAX, ..shape("x") }).contains("above"));
        assert!(!err(CallShape { modality: Some("telepathy".into()), ..shape("x") }).is_empty());
    }

    #[test]
    fn unknown_models_are_unpriced_without_a_default_and_free_calls_hold_nothing() {
        let text = "[catalog]\nname = \"t\"\n[catalog.providers.p]\n[catalog.providers.ollama]\nlocal = true\n\
                    [[catalog.models]]\nid = \"m\"\nprovider = \"p\"\n[[catalog.models.prices]]\n\
                    input_per_1m_tokens = \"1\"\n";
        let c = Catalog::from_toml_str(text, "t").unwrap();
        let s = |provider: &str, model: &str| CallShape {
            provider: provider.into(),
            model: model.into(),
            input_tokens: 1_000_000,
            iterations: 2,
            ..CallShape::default()
        };
        assert_eq!(c.estimate("a", &s("p", "nope"), Utc::now()), Ok(Estimate::Unpriced));
        assert_eq!(
            c.estimate("a", &s("p", "m"), Utc::now()),
            Ok(Estimate::Priced { units: 200_000_000, priced_model: "m".into() })
        );
        assert_eq!(
            c.estimate("a", &s("ollama", "llama3"), Utc::now()),
            Ok(Estimate::Free(ChargeReason::LocalModel))
        );
    }
}
