//! Keyed window state behind a trait, so that operators and tests can run on memory and a durable
//! backend can take its place without the window knowing. Keys are the encoded grouping values;
//! state is organised by slice (pane) end, the unit windows are assembled from.

use std::collections::{BTreeMap, HashMap};

use eddy_jobs::Value;

/// Running aggregate of one function over the rows of one key in one slice.
#[derive(Debug, Clone, PartialEq)]
pub enum Acc {
    /// SUM over integers; `n` counts non-null inputs (the sum is NULL when 0).
    SumInt { sum: i64, n: i64 },
    /// SUM over doubles.
    SumFloat { sum: f64, n: i64 },
    /// COUNT(*) or COUNT(x) (non-null x).
    Count(i64),
    /// MIN; not retractable.
    Min(Option<Value>),
    /// MAX; not retractable.
    Max(Option<Value>),
    /// AVG as sum and count.
    Avg { sum: f64, n: i64 },
}

/// All aggregates of one key in one slice, plus the net number of rows (inserts − retractions),
/// which tells whether the key still has rows there.
#[derive(Debug, Clone, PartialEq)]
pub struct Accs {
    /// Net row count.
    pub rows: i64,
    /// One accumulator per aggregate, in output order.
    pub values: Vec<Acc>,
}

/// The window operator's state: accumulators per (slice end, key).
pub trait WindowState: Send {
    /// The accumulators of `key` in the slice ending at `slice_end`, created with `init` if absent.
    fn accumulators(&mut self, slice_end: i64, key: &[u8], init: &dyn Fn() -> Accs) -> &mut Accs;
    /// The earliest slice end held, if any.
    fn first_slice(&self) -> Option<i64>;
    /// Calls `f` for every key of every slice ending in `(after, through]`, in slice order.
    fn for_each(&self, after: i64, through: i64, f: &mut dyn FnMut(i64, &[u8], &Accs));
    /// Forgets every slice ending at or before `through`.
    fn drop_through(&mut self, through: i64);
    /// Number of (slice, key) entries held.
    fn len(&self) -> usize;
}

/// In-memory window state.
#[derive(Debug, Default)]
pub struct MemoryWindowState {
    slices: BTreeMap<i64, HashMap<Box<[u8]>, Accs>>,
}

impl WindowState for MemoryWindowState {
    fn accumulators(&mut self, slice_end: i64, key: &[u8], init: &dyn Fn() -> Accs) -> &mut Accs {
        let slice = self.slices.entry(slice_end).or_default();
        // Look up by borrowed key first so that the common case (key present) allocates nothing.
        if !slice.contains_key(key) {
            slice.insert(key.into(), init());
        }
        slice.get_mut(key).expect("inserted above")
    }

    fn first_slice(&self) -> Option<i64> {
        self.slices.keys().next().copied()
    }

    fn for_each(&self, after: i64, through: i64, f: &mut dyn FnMut(i64, &[u8], &Accs)) {
        if after >= through {
            return;
        }
        for (&end, slice) in self.slices.range(after + 1..=through) {
            for (k, a) in slice {
                f(end, k, a);
            }
        }
    }

    fn drop_through(&mut self, through: i64) {
        let keep = self.slices.split_off(&through.saturating_add(1));
        self.slices = keep;
    }

    fn len(&self) -> usize {
        self.slices.values().map(HashMap::len).sum()
    }
}
