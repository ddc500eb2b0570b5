//! The checkpoint tracker of one job: when to trigger, which acks are still missing, timeouts,
//! aborts and fencing, and which completed checkpoints are kept. It is plain data driven by the
//! coordinator's actor (which does the I/O), so its rules are tested with paused time.
//!
//! One checkpoint is in flight at a time. A checkpoint is triggered `interval` after the previous
//! one ended; it completes when every task of the attempt that triggered it has acked and its
//! manifest is stored; a decline, a timeout or a restart aborts it. Acks from another attempt or
//! for another checkpoint are ignored. The last `retain` checkpoints are kept, savepoints forever.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use eddy_proto::{CheckpointManifest, CheckpointView, TaskSnapshot};
use tokio::time::Instant;

use crate::store::CheckpointRecord;

/// Status keeps this many recent checkpoints.
const HISTORY: usize = 10;

/// A checkpoint waiting for acks.
#[derive(Debug)]
pub struct Pending {
    /// Checkpoint id.
    pub id: u64,
    /// The attempt that triggered it.
    pub attempt: u64,
    /// Whether a user asked for it (never collected).
    pub savepoint: bool,
    started: Instant,
    started_ms: i64,
    waiting: BTreeSet<String>,
    acks: BTreeMap<String, TaskSnapshot>,
    /// Every ack is in; the manifest is being stored.
    pub storing: bool,
}

/// A completed checkpoint or savepoint.
#[derive(Debug, Clone)]
pub struct Completed {
    /// Checkpoint id.
    pub id: u64,
    /// Whether it is a savepoint.
    pub savepoint: bool,
    /// What tasks restore from.
    pub manifest: Arc<CheckpointManifest>,
    /// Statistics.
    pub view: CheckpointView,
}

/// What an ack did.
#[derive(Debug, PartialEq)]
pub enum AckOutcome {
    /// From another attempt or checkpoint: ignored.
    Stale,
    /// Recorded; other tasks have not acked yet.
    Waiting,
    /// The last ack: store this manifest, then call [`CheckpointTracker::stored`].
    AllAcked(CheckpointManifest),
    /// The task declined: the checkpoint (a savepoint, or not) is aborted.
    Aborted { cause: String, savepoint: bool },
}

/// Checkpoints of one job.
#[derive(Debug)]
pub struct CheckpointTracker {
    job_id: String,
    interval: Option<Duration>,
    timeout: Duration,
    retain: usize,
    next_id: u64,
    pending: Option<Pending>,
    /// When the last checkpoint ended (or the attempt started): the next is due `interval` later.
    last_end: Instant,
    /// Kept checkpoints and savepoints, oldest first.
    completed: Vec<Completed>,
    history: VecDeque<CheckpointView>,
}

impl CheckpointTracker {
    /// A tracker for `job_id`; `interval` `None` means periodic checkpoints are off.
    pub fn new(job_id: &str, interval: Option<Duration>, timeout: Duration, retain: usize, now: Instant) -> CheckpointTracker {
        CheckpointTracker {
            job_id: job_id.to_string(),
            interval,
            timeout,
            retain: retain.max(1),
            next_id: 1,
            pending: None,
            last_end: now,
            completed: Vec::new(),
            history: VecDeque::new(),
        }
    }

    /// Continues after checkpoints restored from durable metadata.
    pub fn resume(&mut self, next_id: u64, completed: Vec<Completed>) {
        self.next_id = self.next_id.max(next_id);
        self.completed = completed;
    }

    /// The id the next checkpoint will get.
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// Whether periodic checkpoints are on.
    pub fn enabled(&self) -> bool {
        self.interval.is_some()
    }

    /// Whether a periodic checkpoint should start now.
    pub fn due(&self, now: Instant) -> bool {
        match self.interval {
            Some(interval) => self.pending.is_none() && now.duration_since(self.last_end) >= interval,
            None => false,
        }
    }

    /// The checkpoint in flight.
    pub fn pending(&self) -> Option<&Pending> {
        self.pending.as_ref()
    }

    /// Starts checkpoint `id` for `attempt`, expecting an ack from each of `tasks`.
    pub fn trigger(&mut self, now: Instant, now_ms: i64, attempt: u64, tasks: Vec<String>, savepoint: bool) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.pending = Some(Pending {
            id,
            attempt,
            savepoint,
            started: now,
            started_ms: now_ms,
            waiting: tasks.into_iter().collect(),
            acks: BTreeMap::new(),
            storing: false,
        });
        id
    }

    /// Records a task's ack (or its decline).
    pub fn ack(&mut self, attempt: u64, id: u64, task: &str, snapshot: Result<TaskSnapshot, String>, now: Instant) -> AckOutcome {
        let Some(p) = self.pending.as_mut().filter(|p| p.attempt == attempt && p.id == id && !p.storing) else {
            return AckOutcome::Stale;
        };
        if !p.waiting.remove(task) {
            return AckOutcome::Stale;
        }
        match snapshot {
            Err(why) => {
                let cause = format!("task {task} declined: {why}");
                let savepoint = p.savepoint;
                self.abort(&cause, now);
                AckOutcome::Aborted { cause, savepoint }
            }
            Ok(s) => {
                p.acks.insert(task.to_string(), s);
                if !p.waiting.is_empty() {
                    return AckOutcome::Waiting;
                }
                p.storing = true;
                AckOutcome::AllAcked(CheckpointManifest {
                    job_id: self.job_id.clone(),
                    checkpoint_id: p.id,
                    parallelism: BTreeMap::new().into_iter().collect(),
                    tasks: p.acks.clone().into_iter().collect(),
                    ..Default::default()
                })
            }
        }
    }

    /// The manifest of the pending checkpoint `id` is stored: it is complete. Returns the
    /// checkpoints no longer kept (to be deleted from storage).
    pub fn stored(&mut self, id: u64, manifest: Arc<CheckpointManifest>, now: Instant) -> (Option<Completed>, Vec<Completed>) {
        let Some(p) = self.pending.take_if(|p| p.id == id && p.storing) else {
            return (None, Vec::new());
        };
        self.last_end = now;
        let (full, incremental) = manifest.tasks.values().fold((0, 0), |(f, i), t| (f + t.full_bytes, i + t.incremental_bytes));
        let view = CheckpointView {
            checkpoint_id: id,
            kind: if p.savepoint { "savepoint" } else { "checkpoint" }.into(),
            state: "completed".into(),
            triggered_at_ms: p.started_ms,
            duration_ms: now.duration_since(p.started).as_millis() as u64,
            full_bytes: full,
            incremental_bytes: incremental,
            cause: String::new(),
            savepoint_id: if p.savepoint { savepoint_id(&self.job_id, id) } else { String::new() },
        };
        self.remember(view.clone());
        let done = Completed { id, savepoint: p.savepoint, manifest, view };
        self.completed.push(done.clone());
        let checkpoints = self.completed.iter().filter(|c| !c.savepoint).count();
        let mut dropped = Vec::new();
        let mut excess = checkpoints.saturating_sub(self.retain);
        self.completed.retain(|c| {
            if excess > 0 && !c.savepoint {
                excess -= 1;
                dropped.push(c.clone());
                return false;
            }
            true
        });
        (Some(done), dropped)
    }

    /// Aborts the checkpoint in flight, if any (a decline, a failure to store, a restart).
    pub fn abort(&mut self, cause: &str, now: Instant) -> Option<Pending> {
        let p = self.pending.take()?;
        self.last_end = now;
        self.remember(CheckpointView {
            checkpoint_id: p.id,
            kind: if p.savepoint { "savepoint" } else { "checkpoint" }.into(),
            state: "failed".into(),
            triggered_at_ms: p.started_ms,
            duration_ms: now.duration_since(p.started).as_millis() as u64,
            cause: cause.to_string(),
            ..Default::default()
        });
        Some(p)
    }

    /// Aborts the checkpoint in flight if it has taken longer than the timeout.
    pub fn check_timeout(&mut self, now: Instant) -> Option<Pending> {
        let p = self.pending.as_ref()?;
        if now.duration_since(p.started) < self.timeout {
            return None;
        }
        let missing: Vec<&str> = p.waiting.iter().map(String::as_str).take(5).collect();
        let cause = format!("timed out after {} s waiting for tasks {}", self.timeout.as_secs(), missing.join(", "));
        self.abort(&cause, now)
    }

    /// Restarts the interval (a new attempt is running).
    pub fn restart_interval(&mut self, now: Instant) {
        self.last_end = now;
    }

    /// The newest completed checkpoint or savepoint.
    pub fn latest(&self) -> Option<&Completed> {
        self.completed.iter().max_by_key(|c| c.id)
    }

    /// Every kept checkpoint and savepoint, oldest first.
    pub fn kept(&self) -> &[Completed] {
        &self.completed
    }

    /// Forgets every kept checkpoint but the savepoints, and returns them: the job ended for good,
    /// and only a savepoint can start a new one.
    pub fn release_checkpoints(&mut self) -> Vec<Completed> {
        let (savepoints, checkpoints) = std::mem::take(&mut self.completed).into_iter().partition(|c| c.savepoint);
        self.completed = savepoints;
        checkpoints
    }

    /// Recent checkpoints for status, oldest first (the one in flight last).
    pub fn views(&self) -> Vec<CheckpointView> {
        let mut v: Vec<CheckpointView> = self.history.iter().cloned().collect();
        if let Some(p) = &self.pending {
            v.push(CheckpointView {
                checkpoint_id: p.id,
                kind: if p.savepoint { "savepoint" } else { "checkpoint" }.into(),
                state: "in_progress".into(),
                triggered_at_ms: p.started_ms,
                ..Default::default()
            });
        }
        v
    }

    fn remember(&mut self, view: CheckpointView) {
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(view);
    }
}

/// What the metadata keeps of a completed checkpoint.
pub fn checkpoint_record(c: &Completed) -> CheckpointRecord {
    CheckpointRecord {
        id: c.id,
        savepoint: c.savepoint,
        triggered_at_ms: c.view.triggered_at_ms,
        duration_ms: c.view.duration_ms,
        full_bytes: c.view.full_bytes,
        incremental_bytes: c.view.incremental_bytes,
    }
}

/// A checkpoint of the metadata, as listed in `eddy status`.
pub fn record_view(job_id: &str, c: &CheckpointRecord) -> CheckpointView {
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

/// The id users name a savepoint by.
pub fn savepoint_id(job_id: &str, checkpoint_id: u64) -> String {
    format!("{job_id}-sp{checkpoint_id}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tracker(now: Instant) -> CheckpointTracker {
        CheckpointTracker::new("job-1", Some(Duration::from_secs(5)), Duration::from_secs(30), 2, now)
    }

    fn snap(bytes: u64) -> Result<TaskSnapshot, String> {
        Ok(TaskSnapshot { operators: Vec::new(), full_bytes: bytes, incremental_bytes: bytes / 2 })
    }

    fn tasks() -> Vec<String> {
        vec!["0.0".into(), "1.0".into()]
    }

    /// Acks every task of the pending checkpoint and stores it.
    fn complete(t: &mut CheckpointTracker, attempt: u64, now: Instant) -> (Option<Completed>, Vec<Completed>) {
        let id = t.trigger(now, 0, attempt, tasks(), false);
        assert_eq!(t.ack(attempt, id, "0.0", snap(10), now), AckOutcome::Waiting);
        let AckOutcome::AllAcked(m) = t.ack(attempt, id, "1.0", snap(20), now) else { panic!("expected all acked") };
        t.stored(id, Arc::new(m), now)
    }

    #[tokio::test(start_paused = true)]
    async fn triggers_on_the_interval_after_the_last_end() {
        let mut t = tracker(Instant::now());
        assert!(!t.due(Instant::now()));
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(t.due(Instant::now()));
        let id = t.trigger(Instant::now(), 0, 1, tasks(), false);
        assert!(!t.due(Instant::now()), "one checkpoint at a time");
        tokio::time::advance(Duration::from_secs(1)).await;
        t.ack(1, id, "0.0", snap(1), Instant::now());
        let AckOutcome::AllAcked(m) = t.ack(1, id, "1.0", snap(1), Instant::now()) else { panic!() };
        let (done, _) = t.stored(id, Arc::new(m), Instant::now());
        let done = done.expect("completed");
        assert_eq!(done.view.duration_ms, 1_000);
        assert_eq!((done.view.full_bytes, done.view.incremental_bytes), (2, 0));
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(!t.due(Instant::now()), "the interval counts from the end of the last one");
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(t.due(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn acks_from_other_attempts_or_checkpoints_are_fenced() {
        let now = Instant::now();
        let mut t = tracker(now);
        let id = t.trigger(now, 0, 2, tasks(), false);
        assert_eq!(t.ack(1, id, "0.0", snap(1), now), AckOutcome::Stale, "older attempt");
        assert_eq!(t.ack(2, id + 1, "0.0", snap(1), now), AckOutcome::Stale, "unknown checkpoint");
        assert_eq!(t.ack(2, id, "9.9", snap(1), now), AckOutcome::Stale, "unknown task");
        assert_eq!(t.ack(2, id, "0.0", snap(1), now), AckOutcome::Waiting);
        assert_eq!(t.ack(2, id, "0.0", snap(1), now), AckOutcome::Stale, "duplicate");
        assert!(matches!(t.ack(2, id, "1.0", snap(1), now), AckOutcome::AllAcked(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_decline_aborts_and_a_timeout_aborts() {
        let mut t = tracker(Instant::now());
        let id = t.trigger(Instant::now(), 0, 1, tasks(), false);
        assert!(
            matches!(t.ack(1, id, "0.0", Err("disk full".into()), Instant::now()), AckOutcome::Aborted { cause, savepoint: false } if cause.contains("disk full"))
        );
        assert!(t.pending().is_none());
        assert_eq!(t.ack(1, id, "1.0", snap(1), Instant::now()), AckOutcome::Stale, "acks of an aborted checkpoint");

        let id = t.trigger(Instant::now(), 0, 1, tasks(), false);
        assert!(id > 1, "ids are never reused");
        tokio::time::advance(Duration::from_secs(29)).await;
        assert!(t.check_timeout(Instant::now()).is_none());
        t.ack(1, id, "0.0", snap(1), Instant::now());
        tokio::time::advance(Duration::from_secs(1)).await;
        let aborted = t.check_timeout(Instant::now()).expect("timed out");
        assert_eq!(aborted.id, id);
        let views = t.views();
        assert_eq!(views.len(), 2);
        assert!(views.iter().all(|v| v.state == "failed"));
        assert!(views[1].cause.contains("1.0"), "names the task that did not ack: {}", views[1].cause);
        assert!(t.latest().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn keeps_the_last_checkpoints_and_every_savepoint() {
        let now = Instant::now();
        let mut t = tracker(now);
        let (first, dropped) = complete(&mut t, 1, now);
        assert!(dropped.is_empty());
        let sp = t.trigger(now, 0, 1, tasks(), true);
        t.ack(1, sp, "0.0", snap(1), now);
        let AckOutcome::AllAcked(m) = t.ack(1, sp, "1.0", snap(1), now) else { panic!() };
        let (savepoint, _) = t.stored(sp, Arc::new(m), now);
        assert_eq!(savepoint.unwrap().view.savepoint_id, format!("job-1-sp{sp}"));
        complete(&mut t, 1, now);
        let (_, dropped) = complete(&mut t, 1, now);
        // Retain 2: the first checkpoint goes; the savepoint, older than the two kept, stays.
        assert_eq!(dropped.iter().map(|c| c.id).collect::<Vec<_>>(), vec![first.unwrap().id]);
        let kept: Vec<(u64, bool)> = t.kept().iter().map(|c| (c.id, c.savepoint)).collect();
        assert_eq!(kept, vec![(2, true), (3, false), (4, false)]);
        assert_eq!(t.latest().unwrap().id, 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_aborts_the_checkpoint_in_flight() {
        let now = Instant::now();
        let mut t = tracker(now);
        let id = t.trigger(now, 0, 1, tasks(), false);
        t.ack(1, id, "0.0", snap(1), now);
        assert_eq!(t.abort("job restarting", now).map(|p| p.id), Some(id));
        // The new attempt's tasks answer the old barrier: ignored.
        assert_eq!(t.ack(2, id, "1.0", snap(1), now), AckOutcome::Stale);
        let (done, _) = t.stored(id, Arc::new(CheckpointManifest::default()), now);
        assert!(done.is_none(), "an aborted checkpoint never completes");
    }
}
