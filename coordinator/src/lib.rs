//! Eddy's coordinator (a JobManager): accepts job specs, plans them, places their tasks on
//! registered workers' slots, and follows them to the end.
//!
//! One task, [`actor::Coordinator`], owns all cluster state (workers, jobs, placements); the gRPC
//! handlers in [`api`] only validate, convert, send it a request and await the reply. Workers keep
//! one control stream each; heartbeats on it feed the failure detector.

pub mod actor;
pub mod api;
pub mod state;

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
    /// A worker silent for this long is lost.
    pub heartbeat_timeout: Duration,
}

impl Default for CoordinatorConfig {
    fn default() -> CoordinatorConfig {
        CoordinatorConfig { heartbeat_interval: Duration::from_millis(500), heartbeat_timeout: Duration::from_secs(2) }
    }
}

/// Serves the job and cluster APIs on `listener` until `shutdown` is cancelled.
pub async fn run(config: CoordinatorConfig, listener: TcpListener, shutdown: CancellationToken) -> anyhow::Result<()> {
    let (tx, rx) = mpsc::channel(256);
    let coordinator = actor::Coordinator::new(config.clone(), rx);
    let actor = tokio::spawn(coordinator.run(shutdown.clone()));
    let api = api::Api { actor: tx, heartbeat_interval_ms: config.heartbeat_interval.as_millis() as u64 };
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(JobServiceServer::new(api.clone()))
        .add_service(ClusterServiceServer::new(api))
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), shutdown.cancelled_owned())
        .await?;
    actor.await?;
    Ok(())
}
