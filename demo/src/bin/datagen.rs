//! `eddy-datagen`: writes content and engagement events into PostgreSQL (see `eddy_demo::datagen`).

use clap::Parser;
use eddy_demo::datagen::{run, DatagenOptions};

/// Fills `content` and streams `engagement_events` (inserts, some updates and deletes) into
/// PostgreSQL at a steady rate, every choice drawn from the seed.
#[derive(Parser)]
#[command(name = "eddy-datagen", version)]
struct Args {
    /// PostgreSQL URL, e.g. postgres://postgres@127.0.0.1:5432/eddy.
    #[arg(long, env = "EDDY_PG_URL")]
    pg_url: String,
    /// Content rows to create.
    #[arg(long, default_value_t = 50)]
    contents: u32,
    /// Events inserted per second.
    #[arg(long, default_value_t = 500)]
    rate: u32,
    /// Seconds to run (default 20, or until --count when that is given).
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop after this many events.
    #[arg(long)]
    count: Option<u64>,
    /// Seed of every choice.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Percentage of events followed by an update of an earlier event.
    #[arg(long, default_value_t = 5.0)]
    updates_pct: f64,
    /// Percentage of events followed by a delete of an earlier event.
    #[arg(long, default_value_t = 2.0)]
    deletes_pct: f64,
    /// Percentage of events naming a content id that does not exist.
    #[arg(long, default_value_t = 3.0)]
    unknown_pct: f64,
    /// Do not create the tables and view (they must exist).
    #[arg(long)]
    no_schema: bool,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let options = DatagenOptions {
        pg_url: a.pg_url,
        contents: a.contents,
        rate: a.rate,
        seconds: a.seconds,
        count: a.count,
        seed: a.seed,
        updates_pct: a.updates_pct,
        deletes_pct: a.deletes_pct,
        unknown_pct: a.unknown_pct,
        create_schema: !a.no_schema,
    };
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let summary = run(&options, stop).await?;
    println!("{summary}");
    Ok(())
}
