//! The worker's side of the control plane: register with the coordinator, keep one stream open,
//! send heartbeats (carrying task metrics) on it, and run or cancel tasks as ordered. Orders carry
//! the job's attempt; an order for an older attempt than one already seen is ignored.
//!
//! When the stream breaks the worker reconnects with backoff, to whichever coordinator leads, and
//! its tasks run on: a new leader adopts them from the worker's heartbeats. They run on for the
//! lease ([`eddy_proto::WORKER_LEASE`]) after the last word from a leading coordinator (its orders
//! and renewals), then stop: a worker cut off never writes as a zombie next to a new attempt.
//!
//! Checkpoint orders are passed to the tasks: triggers to source tasks (which inject barriers),
//! completions to every task; tasks send their acks on the same stream themselves.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eddy_jobs::TaskId;
use eddy_proto::cluster_service_client::ClusterServiceClient;
use eddy_proto::coordinator_message::Msg as Order;
use eddy_proto::worker_message::Msg as Report;
use eddy_proto::{CoordinatorMessage, DeployTasks, Heartbeat, Register, TaskMetrics as WireMetrics, TaskState, TaskUpdate, WorkerMessage};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::checkpoint::Storage;
use crate::config::WorkerConfig;
use crate::error::TaskError;
use crate::exchange::{Inboxes, Peers};
use crate::metrics::TaskBoard;
use crate::operator::{SourceOrder, TaskMetrics};
use crate::task::{self, TaskCommand, TaskContext};

struct RunningJob {
    attempt: u64,
    cancel: CancellationToken,
    /// Set before `cancel` when the job ends for good (see `ConnectorContext::released`).
    released: Arc<AtomicBool>,
    tasks: HashMap<TaskId, RunningTask>,
}

struct RunningTask {
    metrics: Arc<TaskMetrics>,
    commands: mpsc::Sender<TaskCommand>,
    source: bool,
}

/// Checkpoint orders a task may have queued before it reads them.
const TASK_COMMANDS: usize = 16;

/// Owns the worker's job table; all changes go through its single loop.
pub struct Control {
    config: Arc<WorkerConfig>,
    inboxes: Inboxes,
    peers: Peers,
    jobs: HashMap<String, RunningJob>,
    /// The running tasks' figures, for `/metrics`.
    board: Arc<TaskBoard>,
    shutdown: CancellationToken,
    /// The data plane's runtime, where tasks run.
    tasks: tokio::runtime::Handle,
    /// The current session registered.
    registered: bool,
    /// When a leading coordinator last spoke on a session (the lease runs from there).
    renewed: tokio::time::Instant,
    /// Reports for the coordinator (task updates, checkpoint acks from the tasks), sent on
    /// whichever session is open; kept while none is.
    reports: mpsc::UnboundedSender<WorkerMessage>,
    reports_rx: Option<mpsc::UnboundedReceiver<WorkerMessage>>,
    /// Tasks that ended.
    done: mpsc::Sender<Finished>,
    done_rx: Option<mpsc::Receiver<Finished>>,
}

struct Finished {
    job_id: String,
    attempt: u64,
    task: TaskId,
    result: Option<crate::error::Result<()>>,
}

impl Control {
    /// A control loop for this worker.
    pub fn new(config: Arc<WorkerConfig>, inboxes: Inboxes, shutdown: CancellationToken, tasks: tokio::runtime::Handle) -> Control {
        let (reports, reports_rx) = mpsc::unbounded_channel();
        let (done, done_rx) = mpsc::channel(256);
        let peers = Peers::new(config.access.clone());
        Control {
            config,
            inboxes,
            peers,
            jobs: HashMap::new(),
            board: Arc::default(),
            shutdown,
            tasks,
            registered: false,
            renewed: tokio::time::Instant::now(),
            reports,
            reports_rx: Some(reports_rx),
            done,
            done_rx: Some(done_rx),
        }
    }

    /// The running tasks' figures, for `/metrics`.
    pub fn board(&self) -> Arc<TaskBoard> {
        self.board.clone()
    }

    /// Connects, serves one session, and reconnects until shutdown.
    pub async fn run(mut self) {
        let mut reports = self.reports_rx.take().expect("run once");
        let mut done = self.done_rx.take().expect("run once");
        let mut backoff = Duration::from_millis(200);
        let shutdown = self.shutdown.clone();
        'sessions: loop {
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                r = self.session(&mut reports, &mut done) => r,
            };
            // A session that registered was a working one: try again soon (another coordinator
            // may lead now), not after the backoff of earlier failures.
            if std::mem::take(&mut self.registered) {
                backoff = Duration::from_millis(200);
            }
            let Err(e) = result else { break };
            warn!(coordinator = %self.config.coordinator, error = %e, retry_in_ms = backoff.as_millis() as u64, tasks_run_on = !self.jobs.is_empty(), "control session ended; reconnecting");
            // Meanwhile the tasks run on, within the lease; those that end are reported later.
            let retry = tokio::time::Instant::now() + backoff;
            loop {
                self.check_lease();
                let lease_end = self.lease_end();
                tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => break 'sessions,
                    _ = tokio::time::sleep_until(retry) => break,
                    _ = tokio::time::sleep_until(lease_end), if !self.jobs.is_empty() => {}
                    Some(d) = done.recv() => self.finished(d),
                }
            }
            // With tasks running on, find the new leader quickly: the lease is short.
            let cap = if self.jobs.is_empty() { Duration::from_secs(2) } else { Duration::from_millis(400) };
            backoff = (backoff * 2).min(cap);
        }
        self.cancel_all("shutting down");
    }

    /// When the tasks' lease runs out unless a leading coordinator speaks before.
    fn lease_end(&self) -> tokio::time::Instant {
        self.renewed + eddy_proto::WORKER_LEASE
    }

    /// Stops every task once the lease has run out.
    fn check_lease(&mut self) {
        if !self.jobs.is_empty() && tokio::time::Instant::now() >= self.lease_end() {
            let why = format!("no word from a leading coordinator for {} s (the lease)", eddy_proto::WORKER_LEASE.as_secs());
            self.cancel_all(&why);
        }
    }

    fn cancel_all(&mut self, why: &str) {
        for (job_id, job) in self.jobs.drain() {
            info!(job_id, attempt = job.attempt, why, "cancelling job tasks");
            job.cancel.cancel();
            self.inboxes.remove(&job_id, job.attempt);
        }
    }

    async fn session(
        &mut self,
        reports: &mut mpsc::UnboundedReceiver<WorkerMessage>,
        done: &mut mpsc::Receiver<Finished>,
    ) -> anyhow::Result<()> {
        // Finding the leader and registering is bounded by the lease while tasks run (a worker
        // trying a coordinator that does not answer must still stop them in time), else by 10 s.
        let deadline = if self.jobs.is_empty() { tokio::time::Instant::now() + Duration::from_secs(10) } else { self.lease_end() };
        let (leader, tx, mut orders, interval) = tokio::time::timeout_at(deadline, self.register())
            .await
            .map_err(|_| anyhow::anyhow!("no leading coordinator answered in time"))??;
        self.renewed = tokio::time::Instant::now();
        self.registered = true;
        info!(worker_id = %self.config.worker_id, slots = self.config.slots, coordinator = %leader, running_tasks = self.jobs.values().map(|j| j.tasks.len()).sum::<usize>(), "registered with coordinator");
        // The first heartbeat, at once, lists the tasks running here: a new leader adopts them.
        let mut heartbeat = tokio::time::interval(interval);
        loop {
            let lease_end = self.lease_end();
            tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => return Ok(()),
                // Orders from the coordinator; a closed stream ends the session.
                order = orders.message() => {
                    let order = order?.and_then(|m| m.msg);
                    self.renewed = tokio::time::Instant::now();
                    match order {
                        Some(Order::Deploy(d)) => self.deploy(d).await?,
                        Some(Order::Cancel(c)) => {
                            if let Some(job) = self.jobs.get(&c.job_id).filter(|j| j.attempt <= c.attempt) {
                                info!(job_id = %c.job_id, attempt = c.attempt, release = c.release, "cancel ordered");
                                if c.release {
                                    job.released.store(true, Ordering::SeqCst);
                                }
                                job.cancel.cancel();
                            }
                        }
                        Some(Order::TriggerCheckpoint(t)) => {
                            let orders = t
                                .requests
                                .into_iter()
                                .map(|r| (r.source, SourceOrder::Backfill { id: r.id, filter: r.backfill_filter }))
                                .collect();
                            self.command(&t.job_id, t.attempt, TaskCommand::Trigger(t.checkpoint_id, orders))
                        }
                        Some(Order::CheckpointDone(c)) => self.command(&c.job_id, c.attempt, TaskCommand::Complete(c.checkpoint_id)),
                        Some(Order::Registered(_) | Order::Renew(_)) => {}
                        None => anyhow::bail!("coordinator closed the control stream"),
                    }
                }
                // A task ended: report it (after its deploy report, queued before), forget the job
                // once all its tasks are done.
                Some(d) = done.recv() => self.finished(d),
                Some(report) = reports.recv() => tx.send(report).await?,
                _ = heartbeat.tick() => {
                    let tasks = self.jobs.iter().flat_map(|(job_id, job)| {
                        job.tasks.iter().map(move |(t, r)| update(job_id, job.attempt, *t, TaskState::Running, String::new(), &r.metrics))
                    }).collect();
                    tx.send(WorkerMessage { msg: Some(Report::Heartbeat(Heartbeat { tasks })) }).await?;
                }
                // A coordinator that still holds the stream but says nothing (hung, or no longer
                // leading without closing it) is not one to run tasks for.
                _ = tokio::time::sleep_until(lease_end) => {
                    anyhow::bail!("no word from the coordinator for {} s", eddy_proto::WORKER_LEASE.as_secs())
                }
            }
        }
    }

    /// Finds the leading coordinator and registers with it: its address, the session's report
    /// sender and order stream, and the heartbeat interval it asks for.
    async fn register(&self) -> anyhow::Result<(String, mpsc::Sender<WorkerMessage>, tonic::Streaming<CoordinatorMessage>, Duration)> {
        let (leader, channel) = eddy_proto::connect_leader(&self.config.coordinators(), Duration::from_secs(3), &self.config.access)
            .await
            .map_err(|answers| anyhow::anyhow!("no coordinator leads: {answers}"))?;
        let mut client = ClusterServiceClient::new(channel);
        let (tx, rx) = mpsc::channel::<WorkerMessage>(64);
        tx.send(WorkerMessage {
            msg: Some(Report::Register(Register {
                worker_id: self.config.worker_id.clone(),
                slots: self.config.slots,
                data_address: self.config.advertised_address.clone(),
            })),
        })
        .await?;
        let mut orders = client.control(ReceiverStream::new(rx)).await?.into_inner();
        let interval = match orders.message().await?.and_then(|m| m.msg) {
            Some(Order::Registered(r)) => Duration::from_millis(r.heartbeat_interval_ms.max(50)),
            _ => anyhow::bail!("coordinator did not acknowledge registration"),
        };
        Ok((leader, tx, orders, interval))
    }

    /// Passes a checkpoint order to the tasks of the current attempt it concerns.
    fn command(&self, job_id: &str, attempt: u64, command: TaskCommand) {
        let Some(job) = self.jobs.get(job_id).filter(|j| j.attempt == attempt) else { return };
        for (task, t) in &job.tasks {
            if matches!(command, TaskCommand::Trigger(..)) && !t.source {
                continue;
            }
            // A task too busy to take the order misses this checkpoint; the coordinator times it out.
            if t.commands.try_send(command.clone()).is_err() {
                warn!(job_id, attempt, %task, ?command, "task did not take a checkpoint order");
            }
        }
    }

    async fn deploy(&mut self, d: DeployTasks) -> anyhow::Result<()> {
        let done = self.done.clone();
        if let Some(existing) = self.jobs.get(&d.job_id) {
            if existing.attempt > d.attempt {
                warn!(job_id = %d.job_id, attempt = d.attempt, current = existing.attempt, "ignoring deploy for an old attempt");
                return Ok(());
            }
            existing.cancel.cancel();
            self.inboxes.remove(&d.job_id, existing.attempt);
        }
        self.inboxes.fence(&d.job_id, d.attempt, d.task_ids.iter().filter_map(|t| t.parse().ok()));
        let cancel = self.shutdown.child_token();
        let parallelism = (d.parallelism > 0).then_some(d.parallelism);
        let plan = eddy_jobs::compile_with_parallelism(&d.spec, parallelism)
            .map_err(|e| TaskError::internal(format!("cannot plan the job on this worker: {e}")))
            .and_then(|p| match (p.fingerprint(), d.plan_fingerprint) {
                (ours, theirs) if theirs != 0 && ours != theirs => Err(TaskError::internal(format!(
                    "this worker plans the spec differently from the coordinator (plan {ours:016x}, the coordinator's \
                     {theirs:016x}): run the same version of Eddy on the coordinator and every worker"
                ))),
                _ => Ok(p),
            })
            .and_then(|p| {
                // `${worker:VAR}` references, resolved from this worker's environment: the plan
                // that runs holds their values, the one compared above their names.
                let names = eddy_jobs::worker_references(&d.spec);
                if names.is_empty() {
                    return Ok(p);
                }
                let worker = &self.config.worker_id;
                // Only what the worker lends to jobs: not its own secrets or credentials.
                if let Some(name) = names.iter().find(|n| !self.config.job_env.iter().any(|lent| lent == *n)) {
                    return Err(TaskError::user(format!(
                        "worker {worker} lends no `{name}` to jobs: start it with --job-env {name} (EDDY_JOB_ENV) to let \
                         `${{worker:{name}}}` read it"
                    )));
                }
                let values: Vec<(&str, String)> = names.iter().filter_map(|n| Some((*n, std::env::var(n).ok()?))).collect();
                let value = |name: &str| values.iter().find(|(n, _)| *n == name).map(|(_, v)| v.clone());
                eddy_jobs::substitute_worker_env(&d.spec, value)
                    .and_then(|spec| eddy_jobs::compile_with_parallelism(&spec, parallelism))
                    .map_err(|e| {
                        // An error may quote a value: it shows as the reference it came from.
                        let mut message = format!("{e} (worker {worker})");
                        for (name, v) in values.iter().filter(|(_, v)| !v.is_empty()) {
                            message = message.replace(v.as_str(), &format!("${{worker:{name}}}"));
                        }
                        TaskError::user(message)
                    })
            })
            .and_then(|p| {
                let refusal = |e| TaskError::user(format!("worker {} does not run this job: {e}", self.config.worker_id));
                self.config.permits(&p.reach()).map_err(refusal).map(|()| p)
            });
        let released = Arc::new(AtomicBool::new(false));
        let mut job = RunningJob { attempt: d.attempt, cancel: cancel.clone(), released: released.clone(), tasks: HashMap::new() };
        let placement: HashMap<_, _> = d.placement.iter().filter_map(|(t, addr)| Some((t.parse::<TaskId>().ok()?, addr.clone()))).collect();
        let placement = Arc::new(placement);
        let storage = match (&plan, d.checkpoint_storage.as_str()) {
            (Ok(p), root) if p.state.checkpoint_interval_ms.is_some() && !root.is_empty() => Some(Storage::open(root)),
            _ => None,
        };
        let restore = d.restore.map(Arc::new);
        for id in &d.task_ids {
            let task = id.parse::<TaskId>().map_err(|e| anyhow::anyhow!("coordinator sent a bad task id: {e}"))?;
            let metrics = Arc::new(TaskMetrics::default());
            let (commands_tx, commands) = mpsc::channel(TASK_COMMANDS);
            let source = plan.as_ref().is_ok_and(|p| p.is_source_vertex(task.vertex));
            job.tasks.insert(task, RunningTask { metrics: metrics.clone(), commands: commands_tx, source });
            if let Ok(p) = &plan {
                self.board.insert(&d.job_id, p.vertex_label(task.vertex), task.subtask, &metrics);
            }
            let (plan, storage) = match (&plan, &storage) {
                (Ok(p), None | Some(Ok(_))) => (Arc::new(p.clone()), storage.as_ref().and_then(|s| s.as_ref().ok()).cloned()),
                // Mismatched versions, a `${worker:VAR}` unset here, or a file or host this worker does
                // not allow; or checkpoint storage that cannot be opened.
                (Err(e), _) | (_, Some(Err(e))) => {
                    done.send(Finished { job_id: d.job_id.clone(), attempt: d.attempt, task, result: Some(Err(e.clone())) }).await?;
                    continue;
                }
            };
            let ctx = TaskContext {
                job_id: d.job_id.clone(),
                attempt: d.attempt,
                task,
                plan,
                placement: placement.clone(),
                local_address: self.config.advertised_address.clone(),
                inboxes: self.inboxes.clone(),
                peers: self.peers.clone(),
                metrics: metrics.clone(),
                commands,
                reports: self.reports.clone(),
                storage,
                dir: self.config.state_dir.join(&d.job_id).join(d.attempt.to_string()).join(task.to_string()),
                restore: restore.clone(),
                released: released.clone(),
                uploads: TaskTracker::new(),
            };
            let running = update(&d.job_id, d.attempt, task, TaskState::Running, String::new(), &metrics);
            let _ = self.reports.send(WorkerMessage { msg: Some(Report::TaskUpdate(running)) });
            let cancel = cancel.clone();
            let done = done.clone();
            let (job_id, attempt) = (d.job_id.clone(), d.attempt);
            let (dir, uploads) = (ctx.dir.clone(), ctx.uploads.clone());
            self.tasks.spawn(async move {
                let result = run_to_end(task::run(ctx), &cancel, uploads, dir).await;
                // The control loop may be gone (shutdown); then nobody needs the report.
                let _ = done.send(Finished { job_id, attempt, task, result }).await;
            });
        }
        info!(job_id = %d.job_id, attempt = d.attempt, tasks = d.task_ids.len(), "deployed tasks");
        self.jobs.insert(d.job_id, job);
        Ok(())
    }

    /// Reports a task's end to the coordinator.
    fn finished(&mut self, done: Finished) {
        let (state, error, retryable) = match &done.result {
            None => (TaskState::Cancelled, String::new(), true),
            Some(Ok(())) => (TaskState::Finished, String::new(), true),
            Some(Err(e)) => (TaskState::Failed, format!("{e} ({:?} error)", e.blame), e.retryable()),
        };
        match &done.result {
            Some(Err(e)) => warn!(job_id = %done.job_id, attempt = done.attempt, task = %done.task, error = %e, "task failed"),
            _ => info!(job_id = %done.job_id, attempt = done.attempt, task = %done.task, state = ?state, "task ended"),
        }
        let mut metrics = Arc::new(TaskMetrics::default());
        if let Some(job) = self.jobs.get_mut(&done.job_id).filter(|j| j.attempt == done.attempt) {
            if let Some(t) = job.tasks.remove(&done.task) {
                metrics = t.metrics;
            }
            if matches!(state, TaskState::Failed) {
                // One failed task fails the attempt; stop its siblings here rather than let them block.
                job.cancel.cancel();
            }
            if job.tasks.is_empty() {
                self.jobs.remove(&done.job_id);
                self.inboxes.remove(&done.job_id, done.attempt);
            }
        }
        let update = TaskUpdate { retryable, ..update(&done.job_id, done.attempt, done.task, state, error, &metrics) };
        let _ = self.reports.send(WorkerMessage { msg: Some(Report::TaskUpdate(update)) });
    }
}

fn update(job_id: &str, attempt: u64, task: TaskId, state: TaskState, error: String, m: &TaskMetrics) -> TaskUpdate {
    let [busy_ms, backpressured_ms, _] = m.time_split_ms();
    TaskUpdate {
        job_id: job_id.to_string(),
        attempt,
        task_id: task.to_string(),
        state: state as i32,
        error,
        metrics: Some(WireMetrics {
            records_in: m.records_in.load(Ordering::Relaxed),
            records_out: m.records_out.load(Ordering::Relaxed),
            late_records: m.late_records.load(Ordering::Relaxed),
            watermark_ms: m.watermark.load(Ordering::Relaxed),
            batches_in: m.batches_in.load(Ordering::Relaxed),
            batches_out: m.batches_out.load(Ordering::Relaxed),
            dead_lettered: m.dead_lettered.load(Ordering::Relaxed),
            gauges: m.gauges().into_iter().collect(),
            retrying: m.retrying(),
            busy_ms,
            backpressured_ms,
            notes: m.notes().into_iter().collect(),
        }),
        retryable: true,
    }
}

/// How long an ended task's report waits for its checkpoints' uploads: as long as the
/// coordinator waits for a checkpoint.
const UPLOAD_WAIT: Duration = Duration::from_secs(60);

/// Runs a task (see [`run_guarded`]), then removes its local files once its checkpoints' uploads
/// end. A task that stopped (cancelled) or finished is reported only then: an end reported while an
/// upload still wrote would let the coordinator delete a cancelled job's files before that upload
/// landed. A failure is reported at once (its siblings stop, the job restarts with its cause); the
/// failed attempt's uploads are left to end on their own.
async fn run_to_end<F>(run: F, cancel: &CancellationToken, uploads: TaskTracker, dir: PathBuf) -> Option<crate::error::Result<()>>
where
    F: std::future::Future<Output = crate::error::Result<()>> + Send + 'static,
{
    let result = run_guarded(run, cancel).await;
    uploads.close();
    let cleanup = async move {
        if tokio::time::timeout(UPLOAD_WAIT, uploads.wait()).await.is_err() {
            warn!(dir = %dir.display(), "a checkpoint upload of an ended task still runs after {} s; going on without it", UPLOAD_WAIT.as_secs());
        }
        let _ = tokio::fs::remove_dir_all(&dir).await;
    };
    if matches!(result, Some(Err(_))) {
        tokio::spawn(cleanup);
    } else {
        cleanup.await;
    }
    result
}

/// Runs a task's future in a tokio task of its own until it ends or `cancel` fires (`None`). A
/// panic in it fails the task with an internal error, so the coordinator restarts the job, rather
/// than leaving a task that reports `Running` and does nothing.
async fn run_guarded<F>(run: F, cancel: &CancellationToken) -> Option<crate::error::Result<()>>
where
    F: std::future::Future<Output = crate::error::Result<()>> + Send + 'static,
{
    let mut handle = tokio::spawn(run);
    tokio::select! {
        biased;
        _ = cancel.cancelled() => {
            handle.abort();
            // Wait until it is gone: the caller removes its files next.
            let _ = handle.await;
            None
        }
        joined = &mut handle => Some(match joined {
            Ok(result) => result,
            Err(e) if e.is_panic() => {
                let panic = e.into_panic();
                let what = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                Err(crate::error::TaskError::internal(format!("the task panicked: {}", what.unwrap_or_else(|| "no message".into()))))
            }
            Err(e) => Err(crate::error::TaskError::internal(format!("the task ended abnormally: {e}"))),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_task_fails_instead_of_hanging() {
        let cancel = CancellationToken::new();
        let result = run_guarded(async { panic!("slice end overflowed") }, &cancel).await;
        let e = result.expect("ended").expect_err("failed");
        assert_eq!(e.blame, crate::error::Blame::Internal);
        assert!(e.message.contains("slice end overflowed"), "{}", e.message);
        let result = run_guarded(async { Ok(()) }, &cancel).await;
        assert!(matches!(result, Some(Ok(()))));
        cancel.cancel();
        assert!(run_guarded(std::future::pending(), &cancel).await.is_none());
    }

    /// A task cancelled while one of its checkpoints uploads is reported stopped only once the
    /// upload has landed (the coordinator then deletes the cancelled job's files, those too),
    /// and its local files go after the upload read them.
    #[tokio::test]
    async fn a_cancelled_task_ends_after_its_uploads() {
        let dir = crate::testing::temp_dir("uploads");
        let (local, landed) = (dir.path().join("task"), dir.path().join("storage-file"));
        std::fs::create_dir_all(&local).unwrap();
        let uploads = TaskTracker::new();
        let (from, to) = (local.join("scratch"), landed.clone());
        std::fs::write(&from, b"state").unwrap();
        uploads.spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::fs::copy(&from, &to).await.expect("the upload reads the task's files");
        });
        let cancel = CancellationToken::new();
        cancel.cancel();
        let result = run_to_end(std::future::pending(), &cancel, uploads, local.clone()).await;
        assert!(result.is_none(), "cancelled");
        assert!(landed.exists(), "the upload landed before the end was reported");
        assert!(!local.exists(), "the task's local files are gone");

        // A failure is reported at once, upload or not: its siblings stop and the job restarts.
        std::fs::create_dir_all(&local).unwrap();
        let uploads = TaskTracker::new();
        uploads.spawn(tokio::time::sleep(Duration::from_secs(30)));
        let failing = async { Err(crate::error::TaskError::user("bad row")) };
        let started = std::time::Instant::now();
        let result = run_to_end(failing, &CancellationToken::new(), uploads, local).await;
        assert!(matches!(result, Some(Err(_))));
        assert!(started.elapsed() < Duration::from_secs(5), "a failure waited {:?} for an upload", started.elapsed());
    }
}
