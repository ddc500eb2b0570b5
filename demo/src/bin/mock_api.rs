//! `eddy-mock-api`: the external system stand-in for the `http` sink (see `eddy_demo::mock_api`).

use std::time::Duration;

use clap::Parser;
use eddy_demo::mock_api::{run, MockConfig};

/// Accepts `POST /events` (deduplicated by `Idempotency-Key`); `GET /stats` and `GET /events`
/// report what it saw. With EDDY_MOCK_API_PASSWORD set, a POST must carry that password in basic
/// auth.
#[derive(Parser)]
#[command(name = "eddy-mock-api", version)]
struct Args {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:8089")]
    listen: String,
    /// Answer every Nth POST with 503 (0: never).
    #[arg(long, default_value_t = 0)]
    fail_every: u64,
    /// Delay every POST's answer by this many milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Append each first-seen event to this file as a JSON line.
    #[arg(long)]
    log: Option<std::path::PathBuf>,
    /// Load the events already in the --log file first, so that a stand-in started again on the
    /// same log (after an outage) still knows what it received.
    #[arg(long, requires = "log")]
    resume: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(&args.listen).await.map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", args.listen))?;
    // Tests read this line to learn the port.
    println!("eddy-mock-api listening on {}", listener.local_addr()?);
    // From the environment, not a flag: a flag shows in every process listing.
    let password = std::env::var("EDDY_MOCK_API_PASSWORD").ok().filter(|p| !p.is_empty());
    let config = MockConfig {
        fail_every: args.fail_every,
        latency: Duration::from_millis(args.latency_ms),
        log: args.log,
        resume: args.resume,
        password,
    };
    run(listener, config, shutdown_signal()).await
}

/// Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
