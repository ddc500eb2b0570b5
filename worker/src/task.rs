//! The task runtime: one tokio task per subtask of a vertex. A source task pulls batches from its
//! connector and generates watermarks; any other task reads its inbox, aligns watermarks over its
//! input channels (the minimum) and waits for every input to end. Either way, batches run through
//! the chained operators and leave through a sink or a [`Router`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::plan::{EventTime, OperatorKind, Plan, Port};
use eddy_jobs::{TaskId, Value};
use tokio::time::Instant;

use crate::batch::{Batch, Message};
use crate::connectors::{self, ConnectorContext, Sink};
use crate::error::{Result, TaskError};
use crate::exchange::{Inboxes, Peers, Router};
use crate::operators::{self, Collector, Operator};

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
}

impl TaskMetrics {
    /// Sets a connector gauge.
    pub fn set_gauge(&self, name: &str, value: i64) {
        let mut g = self.gauges.lock().unwrap_or_else(|e| e.into_inner());
        match g.get_mut(name) {
            Some(v) => *v = value,
            None => {
                g.insert(name.to_string(), value);
            }
        }
    }

    /// A copy of the gauges.
    pub fn gauges(&self) -> std::collections::BTreeMap<String, i64> {
        self.gauges.lock().unwrap_or_else(|e| e.into_inner()).clone()
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
        }
    }
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
}

enum Tail {
    Sink(Box<dyn Sink>),
    Router(Router),
}

struct Chain {
    ops: Vec<Box<dyn Operator>>,
    tail: Tail,
    metrics: Arc<TaskMetrics>,
}

impl Chain {
    async fn push(&mut self, batch: Batch) -> Result<()> {
        self.metrics.records_in.fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.metrics.batches_in.fetch_add(1, Ordering::Relaxed);
        self.push_from(0, batch).await
    }

    /// Runs `batch` through operators `start..` and into the tail.
    async fn push_from(&mut self, start: usize, batch: Batch) -> Result<()> {
        let mut pending = vec![batch];
        for i in start..self.ops.len() {
            let mut out = Collector::default();
            for b in pending {
                self.ops[i].process_batch(b, &mut out).await?;
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
        if late.is_empty() {
            return Ok(());
        }
        let total: u64 = self.ops.iter().map(|o| o.late_records()).sum();
        self.metrics.late_records.store(total, Ordering::Relaxed);
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
            Tail::Sink(s) if port == Port::Main => s.write(batch).await,
            // A sink's chain has no late output; nothing reads it.
            Tail::Sink(_) => Ok(()),
            Tail::Router(r) => r.send(port, batch).await,
        }
    }

    async fn watermark(&mut self, watermark: i64) -> Result<()> {
        self.metrics.watermark.store(watermark, Ordering::Relaxed);
        for i in 0..self.ops.len() {
            let mut out = Collector::default();
            self.ops[i].on_watermark(watermark, &mut out).await?;
            self.emit_late(out.late).await?;
            for b in out.main {
                self.push_from(i + 1, b).await?;
            }
        }
        match &mut self.tail {
            Tail::Sink(s) => s.on_watermark(watermark).await,
            Tail::Router(r) => r.broadcast(Message::Watermark(watermark)).await,
        }
    }

    async fn end(&mut self) -> Result<()> {
        for i in 0..self.ops.len() {
            let mut out = Collector::default();
            self.ops[i].on_end(&mut out).await?;
            self.emit_late(out.late).await?;
            for b in out.main {
                self.push_from(i + 1, b).await?;
            }
        }
        match &mut self.tail {
            Tail::Sink(s) => s.finish().await,
            Tail::Router(r) => r.broadcast(Message::End).await,
        }
    }

    fn flush_deadline(&self) -> Option<Instant> {
        match &self.tail {
            Tail::Router(r) => r.flush_deadline(),
            Tail::Sink(_) => None,
        }
    }

    async fn flush(&mut self) -> Result<()> {
        match &mut self.tail {
            Tail::Router(r) => r.flush().await,
            Tail::Sink(_) => Ok(()),
        }
    }

    /// Time passes: lets a sink flush what has waited long enough.
    async fn tick(&mut self) -> Result<()> {
        match &mut self.tail {
            Tail::Sink(s) => s.tick().await,
            Tail::Router(_) => Ok(()),
        }
    }
}

/// Runs a task until its input ends (`Ok`) or it fails.
pub async fn run(ctx: TaskContext) -> Result<()> {
    let plan = ctx.plan.clone();
    let vertex = &plan.vertices[ctx.task.vertex];
    let mut ops = Vec::new();
    let mut sink = None;
    let connector_ctx = |schema: &eddy_jobs::Schema| ConnectorContext {
        job_id: ctx.job_id.clone(),
        task: ctx.task,
        parallelism: vertex.parallelism,
        schema: schema.clone(),
        metrics: ctx.metrics.clone(),
    };
    for &o in &vertex.operators {
        let op = &plan.operators[o];
        match &op.kind {
            OperatorKind::Sink { connector } => {
                sink = Some(connectors::sink(connector, connector_ctx(&op.schema)).await?);
            }
            OperatorKind::Source { .. } => {}
            _ => ops.push(operators::build(&plan, o).await?.ok_or_else(|| TaskError::internal("operator has no builder"))?),
        }
    }
    let tail = match sink {
        Some(s) => Tail::Sink(s),
        None => Tail::Router(Router::open(&ctx)?),
    };
    let mut chain = Chain { ops, tail, metrics: ctx.metrics.clone() };
    match &plan.operators[vertex.operators[0]].kind {
        OperatorKind::Source { connector, event_time } => {
            let schema = &plan.operators[vertex.operators[0]].schema;
            let source = connectors::source(connector, connector_ctx(schema)).await?;
            run_source(source, *event_time, &mut chain).await
        }
        _ => run_inputs(&ctx, &mut chain).await,
    }
}

/// Watermarks of a source: max event time seen − allowed delay; after `idle_timeout` without
/// records, the watermark moves on with wall-clock time so that windows still close.
struct WatermarkGenerator {
    event_time: EventTime,
    max_ts: i64,
    current: i64,
    last_record: Instant,
    last_advance: Instant,
}

impl WatermarkGenerator {
    fn new(event_time: EventTime) -> WatermarkGenerator {
        let now = Instant::now();
        WatermarkGenerator { event_time, max_ts: i64::MIN, current: i64::MIN, last_record: now, last_advance: now }
    }

    fn on_batch(&mut self, batch: &Batch) -> Option<i64> {
        let col = self.event_time.column;
        for row in &batch.rows {
            if let Value::Timestamp(t) = row[col] {
                self.max_ts = self.max_ts.max(t);
            }
        }
        let now = Instant::now();
        self.last_record = now;
        self.last_advance = now;
        let wm = self.max_ts.saturating_sub(self.event_time.allowed_delay_ms);
        (self.max_ts != i64::MIN && wm > self.current).then(|| {
            self.current = wm;
            wm
        })
    }

    fn on_tick(&mut self) -> Option<i64> {
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

async fn run_source(mut source: Box<dyn connectors::Source>, event_time: Option<EventTime>, chain: &mut Chain) -> Result<()> {
    let mut watermarks = event_time.map(WatermarkGenerator::new);
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            // Data first; `next_batch` is cancel-safe, so losing the race to the tick loses nothing.
            next = source.next_batch() => match next? {
                Some(batch) => {
                    let wm = watermarks.as_mut().and_then(|w| w.on_batch(&batch));
                    chain.push(batch).await?;
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
            // Idle sources still advance their watermark, and partial batches get flushed.
            _ = tick.tick() => {
                if let Some(wm) = watermarks.as_mut().and_then(WatermarkGenerator::on_tick) {
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

async fn run_inputs(ctx: &TaskContext, chain: &mut Chain) -> Result<()> {
    let key = (ctx.job_id.clone(), ctx.attempt, ctx.task);
    let mut inbox = ctx
        .inboxes
        .receiver(&key)
        .ok_or_else(|| TaskError::internal(format!("inbox of task {} already taken or fenced", ctx.task)))?;
    let n = ctx.plan.inputs(ctx.task).len();
    let mut watermarks = vec![i64::MIN; n];
    let mut ended = vec![false; n];
    let mut current = i64::MIN;
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let deadline = chain.flush_deadline();
        tokio::select! {
            biased;
            delivery = inbox.recv() => {
                let delivery = delivery.ok_or_else(|| TaskError::internal("inbox closed"))?;
                let input = delivery.input;
                if input >= n {
                    return Err(TaskError::internal(format!("message for input {input}, task has {n}")));
                }
                match delivery.msg {
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
                    }
                }
            }
            // A partly filled output batch has waited long enough.
            _ = sleep_until_opt(deadline), if deadline.is_some() => chain.flush().await?,
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
