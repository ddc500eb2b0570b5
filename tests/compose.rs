//! The pipeline as users run it with `docker compose`, on a machine that reaches no container
//! registry: images built from a debootstrapped Debian (tests/compose/images.sh), the official
//! images swapped for them by tests/compose/docker-compose.local.yml. Workers are scaled 2 → 4, the
//! process job is rescaled over them, a worker container is killed, and the outcomes are checked
//! as the pipeline test checks them: ClickHouse FINAL against PostgreSQL, what the external system
//! received, and the leaderboard against SQL over the same events.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

const PROJECT: &str = "eddy-compose-test";

/// One compose project: the user's file with the local override.
struct Compose {
    root: std::path::PathBuf,
}

impl Compose {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(&self.root)
            .args(["-p", PROJECT, "-f", "docker-compose.yml", "-f", "tests/compose/docker-compose.local.yml"])
            .args(args)
            // Short enough for a test; the compose file's default is a day.
            .env("DATAGEN_SECONDS", "150")
            .env("RATE", "100");
        cmd
    }

    fn run(&self, args: &[&str]) -> Result<String> {
        let out = self.command(args).output()?;
        if !out.status.success() {
            bail!("docker-compose {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs a command in the first container of `service`.
    fn exec(&self, service: &str, args: &[&str]) -> Result<String> {
        self.run(&[&["exec", "-T", service][..], args].concat())
    }

    fn eddy_json(&self, args: &[&str]) -> Result<Value> {
        Ok(serde_json::from_str(&self.exec("coordinator", &[&["eddy", "--json"][..], args].concat())?)?)
    }

    fn psql(&self, sql: &str) -> Result<String> {
        Ok(self.exec("postgres", &["psql", "-U", "eddy", "-d", "eddy", "-tAc", sql])?.trim().to_string())
    }

    fn clickhouse(&self, sql: &str) -> Result<String> {
        self.exec("clickhouse", &["clickhouse-client", "--query", sql])
    }

    fn wait(&self, timeout: Duration, what: &str, mut check: impl FnMut() -> Result<bool>) -> Result<()> {
        let start = Instant::now();
        let mut last = String::new();
        while start.elapsed() < timeout {
            match check() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        bail!("timed out after {timeout:?} waiting for {what}; last error: {last}")
    }

    /// Containers of `service`, by id.
    fn containers(&self, service: &str) -> Result<Vec<String>> {
        Ok(self.run(&["ps", "-q", service])?.lines().map(str::to_string).filter(|l| !l.is_empty()).collect())
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            if let Ok(logs) = self.run(&["logs", "--tail", "40", "coordinator", "worker", "submit"]) {
                eprintln!("{logs}");
            }
        }
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "5"]);
    }
}

fn docker_works() -> bool {
    let ok = |program: &str, arg: &str| Command::new(program).arg(arg).output().is_ok_and(|o| o.status.success());
    ok("docker", "info") && ok("docker-compose", "version")
}

fn jobs_by_name(c: &Compose) -> Result<BTreeMap<String, Value>> {
    let jobs = c.eddy_json(&["jobs"])?;
    Ok(jobs.as_array().cloned().unwrap_or_default().into_iter().filter_map(|j| Some((j["name"].as_str()?.to_string(), j))).collect())
}

fn running(c: &Compose, name: &str) -> Result<Value> {
    let job = jobs_by_name(c)?.remove(name).with_context(|| format!("no job {name}"))?;
    let status = c.eddy_json(&["status", job["job_id"].as_str().context("job_id")?])?;
    anyhow::ensure!(status["state"] == "running", "{name} is {}", status["state"]);
    Ok(status)
}

fn alive_workers(c: &Compose) -> Result<usize> {
    Ok(c.eddy_json(&["workers"])?.as_array().map_or(0, |w| w.iter().filter(|w| w["state"] == "alive").count()))
}

#[test]
fn compose_stack_scales_rescales_and_survives_a_killed_worker() -> Result<()> {
    if !docker_works() {
        assert!(
            std::env::var_os("EDDY_TEST_REQUIRE_DOCKER").is_none(),
            "EDDY_TEST_REQUIRE_DOCKER is set, but docker or docker-compose does not answer"
        );
        eprintln!("skipped: no Docker engine or docker-compose here (the compose test needs both)");
        return Ok(());
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().context("workspace")?.to_path_buf();
    let bin_dir = eddy_tests::bin_dir();
    let built = Command::new(root.join("tests/compose/images.sh")).arg(&bin_dir).status()?;
    anyhow::ensure!(built.success(), "tests/compose/images.sh failed");
    let c = Compose { root };
    let _ = c.run(&["down", "-v", "--remove-orphans", "-t", "5"]);

    c.run(&["up", "-d", "--no-build", "--scale", "worker=2"])?;
    c.wait(Duration::from_secs(240), "both jobs to run on two workers", || {
        Ok(running(&c, "ingest").is_ok() && running(&c, "process").is_ok() && alive_workers(&c)? == 2)
    })?;

    c.run(&["up", "-d", "--no-build", "--scale", "worker=4"])?;
    c.wait(Duration::from_secs(120), "four workers", || Ok(alive_workers(&c)? == 4))?;
    let process = running(&c, "process")?;
    let process_id = process["job_id"].as_str().context("job_id")?.to_string();
    c.exec("coordinator", &["eddy", "rescale", &process_id, "4"])?;
    let placed = |status: &Value| -> BTreeSet<String> {
        status["tasks"].as_array().into_iter().flatten().filter_map(|t| Some(t["worker_id"].as_str()?.to_string())).collect()
    };
    c.wait(Duration::from_secs(120), "the process job over the four workers", || {
        let s = running(&c, "process")?;
        Ok(s["tasks"].as_array().is_some_and(|t| t.iter().any(|t| t["parallelism"] == 4)) && placed(&s).len() >= 3)
    })?;

    // Kill a worker container that runs some of the process job's tasks.
    let before = running(&c, "process")?;
    let victims = placed(&before);
    let mut killed = None;
    for id in c.containers("worker")? {
        let ip =
            Command::new("docker").args(["inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", &id]).output()?;
        let ip = String::from_utf8_lossy(&ip.stdout).trim().to_string();
        let workers = c.eddy_json(&["workers"])?;
        let holds = workers.as_array().into_iter().flatten().any(|w| {
            w["data_address"].as_str().is_some_and(|a| a.starts_with(&format!("{ip}:")))
                && w["worker_id"].as_str().is_some_and(|id| victims.contains(id))
        });
        if holds {
            anyhow::ensure!(Command::new("docker").args(["kill", &id]).status()?.success(), "docker kill {id}");
            killed = Some(id);
            break;
        }
    }
    anyhow::ensure!(killed.is_some(), "no worker container runs a task of the process job");
    let attempt = before["attempt"].as_u64().unwrap_or(0);
    c.wait(Duration::from_secs(120), "the process job to recover from its checkpoint", || {
        let s = running(&c, "process")?;
        Ok(s["attempt"].as_u64().unwrap_or(0) > attempt)
    })?;

    // Once the generator has stopped, every outcome must match PostgreSQL.
    c.wait(Duration::from_secs(240), "the data generator to finish", || {
        Ok(c.containers("datagen")?.iter().all(|id| !container_running(id)))
    })?;
    let expected: BTreeSet<i64> = c.psql("SELECT id FROM engagement_events ORDER BY id")?.lines().filter_map(|l| l.parse().ok()).collect();
    anyhow::ensure!(expected.len() > 1_000, "the generator wrote only {} events", expected.len());
    c.wait(Duration::from_secs(120), "ClickHouse to hold exactly PostgreSQL's events", || {
        let ids: BTreeSet<i64> = c
            .clickhouse("SELECT id FROM eddy.engagement_enriched FINAL WHERE deleted = 0 ORDER BY id")?
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        Ok(ids == expected)
    })?;
    let stats: Value = serde_json::from_str(&c.exec("external", &["curl", "-sf", "http://localhost:8080/stats"])?)?;
    assert_eq!(stats["conflicts"], 0, "the external system saw one key with two bodies: {stats}");
    let versions: u64 = c.psql("SELECT count(*) FROM engagement_events")?.parse()?;
    assert!(stats["unique"].as_u64().unwrap_or(0) >= versions, "the external system missed events: {stats}, {versions} rows");

    // The leaderboard is one 10-minute window's sums, the same as SQL computes from PostgreSQL: read
    // a window that closed after the checks above and after the latest event.
    let leaderboard = || -> Result<(i64, BTreeMap<String, f64>)> {
        let script = "return {redis.call('GET', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}";
        let reply = c.exec("redis", &["redis-cli", "--json", "EVAL", script, "2", "leaderboard", "leaderboard:window_end"])?;
        let reply: Value = serde_json::from_str(reply.trim()).with_context(|| format!("redis reply {reply}"))?;
        let window_end: i64 = reply[0].as_str().context("no window end on the leaderboard")?.parse()?;
        let board = reply[1]
            .as_array()
            .context("leaderboard")?
            .chunks(2)
            .filter_map(|p| Some((p[0].as_str()?.to_string(), p[1].as_str()?.parse().ok()?)))
            .collect();
        Ok((window_end, board))
    };
    let latest: i64 = c.psql("SELECT floor(extract(epoch FROM max(event_ts)) * 1000)::bigint FROM engagement_events")?.parse()?;
    let first = leaderboard()?.0.max(latest);
    c.wait(Duration::from_secs(60), "a leaderboard window newer than every event", || Ok(leaderboard()?.0 > first))?;
    let (window_end, board) = leaderboard()?;
    let reference = c.psql(&format!(
        "SELECT coalesce(json_object_agg(content_id, total), '{{}}') FROM (
           SELECT content_id::text, SUM(duration_ms / 1000.0)::float8 AS total FROM engagement_events
           WHERE event_ts >= to_timestamp({} / 1000.0) AND event_ts < to_timestamp({window_end} / 1000.0) AND duration_ms IS NOT NULL
           GROUP BY 1) t",
        window_end - 600_000
    ))?;
    let reference: BTreeMap<String, f64> = serde_json::from_str(&reference)?;
    assert!(!board.is_empty(), "the leaderboard is empty");
    assert_eq!(board.keys().collect::<Vec<_>>(), reference.keys().collect::<Vec<_>>(), "leaderboard members");
    for (member, score) in &board {
        assert!((score - reference[member]).abs() < 1e-6, "{member}: {score} on the leaderboard, {} in SQL", reference[member]);
    }
    Ok(())
}

fn container_running(id: &str) -> bool {
    Command::new("docker")
        .args(["inspect", "-f", "{{.State.Running}}", id])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "true")
}
