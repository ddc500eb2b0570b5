//! The worker's vocabulary: what a task's stages are and what they are given. Sources, operators
//! and sinks ([`Source`], [`Operator`], [`Sink`]), the contexts they are built with, the snapshots
//! they hand to a checkpoint and get back on restore, the task's figures ([`TaskMetrics`]) and where
//! bad records go ([`DeadLetters`], [`BadRows`]). Every room of the worker imports this module; it
//! imports none of them, only the plain data types below it (batches, errors, JSON values).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64};
use std::sync::Arc;

use async_trait::async_trait;
use eddy_jobs::connectors::BadRecordPolicy;
use eddy_jobs::plan::{EventTime, StateBackend};
use eddy_jobs::{Schema, TaskId};

use crate::batch::Batch;
use crate::error::{Result, TaskError};

/// Live counters of one task, read by heartbeats.
#[derive(Debug)]
pub struct TaskMetrics {
    /// Rows read by the first operator.
    pub records_in: AtomicU64,
    /// Rows written by the last operator.
    pub records_out: AtomicU64,
    /// Rows found late by windows.
    pub late_records: AtomicU64,
    /// Current watermark (ms).
    pub watermark: AtomicI64,
    /// Batches read.
    pub batches_in: AtomicU64,
    /// Batches written.
    pub batches_out: AtomicU64,
    /// Records skipped or dead-lettered by a bad-record policy.
    pub dead_lettered: AtomicU64,
    /// Connector figures (snapshot progress, lag, …), by name.
    pub gauges: std::sync::Mutex<std::collections::BTreeMap<String, i64>>,
    /// The error a connector is retrying now (empty when none); see `crate::retry`.
    pub retrying: std::sync::Mutex<String>,
    /// Connector notes in words (why a backfill failed), by name.
    notes: std::sync::Mutex<std::collections::BTreeMap<String, String>>,
    /// Time spent working on records (ns), without the time waiting on a full downstream.
    pub busy_ns: AtomicU64,
    /// Time spent waiting for downstream tasks to take output (ns): backpressure, ended waits.
    pub backpressured_ns: AtomicU64,
    /// When the wait going on now began (ns after `started`; 0: none), so that a downstream
    /// stalled for minutes shows as backpressure while it lasts.
    waiting_since_ns: AtomicU64,
    /// The last checkpoint whose completion the task's stages acted on (sinks commit then); 0: none.
    pub committed_checkpoint: AtomicU64,
    /// When the task started: what is neither busy nor backpressured since then was idle.
    pub started: std::time::Instant,
}

impl TaskMetrics {
    /// Sets a connector note (see [`TaskMetrics::notes`]).
    pub fn set_note(&self, name: &str, text: String) {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), text);
    }

    pub fn notes(&self) -> std::collections::BTreeMap<String, String> {
        self.notes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Sets a connector gauge.
    pub fn set_gauge(&self, name: &str, value: i64) {
        let mut g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(name) {
            Some(v) => *v = value,
            None => _ = g.insert(name.to_string(), value),
        }
    }

    /// A copy of the gauges.
    pub fn gauges(&self) -> std::collections::BTreeMap<String, i64> {
        self.gauges.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Says which error is being retried now (empty: none).
    pub fn set_retrying(&self, what: String) {
        *self.retrying.lock().unwrap_or_else(|e| e.into_inner()) = what;
    }

    /// The error being retried now, if any.
    pub fn retrying(&self) -> String {
        self.retrying.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Milliseconds busy, backpressured and idle since the task started, as Flink splits a task's
    /// time.
    pub fn time_split_ms(&self) -> [u64; 3] {
        let alive_ns = self.started.elapsed().as_nanos() as u64;
        let since = self.waiting_since_ns.load(Relaxed);
        let ongoing = if since == 0 { 0 } else { alive_ns.saturating_sub(since) };
        let busy = self.busy_ns.load(Relaxed) / 1_000_000;
        let backpressured = (self.backpressured_ns.load(Relaxed) + ongoing) / 1_000_000;
        let alive = alive_ns / 1_000_000;
        [busy, backpressured, alive.saturating_sub(busy + backpressured)]
    }

    /// Marks the start of a wait for a full downstream task.
    pub fn wait_begins(&self) -> std::time::Instant {
        let now = std::time::Instant::now();
        self.waiting_since_ns.store((now - self.started).as_nanos().max(1) as u64, Relaxed);
        now
    }

    /// Ends the wait begun at `began`, counting it as backpressure.
    pub fn wait_ends(&self, began: std::time::Instant) {
        self.backpressured_ns.fetch_add(began.elapsed().as_nanos() as u64, Relaxed);
        self.waiting_since_ns.store(0, Relaxed);
    }

    /// Starts timing work on records: see [`TaskMetrics::busy_until_now`].
    pub fn busy_from(&self) -> (std::time::Instant, u64) {
        (std::time::Instant::now(), self.backpressured_ns.load(Relaxed))
    }

    /// Counts the time since `from` as busy, less what was spent backpressured meanwhile.
    pub fn busy_until_now(&self, from: (std::time::Instant, u64)) {
        let waited = self.backpressured_ns.load(Relaxed).saturating_sub(from.1);
        self.busy_ns.fetch_add((from.0.elapsed().as_nanos() as u64).saturating_sub(waited), Relaxed);
    }

    /// One connector gauge, if set.
    pub fn gauge(&self, name: &str) -> Option<i64> {
        self.gauges.lock().unwrap_or_else(|e| e.into_inner()).get(name).copied()
    }
}

impl Default for TaskMetrics {
    fn default() -> TaskMetrics {
        TaskMetrics {
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            late_records: AtomicU64::new(0),
            watermark: AtomicI64::new(i64::MIN),
            batches_in: AtomicU64::new(0),
            batches_out: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            gauges: Default::default(),
            retrying: Default::default(),
            notes: Default::default(),
            busy_ns: AtomicU64::new(0),
            backpressured_ns: AtomicU64::new(0),
            waiting_since_ns: AtomicU64::new(0),
            committed_checkpoint: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }
    }
}

/// Where an operator puts its output.
#[derive(Debug, Default)]
pub struct Collector {
    /// Main output.
    pub main: Vec<Batch>,
    /// Late records (windows only).
    pub late: Vec<Batch>,
}

/// What an operator hands to a checkpoint.
#[derive(Debug, Default)]
pub struct OperatorSnapshot {
    /// Small state (watermarks, counters, positions), stored as one file; empty for none.
    pub inline: Vec<u8>,
    /// A directory of files written by a state backend, uploaded as they are.
    pub files: Option<PathBuf>,
}

/// One subtask's snapshot of this operator from an earlier run, fetched to local disk.
#[derive(Debug, Clone, Default)]
pub struct RestoredState {
    /// What `OperatorSnapshot::inline` held.
    pub inline: Vec<u8>,
    /// Where the files of `OperatorSnapshot::files` were downloaded to.
    pub files: Option<PathBuf>,
}

/// Inline state is a serde struct of the stage's own, written with `postcard` behind [`STATE_TAG`]
/// and the struct's version: never the exchange's wire codec, so that a change of the wire cannot
/// break a savepoint, and a change of the struct is a new version that the old one's reader sits
/// beside.
pub trait InlineState: serde::Serialize + serde::de::DeserializeOwned {
    /// Who holds it, for errors ("kafka source").
    const HOLDER: &'static str;
    /// The struct's version: bumped when its fields change, the older reader kept.
    const VERSION: u8;
}

/// The first bytes of every versioned inline state. Layouts written before it are told apart by
/// their absence; one that begins with a number (a file offset) can begin with these bytes too,
/// so [`RestoredState::read`] falls back to the old reader when the versioned one fails.
pub const STATE_TAG: &[u8; 4] = b"EDDY";

impl OperatorSnapshot {
    /// A snapshot of inline state only.
    pub fn inline(inline: Vec<u8>) -> OperatorSnapshot {
        OperatorSnapshot { inline, files: None }
    }

    /// A snapshot of a versioned inline state.
    pub fn state<T: InlineState>(state: &T) -> OperatorSnapshot {
        let mut inline = STATE_TAG.to_vec();
        inline.push(T::VERSION);
        // Serialising a plain struct into a vector cannot fail.
        inline.extend(postcard::to_allocvec(state).unwrap_or_default());
        OperatorSnapshot::inline(inline)
    }

    /// The same snapshot with a directory of state files.
    pub fn with_files(self, files: Option<PathBuf>) -> OperatorSnapshot {
        OperatorSnapshot { files, ..self }
    }
}

impl RestoredState {
    /// The versioned inline state, if this snapshot holds one (`None`: empty, or a layout from
    /// before versioning, which the holder reads itself).
    pub fn state<T: InlineState>(&self) -> Result<Option<T>> {
        let Some(rest) = self.inline.strip_prefix(STATE_TAG.as_slice()) else { return Ok(None) };
        let corrupt = |why: String| TaskError::internal(format!("{}: checkpoint state unreadable: {why}", T::HOLDER));
        match rest.split_first() {
            Some((&version, bytes)) if version == T::VERSION => match postcard::take_from_bytes::<T>(bytes) {
                Ok((state, [])) => Ok(Some(state)),
                Ok((_, extra)) => Err(corrupt(format!("{} bytes left over", extra.len()))),
                Err(e) => Err(corrupt(e.to_string())),
            },
            Some((&version, _)) => Err(TaskError::user(format!(
                "{}: the checkpoint's state is version {version} and this Eddy reads version {}; restore it with an Eddy that reads it",
                T::HOLDER,
                T::VERSION
            ))),
            None => Err(corrupt("no version".into())),
        }
    }

    /// The inline state in either layout: the versioned struct, or what `unversioned` reads from a
    /// layout written before versioning (`Ok(None)`: nothing held). A versioned read that fails
    /// gives way to `unversioned` when that reads the bytes, since an old layout that begins with
    /// a number can begin like [`STATE_TAG`]; otherwise its error stands.
    pub fn read<T: InlineState>(&self, unversioned: impl FnOnce(&[u8]) -> Result<Option<T>>) -> Result<Option<T>> {
        match self.state::<T>() {
            Ok(None) => unversioned(&self.inline),
            Err(e) => unversioned(&self.inline).ok().flatten().map(Some).ok_or(e),
            versioned => versioned,
        }
    }
}

/// What building an operator needs beyond the plan.
#[derive(Debug, Clone)]
pub struct OperatorContext {
    /// A directory of this task's own for the operator's state (created on demand).
    pub state_dir: PathBuf,
    /// The key groups this subtask owns.
    pub key_groups: Range<u32>,
    /// Snapshots of every earlier subtask whose key groups overlap `key_groups` (empty on a fresh
    /// start). Entries outside `key_groups` must be skipped.
    pub restore: Vec<RestoredState>,
    /// The task's counters and gauges: late records, rows set aside, a lookup's cache figures.
    pub metrics: Arc<TaskMetrics>,
}

/// The lifecycle every stage of a task shares, whatever it is: built from the plan (restoring
/// what a checkpoint held), it processes its input (a [`Source`] reads it, an [`Operator`]
/// transforms it, a [`Sink`] writes it), hears the watermark move, hands its state to a checkpoint
/// at the barrier (`snapshot`), commits what that checkpoint covers once it is complete
/// (`checkpoint_complete`), gets a `tick` every 100–200 ms busy or idle, and at the end of its
/// input flushes what it holds (`finish`). Figures (late records, lag, dead letters) go to the
/// task's [`TaskMetrics`]. The hooks the three kinds share are this trait's; each default does
/// nothing, and the task drives them over its stages alike.
#[async_trait]
pub trait Stage: Send {
    /// Checkpoint `id`'s barrier passed this stage: return what to store in the checkpoint, as
    /// inline bytes the stage reads back on restore ([`RestoredState`]) and files it may write into
    /// `scratch` (an empty local directory). A source returns the position from which exactly the
    /// batches it returns after this call are read again; a sink has everything written before
    /// the barrier safely out, or staged for `checkpoint_complete`.
    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::default())
    }

    /// Checkpoint `id` is complete: commit what was staged for it, or confirm upstream the
    /// position it holds.
    async fn checkpoint_complete(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    /// Time passes (every 100–200 ms, busy or idle): housekeeping, such as flushing what has
    /// waited long enough, keeping an idle replication slot advancing or refreshing lag gauges.
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }
}

/// One step of a chain. Only `process_batch` is required; the hooks default to doing nothing.
/// Methods are async so that an operator may wait on an external system (a lookup); CPU-only
/// operators simply never await.
#[async_trait]
pub trait Operator: Stage {
    /// Processes a batch of input rows.
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()>;

    /// The input watermark advanced to `watermark`; the runtime forwards it downstream afterwards.
    async fn on_watermark(&mut self, _watermark: i64, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// All input has ended (after a final watermark): emit what is held.
    async fn finish(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }
}

/// What a connector instance knows about where it runs.
#[derive(Clone)]
pub struct ConnectorContext {
    /// The job.
    pub job_id: String,
    /// This task.
    pub task: TaskId,
    /// Parallel instances of this connector.
    pub parallelism: u32,
    /// The rows' schema: produced (sources) or consumed (sinks).
    pub schema: Schema,
    /// The task's counters and gauges, for lag, progress and dead-letter counts.
    pub metrics: Arc<TaskMetrics>,
    /// Whether the job takes checkpoints: then sources confirm positions upstream only when a
    /// checkpoint holding them completes, not when batches are handed on.
    pub checkpointing: bool,
    /// The job's attempt (1 for the first run; higher after restarts).
    pub attempt: u64,
    /// When restoring: the checkpoint, and what every earlier subtask of this connector stored in
    /// it (sources pick what they own now; sinks learn which checkpoint survived). Files are on
    /// local disk until the connector is built.
    pub restore: Option<(u64, Vec<RestoredState>)>,
    /// A directory of this connector's own for state files (created on demand).
    pub state_dir: PathBuf,
    /// The job's state backend, for connectors that keep keyed state.
    pub state_backend: StateBackend,
    /// For a source: its `event_time` settings, if any.
    pub event_time: Option<EventTime>,
    /// Set before the task is cancelled when the job ends for good (a user's `eddy cancel`, not a
    /// restart, rescale or savepoint): a source then releases what it holds upstream, such as a
    /// replication slot.
    pub released: Arc<AtomicBool>,
}

#[cfg(test)]
impl ConnectorContext {
    /// A context for connector tests: a first attempt without checkpoints, fresh counters.
    pub fn for_test(task: TaskId, parallelism: u32, schema: Schema) -> ConnectorContext {
        ConnectorContext {
            job_id: "test".into(),
            task,
            parallelism,
            schema,
            metrics: Arc::new(TaskMetrics::default()),
            checkpointing: false,
            attempt: 1,
            restore: None,
            state_dir: std::env::temp_dir().join(format!("eddy-connector-test-{}", std::process::id())),
            state_backend: StateBackend::Memory,
            event_time: None,
            released: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// Produces batches. `next_batch` must be cancel-safe: dropping its future loses nothing.
#[async_trait]
pub trait Source: Stage {
    /// The next batch, or `None` once the source is exhausted.
    async fn next_batch(&mut self) -> Result<Option<Batch>>;

    /// Every batch returned so far has been handed to the next task. Without checkpoints this is
    /// when a source may confirm its position upstream (a replication slot's LSN).
    async fn handed_on(&mut self) -> Result<()> {
        Ok(())
    }

    /// What the source knows of event time beyond its records' timestamps, asked after every
    /// batch and on every tick. It covers the records returned so far.
    fn progress(&self) -> Progress {
        Progress::Unknown
    }

    /// An order from a user through the coordinator, taken just before a checkpoint's barrier,
    /// so that the checkpoint records it (and a restore carries it out). The coordinator sends
    /// each order with every checkpoint until one that carried it completes: a source ignores an
    /// order it already holds. The default refuses none and does nothing, with a warning.
    async fn order(&mut self, order: SourceOrder) -> Result<()> {
        tracing::warn!(?order, "this source takes no orders; ignored");
        Ok(())
    }

    /// Whether the source's [`Progress::Watermark`] is its watermark alone (an upstream job's
    /// heartbeats, or the lowest over the partitions it reads): its records' times then move
    /// nothing by themselves, since one partition's newer records must not overtake another's
    /// older ones still to be read.
    fn follows_upstream_watermark(&self) -> bool {
        false
    }
}

/// An order for a source (see [`Source::order`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceOrder {
    /// Read the rows this SQL condition selects again, into the running stream (`eddy
    /// backfill`); `id` tells repeats apart.
    Backfill { id: u64, filter: String },
}

/// A source's own word on event time (see [`Source::progress`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// The source carries no such signal: after `idle_timeout` without records the watermark
    /// follows the wall clock.
    Unknown,
    /// The source carries a signal but has none yet: the watermark waits for records or for it.
    Waiting,
    /// Every record written before this time on the source's clock has been returned (a
    /// database's clock): the watermark may move to it minus the allowed delay.
    Clock(i64),
    /// The upstream job's watermark: no record at or below it will follow.
    Watermark(i64),
    /// The source reads nothing (no partitions): it holds no window back.
    Idle,
}

/// Sources end a batch at about this many bytes of input, whatever its row count: rows with large
/// values (jsonb, TOASTed text) must not make one batch hold gigabytes.
pub const BATCH_BYTES: usize = 4 << 20;

/// Positions of checkpoints taken and not complete yet, to confirm upstream once each completes. A
/// later completion supersedes the earlier ones, so only the latest few are kept: checkpoints
/// that never complete (a coordinator away, a sink hanging) cannot grow it.
#[derive(Debug)]
pub struct PendingCheckpoints<T> {
    taken: std::collections::VecDeque<(u64, T)>,
}

impl<T> Default for PendingCheckpoints<T> {
    fn default() -> Self {
        PendingCheckpoints { taken: Default::default() }
    }
}

impl<T> PendingCheckpoints<T> {
    /// How many are kept at most.
    pub const KEPT: usize = 16;

    /// Checkpoint `id` holds `position`.
    pub fn taken(&mut self, id: u64, position: T) {
        if self.taken.len() == Self::KEPT {
            self.taken.pop_front();
        }
        self.taken.push_back((id, position));
    }

    /// Checkpoint `id` completed: its position (if still kept), forgetting it and every older one.
    pub fn complete(&mut self, id: u64) -> Option<T> {
        let i = self.taken.iter().position(|(c, _)| *c == id)?;
        self.taken.drain(..i);
        self.taken.pop_front().map(|(_, position)| position)
    }

    pub fn len(&self) -> usize {
        self.taken.len()
    }

    pub fn is_empty(&self) -> bool {
        self.taken.is_empty()
    }
}

/// Writes batches to an external system.
#[async_trait]
pub trait Sink: Stage {
    /// Writes one batch; returning means the sink has taken responsibility for it.
    async fn write(&mut self, batch: Batch) -> Result<()>;
    /// The input watermark advanced; a chance to flush.
    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        Ok(())
    }
    /// No more input: flush everything.
    async fn finish(&mut self) -> Result<()>;
}

/// Where a connector puts what it cannot read or deliver, so that the job carries on and nothing is
/// lost silently: each record is counted in `dead_lettered` and, when the spec names a file,
/// appended to it as one JSON line in a single write (subtasks sharing the file never interleave).
pub struct DeadLetters {
    path: Option<String>,
    metrics: Arc<TaskMetrics>,
    /// Who writes, for error messages (`"http sink"`).
    who: &'static str,
}

impl DeadLetters {
    /// Checks at once that the file (if any) can be appended to, creating its directory.
    pub fn open(who: &'static str, path: Option<&str>, metrics: Arc<TaskMetrics>) -> Result<DeadLetters> {
        if let Some(path) = path {
            if let Some(dir) = std::path::Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
                // A failure shows in the open below, with the file named.
                let _ = std::fs::create_dir_all(dir);
            }
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                TaskError::user(format!("{who}: dead-letter file `{path}`: {e}; check that its directory exists and is writable"))
            })?;
        }
        Ok(DeadLetters { path: path.map(str::to_string), metrics, who })
    }

    /// Records one dead letter; `line` is a JSON object without the newline.
    pub fn record(&self, line: &str) -> Result<()> {
        use std::io::Write as _;
        self.metrics.dead_lettered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(path) = &self.path else { return Ok(()) };
        let text = format!("{line}\n");
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| TaskError::external(format!("{}: writing the dead-letter file `{path}`: {e}; check it is writable", self.who)))
    }
}

/// What a stage does with rows it cannot compute (an expression failed on them): its
/// `bad_records` policy, the dead letters it writes them to, and a count for the log.
pub struct BadRows {
    /// `transform[enriched]`, say.
    stage: String,
    name: String,
    policy: BadRecordPolicy,
    dead_letters: DeadLetters,
    /// Rows set aside so far (only the first few are logged one by one).
    count: u64,
}

impl BadRows {
    /// The bad rows of stage `name` of kind `kind` (`transform`, `window`) with `policy`, whose
    /// dead letters go to `path` (a file only with `dead-letter`).
    pub fn open(
        kind: &'static str,
        name: &str,
        policy: BadRecordPolicy,
        path: &Option<String>,
        metrics: &Arc<TaskMetrics>,
    ) -> Result<BadRows> {
        let path = path.as_deref().filter(|_| policy == BadRecordPolicy::DeadLetter);
        let dead_letters = DeadLetters::open(kind, path, metrics.clone())?;
        Ok(BadRows::new(kind, name, policy, dead_letters))
    }

    /// The bad rows of stage `name` of kind `kind`, set aside in `dead_letters`.
    pub fn new(kind: &str, name: &str, policy: BadRecordPolicy, dead_letters: DeadLetters) -> BadRows {
        BadRows { stage: format!("{kind}[{name}]"), name: name.to_string(), policy, dead_letters, count: 0 }
    }

    /// Sets `row` aside (dropped or dead-lettered, with `error`), or with `fail` returns the
    /// task's error.
    pub fn take(&mut self, row: &[eddy_jobs::Value], error: String) -> Result<()> {
        if self.policy == BadRecordPolicy::Fail {
            return Err(TaskError::user(format!(
                "{}: {error}; fix the data or the expression, or set bad_records = \"drop\" or \"dead-letter\" on the stage",
                self.stage
            )));
        }
        self.count += 1;
        if self.count <= 10 {
            tracing::warn!(stage = %self.stage, %error, "a bad row set aside");
        }
        let values: Vec<serde_json::Value> = row.iter().map(crate::json::to_json).collect();
        let line = serde_json::json!({ "stage": self.name, "row": values, "error": error });
        self.dead_letters.record(&line.to_string())
    }
}

/// A row a stage could not compute (`error` says why): set aside by the stage's `bad_rows`, or
/// without them the task's error (the user's).
pub fn set_aside(bad_rows: &mut Option<BadRows>, row: &[eddy_jobs::Value], error: String) -> Result<()> {
    match bad_rows {
        Some(bad) => bad.take(row, error),
        None => Err(TaskError::user(error)),
    }
}

/// How far beyond the wall clock an event time may lie and still count (one hour).
pub const MAX_FUTURE_MS: i64 = 3_600_000;

/// The latest event time that counts now: the wall clock plus [`MAX_FUTURE_MS`]. Later records
/// move no watermark, and windows send them to their late output.
pub fn future_horizon_ms() -> i64 {
    eddy_jobs::time::now_ms().saturating_add(MAX_FUTURE_MS)
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::{InlineState, OperatorSnapshot, PendingCheckpoints, RestoredState};

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Held {
        at: i64,
        names: Vec<String>,
    }

    impl InlineState for Held {
        const HOLDER: &'static str = "test stage";
        const VERSION: u8 = 2;
    }

    fn restored(inline: Vec<u8>) -> RestoredState {
        RestoredState { inline, files: None }
    }

    /// Inline state reads back as written; a layout from before versioning is left to its holder;
    /// another version, or bytes that do not read as the struct, are errors that say so.
    #[test]
    fn inline_state_is_versioned() {
        let held = Held { at: -5, names: vec!["a".into(), "b".into()] };
        let inline = OperatorSnapshot::state(&held).inline;
        assert_eq!(restored(inline.clone()).state::<Held>().unwrap(), Some(held));
        assert_eq!(restored(Vec::new()).state::<Held>().unwrap(), None, "nothing held");
        assert_eq!(restored(vec![1, 2, 3]).state::<Held>().unwrap(), None, "an unversioned layout");

        let mut newer = inline.clone();
        newer[4] = 3;
        let e = restored(newer).state::<Held>().unwrap_err().to_string();
        assert!(e.contains("test stage") && e.contains("version 3") && e.contains("reads version 2"), "{e}");
        let e = restored(inline[..inline.len() - 1].to_vec()).state::<Held>().unwrap_err().to_string();
        assert!(e.contains("test stage: checkpoint state unreadable"), "{e}");
        let e = restored([inline.as_slice(), &[0]].concat()).state::<Held>().unwrap_err().to_string();
        assert!(e.contains("left over"), "{e}");

        // `read` takes the versioned struct, else the old layout's reader; bytes that begin like
        // the tag but do not read as the struct go to that reader too, and its refusal leaves the
        // versioned error standing.
        let old = |bytes: &[u8]| Ok((bytes.len() == 6).then(|| Held { at: i64::from(bytes[5]), names: Vec::new() }));
        let held = Held { at: 9, names: vec!["x".into()] };
        assert_eq!(restored(OperatorSnapshot::state(&held).inline).read(old).unwrap(), Some(held));
        assert_eq!(restored(b"EDDY\x07\x03".to_vec()).read(old).unwrap(), Some(Held { at: 3, names: Vec::new() }));
        assert_eq!(restored(Vec::new()).read(|_| Ok(None::<Held>)).unwrap(), None);
        assert!(restored(b"EDDY\x02".to_vec()).read(old).unwrap_err().to_string().contains("unreadable"));
    }

    #[test]
    fn a_completion_supersedes_older_ones_and_few_are_kept() {
        let mut p = PendingCheckpoints::default();
        for id in 1..=100u64 {
            p.taken(id, id * 10);
        }
        assert_eq!(p.len(), PendingCheckpoints::<u64>::KEPT, "checkpoints that never complete do not pile up");
        assert_eq!(p.complete(3), None, "forgotten: a later one will confirm more");
        assert_eq!(p.complete(90), Some(900));
        assert_eq!(p.complete(89), None, "superseded");
        assert_eq!(p.complete(100), Some(1000));
        assert!(p.is_empty());
    }
}
