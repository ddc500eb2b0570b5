//! End-to-end tests: the real coordinator, workers and CLI as separate processes on loopback.

mod pipeline;
mod recovery;
mod replicated;

use std::collections::HashMap;
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
        let mut cmd = std::process::Command::new(eddy_tests::bin(program));
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

    let out = std::process::Command::new(eddy_tests::bin("eddy"))
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
    let out = cluster.dir.0.join("slow.jsonl");
    let spec = format!(
        r#"
name = "backpressure"

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
    );
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
