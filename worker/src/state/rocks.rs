//! Window state in RocksDB, with a write-back cache in front.
//!
//! Layout: one RocksDB key per (key group, key, slice):
//! `key group (u16 big-endian) | encoded key | slice end (i64 big-endian, sign bit flipped)`,
//! and the value is the [`encode_accs`] encoding of the accumulators. Keys are encoded prefix-free
//! ([`crate::codec::encode_value`]), so in RocksDB's byte order one key's slices are adjacent and
//! in time order (a window's result for a key is one sequential run), and the entries of a range of
//! key groups are one contiguous key range (a rescale reads exactly the groups it needs).
//!
//! Write-back cache: a get and a put per record would cost microseconds each. Entries touched
//! since the last flush live instead in a hash map (decoded, updated in place); they are written
//! in one `WriteBatch` when the map outgrows [`CACHE_ENTRIES`], before a scan
//! ([`WindowState::for_each_key`]) and before a snapshot. Writes skip the WAL: durability comes
//! from checkpoints, and after a crash the state is rebuilt from the last one, never reopened.
//!
//! A `BTreeMap` of slice end → number of entries, kept in memory, answers `first_slice` and `len`
//! without touching RocksDB (it is rebuilt by a key scan on restore).
//!
//! Dropping is lazy: `drop_through` only raises a bound below which entries are dead; reads skip
//! them and the next scan deletes them. The window operator rarely scans (it keeps running
//! aggregates), so once the dead entries outnumber the live ones `drop_through` scans to delete
//! them: every entry is read a bounded number of times over its life. A snapshot stores the bound
//! beside the checkpoint (file [`DEAD_FILE`]) so that a restore skips them too.
//!
//! Snapshots are RocksDB checkpoints: the memtable is flushed and the live SST files are
//! hard-linked into the snapshot directory, with the small MANIFEST, CURRENT and OPTIONS files.
//! SST files never change and their names are unique within one DB, so the uploader only needs to
//! send the SST files it has not sent for an earlier checkpoint: checkpoints are incremental.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use rocksdb::checkpoint::Checkpoint;
use rocksdb::{DBCompressionType, Options, ReadOptions, WriteBatch, WriteOptions, DB};
use rustc_hash::FxHashMap;

use super::{decode_accs, encode_accs, io_error, Accs, EntryVisitor, KeyVisitor, WindowState};
use crate::error::{Result, TaskError};

/// Entries the write-back cache holds before it is flushed (about 100 bytes each with their key).
pub const CACHE_ENTRIES: usize = 100_000;

/// Name of the file beside a checkpoint that holds the dead-entry bound.
const DEAD_FILE: &str = "EDDY-DROPPED-THROUGH";
/// Version of [`DEAD_FILE`], its first byte.
const DEAD_FILE_VERSION: u8 = 1;

/// Entries written per `WriteBatch` when restoring.
const RESTORE_BATCH: usize = 10_000;

/// Window state in RocksDB (see the module docs).
pub struct RocksWindowState {
    db: DB,
    dir: PathBuf,
    write_opts: WriteOptions,
    /// Entries changed since the last flush, by RocksDB key.
    cache: FxHashMap<Box<[u8]>, Accs>,
    /// Number of live entries per slice end, in RocksDB and the cache together.
    slices: BTreeMap<i64, usize>,
    /// Entries with a slice ending at or before this are dead, though maybe still in RocksDB.
    /// `i64::MIN` when there are none.
    dead_through: i64,
    /// Entries below `dead_through` that may still be in RocksDB.
    dead_entries: usize,
    /// The last entry [`WindowState::get`] read from RocksDB.
    read: Accs,
    key_buf: Vec<u8>,
    value_buf: Vec<u8>,
}

impl std::fmt::Debug for RocksWindowState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RocksWindowState").field("dir", &self.dir).field("cached", &self.cache.len()).finish_non_exhaustive()
    }
}

impl RocksWindowState {
    /// Opens an empty state whose database lives in `dir` (created if missing). A database left in
    /// `dir` by an earlier run is deleted: state always starts empty and is restored from a
    /// checkpoint.
    pub fn open(dir: &Path) -> Result<RocksWindowState> {
        let db = open_fresh(LABEL, &db_options(), dir)?;
        Ok(RocksWindowState {
            db,
            dir: dir.to_path_buf(),
            write_opts: unlogged(),
            cache: FxHashMap::default(),
            slices: BTreeMap::new(),
            dead_through: i64::MIN,
            dead_entries: 0,
            read: Accs::default(),
            key_buf: Vec::new(),
            value_buf: Vec::new(),
        })
    }

    /// Writes the cache to RocksDB and empties it.
    fn flush(&mut self) -> Result<()> {
        if self.cache.is_empty() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (key, accs) in self.cache.drain() {
            self.value_buf.clear();
            encode_accs(&accs, &mut self.value_buf);
            batch.put(key, &self.value_buf);
        }
        self.db.write_opt(batch, &self.write_opts).map_err(|e| db_error(&self.dir, e))
    }

    /// Flushes the cache and deletes every dead entry, so that all of RocksDB is live.
    fn purge(&mut self) -> Result<()> {
        self.flush()?;
        if self.dead_through != i64::MIN {
            self.for_each_key(i64::MAX, i64::MAX, &mut |_, _, _| {})?;
        }
        Ok(())
    }

    /// Recounts the entries per slice from RocksDB (after a flush).
    fn recount(&mut self) -> Result<()> {
        self.slices.clear();
        let mut it = self.db.raw_iterator();
        it.seek_to_first();
        while let Some(key) = it.key() {
            let (_, _, slice_end) = split_key(key).map_err(|e| corrupt(&self.dir, e))?;
            if slice_end > self.dead_through {
                *self.slices.entry(slice_end).or_default() += 1;
            }
            it.next();
        }
        it.status().map_err(|e| db_error(&self.dir, e))
    }
}

impl WindowState for RocksWindowState {
    fn accumulators(&mut self, key_group: u32, key: &[u8], slice_end: i64, init: &dyn Fn() -> Accs) -> Result<&mut Accs> {
        self.key_buf.clear();
        put_key(&mut self.key_buf, key_group, key, slice_end)?;
        if !self.cache.contains_key(self.key_buf.as_slice()) {
            if slice_end <= self.dead_through {
                // A dead entry of this slice may still be on disk: it must not come back.
                self.purge()?;
            }
            if self.cache.len() >= CACHE_ENTRIES {
                self.flush()?;
            }
            let accs = match self.db.get_pinned(&self.key_buf).map_err(|e| db_error(&self.dir, e))? {
                Some(value) => decode_accs(&value)?,
                None => {
                    *self.slices.entry(slice_end).or_default() += 1;
                    init()
                }
            };
            self.cache.insert(self.key_buf.as_slice().into(), accs);
        }
        Ok(self.cache.get_mut(self.key_buf.as_slice()).expect("inserted above"))
    }

    fn get(&mut self, key_group: u32, key: &[u8], slice_end: i64) -> Result<Option<&Accs>> {
        if slice_end <= self.dead_through {
            return Ok(None);
        }
        self.key_buf.clear();
        put_key(&mut self.key_buf, key_group, key, slice_end)?;
        if self.cache.contains_key(self.key_buf.as_slice()) {
            return Ok(self.cache.get(self.key_buf.as_slice()));
        }
        let Some(value) = self.db.get_pinned(&self.key_buf).map_err(|e| db_error(&self.dir, e))? else { return Ok(None) };
        self.read = decode_accs(&value)?;
        Ok(Some(&self.read))
    }

    fn first_slice(&self) -> Option<i64> {
        self.slices.keys().next().copied()
    }

    fn for_each_key(&mut self, after: i64, through: i64, f: &mut KeyVisitor<'_>) -> Result<()> {
        self.flush()?;
        let dead_through = self.dead_through;
        let mut deletes = WriteBatch::default();
        // The (key group, key) prefix of the key being gathered, and its slices in range.
        let mut current: Vec<u8> = Vec::new();
        let mut slices: Vec<(i64, Accs)> = Vec::new();
        let mut emit = |prefix: &[u8], slices: &mut Vec<(i64, Accs)>| {
            if !slices.is_empty() {
                let key_group = u16::from_be_bytes([prefix[0], prefix[1]]) as u32;
                f(key_group, &prefix[2..], &mut slices.iter().map(|(s, a)| (*s, a)));
                slices.clear();
            }
        };
        let mut it = self.db.raw_iterator();
        it.seek_to_first();
        while let (Some(key), Some(value)) = (it.key(), it.value()) {
            let (_, user_key, slice_end) = split_key(key).map_err(|e| corrupt(&self.dir, e))?;
            if slice_end <= dead_through {
                deletes.delete(key);
            } else {
                let prefix = &key[..2 + user_key.len()];
                if prefix != current.as_slice() {
                    emit(&current, &mut slices);
                    current.clear();
                    current.extend_from_slice(prefix);
                }
                if slice_end > after && slice_end <= through {
                    slices.push((slice_end, decode_accs(value)?));
                }
            }
            it.next();
        }
        it.status().map_err(|e| db_error(&self.dir, e))?;
        emit(&current, &mut slices);
        drop(it);
        if !deletes.is_empty() {
            self.db.write_opt(deletes, &self.write_opts).map_err(|e| db_error(&self.dir, e))?;
        }
        self.dead_through = i64::MIN;
        self.dead_entries = 0;
        Ok(())
    }

    fn drop_through(&mut self, through: i64) -> Result<()> {
        if self.first_slice().is_none_or(|first| first > through) {
            return Ok(());
        }
        let live = self.slices.split_off(&through.saturating_add(1));
        self.dead_entries += self.slices.values().sum::<usize>();
        self.slices = live;
        self.cache.retain(|key, _| split_key(key).is_ok_and(|(_, _, s)| s > through));
        self.dead_through = self.dead_through.max(through);
        // Once the dead outnumber the live, one scan deletes them all: each entry is scanned a
        // bounded number of times over its life, however rarely the window itself scans.
        if self.dead_entries > self.len().max(CACHE_ENTRIES) {
            self.purge()?;
        }
        Ok(())
    }

    fn len(&self) -> usize {
        self.slices.values().sum()
    }

    fn snapshot(&mut self, dir: &Path) -> Result<()> {
        self.flush()?;
        write_checkpoint(LABEL, &self.db, &self.dir, dir)?;
        let path = dir.join(DEAD_FILE);
        let mut bound = vec![DEAD_FILE_VERSION];
        bound.extend_from_slice(&self.dead_through.to_le_bytes());
        std::fs::write(&path, bound).map_err(|e| io_error("writing", &path, e))
    }

    fn restore(&mut self, dir: &Path, key_groups: Range<u32>) -> Result<()> {
        // Everything on disk is then live, so restored entries cannot be mistaken for dead ones.
        self.purge()?;
        let mut batch = WriteBatch::default();
        let mut key_buf = Vec::new();
        let (db, write_opts, own_dir) = (&self.db, &self.write_opts, &self.dir);
        super::read_snapshot(dir, key_groups, &mut |key_group, key, slice_end, accs| {
            key_buf.clear();
            put_key(&mut key_buf, key_group, key, slice_end)?;
            batch.put(&key_buf, accs);
            if batch.len() >= RESTORE_BATCH {
                db.write_opt(std::mem::take(&mut batch), write_opts).map_err(|e| db_error(own_dir, e))?;
            }
            Ok(())
        })?;
        self.db.write_opt(batch, &self.write_opts).map_err(|e| db_error(&self.dir, e))?;
        self.recount()
    }
}

/// Whether `dir` holds a RocksDB checkpoint.
pub(super) fn is_snapshot(dir: &Path) -> bool {
    dir.join("CURRENT").is_file()
}

/// Calls `f(key_group, key, slice_end, encoded accs)` for every live entry of the checkpoint in
/// `dir` whose key group is in `key_groups`, reading only that key range.
pub(super) fn read_snapshot(dir: &Path, key_groups: Range<u32>, f: &mut EntryVisitor<'_>) -> Result<()> {
    let dead_through = match std::fs::read(dir.join(DEAD_FILE)) {
        Ok(bytes) => match bytes.split_first() {
            Some((&DEAD_FILE_VERSION, bound)) if bound.len() == 8 => i64::from_le_bytes(bound.try_into().expect("8 bytes")),
            _ => return Err(corrupt(dir, "bad dropped-through file")),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => i64::MIN,
        Err(e) => return Err(io_error("reading", &dir.join(DEAD_FILE), e)),
    };
    let start = key_groups.start.min(u16::MAX as u32 + 1);
    if start >= key_groups.end {
        return Ok(());
    }
    let db = open_snapshot(LABEL, dir)?;
    let mut read = ReadOptions::default();
    read.fill_cache(false);
    read.set_iterate_lower_bound((start as u16).to_be_bytes().to_vec());
    if key_groups.end <= u16::MAX as u32 {
        read.set_iterate_upper_bound((key_groups.end as u16).to_be_bytes().to_vec());
    }
    let mut it = db.raw_iterator_opt(read);
    it.seek_to_first();
    while let (Some(key), Some(value)) = (it.key(), it.value()) {
        let (key_group, user_key, slice_end) = split_key(key).map_err(|e| corrupt(dir, e))?;
        if slice_end > dead_through {
            f(key_group, user_key, slice_end, value)?;
        }
        it.next();
    }
    it.status().map_err(|e| db_error(dir, e))
}

/// Appends the RocksDB key of (`key_group`, `key`, `slice_end`).
fn put_key(out: &mut Vec<u8>, key_group: u32, key: &[u8], slice_end: i64) -> Result<()> {
    let key_group = u16::try_from(key_group)
        .map_err(|_| TaskError::internal(format!("window state: key group {key_group} exceeds the RocksDB layout's 65535")))?;
    out.extend_from_slice(&key_group.to_be_bytes());
    out.extend_from_slice(key);
    // Flipping the sign bit makes big-endian byte order agree with numeric order.
    out.extend_from_slice(&((slice_end as u64) ^ (1 << 63)).to_be_bytes());
    Ok(())
}

/// Splits a RocksDB key into key group, key and slice end.
fn split_key(raw: &[u8]) -> std::result::Result<(u32, &[u8], i64), &'static str> {
    if raw.len() < 10 {
        return Err("key too short");
    }
    let (head, slice) = raw.split_at(raw.len() - 8);
    let key_group = u16::from_be_bytes([head[0], head[1]]) as u32;
    let slice_end = (u64::from_be_bytes(slice.try_into().expect("8 bytes")) ^ (1 << 63)) as i64;
    Ok((key_group, &head[2..], slice_end))
}

/// What this state calls itself in errors.
const LABEL: &str = "window state";

fn db_error(dir: &Path, e: rocksdb::Error) -> TaskError {
    labelled_db_error(LABEL, dir, e)
}

/// An error of the RocksDB database in `dir`, used by the state called `label`.
pub(super) fn labelled_db_error(label: &str, dir: &Path, e: rocksdb::Error) -> TaskError {
    TaskError::internal(format!("{label} (RocksDB in {}): {e}", dir.display()))
}

/// Options shared by Eddy's RocksDB states.
pub(super) fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    // No compression library is compiled in; say so rather than rely on the default.
    opts.set_compression_type(DBCompressionType::None);
    // Large enough that a checkpoint interval's updates usually fit one memtable.
    opts.set_write_buffer_size(64 << 20);
    opts.set_max_write_buffer_number(3);
    opts.set_max_background_jobs(2);
    opts.set_keep_log_file_num(2);
    opts.set_max_log_file_size(4 << 20);
    opts
}

/// Write options of every state write: no WAL, since durability comes from checkpoints and after a
/// crash the state is rebuilt from the last one, never reopened.
pub(super) fn unlogged() -> WriteOptions {
    let mut write_opts = WriteOptions::default();
    write_opts.disable_wal(true);
    write_opts
}

/// Opens an empty database in `dir` (created if missing), deleting one left by an earlier run:
/// state always starts empty and is restored from a checkpoint.
pub(super) fn open_fresh(label: &str, opts: &Options, dir: &Path) -> Result<DB> {
    std::fs::create_dir_all(dir).map_err(|e| TaskError::internal(format!("{label}: creating {}: {e}", dir.display())))?;
    if dir.join("CURRENT").exists() {
        DB::destroy(opts, dir).map_err(|e| labelled_db_error(label, dir, e))?;
    }
    DB::open(opts, dir).map_err(|e| labelled_db_error(label, dir, e))
}

/// Writes a RocksDB checkpoint of `db` (whose files are in `db_dir`) into `dir`, which does not
/// exist yet or is empty: hard links to its SST files plus the small metadata files.
pub(super) fn write_checkpoint(label: &str, db: &DB, db_dir: &Path, dir: &Path) -> Result<()> {
    let io = |what: &str, path: &Path, e: std::io::Error| TaskError::internal(format!("{label}: {what} {}: {e}", path.display()));
    // RocksDB creates the checkpoint directory itself (not its parents) and refuses an existing one.
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(|e| io("removing (it must be empty)", dir, e))?;
    } else if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(|e| io("creating", parent, e))?;
    }
    // With a flush threshold of 0 (the crate's), the memtable is flushed first, so the checkpoint
    // is SST files plus metadata, and needs no WAL.
    let checkpoint = Checkpoint::new(db).map_err(|e| labelled_db_error(label, db_dir, e))?;
    checkpoint.create_checkpoint(dir).map_err(|e| labelled_db_error(label, db_dir, e))
}

/// Opens the checkpoint in `dir` for reading.
pub(super) fn open_snapshot(label: &str, dir: &Path) -> Result<DB> {
    let mut opts = Options::default();
    opts.set_keep_log_file_num(1);
    DB::open_for_read_only(&opts, dir, false).map_err(|e| labelled_db_error(label, dir, e))
}

fn corrupt(dir: &Path, what: &str) -> TaskError {
    TaskError::internal(format!("window state (RocksDB in {}): corrupt entry ({what})", dir.display()))
}
