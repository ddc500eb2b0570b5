//! `eddy-coordinator`: serves the job API (for the `eddy` CLI) and the cluster API (for workers).

use std::time::Duration;

use clap::Parser;
use eddy_coordinator::CoordinatorConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Eddy coordinator: schedules jobs on workers")]
struct Args {
    /// Address to serve the job and cluster APIs on: loopback unless told otherwise. Another
    /// address (`0.0.0.0:6123`) needs the cluster's secret (EDDY_SECRET_FILE or EDDY_SECRET).
    #[arg(long, env = "EDDY_LISTEN", default_value = "127.0.0.1:6123")]
    listen: String,
    /// Address to serve the web page (`/`) and Prometheus metrics (`/metrics`) on, e.g.
    /// `0.0.0.0:8081`; off unless given. Read-only and unauthenticated, like Flink's web UI
    /// without a proxy: bind it where only your operators and Prometheus reach.
    #[arg(long, env = "EDDY_HTTP_LISTEN")]
    http_listen: Option<String>,
    /// Milliseconds of worker silence after which it is declared lost (a worker whose connection
    /// closes is lost at once; this is for one that hangs or is cut off).
    #[arg(long, env = "EDDY_HEARTBEAT_TIMEOUT_MS", default_value_t = 10_000)]
    heartbeat_timeout_ms: u64,
    /// Directory for job metadata; a restarted coordinator resumes the jobs found there.
    #[arg(long, env = "EDDY_DATA_DIR", default_value = "eddy-data")]
    data_dir: std::path::PathBuf,
    /// Checkpoint storage every worker reaches: a directory at the same path everywhere (a shared
    /// volume), or `s3://bucket/prefix` on an S3-compatible store, with credentials, region and
    /// endpoint from the AWS_* environment variables (AWS_ENDPOINT and AWS_ALLOW_HTTP=true for a
    /// store other than AWS; the workers need the same variables). Default: `checkpoints` under
    /// --data-dir.
    #[arg(long, env = "EDDY_CHECKPOINT_DIR")]
    checkpoint_dir: Option<String>,
    /// Completed checkpoints kept per job (savepoints are always kept).
    #[arg(long, env = "EDDY_RETAINED_CHECKPOINTS", default_value_t = 3)]
    retained_checkpoints: usize,
    /// Restarts in a row after which a failing job is given up.
    #[arg(long, env = "EDDY_MAX_RESTARTS", default_value_t = 10)]
    max_restarts: u32,
    /// This coordinator's id among --raft-peers (replicated coordinators only).
    #[arg(long, env = "EDDY_RAFT_ID", requires = "raft_peers")]
    raft_id: Option<u64>,
    /// Every coordinator of a new replicated cluster, this one included, as `ID=HOST:PORT,...`
    /// (the address each serves its API on; the same list on every coordinator). Once a
    /// coordinator has stored the membership, `eddy coordinators add|remove` changes it.
    #[arg(long, env = "EDDY_RAFT_PEERS", requires = "raft_id")]
    raft_peers: Option<String>,
    /// Join a running replicated cluster: start with no membership (--raft-peers then lists the
    /// cluster's coordinators and this one, for their addresses), then run
    /// `eddy coordinators add ID ADDRESS`; the leader sends this coordinator its state.
    #[arg(long, env = "EDDY_RAFT_JOIN", requires = "raft_id")]
    raft_join: bool,
    #[command(flatten)]
    access: eddy_proto::auth::AccessArgs,
}

/// Parses `1=host:port,2=host:port`.
fn parse_peers(list: &str) -> anyhow::Result<std::collections::BTreeMap<u64, String>> {
    let mut peers = std::collections::BTreeMap::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let (id, address) = item.split_once('=').ok_or_else(|| anyhow::anyhow!("--raft-peers: `{item}` is not ID=HOST:PORT"))?;
        let id: u64 = id.trim().parse().map_err(|_| anyhow::anyhow!("--raft-peers: `{id}` is not a coordinator id (a number above 0)"))?;
        anyhow::ensure!(id > 0, "--raft-peers: coordinator ids start at 1");
        anyhow::ensure!(peers.insert(id, address.trim().to_string()).is_none(), "--raft-peers: coordinator {id} is listed twice");
    }
    Ok(peers)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    let access = args.access.load().map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}; pick a free address with --listen", args.listen))?;
    let address = listener.local_addr()?;
    access.guard().check_listen(address).map_err(anyhow::Error::msg)?;
    tracing::info!(%address, "coordinator listening");
    // A plain line on stdout too, so that a script that asked for port 0 can learn the port.
    println!("eddy-coordinator listening on {address}");
    let http = eddy_proto::metrics::listen(args.http_listen.as_deref(), "--http-listen").await.map_err(anyhow::Error::msg)?;
    if let Some(l) = &http {
        println!("eddy-coordinator web page on http://{}/", l.local_addr()?);
    }
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
    let raft = match (args.raft_id, &args.raft_peers) {
        (Some(id), Some(list)) => {
            let peers = parse_peers(list)?;
            anyhow::ensure!(peers.contains_key(&id), "--raft-id {id} is not among --raft-peers ({list})");
            anyhow::ensure!(
                args.checkpoint_dir.is_some(),
                "replicated coordinators need --checkpoint-dir: a directory every coordinator and worker reaches at the same path, or an s3:// URL"
            );
            let mut settings = eddy_coordinator::raft::RaftSettings::new(id, peers, args.data_dir.join("raft"));
            settings.join = args.raft_join;
            Some(settings)
        }
        _ => None,
    };
    let config = CoordinatorConfig {
        raft,
        heartbeat_timeout: Duration::from_millis(args.heartbeat_timeout_ms),
        data_dir: Some(args.data_dir),
        checkpoint_dir: args.checkpoint_dir,
        retained_checkpoints: args.retained_checkpoints,
        max_restarts: args.max_restarts,
        access,
        ..Default::default()
    };
    eddy_coordinator::run(config, listener, http, shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn started_without_flags_it_listens_on_loopback_only() {
        // The declared default, whatever the environment of the test says.
        let command = <Args as clap::CommandFactory>::command();
        let listen = command.get_arguments().find(|a| a.get_id() == "listen").unwrap();
        let address: std::net::SocketAddr = listen.get_default_values()[0].to_str().unwrap().parse().unwrap();
        assert!(address.ip().is_loopback(), "{address}");
    }
}
