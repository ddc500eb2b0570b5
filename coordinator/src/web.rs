//! The coordinator's web page, read-only, as Flink's web UI shows a job: the jobs and workers
//! (`/`), and per job (`/jobs/{id}`) its graph of vertices and exchanges coloured by busy and
//! backpressured time, where its tasks run, its recent checkpoints, throughput and event-time lag
//! over the last minutes, and its state history. Pages are rendered here as HTML and SVG (no
//! script) and refresh themselves; they read the job table through the same requests as
//! `eddy status`. A sampler keeps each job's totals every [`SAMPLE_EVERY`] for the rates and the
//! charts.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Html;
use eddy_jobs::time::format_timestamp;
use eddy_proto::{JobStatusResponse, JobSummary, WorkerView};
use tokio_util::sync::CancellationToken;

use crate::actor::Request as Ask;
use crate::api::Api;
use crate::metrics::{vertex_totals, VertexTotals};

/// How often the sampler reads every job's totals.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How much history the charts show.
const KEPT: usize = 300;

#[derive(Debug, Clone)]
struct Sample {
    at_ms: i64,
    attempt: u64,
    vertices: BTreeMap<String, VertexTotals>,
}

/// A vertex's rates between two samples.
#[derive(Debug, Clone, Copy, Default)]
struct Rates {
    records_in_per_s: f64,
    records_out_per_s: f64,
    /// Shares of the time (0–1), averaged over the vertex's tasks.
    busy: f64,
    backpressured: f64,
}

type History = Arc<Mutex<HashMap<String, VecDeque<Sample>>>>;

#[derive(Clone)]
struct Web {
    api: Api,
    history: History,
}

/// The page's routes; starts the sampler, which stops with `shutdown`.
pub fn router(api: Api, shutdown: CancellationToken) -> axum::Router {
    let web = Web { api, history: History::default() };
    tokio::spawn(sample(web.clone(), shutdown));
    axum::Router::new().route("/", axum::routing::get(jobs_page)).route("/jobs/{id}", axum::routing::get(job_page)).with_state(web)
}

async fn sample(web: Web, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => {}
        }
        let statuses = web.api.job_statuses().await;
        let mut history = web.history.lock().unwrap_or_else(|e| e.into_inner());
        // None at all: not leading (or not answering) now; the history waits for the next round.
        if !statuses.is_empty() {
            history.retain(|id, _| statuses.iter().any(|s| s.job.as_ref().is_some_and(|j| &j.job_id == id)));
        }
        for s in &statuses {
            let Some(job) = &s.job else { continue };
            let samples = history.entry(job.job_id.clone()).or_default();
            if samples.len() == KEPT {
                samples.pop_front();
            }
            samples.push_back(Sample { at_ms: crate::now_ms(), attempt: job.attempt, vertices: vertex_totals(s) });
        }
    }
}

/// Rates of each vertex between two samples of one attempt (none across a restart, whose totals
/// start again from zero).
fn rates(earlier: &Sample, later: &Sample) -> BTreeMap<String, Rates> {
    let seconds = (later.at_ms - earlier.at_ms) as f64 / 1000.0;
    if earlier.attempt != later.attempt || seconds <= 0.0 {
        return BTreeMap::new();
    }
    let per_s = |a: u64, b: u64| b.saturating_sub(a) as f64 / seconds;
    later
        .vertices
        .iter()
        .filter_map(|(name, b)| {
            let a = earlier.vertices.get(name)?;
            let share = |x: u64, y: u64| (per_s(x, y) / 1000.0 / f64::from(b.tasks.max(1))).clamp(0.0, 1.0);
            Some((
                name.clone(),
                Rates {
                    records_in_per_s: per_s(a.records_in, b.records_in),
                    records_out_per_s: per_s(a.records_out, b.records_out),
                    busy: share(a.busy_ms, b.busy_ms),
                    backpressured: share(a.backpressured_ms, b.backpressured_ms),
                },
            ))
        })
        .collect()
}

/// Escapes text for HTML.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

fn when(ms: i64) -> String {
    if ms <= 0 {
        return "—".into();
    }
    let text = format_timestamp(ms);
    text.split('.').next().unwrap_or(&text).to_string()
}

fn bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / f64::from(1 << 30)),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / f64::from(1 << 20)),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

const STYLE: &str = "body{font:14px system-ui,sans-serif;margin:24px;color:#222}h1{font-size:20px}h2{font-size:16px;margin-top:28px}\
table{border-collapse:collapse}td,th{padding:3px 10px;border-bottom:1px solid #ddd;text-align:left}\
.state{font-weight:600}.running{color:#0a7a2f}.failed{color:#b00020}.restarting,.created,.scheduling{color:#a36b00}\
.muted{color:#777}a{color:#0b57d0}";

fn page(title: &str, body: &str) -> Html<String> {
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\"><title>{} · Eddy</title>\
         <style>{STYLE}</style></head><body><p class=\"muted\"><a href=\"/\">Eddy</a> · read-only, refreshes every 5 s</p>{body}</body></html>",
        esc(title)
    ))
}

fn state(s: &str) -> String {
    format!("<span class=\"state {0}\">{0}</span>", esc(s))
}

async fn jobs_page(State(web): State<Web>) -> Html<String> {
    let jobs: Vec<JobSummary> = web.api.ask(|reply| Ask::ListJobs { reply }).await.unwrap_or_default();
    let workers: Vec<WorkerView> = web.api.ask(|reply| Ask::ListWorkers { reply }).await.unwrap_or_default();
    let mut body = String::from(
        "<h1>Jobs</h1><table><tr><th>Name</th><th>Id</th><th>State</th><th>Attempt</th><th>Tasks</th><th>Submitted</th><th>Why</th></tr>",
    );
    for j in &jobs {
        let _ = write!(
            body,
            "<tr><td><a href=\"/jobs/{id}\">{name}</a></td><td class=\"muted\">{id}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            state(&j.state),
            j.attempt,
            j.tasks,
            when(j.submitted_at_ms),
            esc(&j.cause),
            id = esc(&j.job_id),
            name = esc(&j.name),
        );
    }
    if jobs.is_empty() {
        body.push_str("<tr><td colspan=\"7\" class=\"muted\">No jobs: submit one with <code>eddy submit SPEC</code>.</td></tr>");
    }
    body.push_str(
        "</table><h2>Workers</h2><table><tr><th>Id</th><th>Data address</th><th>State</th><th>Slots used</th><th>Last heartbeat</th></tr>",
    );
    for w in &workers {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} / {}</td><td>{}</td></tr>",
            esc(&w.worker_id),
            esc(&w.data_address),
            state(&w.state),
            w.slots_used,
            w.slots,
            when(w.last_heartbeat_ms)
        );
    }
    body.push_str("</table>");
    page("Jobs", &body)
}

async fn job_page(State(web): State<Web>, Path(id): Path<String>) -> Html<String> {
    let job_id = id.clone();
    let status = match web.api.ask(|reply| Ask::JobStatus { job_id, reply }).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return page("Unknown job", &format!("<h1>No job {}</h1><p>{}</p>", esc(&id), esc(&e.to_string()))),
        Err(e) => return page("Not leading", &format!("<h1>This coordinator does not lead</h1><p>{}</p>", esc(e.message()))),
    };
    let samples: Vec<Sample> =
        web.history.lock().unwrap_or_else(|e| e.into_inner()).get(&id).map(|s| s.iter().cloned().collect()).unwrap_or_default();
    page(&status.job.as_ref().map_or(id.clone(), |j| j.name.clone()), &render_job(&status, &samples))
}

/// The job page's body.
fn render_job(s: &JobStatusResponse, samples: &[Sample]) -> String {
    let job = s.job.clone().unwrap_or_default();
    let now = match samples {
        [.., a, b] => rates(a, b),
        _ => BTreeMap::new(),
    };
    let mut body = format!(
        "<h1>{} {}</h1><p>Job <code>{}</code> · attempt {} · restarts {} · running since {}{}</p>",
        esc(&job.name),
        state(&job.state),
        esc(&job.job_id),
        job.attempt,
        s.restarts,
        when(s.running_since_ms),
        if job.cause.is_empty() { String::new() } else { format!(" · {}", esc(&job.cause)) }
    );
    body.push_str("<h2>Graph</h2>");
    body.push_str(&graph(s, &now));
    body.push_str("<h2>Throughput and lag, last minutes</h2>");
    body.push_str(&charts(samples));
    body.push_str("<h2>Tasks</h2><table><tr><th>Task</th><th>Operators</th><th>Worker</th><th>State</th><th>Records in</th><th>Records out</th><th>Watermark</th><th>Error</th></tr>");
    for t in &s.tasks {
        let m = t.metrics.clone().unwrap_or_default();
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.task_id),
            esc(&t.operators),
            esc(&t.worker_id),
            state(&t.state),
            m.records_in,
            m.records_out,
            if m.watermark_ms == i64::MIN { "—".into() } else { when(m.watermark_ms) },
            esc(&t.error)
        );
    }
    body.push_str("</table><h2>Checkpoints</h2><table><tr><th>Id</th><th>Kind</th><th>State</th><th>Triggered</th><th>Duration</th><th>Size</th><th>Uploaded</th><th>Cause</th></tr>");
    for c in s.checkpoints.iter().rev() {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{} ms</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            c.checkpoint_id,
            esc(&c.kind),
            state(&c.state),
            when(c.triggered_at_ms),
            c.duration_ms,
            bytes(c.full_bytes),
            bytes(c.incremental_bytes),
            esc(&c.cause)
        );
    }
    body.push_str("</table><h2>State history</h2><table><tr><th>At</th><th>From</th><th>To</th><th>Why</th></tr>");
    for h in s.history.iter().rev() {
        let _ =
            write!(body, "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>", when(h.at_ms), esc(&h.from), state(&h.to), esc(&h.cause));
    }
    body.push_str("</table>");
    body
}

/// A box's fill: grey as backpressure dominates, from green (idle) to red (busy) otherwise, as
/// Flink colours its graph.
fn fill(r: Option<&Rates>) -> String {
    match r {
        None => "#e8e8e8".into(),
        Some(r) if r.backpressured > r.busy => format!("hsl(0,0%,{:.0}%)", 85.0 - 50.0 * r.backpressured),
        Some(r) => format!("hsl({:.0},70%,{:.0}%)", 120.0 * (1.0 - r.busy), 80.0 - 25.0 * r.busy),
    }
}

/// The job graph as SVG, laid out in layers as Flink draws it: each vertex one column right of
/// its furthest input, vertices of one column stacked, an arrow per exchange named by its routing.
fn graph(s: &JobStatusResponse, now: &BTreeMap<String, Rates>) -> String {
    let mut order: Vec<(u32, &str, u32)> = Vec::new();
    for t in &s.tasks {
        let vertex = t.task_id.split('.').next().and_then(|v| v.parse().ok()).unwrap_or(u32::MAX);
        if !order.iter().any(|(v, _, _)| *v == vertex) {
            order.push((vertex, &t.operators, t.parallelism));
        }
    }
    order.sort();
    // Column: the longest path from a source (edges run from lower to higher vertex ids, so one
    // pass in id order settles it); row: the place among its column's vertices.
    let mut column: BTreeMap<&str, i32> = order.iter().map(|(_, n, _)| (*n, 0)).collect();
    for (_, name, _) in &order {
        let depth = s.edges.iter().filter(|e| e.to == *name).filter_map(|e| column.get(e.from.as_str()).map(|c| c + 1)).max();
        if let (Some(depth), Some(c)) = (depth, column.get_mut(name)) {
            *c = depth;
        }
    }
    let mut rows: BTreeMap<i32, i32> = BTreeMap::new();
    let mut at: BTreeMap<&str, (i32, i32)> = BTreeMap::new();
    let (w, h, gap, vgap) = (230, 76, 90, 24);
    for (_, name, _) in &order {
        let c = column[name];
        let row = rows.entry(c).or_default();
        at.insert(name, (20 + c * (w + gap), 10 + *row * (h + vgap)));
        *row += 1;
    }
    let width = 40 + (rows.len() as i32) * (w + gap);
    let height = 20 + rows.values().max().copied().unwrap_or(1) * (h + vgap);
    let mut svg = format!(
        "<svg class=\"graph\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"system-ui,sans-serif\" font-size=\"12\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"8\" markerHeight=\"8\" orient=\"auto\"><path d=\"M0,0L10,5L0,10z\" fill=\"#555\"/></marker></defs>"
    );
    for e in &s.edges {
        let (Some(&(ax, ay)), Some(&(bx, by))) = (at.get(e.from.as_str()), at.get(e.to.as_str())) else { continue };
        let (x1, y1, x2, y2) = (ax + w, ay + h / 2, bx, by + h / 2);
        let label = if e.late { format!("{} (late)", e.partition) } else { e.partition.clone() };
        let _ = write!(
            svg,
            "<path d=\"M{x1},{y1} C{},{y1} {},{y2} {x2},{y2}\" stroke=\"#555\" fill=\"none\" marker-end=\"url(#arrow)\"/>\
             <text x=\"{}\" y=\"{}\" text-anchor=\"middle\" fill=\"#555\">{}</text>",
            x1 + gap / 2,
            x2 - gap / 2,
            x2 - gap / 2,
            y2 - 6,
            esc(&label)
        );
    }
    for (_, name, parallelism) in &order {
        let (x0, y0) = at[name];
        let r = now.get(*name);
        let figures = match r {
            Some(r) => format!(
                "busy {:.0}% · backpressured {:.0}%</text><text x=\"{}\" y=\"{}\">{:.0} in/s · {:.0} out/s",
                100.0 * r.busy,
                100.0 * r.backpressured,
                x0 + 10,
                y0 + 66,
                r.records_in_per_s,
                r.records_out_per_s
            ),
            None => "no figures yet".into(),
        };
        let _ = write!(
            svg,
            "<g class=\"vertex\"><rect x=\"{x0}\" y=\"{y0}\" width=\"{w}\" height=\"{h}\" rx=\"6\" fill=\"{}\" stroke=\"#444\"/>\
             <text x=\"{}\" y=\"{}\" font-weight=\"600\">{}</text><text x=\"{}\" y=\"{}\">parallelism {parallelism}</text>\
             <text x=\"{}\" y=\"{}\">{figures}</text></g>",
            fill(r),
            x0 + 10,
            y0 + 18,
            esc(name),
            x0 + 10,
            y0 + 34,
            x0 + 10,
            y0 + 50,
        );
    }
    svg.push_str("</svg>");
    svg
}

/// Records out per second of every vertex, and the event-time lag of the job (wall-clock time minus
/// the lowest watermark any vertex reports), over the kept samples, as two small line charts.
fn charts(samples: &[Sample]) -> String {
    if samples.len() < 2 {
        return "<p class=\"muted\">Collecting: the charts fill in every 2 s.</p>".into();
    }
    let mut throughput: BTreeMap<String, Vec<(i64, f64)>> = BTreeMap::new();
    let mut lag: Vec<(i64, f64)> = Vec::new();
    for pair in samples.windows(2) {
        for (name, r) in rates(&pair[0], &pair[1]) {
            throughput.entry(name).or_default().push((pair[1].at_ms, r.records_out_per_s));
        }
        let lowest = pair[1].vertices.values().filter_map(|v| v.watermark_ms).filter(|w| *w != i64::MAX).min();
        if let Some(wm) = lowest {
            lag.push((pair[1].at_ms, pair[1].at_ms.saturating_sub(wm).max(0) as f64 / 1000.0));
        }
    }
    let from = samples[0].at_ms;
    let to = samples[samples.len() - 1].at_ms.max(from + 1);
    let series: Vec<(String, Vec<(i64, f64)>)> = throughput.into_iter().collect();
    let mut out = chart("records out per second", &series, from, to);
    out.push_str(&chart("event-time lag, seconds", &[("lag".to_string(), lag)], from, to));
    out
}

const COLOURS: [&str; 6] = ["#0b57d0", "#c5221f", "#188038", "#a142f4", "#e37400", "#007b83"];

fn chart(title: &str, series: &[(String, Vec<(i64, f64)>)], from: i64, to: i64) -> String {
    if series.iter().all(|(_, points)| points.is_empty()) {
        return format!("<p class=\"muted\">{}: no figures yet.</p>", esc(title));
    }
    let (w, h) = (560.0, 140.0);
    let top = series.iter().flat_map(|(_, p)| p.iter().map(|(_, v)| *v)).fold(0.0_f64, f64::max).max(1.0);
    let mut svg = format!(
        "<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" font-family=\"system-ui,sans-serif\" font-size=\"11\">\
         <text x=\"0\" y=\"12\" font-weight=\"600\">{}</text><text x=\"{}\" y=\"12\" text-anchor=\"end\" fill=\"#777\">max {top:.0}</text>\
         <rect x=\"0\" y=\"18\" width=\"{w}\" height=\"{h}\" fill=\"none\" stroke=\"#ccc\"/>",
        w + 260.0,
        h + 24.0,
        esc(title),
        w
    );
    for (i, (name, points)) in series.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let line: Vec<String> = points
            .iter()
            .map(|(t, v)| format!("{:.1},{:.1}", (t - from) as f64 / (to - from) as f64 * w, 18.0 + h - v / top * h))
            .collect();
        let _ = write!(
            svg,
            "<polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\"/><text x=\"{}\" y=\"{}\" fill=\"{colour}\">{}</text>",
            line.join(" "),
            w + 8.0,
            32.0 + 14.0 * i as f64,
            esc(name)
        );
    }
    svg.push_str("</svg>");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;
    use eddy_proto::{GraphEdge, TaskMetrics, TaskView};

    fn sample(at_ms: i64, busy_ms: u64, records_out: u64) -> Sample {
        let totals = VertexTotals { tasks: 2, records_out, busy_ms, watermark_ms: Some(at_ms - 3_000), ..Default::default() };
        Sample { at_ms, attempt: 1, vertices: [("events -> hop".to_string(), totals)].into() }
    }

    #[test]
    fn rates_are_per_second_and_shares_per_task() {
        let r = rates(&sample(10_000, 0, 0), &sample(12_000, 2_000, 5_000));
        let r = r["events -> hop"];
        assert_eq!(r.records_out_per_s, 2_500.0);
        // 2,000 busy ms over 2 s and two tasks: each was busy half the time.
        assert_eq!(r.busy, 0.5);
        // Across a restart the totals start again: no rate.
        let mut restarted = sample(14_000, 10, 10);
        restarted.attempt = 2;
        assert!(rates(&sample(12_000, 2_000, 5_000), &restarted).is_empty());
    }

    #[test]
    fn the_job_page_shows_the_graph_tasks_and_escapes_names() {
        let task = |task_id: &str, operators: &str| TaskView {
            task_id: task_id.into(),
            operators: operators.into(),
            parallelism: 1,
            worker_id: "w1".into(),
            state: "running".into(),
            metrics: Some(TaskMetrics::default()),
            ..Default::default()
        };
        let status = JobStatusResponse {
            job: Some(JobSummary { job_id: "j1".into(), name: "<process>".into(), state: "running".into(), ..Default::default() }),
            tasks: vec![task("0.0", "events"), task("1.0", "hop")],
            edges: vec![GraphEdge { from: "events".into(), to: "hop".into(), partition: "hash".into(), late: false }],
            ..Default::default()
        };
        let html = render_job(&status, &[sample(10_000, 0, 0), sample(12_000, 2_000, 5_000)]);
        assert!(html.contains("&lt;process&gt;") && !html.contains("<process>"), "{html}");
        assert!(html.contains("<svg class=\"graph\""), "{html}");
        assert!(html.contains(">events</text>") && html.contains(">hop</text>") && html.contains(">hash</text>"), "{html}");
        assert!(html.contains("<svg class=\"chart\""), "{html}");
    }
}
