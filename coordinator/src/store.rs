//! What the coordinator keeps on disk: the records of its jobs (made durable through
//! [`crate::meta`]) and the checkpoint manifests, with their garbage collection in checkpoint
//! storage. The records are small (specs and checkpoint references); the manifests live next to
//! the checkpoint files.

use std::collections::BTreeSet;
use std::sync::Arc;

use eddy_proto::{layout, CheckpointManifest};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};
use prost::Message;
use serde::{Deserialize, Serialize};

use crate::state::JobState;
use tokio_stream::StreamExt;

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRecord {
    /// Job id.
    pub job_id: String,
    /// The spec as submitted.
    pub spec: String,
    /// Parallelism set by a rescale, overriding the spec's default.
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// Attempt of the last deployment.
    pub attempt: u64,
    /// Job state when stored.
    pub state: JobState,
    /// Why it is in that state.
    pub cause: String,
    /// Unix ms.
    pub submitted_at_ms: i64,
    /// Next checkpoint id.
    pub next_checkpoint_id: u64,
    /// Restarts after failures so far.
    #[serde(default)]
    pub restarts: u32,
    /// Kept checkpoints and savepoints, oldest first.
    pub checkpoints: Vec<CheckpointRecord>,
    /// The savepoint the job was submitted from, restored until its first checkpoint completes.
    #[serde(default)]
    pub from_savepoint: Option<String>,
}

/// A completed checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointRecord {
    /// Checkpoint id.
    pub id: u64,
    /// Whether it is a savepoint.
    pub savepoint: bool,
    /// Unix ms.
    pub triggered_at_ms: i64,
    /// Time to complete.
    pub duration_ms: u64,
    /// Sizes.
    pub full_bytes: u64,
    /// Bytes uploaded for this checkpoint.
    pub incremental_bytes: u64,
}

/// Which shared state files (RocksDB's immutable `.sst` files, uploaded once and referenced by
/// every later checkpoint that still holds them) a collection may delete, besides needing to be
/// referenced by no kept checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SharedGc {
    /// Those first uploaded for a checkpoint up to `checkpoint`: a later one is in flight, and its
    /// files are on their way. Files of the older layout, which name no checkpoint, only if the
    /// store last modified them before `before_ms` (comparing clocks of two machines: kept only
    /// for checkpoints taken before the layout changed).
    Through { checkpoint: u64, before_ms: i64 },
    /// None: a checkpoint of the job could not be read, and its files may be needed.
    Keep,
}

/// Checkpoint storage as the coordinator uses it: manifests and garbage collection.
#[derive(Clone)]
pub struct CheckpointStore {
    root: String,
    store: Arc<dyn ObjectStore>,
}

impl CheckpointStore {
    /// Storage named as the user wrote it (`--checkpoint-dir`): a directory, created when
    /// missing, or an `s3://bucket/prefix` URL.
    pub fn open(name: &str) -> anyhow::Result<CheckpointStore> {
        let opened = eddy_proto::storage::open(name).map_err(anyhow::Error::msg)?;
        Ok(CheckpointStore { root: opened.url, store: opened.store })
    }

    /// The root, as workers are told.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Stores a manifest; the checkpoint is complete once this returns.
    pub async fn put_manifest(&self, m: &CheckpointManifest) -> Result<(), String> {
        let path = layout::manifest(&m.job_id, m.checkpoint_id);
        self.store
            .put(&StorePath::from(path.as_str()), PutPayload::from(m.encode_to_vec()))
            .await
            .map(|_| ())
            .map_err(|e| format!("storing {path}: {e}"))
    }

    /// Reads a manifest back.
    pub async fn get_manifest(&self, job_id: &str, id: u64) -> anyhow::Result<CheckpointManifest> {
        let path = layout::manifest(job_id, id);
        let bytes = self.store.get(&StorePath::from(path.as_str())).await?.bytes().await?;
        Ok(CheckpointManifest::decode(bytes)?)
    }

    /// Deletes dropped checkpoints' own files, then the shared files of the job that no kept
    /// checkpoint references and that `shared` lets go. Checkpoints that never completed
    /// (aborted, declined, or cut short by a restart) and are older than the newest kept one go
    /// too: they have no manifest, and nothing completes them any more.
    pub async fn collect(&self, job_id: &str, dropped: Vec<u64>, kept: Vec<Arc<CheckpointManifest>>, shared: SharedGc) {
        let kept_ids: BTreeSet<u64> = kept.iter().map(|m| m.checkpoint_id).collect();
        let abandoned = match kept_ids.last() {
            Some(&newest) => self.abandoned(job_id, newest, &kept_ids).await,
            None => Vec::new(),
        };
        for id in dropped.into_iter().chain(abandoned) {
            self.delete_prefix(&layout::checkpoint_dir(job_id, id), |_| true).await;
        }
        let SharedGc::Through { checkpoint, before_ms } = shared else { return };
        let referenced: BTreeSet<String> = kept
            .iter()
            .flat_map(|m| m.tasks.values())
            .flat_map(|t| t.operators.iter())
            .flat_map(|o| o.files.iter().map(|f| f.path.clone()))
            .collect();
        self.delete_prefix(&layout::shared_dir(job_id), |meta| {
            let path = meta.location.as_ref();
            !referenced.contains(path)
                && match layout::uploaded_for(path) {
                    Some(id) => id <= checkpoint,
                    // The layout before files named their checkpoint: by age, on the store's clock.
                    None => meta.last_modified.timestamp_millis() < before_ms,
                }
        })
        .await;
    }

    /// A job ended for good: deletes its checkpoints (`released`) and every file no kept
    /// savepoint references, or the job's whole folder when it keeps none. With `shared` set to
    /// [`SharedGc::Keep`], shared files and the folder stay.
    pub async fn release(&self, job_id: &str, released: Vec<u64>, savepoints: Vec<Arc<CheckpointManifest>>, shared: SharedGc) {
        if savepoints.is_empty() && shared != SharedGc::Keep {
            self.delete_prefix(job_id, |_| true).await;
        } else {
            self.collect(job_id, released, savepoints, shared).await;
        }
    }

    /// Ids of the job's checkpoint folders below `newest`, not kept, that hold no manifest.
    async fn abandoned(&self, job_id: &str, newest: u64, kept: &BTreeSet<u64>) -> Vec<u64> {
        let listing = match self.store.list_with_delimiter(Some(&StorePath::from(job_id))).await {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(job_id, error = %e, "listing checkpoint folders failed; collection skipped");
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for folder in listing.common_prefixes {
            let Some(id) = folder.filename().and_then(layout::checkpoint_of_folder) else {
                continue;
            };
            if id >= newest || kept.contains(&id) {
                continue;
            }
            // A manifest that is there but not kept (one the coordinator could not read at start)
            // may still be wanted: only folders without one are abandoned.
            if matches!(self.store.head(&StorePath::from(layout::manifest(job_id, id))).await, Err(object_store::Error::NotFound { .. })) {
                out.push(id);
            }
        }
        out
    }

    async fn delete_prefix(&self, prefix: &str, keep_if_not: impl Fn(&object_store::ObjectMeta) -> bool) {
        let prefix = StorePath::from(prefix);
        let mut listing = self.store.list(Some(&prefix));
        let mut doomed = Vec::new();
        while let Some(item) = listing.next().await {
            match item {
                Ok(meta) if keep_if_not(&meta) => doomed.push(meta.location),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(%prefix, error = %e, "listing checkpoint files failed; collection skipped");
                    return;
                }
            }
        }
        drop(listing);
        for path in doomed {
            if let Err(e) = self.store.delete(&path).await {
                tracing::warn!(%path, error = %e, "deleting a checkpoint file failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_proto::{StateFile, TaskSnapshot};

    #[tokio::test]
    async fn checkpoints_that_never_completed_are_collected_once_a_newer_one_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let store = CheckpointStore::open(dir.to_str().unwrap()).unwrap();
        let put = |path: &str| {
            let (store, path) = (store.store.clone(), StorePath::from(path));
            async move { store.put(&path, PutPayload::from(vec![1u8])).await.unwrap() }
        };
        let manifest = |id| CheckpointManifest { job_id: "job".into(), checkpoint_id: id, ..Default::default() };
        // 1: completed, then not kept but with its manifest (unreadable at start, say); 2: aborted;
        // 3: the newest completed; 4: in progress.
        store.put_manifest(&manifest(1)).await.unwrap();
        put("job/chk-2/1.0/op3/MANIFEST-000005").await;
        store.put_manifest(&manifest(3)).await.unwrap();
        put("job/chk-3/1.0/op3/MANIFEST-000009").await;
        put("job/chk-4/1.0/op3/MANIFEST-000012").await;
        store.collect("job", Vec::new(), vec![Arc::new(manifest(3))], SharedGc::Through { checkpoint: 3, before_ms: 0 }).await;
        let left: BTreeSet<String> =
            std::fs::read_dir(dir.join("job")).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        assert_eq!(left, ["chk-1", "chk-3", "chk-4"].map(String::from).into_iter().collect());
    }

    /// Shared files are judged by the checkpoint they were uploaded for, not by clocks: a file of
    /// the checkpoint in flight stays however old its time stamp looks, and nothing shared goes
    /// while a checkpoint of the job could not be read.
    #[tokio::test]
    async fn shared_files_of_a_checkpoint_in_flight_stay_whatever_the_clocks_say() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let store = CheckpointStore::open(dir.to_str().unwrap()).unwrap();
        let put = |path: &str| {
            let (store, path) = (store.store.clone(), StorePath::from(path));
            async move { store.put(&path, PutPayload::from(vec![1u8])).await.unwrap() }
        };
        let file = |path: &str| StateFile { path: path.into(), name: path.rsplit('/').next().unwrap().into(), bytes: 1 };
        let mut kept = CheckpointManifest { job_id: "job".into(), checkpoint_id: 5, ..Default::default() };
        let mut task = TaskSnapshot::default();
        task.operators.push(eddy_proto::OperatorSnapshot {
            operator: 1,
            inline: Vec::new(),
            files: vec![file("job/shared/a/chk-3/000010.sst")],
        });
        kept.tasks.insert("1.0".into(), task);
        store.put_manifest(&kept).await.unwrap();
        for f in
            ["job/shared/a/chk-3/000010.sst", "job/shared/a/chk-4/000011.sst", "job/shared/a/chk-6/000012.sst", "job/shared/a/000009.sst"]
        {
            put(f).await;
        }
        let shared = || -> BTreeSet<String> {
            let root = dir.join("job/shared/a");
            let mut out = BTreeSet::new();
            for e in std::fs::read_dir(&root).unwrap() {
                let e = e.unwrap();
                if e.path().is_dir() {
                    for f in std::fs::read_dir(e.path()).unwrap() {
                        out.insert(format!("{}/{}", e.file_name().to_string_lossy(), f.unwrap().file_name().to_string_lossy()));
                    }
                } else {
                    out.insert(e.file_name().to_string_lossy().into_owned());
                }
            }
            out
        };
        store.collect("job", Vec::new(), vec![Arc::new(kept.clone())], SharedGc::Keep).await;
        assert_eq!(shared().len(), 4, "a job with an unreadable checkpoint loses no shared file");
        // The clock says every file is older than anything (a worker's clock far behind).
        store.collect("job", Vec::new(), vec![Arc::new(kept)], SharedGc::Through { checkpoint: 5, before_ms: i64::MAX }).await;
        assert_eq!(shared(), ["chk-3/000010.sst", "chk-6/000012.sst"].map(String::from).into_iter().collect());
    }
}
