//! Helpers for the end-to-end tests: start the real `eddy-coordinator` and `eddy-worker` binaries
//! on free loopback ports, run the real `eddy` CLI against them, and clean up on drop.

use std::collections::{BTreeMap, HashMap};
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
pub struct Rng {
    state: u64,
    seed: u64,
}

impl Rng {
    /// A generator for `test`, printing its seed.
    pub fn for_test(test: &str) -> Rng {
        let seed = std::env::var("EDDY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)
        });
        eprintln!("{test}: seed={seed} (replay with EDDY_TEST_SEED={seed})");
        Rng::from_seed(seed)
    }

    /// A generator starting from `seed` (e.g. one drawn from another, for a second thread).
    pub fn from_seed(seed: u64) -> Rng {
        Rng { state: seed, seed }
    }

    /// The seed this generator started from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The next number in `range`.
    pub fn between(&mut self, range: std::ops::Range<u64>) -> u64 {
        self.state = self.state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        range.start + (self.state >> 33) % (range.end - range.start).max(1)
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

/// A coordinator and its workers, each a real process; killed on drop. The coordinator is one
/// process, or several replicating their metadata with Raft.
pub struct Cluster {
    /// What clients are given: the coordinator's `host:port`, or every coordinator's, comma-separated.
    pub address: String,
    coordinators: Vec<CoordinatorProcess>,
    /// (worker id, process)
    pub workers: Vec<(String, Child)>,
    /// Logs and outputs.
    pub dir: Scratch,
    /// Environment every process of the cluster gets (checkpoint storage credentials).
    env: Vec<(String, String)>,
}

/// Checkpoint storage on the S3-protocol server that `scripts/services.sh` runs: a fresh prefix
/// of its bucket, and the environment that the coordinator and the workers reach it with.
pub struct S3Storage {
    /// `s3://bucket/prefix`, for --checkpoint-dir.
    pub url: String,
    /// AWS_* variables: endpoint, credentials, region.
    pub env: Vec<(String, String)>,
}

impl S3Storage {
    /// A prefix named after `test`, unique to this run.
    pub fn for_test(services: &Services, test: &str) -> Result<S3Storage> {
        let url = format!("s3://{}/{test}-{}-{}", services.var("EDDY_S3_BUCKET")?, std::process::id(), free_port());
        let env = [
            ("AWS_ENDPOINT", services.var("EDDY_S3_ENDPOINT")?),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ACCESS_KEY_ID", services.var("EDDY_S3_ACCESS_KEY")?),
            ("AWS_SECRET_ACCESS_KEY", services.var("EDDY_S3_SECRET_KEY")?),
            ("AWS_REGION", "us-east-1"),
        ];
        Ok(S3Storage { url, env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() })
    }
}

/// One coordinator process, and how to start it again.
struct CoordinatorProcess {
    /// Raft id; 0 for a coordinator alone.
    id: u64,
    /// The network namespace it runs in, if not this process's.
    netns: Option<String>,
    listen: String,
    args: Vec<String>,
    env: Vec<(String, String)>,
    child: Option<Child>,
    starts: u32,
    /// Where it serves its web page and `/metrics` (`http://ip:port/`, on the address it listens
    /// on, another port).
    http_url: String,
}

impl CoordinatorProcess {
    fn new(id: u64, netns: Option<String>, listen: String, args: Vec<String>, env: Vec<(String, String)>) -> CoordinatorProcess {
        CoordinatorProcess { id, netns, listen, args, env, child: None, starts: 0, http_url: String::new() }
    }

    fn spawn(&mut self, dir: &Path) -> Result<String> {
        self.starts += 1;
        let name = match (self.id, self.starts) {
            (0, 1) => "coordinator.log".to_string(),
            (0, n) => format!("coordinator-{n}.log"),
            (id, 1) => format!("coordinator{id}.log"),
            (id, n) => format!("coordinator{id}-{n}.log"),
        };
        let log = dir.join(name);
        let mut cmd = in_netns(self.netns.as_deref(), &bin("eddy-coordinator"));
        let http = format!("{}:0", self.listen.rsplit_once(':').map_or("127.0.0.1", |(ip, _)| ip));
        cmd.args(["--listen", &self.listen, "--http-listen", &http]).args(&self.args).envs(self.env.iter().cloned());
        self.child = Some(spawn_logged(&mut cmd, &log)?);
        let address = wait_for_line(&log, "eddy-coordinator listening on ")?;
        self.http_url = wait_for_line(&log, "eddy-coordinator web page on ")?;
        Ok(address)
    }

    fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }
}

impl Cluster {
    /// Starts a coordinator and `workers` workers with `slots` slots each, and waits until all registered.
    pub fn start(name: &str, workers: usize, slots: u32) -> Result<Cluster> {
        Cluster::start_storing(name, workers, slots, None)
    }

    /// As [`Cluster::start`], with checkpoints in `s3` rather than under the coordinator's data
    /// directory.
    pub fn start_storing(name: &str, workers: usize, slots: u32, s3: Option<&S3Storage>) -> Result<Cluster> {
        let dir = Scratch::new(name);
        // Port 0: the coordinator picks a free port and prints it (no race between tests).
        let data = dir.0.join("coordinator").display().to_string();
        let mut args = vec!["--data-dir".to_string(), data];
        if let Some(s3) = s3 {
            args.extend(["--checkpoint-dir".to_string(), s3.url.clone()]);
        }
        let env = s3.map(|s| s.env.clone()).unwrap_or_default();
        let mut coordinator = CoordinatorProcess::new(0, None, "127.0.0.1:0".into(), args, env.clone());
        let address = coordinator.spawn(&dir.0)?;
        // Started again on the same address.
        coordinator.listen = address.clone();
        Cluster::with_workers(Cluster { address, coordinators: vec![coordinator], workers: Vec::new(), dir, env }, workers, slots)
    }

    /// Starts `coordinators` coordinators replicating with Raft (checkpoints in one directory of
    /// the scratch dir), `workers` workers given all their addresses, and waits until all registered.
    pub fn start_replicated(name: &str, coordinators: u64, workers: usize, slots: u32) -> Result<Cluster> {
        let hosts: Vec<(Option<String>, String)> = (1..=coordinators).map(|_| (None, format!("127.0.0.1:{}", free_port()))).collect();
        Cluster::start_replicated_on(name, &hosts, workers, slots)
    }

    /// As [`Cluster::start_replicated`], coordinator `i` listening on `hosts[i].1` in network
    /// namespace `hosts[i].0` (this process's when `None`).
    pub fn start_replicated_on(name: &str, hosts: &[(Option<String>, String)], workers: usize, slots: u32) -> Result<Cluster> {
        let dir = Scratch::new(name);
        let listen: Vec<String> = hosts.iter().map(|(_, a)| a.clone()).collect();
        let peers = listen.iter().enumerate().map(|(i, a)| format!("{}={a}", i + 1)).collect::<Vec<_>>().join(",");
        let checkpoints = dir.0.join("checkpoints").display().to_string();
        let mut list = Vec::new();
        for (i, address) in listen.iter().enumerate() {
            let id = i as u64 + 1;
            let data = dir.0.join(format!("coordinator{id}")).display().to_string();
            let args = ["--raft-id", &id.to_string(), "--raft-peers", &peers, "--data-dir", &data, "--checkpoint-dir", &checkpoints];
            let netns = hosts[i].0.clone();
            let args = args.map(String::from).to_vec();
            let mut c = CoordinatorProcess::new(id, netns, address.clone(), args, Vec::new());
            c.spawn(&dir.0)?;
            list.push(c);
        }
        let cluster = Cluster { address: listen.join(","), coordinators: list, workers: Vec::new(), dir, env: Vec::new() };
        Cluster::with_workers(cluster, workers, slots)
    }

    fn with_workers(mut cluster: Cluster, workers: usize, slots: u32) -> Result<Cluster> {
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
        let c = &mut self.coordinators[0];
        c.kill()?;
        c.spawn(&self.dir.0)?;
        Ok(())
    }

    /// Kills coordinator `id` (its raft id) with SIGKILL.
    pub fn kill_coordinator(&mut self, id: u64) -> Result<()> {
        self.coordinators.iter_mut().find(|c| c.id == id).context("no such coordinator")?.kill()
    }

    /// Starts coordinator `id` again, on its address and data directory.
    pub fn start_coordinator(&mut self, id: u64) -> Result<()> {
        let c = self.coordinators.iter_mut().find(|c| c.id == id).context("no such coordinator")?;
        c.spawn(&self.dir.0)?;
        Ok(())
    }

    /// Starts a new coordinator `id` that joins the replicated cluster (`--raft-join`) on a free
    /// loopback port; returns its address. `eddy coordinators add` then adds it.
    pub fn join_coordinator(&mut self, id: u64) -> Result<String> {
        let first = self.coordinators.iter().find(|c| c.id > 0).context("not a replicated cluster")?;
        let address = format!("127.0.0.1:{}", free_port());
        let mut args = first.args.clone();
        let value = |args: &mut Vec<String>, flag: &str, v: String| {
            let i = args.iter().position(|a| a == flag).expect("flag given") + 1;
            args[i] = v;
        };
        let peers = args[args.iter().position(|a| a == "--raft-peers").expect("peers") + 1].clone();
        value(&mut args, "--raft-id", id.to_string());
        value(&mut args, "--raft-peers", format!("{peers},{id}={address}"));
        value(&mut args, "--data-dir", self.dir.0.join(format!("coordinator{id}")).display().to_string());
        args.push("--raft-join".into());
        let mut c = CoordinatorProcess::new(id, None, address.clone(), args, Vec::new());
        c.spawn(&self.dir.0)?;
        self.coordinators.push(c);
        Ok(address)
    }

    /// The raft id of the coordinator that leads, as `eddy coordinators` says.
    pub fn leader(&self) -> Result<u64> {
        let v = self.eddy_json(&["coordinators"])?;
        let list = v["coordinators"].as_array().context("coordinators")?;
        list.iter().find(|c| c["role"] == "leader").and_then(|c| c["id"].as_u64()).context("no coordinator leads")
    }

    /// Sends `signal` (`STOP`, `CONT`, …) to the (first) coordinator process.
    pub fn signal_coordinator(&self, signal: &str) -> Result<()> {
        let pid = self.coordinators[0].child.as_ref().context("the coordinator is not running")?.id();
        let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status()?;
        anyhow::ensure!(status.success(), "kill -{signal} of the coordinator failed");
        Ok(())
    }

    /// Starts one more worker (on a port of its choosing, which it registers).
    pub fn add_worker(&mut self, id: &str, slots: u32) -> Result<()> {
        self.add_worker_on(id, slots, None, "127.0.0.1")
    }

    /// Starts one more worker listening on `ip` in network namespace `netns`.
    pub fn add_worker_on(&mut self, id: &str, slots: u32, netns: Option<&str>, ip: &str) -> Result<()> {
        let state = self.dir.0.join(format!("{id}-state"));
        let (listen, metrics) = (format!("{ip}:0"), format!("{ip}:0"));
        let child = spawn_logged(
            in_netns(netns, &bin("eddy-worker"))
                .env("EDDY_TEST_WORKER_PASSWORD", WORKER_PASSWORD)
                .env("EDDY_JOB_ENV", "EDDY_TEST_WORKER_PASSWORD")
                .envs(self.env.iter().cloned())
                .args(["--coordinator", &self.address, "--listen", &listen, "--id", id, "--slots", &slots.to_string()])
                .args(["--metrics-listen", &metrics])
                .arg("--allow-dir")
                .arg(&self.dir.0)
                .arg("--state-dir")
                .arg(&state),
            &self.dir.0.join(format!("{id}.log")),
        )?;
        self.workers.push((id.to_string(), child));
        Ok(())
    }

    /// The (first) coordinator's web page, `http://ip:port/`.
    pub fn web_url(&self) -> &str {
        &self.coordinators[0].http_url
    }

    /// What the (first) coordinator serves on `/metrics` now.
    pub fn coordinator_metrics(&self) -> Result<String> {
        http_get(&format!("{}metrics", self.web_url()))
    }

    /// What worker `id` serves on `/metrics` now (the address it printed when it started).
    pub fn worker_metrics(&self, id: &str) -> Result<String> {
        let log = std::fs::read_to_string(self.dir.0.join(format!("{id}.log")))?;
        let prefix = "eddy-worker metrics on ";
        let url = log.lines().find_map(|l| l.strip_prefix(prefix)).with_context(|| format!("worker {id} printed no metrics address"))?;
        http_get(url.trim())
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
        let mut cmd = in_netns(None, &bin("eddy"));
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
        for c in &mut self.coordinators {
            let _ = c.kill();
        }
        if std::thread::panicking() || std::env::var_os("EDDY_KEEP_LOGS").is_some() {
            // Keep the logs of a failed test where the message points.
            let keep = self.dir.0.with_extension("failed");
            let _ = std::fs::rename(&self.dir.0, &keep);
            eprintln!("logs kept in {}", keep.display());
        }
    }
}

/// A password only the tests' workers hold, in `EDDY_TEST_WORKER_PASSWORD`: the pipeline's
/// specs reach the external API stand-in (which requires it) with `${worker:…}`, so that it is
/// never written into a spec, the coordinator's metadata, a log or a status.
pub const WORKER_PASSWORD: &str = "only-the-workers-know-5d1e7";

/// The secret of the clusters the tests start: every Eddy process they run presents it.
pub const CLUSTER_SECRET: &str = "eddy-tests-cluster-secret-7f3a9c";

/// Eddy's `program`, with the tests' cluster secret, to run in network namespace `netns` (this
/// process's when `None`).
pub fn in_netns(netns: Option<&str>, program: &Path) -> Command {
    let mut cmd = match netns {
        None => Command::new(program),
        Some(ns) => {
            let mut cmd = Command::new("ip");
            cmd.args(["netns", "exec", ns]).arg(program);
            cmd
        }
    };
    cmd.env_remove("EDDY_SECRET_FILE").env("EDDY_SECRET", CLUSTER_SECRET);
    cmd
}

/// A private network of network namespaces on one bridge, for partition tests: each host is a
/// namespace joined to the bridge by a veth pair, and can be cut off (its link taken down) and
/// joined again. Removed on drop.
pub struct Network {
    bridge: String,
    subnet: String,
    hosts: Vec<(String, String)>,
}

fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("running `ip` (iproute2)")?;
    ensure!(
        out.status.success(),
        "ip {}: {}; partition tests need root and iproute2",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

impl Network {
    /// A bridge with this process's own subnet (10.201.N.0/24).
    pub fn create() -> Result<Network> {
        let n = std::process::id() % 200 + 20;
        let net = Network { bridge: format!("eddybr{n}"), subnet: format!("10.201.{n}"), hosts: Vec::new() };
        let _ = Command::new("ip").args(["link", "del", &net.bridge]).output();
        ip(&["link", "add", "name", &net.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &format!("{}.254/24", net.subnet), "dev", &net.bridge])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        // Where a firewall drops forwarded packets (Docker sets FORWARD to DROP, and bridged
        // packets pass through it), let this bridge's own traffic through.
        let _ = Command::new("iptables").args(net.forward_rule("-I")).output();
        Ok(net)
    }

    fn forward_rule(&self, action: &str) -> Vec<String> {
        [action, "FORWARD", "-i", &self.bridge, "-o", &self.bridge, "-j", "ACCEPT"].map(String::from).to_vec()
    }

    /// Adds host `index` (1–200) as namespace `<bridge>-<index>`; returns (namespace, its address).
    pub fn host(&mut self, index: u8) -> Result<(String, String)> {
        let ns = format!("{}-{index}", self.bridge);
        let veth = format!("{}v{index}", self.bridge);
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        ip(&["netns", "add", &ns])?;
        self.hosts.push((ns.clone(), veth.clone()));
        ip(&["link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns])?;
        ip(&["link", "set", &veth, "master", &self.bridge, "up"])?;
        let address = format!("{}.{index}", self.subnet);
        ip(&["-n", &ns, "addr", "add", &format!("{address}/24"), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok((ns, address))
    }

    fn veth(&self, ns: &str) -> Result<&str> {
        self.hosts.iter().find(|(n, _)| n == ns).map(|(_, v)| v.as_str()).context("no such host")
    }

    /// Cuts host `ns` off from every other (and from this process).
    pub fn cut(&self, ns: &str) -> Result<()> {
        ip(&["link", "set", self.veth(ns)?, "down"])
    }

    /// Joins host `ns` again.
    pub fn heal(&self, ns: &str) -> Result<()> {
        ip(&["link", "set", self.veth(ns)?, "up"])
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for (ns, _) in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge]).output();
        let _ = Command::new("iptables").args(self.forward_rule("-D")).output();
    }
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
    let kb: f64 =
        status.lines().find_map(|l| l.strip_prefix("VmRSS:")).and_then(|v| v.split_whitespace().next()).context("VmRSS")?.parse()?;
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

/// The real services (PostgreSQL, the Kafka-protocol broker, Redis, ClickHouse, S3) started by
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
        // Another test may be staging a ClickHouse outage: a refused connection is waited out
        // (curl's exit code 7), for as long as such an outage lasts at most.
        let deadline = Instant::now() + Duration::from_secs(150);
        let out = loop {
            let out =
                Command::new("curl").args(["-sS", "--fail-with-body", self.var("EDDY_CLICKHOUSE_URL")?, "--data-binary", sql]).output()?;
            if out.status.code() != Some(7) || Instant::now() >= deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
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
        let out =
            Command::new("psql").args([&url, "-v", "ON_ERROR_STOP=1", "-q", "-f"]).arg(repo_root().join("sql/postgres.sql")).output()?;
        if !out.status.success() {
            bail!("applying sql/postgres.sql: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(url)
    }

    /// Drops a replication slot left by an earlier run of a test.
    pub fn drop_slot(&self, slot: &str) -> Result<()> {
        let admin = self.var("EDDY_PG_URL")?.to_string();
        self.psql(
            &admin,
            &format!("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '{slot}' AND NOT active"),
        )?;
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

/// GET `url` with curl: the body.
pub fn http_get(url: &str) -> Result<String> {
    let out = Command::new("curl").args(["-sS", "--fail", url]).output()?;
    if !out.status.success() {
        bail!("GET {url}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// GET `url` with curl and parse the JSON body.
pub fn http_get_json(url: &str) -> Result<Value> {
    Ok(serde_json::from_str(&http_get(url)?)?)
}

/// One test's private slice of the services for the engagement pipeline (PostgreSQL → ingest job →
/// Kafka → process job → ClickHouse, the external API stand-in and the Redis leaderboard): its own
/// database, topic, slot, group and keys, and a cluster to run the shipped specs on.
pub struct Pipeline {
    /// The services.
    pub services: Services,
    /// The coordinator and workers.
    pub cluster: Cluster,
    /// Names the database, topic, slot, group and keys (the test's name and process id).
    pub name: String,
    /// The test's PostgreSQL database.
    pub pg_url: String,
    /// `http://host:port` of the external API stand-in.
    pub mock_url: String,
    mock: Option<Background>,
    mock_starts: u32,
}

impl Pipeline {
    /// A pipeline on two workers.
    pub fn start(name: &str) -> Result<Pipeline> {
        Pipeline::start_with(name, 2)
    }

    /// A pipeline on `workers` workers of 4 slots each.
    pub fn start_with(name: &str, workers: usize) -> Result<Pipeline> {
        Pipeline::start_on(name, |name| Cluster::start(name, workers, 4))
    }

    /// A pipeline on `workers` workers of 4 slots each and `coordinators` replicated coordinators.
    pub fn start_replicated(name: &str, coordinators: u64, workers: usize) -> Result<Pipeline> {
        Pipeline::start_on(name, |name| Cluster::start_replicated(name, coordinators, workers, 4))
    }

    fn start_on(name: &str, cluster: impl FnOnce(&str) -> Result<Cluster>) -> Result<Pipeline> {
        let services = Services::start()?;
        let name = format!("{name}_{}", std::process::id());
        services.drop_slot(&name)?;
        let pg_url = services.postgres_database(&name)?;
        services.clickhouse_database(&name)?;
        let cluster = cluster(&name)?;
        let mut p = Pipeline { services, cluster, name, pg_url, mock_url: String::new(), mock: None, mock_starts: 0 };
        p.start_mock()?;
        Ok(p)
    }

    /// Starts the external API stand-in: on a free port the first time, then on the same address
    /// again, with what it received before loaded from its log (`--resume`).
    pub fn start_mock(&mut self) -> Result<()> {
        let listen = self.mock_url.strip_prefix("http://").unwrap_or("127.0.0.1:0").to_string();
        self.mock_starts += 1;
        let log = self.cluster.dir.0.join(format!("mock-api-{}.log", self.mock_starts));
        let received = self.cluster.dir.0.join("external.jsonl");
        let mut cmd = Command::new(bin("eddy-mock-api"));
        cmd.args(["--listen", &listen, "--resume", "--log"]).arg(&received).env("EDDY_MOCK_API_PASSWORD", WORKER_PASSWORD);
        self.mock = Some(spawn_background(&mut cmd, &log)?);
        self.mock_url = format!("http://{}", wait_for_line(&log, "eddy-mock-api listening on ")?);
        let stats = format!("{}/stats", self.mock_url);
        self.cluster.wait(Duration::from_secs(10), "the external API stand-in", |_| Ok(http_get_json(&stats).is_ok()))?;
        Ok(())
    }

    /// Checks that the workers' password reached the external API stand-in (nothing it was sent
    /// was refused for want of it) and shows nowhere else: not in any file of the test (logs,
    /// the coordinator's metadata, checkpoints), `eddy jobs` or `eddy status` of any job.
    pub fn assert_worker_password_hidden(&self) -> Result<()> {
        let stats = http_get_json(&format!("{}/stats", self.mock_url))?;
        ensure!(stats["unauthorized"] == 0 && stats["unique"].as_u64() > Some(0), "the external system's stats: {stats}");
        let mut shown = Vec::new();
        let jobs = self.cluster.eddy_json(&["jobs"])?;
        shown.push(("eddy jobs --json".to_string(), jobs.to_string()));
        for job in jobs.as_array().context("jobs")? {
            let id = job["job_id"].as_str().context("job_id")?;
            shown.push((format!("eddy status {id} --json"), self.cluster.status(id)?.to_string()));
        }
        let mut dirs = vec![self.cluster.dir.0.clone()];
        while let Some(dir) = dirs.pop() {
            // The jobs still run: checkpoints and state files come and go meanwhile.
            let Ok(entries) = std::fs::read_dir(&dir) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                if path.is_dir() {
                    dirs.push(path);
                } else if let Ok(bytes) = std::fs::read(&path) {
                    shown.push((path.display().to_string(), String::from_utf8_lossy(&bytes).into_owned()));
                }
            }
        }
        ensure!(shown.len() > 4, "read only {:?}", shown.iter().map(|(w, _)| w).collect::<Vec<_>>());
        for (place, text) in shown {
            ensure!(!text.contains(WORKER_PASSWORD), "the workers' password shows in {place}");
        }
        Ok(())
    }

    /// Kills the external API stand-in (SIGKILL): its address refuses connections until
    /// [`Pipeline::start_mock`].
    pub fn stop_mock(&mut self) {
        self.mock = None;
    }

    /// The settings the shipped specs read, pointing at this test's slice.
    pub fn env(&self) -> Vec<(String, String)> {
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
            // The password is resolved on the workers, from their environment.
            ("EDDY_EXTERNAL_URL".into(), self.mock_url.replacen("://", "://eddy:${worker:EDDY_TEST_WORKER_PASSWORD}@", 1) + "/events"),
            ("EDDY_DEAD_LETTERS".into(), format!("{dir}/dead-letters.jsonl")),
            ("EDDY_HTTP_DEAD_LETTERS".into(), format!("{dir}/http-dead-letters.jsonl")),
            ("EDDY_CHECKPOINT_INTERVAL".into(), "1s".into()),
        ]);
        env
    }

    /// Submits a shipped spec (`jobs/specs/<spec>`); returns the job id.
    pub fn submit(&self, spec: &str) -> Result<String> {
        self.submit_with(spec, &[])
    }

    /// Submits a shipped spec with `extra` settings added to the test's environment.
    pub fn submit_with(&self, spec: &str, extra: &[(&str, &str)]) -> Result<String> {
        let path = repo_root().join("jobs/specs").join(spec);
        let env = self.env();
        let mut env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        env.extend_from_slice(extra);
        let out = self.cluster.eddy_env(&["submit", path.to_str().context("path")?, "--json"], &env)?;
        if !out.status.success() {
            bail!("submit {spec}: {}", String::from_utf8_lossy(&out.stderr));
        }
        let v: Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["job_id"].as_str().context("job_id")?.to_string())
    }

    /// Submits `spec` with `extra` settings and waits until it runs; returns its id.
    pub fn run_with(&self, spec: &str, extra: &[(&str, &str)]) -> Result<String> {
        let job = self.submit_with(spec, extra)?;
        self.cluster.wait_state(&job, "running", Duration::from_secs(30))?;
        Ok(job)
    }

    /// Submits the ingest job, then the process job (with `process_extra` settings), each once
    /// the one before runs; returns their ids.
    pub fn run_both(&self, process_extra: &[(&str, &str)]) -> Result<(String, String)> {
        let ingest = self.run_with("ingest.toml", &[])?;
        Ok((ingest, self.run_with("process.toml", process_extra)?))
    }

    /// Runs the data generator to completion; returns its `name=value` summary.
    pub fn datagen(&self, args: &[&str]) -> Result<HashMap<String, u64>> {
        datagen_summary(self.datagen_command(args).output()?, args)
    }

    /// The data generator writing into this test's database, with `args`.
    pub fn datagen_command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(bin("eddy-datagen"));
        cmd.args(["--pg-url", &self.pg_url]).args(args);
        cmd
    }

    /// A gauge of the first task of `job` that reports it.
    pub fn gauge(&self, job: &str, name: &str) -> Result<Option<i64>> {
        let s = self.cluster.status(job)?;
        Ok(s["tasks"].as_array().context("tasks")?.iter().find_map(|t| t["gauges"][name].as_i64()))
    }

    /// Surviving events in PostgreSQL, enriched there with the expected derived fields.
    pub fn expected_rows(&self) -> Result<BTreeMap<i64, Value>> {
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
    pub fn clickhouse_rows(&self) -> Result<BTreeMap<i64, Value>> {
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

    /// What the external system received: `[{"key": "id:version", "body": {…}}, …]`.
    pub fn external_events(&self) -> Result<Vec<Value>> {
        Ok(http_get_json(&format!("{}/events", self.mock_url))?.as_array().cloned().unwrap_or_default())
    }

    /// The external system's counters (`unique`, `duplicates`, `conflicts`, …).
    pub fn external_stats(&self) -> Result<Value> {
        http_get_json(&format!("{}/stats", self.mock_url))
    }

    /// The leaderboard and its fence, read together: (window end, member → score).
    pub fn leaderboard(&self) -> Result<(Option<i64>, BTreeMap<String, f64>)> {
        let script = "return {redis.call('GET', KEYS[2]), redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')}";
        let reply = self.services.redis(&["EVAL", script, "2", &self.name, &format!("{}:window_end", self.name)])?;
        let window_end = reply[0].as_str().and_then(|s| s.parse::<i64>().ok());
        let mut board = BTreeMap::new();
        for pair in reply[1].as_array().map(Vec::as_slice).unwrap_or_default().chunks(2) {
            board.insert(pair[0].as_str().context("member")?.to_string(), num(&pair[1]).context("score")?);
        }
        Ok((window_end, board))
    }

    /// The leaderboard SQL computes from PostgreSQL for the 10-minute window ending at `window_end`.
    pub fn leaderboard_reference(&self, window_end: i64) -> Result<BTreeMap<String, f64>> {
        let sql = format!(
            "SELECT json_object_agg(content_id, total) FROM (
               SELECT content_id::text, SUM(duration_ms / 1000.0)::float8 AS total FROM engagement_events
               WHERE event_ts >= to_timestamp({start} / 1000.0) AND event_ts < to_timestamp({window_end} / 1000.0)
                 AND duration_ms IS NOT NULL
               GROUP BY 1) t",
            start = window_end - 600_000
        );
        Ok(serde_json::from_value(self.services.psql_json(&self.pg_url, &sql)?).unwrap_or_default())
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        // The cluster (and its replication connection) must be gone before the slot can go. The
        // slot goes even when the evidence stays: left behind, it would hold WAL on the shared
        // PostgreSQL for good.
        for (_, w) in &mut self.cluster.workers {
            let _ = w.kill();
            let _ = w.wait();
        }
        let admin = self.services.var("EDDY_PG_URL").map(str::to_string);
        for _ in 0..50 {
            if self.services.drop_slot(&self.name).is_ok()
                && self
                    .services
                    .psql(
                        admin.as_deref().unwrap_or_default(),
                        &format!("SELECT 1 FROM pg_replication_slots WHERE slot_name = '{}'", self.name),
                    )
                    .is_ok_and(|o| o.trim().is_empty())
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if std::thread::panicking() || std::env::var_os("EDDY_KEEP_LOGS").is_some() {
            return; // keep the evidence: the databases and the leaderboard
        }
        if let Ok(admin) = &admin {
            let _ = self.services.psql(admin, &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name));
        }
        let _ = self.services.clickhouse(&format!("DROP DATABASE IF EXISTS {}", self.name));
        let _ = self.services.redis(&["DEL", &self.name, &format!("{}:window_end", self.name)]);
    }
}

/// The `name=value` summary `eddy-datagen` printed.
pub fn datagen_summary(out: Output, args: &[&str]) -> Result<HashMap<String, u64>> {
    if !out.status.success() {
        bail!("eddy-datagen {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(text.split_whitespace().filter_map(|kv| kv.split_once('=')).filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?))).collect())
}

/// A JSON number, or a string holding one (ClickHouse quotes 64-bit integers).
pub fn num(v: &Value) -> Option<f64> {
    v.as_f64().or_else(|| v.as_str().and_then(|s| s.parse().ok()))
}

/// Two JSON numbers (or both NULL) equal to 1e-6.
pub fn same_number(a: &Value, b: &Value) -> bool {
    match (num(a), num(b)) {
        (Some(x), Some(y)) => (x - y).abs() < 1e-6,
        (None, None) => a.is_null() == b.is_null(),
        _ => false,
    }
}

/// The outcomes a user checks, against PostgreSQL: ClickHouse holds exactly the surviving events,
/// enriched; the external system received each of `versions` event versions once; the leaderboard
/// is the exact sum of the latest closed 10-minute window.
pub fn check_outcomes(p: &Pipeline, versions: u64) -> Result<()> {
    check_outcomes_within(p, versions..=versions)
}

/// As [`check_outcomes`], for a run where how many versions reached the external system depends
/// on timing (events deleted around a crash may or may not have been sent before it).
pub fn check_outcomes_within(p: &Pipeline, versions: std::ops::RangeInclusive<u64>) -> Result<()> {
    let found = outcome_mismatches(p, Some(versions), Duration::from_secs(120))?;
    let n = found.mismatches.len();
    ensure!(n == 0, "{n} mismatches:\n{}", found.mismatches.iter().take(20).cloned().collect::<Vec<_>>().join("\n"));
    Ok(())
}

/// What [`outcome_mismatches`] compared, and every difference it found.
pub struct Outcomes {
    /// One line per difference, saying what and where.
    pub mismatches: Vec<String>,
    /// The surviving events in PostgreSQL with their expected derived fields.
    pub expected: BTreeMap<i64, Value>,
    /// ClickHouse's live rows at the end of the check.
    pub clickhouse: BTreeMap<i64, Value>,
    /// The end of the leaderboard window compared with SQL, if one closed.
    pub window_end: Option<i64>,
}

/// ClickHouse's row for `id` against PostgreSQL's: one line per difference.
fn row_differences(expected: &BTreeMap<i64, Value>, got: &BTreeMap<i64, Value>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, want) in expected {
        let Some(row) = got.get(id) else {
            out.push(format!("clickhouse: event {id} is missing (PostgreSQL has {want})"));
            continue;
        };
        for col in ["content_id", "user_id", "event_type", "device", "content_type", "slug", "title"] {
            if row[col].as_str() != want[col].as_str() {
                out.push(format!("clickhouse: event {id} column {col}: {} vs PostgreSQL {}", row[col], want[col]));
            }
        }
        for col in ["event_ts_s", "duration_ms", "engagement_seconds", "length_seconds", "engagement_pct"] {
            if !same_number(&row[col], &want[col]) {
                out.push(format!("clickhouse: event {id} column {col}: {} vs PostgreSQL {}", row[col], want[col]));
            }
        }
    }
    for (id, row) in got.iter().filter(|(id, _)| !expected.contains_key(id)) {
        out.push(format!("clickhouse: event {id} is live but gone from PostgreSQL: {row}"));
    }
    out
}

/// The idempotency key ClickHouse's row implies: `id:version`.
pub fn external_key(id: i64, row: &Value) -> String {
    format!("{id}:{}", row["version"].as_str().map(str::to_string).unwrap_or_else(|| row["version"].to_string()))
}

/// An idempotency key the external system received, as (event id, version, whether a delete):
/// `id:version`, or `id:version:deleted` for a delete.
pub fn external_key_parts(key: &str) -> Option<(i64, u64, bool)> {
    let (key, deleted) = match key.strip_suffix(":deleted") {
        Some(k) => (k, true),
        None => (key, false),
    };
    let (id, version) = key.split_once(':')?;
    Some((id.parse().ok()?, version.parse().ok()?, deleted))
}

/// Compares the outcomes with PostgreSQL as [`check_outcomes`] does, waiting up to `settle` for
/// ClickHouse and the external system to converge, and returns every difference instead of
/// stopping at the first. `versions`, when given, bounds how many distinct event versions the
/// external system received.
pub fn outcome_mismatches(p: &Pipeline, versions: Option<std::ops::RangeInclusive<u64>>, settle: Duration) -> Result<Outcomes> {
    let mut mismatches = Vec::new();
    // ClickHouse converges to exactly the surviving events, enriched.
    let expected = p.expected_rows()?;
    let _ = p
        .cluster
        .wait(settle, "ClickHouse to hold every surviving event", |_| Ok(row_differences(&expected, &p.clickhouse_rows()?).is_empty()));
    let got = p.clickhouse_rows()?;
    mismatches.extend(row_differences(&expected, &got));

    // The external system got the version of every event that ClickHouse holds (its keys are
    // id:version), with the same derived fields.
    let received_all = |events: &[Value]| -> HashMap<String, Value> {
        events.iter().filter_map(|e| Some((e["key"].as_str()?.to_string(), e["body"].clone()))).collect()
    };
    let _ = p.cluster.wait(settle.min(Duration::from_secs(60)), "the external system to receive every version", |_| {
        let by_key = received_all(&p.external_events()?);
        let enough = versions.as_ref().is_none_or(|v| by_key.len() as u64 >= *v.start());
        Ok(enough && got.iter().all(|(id, row)| by_key.contains_key(&external_key(*id, row))))
    });
    let by_key = received_all(&p.external_events()?);
    if let Some(versions) = &versions {
        let stats = p.external_stats()?;
        let unique = stats["unique"].as_u64().context("unique")?;
        if !versions.contains(&unique) {
            mismatches.push(format!("external: {unique} versions received, expected {versions:?}: {stats}"));
        }
    }
    for (id, row) in &got {
        let key = external_key(*id, row);
        match by_key.get(&key) {
            None => mismatches.push(format!("external: never got {key}, the version ClickHouse holds")),
            Some(body) => match expected.get(id) {
                Some(want) if !same_number(&body["engagement_pct"], &want["engagement_pct"]) => mismatches
                    .push(format!("external: {key}: engagement_pct {} vs PostgreSQL {}", body["engagement_pct"], want["engagement_pct"])),
                _ => {}
            },
        }
    }

    // The leaderboard is the exact 10-minute sum of the latest closed window, as SQL computes it.
    // Wait for a window that closed after everything above was processed, and after the latest
    // event: a window read while Redis came back from another test's outage (an older window
    // from its snapshot) may predate every event.
    let first = p.leaderboard().map(|(end, _)| end).unwrap_or_default().unwrap_or(i64::MIN);
    let latest_event: i64 = p
        .services
        .psql(&p.pg_url, "SELECT coalesce(floor(extract(epoch FROM max(event_ts)) * 1000)::bigint, 0) FROM engagement_events")?
        .trim()
        .parse()?;
    let patience = settle.min(Duration::from_secs(60));
    let newer =
        p.cluster.wait(patience, "a newer leaderboard window", |_| Ok(p.leaderboard()?.0.is_some_and(|w| w > first.max(latest_event))));
    let mut window_end = None;
    if newer.is_err() {
        mismatches.push(format!("leaderboard: no window closed within {patience:?} after the other checks (the last was {first})"));
    } else {
        let (end, board) = p.leaderboard()?;
        let end = end.context("window end")?;
        window_end = Some(end);
        let want = p.leaderboard_reference(end)?;
        if want.is_empty() {
            mismatches.push(format!("leaderboard: the window ending {end} should hold events"));
        }
        if board.keys().ne(want.keys()) {
            let missing: Vec<_> = want.keys().filter(|k| !board.contains_key(*k)).collect();
            let extra: Vec<_> = board.keys().filter(|k| !want.contains_key(*k)).collect();
            mismatches.push(format!("leaderboard: members of window {end} differ from SQL: missing {missing:?}, extra {extra:?}"));
        }
        for (member, total) in &want {
            if let Some(score) = board.get(member).filter(|s| (*s - total).abs() >= 1e-6) {
                mismatches.push(format!("leaderboard: window {end}, {member}: leaderboard {score} vs SQL {total}"));
            }
        }
    }
    Ok(Outcomes { mismatches, expected, clickhouse: got, window_end })
}
