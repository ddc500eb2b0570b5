//! What the coordinator's `/metrics` shows, read from the job table on each scrape as `eddy status`
//! reads it: every job's state, restarts and latest checkpoint (duration, sizes), its throughput and
//! watermark per vertex as the workers' heartbeats report them, and the workers. The tasks' own
//! figures in full are on each worker's `/metrics`.

use std::collections::BTreeMap;

use eddy_proto::metrics::{Family, Labels};
use eddy_proto::JobStatusResponse;

use crate::actor::Request as Ask;
use crate::api::Api;

/// The families of one scrape. A coordinator that does not lead reports only that.
pub async fn families(api: &Api) -> Vec<Family> {
    let mut leading = Family::gauge("coordinator_leading", "1 on the coordinator that leads (runs the jobs), 0 on the others.");
    let Ok(workers) = api.ask(|reply| Ask::ListWorkers { reply }).await else {
        leading.add(Vec::new(), 0.0);
        return vec![leading];
    };
    leading.add(Vec::new(), 1.0);
    let statuses = api.job_statuses().await;
    let mut families = job_families(&statuses);
    let mut alive = Family::gauge("workers", "Workers known to the coordinator, by state.");
    let mut slots = Family::gauge("worker_slots", "Task slots offered by alive workers.");
    let mut used = Family::gauge("worker_slots_used", "Task slots in use on alive workers.");
    let mut by_state: BTreeMap<&str, u32> = BTreeMap::new();
    for w in &workers {
        *by_state.entry(w.state.as_str()).or_default() += 1;
        if w.state == "alive" {
            slots.add(vec![("worker", w.worker_id.clone())], f64::from(w.slots));
            used.add(vec![("worker", w.worker_id.clone())], f64::from(w.slots_used));
        }
    }
    for (state, n) in by_state {
        alive.add(vec![("state", state.to_string())], f64::from(n));
    }
    families.extend([leading, alive, slots, used]);
    families
}

/// One vertex's totals over its tasks (this attempt's, as heartbeats report them).
#[derive(Debug, Clone, Default)]
pub(crate) struct VertexTotals {
    pub tasks: u32,
    pub records_in: u64,
    pub records_out: u64,
    pub busy_ms: u64,
    pub backpressured_ms: u64,
    pub dead_letters: u64,
    /// The lowest watermark of its tasks, if every task has one (`i64::MAX` once all ended).
    pub watermark_ms: Option<i64>,
}

/// A job's vertices (named as `TaskView.operators`) with their totals.
pub(crate) fn vertex_totals(s: &JobStatusResponse) -> BTreeMap<String, VertexTotals> {
    let mut vertices: BTreeMap<String, VertexTotals> = BTreeMap::new();
    for t in &s.tasks {
        let m = t.metrics.clone().unwrap_or_default();
        let v = vertices.entry(t.operators.clone()).or_insert_with(|| VertexTotals { watermark_ms: Some(i64::MAX), ..Default::default() });
        v.tasks += 1;
        v.records_in += m.records_in;
        v.records_out += m.records_out;
        v.busy_ms += m.busy_ms;
        v.backpressured_ms += m.backpressured_ms;
        v.dead_letters += m.dead_lettered;
        v.watermark_ms = v.watermark_ms.filter(|_| m.watermark_ms != i64::MIN).map(|w| w.min(m.watermark_ms));
    }
    vertices
}

/// The figures of each job, from what `eddy status` shows of it.
fn job_families(statuses: &[JobStatusResponse]) -> Vec<Family> {
    let mut state = Family::gauge("job_state", "1 for the job's current state (running, restarting, failed, …).");
    let mut restarts = Family::counter("job_restarts", "Restarts after failures.");
    let mut attempt = Family::gauge("job_attempt", "The job's current attempt (each restart or rescale is one).");
    let mut last = Family::gauge("job_last_checkpoint", "The id of the job's latest completed checkpoint.");
    let mut duration = Family::gauge("job_last_checkpoint_duration_ms", "How long the latest completed checkpoint took.");
    let mut full = Family::gauge("job_last_checkpoint_full_bytes", "What every file of the latest completed checkpoint adds up to.");
    let mut incremental =
        Family::gauge("job_last_checkpoint_incremental_bytes", "Bytes uploaded for the latest completed checkpoint (new files only).");
    let mut failed = Family::gauge("job_recent_failed_checkpoints", "Failed checkpoints among the recent ones the coordinator keeps.");
    let mut records_in =
        Family::counter("job_vertex_records_in", "Rows read by a vertex's tasks (this attempt), as heartbeats report them.");
    let mut records_out = Family::counter("job_vertex_records_out", "Rows written by a vertex's tasks (this attempt).");
    let mut busy = Family::counter("job_vertex_busy_ms", "Milliseconds a vertex's tasks spent on records (this attempt).");
    let mut backpressured =
        Family::counter("job_vertex_backpressured_ms", "Milliseconds a vertex's tasks waited on a full downstream (this attempt).");
    let mut watermark = Family::gauge("job_vertex_watermark_ms", "The lowest watermark among a vertex's tasks, Unix milliseconds.");
    let mut dead = Family::counter("job_vertex_dead_letters", "Bad records a vertex's tasks skipped or dead-lettered (this attempt).");
    for s in statuses {
        let Some(job) = &s.job else { continue };
        let labels: Labels = vec![("job", job.job_id.clone()), ("name", job.name.clone())];
        let with = |k: &'static str, v: String| -> Labels { labels.iter().cloned().chain([(k, v)]).collect() };
        state.add(with("state", job.state.clone()), 1.0);
        restarts.add(labels.clone(), f64::from(s.restarts));
        attempt.add(labels.clone(), job.attempt as f64);
        if let Some(c) = s.checkpoints.iter().rev().find(|c| c.state == "completed") {
            last.add(labels.clone(), c.checkpoint_id as f64);
            duration.add(labels.clone(), c.duration_ms as f64);
            full.add(labels.clone(), c.full_bytes as f64);
            incremental.add(labels.clone(), c.incremental_bytes as f64);
        }
        failed.add(labels.clone(), s.checkpoints.iter().filter(|c| c.state == "failed").count() as f64);
        for (vertex, v) in vertex_totals(s) {
            let labels = with("vertex", vertex);
            records_in.add(labels.clone(), v.records_in as f64);
            records_out.add(labels.clone(), v.records_out as f64);
            busy.add(labels.clone(), v.busy_ms as f64);
            backpressured.add(labels.clone(), v.backpressured_ms as f64);
            dead.add(labels.clone(), v.dead_letters as f64);
            if let Some(wm) = v.watermark_ms.filter(|&wm| wm != i64::MAX) {
                watermark.add(labels, wm as f64);
            }
        }
    }
    vec![state, restarts, attempt, last, duration, full, incremental, failed, records_in, records_out, busy, backpressured, watermark, dead]
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_proto::{CheckpointView, JobSummary, TaskMetrics, TaskView};

    #[test]
    fn a_job_shows_its_state_latest_checkpoint_and_vertices() {
        let task = |subtask, records_out, watermark_ms| TaskView {
            operators: "events -> hop".into(),
            subtask,
            metrics: Some(TaskMetrics { records_out, watermark_ms, busy_ms: 10, ..Default::default() }),
            ..Default::default()
        };
        let checkpoint = |checkpoint_id, state: &str| CheckpointView {
            checkpoint_id,
            state: state.into(),
            duration_ms: 120,
            full_bytes: 4096,
            ..Default::default()
        };
        let status = JobStatusResponse {
            job: Some(JobSummary {
                job_id: "j1".into(),
                name: "process".into(),
                state: "running".into(),
                attempt: 2,
                ..Default::default()
            }),
            tasks: vec![task(0, 5, 1_000), task(1, 7, i64::MIN)],
            checkpoints: vec![checkpoint(3, "completed"), checkpoint(4, "failed"), checkpoint(5, "in_progress")],
            restarts: 1,
            ..Default::default()
        };
        let text = eddy_proto::metrics::render(job_families(&[status]));
        for line in [
            "eddy_job_state{job=\"j1\",name=\"process\",state=\"running\"} 1",
            "eddy_job_restarts_total{job=\"j1\",name=\"process\"} 1",
            "eddy_job_last_checkpoint{job=\"j1\",name=\"process\"} 3",
            "eddy_job_last_checkpoint_full_bytes{job=\"j1\",name=\"process\"} 4096",
            "eddy_job_recent_failed_checkpoints{job=\"j1\",name=\"process\"} 1",
            "eddy_job_vertex_records_out_total{job=\"j1\",name=\"process\",vertex=\"events -> hop\"} 12",
            "eddy_job_vertex_busy_ms_total{job=\"j1\",name=\"process\",vertex=\"events -> hop\"} 20",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        // A subtask without a watermark yet holds the vertex's back: none is shown.
        assert!(!text.contains("eddy_job_vertex_watermark_ms"), "{text}");
    }
}
