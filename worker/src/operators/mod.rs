//! Operators: the steps of a chain between a source and a sink (transforms, windows, lookups).
//! Sources and sinks are connectors (see `crate::connectors`). `build` turns a planned
//! operator into a running one; running them is the task runtime's job (`crate::task`).

pub mod lookup;
pub mod transform;
pub mod window;

use std::ops::Range;
use std::path::PathBuf;

use eddy_jobs::connectors::BadRecordPolicy;
use eddy_jobs::plan::{OperatorKind, Plan};

use crate::batch::Batch;
use crate::error::Result;

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

impl OperatorSnapshot {
    /// A snapshot of inline state only.
    pub fn inline(inline: Vec<u8>) -> OperatorSnapshot {
        OperatorSnapshot { inline, files: None }
    }
}

/// One subtask's snapshot of this operator from an earlier run, fetched to local disk.
#[derive(Debug, Clone, Default)]
pub struct RestoredState {
    /// What `OperatorSnapshot::inline` held.
    pub inline: Vec<u8>,
    /// Where the files of `OperatorSnapshot::files` were downloaded to.
    pub files: Option<PathBuf>,
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
}

/// One step of a chain. Only `process_batch` is required; the hooks default to doing nothing.
/// Methods are async so that an operator may wait on an external system (a lookup); CPU-only
/// operators simply never await.
#[async_trait::async_trait]
pub trait Operator: Send {
    /// Processes a batch of input rows.
    async fn process_batch(&mut self, batch: Batch, out: &mut Collector) -> Result<()>;

    /// The input watermark advanced to `watermark`; the runtime forwards it downstream afterwards.
    async fn on_watermark(&mut self, _watermark: i64, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// All input has ended (after a final watermark).
    async fn on_end(&mut self, _out: &mut Collector) -> Result<()> {
        Ok(())
    }

    /// Records dropped as late so far.
    fn late_records(&self) -> u64 {
        0
    }

    /// A checkpoint barrier passed: capture the state as of now. `scratch` is an empty local
    /// directory the operator may write files into (and return as `files`).
    async fn snapshot(&mut self, _scratch: &std::path::Path) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::default())
    }
}

/// Builds operator `index` of `plan`, restoring its state from `ctx`; `None` for sources and sinks.
/// `metrics` are the task's (for the rows an operator sets aside).
pub async fn build(
    plan: &Plan,
    index: usize,
    ctx: OperatorContext,
    metrics: &std::sync::Arc<crate::task::TaskMetrics>,
) -> Result<Option<Box<dyn Operator>>> {
    let op = &plan.operators[index];
    Ok(match &op.kind {
        OperatorKind::Transform { filter, projection, bad_records, dead_letter_path } => {
            let bad_rows = BadRows::open("transform", &op.name, *bad_records, dead_letter_path, metrics)?;
            Some(Box::new(transform::Transform::new(filter.clone(), projection.clone()).with_bad_rows(bad_rows)))
        }
        OperatorKind::Window(w) => {
            let bad_rows = BadRows::open("window", &op.name, w.bad_records, &w.dead_letter_path, metrics)?;
            Some(Box::new(window::Window::open(w.clone(), plan.max_parallelism, plan.state.backend, ctx)?.with_bad_rows(bad_rows)))
        }
        OperatorKind::Lookup { options, on, columns, remember } => {
            let lookup = lookup::PostgresLookup::connect(options, *on, columns, metrics.clone()).await?;
            Some(Box::new(lookup.remembering(remember.as_ref(), plan.state.backend, plan.max_parallelism, &ctx)?))
        }
        OperatorKind::Source { .. } | OperatorKind::Sink { .. } => None,
    })
}

/// What a stage does with rows it cannot compute (an expression failed on them): its
/// `bad_records` policy, the dead letters it writes them to, and a count for the log.
pub struct BadRows {
    /// `transform[enriched]`, say.
    stage: String,
    name: String,
    policy: BadRecordPolicy,
    dead_letters: crate::connectors::DeadLetters,
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
        metrics: &std::sync::Arc<crate::task::TaskMetrics>,
    ) -> Result<BadRows> {
        let path = path.as_deref().filter(|_| policy == BadRecordPolicy::DeadLetter);
        let dead_letters = crate::connectors::DeadLetters::open(kind, path, metrics.clone())?;
        Ok(BadRows::new(kind, name, policy, dead_letters))
    }

    /// The bad rows of stage `name` of kind `kind`, set aside in `dead_letters`.
    pub fn new(kind: &str, name: &str, policy: BadRecordPolicy, dead_letters: crate::connectors::DeadLetters) -> BadRows {
        BadRows { stage: format!("{kind}[{name}]"), name: name.to_string(), policy, dead_letters, count: 0 }
    }

    /// Sets `row` aside (dropped or dead-lettered, with `error`), or with `fail` returns the
    /// task's error.
    pub fn take(&mut self, row: &[eddy_jobs::Value], error: String) -> Result<()> {
        if self.policy == BadRecordPolicy::Fail {
            return Err(crate::error::TaskError::user(format!(
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
        None => Err(crate::error::TaskError::user(error)),
    }
}

/// How far beyond the wall clock an event time may lie and still count (one hour).
pub const MAX_FUTURE_MS: i64 = 3_600_000;

/// The latest event time that counts now: the wall clock plus [`MAX_FUTURE_MS`]. Later records
/// move no watermark, and windows send them to their late output.
pub fn future_horizon_ms() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    now.saturating_add(MAX_FUTURE_MS)
}
