//! Replication slots a cancelled job leaves upstream when none of its tasks runs to drop them
//! (the job was between two attempts, or its worker was lost): the coordinator drops them itself,
//! as the cancel asked, rather than leave a slot nobody reads holding WAL on the server.

use std::time::Duration;

use eddy_jobs::connectors::{redact_url, SourceConnector};
use eddy_jobs::plan::OperatorKind;
use eddy_jobs::Plan;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::NoTls;
use tracing::{info, warn};

/// A plan's replication slots: (database URL, slot name).
pub fn of(plan: &Plan) -> Vec<(String, String)> {
    plan.operators
        .iter()
        .filter_map(|o| match &o.kind {
            OperatorKind::Source { connector: SourceConnector::PostgresCdc(c), .. } => Some((c.url.clone(), c.slot.clone())),
            _ => None,
        })
        .collect()
}

/// Drops each slot, waiting up to `wait` while a session still reads one (a task on a worker cut
/// off from the coordinator runs until its lease ends). Returns a warning naming the slots it
/// could not drop, with why and how to drop them by hand; empty when all are gone.
pub async fn drop_all(slots: Vec<(String, String)>, wait: Duration) -> String {
    let mut left = Vec::new();
    for (url, slot) in slots {
        match drop_one(&url, &slot, wait).await {
            Ok(()) => info!(slot, "dropped the cancelled job's replication slot"),
            Err(e) => {
                warn!(slot, error = %e, "cannot drop the cancelled job's replication slot");
                left.push(format!(
                    "replication slot {slot} not dropped ({e}); a slot nobody reads holds WAL on the server: once no job resumes from it, run SELECT pg_drop_replication_slot('{slot}'); on {}",
                    redact_url(&url)
                ));
            }
        }
    }
    left.join("; ")
}

async fn drop_one(url: &str, slot: &str, wait: Duration) -> Result<(), String> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await.map_err(|e| format!("cannot connect: {e}"))?;
    tokio::spawn(connection);
    let deadline = Instant::now() + wait;
    loop {
        let dropped =
            client.query("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot]).await;
        match dropped {
            Ok(_) => return Ok(()),
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())),
        }
    }
}
