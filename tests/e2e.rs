//! End-to-end tests: the real coordinator, workers and CLI as separate processes on loopback.

mod compose;
mod pipeline;
mod recovery;
mod replicated;

use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use eddy_tests::{read_jsonl, rss_mib, Cluster};
use serde_json::Value;

const SIZE_MS: i64 = 600_000;

/// HOP(10 min, 5 s) SUM and COUNT of the generator's score per key, for specs to include.
const HOP_WINDOW: &str = r#"[[window]]
name = "hop"
input = "events"
kind = "hop"
size = "10m"
slide = "5s"
key = ["k"]
aggregates = "SUM(score) AS total, COUNT(*) AS n"
"#;
const SLIDE_MS: i64 = 5_000;

fn hop_spec(out: &str) -> String {
    format!(
        r#"
name = "hop-e2e"

[[source]]
name = "events"
connector = "generator"
options = {{ count = 1000000, keys = 1000, seed = 11, events_per_ms = 10, disorder_ms = 300 }}
event_time = {{ column = "ts", allowed_delay = "1s" }}

{HOP_WINDOW}parallelism = 4

[[sink]]
name = "windows"
input = "hop"
connector = "file"
options = {{ path = "{out}/windows.jsonl" }}

[[sink]]
name = "raw"
input = "events"
connector = "file"
options = {{ path = "{out}/events.jsonl" }}

[[sink]]
name = "late"
input = "hop.late"
connector = "file"
parallelism = 1
options = {{ path = "{out}/late.jsonl" }}
"#
    )
}

/// Every HOP window's SUM and COUNT per key, computed naively from the events the source emitted:
/// each event is added to each of the size/slide windows that contain it.
fn reference(events: &[Value]) -> Result<HashMap<(i64, i64), (f64, i64)>> {
    let mut out: HashMap<(i64, i64), (f64, i64)> = HashMap::new();
    for e in events {
        let k = e["k"].as_i64().context("k")?;
        let ts = e["ts"].as_i64().context("ts")?;
        let score = e["score"].as_f64().context("score")?;
        let mut end = (ts.div_euclid(SLIDE_MS) + 1) * SLIDE_MS;
        while end - SIZE_MS <= ts {
            let w = out.entry((k, end)).or_insert((0.0, 0));
            w.0 += score;
            w.1 += 1;
            end += SLIDE_MS;
        }
    }
    Ok(out)
}

#[test]
fn hop_window_on_two_workers_equals_reference() -> Result<()> {
    let cluster = Cluster::start("hop", 2, 4)?;
    let workers = cluster.eddy_json(&["workers"])?;
    assert_eq!(workers.as_array().map(Vec::len), Some(2), "{workers}");

    let out = cluster.dir.0.join("out");
    let job = cluster.submit("hop", &hop_spec(out.to_str().context("path")?))?;
    let status = cluster.wait_state(&job, "finished", Duration::from_secs(180))?;

    // The window's four subtasks are spread over both workers.
    let window_workers: std::collections::BTreeSet<&str> = status["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .filter(|t| t["operators"].as_str().is_some_and(|o| o.starts_with("hop")))
        .map(|t| t["worker_id"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(window_workers.len(), 2, "window tasks should use both workers: {status}");
    let history: Vec<&str> = status["history"].as_array().context("history")?.iter().filter_map(|h| h["to"].as_str()).collect();
    assert_eq!(history, ["created", "scheduling", "running", "finished"]);

    let events = read_jsonl(&[out.join("events.jsonl")])?;
    assert_eq!(events.len(), 1_000_000);
    let expected = reference(&events)?;
    let results = read_jsonl(&(0..4).map(|i| out.join(format!("windows.jsonl.{i}"))).collect::<Vec<_>>())?;
    let mut seen = HashMap::new();
    for r in &results {
        let key = (r["k"].as_i64().context("k")?, r["window_end"].as_i64().context("window_end")?);
        assert_eq!(r["window_start"].as_i64(), Some(key.1 - SIZE_MS), "{r}");
        let value = (r["total"].as_f64().context("total")?, r["n"].as_i64().context("n")?);
        assert!(seen.insert(key, value).is_none(), "window {key:?} emitted twice");
    }
    // Disorder (300 ms) stays inside the allowed delay (1 s): nothing is late, every window is exact.
    assert!(read_jsonl(&[out.join("late.jsonl")])?.is_empty(), "no event should be late");
    assert_eq!(seen.len(), expected.len(), "number of (key, window) results");
    for (key, want) in &expected {
        assert_eq!(seen.get(key), Some(want), "window result for (k, window_end) = {key:?}");
    }

    let jobs = cluster.eddy_json(&["jobs"])?;
    assert_eq!(jobs[0]["job_id"], job.as_str());
    assert_eq!(jobs[0]["state"], "finished");
    // The human-readable forms print tables with the job and its tasks.
    let table = String::from_utf8(cluster.eddy(&["status", &job])?.stdout)?;
    assert!(table.contains("hop") && table.contains("finished") && table.contains("w1") && table.contains("w2"), "{table}");
    Ok(())
}

/// Files in `dir` and its folders (none when it does not exist).
fn files_under(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    std::fs::read_dir(dir)
        .map(|entries| entries.flatten().flat_map(|e| if e.path().is_dir() { files_under(&e.path()) } else { vec![e.path()] }).collect())
        .unwrap_or_default()
}

fn endless_spec(parallelism: u32) -> String {
    format!(
        r#"
name = "endless"
parallelism = {parallelism}

[[source]]
name = "events"
connector = "generator"
options = {{ keys = 100, rate = 2000 }}
event_time = {{ column = "ts", allowed_delay = "1s" }}

[[window]]
name = "counts"
input = "events"
kind = "tumble"
size = "1s"
key = ["k"]
aggregates = "COUNT(*) AS n"

[[sink]]
name = "out"
input = "counts"
connector = "discard"
"#
    )
}

#[test]
fn cancel_stops_a_running_job() -> Result<()> {
    let cluster = Cluster::start("cancel", 2, 2)?;
    let job = cluster.submit("endless", &endless_spec(2))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let completed = |c: &Cluster| -> Result<bool> {
        Ok(c.status(&job)?["checkpoints"].as_array().is_some_and(|l| l.iter().any(|v| v["state"] == "completed")))
    };
    cluster.wait(Duration::from_secs(30), "records to flow and a checkpoint to complete", |c| {
        Ok(c.status(&job)?["tasks"][0]["records_out"].as_u64().unwrap_or(0) > 0 && completed(c)?)
    })?;
    let folder = cluster.dir.0.join("coordinator").join("checkpoints").join(&job);
    let before = files_under(&folder);
    assert!(!before.is_empty(), "no checkpoint files under {}", folder.display());
    let out = cluster.eddy(&["cancel", &job])?;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status = cluster.wait_state(&job, "cancelled", Duration::from_secs(10))?;
    assert!(status["tasks"].as_array().context("tasks")?.iter().all(|t| t["state"] == "cancelled"), "{status}");
    // Nothing can restore a cancelled job without a savepoint: its checkpoints' files are gone.
    // (An upload still running when the task stopped may leave its files behind.)
    cluster.wait(Duration::from_secs(10), "the cancelled job's checkpoint files to go", |_| {
        Ok(files_under(&folder).iter().all(|f| !before.contains(f)))
    })?;
    // The slots are free again.
    let workers = cluster.eddy_json(&["workers"])?;
    assert!(workers.as_array().context("workers")?.iter().all(|w| w["slots_used"] == 0), "{workers}");
    // Cancelling again is refused with a meaningful exit code.
    assert_eq!(cluster.eddy(&["cancel", &job])?.status.code(), Some(7));
    Ok(())
}

/// A coordinator that hangs with its sockets open (SIGSTOP: a frozen host, or a network that
/// dropped its packets) stops renewing the worker's lease: the worker stops its tasks once the
/// lease runs out instead of running them on, unsupervised, for good. Once the coordinator runs
/// again, the job restarts on the worker.
#[test]
fn a_worker_stops_its_tasks_when_its_coordinator_hangs() -> Result<()> {
    let cluster = Cluster::start("hang", 1, 2)?;
    let job = cluster.submit("endless", &endless_spec(1))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let log = cluster.dir.0.join("w1.log");
    let stopped = |_: &Cluster| -> Result<bool> {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        Ok(text.lines().any(|l| l.contains("cancelling job tasks") && l.contains("the lease")))
    };
    assert!(!stopped(&cluster)?, "the tasks stopped before the coordinator hung");
    cluster.signal_coordinator("STOP")?;
    // Within the lease (8 s without a renewal), with room for a busy machine.
    let waited = cluster.wait(Duration::from_secs(90), "the worker to stop its tasks", stopped);
    cluster.signal_coordinator("CONT")?;
    waited?;
    cluster.wait(Duration::from_secs(60), "the job to run again", |c| {
        let s = c.status(&job)?;
        Ok(s["state"] == "running" && s["attempt"].as_u64().unwrap_or(0) >= 2)
    })?;
    Ok(())
}

#[test]
fn lost_worker_restarts_its_jobs_on_the_slots_left() -> Result<()> {
    let mut cluster = Cluster::start("lost", 2, 2)?;
    let job = cluster.submit("endless", &endless_spec(2))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let killed_at = Instant::now();
    cluster.kill_worker("w2")?;
    cluster.wait(Duration::from_secs(10), "the job to restart", |c| Ok(c.status(&job)?["state"] != "running"))?;
    let noticed = killed_at.elapsed();
    assert!(noticed < Duration::from_secs(3), "a lost worker must be noticed within 3 s, took {noticed:?}");
    let workers = cluster.eddy_json(&["workers"])?;
    let w2 = workers.as_array().context("workers")?.iter().find(|w| w["worker_id"] == "w2").context("w2 listed")?;
    assert!(w2["state"].as_str().is_some_and(|s| s.starts_with("lost")), "{workers}");
    // The job runs again, all on w1's two slots, as attempt 2; its history names the lost worker.
    cluster.wait(Duration::from_secs(20), "attempt 2 to run", |c| {
        let s = c.status(&job)?;
        Ok(s["state"] == "running" && s["attempt"] == 2)
    })?;
    let status = cluster.status(&job)?;
    assert!(status["tasks"].as_array().context("tasks")?.iter().all(|t| t["worker_id"] == "w1"), "{status}");
    let restart = status["history"].as_array().context("history")?.iter().find(|h| h["to"] == "restarting").cloned().unwrap_or_default();
    assert!(restart["cause"].as_str().is_some_and(|c| c.contains("worker w2 lost")), "cause should name the worker: {status}");
    cluster.eddy(&["cancel", &job])?;
    cluster.wait(Duration::from_secs(10), "w1's slots to be free", |c| {
        let w = c.eddy_json(&["workers"])?;
        Ok(w.as_array().is_some_and(|a| a.iter().any(|w| w["worker_id"] == "w1" && w["slots_used"] == 0)))
    })?;
    Ok(())
}

#[test]
fn invalid_specs_are_rejected_naming_the_field() -> Result<()> {
    let cluster = Cluster::start("invalid", 1, 2)?;
    let cases = [
        // (what to change in a valid spec, text the error must contain)
        (("kind = \"tumble\"", "kind = \"tumble\"\nwindow_size = \"1s\""), "window_size"),
        (("size = \"1s\"", "size = \"1 fortnight\""), "window[counts].size"),
        (("key = [\"k\"]", "key = [\"user\"]"), "unknown column `user`"),
        (("COUNT(*) AS n", "SUM(ts) AS n"), "window[counts].aggregates"),
    ];
    for ((from, to), needle) in cases {
        let spec = endless_spec(1).replace(from, to);
        let path = cluster.dir.0.join("bad.toml");
        std::fs::write(&path, &spec)?;
        let out = cluster.eddy(&["submit", path.to_str().context("path")?])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "invalid spec must exit 4: {stderr}");
        assert!(stderr.contains(needle), "error should mention `{needle}`: {stderr}");
    }
    // A type mismatch in a transform names the field and the types.
    let spec = endless_spec(1)
        .replace("[[window]]", "[[transform]]\nname = \"t\"\ninput = \"events\"\nselect = \"k, score + 'x' AS bad, ts\"\n\n[[window]]")
        .replace("input = \"events\"\nkind", "input = \"t\"\nkind");
    let path = cluster.dir.0.join("bad.toml");
    std::fs::write(&path, &spec)?;
    let out = cluster.eddy(&["submit", path.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(4), "{stderr}");
    assert!(stderr.contains("transform[t].select"), "{stderr}");
    // An unset variable is named.
    let out = cluster.eddy_env(&["submit", path.to_str().context("path")?], &[])?;
    assert!(!out.status.success());
    std::fs::write(&path, endless_spec(1).replace("keys = 100", "keys = ${EDDY_TEST_UNSET_VAR}"))?;
    let out = cluster.eddy(&["submit", path.to_str().context("path")?])?;
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("EDDY_TEST_UNSET_VAR"));
    // No job was created by any of these.
    assert_eq!(cluster.eddy_json(&["jobs"])?, serde_json::json!([]));
    Ok(())
}

/// The binaries as a user runs them: without the cluster's secret the CLI is refused (exit code
/// 8) and told what to set; a coordinator or worker asked to listen beyond loopback without a
/// secret does not start, and says how to make one.
#[test]
fn without_the_secret_the_cli_is_refused_and_open_listeners_do_not_start() -> Result<()> {
    let cluster = Cluster::start("secret", 1, 1)?;
    let without_secret = |program: &str| {
        let mut cmd = Command::new(eddy_tests::bin(program));
        cmd.env_remove("EDDY_SECRET").env_remove("EDDY_SECRET_FILE");
        cmd
    };
    let out = without_secret("eddy").args(["jobs", "--coordinator", &cluster.address]).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(8), "{stderr}");
    assert!(stderr.contains("requires its secret") && stderr.contains("EDDY_SECRET_FILE"), "{stderr}");
    let out = cluster.eddy(&["jobs"])?;
    assert!(out.status.success(), "with the secret: {}", String::from_utf8_lossy(&out.stderr));

    let state = cluster.dir.0.join("open-worker");
    let open: [(&str, Vec<&str>); 2] = [
        ("eddy-coordinator", vec!["--listen", "0.0.0.0:0", "--data-dir", cluster.dir.0.to_str().context("dir")?]),
        ("eddy-worker", vec!["--listen", "0.0.0.0:0", "--coordinator", &cluster.address, "--state-dir", state.to_str().context("dir")?]),
    ];
    for (program, args) in open {
        let out = without_secret(program).args(&args).stdin(std::process::Stdio::null()).output()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{program} started: {stderr}");
        assert!(stderr.contains("refusing to listen on 0.0.0.0") && stderr.contains("EDDY_SECRET_FILE"), "{program}: {stderr}");
    }
    Ok(())
}

#[test]
fn job_that_does_not_fit_is_refused_and_unreachable_coordinator_is_reported() -> Result<()> {
    let cluster = Cluster::start("fit", 1, 2)?;
    let path = cluster.dir.0.join("big.toml");
    std::fs::write(&path, endless_spec(3))?;
    let out = cluster.eddy(&["submit", path.to_str().context("path")?])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(6), "{stderr}");
    assert!(stderr.contains("needs 3 slots") && stderr.contains("2 free"), "{stderr}");
    assert_eq!(cluster.eddy_json(&["jobs"])?, serde_json::json!([]));

    let out = Command::new(eddy_tests::bin("eddy"))
        .args(["jobs", "--coordinator", &format!("127.0.0.1:{}", eddy_tests::free_port())])
        .output()?;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach the coordinator"));
    Ok(())
}

/// A sink throttled to 1,000 rows/s on another worker slows an unthrottled source down to its pace,
/// across a gRPC exchange, while both workers' memory stays flat.
#[test]
fn slow_sink_backpressures_the_source_with_flat_memory() -> Result<()> {
    let cluster = Cluster::start("backpressure", 2, 1)?;
    let spec = slow_sink_spec("backpressure", &cluster.dir.0.join("slow.jsonl"));
    // The source has parallelism 1 and the sink 2, so the sink is not chained to it: rows cross
    // an exchange, and sink subtask 1 runs on the other worker.
    let job = cluster.submit("backpressure", &spec)?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let produced = |c: &Cluster| -> Result<u64> {
        let s = c.status(&job)?;
        s["tasks"]
            .as_array()
            .context("tasks")?
            .iter()
            .find(|t| t["operators"] == "events")
            .and_then(|t| t["records_out"].as_u64())
            .context("source")
    };
    // The buffers between source and sinks fill at once; measure once the sinks have worked for
    // about two seconds (4,000 rows at 2,000 rows/s), when only their pace moves the source.
    let consumed = |c: &Cluster| -> Result<u64> {
        let s = c.status(&job)?;
        Ok(s["tasks"]
            .as_array()
            .context("tasks")?
            .iter()
            .filter(|t| t["operators"] == "slow")
            .filter_map(|t| t["records_in"].as_u64())
            .sum())
    };
    cluster.wait(Duration::from_secs(30), "the sinks to work through 4,000 rows", |c| Ok(consumed(c)? >= 4_000))?;
    let rss = |c: &Cluster| -> Result<f64> { Ok(rss_mib(c.worker_pid("w1"))?.max(rss_mib(c.worker_pid("w2"))?)) };
    let (p1, m1) = (produced(&cluster)?, rss(&cluster)?);
    std::thread::sleep(Duration::from_secs(6));
    let (p2, m2) = (produced(&cluster)?, rss(&cluster)?);
    let rate = (p2 - p1) as f64 / 6.0;
    eprintln!("source rate under backpressure: {rate:.0} rows/s; worker RSS {m1:.1} MiB -> {m2:.1} MiB");
    // Two sink subtasks at 1,000 rows/s each: the source must run at about 2,000 rows/s, not the
    // millions per second it manages unthrottled. Buffers in between hold at most a few tens of
    // thousands of rows.
    assert!(rate < 4_000.0, "source not slowed down: {rate:.0} rows/s");
    assert!(rate > 1_000.0, "source stalled: {rate:.0} rows/s");
    assert!(p2 < 200_000, "too many rows buffered: {p2} produced in ~10 s");
    // Memory bound: each worker stays under 64 MiB and grows by less than 8 MiB over 6 s.
    assert!(m2 < 64.0, "worker RSS {m2:.1} MiB over the 64 MiB bound");
    assert!(m2 - m1 < 8.0, "worker RSS grew from {m1:.1} to {m2:.1} MiB");
    cluster.eddy(&["cancel", &job])?;
    Ok(())
}

/// A generator (parallelism 1) feeding a file sink throttled to 1,000 rows/s per subtask
/// (parallelism 2, so not chained: rows cross an exchange, to the other worker for subtask 1).
fn slow_sink_spec(name: &str, out: &std::path::Path) -> String {
    format!(
        r#"
name = "{name}"

[[source]]
name = "events"
connector = "generator"
options = {{ keys = 1000 }}

[[sink]]
name = "slow"
input = "events"
connector = "file"
partition = "rebalance"
parallelism = 2
options = {{ path = "{}", rows_per_second = 1000 }}
"#,
        out.display()
    )
}

/// The samples of metric `name` in a Prometheus text scrape whose labels include `label`.
fn samples(scrape: &str, name: &str, label: &str) -> Vec<f64> {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// Each worker's `/metrics` names its tasks with Flink's figures, and they move while data flows:
/// the sinks' records in grow, and the source held back by the slow sinks is backpressured far
/// longer than it is busy.
#[test]
fn worker_metrics_show_records_flowing_and_where_the_time_goes() -> Result<()> {
    let cluster = Cluster::start("metrics", 2, 1)?;
    let job = cluster.submit("metrics", &slow_sink_spec("metrics", &cluster.dir.0.join("slow.jsonl")))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let scrape = |c: &Cluster| -> Result<String> { Ok(format!("{}{}", c.worker_metrics("w1")?, c.worker_metrics("w2")?)) };
    let sum = |text: &str, name: &str, label: &str| samples(text, name, label).iter().sum::<f64>();
    let (source, sink) = ("vertex=\"events\"", "vertex=\"slow\"");
    cluster.wait(Duration::from_secs(30), "the sinks to report rows", |c| {
        Ok(sum(&scrape(c)?, "eddy_task_records_in_total", sink) >= 1_000.0)
    })?;
    let first = scrape(&cluster)?;
    for name in ["eddy_task_records_in_total", "eddy_task_records_out_total", "eddy_task_busy_ms_total", "eddy_task_idle_ms_total"] {
        assert_eq!(samples(&first, name, &format!("job=\"{job}\"")).len(), 3, "{name}: one sample per task in\n{first}");
    }
    assert!(first.contains("# TYPE eddy_task_backpressured_ms counter"), "{first}");
    let sunk = sum(&first, "eddy_task_records_in_total", sink);
    cluster.wait(Duration::from_secs(30), "the sinks' records in to grow by 2,000", |c| {
        Ok(sum(&scrape(c)?, "eddy_task_records_in_total", sink) >= sunk + 2_000.0)
    })?;
    let second = scrape(&cluster)?;
    let grew = |name: &str, label: &str| sum(&second, name, label) - sum(&first, name, label);
    assert!(grew("eddy_task_records_out_total", source) > 0.0, "the source's records out did not move:\n{first}\n{second}");
    assert!(grew("eddy_task_busy_ms_total", sink) > 0.0, "the sinks were never busy:\n{first}\n{second}");
    let (waited, worked) = (grew("eddy_task_backpressured_ms_total", source), grew("eddy_task_busy_ms_total", source));
    assert!(waited > 4.0 * worked, "the source waited {waited} ms and worked {worked} ms: it is not shown backpressured");
    // The coordinator's view: the job running on two workers, its vertices' totals moving.
    let before = cluster.coordinator_metrics()?;
    let sunk = sum(&before, "eddy_job_vertex_records_in_total", sink);
    cluster.wait(Duration::from_secs(30), "the coordinator's totals to move", |c| {
        Ok(sum(&c.coordinator_metrics()?, "eddy_job_vertex_records_in_total", sink) >= sunk + 1_000.0)
    })?;
    let after = cluster.coordinator_metrics()?;
    let running = format!("eddy_job_state{{job=\"{job}\",name=\"metrics\",state=\"running\"}} 1");
    assert!(after.contains(&running), "{running} missing from\n{after}");
    assert_eq!(samples(&after, "eddy_workers", "state=\"alive\""), [2.0], "{after}");
    cluster.eddy(&["cancel", &job])?;
    Ok(())
}

/// The coordinator's web page, rendered by headless Chromium as a user's browser would: the job's
/// name and state, and its graph with both vertices and their live figures. The screenshot is kept
/// in the test's directory (`EDDY_SCREENSHOT=FILE` copies it out, as the README's was made).
#[test]
fn the_web_page_shows_a_running_job_and_its_graph_in_chromium() -> Result<()> {
    let Some(chromium) = ["chromium", "chromium-browser"].into_iter().find(|c| Command::new(c).arg("--version").output().is_ok()) else {
        assert!(
            std::env::var_os("EDDY_TEST_REQUIRE_SERVICES").is_none(),
            "chromium is missing though the test command installs it: apt-get install chromium"
        );
        eprintln!("skipped: no chromium to render the web page with (apt-get install chromium)");
        return Ok(());
    };
    let cluster = Cluster::start("web", 2, 1)?;
    let job = cluster.submit("web", &slow_sink_spec("web-page", &cluster.dir.0.join("slow.jsonl")))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    let url = format!("{}jobs/{job}", cluster.web_url());
    let render = |args: &[&str]| -> Result<String> {
        let out = Command::new(chromium)
            .args(["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--window-size=1280,1000"])
            .args(args)
            .arg(&url)
            .output()?;
        anyhow::ensure!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // The rates need two samples of the coordinator's (every 2 s).
    cluster.wait(Duration::from_secs(30), "the page to show the vertices' rates", |_| Ok(render(&["--dump-dom"])?.contains(" out/s")))?;
    let dom = render(&["--dump-dom"])?;
    for shown in [
        "<h1>web-page <span class=\"state running\">running</span></h1>",
        "<svg class=\"graph\"",
        ">events</text>",
        ">slow</text>",
        ">rebalance</text>",
    ] {
        assert!(dom.contains(shown), "{shown} is not on the rendered page:\n{dom}");
    }
    let png = cluster.dir.0.join("job-page.png");
    render(&[&format!("--screenshot={}", png.display())])?;
    let image = std::fs::read(&png)?;
    assert!(image.starts_with(b"\x89PNG") && image.len() > 10_000, "no real screenshot: {} bytes", image.len());
    if let Some(copy) = std::env::var_os("EDDY_SCREENSHOT") {
        std::fs::copy(&png, copy)?;
    }
    cluster.eddy(&["cancel", &job])?;
    Ok(())
}
