//! In-memory window state: per key, its key group and its slices in time order, in a hash map. A
//! record in order lands in its key's newest slice (one hash lookup, no search), and a window's
//! result for a key is a scan of adjacent entries with no hashing per slice. This is the hot path of
//! the window operator.
//!
//! A snapshot is one file, `window-state.bin`: a version byte, then per entry its key group
//! (u32), key (u32 length + bytes), slice end (i64) and accumulators (u32 length + [`encode_accs`]
//! bytes), all little-endian. Snapshots are full, not incremental: use RocksDB for large state.

use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::ops::Range;
use std::path::Path;

use rustc_hash::FxHashMap;

use super::{decode_accs, encode_accs, io_error, Accs, EntryVisitor, KeyVisitor, SnapshotFile, WindowState};
use crate::error::Result;

/// Name of the snapshot file.
const FILE: &str = "window-state.bin";
/// Version of the snapshot file, its first byte.
const VERSION: u8 = 1;

/// One key's state.
#[derive(Debug)]
struct KeySlices {
    key_group: u32,
    /// Slices in time order.
    ring: VecDeque<(i64, Accs)>,
}

/// In-memory window state (see the module docs).
#[derive(Debug, Default)]
pub struct MemoryWindowState {
    keys: FxHashMap<Box<[u8]>, KeySlices>,
    /// Number of keys holding each slice end, to find the earliest quickly.
    slices: BTreeMap<i64, usize>,
}

impl WindowState for MemoryWindowState {
    fn accumulators(&mut self, key_group: u32, key: &[u8], slice_end: i64, init: &dyn Fn() -> Accs) -> Result<&mut Accs> {
        // Look up by borrowed key first so that the common case (key present) allocates nothing.
        if !self.keys.contains_key(key) {
            self.keys.insert(key.into(), KeySlices { key_group, ring: VecDeque::new() });
        }
        let ring = &mut self.keys.get_mut(key).expect("inserted above").ring;
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
        Ok(&mut ring[pos].1)
    }

    fn get(&mut self, _key_group: u32, key: &[u8], slice_end: i64) -> Result<Option<&Accs>> {
        let Some(KeySlices { ring, .. }) = self.keys.get(key) else { return Ok(None) };
        let pos = ring.partition_point(|(s, _)| *s < slice_end);
        Ok(ring.get(pos).filter(|(s, _)| *s == slice_end).map(|(_, a)| a))
    }

    fn first_slice(&self) -> Option<i64> {
        self.slices.keys().next().copied()
    }

    fn for_each_key(&mut self, after: i64, through: i64, f: &mut KeyVisitor<'_>) -> Result<()> {
        for (key, KeySlices { key_group, ring }) in &self.keys {
            let start = ring.partition_point(|(s, _)| *s <= after);
            if ring.get(start).is_some_and(|(s, _)| *s <= through) {
                let mut slices = ring.range(start..).take_while(|(s, _)| *s <= through).map(|(s, a)| (*s, a));
                f(*key_group, key, &mut slices);
            }
        }
        Ok(())
    }

    fn drop_through(&mut self, through: i64) -> Result<()> {
        if self.first_slice().is_none_or(|first| first > through) {
            return Ok(());
        }
        self.keys.retain(|_, KeySlices { ring, .. }| {
            while ring.front().is_some_and(|(s, _)| *s <= through) {
                ring.pop_front();
            }
            !ring.is_empty()
        });
        self.slices = self.slices.split_off(&through.saturating_add(1));
        Ok(())
    }

    fn len(&self) -> usize {
        self.slices.values().sum()
    }

    fn snapshot(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
        let path = dir.join(FILE);
        let mut buf = Vec::with_capacity(1 + self.len() * 32);
        buf.push(VERSION);
        let mut accs_buf = Vec::new();
        for (key, KeySlices { key_group, ring }) in &self.keys {
            for (slice_end, accs) in ring {
                buf.extend_from_slice(&key_group.to_le_bytes());
                buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
                buf.extend_from_slice(key);
                buf.extend_from_slice(&slice_end.to_le_bytes());
                accs_buf.clear();
                encode_accs(accs, &mut accs_buf);
                buf.extend_from_slice(&(accs_buf.len() as u32).to_le_bytes());
                buf.extend_from_slice(&accs_buf);
            }
        }
        let mut file = std::fs::File::create(&path).map_err(|e| io_error("creating", &path, e))?;
        file.write_all(&buf).and_then(|()| file.sync_all()).map_err(|e| io_error("writing", &path, e))
    }

    fn restore(&mut self, dir: &Path, key_groups: Range<u32>) -> Result<()> {
        // An entry already held for the same (key, slice) is replaced.
        super::read_snapshot(dir, key_groups, &mut |key_group, key, slice_end, accs| {
            *self.accumulators(key_group, key, slice_end, &Accs::default)? = decode_accs(accs)?;
            Ok(())
        })
    }
}

/// Whether `dir` holds a snapshot written by [`MemoryWindowState`].
pub(super) fn is_snapshot(dir: &Path) -> bool {
    dir.join(FILE).is_file()
}

/// Calls `f(key_group, key, slice_end, encoded accs)` for every entry of the snapshot file in
/// `dir` whose key group is in `key_groups`.
pub(super) fn read_snapshot(dir: &Path, key_groups: Range<u32>, f: &mut EntryVisitor<'_>) -> Result<()> {
    let path = dir.join(FILE);
    let data = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
    let mut r = SnapshotFile::new("window state", &path, &data, VERSION)?;
    // Entries follow each other to the end of the file.
    while !r.is_empty() {
        let key_group = r.u32()?;
        let key = r.sized()?;
        let slice_end = r.i64()?;
        let accs = r.sized()?;
        if key_groups.contains(&key_group) {
            f(key_group, key, slice_end, accs)?;
        }
    }
    Ok(())
}
