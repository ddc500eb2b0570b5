//! What the worker's `/metrics` shows: the figures of every task it runs, read from the tasks' own
//! [`TaskMetrics`] on each scrape and named like Flink's task metrics (records in and out, busy,
//! backpressured and idle time, watermark and event-time lag), plus each connector's gauges.

use std::sync::{Arc, Mutex, Weak};

use eddy_proto::metrics::{Family, Labels};
use std::sync::atomic::Ordering::Relaxed;

use crate::operator::TaskMetrics;

/// The tasks a scrape reports on. A task's entry lives as long as its metrics do: an ended task
/// drops out at the next scrape.
#[derive(Debug, Default)]
pub struct TaskBoard {
    tasks: Mutex<Vec<(Labels, Weak<TaskMetrics>)>>,
}

impl TaskBoard {
    /// Adds a task, labelled by job, vertex (its operators) and subtask.
    pub fn insert(&self, job: &str, vertex: String, subtask: u32, metrics: &Arc<TaskMetrics>) {
        let labels = vec![("job", job.to_string()), ("vertex", vertex), ("subtask", subtask.to_string())];
        let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
        // An earlier attempt's task of the same name may still wind down: the new one replaces it,
        // so that no series is shown twice.
        tasks.retain(|(l, m)| m.strong_count() > 0 && *l != labels);
        tasks.push((labels, Arc::downgrade(metrics)));
    }

    /// The running tasks' figures.
    pub fn families(&self) -> Vec<Family> {
        let tasks: Vec<(Labels, Arc<TaskMetrics>)> = {
            let mut tasks = self.tasks.lock().unwrap_or_else(|e| e.into_inner());
            tasks.retain(|(_, m)| m.strong_count() > 0);
            tasks.iter().filter_map(|(l, m)| Some((l.clone(), m.upgrade()?))).collect()
        };
        let mut records_in = Family::counter("task_records_in", "Rows the task's first operator read.");
        let mut records_out = Family::counter("task_records_out", "Rows the task's last operator wrote.");
        let mut late = Family::counter("task_late_records", "Rows a window found late.");
        let mut dead = Family::counter("task_dead_letters", "Bad records skipped or written to a dead-letter file.");
        let mut busy = Family::counter("task_busy_ms", "Milliseconds spent on records (rate(): busy ms per second).");
        let mut backpressured =
            Family::counter("task_backpressured_ms", "Milliseconds spent waiting for a full downstream task to take output.");
        let mut idle = Family::counter("task_idle_ms", "Milliseconds neither busy nor backpressured.");
        let mut watermark = Family::gauge("task_watermark_ms", "The task's watermark, Unix milliseconds.");
        let mut lag = Family::gauge("task_event_time_lag_ms", "Wall-clock time minus the watermark, in milliseconds.");
        let mut committed = Family::gauge("task_committed_checkpoint", "The last checkpoint the task's sinks committed on.");
        let mut retrying = Family::gauge("task_retrying", "1 while a connector of the task rides out an error.");
        let mut connectors: Vec<Family> = Vec::new();
        let now = eddy_jobs::time::now_ms();
        for (labels, m) in tasks {
            records_in.add(labels.clone(), m.records_in.load(Relaxed) as f64);
            records_out.add(labels.clone(), m.records_out.load(Relaxed) as f64);
            late.add(labels.clone(), m.late_records.load(Relaxed) as f64);
            dead.add(labels.clone(), m.dead_lettered.load(Relaxed) as f64);
            let [b, p, i] = m.time_split_ms();
            busy.add(labels.clone(), b as f64);
            backpressured.add(labels.clone(), p as f64);
            idle.add(labels.clone(), i as f64);
            let wm = m.watermark.load(Relaxed);
            // MIN: none yet; MAX: the input ended.
            if wm != i64::MIN && wm != i64::MAX {
                watermark.add(labels.clone(), wm as f64);
                lag.add(labels.clone(), now.saturating_sub(wm) as f64);
            }
            committed.add(labels.clone(), m.committed_checkpoint.load(Relaxed) as f64);
            retrying.add(labels.clone(), if m.retrying().is_empty() { 0.0 } else { 1.0 });
            for (name, value) in m.gauges() {
                let name = format!("connector_{name}");
                let i = match connectors.iter().position(|f| f.name() == name) {
                    Some(i) => i,
                    None => {
                        connectors.push(Family::gauge(name, "A connector's own figure (lag, snapshot progress, rows written)."));
                        connectors.len() - 1
                    }
                };
                connectors[i].add(labels.clone(), value as f64);
            }
        }
        let mut families = vec![records_in, records_out, late, dead, busy, backpressured, idle, watermark, lag, committed, retrying];
        families.extend(connectors);
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scrape_shows_running_tasks_and_forgets_ended_ones() {
        let board = TaskBoard::default();
        let (a, b) = (Arc::new(TaskMetrics::default()), Arc::new(TaskMetrics::default()));
        board.insert("job-1", "0:kafka".into(), 0, &a);
        board.insert("job-1", "1:window".into(), 1, &b);
        a.records_in.fetch_add(7, Relaxed);
        a.set_gauge("consumer_lag", 12);
        let text = eddy_proto::metrics::render(board.families());
        assert!(text.contains("eddy_task_records_in_total{job=\"job-1\",vertex=\"0:kafka\",subtask=\"0\"} 7"), "{text}");
        assert!(text.contains("eddy_connector_consumer_lag{job=\"job-1\",vertex=\"0:kafka\",subtask=\"0\"} 12"), "{text}");
        assert!(text.contains("subtask=\"1\""), "{text}");
        drop(b);
        let text = eddy_proto::metrics::render(board.families());
        assert!(!text.contains("subtask=\"1\""), "an ended task is still shown: {text}");
    }
}
