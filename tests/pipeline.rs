//! The engagement pipeline on real services: PostgreSQL → ingest job → Kafka → process job →
//! ClickHouse, the external API stand-in and the Redis leaderboard, checked against PostgreSQL.

use std::collections::{BTreeMap, HashMap};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use eddy_tests::{bin, http_get_json, spawn_background, Background, Cluster, Services};
use serde_json::Value;

/// One test's private slice of the services: its own database, topic, slot, group and keys.
struct Pipeline {
    services: Services,
    cluster: Cluster,
    name: String,
    pg_url: String,
    mock_url: String,
    _mock: Background,
}

impl Pipeline {
    fn start(name: &str) -> Result<Pipeline> {
        Pipeline::start_with(name, 2)
    }

    fn start_with(name: &str, workers: usize) -> Result<Pipeline> {
        let services = Services::start()?;
        let name = format!("{name}_{}", std::process::id());
        services.drop_slot(&name)?;
        let pg_url = services.postgres_database(&name)?;
        services.clickhouse_database(&name)?;
        let cluster = Cluster::start(&name, workers, 4)?;
        let log = cluster.dir.0.join("mock-api.log");
        let mock = spawn_background(Command::new(bin("eddy-mock-api")).args(["--listen", "127.0.0.1:0"]), &log)?;
        let mock_url = format!("http://{}", eddy_tests::wait_for_line(&log, "eddy-mock-api listening on ")?);
        cluster.wait(Duration::from_secs(10), "the external API stand-in", |_| Ok(http_get_json(&format!("{mock_url}/stats")).is_ok()))?;
        Ok(Pipeline { services, cluster, name, pg_url, mock_url, _mock: mock })
    }

    fn env(&self) -> Vec<(String, String)> {
        let dir = self.cluster.dir.0.display().to_string();
        let mut env: Vec<(String, String)> = ["EDDY_KAFKA_BROKERS", "EDDY_REDIS_URL", "EDDY_CLICKHOUSE_URL"]
            .iter()
            .filter_map(|k| self.services.env.get(*k).map(|v| (k.to_string(), v.clone())))
            .collect();
        env.extend([
            ("EDDY_PG_URL".into(), self.pg_url.clone()),
            ("EDDY_TOPIC".into(), self.name.clone()),
            ("EDDY_SLOT".into(), self.name.clone()),
            ("EDDY_GROUP".into(), self.name.clone()),
            ("EDDY_CLICKHOUSE_DB".into(), self.name.clone()),
            ("EDDY_LEADERBOARD_KEY".into(), self.name.clone()),
            ("EDDY_EXTERNAL_URL".into(), format!("{}/events", self.mock_url)),
            ("EDDY_DEAD_LETTERS".into(), format!("{dir}/dead-letters.jsonl")),
            ("EDDY_HTTP_DEAD_LETTERS".into(), format!("{dir}/http-dead-letters.jsonl")),
            ("EDDY_CHECKPOINT_INTERVAL".into(), "1s".into()),
        ]);
        env
    }

    fn submit(&self, spec: &str) -> Result<String> {
        let path = eddy_tests::repo_root().join("jobs/specs").join(spec);
        let env = self.env();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let out = self.cluster.eddy_env(&["submit", path.to_str().context("path")?, "--json"], &env)?;
        if !out.status.success() {
            bail!("submit {spec}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["job_id"].as_str().context("job_id")?.to_string())
    }

    /// Runs the data generator to completion; returns its `name=value` summary.
    fn datagen(&self, args: &[&str]) -> Result<HashMap<String, u64>> {
        datagen_summary(self.datagen_command(args).output()?, args)
    }

    fn datagen_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("eddy-datagen"));
        cmd.args(["--pg-url", &self.pg_url]).args(args);
        cmd
    }

    fn gauge(&self, job: &str, name: &str) -> Result<Option<i64>> {
        let s = self.cluster.status(job)?;
        Ok(s["tasks"].as_array().context("tasks")?.iter().find_map(|t| t["gauges"][name].as_i64()))
    }

    /// Surviving events in PostgreSQL, enriched there with the expected derived fields.
    fn expected_rows(&self) -> Result<BTreeMap<i64, Value>> {
        let rows = self.services.psql_json(
            &self.pg_url,
            "SELECT json_agg(t) FROM (
               SELECT e.id, e.content_id::text AS content_id, e.user_id::text AS user_id, e.event_type,
                      floor(extract(epoch FROM e.event_ts))::bigint AS event_ts_s, e.duration_ms, e.device,
                      (e.duration_ms / 1000.0)::float8 AS engagement_seconds, c.content_type, c.length_seconds,
                      c.slug, c.title,
                      (CASE WHEN c.length_seconds > 0 THEN round(e.duration_ms / 1000.0 / c.length_seconds, 2) END)::float8 AS engagement_pct
               FROM engagement_events e LEFT JOIN content c ON c.id = e.content_id) t",
        )?;
        let mut out = BTreeMap::new();
        for r in rows.as_array().cloned().unwrap_or_default() {
            out.insert(r["id"].as_i64().context("id")?, r);
        }
        Ok(out)
    }

    /// Live rows in ClickHouse (latest version of each id, deletes hidden).
    fn clickhouse_rows(&self) -> Result<BTreeMap<i64, Value>> {
        let text = self.services.clickhouse(&format!(
            "SELECT id, content_id, user_id, event_type, toUnixTimestamp(event_ts) AS event_ts_s, duration_ms, device,
                    engagement_seconds, content_type, length_seconds, slug, title, engagement_pct, version
             FROM {}.engagement_enriched FINAL WHERE deleted = 0 FORMAT JSONEachRow",
            self.name
        ))?;
        let mut out = BTreeMap::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: Value = serde_json::from_str(line)?;
            // 18.16 quotes 64-bit integers in JSON; accept both forms.
            let id = v["id"].as_i64().or_else(|| v["id"].as_str().and_then(|s| s.parse().ok())).context("id")?;
            out.insert(id, v);
        }
        Ok(out)
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("EDDY_KEEP_LOGS").is_some() {
            return; // keep the evidence
        }
        // The cluster (and its replication connection) must be gone before the slot can go.
        for (_, w) in &mut self.cluster.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let admin = self.services.var("EDDY_PG_URL").map(str::to_string);
        for _ in 0..50 {
            if self.services.drop_slot(&self.name).is_ok()
                && self.services.psql(admin.as_deref().unwrap_or_default(), &format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}'", self.name)).is_ok_and(|o| o.trim().is_empty())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Ok(admin) = &admin {
            let _ = self.services.psql(admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
        let _ = self.services.clickhouse(&format!("DROP DATABASE IF EXISTS {}", self.name));
        let _ = self.services.redis(&["DEL", &self.name, &format!("{}:window_end", self.name)]);
    }
}

fn datagen_summary(out: std::process::Output, args: &[&str]) -> Result<HashMap<String, u64>> {
    if !out.status.success() {
        bail!("eddy-datagen {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(text
        .split_whitespace()
        .filter_map(|kv| kv.split_once('='))
        .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
        .collect())
}

fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

fn same_number(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-6,
        (None, None) => a.is_null() == b.is_null(),
        _ => false,
    }
}

#[test]
fn engagement_pipeline_matches_postgres() -> Result<()> {
    let p = Pipeline::start("pipeline")?;
    // Rows that exist before the ingest job starts: read by its snapshot.
    let before = p.datagen(&["--contents", "40", "--count", "1500", "--rate", "5000", "--seed", "1", "--unknown-pct", "5", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let ingest = p.submit("ingest.toml")?;
    p.cluster.wait_state(&ingest, "running", Duration::from_secs(30))?;
    p.cluster.wait(Duration::from_secs(60), "the snapshot to finish", |_| {
        Ok(p.gauge(&ingest, "snapshot_rows_done")? == Some(before["inserted"] as i64))
    })?;
    let process = p.submit("process.toml")?;
    p.cluster.wait_state(&process, "running", Duration::from_secs(30))?;
    // Rows written while both jobs run, with updates, deletes and unknown content.
    let during = p.datagen(&[
        "--contents", "40", "--count", "2500", "--rate", "1000", "--seed", "2",
        "--updates-pct", "10", "--deletes-pct", "5", "--unknown-pct", "5",
    ])?;
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"])
}

/// The outcomes a user checks, against PostgreSQL: ClickHouse holds exactly the surviving events,
/// enriched; the external system received each of `versions` event versions once; the leaderboard
/// is the exact sum of the latest closed 10-minute window.
fn check_outcomes(p: &Pipeline, versions: u64) -> Result<()> {
    // ClickHouse converges to exactly the surviving events, enriched.
    let expected = p.expected_rows()?;
    p.cluster.wait(Duration::from_secs(120), "ClickHouse to hold every surviving event", |_| {
        let got = p.clickhouse_rows()?;
        Ok(got.len() == expected.len() && got.keys().eq(expected.keys()))
    })?;
    let got = p.clickhouse_rows()?;
    for (id, want) in &expected {
        let row = &got[id];
        for col in ["content_id", "user_id", "event_type", "device", "content_type", "slug", "title"] {
            assert_eq!(row[col].as_str(), want[col].as_str(), "event {id} column {col}: {row} vs {want}");
        }
        for col in ["event_ts_s", "duration_ms", "engagement_seconds", "length_seconds", "engagement_pct"] {
            assert!(same_number(&row[col], &want[col]), "event {id} column {col}: {row} vs {want}");
        }
    }

    // The external system got every event version exactly once (its keys are id:version).
    p.cluster.wait(Duration::from_secs(60), "the external system to receive every version", |_| {
        Ok(http_get_json(&format!("{}/stats", p.mock_url))?["unique"].as_u64() == Some(versions))
    })?;
    let stats = http_get_json(&format!("{}/stats", p.mock_url))?;
    assert_eq!(stats["unique"].as_u64(), Some(versions), "{stats}");
    let received = http_get_json(&format!("{}/events", p.mock_url))?;
    let by_key: HashMap<String, Value> = received
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| Some((e["key"].as_str()?.to_string(), e["body"].clone())))
        .collect();
    for (id, row) in &got {
        let key = format!("{id}:{}", row["version"].as_str().map(str::to_string).unwrap_or_else(|| row["version"].to_string()));
        let body = by_key.get(&key).with_context(|| format!("external system never got {key}"))?;
        assert!(same_number(&body["engagement_pct"], &expected[id]["engagement_pct"]), "{key}: {body}");
    }

    // The leaderboard is the exact 10-minute sum of the latest closed window, as SQL computes it.
    // Wait for a window that closed after everything above was processed.
    let key = p.name.clone();
    let fence = format!("{key}:window_end");
    let first = p.services.redis(&["GET", &fence])?;
    let first = first.as_str().and_then(|s| s.parse::<i64>().ok()).unwrap_or(i64::MIN);
    p.cluster.wait(Duration::from_secs(30), "a newer leaderboard window", |_| {
        Ok(p.services.redis(&["GET", &fence])?.as_str().and_then(|s| s.parse::<i64>().ok()).is_some_and(|w| w > first))
    })?;
    let script = "return {redis.call('GET', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}";
    let reply = p.services.redis(&["EVAL", script, "2", &key, &fence])?;
    let window_end: i64 = reply[0].as_str().context("window end")?.parse()?;
    let mut board = BTreeMap::new();
    let pairs = reply[1].as_array().context("zrange")?;
    for pair in pairs.chunks(2) {
        board.insert(pair[0].as_str().context("member")?.to_string(), num(&pair[1]).context("score")?);
    }
    let sql = format!(
        "SELECT json_object_agg(content_id, total) FROM (
           SELECT content_id::text, SUM(duration_ms / 1000.0)::float8 AS total FROM engagement_events
           WHERE event_ts >= to_timestamp({start} / 1000.0) AND event_ts < to_timestamp({window_end} / 1000.0)
             AND duration_ms IS NOT NULL
           GROUP BY 1) t",
        start = window_end - 600_000
    );
    let want: BTreeMap<String, f64> = serde_json::from_value(p.services.psql_json(&p.pg_url, &sql)?).unwrap_or_default();
    assert!(!want.is_empty(), "the window should hold events");
    assert_eq!(board.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "leaderboard members for window {window_end}");
    for (member, total) in &want {
        assert!((board[member] - total).abs() < 1e-6, "{member}: leaderboard {} vs SQL {total}", board[member]);
    }
    Ok(())
}

/// Workers are killed with SIGKILL while events flow: three times one running the process job's
/// window, once the one running the CDC source. Each time the jobs restart from their latest
/// checkpoints on the workers left (a replacement joins), and the outcomes end exactly as without
/// failures.
#[test]
fn pipeline_recovers_from_killed_workers() -> Result<()> {
    let mut p = Pipeline::start_with("crash", 3)?;
    let before = p.datagen(&["--contents", "40", "--count", "1500", "--rate", "5000", "--seed", "3", "--unknown-pct", "5", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let ingest = p.submit("ingest.toml")?;
    p.cluster.wait_state(&ingest, "running", Duration::from_secs(30))?;
    let process = p.submit("process.toml")?;
    p.cluster.wait_state(&process, "running", Duration::from_secs(30))?;
    let args = ["--contents", "40", "--count", "9000", "--rate", "600", "--seed", "4", "--updates-pct", "10", "--deletes-pct", "5", "--unknown-pct", "5"];
    let during = p.datagen_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    // Random moments, from a printed seed so that a failure can be replayed.
    let mut rng = eddy_tests::Rng::for_test("pipeline_recovers_from_killed_workers");
    let mut pause = || Duration::from_millis(rng.between(1_000..3_000));
    let worker_of = |p: &Pipeline, job: &str, operator: &str| -> Result<String> {
        let status = p.cluster.status(job)?;
        let task = status["tasks"].as_array().context("tasks")?.iter().find(|t| t["operators"].as_str().is_some_and(|o| o.contains(operator)));
        Ok(task.and_then(|t| t["worker_id"].as_str()).context("task placed")?.to_string())
    };
    let running = |p: &Pipeline, job: &str| -> Result<bool> { Ok(p.cluster.status(job)?["state"] == "running") };
    for round in 0..4 {
        std::thread::sleep(pause());
        p.cluster.wait(Duration::from_secs(60), "both jobs to run", |_| Ok(running(&p, &ingest)? && running(&p, &process)?))?;
        let (job, operator) = if round < 3 { (&process, "engagement_10m") } else { (&ingest, "engagement_events") };
        let victim = worker_of(&p, job, operator)?;
        eprintln!("round {round}: killing {victim}, which runs {operator}");
        p.cluster.kill_worker(&victim)?;
        p.cluster.add_worker(&format!("r{round}"), 4)?;
    }
    let during = datagen_summary(during.wait_with_output()?, &args)?;
    for job in [&ingest, &process] {
        p.cluster.wait(Duration::from_secs(60), "the jobs to run again", |c| Ok(c.status(job)?["state"] == "running"))?;
        let restarts = p.cluster.status(job)?["restarts"].as_u64().unwrap_or(0);
        ensure!(restarts >= 1, "job {job} should have restarted");
    }
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"])
}

/// ClickHouse and Redis are stopped for 20 seconds while events flow, then started again: the
/// sinks retry, nothing is lost, and the outcomes end exactly as without the outage.
#[test]
fn pipeline_rides_out_clickhouse_and_redis_outages() -> Result<()> {
    let p = Pipeline::start("outage")?;
    let ingest = p.submit("ingest.toml")?;
    p.cluster.wait_state(&ingest, "running", Duration::from_secs(30))?;
    let process = p.submit("process.toml")?;
    p.cluster.wait_state(&process, "running", Duration::from_secs(30))?;
    let args = ["--contents", "40", "--count", "9000", "--rate", "300", "--seed", "5", "--updates-pct", "10", "--deletes-pct", "5", "--unknown-pct", "5"];
    let during = p.datagen_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(4));
    eprintln!("stopping ClickHouse and Redis for 20 s");
    p.services.control("stop", "clickhouse")?;
    p.services.control("stop", "redis")?;
    std::thread::sleep(Duration::from_secs(20));
    let down = p.cluster.status(&process)?["state"].clone();
    p.services.control("start", "redis")?;
    p.services.control("start", "clickhouse")?;
    ensure!(down == "running", "the process job should ride out the outage, but it is {down}");
    let during = datagen_summary(during.wait_with_output()?, &args)?;
    check_outcomes(&p, during["inserted"] + during["updated"])?;
    for job in [&ingest, &process] {
        let status = p.cluster.status(job)?;
        ensure!(status["state"] == "running", "job {job} should still run: {status}");
    }
    Ok(())
}

/// Kafka round trip in upsert format, and the bad-record policy: records that do not match the
/// declared columns are dead-lettered and counted while the job keeps running.
#[test]
fn kafka_upsert_round_trip_and_bad_records() -> Result<()> {
    let services = Services::start()?;
    let brokers = services.var("EDDY_KAFKA_BROKERS")?.to_string();
    let cluster = Cluster::start("kafka", 1, 4)?;
    let topic = format!("kafka_{}", std::process::id());
    let out = cluster.dir.0.join("out.jsonl");
    let dead = cluster.dir.0.join("dead.jsonl");
    let produce = |name: &str, format: &str, count: u64| -> Result<String> {
        let job = cluster.submit(
            name,
            &format!(
                r#"
name = "{name}"
[[source]]
name = "events"
connector = "generator"
options = {{ count = {count}, keys = 50, seed = 5 }}
[[sink]]
name = "topic"
input = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{topic}", format = "{format}", key = ["k"] }}
"#
            ),
        )?;
        cluster.wait_state(&job, "finished", Duration::from_secs(60))?;
        Ok(job)
    };
    produce("produce", "upsert-json", 5000)?;
    let consume = cluster.submit(
        "consume",
        &format!(
            r#"
name = "consume"
[[source]]
name = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{topic}", group_id = "{topic}", primary_key = ["k"], columns = "seq BIGINT, k BIGINT, score DOUBLE, ts TIMESTAMP", bad_records = "dead-letter", dead_letter_path = "{}" }}
[[sink]]
name = "out"
input = "events"
connector = "file"
options = {{ path = "{}" }}
"#,
            dead.display(),
            out.display()
        ),
    )?;
    cluster.wait_state(&consume, "running", Duration::from_secs(20))?;
    // The upsert view of what was read: the last row per key.
    let read_view = || -> Result<BTreeMap<i64, i64>> {
        let mut view = BTreeMap::new();
        for r in eddy_tests::read_jsonl(std::slice::from_ref(&out))? {
            let (k, seq) = (r["k"].as_i64().context("k")?, r["seq"].as_i64().context("seq")?);
            if r["_op"] == "-" {
                if view.get(&k) == Some(&seq) {
                    view.remove(&k);
                }
            } else {
                view.insert(k, seq);
            }
        }
        Ok(view)
    };
    cluster.wait(Duration::from_secs(60), "all 50 keys", |_| Ok(read_view()?.len() == 50))?;
    // Each of the 50 keys ends at its last version, late in the stream of 5,000.
    let produced = read_view()?;
    assert!(produced.values().all(|&s| s >= 4000), "keys should end near the end of the stream: {produced:?}");

    // Malformed records: five that are not JSON at all, five whose `ts` is not a timestamp.
    let bad_topic_spec = format!(
        r#"
name = "bad"
[[source]]
name = "events"
connector = "generator"
options = {{ count = 10, keys = 50, seed = 6 }}
[[transform]]
name = "broken"
input = "events"
select = """CASE WHEN seq < 5 THEN '{{"seq": ' || CAST(seq AS VARCHAR) || ', broken'
              ELSE '{{"seq": ' || CAST(seq AS VARCHAR) || ', "k": 1, "ts": "not a time"}}' END AS payload"""
[[sink]]
name = "topic"
input = "broken"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{topic}", format = "raw" }}
"#
    );
    let bad = cluster.submit("bad", &bad_topic_spec)?;
    cluster.wait_state(&bad, "finished", Duration::from_secs(60))?;
    cluster.wait(Duration::from_secs(30), "10 dead-lettered records", |c| {
        let s = c.status(&consume)?;
        Ok(s["tasks"][0]["dead_lettered"].as_u64() == Some(10))
    })?;
    let letters = eddy_tests::read_jsonl(std::slice::from_ref(&dead))?;
    assert_eq!(letters.len(), 10);
    let errors: Vec<&str> = letters.iter().filter_map(|l| l["error"].as_str()).collect();
    assert_eq!(errors.iter().filter(|e| e.contains("invalid JSON")).count(), 5, "{letters:?}");
    assert_eq!(errors.iter().filter(|e| e.contains("field `ts`")).count(), 5, "{letters:?}");
    // The job is still running and still reads good records.
    assert_eq!(cluster.status(&consume)?["state"], "running");
    produce("produce-again", "upsert-json", 100)?;
    cluster.wait(Duration::from_secs(30), "the later good records", |_| {
        Ok(read_view()?.values().any(|&s| s < 100))
    })?;
    Ok(())
}
