//! A new job's snapshot shared out between its subtasks through PostgreSQL itself (`LISTEN` /
//! `NOTIFY`): the subtasks may run on different workers, and the database is the one place they
//! all reach. Subtask 0, which creates the slot, offers the name of the snapshot the slot exported
//! and the plan of its chunks on the channel `eddy_snapshot`, again every quarter second, until
//! every other subtask has answered on `eddy_snapshot_ack` that it imported it: an exported
//! snapshot lives only while its session stays idle). Each subtask says so again once its share
//! has been handed on, and subtask 0 starts streaming only when all have: the stream's changes
//! follow every snapshot row, as with one subtask. When subtask 0 reads no snapshot (an existing
//! slot) it offers none, so that the others stop waiting. Offers name the job and the slot; other
//! jobs' are ignored.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_postgres::{AsyncMessage, Client, NoTls};
use tracing::{debug, info};

use super::chunks::ChunkPlan;
use super::pg_error;
use crate::error::{Result, TaskError};

const OFFERS: &str = "eddy_snapshot";
const ACKS: &str = "eddy_snapshot_ack";
/// How long subtask 0 waits for the others to take the snapshot once it offers it.
const TAKE_WAIT: Duration = Duration::from_secs(60);
/// How long the others wait for the offer: subtask 0 may wait on a long transaction before its
/// slot exists (it says which, see `slots::create_slot`).
const OFFER_WAIT: Duration = Duration::from_secs(600);
const OFFER_EVERY: Duration = Duration::from_millis(250);
/// How often subtask 0 says which shares it still waits for before streaming.
const DONE_REPORT: Duration = Duration::from_secs(30);

/// What subtask 0 offers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Offer {
    job: String,
    slot: String,
    snapshot: Option<SharedSnapshot>,
}

/// An exported snapshot to import: its name, the slot's consistent point it was taken at (the
/// rows' version) and how it is cut into chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub(crate) struct SharedSnapshot {
    pub name: String,
    pub at: u64,
    pub plan: ChunkPlan,
}

/// A subtask took the snapshot (or heard there is none), or, `done`, handed its share on.
#[derive(Debug, Serialize, Deserialize)]
struct Ack {
    job: String,
    slot: String,
    subtask: u32,
    done: bool,
}

/// Subtask 0's side once every subtask took the snapshot: what it waits for before streaming.
pub(crate) struct Shares {
    _client: Client,
    acks: mpsc::UnboundedReceiver<String>,
    job: String,
    slot: String,
    /// Subtasks whose share is not handed on yet.
    pending: BTreeSet<u32>,
}

impl Shares {
    /// Waits until every other subtask has handed its share on.
    pub(crate) async fn wait_done(mut self) -> Result<()> {
        let mut report = tokio::time::interval_at(Instant::now() + DONE_REPORT, DONE_REPORT);
        while !self.pending.is_empty() {
            tokio::select! {
                ack = self.acks.recv() => {
                    let ack = ack.ok_or_else(|| TaskError::external("postgres_cdc: the snapshot-sharing connection closed"))?;
                    if let Some(a) = parse_ack(&ack, &self.job, &self.slot).filter(|a| a.done) {
                        self.pending.remove(&a.subtask);
                    }
                }
                _ = report.tick() => info!(job_id = %self.job, slot = %self.slot, waiting_for = ?self.pending, "postgres_cdc: the stream starts once every subtask's share of the snapshot is handed on"),
            }
        }
        Ok(())
    }
}

fn parse_ack(payload: &str, job: &str, slot: &str) -> Option<Ack> {
    serde_json::from_str::<Ack>(payload).ok().filter(|a| a.job == job && a.slot == slot)
}

/// A connection that hears the notifications of `channel`, and their payloads.
async fn listen(pg: &tokio_postgres::Config, channel: &str) -> Result<(Client, mpsc::UnboundedReceiver<String>)> {
    let (client, mut connection) =
        pg.connect(NoTls).await.map_err(|e| pg_error("postgres_cdc: opening a connection to share the snapshot", e))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => {
                    if tx.send(n.payload().to_string()).is_err() {
                        return;
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    debug!(error = %e, "postgres_cdc: the snapshot-sharing connection ended");
                    return;
                }
                None => return,
            }
        }
    });
    client.batch_execute(&format!("LISTEN {channel}")).await.map_err(|e| pg_error("postgres_cdc: LISTEN for the snapshot", e))?;
    Ok((client, rx))
}

async fn notify(client: &Client, channel: &str, payload: &str) -> Result<()> {
    client
        .execute("SELECT pg_notify($1, $2)", &[&channel, &payload])
        .await
        .map_err(|e| pg_error("postgres_cdc: sharing the snapshot", e))?;
    Ok(())
}

/// Subtask 0: offers `snapshot` until subtasks `1..parallelism` have all taken it; then what it
/// waits for before streaming (nothing, when there is no snapshot to share).
pub(crate) async fn offer(
    pg: &tokio_postgres::Config,
    job: &str,
    slot: &str,
    snapshot: Option<SharedSnapshot>,
    parallelism: u32,
) -> Result<Shares> {
    let (client, mut acks) = listen(pg, ACKS).await?;
    let sharing = snapshot.is_some();
    let payload = serde_json::to_string(&Offer { job: job.into(), slot: slot.into(), snapshot }).unwrap_or_default();
    let mut waiting: BTreeSet<u32> = (1..parallelism).collect();
    let mut pending = if sharing { waiting.clone() } else { BTreeSet::new() };
    let deadline = Instant::now() + TAKE_WAIT;
    let mut every = tokio::time::interval(OFFER_EVERY);
    while !waiting.is_empty() {
        tokio::select! {
            _ = every.tick() => {
                if Instant::now() >= deadline {
                    return Err(TaskError::external(format!(
                        "postgres_cdc: subtasks {waiting:?} did not take the snapshot of slot `{slot}` within {}s; are all of the \
                         job's workers up? The job restarts, and then subtask 0 reads the table alone",
                        TAKE_WAIT.as_secs()
                    )));
                }
                notify(&client, OFFERS, &payload).await?;
            }
            ack = acks.recv() => {
                let ack = ack.ok_or_else(|| TaskError::external("postgres_cdc: the snapshot-sharing connection closed"))?;
                if let Some(a) = parse_ack(&ack, job, slot) {
                    waiting.remove(&a.subtask);
                    if a.done {
                        pending.remove(&a.subtask);
                    }
                }
            }
        }
    }
    info!(job_id = %job, slot, subtasks = parallelism, "postgres_cdc: every subtask took its share of the snapshot");
    Ok(Shares { _client: client, acks, job: job.into(), slot: slot.into(), pending })
}

/// Subtask `subtask` (not 0): waits for subtask 0's offer. The returned client answers it with
/// [`taken`] once the snapshot is imported.
pub(crate) async fn wait_offer(pg: &tokio_postgres::Config, job: &str, slot: &str) -> Result<(Client, Option<SharedSnapshot>)> {
    let (client, mut offers) = listen(pg, OFFERS).await?;
    let wait = async {
        while let Some(payload) = offers.recv().await {
            match serde_json::from_str::<Offer>(&payload) {
                Ok(o) if o.job == job && o.slot == slot => return Ok(o.snapshot),
                _ => {}
            }
        }
        Err(TaskError::external("postgres_cdc: the snapshot-sharing connection closed"))
    };
    match tokio::time::timeout(OFFER_WAIT, wait).await {
        Ok(snapshot) => Ok((client, snapshot?)),
        Err(_) => Err(TaskError::external(format!(
            "postgres_cdc: subtask 0 offered no snapshot of slot `{slot}` within {}s (is it running? waiting on a \
             transaction to create the slot?); the job restarts",
            OFFER_WAIT.as_secs()
        ))),
    }
}

/// Tells subtask 0 that `subtask` imported the snapshot (or heard there is none), or with
/// `done`, that it handed its share on.
pub(crate) async fn tell(client: &Client, job: &str, slot: &str, subtask: u32, done: bool) -> Result<()> {
    let payload = serde_json::to_string(&Ack { job: job.into(), slot: slot.into(), subtask, done }).unwrap_or_default();
    notify(client, ACKS, &payload).await
}
