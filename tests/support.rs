//! Helpers for the end-to-end tests: start the real `eddy-coordinator` and `eddy-worker` binaries
//! on free loopback ports, run the real `eddy` CLI against them, and clean up on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;

/// Directory holding the workspace's binaries (next to this test executable's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// Path of one of the workspace's binaries; run `cargo build --workspace --bins` first.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.exists(), "{} is missing; run `cargo build --workspace --bins` before the tests", path.display());
    path
}

/// A free loopback port (bound and released; good enough for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// A small reproducible random source for tests that pick moments or data at random. The seed
/// comes from `EDDY_TEST_SEED` when set, else from the clock; it is printed, so a failing run
/// replays with `EDDY_TEST_SEED=<seed>`.
pub struct Rng(u64);

impl Rng {
    /// A generator for `test`, printing its seed.
    pub fn for_test(test: &str) -> Rng {
        let seed = std::env::var("EDDY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
        });
        eprintln!("{test}: seed={seed} (replay with EDDY_TEST_SEED={seed})");
        Rng(seed)
    }

    /// The next number in `range`.
    pub fn between(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        range.start + (self.0 >> 33) % (range.end - range.start).max(1)
    }
}

/// A fresh scratch directory under the system temp dir, removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    /// Creates `eddy-<name>-<pid>-<n>`.
    pub fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("eddy-{name}-{}-{}", std::process::id(), free_port()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A coordinator and its workers, each a real process; killed on drop.
pub struct Cluster {
    /// Coordinator `host:port`.
    pub address: String,
    coordinator: Child,
    /// (worker id, process)
    pub workers: Vec<(String, Child)>,
    /// Logs and outputs.
    pub dir: Scratch,
}

impl Cluster {
    /// Starts a coordinator and `workers` workers with `slots` slots each, and waits until all registered.
    pub fn start(name: &str, workers: usize, slots: u32) -> Result<Cluster> {
        let dir = Scratch::new(name);
        // Port 0: the coordinator picks a free port and prints it (no race between tests).
        let log = dir.0.join("coordinator.log");
        let coordinator = spawn_coordinator(&dir.0, "127.0.0.1:0", &log)?;
        let address = wait_for_line(&log, "eddy-coordinator listening on ")?;
        let mut cluster = Cluster { address, coordinator, workers: Vec::new(), dir };
        for i in 1..=workers {
            cluster.add_worker(&format!("w{i}"), slots)?;
        }
        cluster.wait(Duration::from_secs(20), "workers to register", |c| {
            let w = c.eddy_json(&["workers"])?;
            Ok(w.as_array().map(|a| a.iter().filter(|w| w["state"] == "alive").count()) == Some(workers))
        })?;
        Ok(cluster)
    }

    /// Kills the coordinator (SIGKILL) and starts a new one on the same address and data
    /// directory; workers reconnect to it by themselves.
    pub fn restart_coordinator(&mut self) -> Result<()> {
        self.coordinator.kill()?;
        self.coordinator.wait()?;
        let log = self.dir.0.join("coordinator-2.log");
        self.coordinator = spawn_coordinator(&self.dir.0, &self.address, &log)?;
        wait_for_line(&log, "eddy-coordinator listening on ")?;
        Ok(())
    }

    /// Starts one more worker (on a port of its choosing, which it registers).
    pub fn add_worker(&mut self, id: &str, slots: u32) -> Result<()> {
        let state = self.dir.0.join(format!("{id}-state"));
        let child = spawn_logged(
            Command::new(bin("eddy-worker")).args(["--coordinator", &self.address, "--listen", "127.0.0.1:0", "--id", id, "--slots", &slots.to_string()])
                .arg("--state-dir")
                .arg(&state),
            &self.dir.0.join(format!("{id}.log")),
        )?;
        self.workers.push((id.to_string(), child));
        Ok(())
    }

    /// The OS process id of worker `id`.
    pub fn worker_pid(&self, id: &str) -> u32 {
        self.workers.iter().find(|(w, _)| w == id).map(|(_, c)| c.id()).expect("known worker")
    }

    /// Kills worker `id` with SIGKILL.
    pub fn kill_worker(&mut self, id: &str) -> Result<()> {
        let (_, child) = self.workers.iter_mut().find(|(w, _)| w == id).context("unknown worker")?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// Runs the CLI with extra environment.
    pub fn eddy_env(&self, args: &[&str], env: &[(&str, &str)]) -> Result<Output> {
        let mut cmd = Command::new(bin("eddy"));
        cmd.args(args).env("EDDY_COORDINATOR", &self.address);
        for (k, v) in env {
            cmd.env(k, v);
        }
        Ok(cmd.output()?)
    }

    /// Runs the CLI and returns its output.
    pub fn eddy(&self, args: &[&str]) -> Result<Output> {
        self.eddy_env(args, &[])
    }

    /// Runs the CLI with `--json`, requiring success, and parses stdout.
    pub fn eddy_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = args.to_vec();
        all.push("--json");
        let out = self.eddy(&all)?;
        if !out.status.success() {
            bail!("eddy {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Writes a spec file into the scratch dir and submits it; returns the job id.
    pub fn submit(&self, name: &str, spec: &str) -> Result<String> {
        let path = self.dir.0.join(format!("{name}.toml"));
        std::fs::write(&path, spec)?;
        let v = self.eddy_json(&["submit", path.to_str().context("utf-8 path")?])?;
        Ok(v["job_id"].as_str().context("job_id")?.to_string())
    }

    /// `eddy status JOB --json`.
    pub fn status(&self, job: &str) -> Result<Value> {
        self.eddy_json(&["status", job])
    }

    /// Polls `check` every 100 ms until it returns true or `timeout` passes.
    pub fn wait(&self, timeout: Duration, what: &str, mut check: impl FnMut(&Cluster) -> Result<bool>) -> Result<Duration> {
        let start = Instant::now();
        let mut last_err = None;
        while start.elapsed() < timeout {
            match check(self) {
                Ok(true) => return Ok(start.elapsed()),
                Ok(false) => {}
                Err(e) => last_err = Some(e),
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let tail = |file: &str| {
            let text = std::fs::read_to_string(self.dir.0.join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            lines[lines.len().saturating_sub(15)..].join("\n")
        };
        bail!(
            "timed out after {timeout:?} waiting for {what} (last error: {last_err:?})\n--- coordinator.log (end)\n{}\n--- w1.log (end)\n{}",
            tail("coordinator.log"),
            tail("w1.log")
        )
    }

    /// Waits until the job reaches `state`.
    pub fn wait_state(&self, job: &str, state: &str, timeout: Duration) -> Result<Value> {
        self.wait(timeout, &format!("job {job} to be {state}"), |c| Ok(c.status(job)?["state"] == state))?;
        self.status(job)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, w) in &mut self.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let _ = self.coordinator.kill();
        let _ = self.coordinator.wait();
        if std::thread::panicking() || std::env::var_os("EDDY_KEEP_LOGS").is_some() {
            // Keep the logs of a failed test where the message points.
            let keep = self.dir.0.with_extension("failed");
            let _ = std::fs::rename(&self.dir.0, &keep);
            eprintln!("logs kept in {}", keep.display());
        }
    }
}

/// A coordinator keeping its metadata and checkpoints under `dir`.
fn spawn_coordinator(dir: &Path, listen: &str, log: &Path) -> Result<Child> {
    spawn_logged(Command::new(bin("eddy-coordinator")).args(["--listen", listen]).arg("--data-dir").arg(dir.join("coordinator")), log)
}

/// Waits (up to 10 s) for a line starting with `prefix` in `log`; returns the rest of the line.
pub fn wait_for_line(log: &Path, prefix: &str) -> Result<String> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Ok(text) = std::fs::read_to_string(log) {
            if let Some(rest) = text.lines().find_map(|l| l.strip_prefix(prefix)) {
                return Ok(rest.trim().to_string());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no `{prefix}…` line in {} after 10 s", log.display())
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Result<Child> {
    let file = std::fs::File::create(log)?;
    Ok(cmd.stdin(Stdio::null()).stdout(file.try_clone()?).stderr(file).spawn()?)
}

/// Resident memory of a process in MiB, from /proc.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .context("VmRSS")?
        .parse()?;
    Ok(kb / 1024.0)
}

/// Reads newline-delimited JSON files.
pub fn read_jsonl(paths: &[PathBuf]) -> Result<Vec<Value>> {
    let mut rows = Vec::new();
    for p in paths {
        let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        for line in text.lines().filter(|l| !l.is_empty()) {
            rows.push(serde_json::from_str(line).with_context(|| format!("bad line in {}: {line}", p.display()))?);
        }
    }
    Ok(rows)
}

/// The real services (PostgreSQL, the Kafka-protocol broker, Redis, ClickHouse) started by
/// `scripts/services.sh`, and per-test databases, topics and keys on them.
pub struct Services {
    /// Settings printed by `scripts/services.sh env` (EDDY_PG_URL, EDDY_KAFKA_BROKERS, …).
    pub env: std::collections::HashMap<String, String>,
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ is inside the repository").to_path_buf()
}

static SERVICES: std::sync::Mutex<bool> = std::sync::Mutex::new(false);

impl Services {
    /// Starts the services once per test process (idempotent), and reads their settings.
    pub fn start() -> Result<Services> {
        let script = repo_root().join("scripts/services.sh");
        let mut started = SERVICES.lock().unwrap_or_else(|e| e.into_inner());
        if !*started {
            let status = Command::new(&script).arg("start").stdin(Stdio::null()).status()?;
            if !status.success() {
                bail!("`scripts/services.sh start` failed");
            }
            *started = true;
        }
        let out = Command::new(&script).arg("env").output()?;
        let mut env = std::collections::HashMap::new();
        for line in String::from_utf8(out.stdout)?.lines() {
            if let Some((k, v)) = line.trim_start_matches("export ").split_once('=') {
                env.insert(k.to_string(), v.trim_matches(|c| c == '"' || c == '\'').to_string());
            }
        }
        Ok(Services { env })
    }

    /// Runs `scripts/services.sh ACTION SERVICE` (e.g. `stop clickhouse`), to stage an outage.
    pub fn control(&self, action: &str, service: &str) -> Result<()> {
        let status = Command::new(repo_root().join("scripts/services.sh")).args([action, service]).stdin(Stdio::null()).status()?;
        ensure!(status.success(), "`scripts/services.sh {action} {service}` failed");
        Ok(())
    }

    /// A setting, e.g. `EDDY_PG_URL`.
    pub fn var(&self, name: &str) -> Result<&str> {
        self.env.get(name).map(String::as_str).with_context(|| format!("services.sh env did not print {name}"))
    }

    /// Runs SQL with psql against `url`; returns stdout (unaligned, tuples only).
    pub fn psql(&self, url: &str, sql: &str) -> Result<String> {
        let out = Command::new("psql").args([url, "-v", "ON_ERROR_STOP=1", "-Atq", "-c", sql]).output()?;
        if !out.status.success() {
            bail!("psql failed on `{sql}`: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs a SQL query that returns one JSON value (e.g. `SELECT json_agg(t) FROM (…) t`).
    pub fn psql_json(&self, url: &str, sql: &str) -> Result<Value> {
        let text = self.psql(url, sql)?;
        Ok(if text.trim().is_empty() { Value::Null } else { serde_json::from_str(text.trim())? })
    }

    /// Runs a ClickHouse statement over HTTP; returns the body.
    pub fn clickhouse(&self, sql: &str) -> Result<String> {
        let out = Command::new("curl").args(["-sS", "--fail-with-body", self.var("EDDY_CLICKHOUSE_URL")?, "--data-binary", sql]).output()?;
        if !out.status.success() {
            bail!("clickhouse failed on `{sql}`: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?)
    }

    /// Runs redis-cli with `--json` and parses the reply.
    pub fn redis(&self, args: &[&str]) -> Result<Value> {
        let url = self.var("EDDY_REDIS_URL")?;
        let out = Command::new("redis-cli").args(["-u", url, "--json"]).args(args).output()?;
        if !out.status.success() {
            bail!("redis-cli {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = String::from_utf8(out.stdout)?;
        Ok(serde_json::from_str(text.trim()).unwrap_or(Value::String(text.trim().to_string())))
    }

    /// A fresh PostgreSQL database with the project's schema (sql/postgres.sql); returns its URL.
    pub fn postgres_database(&self, name: &str) -> Result<String> {
        let admin = self.var("EDDY_PG_URL")?.to_string();
        self.psql(&admin, &format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))?;
        self.psql(&admin, &format!("CREATE DATABASE {name}"))?;
        let url = match admin.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{name}"),
            None => bail!("unexpected EDDY_PG_URL {admin}"),
        };
        let out = Command::new("psql").args([&url, "-v", "ON_ERROR_STOP=1", "-q", "-f"]).arg(repo_root().join("sql/postgres.sql")).output()?;
        if !out.status.success() {
            bail!("applying sql/postgres.sql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(url)
    }

    /// Drops a replication slot left by an earlier run of a test.
    pub fn drop_slot(&self, slot: &str) -> Result<()> {
        let admin = self.var("EDDY_PG_URL")?.to_string();
        self.psql(&admin, &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"))?;
        Ok(())
    }

    /// A fresh ClickHouse database named `name` with the project's tables (sql/clickhouse.sql).
    pub fn clickhouse_database(&self, name: &str) -> Result<()> {
        self.clickhouse(&format!("DROP DATABASE IF EXISTS {name}"))?;
        let ddl = std::fs::read_to_string(repo_root().join("sql/clickhouse.sql"))?;
        let ddl = ddl.replace("EXISTS eddy", &format!("EXISTS {name}")).replace("eddy.", &format!("{name}."));
        for statement in strip_sql_comments(&ddl).split(';').map(str::trim).filter(|s| !s.is_empty()) {
            self.clickhouse(statement)?;
        }
        Ok(())
    }
}

fn strip_sql_comments(sql: &str) -> String {
    sql.lines().filter(|l| !l.trim_start().starts_with("--")).collect::<Vec<_>>().join("\n")
}

/// A process killed on drop (the external-API stand-in, the data generator).
pub struct Background(pub Child);

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts a background process with its output in `log`.
pub fn spawn_background(cmd: &mut Command, log: &Path) -> Result<Background> {
    Ok(Background(spawn_logged(cmd, log)?))
}

/// GET `url` with curl and parse the JSON body.
pub fn http_get_json(url: &str) -> Result<Value> {
    let out = Command::new("curl").args(["-sS", "--fail", url]).output()?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}
