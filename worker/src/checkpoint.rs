//! The worker's part of checkpoints (aligned barriers, as in Flink).
//!
//! The coordinator asks source tasks to start checkpoint `n` ([`TaskCommand::Trigger`]). A source
//! task records its position, snapshots its chained operators and sends `Barrier(n)` down every
//! output channel, in order with its data. A task with several input channels aligns them
//! ([`Aligner`]): once barrier `n` has arrived on an input, the task stops reading that input until
//! barrier `n` has arrived on every other input too; then it snapshots its state, forwards the
//! barrier and reads all inputs again. So every snapshot reflects exactly the records before the
//! barrier, on every input. A blocked input is not buffered: its channel fills and its senders
//! wait (backpressure), as Flink blocks its channels, so alignment costs no memory.
//!
//! Snapshots are written to local scratch directories and uploaded to checkpoint storage (a
//! directory shared by all processes, through `object_store`) in the background, so the task goes
//! on processing while its files travel; the task then acks with a [`TaskSnapshot`] naming its
//! files. Files a state backend never changes once written (RocksDB's `.sst` files) are uploaded
//! once per state instance into a shared folder and only referenced by later checkpoints: that is
//! what makes checkpoints incremental. When every task has acked, the coordinator stores the
//! manifest and tells the tasks ([`TaskCommand::Complete`]), and sources may confirm their
//! positions upstream.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use eddy_proto::{OperatorSnapshot as WireOperatorSnapshot, StateFile, TaskSnapshot};
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

use crate::batch::Message;
use crate::error::{Result, TaskError};
use crate::exchange::Delivery;
use crate::operators::{OperatorSnapshot, RestoredState};

/// Orders for a running task from the worker's control loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskCommand {
    /// Sources only: inject barrier `n`.
    Trigger(u64),
    /// Checkpoint `n` is complete.
    Complete(u64),
}

/// What [`Aligner::offer`] decided about a message.
#[derive(Debug)]
pub enum Offer {
    /// Process it now.
    Process(Delivery),
    /// A barrier, and nothing to do now: its input is blocked until the others deliver theirs (or
    /// it was stale, and is dropped).
    Absorbed,
    /// Barrier `n` has now arrived on every input: snapshot, then forward it.
    Aligned(u64),
}

/// Aligns checkpoint barriers over a task's input channels: it says which inputs to leave unread
/// ([`Aligner::blocked`]) and when a checkpoint's barrier has arrived on all of them.
#[derive(Debug)]
pub struct Aligner {
    ended: Vec<bool>,
    /// The checkpoint being aligned and which inputs delivered its barrier.
    aligning: Option<(u64, Vec<bool>)>,
    /// Newest checkpoint aligned, so that a stale barrier is ignored.
    last: u64,
}

impl Aligner {
    /// An aligner for `inputs` channels.
    pub fn new(inputs: usize) -> Aligner {
        Aligner { ended: vec![false; inputs], aligning: None, last: 0 }
    }

    /// Whether `input` must not be read now: it delivered the barrier being aligned, and what
    /// follows belongs to the next checkpoint.
    pub fn blocked(&self, input: usize) -> bool {
        self.aligning.as_ref().is_some_and(|(_, arrived)| arrived.get(input).copied().unwrap_or(false))
    }

    /// Decides what to do with a message of an input that is not [`blocked`](Aligner::blocked).
    pub fn offer(&mut self, d: Delivery) -> Offer {
        debug_assert!(!self.blocked(d.input), "a blocked input was read");
        match d.msg {
            Message::Barrier(id) => {
                if id <= self.last {
                    return Offer::Absorbed; // a barrier of an aborted or finished alignment: drop it
                }
                match &mut self.aligning {
                    // A newer barrier means the older checkpoint was given up upstream: align the new one.
                    Some((current, _)) if id > *current => self.aligning = Some((id, vec![false; self.ended.len()])),
                    Some((current, _)) if id < *current => return Offer::Absorbed,
                    Some(_) => {}
                    None => self.aligning = Some((id, vec![false; self.ended.len()])),
                }
                if let Some((_, arrived)) = &mut self.aligning {
                    if let Some(a) = arrived.get_mut(d.input) {
                        *a = true;
                    }
                }
                self.check_aligned().map_or(Offer::Absorbed, Offer::Aligned)
            }
            Message::End => {
                if let Some(e) = self.ended.get_mut(d.input) {
                    *e = true;
                }
                Offer::Process(d)
            }
            _ => Offer::Process(d),
        }
    }

    /// After an input ended: whether that completed the current alignment.
    pub fn after_end(&mut self) -> Option<u64> {
        self.check_aligned()
    }

    fn check_aligned(&mut self) -> Option<u64> {
        let (id, arrived) = self.aligning.as_ref()?;
        if arrived.iter().zip(&self.ended).all(|(a, e)| *a || *e) {
            let id = *id;
            self.last = id;
            self.aligning = None;
            return Some(id);
        }
        None
    }
}

/// Checkpoint storage: a directory shared by the coordinator and every worker.
#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
}

impl Storage {
    /// Storage rooted at the local (or mounted) directory `root`, created when missing.
    pub fn open(root: &str) -> Result<Storage> {
        std::fs::create_dir_all(root)
            .map_err(|e| TaskError::external(format!("checkpoint storage `{root}`: {e}; check the path and its permissions")))?;
        let store = LocalFileSystem::new_with_prefix(root)
            .map_err(|e| TaskError::external(format!("checkpoint storage `{root}`: {e}")))?;
        Ok(Storage { store: Arc::new(store) })
    }

    async fn put(&self, path: &str, bytes: Vec<u8>) -> Result<()> {
        self.store
            .put(&StorePath::from(path), PutPayload::from(bytes))
            .await
            .map(|_| ())
            .map_err(|e| TaskError::external(format!("writing checkpoint file {path}: {e}")))
    }

    async fn get(&self, path: &str) -> Result<Vec<u8>> {
        let result = self
            .store
            .get(&StorePath::from(path))
            .await
            .map_err(|e| TaskError::external(format!("reading checkpoint file {path}: {e}")))?;
        let bytes = result.bytes().await.map_err(|e| TaskError::external(format!("reading checkpoint file {path}: {e}")))?;
        Ok(bytes.to_vec())
    }

    /// Fetches the files of one operator snapshot into `dir`.
    pub async fn download(&self, files: &[StateFile], dir: &Path) -> Result<()> {
        tokio::fs::create_dir_all(dir).await.map_err(|e| local_error(dir, e))?;
        for f in files {
            let bytes = self.get(&f.path).await?;
            let to = dir.join(&f.name);
            tokio::fs::write(&to, bytes).await.map_err(|e| local_error(&to, e))?;
        }
        Ok(())
    }
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
                    .or_insert_with(|| (format!("{}/shared/{}", self.job, uuid::Uuid::new_v4().simple()), HashMap::new()));
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
                        format!("{folder}/chk-{id}/{name}")
                    } else {
                        format!("{}/chk-{id}/{}/op{op}/{name}", self.job, self.task)
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
                let path = format!("{}/chk-{id}/{}/op{op}/{INLINE_FILE}", self.job, self.task);
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
    use crate::batch::Batch;

    fn d(input: usize, msg: Message) -> Delivery {
        Delivery { input, msg }
    }

    fn data(n: i64) -> Message {
        Message::Data(Batch::inserts(vec![vec![eddy_jobs::Value::Int(n)]]))
    }

    fn processed(o: Offer) -> Option<Message> {
        match o {
            Offer::Process(d) => Some(d.msg),
            _ => None,
        }
    }

    #[test]
    fn one_input_aligns_at_once() {
        let mut a = Aligner::new(1);
        assert!(matches!(a.offer(d(0, data(1))), Offer::Process(_)));
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Aligned(1)));
        assert!(!a.blocked(0));
        assert!(matches!(a.offer(d(0, data(2))), Offer::Process(_)));
    }

    #[test]
    fn an_input_past_an_early_barrier_is_blocked_until_the_others_deliver_theirs() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        // Input 0 is past the barrier: its records belong to the next checkpoint and stay unread.
        assert!(a.blocked(0));
        // Input 1 is still before the barrier: its records go through.
        assert!(!a.blocked(1));
        assert_eq!(processed(a.offer(d(1, data(20)))), Some(data(20)));
        assert!(matches!(a.offer(d(1, Message::Barrier(1))), Offer::Aligned(1)));
        assert!(!a.blocked(0) && !a.blocked(1));
    }

    #[test]
    fn an_ended_input_counts_as_aligned() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(1, Message::End)), Offer::Process(_)));
        assert_eq!(a.after_end(), None);
        assert!(matches!(a.offer(d(0, Message::Barrier(3))), Offer::Aligned(3)));

        let mut b = Aligner::new(2);
        assert!(matches!(b.offer(d(0, Message::Barrier(4))), Offer::Absorbed));
        assert!(matches!(b.offer(d(1, Message::End)), Offer::Process(_)));
        assert_eq!(b.after_end(), Some(4));
    }

    #[test]
    fn a_newer_barrier_abandons_the_older_alignment() {
        let mut a = Aligner::new(2);
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        // Checkpoint 1 was aborted upstream of input 1, which moved on to 2: input 0 is read
        // again (up to its own barrier 2), input 1 waits.
        assert!(matches!(a.offer(d(1, Message::Barrier(2))), Offer::Absorbed));
        assert!(!a.blocked(0) && a.blocked(1));
        assert!(matches!(a.offer(d(0, data(1))), Offer::Process(_)));
        assert!(matches!(a.offer(d(0, Message::Barrier(2))), Offer::Aligned(2)));
        // A late barrier of checkpoint 1 is ignored.
        assert!(matches!(a.offer(d(0, Message::Barrier(1))), Offer::Absorbed));
        assert!(!a.blocked(0));
    }

    /// A task blocked for an alignment holds nothing: the blocked input's channel fills and its
    /// sender waits, while the other input still flows (the old aligner queued without bound).
    #[tokio::test]
    async fn a_blocked_input_backpressures_its_sender_and_the_others_flow() {
        let inboxes = crate::exchange::Inboxes::default();
        let key = ("job".to_string(), 1, eddy_jobs::TaskId { vertex: 1, subtask: 0 });
        let mut inputs = inboxes.receivers(&key, 2).unwrap();
        let (early, late) = (inboxes.sender(&key, 0, 2).unwrap(), inboxes.sender(&key, 1, 2).unwrap());
        let mut a = Aligner::new(2);
        early.send(d(0, Message::Barrier(1))).await.unwrap();
        let first = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert!(matches!(a.offer(first), Offer::Absorbed));
        // The early input's sender fills its channel, then waits.
        let flood = tokio::spawn(async move {
            for n in 0.. {
                early.send(d(0, data(n))).await.unwrap();
            }
        });
        for n in 0..100 {
            late.send(d(1, data(1000 + n))).await.unwrap();
            let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
            assert_eq!(next.input, 1, "a blocked input was read");
            assert_eq!(processed(a.offer(next)), Some(data(1000 + n)));
        }
        assert!(!flood.is_finished());
        late.send(d(1, Message::Barrier(1))).await.unwrap();
        let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert!(matches!(a.offer(next), Offer::Aligned(1)));
        // Unblocked: the early input's records come, in their order.
        let next = inputs.recv(|i| a.blocked(i)).await.unwrap();
        assert_eq!((next.input, processed(a.offer(next))), (0, Some(data(0))));
        flood.abort();
    }
}
