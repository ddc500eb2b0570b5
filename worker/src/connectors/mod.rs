//! Connectors: sources that produce batches and sinks that write them, registered in one place
//! ([`source`] and [`sink`]) by the connector names specs use.

pub mod clickhouse;
pub mod file;
pub mod generator;
pub mod http;
pub mod kafka;
pub mod postgres_cdc;
pub mod redis;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use async_trait::async_trait;
use eddy_jobs::connectors::{SinkConnector, SourceConnector};
use eddy_jobs::plan::{EventTime, StateBackend};
use eddy_jobs::{Schema, TaskId};

use crate::batch::Batch;
use crate::error::Result;
use crate::operators::{OperatorSnapshot, RestoredState};
use crate::task::TaskMetrics;

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
pub trait Source: Send {
    /// The next batch, or `None` once the source is exhausted.
    async fn next_batch(&mut self) -> Result<Option<Batch>>;

    /// Every batch returned so far has been handed to the next task. Without checkpoints this is
    /// when a source may confirm its position upstream (a replication slot's LSN).
    async fn handed_on(&mut self) -> Result<()> {
        Ok(())
    }

    /// Checkpoint `id` starts here: the position to resume from so that exactly the batches
    /// returned after this call are read again, as inline bytes this source can read back on
    /// restore, plus any state it keeps, as files it may write into `scratch` (an empty local
    /// directory) and return as `files`.
    async fn snapshot(&mut self, _id: u64, _scratch: &Path) -> Result<OperatorSnapshot> {
        Ok(OperatorSnapshot::default())
    }

    /// Checkpoint `id` is complete: the position it holds may be confirmed upstream.
    async fn checkpoint_complete(&mut self, _id: u64) -> Result<()> {
        Ok(())
    }

    /// Called about every 200 ms, busy or not: a chance for housekeeping such as keeping an idle
    /// replication slot advancing or refreshing lag gauges.
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }

    /// What the source knows of event time beyond its records' timestamps, asked after every
    /// batch and on every tick. It covers the records returned so far.
    fn progress(&self) -> Progress {
        Progress::Unknown
    }

    /// Whether the source's [`Progress::Watermark`] is its watermark alone (an upstream job's
    /// heartbeats, or the lowest over the partitions it reads): its records' times then move
    /// nothing by themselves, since one partition's newer records must not overtake another's
    /// older ones still to be read.
    fn follows_upstream_watermark(&self) -> bool {
        false
    }
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
pub trait Sink: Send {
    /// Writes one batch; returning means the sink has taken responsibility for it.
    async fn write(&mut self, batch: Batch) -> Result<()>;
    /// The input watermark advanced; a chance to flush.
    async fn on_watermark(&mut self, _watermark: i64) -> Result<()> {
        Ok(())
    }
    /// Called about every 100 ms, busy or idle: a chance to flush what has waited long enough.
    async fn tick(&mut self) -> Result<()> {
        Ok(())
    }
    /// A checkpoint barrier arrived: everything written before it must be safely out (or staged
    /// for [`Sink::checkpoint_complete`]) when this returns. Returns what to store in the checkpoint.
    async fn on_barrier(&mut self, _id: u64) -> Result<Vec<u8>> {
        Ok(Vec::new())
    }
    /// Checkpoint `id` is complete: commit what was staged for it.
    async fn checkpoint_complete(&mut self, _id: u64) -> Result<()> {
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
    /// Checks at once that the file (if any) can be appended to.
    pub fn open(who: &'static str, path: Option<&str>, metrics: Arc<TaskMetrics>) -> Result<DeadLetters> {
        if let Some(path) = path {
            std::fs::OpenOptions::new().create(true).append(true).open(path).map_err(|e| {
                crate::error::TaskError::user(format!(
                    "{who}: dead-letter file `{path}`: {e}; check that its directory exists and is writable"
                ))
            })?;
        }
        Ok(DeadLetters { path: path.map(str::to_string), metrics, who })
    }

    /// Records one dead letter; `line` is a JSON object without the newline.
    pub fn record(&self, line: &str) -> Result<()> {
        use std::io::Write as _;
        self.metrics.dead_lettered.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let Some(path) = &self.path else { return Ok(()) };
        let mut text = String::with_capacity(line.len() + 1);
        text.push_str(line);
        text.push('\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(text.as_bytes()))
            .map_err(|e| {
                crate::error::TaskError::external(format!(
                    "{}: writing the dead-letter file `{path}`: {e}; check it is writable",
                    self.who
                ))
            })
    }
}

/// Builds a source instance: every source connector is registered here.
pub async fn source(connector: &SourceConnector, ctx: ConnectorContext) -> Result<Box<dyn Source>> {
    Ok(match connector {
        SourceConnector::Generator(o) => {
            let restore = ctx.restore.as_ref().map(|(_, states)| states.as_slice()).unwrap_or_default();
            Box::new(generator::Generator::new(o.clone(), ctx.task.subtask, ctx.parallelism).restored(restore)?)
        }
        SourceConnector::PostgresCdc(o) => Box::new(postgres_cdc::PostgresCdc::start(o, ctx).await?),
        SourceConnector::Kafka(o) => Box::new(kafka::KafkaSource::start(o, ctx)?),
        SourceConnector::File(o) => Box::new(file::FileSource::open(o, &ctx)?),
    })
}

/// Builds a sink instance: every sink connector is registered here.
pub async fn sink(connector: &SinkConnector, ctx: ConnectorContext) -> Result<Box<dyn Sink>> {
    Ok(match connector {
        SinkConnector::File(o) => Box::new(file::FileSink::open(o, &ctx)?),
        SinkConnector::Discard => Box::new(Discard),
        SinkConnector::Kafka(o) => Box::new(kafka::KafkaSink::start(o, ctx).await?),
        SinkConnector::Redis(o) => Box::new(redis::RedisLeaderboard::connect(o, ctx).await?),
        SinkConnector::ClickHouse(o) => Box::new(clickhouse::ClickHouseSink::new(o, ctx)?),
        SinkConnector::Http(o) => Box::new(http::HttpSink::new(o, ctx)?),
    })
}

/// Drops every row.
struct Discard;

#[async_trait]
impl Sink for Discard {
    async fn write(&mut self, _batch: Batch) -> Result<()> {
        Ok(())
    }
    async fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::PendingCheckpoints;

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
