//! The coordinator's single owner of state. Requests arrive on a channel (from gRPC handlers and
//! worker streams) and are handled one at a time; a timer drives the failure detector, checkpoint
//! triggers and timeouts, and restarts.
//!
//! The loop holds the workers, a [`Cluster`] (soft state), and the jobs, each a [`Job`] whose
//! methods change it and return the orders to send; every durable change to a job is a
//! [`MetaCommand`] recorded through [`Metadata`] (applied, then made durable by a `MetaLog`)
//! before anyone hears of it. The loop sends orders, records commands and decides what concerns
//! more than one job: placement, lost workers, restarts. I/O (manifests) never blocks the loop:
//! manifests are stored by spawned tasks that report back on an internal channel.
//!
//! Failures: a task that fails with a retryable error, or a lost worker, sends the job to
//! `restarting`; after a backoff (doubling from `restart_backoff` up to `max_restart_backoff`) it is
//! redeployed as a new attempt on the slots available, restoring its latest completed checkpoint.
//! After `max_restarts` restarts in a row (a run of a minute without failure resets the count) or
//! an error in the spec or the data, the job fails.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::connectors::SourceConnector;
use eddy_jobs::plan::OperatorKind;
use eddy_jobs::{Plan, TaskId};
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::{
    BackfillResponse, CancelJob, CancelResponse, CheckpointAck, CheckpointManifest, JobStatusResponse, JobSummary, SourceRequest,
    TaskUpdate, WorkerView,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::checkpoint::{checkpoint_record, record_view, AckOutcome, Completed};
use crate::cluster::{Cluster, WorkerSender};
use crate::error::CoordinatorError;
use crate::job::{AfterSavepoint, Job, Next, Orders, SavepointDone, SavepointWaiter, SourceRequestWaiter, ADOPT_WAIT};
use crate::manifest::{describe, state_for_plan};
use crate::meta::{MetaCommand, MetaLog, MetaState, Metadata};
use crate::slots;
use crate::state::JobState;
use crate::store::{CheckpointStore, JobRecord};
use crate::{now_ms, older_than_the_latest, CoordinatorConfig};

/// Ended jobs (finished, failed, cancelled) kept, the latest ones; older ones are forgotten.
const FINISHED_JOBS_KEPT: usize = 100;

/// What the actor is asked to do.
pub enum Request {
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
    /// A worker opened its control stream: its session, or why it is refused.
    Register { worker_id: String, slots: u32, data_address: String, orders: WorkerSender, reply: oneshot::Sender<Result<u64, String>> },
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
    /// Re-read the rows `filter` selects of a `postgres_cdc` source's table, answered once a
    /// completed checkpoint holds the order.
    Backfill { job_id: String, source: String, filter: String, reply: oneshot::Sender<Result<BackfillResponse, CoordinatorError>> },
}

/// Results of I/O the actor spawned.
enum Internal {
    /// The manifest of a checkpoint whose every task acked has been stored (or not).
    ManifestStored { job_id: String, manifest: Arc<CheckpointManifest>, result: Result<(), String> },
}

/// The coordinator's state and its loop.
pub struct Coordinator {
    config: CoordinatorConfig,
    requests: mpsc::Receiver<Request>,
    internal_tx: mpsc::UnboundedSender<Internal>,
    internal: mpsc::UnboundedReceiver<Internal>,
    cluster: Cluster,
    jobs: BTreeMap<String, Job>,
    /// The durable metadata, as applied; every change to it is recorded there.
    meta: Metadata,
    storage: Option<CheckpointStore>,
    /// The last backfill id handed out.
    last_backfill_id: u64,
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
            meta: Metadata::new(MetaState::default(), None),
            storage: None,
            last_backfill_id: 0,
        }
    }

    /// Keeps job metadata in `log` (which holds `state`) and checkpoints in `storage`, and resumes
    /// the jobs of `state`: deployed ones are adopted from the workers' reports (or restart from
    /// their latest checkpoint), those between attempts restart once workers offer enough slots.
    pub async fn with_stores(mut self, log: Box<dyn MetaLog>, state: MetaState, storage: CheckpointStore) -> anyhow::Result<Coordinator> {
        let records: Vec<JobRecord> = state.jobs.values().cloned().collect();
        self.meta = Metadata::new(state, Some(log));
        for r in records {
            let mut kept = Vec::new();
            let mut unreadable = Vec::new();
            for c in &r.checkpoints {
                match storage.get_manifest(&r.job_id, c.id).await {
                    Ok(m) => {
                        kept.push(Completed { id: c.id, savepoint: c.savepoint, manifest: Arc::new(m), view: record_view(&r.job_id, c) })
                    }
                    Err(e) => {
                        warn!(job_id = %r.job_id, checkpoint = c.id, error = %e, "cannot read a checkpoint manifest; not restoring from it, and keeping every shared state file of the job until it reads again");
                        unreadable.push(c.clone());
                    }
                }
            }
            let Some(mut job) = self.resume_job(&r, kept) else { continue };
            job.unreadable = unreadable;
            if r.state == JobState::Cancelling {
                job.release_checkpoints(Some(storage.clone()), now_ms());
            }
            // What the restart changed (a running job now restarts, a cancel in progress is
            // complete, an id skipped) is recorded like any change.
            if r.state != job.state || r.cause != job.cause {
                self.meta.record(MetaCommand::StateChanged { job_id: r.job_id.clone(), to: job.state, cause: job.cause.clone() });
            }
            if r.next_checkpoint_id != job.checkpoints.next_id() {
                self.meta.record(MetaCommand::CheckpointIdsUsed { job_id: r.job_id.clone(), next: job.checkpoints.next_id() });
            }
            self.jobs.insert(r.job_id, job);
        }
        // Savepoints a job was submitted from belong to other jobs, all loaded by now.
        let from: Vec<(String, String)> = self.jobs.iter().filter_map(|(id, j)| Some((id.clone(), j.from_savepoint.clone()?))).collect();
        for (job_id, savepoint) in from {
            let found = self.find_savepoint(&savepoint).map_err(|e| e.to_string());
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            match found.and_then(|m| state_for_plan(&m, &job.plan)) {
                Ok(manifest) => job.initial_restore = Some(Arc::new(manifest)),
                Err(e) => {
                    warn!(job_id, savepoint, error = %e, "the savepoint the job was submitted from cannot be restored; it restarts without it")
                }
            }
        }
        self.storage = Some(storage);
        Ok(self)
    }

    /// A job of the metadata, taken on; `None` (and it is dropped from the metadata) when its
    /// spec no longer plans.
    fn resume_job(&mut self, r: &JobRecord, kept: Vec<Completed>) -> Option<Job> {
        let plan = match eddy_jobs::compile_with_parallelism(&r.spec, r.parallelism) {
            Ok(p) => p,
            Err(e) => {
                warn!(job_id = %r.job_id, error = %e, "a stored job's spec no longer plans; dropping it");
                if !r.state.is_terminal() {
                    let cause = format!("its spec no longer plans: {e}");
                    self.meta.record(MetaCommand::StateChanged { job_id: r.job_id.clone(), to: JobState::Failed, cause });
                }
                self.meta.record(MetaCommand::Forgotten { job_id: r.job_id.clone() });
                return None;
            }
        };
        let job = Job::resumed(r, plan, kept, &self.config, Instant::now());
        info!(job_id = %r.job_id, state = %job.state, cause = %job.cause, "job loaded from metadata");
        Some(job)
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
            for w in job.source_requests.drain(..) {
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
            let Some(job) = self.jobs.get_mut(&job_id) else { continue };
            if job.state == JobState::Restarting && job.restart_at.is_some_and(|t| t <= now) {
                self.try_restart(&job_id);
            } else if job.adopt_until.is_some_and(|t| t <= now) {
                let next = job.adoption_timed_out();
                self.follow(&job_id, next);
            } else if job.adopt_until.is_none() && job.state == JobState::Running {
                if let Some(p) = job.checkpoints.check_timeout(now) {
                    warn!(job_id, checkpoint = p.id, "checkpoint timed out");
                    if p.savepoint {
                        job.savepoint_failed("the savepoint timed out");
                    }
                }
                self.maybe_trigger(&job_id, now);
            }
        }
    }

    /// Starts a checkpoint (or a waiting savepoint) when one is due and every task is running.
    fn maybe_trigger(&mut self, job_id: &str, now: Instant) {
        let Some(job) = self.jobs.get_mut(job_id).filter(|_| self.storage.is_some()) else { return };
        let Some((id, orders)) = job.trigger(now) else { return };
        // Used up before any task writes under it: a restart never hands it out again.
        self.meta.record(MetaCommand::CheckpointIdsUsed { job_id: job_id.to_string(), next: id + 1 });
        self.cluster.send_all(orders);
    }

    fn on_checkpoint_ack(&mut self, ack: CheckpointAck) {
        let Some(job) = self.jobs.get_mut(&ack.job_id) else { return };
        let snapshot = if ack.declined.is_empty() { Ok(ack.snapshot.unwrap_or_default()) } else { Err(ack.declined) };
        match job.checkpoints.ack(ack.attempt, ack.checkpoint_id, &ack.task_id, snapshot, Instant::now()) {
            AckOutcome::Stale | AckOutcome::Waiting => {}
            AckOutcome::Aborted { cause, savepoint } => {
                warn!(job_id = %ack.job_id, checkpoint = ack.checkpoint_id, %cause, "checkpoint aborted");
                if savepoint {
                    job.savepoint_failed(&cause);
                }
            }
            AckOutcome::AllAcked(mut manifest) => {
                describe(&mut manifest, &ack.job_id, &job.plan);
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
            Internal::ManifestStored { job_id, manifest, result } => self.manifest_stored(&job_id, manifest, result),
        }
    }

    /// The manifest of a checkpoint every task acked was stored (or not): the checkpoint is
    /// complete once recorded, and then its workers hear of it.
    fn manifest_stored(&mut self, job_id: &str, manifest: Arc<CheckpointManifest>, result: Result<(), String>) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let now = Instant::now();
        if let Err(e) = result {
            job.checkpoints.abort(&e, now);
            warn!(job_id, checkpoint = manifest.checkpoint_id, error = %e, "checkpoint aborted: manifest not stored");
            job.savepoint_failed(&e);
            return;
        }
        let (done, dropped) = job.checkpoints.stored(manifest.checkpoint_id, manifest.clone(), now);
        let Some(done) = done else { return };
        // This attempt restored and made progress: its failures in a row are over.
        job.failures_in_row = 0;
        info!(
            job_id,
            checkpoint = done.id,
            savepoint = done.savepoint,
            duration_ms = done.view.duration_ms,
            full_bytes = done.view.full_bytes,
            incremental_bytes = done.view.incremental_bytes,
            "checkpoint completed"
        );
        let dropped: Vec<u64> = dropped.iter().map(|c| c.id).collect();
        if let Some(storage) = self.storage.clone() {
            let kept: Vec<Arc<CheckpointManifest>> = job.checkpoints.kept().iter().map(|c| c.manifest.clone()).collect();
            let (dropped, shared, id) = (dropped.clone(), job.shared_gc(done.id, done.view.triggered_at_ms), job_id.to_string());
            tokio::spawn(async move { storage.collect(&id, dropped, kept, shared).await });
        }
        // Recorded before anyone hears of it: a source that confirms this checkpoint's position
        // upstream (a replication slot) can never be restored from an older one.
        let checkpoint = checkpoint_record(&done);
        if !self.meta.record(MetaCommand::CheckpointCompleted { job_id: job_id.to_string(), checkpoint, dropped }) {
            // Not confirmed upstream until a later checkpoint is recorded.
            if done.savepoint {
                job.savepoint_failed("the coordinator could not record it");
            }
            return;
        }
        // Sources may now confirm positions upstream; sinks commit what they staged.
        self.cluster.send_all(job.checkpoint_done(done.id));
        job.source_requests_held(done.id);
        if done.savepoint {
            self.savepoint_done(job_id, done);
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
            let _ = reply
                .send(Err(CoordinatorError::WrongState(format!("job {job_id} is {}; savepoints are taken of running jobs", job.state))));
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

    /// The order for a backfill of `job_id`'s `postgres_cdc` source `source` (or its only one),
    /// or why it cannot take one. Its id is unique across the job's life (the wall clock, kept
    /// above earlier ids), so a source tells a repeat from a new order.
    fn backfill(&mut self, job_id: &str, source: String, filter: String) -> Result<SourceRequest, CoordinatorError> {
        let job = self.jobs.get(job_id).ok_or_else(|| CoordinatorError::NoSuchJob(job_id.into()))?;
        if job.state.is_terminal() {
            return Err(CoordinatorError::WrongState(format!("job {job_id} is {}; a backfill goes into a running job", job.state)));
        }
        let filter = eddy_jobs::condition::postgres_condition(&filter).map_err(|e| CoordinatorError::Invalid(format!("--where: {e}")))?;
        let cdc: Vec<(&str, &eddy_jobs::connectors::PostgresCdcOptions)> = job
            .plan
            .operators
            .iter()
            .filter_map(|o| match &o.kind {
                OperatorKind::Source { connector: SourceConnector::PostgresCdc(c), .. } => Some((o.name.as_str(), c)),
                _ => None,
            })
            .collect();
        let names = || cdc.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ");
        let (name, options) = match (source.as_str(), cdc.as_slice()) {
            (_, []) => return Err(CoordinatorError::Invalid(format!("job {job_id} has no postgres_cdc source to backfill"))),
            ("", [only]) => *only,
            ("", _) => {
                return Err(CoordinatorError::Invalid(format!(
                    "job {job_id} has several postgres_cdc sources ({}): name one with --source",
                    names()
                )))
            }
            (wanted, _) => *cdc.iter().find(|(n, _)| *n == wanted).ok_or_else(|| {
                CoordinatorError::Invalid(format!(
                    "job {job_id} has no postgres_cdc source `{wanted}`; its postgres_cdc sources: {}",
                    names()
                ))
            })?,
        };
        if options.version_column.is_none() {
            return Err(CoordinatorError::Invalid(format!(
                "source `{name}` has no version_column: the re-read rows could not be ordered against the stream's changes. Set options.version_column"
            )));
        }
        if self.storage.is_none() || !job.checkpoints.enabled() {
            return Err(CoordinatorError::WrongState(format!(
                "job {job_id} takes no checkpoints, and a backfill is recorded in them (it must survive a crash half way)"
            )));
        }
        let id = (now_ms().max(0) as u64).max(self.last_backfill_id + 1);
        self.last_backfill_id = id;
        Ok(SourceRequest { source: name.to_string(), id, backfill_filter: filter })
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
        let now = Instant::now();
        self.cluster.send_all(job.stop_for_restart(now));
        self.meta.record(MetaCommand::Rescaled { job_id: job_id.to_string(), parallelism });
        job.parallelism = Some(parallelism);
        job.plan = Arc::new(plan);
        job.initial_restore = Some(manifest);
        job.restart_at = Some(now);
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
        let now = Instant::now();
        let backoff = match job.count_failure(&self.config, now) {
            Ok(backoff) => backoff,
            Err(n) => {
                self.fail(job_id, &format!("{why} (gave up after {n} restarts in a row)"));
                return;
            }
        };
        self.meta.record(MetaCommand::Restarted { job_id: job_id.to_string() });
        if job.checkpoints.abort("the job is restarting", now).is_some_and(|p| p.savepoint) {
            job.savepoint_failed("the job failed while taking it");
        }
        self.cluster.send_all(job.stop_for_restart(now));
        self.transition(job_id, JobState::Restarting, &format!("{why}; restarting in {} ms", backoff.as_millis()));
    }

    /// Places a restarting job's tasks and deploys a new attempt from its latest checkpoint, once
    /// the old attempt's tasks have stopped and enough slots are free.
    fn try_restart(&mut self, job_id: &str) {
        let now = Instant::now();
        let (needed, waits) = match self.jobs.get(job_id) {
            Some(job) => (job.plan.slots_needed() as usize, job.waits_for_old_tasks(now)),
            None => return,
        };
        let placed = if waits { None } else { self.place(needed) };
        let free: u32 = self.free_slots().values().sum();
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if waits {
            job.restart_at = Some(now + Duration::from_millis(50));
            return;
        }
        let Some(slots) = placed else {
            job.restart_at = Some(now + self.config.restart_backoff.max(Duration::from_millis(500)));
            let cause = format!("waiting for slots: needs {needed}, {free} free");
            if job.cause != cause {
                info!(job_id, %cause, "restart postponed");
                job.cause = cause;
            }
            return;
        };
        // Attempts come from the log: an attempt whose number is not recorded is not deployed
        // (the number is spent; the next try records another).
        job.attempt += 1;
        if !self.meta.record(MetaCommand::AttemptStarted { job_id: job_id.to_string(), attempt: job.attempt }) {
            job.restart_at = Some(now + self.config.restart_backoff.max(Duration::from_millis(500)));
            job.cause = "cannot record the new attempt in the metadata; trying again".into();
            return;
        }
        job.restart_at = None;
        job.place_on(slots);
        let from = job.checkpoints.latest().map(|c| format!("checkpoint {}", c.id));
        info!(job_id, attempt = job.attempt, from = from.as_deref().unwrap_or("the start"), "redeploying");
        self.deploy(job_id);
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Submit { spec, plan, from_savepoint, reply } => {
                let _ = reply.send(self.submit(spec, *plan, from_savepoint));
            }
            Request::ListJobs { reply } => {
                let _ = reply.send(self.jobs.values().map(Job::summary).collect());
            }
            Request::JobStatus { job_id, reply } => {
                let status = self.jobs.get(&job_id).map(Job::status).ok_or(CoordinatorError::NoSuchJob(job_id));
                let _ = reply.send(status);
            }
            Request::Cancel { job_id, release, reply } => match self.cancel(&job_id, release) {
                Ok((response, left)) if !left.is_empty() => {
                    // Dropped off the loop (a worker cut off may hold a slot until its lease
                    // ends); the answer says how that went.
                    tokio::spawn(async move {
                        let warning = slots::drop_all(left, ADOPT_WAIT).await;
                        let _ = reply.send(Ok(CancelResponse { warning, ..response }));
                    });
                }
                result => {
                    let _ = reply.send(result.map(|(response, _)| response));
                }
            },
            Request::ListWorkers { reply } => {
                let _ = reply.send(self.cluster.views(self.held_slots()));
            }
            Request::Register { worker_id, slots, data_address, orders, reply } => {
                // A worker id belongs to its session while that session lives: a second
                // registration under it is refused, not a takeover (which would declare the
                // real worker lost and restart its jobs, as often as someone asked).
                if let Some(live) = self.cluster.live(&worker_id) {
                    if live.connected() {
                        let refusal = format!(
                            "worker id `{worker_id}` is taken by a live worker (at {}): start this one with another --id, or wait \
                             until that one is declared lost ({} ms without a heartbeat)",
                            live.data_address,
                            self.config.heartbeat_timeout.as_millis()
                        );
                        let _ = reply.send(Err(refusal));
                        return;
                    }
                    // Its stream is gone (a restart faster than the disconnect was heard).
                    self.worker_lost(&worker_id, "it registered again (restarted?)".into());
                }
                let session = self.cluster.register(worker_id, slots, data_address, orders);
                let _ = reply.send(Ok(session));
            }
            Request::Heartbeat { worker_id, session, tasks } => {
                if !self.cluster.touch(&worker_id, session) {
                    return;
                }
                // The worker's lease on its tasks: renewed while this coordinator leads.
                self.cluster.send_all(Orders::to(&worker_id, Order::Renew(eddy_proto::Renew {})));
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
            Request::Backfill { job_id, source, filter, reply } => match self.backfill(&job_id, source, filter) {
                Ok(request) => {
                    let job = self.jobs.get_mut(&job_id).expect("checked by backfill");
                    job.source_requests.push(SourceRequestWaiter { request, sent_in: None, reply });
                }
                Err(e) => _ = reply.send(Err(e)),
            },
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
        let now = now_ms();
        let affected: Vec<String> =
            self.jobs.values_mut().filter_map(|j| j.worker_lost(worker_id, &cause, now).then(|| j.id.clone())).collect();
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
        let mut job = Job::new(&job_id, spec, None, plan, &self.config, Instant::now());
        job.place_on(slots);
        job.initial_restore = initial_restore;
        job.from_savepoint = (!from_savepoint.is_empty()).then_some(from_savepoint);
        if let Err(e) = self.meta.try_record(MetaCommand::Submitted { job: job.record() }) {
            // Not started: the metadata holds no job that does not run.
            self.meta.state.jobs.remove(&job_id);
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

    /// Sends the job's current attempt to its workers.
    fn deploy(&mut self, job_id: &str) {
        let root = self.storage.as_ref().map(|s| s.root().to_string()).unwrap_or_default();
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        let cluster = &self.cluster;
        let orders = job.deploy(&root, |w| cluster.get(w).map(|w| w.data_address.clone()).unwrap_or_default());
        let unreachable = self.cluster.send_all(orders);
        let tasks = job.tasks.len();
        self.transition(job_id, JobState::Scheduling, &format!("deploying {tasks} tasks"));
        if let Some(worker_id) = unreachable.first() {
            self.restart_or_fail(job_id, &format!("could not reach worker {worker_id} to deploy tasks"), true);
        }
    }

    fn task_update(&mut self, worker_id: &str, u: TaskUpdate, heartbeat: bool) {
        let Ok(task) = u.task_id.parse::<TaskId>() else { return };
        let job = self.jobs.get_mut(&u.job_id);
        // A task running for no job, an older attempt or an ended job (one a coordinator before
        // this one left behind) is stopped.
        if heartbeat && job.as_ref().is_none_or(|j| j.no_longer_runs(u.attempt)) {
            let order = CancelJob { job_id: u.job_id.clone(), attempt: u.attempt, release: false };
            self.cluster.send_all(Orders::to(worker_id, Order::Cancel(order)));
        }
        // Fencing: reports from another attempt are stale.
        let Some(job) = job.filter(|j| j.attempt == u.attempt) else { return };
        let next = if job.adopt_until.is_some() { job.adopt(worker_id, &u, task) } else { job.report(worker_id, &u, task, heartbeat) };
        if let Some(next) = next {
            self.follow(&u.job_id, next);
        }
    }

    /// Takes the step a job's report (or its absence) called for.
    fn follow(&mut self, job_id: &str, next: Next) {
        match next {
            Next::Restart { why, retryable } => self.restart_or_fail(job_id, &why, retryable),
            Next::Fail(why) => self.fail(job_id, &why),
            Next::Become(to, cause) => self.transition(job_id, to, &cause),
            Next::Adopted(cause) => {
                let Some(job) = self.jobs.get_mut(job_id) else { return };
                let all_finished = job.all_finished();
                if job.state == JobState::Scheduling {
                    self.transition(job_id, JobState::Running, &cause);
                } else {
                    job.cause = cause.clone();
                    self.meta.record(MetaCommand::StateChanged { job_id: job_id.to_string(), to: JobState::Running, cause });
                }
                // Every task reached its end while the coordinator changed.
                if all_finished {
                    self.transition(job_id, JobState::Finished, "every task reached the end of its input");
                }
            }
        }
    }

    fn fail(&mut self, job_id: &str, why: &str) {
        if let Some(job) = self.jobs.get(job_id) {
            self.cluster.send_all(job.stop(false));
        }
        self.transition(job_id, JobState::Failed, why);
    }

    /// Cancels a job: the answer, and the replication slots no task of the job runs to drop (with
    /// `release`, when the job is between attempts or a worker of it was lost), which the caller
    /// drops instead.
    fn cancel(&mut self, job_id: &str, release: bool) -> Result<(CancelResponse, Vec<slots::Slot>), CoordinatorError> {
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
        // attempts, or on a worker lost) nobody would, and it would hold WAL on the server.
        let unreachable = state == JobState::Restarting || job.slots.iter().any(|w| self.cluster.live(w).is_none());
        let mut left = if release && unreachable { slots::of(&job.plan) } else { Vec::new() };
        // A slot another live job names (one that resumed from it) is that job's to keep.
        let others: Vec<slots::Slot> =
            self.jobs.values().filter(|j| j.id != job_id && !j.state.is_terminal()).flat_map(|j| slots::of(&j.plan)).collect();
        left.retain(|s| !others.iter().any(|o| o.same(s)));
        if state == JobState::Restarting {
            // Nothing runs between two attempts.
            self.transition(job_id, JobState::Cancelling, "cancel requested");
            self.transition(job_id, JobState::Cancelled, "cancelled while restarting");
        } else if state != JobState::Cancelling {
            self.cluster.send_all(job.stop(release));
            let all_stopped = job.all_stopped();
            self.transition(job_id, JobState::Cancelling, "cancel requested");
            if all_stopped {
                self.transition(job_id, JobState::Cancelled, "all tasks stopped");
            }
        }
        let state = self.jobs.get(job_id).map(|j| j.state).unwrap_or(JobState::Cancelled);
        Ok((CancelResponse { state: state.to_string(), warning: String::new() }, left))
    }

    /// Moves the job to `to` and records it; a job that ends for good releases its checkpoints,
    /// and the oldest ended jobs are forgotten.
    fn transition(&mut self, job_id: &str, to: JobState, cause: &str) {
        let Some(job) = self.jobs.get_mut(job_id) else { return };
        if !job.move_to(to, cause) {
            return;
        }
        // A cancelled or finished job is never restored again: its checkpoints' files go, its
        // savepoints' stay. A failed job keeps them, as evidence.
        if matches!(to, JobState::Cancelled | JobState::Finished) {
            job.release_checkpoints(self.storage.clone(), now_ms());
        }
        self.meta.record(MetaCommand::StateChanged { job_id: job_id.to_string(), to, cause: cause.to_string() });
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
            self.meta.record(MetaCommand::Forgotten { job_id: id });
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::collections::HashMap;

    use eddy_proto::{CoordinatorMessage, DeployTasks, TaskState};
    use tonic::Status;

    pub(crate) const SPEC: &str = r#"
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
            assert!(self.jobs.keys().eq(self.meta.state.jobs.keys()), "jobs and the metadata's differ");
            for (id, job) in &self.jobs {
                let held = &self.meta.state.jobs[id];
                let mut want = job.record();
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
            self.coordinator.handle(Request::Register { worker_id: id.into(), slots, data_address: format!("{id}:1"), orders, reply });
            self.sessions.insert(id.into(), session.try_recv().unwrap().unwrap());
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

    /// A backfill names a `postgres_cdc` source with a version column, in a job that checkpoints:
    /// every other request is refused, saying what to do, and nothing is queued.
    #[test]
    fn a_backfill_is_refused_where_it_cannot_be_ordered_or_recorded() {
        let mut h = Harness::new();
        h.register("a", 8);
        let backfill = |h: &mut Harness, job: &str, source: &str, filter: &str| {
            let (reply, mut rx) = oneshot::channel();
            h.coordinator.handle(Request::Backfill { job_id: job.into(), source: source.into(), filter: filter.into(), reply });
            rx.try_recv().map(|r| r.map(|_| ()).map_err(|e| e.to_string())).unwrap_or(Ok(()))
        };
        let generator = h.submit(SPEC).unwrap();
        let err = backfill(&mut h, &generator, "", "id = 1").unwrap_err();
        assert!(err.contains("no postgres_cdc source"), "{err}");
        let cdc = |name: &str, version: &str| {
            format!(
                "[[source]]\nname = \"{name}\"\nconnector = \"postgres_cdc\"\n[source.options]\nurl = \"postgres://u@h/d\"\n\
                 table = \"public.t\"\ncolumns = \"id BIGINT\"\nprimary_key = [\"id\"]\nslot = \"s_{name}\"\n{version}\n\
                 [[sink]]\nname = \"out_{name}\"\ninput = \"{name}\"\nconnector = \"discard\"\n"
            )
        };
        let two = h.submit(&format!("name = \"two\"\n{}{}", cdc("a", "version_column = \"v\""), cdc("b", ""))).unwrap();
        let err = backfill(&mut h, &two, "", "id = 1").unwrap_err();
        assert!(err.contains("several postgres_cdc sources (a, b)"), "{err}");
        let err = backfill(&mut h, &two, "c", "id = 1").unwrap_err();
        assert!(err.contains("no postgres_cdc source `c`"), "{err}");
        let err = backfill(&mut h, &two, "b", "id = 1").unwrap_err();
        assert!(err.contains("no version_column"), "{err}");
        let err = backfill(&mut h, &two, "a", " ").unwrap_err();
        assert!(err.contains("--where: the condition is empty"), "{err}");
        let err = backfill(&mut h, &two, "a", "id IN (SELECT id FROM other)").unwrap_err();
        assert!(err.contains("not allowed"), "{err}");
        // This harness stores no checkpoints.
        let err = backfill(&mut h, &two, "a", "id = 1").unwrap_err();
        assert!(err.contains("takes no checkpoints"), "{err}");
        let err = backfill(&mut h, "nope", "a", "id = 1").unwrap_err();
        assert!(err.contains("no job `nope`"), "{err}");
        assert!(h.coordinator.jobs.values().all(|j| j.source_requests.is_empty()));
    }

    /// A cancel stored just before the coordinator died is not undone by the restart.
    #[tokio::test]
    async fn a_cancel_in_progress_survives_a_coordinator_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        // Stored: "c" while its cancel was in progress, "r" running.
        let (mut log, mut state) = crate::meta::LocalLog::open(&dir.join("meta")).unwrap();
        for (id, states) in
            [("c", &[JobState::Scheduling, JobState::Running, JobState::Cancelling][..]), ("r", &[JobState::Scheduling, JobState::Running])]
        {
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
            let commands = std::iter::once(MetaCommand::Submitted { job }).chain(states.iter().map(|&to| MetaCommand::StateChanged {
                job_id: id.into(),
                to,
                cause: to.to_string(),
            }));
            for c in commands {
                state.apply(&c).unwrap();
                log.append(&c, &state).unwrap();
            }
        }
        let storage = CheckpointStore::open(dir.join("checkpoints").to_str().unwrap()).unwrap();
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
        let meta = before.coordinator.meta.state.clone();
        drop(before);

        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let storage = CheckpointStore::open(dir.to_str().unwrap()).unwrap();
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
                .map(|(job_id, attempt, task_id)| TaskUpdate {
                    job_id,
                    attempt,
                    task_id,
                    state: TaskState::Running as i32,
                    ..Default::default()
                })
                .collect();
            // A task of an older attempt of the adopted job, and one of a job nobody runs now.
            tasks.push(TaskUpdate {
                job_id: adopted.clone(),
                attempt: 0,
                task_id: "0.0".into(),
                state: TaskState::Running as i32,
                ..Default::default()
            });
            tasks.push(TaskUpdate {
                job_id: "gone".into(),
                attempt: 3,
                task_id: "0.0".into(),
                state: TaskState::Running as i32,
                ..Default::default()
            });
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
        assert!(
            orders.iter().all(|o| !matches!(o, Order::Deploy(d) if d.job_id == adopted)),
            "nothing of the adopted job is deployed again"
        );
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

    /// The shipped ingest spec, its database at a port where none answers.
    fn ingest_without_database() -> String {
        let no_database = |k: &str| (k == "EDDY_PG_URL").then(|| "postgres://eddy@127.0.0.1:1/eddy".to_string());
        eddy_jobs::substitute_env(include_str!("../../jobs/specs/ingest.toml"), no_database).unwrap()
    }

    /// A cancel that reaches no running task (its worker lost, the job between attempts) leaves
    /// no task to drop the job's replication slot: the coordinator drops it, and when it cannot
    /// (here no database answers) the answer says the slot stays and how to drop it. While its
    /// tasks run, they drop it, and nothing is said.
    #[tokio::test]
    async fn a_cancel_that_reaches_no_task_drops_the_slot_or_says_it_stays() {
        let ingest = ingest_without_database();
        let mut h = Harness::new();
        h.register("a", 8);
        async fn cancel(h: &mut Harness, job: &str, release: bool) -> CancelResponse {
            let (reply, rx) = oneshot::channel();
            h.coordinator.handle(Request::Cancel { job_id: job.into(), release, reply });
            rx.await.unwrap().unwrap()
        }
        let job = h.submit(&ingest).unwrap();
        let tasks = h.deployed("a")[0].task_ids.clone();
        for t in &tasks {
            h.report("a", &job, 1, t, TaskState::Running);
        }
        // Its worker is lost: the job waits for slots, and no task of it runs.
        let session = h.sessions["a"];
        h.coordinator.handle(Request::Disconnected { worker_id: "a".into(), session, cause: "killed".into() });
        assert_eq!(h.state(&job), JobState::Restarting);
        let r = cancel(&mut h, &job, true).await;
        assert_eq!(r.state, "cancelled");
        assert!(
            r.warning.contains("slot eddy_ingest not dropped (cannot connect")
                && r.warning.contains("SELECT pg_drop_replication_slot('eddy_ingest');"),
            "{}",
            r.warning
        );

        h.register("b", 8);
        let kept = h.submit(&ingest).unwrap();
        assert_eq!(cancel(&mut h, &kept, false).await.warning, "", "--keep-slot keeps it on purpose");
        let running = h.submit(&ingest).unwrap();
        for d in h.deployed("b").iter().filter(|d| d.job_id == running) {
            for t in &d.task_ids {
                h.report("b", &running, 1, t, TaskState::Running);
            }
        }
        assert_eq!(cancel(&mut h, &running, true).await.warning, "", "its running source drops the slot");
    }

    /// A slot that another live job names (one that resumed from it) is never dropped by the
    /// cancel of a job between attempts: it is that job's.
    #[tokio::test]
    async fn a_cancel_keeps_a_slot_another_live_job_reads() {
        let ingest = ingest_without_database();
        let mut h = Harness::new();
        h.register("a", 8);
        let old = h.submit(&ingest).unwrap();
        h.register("b", 8);
        let live = h.submit(&ingest).unwrap();
        for (worker, job) in [("a", &old), ("b", &live)] {
            for d in h.deployed(worker) {
                for t in &d.task_ids {
                    h.report(worker, job, 1, t, TaskState::Running);
                }
            }
        }
        let session = h.sessions["a"];
        h.coordinator.handle(Request::Disconnected { worker_id: "a".into(), session, cause: "killed".into() });
        assert_eq!(h.state(&old), JobState::Restarting);
        assert_eq!(h.state(&live), JobState::Running);
        let (reply, rx) = oneshot::channel();
        h.coordinator.handle(Request::Cancel { job_id: old.clone(), release: true, reply });
        let r = rx.await.unwrap().unwrap();
        assert_eq!((r.state.as_str(), r.warning.as_str()), ("cancelled", ""), "no drop tried: the live job's slot");
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
        let state = std::mem::take(&mut h.coordinator.meta.state);
        h.coordinator.meta = Metadata::new(state, Some(Box::new(FlakyLog(failing.clone()))));
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
        assert_eq!(h.coordinator.meta.state.jobs[&job].attempt, 3);
    }

    /// A job whose submission the log does not take (no majority of coordinators) is refused and
    /// leaves nothing behind: no job, no tasks, no metadata.
    #[tokio::test(start_paused = true)]
    async fn a_submit_the_log_did_not_take_leaves_nothing() {
        let failing = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let mut h = Harness::new();
        let state = std::mem::take(&mut h.coordinator.meta.state);
        h.coordinator.meta = Metadata::new(state, Some(Box::new(FlakyLog(failing.clone()))));
        h.register("a", 4);
        let e = h.submit(SPEC).unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unavailable);
        assert!(e.message().contains("not started") && e.message().contains("disk full"), "{e:?}");
        assert!(h.deployed("a").is_empty());
        assert!(h.coordinator.jobs.is_empty() && h.coordinator.meta.state.jobs.is_empty());
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
                let update = TaskUpdate {
                    job_id: job.clone(),
                    attempt,
                    task_id: t,
                    state: TaskState::Failed as i32,
                    retryable: true,
                    error: "restore failed".into(),
                    ..Default::default()
                };
                h.coordinator.handle(Request::TaskUpdate { worker_id: "a".into(), session, update });
            }
            h.live_for("a", 20).await;
        }
        assert_eq!(h.state(&job), JobState::Failed, "{:?}", h.coordinator.jobs[&job].history);
        assert!(h.coordinator.jobs[&job].cause.contains("gave up after 2 restarts"), "{}", h.coordinator.jobs[&job].cause);
    }

    /// A second registration under a live worker's id is refused and changes nothing; once the
    /// first worker's stream is gone (it died), the id is free again.
    #[test]
    fn a_live_worker_id_cannot_be_taken_over() {
        let mut h = Harness::new();
        h.register("a", 4);
        let job = h.submit(SPEC).unwrap();
        let (orders, _rogue) = mpsc::channel(64);
        let (reply, mut answer) = oneshot::channel();
        h.coordinator.handle(Request::Register { worker_id: "a".into(), slots: 100, data_address: "evil:1".into(), orders, reply });
        let refusal = answer.try_recv().unwrap().unwrap_err();
        assert!(refusal.contains("worker id `a` is taken by a live worker (at a:1)") && refusal.contains("--id"), "{refusal}");
        assert!(h.coordinator.cluster.is_current("a", h.sessions["a"]), "the first session stays");
        assert_eq!(h.state(&job), JobState::Scheduling, "its job is not restarted");
        // The real worker dies without its disconnect being heard yet: its restart gets the id.
        h.orders.remove("a");
        h.register("a", 4);
        assert_eq!(h.coordinator.cluster.live("a").map(|w| w.slots), Some(4));
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
            let update = TaskUpdate {
                job_id: job.clone(),
                attempt,
                task_id: "1.0".into(),
                state: TaskState::Failed as i32,
                retryable: true,
                error: "boom".into(),
                ..Default::default()
            };
            let session = h.sessions["a"];
            h.coordinator.handle(Request::TaskUpdate { worker_id: "a".into(), session, update });
            // a stays alive; its other tasks never report, so the restart waits out STOP_WAIT.
            h.live_for("a", 20).await;
        }
        assert_eq!(h.state(&job), JobState::Failed, "{:?}", h.coordinator.jobs[&job].history);
        assert!(h.coordinator.jobs[&job].cause.contains("gave up after 2 restarts"), "{}", h.coordinator.jobs[&job].cause);
    }
}
