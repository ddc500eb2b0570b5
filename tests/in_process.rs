//! The cluster in one process: a coordinator and two workers run by their libraries'
//! `run(listener, shutdown)` on loopback listeners, driven through the job API. It exercises the
//! control sessions (registration, deployment, checkpoints, a worker leaving, shutdown) without
//! binaries, ports chosen by hand or services, so it starts in milliseconds and fails at the line
//! that broke.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use eddy_coordinator::CoordinatorConfig;
use eddy_proto::cluster_service_client::ClusterServiceClient;
use eddy_proto::data_service_client::DataServiceClient;
use eddy_proto::job_service_client::JobServiceClient;
use eddy_proto::{
    worker_message, ChannelHeader, CoordinatorMessage, ExchangeFrame, JobStatusRequest, JobStatusResponse, ListJobsRequest,
    ListWorkersRequest, Register, SubmitRequest, WorkerMessage,
};
use eddy_tests::read_jsonl;
use eddy_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const EVENTS: u64 = 30_000;

/// Generator → keyed SUM per 1 s tumbling window (two subtasks) → file, plus the raw events to a
/// file: every event and every window result exactly once, whatever restarts in between.
fn spec(out: &Path) -> String {
    let out = out.display();
    format!(
        r#"
name = "in-process"

[[source]]
name = "events"
connector = "generator"
options = {{ count = {EVENTS}, keys = 50, seed = 5, events_per_ms = 1, rate = 3000 }}
event_time = {{ column = "ts", allowed_delay = "0s" }}

[[window]]
name = "per_second"
input = "events"
kind = "tumble"
size = "1s"
key = ["k"]
aggregates = "COUNT(*) AS n"
parallelism = 2

[[sink]]
name = "windows"
input = "per_second"
connector = "file"
parallelism = 1
options = {{ path = "{out}/windows.jsonl" }}

[[sink]]
name = "raw"
input = "events"
connector = "file"
options = {{ path = "{out}/events.jsonl" }}

[state]
checkpoint_interval = "200ms"
"#
    )
}

/// The cluster's secret in these tests: every call between the parts carries it.
const SECRET: &str = "in-process-test-secret-0123456789";

fn access(secret: Option<&str>) -> eddy_proto::Access {
    eddy_proto::Access { secret: secret.map(|s| eddy_proto::Secret::new(s).unwrap()), ..Default::default() }
}

struct InProcess {
    api: JobServiceClient<eddy_proto::Authed>,
    coordinator_address: String,
    data_addresses: Vec<String>,
    shutdown: CancellationToken,
    coordinator: JoinHandle<Result<()>>,
    workers: Vec<(CancellationToken, JoinHandle<Result<()>>)>,
}

async fn listener() -> Result<(TcpListener, String)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?.to_string();
    Ok((listener, address))
}

impl InProcess {
    async fn start(dir: &Path, workers: usize, slots: u32) -> Result<InProcess> {
        InProcess::start_with(dir, workers, slots, access(Some(SECRET))).await
    }

    /// Every part (and the test's client) with `access`: the secret, and TLS if it has it.
    async fn start_with(dir: &Path, workers: usize, slots: u32, access: eddy_proto::Access) -> Result<InProcess> {
        let shutdown = CancellationToken::new();
        let (coordinator_listener, coordinator_address) = listener().await?;
        let config = CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(100),
            data_dir: Some(dir.join("coordinator")),
            restart_backoff: Duration::from_millis(50),
            access: access.clone(),
            ..CoordinatorConfig::default()
        };
        let coordinator = tokio::spawn(eddy_coordinator::run(config, coordinator_listener, None, shutdown.clone()));
        let (mut started, mut data_addresses) = (Vec::new(), Vec::new());
        for i in 1..=workers {
            let (data, data_address) = listener().await?;
            data_addresses.push(data_address.clone());
            let config = WorkerConfig {
                worker_id: format!("w{i}"),
                coordinator: coordinator_address.clone(),
                slots,
                advertised_address: data_address,
                state_dir: dir.join(format!("w{i}")),
                access: access.clone(),
                allowed_dirs: vec![dir.to_path_buf()],
                allowed_hosts: Vec::new(),
                job_env: Vec::new(),
            };
            let stop = shutdown.child_token();
            started.push((stop.clone(), tokio::spawn(eddy_worker::run(config, data, None, stop))));
        }
        let channel = eddy_proto::connect(&coordinator_address, Duration::from_secs(5), &access).await.map_err(anyhow::Error::msg)?;
        let mut api = JobServiceClient::new(channel);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let listed = api.list_workers(ListWorkersRequest {}).await?.into_inner().workers;
            if listed.iter().filter(|w| w.state == "alive").count() == workers {
                break;
            }
            if Instant::now() > deadline {
                bail!("the workers did not register: {listed:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(InProcess { api, coordinator_address, data_addresses, shutdown, coordinator, workers: started })
    }

    async fn status(&mut self, job: &str) -> Result<JobStatusResponse> {
        Ok(self.api.job_status(JobStatusRequest { job_id: job.into() }).await?.into_inner())
    }

    /// Waits until `check` holds for the job's status.
    async fn wait(&mut self, job: &str, what: &str, check: impl Fn(&JobStatusResponse) -> bool) -> Result<JobStatusResponse> {
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let status = self.status(job).await?;
            if check(&status) {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {status:?}");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stops everything and checks that each part returns cleanly, and soon.
    async fn stop(self) -> Result<()> {
        self.shutdown.cancel();
        let ends = async {
            for (_, worker) in self.workers {
                worker.await??;
            }
            self.coordinator.await?
        };
        tokio::time::timeout(Duration::from_secs(15), ends).await.context("shutdown took longer than 15 s")?
    }
}

fn state(status: &JobStatusResponse) -> &str {
    status.job.as_ref().map_or("", |j| j.state.as_str())
}

fn completed_checkpoints(status: &JobStatusResponse) -> usize {
    status.checkpoints.iter().filter(|c| c.kind == "checkpoint" && c.state == "completed").count()
}

/// Every event once, and every (key, window) result once with the count the events give it.
fn assert_exactly_once(out: &Path) -> Result<()> {
    let events = read_jsonl(&[out.join("events.jsonl")])?;
    let seqs: HashSet<i64> = events.iter().filter_map(|e| e["seq"].as_i64()).collect();
    assert_eq!(events.len() as u64, EVENTS, "events written");
    assert_eq!(seqs.len() as u64, EVENTS, "distinct events written");
    let mut expected = std::collections::HashMap::new();
    for e in &events {
        let key = (e["k"].as_i64().context("k")?, e["ts"].as_i64().context("ts")?.div_euclid(1000));
        *expected.entry(key).or_insert(0) += 1;
    }
    let mut seen = std::collections::HashMap::new();
    for w in read_jsonl(&[out.join("windows.jsonl")])? {
        let key = (w["k"].as_i64().context("k")?, w["window_start"].as_i64().context("window_start")?.div_euclid(1000));
        assert!(seen.insert(key, w["n"].as_i64().context("n")?).is_none(), "window {key:?} written twice");
    }
    assert_eq!(seen, expected, "window counts");
    Ok(())
}

async fn submit(cluster: &mut InProcess, out: &Path) -> Result<String> {
    std::fs::create_dir_all(out)?;
    let request = SubmitRequest { spec: spec(out), from_savepoint: String::new() };
    Ok(cluster.api.submit(request).await?.into_inner().job_id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_to_its_end_and_the_cluster_shuts_down_cleanly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = InProcess::start(dir.path(), 2, 4).await?;
    let out = dir.path().join("out");
    let job = submit(&mut cluster, &out).await?;
    let status = cluster.wait(&job, "the job to finish", |s| state(s) == "finished").await?;
    assert!(completed_checkpoints(&status) > 0, "checkpoints every 200 ms over 10 s: {:?}", status.checkpoints);
    let history: Vec<&str> = status.history.iter().map(|t| t.to.as_str()).collect();
    assert_eq!(history, ["created", "scheduling", "running", "finished"]);
    assert_exactly_once(&out)?;
    cluster.stop().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_mid_job_hands_its_tasks_over_from_the_last_checkpoint() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut cluster = InProcess::start(dir.path(), 2, 4).await?;
    let out = dir.path().join("out");
    let job = submit(&mut cluster, &out).await?;
    // Some events out and a checkpoint taken, then the worker with the window's second subtask
    // shuts down: its session ends, and the job restarts on the one left, from that checkpoint.
    let running = cluster.wait(&job, "a checkpoint", |s| state(s) == "running" && completed_checkpoints(s) > 0).await?;
    let victim = running
        .tasks
        .iter()
        .find(|t| t.operators.starts_with("per_second") && t.subtask == 1)
        .map(|t| t.worker_id.clone())
        .context("the window's second subtask")?;
    let index: usize = victim.trim_start_matches('w').parse()?;
    let (stop, worker) = cluster.workers.remove(index - 1);
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(15), worker).await.context("the worker did not stop")???;
    let status = cluster.wait(&job, "the job to finish", |s| state(s) == "finished").await?;
    assert!(status.job.as_ref().is_some_and(|j| j.attempt > 1), "the job should have restarted: {status:?}");
    assert!(status.tasks.iter().all(|t| t.worker_id != victim), "a task stayed on {victim}: {:?}", status.tasks);
    assert_exactly_once(&out)?;
    cluster.stop().await
}

/// A control stream registering worker `id` with the coordinator at `address`, presenting
/// `secret`: the coordinator's first answer, or its refusal.
async fn register(address: &str, secret: Option<&str>, id: &str) -> std::result::Result<CoordinatorMessage, tonic::Status> {
    let channel = eddy_proto::connect(address, Duration::from_secs(5), &access(secret)).await.map_err(tonic::Status::unavailable)?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let register = Register { worker_id: id.into(), slots: 1000, data_address: "127.0.0.1:9".into() };
    tx.send(WorkerMessage { msg: Some(worker_message::Msg::Register(register)) }).await.unwrap();
    let mut orders = ClusterServiceClient::new(channel).control(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let first = orders.message().await?.ok_or_else(|| tonic::Status::aborted("no answer"))?;
    drop(tx);
    Ok(first)
}

/// Without the cluster's secret (or with a wrong one) nothing gets in: no submit, no listing, no
/// worker registration, no data stream into a worker; and a caller with the secret cannot take
/// over a live worker's id. The refusals say what to do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_secret_nothing_is_let_in_and_a_live_worker_id_cannot_be_taken() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cluster = InProcess::start(dir.path(), 1, 2).await?;
    let out = dir.path().join("out");
    for secret in [None, Some("a-wrong-secret-of-enough-length")] {
        let channel =
            eddy_proto::connect(&cluster.coordinator_address, Duration::from_secs(5), &access(secret)).await.map_err(anyhow::Error::msg)?;
        let mut api = JobServiceClient::new(channel);
        let refused = api.submit(SubmitRequest { spec: spec(&out), from_savepoint: String::new() }).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        let expected = if secret.is_none() { "requires its secret" } else { "wrong cluster secret" };
        assert!(refused.message().contains(expected) && refused.message().contains("EDDY_SECRET_FILE"), "{}", refused.message());
        assert_eq!(api.list_jobs(ListJobsRequest {}).await.unwrap_err().code(), tonic::Code::Unauthenticated);

        let refused = register(&cluster.coordinator_address, secret, "rogue").await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");

        let channel =
            eddy_proto::connect(&cluster.data_addresses[0], Duration::from_secs(5), &access(secret)).await.map_err(anyhow::Error::msg)?;
        let header = ChannelHeader { job_id: "any".into(), attempt: 1, task_id: "1.0".into(), input: 0, inputs: 1 };
        let frames = tokio_stream::iter([ExchangeFrame { header: Some(header), payload: Vec::new() }]);
        let refused = DataServiceClient::new(channel).exchange(frames).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
    }
    assert!(cluster.api.clone().list_jobs(ListJobsRequest {}).await?.into_inner().jobs.is_empty(), "nothing was submitted");

    // With the secret, a registration under the live worker's id is refused, not a takeover.
    let refused = register(&cluster.coordinator_address, Some(SECRET), "w1").await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::AlreadyExists, "{refused:?}");
    assert!(refused.message().contains("w1"), "{}", refused.message());
    let workers = cluster.api.clone().list_workers(ListWorkersRequest {}).await?.into_inner().workers;
    assert_eq!(workers.iter().map(|w| (w.worker_id.as_str(), w.state.as_str(), w.slots)).collect::<Vec<_>>(), [("w1", "alive", 2)]);
    cluster.stop().await
}

/// A CA and a certificate it signed for 127.0.0.1, made with `openssl` in `dir`: (certificate,
/// key, CA certificate).
fn certificates(dir: &Path, name: &str) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let run = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().context("running openssl")?;
        anyhow::ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    let [ca, ca_key, key, csr, cert, ext] = [".ca.pem", ".ca.key", ".key", ".csr", ".pem", ".ext"].map(|suffix| format!("{name}{suffix}"));
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    run(&[&["req", "-x509"][..], &ec, &["-keyout", &ca_key, "-out", &ca, "-days", "2", "-subj", &format!("/CN={name}-ca")]].concat())?;
    run(&[&["req"][..], &ec, &["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]].concat())?;
    std::fs::write(dir.join(&ext), "subjectAltName=IP:127.0.0.1,DNS:localhost\n")?;
    run(&["x509", "-req", "-in", &csr, "-CA", &ca, "-CAkey", &ca_key, "-CAcreateserial", "-out", &cert, "-days", "2", "-extfile", &ext])?;
    Ok((dir.join(cert), dir.join(key), dir.join(ca)))
}

/// With TLS from certificate files on every listener, a job spread over two workers (its
/// exchange crossing between them) runs to its end exactly once; a client that does not trust
/// the cluster's CA, or speaks plain HTTP/2 to it, gets nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_a_job_runs_and_clients_without_the_ca_get_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (cert, key, ca) = certificates(dir.path(), "cluster")?;
    let tls = eddy_proto::Tls::load(Some(&cert), Some(&key), Some(&ca)).map_err(anyhow::Error::msg)?;
    let mut cluster = InProcess::start_with(dir.path(), 2, 4, eddy_proto::Access { tls, ..access(Some(SECRET)) }).await?;
    let out = dir.path().join("out");
    let job = submit(&mut cluster, &out).await?;
    let status = cluster.wait(&job, "the job to finish", |s| state(s) == "finished").await?;
    let workers: HashSet<&str> = status.tasks.iter().map(|t| t.worker_id.as_str()).collect();
    assert_eq!(workers.len(), 2, "spread over both workers: {:?}", status.tasks);
    assert_exactly_once(&out)?;

    // A client trusting another CA: refused in the handshake, which it names.
    let (_, _, other_ca) = certificates(dir.path(), "other")?;
    let other = eddy_proto::Tls::load(None, None, Some(&other_ca)).map_err(anyhow::Error::msg)?;
    let refused = eddy_proto::connect(
        &cluster.coordinator_address,
        Duration::from_secs(5),
        &eddy_proto::Access { tls: other, ..access(Some(SECRET)) },
    )
    .await
    .map(|_| ())
    .unwrap_err();
    assert!(refused.contains("TLS"), "{refused}");
    // Plain HTTP/2 to a TLS listener: no answer.
    let plain = eddy_proto::connect(&cluster.coordinator_address, Duration::from_secs(5), &access(Some(SECRET))).await;
    if let Ok(channel) = plain {
        assert!(JobServiceClient::new(channel).list_jobs(ListJobsRequest {}).await.is_err(), "a plain call was answered");
    }
    cluster.stop().await
}
