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
//! SUM, COUNT and AVG accept retractions (subtracting); MIN and MAX do not, and fail the task if
//! they see one, since the planner rules that out for updating inputs.

use eddy_jobs::plan::{AggFunc, WindowPlan};
use eddy_jobs::{DataType, Value};

use super::{Collector, Operator};
use crate::batch::{Batch, Op};
use crate::codec::encode_value;
use crate::error::{Result, TaskError};
use crate::state::{Acc, Accs, WindowState};

/// The window operator.
pub struct Window {
    plan: WindowPlan,
    slice_ms: i64,
    state: Box<dyn WindowState>,
    watermark: i64,
    /// End of the last window fired.
    last_fired: i64,
    late: u64,
    key_buf: Vec<u8>,
    /// Empty accumulators, cloned for each new (key, slice).
    empty: Accs,
}

impl Window {
    /// A window operator over `state`.
    pub fn new(plan: WindowPlan, state: Box<dyn WindowState>) -> Window {
        let slice_ms = plan.slice_ms();
        let empty = empty_accs(&plan);
        Window { plan, slice_ms, state, watermark: i64::MIN, last_fired: i64::MIN, late: 0, key_buf: Vec::new(), empty }
    }

    fn fire(&mut self, end: i64, out: &mut Collector) -> Result<()> {
        let width = self.plan.key.len();
        let start = end - self.plan.size_ms;
        let mut batch = Batch::default();
        let mut error = None;
        self.state.for_each_key(start, end, &mut |key, slices| {
            let Some(first) = slices.next() else { return };
            let mut merged = first.clone();
            for a in slices {
                merge(&mut merged, a);
            }
            if merged.rows <= 0 {
                return;
            }
            match decode_key(key, width) {
                Ok(mut row) => {
                    row.push(Value::Timestamp(start));
                    row.push(Value::Timestamp(end));
                    row.extend(merged.values.iter().map(result));
                    batch.push(row, Op::Insert);
                }
                Err(e) => error = Some(e),
            }
        });
        if let Some(e) = error {
            return Err(e);
        }
        if !batch.is_empty() {
            out.main.push(batch);
        }
        Ok(())
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
impl Operator for Window {
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        self.process(batch, out)
    }

    async fn on_watermark(&mut self, watermark: i64, out: &mut Collector) -> Result<()> {
        self.advance(watermark, out)
    }

    fn late_records(&self) -> u64 {
        self.late
    }
}

impl Window {
    /// Adds a batch's rows to their slices; late rows go to `out.late`.
    pub fn process(&mut self, batch: Batch, out: &mut Collector) -> Result<()> {
        let mut late = Batch::default();
        for (row, op) in batch.rows.into_iter().zip(batch.ops) {
            let ts = match &row[self.plan.time_column] {
                Value::Timestamp(t) => *t,
                // A row without event time belongs to no window: count it as late, keep it visible.
                _ => {
                    late.push(row, op);
                    continue;
                }
            };
            let slice_end = slice_end(ts, self.slice_ms);
            if self.last_window_end(slice_end) - 1 <= self.watermark {
                late.push(row, op);
                continue;
            }
            self.key_buf.clear();
            for &k in &self.plan.key {
                encode_value(&row[k], &mut self.key_buf);
            }
            let empty = &self.empty;
            let accs = self.state.accumulators(&self.key_buf, slice_end, &|| empty.clone());
            let sign = match op {
                Op::Insert => 1,
                Op::Retract => -1,
            };
            accs.rows += sign;
            for (acc, agg) in accs.values.iter_mut().zip(&self.plan.aggregates) {
                let v = match &agg.arg {
                    None => Value::Int(1),
                    Some(e) => e.eval(&row).map_err(|e| TaskError::user(format!("aggregate `{}` failed on a row: {e}", agg.name)))?,
                };
                update(acc, &v, sign).map_err(|m| TaskError::user(format!("aggregate `{}`: {m}", agg.name)))?;
            }
        }
        if !late.is_empty() {
            self.late += late.len() as u64;
            out.late.push(late);
        }
        Ok(())
    }

    /// End of the last window that holds the slice ending at `slice_end`.
    fn last_window_end(&self, slice_end: i64) -> i64 {
        floor_to(slice_end - self.slice_ms + self.plan.size_ms, self.plan.slide_ms)
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
            self.state.drop_through(end + slide - self.plan.size_ms);
        }
        Ok(())
    }
}

/// End (exclusive) of the slice holding `ts`.
fn slice_end(ts: i64, slice: i64) -> i64 {
    ts.div_euclid(slice) * slice + slice
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
        (Acc::Min(m), _) | (Acc::Max(m), _) if sign < 0 => {
            let _ = m;
            return Err("MIN and MAX cannot take retractions; use them on append-only inputs".into());
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

fn merge(into: &mut Accs, from: &Accs) {
    into.rows += from.rows;
    for (a, b) in into.values.iter_mut().zip(&from.values) {
        match (a, b) {
            (Acc::SumInt { sum, n }, Acc::SumInt { sum: s, n: m }) => {
                *sum = sum.wrapping_add(*s);
                *n += m;
            }
            (Acc::SumFloat { sum, n }, Acc::SumFloat { sum: s, n: m }) | (Acc::Avg { sum, n }, Acc::Avg { sum: s, n: m }) => {
                *sum += s;
                *n += m;
            }
            (Acc::Count(c), Acc::Count(d)) => *c += d,
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

fn decode_key(key: &[u8], width: usize) -> Result<Vec<Value>> {
    crate::codec::decode_values(key, width).map_err(|e| TaskError::internal(format!("window state: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryWindowState;
    use eddy_jobs::expr::Expr;
    use eddy_jobs::plan::Aggregate;
    use eddy_jobs::{Field, Schema};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn schema() -> Schema {
        Schema::new(vec![Field::new("k", DataType::Int), Field::new("v", DataType::Int), Field::new("ts", DataType::Timestamp)])
    }

    fn window(size: i64, slide: i64) -> Window {
        let s = schema();
        let agg = |name: &str, func, arg: Option<&str>, data_type| Aggregate {
            name: name.into(),
            func,
            arg: arg.map(|a| Expr::compile(a, &s).unwrap()),
            data_type,
        };
        let plan = WindowPlan {
            size_ms: size,
            slide_ms: slide,
            key: vec![0],
            time_column: 2,
            aggregates: vec![
                agg("total", AggFunc::Sum, Some("v"), DataType::Int),
                agg("n", AggFunc::Count, None, DataType::Int),
                agg("mean", AggFunc::Avg, Some("v"), DataType::Float),
            ],
        };
        Window::new(plan, Box::new(MemoryWindowState::default()))
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
        // size 10, slide 5: a record at t=7 belongs to windows [0,10) and [5,15).
        let mut w = window(10, 5);
        let mut out = Collector::default();
        w.process(Batch::inserts(vec![row(1, 3, 7), row(1, 4, 12), row(2, 1, 1)]), &mut out).unwrap();
        w.advance(i64::MAX, &mut out).unwrap();
        let r = results(&out);
        let expected: BTreeMap<_, _> =
            [((1, 10), (3, 1)), ((1, 15), (7, 2)), ((1, 20), (4, 1)), ((2, 5), (1, 1)), ((2, 10), (1, 1))].into();
        assert_eq!(r, expected);
    }

    #[test]
    fn late_records_are_counted_and_side_output() {
        let mut w = window(10, 5);
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
    fn retractions_cancel_inserts() {
        let mut w = window(10, 10);
        let mut out = Collector::default();
        let mut b = Batch::inserts(vec![row(1, 5, 1), row(2, 7, 2)]);
        b.push(row(1, 5, 1), Op::Retract);
        b.push(row(2, 9, 3), Op::Insert);
        w.process(b, &mut out).unwrap();
        w.advance(i64::MAX, &mut out).unwrap();
        // Key 1 has no rows left, so no result; key 2 has two.
        assert_eq!(results(&out), [((2, 10), (16, 2))].into());
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
        fn equals_naive_reference(steps in steps(), shape in prop::sample::select(vec![(10i64, 10i64), (20, 5), (30, 20), (12, 8)])) {
            let (size, slide) = shape;
            let mut w = window(size, slide);
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
