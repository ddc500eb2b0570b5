//! `eddy-coordinator`: serves the job API (for the `eddy` CLI) and the cluster API (for workers).

use std::time::Duration;

use clap::Parser;
use eddy_coordinator::CoordinatorConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Eddy coordinator: schedules jobs on workers")]
struct Args {
    /// Address to serve the job and cluster APIs on.
    #[arg(long, env = "EDDY_LISTEN", default_value = "0.0.0.0:6123")]
    listen: String,
    /// Milliseconds of worker silence after which it is declared lost (a worker whose connection
    /// closes is lost at once; this is for one that hangs or is cut off).
    #[arg(long, env = "EDDY_HEARTBEAT_TIMEOUT_MS", default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Directory for job metadata; a restarted coordinator resumes the jobs found there.
    #[arg(long, env = "EDDY_DATA_DIR", default_value = "eddy-data")]
    data_dir: std::path::PathBuf,
    /// Checkpoint storage, a directory every worker can reach at the same path (a shared volume).
    /// Default: `checkpoints` under --data-dir.
    #[arg(long, env = "EDDY_CHECKPOINT_DIR")]
    checkpoint_dir: Option<std::path::PathBuf>,
    /// Completed checkpoints kept per job (savepoints are always kept).
    #[arg(long, env = "EDDY_RETAINED_CHECKPOINTS", default_value_t = 3)]
    retained_checkpoints: usize,
    /// Restarts in a row after which a failing job is given up.
    #[arg(long, env = "EDDY_MAX_RESTARTS", default_value_t = 10)]
    max_restarts: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}; pick a free address with --listen", args.listen))?;
    let address = listener.local_addr()?;
    tracing::info!(%address, "coordinator listening");
    // A plain line on stdout too, so that a script that asked for port 0 can learn the port.
    println!("eddy-coordinator listening on {address}");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        signal.cancel();
    });
    let config = CoordinatorConfig {
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        data_dir: Some(args.data_dir),
        checkpoint_dir: args.checkpoint_dir,
        retained_checkpoints: args.retained_checkpoints,
        max_restarts: args.max_restarts,
        ..Default::default()
    };
    eddy_coordinator::run(config, listener, shutdown).await
}
