//! The `generator` source: deterministic synthetic events for tests, demos and benchmarks.
//! Subtask `i` of `p` produces rows `seq = i, i + p, i + 2p, …`; every column is a pure function of
//! (`seed`, `seq`), so any run — and any reference computed in a test — sees the same events.
//! Its checkpointed position is the next `seq`; a restore needs the same parallelism.

use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::GeneratorOptions;
use eddy_jobs::Value;
use tokio::time::Instant;

use super::Source;
use crate::batch::Batch;
use crate::error::{Result, TaskError};
use crate::operators::{OperatorSnapshot, RestoredState};

const BATCH_ROWS: u64 = 1024;

/// The generator source.
pub struct Generator {
    options: GeneratorOptions,
    next_seq: u64,
    step: u64,
    produced: u64,
    started: Option<Instant>,
    /// Rows per second of this subtask, if throttled.
    rate: Option<f64>,
}

impl Generator {
    /// Subtask `subtask` of `parallelism`.
    pub fn new(options: GeneratorOptions, subtask: u32, parallelism: u32) -> Generator {
        let rate = options.rate.map(|r| r as f64 / parallelism as f64);
        Generator { options, next_seq: subtask as u64, step: parallelism as u64, produced: 0, started: None, rate }
    }

    /// Continues where this subtask's entry in a checkpoint left off.
    pub fn restored(mut self, states: &[RestoredState]) -> Result<Generator> {
        for RestoredState { inline: state, .. } in states {
            let (Some(subtask), Some(step), Some(next)) = (word(state, 0), word(state, 1), word(state, 2)) else {
                return Err(TaskError::internal("generator: corrupt checkpoint state"));
            };
            if step != self.step {
                return Err(TaskError::user(format!(
                    "the generator ran with parallelism {step} when the checkpoint was taken; give its [[source]] that \
                     parallelism explicitly to restore it with another job parallelism"
                )));
            }
            if subtask == self.next_seq % self.step {
                self.next_seq = next;
            }
        }
        Ok(self)
    }
}

fn word(state: &[u8], i: usize) -> Option<u64> {
    Some(u64::from_le_bytes(state.get(i * 8..i * 8 + 8)?.try_into().ok()?))
}

/// splitmix64: a good 64-bit mix of (seed, seq, column).
fn draw(seed: u64, seq: u64, column: u64) -> u64 {
    let mut z = seed
        .wrapping_add(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15))
        .wrapping_add(column.wrapping_mul(0xD1B5_4A32_D192_ED03));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The row with sequence number `seq`, exactly as the generator produces it (tests use this too).
pub fn row(o: &GeneratorOptions, seq: u64) -> Vec<Value> {
    let k = 1 + draw(o.seed, seq, 1) % o.keys;
    let score = (draw(o.seed, seq, 2) % 101) as f64;
    let shift = if o.disorder_ms > 0 { (draw(o.seed, seq, 3) % (o.disorder_ms + 1)) as i64 } else { 0 };
    let ts = o.start_ms + (seq / o.events_per_ms) as i64 - shift;
    vec![Value::Int(seq as i64), Value::Int(k as i64), Value::Float(score), Value::Timestamp(ts)]
}

#[async_trait]
impl Source for Generator {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let limit = self.options.count.unwrap_or(u64::MAX);
        if self.next_seq >= limit {
            return Ok(None);
        }
        let mut n = BATCH_ROWS;
        if let Some(rate) = self.rate {
            let started = *self.started.get_or_insert_with(Instant::now);
            // Small batches at low rates keep latency down; the sleep is cancel-safe.
            n = n.min((rate / 100.0).ceil().max(1.0) as u64);
            let due = started + Duration::from_secs_f64(self.produced as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let mut batch = Batch::with_capacity(n as usize);
        while batch.len() < n as usize && self.next_seq < limit {
            batch.push(row(&self.options, self.next_seq), crate::batch::Op::Insert);
            self.next_seq += self.step;
        }
        self.produced += batch.len() as u64;
        Ok(Some(batch))
    }

    async fn snapshot(&mut self, _id: u64, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        let subtask = self.next_seq % self.step;
        Ok(OperatorSnapshot::inline([subtask, self.step, self.next_seq].iter().flat_map(|w| w.to_le_bytes()).collect()))
    }
}
