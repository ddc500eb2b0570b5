//! In-memory last-value state: a hash map from shard (big-endian) and key to the decoded row and
//! its write time.
//! Expired entries are removed by [`LastValueState::expire`], a scan of the whole map.
//!
//! A snapshot is one file, `last-values.bin`: a version byte, then per entry its shard (u32), key
//! (u32 length + bytes) and entry (u32 length + the entry encoding of the parent module), all
//! little-endian. Snapshots are full, not incremental: use RocksDB for large state.

use std::io::Write;
use std::path::Path;

use eddy_jobs::Value;
use rustc_hash::FxHashMap;

use super::{decode_entry, encode_entry, expired, io_error, shard_key, EntryVisitor, LastValueState};
use crate::error::Result;
use crate::state::SnapshotFile;

/// Name of the snapshot file.
const FILE: &str = "last-values.bin";
/// Version of the snapshot file, its first byte.
const VERSION: u8 = 1;

/// In-memory last-value state (see the module docs).
#[derive(Debug, Default)]
pub struct MemoryLastValueState {
    ttl_ms: Option<i64>,
    /// By shard (big-endian) and key: the write time and the row.
    entries: FxHashMap<Box<[u8]>, (i64, Vec<Value>)>,
    key_buf: Vec<u8>,
}

impl MemoryLastValueState {
    /// An empty state whose entries live `ttl_ms` after their last write (forever with `None`).
    pub fn new(ttl_ms: Option<i64>) -> MemoryLastValueState {
        MemoryLastValueState { ttl_ms, entries: FxHashMap::default(), key_buf: Vec::new() }
    }

    /// Number of entries held, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no entry is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl LastValueState for MemoryLastValueState {
    fn get(&mut self, shard: u32, key: &[u8], now: i64) -> Result<Option<Vec<Value>>> {
        shard_key(&mut self.key_buf, shard, key);
        Ok(match self.entries.get(self.key_buf.as_slice()) {
            Some((written, row)) if !expired(self.ttl_ms, *written, now) => Some(row.clone()),
            _ => None,
        })
    }

    fn put(&mut self, shard: u32, key: &[u8], row: &[Value], written: i64) -> Result<()> {
        shard_key(&mut self.key_buf, shard, key);
        self.entries.insert(self.key_buf.as_slice().into(), (written, row.to_vec()));
        Ok(())
    }

    fn delete(&mut self, shard: u32, key: &[u8]) -> Result<()> {
        shard_key(&mut self.key_buf, shard, key);
        self.entries.remove(self.key_buf.as_slice());
        Ok(())
    }

    fn expire(&mut self, now: i64) -> Result<()> {
        if self.ttl_ms.is_some() {
            self.entries.retain(|_, (written, _)| !expired(self.ttl_ms, *written, now));
        }
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io_error("creating", dir, e))?;
        let path = dir.join(FILE);
        let mut buf = Vec::with_capacity(1 + self.entries.len() * 64);
        buf.push(VERSION);
        let mut entry = Vec::new();
        for (shard_key, (written, row)) in &self.entries {
            let (shard, key) = shard_key.split_at(4);
            buf.extend_from_slice(&u32::from_be_bytes(shard.try_into().expect("4 bytes")).to_le_bytes());
            buf.extend_from_slice(&(key.len() as u32).to_le_bytes());
            buf.extend_from_slice(key);
            entry.clear();
            encode_entry(*written, row, &mut entry);
            buf.extend_from_slice(&(entry.len() as u32).to_le_bytes());
            buf.extend_from_slice(&entry);
        }
        let mut file = std::fs::File::create(&path).map_err(|e| io_error("creating", &path, e))?;
        file.write_all(&buf).and_then(|()| file.sync_all()).map_err(|e| io_error("writing", &path, e))
    }

    fn restore(&mut self, dir: &Path, owns: &dyn Fn(u32) -> bool) -> Result<()> {
        super::read_snapshot(dir, owns, &mut |shard, key, entry| {
            shard_key(&mut self.key_buf, shard, key);
            let (written, row) = decode_entry(entry)?;
            if self.entries.get(self.key_buf.as_slice()).is_none_or(|held| held.0 <= written) {
                self.entries.insert(self.key_buf.as_slice().into(), (written, row));
            }
            Ok(())
        })
    }
}

/// Whether `dir` holds a snapshot written by [`MemoryLastValueState`].
pub(super) fn is_snapshot(dir: &Path) -> bool {
    dir.join(FILE).is_file()
}

/// Calls `f(shard, key, entry)` for every entry of the snapshot file in `dir` whose shard `owns`
/// accepts.
pub(super) fn read_snapshot(dir: &Path, owns: &dyn Fn(u32) -> bool, f: &mut EntryVisitor<'_>) -> Result<()> {
    let path = dir.join(FILE);
    let data = std::fs::read(&path).map_err(|e| io_error("reading", &path, e))?;
    let mut r = SnapshotFile::new("last-value state", &path, &data, VERSION)?;
    // Entries follow each other to the end of the file.
    while !r.is_empty() {
        let shard = r.u32()?;
        let key = r.sized()?;
        let entry = r.sized()?;
        if owns(shard) {
            f(shard, key, entry)?;
        }
    }
    Ok(())
}
