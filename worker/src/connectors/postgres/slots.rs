//! Replication slots: finding one and its position, creating one (with the snapshot it exports),
//! and dropping one its session has let go of.

use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient};
use tokio::time::Instant;
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;
use tracing::{info, warn};

use super::{connect, pg_error, wire_error};
use crate::error::{Result, TaskError};
use crate::operator::TaskMetrics;

/// How long `start` waits for a previous session to release the slot.
pub(crate) const SLOT_RELEASE_WAIT: Duration = Duration::from_secs(15);

/// The existing slot's confirmed position, once no other session holds it; `None` if it is missing.
pub(crate) async fn existing_slot(control: &Client, slot: &str) -> Result<Option<Lsn>> {
    let context = "postgres_cdc: checking the replication slot";
    let sql = "SELECT s.plugin::text, s.slot_type, s.database = current_database(), s.active, s.active_pid, \
                      s.confirmed_flush_lsn::text, s.wal_status \
               FROM pg_replication_slots s WHERE s.slot_name = $1";
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        let Some(row) = control.query_opt(sql, &[&slot]).await.map_err(|e| pg_error(context, e))? else {
            return Ok(None);
        };
        let (plugin, kind, here): (Option<String>, String, Option<bool>) = (row.get(0), row.get(1), row.get(2));
        if kind != "logical" || plugin.as_deref() != Some("pgoutput") {
            return Err(TaskError::user(format!(
                "options.slot: slot `{slot}` exists but is not a logical pgoutput slot; drop it or name another slot"
            )));
        }
        if here != Some(true) {
            return Err(TaskError::user(format!("options.slot: slot `{slot}` belongs to another database; name another slot")));
        }
        let (active, pid): (bool, Option<i32>) = (row.get(3), row.get(4));
        if row.get::<_, Option<String>>(6).as_deref() == Some("lost") {
            return Err(TaskError::user(format!(
                "postgres_cdc: replication slot `{slot}` was invalidated (the server removed WAL it still \
                 needed: max_slot_wal_keep_size); the changes it held are gone. Drop it (SELECT \
                 pg_drop_replication_slot('{slot}')), then cancel the job and submit it again to take a new snapshot"
            )));
        }
        if !active {
            let lsn = row.get::<_, Option<String>>(5).and_then(|l| Lsn::parse(&l).ok());
            return lsn.map(Some).ok_or_else(|| TaskError::external(format!("postgres_cdc: slot `{slot}` has no confirmed position yet")));
        }
        if Instant::now() >= deadline {
            return Err(TaskError::external(format!(
                "postgres_cdc: slot `{slot}` is in use by backend {}; is another job reading it?",
                pid.unwrap_or(0)
            )));
        }
        // A previous attempt's session may still be ending.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// How long slot creation waits before it says which transaction it waits for, and how often
/// it says it again.
const CREATION_REPORT: Duration = Duration::from_secs(2);
const CREATION_REPORT_AGAIN: Duration = Duration::from_secs(30);

/// Creates the slot (`TEMPORARY` or not) on the gated replication session: its consistent point
/// and, with `export`, the name of the snapshot the session exports until its next command.
/// PostgreSQL finds a consistent point only once every transaction that was writing when asked
/// has ended, so a long-running one holds creation up: after a moment the oldest is named in
/// the log and in the `slot_waiting_for_pid` gauge (0 once created), with how to end it.
pub(crate) async fn create_slot(
    repl: &mut ReplicationClient,
    control: &Client,
    metrics: &TaskMetrics,
    slot: &str,
    temporary: bool,
    export: bool,
) -> Result<(Lsn, Option<String>)> {
    let temporary = if temporary { "TEMPORARY " } else { "" };
    let export_mode = if export { "EXPORT_SNAPSHOT" } else { "NOEXPORT_SNAPSHOT" };
    let sql = format!("CREATE_REPLICATION_SLOT {slot} {temporary}LOGICAL pgoutput {export_mode}");
    let create = repl.simple_query(&sql);
    tokio::pin!(create);
    let mut report = tokio::time::interval_at(Instant::now() + CREATION_REPORT, CREATION_REPORT_AGAIN);
    let rows = loop {
        tokio::select! {
            rows = &mut create => break rows,
            _ = report.tick() => report_blocker(control, metrics, slot).await,
        }
    };
    metrics.set_gauge("slot_waiting_for_pid", 0);
    let rows = rows.map_err(|e| wire_error("creating the replication slot", e))?;
    let text = |i: usize| -> Option<String> {
        rows.first().and_then(|r| r.get(i)).and_then(|v| v.as_ref()).map(|b| String::from_utf8_lossy(b).into_owned())
    };
    let consistent = text(1)
        .and_then(|l| Lsn::parse(&l).ok())
        .ok_or_else(|| TaskError::external("postgres_cdc: CREATE_REPLICATION_SLOT returned no consistent point"))?;
    let snapshot = export
        .then(|| text(2).ok_or_else(|| TaskError::external("postgres_cdc: CREATE_REPLICATION_SLOT exported no snapshot")))
        .transpose()?;
    Ok((consistent, snapshot))
}

/// Names the oldest writing transaction, which slot creation waits for.
async fn report_blocker(control: &Client, metrics: &TaskMetrics, slot: &str) {
    let sql = "SELECT pid, coalesce(extract(epoch FROM now() - xact_start), 0)::bigint, coalesce(usename::text, ''), \
                      coalesce(application_name, ''), coalesce(state, ''), left(coalesce(query, ''), 200) \
               FROM pg_stat_activity \
               WHERE backend_xid IS NOT NULL AND backend_type = 'client backend' AND pid <> pg_backend_pid() \
               ORDER BY xact_start LIMIT 1";
    match control.query_opt(sql, &[]).await {
        Ok(Some(row)) => {
            let (pid, seconds, user, application, state, query): (i32, i64, String, String, String, String) =
                (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4), row.get(5));
            metrics.set_gauge("slot_waiting_for_pid", i64::from(pid));
            warn!(
                slot,
                pid,
                user,
                application,
                state,
                running_seconds = seconds,
                query,
                "postgres_cdc: creating the replication slot waits for this transaction to end (PostgreSQL needs every \
                 transaction writing when the slot was asked for to finish first); commit or roll it back, or end it: \
                 SELECT pg_terminate_backend({pid})"
            );
        }
        Ok(None) => {
            warn!(slot, "postgres_cdc: creating the replication slot is taking long (no writing transaction seen; a prepared transaction?)")
        }
        Err(e) => warn!(slot, error = %e, "postgres_cdc: creating the replication slot is taking long; cannot read pg_stat_activity"),
    }
}

/// A connection inside a repeatable-read transaction that sees the exported snapshot.
pub(crate) async fn import_snapshot(pg: &tokio_postgres::Config, name: &str) -> Result<Client> {
    let client = connect(pg, "the snapshot connection").await?;
    let sql = format!("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT '{}'", name.replace('\'', "''"));
    client.batch_execute(&sql).await.map_err(|e| pg_error("postgres_cdc: importing the slot's snapshot", e))?;
    Ok(client)
}

/// Drops the slot because `why`, once the session reading it (ours, ending) lets go. Best effort:
/// the error that led here is the one reported. Whether the slot is gone.
pub(crate) async fn abandon_slot(control: &Client, slot: &str, why: &str) -> bool {
    let deadline = Instant::now() + SLOT_RELEASE_WAIT;
    loop {
        match control.execute("SELECT pg_drop_replication_slot($1)", &[&slot]).await {
            Ok(_) => {
                info!(slot, why, "postgres_cdc: dropped the replication slot; the next start takes a new snapshot");
                return true;
            }
            Err(e) if e.code() == Some(&SqlState::OBJECT_IN_USE) && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                warn!(slot, why, error = %e, "postgres_cdc: could not drop the replication slot; drop it by hand (SELECT pg_drop_replication_slot(name)), or it holds WAL on the server");
                return e.code() == Some(&SqlState::UNDEFINED_OBJECT);
            }
        }
    }
}
