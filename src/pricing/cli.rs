//! `tally price --config FILE`: JSON lines in, one JSON line out per event.
//!
//! Output per event: `event_id`, `cost` (USD, exact decimal string with 8 places),
//! `cost_units`, `charged`, `reason`, `priced_model`, `model_fallback`,
//! `catalog_cost_units`, `upstream_cost_units`. A line that is not a valid event gives
//! `{"line": N, "error": "..."}` (N counts from 1) and the rest are still priced. Blank
//! lines are skipped without output.

use super::{Catalog, Charge};
use crate::event::parse_json_line;
use crate::money;
use serde::Serialize;
use std::io::{self, BufRead, Write};

/// Longest input line accepted. A usage event is well under 4 KiB; the cap keeps one
/// runaway line from taking all memory. Longer lines are reported and skipped.
pub const LINE_BYTES_MAX: usize = 1 << 20;

/// What [`price_lines`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PriceSummary {
    /// Events priced (charged or not).
    pub priced: u64,
    /// Lines that were not valid events.
    pub errors: u64,
}

#[derive(Serialize)]
struct PricedLine<'a> {
    event_id: &'a str,
    cost: String,
    cost_units: i64,
    charged: bool,
    reason: &'static str,
    priced_model: &'a str,
    model_fallback: bool,
    catalog_cost_units: i64,
    upstream_cost_units: i64,
}

#[derive(Serialize)]
struct ErrorLine<'a> {
    line: u64,
    error: &'a str,
}

enum Line {
    End,
    Text(String),
    Invalid(String),
}

/// Price every JSON line of `input`, writing one JSON line per event to `output`.
/// Only I/O errors stop it; a bad line is an error line and pricing continues.
pub fn price_lines(
    catalog: &Catalog,
    mut input: impl BufRead,
    mut output: impl Write,
) -> io::Result<PriceSummary> {
    let mut summary = PriceSummary::default();
    let mut buf = Vec::with_capacity(4096);
    let mut line_number: u64 = 0;
    loop {
        line_number += 1;
        let text = match read_line(&mut input, &mut buf)? {
            Line::End => break,
            Line::Invalid(problem) => {
                write_error(&mut output, line_number, &problem)?;
                summary.errors += 1;
                continue;
            }
            Line::Text(text) => text,
        };
        if text.trim().is_empty() {
            continue;
        }
        match parse_json_line(&text) {
            Ok(event) => {
                write_charge(&mut output, &event.event_id, &catalog.price(&event))?;
                summary.priced += 1;
            }
            Err(e) => {
                write_error(&mut output, line_number, &e.to_string())?;
                summary.errors += 1;
            }
        }
    }
    output.flush()?;
    Ok(summary)
}

/// One line without its terminator, capped at [`LINE_BYTES_MAX`].
fn read_line(input: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Line> {
    buf.clear();
    let limit = LINE_BYTES_MAX as u64 + 1;
    if io::Read::take(&mut *input, limit).read_until(b'\n', buf)? == 0 {
        return Ok(Line::End);
    }
    if buf.last() != Some(&b'\n') && buf.len() > LINE_BYTES_MAX {
        input.skip_until(b'\n')?;
        return Ok(Line::Invalid(format!("line longer than {LINE_BYTES_MAX} bytes")));
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    match String::from_utf8(std::mem::take(buf)) {
        Ok(text) => Ok(Line::Text(text)),
        Err(e) => Ok(Line::Invalid(format!("not UTF-8: {}", e.utf8_error()))),
    }
}

fn write_charge(output: &mut impl Write, event_id: &str, charge: &Charge) -> io::Result<()> {
    let line = PricedLine {
        event_id,
        cost: money::units_to_usd_string(charge.cost_units),
        cost_units: charge.cost_units,
        charged: charge.charged,
        reason: charge.reason.as_str(),
        priced_model: &charge.priced_model,
        model_fallback: charge.model_fallback,
        catalog_cost_units: charge.catalog_cost_units,
        upstream_cost_units: charge.upstream_cost_units,
    };
    serde_json::to_writer(&mut *output, &line)?;
    output.write_all(b"\n")
}

fn write_error(output: &mut impl Write, line: u64, error: &str) -> io::Result<()> {
    serde_json::to_writer(&mut *output, &ErrorLine { line, error })?;
    output.write_all(b"\n")
}
