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
use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::sync::{Arc, Mutex, mpsc};

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

/// Lines handed to a worker at once, and their bytes at most (a chunk ends at a line end).
const CHUNK_LINES_MAX: usize = 4096;
const CHUNK_BYTES_MAX: usize = 1 << 20;

/// Consecutive input lines, priced by one worker; `seq` orders the output.
struct Chunk {
    seq: u64,
    /// Number of the chunk's first line (from 1).
    first_line: u64,
    data: Vec<u8>,
    /// Each line: its byte range in `data` (terminator removed), or why it was refused.
    lines: Vec<Result<(usize, usize), String>>,
}

/// A priced chunk: its output lines and counts.
struct Done {
    seq: u64,
    out: Vec<u8>,
    summary: PriceSummary,
}

/// Price every JSON line of `input`, writing one JSON line per event to `output`, in
/// input order. Only I/O errors stop it; a bad line is an error line and pricing goes on.
///
/// Lines are read here in chunks and priced by `workers` threads (parsing the
/// JSON dominates: the price itself is ~1/10 of a line's cost); at most two chunks per
/// worker are in flight, so memory stays bounded whatever the input size.
pub fn price_lines(
    catalog: &Catalog,
    mut input: impl BufRead,
    mut output: impl Write,
    workers: usize,
) -> io::Result<PriceSummary> {
    assert!(workers > 0, "at least one pricing thread");
    let in_flight_max = 2 * workers as u64;
    std::thread::scope(|scope| {
        let (job_tx, job_rx) = mpsc::sync_channel::<Chunk>(workers);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let (done_tx, done_rx) = mpsc::channel::<Done>();
        for _ in 0..workers {
            let (jobs, done) = (job_rx.clone(), done_tx.clone());
            scope.spawn(move || {
                loop {
                    // The lock is held only while taking a chunk, never while pricing it.
                    let next = jobs.lock().map_err(|_| ()).and_then(|rx| rx.recv().map_err(|_| ()));
                    let Ok(chunk) = next else { return };
                    if done.send(price_chunk(catalog, chunk)).is_err() {
                        return;
                    }
                }
            });
        }
        drop(done_tx);
        let mut writer = InOrder { next: 0, waiting: BTreeMap::new(), summary: PriceSummary::default() };
        let mut sent: u64 = 0;
        let mut next_line: u64 = 1;
        let read_all = (|| -> io::Result<()> {
            while let Some(chunk) = read_chunk(&mut input, sent, &mut next_line)? {
                while sent - writer.next >= in_flight_max {
                    writer.take(done_rx.recv().map_err(|_| workers_gone())?, &mut output)?;
                }
                job_tx.send(chunk).map_err(|_| workers_gone())?;
                sent += 1;
                while let Ok(done) = done_rx.try_recv() {
                    writer.take(done, &mut output)?;
                }
            }
            Ok(())
        })();
        // Workers stop once the queue is closed and empty.
        drop(job_tx);
        read_all?;
        while writer.next < sent {
            writer.take(done_rx.recv().map_err(|_| workers_gone())?, &mut output)?;
        }
        output.flush()?;
        Ok(writer.summary)
    })
}

/// One pricing thread per core (at most 8).
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8)
}

fn workers_gone() -> io::Error {
    io::Error::other("a pricing worker stopped")
}

/// Writes finished chunks in input order.
struct InOrder {
    next: u64,
    waiting: BTreeMap<u64, Done>,
    summary: PriceSummary,
}

impl InOrder {
    fn take(&mut self, done: Done, output: &mut impl Write) -> io::Result<()> {
        self.waiting.insert(done.seq, done);
        while let Some(done) = self.waiting.remove(&self.next) {
            output.write_all(&done.out)?;
            self.summary.priced += done.summary.priced;
            self.summary.errors += done.summary.errors;
            self.next += 1;
        }
        Ok(())
    }
}

/// Up to [`CHUNK_LINES_MAX`] lines or [`CHUNK_BYTES_MAX`] bytes; `None` at the end.
/// A line longer than [`LINE_BYTES_MAX`] is skipped and reported, never held whole.
fn read_chunk(input: &mut impl BufRead, seq: u64, next_line: &mut u64) -> io::Result<Option<Chunk>> {
    let mut chunk = Chunk { seq, first_line: *next_line, data: Vec::new(), lines: Vec::new() };
    while chunk.lines.len() < CHUNK_LINES_MAX && chunk.data.len() < CHUNK_BYTES_MAX {
        let start = chunk.data.len();
        let limit = LINE_BYTES_MAX as u64 + 1;
        if io::Read::take(&mut *input, limit).read_until(b'\n', &mut chunk.data)? == 0 {
            break;
        }
        *next_line += 1;
        if chunk.data.last() != Some(&b'\n') && chunk.data.len() - start > LINE_BYTES_MAX {
            chunk.data.truncate(start);
            input.skip_until(b'\n')?;
            chunk.lines.push(Err(format!("line longer than {LINE_BYTES_MAX} bytes")));
            continue;
        }
        let mut end = chunk.data.len();
        while end > start && matches!(chunk.data[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        chunk.lines.push(Ok((start, end)));
    }
    Ok(if chunk.lines.is_empty() { None } else { Some(chunk) })
}

fn price_chunk(catalog: &Catalog, chunk: Chunk) -> Done {
    let mut out = Vec::with_capacity(chunk.lines.len() * 256);
    let mut summary = PriceSummary::default();
    for (i, line) in chunk.lines.iter().enumerate() {
        let line_number = chunk.first_line + i as u64;
        let text = match line {
            Err(problem) => Err(problem.clone()),
            Ok((start, end)) => {
                std::str::from_utf8(&chunk.data[*start..*end]).map_err(|e| format!("not UTF-8: {e}"))
            }
        };
        let result = match text {
            Ok(text) if text.trim().is_empty() => continue,
            Ok(text) => parse_json_line(text).map_err(|e| e.to_string()),
            Err(problem) => Err(problem),
        };
        match result {
            Ok(event) => {
                write_charge(&mut out, &event.event_id, &catalog.price(&event));
                summary.priced += 1;
            }
            Err(problem) => {
                write_error(&mut out, line_number, &problem);
                summary.errors += 1;
            }
        }
    }
    Done { seq: chunk.seq, out, summary }
}

fn write_charge(output: &mut Vec<u8>, event_id: &str, charge: &Charge) {
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
    serde_json::to_writer(&mut *output, &line).expect("writing to memory");
    output.push(b'\n');
}

fn write_error(output: &mut Vec<u8>, line: u64, error: &str) {
    serde_json::to_writer(&mut *output, &ErrorLine { line, error }).expect("writing to memory");
    output.push(b'\n');
}
