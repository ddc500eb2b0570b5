//! Keyed window state behind a trait, so that operators and tests can run on memory and RocksDB
//! can take its place without the window knowing. The trait knows no RocksDB types.
//!
//! State is a map from (key group, key, slice end) to the accumulators of that key in that slice
//! (pane), the unit windows are assembled from. Keys are the encoded grouping values
//! ([`crate::codec::encode_value`]); the key group ([`crate::keys::key_group`]) travels with each
//! key so that a snapshot can be split by key-group range when a job is rescaled: subtask `i` of the
//! new run restores, from every snapshot of the old run, only the entries of the groups it owns.
//!
//! Two backends:
//! - [`MemoryWindowState`] ([`memory`]): per key, its slices in time order, on the heap. Fastest;
//!   a snapshot writes every entry to one file.
//! - [`RocksWindowState`] ([`rocks`]): RocksDB under a write-back cache; a snapshot is a RocksDB
//!   checkpoint (hard links to immutable SST files), so only files new since the previous
//!   checkpoint need uploading.
//!
//! A backend restores snapshots written by either backend, so a job can switch backends across a
//! savepoint.
//!
//! [`last_value`] holds the other kind of state, an upsert source's last row per key, behind a
//! trait of its own with the same two backends.

pub mod last_value;
pub mod memory;
pub mod rocks;

use std::ops::Range;
use std::path::Path;

use eddy_jobs::plan::StateBackend;
use eddy_jobs::Value;

use crate::error::{Result, TaskError};

pub use memory::MemoryWindowState;
pub use rocks::RocksWindowState;

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
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accs {
    /// Net row count.
    pub rows: i64,
    /// One accumulator per aggregate, in output order.
    pub values: Vec<Acc>,
}

/// Receives one key's group, the key, and its slices in a range as (slice end, accumulators),
/// oldest first.
pub type KeyVisitor<'a> = dyn FnMut(u32, &[u8], &mut dyn Iterator<Item = (i64, &Accs)>) + 'a;

/// The window operator's state: accumulators per (key group, key, slice end), grouped by key.
///
/// Methods that may touch disk return a `Result`; errors are internal (a full disk, a corrupt
/// file) and restarting from a checkpoint is the remedy.
pub trait WindowState: Send {
    /// The accumulators of `key` (in `key_group`) in the slice ending at `slice_end`, created with
    /// `init` if absent. The reference is valid until the next call on the state.
    fn accumulators(&mut self, key_group: u32, key: &[u8], slice_end: i64, init: &dyn Fn() -> Accs) -> Result<&mut Accs>;
    /// The accumulators of `key` in the slice ending at `slice_end`, if held; creates nothing.
    /// The reference is valid until the next call on the state.
    fn get(&mut self, key_group: u32, key: &[u8], slice_end: i64) -> Result<Option<&Accs>>;
    /// The earliest slice end held, if any.
    fn first_slice(&self) -> Option<i64>;
    /// Calls `f` once per key that has slices ending in `(after, through]`, with those slices in
    /// time order. The order of keys is unspecified.
    fn for_each_key(&mut self, after: i64, through: i64, f: &mut KeyVisitor<'_>) -> Result<()>;
    /// Forgets every slice ending at or before `through`.
    fn drop_through(&mut self, through: i64) -> Result<()>;
    /// Number of (key, slice) entries held.
    fn len(&self) -> usize;
    /// Whether no state is held.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Writes a consistent copy of everything held into `dir`, which does not exist yet or is
    /// empty. The caller owns the files afterwards (uploads them, then deletes `dir`).
    fn snapshot(&mut self, dir: &Path) -> Result<()>;
    /// Adds the entries of a directory written by [`WindowState::snapshot`] whose key group is in
    /// `key_groups`, skipping the others. Called once per earlier subtask when rescaling, so
    /// entries merge with those already held; an entry already held for the same (key, slice) is
    /// replaced (snapshots of distinct subtasks hold distinct key groups, so that does not happen
    /// in a restore).
    fn restore(&mut self, dir: &Path, key_groups: Range<u32>) -> Result<()>;
}

/// Opens an empty window state of `backend`, keeping its files (if any) under `dir`.
pub fn open(backend: StateBackend, dir: &Path) -> Result<Box<dyn WindowState>> {
    Ok(match backend {
        StateBackend::Memory => Box::new(MemoryWindowState::default()),
        StateBackend::RocksDb => Box::new(RocksWindowState::open(dir)?),
    })
}

/// Receives one snapshot entry: key group, key, slice end and the [`encode_accs`] bytes.
type EntryVisitor<'a> = dyn FnMut(u32, &[u8], i64, &[u8]) -> Result<()> + 'a;

/// Calls `f` for every entry of the snapshot in `dir` whose key group is in `key_groups`,
/// whichever backend wrote it.
fn read_snapshot(dir: &Path, key_groups: Range<u32>, f: &mut EntryVisitor<'_>) -> Result<()> {
    if memory::is_snapshot(dir) {
        memory::read_snapshot(dir, key_groups, f)
    } else if rocks::is_snapshot(dir) {
        rocks::read_snapshot(dir, key_groups, f)
    } else {
        Err(TaskError::internal(format!("window state: {} holds no window-state snapshot", dir.display())))
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> TaskError {
    TaskError::internal(format!("window state: {what} {}: {e}", path.display()))
}

/// A snapshot file of the state called `label`: a version byte, then little-endian fields read
/// one after another with errors that name the file.
pub(crate) struct SnapshotFile<'a> {
    label: &'static str,
    path: &'a Path,
    rest: &'a [u8],
}

impl<'a> SnapshotFile<'a> {
    /// Checks that `data`, read from `path`, starts with `version`.
    pub(crate) fn new(label: &'static str, path: &'a Path, data: &'a [u8], version: u8) -> Result<SnapshotFile<'a>> {
        let mut file = SnapshotFile { label, path, rest: data };
        match file.bytes(1)? {
            [v] if *v == version => Ok(file),
            _ => Err(file.corrupt("unknown version")),
        }
    }

    fn corrupt(&self, what: &str) -> TaskError {
        TaskError::internal(format!("{}: corrupt snapshot {} ({what})", self.label, self.path.display()))
    }

    /// Whether every field has been read.
    pub(crate) fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }

    /// The next `n` bytes.
    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8]> {
        take(&mut self.rest, n).map_err(|what| self.corrupt(what))
    }

    /// The next u32.
    pub(crate) fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_le_bytes(self.bytes(4)?.try_into().expect("4 bytes")))
    }

    /// The next i64.
    pub(crate) fn i64(&mut self) -> Result<i64> {
        Ok(i64::from_le_bytes(self.bytes(8)?.try_into().expect("8 bytes")))
    }

    /// The next length-prefixed (u32) bytes.
    pub(crate) fn sized(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        self.bytes(n)
    }
}

/// Version of the accumulator encoding, its first byte.
const ACCS_VERSION: u8 = 1;

const TAG_SUM_INT: u8 = 0;
const TAG_SUM_FLOAT: u8 = 1;
const TAG_COUNT: u8 = 2;
const TAG_MIN_NONE: u8 = 3;
const TAG_MIN: u8 = 4;
const TAG_MAX_NONE: u8 = 5;
const TAG_MAX: u8 = 6;
const TAG_AVG: u8 = 7;

/// Appends the binary encoding of `accs`: a version byte, then zigzag varints for integers,
/// little-endian bits for doubles, and length-prefixed [`crate::codec::encode_value`] bytes for
/// MIN/MAX values. A SUM and COUNT of one key in one slice typically takes 6 bytes.
pub fn encode_accs(accs: &Accs, out: &mut Vec<u8>) {
    out.push(ACCS_VERSION);
    put_varint(out, zigzag(accs.rows));
    put_varint(out, accs.values.len() as u64);
    for acc in &accs.values {
        match acc {
            Acc::SumInt { sum, n } => {
                out.push(TAG_SUM_INT);
                put_varint(out, zigzag(*sum));
                put_varint(out, zigzag(*n));
            }
            Acc::SumFloat { sum, n } | Acc::Avg { sum, n } => {
                out.push(if matches!(acc, Acc::Avg { .. }) { TAG_AVG } else { TAG_SUM_FLOAT });
                out.extend_from_slice(&sum.to_bits().to_le_bytes());
                put_varint(out, zigzag(*n));
            }
            Acc::Count(c) => {
                out.push(TAG_COUNT);
                put_varint(out, zigzag(*c));
            }
            Acc::Min(None) => out.push(TAG_MIN_NONE),
            Acc::Max(None) => out.push(TAG_MAX_NONE),
            Acc::Min(Some(v)) | Acc::Max(Some(v)) => {
                out.push(if matches!(acc, Acc::Min(_)) { TAG_MIN } else { TAG_MAX });
                let mut value = Vec::new();
                crate::codec::encode_value(v, &mut value);
                put_varint(out, value.len() as u64);
                out.extend_from_slice(&value);
            }
        }
    }
}

/// Decodes what [`encode_accs`] wrote.
pub fn decode_accs(buf: &[u8]) -> Result<Accs> {
    decode_accs_inner(buf).map_err(|what| TaskError::internal(format!("window state: corrupt accumulators ({what})")))
}

fn decode_accs_inner(mut buf: &[u8]) -> std::result::Result<Accs, &'static str> {
    let r = &mut buf;
    if take(r, 1)?[0] != ACCS_VERSION {
        return Err("unknown version");
    }
    let rows = unzigzag(get_varint(r)?);
    let n = get_varint(r)? as usize;
    // Every accumulator takes at least one byte: a bound for the allocation.
    if n > r.len() {
        return Err("truncated");
    }
    let mut values = Vec::with_capacity(n);
    for _ in 0..n {
        let tag = take(r, 1)?[0];
        values.push(match tag {
            TAG_SUM_INT => Acc::SumInt { sum: unzigzag(get_varint(r)?), n: unzigzag(get_varint(r)?) },
            TAG_SUM_FLOAT | TAG_AVG => {
                let sum = f64::from_bits(u64::from_le_bytes(take(r, 8)?.try_into().map_err(|_| "truncated")?));
                let n = unzigzag(get_varint(r)?);
                if tag == TAG_AVG {
                    Acc::Avg { sum, n }
                } else {
                    Acc::SumFloat { sum, n }
                }
            }
            TAG_COUNT => Acc::Count(unzigzag(get_varint(r)?)),
            TAG_MIN_NONE => Acc::Min(None),
            TAG_MAX_NONE => Acc::Max(None),
            TAG_MIN | TAG_MAX => {
                let len = get_varint(r)? as usize;
                let mut values = crate::codec::decode_values(take(r, len)?, 1).map_err(|_| "bad value")?;
                let v = values.pop();
                if tag == TAG_MIN {
                    Acc::Min(v)
                } else {
                    Acc::Max(v)
                }
            }
            _ => return Err("unknown accumulator tag"),
        });
    }
    if !r.is_empty() {
        return Err("trailing bytes");
    }
    Ok(Accs { rows, values })
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> std::result::Result<&'a [u8], &'static str> {
    if buf.len() < n {
        return Err("truncated");
    }
    let (head, tail) = buf.split_at(n);
    *buf = tail;
    Ok(head)
}

fn zigzag(x: i64) -> u64 {
    ((x << 1) ^ (x >> 63)) as u64
}

fn unzigzag(x: u64) -> i64 {
    ((x >> 1) as i64) ^ -((x & 1) as i64)
}

fn put_varint(out: &mut Vec<u8>, mut x: u64) {
    while x >= 0x80 {
        out.push(x as u8 | 0x80);
        x >>= 7;
    }
    out.push(x as u8);
}

fn get_varint(buf: &mut &[u8]) -> std::result::Result<u64, &'static str> {
    let mut x = 0u64;
    for shift in (0..64).step_by(7) {
        let b = take(buf, 1)?[0];
        x |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Ok(x);
        }
    }
    Err("varint too long")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tempfile::TempDir;

    const GROUPS: u32 = 4;

    use crate::codec::tests::value;

    fn acc() -> impl Strategy<Value = Acc> {
        prop_oneof![
            (any::<i64>(), any::<i64>()).prop_map(|(sum, n)| Acc::SumInt { sum, n }),
            (any::<f64>().prop_filter("NaN", |f| !f.is_nan()), any::<i64>()).prop_map(|(sum, n)| Acc::SumFloat { sum, n }),
            any::<i64>().prop_map(Acc::Count),
            prop::option::of(value()).prop_map(Acc::Min),
            prop::option::of(value()).prop_map(Acc::Max),
            (any::<f64>().prop_filter("NaN", |f| !f.is_nan()), any::<i64>()).prop_map(|(sum, n)| Acc::Avg { sum, n }),
        ]
    }

    /// Both backends, one per kind, in their own directories.
    struct Pair {
        memory: MemoryWindowState,
        rocks: RocksWindowState,
        _dir: TempDir,
    }

    impl Pair {
        fn new() -> Pair {
            let dir = crate::testing::temp_dir("state-prop");
            let rocks = RocksWindowState::open(&dir.path().join("db")).unwrap();
            Pair { memory: MemoryWindowState::default(), rocks, _dir: dir }
        }
    }

    fn init() -> Accs {
        Accs { rows: 0, values: vec![Acc::SumInt { sum: 0, n: 0 }, Acc::Max(None)] }
    }

    /// Key `k`'s encoding and its key group (a function of the key, as in a job).
    fn key(k: u8) -> (u32, Vec<u8>) {
        let mut buf = Vec::new();
        crate::codec::encode_value(&Value::Int(k as i64 * 1_000_003), &mut buf);
        (k as u32 % GROUPS, buf)
    }

    /// The key group [`key`] gave `encoded`, if it is one of its keys.
    fn key_group_of(encoded: &[u8]) -> Option<u32> {
        (0..8).map(key).find(|(_, e)| e == encoded).map(|(group, _)| group)
    }

    fn update(state: &mut dyn WindowState, k: u8, slice_end: i64, x: i64) -> Accs {
        let (group, key) = key(k);
        let accs = state.accumulators(group, &key, slice_end, &init).unwrap();
        let before = accs.clone();
        accs.rows += 1;
        if let [Acc::SumInt { sum, n }, Acc::Max(m)] = accs.values.as_mut_slice() {
            *sum += x;
            *n += 1;
            if m.as_ref().is_none_or(|v| matches!(v, Value::Int(y) if *y < x)) {
                *m = Some(Value::Int(x));
            }
        }
        before
    }

    /// Per key, its slices as (slice end, accumulators).
    type Scan = BTreeMap<Vec<u8>, Vec<(i64, Accs)>>;

    /// Everything `for_each_key` shows, by key (backends visit keys in different orders).
    fn scan(state: &mut dyn WindowState, after: i64, through: i64) -> Scan {
        let mut seen = BTreeMap::new();
        state
            .for_each_key(after, through, &mut |group, key, slices| {
                if let Some(want) = key_group_of(key) {
                    assert_eq!(want, group, "a key visited with another key group");
                }
                let slices: Vec<(i64, Accs)> = slices.map(|(s, a)| (s, a.clone())).collect();
                assert!(!slices.is_empty(), "a key visited with no slices");
                assert!(seen.insert(key.to_vec(), slices).is_none(), "a key visited twice");
            })
            .unwrap();
        seen
    }

    fn observe(state: &mut dyn WindowState) -> (Option<i64>, usize, Scan) {
        (state.first_slice(), state.len(), scan(state, i64::MIN, i64::MAX))
    }

    /// Snapshot `state` and restore it into `into`, over `ranges` one after another.
    fn copy(state: &mut dyn WindowState, into: &mut dyn WindowState, ranges: impl IntoIterator<Item = Range<u32>>) {
        let dir = crate::testing::temp_dir("state-snap");
        let snap = dir.path().join("snap");
        state.snapshot(&snap).unwrap();
        for r in ranges {
            into.restore(&snap, r).unwrap();
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Update {
            k: u8,
            slice: i64,
            x: i64,
        },
        Scan {
            after: i64,
            through: i64,
        },
        Get {
            k: u8,
            slice: i64,
        },
        Drop(i64),
        /// Snapshot, then continue on fresh instances restored from it, over one range or split
        /// in two at `split` (restored one after the other into the same instance).
        Restore {
            split: u32,
        },
        /// Snapshot, restore groups `[0, split)` and `[split, GROUPS)` into two instances each and
        /// check that the halves partition the whole.
        Rescale {
            split: u32,
        },
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                12 => (0u8..8, 0i64..16, -100i64..100).prop_map(|(k, s, x)| Op::Update { k, slice: s * 10, x }),
                2 => (-10i64..170, 0i64..170).prop_map(|(after, d)| Op::Scan { after, through: after + d }),
                3 => (0u8..8, 0i64..16).prop_map(|(k, s)| Op::Get { k, slice: s * 10 }),
                2 => (-10i64..170).prop_map(Op::Drop),
                1 => (0u32..=GROUPS).prop_map(|split| Op::Restore { split }),
                1 => (0u32..=GROUPS).prop_map(|split| Op::Rescale { split }),
            ],
            0..80,
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// The RocksDB backend behaves exactly as the in-memory one under any sequence of updates,
        /// scans, drops, snapshots and restores (split by key-group range or not).
        #[test]
        fn rocks_backend_matches_memory(ops in ops()) {
            let mut s = Pair::new();
            for op in ops {
                match op {
                    Op::Update { k, slice, x } => {
                        prop_assert_eq!(update(&mut s.memory, k, slice, x), update(&mut s.rocks, k, slice, x));
                    }
                    Op::Scan { after, through } => {
                        prop_assert_eq!(scan(&mut s.memory, after, through), scan(&mut s.rocks, after, through));
                    }
                    Op::Get { k, slice } => {
                        let (group, key) = key(k);
                        let m = s.memory.get(group, &key, slice).unwrap().cloned();
                        prop_assert_eq!(m, s.rocks.get(group, &key, slice).unwrap().cloned());
                    }
                    Op::Drop(through) => {
                        s.memory.drop_through(through).unwrap();
                        s.rocks.drop_through(through).unwrap();
                    }
                    Op::Restore { split } => {
                        let mut next = Pair::new();
                        let ranges = [0..split, split..GROUPS];
                        copy(&mut s.memory, &mut next.memory, ranges.clone());
                        copy(&mut s.rocks, &mut next.rocks, ranges);
                        prop_assert_eq!(observe(&mut s.memory), observe(&mut next.memory));
                        s = next;
                    }
                    Op::Rescale { split } => {
                        let whole = observe(&mut s.memory);
                        let (mut low, mut high) = (Pair::new(), Pair::new());
                        copy(&mut s.memory, &mut low.memory, Some(0..split));
                        copy(&mut s.memory, &mut high.memory, Some(split..GROUPS));
                        copy(&mut s.rocks, &mut low.rocks, Some(0..split));
                        copy(&mut s.rocks, &mut high.rocks, Some(split..GROUPS));
                        let mut parts = BTreeMap::new();
                        let mut len = 0;
                        for (half, range) in [(&mut low, 0..split), (&mut high, split..GROUPS)] {
                            let m = observe(&mut half.memory);
                            prop_assert_eq!(&m, &observe(&mut half.rocks));
                            for k in m.2.keys() {
                                let group = key_group_of(k).expect("a test key");
                                prop_assert!(range.contains(&group), "key group {} restored outside {:?}", group, range);
                            }
                            len += m.1;
                            parts.extend(m.2);
                        }
                        prop_assert_eq!(len, whole.1);
                        prop_assert_eq!(parts, whole.2.clone());
                    }
                }
                prop_assert_eq!(s.memory.first_slice(), s.rocks.first_slice());
                prop_assert_eq!(s.memory.len(), s.rocks.len());
            }
            prop_assert_eq!(observe(&mut s.memory), observe(&mut s.rocks));
        }

        #[test]
        fn accumulators_round_trip(rows in any::<i64>(), values in prop::collection::vec(acc(), 0..6)) {
            let accs = Accs { rows, values };
            let mut buf = Vec::new();
            encode_accs(&accs, &mut buf);
            prop_assert_eq!(decode_accs(&buf).unwrap(), accs);
        }
    }

    #[test]
    fn corrupt_accumulators_are_an_internal_error() {
        let mut buf = Vec::new();
        encode_accs(&init(), &mut buf);
        for bad in [&buf[..buf.len() - 1], &[9u8, 0, 0][..], &[]] {
            let e = decode_accs(bad).unwrap_err();
            assert_eq!(e.blame, crate::error::Blame::Internal);
        }
    }

    /// A job may switch backends across a savepoint: each restores the other's snapshots.
    #[test]
    fn backends_restore_each_others_snapshots() {
        let mut s = Pair::new();
        for (i, k) in [0u8, 1, 2, 3, 5, 7].into_iter().enumerate() {
            update(&mut s.memory, k, 10 * i as i64, i as i64);
            update(&mut s.rocks, k, 10 * i as i64, i as i64);
        }
        s.memory.drop_through(0).unwrap();
        s.rocks.drop_through(0).unwrap();
        let mut next = Pair::new();
        copy(&mut s.rocks, &mut next.memory, Some(0..GROUPS));
        copy(&mut s.memory, &mut next.rocks, Some(0..GROUPS));
        let expected = observe(&mut s.memory);
        assert_eq!(expected.1, 5);
        assert_eq!(observe(&mut next.memory), expected);
        assert_eq!(observe(&mut next.rocks), expected);
    }

    #[test]
    fn rocks_cache_overflow_keeps_every_entry() {
        let mut s = Pair::new();
        let n = rocks::CACHE_ENTRIES as i64 + 10;
        for i in 0..n {
            for state in [&mut s.memory as &mut dyn WindowState, &mut s.rocks] {
                let accs = state.accumulators(0, &i.to_be_bytes(), 10, &init).unwrap();
                accs.rows += i;
            }
        }
        assert_eq!(s.rocks.len(), n as usize);
        assert_eq!(observe(&mut s.memory), observe(&mut s.rocks));
    }
}
