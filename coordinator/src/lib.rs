//! Eddy's coordinator (a JobManager): accepts job specs, plans them, places their tasks on
//! registered workers' slots, and follows them to the end.
//!
//! One task, [`actor::Coordinator`], owns all cluster state (workers, jobs, placements); the gRPC
//! handlers in [`api`] only validate, convert, send it a request and await the reply. Workers keep
//! one control stream each; heartbeats on it feed the failure detector.

pub mod actor;
pub mod api;
pub mod checkpoint;
pub mod cluster;
pub mod error;
pub mod meta;
pub mod state;
pub mod store;

use std::path::PathBuf;
use std::time::Duration;

use eddy_proto::cluster_service_server::ClusterServiceServer;
use eddy_proto::job_service_server::JobServiceServer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
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
    /// Checkpoint storage (default: `checkpoints` in `data_dir`), shared with every worker.
    pub checkpoint_dir: Option<PathBuf>,
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

/// Serves the job and cluster APIs on `listener` until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(256);
    let mut coordinator = actor::Coordinator::new(config.clone(), rx);
    if let Some(data) = &config.data_dir {
        let checkpoints = config.checkpoint_dir.clone().unwrap_or_else(|| data.join("checkpoints"));
        let (log, state) = meta::LocalLog::open(data)?;
        coordinator = coordinator.with_stores(Box::new(log), state, store::CheckpointStore::open(&checkpoints)?).await?;
    }
    let actor = tokio::spawn(coordinator.run(shutdown.clone()));
    let api = api::Api { actor: tx, heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64 };
    eddy_proto::server()
        .add_service(JobServiceServer::new(api.clone()))
        .add_service(ClusterServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    actor.await?;
    Ok(())
}
