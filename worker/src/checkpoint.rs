//! Checkpoint storage, the worker's side (the barriers' alignment is `crate::align`).
//!
//! Snapshots are written to local scratch directories and uploaded to checkpoint storage (a
//! directory shared by all processes, or an S3-compatible store, through `object_store`) in the background, so the task goes
//! on processing while its files travel; the task then acks with a [`TaskSnapshot`] naming its
//! files. Files a state backend never changes once written (RocksDB's `.sst` files) are uploaded
//! once per state instance into a shared folder and only referenced by later checkpoints: that is
//! what makes checkpoints incremental. When every task has acked, the coordinator stores the
//! manifest and tells the tasks (`TaskCommand::Complete`), and sources may confirm their
//! positions upstream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use eddy_proto::{layout, OperatorSnapshot as WireOperatorSnapshot, StateFile, TaskSnapshot};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

use crate::error::{Result, TaskError};
use crate::operator::{OperatorSnapshot, RestoredState};

/// Checkpoint storage: a directory or an object store shared by the coordinator and every worker.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
}

impl Storage {
    /// Storage named as the coordinator told it: a local (or mounted) directory, created when
    /// missing, or an `s3://bucket/prefix` URL, its credentials from this worker's environment.
    pub fn open(root: &str) -> Result<Storage> {
        let opened = eddy_proto::storage::open(root).map_err(TaskError::external)?;
        Ok(Storage { store: opened.store })
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&StorePath::from(path), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| TaskError::external(format!("writing checkpoint file {path}: {e}")))
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let unreadable = |e: object_store::Error| TaskError::external(format!("reading checkpoint file {path}: {e}"));
        let result = self.store.get(&StorePath::from(path)).await.map_err(unreadable)?;
        Ok(result.bytes().await.map_err(unreadable)?.to_vec())
    }

    /// Fetches the files of one operator snapshot into `dir`. A file's name comes from the
    /// manifest, which another worker wrote: it must be a plain file name, so that nothing lands
    /// outside `dir`.
    pub async fn download(&self, files: &[StateFile], dir: &Path) -> Result<()> {
        if let Some(f) = files.iter().find(|f| !is_plain_file_name(&f.name)) {
            return Err(TaskError::internal(format!(
                "checkpoint file `{}` (stored at {}) is not a plain file name: the manifest is corrupt or forged; restore from another checkpoint",
                f.name, f.path
            )));
        }
        tokio::fs::create_dir_all(dir).await.map_err(|e| local_error(dir, e))?;
        for f in files {
            let bytes = self.get(&f.path).await?;
            let to = dir.join(&f.name);
            tokio::fs::write(&to, bytes).await.map_err(|e| local_error(&to, e))?;
        }
        Ok(())
    }
}

/// One normal path component: no directory, no `..`, not absolute, not empty.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    matches!((parts.next(), parts.next()), (Some(std::path::Component::Normal(_)), None)) && !name.contains(['/', '\\'])
}

fn local_error(path: &Path, e: std::io::Error) -> TaskError {
    TaskError::internal(format!("local state directory {}: {e}", path.display()))
}

/// Inline state above this size is stored as a file named [`INLINE_FILE`].
const INLINE_LIMIT: usize = 64 * 1024;
const INLINE_FILE: &str = "_inline";

/// Per operator: a unique storage folder for its immutable files, and those uploaded so far.
type SharedFiles = HashMap<usize, (String, HashMap<String, StateFile>)>;

/// Uploads one task's snapshots, remembering which immutable files are already in storage.
pub struct Uploader {
    storage: Storage,
    /// `<job>/` prefix of every path.
    job: String,
    task: String,
    shared: tokio::sync::Mutex<SharedFiles>,
}

impl Uploader {
    /// An uploader for task `task` of `job`.
    pub fn new(storage: Storage, job: &str, task: &str) -> Uploader {
        Uploader { storage, job: job.to_string(), task: task.to_string(), shared: Default::default() }
    }

    /// Uploads the snapshots of checkpoint `id` (operator index, snapshot) and describes them.
    pub async fn upload(&self, id: u64, snapshots: Vec<(usize, OperatorSnapshot)>) -> Result<TaskSnapshot> {
        // One upload at a time per task: later checkpoints reuse the files earlier ones uploaded.
        let mut shared = self.shared.lock().await;
        let mut out = TaskSnapshot::default();
        for (op, snap) in snapshots {
            let mut wire = WireOperatorSnapshot { operator: op as u32, inline: snap.inline, files: Vec::new() };
            if let Some(dir) = &snap.files {
                let (folder, uploaded) = shared
                    .entry(op)
                    .or_insert_with(|| (layout::shared_instance(&self.job, &uuid::Uuid::new_v4().simple().to_string()), HashMap::new()));
                let mut entries = tokio::fs::read_dir(dir).await.map_err(|e| local_error(dir, e))?;
                let mut names = Vec::new();
                while let Some(entry) = entries.next_entry().await.map_err(|e| local_error(dir, e))? {
                    names.push(entry.file_name().to_string_lossy().into_owned());
                }
                names.sort();
                for name in names {
                    let local = dir.join(&name);
                    if let Some(done) = uploaded.get(&name) {
                        out.full_bytes += done.bytes;
                        wire.files.push(done.clone());
                        continue;
                    }
                    let bytes = tokio::fs::read(&local).await.map_err(|e| local_error(&local, e))?;
                    let immutable = name.ends_with(".sst");
                    // An immutable file's folder names the checkpoint it was first uploaded for:
                    // collection tells the files of a checkpoint in flight by that, not by clocks.
                    let path = if immutable {
                        layout::shared_file(folder, id, &name)
                    } else {
                        layout::task_file(&self.job, id, &self.task, op, &name)
                    };
                    let file = StateFile { path: path.clone(), name: name.clone(), bytes: bytes.len() as u64 };
                    out.full_bytes += file.bytes;
                    out.incremental_bytes += file.bytes;
                    self.storage.put(&path, bytes).await?;
                    if immutable {
                        uploaded.insert(name, file.clone());
                    }
                    wire.files.push(file);
                }
                let _ = tokio::fs::remove_dir_all(dir).await;
            }
            // Large "small" state (a source's upsert state) travels as a file, not in gRPC messages.
            if wire.inline.len() > INLINE_LIMIT {
                let path = layout::task_file(&self.job, id, &self.task, op, INLINE_FILE);
                let bytes = std::mem::take(&mut wire.inline);
                wire.files.push(StateFile { path: path.clone(), name: INLINE_FILE.into(), bytes: bytes.len() as u64 });
                self.storage.put(&path, bytes).await?;
            }
            let own: u64 = wire.inline.len() as u64 + wire.files.iter().filter(|f| f.name == INLINE_FILE).map(|f| f.bytes).sum::<u64>();
            out.full_bytes += own;
            out.incremental_bytes += own;
            out.operators.push(wire);
        }
        Ok(out)
    }
}

/// Fetches the state of operator `op` from the given earlier snapshots into folders under `dir`.
pub async fn fetch(storage: &Storage, op: usize, from: &[(String, &TaskSnapshot)], dir: &Path) -> Result<Vec<RestoredState>> {
    let mut out = Vec::new();
    for (task, snap) in from {
        for s in snap.operators.iter().filter(|s| s.operator as usize == op) {
            let mut inline = s.inline.clone();
            let (spilled, files): (Vec<StateFile>, Vec<StateFile>) = s.files.iter().cloned().partition(|f| f.name == INLINE_FILE);
            for f in &spilled {
                inline = storage.get(&f.path).await?;
            }
            let files = if files.is_empty() {
                None
            } else {
                let local: PathBuf = dir.join(format!("{task}-op{op}"));
                storage.download(&files, &local).await?;
                Some(local)
            };
            out.push(RestoredState { inline, files });
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_dir;

    /// A manifest naming a file `../x` or `/x` (a forged checkpoint ack) writes nothing outside
    /// the restore directory: the restore fails, saying why.
    #[tokio::test]
    async fn a_manifest_naming_files_outside_the_restore_directory_is_refused() {
        let root = temp_dir("checkpoint-names");
        let storage = Storage::open(&root.path().join("store").display().to_string()).unwrap();
        storage.put("job/shared/f1", b"planted".to_vec()).await.unwrap();
        let into = root.path().join("restore").join("op1");
        let outside = root.path().join("planted");
        for name in ["../../planted".to_string(), outside.display().to_string(), "a/../../../planted".into(), String::new()] {
            let files = [StateFile { path: "job/shared/f1".into(), name: name.clone(), bytes: 7 }];
            let error = storage.download(&files, &into).await.expect_err(&name).to_string();
            assert!(error.contains("not a plain file name"), "{name}: {error}");
            assert!(!outside.exists(), "{name}: a file was written outside the restore directory");
        }
        let files = [StateFile { path: "job/shared/f1".into(), name: "000012.sst".into(), bytes: 7 }];
        storage.download(&files, &into).await.unwrap();
        assert_eq!(std::fs::read(into.join("000012.sst")).unwrap(), b"planted");
    }
}
