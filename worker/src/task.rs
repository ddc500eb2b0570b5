//! The task runtime: one tokio task per subtask of a vertex. A source task pulls batches from its
//! connector and generates watermarks; any other task reads its inbox, aligns watermarks over its
//! input channels (the minimum) and waits for every input to end. Either way, batches run through
//! the chained operators and leave through a sink or a [`Router`].
//!
//! Checkpoints (see [`crate::checkpoint`]): a source task injects a barrier when the coordinator
//! triggers one; other tasks align barriers over their inputs. On the barrier a task snapshots its
//! chain (source position, operator state, sink staging), forwards the barrier and uploads the
//! snapshot in the background, acking to the coordinator when the files are stored. On restore,
//! each operator gets the snapshots of the earlier subtasks whose key groups it now owns.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::plan::{EventTime, OperatorKind, Plan, Port};
use eddy_jobs::{TaskId, Value};
use eddy_proto::worker_message::Msg as Report;
use eddy_proto::{CheckpointAck, CheckpointManifest, TaskSnapshot, WorkerMessage};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::task::TaskTracker;

use crate::align::{Aligner, Offer};
use crate::batch::{Batch, Message};
use crate::checkpoint::{self, Storage, Uploader};
use crate::connectors;
use crate::error::{Result, TaskError};
use crate::exchange::{Inboxes, Peers, Router, Wiring};
use crate::keys::{groups_overlap, key_group_range};
use crate::operator::{
    future_horizon_ms, Collector, ConnectorContext, Operator, OperatorContext, OperatorSnapshot, Progress, RestoredState, Sink, Source,
    SourceOrder, Stage, TaskMetrics,
};
use crate::operators;

/// Orders for a running task from the worker's control loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskCommand {
    /// Sources only: inject barrier `n`, after passing on the orders for the source operator
    /// they name (so that the checkpoint records them).
    Trigger(u64, Vec<(String, SourceOrder)>),
    /// Checkpoint `n` is complete.
    Complete(u64),
}

/// Everything a task needs to run.
pub struct TaskContext {
    /// Job id.
    pub job_id: String,
    /// Job attempt (fencing term).
    pub attempt: u64,
    /// Which task.
    pub task: TaskId,
    /// The job's plan.
    pub plan: Arc<Plan>,
    /// Data address of every task of the job.
    pub placement: Arc<HashMap<TaskId, String>>,
    /// This worker's data address.
    pub local_address: String,
    /// This worker's inboxes.
    pub inboxes: Inboxes,
    /// Connections to other workers.
    pub peers: Peers,
    /// Counters.
    pub metrics: Arc<TaskMetrics>,
    /// Orders from the control loop (checkpoint triggers and completions).
    pub commands: mpsc::Receiver<TaskCommand>,
    /// Reports to the coordinator (checkpoint acks), sent on whichever control session is open.
    pub reports: mpsc::UnboundedSender<WorkerMessage>,
    /// Checkpoint storage; `None` when the job takes no checkpoints.
    pub storage: Option<Storage>,
    /// A local directory of this task's own for state and scratch files, removed when it ends.
    pub dir: PathBuf,
    /// The checkpoint to restore from.
    pub restore: Option<Arc<CheckpointManifest>>,
    /// Set when the job is cancelled for good (see `ConnectorContext::released`).
    pub released: Arc<AtomicBool>,
    /// The uploads of the task's checkpoints, which run on beside it and may outlive it: whoever
    /// reports the task's end waits for them first.
    pub uploads: TaskTracker,
}

enum Tail {
    /// A sink, with its index in the plan.
    Sink(usize, Box<dyn Sink>),
    Router(Router),
}

struct Chain {
    /// The chained operators, each with its index in the plan.
    ops: Vec<(usize, Box<dyn Operator>)>,
    tail: Tail,
    metrics: Arc<TaskMetrics>,
    checkpoints: Option<Checkpoints>,
}

/// What a task needs to take checkpoints.
struct Checkpoints {
    uploader: Arc<Uploader>,
    reports: mpsc::UnboundedSender<WorkerMessage>,
    job_id: String,
    attempt: u64,
    task: TaskId,
    dir: PathBuf,
    uploads: TaskTracker,
}

impl Chain {
    async fn push(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.metrics.batches_in.fetch_add(1, Ordering::Relaxed);
        self.busy(async |c| c.push_from(0, batch).await).await
    }

    /// Runs `batch` through operators `start..` and into the tail.
    async fn push_from(&mut self, start: usize, batch: Batch) -> Result<()> {
        let mut pending = vec![batch];
        for i in start..self.ops.len() {
            let mut out = Collector::default();
            for b in pending {
                self.ops[i].1.process_batch(b, &mut out).await?;
            }
            self.emit_late(out.late).await?;
            pending = out.main;
        }
        for b in pending {
            self.emit(Port::Main, b).await?;
        }
        Ok(())
    }

    async fn emit_late(&mut self, late: Vec<Batch>) -> Result<()> {
        for b in late {
            self.emit(Port::Late, b).await?;
        }
        Ok(())
    }

    async fn emit(&mut self, port: Port, batch: Batch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.metrics.records_out.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.metrics.batches_out.fetch_add(1, Ordering::Relaxed);
        match &mut self.tail {
            Tail::Sink(_, s) if port == Port::Main => s.write(batch).await,
            // A sink's chain has no late output; nothing reads it.
            Tail::Sink(..) => Ok(()),
            Tail::Router(r) => r.send(port, batch).await,
        }
    }

    /// Times `work` on the chain as busy, less what the exchange spent waiting on a full downstream
    /// meanwhile (counted as backpressure there): batches, windows firing on a watermark, sinks
    /// flushing on a tick or committing, the end of input.
    async fn busy<T>(&mut self, work: impl AsyncFnOnce(&mut Chain) -> Result<T>) -> Result<T> {
        let from = self.metrics.busy_from();
        let done = work(self).await;
        self.metrics.busy_until_now(from);
        done
    }

    async fn watermark(&mut self, watermark: i64) -> Result<()> {
        self.busy(async |c| c.watermark_untimed(watermark).await).await
    }

    async fn watermark_untimed(&mut self, watermark: i64) -> Result<()> {
        self.metrics.watermark.store(watermark, Ordering::Relaxed);
        for i in 0..self.ops.len() {
            let mut out = Collector::default();
            self.ops[i].1.on_watermark(watermark, &mut out).await?;
            self.emit_late(out.late).await?;
            for b in out.main {
                self.push_from(i + 1, b).await?;
            }
        }
        match &mut self.tail {
            Tail::Sink(_, s) => s.on_watermark(watermark).await,
            Tail::Router(r) => r.broadcast(Message::Watermark(watermark)).await,
        }
    }

    async fn end(&mut self) -> Result<()> {
        self.busy(async |c| c.end_untimed().await).await
    }

    async fn end_untimed(&mut self) -> Result<()> {
        for i in 0..self.ops.len() {
            let mut out = Collector::default();
            self.ops[i].1.finish(&mut out).await?;
            self.emit_late(out.late).await?;
            for b in out.main {
                self.push_from(i + 1, b).await?;
            }
        }
        match &mut self.tail {
            Tail::Sink(_, s) => s.finish().await,
            Tail::Router(r) => r.broadcast(Message::End).await,
        }
    }

    fn flush_deadline(&self) -> Option<Instant> {
        match &self.tail {
            Tail::Router(r) => r.flush_deadline(),
            Tail::Sink(..) => None,
        }
    }

    async fn flush(&mut self) -> Result<()> {
        match &mut self.tail {
            Tail::Router(r) => r.flush().await,
            Tail::Sink(..) => Ok(()),
        }
    }

    /// The chain's operators and its sink (if any), with their plan indices, in order.
    fn stages(&mut self) -> impl Iterator<Item = (usize, &mut dyn Stage)> {
        let sink = match &mut self.tail {
            Tail::Sink(i, s) => Some((*i, s.as_mut() as &mut dyn Stage)),
            Tail::Router(_) => None,
        };
        self.ops.iter_mut().map(|(i, o)| (*i, o.as_mut() as &mut dyn Stage)).chain(sink)
    }

    /// Time passes: lets the operators keep house and a sink flush what has waited long enough.
    async fn tick(&mut self) -> Result<()> {
        self.busy(async |c| {
            for (_, stage) in c.stages() {
                stage.tick().await?;
            }
            Ok(())
        })
        .await
    }

    /// Barrier `id` passes this task: snapshot every stage (the source first, if the task has one,
    /// with its plan index), which lets the sink stage its output, forward the barrier, and upload
    /// and ack in the background. A stage that cannot snapshot fails the task (the job restarts
    /// from the last complete checkpoint); an upload that fails declines the checkpoint.
    async fn checkpoint(&mut self, id: u64, source: Option<(usize, &mut dyn Stage)>) -> Result<()> {
        let started = Instant::now();
        // Checkpoints are off for this job, yet a barrier came: pass it on, store nothing.
        let scratch = self.checkpoints.as_ref().map(|c| c.dir.join(format!("chk-{id}")));
        let mut snapshots: Vec<(usize, OperatorSnapshot)> = Vec::new();
        if let Some(scratch) = &scratch {
            let dir = |index: usize| scratch.join(format!("op{index}"));
            if let Some((index, source)) = source {
                snapshots.push((index, source.snapshot(id, &dir(index)).await?));
            }
            for (index, stage) in self.stages() {
                snapshots.push((index, stage.snapshot(id, &dir(index)).await?));
            }
        }
        if let Tail::Router(r) = &mut self.tail {
            r.broadcast(Message::Barrier(id)).await?;
        }
        let (Some(c), Some(scratch)) = (&self.checkpoints, scratch) else { return Ok(()) };
        let mut ack = CheckpointAck {
            job_id: c.job_id.clone(),
            attempt: c.attempt,
            checkpoint_id: id,
            task_id: c.task.to_string(),
            snapshot: None,
            declined: String::new(),
        };
        tracing::debug!(job_id = %c.job_id, task = %c.task, checkpoint = id, sync_ms = started.elapsed().as_millis() as u64, "snapshot taken");
        let (uploader, reports) = (c.uploader.clone(), c.reports.clone());
        c.uploads.spawn(async move {
            match uploader.upload(id, snapshots).await {
                Ok(s) => ack.snapshot = Some(s),
                Err(e) => {
                    tracing::warn!(task = %ack.task_id, checkpoint = id, error = %e, "declining checkpoint");
                    ack.declined = e.to_string();
                }
            }
            let _ = tokio::fs::remove_dir_all(&scratch).await;
            // The control loop may be gone (shutdown); then nobody waits for the ack.
            let _ = reports.send(WorkerMessage { msg: Some(Report::CheckpointAck(ack)) });
        });
        Ok(())
    }

    /// Checkpoint `id` is complete.
    async fn checkpoint_complete(&mut self, id: u64) -> Result<()> {
        self.busy(async |c| {
            for (_, stage) in c.stages() {
                stage.checkpoint_complete(id).await?;
            }
            c.metrics.committed_checkpoint.store(id, Ordering::Relaxed);
            Ok(())
        })
        .await
    }
}

/// The earlier subtasks that stored state for operator `op`, with the key groups they owned.
/// Operators are matched by their index in the plan, which a change of parallelism keeps (unlike
/// the chaining of operators into tasks).
fn earlier_snapshots(manifest: &CheckpointManifest, op: usize, max_parallelism: u32) -> Vec<(String, std::ops::Range<u32>, &TaskSnapshot)> {
    let Some(&n) = manifest.parallelism.get(&(op as u32)) else { return Vec::new() };
    let mut out: Vec<_> = manifest
        .tasks
        .iter()
        .filter(|(_, snap)| snap.operators.iter().any(|s| s.operator as usize == op))
        .filter_map(|(id, snap)| {
            let t: TaskId = id.parse().ok()?;
            Some((id.clone(), key_group_range(t.subtask, max_parallelism, n), snap))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Runs a task until its input ends (`Ok`) or it fails. Its local files stay for the uploads
/// still reading them ([`TaskContext::uploads`]); the caller removes them once those are done.
pub async fn run(mut ctx: TaskContext) -> Result<()> {
    let ctx = &mut ctx;
    let plan = ctx.plan.clone();
    let vertex = &plan.vertices[ctx.task.vertex];
    let key_groups = key_group_range(ctx.task.subtask, plan.max_parallelism, vertex.parallelism);
    let restore_dir = ctx.dir.join("restore");
    // What every earlier subtask stored for operator `o` (`keyed`: only those whose key groups
    // overlap this subtask's), fetched to local disk.
    let fetch = |o: usize, keyed: bool| {
        let earlier = ctx.restore.as_ref().map(|m| earlier_snapshots(m, o, plan.max_parallelism)).unwrap_or_default();
        let from: Vec<(String, &TaskSnapshot)> = earlier
            .into_iter()
            .filter(|(_, groups, _)| !keyed || groups_overlap(groups, &key_groups))
            .map(|(id, _, snap)| (id, snap))
            .collect();
        let storage = ctx.storage.clone();
        let dir = restore_dir.clone();
        async move {
            match (&storage, from.is_empty()) {
                (Some(storage), false) => checkpoint::fetch(storage, o, &from, &dir).await,
                _ => Ok(Vec::new()),
            }
        }
    };
    let restored_id = ctx.restore.as_ref().map(|m| m.checkpoint_id);
    let connector_ctx = |o: usize, restore: Vec<RestoredState>| ConnectorContext {
        job_id: ctx.job_id.clone(),
        task: ctx.task,
        parallelism: vertex.parallelism,
        schema: plan.operators[o].schema.clone(),
        metrics: ctx.metrics.clone(),
        checkpointing: ctx.storage.is_some(),
        attempt: ctx.attempt,
        restore: restored_id.map(|id| (id, restore)),
        state_dir: ctx.dir.join(format!("op{o}")),
        state_backend: plan.state.backend,
        event_time: match &plan.operators[o].kind {
            OperatorKind::Source { event_time: Some(e), .. } => Some(*e),
            _ => None,
        },
        released: ctx.released.clone(),
    };
    let mut ops = Vec::new();
    let mut sink = None;
    for &o in &vertex.operators {
        let op = &plan.operators[o];
        match &op.kind {
            OperatorKind::Sink { connector } => {
                let restore = fetch(o, false).await?;
                sink = Some((o, connectors::sink(connector, connector_ctx(o, restore)).await?));
            }
            OperatorKind::Source { .. } => {}
            kind => {
                let octx = OperatorContext {
                    state_dir: ctx.dir.join(format!("op{o}")),
                    key_groups: key_groups.clone(),
                    restore: fetch(o, matches!(kind, OperatorKind::Window(_))).await?,
                    metrics: ctx.metrics.clone(),
                };
                let op = operators::build(&plan, o, octx).await?.ok_or_else(|| TaskError::internal("operator has no builder"))?;
                ops.push((o, op));
            }
        }
    }
    // A source restores from every earlier subtask (it picks what it owns, such as partitions).
    let first = vertex.operators[0];
    let source = match &plan.operators[first].kind {
        OperatorKind::Source { connector, event_time } => {
            let restore = fetch(first, false).await?;
            let name = plan.operators[first].name.clone();
            Some((connectors::source(connector, connector_ctx(first, restore)).await?, name, *event_time))
        }
        _ => None,
    };
    let _ = tokio::fs::remove_dir_all(&restore_dir).await;
    let tail = match sink {
        Some((o, s)) => Tail::Sink(o, s),
        None => Tail::Router(Router::open(&Wiring {
            job_id: &ctx.job_id,
            attempt: ctx.attempt,
            task: ctx.task,
            plan: &ctx.plan,
            placement: &ctx.placement,
            local_address: &ctx.local_address,
            inboxes: &ctx.inboxes,
            peers: &ctx.peers,
            metrics: &ctx.metrics,
        })?),
    };
    let checkpoints = ctx.storage.as_ref().map(|storage| Checkpoints {
        uploader: Arc::new(Uploader::new(storage.clone(), &ctx.job_id, &ctx.task.to_string())),
        reports: ctx.reports.clone(),
        job_id: ctx.job_id.clone(),
        attempt: ctx.attempt,
        task: ctx.task,
        dir: ctx.dir.clone(),
        uploads: ctx.uploads.clone(),
    });
    let mut chain = Chain { ops, tail, metrics: ctx.metrics.clone(), checkpoints };
    match source {
        Some((source, name, event_time)) => run_source(source, (first, &name), event_time, &mut chain, &mut ctx.commands).await,
        None => run_inputs(ctx, &mut chain).await,
    }
}

/// Watermarks of a source: max event time seen − allowed delay, moved further by the source's own
/// [`Progress`]: a clock it carries (minus the allowed delay), an upstream watermark, or
/// nothing to read. A source that carries no such signal moves on with wall-clock time after
/// `idle_timeout` without records, so that windows still close; one that carries it never does,
/// so a stalled upstream holds windows back instead of firing them without its records.
struct WatermarkGenerator {
    event_time: EventTime,
    /// Whether records' event times move the watermark (not when it is the upstream's alone).
    records_move: bool,
    max_ts: i64,
    current: i64,
    last_record: Instant,
    last_advance: Instant,
}

impl WatermarkGenerator {
    fn new(event_time: EventTime, records_move: bool) -> WatermarkGenerator {
        let now = Instant::now();
        WatermarkGenerator { event_time, records_move, max_ts: i64::MIN, current: i64::MIN, last_record: now, last_advance: now }
    }

    fn on_batch(&mut self, batch: &Batch) -> Option<i64> {
        // A batch without rows (a source saying only that time passed) is no sign of traffic.
        if batch.is_empty() {
            return None;
        }
        // Traffic, whether or not its times move the watermark: wall-clock advance, if it
        // comes, counts from here, never from long before.
        let now = Instant::now();
        self.last_record = now;
        self.last_advance = now;
        if !self.records_move {
            return None;
        }
        let col = self.event_time.column;
        // A record stamped far beyond the wall clock (a typo, a year 2200) cannot move the
        // watermark: it would make every later record late, for good.
        let horizon = future_horizon_ms();
        let times = batch.rows.iter().filter_map(|row| match row[col] {
            Value::Timestamp(t) if t <= horizon => Some(t),
            _ => None,
        });
        self.max_ts = times.fold(self.max_ts, i64::max);
        let wm = self.max_ts.saturating_sub(self.event_time.allowed_delay_ms);
        (self.max_ts != i64::MIN && wm > self.current).then(|| {
            self.current = wm;
            wm
        })
    }

    /// After a batch and on every tick: the watermark, if the source's progress moved it.
    fn on_progress(&mut self, progress: Progress) -> Option<i64> {
        let wm = match progress {
            Progress::Unknown => return self.on_idle(),
            Progress::Waiting => return None,
            Progress::Clock(t) => t.saturating_sub(self.event_time.allowed_delay_ms),
            Progress::Watermark(w) => w,
            Progress::Idle => i64::MAX,
        };
        (wm > self.current).then(|| {
            self.current = wm;
            self.last_advance = Instant::now();
            wm
        })
    }

    /// Wall-clock advance, for sources without a signal of their own.
    fn on_idle(&mut self) -> Option<i64> {
        let now = Instant::now();
        let idle = now.duration_since(self.last_record).as_millis() as i64;
        if self.current == i64::MIN || idle < self.event_time.idle_timeout_ms {
            return None;
        }
        let elapsed = now.duration_since(self.last_advance).as_millis() as i64;
        if elapsed == 0 {
            return None;
        }
        self.last_advance = now;
        self.current = self.current.saturating_add(elapsed);
        Some(self.current)
    }
}

async fn run_source(
    mut source: Box<dyn Source>,
    (index, name): (usize, &str),
    event_time: Option<EventTime>,
    chain: &mut Chain,
    commands: &mut mpsc::Receiver<TaskCommand>,
) -> Result<()> {
    let records_move = !source.follows_upstream_watermark();
    let mut watermarks = event_time.map(|e| WatermarkGenerator::new(e, records_move));
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = chain.flush_deadline();
        tokio::select! {
            biased;
            // A partly filled output batch has waited long enough: it goes before more data, so a
            // steady trickle of input cannot hold it back.
            _ = sleep_until_opt(deadline), if deadline.is_some() => chain.flush().await?,
            // Data; `next_batch` is cancel-safe, so losing the race to another arm loses nothing.
            next = source.next_batch() => match next? {
                Some(batch) => {
                    let wm = watermarks.as_mut().and_then(|w| w.on_batch(&batch));
                    chain.push(batch).await?;
                    // The progress covers the batch just pushed, so it goes out after it.
                    let wm = watermarks.as_mut().and_then(|w| w.on_progress(source.progress())).or(wm);
                    if let Some(wm) = wm {
                        chain.watermark(wm).await?;
                    }
                    source.handed_on().await?;
                }
                None => {
                    chain.watermark(i64::MAX).await?;
                    return chain.end().await;
                }
            },
            // Checkpoints: inject a barrier between two batches; confirm positions once complete.
            Some(command) = commands.recv() => match command {
                TaskCommand::Trigger(id, orders) => {
                    for (_, order) in orders.into_iter().filter(|(to, _)| to == name) {
                        source.order(order).await?;
                    }
                    chain.checkpoint(id, Some((index, source.as_mut() as &mut dyn Stage))).await?
                }
                TaskCommand::Complete(id) => {
                    source.checkpoint_complete(id).await?;
                    chain.checkpoint_complete(id).await?;
                }
            },
            // Idle sources still advance their watermark, and partial batches get flushed.
            _ = tick.tick() => {
                if let Some(wm) = watermarks.as_mut().and_then(|w| w.on_progress(source.progress())) {
                    chain.watermark(wm).await?;
                }
                chain.flush().await?;
                chain.tick().await?;
                source.handed_on().await?;
                source.tick().await?;
            }
        }
    }
}

async fn run_inputs(ctx: &mut TaskContext, chain: &mut Chain) -> Result<()> {
    let key = (ctx.job_id.clone(), ctx.attempt, ctx.task);
    let n = ctx.plan.inputs(ctx.task).len();
    let mut inputs =
        ctx.inboxes.receivers(&key, n).map_err(|e| TaskError::internal(format!("cannot take the inbox of task {}: {e}", ctx.task)))?;
    let mut watermarks = vec![i64::MIN; n];
    let mut ended = vec![false; n];
    let mut current = i64::MIN;
    let mut aligner = Aligner::new(n);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = chain.flush_deadline();
        tokio::select! {
            biased;
            // A partly filled output batch has waited long enough: it goes before more input.
            _ = sleep_until_opt(deadline), if deadline.is_some() => chain.flush().await?,
            // Inputs past the barrier being aligned stay unread (their senders wait).
            delivery = inputs.recv(|i| aligner.blocked(i)) => {
                let delivery = delivery.ok_or_else(|| TaskError::internal("inbox closed"))?;
                let input = delivery.input;
                if input >= n {
                    return Err(TaskError::internal(format!("message for input {input}, task has {n}")));
                }
                let delivery = match aligner.offer(delivery) {
                    Offer::Process(d) => d,
                    Offer::Absorbed => continue,
                    Offer::Aligned(id) => {
                        chain.checkpoint(id, None).await?;
                        continue;
                    }
                };
                match delivery.msg {
                    Message::Barrier(_) => {}
                    Message::Data(batch) => chain.push(batch).await?,
                    Message::Watermark(w) => {
                        watermarks[input] = watermarks[input].max(w);
                        let min = watermarks.iter().copied().min().unwrap_or(i64::MAX);
                        if min > current {
                            current = min;
                            chain.watermark(min).await?;
                        }
                    }
                    Message::End => {
                        ended[input] = true;
                        watermarks[input] = i64::MAX;
                        if ended.iter().all(|e| *e) {
                            if current < i64::MAX {
                                chain.watermark(i64::MAX).await?;
                            }
                            return chain.end().await;
                        }
                        // The inputs still running may have all delivered a pending barrier.
                        if let Some(id) = aligner.after_end() {
                            chain.checkpoint(id, None).await?;
                        }
                    }
                }
            }
            // Completed checkpoints let sinks commit what they staged.
            Some(command) = ctx.commands.recv() => {
                if let TaskCommand::Complete(id) = command {
                    chain.checkpoint_complete(id).await?;
                }
            }
            // Sinks flush on time, not only on data.
            _ = tick.tick() => chain.tick().await?,
        }
    }
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_jobs::Row;

    fn generator() -> WatermarkGenerator {
        WatermarkGenerator::new(EventTime { column: 0, allowed_delay_ms: 1_000, idle_timeout_ms: 2_000 }, true)
    }

    fn at(ts: i64) -> Batch {
        Batch::inserts(vec![vec![Value::Timestamp(ts)] as Row])
    }

    /// A source that carries a signal (a database clock, upstream heartbeats) never follows the
    /// wall clock: while it says nothing, the watermark stays where its records left it.
    #[tokio::test(start_paused = true)]
    async fn a_source_with_a_signal_stalls_when_the_signal_does() {
        let mut g = generator();
        assert_eq!(g.on_batch(&at(10_000)), Some(9_000));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(g.on_progress(Progress::Waiting), None);
        assert_eq!(g.on_progress(Progress::Watermark(8_000)), None, "never backwards");
        assert_eq!(g.on_progress(Progress::Watermark(20_000)), Some(20_000));
        assert_eq!(g.on_progress(Progress::Clock(30_000)), Some(29_000), "a clock less the allowed delay");
        assert_eq!(g.on_batch(&at(25_000)), None, "a record below the watermark moves nothing");
        assert_eq!(g.current, 29_000);
    }

    /// Without a signal the watermark moves with the wall clock once the source has been idle for
    /// `idle_timeout`, as before.
    #[tokio::test(start_paused = true)]
    async fn a_source_without_a_signal_follows_the_wall_clock_when_idle() {
        let mut g = generator();
        assert_eq!(g.on_progress(Progress::Unknown), None, "nothing read yet: nothing to advance from");
        assert_eq!(g.on_batch(&at(10_000)), Some(9_000));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(g.on_progress(Progress::Unknown), None);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(g.on_progress(Progress::Unknown), Some(11_500));
    }

    /// Empty batches (heartbeats, clock messages) are not traffic: they keep no source from idling.
    #[tokio::test(start_paused = true)]
    async fn empty_batches_are_not_traffic() {
        let mut g = generator();
        assert_eq!(g.on_batch(&at(10_000)), Some(9_000));
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(g.on_batch(&Batch::default()), None);
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(g.on_progress(Progress::Unknown), Some(11_500));
    }

    /// A source that follows its upstream's watermark (heartbeats) is moved by nothing else: a
    /// batch of one partition's newer records must not close windows that another partition's
    /// older records, still unread, belong to.
    #[tokio::test(start_paused = true)]
    async fn records_do_not_move_a_source_that_follows_upstream_heartbeats() {
        let mut g = WatermarkGenerator::new(EventTime { column: 0, allowed_delay_ms: 1_000, idle_timeout_ms: 2_000 }, false);
        assert_eq!(g.on_batch(&at(60_000)), None);
        assert_eq!(g.on_progress(Progress::Watermark(5_000)), Some(5_000));
        assert_eq!(g.on_batch(&at(90_000)), None);
        assert_eq!(g.current, 5_000);
    }

    /// Records that do not move the watermark are still traffic: when the source then goes
    /// quiet, the wall-clock advance counts from its last record, not from the watermark's last
    /// move a minute earlier (which would close a minute of windows at once).
    #[tokio::test(start_paused = true)]
    async fn wall_clock_advance_counts_from_the_last_record_even_when_records_do_not_move_it() {
        let mut g = WatermarkGenerator::new(EventTime { column: 0, allowed_delay_ms: 1_000, idle_timeout_ms: 2_000 }, false);
        assert_eq!(g.on_progress(Progress::Watermark(5_000)), Some(5_000));
        for s in 0..60 {
            tokio::time::advance(Duration::from_secs(1)).await;
            assert_eq!(g.on_batch(&at(6_000 + s)), None);
            assert_eq!(g.on_progress(Progress::Waiting), None);
        }
        tokio::time::advance(Duration::from_millis(1_500)).await;
        assert_eq!(g.on_progress(Progress::Unknown), None, "quiet for less than the idle timeout");
        tokio::time::advance(Duration::from_millis(1_000)).await;
        assert_eq!(g.on_progress(Progress::Unknown), Some(7_500));
    }

    /// A source that reads nothing holds no window back.
    #[tokio::test(start_paused = true)]
    async fn an_idle_source_releases_every_window() {
        let mut g = generator();
        assert_eq!(g.on_progress(Progress::Idle), Some(i64::MAX));
        assert_eq!(g.on_progress(Progress::Idle), None);
    }
}
