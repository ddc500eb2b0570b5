//! The chaos run: the engagement pipeline (PostgreSQL → ingest job → Kafka → process job →
//! ClickHouse, the external API stand-in and the Redis leaderboard) on real services while
//! workers are killed with SIGKILL, the coordinator is killed and restarted, PostgreSQL restarts
//! and Redis, ClickHouse and the external system go away for a while; writers insert, update and
//! delete meanwhile. Then every outcome is compared with PostgreSQL and each difference is
//! printed and counted in `chaos_mismatches`.
//!
//! `cargo test --workspace` runs a short version (about 40 s of writers, three kills, outages of
//! 5 s); `scripts/bench.sh chaos` runs the full one (10 minutes of writers, at least ten kills,
//! outages of 60 s). Settings, all from the environment:
//!
//! - `CHAOS_SECONDS` (40): how long the writers run; the faults happen at moments drawn within it.
//! - `CHAOS_KILLS` (`CHAOS_SECONDS / 40`, at least 3): worker kills, the first one of the worker
//!   running the CDC source during the ingest job's snapshot.
//! - `CHAOS_OUTAGE_SECONDS` (`CHAOS_SECONDS / 8`, from 5 to 60): length of each outage.
//! - `CHAOS_PREFILL_ROWS` (30,000 to 200,000): rows in the table before the ingest job's snapshot.
//! - `CHAOS_RATE` (200): events inserted per second by the writers (bursts are ten times that).
//! - `CHAOS_COORDINATORS` (1): with 3, the coordinators replicate with Raft and the coordinator
//!   fault kills the leader.
//! - `CHAOS_STATE_TTL` (1h, the shipped spec's; `scripts/bench.sh chaos` sets 11m): the process
//!   job's `state_ttl`.
//! - `EDDY_TEST_SEED`: the seed of every choice (moments, victims, data); printed as `chaos_seed`.
//!
//! What is written, and why it is shaped so (the checks must hold for a correct engine):
//!
//! - The "old" events are stamped 15 to 20 minutes in the past before the ingest job starts; the
//!   run updates and deletes them late, and they lie outside every window the leaderboard is
//!   checked on. With `CHAOS_STATE_TTL=11m` (the shortest the planner accepts above the 10-minute
//!   window plus 2 s; the full run's), their upsert state expires once the live events move the
//!   topic's time on, so those updates and deletes come after it expired (and a CDC re-read sends
//!   them again, which must not make new versions). The test command's short run keeps the
//!   shipped 1h.
//!   Events of the live stream are updated or deleted within a few seconds of their insert (the
//!   data generator's own updates and deletes).
//! - An audit table (`chaos_writes`, filled by a trigger and not published) counts every insert,
//!   update and delete of each event: the number of versions the external system may receive for
//!   it (a delete is sent as a version of its own, flagged `deleted`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use eddy_tests::{bin, external_key_parts, num, outcome_mismatches, repo_root, Pipeline, Rng};
use serde_json::Value;

/// The process job's upsert state TTL (measured on the topic's event time), unless
/// `CHAOS_STATE_TTL` says otherwise.
const STATE_TTL: &str = "1h";
/// The leaderboard's window (HOP 10 min, in process.toml).
const WINDOW_MS: i64 = 600_000;

/// How long and how hard the run is.
#[derive(Debug)]
struct Settings {
    seconds: u64,
    kills: u64,
    outage: u64,
    prefill: u64,
    rate: u64,
    coordinators: u64,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.trim().parse().ok()).unwrap_or(default);
        let seconds = var("CHAOS_SECONDS", 40).max(10);
        Settings {
            seconds,
            kills: var("CHAOS_KILLS", (seconds / 40).max(3)).max(1),
            outage: var("CHAOS_OUTAGE_SECONDS", (seconds / 8).clamp(5, 60)),
            prefill: var("CHAOS_PREFILL_ROWS", (seconds * 500).clamp(30_000, 200_000)),
            rate: var("CHAOS_RATE", 200).max(1),
            coordinators: var("CHAOS_COORDINATORS", 1).max(1),
        }
    }
}

/// One fault of the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// `kill -9` of a worker running tasks, and a replacement.
    Kill,
    /// `kill -9` of the coordinator and a restart on the same data dir.
    Coordinator,
    /// `scripts/services.sh stop postgres`, then `start postgres`.
    Postgres,
    /// An outage of a service (`redis`, `clickhouse`, or `http` for the external system) begins…
    Down(&'static str),
    /// … and ends.
    Up(&'static str),
}

/// What the writers did.
#[derive(Debug, Default)]
struct Written {
    chunks: u64,
    bursts: u64,
    failed_chunks: u64,
    inserted: u64,
    updated: u64,
    deleted: u64,
    old_updated: u64,
    old_deleted: u64,
}

/// The run's state: the pipeline, its two jobs, the seeded choices and what went wrong.
struct Chaos {
    p: Pipeline,
    rng: Rng,
    settings: Settings,
    ingest: String,
    process: String,
    /// Workers still alive (killed ones leave, replacements join).
    alive: Vec<String>,
    kills: u64,
    replacements: u64,
    coordinator_restarts: u64,
    postgres_restarts: u64,
    outages: Vec<String>,
    /// When each ongoing outage began.
    down_since: BTreeMap<&'static str, Instant>,
    mismatches: Vec<String>,
    started: Instant,
}

impl Chaos {
    /// Records a difference from the expected outcome (printed now, counted at the end).
    fn mismatch(&mut self, what: String) {
        eprintln!("chaos mismatch: {what}");
        self.mismatches.push(what);
    }

    fn say(&self, what: &str) {
        eprintln!("chaos +{:.1}s: {what}", self.started.elapsed().as_secs_f64());
    }

    /// Runs SQL on the test's database.
    fn sql(&self, sql: &str) -> Result<String> {
        self.p.services.psql(&self.p.pg_url, sql)
    }

    /// Workers running a task of either job, with what they run (the coordinator may be down:
    /// then no one is known).
    fn busy_workers(&self) -> BTreeMap<String, Vec<String>> {
        let mut busy: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for job in [&self.ingest, &self.process] {
            let Ok(status) = self.p.cluster.status(job) else { continue };
            for t in status["tasks"].as_array().map(Vec::as_slice).unwrap_or_default() {
                if let (Some(w), Some(ops)) = (t["worker_id"].as_str(), t["operators"].as_str()) {
                    busy.entry(w.to_string()).or_default().push(ops.to_string());
                }
            }
        }
        busy
    }

    /// Kills `victim` with SIGKILL and starts a replacement, as an orchestrator would.
    fn kill(&mut self, victim: &str, why: &str) -> Result<()> {
        self.say(&format!("kill -9 {victim} ({why})"));
        self.p.cluster.kill_worker(victim)?;
        self.alive.retain(|w| w != victim);
        self.kills += 1;
        self.replacements += 1;
        let id = format!("r{}", self.replacements);
        self.p.cluster.add_worker(&id, 4)?;
        self.alive.push(id);
        Ok(())
    }

    /// Kills a random worker among those running tasks (any live one if none is known).
    fn kill_random(&mut self) -> Result<()> {
        let busy = self.busy_workers();
        let mut candidates: Vec<String> = self.alive.iter().filter(|w| busy.contains_key(*w)).cloned().collect();
        if candidates.is_empty() {
            candidates = self.alive.clone();
        }
        let victim = candidates[self.rng.between(0..candidates.len() as u64) as usize].clone();
        let runs = busy.get(&victim).map(|ops| ops.join(", ")).unwrap_or_else(|| "no task known".into());
        self.kill(&victim, &format!("runs {runs}"))
    }

    fn control(&mut self, action: &str, service: &str) -> Result<()> {
        self.say(&format!("{action} {service}"));
        self.p.services.control(action, service)?;
        // An outage that did not happen would pass for one that was ridden out: check it.
        let answers = self.answers(service);
        if action == "stop" && answers {
            self.mismatch(format!("setup: {service} still answers after `scripts/services.sh stop {service}`: no outage"));
        } else if action == "start" && !answers {
            self.mismatch(format!("setup: {service} does not answer after `scripts/services.sh start {service}`"));
        }
        Ok(())
    }

    /// Whether `service` answers a trivial request now.
    fn answers(&self, service: &str) -> bool {
        let s = &self.p.services;
        match service {
            "postgres" => s.var("EDDY_PG_URL").is_ok_and(|url| s.psql(url, "SELECT 1").is_ok()),
            "redis" => s.redis(&["PING"]).is_ok(),
            "clickhouse" => s.clickhouse("SELECT 1").is_ok(),
            _ => false,
        }
    }

    fn apply(&mut self, fault: Fault) -> Result<()> {
        match fault {
            Fault::Kill => self.kill_random()?,
            Fault::Coordinator if self.settings.coordinators > 1 => {
                let leader = self.p.cluster.leader()?;
                self.say(&format!("kill -9 coordinator {leader}, the leader; start it again on its data dir"));
                self.p.cluster.kill_coordinator(leader)?;
                self.p.cluster.start_coordinator(leader)?;
                self.coordinator_restarts += 1;
            }
            Fault::Coordinator => {
                self.say("kill -9 the coordinator, restart it on the same data dir");
                self.p.cluster.restart_coordinator()?;
                self.coordinator_restarts += 1;
            }
            Fault::Postgres => {
                self.control("stop", "postgres")?;
                self.control("start", "postgres")?;
                self.postgres_restarts += 1;
            }
            Fault::Down(service) => {
                self.down_since.insert(service, Instant::now());
                if service == "http" {
                    self.say("stop the external system (kill -9 eddy-mock-api)");
                    self.p.stop_mock();
                } else {
                    self.control("stop", service)?;
                }
            }
            Fault::Up(service) => {
                if service == "http" {
                    self.say("start the external system again on its address and log");
                    self.p.start_mock()?;
                } else {
                    self.control("start", service)?;
                }
                // How long it was really away (a service may take a while to stop or start).
                let since = self.down_since.remove(service).map_or(0.0, |t| t.elapsed().as_secs_f64());
                self.outages.push(format!("{service}:{since:.0}s"));
            }
        }
        Ok(())
    }

    /// The schedule: (seconds after the writers start, fault), in order.
    fn schedule(&mut self) -> Vec<(f64, Fault)> {
        let s = self.settings.seconds as f64;
        let outage = self.settings.outage as f64;
        let at = |rng: &mut Rng, from: f64, to: f64| from + (to - from).max(0.0) * rng.between(0..10_000) as f64 / 10_000.0;
        let mut faults = Vec::new();
        // The first kill was the CDC worker's, during the snapshot.
        for _ in 1..self.settings.kills {
            faults.push((at(&mut self.rng, 0.03 * s, 0.97 * s), Fault::Kill));
        }
        faults.push((at(&mut self.rng, 0.03 * s, 0.97 * s), Fault::Coordinator));
        faults.push((at(&mut self.rng, 0.03 * s, 0.97 * s), Fault::Postgres));
        for service in ["redis", "clickhouse", "http"] {
            let down = at(&mut self.rng, 0.03 * s, (s - outage).max(0.03 * s));
            faults.push((down, Fault::Down(service)));
            faults.push((down + outage, Fault::Up(service)));
        }
        faults.sort_by(|a, b| a.0.total_cmp(&b.0));
        faults
    }
}

/// Starts the services that outages stop, whatever happened (they are shared with other tests).
struct RestoreServices;

impl Drop for RestoreServices {
    fn drop(&mut self) {
        let _ = Command::new(repo_root().join("scripts/services.sh"))
            .args(["start", "postgres", "redis", "clickhouse"])
            .stdin(Stdio::null())
            .status();
    }
}

/// The writers: data generator runs of a few seconds (steady, or bursts of ten times the rate),
/// each followed by updates and deletes of old events. A run cut short by the PostgreSQL restart
/// fails; the writer waits for the database and goes on (what it committed is in the table, which
/// is what the checks compare with).
fn write(pg_url: String, seed: u64, rate: u64, until: Instant, old_before: String, stop: Arc<AtomicBool>) -> Written {
    let mut rng = Rng::from_seed(seed);
    let mut w = Written::default();
    let psql = |sql: &str| -> Option<String> {
        let out = Command::new("psql").args([pg_url.as_str(), "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql]).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    while Instant::now() < until && !stop.load(Ordering::Relaxed) {
        let left = until.saturating_duration_since(Instant::now()).as_secs_f64();
        let burst = rng.between(0..100) < 15;
        let (rate, seconds) = if burst { (rate * 10, 1.5f64) } else { (rate, 5.0f64) };
        let seconds = format!("{:.2}", seconds.min(left).max(0.1));
        // A handful of seeds: the catalogue stays small (six times 20 content rows).
        let data_seed = (seed % 1000) * 10 + rng.between(0..6);
        let args = [
            "--contents",
            "20",
            "--rate",
            &rate.to_string(),
            "--seconds",
            &seconds,
            "--seed",
            &data_seed.to_string(),
            "--updates-pct",
            "10",
            "--deletes-pct",
            "5",
            "--unknown-pct",
            "5",
            "--no-schema",
        ];
        let out = Command::new(bin("eddy-datagen")).args(["--pg-url", &pg_url]).args(args).output();
        w.chunks += 1;
        w.bursts += u64::from(burst);
        match out {
            Ok(out) if out.status.success() => {
                let text = String::from_utf8_lossy(&out.stdout);
                let field = |name: &str| -> u64 {
                    text.split_whitespace().find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok()).unwrap_or(0)
                };
                w.inserted += field("inserted");
                w.updated += field("updated");
                w.deleted += field("deleted");
            }
            Ok(out) => {
                w.failed_chunks += 1;
                eprintln!(
                    "chaos writer: a data generator run failed (PostgreSQL restarting?): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                // Wait for the database (bounded: the restart takes seconds).
                let back = Instant::now() + Duration::from_secs(120);
                while psql("SELECT 1").is_none() && Instant::now() < back {
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            Err(e) => {
                w.failed_chunks += 1;
                eprintln!("chaos writer: cannot run eddy-datagen: {e}");
            }
        }
        // Updates and deletes of old events (outside the checked window).
        let pick = rng.between(0..1_000_003);
        let update = format!(
            "UPDATE engagement_events SET duration_ms = 500 + (id * 7919 + {pick}) % 600000, event_type = 'finish'
             WHERE id IN (SELECT id FROM engagement_events WHERE event_ts < {old_before} ORDER BY (id * 7919 + {pick}) % 1000003 LIMIT 3)
             RETURNING id"
        );
        w.old_updated += psql(&update).map_or(0, |o| o.lines().count() as u64);
        let delete = format!(
            "DELETE FROM engagement_events
             WHERE id IN (SELECT id FROM engagement_events WHERE event_ts < {old_before} ORDER BY (id * 104729 + {pick}) % 1000003 LIMIT 2)
             RETURNING id"
        );
        w.old_deleted += psql(&delete).map_or(0, |o| o.lines().count() as u64);
    }
    w
}

/// The external system's view: each event id → the versions received.
fn received_versions(events: &[Value]) -> BTreeMap<i64, BTreeSet<u64>> {
    let mut out: BTreeMap<i64, BTreeSet<u64>> = BTreeMap::new();
    for e in events {
        if let Some((id, version, _)) = e["key"].as_str().and_then(external_key_parts) {
            out.entry(id).or_default().insert(version);
        }
    }
    out
}

/// Lines of a JSON-lines file (none when it does not exist).
fn json_lines(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| Value::String(l.to_string())))
        .collect()
}

#[test]
fn chaos_run_keeps_every_outcome_exact() -> Result<()> {
    let settings = Settings::from_env();
    let rng = Rng::for_test("chaos");
    eprintln!("chaos: {settings:?}");
    let wall = Instant::now();
    let p = match settings.coordinators {
        1 => Pipeline::start_with("chaos", 3)?,
        n => Pipeline::start_replicated("chaos", n, 3)?,
    };
    let alive = p.cluster.workers.iter().map(|(w, _)| w.clone()).collect();
    let mut c = Chaos {
        p,
        rng,
        settings,
        ingest: String::new(),
        process: String::new(),
        alive,
        kills: 0,
        replacements: 0,
        coordinator_restarts: 0,
        postgres_restarts: 0,
        outages: Vec::new(),
        down_since: BTreeMap::new(),
        mismatches: Vec::new(),
        started: Instant::now(),
    };
    // Dropped before the pipeline, whose clean-up needs PostgreSQL.
    let _restore = RestoreServices;

    // 1. The audit of writes, the catalogue, and the old events (15 to 20 minutes old).
    c.sql(
        "CREATE TABLE chaos_writes (id bigint NOT NULL);
         CREATE FUNCTION chaos_count_write() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN INSERT INTO chaos_writes VALUES (CASE WHEN TG_OP = 'DELETE' THEN OLD.id ELSE NEW.id END); RETURN NULL; END $$;
         CREATE TRIGGER chaos_count_write AFTER INSERT OR UPDATE OR DELETE ON engagement_events
           FOR EACH ROW EXECUTE FUNCTION chaos_count_write();",
    )?;
    let seed = c.rng.seed();
    // The catalogue: six content sets, one event each, which is neither updated nor deleted here. An
    // event deleted before the ingest job's slot exists is in no snapshot and no stream, so nothing
    // of it can reach the external system, yet the audit holds its writes (a false mismatch).
    for k in 0..6 {
        let data_seed = (seed % 1000) * 10 + k;
        let seed_arg = data_seed.to_string();
        let args = [
            "--contents",
            "20",
            "--count",
            "1",
            "--rate",
            "1000",
            "--seed",
            &seed_arg,
            "--updates-pct",
            "0",
            "--deletes-pct",
            "0",
            "--no-schema",
        ];
        c.p.datagen(&args)?;
    }
    let start_s: f64 = c.sql("SELECT extract(epoch FROM now())")?.trim().parse()?;
    let old_before = format!("to_timestamp({:.0})", start_s - 720.0);
    let prefill = c.settings.prefill;
    let set_seed = c.rng.between(0..10_000) as f64 / 10_000.0;
    c.sql(&format!(
        "SELECT setseed({set_seed});
         INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
         SELECT CASE WHEN random() < 0.05 THEN md5('unknown' || i)::uuid ELSE ids[1 + floor(random() * array_length(ids, 1))::int] END,
                md5('user' || (i % 500))::uuid,
                (ARRAY['play', 'pause', 'finish', 'click'])[1 + floor(random() * 4)::int],
                to_timestamp({start_s}) - interval '15 minutes' - random() * interval '5 minutes',
                CASE WHEN random() < 0.1 THEN NULL ELSE 500 + floor(random() * 600000)::int END,
                (ARRAY['ios', 'android', 'web', 'tv'])[1 + floor(random() * 4)::int],
                json_build_object('seq', i)::jsonb
         FROM generate_series(1, {prefill}) i, (SELECT array_agg(id ORDER BY id) AS ids FROM content) c"
    ))?;
    c.say(&format!("{prefill} old events written"));

    // 2. The jobs; the worker running the CDC source is killed during the snapshot, and old rows
    //    (some read, some not yet) are deleted and updated while the job is down.
    let ttl = std::env::var("CHAOS_STATE_TTL").unwrap_or_else(|_| STATE_TTL.to_string());
    c.process = c.p.submit_with("process.toml", &[("EDDY_STATE_TTL", &ttl)])?;
    c.p.cluster.wait_state(&c.process, "running", Duration::from_secs(60))?;
    c.ingest = c.p.submit("ingest.toml")?;
    let threshold = (prefill * c.rng.between(2..15) / 100) as i64;
    let mut done_at_kill = 0;
    c.p.cluster.wait(Duration::from_secs(120), "the snapshot to be under way", |_| {
        done_at_kill = c.p.gauge(&c.ingest, "snapshot_rows_done")?.unwrap_or(0);
        Ok(done_at_kill >= threshold)
    })?;
    let status = c.p.cluster.status(&c.ingest)?;
    let cdc = status["tasks"]
        .as_array()
        .context("tasks")?
        .iter()
        .find(|t| t["operators"].as_str().is_some_and(|o| o.contains("engagement_events")));
    let cdc = cdc.and_then(|t| t["worker_id"].as_str()).context("the CDC task")?.to_string();
    c.kill(&cdc, &format!("runs the CDC source, {done_at_kill} of {prefill} snapshot rows read"))?;
    if done_at_kill >= prefill as i64 {
        c.mismatch(format!("setup: the snapshot ended before the kill ({done_at_kill} rows); raise CHAOS_PREFILL_ROWS"));
    }
    let pick = c.rng.between(0..1_000_003);
    c.sql(&format!(
        "DELETE FROM engagement_events WHERE id IN (SELECT id FROM engagement_events ORDER BY id LIMIT 10);
         DELETE FROM engagement_events WHERE id IN (SELECT id FROM engagement_events ORDER BY id DESC LIMIT 10);
         UPDATE engagement_events SET duration_ms = 4242 WHERE id IN (SELECT id FROM engagement_events ORDER BY (id * 7919 + {pick}) % 1000003 LIMIT 20);"
    ))?;

    // 3. Writers and faults, together.
    let stop = Arc::new(AtomicBool::new(false));
    let writers = {
        let (url, seed, rate, stop) = (c.p.pg_url.clone(), c.rng.between(0..1 << 30), c.settings.rate, stop.clone());
        let until = Instant::now() + Duration::from_secs(c.settings.seconds);
        std::thread::spawn(move || write(url, seed, rate, until, old_before, stop))
    };
    let begun = Instant::now();
    let schedule = c.schedule();
    eprintln!("chaos: schedule {:?}", schedule.iter().map(|(t, f)| format!("+{t:.1}s {f:?}")).collect::<Vec<_>>());
    let mut failure = None;
    for (at, fault) in schedule {
        // The fault's moment (a deliberate pause: the schedule, not a wait for a condition). An
        // outage lasts its full length even when its start came late (a service slow to stop).
        let mut at = Duration::from_secs_f64(at);
        if let Fault::Up(service) = fault {
            if let Some(since) = c.down_since.get(service) {
                at = at.max(since.duration_since(begun) + Duration::from_secs(c.settings.outage));
            }
        }
        std::thread::sleep(at.saturating_sub(begun.elapsed()));
        if let Err(e) = c.apply(fault) {
            failure = Some(e.context(format!("applying {fault:?}")));
            break;
        }
    }
    let written = writers.join().map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    stop.store(true, Ordering::Relaxed);
    if let Some(e) = failure {
        return Err(e);
    }
    c.say(&format!("writers done: {written:?}"));

    // 4. Both jobs run again.
    for job in [c.ingest.clone(), c.process.clone()] {
        if c.p.cluster.wait(Duration::from_secs(180), "the job to run", |cl| Ok(cl.status(&job)?["state"] == "running")).is_err() {
            let status = c.p.cluster.status(&job).unwrap_or_default();
            c.mismatch(format!("job {job} is {} after the faults: {}", status["state"], status["history"]));
        }
    }

    // 5. ClickHouse, the external system (the versions ClickHouse holds) and the leaderboard
    //    against PostgreSQL.
    // How long the outputs may take to settle after the writers stop: a job that restarted late
    // catches up meanwhile.
    let settle = Duration::from_secs(120 + 2 * c.settings.outage);
    let outcomes = outcome_mismatches(&c.p, None, settle)?;
    for m in outcomes.mismatches.clone() {
        c.mismatch(m);
    }

    // 6. The external system, beyond the latest versions. The HTTP sink delivers at least once
    //    with an `Idempotency-Key` of id:version, and the receiver deduplicates by it, so the same
    //    key arriving twice is expected after a crash and harmless (`chaos_external_duplicates`).
    //    What "no key twice" can honestly mean, and what is checked:
    //    - a key never arrives with two different payloads (the receiver would keep the first and
    //      silently drop a real difference): the stand-in counts them as `conflicts`;
    //    - one change never arrives under two keys (a re-read snapshot or a replay that gave a row
    //      a new version would make the receiver apply it twice): an event never reaches the
    //      external system under more versions than PostgreSQL wrote it (inserts plus updates,
    //      from the audit table);
    //    - nothing newer than what ClickHouse holds: the last version received for a surviving
    //      event is the one in ClickHouse;
    //    - an event deleted from PostgreSQL was last received as a delete (`deleted: true`);
    //    - no version is lost to the HTTP sink's dead letters (a row given up on after its retries).
    let stats = c.p.external_stats()?;
    let conflicts = stats["conflicts"].as_u64().unwrap_or(0);
    if conflicts > 0 {
        c.mismatch(format!("external: {conflicts} deliveries reused a key with a different payload: {stats}"));
    }
    let events = c.p.external_events()?;
    let received = received_versions(&events);
    let writes: HashMap<i64, u64> = c
        .sql("SELECT id, count(*) FROM chaos_writes GROUP BY id")?
        .lines()
        .filter_map(|l| l.split_once('|'))
        .filter_map(|(id, n)| Some((id.parse().ok()?, n.parse().ok()?)))
        .collect();
    let deleted_last: HashMap<i64, bool> = {
        let mut last: HashMap<i64, (u64, bool)> = HashMap::new();
        for e in &events {
            let Some((id, version, deleted)) = e["key"].as_str().and_then(external_key_parts) else { continue };
            // Of an insert and a delete under one version, the delete is the later.
            if last.get(&id).is_none_or(|(v, d)| (version, deleted) > (*v, *d)) {
                last.insert(id, (version, deleted));
            }
        }
        last.into_iter().map(|(id, (_, deleted))| (id, deleted)).collect()
    };
    for id in writes.keys().filter(|id| !outcomes.expected.contains_key(id)) {
        match deleted_last.get(id) {
            Some(true) => {}
            Some(false) => c.mismatch(format!("external: event {id} was deleted, but the last version received is not a delete")),
            None => c.mismatch(format!("external: event {id} was deleted, and nothing of it was received")),
        }
    }
    for (id, versions) in &received {
        let times = writes.get(id).copied().unwrap_or(0);
        if versions.len() as u64 > times {
            c.mismatch(format!(
                "external: event {id} arrived under {} versions {versions:?}, but PostgreSQL wrote it {times} times",
                versions.len()
            ));
        }
        if let Some(row) = outcomes.clickhouse.get(id) {
            let held = num(&row["version"]).map(|v| v as u64);
            let last = versions.iter().next_back().copied();
            if held.is_some_and(|h| last.is_some_and(|l| l > h)) {
                c.mismatch(format!("external: event {id} got version {last:?}, newer than ClickHouse's {held:?}"));
            }
        }
    }
    let keys: BTreeSet<&str> = events.iter().filter_map(|e| e["key"].as_str()).collect();
    let http_letters = json_lines(&c.p.cluster.dir.0.join("http-dead-letters.jsonl"));
    let mut lost = 0;
    for letter in &http_letters {
        let key = letter["idempotency_key"].as_str().unwrap_or_default();
        if !keys.contains(key) {
            lost += 1;
            if lost <= 20 {
                c.mismatch(format!("external: {key} was dead-lettered by the HTTP sink and never delivered: {}", letter["error"]));
            } else {
                c.mismatches.push(format!("external: {key} dead-lettered"));
            }
        }
    }
    if lost > 20 {
        eprintln!("chaos mismatch: … and {} more versions dead-lettered by the HTTP sink", lost - 20);
    }
    let letters = json_lines(&c.p.cluster.dir.0.join("dead-letters.jsonl"));
    for letter in &letters {
        c.mismatch(format!("dead letter (no record of this run is bad): {letter}"));
    }

    // 7. The leaderboard decays to empty once 10 minutes of event time pass without events. To
    //    make them pass now, one last event is stamped 11 minutes after the latest one: it moves
    //    the watermark past every window holding a written event. It has no duration, so it adds
    //    nothing to any window (SUM of no value is NULL, a member the Redis sink skips; SQL's
    //    reference skips NULL durations alike), and the leaderboard must be empty for the windows
    //    it closes. It is an event like the others for ClickHouse and the external system.
    let latest_ms: i64 = c.sql("SELECT floor(extract(epoch FROM max(event_ts)) * 1000)::bigint FROM engagement_events")?.trim().parse()?;
    let stamp_ms = latest_ms + WINDOW_MS + 60_000;
    let sentinel: i64 = c
        .sql(&format!(
            "INSERT INTO engagement_events (content_id, user_id, event_type, event_ts, duration_ms, device, raw_payload)
             SELECT id, md5('sentinel')::uuid, 'play', to_timestamp({stamp_ms} / 1000.0), NULL, 'web', '{{\"chaos\": \"last\"}}'
             FROM content ORDER BY id LIMIT 1 RETURNING id"
        ))?
        .trim()
        .parse()?;
    let decayed = c.p.cluster.wait(Duration::from_secs(120), "the leaderboard to empty", |_| {
        let (end, board) = c.p.leaderboard()?;
        Ok(end.is_some_and(|e| e > latest_ms + WINDOW_MS) && board.is_empty())
    });
    if decayed.is_err() {
        let (end, board) = c.p.leaderboard().unwrap_or_default();
        c.mismatch(format!(
            "leaderboard: not empty 10 minutes of event time after the last event (at {latest_ms}): window end {end:?}, {} members",
            board.len()
        ));
    }
    let live_sentinel = format!("SELECT version FROM {}.engagement_enriched FINAL WHERE id = {sentinel} AND deleted = 0", c.p.name);
    let reached = c.p.cluster.wait(Duration::from_secs(60), "the last event in ClickHouse and the external system", |_| {
        let version = c.p.services.clickhouse(&live_sentinel)?;
        let key = format!("{sentinel}:{}", version.trim());
        Ok(!version.trim().is_empty() && c.p.external_events()?.iter().any(|e| e["key"] == key.as_str()))
    });
    if reached.is_err() {
        c.mismatch(format!("the last event {sentinel} did not reach ClickHouse and the external system"));
    }

    // 8. The figures.
    let mut restarts = BTreeMap::new();
    let mut late = 0;
    for (name, job) in [("ingest", c.ingest.clone()), ("process", c.process.clone())] {
        let status = c.p.cluster.status(&job).unwrap_or_default();
        restarts.insert(name, status["restarts"].as_u64().unwrap_or(0));
        // Records the windows found late (the old events' updates among them), this attempt's.
        late += status["tasks"].as_array().map_or(0, |ts| ts.iter().filter_map(|t| t["late_records"].as_u64()).sum::<u64>());
        eprintln!("chaos: {name} job {job} is {}; history: {}", status["state"], status["history"]);
    }
    let stats = c.p.external_stats().unwrap_or_default();
    let keys_of = |r: &BTreeMap<i64, Value>| r.len();
    let kinds: Vec<String> = c.outages.clone();
    let figures = [
        ("chaos_seed", c.rng.seed().to_string()),
        ("chaos_seconds", c.settings.seconds.to_string()),
        ("chaos_state_ttl", ttl.clone()),
        ("chaos_kills", c.kills.to_string()),
        ("chaos_cdc_kill_snapshot_rows", format!("{done_at_kill}/{prefill}")),
        ("chaos_coordinators", c.settings.coordinators.to_string()),
        ("chaos_coordinator_restarts", c.coordinator_restarts.to_string()),
        ("chaos_postgres_restarts", c.postgres_restarts.to_string()),
        ("chaos_outages", kinds.join(",")),
        ("chaos_writer_runs", written.chunks.to_string()),
        ("chaos_writer_bursts", written.bursts.to_string()),
        ("chaos_writer_runs_cut_short", written.failed_chunks.to_string()),
        ("chaos_inserted", (prefill + written.inserted).to_string()),
        ("chaos_updated", (written.updated + written.old_updated).to_string()),
        ("chaos_deleted", (written.deleted + written.old_deleted).to_string()),
        ("chaos_old_updated", written.old_updated.to_string()),
        ("chaos_old_deleted", written.old_deleted.to_string()),
        ("chaos_surviving_rows", keys_of(&outcomes.expected).to_string()),
        ("chaos_clickhouse_rows", keys_of(&outcomes.clickhouse).to_string()),
        ("chaos_external_unique", stats["unique"].to_string()),
        ("chaos_external_duplicates", stats["duplicates"].to_string()),
        ("chaos_external_conflicts", stats["conflicts"].to_string()),
        ("chaos_http_dead_letters", http_letters.len().to_string()),
        ("chaos_dead_letters", letters.len().to_string()),
        ("chaos_leaderboard_window_end", outcomes.window_end.map_or("none".into(), |e| e.to_string())),
        ("chaos_restarts_ingest", restarts["ingest"].to_string()),
        ("chaos_restarts_process", restarts["process"].to_string()),
        ("chaos_late_records", late.to_string()),
        ("chaos_wall_seconds", format!("{:.0}", wall.elapsed().as_secs_f64())),
        ("chaos_mismatches", c.mismatches.len().to_string()),
    ];
    for (name, value) in figures {
        println!("{name}={value}");
    }
    // A panic (not an error) keeps the cluster's logs and the databases for a look.
    let n = c.mismatches.len();
    assert!(
        n == 0,
        "{n} mismatches (replay with EDDY_TEST_SEED={}); the first:\n{}",
        c.rng.seed(),
        c.mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    Ok(())
}
