//! Eddy's worker (a TaskManager): runs the tasks the coordinator deploys to it.
//!
//! Data flows source → chained operators → router → (bounded channel | gRPC stream) → inbox of the
//! next task → … → sink. Control (watermarks, end of stream) travels in-band with the data. See
//! [`task`] for the runtime, [`exchange`] for routing and backpressure, [`operators`] for transforms
//! and windows, [`connectors`] for sources and sinks, [`control`] for the coordinator session.

pub mod align;
pub mod batch;
pub mod checkpoint;
pub mod codec;
pub mod config;
pub mod connectors;
pub mod control;
pub mod error;
pub mod exchange;
pub mod json;
pub mod keys;
pub mod metrics;
pub mod operator;
pub mod operators;
pub mod retry;
pub mod state;
pub mod task;
#[cfg(test)]
mod testing;
pub mod workdir;

use std::sync::Arc;

use eddy_proto::data_service_server::DataServiceServer;
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_util::sync::CancellationToken;

pub use config::WorkerConfig;

/// Runs a worker: serves its data service on `data_listener` and keeps a control session with the
/// coordinator until `shutdown` is cancelled.
///
/// The control session runs on a thread and runtime of its own, so that tasks keeping the data
/// plane's threads busy (a large window firing, a state restore) never delay heartbeats: a busy
/// worker must not look dead.
pub async fn run(
    config: WorkerConfig,
    data_listener: TcpListener,
    metrics_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let inboxes = exchange::Inboxes::default();
    let server = config
        .access
        .server()
        .map_err(anyhow::Error::msg)?
        .initial_stream_window_size(exchange::STREAM_WINDOW)
        .initial_connection_window_size(exchange::CONNECTION_WINDOW)
        .add_service(eddy_proto::auth::guarded(
            DataServiceServer::new(exchange::DataServer { inboxes: inboxes.clone() }),
            &config.access.guard(),
        ))
        .serve_with_incoming_shutdown(TcpListenerStream::new(data_listener), shutdown.clone().cancelled_owned());
    let control = control::Control::new(config, inboxes, shutdown.clone(), tokio::runtime::Handle::current());
    if let Some(listener) = metrics_listener {
        let board = control.board();
        let app = eddy_proto::metrics::router(move || std::future::ready(board.families()));
        tokio::spawn(eddy_proto::metrics::serve(listener, app, shutdown.clone().cancelled_owned()));
    }
    let (done_tx, done) = tokio::sync::oneshot::channel();
    std::thread::Builder::new().name("eddy-control".into()).spawn(move || {
        match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(runtime) => runtime.block_on(control.run()),
            Err(e) => tracing::error!(error = %e, "cannot start the control runtime"),
        }
        let _ = done_tx.send(());
    })?;
    let (served, _) = tokio::join!(server, done);
    served?;
    Ok(())
}
