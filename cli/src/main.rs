//! `eddy`: the command line for an Eddy cluster.
//!
//! Exit codes: 0 success; 1 other error; 2 bad usage; 3 coordinator unreachable; 4 invalid job spec
//! or argument; 5 no such job; 6 not enough free slots; 7 the request does not apply in the job's
//! current state; 8 the cluster refused this command's secret (or its lack of one).

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use eddy_proto::job_service_client::JobServiceClient;
use eddy_proto::*;
use serde_json::json;
use tonic::Code;

#[derive(Parser)]
#[command(name = "eddy", version, about = "Submit and manage jobs on an Eddy cluster")]
struct Cli {
    /// Coordinator address (host:port); for replicated coordinators any of them, or several,
    /// comma-separated: the CLI finds the leader.
    #[arg(long, global = true, env = "EDDY_COORDINATOR", default_value = "127.0.0.1:6123")]
    coordinator: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// A file holding the cluster's secret, for a cluster started with one (or set EDDY_SECRET to
    /// the secret itself).
    #[arg(long, global = true, env = "EDDY_SECRET_FILE")]
    secret_file: Option<std::path::PathBuf>,
    /// The CA certificate (PEM) that signed the coordinators' certificates, for a cluster
    /// serving TLS.
    #[arg(long, global = true, env = "EDDY_TLS_CA")]
    tls_ca: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a job spec; prints the job id. `${VAR}` and `${VAR:-default}` are taken from the environment.
    Submit {
        /// The spec file (TOML).
        file: std::path::PathBuf,
        /// Start from this savepoint's state (an id printed by `eddy savepoint`).
        #[arg(long)]
        from_savepoint: Option<String>,
    },
    /// List jobs.
    Jobs,
    /// Show a job's state, history and tasks.
    Status {
        /// Job id.
        job: String,
    },
    /// Cancel a job.
    Cancel {
        /// Job id.
        job: String,
        /// Take a savepoint first; prints its id. Sources keep their replication slots, so that
        /// `submit --from-savepoint` resumes from them.
        #[arg(long)]
        savepoint: bool,
        /// Keep the job's PostgreSQL replication slot and the publication it created (dropped by
        /// default: a kept slot holds WAL on the server until a job reads from it again).
        #[arg(long)]
        keep_slot: bool,
    },
    /// Take a savepoint of a running job; prints its id, for `submit --from-savepoint`.
    Savepoint {
        /// Job id.
        job: String,
    },
    /// Change a running job's parallelism: savepoint, then redeploy from it with key groups
    /// redistributed. Stages with a parallelism of their own in the spec keep it.
    Rescale {
        /// Job id.
        job: String,
        /// New parallelism.
        parallelism: u32,
    },
    /// Read the rows of a PostgreSQL table that a condition selects again, into a running job's
    /// stream (after changes were lost on their way, e.g. a slot lost): they go out as the table
    /// has them now, ordered after every change before and before every change after, and a
    /// crash half way loses none. Waits until they are handed on, printing how many.
    Backfill {
        /// Job id.
        job: String,
        /// An SQL condition on the table's columns, e.g. "id BETWEEN 100 AND 200".
        #[arg(long = "where")]
        filter: String,
        /// The `postgres_cdc` source, when the job has several.
        #[arg(long)]
        source: Option<String>,
        /// Return once a checkpoint holds the request, without waiting for the rows.
        #[arg(long)]
        no_wait: bool,
        /// Stop waiting after this many seconds (the backfill goes on).
        #[arg(long)]
        timeout: Option<u64>,
    },
    /// List workers and their slots.
    Workers,
    /// List the coordinators (id, address, role, term, applied index), or change them.
    Coordinators {
        #[command(subcommand)]
        change: Option<CoordinatorChange>,
    },
}

#[derive(Subcommand)]
enum CoordinatorChange {
    /// Add a coordinator to a replicated cluster. Start it first with `--raft-join`, its
    /// `--raft-id` and `--raft-peers` (the cluster's coordinators and itself); once added it
    /// catches up from the leader.
    Add {
        /// Its raft id (unused so far).
        id: u64,
        /// The address it serves on (host:port).
        address: String,
    },
    /// Remove a coordinator from a replicated cluster.
    Remove {
        /// Its raft id.
        id: u64,
    },
}

struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn new(code: u8, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }
}

fn from_status(s: tonic::Status, coordinator: &str) -> Failure {
    let code = match s.code() {
        Code::Unavailable => 3,
        Code::InvalidArgument => 4,
        Code::NotFound => 5,
        Code::ResourceExhausted => 6,
        Code::FailedPrecondition => 7,
        Code::Unauthenticated => 8,
        _ => 1,
    };
    let message = if s.code() == Code::Unavailable && s.message().contains("transport") {
        format!("cannot reach the coordinator at {coordinator}; start it, or point --coordinator / EDDY_COORDINATOR at it")
    } else {
        s.message().to_string()
    };
    Failure::new(code, message)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// A client of the leading coordinator among those listed in `coordinator`.
async fn connect(coordinator: &str, access: &Access) -> Result<JobServiceClient<Authed>, Failure> {
    let addresses = eddy_proto::address_list(coordinator);
    match eddy_proto::connect_leader(&addresses, std::time::Duration::from_secs(3), access).await {
        Ok((_, channel)) => Ok(JobServiceClient::new(channel)),
        Err(answers) if answers.split("; ").all(|a| a.ends_with(": unreachable")) => Err(Failure::new(
            3,
            format!("cannot reach the coordinator at {coordinator}; start it, or point --coordinator / EDDY_COORDINATOR at it"),
        )),
        Err(answers) if answers.contains("(TLS: ") => Err(Failure::new(
            3,
            format!("cannot connect to the coordinator over TLS ({answers}); give the CA that signed its certificate (--tls-ca)"),
        )),
        Err(answers) if answers.contains("cluster secret") || answers.contains("requires its secret") => {
            Err(Failure::new(8, format!("the coordinator refused this command: {answers}")))
        }
        Err(answers) => {
            let tls = if access.tls.verifies() { "" } else { " (if the cluster serves TLS, give its CA with --tls-ca)" };
            Err(Failure::new(
                3,
                format!("no coordinator leads ({answers}); a replicated cluster needs most of its coordinators running{tls}"),
            ))
        }
    }
}

async fn run(cli: &Cli) -> Result<(), Failure> {
    let coordinator = cli.coordinator.as_str();
    let rpc = |s| from_status(s, coordinator);
    let access = Access::load(cli.secret_file.as_deref(), None, None, cli.tls_ca.as_deref()).map_err(|e| Failure::new(2, e))?;
    match &cli.command {
        Command::Submit { file, from_savepoint } => {
            let text = std::fs::read_to_string(file).map_err(|e| Failure::new(4, format!("cannot read {}: {e}", file.display())))?;
            let spec = eddy_jobs::substitute_env(&text, |k| std::env::var(k).ok())
                .map_err(|e| Failure::new(4, format!("invalid job spec {}: {e}", file.display())))?;
            // Validate locally first: a bad spec fails fast, even with no coordinator running.
            eddy_jobs::compile(&spec).map_err(|e| Failure::new(4, format!("invalid job spec {}: {e}", file.display())))?;
            let mut client = connect(coordinator, &access).await?;
            let request = SubmitRequest { spec, from_savepoint: from_savepoint.clone().unwrap_or_default() };
            let job_id = client.submit(request).await.map_err(rpc)?.into_inner().job_id;
            if cli.json {
                println!("{}", json!({ "job_id": job_id }));
            } else {
                println!("{job_id}");
            }
        }
        Command::Jobs => {
            let jobs = connect(coordinator, &access).await?.list_jobs(ListJobsRequest {}).await.map_err(rpc)?.into_inner().jobs;
            if cli.json {
                println!("{}", json!(jobs.iter().map(job_json).collect::<Vec<_>>()));
            } else {
                let rows = jobs
                    .iter()
                    .map(|j| {
                        vec![j.job_id.clone(), j.name.clone(), j.state.clone(), j.attempt.to_string(), j.tasks.to_string(), j.cause.clone()]
                    })
                    .collect();
                table(&["JOB", "NAME", "STATE", "ATTEMPT", "TASKS", "CAUSE"], rows);
            }
        }
        Command::Status { job } => {
            let s =
                connect(coordinator, &access).await?.job_status(JobStatusRequest { job_id: job.clone() }).await.map_err(rpc)?.into_inner();
            let j = s.job.clone().unwrap_or_default();
            if cli.json {
                let tasks: Vec<_> = s
                    .tasks
                    .iter()
                    .map(|t| {
                        let m = t.metrics.clone().unwrap_or_default();
                        json!({
                            "task_id": t.task_id, "operators": t.operators, "subtask": t.subtask,
                            "parallelism": t.parallelism, "worker_id": t.worker_id, "state": t.state,
                            "records_in": m.records_in, "records_out": m.records_out,
                            "late_records": m.late_records, "watermark_ms": m.watermark_ms, "error": t.error,
                            "dead_lettered": m.dead_lettered, "gauges": m.gauges, "retrying": m.retrying,
                            "notes": m.notes,
                        })
                    })
                    .collect();
                let history: Vec<_> =
                    s.history.iter().map(|h| json!({"at_ms": h.at_ms, "from": h.from, "to": h.to, "cause": h.cause})).collect();
                let mut out = job_json(&j);
                out["tasks"] = json!(tasks);
                out["history"] = json!(history);
                out["running_since_ms"] = json!(s.running_since_ms);
                out["finished_at_ms"] = json!(s.finished_at_ms);
                out["restarts"] = json!(s.restarts);
                out["checkpoints"] = json!(s.checkpoints.iter().map(checkpoint_json).collect::<Vec<_>>());
                println!("{out}");
            } else {
                println!("job      {} ({})", j.job_id, j.name);
                println!("state    {} (attempt {}, {} restarts): {}", j.state, j.attempt, s.restarts, j.cause);
                println!();
                let rows = s
                    .tasks
                    .iter()
                    .map(|t| {
                        let m = t.metrics.clone().unwrap_or_default();
                        vec![
                            t.task_id.clone(),
                            t.operators.clone(),
                            format!("{}/{}", t.subtask + 1, t.parallelism),
                            t.worker_id.clone(),
                            t.state.clone(),
                            m.records_in.to_string(),
                            m.records_out.to_string(),
                            m.late_records.to_string(),
                            m.dead_lettered.to_string(),
                            details(&m.gauges, &m.notes),
                            if t.error.is_empty() && !m.retrying.is_empty() { format!("retrying {}", m.retrying) } else { t.error.clone() },
                        ]
                    })
                    .collect();
                table(&["TASK", "OPERATORS", "SUBTASK", "WORKER", "STATE", "IN", "OUT", "LATE", "DEAD", "DETAILS", "ERROR"], rows);
                println!();
                if !s.checkpoints.is_empty() {
                    let rows = s
                        .checkpoints
                        .iter()
                        .map(|c| {
                            vec![
                                c.checkpoint_id.to_string(),
                                c.kind.clone(),
                                c.state.clone(),
                                format!("{} ms", c.duration_ms),
                                bytes(c.full_bytes),
                                bytes(c.incremental_bytes),
                                if c.savepoint_id.is_empty() { c.cause.clone() } else { c.savepoint_id.clone() },
                            ]
                        })
                        .collect();
                    table(&["CHECKPOINT", "KIND", "STATE", "DURATION", "FULL", "INCREMENTAL", "SAVEPOINT / CAUSE"], rows);
                    println!();
                }
                let rows =
                    s.history.iter().map(|h| vec![format!("{}", h.at_ms), format!("{} -> {}", h.from, h.to), h.cause.clone()]).collect();
                table(&["AT (UNIX MS)", "TRANSITION", "CAUSE"], rows);
            }
        }
        Command::Cancel { job, savepoint: true, .. } => {
            let r = connect(coordinator, &access)
                .await?
                .savepoint(SavepointRequest { job_id: job.clone(), cancel: true })
                .await
                .map_err(rpc)?
                .into_inner();
            if cli.json {
                println!("{}", json!({ "job_id": job, "savepoint_id": r.savepoint_id }));
            } else {
                println!("{}", r.savepoint_id);
            }
        }
        Command::Backfill { job, filter, source, no_wait, timeout } => {
            let mut client = connect(coordinator, &access).await?;
            let request = BackfillRequest { job_id: job.clone(), source: source.clone().unwrap_or_default(), filter: filter.clone() };
            let r = client.backfill(request).await.map_err(rpc)?.into_inner();
            if *no_wait {
                if cli.json {
                    println!(
                        "{}",
                        json!({ "job_id": job, "source": r.source, "backfill_id": r.backfill_id, "checkpoint_id": r.checkpoint_id })
                    );
                } else {
                    println!("backfill {} of source {} is held by checkpoint {}", r.backfill_id, r.source, r.checkpoint_id);
                }
            } else {
                if !cli.json {
                    eprintln!(
                        "backfill {} of source {} is held by checkpoint {}; waiting for its rows",
                        r.backfill_id, r.source, r.checkpoint_id
                    );
                }
                let timeout = timeout.map(std::time::Duration::from_secs);
                wait_backfill(&mut client, (job, &r.source, r.backfill_id), timeout, cli.json, rpc).await?;
            }
        }
        Command::Savepoint { job } => {
            let r = connect(coordinator, &access)
                .await?
                .savepoint(SavepointRequest { job_id: job.clone(), cancel: false })
                .await
                .map_err(rpc)?
                .into_inner();
            if cli.json {
                let mut out = r.savepoint.as_ref().map(checkpoint_json).unwrap_or_default();
                out["job_id"] = json!(job);
                println!("{out}");
            } else {
                println!("{}", r.savepoint_id);
            }
        }
        Command::Rescale { job, parallelism } => {
            let request = RescaleRequest { job_id: job.clone(), parallelism: *parallelism };
            let r = connect(coordinator, &access).await?.rescale(request).await.map_err(rpc)?.into_inner();
            if cli.json {
                println!("{}", json!({ "job_id": job, "savepoint_id": r.savepoint_id, "attempt": r.attempt, "parallelism": parallelism }));
            } else {
                println!("{job} rescaling to {parallelism} (attempt {}) from savepoint {}", r.attempt, r.savepoint_id);
            }
        }
        Command::Cancel { job, savepoint: false, keep_slot } => {
            let request = CancelRequest { job_id: job.clone(), keep_slots: *keep_slot };
            let r = connect(coordinator, &access).await?.cancel(request).await.map_err(rpc)?.into_inner();
            if cli.json {
                println!("{}", json!({ "job_id": job, "state": r.state, "warning": r.warning }));
            } else {
                println!("{job} {}", r.state);
            }
            if !r.warning.is_empty() {
                eprintln!("warning: {}", r.warning);
            }
        }
        Command::Coordinators { change } => {
            // Listing works without a leader too (a split cluster is when one asks): the leader's
            // view when there is one, else the first coordinator that answers.
            let mut client = match (change, connect(coordinator, &access).await) {
                (_, Ok(c)) => c,
                (Some(_), Err(e)) => return Err(e),
                (None, Err(e)) => {
                    let mut any = None;
                    for address in eddy_proto::address_list(coordinator) {
                        if let Ok(c) = eddy_proto::connect(&address, std::time::Duration::from_secs(3), &access).await {
                            any = Some(JobServiceClient::new(c));
                            break;
                        }
                    }
                    any.ok_or(e)?
                }
            };
            let view = match change {
                None => client.coordinators(CoordinatorsRequest {}).await,
                Some(CoordinatorChange::Add { id, address }) => {
                    client.change_coordinators(ChangeCoordinatorsRequest { add_id: *id, add_address: address.clone(), remove_id: 0 }).await
                }
                Some(CoordinatorChange::Remove { id }) => {
                    client.change_coordinators(ChangeCoordinatorsRequest { add_id: 0, add_address: String::new(), remove_id: *id }).await
                }
            };
            let view = view.map_err(rpc)?.into_inner();
            if cli.json {
                let list: Vec<_> = view
                    .coordinators
                    .iter()
                    .map(|c| json!({"id": c.id, "address": c.address, "role": c.role, "term": c.term, "applied": c.applied}))
                    .collect();
                println!("{}", json!({"replicated": view.replicated, "leader": view.leader_address, "coordinators": list}));
            } else if !view.replicated {
                println!("one coordinator, at {coordinator}, not replicated");
            } else {
                let rows = view
                    .coordinators
                    .iter()
                    .map(|c| vec![c.id.to_string(), c.address.clone(), c.role.clone(), c.term.to_string(), c.applied.to_string()])
                    .collect();
                table(&["ID", "ADDRESS", "ROLE", "TERM", "APPLIED"], rows);
            }
        }
        Command::Workers => {
            let workers = connect(coordinator, &access).await?.list_workers(ListWorkersRequest {}).await.map_err(rpc)?.into_inner().workers;
            if cli.json {
                let out: Vec<_> = workers
                    .iter()
                    .map(|w| json!({"worker_id": w.worker_id, "data_address": w.data_address, "slots": w.slots, "slots_used": w.slots_used, "state": w.state, "last_heartbeat_ms": w.last_heartbeat_ms}))
                    .collect();
                println!("{}", json!(out));
            } else {
                let rows = workers
                    .iter()
                    .map(|w| vec![w.worker_id.clone(), w.data_address.clone(), format!("{}/{}", w.slots_used, w.slots), w.state.clone()])
                    .collect();
                table(&["WORKER", "DATA ADDRESS", "SLOTS USED", "STATE"], rows);
            }
        }
    }
    Ok(())
}

/// Connector gauges as `name=value` pairs, e.g. `slot_lag_bytes=0 snapshot_rows_done=500`, then
/// notes as `name="text"`.
fn details(gauges: &std::collections::HashMap<String, i64>, notes: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<_> = gauges.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    let mut notes: Vec<_> = notes.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
    notes.sort();
    pairs.extend(notes);
    pairs.join(" ")
}

/// Waits until backfill `id` of source `source` is handed on (or failed, or the job ended, or
/// `timeout` passed), from the note its source keeps of it (`done rows=… skipped=…` or `failed: …`),
/// which outlives a restart.
async fn wait_backfill(
    client: &mut JobServiceClient<Authed>,
    (job, source, id): (&str, &str, u64),
    timeout: Option<std::time::Duration>,
    json: bool,
    rpc: impl Fn(tonic::Status) -> Failure,
) -> Result<(), Failure> {
    let started = std::time::Instant::now();
    let note = format!("backfill_{id}");
    loop {
        let s = client.job_status(JobStatusRequest { job_id: job.to_string() }).await.map_err(&rpc)?.into_inner();
        let state = s.job.as_ref().map(|j| j.state.clone()).unwrap_or_default();
        let streams = s.tasks.iter().filter(|t| t.subtask == 0 && t.operators.split(" -> ").next() == Some(source));
        if let Some(outcome) = streams.filter_map(|t| t.metrics.as_ref()?.notes.get(&note)).next() {
            if let Some(why) = outcome.strip_prefix("failed: ") {
                return Err(Failure::new(7, format!("backfill {id} failed: {why}")));
            }
            let figure =
                |name: &str| outcome.split(' ').find_map(|w| w.strip_prefix(name)?.strip_prefix('=')?.parse::<u64>().ok()).unwrap_or(0);
            let (rows, skipped) = (figure("rows"), figure("skipped"));
            if json {
                println!("{}", json!({ "job_id": job, "source": source, "backfill_id": id, "rows": rows, "skipped": skipped }));
            } else {
                println!(
                    "backfill {id}: {rows} rows re-read into the stream ({skipped} skipped: changed meanwhile, the stream carried them)"
                );
            }
            return Ok(());
        }
        if ["finished", "failed", "cancelled"].contains(&state.as_str()) {
            return Err(Failure::new(7, format!("job {job} is {state}; backfill {id} did not finish")));
        }
        if timeout.is_some_and(|t| started.elapsed() > t) {
            return Err(Failure::new(
                1,
                format!(
                    "backfill {id} is not done after {} s; it goes on (`eddy status {job}` shows it under backfill_{id})",
                    started.elapsed().as_secs()
                ),
            ));
        }
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn checkpoint_json(c: &CheckpointView) -> serde_json::Value {
    json!({
        "checkpoint_id": c.checkpoint_id, "kind": c.kind, "state": c.state, "triggered_at_ms": c.triggered_at_ms,
        "duration_ms": c.duration_ms, "full_bytes": c.full_bytes, "incremental_bytes": c.incremental_bytes,
        "cause": c.cause, "savepoint_id": c.savepoint_id,
    })
}

/// A byte count for people: `512 B`, `3.4 MB`.
fn bytes(n: u64) -> String {
    match n {
        0..1_000 => format!("{n} B"),
        1_000..1_000_000 => format!("{:.1} kB", n as f64 / 1e3),
        1_000_000..1_000_000_000 => format!("{:.1} MB", n as f64 / 1e6),
        _ => format!("{:.1} GB", n as f64 / 1e9),
    }
}

fn job_json(j: &JobSummary) -> serde_json::Value {
    json!({
        "job_id": j.job_id, "name": j.name, "state": j.state, "attempt": j.attempt, "tasks": j.tasks,
        "cause": j.cause, "submitted_at_ms": j.submitted_at_ms, "state_changed_at_ms": j.state_changed_at_ms,
    })
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}
