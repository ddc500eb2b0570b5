//! The last value per key: the state of an upsert source, which must know each key's current row
//! to retract it when a new version or a tombstone arrives. Behind a trait, like the window state,
//! so that the RocksDB backend and an in-memory one are interchangeable; the trait knows no
//! RocksDB types.
//!
//! Entries are sharded by a `u32` chosen by the user of the state (the Kafka source uses the
//! partition): a snapshot can then be split when a job is rescaled, each subtask restoring from
//! every earlier subtask's snapshot only the shards it owns now.
//!
//! Each entry remembers when it was last written (milliseconds on a clock of the caller's, passed
//! as `now`). With a time to live, an entry not written for that long counts as absent on read and
//! is removed: by a sweep ([`LastValueState::expire`]) in memory, by a compaction filter in RocksDB.
//! Write times travel with snapshots, so a restored entry expires when it would have without the
//! restore.
//!
//! Two backends:
//! - [`MemoryLastValueState`] ([`memory`]): a hash map of decoded rows; a snapshot writes every
//!   entry to one file.
//! - [`RocksLastValueState`] ([`rocks`]): RocksDB; a snapshot is a RocksDB checkpoint, so only SST
//!   files new since the previous checkpoint need uploading.
//!
//! Each restores the other's snapshots. An entry, in a snapshot file and as a RocksDB value, is
//! its write time (i64 little-endian), its number of columns (u32 little-endian) and the columns
//! encoded with [`crate::codec::encode_value`].

pub mod memory;
pub mod rocks;

use std::path::Path;

use eddy_jobs::plan::StateBackend;
use eddy_jobs::Value;

use crate::error::{Result, TaskError};

pub use memory::MemoryLastValueState;
pub use rocks::RocksLastValueState;

/// The last row of each (shard, key), with an optional time to live.
///
/// Methods that may touch disk return a `Result`; errors are internal (a full disk, a corrupt
/// file) and restarting from a checkpoint is the remedy.
pub trait LastValueState: Send {
    /// The row held for `key` in `shard`, unless there is none or it has expired as of `now`.
    fn get(&mut self, shard: u32, key: &[u8], now: i64) -> Result<Option<Vec<Value>>>;
    /// Sets the row of `key` in `shard`, written at `written` (the row's time, which says
    /// nothing of the clock: only reads and [`LastValueState::expire`] move it).
    fn put(&mut self, shard: u32, key: &[u8], row: &[Value], written: i64) -> Result<()>;
    /// Forgets `key` in `shard`.
    fn delete(&mut self, shard: u32, key: &[u8]) -> Result<()>;
    /// Time has reached `now`: removes the entries expired by then, or lets the backend remove
    /// them in the background. Reads never see expired entries either way.
    fn expire(&mut self, now: i64) -> Result<()>;
    /// Writes a consistent copy of everything held into `dir`, which does not exist yet or is
    /// empty. The caller owns the files afterwards (uploads them, then deletes `dir`).
    fn snapshot(&mut self, dir: &Path) -> Result<()>;
    /// Adds the entries of a directory written by [`LastValueState::snapshot`] whose shard `owns`
    /// accepts, skipping the others. Called once per earlier subtask when rescaling; of two
    /// entries for the same (shard, key) the one written later stays (copies of a key in several
    /// earlier subtasks' snapshots happen behind a source whose subtasks own partitions, where a
    /// rescale leaves stale copies behind).
    fn restore(&mut self, dir: &Path, owns: &dyn Fn(u32) -> bool) -> Result<()>;
}

/// Opens an empty state of `backend` whose entries live `ttl_ms` after their last write (forever
/// with `None`), keeping its files (if any) under `dir`.
pub fn open(backend: StateBackend, dir: &Path, ttl_ms: Option<i64>) -> Result<Box<dyn LastValueState>> {
    Ok(match backend {
        StateBackend::Memory => Box::new(MemoryLastValueState::new(ttl_ms)),
        StateBackend::RocksDb => Box::new(RocksLastValueState::open(dir, ttl_ms)?),
    })
}

/// Puts the key of (`shard`, `key`) in `out`, as both backends key entries: the shard
/// big-endian, then the key.
fn shard_key(out: &mut Vec<u8>, shard: u32, key: &[u8]) {
    out.clear();
    out.extend_from_slice(&shard.to_be_bytes());
    out.extend_from_slice(key);
}

/// Whether an entry written at `written` has expired at `now`.
fn expired(ttl_ms: Option<i64>, written: i64, now: i64) -> bool {
    ttl_ms.is_some_and(|ttl| now.saturating_sub(written) >= ttl)
}

/// Appends the encoding of an entry: write time, column count, columns.
fn encode_entry(written: i64, row: &[Value], out: &mut Vec<u8>) {
    out.extend_from_slice(&written.to_le_bytes());
    out.extend_from_slice(&(row.len() as u32).to_le_bytes());
    for v in row {
        crate::codec::encode_value(v, out);
    }
}

/// The write time of an encoded entry.
fn entry_written(entry: &[u8]) -> Result<i64> {
    let head = entry.get(..8).ok_or_else(|| corrupt_entry("truncated"))?;
    Ok(i64::from_le_bytes(head.try_into().expect("8 bytes")))
}

/// Decodes what [`encode_entry`] wrote: the write time and the row.
fn decode_entry(entry: &[u8]) -> Result<(i64, Vec<Value>)> {
    let written = entry_written(entry)?;
    let n = entry.get(8..12).ok_or_else(|| corrupt_entry("truncated"))?;
    let n = u32::from_le_bytes(n.try_into().expect("4 bytes")) as usize;
    // Every value takes at least one byte: a bound for the allocation.
    if n > entry.len() - 12 {
        return Err(corrupt_entry("truncated"));
    }
    let row = crate::codec::decode_values(&entry[12..], n).map_err(|_| corrupt_entry("bad value"))?;
    Ok((written, row))
}

fn corrupt_entry(what: &str) -> TaskError {
    TaskError::internal(format!("last-value state: corrupt entry ({what})"))
}

/// Receives one snapshot entry: shard, key and the [`encode_entry`] bytes.
type EntryVisitor<'a> = dyn FnMut(u32, &[u8], &[u8]) -> Result<()> + 'a;

/// Calls `f` for every entry of the snapshot in `dir` whose shard `owns` accepts, whichever
/// backend wrote it.
fn read_snapshot(dir: &Path, owns: &dyn Fn(u32) -> bool, f: &mut EntryVisitor<'_>) -> Result<()> {
    if memory::is_snapshot(dir) {
        memory::read_snapshot(dir, owns, f)
    } else if super::rocks::is_snapshot(dir) {
        rocks::read_snapshot(dir, owns, f)
    } else {
        Err(TaskError::internal(format!("last-value state: {} holds no last-value snapshot", dir.display())))
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> TaskError {
    TaskError::internal(format!("last-value state: {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::tests::value;
    use proptest::prelude::*;
    use std::collections::BTreeMap;
    use tempfile::TempDir;

    const SHARDS: u32 = 4;
    const TTL: i64 = 100;

    /// Both backends, in their own directory.
    struct Pair {
        memory: MemoryLastValueState,
        rocks: RocksLastValueState,
        _dir: TempDir,
    }

    impl Pair {
        fn new(ttl_ms: Option<i64>) -> Pair {
            let dir = crate::testing::temp_dir("last-value");
            let rocks = RocksLastValueState::open(&dir.path().join("db"), ttl_ms).unwrap();
            Pair { memory: MemoryLastValueState::new(ttl_ms), rocks, _dir: dir }
        }

        fn each(&mut self) -> [&mut dyn LastValueState; 2] {
            [&mut self.memory, &mut self.rocks]
        }
    }

    fn key(k: u8) -> Vec<u8> {
        format!("{{\"id\":{k}}}").into_bytes()
    }

    /// Snapshots `state` and restores the shards `owns` accepts into `into`.
    fn copy(state: &mut dyn LastValueState, into: &mut dyn LastValueState, owns: &dyn Fn(u32) -> bool) {
        let dir = crate::testing::temp_dir("last-value-snap");
        let snap = dir.path().join("snap");
        state.snapshot(&snap).unwrap();
        into.restore(&snap, owns).unwrap();
    }

    /// What every (shard, key) reads as at `now`.
    fn observe(state: &mut dyn LastValueState, now: i64) -> BTreeMap<(u32, u8), Vec<Value>> {
        let mut seen = BTreeMap::new();
        for shard in 0..SHARDS {
            for k in 0..8 {
                if let Some(row) = state.get(shard, &key(k), now).unwrap() {
                    seen.insert((shard, k), row);
                }
            }
        }
        seen
    }

    #[derive(Debug, Clone)]
    enum Op {
        Put {
            shard: u32,
            k: u8,
            row: Vec<Value>,
        },
        Delete {
            shard: u32,
            k: u8,
        },
        /// Time passes.
        Wait(i64),
        Expire,
        /// Snapshot, then go on with fresh instances restored from it, shards below `split` into
        /// one pair and the rest into another; check each holds only its shards, then merge.
        Restore {
            split: u32,
        },
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                8 => (0..SHARDS, 0u8..8, prop::collection::vec(value(), 0..4)).prop_map(|(shard, k, row)| Op::Put { shard, k, row }),
                2 => (0..SHARDS, 0u8..8).prop_map(|(shard, k)| Op::Delete { shard, k }),
                3 => (0i64..60).prop_map(Op::Wait),
                1 => Just(Op::Expire),
                1 => (0..=SHARDS).prop_map(|split| Op::Restore { split }),
            ],
            0..60,
        )
    }

    /// Two earlier subtasks' snapshots may both hold a key (behind a source whose subtasks own
    /// partitions, a rescale leaves stale copies behind): whatever the order of the restores, the
    /// copy written later is the one kept.
    #[test]
    fn of_two_restored_copies_of_a_key_the_later_one_stays() {
        let (mut older, mut newer) = (Pair::new(None), Pair::new(None));
        for state in older.each() {
            state.put(0, &key(1), &[Value::Int(1)], 10).unwrap();
        }
        for state in newer.each() {
            state.put(0, &key(1), &[Value::Int(2)], 20).unwrap();
        }
        for flip in [false, true] {
            let mut into = Pair::new(None);
            let (first, second) = if flip { (&mut newer, &mut older) } else { (&mut older, &mut newer) };
            copy(&mut first.memory, &mut into.memory, &|_| true);
            copy(&mut first.rocks, &mut into.rocks, &|_| true);
            copy(&mut second.memory, &mut into.memory, &|_| true);
            copy(&mut second.rocks, &mut into.rocks, &|_| true);
            for state in into.each() {
                assert_eq!(state.get(0, &key(1), 30).unwrap(), Some(vec![Value::Int(2)]), "restored newer first: {flip}");
            }
        }
    }

    /// A row's time (an event time, which may run ahead of the watermark) is not the clock: a
    /// write stamped far ahead must not let compaction drop the entries that are still alive.
    #[test]
    fn a_write_stamped_ahead_does_not_expire_the_others() {
        let mut s = Pair::new(Some(TTL));
        for state in s.each() {
            state.put(0, &key(1), &[Value::Int(1)], 0).unwrap();
            state.put(0, &key(2), &[Value::Int(2)], 10 * TTL).unwrap();
            state.expire(TTL / 2).unwrap();
        }
        s.rocks.compact();
        for state in s.each() {
            assert_eq!(state.get(0, &key(1), TTL / 2).unwrap(), Some(vec![Value::Int(1)]));
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]

        /// Both backends behave as a map with expiry under any sequence of writes, deletes, waits,
        /// sweeps and snapshot/restores split by shard.
        #[test]
        fn backends_match_a_model(ops in ops()) {
            let mut s = Pair::new(Some(TTL));
            let mut model: BTreeMap<(u32, u8), (i64, Vec<Value>)> = BTreeMap::new();
            let mut now = 1_000;
            for op in ops {
                match op {
                    Op::Put { shard, k, row } => {
                        for state in s.each() {
                            state.put(shard, &key(k), &row, now).unwrap();
                        }
                        model.insert((shard, k), (now, row));
                    }
                    Op::Delete { shard, k } => {
                        for state in s.each() {
                            state.delete(shard, &key(k)).unwrap();
                        }
                        model.remove(&(shard, k));
                    }
                    Op::Wait(ms) => now += ms,
                    Op::Expire => {
                        for state in s.each() {
                            state.expire(now).unwrap();
                        }
                        s.rocks.compact();
                    }
                    Op::Restore { split } => {
                        let (mut low, mut high) = (Pair::new(Some(TTL)), Pair::new(Some(TTL)));
                        for (half, range) in [(&mut low, 0..split), (&mut high, split..SHARDS)] {
                            let owns = |shard: u32| range.contains(&shard);
                            copy(&mut s.memory, &mut half.memory, &owns);
                            copy(&mut s.rocks, &mut half.rocks, &owns);
                            for state in half.each() {
                                prop_assert!(observe(state, now).keys().all(|(shard, _)| range.contains(shard)));
                            }
                        }
                        // Merge the halves into one pair again (as a restore after rescaling to
                        // one subtask would), each backend from the other's snapshots.
                        let mut next = Pair::new(Some(TTL));
                        for half in [&mut low, &mut high] {
                            copy(&mut half.rocks, &mut next.memory, &|_| true);
                            copy(&mut half.memory, &mut next.rocks, &|_| true);
                        }
                        s = next;
                    }
                }
                let expected: BTreeMap<(u32, u8), Vec<Value>> =
                    model.iter().filter(|(_, (written, _))| now - written < TTL).map(|(k, (_, row))| (*k, row.clone())).collect();
                prop_assert_eq!(&observe(&mut s.memory, now), &expected);
                prop_assert_eq!(&observe(&mut s.rocks, now), &expected);
            }
        }

        #[test]
        fn entries_round_trip(written in any::<i64>(), row in prop::collection::vec(value(), 0..6)) {
            let mut buf = Vec::new();
            encode_entry(written, &row, &mut buf);
            prop_assert_eq!(decode_entry(&buf).unwrap(), (written, row));
        }
    }

    #[test]
    fn an_entry_expires_ttl_after_its_last_write_and_is_then_removed() {
        let mut s = Pair::new(Some(TTL));
        let row = vec![Value::Int(1), Value::string("a")];
        for state in s.each() {
            state.put(0, b"k", &row, 0).unwrap();
            state.put(0, b"young", &row, 50).unwrap();
            assert_eq!(state.get(0, b"k", TTL - 1).unwrap(), Some(row.clone()));
            assert_eq!(state.get(0, b"k", TTL).unwrap(), None);
            // A write renews it.
            state.put(0, b"k", &row, TTL).unwrap();
            assert_eq!(state.get(0, b"k", 2 * TTL - 1).unwrap(), Some(row.clone()));
            state.expire(2 * TTL).unwrap();
            assert_eq!(state.get(0, b"young", 2 * TTL).unwrap(), None);
        }
        assert!(s.memory.is_empty());
        assert_eq!(s.rocks.stored(), 2);
        s.rocks.compact();
        assert_eq!(s.rocks.stored(), 0);
    }

    #[test]
    fn without_a_ttl_nothing_expires() {
        let mut s = Pair::new(None);
        for state in s.each() {
            state.put(3, b"k", &[Value::Null], 0).unwrap();
            state.expire(i64::MAX).unwrap();
            assert_eq!(state.get(3, b"k", i64::MAX).unwrap(), Some(vec![Value::Null]));
            state.delete(3, b"k").unwrap();
            assert_eq!(state.get(3, b"k", 0).unwrap(), None);
        }
        s.rocks.compact();
        assert_eq!(s.rocks.stored(), 0);
    }

    #[test]
    fn the_same_key_in_two_shards_is_two_entries() {
        let mut s = Pair::new(None);
        for state in s.each() {
            state.put(1, b"k", &[Value::Int(1)], 0).unwrap();
            state.put(2, b"k", &[Value::Int(2)], 0).unwrap();
            state.delete(1, b"k").unwrap();
            assert_eq!(state.get(1, b"k", 0).unwrap(), None);
            assert_eq!(state.get(2, b"k", 0).unwrap(), Some(vec![Value::Int(2)]));
        }
    }

    #[test]
    fn corrupt_entries_are_an_internal_error() {
        let mut buf = Vec::new();
        encode_entry(7, &[Value::Int(1)], &mut buf);
        for bad in [&buf[..buf.len() - 1], &buf[..10], &[]] {
            assert_eq!(decode_entry(bad).unwrap_err().blame, crate::error::Blame::Internal);
        }
    }
}
