//! The `generator` source: deterministic synthetic events for tests, demos and benchmarks.
//! Every column is a pure function of (`seed`, `seq`), so any run — and any reference computed in
//! a test — sees the same events.
//!
//! The sequence is cut into lanes: a lane is `next, next + stride, next + 2·stride, …`. A first
//! run of parallelism `p` has lanes `i` (stride `p`), one per subtask. A checkpoint stores each
//! subtask's lanes; a restore at another parallelism (`eddy rescale`) gathers every lane, splits
//! lanes while there are fewer than subtasks (stride `s` into `k` lanes of stride `k·s`), and deals
//! them out in a fixed order, so every `seq` is still produced exactly once. A subtask with several
//! lanes always takes the lowest `next`, so its rows come in `seq` order, and its share of `rate` is
//! the share of the sequence its lanes hold.

use std::time::Duration;

use async_trait::async_trait;
use eddy_jobs::connectors::GeneratorOptions;
use eddy_jobs::Value;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::batch::Batch;
use crate::error::{Result, TaskError};
use crate::operator::{InlineState, OperatorSnapshot, RestoredState, Source, Stage};

const BATCH_ROWS: u64 = 1024;
/// First word of an unversioned checkpoint state in the lane format (older ones hold `subtask, step, next`).
const LANES_FORMAT: u64 = u64::MAX;

/// Part of the sequence: `next`, `next + stride`, ….
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Lane {
    next: u64,
    stride: u64,
}

/// The generator source.
pub struct Generator {
    options: GeneratorOptions,
    subtask: u32,
    parallelism: u32,
    lanes: Vec<Lane>,
    produced: u64,
    started: Option<Instant>,
}

impl Generator {
    /// Subtask `subtask` of `parallelism`, from the start.
    pub fn new(options: GeneratorOptions, subtask: u32, parallelism: u32) -> Generator {
        let lanes = vec![Lane { next: subtask as u64, stride: parallelism.max(1) as u64 }];
        Generator { options, subtask, parallelism: parallelism.max(1), lanes, produced: 0, started: None }
    }

    /// Continues from a checkpoint: this subtask's share of every lane the checkpoint holds.
    pub fn restored(mut self, states: &[RestoredState]) -> Result<Generator> {
        let mut lanes = Vec::new();
        for state in states {
            let Lanes(restored) =
                state.read(|old| Ok(decode(old).map(Lanes)))?.ok_or_else(|| TaskError::internal("generator: corrupt checkpoint state"))?;
            lanes.extend(restored.into_iter().map(|l| Lane { stride: l.stride.max(1), ..l }));
        }
        if lanes.is_empty() {
            return Ok(self);
        }
        let limit = self.options.count.unwrap_or(u64::MAX);
        lanes.sort_unstable();
        // Split lanes until every subtask can have one (an exhausted lane needs no subtask).
        let live = lanes.iter().filter(|l| l.next < limit).count().max(1);
        let split = (self.parallelism as usize).div_ceil(live) as u64;
        if split > 1 {
            lanes = lanes
                .iter()
                .filter(|l| l.next < limit)
                .flat_map(|l| (0..split).map(move |m| Lane { next: l.next + m * l.stride, stride: l.stride * split }))
                .collect();
            lanes.sort_unstable();
        }
        self.lanes = lanes.into_iter().skip(self.subtask as usize).step_by(self.parallelism as usize).collect();
        Ok(self)
    }

    /// Rows per second of this subtask, if throttled: its share of the rate, the share of the
    /// sequence its lanes hold.
    fn rate(&self) -> Option<f64> {
        let share: f64 = self.lanes.iter().map(|l| 1.0 / l.stride as f64).sum();
        self.options.rate.map(|r| r as f64 * share)
    }
}

/// A generator's inline state: its lanes.
#[derive(Serialize, Deserialize)]
struct Lanes(Vec<Lane>);

impl InlineState for Lanes {
    const HOLDER: &'static str = "generator";
    const VERSION: u8 = 1;
}

/// The lanes of a checkpoint state from before versioned state, in either of its formats.
fn decode(state: &[u8]) -> Option<Vec<Lane>> {
    let words: Vec<u64> = state.chunks(8).map(|c| c.try_into().ok().map(u64::from_le_bytes)).collect::<Option<_>>()?;
    match words.as_slice() {
        [LANES_FORMAT, pairs @ ..] if pairs.len() % 2 == 0 => {
            Some(pairs.chunks(2).map(|p| Lane { next: p[0], stride: p[1].max(1) }).collect())
        }
        [_subtask, step, next] => Some(vec![Lane { next: *next, stride: (*step).max(1) }]),
        _ => None,
    }
}

/// splitmix64: a good 64-bit mix of (seed, seq, column).
fn draw(seed: u64, seq: u64, column: u64) -> u64 {
    let mut z = seed.wrapping_add(seq.wrapping_mul(0x9E37_79B9_7F4A_7C15)).wrapping_add(column.wrapping_mul(0xD1B5_4A32_D192_ED03));
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
impl Stage for Generator {
    async fn snapshot(&mut self, _id: u64, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::state(&Lanes(self.lanes.clone())))
    }
}

#[async_trait]
impl Source for Generator {
    async fn next_batch(&mut self) -> Result<Option<Batch>> {
        let limit = self.options.count.unwrap_or(u64::MAX);
        if self.lanes.iter().all(|l| l.next >= limit) {
            return Ok(None);
        }
        let mut n = BATCH_ROWS;
        if let Some(rate) = self.rate() {
            let started = *self.started.get_or_insert_with(Instant::now);
            // Small batches at low rates keep latency down; the sleep is cancel-safe.
            n = n.min((rate / 100.0).ceil().max(1.0) as u64);
            let due = started + Duration::from_secs_f64(self.produced as f64 / rate);
            tokio::time::sleep_until(due).await;
        }
        let mut batch = Batch::with_capacity(n as usize);
        if let [lane] = self.lanes.as_mut_slice() {
            // One lane (no rescale since the start): no choosing between lanes per row.
            while batch.len() < n as usize && lane.next < limit {
                batch.push(row(&self.options, lane.next), crate::batch::Op::Insert);
                lane.next = lane.next.saturating_add(lane.stride);
            }
        }
        while batch.len() < n as usize {
            let Some(lane) = self.lanes.iter_mut().filter(|l| l.next < limit).min_by_key(|l| l.next) else { break };
            batch.push(row(&self.options, lane.next), crate::batch::Op::Insert);
            lane.next = lane.next.saturating_add(lane.stride);
        }
        self.produced += batch.len() as u64;
        Ok(Some(batch))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn options(count: u64) -> GeneratorOptions {
        serde_json::from_value(serde_json::json!({ "count": count, "keys": 10 })).unwrap()
    }

    /// Runs every subtask for `batches` batches (all if `None`); returns the seqs and the states.
    async fn run(subtasks: Vec<Generator>, batches: Option<usize>) -> (Vec<u64>, Vec<RestoredState>) {
        let mut seqs = Vec::new();
        let mut states = Vec::new();
        for mut g in subtasks {
            let mut taken = 0;
            while batches.is_none_or(|b| taken < b) {
                let Some(batch) = g.next_batch().await.unwrap() else { break };
                let mut last = None;
                for row in &batch.rows {
                    let Value::Int(seq) = row[0] else { panic!() };
                    assert!(last.is_none_or(|l| seq as u64 > l), "rows in seq order");
                    last = Some(seq as u64);
                    seqs.push(seq as u64);
                }
                taken += 1;
            }
            let state = g.snapshot(0, std::path::Path::new("/nonexistent")).await.unwrap();
            states.push(RestoredState { inline: state.inline, files: None });
        }
        (seqs, states)
    }

    #[tokio::test]
    async fn rescaled_generators_produce_every_seq_once() {
        let o = options(50_000);
        // Parallelism 1, then 3 (lanes split), then 2, then 5, to the end.
        let (mut all, states) = run(vec![Generator::new(o.clone(), 0, 1)], Some(3)).await;
        let mut states = states;
        for (p, batches) in [(3u32, Some(2)), (2, Some(5)), (5, None)] {
            let subtasks = (0..p).map(|i| Generator::new(o.clone(), i, p).restored(&states).unwrap()).collect();
            let (seqs, next) = run(subtasks, batches).await;
            all.extend(seqs);
            states = next;
        }
        let distinct: BTreeSet<u64> = all.iter().copied().collect();
        assert_eq!(distinct.len(), all.len(), "a seq came twice");
        assert_eq!(distinct, (0..50_000).collect::<BTreeSet<u64>>());
    }

    #[test]
    fn states_of_the_old_format_still_restore() {
        let old: Vec<u8> = [1u64, 2, 4097].iter().flat_map(|w| w.to_le_bytes()).collect();
        assert_eq!(decode(&old), Some(vec![Lane { next: 4097, stride: 2 }]));
        assert_eq!(decode(&[1, 2, 3]), None);
    }
}
