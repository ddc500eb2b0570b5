//! The coordinator's single owner of state. Requests arrive on a channel (from gRPC handlers and
//! worker streams) and are handled one at a time; a timer drives the failure detector, checkpoint
//! triggers and timeouts, and restarts. The workers are a [`Cluster`] (soft state); each durable
//! change to a job is a [`MetaCommand`] applied to the [`MetaState`] and made durable by a
//! [`MetaLog`] before anyone hears of it. I/O (manifests, metadata) never blocks the loop for long:
//! manifests are stored by spawned tasks that report back on an internal channel.
//!
//! Failures: a task that fails with a retryable error, or a lost worker, sends the job to
//! `restarting`; after a backoff (doubling from `restart_backoff` up to `max_restart_backoff`) it is
//! redeployed as a new attempt on the slots available, restoring its latest completed checkpoint.
//! After `max_restarts` restarts in a row (a run of a minute without failure resets the count) or
//! an error in the spec or the data, the job fails.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::connectors::SourceConnector;
use eddy_jobs::plan::OperatorKind;
use eddy_jobs::{Plan, TaskId};
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::{
    CancelJob, CancelResponse, CheckpointAck, CheckpointDone, CheckpointManifest, CheckpointView, CoordinatorMessage, DeployTasks,
    JobStatusResponse, JobSummary, TaskMetrics, TaskState, TaskUpdate, TaskView, Transition, TriggerCheckpoint, WorkerView,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checkpoint::{savepoint_id, AckOutcome, CheckpointTracker, Completed};
use crate::cluster::{Cluster, WorkerSender};
use crate::error::CoordinatorError;
use crate::meta::{MetaCommand, MetaLog, MetaState};
use crate::state::JobState;
use crate::store::{CheckpointRecord, CheckpointStore, JobRecord, SharedGc};
use crate::{now_ms, older_than_the_latest, CoordinatorConfig};

/// How long a restart waits for the old attempt's tasks to report that they stopped.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// State changes kept per job (the first one and the latest).
const HISTORY_KEPT: usize = 200;
/// How long a coordinator that starts (or starts leading) waits for workers to report a job's
/// running tasks before it restarts the job instead: the workers' lease, by which time every task
/// not reported has stopped, and a margin for a deposed leader's last renewals.
const ADOPT_WAIT: Duration = eddy_proto::WORKER_LEASE.saturating_add(Duration::from_secs(3));
/// Ended jobs (finished, failed, cancelled) kept, the latest ones; older ones are forgotten.
const FINISHED_JOBS_KEPT: usize = 100;

/// What the actor is asked to do.
pub enum Request {
    /// Validate, plan and schedule a spec.
    /// A new job; its spec was compiled to `plan` before it reached the loop (validation of a
    /// large spec must not hold up heartbeats).
    Submit { spec: String, plan: Box<Plan>, from_savepoint: String, reply: oneshot::Sender<Result<String, CoordinatorError>> },
    /// All jobs.
    ListJobs { reply: oneshot::Sender<Vec<JobSummary>> },
    /// One job in detail.
    JobStatus { job_id: String, reply: oneshot::Sender<Result<JobStatusResponse, CoordinatorError>> },
    /// Cancel a job.
    /// `release`: the job's sources give up what they hold upstream (a replication slot).
    Cancel { job_id: String, release: bool, reply: oneshot::Sender<Result<CancelResponse, CoordinatorError>> },
    /// All workers.
    ListWorkers { reply: oneshot::Sender<Vec<WorkerView>> },
    /// A worker opened its control stream.
    Register { worker_id: String, slots: u32, data_address: String, orders: WorkerSender, reply: oneshot::Sender<u64> },
    /// A message on a worker's control stream (`session` tells reconnections apart).
    Heartbeat { worker_id: String, session: u64, tasks: Vec<TaskUpdate> },
    /// A task changed state.
    TaskUpdate { worker_id: String, session: u64, update: TaskUpdate },
    /// A worker's control stream ended.
    Disconnected { worker_id: String, session: u64, cause: String },
    /// A task answered a checkpoint barrier.
    CheckpointAck { worker_id: String, session: u64, ack: CheckpointAck },
    /// Take a savepoint; then cancel the job, or redeploy it with a new parallelism.
    Savepoint { job_id: String, then: AfterSavepoint, reply: oneshot::Sender<Result<SavepointDone, CoordinatorError>> },
}

/// What to do once a requested savepoint is complete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSavepoint {
    /// Keep running.
    Continue,
    /// Cancel the job.
    Cancel,
    /// Redeploy with this parallelism from the savepoint.
    Rescale(u32),
}

/// A completed savepoint, as answered to the client.
#[derive(Debug, Clone)]
pub struct SavepointDone {
    /// The id to restore from.
    pub savepoint_id: String,
    /// Its statistics.
    pub view: CheckpointView,
    /// The job's attempt afterwards.
    pub attempt: u64,
}

/// Results of I/O the actor spawned.
enum Internal {
    /// The manifest of a checkpoint whose every task acked has been stored (or not).
    ManifestStored { job_id: String, manifest: Arc<CheckpointManifest>, result: Result<(), String> },
}

struct SavepointWaiter {
    then: AfterSavepoint,
    reply: oneshot::Sender<Result<SavepointDone, CoordinatorError>>,
}

struct TaskRecord {
    worker_id: String,
    state: TaskState,
    metrics: TaskMetrics,
    error: String,
}

struct Job {
    name: String,
    spec: String,
    /// Parallelism set by a rescale, replacing the spec's default.
    parallelism: Option<u32>,
    plan: Arc<Plan>,
    state: JobState,
    cause: String,
    attempt: u64,
    submitted_at_ms: i64,
    state_changed_at_ms: i64,
    running_since_ms: i64,
    finished_at_ms: i64,
    history: Vec<Transition>,
    /// Slot `i` of the job (subtask `i` of every vertex) runs on `slots[i]`; empty while restarting.
    slots: Vec<String>,
    tasks: BTreeMap<TaskId, TaskRecord>,
    checkpoints: CheckpointTracker,
    /// State to start from when no checkpoint of this job exists yet (a savepoint it was submitted from).
    initial_restore: Option<Arc<CheckpointManifest>>,
    /// The savepoint `initial_restore` came from when the job was submitted from one (kept in the
    /// metadata, so a coordinator restart before the first checkpoint still restores it).
    from_savepoint: Option<String>,
    /// Restarts after failures, in total and in a row.
    restarts: u32,
    failures_in_row: u32,
    /// When the next restart attempt is due, while restarting.
    restart_at: Option<Instant>,
    /// Since when the current attempt has been running.
    running_since: Option<Instant>,
    /// How long a restart waits for the old attempt's tasks to stop.
    stop_deadline: Option<Instant>,
    /// Workers of the attempt before the current one.
    previous_workers: Vec<String>,
    /// Set while a coordinator that just started (or just became the leader) collects the running
    /// tasks of the job's attempt from the workers' heartbeats: by then it adopts them, or
    /// restarts the job.
    adopt_until: Option<Instant>,
    savepoint_waiters: Vec<SavepointWaiter>,
    /// Checkpoints in the metadata whose manifest could not be read at start: they stay in the
    /// metadata (a later start may read them), and while there are any no shared state file of
    /// the job is deleted (one of them may need it).
    unreadable: Vec<CheckpointRecord>,
}

/// What a cancel that reaches no running task leaves upstream: the plan's replication slots,
/// with how to drop them (empty when it has none).
fn slots_left_behind(plan: &Plan) -> String {
    let slots: Vec<&str> = plan
        .operators
        .iter()
        .filter_map(|o| match &o.kind {
            OperatorKind::Source { connector: SourceConnector::PostgresCdc(c), .. } => Some(c.slot.as_str()),
            _ => None,
        })
        .collect();
    if slots.is_empty() {
        return String::new();
    }
    let drops: Vec<String> = slots.iter().map(|s| format!("SELECT pg_drop_replication_slot('{s}');")).collect();
    format!(
        "replication slot {} not dropped: no task of the job was running to drop it, and a slot nobody reads holds WAL on the server; once no job resumes from it, run {}",
        slots.join(", "),
        drops.join(" ")
    )
}

impl Job {
    /// The job ended for good (cancelled or finished): nothing restores from its checkpoints
    /// again, so their files go; its savepoints' stay.
    fn release_checkpoints(&mut self, job_id: &str, storage: Option<CheckpointStore>, now_ms: i64) {
        let released: Vec<u64> = self.checkpoints.release_checkpoints().iter().map(|c| c.id).collect();
        if let Some(storage) = storage {
            let kept: Vec<Arc<CheckpointManifest>> = self.checkpoints.kept().iter().map(|c| c.manifest.clone()).collect();
            let shared = self.shared_gc(u64::MAX, now_ms);
            let id = job_id.to_string();
            tokio::spawn(async move { storage.release(&id, released, kept, shared).await });
        }
        self.unreadable.retain(|c| c.savepoint);
    }

    /// What a collection may delete of the job's shared state files: those of checkpoints up to
    /// `checkpoint` (or, in the older layout, older than `before_ms`), or none while a checkpoint
    /// of the job could not be read.
    fn shared_gc(&self, checkpoint: u64, before_ms: i64) -> SharedGc {
        if self.unreadable.is_empty() {
            SharedGc::Through { checkpoint, before_ms }
        } else {
            SharedGc::Keep
        }
    }
}

/// The coordinator's state and its loop.
pub struct Coordinator {
    config: CoordinatorConfig,
    requests: mpsc::Receiver<Request>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    cluster: Cluster,
    jobs: BTreeMap<String, Job>,
    /// The durable metadata, as applied; every change to it goes through [`Coordinator::record`].
    meta: MetaState,
    /// Where it is made durable (`None`: nowhere, in tests).
    log: Option<Box<dyn MetaLog>>,
    storage: Option<CheckpointStore>,
}

impl Coordinator {
    /// A coordinator reading `requests`, keeping nothing on disk (tests).
    pub fn new(config: CoordinatorConfig, requests: mpsc::Receiver<Request>) -> Coordinator {
        let (internal_tx, internal) = mpsc::unbounded_channel();
        Coordinator {
            config,
            requests,
            internal_tx,
            internal,
            cluster: Cluster::default(),
            jobs: BTreeMap::new(),
            meta: MetaState::default(),
            log: None,
            storage: None,
        }
    }

    /// Keeps job metadata in `log` (which holds `state`) and checkpoints in `storage`, and resumes
    /// the jobs of `state`: those that were not over restart from their latest checkpoint once
    /// workers offer enough slots.
    pub async fn with_stores(mut self, log: Box<dyn MetaLog>, state: MetaState, storage: CheckpointStore) -> anyhow::Result<Coordinator> {
        let records: Vec<JobRecord> = state.jobs.values().cloned().collect();
        self.meta = state;
        self.log = Some(log);
        for r in records {
            let mut kept = Vec::new();
            let mut unreadable = Vec::new();
            for c in &r.checkpoints {
                match storage.get_manifest(&r.job_id, c.id).await {
                    Ok(m) => kept.push(Completed { id: c.id, savepoint: c.savepoint, manifest: Arc::new(m), view: record_view(&r.job_id, c) }),
                    Err(e) => {
                        warn!(job_id = %r.job_id, checkpoint = c.id, error = %e, "cannot read a checkpoint manifest; not restoring from it, and keeping every shared state file of the job until it reads again");
                        unreadable.push(c.clone());
                    }
                }
            }
            let (job_id, stored) = (r.job_id.clone(), r.state);
            self.resume_job(r, kept);
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            job.unreadable = unreadable;
            if stored == JobState::Cancelling {
                job.release_checkpoints(&job_id, Some(storage.clone()), now_ms());
            }
            // What the restart changed (a running job now restarts, a cancel in progress is
            // complete, an id skipped) is recorded like any change.
            let (to, cause, next) = (job.state, job.cause.clone(), job.checkpoints.next_id());
            let Some(held) = self.meta.jobs.get(&job_id) else { continue };
            let (state_changed, ids_skipped) = (held.state != to || held.cause != cause, held.next_checkpoint_id != next);
            if state_changed {
                self.record(MetaCommand::StateChanged { job_id: job_id.clone(), to, cause });
            }
            if ids_skipped {
                self.record(MetaCommand::CheckpointIdsUsed { job_id, next });
            }
        }
        // Savepoints a job was submitted from belong to other jobs, all loaded by now.
        let from: Vec<(String, String)> =
            self.jobs.iter().filter_map(|(id, j)| Some((id.clone(), j.from_savepoint.clone()?))).collect();
        for (job_id, savepoint) in from {
            let job = &self.jobs[&job_id];
            let restore = self.find_savepoint(&savepoint).map_err(|e| e.to_string()).and_then(|m| state_for_plan(&m, &job.plan));
            match restore {
                Ok(manifest) => self.jobs.get_mut(&job_id).expect("listed above").initial_restore = Some(Arc::new(manifest)),
                Err(e) => warn!(job_id, savepoint, error = %e, "the savepoint the job was submitted from cannot be restored; it restarts without it"),
            }
        }
        self.storage = Some(storage);
        Ok(self)
    }

    fn resume_job(&mut self, r: JobRecord, kept: Vec<Completed>) {
        let plan = match eddy_jobs::compile_with_parallelism(&r.spec, r.parallelism) {
            Ok(p) => p,
            Err(e) => {
                warn!(job_id = %r.job_id, error = %e, "a stored job's spec no longer plans; dropping it");
                if !r.state.is_terminal() {
                    let cause = format!("its spec no longer plans: {e}");
                    self.record(MetaCommand::StateChanged { job_id: r.job_id.clone(), to: JobState::Failed, cause });
                }
                self.record(MetaCommand::Forgotten { job_id: r.job_id });
                return;
            }
        };
        let stored_state = match r.state {
            // A cancel was under way: its tasks stop within their lease (and are told to when
            // their workers report them), so the cancel is complete.
            JobState::Cancelled | JobState::Cancelling => JobState::Cancelled,
            JobState::Failed => JobState::Failed,
            JobState::Finished => JobState::Finished,
            // Deployed: its tasks run on through the coordinator's change; adopt them.
            JobState::Scheduling | JobState::Running => r.state,
            JobState::Created | JobState::Restarting => JobState::Restarting,
        };
        let now = Instant::now();
        let mut job = self.new_job(&r.job_id, r.spec, r.parallelism, plan, now);
        // Ids are recorded as checkpoints start; one more is skipped for metadata written when
        // they were recorded as checkpoints ended, whose stored id the last checkpoint triggered
        // before the stop may have had: files an old attempt still uploads under it must never
        // mix with a new checkpoint's.
        job.checkpoints.resume(r.next_checkpoint_id + 1, kept);
        job.attempt = r.attempt;
        job.restarts = r.restarts;
        job.submitted_at_ms = r.submitted_at_ms;
        job.from_savepoint = r.from_savepoint.clone();
        job.state = stored_state;
        job.cause = if r.state == JobState::Cancelling { "cancelled; the coordinator restarted while its tasks stopped".into() } else { r.cause.clone() };
        if matches!(stored_state, JobState::Scheduling | JobState::Running) {
            job.adopt_until = Some(now + ADOPT_WAIT);
            job.running_since = Some(now);
            job.cause = format!("the coordinator changed; adopting the running tasks of attempt {}", r.attempt);
        }
        if stored_state == JobState::Restarting {
            let from = job.checkpoints.latest().map(|c| format!("checkpoint {}", c.id)).unwrap_or_else(|| "the start".into());
            job.cause = format!("coordinator restarted; resuming from {from}");
            // Give workers a moment to reconnect before the first placement attempt.
            job.restart_at = Some(now + Duration::from_secs(1));
        }
        job.history = vec![Transition { at_ms: now_ms(), from: String::new(), to: job.state.to_string(), cause: job.cause.clone() }];
        info!(job_id = %r.job_id, state = %job.state, cause = %job.cause, "job loaded from metadata");
        self.jobs.insert(r.job_id, job);
    }

    fn new_job(&self, job_id: &str, spec: String, parallelism: Option<u32>, plan: Plan, now: Instant) -> Job {
        let at = now_ms();
        let interval = plan.state.checkpoint_interval_ms.map(Duration::from_millis);
        let checkpoints = CheckpointTracker::new(job_id, interval, self.config.checkpoint_timeout, self.config.retained_checkpoints, now);
        Job {
            name: plan.name.clone(),
            spec,
            parallelism,
            plan: Arc::new(plan),
            state: JobState::Created,
            cause: "submitted".into(),
            attempt: 1,
            submitted_at_ms: at,
            state_changed_at_ms: at,
            running_since_ms: 0,
            finished_at_ms: 0,
            history: vec![Transition { at_ms: at, from: String::new(), to: JobState::Created.to_string(), cause: "submitted".into() }],
            slots: Vec::new(),
            tasks: BTreeMap::new(),
            checkpoints,
            initial_restore: None,
            from_savepoint: None,
            restarts: 0,
            failures_in_row: 0,
            restart_at: None,
            running_since: None,
            stop_deadline: None,
            previous_workers: Vec::new(),
            adopt_until: None,
            savepoint_waiters: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// Handles requests until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut timer = tokio::time::interval(Duration::from_millis(100));
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // The failure detector, checkpoint triggers and timeouts, restarts.
                _ = timer.tick() => self.on_timer(),
                // Results of spawned I/O.
                Some(event) = self.internal.recv() => self.on_internal(event),
                request = self.requests.recv() => match request {
                    Some(r) => self.handle(r),
                    None => break,
                },
            }
        }
        // Savepoints still waiting get an answer rather than a dropped channel.
        for job in self.jobs.values_mut() {
            for w in job.savepoint_waiters.drain(..) {
                let _ = w.reply.send(Err(CoordinatorError::ShuttingDown));
            }
        }
    }

    fn on_timer(&mut self) {
        // What arrived while this loop was busy (a slow metadata write) is heard before anyone is
        // judged silent: the loop's own stall is not the workers'.
        while let Ok(request) = self.requests.try_recv() {
            self.handle(request);
        }
        self.check_heartbeats();
        let now = Instant::now();
        let ids: Vec<String> = self.jobs.keys().cloned().collect();
        for job_id in ids {
            let job = &self.jobs[&job_id];
            if job.state == JobState::Restarting && job.restart_at.is_some_and(|t| t <= now) {
                self.try_restart(&job_id);
                continue;
            }
            if job.adopt_until.is_some_and(|t| t <= now) {
                self.adoption_failed(&job_id);
                continue;
            }
            if job.adopt_until.is_some() {
                continue;
            }
            if job.state != JobState::Running {
                continue;
            }
            let job = self.jobs.get_mut(&job_id).expect("listed above");
            if let Some(p) = job.checkpoints.check_timeout(now) {
                warn!(job_id, checkpoint = p.id, "checkpoint timed out");
                if p.savepoint {
                    self.savepoint_failed(&job_id, "the savepoint timed out");
                }
            }
            self.maybe_trigger(&job_id, now);
        }
    }

    /// Starts a checkpoint (or a waiting savepoint) when one is due and every task is running.
    fn maybe_trigger(&mut self, job_id: &str, now: Instant) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let savepoint = !job.savepoint_waiters.is_empty();
        if self.storage.is_none() || job.adopt_until.is_some() || job.checkpoints.pending().is_some() || !(savepoint || job.checkpoints.due(now)) {
            return;
        }
        if !job.tasks.values().all(|t| t.state == TaskState::Running) {
            return;
        }
        let tasks = job.tasks.keys().map(|t| t.to_string()).collect();
        let id = job.checkpoints.trigger(now, now_ms(), job.attempt, tasks, savepoint);
        // Used up before any task writes under it: a restart never hands it out again.
        self.record(MetaCommand::CheckpointIdsUsed { job_id: job_id.to_string(), next: id + 1 });
        let job = &self.jobs[job_id];
        let order = TriggerCheckpoint { job_id: job_id.to_string(), attempt: job.attempt, checkpoint_id: id };
        let mut sources: Vec<&str> = job
            .tasks
            .iter()
            .filter(|(t, _)| job.plan.is_source_vertex(t.vertex))
            .map(|(_, r)| r.worker_id.as_str())
            .collect();
        sources.sort();
        sources.dedup();
        tracing::debug!(job_id, checkpoint = id, savepoint, "triggering checkpoint");
        for w in sources {
            self.cluster.send(w, CoordinatorMessage { msg: Some(Order::TriggerCheckpoint(order.clone())) });
        }
    }

    fn on_checkpoint_ack(&mut self, ack: CheckpointAck) {
        let Some(job) = self.jobs.get_mut(&ack.job_id) else { return };
        let snapshot = if ack.declined.is_empty() { Ok(ack.snapshot.unwrap_or_default()) } else { Err(ack.declined) };
        match job.checkpoints.ack(ack.attempt, ack.checkpoint_id, &ack.task_id, snapshot, Instant::now()) {
            AckOutcome::Stale | AckOutcome::Waiting => {}
            AckOutcome::Aborted { cause, savepoint } => {
                warn!(job_id = %ack.job_id, checkpoint = ack.checkpoint_id, %cause, "checkpoint aborted");
                if savepoint {
                    self.savepoint_failed(&ack.job_id, &cause);
                }
            }
            AckOutcome::AllAcked(mut manifest) => {
                manifest.job_id = ack.job_id.clone();
                manifest.parallelism = job.plan.operators.iter().enumerate().map(|(i, o)| (i as u32, o.parallelism)).collect();
                manifest.operator_names = job.plan.operators.iter().enumerate().map(|(i, o)| (i as u32, o.name.clone())).collect();
                manifest.operator_kinds = job.plan.operators.iter().enumerate().map(|(i, o)| (i as u32, kind_of(o))).collect();
                let manifest = Arc::new(manifest);
                let Some(storage) = self.storage.clone() else { return };
                let events = self.internal_tx.clone();
                let job_id = ack.job_id.clone();
                tokio::spawn(async move {
                    let result = storage.put_manifest(&manifest).await;
                    let _ = events.send(Internal::ManifestStored { job_id, manifest, result });
                });
            }
        }
    }

    fn on_internal(&mut self, event: Internal) {
        match event {
            Internal::ManifestStored { job_id, manifest, result } => {
                let Some(job) = self.jobs.get_mut(&job_id) else { return };
                let now = Instant::now();
                if let Err(e) = result {
                    job.checkpoints.abort(&e, now);
                    warn!(job_id, checkpoint = manifest.checkpoint_id, error = %e, "checkpoint aborted: manifest not stored");
                    self.savepoint_failed(&job_id, &e);
                    return;
                }
                let (done, dropped) = job.checkpoints.stored(manifest.checkpoint_id, manifest.clone(), now);
                let Some(done) = done else { return };
                // This attempt restored and made progress: its failures in a row are over.
                job.failures_in_row = 0;
                info!(
                    job_id, checkpoint = done.id, savepoint = done.savepoint, duration_ms = done.view.duration_ms,
                    full_bytes = done.view.full_bytes, incremental_bytes = done.view.incremental_bytes, "checkpoint completed"
                );
                let order = CheckpointDone { job_id: job_id.clone(), attempt: job.attempt, checkpoint_id: done.id };
                let mut workers: Vec<String> = job.slots.clone();
                workers.sort();
                workers.dedup();
                let dropped_ids: Vec<u64> = dropped.iter().map(|c| c.id).collect();
                if let Some(storage) = self.storage.clone() {
                    let kept: Vec<Arc<CheckpointManifest>> = job.checkpoints.kept().iter().map(|c| c.manifest.clone()).collect();
                    let dropped = dropped_ids.clone();
                    let shared = job.shared_gc(done.id, done.view.triggered_at_ms);
                    let id = job_id.clone();
                    tokio::spawn(async move { storage.collect(&id, dropped, kept, shared).await });
                }
                // Recorded before anyone hears of it: a source that confirms this checkpoint's
                // position upstream (a replication slot) can never be restored from an older one.
                let checkpoint = checkpoint_record(&done);
                if !self.record(MetaCommand::CheckpointCompleted { job_id: job_id.clone(), checkpoint, dropped: dropped_ids }) {
                    // Not confirmed upstream until a later checkpoint is recorded.
                    if done.savepoint {
                        self.savepoint_failed(&job_id, "the coordinator could not record it");
                    }
                    return;
                }
                // Sources may now confirm positions upstream; sinks commit what they staged.
                for w in workers {
                    self.cluster.send(&w, CoordinatorMessage { msg: Some(Order::CheckpointDone(order.clone())) });
                }
                if done.savepoint {
                    self.savepoint_done(&job_id, done);
                }
            }
        }
    }

    fn savepoint_done(&mut self, job_id: &str, done: Completed) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let waiters = std::mem::take(&mut job.savepoint_waiters);
        let then = waiters.iter().map(|w| w.then).find(|t| *t != AfterSavepoint::Continue).unwrap_or(AfterSavepoint::Continue);
        match then {
            AfterSavepoint::Continue => {}
            AfterSavepoint::Cancel => {
                // Cancelled to be resumed from the savepoint: sources keep their upstream state.
                let _ = self.cancel(job_id, false);
            }
            AfterSavepoint::Rescale(n) if job.state == JobState::Running => self.rescale(job_id, n, done.manifest.clone()),
            AfterSavepoint::Rescale(_) => {
                let why = format!("savepoint {} was taken, but the job is {} now: not rescaled", done.view.savepoint_id, job.state);
                for w in waiters {
                    let _ = w.reply.send(Err(CoordinatorError::Aborted(why.clone())));
                }
                return;
            }
        }
        let attempt = self.jobs.get(job_id).map(|j| j.attempt).unwrap_or_default();
        for w in waiters {
            let _ = w.reply.send(Ok(SavepointDone { savepoint_id: done.view.savepoint_id.clone(), view: done.view.clone(), attempt }));
        }
    }

    fn savepoint_failed(&mut self, job_id: &str, cause: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        for w in job.savepoint_waiters.drain(..) {
            let _ = w.reply.send(Err(CoordinatorError::Aborted(format!("savepoint failed: {cause}; the job keeps running, try again"))));
        }
    }

    fn request_savepoint(&mut self, job_id: &str, then: AfterSavepoint, reply: oneshot::Sender<Result<SavepointDone, CoordinatorError>>) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            let _ = reply.send(Err(CoordinatorError::NoSuchJob(job_id.into())));
            return;
        };
        if self.storage.is_none() || !job.checkpoints.enabled() {
            let _ = reply.send(Err(CoordinatorError::WrongState(format!(
                "job {job_id} takes no checkpoints (its spec sets state.checkpoint_interval = \"0s\"), so it cannot take a savepoint"
            ))));
            return;
        }
        if job.state != JobState::Running {
            let _ = reply.send(Err(CoordinatorError::WrongState(format!(
                "job {job_id} is {}; savepoints are taken of running jobs",
                job.state
            ))));
            return;
        }
        if let AfterSavepoint::Rescale(n) = then {
            if let Err(e) = eddy_jobs::compile_with_parallelism(&job.spec, Some(n)) {
                let _ = reply.send(Err(CoordinatorError::Invalid(format!("cannot rescale to {n}: {e}"))));
                return;
            }
        }
        job.savepoint_waiters.push(SavepointWaiter { then, reply });
        self.maybe_trigger(job_id, Instant::now());
    }

    /// Redeploys a job with `parallelism` from `manifest` (a savepoint just taken).
    fn rescale(&mut self, job_id: &str, parallelism: u32, manifest: Arc<CheckpointManifest>) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let plan = match eddy_jobs::compile_with_parallelism(&job.spec, Some(parallelism)) {
            Ok(p) => p,
            Err(e) => {
                warn!(job_id, error = %e, "rescale refused");
                return;
            }
        };
        let old_parallelism = job.plan.slots_needed();
        self.stop_tasks(job_id, false);
        self.record(MetaCommand::Rescaled { job_id: job_id.to_string(), parallelism });
        let job = self.jobs.get_mut(job_id).expect("checked above");
        job.parallelism = Some(parallelism);
        job.plan = Arc::new(plan);
        job.initial_restore = Some(manifest);
        job.previous_workers = std::mem::take(&mut job.slots);
        job.restart_at = Some(Instant::now());
        job.stop_deadline = Some(Instant::now() + STOP_WAIT);
        self.transition(job_id, JobState::Restarting, &format!("rescaling from {old_parallelism} to {parallelism} slots"));
        self.try_restart(job_id);
    }

    /// A failure: restart from the latest checkpoint after a backoff, or fail for good.
    fn restart_or_fail(&mut self, job_id: &str, why: &str, retryable: bool) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if !retryable {
            self.fail(job_id, &format!("{why} (not retried: the error is in the spec or the data)"));
            return;
        }
        // A job that takes checkpoints is healthy again once an attempt completes one (restored
        // and made progress: see `ManifestStored`); "running" alone is reported at deploy, before
        // the restore, so a restore that always fails after a minute would restart for ever.
        if !job.checkpoints.enabled() && job.running_since.is_some_and(|t| t.elapsed() >= Duration::from_secs(60)) {
            job.failures_in_row = 0;
        }
        if job.failures_in_row >= self.config.max_restarts {
            let n = job.failures_in_row;
            self.fail(job_id, &format!("{why} (gave up after {n} restarts in a row)"));
            return;
        }
        let backoff = self.config.restart_backoff.saturating_mul(1 << job.failures_in_row.min(16)).min(self.config.max_restart_backoff);
        job.failures_in_row += 1;
        job.restarts += 1;
        job.running_since = None;
        job.adopt_until = None;
        job.restart_at = Some(Instant::now() + backoff);
        self.record(MetaCommand::Restarted { job_id: job_id.to_string() });
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if let Some(p) = job.checkpoints.abort("the job is restarting", Instant::now()) {
            if p.savepoint {
                self.savepoint_failed(job_id, "the job failed while taking it");
            }
        }
        self.stop_tasks(job_id, false);
        let job = self.jobs.get_mut(job_id).expect("checked above");
        job.previous_workers = std::mem::take(&mut job.slots);
        job.stop_deadline = Some(Instant::now() + STOP_WAIT);
        let cause = format!("{why}; restarting in {} ms", backoff.as_millis());
        self.transition(job_id, JobState::Restarting, &cause);
    }

    /// Whether every task of the job's current attempt has stopped (or its worker is gone), so
    /// that a new attempt cannot meet an old one writing to the same place.
    fn old_tasks_stopped(&self, job: &Job) -> bool {
        job.tasks.values().all(|t| matches!(t.state, TaskState::Finished | TaskState::Failed | TaskState::Cancelled))
    }

    /// Places a restarting job's tasks and deploys a new attempt from its latest checkpoint.
    fn try_restart(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else { return };
        if !self.old_tasks_stopped(job) && job.stop_deadline.is_some_and(|d| Instant::now() < d) {
            let job = self.jobs.get_mut(job_id).expect("checked above");
            job.restart_at = Some(Instant::now() + Duration::from_millis(50));
            return;
        }
        let needed = job.plan.slots_needed() as usize;
        let Some(slots) = self.place(needed) else {
            let job = self.jobs.get_mut(job_id).expect("checked above");
            let wait = self.config.restart_backoff.max(Duration::from_millis(500));
            job.restart_at = Some(Instant::now() + wait);
            let free: u32 = self.free_slots().values().sum();
            let cause = format!("waiting for slots: needs {needed}, {free} free");
            if self.jobs[job_id].cause != cause {
                let job = self.jobs.get_mut(job_id).expect("checked above");
                info!(job_id, %cause, "restart postponed");
                job.cause = cause;
            }
            return;
        };
        let attempt = job.attempt + 1;
        // Attempts come from the log: an attempt whose number is not recorded is not deployed
        // (the number is spent; the next try records another).
        let recorded = self.record(MetaCommand::AttemptStarted { job_id: job_id.to_string(), attempt });
        let job = self.jobs.get_mut(job_id).expect("checked above");
        job.attempt = attempt;
        if !recorded {
            job.restart_at = Some(Instant::now() + self.config.restart_backoff.max(Duration::from_millis(500)));
            job.cause = "cannot record the new attempt in the metadata; trying again".into();
            return;
        }
        job.restart_at = None;
        job.tasks = assign_tasks(&job.plan, &slots);
        job.slots = slots;
        let from = job.checkpoints.latest().map(|c| format!("checkpoint {}", c.id));
        info!(job_id, attempt = job.attempt, from = from.as_deref().unwrap_or("the start"), "redeploying");
        self.deploy(job_id);
    }

    /// Applies `command` to the durable metadata and makes it durable; false if it was refused
    /// (a bug: logged) or not written (logged; the log catches up on its next write).
    fn record(&mut self, command: MetaCommand) -> bool {
        self.try_record(command).is_ok()
    }

    /// [`Coordinator::record`], saying why not.
    fn try_record(&mut self, command: MetaCommand) -> Result<(), crate::meta::MetaError> {
        if let Err(e) = self.meta.apply(&command) {
            warn!(job_id = command.job_id(), error = %e, ?command, "metadata change refused");
            return Err(e);
        }
        let Some(log) = &mut self.log else { return Ok(()) };
        log.append(&command, &self.meta).inspect_err(|e| {
            warn!(error = %e, "cannot write job metadata; a coordinator restart would lose the latest changes");
        })
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Submit { spec, plan, from_savepoint, reply } => {
                let _ = reply.send(self.submit(spec, *plan, from_savepoint));
            }
            Request::ListJobs { reply } => {
                let _ = reply.send(self.jobs.iter().map(|(id, j)| summary(id, j)).collect());
            }
            Request::JobStatus { job_id, reply } => {
                let _ = reply.send(self.status(&job_id));
            }
            Request::Cancel { job_id, release, reply } => {
                let _ = reply.send(self.cancel(&job_id, release));
            }
            Request::ListWorkers { reply } => {
                let _ = reply.send(self.worker_views());
            }
            Request::Register { worker_id, slots, data_address, orders, reply } => {
                if self.cluster.live(&worker_id).is_some() {
                    self.worker_lost(&worker_id, "it registered again (restarted?)".into());
                }
                let session = self.cluster.register(worker_id, slots, data_address, orders);
                let _ = reply.send(session);
            }
            Request::Heartbeat { worker_id, session, tasks } => {
                if !self.cluster.touch(&worker_id, session) {
                    return;
                }
                // The worker's lease on its tasks: renewed while this coordinator leads.
                self.cluster.send(&worker_id, CoordinatorMessage { msg: Some(Order::Renew(eddy_proto::Renew {})) });
                for t in tasks {
                    self.task_update(&worker_id, t, true);
                }
            }
            Request::TaskUpdate { worker_id, session, update } => {
                if self.cluster.touch(&worker_id, session) {
                    self.task_update(&worker_id, update, false);
                }
            }
            Request::Disconnected { worker_id, session, cause } => {
                if self.cluster.is_current(&worker_id, session) {
                    self.worker_lost(&worker_id, cause);
                }
            }
            Request::CheckpointAck { worker_id, session, ack } => {
                if self.cluster.touch(&worker_id, session) {
                    self.on_checkpoint_ack(ack);
                }
            }
            Request::Savepoint { job_id, then, reply } => self.request_savepoint(&job_id, then, reply),
        }
    }

    fn check_heartbeats(&mut self) {
        for (id, silence) in self.cluster.silent(self.config.heartbeat_timeout) {
            self.worker_lost(&id, format!("no heartbeat for {:.1} s", silence.as_secs_f64()));
        }
    }

    fn worker_lost(&mut self, worker_id: &str, cause: String) {
        if !self.cluster.mark_lost(worker_id, &cause) {
            return;
        }
        // Its tasks are gone with it.
        for job in self.jobs.values_mut() {
            for t in job.tasks.values_mut().filter(|t| t.worker_id == worker_id) {
                if !matches!(t.state, TaskState::Finished | TaskState::Failed | TaskState::Cancelled) {
                    t.state = TaskState::Failed;
                    t.error = format!("worker lost: {cause}");
                }
            }
        }
        let affected: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.state.holds_slots() && j.slots.iter().any(|s| s == worker_id))
            .map(|(id, _)| id.clone())
            .collect();
        // A job may have failed or restarted a moment ago because its tasks lost their exchange
        // with this worker before its control stream broke: name the root cause there too.
        let now = now_ms();
        for job in self.jobs.values_mut() {
            let ran_there = job.slots.iter().chain(&job.previous_workers).any(|s| s == worker_id);
            let Some(last) = job.history.iter_mut().rev().find(|h| h.to == "failed" || h.to == "restarting") else { continue };
            if !ran_there || now - last.at_ms >= 5_000 || last.cause.contains(&format!("worker {worker_id} lost")) {
                continue;
            }
            last.cause = format!("worker {worker_id} lost: {cause} (first seen as: {})", last.cause);
            if matches!(job.state, JobState::Failed | JobState::Restarting) {
                job.cause = last.cause.clone();
            }
        }
        for job_id in affected {
            let why = format!("worker {worker_id} lost: {cause}");
            match self.jobs[&job_id].state {
                JobState::Cancelling => self.transition(&job_id, JobState::Cancelled, &format!("cancelled; {why}")),
                JobState::Restarting => {}
                _ => self.restart_or_fail(&job_id, &why, true),
            }
        }
    }

    fn submit(&mut self, spec: String, plan: Plan, from_savepoint: String) -> Result<String, CoordinatorError> {
        let initial_restore = if from_savepoint.is_empty() {
            None
        } else {
            let manifest = self.find_savepoint(&from_savepoint)?;
            let manifest = state_for_plan(&manifest, &plan)
                .map_err(|e| CoordinatorError::Invalid(format!("savepoint {from_savepoint} does not fit this spec: {e}")))?;
            Some(Arc::new(manifest))
        };
        if self.adopting() {
            return Err(CoordinatorError::Unavailable(format!(
                "the coordinator changed and is collecting the running tasks from the workers (at most {} s) before it places new ones; submit again then",
                ADOPT_WAIT.as_secs()
            )));
        }
        let needed = plan.slots_needed() as usize;
        let slots = self.place(needed).ok_or_else(|| {
            let free: u32 = self.free_slots().values().sum();
            let alive = self.cluster.alive();
            CoordinatorError::NoSlots(format!(
                "job `{}` needs {needed} slots (its largest parallelism) but the cluster has {free} free on {alive} live workers; \
                 start more workers, give them more --slots, or lower the job's parallelism",
                plan.name
            ))
        })?;
        let job_id = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let mut job = self.new_job(&job_id, spec, None, plan, Instant::now());
        job.tasks = assign_tasks(&job.plan, &slots);
        job.slots = slots;
        job.initial_restore = initial_restore;
        job.from_savepoint = (!from_savepoint.is_empty()).then_some(from_savepoint);
        if let Err(e) = self.try_record(MetaCommand::Submitted { job: job_record(&job_id, &job) }) {
            // Not started: the metadata holds no job that does not run.
            self.meta.jobs.remove(&job_id);
            return Err(CoordinatorError::Unavailable(format!(
                "the job was not started here: its metadata could not be written ({e}); if that says the change may still take effect, check `eddy jobs` before submitting it again"
            )));
        }
        info!(job_id, name = %job.name, tasks = job.tasks.len(), slots = needed, "job created");
        self.jobs.insert(job_id.clone(), job);
        self.deploy(&job_id);
        Ok(job_id)
    }

    /// The slots the jobs hold, one entry per slot.
    fn held_slots(&self) -> impl Iterator<Item = &String> {
        self.jobs.values().filter(|j| j.state.holds_slots()).flat_map(|j| &j.slots)
    }

    fn free_slots(&self) -> BTreeMap<String, u32> {
        self.cluster.free_slots(self.held_slots())
    }

    /// Slots for a job, or none: also none while a job's running tasks are being collected
    /// (adopted), since the slots they hold are not known yet.
    fn place(&self, needed: usize) -> Option<Vec<String>> {
        if self.adopting() {
            return None;
        }
        self.cluster.place(needed, self.held_slots())
    }

    fn adopting(&self) -> bool {
        self.jobs.values().any(|j| j.adopt_until.is_some())
    }

    /// The manifest of a savepoint, by the id `eddy savepoint` printed.
    fn find_savepoint(&self, id: &str) -> Result<Arc<CheckpointManifest>, CoordinatorError> {
        self.jobs
            .values()
            .flat_map(|j| j.checkpoints.kept())
            .find(|c| c.savepoint && c.view.savepoint_id == id)
            .map(|c| c.manifest.clone())
            .ok_or_else(|| CoordinatorError::NoSuchSavepoint(id.into()))
    }

    fn deploy(&mut self, job_id: &str) {
        let root = self.storage.as_ref().map(|s| s.root().to_string()).unwrap_or_default();
        let job = self.jobs.get_mut(job_id).expect("deploy of a known job");
        job.checkpoints.restart_interval(Instant::now());
        let restore = job.checkpoints.latest().map(|c| c.manifest.clone()).or_else(|| job.initial_restore.clone());
        let job = &self.jobs[job_id];
        let placement: HashMap<String, String> = job
            .tasks
            .iter()
            .map(|(t, r)| (t.to_string(), self.cluster.get(&r.worker_id).map(|w| w.data_address.clone()).unwrap_or_default()))
            .collect();
        let mut per_worker: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (t, r) in &job.tasks {
            per_worker.entry(r.worker_id.as_str()).or_default().push(t.to_string());
        }
        let mut failed = None;
        for (worker_id, task_ids) in per_worker {
            let order = CoordinatorMessage {
                msg: Some(Order::Deploy(DeployTasks {
                    job_id: job_id.to_string(),
                    attempt: job.attempt,
                    spec: job.spec.clone(),
                    placement: placement.clone(),
                    task_ids,
                    checkpoint_storage: root.clone(),
                    restore: restore.as_deref().cloned(),
                    parallelism: job.parallelism.unwrap_or(0),
                })),
            };
            if !self.cluster.send(worker_id, order) {
                failed = Some(format!("could not reach worker {worker_id} to deploy tasks"));
            }
        }
        let tasks = self.jobs[job_id].tasks.len();
        self.transition(job_id, JobState::Scheduling, &format!("deploying {tasks} tasks"));
        if let Some(why) = failed {
            self.restart_or_fail(job_id, &why, true);
        }
    }

    fn task_update(&mut self, worker_id: &str, u: TaskUpdate, heartbeat: bool) {
        let Ok(task) = u.task_id.parse::<TaskId>() else { return };
        // A task running for no job, an older attempt or an ended job (one a coordinator before
        // this one left behind) is stopped.
        let stale = match self.jobs.get(&u.job_id) {
            None => true,
            Some(job) => {
                // Restarting, the current attempt's tasks are being replaced (their worker was
                // declared lost and came back with them running).
                let replaced = job.state == JobState::Restarting && u.attempt == job.attempt;
                u.attempt < job.attempt || replaced || job.state.is_terminal() || job.state == JobState::Cancelling
            }
        };
        if heartbeat && stale {
            let order = CancelJob { job_id: u.job_id.clone(), attempt: u.attempt, release: false };
            self.cluster.send(worker_id, CoordinatorMessage { msg: Some(Order::Cancel(order)) });
        }
        let Some(job) = self.jobs.get_mut(&u.job_id) else { return };
        // Fencing: reports from another attempt, or from a worker the task is not placed on, are stale.
        if u.attempt != job.attempt {
            return;
        }
        if job.adopt_until.is_some() {
            self.adopt(worker_id, &u, task);
            return;
        }
        let Some(record) = job.tasks.get_mut(&task).filter(|r| r.worker_id == worker_id) else { return };
        if let Some(m) = u.metrics {
            record.metrics = m;
        }
        let mut state = TaskState::try_from(u.state).unwrap_or(TaskState::Unspecified);
        // While cancelling, tasks fail as their peers vanish: that is the cancel, not a failure.
        if job.state == JobState::Cancelling && state == TaskState::Failed {
            state = TaskState::Cancelled;
        }
        // A heartbeat says "still running"; it must not undo a final state reported before it.
        let final_state = matches!(record.state, TaskState::Finished | TaskState::Failed | TaskState::Cancelled);
        if heartbeat && final_state {
            return;
        }
        record.state = state;
        if !u.error.is_empty() {
            record.error = u.error.clone();
        }
        let job_id = u.job_id.clone();
        let all = |s: &[TaskState]| job.tasks.values().all(|r| s.contains(&r.state));
        match (job.state, state) {
            (JobState::Scheduling | JobState::Running, TaskState::Failed) => {
                let why = format!("task {task} failed on worker {worker_id}: {}", u.error);
                self.restart_or_fail(&job_id, &why, u.retryable);
            }
            (_, TaskState::Failed) if !job.state.is_terminal() && job.state != JobState::Restarting => {
                let why = format!("task {task} failed on worker {worker_id}: {}", u.error);
                self.fail(&job_id, &why);
            }
            (JobState::Scheduling, TaskState::Running) if all(&[TaskState::Running, TaskState::Finished]) => {
                let n = job.tasks.len();
                self.transition(&job_id, JobState::Running, &format!("all {n} tasks running"));
            }
            (JobState::Scheduling | JobState::Running, TaskState::Finished) if all(&[TaskState::Finished]) => {
                self.transition(&job_id, JobState::Finished, "every task reached the end of its input");
            }
            (JobState::Cancelling, _) if all(&[TaskState::Cancelled, TaskState::Finished, TaskState::Failed]) => {
                self.transition(&job_id, JobState::Cancelled, "all tasks stopped");
            }
            _ => {}
        }
    }

    /// Takes a report of a task of the attempt being adopted; once every task of the attempt is
    /// reported running, the job is adopted: it runs on, same attempt, no restart.
    fn adopt(&mut self, worker_id: &str, u: &TaskUpdate, task: TaskId) {
        let Some(job) = self.jobs.get_mut(&u.job_id) else { return };
        let state = TaskState::try_from(u.state).unwrap_or(TaskState::Unspecified);
        if !job.plan.tasks().contains(&task) {
            // Another shape of the job (a rescale the change interrupted): not this attempt's.
            let why = format!("worker {worker_id} runs task {task}, which the job's plan does not have");
            self.adoption_failed_because(&u.job_id, &why, true);
            return;
        }
        let record = job.tasks.entry(task).or_insert_with(|| TaskRecord {
            worker_id: worker_id.to_string(),
            state,
            metrics: TaskMetrics { watermark_ms: i64::MIN, ..Default::default() },
            error: String::new(),
        });
        record.worker_id = worker_id.to_string();
        record.state = state;
        record.error = u.error.clone();
        if let Some(m) = &u.metrics {
            record.metrics = m.clone();
        }
        let job_id = u.job_id.clone();
        if state == TaskState::Failed {
            let why = format!("task {task} failed on worker {worker_id} while the coordinator changed: {}", u.error);
            self.adoption_failed_because(&job_id, &why, u.retryable);
            return;
        }
        let job = &self.jobs[&job_id];
        let expected = job.plan.tasks();
        let reported = job.tasks.values().filter(|t| matches!(t.state, TaskState::Running | TaskState::Finished)).count();
        if reported < expected.len() {
            return;
        }
        // Slot `i` is the worker running subtask `i` of every vertex; a placement that does not
        // fit that shape is not one this coordinator can carry on.
        let mut slots = vec![String::new(); job.plan.slots_needed() as usize];
        for (t, r) in &job.tasks {
            let slot = &mut slots[t.subtask as usize];
            if slot.is_empty() {
                *slot = r.worker_id.clone();
            } else if *slot != r.worker_id {
                self.adoption_failed_because(&job_id, "the reported tasks do not fit one placement", true);
                return;
            }
        }
        let job = self.jobs.get_mut(&job_id).expect("checked above");
        job.slots = slots;
        job.adopt_until = None;
        let (n, attempt) = (job.tasks.len(), job.attempt);
        let cause = format!("adopted the {n} running tasks of attempt {attempt} after the coordinator changed");
        info!(job_id, attempt, tasks = n, "job adopted");
        let all_finished = job.tasks.values().all(|t| t.state == TaskState::Finished);
        if job.state == JobState::Scheduling {
            self.transition(&job_id, JobState::Running, &cause);
        } else {
            job.cause = cause.clone();
            self.record(MetaCommand::StateChanged { job_id: job_id.clone(), to: JobState::Running, cause });
        }
        // Every task reached its end while the coordinator changed.
        if all_finished {
            self.transition(&job_id, JobState::Finished, "every task reached the end of its input");
        }
    }

    /// Not every task of the attempt was reported in time: restart the job from its checkpoint.
    fn adoption_failed(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let why = format!(
            "the coordinator changed and {} of the attempt's {} tasks were reported running within {} s",
            job.tasks.values().filter(|t| t.state == TaskState::Running).count(),
            job.plan.tasks().len(),
            ADOPT_WAIT.as_secs()
        );
        self.adoption_failed_because(job_id, &why, true);
    }

    fn adoption_failed_because(&mut self, job_id: &str, why: &str, retryable: bool) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        job.adopt_until = None;
        // The workers that reported tasks are told to stop them.
        let mut workers: Vec<String> = job.tasks.values().map(|t| t.worker_id.clone()).collect();
        workers.sort();
        workers.dedup();
        job.slots = workers;
        warn!(job_id, why, "not adopting the job's tasks");
        self.restart_or_fail(job_id, why, retryable);
    }

    fn fail(&mut self, job_id: &str, why: &str) {
        self.stop_tasks(job_id, false);
        self.transition(job_id, JobState::Failed, why);
    }

    /// Tells every live worker running the job to stop its tasks; with `release`, the job ends
    /// for good and its sources release what they hold upstream.
    fn stop_tasks(&mut self, job_id: &str, release: bool) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let order = CancelJob { job_id: job_id.to_string(), attempt: job.attempt, release };
        let mut workers: Vec<&String> = job.slots.iter().collect();
        workers.dedup();
        for w in workers {
            self.cluster.send(w, CoordinatorMessage { msg: Some(Order::Cancel(order.clone())) });
        }
    }

    fn cancel(&mut self, job_id: &str, release: bool) -> Result<CancelResponse, CoordinatorError> {
        let job = self.jobs.get(job_id).ok_or_else(|| CoordinatorError::NoSuchJob(job_id.into()))?;
        let state = job.state;
        if state.is_terminal() {
            return Err(CoordinatorError::WrongState(format!("job {job_id} is already {state}; nothing to cancel")));
        }
        if job.adopt_until.is_some() {
            return Err(CoordinatorError::WrongState(format!(
                "the coordinator changed and is collecting job {job_id}'s running tasks from the workers (at most {} s); cancel it again then",
                ADOPT_WAIT.as_secs()
            )));
        }
        // A replication slot is dropped by the task reading it; with none running (between two
        // attempts, or on a worker lost) it stays, holding WAL on the server: say so, and how.
        let unreachable = state == JobState::Restarting || job.slots.iter().any(|w| self.cluster.live(w).is_none());
        let warning = if release && unreachable { slots_left_behind(&job.plan) } else { String::new() };
        if !warning.is_empty() {
            warn!(job_id, "{warning}");
        }
        if state == JobState::Restarting {
            // Nothing runs between two attempts.
            self.transition(job_id, JobState::Cancelling, "cancel requested");
            self.transition(job_id, JobState::Cancelled, "cancelled while restarting");
        } else if state != JobState::Cancelling {
            self.stop_tasks(job_id, release);
            self.transition(job_id, JobState::Cancelling, "cancel requested");
            let job = &self.jobs[job_id];
            let all_stopped = job.tasks.values().all(|r| matches!(r.state, TaskState::Cancelled | TaskState::Finished | TaskState::Failed));
            if all_stopped {
                self.transition(job_id, JobState::Cancelled, "all tasks stopped");
            }
        }
        Ok(CancelResponse { state: self.jobs[job_id].state.to_string(), warning })
    }

    fn transition(&mut self, job_id: &str, to: JobState, cause: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let from = job.state;
        if from == to {
            return;
        }
        if !from.can_become(to) {
            warn!(job_id, %from, %to, cause, "ignored impossible job state change");
            return;
        }
        let now = now_ms();
        info!(job_id, attempt = job.attempt, %from, %to, cause, "job state changed");
        job.state = to;
        job.cause = cause.to_string();
        job.state_changed_at_ms = now;
        if to == JobState::Running {
            job.running_since_ms = now;
            job.running_since = Some(Instant::now());
        }
        if to.is_terminal() {
            job.finished_at_ms = now;
            job.restart_at = None;
            job.checkpoints.abort(&format!("the job is {to}"), Instant::now());
            for w in job.savepoint_waiters.drain(..) {
                let _ = w.reply.send(Err(CoordinatorError::Aborted(format!("the job became {to} before the savepoint completed: {cause}"))));
            }
            // A cancelled or finished job is never restored again: its checkpoints' files go, its
            // savepoints' stay. A failed job keeps them, as evidence.
            if matches!(to, JobState::Cancelled | JobState::Finished) {
                job.release_checkpoints(job_id, self.storage.clone(), now);
            }
        }
        job.history.push(Transition { at_ms: now, from: from.to_string(), to: to.to_string(), cause: cause.to_string() });
        // The first entry (the submission) and the latest ones are kept.
        if job.history.len() > HISTORY_KEPT {
            let extra = job.history.len() - HISTORY_KEPT;
            job.history.drain(1..=extra);
        }
        self.record(MetaCommand::StateChanged { job_id: job_id.to_string(), to, cause: cause.to_string() });
        if to.is_terminal() {
            self.forget_old_finished_jobs();
        }
    }

    /// Keeps the [`FINISHED_JOBS_KEPT`] jobs that ended last; older ended jobs are forgotten.
    fn forget_old_finished_jobs(&mut self) {
        let ended = self.jobs.iter().filter(|(_, j)| j.state.is_terminal()).map(|(id, j)| (j.finished_at_ms, id.clone()));
        for id in older_than_the_latest(ended.collect(), FINISHED_JOBS_KEPT) {
            info!(job_id = %id, "forgetting an old finished job");
            self.jobs.remove(&id);
            self.record(MetaCommand::Forgotten { job_id: id });
        }
    }

    fn status(&self, job_id: &str) -> Result<JobStatusResponse, CoordinatorError> {
        let job = self.jobs.get(job_id).ok_or_else(|| CoordinatorError::NoSuchJob(job_id.into()))?;
        let tasks = job
            .tasks
            .iter()
            .map(|(t, r)| TaskView {
                task_id: t.to_string(),
                operators: job.plan.vertex_label(t.vertex),
                subtask: t.subtask,
                parallelism: job.plan.vertices[t.vertex].parallelism,
                worker_id: r.worker_id.clone(),
                state: task_state_name(r.state).to_string(),
                metrics: Some(r.metrics.clone()),
                error: r.error.clone(),
            })
            .collect();
        Ok(JobStatusResponse {
            job: Some(summary(job_id, job)),
            tasks,
            history: job.history.clone(),
            running_since_ms: job.running_since_ms,
            finished_at_ms: job.finished_at_ms,
            checkpoints: job.checkpoints.views(),
            restarts: job.restarts,
        })
    }

    fn worker_views(&self) -> Vec<WorkerView> {
        self.cluster.views(self.held_slots())
    }
}

/// Tasks of `plan` placed on `slots` (subtask `i` of every vertex on slot `i`), not yet deployed.
fn assign_tasks(plan: &Plan, slots: &[String]) -> BTreeMap<TaskId, TaskRecord> {
    plan.tasks()
        .into_iter()
        .map(|t| {
            let record = TaskRecord {
                worker_id: slots[t.subtask as usize].clone(),
                state: TaskState::Deploying,
                metrics: TaskMetrics { watermark_ms: i64::MIN, ..Default::default() },
                error: String::new(),
            };
            (t, record)
        })
        .collect()
}

/// A job's durable part, as recorded when it is submitted.
fn job_record(job_id: &str, j: &Job) -> JobRecord {
    JobRecord {
        job_id: job_id.to_string(),
        spec: j.spec.clone(),
        parallelism: j.parallelism,
        attempt: j.attempt,
        state: j.state,
        cause: j.cause.clone(),
        submitted_at_ms: j.submitted_at_ms,
        next_checkpoint_id: j.checkpoints.next_id(),
        restarts: j.restarts,
        from_savepoint: j.from_savepoint.clone(),
        checkpoints: j.checkpoints.kept().iter().map(checkpoint_record).chain(j.unreadable.iter().cloned()).collect(),
    }
}

fn checkpoint_record(c: &Completed) -> CheckpointRecord {
    CheckpointRecord {
        id: c.id,
        savepoint: c.savepoint,
        triggered_at_ms: c.view.triggered_at_ms,
        duration_ms: c.view.duration_ms,
        full_bytes: c.view.full_bytes,
        incremental_bytes: c.view.incremental_bytes,
    }
}

fn record_view(job_id: &str, c: &CheckpointRecord) -> CheckpointView {
    CheckpointView {
        checkpoint_id: c.id,
        kind: if c.savepoint { "savepoint" } else { "checkpoint" }.into(),
        state: "completed".into(),
        triggered_at_ms: c.triggered_at_ms,
        duration_ms: c.duration_ms,
        full_bytes: c.full_bytes,
        incremental_bytes: c.incremental_bytes,
        cause: String::new(),
        savepoint_id: if c.savepoint { savepoint_id(job_id, c.id) } else { String::new() },
    }
}

fn summary(id: &str, j: &Job) -> JobSummary {
    JobSummary {
        job_id: id.to_string(),
        name: j.name.clone(),
        state: j.state.to_string(),
        attempt: j.attempt,
        submitted_at_ms: j.submitted_at_ms,
        state_changed_at_ms: j.state_changed_at_ms,
        cause: j.cause.clone(),
        tasks: j.tasks.len() as u32,
    }
}

/// The name shown for a task state.
pub fn task_state_name(s: TaskState) -> &'static str {
    match s {
        TaskState::Unspecified => "unknown",
        TaskState::Deploying => "deploying",
        TaskState::Running => "running",
        TaskState::Finished => "finished",
        TaskState::Failed => "failed",
        TaskState::Cancelled => "cancelled",
    }
}

/// What an operator is, as recorded in manifests: a savepoint's state only goes to a stage of the
/// same name and kind.
fn kind_of(o: &eddy_jobs::plan::Operator) -> String {
    use eddy_jobs::plan::OperatorKind as K;
    match &o.kind {
        K::Source { connector, .. } => format!("source:{}", connector.name()),
        K::Sink { connector } => format!("sink:{}", connector.name()),
        K::Transform { .. } => "transform".into(),
        K::Window(_) => "window".into(),
        K::Lookup { .. } => "lookup".into(),
    }
}

/// A savepoint's state addressed to `plan`'s operators, matched by stage name (a stable id, as
/// Flink's operator uid): a spec edited since (a stage added, removed or reordered) still gets
/// each stage's own state. A stage whose state has no stage of the same name and kind to go to is
/// refused, naming it; a new stage starts empty. Savepoints taken before names were recorded
/// match by position.
fn state_for_plan(manifest: &CheckpointManifest, plan: &Plan) -> Result<CheckpointManifest, String> {
    if manifest.operator_names.is_empty() {
        if manifest.parallelism.keys().any(|o| *o as usize >= plan.operators.len()) {
            return Err("it was taken of a job with other stages; submit the spec it was taken from".into());
        }
        return Ok(manifest.clone());
    }
    let holds_state = |op: u32| manifest.tasks.values().any(|t| t.operators.iter().any(|s| s.operator == op));
    let mut to_new = HashMap::new();
    for (old, name) in &manifest.operator_names {
        let kind = manifest.operator_kinds.get(old).cloned().unwrap_or_default();
        match plan.operators.iter().position(|o| &o.name == name) {
            Some(new) if kind.is_empty() || kind_of(&plan.operators[new]) == kind => {
                to_new.insert(*old, new as u32);
            }
            Some(new) if holds_state(*old) => {
                return Err(format!(
                    "stage `{name}` was a {kind} when the savepoint was taken and is a {} now; give the new stage another name",
                    kind_of(&plan.operators[new])
                ));
            }
            None if holds_state(*old) => {
                return Err(format!(
                    "it holds state of stage `{name}` ({kind}), which the spec no longer has; keep a stage of that name, or submit without the savepoint"
                ));
            }
            _ => {}
        }
    }
    let mut out = manifest.clone();
    out.parallelism = manifest.parallelism.iter().filter_map(|(old, p)| Some((*to_new.get(old)?, *p))).collect();
    out.operator_names = manifest.operator_names.iter().filter_map(|(old, n)| Some((*to_new.get(old)?, n.clone()))).collect();
    out.operator_kinds = manifest.operator_kinds.iter().filter_map(|(old, k)| Some((*to_new.get(old)?, k.clone()))).collect();
    for task in out.tasks.values_mut() {
        task.operators.retain_mut(|s| match to_new.get(&s.operator) {
            Some(new) => {
                s.operator = *new;
                true
            }
            None => false,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Status;

    const SPEC: &str = r#"
name = "t"
[[source]]
name = "events"
connector = "generator"
options = { keys = 10 }
event_time = { column = "ts" }
[[window]]
name = "w"
input = "events"
kind = "tumble"
size = "1s"
key = ["k"]
aggregates = "COUNT(*) AS n"
parallelism = 4
[[sink]]
name = "out"
input = "w"
connector = "discard"
"#;

    #[test]
    fn savepoint_state_follows_stage_names_across_spec_edits() {
        let before = eddy_jobs::compile(SPEC).unwrap();
        // A transform inserted before the window moves the window to another index.
        let edited = SPEC.replace(
            "[[window]]\nname = \"w\"\ninput = \"events\"",
            "[[transform]]\nname = \"kept\"\ninput = \"events\"\nwhere = \"k > 0\"\n[[window]]\nname = \"w\"\ninput = \"kept\"",
        );
        let after = eddy_jobs::compile(&edited).unwrap();
        let index = |plan: &Plan, name: &str| plan.operators.iter().position(|o| o.name == name).unwrap() as u32;
        assert_ne!(index(&before, "w"), index(&after, "w"), "the edit must move the window");
        let snapshot = |op: u32| eddy_proto::OperatorSnapshot { operator: op, inline: vec![op as u8], ..Default::default() };
        let manifest = CheckpointManifest {
            job_id: "j".into(),
            checkpoint_id: 1,
            parallelism: before.operators.iter().enumerate().map(|(i, o)| (i as u32, o.parallelism)).collect(),
            tasks: [
                ("0.0".to_string(), eddy_proto::TaskSnapshot { operators: vec![snapshot(index(&before, "events"))], ..Default::default() }),
                ("1.0".to_string(), eddy_proto::TaskSnapshot { operators: vec![snapshot(index(&before, "w"))], ..Default::default() }),
            ]
            .into_iter()
            .collect(),
            operator_names: before.operators.iter().enumerate().map(|(i, o)| (i as u32, o.name.clone())).collect(),
            operator_kinds: before.operators.iter().enumerate().map(|(i, o)| (i as u32, kind_of(o))).collect(),
        };
        let moved = state_for_plan(&manifest, &after).unwrap();
        let window_state = &moved.tasks["1.0"].operators[0];
        assert_eq!(window_state.operator, index(&after, "w"));
        assert_eq!(window_state.inline, vec![index(&before, "w") as u8], "the window's own state");
        assert_eq!(moved.parallelism.get(&index(&after, "w")), Some(&4));
        // A spec without the window cannot take its state; the error names the stage.
        let without = "name = \"t\"\n[[source]]\nname = \"events\"\nconnector = \"generator\"\noptions = { keys = 10 }\n[[sink]]\nname = \"out\"\ninput = \"events\"\nconnector = \"discard\"\n";
        let e = state_for_plan(&manifest, &eddy_jobs::compile(without).unwrap()).unwrap_err();
        assert!(e.contains("`w`") && e.contains("window"), "{e}");
    }

    struct Harness {
        coordinator: Coordinator,
        /// Requests queued for the loop (as the API would send them).
        requests: mpsc::Sender<Request>,
        orders: HashMap<String, mpsc::Receiver<Result<CoordinatorMessage, Status>>>,
        sessions: HashMap<String, u64>,
    }

    /// Every test ends by checking that the durable metadata holds what the jobs do: a change
    /// made without its command would be lost to a coordinator restart (or a new leader).
    impl Drop for Harness {
        fn drop(&mut self) {
            if !std::thread::panicking() {
                self.coordinator.check_meta();
            }
        }
    }

    impl Coordinator {
        fn check_meta(&self) {
            assert!(self.jobs.keys().eq(self.meta.jobs.keys()), "jobs and the metadata's differ");
            for (id, job) in &self.jobs {
                let held = &self.meta.jobs[id];
                let mut want = job_record(id, job);
                // Why a restart waits is no durable fact.
                want.cause = held.cause.clone();
                let mut held = held.clone();
                for r in [&mut want, &mut held] {
                    r.checkpoints.sort_by_key(|c| c.id);
                }
                assert_eq!(want, held, "job {id} and its metadata");
            }
        }
    }

    impl Harness {
        fn new() -> Harness {
            let (requests, rx) = mpsc::channel(16);
            let config = CoordinatorConfig { heartbeat_timeout: Duration::from_secs(2), ..CoordinatorConfig::default() };
            Harness { coordinator: Coordinator::new(config, rx), requests, orders: HashMap::new(), sessions: HashMap::new() }
        }

        fn register(&mut self, id: &str, slots: u32) {
            let (orders, rx) = mpsc::channel(64);
            let (reply, mut session) = oneshot::channel();
            self.coordinator.handle(Request::Register {
                worker_id: id.into(),
                slots,
                data_address: format!("{id}:1"),
                orders,
                reply,
            });
            self.sessions.insert(id.into(), session.try_recv().unwrap());
            self.orders.insert(id.into(), rx);
        }

        fn submit(&mut self, spec: &str) -> Result<String, Status> {
            let (reply, mut rx) = oneshot::channel();
            let plan = match eddy_jobs::compile(spec) {
                Ok(plan) => Box::new(plan),
                Err(e) => return Err(Status::invalid_argument(format!("invalid job spec: {e}"))),
            };
            self.coordinator.handle(Request::Submit { spec: spec.into(), plan, from_savepoint: String::new(), reply });
            rx.try_recv().unwrap().map_err(Status::from)
        }

        fn deployed(&mut self, worker: &str) -> Vec<DeployTasks> {
            let mut out = Vec::new();
            while let Ok(Ok(CoordinatorMessage { msg: Some(Order::Deploy(d)) })) = self.orders.get_mut(worker).unwrap().try_recv() {
                out.push(d);
            }
            out
        }

        fn report(&mut self, worker: &str, job: &str, attempt: u64, task: &str, state: TaskState) {
            let session = self.sessions[worker];
            let update = TaskUpdate { job_id: job.into(), attempt, task_id: task.into(), state: state as i32, ..Default::default() };
            self.coordinator.handle(Request::TaskUpdate { worker_id: worker.into(), session, update });
        }

        /// `seconds` pass, `worker` heartbeating and the timer ticking every second.
        async fn live_for(&mut self, worker: &str, seconds: u64) {
            let session = self.sessions[worker];
            for _ in 0..seconds {
                tokio::time::advance(Duration::from_secs(1)).await;
                self.coordinator.handle(Request::Heartbeat { worker_id: worker.into(), session, tasks: vec![] });
                self.coordinator.on_timer();
            }
        }

        fn state(&self, job: &str) -> JobState {
            self.coordinator.check_meta();
            self.coordinator.jobs[job].state
        }
    }

    #[test]
    fn spreads_tasks_over_workers_and_runs_once_all_report() {
        let mut h = Harness::new();
        h.register("a", 4);
        h.register("b", 4);
        let job = h.submit(SPEC).unwrap();
        let (a, b) = (h.deployed("a"), h.deployed("b"));
        assert_eq!((a.len(), b.len()), (1, 1));
        // The source and the window+sink chain (parallelism 4): subtasks 0 and 2 on a, 1 and 3 on b.
        assert_eq!(a[0].task_ids, ["0.0", "1.0", "1.2"]);
        assert_eq!(b[0].task_ids, ["1.1", "1.3"]);
        assert_eq!(h.state(&job), JobState::Scheduling);
        for (w, d) in [("a", &a[0]), ("b", &b[0])] {
            for t in d.task_ids.clone() {
                h.report(w, &job, 1, &t, TaskState::Running);
            }
        }
        assert_eq!(h.state(&job), JobState::Running);
    }

    /// A cancel stored just before the coordinator died is not undone by the restart.
    #[tokio::test]
    async fn a_cancel_in_progress_survives_a_coordinator_restart() {
        let dir = std::env::temp_dir().join(format!("eddy-cancel-restart-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        // Stored: "c" while its cancel was in progress, "r" running.
        let (mut log, mut state) = crate::meta::LocalLog::open(&dir.join("meta")).unwrap();
        for (id, states) in [("c", &[JobState::Scheduling, JobState::Running, JobState::Cancelling][..]), ("r", &[JobState::Scheduling, JobState::Running])] {
            let job = JobRecord {
                job_id: id.into(),
                spec: SPEC.into(),
                parallelism: None,
                attempt: 1,
                state: JobState::Created,
                cause: "submitted".into(),
                submitted_at_ms: 0,
                next_checkpoint_id: 1,
                restarts: 0,
                checkpoints: Vec::new(),
                from_savepoint: None,
            };
            let commands = std::iter::once(MetaCommand::Submitted { job })
                .chain(states.iter().map(|&to| MetaCommand::StateChanged { job_id: id.into(), to, cause: to.to_string() }));
            for c in commands {
                state.apply(&c).unwrap();
                log.append(&c, &state).unwrap();
            }
        }
        let storage = CheckpointStore::open(&dir.join("checkpoints")).unwrap();
        let (_tx, rx) = mpsc::channel(1);
        let coordinator = Coordinator::new(CoordinatorConfig::default(), rx).with_stores(Box::new(log), state, storage).await.unwrap();
        assert_eq!(coordinator.jobs["c"].state, JobState::Cancelled);
        assert_eq!(coordinator.jobs["r"].state, JobState::Running, "deployed: its tasks are adopted, or it restarts");
        assert!(coordinator.jobs["r"].adopt_until.is_some());
        coordinator.check_meta();
        drop(coordinator);
        // What the restart concluded is on disk: a second restart reads it back.
        let (_, state) = crate::meta::LocalLog::open(&dir.join("meta")).unwrap();
        // Per job: its new state, and the checkpoint id skipped.
        assert_eq!(state.applied, 11);
        assert_eq!(state.jobs["r"].next_checkpoint_id, 2);
        assert_eq!(state.jobs["c"].state, JobState::Cancelled);
        assert_eq!(state.jobs["r"].state, JobState::Running);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A coordinator that takes over (restarted, or newly leading) adopts a job whose tasks the
    /// workers report running: same attempt, nothing deployed, no restart, checkpoints go on. A
    /// job with a task nobody reports within the workers' lease restarts from its checkpoint, and
    /// tasks of an attempt or job it does not run are stopped.
    #[tokio::test(start_paused = true)]
    async fn a_new_coordinator_adopts_running_tasks_or_restarts_the_job() {
        let mut before = Harness::new();
        before.register("a", 4);
        before.register("b", 4);
        let adopted = before.submit(SPEC).unwrap();
        let restarted = before.submit(SPEC).unwrap();
        let placed: HashMap<String, Vec<DeployTasks>> = ["a", "b"].iter().map(|w| (w.to_string(), before.deployed(w))).collect();
        let meta = before.coordinator.meta.clone();
        drop(before);

        let dir = std::env::temp_dir().join(format!("eddy-adopt-{}", std::process::id()));
        let storage = CheckpointStore::open(&dir).unwrap();
        let log = Box::new(FlakyLog(Arc::new(std::sync::atomic::AtomicBool::new(false))));
        let mut h = Harness::new();
        let (_tx, rx) = mpsc::channel(1);
        let config = CoordinatorConfig { heartbeat_timeout: Duration::from_secs(2), ..CoordinatorConfig::default() };
        h.coordinator = Coordinator::new(config, rx).with_stores(log, meta, storage).await.unwrap();
        h.register("a", 4);
        h.register("b", 4);
        let running = |w: &str, skip: Option<&str>| -> Vec<TaskUpdate> {
            let mut tasks: Vec<TaskUpdate> = placed[w]
                .iter()
                .flat_map(|d| d.task_ids.iter().map(|t| (d.job_id.clone(), d.attempt, t.clone())))
                .filter(|(job, _, t)| !(job == &restarted && Some(t.as_str()) == skip))
                .map(|(job_id, attempt, task_id)| TaskUpdate { job_id, attempt, task_id, state: TaskState::Running as i32, ..Default::default() })
                .collect();
            // A task of an older attempt of the adopted job, and one of a job nobody runs now.
            tasks.push(TaskUpdate { job_id: adopted.clone(), attempt: 0, task_id: "0.0".into(), state: TaskState::Running as i32, ..Default::default() });
            tasks.push(TaskUpdate { job_id: "gone".into(), attempt: 3, task_id: "0.0".into(), state: TaskState::Running as i32, ..Default::default() });
            tasks
        };
        let skipped = placed["b"].iter().find(|d| d.job_id == restarted).unwrap().task_ids[0].clone();
        // The slots the running tasks hold are not known yet: nothing new is placed.
        let e = h.submit(SPEC).unwrap_err();
        assert!(e.message().contains("collecting the running tasks"), "{e:?}");
        for _ in 0..(ADOPT_WAIT.as_secs() + 2) {
            for w in ["a", "b"] {
                let session = h.sessions[w];
                let tasks = running(w, (w == "b").then_some(skipped.as_str()));
                h.coordinator.handle(Request::Heartbeat { worker_id: w.into(), session, tasks });
            }
            h.coordinator.on_timer();
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(h.state(&adopted), JobState::Running);
        let job = &h.coordinator.jobs[&adopted];
        assert_eq!((job.attempt, job.restarts), (1, 0), "adopted, not restarted: {}", job.cause);
        assert!(job.cause.contains("adopted"), "{}", job.cause);
        assert_eq!(job.slots.len(), 4);
        let restarted_job = &h.coordinator.jobs[&restarted];
        assert_eq!(restarted_job.restarts, 1, "a task was missing: the job restarts ({})", restarted_job.cause);
        // What the workers were told: renewals, stops for what nobody runs, and a new attempt only
        // of the job that was not adopted.
        let mut orders = Vec::new();
        for w in ["a", "b"] {
            while let Ok(Ok(CoordinatorMessage { msg: Some(o) })) = h.orders.get_mut(w).unwrap().try_recv() {
                orders.push(o);
            }
        }
        assert!(orders.iter().any(|o| matches!(o, Order::Renew(_))));
        let cancels: Vec<(String, u64)> =
            orders.iter().filter_map(|o| if let Order::Cancel(c) = o { Some((c.job_id.clone(), c.attempt)) } else { None }).collect();
        assert!(cancels.contains(&(adopted.clone(), 0)) && cancels.contains(&("gone".to_string(), 3)), "{cancels:?}");
        assert!(!cancels.contains(&(adopted.clone(), 1)), "the adopted attempt is not stopped");
        assert!(orders.iter().all(|o| !matches!(o, Order::Deploy(d) if d.job_id == adopted)), "nothing of the adopted job is deployed again");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refuses_a_job_that_does_not_fit() {
        let mut h = Harness::new();
        h.register("a", 3);
        let e = h.submit(SPEC).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(e.message().contains("needs 4 slots"), "{}", e.message());
        assert!(h.coordinator.jobs.is_empty());
        let e = h.submit("name = 1").unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
    }

    #[test]
    fn ignores_reports_from_other_attempts_and_workers() {
        let mut h = Harness::new();
        h.register("a", 4);
        let job = h.submit(SPEC).unwrap();
        h.report("a", &job, 0, "0.0", TaskState::Failed);
        h.report("a", &job, 2, "0.0", TaskState::Failed);
        assert_eq!(h.state(&job), JobState::Scheduling);
        h.report("a", &job, 1, "0.0", TaskState::Failed);
        assert_eq!(h.state(&job), JobState::Failed);
        assert!(h.coordinator.jobs[&job].cause.contains("task 0.0 failed"));
    }

    #[test]
    fn a_failure_seen_before_the_worker_loss_names_the_lost_worker() {
        let mut h = Harness::new();
        h.register("a", 2);
        h.register("b", 2);
        let job = h.submit(&SPEC.replace("parallelism = 4", "parallelism = 2")).unwrap();
        h.report("a", &job, 1, "0.0", TaskState::Failed);
        assert_eq!(h.state(&job), JobState::Failed);
        let session = h.sessions["b"];
        h.coordinator.handle(Request::Disconnected { worker_id: "b".into(), session, cause: "control stream broke".into() });
        let cause = &h.coordinator.jobs[&job].cause;
        assert!(cause.starts_with("worker b lost: control stream broke (first seen as: task 0.0 failed"), "{cause}");
    }

    /// `eddy cancel` of the ingest job between two attempts: no task runs to drop its
    /// replication slot, so the answer says the slot stays and how to drop it. While its tasks
    /// run, they drop it, and nothing is said.
    #[test]
    fn a_cancel_that_reaches_no_task_says_which_slot_it_left_behind() {
        let ingest = eddy_jobs::substitute_env(include_str!("../../jobs/specs/ingest.toml"), |_| None).unwrap();
        let mut h = Harness::new();
        h.register("a", 8);
        let cancel = |h: &mut Harness, job: &str, release: bool| {
            let (reply, mut rx) = oneshot::channel();
            h.coordinator.handle(Request::Cancel { job_id: job.into(), release, reply });
            rx.try_recv().unwrap().unwrap()
        };
        let job = h.submit(&ingest).unwrap();
        let tasks = h.deployed("a")[0].task_ids.clone();
        for t in &tasks {
            h.report("a", &job, 1, t, TaskState::Running);
        }
        // Its worker is lost: the job waits for slots, and no task of it runs.
        let session = h.sessions["a"];
        h.coordinator.handle(Request::Disconnected { worker_id: "a".into(), session, cause: "killed".into() });
        assert_eq!(h.state(&job), JobState::Restarting);
        let r = cancel(&mut h, &job, true);
        assert_eq!(r.state, "cancelled");
        assert!(r.warning.contains("eddy_ingest") && r.warning.contains("SELECT pg_drop_replication_slot('eddy_ingest');"), "{}", r.warning);

        h.register("b", 8);
        let kept = h.submit(&ingest).unwrap();
        assert_eq!(cancel(&mut h, &kept, false).warning, "", "--keep-slot keeps it on purpose");
        let running = h.submit(&ingest).unwrap();
        for d in h.deployed("b").iter().filter(|d| d.job_id == running) {
            for t in &d.task_ids {
                h.report("b", &running, 1, t, TaskState::Running);
            }
        }
        assert_eq!(cancel(&mut h, &running, true).warning, "", "its running source drops the slot");
    }

    #[test]
    fn tasks_failing_during_a_cancel_do_not_fail_the_job() {
        let mut h = Harness::new();
        h.register("a", 4);
        let job = h.submit(SPEC).unwrap();
        let (reply, _rx) = oneshot::channel();
        h.coordinator.handle(Request::Cancel { job_id: job.clone(), release: true, reply });
        assert_eq!(h.state(&job), JobState::Cancelling);
        // A source loses its downstream peer as that one is cancelled first.
        h.report("a", &job, 1, "0.0", TaskState::Failed);
        assert_eq!(h.state(&job), JobState::Cancelling);
        assert_eq!(h.coordinator.jobs[&job].tasks[&TaskId { vertex: 0, subtask: 0 }].state, TaskState::Cancelled);
        for t in ["1.0", "1.1", "1.2", "1.3"] {
            h.report("a", &job, 1, t, TaskState::Cancelled);
        }
        assert_eq!(h.state(&job), JobState::Cancelled);
    }

    #[test]
    fn only_the_latest_ended_jobs_and_lost_workers_are_kept() {
        let items = |times: &[i64]| times.iter().map(|t| (*t, format!("x{t}"))).collect::<Vec<_>>();
        assert_eq!(older_than_the_latest(items(&[5, 1, 4, 2, 3]), 2), ["x1", "x2", "x3"]);
        assert!(older_than_the_latest(items(&[1, 2]), 2).is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn a_heartbeat_that_waited_for_a_busy_loop_is_heard_before_the_check() {
        let mut h = Harness::new();
        h.register("a", 2);
        // The loop was busy (a slow metadata write) for longer than the timeout, while the
        // worker's heartbeat waited in the queue.
        tokio::time::advance(Duration::from_millis(2500)).await;
        let session = h.sessions["a"];
        h.requests.try_send(Request::Heartbeat { worker_id: "a".into(), session, tasks: vec![] }).unwrap();
        h.coordinator.on_timer();
        assert!(h.coordinator.cluster.get("a").unwrap().lost.is_none(), "a worker was blamed for the loop's own stall");
        // Silence that is the worker's own still counts.
        tokio::time::advance(Duration::from_millis(2500)).await;
        h.coordinator.on_timer();
        assert!(h.coordinator.cluster.get("a").unwrap().lost.is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn silent_worker_is_lost_and_its_jobs_restart_on_the_slots_left() {
        let mut h = Harness::new();
        h.register("a", 2);
        h.register("b", 2);
        let job = h.submit(&SPEC.replace("parallelism = 4", "parallelism = 2")).unwrap();
        tokio::time::advance(Duration::from_millis(1500)).await;
        let session = h.sessions["a"];
        h.coordinator.handle(Request::Heartbeat { worker_id: "a".into(), session, tasks: vec![] });
        tokio::time::advance(Duration::from_millis(1000)).await;
        h.coordinator.check_heartbeats();
        // b has been silent for 2.5 s (> 2 s), a for 1 s.
        assert_eq!(h.state(&job), JobState::Restarting);
        let cause = &h.coordinator.jobs[&job].cause;
        assert!(cause.contains("worker b lost") && cause.contains("no heartbeat"), "{cause}");
        assert!(h.coordinator.cluster.get("a").unwrap().lost.is_none());
        // The survivor is told to stop the job's tasks.
        let cancels: Vec<_> = std::iter::from_fn(|| h.orders.get_mut("a").unwrap().try_recv().ok())
            .filter(|m| matches!(m, Ok(CoordinatorMessage { msg: Some(Order::Cancel(_)) })))
            .collect();
        assert_eq!(cancels.len(), 1);
        // After the backoff, and once a's tasks of attempt 1 have stopped, the job is redeployed as
        // attempt 2, all on a (2 slots).
        tokio::time::advance(Duration::from_millis(300)).await;
        h.coordinator.on_timer();
        assert_eq!(h.state(&job), JobState::Restarting, "a's old tasks have not stopped yet");
        for t in ["0.0", "1.0"] {
            h.report("a", &job, 1, t, TaskState::Cancelled);
        }
        tokio::time::advance(Duration::from_millis(100)).await;
        h.coordinator.on_timer();
        assert_eq!(h.state(&job), JobState::Scheduling);
        let deployed = h.deployed("a");
        assert_eq!(deployed.len(), 1);
        assert_eq!(deployed[0].attempt, 2);
        assert_eq!(deployed[0].task_ids, ["0.0", "1.0", "1.1"]);
        assert_eq!(h.coordinator.jobs[&job].restarts, 1);
    }

    /// A log whose writes fail while `failing` is set.
    struct FlakyLog(Arc<std::sync::atomic::AtomicBool>);

    impl MetaLog for FlakyLog {
        fn append(&mut self, _: &MetaCommand, _: &MetaState) -> Result<(), crate::meta::MetaError> {
            match self.0.load(std::sync::atomic::Ordering::Relaxed) {
                true => Err(crate::meta::MetaError::Storage("disk full".into())),
                false => Ok(()),
            }
        }
    }

    /// An attempt whose number could not be recorded is not deployed: after a coordinator
    /// restart the number would be handed out again, to a second attempt writing to the same
    /// sinks. Once the log writes again, the next try deploys under a newer number.
    #[tokio::test(start_paused = true)]
    async fn an_attempt_the_log_did_not_take_is_not_deployed() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut h = Harness::new();
        h.coordinator.log = Some(Box::new(FlakyLog(failing.clone())));
        h.register("a", 4);
        let job = h.submit(SPEC).unwrap();
        assert_eq!(h.deployed("a").len(), 1);
        failing.store(true, std::sync::atomic::Ordering::Relaxed);
        h.coordinator.restart_or_fail(&job, "a task failed", true);
        for t in ["0.0", "1.0", "1.1", "1.2", "1.3"] {
            h.report("a", &job, 1, t, TaskState::Cancelled);
        }
        tokio::time::advance(Duration::from_secs(1)).await;
        h.coordinator.on_timer();
        assert!(h.deployed("a").is_empty(), "deployed without a recorded attempt");
        assert_eq!(h.state(&job), JobState::Restarting);
        assert!(h.coordinator.jobs[&job].cause.contains("cannot record the new attempt"));
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        tokio::time::advance(Duration::from_secs(1)).await;
        h.coordinator.on_timer();
        let deployed = h.deployed("a");
        assert_eq!(deployed.iter().map(|d| d.attempt).collect::<Vec<_>>(), [3]);
        assert_eq!(h.coordinator.meta.jobs[&job].attempt, 3);
    }

    /// A job whose submission the log does not take (no majority of coordinators) is refused and
    /// leaves nothing behind: no job, no tasks, no metadata.
    #[tokio::test(start_paused = true)]
    async fn a_submit_the_log_did_not_take_leaves_nothing() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut h = Harness::new();
        h.coordinator.log = Some(Box::new(FlakyLog(failing.clone())));
        h.register("a", 4);
        let e = h.submit(SPEC).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("not started") && e.message().contains("disk full"), "{e:?}");
        assert!(h.deployed("a").is_empty());
        assert!(h.coordinator.jobs.is_empty() && h.coordinator.meta.jobs.is_empty());
        failing.store(false, std::sync::atomic::Ordering::Relaxed);
        h.submit(SPEC).unwrap();
        assert_eq!(h.deployed("a").len(), 1);
    }

    /// "Running" is reported at deploy, before the restore: an attempt that runs a minute and
    /// fails without completing a checkpoint (a restore that never finishes) is still a failure
    /// in a row.
    #[tokio::test(start_paused = true)]
    async fn a_job_failing_a_minute_after_each_deploy_without_a_checkpoint_gives_up() {
        let mut h = Harness::new();
        h.coordinator.config.max_restarts = 2;
        h.register("a", 4);
        let job = h.submit(&SPEC.replace("parallelism = 4", "parallelism = 2")).unwrap();
        for attempt in 1..=3 {
            // The deploy, after the cancels of the previous attempt.
            let orders = h.orders.get_mut("a").unwrap();
            let deployed: Vec<DeployTasks> = std::iter::from_fn(|| orders.try_recv().ok())
                .filter_map(|m| match m {
                    Ok(CoordinatorMessage { msg: Some(Order::Deploy(d)) }) => Some(d),
                    _ => None,
                })
                .collect();
            assert_eq!(deployed.len(), 1, "attempt {attempt}: {:?}", h.coordinator.jobs[&job].history);
            for t in deployed[0].task_ids.clone() {
                h.report("a", &job, attempt, &t, TaskState::Running);
            }
            assert_eq!(h.state(&job), JobState::Running);
            let session = h.sessions["a"];
            h.live_for("a", 61).await;
            for t in deployed[0].task_ids.clone() {
                let update = TaskUpdate { job_id: job.clone(), attempt, task_id: t, state: TaskState::Failed as i32, retryable: true, error: "restore failed".into(), ..Default::default() };
                h.coordinator.handle(Request::TaskUpdate { worker_id: "a".into(), session, update });
            }
            h.live_for("a", 20).await;
        }
        assert_eq!(h.state(&job), JobState::Failed, "{:?}", h.coordinator.jobs[&job].history);
        assert!(h.coordinator.jobs[&job].cause.contains("gave up after 2 restarts"), "{}", h.coordinator.jobs[&job].cause);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_without_slots_waits_and_one_failing_for_good_gives_up() {
        let mut h = Harness::new();
        h.coordinator.config.max_restarts = 2;
        h.register("a", 2);
        let job = h.submit(&SPEC.replace("parallelism = 4", "parallelism = 2")).unwrap();
        let session = h.sessions["a"];
        h.coordinator.handle(Request::Disconnected { worker_id: "a".into(), session, cause: "killed".into() });
        assert_eq!(h.state(&job), JobState::Restarting);
        tokio::time::advance(Duration::from_secs(2)).await;
        h.coordinator.on_timer();
        assert_eq!(h.state(&job), JobState::Restarting, "no slots: it waits");
        assert!(h.coordinator.jobs[&job].cause.contains("waiting for slots"), "{}", h.coordinator.jobs[&job].cause);
        h.register("a", 2);
        tokio::time::advance(Duration::from_secs(1)).await;
        h.coordinator.on_timer();
        assert_eq!(h.state(&job), JobState::Scheduling);
        // Two more failures use up the restarts; the third fails the job.
        for attempt in 2..=4 {
            let update = TaskUpdate { job_id: job.clone(), attempt, task_id: "1.0".into(), state: TaskState::Failed as i32, retryable: true, error: "boom".into(), ..Default::default() };
            let session = h.sessions["a"];
            h.coordinator.handle(Request::TaskUpdate { worker_id: "a".into(), session, update });
            // a stays alive; its other tasks never report, so the restart waits out STOP_WAIT.
            h.live_for("a", 20).await;
        }
        assert_eq!(h.state(&job), JobState::Failed, "{:?}", h.coordinator.jobs[&job].history);
        assert!(h.coordinator.jobs[&job].cause.contains("gave up after 2 restarts"), "{}", h.coordinator.jobs[&job].cause);
    }
}
