//! Keyed window state behind a trait, so that operators and tests can run on memory and a durable
//! backend can take its place without the window knowing. Keys are the encoded grouping values;
//! state is organised by slice (pane) end, the unit windows are assembled from.

use std::collections::{BTreeMap, VecDeque};

use rustc_hash::FxHashMap;

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

/// Receives one key and its slices in a window, oldest first.
pub type KeyVisitor<'a> = dyn FnMut(&[u8], &mut dyn Iterator<Item = &Accs>) + 'a;

/// The window operator's state: accumulators per (key, slice end), grouped by key.
pub trait WindowState: Send {
    /// The accumulators of `key` in the slice ending at `slice_end`, created with `init` if absent.
    fn accumulators(&mut self, key: &[u8], slice_end: i64, init: &dyn Fn() -> Accs) -> &mut Accs;
    /// The earliest slice end held, if any.
    fn first_slice(&self) -> Option<i64>;
    /// Calls `f` once per key that has slices ending in `(after, through]`, with those slices in
    /// time order.
    fn for_each_key(&self, after: i64, through: i64, f: &mut KeyVisitor<'_>);
    /// Forgets every slice ending at or before `through`.
    fn drop_through(&mut self, through: i64);
    /// Number of (key, slice) entries held.
    fn len(&self) -> usize;
    /// Whether no state is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// In-memory window state: per key, its slices in time order. A window's result for a key is then
/// a scan of adjacent entries, with no hashing per slice.
#[derive(Debug, Default)]
pub struct MemoryWindowState {
    keys: FxHashMap<Box<[u8]>, VecDeque<(i64, Accs)>>,
    /// Number of keys holding each slice end, to find the earliest quickly.
    slices: BTreeMap<i64, usize>,
}

impl WindowState for MemoryWindowState {
    fn accumulators(&mut self, key: &[u8], slice_end: i64, init: &dyn Fn() -> Accs) -> &mut Accs {
        // Look up by borrowed key first so that the common case (key present) allocates nothing.
        if !self.keys.contains_key(key) {
            self.keys.insert(key.into(), VecDeque::new());
        }
        let ring = self.keys.get_mut(key).expect("inserted above");
        // In-order input lands in the newest slice: check it before searching.
        let pos = match ring.back() {
            Some((s, _)) if *s == slice_end => ring.len() - 1,
            _ => {
                let pos = ring.partition_point(|(s, _)| *s < slice_end);
                if ring.get(pos).is_none_or(|(s, _)| *s != slice_end) {
                    ring.insert(pos, (slice_end, init()));
                    *self.slices.entry(slice_end).or_default() += 1;
                }
                pos
            }
        };
        &mut ring[pos].1
    }

    fn first_slice(&self) -> Option<i64> {
        self.slices.keys().next().copied()
    }

    fn for_each_key(&self, after: i64, through: i64, f: &mut KeyVisitor<'_>) {
        for (key, ring) in &self.keys {
            let start = ring.partition_point(|(s, _)| *s <= after);
            if ring.get(start).is_some_and(|(s, _)| *s <= through) {
                let mut slices = ring.range(start..).take_while(|(s, _)| *s <= through).map(|(_, a)| a);
                f(key, &mut slices);
            }
        }
    }

    fn drop_through(&mut self, through: i64) {
        if self.first_slice().is_none_or(|first| first > through) {
            return;
        }
        self.keys.retain(|_, ring| {
            while ring.front().is_some_and(|(s, _)| *s <= through) {
                ring.pop_front();
            }
            !ring.is_empty()
        });
        self.slices = self.slices.split_off(&through.saturating_add(1));
    }

    fn len(&self) -> usize {
        self.slices.values().sum()
    }
}
