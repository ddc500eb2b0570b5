//! `eddy-worker`: joins a coordinator and runs the tasks it deploys.

use clap::Parser;
use eddy_worker::WorkerConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(version, about = "Eddy worker: runs operator tasks deployed by the coordinator")]
struct Args {
    /// Coordinator address; for replicated coordinators several, comma-separated (the worker
    /// finds the leader, and the next one after a failover).
    #[arg(long, env = "EDDY_COORDINATOR", default_value = "127.0.0.1:6123")]
    coordinator: String,
    /// Address to serve the data exchange on: loopback unless told otherwise. Another address
    /// (`0.0.0.0:6124`) needs the cluster's secret (EDDY_SECRET_FILE or EDDY_SECRET).
    #[arg(long, env = "EDDY_DATA_LISTEN", default_value = "127.0.0.1:6124")]
    listen: String,
    /// Address other workers use to reach this one (default: the bound address, or the hostname
    /// with the bound port when listening on all interfaces).
    #[arg(long, env = "EDDY_ADVERTISE")]
    advertise: Option<String>,
    /// Address to serve Prometheus metrics on (`GET /metrics`), e.g. `0.0.0.0:9249`; off unless
    /// given. Read-only and unauthenticated, like Flink's reporter: bind it where only your
    /// Prometheus reaches.
    #[arg(long, env = "EDDY_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Task slots offered.
    #[arg(long, env = "EDDY_SLOTS", default_value_t = 4)]
    slots: u32,
    /// Worker id (default: a random one).
    #[arg(long, env = "EDDY_WORKER_ID")]
    id: Option<String>,
    /// Local directory for task state and checkpoint scratch files, locked while the worker runs
    /// and emptied at start (default: `eddy-workers/<id>` in the system's temporary directory,
    /// where dead workers' folders are removed).
    #[arg(long, env = "EDDY_STATE_DIR")]
    state_dir: Option<std::path::PathBuf>,
    #[command(flatten)]
    access: eddy_proto::auth::AccessArgs,
    /// A directory whose files jobs may read and write (file sources and sinks, dead letters);
    /// repeat it, or comma-separate them. Default: `eddy` in the system's temporary directory.
    #[arg(long = "allow-dir", env = "EDDY_ALLOW_DIRS", value_delimiter = ',')]
    allow_dirs: Vec<std::path::PathBuf>,
    /// Hosts jobs may connect to (`name`, or `*.domain` for any name under it), comma-separated;
    /// default: any.
    #[arg(long, env = "EDDY_ALLOW_HOSTS", value_delimiter = ',')]
    allow_hosts: Vec<String>,
    /// Environment variables of this worker that jobs may read as `${worker:NAME}` (a password
    /// kept out of specs), comma-separated; no other is lent.
    #[arg(long, env = "EDDY_JOB_ENV", value_delimiter = ',')]
    job_env: Vec<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    let args = Args::parse();
    if args.slots == 0 {
        anyhow::bail!("--slots must be at least 1");
    }
    let access = args.access.load().map_err(anyhow::Error::msg)?;
    if access.tls.serves() && !access.tls.verifies() {
        anyhow::bail!("a worker serving TLS reaches the other workers over TLS too: give the CA with --tls-ca (EDDY_TLS_CA)");
    }
    let listener = TcpListener::bind(&args.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}; pick a free address with --listen", args.listen))?;
    let bound = listener.local_addr()?;
    access.guard().check_listen(bound).map_err(anyhow::Error::msg)?;
    let advertised = match args.advertise {
        Some(a) => a,
        None if bound.ip().is_unspecified() => {
            let host = std::fs::read_to_string("/etc/hostname").map(|h| h.trim().to_string()).unwrap_or_else(|_| "127.0.0.1".into());
            format!("{host}:{}", bound.port())
        }
        None => bound.to_string(),
    };
    let metrics = eddy_proto::metrics::listen(args.metrics_listen.as_deref(), "--metrics-listen").await.map_err(anyhow::Error::msg)?;
    if let Some(l) = &metrics {
        // On stdout, so that a script that asked for port 0 can learn the port.
        println!("eddy-worker metrics on http://{}/metrics", l.local_addr()?);
    }
    let worker_id = args.id.unwrap_or_else(|| format!("worker-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]));
    tracing::info!(%worker_id, data = %advertised, coordinator = %args.coordinator, "worker starting");
    let shutdown = CancellationToken::new();
    let signal = shutdown.clone();
    tokio::spawn(async move {
        // Ctrl-C or SIGTERM (docker stop): stop tasks and leave gracefully.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match term.as_mut() { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        signal.cancel();
    });
    // The default location is one folder per worker under a shared parent, where the folders of
    // dead workers (random ids that never come back) are removed.
    let parent = std::env::temp_dir().join("eddy-workers");
    let state_dir = args.state_dir.clone().unwrap_or_else(|| parent.join(&worker_id));
    let _claim = eddy_worker::workdir::claim(&state_dir)?;
    if args.state_dir.is_none() {
        let removed = eddy_worker::workdir::sweep_dead(&parent, &state_dir);
        if removed > 0 {
            tracing::info!(removed, parent = %parent.display(), "removed dead workers' state directories");
        }
    }
    let allowed_dirs = if args.allow_dirs.is_empty() { vec![WorkerConfig::default_allowed_dir()] } else { args.allow_dirs };
    let me = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&state_dir)?);
    for dir in &allowed_dirs {
        // Made if missing, for this user alone (the default is under the shared temporary dir),
        // and refused if another user owns it or may write in it (and so plant links there).
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .map_err(|e| anyhow::anyhow!("cannot create --allow-dir {}: {e}", dir.display()))?;
        let meta = std::fs::metadata(dir)?;
        let (owner, mode) = (std::os::unix::fs::MetadataExt::uid(&meta), std::os::unix::fs::PermissionsExt::mode(&meta.permissions()));
        if owner != me || mode & 0o022 != 0 {
            anyhow::bail!(
                "--allow-dir {} is owned by another user or writable by others (mode {:o}): give this worker a directory of its own",
                dir.display(),
                mode & 0o777
            );
        }
    }
    let config = WorkerConfig {
        worker_id,
        coordinator: args.coordinator,
        slots: args.slots,
        advertised_address: advertised,
        state_dir,
        access,
        allowed_dirs,
        allowed_hosts: args.allow_hosts.into_iter().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).collect(),
        job_env: args.job_env.into_iter().map(|n| n.trim().to_string()).filter(|n| !n.is_empty()).collect(),
    };
    eddy_worker::run(config, listener, metrics, shutdown).await
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
