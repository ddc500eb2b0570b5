//! Checkpoints and recovery on the engine: workers killed with SIGKILL, a coordinator restarted,
//! jobs rescaled through savepoints; every time the window results and the raw event file end up
//! exactly as in a run without failures (each event once, each window once and exact).

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use eddy_tests::{read_jsonl, Cluster, S3Storage, Services};
use serde_json::Value;

use crate::{reference, HOP_WINDOW, SIZE_MS};

const EVENTS: u64 = 300_000;

fn spec(out: &str, rate: u64) -> String {
    format!(
        r#"
name = "recovery"
parallelism = 2

[state]
checkpoint_interval = "500ms"

[[source]]
name = "events"
connector = "generator"
parallelism = 1
options = {{ count = {EVENTS}, keys = 200, seed = 21, events_per_ms = 5, disorder_ms = 300, rate = {rate} }}
event_time = {{ column = "ts", allowed_delay = "1s" }}

{HOP_WINDOW}
[[sink]]
name = "windows"
input = "hop"
connector = "file"
parallelism = 1
options = {{ path = "{out}/windows.jsonl" }}

[[sink]]
name = "raw"
input = "events"
connector = "file"
parallelism = 1
options = {{ path = "{out}/events.jsonl" }}
"#
    )
}

/// Checks the job's outputs: every generated event exactly once, and every window result exactly
/// once and equal to the reference computed from those events.
fn check_outputs(out: &std::path::Path) -> Result<()> {
    let events = read_jsonl(&[out.join("events.jsonl")])?;
    let seqs: BTreeSet<i64> = events.iter().filter_map(|e| e["seq"].as_i64()).collect();
    ensure!(events.len() as u64 == EVENTS, "{} events written, expected {EVENTS} (each exactly once)", events.len());
    ensure!(seqs.len() as u64 == EVENTS, "{} distinct events, expected {EVENTS}", seqs.len());
    let expected = reference(&events)?;
    let mut seen = HashMap::new();
    for r in read_jsonl(&[out.join("windows.jsonl")])? {
        let key = (r["k"].as_i64().context("k")?, r["window_end"].as_i64().context("window_end")?);
        ensure!(r["window_start"].as_i64() == Some(key.1 - SIZE_MS), "{r}");
        let value = (r["total"].as_f64().context("total")?, r["n"].as_i64().context("n")?);
        ensure!(seen.insert(key, value).is_none(), "window {key:?} written twice");
    }
    ensure!(seen.len() == expected.len(), "{} window results, expected {}", seen.len(), expected.len());
    for (key, want) in &expected {
        let got = seen.get(key);
        ensure!(got.is_some_and(|g| (g.0 - want.0).abs() < 1e-6 && g.1 == want.1), "window {key:?}: got {got:?}, want {want:?}");
    }
    Ok(())
}

/// The newest completed checkpoint's id (0 for none).
fn completed_checkpoints(status: &Value) -> u64 {
    status["checkpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == "completed")
        .filter_map(|c| c["checkpoint_id"].as_u64())
        .max()
        .unwrap_or(0)
}

fn attempt(status: &Value) -> u64 {
    status["attempt"].as_u64().unwrap_or(0)
}

/// Workers running the job's window tasks.
fn window_workers(status: &Value) -> BTreeSet<String> {
    status["tasks"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|t| t["operators"].as_str().is_some_and(|o| o.starts_with("hop")))
        .filter_map(|t| t["worker_id"].as_str().map(str::to_string))
        .collect()
}

/// Waits until the job runs attempt `n` and has completed a checkpoint since (so there is state
/// to recover next time); returns how long the job took to run again.
fn wait_recovered(cluster: &Cluster, job: &str, n: u64, since: Instant) -> Result<Duration> {
    cluster.wait(Duration::from_secs(60), &format!("attempt {n} to run"), |c| {
        let s = c.status(job)?;
        Ok(attempt(&s) >= n && s["state"] == "running")
    })?;
    let took = since.elapsed();
    let before = completed_checkpoints(&cluster.status(job)?);
    cluster.wait(Duration::from_secs(30), "a checkpoint of the new attempt", |c| Ok(completed_checkpoints(&c.status(job)?) > before))?;
    Ok(took)
}

#[test]
fn killed_workers_and_a_restarted_coordinator_recover_exactly() -> Result<()> {
    kill_workers_and_restart_the_coordinator(&mut Cluster::start("recover", 3, 1)?)
}

/// The same faults with checkpoints in an S3-protocol store, which the coordinator and the
/// workers reach over HTTP and share no directory for.
#[test]
fn killed_workers_and_a_restarted_coordinator_recover_exactly_from_s3() -> Result<()> {
    let s3 = S3Storage::for_test(&Services::start()?, "recover")?;
    let mut cluster = Cluster::start_storing("recover-s3", 3, 1, Some(&s3))?;
    kill_workers_and_restart_the_coordinator(&mut cluster)?;
    let local = cluster.dir.0.join("coordinator").join("checkpoints");
    ensure!(!local.exists(), "checkpoints went to {}, not to {}", local.display(), s3.url);
    Ok(())
}

fn kill_workers_and_restart_the_coordinator(cluster: &mut Cluster) -> Result<()> {
    let out = cluster.dir.0.join("out");
    let job = cluster.submit("recovery", &spec(out.to_str().context("path")?, 15_000))?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    cluster.wait(Duration::from_secs(20), "a first checkpoint", |c| Ok(completed_checkpoints(&c.status(&job)?) >= 1))?;

    // 1. SIGKILL a worker running a window task: the job restarts on the slots left.
    let victim = window_workers(&cluster.status(&job)?).into_iter().next_back().context("a window worker")?;
    let killed = Instant::now();
    cluster.kill_worker(&victim)?;
    let took = wait_recovered(cluster, &job, 2, killed)?;
    eprintln!("killed {victim}: running again after {took:?}");
    let status = cluster.status(&job)?;
    let history = status["history"].as_array().context("history")?;
    ensure!(
        history
            .iter()
            .any(|h| h["to"] == "restarting" && h["cause"].as_str().is_some_and(|c| c.contains(&format!("worker {victim} lost")))),
        "the restart should name the lost worker: {status}"
    );

    // 2. The coordinator dies and comes back: it adopts the tasks the workers kept running
    // (same attempt, no restart), and checkpoints go on.
    let checkpoint = completed_checkpoints(&cluster.status(&job)?);
    cluster.restart_coordinator()?;
    let restarted = Instant::now();
    cluster.wait(Duration::from_secs(30), "the restarted coordinator to adopt the job", |c| {
        let s = c.status(&job)?;
        Ok(s["cause"].as_str().is_some_and(|c| c.contains("adopted")))
    })?;
    ensure!(attempt(&cluster.status(&job)?) == 2, "adopted, not restarted: {}", cluster.status(&job)?);
    cluster
        .wait(Duration::from_secs(30), "a checkpoint after the adoption", |c| Ok(completed_checkpoints(&c.status(&job)?) > checkpoint))?;
    eprintln!("coordinator restarted: job adopted after {:?}", restarted.elapsed());

    // 3. Another window worker dies; with one slot left the job waits until a new worker joins.
    let victim = window_workers(&cluster.status(&job)?).into_iter().next_back().context("a window worker")?;
    cluster.kill_worker(&victim)?;
    cluster.wait(Duration::from_secs(20), "the job to wait for slots", |c| {
        Ok(c.status(&job)?["cause"].as_str().is_some_and(|s| s.contains("waiting for slots")))
    })?;
    cluster.add_worker("w4", 1)?;

    let status = cluster.wait_state(&job, "finished", Duration::from_secs(120))?;
    ensure!(status["restarts"].as_u64() >= Some(2), "{status}");
    check_outputs(&out)
}

#[test]
fn rescale_and_savepoints_keep_windows_exact() -> Result<()> {
    let cluster = Cluster::start("rescale", 2, 2)?;
    let out = cluster.dir.0.join("out");
    let spec_text = spec(out.to_str().context("path")?, 20_000);
    let job = cluster.submit("rescale", &spec_text)?;
    cluster.wait_state(&job, "running", Duration::from_secs(20))?;
    cluster.wait(Duration::from_secs(20), "a first checkpoint", |c| Ok(completed_checkpoints(&c.status(&job)?) >= 1))?;
    let windows = |c: &Cluster| -> Result<usize> {
        Ok(c.status(&job)?["tasks"]
            .as_array()
            .context("tasks")?
            .iter()
            .filter(|t| t["operators"].as_str().is_some_and(|o| o.starts_with("hop")))
            .count())
    };
    ensure!(windows(&cluster)? == 2);

    // 2 -> 4: the key groups of two subtasks spread over four.
    let r = cluster.eddy_json(&["rescale", &job, "4"])?;
    ensure!(r["savepoint_id"].as_str().is_some_and(|s| s.starts_with(&job)), "{r}");
    wait_recovered(&cluster, &job, 2, Instant::now())?;
    ensure!(windows(&cluster)? == 4, "{}", cluster.status(&job)?);

    // 4 -> 1, through a savepoint taken with the cancel and a new job submitted from it.
    let saved = cluster.eddy_json(&["cancel", "--savepoint", &job])?;
    let savepoint = saved["savepoint_id"].as_str().context("savepoint id")?.to_string();
    cluster.wait_state(&job, "cancelled", Duration::from_secs(20))?;
    let path = cluster.dir.0.join("rescaled.toml");
    std::fs::write(&path, spec_text.replace("parallelism = 2\n", "parallelism = 1\n"))?;
    let resumed = cluster.eddy_json(&["submit", path.to_str().context("path")?, "--from-savepoint", &savepoint])?;
    let resumed = resumed["job_id"].as_str().context("job id")?.to_string();
    let status = cluster.wait_state(&resumed, "finished", Duration::from_secs(120))?;
    ensure!(
        status["tasks"]
            .as_array()
            .context("tasks")?
            .iter()
            .filter(|t| t["operators"].as_str().is_some_and(|o| o.starts_with("hop")))
            .count()
            == 1
    );
    // The savepoint is listed with the cancelled job; an unknown one is refused.
    let old = cluster.status(&job)?;
    ensure!(old["checkpoints"].as_array().context("checkpoints")?.iter().any(|c| c["savepoint_id"] == savepoint.as_str()), "{old}");
    let refused = cluster.eddy(&["submit", path.to_str().context("path")?, "--from-savepoint", "no-such-savepoint"])?;
    ensure!(refused.status.code() == Some(5), "{}", String::from_utf8_lossy(&refused.stderr));
    check_outputs(&out)
}

/// The Kafka upsert source restores its offsets and its last row per key together: while a
/// producer keeps updating 200 keys, the consuming worker is killed twice; the changelog the job
/// writes stays consistent (each retraction retracts the key's current row) and ends at every key's
/// last version.
#[test]
fn kafka_upsert_source_recovers_offsets_and_state_together() -> Result<()> {
    let services = eddy_tests::Services::start()?;
    let brokers = services.var("EDDY_KAFKA_BROKERS")?.to_string();
    let mut cluster = Cluster::start("kafka-recover", 3, 1)?;
    let topic = format!("kafka_recover_{}", std::process::id());
    let out = cluster.dir.0.join("changelog.jsonl");
    let out2 = cluster.dir.0.join("changelog2.jsonl");
    let produced = cluster.dir.0.join("produced.jsonl");
    let producer = cluster.submit(
        "produce",
        &format!(
            r#"
name = "produce"
[state]
checkpoint_interval = "0s"
[[source]]
name = "events"
connector = "generator"
options = {{ count = 30000, keys = 200, seed = 9, rate = 3000 }}
[[sink]]
name = "topic"
input = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{topic}", format = "upsert-json", key = ["k"] }}
[[sink]]
name = "copy"
input = "events"
connector = "file"
options = {{ path = "{}" }}
"#,
            produced.display()
        ),
    )?;
    let consumer = cluster.submit(
        "consume",
        &format!(
            r#"
name = "consume"
[state]
checkpoint_interval = "300ms"
[[source]]
name = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{topic}", group_id = "{topic}", primary_key = ["k"], columns = "seq BIGINT, k BIGINT, score DOUBLE, ts TIMESTAMP" }}
[[sink]]
name = "out"
input = "events"
connector = "file"
options = {{ path = "{}" }}

# A second reader of the same stream: fanned out, the sinks run as tasks of their own behind
# exchanges, as the process job's sinks do.
[[sink]]
name = "out2"
input = "events"
connector = "file"
options = {{ path = "{}" }}
"#,
            out.display(),
            out2.display()
        ),
    )?;
    cluster.wait_state(&consumer, "running", Duration::from_secs(30))?;
    // Each kill comes once the consumer has written 2,000 more lines (the producer runs at
    // 3,000 rows/s): mid-stream, with a checkpoint or more behind it.
    let lines = |path: &std::path::Path| std::fs::read_to_string(path).map(|t| t.lines().count()).unwrap_or(0);
    for round in 0..2 {
        let target = lines(&out) + 2_000;
        cluster.wait(Duration::from_secs(60), "the consumer to make progress", |_| Ok(lines(&out) >= target))?;
        let status = cluster.status(&consumer)?;
        let victim = status["tasks"][0]["worker_id"].as_str().context("placed")?.to_string();
        let n = attempt(&status);
        cluster.kill_worker(&victim)?;
        cluster.add_worker(&format!("k{round}"), 1)?;
        wait_recovered(&cluster, &consumer, n + 1, Instant::now())?;
    }
    cluster.wait_state(&producer, "finished", Duration::from_secs(60))?;
    let mut last: HashMap<i64, i64> = HashMap::new();
    for e in read_jsonl(&[produced])? {
        last.insert(e["k"].as_i64().context("k")?, e["seq"].as_i64().context("seq")?);
    }
    let replay = |out: &std::path::Path| -> Result<HashMap<i64, i64>> {
        let mut view: HashMap<i64, i64> = HashMap::new();
        for (i, r) in read_jsonl(&[out.to_path_buf()])?.iter().enumerate() {
            let (k, seq) = (r["k"].as_i64().context("k")?, r["seq"].as_i64().context("seq")?);
            if r["_op"] == "-" {
                ensure!(view.remove(&k) == Some(seq), "line {}: retraction of ({k}, {seq}) but the key's row is {:?}", i + 1, view.get(&k));
            } else {
                ensure!(view.insert(k, seq).is_none(), "line {}: insert of ({k}, {seq}) over a row not retracted", i + 1);
            }
        }
        Ok(view)
    };
    for out in [&out, &out2] {
        cluster.wait(Duration::from_secs(60), "every key at its last version", |_| Ok(replay(out)? == last))?;
    }
    Ok(())
}
