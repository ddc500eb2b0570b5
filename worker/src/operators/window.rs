//! Keyed TUMBLE and HOP windows on event time, computed on slices.
//!
//! Time is cut into slices of `gcd(size, slide)`; a record updates the accumulators of its key in
//! the one slice that holds its timestamp, whatever the number of windows it belongs to (120 for
//! HOP 10 min / 5 s). When the watermark passes a window's end, the window's result per key is the
//! merge of its `size / slice` slices. A slice is dropped once no open window needs it.
//!
//! A window's result is computed when the watermark passes its end, from the records that arrived
//! before. A record whose first windows have fired still counts for the later windows that hold it
//! (so an update of a recent event corrects the leaderboard from the next window on). A record is
//! late only when the last window holding it has fired; it is then counted and sent to the late
//! output, untouched.
//!
//! A row an aggregate's argument fails on (an overflow, a bad CAST) follows the stage's
//! `bad_records`: dropped or dead-lettered before it touches any accumulator, so its retraction,
//! which fails the same way, subtracts nothing either; or the job fails.
//!
//! SUM, COUNT and AVG accept retractions (subtracting); MIN and MAX do not, and fail the task if
//! they see one, since the planner rules that out for updating inputs.
//!
//! Firing: with SUM, COUNT and AVG only, the operator keeps per key a running aggregate, the merge
//! of the key's slices that the next window shares with the last one fired. A window's result is
//! that plus the slices it adds; the slices it then leaves behind are subtracted. Firing thus reads
//! two slices per key whatever size/slide is (the state backend may be RocksDB: 120 reads per key
//! and window were the cost that mattered), and a record only touches the running aggregate when
//! it lands in a slice already folded into it. The running aggregates are derived data: they are
//! not checkpointed but rebuilt by one scan after a restore. MIN and MAX cannot be subtracted, and
//! beyond [`MAX_RUNNING_KEYS`] keys their memory is not spent: windows are then merged from all
//! their slices. Float sums computed either way may differ in the last bits.
//!
//! State: the accumulators live in a [`WindowState`] (memory or RocksDB, from the job's spec), each
//! entry tagged with its key's key group. A checkpoint holds the state backend's snapshot files and,
//! inline, the operator's own scalars (watermark, end of the last window fired, late count). On a
//! restore after rescaling, a subtask restores the entries of its key groups from every earlier
//! subtask's snapshot and takes the smallest watermark and last window fired among them: firing a
//! window again is harmless (sinks overwrite by window end), skipping one is not. With aligned
//! barriers every subtask has seen the same watermarks when it snapshots, so these agree anyway;
//! were they to differ, a window re-fired for keys whose subtask had already dropped its oldest
//! slices would carry a partial result.

use std::cell::Cell;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use eddy_jobs::plan::{AggFunc, StateBackend, WindowPlan};
use eddy_jobs::{DataType, Value};

use crate::batch::{Batch, Op};
use crate::codec::encode_value;
use crate::error::{Result, TaskError};
use crate::keys::{hash_key, key_group};
use crate::operator::{
    future_horizon_ms, set_aside, BadRows, Collector, InlineState, Operator, OperatorContext, OperatorSnapshot, Stage, TaskMetrics,
};
use crate::state::{Acc, Accs, WindowState};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

/// What a window checkpoints inline (its keyed state is in the state backend's files).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Progressed {
    watermark: i64,
    last_fired: i64,
    /// Rows found late.
    late: u64,
}

impl InlineState for Progressed {
    const HOLDER: &'static str = "window";
    const VERSION: u8 = 1;
}

/// First byte of the inline state before versioned state (then watermark, last fired and late
/// count as little-endian words).
const UNVERSIONED_TAG: u8 = 1;

/// Keys up to which the operator keeps running aggregates (about 100 bytes each, so some 20 MB);
/// above it, windows are merged from their slices.
pub const MAX_RUNNING_KEYS: usize = 200_000;

/// A key's running aggregate (see the module docs).
#[derive(Debug)]
struct Running {
    key_group: u32,
    /// Merge of the key's slices ending in `(last_fired + slide − size, last_fired]`.
    accs: Accs,
    /// The latest slice end the key has had: the key is forgotten once that slice is dropped.
    last_slice: i64,
}

/// Where running aggregates stand.
#[derive(Debug)]
enum RunningState {
    /// Kept for every key that has slices.
    Kept(FxHashMap<Box<[u8]>, Running>),
    /// To be rebuilt from the state by a scan before the next firing (after a restore).
    Stale,
    /// Not kept (MIN or MAX, or too many keys): windows are merged from all their slices.
    Off,
}

/// The window operator.
pub struct Window {
    plan: WindowPlan,
    slice_ms: i64,
    max_parallelism: u32,
    state: Box<dyn WindowState>,
    watermark: i64,
    /// End of the last window fired.
    last_fired: i64,
    late: u64,
    key_buf: Vec<u8>,
    /// Empty accumulators, cloned for each new (key, slice).
    empty: Accs,
    running: RunningState,
    /// A row's aggregate inputs, when they also go into a running aggregate.
    inputs: Vec<Value>,
    /// The current row's aggregate arguments.
    args: Vec<Value>,
    /// What happens to rows an aggregate's argument fails on (without: the task fails).
    bad_rows: Option<BadRows>,
    /// The task's figures: rows found late are counted there.
    metrics: Arc<TaskMetrics>,
}

impl Window {
    /// A window operator over `state`, which is empty or restored; keys are placed in key groups
    /// of `max_parallelism`.
    pub fn new(plan: WindowPlan, max_parallelism: u32, state: Box<dyn WindowState>) -> Window {
        let slice_ms = plan.slice_ms();
        let empty = empty_accs(&plan);
        let invertible = plan.aggregates.iter().all(|a| !matches!(a.func, AggFunc::Min | AggFunc::Max));
        // An empty state has no keys yet; a restored one is scanned before the first firing.
        let running = match (invertible, state.is_empty()) {
            (false, _) => RunningState::Off,
            (true, true) => RunningState::Kept(FxHashMap::default()),
            (true, false) => RunningState::Stale,
        };
        Window {
            plan,
            slice_ms,
            max_parallelism,
            state,
            watermark: i64::MIN,
            last_fired: i64::MIN,
            late: 0,
            key_buf: Vec::new(),
            empty,
            running,
            inputs: Vec::new(),
            args: Vec::new(),
            bad_rows: None,
            metrics: Arc::default(),
        }
    }

    /// Rows found late so far (restored ones included).
    pub fn late_records(&self) -> u64 {
        self.late
    }

    /// Rows an aggregate's argument fails on follow the stage's `bad_records` policy.
    pub fn with_bad_rows(mut self, bad_rows: BadRows) -> Window {
        self.bad_rows = Some(bad_rows);
        self
    }

    /// A window operator on the job's state backend (files under `ctx.state_dir`), restored from
    /// the earlier subtasks' snapshots in `ctx.restore`, keeping the key groups of
    /// `ctx.key_groups`.
    pub fn open(plan: WindowPlan, max_parallelism: u32, backend: StateBackend, ctx: OperatorContext) -> Result<Window> {
        let mut state = crate::state::open(backend, &ctx.state_dir)?;
        let mut scalars: Option<Progressed> = None;
        for restored in &ctx.restore {
            if let Some(files) = &restored.files {
                state.restore(files, ctx.key_groups.clone())?;
            }
            if let Some(p) = restored.read(unversioned)? {
                scalars = Some(match scalars {
                    None => p,
                    Some(q) => Progressed {
                        watermark: q.watermark.min(p.watermark),
                        last_fired: q.last_fired.min(p.last_fired),
                        late: q.late + p.late,
                    },
                });
            }
        }
        let mut window = Window::new(plan, max_parallelism, state);
        if let Some(p) = scalars {
            window.watermark = p.watermark;
            window.last_fired = p.last_fired;
            window.late = p.late;
        }
        // The task's late count goes on from what the restored subtasks had counted.
        ctx.metrics.late_records.fetch_add(window.late, Ordering::Relaxed);
        window.metrics = ctx.metrics;
        Ok(window)
    }

    /// Snapshots the state into `scratch/state` (see [`Stage::snapshot`]).
    pub fn checkpoint(&mut self, scratch: &Path) -> Result<OperatorSnapshot> {
        let dir = scratch.join("state");
        self.state.snapshot(&dir)?;
        let progressed = Progressed { watermark: self.watermark, last_fired: self.last_fired, late: self.late };
        Ok(OperatorSnapshot::state(&progressed).with_files(Some(dir)))
    }

    /// Emits the result of the window ending at `end` for every key with rows in it.
    fn fire(&mut self, end: i64, out: &mut Collector) -> Result<()> {
        if matches!(self.running, RunningState::Stale) {
            self.rebuild_running()?;
        }
        let mut batch = Batch::default();
        if matches!(self.running, RunningState::Kept(_)) {
            self.fire_running(end, &mut batch)?;
        } else {
            self.fire_merging(end, &mut batch)?;
        }
        if !batch.is_empty() {
            out.main.push(batch);
        }
        Ok(())
    }

    /// Fires by merging every slice of the window, per key.
    fn fire_merging(&mut self, end: i64, batch: &mut Batch) -> Result<()> {
        let plan = &self.plan;
        let mut result = Ok(());
        self.state.for_each_key(end - plan.size_ms, end, &mut |_, key, slices| {
            let Some((_, first)) = slices.next() else { return };
            let mut merged = first.clone();
            for (_, a) in slices {
                merge(&mut merged, a, 1);
            }
            if merged.rows > 0 && result.is_ok() {
                result = emit(plan, key, end, &merged, batch);
            }
        })?;
        result
    }

    /// Fires from the running aggregates: adds the slices the window has beyond the last one
    /// fired, emits, then subtracts the slices the next window no longer holds.
    fn fire_running(&mut self, end: i64, batch: &mut Batch) -> Result<()> {
        let RunningState::Kept(mut running) = std::mem::replace(&mut self.running, RunningState::Off) else {
            return Ok(());
        };
        let (size, slide, slice) = (self.plan.size_ms, self.plan.slide_ms, self.slice_ms);
        let fired = self.last_fired;
        // The running aggregates hold slices in (fired + slide − size, fired]: the window's first
        // size − slide, unless more than a slide passed since the last firing (or none was fired),
        // which leaves nothing of them in this window.
        let reset = fired == i64::MIN || end - size >= fired;
        let next_from = end + slide - size;
        let mut result = Ok(());
        running.retain(|key, r| {
            if result.is_err() {
                return true;
            }
            let (state, group, accs) = (&mut *self.state, r.key_group, &mut r.accs);
            let step = (|| -> Result<()> {
                if reset {
                    *accs = self.empty.clone();
                } else {
                    apply_slices(state, group, key, fired + slide - size, end - size, slice, accs, -1)?;
                }
                apply_slices(state, group, key, fired.max(end - size), end, slice, accs, 1)?;
                if accs.rows > 0 {
                    emit(&self.plan, key, end, accs, batch)?;
                }
                // Not reset when no rows are left: a retraction without its insert (whose insert
                // came late, say) still counts until its slice leaves.
                apply_slices(state, group, key, end - size, next_from, slice, accs, -1)
            })();
            match step {
                // Slices through next_from are dropped after this firing: forget keys with no others.
                Ok(()) => r.last_slice > next_from,
                Err(e) => {
                    result = Err(e);
                    true
                }
            }
        });
        self.running = RunningState::Kept(running);
        result
    }

    /// Adds a batch's rows to their slices; late rows go to `out.late`.
    pub fn process(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        let mut late = Batch::default();
        let horizon = future_horizon_ms();
        for (row, op) in batch.rows.into_iter().zip(batch.ops) {
            // A row without event time belongs to no window, and one beyond the wall clock's horizon
            // has a bogus time: both are kept out of the state, counted as late and kept visible.
            let slice_end = match row[self.plan.time_column] {
                Value::Timestamp(ts) if ts <= horizon => Some(slice_end(ts, self.slice_ms)),
                _ => None,
            };
            let Some(slice_end) = slice_end.filter(|&s| self.last_window_end(s).saturating_sub(1) > self.watermark) else {
                late.push(row, op);
                continue;
            };
            // The arguments first: a row one fails on changes nothing, whatever its op.
            self.args.clear();
            let evaluated = self.plan.aggregates.iter().try_for_each(|agg| -> std::result::Result<(), String> {
                let arg = agg.arg.as_ref().map_or(Ok(Value::Int(1)), |e| e.eval(&row));
                self.args.push(arg.map_err(|e| format!("aggregate `{}` failed on a row: {e}", agg.name))?);
                Ok(())
            });
            if let Err(error) = evaluated {
                set_aside(&mut self.bad_rows, &row, error)?;
                continue;
            }
            self.key_buf.clear();
            for &k in &self.plan.key {
                encode_value(&row[k], &mut self.key_buf);
            }
            let group = key_group(hash_key(&row, &self.plan.key), self.max_parallelism);
            let empty = &self.empty;
            let created = Cell::new(false);
            let init = || {
                created.set(true);
                empty.clone()
            };
            let accs = self.state.accumulators(group, &self.key_buf, slice_end, &init)?;
            let sign = if op == Op::Insert { 1 } else { -1 };
            // A slice already folded into the key's running aggregate: the row goes there too.
            let folded = slice_end <= self.last_fired && matches!(self.running, RunningState::Kept(_));
            accs.rows += sign;
            for ((acc, agg), v) in accs.values.iter_mut().zip(&self.plan.aggregates).zip(&self.args) {
                update(acc, v, sign).map_err(|m| TaskError::user(format!("aggregate `{}`: {m}", agg.name)))?;
            }
            if folded {
                self.inputs.extend(self.args.iter().cloned());
            }
            if created.get() || folded {
                self.track(group, slice_end, folded.then_some(sign))?;
            }
        }
        if !late.is_empty() {
            self.late += late.len() as u64;
            self.metrics.late_records.fetch_add(late.len() as u64, Ordering::Relaxed);
            out.late.push(late);
        }
        Ok(())
    }

    /// Keeps the running aggregate of the key in `key_buf` (key group `key_group`) up to date
    /// after a row landed in its slice ending at `slice_end`: a new slice may extend the key's
    /// life; with `sign`, the row (its inputs in `inputs`) is also added to the running aggregate.
    fn track(&mut self, key_group: u32, slice_end: i64, sign: Option<i64>) -> Result<()> {
        let RunningState::Kept(running) = &mut self.running else { return Ok(()) };
        if !running.contains_key(self.key_buf.as_slice()) {
            if running.len() >= MAX_RUNNING_KEYS {
                tracing::info!(keys = running.len(), "window: too many keys for running aggregates; merging slices instead");
                self.running = RunningState::Off;
                self.inputs.clear();
                return Ok(());
            }
            running.insert(self.key_buf.as_slice().into(), Running { key_group, accs: self.empty.clone(), last_slice: slice_end });
        }
        let r = running.get_mut(self.key_buf.as_slice()).expect("inserted above");
        r.last_slice = r.last_slice.max(slice_end);
        if let Some(sign) = sign {
            r.accs.rows += sign;
            for (acc, v) in r.accs.values.iter_mut().zip(self.inputs.drain(..)) {
                update(acc, &v, sign).map_err(TaskError::internal)?;
            }
        }
        Ok(())
    }

    /// End of the last window that holds the slice ending at `slice_end`.
    fn last_window_end(&self, slice_end: i64) -> i64 {
        floor_to(slice_end.saturating_sub(self.slice_ms).saturating_add(self.plan.size_ms), self.plan.slide_ms)
    }

    /// Moves event time to `watermark`, firing every window that ends at or before it.
    pub fn advance(&mut self, watermark: i64, out: &mut Collector) -> Result<()> {
        if watermark <= self.watermark {
            return Ok(());
        }
        // Windows that ended at or before the previous watermark have passed: rows that arrived since
        // count only for later windows.
        let passed = self.watermark;
        self.watermark = watermark;
        let slide = self.plan.slide_ms;
        let not_passed = if passed == i64::MIN { i64::MIN } else { ceil_to(passed.saturating_add(2), slide) };
        while let Some(first) = self.state.first_slice() {
            // The first window holding the earliest slice, but never one already fired or passed.
            let end = ceil_to(first, slide).max(self.last_fired.saturating_add(slide)).max(not_passed);
            if end - 1 > watermark {
                break;
            }
            self.fire(end, out)?;
            self.last_fired = end;
            // The next window starts after end + slide − size: earlier slices are done with.
            self.state.drop_through(end + slide - self.plan.size_ms)?;
        }
        Ok(())
    }

    /// Builds the running aggregates from the state (after a restore).
    fn rebuild_running(&mut self) -> Result<()> {
        let fired = self.last_fired;
        let held_from = if fired == i64::MIN { i64::MIN } else { fired + self.plan.slide_ms - self.plan.size_ms };
        let mut running = FxHashMap::default();
        let mut too_many = false;
        let empty = &self.empty;
        self.state.for_each_key(held_from, i64::MAX, &mut |key_group, key, slices| {
            if running.len() >= MAX_RUNNING_KEYS {
                too_many = true;
                return;
            }
            let mut r = Running { key_group, accs: empty.clone(), last_slice: i64::MIN };
            for (slice_end, accs) in slices {
                if slice_end <= fired {
                    merge(&mut r.accs, accs, 1);
                }
                r.last_slice = slice_end;
            }
            running.insert(key.into(), r);
        })?;
        self.running = if too_many { RunningState::Off } else { RunningState::Kept(running) };
        Ok(())
    }
}

/// Appends the result row of `key` (a key of `plan`) in the window ending at `end`.
fn emit(plan: &WindowPlan, key: &[u8], end: i64, merged: &Accs, batch: &mut Batch) -> Result<()> {
    let mut row = crate::codec::decode_values(key, plan.key.len()).map_err(|e| TaskError::internal(format!("window state: {e}")))?;
    row.push(Value::Timestamp(end - plan.size_ms));
    row.push(Value::Timestamp(end));
    row.extend(merged.values.iter().map(result));
    batch.push(row, Op::Insert);
    Ok(())
}

/// Merges (or with `sign` −1, subtracts) into `accs` the key's slices ending in `(after, through]`.
#[allow(clippy::too_many_arguments)]
fn apply_slices(
    state: &mut dyn WindowState,
    key_group: u32,
    key: &[u8],
    after: i64,
    through: i64,
    slice: i64,
    accs: &mut Accs,
    sign: i64,
) -> Result<()> {
    let mut slice_end = after.saturating_add(slice);
    while slice_end <= through {
        if let Some(a) = state.get(key_group, key, slice_end)? {
            merge(accs, a, sign);
        }
        slice_end += slice;
    }
    Ok(())
}

/// Decodes `(watermark, last_fired, late)` written by [`Window::checkpoint`]; `None` when empty.
/// The inline state of a checkpoint from before versioned state.
fn unversioned(inline: &[u8]) -> Result<Option<Progressed>> {
    match inline.split_first() {
        None => Ok(None),
        Some((&UNVERSIONED_TAG, rest)) if rest.len() == 24 => {
            let word = |i: usize| -> [u8; 8] { rest[i * 8..i * 8 + 8].try_into().expect("8 bytes") };
            Ok(Some(Progressed {
                watermark: i64::from_le_bytes(word(0)),
                last_fired: i64::from_le_bytes(word(1)),
                late: u64::from_le_bytes(word(2)),
            }))
        }
        Some(_) => Err(TaskError::internal("window: corrupt or unknown inline snapshot")),
    }
}

fn empty_accs(plan: &WindowPlan) -> Accs {
    Accs {
        rows: 0,
        values: plan
            .aggregates
            .iter()
            .map(|a| match (a.func, a.data_type) {
                (AggFunc::Sum, DataType::Int) => Acc::SumInt { sum: 0, n: 0 },
                (AggFunc::Sum, _) => Acc::SumFloat { sum: 0.0, n: 0 },
                (AggFunc::Count, _) => Acc::Count(0),
                (AggFunc::Min, _) => Acc::Min(None),
                (AggFunc::Max, _) => Acc::Max(None),
                (AggFunc::Avg, _) => Acc::Avg { sum: 0.0, n: 0 },
            })
            .collect(),
    }
}

#[async_trait::async_trait]
impl Stage for Window {
    async fn snapshot(&mut self, _id: u64, scratch: &Path) -> Result<OperatorSnapshot> {
        self.checkpoint(scratch)
    }
}

#[async_trait::async_trait]
impl Operator for Window {
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        self.process(batch, out)
    }

    async fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<()> {
        self.advance(watermark, out)
    }
}

/// End (exclusive) of the slice holding `ts`.
fn slice_end(ts: i64, slice: i64) -> i64 {
    ts.div_euclid(slice).saturating_mul(slice).saturating_add(slice)
}

/// Largest multiple of `step` at or below `x`.
fn floor_to(x: i64, step: i64) -> i64 {
    x.div_euclid(step) * step
}

/// Smallest multiple of `step` at or above `x`.
fn ceil_to(x: i64, step: i64) -> i64 {
    let r = x.rem_euclid(step);
    if r == 0 {
        x
    } else {
        x - r + step
    }
}

fn update(acc: &mut Acc, v: &Value, sign: i64) -> std::result::Result<(), String> {
    if v.is_null() {
        return Ok(());
    }
    match (acc, v) {
        (Acc::SumInt { sum, n }, Value::Int(x)) => {
            *sum = sum.wrapping_add(x.wrapping_mul(sign));
            *n += sign;
        }
        (Acc::SumFloat { sum, n }, _) | (Acc::Avg { sum, n }, _) => {
            *sum += as_f64(v)? * sign as f64;
            *n += sign;
        }
        (Acc::Count(c), _) => *c += sign,
        (Acc::Min(_) | Acc::Max(_), _) if sign < 0 => {
            return Err("MIN and MAX cannot take retractions; use them on append-only inputs".into())
        }
        (Acc::Min(m), _) => keep_extreme(m, v, true),
        (Acc::Max(m), _) => keep_extreme(m, v, false),
        (acc, v) => return Err(format!("unexpected input {v:?} for {acc:?}")),
    }
    Ok(())
}

fn as_f64(v: &Value) -> std::result::Result<f64, String> {
    match v {
        Value::Int(i) => Ok(*i as f64),
        Value::Float(f) => Ok(*f),
        other => Err(format!("expected a number, got {other:?}")),
    }
}

fn less(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Int(x), Value::Int(y)) => x < y,
        (Value::Float(x), Value::Float(y)) => x < y,
        (Value::Int(x), Value::Float(y)) => (*x as f64) < *y,
        (Value::Float(x), Value::Int(y)) => *x < *y as f64,
        (Value::String(x), Value::String(y)) => x < y,
        (Value::Timestamp(x), Value::Timestamp(y)) => x < y,
        (Value::Bool(x), Value::Bool(y)) => x < y,
        _ => false,
    }
}

/// Keeps the smaller (`min`) or larger of the current extreme and `v`.
fn keep_extreme(current: &mut Option<Value>, v: &Value, min: bool) {
    let replace = match current {
        None => true,
        Some(cur) if min => less(v, cur),
        Some(cur) => less(cur, v),
    };
    if replace {
        *current = Some(v.clone());
    }
}

/// Adds `from` into `into`, or with `sign` −1 takes it back out (SUM, COUNT and AVG only: running
/// aggregates, which subtract, are off when MIN or MAX is present).
fn merge(into: &mut Accs, from: &Accs, sign: i64) {
    into.rows += sign * from.rows;
    for (a, b) in into.values.iter_mut().zip(&from.values) {
        match (a, b) {
            (Acc::SumInt { sum, n }, Acc::SumInt { sum: s, n: m }) => {
                *sum = sum.wrapping_add(s.wrapping_mul(sign));
                *n += sign * m;
            }
            (Acc::SumFloat { sum, n }, Acc::SumFloat { sum: s, n: m }) | (Acc::Avg { sum, n }, Acc::Avg { sum: s, n: m }) => {
                *sum += sign as f64 * s;
                *n += sign * m;
            }
            (Acc::Count(c), Acc::Count(d)) => *c += sign * d,
            _ if sign < 0 => unreachable!("unmerge of MIN or MAX"),
            (Acc::Min(x), Acc::Min(Some(y))) => keep_extreme(x, y, true),
            (Acc::Max(x), Acc::Max(Some(y))) => keep_extreme(x, y, false),
            _ => {}
        }
    }
}

fn result(acc: &Acc) -> Value {
    match acc {
        Acc::SumInt { n: 0, .. } | Acc::SumFloat { n: 0, .. } | Acc::Avg { n: 0, .. } => Value::Null,
        Acc::SumInt { sum, .. } => Value::Int(*sum),
        Acc::SumFloat { sum, .. } => Value::Float(*sum),
        Acc::Avg { sum, n } => Value::Float(sum / *n as f64),
        Acc::Count(c) => Value::Int(*c),
        Acc::Min(v) | Acc::Max(v) => v.clone().unwrap_or(Value::Null),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::RestoredState;
    use eddy_jobs::connectors::BadRecordPolicy;
    use eddy_jobs::expr::Expr;
    use eddy_jobs::plan::Aggregate;
    use eddy_jobs::{Field, Schema};
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tempfile::TempDir;

    fn schema() -> Schema {
        Schema::new(vec![Field::new("k", DataType::Int), Field::new("v", DataType::Int), Field::new("ts", DataType::Timestamp)])
    }

    const BACKENDS: [StateBackend; 2] = [StateBackend::Memory, StateBackend::RocksDb];
    const MAX_PARALLELISM: u32 = 128;

    fn plan(size: i64, slide: i64) -> WindowPlan {
        let s = schema();
        let agg = |name: &str, func, arg: Option<&str>, data_type| Aggregate {
            name: name.into(),
            func,
            arg: arg.map(|a| Expr::compile(a, &s).unwrap()),
            data_type,
        };
        WindowPlan {
            size_ms: size,
            slide_ms: slide,
            key: vec![0],
            time_column: 2,
            aggregates: vec![
                agg("total", AggFunc::Sum, Some("v"), DataType::Int),
                agg("n", AggFunc::Count, None, DataType::Int),
                agg("mean", AggFunc::Avg, Some("v"), DataType::Float),
            ],
            bad_records: BadRecordPolicy::Fail,
            dead_letter_path: None,
        }
    }

    #[test]
    fn rows_an_aggregate_fails_on_follow_the_bad_records_policy() {
        let mut plan = plan(10, 10);
        // 2^62: fine for v = 1, an overflow for v = 3.
        plan.aggregates[0].arg = Some(Expr::compile("v * 4611686018427387904", &schema()).unwrap());
        let dir = crate::testing::temp_dir("window-bad-rows");
        let path = dir.path().join("dead.jsonl");
        let metrics = std::sync::Arc::new(crate::operator::TaskMetrics::default());
        let letters = crate::operator::DeadLetters::open("window", path.to_str(), metrics.clone()).unwrap();
        let open = |plan: WindowPlan| {
            let ctx = OperatorContext {
                state_dir: dir.path().join("state"),
                key_groups: 0..MAX_PARALLELISM,
                restore: Vec::new(),
                metrics: Default::default(),
            };
            Window::open(plan, MAX_PARALLELISM, StateBackend::Memory, ctx).unwrap()
        };
        let mut w = open(plan.clone()).with_bad_rows(BadRows::new("window", "scored", BadRecordPolicy::DeadLetter, letters));
        let mut out = Collector::default();
        w.process(Batch::inserts(vec![row(1, 1, 1), row(1, 3, 2)]), &mut out).unwrap();
        // Its retraction is set aside too: nothing is subtracted that was never added.
        let mut retraction = Batch::default();
        retraction.push(row(1, 3, 2), Op::Retract);
        w.process(retraction, &mut out).unwrap();
        w.advance(100, &mut out).unwrap();
        assert_eq!(results(&out), BTreeMap::from([((1, 10), (1 << 62, 1))]));
        assert_eq!(metrics.dead_lettered.load(std::sync::atomic::Ordering::Relaxed), 2);
        let letters = std::fs::read_to_string(&path).unwrap();
        let first: serde_json::Value = serde_json::from_str(letters.lines().next().unwrap()).unwrap();
        assert_eq!(first["stage"], "scored");
        assert!(first["error"].as_str().unwrap().contains("aggregate `total` failed"), "{first}");

        // Without a policy (or with `fail`) the row fails the task, as the user's error.
        let e = open(plan).process(Batch::inserts(vec![row(1, 3, 2)]), &mut Collector::default()).unwrap_err();
        assert_eq!(e.blame, crate::error::Blame::User);
    }

    /// A window on `backend` in a temporary directory (kept while the returned guard lives),
    /// owning `key_groups` and restored from `restore`.
    fn open(
        size: i64,
        slide: i64,
        backend: StateBackend,
        key_groups: std::ops::Range<u32>,
        restore: Vec<RestoredState>,
    ) -> (Window, TempDir) {
        let dir = crate::testing::temp_dir("window-test");
        let ctx = OperatorContext { state_dir: dir.path().join("state"), key_groups, restore, metrics: Default::default() };
        (Window::open(plan(size, slide), MAX_PARALLELISM, backend, ctx).unwrap(), dir)
    }

    fn window(size: i64, slide: i64, backend: StateBackend) -> (Window, TempDir) {
        open(size, slide, backend, 0..MAX_PARALLELISM, Vec::new())
    }

    fn row(k: i64, v: i64, ts: i64) -> Vec<Value> {
        vec![Value::Int(k), Value::Int(v), Value::Timestamp(ts)]
    }

    /// (key, window_end) -> (sum, count)
    fn results(out: &Collector) -> BTreeMap<(i64, i64), (i64, i64)> {
        let mut m = BTreeMap::new();
        for b in &out.main {
            for r in &b.rows {
                let (Value::Int(k), Value::Timestamp(end), Value::Int(sum), Value::Int(n)) = (&r[0], &r[2], &r[3], &r[4]) else {
                    panic!("unexpected row {r:?}")
                };
                assert!(m.insert((*k, *end), (*sum, *n)).is_none(), "window ({k}, {end}) emitted twice");
            }
        }
        m
    }

    #[test]
    fn hop_window_sums_every_window_a_record_belongs_to() {
        for backend in BACKENDS {
            // size 10, slide 5: a record at t=7 belongs to windows [0,10) and [5,15).
            let (mut w, _dir) = window(10, 5, backend);
            let mut out = Collector::default();
            w.process(Batch::inserts(vec![row(1, 3, 7), row(1, 4, 12), row(2, 1, 1)]), &mut out).unwrap();
            w.advance(i64::MAX, &mut out).unwrap();
            let r = results(&out);
            let expected: BTreeMap<_, _> =
                [((1, 10), (3, 1)), ((1, 15), (7, 2)), ((1, 20), (4, 1)), ((2, 5), (1, 1)), ((2, 10), (1, 1))].into();
            assert_eq!(r, expected, "{backend:?}");
        }
    }

    #[test]
    fn late_records_are_counted_and_side_output() {
        for backend in BACKENDS {
            late_records_on(backend);
        }
    }

    fn late_records_on(backend: StateBackend) {
        let (mut w, _dir) = window(10, 5, backend);
        let mut out = Collector::default();
        w.process(Batch::inserts(vec![row(1, 1, 3)]), &mut out).unwrap();
        w.advance(9, &mut out).unwrap(); // fires [-5,5) and [0,10)
                                         // t=2 belongs only to fired windows: late. t=8 still counts for [5,15).
        w.process(Batch::inserts(vec![row(1, 1, 2), row(1, 2, 8)]), &mut out).unwrap();
        assert_eq!(w.late_records(), 1);
        assert_eq!(out.late[0].rows, vec![row(1, 1, 2)]);
        w.advance(i64::MAX, &mut out).unwrap();
        assert_eq!(results(&out), [((1, 5), (1, 1)), ((1, 10), (1, 1)), ((1, 15), (2, 1))].into());
    }

    #[test]
    fn far_future_and_extreme_times_are_late_not_a_panic() {
        for backend in BACKENDS {
            let (mut w, _dir) = window(10, 5, backend);
            let mut out = Collector::default();
            let far = super::future_horizon_ms() + 86_400_000;
            w.process(Batch::inserts(vec![row(1, 1, 3), row(1, 1, far), row(1, 1, i64::MAX)]), &mut out).unwrap();
            assert_eq!(w.late_records(), 2, "{backend:?}");
            w.advance(20, &mut out).unwrap();
            assert_eq!(results(&out), [((1, 5), (1, 1)), ((1, 10), (1, 1))].into(), "{backend:?}");
        }
    }

    #[test]
    fn retractions_cancel_inserts() {
        for backend in BACKENDS {
            let (mut w, _dir) = window(10, 10, backend);
            let mut out = Collector::default();
            let mut b = Batch::inserts(vec![row(1, 5, 1), row(2, 7, 2)]);
            b.push(row(1, 5, 1), Op::Retract);
            b.push(row(2, 9, 3), Op::Insert);
            w.process(b, &mut out).unwrap();
            w.advance(i64::MAX, &mut out).unwrap();
            // Key 1 has no rows left, so no result; key 2 has two.
            assert_eq!(results(&out), [((2, 10), (16, 2))].into(), "{backend:?}");
        }
    }

    /// A reproducible stream: `n` rows over `keys` keys, 10 per ms, up to 1.5 s out of order,
    /// some retracting an earlier row, with a watermark (200 ms behind) after every 500 rows.
    fn stream(n: usize, keys: i64) -> Vec<Step> {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut steps = Vec::new();
        let mut rows: Vec<(i64, i64, i64)> = Vec::new();
        for i in 0..n {
            let ts = i as i64 / 10 - (next() % 1_500) as i64;
            if next() % 10 == 0 && !rows.is_empty() {
                let (k, v, ts) = rows.swap_remove((next() % rows.len() as u64) as usize);
                steps.push(Step::Row { k, v, ts, retract: true });
            } else {
                let (k, v) = ((next() % keys as u64) as i64, (next() % 100) as i64);
                rows.push((k, v, ts));
                steps.push(Step::Row { k, v, ts, retract: false });
            }
            if i % 500 == 499 {
                steps.push(Step::Watermark(i as i64 / 10 - 200));
            }
        }
        steps.push(Step::Watermark(i64::MAX));
        steps
    }

    /// Feeds `steps` to the windows, each row to the one whose key groups hold its key.
    fn feed(windows: &mut [(&mut Window, std::ops::Range<u32>)], steps: &[Step], out: &mut Collector) {
        for s in steps {
            match s {
                Step::Row { k, v, ts, retract } => {
                    let r = row(*k, *v, *ts);
                    let group = key_group(hash_key(&r, &[0]), MAX_PARALLELISM);
                    let (w, _) = windows.iter_mut().find(|(_, g)| g.contains(&group)).expect("a window owns every group");
                    let mut b = Batch::default();
                    b.push(r, if *retract { Op::Retract } else { Op::Insert });
                    w.process(b, out).unwrap();
                }
                Step::Watermark(t) => {
                    for (w, _) in windows.iter_mut() {
                        w.advance(*t, out).unwrap();
                    }
                }
            }
        }
    }

    /// Snapshot mid-stream, restore (into one subtask, or split by key-group range into two, as a
    /// rescale 1 → 2 does) and carry on: the windows fired before and after, together, equal those
    /// of an uninterrupted run, with none fired twice and the same late count.
    #[test]
    fn snapshot_and_restore_mid_stream_changes_no_result() {
        let steps = stream(60_000, 40);
        for backend in BACKENDS {
            let (mut w, _dir) = window(1_000, 250, backend);
            let mut expected = Collector::default();
            feed(&mut [(&mut w, 0..MAX_PARALLELISM)], &steps, &mut expected);
            let expected_late = w.late_records();
            assert!(expected_late > 1_000 && results(&expected).len() > 500, "the stream exercises late rows and many windows");

            for cut in [1_234, 30_001, 59_000] {
                for split in [None, Some(50)] {
                    let (mut w, _dir) = window(1_000, 250, backend);
                    let mut out = Collector::default();
                    feed(&mut [(&mut w, 0..MAX_PARALLELISM)], &steps[..cut], &mut out);
                    let scratch = crate::testing::temp_dir("window-scratch");
                    let snap = w.checkpoint(scratch.path()).unwrap();
                    drop(w);
                    let restored = vec![RestoredState { inline: snap.inline, files: snap.files }];
                    let late = match split {
                        None => {
                            let (mut w, _d) = open(1_000, 250, backend, 0..MAX_PARALLELISM, restored);
                            feed(&mut [(&mut w, 0..MAX_PARALLELISM)], &steps[cut..], &mut out);
                            w.late_records()
                        }
                        Some(at) => {
                            let (mut low, _d1) = open(1_000, 250, backend, 0..at, restored.clone());
                            let (mut high, _d2) = open(1_000, 250, backend, at..MAX_PARALLELISM, restored);
                            let late_before = low.late_records();
                            feed(&mut [(&mut low, 0..at), (&mut high, at..MAX_PARALLELISM)], &steps[cut..], &mut out);
                            // Each new subtask starts from the old one's count.
                            low.late_records() + high.late_records() - late_before
                        }
                    };
                    assert_eq!(results(&out), results(&expected), "{backend:?}, cut at {cut}, split {split:?}");
                    assert_eq!(late, expected_late, "{backend:?}, cut at {cut}, split {split:?}");
                }
            }
        }
    }

    /// Several earlier subtasks merged into one (rescale 2 → 1): the smallest watermark wins, so
    /// no window is skipped, and late counts add up.
    #[test]
    fn restoring_several_subtasks_keeps_the_earliest_progress() {
        for backend in BACKENDS {
            let mut snaps = Vec::new();
            let scratch = crate::testing::temp_dir("window-merge");
            for (i, (groups, wm)) in [(0..64, 100), (64..MAX_PARALLELISM, 40)].into_iter().enumerate() {
                let (mut w, _dir) = open(10, 5, backend, groups, Vec::new());
                let mut out = Collector::default();
                w.advance(wm, &mut out).unwrap();
                w.process(Batch::inserts(vec![row(1, 1, wm - 20)]), &mut out).unwrap();
                assert_eq!(w.late_records(), 1);
                let snap = w.checkpoint(&scratch.path().join(i.to_string())).unwrap();
                snaps.push(RestoredState { inline: snap.inline, files: snap.files });
            }
            let (w, _dir) = open(10, 5, backend, 0..MAX_PARALLELISM, snaps);
            assert_eq!((w.watermark, w.late_records()), (40, 2), "{backend:?}");
        }
    }

    /// Throughput of the window on each backend, as in `scripts/bench.sh window`: HOP(10 min, 5 s)
    /// SUM per key over 1,000 keys, 10 events per ms, 2M rows (`EDDY_BENCH_ROWS` to change; 6M
    /// and more reach the steady state of 120 live slices per key). Run in release:
    /// `cargo test --release -p eddy-worker --lib -- --ignored --nocapture window_throughput`.
    #[test]
    #[ignore]
    fn window_throughput() {
        let rows_total: usize = std::env::var("EDDY_BENCH_ROWS").ok().and_then(|n| n.parse().ok()).unwrap_or(2_000_000);
        const BATCH: usize = 1_000;
        let s = schema();
        let plan = WindowPlan {
            size_ms: 600_000,
            slide_ms: 5_000,
            key: vec![0],
            time_column: 2,
            aggregates: vec![Aggregate {
                name: "total".into(),
                func: AggFunc::Sum,
                arg: Some(Expr::compile("v", &s).unwrap()),
                data_type: DataType::Int,
            }],
            bad_records: BadRecordPolicy::Fail,
            dead_letter_path: None,
        };
        let batches = || {
            (0..rows_total / BATCH)
                .map(|b| {
                    let rows =
                        (b * BATCH..(b + 1) * BATCH).map(|i| row((i * 7_919 % 1_000) as i64, (i % 100) as i64, i as i64 / 10)).collect();
                    (Batch::inserts(rows), ((b + 1) * BATCH) as i64 / 10 - 1_000)
                })
                .collect::<Vec<(Batch, i64)>>()
        };
        for backend in BACKENDS {
            let batches = batches();
            let dir = crate::testing::temp_dir("window-bench");
            let ctx = OperatorContext {
                state_dir: dir.path().join("state"),
                key_groups: 0..MAX_PARALLELISM,
                restore: Vec::new(),
                metrics: Default::default(),
            };
            let mut w = Window::open(plan.clone(), MAX_PARALLELISM, backend, ctx).unwrap();
            let (cpu0, t0) = (cpu_seconds(), std::time::Instant::now());
            let mut fired = 0;
            for (batch, watermark) in batches {
                let mut out = Collector::default();
                w.process(batch, &mut out).unwrap();
                w.advance(watermark, &mut out).unwrap();
                fired += out.main.iter().map(|b| b.rows.len()).sum::<usize>();
            }
            let (cpu, wall) = (cpu_seconds() - cpu0, t0.elapsed().as_secs_f64());
            println!(
                "{backend:?}: {rows_total} rows in {wall:.2} s wall, {cpu:.2} s CPU: {:.0} rows/s, {:.0} rows per CPU-second ({fired} window rows)",
                rows_total as f64 / wall,
                rows_total as f64 / cpu
            );
        }
    }

    /// CPU time of this process (all threads, RocksDB's included), from /proc.
    fn cpu_seconds() -> f64 {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        let fields: Vec<&str> = stat.rsplit(") ").next().unwrap_or("").split(' ').collect();
        // utime and stime are fields 14 and 15 of the line, 12 and 13 after the command name.
        let ticks: f64 = fields.get(11..13).map(|f| f.iter().filter_map(|x| x.parse::<f64>().ok()).sum()).unwrap_or(0.0);
        ticks / 100.0
    }

    #[derive(Debug, Clone)]
    enum Step {
        Row { k: i64, v: i64, ts: i64, retract: bool },
        Watermark(i64),
    }

    fn steps() -> impl Strategy<Value = Vec<Step>> {
        prop::collection::vec(
            prop_oneof![
                8 => (0i64..4, -50i64..50, 0i64..200, prop::bool::weighted(0.2))
                    .prop_map(|(k, v, ts, retract)| Step::Row { k, v, ts, retract }),
                1 => (0i64..220).prop_map(Step::Watermark),
            ],
            0..120,
        )
    }

    proptest! {
        /// Window results equal a naive computation, for out-of-order input with retractions over
        /// several window shapes: when the watermark passes a window's end, its result is the sum of
        /// the records accepted so far with a timestamp inside it; a record is late when every window
        /// holding it has passed.
        #[test]
        fn equals_naive_reference(
            steps in steps(),
            shape in prop::sample::select(vec![(10i64, 10i64), (20, 5), (30, 20), (12, 8)]),
            backend in prop::sample::select(BACKENDS.to_vec()),
            merging in any::<bool>(),
        ) {
            let (size, slide) = shape;
            let (mut w, _dir) = window(size, slide, backend);
            if merging {
                // As with MIN or MAX: every window merged from its slices.
                w.running = RunningState::Off;
            }
            let mut out = Collector::default();
            let mut accepted: Vec<(i64, i64, i64, i64)> = Vec::new(); // (k, v, ts, sign)
            let mut expected: BTreeMap<(i64, i64), (i64, i64)> = BTreeMap::new();
            let mut wm = i64::MIN;
            let ends_holding = |ts: i64| {
                let first = ceil_to(ts + 1, slide);
                (0..).map(move |i| first + i * slide).take_while(move |e| e - size <= ts)
            };
            for s in steps.iter().chain([Step::Watermark(1_000)].iter()) {
                match s.clone() {
                    Step::Row { k, v, ts, retract } => {
                        let mut b = Batch::default();
                        b.push(row(k, v, ts), if retract { Op::Retract } else { Op::Insert });
                        let before = w.late_records();
                        w.process(b, &mut out).unwrap();
                        let naive_late = ends_holding(ts).all(|e| e - 1 <= wm);
                        prop_assert_eq!(w.late_records() > before, naive_late);
                        if !naive_late {
                            accepted.push((k, v, ts, if retract { -1 } else { 1 }));
                        }
                    }
                    Step::Watermark(t) => {
                        w.advance(t, &mut out).unwrap();
                        if t > wm {
                            // Windows whose end passes now, among those any accepted record belongs to.
                            let closing: std::collections::BTreeSet<i64> = accepted
                                .iter()
                                .flat_map(|r| ends_holding(r.2))
                                .filter(|e| e - 1 > wm && e - 1 <= t)
                                .collect();
                            for end in closing {
                                for k in 0..4 {
                                    let in_window: Vec<_> = accepted.iter().filter(|r| r.0 == k && r.2 >= end - size && r.2 < end).collect();
                                    let n: i64 = in_window.iter().map(|r| r.3).sum();
                                    if n > 0 {
                                        expected.insert((k, end), (in_window.iter().map(|r| r.1 * r.3).sum(), n));
                                    }
                                }
                            }
                            wm = t;
                        }
                    }
                }
            }
            prop_assert_eq!(results(&out), expected);
        }
    }
}
