//! One coordinator's Raft storage in RocksDB: the log, the hard state, the last snapshot, and the
//! metadata as applied (with the raft index it is applied through), so that a restart reads all
//! of it back as it was after its last whole write.
//!
//! Every change is one `WriteBatch`: [`DiskStorage::persist`] writes a Ready's snapshot, entries
//! and hard state together (synced when raft asks for it); [`DiskStorage::apply`] writes the
//! state, the applied index and the membership together after applying committed entries.

use std::collections::BTreeMap;
use std::path::Path;

use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState, StorageError};
use rocksdb::{WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};

use crate::meta::MetaState;

const HARD_STATE: &[u8] = b"m/hard_state";
const SNAPSHOT: &[u8] = b"m/snapshot";
const APPLIED: &[u8] = b"m/applied";
const ENTRY: u8 = b'e';

fn entry_key(index: u64) -> [u8; 9] {
    let mut key = [ENTRY; 9];
    key[1..].copy_from_slice(&index.to_be_bytes());
    key
}

/// What a snapshot holds, and what is kept applied: the metadata and the coordinators.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Applied {
    /// The raft index applied through.
    pub index: u64,
    /// Its term (for the snapshot's metadata).
    pub term: u64,
    /// The voters, as of `index`.
    pub voters: Vec<u64>,
    /// Each coordinator's address (raft and API), by raft id.
    pub peers: BTreeMap<u64, String>,
    pub state: MetaState,
}

/// Raft storage on one RocksDB database.
pub struct DiskStorage {
    db: DB,
    hard_state: HardState,
    /// The last snapshot's index and term: entries up to it are gone.
    snapshot: SnapshotMetadata,
    last: u64,
    applied: Applied,
}

fn storage_error(e: impl std::fmt::Display) -> raft::Error {
    raft::Error::Store(StorageError::Other(e.to_string().into()))
}

impl DiskStorage {
    /// Opens the storage in `dir`. An existing one keeps what it holds. A new one of a new cluster
    /// starts with `peers` as the voters (the same on every coordinator), as if from a snapshot
    /// at index 1, so that a coordinator added later catches up from a snapshot (which carries
    /// the membership) rather than from a log that never held the first one. A new one that
    /// `join`s an existing cluster starts empty and waits for the leader.
    pub fn open(dir: &Path, peers: &BTreeMap<u64, String>, join: bool) -> anyhow::Result<DiskStorage> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = DB::open(&options, dir)
            .map_err(|e| anyhow::anyhow!("cannot open the raft storage in {}: {e}; is another coordinator using it?", dir.display()))?;
        let hard_state = match db.get(HARD_STATE)? {
            Some(b) => HardState::parse_from_bytes(&b)?,
            None => HardState::default(),
        };
        let snapshot = match db.get(SNAPSHOT)? {
            Some(b) => Snapshot::parse_from_bytes(&b)?.take_metadata(),
            None => SnapshotMetadata::default(),
        };
        let applied = match db.get(APPLIED)? {
            Some(b) => serde_json::from_slice(&b)?,
            None => Applied { peers: peers.clone(), ..Applied::default() },
        };
        let fresh = db.get(APPLIED)?.is_none();
        let mut last = snapshot.index;
        {
            let mut iter = db.raw_iterator();
            iter.seek_for_prev(entry_key(u64::MAX));
            if let Some(key) = iter.key().filter(|k| k.len() == 9 && k[0] == ENTRY) {
                last = last.max(u64::from_be_bytes(key[1..].try_into().expect("9-byte key")));
            }
        }
        let mut storage = DiskStorage { db, hard_state, snapshot, last, applied };
        if fresh && !join {
            let mut first = Snapshot::default();
            let applied =
                Applied { index: 1, term: 1, voters: peers.keys().copied().collect(), peers: peers.clone(), state: MetaState::default() };
            first.set_data(serde_json::to_vec(&applied)?.into());
            let meta = first.mut_metadata();
            meta.index = 1;
            meta.term = 1;
            meta.mut_conf_state().set_voters(applied.voters.clone());
            storage.persist(Some(&first), &[], None, true)?;
        }
        Ok(storage)
    }

    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn hard_state(&self) -> &HardState {
        &self.hard_state
    }

    /// Writes a Ready's snapshot (replacing the log and the applied state), new entries (replacing
    /// any from the same index on) and hard state in one batch.
    pub fn persist(
        &mut self,
        snapshot: Option<&Snapshot>,
        entries: &[Entry],
        hard_state: Option<&HardState>,
        sync: bool,
    ) -> anyhow::Result<()> {
        let mut batch = WriteBatch::default();
        let mut last = self.last;
        let mut applied = None;
        let mut hs = hard_state.cloned().unwrap_or_else(|| self.hard_state.clone());
        if let Some(snap) = snapshot {
            let meta = snap.get_metadata();
            let mut state: Applied = serde_json::from_slice(snap.get_data())?;
            state.index = meta.index;
            state.term = meta.term;
            state.voters = meta.get_conf_state().get_voters().to_vec();
            batch.put(SNAPSHOT, snap.write_to_bytes()?);
            batch.put(APPLIED, serde_json::to_vec(&state)?);
            batch.delete_range(entry_key(0), entry_key(u64::MAX));
            hs.term = hs.term.max(meta.term);
            hs.commit = hs.commit.max(meta.index);
            last = meta.index;
            applied = Some(state);
        }
        if let Some(first) = entries.first() {
            // Entries from `first` on replace what the log held there.
            if first.index <= last {
                batch.delete_range(entry_key(first.index), entry_key(last + 1));
            }
            for e in entries {
                batch.put(entry_key(e.index), e.write_to_bytes()?);
            }
            last = entries.last().expect("not empty").index;
        }
        if snapshot.is_some() || hard_state.is_some() {
            batch.put(HARD_STATE, hs.write_to_bytes()?);
        }
        let mut options = WriteOptions::default();
        options.set_sync(sync);
        self.db.write_opt(batch, &options)?;
        self.last = last;
        self.hard_state = hs;
        if let Some(state) = applied {
            self.snapshot = snapshot.expect("with the state").get_metadata().clone();
            self.applied = state;
        }
        Ok(())
    }

    /// Makes `applied` (the result of applying committed entries) the state kept, in one write.
    pub fn apply(&mut self, applied: Applied) -> anyhow::Result<()> {
        self.db.put(APPLIED, serde_json::to_vec(&applied)?)?;
        self.applied = applied;
        Ok(())
    }

    /// Takes a snapshot of the applied state and drops the log entries it holds.
    pub fn compact(&mut self) -> anyhow::Result<()> {
        let snap = self.snapshot_of_applied()?;
        let index = snap.get_metadata().index;
        let mut batch = WriteBatch::default();
        batch.put(SNAPSHOT, snap.write_to_bytes()?);
        batch.delete_range(entry_key(0), entry_key(index + 1));
        self.db.write(batch)?;
        self.snapshot = snap.get_metadata().clone();
        Ok(())
    }

    /// Entries in the log (for deciding when to compact).
    pub fn log_len(&self) -> u64 {
        self.last - self.snapshot.index
    }

    fn snapshot_of_applied(&self) -> raft::Result<Snapshot> {
        let mut snap = Snapshot::default();
        snap.set_data(serde_json::to_vec(&self.applied).map_err(storage_error)?.into());
        let meta = snap.mut_metadata();
        meta.index = self.applied.index;
        meta.term = self.applied.term;
        let mut conf = ConfState::default();
        conf.set_voters(self.applied.voters.clone());
        meta.set_conf_state(conf);
        Ok(snap)
    }

    fn first(&self) -> u64 {
        self.snapshot.index + 1
    }
}

impl raft::Storage for DiskStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mut conf = ConfState::default();
        conf.set_voters(self.applied.voters.clone());
        Ok(RaftState::new(self.hard_state.clone(), conf))
    }

    fn entries(&self, low: u64, high: u64, max_size: impl Into<Option<u64>>, _: GetEntriesContext) -> raft::Result<Vec<Entry>> {
        if low < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if high > self.last + 1 {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let mut entries = Vec::with_capacity((high - low) as usize);
        let mut iter = self.db.raw_iterator();
        iter.seek(entry_key(low));
        while let (Some(key), Some(value)) = (iter.key(), iter.value()) {
            if key >= &entry_key(high)[..] {
                break;
            }
            entries.push(Entry::parse_from_bytes(value).map_err(storage_error)?);
            iter.next();
        }
        iter.status().map_err(storage_error)?;
        if entries.len() as u64 != high - low {
            return Err(storage_error(format!("the raft log lacks entries between {low} and {high}")));
        }
        raft::util::limit_size(&mut entries, max_size.into());
        Ok(entries)
    }

    fn term(&self, index: u64) -> raft::Result<u64> {
        if index == self.snapshot.index {
            return Ok(self.snapshot.term);
        }
        if index < self.first() {
            return Err(raft::Error::Store(StorageError::Compacted));
        }
        if index > self.last {
            return Err(raft::Error::Store(StorageError::Unavailable));
        }
        let bytes =
            self.db.get(entry_key(index)).map_err(storage_error)?.ok_or_else(|| storage_error(format!("raft entry {index} is missing")))?;
        Ok(Entry::parse_from_bytes(&bytes).map_err(storage_error)?.term)
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(self.first())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(self.last)
    }

    fn snapshot(&self, request_index: u64, _to: u64) -> raft::Result<Snapshot> {
        if self.applied.index < request_index {
            return Err(raft::Error::Store(StorageError::SnapshotTemporarilyUnavailable));
        }
        self.snapshot_of_applied()
    }
}
