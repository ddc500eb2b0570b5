//! PostgreSQL, the project's one wing for it: connections and identifiers (here), values' text
//! output ([`text`]), the logical replication protocol ([`pgoutput`]), replication slots
//! ([`slots`]), the change-data-capture source ([`cdc`]) with its snapshot's chunks ([`chunks`])
//! shared out between subtasks ([`handoff`]), and the lookup join ([`lookup`]).

mod backfill;
pub mod cdc;
mod chunks;
mod handoff;
pub mod lookup;
pub mod pgoutput;
pub mod slots;
pub mod text;

use std::time::Duration;

use pgwire_replication::PgWireError;
use tokio_postgres::config::SslMode;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls};
use tracing::debug;

use crate::error::{Result, TaskError};

/// Session settings that make values' text output the same whatever the server's defaults.
/// (`standard_conforming_strings` too, so a backfill's condition means what Eddy checked it for.)
pub(crate) const SESSION_OPTIONS: &str = "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c standard_conforming_strings=on";

/// Slot and publication names go unquoted into replication commands: keep them plain.
pub(crate) fn check_identifier(field: &str, name: &str) -> Result<()> {
    eddy_jobs::postgres::plain_identifier(name).then_some(()).ok_or_else(|| {
        TaskError::user(format!("{field}: `{name}` must be 1 to 63 lower-case letters, digits or underscores, not starting with a digit"))
    })
}

/// The connection settings from `url`, with the session options that pin text output.
pub(crate) fn client_config(url: &str) -> Result<tokio_postgres::Config> {
    let mut pg: tokio_postgres::Config =
        url.parse().map_err(|e| TaskError::user(format!("options.url: {e}; expected e.g. postgres://user:password@host:5432/database")))?;
    if pg.get_ssl_mode() == SslMode::Require {
        return Err(TaskError::user("options.url: sslmode=require is not supported by postgres_cdc yet; use a plain connection"));
    }
    if pg.get_user().is_none() {
        return Err(TaskError::user("options.url: name the user, e.g. postgres://eddy@host:5432/database"));
    }
    let options = pg.get_options().map_or_else(|| SESSION_OPTIONS.to_string(), |theirs| format!("{theirs} {SESSION_OPTIONS}"));
    pg.options(options);
    if pg.get_connect_timeout().is_none() {
        pg.connect_timeout(Duration::from_secs(10));
    }
    Ok(pg)
}

/// An ordinary connection, its driver spawned.
pub(crate) async fn connect(pg: &tokio_postgres::Config, what: &str) -> Result<Client> {
    let (client, connection) = pg.connect(NoTls).await.map_err(|e| pg_error(&format!("postgres_cdc: opening {what}"), e))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            debug!(error = %e, "postgres_cdc: connection ended");
        }
    });
    Ok(client)
}

pub(crate) fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A tokio-postgres error, blamed on the user when the fix is theirs.
pub(crate) fn pg_error(context: &str, e: tokio_postgres::Error) -> TaskError {
    let message = match e.as_db_error() {
        Some(db) => format!("{context}: {}{}", db.message(), db.hint().map(|hint| format!(" ({hint})")).unwrap_or_default()),
        None => format!("{context}: {e}"),
    };
    let theirs = [
        SqlState::INVALID_PASSWORD,
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        SqlState::INSUFFICIENT_PRIVILEGE,
        SqlState::INVALID_CATALOG_NAME,
        SqlState::UNDEFINED_TABLE,
        SqlState::UNDEFINED_COLUMN,
        SqlState::UNDEFINED_OBJECT,
        SqlState::INVALID_SCHEMA_NAME,
        SqlState::INVALID_NAME,
        SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE,
        SqlState::CONFIGURATION_LIMIT_EXCEEDED,
    ];
    match e.code() {
        Some(code) if theirs.contains(code) => TaskError::user(message),
        _ => TaskError::external(message),
    }
}

/// A replication-session error: the user's when it is about credentials or server settings.
pub(crate) fn wire_error(context: &str, e: PgWireError) -> TaskError {
    let message = format!("postgres_cdc: {context}: {e}");
    let text = e.to_string();
    if e.is_auth() || text.contains("password authentication failed") {
        TaskError::user(format!("{message}; check the user and password in options.url"))
    } else if text.contains("wal_level") {
        TaskError::user(format!("{message}; set `wal_level = logical` in postgresql.conf and restart the server"))
    } else if text.contains("replication slots") && text.contains("all") {
        TaskError::user(format!("{message}; raise max_replication_slots or drop unused slots"))
    } else if text.contains("must be superuser or replication role") || text.contains("permission denied") {
        TaskError::user(format!("{message}; the user needs the REPLICATION attribute"))
    } else {
        TaskError::external(message)
    }
}
