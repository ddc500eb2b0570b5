//! Last-value state in RocksDB.
//!
//! Layout: one RocksDB key per entry, `shard (u32 big-endian) | key`, so that the entries of a
//! shard are one contiguous key range; the value is the entry encoding of the parent module (write
//! time, then the row). Reads and writes go straight to RocksDB, without the WAL: durability comes
//! from checkpoints, and after a crash the state is rebuilt from the last one, never reopened.
//!
//! Expiry: a read treats an expired entry as absent. A compaction filter drops expired entries
//! when RocksDB compacts their files, judging by the latest `now` a read or an expiry has passed
//! (never a write's time, which is a row's and may run ahead of the clock); periodic
//! compaction (once per time to live, at least once an hour) makes sure that files nobody writes
//! over are compacted too. Compactions rewrite files, so the next checkpoint uploads those anew.
//!
//! Snapshots are RocksDB checkpoints (hard links to immutable SST files), as for the window state:
//! the uploader sends only the SST files it has not sent before.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use eddy_jobs::Value;
use rocksdb::compaction_filter::Decision;
use rocksdb::{WriteBatch, WriteOptions, DB};

use super::{decode_entry, encode_entry, entry_written, expired, shard_key, EntryVisitor, LastValueState};
use crate::error::{Result, TaskError};
use crate::state::rocks::{db_options, labelled_db_error, open_fresh, open_snapshot, unlogged, write_checkpoint};

/// What this state calls itself in errors.
const LABEL: &str = "last-value state";

/// Entries written per `WriteBatch` when restoring.
const RESTORE_BATCH: usize = 10_000;

/// Last-value state in RocksDB (see the module docs).
pub struct RocksLastValueState {
    db: DB,
    dir: PathBuf,
    write_opts: WriteOptions,
    ttl_ms: Option<i64>,
    /// The latest `now` passed to a read or an expiry, read by the compaction filter.
    clock: Arc<AtomicI64>,
    /// Whether a snapshot has been restored into this state: a second one may hold keys the
    /// first did, and must not replace newer entries with older ones.
    restored: bool,
    key_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl std::fmt::Debug for RocksLastValueState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksLastValueState").field("dir", &self.dir).field("ttl_ms", &self.ttl_ms).finish_non_exhaustive()
    }
}

impl RocksLastValueState {
    /// Opens an empty state whose database lives in `dir` (created if missing; a database left
    /// there by an earlier run is deleted). Entries live `ttl_ms` after their last write (forever
    /// with `None`).
    pub fn open(dir: &Path, ttl_ms: Option<i64>) -> Result<RocksLastValueState> {
        let mut opts = db_options();
        let clock = Arc::new(AtomicI64::new(i64::MIN));
        if let Some(ttl) = ttl_ms {
            let now = clock.clone();
            opts.set_compaction_filter("eddy-last-value-ttl", move |_level: u32, _key: &[u8], value: &[u8]| {
                // An entry that does not decode is left for a read to report.
                match entry_written(value) {
                    Ok(written) if expired(Some(ttl), written, now.load(Ordering::Relaxed)) => Decision::Remove,
                    _ => Decision::Keep,
                }
            });
            opts.set_periodic_compaction_seconds((ttl / 1000).clamp(1, 3600) as u64);
        }
        let db = open_fresh(LABEL, &opts, dir)?;
        Ok(RocksLastValueState {
            db,
            dir: dir.to_path_buf(),
            write_opts: unlogged(),
            ttl_ms,
            clock,
            restored: false,
            key_buf: Vec::new(),
            value_buf: Vec::new(),
        })
    }

    fn tick(&self, now: i64) {
        self.clock.fetch_max(now, Ordering::Relaxed);
    }

    /// Compacts the whole database now (tests: lets the compaction filter see every entry).
    #[cfg(test)]
    pub(super) fn compact(&self) {
        self.db.compact_range::<&[u8], &[u8]>(None, None);
    }

    /// Number of entries in RocksDB, expired ones not yet compacted away included (tests).
    #[cfg(test)]
    pub(super) fn stored(&self) -> usize {
        self.db.iterator(rocksdb::IteratorMode::Start).count()
    }
}

impl LastValueState for RocksLastValueState {
    fn get(&mut self, shard: u32, key: &[u8], now: i64) -> Result<Option<Vec<Value>>> {
        self.tick(now);
        shard_key(&mut self.key_buf, shard, key);
        let Some(value) = self.db.get_pinned(&self.key_buf).map_err(|e| labelled_db_error(LABEL, &self.dir, e))? else {
            return Ok(None);
        };
        if expired(self.ttl_ms, entry_written(&value)?, now) {
            return Ok(None);
        }
        Ok(Some(decode_entry(&value)?.1))
    }

    fn put(&mut self, shard: u32, key: &[u8], row: &[Value], written: i64) -> Result<()> {
        shard_key(&mut self.key_buf, shard, key);
        self.value_buf.clear();
        encode_entry(written, row, &mut self.value_buf);
        self.db.put_opt(&self.key_buf, &self.value_buf, &self.write_opts).map_err(|e| labelled_db_error(LABEL, &self.dir, e))
    }

    fn delete(&mut self, shard: u32, key: &[u8]) -> Result<()> {
        shard_key(&mut self.key_buf, shard, key);
        self.db.delete_opt(&self.key_buf, &self.write_opts).map_err(|e| labelled_db_error(LABEL, &self.dir, e))
    }

    fn expire(&mut self, now: i64) -> Result<()> {
        // The compaction filter does the removing, in the background.
        self.tick(now);
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path) -> Result<()> {
        write_checkpoint(LABEL, &self.db, &self.dir, dir)
    }

    fn restore(&mut self, dir: &Path, owns: &dyn Fn(u32) -> bool) -> Result<()> {
        let mut batch = WriteBatch::default();
        let mut key_buf = Vec::new();
        let (db, write_opts, own_dir) = (&self.db, &self.write_opts, &self.dir);
        let merge = std::mem::replace(&mut self.restored, true);
        super::read_snapshot(dir, owns, &mut |shard, key, entry| {
            shard_key(&mut key_buf, shard, key);
            if merge {
                if let Some(held) = db.get_pinned(&key_buf).map_err(|e| labelled_db_error(LABEL, own_dir, e))? {
                    if entry_written(&held)? > entry_written(entry)? {
                        return Ok(());
                    }
                }
            }
            batch.put(&key_buf, entry);
            if batch.len() >= RESTORE_BATCH {
                db.write_opt(std::mem::take(&mut batch), write_opts).map_err(|e| labelled_db_error(LABEL, own_dir, e))?;
            }
            Ok(())
        })?;
        self.db.write_opt(batch, &self.write_opts).map_err(|e| labelled_db_error(LABEL, &self.dir, e))
    }
}

/// Calls `f(shard, key, entry)` for every entry of the checkpoint in `dir` whose shard `owns`
/// accepts.
pub(super) fn read_snapshot(dir: &Path, owns: &dyn Fn(u32) -> bool, f: &mut EntryVisitor<'_>) -> Result<()> {
    let db = open_snapshot(LABEL, dir)?;
    let mut it = db.raw_iterator();
    it.seek_to_first();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        let Some((shard, user_key)) = key.split_first_chunk::<4>() else {
            return Err(TaskError::internal(format!("{LABEL} (RocksDB in {}): corrupt entry (key too short)", dir.display())));
        };
        let shard = u32::from_be_bytes(*shard);
        if owns(shard) {
            f(shard, user_key, value)?;
            it.next();
        } else {
            // Skip the rest of this shard in one seek.
            let Some(next) = shard.checked_add(1) else { break };
            it.seek(next.to_be_bytes());
        }
    }
    it.status().map_err(|e| labelled_db_error(LABEL, dir, e))
}
