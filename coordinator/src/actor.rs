//! The coordinator's single owner of state. Requests arrive on a channel (from gRPC handlers and
//! worker streams) and are handled one at a time; a timer drives the failure detector.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use eddy_jobs::{Plan, TaskId};
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::{
    CancelJob, CoordinatorMessage, DeployTasks, JobStatusResponse, JobSummary, TaskMetrics, TaskState, TaskUpdate,
    TaskView, Transition, WorkerView,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use tracing::{info, warn};

use crate::state::JobState;
use crate::CoordinatorConfig;

/// Orders to one worker's control stream.
pub type WorkerSender = mpsc::Sender<Result<CoordinatorMessage, Status>>;

/// What the actor is asked to do.
pub enum Request {
    /// Validate, plan and schedule a spec.
    Submit { spec: String, reply: oneshot::Sender<Result<String, Status>> },
    /// All jobs.
    ListJobs { reply: oneshot::Sender<Vec<JobSummary>> },
    /// One job in detail.
    JobStatus { job_id: String, reply: oneshot::Sender<Result<JobStatusResponse, Status>> },
    /// Cancel a job.
    Cancel { job_id: String, reply: oneshot::Sender<Result<String, Status>> },
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
}

struct Worker {
    data_address: String,
    slots: u32,
    session: u64,
    orders: WorkerSender,
    last_heartbeat: Instant,
    last_heartbeat_ms: i64,
    lost: Option<String>,
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
    plan: Arc<Plan>,
    state: JobState,
    cause: String,
    attempt: u64,
    submitted_at_ms: i64,
    state_changed_at_ms: i64,
    running_since_ms: i64,
    finished_at_ms: i64,
    history: Vec<Transition>,
    /// Slot `i` of the job (subtask `i` of every vertex) runs on `slots[i]`.
    slots: Vec<String>,
    tasks: BTreeMap<TaskId, TaskRecord>,
}

/// The coordinator's state and its loop.
pub struct Coordinator {
    config: CoordinatorConfig,
    requests: mpsc::Receiver<Request>,
    workers: BTreeMap<String, Worker>,
    jobs: BTreeMap<String, Job>,
    next_session: u64,
}

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl Coordinator {
    /// A coordinator reading `requests`.
    pub fn new(config: CoordinatorConfig, requests: mpsc::Receiver<Request>) -> Coordinator {
        Coordinator { config, requests, workers: BTreeMap::new(), jobs: BTreeMap::new(), next_session: 1 }
    }

    /// Handles requests until shutdown.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut detector = tokio::time::interval(Duration::from_millis(250));
        loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                // The failure detector: workers silent past the timeout are lost.
                _ = detector.tick() => self.check_heartbeats(),
                request = self.requests.recv() => match request {
                    Some(r) => self.handle(r),
                    None => break,
                },
            }
        }
    }

    fn handle(&mut self, request: Request) {
        match request {
            Request::Submit { spec, reply } => {
                let _ = reply.send(self.submit(spec));
            }
            Request::ListJobs { reply } => {
                let _ = reply.send(self.jobs.iter().map(|(id, j)| summary(id, j)).collect());
            }
            Request::JobStatus { job_id, reply } => {
                let _ = reply.send(self.status(&job_id));
            }
            Request::Cancel { job_id, reply } => {
                let _ = reply.send(self.cancel(&job_id));
            }
            Request::ListWorkers { reply } => {
                let _ = reply.send(self.worker_views());
            }
            Request::Register { worker_id, slots, data_address, orders, reply } => {
                let session = self.next_session;
                self.next_session += 1;
                if let Some(old) = self.workers.get(&worker_id) {
                    if old.lost.is_none() {
                        self.worker_lost(&worker_id, "it registered again (restarted?)".into());
                    }
                }
                info!(%worker_id, slots, %data_address, session, "worker registered");
                self.workers.insert(
                    worker_id,
                    Worker { data_address, slots, session, orders, last_heartbeat: Instant::now(), last_heartbeat_ms: now_ms(), lost: None },
                );
                let _ = reply.send(session);
            }
            Request::Heartbeat { worker_id, session, tasks } => {
                if !self.touch(&worker_id, session) {
                    return;
                }
                for t in tasks {
                    self.task_update(&worker_id, t, true);
                }
            }
            Request::TaskUpdate { worker_id, session, update } => {
                if self.touch(&worker_id, session) {
                    self.task_update(&worker_id, update, false);
                }
            }
            Request::Disconnected { worker_id, session, cause } => {
                if self.workers.get(&worker_id).is_some_and(|w| w.session == session && w.lost.is_none()) {
                    self.worker_lost(&worker_id, cause);
                }
            }
        }
    }

    /// Records a sign of life; false for a stale session or a worker already declared lost.
    fn touch(&mut self, worker_id: &str, session: u64) -> bool {
        match self.workers.get_mut(worker_id) {
            Some(w) if w.session == session && w.lost.is_none() => {
                w.last_heartbeat = Instant::now();
                w.last_heartbeat_ms = now_ms();
                true
            }
            _ => false,
        }
    }

    fn check_heartbeats(&mut self) {
        let timeout = self.config.heartbeat_timeout;
        let silent: Vec<(String, Duration)> = self
            .workers
            .iter()
            .filter(|(_, w)| w.lost.is_none() && w.last_heartbeat.elapsed() > timeout)
            .map(|(id, w)| (id.clone(), w.last_heartbeat.elapsed()))
            .collect();
        for (id, silence) in silent {
            self.worker_lost(&id, format!("no heartbeat for {:.1} s", silence.as_secs_f64()));
        }
    }

    fn worker_lost(&mut self, worker_id: &str, cause: String) {
        let Some(w) = self.workers.get_mut(worker_id) else { return };
        warn!(%worker_id, %cause, "worker lost");
        w.lost = Some(cause.clone());
        // Closing the stream tells a live-but-partitioned worker to drop its tasks and re-register.
        let _ = w.orders.try_send(Err(Status::unavailable(format!("declared lost: {cause}"))));
        let affected: Vec<String> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.state.holds_slots() && j.slots.iter().any(|s| s == worker_id))
            .map(|(id, _)| id.clone())
            .collect();
        // A job may have failed a moment ago because its tasks lost their exchange with this worker
        // before its control stream broke: name the root cause there too.
        let now = now_ms();
        for job in self.jobs.values_mut().filter(|j| {
            j.state == JobState::Failed && now - j.state_changed_at_ms < 5_000 && j.slots.iter().any(|s| s == worker_id)
        }) {
            job.cause = format!("worker {worker_id} lost: {cause} (first seen as: {})", job.cause);
        }
        for job_id in affected {
            let why = format!("worker {worker_id} lost: {cause}");
            if self.jobs[&job_id].state == JobState::Cancelling {
                self.transition(&job_id, JobState::Cancelled, &format!("cancelled; {why}"));
            } else {
                // Restarting from checkpoints comes with checkpoints; until then a lost worker fails the job.
                self.fail(&job_id, &why);
            }
        }
    }

    fn submit(&mut self, spec: String) -> Result<String, Status> {
        let plan = eddy_jobs::compile(&spec).map_err(|e| Status::invalid_argument(format!("invalid job spec: {e}")))?;
        let needed = plan.slots_needed() as usize;
        let slots = self.place(needed).ok_or_else(|| {
            let free: u32 = self.free_slots().values().sum();
            let alive = self.workers.values().filter(|w| w.lost.is_none()).count();
            Status::resource_exhausted(format!(
                "job `{}` needs {needed} slots (its largest parallelism) but the cluster has {free} free on {alive} live workers; \
                 start more workers, give them more --slots, or lower the job's parallelism",
                plan.name
            ))
        })?;
        let job_id = format!("job-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let now = now_ms();
        let tasks = plan
            .tasks()
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
            .collect();
        let job = Job {
            name: plan.name.clone(),
            spec,
            plan: Arc::new(plan),
            state: JobState::Created,
            cause: "submitted".into(),
            attempt: 1,
            submitted_at_ms: now,
            state_changed_at_ms: now,
            running_since_ms: 0,
            finished_at_ms: 0,
            history: vec![Transition { at_ms: now, from: String::new(), to: JobState::Created.to_string(), cause: "submitted".into() }],
            slots,
            tasks,
        };
        info!(job_id, name = %job.name, tasks = job.tasks.len(), slots = needed, "job created");
        self.jobs.insert(job_id.clone(), job);
        self.deploy(&job_id);
        Ok(job_id)
    }

    fn free_slots(&self) -> BTreeMap<String, u32> {
        let mut free: BTreeMap<String, u32> =
            self.workers.iter().filter(|(_, w)| w.lost.is_none()).map(|(id, w)| (id.clone(), w.slots)).collect();
        for job in self.jobs.values().filter(|j| j.state.holds_slots()) {
            for w in &job.slots {
                if let Some(f) = free.get_mut(w) {
                    *f = f.saturating_sub(1);
                }
            }
        }
        free
    }

    /// Picks `needed` free slots, spread across workers: one from each worker in turn (most free first).
    fn place(&self, needed: usize) -> Option<Vec<String>> {
        let mut free: Vec<(String, u32)> = self.free_slots().into_iter().filter(|(_, f)| *f > 0).collect();
        free.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        let mut picked = Vec::with_capacity(needed);
        while picked.len() < needed {
            let before = picked.len();
            for (id, f) in free.iter_mut().filter(|(_, f)| *f > 0) {
                if picked.len() == needed {
                    break;
                }
                picked.push(id.clone());
                *f -= 1;
            }
            if picked.len() == before {
                return None;
            }
        }
        Some(picked)
    }

    fn deploy(&mut self, job_id: &str) {
        let job = &self.jobs[job_id];
        let placement: HashMap<String, String> = job
            .tasks
            .iter()
            .map(|(t, r)| (t.to_string(), self.workers.get(&r.worker_id).map(|w| w.data_address.clone()).unwrap_or_default()))
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
                })),
            };
            let sent = self.workers.get(worker_id).map(|w| w.orders.try_send(Ok(order)).is_ok()).unwrap_or(false);
            if !sent {
                failed = Some(format!("could not reach worker {worker_id} to deploy tasks"));
            }
        }
        let tasks = self.jobs[job_id].tasks.len();
        self.transition(job_id, JobState::Scheduling, &format!("deploying {tasks} tasks"));
        if let Some(why) = failed {
            self.fail(job_id, &why);
        }
    }

    fn task_update(&mut self, worker_id: &str, u: TaskUpdate, heartbeat: bool) {
        let Ok(task) = u.task_id.parse::<TaskId>() else { return };
        let Some(job) = self.jobs.get_mut(&u.job_id) else { return };
        // Fencing: reports from another attempt, or from a worker the task is not placed on, are stale.
        if u.attempt != job.attempt {
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
            (_, TaskState::Failed) if !job.state.is_terminal() => {
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

    fn fail(&mut self, job_id: &str, why: &str) {
        self.stop_tasks(job_id);
        self.transition(job_id, JobState::Failed, why);
    }

    /// Tells every live worker running the job to stop its tasks.
    fn stop_tasks(&mut self, job_id: &str) {
        let Some(job) = self.jobs.get(job_id) else { return };
        let order = CancelJob { job_id: job_id.to_string(), attempt: job.attempt };
        let mut workers: Vec<&String> = job.slots.iter().collect();
        workers.dedup();
        for w in workers {
            if let Some(worker) = self.workers.get(w).filter(|w| w.lost.is_none()) {
                let _ = worker.orders.try_send(Ok(CoordinatorMessage { msg: Some(Order::Cancel(order.clone())) }));
            }
        }
    }

    fn cancel(&mut self, job_id: &str) -> Result<String, Status> {
        let state = self.jobs.get(job_id).ok_or_else(|| not_found(job_id))?.state;
        if state.is_terminal() {
            return Err(Status::failed_precondition(format!("job {job_id} is already {state}; nothing to cancel")));
        }
        if state != JobState::Cancelling {
            self.stop_tasks(job_id);
            self.transition(job_id, JobState::Cancelling, "cancel requested");
            let job = &self.jobs[job_id];
            let all_stopped = job.tasks.values().all(|r| matches!(r.state, TaskState::Cancelled | TaskState::Finished | TaskState::Failed));
            if all_stopped {
                self.transition(job_id, JobState::Cancelled, "all tasks stopped");
            }
        }
        Ok(self.jobs[job_id].state.to_string())
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
        }
        if to.is_terminal() {
            job.finished_at_ms = now;
        }
        job.history.push(Transition { at_ms: now, from: from.to_string(), to: to.to_string(), cause: cause.to_string() });
    }

    fn status(&self, job_id: &str) -> Result<JobStatusResponse, Status> {
        let job = self.jobs.get(job_id).ok_or_else(|| not_found(job_id))?;
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
        })
    }

    fn worker_views(&self) -> Vec<WorkerView> {
        let free = self.free_slots();
        self.workers
            .iter()
            .map(|(id, w)| WorkerView {
                worker_id: id.clone(),
                data_address: w.data_address.clone(),
                slots: w.slots,
                slots_used: w.slots - free.get(id).copied().unwrap_or(w.slots),
                state: match &w.lost {
                    None => "alive".to_string(),
                    Some(cause) => format!("lost: {cause}"),
                },
                last_heartbeat_ms: w.last_heartbeat_ms,
            })
            .collect()
    }
}

fn not_found(job_id: &str) -> Status {
    Status::not_found(format!("no job `{job_id}`; `eddy jobs` lists the jobs"))
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

#[cfg(test)]
mod tests {
    use super::*;

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

    struct Harness {
        coordinator: Coordinator,
        orders: HashMap<String, mpsc::Receiver<Result<CoordinatorMessage, Status>>>,
        sessions: HashMap<String, u64>,
    }

    impl Harness {
        fn new() -> Harness {
            let (_tx, rx) = mpsc::channel(1);
            Harness { coordinator: Coordinator::new(CoordinatorConfig::default(), rx), orders: HashMap::new(), sessions: HashMap::new() }
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
            self.coordinator.handle(Request::Submit { spec: spec.into(), reply });
            rx.try_recv().unwrap()
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

        fn state(&self, job: &str) -> JobState {
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

    #[test]
    fn tasks_failing_during_a_cancel_do_not_fail_the_job() {
        let mut h = Harness::new();
        h.register("a", 4);
        let job = h.submit(SPEC).unwrap();
        let (reply, _rx) = oneshot::channel();
        h.coordinator.handle(Request::Cancel { job_id: job.clone(), reply });
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

    #[tokio::test(start_paused = true)]
    async fn silent_worker_is_lost_and_fails_its_jobs() {
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
        assert_eq!(h.state(&job), JobState::Failed);
        let cause = &h.coordinator.jobs[&job].cause;
        assert!(cause.contains("worker b lost") && cause.contains("no heartbeat"), "{cause}");
        assert!(h.coordinator.workers["a"].lost.is_none());
        // The survivor is told to stop the job's tasks.
        assert!(h.coordinator.jobs[&job].cause.starts_with("worker b lost"));
        let cancels: Vec<_> = std::iter::from_fn(|| h.orders.get_mut("a").unwrap().try_recv().ok())
            .filter(|m| matches!(m, Ok(CoordinatorMessage { msg: Some(Order::Cancel(_)) })))
            .collect();
        assert_eq!(cancels.len(), 1);
    }
}
