//! The engagement pipeline on real services: PostgreSQL → ingest job → Kafka → process job →
//! ClickHouse, the external API stand-in and the Redis leaderboard, checked against PostgreSQL.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use eddy_tests::{check_outcomes, check_outcomes_within, datagen_summary, external_key_parts, Cluster, Pipeline, Services};

#[test]
fn engagement_pipeline_matches_postgres() -> Result<()> {
    let p = Pipeline::start("pipeline")?;
    // Rows that exist before the ingest job starts: read by its snapshot.
    let before = p.datagen(&[
        "--contents",
        "40",
        "--count",
        "1500",
        "--rate",
        "5000",
        "--seed",
        "1",
        "--unknown-pct",
        "5",
        "--updates-pct",
        "0",
        "--deletes-pct",
        "0",
    ])?;
    let ingest = p.run_with("ingest.toml", &[])?;
    p.cluster.wait(Duration::from_secs(60), "the snapshot to finish", |_| {
        Ok(p.gauge(&ingest, "snapshot_rows_done")? == Some(before["inserted"] as i64))
    })?;
    p.run_with("process.toml", &[])?;
    // Rows written while both jobs run, with updates, deletes and unknown content.
    let during = p.datagen(&[
        "--contents",
        "40",
        "--count",
        "2500",
        "--rate",
        "1000",
        "--seed",
        "2",
        "--updates-pct",
        "10",
        "--deletes-pct",
        "5",
        "--unknown-pct",
        "5",
    ])?;
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"] + during["deleted"])?;
    p.assert_worker_password_hidden()
}

/// The ingest job at parallelism 2: a new job's two CDC subtasks share the snapshot out by
/// chunks (both read rows), then the first streams while the second idles; rescaled to 1 (a
/// savepoint restored by one subtask, which takes both subtasks' state) while rows are inserted,
/// updated and deleted, the outcomes still match PostgreSQL.
#[test]
fn ingest_at_parallelism_two_shares_its_snapshot_and_rescales() -> Result<()> {
    let p = Pipeline::start("cdcpar")?;
    let before =
        p.datagen(&["--contents", "40", "--count", "3000", "--rate", "20000", "--seed", "7", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let ingest = p.run_with("ingest.toml", &[("EDDY_INGEST_PARALLELISM", "2"), ("EDDY_SNAPSHOT_CHUNK_PAGES", "8")])?;
    let read = |p: &Pipeline| -> Result<Vec<i64>> {
        let s = p.cluster.status(&ingest)?;
        let tasks = s["tasks"].as_array().context("tasks")?;
        Ok(tasks
            .iter()
            .filter_map(|t| t["gauges"]["snapshot_chunks_done"].as_i64().map(|_| t["gauges"]["snapshot_rows_done"].as_i64().unwrap_or(0)))
            .collect())
    };
    p.cluster.wait(Duration::from_secs(60), "both subtasks to read their share of the snapshot", |_| {
        let read = read(&p)?;
        Ok(read.len() == 2 && read.iter().sum::<i64>() == before["inserted"] as i64)
    })?;
    let shares = read(&p)?;
    ensure!(shares.iter().all(|r| *r > 0), "each subtask read a share: {shares:?}");
    p.run_with("process.toml", &[])?;
    let writer = p
        .datagen_command(&[
            "--contents",
            "40",
            "--count",
            "2000",
            "--rate",
            "500",
            "--seed",
            "8",
            "--updates-pct",
            "10",
            "--deletes-pct",
            "5",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let attempt = |s: &serde_json::Value| s["attempt"].as_u64().unwrap_or(0);
    let before_rescale = attempt(&p.cluster.status(&ingest)?);
    let r = p.cluster.eddy_json(&["rescale", &ingest, "1"])?;
    ensure!(r["savepoint_id"].as_str().is_some(), "{r}");
    p.cluster.wait(Duration::from_secs(60), "the rescaled ingest job to run", |c| {
        let s = c.status(&ingest)?;
        Ok(s["state"] == "running" && attempt(&s) > before_rescale)
    })?;
    let sources = |p: &Pipeline| -> Result<usize> {
        let s = p.cluster.status(&ingest)?;
        let tasks = s["tasks"].as_array().context("tasks")?;
        Ok(tasks.iter().filter(|t| t["operators"].as_str().is_some_and(|o| o.contains("engagement_events"))).count())
    };
    ensure!(sources(&p)? == 1, "one CDC subtask after the rescale: {}", p.cluster.status(&ingest)?);
    let during = datagen_summary(writer.wait_with_output()?, &["--seed", "8"])?;
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"] + during["deleted"])
}

/// Two tables in one job: one `postgres_cdc` source with `tables = [...]`, which is a source per
/// table, each with its own primary key and slot, sharing a publication Eddy creates for the first
/// table and extends for the second, each to its own file. Every row of each table, snapshot and stream, arrives in its own file only; the
/// cancel drops both slots and the publication.
#[test]
fn one_job_reads_two_tables_through_one_publication() -> Result<()> {
    let p = Pipeline::start("twotables")?;
    p.datagen(&["--contents", "25", "--count", "300", "--rate", "20000", "--seed", "9", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let dir = p.cluster.dir.0.clone();
    let (events_out, content_out) = (dir.join("events.jsonl"), dir.join("content.jsonl"));
    // One source over both tables: a stream, a key and a slot each.
    let source = format!(
        "[[source]]\nname = \"cdc\"\nconnector = \"postgres_cdc\"\n[source.options]\nurl = \"{url}\"\nslot = \"{slot}\"\n\
         publication = \"{slot}_pub\"\ntables = [\n\
           {{ name = \"events\", table = \"public.engagement_events\", columns = \"id BIGINT, content_id VARCHAR\", primary_key = [\"id\"] }},\n\
           {{ name = \"content\", table = \"public.content\", columns = \"id VARCHAR, slug VARCHAR\", primary_key = [\"id\"] }},\n]\n",
        url = p.pg_url,
        slot = p.name
    );
    let sink = |name: &str, input: &str, path: &std::path::Path| {
        format!("[[sink]]\nname = \"{name}\"\ninput = \"{input}\"\nconnector = \"file\"\noptions = {{ path = \"{}\" }}\n", path.display())
    };
    let spec = [
        "name = \"two-tables\"\n[state]\ncheckpoint_interval = \"1s\"\n".to_string(),
        source,
        sink("events_out", "cdc-events", &events_out),
        sink("content_out", "cdc-content", &content_out),
    ]
    .concat();
    let job = p.cluster.submit("two-tables", &spec)?;
    p.cluster.wait_state(&job, "running", Duration::from_secs(30))?;
    // More rows into both tables while the job streams.
    p.services.psql(&p.pg_url, "INSERT INTO content (id, slug) SELECT gen_random_uuid(), 'late-' || g FROM generate_series(1, 5) g")?;
    p.datagen(&["--contents", "25", "--count", "200", "--rate", "2000", "--seed", "10", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let ids_in = |path: &std::path::Path| -> Result<std::collections::BTreeSet<String>> {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let mut ids = std::collections::BTreeSet::new();
        for line in text.lines() {
            let row: serde_json::Value = serde_json::from_str(line)?;
            ensure!(row.get("_op").is_none(), "inserts only: {line}");
            ids.insert(row["id"].to_string().trim_matches('"').to_string());
        }
        Ok(ids)
    };
    let ids_of = |sql: &str| -> Result<std::collections::BTreeSet<String>> {
        Ok(p.services.psql(&p.pg_url, sql)?.lines().map(str::to_string).collect())
    };
    let (events, content) = (ids_of("SELECT id FROM engagement_events")?, ids_of("SELECT id FROM content")?);
    ensure!(events.len() == 500 && content.len() >= 30, "{} events, {} contents", events.len(), content.len());
    p.cluster.wait(Duration::from_secs(60), "each table's rows in its own file", |_| {
        Ok(ids_in(&events_out)? == events && ids_in(&content_out)? == content)
    })?;
    let out = p.cluster.eddy(&["cancel", &job])?;
    ensure!(out.status.success(), "cancel: {}", String::from_utf8_lossy(&out.stderr));
    p.cluster.wait(Duration::from_secs(30), "the slots and the publication to go", |_| {
        let left = p.services.psql(
            &p.pg_url,
            &format!(
                "SELECT (SELECT count(*) FROM pg_replication_slots WHERE slot_name LIKE '{0}\\_%') + \
                        (SELECT count(*) FROM pg_publication WHERE pubname = '{0}_pub')",
                p.name
            ),
        )?;
        Ok(left.trim() == "0")
    })?;
    Ok(())
}

/// `schema_changes = "evolve"` with `extra_columns`: the columns the ingest job does not declare
/// ride to the topic as fields of their own (`extra_fields`), so a column added while it streams
/// reaches a downstream job that declares it, NULL in the records from before it. A backfill
/// after the change goes through (its rows change nothing the reader holds, so the reader passes
/// none on; the connector test checks their objects).
#[test]
fn an_added_column_reaches_the_topic_and_a_job_that_declares_it() -> Result<()> {
    let p = Pipeline::start("addcolumn")?;
    let brokers = p.services.var("EDDY_KAFKA_BROKERS")?.to_string();
    let written =
        p.datagen(&["--contents", "10", "--count", "300", "--rate", "5000", "--seed", "12", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let (name, url) = (&p.name, &p.pg_url);
    let ingest = p.cluster.submit(
        "evolve",
        &format!(
            r#"
name = "evolve"
[state]
checkpoint_interval = "1s"
[[source]]
name = "events"
connector = "postgres_cdc"
[source.options]
url = "{url}"
table = "public.engagement_events"
columns = "id BIGINT, content_id VARCHAR"
primary_key = ["id"]
slot = "{name}"
publication = "{name}_pub"
version_column = "version"
schema_changes = "evolve"
extra_columns = "more"
[[sink]]
name = "topic"
input = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{name}", format = "upsert-json", key = ["id"], version_column = "version", extra_fields = "more" }}
"#
        ),
    )?;
    let out = p.cluster.dir.0.join("read.jsonl");
    p.cluster.submit(
        "reader",
        &format!(
            r#"
name = "reader"
[[source]]
name = "events"
connector = "kafka"
options = {{ brokers = "{brokers}", topic = "{name}", group_id = "{name}", primary_key = ["id"], version_column = "version", columns = "id BIGINT, device VARCHAR, later BIGINT, version BIGINT" }}
[[sink]]
name = "out"
input = "events"
connector = "file"
options = {{ path = "{}" }}
"#,
            out.display()
        ),
    )?;
    // What the reader holds per id: (device, later).
    let view = || -> Result<BTreeMap<i64, (serde_json::Value, serde_json::Value)>> {
        let mut view = BTreeMap::new();
        for r in eddy_tests::read_jsonl(std::slice::from_ref(&out)).unwrap_or_default() {
            let id = r["id"].as_i64().context("id")?;
            if r["_op"] == "-" {
                view.remove(&id);
            } else {
                view.insert(id, (r["device"].clone(), r["later"].clone()));
            }
        }
        Ok(view)
    };
    // PostgreSQL's (device, later) per id.
    let table = |later: bool| -> Result<BTreeMap<i64, (serde_json::Value, serde_json::Value)>> {
        let sql = format!(
            "SELECT coalesce(json_agg(json_build_array(id, device, {}) ORDER BY id), '[]') FROM engagement_events",
            if later { "later" } else { "NULL" }
        );
        let rows = p.services.psql_json(&p.pg_url, &sql)?;
        let rows = rows.as_array().context("rows")?;
        Ok(rows.iter().map(|r| (r[0].as_i64().unwrap_or(-1), (r[1].clone(), r[2].clone()))).collect())
    };
    let want = table(false)?;
    ensure!(want.len() as u64 == written["inserted"], "{} rows", want.len());
    ensure!(want.values().any(|(d, _)| d.is_string()), "devices in the table");
    p.cluster.wait(Duration::from_secs(60), "the undeclared `device` in the reader", |_| Ok(view()? == want))?;

    p.services.psql(
        &p.pg_url,
        "ALTER TABLE engagement_events ADD COLUMN later bigint; UPDATE engagement_events SET later = id * 3 WHERE id % 4 = 0",
    )?;
    let want = table(true)?;
    ensure!(want.values().filter(|(_, l)| l.is_i64()).count() == 75, "a quarter of the rows have `later`");
    let reached = p.cluster.wait(Duration::from_secs(60), "the added column in the reader", |_| Ok(view()? == want));
    ensure!(
        reached.is_ok(),
        "the reader has {:?}",
        view()?.into_iter().filter(|(id, v)| want.get(id) != Some(v)).take(5).collect::<Vec<_>>()
    );

    let done = p.cluster.eddy_json(&["backfill", &ingest, "--where", "id <= 40"])?;
    ensure!(done["rows"] == 40, "a backfill after the change: {done}");
    Ok(())
}

/// The ingest job's slot was lost and the job started again without a snapshot, so rows changed
/// in the gap never reached Kafka: ClickHouse, the external system and the leaderboard miss them.
/// `eddy backfill` re-reads those rows into the running stream and every outcome matches
/// PostgreSQL again, each re-read row reaching the external system once under a new version.
/// A condition PostgreSQL refuses is said (exit code 7), one that reads beyond the row is refused
/// (exit code 4), and the job runs on.
#[test]
fn a_backfill_brings_back_the_changes_a_lost_slot_missed() -> Result<()> {
    let p = Pipeline::start("backfill")?;
    let written =
        p.datagen(&["--contents", "20", "--count", "1500", "--rate", "5000", "--seed", "11", "--updates-pct", "0", "--deletes-pct", "0"])?;
    let (ingest, _) = p.run_both(&[])?;
    check_outcomes(&p, written["inserted"])?;
    let out = p.cluster.eddy(&["cancel", &ingest])?;
    ensure!(out.status.success(), "cancel: {}", String::from_utf8_lossy(&out.stderr));
    p.cluster.wait_state(&ingest, "cancelled", Duration::from_secs(30))?;
    // The gap: changes no slot records.
    p.services
        .psql(&p.pg_url, "UPDATE engagement_events SET duration_ms = coalesce(duration_ms, 0) + 7000 WHERE id BETWEEN 100 AND 199")?;
    let ingest = p.run_with("ingest.toml", &[("EDDY_SNAPSHOT", "false")])?;
    let stale = eddy_tests::outcome_mismatches(&p, None, Duration::ZERO)?.mismatches;
    ensure!(stale.iter().any(|m| m.contains("column duration_ms")), "ClickHouse misses the gap's changes first: {stale:?}");

    let done = p.cluster.eddy_json(&["backfill", &ingest, "--where", "id BETWEEN 100 AND 199"])?;
    ensure!(done["rows"] == 100 && done["skipped"] == 0, "every row of the range re-read: {done}");
    check_outcomes(&p, written["inserted"] + 100)?;

    let out = p.cluster.eddy(&["backfill", &ingest, "--where", "no_such_column = 1"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(7) && err.contains("no_such_column"), "{err}");
    // Nothing that reads beyond the row.
    let out = p.cluster.eddy(&["backfill", &ingest, "--where", "id IN (SELECT id FROM content)"])?;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(4) && err.contains("not allowed"), "{err}");
    ensure!(p.cluster.status(&ingest)?["state"] == "running", "the ingest job runs on");
    Ok(())
}

/// Workers are killed with SIGKILL while events flow: three times one running the process job's
/// window, once the one running the CDC source. Each time the jobs restart from their latest
/// checkpoints on the workers left (a replacement joins), and the outcomes end exactly as without
/// failures.
#[test]
fn pipeline_recovers_from_killed_workers() -> Result<()> {
    let mut p = Pipeline::start_with("crash", 3)?;
    let before = p.datagen(&[
        "--contents",
        "40",
        "--count",
        "1500",
        "--rate",
        "5000",
        "--seed",
        "3",
        "--unknown-pct",
        "5",
        "--updates-pct",
        "0",
        "--deletes-pct",
        "0",
    ])?;
    let (ingest, process) = p.run_both(&[])?;
    let args = [
        "--contents",
        "40",
        "--count",
        "9000",
        "--rate",
        "600",
        "--seed",
        "4",
        "--updates-pct",
        "10",
        "--deletes-pct",
        "5",
        "--unknown-pct",
        "5",
    ];
    let during = p.datagen_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    // Random moments, from a printed seed so that a failure can be replayed.
    let mut rng = eddy_tests::Rng::for_test("pipeline_recovers_from_killed_workers");
    let mut pause = || Duration::from_millis(rng.between(1_000..3_000));
    let worker_of = |p: &Pipeline, job: &str, operator: &str| -> Result<String> {
        let status = p.cluster.status(job)?;
        let task =
            status["tasks"].as_array().context("tasks")?.iter().find(|t| t["operators"].as_str().is_some_and(|o| o.contains(operator)));
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
    check_outcomes(&p, before["inserted"] + during["inserted"] + during["updated"] + during["deleted"])
}

/// The worker reading the ingest job's snapshot is killed part way through it, and rows are
/// deleted and updated while the job is down. The restarted job reads the chunks no checkpoint
/// holds again under the slot's position, so the rows already delivered keep their version (the
/// external system gets no event twice under two versions), and the deletes made meanwhile come
/// from the slot.
#[test]
fn a_worker_killed_during_the_snapshot_sends_nothing_twice_and_keeps_deletes() -> Result<()> {
    kill_during_the_snapshot("snapkill", &[])
}

/// The same with the snapshot shared out between two subtasks in chunks of 256 pages: the restart
/// reads the chunks no checkpoint holds, on subtask 0, and nothing is lost or sent twice.
#[test]
fn a_worker_killed_during_a_parallel_snapshot_sends_nothing_twice_and_keeps_deletes() -> Result<()> {
    kill_during_the_snapshot("snapkill2", &[("EDDY_INGEST_PARALLELISM", "2"), ("EDDY_SNAPSHOT_CHUNK_PAGES", "256")])
}

fn kill_during_the_snapshot(name: &str, ingest_settings: &[(&str, &str)]) -> Result<()> {
    let mut p = Pipeline::start_with(name, 3)?;
    let rows: i64 = 120_000;
    let before = p.datagen(&[
        "--contents",
        "40",
        "--count",
        &rows.to_string(),
        "--rate",
        "100000",
        "--seed",
        "8",
        "--unknown-pct",
        "5",
        "--updates-pct",
        "0",
        "--deletes-pct",
        "0",
    ])?;
    p.run_with("process.toml", &[])?;
    let ingest = p.submit_with("ingest.toml", ingest_settings)?;
    let mut done_at_kill = 0;
    // Killed once the external system has received a thousand snapshot rows (so that sending
    // them again would show) and the snapshot is still being read.
    p.cluster.wait(Duration::from_secs(60), "the snapshot to be under way downstream", |_| {
        done_at_kill = p.gauge(&ingest, "snapshot_rows_done")?.unwrap_or(0);
        let sent = eddy_tests::http_get_json(&format!("{}/stats", p.mock_url))?["unique"].as_u64().unwrap_or(0);
        Ok(sent >= 1_000)
    })?;
    let status = p.cluster.status(&ingest)?;
    let victim = status["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .find(|t| t["operators"].as_str().is_some_and(|o| o.contains("engagement_events")));
    let victim = victim.and_then(|t| t["worker_id"].as_str()).context("the CDC task")?.to_string();
    p.cluster.kill_worker(&victim)?;
    ensure!(done_at_kill < rows, "the snapshot ended before the kill ({done_at_kill} rows); the test needs a slower snapshot");
    eprintln!("killed {victim} with {done_at_kill} of {rows} snapshot rows read");
    // While it is down: deletes of rows read and not yet read, and updates.
    p.services.psql(
        &p.pg_url,
        "DELETE FROM engagement_events WHERE id IN (SELECT id FROM engagement_events ORDER BY id LIMIT 10);
         DELETE FROM engagement_events WHERE id IN (SELECT id FROM engagement_events ORDER BY id DESC LIMIT 10);
         UPDATE engagement_events SET duration_ms = 4242 WHERE id IN (SELECT id FROM engagement_events ORDER BY id LIMIT 10 OFFSET 100);",
    )?;
    p.cluster.add_worker("r0", 4)?;
    p.cluster.wait(Duration::from_secs(120), "the ingest job to read the rest of its snapshot again", |c| {
        let s = c.status(&ingest)?;
        let chunks = |name: &str| p.gauge(&ingest, name).map(|g| g.unwrap_or(0));
        Ok(s["state"] == "running"
            && s["attempt"].as_u64().unwrap_or(0) > 1
            && chunks("snapshot_chunks_total")? > 0
            && chunks("snapshot_chunks_done")? == chunks("snapshot_chunks_total")?)
    })?;
    // Every surviving row once and a delete for each of the 20 deleted rows, plus what was sent
    // before the kill of the 20 deleted rows and of the 10 updated ones (their new versions come
    // again); a snapshot read under new versions would send the thousand-odd rows delivered
    // before the kill again.
    let rows = before["inserted"];
    check_outcomes_within(&p, rows..=rows + 30)
}

/// An event is deleted after its upsert state has expired (the topic's event time moved past the
/// event's by more than `state_ttl`, which must outlast the 10-minute window): the delete still
/// reaches ClickHouse, and the external system as a delete of its own version.
#[test]
fn a_delete_after_the_state_ttl_still_reaches_clickhouse_and_the_external_system() -> Result<()> {
    let p = Pipeline::start("ttl")?;
    p.run_both(&[("EDDY_STATE_TTL", "11m")])?;
    let insert = |ts: &str| -> Result<i64> {
        let id = p.services.psql(
            &p.pg_url,
            &format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                 VALUES (gen_random_uuid(), gen_random_uuid(), 'play', {ts}, 1000, 'tv', '{{}}') RETURNING id"
            ),
        )?;
        Ok(id.trim().parse()?)
    };
    let live = |id: i64| -> Result<bool> {
        let n =
            p.services.clickhouse(&format!("SELECT count() FROM {}.engagement_enriched FINAL WHERE id = {id} AND deleted = 0", p.name))?;
        Ok(n.trim() == "1")
    };
    let old = insert("now() - interval '15 minutes'")?;
    p.cluster.wait(Duration::from_secs(60), "the event in ClickHouse", |_| live(old))?;
    // A later event moves the topic's time 15 minutes on: the first one's state expires.
    let later = insert("now()")?;
    p.cluster.wait(Duration::from_secs(60), "the later event in ClickHouse", |_| live(later))?;
    p.services.psql(&p.pg_url, &format!("DELETE FROM engagement_events WHERE id = {old}"))?;
    p.cluster.wait(Duration::from_secs(60), "the delete in ClickHouse", |_| Ok(!live(old)?))?;
    assert!(live(later)?);
    let deleted = p.services.clickhouse(&format!("SELECT deleted FROM {}.engagement_enriched FINAL WHERE id = {old}", p.name))?;
    assert_eq!(deleted.trim(), "1");
    // The external system got the event, then its delete under a newer version of its own.
    let versions_of = |deleted: bool| -> Result<Vec<u64>> {
        Ok(p.external_events()?
            .iter()
            .filter(|e| e["body"]["id"] == old && e["body"]["deleted"] == deleted)
            .filter_map(|e| Some(external_key_parts(e["key"].as_str()?)?.1))
            .collect())
    };
    p.cluster.wait(Duration::from_secs(60), "the delete at the external system", |_| Ok(!versions_of(true)?.is_empty()))?;
    let (inserted, deleted) = (versions_of(false)?, versions_of(true)?);
    assert!(deleted.len() == 1 && inserted.iter().all(|v| *v < deleted[0]), "versions of event {old}: {inserted:?}, deleted {deleted:?}");
    Ok(())
}

/// The process job's event time follows the ingest job's watermark heartbeats. While the ingest
/// job is down, an event written to PostgreSQL cannot reach the process job, and its windows wait
/// for it instead of closing on the wall clock (which published windows without it); once the
/// ingest is back the leaderboard counts it. With no writes at all, PostgreSQL's clock still
/// closes windows.
#[test]
fn windows_wait_for_a_stalled_ingest_and_close_on_a_quiet_database() -> Result<()> {
    let p = Pipeline::start("stall")?;
    let (ingest, process) = p.run_both(&[])?;
    // Inserts `n` events stamped now; returns their event time (Unix ms).
    let insert = |n: u32| -> Result<i64> {
        let ts = p.services.psql(
            &p.pg_url,
            &format!(
                "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
                 SELECT gen_random_uuid(), gen_random_uuid(), 'play', now(), 7000, 'tv', '{{}}' FROM generate_series(1, {n})
                 RETURNING floor(extract(epoch FROM event_ts) * 1000)::bigint"
            ),
        )?;
        Ok(ts.lines().next().context("no row")?.trim().parse()?)
    };
    let window_end = || -> Result<i64> { Ok(p.leaderboard()?.0.unwrap_or(0)) };
    // Twenty, so that every partition of the topic has some.
    let first = insert(20)?;
    p.cluster.wait(Duration::from_secs(30), "a window holding the first event to close", |_| Ok(window_end()? > first))?;

    // The ingest job goes down (its slot kept); an event is written meanwhile.
    p.cluster.eddy(&["cancel", &ingest, "--keep-slot"])?;
    p.cluster.wait_state(&ingest, "cancelled", Duration::from_secs(30))?;
    let stalled = insert(1)?;
    // For four times the 2 s idle timeout that used to move event time on, no window that should
    // hold the event closes without it.
    let watch_until = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < watch_until {
        let end = window_end()?;
        ensure!(end <= stalled, "a window ending at {end} closed while the ingest job was down, without the event at {stalled}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Back (from its slot): the event arrives and the windows close again, on the database's
    // clock alone, since nothing more is written.
    p.run_with("ingest.toml", &[("EDDY_EXISTING_SLOT", "resume")])?;
    p.cluster.wait(Duration::from_secs(60), "windows to close 10 s past the event on a quiet database", |_| {
        Ok(window_end()? > stalled + 10_000)
    })?;
    let (end, board) = p.leaderboard()?;
    let end = end.context("window end")?;
    let reference = p.leaderboard_reference(end)?;
    ensure!(
        board.len() == reference.len() && board.iter().all(|(k, v)| reference.get(k).is_some_and(|r| (r - v).abs() < 1e-6)),
        "leaderboard of the window ending at {end}: {board:?}, PostgreSQL says {reference:?}"
    );
    let tasks = p.cluster.status(&process)?["tasks"].as_array().context("tasks")?.clone();
    let late: u64 = tasks.iter().filter_map(|t| t["late_records"].as_u64()).sum();
    ensure!(late == 0, "{late} records came late");
    Ok(())
}

/// `eddy cancel` of the ingest job while none of its tasks runs (every worker killed, so it waits
/// between attempts for slots): no task is left to drop its replication slot, so the coordinator
/// drops it, as the cancel asked, instead of leaving it to hold WAL on the server, and drops the
/// publication the job created with it.
#[test]
fn cancelling_an_ingest_job_between_attempts_drops_its_slot_and_publication() -> Result<()> {
    let mut p = Pipeline::start("slotdrop")?;
    // The demo's schema makes the publication; here the job makes it, as its own to drop.
    p.services.psql(&p.pg_url, "DROP PUBLICATION eddy_pub")?;
    let ingest = p.run_with("ingest.toml", &[])?;
    let slot_exists = |p: &Pipeline| -> Result<bool> {
        let sql = format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}'", p.name);
        Ok(!p.services.psql(&p.pg_url, &sql)?.trim().is_empty())
    };
    ensure!(slot_exists(&p)?, "the running ingest job has its slot");
    let workers: Vec<String> = p.cluster.workers.iter().map(|(id, _)| id.clone()).collect();
    for w in &workers {
        p.cluster.kill_worker(w)?;
    }
    p.cluster.wait_state(&ingest, "restarting", Duration::from_secs(30))?;
    let out = p.cluster.eddy(&["cancel", &ingest])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success() && !stderr.contains("warning"), "cancel: {stderr}");
    ensure!(!slot_exists(&p)?, "slot {} is still there after the cancel", p.name);
    let publications = p.services.psql(&p.pg_url, "SELECT count(*) FROM pg_publication WHERE pubname = 'eddy_pub'")?;
    ensure!(publications.trim() == "0", "the publication the job created goes with its slot");
    Ok(())
}

/// Redis and then ClickHouse are stopped while events flow, each until `eddy status` shows its
/// sink retrying with the cause for 10 s, then started again: nothing is lost, the cause goes away,
/// and the outcomes end exactly as without the outage.
#[test]
fn pipeline_rides_out_clickhouse_and_redis_outages() -> Result<()> {
    let p = Pipeline::start("outage")?;
    let (ingest, process) = p.run_both(&[])?;
    let args = [
        "--contents",
        "40",
        "--count",
        "9000",
        "--rate",
        "300",
        "--seed",
        "5",
        "--updates-pct",
        "10",
        "--deletes-pct",
        "5",
        "--unknown-pct",
        "5",
    ];
    let during = p.datagen_command(&args).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn()?;
    std::thread::sleep(Duration::from_secs(4));
    let retrying = |status: &serde_json::Value| -> Vec<String> {
        let tasks = status["tasks"].as_array().cloned().unwrap_or_default();
        tasks.iter().filter_map(|t| t["retrying"].as_str().filter(|r| !r.is_empty()).map(str::to_string)).collect()
    };
    // "… (retry N after S s)": how long a sink has been retrying.
    let seconds =
        |cause: &str| -> u64 { cause.rsplit_once(" after ").and_then(|(_, s)| s.trim_end_matches(" s)").parse().ok()).unwrap_or(0) };
    // One after the other: a sink that retries holds the pipeline back (backpressure), so the
    // other would not meet its outage.
    let mut causes: BTreeMap<&str, String> = BTreeMap::new();
    let mut outage = |service: &str, sink: &'static str| -> Result<String> {
        eprintln!("stopping {service} until the {sink} says it has retried for 10 s");
        p.services.control("stop", service)?;
        let seen = p.cluster.wait(Duration::from_secs(90), &format!("the {sink} to show the error it retries"), |c| {
            let cause = retrying(&c.status(&process)?).into_iter().find(|c| c.starts_with(sink));
            let long = cause.as_deref().is_some_and(|c| seconds(c) >= 10);
            if let Some(cause) = cause {
                causes.insert(sink, cause);
            }
            Ok(long)
        });
        let down = p.cluster.status(&process)?["state"].as_str().unwrap_or_default().to_string();
        p.services.control("start", service)?;
        seen?;
        Ok(down)
    };
    let down = [outage("redis", "redis sink")?, outage("clickhouse", "clickhouse sink")?];
    eprintln!("retrying, as `eddy status` says: {causes:?}");
    ensure!(down == ["running", "running"], "the process job should ride out the outages, but it is {down:?}");
    let during = datagen_summary(during.wait_with_output()?, &args)?;
    check_outcomes(&p, during["inserted"] + during["updated"] + during["deleted"])?;
    for job in [&ingest, &process] {
        let status = p.cluster.status(job)?;
        ensure!(status["state"] == "running", "job {job} should still run: {status}");
    }
    p.cluster.wait(Duration::from_secs(30), "the sinks to stop retrying", |c| Ok(retrying(&c.status(&process)?).is_empty()))?;
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
    // Each of the 50 keys ends at its last version, late in the stream of 5,000 (a read of the
    // topic under load may return part of it: wait for the whole).
    let ended = cluster.wait(Duration::from_secs(60), "all 50 keys at their last versions", |_| {
        let view = read_view()?;
        Ok(view.len() == 50 && view.values().all(|&s| s >= 4000))
    });
    assert!(ended.is_ok(), "keys should end near the end of the stream: {:?}", read_view()?);

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
    cluster.wait(Duration::from_secs(30), "the later good records", |_| Ok(read_view()?.values().any(|&s| s < 100)))?;
    Ok(())
}
