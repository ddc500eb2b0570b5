//! One job as the coordinator's loop holds it: the live side of its durable record (state,
//! attempt, placement, checkpoints) and its tasks' latest reports.
//!
//! A job's methods change the job and return what follows from the change, and do nothing else:
//! the [`Orders`] its workers are to receive, or the [`Next`] step a task report calls for. The
//! loop ([`crate::actor`]) sends the orders, records the durable changes and takes the next steps,
//! which may concern other jobs (slots) or the cluster (a lost worker).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::plan::Port;
use eddy_jobs::{Plan, TaskId};
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::{
    BackfillResponse, CancelJob, CheckpointDone, CheckpointManifest, CheckpointView, DeployTasks, GraphEdge, JobStatusResponse, JobSummary,
    SourceRequest, TaskMetrics, TaskState, TaskUpdate, TaskView, Transition, TriggerCheckpoint,
};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::checkpoint::{checkpoint_record, CheckpointTracker, Completed};
use crate::error::CoordinatorError;
use crate::state::JobState;
use crate::store::{CheckpointRecord, CheckpointStore, JobRecord, SharedGc};
use crate::{now_ms, CoordinatorConfig};

/// How long a restart waits for the old attempt's tasks to report that they stopped.
const STOP_WAIT: Duration = Duration::from_secs(10);
/// State changes kept per job (the first one and the latest).
const HISTORY_KEPT: usize = 200;
/// How long a coordinator that starts (or starts leading) waits for workers to report a job's
/// running tasks before it restarts the job instead: the workers' lease, by which time every task
/// not reported has stopped, and a margin for a deposed leader's last renewals.
pub const ADOPT_WAIT: Duration = eddy_proto::WORKER_LEASE.saturating_add(Duration::from_secs(3));

/// Orders for workers, in the order they are to be sent.
#[derive(Debug, Default)]
pub struct Orders(Vec<(String, Order)>);

impl Orders {
    /// `order` to each of `workers`, once to each.
    pub fn to_each<'a>(workers: impl IntoIterator<Item = &'a String>, order: Order) -> Orders {
        let workers: BTreeSet<&String> = workers.into_iter().collect();
        Orders(workers.into_iter().map(|w| (w.clone(), order.clone())).collect())
    }

    /// One order to one worker.
    pub fn to(worker: &str, order: Order) -> Orders {
        Orders(vec![(worker.to_string(), order)])
    }
}

impl IntoIterator for Orders {
    type Item = (String, Order);
    type IntoIter = std::vec::IntoIter<(String, Order)>;

    fn into_iter(self) -> Self::IntoIter {
        self.0.into_iter()
    }
}

/// What a task report (or its absence) calls for beyond the job itself.
#[derive(Debug, PartialEq)]
pub enum Next {
    /// Restart from the latest checkpoint, or fail when the error is not retryable or the job is
    /// out of restarts.
    Restart { why: String, retryable: bool },
    /// Fail for good.
    Fail(String),
    /// Move to this state, for this cause.
    Become(JobState, String),
    /// Every task of the attempt was reported: the job runs on (and may have finished meanwhile).
    Adopted(String),
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

/// A client waiting for a savepoint of the job.
pub struct SavepointWaiter {
    pub then: AfterSavepoint,
    pub reply: oneshot::Sender<Result<SavepointDone, CoordinatorError>>,
}

/// An order for a source (a backfill) waiting for a completed checkpoint to hold it: it goes with
/// every checkpoint triggered from `sent_in` on (sources ignore repeats), and is answered once
/// one of those completes.
pub struct SourceRequestWaiter {
    pub request: SourceRequest,
    /// The first checkpoint that carried it.
    pub sent_in: Option<u64>,
    pub reply: oneshot::Sender<Result<BackfillResponse, CoordinatorError>>,
}

/// A task of the current attempt, as its worker last reported it.
pub struct TaskRecord {
    pub worker_id: String,
    pub state: TaskState,
    pub metrics: TaskMetrics,
    pub error: String,
}

impl TaskRecord {
    fn new(worker_id: &str, state: TaskState) -> TaskRecord {
        TaskRecord {
            worker_id: worker_id.to_string(),
            state,
            metrics: TaskMetrics { watermark_ms: i64::MIN, ..Default::default() },
            error: String::new(),
        }
    }

    fn stopped(&self) -> bool {
        matches!(self.state, TaskState::Finished | TaskState::Failed | TaskState::Cancelled)
    }
}

pub struct Job {
    pub id: String,
    pub name: String,
    pub spec: String,
    /// Parallelism set by a rescale, replacing the spec's default.
    pub parallelism: Option<u32>,
    pub plan: Arc<Plan>,
    pub state: JobState,
    pub cause: String,
    pub attempt: u64,
    pub submitted_at_ms: i64,
    state_changed_at_ms: i64,
    running_since_ms: i64,
    pub finished_at_ms: i64,
    pub history: Vec<Transition>,
    /// Slot `i` of the job (subtask `i` of every vertex) runs on `slots[i]`; empty while restarting.
    pub slots: Vec<String>,
    pub tasks: BTreeMap<TaskId, TaskRecord>,
    pub checkpoints: CheckpointTracker,
    /// State to start from when no checkpoint of this job exists yet (a savepoint it was submitted from).
    pub initial_restore: Option<Arc<CheckpointManifest>>,
    /// The savepoint `initial_restore` came from when the job was submitted from one (kept in the
    /// metadata, so a coordinator restart before the first checkpoint still restores it).
    pub from_savepoint: Option<String>,
    /// Restarts after failures, in total and in a row.
    pub restarts: u32,
    pub failures_in_row: u32,
    /// When the next restart attempt is due, while restarting.
    pub restart_at: Option<Instant>,
    /// Since when the current attempt has been running.
    running_since: Option<Instant>,
    /// How long a restart waits for the old attempt's tasks to stop.
    stop_deadline: Option<Instant>,
    /// Workers of the attempt before the current one.
    previous_workers: Vec<String>,
    /// Set while a coordinator that just started (or just became the leader) collects the running
    /// tasks of the job's attempt from the workers' heartbeats: by then it adopts them, or
    /// restarts the job.
    pub adopt_until: Option<Instant>,
    pub savepoint_waiters: Vec<SavepointWaiter>,
    pub source_requests: Vec<SourceRequestWaiter>,
    /// Checkpoints in the metadata whose manifest could not be read at start: they stay in the
    /// metadata (a later start may read them), and while there are any no shared state file of
    /// the job is deleted (one of them may need it).
    pub unreadable: Vec<CheckpointRecord>,
}

impl Job {
    /// A job just planned, in state `created`, attempt 1.
    pub fn new(id: &str, spec: String, parallelism: Option<u32>, plan: Plan, config: &CoordinatorConfig, now: Instant) -> Job {
        let at = now_ms();
        let interval = plan.state.checkpoint_interval_ms.map(Duration::from_millis);
        let checkpoints = CheckpointTracker::new(id, interval, config.checkpoint_timeout, config.retained_checkpoints, now);
        Job {
            id: id.to_string(),
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
            source_requests: Vec::new(),
            unreadable: Vec::new(),
        }
    }

    /// A job from the metadata, as a coordinator that starts (or starts leading) takes it on:
    /// deployed jobs are adopted from the workers' reports, jobs between attempts restart, a
    /// cancel under way is complete.
    pub fn resumed(r: &JobRecord, plan: Plan, kept: Vec<Completed>, config: &CoordinatorConfig, now: Instant) -> Job {
        let state = match r.state {
            // A cancel was under way: its tasks stop within their lease (and are told to when
            // their workers report them), so the cancel is complete.
            JobState::Cancelled | JobState::Cancelling => JobState::Cancelled,
            JobState::Failed => JobState::Failed,
            JobState::Finished => JobState::Finished,
            // Deployed: its tasks run on through the coordinator's change; adopt them.
            JobState::Scheduling | JobState::Running => r.state,
            JobState::Created | JobState::Restarting => JobState::Restarting,
        };
        let mut job = Job::new(&r.job_id, r.spec.clone(), r.parallelism, plan, config, now);
        // Ids are recorded as checkpoints start; one more is skipped for metadata written when
        // they were recorded as checkpoints ended, whose stored id the last checkpoint triggered
        // before the stop may have had: files an old attempt still uploads under it must never
        // mix with a new checkpoint's.
        job.checkpoints.resume(r.next_checkpoint_id + 1, kept);
        job.attempt = r.attempt;
        job.restarts = r.restarts;
        job.submitted_at_ms = r.submitted_at_ms;
        job.from_savepoint = r.from_savepoint.clone();
        job.state = state;
        job.cause = match state {
            JobState::Scheduling | JobState::Running => {
                job.adopt_until = Some(now + ADOPT_WAIT);
                job.running_since = Some(now);
                format!("the coordinator changed; adopting the running tasks of attempt {}", r.attempt)
            }
            JobState::Restarting => {
                // Give workers a moment to reconnect before the first placement attempt.
                job.restart_at = Some(now + Duration::from_secs(1));
                let from = job.checkpoints.latest().map(|c| format!("checkpoint {}", c.id)).unwrap_or_else(|| "the start".into());
                format!("coordinator restarted; resuming from {from}")
            }
            _ if r.state == JobState::Cancelling => "cancelled; the coordinator restarted while its tasks stopped".into(),
            _ => r.cause.clone(),
        };
        job.history = vec![Transition { at_ms: now_ms(), from: String::new(), to: job.state.to_string(), cause: job.cause.clone() }];
        job
    }

    /// Its durable part, as recorded when it is submitted.
    pub fn record(&self) -> JobRecord {
        JobRecord {
            job_id: self.id.clone(),
            spec: self.spec.clone(),
            parallelism: self.parallelism,
            attempt: self.attempt,
            state: self.state,
            cause: self.cause.clone(),
            submitted_at_ms: self.submitted_at_ms,
            next_checkpoint_id: self.checkpoints.next_id(),
            restarts: self.restarts,
            from_savepoint: self.from_savepoint.clone(),
            checkpoints: self.checkpoints.kept().iter().map(checkpoint_record).chain(self.unreadable.iter().cloned()).collect(),
        }
    }

    /// Moves to `to` for `cause`: false (and nothing changes) when it is there already or `to`
    /// may not follow. Ending aborts the checkpoint in flight and answers waiting savepoints.
    pub fn move_to(&mut self, to: JobState, cause: &str) -> bool {
        let from = self.state;
        if from == to {
            return false;
        }
        if !from.can_become(to) {
            warn!(job_id = %self.id, %from, %to, cause, "ignored impossible job state change");
            return false;
        }
        let now = now_ms();
        info!(job_id = %self.id, attempt = self.attempt, %from, %to, cause, "job state changed");
        self.state = to;
        self.cause = cause.to_string();
        self.state_changed_at_ms = now;
        if to == JobState::Running {
            self.running_since_ms = now;
            self.running_since = Some(Instant::now());
        }
        if to.is_terminal() {
            self.finished_at_ms = now;
            self.restart_at = None;
            self.checkpoints.abort(&format!("the job is {to}"), Instant::now());
            for w in self.savepoint_waiters.drain(..) {
                let _ =
                    w.reply.send(Err(CoordinatorError::Aborted(format!("the job became {to} before the savepoint completed: {cause}"))));
            }
            for w in self.source_requests.drain(..) {
                let _ = w.reply.send(Err(CoordinatorError::Aborted(format!(
                    "the job became {to} before a checkpoint held the backfill: {cause}; nothing was re-read"
                ))));
            }
        }
        self.history.push(Transition { at_ms: now, from: from.to_string(), to: to.to_string(), cause: cause.to_string() });
        // The first entry (the submission) and the latest ones are kept.
        if self.history.len() > HISTORY_KEPT {
            let extra = self.history.len() - HISTORY_KEPT;
            self.history.drain(1..=extra);
        }
        true
    }

    /// Places the next attempt's tasks on `slots` (subtask `i` of every vertex on slot `i`).
    pub fn place_on(&mut self, slots: Vec<String>) {
        self.tasks = self
            .plan
            .tasks()
            .into_iter()
            .map(|t| {
                let record = TaskRecord::new(&slots[t.subtask as usize], TaskState::Deploying);
                (t, record)
            })
            .collect();
        self.slots = slots;
    }

    /// The orders that deploy the current attempt, restoring its latest checkpoint (or the state
    /// it was submitted with); `address` gives a worker's data address.
    pub fn deploy(&mut self, checkpoint_storage: &str, address: impl Fn(&str) -> String) -> Orders {
        self.checkpoints.restart_interval(Instant::now());
        let restore = self.checkpoints.latest().map(|c| c.manifest.clone()).or_else(|| self.initial_restore.clone());
        let placement: HashMap<String, String> = self.tasks.iter().map(|(t, r)| (t.to_string(), address(&r.worker_id))).collect();
        let mut per_worker: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (t, r) in &self.tasks {
            per_worker.entry(r.worker_id.as_str()).or_default().push(t.to_string());
        }
        let plan_fingerprint = self.plan.fingerprint();
        let orders = per_worker.into_iter().map(|(worker_id, task_ids)| {
            let deploy = DeployTasks {
                job_id: self.id.clone(),
                attempt: self.attempt,
                spec: self.spec.clone(),
                placement: placement.clone(),
                task_ids,
                checkpoint_storage: checkpoint_storage.to_string(),
                restore: restore.as_deref().cloned(),
                parallelism: self.parallelism.unwrap_or(0),
                plan_fingerprint,
            };
            (worker_id.to_string(), Order::Deploy(deploy))
        });
        Orders(orders.collect())
    }

    /// Orders to the workers running the job to stop its tasks; with `release`, the job ends for
    /// good and its sources release what they hold upstream.
    pub fn stop(&self, release: bool) -> Orders {
        let order = CancelJob { job_id: self.id.clone(), attempt: self.attempt, release };
        Orders::to_each(&self.slots, Order::Cancel(order))
    }

    /// Stops the current attempt before a new one: the orders to send, and the next attempt waits
    /// (a while) for its tasks to report that they stopped.
    pub fn stop_for_restart(&mut self, now: Instant) -> Orders {
        let orders = self.stop(false);
        self.previous_workers = std::mem::take(&mut self.slots);
        self.stop_deadline = Some(now + STOP_WAIT);
        orders
    }

    /// Whether every task of the current attempt has stopped (or its worker is gone), so that a
    /// new attempt cannot meet an old one writing to the same place.
    pub fn all_stopped(&self) -> bool {
        self.tasks.values().all(TaskRecord::stopped)
    }

    /// Whether every task of the current attempt reached the end of its input.
    pub fn all_finished(&self) -> bool {
        self.tasks.values().all(|t| t.state == TaskState::Finished)
    }

    /// Whether a new attempt must still wait for the old one's tasks to stop.
    pub fn waits_for_old_tasks(&self, now: Instant) -> bool {
        !self.all_stopped() && self.stop_deadline.is_some_and(|d| now < d)
    }

    /// How long to wait before the next restart after a failure, counting it; `Err` with the
    /// restarts in a row when the job is out of them.
    pub fn count_failure(&mut self, config: &CoordinatorConfig, now: Instant) -> Result<Duration, u32> {
        // A job that takes checkpoints is healthy again once an attempt completes one (restored
        // and made progress: see `Coordinator::manifest_stored`); "running" alone is reported at deploy,
        // before the restore, so a restore that always fails after a minute would restart for ever.
        if !self.checkpoints.enabled() && self.running_since.is_some_and(|t| now.duration_since(t) >= Duration::from_secs(60)) {
            self.failures_in_row = 0;
        }
        if self.failures_in_row >= config.max_restarts {
            return Err(self.failures_in_row);
        }
        let backoff = config.restart_backoff.saturating_mul(1 << self.failures_in_row.min(16)).min(config.max_restart_backoff);
        self.failures_in_row += 1;
        self.restarts += 1;
        self.running_since = None;
        self.adopt_until = None;
        self.restart_at = Some(now + backoff);
        Ok(backoff)
    }

    /// Starts a checkpoint (or a waiting savepoint) when one is due and every task is running:
    /// its id and the orders that trigger it at the sources.
    pub fn trigger(&mut self, now: Instant) -> Option<(u64, Orders)> {
        let savepoint = !self.savepoint_waiters.is_empty();
        if self.state != JobState::Running || self.adopt_until.is_some() || self.checkpoints.pending().is_some() {
            return None;
        }
        if !(savepoint || self.checkpoints.due(now)) || !self.tasks.values().all(|t| t.state == TaskState::Running) {
            return None;
        }
        let tasks = self.tasks.keys().map(|t| t.to_string()).collect();
        let id = self.checkpoints.trigger(now, now_ms(), self.attempt, tasks, savepoint);
        debug!(job_id = %self.id, checkpoint = id, savepoint, "triggering checkpoint");
        let mut requests = Vec::new();
        for w in &mut self.source_requests {
            w.sent_in.get_or_insert(id);
            requests.push(w.request.clone());
        }
        let order = TriggerCheckpoint { job_id: self.id.clone(), attempt: self.attempt, checkpoint_id: id, requests };
        let sources = self.tasks.iter().filter(|(t, _)| self.plan.is_source_vertex(t.vertex)).map(|(_, r)| &r.worker_id);
        Some((id, Orders::to_each(sources, Order::TriggerCheckpoint(order))))
    }

    /// Orders telling the job's workers that checkpoint `id` is complete (and recorded): sources
    /// confirm its positions upstream, sinks commit what they staged.
    pub fn checkpoint_done(&self, id: u64) -> Orders {
        let order = CheckpointDone { job_id: self.id.clone(), attempt: self.attempt, checkpoint_id: id };
        Orders::to_each(&self.slots, Order::CheckpointDone(order))
    }

    /// Checkpoint `id` completed: the source orders it carried are held, and answered.
    pub fn source_requests_held(&mut self, id: u64) {
        let (held, waiting) = std::mem::take(&mut self.source_requests).into_iter().partition(|w| w.sent_in.is_some_and(|s| s <= id));
        self.source_requests = waiting;
        for w in held {
            let r = w.request;
            let _ = w.reply.send(Ok(BackfillResponse { backfill_id: r.id, source: r.source, checkpoint_id: id }));
        }
    }

    /// Answers every waiting savepoint with `cause`; the job runs on.
    pub fn savepoint_failed(&mut self, cause: &str) {
        for w in self.savepoint_waiters.drain(..) {
            let _ = w.reply.send(Err(CoordinatorError::Aborted(format!("savepoint failed: {cause}; the job keeps running, try again"))));
        }
    }

    /// Whether a task of `attempt` is one no longer wanted: the job's attempt is newer, or it is
    /// being replaced (its worker was declared lost and came back with it running), or the job
    /// ended or is being cancelled.
    pub fn no_longer_runs(&self, attempt: u64) -> bool {
        let replaced = self.state == JobState::Restarting && attempt == self.attempt;
        attempt < self.attempt || replaced || self.state.is_terminal() || self.state == JobState::Cancelling
    }

    /// Takes a report of a task of the current attempt from `worker_id`.
    pub fn report(&mut self, worker_id: &str, u: &TaskUpdate, task: TaskId, heartbeat: bool) -> Option<Next> {
        // Fencing: reports from a worker the task is not placed on are stale.
        let record = self.tasks.get_mut(&task).filter(|r| r.worker_id == worker_id)?;
        if let Some(m) = &u.metrics {
            record.metrics = m.clone();
        }
        let mut state = TaskState::try_from(u.state).unwrap_or(TaskState::Unspecified);
        // While cancelling, tasks fail as their peers vanish: that is the cancel, not a failure.
        if self.state == JobState::Cancelling && state == TaskState::Failed {
            state = TaskState::Cancelled;
        }
        // A heartbeat says "still running"; it must not undo a final state reported before it.
        if heartbeat && record.stopped() {
            return None;
        }
        record.state = state;
        if !u.error.is_empty() {
            record.error = u.error.clone();
        }
        let all = |s: &[TaskState]| self.tasks.values().all(|r| s.contains(&r.state));
        let failed = || format!("task {task} failed on worker {worker_id}: {}", u.error);
        match (self.state, state) {
            (JobState::Scheduling | JobState::Running, TaskState::Failed) => Some(Next::Restart { why: failed(), retryable: u.retryable }),
            (_, TaskState::Failed) if !self.state.is_terminal() && self.state != JobState::Restarting => Some(Next::Fail(failed())),
            (JobState::Scheduling, TaskState::Running) if all(&[TaskState::Running, TaskState::Finished]) => {
                Some(Next::Become(JobState::Running, format!("all {} tasks running", self.tasks.len())))
            }
            (JobState::Scheduling | JobState::Running, TaskState::Finished) if all(&[TaskState::Finished]) => {
                Some(Next::Become(JobState::Finished, "every task reached the end of its input".into()))
            }
            (JobState::Cancelling, _) if all(&[TaskState::Cancelled, TaskState::Finished, TaskState::Failed]) => {
                Some(Next::Become(JobState::Cancelled, "all tasks stopped".into()))
            }
            _ => None,
        }
    }

    /// Takes a report of a task of the attempt being adopted; once every task of the attempt is
    /// reported running (or finished), the job is adopted: it runs on, same attempt, no restart.
    pub fn adopt(&mut self, worker_id: &str, u: &TaskUpdate, task: TaskId) -> Option<Next> {
        let state = TaskState::try_from(u.state).unwrap_or(TaskState::Unspecified);
        if !self.plan.tasks().contains(&task) {
            // Another shape of the job (a rescale the change interrupted): not this attempt's.
            return Some(self.not_adopted(format!("worker {worker_id} runs task {task}, which the job's plan does not have"), true));
        }
        let record = self.tasks.entry(task).or_insert_with(|| TaskRecord::new(worker_id, state));
        record.worker_id = worker_id.to_string();
        record.state = state;
        record.error = u.error.clone();
        if let Some(m) = &u.metrics {
            record.metrics = m.clone();
        }
        if state == TaskState::Failed {
            let why = format!("task {task} failed on worker {worker_id} while the coordinator changed: {}", u.error);
            return Some(self.not_adopted(why, u.retryable));
        }
        let reported = self.tasks.values().filter(|t| matches!(t.state, TaskState::Running | TaskState::Finished)).count();
        if reported < self.plan.tasks().len() {
            return None;
        }
        // Slot `i` is the worker running subtask `i` of every vertex; a placement that does not
        // fit that shape is not one this coordinator can carry on.
        let mut slots = vec![String::new(); self.plan.slots_needed() as usize];
        for (t, r) in &self.tasks {
            let slot = &mut slots[t.subtask as usize];
            if slot.is_empty() {
                *slot = r.worker_id.clone();
            } else if *slot != r.worker_id {
                return Some(self.not_adopted("the reported tasks do not fit one placement".into(), true));
            }
        }
        self.slots = slots;
        self.adopt_until = None;
        info!(job_id = %self.id, attempt = self.attempt, tasks = self.tasks.len(), "job adopted");
        Some(Next::Adopted(format!(
            "adopted the {} running tasks of attempt {} after the coordinator changed",
            self.tasks.len(),
            self.attempt
        )))
    }

    /// Not every task of the attempt was reported in time: what that calls for.
    pub fn adoption_timed_out(&mut self) -> Next {
        let why = format!(
            "the coordinator changed and {} of the attempt's {} tasks were reported running within {} s",
            self.tasks.values().filter(|t| t.state == TaskState::Running).count(),
            self.plan.tasks().len(),
            ADOPT_WAIT.as_secs()
        );
        self.not_adopted(why, true)
    }

    /// Gives up adopting: the job restarts, and the workers that reported tasks are the ones told
    /// to stop them.
    fn not_adopted(&mut self, why: String, retryable: bool) -> Next {
        self.adopt_until = None;
        let workers: BTreeSet<String> = self.tasks.values().map(|t| t.worker_id.clone()).collect();
        self.slots = workers.into_iter().collect();
        warn!(job_id = %self.id, why, "not adopting the job's tasks");
        Next::Restart { why, retryable }
    }

    /// `worker_id` was lost for `cause`: its tasks are gone with it. A job that failed or
    /// restarted a moment ago because its tasks lost their exchange with this worker before its
    /// control stream broke gets the root cause named. True if the job holds slots there.
    pub fn worker_lost(&mut self, worker_id: &str, cause: &str, now_ms: i64) -> bool {
        for t in self.tasks.values_mut().filter(|t| t.worker_id == worker_id && !t.stopped()) {
            t.state = TaskState::Failed;
            t.error = format!("worker lost: {cause}");
        }
        let ran_there = self.slots.iter().chain(&self.previous_workers).any(|s| s == worker_id);
        let last = self.history.iter_mut().rev().find(|h| h.to == "failed" || h.to == "restarting");
        if let Some(last) = last.filter(|l| ran_there && now_ms - l.at_ms < 5_000 && !l.cause.contains(&format!("worker {worker_id} lost")))
        {
            last.cause = format!("worker {worker_id} lost: {cause} (first seen as: {})", last.cause);
            if matches!(self.state, JobState::Failed | JobState::Restarting) {
                self.cause = last.cause.clone();
            }
        }
        self.state.holds_slots() && self.slots.iter().any(|s| s == worker_id)
    }

    /// The job ended for good (cancelled or finished): nothing restores from its checkpoints
    /// again, so their files go; its savepoints' stay.
    pub fn release_checkpoints(&mut self, storage: Option<CheckpointStore>, now_ms: i64) {
        let released: Vec<u64> = self.checkpoints.release_checkpoints().iter().map(|c| c.id).collect();
        if let Some(storage) = storage {
            let kept: Vec<Arc<CheckpointManifest>> = self.checkpoints.kept().iter().map(|c| c.manifest.clone()).collect();
            let shared = self.shared_gc(u64::MAX, now_ms);
            let id = self.id.clone();
            tokio::spawn(async move { storage.release(&id, released, kept, shared).await });
        }
        self.unreadable.retain(|c| c.savepoint);
    }

    /// What a collection may delete of the job's shared state files: those of checkpoints up to
    /// `checkpoint` (or, in the older layout, older than `before_ms`), or none while a checkpoint
    /// of the job could not be read.
    pub fn shared_gc(&self, checkpoint: u64, before_ms: i64) -> SharedGc {
        if self.unreadable.is_empty() {
            SharedGc::Through { checkpoint, before_ms }
        } else {
            SharedGc::Keep
        }
    }

    /// One line about it, for `eddy jobs`.
    pub fn summary(&self) -> JobSummary {
        JobSummary {
            job_id: self.id.clone(),
            name: self.name.clone(),
            state: self.state.to_string(),
            attempt: self.attempt,
            submitted_at_ms: self.submitted_at_ms,
            state_changed_at_ms: self.state_changed_at_ms,
            cause: self.cause.clone(),
            tasks: self.tasks.len() as u32,
        }
    }

    /// All about it, for `eddy status`.
    pub fn status(&self) -> JobStatusResponse {
        let tasks = self
            .tasks
            .iter()
            .map(|(t, r)| TaskView {
                task_id: t.to_string(),
                operators: self.plan.vertex_label(t.vertex),
                subtask: t.subtask,
                parallelism: self.plan.vertices[t.vertex].parallelism,
                worker_id: r.worker_id.clone(),
                state: task_state_name(r.state).to_string(),
                metrics: Some(r.metrics.clone()),
                error: r.error.clone(),
            })
            .collect();
        JobStatusResponse {
            job: Some(self.summary()),
            tasks,
            history: self.history.clone(),
            running_since_ms: self.running_since_ms,
            finished_at_ms: self.finished_at_ms,
            checkpoints: self.checkpoints.views(),
            restarts: self.restarts,
            edges: self
                .plan
                .edges
                .iter()
                .map(|e| GraphEdge {
                    from: self.plan.vertex_label(e.from),
                    to: self.plan.vertex_label(e.to),
                    partition: e.partition.name().to_string(),
                    late: e.port == Port::Late,
                })
                .collect(),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actor::tests::SPEC;

    fn job() -> Job {
        let plan = eddy_jobs::compile(SPEC).unwrap();
        let mut job = Job::new("j", SPEC.into(), None, plan, &CoordinatorConfig::default(), Instant::now());
        job.place_on(["a", "b", "a", "b"].map(String::from).to_vec());
        job
    }

    fn update(task: &TaskId, state: TaskState) -> TaskUpdate {
        TaskUpdate { job_id: "j".into(), attempt: 1, task_id: task.to_string(), state: state as i32, retryable: true, ..Default::default() }
    }

    /// Deploy sends each worker its own tasks with the whole placement; a stop goes once to each.
    #[test]
    fn deploy_and_stop_orders_go_to_the_placed_workers() {
        let mut job = job();
        let orders: Vec<(String, Order)> = job.deploy("/ckpt", |w| format!("{w}:1")).into_iter().collect();
        assert_eq!(orders.iter().map(|(w, _)| w.as_str()).collect::<Vec<_>>(), ["a", "b"]);
        for (worker, order) in &orders {
            let Order::Deploy(d) = order else { panic!("{order:?}") };
            let placed_here = job.tasks.iter().filter(|(_, r)| &r.worker_id == worker).map(|(t, _)| t.to_string());
            assert_eq!(d.task_ids, placed_here.collect::<Vec<_>>());
            assert!(d.task_ids.iter().all(|t| d.placement[t] == format!("{worker}:1")), "{d:?}");
            assert_eq!(d.placement.len(), job.tasks.len());
        }
        let stops: Vec<String> = job.stop(true).into_iter().map(|(w, _)| w).collect();
        assert_eq!(stops, ["a", "b"]);
    }

    /// Reports move the job: all running, then a failure asks for a restart; a report from a
    /// worker the task is not placed on is ignored.
    #[test]
    fn reports_say_what_follows() {
        let mut job = job();
        assert!(job.move_to(JobState::Scheduling, "deploying"));
        let tasks: Vec<(TaskId, String)> = job.tasks.iter().map(|(t, r)| (*t, r.worker_id.clone())).collect();
        let (first, elsewhere) = (&tasks[0].0, if tasks[0].1 == "a" { "b" } else { "a" });
        assert_eq!(job.report(elsewhere, &update(first, TaskState::Failed), *first, false), None, "fenced");
        let mut next = None;
        for (t, w) in &tasks {
            next = job.report(w, &update(t, TaskState::Running), *t, false);
        }
        assert_eq!(next, Some(Next::Become(JobState::Running, format!("all {} tasks running", tasks.len()))));
        job.move_to(JobState::Running, "all running");
        let (t, w) = &tasks[1];
        let next = job.report(w, &TaskUpdate { error: "boom".into(), ..update(t, TaskState::Failed) }, *t, false);
        assert!(matches!(next, Some(Next::Restart { retryable: true, ref why }) if why.contains("boom")), "{next:?}");
        // A heartbeat saying "running" does not undo the failure.
        assert_eq!(job.report(w, &update(t, TaskState::Running), *t, true), None);
        assert_eq!(job.tasks[t].state, TaskState::Failed);
    }
}
