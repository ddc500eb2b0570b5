//! Eddy's coordinator (a JobManager): accepts job specs, plans them, places their tasks on
//! registered workers' slots, and follows them to the end.
//!
//! One task, [`actor::Coordinator`], owns all cluster state; the gRPC handlers in [`api`] only
//! validate, convert, send it a request and await the reply. What it holds has a module each:
//! the workers and their slots ([`cluster`]), each job's lifecycle and the orders it calls for
//! ([`job`], [`state`]), checkpoint tracking ([`checkpoint`], [`manifest`]), the durable metadata
//! as commands ([`meta`], replicated by [`raft`] across coordinators) and checkpoint files
//! ([`store`]). Workers keep one control stream each; heartbeats on it feed the failure detector.
//! An optional HTTP listener serves a read-only web page ([`web`]) and Prometheus metrics
//! ([`metrics`]), both read through the same requests as the job API.

pub mod actor;
pub mod api;
pub mod checkpoint;
pub mod cluster;
pub mod error;
pub mod job;
pub mod manifest;
pub mod meta;
pub mod metrics;
pub mod raft;
pub mod slots;
pub mod state;
pub mod store;
pub mod web;

use std::path::PathBuf;
use std::time::Duration;

use eddy_proto::cluster_service_server::ClusterServiceServer;
use eddy_proto::job_service_server::JobServiceServer;
use eddy_proto::raft_service_server::RaftServiceServer;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

/// Coordinator settings.
#[derive(Debug, Clone)]
pub struct CoordinatorConfig {
    /// How often workers send heartbeats.
    pub heartbeat_interval: Duration,
    /// A worker silent for this long is lost. A worker whose control stream closes (it died, its
    /// host restarted) is lost at once; the timeout is for one that hangs or is cut off, and long
    /// enough that a machine busy for a few seconds does not look like one.
    pub heartbeat_timeout: Duration,
    /// Where job metadata is kept; `None` keeps nothing (and takes no checkpoints).
    pub data_dir: Option<PathBuf>,
    /// Checkpoint storage shared with every worker: a directory or an `s3://bucket/prefix` URL
    /// (default: `checkpoints` in `data_dir`).
    pub checkpoint_dir: Option<String>,
    /// A checkpoint not complete after this long is aborted.
    pub checkpoint_timeout: Duration,
    /// Completed checkpoints kept per job (savepoints are always kept).
    pub retained_checkpoints: usize,
    /// First restart delay; doubles with each restart in a row.
    pub restart_backoff: Duration,
    /// Longest restart delay.
    pub max_restart_backoff: Duration,
    /// Restarts in a row after which a job fails.
    pub max_restarts: u32,
    /// Replicate the metadata with these coordinators (Raft); `None`: this one alone, with its
    /// metadata in `data_dir`.
    pub raft: Option<raft::RaftSettings>,
    /// The cluster's secret and TLS: calls without the secret are refused, and calls to other
    /// coordinators carry it. No secret (loopback only): every call is let in.
    pub access: eddy_proto::Access,
}

impl Default for CoordinatorConfig {
    fn default() -> CoordinatorConfig {
        CoordinatorConfig {
            heartbeat_interval: Duration::from_millis(500),
            heartbeat_timeout: Duration::from_secs(10),
            data_dir: None,
            checkpoint_dir: None,
            checkpoint_timeout: Duration::from_secs(60),
            retained_checkpoints: 3,
            restart_backoff: Duration::from_millis(250),
            max_restart_backoff: Duration::from_secs(10),
            max_restarts: 10,
            raft: None,
            access: eddy_proto::Access::default(),
        }
    }
}

/// Now, in Unix ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Of `(when, id)` pairs, the ids of all but the `kept` latest (ended jobs and lost workers are
/// listed for a while, the latest few).
pub(crate) fn older_than_the_latest<T: Ord>(mut items: Vec<(T, String)>, kept: usize) -> Vec<String> {
    if items.len() <= kept {
        return Vec::new();
    }
    items.sort();
    items.truncate(items.len() - kept);
    items.into_iter().map(|(_, id)| id).collect()
}

/// Serves the job and cluster APIs on `listener` until `shutdown` is cancelled: alone, or as one of
/// several coordinators replicating their metadata with Raft (then also the raft service).
pub async fn run(
    config: CoordinatorConfig,
    listener: TcpListener,
    http_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (route_tx, route) = watch::channel(api::Route::Leader(None));
    let mut api = api::Api { route, heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64, raft: None };
    let mut raft_service = None;
    let leading = match config.raft.clone() {
        None => {
            let (tx, rx) = mpsc::channel(256);
            let mut coordinator = actor::Coordinator::new(config.clone(), rx);
            if let Some(data) = &config.data_dir {
                let (log, state) = meta::LocalLog::open(data)?;
                coordinator =
                    coordinator.with_stores(Box::new(log), state, store::CheckpointStore::open(&checkpoint_dir(&config))?).await?;
            }
            route_tx.send_replace(api::Route::Here(tx));
            let stop = shutdown.clone();
            tokio::spawn(async move {
                coordinator.run(stop).await;
                anyhow::Ok(())
            })
        }
        Some(settings) => {
            let (inputs, received) = std::sync::mpsc::channel();
            let transport = raft::transport::GrpcTransport::new(tokio::runtime::Handle::current(), inputs.clone(), config.access.clone());
            let node = raft::start(settings, (inputs.clone(), received), Box::new(transport))?;
            api.raft = Some(api::RaftView { status: node.status.clone(), inputs: inputs.clone() });
            raft_service = Some(RaftServiceServer::new(raft::transport::RaftServer::new(inputs)).max_decoding_message_size(64 << 20));
            tokio::spawn(lead(config.clone(), node, route_tx, shutdown.clone()))
        }
    };
    let mut leading = leading;
    if let Some(http) = http_listener {
        let scraped = api.clone();
        let metrics = eddy_proto::metrics::router(move || {
            let api = scraped.clone();
            async move { metrics::families(&api).await }
        });
        let app = metrics.merge(web::router(api.clone(), shutdown.clone()));
        tokio::spawn(eddy_proto::metrics::serve(http, app, shutdown.clone().cancelled_owned()));
    }
    let guard = config.access.guard();
    let server = config
        .access
        .server()
        .map_err(anyhow::Error::msg)?
        .add_service(eddy_proto::auth::guarded(JobServiceServer::new(api.clone()), &guard))
        .add_service(eddy_proto::auth::guarded(ClusterServiceServer::new(api), &guard))
        .add_optional_service(raft_service.map(|s| eddy_proto::auth::guarded(s, &guard)))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.clone().cancelled_owned());
    tokio::select! {
        served = server => served?,
        // The loop ended on its own: a raft node that stopped on a storage error.
        ended = &mut leading => {
            shutdown.cancel();
            return ended?;
        }
    }
    leading.await?
}

fn checkpoint_dir(config: &CoordinatorConfig) -> String {
    let data = config.data_dir.clone().unwrap_or_else(|| PathBuf::from("eddy-data"));
    config.checkpoint_dir.clone().unwrap_or_else(|| data.join("checkpoints").display().to_string())
}

/// How long the leader's loop waits for a change to be committed before it gives up leading:
/// well inside the workers' lease, which its renewals keep alive.
const COMMIT_TIMEOUT: Duration = Duration::from_secs(4);

/// Runs the coordinator's loop while this coordinator leads (with every earlier entry applied),
/// from the replicated state; points the API at the leader otherwise.
async fn lead(
    config: CoordinatorConfig,
    node: raft::RaftHandle,
    route: watch::Sender<api::Route>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let mut status = node.status.clone();
    let storage = store::CheckpointStore::open(&checkpoint_dir(&config))?;
    loop {
        // Follow: requests go to the leader.
        loop {
            let s = status.borrow_and_update().clone();
            if let Some(why) = &s.stopped {
                anyhow::bail!("the raft node stopped: {why}");
            }
            // Leading, with every entry of its log applied (one proposed by a loop that gave up
            // on it may still commit: the new loop starts after it).
            if s.leading && s.applied >= s.last_index {
                break;
            }
            route.send_replace(api::Route::Leader(s.leader_address().map(str::to_string)));
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                changed = status.changed() => if changed.is_err() { return Ok(()) },
            }
        }
        let (reply, answer) = std::sync::mpsc::channel();
        node.inputs.send(raft::Input::Applied { reply }).map_err(|_| anyhow::anyhow!("the raft node has stopped"))?;
        let applied =
            tokio::task::spawn_blocking(move || answer.recv()).await?.map_err(|_| anyhow::anyhow!("the raft node has stopped"))?;
        let term = status.borrow().term;
        tracing::info!(
            term,
            applied = applied.index,
            jobs = applied.state.jobs.len(),
            "leading: resuming the jobs from the replicated metadata"
        );
        let failed = CancellationToken::new();
        let log = raft::log::RaftLog::new(node.inputs.clone(), failed.clone(), COMMIT_TIMEOUT);
        let (tx, rx) = mpsc::channel(256);
        let coordinator = actor::Coordinator::new(config.clone(), rx).with_stores(Box::new(log), applied.state, storage.clone()).await?;
        let stop = shutdown.child_token();
        let actor = tokio::spawn(coordinator.run(stop.clone()));
        route.send_replace(api::Route::Here(tx));
        // Lead until the term ends, a change fails to commit, or shutdown.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = failed.cancelled() => break,
                changed = status.changed() => {
                    let s = status.borrow_and_update();
                    if changed.is_err() || !s.leading || s.term != term {
                        break;
                    }
                }
            }
        }
        tracing::info!(term, "no longer leading; the coordinator's loop stops");
        route.send_replace(api::Route::Leader(None));
        stop.cancel();
        actor.await?;
        if shutdown.is_cancelled() {
            return Ok(());
        }
    }
}
