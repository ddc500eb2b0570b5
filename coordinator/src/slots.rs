//! Replication slots a cancelled job leaves upstream when none of its tasks runs to drop them
//! (the job was between two attempts, or its worker was lost): the coordinator drops them itself,
//! as the cancel asked, rather than leave a slot nobody reads holding WAL on the server, and
//! releases their publications as the sources would (dropped when Eddy created one and no other
//! slot uses it).

use std::time::Duration;

use eddy_jobs::connectors::SourceConnector;
use eddy_jobs::plan::OperatorKind;
use eddy_jobs::Plan;
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tracing::{info, warn};

/// How long connecting, or one statement, may take.
const STATEMENT_TIMEOUT: Duration = Duration::from_secs(10);

/// A replication slot of a plan, and the publication its source reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub url: String,
    pub name: String,
    pub publication: String,
}

impl Slot {
    /// Whether `other` is the same slot (of the same database).
    pub fn same(&self, other: &Slot) -> bool {
        self.url == other.url && self.name == other.name
    }
}

/// A plan's replication slots.
pub fn of(plan: &Plan) -> Vec<Slot> {
    plan.operators
        .iter()
        .filter_map(|o| match &o.kind {
            OperatorKind::Source { connector: SourceConnector::PostgresCdc(c), .. } => {
                Some(Slot { url: c.url.clone(), name: c.slot.clone(), publication: c.publication.clone() })
            }
            _ => None,
        })
        .collect()
}

/// Drops each slot. A session still reading one is waited for up to `wait` (a task on a worker
/// cut off from the coordinator runs until its lease ends), then ended: by then no task of the
/// job runs, so it is a connection whose host vanished, which the server would only notice after
/// its `wal_sender_timeout`. Returns a warning naming the slots it could not drop, with why and
/// how to drop them by hand; empty when all are gone.
pub async fn drop_all(slots: Vec<Slot>, wait: Duration) -> String {
    let mut left = Vec::new();
    for Slot { url, name: slot, publication } in slots {
        // Connecting, dropping (twice at most, the reader ended between) and the publication.
        let dropped = tokio::time::timeout(wait + 4 * STATEMENT_TIMEOUT, drop_one(&url, &slot, &publication, wait)).await;
        match dropped.unwrap_or_else(|_| Err("the database did not answer in time".into())) {
            Ok(true) => info!(slot, "dropped the cancelled job's replication slot"),
            Ok(false) => info!(slot, "the cancelled job's replication slot was not there"),
            Err(e) => {
                warn!(slot, error = %e, "cannot drop the cancelled job's replication slot");
                left.push(format!(
                    "replication slot {slot} not dropped ({e}); a slot nobody reads holds WAL on the server: once no job resumes from it, run SELECT pg_drop_replication_slot('{slot}'); on the job's database"
                ));
            }
        }
    }
    left.join("; ")
}

/// Whether the slot was there to drop. Once it is gone, its publication is released.
async fn drop_one(url: &str, slot: &str, publication: &str, wait: Duration) -> Result<bool, String> {
    let connected = tokio::time::timeout(STATEMENT_TIMEOUT, tokio_postgres::connect(url, NoTls)).await;
    let (client, connection) =
        connected.map_err(|_| "cannot connect: timed out".to_string())?.map_err(|e| format!("cannot connect: {e}"))?;
    tokio::spawn(connection);
    let mut deadline = Instant::now() + wait;
    let mut ended_its_reader = false;
    loop {
        let sql = "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1";
        match client.query(sql, &[&slot]).await {
            Ok(rows) => {
                release_publication(&client, publication, slot).await;
                return Ok(!rows.is_empty());
            }
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && !ended_its_reader => {
                end_reader(&client, slot).await?;
                ended_its_reader = true;
                deadline = Instant::now() + Duration::from_secs(5);
            }
            Err(e) => return Err(e.as_db_error().map(|d| d.message().to_string()).unwrap_or_else(|| e.to_string())),
        }
    }
}

/// Releases the publication `slot`'s source read (see [`eddy_jobs::postgres::release_publication`]).
/// Best effort: a publication nobody reads holds nothing back.
async fn release_publication(client: &Client, publication: &str, slot: &str) {
    let Some(sql) = eddy_jobs::postgres::release_publication(publication, slot) else { return };
    let released = tokio::time::timeout(STATEMENT_TIMEOUT, client.batch_execute(&sql)).await;
    match released.map_err(|_| "the database did not answer in time".to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
        Ok(()) => {
            info!(publication, slot, "released the cancelled job's publication (dropped if Eddy created it and no other slot uses it)")
        }
        Err(e) => {
            warn!(publication, error = %e, "cannot release the cancelled job's publication; drop it by hand once no job uses it (DROP PUBLICATION)")
        }
    }
}

/// Ends the session still reading `slot`.
async fn end_reader(client: &Client, slot: &str) -> Result<(), String> {
    warn!(slot, "a session still reads the cancelled job's replication slot after the workers' lease; ending it");
    let sql = "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = $1 AND active";
    client.query(sql, &[&slot]).await.map_err(|e| format!("cannot end the session reading it: {e}"))?;
    Ok(())
}
